//! The test suite's fake Microsoft 365 (tests/it/fake/: Entra's token endpoint and Exchange
//! Online SMTP) as a stand-alone process, for benchmarks (bench/) and trying postern by hand.
//!
//! Unlike in the tests, nothing is throttled: no concurrent-connection limit, no recipient
//! quota, and message bytes are not kept (only counted), so the fake's memory stays flat over
//! long runs.
//!
//! ```text
//! cargo run --release --example fake_m365 -- [--entra ADDR] [--exchange ADDR] [--control ADDR]
//! ```
//!
//! Every address defaults to `127.0.0.1:0` (a free port). Once serving, it prints one JSON line
//! on stdout with what it got:
//! `{"entra":"http://127.0.0.1:P","exchange":"127.0.0.1:P","ca_file":"/tmp/…/fake-exchange-ca.pem",
//! "control":"http://127.0.0.1:P","tenant":…,"client_id":…,"client_secret":…}`.
//! The control address answers `GET /stats` with counts per service (JSON). It stops when
//! stdin reaches end of file, or on SIGTERM / SIGINT.
//!
//! The fake Graph (sendMail, drafts, attachments and upload sessions) runs on a free port
//! (`"graph"` in the ready line); its tokens carry Mail.Send and Mail.ReadWrite, it does not
//! check Send As, and what it receives is counted, then dropped (a thread empties its
//! records every 200 ms), so long runs and the 100 MB message keep its memory flat.
//!
//! To add a service: start its fake in [`Fakes::start`], add it to the ready line and to
//! [`Fakes::stats`].

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/fake/mod.rs"]
mod fake;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use clap::Parser;
use serde_json::{Value, json};

use fake::entra::{CLIENT_ID, FakeEntra, SECRET, TENANT};
use fake::exchange::{FakeExchange, Script};
use fake::graph::FakeGraph;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "A fake Microsoft 365 (Entra token endpoint, Exchange Online SMTP) on loopback")]
struct Args {
    /// Address of the fake Entra token endpoint (HTTP).
    #[arg(long, default_value = "127.0.0.1:0")]
    entra: SocketAddr,
    /// Address of the fake Exchange Online SMTP submission server (STARTTLS, XOAUTH2).
    #[arg(long, default_value = "127.0.0.1:0")]
    exchange: SocketAddr,
    /// Address of the control endpoint (`GET /stats`).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3599)]
    token_lifetime: u64,
    /// Do not offer CHUNKING (BDAT): clients must use DATA.
    #[arg(long)]
    no_chunking: bool,
    /// Keep message bytes in memory (the tests' behaviour); off by default.
    #[arg(long)]
    keep_data: bool,
}

/// The running fakes.
struct Fakes {
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    /// What the fake Graph did, counted before its records are dropped.
    graph_counts: std::sync::Mutex<GraphCounts>,
}

/// Totals of the fake Graph since start.
#[derive(Default, Clone, Copy)]
struct GraphCounts {
    /// Requests answered.
    requests: u64,
    /// Messages sent (sendMail, or a draft's send).
    sent: u64,
    /// Of which through a draft.
    sent_drafts: u64,
    /// MIME bytes of the messages sent (drafts: their skeleton).
    sent_bytes: u64,
    /// Upload-session PUTs, and their bytes.
    upload_puts: u64,
    upload_bytes: u64,
    /// Answers that were errors (4xx/5xx).
    errors: u64,
}

