//! `postern login`: sign a mailbox in once and store its refresh token.
//!
//! Device code by default (§1.4): print the URL, the code and Entra's message (and a QR code
//! of the URL on a terminal), poll with a spinner, handle `authorization_pending`,
//! `slow_down` (+5 s), `authorization_declined`, `expired_token`, `bad_verification_code`.
//! `--browser`: authorization code + PKCE S256 (§1.5) with a loopback redirect listener on a
//! random port; the `state` is checked before the code is redeemed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::entra::{
    DeviceCode, DevicePoll, EntraClient, EntraError, TokenResponse, now_secs, pkce_pair,
};
use super::files::{FileError, StoredToken, TokenFiles};
use super::inspect::decode_claims;
use super::{Audience, TokenError};
use crate::secret::Secret;

/// How a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The user declined the sign-in.
    #[error("the sign-in was declined")]
    Declined,
    /// The code expired before the user finished.
    #[error("the code expired before the sign-in was completed; run postern login again")]
    Expired,
    /// Entra did not recognise the device code.
    #[error(
        "Entra did not recognise the device code (bad_verification_code); run postern login again"
    )]
    BadCode,
    /// Entra refused, or could not be reached.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The refresh token could not be stored.
    #[error("could not store the refresh token: {0}")]
    Save(#[from] FileError),
    /// The browser flow failed locally (listener, state mismatch, timeout).
    #[error("browser sign-in failed: {0}")]
    Browser(String),
}

impl LoginError {
    /// Exit code: 1 declined/expired, 78 configuration, 75 temporary, 73 cannot write.
    pub fn exit_code(&self) -> u8 {
        match self {
            LoginError::Declined | LoginError::Expired | LoginError::BadCode => 1,
            LoginError::Browser(_) => 1,
            LoginError::Token(TokenError::Configuration(_)) => 78,
            LoginError::Token(TokenError::Transient(_)) => 75,
            LoginError::Save(_) => 73,
        }
    }
}

/// Where login progress is shown (a terminal, or a test).
pub trait LoginUi: Send {
    /// The device code to enter.
    fn device_code(&mut self, d: &DeviceCode);
    /// The URL to open (browser flow).
    fn authorize_url(&mut self, url: &str);
    /// Still waiting (`what` says for what).
    fn waiting(&mut self, what: &str);
    /// Finished waiting.
    fn finish(&mut self);
}

/// Prints to stdout; QR code and spinner only on a terminal.
pub struct TerminalUi {
    spinner: Option<indicatif::ProgressBar>,
    tty: bool,
}

impl Default for TerminalUi {
    fn default() -> Self {
        TerminalUi {
            spinner: None,
            tty: std::io::stdout().is_terminal(),
        }
    }
}

impl TerminalUi {
    fn qr(&self, url: &str) {
        if !self.tty {
            return;
        }
        if let Ok(qr) = fast_qr::QRBuilder::new(url).build() {
            println!("{}", qr.to_str());
        }
    }
}

impl LoginUi for TerminalUi {
    fn device_code(&mut self, d: &DeviceCode) {
        println!("{}", d.message);
        println!("URL:  {}", d.verification_uri);
        println!("Code: {}", d.user_code);
        self.qr(&d.verification_uri);
    }

    fn authorize_url(&mut self, url: &str) {
        println!("Open this URL in a browser on this machine and sign in:");
        println!("{url}");
    }

    fn waiting(&mut self, what: &str) {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let sp = self.spinner.get_or_insert_with(|| {
            let sp = indicatif::ProgressBar::new_spinner();
            sp.enable_steady_tick(Duration::from_millis(120));
            sp
        });
        sp.set_message(what.to_string());
    }

