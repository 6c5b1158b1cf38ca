//! The Exchange Online SMTP transport: SMTP submission with STARTTLS and AUTH XOAUTH2
//! (microsoft-reference.md §3).
//!
//! A small client of our own over tokio, tokio-rustls and smtp-proto (design.md, "Upstream
//! transports"): our reply reader keeps the full enhanced status code (Exchange sends 5.7.139
//! and 4.7.500, which other clients saturate), and the message streams from the queue file
//! (`BDAT <size> LAST` with the bytes as they are when the server offers CHUNKING, as Exchange
//! does; else DATA with dot-stuffing), so a 150 MB message costs a few hundred KiB.
//!
//! A new connection: token → connect → 220 → EHLO → STARTTLS (required: the token never
//! crosses plain text) → EHLO → `AUTH XOAUTH2 <initial response>`. Then per message: MAIL/RCPT
//! (pipelined when offered) → BDAT or DATA. Afterwards the connection goes back to the
//! [`pool`] for the same mailbox's next message (RSET first if a transaction was left open),
//! and is closed with QUIT when idle too long or its token nears expiry. A connection that
//! fails before the message was accepted is replaced at once without spending the message's
//! retry. Every reply that is not the expected one goes through
//! [`classify`](super::classify::classify) once.

use std::fmt;
use std::io;
use std::io::Read as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, trace, warn};
use zeroize::Zeroizing;

use super::classify::{Context, Stage, Verdict, classify, release_hint};

pub mod pool;
mod probe;
use super::{BoxFuture, Outcome, Outgoing, RcptResult, Transport, UpstreamError};
use crate::address;
use crate::config::{AccountConfig, Credential};
use crate::escape;
use crate::secret::Secret;
use crate::spool::RcptStatus;
use crate::token::{AccessToken, Audience, TokenError, TokenSource};
pub use pool::Settings as ReuseSettings;
use pool::{Lease, TokenId};
pub use probe::Probe;

/// Longest reply line we accept. RFC 5321 says 512, but Exchange's diagnostic replies
/// (SendAsDenied with `[BeginDiagnosticData]...`) run longer.
const MAX_LINE: usize = 16 * 1024;
/// Most lines in one reply (an EHLO reply has about a dozen).
const MAX_REPLY_LINES: usize = 100;
/// RCPT commands written at once when pipelining; bounded so the server's replies always fit
/// in the socket buffers while we are still writing.
const PIPELINE_BATCH: usize = 100;
/// Read size for the message file; the DATA buffer is at most about twice this.
const CHUNK: usize = 64 * 1024;
/// Time allowed for the polite QUIT and TLS close after the outcome is known.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long each step may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Each command's reply, the greeting, and the TLS handshake.
    pub command: Duration,
    /// Writing one chunk of the message.
    pub data_block: Duration,
    /// The reply after the message's final `.` (Exchange stores it before answering).
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(60),
            data_block: Duration::from_secs(180),
            data_end: Duration::from_secs(300),
        }
    }
}

/// Sends spooled messages to Exchange Online over SMTP with AUTH XOAUTH2.
pub struct SmtpTransport {
    account: String,
    client_id: String,
    app_only: bool,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    ehlo_name: String,
    tls: Arc<ClientConfig>,
    tokens: Arc<dyn TokenSource>,
    timeouts: Timeouts,
    pool: Arc<ConnectionPool>,
}

