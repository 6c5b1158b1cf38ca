//! Raw TOML mirror → typed [`Config`]: parse values, apply defaults, resolve paths, check files,
//! and check that the parts fit together (open relay, AUTH without users or without TLS, ...).
//!
//! Every check records its error and carries on with a placeholder, so one run reports every
//! mistake. A value that failed to parse is `None` here, and checks that depend on it are
//! skipped: one typo must not cause a second, misleading error.

use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_spanned::Spanned;

use super::error::{Collector, line_of};
use super::raw::{
    self, RawConfig, RawCount, RawDelivery, RawLimits, RawList, RawListener, RawRoute, RawSize,
    RawUser, Span, key_name,
};
use super::{
    AccountConfig, AddressPattern, AuthMode, BareLfPolicy, Config, DeliveryConfig, GlobalLimits,
    ListenerConfig, Pacing, RouteConfig, TlsFiles, TlsMinVersion, TlsMode, TransportConfig,
    UserConfig, pacing,
};

mod account;
mod admin;

pub use super::error::{ConfigError, ConfigErrors};

/// The source name [`load_default`] uses; relative paths in it resolve against the current directory.
pub const EMBEDDED_SOURCE: &str = "<embedded default>";

/// Read, parse and validate the configuration file at `path`.
///
/// Errors name the file as `path` was given. Relative paths inside the file resolve against the
/// file's directory, so `postern -c /etc/postern/postern.toml` behaves the same from any cwd.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let bytes = fs::read(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: None,
            column: None,
            key: String::new(),
            message: format!(
                "cannot read the configuration file: {e}; check the path and its permissions"
            ),
        }])
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|e| ConfigErrors(vec![not_utf8(&file, e.as_bytes(), e.utf8_error())]))?;
    load(&text, &file, &parent_dir(path))
}

/// A file that is not UTF-8 (TOML must be): where the first bad byte is, and how to fix it.
fn not_utf8(file: &str, bytes: &[u8], e: std::str::Utf8Error) -> ConfigError {
    let good = &bytes[..e.valid_up_to()];
    let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
    // The valid prefix of the line is UTF-8: count its characters.
    let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
    let bad = bytes.get(e.valid_up_to()).copied().unwrap_or(0);
    let message = if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        "the file is UTF-16 text, but the configuration must be UTF-8; save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)".to_owned()
    } else if e.error_len().is_none() {
        format!(
            "the file is not UTF-8 text: it ends in the middle of a character (byte 0x{bad:02X}); save it as UTF-8"
        )
    } else {
        format!(
            "the file is not UTF-8 text: byte 0x{bad:02X} here is not valid UTF-8 (the editor probably saved it as Latin-1 or Windows-1252); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    };
    ConfigError {
        file: file.to_owned(),
        line: Some(line),
        column: Some(column),
        key: String::new(),
        message,
    }
}

/// Parse and validate configuration `text`; `source` names it in errors.
///
/// If `source` is a path, relative paths in the text resolve against its directory; if it is a
/// name in angle brackets (such as `<embedded default>`), against the current directory.
pub fn load_str(text: &str, source: &str) -> Result<Config, ConfigErrors> {
    let base = if source.starts_with('<') {
        PathBuf::from(".")
    } else {
        parent_dir(Path::new(source))
    };
    load(text, source, &base)
}

/// Load the embedded default configuration ([`super::EMBEDDED_DEFAULT`]).
pub fn load_default() -> Result<Config, ConfigErrors> {
    load_str(super::EMBEDDED_DEFAULT, EMBEDDED_SOURCE)
}

/// The embedded default with its relative paths resolved against `dir` (the directory its
/// daemon was started in) instead of the current one.
pub fn load_default_in(dir: &Path) -> Result<Config, ConfigErrors> {
    load(super::EMBEDDED_DEFAULT, EMBEDDED_SOURCE, dir)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn load(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let mut c = Collector::new(file, text);
    let Some(raw) = raw::parse(text, &mut c) else {
        return Err(c.finish());
    };
    let config = Checker {
        c: &mut c,
        text,
        base,
    }
    .config(raw, file);
    if c.is_empty() {
        Ok(config)
    } else {
        Err(c.finish())
    }
}

/// Defaults for keys left out of the file (documented in `config/postern.toml`).
mod defaults {
    use std::time::Duration;

    pub const SPOOL_DIR: &str = "/var/spool/postern";
    pub const STATE_DIR: &str = "/var/lib/postern";
    pub const MAX_CONNECTIONS: usize = 200;
    pub const MAX_CONNECTIONS_PER_IP: usize = 20;
    /// A client logs in within a few hundred milliseconds of connecting; five at once from one
    /// address is plenty for a NAT gateway of devices, and keeps a flood that never logs in
    /// from taking every slot.
    pub const MAX_UNAUTHENTICATED_PER_IP: usize = 5;
    pub const MESSAGE_MEMORY: u64 = crate::spool::DEFAULT_MESSAGE_MEMORY;
    pub const MIN_FREE_DISK: u64 = 100_000_000;
    pub const AUTH_MAX_FAILURES: u32 = 5;
    pub const AUTH_LOCKOUT: Duration = Duration::from_secs(15 * 60);
    /// Four clients' worth: a guesser spreading its attempts over many addresses.
    pub const AUTH_MAX_FAILURES_PER_USER: u32 = 20;
    pub const MAX_CONCURRENCY: usize = 16;
    /// Exchange Online allows 3 concurrent SMTP submissions per mailbox (432 4.3.2 beyond).
    pub const PER_MAILBOX_CONCURRENCY: usize = 3;
    pub const RETRY_INITIAL: Duration = Duration::from_secs(60);
    pub const RETRY_MAX: Duration = Duration::from_secs(3600);
    pub const MAX_LIFETIME: Duration = Duration::from_secs(5 * 24 * 3600);
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    pub const HOLD_RETRY: Duration = Duration::from_secs(5 * 60);
    pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const ALLOW_NETWORKS: &[&str] = &["127.0.0.0/8", "::1/128"];
    /// Exchange Online's default message size limit.
    pub const MAX_MESSAGE_SIZE: u64 = 35_000_000;
    /// A Graph route's default `max_message_size`: Exchange Online's default `MaxSendSize`,
    /// 35 MB as Exchange counts (36,700,160 bytes).
    pub const GRAPH_MAX_MESSAGE_SIZE: u64 = 35 * 1024 * 1024;
    /// The most `MaxSendSize` can be raised to: 150 MB as Exchange counts.
    pub const GRAPH_MAX_MESSAGE_CEILING: u64 = 150 * 1024 * 1024;
    pub const MAX_RECIPIENTS: usize = 100;
    pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
    pub const DATA_TIMEOUT: Duration = Duration::from_secs(5 * 60);
    /// Postfix's smtpd_min_data_rate.
    pub const MIN_DATA_RATE: u64 = 500;
    pub const SESSION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    pub const MAX_ERRORS: u32 = 10;
}

/// Networks that cannot be reached from the public internet: loopback, RFC 1918, link-local
/// and IPv6 unique-local. Anything else in `allow_networks` needs `auth = "required"`.
const PRIVATE_NETWORKS: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

/// Is every address of `net` loopback, private, link-local or unique-local?
pub(crate) fn is_private(net: &IpNet) -> bool {
    // An IPv4-mapped IPv6 network (::ffff:a.b.c.d/n) is judged as the IPv4 network it maps.
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(*net),
            None => *net,
        },
        _ => *net,
    };
    PRIVATE_NETWORKS
        .iter()
        .filter_map(|p| p.parse::<IpNet>().ok())
        .any(|p| p.contains(&net))
}

