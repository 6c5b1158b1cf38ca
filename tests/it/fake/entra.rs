//! A fake Microsoft Entra token endpoint on 127.0.0.1 (microsoft-reference.md §1, §8).
//!
//! It answers like Entra: client credentials with the secret in the body or HTTP Basic, or a
//! certificate assertion (RS256/PS256, `x5t`/`x5t#S256`, signature, aud, iss = sub, exp/nbf,
//! jti replay) checked against the registered certificate; refresh tokens that rotate on every
//! use (old ones stay valid, §1.3); device code with scripted poll states; authorization code
//! with PKCE S256 (501481 on mismatch); errors in the exact §1.6 shape (401 for
//! `invalid_client`). Tests script failures ("next N requests fail with 7000222", "every
//! request fails until fixed"), token lifetimes and response delays, and read the request log.
//!
//! Access tokens are JWT-shaped (header.claims.signature) with aud, scp/roles, tid, appid,
//! upn, oid, exp, so `postern token` can decode them. Every token and secret it hands out or
//! knows is listed by [`FakeEntra::secrets`] for the "nothing leaks into logs" checks.

#![allow(dead_code)]
// Handlers bail out with a finished HTTP response; its size does not matter in a test server.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use serde_json::{Value, json};

/// The tenant the fake knows (by domain).
pub const TENANT: &str = "contoso.onmicrosoft.com";
/// The same tenant's GUID (`tid` claim).
pub const TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The app registration tests use.
pub const CLIENT_ID: &str = "00000000-0000-0000-0000-0000000c11e7";
/// Its client secret value.
pub const SECRET: &str = "fake-Secret~Value.q8Q~xyzzy0123456789";
/// Its client secret ID (what admins paste by mistake).
pub const SECRET_ID: &str = "5c1e7a1d-0000-4000-8000-5ec12e7001d0";
/// The signed-in user of delegated flows.
pub const USER: &str = "scanner@contoso.com";

/// A scripted Entra error.
#[derive(Debug, Clone)]
pub struct Scripted {
    /// HTTP status.
    pub status: u16,
    /// `error`.
    pub error: String,
    /// AADSTS code.
    pub code: u32,
    /// Description after "AADSTSnnnn: ".
    pub desc: String,
    /// `suberror`.
    pub suberror: Option<String>,
}

impl Scripted {
    /// The error Entra gives for `code`, with status and `error` as observed (§1.7).
    pub fn aadsts(code: u32) -> Scripted {
        let (status, error, desc, sub) = match code {
            7000215 => (
                401,
                "invalid_client",
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '00000000-0000-0000-0000-0000000c11e7'.",
                None,
            ),
            7000222 => (
                401,
                "invalid_client",
                "The provided client secret keys for app '00000000-0000-0000-0000-0000000c11e7' are expired. Visit the Azure portal to create new keys for your app.",
                None,
            ),
            7000218 => (
                401,
                "invalid_client",
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                None,
            ),
            700016 => (
                400,
                "unauthorized_client",
                "Application with identifier '00000000-0000-0000-0000-0000000c11e7' was not found in the directory 'Contoso'.",
                None,
            ),
            50194 => (
                400,
                "invalid_request",
                "Application '00000000-0000-0000-0000-0000000c11e7' is not configured as a multi-tenant application. Usage of the /common endpoint is not supported for such applications created after '10/15/2018'.",
                None,
            ),
            90002 => (
                400,
                "invalid_tenant",
                "Tenant 'contoso.example' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
                None,
            ),
            65001 => (
                400,
                "invalid_grant",
                "The user or administrator has not consented to use the application with ID '00000000-0000-0000-0000-0000000c11e7'.",
                Some("consent_required"),
            ),
            50076 => (
                400,
                "invalid_grant",
                "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
                Some("basic_action"),
            ),
            53003 => (
                400,
                "interaction_required",
                "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.",
                Some("message_only"),
            ),
            700082 => (
                400,
                "invalid_grant",
                "The refresh token has expired due to inactivity. The token was issued on 2025-01-01T00:00:00Z and was inactive for 90.00:00:00.",
                Some("bad_token"),
            ),
            503 => (
                503,
                "temporarily_unavailable",
                "The service is temporarily unavailable.",
                None,
            ),
            _ => (400, "invalid_request", "Scripted error.", None),
        };
        Scripted {
            status,
            error: error.into(),
            code,
            desc: desc.into(),
            suberror: sub.map(str::to_string),
        }
    }
}

