//! The fake Graph's attachments and upload sessions (microsoft-reference.md §4.3), for large
//! messages: kept apart from the rest of the fake Graph (`graph.rs`), which owns the drafts
//! and routes these requests here.
//!
//! As Graph and Outlook answer them:
//! - `POST /v1.0/users/{m}/messages/{id}/attachments` with a `fileAttachment`
//!   (`contentBytes` base64) → `201` and the attachment (without its bytes);
//! - `POST .../attachments/createUploadSession` with `{"AttachmentItem":{"attachmentType":
//!   "file","name","size",...}}` → `201` with `uploadUrl` (pre-authenticated; Outlook's
//!   form under `/upload/` of the fake:
//!   `.../upload/api/v2.0/Users('m')/Messages('id')/AttachmentSessions('s')?authtoken=...`),
//!   `expirationDateTime` and `nextExpectedRanges: ["0-"]`;
//! - `PUT uploadUrl` with `Content-Range: bytes {start}-{end}/{total}`: in order only; `200`
//!   with `nextExpectedRanges: ["{next}"]`, the last one `201` with a `Location` header and
//!   an empty body; `401` when an `Authorization` header is sent (the URL carries its own
//!   authorization: "Do not specify an Authorization request header"); `413` over 4 MB.
//!
//! Everything received is recorded (each PUT with its range, length and whether it carried
//! a bearer token) for the tests, and the attachments with their bytes (unless `keep_data`
//! is off, for benchmarks: then only sizes are kept).
//!
//! The handlers return a [`Reply`]; `graph.rs` turns it into its HTTP answer (with Graph's
//! `request-id` headers and, for errors, the §4.5 JSON with `innerError`).

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

/// Largest request body taken ("The maximum request length supported is 4MB.").
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Largest attachment an upload session takes.
pub const MAX_ATTACHMENT: u64 = 150 * 1024 * 1024;

/// An attachment of a message, as received.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `AAMk...` style id.
    pub id: String,
    /// `name`.
    pub name: String,
    /// `contentType`.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// `isInline`.
    pub is_inline: bool,
    /// `contentId`.
    pub content_id: Option<String>,
    /// The bytes (empty when `keep_data` is off).
    pub bytes: Vec<u8>,
    /// Came through an upload session (else one `POST .../attachments`).
    pub via_session: bool,
}

/// One `PUT` to an upload URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// The session.
    pub session: String,
    /// `Content-Range` as sent.
    pub content_range: String,
    /// Body length.
    pub len: usize,
    /// An `Authorization` header came with it.
    pub authorization: bool,
    /// What we answered.
    pub status: u16,
}

/// What the fake does with one PUT to an upload URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutStep {
    /// Take the range.
    Accept,
    /// Answer 200 as if the range had been lost on the way: the next expected range stays
    /// where it was, so the client must send it again.
    Lose,
    /// Answer this error status.
    Fail(u16),
}

/// An open upload session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The message it attaches to.
    pub message: String,
    /// The mailbox (as in the URL).
    pub mailbox: String,
    /// The `authtoken` of its URL.
    pub token: String,
    name: String,
    content_type: String,
    size: u64,
    is_inline: bool,
    content_id: Option<String>,
    /// Bytes received so far (counted; kept when `keep_data`).
    received: u64,
    data: Vec<u8>,
}

/// The attachments side of the fake Graph.
#[derive(Debug)]
pub struct Uploads {
    /// Attachments per message id.
    pub attachments: HashMap<String, Vec<Attachment>>,
    /// Open sessions by id.
    pub sessions: HashMap<String, Session>,
    /// Every PUT, in order.
    pub puts: Vec<Put>,
    /// `POST .../attachments` requests.
    pub attachment_posts: usize,
    /// `createUploadSession` requests.
    pub session_posts: usize,
    /// Keep attachment bytes (tests); off for benchmarks.
    pub keep_data: bool,
    /// Each PUT waits this long before it is answered (lets a test kill postern mid-upload).
    pub put_delay: Duration,
    /// Scripted answers to the next PUTs, in order (then every PUT is taken).
    pub put_script: VecDeque<PutStep>,
    n: u64,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            attachments: HashMap::new(),
            sessions: HashMap::new(),
            puts: Vec::new(),
            attachment_posts: 0,
            session_posts: 0,
            keep_data: true,
            put_delay: Duration::ZERO,
            put_script: VecDeque::new(),
            n: 0,
        }
    }
}

/// What a handler answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A success: status, JSON body, `Location` header.
    Ok {
        /// 200, 201.
        status: u16,
        /// The JSON body, if any.
        body: Option<Value>,
        /// `Location` (the last upload range).
        location: Option<String>,
    },
    /// An error in Graph's shape.
    Err {
        /// HTTP status.
        status: u16,
        /// `error.code`.
        code: &'static str,
        /// `error.message`.
        message: String,
    },
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply::Ok {
            status,
            body: Some(body),
            location: None,
        }
    }

    /// The status.
    pub fn status(&self) -> u16 {
        match self {
            Reply::Ok { status, .. } | Reply::Err { status, .. } => *status,
        }
    }
}

