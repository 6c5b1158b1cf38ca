//! Authenticated SMTP connections kept open between messages, per mailbox (issue 8 item 1).
//!
//! A scanner's 200 pages as 200 mails should not cost 200 TCP + TLS handshakes and 200 AUTHs:
//! after a message, its connection goes back here and the mailbox's next message uses it.
//! The rules, all enforced in this one place:
//! - a connection only carries mail for the mailbox, and with the access token, it
//!   authenticated with ([`TokenId`]); an idle one whose token was replaced is closed;
//! - at most `per_mailbox` connections per (server, mailbox) are open, busy or idle
//!   (Exchange allows 3 concurrent connections per mailbox, microsoft-reference.md §3.6);
//!   a delivery that finds them all busy waits for one;
//! - an idle connection is closed (QUIT) after `idle`, or once its token has less than
//!   `token_margin` left (a session must not outlive the token it authenticated with);
//! - most recently used first, so a trickle of mail keeps one connection warm and lets the
//!   others age out.
//!
//! The pool is generic over the connection type so its bookkeeping is tested without
//! sockets; the SMTP transport stores its `Session` here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::token::AccessToken;
use crate::upstream::BoxFuture;

/// How connections are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Close a connection idle this long (`0`: never keep one; each message gets its own).
    pub idle: Duration,
    /// Connections open at once per (server, mailbox), busy or idle.
    pub per_mailbox: usize,
    /// Do not use a connection whose token has less than this left.
    pub token_margin: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle: Duration::from_secs(60),
            per_mailbox: 3,
            token_margin: Duration::from_secs(300),
        }
    }
}

/// A connection that can be closed politely (SMTP: QUIT, then the TLS close).
pub trait Close: Send + 'static {
    /// Say goodbye and close; bounded in time by the implementation.
    fn close(self) -> BoxFuture<'static, ()>;
}

/// Which token a connection authenticated with: a digest (the pool keeps no copy of the
/// token) and when the token expires (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenId {
    digest: [u8; 32],
    expires_at: u64,
}

impl TokenId {
    /// The credential of `token`.
    pub fn of(token: &AccessToken) -> TokenId {
        let d =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.token.expose().as_bytes());
        let mut digest = [0u8; 32];
        digest.copy_from_slice(d.as_ref());
        TokenId {
            digest,
            expires_at: token.expires_at,
        }
    }

    /// Still usable at Unix time `now` with `margin` to spare.
    fn fresh(&self, now: u64, margin: Duration) -> bool {
        self.expires_at > now.saturating_add(margin.as_secs())
    }
}

struct Idle<S> {
    conn: S,
    cred: TokenId,
    since: Instant,
}

struct Slot<S> {
    /// Connections counted against the limit: busy (leased) plus idle.
    open: usize,
    /// Idle connections, least recently used first.
    idle: Vec<Idle<S>>,
}

impl<S> Default for Slot<S> {
    fn default() -> Self {
        Slot {
            open: 0,
            idle: Vec::new(),
        }
    }
}

/// The connections of every mailbox of one or more transports.
pub struct Pool<S: Close> {
    settings: Settings,
    slots: Mutex<HashMap<String, Slot<S>>>,
    /// A connection was given back or closed: a waiting delivery may go on.
    changed: Notify,
    reaper: Mutex<bool>,
}

impl<S: Close> std::fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The right to one connection of a (server, mailbox): either an idle one handed over
/// ([`Lease::take`]) or a slot for a new one. Dropping the lease without
/// [`Lease::give_back`] frees the slot (the connection, if any, is dropped with it).
pub struct Lease<S: Close> {
    pool: Arc<Pool<S>>,
    key: String,
    conn: Option<S>,
    done: bool,
}

impl<S: Close> Lease<S> {
    /// The idle connection this lease came with (`None`: open a new one).
    pub fn take(&mut self) -> Option<S> {
        self.conn.take()
    }

    /// The connection is in a clean state (no transaction open) and authenticated with
    /// `cred`: keep it for the mailbox's next message, or close it if connections are not
    /// kept or its token is about to expire.
    pub fn give_back(mut self, conn: S, cred: TokenId) {
        self.done = true;
        let now = crate::spool::now_secs();
        let settings = self.pool.settings;
        if settings.idle.is_zero() || !cred.fresh(now, settings.token_margin) {
            self.pool.release(&self.key);
            spawn_close(conn);
            return;
        }
        {
            let mut slots = self.pool.lock();
            let slot = slots.entry(self.key.clone()).or_default();
            slot.idle.push(Idle {
                conn,
                cred,
                since: Instant::now(),
            });
        }
        self.pool.changed.notify_waiters();
        self.pool.start_reaper();
    }
}

