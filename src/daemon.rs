//! Start-up order (config → spool recovery → token store → forwarder → listeners), signals,
//! reload and graceful stop.
//!
//! SIGTERM/SIGINT: listeners stop accepting, idle connections get 421, transactions in
//! progress finish, deliveries in flight finish, all bounded by `delivery.shutdown_grace`;
//! whatever is left stays in the spool for the next start. SIGHUP: the configuration is read
//! again; listeners, users and routes are replaced without touching the queue or live
//! connections. A bad new configuration is logged in full and the old one kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigErrors};
use crate::control;
use crate::forward::{Forwarder, Kick, Plan};
use crate::smtp::auth::AuthGuard;
use crate::smtp::conn::ListenerContext;
use crate::smtp::server::{ConnLimiter, run_listener};
use crate::smtp::tls;
use crate::spool::{Spool, SpoolError};
use crate::status::Liveness;
use crate::token::store::TokenStore;

/// Re-reads the configuration (on SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The spool could not be opened or recovered.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Other users could write the spool or state directory.
    #[error(transparent)]
    Untrusted(#[from] crate::trust::Refusal),
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// A listener could not be bound.
    #[error(
        "listener \"{name}\": cannot listen on {address}: {source}{}",
        bind_advice(source, address)
    )]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        address: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A listener's certificate or key could not be loaded.
    #[error("listener \"{name}\": {message}")]
    Tls {
        /// Listener name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The signal handlers (SIGTERM, SIGINT, SIGHUP) could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

/// What to do about a bind error the operator meets on a fresh install.
fn bind_advice(e: &std::io::Error, addr: &SocketAddr) -> String {
    let port = addr.port();
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!(
            "; another program already listens on port {port} (often another mail server: \
             Postfix, Exim, sendmail). `ss -ltnp 'sport = :{port}'` shows which; stop it, or give \
             this listener another address or port"
        ),
        Some(libc::EACCES) if port < 1024 => {
            "; ports below 1024 need root or the CAP_NET_BIND_SERVICE capability: the systemd \
             unit grants it (AmbientCapabilities=CAP_NET_BIND_SERVICE); by hand, \
             `setcap cap_net_bind_service=+ep $(command -v postern)`, or use a port above 1023 \
             such as 2525"
                .into()
        }
        Some(libc::EADDRNOTAVAIL) => format!(
            "; no network interface of this machine has the address {}: listen on an address \
             that `ip -brief address` shows, or on 0.0.0.0",
            addr.ip()
        ),
        Some(libc::EAFNOSUPPORT) => {
            "; IPv6 is disabled on this machine: remove this listener or enable IPv6".into()
        }
        _ => String::new(),
    }
}

