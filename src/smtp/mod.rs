//! The SMTP server side: protocol and local policy. It never touches tokens or upstreams; an
//! accepted message goes into a [`MessageSink`] (the spool) and is committed before 250.
//!
//! - [`command`]: one command line → [`command::Command`] (over smtp-proto).
//! - [`reply`]: every reply we send, as named constructors.
//! - [`session`]: the sans-IO state machine.
//! - [`data`]: sans-IO DATA/BDAT body decoders (dot-unstuffing, bare LF, size, NUL).
//! - [`auth`]: AUTH PLAIN/LOGIN decoding, argon2 checks, the brute-force guard.
//! - [`policy`]: allowed networks, sender → route and mailbox.
//! - [`conn`]: drives a session over a stream (timeouts, limits, STARTTLS, 421 on shutdown).
//! - [`server`]: the accept loop per listener and the shared connection limiter.
//! - [`tls`]: the rustls server config from PEM files.

use std::future::Future;

use crate::spool::{Envelope, SpoolError};

/// Where accepted messages go: the spool in production, anything in tests.
pub trait MessageSink: Send + Sync + 'static {
    /// A message being received.
    type Draft: MessageDraft;
    /// Is there room for a message of `size` bytes (0 when the client did not say)? When this
    /// is false the server answers `452 4.3.1` before accepting DATA.
    fn has_room(&self, size: u64) -> bool;
    /// Start a new draft; its queue id is known from here on (it goes into `Received:`).
    fn begin(&self) -> impl Future<Output = Result<Self::Draft, SpoolError>> + Send;
}

/// A message being streamed to disk. Dropping it without `commit` leaves nothing behind.
pub trait MessageDraft: Send + 'static {
    /// The queue id this message will have.
    fn id(&self) -> &str;
    /// Append bytes (already CRLF-normalised, dot-unstuffed).
    fn write(&mut self, chunk: &[u8]) -> impl Future<Output = Result<(), SpoolError>> + Send;
    /// Make the message durable and visible to the forwarder. Only after this returns `Ok`
    /// may the server say 250.
    fn commit(self, envelope: Envelope) -> impl Future<Output = Result<(), SpoolError>> + Send;
    /// Throw the draft away.
    fn discard(self) -> impl Future<Output = ()> + Send;
}

pub mod auth;
pub mod command;
pub mod conn;
pub mod data;
pub mod policy;
pub mod reply;
pub mod server;
pub mod session;
#[cfg(test)]
pub(crate) mod testkit;
pub mod tls;
