//! The Microsoft identity platform v2.0 token endpoint (microsoft-reference.md §1): client
//! credentials (secret in the body or HTTP Basic, or a certificate assertion), refresh tokens,
//! device code, authorization code + PKCE; scopes (§2); Entra's error JSON (§1.6) and the
//! classification of every failure (§1.7, §9 rows 23–39) into transient or configuration,
//! with what to do in the Entra admin centre.
//!
//! Credentials (secret files, key files) are read on every token request, so an admin who
//! fixes a file sees mail flow again without a restart.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::Value;
use zeroize::Zeroizing;

use super::assertion::CertCredential;
use super::{Audience, Misconfiguration, TokenError};
use crate::config::{AccountConfig, Cloud, Credential, Endpoints, SecretSource, SecretStyle};
use crate::secret::Secret;

/// `client_assertion_type` for certificate credentials.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `grant_type` of device code polling.
pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Scopes (§2)

/// Whether a token is the app's own (client credentials) or a signed-in user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// Client credentials: `{resource}/.default`, no refresh token.
    AppOnly,
    /// Delegated: explicit permissions plus `offline_access` for a refresh token.
    Delegated,
}

/// The exact scope string for a token request.
///
/// `shared` (Graph delegated only) adds `Mail.Send.Shared`, needed when the mailbox is not the
/// signed-in user's own (a shared mailbox or another user the signed-in user may send as).
pub fn scope(endpoints: &Endpoints, audience: Audience, kind: GrantKind, shared: bool) -> String {
    match (audience, kind) {
        (Audience::Smtp, GrantKind::Delegated) => format!(
            "{}/SMTP.Send offline_access",
            endpoints.smtp_delegated_resource
        ),
        (Audience::Smtp, GrantKind::AppOnly) => format!("{}/.default", endpoints.smtp_app_resource),
        (Audience::Graph, GrantKind::Delegated) if shared => format!(
            "{g}/Mail.Send {g}/Mail.Send.Shared offline_access",
            g = endpoints.graph_url
        ),
        (Audience::Graph, GrantKind::Delegated) => {
            format!("{}/Mail.Send offline_access", endpoints.graph_url)
        }
        (Audience::Graph, GrantKind::AppOnly) => format!("{}/.default", endpoints.graph_url),
    }
}

/// The grant kind an account's credential implies.
pub fn grant_kind(account: &AccountConfig) -> GrantKind {
    match account.credential {
        Credential::Delegated { .. } => GrantKind::Delegated,
        _ => GrantKind::AppOnly,
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

/// A successful token response (§1.1, §1.3).
#[derive(Debug, Clone)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: Secret<String>,
    /// Lifetime in seconds (3599 usually).
    pub expires_in: u64,
    /// A new refresh token (delegated flows with `offline_access`).
    pub refresh_token: Option<Secret<String>>,
    /// The granted scopes, when Entra says.
    pub scope: Option<String>,
}

/// Entra's error JSON (§1.6), every field kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntraError {
    /// HTTP status.
    pub status: u16,
    /// `error` (`invalid_client`...).
    pub error: String,
    /// `error_description` (starts with `AADSTSnnnn:`; ends with trace lines).
    pub description: String,
    /// `error_codes`.
    pub codes: Vec<u32>,
    /// `suberror` (`consent_required`, `basic_action`, `message_only`, `bad_token`).
    pub suberror: Option<String>,
    /// `trace_id`.
    pub trace_id: Option<String>,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
}

