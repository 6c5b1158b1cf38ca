use super::*;

/// Every row of microsoft-reference.md §9: the error as seen (the reference's own text, or
/// the observed full reply from §3.4/§3.5/§4.5), the entry it must match, and words the
/// explanation must contain (the PowerShell or admin-centre step that fixes it).
const ROWS: &[(u8, &str, &str, &[&str])] = &[
    (
        1,
        "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
        "smtp.auth.token-rejected",
        &[
            "New-ServicePrincipal",
            "Add-MailboxPermission",
            "SMTP.SendAsApp",
            "SMTP.Send",
        ],
    ),
    (
        2,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "smtp.auth.tenant",
        &[
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
            "Set-CASMailbox",
        ],
    ),
    (
        3,
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]",
        "smtp.auth.mailbox",
        &[
            "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false",
            "Authenticated SMTP",
        ],
    ),
    (
        4,
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [X 2025-11-23T11:12:20.123Z 1]",
        "smtp.auth.basic",
        &["XOAUTH2"],
    ),
    (
        5,
        "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator.",
        "smtp.auth.conditional-access",
        &["Conditional Access", "Sign-in logs"],
    ),
    (
        6,
        "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.",
        "smtp.auth.security-defaults",
        &["Manage security defaults"],
    ),
    (
        7,
        "550 5.7.30 Basic authentication is not supported for Client Submission.",
        "smtp.auth.basic-retired",
        &["smtp-legacy", "OAuth"],
    ),
    (
        8,
        "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM",
        "smtp.not-authenticated",
        &["STARTTLS", "235"],
    ),
    (
        9,
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
        "smtp.tls-old",
        &["TLS inspection"],
    ),
    (
        10,
        "554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as scanner@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.",
        "smtp.send-as",
        &[
            "Add-RecipientPermission -Identity scanner@contoso.com -Trustee <mailbox> -AccessRights SendAs",
        ],
    ),
    (
        11,
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        "smtp.send-as",
        &["Add-RecipientPermission", "Delegation > Send as"],
    ),
    (
        12,
        "550 5.2.252 Sender throttled due to continuous send as denied errors.",
        "smtp.throttled.send-as",
        &["cannot lift", "Add-RecipientPermission"],
    ),
    (
        13,
        "550 5.2.251 Sender throttled due to continuous mailbox full errors.",
        "smtp.throttled.mailbox-full",
        &["Sent Items"],
    ),
    (
        13,
        "550 5.2.253 Sender throttled due to continuous invalid license errors.",
        "smtp.throttled.licence",
        &["licence"],
    ),
    (
        13,
        "550 5.2.254 Sender throttled due to continuous too many recipients errors.",
        "smtp.throttled.recipients",
        &["500"],
    ),
    (
        13,
        "550 5.2.255 Sender throttled due to continuous invalid recipients errors.",
        "smtp.throttled.invalid-recipients",
        &["invalid recipient"],
    ),
    (
        14,
        "432 4.3.2 Concurrent connections limit exceeded.",
        "smtp.concurrency",
        &["per_mailbox_concurrency = 3"],
    ),
    (
        14,
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "smtp.concurrency",
        &["3 per mailbox"],
    ),
    (
        15,
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        "smtp.quota",
        &["10,000, rolling", "24 hours", "daily_recipients"],
    ),
    (
        16,
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        "smtp.mailbox-full",
        &["Sent Items", "saveToSentItems"],
    ),
    (
        17,
        "451 4.7.0 Temporary server error. Please try again later. PRX4 [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM]",
        "smtp.temporary",
        &["retry"],
    ),
    (
        18,
        "550 5.7.705 Access denied, tenant has exceeded threshold",
        "smtp.tenant-threshold",
        &["Microsoft support"],
    ),
    (
        18,
        "550 5.7.708 Access denied, traffic not accepted from this IP",
        "smtp.ip-blocked",
        &["IP address"],
    ),
    (
        18,
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
        "smtp.unregistered-domain",
        &["Settings > Domains"],
    ),
    (
        19,
        "550 5.1.8 Access denied, bad outbound sender",
        "smtp.restricted-sender",
        &["Restricted entities"],
    ),
    (
        20,
        "550 5.7.520 Access denied, Your organization does not allow external forwarding. Please contact your administrator for further assistance. AS(7555)",
        "smtp.forwarding",
        &["Automatic forwarding"],
    ),
    (
        21,
        "550 5.7.233 Message rejected: tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit)",
        "smtp.terrl",
        &["24 hours"],
    ),
    (
        22,
        "501 5.5.124 Invalid XOAUTH2 auth data",
        "smtp.xoauth2-data",
        &[
            "https://outlook.office365.com/.default",
            "https://outlook.office.com/SMTP.Send",
        ],
    ),
    (
        22,
        "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
        "smtp.token-expiring",
        &["10 minutes"],
    ),
    (
        23,
        r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '00000000-0000-0000-0000-0000000c11e7'.\r\nTrace ID: a\r\nCorrelation ID: b\r\nTimestamp: 2016-01-09 02:02:12Z","error_codes":[7000215],"timestamp":"2016-01-09 02:02:12Z","trace_id":"a","correlation_id":"b","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#,
        "entra.secret-wrong",
        &["not the Secret ID", "New client secret"],
    ),
    (
        24,
        "AADSTS7000222: The provided client secret keys for app '0000' are expired.",
        "entra.secret-expired",
        &["New client secret", "secret_expires"],
    ),
    (
        25,
        "AADSTS700016",
        "entra.app-not-found",
        &["Application (client) ID", "Directory (tenant) ID"],
    ),
    (
        26,
        "AADSTS50194: Application is not configured as a multi-tenant application.",
        "entra.single-tenant",
        &["Directory (tenant) ID"],
    ),
    (
        27,
        "AADSTS90002: Tenant 'contoso.example' not found.",
        "entra.tenant-not-found",
        &["cloud = global"],
    ),
    (
        28,
        r#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented to use the application","error_codes":[65001],"suberror":"consent_required"}"#,
        "entra.consent",
        &["Grant admin consent"],
    ),
    (
        29,
        "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication",
        "entra.mfa",
        &["postern login", "MFA"],
    ),
    (
        30,
        "AADSTS50079",
        "entra.mfa-registration",
        &["aka.ms/mfasetup"],
    ),
    (
        31,
        "AADSTS53003: Access has been blocked by Conditional Access policies.",
        "entra.conditional-access",
        &["Sign-in logs", "Conditional Access"],
    ),
    (
        32,
        "AADSTS700082: The refresh token has expired due to inactivity.",
        "entra.refresh-expired",
        &["postern login"],
    ),
    (
        33,
        "AADSTS50173",
        "entra.grant-revoked",
        &["Sign-in frequency"],
    ),
    (33, "AADSTS70043", "entra.grant-revoked", &["postern login"]),
    (34, "AADSTS50126", "entra.password", &["postern login"]),
    (
        35,
        "AADSTS70011: The provided value for the input parameter 'scope' isn't valid.",
        "entra.scope",
        &["one resource per request"],
    ),
    (35, "AADSTS700022", "entra.scope", &["exact scope strings"]),
    (
        36,
        "AADSTS500011",
        "entra.resource",
        &["Office 365 Exchange Online"],
    ),
    (
        37,
        "AADSTS700027: Client assertion failed signature validation.",
        "entra.assertion",
        &["Upload certificate", "clock"],
    ),
    (37, "AADSTS50012", "entra.assertion", &["thumbprint"]),
    (
        38,
        "AADSTS7000218",
        "entra.no-credential",
        &["Allow public client flows"],
    ),
    (
        39,
        r#"{"error":"authorization_pending","error_description":"AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.","error_codes":[70016]}"#,
        "entra.device-pending",
        &["keeps polling"],
    ),
    (39, "expired_token", "entra.device-expired", &["15 minutes"]),
    (
        40,
        r#"{"error":{"code":"ErrorSendAsDenied","message":"The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account. Cannot submit message.","innerError":{"request-id":"1","date":"2025-01-01T00:00:00"}}}"#,
        "graph.send-as",
        &["Add-RecipientPermission", "GrantSendOnBehalfTo"],
    ),
    (
        41,
        r#"{"error":{"code":"ErrorAccessDenied","message":"Access to OData is disabled.","innerError":{"request-id":"1"}}}"#,
        "graph.odata-disabled",
        &["Test-ApplicationAccessPolicy", "an hour"],
    ),
    (
        42,
        r#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}"#,
        "graph.access-denied",
        &["Application permissions > Mail.Send", "Grant admin consent"],
    ),
    (
        43,
        r#"{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"The mailbox is either inactive, soft-deleted, or is hosted on-premise."}}"#,
        "graph.no-mailbox",
        &["licence"],
    ),
    (
        44,
        r#"{"error":{"code":"ErrorInvalidUser","message":"The requested user 'printer@contoso.com' is invalid."}}"#,
        "graph.invalid-user",
        &["primary SMTP address"],
    ),
    (
        45,
        r#"{"error":{"code":"ErrorInvalidRecipients","message":"At least one recipient isn't valid., Recipient 'x' isn't resolved."}}"#,
        "graph.invalid-recipients",
        &["recipient addresses"],
    ),
    (
        46,
        r#"{"error":{"code":"ErrorMimeContentInvalidBase64String","message":"Invalid base64 string for MIME content."}}"#,
        "graph.bad-base64",
        &["base64"],
    ),
    (
        47,
        "HTTP 413: The maximum request length supported is 4MB.",
        "graph.too-large",
        &["upload session"],
    ),
    (
        48,
        "ErrorMessageSizeExceeded",
        "graph.message-size",
        &["MaxSendSize"],
    ),
    (
        49,
        r#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit."}}"#,
        "graph.throttled",
        &["Retry-After"],
    ),
    (
        50,
        r#"{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired."}}"#,
        "graph.token",
        &["graph.microsoft.com", "timedatectl"],
    ),
    (
        51,
        r#"{"error":{"code":"Authorization_RequestDenied","message":"Insufficient privileges to complete the operation."}}"#,
        "graph.directory",
        &["User.Read.All"],
    ),
    (
        52,
        "334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\n535-5.7.8 Username and Password not accepted. Learn more at https://support.google.com/mail/?p=BadCredentials",
        "gmail.xoauth2",
        &["https://mail.google.com/"],
    ),
];

