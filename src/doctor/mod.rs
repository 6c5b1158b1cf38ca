//! `postern doctor`: check everything postern depends on, in the order a problem would show:
//! the configuration; the spool and state directories (owner, modes, free space); each
//! listener (can bind, or is bound by the running daemon); TLS certificates (load, expiry);
//! per account: secret and certificate expiry, the token endpoint (DNS, TCP, proxy), a token
//! granted, its claims; per SMTP route: connect, STARTTLS, AUTH XOAUTH2 as the route's mailbox
//! (no message is sent); the queue (counts, oldest message, held mailboxes and why).
//!
//! Each ✗ carries its fix; where the failure is a known Microsoft error, the fix is the
//! diagnosis table's, so `doctor`, `explain` and the log say the same. `--offline` skips
//! everything that needs the network; `--json` prints one object for scripts. Nothing is
//! written: tokens are requested but not stored (a delegated refresh token stays valid after
//! Entra rotates it), so doctor can run as root beside the daemon.

mod graph;
mod tokens;

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ConfigErrors, Credential, TlsMode, TransportConfig};
use crate::diagnosis;
use crate::spool::{Spool, State, now_secs};
use crate::status::{self, MailboxState};
use crate::token::{Audience, TokenSource};
use crate::upstream::Outcome;
use crate::upstream::smtp::SmtpTransport;

/// Warn this many days before a secret or certificate expires.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// Network checks give up after this long.
const NET_TIMEOUT: Duration = Duration::from_secs(10);

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but needs attention soon.
    Warn,
    /// Broken: mail will not flow (exit status 1).
    Fail,
    /// Not checked (offline, or nothing to check).
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The group it belongs to ("Configuration", "Account contoso"...).
    pub section: String,
    /// Its result.
    pub status: Status,
    /// What was checked and what was found.
    pub what: String,
    /// What to do, for ✗ and warnings.
    pub fix: Option<String>,
    /// The diagnosis entry (`postern explain ID`), when the failure is a known error.
    pub explain: Option<&'static str>,
}

/// Every check, in order.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The configuration file.
    pub config: String,
    /// Whether network checks were skipped.
    pub offline: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, section: &str, status: Status, what: impl Into<String>) -> &mut Check {
        self.checks.push(Check {
            section: section.to_string(),
            status,
            what: what.into(),
            fix: None,
            explain: None,
        });
        let n = self.checks.len() - 1;
        &mut self.checks[n]
    }

    /// A failure (or warning) described by `text`: the fix comes from the diagnosis table
    /// when `text` is a known error, else from `fallback`.
    fn problem(
        &mut self,
        section: &str,
        status: Status,
        what: impl Into<String>,
        text: &str,
        vars: &diagnosis::Vars,
        fallback: Option<String>,
    ) {
        let known = diagnosis::diagnose(&diagnosis::evidence(text))
            .first()
            .map(|m| m.entry);
        let c = self.add(section, status, what);
        match known {
            Some(e) => {
                c.fix = Some(format!("{}: {}", e.title, diagnosis::advice(e.id, vars)));
                c.explain = Some(e.id);
            }
            None => c.fix = fallback,
        }
    }

    /// Did any check fail?
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The ✓/✗ lines.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "postern doctor: {}{}",
            self.config,
            if self.offline {
                " (offline: network checks skipped)"
            } else {
                ""
            }
        );
        let mut section = "";
        for c in &self.checks {
            if c.section != section {
                section = &c.section;
                let _ = writeln!(o, "\n{section}");
            }
            let mark = match c.status {
                Status::Ok => "✓",
                Status::Warn => "!",
                Status::Fail => "✗",
                Status::Skip => "-",
            };
            let _ = writeln!(o, "  {mark} {}", c.what);
            if let Some(f) = &c.fix {
                let _ = writeln!(o, "      fix: {f}");
            }
            if let Some(id) = c.explain {
                let _ = writeln!(o, "      more: postern explain {id}");
            }
        }
        let fails = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warns = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        let _ = writeln!(
            o,
            "\n{}",
            match (fails, warns) {
                (0, 0) => "Everything checked is fine.".to_string(),
                (0, w) => format!("No problem stops mail; {w} warning(s) (!) need attention."),
                (f, w) => format!("{f} problem(s) (✗) stop mail; {w} warning(s) (!)."),
            }
        );
        o
    }
}