/// What a parsed listener keeps for the checks that span listeners and users.
struct ListenerFacts {
    table: String,
    address: Option<Spanned<SocketAddr>>,
    tls: Option<TlsMode>,
    auth: Option<Spanned<AuthMode>>,
    /// Parsed networks with the span of the entry each came from.
    networks: Vec<(IpNet, Span)>,
}

struct Checker<'c, 't> {
    c: &'c mut Collector<'t>,
    text: &'t str,
    base: &'c Path,
}

impl Checker<'_, '_> {
    fn config(&mut self, raw: RawConfig, file: &str) -> Config {
        let hostname = self.hostname(raw.hostname);
        let spool_dir = self.dir("spool_dir", raw.spool_dir, defaults::SPOOL_DIR);
        let state_dir = self.dir("state_dir", raw.state_dir, defaults::STATE_DIR);
        let limits = self.limits(raw.limits);
        let delivery = self.delivery(raw.delivery);
        let admin = self.admin(raw.admin);

        let mut listeners = Vec::new();
        let mut facts = Vec::new();
        for l in raw.listeners {
            let (config, f) = self.listener(l);
            listeners.push(config);
            facts.push(f);
        }
        let users: Vec<UserConfig> = raw.users.into_iter().map(|u| self.user(u)).collect();
        // Accounts before routes: a route names its account. An account with errors is still
        // known by name (`account_names`), so its routes don't also say "no such account".
        let account_names: Vec<String> = raw.accounts.iter().map(|a| a.name.clone()).collect();
        let accounts: Vec<AccountConfig> = raw
            .accounts
            .into_iter()
            .filter_map(|a| self.account(a))
            .collect();
        let route_tables = raw.routes.len();
        let (listener_section_broken, route_section_broken) =
            (raw.listener_section_broken, raw.route_section_broken);
        let routes: Vec<RouteConfig> = raw
            .routes
            .into_iter()
            .filter_map(|r| self.route(r, &account_names))
            .collect();

        self.listener_policies(&facts, users.is_empty());
        self.duplicate_addresses(&facts);
        if facts.is_empty() && !listener_section_broken && !self.c.was_suggested("listener") {
            self.c.at_end(
                "listener",
                "no listener is defined, so postern would accept no mail; add a table such as [listener.lan] with address = \"127.0.0.1:2525\"",
            );
        }
        if route_tables == 0 && !route_section_broken && !self.c.was_suggested("route") {
            self.c.at_end(
                "route",
                "no route is defined, so every sender would be refused; add a table such as [route.default] with senders = [\"*\"], transport = \"file\" and dir = \"./delivered\"",
            );
        }

        Config {
            source: file.to_owned(),
            hostname,
            spool_dir,
            state_dir,
            limits,
            listeners,
            users,
            routes,
            accounts,
            delivery,
            admin,
        }
    }

