//! Upstream transports: each sends one spooled message and classifies the result once.
//!
//! The forwarder only sees [`Transport`] and [`Outcome`]; Microsoft's SMTP (XOAUTH2) and
//! Graph transports plug in here beside the local `file` transport, and get their access
//! tokens from [`crate::token::TokenSource`].

use std::future::Future;
use std::io::Read as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::spool::{Envelope, RcptStatus};

pub mod classify;
pub mod file;
pub mod graph;
pub mod rewrite;
pub mod smtp;
pub mod watch;

/// Messages up to this size are read on the async thread that delivers them, rather than on
/// the blocking pool: one was written moments ago and is read from the page cache in
/// microseconds, less than the two thread wake-ups of a trip to the pool (and back) per open,
/// stat or read. Larger ones are read on the pool. 16 deliveries in flight hold at most 4 MiB
/// this way.
pub const READ_INLINE: u64 = 256 * 1024;

/// A boxed future, so transports can live behind `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message handed to a transport: its envelope and where its bytes are.
///
/// Transports read the message and its sender through the methods here, never from the
/// envelope and the file directly: with `rewrite_from` the message goes out with another
/// sender and header than it was received with ([`rewrite`]).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The envelope (recipients with their status; only `Pending` ones are to be sent).
    pub envelope: Envelope,
    /// Path of the queue file. Only its first `envelope.size` bytes are the message (after
    /// them comes postern's bookkeeping): read it with [`Outgoing::open_message`].
    pub message: PathBuf,
    /// Set when the route rewrites the sender and `From:` to its mailbox.
    pub rewrite: Option<Arc<rewrite::Rewritten>>,
}

impl Outgoing {
    /// The message as received.
    pub fn new(envelope: Envelope, message: PathBuf) -> Self {
        Outgoing {
            envelope,
            message,
            rewrite: None,
        }
    }

    /// The envelope sender to send with (`MAIL FROM`): the mailbox when rewritten.
    pub fn sender(&self) -> &str {
        match &self.rewrite {
            Some(r) => &r.mailbox,
            None => &self.envelope.sender,
        }
    }

    /// How many bytes the transport sends.
    pub fn size(&self) -> u64 {
        match &self.rewrite {
            Some(r) => r.size(),
            None => self.envelope.size,
        }
    }

    /// A reader of exactly the message bytes as they go out (our `Received:` header plus
    /// what the client sent; with the rewritten header when rewritten).
    pub fn open_message(&self) -> std::io::Result<rewrite::MessageReader> {
        let file = crate::spool::msgfile::open_message(&self.message, self.envelope.size)?;
        match &self.rewrite {
            Some(r) => r.reader(file.into_inner()),
            None => Ok(std::io::Cursor::new(Vec::new()).chain(file)),
        }
    }

    /// The message as it goes out, in parts, for a transport that builds its own reader
    /// (an async body, base64): the bytes to send first (empty unless rewritten), then the
    /// queue file positioned where the rest starts, and how many bytes of it to send.
    pub fn open_parts(&self) -> std::io::Result<(Vec<u8>, std::fs::File, u64)> {
        let file = crate::spool::msgfile::open_message(&self.message, self.envelope.size)?;
        match &self.rewrite {
            Some(r) => r.parts(file.into_inner()),
            None => Ok((Vec::new(), file.into_inner(), self.envelope.size)),
        }
    }

    /// The message bytes as they go out, read from `file`: the queue file, opened by the
    /// transport and positioned at its start.
    pub async fn stream(&self, file: tokio::fs::File) -> std::io::Result<rewrite::MessageStream> {
        use tokio::io::AsyncReadExt;
        match &self.rewrite {
            Some(r) => r.stream(file).await,
            None => Ok(AsyncReadExt::chain(
                std::io::Cursor::new(Vec::new()),
                file.take(self.envelope.size),
            )),
        }
    }

