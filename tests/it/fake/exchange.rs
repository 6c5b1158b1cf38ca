//! A fake Exchange Online SMTP submission server (smtp.office365.com:587), answering
//! byte-exactly as microsoft-reference.md §3.2–§3.5 and §8 describe: the banner with its date
//! and bracketed hex id, EHLO lists before and after STARTTLS (no AUTH before TLS, then
//! `AUTH LOGIN XOAUTH2`), inline and two-step XOAUTH2, `235 2.7.0` or `535 5.7.3 ... [host
//! timestamp hex]`, the 5.7.139 variants, SendAsDenied *after* DATA, `432 4.3.2` on the 4th
//! concurrent connection of one mailbox, `554 5.2.0` over the recipient quota, `BDAT` as
//! advertised by `CHUNKING`, and whatever a test scripts per mailbox or recipient.
//!
//! It runs on its own thread and tokio runtime, so it serves both `#[tokio::test]`s that use
//! the library and plain `#[test]`s that run the real binary. TLS uses a self-signed
//! certificate (rcgen) for `localhost` written to [`FakeExchange::ca_pem`], to be trusted via
//! an account's `ca_file`. It records every session (commands, the decoded SASL user and
//! token) and every message (envelope and bytes after un-dot-stuffing).
//!
//! ```ignore
//! let fake = Script::new().token("printer@contoso.com", "tok-1").start();
//! // smtp_host = "localhost", smtp_port = fake.addr().port(), ca_file = fake.ca_pem()
//! assert_eq!(fake.delivered()[0].data, message_bytes);
//! ```

// Used by several test modules; not every helper is used by each.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// Real reply texts (microsoft-reference.md §3.4, §3.5), for scripting and for assertions.
pub mod replies {
    /// 4th concurrent connection of one mailbox.
    pub const CONCURRENT: &str = "432 4.3.2 Concurrent connections limit exceeded.";
    /// 10,000 recipients per 24 h exceeded.
    pub const QUOTA: &str =
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException";
    /// Sender mailbox full.
    pub const MAILBOX_FULL: &str = "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded";
    /// Transient Exchange error.
    pub const TEMPORARY: &str = "451 4.7.0 Temporary server error. Please try again later. PRX4 [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM]";
    /// Send-as check at MAIL/RCPT.
    pub const NO_SEND_AS: &str =
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
    /// Continuous-error throttling after SendAsDenied.
    pub const THROTTLED_SEND_AS: &str =
        "550 5.2.252 Sender throttled due to continuous send as denied errors.";
    /// Tenant over the spam threshold.
    pub const TENANT_THRESHOLD: &str = "550 5.7.705 Access denied, tenant has exceeded threshold";
    /// IP not accepted.
    pub const IP_BLOCKED: &str = "550 5.7.708 Access denied, traffic not accepted from this IP";
    /// Sender on the restricted list.
    pub const BAD_OUTBOUND_SENDER: &str = "550 5.1.8 Access denied, bad outbound sender";
    /// Auto-forwarding blocked.
    pub const NO_EXTERNAL_FORWARDING: &str = "550 5.7.520 Access denied, Your organization does not allow external forwarding. Please contact your administrator for further assistance. AS(7555)";
    /// Tenant external recipient rate limit.
    pub const TERRL: &str = "550 5.7.233 Message rejected: tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit)";
    /// Unknown recipient.
    pub const RECIPIENT_NOT_FOUND: &str =
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup";
    /// TLS 1.0/1.1 refused.
    pub const OLD_TLS: &str = "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.";
    /// Basic auth retired.
    pub const BASIC_NOT_SUPPORTED: &str =
        "550 5.7.30 Basic authentication is not supported for Client Submission.";
}

/// How AUTH fails for a mailbox (the 5.7.139 variants get Exchange's `[host time id]` suffix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// `535 5.7.139 ... SmtpClientAuthentication is disabled for the Tenant. ...`
    TenantDisabled,
    /// `535 5.7.139 ... SmtpClientAuthentication is disabled for the Mailbox.`
    MailboxDisabled,
    /// `535 5.7.139 ... basic authentication is disabled.`
    BasicDisabled,
    /// `535 5.7.139 ... the request did not meet the criteria ...` (Conditional Access).
    ConditionalAccess,
    /// `535 5.7.139 ... user is locked by your organization's security defaults policy`.
    SecurityDefaults,
    /// Any reply line, sent as is.
    Reply(String),
}

