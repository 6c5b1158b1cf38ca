//! The message on standard input: its header read and amended the way a local submission
//! is (recipients from To:/Cc:/Bcc: with `-t`, Bcc: removed, From:/Date:/Message-ID: added
//! when missing, like Postfix's cleanup), and its body streamed to the server line by line
//! with LF turned into CRLF and dots stuffed, so a message of any size never sits in memory.

use std::io::{self, BufRead, Write};

use crate::upstream::smtp::DotStuffer;

/// Longest header block read into memory.
pub const MAX_HEADER: usize = 1024 * 1024;
/// Body bytes handled per read; longer lines pass through in pieces.
const CHUNK: u64 = 64 * 1024;

/// Reading the message failed.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Standard input could not be read.
    #[error("reading the message from standard input: {0}")]
    Read(#[source] io::Error),
    /// The header is larger than [`MAX_HEADER`].
    #[error("the message header is larger than 1 MiB; is this really a mail message?")]
    HeaderTooLarge,
}

/// One piece of input: a whole line (without its LF or CRLF) or, for a line longer than a
/// chunk, part of one.
struct Piece {
    bytes: Vec<u8>,
    /// The line ended here (a line end was read, or the input ended).
    complete: bool,
}

/// Splits input into lines without ever holding more than a chunk of one line.
pub struct Lines<R> {
    input: R,
    /// A CR that ended a chunk: it belongs to a CRLF if the next chunk starts with LF.
    carry_cr: bool,
    /// A piece read ahead (the first body line found while reading the header).
    pushed_back: Option<Vec<u8>>,
    at_line_start: bool,
}

impl<R: BufRead> Lines<R> {
    /// Lines of `input`.
    pub fn new(input: R) -> Self {
        Lines {
            input,
            carry_cr: false,
            pushed_back: None,
            at_line_start: true,
        }
    }

    fn next(&mut self) -> io::Result<Option<Piece>> {
        if let Some(bytes) = self.pushed_back.take() {
            self.at_line_start = true;
            return Ok(Some(Piece {
                bytes,
                complete: true,
            }));
        }
        let mut buf = Vec::new();
        if self.carry_cr {
            buf.push(b'\r');
            self.carry_cr = false;
        }
        let n = io::Read::take(&mut self.input, CHUNK).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                None
            } else {
                Some(Piece {
                    bytes: buf,
                    complete: true,
                })
            });
        }
        let complete = if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            true
        } else {
            if buf.last() == Some(&b'\r') {
                buf.pop();
                self.carry_cr = true;
            }
            // The end of input also ends the line.
            self.input.fill_buf()?.is_empty() && !self.carry_cr
        };
        Ok(Some(Piece {
            bytes: buf,
            complete,
        }))
    }
}

/// One header field: its lower-case name and its lines as read (a folded field has several).
#[derive(Debug, Clone)]
struct Field {
    name: String,
    lines: Vec<Vec<u8>>,
}

impl Field {
    /// The unfolded value (after the colon), lossily decoded.
    fn value(&self) -> String {
        let mut v = String::new();
        for (i, l) in self.lines.iter().enumerate() {
            let l = String::from_utf8_lossy(l);
            if i == 0 {
                v.push_str(l.split_once(':').map(|(_, r)| r).unwrap_or(""));
            } else {
                v.push(' ');
                v.push_str(l.trim_start());
            }
        }
        v.trim().to_string()
    }
}

/// The header block of the message.
#[derive(Debug, Clone, Default)]
pub struct Header {
    fields: Vec<Field>,
    /// The input ended (EOF, or a "." line without `-i`) before or inside the header.
    pub message_ended: bool,
}

/// The name of a header field line (`Name: value`), if it is one.
fn field_name(line: &[u8]) -> Option<String> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    (!name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic() && b != b':'))
        .then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

impl Header {
    /// Read the header from `lines`: up to the empty line, or up to the first line that is not
    /// a header field (which is then left to the body, as sendmail does). A leading mbox
    /// `From ` line is dropped.
    pub fn read<R: BufRead>(lines: &mut Lines<R>, ignore_dots: bool) -> Result<Self, MessageError> {
        let mut h = Header::default();
        let mut size = 0usize;
        let mut first = true;
        loop {
            let Some(p) = lines.next().map_err(MessageError::Read)? else {
                h.message_ended = true;
                return Ok(h);
            };
            size += p.bytes.len() + 2;
            if size > MAX_HEADER || !p.complete {
                return Err(MessageError::HeaderTooLarge);
            }
            let line = p.bytes;
            if first && line.starts_with(b"From ") {
                first = false;
                continue;
            }
            first = false;
            if line.is_empty() {
                lines.at_line_start = true;
                return Ok(h);
            }
            if !ignore_dots && line == b"." {
                h.message_ended = true;
                return Ok(h);
            }
            let continuation = matches!(line.first(), Some(b' ' | b'\t'));
            match (continuation, h.fields.last_mut()) {
                (true, Some(f)) => f.lines.push(line),
                _ => match field_name(&line) {
                    Some(name) => h.fields.push(Field {
                        name,
                        lines: vec![line],
                    }),
                    None => {
                        // Not a header: the body starts here (with no empty line before it).
                        lines.pushed_back = Some(line);
                        return Ok(h);
                    }
                },
            }
        }
    }

