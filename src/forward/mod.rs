//! The forwarder: one scheduler task (like Postfix's qmgr) that claims due messages and runs
//! a bounded number of deliveries, limited per mailbox as well as overall.
//!
//! It is woken at once by every commit (the spool's channel of new ids), by the admin's queue
//! commands (the control socket), and by the earliest `next_attempt` of deferred mail; a slow
//! periodic rescan catches anything else that changed on disk.
//!
//! A `Held` outcome means our configuration is wrong for that mailbox (credentials, consent,
//! SMTP AUTH disabled...). The mailbox is then *paused*: its waiting messages go to `hold/`
//! without an attempt and without spending their retries. Every `hold_retry` one held message
//! is tried again (the probe); when a probe is not held again, the mailbox is released and all
//! its held messages are queued at once, so mail flows again by itself once the admin fixes
//! the cause. An admin's `queue release`/`retry` makes the next probe immediate.

pub mod bounce;
pub mod retry;
pub mod worker;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, TransportConfig};
use crate::maillog;
use crate::spool::{Spool, SpoolError, State, now_secs};
use crate::token::TokenSource;
use crate::upstream::file::FileTransport;
use crate::upstream::smtp::SmtpTransport;
use crate::upstream::{Discard, Transport, Unavailable};
pub use worker::{Next, RetryPolicy};

/// How often the whole queue is rescanned even without a wake-up.
const RESCAN: Duration = Duration::from_secs(30);

/// Everything the forwarder takes from the configuration; replaced on reload.
#[derive(Clone)]
pub struct Plan {
    /// Transports by route name.
    pub routes: HashMap<String, Arc<dyn Transport>>,
    /// The configuration they came from (for re-routing messages whose route vanished).
    pub config: Arc<Config>,
}

impl Plan {
    /// Build the transports for every route of `config`; Microsoft transports get their
    /// tokens from `tokens`.
    pub fn from_config(config: Arc<Config>, tokens: Arc<dyn TokenSource>) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let t: Arc<dyn Transport> = match &r.transport {
                    TransportConfig::File { dir } => Arc::new(FileTransport::new(dir.clone())),
                    TransportConfig::Smtp { account } => smtp_transport(&config, account, &tokens),
                    TransportConfig::Discard => Arc::new(Discard),
                };
                (r.name.clone(), t)
            })
            .collect();
        Self { routes, config }
    }

    /// The transport for a message routed through `route` (or, if that route was removed by a
    /// reload, through whichever route now accepts `sender`).
    fn transport_for(&self, route: &str, sender: &str) -> Option<Arc<dyn Transport>> {
        self.routes
            .get(route)
            .or_else(|| {
                self.config
                    .route_for(sender)
                    .and_then(|r| self.routes.get(&r.name))
            })
            .cloned()
    }
}

/// The XOAUTH2 transport of a route; one that cannot be built holds its messages with the
/// reason (config validation makes that rare: e.g. a CA file that vanished since `check`).
fn smtp_transport(
    config: &Config,
    account: &str,
    tokens: &Arc<dyn TokenSource>,
) -> Arc<dyn Transport> {
    let Some(acc) = config.account(account) else {
        return Arc::new(Unavailable(format!(
            "account \"{account}\" is not configured"
        )));
    };
    match SmtpTransport::new(acc, tokens.clone(), config.hostname.clone()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            error!(account, error = %e, "the smtp transport cannot be set up; its messages are held");
            Arc::new(Unavailable(e.to_string()))
        }
    }
}

/// Handle used by the daemon to wake the forwarder.
#[derive(Clone, Default)]
pub struct Kick(Arc<Notify>);

impl Kick {
    /// Ask the forwarder to rescan the queue now.
    pub fn kick(&self) {
        self.0.notify_one();
    }
}

/// A mailbox whose deliveries are paused because its configuration is broken.
#[derive(Debug)]
struct Pause {
    /// What is wrong and how to fix it (from the `Held` outcome).
    reason: String,
    /// When the next probe may start.
    next_probe: Instant,
    /// The message currently being tried as the probe.
    probe: Option<String>,
}

