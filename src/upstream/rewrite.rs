//! `rewrite_from = true`: a device's mail goes out as the route's mailbox.
//!
//! Scanners and printers put addresses Exchange will never let a mailbox send as in
//! `MAIL FROM` and `From:` (`scanner@localhost`, a serial number): Exchange answers
//! `554 5.2.252 SendAsDenied` after DATA (microsoft-reference.md §3.5, §9 #10). With
//! `rewrite_from` the envelope sender and the `From:` header become the route's mailbox at
//! delivery time; the device's `From:` (with its display name) moves to `Reply-To:` unless
//! the message has one, and `Sender:` fields are dropped (Exchange would judge them as "send
//! on behalf"). The display name stays on the new `From:`, so "Scanner 3rd floor" still shows.
//!
//! The queue file is never changed: [`Rewritten::plan`] reads only the header section and
//! builds the new one in memory; the reader adapters ([`Rewritten::reader`],
//! [`Rewritten::stream`]) yield that header and then the rest of the queue file as it is, so
//! a transport streams the rewritten message without loading it whole. The transports see
//! this through [`super::Outgoing`] (`sender()`, `size()`, `open_message()`, `stream()`); the
//! [`RewriteFrom`] transport wrapper, put around a route's transport when the route asks for
//! it, prepares the plan for each attempt and logs what it changed once per message.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BoxFuture, Outcome, Outgoing, Transport};
use crate::maillog;

/// Longest header section postern rewrites. Device mail has a few hundred bytes of header;
/// a longer one is refused rather than held in memory.
pub const MAX_HEADER: u64 = 256 * 1024;

/// Why a message could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// The queue file could not be read.
    #[error("cannot read queue file {path}: {source}")]
    Read {
        /// The queue file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The header section does not end within [`MAX_HEADER`] bytes.
    #[error(
        "the message's header section is longer than {MAX_HEADER} bytes, so postern does not rewrite its From: (rewrite_from)"
    )]
    HeaderTooLong,
}

/// A message as it goes out with `rewrite_from`: the new header section, and where in the
/// queue file the rest (the empty line and the body) starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The mailbox the message is sent as (envelope sender and `From:`).
    pub mailbox: String,
    /// The device's `From:` address, if it had one (lowercased).
    pub original_from: Option<String>,
    /// The `From:` field was changed (false when it already was the mailbox).
    pub from_changed: bool,
    /// A `Reply-To:` with the device's address was added.
    pub reply_to_added: bool,
    head: Vec<u8>,
    body_offset: u64,
    original_size: u64,
}

