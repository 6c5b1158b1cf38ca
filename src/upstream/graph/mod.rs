//! The Microsoft Graph transport (microsoft-reference.md §4): the message exactly as received,
//! base64 MIME, with the same routes, accounts, tokens, holds, retries, DSNs and pacing as the
//! SMTP transport.
//!
//! **Fast path**: `POST {graph_url}/v1.0/users/{mailbox}/sendMail` (`/me` for a delegated
//! token's own mailbox), `Content-Type: text/plain`, body the base64 of the queue file's
//! message, streamed from disk ([`body`]). `202 Accepted` is success. Graph has no envelope
//! (§4.2), so envelope recipients the `To:`/`Cc:`/`Bcc:` headers miss are named in a `Bcc:`
//! header put in front of the message for this request only ([`recipients`]).
//!
//! **Draft path**, when the headers name someone who must not receive the message through
//! postern (not a pending envelope recipient: a client that split one message into several
//! transactions, a DSN, a list expansion, a recipient already delivered or refused), when a
//! `Bcc:` field is already there and more recipients must be added, or when the route says
//! `save_to_sent_items = false`:
//! 1. `POST /users/{m}/messages` with the same base64 MIME (`201`, a draft; with
//!    `Prefer: IdType="ImmutableId"`, so its id survives the move to Sent Items);
//! 2. the draft's id is written into the message's envelope ([`GraphProgress`]);
//! 3. `PATCH /users/{m}/messages/{id}` sets `toRecipients`, `ccRecipients` and
//!    `bccRecipients` to the envelope's pending recipients, each exactly once: those the
//!    `To:` (or `Cc:`) header names stay there, the others go to Bcc (header-only
//!    recipients disappear from the visible headers: they were never the envelope's);
//!    with `save_to_sent_items = false` it also sets `PidTagDeleteAfterSubmit` (MAPI
//!    property `Boolean 0x0E01`), so Exchange deletes the message once submitted instead of
//!    filing it in Sent Items;
//! 4. the envelope records that `send` was requested, then
//!    `POST /users/{m}/messages/{id}/send` (`Content-Length: 0`, `202`).
//!
//! Why a draft rather than rewriting the MIME: Graph takes recipients only from the message,
//! and removing a header recipient from the MIME means rewriting the header section the
//! client wrote (folded fields, groups, encoded words, signatures over headers). The draft
//! keeps the MIME exactly as received (the body, attachments and every other header are
//! Graph's own conversion of it, as with sendMail) and changes only the recipient
//! properties, through the message resource, where they are structured data. The price:
//! four requests instead of one, and the permission `Mail.ReadWrite` (held with that advice
//! when it is missing).
//!
//! **Sent Items**: sendMail's MIME form has no `saveToSentItems` (§4.1: only the JSON form
//! has it), so `save_to_sent_items = false` sends through the draft path; a draft sent with
//! `send` is otherwise always filed in the mailbox's Sent Items. `PidTagDeleteAfterSubmit` is
//! documented by the Exchange protocol docs (MS-OXOMSG), not by the reference; if a tenant
//! ignored it, a copy would stay in Sent Items and nothing else would change.
//!
//! **Answer lost** (the request went out, no answer came): for a draft, the next attempt
//! reads it (`GET /messages/{id}?$select=isDraft`): `isDraft: false` means Graph sent it, so
//! it is not sent again; a draft that no longer exists after `send` was requested was sent
//! and deleted after submission (or deleted by someone) and is not sent again either; a draft
//! still a draft is sent. For `sendMail`, Graph keeps nothing to ask, so the envelope records
//! the lost answer and the retry is logged as a possible duplicate.
//!
//! **Limits**: at most 4 requests in flight per app and mailbox ([`limit`]); `429` and `503`
//! with `Retry-After` make the whole mailbox wait ([`Outcome::Throttled`]); a `401
//! InvalidAuthenticationToken` renews the token once and repeats the request at once
//! ([`request`]); the route's pacing (30 messages a minute, 10,000 recipients a day) is the
//! forwarder's, shared with SMTP.
//!
//! **Large messages** (whose base64 would pass Graph's 4 MB request limit, [`large`]): always
//! the draft path, with the draft made from the message's *skeleton* (the message without
//! its largest attachments); once its id is recorded, each cut-out part is attached (under
//! 3 MB in one request, larger ones through an upload session, `PUT`s of at most 3.2 MB to
//! the pre-authenticated URL without the token), then recipients are set and the draft is
//! sent. An attempt that fails while attaching deletes its draft; a restart that finds a
//! large message's draft whose send was not yet requested deletes it and starts again (its
//! parts may be incomplete). Messages over the route's `max_message_size` (default 35 MiB,
//! Exchange Online's default `MaxSendSize`) fail with a DSN naming what to change.

pub mod body;
pub mod classify;
pub mod large;
pub mod limit;
pub mod recipients;
pub mod request;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Method;
use serde_json::json;
use tracing::{debug, warn};

