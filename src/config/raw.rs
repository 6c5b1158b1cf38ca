//! The shape of the TOML file: syntax, tables, key names and value types, with spans.
//!
//! Why not `#[derive(Deserialize)]` with `deny_unknown_fields`? serde stops at the first error,
//! and operators should see every mistake in one run. So the document is parsed with
//! `toml::de::DeTable::parse_recoverable` (toml 0.9's spanned document tree, which also reports
//! *all* syntax errors) and walked by hand into the `Raw*` mirror below. This layer reports
//! syntax errors, unknown keys (with the nearest known key), and wrong value types (with an
//! example of the right one). It does not judge values: "is this a valid duration, address or
//! network, and do the parts fit together" is `validate.rs`'s job.

use std::borrow::Cow;
use std::ops::Range;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::Collector;

/// A byte range in the configuration text.
pub(crate) type Span = Range<usize>;

/// Keys allowed at the top level. Each list below must match the `match` arms of its walker;
/// a unit test checks that every listed key is accepted.
pub(crate) const TOP_KEYS: &[&str] = &[
    "hostname",
    "spool_dir",
    "state_dir",
    "limits",
    "delivery",
    "listener",
    "user",
    "route",
    "account",
    "admin",
];
/// Keys allowed in `[admin]`.
pub(crate) const ADMIN_KEYS: &[&str] = &[
    "address",
    "token",
    "token_file",
    "token_env",
    "token_credential",
];
/// Keys allowed in `[limits]`.
pub(crate) const LIMITS_KEYS: &[&str] = &[
    "max_connections",
    "max_connections_per_ip",
    "max_unauthenticated_per_ip",
    "message_memory",
    "min_free_disk",
    "auth_max_failures",
    "auth_lockout",
    "auth_max_failures_per_user",
    "ipv6_prefix",
];
/// Keys allowed in `[delivery]`.
pub(crate) const DELIVERY_KEYS: &[&str] = &[
    "max_concurrency",
    "per_mailbox_concurrency",
    "retry_initial",
    "retry_max",
    "max_lifetime",
    "shutdown_grace",
    "hold_retry",
    "connection_idle_timeout",
];
/// Keys allowed in `[listener.NAME]`.
pub(crate) const LISTENER_KEYS: &[&str] = &[
    "address",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_min_version",
    "auth",
    "allow_networks",
    "max_message_size",
    "max_recipients",
    "command_timeout",
    "data_timeout",
    "min_data_rate",
    "session_timeout",
    "max_errors",
    "bare_lf",
];
/// Keys allowed in `[user.NAME]`.
pub(crate) const USER_KEYS: &[&str] = &["password_hash", "may_send_as"];
/// Keys allowed in `[route.NAME]`.
pub(crate) const ROUTE_KEYS: &[&str] = &[
    "senders",
    "mailbox",
    "transport",
    "dir",
    "account",
    "rate",
    "daily_recipients",
    "rewrite_from",
    "save_to_sent_items",
    "max_message_size",
];
/// Keys allowed in `[account.NAME]`.
pub(crate) const ACCOUNT_KEYS: &[&str] = &[
    "tenant",
    "client_id",
    "cloud",
    "authority",
    "token_url",
    "device_code_url",
    "authorize_url",
    "graph_url",
    "smtp_host",
    "smtp_port",
    "ca_file",
    "proxy",
    "auth",
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "client_secret_credential",
    "secret_style",
    "secret_expires",
    "certificate",
    "private_key_file",
    "private_key_env",
    "private_key_credential",
    "assertion_alg",
];

/// Where each key belongs, so a key written in the wrong table can be sent to the right one.
const SECTIONS: &[(&str, &[&str])] = &[
    ("the top level (before any [table])", TOP_KEYS),
    ("[limits]", LIMITS_KEYS),
    ("[delivery]", DELIVERY_KEYS),
    ("a [listener.NAME] table", LISTENER_KEYS),
    ("a [user.NAME] table", USER_KEYS),
    ("a [route.NAME] table", ROUTE_KEYS),
    ("an [account.NAME] table", ACCOUNT_KEYS),
    ("[admin]", ADMIN_KEYS),
];

