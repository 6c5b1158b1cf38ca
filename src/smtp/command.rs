//! One SMTP command line → [`Command`], over smtp-proto 0.2's `Request` parser.
//!
//! Parsing never fails: a line we cannot use becomes [`Command::Unknown`],
//! [`Command::Invalid`] (with the exact reply to send) or [`Command::NonSmtp`] (an HTTP request
//! or header line: the connection is closed, as Postfix does).
//!
//! `MAIL`, `RCPT` and `BDAT` are parsed here rather than by smtp-proto, which removes the
//! quotes of a quoted local part (so `"x> RET=HDRS"@example.com` would go upstream as two
//! parameters), drops CRs and passes control characters inside quotes, and keeps only the
//! trailing digits of a number longer than 19 digits (`SIZE=99999999999999999999999999` read
//! as 999999). Paths go through [`crate::address`]; parameters are the ones we advertise.

use std::borrow::Cow;
use std::fmt;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Error as ProtoError, Request};
use zeroize::Zeroizing;

use super::reply::Reply;
use crate::address::{AddressError, ForwardPath, ReversePath};

/// RFC 1870: `size-value ::= 1*20DIGIT`. BDAT's chunk size is held to the same bound.
const MAX_DIGITS: usize = 20;

/// `BODY=` on MAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    /// Not given.
    #[default]
    Unspecified,
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
}

/// `MAIL FROM:<address> [SIZE=n] [BODY=...] [SMTPUTF8] [AUTH=...]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse-path (`<>` for the null sender).
    pub sender: ReversePath,
    /// Declared size (`SIZE=`), if given (`SIZE=0` is a declared size of 0); a 20-digit value
    /// past `u64` is `u64::MAX`.
    pub size: Option<u64>,
    /// Declared body type.
    pub body: Body,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
}

/// A SASL mechanism named in AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// The de-facto LOGIN mechanism.
    Login,
    /// Anything else (not offered).
    Other,
}

/// One parsed command.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO host`
    Ehlo(String),
    /// `HELO host`
    Helo(String),
    /// `MAIL FROM:`
    Mail(MailFrom),
    /// `RCPT TO:<address>`
    Rcpt(ForwardPath),
    /// `DATA`
    Data,
    /// `BDAT size [LAST]`
    Bdat {
        /// Exact chunk size in octets.
        size: u64,
        /// `LAST` was given.
        last: bool,
    },
    /// `RSET`
    Rset,
    /// `NOOP`
    Noop,
    /// `QUIT`
    Quit,
    /// `VRFY`
    Vrfy,
    /// `EXPN`
    Expn,
    /// `HELP`
    Help,
    /// `STARTTLS`
    StartTls,
    /// `AUTH mechanism [initial-response]`; `initial` is `None` when absent, `Some("")` for `=`.
    Auth {
        /// The mechanism.
        mechanism: Mechanism,
        /// The initial response (base64), wiped on drop.
        initial: Option<Zeroizing<String>>,
    },
    /// An HTTP request line or header (`GET / HTTP/1.1`, `Host: x`): close the connection.
    NonSmtp,
    /// Not a command we know.
    Unknown,
    /// A known command with bad syntax or parameters, with the reply to send.
    Invalid(Reply),
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never print credentials.
            Self::Auth { mechanism, initial } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial", &initial.as_ref().map(|_| "[redacted]"))
                .finish(),
            Self::Ehlo(h) => f.debug_tuple("Ehlo").field(h).finish(),
            Self::Helo(h) => f.debug_tuple("Helo").field(h).finish(),
            Self::Mail(m) => f.debug_tuple("Mail").field(m).finish(),
            Self::Rcpt(r) => f.debug_tuple("Rcpt").field(r).finish(),
            Self::Bdat { size, last } => f
                .debug_struct("Bdat")
                .field("size", size)
                .field("last", last)
                .finish(),
            Self::Invalid(r) => f.debug_tuple("Invalid").field(r).finish(),
            other => f.write_str(other.name()),
        }
    }
}