impl EntraError {
    /// Parse an error body; `None` when it is not Entra's JSON shape.
    pub fn parse(status: u16, body: &[u8]) -> Option<EntraError> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let error = v.get("error")?.as_str()?.to_string();
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let mut codes: Vec<u32> = v
            .get("error_codes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .filter_map(|c| u32::try_from(c).ok())
                    .collect()
            })
            .unwrap_or_default();
        let description = s("error_description").unwrap_or_default();
        if codes.is_empty() {
            // Some proxies and older endpoints drop error_codes; the description still
            // starts with "AADSTSnnnn:".
            codes.extend(aadsts_in(&description));
        }
        Some(EntraError {
            status,
            error,
            description,
            codes,
            suberror: s("suberror"),
            trace_id: s("trace_id"),
            correlation_id: s("correlation_id"),
        })
    }

    /// The first AADSTS code.
    pub fn code(&self) -> Option<u32> {
        self.codes.first().copied()
    }

    /// The description's first line, without the trace/correlation/timestamp lines.
    pub fn summary(&self) -> String {
        let first = self
            .description
            .split(['\r', '\n'])
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        first.chars().take(400).collect()
    }

    /// Whether retrying later may succeed by itself (§1.6: `temporarily_unavailable`; 5xx, 429).
    pub fn is_transient(&self) -> bool {
        self.status >= 500 || self.status == 429 || self.error == "temporarily_unavailable"
    }
}

/// The first `AADSTSnnnn` code in a text.
pub fn aadsts_in(text: &str) -> Option<u32> {
    let i = text.find("AADSTS")?;
    let digits: String = text[i + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Classification

/// What a request was for, so the advice can name the right permission and command.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The account.
    pub account: &'a AccountConfig,
    /// The mailbox (delegated), or "" for app-only.
    pub mailbox: &'a str,
    /// The audience asked for.
    pub audience: Audience,
}

impl Context<'_> {
    fn app(&self) -> String {
        format!(
            "Entra admin centre → App registrations → the app with Application (client) ID {}",
            self.account.client_id
        )
    }

    fn login_cmd(&self) -> String {
        let m = if self.mailbox.is_empty() {
            "ADDRESS"
        } else {
            self.mailbox
        };
        format!(
            "`postern login {} --mailbox {m} --for {}`",
            self.account.name, self.audience
        )
    }

    fn permission(&self) -> &'static str {
        match (self.audience, grant_kind(self.account)) {
            (Audience::Smtp, GrantKind::Delegated) => {
                "Office 365 Exchange Online → Delegated permissions → SMTP.Send"
            }
            (Audience::Smtp, GrantKind::AppOnly) => {
                "Office 365 Exchange Online (APIs my organization uses) → Application permissions → SMTP.SendAsApp"
            }
            (Audience::Graph, GrantKind::Delegated) => {
                "Microsoft Graph → Delegated permissions → Mail.Send (and Mail.Send.Shared for shared mailboxes)"
            }
            (Audience::Graph, GrantKind::AppOnly) => {
                "Microsoft Graph → Application permissions → Mail.Send"
            }
        }
    }

    fn secret_place(&self) -> String {
        match &self.account.credential {
            Credential::ClientSecret { secret, .. } => describe_source(secret),
            Credential::Delegated {
                secret: Some(secret),
            } => describe_source(secret),
            _ => "client_secret_file".into(),
        }
    }
}

/// Where a secret comes from, in config words (never the value).
pub fn describe_source(s: &SecretSource) -> String {
    match s {
        SecretSource::File(p) => format!("the file {}", p.display()),
        SecretSource::Env(v) => format!("the environment variable {v}"),
        SecretSource::SystemdCredential(n) => format!("the systemd credential {n}"),
        SecretSource::Inline(_) => "client_secret in the config file".into(),
    }
}

fn cloud_name(c: Cloud) -> &'static str {
    match c {
        Cloud::Global => "global",
        Cloud::UsGov => "usgov",
        Cloud::UsGovDod => "usgov-dod",
        Cloud::China => "china",
    }
}