/// A size as written: a string such as `"35 MB"`, or a plain number of bytes.
#[derive(Debug, Clone)]
pub(crate) enum RawSize {
    /// `"35 MB"`, `"100 MiB"`, `"1048576"`.
    Text(String),
    /// `36700160`.
    Bytes(i64),
}

/// A list of strings, each with its own span (so a bad entry can be pointed at).
#[derive(Debug, Default)]
pub(crate) struct RawList {
    /// The whole list.
    pub span: Span,
    /// The entries that are strings.
    pub items: Vec<Spanned<String>>,
    /// Some entries were not strings (already reported): an empty `items` is then not "empty".
    pub had_bad_items: bool,
}

/// The whole file, every value still as written.
#[derive(Debug, Default)]
pub(crate) struct RawConfig {
    pub hostname: Option<Spanned<String>>,
    pub spool_dir: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub limits: RawLimits,
    pub delivery: RawDelivery,
    pub listeners: Vec<RawListener>,
    pub users: Vec<RawUser>,
    pub routes: Vec<RawRoute>,
    pub accounts: Vec<RawAccount>,
    /// `[admin]`: string values kept like an account's (its token is a secret source).
    pub admin: Option<RawAccount>,
    /// `listener` / `route` was present but malformed (already reported), so "no listener" or
    /// "no route" would only repeat that error.
    pub listener_section_broken: bool,
    pub route_section_broken: bool,
}

/// `[limits]`.
#[derive(Debug, Default)]
pub(crate) struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub max_unauthenticated_per_ip: Option<Spanned<i64>>,
    pub message_memory: Option<Spanned<RawSize>>,
    pub min_free_disk: Option<Spanned<RawSize>>,
    pub auth_max_failures: Option<Spanned<i64>>,
    pub auth_lockout: Option<Spanned<String>>,
    pub auth_max_failures_per_user: Option<Spanned<i64>>,
    pub ipv6_prefix: Option<Spanned<i64>>,
}

/// `[delivery]`.
#[derive(Debug, Default)]
pub(crate) struct RawDelivery {
    pub max_concurrency: Option<Spanned<i64>>,
    pub per_mailbox_concurrency: Option<Spanned<i64>>,
    pub retry_initial: Option<Spanned<String>>,
    pub retry_max: Option<Spanned<String>>,
    pub max_lifetime: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub hold_retry: Option<Spanned<String>>,
    pub connection_idle_timeout: Option<Spanned<String>>,
}

/// `[listener.NAME]`.
#[derive(Debug, Default)]
pub(crate) struct RawListener {
    pub name: String,
    /// The `[listener.NAME]` header, where "missing key" errors point.
    pub header: Span,
    pub address: Option<Spanned<String>>,
    pub tls: Option<Spanned<String>>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub tls_min_version: Option<Spanned<String>>,
    pub auth: Option<Spanned<String>>,
    pub allow_networks: Option<RawList>,
    pub max_message_size: Option<Spanned<RawSize>>,
    pub max_recipients: Option<Spanned<i64>>,
    pub command_timeout: Option<Spanned<String>>,
    pub data_timeout: Option<Spanned<String>>,
    pub min_data_rate: Option<Spanned<RawSize>>,
    pub session_timeout: Option<Spanned<String>>,
    pub max_errors: Option<Spanned<i64>>,
    pub bare_lf: Option<Spanned<String>>,
}

/// `[user.NAME]`.
#[derive(Debug, Default)]
pub(crate) struct RawUser {
    pub name: String,
    pub header: Span,
    pub password_hash: Option<Spanned<String>>,
    pub may_send_as: Option<RawList>,
}