    /// The address of the message's `From:` header as it goes out (see [`from_address`]),
    /// read from the first 64 KiB of the message; `None` if it has none or cannot be read.
    pub fn from_header(&self) -> Option<String> {
        let mut head = Vec::new();
        self.open_message()
            .ok()?
            .take(64 * 1024)
            .read_to_end(&mut head)
            .ok()?;
        from_address(&head)
    }
}

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    /// Recipient address.
    pub address: String,
    /// `Sent`, `Failed` (permanent) or `Pending` (try again later).
    pub status: RcptStatus,
    /// The upstream's reply for this recipient.
    pub reply: String,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream took the message; per-recipient results (some may have failed or be
    /// deferred individually).
    Sent {
        /// Which upstream (host, or directory for `file`).
        relay: String,
        /// The upstream's final reply.
        reply: String,
        /// Per-recipient results for every recipient that was pending.
        recipients: Vec<RcptResult>,
    },
    /// Try again later (network, 4xx, throttling).
    Transient {
        /// What happened, with the upstream's reply.
        reason: String,
    },
    /// The message cannot be delivered (5xx for the message as a whole).
    Permanent {
        /// What happened, with the upstream's reply.
        reason: String,
    },
    /// Our configuration is wrong (credentials, consent, mailbox, Send As): keep the message
    /// without spending its retries, pause the mail `scope` covers, and tell the admin what to
    /// fix. The forwarder logs `reason` in full when the hold starts or its cause changes, and
    /// a short line per probe; it retries one message of the scope every `hold_retry` (with
    /// backoff for [`HoldScope::Sender`]) and releases the rest once one gets through.
    Held {
        /// What is wrong and how to fix it (the upstream's reply quoted, then the advice).
        reason: String,
        /// Which mail waits: the whole mailbox, or only its mail from one address.
        scope: HoldScope,
    },
    /// The *mailbox* must wait, not just this message: Exchange's recipient quota
    /// (`554 5.2.0 ... SubmissionQuotaExceeded`), continuous-error throttling (`5.2.25x`), or
    /// Graph's `429`/`503` with `Retry-After`. The message goes back to the queue without
    /// spending an attempt, and no message of its mailbox starts before the wait is over
    /// (then one goes first, alone, to see whether the block has lifted). Never bounces.
    Throttled {
        /// What the upstream said, and what it means.
        reason: String,
        /// How long the mailbox waits: `Retry-After`, or a fixed period for blocks of unknown
        /// length. `None`: until the route's recipient window (`daily_recipients`) frees,
        /// judged from postern's own record of what the mailbox sent.
        wait: Option<Duration>,
    },
    /// Some recipients were refused for good (e.g. `550 5.1.10` at RCPT) before the attempt
    /// ended with `then`: they are failed and reported at once and never tried again, whatever
    /// happens to the rest of the message.
    Partial {
        /// The refused recipients with their replies (status `Failed`).
        refused: Vec<RcptResult>,
        /// How the attempt ended for the others (never `Sent` or `Partial`).
        then: Box<Outcome>,
    },
}

impl Outcome {
    /// A hold of the whole mailbox.
    pub fn held(reason: impl Into<String>) -> Outcome {
        Outcome::Held {
            reason: reason.into(),
            scope: HoldScope::Mailbox,
        }
    }
}

/// Which of a mailbox's mail an [`Outcome::Held`] pauses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HoldScope {
    /// All of it: the cause is the mailbox or the account (token, consent, SMTP AUTH off,
    /// mailbox full, TLS, the server).
    Mailbox,
    /// Only its mail from this address, compared case-insensitively with both the envelope
    /// sender and the `From:` header: the mailbox may not send as it (Exchange
    /// `554 5.2.252 SendAsDenied`, `550 5.7.60`; Graph `403 ErrorSendAsDenied`). The
    /// mailbox's other mail keeps flowing; the probe is the held message with the fewest
    /// recipients (then the smallest), so a probe that fails again costs as little as
    /// possible and Exchange's continuous-error throttling is not provoked.
    Sender(String),
}