static JSON_STDOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Print the ready lines on standard output as JSON objects (with `--log-format json`), so a
/// JSON log has no plain lines.
pub fn set_json_stdout(on: bool) {
    JSON_STDOUT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A line on standard output for scripts and tests: `postern: listening on NAME ADDR` and
/// `postern: ready`, or the same as JSON.
fn announce(listener: Option<(&str, SocketAddr)>) {
    let json = JSON_STDOUT.load(std::sync::atomic::Ordering::Relaxed);
    match (listener, json) {
        (Some((name, addr)), false) => println!("postern: listening on {name} {addr}"),
        (Some((name, addr)), true) => println!(
            "{}",
            serde_json::json!({"event": "listening", "listener": name, "address": addr.to_string()})
        ),
        (None, false) => println!("postern: ready"),
        (None, true) => println!("{}", serde_json::json!({"event": "ready"})),
    }
}

/// Live listeners of one configuration generation.
struct Listeners {
    stop: CancellationToken,
    /// Listening sockets by their bound address (reused by a reload).
    sockets: HashMap<SocketAddr, std::net::TcpListener>,
    /// Name and bound address of each listener that listens, in config order.
    bound: Vec<(String, SocketAddr)>,
    /// The accept loops, so a reload can wait until the old ones stopped accepting.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listeners {
    /// Stop accepting, and wait (briefly) until every accept loop has returned: after this no
    /// connection is admitted with this generation's configuration. The new generation shares
    /// the same sockets, so a connection arriving once this returns always gets the new one.
    async fn retire(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT.
pub async fn run(config: Config, reload: Reload) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    // First of all: until these exist, SIGTERM's default action kills the process outright.
    // Installed after "ready" (as before), a SIGTERM sent right after readiness, while the
    // main thread was not yet scheduled again on a loaded machine, killed postern in the
    // middle of a client's transaction instead of letting it finish. A signal that arrives
    // during start-up is kept and handled once the main loop runs.
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return Err(DaemonError::Signals(e));
        }
    };
    raise_fd_limit();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Everything postern does with untrusted input (SMTP, TLS, HTTP) would run with every
        // privilege; it needs none but binding ports below 1024.
        warn!(
            "running as root: postern needs no privileges but binding ports below 1024 (CAP_NET_BIND_SERVICE); run it as its own user, as the systemd unit (User=postern) and the image (USER postern) do"
        );
    }
    crate::trust::prepare_serve(&config)?;
    let spool = Spool::open_exclusive(&config.spool_dir)?;
    spool.set_min_free(config.limits.min_free_disk);
    spool.set_message_memory(config.limits.message_memory);
    let r = spool.recover()?;
    info!(
        spool = %config.spool_dir.display(),
        drafts_removed = r.drafts_removed,
        restored = r.restored,
        delivered_removed = r.delivered_removed,
        duplicates_removed = r.duplicates_removed,
        requeued = r.requeued,
        quarantined = r.quarantined,
        "spool recovered"
    );
    let control_path = control::socket_path(&config.spool_dir);
    let control_listener = control::bind(&control_path)?;
    let live = Liveness::new();
    crate::metrics::configure(&config);
    let (config_tx, config_rx) = watch::channel(config.clone());

    let shutdown = CancellationToken::new();
    let conns = TaskTracker::new();
    let kick = Kick::default();
    // The token store: one per configuration generation (a reload may change accounts and
    // secrets); refresh tokens live on disk, so a new store loses nothing.
    let mut tokens = start_tokens(&config, &shutdown);
    let (plan_tx, plan_rx) = watch::channel(Plan::from_config(config.clone(), tokens.0.clone()));
    let new_ids = spool
        .take_new_messages()
        .ok_or_else(|| SpoolError::other("start", spool.root(), "forwarder already started"))?;
    let forwarder = Forwarder::new(
        spool.clone(),
        plan_rx,
        new_ids,
        kick.clone(),
        shutdown.clone(),
    );
    let running = live.forwarder();
    let forwarder = tokio::spawn(async move {
        let _running = running;
        tokio::select! {
            () = forwarder.run() => {}
            () = test_stop_forwarder() => error!("the forwarder was stopped (POSTERN_TEST_STOP_FORWARDER)"),
        }
    });
    let control_task = tokio::spawn(control::serve(
        control_listener,
        control_path,
        kick.clone(),
        shutdown.clone(),
    ));

    let auth_guard = Arc::new(AuthGuard::from_limits(&config.limits));
    crate::maillog::set_ipv6_prefix(config.limits.ipv6_prefix);
    // Sum up refusals that were counted rather than logged once their minute is over, also
    // when the flood has stopped (nothing else would trigger the summary then).
    let refusal_summaries = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => crate::maillog::flush_refusals(false),
                }
            }
        })
    };
    let limiter = Arc::new(ConnLimiter::from_limits(&config.limits));
    let shared = Shared {
        spool: spool.clone(),
        shutdown: shutdown.clone(),
        conns: conns.clone(),
        auth_guard,
        limiter,
        live: live.clone(),
    };
    let admin_task = start_admin(&config, &spool, config_rx, &live, &shutdown)?;
    let mut live_listeners = shared.start_listeners(&config, &HashMap::new())?;
    // Listeners skipped for want of IPv6 are not expected to run.
    live.expect_listeners(live_listeners.bound.len());
    for (name, addr) in &live_listeners.bound {
        // The ready lines on stdout are how scripts and tests learn the bound ports.
        announce(Some((name, *addr)));
    }
    if let Some((addr, _)) = &admin_task {
        announce(Some(("[admin]", *addr)));
    }
    announce(None);
    live.set_ready();
    sd_notify("READY=1");
    let mut watchdog = watchdog_interval().map(tokio::time::interval);
    info!(config = %config.source, "postern started");

    let mut current = config;
    loop {
        tokio::select! {
            // Alive means: this loop turns, and the forwarder has not died.
            _ = async {
                match watchdog.as_mut() {
                    Some(w) => { w.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            }, if watchdog.is_some() => {
                if !forwarder.is_finished() {
                    sd_notify("WATCHDOG=1");
                } else {
                    error!("the forwarder has stopped; not pinging the watchdog, so systemd restarts postern");
                }
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                sd_notify("RELOADING=1");
                match reload() {
                    Err(errs) => error!("configuration not reloaded, keeping the running one:\n{errs}"),
                    Ok(new) => {
                        let new = Arc::new(new);
                        if new.spool_dir != current.spool_dir {
                            warn!("spool_dir changed; that takes a restart (keeping {})", current.spool_dir.display());
                        }
                        // New listeners start beside the old ones (sharing the sockets of
                        // unchanged addresses), and only then do the old ones stop accepting:
                        // no connection attempt is refused during a reload, and a failure
                        // leaves everything as it was.
                        match shared.start_listeners(&new, &live_listeners.sockets) {
                            Ok(l) => {
                                std::mem::replace(&mut live_listeners, l).retire().await;
                                live.expect_listeners(live_listeners.bound.len());
                                crate::metrics::configure(&new);
                                if new.admin.as_ref().map(|a| a.address) != current.admin.as_ref().map(|a| a.address) {
                                    warn!("[admin] address changed; that takes a restart");
                                }
                                let _ = config_tx.send(new.clone());
                                spool.set_min_free(new.limits.min_free_disk);
                                spool.set_message_memory(new.limits.message_memory);
                                shared.limiter.set_limits(&new.limits);
                                shared.auth_guard.set_limits(&new.limits);
                                crate::maillog::set_ipv6_prefix(new.limits.ipv6_prefix);
                                tokens.1.cancel();
                                tokens = start_tokens(&new, &shutdown);
                                let _ = plan_tx.send(Plan::from_config(new.clone(), tokens.0.clone()));
                                kick.kick();
                                current = new;
                                info!(config = %current.source, "configuration reloaded");
                            }
                            Err(e) => error!("configuration not reloaded, keeping the running one: {e}"),
                        }
                    }
                }
                sd_notify("READY=1");
            }
        }
    }

    sd_notify("STOPPING=1");
    live.set_stopping();
    shutdown.cancel();
    live_listeners.stop.cancel();
    conns.close();
    let grace = current.delivery.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        conns.wait().await;
        let _ = forwarder.await;
    })
    .await;
    if drained.is_err() {
        warn!(grace = %humantime::format_duration(grace), "shutdown grace period over; unfinished work stays in the spool for the next start");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), control_task).await;
    if let Some((_, task)) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    // Leave every queued message durable as a queue file of its own, so the next start has
    // nothing to replay from the journal.
    let s = spool.clone();
    match tokio::task::spawn_blocking(move || s.checkpoint()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "final journal checkpoint failed; the next start replays the journal")
        }
        Err(e) => {
            warn!(error = %e, "final journal checkpoint failed; the next start replays the journal")
        }
    }
    let _ = refusal_summaries.await;
    crate::maillog::flush_refusals(true);
    info!("postern stopped");
    Ok(())
}

