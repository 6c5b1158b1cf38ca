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
use serde_json::{Value, json};

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

/// What a Graph request needs: the HTTP client, the base URL of the mailbox
/// (`{graph}/v1.0/users/{mailbox}` or `.../v1.0/me`) and the access token.
pub struct Api<'a> {
    /// The client (shared with the rest of the Graph transport).
    pub http: &'a reqwest::Client,
    /// The mailbox's base URL, without a trailing slash.
    pub base: &'a str,
    /// The bearer token (never sent to an upload URL).
    pub token: &'a str,
    /// Time allowed for one request (a whole chunk or attachment).
    pub timeout: Duration,
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Graph (or the upload URL) answered with an error status.
    #[error("{step}: HTTP {status}{}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        /// Which request.
        step: &'static str,
        /// HTTP status.
        status: u16,
        /// Graph's `error.code`.
        code: Option<String>,
        /// Graph's `error.message`.
        message: Option<String>,
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
        /// Graph's `request-id`, for Microsoft support.
        request_id: Option<String>,
    },
    /// No answer (connection, TLS, timeout).
    #[error("{step}: {detail}")]
    Network {
        /// Which request.
        step: &'static str,
        /// What happened, in an admin's words.
        detail: String,
    },
    /// An answer we cannot use (no `uploadUrl`, a range we never sent...).
    #[error("{step}: unexpected answer: {detail}")]
    Protocol {
        /// Which request.
        step: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The queue file could not be read.
    #[error("reading the queued message: {0}")]
    Read(#[from] io::Error),
}

impl UploadError {
    /// Whether a later attempt may succeed (network, 5xx, 429, an expired upload session).
    pub fn is_transient(&self) -> bool {
        match self {
            UploadError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408 || *status == 404
            }
            UploadError::Network { .. } | UploadError::Protocol { .. } => true,
            UploadError::Read(_) => true,
        }
    }
}

/// The decoded content of `part`, read from the queue file at `path`.
fn open_part(path: &Path, part: &Part) -> io::Result<Decoder<io::Take<BufReader<File>>>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(part.body.start))?;
    let raw = BufReader::with_capacity(64 * 1024, f).take(part.body.end - part.body.start);
    Ok(Decoder::new(raw, part.encoding))
}

/// Size of `part`'s decoded content (one decoding pass over it).
pub fn decoded_size(path: &Path, part: &Part) -> io::Result<u64> {
    io::copy(&mut open_part(path, part)?, &mut io::sink())
}

/// Attach `part` (decoded size `size`) to the draft `draft_id`: one request when small, an
/// upload session when not. `index` numbers unnamed parts.
pub async fn attach(
    api: &Api<'_>,
    draft_id: &str,
    path: &Path,
    part: &Part,
    index: usize,
    size: u64,
) -> Result<(), UploadError> {
    if size < SMALL_ATTACHMENT {
        attach_small(api, draft_id, path, part, index).await
    } else {
        attach_session(api, draft_id, path, part, index, size).await
    }
}

fn messages_url(api: &Api<'_>, draft_id: &str, rest: &str) -> String {
    format!(
        "{}/messages/{}/{rest}",
        api.base,
        url::form_urlencoded::byte_serialize(draft_id.as_bytes()).collect::<String>()
    )
}

async fn attach_small(
    api: &Api<'_>,
    draft_id: &str,
    path: &Path,
    part: &Part,
    index: usize,
) -> Result<(), UploadError> {
    const STEP: &str = "POST attachments";
    let (path_owned, part_owned) = (path.to_path_buf(), part.clone());
    let content = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        open_part(&path_owned, &part_owned)?.read_to_end(&mut out)?;
        Ok(out)
    })
    .await
    .map_err(io::Error::other)??;
    let mut body = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": part.file_name(index),
        "contentType": part.content_type,
        "isInline": part.inline || (part.content_id.is_some() && !part.attachment),
        "contentBytes": base64::engine::general_purpose::STANDARD.encode(&content),
    });
    if let Some(cid) = &part.content_id {
        body["contentId"] = Value::String(cid.clone());
    }
    drop(content);
    let resp = api
        .http
        .post(messages_url(api, draft_id, "attachments"))
        .bearer_auth(api.token)
        .timeout(api.timeout)
        .json(&body)
        .send()
        .await
        .map_err(|e| network(STEP, &e))?;
    expect(STEP, resp, &[201]).await.map(drop)
}