    fn hostname(&mut self, raw: Option<Spanned<String>>) -> String {
        match raw {
            Some(h) => {
                let name = h.get_ref().trim();
                if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    self.c.at(
                        &h.span(),
                        "hostname",
                        format!(
                            "{:?} is not a host name; write a name such as \"relay.example.com\"",
                            h.get_ref()
                        ),
                    );
                }
                name.to_owned()
            }
            None => match hostname::get() {
                Ok(h) => h.to_string_lossy().into_owned(),
                Err(e) => {
                    self.c.at(
                        &(0..0),
                        "hostname",
                        format!("cannot read the system host name ({e}); write hostname = \"relay.example.com\""),
                    );
                    String::new()
                }
            },
        }
    }

    /// A directory (or file) path: relative ones resolve against the config file's directory.
    fn path(&mut self, key: &str, raw: &Spanned<String>, example: &str) -> Option<PathBuf> {
        if raw.get_ref().trim().is_empty() {
            self.c.at(
                &raw.span(),
                key,
                format!("the path is empty; write a path such as \"{example}\""),
            );
            return None;
        }
        Some(resolve(self.base, raw.get_ref()))
    }

    fn dir(&mut self, key: &str, raw: Option<Spanned<String>>, default: &str) -> PathBuf {
        match raw {
            Some(p) => self.path(key, &p, default).unwrap_or_default(),
            None => PathBuf::from(default),
        }
    }

    fn limits(&mut self, r: RawLimits) -> GlobalLimits {
        GlobalLimits {
            max_connections: self.count(
                "limits.max_connections",
                r.max_connections,
                defaults::MAX_CONNECTIONS,
            ),
            max_connections_per_ip: self.count(
                "limits.max_connections_per_ip",
                r.max_connections_per_ip,
                defaults::MAX_CONNECTIONS_PER_IP,
            ),
            max_unauthenticated_per_ip: self.count(
                "limits.max_unauthenticated_per_ip",
                r.max_unauthenticated_per_ip,
                defaults::MAX_UNAUTHENTICATED_PER_IP,
            ),
            // 0 is allowed: every body then goes straight to disk.
            message_memory: self.size(
                "limits.message_memory",
                r.message_memory,
                defaults::MESSAGE_MEMORY,
                true,
            ),
            // 0 is allowed here: it turns the free-space check off.
            min_free_disk: self.size(
                "limits.min_free_disk",
                r.min_free_disk,
                defaults::MIN_FREE_DISK,
                true,
            ),
            auth_max_failures: self.count_u32(
                "limits.auth_max_failures",
                r.auth_max_failures,
                defaults::AUTH_MAX_FAILURES,
            ),
            auth_lockout: self.duration(
                "limits.auth_lockout",
                r.auth_lockout.as_ref(),
                defaults::AUTH_LOCKOUT,
                false,
            ),
            auth_max_failures_per_user: self.count_u32(
                "limits.auth_max_failures_per_user",
                r.auth_max_failures_per_user,
                defaults::AUTH_MAX_FAILURES_PER_USER,
            ),
            ipv6_prefix: self.ipv6_prefix(r.ipv6_prefix),
        }
    }

    /// `limits.ipv6_prefix`: 32 to 128 bits (a /32 is a whole provider's; 128 counts each
    /// address alone, which lets one machine with a /64 be millions of clients).
    fn ipv6_prefix(&mut self, raw: Option<Spanned<i64>>) -> u8 {
        let default = super::DEFAULT_IPV6_PREFIX;
        let Some(n) = raw else { return default };
        match u8::try_from(*n.get_ref()) {
            Ok(v @ 32..=128) => v,
            _ => {
                self.c.at(
                    &n.span(),
                    "limits.ipv6_prefix",
                    format!(
                        "{} is not a prefix length postern can use; write a number of bits from 32 to 128, such as {default} (a /64 is one site or machine)",
                        n.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn delivery(&mut self, r: RawDelivery) -> DeliveryConfig {
        let d = DeliveryConfig {
            max_concurrency: self.count(
                "delivery.max_concurrency",
                r.max_concurrency.clone(),
                defaults::MAX_CONCURRENCY,
            ),
            per_mailbox_concurrency: self.count(
                "delivery.per_mailbox_concurrency",
                r.per_mailbox_concurrency.clone(),
                defaults::PER_MAILBOX_CONCURRENCY,
            ),
            retry_initial: self.duration(
                "delivery.retry_initial",
                r.retry_initial.as_ref(),
                defaults::RETRY_INITIAL,
                false,
            ),
            retry_max: self.duration(
                "delivery.retry_max",
                r.retry_max.as_ref(),
                defaults::RETRY_MAX,
                false,
            ),
            max_lifetime: self.duration(
                "delivery.max_lifetime",
                r.max_lifetime.as_ref(),
                defaults::MAX_LIFETIME,
                false,
            ),
            // 0 is allowed: stop at once without waiting for deliveries in flight.
            shutdown_grace: self.duration(
                "delivery.shutdown_grace",
                r.shutdown_grace.as_ref(),
                defaults::SHUTDOWN_GRACE,
                true,
            ),
            hold_retry: self.duration(
                "delivery.hold_retry",
                r.hold_retry.as_ref(),
                defaults::HOLD_RETRY,
                false,
            ),
            // 0 is allowed: no connection is kept, each message gets its own.
            connection_idle_timeout: self.duration(
                "delivery.connection_idle_timeout",
                r.connection_idle_timeout.as_ref(),
                defaults::CONNECTION_IDLE_TIMEOUT,
                true,
            ),
        };
        // Point at whichever of the pair was written (both defaults are consistent).
        if d.per_mailbox_concurrency > d.max_concurrency {
            let (key, span) = match (&r.per_mailbox_concurrency, &r.max_concurrency) {
                (Some(p), _) => ("delivery.per_mailbox_concurrency", p.span()),
                (None, Some(m)) => ("delivery.max_concurrency", m.span()),
                (None, None) => ("delivery.per_mailbox_concurrency", 0..0),
            };
            self.c.at(
                &span,
                key,
                format!(
                    "per_mailbox_concurrency ({}) is larger than max_concurrency ({}); write per_mailbox_concurrency = {} or less, or raise max_concurrency",
                    d.per_mailbox_concurrency, d.max_concurrency, d.max_concurrency
                ),
            );
        }
        if d.retry_initial > d.retry_max {
            let (key, span) = match (&r.retry_initial, &r.retry_max) {
                (Some(i), _) => ("delivery.retry_initial", i.span()),
                (None, Some(m)) => ("delivery.retry_max", m.span()),
                (None, None) => ("delivery.retry_initial", 0..0),
            };
            self.c.at(
                &span,
                key,
                format!(
                    "retry_initial ({}) is longer than retry_max ({}); write retry_initial = \"{}\" or less, or raise retry_max",
                    humantime::format_duration(d.retry_initial),
                    humantime::format_duration(d.retry_max),
                    humantime::format_duration(d.retry_max)
                ),
            );
        }
        d
    }

    fn listener(&mut self, r: RawListener) -> (ListenerConfig, ListenerFacts) {
        let table = format!("listener.{}", key_name(&r.name));
        let k = |key: &str| format!("{table}.{key}");

        let address = match &r.address {
            Some(a) => match parse_socket_addr(a.get_ref()) {
                Ok(addr) => Some(Spanned::new(a.span(), addr)),
                Err(msg) => {
                    self.c.at(&a.span(), &k("address"), msg);
                    None
                }
            },
            None => {
                self.missing(
                    &r.header,
                    &table,
                    "address",
                    "address = \"0.0.0.0:25\" (an IP address and port)",
                );
                None
            }
        };

        let tls = match &r.tls {
            Some(t) => self.choice(
                &k("tls"),
                t,
                &[
                    ("none", TlsMode::None),
                    ("starttls", TlsMode::StartTls),
                    ("implicit", TlsMode::Implicit),
                ],
            ),
            None => Some(TlsMode::None),
        };
        let tls_files = match tls {
            Some(TlsMode::StartTls | TlsMode::Implicit) => self.tls_files(&r, &table),
            Some(TlsMode::None) => {
                for (key, value) in [
                    ("tls_cert", &r.tls_cert),
                    ("tls_key", &r.tls_key),
                    ("tls_min_version", &r.tls_min_version),
                ] {
                    if let Some(v) = value {
                        self.c.at(
                            &v.span(),
                            &k(key),
                            format!("{key} is set but tls is \"none\", so it would be ignored; write tls = \"starttls\" (or \"implicit\") to use it, or remove {key}"),
                        );
                    }
                }
                None
            }
            // tls itself is wrong (already reported); its files are not judged against a guess.
            None => None,
        };

        let auth = match &r.auth {
            Some(a) => self
                .choice(
                    &k("auth"),
                    a,
                    &[
                        ("none", AuthMode::None),
                        ("optional", AuthMode::Optional),
                        ("required", AuthMode::Required),
                    ],
                )
                .map(|m| Spanned::new(a.span(), m)),
            None => Some(Spanned::new(r.header.clone(), AuthMode::None)),
        };

        let mut networks = Vec::new();
        match &r.allow_networks {
            Some(list) => {
                if list.items.is_empty() && !list.had_bad_items {
                    self.c.at(
                        &list.span,
                        &k("allow_networks"),
                        "the list is empty, so no client could connect; write the networks of your devices, such as [\"192.168.1.0/24\", \"127.0.0.1\"]",
                    );
                }
                for entry in &list.items {
                    match parse_network(entry.get_ref()) {
                        Ok(net) => networks.push((net, entry.span())),
                        Err(msg) => self.c.at(&entry.span(), &k("allow_networks"), msg),
                    }
                }
            }
            None => {
                networks = defaults::ALLOW_NETWORKS
                    .iter()
                    .filter_map(|n| n.parse::<IpNet>().ok())
                    .map(|n| (n, r.header.clone()))
                    .collect();
            }
        }

        let config = ListenerConfig {
            name: r.name.clone(),
            address: address
                .as_ref()
                .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |a| *a.get_ref()),
            tls: tls.unwrap_or(TlsMode::None),
            tls_files,
            auth: auth.as_ref().map_or(AuthMode::None, |a| *a.get_ref()),
            allow_networks: networks.iter().map(|(n, _)| *n).collect(),
            max_message_size: self.size(
                &k("max_message_size"),
                r.max_message_size,
                defaults::MAX_MESSAGE_SIZE,
                false,
            ),
            max_recipients: self.count(
                &k("max_recipients"),
                r.max_recipients,
                defaults::MAX_RECIPIENTS,
            ),
            command_timeout: self.duration(
                &k("command_timeout"),
                r.command_timeout.as_ref(),
                defaults::COMMAND_TIMEOUT,
                false,
            ),
            data_timeout: self.duration(
                &k("data_timeout"),
                r.data_timeout.as_ref(),
                defaults::DATA_TIMEOUT,
                false,
            ),
            // 0 is allowed: only data_timeout applies.
            min_data_rate: self.size(
                &k("min_data_rate"),
                r.min_data_rate,
                defaults::MIN_DATA_RATE,
                true,
            ),
            session_timeout: self.duration(
                &k("session_timeout"),
                r.session_timeout.as_ref(),
                defaults::SESSION_TIMEOUT,
                false,
            ),
            max_errors: self.count_u32(&k("max_errors"), r.max_errors, defaults::MAX_ERRORS),
            bare_lf: match &r.bare_lf {
                Some(b) => self
                    .choice(
                        &k("bare_lf"),
                        b,
                        &[
                            ("normalize", BareLfPolicy::Normalize),
                            ("reject", BareLfPolicy::Reject),
                        ],
                    )
                    .unwrap_or(BareLfPolicy::Normalize),
                None => BareLfPolicy::Normalize,
            },
        };
        let facts = ListenerFacts {
            table,
            address,
            tls,
            auth,
            networks,
        };
        (config, facts)
    }

    fn tls_files(&mut self, r: &RawListener, table: &str) -> Option<TlsFiles> {
        let file = |this: &mut Self,
                    key: &str,
                    raw: &Option<Spanned<String>>,
                    kind: Pem|
         -> Option<PathBuf> {
            let path_key = format!("{table}.{key}");
            let Some(raw) = raw else {
                if this.c.was_suggested(&path_key) {
                    return None;
                }
                let example = match kind {
                    Pem::Cert => {
                        "tls_cert = \"/etc/postern/tls/cert.pem\" (the PEM certificate chain)"
                    }
                    Pem::Key => "tls_key = \"/etc/postern/tls/key.pem\" (the PEM private key)",
                };
                this.c.at(
                    &r.header,
                    &path_key,
                    format!("required key is missing (tls is not \"none\"); add {example} under [{table}]"),
                );
                return None;
            };
            let path = this.path(&path_key, raw, "/etc/postern/tls/cert.pem")?;
            if let Err(msg) = check_pem(&path, kind) {
                this.c.at(&raw.span(), &path_key, msg);
                return None;
            }
            Some(path)
        };
        let cert = file(self, "tls_cert", &r.tls_cert, Pem::Cert);
        let key = file(self, "tls_key", &r.tls_key, Pem::Key);
        let min_version = match &r.tls_min_version {
            Some(v) => self.choice(
                &format!("{table}.tls_min_version"),
                v,
                &[("1.2", TlsMinVersion::Tls12), ("1.3", TlsMinVersion::Tls13)],
            )?,
            None => TlsMinVersion::Tls12,
        };
        let files = TlsFiles {
            cert: cert?,
            key: key?,
            min_version,
        };
        // Both files are readable PEM: build the TLS configuration exactly as `serve` will, so
        // `check` refuses what start-up would (a key of another certificate, an unsupported
        // key type).
        if let (Err(e), Some(key_raw), Some(cert_raw)) = (
            crate::smtp::tls::server_config(&files),
            &r.tls_key,
            &r.tls_cert,
        ) {
            let cert_line = line_of(self.text, cert_raw.span().start);
            self.c.at(
                &key_raw.span(),
                &format!("{table}.tls_key"),
                tls_pair_error(&e, &files, cert_line),
            );
        }
        Some(files)
    }

    /// Checks that need the whole listener plus the user list.
    fn listener_policies(&mut self, facts: &[ListenerFacts], no_users: bool) {
        for f in facts {
            let Some(auth) = &f.auth else { continue };
            let mode = *auth.get_ref();
            if mode != AuthMode::Required
                && let Some((net, span)) = f.networks.iter().find(|(n, _)| !is_private(n))
            {
                let auth_word = if mode == AuthMode::None {
                    "none"
                } else {
                    "optional"
                };
                self.c.at(
                        span,
                        &format!("{}.allow_networks", f.table),
                        format!(
                            "{net} includes public internet addresses and auth is \"{auth_word}\", so anyone who can reach this port could send mail through your Microsoft 365 account (an open relay); write auth = \"required\" (with [user.NAME] entries and TLS), or allow only loopback and private networks such as \"192.168.1.0/24\""
                        ),
                    );
            }
            if mode != AuthMode::None && no_users {
                let word = if mode == AuthMode::Required {
                    "required"
                } else {
                    "optional"
                };
                self.c.at(
                    &auth.span(),
                    &format!("{}.auth", f.table),
                    format!(
                        "auth is \"{word}\" but no [user.NAME] is defined, so nobody could log in; add a [user.NAME] table with password_hash (from `postern hash-password`) and may_send_as, or write auth = \"none\""
                    ),
                );
            }
            let non_loopback = f
                .address
                .as_ref()
                .is_some_and(|a| !a.get_ref().ip().is_loopback());
            if mode == AuthMode::Required && f.tls == Some(TlsMode::None) && non_loopback {
                self.c.at(
                    &auth.span(),
                    &format!("{}.auth", f.table),
                    "auth is \"required\" but tls is \"none\" on a non-loopback address: passwords would cross the network in clear text, so postern offers AUTH there only after STARTTLS and no client could log in; write tls = \"starttls\" with tls_cert and tls_key, or listen on 127.0.0.1",
                );
            }
        }
    }

    /// Two listeners cannot bind the same address and port. A wildcard address (0.0.0.0, ::)
    /// collides with every address of its family on that port. Port 0 means "any free port",
    /// so it never collides.
    fn duplicate_addresses(&mut self, facts: &[ListenerFacts]) {
        for (j, later) in facts.iter().enumerate() {
            let Some(b) = &later.address else { continue };
            let b_addr = *b.get_ref();
            if b_addr.port() == 0 {
                continue;
            }
            let clash = facts[..j].iter().find_map(|earlier| {
                let a = earlier.address.as_ref()?;
                let a_addr = *a.get_ref();
                let same_family = a_addr.is_ipv4() == b_addr.is_ipv4();
                let overlaps = a_addr.ip() == b_addr.ip()
                    || (same_family
                        && (a_addr.ip().is_unspecified() || b_addr.ip().is_unspecified()));
                (a_addr.port() == b_addr.port() && overlaps).then_some((earlier, a_addr, a.span()))
            });
            if let Some((earlier, a_addr, a_span)) = clash {
                let line = line_of(self.text, a_span.start);
                let how = if a_addr == b_addr {
                    "is already used"
                } else {
                    "overlaps the address used"
                };
                self.c.at(
                    &b.span(),
                    &format!("{}.address", later.table),
                    format!(
                        "\"{b_addr}\" {how} by {} (\"{a_addr}\", line {line}); write a different port or address, or remove one of the two listeners",
                        earlier.table
                    ),
                );
            }
        }
    }

    fn user(&mut self, r: RawUser) -> UserConfig {
        let table = format!("user.{}", key_name(&r.name));
        let password_hash = match &r.password_hash {
            Some(h) => {
                if let Err(why) = check_password_hash(h.get_ref()) {
                    // The hash itself is never echoed: it is credential material.
                    self.c.at(
                        &h.span(),
                        &format!("{table}.password_hash"),
                        format!("{why}; write the output of `postern hash-password`"),
                    );
                }
                h.get_ref().clone()
            }
            None => {
                self.missing(
                    &r.header,
                    &table,
                    "password_hash",
                    "password_hash = \"...\" with the output of `postern hash-password`",
                );
                String::new()
            }
        };
        let may_send_as = self.patterns(
            &r.header,
            &table,
            "may_send_as",
            r.may_send_as.as_ref(),
            "[\"scanner@example.com\"]",
        );
        UserConfig {
            name: r.name,
            password_hash,
            may_send_as,
        }
    }

    /// `None` if the route is unusable (so "no route defined" is not also reported for it).
    fn route(&mut self, r: RawRoute, accounts: &[String]) -> Option<RouteConfig> {
        let table = format!("route.{}", key_name(&r.name));
        let senders = self.patterns(&r.header, &table, "senders", r.senders.as_ref(), "[\"*\"]");
        let mailbox = r.mailbox.as_ref().and_then(|m| match AddressPattern::parse(m.get_ref()) {
            Ok(AddressPattern::Exact(_)) => Some(m.get_ref().trim().to_owned()),
            Ok(_) => {
                self.c.at(
                    &m.span(),
                    &format!("{table}.mailbox"),
                    format!("{:?} is a pattern, but mailbox is the one mailbox mail is sent as; write an address such as \"shared@example.com\", or remove mailbox to send as each sender", m.get_ref()),
                );
                None
            }
            Err(msg) => {
                self.c.at(&m.span(), &format!("{table}.mailbox"), msg);
                None
            }
        });
        let graph_max = self.graph_max_message_size(&table, r.max_message_size.clone());
        let transport = match &r.transport {
            Some(t) => match t.get_ref().as_str() {
                "file" => match &r.dir {
                    Some(d) => self
                        .path(&format!("{table}.dir"), d, "/var/lib/postern/delivered")
                        .map(|dir| TransportConfig::File { dir }),
                    None => {
                        self.missing(&r.header, &table, "dir", "dir = \"/var/lib/postern/delivered\" (where transport \"file\" writes messages)");
                        None
                    }
                },
                "discard" => Some(TransportConfig::Discard),
                kind @ ("smtp" | "graph") => {
                    self.route_account(&r, &table, kind, accounts)
                        .map(|account| {
                            if kind == "smtp" {
                                TransportConfig::Smtp { account }
                            } else {
                                TransportConfig::Graph {
                                    account,
                                    save_to_sent_items: r
                                        .save_to_sent_items
                                        .as_ref()
                                        .is_none_or(|v| *v.get_ref()),
                                    max_message_size: graph_max,
                                }
                            }
                        })
                }
                other => {
                    self.c.at(
                        &t.span(),
                        &format!("{table}.transport"),
                        format!(
                            "unknown value \"{other}\"; write \"smtp\", \"graph\", \"file\" or \"discard\""
                        ),
                    );
                    None
                }
            },
            None => {
                self.missing(&r.header, &table, "transport", "transport = \"smtp\" with account = \"NAME\" (or transport = \"file\" with dir = \"...\")");
                None
            }
        };
        if let Some(d) = &r.dir
            && !matches!(transport, Some(TransportConfig::File { .. }) | None)
        {
            self.c.at(
                &d.span(),
                &format!("{table}.dir"),
                "dir only applies to transport = \"file\"; remove it".to_owned(),
            );
        }
        if let (Some(a), Some(TransportConfig::File { .. } | TransportConfig::Discard)) =
            (&r.account, &transport)
        {
            self.c.at(&a.span(), &format!("{table}.account"), "account only applies to transport = \"smtp\" or \"graph\"; remove it, or write transport = \"smtp\"".to_owned());
        }
        if let Some(v) = &r.max_message_size
            && !matches!(transport, Some(TransportConfig::Graph { .. }) | None)
        {
            self.c.at(
                &v.span(),
                &format!("{table}.max_message_size"),
                "max_message_size in a route only applies to transport = \"graph\" (over SMTP, Exchange itself refuses what is too large, and the listener's max_message_size limits what postern accepts); remove it".to_owned(),
            );
        }
        if let Some(v) = &r.save_to_sent_items
            && !matches!(transport, Some(TransportConfig::Graph { .. }) | None)
        {
            self.c.at(
                &v.span(),
                &format!("{table}.save_to_sent_items"),
                "save_to_sent_items only applies to transport = \"graph\" (Exchange always keeps a copy of mail sent over SMTP in Sent Items); remove it".to_owned(),
            );
        }
        let transport = transport?;
        let pacing = self.pacing(&table, &r, &transport);
        // A valid route with a bad mailbox is still reported as a route, not as "no route".
        Some(RouteConfig {
            name: r.name,
            senders,
            mailbox,
            transport,
            pacing,
            rewrite_from: r.rewrite_from.is_some_and(|b| *b.get_ref()),
        })
    }

    /// The `account` of a Microsoft route (`kind` is "smtp" or "graph"), reported when it is
    /// missing or names no `[account.NAME]`.
    fn route_account(
        &mut self,
        r: &RawRoute,
        table: &str,
        kind: &str,
        accounts: &[String],
    ) -> Option<String> {
        match &r.account {
            Some(a) if accounts.contains(a.get_ref()) => Some(a.get_ref().clone()),
            Some(a) => {
                let known = if accounts.is_empty() {
                    "no [account.NAME] table is defined; add one (see config/postern.toml)"
                        .to_owned()
                } else {
                    format!(
                        "write one of {}",
                        accounts
                            .iter()
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                self.c.at(
                    &a.span(),
                    &format!("{table}.account"),
                    format!("there is no [account.{}]; {known}", key_name(a.get_ref())),
                );
                None
            }
            None => {
                self.missing(
                    &r.header,
                    table,
                    "account",
                    &format!("account = \"NAME\" (the [account.NAME] whose tokens transport \"{kind}\" uses)"),
                );
                None
            }
        }
    }

    /// `rate` and `daily_recipients` of a route; Exchange Online's limits by default for the
    /// Microsoft transports, none for the local ones.
    fn pacing(&mut self, table: &str, r: &RawRoute, transport: &TransportConfig) -> Pacing {
        let mut p = match transport {
            TransportConfig::File { .. } | TransportConfig::Discard => Pacing::default(),
            _ => Pacing::exchange(),
        };
        if let Some(v) = &r.rate {
            match pacing::parse_rate(v.get_ref()) {
                Ok(rate) => p.rate = rate,
                Err(msg) => self.c.at(&v.span(), &format!("{table}.rate"), msg),
            }
        }
        if let Some(v) = &r.daily_recipients {
            let parsed = match v.get_ref() {
                RawCount::Number(n) => pacing::daily_count(*n).map(Some),
                RawCount::Text(t) => pacing::parse_recipients(t),
            };
            match parsed {
                Ok(rate) => p.recipients = rate,
                Err(msg) => self
                    .c
                    .at(&v.span(), &format!("{table}.daily_recipients"), msg),
            }
        }
        p
    }

    /// A required, non-empty list of address patterns.
    fn patterns(
        &mut self,
        header: &Span,
        table: &str,
        key: &str,
        list: Option<&RawList>,
        example: &str,
    ) -> Vec<AddressPattern> {
        let path = format!("{table}.{key}");
        let Some(list) = list else {
            self.missing(header, table, key, &format!("{key} = {example}"));
            return Vec::new();
        };
        if list.items.is_empty() && !list.had_bad_items {
            self.c.at(
                &list.span,
                &path,
                format!("the list is empty; write at least one pattern, such as {key} = {example}"),
            );
        }
        let mut out = Vec::new();
        for entry in &list.items {
            match AddressPattern::parse(entry.get_ref()) {
                Ok(p) => out.push(p),
                Err(msg) => self.c.at(&entry.span(), &path, msg),
            }
        }
        out
    }

    fn missing(&mut self, header: &Span, table: &str, key: &str, write: &str) {
        if self.c.was_suggested(&format!("{table}.{key}")) {
            return;
        }
        self.c.at(
            header,
            &format!("{table}.{key}"),
            format!("required key is missing; add {write} under [{table}]"),
        );
    }

    /// One of a fixed set of words.
    fn choice<T: Copy>(
        &mut self,
        path: &str,
        raw: &Spanned<String>,
        options: &[(&str, T)],
    ) -> Option<T> {
        if let Some((_, v)) = options
            .iter()
            .find(|(word, _)| *word == raw.get_ref().as_str())
        {
            return Some(*v);
        }
        let list: Vec<String> = options.iter().map(|(w, _)| format!("\"{w}\"")).collect();
        self.c.at(
            &raw.span(),
            path,
            format!(
                "unknown value {:?}; write one of {}",
                raw.get_ref(),
                list.join(", ")
            ),
        );
        None
    }

    fn count(&mut self, path: &str, raw: Option<Spanned<i64>>, default: usize) -> usize {
        let Some(n) = raw else { return default };
        match usize::try_from(*n.get_ref()) {
            Ok(v) if v >= 1 => v,
            _ => {
                self.c.at(
                    &n.span(),
                    path,
                    format!(
                        "{} is too small; write a whole number of at least 1, such as {default}",
                        n.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn count_u32(&mut self, path: &str, raw: Option<Spanned<i64>>, default: u32) -> u32 {
        let Some(n) = raw else { return default };
        let v = *n.get_ref();
        if v < 1 {
            self.c.at(
                &n.span(),
                path,
                format!("{v} is too small; write a whole number of at least 1, such as {default}"),
            );
            return default;
        }
        u32::try_from(v).unwrap_or_else(|_| {
            self.c.at(
                &n.span(),
                path,
                format!("{v} is too large; write a number such as {default}"),
            );
            default
        })
    }

    fn duration(
        &mut self,
        path: &str,
        raw: Option<&Spanned<String>>,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        let Some(s) = raw else { return default };
        let example = humantime::format_duration(default).to_string();
        let mut examples = vec![format!("\"{example}\"")];
        for other in ["30s", "1h 30m"] {
            if other != example {
                examples.push(format!("\"{other}\""));
            }
        }
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.c.at(
                    &s.span(),
                    path,
                    format!("must be longer than 0; write a duration such as \"{example}\""),
                );
                default
            }
            Ok(d) => d,
            Err(_) => {
                self.c.at(
                    &s.span(),
                    path,
                    format!(
                        "{:?} is not a duration; write a duration such as {}",
                        s.get_ref(),
                        examples.join(", ")
                    ),
                );
                default
            }
        }
    }

    /// A Graph route's `max_message_size`: default 35 MiB, at most 150 MiB (what a mailbox's
    /// `MaxSendSize` can be raised to).
    fn graph_max_message_size(&mut self, table: &str, raw: Option<Spanned<RawSize>>) -> u64 {
        let span = raw.as_ref().map(|s| s.span());
        let path = format!("{table}.max_message_size");
        let n = self.size(&path, raw, defaults::GRAPH_MAX_MESSAGE_SIZE, false);
        if n > defaults::GRAPH_MAX_MESSAGE_CEILING {
            if let Some(span) = span {
                self.c.at(
                    &span,
                    &path,
                    format!(
                        "{n} bytes is more than a Microsoft 365 mailbox can send (150 MB, Set-Mailbox -MaxSendSize 150MB); write \"150 MiB\" or less"
                    ),
                );
            }
            return defaults::GRAPH_MAX_MESSAGE_CEILING;
        }
        n
    }

    fn size(
        &mut self,
        path: &str,
        raw: Option<Spanned<RawSize>>,
        default: u64,
        allow_zero: bool,
    ) -> u64 {
        let Some(s) = raw else { return default };
        let example = human_size(default);
        let parsed = match s.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            RawSize::Text(t) => t
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| b.as_u64())
                .map_err(|_| format!("{t:?} is not a size")),
        };
        match parsed {
            Ok(0) if !allow_zero => {
                self.c.at(
                    &s.span(),
                    path,
                    format!("must be larger than 0; write a size such as \"{example}\""),
                );
                default
            }
            Ok(n) => n,
            Err(why) => {
                self.c.at(
                    &s.span(),
                    path,
                    format!("{why}; write a size such as \"{example}\" or a number of bytes"),
                );
                default
            }
        }
    }
}

/// A size the way an operator would write it: the largest unit that divides it exactly
/// ("35 MB", "150 MiB"), else plain bytes.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: &[(&str, u64)] = &[
        ("GB", 1_000_000_000),
        ("GiB", 1 << 30),
        ("MB", 1_000_000),
        ("MiB", 1 << 20),
        ("kB", 1_000),
        ("KiB", 1 << 10),
    ];
    match UNITS
        .iter()
        .find(|(_, unit)| bytes > 0 && bytes.is_multiple_of(*unit))
    {
        Some((name, unit)) => format!("{} {name}", bytes / unit),
        None => format!("{bytes} bytes"),
    }
}

#[derive(Clone, Copy)]
enum Pem {
    Cert,
    Key,
}

/// Resolve `p` against `base` (unless absolute) and make it absolute without touching the
/// filesystem, so the daemon does not depend on its working directory later.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let absolute = std::path::absolute(&joined).unwrap_or(joined);
    // `components()` drops interior "." segments ("/etc/postern/./spool" → "/etc/postern/spool").
    absolute
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        let example = SocketAddr::new(ip, 25);
        return Err(format!(
            "{s:?} has no port; write an address and port such as \"{example}\""
        ));
    }
    if let Some((host, port)) = t.rsplit_once(':')
        && port.parse::<u16>().is_ok()
        && !host.is_empty()
        && host.parse::<IpAddr>().is_err()
    {
        let example = if host == "localhost" {
            format!("127.0.0.1:{port}")
        } else {
            format!("0.0.0.0:{port}")
        };
        return Err(format!(
            "{s:?} is not an IP address and port (host names are not looked up); write an address such as \"{example}\""
        ));
    }
    Err(format!(
        "{s:?} is not an IP address and port; write an address such as \"0.0.0.0:25\" or \"[::1]:25\""
    ))
}

/// A CIDR network, or a bare address taken as a single host (/32 or /128). Host bits are
/// cleared ("192.168.1.5/24" means 192.168.1.0/24), as Postfix does for mynetworks.
pub(crate) fn parse_network(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "{s:?} is not a network; write a network such as \"192.168.1.0/24\" or a single address such as \"192.168.1.20\""
    ))
}