/// A token store for `config` and the cancel handle of its maintenance task (weekly refresh of
/// idle delegated tokens, daily expiry warnings).
fn start_tokens(
    config: &Config,
    shutdown: &CancellationToken,
) -> (Arc<TokenStore>, CancellationToken) {
    let store = Arc::new(TokenStore::from_config(config));
    for w in store.expiry_warnings() {
        warn!("{w}");
    }
    let cancel = shutdown.child_token();
    if !config.accounts.is_empty() {
        tokio::spawn(store.clone().run_maintenance(cancel.clone()));
    }
    (store, cancel)
}

struct Shared {
    live: Arc<Liveness>,
    spool: Spool,
    shutdown: CancellationToken,
    conns: TaskTracker,
    auth_guard: Arc<AuthGuard>,
    limiter: Arc<ConnLimiter>,
}

impl Shared {
    /// Bind (or reuse, for unchanged addresses) every listener of `config` and start serving.
    fn start_listeners(
        &self,
        config: &Arc<Config>,
        old: &HashMap<SocketAddr, std::net::TcpListener>,
    ) -> Result<Listeners, DaemonError> {
        let stop = CancellationToken::new();
        let mut sockets = HashMap::new();
        let mut bound = Vec::new();
        let mut prepared = Vec::new();
        let mut tasks = Vec::new();
        let mut skipped = None;
        for l in &config.listeners {
            let tls = match &l.tls_files {
                Some(files) if l.tls != crate::config::TlsMode::None => {
                    Some(tls::acceptor(files).map_err(|e| DaemonError::Tls {
                        name: l.name.clone(),
                        message: e.to_string(),
                    })?)
                }
                _ => None,
            };
            let bind_err = |source| DaemonError::Bind {
                name: l.name.clone(),
                address: l.address,
                source,
            };
            // Port 0 means "any free port": never reuse for it.
            let std_sock = match old.get(&l.address).filter(|_| l.address.port() != 0) {
                Some(s) => s.try_clone().map_err(bind_err)?,
                None => match bind(l.address) {
                    Ok(s) => s,
                    // A host (or container) without IPv6 cannot listen on [::1] or [::]: the
                    // packaged configuration listens on both 127.0.0.1 and [::1], and must
                    // start there too. Any other listener failing is fatal.
                    Err(e) if ipv6_unavailable(&e, l.address) => {
                        warn!(listener = %l.name, address = %l.address, error = %e, "IPv6 is not available on this machine; this listener is skipped");
                        skipped.get_or_insert(bind_err(e));
                        continue;
                    }
                    Err(e) => return Err(bind_err(e)),
                },
            };
            let addr = std_sock.local_addr().map_err(bind_err)?;
            let clone = std_sock.try_clone().map_err(bind_err)?;
            sockets.insert(addr, std_sock);
            bound.push((l.name.clone(), addr));
            prepared.push((l.clone(), tls, clone));
        }
        if let (true, Some(e)) = (prepared.is_empty(), skipped) {
            return Err(e);
        }
        for (l, tls, sock) in prepared {
            let tcp =
                tokio::net::TcpListener::from_std(sock).map_err(|source| DaemonError::Bind {
                    name: l.name.clone(),
                    address: l.address,
                    source,
                })?;
            let ctx = Arc::new(ListenerContext {
                config: config.clone(),
                listener: l,
                tls,
                sink: Arc::new(self.spool.clone()),
                auth_guard: self.auth_guard.clone(),
                limiter: self.limiter.clone(),
                shutdown: self.shutdown.clone(),
                stop: stop.clone(),
                tracker: self.conns.clone(),
            });
            let running = self.live.listener();
            tasks.push(tokio::spawn(async move {
                let _running = running;
                run_listener(tcp, ctx).await;
            }));
        }
        Ok(Listeners {
            stop,
            sockets,
            bound,
            tasks,
        })
    }
}

