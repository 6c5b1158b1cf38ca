//! A message's MIME structure found in one streaming pass over the queue file, and the plan
//! that splits it into a *skeleton* (the message without its large parts, small enough for
//! one Graph request) and the parts to upload as attachments.
//!
//! mail-parser parses only messages held whole in memory, and a 150 MB message must not be:
//! so this module walks the file line by line (keeping at most the first bytes of each line)
//! to find the MIME boundaries, and hands each part's header section (bounded) to
//! mail-parser, which does the header parsing: folding, RFC 2231 parameters, RFC 2047 names.
//!
//! A part is cut out with its delimiter line: `[start, end)` runs from its `--boundary` line
//! to the start of the next delimiter line, so what remains is still well-formed MIME (the
//! line break before a delimiter belongs to the delimiter, RFC 2046 §5.1.1).

use std::io::{self, BufRead};
use std::ops::Range;

use mail_parser::{MessageParser, MimeHeaders};

use super::decode::Encoding;

/// Most bytes of one part's header section we keep; a longer one is not parsed (the part
/// is then never cut out).
const MAX_HEADER: usize = 64 * 1024;
/// Longest line prefix kept for delimiter matching (a boundary is at most 70 characters).
const LINE_PREFIX: usize = 128;
/// Deepest multipart nesting followed; deeper parts stay inside their parent.
const MAX_DEPTH: usize = 32;

/// One leaf MIME part inside a multipart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// From the start of its delimiter line to the start of the next delimiter line (or the
    /// end of the message): what is cut out of the skeleton.
    pub range: Range<u64>,
    /// Its body as encoded in the file (without the line break before the next delimiter).
    pub body: Range<u64>,
    /// `type/subtype`, lowercased (`application/octet-stream` when absent or unparsable).
    pub content_type: String,
    /// File name from `Content-Disposition: ...; filename=` or `Content-Type: ...; name=`.
    pub name: Option<String>,
    /// `Content-ID` without the angle brackets.
    pub content_id: Option<String>,
    /// `Content-Disposition: inline`.
    pub inline: bool,
    /// `Content-Disposition: attachment`.
    pub attachment: bool,
    /// How the body is encoded.
    pub encoding: Encoding,
    /// Its headers could be parsed (a part with a huge header section cannot be moved).
    pub parsed: bool,
}

impl Part {
    /// Whether the part can travel as a Graph attachment without changing what the recipient
    /// sees: anything but the message's own text (a `text/*` part with no file name that is
    /// not marked as an attachment).
    pub fn is_attachment_like(&self) -> bool {
        if !self.parsed {
            return false;
        }
        let body_text = self.content_type.starts_with("text/")
            && self.name.is_none()
            && !self.attachment
            && self.content_id.is_none();
        !body_text
    }

    /// Length of the cut-out range.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Whether the cut-out range is empty (never, for a part found by [`scan`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name to give the attachment: its own, else one made from its type.
    pub fn file_name(&self, index: usize) -> String {
        if let Some(n) = self.name.as_deref().filter(|n| !n.trim().is_empty()) {
            return n.to_string();
        }
        let ext = match self.content_type.as_str() {
            "message/rfc822" => "eml",
            "application/pdf" => "pdf",
            "image/png" => "png",
            "image/jpeg" => "jpg",
            "image/gif" => "gif",
            "text/plain" => "txt",
            "text/html" => "html",
            _ => "bin",
        };
        format!("part{}.{ext}", index + 1)
    }
}

/// The leaf parts of a message, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Structure {
    /// Leaf parts inside a multipart (the top-level body of a single-part message is not
    /// listed: it cannot be cut out).
    pub parts: Vec<Part>,
    /// Bytes scanned (the message's size).
    pub size: u64,
}

