//! `postern test --from A --to B [--route NAME] [--dry-run]`: send one test message through
//! the configured path now and print every step with the upstream's reply: the route chosen,
//! the access token (audience, roles or scopes, expiry), connect, STARTTLS with the
//! server certificate's subject, AUTH, MAIL, RCPT, DATA; on failure the cause and fix from the
//! one table ([`crate::diagnosis`]). Exit status 0 only when the upstream accepted the message
//! (or, with `--dry-run`, signed in: it stops before MAIL FROM).
//!
//! Nothing here speaks SMTP: the transport's own code runs (the same connect, sign-in and
//! dialogue a delivery uses, `doctor`'s sign-in probe for `--dry-run`), watched through
//! [`crate::upstream::watch`]. The token comes from Entra directly and is not stored
//! ([`crate::doctor::tokens`]), so a test changes nothing the daemon relies on. The test
//! message does not go through the spool and is not logged by a running daemon.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use crate::address::Address;
use crate::config::{Config, RouteConfig, TransportConfig};
use crate::diagnosis::{self, Vars};
use crate::doctor::tokens::DoctorTokens;
use crate::spool::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient, now_secs};
use crate::token::inspect::{decode_claims, warnings};
use crate::token::{Audience, TokenSource};
use crate::upstream::file::FileTransport;
use crate::upstream::graph::GraphTransport;
use crate::upstream::rewrite::Rewritten;
use crate::upstream::smtp::SmtpTransport;
use crate::upstream::watch::{self, Event, Watcher};
use crate::upstream::{Outcome, Outgoing, Transport};

/// Exit status: the upstream accepted the message (or signed in, for a dry run).
pub const OK: u8 = 0;
/// Exit status: a step failed (refused, held, no token, cannot connect).
pub const FAILED: u8 = 1;
/// Exit status: the command line is wrong (no such route, a bad address).
pub const USAGE: u8 = 64;

/// What to test.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Envelope sender and `From:`.
    pub from: String,
    /// The one recipient.
    pub to: String,
    /// The route to use; default: the one the daemon would choose for `from`.
    pub route: Option<String>,
    /// Stop before MAIL FROM (sign in only).
    pub dry_run: bool,
}

/// Run the test, printing each step to standard output; returns the exit status.
pub async fn run(cfg: &Config, t: &Trial) -> u8 {
    let out = Steps::default();
    let code = trial(cfg, t, &out).await;
    match code {
        OK if t.dry_run => out.line(
            "result",
            "signed in; dry run: stopped before MAIL FROM, no message was sent",
        ),
        OK => out.line("result", "accepted by the upstream"),
        _ => out.line("result", "failed: the message was not sent"),
    }
    code
}

async fn trial(cfg: &Config, t: &Trial, out: &Steps) -> u8 {
    if let Err(e) = Address::parse(&t.to) {
        out.fail("--to", &format!("<{}> is not an address: {e}", t.to));
        return USAGE;
    }
    if !t.from.is_empty()
        && let Err(e) = Address::parse(&t.from)
    {
        out.fail("--from", &format!("<{}> is not an address: {e}", t.from));
        return USAGE;
    }
    let route = match &t.route {
        Some(name) => match cfg.routes.iter().find(|r| r.name == *name) {
            Some(r) => r,
            None => {
                let names: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
                out.fail(
                    "route",
                    &format!(
                        "there is no [route.{name}] in {}; the routes are: {}",
                        cfg.source,
                        names.join(", ")
                    ),
                );
                return USAGE;
            }
        },
        None => match cfg.route_for(&t.from) {
            Some(r) => r,
            None => {
                out.fail(
                    "route",
                    &format!(
                        "no route in {} accepts the sender <{}>, so the daemon refuses its mail at MAIL FROM; add it (or a pattern such as \"*@{}\") to a route's senders",
                        cfg.source,
                        t.from,
                        t.from.rsplit('@').next().unwrap_or("")
                    ),
                );
                return FAILED;
            }
        },
    };
    let mailbox = match (&route.mailbox, t.from.is_empty()) {
        (Some(m), _) => m.clone(),
        (None, false) => t.from.clone(),
        (None, true) => {
            out.fail(
                "route",
                &format!(
                    "route \"{}\" sends as the sender's own mailbox, and the null sender has none; set its mailbox",
                    route.name
                ),
            );
            return FAILED;
        }
    };
    out.ok(
        "route",
        &format!(
            "{} ({}), sending as {mailbox}{}",
            route.name,
            describe(&route.transport),
            if route.rewrite_from {
                " with rewrite_from (sender and From: become the mailbox)"
            } else {
                ""
            }
        ),
    );
    // The daemon refuses such a sender at MAIL FROM: say so, with the same words.
    if let Some(why) = crate::smtp::policy::cannot_send_as(cfg, route, &t.from, true) {
        out.fail(
            "sender",
            &format!(
                "the daemon refuses <{}> at MAIL FROM: Microsoft 365 cannot send mail as this address; {why}",
                t.from
            ),
        );
        return FAILED;
    }
    match &route.transport {
        TransportConfig::Discard => {
            out.ok("discard", "the route drops mail: nothing is sent anywhere");
            OK
        }
        TransportConfig::File { dir } => {
            if t.dry_run {
                out.ok("file", &format!("would write into {}", dir.display()));
                return OK;
            }
            let transport = FileTransport::new(dir.clone());
            send(cfg, t, route, &mailbox, &transport, out).await
        }
        TransportConfig::Smtp { account } => smtp(cfg, t, route, account, &mailbox, out).await,
        TransportConfig::Graph {
            account,
            save_to_sent_items,
            max_message_size,
        } => {
            let graph_route = GraphRoute {
                account,
                save_to_sent_items: *save_to_sent_items,
                max_message_size: *max_message_size,
            };
            graph(cfg, t, route, &graph_route, &mailbox, out).await
        }
        // Transports added later (Graph) say so rather than fail to build; allowed because
        // today every variant is matched above.
        #[allow(unreachable_patterns)]
        _ => {
            out.fail(
                "transport",
                &format!(
                    "postern test does not support {} routes yet; `postern doctor` checks their sign-in",
                    describe(&route.transport)
                ),
            );
            FAILED
        }
    }
}

