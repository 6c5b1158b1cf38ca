//! Drives a [`Session`] over any `AsyncRead + AsyncWrite` stream: line framing with a length
//! cap, a deadline per command line, a time budget with a minimum rate for DATA/BDAT, the
//! whole-session deadline, the error budget, pipelining, the STARTTLS upgrade, AUTH checks off
//! the async threads, streaming bodies into the spool, and `421` on shutdown or when the
//! connection limiter takes the slot back. How a connection ended is a [`ConnEnd`], logged once.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::config::{Config, ListenerConfig, TlsMode};
use crate::maillog;
use crate::spool::SpoolError;

use super::auth::{AuthGuard, CheckError, Credentials};
use super::command::{self, Command};
use super::data::{BdatDecoder, DataDecoder, DataOutcome, HeaderCapture};
use super::reply::Reply;
use super::server::{ConnLimiter, Slot};
use super::session::{AuthResult, Finish, Session, SessionParams, Step};
use super::{MessageDraft, MessageSink};

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE_MAX: usize = 512;
/// Longest SASL response line (RFC 4954 §4: 12288 octets).
pub const AUTH_LINE_MAX: usize = 12288;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 32 * 1024;
/// Time allowed for the last reply before closing.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a listener's connections share.
pub struct ListenerContext<S: MessageSink> {
    /// The configuration this listener was started with.
    pub config: Arc<Config>,
    /// This listener.
    pub listener: ListenerConfig,
    /// TLS acceptor (`tls = "starttls"` or `"implicit"`).
    pub tls: Option<TlsAcceptor>,
    /// Where accepted messages go.
    pub sink: Arc<S>,
    /// Brute-force guard, shared by all listeners.
    pub auth_guard: Arc<AuthGuard>,
    /// Connection limits, shared by all listeners.
    pub limiter: Arc<ConnLimiter>,
    /// Daemon shutdown: idle connections get `421 4.3.2` and close.
    pub shutdown: CancellationToken,
    /// Stop accepting on this listener (config reload) without touching live connections.
    pub stop: CancellationToken,
    /// Every connection task is spawned here, so the daemon can wait for them.
    pub tracker: TaskTracker,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// The client said QUIT.
    Quit,
    /// A command, DATA or the whole session took too long (`421 4.4.2`).
    Timeout,
    /// `max_errors` reached (`421 4.7.0`).
    TooManyErrors,
    /// The daemon is stopping (`421 4.3.2`).
    Shutdown,
    /// The client closed the connection (or it broke).
    ClientClosed,
    /// STARTTLS or implicit TLS handshake failed.
    TlsFailed(String),
    /// Not in `allow_networks` (`554 5.7.1`).
    Denied,
    /// Over the connection limits (`421 4.7.0`).
    TooManyConnections,
    /// Closed to make room for a client with fewer connections (`421 4.7.0`).
    Evicted,
    /// An HTTP request or header instead of SMTP.
    NonSmtp,
    /// A socket error.
    Io(String),
}

impl fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Quit => f.write_str("quit"),
            Self::Timeout => f.write_str("timeout"),
            Self::TooManyErrors => f.write_str("too many errors"),
            Self::Shutdown => f.write_str("shutdown"),
            Self::ClientClosed => f.write_str("client closed connection"),
            Self::TlsFailed(e) => write!(f, "TLS handshake failed: {e}"),
            Self::Denied => f.write_str("denied by allow_networks"),
            Self::TooManyConnections => f.write_str("too many connections"),
            Self::Evicted => f.write_str("evicted at the connection limit"),
            Self::NonSmtp => f.write_str("non-SMTP command"),
            Self::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// The result of serving one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSummary {
    /// How it ended.
    pub end: ConnEnd,
    /// Messages committed and acknowledged with 250.
    pub accepted: u32,
    /// Refusals sent (4xx/5xx replies other than the closing 421).
    pub rejected: u32,
}

/// Serve one connection: greeting to close. `tls_active` is true for implicit TLS (the
/// handshake is done); `slot` is its place in the connection limiter. Never panics on input;
/// logs one line at the end.
pub async fn serve<S, IO>(
    stream: IO,
    peer: SocketAddr,
    tls_active: bool,
    ctx: &ListenerContext<S>,
    slot: Arc<Slot>,
) -> ConnSummary
where
    S: MessageSink,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(ctx, peer, tls_active, slot);
    let mut io = Io::new(stream);
    let greeting = conn.session.greeting();
    greeting.write_to(&mut io.wbuf);
    let end = match conn.drive(&mut io).await {
        Flow::End(end) => conn.close(&mut io, end).await,
        Flow::Continue => conn.close(&mut io, ConnEnd::ClientClosed).await,
        Flow::StartTls => match ctx.tls.clone() {
            None => ConnEnd::TlsFailed("no TLS certificate configured".into()),
            Some(acceptor) => {
                // The handshake gives way to eviction and shutdown like an idle command
                // wait: a client that stalls it must not keep a slot the limiter took back.
                let handshake = tokio::select! {
                    biased;
                    () = conn.slot.evicted().cancelled() => Err(ConnEnd::Evicted),
                    () = ctx.shutdown.cancelled() => Err(ConnEnd::Shutdown),
                    r = timeout(ctx.listener.command_timeout, acceptor.accept(io.stream)) => Ok(r),
                };
                match handshake {
                    // Mid-handshake there is no SMTP to answer in: just close.
                    Err(end) => end,
                    Ok(Ok(Ok(tls))) => {
                        conn.session.tls_started();
                        let mut io = Io::new(tls);
                        match conn.drive(&mut io).await {
                            Flow::End(end) => conn.close(&mut io, end).await,
                            _ => conn.close(&mut io, ConnEnd::ClientClosed).await,
                        }
                    }
                    Ok(Ok(Err(e))) => ConnEnd::TlsFailed(e.to_string()),
                    Ok(Err(_)) => ConnEnd::TlsFailed("handshake timed out".into()),
                }
            }
        },
    };
    if let Some(bdat) = conn.bdat.take() {
        bdat.draft.discard().await;
    }
    let summary = ConnSummary {
        end,
        accepted: conn.accepted,
        rejected: conn.rejected,
    };
    let log_end = summary.end.to_string();
    match &summary.end {
        // A failed handshake or a broken connection is the client's doing, at will: its
        // lines are bounded like refusals.
        ConnEnd::TlsFailed(_) | ConnEnd::Io(_) if !maillog::may_log_refusal(&conn.client) => {}
        ConnEnd::TlsFailed(_) | ConnEnd::Io(_) => warn!(
            target: "postern::smtp",
            client = %conn.client,
            listener = %ctx.listener.name,
            end = %log_end,
            accepted = summary.accepted,
            rejected = summary.rejected,
            "disconnect"
        ),
        _ => info!(
            target: "postern::smtp",
            client = %conn.client,
            listener = %ctx.listener.name,
            end = %log_end,
            accepted = summary.accepted,
            rejected = summary.rejected,
            "disconnect"
        ),
    }
    summary
}

/// A stream with its read and write buffers. The read buffer never holds more than one line
/// cap plus one read chunk.
struct Io<T> {
    stream: T,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    chunk: Vec<u8>,
}

impl<T> Io<T> {
    fn new(stream: T) -> Self {
        Self {
            stream,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::with_capacity(1024),
            chunk: vec![0; READ_CHUNK],
        }
    }
}

enum Flow {
    Continue,
    End(ConnEnd),
    StartTls,
}

enum Line {
    Ok(Vec<u8>),
    TooLong,
}

