//! What postern knows about itself right now, in one [`Snapshot`]: the queue per state, the
//! oldest message, every mailbox with its state (flowing, retrying, held: why and the fix),
//! credential and certificate expiry, free space, and whether the forwarder and listeners
//! run. The status page, `/metrics`, `/healthz` and `postern doctor` all read it, so they
//! agree; the explanations come from [`crate::diagnosis`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::Serialize;

use crate::config::{Config, Credential, TlsMode};
use crate::diagnosis;
use crate::spool::{Spool, State, now_secs};

/// Whether the daemon's parts run, shared between the daemon and the admin listener.
#[derive(Debug, Default)]
pub struct Liveness {
    forwarder: AtomicBool,
    listeners: AtomicUsize,
    expected_listeners: AtomicUsize,
    ready: AtomicBool,
    stopping: AtomicBool,
}

/// Marks a part as running until dropped (also when its task panics).
pub struct Running(Arc<Liveness>, Part);

#[derive(Clone, Copy)]
enum Part {
    Forwarder,
    Listener,
}

impl Drop for Running {
    fn drop(&mut self) {
        match self.1 {
            Part::Forwarder => self.0.forwarder.store(false, Ordering::SeqCst),
            Part::Listener => {
                self.0.listeners.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Liveness {
    /// A new, shared record: nothing runs yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The forwarder runs while the guard lives.
    pub fn forwarder(self: &Arc<Self>) -> Running {
        self.forwarder.store(true, Ordering::SeqCst);
        Running(self.clone(), Part::Forwarder)
    }

    /// One listener accepts connections while the guard lives.
    pub fn listener(self: &Arc<Self>) -> Running {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        Running(self.clone(), Part::Listener)
    }

    /// How many listeners the current configuration has.
    pub fn expect_listeners(&self, n: usize) {
        self.expected_listeners.store(n, Ordering::SeqCst);
    }

    /// Start-up finished (spool recovered, listeners bound).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Shutting down: no longer ready for new mail.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Is the forwarder running?
    pub fn forwarder_running(&self) -> bool {
        self.forwarder.load(Ordering::SeqCst)
    }

    /// (listeners accepting, listeners configured).
    pub fn listeners(&self) -> (usize, usize) {
        (
            self.listeners.load(Ordering::SeqCst),
            self.expected_listeners.load(Ordering::SeqCst),
        )
    }

    /// Ready and not stopping.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst)
    }

    /// What is wrong with the process, if anything (for `/healthz`).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.forwarder_running() {
            p.push("the forwarder (delivery scheduler) is not running: no mail goes out; restart postern and report the error logged before".to_string());
        }
        let (up, want) = self.listeners();
        if self.ready.load(Ordering::SeqCst) && up < want {
            p.push(format!(
                "only {up} of {want} SMTP listeners accept connections"
            ));
        }
        if self.stopping.load(Ordering::SeqCst) {
            p.push("postern is shutting down".into());
        }
        p
    }
}

/// A mailbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxState {
    /// Nothing waits (or only new mail).
    Flowing,
    /// Some mail waits for a retry after a temporary error.
    Retrying,
    /// Its mail waits its turn: the route's pacing (`rate`, `daily_recipients`) or an
    /// upstream's throttle (`SubmissionQuotaExceeded`, `Retry-After`); nothing failed.
    Paced,
    /// postern holds its mail: its configuration is broken.
    Held,
}

/// Why a mailbox is held, and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    /// The hold reason as recorded (the upstream's reply and postern's advice).
    pub reason: String,
    /// The diagnosis entry it matches, if any.
    pub entry: Option<&'static str>,
    /// That entry's title.
    pub title: Option<&'static str>,
    /// What to do (from the diagnosis table, filled in for this mailbox).
    pub fix: Option<String>,
    /// Messages held.
    pub messages: usize,
    /// The oldest held message (to release first after the fix).
    pub oldest_id: String,
}

