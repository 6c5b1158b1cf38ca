//! Graph answers → [`Outcome`] plus advice, in one place (microsoft-reference.md §4.5 and §9
//! rows 40–51). Graph's error `code` decides, never its message (§4.5: "Branch on code"),
//! except where the reference tells two causes apart by the message only (`ErrorAccessDenied`
//! "Access to OData is disabled." versus "Access is denied."). The words come from
//! [`crate::diagnosis`]'s table, filled in for the mailbox and account.
//!
//! - **Held** (our configuration; the mailbox waits, the messages keep their retries):
//!   `ErrorAccessDenied` (missing `Mail.Send`, or `Mail.ReadWrite` for a draft; an Application
//!   Access Policy or RBAC scope), `ExtensionError` about OData, `MailboxNotEnabledForRESTAPI`,
//!   `ErrorInvalidUser`, `Authorization_RequestDenied`, any other 403 and 404 on the mailbox,
//!   and a 401 that a renewed token did not cure. `ErrorSendAsDenied` holds only the mail from
//!   that address ([`HoldScope::Sender`]).
//! - **Throttled** (the whole mailbox waits): 429, and 503 with `Retry-After`.
//! - **Permanent** (a DSN): `ErrorInvalidRecipients` naming no recipient we can tell (the
//!   transport first retries without the recipients it names), `ErrorMessageSizeExceeded`,
//!   `ErrorMimeContentInvalidBase64String`, and any other 400.
//! - **Transient**: 5xx, 413 (the 4 MB request limit), and anything else.

use std::time::Duration;

use super::request::Answer;
use crate::upstream::classify::{release_hint, sender_release_hint};
use crate::upstream::{HoldScope, Outcome};

/// How long a mailbox waits after a 429 that gave no `Retry-After`.
pub const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(30);

/// Which request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `POST /users/{m}/sendMail` (MIME).
    SendMail,
    /// `POST /users/{m}/messages` (a draft from the MIME).
    CreateDraft,
    /// `PATCH /users/{m}/messages/{id}` (its recipients).
    UpdateDraft,
    /// `POST /users/{m}/messages/{id}/send`.
    SendDraft,
    /// `GET /users/{m}/messages/{id}` (was it sent?).
    ReadDraft,
    /// `DELETE /users/{m}/messages/{id}`.
    DeleteDraft,
    /// `POST /users/{m}/messages/{id}/attachments` (a part of a large message).
    AddAttachment,
    /// `POST .../attachments/createUploadSession`.
    CreateUploadSession,
    /// `PUT` of a range to an upload session's URL.
    UploadRange,
}

impl Step {
    /// The request in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            Step::SendMail => "sendMail",
            Step::CreateDraft => "the request creating a draft",
            Step::UpdateDraft => "the request setting the draft's recipients",
            Step::SendDraft => "the request sending the draft",
            Step::ReadDraft => "the request reading the draft",
            Step::DeleteDraft => "the request deleting the draft",
            Step::AddAttachment => "the request attaching a part of the message to the draft",
            Step::CreateUploadSession => "the request opening an upload session for an attachment",
            Step::UploadRange => "an upload of part of an attachment",
        }
    }

    fn uses_draft(self) -> bool {
        !matches!(self, Step::SendMail)
    }
}

/// Who we are and what we were sending, for the advice.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// graph_url's host.
    pub server: &'a str,
    /// `[account.NAME]`.
    pub account: &'a str,
    /// The app's client id.
    pub client_id: &'a str,
    /// Client credentials rather than delegated sign-in.
    pub app_only: bool,
    /// The mailbox sent from.
    pub mailbox: &'a str,
    /// The envelope sender.
    pub sender: &'a str,
    /// The `From:` header's address.
    pub from: Option<&'a str>,
    /// Queue id.
    pub queue_id: &'a str,
}

