//! Envelope addresses: parsed once at `MAIL`/`RCPT` (RFC 5321 §4.1.2, with RFC 6531's UTF-8),
//! kept as local part and domain, and written back in RFC 5321 form wherever an address
//! leaves postern (the spool, the upstream's `MAIL FROM`/`RCPT TO`, the XOAUTH2 `user=`,
//! reports).
//!
//! - The local part is stored as it *means*: `"a b"@example.com` has the local part `a b`.
//!   Written back it is quoted exactly when it is not a dot-string, with `"` and `\` escaped,
//!   so a quoted `>` or space can never end the path or start an ESMTP parameter upstream.
//! - What cannot be written back safely is refused at parse time: control characters
//!   anywhere (C0 including NUL, CR and LF, DEL, C1), a missing or empty domain (`bob@`).
//! - Case: the local part is case-preserving and compared exactly (RFC 5321 §2.4: only the
//!   receiving host may interpret it); the domain is compared case-insensitively.
//! - `<postmaster>` without a domain (RFC 5321 §4.5.1) is its own [`ForwardPath`] variant:
//!   the SMTP session delivers it to the mailbox the transaction sends as (see `smtp/session.rs`).
//! - The spool stores each address as its RFC 5321 text; [`Address::from_spool`] also reads
//!   the unquoted text that postern before this type wrote into version-1 envelopes.

use std::fmt;
use std::hash::{Hash, Hasher};

use crate::escape;

/// Longest path RFC 5321 §4.5.3.1.3 allows, angle brackets included.
pub const MAX_PATH: usize = 256;

/// Why an address was refused. The text completes "… address syntax: " or "… rejected: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A control character anywhere (inside quotes too): it cannot be passed on safely.
    #[error("it contains the control character U+{:04X}, which postern does not pass on", *.0 as u32)]
    Control(char),
    /// `bob@`
    #[error("the domain after \"@\" is empty")]
    EmptyDomain,
    /// `bob` (other than `postmaster` in RCPT).
    #[error("there is no \"@domain\"")]
    NoDomain,
    /// `@example.com`
    #[error("the local part before \"@\" is empty")]
    EmptyLocalPart,
    /// A domain that is not a host name or an address literal.
    #[error("\"{}\" is not a valid domain", escape::untrusted(.0))]
    BadDomain(String),
    /// Longer than RFC 5321 allows.
    #[error("it is longer than {MAX_PATH} octets")]
    TooLong,
    /// Anything else, with what was expected.
    #[error("{0}")]
    Syntax(&'static str),
}

impl AddressError {
    /// Does this refusal mean "cannot be passed on safely" (553) rather than plain bad syntax
    /// (501)?
    pub fn is_unsafe(&self) -> bool {
        matches!(self, Self::Control(_))
    }
}

/// A mailbox: local part and domain as parsed.
#[derive(Debug, Clone, Eq)]
pub struct Address {
    local: String,
    domain: String,
}

/// `MAIL FROM:` — the null sender `<>` or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: bounces and other automatic reports.
    Null,
    /// A sender mailbox.
    Mailbox(Address),
}

/// `RCPT TO:` — a mailbox, or the special `<postmaster>` without a domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<postmaster>` (any case, no domain): RFC 5321 §4.5.1 requires it to be accepted.
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Address),
}

impl Address {
    /// Parse a mailbox written without angle brackets (`user@example.com`,
    /// `"a b"@example.com`, `user@[192.0.2.1]`).
    pub fn parse(text: &str) -> Result<Address, AddressError> {
        let mut c = Cursor::new(text);
        let local = local_part(&mut c)?;
        let addr = after_local(&mut c, local)?;
        match c.peek() {
            None => addr.checked(),
            Some(ch) => Err(unexpected(ch, "unexpected text after the domain")),
        }
    }

