//! The SMTP session as a pure state machine: commands in, [`Step`]s out. No sockets, files or
//! clocks: the caller (`conn.rs`) passes the time and the spool's free-space answer in, runs
//! the slow or I/O parts a step asks for (TLS handshake, argon2, streaming the body, commit)
//! and feeds the results back.
//!
//! The state carries the transaction, so "DATA without RCPT" cannot be represented. Protocol
//! mistakes are replies (`503 5.5.1 Error: need MAIL command`), never errors.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use crate::address::{Address, ForwardPath, ReversePath};
use crate::config::{AuthMode, Config, ListenerConfig};
use crate::spool::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient};

use super::auth::{self, Credentials, SaslError};
use super::command::{Body, Command, MailFrom, Mechanism};
use super::data::DataOutcome;
use super::policy;
use super::reply::{Reply, printable};

/// What a session needs to know about its connection.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The configuration (routes, users, host name).
    pub config: Arc<Config>,
    /// The listener the client connected to.
    pub listener: ListenerConfig,
    /// The client's address (IP canonical: IPv4-mapped IPv6 as IPv4).
    pub client: SocketAddr,
    /// TLS is active from the start (implicit TLS).
    pub tls_active: bool,
    /// STARTTLS can be offered (the listener has `tls = "starttls"` and a certificate).
    pub starttls: bool,
}

/// Recipients refused with `452 4.5.3` in one transaction before each further one counts
/// as an error (Postfix's `smtpd_recipient_overshoot_limit` default): a client that keeps
/// going that far past the limit is not going to send the rest in a new transaction.
const RECIPIENT_OVERSHOOT: usize = 1000;

/// An accepted MAIL transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Reverse-path.
    pub sender: ReversePath,
    /// Route chosen at MAIL time.
    pub route: String,
    /// Mailbox the message goes out as.
    pub mailbox: String,
    /// `BODY=8BITMIME`.
    pub body_8bit: bool,
    /// `SMTPUTF8`.
    pub smtputf8: bool,
    /// Recipients in RCPT order (empty in state `Mail`); `<postmaster>` is already the
    /// mailbox it goes to.
    pub recipients: Vec<Address>,
    /// Octets announced by BDAT commands so far.
    pub bdat_total: u64,
    /// Recipients refused as too many so far.
    pub overshoot: usize,
}

/// Where an AUTH exchange stands.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthStage {
    /// Waiting for the PLAIN response after `334 `.
    PlainResponse,
    /// Waiting for the LOGIN user name.
    LoginUser,
    /// Waiting for the LOGIN password.
    LoginPassword(Zeroizing<String>),
}

impl std::fmt::Debug for AuthStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PlainResponse => f.write_str("PlainResponse"),
            Self::LoginUser => f.write_str("LoginUser"),
            Self::LoginPassword(_) => f.write_str("LoginPassword"),
        }
    }
}

/// Which body command is streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// `DATA`
    Data,
    /// `BDAT n [LAST]`
    Bdat,
}

/// Session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Before EHLO/HELO (also right after STARTTLS).
    Connected,
    /// EHLO/HELO done, no transaction.
    Greeted,
    /// MAIL accepted, no RCPT yet.
    Mail(Transaction),
    /// At least one RCPT accepted.
    Rcpt(Transaction),
    /// The body is streaming (after DATA's 354, or inside a BDAT chunk).
    Data(Transaction, DataKind),
    /// Between BDAT chunks (a chunk without LAST was received).
    Bdat(Transaction),
    /// In an AUTH exchange: the next line is a SASL response, not a command.
    Auth(AuthStage),
    /// Waiting for the password check.
    Verifying(String),
    /// After QUIT or a closing reply.
    Closing,
}

/// What `conn.rs` must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Send this reply (flushed), then the next line is a SASL response.
    Challenge(Reply),
    /// Send this reply, flush, then close: QUIT.
    Quit(Reply),
    /// Send this reply, flush, then close: not an SMTP client.
    Drop(Reply),
    /// Send this `220`, flush, drop pipelined input, do the TLS handshake, then call
    /// [`Session::tls_started`].
    StartTls(Reply),
    /// Check these credentials (argon2, on a blocking thread; the brute-force guard first),
    /// then call [`Session::auth_result`].
    Verify(Credentials),
    /// DATA accepted: begin a draft, write [`Session::received_header`], send `354`, stream
    /// the body, then call [`Session::finish_data`] (or [`Session::data_failed`]).
    Data,
    /// A BDAT chunk to store: begin a draft if none (with the `Received:` header), read
    /// exactly `size` octets into it, then [`Session::chunk_done`] or, if `last`,
    /// [`Session::finish_data`].
    Bdat {
        /// Octets in this chunk.
        size: u64,
        /// `LAST` was given.
        last: bool,
    },
    /// A refused BDAT: read and discard `size` octets, then send the reply.
    SkipBdat {
        /// Octets to discard.
        size: u64,
        /// The reply to send afterwards.
        reply: Reply,
    },
}

/// Result of the password check, fed back by `conn.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    /// The password is right.
    Success,
    /// Wrong user or password.
    Failed,
    /// The brute-force guard refuses this client for now.
    LockedOut,
    /// The check itself failed (a panicked blocking task).
    Unavailable,
}

/// What to do with a message at its end.
#[derive(Debug)]
pub enum Finish {
    /// Commit the draft with this envelope; reply `250 ... queued as` only if that succeeds.
    Commit(Box<Envelope>),
    /// Discard the draft and send this refusal.
    Reject(Reply),
}

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    p: SessionParams,
    state: State,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    auth_user: Option<String>,
}

