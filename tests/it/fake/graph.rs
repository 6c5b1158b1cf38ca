//! A fake Microsoft Graph (`graph.microsoft.com`) on 127.0.0.1, answering as
//! microsoft-reference.md §4 and §8 describe: `sendMail` with a base64 MIME body (202, empty
//! body), drafts from MIME (`POST /messages`, 201 with the message), `PATCH` of their
//! recipients, `POST /messages/{id}/send` (202, `Content-Length: 0` required), `GET` and
//! `DELETE` of a message by its (immutable) id, 413 over 4 MB, 429 `ApplicationThrottled`
//! with `Retry-After` (also when a client goes over 4 concurrent requests per app and
//! mailbox), `401 InvalidAuthenticationToken`, and errors in the exact §4.5 shape with
//! `innerError` (`request-id`, `date`, `client-request-id`). Recipients are taken only from
//! the message (its To/Cc/Bcc headers, or the draft's recipient lists), as Graph does.
//!
//! Tokens are checked like Graph: a bearer token issued by the fake Entra
//! ([`FakeEntra::issued_check`](super::entra::FakeEntra::issued_check)), not revoked, with a
//! Graph audience; app-only tokens need the role `Mail.Send` (`Mail.ReadWrite` for drafts),
//! delegated ones the scope `Mail.Send` (`Mail.ReadWrite`) and, for a mailbox other than the
//! signed-in user's, `Mail.Send.Shared` plus a grant in [`State::shared_access`].
//!
//! It records every request (with its `client-request-id` and `Authorization`) and every
//! message Graph would have sent, decoded. Tests script errors per mailbox, the next answers,
//! throttling, a delay per request, and lost answers (the request is acted on, then the
//! connection is dropped without a reply).
//!
//! Extending it (large messages): add arms to [`dispatch`] (`attachments`,
//! `createUploadSession`, upload URLs under `/upload/`); drafts are kept in [`State::drafts`]
//! with their MIME and an `attachments` list.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request as HttpRequest, Response};
use serde_json::{Value, json};

use super::graph_upload::{Reply, Uploads};

/// Graph's request size limit (§4.3), as this fake applies it.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Outlook's concurrency limit per app and mailbox (§4.4).
pub const MAX_CONCURRENT: usize = 4;

/// An error answer: status, Graph `code` and `message`, and `Retry-After`.
#[derive(Debug, Clone)]
pub struct GraphErr {
    /// HTTP status.
    pub status: u16,
    /// `error.code`.
    pub code: String,
    /// `error.message`.
    pub message: String,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u64>,
}

impl GraphErr {
    /// Any error.
    pub fn new(status: u16, code: &str, message: &str) -> GraphErr {
        GraphErr {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
        }
    }
    /// 403 `ErrorAccessDenied` "Access is denied. Check credentials and try again." (§4.5).
    pub fn access_denied() -> GraphErr {
        GraphErr::new(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        )
    }
    /// 403 `ErrorAccessDenied` "Access to OData is disabled." (Application Access Policy).
    pub fn odata_disabled() -> GraphErr {
        GraphErr::new(403, "ErrorAccessDenied", "Access to OData is disabled.")
    }
    /// 404 `MailboxNotEnabledForRESTAPI` (status NOT CONFIRMED by the reference; 404 as it
    /// suggests).
    pub fn no_rest_api() -> GraphErr {
        GraphErr::new(
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        )
    }
    /// 404 `ErrorInvalidUser` for `mailbox` (status NOT CONFIRMED; typically 404).
    pub fn invalid_user(mailbox: &str) -> GraphErr {
        GraphErr::new(
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{mailbox}' is invalid."),
        )
    }
    /// 429 `ApplicationThrottled` with `Retry-After: secs`.
    pub fn throttled(secs: u64) -> GraphErr {
        GraphErr {
            retry_after: Some(secs),
            ..GraphErr::new(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            )
        }
    }
    /// 503 without `Retry-After`.
    pub fn unavailable() -> GraphErr {
        GraphErr::new(
            503,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
        )
    }
}