/// What an AADSTS code means and what to do, for this account (§1.7, §9 rows 23–39): the
/// words of [`crate::diagnosis`]'s table, filled in with this account's names and paths, so
/// the log, `explain` and `doctor` say the same; Entra's own words for codes it lacks.
pub fn explain(code: Option<u32>, e: &EntraError, cx: &Context<'_>) -> (String, String) {
    let a = cx.account;
    let app = cx.app();
    if let Some(entry) = code.and_then(crate::diagnosis::for_aadsts) {
        let mailbox = if cx.mailbox.is_empty() {
            "ADDRESS"
        } else {
            cx.mailbox
        };
        let vars = crate::diagnosis::Vars::new()
            .set("account", a.name.clone())
            .set("mailbox", mailbox)
            .set("client_id", a.client_id.clone())
            .set("tenant", a.tenant.clone())
            .set("cloud", cloud_name(a.cloud))
            // One style of admin-centre path in every message: the table's "A > B".
            .set("app", app.replace(" → ", " > "))
            .set("secret_place", cx.secret_place())
            .set("login_cmd", cx.login_cmd())
            .set("permission", cx.permission().replace(" → ", " > "))
            .set(
                "scope",
                scope(&a.endpoints, cx.audience, grant_kind(a), false),
            )
            .set(
                "cert",
                match &a.credential {
                    Credential::Certificate { cert, .. } => cert.display().to_string(),
                    _ => "the account's certificate".into(),
                },
            )
            .app_only(grant_kind(a) == GrantKind::AppOnly);
        // A clause of the log line ("account contoso: the client secret is wrong ..."), so
        // its first word goes lower-case unless it is a name (Entra, Conditional Access...).
        let meaning = vars.fill(entry.meaning);
        let meaning = match meaning.split_once(' ') {
            Some((first @ ("The" | "A" | "An" | "Nobody"), rest)) => {
                format!("{} {rest}", first.to_ascii_lowercase())
            }
            _ => meaning,
        };
        return (
            meaning.trim_end_matches('.').to_string(),
            crate::diagnosis::fix_steps(entry, &vars),
        );
    }
    let meaning = if e.summary().is_empty() {
        format!("Entra refused the request ({})", e.error)
    } else {
        format!("Entra refused the request: {}", e.summary())
    };
    let advice = match code {
        Some(c) => format!(
            "look up AADSTS{c} at https://login.microsoftonline.com/error?code={c} and check {app}"
        ),
        None => format!("check {app}"),
    };
    (meaning, advice)
}

/// Turn an Entra error answer into a [`TokenError`].
pub fn classify(e: &EntraError, cx: &Context<'_>) -> TokenError {
    if e.is_transient() {
        let mut s = format!("HTTP {} {}", e.status, e.error);
        if let Some(c) = e.code() {
            s.push_str(&format!(" AADSTS{c}"));
        }
        if let Some(t) = &e.trace_id {
            s.push_str(&format!(" (trace id {t})"));
        }
        return TokenError::Transient(s);
    }
    let code = e.code();
    let (meaning, advice) = explain(code, e, cx);
    TokenError::Configuration(Box::new(Misconfiguration {
        account: cx.account.name.clone(),
        mailbox: cx.mailbox.to_string(),
        code,
        error: Some(e.error.clone()),
        suberror: e.suberror.clone(),
        description: Some(e.summary()).filter(|s| !s.is_empty()),
        trace_id: e.trace_id.clone(),
        correlation_id: e.correlation_id.clone(),
        meaning,
        advice,
    }))
}