/// What the next polls of a device code answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// `authorization_pending`.
    Pending,
    /// `slow_down`.
    SlowDown,
    /// Success as [`USER`].
    Approve,
    /// `authorization_declined`.
    Decline,
    /// `expired_token`.
    Expire,
}

/// An app registration.
#[derive(Debug, Clone, Default)]
pub struct App {
    /// Client secret value, if any.
    pub secret: Option<String>,
    /// Registered certificate (DER), if any.
    pub cert_der: Option<Vec<u8>>,
    /// "Allow public client flows".
    pub public_client: bool,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Request {
    /// Path.
    pub path: String,
    /// Form fields (or query for authorize).
    pub form: HashMap<String, String>,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
}

impl Request {
    /// A form field.
    pub fn field(&self, k: &str) -> Option<&str> {
        self.form.get(k).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
struct Grant {
    client_id: String,
    user: String,
}

#[derive(Debug)]
struct Device {
    plan: VecDeque<Poll>,
    scope: String,
    client_id: String,
    done: bool,
}

#[derive(Debug)]
struct AuthCode {
    challenge: String,
    redirect_uri: String,
    scope: String,
    client_id: String,
    used: bool,
}

/// Everything the fake knows; tests change it through [`FakeEntra::state`].
#[derive(Debug)]
pub struct State {
    base: String,
    /// Registered apps by client id.
    pub apps: HashMap<String, App>,
    /// `expires_in` of issued access tokens.
    pub lifetime: u64,
    /// Seconds Microsoft's clock is ahead of this host's: issued tokens' `iat`/`nbf`/`exp`
    /// use it (move it together with the fake Exchange's `clock_offset`, as when this host
    /// was suspended).
    pub clock_offset: u64,
    /// The next token requests fail with these, in order.
    pub script: VecDeque<Scripted>,
    /// Every token request fails with this until cleared.
    pub broken: Option<Scripted>,
    /// Wait this long before answering a token request (after logging it).
    pub delay: Duration,
    /// Plan given to the next device code.
    pub device_plan: Vec<Poll>,
    /// `interval` of device codes.
    pub device_interval: u64,
    /// Refresh tokens that Entra now answers with 700082.
    pub expired_refresh_tokens: HashSet<String>,
    /// Application permissions (`roles`) of app-only tokens instead of the usual one
    /// (`SMTP.SendAsApp` or `Mail.Send`): an app whose permission was never granted.
    pub app_roles: Option<Vec<String>>,
    /// Every request, in order.
    pub log: Vec<Request>,
    /// Access tokens issued.
    pub issued_access: Vec<String>,
    /// Refresh tokens issued (old ones stay valid).
    pub issued_refresh: Vec<String>,
    refresh_tokens: HashMap<String, Grant>,
    devices: HashMap<String, Device>,
    codes: HashMap<String, AuthCode>,
    jtis: HashSet<String>,
    n: u64,
}

impl State {
    /// Token endpoint requests so far.
    pub fn token_requests(&self) -> usize {
        self.log
            .iter()
            .filter(|r| r.path.ends_with("/token"))
            .count()
    }

    /// Register the certificate (PEM) for the app.
    pub fn register_cert(&mut self, cert_pem: &str) {
        let der = pem_der(cert_pem);
        self.apps.entry(CLIENT_ID.into()).or_default().cert_der = Some(der);
    }

    /// Make an issued refresh token answer 700082 (expired by inactivity).
    pub fn expire_refresh_token(&mut self, rt: &str) {
        self.expired_refresh_tokens.insert(rt.to_string());
    }

    /// Issue a refresh token directly (as if the user had signed in earlier).
    pub fn seed_refresh_token(&mut self) -> String {
        self.new_refresh_token(CLIENT_ID, USER)
    }

    fn next(&mut self) -> u64 {
        self.n += 1;
        self.n
    }

    fn new_refresh_token(&mut self, client_id: &str, user: &str) -> String {
        let rt = format!(
            "fake-rt-{}-{}",
            self.next(),
            hex(&rand::random::<[u8; 12]>())
        );
        self.refresh_tokens.insert(
            rt.clone(),
            Grant {
                client_id: client_id.into(),
                user: user.into(),
            },
        );
        self.issued_refresh.push(rt.clone());
        rt
    }

    fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base)
    }
}

/// The running fake.
pub struct FakeEntra {
    /// `http://127.0.0.1:PORT` (the authority).
    pub base: String,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEntra {
    /// Start with one app ([`CLIENT_ID`], secret [`SECRET`], public client flows allowed).
    pub fn start() -> FakeEntra {
        Self::start_on("127.0.0.1:0".parse().expect("address"))
    }

    /// The same on `addr` (port 0: a free one).
    pub fn start_on(addr: SocketAddr) -> FakeEntra {
        let listener = std::net::TcpListener::bind(addr).expect("bind fake entra");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let base = format!("http://{addr}");
        let mut apps = HashMap::new();
        apps.insert(
            CLIENT_ID.to_string(),
            App {
                secret: Some(SECRET.into()),
                cert_der: None,
                public_client: true,
            },
        );
        let state = Arc::new(Mutex::new(State {
            base: base.clone(),
            apps,
            lifetime: 3599,
            clock_offset: 0,
            script: VecDeque::new(),
            broken: None,
            delay: Duration::ZERO,
            device_plan: vec![Poll::Pending, Poll::Approve],
            device_interval: 1,
            expired_refresh_tokens: HashSet::new(),
            app_roles: None,
            log: Vec::new(),
            issued_access: Vec::new(),
            issued_refresh: Vec::new(),
            refresh_tokens: HashMap::new(),
            devices: HashMap::new(),
            codes: HashMap::new(),
            jtis: HashSet::new(),
            n: 0,
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = Router::new()
                    .route("/{tenant}/oauth2/v2.0/token", post(token))
                    .route("/{tenant}/oauth2/v2.0/devicecode", post(devicecode))
                    .route("/{tenant}/oauth2/v2.0/authorize", get(authorize))
                    .with_state(st);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        FakeEntra {
            base,
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Lock the state to script or inspect it.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Token endpoint requests so far.
    pub fn token_requests(&self) -> usize {
        self.state().token_requests()
    }

    /// A check that a token was issued by this fake for Exchange Online SMTP (its `aud` is an
    /// outlook resource), for the fake Exchange's `accept_tokens`.
    pub fn smtp_token_check(&self) -> crate::fake::exchange::TokenCheck {
        let state = self.state.clone();
        Arc::new(move |_mailbox: &str, token: &str| {
            let issued = state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .issued_access
                .iter()
                .any(|t| t == token);
            let aud = token
                .split('.')
                .nth(1)
                .and_then(|c| B64URL.decode(c).ok())
                .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
                .and_then(|c| c["aud"].as_str().map(str::to_string))
                .unwrap_or_default();
            issued && aud.starts_with("https://outlook.office")
        })
    }

    /// A check that an access token was issued by this fake (any audience), for the fake
    /// Graph, which reads the token's claims itself.
    pub fn issued_check(&self) -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
        let state = self.state.clone();
        Arc::new(move |token: &str| {
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .issued_access
                .iter()
                .any(|t| t == token)
        })
    }

    /// Every secret value the fake knows or issued (for leak checks).
    pub fn secrets(&self) -> Vec<String> {
        let s = self.state();
        let mut v = vec![SECRET.to_string()];
        v.extend(s.issued_access.iter().cloned());
        v.extend(s.issued_refresh.iter().cloned());
        // The signature part of access tokens alone must not leak either.
        v.extend(
            s.issued_access
                .iter()
                .filter_map(|t| t.rsplit('.').next().map(str::to_string)),
        );
        v
    }
}

impl Drop for FakeEntra {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn guid() -> String {
    let h = hex(&rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "2016-01-09 02:02:12Z", as Entra writes timestamps.
fn timestamp() -> String {
    let t = now();
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    B64.decode(body).expect("PEM base64")
}

fn json_response(status: u16, v: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store, no-cache"),
            (header::PRAGMA, "no-cache"),
        ],
        v.to_string(),
    )
        .into_response()
}

/// An error in the exact §1.6 shape.
fn error_response(e: &Scripted) -> Response {
    let (trace, corr, ts) = (guid(), guid(), timestamp());
    let mut v = json!({
        "error": e.error,
        "error_description": format!(
            "AADSTS{}: {}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {ts}",
            e.code, e.desc
        ),
        "error_codes": [e.code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": format!("https://login.microsoftonline.com/error?code={}", e.code),
    });
    if let Some(s) = &e.suberror {
        v["suberror"] = json!(s);
    }
    json_response(e.status, v)
}

fn err(status: u16, error: &str, code: u32, desc: &str) -> Response {
    error_response(&Scripted {
        status,
        error: error.into(),
        code,
        desc: desc.into(),
        suberror: None,
    })
}

fn parse_form(b: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(b).into_owned().collect()
}

/// (resource, permissions) of a scope string; `Err` when it spans several resources.
fn parse_scope(scope: &str) -> Result<(String, Vec<String>), Response> {
    let mut resource: Option<String> = None;
    let mut perms = Vec::new();
    for s in scope.split_whitespace() {
        if matches!(s, "offline_access" | "openid" | "profile" | "email") {
            continue;
        }
        let Some((r, p)) = s.rsplit_once('/') else {
            return Err(err(
                400,
                "invalid_scope",
                70011,
                &format!(
                    "The provided value for the input parameter 'scope' isn't valid. The scope {s} isn't valid."
                ),
            ));
        };
        match &resource {
            Some(x) if x != r => {
                return Err(err(
                    400,
                    "invalid_scope",
                    700022,
                    "The provided value for the input parameter scope isn't valid because it contains more than one resource.",
                ));
            }
            _ => resource = Some(r.to_string()),
        }
        perms.push(p.to_string());
    }
    match resource {
        Some(r) => Ok((r, perms)),
        None => Err(err(
            400,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' isn't valid.",
        )),
    }
}

fn access_token(
    st: &mut State,
    resource: &str,
    client_id: &str,
    delegated: Option<(&str, &[String])>,
) -> String {
    let n = st.next();
    let t = now() + st.clock_offset;
    let mut claims = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": t, "nbf": t, "exp": t + st.lifetime,
        "tid": TENANT_ID,
        "appid": client_id,
        "ver": "1.0",
        "uti": format!("fake-uti-{n}"),
    });
    match delegated {
        Some((user, perms)) => {
            claims["upn"] = json!(user);
            claims["oid"] = json!("0b1d0000-0000-4000-8000-00000000005e");
            claims["scp"] = json!(perms.join(" "));
        }
        None => {
            claims["oid"] = json!("5e7d1ce0-0000-4000-8000-0000000000a9");
            let role = if resource.contains("graph") {
                "Mail.Send"
            } else {
                "SMTP.SendAsApp"
            };
            claims["roles"] = match &st.app_roles {
                Some(r) => json!(r),
                None => json!([role]),
            };
        }
    }
    let tok = format!(
        "{}.{}.{}",
        B64URL.encode(r#"{"typ":"JWT","alg":"RS256","kid":"fake-entra"}"#),
        B64URL.encode(claims.to_string()),
        B64URL.encode(format!(
            "fake-signature-{n}-{}",
            hex(&rand::random::<[u8; 8]>())
        ))
    );
    st.issued_access.push(tok.clone());
    tok
}

fn success(st: &State, access: String, refresh: Option<String>, scope: Option<&str>) -> Response {
    let mut v = json!({
        "token_type": "Bearer",
        "expires_in": st.lifetime,
        "ext_expires_in": st.lifetime,
        "access_token": access,
    });
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    if let Some(s) = scope {
        v["scope"] = json!(s);
    }
    json_response(200, v)
}

/// Check the client's credential. `Ok(true)` = authenticated confidentially, `Ok(false)` =
/// no credential (public client).
fn client_auth(
    st: &mut State,
    tenant: &str,
    form: &HashMap<String, String>,
    authorization: Option<&str>,
) -> Result<(String, bool), Response> {
    let mut client_id = form.get("client_id").cloned();
    let mut presented_secret = form.get("client_secret").cloned();
    if let Some(h) = authorization.and_then(|h| h.strip_prefix("Basic ")) {
        let decoded = B64
            .decode(h.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some((id, secret)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Err(err(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            ));
        };
        let dec = |s: &str| -> String {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        client_id.get_or_insert_with(|| dec(id));
        presented_secret = Some(dec(secret));
    }
    let Some(client_id) = client_id else {
        return Err(err(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        ));
    };
    let Some(app) = st.apps.get(&client_id).cloned() else {
        let s = Scripted::aadsts(700016);
        return Err(error_response(&s));
    };
    if let Some(secret) = presented_secret {
        return match &app.secret {
            Some(s) if *s == secret => Ok((client_id, true)),
            _ => Err(error_response(&Scripted::aadsts(7000215))),
        };
    }
    if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err(err(
                400,
                "invalid_request",
                9002313,
                "Invalid request. client_assertion_type is missing or wrong.",
            ));
        }
        let aud = st.token_url(tenant);
        verify_assertion(st, &app, &client_id, assertion, &aud)?;
        return Ok((client_id, true));
    }
    Ok((client_id, false))
}

fn verify_assertion(
    st: &mut State,
    app: &App,
    client_id: &str,
    jwt: &str,
    aud: &str,
) -> Result<(), Response> {
    let bad_sig = || {
        err(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        )
    };
    let not_registered = || {
        err(
            401,
            "invalid_client",
            700027,
            "The certificate with identifier used to sign the client assertion is not registered on application.",
        )
    };
    let claim_err = |why: &str| err(401, "invalid_client", 50012, why);
    let Some(cert) = &app.cert_der else {
        return Err(not_registered());
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err(bad_sig());
    }
    let dec = |s: &str| -> Option<Value> { serde_json::from_slice(&B64URL.decode(s).ok()?).ok() };
    let (Some(h), Some(c), Ok(sig)) = (dec(parts[0]), dec(parts[1]), B64URL.decode(parts[2]))
    else {
        return Err(bad_sig());
    };
    let thumb_ok = if let Some(t) = h.get("x5t#S256").and_then(Value::as_str) {
        t == B64URL.encode(digest::digest(&digest::SHA256, cert))
    } else if let Some(t) = h.get("x5t").and_then(Value::as_str) {
        t == B64URL.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, cert))
    } else {
        false
    };
    if !thumb_ok {
        return Err(not_registered());
    }
    let alg: &'static dyn signature::VerificationAlgorithm =
        match h.get("alg").and_then(Value::as_str) {
            Some("PS256") => &signature::RSA_PSS_2048_8192_SHA256,
            Some("RS256") => &signature::RSA_PKCS1_2048_8192_SHA256,
            _ => return Err(bad_sig()),
        };
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|_| bad_sig())?;
    let spki = x509.public_key().subject_public_key.data.to_vec();
    let input = format!("{}.{}", parts[0], parts[1]);
    UnparsedPublicKey::new(alg, &spki)
        .verify(input.as_bytes(), &sig)
        .map_err(|_| bad_sig())?;
    let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
    if s("aud") != aud {
        return Err(claim_err(&format!(
            "The audience claim of the client assertion ({}) does not match the token endpoint.",
            s("aud")
        )));
    }
    if s("iss") != client_id || s("sub") != client_id {
        return Err(claim_err(
            "The issuer and subject of the client assertion must be the client id.",
        ));
    }
    let t = now();
    let exp = c.get("exp").and_then(Value::as_u64).unwrap_or(0);
    let nbf = c.get("nbf").and_then(Value::as_u64).unwrap_or(u64::MAX);
    if exp <= t || nbf > t + 300 {
        return Err(claim_err(
            "The client assertion is not within its valid time range.",
        ));
    }
    let jti = s("jti").to_string();
    if jti.is_empty() || !st.jtis.insert(jti) {
        return Err(claim_err(
            "The jti of the client assertion was already used.",
        ));
    }
    Ok(())
}

async fn token(
    AxState(st): AxState<Shared>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let delay = {
        let mut s = lock(&st);
        s.log.push(Request {
            path: format!("/{tenant}/oauth2/v2.0/token"),
            form: form.clone(),
            authorization: authorization.clone(),
        });
        s.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = lock(&st);
    token_locked(&mut s, &tenant, &form, authorization.as_deref())
}

fn token_locked(
    s: &mut State,
    tenant: &str,
    form: &HashMap<String, String>,
    authorization: Option<&str>,
) -> Response {
    if tenant != TENANT && tenant != TENANT_ID {
        let mut e = Scripted::aadsts(90002);
        e.desc = format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
        );
        return error_response(&e);
    }
    if let Some(e) = s.script.pop_front() {
        return error_response(&e);
    }
    if let Some(e) = &s.broken {
        return error_response(e);
    }
    let (client_id, confidential) = match client_auth(s, tenant, form, authorization) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let app = s.apps.get(&client_id).cloned().unwrap_or_default();
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    let needs_secret = app.secret.is_some() || app.cert_der.is_some();
    if !confidential && (grant == "client_credentials" || (needs_secret && !app.public_client)) {
        return error_response(&Scripted::aadsts(7000218));
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    match grant {
        "client_credentials" => {
            let (resource, perms) = match parse_scope(&scope) {
                Ok(x) => x,
                Err(r) => return r,
            };
            if perms != [".default"] {
                return err(
                    400,
                    "invalid_scope",
                    1002012,
                    &format!(
                        "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                    ),
                );
            }
            let tok = access_token(s, &resource, &client_id, None);
            success(s, tok, None, None)
        }
        "refresh_token" => {
            let rt = form.get("refresh_token").cloned().unwrap_or_default();
            if s.expired_refresh_tokens.contains(&rt) {
                return error_response(&Scripted::aadsts(700082));
            }
            let Some(g) = s.refresh_tokens.get(&rt).cloned() else {
                return err(
                    400,
                    "invalid_grant",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                );
            };
            if g.client_id != client_id {
                return err(
                    400,
                    "invalid_grant",
                    70000,
                    "Provided grant is invalid or malformed.",
                );
            }
            delegated_success(s, &scope, &client_id, &g.user)
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let dc = form.get("device_code").cloned().unwrap_or_default();
            let Some(d) = s.devices.get_mut(&dc) else {
                return err(
                    400,
                    "bad_verification_code",
                    70018,
                    "The provided value for the input parameter 'device_code' is not valid.",
                );
            };
            if d.done {
                return err(
                    400,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed.",
                );
            }
            let step = if d.plan.len() > 1 {
                d.plan.pop_front()
            } else {
                d.plan.front().cloned()
            };
            match step.unwrap_or(Poll::Expire) {
                Poll::Pending => err(
                    400,
                    "authorization_pending",
                    70016,
                    "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                ),
                Poll::SlowDown => json_response(
                    400,
                    json!({"error": "slow_down", "error_description": "Slow down polling."}),
                ),
                Poll::Decline => err(
                    400,
                    "authorization_declined",
                    70000,
                    "The user declined the sign-in.",
                ),
                Poll::Expire => err(400, "expired_token", 70019, "Verification code expired."),
                Poll::Approve => {
                    d.done = true;
                    let (scope, cid) = (d.scope.clone(), d.client_id.clone());
                    delegated_success(s, &scope, &cid, USER)
                }
            }
        }
        "authorization_code" => {
            let code = form.get("code").cloned().unwrap_or_default();
            let Some(c) = s.codes.get_mut(&code) else {
                return err(
                    400,
                    "invalid_grant",
                    70000,
                    "Provided grant is invalid or malformed.",
                );
            };
            if c.used {
                return err(
                    400,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                );
            }
            c.used = true;
            if form.get("redirect_uri") != Some(&c.redirect_uri) {
                return err(
                    400,
                    "invalid_grant",
                    70000,
                    "The redirect URI does not match the one used to obtain the code.",
                );
            }
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            let computed = B64URL.encode(digest::digest(&digest::SHA256, verifier.as_bytes()));
            if computed != c.challenge {
                return err(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                );
            }
            let cid = c.client_id.clone();
            let sc = if scope.is_empty() {
                c.scope.clone()
            } else {
                scope
            };
            delegated_success(s, &sc, &cid, USER)
        }
        other => err(
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{other}'."),
        ),
    }
}

fn delegated_success(s: &mut State, scope: &str, client_id: &str, user: &str) -> Response {
    let (resource, perms) = match parse_scope(scope) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let tok = access_token(s, &resource, client_id, Some((user, &perms)));
    let rt = scope
        .split_whitespace()
        .any(|x| x == "offline_access")
        .then(|| s.new_refresh_token(client_id, user));
    let granted: Vec<String> = perms.iter().map(|p| format!("{resource}/{p}")).collect();
    success(s, tok, rt, Some(&granted.join(" ")))
}

async fn devicecode(
    AxState(st): AxState<Shared>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let mut s = lock(&st);
    s.log.push(Request {
        path: format!("/{tenant}/oauth2/v2.0/devicecode"),
        form: form.clone(),
        authorization: None,
    });
    if tenant != TENANT && tenant != TENANT_ID {
        return error_response(&Scripted::aadsts(90002));
    }
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    if !s.apps.contains_key(&client_id) {
        return error_response(&Scripted::aadsts(700016));
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    if let Err(r) = parse_scope(&scope) {
        return r;
    }
    let n = s.next();
    let dc = format!("fake-dc-{n}-{}", hex(&rand::random::<[u8; 16]>()));
    let user_code = format!("F{n:03}KECDE");
    let plan = s.device_plan.iter().cloned().collect();
    s.devices.insert(
        dc.clone(),
        Device {
            plan,
            scope,
            client_id,
            done: false,
        },
    );
    let uri = format!("{}/link", s.base);
    json_response(
        200,
        json!({
            "user_code": user_code,
            "device_code": dc,
            "verification_uri": uri,
            "expires_in": 900,
            "interval": s.device_interval,
            "message": format!("To sign in, use a web browser to open the page {uri} and enter the code {user_code} to authenticate."),
        }),
    )
}

async fn authorize(
    AxState(st): AxState<Shared>,
    Path(tenant): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let form = parse_form(q.unwrap_or_default().as_bytes());
    let mut s = lock(&st);
    s.log.push(Request {
        path: format!("/{tenant}/oauth2/v2.0/authorize"),
        form: form.clone(),
        authorization: None,
    });
    let f = |k: &str| form.get(k).cloned().unwrap_or_default();
    let redirect = f("redirect_uri");
    if !(redirect.starts_with("http://localhost") || redirect.starts_with("http://127.0.0.1")) {
        return (StatusCode::BAD_REQUEST, "AADSTS50011: The redirect URI specified in the request does not match the redirect URIs configured for the application.").into_response();
    }
    let sep = if redirect.contains('?') { '&' } else { '?' };
    if !s.apps.contains_key(&f("client_id"))
        || f("response_type") != "code"
        || f("code_challenge_method") != "S256"
    {
        let loc = format!(
            "{redirect}{sep}error=invalid_request&error_description=AADSTS900144%3A+bad+authorize+request&state={}",
            f("state")
        );
        return (StatusCode::FOUND, [(header::LOCATION, loc)]).into_response();
    }
    let n = s.next();
    let code = format!("fake-code-{n}-{}", hex(&rand::random::<[u8; 16]>()));
    s.codes.insert(
        code.clone(),
        AuthCode {
            challenge: f("code_challenge"),
            redirect_uri: redirect.clone(),
            scope: f("scope"),
            client_id: f("client_id"),
            used: false,
        },
    );
    let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let loc = format!(
        "{redirect}{sep}code={}&state={}",
        enc(&code),
        enc(&f("state"))
    );
    (StatusCode::FOUND, [(header::LOCATION, loc)]).into_response()
}
