//! The forwarder: one scheduler task (like Postfix's qmgr) that claims due messages and runs
//! a bounded number of deliveries, limited per mailbox as well as overall.
//!
//! It is woken at once by every commit (the spool's channel of new ids), by the admin's queue
//! commands (the control socket), by the earliest `next_attempt` of deferred mail, and by the
//! end of a mailbox's wait; a slow periodic rescan catches anything else that changed on disk.
//!
//! Per mailbox it keeps, in this order of precedence:
//! - **holds** ([`hold`]): our configuration is wrong for the mailbox, or for its mail from one
//!   address (Send As). Covered messages go to `hold/` without an attempt and without spending
//!   their retries; one of them is probed every `hold_retry`, and all are released when a
//!   probe gets through, so mail flows again by itself once the admin fixes the cause.
//! - **waits**: the upstream throttled the mailbox ([`Outcome::Throttled`]:
//!   `SubmissionQuotaExceeded`, `5.2.25x`, Graph's `Retry-After`), or the route's pacing
//!   ([`pacing`]: `rate`, `daily_recipients`) says its next message must wait. Its messages
//!   stay queued, in order, and start when the wait is over; nothing is sent early, nothing
//!   bounces, and no attempt is spent. `postern queue list` shows why (from [`state`]).
//! - **concurrency**: at most `per_mailbox_concurrency` deliveries at once (one, after a
//!   throttle, until a delivery is not throttled again).
//!
//! [`Outcome::Throttled`]: crate::upstream::Outcome::Throttled

pub mod bounce;
pub mod hold;
pub mod pacing;
pub mod retry;
pub mod state;
pub mod worker;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Pacing, TransportConfig};
use crate::maillog;
use crate::spool::{Envelope, Spool, SpoolError, State, now_secs};
use crate::token::TokenSource;
use crate::upstream::file::FileTransport;
use crate::upstream::graph::GraphTransport;
use crate::upstream::rewrite::RewriteFrom;
use crate::upstream::smtp::{ConnectionPool, ReuseSettings, SmtpTransport};
use crate::upstream::{Discard, HoldScope, Transport, Unavailable};
use hold::{HoldKey, Pause};
use pacing::{Pacer, Wait, now_ms};
pub use worker::{Next, Report, RetryPolicy};

/// How often the whole queue is rescanned even without a wake-up.
const RESCAN: Duration = Duration::from_secs(30);
/// The state file is rewritten at most this often.
const STATE_FLUSH: Duration = Duration::from_secs(1);

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
        // One pool for every SMTP route, so a mailbox two routes send as still has at most
        // per_mailbox_concurrency connections open.
        let pool = ConnectionPool::new(ReuseSettings {
            idle: config.delivery.connection_idle_timeout,
            per_mailbox: config.delivery.per_mailbox_concurrency,
            ..ReuseSettings::default()
        });
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let t: Arc<dyn Transport> = match &r.transport {
                    TransportConfig::File { dir } => Arc::new(FileTransport::new(dir.clone())),
                    TransportConfig::Smtp { account } => {
                        smtp_transport(&config, account, &tokens, &pool)
                    }
                    TransportConfig::Graph {
                        account,
                        save_to_sent_items,
                        max_message_size,
                    } => graph_transport(
                        &config,
                        account,
                        *save_to_sent_items,
                        *max_message_size,
                        &tokens,
                    ),
                    TransportConfig::Discard => Arc::new(Discard),
                };
                let t: Arc<dyn Transport> = if r.rewrite_from {
                    Arc::new(RewriteFrom::new(t))
                } else {
                    t
                };
                (r.name.clone(), t)
            })
            .collect();
        Self { routes, config }
    }

    /// The route of a message routed through `route` (or, if that route was removed by a
    /// reload, whichever route now accepts `sender`).
    fn route_name<'a>(&'a self, route: &'a str, sender: &str) -> Option<&'a str> {
        if self.routes.contains_key(route) {
            return Some(route);
        }
        self.config.route_for(sender).map(|r| r.name.as_str())
    }

    /// The transport for a message routed through `route` (see [`Plan::route_name`]).
    fn transport_for(&self, route: &str, sender: &str) -> Option<Arc<dyn Transport>> {
        self.route_name(route, sender)
            .and_then(|r| self.routes.get(r))
            .cloned()
    }

    /// The pacing limits for a message routed through `route` (none if no route takes it).
    fn pacing_for(&self, route: &str, sender: &str) -> Pacing {
        self.route_name(route, sender)
            .and_then(|name| self.config.routes.iter().find(|r| r.name == name))
            .map(|r| r.pacing.clone())
            .unwrap_or_default()
    }
}
/// The XOAUTH2 transport of a route; one that cannot be built holds its messages with the
/// reason (config validation makes that rare: e.g. a CA file that vanished since `check`).
fn smtp_transport(
    config: &Config,
    account: &str,
    tokens: &Arc<dyn TokenSource>,
    pool: &Arc<ConnectionPool>,
) -> Arc<dyn Transport> {
    let Some(acc) = config.account(account) else {
        return Arc::new(Unavailable(format!(
            "account \"{account}\" is not configured"
        )));
    };
    match SmtpTransport::new(acc, tokens.clone(), config.hostname.clone()) {
        Ok(t) => Arc::new(t.with_pool(pool.clone())),
        Err(e) => {
            error!(account, error = %e, "the smtp transport cannot be set up; its messages are held");
            Arc::new(Unavailable(e.to_string()))
        }
    }
}

