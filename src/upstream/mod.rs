//! Upstream transports: each sends one spooled message and classifies the result once.
//!
//! The forwarder only sees [`Transport`] and [`Outcome`]; Microsoft's SMTP (XOAUTH2) and
//! Graph transports plug in here beside the local `file` transport, and get their access
//! tokens from [`crate::token::TokenSource`].

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::spool::{Envelope, RcptStatus};

pub mod classify;
pub mod file;
pub mod smtp;

/// A boxed future, so transports can live behind `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message handed to a transport: its envelope and where its bytes are.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The envelope (recipients with their status; only `Pending` ones are to be sent).
    pub envelope: Envelope,
    /// Path of the queue file. Only its first `envelope.size` bytes are the message (after
    /// them comes postern's bookkeeping): read it with [`Outgoing::open_message`].
    pub message: PathBuf,
}

impl Outgoing {
    /// A reader of exactly the message bytes (our `Received:` header plus what the client sent).
    pub fn open_message(&self) -> std::io::Result<std::io::Take<std::fs::File>> {
        crate::spool::msgfile::open_message(&self.message, self.envelope.size)
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
    /// Our configuration is wrong (credentials, consent, mailbox): keep the message without
    /// spending its retries, pause its mailbox, and tell the admin what to fix.
    Held {
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// Something that can deliver a spooled message.
pub trait Transport: Send + Sync {
    /// A short description for logs (`file:/path`, `smtp:smtp.office365.com:587`).
    fn describe(&self) -> String;
    /// Try to deliver `msg` to its pending recipients.
    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome>;
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
        Box::pin(async move { Outcome::Held { reason } })
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