impl Command {
    /// The command verb, for logs (`"UNKNOWN"` for what we could not parse).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Helo(_) => "HELO",
            Self::Mail(_) => "MAIL",
            Self::Rcpt(_) => "RCPT",
            Self::Data => "DATA",
            Self::Bdat { .. } => "BDAT",
            Self::Rset => "RSET",
            Self::Noop => "NOOP",
            Self::Quit => "QUIT",
            Self::Vrfy => "VRFY",
            Self::Expn => "EXPN",
            Self::Help => "HELP",
            Self::StartTls => "STARTTLS",
            Self::Auth { .. } => "AUTH",
            Self::NonSmtp => "NON-SMTP",
            Self::Unknown => "UNKNOWN",
            Self::Invalid(_) => "INVALID",
        }
    }
}

/// Verbs and header-like words that mean "this is HTTP, not SMTP" (Postfix's
/// `smtpd_forbidden_commands` default plus the other HTTP methods).
const HTTP_VERBS: &[&str] = &["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"];

/// Parse one command line (with or without its CRLF). Never panics.
pub fn parse(line: &[u8]) -> Command {
    let verb_end = line
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let verb = &line[..verb_end];
    if HTTP_VERBS
        .iter()
        .any(|v| verb.eq_ignore_ascii_case(v.as_bytes()))
        || (verb.len() > 1 && verb.ends_with(b":"))
    {
        return Command::NonSmtp;
    }

    if verb.eq_ignore_ascii_case(b"MAIL") {
        return mail(&line[verb_end..]).unwrap_or_else(Command::Invalid);
    }
    if verb.eq_ignore_ascii_case(b"RCPT") {
        return rcpt(&line[verb_end..]).unwrap_or_else(Command::Invalid);
    }
    if verb.eq_ignore_ascii_case(b"BDAT") {
        return bdat(&line[verb_end..]);
    }

    let owned;
    let line = if line.ends_with(b"\n") {
        line
    } else {
        owned = [line, b"\r\n"].concat();
        &owned[..]
    };
    match Request::parse(&mut line.iter()) {
        Ok(req) => from_request(req),
        Err(e) => from_error(e),
    }
}

/// The arguments after the verb, without the line ending; `None` when not UTF-8.
fn arguments(rest: &[u8]) -> Option<&str> {
    let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    std::str::from_utf8(rest).ok()
}

/// `<keyword>:` after the verb (`FROM:`, `TO:`), spaces allowed around it as clients send
/// them; returns what follows.
fn after_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let args = args.trim_start_matches([' ', '\t']);
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args[keyword.len()..].trim_start_matches([' ', '\t']);
    Some(rest.strip_prefix(':')?.trim_start_matches([' ', '\t']))
}

/// The ESMTP parameters after a path: nothing, or whitespace then `KEY[=VALUE]` words.
fn parameters(rest: &str) -> Result<Vec<(&str, Option<&str>)>, ()> {
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(());
    }
    rest.split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let (key, value) = match w.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (w, None),
            };
            // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
            let ok = key.starts_with(|c: char| c.is_ascii_alphanumeric())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if ok { Ok((key, value)) } else { Err(()) }
        })
        .collect()
}

/// `1*20DIGIT` → the number, saturating at `u64::MAX`; `None` for anything else.
fn number(digits: &str) -> Option<u64> {
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // 20 digits always fit u128.
    let n: u128 = digits.parse().ok()?;
    Some(u64::try_from(n).unwrap_or(u64::MAX))
}

/// `MAIL` or `RCPT` with everything it needs to parse its arguments.
struct PathCommand<P> {
    /// `FROM` or `TO`.
    keyword: &'static str,
    /// The usage shown on a syntax error.
    usage: &'static str,
    /// The path parser (reverse- or forward-path).
    parse: fn(&str) -> Result<(P, &str), AddressError>,
    /// The refusal of an address, given what the client sent.
    refuse: fn(&AddressError, &str) -> Reply,
    /// The refusal of a line that is not UTF-8.
    not_utf8: fn() -> Reply,
}

type Params<'a> = Vec<(&'a str, Option<&'a str>)>;

