//! Attaching the cut-out parts to the draft (microsoft-reference.md §4.3): a part under 3 MB
//! in one `POST .../attachments` (a `fileAttachment` with `contentBytes`), a larger one
//! through `POST .../attachments/createUploadSession` and `PUT`s of at most [`CHUNK`] bytes,
//! in order, to the pre-authenticated `uploadUrl`, **without** the Authorization header (the
//! URL carries its own authorization; Exchange answers a bearer token there with 401).
//!
//! Every part is read from the queue file and decoded while it is sent: one chunk buffer per
//! upload, whatever the attachment's size.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use super::super::classify::Step;
use super::super::request::{Answer, Failure, GraphClient, Req, ReqBody};
use super::decode::{Decoder, read_full};
use super::split::Part;

/// Parts whose content is under this many bytes go in one attachment request (the guide's
/// "under 3 MB"; base64 makes it 4 MB in the request).
pub const SMALL_ATTACHMENT: u64 = 3 * 1000 * 1000;
/// Bytes per upload-session `PUT`: "up to 4 MB" each (§4.3). 10 × 320 KiB, safely under
/// 4,000,000 whichever way Microsoft counts a megabyte.
pub const CHUNK: usize = 10 * 320 * 1024;
/// Largest attachment an upload session takes (§4.3).
pub const MAX_ATTACHMENT: u64 = 150 * 1024 * 1024;
/// Time allowed for one request carrying up to 4 MB.
const TIMEOUT: Duration = Duration::from_secs(180);

/// The draft the parts go to, and who asks.
pub struct Draft<'a> {
    /// The account's Graph client (concurrency slots, tokens, ids).
    pub client: &'a GraphClient,
    /// The mailbox (for its concurrency slots and token).
    pub mailbox: &'a str,
    /// For the log.
    pub queue_id: &'a str,
    /// The draft's URL: `{graph_url}/v1.0/{path}/messages/{id}`.
    pub url: String,
}

/// Why attaching failed.
#[derive(Debug)]
pub enum UploadError {
    /// Graph (or the upload URL) answered with an error status: classify it.
    Refused {
        /// Which request.
        step: Step,
        /// The answer.
        answer: Answer,
    },
    /// No answer to classify (network, token, the queue file).
    Failed(Failure),
    /// An answer we cannot use (no `uploadUrl`, a range past the end...): try again later.
    Protocol(String),
}

impl From<io::Error> for UploadError {
    fn from(e: io::Error) -> Self {
        UploadError::Failed(Failure::Read(e))
    }
}

/// The decoded content of `part`, read from the queue file at `path`.
fn open_part(path: &Path, part: &Part) -> io::Result<Decoder<io::Take<BufReader<File>>>> {
    let mut f = crate::spool::msgfile::open_message(path, part.body.end)?.into_inner();
    f.seek(SeekFrom::Start(part.body.start))?;
    let raw = BufReader::with_capacity(64 * 1024, f).take(part.body.end - part.body.start);
    Ok(Decoder::new(raw, part.encoding))
}

/// Size of `part`'s decoded content (one decoding pass over it).
pub fn decoded_size(path: &Path, part: &Part) -> io::Result<u64> {
    io::copy(&mut open_part(path, part)?, &mut io::sink())
}

/// Attach `part` (decoded size `size`) to the draft: one request when small, an upload
/// session when not. `index` numbers unnamed parts.
pub async fn attach(
    d: &Draft<'_>,
    path: &Path,
    part: &Part,
    index: usize,
    size: u64,
) -> Result<(), UploadError> {
    if size < SMALL_ATTACHMENT {
        attach_small(d, path, part, index).await
    } else {
        attach_session(d, path, part, index, size).await
    }
}

/// `isInline`: marked inline, or referenced by Content-ID and not marked as an attachment.
fn is_inline(part: &Part) -> bool {
    part.inline || (part.content_id.is_some() && !part.attachment)
}