impl Rewritten {
    /// Read the header section of the message in `path` (its first `size` bytes are the
    /// message) and prepare it to go out as `mailbox`; `sender` is the envelope sender, which
    /// becomes the `Reply-To:` when the message has no `From:`.
    pub fn plan(
        path: &Path,
        size: u64,
        sender: &str,
        mailbox: &str,
    ) -> Result<Rewritten, RewriteError> {
        let read_err = |source| RewriteError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut head = Vec::new();
        crate::spool::msgfile::open_message(path, size)
            .map_err(read_err)?
            .take(MAX_HEADER + 4)
            .read_to_end(&mut head)
            .map_err(read_err)?;
        let end = match head.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => i + 2,
            None if head.len() as u64 == size => size as usize,
            None => return Err(RewriteError::HeaderTooLong),
        };
        if end as u64 > MAX_HEADER {
            return Err(RewriteError::HeaderTooLong);
        }
        head.truncate(end);
        Ok(Self::from_head(&head, size, sender, mailbox))
    }

    /// The plan for a message whose header section (each field ending in CRLF, without the
    /// empty line) is `head`, `size` bytes in all.
    pub fn from_head(head: &[u8], size: u64, sender: &str, mailbox: &str) -> Rewritten {
        let fields = split_fields(head);
        let is = |f: &[u8], name: &str| field_name(f).eq_ignore_ascii_case(name.as_bytes());
        let first_from = fields.iter().position(|f| is(f, "from"));
        let has_reply_to = fields.iter().any(|f| is(f, "reply-to"));
        let original_from = first_from.and_then(|i| {
            let mut probe = fields[i].to_vec();
            probe.extend_from_slice(b"\r\n");
            super::from_address(&probe)
        });
        let from_count = fields.iter().filter(|f| is(f, "from")).count();
        let has_sender = fields.iter().any(|f| is(f, "sender"));
        let already = from_count == 1
            && !has_sender
            && original_from
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case(mailbox));
        if already {
            return Rewritten {
                mailbox: mailbox.to_string(),
                original_from,
                from_changed: false,
                reply_to_added: false,
                head: head.to_vec(),
                body_offset: head.len() as u64,
                original_size: size,
            };
        }
        let name = first_from.and_then(|i| display_name(field_value(fields[i])));
        let new_from = match name {
            Some(n) if n.len() + mailbox.len() < 900 => format!("From: {n} <{mailbox}>\r\n"),
            _ => format!("From: {mailbox}\r\n"),
        };
        // The device's own address, as it wrote it (display name, folding, encoding).
        let reply_to: Option<Vec<u8>> = if has_reply_to {
            None
        } else if let Some(i) = first_from.filter(|_| original_from.is_some()) {
            let f = fields[i];
            let colon = f.iter().position(|&b| b == b':').unwrap_or(0);
            let mut v = b"Reply-To".to_vec();
            v.extend_from_slice(&f[colon..]);
            Some(v)
        } else if !sender.is_empty() && !sender.eq_ignore_ascii_case(mailbox) {
            Some(format!("Reply-To: <{sender}>\r\n").into_bytes())
        } else {
            None
        };
        let mut out = Vec::with_capacity(head.len() + 128);
        let mut placed = false;
        for (i, f) in fields.iter().enumerate() {
            if Some(i) == first_from {
                out.extend_from_slice(new_from.as_bytes());
                if let Some(r) = &reply_to {
                    out.extend_from_slice(r);
                }
                placed = true;
            } else if is(f, "from") || is(f, "sender") {
                // A second From: (invalid anyway) or a Sender: would make Exchange judge the
                // message as sent on someone's behalf.
            } else {
                out.extend_from_slice(f);
            }
        }
        if !placed {
            out.extend_from_slice(new_from.as_bytes());
            if let Some(r) = &reply_to {
                out.extend_from_slice(r);
            }
        }
        Rewritten {
            mailbox: mailbox.to_string(),
            original_from,
            from_changed: true,
            reply_to_added: reply_to.is_some(),
            head: out,
            body_offset: head.len() as u64,
            original_size: size,
        }
    }

    /// Size of the rewritten message in bytes.
    pub fn size(&self) -> u64 {
        self.head.len() as u64 + self.original_size.saturating_sub(self.body_offset)
    }

    /// The rewritten header section (without the empty line that ends it).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// `original`, an in-memory copy of the stored message that starts with its whole header
    /// section (such as a skeleton without some of its parts), with the rewritten header.
    pub fn apply_to(&self, original: &[u8]) -> io::Result<Vec<u8>> {
        let rest = usize::try_from(self.body_offset)
            .ok()
            .and_then(|at| original.get(at..))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the message is shorter than its header section",
                )
            })?;
        let mut out = Vec::with_capacity(self.head.len() + rest.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(rest);
        Ok(out)
    }

    /// The rewritten message, read from `file` (the queue file, opened without following
    /// symlinks: see [`crate::spool::msgfile::open_message`]).
    pub fn reader(&self, mut file: std::fs::File) -> io::Result<MessageReader> {
        file.seek(SeekFrom::Start(self.body_offset))?;
        Ok(io::Cursor::new(self.head.clone()).chain(file.take(self.rest())))
    }

    /// The rewritten message as parts: the new header, then `file` (the queue file)
    /// positioned where the rest starts, and the length of the rest.
    pub fn parts(&self, mut file: std::fs::File) -> io::Result<(Vec<u8>, std::fs::File, u64)> {
        file.seek(SeekFrom::Start(self.body_offset))?;
        Ok((self.head.clone(), file, self.rest()))
    }

    /// The rewritten message, read asynchronously from `file` (the queue file).
    pub async fn stream(&self, mut file: tokio::fs::File) -> io::Result<MessageStream> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt as _};
        file.seek(SeekFrom::Start(self.body_offset)).await?;
        Ok(AsyncReadExt::chain(
            io::Cursor::new(self.head.clone()),
            file.take(self.rest()),
        ))
    }

    fn rest(&self) -> u64 {
        self.original_size.saturating_sub(self.body_offset)
    }
}

