//! The CLI: `check`, config errors through the binary, queue commands against a live daemon.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn version_and_help() {
    let out = Command::new(bin()).arg("version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("postern "));
    for sub in [
        &["--help"][..],
        &["serve", "--help"],
        &["queue", "--help"],
        &["queue", "retry", "--help"],
        &["check", "--help"],
    ] {
        let out = Command::new(bin()).args(sub).output().unwrap();
        assert!(out.status.success(), "{sub:?}");
        assert!(!out.stdout.is_empty());
    }
    let out = Command::new(bin()).arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn check_prints_effective_config_and_embedded_default_works() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, basic_config("", "")).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("local") && text.contains("127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("default"), "{text}");
    // Without a config file the embedded default is used (unless /etc/postern exists here).
    if !std::path::Path::new("/etc/postern/postern.toml").exists() {
        let out = Command::new(bin())
            .arg("check")
            .current_dir(dir.path())
            .env_remove("POSTERN_CONFIG")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("embedded default") && text.contains("127.0.0.1:2525"),
            "{text}"
        );
    }
}

#[test]
fn config_errors_name_file_line_and_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("broken.toml");
    std::fs::write(&cfg, "spool_dir = \"s\"\n\n[listener.lan]\naddress = \"127.0.0.1:2525\"\ntls = \"startls\"\nmax_mesage_size = \"1 MB\"\n\n[route.r]\nsenders = [\"*\"]\ntransport = \"file\"\ndir = \"d\"\n").unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.toml:5") && err.contains("listener.lan.tls"),
        "{err}"
    );
    assert!(
        err.contains("broken.toml:6")
            && err.contains("max_mesage_size")
            && err.contains("max_message_size"),
        "{err}"
    );
    // serve refuses to start on the same file, with the same message
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

/// Issue 7 item 9: `check` said OK for a certificate and key that do not match, which `serve`
/// then refused (exit 70); and a file that is not UTF-8 got no line and "check the path and
/// its permissions". Both now fail `check` and `serve` alike, at the right line.
#[test]
fn check_refuses_a_mismatched_tls_pair_and_a_non_utf8_file() {
    let cases = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    let run = |sub: &str, case: &str| {
        let out = Command::new(bin())
            .args([sub, "--config"])
            .arg(cases.join(case).join("postern.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for sub in ["check", "serve"] {
        let (code, err) = run(sub, "32-tls-key-mismatch");
        assert_eq!(code, Some(78), "{sub}: {err}");
        assert!(
            err.contains("postern.toml:7:11: listener.submission.tls_key: the private key in")
                && err.contains("does not belong to the certificate"),
            "{sub}: {err}"
        );
        let (code, err) = run(sub, "33-not-utf8");
        assert_eq!(code, Some(78), "{sub}: {err}");
        assert!(
            err.contains("postern.toml:4:6: the file is not UTF-8 text: byte 0xE9"),
            "{sub}: {err}"
        );
        assert!(!err.contains("permissions"), "{sub}: {err}");
    }
}

#[test]
fn queue_commands_work_while_the_daemon_runs() {
    // Deliveries fail (the target directory is a file), so messages stay deferred.
    let cfg = basic_config("", "").replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"not a directory").unwrap();
    let r = send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: q\r\n\r\nbody",
    );
    expect(&r, "250 2.0.0");
    let id = queued_id(&r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.path("spool/deferred").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, _) = p.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("deferred"), "{out}");
    let (code, out, _) = p.cli(&["queue", "list", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    assert!(
        v[0]["last_error"].as_str().unwrap().contains("blocked"),
        "{out}"
    );
    let (code, out, _) = p.cli(&["queue", "show", &id]);
    assert_eq!(code, 0);
    assert!(
        out.contains("<b@example.org> pending") && out.contains("attempts:"),
        "{out}"
    );

    // hold: the daemon stops retrying it
    let (code, _, err) = p.cli(&["queue", "hold", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(p.path("spool/hold").join(&id).exists());
    // fix the cause, release: delivered at once, not at the next backoff
    std::fs::remove_file(p.path("blocked")).unwrap();
    let (code, _, err) = p.cli(&["queue", "release", &id]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.path("blocked/sub").join(format!("{id}.json")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p.path("blocked/sub").join(format!("{id}.json")).exists(),
        "released message delivered; log:\n{}",
        p.log_text()
    );
    assert!(p.wait_log("event=\"sent\"", Duration::from_secs(5)));

    // unknown ids and bad ids
    let (code, _, err) = p.cli(&["queue", "show", "0000000000000000"]);
    assert_eq!(code, 66, "{err}");
    let (code, _, _) = p.cli(&["queue", "delete", "../../etc/passwd"]);
    assert_eq!(code, 66);
}

#[test]
fn queue_delete_and_retry_all() {
    let cfg = basic_config("", "").replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    let a = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: a\r\n\r\na",
    ));
    let b = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: b\r\n\r\nb",
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(p.path("spool/deferred").join(&a).exists()
        && p.path("spool/deferred").join(&b).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = p.cli(&["queue", "delete", &a]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!p.path("spool/deferred").join(&a).exists());
    std::fs::remove_file(p.path("blocked")).unwrap();
    let (code, out, _) = p.cli(&["queue", "retry", "--all"]);
    assert_eq!(code, 0);
    assert!(out.contains('1'), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.path("blocked/sub").join(format!("{b}.json")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.path("blocked/sub").join(format!("{b}.json")).exists());
    assert!(
        !p.path("blocked/sub").join(format!("{a}.json")).exists(),
        "deleted message never delivered"
    );
}

#[test]
fn json_logs_have_one_object_per_line_with_queue_ids() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, basic_config("", "")).unwrap();
    let mut child = Command::new(bin())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    // In JSON mode the ready lines on stdout are JSON objects too.
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON ready line");
        if v["event"] == "listening" && v["listener"] == "local" {
            addr = v["address"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        }
        if v["event"] == "ready" {
            break;
        }
        line.clear();
    }
    let addr = addr.expect("listening line");
    let id = queued_id(&send_mail(
        addr,
        "a@example.com",
        &["b@example.org"],
        b"Subject: j\r\n\r\nx",
    ));
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let mut events = Vec::new();
    for l in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
        if v["queue_id"] == id.as_str() {
            events.push(v["event"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(events, vec!["queued", "sent"], "{err}");
}