/// One mailbox postern sends as.
#[derive(Debug, Clone, Serialize)]
pub struct MailboxStatus {
    /// The address.
    pub mailbox: String,
    /// Routes that send as it (configured), or the route of its queued mail.
    pub routes: Vec<String>,
    /// Its state.
    pub state: MailboxState,
    /// Messages waiting (incoming, deferred, held).
    pub waiting: usize,
    /// Why it is held, when it is.
    pub held: Option<Held>,
    /// The most recent error of its waiting mail.
    pub last_error: Option<String>,
    /// Why its mail waits without having failed, and until when, as `queue list` shows it
    /// (`paced: 30/min for scanner@contoso.com, next at 2026-01-31 10:42:05 UTC`).
    pub paced: Option<String>,
}

/// An account's client secret or certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialStatus {
    /// The account.
    pub account: String,
    /// "client_secret", "certificate" or "refresh_token".
    pub kind: &'static str,
    /// What (a file, a mailbox).
    pub what: String,
    /// Expiry, seconds since the epoch, when known.
    pub expires_at: Option<i64>,
    /// Whole days left (negative: expired).
    pub days_left: Option<i64>,
    /// Why it could not be read.
    pub problem: Option<String>,
}

/// A listener's TLS certificate.
#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    /// The listener.
    pub listener: String,
    /// The certificate file.
    pub cert: String,
    /// Whole days left (negative: expired).
    pub days_left: Option<i64>,
    /// Why it could not be read.
    pub problem: Option<String>,
}

/// Everything at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When (seconds since the epoch).
    pub at: u64,
    /// Host name.
    pub hostname: String,
    /// Messages per state (incoming, active, deferred, hold, failed, corrupt).
    pub queue: Vec<(&'static str, usize)>,
    /// Age of the oldest queued message.
    pub oldest_age_secs: Option<u64>,
    /// Its id.
    pub oldest_id: Option<String>,
    /// Every mailbox, configured or with queued mail.
    pub mailboxes: Vec<MailboxStatus>,
    /// Secrets, certificates and refresh tokens.
    pub credentials: Vec<CredentialStatus>,
    /// Listener certificates.
    pub tls: Vec<TlsStatus>,
    /// Free bytes on the spool's filesystem.
    pub spool_free_bytes: Option<u64>,
    /// The forwarder runs.
    pub forwarder_running: bool,
    /// Problems of the process itself (`/healthz`).
    pub problems: Vec<String>,
}

/// Days from now until `at` (epoch seconds), rounded down (negative when past).
pub fn days_until(at: i64, now: u64) -> i64 {
    (at - i64::try_from(now).unwrap_or(i64::MAX)).div_euclid(86_400)
}