    /// An address as the spool stores it: RFC 5321 text, or the unquoted text that postern
    /// wrote into version-1 envelopes before this type existed (`a b@example.com`, meaning the
    /// local part `a b`). Refused if it cannot be written back safely either way.
    pub fn from_spool(text: &str) -> Result<Address, AddressError> {
        if let Ok(a) = Address::parse(text) {
            return Ok(a);
        }
        // The old parser removed the quotes and kept what was inside; the domain is all after
        // the last "@" (a domain has no "@").
        let Some((local, domain)) = text.rsplit_once('@') else {
            return Err(AddressError::NoDomain);
        };
        if let Some(bad) = local.chars().find(|&c| escape::is_control(c)) {
            return Err(AddressError::Control(bad));
        }
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        let mut c = Cursor::new(domain);
        let domain = domain_or_literal(&mut c)?;
        if let Some(ch) = c.peek() {
            return Err(unexpected(ch, "unexpected text after the domain"));
        }
        Address {
            local: local.to_string(),
            domain,
        }
        .checked()
    }

    /// The local part as it means (quotes and escapes removed).
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The domain as received (its case kept).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Only ASCII (no SMTPUTF8 needed)?
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// Must the local part be quoted when written (it is not a dot-string)? Such an address
    /// is valid mail, but can be no one's Microsoft 365 sign-in name.
    pub fn needs_quoting(&self) -> bool {
        !is_dot_string(&self.local)
    }

    /// Is this an address no internet mailbox can have (see [`local_only_domain`])? A device
    /// that sends as `scanner@localhost` or `printer@SN12345` can never be sent as by a
    /// Microsoft 365 mailbox.
    pub fn is_local_only(&self) -> bool {
        local_only_domain(&self.domain)
    }

    fn checked(self) -> Result<Address, AddressError> {
        if self.to_string().len() + 2 > MAX_PATH {
            return Err(AddressError::TooLong);
        }
        Ok(self)
    }
}

/// The first address of the `From:` field of an RFC 5322 header section (`header` may go on
/// into the body; only the part before the first empty line is read), lowercased. `None`
/// when there is no `From:` or no address in it.
pub fn header_from(header: &[u8]) -> Option<String> {
    let end = header
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| header.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(header.len());
    let text = String::from_utf8_lossy(&header[..end]);
    // Unfold: a line starting with white space continues the field before it.
    let mut value: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        match &mut value {
            Some(v) if line.starts_with([' ', '\t']) => v.push_str(line),
            Some(_) => break,
            None => {
                if let Some((name, rest)) = line.split_once(':')
                    && name.trim_end().eq_ignore_ascii_case("from")
                {
                    value = Some(rest.to_string());
                }
            }
        }
    }
    let value = strip_comments(&value?);
    // `Name <a@b>` (a quoted name may hold '<' or ','), else the first bare address.
    let mut in_quotes = false;
    let mut start = None;
    for (i, ch) in value.char_indices() {
        match ch {
            '"' => in_quotes = !in_quotes,
            '<' if !in_quotes => start = Some(i + 1),
            '>' if !in_quotes => {
                if let Some(s) = start {
                    let a = value[s..i].trim();
                    return a.contains('@').then(|| a.to_lowercase());
                }
            }
            ',' if !in_quotes && start.is_none() => break,
            _ => {}
        }
    }
    let first = value.split(',').next().unwrap_or("").trim();
    let a = first.rsplit([' ', ':']).next().unwrap_or("").trim();
    (a.contains('@') && !a.contains('"')).then(|| a.to_lowercase())
}

/// `value` without RFC 5322 comments `(...)` outside quoted strings.
pub(crate) fn strip_comments(value: &str) -> String {
    let (mut out, mut depth, mut in_quotes) = (String::new(), 0u32, false);
    for ch in value.chars() {
        match ch {
            '"' if depth == 0 => {
                in_quotes = !in_quotes;
                out.push(ch);
            }
            '(' if !in_quotes => depth += 1,
            ')' if !in_quotes && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

/// Is `domain` one that exists only on a local network, so no internet mailbox has it: an
/// address literal (`[192.0.2.1]`), a single label (`localhost`, a printer's serial number),
/// or a name under a suffix reserved for local use (`.local`, `.localdomain`, `.lan`,
/// `.internal`, `.home.arpa`, `.localhost`, `.invalid`).
pub fn local_only_domain(domain: &str) -> bool {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    const LOCAL: &[&str] = &[
        "local",
        "localdomain",
        "lan",
        "internal",
        "home.arpa",
        "localhost",
        "invalid",
    ];
    d.starts_with('[')
        || !d.contains('.')
        || LOCAL
            .iter()
            .any(|s| d == *s || d.strip_suffix(s).is_some_and(|p| p.ends_with('.')))
}

/// The RFC 5321 form: `local@domain`, the local part quoted when it is not a dot-string.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local) {
            f.write_str(&self.local)?;
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                fmt::Write::write_char(f, c)?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.domain)
    }
}