/// A non-JSON HTTP failure (a proxy's page, a wrong URL).
fn classify_http(status: u16, what: &str, cx: &Context<'_>) -> TokenError {
    match status {
        407 => TokenError::local(
            &cx.account.name,
            cx.mailbox,
            format!("the proxy demands authentication (HTTP 407 from {what})"),
            "put the credentials into the account's proxy URL (http://user:password@host:port) or fix HTTPS_PROXY".into(),
        ),
        404 | 405 => TokenError::local(
            &cx.account.name,
            cx.mailbox,
            format!("{what} answered HTTP {status}: it is not an Entra token endpoint"),
            "check the account's authority / token_url overrides (or remove them to use the cloud's defaults)".into(),
        ),
        _ => TokenError::Transient(format!("{what} answered HTTP {status} without Entra's error JSON")),
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// Read a secret from where the config says. A missing file or variable is a configuration
/// error (the admin must fix it), never a panic.
pub fn read_secret(src: &SecretSource) -> Result<Secret<String>, String> {
    let v = match src {
        SecretSource::Inline(s) => return Ok(s.clone()),
        SecretSource::File(p) => {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?
        }
        SecretSource::Env(name) => std::env::var(name)
            .map_err(|_| format!("the environment variable {name} is not set"))?,
        SecretSource::SystemdCredential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!("systemd credential {name}: $CREDENTIALS_DIRECTORY is not set (add LoadCredential={name}:... to the unit)")
            })?;
            let p = std::path::Path::new(&dir).join(name);
            std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read systemd credential {}: {e}", p.display()))?
        }
    };
    let v = Secret::new(v);
    let trimmed = v.expose().trim_end_matches(['\r', '\n']);
    if trimmed.is_empty() {
        return Err(format!("{} is empty", describe_source(src)));
    }
    Ok(Secret::new(trimmed.to_string()))
}

