//! Knowing what postern does and why: `postern explain` on the log lines of real holds,
//! `postern doctor` against the fakes (healthy and broken), `/metrics` scraped while mail
//! flows and parsed by Python's prometheus_client, `/healthz` turning 503, `postern health`,
//! and the status page rendered by a real headless browser.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::fake::entra::{CLIENT_ID, FakeEntra, SECRET, TENANT};
use crate::fake::exchange::{AuthFailure, FakeExchange, Script, replies};
use crate::harness::*;
use crate::m365::wait_until;

/// One route of a test configuration: its senders, its fixed mailbox and its account.
struct Route<'a> {
    name: &'a str,
    senders: &'a str,
    mailbox: &'a str,
    account: &'a str,
}

/// An account: its name and the TOML lines after `[account.NAME]`.
struct Account {
    name: String,
    lines: String,
}

impl Account {
    /// An app-only account of the fake tenant that signs in with `secret_file`.
    fn secret(
        name: &str,
        entra: &FakeEntra,
        exchange: &FakeExchange,
        secret_file: &Path,
    ) -> Account {
        Self::app(name, TENANT, CLIENT_ID, secret_file, entra, exchange)
    }

    /// An app-only account of `tenant` and app `client_id`.
    fn app(
        name: &str,
        tenant: &str,
        client_id: &str,
        secret_file: &Path,
        entra: &FakeEntra,
        exchange: &FakeExchange,
    ) -> Account {
        Account {
            name: name.into(),
            lines: format!(
                "tenant = \"{tenant}\"\nclient_id = \"{client_id}\"\nauth = \"client_secret\"\nclient_secret_file = \"{}\"\n{}",
                secret_file.display(),
                endpoints(&entra.base, exchange)
            ),
        }
    }
}

fn endpoints(authority: &str, exchange: &FakeExchange) -> String {
    format!(
        "authority = \"{authority}\"\nsmtp_host = \"localhost\"\nsmtp_port = {}\nca_file = \"{}\"\n",
        exchange.addr().port(),
        exchange.ca_pem().display()
    )
}

/// A configuration with a plain listener, `extra` top-level tables, the accounts and the
/// routes, then a catch-all file route.
fn config(extra: &str, accounts: &[Account], routes: &[Route]) -> String {
    let mut c = format!(
        r#"hostname = "relay.test"
spool_dir = "spool"
state_dir = "state"

[delivery]
retry_initial = "1s"
retry_max = "2s"
hold_retry = "1h"
shutdown_grace = "5s"

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]

{extra}
"#
    );
    for a in accounts {
        c.push_str(&format!("\n[account.{}]\n{}\n", a.name, a.lines));
    }
    for r in routes {
        c.push_str(&format!(
            "\n[route.{}]\nsenders = [\"{}\"]\nmailbox = \"{}\"\ntransport = \"smtp\"\naccount = \"{}\"\n",
            r.name, r.senders, r.mailbox, r.account
        ));
    }
    c.push_str("\n[route.local]\nsenders = [\"*@local.test\"]\ntransport = \"file\"\ndir = \"delivered\"\n");
    c
}

fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn message(from: &str) -> Vec<u8> {
    format!("From: {from}\r\nTo: boss@fabrikam.com\r\nSubject: scan\r\n\r\nscan attached\r\n")
        .into_bytes()
}

/// Run `postern ARGS` on a config file without a daemon; (status, stdout, stderr).
fn postern(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run postern");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// GET `path` from the admin listener; (status, body).
fn http_get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin listener");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: relay.test\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // axum answers small bodies with Content-Length, larger ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn admin_addr(p: &Postern) -> SocketAddr {
    *p.listeners
        .get("[admin]")
        .expect("the admin listener's ready line")
}

// ------------------------------------------------------------------------------------------
// explain: every hold postern logs, as logged, is explained by the right entry