#[test]
fn every_reference_row_is_explained() {
    for (row, input, id, words) in ROWS {
        let (text, matched) = explain_text(input, &Vars::new());
        assert!(matched, "row {row}: nothing matched {input:?}:\n{text}");
        let first = diagnose(&evidence(input))[0].entry;
        assert_eq!(first.id, *id, "row {row}: {input:?} explained as\n{text}");
        assert!(
            first.rows.contains(row),
            "entry {id} does not list row {row}"
        );
        for w in *words {
            assert!(
                text.contains(w),
                "row {row} ({id}): {w:?} missing in\n{text}"
            );
        }
        for section in [
            "What it means:",
            "Likely causes",
            "Fix:",
            "What postern does:",
        ] {
            assert!(text.contains(section), "{id}: {section} missing");
        }
    }
    // Every one of the 52 rows is covered by an entry and tested above.
    for row in 1..=52u8 {
        assert!(
            TABLE.iter().any(|e| e.rows.contains(&row)),
            "row {row} has no entry"
        );
        assert!(
            ROWS.iter().any(|(r, ..)| *r == row),
            "row {row} is not tested"
        );
    }
}

#[test]
fn each_input_matches_one_entry_only() {
    for (row, input, id, _) in ROWS {
        let ms = diagnose(&evidence(input));
        let ids: Vec<&str> = ms.iter().map(|m| m.entry.id).collect();
        assert_eq!(ids, vec![*id], "row {row}: {input:?}");
    }
}