use super::{BoxFuture, Outcome, Outgoing, RcptResult, Transport, UpstreamError};
use crate::config::{AccountConfig, Credential};
use crate::escape;
use crate::spool::{GraphProgress, RcptStatus};
use crate::token::{AccessToken, TokenError, TokenSource};
use classify::{Context, Step};
use recipients::{HeaderRecipients, Plan, Recipients};
pub use request::{Answer, Failure, GraphClient, GraphError, Req, ReqBody};

/// Largest request body postern sends in one request. Graph refuses requests over 4 MB
/// (§4.3: "The maximum request length supported is 4MB", or 413); whether that means
/// 4,000,000 or 4,194,304 bytes is not documented, so stay under both.
pub const MAX_REQUEST: u64 = 4_000_000;
/// How long one request carrying the message may take (up to 4 MB upstream).
const SEND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long any other request may take.
const SMALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of the message is read to find its header section.
const MAX_HEADER: u64 = 1024 * 1024;
/// How often one attempt re-sends without recipients Graph refused by name.
const MAX_RECIPIENT_ROUNDS: usize = 3;

/// Sends spooled messages through Microsoft Graph.
pub struct GraphTransport {
    account: String,
    client_id: String,
    app_only: bool,
    save_to_sent_items: bool,
    /// Largest message this route sends ([`large`]; the mailbox's `MaxSendSize`).
    max_message_size: u64,
    client: GraphClient,
}

impl std::fmt::Debug for GraphTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTransport")
            .field("account", &self.account)
            .field("graph_url", &self.client.base)
            .field("save_to_sent_items", &self.save_to_sent_items)
            .finish_non_exhaustive()
    }
}

/// What one way of sending came to.
enum Step1 {
    /// Graph took the message (its answer, for the log).
    Sent(String),
    /// Graph refused these recipients by name (`ErrorInvalidRecipients`).
    Invalid(Vec<String>, Answer),
    /// The attempt ends with this.
    End(Outcome),
}

/// Everything one attempt needs.
struct Attempt<'a> {
    msg: &'a Outgoing,
    ctx: Context<'a>,
    /// `users/{mailbox}` or `me`.
    path: String,
    header: HeaderRecipients,
    progress: Option<GraphProgress>,
}

impl GraphTransport {
    /// A transport for `account`'s Graph endpoint (`endpoints.graph_url`), getting tokens
    /// from `tokens`. Fails when the HTTPS client cannot be built (`ca_file`, `proxy`) or
    /// graph_url is not https (or http to a loopback address).
    pub fn new(
        account: &AccountConfig,
        tokens: Arc<dyn TokenSource>,
        save_to_sent_items: bool,
    ) -> Result<Self, UpstreamError> {
        let setup = |why: String| UpstreamError::Graph {
            account: account.name.clone(),
            why,
        };
        crate::token::http::check_endpoint("graph_url", &account.endpoints.graph_url)
            .map_err(|e| setup(e.to_string()))?;
        let http = crate::token::http::client(account).map_err(|e| setup(e.to_string()))?;
        Ok(GraphTransport {
            account: account.name.clone(),
            client_id: account.client_id.clone(),
            app_only: !matches!(account.credential, Credential::Delegated { .. }),
            save_to_sent_items,
            max_message_size: large::DEFAULT_MAX_MESSAGE,
            client: GraphClient::new(
                http,
                &account.endpoints.graph_url,
                &account.name,
                &account.client_id,
                tokens,
            ),
        })
    }

    /// The largest message this route sends (default 35 MB, Exchange Online's default
    /// `MaxSendSize`); larger ones fail with a DSN saying what to change.
    pub fn with_max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The request helper (for `doctor`, and the large-message path).
    pub fn client(&self) -> &GraphClient {
        &self.client
    }

    /// The mailbox's path: `me` when a delegated token is the mailbox's own user, else
    /// `users/{mailbox}` (app-only tokens, and shared mailboxes with `Mail.Send.Shared`).
    pub fn mailbox_path(&self, mailbox: &str, token: &AccessToken) -> String {
        if !self.app_only
            && let Ok(c) = crate::token::inspect::decode_claims(token.token.expose())
            && c.upn.is_some_and(|u| u.eq_ignore_ascii_case(mailbox))
        {
            return "me".into();
        }
        format!("users/{mailbox}")
    }

    /// `{graph_url}/v1.0/{path}/{rest...}` with each segment percent-encoded.
    pub fn url(&self, path: &str, rest: &[&str]) -> String {
        let mut segs: Vec<&str> = vec!["v1.0"];
        match path.split_once('/') {
            Some((a, b)) => segs.extend([a, b]),
            None => segs.push(path),
        }
        segs.extend_from_slice(rest);
        match reqwest::Url::parse(&self.client.base) {
            Ok(mut u) => {
                if let Ok(mut p) = u.path_segments_mut() {
                    p.pop_if_empty().extend(segs);
                }
                u.to_string()
            }
            Err(_) => format!("{}/{}", self.client.base, segs.join("/")),
        }
    }