    /// Is there a field called `name` (case-insensitive)?
    pub fn has(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case(name))
    }

    /// Every address in the fields called any of `names`, in order.
    pub fn addresses(&self, names: &[&str]) -> Vec<String> {
        self.fields
            .iter()
            .filter(|f| names.iter().any(|n| f.name.eq_ignore_ascii_case(n)))
            .flat_map(|f| address_list(&f.value()))
            .collect()
    }

    /// Remove every field called `name`.
    pub fn remove(&mut self, name: &str) {
        self.fields.retain(|f| !f.name.eq_ignore_ascii_case(name));
    }

    /// Append a field.
    pub fn push(&mut self, name: &str, value: &str) {
        self.fields.push(Field {
            name: name.to_ascii_lowercase(),
            lines: vec![format!("{name}: {value}").into_bytes()],
        });
    }

    /// The header as sent: every line with CRLF, then the empty line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for l in self.fields.iter().flat_map(|f| &f.lines) {
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// The addresses of an RFC 5322 address list (`"Doe, J" <j@x>, k@y (K), Team: a@b, c@d;`):
/// angle-addr contents where present, otherwise the bare addr-spec; comments, display names
/// and group names dropped.
pub fn address_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut bare = String::new();
    let mut angle: Option<String> = None;
    let mut in_angle = false;
    let mut in_quote = false;
    let mut comment = 0usize;
    let mut escaped = false;
    let mut flush = |bare: &mut String, angle: &mut Option<String>| {
        let a = match angle.take() {
            Some(a) => a,
            None => bare.split_whitespace().collect::<String>(),
        };
        // An obsolete source route ("@a,@b:user@c") is dropped.
        let a = match a.rsplit_once(':') {
            Some((route, addr)) if route.starts_with('@') => addr.to_string(),
            _ => a,
        };
        if !a.is_empty() {
            out.push(a);
        }
        bare.clear();
    };
    // Characters go to the angle-addr being read, or to the bare text.
    macro_rules! target {
        () => {
            if in_angle {
                angle.get_or_insert_with(String::new)
            } else {
                &mut bare
            }
        };
    }
    for c in value.chars() {
        if escaped {
            escaped = false;
            if comment == 0 {
                target!().push(c);
            }
            continue;
        }
        if c == '\\' && (in_quote || comment > 0) {
            escaped = true;
            if comment == 0 {
                target!().push(c);
            }
            continue;
        }
        if in_quote {
            target!().push(c);
            if c == '"' {
                in_quote = false;
            }
            continue;
        }
        if comment > 0 {
            match c {
                '(' => comment += 1,
                ')' => comment -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_quote = true;
                target!().push(c);
            }
            '(' => comment = 1,
            '<' if !in_angle => {
                in_angle = true;
                angle = Some(String::new());
            }
            '>' if in_angle => in_angle = false,
            ',' | ';' if !in_angle => flush(&mut bare, &mut angle),
            // "Group name:" starts a group: what came before was its name.
            ':' if !in_angle && !bare.contains('@') => bare.clear(),
            _ => target!().push(c),
        }
    }
    flush(&mut bare, &mut angle);
    out
}

/// `addr` with `@domain` added when it has no domain (as sendmail qualifies "root").
pub fn qualify(addr: &str, domain: &str) -> String {
    if addr.is_empty() || addr.contains('@') {
        addr.to_string()
    } else {
        format!("{addr}@{domain}")
    }
}

/// An RFC 5322 date for now, in UTC.
pub fn date_now() -> String {
    // httpdate prints "Sun, 06 Nov 1994 08:49:37 GMT"; RFC 5322 wants a numeric zone.
    httpdate::fmt_http_date(std::time::SystemTime::now()).replace(" GMT", " +0000")
}

/// A new Message-ID for `domain`.
pub fn message_id(domain: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "<{}.{:016x}@{domain}>",
        now.as_millis(),
        rand::random::<u64>()
    )
}

