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
//! Every reason quotes the server's full reply, then the advice. The table is
//! microsoft-reference.md §3.4, §3.5 and §9 rows 1–22; the unit tests below use those texts.

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

    // Not a failure at all where a failure was expected: the dialogue is out of step.
    if !(400..600).contains(&code) {
        return transient(
            "That reply does not fit the SMTP dialogue at this point; postern will retry on a new connection.",
        );
    }

    // TLS version complaints first: they come as 421 and would otherwise look transient.
    if matches!(esc, Some((_, 7, 66 | 67))) || text.contains("tls 1.0 and 1.1") {
        return held(format!(
            "Exchange says the connection used TLS 1.0 or 1.1. postern only speaks TLS 1.2 or later, \
             so a firewall or proxy between this host and {} is terminating TLS with an old version: \
             exempt this traffic from TLS inspection.",
            ctx.server
        ));
    }

    // Replies about the sender, the mailbox or the tenant: they decide the whole message even
    // when they come in answer to RCPT.
    match esc {
        Some((5, 7, 3)) => return held(token_rejected(ctx)),
        Some((5, 7, 139)) => return held(auth_139(&text, ctx)),
        Some((5, 7, 30)) => {
            return held(format!(
                "Exchange refused Basic authentication. postern signs in with OAuth (XOAUTH2), so the \
                 server did not take the XOAUTH2 login as OAuth: check that smtp_host of \
                 [account.{}] is Exchange Online (smtp.office365.com), not \
                 smtp-legacy.office365.com or another server.",
                ctx.account
            ));
        }
        Some((5, 7, 57)) => {
            return held(format!(
                "Exchange did not consider the session authenticated. postern sends MAIL only after \
                 \"235 Authentication successful\", so check that smtp_host of [account.{}] points \
                 at Exchange Online directly and that no firewall or proxy rewrites the SMTP session.",
                ctx.account
            ));
        }
        Some((5, 5, 124)) => {
            return held(format!(
                "Exchange could not read the XOAUTH2 login. The token must be an OAuth access token \
                 for SMTP ({}) for mailbox {mailbox}, not an ID token or a Microsoft Graph token.",
                if ctx.app_only {
                    "scope https://outlook.office365.com/.default"
                } else {
                    "scope https://outlook.office.com/SMTP.Send"
                }
            ));
        }
        Some((_, 5, 127)) => {
            return transient(
                "The access token was about to expire; postern gets a fresh one on the next attempt.",
            );
        }
        Some((5, 2, 252)) if text.contains("sendasdenied") => {
            return held_sender(send_as(&reply.text(), ctx));
        }
        Some((5, 7, 60)) => return held_sender(send_as(&reply.text(), ctx)),
        Some((5, 2, d @ 251..=255)) => {
            return throttled(continuous_errors(d, ctx), Some(CONTINUOUS_ERROR_WAIT));
        }
        Some((4, 3, 2)) => {
            return transient(&format!(
                "More than 3 connections were sending as {mailbox} at once; Exchange Online allows 3 \
                 per mailbox. postern will retry. Set per_mailbox_concurrency = 3 (or lower) in \
                 [delivery], and make sure no other system sends as {mailbox} at the same time."
            ));
        }
        Some((5, 2, 0)) if text.contains("submissionquotaexceeded") => {
            return throttled(
                format!(
                    "{mailbox} has sent to more than its recipient limit in the last 24 hours \
                     (Exchange Online: 10,000, rolling). postern holds back all mail of {mailbox} \
                     until its record of the last 24 hours frees room, then sends again; nothing \
                     bounces. If this recurs, lower daily_recipients of the route (other systems \
                     may send as {mailbox} too) or spread the senders over several mailboxes."
                ),
                None,
            );
        }
        Some((5, 7, 705)) => {
            return held(
                "Exchange Online has blocked the whole tenant from sending because it went over the \
                 outbound spam threshold, usually after an account was compromised. Check for \
                 compromised accounts in the Microsoft Defender portal and open a case with Microsoft \
                 support; no retry can succeed until Microsoft lifts the block."
                    .into(),
            );
        }
        Some((5, 7, 708)) => {
            return held(
                "Exchange Online does not accept mail from this host's public IP address (poor \
                 reputation). Contact Microsoft support to have it removed from the block, or relay \
                 from another IP address; no retry can succeed until then."
                    .into(),
            );
        }
        Some((5, 7, 750)) => {
            return held(
                "The tenant is blocked from sending from domains it has not registered. Add and verify \
                 the sender's domain in the Microsoft 365 admin center (Settings > Domains), or \
                 contact Microsoft support."
                    .into(),
            );
        }
        Some((5, 1, 8)) => {
            return held(format!(
                "{mailbox} is on Exchange Online's list of restricted senders (blocked for sending \
                 spam, usually after a compromise). Secure the account, then remove it in the \
                 Microsoft Defender portal: Email & collaboration > Review > Restricted entities."
            ));
        }
        Some((5, 7, 233)) if stage == Stage::Rcpt => {
            // Only external recipients are over the limit; internal ones still go.
            return Verdict::Recipient(RcptStatus::Pending);
        }
        Some((5, 7, 233)) => {
            return transient(
                "The tenant reached its daily limit for mail to external recipients (tenant external \
                 recipient rate limit). postern will retry; the limit frees over 24 hours. Reduce or \
                 spread the external volume if this recurs.",
            );
        }
        _ => {}
    }

    // 421: the server is closing the connection, whatever we asked.
    if code == 421 {
        return transient("The server closed the session; postern will retry with backoff.");
    }

    if stage == Stage::Rcpt {
        return Verdict::Recipient(if code < 500 {
            RcptStatus::Pending
        } else {
            RcptStatus::Failed
        });
    }

    match esc {
        Some((5, 2, 2)) => {
            return held(format!(
                "Mailbox {mailbox} is full. Exchange saves every message sent with SMTP AUTH to Sent \
                 Items: empty or archive Sent Items, or give it a retention policy (Exchange admin \
                 center > Recipients > Mailboxes > {mailbox})."
            ));
        }
        Some((5, 7, 520)) => {
            // About this message only: other mail from the mailbox still goes, so do not hold.
            return permanent(
                "Exchange detected this message as automatically forwarded and the outbound spam \
                 policy blocks forwarding to external recipients. Allow it in the Microsoft Defender \
                 portal (Email & collaboration > Policies & rules > Threat policies > Anti-spam > \
                 Anti-spam outbound policy > Automatic forwarding rules), or send it as new mail."
                    .into(),
            );
        }
        Some((5, 3, 4)) => {
            return permanent(format!(
                "The message is larger than Exchange accepts for {mailbox} (35 MB by default, at most \
                 150 MB). Raise the limit with `Set-Mailbox -Identity {mailbox} -MaxSendSize 150MB` \
                 (Exchange admin center > Recipients > Mailboxes > {mailbox} > Mailbox settings > \
                 Message size restrictions), then resend."
            ));
        }
        _ => {}
    }

    if code < 500 {
        return transient("Exchange reports a temporary problem; postern will retry with backoff.");
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
            token_rejected(ctx)
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

/// 535 5.7.3: the token was not good enough (§9 row 1).
fn token_rejected(ctx: &Context<'_>) -> String {
    let mailbox = ctx.mailbox;
    if ctx.app_only {
        format!(
            "Exchange Online rejected the access token for {mailbox}. For an app that signs in with \
             its own credentials: (1) in Exchange Online PowerShell run `New-ServicePrincipal -AppId \
             {client} -ObjectId <Object ID>` with the Object ID shown under Microsoft Entra admin \
             center > Enterprise applications (not the one under App registrations); (2) run \
             `Add-MailboxPermission -Identity {mailbox} -User <that Object ID> -AccessRights \
             FullAccess`; (3) under App registrations > API permissions add Office 365 Exchange \
             Online > Application permissions > SMTP.SendAsApp and select \"Grant admin consent\". \
             Changes can take up to an hour to apply.",
            client = ctx.client_id
        )
    } else {
        format!(
            "Exchange Online rejected the access token for {mailbox}. The token must carry the \
             delegated permission SMTP.Send: under Microsoft Entra admin center > App registrations \
             > {client} > API permissions add Microsoft Graph > Delegated permissions > SMTP.Send \
             (and grant consent), then sign in again with `postern login`. The signed-in user must \
             be {mailbox} itself or have Full Access to it (shared mailbox).",
            client = ctx.client_id
        )
    }
}

/// 535 5.7.139 and its variants (§3.4, §9 rows 2–6).
fn auth_139(text: &str, ctx: &Context<'_>) -> String {
    let mailbox = ctx.mailbox;
    if text.contains("disabled for the tenant") {
        format!(
            "SMTP AUTH is turned off for the whole organization. In Exchange Online PowerShell run \
             `Set-TransportConfig -SmtpClientAuthenticationDisabled $false` (Exchange admin center > \
             Settings > Mail flow: clear \"Turn off SMTP AUTH protocol for your organization\"), or \
             enable it for this mailbox only with `Set-CASMailbox -Identity {mailbox} \
             -SmtpClientAuthenticationDisabled $false`."
        )
    } else if text.contains("disabled for the mailbox") {
        format!(
            "SMTP AUTH is turned off for mailbox {mailbox}. Run `Set-CASMailbox -Identity {mailbox} \
             -SmtpClientAuthenticationDisabled $false` (Microsoft 365 admin center > Users > Active \
             users > {mailbox} > Mail > Manage email apps: tick \"Authenticated SMTP\"). Changes can \
             take up to an hour to apply."
        )
    } else if text.contains("basic authentication is disabled") {
        format!(
            "Exchange took the sign-in for Basic authentication (a password), which is disabled. \
             postern signs in with OAuth (XOAUTH2): check that smtp_host of [account.{}] is \
             Exchange Online and that nothing between rewrites the AUTH command.",
            ctx.account
        )
    } else if text.contains("did not meet the criteria") {
        format!(
            "A Conditional Access policy (or an MFA requirement) blocked the sign-in for {mailbox}. \
             In Microsoft Entra admin center > Protection > Conditional Access, find the policy in \
             the sign-in logs of {mailbox} and exclude this app ({}) or this location from it.",
            ctx.client_id
        )
    } else if text.contains("security defaults") {
        "Security defaults block this sign-in. Replace security defaults with Conditional Access \
         policies (Microsoft Entra admin center > Identity > Overview > Properties > Manage \
         security defaults) that allow this app's OAuth sign-in."
            .into()
    } else {
        format!(
            "Exchange refused the sign-in for {mailbox}. Usual causes: SMTP AUTH turned off for the \
             organization (`Set-TransportConfig -SmtpClientAuthenticationDisabled $false`) or the \
             mailbox (`Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false`), \
             or a Conditional Access policy / security defaults blocking it."
        )
    }
}

/// 554 5.2.252 SendAsDenied / 550 5.7.60 (§9 rows 10–11).
fn send_as(reply: &str, ctx: &Context<'_>) -> String {
    format!(
        "Mailbox {mailbox} may not send as {who}. {fix} postern holds instead of retrying: \
         repeated SendAsDenied errors make Exchange block {mailbox} (550 5.2.252 Sender \
         throttled).",
        mailbox = ctx.mailbox,
        who = send_as_target(reply, ctx)
            .map(|a| format!("<{a}>"))
            .unwrap_or_else(|| "the message's From address".into()),
        fix = send_as_fix(reply, ctx)
    )
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

fn send_as_fix(reply: &str, ctx: &Context<'_>) -> String {
    let mailbox = ctx.mailbox;
    let who = send_as_target(reply, ctx).unwrap_or_else(|| "<From address>".into());
    format!(
        "Either route this sender to its own mailbox (a route without a fixed `mailbox` sends \
         each sender as itself), or grant Send As: `Add-RecipientPermission -Identity {who} \
         -Trustee {mailbox} -AccessRights SendAs` (Exchange admin center > Recipients > \
         Mailboxes > {who} > Delegation > Send as)."
    )
}

/// How long a mailbox waits after Exchange's continuous-error throttling (5.2.25x). Microsoft
/// does not say how long the block lasts and every refused submission prolongs it, so postern
/// waits an hour, then tries one message alone.
pub const CONTINUOUS_ERROR_WAIT: Duration = Duration::from_secs(3600);

/// 550 5.2.251–255 "Sender throttled due to continuous ... errors" (§9 rows 12–13).
fn continuous_errors(detail: u16, ctx: &Context<'_>) -> String {
    let (what, fix) = match detail {
        251 => (
            "mailbox full",
            "Empty or archive Sent Items of the mailbox.".to_string(),
        ),
        252 => ("send as denied", send_as_fix("", ctx)),
        253 => (
            "invalid license",
            "Assign an Exchange Online licence to the mailbox.".to_string(),
        ),
        254 => (
            "too many recipients",
            "Send to fewer recipients per message (500 at most).".to_string(),
        ),
        _ => (
            "invalid recipients",
            "Correct or remove the invalid recipient addresses.".to_string(),
        ),
    };
    format!(
        "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after \
         repeated \"{what}\" errors; Microsoft support cannot lift it, and every retry prolongs it. \
         postern holds back all mail of {mailbox} for {wait}, then tries one message. Fix the \
         cause meanwhile: {fix}",
        mailbox = ctx.mailbox,
        wait = humantime::format_duration(CONTINUOUS_ERROR_WAIT)
    )
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
            "New-ServicePrincipal",
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