    /// `doctor`'s check of `mailbox`, sending nothing: `sendMail` with a body that is
    /// deliberately not base64. Graph resolves the mailbox and checks the token's right to
    /// send from it before it reads the body, so `400 ErrorMimeContentInvalidBase64String`
    /// means the token, `Mail.Send` and the mailbox are all right; any other error is
    /// classified as a delivery's would be. (A read such as `GET .../mailFolders/inbox` would
    /// need `Mail.Read`, which a sending app should not have.) `Ok`: what Graph answered.
    pub async fn probe(&self, mailbox: &str) -> Result<String, Outcome> {
        let token = self
            .client
            .token(mailbox)
            .await
            .map_err(|e| self.no_token(e, mailbox, "-"))?;
        let path = self.mailbox_path(mailbox, &token);
        let req = Req {
            method: Method::POST,
            url: self.url(&path, &["sendMail"]),
            body: ReqBody::Bytes {
                content_type: "text/plain",
                bytes: b"postern doctor: this body is not base64, so nothing is sent (!)".to_vec(),
            },
            headers: Vec::new(),
            auth: true,
            what: "sendMail (doctor's probe)",
            timeout: SMALL_TIMEOUT,
        };
        let ctx = Context {
            server: &self.client.server,
            account: &self.account,
            client_id: &self.client_id,
            app_only: self.app_only,
            mailbox,
            sender: mailbox,
            from: None,
            queue_id: "-",
        };
        match self.client.send(mailbox, "-", &req).await {
            Ok(ans) if ans.code() == Some("ErrorMimeContentInvalidBase64String") => Ok(format!(
                "POST /{path}/sendMail with a body that is not base64 was refused as expected ({}, {}): the token may send from {mailbox}; no message sent",
                ans.summary(),
                ans.ids()
            )),
            Ok(ans) if ans.is_success() => Ok(format!(
                "Graph answered {} to a body that is not base64 ({})",
                ans.status,
                ans.ids()
            )),
            Ok(ans) => Err(classify::outcome(&ans, Step::SendMail, &ctx)),
            Err(Failure::Lost { reason, .. }) => Err(Outcome::Transient { reason }),
            Err(Failure::Token(e)) => Err(self.no_token(e, mailbox, "-")),
            Err(Failure::Read(e)) => Err(Outcome::Transient {
                reason: e.to_string(),
            }),
        }
    }

    async fn deliver(&self, msg: &Outgoing) -> Outcome {
        let env = &msg.envelope;
        let pending: Vec<String> = env.pending().map(|r| r.address.clone()).collect();
        if pending.is_empty() {
            return Outcome::Sent {
                relay: self.client.server.clone(),
                reply: "no pending recipients".into(),
                recipients: Vec::new(),
            };
        }
        // An address that could break the header line it is written into is refused here.
        let (mut wanted, mut refused): (Vec<String>, Vec<RcptResult>) = (Vec::new(), Vec::new());
        for a in pending {
            if header_safe(&a) {
                wanted.push(a);
            } else {
                refused.push(RcptResult {
                    reply: format!(
                        "the address <{}> cannot be written into a message header",
                        escape::untrusted(&a)
                    ),
                    address: a,
                    status: RcptStatus::Failed,
                });
            }
        }
        if wanted.is_empty() {
            return self.sent("no valid recipient".into(), wanted, refused);
        }
        let head = match read_head(msg).await {
            Ok(h) => h,
            Err(e) => {
                return Outcome::Transient {
                    reason: format!("cannot read {}: {e}", msg.message.display()),
                };
            }
        };
        let from = super::from_address(&head);
        let header = HeaderRecipients::parse(&head);
        drop(head);
        let token = match self.client.token(&env.mailbox).await {
            Ok(t) => t,
            Err(e) => return self.no_token(e, &env.mailbox, &env.id),
        };
        let mut a = Attempt {
            msg,
            ctx: Context {
                server: &self.client.server,
                account: &self.account,
                client_id: &self.client_id,
                app_only: self.app_only,
                mailbox: &env.mailbox,
                sender: &env.sender,
                from: from.as_deref(),
                queue_id: &env.id,
            },
            path: self.mailbox_path(&env.mailbox, &token),
            header,
            progress: env.graph.clone(),
        };
        if a.progress.as_ref().is_some_and(|p| p.unanswered) {
            warn!(
                queue_id = %env.id,
                mailbox = %env.mailbox,
                "possible duplicate: Graph did not answer the previous sendMail for this message, so it may have sent it; sending it again"
            );
        }
        for _ in 0..MAX_RECIPIENT_ROUNDS {
            let step = if a.progress.as_ref().is_some_and(|p| p.draft_id.is_some()) {
                self.resume(&mut a, &wanted).await
            } else {
                match recipients::plan(&a.header, &wanted, self.force_draft(a.msg)) {
                    Plan::Fast { bcc } => self.fast(&mut a, &bcc).await,
                    Plan::Draft(r) => self.draft(&mut a, &r).await,
                }
            };
            match step {
                Step1::Sent(reply) => return self.sent(reply, wanted, refused),
                Step1::End(o) => return with_refused(refused, o),
                Step1::Invalid(mut names, answer) => {
                    // Only recipients still being sent to; if Graph names none of them, the
                    // refusal is about the message.
                    names.retain(|n| wanted.iter().any(|w| w.eq_ignore_ascii_case(n)));
                    if names.is_empty() {
                        let step = if a.progress.as_ref().is_some_and(|p| p.draft_id.is_some()) {
                            Step::SendDraft
                        } else {
                            Step::SendMail
                        };
                        self.discard_draft(&mut a).await;
                        return with_refused(refused, classify::outcome(&answer, step, &a.ctx));
                    }
                    let why = format!(
                        "Graph refused the recipient: {} ({})",
                        answer.summary(),
                        answer.ids()
                    );
                    wanted.retain(|w| !names.iter().any(|n| n.eq_ignore_ascii_case(w)));
                    refused.extend(names.into_iter().map(|address| RcptResult {
                        address,
                        status: RcptStatus::Failed,
                        reply: why.clone(),
                    }));
                    if wanted.is_empty() {
                        self.discard_draft(&mut a).await;
                        return self.sent("no valid recipient".into(), wanted, refused);
                    }
                }
            }
        }
        with_refused(
            refused,
            Outcome::Transient {
                reason: format!(
                    "Graph refused recipients {MAX_RECIPIENT_ROUNDS} times in one attempt; the others are tried again later"
                ),
            },
        )
    }

