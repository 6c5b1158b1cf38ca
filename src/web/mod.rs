//! The admin HTTP listener (`[admin] address`, off unless configured): `/metrics`
//! (OpenMetrics text for Prometheus), `/healthz` and `/readyz` (200 or 503, for Docker,
//! Kubernetes and load balancers), `/` (the status page: one small HTML page, no JavaScript,
//! refreshing itself) and `/status.json` (the same for scripts).
//!
//! The health endpoints answer anyone: they say only "up" or what is down. Everything else
//! shows mailboxes and errors, so when a token is configured it must come as
//! `Authorization: Bearer TOKEN` (Prometheus' `authorization` / `bearer_token`), or as the
//! password of HTTP Basic authentication (a browser asks for it). Config validation refuses a
//! non-loopback address without a token. The token is read on every request, so replacing
//! its file takes effect without a restart.

mod listener;
mod page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::spool::Spool;
use crate::status::{self, Liveness, Snapshot};

/// How often the status page reloads itself.
pub const PAGE_REFRESH_SECS: u32 = 10;

/// The status page's Content-Security-Policy: its own inline style, nothing else.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The spool (opened by the daemon).
    pub spool: Spool,
    /// The configuration in force (replaced on reload).
    pub config: watch::Receiver<Arc<Config>>,
    /// Which parts of the daemon run.
    pub live: Arc<Liveness>,
}

/// Bind the admin listener (before the daemon says it is ready).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve until `shutdown`.
pub async fn serve(
    listener: std::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener cannot start");
            return;
        }
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener::Bounded::new(listener), app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// `None` when the request may see private pages; else the 401 to send.
fn unauthorized(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let cfg = state.config.borrow().clone();
    let source = cfg.admin.as_ref()?.token.as_ref()?;
    let expected = match crate::token::entra::read_secret(source) {
        Ok(t) => t,
        Err(why) => {
            tracing::error!(error = %why, "admin token cannot be read; refusing admin requests");
            return Some(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the admin token cannot be read (see the log)\n",
                )
                    .into_response(),
            );
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(t) = v.strip_prefix("Bearer ") {
                Some(t.trim().to_string())
            } else {
                let b = v.strip_prefix("Basic ")?;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()?;
                let s = String::from_utf8(raw).ok()?;
                s.split_once(':').map(|(_, p)| p.to_string())
            }
        });
    let ok = given.is_some_and(|g| {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            g.as_bytes(),
            expected.expose().as_bytes(),
        )
        .is_ok()
    });
    if ok {
        return None;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "this page needs the admin token: Authorization: Bearer TOKEN, or any user name with the token as password\n",
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"postern\", charset=\"UTF-8\""),
    );
    Some(r)
}

/// Read the spool off the async threads.
async fn snapshot(state: &AdminState, detail: bool) -> Option<Snapshot> {
    let spool = state.spool.clone();
    let cfg = state.config.borrow().clone();
    let live = state.live.clone();
    tokio::task::spawn_blocking(move || status::collect(&spool, &cfg, Some(&live), detail))
        .await
        .ok()
}

async fn page(AxState(state): AxState<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    match snapshot(&state, true).await {
        Some(s) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // The page shows text clients chose (sender mailboxes, errors): it is escaped,
                // and should anything slip through, the browser runs no script, loads nothing
                // and does not let another site frame the page.
                (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            page::render(&s, PAGE_REFRESH_SECS),
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn status_json(AxState(state): AxState<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    match snapshot(&state, true).await {
        Some(s) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            serde_json::to_string_pretty(&s).unwrap_or_default(),
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn metrics(AxState(state): AxState<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&state, &headers) {
        return r;
    }
    if let Some(s) = snapshot(&state, false).await {
        crate::metrics::observe(&s);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(),
    )
        .into_response()
}

async fn healthz(AxState(state): AxState<AdminState>) -> Response {
    let problems = state.live.problems();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

async fn readyz(AxState(state): AxState<AdminState>) -> Response {
    let mut why = state.live.problems();
    if !state.live.ready() && why.is_empty() {
        why.push("starting up".into());
    }
    let min_free = state.config.borrow().limits.min_free_disk;
    if min_free > 0
        && let Ok(free) = state.spool.free_bytes()
        && free < min_free
    {
        why.push(format!(
            "the spool's filesystem has {free} bytes free, below min_free_disk ({min_free}): new mail is refused with 452"
        ));
    }
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join("; ")),
        )
            .into_response()
    }
}