/// The outcome of a non-2xx answer to `step` (after a 401 was retried with a renewed token).
pub fn outcome(a: &Answer, step: Step, ctx: &Context<'_>) -> Outcome {
    let said = format!(
        "Graph ({}) answered {} for {} with {} ({})",
        ctx.server,
        step.describe(),
        ctx.mailbox,
        a.summary(),
        a.ids()
    );
    let code = a.code().unwrap_or("").to_ascii_lowercase();
    let message = a
        .error
        .as_ref()
        .map(|e| e.message.to_ascii_lowercase())
        .unwrap_or_default();
    let advice = |id: &str| table_advice(id, ctx);
    let held = |id: &str| {
        Outcome::held(format!(
            "{said}. {} {}",
            advice(id),
            release_hint(ctx.queue_id)
        ))
    };

    match code.as_str() {
        "errorsendasdenied" => {
            return Outcome::Held {
                reason: format!(
                    "{said}. {} {}",
                    advice("graph.send-as"),
                    sender_release_hint(ctx.queue_id)
                ),
                scope: send_as_target(ctx).map_or(HoldScope::Mailbox, HoldScope::Sender),
            };
        }
        "erroraccessdenied" | "extensionerror" if message.contains("odata is disabled") => {
            return held("graph.odata-disabled");
        }
        "erroraccessdenied" if step.uses_draft() => return held("graph.drafts-denied"),
        "erroraccessdenied" => return held("graph.access-denied"),
        "mailboxnotenabledforrestapi" => return held("graph.no-mailbox"),
        "errorinvaliduser" => return held("graph.invalid-user"),
        "authorization_requestdenied" => return held("graph.directory"),
        "errorinvalidrecipients" => {
            return Outcome::Permanent {
                reason: format!("{said}. {}", advice("graph.invalid-recipients")),
            };
        }
        "errormimecontentinvalidbase64string" => {
            return Outcome::Permanent {
                reason: format!("{said}. {}", advice("graph.bad-base64")),
            };
        }
        "errormessagesizeexceeded" => {
            return Outcome::Permanent {
                reason: format!("{said}. {}", advice("graph.message-size")),
            };
        }
        _ => {}
    }
    if message.contains("submissionquotaexceeded") {
        return Outcome::Throttled {
            reason: format!(
                "{said}. {} postern holds back all mail of {} until its record of the last 24 \
                 hours frees room, then sends again; nothing bounces.",
                advice("smtp.quota"),
                ctx.mailbox
            ),
            wait: None,
        };
    }
    if a.status == 413
        || code == "requestbodytoolarge"
        || message.contains("maximum request length")
    {
        return Outcome::Transient {
            reason: format!("{said}. {}", advice("graph.too-large")),
        };
    }
    match a.status {
        429 => {
            let wait = a.retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT);
            Outcome::Throttled {
                reason: format!(
                    "{said}. {} All mail of {} waits {} (Retry-After), then one message goes first.",
                    advice("graph.throttled"),
                    ctx.mailbox,
                    humantime::format_duration(wait)
                ),
                wait: Some(wait),
            }
        }
        503 if a.retry_after.is_some() => {
            let wait = a.retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT);
            Outcome::Throttled {
                reason: format!(
                    "{said}: Graph is busy. All mail of {} waits {} (Retry-After), then one message goes first.",
                    ctx.mailbox,
                    humantime::format_duration(wait)
                ),
                wait: Some(wait),
            }
        }
        401 => held("graph.token"),
        403 => held(if step.uses_draft() {
            "graph.drafts-denied"
        } else {
            "graph.access-denied"
        }),
        404 => held("graph.not-found"),
        400 => Outcome::Permanent {
            reason: format!("{said}. Graph refused this message as malformed; it is not retried."),
        },
        s if s >= 500 => Outcome::Transient {
            reason: format!("{said}. A temporary problem at Microsoft; postern retries later."),
        },
        _ => Outcome::Transient {
            reason: format!("{said}. postern retries later."),
        },
    }
}