    /// `Sent` for `wanted` plus the `refused` recipients.
    fn sent(&self, reply: String, wanted: Vec<String>, refused: Vec<RcptResult>) -> Outcome {
        let mut recipients: Vec<RcptResult> = wanted
            .into_iter()
            .map(|address| RcptResult {
                address,
                status: RcptStatus::Sent,
                reply: reply.clone(),
            })
            .collect();
        recipients.extend(refused);
        Outcome::Sent {
            relay: self.client.server.clone(),
            reply,
            recipients,
        }
    }

    /// The outcome when no token could be had.
    fn no_token(&self, e: TokenError, mailbox: &str, queue_id: &str) -> Outcome {
        match e {
            TokenError::Transient(e) => Outcome::Transient {
                reason: format!(
                    "no access token for {mailbox} (account {}): token endpoint temporarily unavailable: {e}",
                    self.account
                ),
            },
            TokenError::Configuration(e) => Outcome::held(format!(
                "no access token for {mailbox} (account {}): {e}. {}",
                self.account,
                super::classify::release_hint(queue_id)
            )),
        }
    }

    /// The outcome of a request that got no answer to classify.
    fn failure(&self, f: Failure, a: &Attempt<'_>, after: &str) -> Outcome {
        match f {
            Failure::Token(e) => self.no_token(e, a.ctx.mailbox, a.ctx.queue_id),
            Failure::Read(e) => Outcome::Transient {
                reason: format!("cannot read {}: {e}", a.msg.message.display()),
            },
            Failure::Lost { reason, maybe_sent } => Outcome::Transient {
                reason: if maybe_sent {
                    format!("{reason}; {after}")
                } else {
                    reason
                },
            },
        }
    }