impl Fakes {
    fn start(args: &Args) -> Fakes {
        let entra = FakeEntra::start_on(args.entra);
        entra.state().lifetime = args.token_lifetime;
        let mut script = Script::new().accept_tokens(entra.smtp_token_check());
        script.max_concurrent = usize::MAX;
        script.recipient_quota = usize::MAX;
        script.keep_data = args.keep_data;
        script.chunking = !args.no_chunking;
        let exchange = FakeExchange::start_on(script, args.exchange);
        // Graph: app-only tokens with Mail.Send, and Mail.ReadWrite for drafts (large
        // messages); the SMTP role stays for the fake Exchange.
        entra.state().app_roles = Some(vec![
            "SMTP.SendAsApp".into(),
            "Mail.Send".into(),
            "Mail.ReadWrite".into(),
        ]);
        let graph = FakeGraph::start(entra.issued_check());
        {
            let mut g = graph.state();
            g.check_send_as = false;
            g.uploads.keep_data = false;
        }
        Fakes {
            entra,
            exchange,
            graph,
            graph_counts: std::sync::Mutex::new(GraphCounts::default()),
        }
    }

    /// Count what the fake Graph recorded, then drop it (the fake keeps every request and
    /// message for tests; a benchmark only needs the totals).
    fn drain_graph(&self) {
        let mut c = self.graph_counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = self.graph.state();
        for r in g.requests.drain(..) {
            c.requests += 1;
            if r.status >= 400 || r.status == 0 {
                c.errors += 1;
            }
            if r.method == "PUT" && r.path.starts_with("/upload/") {
                c.upload_puts += 1;
                c.upload_bytes += r.body.len() as u64;
            }
        }
        for m in g.sent.drain(..) {
            c.sent += 1;
            c.sent_bytes += m.mime.len() as u64;
            if m.via == "draft" {
                c.sent_drafts += 1;
            }
        }
        // Sent drafts stay under their immutable id in a real mailbox; here they go.
        let gone: Vec<String> = g
            .drafts
            .iter()
            .filter(|(_, d)| !d.is_draft)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            g.drafts.remove(&id);
            g.uploads.forget(&id);
        }
    }

    /// What the ready line says about the services.
    fn describe(&self) -> Value {
        json!({
            "entra": self.entra.base,
            "exchange": self.exchange.addr().to_string(),
            "ca_file": self.exchange.ca_pem().display().to_string(),
            "graph": self.graph.base,
            "tenant": TENANT,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
        })
    }

    fn stats(&self) -> Value {
        self.drain_graph();
        let g = *self.graph_counts.lock().unwrap_or_else(|p| p.into_inner());
        let t = self.exchange.totals();
        json!({
            "entra": { "token_requests": self.entra.token_requests() },
            "exchange": {
                "connections": t.connections,
                "auths": t.auths,
                "auths_ok": t.auths_ok,
                "messages": t.messages,
                "delivered": t.delivered,
                "delivered_bytes": t.delivered_bytes,
            },
            "graph": {
                "requests": g.requests,
                "errors": g.errors,
                "sent": g.sent,
                "sent_drafts": g.sent_drafts,
                "sent_bytes": g.sent_bytes,
                "upload_puts": g.upload_puts,
                "upload_bytes": g.upload_bytes,
            },
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // Each fake runs on its own thread and runtime; this one only serves /stats and waits.
    let fakes = Arc::new(Fakes::start(&args));
    let drainer = fakes.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            drainer.drain_graph();
        }
    });
    let control = tokio::net::TcpListener::bind(args.control).await?;
    let mut ready = fakes.describe();
    ready["control"] = json!(format!("http://{}", control.local_addr()?));
    println!("{ready}");

    let app = Router::new()
        .route(
            "/stats",
            get(|State(f): State<Arc<Fakes>>| async move { axum::Json(f.stats()) }),
        )
        .with_state(fakes.clone());
    let server = axum::serve(control, app).with_graceful_shutdown(stopped());
    server.await?;
    // Dropping the fakes stops their threads.
    drop(fakes);
    Ok(())
}

/// Resolves at end of stdin, SIGTERM or SIGINT.
async fn stopped() {
    use tokio::io::AsyncReadExt;
    use tokio::signal::unix::{SignalKind, signal};
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        stdin_closed.await;
        return;
    };
    tokio::select! {
        _ = stdin_closed => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
