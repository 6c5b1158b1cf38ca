//! One Graph request: the mailbox's concurrency slot, the access token (renewed once, at once,
//! when Graph answers `401 InvalidAuthenticationToken`), a `client-request-id` of our own
//! (what Microsoft support asks for), and the answer with Graph's ids, `Retry-After` and
//! error JSON (microsoft-reference.md §4.5). Every request of the Graph transport goes
//! through [`GraphClient::send`], including the upload-session requests of large messages
//! (which go to a pre-authenticated URL without the `Authorization` header: [`Req::auth`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use tracing::debug;

use super::limit;
use crate::token::{AccessToken, Audience, TokenError, TokenSource};

/// Most bytes of an answer's body kept (Graph's answers are small JSON documents).
const MAX_ANSWER: usize = 1024 * 1024;

/// A request body that can be made again (the request is repeated once with a renewed token).
pub enum ReqBody<'a> {
    /// No body (`Content-Length: 0`, as `send` and `DELETE` want).
    Empty,
    /// `application/json`.
    Json(Vec<u8>),
    /// Bytes with their content type.
    Bytes {
        /// `Content-Type`.
        content_type: &'static str,
        /// The body.
        bytes: Vec<u8>,
    },
    /// A streamed body with its content type: the factory returns the body and its length.
    Stream {
        /// `Content-Type`.
        content_type: &'static str,
        /// Makes the body (opens the queue file afresh each time).
        make: &'a (dyn Fn() -> io::Result<(reqwest::Body, u64)> + Send + Sync),
    },
}

/// One request.
pub struct Req<'a> {
    /// GET, POST, PATCH, PUT, DELETE.
    pub method: Method,
    /// The full URL.
    pub url: String,
    /// The body.
    pub body: ReqBody<'a>,
    /// More headers (`Prefer`, `Content-Range`...).
    pub headers: Vec<(&'static str, String)>,
    /// Send `Authorization: Bearer`. False only for the pre-authenticated upload URLs of
    /// upload sessions, which refuse a bearer token (§4.3).
    pub auth: bool,
    /// What the request does, for logs ("sendMail", "create draft").
    pub what: &'static str,
    /// How long the whole exchange may take.
    pub timeout: Duration,
}

/// Graph's error JSON: `{"error":{"code","message","innerError":{...}}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphError {
    /// `ErrorAccessDenied`.
    pub code: String,
    /// The message.
    pub message: String,
    /// `innerError.request-id`.
    pub request_id: Option<String>,
    /// `innerError.date`.
    pub date: Option<String>,
}

#[derive(Deserialize)]
struct ErrorDoc {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default, rename = "innerError", alias = "innererror")]
    inner: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    #[serde(default, rename = "request-id")]
    request_id: Option<String>,
    #[serde(default)]
    date: Option<String>,
}

impl GraphError {
    /// Parse an error body; `None` if it is not Graph's error JSON.
    pub fn parse(body: &[u8]) -> Option<GraphError> {
        let d: ErrorDoc = serde_json::from_slice(body).ok()?;
        Some(GraphError {
            code: d.error.code,
            message: d.error.message,
            request_id: d.error.inner.as_ref().and_then(|i| i.request_id.clone()),
            date: d.error.inner.and_then(|i| i.date),
        })
    }
}

/// Graph's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The `request-id` header (or `innerError.request-id`).
    pub request_id: Option<String>,
    /// The `client-request-id` we sent.
    pub client_request_id: String,
    /// `Retry-After`, when given (seconds or an HTTP date).
    pub retry_after: Option<Duration>,
    /// The `Location` header (upload sessions).
    pub location: Option<String>,
    /// The body (at most 1 MiB).
    pub body: Vec<u8>,
    /// The error JSON, for non-2xx answers that carry one.
    pub error: Option<GraphError>,
}

impl Answer {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `403 ErrorAccessDenied "Access is denied..."`: the status, code and message, for logs.
    pub fn summary(&self) -> String {
        match &self.error {
            Some(e) => format!(
                "{} {} \"{}\"",
                self.status,
                e.code,
                crate::escape::untrusted(&e.message)
            ),
            None => {
                let text = String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
                    .trim()
                    .to_string();
                if text.is_empty() {
                    self.status.to_string()
                } else {
                    format!("{} \"{}\"", self.status, crate::escape::untrusted(&text))
                }
            }
        }
    }