impl fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("account", &self.account)
            .field("server", &format_args!("{}:{}", self.host, self.port))
            .field("ehlo_name", &self.ehlo_name)
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    /// A transport for `account`'s SMTP endpoint (`endpoints.smtp_host:smtp_port`), trusting
    /// the platform's CA roots plus the account's `ca_file`, getting tokens from `tokens` and
    /// greeting with `EHLO hostname`; one connection per message until given a pool. Fails when `ca_file` is unreadable or holds no usable
    /// certificate, or `smtp_host` is not a host name or IP address.
    pub fn new(
        account: &AccountConfig,
        tokens: Arc<dyn TokenSource>,
        hostname: String,
    ) -> Result<Self, UpstreamError> {
        let host = account.endpoints.smtp_host.clone();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| UpstreamError::BadHost {
                account: account.name.clone(),
                host: host.clone(),
            })?;
        let tls = client_config(&account.name, account.ca_file.as_deref())?;
        Ok(SmtpTransport {
            account: account.name.clone(),
            client_id: account.client_id.clone(),
            app_only: !matches!(account.credential, Credential::Delegated { .. }),
            host,
            port: account.endpoints.smtp_port,
            server_name,
            ehlo_name: hostname,
            tls,
            tokens,
            timeouts: Timeouts::default(),
            // One-off users (`postern test`, tools) close each connection after its message;
            // the forwarder shares a keeping pool ([`SmtpTransport::with_pool`]).
            pool: ConnectionPool::new(ReuseSettings {
                idle: Duration::ZERO,
                ..ReuseSettings::default()
            }),
        })
    }

    /// The same transport keeping its connections in `pool` (shared with other routes'
    /// transports, whose settings it follows).
    pub fn with_pool(mut self, pool: Arc<ConnectionPool>) -> Self {
        self.pool = pool;
        self
    }

    /// The same transport with a pool of its own made with `settings`
    /// (`idle` zero: one connection per message).
    pub fn with_reuse(self, settings: ReuseSettings) -> Self {
        self.with_pool(ConnectionPool::new(settings))
    }

    /// The same transport with other timeouts (tests use short ones).
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn deliver(&self, msg: &Outgoing) -> Outcome {
        let env = &msg.envelope;
        let pending: Vec<&str> = env.pending().map(|r| r.address.as_str()).collect();
        if pending.is_empty() {
            return Outcome::Sent {
                relay: self.server(),
                reply: "no pending recipients".into(),
                recipients: Vec::new(),
            };
        }
        // Every address goes out as the address type writes it: quoted where needed, so
        // nothing a client sent can end a path early or add a parameter or a command; and
        // refused here if it cannot be written safely (an older version's spool).
        let wire = |stored: &str| {
            address::wire_form(stored).map_err(|e| Outcome::Permanent {
                reason: format!(
                    "the address <{}> cannot be sent on: {e}",
                    escape::untrusted(stored)
                ),
            })
        };
        let (sender, mailbox) = match (wire(msg.sender()), wire(&env.mailbox)) {
            (Ok(s), Ok(m)) => (s, m),
            (Err(o), _) | (_, Err(o)) => return o,
        };
        let pending = match pending
            .into_iter()
            .map(|stored| wire(stored).map(|path| (stored, path)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(p) => p,
            Err(o) => return o,
        };
        let server = self.server();
        // Read the message (or its head) first: a spool problem should not cost a connection.
        let (from, body) = match load(msg).await {
            Ok(l) => l,
            Err(o) => return o,
        };
        let ctx = Context {
            server: &server,
            account: &self.account,
            client_id: &self.client_id,
            app_only: self.app_only,
            mailbox: &mailbox,
            sender: &sender,
            from: from.as_deref(),
            queue_id: &env.id,
        };
        let mut token = match self
            .tokens
            .token(&self.account, &env.mailbox, Audience::Smtp)
            .await
        {
            Ok(t) => t,
            Err(e) => return self.no_token(e, env),
        };
        let key = format!("{server}\n{}", env.mailbox.to_lowercase());
        let mut renewed = false;
        let mut fresh_failures = 0u32;
        loop {
            let cred = TokenId::of(&token);
            let Some(mut lease) = self
                .pool
                .acquire(&key, &cred, self.timeouts.connect + self.timeouts.command)
                .await
            else {
                return Outcome::Transient {
                    reason: format!(
                        "all {} connections of {} to {server} stayed busy; the message waits \
                         for the next attempt",
                        self.pool.settings().per_mailbox,
                        env.mailbox
                    ),
                };
            };
            let (mut session, reused) = match lease.take() {
                Some(s) => (s, true),
                None => match self.open_session(&ctx, &token).await {
                    Ok(s) => (s, false),
                    Err(f) => {
                        drop(lease);
                        if f.token_refused && !renewed {
                            // Exchange refused the token. A cached one can be refused before
                            // its scheduled refresh (revoked, or this host was suspended while
                            // Microsoft's clock went on): get a new one and try once more at
                            // once. Only a refusal of a fresh token is a hold, and `f` carries
                            // the advice for that (permissions, consent).
                            renewed = true;
                            token = match self
                                .tokens
                                .renew(&self.account, &env.mailbox, Audience::Smtp, &token)
                                .await
                            {
                                Ok(Some(t)) => t,
                                Ok(None) => return f.outcome,
                                Err(e) => return self.no_token(e, env),
                            };
                            continue;
                        }
                        if f.fresh && fresh_failures == 0 {
                            fresh_failures += 1;
                            debug!(queue_id = %env.id, server = %server, reason = ?f.outcome, "the connection failed before the message was sent; trying a new one at once");
                            continue;
                        }
                        return f.outcome;
                    }
                },
            };
            if reused {
                debug!(queue_id = %env.id, server = %server, messages = session.messages, "reusing an authenticated connection");
            }
            let file = match &body {
                Body::Memory(_) => None,
                // The message as it goes out: as stored, or with the header `rewrite_from`
                // made (the queue file itself is never changed).
                Body::File => match open_checked(msg).await {
                    Ok(f) => match msg.stream(f).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            lease.give_back(session, cred);
                            return cannot_read(&msg.message, &e);
                        }
                    },
                    Err(o) => {
                        lease.give_back(session, cred);
                        return o;
                    }
                },
            };
            let reader: Pin<Box<dyn AsyncRead + Send + '_>> = match (&body, file) {
                (Body::Memory(bytes), _) => Box::pin(&bytes[..]),
                (Body::File, Some(f)) => Box::pin(f),
                (Body::File, None) => Box::pin(tokio::io::empty()),
            };
            session.conn.start_transaction();
            let outcome = self
                .transaction(&mut session, &ctx, &pending, reader, msg)
                .await;
            // A connection that failed before the message was accepted (closed, reset, 421,
            // or any temporary refusal on a connection that had carried mail before: the
            // server may end sessions after so many messages) is replaced at once without
            // spending the message's retry; never once the whole message was sent and its
            // reply not read (the server may have taken it).
            let retry = matches!(outcome, Outcome::Transient { .. })
                && !session.conn.awaiting_end
                && (reused || (session.conn.connection_failed() && fresh_failures == 0));
            if retry {
                if !reused {
                    fresh_failures += 1;
                }
                debug!(queue_id = %env.id, server = %server, reused, reason = ?outcome, "the connection failed before the message was sent; trying a new one at once");
                self.discard(session).await;
                drop(lease);
                continue;
            }
            self.after(lease, session, cred, &outcome).await;
            return outcome;
        }
    }

    /// After a transaction: keep the connection for the mailbox's next message if the
    /// dialogue is in step and nothing says the mailbox must pause, else close it.
    async fn after(
        &self,
        lease: Lease<Session>,
        mut session: Session,
        cred: TokenId,
        outcome: &Outcome,
    ) {
        // After a temporary refusal (4xx: "too many messages for this session", the 4th
        // connection of a mailbox...) a new connection is the better bet for the next message;
        // after a hold or a throttle the mailbox pauses anyway.
        let settled = |o: &Outcome| matches!(o, Outcome::Sent { .. } | Outcome::Permanent { .. });
        let keep = !session.conn.broken
            && session.conn.last_code != Some(421)
            && match outcome {
                Outcome::Partial { then, .. } => settled(then),
                o => settled(o),
            }
            && !self.pool.settings().idle.is_zero();
        if !keep {
            self.discard(session).await;
            return;
        }
        session.messages += 1;
        if session.in_transaction {
            // MAIL was accepted but no message followed (every recipient refused, or a
            // refusal at DATA): clear the transaction before the next sender.
            match session.conn.command("RSET", Stage::Mail).await {
                Ok(r) if r.is_positive() => session.in_transaction = false,
                _ => {
                    self.discard(session).await;
                    return;
                }
            }
        }
        lease.give_back(session, cred);
    }

    /// Close a connection that is not kept: QUIT unless the dialogue is out of step.
    async fn discard(&self, mut session: Session) {
        session.conn.quit().await;
    }

    /// The outcome when no token could be had.
    fn no_token(&self, e: TokenError, env: &crate::spool::Envelope) -> Outcome {
        match e {
            TokenError::Transient(e) => Outcome::Transient {
                reason: format!(
                    "no access token for {} (account {}): token endpoint temporarily unavailable: {e}",
                    env.mailbox, self.account
                ),
            },
            TokenError::Configuration(e) => Outcome::held(format!(
                "no access token for {} (account {}): {e}. {}",
                env.mailbox,
                self.account,
                release_hint(&env.id)
            )),
        }
    }

    /// The TCP connection to the server (Nagle off: commands are small and each waits for
    /// its reply), or the transient outcome that says why not.
    async fn connect(&self) -> Result<TcpStream, Outcome> {
        let server = self.server();
        let tcp = match tokio::time::timeout(
            self.timeouts.connect,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Outcome::Transient {
                    reason: format!(
                        "cannot connect to {server}: {} (check DNS and that outbound TCP port {} is open)",
                        super::network_error(&e),
                        self.port
                    ),
                });
            }
            Err(_) => {
                return Err(Outcome::Transient {
                    reason: format!(
                        "cannot connect to {server}: no answer within {} (check that outbound TCP port {} is open)",
                        humantime::format_duration(self.timeouts.connect),
                        self.port
                    ),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        super::watch::emit(|| super::watch::Event::Connected {
            server: server.clone(),
        });
        Ok(tcp)
    }

    /// A new authenticated connection: connect, greeting, EHLO, STARTTLS, EHLO, AUTH.
    async fn open_session(
        &self,
        ctx: &Context<'_>,
        token: &AccessToken,
    ) -> Result<Session, Failure> {
        let server = ctx.server;
        let tcp = self.connect().await?;
        let mut plain = Conn::new(tcp, server.to_string(), self.timeouts);
        if let Err(o) = self.plain_phase(&mut plain, ctx).await {
            let fresh = plain.connection_failed();
            plain.quit().await;
            return Err(Failure {
                fresh: fresh && matches!(o, Outcome::Transient { .. }),
                ..o.into()
            });
        }
        let tls_stream = self.handshake(plain.into_inner()?, ctx).await?;
        let mut conn = Conn::new(tls_stream, server.to_string(), self.timeouts);
        let result: Result<Caps, Failure> = async {
            let caps = self.ehlo(&mut conn, ctx).await?;
            if !caps.xoauth2 {
                return Err(Outcome::held(format!(
                    "{} does not offer AUTH XOAUTH2 after STARTTLS (its EHLO reply: \"{}\"), so \
                     postern did not send the access token. Check that smtp_host of [account.{}] is \
                     Exchange Online (smtp.office365.com). {}",
                    ctx.server,
                    caps.text,
                    self.account,
                    release_hint(ctx.queue_id)
                ))
                .into());
            }
            self.auth(&mut conn, ctx, &token.token).await?;
            Ok(caps)
        }
        .await;
        match result {
            Ok(caps) => Ok(Session {
                conn,
                caps,
                messages: 0,
                in_transaction: false,
            }),
            Err(mut f) => {
                f.fresh =
                    conn.connection_failed() && matches!(f.outcome, Outcome::Transient { .. });
                conn.quit().await;
                Err(f)
            }
        }
    }

    /// Greeting, EHLO, STARTTLS on the plain connection.
    async fn plain_phase(&self, c: &mut Conn<TcpStream>, ctx: &Context<'_>) -> Result<(), Outcome> {
        let greeting = c.reply(Stage::Greeting, self.timeouts.command).await?;
        if greeting.code != 220 {
            return Err(verdict(Stage::Greeting, &greeting, ctx));
        }
        let caps = self.ehlo(c, ctx).await?;
        if !caps.starttls {
            return Err(Outcome::held(format!(
                "{} did not offer STARTTLS (its EHLO reply: \"{}\"), so postern did not send the \
                     access token over an unencrypted connection. Check smtp_host and smtp_port of \
                     [account.{}] (Exchange Online: smtp.office365.com, port 587). A firewall with \
                     SMTP inspection (for example Cisco ASA \"inspect esmtp\") can remove STARTTLS: \
                     turn that inspection off for this traffic. {}",
                ctx.server,
                caps.text,
                self.account,
                release_hint(ctx.queue_id)
            )));
        }
        let r = c.command("STARTTLS", Stage::StartTls).await?;
        if r.code != 220 {
            return Err(verdict(Stage::StartTls, &r, ctx));
        }
        Ok(())
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        ctx: &Context<'_>,
    ) -> Result<TlsStream<TcpStream>, Outcome> {
        let connector = TlsConnector::from(self.tls.clone());
        let server = ctx.server;
        match tokio::time::timeout(
            self.timeouts.command,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => {
                super::watch::emit(|| {
                    let c = s.get_ref().1;
                    super::watch::Event::Tls {
                        version: match c.protocol_version() {
                            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".into(),
                            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".into(),
                            v => format!("{v:?}"),
                        },
                        subject: c
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|der| super::watch::certificate_subject(der)),
                    }
                });
                Ok(s)
            }
            Ok(Err(e)) => Err(tls_failure(&e, ctx, &self.host, &self.account)),
            Err(_) => Err(Outcome::Transient {
                reason: format!(
                    "{server}: TLS handshake after STARTTLS did not finish within {}",
                    humantime::format_duration(self.timeouts.command)
                ),
            }),
        }
    }

    /// One message over an authenticated connection: MAIL, RCPT, then DATA or BDAT.
    async fn transaction(
        &self,
        session: &mut Session,
        ctx: &Context<'_>,
        pending: &[(&str, String)],
        body: Pin<Box<dyn AsyncRead + Send + '_>>,
        msg: &Outgoing,
    ) -> Outcome {
        match self.steps(session, ctx, pending, body, msg).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn steps(
        &self,
        session: &mut Session,
        ctx: &Context<'_>,
        pending: &[(&str, String)],
        body: Pin<Box<dyn AsyncRead + Send + '_>>,
        msg: &Outgoing,
    ) -> Result<Outcome, Outcome> {
        let env = &msg.envelope;
        let size = msg.size();
        let Session {
            conn: c,
            caps,
            in_transaction,
            ..
        } = session;
        if let Some(max) = caps.size
            && max > 0
            && size > max
        {
            return Err(Outcome::Permanent {
                reason: format!(
                    "the message is {size} bytes and {} accepts at most {max} bytes (EHLO SIZE)",
                    ctx.server
                ),
            });
        }
        let mut mail = format!("MAIL FROM:<{}>", ctx.sender);
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if env.body_8bit && caps.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 {
            if !caps.smtputf8 {
                return Err(Outcome::Permanent {
                    reason: format!(
                        "the message needs SMTPUTF8 (internationalised addresses) and {} does not offer it",
                        ctx.server
                    ),
                });
            }
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");

        // MAIL and RCPT: with PIPELINING, MAIL and a batch of RCPTs go out in one write and
        // the replies are read in order (RFC 2920).
        let batch = if caps.pipelining { PIPELINE_BATCH } else { 1 };
        // A small message to one recipient, with CHUNKING, goes in that same write too, as
        // `BDAT <size> LAST` after the RCPT (RFC 3030 pipelines BDAT like any other command):
        // one round trip per message on a kept connection instead of two. The server reads
        // the chunk whatever it answered before it, so a refused MAIL or RCPT costs only
        // those bytes. One recipient only: with several, a refusal of one that concerns the
        // whole message (a throttle at RCPT) would stop the others unsent, where here the
        // message would already have gone to the ones before it.
        if let [(rcpt, path)] = pending
            && caps.pipelining
            && caps.chunking
            && size <= IN_MEMORY
        {
            let out = format!("{mail}RCPT TO:<{path}>\r\n");
            c.send_bdat(out.as_bytes(), body, size, &msg.message)
                .await?;
            return self.pipelined_replies(c, in_transaction, ctx, rcpt).await;
        }
        let mut mail_unanswered = true;
        if !caps.pipelining {
            c.write(mail.as_bytes(), Some(mail.trim_end())).await?;
            let r = c.reply(Stage::Mail, self.timeouts.command).await?;
            if !r.is_positive() {
                return Err(verdict(Stage::Mail, &r, ctx));
            }
            *in_transaction = true;
            mail_unanswered = false;
        }
        let mut results: Vec<(String, RcptStatus, Reply)> = Vec::with_capacity(pending.len());
        for group in pending.chunks(batch) {
            let mut out = String::new();
            if mail_unanswered {
                out.push_str(&mail);
            }
            for (_, path) in group {
                out.push_str(&format!("RCPT TO:<{path}>\r\n"));
            }
            c.write(out.as_bytes(), Some(out.trim_end())).await?;
            if mail_unanswered {
                mail_unanswered = false;
                let r = c.reply(Stage::Mail, self.timeouts.command).await?;
                if !r.is_positive() {
                    return Err(verdict(Stage::Mail, &r, ctx));
                }
                *in_transaction = true;
            }
            for (a, _) in group {
                let r = c.reply(Stage::Rcpt, self.timeouts.command).await?;
                let status = if r.is_positive() {
                    RcptStatus::Sent
                } else {
                    match classify(Stage::Rcpt, &r, ctx) {
                        Verdict::Recipient(s) => s,
                        Verdict::Message(o) => return Err(with_refused(&results, o)),
                    }
                };
                results.push((a.to_string(), status, r));
            }
        }

        if !results.iter().any(|(_, s, _)| *s == RcptStatus::Sent) {
            return Ok(no_recipient_accepted(ctx, results));
        }

        let end = self
            .data_phase(c, caps.chunking, ctx, body, msg)
            .await
            // After a refusal of the message the transaction is over by RFC 5321, but RFC 3030
            // leaves BDAT's state open: the RSET before the next message settles both.
            .inspect(|end| *in_transaction = !end.is_positive())
            // Recipients refused at RCPT stay refused whatever happens to the message now.
            .map_err(|o| with_refused(&results, o))?;
        message_end(ctx, &end, results)
    }

    /// The replies to a pipelined `MAIL`, `RCPT` and `BDAT LAST` (see `steps`), in order;
    /// all three are read whatever the ones before said, so the dialogue stays in step. The
    /// verdict is the one the unpipelined dialogue would reach: the first refusal decides.
    async fn pipelined_replies(
        &self,
        c: &mut Conn<TlsStream<TcpStream>>,
        in_transaction: &mut bool,
        ctx: &Context<'_>,
        rcpt: &str,
    ) -> Result<Outcome, Outcome> {
        // A server may hold its replies to a pipelined group until it has dealt with the
        // whole group, message included: each reply gets the time the message's does.
        let wait = self.timeouts.data_end;
        let mail = match c.reply(Stage::Mail, wait).await {
            Ok(r) => r,
            Err(o) => {
                if c.connection_failed() {
                    // Closed without a word, not even to MAIL: a kept connection the server
                    // had ended. As when MAIL goes alone, it is replaced at once rather than
                    // the message waiting for its retry (which would send it again just the
                    // same). A timeout is not that: the server may be taking the message.
                    c.awaiting_end = false;
                }
                return Err(o);
            }
        };
        let r = c.reply(Stage::Rcpt, wait).await?;
        let end = c.reply(Stage::DataEnd, wait).await?;
        c.awaiting_end = false;
        // After a refused MAIL there is no transaction; after anything else that was not
        // accepted, RFC 3030 leaves BDAT's state open: the RSET before the next message
        // settles it.
        *in_transaction = mail.is_positive() && !end.is_positive();
        if !mail.is_positive() {
            return Err(verdict(Stage::Mail, &mail, ctx));
        }
        if !r.is_positive() {
            // The server had no recipient, so it took nothing with the BDAT.
            return match classify(Stage::Rcpt, &r, ctx) {
                Verdict::Recipient(status) => Ok(no_recipient_accepted(
                    ctx,
                    vec![(rcpt.to_string(), status, r)],
                )),
                Verdict::Message(o) => Err(o),
            };
        }
        let results = vec![(rcpt.to_string(), RcptStatus::Sent, r)];
        message_end(ctx, &end, results)
    }

    /// The message and the reply after it: with CHUNKING one `BDAT <size> LAST` and the bytes
    /// as they are (no dot-stuffing pass; one reply, so nothing waits between chunks), else
    /// DATA with dot-stuffing. `Err`: the server refused DATA or the connection failed; the
    /// reply after the message is returned whatever its code (the transaction is over).
    async fn data_phase(
        &self,
        c: &mut Conn<TlsStream<TcpStream>>,
        chunking: bool,
        ctx: &Context<'_>,
        body: Pin<Box<dyn AsyncRead + Send + '_>>,
        msg: &Outgoing,
    ) -> Result<Reply, Outcome> {
        let size = msg.size();
        if chunking {
            c.send_bdat(b"", body, size, &msg.message).await?;
        } else {
            let r = c.command("DATA", Stage::Data).await?;
            if r.code != 354 {
                return Err(verdict(Stage::Data, &r, ctx));
            }
            c.send_message(body, size, &msg.message).await?;
        }
        let end = c.reply(Stage::DataEnd, self.timeouts.data_end).await?;
        c.awaiting_end = false;
        Ok(end)
    }

    async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut Conn<S>,
        ctx: &Context<'_>,
    ) -> Result<Caps, Outcome> {
        let r = c
            .command(&format!("EHLO {}", self.ehlo_name), Stage::Ehlo)
            .await?;
        if r.code != 250 {
            return Err(verdict(Stage::Ehlo, &r, ctx));
        }
        Caps::parse(&r).ok_or_else(|| Outcome::Transient {
            reason: format!(
                "{} sent an EHLO reply postern cannot parse: \"{}\"",
                ctx.server,
                r.text()
            ),
        })
    }

    async fn auth(
        &self,
        c: &mut Conn<TlsStream<TcpStream>>,
        ctx: &Context<'_>,
        token: &Secret<String>,
    ) -> Result<(), Failure> {
        let sasl = xoauth2_sasl(ctx.mailbox, token.expose());
        // The command line holds the token: build it in a buffer that is wiped on drop, and
        // log only the mechanism.
        let mut line = Zeroizing::new(Vec::with_capacity(sasl.expose().len() + 16));
        line.extend_from_slice(b"AUTH XOAUTH2 ");
        line.extend_from_slice(sasl.expose().as_bytes());
        line.extend_from_slice(b"\r\n");
        c.write(&line, Some("AUTH XOAUTH2 [redacted]")).await?;
        let mut r = c.reply(Stage::Auth, self.timeouts.command).await?;
        if r.code == 334 {
            // A SASL error challenge (Gmail sends one; Exchange is not known to): RFC 7628
            // says answer with an empty response, then the server sends the real failure.
            c.write(b"\r\n", Some("")).await?;
            r = c.reply(Stage::Auth, self.timeouts.command).await?;
        }
        if r.code == 235 {
            return Ok(());
        }
        // 535 5.7.3 is Exchange's answer to a token it does not take (expired, revoked, or
        // lacking permissions); 5.5.127 says the token is about to expire. A new token may fix
        // either; 5.7.139 and the rest are about the mailbox or the tenant, not the token.
        let esc = r.enhanced().map(|e| (e.class, e.subject, e.detail));
        let token_refused =
            matches!(esc, Some((5, 7, 3)) | Some((_, 5, 127))) || (r.code == 535 && esc.is_none());
        Err(Failure {
            outcome: verdict(Stage::Auth, &r, ctx),
            token_refused,
            fresh: false,
        })
    }
}

/// Nothing was sent, every recipient was refused at RCPT: each one's reply, for the
/// forwarder to fail or defer them one by one.
fn no_recipient_accepted(ctx: &Context<'_>, results: Vec<(String, RcptStatus, Reply)>) -> Outcome {
    let last = results.last().map(|(_, _, r)| r.text()).unwrap_or_default();
    Outcome::Sent {
        relay: ctx.server.to_string(),
        reply: format!("no recipient was accepted (last reply: \"{last}\")"),
        recipients: results
            .into_iter()
            .map(|(address, status, r)| RcptResult {
                address,
                status,
                reply: r.text(),
            })
            .collect(),
    }
}

/// The outcome of a message by `end`, the reply after it: refused (recipients refused at RCPT
/// stay refused), or taken for the recipients accepted at RCPT.
fn message_end(
    ctx: &Context<'_>,
    end: &Reply,
    results: Vec<(String, RcptStatus, Reply)>,
) -> Result<Outcome, Outcome> {
    if !end.is_positive() {
        return Err(with_refused(&results, verdict(Stage::DataEnd, end, ctx)));
    }
    let end_text = end.text();
    Ok(Outcome::Sent {
        relay: ctx.server.to_string(),
        reply: end_text.clone(),
        recipients: results
            .into_iter()
            .map(|(address, status, r)| RcptResult {
                address,
                status,
                // Accepted recipients were taken with the message: its reply (the queue id)
                // is the useful one.
                reply: if status == RcptStatus::Sent {
                    end_text.clone()
                } else {
                    r.text()
                },
            })
            .collect(),
    })
}

/// Why a new connection could not be opened and authenticated.
struct Failure {
    /// What to report if nothing else is tried.
    outcome: Outcome,
    /// The server refused the access token: a new one may succeed.
    token_refused: bool,
    /// The connection failed (closed, reset, 421): another one may succeed at once.
    fresh: bool,
}

impl From<Outcome> for Failure {
    fn from(outcome: Outcome) -> Self {
        Failure {
            outcome,
            token_refused: false,
            fresh: false,
        }
    }
}

/// An authenticated connection, as the pool keeps it between messages.
pub struct Session {
    conn: Conn<TlsStream<TcpStream>>,
    caps: Caps,
    /// Messages it carried before (0: a new connection).
    messages: u32,
    /// MAIL was accepted and the transaction not ended: RSET before the next one.
    in_transaction: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.conn.server)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl pool::Close for Session {
    fn close(mut self) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.conn.quit().await })
    }
}