/// Equal when the local parts are identical and the domains equal ignoring case.
impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        self.local == other.local && self.domain.to_lowercase() == other.domain.to_lowercase()
    }
}

impl Hash for Address {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.local.hash(state);
        self.domain.to_lowercase().hash(state);
    }
}

impl ReversePath {
    /// Parse `<…>` at the start of `input` (what follows `MAIL FROM:`); returns the path and
    /// the rest of the line (the ESMTP parameters).
    pub fn parse(input: &str) -> Result<(ReversePath, &str), AddressError> {
        match path(input)? {
            (Path::Null, rest) => Ok((ReversePath::Null, rest)),
            (Path::Mailbox(a), rest) => Ok((ReversePath::Mailbox(a), rest)),
            (Path::Postmaster, _) => Err(AddressError::NoDomain),
        }
    }

    /// The mailbox, unless this is the null sender.
    pub fn mailbox(&self) -> Option<&Address> {
        match self {
            Self::Null => None,
            Self::Mailbox(a) => Some(a),
        }
    }

    /// Is this `<>`?
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// Only ASCII?
    pub fn is_ascii(&self) -> bool {
        self.mailbox().is_none_or(Address::is_ascii)
    }
}

/// The RFC 5321 text between the angle brackets: empty for `<>`.
impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => Ok(()),
            Self::Mailbox(a) => a.fmt(f),
        }
    }
}

impl ForwardPath {
    /// Parse `<…>` at the start of `input` (what follows `RCPT TO:`); returns the path and
    /// the rest of the line (the ESMTP parameters).
    pub fn parse(input: &str) -> Result<(ForwardPath, &str), AddressError> {
        match path(input)? {
            (Path::Null, _) => Err(AddressError::Syntax("a recipient cannot be <>")),
            (Path::Mailbox(a), rest) => Ok((ForwardPath::Mailbox(a), rest)),
            (Path::Postmaster, rest) => Ok((ForwardPath::Postmaster, rest)),
        }
    }

    /// Only ASCII?
    pub fn is_ascii(&self) -> bool {
        match self {
            Self::Postmaster => true,
            Self::Mailbox(a) => a.is_ascii(),
        }
    }
}

/// The RFC 5321 text between the angle brackets.
impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postmaster => f.write_str("postmaster"),
            Self::Mailbox(a) => a.fmt(f),
        }
    }
}

/// An address as the spool stored it (empty for `<>`), as it must be written on the wire
/// between angle brackets, in the XOAUTH2 `user=` or in a report: read back through
/// [`Address::from_spool`] and written in RFC 5321 form. Refused when it cannot be written
/// safely (text an older version let through).
pub fn wire_form(stored: &str) -> Result<String, AddressError> {
    if stored.is_empty() {
        return Ok(String::new());
    }
    Address::from_spool(stored).map(|a| a.to_string())
}

enum Path {
    Null,
    Postmaster,
    Mailbox(Address),
}

