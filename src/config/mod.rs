//! Configuration: the TOML file (or the embedded default) turned into a typed, validated [`Config`].
//!
//! - `raw.rs`: the file's shape. Parses with toml's spanned document tree and walks it by hand
//!   (not serde, which stops at the first error): syntax errors, unknown keys, wrong types.
//! - `validate.rs`: raw → [`Config`]: values, defaults, paths, TLS files, cross-checks.
//! - `error.rs`: [`ConfigError`]/[`ConfigErrors`], collected so one run reports every mistake,
//!   each as `file:line:column: key: what is wrong; what to write`.
//! - `describe.rs`: [`Config::describe`] and [`Config::warnings`] for `postern check`.
//! - `env.rs`: the `POSTERN_*` environment variables of a container turned into the TOML they
//!   stand for and validated like a file, errors naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

mod address;
mod describe;
pub mod env;
mod error;
pub mod pacing;
mod raw;
#[cfg(test)]
mod tests;
pub mod validate;

pub use address::AddressPattern;
pub use error::{ConfigError, ConfigErrors};
pub use pacing::{Pacing, Rate};
pub use validate::{EMBEDDED_SOURCE, load_default, load_default_in, load_file, load_str};

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
    /// State directory (refresh token files; the control socket is in `spool_dir`).
    pub state_dir: PathBuf,
    /// Global connection limits and disk reserve.
    pub limits: GlobalLimits,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Local users (devices) allowed to AUTH.
    pub users: Vec<UserConfig>,
    /// Routes: which sender goes out through which transport as which mailbox.
    pub routes: Vec<RouteConfig>,
    /// Entra accounts (app registrations) used by the Microsoft transports.
    pub accounts: Vec<AccountConfig>,
    /// Forwarder settings.
    pub delivery: DeliveryConfig,
    /// The admin HTTP listener (metrics, health, status page), if configured.
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: the HTTP listener for `/metrics`, `/healthz`, `/readyz` and the status page.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address and port to bind (loopback unless a token is set).
    pub address: SocketAddr,
    /// The token clients must present (Bearer, or as the Basic password), if any.
    pub token: Option<SecretSource>,
}

/// Limits shared by all listeners.
#[derive(Debug, Clone)]
pub struct GlobalLimits {
    /// Maximum simultaneous SMTP connections over all listeners.
    pub max_connections: usize,
    /// Maximum simultaneous SMTP connections from one client IP address.
    pub max_connections_per_ip: usize,
    /// Maximum simultaneous connections from one client IP address that have not logged in
    /// yet, on listeners with `auth = "required"`.
    pub max_unauthenticated_per_ip: usize,
    /// Memory all messages being received may buffer together; beyond it bodies go to disk.
    pub message_memory: u64,
    /// Refuse new messages (452 4.3.1) when the spool's filesystem has less free space than this.
    pub min_free_disk: u64,
    /// Failed AUTH attempts per client address before AUTH is refused for `auth_lockout`.
    pub auth_max_failures: u32,
    /// How long a client address stays locked out after too many failed AUTH attempts.
    pub auth_lockout: Duration,
    /// Failed AUTH attempts on one user name, from any client, before that name is refused
    /// for `auth_lockout` to clients that never logged in as it.
    pub auth_max_failures_per_user: u32,
    /// IPv6 clients in one network of this many bits count as one client (connection limits,
    /// the AUTH guard, the refusal log): one machine usually has a whole /64.
    pub ipv6_prefix: u8,
}

