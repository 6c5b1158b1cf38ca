//! Messages too large for one Graph request (microsoft-reference.md §4.3).
//!
//! Graph refuses requests over 4 MB, and a base64 MIME `sendMail` of a 3 MB message is
//! already that large. There is no upload session for a whole MIME message, so the message is
//! split: the *skeleton* (the message without its largest attachments, [`split`]) becomes a
//! draft from MIME, each cut-out part is attached to the draft ([`upload`]: one request under
//! 3 MB, an upload session above), and then the draft is sent. Inline parts keep `isInline`
//! and `contentId`, so `cid:` references in the HTML still resolve.
//!
//! The queue file is read in bounded chunks throughout (scan, decode, upload): relaying a
//! 100 MB message costs a few MB of memory, not 100 (bench/e2e.py measures it).
//!
//! Offsets are into the queue file's message bytes as stored. With `rewrite_from` the
//! transport swaps the skeleton's header section for the rewritten one
//! ([`crate::upstream::rewrite::Rewritten::apply_to`]); the cut-out parts lie below it.

pub mod decode;
pub mod split;
pub mod upload;

use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use split::{Plan, Structure, TooLargeBody};

/// Graph's request size limit ("The maximum request length supported is 4MB.", §4.3),
/// counted the safe way (4,000,000 bytes).
pub const REQUEST_LIMIT: u64 = super::MAX_REQUEST;
/// Room left in a draft request for what is not the base64 MIME (HTTP framing, line breaks).
const REQUEST_MARGIN: u64 = 64 * 1024;
/// Largest skeleton: its base64 (4 bytes per 3) plus the margin fits in one request.
pub const SKELETON_BUDGET: u64 = (REQUEST_LIMIT - REQUEST_MARGIN) / 4 * 3;
/// Exchange Online's default message size limit (`MaxSendSize`, §4.3, §5): 35 MB.
pub const DEFAULT_MAX_MESSAGE: u64 = 35 * 1024 * 1024;

/// Whether a message of `size` bytes must take the large path: its base64 would not fit in
/// one request.
pub fn is_large(size: u64) -> bool {
    size.div_ceil(3) * 4 + REQUEST_MARGIN > REQUEST_LIMIT
}

/// A large message ready to go: which parts to cut, and each one's decoded size.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The split.
    pub plan: Plan,
    /// Decoded size of each `plan.cut[i]`.
    pub sizes: Vec<u64>,
    /// The message's size.
    pub size: u64,
}

/// Why a large message cannot go over Graph (each one is permanent).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Bigger than the route allows.
    #[error(
        "the message is {size} bytes, more than this route's limit of {limit} bytes (max_message_size)"
    )]
    OverLimit {
        /// The message's size.
        size: u64,
        /// The route's limit.
        limit: u64,
    },
    /// The text itself is too big.
    #[error("{0}; Graph cannot carry it (send it over SMTP instead: transport = \"smtp\")")]
    Body(#[from] TooLargeBody),
    /// One attachment is over the upload session's maximum.
    #[error(
        "attachment {name:?} is {size} bytes, more than the 150 MB a Graph upload session takes"
    )]
    Attachment {
        /// Its name.
        name: String,
        /// Its decoded size.
        size: u64,
    },
    /// The queue file could not be read.
    #[error("reading the queued message: {0}")]
    Read(#[from] io::Error),
}

impl PrepareError {
    /// Whether the message can never go this way (everything but a read error).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, PrepareError::Read(_))
    }
}

/// Check the size against the route's `limit`, find the parts to cut and their decoded
/// sizes. Blocking (reads the whole file once, plus each cut part once).
pub fn prepare(path: &Path, size: u64, limit: u64) -> Result<Prepared, PrepareError> {
    if size > limit {
        return Err(PrepareError::OverLimit { size, limit });
    }
    let structure = scan_file(path, size)?;
    let plan = split::plan(&structure, SKELETON_BUDGET)?;
    let mut sizes = Vec::with_capacity(plan.cut.len());
    for (i, part) in plan.cut.iter().enumerate() {
        let n = upload::decoded_size(path, part)?;
        if n > upload::MAX_ATTACHMENT {
            return Err(PrepareError::Attachment {
                name: part.file_name(i),
                size: n,
            });
        }
        sizes.push(n);
    }
    Ok(Prepared { plan, sizes, size })
}

