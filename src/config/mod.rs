//! Configuration: the TOML file (or the embedded default) turned into a typed, validated [`Config`].
//!
//! - `raw.rs`: the file's shape. Parses with toml's spanned document tree and walks it by hand
//!   (not serde, which stops at the first error): syntax errors, unknown keys, wrong types.
//! - `validate.rs`: raw → [`Config`]: values, defaults, paths, TLS files, cross-checks.
//! - `error.rs`: [`ConfigError`]/[`ConfigErrors`], collected so one run reports every mistake,
//!   each as `file:line:column: key: what is wrong; what to write`.
//! - `describe.rs`: [`Config::describe`] and [`Config::warnings`] for `postern check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

mod address;
mod describe;
mod error;
mod raw;
#[cfg(test)]
mod tests;
pub mod validate;

pub use address::AddressPattern;
pub use error::{ConfigError, ConfigErrors};
pub use validate::{EMBEDDED_SOURCE, load_default, load_file, load_str};

/// The embedded default configuration used when no config file exists.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where this configuration came from (a path, or `<embedded default>`).
    pub source: String,
    /// Name we use in the greeting, EHLO reply and `Received:` headers.
    pub hostname: String,
    /// Spool root (state directories live below it).
    pub spool_dir: PathBuf,
    /// State directory (token files, control socket).
    pub state_dir: PathBuf,
    /// Global connection limits and disk reserve.
    pub limits: GlobalLimits,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Local users (devices) allowed to AUTH.
    pub users: Vec<UserConfig>,
    /// Routes: which sender goes out through which transport as which mailbox.
    pub routes: Vec<RouteConfig>,
    /// Forwarder settings.
    pub delivery: DeliveryConfig,
}

/// Limits shared by all listeners.
#[derive(Debug, Clone)]
pub struct GlobalLimits {
    /// Maximum simultaneous SMTP connections over all listeners.
    pub max_connections: usize,
    /// Maximum simultaneous SMTP connections from one client IP address.
    pub max_connections_per_ip: usize,
    /// Refuse new messages (452 4.3.1) when the spool's filesystem has less free space than this.
    pub min_free_disk: u64,
    /// Failed AUTH attempts per client address before AUTH is refused for `auth_lockout`.
    pub auth_max_failures: u32,
    /// How long a client address stays locked out after too many failed AUTH attempts.
    pub auth_lockout: Duration,
}

/// TLS mode of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text only; STARTTLS is not offered.
    None,
    /// Plain text, STARTTLS offered.
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// Lowest TLS protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    /// TLS 1.2 (the default).
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Certificate and key for a listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Lowest accepted protocol version.
    pub min_version: TlsMinVersion,
}

/// Whether a listener offers or requires AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// AUTH is not offered.
    None,
    /// AUTH is offered; unauthenticated clients may still send.
    Optional,
    /// MAIL is refused until the client authenticates.
    Required,
}

/// What to do with a bare LF (LF not preceded by CR) inside DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLfPolicy {
    /// Store it as CRLF (it never ends DATA).
    Normalize,
    /// Reject the message with 550 5.6.0 after reading it to the end.
    Reject,
}

/// One SMTP listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name from the config (`[listener.NAME]`).
    pub name: String,
    /// Address and port to bind.
    pub address: SocketAddr,
    /// TLS mode.
    pub tls: TlsMode,
    /// Certificate and key; required unless `tls` is `None`.
    pub tls_files: Option<TlsFiles>,
    /// AUTH mode.
    pub auth: AuthMode,
    /// Client networks allowed to connect; others get 554 5.7.1.
    pub allow_networks: Vec<IpNet>,
    /// Largest message accepted, in bytes (advertised in SIZE).
    pub max_message_size: u64,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Longest time to wait for one command line.
    pub command_timeout: Duration,
    /// Longest time to wait for more DATA/BDAT bytes.
    pub data_timeout: Duration,
    /// Longest time a whole connection may last.
    pub session_timeout: Duration,
    /// Protocol errors tolerated before the connection is closed with 421.
    pub max_errors: u32,
    /// Bare LF policy.
    pub bare_lf: BareLfPolicy,
}

/// A local user (device or app) that authenticates with AUTH PLAIN/LOGIN.
#[derive(Debug, Clone)]
pub struct UserConfig {
    /// Login name.
    pub name: String,
    /// Argon2 PHC string (`postern hash-password` prints one).
    pub password_hash: String,
    /// Envelope senders this user may use.
    pub may_send_as: Vec<AddressPattern>,
}

/// Where a route delivers.
#[derive(Debug, Clone)]
pub enum TransportConfig {
    /// Write each message as `.eml` plus `.json` envelope into a directory (for trying postern out).
    File {
        /// Target directory.
        dir: PathBuf,
    },
}

/// A route: senders matching `senders` are delivered by `transport` as `mailbox`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name from the config (`[route.NAME]`).
    pub name: String,
    /// Envelope senders this route accepts.
    pub senders: Vec<AddressPattern>,
    /// Fixed mailbox to send as; `None` means "the envelope sender's own mailbox".
    pub mailbox: Option<String>,
    /// The upstream transport.
    pub transport: TransportConfig,
}

/// Forwarder settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Deliveries in flight over all mailboxes.
    pub max_concurrency: usize,
    /// Deliveries in flight for one mailbox.
    pub per_mailbox_concurrency: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long a message may stay queued before it fails.
    pub max_lifetime: Duration,
    /// On SIGTERM, how long to wait for in-flight work before exiting.
    pub shutdown_grace: Duration,
}

impl Config {
    /// The route that handles `sender`, if any (first match in file order).
    pub fn route_for(&self, sender: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .find(|r| r.senders.iter().any(|p| p.matches(sender)))
    }

    /// The user called `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}