struct BdatTransfer<D> {
    draft: D,
    decoder: BdatDecoder,
    header_len: u64,
    write_failed: Option<SpoolError>,
    head: HeaderCapture,
}

struct Conn<'a, S: MessageSink> {
    ctx: &'a ListenerContext<S>,
    session: Session,
    slot: Arc<Slot>,
    peer: SocketAddr,
    client: String,
    deadline: Instant,
    errors: u32,
    accepted: u32,
    rejected: u32,
    bdat: Option<BdatTransfer<S::Draft>>,
}

/// The time budget of one DATA body or BDAT chunk, as Postfix's `smtpd_min_data_rate`: it
/// starts at `data_timeout` and runs down with time; every byte received adds back
/// `1 / min_data_rate` seconds, never above `data_timeout`. A stalled client is cut off after
/// `data_timeout`, one trickling slower than `min_data_rate` a little later, and a client at
/// or above the rate never (short of the session deadline). `min_data_rate = 0` makes it a
/// plain timeout for each read.
#[derive(Debug, Clone, Copy)]
struct DataClock {
    deadline: Instant,
    budget: Duration,
    min_rate: u64,
}

impl DataClock {
    fn new(budget: Duration, min_rate: u64) -> Self {
        Self {
            deadline: deadline_after(budget),
            budget,
            min_rate,
        }
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `n` bytes arrived.
    fn received(&mut self, n: usize) {
        let full = deadline_after(self.budget);
        if self.min_rate == 0 {
            self.deadline = full;
            return;
        }
        let credit = Duration::from_secs_f64(n as f64 / self.min_rate as f64);
        self.deadline = self
            .deadline
            .checked_add(credit)
            .map_or(full, |d| d.min(full));
    }
}

/// `now + d`, capped so that an absurd configured duration cannot overflow `Instant`.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 86_400);
    Instant::now() + d.min(TEN_YEARS)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<'a, S: MessageSink> Conn<'a, S> {
    fn new(
        ctx: &'a ListenerContext<S>,
        peer: SocketAddr,
        tls_active: bool,
        slot: Arc<Slot>,
    ) -> Self {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let session = Session::new(SessionParams {
            config: ctx.config.clone(),
            listener: ctx.listener.clone(),
            client: peer,
            tls_active,
            starttls: ctx.listener.tls == TlsMode::StartTls && ctx.tls.is_some(),
        });
        Self {
            ctx,
            session,
            slot,
            peer,
            client: peer.to_string(),
            deadline: deadline_after(ctx.listener.session_timeout),
            errors: 0,
            accepted: 0,
            rejected: 0,
            bdat: None,
        }
    }

    fn hostname(&self) -> &str {
        &self.ctx.config.hostname
    }

    /// Queue a reply; refusals go to the mail log, and those the client caused count against
    /// `max_errors`.
    fn reply<T>(
        &mut self,
        io: &mut Io<T>,
        r: Reply,
        stage: &str,
        from: Option<&str>,
        rcpt: Option<&str>,
    ) {
        r.write_to(&mut io.wbuf);
        if r.is_error() && r.code != 421 {
            if r.counts_as_error() {
                self.errors += 1;
            }
            self.rejected += 1;
            maillog::rejected_because(
                &self.client,
                stage,
                &r.to_string(),
                r.detail.as_deref(),
                from,
                rcpt,
            );
            crate::metrics::refused(&self.ctx.listener.name, stage, &r.to_string());
        }
    }

    async fn flush_within<T: AsyncWrite + Unpin>(
        io: &mut Io<T>,
        deadline: Instant,
    ) -> Result<(), ConnEnd> {
        if io.wbuf.is_empty() {
            return Ok(());
        }
        let Io { stream, wbuf, .. } = io;
        let write = async {
            stream.write_all(wbuf).await?;
            stream.flush().await
        };
        match timeout_at(deadline, write).await {
            Ok(Ok(())) => {
                wbuf.clear();
                Ok(())
            }
            Ok(Err(_)) => Err(ConnEnd::ClientClosed),
            Err(_) => Err(ConnEnd::Timeout),
        }
    }

    async fn flush<T: AsyncWrite + Unpin>(&mut self, io: &mut Io<T>) -> Result<(), ConnEnd> {
        let deadline = deadline_after(self.ctx.listener.command_timeout).min(self.deadline);
        Self::flush_within(io, deadline).await
    }

    /// Flush pending replies, then read more input (until `deadline` at the latest, and never
    /// past the session deadline); returns how many bytes came. When `idle`, shutdown
    /// interrupts the wait; eviction by the connection limiter always does.
    async fn fill<T>(
        &mut self,
        io: &mut Io<T>,
        deadline: Instant,
        idle: bool,
    ) -> Result<usize, ConnEnd>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        self.flush(io).await?;
        let deadline = deadline.min(self.deadline);
        let Io {
            stream,
            rbuf,
            chunk,
            ..
        } = io;
        let read = timeout_at(deadline, stream.read(chunk));
        let result = tokio::select! {
            biased;
            () = self.ctx.shutdown.cancelled(), if idle => return Err(ConnEnd::Shutdown),
            () = self.slot.evicted().cancelled() => return Err(ConnEnd::Evicted),
            r = read => r,
        };
        match result {
            Err(_) => Err(ConnEnd::Timeout),
            Ok(Ok(0)) => Err(ConnEnd::ClientClosed),
            Ok(Ok(n)) => {
                rbuf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(ConnEnd::Io(e.to_string())),
        }
    }

    /// The next line, CRLF included. Longer than the cap: discarded to its end, `TooLong`.
    /// The whole line must arrive within `command_timeout` (a deadline, not a per-read
    /// timeout: a client trickling a byte at a time cannot hold the connection open).
    async fn next_line<T>(&mut self, io: &mut Io<T>) -> Result<Line, ConnEnd>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let auth = self.session.expects_auth_line();
        let cap = if auth {
            AUTH_LINE_MAX
        } else {
            COMMAND_LINE_MAX
        };
        let mut discarding = false;
        let deadline = deadline_after(self.ctx.listener.command_timeout);
        loop {
            let idle = !self.session.in_transaction();
            if idle && self.ctx.shutdown.is_cancelled() {
                return Err(ConnEnd::Shutdown);
            }
            if let Some(pos) = io.rbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = io.rbuf.drain(..=pos).collect();
                if discarding || line.len() > cap {
                    line.zeroize();
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Ok(line));
            }
            if io.rbuf.len() > cap {
                discarding = true;
                io.rbuf.zeroize();
                io.rbuf.clear();
            }
            self.fill(io, deadline, idle).await?;
        }
    }

    /// Read and process commands until the connection ends or STARTTLS.
    async fn drive<T>(&mut self, io: &mut Io<T>) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let flow = match self.next_line(io).await {
                Err(end) => return Flow::End(end),
                Ok(Line::TooLong) => {
                    let stage = if self.session.expects_auth_line() {
                        "AUTH"
                    } else {
                        "COMMAND"
                    };
                    self.reply(io, Reply::line_too_long(), stage, None, None);
                    if self.session.expects_auth_line() {
                        // Abandon the exchange: the next line is a command again.
                        let _ = self.session.auth_line(b"*");
                    }
                    Flow::Continue
                }
                Ok(Line::Ok(line)) => self.process(io, line).await,
            };
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
            if self.errors >= self.ctx.listener.max_errors {
                return Flow::End(ConnEnd::TooManyErrors);
            }
        }
    }

    async fn process<T>(&mut self, io: &mut Io<T>, line: Vec<u8>) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if self.session.expects_auth_line() {
            let line = Zeroizing::new(line);
            let step = self.session.auth_line(&line);
            return self.run(io, step, "AUTH", None, None).await;
        }
        let mut line = line;
        let cmd = command::parse(&line);
        if matches!(cmd, Command::Auth { .. }) {
            line.zeroize();
        }
        let mut name = cmd.name();
        debug!(target: "postern::smtp", client = %self.client, command = name, "command");
        let (from, rcpt) = match &cmd {
            Command::Mail(m) => (Some(m.sender.to_string()), None),
            Command::Rcpt(a) => (
                self.session.sender().map(ToString::to_string),
                Some(a.to_string()),
            ),
            // A RCPT refused for its syntax is still logged as a RCPT, with the address as the
            // client wrote it: that is what the admin searches the log for.
            _ if refused_rcpt_address(&line).is_some() => {
                name = "RCPT";
                (
                    self.session.sender().map(ToString::to_string),
                    refused_rcpt_address(&line),
                )
            }
            _ => (self.session.sender().map(ToString::to_string), None),
        };
        let ctx = self.ctx;
        let step = self.session.handle(cmd, &|n| ctx.sink.has_room(n));
        let flow = self
            .run(io, step, name, from.as_deref(), rcpt.as_deref())
            .await;
        if !self.session.in_bdat()
            && let Some(bdat) = self.bdat.take()
        {
            bdat.draft.discard().await;
        }
        flow
    }

    async fn run<T>(
        &mut self,
        io: &mut Io<T>,
        step: Step,
        stage: &str,
        from: Option<&str>,
        rcpt: Option<&str>,
    ) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        match step {
            Step::Reply(r) | Step::Challenge(r) => {
                self.reply(io, r, stage, from, rcpt);
                Flow::Continue
            }
            Step::Quit(r) => {
                self.reply(io, r, stage, from, rcpt);
                Flow::End(ConnEnd::Quit)
            }
            Step::Drop(r) => {
                if maillog::may_log_refusal(&self.client) {
                    warn!(target: "postern::smtp", client = %self.client, "non-SMTP command (HTTP?); closing");
                }
                self.reply(io, r, stage, from, rcpt);
                Flow::End(ConnEnd::NonSmtp)
            }
            Step::StartTls(r) => {
                self.reply(io, r, stage, from, rcpt);
                if let Err(end) = self.flush(io).await {
                    return Flow::End(end);
                }
                // Anything pipelined after STARTTLS was sent in plain text: never act on it.
                if !io.rbuf.is_empty() && maillog::may_log_refusal(&self.client) {
                    warn!(target: "postern::smtp", client = %self.client, bytes = io.rbuf.len(), "discarding input pipelined after STARTTLS");
                    io.rbuf.clear();
                }
                Flow::StartTls
            }
            Step::Verify(creds) => self.verify(io, creds).await,
            Step::Data => self.data(io, from).await,
            Step::Bdat { size, last } => self.bdat_chunk(io, size, last, from).await,
            Step::SkipBdat { size, reply } => {
                if let Err(end) = self.skip(io, size).await {
                    return Flow::End(end);
                }
                self.reply(io, reply, stage, from, rcpt);
                Flow::Continue
            }
        }
    }

    async fn verify<T>(&mut self, io: &mut Io<T>, creds: Credentials) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let ip = self.peer.ip();
        let guard = &self.ctx.auth_guard;
        let user = creds.user.clone();
        let result = if guard.is_locked(ip) || guard.is_user_locked(ip, &user) {
            AuthResult::LockedOut
        } else {
            let config = self.ctx.config.clone();
            let wait = deadline_after(self.ctx.listener.command_timeout).min(self.deadline);
            match guard.check(config, creds, wait).await {
                Ok(true) => {
                    guard.record_success(ip, &user);
                    self.slot.authenticated();
                    AuthResult::Success
                }
                Ok(false) => {
                    let verdict = guard.record_failure(ip, &user);
                    if verdict.locked {
                        warn!(target: "postern::smtp", client = %self.client, "too many failed AUTH attempts; client address locked out");
                    }
                    if verdict.user_locked {
                        // The name as the client typed it may be a password: only known
                        // names are written.
                        let name = if self.ctx.config.user(&user).is_some() {
                            user.as_str()
                        } else {
                            "<unknown>"
                        };
                        warn!(target: "postern::smtp", client = %self.client, user = %name, "too many failed AUTH attempts on this user name from several addresses; it is refused to addresses it has not logged in from, for limits.auth_lockout");
                    }
                    if !verdict.delay.is_zero() {
                        if let Err(end) = self.flush(io).await {
                            return Flow::End(end);
                        }
                        tokio::time::sleep(verdict.delay).await;
                    }
                    AuthResult::Failed
                }
                Err(CheckError::Busy) => {
                    warn!(target: "postern::smtp", client = %self.client, "no password check slot came free in time; answering 454");
                    AuthResult::Unavailable
                }
                Err(CheckError::Failed) => {
                    error!(target: "postern::smtp", "password check task failed");
                    AuthResult::Unavailable
                }
            }
        };
        let outcome = match &result {
            AuthResult::Success => "success",
            AuthResult::Failed => "failed",
            AuthResult::LockedOut => "locked out",
            AuthResult::Unavailable => "unavailable",
        };
        // Unknown names are not logged: they are often a password typed into the wrong field.
        let user = if self.ctx.config.user(&user).is_some() {
            user
        } else {
            "<unknown>".to_string()
        };
        // Failures are the guesser's doing: bounded like refusals.
        if matches!(result, AuthResult::Success) || maillog::may_log_refusal(&self.client) {
            info!(target: "postern::smtp", client = %self.client, user = %user, outcome, "AUTH");
        }
        let reply = self.session.auth_result(result);
        self.reply(io, reply, "AUTH", None, None);
        Flow::Continue
    }

    fn data_clock(&self) -> DataClock {
        DataClock::new(
            self.ctx.listener.data_timeout,
            self.ctx.listener.min_data_rate,
        )
    }

    /// Read and drop exactly `size` octets (a refused BDAT chunk).
    async fn skip<T>(&mut self, io: &mut Io<T>, size: u64) -> Result<(), ConnEnd>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut remaining = size;
        let mut clock = self.data_clock();
        while remaining > 0 {
            if io.rbuf.is_empty() {
                let n = self.fill(io, clock.deadline(), false).await?;
                clock.received(n);
            }
            let n = (io.rbuf.len() as u64).min(remaining) as usize;
            io.rbuf.drain(..n);
            remaining -= n as u64;
        }
        Ok(())
    }

    async fn data<T>(&mut self, io: &mut Io<T>, from: Option<&str>) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut draft = match self.ctx.sink.begin().await {
            Ok(d) => d,
            Err(e) => {
                error!(target: "postern::smtp", client = %self.client, error = %e, "cannot create spool draft");
                let r = self.session.data_failed();
                self.reply(io, r, "DATA", from, None);
                return Flow::Continue;
            }
        };
        let header = self.session.received_header(draft.id(), unix_now());
        let mut write_failed = draft.write(header.as_bytes()).await.err();
        self.reply(io, Reply::start_data(), "DATA", from, None);
        if let Err(end) = self.flush(io).await {
            draft.discard().await;
            return Flow::End(end);
        }
        let mut decoder = DataDecoder::new(
            self.ctx.listener.bare_lf,
            self.ctx.listener.max_message_size,
        );
        let mut out = Vec::with_capacity(READ_CHUNK + 64);
        let mut clock = self.data_clock();
        let mut head = HeaderCapture::default();
        loop {
            if !io.rbuf.is_empty() {
                let fed = decoder.feed(&io.rbuf, &mut out);
                io.rbuf.drain(..fed.consumed);
                head.feed(&out);
                if !out.is_empty() && write_failed.is_none() {
                    write_failed = draft.write(&out).await.err();
                }
                out.clear();
                if fed.done {
                    break;
                }
            }
            match self.fill(io, clock.deadline(), false).await {
                Ok(n) => clock.received(n),
                Err(end) => {
                    draft.discard().await;
                    return Flow::End(end);
                }
            }
        }
        self.finish(
            io,
            draft,
            decoder.outcome(),
            header.len() as u64,
            write_failed,
            head.from(),
            "DATA",
            from,
        )
        .await
    }

    async fn bdat_chunk<T>(
        &mut self,
        io: &mut Io<T>,
        size: u64,
        last: bool,
        from: Option<&str>,
    ) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut transfer = match self.bdat.take() {
            Some(t) => t,
            None => match self.ctx.sink.begin().await {
                Ok(mut draft) => {
                    let header = self.session.received_header(draft.id(), unix_now());
                    let write_failed = draft.write(header.as_bytes()).await.err();
                    BdatTransfer {
                        draft,
                        decoder: BdatDecoder::new(
                            self.ctx.listener.bare_lf,
                            self.ctx.listener.max_message_size,
                        ),
                        header_len: header.len() as u64,
                        write_failed,
                        head: HeaderCapture::default(),
                    }
                }
                Err(e) => {
                    error!(target: "postern::smtp", client = %self.client, error = %e, "cannot create spool draft");
                    let r = self.session.data_failed();
                    if let Err(end) = self.skip(io, size).await {
                        return Flow::End(end);
                    }
                    self.reply(io, r, "BDAT", from, None);
                    return Flow::Continue;
                }
            },
        };
        let mut remaining = size;
        let mut out = Vec::new();
        let mut clock = self.data_clock();
        while remaining > 0 {
            if io.rbuf.is_empty() {
                match self.fill(io, clock.deadline(), false).await {
                    Ok(n) => clock.received(n),
                    Err(end) => {
                        transfer.draft.discard().await;
                        return Flow::End(end);
                    }
                }
            }
            let n = (io.rbuf.len() as u64).min(remaining) as usize;
            transfer.decoder.feed(&io.rbuf[..n], &mut out);
            transfer.head.feed(&out);
            io.rbuf.drain(..n);
            remaining -= n as u64;
            if !out.is_empty() && transfer.write_failed.is_none() {
                transfer.write_failed = transfer.draft.write(&out).await.err();
            }
            out.clear();
        }
        if last {
            let BdatTransfer {
                draft,
                decoder,
                header_len,
                write_failed,
                head,
            } = transfer;
            self.finish(
                io,
                draft,
                decoder.outcome(),
                header_len,
                write_failed,
                head.from(),
                "BDAT",
                from,
            )
            .await
        } else {
            let r = self.session.chunk_done(size);
            self.bdat = Some(transfer);
            self.reply(io, r, "BDAT", from, None);
            Flow::Continue
        }
    }

    /// The body is complete: refuse, or commit and only then say 250.
    #[allow(clippy::too_many_arguments)]
    async fn finish<T>(
        &mut self,
        io: &mut Io<T>,
        draft: S::Draft,
        outcome: DataOutcome,
        header_len: u64,
        write_failed: Option<SpoolError>,
        header_from: Option<String>,
        stage: &str,
        from: Option<&str>,
    ) -> Flow
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let id = draft.id().to_string();
        if let Some(e) = write_failed {
            error!(target: "postern::smtp", queue_id = %id, error = %e, "spool write failed; message not accepted");
            draft.discard().await;
            let r = self.session.data_failed();
            self.reply(io, r, stage, from, None);
            return Flow::Continue;
        }
        let stored = header_len + outcome.size;
        if !outcome.doomed()
            && let Some(r) = self.session.refuse_header_from(header_from.as_deref())
        {
            draft.discard().await;
            self.reply(io, r, stage, from, None);
            return Flow::Continue;
        }
        match self.session.finish_data(&outcome, &id, stored, unix_now()) {
            Finish::Reject(r) => {
                draft.discard().await;
                self.reply(io, r, stage, from, None);
            }
            Finish::Commit(env) => {
                let sender = env.sender.clone();
                let nrcpt = env.recipients.len();
                let user = env.auth_user.clone();
                match draft.commit(*env).await {
                    Ok(()) => {
                        maillog::queued(&id, &self.client, &sender, nrcpt, stored, user.as_deref());
                        crate::metrics::received(&self.ctx.listener.name);
                        self.accepted += 1;
                        self.reply(io, Reply::queued(&id), stage, from, None);
                    }
                    Err(e) => {
                        error!(target: "postern::smtp", queue_id = %id, error = %e, "spool commit failed; message not accepted");
                        self.reply(io, Reply::queue_write_error(), stage, from, None);
                    }
                }
            }
        }
        Flow::Continue
    }

    /// Send the closing reply the end calls for, flush what is pending, close the stream.
    async fn close<T>(&mut self, io: &mut Io<T>, end: ConnEnd) -> ConnEnd
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let farewell = match end {
            ConnEnd::Timeout => Some(Reply::timeout(self.hostname())),
            ConnEnd::TooManyErrors => Some(Reply::too_many_errors(self.hostname())),
            ConnEnd::Shutdown => Some(Reply::shutting_down(self.hostname())),
            ConnEnd::Evicted => Some(Reply::too_many_connections(self.hostname())),
            _ => None,
        };
        let broken = matches!(end, ConnEnd::ClientClosed | ConnEnd::Io(_));
        if let Some(r) = farewell {
            r.write_to(&mut io.wbuf);
        }
        if !broken {
            let _ = Self::flush_within(io, deadline_after(FAREWELL_TIMEOUT)).await;
            let _ = timeout(FAREWELL_TIMEOUT, io.stream.shutdown()).await;
        }
        end
    }
}