impl<P> PathCommand<P> {
    /// `<keyword>:<path> [parameters]` → the path and the parameters.
    fn split<'a>(&self, rest: &'a [u8]) -> Result<(P, Params<'a>), Reply> {
        let args = arguments(rest).ok_or_else(self.not_utf8)?;
        let path = after_keyword(args, self.keyword).ok_or_else(|| Reply::syntax(self.usage))?;
        let (p, rest) = (self.parse)(path).map_err(|e| (self.refuse)(&e, path))?;
        let params = parameters(rest).map_err(|()| Reply::syntax(self.usage))?;
        Ok((p, params))
    }
}

const MAIL: PathCommand<ReversePath> = PathCommand {
    keyword: "FROM",
    usage: "MAIL FROM:<address> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]",
    parse: ReversePath::parse,
    refuse: Reply::bad_sender,
    not_utf8: Reply::bad_sender_syntax,
};

const RCPT: PathCommand<ForwardPath> = PathCommand {
    keyword: "TO",
    usage: "RCPT TO:<address>",
    parse: ForwardPath::parse,
    refuse: Reply::bad_recipient,
    not_utf8: Reply::bad_recipient_syntax,
};

const BDAT_SYNTAX: &str = "BDAT chunk-size [LAST] (chunk-size: 1 to 20 digits)";