impl AuthFailure {
    /// The reply line the fake sends.
    pub fn line(&self, diag: &str) -> String {
        let reason = match self {
            AuthFailure::TenantDisabled => {
                "SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
            }
            AuthFailure::MailboxDisabled => "SmtpClientAuthentication is disabled for the Mailbox.",
            AuthFailure::BasicDisabled => "basic authentication is disabled.",
            AuthFailure::ConditionalAccess => {
                "the request did not meet the criteria to be authenticated successfully. Contact your administrator."
            }
            AuthFailure::SecurityDefaults => {
                "user is locked by your organization's security defaults policy. Contact your administrator."
            }
            AuthFailure::Reply(line) => return line.clone(),
        };
        format!("535 5.7.139 Authentication unsuccessful, {reason} {diag}")
    }
}

/// Decides whether a (mailbox, token) pair authenticates, e.g. "the fake Entra issued it".
pub type TokenCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What the fake does; built before `start()`, changeable later with [`FakeExchange::update`].
#[derive(Clone)]
pub struct Script {
    /// Tokens accepted besides `tokens` (end-to-end tests: whatever the fake Entra issued).
    pub token_check: Option<TokenCheck>,
    /// Host name in the banner and EHLO (`SY5P282CA0097.outlook.office365.com`).
    pub banner_host: String,
    /// Host in diagnostic suffixes (`SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM`).
    pub diag_host: String,
    /// Names in the TLS certificate.
    pub cert_names: Vec<String>,
    /// Offer STARTTLS (Exchange always does).
    pub starttls: bool,
    /// Offer PIPELINING (Exchange does).
    pub pipelining: bool,
    /// Valid token per mailbox (lowercase).
    pub tokens: HashMap<String, String>,
    /// AUTH failure per mailbox, even with a valid token.
    pub auth_failures: HashMap<String, AuthFailure>,
    /// Answer a bad token Gmail-style: `334 <base64 JSON>`, then 535 after the empty line.
    pub error_challenge: bool,
    /// Reply to the post-TLS EHLO instead of the capability list (a `421` closes).
    pub ehlo_after_tls: Option<String>,
    /// Drop the connection after the TLS handshake, when the client's first command arrived,
    /// without an answer or a TLS close_notify (as a middlebox that cuts connections does).
    /// The command is read first so that the close is a FIN: closing with unread data would
    /// make the kernel send a reset instead, and the client would see either, by chance.
    pub drop_after_tls: bool,
    /// Reply to MAIL FROM per mailbox.
    pub mail_replies: HashMap<String, String>,
    /// Reply to RCPT TO per recipient.
    pub rcpt_replies: HashMap<String, String>,
    /// Reply after DATA per mailbox.
    pub data_end_replies: HashMap<String, String>,
    /// Addresses each mailbox may send as, besides itself.
    pub send_as: HashMap<String, Vec<String>>,
    /// Concurrent authenticated connections per mailbox before 432 4.3.2 (Exchange: 3).
    pub max_concurrent: usize,
    /// Recipients per mailbox before 554 5.2.0 (Exchange: 10,000 per 24 h).
    pub recipient_quota: usize,
    /// The rolling window of `recipient_quota` (`None`: recipients count forever).
    pub quota_window: Option<Duration>,
    /// How far Exchange's clock is ahead of this host's: a token whose `exp` claim is behind
    /// Exchange's clock gets `535 5.7.3 Authentication unsuccessful` (§3.4, §9 row 1), as
    /// when this host was suspended while the token aged.
    pub clock_offset: Duration,
    /// Advertised SIZE.
    pub max_size: u64,
    /// Offer CHUNKING (BDAT, RFC 3030) and BINARYMIME, as Exchange does.
    pub chunking: bool,
    /// Close the connection (without a reply or 421) right after answering the Nth message
    /// of a session, as a server that ends idle or old sessions does between messages.
    pub close_after_messages: Option<usize>,
    /// Keep each message's bytes in [`Message::data`] (a benchmark turns this off to keep
    /// the fake's memory flat; [`Message::size`] is always kept).
    pub keep_data: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            token_check: None,
            banner_host: "SY5P282CA0097.outlook.office365.com".into(),
            diag_host: "SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM".into(),
            cert_names: vec!["localhost".into()],
            starttls: true,
            pipelining: true,
            tokens: HashMap::new(),
            auth_failures: HashMap::new(),
            error_challenge: false,
            ehlo_after_tls: None,
            drop_after_tls: false,
            mail_replies: HashMap::new(),
            rcpt_replies: HashMap::new(),
            data_end_replies: HashMap::new(),
            send_as: HashMap::new(),
            max_concurrent: 3,
            recipient_quota: 10_000,
            quota_window: None,
            clock_offset: Duration::ZERO,
            max_size: 157_286_400,
            chunking: true,
            close_after_messages: None,
            keep_data: true,
        }
    }
}