/// Is `hash` an argon2 PHC string? Only argon2 is accepted because that is what the SMTP AUTH
/// code verifies with.
fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(hash)
        .map_err(|e| format!("not a valid argon2 PHC string ({e})"))?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => return Err(format!("the hash uses {other}, not argon2")),
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the PHC string has no salt or hash part (was it cut short?)".to_owned());
    }
    Ok(())
}

/// Why a certificate and key that each parse cannot serve together, and what to do.
fn tls_pair_error(e: &crate::smtp::tls::TlsError, files: &TlsFiles, cert_line: usize) -> String {
    use crate::smtp::tls::TlsError;
    let (cert, key) = (files.cert.display(), files.key.display());
    match e {
        TlsError::Config {
            source: rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
            ..
        } => format!(
            "the private key in \"{key}\" does not belong to the certificate in \"{cert}\" (tls_cert, line {cert_line}), so postern could not start TLS; write the key that was created with this certificate (certbot: privkey.pem beside fullchain.pem), or the certificate issued for this key (`openssl x509 -noout -pubkey -in CERT` and `openssl pkey -pubout -in KEY` print the same public key for a matching pair)"
        ),
        TlsError::Config { source, .. } => format!(
            "the certificate in \"{cert}\" (tls_cert, line {cert_line}) and the private key in \"{key}\" cannot be used together ({source}), so postern could not start TLS; write an RSA, ECDSA or Ed25519 key in PEM with its certificate"
        ),
        other => format!("{other}; so postern could not start TLS"),
    }
}