impl Session {
    /// A new session (state `Connected`).
    pub fn new(params: SessionParams) -> Self {
        let tls = params.tls_active;
        Self {
            p: params,
            state: State::Connected,
            helo: None,
            esmtp: false,
            tls,
            auth_user: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The `220` greeting.
    pub fn greeting(&self) -> Reply {
        Reply::greeting(&self.p.config.hostname)
    }

    /// Our host name (for 421 replies).
    pub fn hostname(&self) -> &str {
        &self.p.config.hostname
    }

    /// Is a MAIL transaction open (MAIL accepted, body not finished)?
    pub fn in_transaction(&self) -> bool {
        matches!(
            self.state,
            State::Mail(_) | State::Rcpt(_) | State::Data(..) | State::Bdat(_)
        )
    }

    /// Is a BDAT transfer open (a draft must be kept across commands)?
    pub fn in_bdat(&self) -> bool {
        matches!(self.state, State::Bdat(_) | State::Data(_, DataKind::Bdat))
    }

    /// Is the next line a SASL response rather than a command?
    pub fn expects_auth_line(&self) -> bool {
        matches!(self.state, State::Auth(_))
    }

    /// Is TLS active?
    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// The authenticated user, if any.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The sender of the open transaction, if any.
    pub fn sender(&self) -> Option<&ReversePath> {
        match &self.state {
            State::Mail(t) | State::Rcpt(t) | State::Data(t, _) | State::Bdat(t) => Some(&t.sender),
            _ => None,
        }
    }

    fn greeted(&self) -> State {
        if self.helo.is_some() {
            State::Greeted
        } else {
            State::Connected
        }
    }

    fn client_ip(&self) -> IpAddr {
        self.p.client.ip().to_canonical()
    }

    /// AUTH is advertised and allowed now: enabled on the listener, and either TLS is active
    /// or the client is on loopback.
    fn auth_offered(&self) -> bool {
        self.p.listener.auth != AuthMode::None && (self.tls || self.client_ip().is_loopback())
    }

    fn ehlo_extensions(&self) -> Vec<String> {
        let mut ext = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.p.listener.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.p.starttls && !self.tls {
            ext.push("STARTTLS".into());
        }
        if self.auth_offered() {
            ext.push("AUTH PLAIN LOGIN".into());
        }
        ext
    }

    /// Handle one command. `has_room(size)` asks the spool whether a message of `size` bytes
    /// (0 if unknown) fits.
    pub fn handle(&mut self, cmd: Command, has_room: &dyn Fn(u64) -> bool) -> Step {
        use Step::Reply as R;
        let state = std::mem::replace(&mut self.state, State::Closing);
        match (state, cmd) {
            (
                s @ (State::Closing | State::Data(..) | State::Verifying(_) | State::Auth(_)),
                cmd,
            ) => {
                // conn.rs never calls handle() in these states; be safe anyway.
                self.state = s;
                let _ = cmd;
                R(Reply::unknown_command())
            }
            (_, Command::Quit) => {
                self.state = State::Closing;
                Step::Quit(Reply::bye())
            }
            (_, Command::NonSmtp) => {
                self.state = State::Closing;
                Step::Drop(Reply::non_smtp())
            }
            (_, Command::Ehlo(host)) => {
                self.helo = Some(host);
                self.esmtp = true;
                self.state = State::Greeted;
                R(Reply::ehlo(self.hostname(), self.ehlo_extensions()))
            }
            (_, Command::Helo(host)) => {
                self.helo = Some(host);
                self.esmtp = false;
                self.state = State::Greeted;
                R(Reply::helo(self.hostname()))
            }
            (s, Command::Rset) => {
                self.state = match s {
                    State::Connected => State::Connected,
                    _ => self.greeted(),
                };
                R(Reply::ok())
            }
            (s, Command::Noop) => {
                self.state = s;
                R(Reply::ok())
            }
            (s, Command::Vrfy) => {
                self.state = s;
                R(Reply::vrfy())
            }
            (s, Command::Expn) => {
                self.state = s;
                R(Reply::expn())
            }
            (s, Command::Help) => {
                self.state = s;
                R(Reply::help())
            }
            (s, Command::Unknown) => {
                self.state = s;
                R(Reply::unknown_command())
            }
            (s, Command::Invalid(reply)) => {
                self.state = s;
                R(reply)
            }
            (s, Command::StartTls) => {
                let reply = if !self.p.starttls {
                    Reply::not_implemented()
                } else if self.tls {
                    Reply::tls_already_active()
                } else if !matches!(s, State::Connected | State::Greeted) {
                    Reply::in_transaction()
                } else {
                    self.state = State::Closing;
                    return Step::StartTls(Reply::tls_ready());
                };
                self.state = s;
                R(reply)
            }
            (s, Command::Auth { mechanism, initial }) => self.auth(s, mechanism, initial),
            (s, Command::Mail(m)) => self.mail(s, m, has_room),
            (s, Command::Rcpt(to)) => self.rcpt(s, to),
            (s, Command::Data) => {
                let reply = match s {
                    // The disk may have filled since MAIL: refuse before the body arrives.
                    State::Rcpt(_) if !has_room(0) => Reply::insufficient_storage(),
                    State::Rcpt(t) => {
                        self.state = State::Data(t, DataKind::Data);
                        return Step::Data;
                    }
                    State::Bdat(_) => Reply::bdat_in_progress(),
                    State::Mail(_) => Reply::need_rcpt(),
                    State::Connected => Reply::need_helo(),
                    _ => Reply::need_mail(),
                };
                self.state = s;
                R(reply)
            }
            (s, Command::Bdat { size, last }) => self.bdat(s, size, last),
        }
    }

    fn auth(&mut self, s: State, mechanism: Mechanism, initial: Option<Zeroizing<String>>) -> Step {
        let refuse = |this: &mut Self, s: State, r: Reply| {
            this.state = s;
            Step::Reply(r)
        };
        if self.p.listener.auth == AuthMode::None {
            return refuse(self, s, Reply::auth_not_enabled());
        }
        match s {
            State::Connected => return refuse(self, s, Reply::need_helo()),
            State::Greeted => {}
            _ => return refuse(self, s, Reply::in_transaction()),
        }
        if !self.esmtp {
            return refuse(self, s, Reply::need_ehlo());
        }
        if self.auth_user.is_some() {
            return refuse(self, s, Reply::already_authenticated());
        }
        if !self.auth_offered() {
            return refuse(self, s, Reply::encryption_required());
        }
        match (mechanism, initial) {
            (Mechanism::Other, _) => refuse(self, s, Reply::auth_mechanism_unknown()),
            (Mechanism::Plain, None) => {
                self.state = State::Auth(AuthStage::PlainResponse);
                Step::Challenge(Reply::auth_challenge(""))
            }
            (Mechanism::Plain, Some(resp)) => self.plain(&resp),
            (Mechanism::Login, None) => {
                self.state = State::Auth(AuthStage::LoginUser);
                Step::Challenge(Reply::auth_challenge("VXNlcm5hbWU6"))
            }
            (Mechanism::Login, Some(resp)) => self.login_user(&resp),
        }
    }

    fn plain(&mut self, resp: &str) -> Step {
        match auth::decode_plain(resp) {
            Ok(c) => {
                self.state = State::Verifying(c.user.clone());
                Step::Verify(c)
            }
            Err(SaslError::BadBase64) => {
                self.state = State::Greeted;
                Step::Reply(Reply::auth_bad_base64())
            }
            Err(SaslError::Malformed) => {
                // A failed login as far as the guard is concerned.
                self.state = State::Verifying(String::new());
                Step::Verify(Credentials {
                    user: String::new(),
                    password: Zeroizing::new(Vec::new()),
                })
            }
        }
    }

    fn login_user(&mut self, resp: &str) -> Step {
        match auth::decode_b64(resp) {
            Ok(user) => match std::str::from_utf8(&user) {
                Ok(u) => {
                    self.state =
                        State::Auth(AuthStage::LoginPassword(Zeroizing::new(u.to_string())));
                    Step::Challenge(Reply::auth_challenge("UGFzc3dvcmQ6"))
                }
                Err(_) => {
                    self.state =
                        State::Auth(AuthStage::LoginPassword(Zeroizing::new(String::new())));
                    Step::Challenge(Reply::auth_challenge("UGFzc3dvcmQ6"))
                }
            },
            Err(_) => {
                self.state = State::Greeted;
                Step::Reply(Reply::auth_bad_base64())
            }
        }
    }

    /// A SASL response line during AUTH (`*` cancels).
    pub fn auth_line(&mut self, line: &[u8]) -> Step {
        let State::Auth(stage) = std::mem::replace(&mut self.state, State::Greeted) else {
            self.state = State::Greeted;
            return Step::Reply(Reply::unknown_command());
        };
        let text = String::from_utf8_lossy(line);
        let text = Zeroizing::new(text.trim().to_string());
        if text.as_str() == "*" {
            return Step::Reply(Reply::auth_cancelled());
        }
        match stage {
            AuthStage::PlainResponse => self.plain(&text),
            AuthStage::LoginUser => self.login_user(&text),
            AuthStage::LoginPassword(user) => match auth::decode_b64(&text) {
                Ok(password) => {
                    self.state = State::Verifying(user.to_string());
                    Step::Verify(Credentials {
                        user: user.to_string(),
                        password,
                    })
                }
                Err(_) => Step::Reply(Reply::auth_bad_base64()),
            },
        }
    }

    /// The result of a [`Step::Verify`].
    pub fn auth_result(&mut self, result: AuthResult) -> Reply {
        let user = match std::mem::replace(&mut self.state, State::Greeted) {
            State::Verifying(u) => u,
            other => {
                self.state = other;
                return Reply::auth_failed();
            }
        };
        match result {
            AuthResult::Success if !user.is_empty() => {
                self.auth_user = Some(user);
                Reply::auth_ok()
            }
            AuthResult::Success | AuthResult::Failed => Reply::auth_failed(),
            AuthResult::LockedOut => Reply::auth_locked_out(),
            AuthResult::Unavailable => Reply::auth_unavailable(),
        }
    }

    /// The TLS handshake after STARTTLS succeeded: forget everything learnt before it
    /// (RFC 3207 §4.2) and start over before EHLO.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.state = State::Connected;
    }

    fn mail(&mut self, s: State, m: MailFrom, has_room: &dyn Fn(u64) -> bool) -> Step {
        let reply = match &s {
            State::Connected => Some(Reply::need_helo()),
            State::Mail(_) | State::Rcpt(_) => Some(Reply::nested_mail()),
            State::Bdat(_) => Some(Reply::bdat_in_progress()),
            _ => None,
        };
        if let Some(r) = reply {
            self.state = s;
            return Step::Reply(r);
        }
        self.state = self.greeted();
        let size = m.size.unwrap_or(0);
        if self.p.listener.auth == AuthMode::Required && self.auth_user.is_none() {
            return Step::Reply(Reply::auth_required());
        }
        if size > self.p.listener.max_message_size {
            return Step::Reply(Reply::size_exceeded());
        }
        if !m.sender.is_ascii() && !m.smtputf8 {
            return Step::Reply(Reply::non_ascii_address());
        }
        let user = self
            .auth_user
            .as_deref()
            .and_then(|u| self.p.config.user(u));
        let routing = match policy::route_sender(&self.p.config, &m.sender, user) {
            Ok(r) => r,
            Err(reply) => return Step::Reply(reply),
        };
        if !has_room(size) {
            return Step::Reply(Reply::insufficient_storage());
        }
        self.state = State::Mail(Transaction {
            sender: m.sender,
            route: routing.route,
            mailbox: routing.mailbox,
            body_8bit: m.body == Body::EightBitMime,
            smtputf8: m.smtputf8,
            recipients: Vec::new(),
            bdat_total: 0,
            overshoot: 0,
        });
        Step::Reply(Reply::sender_ok())
    }

    fn rcpt(&mut self, s: State, to: ForwardPath) -> Step {
        let mut t = match s {
            State::Mail(t) | State::Rcpt(t) => t,
            other => {
                let r = match other {
                    State::Connected => Reply::need_helo(),
                    State::Bdat(_) => Reply::bdat_in_progress(),
                    _ => Reply::need_mail(),
                };
                self.state = other;
                return Step::Reply(r);
            }
        };
        let addr = match to {
            ForwardPath::Mailbox(a) => Ok(a),
            // RFC 5321 §4.5.1: <postmaster> must be accepted. postern has no local mailboxes;
            // the mailbox this transaction sends as is the one an admin of this relay reads.
            ForwardPath::Postmaster => Address::from_spool(&t.mailbox).map_err(|e| {
                Reply::bad_recipient(&e, "<postmaster>").with_detail(format!(
                    "<postmaster> goes to the route's mailbox {}, which cannot be used: {e}",
                    t.mailbox
                ))
            }),
        };
        let reply = match &addr {
            Err(r) => Some(r.clone()),
            Ok(a) if !a.is_ascii() && !t.smtputf8 => Some(Reply::non_ascii_address()),
            Ok(_) if t.recipients.len() >= self.p.listener.max_recipients => {
                t.overshoot += 1;
                Some(Reply::too_many_recipients(
                    t.overshoot > RECIPIENT_OVERSHOOT,
                ))
            }
            Ok(_) => None,
        };
        match (reply, addr) {
            (None, Ok(a)) => {
                t.recipients.push(a);
                self.state = State::Rcpt(t);
                Step::Reply(Reply::rcpt_ok())
            }
            (r, _) => {
                self.state = if t.recipients.is_empty() {
                    State::Mail(t)
                } else {
                    State::Rcpt(t)
                };
                Step::Reply(r.unwrap_or_else(Reply::bad_recipient_syntax))
            }
        }
    }

    fn bdat(&mut self, s: State, size: u64, last: bool) -> Step {
        let skip = |this: &mut Self, s: State, reply: Reply| {
            this.state = s;
            Step::SkipBdat { size, reply }
        };
        let mut t = match s {
            State::Rcpt(t) | State::Bdat(t) => t,
            State::Mail(t) => return skip(self, State::Mail(t), Reply::need_rcpt()),
            State::Connected => return skip(self, State::Connected, Reply::need_helo()),
            other => return skip(self, other, Reply::need_mail()),
        };
        let total = t.bdat_total.saturating_add(size);
        if total > self.p.listener.max_message_size {
            // The transaction is over; the chunk is still read and thrown away.
            let s = self.greeted();
            return skip(self, s, Reply::size_exceeded());
        }
        t.bdat_total = total;
        self.state = State::Data(t, DataKind::Bdat);
        Step::Bdat { size, last }
    }

    /// A non-LAST BDAT chunk was stored.
    pub fn chunk_done(&mut self, size: u64) -> Reply {
        match std::mem::replace(&mut self.state, State::Closing) {
            State::Data(t, DataKind::Bdat) => {
                self.state = State::Bdat(t);
                Reply::chunk_ok(size)
            }
            other => {
                self.state = other;
                Reply::need_mail()
            }
        }
    }

    /// The `Received:` header for the message being received (RFC 5321 §4.4, protocol types
    /// from RFC 3848 / RFC 6531), ending in CRLF.
    pub fn received_header(&self, queue_id: &str, now_unix: u64) -> String {
        let (smtputf8, rcpts): (bool, &[Address]) = match &self.state {
            State::Data(t, _) | State::Bdat(t) | State::Rcpt(t) => (t.smtputf8, &t.recipients),
            _ => (false, &[]),
        };
        let mut proto = String::from(match (smtputf8, self.esmtp) {
            (true, _) => "UTF8SMTP",
            (false, true) => "ESMTP",
            (false, false) => "SMTP",
        });
        if self.esmtp || smtputf8 {
            if self.tls {
                proto.push('S');
            }
            if self.auth_user.is_some() {
                proto.push('A');
            }
        }
        let ip = self.client_ip();
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let helo = header_safe(self.helo.as_deref().unwrap_or("unknown"));
        let mut h = format!(
            "Received: from {helo} ([{ip}])\r\n\tby {} (postern) with {proto} id {}",
            header_safe(self.hostname()),
            header_safe(queue_id)
        );
        if let [only] = rcpts {
            h.push_str(&format!("\r\n\tfor <{}>", header_safe(&only.to_string())));
        }
        h.push_str(&format!("; {}\r\n", rfc2822_date(now_unix)));
        h
    }

    /// Beginning or writing the draft failed: the transaction is over, answer `451 4.3.0`.
    pub fn data_failed(&mut self) -> Reply {
        self.state = self.greeted();
        Reply::queue_write_error()
    }

    /// The body has ended (`CRLF.CRLF` or `BDAT ... LAST`). `stored` is the size of the
    /// whole message as written (header included). Returns the envelope to commit, or the
    /// refusal; either way the transaction is over.
    pub fn finish_data(
        &mut self,
        outcome: &DataOutcome,
        queue_id: &str,
        stored: u64,
        now_unix: u64,
    ) -> Finish {
        let state = std::mem::replace(&mut self.state, State::Closing);
        self.state = self.greeted();
        let t = match state {
            State::Data(t, _) | State::Bdat(t) => t,
            _ => return Finish::Reject(Reply::need_mail()),
        };
        if outcome.too_big {
            return Finish::Reject(Reply::size_exceeded());
        }
        if outcome.nul {
            return Finish::Reject(Reply::nul_characters());
        }
        if outcome.bare_lf {
            return Finish::Reject(Reply::bare_lf());
        }
        Finish::Commit(Box::new(Envelope {
            version: ENVELOPE_VERSION,
            id: queue_id.to_string(),
            received_at: now_unix,
            // The spool keeps addresses as their RFC 5321 text.
            sender: t.sender.to_string(),
            recipients: t
                .recipients
                .into_iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    status: RcptStatus::Pending,
                    last_reply: None,
                })
                .collect(),
            client_addr: SocketAddr::new(self.client_ip(), self.p.client.port()).to_string(),
            client_helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            listener: self.p.listener.name.clone(),
            route: t.route,
            mailbox: t.mailbox,
            size: stored,
            body_8bit: t.body_8bit,
            smtputf8: t.smtputf8,
            attempts: 0,
            next_attempt: None,
            last_error: None,
            hold_reason: None,
            auto_hold: false,
            graph: None,
        }))
    }
}