    /// The base64 MIME body (with `prefix` in front), opened afresh from the queue file.
    fn mime_body(
        msg: &Outgoing,
        prefix: Vec<u8>,
    ) -> impl Fn() -> std::io::Result<(reqwest::Body, u64)> + Send + Sync + '_ {
        move || {
            let (first, file, len) = message_parts(msg)?;
            let mut head = prefix.clone();
            head.extend_from_slice(&first);
            if len <= super::READ_INLINE {
                let file = tokio::io::AsyncReadExt::take(body::CachedFile(file), len);
                return Ok(body::base64_body(head, file, len));
            }
            let file = tokio::io::AsyncReadExt::take(tokio::fs::File::from_std(file), len);
            Ok(body::base64_body(head, file, len))
        }
    }

    /// Whether `msg` must go through a draft: the route keeps no copy in Sent Items, or the
    /// message is too large for one request ([`large`]).
    fn force_draft(&self, msg: &Outgoing) -> bool {
        // The `Bcc:` header sendMail may put in front counts toward the request too: allow
        // for every pending recipient (`Bcc: ` plus `<address>,` and a fold each).
        let bcc: u64 = 8 + msg
            .envelope
            .pending()
            .map(|r| r.address.len() as u64 + 6)
            .sum::<u64>();
        !self.save_to_sent_items || large::is_large(msg.size() + bcc)
    }

    /// A message whose request would be too large for Graph: fail it with the reason.
    fn too_large(&self, msg: &Outgoing, request: u64) -> Outcome {
        // Not expected: messages whose request could pass 4 MB go through a draft and
        // upload sessions ([`large`]); this guards the request limit all the same.
        Outcome::Permanent {
            reason: format!(
                "the message is {} bytes; as base64 its Graph request would be {request} bytes, \
                 over Graph's 4 MB request limit (microsoft-reference.md §4.3), and postern did \
                 not split it; send it through a route with transport = \"smtp\", and report \
                 this with `postern queue show {}`",
                msg.size(),
                msg.envelope.id
            ),
        }
    }

    /// `sendMail` with the MIME (and the added `Bcc:`).
    async fn fast(&self, a: &mut Attempt<'_>, bcc: &[String]) -> Step1 {
        let prefix = recipients::bcc_header(bcc);
        let request = body::encoded_len(prefix.len() as u64 + a.msg.size());
        if request > MAX_REQUEST {
            return Step1::End(self.too_large(a.msg, request));
        }
        let make = Self::mime_body(a.msg, prefix);
        let req = Req {
            method: Method::POST,
            url: self.url(&a.path, &["sendMail"]),
            body: ReqBody::Stream {
                content_type: "text/plain",
                make: &make,
            },
            headers: Vec::new(),
            auth: true,
            what: "sendMail",
            timeout: SEND_TIMEOUT,
        };
        match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) if ans.status == 202 => Step1::Sent(format!("202 Accepted ({})", ans.ids())),
            Ok(ans) if ans.is_success() => Step1::End(Outcome::Transient {
                reason: format!(
                    "Graph answered sendMail with {} instead of 202 ({}); postern retries later",
                    ans.summary(),
                    ans.ids()
                ),
            }),
            Ok(ans) => self.refused(a, ans, Step::SendMail).await,
            Err(f) => {
                let maybe = matches!(
                    f,
                    Failure::Lost {
                        maybe_sent: true,
                        ..
                    }
                );
                if maybe {
                    let mut p = a.progress.clone().unwrap_or_default();
                    p.path = a.path.clone();
                    p.unanswered = true;
                    // Best effort: the note only changes the next attempt's log line.
                    let _ = self.record(a, Some(p)).await;
                }
                Step1::End(self.failure(
                    f,
                    a,
                    "Graph may have sent the message: the retry can deliver a duplicate (sendMail leaves nothing to ask Graph about)",
                ))
            }
        }
    }

    /// A non-2xx answer: refused recipients by name, else the classified outcome (deleting a
    /// draft that can never be sent).
    async fn refused(&self, a: &mut Attempt<'_>, ans: Answer, step: Step) -> Step1 {
        let pending: Vec<String> = a
            .msg
            .envelope
            .pending()
            .map(|r| r.address.clone())
            .collect();
        let names = classify::invalid_recipients(&ans, &pending);
        if !names.is_empty() {
            return Step1::Invalid(names, ans);
        }
        let o = classify::outcome(&ans, step, &a.ctx);
        if matches!(o, Outcome::Permanent { .. }) {
            self.discard_draft(a).await;
        }
        Step1::End(o)
    }

    /// The draft path: create (unless resuming), set recipients, send.
    async fn draft(&self, a: &mut Attempt<'_>, r: &Recipients) -> Step1 {
        let id = match a.progress.as_ref().and_then(|p| p.draft_id.clone()) {
            Some(id) => id,
            None => match self.create_draft(a).await {
                Ok(id) => id,
                Err(s) => return s,
            },
        };
        let path = a
            .progress
            .as_ref()
            .map_or(a.path.clone(), |p| p.path.clone());
        let mut patch = json!({
            "toRecipients": list(&r.to),
            "ccRecipients": list(&r.cc),
            "bccRecipients": list(&r.bcc),
        });
        if !self.save_to_sent_items {
            patch["singleValueExtendedProperties"] =
                json!([{"id": "Boolean 0x0E01", "value": "true"}]);
        }
        let req = Req {
            method: Method::PATCH,
            url: self.url(&path, &["messages", &id]),
            body: ReqBody::Json(patch.to_string().into_bytes()),
            headers: vec![("Prefer", IMMUTABLE.into())],
            auth: true,
            what: "update draft",
            timeout: SMALL_TIMEOUT,
        };
        match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) if ans.is_success() => {}
            Ok(ans) if ans.status == 404 => {
                // Deleted in the mailbox meanwhile (nothing was sent yet): start again.
                warn!(queue_id = %a.ctx.queue_id, "the draft made for this message no longer exists; making a new one");
                a.progress = None;
                if let Err(o) = self.record(a, None).await {
                    return Step1::End(o);
                }
                return Step1::End(Outcome::Transient {
                    reason: format!(
                        "the draft made for this message in {} was deleted before it was sent; a new one is made on the next attempt",
                        a.ctx.mailbox
                    ),
                });
            }
            Ok(ans) => return self.refused(a, ans, Step::UpdateDraft).await,
            Err(f) => {
                return Step1::End(self.failure(
                    f,
                    a,
                    "the draft is kept and the next attempt continues with it",
                ));
            }
        }
        self.send_draft(a, &path, &id).await
    }

    /// `POST /messages` with the MIME: the draft's id, recorded in the envelope.
    async fn create_draft(&self, a: &mut Attempt<'_>) -> Result<String, Step1> {
        let request = body::encoded_len(a.msg.size());
        // A large message: the draft is made from its skeleton, the parts follow.
        let prepared = if request > MAX_REQUEST {
            Some(self.prepare_large(a.msg).await.map_err(Step1::End)?)
        } else {
            None
        };
        let skeleton = prepared.as_ref().map(|p| p.skeleton_base64.clone());
        let whole = Self::mime_body(a.msg, Vec::new());
        let from_skeleton = move || -> std::io::Result<(reqwest::Body, u64)> {
            let b = skeleton.clone().unwrap_or_default();
            let len = b.len() as u64;
            Ok((reqwest::Body::from(b), len))
        };
        let make: &(dyn Fn() -> std::io::Result<(reqwest::Body, u64)> + Send + Sync) =
            if prepared.is_some() {
                &from_skeleton
            } else {
                &whole
            };
        let req = Req {
            method: Method::POST,
            url: self.url(&a.path, &["messages"]),
            body: ReqBody::Stream {
                content_type: "text/plain",
                make: &make,
            },
            headers: vec![("Prefer", IMMUTABLE.into())],
            auth: true,
            what: "create draft",
            timeout: SEND_TIMEOUT,
        };
        let ans = match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) => ans,
            Err(f) => {
                return Err(Step1::End(self.failure(
                    f,
                    a,
                    "a draft may have been left in the mailbox's Drafts folder (it is never sent by itself)",
                )));
            }
        };
        if !ans.is_success() {
            return Err(self.refused(a, ans, Step::CreateDraft).await);
        }
        let Some(id) = ans
            .json()
            .and_then(|v| v["id"].as_str().map(str::to_string))
            .filter(|id| !id.is_empty())
        else {
            return Err(Step1::End(Outcome::Transient {
                reason: format!(
                    "Graph answered the draft creation with {} but no message id ({})",
                    ans.status,
                    ans.ids()
                ),
            }));
        };
        let p = GraphProgress {
            path: a.path.clone(),
            draft_id: Some(id.clone()),
            send_requested: false,
            unanswered: a.progress.as_ref().is_some_and(|p| p.unanswered),
        };
        a.progress = Some(p.clone());
        if let Err(o) = self.record(a, Some(p)).await {
            // Without the record a restart could not find the draft: remove it now.
            self.discard_draft(a).await;
            return Err(Step1::End(o));
        }
        if let Some(prepared) = prepared {
            self.attach_large(a, &id, &prepared.prepared).await?;
        }
        Ok(id)
    }

    /// Split a large message (blocking work, off the runtime): the parts to upload and the
    /// skeleton's base64; a message that cannot go this way fails with the reason.
    async fn prepare_large(&self, msg: &Outgoing) -> Result<LargeDraft, Outcome> {
        let (path, size, limit) = (
            msg.message.clone(),
            msg.envelope.size,
            self.max_message_size,
        );
        let rewrite = msg.rewrite.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<LargeDraft, large::PrepareError> {
            let prepared = large::prepare(&path, size, limit)?;
            let mut skeleton = large::skeleton(&path, &prepared)?;
            // `rewrite_from`: the skeleton starts with the stored header section, which goes
            // out rewritten like the whole message would (the cut-out parts are all below it).
            if let Some(r) = &rewrite {
                skeleton = r.apply_to(&skeleton)?;
            }
            let skeleton_base64 =
                bytes::Bytes::from(base64::engine::general_purpose::STANDARD.encode(&skeleton));
            Ok(LargeDraft {
                prepared,
                skeleton_base64,
            })
        })
        .await;
        match r {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e @ large::PrepareError::OverLimit { .. })) => {
                let vars = crate::diagnosis::Vars::new().set("mailbox", &msg.envelope.mailbox);
                Err(Outcome::Permanent {
                    reason: format!(
                        "{e}. {}",
                        crate::diagnosis::advice("graph.route-limit", &vars)
                    ),
                })
            }
            Ok(Err(e)) if e.is_permanent() => Err(Outcome::Permanent {
                reason: format!("cannot send this message over Graph: {e}"),
            }),
            Ok(Err(e)) => Err(Outcome::Transient {
                reason: format!("cannot read {}: {e}", msg.message.display()),
            }),
            Err(e) => Err(Outcome::Transient {
                reason: format!("splitting the message failed: {e}"),
            }),
        }
    }

    /// Attach the cut-out parts to the new draft `id`. On failure the draft is deleted (the
    /// next attempt makes a new one) unless Graph cannot be reached to delete it: then the
    /// envelope keeps its id, and the next attempt deletes it first.
    async fn attach_large(
        &self,
        a: &mut Attempt<'_>,
        id: &str,
        prepared: &large::Prepared,
    ) -> Result<(), Step1> {
        let path = a
            .progress
            .as_ref()
            .map_or(a.path.clone(), |p| p.path.clone());
        let draft = large::upload::Draft {
            client: &self.client,
            mailbox: a.ctx.mailbox,
            queue_id: a.ctx.queue_id,
            url: self.url(&path, &["messages", id]),
        };
        let parts = prepared.plan.cut.len();
        let r = large::attach_all(&draft, &a.msg.message, prepared).await;
        let outcome = match r {
            Ok(()) => {
                debug!(queue_id = %a.ctx.queue_id, parts, "large message: every part attached to the draft");
                return Ok(());
            }
            Err(large::upload::UploadError::Refused { step, answer }) => {
                classify::outcome(&answer, step, &a.ctx)
            }
            Err(large::upload::UploadError::Failed(f)) => self.failure(
                f,
                a,
                "the draft is deleted and the next attempt starts again",
            ),
            Err(large::upload::UploadError::Protocol(why)) => Outcome::Transient {
                reason: format!("{} upload: {why}", self.client.server),
            },
        };
        self.discard_draft(a).await;
        Err(Step1::End(outcome))
    }

    /// Record that `send` is requested, then request it.
    async fn send_draft(&self, a: &mut Attempt<'_>, path: &str, id: &str) -> Step1 {
        let mut p = a.progress.clone().unwrap_or_default();
        p.path = path.to_string();
        p.draft_id = Some(id.to_string());
        p.send_requested = true;
        a.progress = Some(p.clone());
        if let Err(o) = self.record(a, Some(p.clone())).await {
            return Step1::End(o);
        }
        let req = Req {
            method: Method::POST,
            url: self.url(path, &["messages", id, "send"]),
            body: ReqBody::Empty,
            headers: vec![("Prefer", IMMUTABLE.into())],
            auth: true,
            what: "send draft",
            timeout: SEND_TIMEOUT,
        };
        match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) if ans.status == 202 => Step1::Sent(format!("202 Accepted ({})", ans.ids())),
            Ok(ans) => {
                // Graph answered, so the draft was not sent.
                p.send_requested = false;
                a.progress = Some(p.clone());
                if let Err(o) = self.record(a, Some(p)).await {
                    return Step1::End(o);
                }
                if ans.is_success() {
                    return Step1::End(Outcome::Transient {
                        reason: format!(
                            "Graph answered the draft's send with {} instead of 202 ({}); postern asks it again later",
                            ans.summary(),
                            ans.ids()
                        ),
                    });
                }
                self.refused(a, ans, Step::SendDraft).await
            }
            Err(f) => Step1::End(self.failure(
                f,
                a,
                "the next attempt asks Graph whether the draft was sent, and does not send it twice",
            )),
        }
    }

    /// A draft was made in an earlier attempt: was it sent? Continue accordingly.
    async fn resume(&self, a: &mut Attempt<'_>, wanted: &[String]) -> Step1 {
        let Some(p) = a.progress.clone() else {
            return Step1::End(Outcome::Transient {
                reason: "no draft to resume".into(),
            });
        };
        let Some(id) = p.draft_id.clone() else {
            return Step1::End(Outcome::Transient {
                reason: "no draft to resume".into(),
            });
        };
        let mut url = self.url(&p.path, &["messages", &id]);
        url.push_str("?$select=isDraft");
        let req = Req {
            method: Method::GET,
            url,
            body: ReqBody::Empty,
            headers: vec![("Prefer", IMMUTABLE.into())],
            auth: true,
            what: "read draft",
            timeout: SMALL_TIMEOUT,
        };
        let ans = match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) => ans,
            Err(f) => {
                return Step1::End(self.failure(f, a, "the draft is asked about again next time"));
            }
        };
        match ans.status {
            200 => {
                let is_draft = ans.json().and_then(|v| v["isDraft"].as_bool());
                if is_draft == Some(false) {
                    return Step1::Sent(format!(
                        "Graph shows the message as sent (isDraft false; the answer to the earlier send was lost; {})",
                        ans.ids()
                    ));
                }
                if large::is_large(a.msg.size()) && !p.send_requested {
                    // Its parts may not all have been attached: start again from a new draft.
                    warn!(queue_id = %a.ctx.queue_id, "a draft of this large message was left by an interrupted attempt: deleting it and making a new one");
                    self.discard_draft(a).await;
                    if a.progress.is_some() {
                        return Step1::End(Outcome::Transient {
                            reason: format!(
                                "the unfinished draft of this message in {} could not be deleted; postern tries again later",
                                a.ctx.mailbox
                            ),
                        });
                    }
                }
                let r = match recipients::plan(&a.header, wanted, true) {
                    Plan::Draft(r) => r,
                    Plan::Fast { bcc } => Recipients {
                        bcc,
                        ..Recipients::default()
                    },
                };
                self.draft(a, &r).await
            }
            404 if p.send_requested => {
                warn!(
                    queue_id = %a.ctx.queue_id,
                    "the draft this message was sent from no longer exists after its send was requested: counted as sent (Exchange removes it after submission when Sent Items are off), not sent again"
                );
                Step1::Sent(format!(
                    "the draft no longer exists after its send was requested: counted as sent, not sent again ({})",
                    ans.ids()
                ))
            }
            404 => {
                a.progress = None;
                if let Err(o) = self.record(a, None).await {
                    return Step1::End(o);
                }
                match recipients::plan(&a.header, wanted, self.force_draft(a.msg)) {
                    Plan::Fast { bcc } => self.fast(a, &bcc).await,
                    Plan::Draft(r) => self.draft(a, &r).await,
                }
            }
            _ => self.refused(a, ans, Step::ReadDraft).await,
        }
    }

    /// Delete the draft of a message that will not be sent through it (best effort), and
    /// forget it.
    async fn discard_draft(&self, a: &mut Attempt<'_>) {
        let Some(p) = a.progress.clone() else {
            return;
        };
        let Some(id) = p.draft_id.clone() else {
            return;
        };
        if p.send_requested {
            return;
        }
        let req = Req {
            method: Method::DELETE,
            url: self.url(&p.path, &["messages", &id]),
            body: ReqBody::Empty,
            headers: vec![("Prefer", IMMUTABLE.into())],
            auth: true,
            what: "delete draft",
            timeout: SMALL_TIMEOUT,
        };
        match self.client.send(a.ctx.mailbox, a.ctx.queue_id, &req).await {
            Ok(ans) if ans.is_success() || ans.status == 404 => {
                a.progress = None;
                let _ = self.record(a, None).await;
            }
            Ok(ans) => warn!(
                queue_id = %a.ctx.queue_id,
                "could not delete the unsent draft in {}: {} ({})",
                a.ctx.mailbox,
                ans.summary(),
                ans.ids()
            ),
            Err(_) => warn!(
                queue_id = %a.ctx.queue_id,
                "could not delete the unsent draft in {}: no answer",
                a.ctx.mailbox
            ),
        }
    }

    /// Write `progress` into the message's envelope (appended to its queue file, synced)
    /// before the request it makes safe.
    async fn record(
        &self,
        a: &Attempt<'_>,
        progress: Option<GraphProgress>,
    ) -> Result<(), Outcome> {
        let mut env = a.msg.envelope.clone();
        env.graph = progress;
        let path = a.msg.message.clone();
        let r =
            tokio::task::spawn_blocking(move || crate::spool::msgfile::append(&path, &env, None))
                .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Outcome::Transient {
                reason: format!("cannot record the Graph draft in the queue file: {e}"),
            }),
            Err(e) => Err(Outcome::Transient {
                reason: format!("cannot record the Graph draft in the queue file: {e}"),
            }),
        }
    }
}