async fn smtp(
    cfg: &Config,
    t: &Trial,
    route: &RouteConfig,
    account: &str,
    mailbox: &str,
    out: &Steps,
) -> u8 {
    let Some(acc) = cfg.account(account) else {
        out.fail("account", &format!("there is no [account.{account}]"));
        return FAILED;
    };
    let vars = crate::explain::account_vars(Vars::new(), acc, mailbox);
    let tokens = Arc::new(DoctorTokens::new(cfg));
    if !token_step(&tokens, acc, mailbox, Audience::Smtp, &vars, out).await {
        return FAILED;
    }
    let source: Arc<dyn TokenSource> = tokens;
    let transport = match SmtpTransport::new(acc, source, cfg.hostname.clone()) {
        Ok(t) => t,
        Err(e) => {
            out.fail("transport", &e.to_string());
            return FAILED;
        }
    };
    let watcher: Arc<dyn Watcher> = Arc::new(out.clone());
    if t.dry_run {
        return match watch::watched(watcher, transport.probe_login(mailbox)).await {
            Ok(_) => OK,
            Err(o) => {
                out.outcome(&o, &vars);
                FAILED
            }
        };
    }
    send(cfg, t, route, mailbox, &transport, out).await
}

/// Get a token for `mailbox` and print what it allows; false (after printing why and the fix)
/// when there is none.
async fn token_step(
    tokens: &DoctorTokens,
    acc: &crate::config::AccountConfig,
    mailbox: &str,
    audience: Audience,
    vars: &Vars,
    out: &Steps,
) -> bool {
    match tokens.token(&acc.name, mailbox, audience).await {
        Ok(tok) => {
            let now = now_secs();
            match decode_claims(tok.token.expose()) {
                Ok(c) => {
                    let mut s = format!(
                        "for {mailbox} from {}: audience {}",
                        acc.endpoints.token_url,
                        c.aud.as_deref().unwrap_or("-")
                    );
                    if !c.roles.is_empty() {
                        let _ = write!(s, ", roles {}", c.roles.join(" "));
                    }
                    if !c.scp.is_empty() {
                        let _ = write!(s, ", scopes {}", c.scp.join(" "));
                    }
                    if let Some(exp) = c.exp {
                        let _ = write!(s, ", expires {}", when(exp, now));
                    }
                    out.ok("token", &s);
                    for w in warnings(&c, audience, &acc.endpoints, now) {
                        out.warn("token", &w);
                    }
                }
                Err(e) => out.ok("token", &format!("for {mailbox}: acquired ({e})")),
            }
        }
        Err(e) => {
            let text = e.to_string();
            out.fail("token", &text);
            out.fix(&text, vars);
            return false;
        }
    }
    true
}

/// A Graph route's transport settings.
struct GraphRoute<'a> {
    account: &'a str,
    save_to_sent_items: bool,
    max_message_size: u64,
}