/// The authenticated connections of SMTP transports (share one among every route of a
/// configuration, so the per-mailbox limit holds across routes).
pub type ConnectionPool = pool::Pool<Session>;

/// `o`, or `o` with the recipients refused at RCPT so far (so they are not tried again).
fn with_refused(results: &[(String, RcptStatus, Reply)], o: Outcome) -> Outcome {
    let refused: Vec<RcptResult> = results
        .iter()
        .filter(|(_, s, _)| *s == RcptStatus::Failed)
        .map(|(address, status, r)| RcptResult {
            address: address.clone(),
            status: *status,
            reply: r.text(),
        })
        .collect();
    if refused.is_empty() {
        o
    } else {
        Outcome::Partial {
            refused,
            then: Box::new(o),
        }
    }
}

/// Messages up to this size are read into memory once per delivery, on the async thread
/// (see [`super::READ_INLINE`]); larger ones stream from the file.
const IN_MEMORY: u64 = super::READ_INLINE;
/// How much of the message is searched for the `From:` header.
const HEAD: usize = 64 * 1024;

/// The message to send: its bytes when small, else a note to stream it from the queue file.
enum Body {
    Memory(Vec<u8>),
    File,
}

/// Open the queue file (never through a symlink), check it holds the whole message
/// (`envelope.size` bytes, then postern's trailers), and read its `From:` address and, when
/// small, its bytes. A small message was written moments ago and is read from the page cache
/// in microseconds, so it is read right here (as the worker reads the envelope); a large one
/// is opened and its head read on the blocking pool.
async fn load(msg: &Outgoing) -> Result<(Option<String>, Body), Outcome> {
    if msg.rewrite.is_some() {
        // `rewrite_from`: the stored bytes are not what goes out; the header is made as the
        // message streams (see `Outgoing::stream`), and the `From:` is the rewritten one.
        let msg = msg.clone();
        return tokio::task::spawn_blocking(move || {
            open_blocking(&msg.message, msg.envelope.size)?;
            Ok((msg.from_header(), Body::File))
        })
        .await
        .unwrap_or_else(|e| {
            Err(Outcome::Transient {
                reason: format!("reading the queue file failed: {e}"),
            })
        });
    }
    let (path, size) = (msg.message.clone(), msg.envelope.size);
    if size <= IN_MEMORY {
        return load_blocking(&path, size);
    }
    tokio::task::spawn_blocking(move || load_blocking(&path, size))
        .await
        .unwrap_or_else(|e| {
            Err(Outcome::Transient {
                reason: format!("reading the queue file failed: {e}"),
            })
        })
}