/// `"<" [ A-d-l ":" ] Mailbox ">"`, `<>` or `<postmaster>`; returns the rest of `input`.
fn path(input: &str) -> Result<(Path, &str), AddressError> {
    let mut c = Cursor::new(input);
    if c.next() != Some('<') {
        return Err(AddressError::Syntax(
            "the address must be in angle brackets: <user@example.com>",
        ));
    }
    if c.eat('>') {
        return Ok((Path::Null, c.rest()));
    }
    if c.peek() == Some('@') {
        source_route(&mut c)?;
    }
    let local = local_part(&mut c)?;
    let p = if c.peek() == Some('>')
        && !local.quoted
        && local.text.eq_ignore_ascii_case("postmaster")
    {
        Path::Postmaster
    } else {
        Path::Mailbox(after_local(&mut c, local)?.checked()?)
    };
    match c.next() {
        Some('>') => Ok((p, c.rest())),
        Some(ch) => Err(unexpected(ch, "expected \">\" after the address")),
        None => Err(AddressError::Syntax("\">\" is missing after the address")),
    }
}

/// `@one.example,@two.example:` — a source route, which RFC 5321 §4.1.1.3 says to ignore.
fn source_route(c: &mut Cursor<'_>) -> Result<(), AddressError> {
    loop {
        if !c.eat('@') {
            return Err(AddressError::Syntax(
                "a source route is \"@domain,@domain:\"",
            ));
        }
        domain(c)?;
        match c.next() {
            Some(',') => continue,
            Some(':') => return Ok(()),
            Some(ch) => {
                return Err(unexpected(
                    ch,
                    "expected \",\" or \":\" in the source route",
                ));
            }
            None => {
                return Err(AddressError::Syntax(
                    "the source route does not end with \":\"",
                ));
            }
        }
    }
}

struct LocalPart {
    text: String,
    quoted: bool,
}

/// `Dot-string / Quoted-string`, decoded.
fn local_part(c: &mut Cursor<'_>) -> Result<LocalPart, AddressError> {
    if c.eat('"') {
        let mut text = String::new();
        loop {
            match c.next() {
                None => {
                    return Err(AddressError::Syntax(
                        "the quoted local part has no closing quote",
                    ));
                }
                Some('"') => return Ok(LocalPart { text, quoted: true }),
                Some('\\') => match c.next() {
                    None => {
                        return Err(AddressError::Syntax(
                            "the quoted local part has no closing quote",
                        ));
                    }
                    Some(ch) if escape::is_control(ch) => return Err(AddressError::Control(ch)),
                    Some(ch) => text.push(ch),
                },
                Some(ch) if escape::is_control(ch) => return Err(AddressError::Control(ch)),
                Some(ch) => text.push(ch),
            }
        }
    }
    let mut text = String::new();
    while let Some(ch) = c.peek() {
        if is_atext(ch) || ch == '.' {
            text.push(ch);
            c.next();
        } else {
            break;
        }
    }
    if text.is_empty() {
        return match c.peek() {
            Some('@') => Err(AddressError::EmptyLocalPart),
            Some(ch) => Err(unexpected(
                ch,
                "the local part has a character that needs quoting",
            )),
            None => Err(AddressError::Syntax("the address is empty")),
        };
    }
    if !is_dot_string(&text) {
        return Err(AddressError::Syntax(
            "a local part cannot begin or end with \".\" or hold \"..\" unless it is quoted",
        ));
    }
    Ok(LocalPart {
        text,
        quoted: false,
    })
}

/// `"@" Domain` after the local part.
fn after_local(c: &mut Cursor<'_>, local: LocalPart) -> Result<Address, AddressError> {
    match c.next() {
        Some('@') => {}
        Some(ch) => {
            return Err(unexpected(
                ch,
                "the local part has a character that needs quoting",
            ));
        }
        None => return Err(AddressError::NoDomain),
    }
    if matches!(c.peek(), None | Some('>')) {
        return Err(AddressError::EmptyDomain);
    }
    Ok(Address {
        local: local.text,
        domain: domain_or_literal(c)?,
    })
}

/// `Domain / address-literal`.
fn domain_or_literal(c: &mut Cursor<'_>) -> Result<String, AddressError> {
    if !c.eat('[') {
        return domain(c);
    }
    let mut lit = String::from("[");
    loop {
        match c.next() {
            Some(']') if lit.len() > 1 => {
                lit.push(']');
                return Ok(lit);
            }
            // dtext (RFC 5321 §4.1.3): printable ASCII except "[", "\" and "]".
            Some(ch) if ch.is_ascii_graphic() && !matches!(ch, '[' | '\\' | ']') => lit.push(ch),
            Some(ch) if escape::is_control(ch) => return Err(AddressError::Control(ch)),
            _ => return Err(AddressError::BadDomain(lit)),
        }
    }
}