async fn graph(
    cfg: &Config,
    t: &Trial,
    route: &RouteConfig,
    g: &GraphRoute<'_>,
    mailbox: &str,
    out: &Steps,
) -> u8 {
    let account = g.account;
    let Some(acc) = cfg.account(account) else {
        out.fail("account", &format!("there is no [account.{account}]"));
        return FAILED;
    };
    let vars = crate::explain::account_vars(Vars::new(), acc, mailbox);
    let tokens = Arc::new(DoctorTokens::new(cfg));
    if !token_step(&tokens, acc, mailbox, Audience::Graph, &vars, out).await {
        return FAILED;
    }
    let source: Arc<dyn TokenSource> = tokens;
    let transport = match GraphTransport::new(acc, source, g.save_to_sent_items) {
        Ok(t) => t.with_max_message_size(g.max_message_size),
        Err(e) => {
            out.fail("transport", &e.to_string());
            return FAILED;
        }
    };
    if t.dry_run {
        let watcher: Arc<dyn Watcher> = Arc::new(out.clone());
        return match watch::watched(watcher, transport.probe(mailbox)).await {
            Ok(_) => OK,
            Err(o) => {
                out.outcome(&o, &vars);
                FAILED
            }
        };
    }
    send(cfg, t, route, mailbox, &transport, out).await
}

/// Send the test message through `transport`, watched; the exit status.
async fn send(
    cfg: &Config,
    t: &Trial,
    route: &RouteConfig,
    mailbox: &str,
    transport: &dyn Transport,
    out: &Steps,
) -> u8 {
    let vars = crate::explain::vars_for(cfg, mailbox);
    let file = match MessageFile::write(cfg, t, route, mailbox) {
        Ok(f) => f,
        Err(e) => {
            out.fail("message", &format!("cannot write the test message: {e}"));
            return FAILED;
        }
    };
    let mut msg = Outgoing::new(file.envelope.clone(), file.path.clone());
    if route.rewrite_from {
        match Rewritten::plan(&file.path, file.envelope.size, &t.from, mailbox) {
            Ok(p) => msg.rewrite = Some(Arc::new(p)),
            Err(e) => {
                out.fail("rewrite_from", &e.to_string());
                return FAILED;
            }
        }
    }
    let watcher: Arc<dyn Watcher> = Arc::new(out.clone());
    let outcome = watch::watched(watcher, transport.send(&msg)).await;
    match &outcome {
        Outcome::Sent {
            relay,
            reply,
            recipients,
        } => match recipients.iter().find(|r| r.status != RcptStatus::Sent) {
            None => {
                if matches!(transport.describe().split(':').next(), Some("file")) {
                    out.ok("file", &format!("{relay}: {reply}"));
                }
                OK
            }
            Some(r) => {
                out.fail("recipient", &format!("<{}>: {}", r.address, r.reply));
                out.fix(&r.reply, &vars);
                FAILED
            }
        },
        o => {
            out.outcome(o, &vars);
            FAILED
        }
    }
}

fn describe(t: &TransportConfig) -> String {
    match t {
        TransportConfig::File { dir } => format!("file {}", dir.display()),
        TransportConfig::Smtp { account } => format!("smtp, account {account}"),
        TransportConfig::Graph { account, .. } => format!("graph, account {account}"),
        TransportConfig::Discard => "discard".into(),
        #[allow(unreachable_patterns)]
        _ => "this transport".into(),
    }
}

/// `Sun, 29 Nov 2026 14:35:00 GMT (in 59m 58s)`.
fn when(exp: u64, now: u64) -> String {
    let at = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(exp));
    if exp > now {
        format!(
            "{at} (in {})",
            humantime::format_duration(Duration::from_secs(exp - now))
        )
    } else {
        format!(
            "{at} ({} ago: expired)",
            humantime::format_duration(Duration::from_secs(now - exp))
        )
    }
}

/// The test message in a private temporary file, removed when dropped.
struct MessageFile {
    path: PathBuf,
    envelope: Envelope,
}