fn load_blocking(path: &Path, size: u64) -> Result<(Option<String>, Body), Outcome> {
    let mut f = open_blocking(path, size)?;
    let small = size <= IN_MEMORY;
    let want = if small { size as usize } else { HEAD };
    let mut buf = Vec::with_capacity(want);
    (&mut f)
        .take(want as u64)
        .read_to_end(&mut buf)
        .map_err(|e| cannot_read(path, &e))?;
    if small && buf.len() as u64 != size {
        return Err(short_file(path, buf.len() as u64, size));
    }
    let from = super::from_address(&buf[..buf.len().min(HEAD)]);
    Ok((from, if small { Body::Memory(buf) } else { Body::File }))
}

/// The queue file opened for streaming the message (for [`Body::File`]).
async fn open_checked(msg: &Outgoing) -> Result<tokio::fs::File, Outcome> {
    let (path, size) = (msg.message.clone(), msg.envelope.size);
    tokio::task::spawn_blocking(move || open_blocking(&path, size))
        .await
        .unwrap_or_else(|e| {
            Err(Outcome::Transient {
                reason: format!("opening the queue file failed: {e}"),
            })
        })
        .map(tokio::fs::File::from_std)
}

fn open_blocking(path: &Path, size: u64) -> Result<std::fs::File, Outcome> {
    let f = crate::spool::msgfile::open_message(path, size)
        .map_err(|e| cannot_read(path, &e))?
        .into_inner();
    match f.metadata() {
        Ok(m) if m.len() >= size => Ok(f),
        Ok(m) => Err(Outcome::Transient {
            reason: format!(
                "queue file {} is {} bytes, shorter than the {size}-byte message its envelope \
                 records; not sending a truncated message",
                path.display(),
                m.len()
            ),
        }),
        Err(e) => Err(cannot_read(path, &e)),
    }
}

