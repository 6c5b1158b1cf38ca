//! postern: a local SMTP relay that accepts mail from devices and apps that only speak plain
//! SMTP, spools it durably, and forwards it to Microsoft 365 with OAuth2.
//!
//! # Layout
//! - [`config`]: the TOML file → typed, validated [`config::Config`].
//! - [`smtp`]: the SMTP server: sans-IO session, connection driver, DATA reader, AUTH, policy.
//! - [`spool`]: every byte on disk and every state change (atomic renames, fsync order).
//! - [`forward`]: the scheduler that claims due messages and runs deliveries.
//! - [`upstream`]: transports that send a spooled message (`file` today; SMTP and Graph next).
//! - [`token`]: the token-store seam the forwarder asks for OAuth2 access tokens.
//! - [`daemon`]: start-up order, signals, reload and graceful stop.
//! - [`maillog`]: the operator's log, one line per message state change.
//! - [`secret`]: a wrapper that never prints its contents.

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod forward;
pub mod maillog;
pub mod secret;
pub mod smtp;
pub mod spool;
pub mod token;
pub mod upstream;