impl Script {
    /// The default: Exchange as observed, no valid tokens yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// `token` is valid for `mailbox`.
    pub fn token(mut self, mailbox: &str, token: &str) -> Self {
        self.tokens.insert(mailbox.to_lowercase(), token.into());
        self
    }
    /// Accept any token `check(mailbox, token)` approves.
    pub fn accept_tokens(mut self, check: TokenCheck) -> Self {
        self.token_check = Some(check);
        self
    }
    /// AUTH as `mailbox` fails with `f`.
    pub fn auth_failure(mut self, mailbox: &str, f: AuthFailure) -> Self {
        self.auth_failures.insert(mailbox.to_lowercase(), f);
        self
    }
    /// MAIL FROM as `mailbox` gets `line`.
    pub fn mail_reply(mut self, mailbox: &str, line: &str) -> Self {
        self.mail_replies
            .insert(mailbox.to_lowercase(), line.into());
        self
    }
    /// RCPT TO `address` gets `line`.
    pub fn rcpt_reply(mut self, address: &str, line: &str) -> Self {
        self.rcpt_replies
            .insert(address.to_lowercase(), line.into());
        self
    }
    /// The end of DATA as `mailbox` gets `line`.
    pub fn data_end_reply(mut self, mailbox: &str, line: &str) -> Self {
        self.data_end_replies
            .insert(mailbox.to_lowercase(), line.into());
        self
    }
    /// `mailbox` has Send As on `address`.
    pub fn allow_send_as(mut self, mailbox: &str, address: &str) -> Self {
        self.send_as
            .entry(mailbox.to_lowercase())
            .or_default()
            .push(address.to_lowercase());
        self
    }
    /// Do not offer STARTTLS.
    pub fn no_starttls(mut self) -> Self {
        self.starttls = false;
        self
    }
    /// Start serving.
    pub fn start(self) -> FakeExchange {
        FakeExchange::start_with(self)
    }
}

/// What one AUTH carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRecord {
    /// Mechanism as sent (case preserved).
    pub mechanism: String,
    /// `user=` of the SASL string.
    pub user: String,
    /// The bearer token.
    pub token: String,
    /// The initial response came after a `334` (two-step form).
    pub two_step: bool,
    /// The reply sent.
    pub reply: String,
}

/// One message that reached the end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Authenticated mailbox.
    pub mailbox: String,
    /// MAIL FROM address.
    pub mail_from: String,
    /// MAIL FROM parameters (`SIZE=123`, `BODY=8BITMIME`, `SMTPUTF8`).
    pub mail_params: Vec<String>,
    /// Accepted recipients.
    pub rcpt_to: Vec<String>,
    /// Content after un-dot-stuffing, without the final `.CRLF` (or the BDAT chunks joined);
    /// empty when the script's `keep_data` is off.
    pub data: Vec<u8>,
    /// Length of the content.
    pub size: usize,
    /// It came with BDAT (else DATA).
    pub bdat: bool,
    /// The reply after DATA.
    pub reply: String,
    /// When the reply was sent.
    pub at: std::time::Instant,
}

impl Message {
    /// Exchange took it.
    pub fn accepted(&self) -> bool {
        self.reply.starts_with('2')
    }
}

/// Counts over all sessions ([`FakeExchange::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections accepted.
    pub connections: usize,
    /// AUTH attempts.
    pub auths: usize,
    /// Successful AUTHs.
    pub auths_ok: usize,
    /// Messages that reached their end (DATA's dot or BDAT LAST).
    pub messages: usize,
    /// Of those, accepted.
    pub delivered: usize,
    /// Bytes of the accepted messages.
    pub delivered_bytes: u64,
}

/// One connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Peer address.
    pub peer: String,
    /// Every command line received (AUTH lines included: this is a test fake).
    pub commands: Vec<String>,
    /// The command lines that arrived with more bytes right behind them (sent in one write
    /// with what follows: pipelined, RFC 2920).
    pub pipelined: Vec<String>,
    /// TLS was started.
    pub tls: bool,
    /// AUTH attempts.
    pub auths: Vec<AuthRecord>,
    /// Messages that reached the end of DATA.
    pub messages: Vec<Message>,
    /// When the connection ended (`None`: still open).
    pub closed_at: Option<std::time::Instant>,
}

