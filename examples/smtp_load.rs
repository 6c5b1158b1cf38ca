//! A load generator for the end-to-end benchmark (bench/e2e.py): sends N messages over C
//! concurrent clients, one message per SMTP connection (as printers and scanners send),
//! round-robin over several sender mailboxes, and prints one JSON line with the result.
//!
//! Three ways to talk to the server, one per benchmark column:
//! - plain (to postern): `EHLO, MAIL, RCPT, DATA, QUIT`;
//! - `--xoauth2` (the direct client): `EHLO, STARTTLS, EHLO, AUTH XOAUTH2` with an app-only
//!   token fetched once from `--token-url` (client credentials), then the message;
//! - `--auth-plain PASSWORD` (to emailproxy): `AUTH PLAIN` as the sender, then the message.
//!
//! ```text
//! cargo run --release --example smtp_load -- --server 127.0.0.1:2525 --messages 2000 \
//!     --clients 10 --size 2048 --senders a@contoso.com,b@contoso.com
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Command line.
#[derive(Parser, Debug, Clone)]
#[command(about = "SMTP load: one message per connection, C clients at once")]
struct Args {
    /// Server address.
    #[arg(long)]
    server: SocketAddr,
    /// Messages in all.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Message size in bytes (headers included).
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Sender addresses, comma-separated; messages take them in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    senders: Vec<String>,
    /// Recipient.
    #[arg(long, default_value = "boss@fabrikam.com")]
    rcpt: String,
    /// STARTTLS and AUTH XOAUTH2 (the direct client): a token is fetched once from
    /// `--token-url` with `--client-id`/`--client-secret`/`--scope`.
    #[arg(long)]
    xoauth2: bool,
    /// PEM file of the CA to trust for STARTTLS.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Name the server's certificate is checked against.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Entra's token endpoint.
    #[arg(long)]
    token_url: Option<String>,
    /// App registration.
    #[arg(long)]
    client_id: Option<String>,
    /// Its secret.
    #[arg(long)]
    client_secret: Option<String>,
    /// Scope asked for.
    #[arg(long, default_value = "https://outlook.office365.com/.default")]
    scope: String,
    /// AUTH PLAIN as the sender with this password (emailproxy's login).
    #[arg(long)]
    auth_plain: Option<String>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let token = if args.xoauth2 {
        Some(fetch_token(&args).await?)
    } else {
        None
    };
    let tls = match &args.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)? {
                roots.add(c?)?;
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
        None => None,
    };
    let bodies: Vec<Vec<u8>> = args
        .senders
        .iter()
        .map(|s| body(s, &args.rcpt, args.size))
        .collect();
    let shared = Arc::new(Shared {
        args: args.clone(),
        token,
        tls,
        bodies,
        next: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        first_error: std::sync::Mutex::new(None),
    });
    let start = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|_| {
            let s = shared.clone();
            tokio::spawn(async move {
                loop {
                    let i = s.next.fetch_add(1, Ordering::Relaxed);
                    if i >= s.args.messages {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_secs(120), s.send_one(i)).await {
                        Ok(Ok(())) => {
                            s.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => s.fail(e.to_string()),
                        Err(_) => s.fail("timed out".into()),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let wall = start.elapsed().as_secs_f64();
    let first_error = shared
        .first_error
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    println!(
        "{}",
        json!({
            "sent": shared.sent.load(Ordering::Relaxed),
            "failed": shared.failed.load(Ordering::Relaxed),
            "wall_s": wall,
            "first_error": first_error,
        })
    );
    Ok(())
}

struct Shared {
    args: Args,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
    bodies: Vec<Vec<u8>>,
    next: AtomicUsize,
    sent: AtomicUsize,
    failed: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(e);
        }
    }

    async fn send_one(&self, i: usize) -> Result<(), Error> {
        let sender = &self.args.senders[i % self.args.senders.len()];
        let body = &self.bodies[i % self.bodies.len()];
        let tcp = TcpStream::connect(self.args.server).await?;
        tcp.set_nodelay(true)?;
        let mut c = BufReader::new(tcp);
        expect(&mut c, 220).await?;
        command(&mut c, "EHLO load.test", 250).await?;
        if let Some(token) = &self.token {
            command(&mut c, "STARTTLS", 220).await?;
            let tls = self.tls.as_ref().ok_or("--xoauth2 needs --ca-file")?;
            let name = ServerName::try_from(self.args.tls_name.clone())?;
            let stream = tls.connect(name, c.into_inner()).await?;
            let mut c = BufReader::new(stream);
            command(&mut c, "EHLO load.test", 250).await?;
            let sasl = base64::engine::general_purpose::STANDARD
                .encode(format!("user={sender}\x01auth=Bearer {token}\x01\x01"));
            command(&mut c, &format!("AUTH XOAUTH2 {sasl}"), 235).await?;
            transaction(&mut c, sender, &self.args.rcpt, body).await
        } else {
            if let Some(password) = &self.args.auth_plain {
                let plain = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{sender}\0{password}"));
                command(&mut c, &format!("AUTH PLAIN {plain}"), 235).await?;
            }
            transaction(&mut c, sender, &self.args.rcpt, body).await
        }
    }
}

async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufReader<S>,
    sender: &str,
    rcpt: &str,
    body: &[u8],
) -> Result<(), Error> {
    command(c, &format!("MAIL FROM:<{sender}>"), 250).await?;
    command(c, &format!("RCPT TO:<{rcpt}>"), 250).await?;
    command(c, "DATA", 354).await?;
    c.get_mut().write_all(body).await?;
    c.get_mut().write_all(b".\r\n").await?;
    c.get_mut().flush().await?;
    expect(c, 250).await?;
    command(c, "QUIT", 221).await?;
    Ok(())
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufReader<S>,
    line: &str,
    want: u16,
) -> Result<(), Error> {
    c.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await?;
    c.get_mut().flush().await?;
    expect(c, want)
        .await
        .map_err(|e| format!("{}: {e}", line.split(' ').next().unwrap_or("")).into())
}

/// Read one reply; `Err` unless its code is `want`.
async fn expect<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut BufReader<S>,
    want: u16,
) -> Result<(), Error> {
    loop {
        let mut line = String::new();
        if c.read_line(&mut line).await? == 0 {
            return Err("connection closed".into());
        }
        let code: u16 = line
            .get(..3)
            .and_then(|d| d.parse().ok())
            .ok_or("bad reply")?;
        if line.as_bytes().get(3) == Some(&b'-') {
            continue;
        }
        if code != want {
            return Err(format!("expected {want}, got {}", line.trim_end()).into());
        }
        return Ok(());
    }
}

/// A message of `size` bytes from `sender` (CRLF lines, none starting with a dot, ending
/// with CRLF: ready for DATA as is).
fn body(sender: &str, rcpt: &str, size: usize) -> Vec<u8> {
    let mut b = format!(
        "From: {sender}\r\nTo: {rcpt}\r\nSubject: benchmark\r\nMessage-ID: <bench@load.test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog 0123456789 ABCDEFGHIJKLMNOPQRSTU\r\n";
    while b.len() + line.len() <= size {
        b.extend_from_slice(line);
    }
    while b.len() + 2 < size {
        b.push(b'x');
    }
    b.extend_from_slice(b"\r\n");
    b
}

/// An app-only access token (client credentials).
async fn fetch_token(args: &Args) -> Result<String, Error> {
    let url = args
        .token_url
        .as_deref()
        .ok_or("--xoauth2 needs --token-url")?;
    let form = [
        ("grant_type", "client_credentials"),
        (
            "client_id",
            args.client_id.as_deref().ok_or("--client-id missing")?,
        ),
        (
            "client_secret",
            args.client_secret
                .as_deref()
                .ok_or("--client-secret missing")?,
        ),
        ("scope", args.scope.as_str()),
    ];
    let v: serde_json::Value = reqwest::Client::new()
        .post(url)
        .form(&form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["access_token"]
        .as_str()
        .ok_or("no access_token in the answer")?
        .to_string())
}