/// Default of `limits.ipv6_prefix`.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

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
    /// Longest time one whole command line may take to arrive.
    pub command_timeout: Duration,
    /// Longest time to wait for more DATA/BDAT bytes (the transfer's time budget).
    pub data_timeout: Duration,
    /// Slowest average DATA/BDAT rate in bytes per second that keeps the time budget from
    /// running out (0: only `data_timeout` applies).
    pub min_data_rate: u64,
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
    /// Accept and drop (logged as sent to `discard`), like Postfix's discard transport: for
    /// black-holing a noisy device's status mail, and for benchmarks.
    Discard,
    /// Exchange Online SMTP with AUTH XOAUTH2, tokens from `account`.
    Smtp {
        /// Name of the `[account.NAME]` whose tokens are used.
        account: String,
    },
    /// Microsoft Graph `sendMail` (the message as received, base64 MIME), tokens from `account`.
    Graph {
        /// Name of the `[account.NAME]` whose tokens are used.
        account: String,
        /// Keep a copy in the mailbox's Sent Items. Graph honours `false` only where the
        /// request form lets it be said (see `upstream::graph`); default `true`, as Graph's.
        save_to_sent_items: bool,
        /// Largest message the route sends (the mailbox's `MaxSendSize`; default 35 MiB, at
        /// most 150 MiB); larger ones fail with a DSN.
        max_message_size: u64,
    },
}

impl TransportConfig {
    /// The `[account.NAME]` a Microsoft transport uses (`None` for `file` and `discard`).
    pub fn account(&self) -> Option<&str> {
        match self {
            TransportConfig::Smtp { account } | TransportConfig::Graph { account, .. } => {
                Some(account)
            }
            TransportConfig::File { .. } | TransportConfig::Discard => None,
        }
    }
}

/// Microsoft cloud an account lives in (decides the default endpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// Worldwide (and GCC moderate).
    Global,
    /// US Government GCC High.
    UsGov,
    /// US Government DoD.
    UsGovDod,
    /// China, operated by 21Vianet.
    China,
}

/// Every endpoint an account uses; defaults come from its cloud, each overridable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Entra authority base, e.g. `https://login.microsoftonline.com` (no tenant, no trailing slash).
    pub authority: String,
    /// Token endpoint; default `{authority}/{tenant}/oauth2/v2.0/token`.
    pub token_url: String,
    /// Device code endpoint; default `{authority}/{tenant}/oauth2/v2.0/devicecode`.
    pub device_code_url: String,
    /// Authorize endpoint (browser login); default `{authority}/{tenant}/oauth2/v2.0/authorize`.
    pub authorize_url: String,
    /// Microsoft Graph base URL, e.g. `https://graph.microsoft.com`.
    pub graph_url: String,
    /// Exchange Online SMTP host, e.g. `smtp.office365.com`.
    pub smtp_host: String,
    /// Exchange Online SMTP port (587, STARTTLS).
    pub smtp_port: u16,
    /// Resource for SMTP delegated scopes, e.g. `https://outlook.office.com`
    /// (scope `{resource}/SMTP.Send offline_access`).
    pub smtp_delegated_resource: String,
    /// Resource for SMTP app-only tokens, e.g. `https://outlook.office365.com`
    /// (scope `{resource}/.default`).
    pub smtp_app_resource: String,
}

impl Cloud {
    /// The documented endpoints of this cloud for `tenant` (microsoft-reference.md §6).
    pub fn endpoints(self, tenant: &str) -> Endpoints {
        let (authority, graph, smtp, delegated, app) = match self {
            Cloud::Global => (
                "https://login.microsoftonline.com",
                "https://graph.microsoft.com",
                "smtp.office365.com",
                "https://outlook.office.com",
                "https://outlook.office365.com",
            ),
            Cloud::UsGov => (
                "https://login.microsoftonline.us",
                "https://graph.microsoft.us",
                "smtp.office365.us",
                "https://outlook.office365.us",
                "https://outlook.office365.us",
            ),
            Cloud::UsGovDod => (
                "https://login.microsoftonline.us",
                "https://dod-graph.microsoft.us",
                "smtp.office365.us",
                "https://outlook.office365.us",
                "https://outlook.office365.us",
            ),
            Cloud::China => (
                "https://login.partner.microsoftonline.cn",
                "https://microsoftgraph.chinacloudapi.cn",
                "smtp.partner.outlook.cn",
                "https://partner.outlook.cn",
                "https://partner.outlook.cn",
            ),
        };
        Endpoints::derive(authority, tenant, graph, smtp, delegated, app)
    }
}