/// A message as a transport reads it: a header prefix (empty unless rewritten), then the
/// queue file's bytes.
pub type MessageReader = io::Chain<io::Cursor<Vec<u8>>, io::Take<std::fs::File>>;

/// [`MessageReader`] for async transports.
pub type MessageStream = tokio::io::Chain<io::Cursor<Vec<u8>>, tokio::io::Take<tokio::fs::File>>;

/// The fields of a header section, each with its continuation lines and final CRLF.
fn split_fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let line_end = head[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |p| i + p + 1);
        let continues = matches!(head.get(line_end), Some(b' ' | b'\t'));
        if !continues {
            fields.push(&head[start..line_end]);
            start = line_end;
        }
        i = line_end;
    }
    if start < head.len() {
        fields.push(&head[start..]);
    }
    fields
}

/// A field's name (before the colon), without trailing white space.
fn field_name(field: &[u8]) -> &[u8] {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    field[..colon].trim_ascii_end()
}

/// A field's value, unfolded, without the final CRLF.
fn field_value(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
    let v = String::from_utf8_lossy(&field[colon..]);
    v.replace("\r\n", "").replace('\n', "").trim().to_string()
}

/// The display name of a `From:` value, ready to write before `<mailbox>`: `"Scanner 3"
/// <a@b>` and `Scanner 3 <a@b>` give the name as written (quoted when it needs quotes);
/// the old form `a@b (Scanner 3)` gives the comment. `None` when there is none.
fn display_name(value: String) -> Option<String> {
    let mut in_quotes = false;
    let mut depth = 0u32;
    let mut angle = None;
    let mut comment = String::new();
    for (i, ch) in value.char_indices() {
        match ch {
            '"' if depth == 0 => in_quotes = !in_quotes,
            '(' if !in_quotes => depth += 1,
            ')' if !in_quotes && depth > 0 => depth -= 1,
            '<' if !in_quotes && depth == 0 => {
                angle = Some(i);
                break;
            }
            _ if depth > 0 => comment.push(ch),
            _ => {}
        }
    }
    let phrase = match angle {
        Some(i) => crate::address::strip_comments(&value[..i]),
        None => comment,
    };
    let phrase = phrase.trim();
    if phrase.is_empty() || phrase == "\"\"" {
        return None;
    }
    let quoted = phrase.len() >= 2 && phrase.starts_with('"') && phrase.ends_with('"');
    // Atoms and encoded words may stand as they are; anything with specials is quoted.
    let plain = phrase.chars().all(|c| {
        !matches!(
            c,
            '(' | ')' | '<' | '>' | '[' | ']' | ':' | ';' | '@' | '\\' | ',' | '.' | '"'
        ) && !c.is_control()
    });
    Some(if quoted || plain {
        phrase.to_string()
    } else {
        let inner = phrase
            .trim_matches('"')
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        format!("\"{inner}\"")
    })
}

/// The transport of a route with `rewrite_from = true`: each message goes to `inner` as its
/// mailbox ([`Rewritten`]); the first time a message goes out rewritten, one log line says
/// what changed.
pub struct RewriteFrom {
    inner: Arc<dyn Transport>,
}

impl RewriteFrom {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        RewriteFrom { inner }
    }
}

impl Transport for RewriteFrom {
    fn describe(&self) -> String {
        format!("{} (rewrite_from)", self.inner.describe())
    }