    /// `request-id X, client-request-id Y` (and Graph's date), for logs and support.
    pub fn ids(&self) -> String {
        let mut s = format!(
            "request-id {}, client-request-id {}",
            self.request_id.as_deref().unwrap_or("-"),
            self.client_request_id
        );
        if let Some(d) = self.error.as_ref().and_then(|e| e.date.as_deref()) {
            s.push_str(&format!(", date {d}"));
        }
        s
    }

    /// Graph's error code, if any.
    pub fn code(&self) -> Option<&str> {
        self.error.as_ref().map(|e| e.code.as_str())
    }
}

/// Why a request got no answer to classify.
#[derive(Debug)]
pub enum Failure {
    /// No (complete) answer came. `maybe_sent`: the request may have reached Graph (it was
    /// not a refused connection), so Graph may have acted on it.
    Lost {
        /// What happened, in an admin's words, with the client-request-id.
        reason: String,
        /// The request may have been received.
        maybe_sent: bool,
    },
    /// No access token could be had.
    Token(TokenError),
    /// The queue file could not be read for the body.
    Read(io::Error),
}

/// Sends Graph requests for one account.
pub struct GraphClient {
    http: reqwest::Client,
    /// The account's graph_url, without a trailing slash.
    pub base: String,
    /// The host of graph_url (for logs and metrics).
    pub server: String,
    account: String,
    client_id: String,
    tokens: Arc<dyn TokenSource>,
}

impl GraphClient {
    /// A client for `account` sending to `base` (its graph_url).
    pub fn new(
        http: reqwest::Client,
        base: &str,
        account: &str,
        client_id: &str,
        tokens: Arc<dyn TokenSource>,
    ) -> GraphClient {
        let base = base.trim_end_matches('/').to_string();
        let server = reqwest::Url::parse(&base)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_string(),
                })
            })
            .unwrap_or_else(|| base.clone());
        GraphClient {
            http,
            base,
            server,
            account: account.to_string(),
            client_id: client_id.to_string(),
            tokens,
        }
    }

    /// A token for `mailbox`.
    pub async fn token(&self, mailbox: &str) -> Result<AccessToken, TokenError> {
        self.tokens
            .token(&self.account, mailbox, Audience::Graph)
            .await
    }

    /// Send `req` for `mailbox` (at most 4 requests in flight per app and mailbox), with a
    /// token; when Graph answers `401 InvalidAuthenticationToken`, renew the token once and
    /// repeat the request at once. A second refusal (or a refusal of a fresh token) is
    /// returned as the answer, for the caller to hold the mailbox.
    pub async fn send(
        &self,
        mailbox: &str,
        queue_id: &str,
        req: &Req<'_>,
    ) -> Result<Answer, Failure> {
        let mut token = if req.auth {
            Some(self.token(mailbox).await.map_err(Failure::Token)?)
        } else {
            None
        };
        let mut renewed = false;
        loop {
            let answer = self.once(mailbox, queue_id, req, token.as_ref()).await?;
            let refused = token_refused(&answer);
            if !refused || renewed || !req.auth {
                return Ok(answer);
            }
            let Some(old) = token.as_ref() else {
                return Ok(answer);
            };
            match self
                .tokens
                .renew(&self.account, mailbox, Audience::Graph, old)
                .await
            {
                Ok(Some(t)) => {
                    debug!(
                        queue_id,
                        mailbox, "Graph refused the access token: retrying at once with a new one"
                    );
                    token = Some(t);
                    renewed = true;
                }
                Ok(None) => return Ok(answer),
                Err(e) => return Err(Failure::Token(e)),
            }
        }
    }

    async fn once(
        &self,
        mailbox: &str,
        queue_id: &str,
        req: &Req<'_>,
        token: Option<&AccessToken>,
    ) -> Result<Answer, Failure> {
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let mut b = self
            .http
            .request(req.method.clone(), &req.url)
            .timeout(req.timeout)
            .header("client-request-id", &client_request_id)
            .header("return-client-request-id", "true");
        if let Some(t) = token {
            b = b.bearer_auth(t.token.expose());
        }
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        b = match &req.body {
            ReqBody::Empty => b.header(reqwest::header::CONTENT_LENGTH, "0"),
            ReqBody::Json(v) => b
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(v.clone()),
            ReqBody::Bytes {
                content_type,
                bytes,
            } => b
                .header(reqwest::header::CONTENT_TYPE, *content_type)
                .body(bytes.clone()),
            ReqBody::Stream { content_type, make } => {
                let (body, len) = make().map_err(Failure::Read)?;
                b.header(reqwest::header::CONTENT_TYPE, *content_type)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body)
            }
        };
        // The slot is held for the whole exchange, answer included.
        let _slot = limit::slot(&self.client_id, mailbox).await;
        let lost = |e: reqwest::Error| {
            let maybe_sent = !e.is_connect() && !e.is_builder();
            Failure::Lost {
                reason: format!(
                    "{} {} ({}): {} (client-request-id {client_request_id})",
                    self.server,
                    req.what,
                    if maybe_sent { "no answer" } else { "not sent" },
                    describe(&e, req.timeout)
                ),
                maybe_sent,
            }
        };
        let mut resp = b.send().await.map_err(&lost)?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let request_id = header("request-id");
        let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v));
        let location = header("location");
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(&lost)? {
            if body.len() < MAX_ANSWER {
                body.extend_from_slice(&chunk[..chunk.len().min(MAX_ANSWER - body.len())]);
            }
        }
        let error = if (200..300).contains(&status) {
            None
        } else {
            GraphError::parse(&body)
        };
        let request_id = request_id.or_else(|| error.as_ref().and_then(|e| e.request_id.clone()));
        crate::metrics::graph_reply(
            &self.server,
            status,
            error.as_ref().map(|e| e.code.as_str()),
        );
        let answer = Answer {
            status,
            request_id,
            client_request_id,
            retry_after,
            location,
            body,
            error,
        };
        debug!(
            queue_id,
            mailbox,
            request = req.what,
            status,
            request_id = answer.request_id.as_deref().unwrap_or("-"),
            client_request_id = %answer.client_request_id,
            "Graph answered"
        );
        Ok(answer)
    }
}