async fn attach_session(
    api: &Api<'_>,
    draft_id: &str,
    path: &Path,
    part: &Part,
    index: usize,
    size: u64,
) -> Result<(), UploadError> {
    const STEP: &str = "POST createUploadSession";
    let mut item = json!({
        "attachmentType": "file",
        "name": part.file_name(index),
        "size": size,
        "contentType": part.content_type,
        "isInline": part.inline || (part.content_id.is_some() && !part.attachment),
    });
    if let Some(cid) = &part.content_id {
        item["contentId"] = Value::String(cid.clone());
    }
    let resp = api
        .http
        .post(messages_url(
            api,
            draft_id,
            "attachments/createUploadSession",
        ))
        .bearer_auth(api.token)
        .timeout(api.timeout)
        .json(&json!({ "AttachmentItem": item }))
        .send()
        .await
        .map_err(|e| network(STEP, &e))?;
    let session: Value = expect(STEP, resp, &[201]).await?.1;
    let upload_url = session["uploadUrl"]
        .as_str()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or_else(|| UploadError::Protocol {
            step: STEP,
            detail: "no uploadUrl in the upload session".into(),
        })?
        .to_string();
    let mut next = next_expected(&session).unwrap_or(0);
    put_ranges(api, &upload_url, path, part, size, &mut next).await
}

/// `PUT` the content from `*next` on, following the server's `nextExpectedRanges`.
async fn put_ranges(
    api: &Api<'_>,
    upload_url: &str,
    path: &Path,
    part: &Part,
    size: u64,
    next: &mut u64,
) -> Result<(), UploadError> {
    const STEP: &str = "PUT upload range";
    // The decoder only goes forward: `at` is where it stands.
    let mut reader = open_part(path, part)?;
    let mut at: u64 = 0;
    // Bound the loop: the server may ask for a range again, but not forever.
    let mut requests = 0u64;
    let limit = size / CHUNK as u64 + 20;
    loop {
        if *next >= size {
            return Err(UploadError::Protocol {
                step: STEP,
                detail: format!("the upload URL expects byte {next} of {size}"),
            });
        }
        if *next < at {
            // Asked for bytes already sent: start decoding again from the top.
            reader = open_part(path, part)?;
            at = 0;
        }
        let (chunk, r) = {
            let want = (size - *next).min(CHUNK as u64) as usize;
            let skip = *next - at;
            let start = *next;
            tokio::task::spawn_blocking(move || -> io::Result<(Vec<u8>, _)> {
                let mut r = reader;
                io::copy(&mut (&mut r).take(skip), &mut io::sink())?;
                let mut buf = vec![0u8; want];
                let n = read_full(&mut r, &mut buf)?;
                if n < want {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the part ended at byte {} of {size}", start + n as u64),
                    ));
                }
                Ok((buf, r))
            })
            .await
            .map_err(io::Error::other)??
        };
        reader = r;
        let start = *next;
        let end = start + chunk.len() as u64; // exclusive
        at = end;
        requests += 1;
        if requests > limit {
            return Err(UploadError::Protocol {
                step: STEP,
                detail: "the upload URL keeps asking for the same ranges".into(),
            });
        }
        // No bearer token here: the URL is pre-authenticated.
        let resp = api
            .http
            .put(upload_url)
            .timeout(api.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(
                reqwest::header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end - 1),
            )
            .body(chunk)
            .send()
            .await
            .map_err(|e| network(STEP, &e))?;
        let (status, body) = expect(STEP, resp, &[200, 201]).await?;
        if status == 201 {
            return Ok(());
        }
        match next_expected(&body) {
            Some(n) => *next = n,
            None if end >= size => return Ok(()),
            None => *next = end,
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

fn network(step: &'static str, e: &reqwest::Error) -> UploadError {
    let detail = if e.is_timeout() {
        "no answer in time".to_string()
    } else {
        // The innermost cause in an admin's words, never with the URL (it is a credential
        // for upload URLs).
        let mut source: &dyn std::error::Error = e;
        while let Some(s) = source.source() {
            source = s;
        }
        match source.downcast_ref::<io::Error>() {
            Some(io) => crate::upstream::network_error(io),
            None => source.to_string(),
        }
    };
    UploadError::Network { step, detail }
}

/// The status and JSON body of `resp` if its status is one of `ok`, else the error.
async fn expect(
    step: &'static str,
    resp: reqwest::Response,
    ok: &[u16],
) -> Result<(u16, Value), UploadError> {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let request_id = header("request-id");
    let text = resp.text().await.map_err(|e| network(step, &e))?;
    let body: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    if ok.contains(&status) {
        return Ok((status, body));
    }
    let err = &body["error"];
    Err(UploadError::Status {
        step,
        status,
        code: err["code"].as_str().map(str::to_string),
        message: err["message"].as_str().map(str::to_string),
        retry_after,
        request_id,
    })
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