/// What a network error means, in an admin's words: the one place where I/O and TLS library
/// errors are translated, so their jargon (`peer closed connection without sending TLS
/// close_notify: https://docs.rs/...`) never reaches the log. Errors postern made itself
/// (malformed replies, its own timeouts) keep their text.
pub fn network_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_error(tls);
    }
    let text = e.to_string();
    match e.kind() {
        K::UnexpectedEof => "the server closed the connection".into(),
        K::ConnectionReset => {
            "the connection was reset (by the server, or by a firewall or proxy in between)".into()
        }
        K::ConnectionAborted => "the connection was aborted by this host's network stack".into(),
        K::BrokenPipe => "the server had already closed the connection".into(),
        K::ConnectionRefused => {
            "connection refused (nothing listens on that port, or a firewall rejects it)".into()
        }
        K::TimedOut => "the connection timed out (a firewall may be dropping the traffic)".into(),
        K::HostUnreachable => "the host is unreachable (no route to it)".into(),
        K::NetworkUnreachable => "the network is unreachable (no route to it)".into(),
        K::NetworkDown => "this host's network is down".into(),
        K::AddrNotAvailable => "no local address to connect from".into(),
        _ if text.contains("failed to lookup address") => {
            "the host name cannot be resolved (check DNS on this host)".into()
        }
        // Ours (malformed reply, too long...) or something rare: the text without any URL.
        _ => text
            .split(": http")
            .next()
            .unwrap_or(&text)
            .trim_end_matches(':')
            .to_string(),
    }
}

/// A TLS error (other than an untrusted certificate, which the transports explain with the
/// fix) in an admin's words.
pub fn tls_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(a) => {
            format!("the server ended the TLS session (TLS alert {a:?})")
        }
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's TLS certificate is not accepted ({c:?})")
        }
        rustls::Error::PeerIncompatible(p) => {
            format!("no TLS version or cipher in common with the server ({p:?})")
        }
        rustls::Error::PeerMisbehaved(_) | rustls::Error::InvalidMessage(_) => {
            "the server broke the TLS protocol (a proxy or firewall may be interfering)".into()
        }
        other => format!("TLS failed ({other:?})"),
    }
}

/// The first address of the `From:` field of an RFC 5322 header section, lowercased (see
/// [`crate::address::header_from`]).
pub fn from_address(header: &[u8]) -> Option<String> {
    crate::address::header_from(header)
}

/// Something that can deliver a spooled message.
pub trait Transport: Send + Sync {
    /// A short description for logs (`file:/path`, `smtp:smtp.office365.com:587`).
    fn describe(&self) -> String;
    /// Try to deliver `msg` to its pending recipients.
    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome>;

    /// Whether `send` may record progress in the message's envelope (the Graph transport's
    /// draft id, [`crate::spool::Envelope::graph`]): the forwarder then keeps it when it
    /// records the outcome.
    fn records_progress(&self) -> bool {
        false
    }
}

/// Why a transport could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `ca_file` could not be read or parsed.
    #[error(
        "[account.{account}] ca_file {path}: {source} (expected a PEM file with \"BEGIN CERTIFICATE\" blocks)"
    )]
    CaFile {
        /// The account.
        account: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// `ca_file` holds no certificate.
    #[error(
        "[account.{account}] ca_file {path}: no certificate found (expected a PEM file with \"BEGIN CERTIFICATE\" blocks)"
    )]
    NoCaCert {
        /// The account.
        account: String,
        /// The file.
        path: PathBuf,
    },
    /// A certificate in `ca_file` cannot serve as a trust anchor.
    #[error("[account.{account}] ca_file {path}: a certificate is not usable as a CA: {source}")]
    BadCa {
        /// The account.
        account: String,
        /// The file.
        path: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
    /// `smtp_host` is neither a DNS name nor an IP address.
    #[error(
        "[account.{account}] smtp_host {host:?} is not a host name or IP address (Exchange Online: \"smtp.office365.com\")"
    )]
    BadHost {
        /// The account.
        account: String,
        /// The value.
        host: String,
    },
    /// The Graph transport's HTTPS client could not be built (`graph_url`, `ca_file`, `proxy`).
    #[error("[account.{account}] {why}")]
    Graph {
        /// The account.
        account: String,
        /// What is wrong.
        why: String,
    },
    /// The TLS client configuration could not be built.
    #[error("[account.{account}] TLS setup failed: {source}")]
    Tls {
        /// The account.
        account: String,
        /// The rustls error.
        source: rustls::Error,
    },
}