/// Client text in a header: no controls, no spaces (it would split tokens), CR/LF impossible.
fn header_safe(s: &str) -> String {
    printable(s).replace(' ', "_")
}

/// `Tue, 1 Jul 2025 10:00:00 +0000` (RFC 5322 §3.3) from Unix seconds.
pub fn rfc2822_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days.rem_euclid(7)) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Base64 of a string (for tests and the LOGIN prompts).
pub fn b64(s: &[u8]) -> String {
    STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BareLfPolicy;
    use crate::smtp::command::parse;
    use crate::smtp::testkit::{config, lan, loopback};

    fn params(client: SocketAddr) -> SessionParams {
        let cfg = config();
        SessionParams {
            listener: cfg.listeners[0].clone(),
            config: Arc::new(cfg),
            client,
            tls_active: false,
            starttls: true,
        }
    }

    fn tx(rcpts: &[&str]) -> Transaction {
        Transaction {
            sender: ReversePath::Mailbox(Address::parse("a@example.com").unwrap()),
            route: "office".into(),
            mailbox: "relay@example.com".into(),
            body_8bit: false,
            smtputf8: false,
            recipients: rcpts.iter().map(|s| Address::parse(s).unwrap()).collect(),
            bdat_total: 0,
            overshoot: 0,
        }
    }

    fn session_in(state: State) -> Session {
        let mut s = Session::new(params(loopback()));
        if state != State::Connected {
            s.helo = Some("client".into());
            s.esmtp = true;
        }
        s.state = state;
        s
    }

    fn code(step: &Step) -> u16 {
        match step {
            Step::Reply(r)
            | Step::Challenge(r)
            | Step::Quit(r)
            | Step::Drop(r)
            | Step::StartTls(r) => r.code,
            Step::SkipBdat { reply, .. } => reply.code,
            Step::Verify(_) => 0,
            Step::Data => 354,
            Step::Bdat { .. } => 1,
        }
    }

    /// (state, command) → (reply code, next state)
    #[test]
    fn transition_table() {
        let c = State::Connected;
        let g = State::Greeted;
        let m = State::Mail(tx(&[]));
        let r = State::Rcpt(tx(&["x@y.test"]));
        let b = State::Bdat(tx(&["x@y.test"]));
        let r2 = State::Rcpt(tx(&["x@y.test", "z@y.test"]));
        let mut bdat_t = tx(&["x@y.test"]);
        bdat_t.bdat_total = 10;
        let table: Vec<(State, &str, u16, State)> = vec![
            (c.clone(), "EHLO c", 250, g.clone()),
            (c.clone(), "HELO c", 250, g.clone()),
            (c.clone(), "MAIL FROM:<a@example.com>", 503, c.clone()),
            (c.clone(), "RCPT TO:<x@y.test>", 503, c.clone()),
            (c.clone(), "DATA", 503, c.clone()),
            (c.clone(), "BDAT 5", 503, c.clone()),
            (c.clone(), "AUTH PLAIN", 503, c.clone()),
            (c.clone(), "RSET", 250, c.clone()),
            (c.clone(), "NOOP", 250, c.clone()),
            (c.clone(), "VRFY root", 252, c.clone()),
            (c.clone(), "EXPN staff", 502, c.clone()),
            (c.clone(), "HELP", 214, c.clone()),
            (c.clone(), "FOO", 500, c.clone()),
            (c.clone(), "MAIL FROM:<<>>", 501, c.clone()),
            (c.clone(), "QUIT", 221, State::Closing),
            (c.clone(), "GET / HTTP/1.1", 221, State::Closing),
            (c.clone(), "STARTTLS", 220, State::Closing),
            (g.clone(), "MAIL FROM:<a@example.com>", 250, m.clone()),
            (
                g.clone(),
                "MAIL FROM:<a@example.com> SIZE=10001",
                552,
                g.clone(),
            ),
            (g.clone(), "MAIL FROM:<a@nowhere.test>", 550, g.clone()),
            (g.clone(), "MAIL FROM:<>", 550, g.clone()),
            (
                g.clone(),
                "MAIL FROM:<j\u{f6}rg@example.com>",
                553,
                g.clone(),
            ),
            (g.clone(), "RCPT TO:<x@y.test>", 503, g.clone()),
            (g.clone(), "DATA", 503, g.clone()),
            (g.clone(), "BDAT 5 LAST", 503, g.clone()),
            (
                g.clone(),
                "AUTH PLAIN",
                334,
                State::Auth(AuthStage::PlainResponse),
            ),
            (
                g.clone(),
                "AUTH LOGIN",
                334,
                State::Auth(AuthStage::LoginUser),
            ),
            (g.clone(), "AUTH CRAM-MD5", 504, g.clone()),
            (
                g.clone(),
                "AUTH PLAIN AGFiAGM=",
                0,
                State::Verifying("ab".into()),
            ),
            (g.clone(), "AUTH PLAIN %%%", 501, g.clone()),
            (g.clone(), "RSET", 250, g.clone()),
            (m.clone(), "MAIL FROM:<a@example.com>", 503, m.clone()),
            (m.clone(), "RCPT TO:<x@y.test>", 250, r.clone()),
            (m.clone(), "RCPT TO:<>", 501, m.clone()),
            (m.clone(), "RCPT TO:<j\u{f6}rg@y.test>", 553, m.clone()),
            (m.clone(), "DATA", 503, m.clone()),
            (m.clone(), "BDAT 3", 503, m.clone()),
            (m.clone(), "AUTH PLAIN", 503, m.clone()),
            (m.clone(), "STARTTLS", 503, m.clone()),
            (m.clone(), "RSET", 250, g.clone()),
            (m.clone(), "EHLO again", 250, g.clone()),
            (m.clone(), "NOOP", 250, m.clone()),
            (r.clone(), "RCPT TO:<z@y.test>", 250, r2.clone()),
            (
                r.clone(),
                "DATA",
                354,
                State::Data(tx(&["x@y.test"]), DataKind::Data),
            ),
            (
                r.clone(),
                "BDAT 10",
                1,
                State::Data(bdat_t.clone(), DataKind::Bdat),
            ),
            (r.clone(), "BDAT 10001 LAST", 552, g.clone()),
            (r.clone(), "MAIL FROM:<a@example.com>", 503, r.clone()),
            (r.clone(), "QUIT", 221, State::Closing),
            (b.clone(), "DATA", 503, b.clone()),
            (b.clone(), "MAIL FROM:<a@example.com>", 503, b.clone()),
            (b.clone(), "RCPT TO:<q@y.test>", 503, b.clone()),
            (
                b.clone(),
                "BDAT 10",
                1,
                State::Data(bdat_t.clone(), DataKind::Bdat),
            ),
            (b.clone(), "RSET", 250, g.clone()),
        ];
        for (from, line, want_code, want_state) in table {
            let mut s = session_in(from.clone());
            let step = s.handle(parse(line.as_bytes()), &|_| true);
            assert_eq!(code(&step), want_code, "{from:?} + {line}: {step:?}");
            assert_eq!(s.state, want_state, "{from:?} + {line}");
        }
    }

    #[test]
    fn disk_full_at_data_is_452_and_the_transaction_survives() {
        let mut s = session_in(State::Rcpt(tx(&["a@t"])));
        let step = s.handle(parse(b"DATA"), &|_| false);
        assert!(
            matches!(&step, Step::Reply(r) if r.to_string() == "452 4.3.1 Insufficient system storage"),
            "{step:?}"
        );
        assert_eq!(
            s.state,
            State::Rcpt(tx(&["a@t"])),
            "the client may retry DATA or RSET"
        );
        assert!(matches!(s.handle(parse(b"DATA"), &|_| true), Step::Data));
    }

    #[test]
    fn too_many_recipients_and_no_room() {
        let mut s = session_in(State::Rcpt(tx(&["a@t", "b@t", "c@t"])));
        let step = s.handle(parse(b"RCPT TO:<d@t>"), &|_| true);
        assert_eq!(code(&step), 452);
        assert!(matches!(&step, Step::Reply(r) if r.status == Some("4.5.3")));
        let mut s = session_in(State::Greeted);
        let step = s.handle(parse(b"MAIL FROM:<a@example.com> SIZE=500"), &|n| n < 100);
        assert!(
            matches!(&step, Step::Reply(r) if r.to_string() == "452 4.3.1 Insufficient system storage")
        );
        assert_eq!(s.state, State::Greeted);
    }

    #[test]
    fn too_many_recipients_is_an_error_only_far_past_the_limit() {
        let mut s = session_in(State::Rcpt(tx(&["a@t", "b@t", "c@t"])));
        for _ in 0..RECIPIENT_OVERSHOOT {
            match s.handle(parse(b"RCPT TO:<d@t>"), &|_| true) {
                Step::Reply(r) => assert!(r.code == 452 && !r.counts_as_error(), "{r}"),
                other => panic!("{other:?}"),
            }
        }
        match s.handle(parse(b"RCPT TO:<d@t>"), &|_| true) {
            Step::Reply(r) => assert!(r.code == 452 && r.counts_as_error(), "{r}"),
            other => panic!("{other:?}"),
        }
        // A new transaction starts counting again.
        s.handle(parse(b"RSET"), &|_| true);
        s.handle(parse(b"MAIL FROM:<a@example.com>"), &|_| true);
        match &s.state {
            State::Mail(t) => assert_eq!(t.overshoot, 0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn postmaster_goes_to_the_mailbox_the_transaction_sends_as() {
        let mut s = session_in(State::Greeted);
        s.handle(parse(b"MAIL FROM:<a@example.com>"), &|_| true);
        assert_eq!(
            code(&s.handle(parse(b"RCPT TO:<Postmaster>"), &|_| true)),
            250
        );
        assert!(matches!(s.handle(parse(b"DATA"), &|_| true), Step::Data));
        let Finish::Commit(env) = s.finish_data(&DataOutcome::default(), "Q1", 1, 0) else {
            panic!()
        };
        assert_eq!(env.recipients[0].address, "relay@example.com");
        // On a route that sends as the sender, that is the sender's own mailbox.
        let mut s = session_in(State::Greeted);
        s.handle(parse(b"MAIL FROM:<alice@example.org>"), &|_| true);
        s.handle(parse(b"RCPT TO:<postmaster>"), &|_| true);
        match &s.state {
            State::Rcpt(t) => assert_eq!(t.recipients[0].to_string(), "alice@example.org"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quoted_addresses_reach_the_envelope_in_rfc_5321_form() {
        let mut s = session_in(State::Greeted);
        let step = s.handle(
            parse(b"MAIL FROM:<\"x> RET=HDRS ENVID=evil\"@example.com> SIZE=0"),
            &|_| true,
        );
        assert_eq!(code(&step), 250);
        s.handle(parse(b"RCPT TO:<\"a b\"@y.test>"), &|_| true);
        s.handle(parse(b"DATA"), &|_| true);
        assert!(s.received_header("Q1", 0).contains("for <\"a_b\"@y.test>"));
        let Finish::Commit(env) = s.finish_data(&DataOutcome::default(), "Q1", 1, 0) else {
            panic!()
        };
        assert_eq!(env.sender, "\"x> RET=HDRS ENVID=evil\"@example.com");
        assert_eq!(env.recipients[0].address, "\"a b\"@y.test");
    }

    #[test]
    fn ehlo_advertises_per_context() {
        let text = |s: &mut Session| match s.handle(parse(b"EHLO c"), &|_| true) {
            Step::Reply(r) => String::from_utf8(r.to_bytes()).unwrap(),
            other => panic!("{other:?}"),
        };
        let mut s = Session::new(params(loopback()));
        let t = text(&mut s);
        assert_eq!(
            t,
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
        );
        // Not loopback, no TLS: no AUTH, and AUTH answers 538.
        let mut s = Session::new(params(lan()));
        let t = text(&mut s);
        assert!(!t.contains("AUTH") && t.contains("STARTTLS"));
        let step = s.handle(parse(b"AUTH PLAIN"), &|_| true);
        assert!(
            matches!(&step, Step::Reply(r) if r.to_string() == "538 5.7.11 Encryption required for requested authentication mechanism")
        );
        // After TLS: AUTH offered, STARTTLS not.
        s.tls_started();
        assert_eq!(s.state, State::Connected);
        let t = text(&mut s);
        assert!(t.contains("AUTH PLAIN LOGIN") && !t.contains("STARTTLS"));
        let step = s.handle(parse(b"STARTTLS"), &|_| true);
        assert_eq!(code(&step), 503);
        // HELO: no extensions.
        let mut s = Session::new(params(loopback()));
        let step = s.handle(parse(b"HELO c"), &|_| true);
        assert!(matches!(&step, Step::Reply(r) if r.to_bytes() == b"250 mx.test\r\n"));
        assert_eq!(code(&s.handle(parse(b"AUTH PLAIN"), &|_| true)), 503);
    }

    #[test]
    fn auth_required_and_may_send_as() {
        let mut p = params(loopback());
        p.listener.auth = AuthMode::Required;
        let mut s = Session::new(p);
        s.handle(parse(b"EHLO c"), &|_| true);
        let step = s.handle(parse(b"MAIL FROM:<scanner@example.com>"), &|_| true);
        assert!(
            matches!(&step, Step::Reply(r) if r.to_string() == "530 5.7.0 Authentication required")
        );
        let step = s.handle(
            parse(format!("AUTH PLAIN {}", b64(b"\0scanner\0s3cret")).as_bytes()),
            &|_| true,
        );
        match step {
            Step::Verify(c) => assert_eq!(c.user, "scanner"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.auth_result(AuthResult::Success).code, 235);
        assert_eq!(s.auth_user(), Some("scanner"));
        let step = s.handle(parse(b"MAIL FROM:<boss@example.com>"), &|_| true);
        assert!(
            matches!(&step, Step::Reply(r) if r.code == 550 && r.to_string().contains("user \"scanner\" may not send as it"))
        );
        assert_eq!(
            code(&s.handle(parse(b"MAIL FROM:<scanner@example.com>"), &|_| true)),
            250
        );
        assert_eq!(code(&s.handle(parse(b"AUTH PLAIN"), &|_| true)), 503);
    }

    #[test]
    fn auth_login_dialogue_and_cancel() {
        let mut s = session_in(State::Greeted);
        assert!(
            matches!(s.handle(parse(b"AUTH LOGIN"), &|_| true), Step::Challenge(r) if r.to_bytes() == b"334 VXNlcm5hbWU6\r\n")
        );
        assert!(
            matches!(s.auth_line(b64(b"scanner").as_bytes()), Step::Challenge(r) if r.to_bytes() == b"334 UGFzc3dvcmQ6\r\n")
        );
        match s.auth_line(format!("{}\r\n", b64(b"pw")).as_bytes()) {
            Step::Verify(c) => {
                assert_eq!(c.user, "scanner");
                assert_eq!(&c.password[..], b"pw");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.auth_result(AuthResult::Failed).to_string(),
            "535 5.7.8 Authentication credentials invalid"
        );
        assert_eq!(s.state, State::Greeted);
        s.handle(parse(b"AUTH PLAIN"), &|_| true);
        assert!(
            matches!(s.auth_line(b"*\r\n"), Step::Reply(r) if r.to_string() == "501 5.0.0 Authentication cancelled")
        );
        s.handle(parse(b"AUTH LOGIN"), &|_| true);
        assert!(matches!(s.auth_line(b"not base64!\r\n"), Step::Reply(r) if r.code == 501));
        assert_eq!(s.state, State::Greeted);
        s.handle(parse(b"AUTH PLAIN"), &|_| true);
        assert!(matches!(s.auth_line(b64(b"x").as_bytes()), Step::Verify(c) if c.user.is_empty()));
        assert_eq!(
            s.auth_result(AuthResult::Success).code,
            535,
            "malformed PLAIN never succeeds"
        );
        s.handle(parse(b"AUTH PLAIN"), &|_| true);
        s.auth_line(b64(b"\0a\0b").as_bytes());
        assert_eq!(
            s.auth_result(AuthResult::LockedOut).to_string(),
            "454 4.7.0 Too many failed authentication attempts; try again later"
        );
    }

    #[test]
    fn auth_disabled() {
        let mut p = params(loopback());
        p.listener.auth = AuthMode::None;
        let mut s = Session::new(p);
        let step = s.handle(parse(b"EHLO c"), &|_| true);
        assert!(matches!(&step, Step::Reply(r) if !r.to_bytes().windows(4).any(|w| w == b"AUTH")));
        assert!(
            matches!(s.handle(parse(b"AUTH PLAIN"), &|_| true), Step::Reply(r) if r.code == 503)
        );
    }

    #[test]
    fn finish_builds_envelope_and_refusals() {
        let mut s = session_in(State::Greeted);
        s.handle(parse(b"MAIL FROM:<a@example.com> BODY=8BITMIME"), &|_| true);
        s.handle(parse(b"RCPT TO:<x@y.test>"), &|_| true);
        assert!(matches!(s.handle(parse(b"DATA"), &|_| true), Step::Data));
        let h = s.received_header("Q1", 1_751_364_000);
        assert_eq!(
            h,
            "Received: from client ([127.0.0.1])\r\n\tby mx.test (postern) with ESMTP id Q1\r\n\tfor <x@y.test>; Tue, 1 Jul 2025 10:00:00 +0000\r\n"
        );
        let Finish::Commit(env) = s.finish_data(&DataOutcome::default(), "Q1", 123, 1_751_364_000)
        else {
            panic!()
        };
        assert_eq!(env.version, ENVELOPE_VERSION);
        assert_eq!(env.sender, "a@example.com");
        assert_eq!(env.recipients[0].status, RcptStatus::Pending);
        assert_eq!(env.client_addr, "127.0.0.1:40000");
        assert_eq!(env.client_helo, "client");
        assert_eq!(env.listener, "test");
        assert_eq!(env.route, "office");
        assert_eq!(env.mailbox, "relay@example.com");
        assert_eq!(env.size, 123);
        assert!(env.body_8bit && !env.smtputf8);
        assert_eq!(s.state, State::Greeted);

        for (outcome, want) in [
            (
                DataOutcome {
                    too_big: true,
                    ..Default::default()
                },
                552,
            ),
            (
                DataOutcome {
                    nul: true,
                    ..Default::default()
                },
                550,
            ),
            (
                DataOutcome {
                    bare_lf: true,
                    ..Default::default()
                },
                550,
            ),
        ] {
            let mut s = session_in(State::Data(tx(&["x@t"]), DataKind::Data));
            assert!(
                matches!(s.finish_data(&outcome, "Q", 1, 0), Finish::Reject(r) if r.code == want)
            );
            assert_eq!(s.state, State::Greeted);
        }
        let _ = BareLfPolicy::Normalize;
    }

    #[test]
    fn received_header_protocols() {
        let mut s = session_in(State::Data(tx(&["a@t", "b@t"]), DataKind::Data));
        s.tls = true;
        s.auth_user = Some("scanner".into());
        let h = s.received_header("Q", 0);
        assert!(
            h.contains("with ESMTPSA id Q; Thu, 1 Jan 1970 00:00:00 +0000\r\n"),
            "{h}"
        );
        assert!(!h.contains("for <"), "no for clause with two recipients");
        assert!(!h.contains("scanner"));
        let mut t = tx(&["a@t"]);
        t.smtputf8 = true;
        let mut s = session_in(State::Data(t, DataKind::Data));
        s.client_v6();
        assert!(s.received_header("Q", 0).contains("with UTF8SMTP id"));
        assert!(s.received_header("Q", 0).contains("([IPv6:2001:db8::1])"));
    }

    impl Session {
        fn client_v6(&mut self) {
            self.p.client = "[2001:db8::1]:25".parse().unwrap();
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc2822_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc2822_date(4_102_444_799),
            "Thu, 31 Dec 2099 23:59:59 +0000"
        );
    }

    #[test]
    fn bdat_chunks_accumulate() {
        let mut s = session_in(State::Rcpt(tx(&["x@t"])));
        assert!(matches!(
            s.handle(parse(b"BDAT 6000"), &|_| true),
            Step::Bdat {
                size: 6000,
                last: false
            }
        ));
        assert_eq!(
            s.chunk_done(6000).to_string(),
            "250 2.0.0 6000 octets received"
        );
        assert!(s.in_bdat());
        let step = s.handle(parse(b"BDAT 6000 LAST"), &|_| true);
        assert!(matches!(step, Step::SkipBdat { size: 6000, reply } if reply.code == 552));
        assert_eq!(s.state, State::Greeted);
        assert!(!s.in_bdat());
    }
}