/// Run every check. `config` is the result of loading the configuration.
pub async fn run(config: Result<Config, ConfigErrors>, source: &str, offline: bool) -> Report {
    let mut r = Report {
        config: source.to_string(),
        offline,
        checks: Vec::new(),
    };
    let cfg = match config {
        Ok(c) => c,
        Err(errs) => {
            let c = r.add(
                "Configuration",
                Status::Fail,
                format!("the configuration is not valid:\n{errs}"),
            );
            c.fix = Some(
                "correct each line named above (file:line: key), then run `postern doctor` again"
                    .into(),
            );
            return r;
        }
    };
    r.config = cfg.source.clone();
    configuration(&mut r, &cfg);
    spool(&mut r, &cfg);
    listeners(&mut r, &cfg);
    certificates(&mut r, &cfg);
    let tokens = Arc::new(tokens::DoctorTokens::new(&cfg));
    let mut probed_ok: Vec<String> = Vec::new();
    let mut role_checks: Vec<(String, usize)> = Vec::new();
    for a in &cfg.accounts {
        account(&mut r, &cfg, a, offline, &tokens, &mut role_checks).await;
    }
    for route in &cfg.routes {
        smtp_route(&mut r, &cfg, route, offline, &tokens, &mut probed_ok).await;
        graph::route(&mut r, &cfg, route, offline, &tokens).await;
    }
    // A token without SMTP.SendAsApp is right with RBAC for Applications: if signing in
    // worked, the missing role is only worth a note.
    for (account, i) in role_checks {
        if probed_ok.contains(&account)
            && let Some(c) = r.checks.get_mut(i)
        {
            c.status = Status::Warn;
        }
    }
    queue(&mut r, &cfg);
    r
}

fn configuration(r: &mut Report, cfg: &Config) {
    let s = "Configuration";
    r.add(
        s,
        Status::Ok,
        format!(
            "{} is valid: {} listener(s), {} route(s), {} account(s)",
            cfg.source,
            cfg.listeners.len(),
            cfg.routes.len(),
            cfg.accounts.len()
        ),
    );
    for w in cfg.warnings() {
        r.add(s, Status::Warn, w);
    }
}

fn spool(r: &mut Report, cfg: &Config) {
    let s = "Files and directories";
    let report = crate::trust::check(cfg);
    for f in &report.findings {
        let status = match f.severity {
            crate::trust::Severity::Refusal => Status::Fail,
            crate::trust::Severity::Warning => Status::Warn,
        };
        let c = r.add(s, status, format!("{}: {}", f.path.display(), f.problem));
        c.fix = f.fix.clone().map(|x| format!("{x} (as root)"));
    }
    for (key, dir) in [("spool_dir", &cfg.spool_dir), ("state_dir", &cfg.state_dir)] {
        if report.findings.iter().any(|f| f.path.starts_with(dir)) {
            continue;
        }
        if dir.exists() {
            r.add(
                s,
                Status::Ok,
                format!(
                    "{key} {}: usable by {}, private to it",
                    dir.display(),
                    report.user
                ),
            );
        } else {
            r.add(
                s,
                Status::Ok,
                format!(
                    "{key} {} does not exist yet; postern serve creates it (mode 0700)",
                    dir.display()
                ),
            );
        }
    }
    let probe = if cfg.spool_dir.exists() {
        cfg.spool_dir.clone()
    } else {
        cfg.spool_dir
            .ancestors()
            .find(|p| p.exists())
            .map(|p| p.to_path_buf())
            .unwrap_or_default()
    };
    match rustix::fs::statvfs(&probe) {
        Ok(st) => {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let min = cfg.limits.min_free_disk;
            let human = |b: u64| bytesize::ByteSize(b).to_string();
            if free < min {
                let c = r.add(
                    s,
                    Status::Fail,
                    format!(
                        "{} free on the spool's filesystem, below min_free_disk ({}): new mail is refused with 452 4.3.1",
                        human(free),
                        human(min)
                    ),
                );
                c.fix = Some(format!(
                    "free space on the filesystem of {} (`du -sh {}/*` shows what is large), or lower limits.min_free_disk",
                    probe.display(),
                    cfg.spool_dir.display()
                ));
            } else {
                r.add(
                    s,
                    Status::Ok,
                    format!(
                        "{} free on the spool's filesystem (min_free_disk {})",
                        human(free),
                        human(min)
                    ),
                );
            }
        }
        Err(e) => {
            r.add(
                s,
                Status::Warn,
                format!("cannot read the free space of {}: {e}", probe.display()),
            );
        }
    }
}