/// `[route.NAME]`.
#[derive(Debug, Default)]
pub(crate) struct RawRoute {
    pub name: String,
    pub header: Span,
    pub senders: Option<RawList>,
    pub mailbox: Option<Spanned<String>>,
    pub transport: Option<Spanned<String>>,
    pub dir: Option<Spanned<String>>,
    pub account: Option<Spanned<String>>,
    pub rate: Option<Spanned<String>>,
    pub daily_recipients: Option<Spanned<RawCount>>,
    pub rewrite_from: Option<Spanned<bool>>,
    pub save_to_sent_items: Option<Spanned<bool>>,
    pub max_message_size: Option<Spanned<RawSize>>,
}

/// A count written as a number (`10000`) or as text (`"5/3s"`, `"unlimited"`).
#[derive(Debug, Clone)]
pub(crate) enum RawCount {
    /// `10000`.
    Number(i64),
    /// `"10000/24h"`.
    Text(String),
}

/// `[account.NAME]`: every value as written; which keys fit together is `validate.rs`'s job.
#[derive(Debug, Default)]
pub(crate) struct RawAccount {
    pub name: String,
    pub header: Span,
    /// Every string-valued key with its value, in file order (`smtp_port` is the only number,
    /// `secret_expires` may be a TOML date: both are kept as text here).
    pub values: Vec<(String, Spanned<String>)>,
}

impl RawAccount {
    /// The value of `key`, if written.
    pub fn get(&self, key: &str) -> Option<&Spanned<String>> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Parse `text` into the raw mirror. Returns `None` after syntax errors: a broken document is
/// only partly recovered, and judging its remains would produce confusing follow-on errors.
pub(crate) fn parse(text: &str, c: &mut Collector<'_>) -> Option<RawConfig> {
    let (doc, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        for e in &syntax_errors {
            let span = e.span().unwrap_or(0..0);
            c.at(
                &span,
                "",
                syntax_message(e.message(), bare_word(text, span.start)),
            );
        }
        return None;
    }
    let mut raw = RawConfig::default();
    for (k, v) in entries(doc.get_ref()) {
        let key = k.get_ref().as_ref();
        match key {
            "hostname" => {
                raw.hostname = string(c, key, v, "write a host name such as \"relay.example.com\"")
            }
            "spool_dir" => {
                raw.spool_dir = string(
                    c,
                    key,
                    v,
                    "write a directory such as \"/var/spool/postern\"",
                )
            }
            "state_dir" => {
                raw.state_dir = string(c, key, v, "write a directory such as \"/var/lib/postern\"")
            }
            "limits" => {
                if let Some(t) = table(c, key, v, "[limits]") {
                    raw.limits = limits(c, t);
                }
            }
            "delivery" => {
                if let Some(t) = table(c, key, v, "[delivery]") {
                    raw.delivery = delivery(c, t);
                }
            }
            "listener" => {
                let example = "[listener.lan] with address = \"127.0.0.1:2525\"";
                let (tables, broken) = named_tables(c, key, v, example);
                raw.listener_section_broken = broken;
                for (name, header, t) in tables {
                    raw.listeners.push(listener(c, name, header, t));
                }
            }
            "user" => {
                let example = "[user.scanner] with password_hash and may_send_as";
                for (name, header, t) in named_tables(c, key, v, example).0 {
                    raw.users.push(user(c, name, header, t));
                }
            }
            "route" => {
                let example = "[route.default] with senders = [\"*\"]";
                let (tables, broken) = named_tables(c, key, v, example);
                raw.route_section_broken = broken;
                for (name, header, t) in tables {
                    raw.routes.push(route(c, name, header, t));
                }
            }
            "account" => {
                let example = "[account.contoso] with tenant, client_id and auth";
                for (name, header, t) in named_tables(c, key, v, example).0 {
                    raw.accounts.push(account(c, name, header, t));
                }
            }
            "admin" => {
                if let Some(t) = table(c, key, v, "[admin]") {
                    raw.admin = Some(admin(c, k.span(), t));
                }
            }
            _ => unknown_key(c, "", k, TOP_KEYS),
        }
    }
    Some(raw)
}

fn admin(c: &mut Collector<'_>, header: Span, t: &DeTable<'_>) -> RawAccount {
    let mut r = RawAccount {
        name: "admin".into(),
        header,
        ..RawAccount::default()
    };
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        if !ADMIN_KEYS.contains(&key) {
            unknown_key(c, "admin", k, ADMIN_KEYS);
            continue;
        }
        let fix = if key == "address" {
            "write an IP address and port such as \"127.0.0.1:9925\""
        } else {
            "write the value in quotes"
        };
        if let Some(value) = string(c, &format!("admin.{key}"), v, fix) {
            r.values.push((key.to_owned(), value));
        }
    }
    r
}