/// Whether a new token may cure the answer: `401 InvalidAuthenticationToken` (expired,
/// revoked), and `403 ErrorAccessDenied` "Access is denied" (the token lacks a permission
/// granted since it was issued: roles and scopes are fixed when a token is issued). Not an
/// Application Access Policy ("Access to OData is disabled"), which is the mailbox's.
fn token_refused(a: &Answer) -> bool {
    let code = a.code().unwrap_or("");
    match a.status {
        401 => code.is_empty() || code.eq_ignore_ascii_case("InvalidAuthenticationToken"),
        403 => {
            code.eq_ignore_ascii_case("ErrorAccessDenied")
                && !a
                    .error
                    .as_ref()
                    .is_some_and(|e| e.message.to_ascii_lowercase().contains("odata is disabled"))
        }
        _ => false,
    }
}

/// A reqwest error in an admin's words (the chain's I/O error, when there is one).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {}", humantime::format_duration(timeout));
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return super::super::network_error(io);
        }
        src = s.source();
    }
    if e.is_connect() {
        return "cannot connect (check DNS, the firewall and proxy settings)".into();
    }
    if e.is_body() || e.is_request() {
        return "the connection broke off (by Graph, or a firewall or proxy in between)".into();
    }
    e.to_string()
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_error_json_is_read_with_its_ids() {
        let body = br#"{"error":{"code":"ErrorAccessDenied","message":"Access to OData is disabled.","innerError":{"date":"2026-11-29T10:00:00","request-id":"0b1d-1","client-request-id":"c1"}}}"#;
        let e = GraphError::parse(body).unwrap();
        assert_eq!(e.code, "ErrorAccessDenied");
        assert_eq!(e.message, "Access to OData is disabled.");
        assert_eq!(e.request_id.as_deref(), Some("0b1d-1"));
        assert_eq!(e.date.as_deref(), Some("2026-11-29T10:00:00"));
        assert!(GraphError::parse(b"<html>").is_none());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