/// The recipients an `ErrorInvalidRecipients` answer names, out of `pending` (compared
/// case-insensitively with the addresses in its message); empty when it names none of them.
pub fn invalid_recipients(a: &Answer, pending: &[String]) -> Vec<String> {
    let Some(e) = a
        .error
        .as_ref()
        .filter(|e| e.code.eq_ignore_ascii_case("ErrorInvalidRecipients"))
    else {
        return Vec::new();
    };
    let text = e.message.to_lowercase();
    pending
        .iter()
        .filter(|p| {
            let p = p.to_lowercase();
            // Whole addresses only: "a@x.test" must not match inside "ba@x.test".
            text.match_indices(&p).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + p.len()..].chars().next();
                !before.is_some_and(is_addr_char) && !after.is_some_and(is_addr_char)
            })
        })
        .cloned()
        .collect()
}

fn is_addr_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-@".contains(c)
}

/// The diagnosis table's advice for `id`, filled in for this attempt.
fn table_advice(id: &str, ctx: &Context<'_>) -> String {
    let vars = crate::diagnosis::Vars::new()
        .set("mailbox", ctx.mailbox)
        .set("account", ctx.account)
        .set("client_id", ctx.client_id)
        .set("server", ctx.server)
        .set("queue_id", ctx.queue_id)
        .set("from", send_as_target(ctx).unwrap_or_default())
        .set(
            "app",
            format!(
                "Microsoft Entra admin center > App registrations > the app with Application (client) ID {}",
                ctx.client_id
            ),
        )
        .set(
            "login_cmd",
            format!(
                "`postern login {} --mailbox {} --for graph`",
                ctx.account, ctx.mailbox
            ),
        )
        .app_only(ctx.app_only);
    crate::diagnosis::advice(id, &vars)
}

/// Whom the mailbox tried to send as: the `From:` address, else the envelope sender,
/// whichever is not the mailbox itself; lowercase.
fn send_as_target(ctx: &Context<'_>) -> Option<String> {
    [ctx.from.unwrap_or(""), ctx.sender]
        .into_iter()
        .find(|a| !a.is_empty() && !a.eq_ignore_ascii_case(ctx.mailbox))
        .map(str::to_lowercase)
}

#[cfg(test)]
mod tests {
    use super::super::request::GraphError;
    use super::*;

    fn answer(status: u16, code: &str, message: &str) -> Answer {
        Answer {
            status,
            request_id: Some("req-1".into()),
            client_request_id: "client-1".into(),
            retry_after: None,
            location: None,
            body: Vec::new(),
            error: (!code.is_empty()).then(|| GraphError {
                code: code.into(),
                message: message.into(),
                request_id: Some("req-1".into()),
                date: Some("2026-11-29T10:00:00".into()),
            }),
        }
    }

