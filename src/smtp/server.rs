//! The accept loop of one listener: `allow_networks`, connection limits shared by all
//! listeners, implicit TLS, one task per connection on the daemon's tracker.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AuthMode, GlobalLimits, TlsMode};
use crate::maillog;

use super::MessageSink;
use super::conn::{ConnEnd, ListenerContext, serve};
use super::policy;
use super::reply::Reply;

/// How long we spend telling a refused client why.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (EMFILE...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Which connection limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// `limits.max_connections`
    Total,
    /// `limits.max_connections_per_ip`
    PerIp,
    /// `limits.max_unauthenticated_per_ip`
    Unauthenticated,
}

/// One live connection as the limiter sees it.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    /// Cancelled when the limiter takes the slot back for a newcomer (`421 4.7.0`).
    evict: CancellationToken,
    /// The listener requires AUTH: until login the slot counts against the lower limit.
    auth_required: bool,
    authenticated: AtomicBool,
}

impl Slot {
    /// A slot outside any limiter.
    #[cfg(test)]
    pub(crate) fn detached() -> Arc<Self> {
        Arc::new(Self {
            id: 0,
            evict: CancellationToken::new(),
            auth_required: false,
            authenticated: AtomicBool::new(false),
        })
    }

    /// Cancelled when this connection must make room for another.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    /// The client logged in: it no longer counts as unauthenticated and is never evicted.
    pub fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    fn before_login(&self) -> bool {
        self.auth_required && !self.is_authenticated()
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Live slots by client address, oldest first.
    per_ip: HashMap<IpAddr, Vec<Arc<Slot>>>,
    next_id: u64,
}

impl Counts {
    fn remove(&mut self, ip: IpAddr, id: u64) -> bool {
        let Some(slots) = self.per_ip.get_mut(&ip) else {
            return false;
        };
        let Some(pos) = slots.iter().position(|s| s.id == id) else {
            return false;
        };
        slots.remove(pos);
        if slots.is_empty() {
            self.per_ip.remove(&ip);
        }
        self.total = self.total.saturating_sub(1);
        true
    }

    /// At the global limit, the slot to take back for a newcomer from `ip`: the oldest
    /// connection that has not logged in, of the address holding the most connections, if that
    /// address holds at least two more than `ip` would after admission. So a client with few
    /// connections always gets in past one that hoards them, and hoarders cannot evict each
    /// other below an equal share.
    fn victim(&self, ip: IpAddr) -> Option<(IpAddr, Arc<Slot>)> {
        let mine = self.per_ip.get(&ip).map_or(0, Vec::len);
        self.per_ip
            .iter()
            .filter(|(other, slots)| **other != ip && slots.len() >= mine + 2)
            .filter_map(|(other, slots)| {
                let oldest = slots.iter().find(|s| !s.is_authenticated())?;
                Some((slots.len(), *other, oldest.clone()))
            })
            .max_by_key(|(n, _, slot)| (*n, std::cmp::Reverse(slot.id)))
            .map(|(_, other, slot)| (other, slot))
    }
}

/// Connection counts, total and per client IP, shared by all listeners. Only connections that
/// passed `allow_networks` are counted. When all `max_connections` slots are taken, a client
/// from an address with few connections takes the slot of an idle hoarder (see
/// [`Counts::victim`]), so a flood of slow connections from some addresses cannot lock out
/// the others.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    max_unauthenticated: AtomicUsize,
    /// `limits.ipv6_prefix`: IPv6 clients count per network of this many bits.
    v6_prefix: AtomicU8,
    counts: Mutex<Counts>,
}

/// One counted connection; dropping it releases the slot.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
    slot: Arc<Slot>,
}