/// Whose answer is lost next: the fake acts on the request, then drops the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lose {
    /// `sendMail`.
    SendMail,
    /// `POST /messages` (a draft is made).
    CreateDraft,
    /// `POST /messages/{id}/send`.
    SendDraft,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Request {
    /// `POST`, `PATCH`...
    pub method: String,
    /// The path, percent-decoded, without the query.
    pub path: String,
    /// The query string.
    pub query: Option<String>,
    /// The mailbox the path names (`/me` resolved), lowercase.
    pub mailbox: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `client-request-id`.
    pub client_request_id: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Length`.
    pub content_length: Option<String>,
    /// `Prefer`.
    pub prefer: Option<String>,
    /// The body as received.
    pub body: Vec<u8>,
    /// When it arrived.
    pub at: Instant,
    /// What the fake answered (0: the connection was dropped).
    pub status: u16,
}

/// A message Graph would have sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The mailbox it was sent from, lowercase.
    pub mailbox: String,
    /// The MIME as Graph received it (base64-decoded).
    pub mime: Vec<u8>,
    /// Who receives it (from the headers for sendMail, from the draft's lists otherwise).
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Bcc.
    pub bcc: Vec<String>,
    /// `sendMail` or `draft`.
    pub via: &'static str,
    /// A copy stays in Sent Items.
    pub saved_to_sent_items: bool,
    /// When.
    pub at: Instant,
}

impl Sent {
    /// Everyone who receives it, in order.
    pub fn recipients(&self) -> Vec<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .cloned()
            .collect()
    }
}

/// A message in a mailbox (a draft, or sent and kept under the same immutable id).
#[derive(Debug, Clone)]
pub struct Draft {
    /// Mailbox, lowercase.
    pub mailbox: String,
    /// The MIME it was made from.
    pub mime: Vec<u8>,
    /// Recipients.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Bcc.
    pub bcc: Vec<String>,
    /// Still a draft.
    pub is_draft: bool,
    /// `PidTagDeleteAfterSubmit` was set.
    pub delete_after_submit: bool,
    /// Attachments added to the draft (for the large-message path).
    pub attachments: Vec<Value>,
}

/// Whether the fake Entra issued a token.
pub type IssuedCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Everything the fake knows; tests change it through [`FakeGraph::state`].
pub struct State {
    issued: Option<IssuedCheck>,
    /// The fake's own base URL: tokens for it (scope `{graph_url}/.default`) are for Graph.
    base: String,
    /// Tokens refused with 401 from now on.
    pub revoked: HashSet<String>,
    /// Every request, in order.
    pub requests: Vec<Request>,
    /// Every message sent.
    pub sent: Vec<Sent>,
    /// Messages by id.
    pub drafts: HashMap<String, Draft>,
    /// Every request for a mailbox (lowercase) answers this until removed.
    pub mailbox_errors: HashMap<String, GraphErr>,
    /// Check Send As: the From header must be the mailbox or granted here as (mailbox, from).
    pub check_send_as: bool,
    /// Send As grants: (mailbox, from address), lowercase.
    pub send_as: HashSet<(String, String)>,
    /// Delegated users allowed to send from other mailboxes: (user, mailbox), lowercase.
    pub shared_access: HashSet<(String, String)>,
    /// Recipient addresses Graph refuses (`ErrorInvalidRecipients`), lowercase.
    pub invalid_recipients: HashSet<String>,
    /// The next requests answer with these, in order.
    pub script: VecDeque<GraphErr>,
    /// The next answers of these kinds are lost.
    pub lose: Vec<Lose>,
    /// Each request is answered after this long.
    pub delay: Duration,
    in_flight: HashMap<String, usize>,
    /// Attachments and upload sessions (large messages, [`super::graph_upload`]).
    pub uploads: Uploads,
    /// Most requests in flight at once, per app and mailbox (`appid mailbox`).
    pub max_in_flight: HashMap<String, usize>,
    n: u64,
}

impl State {
    /// Requests whose path ends with `suffix`.
    pub fn count(&self, suffix: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.path.ends_with(suffix))
            .count()
    }

    /// The most requests one app had in flight for `mailbox` at once.
    pub fn max_concurrency(&self, mailbox: &str) -> usize {
        self.max_in_flight
            .iter()
            .filter(|(k, _)| k.ends_with(&format!(" {}", mailbox.to_lowercase())))
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }

    /// Refuse every token seen so far (as if revoked): the next request with one gets 401.
    pub fn revoke_seen(&mut self) {
        let seen: Vec<String> = self
            .requests
            .iter()
            .filter_map(|r| {
                r.authorization
                    .as_deref()?
                    .strip_prefix("Bearer ")
                    .map(str::to_string)
            })
            .collect();
        self.revoked.extend(seen);
    }

    fn next(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
}

/// The running fake.
pub struct FakeGraph {
    /// `http://127.0.0.1:PORT` (for graph_url).
    pub base: String,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGraph {
    /// Start, accepting tokens for which `issued` is true (the fake Entra's).
    pub fn start(issued: IssuedCheck) -> FakeGraph {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake graph");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            issued: Some(issued),
            base: format!("http://{addr}"),
            revoked: HashSet::new(),
            requests: Vec::new(),
            sent: Vec::new(),
            drafts: HashMap::new(),
            mailbox_errors: HashMap::new(),
            check_send_as: true,
            send_as: HashSet::new(),
            shared_access: HashSet::new(),
            invalid_recipients: HashSet::new(),
            script: VecDeque::new(),
            lose: Vec::new(),
            delay: Duration::ZERO,
            in_flight: HashMap::new(),
            max_in_flight: HashMap::new(),
            uploads: Uploads::default(),
            n: 0,
        }));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let (stream, _) = tokio::select! {
                        r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                        _ = &mut rx => break,
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { handle(st, req).await }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        FakeGraph {
            base: format!("http://{addr}"),
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Lock the state to script or inspect it.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The messages sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.state().sent.clone()
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The connection is dropped without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer deliberately lost")
    }
}