fn graph_error(status: u16, code: &'static str, message: &str) -> Reply {
    Reply::Err {
        status,
        code,
        message: message.to_string(),
    }
}

impl Uploads {
    fn next_id(&mut self, prefix: &str) -> String {
        self.n += 1;
        format!("{prefix}{:08}AAA=", self.n)
    }

    /// Attachments received for `message`.
    pub fn of(&self, message: &str) -> Vec<Attachment> {
        self.attachments.get(message).cloned().unwrap_or_default()
    }

    /// The message was deleted: its attachments and sessions go too.
    pub fn forget(&mut self, message: &str) {
        self.attachments.remove(message);
        self.sessions.retain(|_, s| s.message != message);
    }

    /// `POST .../messages/{id}/attachments`. `draft`: whether the message exists and is
    /// still a draft (`None`: no such message).
    pub fn add_attachment(&mut self, message: &str, draft: Option<bool>, body: &[u8]) -> Reply {
        self.attachment_posts += 1;
        if body.len() > MAX_REQUEST {
            return graph_error(
                413,
                "RequestBodyTooLarge",
                "The maximum request length supported is 4MB.",
            );
        }
        if let Some(r) = check_message(message, draft) {
            return r;
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
        };
        if v["@odata.type"].as_str() != Some("#microsoft.graph.fileAttachment") {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The attachment type must be specified with @odata.type.",
            );
        }
        let Some(bytes) = v["contentBytes"]
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        else {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The contentBytes property is missing or not valid base64.",
            );
        };
        let id = self.next_id("AAMkATT");
        let a = Attachment {
            id: id.clone(),
            name: v["name"].as_str().unwrap_or_default().to_string(),
            content_type: v["contentType"]
                .as_str()
                .unwrap_or("application/octet-stream")
                .to_string(),
            size: bytes.len() as u64,
            is_inline: v["isInline"].as_bool().unwrap_or(false),
            content_id: v["contentId"].as_str().map(str::to_string),
            bytes: if self.keep_data { bytes } else { Vec::new() },
            via_session: false,
        };
        let out = json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('m')/messages('id')/attachments/$entity",
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": id,
            "name": a.name,
            "contentType": a.content_type,
            "size": a.size,
            "isInline": a.is_inline,
            "contentId": a.content_id,
        });
        self.attachments
            .entry(message.to_string())
            .or_default()
            .push(a);
        Reply::ok(201, out)
    }

    /// `POST .../messages/{id}/attachments/createUploadSession`; `base` is the fake's URL
    /// (the upload URL points back to it).
    pub fn create_session(
        &mut self,
        base: &str,
        mailbox: &str,
        message: &str,
        draft: Option<bool>,
        body: &[u8],
    ) -> Reply {
        self.session_posts += 1;
        if let Some(r) = check_message(message, draft) {
            return r;
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
        };
        let item = &v["AttachmentItem"];
        if item["attachmentType"].as_str() != Some("file") {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "AttachmentItem.attachmentType must be 'file'.",
            );
        }
        let (Some(name), Some(size)) = (item["name"].as_str(), item["size"].as_u64()) else {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "AttachmentItem needs name and size.",
            );
        };
        if size == 0 || size > MAX_ATTACHMENT {
            return graph_error(
                400,
                "ErrorAttachmentSizeLimitExceeded",
                "The attachment size exceeds the allowed limit.",
            );
        }
        let sid = self.next_id("AAMkSESS");
        let token = format!("eyJ0eXAiOiJKV1QiLCJ1cGxvYWQiOiJ7{}", self.n);
        self.sessions.insert(
            sid.clone(),
            Session {
                message: message.to_string(),
                mailbox: mailbox.to_string(),
                token: token.clone(),
                name: name.to_string(),
                content_type: item["contentType"]
                    .as_str()
                    .unwrap_or("application/octet-stream")
                    .to_string(),
                size,
                is_inline: item["isInline"].as_bool().unwrap_or(false),
                content_id: item["contentId"].as_str().map(str::to_string),
                received: 0,
                data: Vec::new(),
            },
        );
        let out = json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": format!(
                "{base}/upload/api/v2.0/Users('{mailbox}')/Messages('{message}')/AttachmentSessions('{sid}')?authtoken={token}"
            ),
            "expirationDateTime": "2030-01-01T00:00:00.0000000Z",
            "nextExpectedRanges": ["0-"],
        });
        Reply::ok(201, out)
    }

    /// `PUT` to an upload URL: `rest` is its path after `/upload/`, `authtoken` its query
    /// parameter.
    /// `authorization`: the request carried an `Authorization` header.
    pub fn put(
        &mut self,
        base: &str,
        rest: &str,
        authtoken: Option<&str>,
        authorization: bool,
        content_range: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let sid = session_id(rest).unwrap_or_default();
        let content_range = content_range.unwrap_or_default().to_string();
        let mut record = Put {
            session: sid.clone(),
            content_range: content_range.clone(),
            len: body.len(),
            authorization,
            status: 0,
        };
        let r = self.put_inner(base, &sid, authtoken, &content_range, authorization, body);
        record.status = r.status();
        self.puts.push(record);
        r
    }

    fn put_inner(
        &mut self,
        base: &str,
        sid: &str,
        authtoken: Option<&str>,
        content_range: &str,
        authorization: bool,
        body: &[u8],
    ) -> Reply {
        if authorization {
            // The URL is pre-authenticated; a bearer token on it is refused.
            // (The body's wording is not confirmed by the reference; the status is.)
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "The upload URL is pre-authenticated: do not send an Authorization header.",
            );
        }
        if body.len() > MAX_REQUEST {
            return graph_error(
                413,
                "BadRequest",
                "The maximum request length supported is 4MB.",
            );
        }
        let Some(s) = self.sessions.get(sid) else {
            return graph_error(
                404,
                "ErrorItemNotFound",
                "The upload session was not found.",
            );
        };
        if authtoken != Some(s.token.as_str()) {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure.",
            );
        }
        let Some((start, end, total)) = parse_range(content_range) else {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                "The Content-Range header is missing or malformed.",
            );
        };
        if total != s.size
            || start != s.received
            || end + 1 - start != body.len() as u64
            || end >= total
        {
            return graph_error(
                400,
                "ErrorInvalidRequest",
                &format!(
                    "The Content-Range 'bytes {start}-{end}/{total}' does not match the next expected range {}- of {} bytes.",
                    s.received, s.size
                ),
            );
        }
        match self.put_script.pop_front() {
            Some(PutStep::Fail(status)) => {
                return graph_error(
                    status,
                    "ServiceUnavailable",
                    "The service is temporarily unavailable.",
                );
            }
            Some(PutStep::Lose) => {
                // As if lost on the way: the server still expects the same range.
                return next_expected(base, s);
            }
            Some(PutStep::Accept) | None => {}
        }
        let keep = self.keep_data;
        let Some(s) = self.sessions.get_mut(sid) else {
            return graph_error(
                404,
                "ErrorItemNotFound",
                "The upload session was not found.",
            );
        };
        s.received += body.len() as u64;
        if keep {
            s.data.extend_from_slice(body);
        }
        if s.received < s.size {
            return next_expected(base, s);
        }
        let Some(s) = self.sessions.remove(sid) else {
            return graph_error(
                404,
                "ErrorItemNotFound",
                "The upload session was not found.",
            );
        };
        let id = self.next_id("AAMkATT");
        let location = format!(
            "{base}/api/v2.0/Users('{}')/Messages('{}')/Attachments('{id}')",
            s.mailbox, s.message
        );
        self.attachments
            .entry(s.message.clone())
            .or_default()
            .push(Attachment {
                id,
                name: s.name,
                content_type: s.content_type,
                size: s.size,
                is_inline: s.is_inline,
                content_id: s.content_id,
                bytes: s.data,
                via_session: true,
            });
        Reply::Ok {
            status: 201,
            body: None,
            location: Some(location),
        }
    }
}