/// The file exists, is readable by us, and holds what it should, so a bad path is reported
/// now and not at the first STARTTLS.
fn check_pem(path: &Path, kind: Pem) -> Result<(), String> {
    let shown = path.display();
    let what = match kind {
        Pem::Cert => "certificate chain",
        Pem::Key => "private key",
    };
    match fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "file \"{shown}\" does not exist; write the path of your PEM {what}, or create it there"
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot access \"{shown}\": {e}; check the path and its directory's permissions"
            ));
        }
        Ok(m) if !m.is_file() => {
            return Err(format!(
                "\"{shown}\" is not a file; write the path of your PEM {what}"
            ));
        }
        Ok(_) => {}
    }
    if let Err(e) = fs::File::open(path) {
        return Err(format!(
            "file \"{shown}\" is not readable: {e}; make it readable by the user postern runs as (for example chgrp postern and chmod 640)"
        ));
    }
    let found = match kind {
        Pem::Cert => CertificateDer::pem_file_iter(path)
            .map(|mut it| it.next().is_some_and(|c| c.is_ok()))
            .unwrap_or(false),
        Pem::Key => PrivateKeyDer::from_pem_file(path).is_ok(),
    };
    if !found {
        let marker = match kind {
            Pem::Cert => "-----BEGIN CERTIFICATE-----",
            Pem::Key => "-----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)",
        };
        return Err(format!(
            "\"{shown}\" holds no PEM {what} ({marker}); write the path of the PEM {what}"
        ));
    }
    Ok(())
}