impl std::error::Error for Dropped {}

type Answer = Response<Full<Bytes>>;

async fn handle(st: Arc<Mutex<State>>, req: HttpRequest<Incoming>) -> Result<Answer, Dropped> {
    let method = req.method().to_string();
    let raw_path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (authorization, client_request_id, content_type, content_length, prefer) = (
        h("authorization"),
        h("client-request-id"),
        h("content-type"),
        h("content-length"),
        h("prefer"),
    );
    let content_range = h("content-range");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return Err(Dropped),
    };
    let path = percent_decode(&raw_path);
    let upload = path.starts_with("/upload/");
    let mut r = Request {
        method,
        path,
        query,
        mailbox: None,
        authorization,
        client_request_id,
        content_type,
        content_length,
        prefer,
        body,
        at: Instant::now(),
        status: 0,
    };
    if upload {
        // Upload URLs are pre-authenticated: no token check, no mailbox slot (graph_upload).
        return Ok(upload_put(&st, r, content_range.as_deref()).await);
    }
    let (answer, slot) = {
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        let slot = enter(&mut s, &mut r);
        let a = match &slot {
            Err(e) => Ok(error(&mut s, &r, e)),
            Ok(_) => Ok(Response::new(Full::new(Bytes::new()))),
        };
        (a, slot)
    };
    let delay = st.lock().unwrap_or_else(|p| p.into_inner()).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
    let result = match slot {
        Err(_) => answer,
        Ok(ref who) => dispatch(&mut s, &mut r, who),
    };
    if let Ok(key) = &slot
        && let Some(n) = s.in_flight.get_mut(&key.slot)
    {
        *n = n.saturating_sub(1);
    }
    r.status = match &result {
        Ok(a) => a.status().as_u16(),
        Err(_) => 0,
    };
    s.requests.push(r);
    result
}

/// Who is asking, for which mailbox.
struct Who {
    /// `appid mailbox`.
    slot: String,
    mailbox: String,
    app_only: bool,
    perms: Vec<String>,
    user: Option<String>,
    /// The path after the mailbox (`sendMail`, `messages/ID/send`...).
    rest: Vec<String>,
}