#[derive(Default)]
struct State {
    sessions: Vec<Session>,
    active: HashMap<String, usize>,
    /// Recipients accepted per mailbox, with when.
    recipients_sent: HashMap<String, Vec<(std::time::Instant, usize)>>,
}

struct Shared {
    script: Mutex<Script>,
    state: Mutex<State>,
    hold: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking session task must not hide the records from the test.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake; stops when dropped.
pub struct FakeExchange {
    addr: SocketAddr,
    ca_pem: PathBuf,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeExchange {
    /// Start with the default [`Script`] (no valid tokens: add them with [`Self::update`]).
    pub fn start() -> FakeExchange {
        Self::start_with(Script::default())
    }

    /// Start with `script` on 127.0.0.1, a random port.
    pub fn start_with(script: Script) -> FakeExchange {
        Self::start_on(script, "127.0.0.1:0".parse().expect("address"))
    }

    /// Start with `script` on `addr` (port 0: a free one).
    pub fn start_on(script: Script, addr: SocketAddr) -> FakeExchange {
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(script.cert_names.clone()).expect("rcgen");
        let ca_pem = dir.path().join("fake-exchange-ca.pem");
        std::fs::write(&ca_pem, ck.cert.pem()).expect("write CA PEM");
        let certs = vec![CertificateDer::from(ck.cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server cert");
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let std_listener = std::net::TcpListener::bind(addr).expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (hold, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            state: Mutex::new(State::default()),
            hold,
        });
        let (stop, mut stopped) = oneshot::channel();
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, peer)) = accepted else { continue };
                            // Replies are small and each is awaited: without this, Nagle's
                            // algorithm and the client's delayed ACK add up to 40 ms to some
                            // of them (after the TLS handshake's tickets), which no real
                            // server's client would see and which would skew benchmarks.
                            let _ = tcp.set_nodelay(true);
                            let sh = sh.clone();
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                serve(tcp, peer, sh, acceptor).await;
                            });
                        }
                    }
                }
            });
        });
        FakeExchange {
            addr,
            ca_pem,
            shared,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate (PEM) to trust as `ca_file`; it is valid for `localhost`.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }

    /// Change the script while running (takes effect for the next command).
    pub fn update(&self, f: impl FnOnce(&mut Script)) {
        f(&mut lock(&self.shared.script));
    }

    /// Every session so far, in connection order.
    pub fn sessions(&self) -> Vec<Session> {
        lock(&self.shared.state).sessions.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.shared.state).sessions.len()
    }

    /// Counts over every session so far, without copying the records.
    pub fn totals(&self) -> Totals {
        let st = lock(&self.shared.state);
        let mut t = Totals {
            connections: st.sessions.len(),
            ..Totals::default()
        };
        for s in &st.sessions {
            t.auths += s.auths.len();
            t.auths_ok += s
                .auths
                .iter()
                .filter(|a| a.reply.starts_with("235"))
                .count();
            t.messages += s.messages.len();
            for m in s.messages.iter().filter(|m| m.accepted()) {
                t.delivered += 1;
                t.delivered_bytes += m.size as u64;
            }
        }
        t
    }

    /// Every AUTH attempt so far.
    pub fn auths(&self) -> Vec<AuthRecord> {
        self.sessions().into_iter().flat_map(|s| s.auths).collect()
    }

    /// Every message that reached the end of DATA (accepted or not).
    pub fn messages(&self) -> Vec<Message> {
        self.sessions()
            .into_iter()
            .flat_map(|s| s.messages)
            .collect()
    }

    /// Messages Exchange took (2xx after DATA).
    pub fn delivered(&self) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.accepted())
            .collect()
    }

    /// Authenticated connections open now for `mailbox`.
    pub fn active(&self, mailbox: &str) -> usize {
        lock(&self.shared.state)
            .active
            .get(&mailbox.to_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// While `true`, the reply after DATA waits (to keep connections open concurrently).
    pub fn hold_data_end(&self, hold: bool) {
        self.shared.hold.send_replace(hold);
    }
}

impl Drop for FakeExchange {
    fn drop(&mut self) {
        self.shared.hold.send_replace(false);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-connection bookkeeping; the drop releases the mailbox's concurrency slot.
struct Conn {
    shared: Arc<Shared>,
    index: usize,
    mailbox: Option<String>,
    peer: SocketAddr,
    mail: Option<(String, Vec<String>)>,
    rcpts: Vec<String>,
    /// BDAT chunks of the current transaction so far (`None`: no BDAT yet).
    chunks: Option<Vec<u8>>,
    /// Messages answered on this connection.
    answered: usize,
    /// Octets of the current transaction's BDAT chunks (kept even when the data is not).
    bdat_len: usize,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let now = std::time::Instant::now();
        self.record(|s| s.closed_at = Some(now));
        if let Some(m) = &self.mailbox {
            let mut st = lock(&self.shared.state);
            if let Some(n) = st.active.get_mut(m) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Conn {
    fn record(&self, f: impl FnOnce(&mut Session)) {
        let mut st = lock(&self.shared.state);
        if let Some(s) = st.sessions.get_mut(self.index) {
            f(s);
        }
    }
    fn script(&self) -> Script {
        lock(&self.shared.script).clone()
    }
}

enum Next {
    Quit,
    StartTls,
}

async fn serve(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
) {
    let index = {
        let mut st = lock(&shared.state);
        st.sessions.push(Session {
            peer: peer.to_string(),
            ..Session::default()
        });
        st.sessions.len() - 1
    };
    let mut conn = Conn {
        shared,
        index,
        mailbox: None,
        peer,
        mail: None,
        rcpts: Vec::new(),
        chunks: None,
        answered: 0,
        bdat_len: 0,
    };
    let host = conn.script().banner_host;
    let mut plain = BufReader::new(tcp);
    let banner = format!(
        "220 {host} Microsoft ESMTP MAIL Service ready at {} [{}]\r\n",
        rfc2822_now(),
        hex16()
    );
    if plain.write_all(banner.as_bytes()).await.is_err() {
        return;
    }
    if let Next::StartTls = dialogue(&mut plain, &mut conn, false).await {
        // Bytes pipelined after STARTTLS are dropped with the plain-text buffer, as a
        // careful server does.
        let tcp = plain.into_inner();
        let Ok(tls) = acceptor.accept(tcp).await else {
            return;
        };
        conn.record(|s| s.tls = true);
        if conn.script().drop_after_tls {
            let mut secure = BufReader::new(tls);
            let mut line = Vec::new();
            let _ = secure.read_until(b'\n', &mut line).await;
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            conn.record(|s| s.commands.push(text));
            drop(secure);
            return;
        }
        let mut secure = BufReader::new(tls);
        dialogue(&mut secure, &mut conn, true).await;
        let _ = secure.shutdown().await;
    }
}

async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    conn: &mut Conn,
    tls: bool,
) -> Next {
    loop {
        let mut line = Vec::new();
        match io.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return Next::Quit,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        let more = !io.buffer().is_empty();
        conn.record(|s| {
            s.commands.push(text.clone());
            if more {
                s.pipelined.push(text.clone());
            }
        });
        let script = conn.script();
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        let reply: String = match verb.as_str() {
            "EHLO" | "HELO" => {
                if tls && let Some(r) = &script.ehlo_after_tls {
                    if send(io, r).await.is_err() || r.starts_with("421") {
                        return Next::Quit;
                    }
                    continue;
                }
                let mut lines = vec![
                    format!("{} Hello [{}]", script.banner_host, conn.peer.ip()),
                    format!("SIZE {}", script.max_size),
                ];
                if script.pipelining {
                    lines.push("PIPELINING".into());
                }
                lines.push("DSN".into());
                lines.push("ENHANCEDSTATUSCODES".into());
                if tls {
                    lines.push("AUTH LOGIN XOAUTH2".into());
                } else if script.starttls {
                    lines.push("STARTTLS".into());
                }
                lines.push("8BITMIME".into());
                if script.chunking {
                    lines.push("BINARYMIME".into());
                    lines.push("CHUNKING".into());
                }
                lines.push("SMTPUTF8".into());
                let n = lines.len();
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
                    .collect::<Vec<_>>()
                    .join("\r\n")
            }
            "STARTTLS" if !tls && script.starttls => {
                if send(io, "220 2.0.0 SMTP server ready").await.is_err() {
                    return Next::Quit;
                }
                return Next::StartTls;
            }
            "AUTH" => match auth(io, conn, &script, tls, &arg).await {
                Some(r) => r,
                None => return Next::Quit,
            },
            "MAIL" => mail(conn, &script, &arg),
            "RCPT" => {
                if conn.mail.is_none() {
                    "503 5.5.2 Need mail command".into()
                } else {
                    let (addr, _) = path_arg(&arg, "TO:").unwrap_or_default();
                    match script.rcpt_replies.get(&addr.to_lowercase()) {
                        Some(r) => r.clone(),
                        None => {
                            conn.rcpts.push(addr);
                            "250 2.1.5 Recipient OK".into()
                        }
                    }
                }
            }
            "BDAT" if script.chunking => match bdat(io, conn, &arg).await {
                Some(r) => r,
                None => return Next::Quit,
            },
            "DATA" if conn.chunks.is_some() => "503 5.5.1 Bad sequence of commands".into(),
            "DATA" => {
                if conn.mail.is_none() || conn.rcpts.is_empty() {
                    "503 5.5.2 Need rcpt command".into()
                } else {
                    if send(io, "354 Start mail input; end with <CRLF>.<CRLF>")
                        .await
                        .is_err()
                    {
                        return Next::Quit;
                    }
                    match data(io, conn).await {
                        Some(r) => r,
                        None => return Next::Quit,
                    }
                }
            }
            "RSET" => {
                conn.mail = None;
                conn.rcpts.clear();
                conn.chunks = None;
                "250 2.0.0 Resetting".into()
            }
            "NOOP" => "250 2.0.0 OK".into(),
            "QUIT" => {
                let _ = send(io, "221 2.0.0 Service closing transmission channel").await;
                return Next::Quit;
            }
            _ => "500 5.3.3 Unrecognized command".into(),
        };
        if send(io, &reply).await.is_err() {
            return Next::Quit;
        }
        if matches!(verb.as_str(), "DATA" | "BDAT")
            && conn.mail.is_none()
            && conn.chunks.is_none()
            && script
                .close_after_messages
                .is_some_and(|n| conn.answered >= n)
        {
            // Between messages, without a word: the client finds out at its next command.
            return Next::Quit;
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, reply: &str) -> std::io::Result<()> {
    io.write_all(format!("{reply}\r\n").as_bytes()).await?;
    io.flush().await
}

/// `[host timestamp hex]` as Exchange appends to AUTH failures.
fn diag(script: &Script) -> String {
    format!("[{} {} {}]", script.diag_host, iso_now(), hex16())
}

async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    conn: &mut Conn,
    script: &Script,
    tls: bool,
    arg: &str,
) -> Option<String> {
    let (mechanism, initial) = match arg.split_once(' ') {
        Some((m, i)) => (m.to_string(), Some(i.trim().to_string())),
        None => (arg.trim().to_string(), None),
    };
    // Exchange offers AUTH only after STARTTLS; the mechanism name is case-insensitive.
    if !tls || !mechanism.eq_ignore_ascii_case("XOAUTH2") {
        return Some("504 5.7.4 Unrecognized authentication type".into());
    }
    if conn.mailbox.is_some() {
        return Some("503 5.5.2 Already authenticated".into());
    }
    let two_step = initial.is_none();
    let response = match initial {
        Some(r) => r,
        None => {
            send(io, "334 ").await.ok()?;
            let mut l = Vec::new();
            if io.read_until(b'\n', &mut l).await.ok()? == 0 {
                return None;
            }
            let r = String::from_utf8_lossy(&l)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            conn.record(|s| s.commands.push(r.clone()));
            r
        }
    };
    let unsuccessful = format!("535 5.7.3 Authentication unsuccessful {}", diag(script));
    let (user, token) = parse_xoauth2(&response).unwrap_or_default();
    let mut reply = if response == "*" || user.is_empty() {
        unsuccessful.clone()
    } else if let Some(f) = script.auth_failures.get(&user.to_lowercase()) {
        f.line(&diag(script))
    } else if expired(&token, script.clock_offset) {
        unsuccessful.clone()
    } else if script.tokens.get(&user.to_lowercase()) == Some(&token)
        || script
            .token_check
            .as_ref()
            .is_some_and(|check| check(&user, &token))
    {
        "235 2.7.0 Authentication successful".into()
    } else {
        unsuccessful.clone()
    };
    if script.error_challenge && reply.starts_with("535 5.7.3") {
        // Gmail's style (§7): a base64 JSON challenge, then the failure after an empty line.
        let json = r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#;
        let challenge = base64::engine::general_purpose::STANDARD.encode(json);
        send(io, &format!("334 {challenge}")).await.ok()?;
        let mut l = Vec::new();
        io.read_until(b'\n', &mut l).await.ok()?;
        let answer = String::from_utf8_lossy(&l)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        conn.record(|s| s.commands.push(answer));
        reply = unsuccessful;
    }
    conn.record(|s| {
        s.auths.push(AuthRecord {
            mechanism,
            user: user.clone(),
            token: token.clone(),
            two_step,
            reply: reply.clone(),
        })
    });
    if reply.starts_with("235") {
        let m = user.to_lowercase();
        *lock(&conn.shared.state)
            .active
            .entry(m.clone())
            .or_default() += 1;
        conn.mailbox = Some(m);
    }
    Some(reply)
}

/// The token is a JWT whose `exp` is not after Exchange's clock (this host's plus `offset`).
fn expired(token: &str, offset: Duration) -> bool {
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|c| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
        })
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
        .and_then(|c| c["exp"].as_u64());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        + offset;
    exp.is_some_and(|e| e <= now.as_secs())
}

/// `user=U^Aauth=Bearer T^A^A` → (U, T).
fn parse_xoauth2(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let rest = s.strip_suffix("\x01\x01")?;
    let (user, auth) = rest.split_once('\x01')?;
    let user = user.strip_prefix("user=")?;
    let token = auth.strip_prefix("auth=Bearer ")?;
    Some((user.to_string(), token.to_string()))
}

/// `FROM:<path> params` → (the path as written, the parameters). A quoted string is read as
/// RFC 5321 says, as Exchange does: a `>` or space inside quotes does not end the path.
fn path_arg(arg: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let a = arg.trim();
    if a.len() < prefix.len() || !a[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = a[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let (mut quoted, mut escaped) = (false, false);
    let end = rest.char_indices().find_map(|(i, c)| {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
        None
    })?;
    let params = rest[end + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Some((rest[..end].to_string(), params))
}

fn mail(conn: &mut Conn, script: &Script, arg: &str) -> String {
    let Some(mailbox) = conn.mailbox.clone() else {
        return format!(
            "530 5.7.57 Client not authenticated to send mail. Error: 530 5.7.57 Client was not authenticated to send anonymous mail during MAIL FROM [{}]",
            script.diag_host
        );
    };
    if conn.mail.is_some() {
        return "503 5.5.2 Sender already specified".into();
    }
    let active = lock(&conn.shared.state)
        .active
        .get(&mailbox)
        .copied()
        .unwrap_or(0);
    if active > script.max_concurrent {
        return replies::CONCURRENT.into();
    }
    if let Some(r) = script.mail_replies.get(&mailbox) {
        return r.clone();
    }
    let Some((from, params)) = path_arg(arg, "FROM:") else {
        return "501 5.5.4 Invalid arguments".into();
    };
    if let Some(size) = params
        .iter()
        .find_map(|p| {
            p.to_ascii_uppercase()
                .strip_prefix("SIZE=")
                .map(str::to_string)
        })
        .and_then(|s| s.parse::<u64>().ok())
        && size > script.max_size
    {
        return "552 5.3.4 Message size exceeds fixed maximum message size".into();
    }
    conn.mail = Some((from, params));
    "250 2.1.0 Sender OK".into()
}

/// Read the message to `CRLF.CRLF`, un-dot-stuff it, decide the reply.
async fn data<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    conn: &mut Conn,
) -> Option<String> {
    let mut content = Vec::new();
    loop {
        let mut line = Vec::new();
        if io.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        if line == b".\r\n" {
            break;
        }
        if line.first() == Some(&b'.') {
            content.extend_from_slice(&line[1..]);
        } else {
            content.extend_from_slice(&line);
        }
    }
    Some(finish(conn, content, false).await)
}

/// `BDAT <size> [LAST]` (RFC 3030): read exactly `size` octets whatever the state (they are
/// message data, never commands), then answer. The reply to the LAST chunk is the one DATA's
/// end gets. `None`: the connection ended.
async fn bdat<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    conn: &mut Conn,
    arg: &str,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut words = arg.split_whitespace();
    let size = words.next().and_then(|n| n.parse::<u64>().ok());
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Some("501 5.5.4 Invalid arguments".into()),
    };
    let Some(size) = size else {
        // Without a size the octets cannot be skipped: the dialogue is lost, as in Exchange.
        return Some("501 5.5.4 Invalid arguments".into());
    };
    let keep = conn.script().keep_data;
    let in_sequence = conn.mail.is_some() && !conn.rcpts.is_empty();
    let mut buf = conn.chunks.take().unwrap_or_default();
    let mut reader = (&mut *io).take(size);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        got += n as u64;
        // Without keep_data, the head is still needed for the From: (Send As) check.
        if in_sequence && (keep || buf.len() < 64 * 1024) {
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    if got < size {
        return None;
    }
    if !in_sequence {
        return Some("503 5.5.1 Bad sequence of commands".into());
    }
    let counted = conn.bdat_len + size as usize;
    if !last {
        conn.bdat_len = counted;
        conn.chunks = Some(buf);
        // Exchange's text for an intermediate chunk is not in the reference; RFC 3030's form.
        return Some(format!("250 2.0.0 {size} octets received"));
    }
    conn.bdat_len = counted;
    Some(finish(conn, buf, true).await)
}

/// The end of a message (DATA's final dot or BDAT LAST): wait while a test holds replies,
/// decide the reply as Exchange would, record the message.
async fn finish(conn: &mut Conn, content: Vec<u8>, bdat: bool) -> String {
    let size = if bdat {
        std::mem::take(&mut conn.bdat_len)
    } else {
        content.len()
    };
    conn.chunks = None;
    conn.answered += 1;
    let mut rx = conn.shared.hold.subscribe();
    let _ = rx.wait_for(|held| !held).await;

    let script = conn.script();
    let mailbox = conn.mailbox.clone().unwrap_or_default();
    let (mail_from, mail_params) = conn.mail.take().unwrap_or_default();
    let rcpt_to = std::mem::take(&mut conn.rcpts);
    let sent_so_far: usize = lock(&conn.shared.state)
        .recipients_sent
        .get(&mailbox)
        .map(|v| {
            v.iter()
                .filter(|(t, _)| script.quota_window.is_none_or(|w| t.elapsed() < w))
                .map(|(_, n)| n)
                .sum()
        })
        .unwrap_or(0);
    let from = from_header(&content).unwrap_or_else(|| mail_from.clone());
    let may_send_as = from.eq_ignore_ascii_case(&mailbox)
        || script
            .send_as
            .get(&mailbox)
            .is_some_and(|l| l.contains(&from.to_lowercase()));
    let reply = if let Some(r) = script.data_end_replies.get(&mailbox) {
        r.clone()
    } else if sent_so_far + rcpt_to.len() > script.recipient_quota {
        replies::QUOTA.into()
    } else if !may_send_as {
        // After DATA, never at MAIL FROM (§3.5).
        format!(
            "554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {from}; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A000000 [Hostname={}]",
            script.diag_host
        )
    } else {
        format!(
            "250 2.6.0 <{}@{}> [InternalId={}, Hostname={}] Queued mail for delivery",
            hex16(),
            script.diag_host,
            rand::random::<u32>(),
            script.diag_host
        )
    };
    if reply.starts_with('2') {
        lock(&conn.shared.state)
            .recipients_sent
            .entry(mailbox.clone())
            .or_default()
            .push((std::time::Instant::now(), rcpt_to.len()));
    }
    let msg = Message {
        mailbox,
        mail_from,
        mail_params,
        rcpt_to,
        data: if script.keep_data {
            content
        } else {
            Vec::new()
        },
        size,
        bdat,
        reply: reply.clone(),
        at: std::time::Instant::now(),
    };
    conn.record(|s| s.messages.push(msg));
    reply
}

/// The address in the first `From:` header, if any.
fn from_header(content: &[u8]) -> Option<String> {
    let head_end = content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(content.len());
    let head = String::from_utf8_lossy(&content[..head_end]);
    let line = head
        .split("\r\n")
        .find(|l| l.len() > 5 && l[..5].eq_ignore_ascii_case("from:"))?;
    let v = line[5..].trim();
    let addr = match (v.rfind('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => v,
    };
    Some(addr.trim().to_string())
}

fn hex16() -> String {
    format!("{:016X}", rand::random::<u64>())
}

/// `Sun, 23 Nov 2025 11:12:20 +0000`.
fn rfc2822_now() -> String {
    httpdate::fmt_http_date(SystemTime::now()).replace(" GMT", " +0000")
}

/// `2023-02-06T21:34:15.820Z`.
fn iso_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}
