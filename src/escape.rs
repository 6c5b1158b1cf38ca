//! Text that postern did not write (a client's HELO name and addresses, an upstream's reply),
//! made safe to print: every control character (C0, DEL, C1 such as the CSI `U+009B`) and
//! every bidirectional-text control becomes a visible escape, so nothing a client sends can
//! move the cursor, recolour or retitle the admin's terminal, or reorder what they read.
//!
//! [`needs_escape`] is the one rule; [`untrusted`] applies it to text (`\u{1b}`), the JSON
//! writers apply it in JSON's own notation (`\u001b`, still the same string to a parser), and
//! [`LogWriter`] applies it to every log line as it is written.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;

/// Bidirectional formatting characters (Unicode's "Trojan Source" set): embeddings and
/// overrides, isolates, and the implicit marks.
const BIDI: &[char] = &[
    '\u{061C}', // ARABIC LETTER MARK
    '\u{200E}', // LEFT-TO-RIGHT MARK
    '\u{200F}', // RIGHT-TO-LEFT MARK
    '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', // LRE RLE PDF LRO RLO
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', // LRI RLI FSI PDI
];

/// A control character: C0 (`U+0000`–`U+001F`), DEL, or C1 (`U+0080`–`U+009F`).
pub fn is_control(c: char) -> bool {
    c.is_control()
}

/// Must `c` be escaped before postern prints it? Controls, bidi controls, and the Unicode
/// line and paragraph separators (which some terminals and log viewers treat as newlines).
pub fn needs_escape(c: char) -> bool {
    is_control(c) || BIDI.contains(&c) || c == '\u{2028}' || c == '\u{2029}'
}

/// `s` with every character [`needs_escape`] marks written as `\u{XX}` (Rust's notation);
/// borrowed when there is nothing to escape.
pub fn untrusted(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `c` in JSON's notation: `\uXXXX` (every character [`needs_escape`] marks is in the BMP).
fn json_escape(c: char, out: &mut String) {
    let _ = write!(out, "\\u{:04x}", c as u32);
}

/// A serde_json formatter that writes every character [`needs_escape`] marks as a `\uXXXX`
/// escape (serde_json escapes only C0 by itself): the JSON means the same, and printing it
/// raw to a terminal is safe.
#[derive(Debug, Default)]
pub struct JsonFormatter {
    inner: serde_json::ser::PrettyFormatter<'static>,
}

impl serde_json::ser::Formatter for JsonFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !fragment.chars().any(needs_escape) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut out = String::with_capacity(fragment.len() + 12);
        for c in fragment.chars() {
            if needs_escape(c) {
                json_escape(c, &mut out);
            } else {
                out.push(c);
            }
        }
        writer.write_all(out.as_bytes())
    }

    // Pretty printing: delegate the layout to serde_json's own formatter.
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_object_value(w)
    }
}

/// `value` as pretty JSON in which every character [`needs_escape`] marks is escaped.
pub fn to_json_pretty<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, JsonFormatter::default());
    value.serialize(&mut ser)?;
    // The serializer writes only UTF-8 (our escapes are ASCII).
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// How the log lines a [`LogWriter`] passes on are formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing's text lines; `ansi` when they carry its own colour codes (ESC is then kept).
    Human {
        /// The formatter writes ANSI colour sequences.
        ansi: bool,
    },
    /// One JSON object per line.
    Json,
}

/// Wraps the log's output (stderr) and escapes, in every line written, what [`needs_escape`]
/// marks: the last line of defence, whatever a log statement put into its message or fields.
/// Line breaks stay (they end each line; our own multi-line messages keep their shape) and,
/// with ANSI colours on, so does ESC; tracing's text format already escapes control
/// characters inside field values itself.
#[derive(Debug, Clone, Copy)]
pub struct LogWriter {
    format: LogFormat,
}

impl LogWriter {
    /// A writer for lines of `format`.
    pub fn new(format: LogFormat) -> Self {
        LogWriter { format }
    }