#[test]
fn ids_are_unique_and_entries_complete() {
    let mut seen = std::collections::HashSet::new();
    for e in TABLE {
        assert!(seen.insert(e.id), "duplicate id {}", e.id);
        assert!(!e.signs.is_empty(), "{} has no sign", e.id);
        assert!(!e.causes.is_empty(), "{} has no cause", e.id);
        assert!(!e.fix.is_empty(), "{} has no fix", e.id);
        // Every placeholder used is a known one (an unknown one would print as "{name}").
        let rendered = render(e, &Vars::new());
        for (i, _) in rendered.match_indices('{') {
            let after = &rendered[i + 1..];
            assert!(
                after.starts_with("Add="),
                "{}: unfilled placeholder at {:?}",
                e.id,
                &rendered[i..(i + 20).min(rendered.len())]
            );
        }
    }
}

#[test]
fn vars_fill_the_advice_for_the_account_kind() {
    let v = Vars::new()
        .set("mailbox", "printer@contoso.com")
        .set("client_id", "11111111-2222-3333-4444-555555555555")
        .app_only(true);
    let a = advice("smtp.auth.token-rejected", &v);
    assert!(
        a.contains("New-ServicePrincipal -AppId 11111111-2222-3333-4444-555555555555"),
        "{a}"
    );
    assert!(a.contains("-Identity printer@contoso.com"), "{a}");
    assert!(
        !a.contains("postern login"),
        "delegated steps left out: {a}"
    );
    let d = advice(
        "smtp.auth.token-rejected",
        &Vars::new().set("mailbox", "x@y").app_only(false),
    );
    assert!(d.contains("SMTP.Send"), "{d}");
    assert!(!d.contains("New-ServicePrincipal"), "{d}");
    // Explain without a context shows both kinds, labelled.
    let (text, _) = explain_text("535 5.7.3 Authentication unsuccessful", &Vars::new());
    assert!(
        text.contains("(accounts that sign in as the app)"),
        "{text}"
    );
    assert!(text.contains("(delegated accounts)"), "{text}");
}