/// A route whose transport could not be set up: every message is held with the reason, so
/// nothing is lost and the admin is told what to fix.
pub struct Unavailable(pub String);

impl Transport for Unavailable {
    fn describe(&self) -> String {
        "unavailable".into()
    }

    fn send<'a>(&'a self, _msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        let reason = format!(
            "the route's transport cannot be set up: {}; fix the configuration and reload (systemctl reload postern)",
            self.0
        );
        Box::pin(async move { Outcome::held(reason) })
    }
}

/// The `discard` transport: every pending recipient counts as delivered and the message is
/// dropped (logged as sent with relay `discard`), like Postfix's `discard:`.
pub struct Discard;

impl Transport for Discard {
    fn describe(&self) -> String {
        "discard".into()
    }

    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        let recipients = msg
            .envelope
            .pending()
            .map(|r| RcptResult {
                address: r.address.clone(),
                status: RcptStatus::Sent,
                reply: "250 2.0.0 discarded".into(),
            })
            .collect();
        Box::pin(async move {
            Outcome::Sent {
                relay: "discard".into(),
                reply: "250 2.0.0 discarded".into(),
                recipients,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Error, ErrorKind};

    use super::*;

    #[test]
    fn from_address_reads_the_header_only() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"From: Bob <Bob@Contoso.com>\r\n\r\nbody",
                Some("bob@contoso.com"),
            ),
            (
                b"Subject: x\r\nfrom:scanner@contoso.com\r\n\r\n",
                Some("scanner@contoso.com"),
            ),
            (
                b"From: \"Smith, <Bob>\" (the boss) <bob@x.test>\r\n\r\n",
                Some("bob@x.test"),
            ),
            (
                b"From:\r\n  Folded Name\r\n  <f@x.test>\r\n\r\n",
                Some("f@x.test"),
            ),
            (b"From: a@x.test, b@x.test\r\n\r\n", Some("a@x.test")),
            (b"From: a@x.test (Printer 3)\r\n\r\n", Some("a@x.test")),
            (b"Subject: no from\r\n\r\nFrom: body@x.test\r\n", None),
            (b"From: undisclosed\r\n\r\n", None),
            (b"From: Bob <bob@x.test>\n\nbare LF", Some("bob@x.test")),
            (
                b"X-From: not@this.test\r\nFrom: this@x.test\r\n\r\n",
                Some("this@x.test"),
            ),
        ];
        for (header, want) in cases {
            assert_eq!(
                from_address(header).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(header)
            );
        }
    }

    #[test]
    fn network_errors_in_an_admins_words() {
        let rustls_eof = Error::new(
            ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        );
        assert_eq!(
            network_error(&rustls_eof),
            "the server closed the connection"
        );
        assert!(network_error(&Error::from(ErrorKind::ConnectionReset)).contains("firewall"));
        assert!(
            network_error(&Error::from(ErrorKind::ConnectionRefused)).contains("nothing listens")
        );
        let dns = Error::other("failed to lookup address information: Name or service not known");
        assert!(network_error(&dns).contains("DNS"));
        let ours = Error::new(ErrorKind::InvalidData, "malformed reply line \"hello\"");
        assert_eq!(network_error(&ours), "malformed reply line \"hello\"");
        let odd = Error::other("something odd: https://docs.rs/x");
        assert_eq!(network_error(&odd), "something odd");
        let tls = Error::new(
            ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert!(
            network_error(&tls).contains("ended the TLS session"),
            "{}",
            network_error(&tls)
        );
    }
}