impl MessageFile {
    fn write(
        cfg: &Config,
        t: &Trial,
        route: &RouteConfig,
        mailbox: &str,
    ) -> std::io::Result<MessageFile> {
        let now = now_secs();
        let id = format!("{:016X}", rand::random::<u64>());
        let from = if t.from.is_empty() { mailbox } else { &t.from };
        let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(now))
            .replace(" GMT", " +0000");
        let text = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: postern test message\r\nDate: {date}\r\nMessage-ID: <{id}.test@{host}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThis is a test message sent by `postern test` on {host} through route\r\n\"{route}\", as {mailbox}. No reply is needed.\r\n",
            to = t.to,
            host = cfg.hostname,
            route = route.name,
        );
        let path =
            std::env::temp_dir().join(format!("postern-test-{}-{id}.eml", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            id,
            received_at: now,
            sender: t.from.clone(),
            recipients: vec![Recipient {
                address: t.to.clone(),
                status: RcptStatus::Pending,
                last_reply: None,
            }],
            client_addr: "postern test".into(),
            client_helo: cfg.hostname.clone(),
            auth_user: None,
            listener: "test".into(),
            route: route.name.clone(),
            mailbox: mailbox.to_string(),
            size: text.len() as u64,
            body_8bit: false,
            smtputf8: !t.from.is_ascii() || !t.to.is_ascii(),
            attempts: 0,
            next_attempt: None,
            last_error: None,
            hold_reason: None,
            auto_hold: false,
            graph: None,
        };
        Ok(MessageFile { path, envelope })
    }
}

impl Drop for MessageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The printed steps; also the watcher of the transport's dialogue, pairing each reply with
/// the command it answers (pipelined commands are answered in order).
#[derive(Clone, Default)]
struct Steps {
    state: Arc<Mutex<Dialogue>>,
}

#[derive(Default)]
struct Dialogue {
    /// Commands sent and not yet answered.
    pending: VecDeque<String>,
    /// The greeting of the current connection was seen.
    greeted: bool,
}

impl Steps {
    fn line(&self, step: &str, text: &str) {
        println!("{step}: {text}");
    }

    fn ok(&self, step: &str, text: &str) {
        println!("✓ {step}: {text}");
    }

    fn warn(&self, step: &str, text: &str) {
        println!("! {step}: {text}");
    }

    fn fail(&self, step: &str, text: &str) {
        println!("✗ {step}: {text}");
    }

    /// The cause and fix of `text` from the one table, if it knows it.
    fn fix(&self, text: &str, vars: &Vars) {
        let known = diagnosis::diagnose(&diagnosis::evidence(text));
        match known.first() {
            Some(m) => {
                println!("  cause: {}", m.entry.title);
                println!("  fix: {}", diagnosis::advice(m.entry.id, vars));
                println!("  (postern explain {} shows the whole entry)", m.entry.id);
            }
            None => println!("  (postern explain \"...\" with the reply above may know more)"),
        }
    }

    /// A failed attempt's outcome: what happened, then the cause and fix.
    fn outcome(&self, o: &Outcome, vars: &Vars) {
        let (what, reason) = match o {
            Outcome::Held { reason, .. } => ("refused (configuration)", reason.clone()),
            Outcome::Transient { reason } => ("failed (temporary)", reason.clone()),
            Outcome::Permanent { reason } => ("refused", reason.clone()),
            Outcome::Throttled { reason, .. } => ("throttled", reason.clone()),
            Outcome::Partial { refused, then } => {
                for r in refused {
                    self.fail("recipient", &format!("<{}>: {}", r.address, r.reply));
                }
                return self.outcome(then, vars);
            }
            Outcome::Sent { reply, .. } => ("sent", reply.clone()),
        };
        // A delivery's hold hint ("postern queue release ID") does not apply to a test.
        let reason = reason
            .split(" postern pauses this mailbox")
            .next()
            .unwrap_or(&reason)
            .trim()
            .to_string();
        self.fail(what, &reason);
        self.fix(&reason, vars);
    }
}

impl Watcher for Steps {
    fn event(&self, e: Event) {
        let Ok(mut d) = self.state.lock() else {
            return;
        };
        match e {
            Event::Connected { server } => {
                d.pending.clear();
                d.greeted = false;
                self.ok("connect", &server);
            }
            Event::Sent(lines) => {
                for l in lines.split("\r\n") {
                    d.pending.push_back(l.to_string());
                }
            }
            Event::Reply(text) => {
                let label = match d.pending.pop_front() {
                    Some(c) if c.is_empty() => "AUTH (empty response)".to_string(),
                    Some(c) => c,
                    None if !d.greeted => "greeting".to_string(),
                    None => "message".to_string(),
                };
                d.greeted = true;
                if text.starts_with('2') || text.starts_with('3') {
                    self.ok(&label, &text);
                } else {
                    self.fail(&label, &text);
                }
            }
            Event::Tls { version, subject } => self.ok(
                "TLS",
                &format!(
                    "{version}, server certificate {}",
                    subject.as_deref().unwrap_or("(subject unreadable)")
                ),
            ),
        }
    }
}