fn limits(c: &mut Collector<'_>, t: &DeTable<'_>) -> RawLimits {
    let mut r = RawLimits::default();
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("limits.{key}");
        match key {
            "max_connections" => r.max_connections = integer(c, &path, v, "200"),
            "max_connections_per_ip" => r.max_connections_per_ip = integer(c, &path, v, "20"),
            "max_unauthenticated_per_ip" => {
                r.max_unauthenticated_per_ip = integer(c, &path, v, "5")
            }
            "message_memory" => r.message_memory = size(c, &path, v, "\"64 MiB\""),
            "min_free_disk" => r.min_free_disk = size(c, &path, v, "\"100 MB\""),
            "auth_max_failures" => r.auth_max_failures = integer(c, &path, v, "5"),
            "auth_lockout" => r.auth_lockout = duration(c, &path, v, "\"15m\""),
            "auth_max_failures_per_user" => {
                r.auth_max_failures_per_user = integer(c, &path, v, "20")
            }
            "ipv6_prefix" => r.ipv6_prefix = integer(c, &path, v, "64"),
            _ => unknown_key(c, "limits", k, LIMITS_KEYS),
        }
    }
    r
}

fn delivery(c: &mut Collector<'_>, t: &DeTable<'_>) -> RawDelivery {
    let mut r = RawDelivery::default();
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("delivery.{key}");
        match key {
            "max_concurrency" => r.max_concurrency = integer(c, &path, v, "16"),
            "per_mailbox_concurrency" => r.per_mailbox_concurrency = integer(c, &path, v, "4"),
            "retry_initial" => r.retry_initial = duration(c, &path, v, "\"1m\""),
            "retry_max" => r.retry_max = duration(c, &path, v, "\"1h\""),
            "max_lifetime" => r.max_lifetime = duration(c, &path, v, "\"5d\""),
            "shutdown_grace" => r.shutdown_grace = duration(c, &path, v, "\"30s\""),
            "hold_retry" => r.hold_retry = duration(c, &path, v, "\"5m\""),
            "connection_idle_timeout" => {
                r.connection_idle_timeout = duration(c, &path, v, "\"60s\"")
            }
            _ => unknown_key(c, "delivery", k, DELIVERY_KEYS),
        }
    }
    r
}

fn listener(c: &mut Collector<'_>, name: String, header: Span, t: &DeTable<'_>) -> RawListener {
    let table = format!("listener.{}", key_name(&name));
    let mut r = RawListener {
        name,
        header,
        ..RawListener::default()
    };
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("{table}.{key}");
        let p = path.as_str();
        match key {
            "address" => {
                r.address = string(
                    c,
                    p,
                    v,
                    "write an IP address and port such as \"0.0.0.0:25\"",
                )
            }
            "tls" => r.tls = string(c, p, v, "write one of \"none\", \"starttls\", \"implicit\""),
            "tls_cert" => {
                r.tls_cert = string(
                    c,
                    p,
                    v,
                    "write a file path such as \"/etc/postern/tls/cert.pem\"",
                )
            }
            "tls_key" => {
                r.tls_key = string(
                    c,
                    p,
                    v,
                    "write a file path such as \"/etc/postern/tls/key.pem\"",
                )
            }
            "tls_min_version" => {
                r.tls_min_version = string(c, p, v, "write \"1.2\" or \"1.3\" (in quotes)")
            }
            "auth" => r.auth = string(c, p, v, "write one of \"none\", \"optional\", \"required\""),
            "allow_networks" => {
                r.allow_networks = list(c, p, v, "[\"192.168.1.0/24\", \"127.0.0.1\"]")
            }
            "max_message_size" => r.max_message_size = size(c, p, v, "\"35 MB\""),
            "max_recipients" => r.max_recipients = integer(c, p, v, "100"),
            "command_timeout" => r.command_timeout = duration(c, p, v, "\"5m\""),
            "data_timeout" => r.data_timeout = duration(c, p, v, "\"5m\""),
            "min_data_rate" => r.min_data_rate = size(c, p, v, "500"),
            "session_timeout" => r.session_timeout = duration(c, p, v, "\"30m\""),
            "max_errors" => r.max_errors = integer(c, p, v, "10"),
            "bare_lf" => r.bare_lf = string(c, p, v, "write one of \"normalize\", \"reject\""),
            _ => unknown_key(c, &table, k, LISTENER_KEYS),
        }
    }
    r
}

