//! Prometheus metrics (prometheus-client; served as OpenMetrics text on the admin listener's
//! `/metrics`).
//!
//! Counters and histograms are fed by one-line hooks where things happen (SMTP sessions,
//! the forwarder, the upstream client, the token client); gauges that describe the state on
//! disk (queue per state, oldest message, held mailboxes, free space, days to credential
//! expiry) are set from [`crate::status`] just before each scrape.
//!
//! Label values are bounded: listeners, routes, accounts and servers come from the
//! configuration; mailboxes are the configured ones plus at most [`DYNAMIC_LABELS`] others
//! (routes that send as each sender's own mailbox), the rest count as `other`; reasons and
//! codes come from fixed sets or from status codes, also capped.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::spool::Envelope;

/// Distinct values a label may take beyond the configured ones before they count as `other`.
pub const DYNAMIC_LABELS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    stage: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteMailbox {
    route: String,
    mailbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerCode {
    server: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountCode {
    account: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxLabel {
    mailbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    account: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// Every metric postern exports.
struct Metrics {
    registry: Registry,
    received: Family<ListenerLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    connections: Family<ListenerLabel, Gauge>,
    connections_total: Family<ListenerLabel, Counter>,
    sent: Family<RouteMailbox, Counter>,
    deferred: Family<RouteMailbox, Counter>,
    failed: Family<RouteMailbox, Counter>,
    bounced: Family<RouteMailbox, Counter>,
    held: Family<RouteMailbox, Counter>,
    latency: Family<RouteLabel, Histogram>,
    attempts: Family<RouteLabel, Histogram>,
    upstream_replies: Family<ServerCode, Counter>,
    token_requests: Family<AccountLabel, Counter>,
    token_failures: Family<AccountCode, Counter>,
    queue: Family<StateLabel, Gauge>,
    oldest: Gauge,
    held_mailboxes: Gauge,
    mailbox_held: Family<MailboxLabel, Gauge>,
    credential_days: Family<CredentialLabels, Gauge>,
    tls_days: Family<ListenerLabel, Gauge>,
    spool_free: Gauge,
    forwarder_running: Gauge,
    info: Family<VersionLabel, Gauge>,
    /// Allowed label values per kind ("mailbox", "code"...): configured plus dynamic.
    labels: Mutex<HashMap<&'static str, Labels>>,
}

#[derive(Default)]
struct Labels {
    configured: HashSet<String>,
    dynamic: HashSet<String>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn latency_histogram() -> Histogram {
    // 0.25 s .. ~9 days: from a LAN round trip to a message that waited out a long outage.
    Histogram::new(exponential_buckets(0.25, 4.0, 12))
}

fn attempts_histogram() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0])
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("postern");
        let m = Metrics {
            registry: Registry::default(),
            received: Family::default(),
            refused: Family::default(),
            connections: Family::default(),
            connections_total: Family::default(),
            sent: Family::default(),
            deferred: Family::default(),
            failed: Family::default(),
            bounced: Family::default(),
            held: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            attempts: Family::new_with_constructor(attempts_histogram),
            upstream_replies: Family::default(),
            token_requests: Family::default(),
            token_failures: Family::default(),
            queue: Family::default(),
            oldest: Gauge::default(),
            held_mailboxes: Gauge::default(),
            mailbox_held: Family::default(),
            credential_days: Family::default(),
            tls_days: Family::default(),
            spool_free: Gauge::default(),
            forwarder_running: Gauge::default(),
            info: Family::default(),
            labels: Mutex::new(HashMap::new()),
        };
        let r = &mut registry;
        r.register(
            "messages_received",
            "Messages accepted (250 after DATA) per listener",
            m.received.clone(),
        );
        r.register(
            "messages_refused",
            "Client commands or messages refused, per listener, SMTP stage and reply code",
            m.refused.clone(),
        );
        r.register(
            "connections_open",
            "SMTP connections open now, per listener",
            m.connections.clone(),
        );
        r.register(
            "connections",
            "SMTP connections admitted, per listener",
            m.connections_total.clone(),
        );
        r.register(
            "messages_sent",
            "Messages accepted upstream (for some or all recipients), per route and mailbox",
            m.sent.clone(),
        );
        r.register(
            "messages_deferred",
            "Delivery attempts that ended in a retry later, per route and mailbox",
            m.deferred.clone(),
        );
        r.register(
            "messages_failed",
            "Permanent failures (a message, or one of its recipients), per route and mailbox",
            m.failed.clone(),
        );
        r.register(
            "messages_bounced",
            "Delivery status notifications queued for senders, per route and mailbox",
            m.bounced.clone(),
        );
        r.register(
            "messages_held",
            "Messages held because their mailbox's configuration is broken, per route and mailbox",
            m.held.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from acceptance to delivery upstream, per route",
            m.latency.clone(),
        );
        r.register(
            "delivery_attempts",
            "Attempts a message needed until it was delivered, per route",
            m.attempts.clone(),
        );
        r.register(
            "upstream_replies",
            "Replies from upstream servers, per server and status: the (enhanced) SMTP code, or for Microsoft Graph the HTTP status and error code (\"403 ErrorAccessDenied\")",
            m.upstream_replies.clone(),
        );
        r.register(
            "token_requests",
            "Requests to the Entra token endpoint, per account",
            m.token_requests.clone(),
        );
        r.register(
            "token_failures",
            "Failed token requests per account and AADSTS code (\"transient\" or \"local\" without one)",
            m.token_failures.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in the spool per state",
            m.queue.clone(),
        );
        r.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message in the spool (0 when empty)",
            m.oldest.clone(),
        );
        r.register(
            "held_mailboxes",
            "Mailboxes whose mail postern holds because their configuration is broken",
            m.held_mailboxes.clone(),
        );
        r.register(
            "mailbox_held",
            "1 for each mailbox postern holds (see the status page or `postern doctor` for why)",
            m.mailbox_held.clone(),
        );
        r.register(
            "credential_expiry_days",
            "Days until an account's client secret (secret_expires) or certificate expires (negative: expired)",
            m.credential_days.clone(),
        );
        r.register(
            "tls_certificate_expiry_days",
            "Days until a listener's TLS certificate expires (negative: expired)",
            m.tls_days.clone(),
        );
        r.register(
            "spool_free_bytes",
            "Free bytes on the spool's filesystem",
            m.spool_free.clone(),
        );
        r.register(
            "forwarder_running",
            "1 while the forwarder (the delivery scheduler) runs",
            m.forwarder_running.clone(),
        );
        r.register("build_info", "postern's version", m.info.clone());
        m.info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        Metrics { registry, ..m }
    }

    /// `value` if it may be a label of `kind`, else "other".
    fn bounded(&self, kind: &'static str, value: &str) -> String {
        let mut all = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        let l = all.entry(kind).or_default();
        if l.configured.contains(value) || l.dynamic.contains(value) {
            return value.to_string();
        }
        if l.dynamic.len() < DYNAMIC_LABELS {
            l.dynamic.insert(value.to_string());
            return value.to_string();
        }
        "other".into()
    }

    fn route_mailbox(&self, env: &Envelope) -> RouteMailbox {
        RouteMailbox {
            route: self.bounded("route", &env.route),
            mailbox: self.bounded("mailbox", &env.mailbox),
        }
    }
}

