//! The accept loop of one listener: `allow_networks`, connection limits shared by all
//! listeners, implicit TLS, one task per connection on the daemon's tracker.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tracing::{error, info, warn};

use crate::config::{GlobalLimits, TlsMode};
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
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Connection counts, total and per client IP, shared by all listeners.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    counts: Mutex<Counts>,
}

/// One counted connection; dropping it releases the slot.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    /// A limiter allowing `max_total` connections, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// A limiter from `config.limits`.
    pub fn from_limits(limits: &GlobalLimits) -> Self {
        Self::new(limits.max_connections, limits.max_connections_per_ip)
    }

    /// Change the limits (config reload); live connections keep their slots.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    /// Count a new connection from `ip`, or say which limit it would exceed.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, LimitExceeded> {
        let ip = ip.to_canonical();
        let mut c = self.counts.lock().map_err(|_| LimitExceeded::Total)?;
        if c.total >= self.max_total.load(Ordering::Relaxed) {
            return Err(LimitExceeded::Total);
        }
        let per_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if per_ip >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(LimitExceeded::PerIp);
        }
        c.total += 1;
        c.per_ip.insert(ip, per_ip + 1);
        Ok(ConnPermit {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Ok(mut c) = self.limiter.counts.lock() {
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// Accept connections on `tcp` until `ctx.shutdown` or `ctx.stop` is cancelled. Each
/// connection runs on `ctx.tracker`; cancelling `stop` (config reload) only stops accepting,
/// live connections go on.
pub async fn run_listener<S: MessageSink>(tcp: TcpListener, ctx: Arc<ListenerContext<S>>) {
    let local = tcp.local_addr().ok();
    info!(target: "postern::smtp", listener = %ctx.listener.name, address = ?local, "listening");
    loop {
        let accepted = tokio::select! {
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
    if !policy::network_allowed(&ctx.listener, ip) {
        warn!(
            target: "postern::smtp",
            client = %peer,
            listener = %ctx.listener.name,
            end = %ConnEnd::Denied,
            "refused: client not in allow_networks"
        );
        let reply = Reply::access_denied(&ip.to_string(), &ctx.listener.name);
        maillog::rejected(&peer.to_string(), "CONNECT", &reply.to_string(), None, None);
        crate::metrics::refused(&ctx.listener.name, "CONNECT", &reply.to_string());
        if !implicit {
            refuse(stream, reply, &ctx.tracker);
        }
        return;
    }
    let permit = match ctx.limiter.try_acquire(ip) {
        Ok(p) => p,
        Err(which) => {
            warn!(
                target: "postern::smtp",
                client = %peer,
                listener = %ctx.listener.name,
                limit = ?which,
                end = %ConnEnd::TooManyConnections,
                "refused: too many connections"
            );
            let reply = match which {
                LimitExceeded::Total => Reply::too_many_connections(&host),
                LimitExceeded::PerIp => Reply::too_many_connections_from_ip(&host),
            };
            maillog::rejected(&peer.to_string(), "CONNECT", &reply.to_string(), None, None);
            crate::metrics::refused(&ctx.listener.name, "CONNECT", &reply.to_string());
            if !implicit {
                refuse(stream, reply, &ctx.tracker);
            }
            return;
        }
    };
    let ctx = ctx.clone();
    ctx.tracker.clone().spawn(async move {
        let _permit = permit;
        let _open = crate::metrics::connection(&ctx.listener.name);
        if implicit {
            let Some(acceptor) = ctx.tls.clone() else {
                error!(target: "postern::smtp", listener = %ctx.listener.name, "implicit TLS listener without a certificate");
                return;
            };
            match timeout(ctx.listener.command_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    serve(tls, peer, true, &ctx).await;
                }
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
            serve(stream, peer, false, &ctx).await;
        }
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

    #[test]
    fn limiter_counts_and_releases() {
        let l = Arc::new(ConnLimiter::new(3, 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), LimitExceeded::PerIp);
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), LimitExceeded::Total);
        drop(p1);
        assert_eq!(l.active(), 2);
        assert!(l.try_acquire(a).is_ok());
        l.set_limits(10, 10);
        assert!(l.try_acquire(b).is_ok());
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
        assert_eq!(
            c.reply().await,
            "554 5.7.1 Access denied: 127.0.0.1 is not in allow_networks of listener \"test\"\r\n"
        );
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
        ctx.limiter.set_limits(1, 5);
        let mut c3 = connect(addr).await;
        assert_eq!(
            c3.reply().await,
            "421 4.7.0 mx.test Too many connections, try again later\r\n"
        );
        c1.cmd("QUIT").await;
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