impl Transport for SmtpTransport {
    fn describe(&self) -> String {
        format!("smtp:{}:{}", self.host, self.port)
    }

    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        Box::pin(self.deliver(msg))
    }
}

/// The verdict on a reply that should have been positive; a recipient-only verdict cannot
/// happen outside RCPT, but if it did, retrying is the safe answer.
fn verdict(stage: Stage, reply: &Reply, ctx: &Context<'_>) -> Outcome {
    match classify(stage, reply, ctx) {
        Verdict::Message(o) => o,
        Verdict::Recipient(_) => Outcome::Transient {
            reason: format!("{} answered with \"{}\"", ctx.server, reply.text()),
        },
    }
}

/// The queue file ended before the message did.
fn short_file(path: &Path, got: u64, size: u64) -> Outcome {
    Outcome::Transient {
        reason: format!(
            "queue file {} ended after {got} of the message's {size} bytes; the message was not sent",
            path.display()
        ),
    }
}

/// The server closed or reset the connection (rather than a timeout or garbage).
fn closed_by_peer(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
    )
}

fn cannot_read(path: &Path, e: &io::Error) -> Outcome {
    Outcome::Transient {
        reason: format!("cannot read {}: {e}", path.display()),
    }
}

/// A failed TLS handshake: certificate problems are configuration (Held), the rest is
/// network weather (Transient).
fn tls_failure(e: &io::Error, ctx: &Context<'_>, host: &str, account: &str) -> Outcome {
    let server = ctx.server;
    let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_err {
        // Retrying cannot make an untrusted certificate trusted: someone has to install the
        // right CA, fix smtp_host, or remove a TLS-inspecting middlebox. Holding says so at
        // once instead of burning the message's lifetime on retries.
        Some(rustls::Error::InvalidCertificate(ce)) => {
            let hint = match ce {
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                    "The certificate is not valid for the name \"{host}\": set smtp_host of \
                     [account.{account}] to the server's DNS name (smtp.office365.com), not an \
                     IP address or an alias."
                ),
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. }
                | rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. } => {
                    "Check this host's clock (timedatectl); if it is right, the server's \
                     certificate is out of date."
                        .to_string()
                }
                _ => format!(
                    "If a firewall or proxy inspects TLS, add its CA certificate (PEM) as ca_file \
                     in [account.{account}]; otherwise install or update this host's CA bundle \
                     (the ca-certificates package)."
                ),
            };
            Outcome::held(format!(
                "{server}: the TLS certificate is not trusted ({ce:?}), so postern did not send \
                     the access token. {hint} {}",
                release_hint(ctx.queue_id)
            ))
        }
        Some(rustls::Error::PeerIncompatible(p)) => Outcome::held(format!(
            "{server}: no common TLS version or cipher ({p:?}); postern requires TLS 1.2 or \
                 later. Check smtp_host/smtp_port of [account.{account}] and any TLS-inspecting \
                 firewall. {}",
            release_hint(ctx.queue_id)
        )),
        _ => Outcome::Transient {
            reason: format!(
                "{server}: TLS handshake after STARTTLS failed: {}",
                super::network_error(e)
            ),
        },
    }
}