/// Read the spool and the configuration. `detail` also reads every waiting message's
/// envelope for its last error (the status page, `doctor`); without it only held messages
/// are read (a scrape).
pub fn collect(spool: &Spool, config: &Config, live: Option<&Liveness>, detail: bool) -> Snapshot {
    let now = now_secs();
    let mut queue = Vec::new();
    let mut oldest: Option<String> = None;
    for s in State::QUEUED {
        let ids = spool.ids(s).unwrap_or_default();
        if let Some(first) = ids.first()
            && oldest.as_ref().is_none_or(|o| first < o)
        {
            oldest = Some(first.clone());
        }
        queue.push((s.dir(), ids.len()));
    }
    let corrupt = std::fs::read_dir(spool.state_dir(State::Corrupt))
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0);
    queue.push((State::Corrupt.dir(), corrupt));
    let oldest_age_secs = oldest.as_ref().and_then(|id| {
        State::QUEUED.iter().find_map(|s| {
            spool
                .read_envelope(*s, id)
                .ok()
                .map(|e| now.saturating_sub(e.received_at))
        })
    });

    // Mailboxes: the configured ones, then whatever queued mail is for.
    let mut boxes: BTreeMap<String, MailboxStatus> = BTreeMap::new();
    for r in &config.routes {
        if let Some(m) = &r.mailbox {
            let b = boxes
                .entry(m.to_ascii_lowercase())
                .or_insert_with(|| new_box(m));
            b.routes.push(r.name.clone());
        }
    }
    let read = |state: State, boxes: &mut BTreeMap<String, MailboxStatus>| {
        for id in spool.ids(state).unwrap_or_default() {
            let Ok(env) = spool.read_envelope(state, &id) else {
                continue;
            };
            let b = boxes
                .entry(env.mailbox.to_ascii_lowercase())
                .or_insert_with(|| new_box(&env.mailbox));
            if !b.routes.contains(&env.route) {
                b.routes.push(env.route.clone());
            }
            b.waiting += 1;
            if state == State::Hold && env.auto_hold {
                let reason = env.hold_reason.clone().unwrap_or_default();
                let held = b.held.get_or_insert_with(|| Held {
                    reason: reason.clone(),
                    entry: None,
                    title: None,
                    fix: None,
                    messages: 0,
                    oldest_id: id.clone(),
                });
                held.messages += 1;
            }
            if state == State::Deferred && b.state == MailboxState::Flowing {
                b.state = MailboxState::Retrying;
            }
            if let Some(e) = env.last_error.or(env.hold_reason) {
                b.last_error = Some(e);
            }
        }
    };
    read(State::Hold, &mut boxes);
    if detail {
        read(State::Deferred, &mut boxes);
        read(State::Incoming, &mut boxes);
    } else {
        for id in spool.ids(State::Deferred).unwrap_or_default() {
            if let Ok(env) = spool.read_envelope(State::Deferred, &id)
                && let Some(b) = boxes.get_mut(&env.mailbox.to_ascii_lowercase())
                && b.state == MailboxState::Flowing
            {
                b.state = MailboxState::Retrying;
            }
        }
    }
    // Pacing and throttles, from the forwarder's state file (what `queue list` shows too).
    let saved = crate::forward::state::load(&config.state_dir).unwrap_or_default();
    let now_ms = now.saturating_mul(1000);
    for (mailbox, m) in &saved.mailboxes {
        let note = m
            .waiting
            .iter()
            .chain(m.blocked.iter())
            .filter(|n| n.until > now_ms)
            .max_by_key(|n| n.until);
        if let Some(n) = note {
            let b = boxes
                .entry(mailbox.to_ascii_lowercase())
                .or_insert_with(|| new_box(mailbox));
            b.paced = Some(format!(
                "{}, next at {}",
                n.why,
                crate::forward::fmt_ms(n.until)
            ));
            if b.state != MailboxState::Held {
                b.state = MailboxState::Paced;
            }
        }
    }
    for b in boxes.values_mut() {
        if let Some(h) = &mut b.held {
            b.state = MailboxState::Held;
            let vars = crate::explain::vars_for(config, &b.mailbox).set("queue_id", &h.oldest_id);
            if let Some(m) = diagnosis::diagnose(&diagnosis::evidence(&h.reason)).first() {
                h.entry = Some(m.entry.id);
                h.title = Some(m.entry.title);
                h.fix = Some(diagnosis::advice(m.entry.id, &vars));
            }
        }
    }

    Snapshot {
        at: now,
        hostname: config.hostname.clone(),
        queue,
        oldest_age_secs,
        oldest_id: oldest,
        mailboxes: boxes.into_values().collect(),
        credentials: credentials(config, now),
        tls: tls(config, now),
        spool_free_bytes: spool.free_bytes().ok(),
        forwarder_running: live.is_some_and(Liveness::forwarder_running),
        problems: live.map(Liveness::problems).unwrap_or_default(),
    }
}

fn new_box(mailbox: &str) -> MailboxStatus {
    MailboxStatus {
        mailbox: mailbox.to_string(),
        routes: Vec::new(),
        state: MailboxState::Flowing,
        waiting: 0,
        held: None,
        last_error: None,
        paced: None,
    }
}

fn cert_days(path: &Path, now: u64) -> (Option<i64>, Option<i64>, Option<String>) {
    match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| crate::token::assertion::parse_cert(&pem).map_err(|e| e.to_string()))
    {
        Ok((_, not_after, _)) => (Some(not_after), Some(days_until(not_after, now)), None),
        Err(e) => (
            None,
            None,
            Some(format!("cannot read {}: {e}", path.display())),
        ),
    }
}

