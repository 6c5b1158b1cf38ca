//! What an admin meets running postern: logs (JSON, refused recipients, the queue commands'
//! events), command-line errors and help, bind errors, stopping, systemd's notify and
//! watchdog, `postern health`, the embedded default from any directory, configuration from
//! environment variables.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env_remove("POSTERN_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn json_log_mode_has_only_json_lines_and_no_rust_debug_text() {
    let mut p = Postern::start_with(&basic_config("", ""), &["--log-format", "json"]);
    let r = send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: j\r\n\r\nx",
    );
    expect(&r, "250");
    // A refused command, a reload and a stop: every kind of line the daemon prints.
    let mut c = Raw::connect(p.addr());
    c.reply();
    c.cmd("EHLO x");
    c.cmd("MAIL FROM:<a@example.com>");
    c.cmd("RCPT TO:<a b@c>");
    c.cmd("QUIT");
    assert!(p.wait_log("\"sent\"", Duration::from_secs(10)));
    p.signal("HUP");
    assert!(p.wait_log("configuration reloaded", Duration::from_secs(10)));
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0));
    let stderr = p.log_text();
    let stdout = p.stdout_lines.lock().unwrap().join("\n");
    for line in stderr.lines().chain(stdout.lines()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        assert!(!line.contains("Some("), "Rust debug text: {line}");
    }
    assert!(stdout.contains(r#""event":"listening""#), "{stdout}");
    assert!(stderr.contains(r#""event":"rejected""#), "{stderr}");
    // Fatal errors are JSON too.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listener = 3\n").unwrap();
    let (code, _, err) = run(&[
        "--log-format",
        "json",
        "serve",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, 78);
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["level"], "ERROR", "{line}");
    }
}

#[test]
fn refused_recipients_are_logged_with_their_address() {
    let p = Postern::start(&basic_config("max_recipients = 1", ""));
    let mut c = Raw::connect(p.addr());
    c.reply();
    c.cmd("EHLO x");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<first@example.org>"), "250");
    expect(&c.cmd("RCPT TO:<second@example.org>"), "452");
    expect(&c.cmd("RCPT TO:<bad address@example.org>"), "501");
    c.cmd("QUIT");
    // The last refusal's line: the log is read once both are written.
    assert!(p.wait_log("bad address@example.org", Duration::from_secs(5)));
    let log = p.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"rejected\""))
        .collect();
    assert!(
        refused
            .iter()
            .any(|l| l.contains("stage=\"RCPT\"") && l.contains("to=\"second@example.org\"")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("stage=\"RCPT\"")
            && l.contains("to=\"<bad address@example.org>\"")
            && l.contains("501")),
        "{log}"
    );
}

