//! Exchange Online SMTP replies → [`Outcome`] plus advice, in one place.
//!
//! [`classify`] is called for every reply the SMTP client did not expect (anything but 220 to
//! the greeting and STARTTLS, 250 to EHLO/MAIL/RCPT, 235 to AUTH, 354 to DATA and 2xx after
//! the message). It decides, once, whether the attempt is
//! - **Transient**: the same message will go through later (4xx, throttling, quotas that
//!   reset on their own);
//! - **Permanent**: this message can never be delivered (5xx about the message itself);
//! - **Held**: our side is misconfigured (token, consent, SMTP AUTH switched off, Send As,
//!   a mailbox blocked by Exchange). Retrying cannot help and, for Exchange's "continuous
//!   error" throttling (5.2.25x), makes things worse; the message keeps its retries and the
//!   reason tells the admin what to change, in the words of the Exchange and Entra admin
//!   centres;
//! - for RCPT, **that recipient** Failed or Pending, unless the reply is about the sender or
//!   the tenant (then the whole message gets the verdict).
//!
//! Every reason quotes the server's full reply, then the advice. This module decides the
//! verdict (microsoft-reference.md §3.4, §3.5 and §9 rows 1–22; the unit tests below use those
//! texts); the advice's words come from [`crate::diagnosis`]'s table, filled in for the
//! mailbox and account, so the log, `postern explain`, `doctor` and the status page agree
//! (`advice_is_the_tables` checks it).

use std::time::Duration;

use super::smtp::Reply;
use super::{HoldScope, Outcome};
use crate::spool::RcptStatus;

/// Which command (or moment) a reply answered; the same code can mean different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The 220 greeting on connect.
    Greeting,
    /// EHLO (before or after STARTTLS).
    Ehlo,
    /// STARTTLS.
    StartTls,
    /// AUTH XOAUTH2 (and the empty line after a 334 challenge).
    Auth,
    /// MAIL FROM.
    Mail,
    /// RCPT TO (one recipient).
    Rcpt,
    /// The DATA command (before the message).
    Data,
    /// The reply after the message's final `.`.
    DataEnd,
}

impl Stage {
    fn describe(self, ctx: &Context<'_>) -> String {
        match self {
            Stage::Greeting => "the connection".into(),
            Stage::Ehlo => "EHLO".into(),
            Stage::StartTls => "STARTTLS".into(),
            Stage::Auth => format!("AUTH XOAUTH2 as {}", ctx.mailbox),
            Stage::Mail => format!("MAIL FROM:<{}>", ctx.sender),
            Stage::Rcpt => "RCPT TO".into(),
            Stage::Data => "DATA".into(),
            Stage::DataEnd => "the message".into(),
        }
    }
}

/// What the advice may name: who we are and what we were sending.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `host:port` of the upstream.
    pub server: &'a str,
    /// Name of the `[account.NAME]`.
    pub account: &'a str,
    /// Application (client) ID of the account's app registration.
    pub client_id: &'a str,
    /// Client credentials (secret or certificate) rather than delegated sign-in.
    pub app_only: bool,
    /// Mailbox the message is sent as (the SASL `user=`).
    pub mailbox: &'a str,
    /// Envelope sender.
    pub sender: &'a str,
    /// The address of the message's `From:` header, when the transport read it (Exchange
    /// checks Send As against it).
    pub from: Option<&'a str>,
    /// Queue id, for the "release" hint.
    pub queue_id: &'a str,
}

/// The verdict on one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The whole attempt ends with this outcome (never `Outcome::Sent`).
    Message(Outcome),
    /// Only this recipient: `Failed` (5xx) or `Pending` (4xx, try again later).
    Recipient(RcptStatus),
}