/// Stream the rest of the message (the body) from `lines` into `out` as DATA content: CRLF
/// line ends, dots stuffed, and the final `.CRLF`. Without `ignore_dots` a line holding a
/// single "." ends the message. Returns the body's size as read.
pub fn copy_body<R: BufRead, W: Write>(
    lines: &mut Lines<R>,
    header: &[u8],
    ignore_dots: bool,
    out: &mut W,
) -> io::Result<u64> {
    let mut stuffer = DotStuffer::default();
    let mut buf = Vec::with_capacity(CHUNK as usize + 64);
    stuffer.push(header, &mut buf);
    out.write_all(&buf)?;
    let mut size = 0u64;
    while let Some(p) = lines.next()? {
        let start = lines.at_line_start;
        if start && p.complete && !ignore_dots && p.bytes == b"." {
            break;
        }
        buf.clear();
        stuffer.push(&p.bytes, &mut buf);
        if p.complete {
            stuffer.push(b"\r\n", &mut buf);
        }
        lines.at_line_start = p.complete;
        size += p.bytes.len() as u64 + if p.complete { 1 } else { 0 };
        out.write_all(&buf)?;
    }
    buf.clear();
    stuffer.finish(&mut buf);
    out.write_all(&buf)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_as_mail_programs_write_them() {
        assert_eq!(
            address_list(r#""Doe, John" <john@example.com>, jane@example.com (Jane)"#),
            ["john@example.com", "jane@example.com"]
        );
        assert_eq!(
            address_list("Team: a@x.org, b@x.org;, c@y.org"),
            ["a@x.org", "b@x.org", "c@y.org"]
        );
        assert_eq!(address_list("root"), ["root"]);
        assert_eq!(
            address_list("undisclosed-recipients:;"),
            Vec::<String>::new()
        );
        assert_eq!(
            address_list(r#""odd \" name" <"quoted local"@ex.com>"#),
            [r#""quoted local"@ex.com"#]
        );
        assert_eq!(address_list("<@relay.a,@relay.b:u@c.d>"), ["u@c.d"]);
        assert_eq!(
            address_list("a@b (comment, with comma), c@d"),
            ["a@b", "c@d"]
        );
    }

    fn run(input: &str, ignore_dots: bool) -> (Header, String) {
        let mut lines = Lines::new(input.as_bytes());
        let h = Header::read(&mut lines, ignore_dots).unwrap();
        let mut out = Vec::new();
        if !h.message_ended {
            copy_body(&mut lines, &h.to_bytes(), ignore_dots, &mut out).unwrap();
        }
        (h, String::from_utf8(out).unwrap())
    }

    #[test]
    fn lf_becomes_crlf_and_dots_are_stuffed() {
        let (h, data) = run("Subject: x\nTo: a@b,\n c@d\n\n.hidden\nline\n", true);
        assert_eq!(h.addresses(&["to"]), ["a@b", "c@d"]);
        assert_eq!(
            data,
            "Subject: x\r\nTo: a@b,\r\n c@d\r\n\r\n..hidden\r\nline\r\n.\r\n"
        );
    }

    #[test]
    fn a_single_dot_ends_the_message_unless_ignore_dots() {
        let (_, data) = run("Subject: x\n\nbefore\n.\nafter\n", false);
        assert_eq!(data, "Subject: x\r\n\r\nbefore\r\n.\r\n");
        let (_, data) = run("Subject: x\n\nbefore\n.\nafter\n", true);
        assert_eq!(data, "Subject: x\r\n\r\nbefore\r\n..\r\nafter\r\n.\r\n");
        let (_, data) = run("Subject: x\r\n\r\nbefore\r\n.\r\nafter\r\n", false);
        assert_eq!(data, "Subject: x\r\n\r\nbefore\r\n.\r\n");
    }

    #[test]
    fn a_body_without_header_and_a_last_line_without_newline() {
        let (h, data) = run("just text\nno header", true);
        assert!(!h.has("subject"));
        assert_eq!(data, "\r\njust text\r\nno header\r\n.\r\n");
        let (_, data) = run(
            "From someone Mon Jan  1 00:00:00 2024\nSubject: s\n\nb",
            true,
        );
        assert_eq!(data, "Subject: s\r\n\r\nb\r\n.\r\n");
    }

    #[test]
    fn long_lines_stream_in_pieces_and_crlf_split_across_pieces_survives() {
        // A CR at the very end of a 64 KiB piece and its LF in the next.
        let mut body = "x".repeat(CHUNK as usize - 1);
        body.push_str("\r\nnext\r\n");
        let (_, data) = run(&format!("Subject: s\n\n{body}"), true);
        assert!(data.ends_with("\r\nnext\r\n.\r\n"));
        assert!(!data.contains("\r\r"));
        assert_eq!(data.len(), "Subject: s\r\n\r\n".len() + body.len() + 3);
    }

    #[test]
    fn bcc_removed_and_missing_fields_added() {
        let mut lines = Lines::new(&b"To: a@b\nBcc: secret@x\nSubject: s\n\nbody\n"[..]);
        let mut h = Header::read(&mut lines, true).unwrap();
        assert_eq!(h.addresses(&["to", "cc", "bcc"]), ["a@b", "secret@x"]);
        h.remove("bcc");
        assert!(!h.has("From"));
        h.push("From", "Cron <root@host>");
        let text = String::from_utf8(h.to_bytes()).unwrap();
        assert!(!text.contains("secret"));
        assert!(text.ends_with("From: Cron <root@host>\r\n\r\n"));
        assert!(date_now().ends_with(" +0000"));
        assert!(message_id("h.example").ends_with("@h.example>"));
        assert_eq!(qualify("root", "h.example"), "root@h.example");
        assert_eq!(qualify("a@b", "h.example"), "a@b");
    }
}