fn user(c: &mut Collector<'_>, name: String, header: Span, t: &DeTable<'_>) -> RawUser {
    let table = format!("user.{}", key_name(&name));
    let mut r = RawUser {
        name,
        header,
        ..RawUser::default()
    };
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("{table}.{key}");
        match key {
            "password_hash" => {
                r.password_hash = string(
                    c,
                    &path,
                    v,
                    "write the output of `postern hash-password` in quotes",
                )
            }
            "may_send_as" => {
                r.may_send_as = list(c, &path, v, "[\"scanner@example.com\", \"*@example.org\"]")
            }
            _ => unknown_key(c, &table, k, USER_KEYS),
        }
    }
    r
}

fn route(c: &mut Collector<'_>, name: String, header: Span, t: &DeTable<'_>) -> RawRoute {
    let table = format!("route.{}", key_name(&name));
    let mut r = RawRoute {
        name,
        header,
        ..RawRoute::default()
    };
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("{table}.{key}");
        match key {
            "senders" => r.senders = list(c, &path, v, "[\"*\"]"),
            "mailbox" => {
                r.mailbox = string(
                    c,
                    &path,
                    v,
                    "write a mailbox address such as \"shared@example.com\"",
                )
            }
            "transport" => {
                r.transport = string(
                    c,
                    &path,
                    v,
                    "write transport = \"smtp\", \"graph\", \"file\" or \"discard\"",
                )
            }
            "account" => {
                r.account = string(
                    c,
                    &path,
                    v,
                    "write the name of an [account.NAME] table in quotes",
                )
            }
            "dir" => {
                r.dir = string(
                    c,
                    &path,
                    v,
                    "write a directory such as \"/var/lib/postern/delivered\"",
                )
            }
            "rate" => {
                r.rate = string(
                    c,
                    &path,
                    v,
                    "write messages per period in quotes, such as \"30/min\"",
                )
            }
            "daily_recipients" => r.daily_recipients = count_or_text(c, &path, v),
            "rewrite_from" => r.rewrite_from = boolean(c, &path, v),
            "save_to_sent_items" => r.save_to_sent_items = boolean(c, &path, v),
            "max_message_size" => r.max_message_size = size(c, &path, v, "\"35 MiB\""),
            _ => unknown_key(c, &table, k, ROUTE_KEYS),
        }
    }
    r
}

fn account(c: &mut Collector<'_>, name: String, header: Span, t: &DeTable<'_>) -> RawAccount {
    let table = format!("account.{}", key_name(&name));
    let mut r = RawAccount {
        name,
        header,
        ..RawAccount::default()
    };
    for (k, v) in entries(t) {
        let key = k.get_ref().as_ref();
        let path = format!("{table}.{key}");
        if !ACCOUNT_KEYS.contains(&key) {
            unknown_key(c, &table, k, ACCOUNT_KEYS);
            continue;
        }
        let value = match (key, v.get_ref()) {
            ("smtp_port", DeValue::Integer(i)) => {
                Some(Spanned::new(v.span(), i.as_str().to_owned()))
            }
            ("smtp_port", other) => {
                c.at(
                    &v.span(),
                    &path,
                    format!("expected a port number, found {}; write a number without quotes such as 587", found(other)),
                );
                None
            }
            ("secret_expires", DeValue::Datetime(d)) => Some(Spanned::new(v.span(), d.to_string())),
            _ => string(c, &path, v, &account_fix(key)),
        };
        if let Some(value) = value {
            r.values.push((key.to_owned(), value));
        }
    }
    r
}