    // The wrapped transport's own bookkeeping (Graph's draft id) must survive the wrapper,
    // or a lost answer would be sent again.
    fn records_progress(&self) -> bool {
        self.inner.records_progress()
    }

    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let env = &msg.envelope;
            let (path, size, sender, mailbox) = (
                msg.message.clone(),
                env.size,
                env.sender.clone(),
                env.mailbox.clone(),
            );
            // Reading the header is file I/O: off the runtime's threads.
            let plan = tokio::task::spawn_blocking(move || {
                Rewritten::plan(&path, size, &sender, &mailbox)
            })
            .await;
            let plan = match plan {
                Ok(Ok(p)) => p,
                Ok(Err(e @ RewriteError::HeaderTooLong)) => {
                    return Outcome::Permanent {
                        reason: e.to_string(),
                    };
                }
                Ok(Err(e)) => {
                    return Outcome::Transient {
                        reason: e.to_string(),
                    };
                }
                Err(e) => {
                    return Outcome::Transient {
                        reason: format!("rewrite task failed: {e}"),
                    };
                }
            };
            let rewritten = Outgoing {
                envelope: env.clone(),
                message: msg.message.clone(),
                rewrite: Some(Arc::new(plan)),
            };
            let outcome = self.inner.send(&rewritten).await;
            if matches!(outcome, Outcome::Sent { .. })
                && let Some(plan) = &rewritten.rewrite
            {
                maillog::rewritten(
                    &env.id,
                    &env.mailbox,
                    &env.sender,
                    plan.original_from.as_deref(),
                    plan.from_changed,
                    plan.reply_to_added,
                );
            }
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(head: &str, sender: &str) -> (String, Rewritten) {
        let r = Rewritten::from_head(
            head.as_bytes(),
            head.len() as u64 + 6,
            sender,
            "scanner@contoso.com",
        );
        (String::from_utf8(r.head().to_vec()).unwrap(), r)
    }

    #[test]
    fn from_becomes_the_mailbox_and_the_device_goes_to_reply_to() {
        let (h, r) = rewrite(
            "Received: from printer\r\nFrom: \"Scanner 3rd floor\" <scanner@localhost>\r\nSubject: Scan\r\n",
            "scanner@localhost",
        );
        assert_eq!(
            h,
            "Received: from printer\r\nFrom: \"Scanner 3rd floor\" <scanner@contoso.com>\r\nReply-To: \"Scanner 3rd floor\" <scanner@localhost>\r\nSubject: Scan\r\n"
        );
        assert!(r.from_changed && r.reply_to_added);
        assert_eq!(r.original_from.as_deref(), Some("scanner@localhost"));
        assert_eq!(r.size(), h.len() as u64 + 6);
    }

    #[test]
    fn display_names_in_every_form() {
        let name = |v: &str| display_name(v.to_string());
        assert_eq!(name("Scanner 3 <a@b>").as_deref(), Some("Scanner 3"));
        assert_eq!(
            name("\"Smith, Bob\" <a@b>").as_deref(),
            Some("\"Smith, Bob\"")
        );
        assert_eq!(name("Smith, Bob <a@b>").as_deref(), Some("\"Smith, Bob\""));
        assert_eq!(name("a@b (Printer 3)").as_deref(), Some("Printer 3"));
        assert_eq!(
            name("=?utf-8?q?J=C3=B6rg?= <a@b>").as_deref(),
            Some("=?utf-8?q?J=C3=B6rg?=")
        );
        assert_eq!(name("<a@b>"), None);
        assert_eq!(name("a@b"), None);
        assert_eq!(name("\"\" <a@b>"), None);
        assert_eq!(name("(the boss) <a@b>"), None);
    }

    #[test]
    fn an_existing_reply_to_stays_and_sender_goes() {
        let (h, r) = rewrite(
            "From: printer-SN1234\r\nReply-To: admin@contoso.com\r\nSender: x@y\r\nTo: a@b\r\n",
            "SN1234@printer",
        );
        assert_eq!(
            h,
            "From: scanner@contoso.com\r\nReply-To: admin@contoso.com\r\nTo: a@b\r\n"
        );
        assert!(!r.reply_to_added);
    }

    #[test]
    fn no_from_gets_one_and_the_sender_as_reply_to() {
        let (h, r) = rewrite("Subject: x\r\n", "scanner@localhost");
        assert_eq!(
            h,
            "Subject: x\r\nFrom: scanner@contoso.com\r\nReply-To: <scanner@localhost>\r\n"
        );
        assert_eq!(r.original_from, None);
        let (h, _) = rewrite("Subject: x\r\n", "");
        assert_eq!(h, "Subject: x\r\nFrom: scanner@contoso.com\r\n");
    }

