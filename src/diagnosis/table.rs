//! The entries. Sources: microsoft-reference.md §1.7 (AADSTS), §3.4–§3.5 (Exchange SMTP),
//! §4.5 (Graph) and §9 (rows 1–52); plus what postern itself says when it holds mail.
//!
//! Placeholders in `meaning`, causes and fix steps: `{mailbox}` (the mailbox postern sends
//! as), `{from}` (the address it tried to send as), `{account}`, `{client_id}`, `{tenant}`,
//! `{server}`, `{app}` (the app registration in the Entra admin centre), `{secret_place}`,
//! `{login_cmd}`, `{permission}`, `{scope}`, `{cert}`, `{cloud}`, `{queue_id}`. Unknown ones
//! are shown generically (see `render.rs`).

use super::Sign::{Aadsts, EntraError, Graph, Phrase, Reply, Smtp};
use super::When::{AppOnly, Delegated};
use super::{Entry, Sign, Step, When};

const fn s(esc: (u8, u16, u16)) -> Sign {
    Smtp { esc, text: None }
}
const fn st(esc: (u8, u16, u16), text: &'static str) -> Sign {
    Smtp {
        esc,
        text: Some(text),
    }
}
const fn g(code: &'static str) -> Sign {
    Graph {
        code,
        message: None,
    }
}
const fn gm(code: &'static str, message: &'static str) -> Sign {
    Graph {
        code,
        message: Some(message),
    }
}
const fn all(text: &'static str) -> Step {
    Step {
        when: When::Always,
        text,
    }
}
const fn app(text: &'static str) -> Step {
    Step {
        when: AppOnly,
        text,
    }
}
const fn del(text: &'static str) -> Step {
    Step {
        when: Delegated,
        text,
    }
}

const HOLD: &str = "Holds the mailbox's messages without spending their retries, tries one again every hold_retry, and sends them all as soon as one gets through; `postern queue release ID` tries at once.";
const HOLD_SENDER: &str = "Holds only the messages that need this Send As right, without spending their retries; the mailbox's other mail keeps flowing.";
const RETRY: &str =
    "Retries with backoff; the message keeps its place in the queue until max_lifetime.";
const WAIT: &str = "Keeps the mailbox's messages queued without spending their retries until the block lifts, then sends one first to see whether it has.";
const FAIL: &str = "Fails this message (a delivery status notification goes to its sender); other mail is not affected.";
const RCPT_FAIL: &str = "Fails this recipient only (a delivery status notification goes to the sender); the other recipients are delivered.";