#[test]
fn queue_commands_are_logged_by_the_daemon() {
    // A retry an hour away keeps the message in deferred/ while the commands run (with the
    // harness's 1 s retries, `hold` could find it in active/ and answer "wrong state").
    let cfg = basic_config("", "")
        .replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#)
        .replace(r#"retry_initial = "1s""#, r#"retry_initial = "1h""#)
        .replace(r#"retry_max = "2s""#, r#"retry_max = "2h""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"not a directory").unwrap();
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"x",
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.path("spool/deferred").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (cmd, event) in [
        ("hold", "held"),
        ("release", "released"),
        ("hold", "held"),
        ("delete", "deleted"),
    ] {
        let needle = format!("event=\"{event}\" queue_id=\"{id}\"");
        let before = p.log_text().matches(&needle).count();
        let (code, _, err) = p.cli(&["queue", cmd, &id]);
        assert_eq!(code, 0, "{cmd}: {err}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.log_text().matches(&needle).count() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            p.log_text().matches(&needle).count() > before,
            "{cmd} not in the daemon's log:\n{}",
            p.log_text()
        );
        // A released message is tried at once; the next command waits until it is back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while cmd == "release"
            && !p.path("spool/deferred").join(&id).exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Nothing odd gets into the log through the control socket.
    let socket = p.path("spool/control.sock");
    if socket.exists() {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        use std::io::Write;
        let _ = s.write_all(b"held x\"forged event\n");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!p.log_text().contains("forged"), "{}", p.log_text());
    }
}

#[test]
fn bad_log_level_is_a_usage_error_and_help_is_per_subcommand() {
    let (code, _, err) = run(&["--log-level", "info,=[", "version"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--log-level"), "{err}");
    let out = Command::new(bin())
        .arg("version")
        .env("POSTERN_LOG", "what=ever=")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let (code, _, err) = run(&[
        "serve",
        "--config",
        "/nonexistent/postern.toml",
        "--log-level",
        "postern=loud",
    ]);
    assert_eq!(code, 2, "{err}");

    let help = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    let queue_list = help(&["queue", "list", "--help"]);
    assert!(queue_list.contains("--json") && queue_list.contains("--config"));
    assert!(!queue_list.contains("--log-format"), "{queue_list}");
    let version = help(&["version", "--help"]);
    assert!(
        !version.contains("--config") && !version.contains("--log-level"),
        "{version}"
    );
    let serve = help(&["serve", "--help"]);
    assert!(
        serve.contains("--config") && serve.contains("--log-format"),
        "{serve}"
    );
    let hash = help(&["hash-password", "--help"]);
    assert!(!hash.contains("--config"), "{hash}");
    let sendmail = help(&["sendmail", "--help"]);
    assert!(
        sendmail.contains("-t") && sendmail.contains("EX_TEMPFAIL"),
        "{sendmail}"
    );
    // The top level still takes the global options before the subcommand.
    assert!(help(&["--help"]).contains("Exit codes"));
}

#[test]
fn address_in_use_is_explained_once() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        basic_config("", "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let (code, _, err) = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 70, "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("ss -ltnp"), "{err}");
    assert_eq!(err.matches("(os error 98)").count(), 1, "{err}");
}

#[test]
fn sigterm_exits_within_the_grace_with_an_account_and_a_stuck_token_request() {
    // A token endpoint that accepts and never answers: the delivery hangs in flight.
    let stuck = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/token",
        stuck.local_addr().unwrap().port()
    );
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in stuck.incoming().flatten() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let account = format!(
        r#"[account.c]
tenant = "contoso.onmicrosoft.com"
client_id = "00000000-0000-0000-0000-000000000001"
auth = "client_secret"
client_secret = "not-a-real-secret"
token_url = "{url}"
"#
    );
    let cfg = basic_config("", &account)
        .replace(r#"shutdown_grace = "10s""#, r#"shutdown_grace = "2s""#)
        .replace(
            "transport = \"file\"\ndir = \"delivered\"",
            "transport = \"smtp\"\naccount = \"c\"",
        );
    let mut p = Postern::start(&cfg);
    expect(
        &send_mail(p.addr(), "a@contoso.com", &["b@example.org"], b"x"),
        "250",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !accepted.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        "no token request"
    );
    let t = Instant::now();
    p.signal("TERM");
    let code = p.wait_exit(Duration::from_secs(15));
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{}", p.log_text());
    // The grace (2 s) plus the final checkpoint; generous for a loaded machine.
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}:\n{}",
        p.log_text()
    );
    assert!(p.log_text().contains("postern stopped"));
}

#[test]
fn systemd_notify_ready_watchdog_and_stopping() {
    for abstract_socket in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (sock, name) = if abstract_socket {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("postern-test-{}-{}", std::process::id(), rand_suffix());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.path().join("notify.sock");
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            )
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut p = Postern::start_with_env(
            &basic_config("", ""),
            &[],
            &[("NOTIFY_SOCKET", &name), ("WATCHDOG_USEC", "200000")],
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.iter().filter(|m: &&String| *m == "WATCHDOG=1").count() < 3
            && Instant::now() < deadline
        {
            let n = sock.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(got.first().map(String::as_str), Some("READY=1"), "{got:?}");
        assert!(
            got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3,
            "{got:?}"
        );
        p.signal("TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0));
        let mut rest = Vec::new();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while let Ok(n) = sock.recv(&mut buf) {
            rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn health_says_whether_the_daemon_answers() {
    let mut p = Postern::start(&basic_config("", ""));
    let (code, out, err) = p.cli(&["health"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("healthy"), "{out}");
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(15));
    let (code, _, err) = p.cli(&["health"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unhealthy") && err.contains("no daemon answers"),
        "{err}"
    );
}

#[test]
fn queue_commands_find_the_embedded_default_spool_from_any_directory() {
    if std::path::Path::new("/etc/postern/postern.toml").exists() {
        eprintln!("SKIPPED: /etc/postern/postern.toml exists, so the embedded default is not used");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let started_in = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let cli = |dir: &std::path::Path, args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(dir)
            .env("HOME", home.path())
            .env_remove("XDG_STATE_HOME")
            .env_remove("POSTERN_CONFIG")
            .env_remove("POSTERN_LISTEN")
            .output()
            .unwrap()
    };
    // Before any daemon ran: the error says where the embedded default keeps its spool.
    let out = cli(elsewhere.path(), &["queue", "list"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("embedded default") && err.contains("postern-data"),
        "{err}"
    );
    // `serve` on the embedded default (127.0.0.1:2525; if another test or program holds the
    // port it stops at once, after noting where it runs and creating its spool).
    let mut daemon = Command::new(bin())
        .arg("serve")
        .current_dir(started_in.path())
        .env("HOME", home.path())
        .env_remove("XDG_STATE_HOME")
        .env_remove("POSTERN_CONFIG")
        .env_remove("POSTERN_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = daemon.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = BufReader::new(stdout).lines();
    while Instant::now() < deadline && !started_in.path().join("postern-data/spool").is_dir() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    while lines.next().is_some() {}
    let out = cli(elsewhere.path(), &["queue", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Mail queue is empty"));
}

#[test]
fn configuration_from_environment_variables_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let state = dir.path().join("state");
    let mut child = Command::new(bin())
        .arg("serve")
        .env_remove("POSTERN_CONFIG")
        .env("POSTERN_LISTEN", "127.0.0.1:0")
        .env("POSTERN_SPOOL_DIR", &spool)
        .env("POSTERN_STATE_DIR", &state)
        .env("POSTERN_HOSTNAME", "sidecar.test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("postern: listening on env1 ") {
            addr = rest.parse().ok();
        }
        if line == "postern: ready" {
            break;
        }
    }
    let addr = addr.expect("listening line");
    let r = send_mail(
        addr,
        "app@example.com",
        &["x@example.org"],
        b"Subject: env\r\n\r\nx",
    );
    expect(&r, "250");
    let id = queued_id(&r);
    let delivered = state.join("delivered").join(format!("{id}.json"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !delivered.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(delivered.exists(), "not delivered into STATE_DIR/delivered");
    // A bad variable is named in the error.
    let out = Command::new(bin())
        .arg("check")
        .env_remove("POSTERN_CONFIG")
        .env("POSTERN_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("environment variable POSTERN_LISTEN"), "{err}");
}
