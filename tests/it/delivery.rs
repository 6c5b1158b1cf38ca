//! The forwarder: immediate wake-up, retries with backoff, lifetime, shutdown and reload.

use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn delivery_starts_without_polling_delay() {
    let p = Postern::start(&basic_config("", ""));
    let t = Instant::now();
    expect(
        &send_mail(
            p.addr(),
            "a@example.com",
            &["b@example.org"],
            b"Subject: fast\r\n\r\nx",
        ),
        "250",
    );
    assert_eq!(p.wait_delivered(1, Duration::from_secs(5)).len(), 1);
    // Generous bound: the point is "not a 30 s rescan", not a timing benchmark.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn transient_failures_back_off_and_then_deliver() {
    let cfg = basic_config("", "").replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: r\r\n\r\nx",
    ));
    // at least two attempts fail, each recorded in the envelope
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempts = 0;
    while attempts < 2 && Instant::now() < deadline {
        if let Some(v) = queue_envelope(&p.path("spool/deferred").join(&id)) {
            attempts = v["attempts"].as_u64().unwrap_or(0);
            if attempts >= 1 {
                assert!(v["next_attempt"].as_u64().is_some());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        attempts >= 2,
        "retried with backoff (retry_initial 1s); log:\n{}",
        p.log_text()
    );
    assert!(p.wait_log("event=\"deferred\"", Duration::from_secs(5)));
    std::fs::remove_file(p.path("blocked")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.path("blocked/sub").join(format!("{id}.json")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(p.path("blocked/sub").join(format!("{id}.json")).exists());
}

#[test]
fn lifetime_exceeded_goes_to_failed_with_reason() {
    let cfg = basic_config("", "")
        .replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#)
        .replace(
            r#"retry_max = "2s""#,
            "retry_max = \"2s\"\nmax_lifetime = \"2s\"",
        );
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: r\r\n\r\nx",
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !p.path("spool/failed").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let env = queue_envelope(&p.path("spool/failed").join(&id)).expect("envelope");
    assert!(
        env["last_error"].as_str().unwrap().contains("max_lifetime"),
        "{env}"
    );
    assert_eq!(env["recipients"][0]["status"], "failed");
    assert!(
        p.wait_log("event=\"failed\"", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
}

#[test]
fn sigterm_finishes_the_transaction_in_progress_then_exits() {
    let mut p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    let mut idle = Raw::connect(p.addr());
    expect(&idle.reply(), "220");
    p.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    // the idle connection is told we are going away
    let r = idle.reply();
    assert!(r.is_empty() || r.starts_with("421 4.3.2"), "{r}");
    // the one mid-transaction may finish
    expect(&c.cmd("RCPT TO:<b@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: last\r\n\r\nx\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0");
    let r = c.cmd("MAIL FROM:<a@example.com>");
    assert!(r.is_empty() || r.starts_with("421"), "{r}");
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0));
    // new connections are refused now
    assert!(std::net::TcpStream::connect(p.addr()).is_err());
    p.spawn();
    assert_eq!(p.wait_delivered(1, Duration::from_secs(10)).len(), 1);
}

/// SIGTERM at the earliest moment a client can see postern (its port accepts connections) is a
/// graceful stop (exit 0), never the signal's default action. The handlers used to be
/// installed only after "ready": on a loaded machine a SIGTERM sent right after a client's
/// first commands killed the daemon mid-transaction (the test above, about once in 20 runs).
#[test]
fn sigterm_as_soon_as_the_port_accepts_is_a_graceful_stop() {
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("postern.toml");
        std::fs::write(
            &config,
            basic_config("", "").replace(
                r#"address = "127.0.0.1:0""#,
                &format!(r#"address = "127.0.0.1:{port}""#),
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("POSTERN_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "postern never listened");
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let code = wait_child(&mut child, Duration::from_secs(30));
        let mut log = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut log);
        }
        assert_eq!(code, Some(0), "round {round}: {log}");
        assert!(
            log.contains("SIGTERM: shutting down"),
            "round {round}: {log}"
        );
    }
}

#[test]
fn sighup_reloads_routes_and_listener_settings_without_losing_the_queue() {
    let p = Postern::start(
        &basic_config("", "").replace(r#"senders = ["*"]"#, r#"senders = ["*@example.com"]"#),
    );
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<x@other.test>"), "550 5.7.1");
    drop(c);
    let port = p.addr().port();
    let new = basic_config("max_recipients = 1", "").replace(
        r#"address = "127.0.0.1:0""#,
        &format!(r#"address = "127.0.0.1:{port}""#),
    );
    std::fs::write(&p.config_path, new).unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log_text().contains("configuration reloaded") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<x@other.test>"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.org>"), "452 4.5.3");
    // a broken config is refused and the running one kept
    std::fs::write(&p.config_path, "this is = not toml [").unwrap();
    p.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log_text().contains("not reloaded") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.log_text().contains("not reloaded"));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
}

/// Once "configuration reloaded" is logged, every new connection gets the new configuration.
/// The old accept loop shares the socket with the new one; it used to be able to accept once
/// more after the reload (an unbiased `select!` between "stop" and a waiting connection, and
/// the reload did not wait for the old loop to end), so a client got the old configuration:
/// the test above failed about once in 45 runs under load.
#[test]
fn every_connection_after_a_reload_gets_the_new_configuration() {
    let p = Postern::start(&basic_config("", ""));
    let port = p.addr().port();
    let reloads = |p: &Postern| p.log_text().matches("configuration reloaded").count();
    for round in 1..=25 {
        let host = format!("gen{round}.test");
        let cfg = basic_config("", "")
            .replace(
                "hostname = \"relay.test\"",
                &format!("hostname = \"{host}\""),
            )
            .replace(
                r#"address = "127.0.0.1:0""#,
                &format!(r#"address = "127.0.0.1:{port}""#),
            );
        std::fs::write(&p.config_path, cfg).unwrap();
        p.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reloads(&p) < round && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reloads(&p), round, "{}", p.log_text());
        for _ in 0..3 {
            let mut c = Raw::connect(p.addr());
            let greeting = c.reply();
            assert!(
                greeting.starts_with(&format!("220 {host} ")),
                "round {round}: {greeting:?}"
            );
        }
    }
}

#[test]
fn discard_route_accepts_and_drops_with_a_log_line() {
    let cfg = basic_config(
        "",
        "[route.noise]\nsenders = [\"status@printer.example\"]\ntransport = \"discard\"\n",
    );
    let p = Postern::start(&cfg);
    let id = queued_id(&send_mail(
        p.addr(),
        "status@printer.example",
        &["ops@example.org"],
        b"Subject: toner low\r\n\r\nx",
    ));
    assert!(p.wait_log(&format!("queue_id=\"{id}\""), Duration::from_secs(5)));
    assert!(
        p.wait_log("relay=\"discard\"", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.cli(&["queue", "list"]).1.contains(&id) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !p.cli(&["queue", "list"]).1.contains(&id),
        "dropped from the queue"
    );
    assert!(
        delivered_ids(&p.path("delivered")).is_empty(),
        "nothing written by the file route"
    );
    // other senders still go through the file route
    send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: real\r\n\r\nx",
    );
    assert_eq!(p.wait_delivered(1, Duration::from_secs(5)).len(), 1);
}

#[test]
fn a_manual_retry_neither_counts_as_an_attempt_nor_stretches_the_backoff() {
    let cfg = basic_config("", "")
        .replace(r#"dir = "delivered""#, r#"dir = "blocked/sub""#)
        .replace(r#"retry_initial = "1s""#, r#"retry_initial = "10m""#)
        .replace(r#"retry_max = "2s""#, r#"retry_max = "1h""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: r\r\n\r\nx",
    ));
    let deferred = p.path("spool/deferred").join(&id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue_envelope(&deferred).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = queue_envelope(&deferred).expect("deferred after the first attempt");
    assert_eq!(before["attempts"], 1);
    let scheduled = before["next_attempt"].as_u64().unwrap();
    // The admin retries now; it fails again.
    let (code, out, err) = p.cli(&["queue", "retry", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.log_text().matches("event=\"deferred\"").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        p.log_text().matches("event=\"deferred\"").count(),
        2,
        "{}",
        p.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while queue_envelope(&deferred).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = queue_envelope(&deferred).expect("deferred again");
    assert_eq!(
        after["attempts"], 1,
        "the manual retry is not an attempt: {after}"
    );
    assert_eq!(
        after["next_attempt"].as_u64(),
        Some(scheduled),
        "the backoff is not stretched: {after}"
    );
    // Fixed, and retried by hand: delivered.
    std::fs::remove_file(p.path("blocked")).unwrap();
    let (code, _, _) = p.cli(&["queue", "retry", &id]);
    assert_eq!(code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.path("blocked/sub").join(format!("{id}.json")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.path("blocked/sub").join(format!("{id}.json")).exists());
}

#[test]
fn the_rolling_recipient_window_survives_a_restart() {
    let cfg = basic_config("", "").replace(
        r#"dir = "delivered""#,
        "dir = \"delivered\"\ndaily_recipients = \"2/8s\"",
    );
    let mut p = Postern::start(&cfg);
    for i in 0..2 {
        expect(
            &send_mail(
                p.addr(),
                "a@example.com",
                &["b@example.org"],
                format!("Subject: {i}\r\n\r\nx").as_bytes(),
            ),
            "250",
        );
    }
    assert_eq!(p.wait_delivered(2, Duration::from_secs(10)).len(), 2);
    // The count reaches the state file within a second or so; then the host loses power.
    let state = p.path("state/delivery.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    let recorded = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v["mailboxes"]["a@example.com"]["sent"]
                    .as_array()
                    .map(|a| a.iter().map(|e| e[1].as_u64().unwrap_or(0)).sum::<u64>())
            })
            .unwrap_or(0)
    };
    while recorded() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(recorded(), 2);
    p.kill9();
    p.spawn();
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["c@example.org"],
        b"Subject: third\r\n\r\nx",
    ));
    // The third waits for the window, although this daemon sent nothing yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = String::new();
    while !out.contains("(paced: 2 recipients/8s for a@example.com, next at ")
        && Instant::now() < deadline
    {
        out = p.cli(&["queue", "list"]).1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        out.contains(&id) && out.contains("(paced: 2 recipients/8s"),
        "{out}\n{}",
        p.log_text()
    );
    assert_eq!(delivered_ids(&p.path("delivered")).len(), 2);
    assert_eq!(p.wait_delivered(3, Duration::from_secs(15)).len(), 3);
}