/// Every known error, in the order of microsoft-reference.md §9, then postern's own.
pub static TABLE: &[Entry] = &[
    // ---------------------------------------------------------------- Exchange SMTP (§9 1–22)
    Entry {
        id: "smtp.auth.token-rejected",
        rows: &[1],
        title: "Exchange Online rejected the access token (535 5.7.3)",
        signs: &[s((5, 7, 3))],
        meaning: "Exchange Online did not accept the OAuth access token postern sent with AUTH XOAUTH2 for {mailbox}. The token itself was issued by Entra, so the sign-in worked; what is missing is the permission to use it for SMTP as this mailbox.",
        causes: &[
            "App-only: the app has no service principal in Exchange Online (New-ServicePrincipal was never run, or run with the App registration's Object ID instead of the Enterprise application's)",
            "App-only: the service principal has no Full Access to {mailbox} (Add-MailboxPermission) and no RBAC role 'Application SMTP.SendAsApp' scoped to it",
            "App-only: the API permission SMTP.SendAsApp (Office 365 Exchange Online) is missing or has no admin consent",
            "Delegated: the token lacks SMTP.Send, or the signed-in user is neither {mailbox} nor has Full Access to it",
            "The token is for another API (a Microsoft Graph token sent to SMTP), or it expired",
            "A change made in the last hour has not reached Exchange Online yet",
        ],
        fix: &[
            app(
                "In Exchange Online PowerShell run `New-ServicePrincipal -AppId {client_id} -ObjectId <Object ID>` with the Object ID shown under Microsoft Entra admin center > Enterprise applications (not the one under App registrations)",
            ),
            app(
                "Run `Add-MailboxPermission -Identity {mailbox} -User <that Object ID> -AccessRights FullAccess`",
            ),
            app(
                "Under {app} > API permissions add Office 365 Exchange Online > Application permissions > SMTP.SendAsApp and select \"Grant admin consent\"",
            ),
            del(
                "The token must carry the delegated permission SMTP.Send: under {app} > API permissions add Office 365 Exchange Online > Delegated permissions > SMTP.Send (and grant consent), then sign in again with {login_cmd}",
            ),
            del(
                "The signed-in user must be {mailbox} itself or have Full Access to it (shared mailbox): `Add-MailboxPermission -Identity {mailbox} -User <user> -AccessRights FullAccess`",
            ),
            all(
                "Changes can take up to an hour to apply; `postern doctor` tries the sign-in without sending mail",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.mechanism",
        rows: &[],
        title: "The server does not accept AUTH XOAUTH2 (504 5.7.4)",
        signs: &[s((5, 7, 4))],
        meaning: "{server} does not know the XOAUTH2 mechanism on this connection.",
        causes: &[
            "smtp_host points at a server that is not Exchange Online",
            "Something between this host and Exchange rewrites the SMTP session",
        ],
        fix: &[all(
            "Set smtp_host of [account.{account}] to smtp.office365.com (port 587), and exempt this traffic from SMTP inspection on firewalls",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.tenant",
        rows: &[2],
        title: "SMTP AUTH is turned off for the whole tenant (535 5.7.139)",
        signs: &[st((5, 7, 139), "disabled for the Tenant")],
        meaning: "Exchange Online refuses every SMTP AUTH sign-in in this tenant, OAuth included. Tenants created after January 2020 start with it off.",
        causes: &["The organisation-wide setting SmtpClientAuthenticationDisabled is $true"],
        fix: &[
            all(
                "Turn SMTP AUTH on for {mailbox} alone (preferred): `Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false` (Microsoft 365 admin center > Users > Active users > {mailbox} > Mail > Manage email apps > Authenticated SMTP)",
            ),
            all(
                "Or for the whole tenant: `Set-TransportConfig -SmtpClientAuthenticationDisabled $false` (Exchange admin center > Settings > Mail flow > clear \"Turn off SMTP AUTH protocol for your organization\")",
            ),
            all("It can take up to an hour to apply"),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.mailbox",
        rows: &[3],
        title: "SMTP AUTH is turned off for this mailbox (535 5.7.139)",
        signs: &[st((5, 7, 139), "disabled for the Mailbox")],
        meaning: "Exchange Online refuses SMTP AUTH sign-ins for {mailbox}: the mailbox's own setting turns it off.",
        causes: &[
            "SmtpClientAuthenticationDisabled is $true on {mailbox} (the mailbox setting wins over the tenant's)",
        ],
        fix: &[
            all(
                "`Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false` (Microsoft 365 admin center > Users > Active users > {mailbox} > Mail > Manage email apps > tick Authenticated SMTP)",
            ),
            all("It can take up to an hour to apply"),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.basic",
        rows: &[4],
        title: "Basic authentication is disabled (535 5.7.139)",
        signs: &[st((5, 7, 139), "basic authentication is disabled")],
        meaning: "Exchange Online treated the sign-in as a password (Basic) login, which it no longer accepts. postern only signs in with OAuth (XOAUTH2).",
        causes: &[
            "A device or program sends to Exchange directly with a username and password instead of through postern",
            "smtp_host of [account.{account}] is not Exchange Online",
        ],
        fix: &[
            all(
                "Point the device at postern (this is what postern is for) instead of at smtp.office365.com",
            ),
            all("Check that smtp_host of [account.{account}] is smtp.office365.com"),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.conditional-access",
        rows: &[5],
        title: "Conditional Access or MFA blocks the SMTP sign-in (535 5.7.139)",
        signs: &[st((5, 7, 139), "did not meet the criteria")],
        meaning: "The sign-in was refused by a policy: Conditional Access, per-user MFA or a location or device rule.",
        causes: &[
            "A Conditional Access policy covers {mailbox} or the app and this host's location or device",
            "Per-user MFA is enforced for {mailbox}",
        ],
        fix: &[
            all(
                "Microsoft Entra admin center > Monitoring & health > Sign-in logs > the failed sign-in > Conditional Access shows which policy applied",
            ),
            all(
                "Exclude the app (app-only) or the mailbox user from that policy, or allow this host's location, under Protection > Conditional Access > Policies",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.security-defaults",
        rows: &[6],
        title: "Security defaults block the sign-in (535 5.7.139)",
        signs: &[st((5, 7, 139), "security defaults")],
        meaning: "The tenant's security defaults block legacy sign-ins for {mailbox}.",
        causes: &["Security defaults are on and the sign-in was not OAuth (or was seen as legacy)"],
        fix: &[
            all(
                "Use OAuth (postern does): check that nothing else signs in as {mailbox} with a password",
            ),
            all(
                "Or replace security defaults with Conditional Access policies: Microsoft Entra admin center > Identity > Overview > Properties > Manage security defaults",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.refused",
        rows: &[],
        title: "Exchange refused the SMTP sign-in (535 5.7.139)",
        signs: &[s((5, 7, 139))],
        meaning: "Exchange Online refused the sign-in for {mailbox} with a reason postern does not know.",
        causes: &[
            "SMTP AUTH off for the tenant or mailbox, a policy (Conditional Access, security defaults), or Basic authentication",
        ],
        fix: &[all(
            "Read the reason after \"Authentication unsuccessful,\" and compare it with `postern explain --list`; `Get-CASMailbox -Identity {mailbox} | Format-List SmtpClientAuthenticationDisabled` and `Get-TransportConfig | Format-List SmtpClientAuthenticationDisabled` show the SMTP AUTH settings",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.auth.basic-retired",
        rows: &[7],
        title: "Basic SMTP AUTH is retired (550 5.7.30)",
        signs: &[s((5, 7, 30))],
        meaning: "Exchange Online no longer accepts passwords for SMTP client submission; only OAuth works.",
        causes: &[
            "A device or program sends to Exchange with a username and password instead of through postern",
            "smtp_host of [account.{account}] points at smtp-legacy.office365.com or another server, so the XOAUTH2 login was not taken as OAuth",
        ],
        fix: &[
            all("Point the device at postern instead of at Exchange"),
            all(
                "Check that smtp_host of [account.{account}] is Exchange Online (smtp.office365.com), not smtp-legacy.office365.com or another server",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.not-authenticated",
        rows: &[8],
        title: "Exchange did not consider the session authenticated (5.7.57)",
        signs: &[s((5, 7, 57))],
        meaning: "MAIL FROM reached Exchange without a successful sign-in on that connection.",
        causes: &[
            "A program sends to Exchange without AUTH (postern sends MAIL only after \"235 Authentication successful\")",
            "A firewall or proxy rewrites the SMTP session",
            "smtp_host points at something other than Exchange Online",
        ],
        fix: &[all(
            "postern authenticates after STARTTLS and sends MAIL only after \"235 Authentication successful\", so check that smtp_host of [account.{account}] points at Exchange Online directly and that no firewall or proxy rewrites the SMTP session",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.tls-old",
        rows: &[9],
        title: "Exchange refuses TLS 1.0 and 1.1 (421 4.7.66)",
        signs: &[
            s((4, 7, 66)),
            s((4, 7, 67)),
            Reply {
                code: 421,
                text: "TLS 1.0 and 1.1",
            },
        ],
        meaning: "Exchange saw the connection use TLS 1.0 or 1.1. postern only speaks TLS 1.2 or later.",
        causes: &[
            "A firewall or proxy between this host and {server} terminates TLS with an old version (TLS inspection)",
        ],
        fix: &[all(
            "Exempt this traffic from TLS inspection, or update the inspecting device so it speaks TLS 1.2+",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.send-as",
        rows: &[10, 11],
        title: "The mailbox may not send as the message's sender (SendAsDenied, 5.7.60)",
        signs: &[
            st((5, 2, 252), "SendAsDenied"),
            s((5, 7, 60)),
            st((5, 7, 60), "send as"),
        ],
        meaning: "{mailbox} signed in fine, but the message's From address ({from}) is another mailbox, and {mailbox} has no Send As right on it. Exchange checks the From header after DATA (5.2.252) or the sender at MAIL (5.7.60).",
        causes: &[
            "A route with a fixed mailbox carries mail whose From is another address",
            "The Send As right was never granted, or was granted less than an hour ago",
        ],
        fix: &[
            all(
                "Route this sender to its own mailbox (a route without a fixed `mailbox` sends each sender as itself)",
            ),
            all(
                "Or grant Send As: `Add-RecipientPermission -Identity {from} -Trustee {mailbox} -AccessRights SendAs` (Exchange admin center > Recipients > Mailboxes > {from} > Delegation > Send as)",
            ),
            all("Or have the device put {mailbox} in its From address"),
            all(
                "Do not let it retry blindly: repeated SendAsDenied makes Exchange block the mailbox (5.2.252 Sender throttled)",
            ),
        ],
        postern: HOLD_SENDER,
    },
    Entry {
        id: "smtp.throttled.send-as",
        rows: &[12],
        title: "Exchange blocked the mailbox after repeated Send As denials (550 5.2.252)",
        signs: &[st((5, 2, 252), "Sender throttled")],
        meaning: "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after repeated \"send as denied\" errors. Microsoft support cannot lift it, and every retry prolongs it.",
        causes: &["Mail from an address {mailbox} may not send as was retried again and again"],
        fix: &[
            all(
                "Fix Send As first: route the sender to its own mailbox, or `Add-RecipientPermission -Identity {from} -Trustee {mailbox} -AccessRights SendAs`",
            ),
            all("Then wait (hours) before releasing the messages; do not retry meanwhile"),
        ],
        postern: WAIT,
    },
    Entry {
        id: "smtp.throttled.mailbox-full",
        rows: &[13],
        title: "Exchange blocked the mailbox after repeated mailbox-full errors (550 5.2.251)",
        signs: &[s((5, 2, 251))],
        meaning: "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after repeated \"mailbox full\" errors; Microsoft support cannot lift it, and every retry prolongs it.",
        causes: &["{mailbox} is full: every SMTP AUTH message is saved to its Sent Items"],
        fix: &[all(
            "Empty or archive Sent Items of {mailbox} (or give it a retention policy), then wait before releasing the messages",
        )],
        postern: WAIT,
    },
    Entry {
        id: "smtp.throttled.licence",
        rows: &[13],
        title: "Exchange blocked the mailbox after repeated invalid-licence errors (550 5.2.253)",
        signs: &[s((5, 2, 253))],
        meaning: "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after repeated \"invalid license\" errors; Microsoft support cannot lift it, and every retry prolongs it.",
        causes: &["{mailbox} has no Exchange Online licence (or it was removed)"],
        fix: &[all(
            "Assign an Exchange Online licence to the mailbox (Microsoft 365 admin center > Users > Active users > {mailbox} > Licenses and apps), then wait before releasing the messages",
        )],
        postern: WAIT,
    },
    Entry {
        id: "smtp.throttled.recipients",
        rows: &[13],
        title: "Exchange blocked the mailbox after repeated too-many-recipients errors (550 5.2.254)",
        signs: &[s((5, 2, 254))],
        meaning: "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after repeated \"too many recipients\" errors; Microsoft support cannot lift it, and every retry prolongs it.",
        causes: &[
            "Messages with more recipients than Exchange allows per message (500) were retried",
        ],
        fix: &[all(
            "Send to fewer recipients per message (500 at most), then wait before releasing the messages",
        )],
        postern: WAIT,
    },
    Entry {
        id: "smtp.throttled.invalid-recipients",
        rows: &[13],
        title: "Exchange blocked the mailbox after repeated invalid-recipient errors (550 5.2.255)",
        signs: &[s((5, 2, 255))],
        meaning: "Exchange has blocked {mailbox} from sending over SMTP AUTH for a period it chooses, after repeated \"invalid recipients\" errors; Microsoft support cannot lift it, and every retry prolongs it.",
        causes: &["A device keeps sending to addresses that do not exist"],
        fix: &[all(
            "Correct or remove the invalid recipient addresses in the device, then wait before releasing the messages",
        )],
        postern: WAIT,
    },
    Entry {
        id: "smtp.concurrency",
        rows: &[14],
        title: "Too many connections for one mailbox (432 4.3.2)",
        signs: &[
            st((4, 3, 2), "Concurrent connections"),
            st((4, 3, 2), "thread limit"),
        ],
        meaning: "More than 3 connections were sending as {mailbox} at once; Exchange Online allows 3 per mailbox.",
        causes: &[
            "per_mailbox_concurrency in [delivery] is above 3",
            "Another system (a second postern, a scanner sending directly) sends as {mailbox} at the same time",
        ],
        fix: &[all(
            "postern will retry. Set per_mailbox_concurrency = 3 (or lower) in [delivery], and make sure no other system sends as {mailbox} at the same time",
        )],
        postern: RETRY,
    },
    Entry {
        id: "smtp.quota",
        rows: &[15],
        title: "The mailbox sent to more than 10,000 recipients in 24 hours (554 5.2.0)",
        signs: &[st((5, 2, 0), "SubmissionQuotaExceeded")],
        meaning: "{mailbox} has sent to more than its recipient limit in the last 24 hours (Exchange Online: 10,000, rolling, per mailbox).",
        causes: &["A burst of mail from one device or app through one mailbox"],
        fix: &[
            all("Wait: the limit frees gradually over up to 24 hours"),
            all(
                "If it recurs, lower daily_recipients of the route (other systems may send as {mailbox} too) or spread the senders over several mailboxes (one route per group of senders)",
            ),
        ],
        postern: WAIT,
    },
    Entry {
        id: "smtp.mailbox-full",
        rows: &[16],
        title: "The sending mailbox is full (554 5.2.2)",
        signs: &[s((5, 2, 2))],
        meaning: "Mailbox {mailbox} is full. Exchange saves every message sent with SMTP AUTH to Sent Items.",
        causes: &["Sent Items of {mailbox} filled the mailbox quota"],
        fix: &[
            all(
                "Empty or archive Sent Items, or give it a retention policy (Exchange admin center > Recipients > Mailboxes > {mailbox})",
            ),
            all("Graph routes can avoid it: they send with saveToSentItems = false"),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.temporary",
        rows: &[17],
        title: "Exchange had a temporary problem (451 4.7.0)",
        signs: &[st((4, 7, 0), "Temporary server error"), s((4, 3, 111))],
        meaning: "A transient error inside Exchange Online.",
        causes: &["Exchange Online is busy or a back-end server failed over"],
        fix: &[all(
            "Nothing: postern will retry with backoff. If it lasts for hours, check the Microsoft 365 Service health page",
        )],
        postern: RETRY,
    },
    Entry {
        id: "smtp.closing",
        rows: &[],
        title: "The server closed the session (421)",
        signs: &[Reply {
            code: 421,
            text: "",
        }],
        meaning: "{server} is closing the connection (overloaded, restarting, or it dislikes this client).",
        causes: &[
            "A transient condition at the server",
            "Too many connections from this host",
        ],
        fix: &[all(
            "Nothing if it is occasional; postern will retry with backoff",
        )],
        postern: RETRY,
    },
    Entry {
        id: "smtp.tenant-threshold",
        rows: &[18],
        title: "The tenant is blocked for outbound spam (550 5.7.705)",
        signs: &[s((5, 7, 705))],
        meaning: "Exchange Online has blocked the whole tenant from sending because it went over the outbound spam threshold, usually after an account was compromised.",
        causes: &[
            "A compromised account sent spam",
            "A device or app sent a large volume that looked like spam",
        ],
        fix: &[all(
            "Check for compromised accounts in the Microsoft Defender portal and open a case with Microsoft support; no retry can succeed until Microsoft lifts the block",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.ip-blocked",
        rows: &[18],
        title: "Exchange does not accept mail from this IP address (550 5.7.708)",
        signs: &[s((5, 7, 708))],
        meaning: "Exchange Online does not accept mail from this host's public IP address (poor reputation).",
        causes: &["The public IP address (or its range) is on Microsoft's block list"],
        fix: &[all(
            "Contact Microsoft support to have it removed from the block, or relay from another IP address; no retry can succeed until then",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.unregistered-domain",
        rows: &[18],
        title: "The tenant may not send from an unregistered domain (5.7.750)",
        signs: &[s((5, 7, 750))],
        meaning: "The tenant is blocked from sending from domains it has not registered.",
        causes: &["The sender's domain is not an accepted domain of the tenant"],
        fix: &[all(
            "Add and verify the sender's domain in the Microsoft 365 admin center (Settings > Domains), or contact Microsoft support",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.restricted-sender",
        rows: &[19],
        title: "The mailbox is on the restricted senders list (550 5.1.8)",
        signs: &[s((5, 1, 8))],
        meaning: "{mailbox} is on Exchange Online's list of restricted senders (blocked for sending spam, usually after a compromise).",
        causes: &[
            "The account was compromised and sent spam",
            "A device sent a volume that looked like spam",
        ],
        fix: &[all(
            "Secure the account, then remove it in the Microsoft Defender portal: Email & collaboration > Review > Restricted entities",
        )],
        postern: HOLD,
    },
    Entry {
        id: "smtp.forwarding",
        rows: &[20],
        title: "Automatic forwarding to external recipients is blocked (550 5.7.520)",
        signs: &[s((5, 7, 520))],
        meaning: "Exchange detected this message as automatically forwarded and the outbound spam policy blocks forwarding to external recipients.",
        causes: &[
            "The message carries headers of an auto-forward",
            "The outbound spam policy's automatic forwarding rule is Off (the default)",
        ],
        fix: &[all(
            "Allow it in the Microsoft Defender portal (Email & collaboration > Policies & rules > Threat policies > Anti-spam > Anti-spam outbound policy > Automatic forwarding rules), or send it as new mail",
        )],
        postern: FAIL,
    },
    Entry {
        id: "smtp.terrl",
        rows: &[21],
        title: "The tenant reached its daily limit for external recipients (550 5.7.233)",
        signs: &[s((5, 7, 233))],
        meaning: "The tenant reached its daily limit for mail to external recipients (tenant external recipient rate limit, based on its licence count).",
        causes: &["A burst of mail to external addresses from the whole tenant"],
        fix: &[all(
            "Wait: the limit frees over 24 hours. Reduce or spread the external volume if this recurs",
        )],
        postern: "Retries the external recipients later; internal recipients still go.",
    },
    Entry {
        id: "smtp.xoauth2-data",
        rows: &[22],
        title: "Exchange could not read the XOAUTH2 login (501 5.5.124)",
        signs: &[s((5, 5, 124))],
        meaning: "The XOAUTH2 string did not hold a usable access token for {mailbox}.",
        causes: &[
            "The token is an ID token or a Microsoft Graph token, not one for SMTP",
            "The SASL string is malformed",
        ],
        fix: &[
            app(
                "The token must be an OAuth access token for SMTP (scope https://outlook.office365.com/.default) for mailbox {mailbox}, not an ID token or a Microsoft Graph token",
            ),
            del(
                "The token must be an OAuth access token for SMTP (scope https://outlook.office.com/SMTP.Send) for mailbox {mailbox}, not an ID token or a Microsoft Graph token",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "smtp.token-expiring",
        rows: &[22],
        title: "The access token was about to expire (501 5.5.127)",
        signs: &[s((5, 5, 127))],
        meaning: "Exchange (smtp-hve) refuses tokens that expire within minutes.",
        causes: &["The token was used too close to its expiry"],
        fix: &[all(
            "Nothing: postern refreshes tokens 10 minutes before expiry and gets a fresh one on the next attempt; check this host's clock (timedatectl) if it recurs",
        )],
        postern: RETRY,
    },
    Entry {
        id: "smtp.size",
        rows: &[],
        title: "The message is larger than Exchange accepts (552 5.3.4)",
        signs: &[s((5, 3, 4))],
        meaning: "The message is larger than Exchange accepts for {mailbox} (35 MB by default, at most 150 MB).",
        causes: &[
            "A large scan or attachment",
            "The mailbox's MaxSendSize is lower than the message",
        ],
        fix: &[all(
            "Raise the limit with `Set-Mailbox -Identity {mailbox} -MaxSendSize 150MB` (Exchange admin center > Recipients > Mailboxes > {mailbox} > Mailbox settings > Message size restrictions), then resend",
        )],
        postern: FAIL,
    },
    Entry {
        id: "smtp.recipient-unknown",
        rows: &[],
        title: "The recipient does not exist (550 5.1.10)",
        signs: &[s((5, 1, 10)), s((5, 1, 1))],
        meaning: "Exchange does not know this recipient address.",
        causes: &[
            "A typing error in the address",
            "The mailbox was deleted or renamed",
        ],
        fix: &[all("Correct the recipient address in the device or app")],
        postern: RCPT_FAIL,
    },
    // ---------------------------------------------------------------- Entra (§9 23–39, §1.7)
    Entry {
        id: "entra.secret-wrong",
        rows: &[23],
        title: "The client secret is wrong (AADSTS7000215)",
        signs: &[Aadsts(7000215)],
        meaning: "The client secret is wrong: Entra did not accept the secret of app {client_id}.",
        causes: &[
            "The Secret ID was copied instead of the secret's Value",
            "The secret was deleted or replaced in Entra",
            "The file holds extra characters (quotes, a BOM)",
        ],
        fix: &[all(
            "{app} > Certificates & secrets > Client secrets: paste the secret Value, not the Secret ID, into {secret_place}; if the Value is lost, click New client secret and copy its Value (it is shown only once)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.secret-expired",
        rows: &[24],
        title: "The client secret has expired (AADSTS7000222)",
        signs: &[Aadsts(7000222), Phrase("the client secret expired on")],
        meaning: "The client secret has expired: the secret of app {client_id} is past its Expires date.",
        causes: &[
            "Client secrets expire after at most 24 months (6 to 12 by policy in many tenants)",
        ],
        fix: &[
            all(
                "{app} > Certificates & secrets > New client secret; copy the Value into {secret_place} and update secret_expires",
            ),
            all(
                "Or switch the account to a certificate (auth = \"certificate\"), which can live longer",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "entra.app-not-found",
        rows: &[25],
        title: "The application was not found in the tenant (AADSTS700016)",
        signs: &[Aadsts(700016)],
        meaning: "Application {client_id} was not found in tenant {tenant}.",
        causes: &[
            "client_id is wrong (an Object ID or another app's ID)",
            "tenant is wrong",
            "A multi-tenant app was never consented in this tenant",
        ],
        fix: &[all(
            "Compare client_id with Microsoft Entra admin center > App registrations > your app > Overview > Application (client) ID, and tenant with Directory (tenant) ID; an app registered in another tenant needs admin consent in {tenant} (Enterprise applications)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.single-tenant",
        rows: &[26],
        title: "A single-tenant app used /common (AADSTS50194)",
        signs: &[Aadsts(50194)],
        meaning: "The app is single-tenant but the request used /common or /organizations.",
        causes: &["tenant = \"common\" or \"organizations\" in the account"],
        fix: &[all(
            "Set tenant to the Directory (tenant) ID shown in {app} > Overview (or make the app multi-tenant under Authentication > Supported account types)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.tenant-not-found",
        rows: &[27],
        title: "The tenant was not found (AADSTS90002)",
        signs: &[Aadsts(90002)],
        meaning: "Tenant {tenant} was not found in the {cloud} cloud.",
        causes: &[
            "A typing error in tenant",
            "The tenant lives in another cloud (GCC High, DoD, 21Vianet)",
        ],
        fix: &[all(
            "Compare tenant with Microsoft Entra admin center > Overview > Tenant ID or Primary domain, and check cloud = global | usgov | usgov-dod | china (a GCC High or 21Vianet tenant does not exist in the global cloud)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.consent",
        rows: &[28],
        title: "Nobody consented to the permission (AADSTS65001)",
        signs: &[Aadsts(65001), EntraError("consent_required")],
        meaning: "Nobody has consented to the permission postern needs.",
        causes: &[
            "The API permission was added but \"Grant admin consent\" was never clicked",
            "User consent is disabled in the tenant",
        ],
        fix: &[all(
            "{app} > API permissions > Add a permission > {permission} > Grant admin consent for the tenant",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.mfa",
        rows: &[29],
        title: "Multi-factor authentication is required (AADSTS50076)",
        signs: &[Aadsts(50076)],
        meaning: "Multi-factor authentication is required for this sign-in.",
        causes: &[
            "A Conditional Access policy requiring MFA now applies (new location, policy change)",
            "Per-user MFA was turned on",
        ],
        fix: &[all(
            "Run {login_cmd} and complete MFA; a Conditional Access policy requiring MFA applies (Microsoft Entra admin center > Protection > Conditional Access)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.mfa-registration",
        rows: &[30],
        title: "The user must register for MFA (AADSTS50079)",
        signs: &[Aadsts(50079)],
        meaning: "The user must register for multi-factor authentication before signing in.",
        causes: &["MFA registration is enforced and the mailbox user never registered"],
        fix: &[all(
            "Sign in as the mailbox user once at https://aka.ms/mfasetup, then run {login_cmd}",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.conditional-access",
        rows: &[31],
        title: "Conditional Access blocked the sign-in (AADSTS53003)",
        signs: &[Aadsts(53003)],
        meaning: "Conditional Access blocked the sign-in.",
        causes: &[
            "A policy blocks this location, device or app",
            "A policy requires a compliant device",
        ],
        fix: &[all(
            "Microsoft Entra admin center > Monitoring & health > Sign-in logs > this sign-in > Conditional Access shows the policy; exclude this app or user, or allow this location or device, under Protection > Conditional Access",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.refresh-expired",
        rows: &[32],
        title: "The refresh token expired after 90 days unused (AADSTS700082)",
        signs: &[Aadsts(700082)],
        meaning: "The refresh token expired after 90 days without use.",
        causes: &[
            "The mailbox sent nothing for 90 days and postern was not running to refresh it",
            "The token file was restored from an old backup",
        ],
        fix: &[all(
            "Sign the mailbox in again: {login_cmd} (postern refreshes idle tokens weekly while it runs)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.grant-revoked",
        rows: &[33],
        title: "The sign-in was revoked or expired (AADSTS50173 / 70043)",
        signs: &[Aadsts(50173), Aadsts(70043), Aadsts(70000), Aadsts(70008)],
        meaning: "The sign-in was revoked or has expired (password change, admin revocation or a Conditional Access sign-in frequency).",
        causes: &[
            "The user's password changed",
            "An admin revoked the user's sessions",
            "A Conditional Access sign-in frequency applies",
        ],
        fix: &[all(
            "Sign the mailbox in again: {login_cmd}; if it recurs, check Microsoft Entra admin center > Protection > Conditional Access > Session > Sign-in frequency for this user",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.password",
        rows: &[34],
        title: "Invalid username or password (AADSTS50126)",
        signs: &[Aadsts(50126)],
        meaning: "Invalid username or password (a password grant).",
        causes: &["A password (ROPC) sign-in was tried; postern never uses one"],
        fix: &[all(
            "Use {login_cmd} (device code or browser sign-in) instead of a password",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.scope",
        rows: &[35],
        title: "The scope is not valid (AADSTS70011 / 700022)",
        signs: &[Aadsts(70011), Aadsts(700022), Aadsts(1002012)],
        meaning: "The scope postern asked for is not valid (a wrong resource, or several resources in one request).",
        causes: &[
            "An endpoint override (graph_url, smtp resources) of the account is wrong for its cloud",
        ],
        fix: &[all(
            "postern asked for \"{scope}\"; check the graph_url / smtp resource overrides of this account for cloud {cloud}: one resource per request, exact scope strings",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.resource",
        rows: &[36],
        title: "The API is not present in the tenant (AADSTS500011)",
        signs: &[Aadsts(500011)],
        meaning: "The API (resource) is not present in this tenant.",
        causes: &[
            "The tenant has no Exchange Online (no licence ever assigned)",
            "A wrong resource URI for the cloud",
        ],
        fix: &[all(
            "Check the account's cloud and endpoint overrides; for SMTP the tenant needs Exchange Online (Microsoft Entra admin center > Enterprise applications > Office 365 Exchange Online must exist)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.assertion",
        rows: &[37],
        title: "Entra rejected the certificate assertion (AADSTS700027 / 50012)",
        signs: &[Aadsts(700027), Aadsts(50012)],
        meaning: "Entra rejected the certificate assertion (certificate not uploaded to the app, key and certificate mismatch, or clock skew).",
        causes: &[
            "The certificate was never uploaded to the app, or another one was",
            "The private key does not belong to the certificate",
            "This host's clock is off by more than a few minutes",
        ],
        fix: &[all(
            "{app} > Certificates & secrets > Certificates > Upload certificate ({cert}); check the thumbprint Entra shows matches `postern check`, and that this host's clock is right (timedatectl)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.no-credential",
        rows: &[38],
        title: "The app needs a credential (AADSTS7000218)",
        signs: &[Aadsts(7000218)],
        meaning: "The request had no client secret or certificate and the app is not a public client.",
        causes: &["A delegated account without a secret, and \"Allow public client flows\" is off"],
        fix: &[all(
            "For device-code login: {app} > Authentication > Advanced settings > Allow public client flows = Yes; otherwise give the account a client secret or certificate",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.device-pending",
        rows: &[39],
        title: "The device sign-in is not finished yet (authorization_pending)",
        signs: &[EntraError("authorization_pending"), Aadsts(70016)],
        meaning: "The user has not finished the device code sign-in yet.",
        causes: &["The code was not entered yet at the verification page"],
        fix: &[all(
            "Open the verification page shown by `postern login` and enter the code; postern keeps polling",
        )],
        postern: "Keeps polling until the code expires.",
    },
    Entry {
        id: "entra.device-expired",
        rows: &[39],
        title: "The device code expired (expired_token)",
        signs: &[EntraError("expired_token"), Aadsts(70019)],
        meaning: "The device code expired before the sign-in was finished (after 15 minutes).",
        causes: &["Nobody entered the code in time"],
        fix: &[all("Run {login_cmd} again and finish within 15 minutes")],
        postern: "Stops the login; nothing is stored.",
    },
    Entry {
        id: "entra.app-disabled",
        rows: &[],
        title: "The application is disabled (AADSTS7000112)",
        signs: &[Aadsts(7000112)],
        meaning: "The application is disabled.",
        causes: &["An admin disabled sign-ins for the enterprise application"],
        fix: &[all(
            "Microsoft Entra admin center > Enterprise applications > the app > Properties > Enabled for users to sign in = Yes",
        )],
        postern: HOLD,
    },
    Entry {
        id: "entra.pkce",
        rows: &[],
        title: "The PKCE code verifier did not match (AADSTS501481)",
        signs: &[Aadsts(501481)],
        meaning: "The PKCE code verifier did not match the challenge.",
        causes: &["The browser sign-in was started twice and the answers crossed"],
        fix: &[all("Start the sign-in again: {login_cmd} --browser")],
        postern: "Stops the login; nothing is stored.",
    },
    Entry {
        id: "entra.code-used",
        rows: &[],
        title: "The authorization code was already used (AADSTS54005)",
        signs: &[Aadsts(54005)],
        meaning: "The authorization code was already used.",
        causes: &["The browser redirect was loaded twice"],
        fix: &[all("Start the sign-in again: {login_cmd}")],
        postern: "Stops the login; nothing is stored.",
    },
    Entry {
        id: "entra.redirect",
        rows: &[],
        title: "The redirect URI is not registered (AADSTS50011)",
        signs: &[Aadsts(50011)],
        meaning: "The redirect URI is not registered.",
        causes: &[
            "The app has no \"Mobile and desktop applications\" platform with http://localhost",
        ],
        fix: &[all(
            "{app} > Authentication > Add a platform > Mobile and desktop applications > add http://localhost",
        )],
        postern: "Stops the login; nothing is stored.",
    },
    // ---------------------------------------------------------------- Graph (§9 40–51, §4.5)
    Entry {
        id: "graph.send-as",
        rows: &[40],
        title: "Graph: the mailbox may not send as the From address (403 ErrorSendAsDenied)",
        signs: &[g("ErrorSendAsDenied")],
        meaning: "The message's From ({from}) is not {mailbox}, and {mailbox} has neither Send As nor Send on Behalf on it.",
        causes: &[
            "A route with a fixed mailbox carries mail from other addresses",
            "The right was granted less than an hour ago",
        ],
        fix: &[
            all(
                "Route this sender to its own mailbox, or grant Send As: `Add-RecipientPermission -Identity {from} -Trustee {mailbox} -AccessRights SendAs` (Exchange admin center > Recipients > Mailboxes > {from} > Delegation > Send as)",
            ),
            all(
                "Or Send on Behalf: `Set-Mailbox -Identity {from} -GrantSendOnBehalfTo @{Add=\"{mailbox}\"}`",
            ),
            del(
                "Delegated tokens also need Mail.Send.Shared to send from another mailbox: `postern login {account} --mailbox {mailbox} --for graph --shared`",
            ),
        ],
        postern: HOLD_SENDER,
    },
    Entry {
        id: "graph.odata-disabled",
        rows: &[41],
        title: "Graph: an Application Access Policy or RBAC scope excludes the mailbox (403 \"Access to OData is disabled\")",
        signs: &[
            gm("ErrorAccessDenied", "OData is disabled"),
            gm("ExtensionError", "OData is disabled"),
        ],
        meaning: "The app may use Mail.Send, but not for {mailbox}: an Application Access Policy (or an RBAC for Applications scope) leaves this mailbox out.",
        causes: &[
            "{mailbox} is not in the mail-enabled security group of the app's Application Access Policy",
            "An RBAC management scope does not include {mailbox}",
            "The change was made less than an hour ago",
        ],
        fix: &[
            all(
                "Check with `Test-ApplicationAccessPolicy -Identity {mailbox} -AppId {client_id}`; add the mailbox to the policy's group: `Add-DistributionGroupMember -Identity <policy group> -Member {mailbox}`",
            ),
            all(
                "Or, with RBAC for Applications, widen the scope of `New-ManagementRoleAssignment -Role \"Application Mail.Send\" -App {client_id} -CustomResourceScope <scope>`",
            ),
            all("Wait at least an hour for the change to apply"),
        ],
        postern: HOLD,
    },
    Entry {
        id: "graph.drafts-denied",
        rows: &[],
        title: "Graph: creating or changing a draft was denied (403 ErrorAccessDenied on /messages)",
        signs: &[
            Phrase("the request creating a draft"),
            Phrase("the request setting the draft's recipients"),
        ],
        meaning: "This message is sent through a draft in {mailbox} (its header names recipients that are not its envelope recipients, it carries a Bcc header, or the route keeps no copy in Sent Items), and drafts need the permission Mail.ReadWrite, which the token does not carry.",
        causes: &[
            "The app has Mail.Send but not Mail.ReadWrite",
            "No admin consent for Mail.ReadWrite",
            "An Application Access Policy or RBAC scope leaves the mailbox out",
        ],
        fix: &[
            app(
                "{app} > API permissions > Add a permission > Microsoft Graph > Application permissions > Mail.ReadWrite > Grant admin consent",
            ),
            del(
                "{app} > API permissions > Add a permission > Microsoft Graph > Delegated permissions > Mail.ReadWrite (Mail.ReadWrite.Shared for a shared mailbox) > Grant admin consent, then {login_cmd}",
            ),
            all("Or send such mail through a route with transport = \"smtp\""),
        ],
        postern: HOLD,
    },
    Entry {
        id: "graph.access-denied",
        rows: &[42],
        title: "Graph: the token lacks Mail.Send (403 ErrorAccessDenied \"Access is denied\")",
        signs: &[
            gm("ErrorAccessDenied", "Access is denied"),
            g("ErrorAccessDenied"),
        ],
        meaning: "The token has no permission to send mail as {mailbox}.",
        causes: &[
            "Mail.Send was added as a delegated permission but the account signs in as the app (or the other way round)",
            "No admin consent for Mail.Send",
            "The token was issued before the permission was granted",
        ],
        fix: &[
            app(
                "{app} > API permissions > Add a permission > Microsoft Graph > Application permissions > Mail.Send > Grant admin consent; postern gets a new token on the next attempt",
            ),
            del(
                "{app} > API permissions > Add a permission > Microsoft Graph > Delegated permissions > Mail.Send (and Mail.Send.Shared for shared mailboxes) > Grant admin consent, then {login_cmd}",
            ),
        ],
        postern: HOLD,
    },
    Entry {
        id: "graph.not-found",
        rows: &[],
        title: "Graph: the mailbox's resource was not found (404 ResourceNotFound)",
        signs: &[g("ResourceNotFound"), g("ErrorItemNotFound")],
        meaning: "Graph found no such resource under {server}: the URL postern built from graph_url and the mailbox {mailbox} leads nowhere.",
        causes: &[
            "graph_url of [account.{account}] is not the Microsoft Graph root of the account's cloud (it must not include /v1.0)",
            "A proxy rewrites the path",
        ],
        fix: &[all(
            "Remove graph_url from [account.{account}] (the cloud's default is right), or set it to the Graph root such as https://graph.microsoft.com",
        )],
        postern: HOLD,
    },
    Entry {
        id: "graph.no-mailbox",
        rows: &[43],
        title: "Graph: the user has no Exchange Online mailbox (MailboxNotEnabledForRESTAPI)",
        signs: &[g("MailboxNotEnabledForRESTAPI")],
        meaning: "{mailbox} has no Exchange Online mailbox Graph can use.",
        causes: &[
            "No Exchange Online licence",
            "A guest user",
            "The mailbox is on-premises (hybrid) or soft-deleted",
        ],
        fix: &[all(
            "Assign an Exchange Online licence (Microsoft 365 admin center > Users > Active users > {mailbox} > Licenses and apps), or send as a cloud mailbox",
        )],
        postern: HOLD,
    },
    Entry {
        id: "graph.invalid-user",
        rows: &[44],
        title: "Graph: the user is not valid (ErrorInvalidUser)",
        signs: &[g("ErrorInvalidUser")],
        meaning: "Graph could not resolve {mailbox} to a mailbox.",
        causes: &[
            "A typing error in the route's mailbox",
            "The user was renamed or deleted",
        ],
        fix: &[all(
            "Correct the route's mailbox to the user's primary SMTP address or UPN (Microsoft 365 admin center > Users > Active users)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "graph.invalid-recipients",
        rows: &[45],
        title: "Graph: a recipient address is not valid (400 ErrorInvalidRecipients)",
        signs: &[g("ErrorInvalidRecipients")],
        meaning: "At least one recipient address of the message is not valid.",
        causes: &["A malformed address in the message's To, Cc or Bcc"],
        fix: &[all("Correct the recipient addresses in the device or app")],
        postern: FAIL,
    },
    Entry {
        id: "graph.bad-base64",
        rows: &[46],
        title: "Graph: the MIME body was not valid base64 (400 ErrorMimeContentInvalidBase64String)",
        signs: &[g("ErrorMimeContentInvalidBase64String")],
        meaning: "Graph expected the RFC 822 message base64-encoded with Content-Type: text/plain.",
        causes: &[
            "A proxy altered the request body",
            "A bug in postern (it always sends base64)",
        ],
        fix: &[all(
            "Exempt graph.microsoft.com from content-rewriting proxies; if none is in the way, report it with `postern queue show {queue_id}`",
        )],
        postern: FAIL,
    },
    Entry {
        id: "graph.too-large",
        rows: &[47],
        title: "Graph: the request is over 4 MB (413)",
        signs: &[
            g("RequestBodyTooLarge"),
            Phrase("maximum request length supported is 4MB"),
        ],
        meaning: "sendMail takes at most 4 MB per request; larger messages need a draft and an upload session.",
        causes: &[
            "A proxy forced the small-message path",
            "A bug in postern (it uploads larger messages in parts)",
        ],
        fix: &[all(
            "Nothing to configure: postern sends messages over 3 MB through an upload session; if this recurs, report it with `postern queue show {queue_id}`",
        )],
        postern: RETRY,
    },
    Entry {
        id: "graph.message-size",
        rows: &[48],
        title: "Graph: the message is larger than the mailbox allows (ErrorMessageSizeExceeded)",
        signs: &[g("ErrorMessageSizeExceeded")],
        meaning: "The message is larger than {mailbox} may send (35 MB by default, at most 150 MB).",
        causes: &["A large attachment", "MaxSendSize of the mailbox is low"],
        fix: &[all(
            "`Set-Mailbox -Identity {mailbox} -MaxSendSize 150MB` (Exchange admin center > Recipients > Mailboxes > {mailbox} > Mailbox settings > Message size restrictions), or send smaller messages",
        )],
        postern: FAIL,
    },
    Entry {
        id: "graph.route-limit",
        rows: &[],
        title: "Graph: the message is larger than the route's max_message_size",
        signs: &[Phrase("more than this route's limit")],
        meaning: "postern sends messages up to the route's max_message_size over Graph (35 MB by default, Exchange Online's default MaxSendSize); this one is larger, so it is returned to its sender rather than refused by Exchange after a long upload.",
        causes: &[
            "A large attachment (base64 makes a file a third larger in the message)",
            "The mailbox's MaxSendSize was raised but the route's max_message_size was not",
        ],
        fix: &[all(
            "If {mailbox} may send larger messages (`Set-Mailbox -Identity {mailbox} -MaxSendSize 150MB`, at most 150 MB), raise max_message_size in the route to match (for example max_message_size = \"150 MiB\"); otherwise ask the sender to share a link instead of attaching the file",
        )],
        postern: FAIL,
    },
    Entry {
        id: "graph.throttled",
        rows: &[49],
        title: "Graph: too many requests (429 ApplicationThrottled)",
        signs: &[g("ApplicationThrottled"), Phrase("MailboxConcurrency")],
        meaning: "The app made more than 4 concurrent requests for one mailbox, or went over 10,000 requests per 10 minutes.",
        causes: &[
            "per_mailbox_concurrency above 4",
            "Another program uses the same app and mailbox",
        ],
        fix: &[all(
            "Set per_mailbox_concurrency = 4 or lower in [delivery]; postern honours Retry-After",
        )],
        postern: WAIT,
    },
    Entry {
        id: "graph.token",
        rows: &[50],
        title: "Graph: the access token is missing, expired or for another API (401 InvalidAuthenticationToken)",
        signs: &[g("InvalidAuthenticationToken")],
        meaning: "Graph did not accept the access token.",
        causes: &[
            "The token expired (clock skew on this host)",
            "A token for SMTP (outlook.office365.com) was sent to Graph",
            "graph_url of the account points at another cloud",
        ],
        fix: &[all(
            "Check this host's clock (timedatectl) and that graph_url of [account.{account}] matches its cloud; `postern token {account} --for graph` shows the token's audience (it must be graph.microsoft.com)",
        )],
        postern: "Gets a new token and repeats the request at once; if Graph refuses the new token too, holds the mailbox's messages without spending their retries and tries one again every hold_retry.",
    },
    Entry {
        id: "graph.directory",
        rows: &[51],
        title: "Graph: a directory permission is missing (403 Authorization_RequestDenied)",
        signs: &[g("Authorization_RequestDenied")],
        meaning: "The request needed a directory permission (such as reading users) the app does not have. sendMail itself does not need one.",
        causes: &["A user lookup was made with only Mail.Send granted"],
        fix: &[all(
            "Grant the directory permission (Microsoft Graph > Application permissions > User.Read.All, with admin consent) or avoid the call",
        )],
        postern: HOLD,
    },
    // ---------------------------------------------------------------- Google (§9 52)
    Entry {
        id: "gmail.xoauth2",
        rows: &[52],
        title: "Gmail rejected the XOAUTH2 token (334 challenge, then 535 5.7.8)",
        signs: &[
            st((5, 7, 8), "Username and Password not accepted"),
            st((5, 7, 1), "Username and Password not accepted"),
            Phrase("eyJzdGF0dXMiOiI0MDEi"),
        ],
        meaning: "Google refused the token: it answered with a base64 JSON challenge (status 401), then 535.",
        causes: &[
            "The token expired",
            "The scope is not https://mail.google.com/",
        ],
        fix: &[all(
            "Send an empty line after the 334 challenge, refresh the token, and request scope https://mail.google.com/",
        )],
        postern: HOLD,
    },
    // ---------------------------------------------------------------- postern's own words
    Entry {
        id: "postern.no-starttls",
        rows: &[],
        title: "The server did not offer STARTTLS",
        signs: &[Phrase("did not offer STARTTLS")],
        meaning: "{server} did not offer STARTTLS, so postern did not send the access token over an unencrypted connection.",
        causes: &[
            "smtp_host or smtp_port point at the wrong server or port",
            "A firewall with SMTP inspection (for example Cisco ASA \"inspect esmtp\") removes STARTTLS",
        ],
        fix: &[all(
            "Check smtp_host and smtp_port of [account.{account}] (Exchange Online: smtp.office365.com, port 587), and turn SMTP inspection off for this traffic",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.no-xoauth2",
        rows: &[],
        title: "The server does not offer AUTH XOAUTH2",
        signs: &[Phrase("does not offer AUTH XOAUTH2")],
        meaning: "{server} does not offer AUTH XOAUTH2 after STARTTLS, so postern did not send the access token.",
        causes: &[
            "smtp_host is not Exchange Online",
            "A proxy answers instead of Exchange",
        ],
        fix: &[all(
            "Check that smtp_host of [account.{account}] is Exchange Online (smtp.office365.com)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.tls-untrusted",
        rows: &[],
        title: "The server's TLS certificate is not trusted",
        signs: &[
            Phrase("the TLS certificate is not trusted"),
            Phrase("certificate is not accepted"),
        ],
        meaning: "postern could not verify {server}'s certificate, so it did not send the access token.",
        causes: &[
            "A firewall or proxy inspects TLS with its own CA",
            "This host's CA bundle is missing or old",
            "smtp_host is an IP address or an alias the certificate does not name",
            "This host's clock is wrong",
        ],
        fix: &[all(
            "If a firewall or proxy inspects TLS, add its CA certificate (PEM) as ca_file in [account.{account}]; otherwise install or update this host's CA bundle (the ca-certificates package); use the server's DNS name (smtp.office365.com) as smtp_host; check the clock (timedatectl)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.tls-incompatible",
        rows: &[],
        title: "No TLS version or cipher in common with the server",
        signs: &[
            Phrase("no common TLS version or cipher"),
            Phrase("no TLS version or cipher in common"),
        ],
        meaning: "postern requires TLS 1.2 or later and found nothing in common with {server}.",
        causes: &[
            "A TLS-inspecting firewall offers only old versions",
            "smtp_host/smtp_port point at another server",
        ],
        fix: &[all(
            "Check smtp_host/smtp_port of [account.{account}] and any TLS-inspecting firewall",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.connect",
        rows: &[],
        title: "postern cannot connect to the server",
        signs: &[
            Phrase("cannot connect to"),
            Phrase("connection refused (nothing listens"),
            Phrase("cannot be resolved"),
        ],
        meaning: "The TCP connection to the upstream failed.",
        causes: &[
            "Outbound port 587 (SMTP) or 443 (HTTPS) is blocked by a firewall",
            "DNS does not resolve the host",
            "A proxy is required but not configured",
        ],
        fix: &[all(
            "From this host try `nc -vz smtp.office365.com 587` and `curl -sI https://login.microsoftonline.com`; open the port, fix DNS (/etc/resolv.conf), or set proxy = \"http://proxy:3128\" in [account.{account}]",
        )],
        postern: RETRY,
    },
    Entry {
        id: "postern.token-endpoint-down",
        rows: &[],
        title: "The token endpoint is temporarily unavailable",
        signs: &[Phrase("token endpoint temporarily unavailable")],
        meaning: "postern could not get an access token right now (network, Entra busy, HTTP 5xx or 429).",
        causes: &[
            "No route to login.microsoftonline.com (firewall, DNS, proxy)",
            "An Entra outage",
        ],
        fix: &[all(
            "Check that this host reaches https://login.microsoftonline.com (`postern doctor` tests DNS, TCP, TLS and the proxy); otherwise wait",
        )],
        postern: RETRY,
    },
    Entry {
        id: "postern.not-signed-in",
        rows: &[],
        title: "The mailbox has not been signed in",
        signs: &[Phrase("has not been signed in (no refresh token)")],
        meaning: "A delegated account needs one sign-in per mailbox, and {mailbox} has none stored.",
        causes: &[
            "`postern login` was never run for this mailbox",
            "The state directory was wiped or is another one",
        ],
        fix: &[all("Run {login_cmd} once, as the user postern runs as")],
        postern: HOLD,
    },
    Entry {
        id: "postern.credential-unreadable",
        rows: &[],
        title: "postern cannot read the client credential",
        signs: &[
            Phrase("cannot read the client credential"),
            Phrase("cannot read systemd credential"),
            Phrase("is not set (add LoadCredential"),
        ],
        meaning: "The secret, certificate or key named in [account.{account}] cannot be read.",
        causes: &[
            "The file is missing or not readable by the postern user",
            "The environment variable is not set in the service's environment",
            "The systemd credential is not loaded (LoadCredential=)",
        ],
        fix: &[all(
            "Fix the credential settings of [account.{account}]: `postern check` names the file; make it readable by the service user (chown postern, chmod 0600)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.proxy-auth",
        rows: &[],
        title: "The proxy demands authentication (HTTP 407)",
        signs: &[Phrase("the proxy demands authentication")],
        meaning: "The HTTPS proxy refused postern's requests without credentials.",
        causes: &["The proxy needs a username and password"],
        fix: &[all(
            "Put the credentials into the account's proxy URL (http://user:password@host:port) or fix HTTPS_PROXY",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.not-token-endpoint",
        rows: &[],
        title: "The token URL is not an Entra token endpoint",
        signs: &[Phrase("it is not an Entra token endpoint")],
        meaning: "The URL postern uses for tokens answered 404 or 405.",
        causes: &["authority or token_url overrides of the account are wrong"],
        fix: &[all(
            "Check the account's authority / token_url overrides (or remove them to use the cloud's defaults)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.route-gone",
        rows: &[],
        title: "The message's route no longer exists",
        signs: &[Phrase("no longer exists in the configuration")],
        meaning: "The message was queued for a route that a configuration reload removed, and no other route accepts its sender.",
        causes: &["A route was renamed or deleted while mail was queued"],
        fix: &[all(
            "Add a route for the sender, reload (systemctl reload postern), then `postern queue release {queue_id}`",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.transport-unavailable",
        rows: &[],
        title: "The route's transport cannot be set up",
        signs: &[Phrase("the route's transport cannot be set up")],
        meaning: "postern could not build the route's transport from the configuration (a CA file vanished since `postern check`, a bad host name).",
        causes: &[
            "ca_file was removed or replaced with something unreadable",
            "smtp_host is not a host name",
        ],
        fix: &[all(
            "Run `postern check`, fix what it names, and reload (systemctl reload postern)",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.no-account",
        rows: &[],
        title: "The route names an account that is not configured",
        signs: &[Phrase("there is no [account.")],
        meaning: "A route uses an [account.NAME] table that does not exist.",
        causes: &[
            "A typing error in the route's account",
            "The account was removed by a reload",
        ],
        fix: &[all(
            "Add the [account.{account}] table, or fix the route's account name, then reload",
        )],
        postern: HOLD,
    },
    Entry {
        id: "postern.admin-hold",
        rows: &[],
        title: "An administrator put the message on hold",
        signs: &[Phrase("held by the administrator")],
        meaning: "Someone ran `postern queue hold` on this message.",
        causes: &["Deliberate: the message waits for a decision"],
        fix: &[all(
            "`postern queue release {queue_id}` to send it, or `postern queue delete {queue_id}`",
        )],
        postern: "Keeps it until released.",
    },
    Entry {
        id: "postern.lifetime",
        rows: &[],
        title: "The message outlived max_lifetime",
        signs: &[Phrase("message outlived max_lifetime")],
        meaning: "The message could not be delivered before max_lifetime ran out; the last error says why.",
        causes: &["A long outage or a problem that was never fixed (see the last error)"],
        fix: &[all(
            "Fix the last error, then resend from the device; raise max_lifetime in [delivery] if outages last longer",
        )],
        postern: FAIL,
    },
];