/// What to write for an account key given a value of the wrong type.
fn account_fix(key: &str) -> String {
    match key {
        "tenant" => "write the tenant's domain or ID such as \"contoso.onmicrosoft.com\"".into(),
        "client_id" => "write the Application (client) ID in quotes".into(),
        "cloud" => "write one of \"global\", \"usgov\", \"usgov-dod\", \"china\"".into(),
        "auth" => "write one of \"client_secret\", \"certificate\", \"delegated\"".into(),
        "secret_style" => "write \"body\" or \"basic\"".into(),
        "assertion_alg" => "write \"PS256\" or \"RS256\"".into(),
        "secret_expires" => "write a date such as 2027-01-31".into(),
        k if k.ends_with("_url") || k == "authority" || k == "proxy" => {
            "write a URL in quotes such as \"https://login.microsoftonline.com\"".into()
        }
        _ => "write the value in quotes".into(),
    }
}

type Entry<'a, 'i> = (&'a Spanned<Cow<'i, str>>, &'a Spanned<DeValue<'i>>);

/// A table's entries in file order. toml's map is sorted by key unless the `preserve_order`
/// feature is on; spans give the file order back without another dependency. File order
/// matters: routes are tried first to last, and errors should read top to bottom.
fn entries<'a, 'i>(t: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut v: Vec<Entry<'a, 'i>> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// A key as it must be written in a dotted path: bare if it can be, quoted otherwise.
pub(crate) fn key_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// How a value of the wrong type is described back to the operator.
fn found(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("the string {s:?}"),
        DeValue::Integer(i) => format!("the number {i}"),
        DeValue::Float(f) => format!("the number {f}"),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("the date {d}"),
        DeValue::Array(_) => "a list".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

fn string(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    fix: &str,
) -> Option<Spanned<String>> {
    match v.get_ref() {
        DeValue::String(s) => Some(Spanned::new(v.span(), s.to_string())),
        other => {
            c.at(
                &v.span(),
                path,
                format!("expected a string in quotes, found {}; {fix}", found(other)),
            );
            None
        }
    }
}

/// `true` or `false`, unquoted.
fn boolean(c: &mut Collector<'_>, path: &str, v: &Spanned<DeValue<'_>>) -> Option<Spanned<bool>> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(Spanned::new(v.span(), *b)),
        other => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected true or false, found {}; write true or false without quotes",
                    found(other)
                ),
            );
            None
        }
    }
}

/// A duration is a humantime string. A bare number is refused rather than guessed at (seconds?
/// minutes?), but the fix shows it with an explicit unit.
fn duration(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    example: &str,
) -> Option<Spanned<String>> {
    match v.get_ref() {
        DeValue::String(s) => Some(Spanned::new(v.span(), s.to_string())),
        DeValue::Integer(i) => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected a duration, found the number {i} (without a unit); write a duration such as \"{i}s\" or \"{i}m\""
                ),
            );
            None
        }
        other => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected a duration, found {}; write a duration such as {example}",
                    found(other)
                ),
            );
            None
        }
    }
}

fn integer(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    example: &str,
) -> Option<Spanned<i64>> {
    match v.get_ref() {
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(Spanned::new(v.span(), n)),
            Err(_) => {
                c.at(
                    &v.span(),
                    path,
                    format!("the number {i} is too large; write a whole number such as {example}"),
                );
                None
            }
        },
        other => {
            c.at(
                &v.span(),
                path,
                format!("expected a whole number, found {}; write a number without quotes such as {example}", found(other)),
            );
            None
        }
    }
}