/// A large message's split, and the base64 of its skeleton (the draft's MIME).
struct LargeDraft {
    prepared: large::Prepared,
    skeleton_base64: bytes::Bytes,
}

/// Graph's header asking for ids that stay the same when a message moves between folders.
const IMMUTABLE: &str = "IdType=\"ImmutableId\"";

/// Graph's recipient list JSON.
fn list(addresses: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        addresses
            .iter()
            .map(|a| json!({"emailAddress": {"address": a}}))
            .collect(),
    )
}

/// Whether `a` can go into a header line as `<a>` without ending the line or the angle
/// brackets (a quoted local part with spaces or commas is fine inside them).
fn header_safe(a: &str) -> bool {
    a.contains('@') && !a.chars().any(|c| c.is_control() || matches!(c, '<' | '>'))
}

/// `o`, with the recipients refused earlier in the attempt reported first.
fn with_refused(refused: Vec<RcptResult>, o: Outcome) -> Outcome {
    if refused.is_empty() {
        o
    } else {
        Outcome::Partial {
            refused,
            then: Box::new(o),
        }
    }
}

/// The message as it goes out, in parts: bytes to send first, then the queue file positioned
/// where the rest starts, and how many bytes of it to send. Today the whole message comes from
/// the file; a transport-independent rewrite of the header (such as `rewrite_from`) plugs in
/// here (`Outgoing::open_parts`), so the Graph body and the SMTP DATA stay the same message.
fn message_parts(msg: &Outgoing) -> std::io::Result<(Vec<u8>, std::fs::File, u64)> {
    msg.open_parts()
}