/// Authenticate, resolve the mailbox, count the request in flight, and apply scripted
/// errors; `Err` is the error to answer.
fn enter(s: &mut State, r: &mut Request) -> Result<Who, GraphErr> {
    let token = r
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if token.is_empty() {
        return Err(GraphErr::new(
            401,
            "InvalidAuthenticationToken",
            "Access token is empty.",
        ));
    }
    let issued = s.issued.as_ref().is_none_or(|f| f(token));
    if !issued || s.revoked.contains(token) {
        return Err(GraphErr::new(
            401,
            "InvalidAuthenticationToken",
            "Access token has expired.",
        ));
    }
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|c| B64URL.decode(c).ok())
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
        .unwrap_or(Value::Null);
    let aud = claims["aud"].as_str().unwrap_or("");
    if aud != s.base && !aud.starts_with("https://graph.microsoft") {
        // Not a message from the reference: Graph's usual text for a token of another API.
        return Err(GraphErr::new(
            401,
            "InvalidAuthenticationToken",
            "Access token validation failure. Invalid audience.",
        ));
    }
    let user = claims["upn"].as_str().map(str::to_lowercase);
    let app_only = user.is_none();
    let perms: Vec<String> = if app_only {
        claims["roles"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        claims["scp"]
            .as_str()
            .unwrap_or("")
            .split(' ')
            .map(str::to_string)
            .collect()
    };
    let segs: Vec<String> = r
        .path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let (mailbox, rest) = match segs.as_slice() {
        [v, me, rest @ ..] if v == "v1.0" && me == "me" => match &user {
            Some(u) => (u.clone(), rest.to_vec()),
            None => {
                return Err(GraphErr::new(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                ));
            }
        },
        [v, users, m, rest @ ..] if v == "v1.0" && users == "users" => {
            (m.to_lowercase(), rest.to_vec())
        }
        _ => {
            return Err(GraphErr::new(
                400,
                "BadRequest",
                &format!("Resource not found for the segment '{}'.", r.path),
            ));
        }
    };
    r.mailbox = Some(mailbox.clone());
    let appid = claims["appid"].as_str().unwrap_or("-").to_string();
    let slot = format!("{appid} {mailbox}");
    let n = s.in_flight.entry(slot.clone()).or_default();
    *n += 1;
    let now = *n;
    let max = s.max_in_flight.entry(slot.clone()).or_default();
    *max = (*max).max(now);
    let who = Who {
        slot,
        mailbox,
        app_only,
        perms,
        user,
        rest,
    };
    let fail = |s: &mut State, e: GraphErr| -> Result<Who, GraphErr> {
        if let Some(n) = s.in_flight.get_mut(&who.slot) {
            *n = n.saturating_sub(1);
        }
        Err(e)
    };
    if now > MAX_CONCURRENT {
        return fail(s, GraphErr::throttled(1));
    }
    // Permissions (§2): Mail.Send to send, Mail.ReadWrite for drafts; delegated tokens for
    // another user's mailbox also need the .Shared permission and a grant.
    let drafts = who.rest.first().is_some_and(|x| x == "messages")
        && !(who.rest.len() == 3 && who.rest[2] == "send");
    let needed = if drafts {
        "Mail.ReadWrite"
    } else {
        "Mail.Send"
    };
    let has = |p: &str| who.perms.iter().any(|x| x == p);
    let mut allowed = has(needed);
    if !who.app_only && who.user.as_deref() != Some(who.mailbox.as_str()) {
        allowed = allowed
            && has(&format!("{needed}.Shared"))
            && who
                .user
                .as_ref()
                .is_some_and(|u| s.shared_access.contains(&(u.clone(), who.mailbox.clone())));
    }
    if !allowed {
        return fail(s, GraphErr::access_denied());
    }
    if let Some(e) = s.mailbox_errors.get(&who.mailbox).cloned() {
        return fail(s, e);
    }
    if let Some(e) = s.script.pop_front() {
        return fail(s, e);
    }
    Ok(who)
}