/// The Graph transport of a route; one that cannot be built holds its messages with the reason.
fn graph_transport(
    config: &Config,
    account: &str,
    save_to_sent_items: bool,
    max_message_size: u64,
    tokens: &Arc<dyn TokenSource>,
) -> Arc<dyn Transport> {
    let Some(acc) = config.account(account) else {
        return Arc::new(Unavailable(format!(
            "account \"{account}\" is not configured"
        )));
    };
    match GraphTransport::new(acc, tokens.clone(), save_to_sent_items) {
        Ok(t) => Arc::new(t.with_max_message_size(max_message_size)),
        Err(e) => {
            error!(account, error = %e, "the graph transport cannot be set up; its messages are held");
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

/// A message waiting for its mailbox.
#[derive(Debug, Clone)]
struct Waiting {
    id: String,
    rcpts: u32,
    pacing: Pacing,
}

/// The scheduler's state for one mailbox.
#[derive(Debug, Default)]
struct Mailbox {
    /// Deliveries in flight.
    busy: usize,
    /// Messages that must wait for the mailbox, in the order they go.
    waiting: VecDeque<Waiting>,
    /// What it started and sent recently.
    pacer: Pacer,
    /// The upstream asked the whole mailbox to wait until then.
    block: Option<state::Note>,
    /// After a throttle: one delivery at a time until one is not throttled.
    solo: bool,
    /// Why the front of `waiting` waits, and until when.
    gate: Option<Wait>,
}

impl Mailbox {
    /// Nothing in flight, waiting or remembered.
    fn is_idle(&self) -> bool {
        self.busy == 0 && self.waiting.is_empty() && self.block.is_none() && self.pacer.is_idle()
    }
}

/// Whether a mailbox can start a message now.
enum Gate {
    Open,
    /// A slot frees when a delivery ends.
    Busy,
    /// Not before then.
    Until(Wait),
}

/// Can `mb` (named `name`) start a message to `rcpts` recipients at `now` (ms)?
fn gate(
    mb: &mut Mailbox,
    name: &str,
    rcpts: u32,
    pacing: &Pacing,
    per_mailbox: usize,
    now: u64,
) -> Gate {
    let limit = if mb.solo { 1 } else { per_mailbox };
    if mb.busy >= limit {
        return Gate::Busy;
    }
    if let Some(b) = &mb.block {
        if now < b.until {
            return Gate::Until(Wait {
                until: b.until,
                why: b.why.clone(),
            });
        }
        info!(
            mailbox = name,
            "the upstream's wait is over: one message goes first"
        );
        mb.block = None;
    }
    match mb.pacer.next_start(pacing, rcpts, now, name) {
        Some(w) => Gate::Until(w),
        None => Gate::Open,
    }
}

/// A delivery in flight.
struct Running {
    id: String,
    mailbox: String,
    rcpts: u32,
    pacing: Pacing,
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
    /// Ids in `ready`, `deferred`, a mailbox's `waiting`, or in flight.
    known: HashSet<String>,
    mailboxes: HashMap<String, Mailbox>,
    paused: BTreeMap<HoldKey, Pause>,
    /// Ids of the deliveries in `running`.
    in_flight: HashSet<String>,
    /// Each delivery task, so a task that panicked is still accounted for.
    tasks: HashMap<tokio::task::Id, Running>,
    running: JoinSet<Option<Report>>,
    state_dir: PathBuf,
    /// Something the state file records changed since it was written.
    state_dirty: bool,
    /// What `queue list` shows changed: write without waiting for `STATE_FLUSH`.
    state_urgent: bool,
    state_written: Option<(Instant, state::Saved)>,
    last_rescan: Instant,
}

impl Forwarder {
    /// Create the forwarder; `new_ids` is the spool's commit channel. What it remembered
    /// (recipient windows, upstream waits, refused senders) is read from the state file.
    pub fn new(
        spool: Spool,
        plan: watch::Receiver<Plan>,
        new_ids: mpsc::UnboundedReceiver<String>,
        kick: Kick,
        shutdown: CancellationToken,
    ) -> Self {
        let state_dir = plan.borrow().config.state_dir.clone();
        let saved = state::load(&state_dir).unwrap_or_else(|e| {
            warn!("{e}");
            state::Saved::default()
        });
        let mut mailboxes = HashMap::new();
        let mut paused = BTreeMap::new();
        for (name, m) in &saved.mailboxes {
            for b in &m.held_senders {
                let key = HoldKey {
                    mailbox: name.clone(),
                    scope: HoldScope::Sender(b.clone()),
                };
                // The reason comes from the held messages when they are found.
                paused.insert(key, Pause::new(String::new(), Duration::ZERO));
            }
            mailboxes.insert(
                name.clone(),
                Mailbox {
                    pacer: Pacer::restored(m.sent.iter().copied()),
                    block: m.blocked.clone(),
                    solo: m.blocked.is_some(),
                    ..Mailbox::default()
                },
            );
        }
        Self {
            spool,
            plan,
            new_ids,
            kick,
            shutdown,
            ready: VecDeque::new(),
            deferred: BinaryHeap::new(),
            known: HashSet::new(),
            mailboxes,
            paused,
            in_flight: HashSet::new(),
            tasks: HashMap::new(),
            running: JoinSet::new(),
            state_dir,
            state_dirty: false,
            state_urgent: false,
            state_written: None,
            last_rescan: Instant::now(),
        }
    }

    /// Run until shutdown; then wait for in-flight deliveries (the caller bounds that wait).
    pub async fn run(mut self) {
        self.rescan(true);
        loop {
            self.dispatch();
            let sleep_for = self.next_wake();
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
                    // The admin changed the queue (release, retry): try held mail now, with
                    // what the admin released as the probe (held mail is picked from only
                    // if nothing was).
                    let now = Instant::now();
                    for p in self.paused.values_mut() {
                        p.next_probe = now;
                    }
                    self.rescan(false);
                }
                _ = tokio::time::sleep(sleep_for) => self.on_timer(),
            }
            self.flush_state(false);
        }
        // Let in-flight deliveries finish; the daemon bounds this with shutdown_grace.
        while let Some(done) = self.running.join_next_with_id().await {
            self.joined(done);
        }
        self.flush_state(true);
    }

    /// How long the loop may sleep: until the next deferred message is due, a probe is due,
    /// a mailbox's wait ends, the state file is due, or the periodic rescan.
    fn next_wake(&self) -> Duration {
        let mut d = RESCAN.saturating_sub(self.last_rescan.elapsed());
        if let Some(Reverse((t, _))) = self.deferred.peek() {
            d = d.min(Duration::from_secs(t.saturating_sub(now_secs())));
        }
        let now = Instant::now();
        if let Some(p) = self
            .paused
            .values()
            .filter(|p| p.probe.is_none())
            .map(|p| p.next_probe)
            .min()
        {
            d = d.min(p.saturating_duration_since(now));
        }
        let ms = now_ms();
        if let Some(until) = self
            .mailboxes
            .values()
            .filter(|m| !m.waiting.is_empty())
            .filter_map(|m| m.gate.as_ref().map(|g| g.until))
            .min()
        {
            d = d.min(Duration::from_millis(until.saturating_sub(ms)));
        }
        if self.state_dirty {
            let due = self
                .state_written
                .as_ref()
                .map_or(Duration::ZERO, |(t, _)| {
                    STATE_FLUSH.saturating_sub(t.elapsed())
                });
            d = d.min(due);
        }
        d
    }

    fn on_timer(&mut self) {
        if self.last_rescan.elapsed() >= RESCAN {
            self.rescan(true);
            return;
        }
        self.promote_due();
        let now = Instant::now();
        if self
            .paused
            .values()
            .any(|p| p.probe.is_none() && p.next_probe <= now)
        {
            self.start_probes();
        }
    }

    /// A delivery task ended (or panicked: a bug, logged; its message stays in active/ until
    /// the next start, and its mailbox's slot is freed).
    fn joined(&mut self, done: Result<(tokio::task::Id, Option<Report>), tokio::task::JoinError>) {
        let (task, report) = match done {
            Ok((task, report)) => (task, report),
            Err(e) => {
                error!(error = %e, "delivery task panicked");
                (e.id(), None)
            }
        };
        if let Some(r) = self.tasks.remove(&task) {
            self.finished(r, report);
        }
    }

    fn max_concurrency(&self) -> (usize, usize) {
        let d = &self.plan.borrow().config.delivery;
        (d.max_concurrency.max(1), d.per_mailbox_concurrency.max(1))
    }

    /// Re-read the queue directories: new incoming mail and every deferred message's due time
    /// (and, with `probes`, start the probes that are due). Messages already waiting for
    /// their mailbox keep their place.
    fn rescan(&mut self, probes: bool) {
        self.last_rescan = Instant::now();
        self.ready.clear();
        self.deferred.clear();
        self.known = self.in_flight.clone();
        for mb in self.mailboxes.values() {
            self.known.extend(mb.waiting.iter().map(|w| w.id.clone()));
        }
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
        if probes {
            self.start_probes();
        }
    }

    /// The `From:` address of a queued message, for sender holds.
    fn header_from(&self, state: State, id: &str, size: u64) -> Option<String> {
        use std::io::Read;
        let mut head = Vec::new();
        crate::spool::msgfile::open_message(&self.spool.msg_path(state, id), size)
            .ok()?
            .take(64 * 1024)
            .read_to_end(&mut head)
            .ok()?;
        crate::upstream::from_address(&head)
    }

    /// The hold that covers a message, if any: its mailbox's, else a sender hold of its
    /// mailbox that covers its envelope sender or `From:` address.
    fn hold_for(&self, env: &Envelope, state: State) -> Option<HoldKey> {
        let whole = HoldKey {
            mailbox: env.mailbox.clone(),
            scope: HoldScope::Mailbox,
        };
        if self.paused.contains_key(&whole) {
            return Some(whole);
        }
        let mut senders = self
            .paused
            .keys()
            .filter(|k| k.mailbox == env.mailbox && k.scope != HoldScope::Mailbox)
            .peekable();
        senders.peek()?;
        let from = self.header_from(state, &env.id, env.size);
        senders
            .find(|k| k.covers(&env.mailbox, &env.sender, from.as_deref()))
            .cloned()
    }

    /// Messages postern itself held, each with the hold that covers it (a mailbox hold is
    /// assumed for those no hold covers, e.g. after a restart without the state file).
    fn auto_held(&self) -> BTreeMap<HoldKey, Vec<Envelope>> {
        let mut out: BTreeMap<HoldKey, Vec<Envelope>> = BTreeMap::new();
        for id in self.spool.ids(State::Hold).unwrap_or_default() {
            let Ok(env) = self.spool.read_envelope(State::Hold, &id) else {
                continue;
            };
            if !env.auto_hold {
                continue;
            }
            let key = self.hold_for(&env, State::Hold).unwrap_or_else(|| HoldKey {
                mailbox: env.mailbox.clone(),
                scope: HoldScope::Mailbox,
            });
            out.entry(key).or_default().push(env);
        }
        out
    }

    /// For every hold whose probe is due (and holds found on disk, e.g. after a restart),
    /// queue one held message as the probe: the one with the fewest recipients, then the
    /// smallest, then the oldest. Holds with nothing held and no probe running end.
    fn start_probes(&mut self) {
        let now = Instant::now();
        let held = self.auto_held();
        let before = self.paused.len();
        self.paused
            .retain(|k, p| p.probe.is_some() || held.contains_key(k));
        if self.paused.len() != before {
            self.state_dirty = true;
        }
        for (key, envs) in held {
            let pause = self
                .paused
                .entry(key.clone())
                .or_insert_with(|| Pause::new(String::new(), Duration::ZERO));
            if pause.reason.is_empty() {
                pause.reason = envs
                    .iter()
                    .find_map(|e| e.hold_reason.clone())
                    .unwrap_or_default();
                pause.fingerprint = hold::fingerprint(&pause.reason);
                self.state_dirty = true;
            }
            if pause.probe.is_some() || pause.next_probe > now {
                continue;
            }
            let Some(best) = envs
                .iter()
                .min_by_key(|e| (e.pending().count(), e.size, e.received_at, e.id.clone()))
            else {
                continue;
            };
            match self.spool.requeue(&best.id) {
                Ok(_) => {
                    debug!(mailbox = %key.mailbox, queue_id = %best.id, "retrying one held message to see whether {} works again", key.describe());
                    pause.probe = Some(best.id.clone());
                    if self.known.insert(best.id.clone()) {
                        self.ready.push_back(best.id.clone());
                    }
                }
                Err(e) => {
                    warn!(mailbox = %key.mailbox, queue_id = %best.id, error = %e, "cannot requeue held message for a retry")
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

    /// Start what may start: first the messages waiting for their mailboxes (they came
    /// before anything now in `ready` for the same mailbox), then `ready` in order.
    fn dispatch(&mut self) {
        let (max, _) = self.max_concurrency();
        let names: Vec<String> = self
            .mailboxes
            .iter()
            .filter(|(_, m)| !m.waiting.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.pump(&name);
        }
        while self.running.len() < max {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            self.admit(id);
        }
    }

    /// Read a message that is waiting (in incoming/, or due in deferred/).
    fn read_waiting(&mut self, id: &str) -> Option<(Envelope, State)> {
        let from = if self.spool.msg_path(State::Incoming, id).is_file() {
            State::Incoming
        } else {
            State::Deferred
        };
        match self.spool.read_envelope(from, id) {
            Ok(e) => Some((e, from)),
            Err(SpoolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                self.known.remove(id); // moved by the admin meanwhile
                None
            }
            Err(e) => {
                warn!(queue_id = %id, error = %e, "cannot read envelope; leaving the message for the next rescan");
                self.known.remove(id);
                None
            }
        }
    }

    /// Put the message on hold if a hold covers it and it is not that hold's probe.
    /// Returns true when it was held (or could not be).
    fn held_now(&mut self, id: &str, env: &Envelope, from: State) -> bool {
        let Some(key) = self.hold_for(env, from) else {
            return false;
        };
        let Some(p) = self.paused.get(&key) else {
            return false;
        };
        if p.probe.as_deref() == Some(id) {
            return false;
        }
        if p.probe.is_none() && p.next_probe <= Instant::now() {
            // A probe is due (the admin's `queue release` of this message makes it due at
            // once): this message is the probe.
            if let Some(p) = self.paused.get_mut(&key) {
                p.probe = Some(id.to_string());
            }
            return false;
        }
        let reason = format!("{} is paused: {}", key.describe(), p.reason);
        match self.spool.auto_hold(id, from, &reason) {
            Ok(()) => maillog::held(
                id,
                &env.mailbox,
                &format!("{} is paused: {}", key.describe(), hold::brief(&p.reason)),
            ),
            Err(e) => {
                warn!(queue_id = %id, error = %e, "cannot hold message of a paused mailbox")
            }
        }
        self.known.remove(id);
        true
    }

    /// A message from `ready`: hold it, start it, or queue it behind its mailbox.
    fn admit(&mut self, id: String) {
        let Some((env, from)) = self.read_waiting(&id) else {
            return;
        };
        if self.held_now(&id, &env, from) {
            return;
        }
        let pacing = self.plan.borrow().pacing_for(&env.route, &env.sender);
        let rcpts = u32::try_from(env.pending().count()).unwrap_or(u32::MAX);
        let (_, per_mailbox) = self.max_concurrency();
        let mb = self.mailboxes.entry(env.mailbox.clone()).or_default();
        let verdict = if mb.waiting.is_empty() {
            gate(mb, &env.mailbox, rcpts, &pacing, per_mailbox, now_ms())
        } else {
            Gate::Busy // behind the ones already waiting
        };
        match verdict {
            Gate::Open => self.start(id, env, from, rcpts, pacing),
            Gate::Busy => mb.waiting.push_back(Waiting { id, rcpts, pacing }),
            Gate::Until(w) => {
                mb.waiting.push_back(Waiting { id, rcpts, pacing });
                set_gate(mb, &env.mailbox, Some(w));
                self.state_dirty = true;
                self.state_urgent = true;
            }
        }
    }

    /// Start as many of `name`'s waiting messages as its gate allows, in order.
    fn pump(&mut self, name: &str) {
        let (max, per_mailbox) = self.max_concurrency();
        while self.running.len() < max {
            let Some(mb) = self.mailboxes.get_mut(name) else {
                return;
            };
            let Some(front) = mb.waiting.front() else {
                if mb.gate.is_some() {
                    set_gate(mb, name, None);
                    self.state_dirty = true;
                    self.state_urgent = true;
                }
                return;
            };
            let (rcpts, pacing) = (front.rcpts, front.pacing.clone());
            match gate(mb, name, rcpts, &pacing, per_mailbox, now_ms()) {
                Gate::Busy => return,
                Gate::Until(w) => {
                    if mb.gate.as_ref() != Some(&w) {
                        set_gate(mb, name, Some(w));
                        self.state_dirty = true;
                        self.state_urgent = true;
                    }
                    return;
                }
                Gate::Open => {}
            }
            let Some(w) = mb.waiting.pop_front() else {
                return;
            };
            // It may have been moved by the admin, or a hold may have begun since it queued.
            let Some((env, from)) = self.read_waiting(&w.id) else {
                continue;
            };
            if self.held_now(&w.id, &env, from) {
                continue;
            }
            let rcpts = u32::try_from(env.pending().count()).unwrap_or(u32::MAX);
            self.start(w.id, env, from, rcpts, w.pacing);
        }
    }

    /// Claim the message and run one attempt in a task.
    fn start(&mut self, id: String, env: Envelope, from: State, rcpts: u32, pacing: Pacing) {
        if let Err(e) = self.spool.claim(&id, from) {
            if !matches!(e, SpoolError::NotFound(_)) {
                warn!(queue_id = %id, error = %e, "cannot claim message");
            }
            self.known.remove(&id);
            return;
        }
        let mb = self.mailboxes.entry(env.mailbox.clone()).or_default();
        mb.busy += 1;
        mb.pacer.started(rcpts, now_ms());
        self.state_dirty = true;
        let plan = self.plan.borrow().clone();
        let transport = plan.transport_for(&env.route, &env.sender);
        let d = &plan.config.delivery;
        let policy = RetryPolicy {
            initial: d.retry_initial,
            max: d.retry_max,
            lifetime: d.max_lifetime,
        };
        let spool = self.spool.clone();
        self.in_flight.insert(id.clone());
        let queue_id = id.clone();
        let hostname = plan.config.hostname.clone();
        let task = self.running.spawn(async move {
            match worker::attempt(&spool, &queue_id, transport, policy, &hostname).await {
                Ok(r) => Some(r),
                Err(e) => {
                    error!(queue_id = %queue_id, error = %e, "delivery bookkeeping failed; the message stays in active/ until restart");
                    None
                }
            }
        });
        self.tasks.insert(
            task.id(),
            Running {
                id,
                mailbox: env.mailbox,
                rcpts,
                pacing,
            },
        );
    }

    fn finished(&mut self, run: Running, report: Option<Report>) {
        let Running {
            id,
            mailbox,
            rcpts,
            pacing,
        } = run;
        self.known.remove(&id);
        self.in_flight.remove(&id);
        self.state_dirty = true;
        let now = now_ms();
        let next = report.as_ref().map(|r| &r.next);
        let mb = self.mailboxes.entry(mailbox.clone()).or_default();
        mb.busy = mb.busy.saturating_sub(1);
        mb.pacer.finished(
            rcpts,
            report.as_ref().map_or(0, |r| r.delivered),
            &pacing,
            now,
        );
        match next {
            Some(Next::Throttled { wait, reason }) => {
                // The whole mailbox waits; this message goes first when the wait is over.
                let until = match wait {
                    Some(w) => now.saturating_add(u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
                    None => mb.pacer.window_frees_at(&pacing, now).unwrap_or_else(|| {
                        // Used up by others (postern sent nothing recently): look again after
                        // a 24th of the window (an hour for the daily limit).
                        let per = pacing
                            .recipients
                            .as_ref()
                            .map_or(crate::config::pacing::DAY, |r| r.per);
                        now.saturating_add(
                            u64::try_from((per / 24).as_millis()).unwrap_or(u64::MAX),
                        )
                    }),
                };
                let why = format!("throttled by the upstream: {}", hold::brief(reason));
                if mb.block.as_ref().is_none_or(|b| b.until <= now) {
                    warn!(
                        mailbox = %mailbox,
                        until = %fmt_ms(until),
                        reason = %reason,
                        "the mailbox's mail waits: the upstream asked it to (attempts are not spent, nothing bounces)"
                    );
                }
                if mb.block.as_ref().is_none_or(|b| b.until < until) {
                    mb.block = Some(state::Note { until, why });
                    self.state_urgent = true;
                }
                mb.solo = true;
                mb.waiting.push_front(Waiting {
                    id: id.clone(),
                    rcpts,
                    pacing,
                });
                self.known.insert(id.clone());
            }
            Some(Next::Deferred(t)) => {
                mb.solo = false;
                self.known.insert(id.clone());
                self.deferred.push(Reverse((*t, id.clone())));
            }
            _ => mb.solo = false,
        }
        self.after_attempt(&id, &mailbox, next);
        if self.mailboxes.get(&mailbox).is_some_and(Mailbox::is_idle) {
            self.mailboxes.remove(&mailbox);
        }
    }

    /// Start, update or lift holds according to the attempt's result.
    fn after_attempt(&mut self, id: &str, mailbox: &str, next: Option<&Next>) {
        let hold_retry = self.plan.borrow().config.delivery.hold_retry;
        let probed = self
            .paused
            .iter()
            .find(|(_, p)| p.probe.as_deref() == Some(id))
            .map(|(k, _)| k.clone());
        match next {
            Some(Next::Held(scope)) => {
                let key = HoldKey {
                    mailbox: mailbox.to_string(),
                    scope: scope.clone(),
                };
                let reason = self
                    .spool
                    .read_envelope(State::Hold, id)
                    .ok()
                    .and_then(|e| e.hold_reason)
                    .unwrap_or_else(|| "configuration problem".into());
                if let Some(pk) = probed.filter(|pk| *pk != key) {
                    if pk.scope == HoldScope::Mailbox {
                        // The probe got past the mailbox's problem (to a Send As refusal): the
                        // mailbox works; only that sender stays held.
                        self.hold_update(&key, id, reason, hold_retry);
                        self.lift(&pk);
                        return;
                    }
                    self.probe_inconclusive(&pk, id, hold_retry);
                }
                self.hold_update(&key, id, reason, hold_retry);
            }
            Some(Next::Throttled { .. }) | None => {
                if let Some(pk) = probed {
                    self.probe_inconclusive(&pk, id, hold_retry);
                }
            }
            Some(n) => {
                let Some(pk) = probed else { return };
                // A sender hold ends only when its mail was delivered: anything short of that
                // does not show that Exchange lets the mailbox send as the address now.
                if pk.scope == HoldScope::Mailbox || *n == Next::Done {
                    self.lift(&pk);
                } else {
                    self.probe_inconclusive(&pk, id, hold_retry);
                }
            }
        }
    }

    /// The attempt of `id` ended held for `key`: start the hold, or note a failed probe.
    fn hold_update(&mut self, key: &HoldKey, id: &str, reason: String, hold_retry: Duration) {
        self.state_dirty = true;
        let sender = match &key.scope {
            HoldScope::Sender(b) => Some(b.as_str()),
            HoldScope::Mailbox => None,
        };
        let Some(p) = self.paused.get_mut(key) else {
            let interval = hold::probe_interval(&key.scope, hold_retry, 0);
            let what = match key.scope {
                HoldScope::Mailbox => {
                    "mailbox paused: its messages are held (retries not spent) until this is fixed"
                }
                HoldScope::Sender(_) => {
                    "sender paused: the mailbox's mail from this address is held (retries not spent) until this is fixed; its other mail keeps flowing"
                }
            };
            warn!(
                mailbox = %key.mailbox,
                sender,
                reason = %reason,
                retry_in = %round(interval),
                "{what}"
            );
            self.paused
                .insert(key.clone(), Pause::new(reason, interval));
            return;
        };
        let was_probe = p.probe.as_deref() == Some(id);
        if was_probe || p.probe.is_none() {
            if was_probe {
                p.failures = p.failures.saturating_add(1);
            }
            p.probe = None;
            p.next_probe =
                Instant::now() + hold::probe_interval(&key.scope, hold_retry, p.failures);
        }
        let interval = p.next_probe.saturating_duration_since(Instant::now());
        let fp = hold::fingerprint(&reason);
        if fp != p.fingerprint {
            warn!(
                mailbox = %key.mailbox,
                sender,
                reason = %reason,
                retry_in = %round(interval),
                "still paused, for another reason"
            );
            p.fingerprint = fp;
        } else {
            info!(
                mailbox = %key.mailbox,
                sender,
                queue_id = id,
                retry_in = %round(interval),
                "still paused, same cause"
            );
        }
        p.reason = reason;
    }

    /// A probe of `key` ended without a verdict on the hold's cause: try again later.
    fn probe_inconclusive(&mut self, key: &HoldKey, id: &str, hold_retry: Duration) {
        if let Some(p) = self.paused.get_mut(key)
            && p.probe.as_deref() == Some(id)
        {
            p.probe = None;
            p.next_probe =
                Instant::now() + hold::probe_interval(&key.scope, hold_retry, p.failures);
        }
    }

    /// `key` works again: end the hold and queue every message it held (unless another
    /// hold still covers it).
    fn lift(&mut self, key: &HoldKey) {
        // Which messages the hold covers is known only while it is in force.
        let held = self.auto_held().remove(key).unwrap_or_default();
        self.paused.remove(key);
        self.state_dirty = true;
        let mut n = 0;
        for env in held {
            if self.hold_for(&env, State::Hold).is_some() {
                continue; // another hold still covers it
            }
            if self.spool.requeue(&env.id).is_ok() {
                maillog::released(&env.id);
                if self.known.insert(env.id.clone()) {
                    self.ready.push_back(env.id.clone());
                }
                n += 1;
            }
        }
        let (what, sender) = match &key.scope {
            HoldScope::Mailbox => ("mailbox", None),
            HoldScope::Sender(b) => ("sender", Some(b.as_str())),
        };
        info!(
            mailbox = %key.mailbox,
            sender,
            released = n,
            "{what} works again: held messages queued for delivery"
        );
    }

    /// Write the state file if it changed and the last write is old enough (or `force`).
    fn flush_state(&mut self, force: bool) {
        if !self.state_dirty {
            return;
        }
        if !force
            && !self.state_urgent
            && self
                .state_written
                .as_ref()
                .is_some_and(|(t, _)| t.elapsed() < STATE_FLUSH)
        {
            return;
        }
        self.state_dirty = false;
        self.state_urgent = false;
        let snapshot = self.snapshot();
        if self
            .state_written
            .as_ref()
            .is_some_and(|(_, last)| *last == snapshot)
        {
            self.state_written = Some((Instant::now(), snapshot));
            return;
        }
        if let Err(e) = state::save(&self.state_dir, &snapshot) {
            // Only memory is lost: pacing goes on; a restart forgets the windows.
            debug!(error = %e, "cannot write the delivery state file");
            if self.state_written.is_none() {
                warn!(path = %state::path(&self.state_dir).display(), error = %e, "cannot write the delivery state file; recipient counts and waits will not survive a restart");
            }
        }
        self.state_written = Some((Instant::now(), snapshot));
    }

    /// What the state file records now.
    fn snapshot(&self) -> state::Saved {
        let mut saved = state::Saved::default();
        for (name, mb) in &self.mailboxes {
            let m = saved.mailboxes.entry(name.clone()).or_default();
            m.sent = mb.pacer.sent().collect();
            m.blocked = mb.block.clone();
            if !mb.waiting.is_empty() {
                m.waiting = mb.gate.as_ref().map(|w| state::Note {
                    until: w.until,
                    why: w.why.clone(),
                });
            }
        }
        for key in self.paused.keys() {
            if let HoldScope::Sender(b) = &key.scope {
                saved
                    .mailboxes
                    .entry(key.mailbox.clone())
                    .or_default()
                    .held_senders
                    .push(b.clone());
            }
        }
        saved
    }
}

/// Set (or clear) why a mailbox's queued mail waits; the start of a wait is logged once.
fn set_gate(mb: &mut Mailbox, name: &str, w: Option<Wait>) {
    if let (None, Some(w)) = (&mb.gate, &w) {
        info!(
            mailbox = name,
            waiting = mb.waiting.len(),
            next_at = %fmt_ms(w.until),
            "{}: queued mail waits",
            w.why
        );
    }
    mb.gate = w;
}

/// `d` to the nearest second, for log lines.
fn round(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(
        u64::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u64::MAX),
    ))
}

/// A time in ms since the epoch, as `2026-01-31 10:42:05 UTC`.
pub fn fmt_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    format!(
        "{} UTC",
        humantime::format_rfc3339_seconds(t)
            .to_string()
            .replace('T', " ")
            .trim_end_matches('Z')
    )
}

#[cfg(test)]
mod tests;