/// Send `req`; the answer if its status is one of `ok`, else the error to classify.
async fn ask(d: &Draft<'_>, req: &Req<'_>, step: Step, ok: &[u16]) -> Result<Answer, UploadError> {
    match d.client.send(d.mailbox, d.queue_id, req).await {
        Ok(a) if ok.contains(&a.status) => Ok(a),
        Ok(answer) => Err(UploadError::Refused { step, answer }),
        Err(f) => Err(UploadError::Failed(f)),
    }
}

async fn attach_small(
    d: &Draft<'_>,
    path: &Path,
    part: &Part,
    index: usize,
) -> Result<(), UploadError> {
    let (path_owned, part_owned) = (path.to_path_buf(), part.clone());
    let content = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        open_part(&path_owned, &part_owned)?.read_to_end(&mut out)?;
        Ok(out)
    })
    .await
    .map_err(io::Error::other)??;
    // The JSON is written around the base64 in place: the content, its base64 and the
    // request body are never all in memory at once.
    let mut meta = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": part.file_name(index),
        "contentType": part.content_type,
        "isInline": is_inline(part),
    });
    if let Some(cid) = &part.content_id {
        meta["contentId"] = Value::String(cid.clone());
    }
    let meta = meta.to_string();
    let b64_len = content.len().div_ceil(3) * 4;
    let mut body = Vec::with_capacity(meta.len() + b64_len + 20);
    body.extend_from_slice(&meta.as_bytes()[..meta.len() - 1]);
    body.extend_from_slice(b",\"contentBytes\":\"");
    let at = body.len();
    body.resize(at + b64_len, 0);
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(&content, &mut body[at..])
        .map_err(io::Error::other)?;
    body.truncate(at + n);
    drop(content);
    body.extend_from_slice(b"\"}");
    let req = Req {
        method: Method::POST,
        url: format!("{}/attachments", d.url),
        body: ReqBody::Json(body),
        headers: Vec::new(),
        auth: true,
        what: "add attachment",
        timeout: TIMEOUT,
    };
    ask(d, &req, Step::AddAttachment, &[201]).await.map(drop)
}

async fn attach_session(
    d: &Draft<'_>,
    path: &Path,
    part: &Part,
    index: usize,
    size: u64,
) -> Result<(), UploadError> {
    let mut item = json!({
        "attachmentType": "file",
        "name": part.file_name(index),
        "size": size,
        "contentType": part.content_type,
        "isInline": is_inline(part),
    });
    if let Some(cid) = &part.content_id {
        item["contentId"] = Value::String(cid.clone());
    }
    let req = Req {
        method: Method::POST,
        url: format!("{}/attachments/createUploadSession", d.url),
        body: ReqBody::Json(json!({ "AttachmentItem": item }).to_string().into_bytes()),
        headers: Vec::new(),
        auth: true,
        what: "create upload session",
        timeout: TIMEOUT,
    };
    let answer = ask(d, &req, Step::CreateUploadSession, &[200, 201]).await?;
    let session = answer.json().unwrap_or(Value::Null);
    let upload_url = session["uploadUrl"]
        .as_str()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or_else(|| {
            UploadError::Protocol(format!(
                "Graph answered createUploadSession without an uploadUrl ({})",
                answer.ids()
            ))
        })?
        .to_string();
    let next = next_expected(&session).unwrap_or(0);
    put_ranges(d, &upload_url, path, part, size, next).await
}