impl Endpoints {
    /// Endpoints whose Entra URLs are derived from `authority` and `tenant`.
    pub fn derive(
        authority: &str,
        tenant: &str,
        graph: &str,
        smtp_host: &str,
        delegated: &str,
        app: &str,
    ) -> Self {
        let a = authority.trim_end_matches('/');
        Endpoints {
            authority: a.to_string(),
            token_url: format!("{a}/{tenant}/oauth2/v2.0/token"),
            device_code_url: format!("{a}/{tenant}/oauth2/v2.0/devicecode"),
            authorize_url: format!("{a}/{tenant}/oauth2/v2.0/authorize"),
            graph_url: graph.trim_end_matches('/').to_string(),
            smtp_host: smtp_host.to_string(),
            smtp_port: 587,
            smtp_delegated_resource: delegated.trim_end_matches('/').to_string(),
            smtp_app_resource: app.trim_end_matches('/').to_string(),
        }
    }
}

/// Where a secret value is read from (never inline unless the admin insists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (its content, trailing newline trimmed); should be mode 0600.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    SystemdCredential(String),
    /// Written in the config file itself (`check` warns).
    Inline(crate::secret::Secret<String>),
}

/// How a client secret is presented to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretStyle {
    /// `client_secret` in the form body (default).
    Body,
    /// HTTP Basic authentication (RFC 6749 §2.3.1).
    Basic,
}

/// Signature algorithm of a certificate client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlg {
    /// PS256 with an `x5t#S256` header (what Entra documents today; default).
    Ps256,
    /// RS256 with an `x5t` (SHA-1) header (older clients).
    Rs256,
}

/// How an account proves who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// App-only: client credentials grant with a client secret.
    ClientSecret {
        /// Where the secret is.
        secret: SecretSource,
        /// Body or HTTP Basic.
        style: SecretStyle,
        /// When the admin says the secret expires (seconds since the epoch), for warnings.
        expires: Option<u64>,
    },
    /// App-only: client credentials grant with a certificate (client assertion JWT).
    Certificate {
        /// PEM certificate (its thumbprint goes into the JWT header; its notAfter is watched).
        cert: PathBuf,
        /// PEM private key (RSA).
        key: SecretSource,
        /// PS256 (default) or RS256.
        alg: AssertionAlg,
    },
    /// Delegated: one refresh token per mailbox, obtained once with `postern login`.
    Delegated {
        /// A client secret when the app registration is confidential (usually none: public
        /// client flows).
        secret: Option<SecretSource>,
    },
}

/// One Entra app registration in one tenant.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Name from the config (`[account.NAME]`).
    pub name: String,
    /// Tenant: domain name or GUID.
    pub tenant: String,
    /// Application (client) ID.
    pub client_id: String,
    /// Cloud.
    pub cloud: Cloud,
    /// Endpoints (cloud defaults with the config's overrides applied).
    pub endpoints: Endpoints,
    /// Extra CA certificates (PEM) to trust for this account's HTTPS and SMTP connections.
    pub ca_file: Option<PathBuf>,
    /// HTTPS proxy URL; `None` means the standard environment variables decide.
    pub proxy: Option<String>,
    /// The credential.
    pub credential: Credential,
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
    /// Limits for each mailbox this route sends as (`rate`, `daily_recipients`): Exchange
    /// Online's by default for Microsoft transports, none for `file` and `discard`.
    pub pacing: Pacing,
    /// `rewrite_from`: send every message as `mailbox`, envelope sender and `From:` header,
    /// keeping the device's address in `Reply-To:` (see [`crate::upstream::rewrite`]).
    pub rewrite_from: bool,
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
    /// While a mailbox is held for a configuration problem, how often one of its messages is
    /// tried again to see whether the admin fixed it.
    pub hold_retry: Duration,
    /// How long an authenticated upstream connection is kept open for the mailbox's next
    /// message (zero: one connection per message).
    pub connection_idle_timeout: Duration,
}

impl Config {
    /// The route that handles `sender`, if any (first match in file order).
    pub fn route_for(&self, sender: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .find(|r| r.senders.iter().any(|p| p.matches(sender)))
    }

    /// The account called `name`, if configured.
    pub fn account(&self, name: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// The user called `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}
