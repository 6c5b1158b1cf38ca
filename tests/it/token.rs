//! The token store against the fake Entra: every flow, single-flight, refresh ahead,
//! classification and backoff, recovery, rotation safety, file modes, and no leaks.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use postern::config::{
    AccountConfig, AssertionAlg, Cloud, Credential, Endpoints, SecretSource, SecretStyle,
};
use postern::secret::Secret;
use postern::token::entra::{EntraClient, now_secs};
use postern::token::files::{StoredToken, TokenFiles};
use postern::token::inspect::decode_claims;
use postern::token::login::{self, LoginError, LoginUi};
use postern::token::{Audience, StoreOptions, TokenError, TokenSource, TokenStore};

use crate::fake::entra::{self as fe, FakeEntra, Poll, Scripted};

// ---------------------------------------------------------------------------------------------
// Log capture: every tracing line of this test binary, for the leak checks.

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;
impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .try_init();
    });
}

fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// No secret, refresh token or access token of `fake` in the logs or in `texts`.
#[track_caller]
fn assert_no_leaks(fake: &FakeEntra, texts: &[String]) {
    let logs = log_text();
    for s in fake.secrets() {
        assert!(
            !logs.contains(&s),
            "a secret/token of the fake is in the log: {s}"
        );
        for t in texts {
            assert!(!t.contains(&s), "a secret/token of the fake is in {t:?}");
        }
    }
}

/// Both renderings of an error (what logs and operators see).
fn shown(e: &TokenError) -> String {
    format!("{e} {e:?}")
}

// ---------------------------------------------------------------------------------------------
// Set-up

fn endpoints(fake: &FakeEntra, tenant: &str) -> Endpoints {
    Endpoints::derive(
        &fake.base,
        tenant,
        "https://graph.microsoft.com",
        "smtp.office365.com",
        "https://outlook.office.com",
        "https://outlook.office365.com",
    )
}

fn account(fake: &FakeEntra, credential: Credential) -> AccountConfig {
    AccountConfig {
        name: "contoso".into(),
        tenant: fe::TENANT.into(),
        client_id: fe::CLIENT_ID.into(),
        cloud: Cloud::Global,
        endpoints: endpoints(fake, fe::TENANT),
        ca_file: None,
        proxy: None,
        credential,
    }
}

fn secret(style: SecretStyle) -> Credential {
    Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new(fe::SECRET.into())),
        style,
        expires: None,
    }
}

fn delegated() -> Credential {
    Credential::Delegated { secret: None }
}

fn fast() -> StoreOptions {
    StoreOptions {
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_secs(1),
        config_retry: Duration::from_millis(800),
        ..StoreOptions::default()
    }
}

fn store(dir: &Path, accounts: Vec<AccountConfig>, opts: StoreOptions) -> Arc<TokenStore> {
    capture_logs();
    Arc::new(TokenStore::new(accounts, dir, opts))
}

fn claims(t: &postern::token::AccessToken) -> postern::token::inspect::Claims {
    decode_claims(t.token.expose()).expect("JWT-shaped token")
}

fn config_error(e: TokenError) -> postern::token::Misconfiguration {
    match e {
        TokenError::Configuration(m) => *m,
        TokenError::Transient(s) => panic!("expected a configuration error, got transient: {s}"),
    }
}

fn seed_login(
    fake: &FakeEntra,
    dir: &Path,
    mailbox: &str,
    audience: Audience,
    shared: bool,
) -> String {
    let rt = fake.state().seed_refresh_token();
    TokenFiles::new(dir)
        .save(
            "contoso",
            &StoredToken {
                mailbox: mailbox.into(),
                audience,
                shared,
                refresh_token: Secret::new(rt.clone()),
                saved_at: now_secs(),
            },
        )
        .unwrap();
    rt
}

fn rsa_cert() -> (String, String) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["postern-test".into()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    (cert.pem(), kp.serialize_pem())
}