/// Classify `reply`, received at `stage`. See the module docs and the table in the tests.
pub fn classify(stage: Stage, reply: &Reply, ctx: &Context<'_>) -> Verdict {
    let what = stage.describe(ctx);
    let said = format!("{} answered {what} with \"{}\"", ctx.server, reply.text());
    let held = |advice: String| {
        Verdict::Message(Outcome::held(format!(
            "{said}. {advice} {}",
            release_hint(ctx.queue_id)
        )))
    };
    let held_sender = |advice: String| {
        Verdict::Message(Outcome::Held {
            reason: format!("{said}. {advice} {}", sender_release_hint(ctx.queue_id)),
            scope: send_as_target(&reply.text(), ctx).map_or(HoldScope::Mailbox, HoldScope::Sender),
        })
    };
    let throttled = |advice: String, wait: Option<Duration>| {
        Verdict::Message(Outcome::Throttled {
            reason: format!("{said}. {advice}"),
            wait,
        })
    };
    let transient = |advice: &str| {
        Verdict::Message(Outcome::Transient {
            reason: format!("{said}. {advice}"),
        })
    };
    let permanent = |advice: String| {
        Verdict::Message(Outcome::Permanent {
            reason: format!("{said}. {advice}"),
        })
    };
    let code = reply.code;
    let esc = reply.enhanced();
    let esc = esc.as_ref().map(|e| (e.class, e.subject, e.detail));
    let text = reply.text().to_ascii_lowercase();
    let mailbox = ctx.mailbox;
    let advice = |id: &str| table_advice(id, &reply.text(), ctx);

    // Not a failure at all where a failure was expected: the dialogue is out of step.
    if !(400..600).contains(&code) {
        return transient(
            "That reply does not fit the SMTP dialogue at this point; postern will retry on a new connection.",
        );
    }

    // TLS version complaints first: they come as 421 and would otherwise look transient.
    if matches!(esc, Some((_, 7, 66 | 67))) || text.contains("tls 1.0 and 1.1") {
        return held(advice("smtp.tls-old"));
    }

    // Replies about the sender, the mailbox or the tenant: they decide the whole message even
    // when they come in answer to RCPT.
    match esc {
        Some((5, 7, 3)) => return held(advice("smtp.auth.token-rejected")),
        Some((5, 7, 4)) if stage == Stage::Auth => return held(advice("smtp.auth.mechanism")),
        Some((5, 7, 139)) => return held(advice(auth_139(&text))),
        Some((5, 7, 30)) => return held(advice("smtp.auth.basic-retired")),
        Some((5, 7, 57)) => return held(advice("smtp.not-authenticated")),
        Some((5, 5, 124)) => return held(advice("smtp.xoauth2-data")),
        Some((_, 5, 127)) => return transient(&advice("smtp.token-expiring")),
        Some((5, 2, 252)) if text.contains("sendasdenied") => {
            return held_sender(advice("smtp.send-as"));
        }
        Some((5, 7, 60)) => return held_sender(advice("smtp.send-as")),
        Some((5, 2, d @ 251..=255)) => {
            return throttled(
                format!(
                    "{} postern holds back all mail of {mailbox} for {}, then tries one message.",
                    advice(continuous_errors(d)),
                    humantime::format_duration(CONTINUOUS_ERROR_WAIT)
                ),
                Some(CONTINUOUS_ERROR_WAIT),
            );
        }
        // "432 4.3.2 Concurrent connections limit exceeded" (or the older "sender thread
        // limit"); a "421 4.3.2 Service not available" is the server closing, below.
        Some((4, 3, 2)) if text.contains("concurrent") || text.contains("thread limit") => {
            return transient(&advice("smtp.concurrency"));
        }
        Some((5, 2, 0)) if text.contains("submissionquotaexceeded") => {
            return throttled(
                format!(
                    "{} postern holds back all mail of {mailbox} until its record of the last 24 \
                     hours frees room, then sends again; nothing bounces.",
                    advice("smtp.quota")
                ),
                None,
            );
        }
        Some((5, 7, 705)) => return held(advice("smtp.tenant-threshold")),
        Some((5, 7, 708)) => return held(advice("smtp.ip-blocked")),
        Some((5, 7, 750)) => return held(advice("smtp.unregistered-domain")),
        Some((5, 1, 8)) => return held(advice("smtp.restricted-sender")),
        Some((5, 7, 233)) if stage == Stage::Rcpt => {
            // Only external recipients are over the limit; internal ones still go.
            return Verdict::Recipient(RcptStatus::Pending);
        }
        Some((5, 7, 233)) => return transient(&advice("smtp.terrl")),
        _ => {}
    }

    // 421: the server is closing the connection, whatever we asked.
    if code == 421 {
        return transient(&advice("smtp.closing"));
    }

    if stage == Stage::Rcpt {
        return Verdict::Recipient(if code < 500 {
            RcptStatus::Pending
        } else {
            RcptStatus::Failed
        });
    }

    match esc {
        Some((5, 2, 2)) => return held(advice("smtp.mailbox-full")),
        // About this message only: other mail from the mailbox still goes, so do not hold.
        Some((5, 7, 520)) => return permanent(advice("smtp.forwarding")),
        Some((5, 3, 4)) => return permanent(advice("smtp.size")),
        _ => {}
    }

    if code < 500 {
        return transient(&advice("smtp.temporary"));
    }
    match stage {
        Stage::Greeting | Stage::Ehlo | Stage::StartTls => held(format!(
            "The server refused the session before any message was sent. Check smtp_host and \
             smtp_port of [account.{}] (Exchange Online: smtp.office365.com, port 587) and that \
             this host may connect to it.",
            ctx.account
        )),
        Stage::Auth => held(format!(
            "Exchange refused the sign-in for {mailbox}. {}",
            advice("smtp.auth.token-rejected")
        )),
        Stage::Mail => permanent(format!("Exchange refused the sender <{}>.", ctx.sender)),
        Stage::Data | Stage::DataEnd | Stage::Rcpt => {
            permanent("Exchange refused the message permanently.".into())
        }
    }
}