/// The scheduler.
pub struct Forwarder {
    spool: Spool,
    plan: watch::Receiver<Plan>,
    new_ids: mpsc::UnboundedReceiver<String>,
    kick: Kick,
    shutdown: CancellationToken,
    ready: VecDeque<String>,
    deferred: BinaryHeap<Reverse<(u64, String)>>,
    known: HashSet<String>,
    waiting: HashMap<String, VecDeque<String>>,
    busy_mailboxes: HashMap<String, usize>,
    paused: HashMap<String, Pause>,
    /// Ids of the deliveries in `running`.
    in_flight: HashSet<String>,
    /// (queue id, mailbox) of each delivery task, so a task that panicked is still accounted for.
    tasks: HashMap<tokio::task::Id, (String, String)>,
    running: JoinSet<Option<Next>>,
}

impl Forwarder {
    /// Create the forwarder; `new_ids` is the spool's commit channel.
    pub fn new(
        spool: Spool,
        plan: watch::Receiver<Plan>,
        new_ids: mpsc::UnboundedReceiver<String>,
        kick: Kick,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            spool,
            plan,
            new_ids,
            kick,
            shutdown,
            ready: VecDeque::new(),
            deferred: BinaryHeap::new(),
            known: HashSet::new(),
            waiting: HashMap::new(),
            busy_mailboxes: HashMap::new(),
            paused: HashMap::new(),
            in_flight: HashSet::new(),
            tasks: HashMap::new(),
            running: JoinSet::new(),
        }
    }

    /// Run until shutdown; then wait for in-flight deliveries (the caller bounds that wait).
    pub async fn run(mut self) {
        self.rescan();
        loop {
            self.dispatch();
            let next_due = self.deferred.peek().map(|Reverse((t, _))| *t);
            let mut sleep_for = match next_due {
                Some(t) => Duration::from_secs(t.saturating_sub(now_secs())).min(RESCAN),
                None => RESCAN,
            };
            if let Some(p) = self
                .paused
                .values()
                .filter(|p| p.probe.is_none())
                .map(|p| p.next_probe)
                .min()
            {
                sleep_for = sleep_for.min(p.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(id) = self.new_ids.recv() => {
                    if self.known.insert(id.clone()) {
                        self.ready.push_back(id);
                    }
                }
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.joined(done);
                }
                _ = self.kick.0.notified() => {
                    // The admin changed the queue (release, retry): try paused mailboxes now.
                    let now = Instant::now();
                    for p in self.paused.values_mut() {
                        p.next_probe = now;
                    }
                    self.rescan();
                }
                _ = tokio::time::sleep(sleep_for) => {
                    if next_due.is_none_or(|t| t > now_secs()) {
                        self.rescan();
                    } else {
                        self.promote_due();
                        self.start_probes();
                    }
                }
            }
        }
        // Let in-flight deliveries finish; the daemon bounds this with shutdown_grace.
        while let Some(done) = self.running.join_next_with_id().await {
            self.joined(done);
        }
    }

    /// A delivery task ended (or panicked: a bug, logged; its message stays in active/ until
    /// the next start, and its mailbox's slot is freed).
    fn joined(&mut self, done: Result<(tokio::task::Id, Option<Next>), tokio::task::JoinError>) {
        let (task, next) = match done {
            Ok((task, next)) => (task, next),
            Err(e) => {
                error!(error = %e, "delivery task panicked");
                (e.id(), None)
            }
        };
        if let Some((id, mailbox)) = self.tasks.remove(&task) {
            self.finished(&id, &mailbox, next);
        }
    }

    fn max_concurrency(&self) -> (usize, usize) {
        let d = &self.plan.borrow().config.delivery;
        (d.max_concurrency.max(1), d.per_mailbox_concurrency.max(1))
    }

    /// Re-read the queue directories: new incoming mail and every deferred message's due time.
    fn rescan(&mut self) {
        self.ready.clear();
        self.deferred.clear();
        self.waiting.clear();
        self.known = self.in_flight.clone();
        match self.spool.ids(State::Incoming) {
            Ok(ids) => {
                for id in ids {
                    if self.known.insert(id.clone()) {
                        self.ready.push_back(id);
                    }
                }
            }
            Err(e) => error!(error = %e, "cannot list incoming/"),
        }
        match self.spool.ids(State::Deferred) {
            Ok(ids) => {
                for id in ids {
                    if self.known.contains(&id) {
                        continue;
                    }
                    let due = self
                        .spool
                        .read_envelope(State::Deferred, &id)
                        .ok()
                        .and_then(|e| e.next_attempt)
                        .unwrap_or(0);
                    self.known.insert(id.clone());
                    self.deferred.push(Reverse((due, id)));
                }
            }
            Err(e) => error!(error = %e, "cannot list deferred/"),
        }
        self.promote_due();
        self.start_probes();
    }

    /// Messages postern itself held, per mailbox, oldest first.
    fn auto_held(&self) -> HashMap<String, Vec<(String, String)>> {
        let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for id in self.spool.ids(State::Hold).unwrap_or_default() {
            if let Ok(env) = self.spool.read_envelope(State::Hold, &id)
                && env.auto_hold
            {
                out.entry(env.mailbox)
                    .or_default()
                    .push((id, env.hold_reason.unwrap_or_default()));
            }
        }
        out
    }

    /// For every paused mailbox whose probe is due (and mailboxes found held on disk, e.g.
    /// after a restart), queue its oldest held message as the probe.
    fn start_probes(&mut self) {
        let now = Instant::now();
        for (mailbox, held) in self.auto_held() {
            let pause = self.paused.entry(mailbox.clone()).or_insert_with(|| Pause {
                reason: held.first().map(|(_, r)| r.clone()).unwrap_or_default(),
                next_probe: now,
                probe: None,
            });
            if !(pause.probe.is_none() && pause.next_probe <= now) {
                continue;
            }
            let Some((id, _)) = held.first() else {
                continue;
            };
            match self.spool.requeue(id) {
                Ok(_) => {
                    info!(mailbox = %mailbox, queue_id = %id, "retrying one held message to see whether the mailbox works again");
                    pause.probe = Some(id.clone());
                    if self.known.insert(id.clone()) {
                        self.ready.push_back(id.clone());
                    }
                }
                Err(e) => {
                    warn!(mailbox = %mailbox, queue_id = %id, error = %e, "cannot requeue held message for a retry")
                }
            }
        }
    }

    fn promote_due(&mut self) {
        let now = now_secs();
        while let Some(Reverse((t, _))) = self.deferred.peek() {
            if *t > now {
                break;
            }
            if let Some(Reverse((_, id))) = self.deferred.pop() {
                self.ready.push_back(id);
            }
        }
    }

    fn dispatch(&mut self) {
        let (max, per_mailbox) = self.max_concurrency();
        while self.running.len() < max {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            // The message is in incoming/ or (when due) deferred/; read it where it is.
            let from = if self.spool.msg_path(State::Incoming, &id).is_file() {
                State::Incoming
            } else {
                State::Deferred
            };
            let env = match self.spool.read_envelope(from, &id) {
                Ok(e) => e,
                Err(SpoolError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    self.known.remove(&id); // moved by the admin meanwhile
                    continue;
                }
                Err(e) => {
                    warn!(queue_id = %id, error = %e, "cannot read envelope; leaving the message for the next rescan");
                    self.known.remove(&id);
                    continue;
                }
            };
            if let Some(p) = self.paused.get_mut(&env.mailbox) {
                let is_probe = p.probe.as_deref() == Some(id.as_str());
                let probe_due = p.probe.is_none() && p.next_probe <= Instant::now();
                if !(is_probe || probe_due) {
                    let reason = format!("mailbox {} is paused: {}", env.mailbox, p.reason);
                    match self.spool.auto_hold(&id, from, &reason) {
                        Ok(()) => maillog::held(&id, &env.mailbox, &reason),
                        Err(e) => {
                            warn!(queue_id = %id, error = %e, "cannot hold message of a paused mailbox")
                        }
                    }
                    self.known.remove(&id);
                    continue;
                }
                p.probe = Some(id.clone());
            }
            let busy = self.busy_mailboxes.get(&env.mailbox).copied().unwrap_or(0);
            if busy >= per_mailbox {
                self.waiting.entry(env.mailbox).or_default().push_back(id);
                continue;
            }
            if let Err(e) = self.spool.claim(&id, from) {
                if !matches!(e, SpoolError::NotFound(_)) {
                    warn!(queue_id = %id, error = %e, "cannot claim message");
                }
                self.known.remove(&id);
                continue;
            }
            *self.busy_mailboxes.entry(env.mailbox.clone()).or_default() += 1;
            let plan = self.plan.borrow().clone();
            let transport = plan.transport_for(&env.route, &env.sender);
            let d = &plan.config.delivery;
            let policy = RetryPolicy {
                initial: d.retry_initial,
                max: d.retry_max,
                lifetime: d.max_lifetime,
            };
            let spool = self.spool.clone();
            let mailbox = env.mailbox;
            self.in_flight.insert(id.clone());
            let queue_id = id.clone();
            let hostname = plan.config.hostname.clone();
            let task = self.running.spawn(async move {
                match worker::attempt(&spool, &queue_id, transport, policy, &hostname).await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        error!(queue_id = %queue_id, error = %e, "delivery bookkeeping failed; the message stays in active/ until restart");
                        None
                    }
                }
            });
            self.tasks.insert(task.id(), (id, mailbox));
        }
    }

    fn finished(&mut self, id: &str, mailbox: &str, next: Option<Next>) {
        self.known.remove(id);
        self.in_flight.remove(id);
        self.after_attempt(id, mailbox, next.as_ref());
        if let Some(n) = self.busy_mailboxes.get_mut(mailbox) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.busy_mailboxes.remove(mailbox);
            }
        }
        // One slot of this mailbox is free: its longest-waiting message goes first.
        if let Some(q) = self.waiting.get_mut(mailbox) {
            if let Some(next) = q.pop_front() {
                self.ready.push_front(next);
            }
            if q.is_empty() {
                self.waiting.remove(mailbox);
            }
        }
        // Deferred messages are in the heap with their due time; re-read on the next rescan.
        if self.spool.msg_path(State::Deferred, id).is_file()
            && let Ok(env) = self.spool.read_envelope(State::Deferred, id)
        {
            self.known.insert(id.to_string());
            self.deferred
                .push(Reverse((env.next_attempt.unwrap_or(0), id.to_string())));
        }
    }
}

