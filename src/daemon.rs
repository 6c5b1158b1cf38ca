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
    #[error("listener \"{name}\": cannot listen on {address}: {source}")]
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
}

/// Live listeners of one configuration generation.
struct Listeners {
    stop: CancellationToken,
    /// Listening sockets by their bound address (reused by a reload).
    sockets: HashMap<SocketAddr, std::net::TcpListener>,
    /// Bound address of each configured listener, in config order.
    bound: Vec<SocketAddr>,
}

/// Run the daemon until SIGTERM/SIGINT.
pub async fn run(config: Config, reload: Reload) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    raise_fd_limit();
    crate::trust::prepare_serve(&config)?;
    let spool = Spool::open_exclusive(&config.spool_dir)?;
    spool.set_min_free(config.limits.min_free_disk);
    let r = spool.recover()?;
    info!(
        spool = %config.spool_dir.display(),
        drafts_removed = r.drafts_removed,
        restored = r.restored,
        delivered_removed = r.delivered_removed,
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

    let auth_guard = Arc::new(AuthGuard::new(
        config.limits.auth_max_failures,
        config.limits.auth_lockout,
    ));
    let limiter = Arc::new(ConnLimiter::new(
        config.limits.max_connections,
        config.limits.max_connections_per_ip,
    ));
    let shared = Shared {
        spool: spool.clone(),
        shutdown: shutdown.clone(),
        conns: conns.clone(),
        auth_guard,
        limiter,
        live: live.clone(),
    };
    live.expect_listeners(config.listeners.len());
    let admin_task = start_admin(&config, &spool, config_rx, &live, &shutdown)?;
    let mut live_listeners = shared.start_listeners(&config, &HashMap::new())?;
    for (l, addr) in config.listeners.iter().zip(&live_listeners.bound) {
        // The ready lines on stdout are how scripts and tests learn the bound ports.
        println!("postern: listening on {} {}", l.name, addr);
    }
    if let Some((addr, _)) = &admin_task {
        println!("postern: listening on [admin] {addr}");
    }
    println!("postern: ready");
    live.set_ready();
    sd_notify("READY=1");
    info!(config = %config.source, "postern started");

    let mut current = config;
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            error!("cannot install signal handlers");
            return Ok(());
        }
    };
    loop {
        tokio::select! {
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
                                live_listeners.stop.cancel();
                                live_listeners = l;
                                live.expect_listeners(new.listeners.len());
                                crate::metrics::configure(&new);
                                if new.admin.as_ref().map(|a| a.address) != current.admin.as_ref().map(|a| a.address) {
                                    warn!("[admin] address changed; that takes a restart");
                                }
                                let _ = config_tx.send(new.clone());
                                spool.set_min_free(new.limits.min_free_disk);
                                shared.limiter.set_limits(new.limits.max_connections, new.limits.max_connections_per_ip);
                                shared.auth_guard.set_limits(new.limits.auth_max_failures, new.limits.auth_lockout);
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
                None => bind(l.address).map_err(bind_err)?,
            };
            let addr = std_sock.local_addr().map_err(bind_err)?;
            let clone = std_sock.try_clone().map_err(bind_err)?;
            sockets.insert(addr, std_sock);
            bound.push(addr);
            prepared.push((l.clone(), tls, clone));
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
            tokio::spawn(async move {
                let _running = running;
                run_listener(tcp, ctx).await;
            });
        }
        Ok(Listeners {
            stop,
            sockets,
            bound,
        })
    }
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
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let path = std::path::PathBuf::from(path);
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.send_to(state.as_bytes(), &path);
        }
    }
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