/// `PUT` the content from byte `next` on, following the upload URL's `nextExpectedRanges`.
async fn put_ranges(
    d: &Draft<'_>,
    upload_url: &str,
    path: &Path,
    part: &Part,
    size: u64,
    mut next: u64,
) -> Result<(), UploadError> {
    // The decoder only goes forward: `at` is where it stands.
    let mut reader = open_part(path, part)?;
    let mut at: u64 = 0;
    // One range buffer for the whole upload, taken back after each PUT: allocating a fresh
    // 3 MB buffer per range lets the allocator keep several of them around (its per-thread
    // arenas), which doubled the daemon's peak memory for a 100 MB message.
    let mut buf = bytes::BytesMut::with_capacity(CHUNK);
    // The server may ask for a range again, but not forever.
    let mut left = size / CHUNK as u64 + 20;
    loop {
        if next >= size {
            return Err(UploadError::Protocol(format!(
                "the upload URL expects byte {next} of an attachment of {size} bytes"
            )));
        }
        if left == 0 {
            return Err(UploadError::Protocol(
                "the upload URL keeps asking for ranges already sent".into(),
            ));
        }
        left -= 1;
        if next < at {
            // Asked for bytes already sent: decode again from the top.
            reader = open_part(path, part)?;
            at = 0;
        }
        let want = (size - next).min(CHUNK as u64) as usize;
        let skip = next - at;
        let start = next;
        let (chunk, r) =
            tokio::task::spawn_blocking(move || -> io::Result<(bytes::BytesMut, _)> {
                let mut r = reader;
                io::copy(&mut (&mut r).take(skip), &mut io::sink())?;
                buf.clear();
                buf.resize(want, 0);
                let n = read_full(&mut r, &mut buf)?;
                if n < want {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the attachment ended at byte {} of {size}",
                            start + n as u64
                        ),
                    ));
                }
                Ok((buf, r))
            })
            .await
            .map_err(io::Error::other)??;
        reader = r;
        let end = start + chunk.len() as u64; // exclusive
        at = end;
        let chunk = chunk.freeze();
        let len = chunk.len() as u64;
        let sent = chunk.clone();
        let make = move || Ok((reqwest::Body::from(sent.clone()), len));
        // No bearer token: the URL is pre-authenticated, and refuses one with 401.
        let req = Req {
            method: Method::PUT,
            url: upload_url.to_string(),
            body: ReqBody::Stream {
                content_type: "application/octet-stream",
                make: &make,
            },
            headers: vec![("Content-Range", format!("bytes {start}-{}/{size}", end - 1))],
            auth: false,
            what: "upload attachment range",
            timeout: TIMEOUT,
        };
        let answer = ask(d, &req, Step::UploadRange, &[200, 201]).await;
        drop(req);
        drop(make);
        // Every copy of the range is gone with the request: reuse its memory.
        buf = chunk
            .try_into_mut()
            .unwrap_or_else(|_| bytes::BytesMut::with_capacity(CHUNK));
        let answer = answer?;
        if answer.status == 201 {
            return Ok(());
        }
        match answer.json().as_ref().and_then(next_expected) {
            Some(n) => next = n,
            None if end >= size => return Ok(()),
            None => next = end,
        }
    }
}

/// The start of the first range in `nextExpectedRanges` (`["4194304-"]`, `["0-99"]`).
fn next_expected(body: &Value) -> Option<u64> {
    body["nextExpectedRanges"]
        .as_array()?
        .first()?
        .as_str()?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_expected_ranges() {
        assert_eq!(
            next_expected(&json!({"nextExpectedRanges": ["0-"]})),
            Some(0)
        );
        assert_eq!(
            next_expected(&json!({"nextExpectedRanges": ["3276800-", "x"]})),
            Some(3_276_800)
        );
        assert_eq!(next_expected(&json!({"nextExpectedRanges": []})), None);
        assert_eq!(next_expected(&json!({})), None);
    }

    #[test]
    fn chunks_stay_under_four_megabytes() {
        const { assert!(CHUNK < 4_000_000 && CHUNK.is_multiple_of(320 * 1024)) };
    }
}

/// Test access to the part decoder.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// The decoded content of `part`.
    pub fn open(path: &Path, part: &Part) -> impl Read {
        open_part(path, part).expect("open part")
    }
}