/// The request's action, once it passed [`enter`].
fn dispatch(s: &mut State, r: &mut Request, who: &Who) -> Result<Answer, Dropped> {
    let rest: Vec<&str> = who.rest.iter().map(String::as_str).collect();
    let m = r.method.as_str();
    match (m, rest.as_slice()) {
        ("POST", ["sendMail"]) => {
            let mime = match mime_body(r) {
                Ok(b) => b,
                Err(e) => return Ok(error(s, r, &e)),
            };
            let (to, cc, bcc, from) = header_recipients(&mime);
            if let Err(e) = check_message(s, &who.mailbox, from.as_deref(), &to, &cc, &bcc) {
                return Ok(error(s, r, &e));
            }
            s.sent.push(Sent {
                mailbox: who.mailbox.clone(),
                mime,
                to,
                cc,
                bcc,
                via: "sendMail",
                saved_to_sent_items: true,
                at: Instant::now(),
            });
            if take_lose(s, Lose::SendMail) {
                return Err(Dropped);
            }
            Ok(answer(s, r, 202, None))
        }
        ("POST", ["messages"]) => {
            let mime = match mime_body(r) {
                Ok(b) => b,
                Err(e) => return Ok(error(s, r, &e)),
            };
            let (to, cc, bcc, _) = header_recipients(&mime);
            let id = format!(
                "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A{}",
                B64URL.encode(format!("postern-fake-{}", s.next()))
            );
            let d = Draft {
                mailbox: who.mailbox.clone(),
                mime,
                to,
                cc,
                bcc,
                is_draft: true,
                delete_after_submit: false,
                attachments: Vec::new(),
            };
            let body = message_json(&id, &d);
            s.drafts.insert(id, d);
            if take_lose(s, Lose::CreateDraft) {
                return Err(Dropped);
            }
            Ok(answer(s, r, 201, Some(body)))
        }
        ("PATCH", ["messages", id]) => {
            let Some(d) = s.drafts.get_mut(*id).filter(|d| d.mailbox == who.mailbox) else {
                return Ok(error(s, r, &not_found()));
            };
            let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
                return Ok(error(
                    s,
                    r,
                    &GraphErr::new(400, "BadRequest", "Unable to read JSON request payload."),
                ));
            };
            let list = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x["emailAddress"]["address"].as_str())
                            .map(str::to_lowercase)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            if !v["toRecipients"].is_null() {
                d.to = list(&v["toRecipients"]);
            }
            if !v["ccRecipients"].is_null() {
                d.cc = list(&v["ccRecipients"]);
            }
            if !v["bccRecipients"].is_null() {
                d.bcc = list(&v["bccRecipients"]);
            }
            if let Some(props) = v["singleValueExtendedProperties"].as_array() {
                for p in props {
                    if p["id"].as_str() == Some("Boolean 0x0E01") {
                        d.delete_after_submit = p["value"].as_str() == Some("true");
                    }
                }
            }
            let body = message_json(id, d);
            Ok(answer(s, r, 200, Some(body)))
        }
        ("POST", ["messages", id, "send"]) => {
            if r.content_length.is_none() {
                return Ok(error(
                    s,
                    r,
                    &GraphErr::new(411, "LengthRequired", "Length Required"),
                ));
            }
            let Some(d) = s
                .drafts
                .get(*id)
                .filter(|d| d.mailbox == who.mailbox && d.is_draft)
                .cloned()
            else {
                return Ok(error(s, r, &not_found()));
            };
            let (_, _, _, from) = header_recipients(&d.mime);
            if let Err(e) = check_message(s, &who.mailbox, from.as_deref(), &d.to, &d.cc, &d.bcc) {
                return Ok(error(s, r, &e));
            }
            s.sent.push(Sent {
                mailbox: who.mailbox.clone(),
                mime: d.mime.clone(),
                to: d.to.clone(),
                cc: d.cc.clone(),
                bcc: d.bcc.clone(),
                via: "draft",
                saved_to_sent_items: !d.delete_after_submit,
                at: Instant::now(),
            });
            if d.delete_after_submit {
                s.drafts.remove(*id);
            } else if let Some(x) = s.drafts.get_mut(*id) {
                // Moved to Sent Items; the immutable id stays.
                x.is_draft = false;
            }
            if take_lose(s, Lose::SendDraft) {
                return Err(Dropped);
            }
            Ok(answer(s, r, 202, None))
        }
        ("GET", ["messages", id]) => match s.drafts.get(*id).filter(|d| d.mailbox == who.mailbox) {
            Some(d) => {
                let body = message_json(id, d);
                Ok(answer(s, r, 200, Some(body)))
            }
            None => Ok(error(s, r, &not_found())),
        },
        ("POST", ["messages", id, "attachments"]) => {
            let draft = draft_state(s, &who.mailbox, id);
            let reply = s.uploads.add_attachment(id, draft, &r.body);
            Ok(render(s, r, reply))
        }
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            let draft = draft_state(s, &who.mailbox, id);
            let base = s.base.clone();
            let reply = s
                .uploads
                .create_session(&base, &who.mailbox, id, draft, &r.body);
            Ok(render(s, r, reply))
        }
        ("DELETE", ["messages", id]) => {
            if s.drafts.get(*id).is_some_and(|d| d.mailbox == who.mailbox) {
                s.drafts.remove(*id);
                s.uploads.forget(id);
                Ok(answer(s, r, 204, None))
            } else {
                Ok(error(s, r, &not_found()))
            }
        }
        _ => Ok(error(
            s,
            r,
            &GraphErr::new(
                400,
                "BadRequest",
                &format!("Resource not found for the segment '{}'.", rest.join("/")),
            ),
        )),
    }
}