impl ConnPermit {
    /// This connection's slot.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl ConnLimiter {
    /// A limiter allowing `max_total` connections, `max_per_ip` from one address, of which
    /// `max_unauthenticated` may be waiting to log in on listeners that require it.
    pub fn new(max_total: usize, max_per_ip: usize, max_unauthenticated: usize) -> Self {
        Self {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            max_unauthenticated: AtomicUsize::new(max_unauthenticated),
            v6_prefix: AtomicU8::new(crate::config::DEFAULT_IPV6_PREFIX),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// A limiter from `config.limits`.
    pub fn from_limits(limits: &GlobalLimits) -> Self {
        let l = Self::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.max_unauthenticated_per_ip,
        );
        l.set_limits(limits);
        l
    }

    /// Change the limits (config reload); live connections keep their slots.
    pub fn set_limits(&self, limits: &GlobalLimits) {
        self.max_total
            .store(limits.max_connections, Ordering::Relaxed);
        self.max_per_ip
            .store(limits.max_connections_per_ip, Ordering::Relaxed);
        self.max_unauthenticated
            .store(limits.max_unauthenticated_per_ip, Ordering::Relaxed);
        self.v6_prefix.store(limits.ipv6_prefix, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    /// Count a new connection from `ip` to a listener (`auth_required`: it requires AUTH), or
    /// say which limit it would exceed. At the global limit this may evict another
    /// connection (its slot's token is cancelled; it answers `421` and closes).
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        auth_required: bool,
    ) -> Result<ConnPermit, LimitExceeded> {
        // "Per IP" is per client: an IPv6 client's whole network of ipv6_prefix bits.
        let ip = policy::client_key(ip, self.v6_prefix.load(Ordering::Relaxed));
        let mut c = self.counts.lock().map_err(|_| LimitExceeded::Total)?;
        let mine = c.per_ip.get(&ip).map(Vec::as_slice).unwrap_or_default();
        if mine.len() >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(LimitExceeded::PerIp);
        }
        if auth_required
            && mine.iter().filter(|s| s.before_login()).count()
                >= self.max_unauthenticated.load(Ordering::Relaxed)
        {
            return Err(LimitExceeded::Unauthenticated);
        }
        if c.total >= self.max_total.load(Ordering::Relaxed) {
            let Some((other, victim)) = c.victim(ip) else {
                return Err(LimitExceeded::Total);
            };
            let held = c.per_ip.get(&other).map_or(0, Vec::len);
            c.remove(other, victim.id);
            victim.evict.cancel();
            // Counted against the hoarder's share of the refusal log.
            if maillog::may_log_refusal(&other.to_string()) {
                warn!(
                    target: "postern::smtp",
                    client = %ip,
                    evicted = %other,
                    evicted_held = held,
                    "connection limit reached: closing the oldest idle connection of the address holding the most, to serve a client with fewer"
                );
            }
        }
        c.next_id += 1;
        let slot = Arc::new(Slot {
            id: c.next_id,
            evict: CancellationToken::new(),
            auth_required,
            authenticated: AtomicBool::new(false),
        });
        c.total += 1;
        c.per_ip.entry(ip).or_default().push(slot.clone());
        Ok(ConnPermit {
            limiter: self.clone(),
            ip,
            slot,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Ok(mut c) = self.limiter.counts.lock() {
            // Already gone if it was evicted.
            c.remove(self.ip, self.slot.id);
        }
    }
}

/// Accept connections on `tcp` until `ctx.shutdown` or `ctx.stop` is cancelled. Each
/// connection runs on `ctx.tracker`; cancelling `stop` (config reload) only stops accepting,
/// live connections go on.
pub async fn run_listener<S: MessageSink>(tcp: TcpListener, ctx: Arc<ListenerContext<S>>) {
    let local = tcp.local_addr().ok();
    let address = local.map(|a| a.to_string()).unwrap_or_default();
    info!(target: "postern::smtp", listener = %ctx.listener.name, address, "listening");
    loop {
        // Biased: once `stop` is cancelled (a reload), this loop must not accept again, or a
        // client connecting after "configuration reloaded" could still get the old
        // configuration from the socket both generations share.
        let accepted = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => break,
            () = ctx.stop.cancelled() => break,
            r = tcp.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(target: "postern::smtp", listener = %ctx.listener.name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        admit(stream, peer, &ctx);
    }
    info!(target: "postern::smtp", listener = %ctx.listener.name, "stopped accepting");
}

/// Check networks and limits; refuse, or spawn the connection.
fn admit<S: MessageSink>(stream: TcpStream, peer: SocketAddr, ctx: &Arc<ListenerContext<S>>) {
    let ip = peer.ip().to_canonical();
    let implicit = ctx.listener.tls == TlsMode::Implicit;
    let host = ctx.config.hostname.clone();
    // One log line per refusal (the maillog's "rejected", which names the listener and the
    // limit in its detail), and those bounded per client: see maillog::throttle.
    if !policy::network_allowed(&ctx.listener, ip) {
        let reply = Reply::access_denied(&ip.to_string(), &ctx.listener.name);
        maillog::rejected_because(
            &peer.to_string(),
            "CONNECT",
            &reply.to_string(),
            reply.detail.as_deref(),
            None,
            None,
        );
        crate::metrics::refused(&ctx.listener.name, "CONNECT", &reply.to_string());
        if !implicit {
            refuse(stream, reply, &ctx.tracker);
        }
        return;
    }
    let auth_required = ctx.listener.auth == AuthMode::Required;
    let permit = match ctx.limiter.try_acquire(ip, auth_required) {
        Ok(p) => p,
        Err(which) => {
            let limit = match which {
                LimitExceeded::Total => "max_connections",
                LimitExceeded::PerIp => "max_connections_per_ip",
                LimitExceeded::Unauthenticated => "max_unauthenticated_per_ip",
            };
            let reply = match which {
                LimitExceeded::Total => Reply::too_many_connections(&host),
                LimitExceeded::PerIp | LimitExceeded::Unauthenticated => {
                    Reply::too_many_connections_from_ip(&host)
                }
            };
            maillog::rejected_because(
                &peer.to_string(),
                "CONNECT",
                &reply.to_string(),
                Some(&format!(
                    "listener \"{}\": limits.{limit} reached",
                    ctx.listener.name
                )),
                None,
                None,
            );
            crate::metrics::refused(&ctx.listener.name, "CONNECT", &reply.to_string());
            if !implicit {
                refuse(stream, reply, &ctx.tracker);
            }
            return;
        }
    };
    let ctx = ctx.clone();
    ctx.tracker.clone().spawn(async move {
        let slot = permit.slot().clone();
        let _open = crate::metrics::connection(&ctx.listener.name);
        if implicit {
            let Some(acceptor) = ctx.tls.clone() else {
                error!(target: "postern::smtp", listener = %ctx.listener.name, "implicit TLS listener without a certificate");
                return;
            };
            // A stalled handshake gives way to eviction and shutdown (see conn.rs).
            let handshake = tokio::select! {
                biased;
                () = slot.evicted().cancelled() => return,
                () = ctx.shutdown.cancelled() => return,
                r = timeout(ctx.listener.command_timeout, acceptor.accept(stream)) => r,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    serve(tls, peer, true, &ctx, slot).await;
                }
                // Anyone may fail a handshake at will: bounded like refusals.
                Ok(Err(_)) | Err(_) if !maillog::may_log_refusal(&peer.to_string()) => {}
                Ok(Err(e)) => warn!(
                    target: "postern::smtp",
                    client = %peer,
                    listener = %ctx.listener.name,
                    end = %ConnEnd::TlsFailed(e.to_string()),
                    "disconnect"
                ),
                Err(_) => warn!(
                    target: "postern::smtp",
                    client = %peer,
                    listener = %ctx.listener.name,
                    end = %ConnEnd::TlsFailed("handshake timed out".into()),
                    "disconnect"
                ),
            }
        } else {
            serve(stream, peer, false, &ctx, slot).await;
        }
        drop(permit);
    });
}

/// Tell a refused client why (briefly, without holding a slot) and close.
fn refuse(mut stream: TcpStream, reply: Reply, tracker: &tokio_util::task::TaskTracker) {
    tracker.spawn(async move {
        let _ = timeout(REFUSAL_TIMEOUT, async {
            stream.write_all(&reply.to_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::smtp::conn::tests::{Client, context, tls_connector};
    use crate::smtp::testkit::{MemSink, config};
    use tokio::net::TcpStream;

    async fn listen(
        cfg: Config,
    ) -> (
        SocketAddr,
        Arc<ListenerContext<MemSink>>,
        tokio::task::JoinHandle<()>,
    ) {
        listen_ctx(context(cfg, MemSink::default())).await
    }

    async fn listen_ctx(
        ctx: Arc<ListenerContext<MemSink>>,
    ) -> (
        SocketAddr,
        Arc<ListenerContext<MemSink>>,
        tokio::task::JoinHandle<()>,
    ) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let h = tokio::spawn(run_listener(tcp, ctx.clone()));
        (addr, ctx, h)
    }

    async fn connect(addr: SocketAddr) -> Client<TcpStream> {
        Client::new(TcpStream::connect(addr).await.unwrap())
    }

    fn limits(total: usize, per_ip: usize, unauthenticated: usize) -> GlobalLimits {
        let mut l = config().limits;
        l.max_connections = total;
        l.max_connections_per_ip = per_ip;
        l.max_unauthenticated_per_ip = unauthenticated;
        l
    }

    #[test]
    fn limiter_counts_and_releases() {
        let l = Arc::new(ConnLimiter::new(3, 2, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.try_acquire(a, false).unwrap();
        let _p2 = l
            .try_acquire("::ffff:192.0.2.1".parse().unwrap(), false)
            .unwrap();
        assert_eq!(l.try_acquire(a, false).unwrap_err(), LimitExceeded::PerIp);
        let p3 = l.try_acquire(b, false).unwrap();
        // Full; b would hold as many as a: nobody is evicted.
        assert_eq!(l.try_acquire(b, false).unwrap_err(), LimitExceeded::Total);
        assert!(!p3.slot().evicted().is_cancelled());
        drop(p1);
        assert_eq!(l.active(), 2);
        assert!(l.try_acquire(a, false).is_ok());
        l.set_limits(&limits(10, 10, 10));
        assert!(l.try_acquire(b, false).is_ok());
    }

    /// An IPv6 host has a whole /64: counted per address, one machine could hold every slot
    /// (20 per "client" times 2^64 clients). It is one client per `limits.ipv6_prefix`.
    #[test]
    fn an_ipv6_network_is_one_client() {
        let l = Arc::new(ConnLimiter::from_limits(&limits(100, 2, 2)));
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = l.try_acquire(v6("2001:db8:1:2::1"), false).unwrap();
        let _b = l.try_acquire(v6("2001:db8:1:2::2"), false).unwrap();
        assert_eq!(
            l.try_acquire(v6("2001:db8:1:2:ffff::3"), false)
                .unwrap_err(),
            LimitExceeded::PerIp,
            "the same /64"
        );
        assert!(
            l.try_acquire(v6("2001:db8:1:3::1"), false).is_ok(),
            "another /64"
        );
        // Configurable: per address with 128.
        let mut per_address = limits(100, 2, 2);
        per_address.ipv6_prefix = 128;
        l.set_limits(&per_address);
        assert!(l.try_acquire(v6("2001:db8:1:2::4"), false).is_ok());
    }

    #[test]
    fn at_the_limit_a_newcomer_takes_the_slot_of_the_biggest_hoarder() {
        let l = Arc::new(ConnLimiter::new(6, 10, 10));
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        let hoard: Vec<_> = (0..4)
            .map(|_| l.try_acquire(ip(1), false).unwrap())
            .collect();
        let two: Vec<_> = (0..2)
            .map(|_| l.try_acquire(ip(2), false).unwrap())
            .collect();
        // A logged-in connection is never taken back.
        hoard[0].slot().authenticated();
        let newcomer = l.try_acquire(ip(3), false).unwrap();
        assert_eq!(l.active(), 6);
        assert!(!hoard[0].slot().evicted().is_cancelled(), "logged in");
        assert!(hoard[1].slot().evicted().is_cancelled(), "oldest of ip1");
        assert!(
            hoard[2..]
                .iter()
                .all(|p| !p.slot().evicted().is_cancelled())
        );
        assert!(two.iter().all(|p| !p.slot().evicted().is_cancelled()));
        // ip2 (2 held) cannot take from ip1 (3 held now): it would end up with as many.
        assert_eq!(
            l.try_acquire(ip(2), false).unwrap_err(),
            LimitExceeded::Total
        );
        // ip4 (none) can: ip1 is left with 2, like ip2.
        let _fourth = l.try_acquire(ip(4), false).unwrap();
        assert!(hoard[2].slot().evicted().is_cancelled());
        // The evicted connections' permits still drop cleanly, without freeing a slot twice.
        assert_eq!(l.active(), 6);
        drop(hoard);
        assert_eq!(l.active(), 4, "ip2's two, ip3 and ip4");
        drop(newcomer);
        assert_eq!(l.active(), 3);
    }

    #[test]
    fn before_login_a_lower_limit_per_address() {
        let l = Arc::new(ConnLimiter::new(100, 4, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let p1 = l.try_acquire(a, true).unwrap();
        let _p2 = l.try_acquire(a, true).unwrap();
        assert_eq!(
            l.try_acquire(a, true).unwrap_err(),
            LimitExceeded::Unauthenticated
        );
        // Listeners that do not require AUTH only know the per-address limit.
        let _p3 = l.try_acquire(a, false).unwrap();
        // Once one logs in, another may wait for its login.
        p1.slot().authenticated();
        let _p4 = l.try_acquire(a, true).unwrap();
        assert_eq!(l.try_acquire(a, true).unwrap_err(), LimitExceeded::PerIp);
    }

    #[tokio::test]
    async fn accepts_and_serves() {
        let (addr, ctx, h) = listen(config()).await;
        let mut c = connect(addr).await;
        assert_eq!(c.reply().await, "220 mx.test ESMTP postern\r\n");
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
        ctx.stop.cancel();
        h.await.unwrap();
        ctx.tracker.close();
        ctx.tracker.wait().await;
        assert_eq!(ctx.limiter.active(), 0);
    }

    #[tokio::test]
    async fn stop_keeps_live_connections() {
        let (addr, ctx, h) = listen(config()).await;
        let mut c = connect(addr).await;
        c.reply().await;
        ctx.stop.cancel();
        h.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        c.cmd("QUIT").await;
    }

    #[tokio::test]
    async fn refuses_outside_allow_networks() {
        let mut cfg = config();
        cfg.listeners[0].allow_networks = vec!["192.0.2.0/24".parse().unwrap()];
        let (addr, ctx, _h) = listen(cfg).await;
        let mut c = connect(addr).await;
        // Neither the listener's name nor the setting: those are for the log.
        assert_eq!(c.reply().await, "554 5.7.1 Access denied for 127.0.0.1\r\n");
        assert!(c.closed().await);
        ctx.shutdown.cancel();
    }

    #[tokio::test]
    async fn refuses_over_limits() {
        let mut cfg = config();
        cfg.limits.max_connections_per_ip = 1;
        let (addr, ctx, _h) = listen(cfg.clone()).await;
        let mut c1 = connect(addr).await;
        c1.reply().await;
        let mut c2 = connect(addr).await;
        assert_eq!(
            c2.reply().await,
            "421 4.7.0 mx.test Too many connections from your address, try again later\r\n"
        );
        ctx.limiter.set_limits(&limits(1, 5, 5));
        let mut c3 = connect(addr).await;
        assert_eq!(
            c3.reply().await,
            "421 4.7.0 mx.test Too many connections, try again later\r\n"
        );
        c1.cmd("QUIT").await;
        ctx.shutdown.cancel();
    }

    /// A client from `src` (any 127.0.0.0/8 address is local on Linux).
    async fn connect_from(src: &str, addr: SocketAddr) -> Client<TcpStream> {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
        Client::new(sock.connect(addr).await.unwrap())
    }

    #[tokio::test]
    async fn a_hoarder_makes_room_for_a_newcomer() {
        let mut cfg = config();
        cfg.limits.max_connections = 2;
        let (addr, ctx, _h) = listen(cfg).await;
        let mut h1 = connect_from("127.0.0.2", addr).await;
        assert_eq!(h1.reply().await, "220 mx.test ESMTP postern\r\n");
        let mut h2 = connect_from("127.0.0.2", addr).await;
        assert_eq!(h2.reply().await, "220 mx.test ESMTP postern\r\n");
        // Full: the newcomer gets in, the hoarder's oldest connection is told why and closed.
        let mut n = connect_from("127.0.0.3", addr).await;
        assert_eq!(n.reply().await, "220 mx.test ESMTP postern\r\n");
        assert_eq!(
            h1.reply().await,
            "421 4.7.0 mx.test Too many connections, try again later\r\n"
        );
        assert!(h1.closed().await);
        assert_eq!(h2.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        assert_eq!(n.cmd("NOOP").await, "250 2.0.0 Ok\r\n");
        // One each now: a third address waits its turn.
        let mut third = connect_from("127.0.0.4", addr).await;
        assert_eq!(
            third.reply().await,
            "421 4.7.0 mx.test Too many connections, try again later\r\n"
        );
        assert_eq!(ctx.limiter.active(), 2);
        ctx.shutdown.cancel();
    }

    #[tokio::test]
    async fn implicit_tls() {
        let (_dir, files, cert) = crate::smtp::tls::tests::self_signed();
        let mut cfg = config();
        cfg.listeners[0].tls = TlsMode::Implicit;
        cfg.listeners[0].tls_files = Some(files.clone());
        let ctx = context(cfg, MemSink::default());
        let mut ctx = Arc::try_unwrap(ctx).ok().unwrap();
        ctx.tls = Some(crate::smtp::tls::acceptor(&files).unwrap());
        let (addr, ctx, _h) = listen_ctx(Arc::new(ctx)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tls_connector(cert).connect(name, tcp).await.unwrap();
        let mut c = Client::new(tls);
        assert_eq!(c.reply().await, "220 mx.test ESMTP postern\r\n");
        let ehlo = c.cmd("EHLO x").await;
        assert!(
            !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN LOGIN"),
            "{ehlo}"
        );
        c.cmd("QUIT").await;
        // Plain text on an implicit-TLS port: closed without a reply.
        let mut plain = connect(addr).await;
        plain.send(b"EHLO x\r\n").await;
        assert!(!plain.reply().await.starts_with("220"));
        assert!(plain.closed().await);
        ctx.shutdown.cancel();
    }
}