/// Walk the message read from `r` and list its leaf parts.
pub fn scan(r: &mut impl BufRead) -> io::Result<Structure> {
    let mut s = Scanner::default();
    let mut line = Vec::with_capacity(LINE_PREFIX);
    let mut header = Vec::new();
    // (part start, the header section so far, whether it overflowed).
    let mut in_header: Option<(u64, bool)> = Some((0, false));
    let mut prev_eol: u64 = 0;
    loop {
        let keep = if in_header.is_some() {
            MAX_HEADER.saturating_sub(header.len()).max(LINE_PREFIX)
        } else {
            LINE_PREFIX
        };
        let start = s.pos;
        let Some((len, eol)) = next_line(r, keep, &mut line)? else {
            break;
        };
        s.pos += len;
        if let Some((part_start, overflow)) = in_header.as_mut() {
            if line.len() == eol as usize && len == eol {
                // The empty line: the header section is complete.
                let part_start = *part_start;
                let parsed = !*overflow;
                in_header = None;
                s.part_begins(part_start, &header, parsed);
                header.clear();
            } else if header.len() + line.len() <= MAX_HEADER && len == line.len() as u64 {
                header.extend_from_slice(&line);
            } else {
                *overflow = true;
            }
            prev_eol = eol;
            continue;
        }
        if let Some((depth, close)) = s.delimiter(&line) {
            s.leaf_ends(start, prev_eol);
            s.boundaries.truncate(depth + 1);
            if close {
                s.boundaries.pop();
            } else {
                in_header = Some((start, false));
            }
        }
        prev_eol = eol;
    }
    let end = s.pos;
    if let Some((part_start, _)) = in_header {
        // Headers without a body at the very end: a part with an empty body.
        s.part_begins(part_start, &header, false);
    }
    s.leaf_ends(end, 0);
    Ok(Structure {
        parts: s.parts,
        size: end,
    })
}

#[derive(Default)]
struct Scanner {
    pos: u64,
    /// Boundaries of the enclosing multiparts, outermost first.
    boundaries: Vec<Vec<u8>>,
    parts: Vec<Part>,
    /// Index in `parts` of the leaf whose body is being read.
    open: Option<usize>,
    /// The top-level header section has been seen.
    top_seen: bool,
}

impl Scanner {
    /// A header section that started at `start` ended at `self.pos`.
    fn part_begins(&mut self, start: u64, header: &[u8], parsed: bool) {
        let top = !self.top_seen;
        self.top_seen = true;
        let info = if parsed { part_info(header) } else { None };
        if let Some(boundary) = info.as_ref().and_then(|i| i.boundary.clone())
            && self.boundaries.len() < MAX_DEPTH
        {
            self.boundaries.push(boundary);
            return;
        }
        if top {
            // A single-part message: its body is the message, nothing to cut.
            return;
        }
        let info = info.unwrap_or_default();
        self.open = Some(self.parts.len());
        self.parts.push(Part {
            range: start..self.pos,
            body: self.pos..self.pos,
            content_type: info.content_type,
            name: info.name,
            content_id: info.content_id,
            inline: info.inline,
            attachment: info.attachment,
            encoding: info.encoding,
            parsed: parsed && info.parsed,
        });
    }

    /// A delimiter line starts at `at`; the line break before it (`eol` bytes) is its own.
    fn leaf_ends(&mut self, at: u64, eol: u64) {
        if let Some(i) = self.open.take() {
            let p = &mut self.parts[i];
            p.range.end = at;
            p.body.end = at.saturating_sub(eol).max(p.body.start);
        }
    }

    /// `Some((depth, is_close))` when `line` is a delimiter of an enclosing multipart.
    fn delimiter(&self, line: &[u8]) -> Option<(usize, bool)> {
        let rest = line.strip_prefix(b"--")?;
        // Innermost first; an outer delimiter also ends the inner multiparts.
        for (depth, b) in self.boundaries.iter().enumerate().rev() {
            if let Some(after) = rest.strip_prefix(b.as_slice()) {
                let (close, after) = match after.strip_prefix(b"--") {
                    Some(a) => (true, a),
                    None => (false, after),
                };
                // Only transport padding (white space) may follow (RFC 2046 §5.1.1).
                if after
                    .iter()
                    .all(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
                {
                    return Some((depth, close));
                }
            }
        }
        None
    }
}

/// What the scanner needs from a part's header section.
#[derive(Default)]
struct Info {
    content_type: String,
    boundary: Option<Vec<u8>>,
    name: Option<String>,
    content_id: Option<String>,
    inline: bool,
    attachment: bool,
    encoding: Encoding,
    parsed: bool,
}

/// Parse one header section (with mail-parser).
fn part_info(header: &[u8]) -> Option<Info> {
    let msg = MessageParser::new().parse_headers(header)?;
    let ct = msg.content_type();
    let content_type = match ct {
        Some(ct) => format!(
            "{}/{}",
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("octet-stream").to_ascii_lowercase()
        ),
        None => "text/plain".to_string(),
    };
    let boundary = ct
        .filter(|ct| ct.ctype().eq_ignore_ascii_case("multipart"))
        .and_then(|ct| ct.attribute("boundary"))
        .filter(|b| !b.is_empty())
        .map(|b| b.as_bytes().to_vec());
    let disposition = msg.content_disposition();
    Some(Info {
        content_type,
        boundary,
        name: msg.attachment_name().map(str::to_string),
        content_id: msg
            .content_id()
            .map(|id| {
                id.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
            .filter(|id| !id.is_empty()),
        inline: disposition.is_some_and(|d| d.is_inline()),
        attachment: disposition.is_some_and(|d| d.is_attachment()),
        encoding: Encoding::from_header(msg.content_transfer_encoding()),
        parsed: true,
    })
}

/// Read one line from `r`: its total length and the length of its line break (2 for CRLF, 1
/// for LF, 0 at the end of input). At most `keep` bytes of it (from its start) go into
/// `out`; the rest is skipped without being held. `None` at the end of input.
fn next_line(
    r: &mut impl BufRead,
    keep: usize,
    out: &mut Vec<u8>,
) -> io::Result<Option<(u64, u64)>> {
    out.clear();
    let mut len: u64 = 0;
    // The byte before the current buffer's data (to see a CR split from its LF).
    let mut before: Option<u8> = None;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((len > 0).then_some((len, 0)));
        }
        let (take, lf) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, Some(i)),
            None => (buf.len(), None),
        };
        let room = keep.saturating_sub(out.len()).min(take);
        out.extend_from_slice(&buf[..room]);
        let cr = match lf {
            Some(0) => before == Some(b'\r'),
            Some(i) => buf[i - 1] == b'\r',
            None => false,
        };
        before = buf[..take].last().copied();
        r.consume(take);
        len += take as u64;
        if lf.is_some() {
            return Ok(Some((len, if cr { 2 } else { 1 })));
        }
    }
}