/// Record the configured names, so they are always label values (call at start and reload).
pub fn configure(config: &Config) {
    let m = &*METRICS;
    let mut all = m.labels.lock().unwrap_or_else(|p| p.into_inner());
    let mut set = |kind: &'static str, values: Vec<String>| {
        all.entry(kind).or_default().configured = values.into_iter().collect();
    };
    set(
        "listener",
        config.listeners.iter().map(|l| l.name.clone()).collect(),
    );
    set(
        "route",
        config.routes.iter().map(|r| r.name.clone()).collect(),
    );
    set(
        "mailbox",
        config
            .routes
            .iter()
            .filter_map(|r| r.mailbox.clone())
            .collect(),
    );
    set(
        "account",
        config.accounts.iter().map(|a| a.name.clone()).collect(),
    );
    set(
        "server",
        config
            .accounts
            .iter()
            .map(|a| format!("{}:{}", a.endpoints.smtp_host, a.endpoints.smtp_port))
            .collect(),
    );
}

/// The `code` label of a reply: its enhanced status code (`5.7.139`), else its basic code.
fn reply_code(reply: &str) -> String {
    match crate::diagnosis::first_reply(reply) {
        Some(r) => match r.esc {
            Some((a, b, c)) => format!("{a}.{b}.{c}"),
            None => r.code.to_string(),
        },
        None => reply.get(..3).unwrap_or("unknown").to_string(),
    }
}