impl<S: Close> Drop for Lease<S> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.release(&self.key);
        }
    }
}

impl<S: Close> Pool<S> {
    /// An empty pool.
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Pool {
            settings: Settings {
                per_mailbox: settings.per_mailbox.max(1),
                ..settings
            },
            slots: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            reaper: Mutex::new(false),
        })
    }

    /// The settings it was made with.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot<S>>> {
        // The critical sections cannot panic halfway through a change; a poisoned lock still
        // holds consistent counts.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection for `key` authenticated with `cred`: the most recently used idle one that
    /// fits, else a slot for a new one; waits up to `wait` while all are busy (`None` then).
    /// Idle connections that no longer fit (another token, token about to expire, idle too
    /// long) are closed on the way.
    pub async fn acquire(
        self: &Arc<Self>,
        key: &str,
        cred: &TokenId,
        wait: Duration,
    ) -> Option<Lease<S>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (lease, stale) = {
                let mut slots = self.lock();
                let slot = slots.entry(key.to_string()).or_default();
                let stale = retire(slot, &self.settings, Some(cred));
                let lease = if let Some(i) = slot.idle.pop() {
                    // Only fitting ones are left: the last is the most recently used.
                    Some(Some(i.conn))
                } else if slot.open < self.settings.per_mailbox {
                    slot.open += 1;
                    Some(None)
                } else {
                    None
                };
                (lease, stale)
            };
            if !stale.is_empty() {
                self.changed.notify_waiters();
            }
            for c in stale {
                spawn_close(c);
            }
            if let Some(conn) = lease {
                return Some(Lease {
                    pool: self.clone(),
                    key: key.to_string(),
                    conn,
                    done: false,
                });
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Connections open (busy or idle) and idle for `key`.
    pub fn count(&self, key: &str) -> (usize, usize) {
        self.lock()
            .get(key)
            .map_or((0, 0), |s| (s.open, s.idle.len()))
    }

    /// A leased slot is free again.
    fn release(&self, key: &str) {
        {
            let mut slots = self.lock();
            if let Some(slot) = slots.get_mut(key) {
                slot.open = slot.open.saturating_sub(1);
                if slot.open == 0 && slot.idle.is_empty() {
                    slots.remove(key);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Close every idle connection that has expired; called by the reaper.
    fn reap(&self) -> Vec<S> {
        let mut out = Vec::new();
        let mut slots = self.lock();
        for slot in slots.values_mut() {
            out.extend(retire(slot, &self.settings, None));
        }
        slots.retain(|_, s| s.open > 0 || !s.idle.is_empty());
        out
    }

    /// Start the task that closes idle connections on time (once, from within a runtime).
    fn start_reaper(self: &Arc<Self>) {
        let mut started = self.reaper.lock().unwrap_or_else(|e| e.into_inner());
        if *started {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        *started = true;
        // A quarter of the idle time, so a connection is closed at most 25 % late; at least
        // every 5 s for the token check, and not more often than 4 times a second.
        let tick =
            (self.settings.idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let pool: Weak<Self> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let stale = pool.reap();
                if !stale.is_empty() {
                    pool.changed.notify_waiters();
                }
                drop(pool);
                for c in stale {
                    spawn_close(c);
                }
            }
        });
    }
}

impl<S: Close> Drop for Pool<S> {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut *self.lock());
        for slot in slots.into_values() {
            for i in slot.idle {
                spawn_close(i.conn);
            }
        }
    }
}

/// Remove from `slot` the idle connections that must not be used any more (idle too long,
/// token about to expire, or, when `want` is given, a token other than `want`), counting them
/// out of `open`.
fn retire<S>(slot: &mut Slot<S>, settings: &Settings, want: Option<&TokenId>) -> Vec<S> {
    let now = crate::spool::now_secs();
    let mut out = Vec::new();
    let mut keep = Vec::with_capacity(slot.idle.len());
    for i in slot.idle.drain(..) {
        let ok = i.since.elapsed() < settings.idle
            && i.cred.fresh(now, settings.token_margin)
            && want.is_none_or(|w| *w == i.cred);
        if ok {
            keep.push(i);
        } else {
            out.push(i.conn);
        }
    }
    slot.idle = keep;
    slot.open = slot.open.saturating_sub(out.len());
    out
}

/// Close politely in the background (outside a runtime: just drop).
fn spawn_close<S: Close>(conn: S) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(conn.close());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::secret::Secret;

    #[derive(Debug)]
    struct Fake(u32, Arc<AtomicUsize>);

    impl Close for Fake {
        fn close(self) -> BoxFuture<'static, ()> {
            let closed = self.1.clone();
            Box::pin(async move {
                closed.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    fn cred(token: &str, expires_in: u64) -> TokenId {
        TokenId::of(&AccessToken {
            token: Secret::new(token.into()),
            expires_at: crate::spool::now_secs() + expires_in,
        })
    }

    fn settings(per_mailbox: usize) -> Settings {
        Settings {
            idle: Duration::from_secs(60),
            per_mailbox,
            token_margin: Duration::from_secs(300),
        }
    }

    const W: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_connection_is_reused_only_with_its_token() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Arc<Pool<Fake>> = Pool::new(settings(3));
        let a = cred("token-a", 3600);
        let mut l = pool.acquire("m", &a, W).await.unwrap();
        assert!(l.take().is_none(), "nothing idle yet");
        l.give_back(Fake(1, closed.clone()), a.clone());
        assert_eq!(pool.count("m"), (1, 1));

        let mut l = pool.acquire("m", &a, W).await.unwrap();
        assert_eq!(l.take().map(|f| f.0), Some(1), "same token: reused");
        l.give_back(Fake(1, closed.clone()), a.clone());

        // Another mailbox never gets it.
        let mut other = pool.acquire("n", &a, W).await.unwrap();
        assert!(other.take().is_none());
        drop(other);

        // A new token: the old connection is closed, a new slot is handed out.
        let b = cred("token-b", 3600);
        let mut l = pool.acquire("m", &b, W).await.unwrap();
        assert!(l.take().is_none());
        tokio::task::yield_now().await;
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(pool.count("m"), (1, 0));
        drop(l);
        assert_eq!(pool.count("m"), (0, 0));
    }

    #[tokio::test]
    async fn never_more_than_per_mailbox_open() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Arc<Pool<Fake>> = Pool::new(settings(2));
        let a = cred("t", 3600);
        let l1 = pool.acquire("m", &a, W).await.unwrap();
        let l2 = pool.acquire("m", &a, W).await.unwrap();
        assert!(
            pool.acquire("m", &a, Duration::from_millis(50))
                .await
                .is_none(),
            "a third must wait"
        );
        // Another mailbox is not affected.
        assert!(pool.acquire("n", &a, W).await.is_some());
        let p = pool.clone();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            let mut l = p.acquire("m", &a2, W).await.expect("woken");
            l.take().map(|f| f.0)
        });
        tokio::task::yield_now().await;
        l1.give_back(Fake(7, closed.clone()), a.clone());
        assert_eq!(
            waiter.await.unwrap(),
            Some(7),
            "the waiter gets the returned one"
        );
        drop(l2);
        assert_eq!(pool.count("m"), (0, 0));
    }

    #[tokio::test]
    async fn idle_and_expiring_connections_are_not_used() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Arc<Pool<Fake>> = Pool::new(Settings {
            idle: Duration::from_millis(100),
            ..settings(3)
        });
        let a = cred("t", 3600);
        pool.acquire("m", &a, W)
            .await
            .unwrap()
            .give_back(Fake(1, closed.clone()), a.clone());
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut l = pool.acquire("m", &a, W).await.unwrap();
        assert!(l.take().is_none(), "idle too long");
        drop(l);

        // A token with less than the margin left is not kept at all.
        let short = cred("s", 200);
        pool.acquire("m", &short, W)
            .await
            .unwrap()
            .give_back(Fake(2, closed.clone()), short.clone());
        assert_eq!(pool.count("m"), (0, 0));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_reaper_closes_idle_connections() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Arc<Pool<Fake>> = Pool::new(Settings {
            idle: Duration::from_millis(200),
            ..settings(3)
        });
        let a = cred("t", 3600);
        pool.acquire("m", &a, W)
            .await
            .unwrap()
            .give_back(Fake(1, closed.clone()), a.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while closed.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.count("m"), (0, 0));
    }

    #[tokio::test]
    async fn zero_idle_keeps_nothing() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Arc<Pool<Fake>> = Pool::new(Settings {
            idle: Duration::ZERO,
            ..settings(3)
        });
        let a = cred("t", 3600);
        pool.acquire("m", &a, W)
            .await
            .unwrap()
            .give_back(Fake(1, closed.clone()), a.clone());
        assert_eq!(pool.count("m"), (0, 0));
    }
}