/// The argument of a `RCPT TO:` line as the client wrote it (for the log), control characters
/// replaced and cut at 256 characters; `None` if the line is not a RCPT.
fn refused_rcpt_address(line: &[u8]) -> Option<String> {
    let verb = line.get(..4)?;
    if !verb.eq_ignore_ascii_case(b"RCPT") {
        return None;
    }
    let rest = String::from_utf8_lossy(&line[4..]);
    let rest = rest.trim_start();
    let arg = match rest.get(..3) {
        Some(to) if to.eq_ignore_ascii_case("TO:") => &rest[3..],
        _ => rest,
    };
    let arg = arg.trim();
    let arg = match arg.find('>') {
        Some(end) if arg.starts_with('<') => &arg[..=end],
        _ => arg.split(' ').next().unwrap_or(""),
    };
    Some(
        arg.chars()
            .take(256)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{AuthMode, BareLfPolicy};
    use crate::smtp::session::b64;
    use crate::smtp::testkit::{MemSink, config, lan, loopback};
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;

    pub(crate) fn context(cfg: Config, sink: MemSink) -> Arc<ListenerContext<MemSink>> {
        let listener = cfg.listeners[0].clone();
        Arc::new(ListenerContext {
            auth_guard: Arc::new(AuthGuard::from_limits(&cfg.limits)),
            limiter: Arc::new(ConnLimiter::from_limits(&cfg.limits)),
            config: Arc::new(cfg),
            listener,
            tls: None,
            sink: Arc::new(sink),
            shutdown: CancellationToken::new(),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// A test client over any stream: send bytes, read whole (multi-line) replies.
    pub(crate) struct Client<T> {
        pub io: T,
        buf: Vec<u8>,
    }

    impl<T: AsyncRead + AsyncWrite + Unpin> Client<T> {
        pub fn new(io: T) -> Self {
            Self {
                io,
                buf: Vec::new(),
            }
        }

        pub async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
            self.io.flush().await.unwrap();
        }

        /// One complete reply ("" at EOF).
        pub async fn reply(&mut self) -> String {
            let mut out = String::new();
            loop {
                while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line).to_string();
                    out.push_str(&line);
                    if line.len() < 4 || line.as_bytes()[3] != b'-' {
                        return out;
                    }
                }
                let mut tmp = [0u8; 4096];
                match self.io.read(&mut tmp).await {
                    Ok(0) | Err(_) => return out,
                    Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                }
            }
        }

        /// One reply line ("" at EOF).
        pub async fn line(&mut self) -> String {
            loop {
                if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=pos).collect();
                    return String::from_utf8_lossy(&line).to_string();
                }
                let mut tmp = [0u8; 4096];
                match self.io.read(&mut tmp).await {
                    Ok(0) | Err(_) => return String::new(),
                    Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                }
            }
        }

        pub async fn cmd(&mut self, line: &str) -> String {
            self.send(format!("{line}\r\n").as_bytes()).await;
            self.reply().await
        }

        /// Read to EOF (ignoring up to 64 KiB, e.g. a TLS alert); true if the server closed.
        pub async fn closed(&mut self) -> bool {
            let mut tmp = [0u8; 4096];
            for _ in 0..16 {
                match self.io.read(&mut tmp).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
            false
        }
    }

    fn start(
        ctx: &Arc<ListenerContext<MemSink>>,
        peer: SocketAddr,
    ) -> (Client<DuplexStream>, JoinHandle<ConnSummary>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let ctx = ctx.clone();
        let h =
            tokio::spawn(async move { serve(server, peer, false, &ctx, Slot::detached()).await });
        (Client::new(client), h)
    }

    fn starts(reply: &str, prefix: &str) {
        assert!(
            reply.starts_with(prefix),
            "expected {prefix:?}, got {reply:?}"
        );
    }

    #[tokio::test]
    async fn full_dialogue() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        assert_eq!(c.reply().await, "220 mx.test ESMTP postern\r\n");
        starts(
            &c.cmd("EHLO printer.lan").await,
            "250-mx.test\r\n250-PIPELINING\r\n",
        );
        assert_eq!(
            c.cmd("MAIL FROM:<printer@example.com> SIZE=100").await,
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            c.cmd("RCPT TO:<boss@example.net>").await,
            "250 2.1.5 Ok\r\n"
        );
        assert_eq!(
            c.cmd("DATA").await,
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        c.send(b"Subject: scan\r\n\r\n..dotted\r\nbody\r\n.\r\n")
            .await;
        assert_eq!(c.reply().await, "250 2.0.0 Ok: queued as Q0000\r\n");
        // The session goes on: a second message on the same connection.
        assert_eq!(
            c.cmd("MAIL FROM:<alice@example.org>").await,
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(c.cmd("RCPT TO:<x@example.net>").await, "250 2.1.5 Ok\r\n");
        assert_eq!(c.cmd("RCPT TO:<y@example.net>").await, "250 2.1.5 Ok\r\n");
        c.cmd("DATA").await;
        c.send(b"hi\r\n.\r\n").await;
        assert_eq!(c.reply().await, "250 2.0.0 Ok: queued as Q0001\r\n");
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        assert!(c.closed().await);
        let s = h.await.unwrap();
        assert_eq!(
            s,
            ConnSummary {
                end: ConnEnd::Quit,
                accepted: 2,
                rejected: 0
            }
        );

        let msgs = sink.committed();
        let (env, body) = &msgs[0];
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.starts_with("Received: from printer.lan ([127.0.0.1])\r\n\tby mx.test (postern) with ESMTP id Q0000\r\n\tfor <boss@example.net>; "), "{text}");
        assert!(
            text.ends_with("+0000\r\nSubject: scan\r\n\r\n.dotted\r\nbody\r\n"),
            "{text}"
        );
        assert_eq!(env.size, body.len() as u64);
        assert_eq!(env.id, "Q0000");
        assert_eq!(env.sender, "printer@example.com");
        assert_eq!(env.mailbox, "relay@example.com");
        assert_eq!(env.route, "office");
        assert_eq!(env.client_addr, "127.0.0.1:40000");
        assert_eq!(env.client_helo, "printer.lan");
        assert_eq!(env.listener, "test");
        assert!(env.received_at > 1_700_000_000);
        let (env2, body2) = &msgs[1];
        assert_eq!(env2.mailbox, "alice@example.org");
        assert_eq!(env2.recipients.len(), 2);
        assert!(!String::from_utf8_lossy(body2).contains("\tfor <"));
    }

    #[tokio::test]
    async fn pipelining_replies_in_order() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.test>\r\nRCPT TO:<>\r\nRCPT TO:<d@e.test>\r\nDATA\r\n").await;
        starts(&c.reply().await, "250-mx.test");
        assert_eq!(c.reply().await, "250 2.1.0 Ok\r\n");
        assert_eq!(c.reply().await, "250 2.1.5 Ok\r\n");
        assert_eq!(
            c.reply().await,
            "501 5.1.3 Bad recipient address syntax: a recipient cannot be <>\r\n"
        );
        assert_eq!(c.reply().await, "250 2.1.5 Ok\r\n");
        assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
        // Body, end, and the next commands in one write; smuggling attempt included.
        c.send(b"x\n.\nRSET\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n").await;
        assert_eq!(c.reply().await, "250 2.0.0 Ok: queued as Q0000\r\n");
        assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
        assert_eq!(c.reply().await, "221 2.0.0 Bye\r\n");
        let s = h.await.unwrap();
        assert_eq!((s.accepted, s.rejected), (1, 1));
        let body = &sink.committed()[0].1;
        assert!(String::from_utf8_lossy(body).ends_with("x\r\n.\r\nRSET\r\nbody\r\n"));
    }

    #[tokio::test]
    async fn oversize_message_is_read_to_the_end_then_refused() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(
            c.cmd("MAIL FROM:<a@example.com> SIZE=20000").await,
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        let line = [b'y'; 998];
        for _ in 0..30 {
            c.send(&line).await;
            c.send(b"\r\n").await;
        }
        c.send(b".\r\n").await;
        assert_eq!(
            c.reply().await,
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        c.cmd("QUIT").await;
        h.await.unwrap();
        assert!(sink.committed().is_empty());
        assert_eq!(sink.discarded(), 1);
    }

    #[tokio::test]
    async fn too_many_recipients_and_refused_sender() {
        let ctx = context(config(), MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(
            c.cmd("MAIL FROM:<someone@elsewhere.test>").await,
            "550 5.7.1 Sender <someone@elsewhere.test> rejected: this relay does not send mail from that address\r\n"
        );
        c.cmd("MAIL FROM:<a@example.com>").await;
        for r in ["a", "b", "c"] {
            assert_eq!(
                c.cmd(&format!("RCPT TO:<{r}@x.test>")).await,
                "250 2.1.5 Ok\r\n"
            );
        }
        assert_eq!(
            c.cmd("RCPT TO:<d@x.test>").await,
            "452 4.5.3 Too many recipients\r\n"
        );
        c.cmd("QUIT").await;
        assert_eq!(h.await.unwrap().rejected, 2);
    }

    #[tokio::test]
    async fn non_ascii_and_nul_and_bare_lf_reject() {
        let sink = MemSink::default();
        let mut cfg = config();
        cfg.listeners[0].bare_lf = BareLfPolicy::Reject;
        let ctx = context(cfg, sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(
            c.cmd("MAIL FROM:<j\u{f6}rg@example.com>").await,
            "553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"
        );
        assert_eq!(
            c.cmd("MAIL FROM:<j\u{f6}rg@example.com> SMTPUTF8").await,
            "250 2.1.0 Ok\r\n"
        );
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"a\nb\r\n.\r\n").await;
        assert_eq!(c.reply().await, "550 5.6.0 Message contains bare LF\r\n");
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"a\0b\r\n.\r\n").await;
        assert_eq!(
            c.reply().await,
            "550 5.6.0 Message contains NUL characters\r\n"
        );
        c.cmd("QUIT").await;
        h.await.unwrap();
        assert!(sink.committed().is_empty());
    }

    #[tokio::test]
    async fn auth_plain_and_login_with_argon2() {
        let sink = MemSink::default();
        let mut cfg = config();
        cfg.listeners[0].auth = AuthMode::Required;
        let ctx = context(cfg, sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        assert!(c.cmd("EHLO x").await.contains("250 AUTH PLAIN LOGIN\r\n"));
        assert_eq!(
            c.cmd("MAIL FROM:<scanner@example.com>").await,
            "530 5.7.0 Authentication required\r\n"
        );
        assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
        assert_eq!(
            c.cmd(&b64(b"\0scanner\0s3cret")).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(
            c.cmd("MAIL FROM:<scanner@example.com>").await,
            "250 2.1.0 Ok\r\n"
        );
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"x\r\n.\r\n").await;
        starts(&c.reply().await, "250 2.0.0 Ok: queued as");
        c.cmd("QUIT").await;
        h.await.unwrap();
        let (env, body) = &sink.committed()[0];
        assert_eq!(env.auth_user.as_deref(), Some("scanner"));
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("with ESMTPA id"), "{text}");
        assert!(
            !text.contains("scanner"),
            "user name stays out of Received: {text}"
        );

        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6\r\n");
        assert_eq!(c.cmd(&b64(b"scanner")).await, "334 UGFzc3dvcmQ6\r\n");
        assert_eq!(
            c.cmd(&b64(b"s3cret")).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        c.cmd("QUIT").await;
        h.await.unwrap();

        // Initial response variants and a wrong password.
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(
            c.cmd(&format!("AUTH PLAIN {}", b64(b"\0scanner\0wrong")))
                .await,
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
        assert_eq!(
            c.cmd(&format!("AUTH LOGIN {}", b64(b"scanner"))).await,
            "334 UGFzc3dvcmQ6\r\n"
        );
        assert_eq!(c.cmd("*").await, "501 5.0.0 Authentication cancelled\r\n");
        c.cmd("QUIT").await;
        h.await.unwrap();

        // Not on loopback and no TLS: AUTH is not offered, and refused with 538.
        let (mut c, h) = start(&ctx, lan());
        c.reply().await;
        assert!(!c.cmd("EHLO x").await.contains("AUTH"));
        assert_eq!(
            c.cmd("AUTH PLAIN").await,
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
        c.cmd("QUIT").await;
        h.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn brute_force_guard_delays_and_locks_out() {
        let mut cfg = config();
        cfg.limits.auth_max_failures = 4;
        cfg.listeners[0].max_errors = 100;
        let ctx = context(cfg, MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        let bad = format!("AUTH PLAIN {}", b64(b"\0scanner\0guess"));
        let mut waited = Vec::new();
        for _ in 0..4 {
            let t0 = Instant::now();
            assert_eq!(
                c.cmd(&bad).await,
                "535 5.7.8 Authentication credentials invalid\r\n"
            );
            waited.push(t0.elapsed().as_secs());
        }
        assert_eq!(waited, vec![0, 0, 1, 2]);
        // Locked out now, even with the right password, and from another connection.
        let good = format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret"));
        assert_eq!(
            c.cmd(&good).await,
            "454 4.7.0 Too many failed authentication attempts; try again later\r\n"
        );
        let (mut c2, h2) = start(&ctx, loopback());
        c2.reply().await;
        c2.cmd("EHLO x").await;
        assert_eq!(
            c2.cmd(&good).await,
            "454 4.7.0 Too many failed authentication attempts; try again later\r\n"
        );
        c.cmd("QUIT").await;
        c2.cmd("QUIT").await;
        h.await.unwrap();
        h2.await.unwrap();
        // After the lockout it works again.
        tokio::time::advance(Duration::from_secs(601)).await;
        let (mut c3, h3) = start(&ctx, loopback());
        c3.reply().await;
        c3.cmd("EHLO x").await;
        assert_eq!(
            c3.cmd(&good).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        c3.cmd("QUIT").await;
        h3.await.unwrap();
    }

    #[tokio::test]
    async fn long_lines_are_refused_and_memory_stays_bounded() {
        let ctx = context(config(), MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        let mut long = vec![b'A'; 600];
        long.extend_from_slice(b"\r\n");
        c.send(&long).await;
        assert_eq!(c.reply().await, "500 5.5.2 Error: line too long\r\n");
        // A megabyte without a newline, then the newline: one reply.
        for _ in 0..64 {
            c.send(&[b'B'; 16 * 1024]).await;
        }
        c.send(b"\r\nNOOP\r\n").await;
        assert_eq!(c.reply().await, "500 5.5.2 Error: line too long\r\n");
        assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
        // Exactly 512 octets with CRLF is fine.
        let mut max = b"NOOP ".to_vec();
        max.resize(510, b'x');
        max.extend_from_slice(b"\r\n");
        c.send(&max).await;
        assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
        c.cmd("QUIT").await;
        assert_eq!(h.await.unwrap().rejected, 2);
    }

    #[tokio::test]
    async fn too_many_errors_closes() {
        let mut cfg = config();
        cfg.listeners[0].max_errors = 3;
        let ctx = context(cfg, MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n").await;
        for _ in 0..3 {
            assert_eq!(
                c.reply().await,
                "500 5.5.2 Error: command not recognized\r\n"
            );
        }
        assert_eq!(
            c.reply().await,
            "421 4.7.0 mx.test Error: too many errors\r\n"
        );
        assert!(c.closed().await);
        assert_eq!(h.await.unwrap().end, ConnEnd::TooManyErrors);
    }

    #[tokio::test]
    async fn http_request_closes() {
        let ctx = context(config(), MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            c.reply().await,
            "221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
        );
        assert!(c.closed().await);
        assert_eq!(h.await.unwrap().end, ConnEnd::NonSmtp);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts() {
        let ctx = context(config(), MemSink::default());
        // Idle command timeout.
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        let t0 = Instant::now();
        assert_eq!(
            c.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(t0.elapsed().as_secs(), 300);
        assert_eq!(h.await.unwrap().end, ConnEnd::Timeout);
        // DATA timeout: a partial body, then silence.
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"partial").await;
        let t0 = Instant::now();
        assert_eq!(
            c.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(t0.elapsed().as_secs(), 600);
        assert_eq!(h.await.unwrap().end, ConnEnd::Timeout);
        assert_eq!(sink.discarded(), 1);
        // Whole-session deadline: NOOP every 200 s never lets the command timeout fire.
        let mut cfg = config();
        cfg.listeners[0].session_timeout = Duration::from_secs(1000);
        let ctx = context(cfg, MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        let t0 = Instant::now();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(200)).await;
            assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        }
        assert_eq!(
            c.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(t0.elapsed().as_secs(), 1000);
        assert_eq!(h.await.unwrap().end, ConnEnd::Timeout);
    }

    /// The command timeout is a deadline for the whole line: a client trickling one byte
    /// every few seconds gets 421 when it runs out, however often it sends.
    #[tokio::test(start_paused = true)]
    async fn a_command_line_must_arrive_within_the_command_timeout() {
        let mut cfg = config();
        cfg.listeners[0].command_timeout = Duration::from_secs(5);
        let ctx = context(cfg, MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        let t0 = Instant::now();
        c.send(b"N").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.send(b"O").await;
        assert_eq!(
            c.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert_eq!(h.await.unwrap().end, ConnEnd::Timeout);
        // The deadline starts with each line: lines that come in time go on for ever.
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            c.send(b"NO").await;
            assert_eq!(c.cmd("OP").await, "250 2.0.0 Ok\r\n");
        }
        c.cmd("QUIT").await;
        assert_eq!(h.await.unwrap().end, ConnEnd::Quit);
    }

    /// DATA has a time budget of data_timeout, refilled by the bytes that arrive at
    /// min_data_rate: slower than the rate, the budget runs out; at the rate, never.
    #[tokio::test(start_paused = true)]
    async fn data_slower_than_the_minimum_rate_times_out() {
        let mut cfg = config();
        cfg.listeners[0].data_timeout = Duration::from_secs(10);
        cfg.listeners[0].min_data_rate = 100;
        cfg.listeners[0].max_message_size = 1_000_000;
        let sink = MemSink::default();
        let ctx = context(cfg, sink.clone());
        let line = [b"x".repeat(48), b"\r\n".to_vec()].concat();
        // 50 bytes a second: the budget shrinks by half a second each second, and runs out
        // 19.5 s in (10 s + 0.5 s for each of the 19 lines received by then).
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        tx(&mut c).await;
        c.cmd("DATA").await;
        let t0 = Instant::now();
        let slow = tokio::spawn(async move {
            for _ in 0..40 {
                if c.io.write_all(&line).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            c
        });
        assert_eq!(h.await.unwrap().end, ConnEnd::Timeout);
        assert_eq!(t0.elapsed(), Duration::from_millis(19_500));
        let mut c = slow.await.unwrap();
        assert_eq!(
            c.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert!(sink.committed().is_empty());
        assert_eq!(sink.discarded(), 1);
        // 150 bytes a second for a minute, longer than data_timeout: accepted.
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        tx(&mut c).await;
        c.cmd("DATA").await;
        let line = [b"y".repeat(148), b"\r\n".to_vec()].concat();
        for _ in 0..60 {
            c.send(&line).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        c.send(b".\r\n").await;
        starts(&c.reply().await, "250 2.0.0 Ok: queued as");
        c.cmd("QUIT").await;
        h.await.unwrap();
        assert_eq!(sink.committed().len(), 1);
    }

    async fn tx(c: &mut Client<DuplexStream>) {
        assert_eq!(c.cmd("MAIL FROM:<a@example.com>").await, "250 2.1.0 Ok\r\n");
        assert_eq!(c.cmd("RCPT TO:<b@c.test>").await, "250 2.1.5 Ok\r\n");
    }

    #[tokio::test]
    async fn sink_errors_answer_451_and_nothing_is_accepted() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        sink.fail_commit(true);
        tx(&mut c).await;
        c.cmd("DATA").await;
        c.send(b"x\r\n.\r\n").await;
        assert_eq!(
            c.reply().await,
            "451 4.3.0 Error: queue file write error\r\n"
        );
        sink.fail_commit(false);
        sink.fail_write(true);
        tx(&mut c).await;
        c.cmd("DATA").await;
        c.send(b"x\r\n.\r\n").await;
        assert_eq!(
            c.reply().await,
            "451 4.3.0 Error: queue file write error\r\n"
        );
        sink.fail_write(false);
        sink.fail_begin(true);
        tx(&mut c).await;
        assert_eq!(
            c.cmd("DATA").await,
            "451 4.3.0 Error: queue file write error\r\n"
        );
        tx(&mut c).await;
        c.send(b"BDAT 3 LAST\r\nabc").await;
        assert_eq!(
            c.reply().await,
            "451 4.3.0 Error: queue file write error\r\n"
        );
        sink.fail_begin(false);
        sink.no_room(true);
        assert_eq!(
            c.cmd("MAIL FROM:<a@example.com>").await,
            "452 4.3.1 Insufficient system storage\r\n"
        );
        sink.no_room(false);
        // And the connection still works.
        tx(&mut c).await;
        c.cmd("DATA").await;
        c.send(b"x\r\n.\r\n").await;
        starts(&c.reply().await, "250 2.0.0 Ok: queued as");
        c.cmd("QUIT").await;
        let s = h.await.unwrap();
        assert_eq!(s.accepted, 1);
        assert_eq!(sink.committed().len(), 1);
    }

    #[tokio::test]
    async fn bdat_dialogue() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        // BDAT without a transaction still consumes its chunk.
        c.send(b"BDAT 5\r\nQUIT\n").await;
        assert_eq!(c.reply().await, "503 5.5.1 Error: need MAIL command\r\n");
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.send(b"BDAT 9\r\nSubject: ").await;
        assert_eq!(c.reply().await, "250 2.0.0 9 octets received\r\n");
        assert_eq!(
            c.cmd("DATA").await,
            "503 5.5.1 Error: BDAT transfer in progress\r\n"
        );
        c.send(b"BDAT 7\r\nx\n\r\n.\r\n").await;
        assert_eq!(c.reply().await, "250 2.0.0 7 octets received\r\n");
        assert_eq!(
            c.cmd("BDAT 0 LAST").await,
            "250 2.0.0 Ok: queued as Q0000\r\n"
        );
        // An abandoned BDAT transfer is discarded on RSET.
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.send(b"BDAT 3\r\nabc").await;
        c.reply().await;
        assert_eq!(c.cmd("RSET").await, "250 2.0.0 Ok\r\n");
        // Too big: refused at once, chunk consumed.
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        let mut big = b"BDAT 10001 LAST\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'z', 10001));
        c.send(&big).await;
        assert_eq!(
            c.reply().await,
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        c.cmd("QUIT").await;
        h.await.unwrap();
        let msgs = sink.committed();
        assert_eq!(msgs.len(), 1);
        assert!(
            msgs[0].1.ends_with(b"Subject: x\r\n\r\n.\r\n"),
            "{:?}",
            String::from_utf8_lossy(&msgs[0].1)
        );
        assert_eq!(sink.discarded(), 1);
    }

    #[tokio::test]
    async fn shutdown_when_idle_and_after_a_transaction() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut idle, h_idle) = start(&ctx, loopback());
        idle.reply().await;
        idle.cmd("EHLO x").await;
        let (mut busy, h_busy) = start(&ctx, loopback());
        busy.reply().await;
        busy.cmd("EHLO x").await;
        busy.cmd("MAIL FROM:<a@example.com>").await;
        busy.cmd("RCPT TO:<b@c.test>").await;

        ctx.shutdown.cancel();
        assert_eq!(
            idle.reply().await,
            "421 4.3.2 mx.test Service shutting down\r\n"
        );
        assert_eq!(h_idle.await.unwrap().end, ConnEnd::Shutdown);

        assert_eq!(
            busy.cmd("DATA").await,
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        busy.send(b"x\r\n.\r\nMAIL FROM:<a@example.com>\r\n").await;
        starts(&busy.reply().await, "250 2.0.0 Ok: queued as");
        assert_eq!(
            busy.reply().await,
            "421 4.3.2 mx.test Service shutting down\r\n"
        );
        let s = h_busy.await.unwrap();
        assert_eq!((s.end, s.accepted), (ConnEnd::Shutdown, 1));
        assert_eq!(sink.committed().len(), 1);
    }

    fn tls_context(
        sink: MemSink,
    ) -> (
        tempfile::TempDir,
        Arc<ListenerContext<MemSink>>,
        rustls_pki_types::CertificateDer<'static>,
    ) {
        let (dir, files, cert) = crate::smtp::tls::tests::self_signed();
        let mut cfg = config();
        cfg.listeners[0].tls = TlsMode::StartTls;
        cfg.listeners[0].tls_files = Some(files.clone());
        let ctx = context(cfg, sink);
        let mut ctx = Arc::try_unwrap(ctx).ok().unwrap();
        ctx.tls = Some(crate::smtp::tls::acceptor(&files).unwrap());
        (dir, Arc::new(ctx), cert)
    }

    pub(crate) fn tls_connector(
        cert: rustls_pki_types::CertificateDer<'static>,
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[tokio::test]
    async fn starttls_upgrade_discards_pipelined_input() {
        let sink = MemSink::default();
        let (_dir, ctx, cert) = tls_context(sink.clone());
        let (mut c, h) = start(&ctx, lan());
        c.reply().await;
        let ehlo = c.cmd("EHLO x").await;
        assert!(
            ehlo.contains("250 STARTTLS\r\n") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        // Injected command after STARTTLS in the same packet (CVE-2011-0411).
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
            .await;
        assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS\r\n");
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tls_connector(cert).connect(name, c.io).await.unwrap();
        let mut c = Client::new(tls);
        // The first reply over TLS answers our EHLO, not the injected MAIL.
        let ehlo = c.cmd("EHLO x").await;
        assert!(ehlo.starts_with("250-mx.test"), "{ehlo}");
        assert!(
            ehlo.contains("250 AUTH PLAIN LOGIN\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(
            c.cmd("STARTTLS").await,
            "503 5.5.1 Error: TLS already active\r\n"
        );
        assert_eq!(
            c.cmd(&format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")))
                .await,
            "235 2.7.0 Authentication successful\r\n"
        );
        c.cmd("MAIL FROM:<scanner@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"secret\r\n.\r\n").await;
        starts(&c.reply().await, "250 2.0.0 Ok: queued as");
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        let s = h.await.unwrap();
        assert_eq!(s.end, ConnEnd::Quit);
        let body = String::from_utf8_lossy(&sink.committed()[0].1).to_string();
        assert!(body.contains("with ESMTPSA id"), "{body}");
        assert!(body.contains("from x ([192.0.2.10])"), "{body}");
    }

    #[tokio::test]
    async fn garbage_instead_of_client_hello() {
        let (_dir, ctx, _) = tls_context(MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
        c.send(b"this is not a TLS ClientHello\r\n\r\n").await;
        assert!(c.closed().await);
        assert!(matches!(h.await.unwrap().end, ConnEnd::TlsFailed(_)));
        // And a client that just hangs up after 220.
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("STARTTLS").await;
        drop(c);
        assert!(matches!(h.await.unwrap().end, ConnEnd::TlsFailed(_)));
    }

    /// A client that stalls the TLS handshake after STARTTLS gives way when the limiter takes
    /// its slot back (before, it kept the connection until command_timeout, 5 minutes by
    /// default, after its slot had been given to another client).
    #[tokio::test]
    async fn a_stalled_starttls_handshake_gives_way_to_eviction() {
        let (_dir, ctx, _) = tls_context(MemSink::default());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let slot = Slot::detached();
        let h = tokio::spawn({
            let (ctx, slot) = (ctx.clone(), slot.clone());
            async move { serve(server, loopback(), false, &ctx, slot).await }
        });
        let mut c = Client::new(client);
        c.reply().await;
        c.cmd("EHLO x").await;
        assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
        // No ClientHello comes.
        slot.evicted().cancel();
        let summary = tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("serve ended at the eviction, not at command_timeout")
            .unwrap();
        assert_eq!(summary.end, ConnEnd::Evicted);
    }

    /// `\r`, `\n`, `\0`, `\\`, `\xHH` escapes of the dialog files.
    fn unescape(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 1 < b.len() {
                match b[i + 1] {
                    b'r' => out.push(b'\r'),
                    b'n' => out.push(b'\n'),
                    b'0' => out.push(0),
                    b'\\' => out.push(b'\\'),
                    b'x' if i + 3 < b.len() => {
                        let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                        out.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 2;
                    }
                    other => panic!("unknown escape \\{}", other as char),
                }
                i += 2;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// Runs every `tests/dialogs/*.txt` (format in `tests/dialogs/README.md`).
    #[tokio::test]
    async fn dialogs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        assert!(
            files.len() >= 5,
            "dialog files missing in {}",
            dir.display()
        );
        for path in files {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let ctx = context(config(), MemSink::default());
            let (mut c, h) = start(&ctx, loopback());
            let mut pending = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let at = format!("{name}:{}", n + 1);
                if line.trim().is_empty() || line.starts_with('#') {
                    continue;
                }
                if let Some(cmd) = line.strip_prefix("C: ") {
                    pending.extend_from_slice(cmd.as_bytes());
                    pending.extend_from_slice(b"\r\n");
                    continue;
                }
                if let Some(raw) = line.strip_prefix("R: ") {
                    pending.extend(unescape(raw));
                    continue;
                }
                if !pending.is_empty() {
                    c.send(&std::mem::take(&mut pending)).await;
                }
                if let Some(want) = line.strip_prefix("S: ") {
                    let got = c.line().await;
                    assert!(
                        got.starts_with(want),
                        "{at}: expected {want:?}, got {got:?}"
                    );
                } else if line == "CLOSED" {
                    assert!(c.closed().await, "{at}: connection still open");
                } else {
                    panic!("{at}: cannot read {line:?}");
                }
            }
            if !pending.is_empty() {
                c.send(&pending).await;
            }
            drop(c);
            h.await.unwrap();
        }
    }

    #[tokio::test]
    async fn absurd_durations_do_not_overflow() {
        let mut cfg = config();
        cfg.listeners[0].session_timeout = Duration::MAX;
        cfg.listeners[0].command_timeout = Duration::MAX;
        cfg.listeners[0].data_timeout = Duration::MAX;
        cfg.limits.auth_lockout = Duration::MAX;
        cfg.limits.auth_max_failures = 1;
        let ctx = context(cfg, MemSink::default());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        let bad = format!("AUTH PLAIN {}", b64(b"\0nobody\0x"));
        assert_eq!(
            c.cmd(&bad).await,
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
        assert_eq!(
            c.cmd(&bad).await,
            "454 4.7.0 Too many failed authentication attempts; try again later\r\n"
        );
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        assert_eq!(h.await.unwrap().end, ConnEnd::Quit);
    }

    #[tokio::test]
    async fn client_hangup_mid_data_discards() {
        let sink = MemSink::default();
        let ctx = context(config(), sink.clone());
        let (mut c, h) = start(&ctx, loopback());
        c.reply().await;
        c.cmd("EHLO x").await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@c.test>").await;
        c.cmd("DATA").await;
        c.send(b"half a message").await;
        drop(c);
        assert_eq!(h.await.unwrap().end, ConnEnd::ClientClosed);
        assert!(sink.committed().is_empty());
        assert_eq!(sink.discarded(), 1);
    }
}