fn mail(rest: &[u8]) -> Result<Command, Reply> {
    let (sender, params) = MAIL.split(rest)?;
    let mut m = MailFrom {
        sender,
        size: None,
        body: Body::Unspecified,
        smtputf8: false,
    };
    for (key, value) in params {
        let key = key.to_ascii_uppercase();
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => m.size = Some(number(v).ok_or_else(Reply::bad_size)?),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => m.body = Body::EightBitMime,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => m.body = Body::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("BINARYMIME") => {
                return Err(Reply::unsupported_parameter("BODY=BINARYMIME"));
            }
            ("SMTPUTF8", None) => m.smtputf8 = true,
            // RFC 4954 §5: clients that saw AUTH may name the submitter; nothing to do with it.
            ("AUTH", Some(v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => {}
            ("SIZE" | "BODY" | "SMTPUTF8" | "AUTH", _) => {
                return Err(Reply::invalid_parameter(&key));
            }
            // Not advertised (DSN's RET and ENVID among them): RFC 5321 §4.1.1.11.
            _ => return Err(Reply::unsupported_parameter(&key)),
        }
    }
    Ok(Command::Mail(m))
}

fn rcpt(rest: &[u8]) -> Result<Command, Reply> {
    let (to, params) = RCPT.split(rest)?;
    match params.first() {
        None => Ok(Command::Rcpt(to)),
        // We advertise no RCPT parameters (no DSN: NOTIFY, ORCPT).
        Some((key, _)) => Err(Reply::unsupported_parameter(&key.to_ascii_uppercase())),
    }
}

fn bdat(rest: &[u8]) -> Command {
    let Some(args) = arguments(rest) else {
        return Command::Invalid(Reply::syntax(BDAT_SYNTAX));
    };
    let mut words = args.split([' ', '\t']).filter(|w| !w.is_empty());
    let size = words.next().and_then(number);
    let last = match words.next() {
        None => Some(false),
        Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
        Some(_) => None,
    };
    match (size, last, words.next()) {
        (Some(size), Some(last), None) if size < u64::MAX => Command::Bdat { size, last },
        _ => Command::Invalid(Reply::syntax(BDAT_SYNTAX)),
    }
}

fn from_request(req: Request<Cow<'_, str>>) -> Command {
    match req {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        // Parsed by our own functions above; listed for completeness.
        Request::Mail { .. } | Request::Rcpt { .. } | Request::Bdat { .. } => Command::Unknown,
        Request::Data => Command::Data,
        Request::Auth {
            mechanism,
            initial_response,
        } => {
            let mechanism = match mechanism {
                AUTH_PLAIN => Mechanism::Plain,
                AUTH_LOGIN => Mechanism::Login,
                _ => Mechanism::Other,
            };
            let initial = match initial_response.as_ref() {
                "" => None,
                "=" => Some(Zeroizing::new(String::new())),
                s => Some(Zeroizing::new(s.to_string())),
            };
            if let Cow::Owned(s) = initial_response {
                drop(Zeroizing::new(s));
            }
            Command::Auth { mechanism, initial }
        }
        Request::Noop { .. } => Command::Noop,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Expn { .. } => Command::Expn,
        Request::Help { .. } => Command::Help,
        Request::StartTls => Command::StartTls,
        Request::Rset => Command::Rset,
        Request::Quit => Command::Quit,
        Request::Lhlo { .. }
        | Request::Etrn { .. }
        | Request::Atrn { .. }
        | Request::Burl { .. } => Command::Unknown,
    }
}

fn from_error(e: ProtoError) -> Command {
    match e {
        ProtoError::UnknownCommand => Command::Unknown,
        ProtoError::InvalidSenderAddress | ProtoError::InvalidRecipientAddress => {
            Command::Invalid(Reply::syntax("command"))
        }
        ProtoError::SyntaxError { syntax } => Command::Invalid(Reply::syntax(syntax)),
        ProtoError::InvalidParameter { param } => Command::Invalid(Reply::invalid_parameter(param)),
        ProtoError::UnsupportedParameter { param } => {
            Command::Invalid(Reply::unsupported_parameter(&param))
        }
        ProtoError::NeedsMoreData { .. }
        | ProtoError::ResponseTooLong
        | ProtoError::InvalidResponse { .. } => Command::Invalid(Reply::syntax("command")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Address;
    use proptest::prelude::*;

    fn p(s: &str) -> Command {
        parse(s.as_bytes())
    }

    fn mailbox(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn from(s: &str) -> ReversePath {
        ReversePath::Mailbox(mailbox(s))
    }

    fn to(s: &str) -> Command {
        Command::Rcpt(ForwardPath::Mailbox(mailbox(s)))
    }

    /// The reply of an invalid command, as on the wire (without CRLF).
    fn refusal(line: &str) -> String {
        match p(line) {
            Command::Invalid(r) => r.to_string(),
            other => panic!("{line:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn basic_commands() {
        assert_eq!(
            p("EHLO client.example\r\n"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(p("helo x\r\n"), Command::Helo("x".into()));
        assert_eq!(p("DATA\r\n"), Command::Data);
        assert_eq!(p("RSET\r\n"), Command::Rset);
        assert_eq!(p("NOOP hello\r\n"), Command::Noop);
        assert_eq!(p("QUIT\r\n"), Command::Quit);
        assert_eq!(p("VRFY root\r\n"), Command::Vrfy);
        assert_eq!(p("EXPN list\r\n"), Command::Expn);
        assert_eq!(p("HELP\r\n"), Command::Help);
        assert_eq!(p("STARTTLS\r\n"), Command::StartTls);
        assert_eq!(
            p("BDAT 100\r\n"),
            Command::Bdat {
                size: 100,
                last: false
            }
        );
        assert_eq!(
            p("BDAT 0 LAST\r\n"),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(p("XYZZY\r\n"), Command::Unknown);
        assert_eq!(p("ETRN x\r\n"), Command::Unknown);
        assert_eq!(p("QUIT"), Command::Quit, "a missing CRLF is tolerated");
        assert_eq!(p("data\n"), Command::Data, "bare LF ends a command line");
    }

    #[test]
    fn mail_parameters() {
        assert_eq!(
            p("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8\r\n"),
            Command::Mail(MailFrom {
                sender: from("a@b.example"),
                size: Some(1000),
                body: Body::EightBitMime,
                smtputf8: true
            })
        );
        assert_eq!(
            p("MAIL FROM:<>\r\n"),
            Command::Mail(MailFrom {
                sender: ReversePath::Null,
                size: None,
                body: Body::Unspecified,
                smtputf8: false
            })
        );
        assert!(
            matches!(p("MAIL FROM:<a@b> BODY=7BIT\r\n"), Command::Mail(m) if m.body == Body::SevenBit)
        );
        assert!(
            matches!(p("MAIL FROM:<a@b> BODY=BINARYMIME\r\n"), Command::Invalid(r) if r.code == 555)
        );
        assert!(matches!(p("MAIL FROM:<a@b> FOO=BAR\r\n"), Command::Invalid(r) if r.code == 555));
        assert!(matches!(p("MAIL FROM:<a@b> SIZE=abc\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL FROM:a@b\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL FROM:<a@@b>\r\n"), Command::Invalid(r) if r.code == 501));
        let bad = parse(b"MAIL FROM:<\xff@b.example>\r\n");
        assert!(
            matches!(bad, Command::Invalid(r) if r.code == 501),
            "invalid UTF-8"
        );
        assert!(
            matches!(p("MAIL FROM:<j\u{f6}rg@b.example> SMTPUTF8\r\n"), Command::Mail(m) if m.sender == from("j\u{f6}rg@b.example"))
        );
    }

    #[test]
    fn rcpt() {
        assert_eq!(p("RCPT TO:<x@y.example>\r\n"), to("x@y.example"));
        assert_eq!(p("rcpt to: <x@y.example>\r\n"), to("x@y.example"));
        assert_eq!(p("RCPT TO : <x@y.example> \r\n"), to("x@y.example"));
        assert!(matches!(p("RCPT TO:x@y\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(
            p("RCPT TO:<x@y> NOTIFY=BOGUS\r\n"),
            Command::Invalid(_)
        ));
    }

    #[test]
    fn quoted_local_parts_stay_one_address() {
        // Issue 7: these reached the upstream as extra ESMTP parameters.
        match p("MAIL FROM:<\"x> RET=HDRS ENVID=evil\"@example.com> SIZE=195\r\n") {
            Command::Mail(m) => {
                assert_eq!(
                    m.sender.to_string(),
                    "\"x> RET=HDRS ENVID=evil\"@example.com"
                );
                assert_eq!(m.size, Some(195));
            }
            other => panic!("{other:?}"),
        }
        match p("RCPT TO:<\"y> NOTIFY=NEVER ORCPT=rfc822;z@example.com\"@example.org>\r\n") {
            Command::Rcpt(ForwardPath::Mailbox(a)) => {
                assert_eq!(a.local_part(), "y> NOTIFY=NEVER ORCPT=rfc822;z@example.com");
                assert_eq!(a.domain(), "example.org");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p("RCPT TO:<\"a b\"@example.com>\r\n"),
            Command::Rcpt(ForwardPath::Mailbox(
                Address::parse("\"a b\"@example.com").unwrap()
            ))
        );
    }

    #[test]
    fn addresses_that_cannot_be_passed_on_are_refused_with_the_reason() {
        assert_eq!(
            refusal("MAIL FROM:<\"n\0ul\"@example.com>\r\n"),
            "553 5.1.7 Sender address rejected: it contains the control character U+0000, which postern does not pass on"
        );
        assert_eq!(
            refusal("MAIL FROM:<\"\u{1b}[31m\"@example.com>\r\n"),
            "553 5.1.7 Sender address rejected: it contains the control character U+001B, which postern does not pass on"
        );
        assert!(refusal("RCPT TO:<\"a\rb\"@example.com>\r\n").starts_with(
            "553 5.1.3 Recipient address rejected: it contains the control character U+000D"
        ));
        assert!(refusal("RCPT TO:<\"\u{9b}\"@example.com>\r\n").starts_with("553 5.1.3 "));
        assert!(refusal("RCPT TO:<\"\u{7f}\"@example.com>\r\n").starts_with("553 5.1.3 "));
        // Issue 10: an empty domain.
        assert_eq!(
            refusal("RCPT TO:<bob@>\r\n"),
            "501 5.1.3 Bad recipient address syntax: the domain after \"@\" is empty"
        );
        assert!(refusal("MAIL FROM:<bob@>\r\n").starts_with("501 5.1.7 "));
        assert!(refusal("MAIL FROM:<postmaster>\r\n").starts_with("501 5.1.7 "));
        assert!(refusal("RCPT TO:<a b@example.com>\r\n").starts_with("501 5.1.3 "));
        // What the client sent goes to the log, not back to it.
        let Command::Invalid(r) = p("RCPT TO:<\"\u{9b}\"@example.com>\r\n") else {
            panic!()
        };
        assert_eq!(
            r.detail.as_deref(),
            Some("recipient as sent: <\"\u{9b}\"@example.com>")
        );
        assert!(
            !r.to_bytes().contains(&0x9b)
                && !String::from_utf8(r.to_bytes()).unwrap().contains('\u{9b}')
        );
    }

    #[test]
    fn postmaster_without_a_domain_is_a_recipient() {
        // RFC 5321 §4.5.1 (issue 8).
        for line in [
            "RCPT TO:<postmaster>\r\n",
            "RCPT TO:<Postmaster>\r\n",
            "rcpt to:<POSTMASTER>\r\n",
        ] {
            assert_eq!(p(line), Command::Rcpt(ForwardPath::Postmaster), "{line}");
        }
    }

    #[test]
    fn numbers_past_twenty_digits_are_refused_not_truncated() {
        // Issue 7: smtp-proto read these as 999999 and 5.
        assert_eq!(
            refusal("MAIL FROM:<a@b.example> SIZE=99999999999999999999999999\r\n"),
            "501 5.5.4 Bad SIZE parameter: the size must be 1 to 20 digits"
        );
        assert_eq!(
            refusal("BDAT 100000000000000000000005 LAST\r\n"),
            "501 5.5.4 Syntax: BDAT chunk-size [LAST] (chunk-size: 1 to 20 digits)"
        );
        assert!(
            refusal("BDAT 18446744073709551616\r\n").starts_with("501 5.5.4"),
            "past u64"
        );
        // 20 digits are valid SIZE syntax; past u64 it is simply too big (552 in the session).
        assert!(
            matches!(p("MAIL FROM:<a@b.example> SIZE=99999999999999999999"), Command::Mail(m) if m.size == Some(u64::MAX))
        );
        assert_eq!(
            p("BDAT 18446744073709551614 LAST"),
            Command::Bdat {
                size: 18_446_744_073_709_551_614,
                last: true
            }
        );
        for bad in [
            "SIZE=",
            "SIZE=-1",
            "SIZE=1e3",
            "SIZE=+5",
            "SIZE=0x10",
            "SIZE",
        ] {
            assert!(
                refusal(&format!("MAIL FROM:<a@b.example> {bad}")).starts_with("501 5.5.4"),
                "{bad}"
            );
        }
        for bad in [
            "BDAT",
            "BDAT x",
            "BDAT 5 FIRST",
            "BDAT 5 LAST x",
            "BDAT -5",
            "BDAT 5LAST",
        ] {
            assert!(refusal(bad).starts_with("501 5.5.4"), "{bad}");
        }
        // Issue 8: SIZE=0 is a declared size of 0, not "no SIZE".
        assert!(
            matches!(p("MAIL FROM:<a@b.example> SIZE=0"), Command::Mail(m) if m.size == Some(0))
        );
        assert!(matches!(p("MAIL FROM:<a@b.example>"), Command::Mail(m) if m.size.is_none()));
    }

    #[test]
    fn only_advertised_parameters_are_accepted() {
        assert!(matches!(
            p("MAIL FROM:<a@b.example> AUTH=<>"),
            Command::Mail(_)
        ));
        assert!(
            matches!(p("MAIL FROM:<a@b.example> auth=scanner@b.example body=8bitmime"), Command::Mail(m) if m.body == Body::EightBitMime)
        );
        assert_eq!(
            refusal("MAIL FROM:<a@b.example> RET=HDRS"),
            "555 5.5.4 Unsupported option: RET"
        );
        assert_eq!(
            refusal("MAIL FROM:<a@b.example> ENVID=x"),
            "555 5.5.4 Unsupported option: ENVID"
        );
        assert_eq!(
            refusal("RCPT TO:<a@b.example> NOTIFY=NEVER"),
            "555 5.5.4 Unsupported option: NOTIFY"
        );
        assert!(refusal("MAIL FROM:<a@b.example> SMTPUTF8=yes").starts_with("501 5.5.4"));
        assert!(refusal("MAIL FROM:<a@b.example> BODY=QUOTED").starts_with("501 5.5.4"));
        assert!(
            refusal("MAIL FROM:<a@b.example>SIZE=5").starts_with("501 5.5.4"),
            "no space after >"
        );
        assert!(refusal("MAIL FROM:<a@b.example> =5").starts_with("501 5.5.4"));
        assert!(refusal("MAIL FROM:<a@b.example> SI\rZE=5").starts_with("501 5.5.4"));
    }

    #[test]
    fn auth() {
        match p("AUTH PLAIN AGEAYg==\r\n") {
            Command::Auth {
                mechanism: Mechanism::Plain,
                initial: Some(i),
            } => {
                assert_eq!(i.as_str(), "AGEAYg==")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p("AUTH LOGIN\r\n"),
            Command::Auth {
                mechanism: Mechanism::Login,
                initial: None
            }
        ));
        assert!(
            matches!(p("AUTH PLAIN =\r\n"), Command::Auth { mechanism: Mechanism::Plain, initial: Some(i) } if i.is_empty())
        );
        assert!(matches!(
            p("AUTH CRAM-MD5\r\n"),
            Command::Auth {
                mechanism: Mechanism::Other,
                ..
            }
        ));
        assert!(matches!(p("AUTH\r\n"), Command::Invalid(_)));
        let dbg = format!("{:?}", p("AUTH PLAIN c2VjcmV0\r\n"));
        assert!(!dbg.contains("c2VjcmV0"), "{dbg}");
    }

    #[test]
    fn http_is_not_smtp() {
        assert_eq!(p("GET / HTTP/1.1\r\n"), Command::NonSmtp);
        assert_eq!(p("POST /x HTTP/1.0\r\n"), Command::NonSmtp);
        assert_eq!(p("CONNECT a:443 HTTP/1.1\r\n"), Command::NonSmtp);
        assert_eq!(p("Host: example\r\n"), Command::NonSmtp);
        assert_eq!(p("User-Agent: x\r\n"), Command::NonSmtp);
    }

    fn address() -> impl Strategy<Value = String> {
        (
            "[a-zA-Z0-9][a-zA-Z0-9._+-]{0,20}",
            "[a-z0-9]{1,10}(\\.[a-z]{2,5}){1,2}",
        )
            .prop_filter_map("dots", |(l, d)| {
                if l.contains("..") || l.ends_with('.') {
                    None
                } else {
                    Some(format!("{l}@{d}"))
                }
            })
    }

    proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&line);
        }

        #[test]
        fn never_panics_on_command_like_input(
            verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "EHLO ", "AUTH ", "BDAT ", "DATA", "HELO "]),
            rest in "[ -~\\t\\r\\x80-\\xff]{0,300}",
        ) {
            let _ = parse(format!("{verb}{rest}\r\n").as_bytes());
        }

        #[test]
        fn mail_roundtrip(addr in address(), size in proptest::option::of(0u64..1_000_000_000),
                          body in prop::sample::select(vec![Body::Unspecified, Body::SevenBit, Body::EightBitMime]),
                          utf8 in any::<bool>()) {
            let mut line = format!("MAIL FROM:<{addr}>");
            if let Some(s) = size { line.push_str(&format!(" SIZE={s}")); }
            match body {
                Body::SevenBit => line.push_str(" BODY=7BIT"),
                Body::EightBitMime => line.push_str(" BODY=8BITMIME"),
                Body::Unspecified => {}
            }
            if utf8 { line.push_str(" SMTPUTF8"); }
            line.push_str("\r\n");
            prop_assert_eq!(parse(line.as_bytes()), Command::Mail(MailFrom { sender: from(&addr), size, body, smtputf8: utf8 }));
        }

        #[test]
        fn rcpt_and_bdat_roundtrip(addr in address(), n in 0u64..u32::MAX as u64, last in any::<bool>()) {
            prop_assert_eq!(parse(format!("RCPT TO:<{addr}>\r\n").as_bytes()), to(&addr));
            let l = if last { " LAST" } else { "" };
            prop_assert_eq!(parse(format!("BDAT {n}{l}\r\n").as_bytes()), Command::Bdat { size: n, last });
        }
    }
}