    /// `line` as it may be written.
    pub fn clean<'a>(&self, line: &'a str) -> Cow<'a, str> {
        let keep = |c: char| {
            c == '\n' || (c == '\u{1b}' && self.format == LogFormat::Human { ansi: true })
        };
        if !line.chars().any(|c| needs_escape(c) && !keep(c)) {
            return Cow::Borrowed(line);
        }
        let mut out = String::with_capacity(line.len() + 16);
        for c in line.chars() {
            if !needs_escape(c) || keep(c) {
                out.push(c);
            } else if self.format == LogFormat::Json {
                // Raw, these can only be inside a JSON string (serde_json escapes C0 itself),
                // where the escape means the same character.
                json_escape(c, &mut out);
            } else {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
        Cow::Owned(out)
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = EscapingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingStderr { writer: *self }
    }
}

/// One log event's writer: escapes, then writes to stderr in one call.
#[derive(Debug)]
pub struct EscapingStderr {
    writer: LogWriter,
}

impl io::Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tracing writes each event as one buffer of UTF-8.
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(self.writer.clean(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NASTY: &str =
        "a\u{1b}]0;owned\u{7}\u{9b}31m\u{202e}gpj.exe\u{2066}\u{7f}\u{200f}\u{61c}\u{2028}\rz";

    #[test]
    fn untrusted_escapes_controls_and_bidi_and_nothing_else() {
        let out = untrusted(NASTY);
        assert_eq!(
            out,
            "a\\u{1b}]0;owned\\u{7}\\u{9b}31m\\u{202e}gpj.exe\\u{2066}\\u{7f}\\u{200f}\\u{61c}\\u{2028}\\u{d}z"
        );
        assert!(!out.chars().any(needs_escape));
        for plain in [
            "j\u{f6}rg@b\u{fc}cher.example",
            "\"a b\"@example.com",
            "\u{4f8b}@\u{4f8b}.\u{4e2d}\u{56fd}",
        ] {
            assert!(matches!(untrusted(plain), Cow::Borrowed(_)), "{plain}");
        }
    }

    #[test]
    fn every_c0_c1_and_del_needs_escaping() {
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            assert!(needs_escape(c), "{c:?}");
        }
        for c in [
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2067}', '\u{2068}', '\u{2069}',
            '\u{200e}',
        ] {
            assert!(needs_escape(c), "{c:?}");
        }
        assert!(!needs_escape(' ') && !needs_escape('\u{a0}') && !needs_escape('\u{e9}'));
    }

    #[test]
    fn json_escapes_mean_the_same_string() {
        let value = serde_json::json!({ "helo": NASTY, "list": [NASTY] });
        let text = to_json_pretty(&value).unwrap();
        assert!(
            !text.chars().any(|c| needs_escape(c) && c != '\n'),
            "{text}"
        );
        assert!(
            text.contains("\\u009b") && text.contains("\\u202e"),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        assert!(
            text.starts_with("{\n  \""),
            "pretty, like serde_json's own: {text}"
        );
    }

    #[test]
    fn log_lines_keep_their_newline_and_json_stays_json() {
        let json_line = format!("{}\n", serde_json::json!({ "from": NASTY }));
        let clean = LogWriter::new(LogFormat::Json)
            .clean(&json_line)
            .into_owned();
        assert!(clean.ends_with("}\n"));
        assert!(!clean.trim_end().chars().any(needs_escape), "{clean}");
        let back: serde_json::Value = serde_json::from_str(clean.trim_end()).unwrap();
        assert_eq!(back["from"], NASTY);

        let human = "WARN rejected from=x\u{1b}[2J \u{9b}y\u{202e}\n";
        let plain = LogWriter::new(LogFormat::Human { ansi: false })
            .clean(human)
            .into_owned();
        assert_eq!(plain, "WARN rejected from=x\\u{1b}[2J \\u{9b}y\\u{202e}\n");
        let coloured = LogWriter::new(LogFormat::Human { ansi: true })
            .clean(human)
            .into_owned();
        assert_eq!(
            coloured,
            "WARN rejected from=x\u{1b}[2J \\u{9b}y\\u{202e}\n"
        );
    }
}
