use super::*;
use std::path::PathBuf;

fn account(credential: Credential) -> AccountConfig {
    AccountConfig {
        name: "contoso".into(),
        tenant: "contoso.onmicrosoft.com".into(),
        client_id: "11111111-2222-3333-4444-555555555555".into(),
        cloud: Cloud::Global,
        endpoints: Cloud::Global.endpoints("contoso.onmicrosoft.com"),
        ca_file: None,
        proxy: None,
        credential,
    }
}

fn secret_account() -> AccountConfig {
    account(Credential::ClientSecret {
        secret: SecretSource::File(PathBuf::from("/etc/postern/contoso.secret")),
        style: SecretStyle::Body,
        expires: None,
    })
}

fn delegated_account() -> AccountConfig {
    account(Credential::Delegated { secret: None })
}

fn body(error: &str, code: u32, desc: &str, suberror: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {desc}\r\nTrace ID: 0000aaaa-11bb-cccc-dd22-eeeeee333333\r\nCorrelation ID: aaaa0000-bb11-2222-33cc-444444dddddd\r\nTimestamp: 2016-01-09 02:02:12Z"),
        "error_codes": [code],
        "timestamp": "2016-01-09 02:02:12Z",
        "trace_id": "0000aaaa-11bb-cccc-dd22-eeeeee333333",
        "correlation_id": "aaaa0000-bb11-2222-33cc-444444dddddd",
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    if let Some(s) = suberror {
        v["suberror"] = s.into();
    }
    v.to_string().into_bytes()
}

fn classify_body(
    status: u16,
    b: &[u8],
    acct: &AccountConfig,
    mailbox: &str,
    audience: Audience,
) -> TokenError {
    let e = EntraError::parse(status, b).expect("Entra error JSON");
    classify(
        &e,
        &Context {
            account: acct,
            mailbox,
            audience,
        },
    )
}

fn config(e: TokenError) -> Misconfiguration {
    match e {
        TokenError::Configuration(m) => *m,
        TokenError::Transient(s) => panic!("expected a configuration error, got transient {s}"),
    }
}

#[test]
fn parses_the_documented_error_shape() {
    // microsoft-reference.md §1.6, verbatim structure.
    let b = br#"{
      "error": "invalid_scope",
      "error_description": "AADSTS70011: The provided value for the input parameter 'scope' isn't valid. ...\r\nTrace ID: 0000aaaa-11bb\r\nCorrelation ID: aaaa0000-bb11\r\nTimestamp: 2016-01-09 02:02:12Z",
      "error_codes": [70011],
      "timestamp": "2016-01-09 02:02:12Z",
      "trace_id": "0000aaaa-11bb",
      "correlation_id": "aaaa0000-bb11",
      "error_uri": "https://login.microsoftonline.com/error?code=70011"
    }"#;
    let e = EntraError::parse(400, b).unwrap();
    assert_eq!(e.error, "invalid_scope");
    assert_eq!(e.codes, vec![70011]);
    assert_eq!(e.trace_id.as_deref(), Some("0000aaaa-11bb"));
    assert_eq!(e.correlation_id.as_deref(), Some("aaaa0000-bb11"));
    assert_eq!(
        e.summary(),
        "AADSTS70011: The provided value for the input parameter 'scope' isn't valid. ..."
    );
    assert!(!e.is_transient());
}

#[test]
fn code_taken_from_the_description_when_error_codes_is_missing() {
    let b = br#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys for app '...' are expired."}"#;
    assert_eq!(EntraError::parse(401, b).unwrap().code(), Some(7000222));
    assert!(EntraError::parse(502, b"<html>Bad gateway</html>").is_none());
}

#[test]
fn wrong_secret_7000215_says_value_not_id() {
    let b = body(
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '11111111-2222-3333-4444-555555555555'.",
        None,
    );
    let m = config(classify_body(
        401,
        &b,
        &secret_account(),
        "",
        Audience::Smtp,
    ));
    assert_eq!(m.code, Some(7000215));
    assert_eq!(m.error.as_deref(), Some("invalid_client"));
    assert!(
        m.meaning.starts_with("the client secret is wrong"),
        "{}",
        m.meaning
    );
    assert!(
        m.meaning.contains("11111111-2222-3333-4444-555555555555"),
        "{}",
        m.meaning
    );
    assert!(m.advice.contains("Certificates & secrets"), "{}", m.advice);
    assert!(
        m.advice.contains("Value, not the Secret ID"),
        "{}",
        m.advice
    );
    assert!(
        m.advice.contains("/etc/postern/contoso.secret"),
        "{}",
        m.advice
    );
    assert_eq!(
        m.trace_id.as_deref(),
        Some("0000aaaa-11bb-cccc-dd22-eeeeee333333")
    );
    let line = m.to_string();
    assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
    assert!(
        line.starts_with(
            "account contoso: the client secret is wrong: Entra did not accept the secret of app 11111111-2222-3333-4444-555555555555 (AADSTS7000215, invalid_client); fix: "
        ),
        "{line}"
    );
    assert!(line.contains("correlation id aaaa0000-bb11-2222-33cc-444444dddddd"));
}