/// The message's header section (at most [`MAX_HEADER`] bytes). Read on the async thread for
/// a small message ([`super::READ_INLINE`]), on the blocking pool otherwise.
async fn read_head(msg: &Outgoing) -> std::io::Result<Vec<u8>> {
    if msg.size() <= super::READ_INLINE {
        return read_head_blocking(msg);
    }
    let m = msg.clone();
    tokio::task::spawn_blocking(move || read_head_blocking(&m))
        .await
        .map_err(std::io::Error::other)?
}

fn read_head_blocking(msg: &Outgoing) -> std::io::Result<Vec<u8>> {
    let mut r = msg.open_message()?.take(MAX_HEADER);
    let mut head = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = find_blank_line(&head[from..]) {
            head.truncate(from + i);
            break;
        }
    }
    Ok(head)
}

/// The end of the header section (just after its blank line) in `b`, if there.
fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

impl Transport for GraphTransport {
    fn describe(&self) -> String {
        format!("graph:{}", self.client.base)
    }

    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        Box::pin(self.deliver(msg))
    }

    fn records_progress(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sections_end_at_the_first_blank_line() {
        assert_eq!(find_blank_line(b"A: b\r\n\r\nbody"), Some(8));
        assert_eq!(find_blank_line(b"A: b\n\nbody"), Some(6));
        assert_eq!(find_blank_line(b"A: b\r\n"), None);
    }

    #[test]
    fn addresses_that_could_break_a_header_are_refused() {
        assert!(header_safe("a@x.test"));
        assert!(header_safe("\"a b, c\"@x.test"));
        assert!(!header_safe("a@x.test>\r\nBcc: evil@y.test"));
        assert!(!header_safe("nobody"));
    }
}