/// The end of every Held reason: what postern does meanwhile and how to skip the wait.
pub fn release_hint(queue_id: &str) -> String {
    format!(
        "postern pauses this mailbox and tries again every hold_retry; after fixing it, \
         `postern queue release {queue_id}` tries at once."
    )
}

/// The end of a Send As hold's reason.
pub fn sender_release_hint(queue_id: &str) -> String {
    format!(
        "postern holds only this sender's mail for the mailbox (its other mail keeps flowing) \
         and tries one held message again now and then, less often each time; after fixing it, \
         `postern queue release {queue_id}` tries at once."
    )
}

/// The diagnosis table's advice for entry `id` (what it means and how to fix it), filled in
/// for this attempt: the same words `postern explain`, `doctor` and the status page use.
fn table_advice(id: &str, reply: &str, ctx: &Context<'_>) -> String {
    let vars = crate::diagnosis::Vars::new()
        .set("mailbox", ctx.mailbox)
        .set("account", ctx.account)
        .set("client_id", ctx.client_id)
        .set("server", ctx.server)
        .set("queue_id", ctx.queue_id)
        .set("from", send_as_target(reply, ctx).unwrap_or_default())
        .set(
            "app",
            format!(
                "Microsoft Entra admin center > App registrations > the app with Application (client) ID {}",
                ctx.client_id
            ),
        )
        .set(
            "login_cmd",
            format!("`postern login {} --mailbox {}`", ctx.account, ctx.mailbox),
        )
        .app_only(ctx.app_only);
    crate::diagnosis::advice(id, &vars)
}

/// The table entry of a 535 5.7.139 variant (§3.4, §9 rows 2–6), by its reason text.
fn auth_139(text: &str) -> &'static str {
    if text.contains("disabled for the tenant") {
        "smtp.auth.tenant"
    } else if text.contains("disabled for the mailbox") {
        "smtp.auth.mailbox"
    } else if text.contains("basic authentication is disabled") {
        "smtp.auth.basic"
    } else if text.contains("did not meet the criteria") {
        "smtp.auth.conditional-access"
    } else if text.contains("security defaults") {
        "smtp.auth.security-defaults"
    } else {
        "smtp.auth.refused"
    }
}

/// Whom the mailbox tried to send as: Exchange names it in SendAsDenied ("A not allowed to
/// send as B;", checked against the From header); otherwise the From header's address, then
/// the envelope sender, whichever is not the mailbox itself. Lowercase.
fn send_as_target(reply: &str, ctx: &Context<'_>) -> Option<String> {
    const MARK: &str = "not allowed to send as ";
    if let Some(i) = reply.find(MARK) {
        let rest = &reply[i + MARK.len()..];
        let b = rest.split([';', ' ']).next().unwrap_or("").trim();
        if !b.is_empty() {
            return Some(b.to_lowercase());
        }
    }
    [ctx.from.unwrap_or(""), ctx.sender]
        .into_iter()
        .find(|a| !a.is_empty() && !a.eq_ignore_ascii_case(ctx.mailbox))
        .map(str::to_lowercase)
}

/// How long a mailbox waits after Exchange's continuous-error throttling (5.2.25x). Microsoft
/// does not say how long the block lasts and every refused submission prolongs it, so postern
/// waits an hour, then tries one message alone.
pub const CONTINUOUS_ERROR_WAIT: Duration = Duration::from_secs(3600);