fn size(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    example: &str,
) -> Option<Spanned<RawSize>> {
    number_or_text(
        c,
        path,
        v,
        (RawSize::Bytes, RawSize::Text),
        &format!("write a size such as {example}"),
        &format!(
            "expected a size, found {{}}; write a size such as {example} or a number of bytes"
        ),
    )
}

/// How [`number_or_text`] makes its value: from the number, from the string.
type NumberOrText<T> = (fn(i64) -> T, fn(String) -> T);

/// A value written as a whole number or as a string, made into `T` by `make`; `too_large`
/// is the fix for a number beyond i64, `wrong_type` the message for anything else (`{}`
/// stands for what was found).
fn number_or_text<T>(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    make: NumberOrText<T>,
    too_large: &str,
    wrong_type: &str,
) -> Option<Spanned<T>> {
    match v.get_ref() {
        DeValue::String(s) => Some(Spanned::new(v.span(), make.1(s.to_string()))),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(Spanned::new(v.span(), make.0(n))),
            Err(_) => {
                c.at(
                    &v.span(),
                    path,
                    format!("the number {i} is too large; {too_large}"),
                );
                None
            }
        },
        other => {
            c.at(&v.span(), path, wrong_type.replace("{}", &found(other)));
            None
        }
    }
}

/// A number, or a string the validator judges (`daily_recipients`).
fn count_or_text(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
) -> Option<Spanned<RawCount>> {
    number_or_text(
        c,
        path,
        v,
        (RawCount::Number, RawCount::Text),
        "write a number such as 10000",
        "expected a number, found {}; write a number of recipients per 24 hours such as 10000",
    )
}

/// A list of strings. A single string where a list belongs gets a fix that wraps it in brackets.
fn list(
    c: &mut Collector<'_>,
    path: &str,
    v: &Spanned<DeValue<'_>>,
    example: &str,
) -> Option<RawList> {
    match v.get_ref() {
        DeValue::Array(items) => {
            let mut out = RawList {
                span: v.span(),
                ..RawList::default()
            };
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::String(s) => out.items.push(Spanned::new(item.span(), s.to_string())),
                    other => {
                        out.had_bad_items = true;
                        c.at(
                            &item.span(),
                            path,
                            format!("expected a string in quotes, found {}; write a list of strings such as {example}", found(other)),
                        );
                    }
                }
            }
            Some(out)
        }
        DeValue::String(s) => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected a list, found the string {s:?}; write a list in brackets: [{s:?}]"
                ),
            );
            None
        }
        other => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected a list, found {}; write a list of strings such as {example}",
                    found(other)
                ),
            );
            None
        }
    }
}

fn table<'a, 'i>(
    c: &mut Collector<'_>,
    path: &str,
    v: &'a Spanned<DeValue<'i>>,
    header: &str,
) -> Option<&'a DeTable<'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(t),
        other => {
            c.at(
                &v.span(),
                path,
                format!(
                    "expected a table, found {}; write a {header} header and put its keys below it",
                    found(other)
                ),
            );
            None
        }
    }
}

/// `[listener.NAME]`-style sections: a table whose every entry is itself a table.
fn named_tables<'a, 'i>(
    c: &mut Collector<'_>,
    section: &str,
    v: &'a Spanned<DeValue<'i>>,
    example: &str,
) -> (Vec<(String, Span, &'a DeTable<'i>)>, bool) {
    let DeValue::Table(t) = v.get_ref() else {
        c.at(
            &v.span(),
            section,
            format!(
                "expected a table per {section}, found {}; write one table each, such as {example}",
                found(v.get_ref())
            ),
        );
        return (Vec::new(), true);
    };
    let mut out = Vec::new();
    let mut broken = false;
    for (k, item) in entries(t) {
        let name = k.get_ref().to_string();
        match item.get_ref() {
            DeValue::Table(inner) => out.push((name, item.span(), inner)),
            other => {
                broken = true;
                c.at(
                &k.span(),
                &format!("{section}.{}", key_name(&name)),
                format!(
                    "expected a [{section}.NAME] table, found {}; each {section} is its own table: write a header such as {example} (is a [{section}.NAME] header missing its name?)",
                    found(other)
                ),
            )
            }
        }
    }
    (out, broken)
}