    #[test]
    fn already_the_mailbox_is_left_alone() {
        let head = "From: Scanner <Scanner@Contoso.com>\r\nSubject: x\r\n";
        let (h, r) = rewrite(head, "x@localhost");
        assert_eq!(h, head);
        assert!(!r.from_changed && !r.reply_to_added);
    }

    #[test]
    fn folded_from_is_moved_whole_and_a_second_from_dropped() {
        let (h, _) = rewrite(
            "From:\r\n \"Long Name\"\r\n <dev@localhost>\r\nFrom: other@x\r\nX: y\r\n",
            "",
        );
        assert_eq!(
            h,
            "From: \"Long Name\" <scanner@contoso.com>\r\nReply-To:\r\n \"Long Name\"\r\n <dev@localhost>\r\nX: y\r\n"
        );
    }

    #[test]
    fn the_reader_streams_header_then_body_and_the_file_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let msg = b"Received: x\r\nFrom: Dev <dev@localhost>\r\n\r\nbody line\r\n.dot\r\n";
        let mut file = msg.to_vec();
        file.extend_from_slice(b"TRAILER-ENVELOPE");
        std::fs::write(&path, &file).unwrap();
        let plan =
            Rewritten::plan(&path, msg.len() as u64, "dev@localhost", "m@contoso.com").unwrap();
        let mut out = Vec::new();
        plan.reader(std::fs::File::open(&path).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "Received: x\r\nFrom: Dev <m@contoso.com>\r\nReply-To: Dev <dev@localhost>\r\n\r\nbody line\r\n.dot\r\n"
        );
        assert_eq!(plan.size(), out.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), file);
        // The same as parts, for transports that build their own reader.
        let o = crate::upstream::Outgoing {
            envelope: crate::spool::Envelope {
                size: msg.len() as u64,
                ..serde_json::from_str(ENVELOPE).unwrap()
            },
            message: path.clone(),
            rewrite: Some(Arc::new(plan.clone())),
        };
        let (head, mut rest, n) = o.open_parts().unwrap();
        let mut joined = head;
        (&mut rest).take(n).read_to_end(&mut joined).unwrap();
        assert_eq!(joined, out);
        let mut via_reader = Vec::new();
        o.open_message()
            .unwrap()
            .read_to_end(&mut via_reader)
            .unwrap();
        assert_eq!(via_reader, out);
        assert_eq!(o.size(), out.len() as u64);
        assert_eq!(o.sender(), "m@contoso.com");
        // A message that is all header.
        let head_only = b"Received: x\r\nFrom: dev@localhost\r\n";
        std::fs::write(&path, head_only).unwrap();
        let plan = Rewritten::plan(&path, head_only.len() as u64, "", "m@contoso.com").unwrap();
        let mut out = Vec::new();
        plan.reader(std::fs::File::open(&path).unwrap())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(
            out,
            b"Received: x\r\nFrom: m@contoso.com\r\nReply-To: dev@localhost\r\n"
        );
    }

    /// A minimal envelope (the fields `Outgoing` needs).
    const ENVELOPE: &str = r#"{"version":1,"id":"0123456789ABCDEF","received_at":1,"sender":"dev@localhost","recipients":[],"client_addr":"x","client_helo":"x","auth_user":null,"listener":"l","route":"r","mailbox":"m@contoso.com","size":0,"body_8bit":false,"smtputf8":false,"attempts":0,"next_attempt":null,"last_error":null,"hold_reason":null,"auto_hold":false}"#;

    #[test]
    fn an_endless_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q");
        let mut msg = Vec::new();
        while (msg.len() as u64) < MAX_HEADER + 100 {
            msg.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        msg.extend_from_slice(b"\r\nbody\r\n");
        std::fs::write(&path, &msg).unwrap();
        assert!(matches!(
            Rewritten::plan(&path, msg.len() as u64, "", "m@x"),
            Err(RewriteError::HeaderTooLong)
        ));
    }
}