fn not_found() -> GraphErr {
    GraphErr::new(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn take_lose(s: &mut State, what: Lose) -> bool {
    match s.lose.iter().position(|l| *l == what) {
        Some(i) => {
            s.lose.remove(i);
            true
        }
        None => false,
    }
}

/// The MIME of a `text/plain` base64 body (§4.1), or the error Graph gives.
fn mime_body(r: &Request) -> Result<Vec<u8>, GraphErr> {
    if r.body.len() > MAX_REQUEST {
        // 413 on sendMail is observed (§4.3); the code name is NOT CONFIRMED.
        return Err(GraphErr::new(
            413,
            "RequestBodyTooLarge",
            "The maximum request length supported is 4MB.",
        ));
    }
    let bad = GraphErr::new(
        400,
        "ErrorMimeContentInvalidBase64String",
        "Invalid base64 string for MIME content.",
    );
    if !r
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("text/plain"))
    {
        return Err(bad);
    }
    let text: Vec<u8> = r
        .body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    B64.decode(&text).map_err(|_| bad)
}

/// To, Cc, Bcc (lowercase) and the From address of a MIME message.
fn header_recipients(mime: &[u8]) -> (Vec<String>, Vec<String>, Vec<String>, Option<String>) {
    let Some(m) = mail_parser::MessageParser::new().parse_headers(mime) else {
        return Default::default();
    };
    let list = |a: Option<&mail_parser::Address<'_>>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(str::to_lowercase))
                .collect()
        })
        .unwrap_or_default()
    };
    let from = m
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(str::to_lowercase);
    (list(m.to()), list(m.cc()), list(m.bcc()), from)
}

/// Send As and the recipients, as Exchange checks them on submission.
fn check_message(
    s: &State,
    mailbox: &str,
    from: Option<&str>,
    to: &[String],
    cc: &[String],
    bcc: &[String],
) -> Result<(), GraphErr> {
    if s.check_send_as
        && let Some(f) = from
        && f != mailbox
        && !s.send_as.contains(&(mailbox.to_string(), f.to_string()))
    {
        return Err(GraphErr::new(
            403,
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account. Cannot submit message.",
        ));
    }
    if let Some(bad) = to
        .iter()
        .chain(cc)
        .chain(bcc)
        .find(|a| s.invalid_recipients.contains(*a))
    {
        // The reference quotes "At least one recipient isn't valid., ..." (§4.5); the rest is
        // Exchange's usual wording naming the recipient.
        return Err(GraphErr::new(
            400,
            "ErrorInvalidRecipients",
            &format!(
                "At least one recipient isn't valid., Recipient '{bad}' isn't resolved. All recipients must be resolved before a message can be submitted."
            ),
        ));
    }
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(GraphErr::new(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
        ));
    }
    Ok(())
}