/// A form body. Every value is a [`Secret`] (so wiped after use), since several are
/// credentials: client secret, assertion, refresh token, device code, code verifier.
type Form = Vec<(&'static str, Secret<String>)>;

fn field(k: &'static str, v: &str) -> (&'static str, Secret<String>) {
    (k, Secret::new(v.to_string()))
}

/// How a request proves the client's identity.
enum ClientAuth {
    None,
    Body(Secret<String>),
    Basic(Secret<String>),
    Assertion(Secret<String>),
}

// ---------------------------------------------------------------------------------------------
// Device code and PKCE

/// The answer to a device code request (§1.4).
#[derive(Debug, Clone)]
pub struct DeviceCode {
    /// Opaque code to poll with (short-lived; still not printed).
    pub device_code: Secret<String>,
    /// The code the user types.
    pub user_code: String,
    /// Where the user types it.
    pub verification_uri: String,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Seconds between polls.
    pub interval: u64,
    /// Entra's ready-made instruction.
    pub message: String,
}

/// One poll of the device code flow.
#[derive(Debug)]
pub enum DevicePoll {
    /// The user has not finished: wait `interval` and poll again.
    Pending,
    /// Poll less often: add 5 s to the interval (RFC 8628 §3.5).
    SlowDown,
    /// Signed in.
    Done(TokenResponse),
    /// The user declined (stop).
    Declined,
    /// The code expired before the user finished (stop).
    Expired,
    /// Entra did not recognise the device code (stop).
    BadCode,
}

/// A PKCE pair: a 43-character verifier and its S256 challenge.
pub fn pkce_pair() -> (Secret<String>, String) {
    let verifier = B64URL.encode(rand::random::<[u8; 32]>());
    let challenge = pkce_challenge(&verifier);
    (Secret::new(verifier), challenge)
}

/// `base64url(SHA-256(verifier))`, no padding.
pub fn pkce_challenge(verifier: &str) -> String {
    B64URL.encode(digest::digest(&digest::SHA256, verifier.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// The client

/// Talks to one account's token endpoint.
#[derive(Debug, Clone)]
pub struct EntraClient {
    account: AccountConfig,
    http: reqwest::Client,
}

impl EntraClient {
    /// A client for `account` (its HTTPS client is built now; errors are configuration errors).
    pub fn new(account: AccountConfig) -> Result<Self, TokenError> {
        let http = super::http::client(&account).map_err(|e| {
            TokenError::local(
                &account.name,
                "",
                format!("cannot set up HTTPS: {e}"),
                format!("fix the [account.{}] settings named above", account.name),
            )
        })?;
        Ok(EntraClient { account, http })
    }

    /// The account this client serves.
    pub fn account(&self) -> &AccountConfig {
        &self.account
    }

    fn cx<'a>(&'a self, mailbox: &'a str, audience: Audience) -> Context<'a> {
        Context {
            account: &self.account,
            mailbox,
            audience,
        }
    }

    fn local(&self, mailbox: &str, meaning: String, advice: String) -> TokenError {
        TokenError::local(&self.account.name, mailbox, meaning, advice)
    }

    /// The client authentication this account's credential calls for.
    fn client_auth(&self, mailbox: &str) -> Result<ClientAuth, TokenError> {
        let a = &self.account;
        let fix = |what: String| {
            self.local(
                mailbox,
                format!("cannot read the client credential: {what}"),
                format!("fix the credential settings of [account.{}]", a.name),
            )
        };
        match &a.credential {
            // `secret_expires` is only a reminder (warned about daily): the date is read as
            // 00:00 UTC while the secret lives until a time later that day, so Entra's answer
            // (AADSTS7000222) decides, not the date.
            Credential::ClientSecret { secret, style, .. } => {
                let s = read_secret(secret).map_err(fix)?;
                Ok(match style {
                    SecretStyle::Body => ClientAuth::Body(s),
                    SecretStyle::Basic => ClientAuth::Basic(s),
                })
            }
            Credential::Certificate { cert, key, alg } => {
                let pem = std::fs::read(cert)
                    .map_err(|e| fix(format!("certificate {}: {e}", cert.display())))?;
                let key = read_secret(key).map_err(fix)?;
                let cred = CertCredential::load(&pem, &key)
                    .map_err(|e| fix(format!("certificate {}: {e}", cert.display())))?;
                let jwt = cred
                    .sign(*alg, &a.client_id, &a.endpoints.token_url, now_secs())
                    .map_err(|e| fix(e.to_string()))?;
                Ok(ClientAuth::Assertion(jwt))
            }
            Credential::Delegated { secret: Some(s) } => {
                Ok(ClientAuth::Body(read_secret(s).map_err(fix)?))
            }
            Credential::Delegated { secret: None } => Ok(ClientAuth::None),
        }
    }

    /// POST a form to `url` with client authentication; the raw outcome.
    async fn post(
        &self,
        url: &str,
        mut form: Form,
        auth: ClientAuth,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), String> {
        form.push(field("client_id", &self.account.client_id));
        let mut req = self.http.post(url);
        match auth {
            ClientAuth::None => {}
            ClientAuth::Body(s) => form.push(("client_secret", s)),
            ClientAuth::Assertion(j) => {
                form.push(field("client_assertion_type", ASSERTION_TYPE));
                form.push(("client_assertion", j));
            }
            ClientAuth::Basic(s) => {
                // RFC 6749 §2.3.1: both parts form-urlencoded before base64.
                let enc = |v: &str| {
                    url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                };
                let creds = Secret::new(format!(
                    "{}:{}",
                    enc(&self.account.client_id),
                    enc(s.expose())
                ));
                let mut hv = reqwest::header::HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(creds.expose())
                ))
                .map_err(|_| "client secret cannot be sent in a header".to_string())?;
                hv.set_sensitive(true);
                req = req.header(reqwest::header::AUTHORIZATION, hv);
            }
        }
        // The serializer is not Send: build the body in a block so it is gone before .await.
        let body = {
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &form {
                ser.append_pair(k, v.expose());
            }
            Secret::new(ser.finish())
        };
        let resp = req
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.expose().clone())
            .send()
            .await
            .map_err(|e| describe_reqwest(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| describe_reqwest(&e))?;
        Ok((status, Zeroizing::new(bytes.to_vec())))
    }

    /// POST to the token endpoint; success, or a classified error.
    async fn token_request(
        &self,
        form: Form,
        mailbox: &str,
        audience: Audience,
    ) -> Result<Result<TokenResponse, EntraError>, TokenError> {
        let auth = self.client_auth(mailbox)?;
        let url = &self.account.endpoints.token_url;
        let (status, body) = self
            .post(url, form, auth)
            .await
            .map_err(TokenError::Transient)?;
        if status == 200 {
            return parse_token_response(&body).map(Ok).map_err(|why| {
                TokenError::Transient(format!("the token endpoint's answer is unusable: {why}"))
            });
        }
        match EntraError::parse(status, &body) {
            Some(e) => Ok(Err(e)),
            None => Err(classify_http(
                status,
                "the token endpoint",
                &self.cx(mailbox, audience),
            )),
        }
    }

    /// The `scope` form field for `audience` and the kind of grant (microsoft-reference §2).
    fn scope_field(
        &self,
        audience: Audience,
        kind: GrantKind,
        shared: bool,
    ) -> (&'static str, Secret<String>) {
        (
            "scope",
            Secret::new(scope(&self.account.endpoints, audience, kind, shared)),
        )
    }

    /// A token request whose Entra errors are classified (every grant but device polling,
    /// which treats some of them as "keep waiting").
    async fn grant(
        &self,
        form: Form,
        mailbox: &str,
        audience: Audience,
    ) -> Result<TokenResponse, TokenError> {
        let r = self
            .token_request(form, mailbox, audience)
            .await
            .and_then(|r| r.map_err(|e| classify(&e, &self.cx(mailbox, audience))));
        crate::metrics::token(&self.account.name, &r);
        r
    }

    /// Client credentials grant (§1.1, §1.2): an app-only token for `audience`.
    pub async fn client_credentials(
        &self,
        audience: Audience,
    ) -> Result<TokenResponse, TokenError> {
        if grant_kind(&self.account) == GrantKind::Delegated {
            return Err(self.local(
                "",
                "this account is delegated (auth = \"delegated\"): it has no app-only tokens"
                    .into(),
                "give a mailbox, or use auth = \"client_secret\" / \"certificate\"".into(),
            ));
        }
        let form = vec![
            field("grant_type", "client_credentials"),
            self.scope_field(audience, GrantKind::AppOnly, false),
        ];
        self.grant(form, "", audience).await
    }

    /// Refresh token grant (§1.3). The caller must store the rotated refresh token.
    pub async fn refresh(
        &self,
        refresh_token: &Secret<String>,
        mailbox: &str,
        audience: Audience,
        shared: bool,
    ) -> Result<TokenResponse, TokenError> {
        let form = vec![
            field("grant_type", "refresh_token"),
            self.scope_field(audience, GrantKind::Delegated, shared),
            ("refresh_token", refresh_token.clone()),
        ];
        self.grant(form, mailbox, audience).await
    }

    /// Start the device code flow (§1.4).
    pub async fn device_start(
        &self,
        mailbox: &str,
        audience: Audience,
        shared: bool,
    ) -> Result<DeviceCode, TokenError> {
        let form = vec![self.scope_field(audience, GrantKind::Delegated, shared)];
        let url = &self.account.endpoints.device_code_url;
        let (status, body) = self
            .post(url, form, ClientAuth::None)
            .await
            .map_err(TokenError::Transient)?;
        let cx = self.cx(mailbox, audience);
        if status != 200 {
            return Err(match EntraError::parse(status, &body) {
                Some(e) => classify(&e, &cx),
                None => classify_http(status, "the device code endpoint", &cx),
            });
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            TokenError::Transient(format!(
                "the device code endpoint's answer is not JSON: {e}"
            ))
        })?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(device_code), Some(user_code), Some(verification_uri)) =
            (s("device_code"), s("user_code"), s("verification_uri"))
        else {
            return Err(TokenError::Transient(
                "the device code endpoint's answer lacks device_code, user_code or verification_uri"
                    .into(),
            ));
        };
        Ok(DeviceCode {
            device_code: Secret::new(device_code),
            message: s("message").unwrap_or_else(|| {
                format!("To sign in, open {verification_uri} and enter the code {user_code}.")
            }),
            user_code,
            verification_uri,
            expires_in: num(&v, "expires_in").unwrap_or(900),
            interval: num(&v, "interval").unwrap_or(5).max(1),
        })
    }

    /// Poll the device code flow once.
    pub async fn device_poll(
        &self,
        device: &DeviceCode,
        mailbox: &str,
        audience: Audience,
    ) -> Result<DevicePoll, TokenError> {
        let form = vec![
            field("grant_type", DEVICE_GRANT),
            ("device_code", device.device_code.clone()),
        ];
        match self.token_request(form, mailbox, audience).await? {
            Ok(t) => Ok(DevicePoll::Done(t)),
            Err(e) => match e.error.as_str() {
                "authorization_pending" => Ok(DevicePoll::Pending),
                "slow_down" => Ok(DevicePoll::SlowDown),
                "authorization_declined" => Ok(DevicePoll::Declined),
                "expired_token" => Ok(DevicePoll::Expired),
                "bad_verification_code" => Ok(DevicePoll::BadCode),
                _ => Err(classify(&e, &self.cx(mailbox, audience))),
            },
        }
    }

    /// The authorize URL for a browser sign-in with PKCE (§1.5).
    pub fn authorize_url(
        &self,
        audience: Audience,
        shared: bool,
        redirect_uri: &str,
        state: &str,
        challenge: &str,
        login_hint: Option<&str>,
    ) -> Result<String, TokenError> {
        let mut u = reqwest::Url::parse(&self.account.endpoints.authorize_url).map_err(|e| {
            self.local(
                "",
                format!("authorize_url is not a URL: {e}"),
                format!("fix authorize_url of [account.{}]", self.account.name),
            )
        })?;
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("client_id", &self.account.client_id)
                .append_pair("response_type", "code")
                .append_pair("redirect_uri", redirect_uri)
                .append_pair("response_mode", "query")
                .append_pair(
                    "scope",
                    &scope(
                        &self.account.endpoints,
                        audience,
                        GrantKind::Delegated,
                        shared,
                    ),
                )
                .append_pair("state", state)
                .append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", "S256");
            if let Some(h) = login_hint {
                q.append_pair("login_hint", h);
            }
        }
        Ok(u.into())
    }

    /// Redeem an authorization code with its PKCE verifier (§1.5).
    pub async fn redeem_code(
        &self,
        code: &Secret<String>,
        verifier: &Secret<String>,
        redirect_uri: &str,
        mailbox: &str,
        audience: Audience,
        shared: bool,
    ) -> Result<TokenResponse, TokenError> {
        let form = vec![
            field("grant_type", "authorization_code"),
            self.scope_field(audience, GrantKind::Delegated, shared),
            ("code", code.clone()),
            field("redirect_uri", redirect_uri),
            ("code_verifier", verifier.clone()),
        ];
        self.grant(form, mailbox, audience).await
    }
}

/// A number that may come as a JSON number or a string (v1 endpoints send strings).
fn num(v: &Value, k: &str) -> Option<u64> {
    match v.get(k)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Parse a 200 body from the token endpoint.
pub fn parse_token_response(body: &[u8]) -> Result<TokenResponse, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let access = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("no access_token")?;
    Ok(TokenResponse {
        access_token: Secret::new(access.to_string()),
        expires_in: num(&v, "expires_in").unwrap_or(3599),
        refresh_token: v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| Secret::new(s.to_string())),
        scope: v.get("scope").and_then(Value::as_str).map(str::to_string),
    })
}

/// A reqwest error in words, without anything from the request body.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    // The source chain says why (DNS, TLS certificate, refused); the URL carries no secret.
    let mut why = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        why = s.to_string();
        src = s.source();
    }
    match e.url() {
        Some(u) if why.is_empty() => format!("{kind}: {u}"),
        Some(u) => format!("{kind}: {u}: {why}"),
        None => format!("{kind}: {why}"),
    }
}

#[cfg(test)]
mod tests;