/// An SMTP connection was admitted: counted, and open until the guard drops.
pub fn connection(listener: &str) -> ConnectionGuard {
    let m = &*METRICS;
    let label = ListenerLabel {
        listener: m.bounded("listener", listener),
    };
    m.connections_total.get_or_create(&label).inc();
    m.connections.get_or_create(&label).inc();
    ConnectionGuard(label)
}

/// Keeps a connection counted as open.
pub struct ConnectionGuard(ListenerLabel);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        METRICS.connections.get_or_create(&self.0).dec();
    }
}

/// A message was accepted on `listener`.
pub fn received(listener: &str) {
    let m = &*METRICS;
    m.received
        .get_or_create(&ListenerLabel {
            listener: m.bounded("listener", listener),
        })
        .inc();
}

/// A client's command or message was refused with `reply` at `stage`.
pub fn refused(listener: &str, stage: &str, reply: &str) {
    let m = &*METRICS;
    m.refused
        .get_or_create(&RefusedLabels {
            listener: m.bounded("listener", listener),
            stage: m.bounded("stage", stage),
            code: m.bounded("refusal", &reply_code(reply)),
        })
        .inc();
}

/// A message was accepted upstream (for some recipients at least).
pub fn sent(env: &Envelope) {
    let m = &*METRICS;
    m.sent.get_or_create(&m.route_mailbox(env)).inc();
    let route = RouteLabel {
        route: m.bounded("route", &env.route),
    };
    let age = crate::spool::now_secs().saturating_sub(env.received_at) as f64;
    m.latency.get_or_create(&route).observe(age);
    m.attempts
        .get_or_create(&route)
        .observe(f64::from(env.attempts.max(1)));
}

/// An attempt ended in "try again later".
pub fn deferred(env: &Envelope) {
    let m = &*METRICS;
    m.deferred.get_or_create(&m.route_mailbox(env)).inc();
}

/// A message (or one recipient) failed permanently.
pub fn failed(env: &Envelope) {
    let m = &*METRICS;
    m.failed.get_or_create(&m.route_mailbox(env)).inc();
}

/// A delivery status notification was queued about `original`.
pub fn bounced(original: &Envelope) {
    let m = &*METRICS;
    m.bounced.get_or_create(&m.route_mailbox(original)).inc();
}

/// A message was held for its mailbox's configuration.
pub fn held(env: &Envelope) {
    let m = &*METRICS;
    m.held.get_or_create(&m.route_mailbox(env)).inc();
}

/// An upstream SMTP server (`host:port`) answered `reply`.
pub fn upstream_reply(server: &str, reply: &str) {
    let m = &*METRICS;
    m.upstream_replies
        .get_or_create(&ServerCode {
            server: m.bounded("server", server),
            code: m.bounded("upstream_code", &reply_code(reply)),
        })
        .inc();
}

/// Microsoft Graph (`server`: the graph_url's host) answered with HTTP `status` and, for an
/// error, Graph's error `code` (`ErrorAccessDenied`). Counted with the SMTP replies, labelled
/// "403 ErrorAccessDenied" (or "202").
pub fn graph_reply(server: &str, status: u16, code: Option<&str>) {
    let m = &*METRICS;
    let label = match code {
        Some(c) => format!("{status} {c}"),
        None => status.to_string(),
    };
    m.upstream_replies
        .get_or_create(&ServerCode {
            server: m.bounded("server", server),
            code: m.bounded("upstream_code", &label),
        })
        .inc();
}