/// The table entry of 550 5.2.251–255 "Sender throttled due to continuous ... errors" (§9
/// rows 12–13).
fn continuous_errors(detail: u16) -> &'static str {
    match detail {
        251 => "smtp.throttled.mailbox-full",
        252 => "smtp.throttled.send-as",
        253 => "smtp.throttled.licence",
        254 => "smtp.throttled.recipients",
        _ => "smtp.throttled.invalid-recipients",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum K {
        Transient,
        Throttled,
        Permanent,
        Held,
        RcptFailed,
        RcptPending,
    }

    fn ctx() -> Context<'static> {
        Context {
            server: "smtp.office365.com:587",
            account: "contoso",
            client_id: "11111111-2222-3333-4444-555555555555",
            app_only: true,
            mailbox: "printer@contoso.com",
            sender: "scanner@contoso.com",
            from: None,
            queue_id: "Q1",
        }
    }

    fn kind(stage: Stage, line: &str) -> (K, String) {
        let reply = Reply::from_lines([line]).unwrap();
        match classify(stage, &reply, &ctx()) {
            Verdict::Message(Outcome::Transient { reason }) => (K::Transient, reason),
            Verdict::Message(Outcome::Permanent { reason }) => (K::Permanent, reason),
            Verdict::Message(Outcome::Held { reason, .. }) => (K::Held, reason),
            Verdict::Message(Outcome::Throttled { reason, .. }) => (K::Throttled, reason),
            Verdict::Message(Outcome::Partial { .. }) => panic!("classify never says Partial"),
            Verdict::Message(Outcome::Sent { .. }) => panic!("classify never says Sent"),
            Verdict::Recipient(RcptStatus::Failed) => (K::RcptFailed, String::new()),
            Verdict::Recipient(RcptStatus::Pending) => (K::RcptPending, String::new()),
            Verdict::Recipient(RcptStatus::Sent) => panic!("classify never says Sent"),
        }
    }

    /// The real replies (microsoft-reference.md §3.4, §3.5, §9), with the outcome and a word
    /// the advice must contain.
    const TABLE: &[(Stage, &str, K, &str)] = &[
        (
            Stage::Auth,
            "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
            K::Held,
            "New-ServicePrincipal",
        ),
        (
            Stage::Auth,
            "535 5.7.3 Authentication unsuccessful [GVYP280CA0011.SWEP280.PROD.OUTLOOK.COM 2023-02-06T21:34:15.820Z 08DB0823FF6976E9]",
            K::Held,
            "SMTP.SendAsApp",
        ),
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
            K::Held,
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
        ),
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
            K::Held,
            "Set-CASMailbox -Identity printer@contoso.com -SmtpClientAuthenticationDisabled $false",
        ),
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [X 2025-11-23T11:12:20.123Z 1]",
            K::Held,
            "XOAUTH2",
        ),
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator. [X 2025-11-23T11:12:20.123Z 1]",
            K::Held,
            "Conditional Access",
        ),
        (
            Stage::Auth,
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator. [X]",
            K::Held,
            "security defaults",
        ),
        (
            Stage::Auth,
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
            K::Held,
            "smtp-legacy",
        ),
        (
            Stage::Mail,
            "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
            K::Held,
            "235",
        ),
        (
            Stage::Auth,
            "501 5.5.124 Invalid XOAUTH2 auth data",
            K::Held,
            "access token",
        ),
        (
            Stage::Auth,
            "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
            K::Transient,
            "fresh",
        ),
        (
            Stage::Ehlo,
            "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
            K::Held,
            "TLS inspection",
        ),
        (
            Stage::DataEnd,
            "554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as scanner@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.",
            K::Held,
            "-AccessRights SendAs",
        ),
        (
            Stage::Mail,
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            K::Held,
            "Add-RecipientPermission -Identity scanner@contoso.com -Trustee printer@contoso.com",
        ),
        (
            Stage::Rcpt,
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            K::Held,
            "own mailbox",
        ),
        (
            Stage::Mail,
            "550 5.2.252 Sender throttled due to continuous send as denied errors.",
            K::Throttled,
            "Add-RecipientPermission",
        ),
        (
            Stage::Mail,
            "550 5.2.251 Sender throttled due to continuous mailbox full errors.",
            K::Throttled,
            "Sent Items",
        ),
        (
            Stage::Mail,
            "550 5.2.253 Sender throttled due to continuous invalid license errors.",
            K::Throttled,
            "licence",
        ),
        (
            Stage::DataEnd,
            "550 5.2.254 Sender throttled due to continuous too many recipients errors.",
            K::Throttled,
            "prolongs",
        ),
        (
            Stage::Rcpt,
            "550 5.2.255 Sender throttled due to continuous invalid recipients errors.",
            K::Throttled,
            "invalid recipient",
        ),
        (
            Stage::Mail,
            "432 4.3.2 Concurrent connections limit exceeded.",
            K::Transient,
            "per_mailbox_concurrency = 3",
        ),
        (
            Stage::DataEnd,
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            K::Transient,
            "3 per mailbox",
        ),
        (
            Stage::Rcpt,
            "432 4.3.2 Concurrent connections limit exceeded.",
            K::Transient,
            "allows 3",
        ),
        (
            Stage::DataEnd,
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
            K::Throttled,
            "10,000, rolling",
        ),
        (
            Stage::DataEnd,
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
            K::Held,
            "Sent Items",
        ),
        (
            Stage::DataEnd,
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionQuotaExceeded",
            K::Held,
            "retention",
        ),
        (
            Stage::DataEnd,
            "451 4.7.0 Temporary server error. Please try again later. PRX4 [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM]",
            K::Transient,
            "retry",
        ),
        (
            Stage::Mail,
            "451 4.3.111 Temporary server error. Please try again later. MRH1",
            K::Transient,
            "retry",
        ),
        (
            Stage::Greeting,
            "421 4.3.2 Service not available, closing transmission channel",
            K::Transient,
            "retry",
        ),
        (
            Stage::DataEnd,
            "550 5.7.705 Access denied, tenant has exceeded threshold",
            K::Held,
            "Microsoft support",
        ),
        (
            Stage::Rcpt,
            "550 5.7.708 Access denied, traffic not accepted from this IP",
            K::Held,
            "IP address",
        ),
        (
            Stage::Mail,
            "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
            K::Held,
            "Domains",
        ),
        (
            Stage::Mail,
            "550 5.1.8 Access denied, bad outbound sender",
            K::Held,
            "Restricted entities",
        ),
        (
            Stage::DataEnd,
            "550 5.7.520 Access denied, Your organization does not allow external forwarding. Please contact your administrator for further assistance. AS(7555)",
            K::Permanent,
            "Automatic forwarding",
        ),
        (
            Stage::DataEnd,
            "550 5.7.233 Message rejected: tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit)",
            K::Transient,
            "24 hours",
        ),
        (
            Stage::Rcpt,
            "550 5.7.233 Message rejected: tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit)",
            K::RcptPending,
            "",
        ),
        (
            Stage::Rcpt,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            K::RcptFailed,
            "",
        ),
        (
            Stage::Rcpt,
            "452 4.5.3 Too many recipients",
            K::RcptPending,
            "",
        ),
        (
            Stage::DataEnd,
            "552 5.3.4 Message size exceeds fixed maximum message size",
            K::Permanent,
            "MaxSendSize",
        ),
        (
            Stage::DataEnd,
            "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal",
            K::Permanent,
            "permanently",
        ),
        (
            Stage::Mail,
            "501 5.1.7 Invalid address",
            K::Permanent,
            "sender",
        ),
        (
            Stage::Greeting,
            "554 5.7.1 Connection refused",
            K::Held,
            "smtp_host",
        ),
        (
            Stage::Auth,
            "504 5.7.4 Unrecognized authentication type",
            K::Held,
            "smtp_host",
        ),
        (Stage::Data, "250 2.0.0 OK", K::Transient, "does not fit"),
    ];

    #[test]
    fn real_replies_classify_as_documented() {
        for (stage, line, want, advice) in TABLE {
            let (got, reason) = kind(*stage, line);
            assert_eq!(&got, want, "{stage:?} {line}");
            if !matches!(got, K::RcptFailed | K::RcptPending) {
                assert!(
                    reason.contains(line),
                    "reason must quote the reply: {reason}"
                );
                assert!(
                    reason.contains(advice),
                    "{line}: advice {advice:?} missing in {reason}"
                );
            }
            if got == K::Held {
                assert!(reason.contains("`postern queue release Q1`"), "{reason}");
            }
        }
    }

    #[test]
    fn send_as_refusals_hold_only_that_sender_and_quotas_wait_for_the_window() {
        let outcome = |stage, line: &str, c: &Context<'_>| match classify(
            stage,
            &Reply::from_lines([line]).unwrap(),
            c,
        ) {
            Verdict::Message(o) => o,
            v => panic!("{v:?}"),
        };
        let held = |o| match o {
            Outcome::Held { scope, .. } => scope,
            o => panic!("not held: {o:?}"),
        };
        let wait = |o| match o {
            Outcome::Throttled { wait, .. } => wait,
            o => panic!("not throttled: {o:?}"),
        };
        const NO_SEND_AS: &str =
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
        // SendAsDenied names the address; 5.7.60 does not, so the From header decides.
        let denied = "554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as Bob@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied";
        let bob = HoldScope::Sender("bob@contoso.com".into());
        assert_eq!(held(outcome(Stage::DataEnd, denied, &ctx())), bob);
        let printer = Context {
            sender: "printer@contoso.com",
            ..ctx()
        };
        let from_bob = Context {
            from: Some("Bob@Contoso.com"),
            ..printer
        };
        assert_eq!(held(outcome(Stage::Mail, NO_SEND_AS, &from_bob)), bob);
        // Nobody to blame but the mailbox itself: the whole mailbox.
        assert_eq!(
            held(outcome(Stage::Mail, NO_SEND_AS, &printer)),
            HoldScope::Mailbox
        );
        // A token refusal holds the mailbox.
        let refused = "535 5.7.3 Authentication unsuccessful [X]";
        assert_eq!(
            held(outcome(Stage::Auth, refused, &ctx())),
            HoldScope::Mailbox
        );
        // The recipient quota waits for the window; continuous-error throttling an hour.
        let quota = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException";
        assert_eq!(wait(outcome(Stage::DataEnd, quota, &ctx())), None);
        let blocked = "550 5.2.252 Sender throttled due to continuous send as denied errors.";
        assert_eq!(
            wait(outcome(Stage::Mail, blocked, &ctx())),
            Some(CONTINUOUS_ERROR_WAIT)
        );
    }

    /// The advice in a reason is the diagnosis table's for the same reply, word for word, so
    /// the log and `postern explain` never disagree.
    #[test]
    fn advice_is_the_tables() {
        let mut checked = 0;
        for (stage, line, want, _) in TABLE {
            let (got, reason) = kind(*stage, line);
            if matches!(got, K::RcptFailed | K::RcptPending)
                || *want == K::Permanent && !line.contains("5.3.4") && !line.contains("5.7.520")
            {
                continue;
            }
            let Some(m) = crate::diagnosis::diagnose(&crate::diagnosis::evidence(line))
                .into_iter()
                .next()
            else {
                continue;
            };
            let table = table_advice(m.entry.id, line, &ctx());
            assert!(
                reason.contains(&table),
                "{line}: the reason does not carry the table's advice for {}:\n{reason}\n---\n{table}",
                m.entry.id
            );
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} replies checked");
    }

    #[test]
    fn delegated_accounts_get_delegated_advice() {
        let reply = Reply::from_lines([
            "535 5.7.3 Authentication unsuccessful [X 2025-01-01T00:00:00.000Z 1]",
        ])
        .unwrap();
        let c = Context {
            app_only: false,
            ..ctx()
        };
        let Verdict::Message(Outcome::Held { reason, .. }) = classify(Stage::Auth, &reply, &c)
        else {
            panic!("not held");
        };
        assert!(reason.contains("SMTP.Send"), "{reason}");
        assert!(reason.contains("postern login"), "{reason}");
        assert!(!reason.contains("New-ServicePrincipal"), "{reason}");
    }

    #[test]
    fn multi_line_replies_are_quoted_whole() {
        let reply = Reply::from_lines(["550-5.7.1 first part", "550 5.7.1 second part"]).unwrap();
        let Verdict::Message(Outcome::Permanent { reason }) =
            classify(Stage::DataEnd, &reply, &ctx())
        else {
            panic!("not permanent");
        };
        assert!(
            reason.contains("550-5.7.1 first part 550 5.7.1 second part"),
            "{reason}"
        );
    }
}