#[test]
fn every_hold_log_line_is_explained() {
    let entra = FakeEntra::start();
    // One mailbox per way Exchange refuses; tokens are whatever the fake Entra issued.
    /// (mailbox, how AUTH fails, (stage, reply) scripted after AUTH, the entry expected)
    type Case<'a> = (
        &'a str,
        Option<AuthFailure>,
        Option<(&'a str, &'a str)>,
        &'a str,
    );
    let cases: &[Case] = &[
        (
            "tenant@contoso.com",
            Some(AuthFailure::TenantDisabled),
            None,
            "smtp.auth.tenant",
        ),
        (
            "mbx@contoso.com",
            Some(AuthFailure::MailboxDisabled),
            None,
            "smtp.auth.mailbox",
        ),
        (
            "basic@contoso.com",
            Some(AuthFailure::BasicDisabled),
            None,
            "smtp.auth.basic",
        ),
        (
            "ca@contoso.com",
            Some(AuthFailure::ConditionalAccess),
            None,
            "smtp.auth.conditional-access",
        ),
        (
            "secdef@contoso.com",
            Some(AuthFailure::SecurityDefaults),
            None,
            "smtp.auth.security-defaults",
        ),
        (
            "retired@contoso.com",
            Some(AuthFailure::Reply(replies::BASIC_NOT_SUPPORTED.into())),
            None,
            "smtp.auth.basic-retired",
        ),
        (
            "token@contoso.com",
            Some(AuthFailure::Reply(
                "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]"
                    .into(),
            )),
            None,
            "smtp.auth.token-rejected",
        ),
        (
            "sendas@contoso.com",
            None,
            Some(("mail", replies::NO_SEND_AS)),
            "smtp.send-as",
        ),
        (
            "throttled@contoso.com",
            None,
            Some(("mail", replies::THROTTLED_SEND_AS)),
            "smtp.throttled.send-as",
        ),
        (
            "full@contoso.com",
            None,
            Some(("data", replies::MAILBOX_FULL)),
            "smtp.mailbox-full",
        ),
        (
            "spam@contoso.com",
            None,
            Some(("data", replies::TENANT_THRESHOLD)),
            "smtp.tenant-threshold",
        ),
        (
            "ip@contoso.com",
            None,
            Some(("mail", replies::IP_BLOCKED)),
            "smtp.ip-blocked",
        ),
        (
            "restricted@contoso.com",
            None,
            Some(("mail", replies::BAD_OUTBOUND_SENDER)),
            "smtp.restricted-sender",
        ),
        (
            "tls@contoso.com",
            None,
            Some(("mail", replies::OLD_TLS)),
            "smtp.tls-old",
        ),
    ];
    let mut script = Script::new().accept_tokens(entra.smtp_token_check());
    for (mailbox, auth, reply, _) in cases {
        if let Some(f) = auth {
            script = script.auth_failure(mailbox, f.clone());
        }
        match reply {
            Some(("mail", line)) => script = script.mail_reply(mailbox, line),
            Some((_, line)) => script = script.data_end_reply(mailbox, line),
            None => {}
        }
    }
    let exchange = script.start();
    // SendAsDenied after DATA: the message's From is not the mailbox.
    let secrets = tempfile::tempdir().unwrap();
    let good = secret_file(secrets.path(), "good", SECRET);
    let wrong = secret_file(
        secrets.path(),
        "wrong",
        "5c1e7a1d-0000-4000-8000-5ec12e7001d0",
    );
    let mut accounts = vec![
        Account::secret("contoso", &entra, &exchange, &good),
        Account::secret("wrongsecret", &entra, &exchange, &wrong),
        Account::app(
            "wrongtenant",
            "contoso.example",
            CLIENT_ID,
            &good,
            &entra,
            &exchange,
        ),
        Account::app(
            "wrongapp",
            TENANT,
            "11111111-2222-3333-4444-555555555555",
            &good,
            &entra,
            &exchange,
        ),
    ];
    // A server that never offers STARTTLS.
    let plain = Script::new().no_starttls().start();
    accounts.push(Account::secret("nostarttls", &entra, &plain, &good));
    let senders: Vec<(String, String)> = cases
        .iter()
        .enumerate()
        .map(|(i, _)| (format!("r{i}"), format!("dev{i}@contoso.com")))
        .collect();
    let mut routes: Vec<Route> = cases
        .iter()
        .zip(&senders)
        .map(|((m, ..), (name, sender))| Route {
            name,
            senders: sender,
            mailbox: m,
            account: "contoso",
        })
        .collect();
    let extra_cases = [
        (
            "sendasdenied",
            "dev-sa@contoso.com",
            "printer@contoso.com",
            "contoso",
            "smtp.send-as",
        ),
        (
            "wrongsecret",
            "dev-ws@contoso.com",
            "ws@contoso.com",
            "wrongsecret",
            "entra.secret-wrong",
        ),
        (
            "wrongtenant",
            "dev-wt@contoso.com",
            "wt@contoso.com",
            "wrongtenant",
            "entra.tenant-not-found",
        ),
        (
            "wrongapp",
            "dev-wa@contoso.com",
            "wa@contoso.com",
            "wrongapp",
            "entra.app-not-found",
        ),
        (
            "nostarttls",
            "dev-ns@contoso.com",
            "ns@contoso.com",
            "nostarttls",
            "postern.no-starttls",
        ),
    ];
    for (name, sender, mailbox, account, _) in &extra_cases {
        routes.push(Route {
            name,
            senders: sender,
            mailbox,
            account,
        });
    }
    let p = Postern::start(&config("", &accounts, &routes));
    let mut expected: Vec<(String, &str)> = Vec::new();
    for ((mailbox, _, _, id), (_, sender)) in cases.iter().zip(&senders) {
        // From = the mailbox, so only the scripted refusal can stop it.
        expect(
            &send_mail(p.addr(), sender, &["boss@fabrikam.com"], &message(mailbox)),
            "250",
        );
        expected.push((mailbox.to_string(), id));
    }
    for (_, sender, mailbox, _, id) in &extra_cases {
        let from = if *id == "smtp.send-as" {
            "scanner@contoso.com"
        } else {
            mailbox
        };
        expect(
            &send_mail(p.addr(), sender, &["boss@fabrikam.com"], &message(from)),
            "250",
        );
        expected.push((mailbox.to_string(), id));
    }
    for (mailbox, id) in &expected {
        // Every line postern logs when it holds or holds back a mailbox's mail: the mail log's
        // `held` (brief) and `deferred`, and the forwarder's "paused" / "mail waits" line
        // (with the full reason).
        let quoted = format!("mailbox=\"{mailbox}\"");
        let bare = format!("mailbox={mailbox} ");
        let hold_line = |l: &str| {
            (l.contains("event=\"held\"") && l.contains(&quoted))
                || ((l.contains(" paused: ") || l.contains("mail waits")) && l.contains(&bare))
        };
        assert!(
            wait_until(Duration::from_secs(30), || p
                .log_text()
                .lines()
                .any(hold_line)),
            "no hold logged for {mailbox} ({id}); log:\n{}",
            p.log_text()
        );
        // The forwarder's line follows the mail log's: give it a moment.
        wait_until(Duration::from_secs(5), || {
            p.log_text().lines().filter(|l| hold_line(l)).count() >= 2
        });
        let lines: Vec<String> = p
            .log_text()
            .lines()
            .filter(|l| hold_line(l))
            .map(str::to_string)
            .collect();
        for line in &lines {
            let (code, out, err) = p.cli(&["explain", line]);
            assert_eq!(code, 0, "explain failed for {line}\n{out}{err}");
            assert!(
                out.contains(&format!("[{id}]")),
                "{mailbox}: expected {id} for\n{line}\ngot:\n{out}"
            );
            // The configuration fills in the account: no generic placeholder for the mailbox.
            assert!(!out.contains("<mailbox>"), "{out}");
        }
    }
    // A queue id is explained from its hold reason.
    let held_id = p
        .log_text()
        .lines()
        .find(|l| l.contains("event=\"held\"") && l.contains("mailbox=\"tenant@contoso.com\""))
        .and_then(|l| l.split("queue_id=").nth(1))
        .map(|r| r.trim_matches('"').chars().take(16).collect::<String>())
        .expect("a queue id");
    let (code, out, _) = p.cli(&["explain", &held_id]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is in hold/"), "{out}");
    assert!(
        out.contains(
            "Set-CASMailbox -Identity tenant@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{out}"
    );
    // Unknown text: exit 1, says so, shows the closest.
    let (code, out, _) = p.cli(&["explain", "the printer says: SMTP AUTH disabled for tenant"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not know this error"), "{out}");
    assert!(out.contains("smtp.auth.tenant"), "{out}");
}

// ------------------------------------------------------------------------------------------
// doctor

/// A world for doctor: fake Entra and Exchange, one account, one route as `mailbox`.
struct DoctorWorld {
    entra: FakeEntra,
    exchange: FakeExchange,
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn doctor_world(script: Script, secret: &str, tweak: impl FnOnce(&str) -> String) -> DoctorWorld {
    let entra = FakeEntra::start();
    let exchange = script.accept_tokens(entra.smtp_token_check()).start();
    let dir = tempfile::tempdir().unwrap();
    let s = secret_file(dir.path(), "client-secret", secret);
    let cfg = config(
        "",
        &[Account::secret("contoso", &entra, &exchange, &s)],
        &[Route {
            name: "m365",
            senders: "*@contoso.com",
            mailbox: "printer@contoso.com",
            account: "contoso",
        }],
    );
    let cfg = tweak(&cfg);
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, cfg).unwrap();
    DoctorWorld {
        entra,
        exchange,
        dir,
        config: path,
    }
}

/// The ✗ lines of doctor's output and the fix line after each.
fn failures(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    let mut v = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with('✗') {
            let mut s = l.trim().to_string();
            for next in lines.iter().skip(i + 1) {
                let t = next.trim_start();
                if t.starts_with("fix:") || t.starts_with("more:") {
                    s.push('\n');
                    s.push_str(t);
                } else {
                    break;
                }
            }
            v.push(s);
        }
    }
    v
}

#[test]
fn doctor_passes_against_healthy_fakes_and_sends_nothing() {
    let w = doctor_world(Script::new(), SECRET, |c| {
        c.replace(
            "client_secret_file",
            "secret_expires = 2099-12-31\nclient_secret_file",
        )
    });
    let (code, out, err) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "✓ app-only token for smtp: granted by Entra",
        "permissions SMTP.SendAsApp",
        "AUTH XOAUTH2 as printer@contoso.com: 235 Authentication successful (no message sent)",
        "token endpoint 127.0.0.1:",
        "Everything checked is fine.",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(failures(&out).is_empty(), "{out}");
    // It signed in, and sent nothing.
    assert_eq!(w.exchange.auths().len(), 1);
    assert!(w.exchange.messages().is_empty());
    // JSON for scripts.
    let (code, json, _) = postern(&w.config, &["doctor", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("doctor --json is JSON");
    assert!(
        v["checks"].as_array().is_some_and(|c| c.len() > 5),
        "{json}"
    );
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] != "fail"),
        "{json}"
    );
    // Offline: no request reaches Entra.
    let before = w.entra.token_requests();
    let (code, out, _) = postern(&w.config, &["doctor", "--offline"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("skipped (offline)"), "{out}");
    assert_eq!(w.entra.token_requests(), before);
}

#[test]
fn doctor_names_each_broken_thing_with_its_fix() {
    // Wrong secret: Entra answers AADSTS7000215.
    let w = doctor_world(Script::new(), "5c1e7a1d-0000-4000-8000-5ec12e7001d0", |c| {
        c.to_string()
    });
    let (code, out, _) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(f.contains("AADSTS7000215"), "{out}");
    assert!(
        f.contains("paste the secret Value, not the Secret ID"),
        "{out}"
    );
    assert!(
        f.contains("more: postern explain entra.secret-wrong"),
        "{out}"
    );

    // Missing role: the app was never granted SMTP.SendAsApp, so Exchange refuses the token.
    let w = doctor_world(Script::new(), SECRET, |c| c.to_string());
    w.entra.state().app_roles = Some(Vec::new());
    let issued = w.entra.smtp_token_check();
    w.exchange.update(|s| {
        s.token_check = Some(std::sync::Arc::new(move |m: &str, t: &str| {
            issued(m, t)
                && t.split('.').nth(1).is_some_and(|c| {
                    use base64::Engine;
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(c)
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .is_some_and(|j| j.contains("SMTP.SendAsApp"))
                })
        }))
    });
    let (code, out, _) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(f.contains("no SMTP.SendAsApp role"), "{out}");
    assert!(f.contains("535 5.7.3"), "{out}");
    assert!(f.contains("New-ServicePrincipal"), "{out}");

    // SMTP AUTH disabled for the tenant.
    let w = doctor_world(
        Script::new().auth_failure("printer@contoso.com", AuthFailure::TenantDisabled),
        SECRET,
        |c| c.to_string(),
    );
    let (code, out, _) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(
        f.contains("SmtpClientAuthentication is disabled for the Tenant"),
        "{out}"
    );
    assert!(
        f.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        "{out}"
    );
    assert!(
        f.contains("Set-CASMailbox -Identity printer@contoso.com"),
        "{out}"
    );

    // Unreachable hosts: nothing listens on the token endpoint's port or the SMTP port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let w = doctor_world(Script::new(), SECRET, |c| {
        c.lines()
            .map(|l| {
                if l.starts_with("authority = ") {
                    format!("authority = \"http://127.0.0.1:{closed}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (code, out, _) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(
        f.contains(&format!("cannot connect to 127.0.0.1:{closed}")),
        "{out}"
    );
    assert!(f.contains("allow outbound TCP"), "{out}");
    let w = doctor_world(Script::new(), SECRET, |c| {
        c.lines()
            .map(|l| {
                if l.starts_with("smtp_port = ") {
                    format!("smtp_port = {closed}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (code, out, _) = postern(&w.config, &["doctor"]);
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(
        f.contains(&format!("cannot connect to localhost:{closed}")),
        "{out}"
    );
    assert!(f.contains("postern explain postern.connect"), "{out}");

    // Expired certificate of a certificate account.
    let w = doctor_world(Script::new(), SECRET, |c| c.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .or_else(|_| rcgen::KeyPair::generate())
        .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["postern.test".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let cert_path = w.dir.path().join("entra-cert.pem");
    let key_path = w.dir.path().join("entra-key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let text = std::fs::read_to_string(&w.config).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("auth = ") {
                "auth = \"certificate\"".to_string()
            } else if l.starts_with("client_secret_file") {
                format!(
                    "certificate = \"{}\"\nprivate_key_file = \"{}\"",
                    cert_path.display(),
                    key_path.display()
                )
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&w.config, text).unwrap();
    let (code, out, err) = postern(&w.config, &["doctor", "--offline"]);
    assert_eq!(code, 1, "{out}{err}");
    let f = failures(&out).join("\n");
    assert!(f.contains("entra-cert.pem expired"), "{out}");
    assert!(f.contains("Certificates & secrets > Certificates"), "{out}");

    // Unwritable spool.
    let w = doctor_world(Script::new(), SECRET, |c| c.to_string());
    let spool = w.dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o500)).unwrap();
    let (code, out, _) = postern(&w.config, &["doctor", "--offline"]);
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(code, 1, "{out}");
    let f = failures(&out).join("\n");
    assert!(f.contains("spool_dir"), "{out}");
    assert!(f.contains("fix: chmod"), "{out}");
}

// ------------------------------------------------------------------------------------------
// metrics, health, status page

/// Parse a scrape with Python's prometheus_client (its text parser, and the OpenMetrics one)
/// into `name{labels} value` lines, sorted.
fn parse_with_prometheus_client(text: &str) -> Option<String> {
    if !require("python3") {
        return None;
    }
    let check = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !check {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 prometheus_client is not installed but CI must run this test"
        );
        eprintln!("SKIPPED: python3 prometheus_client not installed (scripts/test installs it)");
        return None;
    }
    let script = r##"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as prom
text = sys.stdin.read()
out = []
for fam in om(text):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out.append(f"{s.name}{{{labels}}} {s.value}")
# The classic Prometheus parser must read it too (minus the OpenMetrics-only EOF line).
n = sum(len(f.samples) for f in prom(text.replace("# EOF\n", "")))
assert n > 0
print("\n".join(sorted(out)))
"##;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into())
}

fn sample(parsed: &str, prefix: &str) -> f64 {
    parsed
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{parsed}"))
}

#[test]
fn metrics_count_what_flows_and_parse_with_prometheus_client() {
    let entra = FakeEntra::start();
    let exchange = Script::new()
        .accept_tokens(entra.smtp_token_check())
        .start();
    let dir = tempfile::tempdir().unwrap();
    let s = secret_file(dir.path(), "secret", SECRET);
    let p = Postern::start(&config(
        "[admin]\naddress = \"127.0.0.1:0\"",
        &[Account::secret("contoso", &entra, &exchange, &s)],
        &[Route {
            name: "m365",
            senders: "*@contoso.com",
            mailbox: "printer@contoso.com",
            account: "contoso",
        }],
    ));
    let admin = admin_addr(&p);
    for i in 0..3 {
        expect(
            &send_mail(
                p.addr(),
                &format!("dev{i}@local.test"),
                &["a@local.test"],
                b"Subject: x\r\n\r\nx",
            ),
            "250",
        );
    }
    for _ in 0..2 {
        expect(
            &send_mail(
                p.addr(),
                "printer@contoso.com",
                &["boss@fabrikam.com"],
                &message("printer@contoso.com"),
            ),
            "250",
        );
    }
    // Refused: no route for this sender.
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO client.test"), "250");
    let refused = c.cmd("MAIL FROM:<nobody@elsewhere.test>");
    assert!(refused.starts_with('5'), "{refused}");
    let _ = c.cmd("QUIT");
    assert!(wait_until(Duration::from_secs(20), || {
        p.wait_delivered(3, Duration::from_millis(10)).len() == 3 && exchange.delivered().len() == 2
    }));
    let (status, text) = http_get(admin, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let Some(parsed) = parse_with_prometheus_client(&text) else {
        return;
    };
    assert_eq!(
        sample(
            &parsed,
            "postern_messages_received_total{listener=\"local\"}"
        ),
        5.0,
        "{parsed}"
    );
    assert_eq!(
        sample(
            &parsed,
            "postern_messages_sent_total{mailbox=\"printer@contoso.com\",route=\"m365\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &parsed,
            "postern_delivery_latency_seconds_count{route=\"m365\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(&parsed, "postern_delivery_attempts_count{route=\"local\"}"),
        3.0
    );
    let refused_code = refused.get(4..9).unwrap_or("");
    assert_eq!(
        sample(
            &parsed,
            &format!(
                "postern_messages_refused_total{{code=\"{refused_code}\",listener=\"local\",stage=\"MAIL\"}}"
            )
        ),
        1.0,
        "{parsed}"
    );
    assert!(
        sample(&parsed, "postern_upstream_replies_total{code=\"2.6.0\"") >= 2.0,
        "{parsed}"
    );
    assert!(sample(&parsed, "postern_token_requests_total{account=\"contoso\"}") >= 1.0);
    assert_eq!(
        sample(&parsed, "postern_queue_messages{state=\"hold\"}"),
        0.0
    );
    assert_eq!(sample(&parsed, "postern_forwarder_running{}"), 1.0);
    assert!(sample(&parsed, "postern_spool_free_bytes{}") > 0.0);
    assert!(sample(&parsed, "postern_connections_total{listener=\"local\"}") >= 6.0);
    assert_eq!(
        sample(&parsed, "postern_connections_open{listener=\"local\"}"),
        0.0,
        "{parsed}"
    );
}

#[test]
fn healthz_turns_503_when_the_forwarder_stops_and_health_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop-forwarder");
    // `postern health` reads the address from the configuration: a fixed, free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = Postern::start_with_env(
        &basic_config("", &format!("[admin]\naddress = \"127.0.0.1:{port}\"")),
        &[],
        &[("POSTERN_TEST_STOP_FORWARDER", stop.to_str().unwrap())],
    );
    let admin = admin_addr(&p);
    assert_eq!(http_get(admin, "/healthz", None), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz", None).0, 200);
    let (code, out, err) = p.cli(&["health"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("healthy"), "{out}");
    std::fs::write(&stop, b"").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || http_get(
            admin, "/healthz", None
        )
        .0 == 503),
        "healthz stayed 200; log:\n{}",
        p.log_text()
    );
    let (_, body) = http_get(admin, "/healthz", None);
    assert!(body.contains("the forwarder"), "{body}");
    assert_eq!(http_get(admin, "/readyz", None).0, 503);
    let (code, _, err) = p.cli(&["health"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unhealthy") && err.contains("forwarder"),
        "{err}"
    );
}

#[test]
fn health_without_admin_listener_asks_the_control_socket() {
    let mut p = Postern::start(&basic_config("", ""));
    let (code, out, _) = p.cli(&["health"]);
    assert_eq!(code, 0, "{out}");
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(15));
    let (code, _, err) = p.cli(&["health"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no daemon answers"), "{err}");
}

#[test]
fn admin_token_guards_everything_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret_file(dir.path(), "admin-token", "s3cr3t-admin-token");
    let p = Postern::start(&basic_config(
        "",
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"",
            token.display()
        ),
    ));
    let admin = admin_addr(&p);
    for path in ["/", "/metrics", "/status.json"] {
        assert_eq!(http_get(admin, path, None).0, 401, "{path}");
        assert_eq!(http_get(admin, path, Some("Bearer wrong")).0, 401, "{path}");
        assert_eq!(
            http_get(admin, path, Some("Bearer s3cr3t-admin-token")).0,
            200,
            "{path}"
        );
    }
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("admin:s3cr3t-admin-token");
    assert_eq!(http_get(admin, "/", Some(&format!("Basic {basic}"))).0, 200);
    assert_eq!(http_get(admin, "/healthz", None).0, 200);
    assert!(!p.log_text().contains("s3cr3t-admin-token"));
}

#[test]
fn a_public_admin_address_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("postern.toml");
    std::fs::write(
        &cfg,
        basic_config("", "[admin]\naddress = \"0.0.0.0:9925\""),
    )
    .unwrap();
    let (code, out, err) = postern(&cfg, &["check"]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(err.contains("admin.address"), "{err}");
    assert!(err.contains("token_file"), "{err}");
}

#[test]
fn status_page_in_a_headless_browser_shows_the_held_mailbox() {
    let entra = FakeEntra::start();
    let exchange = Script::new()
        .accept_tokens(entra.smtp_token_check())
        .auth_failure("printer@contoso.com", AuthFailure::TenantDisabled)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let s = secret_file(dir.path(), "secret", SECRET);
    // A second mailbox paced to one message an hour: its second message waits its turn.
    let p = Postern::start(&config(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n[route.paced]\nsenders = [\"paced@contoso.com\"]\nmailbox = \"paced@contoso.com\"\ntransport = \"smtp\"\naccount = \"contoso\"\nrate = \"1/1h\"",
        &[Account::secret("contoso", &entra, &exchange, &s)],
        &[Route {
            name: "m365",
            senders: "*@contoso.com",
            mailbox: "printer@contoso.com",
            account: "contoso",
        }],
    ));
    expect(
        &send_mail(
            p.addr(),
            "printer@contoso.com",
            &["boss@fabrikam.com"],
            &message("printer@contoso.com"),
        ),
        "250",
    );
    assert!(
        p.wait_log("event=\"held\"", Duration::from_secs(20)),
        "{}",
        p.log_text()
    );
    for subject in ["first", "second"] {
        expect(
            &send_mail(
                p.addr(),
                "paced@contoso.com",
                &["boss@fabrikam.com"],
                format!("From: paced@contoso.com\r\nSubject: {subject}\r\n\r\nx\r\n").as_bytes(),
            ),
            "250",
        );
    }
    let admin = admin_addr(&p);
    // The page itself, as served; the paced mailbox shows why its mail waits, as `queue list`.
    let mut html = String::new();
    let shown = wait_until(Duration::from_secs(20), || {
        let (status, page) = http_get(admin, "/", None);
        assert_eq!(status, 200);
        html = page;
        html.contains("data-mailbox=\"paced@contoso.com\" data-state=\"paced\"")
    });
    assert!(
        shown,
        "no paced mailbox in:\n{html}\nlog:\n{}",
        p.log_text()
    );
    assert!(
        html.contains("paced: 1/1h for paced@contoso.com, next at "),
        "{html}"
    );
    let (_, list, _) = p.cli(&["queue", "list"]);
    assert!(
        list.contains("paced: 1/1h for paced@contoso.com, next at "),
        "the same words as queue list: {list}"
    );
    assert_eq!(
        exchange.delivered().len(),
        1,
        "the first went, the second waits"
    );
    assert!(html.contains("http-equiv=\"refresh\""), "auto-refresh");
    assert!(!html.contains("<script"), "no JavaScript");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external assets"
    );
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| have(b))
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed but CI must run this test"
        );
        eprintln!("SKIPPED: no headless chromium (scripts/test installs it)");
        return;
    };
    let url = format!("http://{admin}/");
    let profile = tempfile::tempdir().unwrap();
    let args = |extra: &str| -> Vec<String> {
        vec![
            "--headless".into(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", profile.path().display()),
            extra.into(),
            url.clone(),
        ]
    };
    let dom = Command::new(browser)
        .args(args("--dump-dom"))
        .output()
        .expect("chromium");
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        dom.contains("data-mailbox=\"printer@contoso.com\" data-state=\"held\""),
        "the browser's DOM lacks the held mailbox:\n{dom}"
    );
    assert!(
        dom.contains("SMTP AUTH is turned off for the whole tenant"),
        "{dom}"
    );
    assert!(
        dom.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        "{dom}"
    );
    let shot = profile.path().join("status.png");
    let out = Command::new(browser)
        .args(args(&format!("--screenshot={}", shot.display())))
        .arg("--window-size=1280,900")
        .output()
        .expect("chromium");
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("POSTERN_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
}

/// The status page shows text clients chose (sender mailboxes, errors); besides escaping it,
/// it tells the browser to run no script, load nothing and refuse framing (it sent none of
/// these headers before).
#[test]
fn the_status_page_forbids_scripts_and_framing() {
    let p = Postern::start(&basic_config("", "[admin]\naddress = \"127.0.0.1:0\""));
    let mut s = TcpStream::connect(admin_addr(&p)).expect("connect admin listener");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let (head, _) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for h in [
        "content-security-policy: default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "referrer-policy: no-referrer",
    ] {
        assert!(head.contains(h), "{h} missing in\n{head}");
    }
}