/// `sub-domain *("." sub-domain)`: letters, digits, "-" (and "_", which devices use in host
/// names and which is safe to pass on), or UTF-8 (U-labels).
fn domain(c: &mut Cursor<'_>) -> Result<String, AddressError> {
    let mut d = String::new();
    while let Some(ch) = c.peek() {
        if ch.is_ascii_alphanumeric()
            || matches!(ch, '-' | '_' | '.')
            || (!ch.is_ascii() && !escape::needs_escape(ch))
        {
            d.push(ch);
            c.next();
        } else if escape::is_control(ch) {
            return Err(AddressError::Control(ch));
        } else {
            break;
        }
    }
    if d.is_empty() {
        return Err(AddressError::EmptyDomain);
    }
    if d.split('.').any(str::is_empty) {
        return Err(AddressError::BadDomain(d));
    }
    Ok(d)
}

/// RFC 5322 atext plus RFC 6531's UTF-8 (controls excluded).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || (!c.is_ascii() && !escape::is_control(c))
}

/// `Atom *("." Atom)`.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// A character other than `expected`: a control character is named as such.
fn unexpected(ch: char, expected: &'static str) -> AddressError {
    if escape::is_control(ch) {
        AddressError::Control(ch)
    } else {
        AddressError::Syntax(expected)
    }
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Cursor { s, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek()?;
        self.pos += ch.len_utf8();
        Some(ch)
    }

    fn eat(&mut self, ch: char) -> bool {
        if self.peek() == Some(ch) {
            self.pos += ch.len_utf8();
            true
        } else {
            false
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mailbox(s: &str) -> Address {
        Address::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn local_only_domains() {
        for d in [
            "localhost",
            "SN12345",
            "printer.local",
            "Office.LAN",
            "x.home.arpa",
            "corp.internal",
            "a.localdomain",
            "localhost.",
            "[192.0.2.1]",
            "x.invalid",
        ] {
            assert!(local_only_domain(d), "{d}");
        }
        for d in [
            "contoso.com",
            "example.org",
            "mail.lan.example.com",
            "local.example",
        ] {
            assert!(!local_only_domain(d), "{d}");
        }
        assert!(mailbox("scanner@localhost").is_local_only());
        assert!(!mailbox("scanner@contoso.com").is_local_only());
    }

    #[test]
    fn plain_addresses_round_trip_unchanged() {
        for s in [
            "user@example.com",
            "first.last+tag@sub.example.co.uk",
            "o'brien@example.com",
            "scanner@localhost",
            "printer@192.168.1.5",
            "dev@host_name.lan",
            "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]",
            "j\u{f6}rg@b\u{fc}cher.example",
            "\u{4f8b}\u{3048}@\u{4f8b}\u{3048}.\u{30c6}\u{30b9}\u{30c8}",
        ] {
            assert_eq!(mailbox(s).to_string(), s);
        }
    }

    #[test]
    fn quoted_local_parts_keep_their_meaning_and_are_quoted_again() {
        let a = mailbox("\"x> RET=HDRS ENVID=evil\"@example.com");
        assert_eq!(a.local_part(), "x> RET=HDRS ENVID=evil");
        assert_eq!(a.domain(), "example.com");
        assert_eq!(a.to_string(), "\"x> RET=HDRS ENVID=evil\"@example.com");
        assert_eq!(
            mailbox("\"a b\"@example.com").to_string(),
            "\"a b\"@example.com"
        );
        // Escapes: \" and \\ stay escaped, a needless escape is dropped.
        let e = mailbox(r#""a\"b\\c\d"@example.com"#);
        assert_eq!(e.local_part(), r#"a"b\cd"#);
        assert_eq!(e.to_string(), r#""a\"b\\cd"@example.com"#);
        // Quotes that were not needed are not written back.
        assert_eq!(
            mailbox("\"plain\"@example.com").to_string(),
            "plain@example.com"
        );
        assert_eq!(
            mailbox("\"john..doe\"@example.com").to_string(),
            "\"john..doe\"@example.com"
        );
        assert_eq!(mailbox("\"\"@example.com").to_string(), "\"\"@example.com");
        assert_eq!(
            mailbox("\"@\"@example.com").to_string(),
            "\"@\"@example.com"
        );
    }

    #[test]
    fn unsafe_addresses_are_refused() {
        for (s, bad) in [
            ("\"a\u{1b}[31m\"@example.com", '\u{1b}'),
            ("\"n\0ul\"@example.com", '\0'),
            ("\"a\\\u{0}\"@example.com", '\0'),
            ("\"cr\rlf\"@example.com", '\r'),
            ("\"lf\n\"@example.com", '\n'),
            ("\"del\u{7f}\"@example.com", '\u{7f}'),
            ("\"c1\u{9b}\"@example.com", '\u{9b}'),
            ("c1\u{85}@example.com", '\u{85}'),
            ("tab\t@example.com", '\t'),
            ("a@exa\u{1b}mple.com", '\u{1b}'),
            ("a@[1.2.3.4\u{7f}]", '\u{7f}'),
        ] {
            let e = Address::parse(s).unwrap_err();
            assert_eq!(e, AddressError::Control(bad), "{s:?}");
            assert!(e.is_unsafe());
        }
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        assert_eq!(
            Address::parse("bob@").unwrap_err(),
            AddressError::EmptyDomain
        );
        assert_eq!(Address::parse("bob").unwrap_err(), AddressError::NoDomain);
        assert_eq!(
            Address::parse("@example.com").unwrap_err(),
            AddressError::EmptyLocalPart
        );
        assert!(matches!(
            Address::parse("a@b..c"),
            Err(AddressError::BadDomain(_))
        ));
        assert!(matches!(
            Address::parse("a@example.com."),
            Err(AddressError::BadDomain(_))
        ));
        assert!(matches!(
            Address::parse("a b@example.com"),
            Err(AddressError::Syntax(_))
        ));
        assert!(matches!(
            Address::parse("a..b@example.com"),
            Err(AddressError::Syntax(_))
        ));
        assert!(matches!(
            Address::parse(".a@example.com"),
            Err(AddressError::Syntax(_))
        ));
        assert!(matches!(
            Address::parse("a.@example.com"),
            Err(AddressError::Syntax(_))
        ));
        assert!(Address::parse("a@@example.com").is_err());
        assert!(matches!(
            Address::parse("\"open@example.com"),
            Err(AddressError::Syntax(_))
        ));
        assert!(matches!(
            Address::parse("a@b c"),
            Err(AddressError::Syntax(_))
        ));
        assert!(matches!(
            Address::parse("a@[]"),
            Err(AddressError::BadDomain(_))
        ));
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(Address::parse(&long).unwrap_err(), AddressError::TooLong);
        assert!(AddressError::EmptyDomain.to_string().contains("domain"));
    }

    #[test]
    fn paths() {
        let (p, rest) = ReversePath::parse("<> SIZE=10").unwrap();
        assert_eq!((p, rest), (ReversePath::Null, " SIZE=10"));
        let (p, rest) =
            ReversePath::parse("<\"x> RET=HDRS ENVID=evil\"@example.com> SIZE=195").unwrap();
        assert_eq!(rest, " SIZE=195");
        assert_eq!(p.to_string(), "\"x> RET=HDRS ENVID=evil\"@example.com");
        // Source routes are accepted and dropped (RFC 5321 §4.1.1.3).
        let (p, _) = ForwardPath::parse("<@relay.example,@b.example:user@example.com>").unwrap();
        assert_eq!(p, ForwardPath::Mailbox(mailbox("user@example.com")));
        for pm in ["<postmaster>", "<Postmaster>", "<POSTMASTER>"] {
            assert_eq!(ForwardPath::parse(pm).unwrap().0, ForwardPath::Postmaster);
        }
        assert_eq!(
            ReversePath::parse("<postmaster>").unwrap_err(),
            AddressError::NoDomain
        );
        assert!(
            ForwardPath::parse("<\"postmaster\">").is_err(),
            "only the bare word is special"
        );
        assert!(ForwardPath::parse("<>").is_err());
        assert_eq!(
            ForwardPath::parse("<bob@>").unwrap_err(),
            AddressError::EmptyDomain
        );
        assert!(ForwardPath::parse("bob@example.com").is_err());
        assert!(ForwardPath::parse("<bob@example.com").is_err());
        assert!(ForwardPath::parse("<a@b><c@d>").is_ok_and(|(_, rest)| rest == "<c@d>"));
    }

    #[test]
    fn case_rules() {
        assert_eq!(mailbox("Bob@Example.COM"), mailbox("Bob@example.com"));
        assert_ne!(mailbox("Bob@example.com"), mailbox("bob@example.com"));
        assert_eq!(
            mailbox("Bob@Example.COM").to_string(),
            "Bob@Example.COM",
            "case kept"
        );
        assert_eq!(
            mailbox("a@B\u{dc}CHER.example"),
            mailbox("a@b\u{fc}cher.example")
        );
    }

    #[test]
    fn version_1_spool_text_is_still_read() {
        // What postern wrote before this type: the local part unquoted.
        let a = Address::from_spool("a b@example.com").unwrap();
        assert_eq!(a.to_string(), "\"a b\"@example.com");
        let a = Address::from_spool("x> RET=HDRS ENVID=evil@example.com").unwrap();
        assert_eq!(a.local_part(), "x> RET=HDRS ENVID=evil");
        assert_eq!(a.to_string(), "\"x> RET=HDRS ENVID=evil\"@example.com");
        // RFC 5321 text as written now reads back the same.
        for s in [
            "\"a b\"@example.com",
            "user@example.com",
            r#""a\"b"@example.com"#,
        ] {
            assert_eq!(Address::from_spool(s).unwrap().to_string(), s);
        }
        // What old versions let through and must not go out now.
        assert_eq!(
            Address::from_spool("n\0ul@example.com").unwrap_err(),
            AddressError::Control('\0')
        );
        assert_eq!(
            Address::from_spool("esc\u{1b}@example.com").unwrap_err(),
            AddressError::Control('\u{1b}')
        );
        assert!(Address::from_spool("bob@").is_err());
        assert!(Address::from_spool("a@b\r\nRSET").is_err());
        assert!(Address::from_spool("nodomain").is_err());
        assert_eq!(wire_form("").unwrap(), "");
        assert_eq!(wire_form("a b@example.com").unwrap(), "\"a b\"@example.com");
        assert!(wire_form("a\r\nRSET@example.com").is_err());
    }

    fn any_local() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just(' '),
                Just('>'),
                Just('.'),
                Just('@'),
                proptest::char::range('!', '~'),
                proptest::char::range('\u{a0}', '\u{2ff}'),
            ],
            0..30,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn any_printable_local_part_round_trips(local in any_local(), domain in "[a-z0-9]{1,10}(\\.[a-z]{2,5}){0,2}") {
            let a = Address { local: local.clone(), domain: domain.clone() };
            let text = a.to_string();
            let line = format!("<{text}> NOTIFY=NEVER");
            let (back, rest) = ForwardPath::parse(&line).unwrap();
            prop_assert_eq!(rest, " NOTIFY=NEVER", "the path ends where it should");
            prop_assert_eq!(back, ForwardPath::Mailbox(a.clone()));
            prop_assert_eq!(Address::parse(&text).unwrap(), a.clone());
            prop_assert_eq!(Address::from_spool(&text).unwrap(), a);
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}", raw in proptest::collection::vec(any::<char>(), 0..40)) {
            let _ = ReversePath::parse(&s);
            let raw: String = raw.into_iter().collect();
            let _ = ForwardPath::parse(&raw);
            let _ = Address::from_spool(&raw);
            if let Ok(a) = Address::parse(&raw) {
                prop_assert!(!a.to_string().chars().any(escape::is_control));
            }
        }
    }
}