    const CTX: Context<'static> = Context {
        server: "graph.microsoft.com",
        account: "contoso",
        client_id: "00000000-0000-0000-0000-0000000c11e7",
        app_only: true,
        mailbox: "scanner@contoso.com",
        sender: "scanner@contoso.com",
        from: Some("ceo@contoso.com"),
        queue_id: "Q1",
    };

    fn held_with(o: &Outcome, phrase: &str) -> bool {
        matches!(o, Outcome::Held { reason, scope: HoldScope::Mailbox } if reason.contains(phrase))
    }

    /// Every Graph error of microsoft-reference.md §4.5 / §9 rows 40–51, with the texts it
    /// quotes.
    #[test]
    fn every_graph_error_of_the_reference_has_its_outcome() {
        let send_as = outcome(
            &answer(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account. Cannot submit message.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(
            matches!(&send_as, Outcome::Held { scope: HoldScope::Sender(s), reason } if s == "ceo@contoso.com" && reason.contains("Add-RecipientPermission") && reason.contains("req-1") && reason.contains("client-1")),
            "{send_as:?}"
        );
        let odata = outcome(
            &answer(403, "ErrorAccessDenied", "Access to OData is disabled."),
            Step::SendMail,
            &CTX,
        );
        assert!(
            held_with(&odata, "Test-ApplicationAccessPolicy"),
            "{odata:?}"
        );
        let ext = outcome(
            &answer(
                403,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access to OData is disabled.]",
            ),
            Step::CreateDraft,
            &CTX,
        );
        assert!(held_with(&ext, "Test-ApplicationAccessPolicy"), "{ext:?}");
        let denied = outcome(
            &answer(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&denied, "Mail.Send"), "{denied:?}");
        let drafts = outcome(
            &answer(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
            Step::CreateDraft,
            &CTX,
        );
        assert!(held_with(&drafts, "Mail.ReadWrite"), "{drafts:?}");
        let no_mbx = outcome(
            &answer(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&no_mbx, "licence"), "{no_mbx:?}");
        let user = outcome(
            &answer(
                404,
                "ErrorInvalidUser",
                "The requested user 'scanner@contoso.com' is invalid.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&user, "primary SMTP address"), "{user:?}");
        assert!(matches!(
            outcome(
                &answer(
                    400,
                    "ErrorInvalidRecipients",
                    "At least one recipient isn't valid., Recipient 'x' isn't resolved."
                ),
                Step::SendMail,
                &CTX
            ),
            Outcome::Permanent { .. }
        ));
        assert!(matches!(
            outcome(
                &answer(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content."
                ),
                Step::SendMail,
                &CTX
            ),
            Outcome::Permanent { .. }
        ));
        assert!(matches!(
            outcome(&answer(413, "", ""), Step::SendMail, &CTX),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            outcome(
                &answer(
                    400,
                    "BadRequest",
                    "The maximum request length supported is 4MB."
                ),
                Step::SendMail,
                &CTX
            ),
            Outcome::Transient { .. }
        ));
        assert!(matches!(
            outcome(
                &answer(
                    400,
                    "ErrorMessageSizeExceeded",
                    "The message exceeds the maximum supported size."
                ),
                Step::SendMail,
                &CTX
            ),
            Outcome::Permanent { .. }
        ));
        let mut throttled = answer(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        );
        throttled.retry_after = Some(Duration::from_secs(7));
        assert!(matches!(
            outcome(&throttled, Step::SendMail, &CTX),
            Outcome::Throttled { wait: Some(w), .. } if w == Duration::from_secs(7)
        ));
        let bare_429 = answer(429, "", "");
        assert!(matches!(
            outcome(&bare_429, Step::SendMail, &CTX),
            Outcome::Throttled { wait: Some(w), .. } if w == DEFAULT_THROTTLE_WAIT
        ));
        let token = outcome(
            &answer(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&token, "graph.microsoft.com"), "{token:?}");
        let not_found = outcome(
            &answer(404, "ResourceNotFound", "Resource could not be discovered."),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&not_found, "graph_url"), "{not_found:?}");
        let dir = outcome(
            &answer(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            ),
            Step::SendMail,
            &CTX,
        );
        assert!(held_with(&dir, "User.Read.All"), "{dir:?}");
        let mut busy = answer(503, "", "");
        assert!(matches!(
            outcome(&busy, Step::SendMail, &CTX),
            Outcome::Transient { .. }
        ));
        busy.retry_after = Some(Duration::from_secs(3));
        assert!(matches!(
            outcome(&busy, Step::SendMail, &CTX),
            Outcome::Throttled { .. }
        ));
        assert!(matches!(
            outcome(&answer(500, "", ""), Step::SendDraft, &CTX),
            Outcome::Transient { .. }
        ));
    }

    #[test]
    fn invalid_recipients_are_found_as_whole_addresses() {
        let a = answer(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., Recipient 'a@x.test' isn't resolved. All recipients must be resolved before a message can be submitted.",
        );
        let pending = vec!["A@x.test".to_string(), "ba@x.test".to_string()];
        assert_eq!(
            invalid_recipients(&a, &pending),
            vec!["A@x.test".to_string()]
        );
        let other = answer(400, "ErrorAccessDenied", "a@x.test");
        assert!(invalid_recipients(&other, &pending).is_empty());
    }
}