/// Which parts to cut so that the skeleton is at most `budget` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The parts to upload, in file order.
    pub cut: Vec<Part>,
    /// Size of what remains.
    pub skeleton_size: u64,
}

/// Why a message cannot be split small enough.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "even without its {attachments} attachment(s) the message is {rest} bytes, more than the {budget} bytes one Graph request can carry (its text itself is too large)"
)]
pub struct TooLargeBody {
    /// What would remain.
    pub rest: u64,
    /// The limit.
    pub budget: u64,
    /// How many parts could be moved out.
    pub attachments: usize,
}

/// Cut the largest attachment-like parts until the rest fits in `budget` bytes.
pub fn plan(s: &Structure, budget: u64) -> Result<Plan, TooLargeBody> {
    let mut candidates: Vec<&Part> = s
        .parts
        .iter()
        .filter(|p| p.is_attachment_like() && !p.is_empty())
        .collect();
    candidates.sort_by(|a, b| {
        b.len()
            .cmp(&a.len())
            .then(a.range.start.cmp(&b.range.start))
    });
    let mut rest = s.size;
    let mut cut = Vec::new();
    for p in &candidates {
        if rest <= budget {
            break;
        }
        rest -= p.len();
        cut.push((*p).clone());
    }
    if rest > budget {
        return Err(TooLargeBody {
            rest,
            budget,
            attachments: candidates.len(),
        });
    }
    cut.sort_by_key(|p| p.range.start);
    Ok(Plan {
        cut,
        skeleton_size: rest,
    })
}