/// The 200 answer with the next expected range (Outlook's form: a single `"{start}"`).
fn next_expected(_base: &str, s: &Session) -> Reply {
    let out = json!({
        "@odata.context": format!(
            "https://outlook.office.com/api/v2.0/$metadata#Users('{}')/Messages('{}')/AttachmentSessions/$entity",
            s.mailbox, s.message
        ),
        "ExpirationDateTime": "2030-01-01T00:00:00.0000000Z",
        "nextExpectedRanges": [s.received.to_string()],
    });
    Reply::ok(200, out)
}

/// 404 for a message that does not exist, 400 for one that is no longer a draft.
fn check_message(message: &str, draft: Option<bool>) -> Option<Reply> {
    match draft {
        None => Some(graph_error(
            404,
            "ErrorItemNotFound",
            &format!("The specified object was not found in the store. ({message})"),
        )),
        Some(false) => Some(graph_error(
            400,
            "ErrorInvalidOperation",
            "Attachments can only be added to draft messages.",
        )),
        Some(true) => None,
    }
}

/// `AttachmentSessions('X')` → `X`.
fn session_id(rest: &str) -> Option<String> {
    let i = rest.find("AttachmentSessions('")? + "AttachmentSessions('".len();
    let j = rest[i..].find("')")?;
    Some(rest[i..i + j].to_string())
}

/// `bytes 0-99/1000` → (0, 99, 1000).
fn parse_range(v: &str) -> Option<(u64, u64, u64)> {
    let r = v.trim().strip_prefix("bytes ")?;
    let (range, total) = r.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}