/// The base64 XOAUTH2 initial response: `user=<mailbox>^Aauth=Bearer <token>^A^A`
/// (microsoft-reference.md §3.3). Wrapped in [`Secret`]: it carries the token.
pub fn xoauth2_sasl(user: &str, token: &str) -> Secret<String> {
    let raw = Zeroizing::new(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    Secret::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()))
}

/// The TLS client configuration: TLS 1.2+, aws-lc-rs, the platform's roots plus `ca_file`.
fn client_config(
    account: &str,
    ca_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, UpstreamError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut extra: Vec<CertificateDer<'static>> = Vec::new();
    if let Some(path) = ca_file {
        let pem_err = |source| UpstreamError::CaFile {
            account: account.to_string(),
            path: path.to_path_buf(),
            source,
        };
        extra = CertificateDer::pem_file_iter(path)
            .map_err(pem_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err)?;
        if extra.is_empty() {
            return Err(UpstreamError::NoCaCert {
                account: account.to_string(),
                path: path.to_path_buf(),
            });
        }
        // Check each one here, so a bad ca_file is reported as such and not as "no roots".
        let mut probe = rustls::RootCertStore::empty();
        for cert in &extra {
            probe
                .add(cert.clone())
                .map_err(|source| UpstreamError::BadCa {
                    account: account.to_string(),
                    path: path.to_path_buf(),
                    source,
                })?;
        }
    }
    let tls_err = |source| UpstreamError::Tls {
        account: account.to_string(),
        source,
    };
    let verifier: Arc<dyn ServerCertVerifier> =
        match rustls_platform_verifier::Verifier::new_with_extra_roots(
            extra.clone(),
            provider.clone(),
        ) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                // A minimal container may have no CA bundle at all; Mozilla's roots (which
                // Microsoft's certificates chain to) keep postern working there.
                warn!(
                    account,
                    "no usable system CA certificates ({e}); using the built-in Mozilla roots"
                );
                let mut roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                for cert in extra {
                    roots.add(cert).map_err(tls_err)?;
                }
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| tls_err(rustls::Error::General(e.to_string())))?
            }
        };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?
        // "dangerous" only because rustls cannot check a custom verifier; ours is the
        // platform's (or WebPKI's) full verification.
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One SMTP reply: its code and every line as received (without CRLF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    lines: Vec<String>,
}