impl Plan {
    /// The byte ranges of the message that make up the skeleton, in order.
    pub fn kept(&self, size: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = 0;
        for p in &self.cut {
            if p.range.start > at {
                out.push(at..p.range.start);
            }
            at = p.range.end;
        }
        if size > at {
            out.push(at..size);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: a@x.test\r\n\
To: b@y.test\r\n\
Subject: report\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
\r\n\
preamble\r\n\
--outer\r\n\
Content-Type: multipart/related; boundary=inner\r\n\
\r\n\
--inner\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>hi <img src=\"cid:logo@x\"></p>\r\n\
--inner\r\n\
Content-Type: image/png\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-ID: <logo@x>\r\n\
Content-Disposition: inline\r\n\
\r\n\
iVBORw0KGgo=\r\n\
--inner--\r\n\
--outer\r\n\
Content-Type: application/pdf;\r\n\
 name=\"=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\"\r\n\
Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--outer--\r\n\
epilogue\r\n";

    fn scan_bytes(b: &[u8], cap: usize) -> Structure {
        let mut r = io::BufReader::with_capacity(cap, b);
        scan(&mut r).expect("scan")
    }

    fn at(b: &[u8], r: &Range<u64>) -> String {
        String::from_utf8_lossy(&b[r.start as usize..r.end as usize]).into_owned()
    }

    #[test]
    fn finds_nested_parts_with_their_metadata() {
        let s = scan_bytes(MSG, 8192);
        assert_eq!(s.size, MSG.len() as u64);
        assert_eq!(s.parts.len(), 3, "{:#?}", s.parts);
        let (html, logo, pdf) = (&s.parts[0], &s.parts[1], &s.parts[2]);
        assert_eq!(html.content_type, "text/html");
        assert!(!html.is_attachment_like());
        assert_eq!(at(MSG, &html.body), "<p>hi <img src=\"cid:logo@x\"></p>");
        assert_eq!(logo.content_type, "image/png");
        assert_eq!(logo.content_id.as_deref(), Some("logo@x"));
        assert!(logo.inline && logo.is_attachment_like());
        assert_eq!(logo.encoding, Encoding::Base64);
        assert_eq!(at(MSG, &logo.body), "iVBORw0KGgo=");
        assert!(at(MSG, &logo.range).starts_with("--inner\r\nContent-Type: image/png"));
        assert!(at(MSG, &logo.range).ends_with("iVBORw0KGgo=\r\n"));
        assert_eq!(pdf.name.as_deref(), Some("résumé.pdf"));
        assert!(pdf.attachment);
        assert_eq!(at(MSG, &pdf.body), "JVBERi0xLjQK");
        assert!(at(MSG, &pdf.range).ends_with("JVBERi0xLjQK\r\n"));
    }

    #[test]
    fn same_result_at_every_buffer_size() {
        let want = scan_bytes(MSG, 8192);
        for cap in 1..64 {
            assert_eq!(scan_bytes(MSG, cap), want, "buffer {cap}");
        }
        // Bare LF line ends work the same way.
        let lf: Vec<u8> = String::from_utf8_lossy(MSG)
            .replace("\r\n", "\n")
            .into_bytes();
        let s = scan_bytes(&lf, 7);
        assert_eq!(s.parts.len(), 3);
        assert_eq!(at(&lf, &s.parts[2].body), "JVBERi0xLjQK");
    }

    #[test]
    fn the_skeleton_without_the_cut_parts_is_well_formed_mime() {
        let s = scan_bytes(MSG, 8192);
        let plan = plan(&s, 0).err().map(|e| e.rest);
        // With a budget of 0 everything attachment-like goes and the text stays.
        let text_size = plan.expect("the text cannot go");
        let p = super::plan(&s, text_size).expect("fits");
        assert_eq!(p.cut.len(), 2);
        let skeleton: Vec<u8> = p
            .kept(s.size)
            .iter()
            .flat_map(|r| MSG[r.start as usize..r.end as usize].iter().copied())
            .collect();
        assert_eq!(skeleton.len() as u64, p.skeleton_size);
        let parsed = MessageParser::new().parse(&skeleton).expect("parses");
        assert_eq!(parsed.attachment_count(), 0);
        assert!(
            parsed
                .body_html(0)
                .is_some_and(|h| h.contains("cid:logo@x"))
        );
        let text = String::from_utf8_lossy(&skeleton);
        assert!(
            text.contains("--inner--\r\n--outer--\r\nepilogue"),
            "{text}"
        );
    }

    #[test]
    fn only_as_much_as_needed_is_cut_largest_first() {
        let s = scan_bytes(MSG, 8192);
        let pdf_len = s.parts[2].len();
        let p = plan(&s, s.size - 1).expect("fits");
        // The PDF part is the largest attachment: cutting it alone is enough.
        assert_eq!(p.cut.len(), 1);
        assert_eq!(p.cut[0].content_type, "application/pdf");
        assert_eq!(p.skeleton_size, s.size - pdf_len);
        let none = plan(&s, s.size).expect("fits");
        assert!(none.cut.is_empty());
    }

    #[test]
    fn single_part_and_unterminated_messages() {
        let single = b"Subject: x\r\nContent-Type: application/pdf\r\n\r\nJVBER\r\n";
        let s = scan_bytes(single, 16);
        assert!(s.parts.is_empty());
        assert!(plan(&s, 4).is_err());
        // A multipart whose close delimiter never comes: the last part runs to the end.
        let open = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: image/gif\r\n\r\nR0lG\r\n";
        let s = scan_bytes(open, 16);
        assert_eq!(s.parts.len(), 1);
        assert_eq!(s.parts[0].range.end, open.len() as u64);
        // A line that only starts like a delimiter is body text.
        let fake =
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n--bx\r\nhi\r\n--b--\r\n";
        let s = scan_bytes(fake, 5);
        assert_eq!(s.parts.len(), 1);
        assert_eq!(at(fake, &s.parts[0].body), "--bx\r\nhi");
    }
}