/// Is a daemon running on this spool (its control socket answers)?
fn daemon_running(cfg: &Config) -> bool {
    std::os::unix::net::UnixStream::connect(crate::control::socket_path(&cfg.spool_dir)).is_ok()
}

fn listeners(r: &mut Report, cfg: &Config) {
    let s = "Listeners";
    let running = daemon_running(cfg);
    let mut all: Vec<(String, SocketAddr)> = cfg
        .listeners
        .iter()
        .map(|l| (format!("listener {}", l.name), l.address))
        .collect();
    if let Some(a) = &cfg.admin {
        all.push(("[admin] listener".into(), a.address));
    }
    for (name, addr) in all {
        if addr.port() == 0 {
            r.add(s, Status::Ok, format!("{name} {addr}: any free port"));
            continue;
        }
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {
                let status = if running { Status::Warn } else { Status::Ok };
                let c = r.add(s, status, format!("{name} {addr}: can be bound"));
                if running {
                    c.fix = Some("the running daemon does not listen there: reload it (systemctl reload postern) after changing the configuration".into());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && running => {
                r.add(
                    s,
                    Status::Ok,
                    format!("{name} {addr}: bound by the running daemon"),
                );
            }
            Err(e) => {
                let fix = match e.kind() {
                    std::io::ErrorKind::AddrInUse => format!(
                        "another program listens on port {p} (often another mail server): `ss -ltnp 'sport = :{p}'` shows which; stop it or choose another port",
                        p = addr.port()
                    ),
                    std::io::ErrorKind::PermissionDenied => "ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit grants it), or use a port above 1023 such as 2525".into(),
                    std::io::ErrorKind::AddrNotAvailable => format!(
                        "no interface of this host has {}: use an address `ip -brief address` shows, or 0.0.0.0",
                        addr.ip()
                    ),
                    _ => "check the address".into(),
                };
                let c = r.add(
                    s,
                    Status::Fail,
                    format!("{name} {addr}: cannot listen: {e}"),
                );
                c.fix = Some(fix);
            }
        }
    }
}

fn expiry(r: &mut Report, s: &str, what: &str, days: i64, fix: &str) {
    if days < 0 {
        let c = r.add(
            s,
            Status::Fail,
            format!("{what} expired {} day(s) ago", -days),
        );
        c.fix = Some(fix.to_string());
    } else if days <= EXPIRY_WARNING_DAYS {
        let c = r.add(s, Status::Warn, format!("{what} expires in {days} day(s)"));
        c.fix = Some(fix.to_string());
    } else {
        r.add(s, Status::Ok, format!("{what} expires in {days} days"));
    }
}

fn certificates(r: &mut Report, cfg: &Config) {
    let s = "TLS certificates";
    let now = now_secs();
    for l in &cfg.listeners {
        let Some(files) = l.tls_files.as_ref().filter(|_| l.tls != TlsMode::None) else {
            continue;
        };
        if let Err(e) = crate::smtp::tls::server_config(files) {
            let c = r.add(
                s,
                Status::Fail,
                format!("listener {}: the certificate does not load: {e}", l.name),
            );
            c.fix = Some("check tls_cert and tls_key (PEM, the key matching the certificate), e.g. with `openssl x509 -in CERT -noout -dates`".into());
            continue;
        }
        for t in status::tls(cfg, now)
            .into_iter()
            .filter(|t| t.listener == l.name)
        {
            if let Some(d) = t.days_left {
                expiry(
                    r,
                    s,
                    &format!("listener {}: certificate {}", l.name, t.cert),
                    d,
                    "renew the certificate (certbot renew, or your CA), replace the files and reload (systemctl reload postern)",
                );
            }
        }
    }
    if !r.checks.iter().any(|c| c.section == s) {
        r.add(s, Status::Skip, "no listener uses TLS");
    }
}

async fn account(
    r: &mut Report,
    cfg: &Config,
    a: &crate::config::AccountConfig,
    offline: bool,
    tokens: &Arc<tokens::DoctorTokens>,
    role_checks: &mut Vec<(String, usize)>,
) {
    let s = format!("Account {}", a.name);
    let now = now_secs();
    let vars = crate::explain::account_vars(diagnosis::Vars::new(), a, "");
    for c in status::credentials(cfg, now)
        .into_iter()
        .filter(|c| c.account == a.name)
    {
        match (c.kind, c.days_left, &c.problem) {
            (_, _, Some(p)) => {
                let x = r.add(&s, Status::Fail, p.clone());
                x.fix = Some(format!(
                    "fix the credential settings of [account.{}]",
                    a.name
                ));
            }
            ("client_secret", Some(d), _) => {
                let fix = diagnosis::advice("entra.secret-expired", &vars);
                expiry(r, &s, "the client secret (secret_expires)", d, &fix);
            }
            ("client_secret", None, _) => {
                let x = r.add(&s, Status::Warn, "the client secret's expiry is unknown");
                x.fix = Some(format!(
                    "copy the Expires date from {} > Certificates & secrets into secret_expires = 2027-01-31, so postern warns before it runs out",
                    crate::explain::account_vars(diagnosis::Vars::new(), a, "").fill("{app}")
                ));
            }
            ("certificate", Some(d), _) => {
                let fix = format!(
                    "make a new certificate, upload it under {} > Certificates & secrets > Certificates, then replace {}",
                    vars.fill("{app}"),
                    c.what
                );
                expiry(r, &s, &format!("certificate {}", c.what), d, &fix);
            }
            ("refresh_token", Some(d), _) => {
                let fix = diagnosis::advice("entra.refresh-expired", &vars);
                if d < 0 {
                    let x = r.add(
                        &s,
                        Status::Fail,
                        format!(
                            "the sign-in of {} was last refreshed over 90 days ago",
                            c.what
                        ),
                    );
                    x.fix = Some(fix);
                } else {
                    r.add(
                        &s,
                        Status::Ok,
                        format!(
                            "sign-in of {}: refreshed {} day(s) ago",
                            c.what,
                            90 - d.min(90)
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    // Secrets must be readable where the config says.
    let secret = match &a.credential {
        Credential::ClientSecret { secret, .. }
        | Credential::Delegated {
            secret: Some(secret),
        } => Some(secret),
        Credential::Certificate { key, .. } => Some(key),
        Credential::Delegated { secret: None } => None,
    };
    if let Some(src) = secret
        && let Err(why) = crate::token::entra::read_secret(src)
    {
        let x = r.add(
            &s,
            Status::Fail,
            format!("cannot read the credential: {why}"),
        );
        x.fix = Some(format!(
            "create it, readable by the user postern runs as (mode 0600), or fix [account.{}]",
            a.name
        ));
    }
    if offline {
        r.add(
            &s,
            Status::Skip,
            "token endpoint and token: skipped (offline)",
        );
        return;
    }
    if !reachable(r, &s, a).await {
        return;
    }
    // Tokens for what this account's routes need.
    let delegated = matches!(a.credential, Credential::Delegated { .. });
    let mut wanted: Vec<(Audience, String)> = Vec::new();
    for route in cfg.routes.iter().filter(|x| uses_account(x, &a.name)) {
        let mailbox = route.mailbox.clone().unwrap_or_default();
        if delegated && mailbox.is_empty() {
            continue;
        }
        let audience = match route.transport {
            TransportConfig::Graph { .. } => Audience::Graph,
            _ => Audience::Smtp,
        };
        let key = (audience, if delegated { mailbox } else { String::new() });
        if !wanted.contains(&key) {
            wanted.push(key);
        }
    }
    if wanted.is_empty() {
        r.add(
            &s,
            Status::Skip,
            "no route uses this account with a fixed mailbox",
        );
    }
    for (audience, mailbox) in wanted {
        let who = if mailbox.is_empty() {
            format!("app-only token for {audience}")
        } else {
            format!("token for {audience} as {mailbox}")
        };
        match tokens.token(&a.name, &mailbox, audience).await {
            Ok(t) => {
                r.add(&s, Status::Ok, format!("{who}: granted by Entra"));
                match crate::token::inspect::decode_claims(t.token.expose()) {
                    Ok(claims) => {
                        let warnings =
                            crate::token::inspect::warnings(&claims, audience, &a.endpoints, now);
                        if warnings.is_empty() {
                            let perms: Vec<&str> = claims
                                .roles
                                .iter()
                                .chain(claims.scp.iter())
                                .map(String::as_str)
                                .collect();
                            r.add(
                                &s,
                                Status::Ok,
                                format!(
                                    "{who}: audience {}, permissions {}",
                                    claims.aud.as_deref().unwrap_or("-"),
                                    perms.join(" ")
                                ),
                            );
                        }
                        for w in warnings {
                            let rbac_ok = w.contains("RBAC for Applications");
                            r.add(&s, Status::Fail, format!("{who}: {w}"));
                            if rbac_ok {
                                role_checks.push((a.name.clone(), r.checks.len() - 1));
                            }
                        }
                    }
                    Err(e) => {
                        r.add(&s, Status::Skip, format!("{who}: {e}"));
                    }
                }
            }
            Err(e) => {
                let text = e.to_string();
                let v = crate::explain::account_vars(diagnosis::Vars::new(), a, &mailbox);
                r.problem(&s, Status::Fail, format!("{who}: {text}"), &text, &v, None);
            }
        }
    }
}

fn uses_account(route: &crate::config::RouteConfig, account: &str) -> bool {
    route.transport.account() == Some(account)
}

/// DNS and TCP to the token endpoint (or the proxy in front of it).
async fn reachable(r: &mut Report, s: &str, a: &crate::config::AccountConfig) -> bool {
    let Ok(url) = url::Url::parse(&a.endpoints.token_url) else {
        r.add(
            s,
            Status::Fail,
            format!("token_url {} is not a URL", a.endpoints.token_url),
        );
        return false;
    };
    let env_proxy = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    let proxy = a.proxy.clone().or(env_proxy).filter(|_| !loopback);
    let (target, via) = match proxy.as_deref().and_then(|p| url::Url::parse(p).ok()) {
        Some(p) => (p, " through the proxy"),
        None => (url.clone(), ""),
    };
    let host = target
        .host_str()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_string();
    let port = target.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(NET_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                let x = r.add(s, Status::Fail, format!("cannot resolve {host}{via}: {e}"));
                x.fix =
                    Some("check DNS on this host (/etc/resolv.conf, `getent hosts HOST`)".into());
                return false;
            }
            Err(_) => {
                let x = r.add(s, Status::Fail, format!("resolving {host}{via} timed out"));
                x.fix = Some("check DNS on this host (/etc/resolv.conf)".into());
                return false;
            }
        };
    let Some(first) = addrs.first().copied() else {
        r.add(s, Status::Fail, format!("{host}{via} has no address"));
        return false;
    };
    match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(first)).await {
        Ok(Ok(_)) => {
            r.add(
                s,
                Status::Ok,
                format!("token endpoint {host}:{port}{via} is reachable ({first})"),
            );
            true
        }
        Ok(Err(e)) => {
            let x = r.add(
                s,
                Status::Fail,
                format!("cannot connect to {host}:{port}{via} ({first}): {e}"),
            );
            x.fix = Some(format!(
                "allow outbound TCP {port} from this host to {host} in the firewall{}",
                if via.is_empty() {
                    ", or set proxy = \"http://proxy:3128\" in the account"
                } else {
                    ""
                }
            ));
            false
        }
        Err(_) => {
            let x = r.add(
                s,
                Status::Fail,
                format!("connecting to {host}:{port}{via} timed out"),
            );
            x.fix = Some(format!(
                "a firewall drops outbound TCP {port}: allow it, or set a proxy"
            ));
            false
        }
    }
}

async fn smtp_route(
    r: &mut Report,
    cfg: &Config,
    route: &crate::config::RouteConfig,
    offline: bool,
    tokens: &Arc<tokens::DoctorTokens>,
    probed_ok: &mut Vec<String>,
) {
    let TransportConfig::Smtp { account } = &route.transport else {
        return;
    };
    let s = format!("Route {} (SMTP, account {account})", route.name);
    let Some(acc) = cfg.account(account) else {
        r.add(
            &s,
            Status::Fail,
            format!("account {account} is not configured"),
        );
        return;
    };
    let Some(mailbox) = route.mailbox.clone() else {
        r.add(
            &s,
            Status::Skip,
            "sends as each sender's own mailbox: no fixed mailbox to sign in as",
        );
        return;
    };
    if offline {
        r.add(&s, Status::Skip, "SMTP sign-in: skipped (offline)");
        return;
    }
    let source: Arc<dyn TokenSource> = tokens.clone();
    let transport = match SmtpTransport::new(acc, source, cfg.hostname.clone()) {
        Ok(t) => t,
        Err(e) => {
            r.add(
                &s,
                Status::Fail,
                format!("the transport cannot be set up: {e}"),
            );
            return;
        }
    };
    let server = format!("{}:{}", acc.endpoints.smtp_host, acc.endpoints.smtp_port);
    let vars = crate::explain::account_vars(diagnosis::Vars::new(), acc, &mailbox);
    match tokio::time::timeout(NET_TIMEOUT * 6, transport.probe_login(&mailbox)).await {
        Ok(Ok(p)) => {
            r.add(
                &s,
                Status::Ok,
                format!(
                    "{}: connected, STARTTLS, AUTH XOAUTH2 as {mailbox}: {} (no message sent)",
                    p.server, p.auth_reply
                ),
            );
            probed_ok.push(account.clone());
        }
        Ok(Err(o)) => {
            let reason = match o {
                Outcome::Held { reason, .. }
                | Outcome::Transient { reason }
                | Outcome::Permanent { reason }
                | Outcome::Throttled { reason, .. } => reason,
                Outcome::Sent { reply, .. } => reply,
                Outcome::Partial { then, .. } => format!("{then:?}"),
            };
            // The hold hint of a delivery ("postern queue release ID") does not apply here.
            let reason = reason
                .split(" postern pauses this mailbox")
                .next()
                .unwrap_or(&reason)
                .trim()
                .to_string();
            r.problem(
                &s,
                Status::Fail,
                format!("signing in to {server} as {mailbox} failed: {reason}"),
                &reason,
                &vars,
                Some(format!(
                    "check smtp_host/smtp_port of [account.{account}] and that this host reaches {server}"
                )),
            );
        }
        Err(_) => {
            let x = r.add(
                &s,
                Status::Fail,
                format!("signing in to {server} as {mailbox} timed out"),
            );
            x.fix = Some(format!(
                "check that outbound TCP {} is open",
                acc.endpoints.smtp_port
            ));
        }
    }
}

fn queue(r: &mut Report, cfg: &Config) {
    let s = "Queue";
    if !cfg.spool_dir.exists() {
        r.add(s, Status::Skip, "no spool yet");
        return;
    }
    let spool = match Spool::open_shared(&cfg.spool_dir) {
        Ok(sp) => sp,
        Err(e) => {
            let x = r.add(s, Status::Fail, format!("cannot open the spool: {e}"));
            x.fix = Some("run doctor as root or as the user postern runs as".into());
            return;
        }
    };
    let snap = status::collect(&spool, cfg, None, true);
    let counts: Vec<String> = snap
        .queue
        .iter()
        .map(|(st, n)| format!("{n} {st}"))
        .collect();
    let oldest = match (&snap.oldest_id, snap.oldest_age_secs) {
        (Some(id), Some(age)) => format!(
            "; oldest {id}, {}",
            humantime::format_duration(Duration::from_secs(age))
        ),
        _ => String::new(),
    };
    r.add(s, Status::Ok, format!("{}{oldest}", counts.join(", ")));
    let corrupt = snap
        .queue
        .iter()
        .find(|(st, _)| *st == State::Corrupt.dir())
        .map_or(0, |(_, n)| *n);
    if corrupt > 0 {
        let x = r.add(
            s,
            Status::Warn,
            format!("{corrupt} unreadable file(s) set aside in corrupt/"),
        );
        x.fix = Some(format!(
            "look at {}/corrupt/ (the log says why each was set aside); delete them once checked",
            cfg.spool_dir.display()
        ));
    }
    for b in &snap.mailboxes {
        match (&b.state, &b.held) {
            (MailboxState::Held, Some(h)) => {
                let vars = crate::explain::vars_for(cfg, &b.mailbox).set("queue_id", &h.oldest_id);
                r.problem(
                    s,
                    Status::Fail,
                    format!(
                        "mailbox {} is held ({} message(s)): {}",
                        b.mailbox, h.messages, h.reason
                    ),
                    &h.reason,
                    &vars,
                    Some(format!(
                        "fix the cause, then `postern queue release {}`",
                        h.oldest_id
                    )),
                );
            }
            (MailboxState::Retrying, _) => {
                let x = r.add(
                    s,
                    Status::Warn,
                    format!(
                        "mailbox {}: {} message(s) waiting; last error: {}",
                        b.mailbox,
                        b.waiting,
                        b.last_error.as_deref().unwrap_or("-")
                    ),
                );
                x.fix = Some(
                    "postern retries by itself; `postern explain ID` explains one message".into(),
                );
            }
            _ => {}
        }
    }
}