#[test]
fn log_lines_give_their_context() {
    let line = r#"2026-01-05T10:00:00.000Z  WARN postern::maillog: held event="held" queue_id="0190A1B2C3D4E5F6" mailbox="printer@contoso.com" reason="smtp.office365.com:587 answered the message with \"554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as scanner@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied\". Either route ...""#;
    let (text, matched) = explain_text(line, &Vars::new());
    assert!(matched, "{text}");
    assert!(
        text.contains(
            "Add-RecipientPermission -Identity scanner@contoso.com -Trustee printer@contoso.com"
        ),
        "{text}"
    );
    let json = r#"{"timestamp":"2026-01-05T10:00:00Z","level":"WARN","event":"held","queue_id":"0190A1B2C3D4E5F6","mailbox":"printer@contoso.com","reason":"smtp.office365.com:587 answered AUTH XOAUTH2 as printer@contoso.com with \"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [X]\". ...","target":"postern::maillog"}"#;
    let (text, matched) = explain_text(json, &Vars::new());
    assert!(matched, "{text}");
    assert!(
        text.contains(
            "Set-CASMailbox -Identity printer@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{text}"
    );
}

#[test]
fn unknown_input_says_so_and_shows_the_closest() {
    let (text, matched) = explain_text(
        "my printer says SMTP AUTH disabled for tenant",
        &Vars::new(),
    );
    assert!(!matched);
    assert!(
        text.starts_with("postern does not know this error"),
        "{text}"
    );
    assert!(text.contains("smtp.auth.tenant"), "{text}");
    let (text, matched) = explain_text("zzzz qqqq", &Vars::new());
    assert!(!matched);
    assert!(text.contains("Nothing similar"), "{text}");
}

#[test]
fn an_entry_id_shows_that_entry() {
    let (text, matched) = explain_text("graph.odata-disabled", &Vars::new());
    assert!(matched);
    assert!(text.contains("Test-ApplicationAccessPolicy"), "{text}");
}

#[test]
fn generic_replies_prefer_the_specific_entry() {
    // 421 4.3.2 "Service not available" is a server closing, not the per-mailbox limit.
    let ms = diagnose(&evidence(
        "421 4.3.2 Service not available, closing transmission channel",
    ));
    assert_eq!(ms[0].entry.id, "smtp.closing");
    // An unknown 5.7.139 reason still gets the generic entry.
    let ms = diagnose(&evidence(
        "535 5.7.139 Authentication unsuccessful, something new",
    ));
    assert_eq!(ms[0].entry.id, "smtp.auth.refused");
}