/// A token request for `account` ended; `Err` carries its AADSTS code, or "transient" /
/// "local" when it has none.
pub fn token<T>(account: &str, result: &Result<T, crate::token::TokenError>) {
    let m = &*METRICS;
    let account = m.bounded("account", account);
    m.token_requests
        .get_or_create(&AccountLabel {
            account: account.clone(),
        })
        .inc();
    if let Err(e) = result {
        let code = match (e.aadsts(), e.is_configuration()) {
            (Some(c), _) => c.to_string(),
            (None, true) => "local".into(),
            (None, false) => "transient".into(),
        };
        m.token_failures
            .get_or_create(&AccountCode {
                account,
                code: m.bounded("aadsts", &code),
            })
            .inc();
    }
}

/// Set the gauges that describe the spool and the configuration (before a scrape).
pub fn observe(s: &crate::status::Snapshot) {
    let m = &*METRICS;
    m.queue.clear();
    for (state, n) in &s.queue {
        m.queue
            .get_or_create(&StateLabel {
                state: state.to_string(),
            })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    m.oldest
        .set(i64::try_from(s.oldest_age_secs.unwrap_or(0)).unwrap_or(i64::MAX));
    m.mailbox_held.clear();
    let held: Vec<_> = s.mailboxes.iter().filter(|b| b.held.is_some()).collect();
    m.held_mailboxes
        .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
    for b in held {
        m.mailbox_held
            .get_or_create(&MailboxLabel {
                mailbox: m.bounded("mailbox", &b.mailbox),
            })
            .set(1);
    }
    m.credential_days.clear();
    for c in &s.credentials {
        if let Some(days) = c.days_left {
            m.credential_days
                .get_or_create(&CredentialLabels {
                    account: m.bounded("account", &c.account),
                    kind: c.kind.to_string(),
                })
                .set(days);
        }
    }
    m.tls_days.clear();
    for t in &s.tls {
        if let Some(days) = t.days_left {
            m.tls_days
                .get_or_create(&ListenerLabel {
                    listener: m.bounded("listener", &t.listener),
                })
                .set(days);
        }
    }
    m.spool_free
        .set(i64::try_from(s.spool_free_bytes.unwrap_or(0)).unwrap_or(i64::MAX));
    m.forwarder_running.set(i64::from(s.forwarder_running));
}

/// The OpenMetrics text of every metric.
pub fn encode() -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &METRICS.registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let m = &*METRICS;
        for i in 0..(DYNAMIC_LABELS + 50) {
            let v = m.bounded("test-kind", &format!("sender{i}@example.com"));
            if i < DYNAMIC_LABELS {
                assert_eq!(v, format!("sender{i}@example.com"));
            } else {
                assert_eq!(v, "other");
            }
        }
        // Values seen before keep their label.
        assert_eq!(
            m.bounded("test-kind", "sender0@example.com"),
            "sender0@example.com"
        );
    }

    #[test]
    fn reply_codes() {
        assert_eq!(
            reply_code("535 5.7.139 Authentication unsuccessful"),
            "5.7.139"
        );
        assert_eq!(reply_code("421 Service not available"), "421");
        assert_eq!(reply_code("250 2.6.0 <x> Queued"), "2.6.0");
    }

    #[test]
    fn graph_answers_are_counted_by_status_and_code() {
        graph_reply("graph.test:443", 403, Some("ErrorAccessDenied"));
        graph_reply("graph.test:443", 202, None);
        let text = encode();
        assert!(
            text.contains(
                "postern_upstream_replies_total{server=\"graph.test:443\",code=\"403 ErrorAccessDenied\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "postern_upstream_replies_total{server=\"graph.test:443\",code=\"202\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn encodes_open_metrics() {
        received("test-listener");
        let text = encode();
        assert!(
            text.contains("# TYPE postern_messages_received counter"),
            "{text}"
        );
        assert!(
            text.contains("postern_messages_received_total{listener=\"test-listener\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