/// Report an unknown key with the best fix we can find: a near spelling in this table, the
/// table where the key actually belongs, or else the list of valid keys.
fn unknown_key(c: &mut Collector<'_>, table: &str, k: &Spanned<Cow<'_, str>>, known: &[&str]) {
    let key = k.get_ref().as_ref();
    let path = if table.is_empty() {
        key_name(key)
    } else {
        format!("{table}.{}", key_name(key))
    };
    let fix = if let Some(near) = nearest(key, known) {
        c.suggested(if table.is_empty() {
            near.to_owned()
        } else {
            format!("{table}.{near}")
        });
        format!("did you mean \"{near}\"?")
    } else if let Some((home, _)) = SECTIONS
        .iter()
        .find(|(_, keys)| keys.contains(&key) && !std::ptr::eq(*keys, known))
    {
        format!("\"{key}\" belongs in {home}; move it there")
    } else {
        format!("valid keys here are {}", known.join(", "))
    };
    c.at(&k.span(), &path, format!("unknown key \"{key}\"; {fix}"));
}

/// The known key closest to `key` by edit distance, if it is close enough to be a typo
/// (or `key` is a prefix/extension of it, like `password` for `password_hash`).
pub(crate) fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key_l = key.to_ascii_lowercase();
    known
        .iter()
        .map(|&k| (edit_distance(&key_l, k), k))
        .filter(|&(d, k)| {
            d <= 2
                || d * 3 <= k.len()
                || (key_l.len() >= 4 && (k.starts_with(&key_l) || key_l.starts_with(k)))
        })
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The unquoted value starting at `offset`, if there is one (`tls = none` → `none`,
/// `allow_networks = [10.0.0.0/8]` → `10.0.0.0/8`): a word right after `=`, `[` or `,` that is
/// not a number or a boolean.
fn bare_word(text: &str, offset: usize) -> Option<&str> {
    let is_word = |ch: char| {
        ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.' | '/' | ':' | '@' | '*' | '+')
    };
    // toml may point into the middle of the word (`10.0.0.0/8` fails after `10.0`): back up.
    let head = text.get(..offset)?;
    let start = head.rfind(|ch: char| !is_word(ch)).map_or(0, |i| i + 1);
    let before = text.get(..start)?.trim_end_matches([' ', '\t']);
    if !before.ends_with(['=', '[', ',']) {
        return None;
    }
    let rest = text.get(start..)?;
    let word = &rest[..rest.find(|ch: char| !is_word(ch)).unwrap_or(rest.len())];
    let literal = word.parse::<f64>().is_ok() || matches!(word, "true" | "false" | "inf" | "nan");
    (!word.is_empty() && !literal).then_some(word)
}

/// toml's syntax messages say what the parser expected; add the usual fix for the common ones.
fn syntax_message(msg: &str, bare: Option<&str>) -> String {
    // `tls = none` makes toml talk about floats and `nan`; the real mistake is missing quotes.
    if let Some(word) = bare
        && !msg.contains("duplicate")
    {
        return format!(
            "TOML syntax error: the value {word} is not quoted; write it in double quotes: \"{word}\""
        );
    }
    let fix = if msg.contains("must be quoted") {
        "write text values in double quotes, such as tls = \"starttls\""
    } else if msg.contains("duplicate key") {
        "each key and each [table] may appear only once; remove or rename one of them"
    } else if msg.contains("string") {
        "close the string with a double quote (\")"
    } else if msg.contains("table") {
        "write table headers as [name] or [listener.NAME] on a line of their own"
    } else if msg.contains("array") {
        "write lists as [\"a\", \"b\"]"
    } else {
        "fix the TOML syntax here (see config/postern.toml for a complete example)"
    };
    format!("TOML syntax error: {msg}; {fix}")
}