fn message_json(id: &str, d: &Draft) -> Value {
    let list = |v: &[String]| -> Value {
        v.iter()
            .map(|a| json!({"emailAddress": {"name": a, "address": a}}))
            .collect()
    };
    json!({
        "@odata.context": format!("https://graph.microsoft.com/v1.0/$metadata#users('{}')/messages/$entity", d.mailbox),
        "@odata.etag": "W/\"CQAAABYAAAAiIsqMbYjsT5e/T7KzowPTAAAYbvc0\"",
        "id": id,
        "createdDateTime": iso_now(),
        "lastModifiedDateTime": iso_now(),
        "isDraft": d.is_draft,
        "hasAttachments": !d.attachments.is_empty(),
        "toRecipients": list(&d.to),
        "ccRecipients": list(&d.cc),
        "bccRecipients": list(&d.bcc),
    })
}

/// An answer with Graph's headers (`request-id`, `client-request-id`).
fn answer(s: &mut State, r: &Request, status: u16, body: Option<Value>) -> Answer {
    let request_id = uuid::Uuid::new_v4().to_string();
    let _ = s;
    let mut b = Response::builder()
        .status(status)
        .header("request-id", &request_id)
        .header(
            "client-request-id",
            r.client_request_id.as_deref().unwrap_or(""),
        )
        .header("Cache-Control", "no-cache");
    let bytes = match body {
        Some(v) => {
            b = b.header("Content-Type", "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(bytes))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// An error in the exact §4.5 shape.
fn error(s: &mut State, r: &Request, e: &GraphErr) -> Answer {
    let request_id = uuid::Uuid::new_v4().to_string();
    let _ = s;
    let body = json!({
        "error": {
            "code": e.code,
            "message": e.message,
            "innerError": {
                "date": iso_now(),
                "request-id": request_id,
                "client-request-id": r.client_request_id.as_deref().unwrap_or(""),
            }
        }
    });
    let mut b = Response::builder()
        .status(e.status)
        .header("request-id", &request_id)
        .header(
            "client-request-id",
            r.client_request_id.as_deref().unwrap_or(""),
        )
        .header("Content-Type", "application/json");
    if let Some(ra) = e.retry_after {
        b = b.header("Retry-After", ra.to_string());
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// `2026-11-29T13:44:11` (Graph's innerError date: UTC, no zone letter).
fn iso_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn percent_decode(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(hex) = std::str::from_utf8(&b[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- Large messages: attachments and upload sessions (the logic is in graph_upload.rs) ----

/// Whether message `id` of `mailbox` is still a draft (`None`: there is no such message).
fn draft_state(s: &State, mailbox: &str, id: &str) -> Option<bool> {
    s.drafts
        .get(id)
        .filter(|d| d.mailbox == mailbox)
        .map(|d| d.is_draft)
}

/// A [`Reply`] of the upload handlers as this fake's HTTP answer.
fn render(s: &mut State, r: &Request, reply: Reply) -> Answer {
    match reply {
        Reply::Ok {
            status,
            body,
            location,
        } => {
            let mut a = answer(s, r, status, body);
            if let Some(l) = location
                && let Ok(v) = hyper::header::HeaderValue::from_str(&l)
            {
                a.headers_mut().insert(hyper::header::LOCATION, v);
            }
            a
        }
        Reply::Err {
            status,
            code,
            message,
        } => error(s, r, &GraphErr::new(status, code, &message)),
    }
}

/// A request to an upload URL (`/upload/...?authtoken=...`): only `PUT`; recorded like
/// every request, after the scripted delay.
async fn upload_put(st: &Arc<Mutex<State>>, mut r: Request, content_range: Option<&str>) -> Answer {
    let delay = st
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .uploads
        .put_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
    let reply = if r.method == "PUT" {
        let token = r
            .query
            .as_deref()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("authtoken=")))
            .map(str::to_string);
        let base = s.base.clone();
        let rest = r.path.trim_start_matches("/upload/").to_string();
        s.uploads.put(
            &base,
            &rest,
            token.as_deref(),
            r.authorization.is_some(),
            content_range,
            &r.body,
        )
    } else {
        Reply::Err {
            status: 405,
            code: "BadRequest",
            message: format!("{} is not supported on an upload URL.", r.method),
        }
    };
    let a = render(&mut s, &r, reply);
    r.status = a.status().as_u16();
    s.requests.push(r);
    a
}
