//! postern: a local SMTP relay that accepts mail from devices and apps that only speak plain
//! SMTP, spools it durably, and forwards it to Microsoft 365 with OAuth2.
//!
//! # Layout
//! - [`config`]: the TOML file → typed, validated [`config::Config`] (listeners, users, routes,
//!   Entra accounts), every error with file:line:key and a fix.
//! - [`smtp`]: the SMTP server: sans-IO session, connection driver, DATA reader, AUTH, policy,
//!   accept loop, TLS.
//! - [`spool`]: every byte on disk and every state change: one queue file per message (body and
//!   appended envelope), atomic renames, fsync order, group commit, recovery.
//! - [`forward`]: the scheduler that claims due messages and runs deliveries: holds mail whose
//!   mailbox (or Send As) is misconfigured, paces each mailbox to its route's limits, waits out
//!   upstream throttles, and remembers recipient windows across restarts.
//! - [`upstream`]: transports that send a spooled message: Exchange Online SMTP with XOAUTH2
//!   (BDAT when offered; `smtp/pool.rs` keeps authenticated connections per mailbox between
//!   messages), Microsoft Graph (`graph/`: sendMail with the MIME, drafts when the envelope
//!   differs from the headers, `graph/large/` for messages over Graph's 4 MB request limit:
//!   skeleton draft, attachments and upload sessions), and `file`; `classify` (and
//!   `graph/classify`) turn every upstream answer into an outcome and advice; `rewrite` sends a
//!   device's mail as its route's mailbox (`rewrite_from`); `watch` lets `postern test` see each
//!   step of the dialogue.
//! - [`token`]: OAuth2 with Entra: the flows, the per-mailbox token store (refresh ahead,
//!   single-flight), refresh-token files, `postern login` and `postern token`.
//! - [`diagnosis`]: the one table of errors (Exchange SMTP replies, AADSTS codes, Graph errors,
//!   postern's own hold reasons) → meaning, likely causes and fix; feeds `explain`, `doctor`,
//!   the status page and the advice in log lines.
//! - [`daemon`]: start-up order, signals, reload and graceful stop.
//! - [`control`]: the socket through which queue commands wake the daemon.
//! - [`doctor`]: `postern doctor`: every dependency checked in order, ✓/✗ with the fix.
//! - [`trial`]: `postern test`: one test message through the configured path now, every
//!   step printed with the upstream's reply, the fix on failure.
//! - [`health`]: `postern health`: ask the running daemon (its `/healthz`, or its control socket).
//! - [`explain`]: `postern explain`: a pasted error or a queue id → the diagnosis.
//! - [`metrics`]: Prometheus counters, gauges and histograms, fed by one-line hooks.
//! - [`status`]: one snapshot of the queue, mailboxes, credentials and liveness.
//! - [`web`]: the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, the status page (bounded connections).
//! - [`admin`]: what the queue commands print.
//! - [`maillog`]: the operator's log, one line per message state change; refusals bounded per client.
//! - [`secret`]: a wrapper that never prints its contents.
//! - [`sendmail`]: `postern sendmail` / the `sendmail` command: submits a message from standard
//!   input to the running daemon over SMTP, with sendmail's options.
//! - [`trust`]: who may touch postern's files: the start-up checks of `serve` and `check`.
//! - [`address`]: the envelope address type: parsed once, written back in RFC 5321 form.
//! - [`escape`]: client and upstream text made safe to print (controls, bidi).

pub mod address;
pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod diagnosis;
pub mod doctor;
pub mod escape;
pub mod explain;
pub mod forward;
pub mod health;
pub mod maillog;
pub mod metrics;
pub mod secret;
pub mod sendmail;
pub mod smtp;
pub mod spool;
pub mod status;
pub mod token;
pub mod trial;
pub mod trust;
pub mod upstream;
pub mod web;