#[test]
fn each_documented_code_has_its_own_advice() {
    let sec = secret_account();
    let del = delegated_account();
    type Case<'a> = (
        &'a str,
        u16,
        u32,
        Option<&'a str>,
        &'a AccountConfig,
        &'a str,
    );
    let cases: &[Case] = &[
        (
            "invalid_client",
            401,
            7000222,
            None,
            &sec,
            "New client secret",
        ),
        (
            "invalid_client",
            401,
            7000218,
            None,
            &del,
            "Allow public client flows",
        ),
        (
            "unauthorized_client",
            400,
            700016,
            None,
            &sec,
            "Application (client) ID",
        ),
        ("invalid_tenant", 400, 90002, None, &sec, "usgov"),
        ("invalid_request", 400, 90002, None, &sec, "Tenant ID"),
        (
            "invalid_request",
            400,
            50194,
            None,
            &sec,
            "Directory (tenant) ID",
        ),
        (
            "invalid_grant",
            400,
            65001,
            Some("consent_required"),
            &sec,
            "SMTP.SendAsApp",
        ),
        (
            "invalid_grant",
            400,
            65001,
            Some("consent_required"),
            &del,
            "Delegated permissions > SMTP.Send",
        ),
        (
            "invalid_grant",
            400,
            700082,
            Some("bad_token"),
            &del,
            "postern login contoso --mailbox scanner@contoso.com --for smtp",
        ),
        ("invalid_grant", 400, 50173, None, &del, "postern login"),
        ("invalid_grant", 400, 70043, None, &del, "Sign-in frequency"),
        (
            "invalid_grant",
            400,
            50076,
            Some("basic_action"),
            &del,
            "MFA",
        ),
        ("invalid_grant", 400, 50079, None, &del, "aka.ms/mfasetup"),
        (
            "interaction_required",
            400,
            53003,
            Some("message_only"),
            &del,
            "Conditional Access",
        ),
        (
            "invalid_client",
            401,
            700027,
            None,
            &sec,
            "Upload certificate",
        ),
        (
            "invalid_client",
            401,
            50012,
            None,
            &sec,
            "Upload certificate",
        ),
        (
            "invalid_scope",
            400,
            70011,
            None,
            &sec,
            "https://outlook.office365.com/.default",
        ),
        ("invalid_scope", 400, 700022, None, &sec, "scope"),
        (
            "invalid_resource",
            400,
            500011,
            None,
            &sec,
            "Office 365 Exchange Online",
        ),
        ("invalid_grant", 400, 501481, None, &del, "--browser"),
    ];
    for (error, status, code, sub, acct, needle) in cases {
        let b = body(error, *code, "text from Entra.", *sub);
        let m = config(classify_body(
            *status,
            &b,
            acct,
            "scanner@contoso.com",
            Audience::Smtp,
        ));
        assert_eq!(m.code, Some(*code));
        assert_eq!(m.suberror.as_deref(), *sub);
        assert!(
            m.advice.contains(needle) || m.meaning.contains(needle),
            "AADSTS{code}: {needle:?} not in {m}"
        );
        assert!(
            !m.meaning.starts_with("Entra refused"),
            "AADSTS{code} has no own meaning"
        );
    }
}

#[test]
fn graph_consent_names_mail_send() {
    let b = body("invalid_grant", 65001, "consent", Some("consent_required"));
    let m = config(classify_body(
        400,
        &b,
        &secret_account(),
        "",
        Audience::Graph,
    ));
    assert!(
        m.advice
            .contains("Microsoft Graph > Application permissions > Mail.Send")
    );
}

#[test]
fn unknown_codes_keep_entras_words() {
    let b = body("invalid_request", 123456, "Something new.", None);
    let m = config(classify_body(
        400,
        &b,
        &secret_account(),
        "",
        Audience::Smtp,
    ));
    assert_eq!(
        m.meaning,
        "Entra refused the request: AADSTS123456: Something new."
    );
    assert!(m.advice.contains("error?code=123456"));
}