/// Client secrets (by `secret_expires`), certificates, and delegated refresh tokens (which
/// expire after 90 days unused).
pub fn credentials(config: &Config, now: u64) -> Vec<CredentialStatus> {
    let mut out = Vec::new();
    let files = crate::token::files::TokenFiles::new(&config.state_dir);
    for a in &config.accounts {
        match &a.credential {
            Credential::ClientSecret { expires, .. } => {
                let at = expires.and_then(|e| i64::try_from(e).ok());
                out.push(CredentialStatus {
                    account: a.name.clone(),
                    kind: "client_secret",
                    what: "client secret (secret_expires)".into(),
                    expires_at: at,
                    days_left: at.map(|t| days_until(t, now)),
                    problem: None,
                });
            }
            Credential::Certificate { cert, .. } => {
                let (at, days, problem) = cert_days(cert, now);
                out.push(CredentialStatus {
                    account: a.name.clone(),
                    kind: "certificate",
                    what: cert.display().to_string(),
                    expires_at: at,
                    days_left: days,
                    problem,
                });
            }
            Credential::Delegated { .. } => {
                for t in files.list(&a.name).unwrap_or_default() {
                    let at = i64::try_from(t.saved_at + 90 * 86_400).ok();
                    out.push(CredentialStatus {
                        account: a.name.clone(),
                        kind: "refresh_token",
                        what: format!("{} ({})", t.mailbox, t.audience),
                        expires_at: at,
                        days_left: at.map(|x| days_until(x, now)),
                        problem: None,
                    });
                }
            }
        }
    }
    out
}

/// The certificates of TLS listeners.
pub fn tls(config: &Config, now: u64) -> Vec<TlsStatus> {
    config
        .listeners
        .iter()
        .filter(|l| l.tls != TlsMode::None)
        .filter_map(|l| {
            let f = l.tls_files.as_ref()?;
            let (_, days, problem) = cert_days(&f.cert, now);
            Some(TlsStatus {
                listener: l.name.clone(),
                cert: f.cert.display().to_string(),
                days_left: days,
                problem,
            })
        })
        .collect()
}

/// The part of a hold reason that says what happened (the upstream's reply, quoted), without
/// the advice postern appended: the diagnosis gives that, in full.
pub fn reason_summary(reason: &str) -> &str {
    let end = reason
        .find("\". ")
        .map(|i| i + 1)
        .or_else(|| reason.find(" postern pauses this mailbox"))
        .unwrap_or(reason.len());
    reason[..end].trim_end()
}

/// A short advice line for a held mailbox: the table's title and fix, else the reason.
pub fn held_line(h: &Held) -> String {
    match (&h.title, &h.fix) {
        (Some(t), Some(f)) => format!("{t}: {f}"),
        _ => h.reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_keep_the_reply() {
        assert_eq!(
            reason_summary(
                "h:587 answered AUTH with \"535 5.7.139 x\". Exchange says... postern pauses this mailbox"
            ),
            "h:587 answered AUTH with \"535 5.7.139 x\""
        );
        assert_eq!(
            reason_summary("no token. postern pauses this mailbox and"),
            "no token."
        );
    }

    #[test]
    fn days_round_down() {
        assert_eq!(days_until(86_400 * 10 + 5, 0), 10);
        assert_eq!(days_until(0, 1), -1);
        assert_eq!(days_until(86_400, 86_400), 0);
    }

    #[test]
    fn liveness_guards_clear_on_drop() {
        let l = Liveness::new();
        l.expect_listeners(1);
        let f = l.forwarder();
        let li = l.listener();
        l.set_ready();
        assert!(l.problems().is_empty());
        drop(li);
        assert_eq!(l.problems().len(), 1);
        drop(f);
        assert!(!l.forwarder_running());
        assert_eq!(l.problems().len(), 2);
    }
}