    fn finish(&mut self) {
        if let Some(sp) = self.spinner.take() {
            sp.finish_and_clear();
        }
    }
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Who signed in (the token's upn), when readable.
    pub user: Option<String>,
    /// The token file written.
    pub path: PathBuf,
    /// The granted scope, when Entra said.
    pub scope: Option<String>,
}

/// Store the refresh token of a successful sign-in.
fn store(
    client: &EntraClient,
    files: &TokenFiles,
    mailbox: &str,
    audience: Audience,
    shared: bool,
    t: TokenResponse,
) -> Result<LoginOutcome, LoginError> {
    let account = &client.account().name;
    let Some(rt) = t.refresh_token else {
        return Err(TokenError::local(
            account,
            mailbox,
            "Entra returned no refresh token".into(),
            "the scope must include offline_access and the user must consent to it; run postern login again".into(),
        )
        .into());
    };
    files.save(
        account,
        &StoredToken {
            mailbox: mailbox.to_lowercase(),
            audience,
            shared,
            refresh_token: rt,
            saved_at: now_secs(),
        },
    )?;
    Ok(LoginOutcome {
        user: decode_claims(t.access_token.expose())
            .ok()
            .and_then(|c| c.upn),
        path: files.path(account, mailbox),
        scope: t.scope,
    })
}

/// Device code sign-in for `mailbox`; stores the refresh token.
pub async fn device_login(
    client: &EntraClient,
    files: &TokenFiles,
    mailbox: &str,
    audience: Audience,
    shared: bool,
    ui: &mut dyn LoginUi,
) -> Result<LoginOutcome, LoginError> {
    let d = client.device_start(mailbox, audience, shared).await?;
    ui.device_code(&d);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(d.expires_in);
    let mut interval = Duration::from_secs(d.interval);
    let result = loop {
        ui.waiting("waiting for the sign-in to complete");
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            break Err(LoginError::Expired);
        }
        match client.device_poll(&d, mailbox, audience).await {
            Ok(DevicePoll::Pending) => continue,
            Ok(DevicePoll::SlowDown) => interval += Duration::from_secs(5),
            Ok(DevicePoll::Done(t)) => break Ok(t),
            Ok(DevicePoll::Declined) => break Err(LoginError::Declined),
            Ok(DevicePoll::Expired) => break Err(LoginError::Expired),
            Ok(DevicePoll::BadCode) => break Err(LoginError::BadCode),
            // A network blip while the user signs in: keep polling until the code expires.
            Err(TokenError::Transient(why)) => {
                tracing::warn!("polling the token endpoint: {why}");
                continue;
            }
            Err(e) => break Err(e.into()),
        }
    };
    ui.finish();
    store(client, files, mailbox, audience, shared, result?)
}

/// Browser sign-in (authorization code + PKCE) for `mailbox`; stores the refresh token.
/// Gives up after `timeout`.
pub async fn browser_login(
    client: &EntraClient,
    files: &TokenFiles,
    mailbox: &str,
    audience: Audience,
    shared: bool,
    ui: &mut dyn LoginUi,
    timeout: Duration,
) -> Result<LoginOutcome, LoginError> {
    let v4 = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| LoginError::Browser(format!("cannot listen on 127.0.0.1: {e}")))?;
    let port = v4
        .local_addr()
        .map_err(|e| LoginError::Browser(e.to_string()))?
        .port();
    // Browsers may resolve localhost to ::1 first: listen there too when we can.
    let v6 = TcpListener::bind(("::1", port)).await.ok();
    // Entra ignores the port of loopback redirect URIs, so registering http://localhost is
    // enough (microsoft-reference.md §1.5).
    let redirect_uri = format!("http://localhost:{port}/");
    let (verifier, challenge) = pkce_pair();
    let state = super::assertion::random_guid();
    let url = client.authorize_url(
        audience,
        shared,
        &redirect_uri,
        &state,
        &challenge,
        Some(mailbox),
    )?;
    ui.authorize_url(&url);
    ui.waiting("waiting for the browser to come back");
    let code = tokio::time::timeout(
        timeout,
        wait_for_code(&v4, v6.as_ref(), &state, client, mailbox, audience),
    )
    .await
    .map_err(|_| {
        LoginError::Browser(format!(
            "no answer from the browser within {}",
            humantime::format_duration(timeout)
        ))
    });
    ui.finish();
    let code = code??;
    let t = client
        .redeem_code(&code, &verifier, &redirect_uri, mailbox, audience, shared)
        .await?;
    store(client, files, mailbox, audience, shared, t)
}

async fn accept(v4: &TcpListener, v6: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match v6 {
        Some(v6) => tokio::select! {
            r = v4.accept() => r.map(|(s, _)| s),
            r = v6.accept() => r.map(|(s, _)| s),
        },
        None => v4.accept().await.map(|(s, _)| s),
    }
}