#[test]
fn transient_errors() {
    for (status, error) in [
        (503, "temporarily_unavailable"),
        (400, "temporarily_unavailable"),
        (500, "server_error"),
        (429, "too_many_requests"),
    ] {
        let b = body(error, 90033, "busy", None);
        let e = classify_body(status, &b, &secret_account(), "", Audience::Smtp);
        assert!(
            matches!(e, TokenError::Transient(_)),
            "{status} {error}: {e}"
        );
        assert!(e.to_string().contains("trace id"));
    }
    let cx = Context {
        account: &secret_account(),
        mailbox: "",
        audience: Audience::Smtp,
    };
    assert!(matches!(
        classify_http(502, "x", &cx),
        TokenError::Transient(_)
    ));
    assert!(classify_http(404, "x", &cx).is_configuration());
    assert!(classify_http(407, "x", &cx).is_configuration());
}

#[test]
fn scopes_are_exact() {
    let ep = Cloud::Global.endpoints("t");
    assert_eq!(
        scope(&ep, Audience::Smtp, GrantKind::Delegated, false),
        "https://outlook.office.com/SMTP.Send offline_access"
    );
    assert_eq!(
        scope(&ep, Audience::Smtp, GrantKind::AppOnly, false),
        "https://outlook.office365.com/.default"
    );
    assert_eq!(
        scope(&ep, Audience::Graph, GrantKind::Delegated, false),
        "https://graph.microsoft.com/Mail.Send offline_access"
    );
    assert_eq!(
        scope(&ep, Audience::Graph, GrantKind::Delegated, true),
        "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.Send.Shared offline_access"
    );
    assert_eq!(
        scope(&ep, Audience::Graph, GrantKind::AppOnly, false),
        "https://graph.microsoft.com/.default"
    );
    let us = Cloud::UsGov.endpoints("t");
    assert_eq!(
        scope(&us, Audience::Smtp, GrantKind::Delegated, false),
        "https://outlook.office365.us/SMTP.Send offline_access"
    );
    let cn = Cloud::China.endpoints("t");
    assert_eq!(
        scope(&cn, Audience::Graph, GrantKind::AppOnly, false),
        "https://microsoftgraph.chinacloudapi.cn/.default"
    );
}

#[test]
fn pkce_verifier_is_43_chars_and_challenge_is_s256() {
    let (v, c) = pkce_pair();
    assert_eq!(v.expose().len(), 43);
    assert_eq!(c, pkce_challenge(v.expose()));
    // Computed independently (Python hashlib + urlsafe_b64encode, padding stripped).
    assert_eq!(
        pkce_challenge("dBjftJeZ4CVP-mJ0kZPBVQaVNodJVX-UTsqN4f4QbNk"),
        "8uorWeEWHlvxu0H2-1MSEQAAfeqzPsHtQoIXYJSi-dI"
    );
}

#[test]
fn token_response_parsing() {
    let t = parse_token_response(
        br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eX"}"#,
    )
    .unwrap();
    assert_eq!(t.expires_in, 3599);
    assert!(t.refresh_token.is_none());
    let t = parse_token_response(
        br#"{"token_type":"Bearer","expires_in":"3600","access_token":"a","refresh_token":"r","scope":"s"}"#,
    )
    .unwrap();
    assert_eq!(t.expires_in, 3600);
    assert_eq!(t.refresh_token.unwrap().expose(), "r");
    assert!(parse_token_response(b"{}").is_err());
    assert!(parse_token_response(b"<html>").is_err());
}

#[test]
fn a_past_secret_expires_date_still_asks_entra() {
    // secret_expires is a date read as 00:00 UTC while the secret lives until later that day:
    // it is only a reminder, Entra's answer decides.
    let mut a = secret_account();
    a.credential = Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new("x".into())),
        style: SecretStyle::Body,
        expires: Some(1_000_000),
    };
    // The token URL points nowhere: asking Entra is a transient error, not a configuration one.
    a.endpoints.token_url = "http://127.0.0.1:9/t".into();
    let c = EntraClient::new(a).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(c.client_credentials(Audience::Smtp))
        .unwrap_err();
    assert!(matches!(e, TokenError::Transient(_)), "{e}");
}

#[test]
fn missing_secret_file_is_a_configuration_error() {
    let mut a = secret_account();
    a.credential = Credential::ClientSecret {
        secret: SecretSource::File("/nonexistent/secret".into()),
        style: SecretStyle::Basic,
        expires: None,
    };
    let c = EntraClient::new(a).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let m = config(
        rt.block_on(c.client_credentials(Audience::Graph))
            .unwrap_err(),
    );
    assert!(m.meaning.contains("/nonexistent/secret"), "{m}");
}

#[test]
fn aadsts_scan() {
    assert_eq!(aadsts_in("AADSTS50011: The redirect URI"), Some(50011));
    assert_eq!(aadsts_in("no code"), None);
}