/// An enhanced status code (RFC 3463), with Exchange's three-digit details (5.7.139).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode {
    /// 2, 4 or 5.
    pub class: u8,
    /// Subject (0–999).
    pub subject: u16,
    /// Detail (0–999).
    pub detail: u16,
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Reply {
    /// Parse a reply from its lines (each `NNN-text` or `NNN text`, the last with a space).
    /// `None` when a line is malformed, the codes differ, or a non-last line says last.
    pub fn from_lines<I, S>(lines: I) -> Option<Reply>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let lines: Vec<String> = lines.into_iter().map(|l| l.as_ref().to_string()).collect();
        let n = lines.len();
        let mut code = None;
        for (i, l) in lines.iter().enumerate() {
            let (c, last) = parse_line(l.as_bytes())?;
            if *code.get_or_insert(c) != c || last != (i + 1 == n) {
                return None;
            }
        }
        Some(Reply { code: code?, lines })
    }

    /// The full reply as one line: its lines joined with a space.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// The lines as received.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The enhanced status code at the start of the first line's text, if any.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        let first = self.lines.first()?;
        let text = first.get(4..)?;
        let word = text.split(' ').next()?;
        let mut parts = word.split('.');
        let num = |p: Option<&str>| -> Option<u16> {
            let p = p?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let class = num(parts.next())?;
        let subject = num(parts.next())?;
        let detail = num(parts.next())?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(EnhancedCode {
            class: class as u8,
            subject,
            detail,
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// `(code, is_last)` of one reply line; `None` when it does not start with three digits
/// followed by a space, a hyphen or the end of the line.
fn parse_line(l: &[u8]) -> Option<(u16, bool)> {
    let digits = l.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match l.get(3) {
        None | Some(b' ') => Some((code, true)),
        Some(b'-') => Some((code, false)),
        _ => None,
    }
}

/// What the server offered in EHLO.
#[derive(Debug, Clone, Default)]
struct Caps {
    starttls: bool,
    pipelining: bool,
    /// `SIZE` (0 = no fixed limit); `None` when not offered.
    size: Option<u64>,
    eight_bit: bool,
    smtputf8: bool,
    xoauth2: bool,
    /// CHUNKING (BDAT, RFC 3030).
    chunking: bool,
    /// The reply, for reasons.
    text: String,
}

impl Caps {
    /// Parse with smtp-proto's EHLO parser (the one the server side uses too).
    fn parse(r: &Reply) -> Option<Caps> {
        let mut raw = Vec::new();
        for l in r.lines() {
            raw.extend_from_slice(l.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        let e = smtp_proto::EhloResponse::<String>::parse(&mut raw.iter()).ok()?;
        let has = |ext: u32| e.capabilities & ext != 0;
        Some(Caps {
            starttls: has(smtp_proto::EXT_START_TLS),
            pipelining: has(smtp_proto::EXT_PIPELINING),
            size: has(smtp_proto::EXT_SIZE).then_some(e.size as u64),
            eight_bit: has(smtp_proto::EXT_8BIT_MIME),
            smtputf8: has(smtp_proto::EXT_SMTP_UTF8),
            xoauth2: has(smtp_proto::EXT_AUTH) && e.auth_mechanisms & smtp_proto::AUTH_XOAUTH2 != 0,
            chunking: has(smtp_proto::EXT_CHUNKING),
            text: r.text(),
        })
    }
}

/// Dot-stuffs a message for DATA as it streams through (RFC 5321 §4.5.2): a line that starts
/// with "." gets another "."; [`finish`](Self::finish) adds the final CRLF if needed and
/// `.CRLF`.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    line_start: bool,
    last: [u8; 2],
    len: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            last: [0, 0],
            len: 0,
        }
    }
}

impl DotStuffer {
    /// Append `input`, stuffed, to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut from = 0;
        for (i, &b) in input.iter().enumerate() {
            if self.line_start && b == b'.' {
                out.extend_from_slice(&input[from..i]);
                out.push(b'.');
                from = i;
            }
            self.line_start = b == b'\n';
        }
        out.extend_from_slice(&input[from..]);
        match input {
            [] => {}
            [b] => self.last = [self.last[1], *b],
            [.., a, b] => self.last = [*a, *b],
        }
        self.len += input.len() as u64;
    }

    /// Append the end of data: CRLF unless the message already ended with one, then `.CRLF`.
    pub fn finish(&self, out: &mut Vec<u8>) {
        if self.len > 0 && self.last != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// An SMTP connection: the stream plus our read buffer. Every error becomes an
/// `Outcome::Transient` that says what we were waiting for.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    server: String,
    timeouts: Timeouts,
    /// Set when the dialogue is out of step (I/O error, timeout, message half sent): then no
    /// QUIT is sent, the connection is just closed.
    broken: bool,
    /// The server closed or reset the connection (as opposed to a timeout or a bad reply).
    peer_closed: bool,
    /// The code of the last reply read.
    last_code: Option<u16>,
    /// The whole message was sent and its reply not yet read: if the connection fails now,
    /// the server may have taken the message.
    awaiting_end: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S, server: String, timeouts: Timeouts) -> Self {
        Conn {
            io,
            buf: Vec::with_capacity(1024),
            server,
            timeouts,
            broken: false,
            peer_closed: false,
            last_code: None,
            awaiting_end: false,
        }
    }

    /// Forget the previous message's reply codes (a pooled connection).
    fn start_transaction(&mut self) {
        self.last_code = None;
        self.peer_closed = false;
        self.awaiting_end = false;
    }

    /// The connection, not the message, failed: closed or reset by the server, or a `421`
    /// (the server closing the session).
    fn connection_failed(&self) -> bool {
        self.peer_closed || self.last_code == Some(421)
    }

    fn lost(&mut self, what: String) -> Outcome {
        self.broken = true;
        Outcome::Transient {
            reason: format!("{}: {what}", self.server),
        }
    }

    /// Write `bytes` and flush; `shown` is what the trace log shows (never the token).
    async fn write(&mut self, bytes: &[u8], shown: Option<&str>) -> Result<(), Outcome> {
        if let Some(s) = shown {
            trace!(server = %self.server, "C: {s}");
            super::watch::emit(|| super::watch::Event::Sent(s.to_string()));
        }
        let t = self.timeouts.command;
        match tokio::time::timeout(t, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.peer_closed = closed_by_peer(&e);
                Err(self.lost(format!(
                    "connection lost while sending: {}",
                    super::network_error(&e)
                )))
            }
            Err(_) => Err(self.lost(format!(
                "could not send within {}",
                humantime::format_duration(t)
            ))),
        }
    }

    /// Send one command line (CRLF added) and read its reply.
    async fn command(&mut self, line: &str, stage: Stage) -> Result<Reply, Outcome> {
        let bytes = format!("{line}\r\n");
        self.write(bytes.as_bytes(), Some(line)).await?;
        self.reply(stage, self.timeouts.command).await
    }

    /// Read one reply within `t`.
    async fn reply(&mut self, stage: Stage, t: Duration) -> Result<Reply, Outcome> {
        let what = match stage {
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "the reply to EHLO",
            Stage::StartTls => "the reply to STARTTLS",
            Stage::Auth => "the reply to AUTH",
            Stage::Mail => "the reply to MAIL FROM",
            Stage::Rcpt => "the reply to RCPT TO",
            Stage::Data => "the reply to DATA",
            // The one place where a lost connection may mean "sent": say so.
            Stage::DataEnd => {
                "the reply after the message was sent (Exchange may have taken it; the retry can \
                 deliver a duplicate)"
            }
        };
        match tokio::time::timeout(t, self.read_reply()).await {
            Ok(Ok(r)) => {
                self.last_code = Some(r.code);
                trace!(server = %self.server, "S: {}", r.text());
                super::watch::emit(|| super::watch::Event::Reply(r.text()));
                crate::metrics::upstream_reply(&self.server, &r.text());
                Ok(r)
            }
            Ok(Err(e)) => {
                self.peer_closed = closed_by_peer(&e);
                Err(self.lost(format!(
                    "{} while waiting for {what}",
                    super::network_error(&e)
                )))
            }
            Err(_) => Err(self.lost(format!(
                "no answer within {} while waiting for {what}",
                humantime::format_duration(t)
            ))),
        }
    }

    async fn read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        let mut code = None;
        loop {
            let line = self.read_line().await?;
            let text = String::from_utf8_lossy(&line).into_owned();
            let Some((c, last)) = parse_line(&line) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed reply line {text:?}"),
                ));
            };
            if *code.get_or_insert(c) != c {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply line {text:?} changes the reply code"),
                ));
            }
            lines.push(text);
            if last {
                return Ok(Reply { code: c, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply with too many lines",
                ));
            }
        }
    }

    /// One line without its CRLF (a bare LF also ends a line).
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "reply line too long",
                ));
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Stream `size` message bytes from `file` as DATA content, dot-stuffed and terminated.
    async fn send_message(
        &mut self,
        mut file: impl AsyncRead + Unpin,
        size: u64,
        path: &Path,
    ) -> Result<(), Outcome> {
        // From here until the final reply the server is in DATA mode: any failure leaves the
        // dialogue unusable (a QUIT would become message text), so it is marked broken and
        // only cleared by a complete send.
        self.broken = true;
        let mut stuffer = DotStuffer::default();
        let mut input = vec![0u8; CHUNK];
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 2);
        loop {
            let n = match file.read(&mut input).await {
                Ok(n) => n,
                // Never send the final "." after a partial message.
                Err(e) => return Err(cannot_read(path, &e)),
            };
            out.clear();
            if n == 0 {
                if stuffer.len != size {
                    // Leave the server waiting for the end of DATA: it discards the partial
                    // message when the connection closes.
                    return Err(short_file(path, stuffer.len, size));
                }
                stuffer.finish(&mut out);
            } else {
                stuffer.push(&input[..n], &mut out);
            }
            self.write_data(&out).await?;
            if n == 0 {
                break;
            }
        }
        self.flush_data().await?;
        debug!(server = %self.server, bytes = stuffer.len, "message sent, waiting for the reply");
        self.broken = false;
        self.awaiting_end = true;
        Ok(())
    }

    /// Send the message as one `BDAT <size> LAST` chunk: the command line, then exactly
    /// `size` bytes from `file` as they are, read and written 64 KiB at a time; `pipelined`
    /// (command lines to go in the same write, before it) is logged and sent first.
    async fn send_bdat(
        &mut self,
        pipelined: &[u8],
        mut file: impl AsyncRead + Unpin,
        size: u64,
        path: &Path,
    ) -> Result<(), Outcome> {
        // Once the command is out, the server reads `size` octets whatever they are: the
        // dialogue is only in step again after all of them (see send_message).
        self.broken = true;
        if !pipelined.is_empty() {
            let shown = String::from_utf8_lossy(pipelined);
            trace!(server = %self.server, "C: {}", shown.trim_end());
            super::watch::emit(|| super::watch::Event::Sent(shown.trim_end().to_string()));
        }
        let command = format!("BDAT {size} LAST\r\n");
        trace!(server = %self.server, "C: {}", command.trim_end());
        super::watch::emit(|| super::watch::Event::Sent(command.trim_end().to_string()));
        // The commands pipelined before it, the command and the first block of the message
        // go out in one write.
        let head = pipelined.len() + command.len();
        let mut buf = vec![0u8; CHUNK.max(head + 1)];
        buf[..pipelined.len()].copy_from_slice(pipelined);
        buf[pipelined.len()..head].copy_from_slice(command.as_bytes());
        let mut filled = head;
        let mut sent: u64 = 0;
        loop {
            let n = match file.read(&mut buf[filled..]).await {
                Ok(n) => n,
                // Never complete the chunk with anything but the message.
                Err(e) => return Err(cannot_read(path, &e)),
            };
            sent += n as u64;
            filled += n;
            if n == 0 || filled == buf.len() {
                self.write_data(&buf[..filled]).await?;
                filled = 0;
            }
            if n == 0 {
                break;
            }
        }
        if sent != size {
            // Fewer bytes than announced: the server is still waiting for the rest and
            // discards the partial message when the connection closes.
            return Err(short_file(path, sent, size));
        }
        self.flush_data().await?;
        debug!(server = %self.server, bytes = sent, "message sent (BDAT), waiting for the reply");
        self.broken = false;
        self.awaiting_end = true;
        Ok(())
    }

    /// Write a part of the message within the data timeout.
    async fn write_data(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        let t = self.timeouts.data_block;
        match tokio::time::timeout(t, self.io.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.peer_closed = closed_by_peer(&e);
                Err(self.lost(format!(
                    "connection lost while sending the message: {}",
                    super::network_error(&e)
                )))
            }
            Err(_) => Err(self.lost(format!(
                "could not send a part of the message within {}",
                humantime::format_duration(t)
            ))),
        }
    }

    async fn flush_data(&mut self) -> Result<(), Outcome> {
        match tokio::time::timeout(self.timeouts.data_block, self.io.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.peer_closed = closed_by_peer(&e);
                Err(self.lost(format!(
                    "connection lost while sending the message: {}",
                    super::network_error(&e)
                )))
            }
            Err(_) => Err(self.lost("could not finish sending the message".into())),
        }
    }

    /// After STARTTLS's 220: the raw stream. Bytes already buffered beyond the 220 would be
    /// plain-text data injected before TLS (CVE-2011-0411 style): refuse them.
    fn into_inner(self) -> Result<S, Outcome> {
        if !self.buf.is_empty() {
            return Err(Outcome::Transient {
                reason: format!(
                    "{}: the server sent data after its STARTTLS reply, before TLS started; \
                     postern refuses it (possible injection) and will retry",
                    self.server
                ),
            });
        }
        Ok(self.io)
    }

    /// Best effort: QUIT, read 221, close (TLS close_notify). Bounded by [`QUIT_TIMEOUT`].
    async fn quit(&mut self) {
        let _ = tokio::time::timeout(QUIT_TIMEOUT, async {
            if !self.broken {
                trace!(server = %self.server, "C: QUIT");
                if self.io.write_all(b"QUIT\r\n").await.is_ok() && self.io.flush().await.is_ok() {
                    let _ = self.read_reply().await;
                }
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_matches_microsofts_worked_example() {
        // microsoft-reference.md §3.3 (golden vector).
        let s = xoauth2_sasl(
            "test@contoso.onmicrosoft.com",
            "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
        );
        assert_eq!(
            s.expose(),
            "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
        );
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }

    #[test]
    fn replies_keep_three_digit_enhanced_codes() {
        let r = Reply::from_lines([
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        ])
        .unwrap();
        let e = r.enhanced().unwrap();
        assert_eq!((e.class, e.subject, e.detail), (5, 7, 139));
        assert_eq!(e.to_string(), "5.7.139");
        let r = Reply::from_lines(["451 4.7.500 Server busy. Please try again later."]).unwrap();
        assert_eq!(r.enhanced().unwrap().to_string(), "4.7.500");
        assert!(
            Reply::from_lines(["220 host ready"])
                .unwrap()
                .enhanced()
                .is_none()
        );
        assert!(Reply::from_lines(["250"]).unwrap().enhanced().is_none());
        assert!(Reply::from_lines(["250-a", "251 b"]).is_none());
        assert!(Reply::from_lines(["250 a", "250 b"]).is_none());
        assert!(Reply::from_lines(["250-a"]).is_none());
        assert!(Reply::from_lines(["25x a"]).is_none());
    }

    #[tokio::test]
    async fn reader_handles_multi_line_replies_split_anywhere() {
        let wire = b"220 SY5P282CA0097.outlook.office365.com Microsoft ESMTP MAIL Service ready at Sun, 23 Nov 2025 11:12:20 +0000 [08DE2A6028D26C22]\r\n250-SY5P282CA0097.outlook.office365.com Hello [172.105.184.101]\r\n250-SIZE 157286400\r\n250 SMTPUTF8\r\n";
        for split in 1..wire.len() {
            let (mut a, b) = tokio::io::duplex(64);
            let w = wire.to_vec();
            let writer = tokio::spawn(async move {
                a.write_all(&w[..split]).await.unwrap();
                tokio::task::yield_now().await;
                a.write_all(&w[split..]).await.unwrap();
                a
            });
            let mut c = Conn::new(b, "test".into(), Timeouts::default());
            let g = c.read_reply().await.unwrap();
            assert_eq!(g.code, 220);
            assert_eq!(g.lines().len(), 1);
            let e = c.read_reply().await.unwrap();
            assert_eq!(e.code, 250);
            assert_eq!(e.lines().len(), 3);
            assert_eq!(e.lines()[1], "250-SIZE 157286400");
            drop(writer.await.unwrap());
        }
    }

    #[tokio::test]
    async fn reader_rejects_garbage_and_eof() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"hello\r\n").await.unwrap();
        let mut c = Conn::new(b, "test".into(), Timeouts::default());
        assert!(c.read_reply().await.is_err());
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"250-partial\r\n").await.unwrap();
        drop(a);
        let mut c = Conn::new(b, "test".into(), Timeouts::default());
        let e = c.read_reply().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    fn ehlo(lines: &[&str]) -> Caps {
        Caps::parse(&Reply::from_lines(lines.iter().copied()).unwrap()).unwrap()
    }

    #[test]
    fn exchange_ehlo_replies_parse() {
        // microsoft-reference.md §3.2, before and after STARTTLS.
        let before = ehlo(&[
            "250-SY5P282CA0097.outlook.office365.com Hello [172.105.184.101]",
            "250-SIZE 157286400",
            "250-PIPELINING",
            "250-DSN",
            "250-ENHANCEDSTATUSCODES",
            "250-STARTTLS",
            "250-8BITMIME",
            "250-BINARYMIME",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]);
        assert!(before.starttls && before.pipelining && before.eight_bit && before.smtputf8);
        assert!(before.chunking);
        assert!(!before.xoauth2);
        assert_eq!(before.size, Some(157_286_400));
        let after = ehlo(&[
            "250-SY5P282CA0097.outlook.office365.com Hello [172.105.184.101]",
            "250-SIZE 157286400",
            "250-PIPELINING",
            "250-DSN",
            "250-ENHANCEDSTATUSCODES",
            "250-AUTH LOGIN XOAUTH2",
            "250-8BITMIME",
            "250-BINARYMIME",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]);
        assert!(!after.starttls && after.xoauth2);
        let bare = ehlo(&["250 host.example"]);
        assert!(!bare.starttls && !bare.pipelining && bare.size.is_none() && !bare.chunking);
    }

    fn stuff_all(parts: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        for p in parts {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing_at_every_split() {
        let msg: &[u8] = b".starts with a dot\r\nmiddle\r\n.\r\n..two\r\nend.\r\n.";
        let want: &[u8] = b"..starts with a dot\r\nmiddle\r\n..\r\n...two\r\nend.\r\n..\r\n.\r\n";
        for i in 0..=msg.len() {
            for j in i..=msg.len() {
                assert_eq!(
                    stuff_all(&[&msg[..i], &msg[i..j], &msg[j..]]),
                    want,
                    "split at {i},{j}"
                );
            }
        }
        assert_eq!(stuff_all(&[]), b".\r\n");
        assert_eq!(stuff_all(&[b"a\r\n"]), b"a\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a\r", b"\n"]), b"a\r\n.\r\n");
        assert_eq!(stuff_all(&[b"a"]), b"a\r\n.\r\n");
    }
}