/// Serve the loopback redirect until a request with our `state` arrives.
async fn wait_for_code(
    v4: &TcpListener,
    v6: Option<&TcpListener>,
    state: &str,
    client: &EntraClient,
    mailbox: &str,
    audience: Audience,
) -> Result<Secret<String>, LoginError> {
    loop {
        let mut s = accept(v4, v6)
            .await
            .map_err(|e| LoginError::Browser(e.to_string()))?;
        let Some(target) = read_request_target(&mut s).await else {
            continue;
        };
        let Some(query) = target
            .strip_prefix("/?")
            .or_else(|| target.strip_prefix("?"))
        else {
            // favicon.ico and friends.
            respond(&mut s, "404 Not Found", "not here").await;
            continue;
        };
        let q: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        if q.get("state").map(String::as_str) != Some(state) {
            respond(&mut s, "400 Bad Request", "postern: this answer does not belong to this sign-in (state mismatch). Start postern login again.").await;
            return Err(LoginError::Browser(
                "the redirect's state does not match this sign-in (a stale or forged redirect)"
                    .into(),
            ));
        }
        if let Some(error) = q.get("error") {
            let description = q.get("error_description").cloned().unwrap_or_default();
            respond(
                &mut s,
                "200 OK",
                "postern: the sign-in failed; see the terminal.",
            )
            .await;
            let e = EntraError {
                status: 400,
                error: error.clone(),
                codes: super::entra::aadsts_in(&description).into_iter().collect(),
                description,
                ..EntraError::default()
            };
            let cx = super::entra::Context {
                account: client.account(),
                mailbox,
                audience,
            };
            return Err(super::entra::classify(&e, &cx).into());
        }
        if let Some(code) = q.get("code") {
            respond(
                &mut s,
                "200 OK",
                "postern: signed in. You can close this tab.",
            )
            .await;
            return Ok(Secret::new(code.clone()));
        }
        respond(
            &mut s,
            "400 Bad Request",
            "postern: no code in this request",
        )
        .await;
    }
}

/// The target of `GET <target> HTTP/1.1`, reading at most 8 KiB for at most 10 s.
async fn read_request_target(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()??;
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

async fn respond(s: &mut TcpStream, status: &str, text: &str) {
    let body = format!("<!doctype html><meta charset=utf-8><title>postern</title><p>{text}</p>\n");
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// `postern login ACCOUNT --mailbox ADDRESS [--for smtp|graph] [--browser] [--shared]`;
/// prints what happens and returns the exit code.
pub async fn run(
    cfg: &crate::config::Config,
    account: &str,
    mailbox: &str,
    audience: Audience,
    browser: bool,
    shared: bool,
) -> u8 {
    let Some(acct) = cfg.account(account) else {
        eprintln!(
            "postern: there is no [account.{account}] in {}; add one (see `postern check`)",
            cfg.source
        );
        return 78;
    };
    if super::entra::grant_kind(acct) != super::entra::GrantKind::Delegated {
        eprintln!(
            "postern: [account.{account}] uses app-only credentials (client secret or certificate): there is nothing to sign in; check it with `postern token {account}`"
        );
        return 78;
    }
    let client = match EntraClient::new(acct.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postern: {e}");
            return 78;
        }
    };
    let files = TokenFiles::new(&cfg.state_dir);
    let mut ui = TerminalUi::default();
    let r = if browser {
        browser_login(
            &client,
            &files,
            mailbox,
            audience,
            shared,
            &mut ui,
            Duration::from_secs(300),
        )
        .await
    } else {
        device_login(&client, &files, mailbox, audience, shared, &mut ui).await
    };
    match r {
        Ok(out) => {
            let who = out.user.as_deref().unwrap_or("(unknown user)");
            println!(
                "Signed in as {who} for mailbox {mailbox} ({audience}); refresh token stored in {}",
                out.path.display()
            );
            if let Some(u) = &out.user
                && !u.eq_ignore_ascii_case(mailbox)
            {
                match audience {
                    Audience::Graph if !shared => println!(
                        "note: {u} is not {mailbox}: Graph needs Mail.Send.Shared to send from another mailbox; run again with --shared"
                    ),
                    Audience::Graph => println!(
                        "note: {u} needs Send As or Send on Behalf on {mailbox} (Exchange admin centre → Recipients → Mailboxes → {mailbox} → Delegation)"
                    ),
                    Audience::Smtp => println!(
                        "note: SMTP will authenticate as {mailbox} with {u}'s token; {u} needs Full Access on {mailbox} (Exchange admin centre → Recipients → Mailboxes → {mailbox} → Delegation)"
                    ),
                }
            }
            0
        }
        Err(e) => {
            eprintln!("postern: login failed: {e}");
            e.exit_code()
        }
    }
}