/// The MIME structure of the first `size` bytes of `path`.
pub fn scan_file(path: &Path, size: u64) -> io::Result<Structure> {
    // Never through a symlink, like every spool file (spool trust).
    let f = crate::spool::msgfile::open_message(path, size)?;
    let mut r = BufReader::with_capacity(64 * 1024, f);
    split::scan(&mut r)
}

/// The skeleton's bytes (at most [`SKELETON_BUDGET`], so it may sit in memory).
pub fn skeleton(path: &Path, prepared: &Prepared) -> io::Result<Vec<u8>> {
    let mut f = crate::spool::msgfile::open_message(path, prepared.size)?.into_inner();
    let mut out = Vec::with_capacity(prepared.plan.skeleton_size as usize);
    for r in prepared.plan.kept(prepared.size) {
        f.seek(SeekFrom::Start(r.start))?;
        (&mut f).take(r.end - r.start).read_to_end(&mut out)?;
    }
    Ok(out)
}

/// Attach every cut-out part to the draft, in message order.
pub async fn attach_all(
    draft: &upload::Draft<'_>,
    path: &Path,
    prepared: &Prepared,
) -> Result<(), upload::UploadError> {
    for (i, (part, size)) in prepared.plan.cut.iter().zip(&prepared.sizes).enumerate() {
        upload::attach(draft, path, part, i, *size).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use base64::Engine as _;

    use super::*;

    /// A message with a text body, an inline image and an attachment of `big` bytes.
    fn message(big: usize) -> (Vec<u8>, Vec<u8>) {
        let content: Vec<u8> = (0..big).map(|i| (i * 7 % 251) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&content);
        let mut m = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
Content-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n\
Content-Type: application/octet-stream; name=\"data.bin\"\r\n\
Content-Disposition: attachment; filename=\"data.bin\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\n"
            .to_vec();
        for line in b64.as_bytes().chunks(76) {
            m.extend_from_slice(line);
            m.extend_from_slice(b"\r\n");
        }
        m.extend_from_slice(b"--b1--\r\n");
        (m, content)
    }

    #[test]
    fn size_threshold() {
        assert!(!is_large(1000));
        assert!(!is_large(SKELETON_BUDGET));
        assert!(is_large(3_000_000));
    }

    #[test]
    fn prepare_cuts_the_attachment_and_knows_its_size() {
        let (m, content) = message(4_000_000);
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(&m).expect("write");
        // Trailing bytes after the message (postern's envelope) must be ignored.
        f.write_all(b"{\"not\":\"message\"}").expect("write");
        let size = m.len() as u64;
        let p = prepare(f.path(), size, DEFAULT_MAX_MESSAGE).expect("prepare");
        assert_eq!(p.plan.cut.len(), 1);
        assert_eq!(p.sizes, vec![content.len() as u64]);
        let sk = skeleton(f.path(), &p).expect("skeleton");
        assert!(sk.len() < 1000, "{}", String::from_utf8_lossy(&sk));
        assert!(String::from_utf8_lossy(&sk).ends_with("see attached\r\n--b1--\r\n"));
        // The decoded part equals the original content.
        let mut got = Vec::new();
        upload::tests_support::open(f.path(), &p.plan.cut[0])
            .read_to_end(&mut got)
            .expect("read");
        assert!(got == content);
        match prepare(f.path(), size, size - 1) {
            Err(e @ PrepareError::OverLimit { .. }) => {
                assert!(e.is_permanent());
                assert!(e.to_string().contains("max_message_size"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