/// The error of binding an IPv6 address on a machine where IPv6 is off.
fn ipv6_unavailable(e: &std::io::Error, addr: SocketAddr) -> bool {
    addr.is_ipv6()
        && matches!(
            e.raw_os_error(),
            Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
        )
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    let l = sock.listen(1024)?;
    l.into_std()
}

/// Bind and start the admin HTTP listener, when configured: its bound address and task.
fn start_admin(
    config: &Config,
    spool: &Spool,
    config_rx: watch::Receiver<Arc<Config>>,
    live: &Arc<Liveness>,
    shutdown: &CancellationToken,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>, DaemonError> {
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    let err = |source| DaemonError::Bind {
        name: "[admin]".into(),
        address: admin.address,
        source,
    };
    let l = crate::web::bind(admin.address).map_err(err)?;
    let addr = l.local_addr().map_err(err)?;
    let state = crate::web::AdminState {
        spool: spool.clone(),
        config: config_rx,
        live: live.clone(),
    };
    let task = tokio::spawn(crate::web::serve(l, state, shutdown.clone()));
    info!(address = %addr, "admin listener (metrics, health, status page) started");
    Ok(Some((addr, task)))
}

/// A test hook: when `POSTERN_TEST_STOP_FORWARDER` names a file, the forwarder stops once
/// that file exists (so tests can see `/healthz` turn 503). Never resolves otherwise.
async fn test_stop_forwarder() {
    let Some(path) = std::env::var_os("POSTERN_TEST_STOP_FORWARDER") else {
        return std::future::pending().await;
    };
    let path = std::path::PathBuf::from(path);
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tell systemd (Type=notify) about our state; a no-op outside systemd.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    // "@name" is a socket in the abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    if let (Ok(sock), Ok(addr)) = (std::os::unix::net::UnixDatagram::unbound(), addr) {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// Half the watchdog timeout systemd gave us (WatchdogSec=), if it is meant for this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Each connection costs a descriptor; raise the soft limit to the hard one (as Postfix
/// does) so `max_connections` is not capped by a default of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a properly initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