#[cfg(test)]
mod tests;

impl Forwarder {
    /// Pause or release the mailbox according to the attempt's result.
    fn after_attempt(&mut self, id: &str, mailbox: &str, next: Option<&Next>) {
        let hold_retry = self.plan.borrow().config.delivery.hold_retry;
        match next {
            Some(Next::Held) => {
                let reason = self
                    .spool
                    .read_envelope(State::Hold, id)
                    .ok()
                    .and_then(|e| e.hold_reason)
                    .unwrap_or_else(|| "configuration problem".into());
                let p = self.paused.entry(mailbox.to_string()).or_insert_with(|| {
                    warn!(
                        mailbox,
                        reason = %reason,
                        retry_in = %humantime::format_duration(hold_retry),
                        "mailbox paused: its messages are held (retries not spent) until this is fixed"
                    );
                    Pause { reason: reason.clone(), next_probe: Instant::now(), probe: None }
                });
                p.reason = reason;
                if p.probe.as_deref() == Some(id) || p.probe.is_none() {
                    p.probe = None;
                    p.next_probe = Instant::now() + hold_retry;
                }
            }
            Some(_) => {
                let was_probe = self
                    .paused
                    .get(mailbox)
                    .is_some_and(|p| p.probe.as_deref() == Some(id));
                if was_probe {
                    self.paused.remove(mailbox);
                    let mut n = 0;
                    for (held_id, _) in self.auto_held().remove(mailbox).unwrap_or_default() {
                        if self.spool.requeue(&held_id).is_ok() {
                            maillog::released(&held_id);
                            if self.known.insert(held_id.clone()) {
                                self.ready.push_back(held_id);
                            }
                            n += 1;
                        }
                    }
                    info!(
                        mailbox,
                        released = n,
                        "mailbox works again: held messages queued for delivery"
                    );
                }
            }
            None => {
                if let Some(p) = self.paused.get_mut(mailbox)
                    && p.probe.as_deref() == Some(id)
                {
                    p.probe = None;
                    p.next_probe = Instant::now() + hold_retry;
                }
            }
        }
    }
}