// ---------------------------------------------------------------------------------------------
// Client credentials

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_in_body_and_basic() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let mut basic = account(&fake, secret(SecretStyle::Basic));
    basic.name = "basic".into();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body)), basic],
        fast(),
    );

    let t = s
        .token("contoso", "any@contoso.com", Audience::Smtp)
        .await
        .unwrap();
    let c = claims(&t);
    assert_eq!(c.aud.as_deref(), Some("https://outlook.office365.com"));
    assert_eq!(c.roles, vec!["SMTP.SendAsApp"]);
    assert!(t.expires_at > now_secs() + 3000);
    {
        let st = fake.state();
        let r = st.log.last().unwrap();
        assert_eq!(r.field("grant_type"), Some("client_credentials"));
        assert_eq!(
            r.field("scope"),
            Some("https://outlook.office365.com/.default")
        );
        assert_eq!(r.field("client_secret"), Some(fe::SECRET));
        assert!(r.authorization.is_none());
    }

    let t = s.token("basic", "", Audience::Graph).await.unwrap();
    assert_eq!(
        claims(&t).aud.as_deref(),
        Some("https://graph.microsoft.com")
    );
    assert_eq!(claims(&t).roles, vec!["Mail.Send"]);
    {
        let st = fake.state();
        let r = st.log.last().unwrap();
        assert_eq!(
            r.field("scope"),
            Some("https://graph.microsoft.com/.default")
        );
        assert_eq!(
            r.field("client_secret"),
            None,
            "Basic style keeps the secret out of the body"
        );
        assert!(r.authorization.as_deref().unwrap().starts_with("Basic "));
    }
    // App-only tokens are shared by every mailbox of the account.
    let n = fake.token_requests();
    s.token("contoso", "other@contoso.com", Audience::Smtp)
        .await
        .unwrap();
    assert_eq!(fake.token_requests(), n);
    assert_no_leaks(&fake, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_assertion_ps256_and_rs256() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = rsa_cert();
    fake.state().register_cert(&cert_pem);
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    let mut accounts = Vec::new();
    for (name, alg) in [("ps", AssertionAlg::Ps256), ("rs", AssertionAlg::Rs256)] {
        let mut a = account(
            &fake,
            Credential::Certificate {
                cert: dir.path().join("cert.pem"),
                key: SecretSource::Inline(Secret::new(key_pem.clone())),
                alg,
            },
        );
        a.name = name.into();
        accounts.push(a);
    }
    let s = store(dir.path(), accounts, fast());
    for (name, header) in [("ps", "x5t#S256"), ("rs", "x5t")] {
        let t = s
            .token(name, "", Audience::Smtp)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(claims(&t).roles, vec!["SMTP.SendAsApp"]);
        let st = fake.state();
        let r = st.log.last().unwrap();
        assert_eq!(
            r.field("client_assertion_type"),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert!(r.field("client_secret").is_none());
        let jwt = r.field("client_assertion").unwrap();
        let h: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwt.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(h.get(header).is_some(), "{name}: header {h}");
    }

    // Another certificate registered in Entra: 700027, with the upload advice.
    let (other, _) = rsa_cert();
    fake.state().register_cert(&other);
    let e = s.refresh_now("ps", "", Audience::Graph).await.unwrap_err();
    let m = config_error(e.clone());
    assert_eq!(m.code, Some(700027));
    assert!(
        m.advice
            .contains("Certificates & secrets > Certificates > Upload certificate"),
        "{m}"
    );
    assert_no_leaks(&fake, &[shown(&e), key_pem.clone()]);
    assert!(!log_text().contains(key_pem.lines().nth(1).unwrap()));
}

// ---------------------------------------------------------------------------------------------
// Single-flight, refresh ahead

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_callers_cause_one_request() {
    let fake = FakeEntra::start();
    fake.state().delay = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        fast(),
    );
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.token("contoso", &format!("m{i}@contoso.com"), Audience::Smtp)
                .await
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap().unwrap().token.expose().clone());
    }
    assert_eq!(fake.token_requests(), 1);
    assert_eq!(tokens.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_single_flight_per_mailbox() {
    let fake = FakeEntra::start();
    fake.state().delay = Duration::from_millis(200);
    let dir = tempfile::tempdir().unwrap();
    seed_login(&fake, dir.path(), "a@contoso.com", Audience::Smtp, false);
    seed_login(&fake, dir.path(), "b@contoso.com", Audience::Smtp, false);
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        let m = if i % 2 == 0 {
            "a@contoso.com"
        } else {
            "B@Contoso.com"
        };
        tasks.push(tokio::spawn(async move {
            s.token("contoso", m, Audience::Smtp).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(fake.token_requests(), 2, "one refresh per mailbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_ahead_of_expiry() {
    let fake = FakeEntra::start();
    fake.state().lifetime = 4;
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        refresh_margin: Duration::from_secs(1),
        ..fast()
    };
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        opts,
    );
    let first = s.token("contoso", "", Audience::Smtp).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = s.token("contoso", "", Audience::Smtp).await.unwrap();
    assert_eq!(first.token, again.token, "still fresh: cached");
    assert_eq!(fake.token_requests(), 1);
    // Refresh point = min(80 % of 4 s, 4 s - 1 s margin) = 3 s; the old token is still valid.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(
        first.expires_at >= now_secs(),
        "refresh happens before expiry"
    );
    let newer = s.token("contoso", "", Audience::Smtp).await.unwrap();
    assert_ne!(first.token, newer.token);
    assert_eq!(fake.token_requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// Classification, backoff, recovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_error_is_remembered_then_recovers_by_itself() {
    let fake = FakeEntra::start();
    fake.state().broken = Some(Scripted::aadsts(7000215));
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        fast(),
    );
    let mut errors = Vec::new();
    for _ in 0..20 {
        errors.push(s.token("contoso", "", Audience::Smtp).await.unwrap_err());
    }
    assert_eq!(
        fake.token_requests(),
        1,
        "no stampede while the error is remembered"
    );
    let m = config_error(errors[0].clone());
    assert_eq!(m.code, Some(7000215));
    assert_eq!(m.error.as_deref(), Some("invalid_client"));
    assert!(m.advice.contains("Value, not the Secret ID"), "{m}");
    assert!(m.trace_id.is_some() && m.correlation_id.is_some());
    let line = errors[0].to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(line.contains("AADSTS7000215"));

    // The admin fixes Entra; after the slow retry interval mail flows again by itself.
    fake.state().broken = None;
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.token("contoso", "", Audience::Smtp).await.unwrap();
    assert_eq!(fake.token_requests(), 2);
    assert!(
        log_text().contains("AADSTS7000215"),
        "the failure was logged (and the capture works)"
    );
    let texts: Vec<String> = errors.iter().map(shown).collect();
    assert_no_leaks(&fake, &texts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_codes_arrive_as_configuration_errors_with_advice() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        fast(),
    );
    for (code, needle) in [
        (7000222, "New client secret"),
        (700016, "Application (client) ID"),
        (50194, "Directory (tenant) ID"),
        (90002, "usgov"),
        (65001, "SMTP.SendAsApp"),
        (53003, "Conditional Access"),
    ] {
        fake.state().script.push_back(Scripted::aadsts(code));
        let e = s
            .refresh_now("contoso", "", Audience::Smtp)
            .await
            .unwrap_err();
        let m = config_error(e.clone());
        assert_eq!(m.code, Some(code));
        assert!(
            m.advice.contains(needle) || m.meaning.contains(needle),
            "{code}: {m}"
        );
        assert_no_leaks(&fake, &[shown(&e)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tenant_and_unknown_app_are_configuration_errors() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let mut wrong_tenant = account(&fake, secret(SecretStyle::Body));
    wrong_tenant.name = "wt".into();
    wrong_tenant.tenant = "contoso.example".into();
    wrong_tenant.endpoints = endpoints(&fake, "contoso.example");
    let mut wrong_app = account(&fake, secret(SecretStyle::Body));
    wrong_app.name = "wa".into();
    wrong_app.client_id = "99999999-0000-0000-0000-000000000000".into();
    let s = store(dir.path(), vec![wrong_tenant, wrong_app], fast());
    let m = config_error(s.token("wt", "", Audience::Smtp).await.unwrap_err());
    assert_eq!(
        (m.code, m.error.as_deref()),
        (Some(90002), Some("invalid_tenant"))
    );
    assert!(
        m.meaning.contains("contoso.example") && m.meaning.contains("global"),
        "{m}"
    );
    let m = config_error(s.token("wa", "", Audience::Smtp).await.unwrap_err());
    assert_eq!(m.code, Some(700016));
    let m = config_error(s.token("nope", "", Audience::Smtp).await.unwrap_err());
    assert!(m.meaning.contains("no [account.nope]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_back_off_exponentially() {
    let fake = FakeEntra::start();
    {
        let mut st = fake.state();
        st.script.push_back(Scripted::aadsts(503));
        st.script.push_back(Scripted::aadsts(503));
    }
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        fast(),
    );
    let e = s.token("contoso", "", Audience::Graph).await.unwrap_err();
    assert!(matches!(e, TokenError::Transient(_)), "{e}");
    assert!(e.to_string().contains("temporarily_unavailable"), "{e}");
    // During the 300 ms backoff: the cached error, no request.
    assert!(s.token("contoso", "", Audience::Graph).await.is_err());
    assert_eq!(fake.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(s.token("contoso", "", Audience::Graph).await.is_err());
    assert_eq!(fake.token_requests(), 2);
    // Second backoff is 600 ms.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(s.token("contoso", "", Audience::Graph).await.is_err());
    assert_eq!(fake.token_requests(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.token("contoso", "", Audience::Graph).await.unwrap();
    assert_eq!(fake.token_requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_transient() {
    let fake = FakeEntra::start();
    let mut a = account(&fake, secret(SecretStyle::Body));
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    a.endpoints.token_url = format!("http://127.0.0.1:{port}/t/oauth2/v2.0/token");
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), vec![a], fast());
    let e = s.token("contoso", "", Audience::Smtp).await.unwrap_err();
    assert!(matches!(e, TokenError::Transient(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_secret_expires_is_a_warning_and_entra_decides() {
    // secret_expires is read as 00:00 UTC of that day; the real secret lives until later.
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let mut a = account(&fake, secret(SecretStyle::Body));
    a.credential = Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new(fe::SECRET.into())),
        style: SecretStyle::Body,
        expires: Some(now_secs() - 3600),
    };
    let mut old = a.clone();
    old.name = "old".into();
    old.credential = Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new(fe::SECRET.into())),
        style: SecretStyle::Body,
        expires: Some(now_secs() - 3 * 86_400),
    };
    let s = store(dir.path(), vec![a, old], fast());
    s.token("contoso", "", Audience::Smtp)
        .await
        .expect("Entra still accepts the secret, so mail flows");
    assert_eq!(fake.token_requests(), 1);
    let w = s.expiry_warnings();
    assert!(
        w.iter()
            .any(|l| l.starts_with("account contoso: the client secret expires today")),
        "{w:?}"
    );
    assert!(
        w.iter().any(
            |l| l.starts_with("account old: the client secret expired on")
                && l.contains("until Entra refuses it (AADSTS7000222)")
        ),
        "{w:?}"
    );
    // When Entra does refuse it, that is the configuration error.
    fake.state().broken = Some(Scripted::aadsts(7000222));
    let m = config_error(s.refresh_now("old", "", Audience::Smtp).await.unwrap_err());
    assert_eq!(m.code, Some(7000222));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_replaced_once_for_all_who_report_it() {
    let fake = FakeEntra::start();
    fake.state().delay = Duration::from_millis(200);
    let dir = tempfile::tempdir().unwrap();
    let s = store(
        dir.path(),
        vec![account(&fake, secret(SecretStyle::Body))],
        fast(),
    );
    let first = s
        .token("contoso", "a@contoso.com", Audience::Smtp)
        .await
        .unwrap();
    assert_eq!(fake.token_requests(), 1);
    // Twenty deliveries had the cached token refused at once: one new request between them.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (s, first) = (s.clone(), first.clone());
        tasks.push(tokio::spawn(async move {
            s.renew(
                "contoso",
                &format!("m{i}@contoso.com"),
                Audience::Smtp,
                &first,
            )
            .await
        }));
    }
    let mut renewed = std::collections::HashSet::new();
    for t in tasks {
        let t = t.await.unwrap().unwrap().expect("a replacement");
        renewed.insert(t.token.expose().clone());
    }
    assert_eq!(fake.token_requests(), 2, "no stampede");
    assert_eq!(renewed.len(), 1);
    let second = s.token("contoso", "", Audience::Smtp).await.unwrap();
    assert!(
        renewed.contains(second.token.expose()),
        "the replacement is cached"
    );
    assert_ne!(second.token, first.token);
    // The replacement is refused too: a fresh token is not the problem, permissions are.
    assert!(
        s.renew("contoso", "", Audience::Smtp, &second)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.renew("contoso", "x@contoso.com", Audience::Smtp, &second)
            .await
            .unwrap()
            .is_none(),
        "a late report of the same refusal gets the same answer"
    );
    assert_eq!(fake.token_requests(), 2, "no request for a verdict");
    // The next delivery (the hold's probe) gets a new token, which again counts as fresh.
    let third = s.token("contoso", "", Audience::Smtp).await.unwrap();
    assert_eq!(fake.token_requests(), 3);
    assert!(
        s.renew("contoso", "", Audience::Smtp, &third)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(fake.token_requests(), 3);
    // App-only lines do not name an empty mailbox.
    let log = log_text();
    assert!(
        !log.contains("mailbox=\"\"") && !log.contains("mailbox= ") && !log.contains("mailbox=\n"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_warnings_from_30_days_before() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let mut soon = account(&fake, secret(SecretStyle::Body));
    soon.name = "soon".into();
    soon.credential = Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new("x".into())),
        style: SecretStyle::Body,
        expires: Some(now_secs() + 10 * 86_400 + 100),
    };
    let mut later = soon.clone();
    later.name = "later".into();
    later.credential = Credential::ClientSecret {
        secret: SecretSource::Inline(Secret::new("x".into())),
        style: SecretStyle::Body,
        expires: Some(now_secs() + 90 * 86_400),
    };
    // A certificate that expires in 20 days.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["soon".into()]).unwrap();
    let in20 = std::time::SystemTime::now() + Duration::from_secs(20 * 86_400 + 100);
    params.not_after = in20.into();
    let cert = params.self_signed(&kp).unwrap();
    std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
    let mut c = soon.clone();
    c.name = "cert".into();
    c.credential = Credential::Certificate {
        cert: dir.path().join("c.pem"),
        key: SecretSource::Inline(Secret::new(kp.serialize_pem())),
        alg: AssertionAlg::Ps256,
    };
    let s = store(dir.path(), vec![soon, later, c], fast());
    let w = s.expiry_warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("account cert: the certificate") && w[0].contains("in 20 days"),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("account soon: the client secret expires") && w[1].contains("in 10 days"),
        "{w:?}"
    );
    assert!(w[1].contains("New client secret"));
}

// ---------------------------------------------------------------------------------------------
// Delegated: refresh tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_refresh_rotates_and_stores_the_new_token() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let seeded = seed_login(
        &fake,
        dir.path(),
        "scanner@contoso.com",
        Audience::Smtp,
        false,
    );
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    let t = s
        .token("contoso", "Scanner@contoso.com", Audience::Smtp)
        .await
        .unwrap();
    let c = claims(&t);
    assert_eq!(c.aud.as_deref(), Some("https://outlook.office.com"));
    assert_eq!(c.scp, vec!["SMTP.Send"]);
    assert_eq!(c.upn.as_deref(), Some(fe::USER));
    {
        let st = fake.state();
        let r = st.log.last().unwrap();
        assert_eq!(r.field("grant_type"), Some("refresh_token"));
        assert_eq!(
            r.field("scope"),
            Some("https://outlook.office.com/SMTP.Send offline_access")
        );
        assert_eq!(r.field("refresh_token"), Some(seeded.as_str()));
        assert_eq!(r.field("client_secret"), None, "public client");
    }
    let files = TokenFiles::new(dir.path());
    let stored = files
        .load("contoso", "scanner@contoso.com")
        .unwrap()
        .unwrap();
    let newest = fake.state().issued_refresh.last().unwrap().clone();
    assert_ne!(stored.refresh_token.expose(), &seeded);
    assert_eq!(stored.refresh_token.expose(), &newest);
    let mode = std::fs::metadata(files.path("contoso", "scanner@contoso.com"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Graph for the same mailbox uses the same refresh token file (one RT, any resource).
    let g = s
        .token("contoso", "scanner@contoso.com", Audience::Graph)
        .await
        .unwrap();
    assert_eq!(claims(&g).scp, vec!["Mail.Send"]);
    let st = fake.state();
    assert_eq!(
        st.log.last().unwrap().field("refresh_token"),
        Some(newest.as_str())
    );
    drop(st);
    assert_no_leaks(&fake, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_shared_mailbox_asks_for_mail_send_shared() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    seed_login(
        &fake,
        dir.path(),
        "shared@contoso.com",
        Audience::Graph,
        true,
    );
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    let t = s
        .token("contoso", "shared@contoso.com", Audience::Graph)
        .await
        .unwrap();
    assert_eq!(claims(&t).scp, vec!["Mail.Send", "Mail.Send.Shared"]);
    assert_eq!(
        fake.state().log.last().unwrap().field("scope"),
        Some(
            "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.Send.Shared offline_access"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_between_receiving_and_saving_loses_no_token() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let seeded = seed_login(
        &fake,
        dir.path(),
        "scanner@contoso.com",
        Audience::Smtp,
        false,
    );
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    let files = TokenFiles::new(dir.path());
    let path = files.path("contoso", "scanner@contoso.com");
    // Make the save fail after Entra answered: a non-empty directory where the temp file goes.
    let tmp = std::path::PathBuf::from(format!("{}.new", path.display()));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("block"), b"x").unwrap();
    let e = s
        .token("contoso", "scanner@contoso.com", Audience::Smtp)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, TokenError::Transient(w) if w.contains("could not save")),
        "{e}"
    );
    assert_eq!(fake.token_requests(), 1, "Entra did answer (and rotated)");
    // The access token was not handed out, and the old refresh token is still on disk...
    let stored = files
        .load("contoso", "scanner@contoso.com")
        .unwrap()
        .unwrap();
    assert_eq!(stored.refresh_token.expose(), &seeded);
    // ...and still works (Entra does not revoke rotated tokens, §1.3).
    std::fs::remove_dir_all(&tmp).unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    s.token("contoso", "scanner@contoso.com", Audience::Smtp)
        .await
        .unwrap();
    let stored = files
        .load("contoso", "scanner@contoso.com")
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.refresh_token.expose(),
        fake.state().issued_refresh.last().unwrap()
    );
    assert_no_leaks(&fake, &[shown(&e)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_refresh_token_says_run_login_and_missing_one_too() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let seeded = seed_login(
        &fake,
        dir.path(),
        "scanner@contoso.com",
        Audience::Smtp,
        false,
    );
    fake.state().expire_refresh_token(&seeded);
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    let e = s
        .token("contoso", "scanner@contoso.com", Audience::Smtp)
        .await
        .unwrap_err();
    let m = config_error(e.clone());
    assert_eq!(m.code, Some(700082));
    assert_eq!(m.suberror.as_deref(), Some("bad_token"));
    assert!(
        m.advice
            .contains("postern login contoso --mailbox scanner@contoso.com --for smtp"),
        "{m}"
    );
    let n = fake.token_requests();
    let m = config_error(
        s.token("contoso", "nobody@contoso.com", Audience::Smtp)
            .await
            .unwrap_err(),
    );
    assert!(m.meaning.contains("not been signed in"), "{m}");
    assert!(
        m.advice
            .contains("postern login contoso --mailbox nobody@contoso.com")
    );
    assert_eq!(
        fake.token_requests(),
        n,
        "no request without a refresh token"
    );
    assert_no_leaks(&fake, &[shown(&e)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_refresh_tokens_are_renewed() {
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let seeded = seed_login(&fake, dir.path(), "idle@contoso.com", Audience::Smtp, false);
    // Fresh tokens are left alone.
    let s = store(dir.path(), vec![account(&fake, delegated())], fast());
    assert!(s.refresh_idle().await.is_empty());
    assert_eq!(fake.token_requests(), 0);
    // With a zero idle limit every token counts as idle.
    let s = store(
        dir.path(),
        vec![account(&fake, delegated())],
        StoreOptions {
            idle_refresh: Duration::ZERO,
            ..fast()
        },
    );
    let r = s.refresh_idle().await;
    assert_eq!(r.len(), 1);
    assert!(r[0].2.is_ok());
    let stored = TokenFiles::new(dir.path())
        .load("contoso", "idle@contoso.com")
        .unwrap()
        .unwrap();
    assert_ne!(stored.refresh_token.expose(), &seeded);
    // The maintenance task runs it too, and stops when cancelled.
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(s.clone().run_maintenance(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    task.await.unwrap();
    assert!(fake.token_requests() >= 2);
}

// ---------------------------------------------------------------------------------------------
// Login flows (library level)

#[derive(Default)]
struct TestUi {
    device: Option<(String, String, String)>,
    url: Option<String>,
}

impl LoginUi for TestUi {
    fn device_code(&mut self, d: &postern::token::entra::DeviceCode) {
        self.device = Some((
            d.verification_uri.clone(),
            d.user_code.clone(),
            d.message.clone(),
        ));
    }
    fn authorize_url(&mut self, url: &str) {
        self.url = Some(url.to_string());
    }
    fn waiting(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_login_states() {
    capture_logs();
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let client = EntraClient::new(account(&fake, delegated())).unwrap();
    let files = TokenFiles::new(dir.path());

    // pending → pending → success
    fake.state().device_plan = vec![Poll::Pending, Poll::Pending, Poll::Approve];
    let mut ui = TestUi::default();
    let out = login::device_login(
        &client,
        &files,
        "Scanner@contoso.com",
        Audience::Smtp,
        false,
        &mut ui,
    )
    .await
    .unwrap();
    assert_eq!(out.user.as_deref(), Some(fe::USER));
    let (uri, code, msg) = ui.device.unwrap();
    assert_eq!(uri, format!("{}/link", fake.base));
    assert!(msg.contains(&code));
    let stored = files
        .load("contoso", "scanner@contoso.com")
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.refresh_token.expose(),
        fake.state().issued_refresh.last().unwrap()
    );
    {
        let st = fake.state();
        let dc = st
            .log
            .iter()
            .find(|r| r.path.ends_with("/devicecode"))
            .unwrap();
        assert_eq!(
            dc.field("scope"),
            Some("https://outlook.office.com/SMTP.Send offline_access")
        );
        let polls = st
            .log
            .iter()
            .filter(|r| {
                r.field("grant_type") == Some("urn:ietf:params:oauth:grant-type:device_code")
            })
            .count();
        assert_eq!(polls, 3);
    }

    // declined, expired
    for (plan, want) in [
        (vec![Poll::Pending, Poll::Decline], "declined"),
        (vec![Poll::Expire], "expired"),
    ] {
        fake.state().device_plan = plan;
        let e = login::device_login(
            &client,
            &files,
            "x@contoso.com",
            Audience::Graph,
            false,
            &mut TestUi::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, LoginError::Declined | LoginError::Expired),
            "{e}"
        );
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(files.load("contoso", "x@contoso.com").unwrap().is_none());
    assert_no_leaks(&fake, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_slow_down_adds_five_seconds() {
    let fake = FakeEntra::start();
    fake.state().device_plan = vec![Poll::SlowDown, Poll::Approve];
    let dir = tempfile::tempdir().unwrap();
    let client = EntraClient::new(account(&fake, delegated())).unwrap();
    let t0 = std::time::Instant::now();
    login::device_login(
        &client,
        &TokenFiles::new(dir.path()),
        "s@contoso.com",
        Audience::Smtp,
        false,
        &mut TestUi::default(),
    )
    .await
    .unwrap();
    // interval 1 s, then 1 + 5 s.
    assert!(t0.elapsed() >= Duration::from_secs(7), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_login_config_error_exit_78() {
    let fake = FakeEntra::start();
    fake.state().device_plan = vec![Poll::Approve];
    fake.state().script.push_back(Scripted::aadsts(65001));
    let dir = tempfile::tempdir().unwrap();
    let client = EntraClient::new(account(&fake, delegated())).unwrap();
    let e = login::device_login(
        &client,
        &TokenFiles::new(dir.path()),
        "s@contoso.com",
        Audience::Smtp,
        false,
        &mut TestUi::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), 78, "{e}");
    assert!(
        e.to_string().contains("Delegated permissions > SMTP.Send"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_with_pkce() {
    capture_logs();
    let fake = FakeEntra::start();
    let dir = tempfile::tempdir().unwrap();
    let client = EntraClient::new(account(&fake, delegated())).unwrap();
    let files = TokenFiles::new(dir.path());

    // A "browser" that opens the printed URL (the fake signs in and redirects back).
    struct Browser(Option<String>);
    impl LoginUi for Browser {
        fn device_code(&mut self, _: &postern::token::entra::DeviceCode) {}
        fn authorize_url(&mut self, url: &str) {
            self.0 = Some(url.to_string());
            let url = url.to_string();
            tokio::spawn(async move {
                let _ = reqwest::get(url).await;
            });
        }
        fn waiting(&mut self, _: &str) {}
        fn finish(&mut self) {}
    }
    let mut ui = Browser(None);
    let out = login::browser_login(
        &client,
        &files,
        "scanner@contoso.com",
        Audience::Graph,
        false,
        &mut ui,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(out.user.as_deref(), Some(fe::USER));
    let url = ui.0.unwrap();
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(
        url.contains("redirect_uri=http%3A%2F%2Flocalhost%3A"),
        "{url}"
    );
    let st = fake.state();
    let redeem = st
        .log
        .iter()
        .find(|r| r.field("grant_type") == Some("authorization_code"))
        .unwrap();
    assert_eq!(redeem.field("code_verifier").unwrap().len(), 43);
    assert_eq!(
        redeem.field("scope"),
        Some("https://graph.microsoft.com/Mail.Send offline_access")
    );
    assert_eq!(
        files
            .load("contoso", "scanner@contoso.com")
            .unwrap()
            .unwrap()
            .refresh_token
            .expose(),
        st.issued_refresh.last().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkce_mismatch_is_501481() {
    let fake = FakeEntra::start();
    let client = EntraClient::new(account(&fake, delegated())).unwrap();
    let (_, challenge) = postern::token::entra::pkce_pair();
    let url = client
        .authorize_url(
            Audience::Smtp,
            false,
            "http://localhost:1/",
            "st",
            &challenge,
            None,
        )
        .unwrap();
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap();
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    let code = url::Url::parse(&loc)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let (wrong_verifier, _) = postern::token::entra::pkce_pair();
    let e = client
        .redeem_code(
            &Secret::new(code),
            &wrong_verifier,
            "http://localhost:1/",
            "s@contoso.com",
            Audience::Smtp,
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.aadsts(), Some(501481), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The real binary: `postern token` and `postern login` against the fake.

mod binary {
    use super::*;
    use crate::harness::{basic_config, bin};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    struct Setup {
        dir: tempfile::TempDir,
        config: std::path::PathBuf,
    }

    impl Setup {
        fn state(&self) -> std::path::PathBuf {
            self.dir.path().join("state")
        }
        fn files(&self) -> TokenFiles {
            TokenFiles::new(&self.state())
        }
    }

    /// A config with `[account.contoso]` pointing at `fake`; `auth_keys` chooses the credential.
    fn setup(fake: &FakeEntra, auth_keys: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{}\n", fe::SECRET)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let account = format!(
            "[account.contoso]\ntenant = \"{}\"\nclient_id = \"{}\"\nauthority = \"{}\"\n{}\n",
            fe::TENANT,
            fe::CLIENT_ID,
            fake.base,
            auth_keys.replace("SECRET_FILE", &secret.display().to_string())
        );
        let cfg = basic_config("", &account)
            .replace(
                "spool_dir = \"spool\"",
                &format!("spool_dir = \"{}\"", dir.path().join("spool").display()),
            )
            .replace(
                "state_dir = \"state\"",
                &format!("state_dir = \"{}\"", dir.path().join("state").display()),
            );
        let config = dir.path().join("postern.toml");
        std::fs::write(&config, cfg).unwrap();
        Setup { dir, config }
    }

    fn postern(s: &Setup, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .arg("--config")
            .arg(&s.config)
            .args(args)
            .env("POSTERN_LOG", "debug")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    #[track_caller]
    fn no_leaks(fake: &FakeEntra, out: &str, err: &str) {
        for s in fake.secrets() {
            assert!(
                !out.contains(&s) && !err.contains(&s),
                "leaked {s}\nstdout:\n{out}\nstderr:\n{err}"
            );
        }
    }

    const SECRET_KEYS: &str = "auth = \"client_secret\"\nclient_secret_file = \"SECRET_FILE\"";

    #[test]
    fn token_shows_claims_never_the_token() {
        let fake = FakeEntra::start();
        let s = setup(&fake, SECRET_KEYS);
        let (code, out, err) = postern(&s, &["token", "contoso", "--for", "smtp"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(
            out.contains("aud:   https://outlook.office365.com"),
            "{out}"
        );
        assert!(out.contains("roles: SMTP.SendAsApp"), "{out}");
        assert!(out.contains(&format!("appid: {}", fe::CLIENT_ID)), "{out}");
        assert!(!out.contains("warning"), "{out}");
        no_leaks(&fake, &out, &err);

        let (code, out, _) = postern(&s, &["token", "contoso", "--for", "graph", "--show-token"]);
        assert_eq!(code, 0);
        let last = fake.state().issued_access.last().unwrap().clone();
        assert!(out.contains(&format!("token: {last}")), "{out}");
    }

    /// The secret from an environment variable, and from a systemd credential
    /// (`LoadCredential=` puts it in `$CREDENTIALS_DIRECTORY/NAME`), never from the config.
    #[test]
    fn secret_from_environment_and_systemd_credential() {
        let fake = FakeEntra::start();
        for (keys, env) in [
            (
                "auth = \"client_secret\"\nclient_secret_env = \"CONTOSO_SECRET\"",
                "env",
            ),
            (
                "auth = \"client_secret\"\nclient_secret_credential = \"contoso-secret\"",
                "cred",
            ),
        ] {
            let s = setup(&fake, keys);
            let creds = s.dir.path().join("creds");
            std::fs::create_dir(&creds).unwrap();
            std::fs::write(creds.join("contoso-secret"), format!("{}\n", fe::SECRET)).unwrap();
            let mut cmd = Command::new(bin());
            cmd.arg("--config")
                .arg(&s.config)
                .args(["token", "contoso"]);
            if env == "env" {
                cmd.env("CONTOSO_SECRET", fe::SECRET);
            } else {
                cmd.env("CREDENTIALS_DIRECTORY", &creds);
            }
            let out = cmd.output().unwrap();
            let (o, e) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert_eq!(out.status.code(), Some(0), "{env}: {o}\n{e}");
            assert!(o.contains("roles: SMTP.SendAsApp"), "{o}");
            assert_eq!(
                fake.state().log.last().unwrap().field("client_secret"),
                Some(fe::SECRET)
            );
            no_leaks(&fake, &o, &e);
            // Without the variable the error says what to add, and nothing is sent to Entra.
            let before = fake.token_requests();
            let out = Command::new(bin())
                .arg("--config")
                .arg(&s.config)
                .args(["token", "contoso"])
                .env_remove("CONTOSO_SECRET")
                .env_remove("CREDENTIALS_DIRECTORY")
                .output()
                .unwrap();
            let e = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{e}");
            assert!(
                e.contains("CONTOSO_SECRET") || e.contains("LoadCredential"),
                "{e}"
            );
            assert_eq!(fake.token_requests(), before);
        }
    }

    #[test]
    fn token_config_error_exits_78_with_advice() {
        let fake = FakeEntra::start();
        fake.state().broken = Some(Scripted::aadsts(7000215));
        let s = setup(&fake, SECRET_KEYS);
        let (code, out, err) = postern(&s, &["token", "contoso"]);
        assert_eq!(code, 78, "{out}\n{err}");
        assert!(err.contains("AADSTS7000215"), "{err}");
        assert!(err.contains("Value, not the Secret ID"), "{err}");
        no_leaks(&fake, &out, &err);
    }

    #[test]
    fn certificate_account_end_to_end() {
        let fake = FakeEntra::start();
        let (cert, key) = rsa_cert();
        fake.state().register_cert(&cert);
        let s = setup(
            &fake,
            "auth = \"certificate\"\ncertificate = \"CERT\"\nprivate_key_file = \"KEY\"\nassertion_alg = \"RS256\"",
        );
        let cp = s.dir.path().join("cert.pem");
        let kp = s.dir.path().join("key.pem");
        std::fs::write(&cp, &cert).unwrap();
        std::fs::write(&kp, &key).unwrap();
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("\"CERT\"", &format!("\"{}\"", cp.display()))
            .replace("\"KEY\"", &format!("\"{}\"", kp.display()));
        std::fs::write(&s.config, c).unwrap();
        let (code, out, err) = postern(&s, &["token", "contoso", "--for", "graph"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("roles: Mail.Send"), "{out}");
        assert!(
            fake.state()
                .log
                .last()
                .unwrap()
                .field("client_assertion")
                .is_some()
        );
        no_leaks(&fake, &out, &err);
        assert!(!err.contains(key.lines().nth(1).unwrap()));
    }

    #[test]
    fn login_device_code_then_token() {
        let fake = FakeEntra::start();
        fake.state().device_plan = vec![Poll::Pending, Poll::Approve];
        let s = setup(&fake, "auth = \"delegated\"");
        let (code, out, err) = postern(
            &s,
            &["login", "contoso", "--mailbox", "scanner@contoso.com"],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains(&format!("{}/link", fake.base)), "{out}");
        assert!(out.contains("Code: F"), "{out}");
        assert!(out.contains("Signed in as scanner@contoso.com"), "{out}");
        let path = s.files().path("contoso", "scanner@contoso.com");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let first = s
            .files()
            .load("contoso", "scanner@contoso.com")
            .unwrap()
            .unwrap();
        no_leaks(&fake, &out, &err);

        let (code, out, err) = postern(
            &s,
            &["token", "contoso", "--mailbox", "scanner@contoso.com"],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("scp:   SMTP.Send"), "{out}");
        assert!(out.contains("upn:   scanner@contoso.com"), "{out}");
        let second = s
            .files()
            .load("contoso", "scanner@contoso.com")
            .unwrap()
            .unwrap();
        assert_ne!(
            first.refresh_token, second.refresh_token,
            "rotated token stored"
        );
        assert_eq!(
            second.refresh_token.expose(),
            fake.state().issued_refresh.last().unwrap()
        );
        no_leaks(&fake, &out, &err);

        // A Graph token for an SMTP-only mailbox is fine (one RT, any resource); asking for
        // SMTP claims on a Graph token is what warns: covered by inspect's unit tests.
        let (code, _, err) = postern(&s, &["token", "contoso"]);
        assert_eq!(code, 64, "delegated needs --mailbox: {err}");
    }

    #[test]
    fn login_declined_exits_1_and_config_errors_78() {
        let fake = FakeEntra::start();
        fake.state().device_plan = vec![Poll::Decline];
        let s = setup(&fake, "auth = \"delegated\"");
        let (code, out, err) = postern(
            &s,
            &[
                "login",
                "contoso",
                "--mailbox",
                "a@contoso.com",
                "--for",
                "graph",
            ],
        );
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(err.contains("declined"), "{err}");
        assert!(
            s.files()
                .load("contoso", "a@contoso.com")
                .unwrap()
                .is_none()
        );

        let s2 = setup(&fake, SECRET_KEYS);
        let (code, _, err) = postern(&s2, &["login", "contoso", "--mailbox", "a@contoso.com"]);
        assert_eq!(code, 78, "app-only account: nothing to sign in: {err}");
        let (code, _, _) = postern(&s2, &["login", "nosuch", "--mailbox", "a@contoso.com"]);
        assert_eq!(code, 78);
    }

    #[test]
    fn login_browser_with_pkce() {
        let fake = FakeEntra::start();
        let s = setup(&fake, "auth = \"delegated\"");
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(&s.config)
            .args([
                "login",
                "contoso",
                "--mailbox",
                "scanner@contoso.com",
                "--browser",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let l = lines.next().expect("authorize URL printed").unwrap();
            if l.contains("/oauth2/v2.0/authorize?") {
                break l.trim().to_string();
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The "browser": follows the fake's redirect to postern's loopback listener.
        let page = rt.block_on(async { reqwest::get(&url).await.unwrap().text().await.unwrap() });
        assert!(page.contains("signed in"), "{page}");
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        assert!(status.success(), "{rest:?}");
        assert!(
            rest.iter()
                .any(|l| l.contains("Signed in as scanner@contoso.com")),
            "{rest:?}"
        );
        assert!(
            s.files()
                .load("contoso", "scanner@contoso.com")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn check_warns_about_a_certificate_that_expires_soon() {
        let fake = FakeEntra::start();
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["soon".into()]).unwrap();
        params.not_after =
            (std::time::SystemTime::now() + Duration::from_secs(12 * 86_400 + 100)).into();
        let cert = params.self_signed(&kp).unwrap();
        let s = setup(
            &fake,
            "auth = \"certificate\"\ncertificate = \"CERT\"\nprivate_key_file = \"KEY\"",
        );
        let cp = s.dir.path().join("cert.pem");
        let kp_path = s.dir.path().join("key.pem");
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp_path, kp.serialize_pem()).unwrap();
        std::fs::set_permissions(&kp_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = std::fs::read_to_string(&s.config)
            .unwrap()
            .replace("\"CERT\"", &format!("\"{}\"", cp.display()))
            .replace("\"KEY\"", &format!("\"{}\"", kp_path.display()));
        std::fs::write(&s.config, c).unwrap();
        let (code, out, err) = postern(&s, &["check"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(
            out.lines().any(
                |l| l.starts_with("warning: account contoso: the certificate")
                    && l.contains("in 12 days")
            ),
            "{out}"
        );
    }

    #[test]
    fn killed_during_refresh_token_rotation_loses_nothing() {
        let fake = FakeEntra::start();
        let s = setup(&fake, "auth = \"delegated\"");
        let seeded = fake.state().seed_refresh_token();
        s.files()
            .save(
                "contoso",
                &StoredToken {
                    mailbox: "scanner@contoso.com".into(),
                    audience: Audience::Smtp,
                    shared: false,
                    refresh_token: Secret::new(seeded.clone()),
                    saved_at: now_secs(),
                },
            )
            .unwrap();
        // Entra receives the refresh (and rotates) but answers slowly; postern dies meanwhile.
        fake.state().delay = Duration::from_secs(5);
        let mut child = Command::new(bin())
            .arg("--config")
            .arg(&s.config)
            .args(["token", "contoso", "--mailbox", "scanner@contoso.com"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while fake.token_requests() == 0 {
            assert!(std::time::Instant::now() < deadline, "no refresh request");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let stored = s
            .files()
            .load("contoso", "scanner@contoso.com")
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.refresh_token.expose(),
            &seeded,
            "the old token is intact"
        );
        let dir = s.files().account_dir("contoso");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["scanner@contoso.com.json"]);
        // It still works: the next run refreshes with it and stores the newest.
        fake.state().delay = Duration::ZERO;
        let (code, out, err) = postern(
            &s,
            &["token", "contoso", "--mailbox", "scanner@contoso.com"],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        let stored = s
            .files()
            .load("contoso", "scanner@contoso.com")
            .unwrap()
            .unwrap();
        // (The killed run's request may still be issuing a token in the fake: don't rely on order.)
        assert_ne!(stored.refresh_token.expose(), &seeded);
        assert!(
            fake.state()
                .issued_refresh
                .contains(stored.refresh_token.expose())
        );
        no_leaks(&fake, &out, &err);
    }
}
