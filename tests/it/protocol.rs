//! SMTP behaviour end to end, with exact replies, over a raw socket.

use std::time::Duration;

use base64::Engine;

use crate::harness::*;

#[test]
fn refused_network_gets_554_and_close() {
    let cfg = basic_config("", "").replace(
        r#"allow_networks = ["127.0.0.0/8"]"#,
        r#"allow_networks = ["10.9.0.0/16"]"#,
    );
    let p = Postern::start(&cfg);
    let mut c = Raw::connect(p.addr());
    let r = c.reply();
    expect(&r, "554 5.7.1");
    assert!(r.contains("127.0.0.1"), "{r}");
    assert!(c.closed());
    // The client is not told the listener's name or which setting refused it (it was:
    // `Access denied: 127.0.0.1 is not in allow_networks of listener "local"`); the log is.
    assert!(!r.contains("local") && !r.contains("allow_networks"), "{r}");
    assert!(
        p.wait_log(
            r#"detail="127.0.0.1 is not in allow_networks of listener \"local\"""#,
            Duration::from_secs(10)
        ),
        "{}",
        p.log_text()
    );
}

#[test]
fn sender_without_route_is_refused_at_mail_time() {
    let cfg = basic_config("", "").replace(r#"senders = ["*"]"#, r#"senders = ["*@example.com"]"#);
    let p = Postern::start(&cfg);
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    let r = c.cmd("MAIL FROM:<spoof@evil.test>");
    expect(&r, "550 5.7.1");
    expect(&c.cmd("MAIL FROM:<scanner@EXAMPLE.com>"), "250 2.1.0");
    expect(&c.cmd("RCPT TO:<a@b.test>"), "250 2.1.5");
    // Log lines reach the test through a reader thread: wait for it (it lagged under load).
    assert!(
        p.wait_log("rejected", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
}

#[test]
fn oversize_message_gets_552_after_reading_to_the_end_and_nothing_is_queued() {
    let p = Postern::start(&basic_config(r#"max_message_size = "10 KB""#, ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    let ehlo = c.cmd("EHLO t");
    assert!(ehlo.contains("SIZE 10000"), "{ehlo}");
    expect(&c.cmd("MAIL FROM:<a@example.com> SIZE=20000"), "552 5.3.4");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    let line = "x".repeat(998) + "\r\n";
    for _ in 0..30 {
        c.send(line.as_bytes());
    }
    c.send(b".\r\n");
    expect(&c.reply(), "552 5.3.4");
    // The session is still usable and the next message goes through.
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: small\r\n\r\nok\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0");
    assert_eq!(p.wait_delivered(1, Duration::from_secs(10)).len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(delivered_ids(&p.path("delivered")).len(), 1);
}

#[test]
fn too_many_recipients_get_452() {
    let p = Postern::start(&basic_config("max_recipients = 3", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    for i in 0..3 {
        expect(&c.cmd(&format!("RCPT TO:<r{i}@example.com>")), "250");
    }
    expect(&c.cmd("RCPT TO:<r3@example.com>"), "452 4.5.3");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n");
    expect(&c.reply(), "250");
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("delivered").join(format!("{}.json", ids[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["recipients"].as_array().unwrap().len(), 3);
}

#[test]
fn thousands_of_recipients_are_answered_and_not_accepted() {
    let p = Postern::start(&basic_config("max_recipients = 100", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    let mut batch = String::new();
    for i in 0..3000 {
        batch.push_str(&format!("RCPT TO:<r{i}@example.com>\r\n"));
    }
    c.send(batch.as_bytes());
    let mut ok = 0;
    let mut over = 0;
    for _ in 0..3000 {
        let r = c.reply();
        if r.starts_with("250") {
            ok += 1;
        } else if r.starts_with("452 4.5.3") {
            over += 1;
        } else if r.starts_with("421") {
            break; // too many errors: closing is a fine answer to this client
        } else {
            panic!("unexpected {r}");
        }
    }
    assert_eq!(ok, 100);
    assert!(over >= 1);
}

#[test]
fn bare_lf_and_smuggling_sequences_never_end_data() {
    let p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    // Each of these ends DATA on some server somewhere; none may end it here.
    c.send(b"Subject: smuggle\r\n\r\nline one\n.\nMAIL FROM:<evil@example.com>\r\n");
    c.send(b"second\r\n.\nRCPT TO:<victim@example.com>\r\n");
    c.send(b"third\n.\r\nDATA\r\n");
    c.send(b"fourth\r.\r\nQUIT\r\n");
    c.send(b"\r\n.\r\n");
    let r = c.reply();
    expect(&r, "250 2.0.0");
    expect(&c.cmd("QUIT"), "221");
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        delivered_ids(&p.path("delivered")).len(),
        1,
        "exactly one message"
    );
    let eml = std::fs::read(p.path("delivered").join(format!("{}.eml", ids[0]))).unwrap();
    let text = String::from_utf8_lossy(&eml);
    assert!(
        text.contains("line one\r\n.\r\nMAIL FROM:<evil@example.com>"),
        "bare LF stored as CRLF: {text:?}"
    );
    assert!(!text.contains("\n.\n"));
    for (i, b) in eml.iter().enumerate() {
        if *b == b'\n' {
            assert!(i > 0 && eml[i - 1] == b'\r', "bare LF stored at {i}");
        }
    }
}

#[test]
fn pipelined_transaction_in_one_write() {
    let p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    let ehlo = c.cmd("EHLO t");
    assert!(ehlo.contains("PIPELINING"));
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n");
    expect(&c.reply(), "250 2.1.0");
    expect(&c.reply(), "250 2.1.5");
    expect(&c.reply(), "250 2.1.5");
    expect(&c.reply(), "354");
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n");
    expect(&c.reply(), "250 2.0.0");
    expect(&c.reply(), "250 2.1.0");
    expect(&c.reply(), "250 2.1.5");
    expect(&c.reply(), "354");
    c.send(b"Subject: q\r\n\r\nbody\r\n.\r\nQUIT\r\n");
    expect(&c.reply(), "250 2.0.0");
    expect(&c.reply(), "221");
    assert_eq!(p.wait_delivered(2, Duration::from_secs(10)).len(), 2);
}

#[test]
fn chunking_bdat() {
    let p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    assert!(c.cmd("EHLO t").contains("CHUNKING"));
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.com>"), "250");
    let part1 = b"Subject: bdat\r\n\r\nfirst\r\n";
    let part2 = b".not stuffed\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    expect(&c.reply(), "250");
    c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes());
    c.send(part2);
    expect(&c.reply(), "250 2.0.0");
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    let eml = std::fs::read_to_string(p.path("delivered").join(format!("{}.eml", ids[0]))).unwrap();
    assert!(eml.ends_with("first\r\n.not stuffed\r\n"), "{eml:?}");
}

#[test]
fn slow_client_times_out_with_421() {
    let p = Postern::start(&basic_config(r#"command_timeout = "1s""#, ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    std::thread::sleep(Duration::from_millis(1600));
    expect(&c.reply(), "421 4.4.2");
    assert!(c.closed());
}

#[test]
fn endless_command_line_is_refused_without_buffering() {
    let p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    let junk = vec![b'A'; 1 << 20];
    c.send(&junk);
    c.send(b"\r\n");
    expect(&c.reply(), "500 5.5.2");
    expect(&c.cmd("NOOP"), "250");
}

#[test]
fn vrfy_help_noop_rset_quit() {
    let p = Postern::start(&basic_config("", ""));
    let mut c = Raw::connect(p.addr());
    let greet = c.reply();
    expect(&greet, "220 relay.test");
    expect(&c.cmd("HELO old.printer"), "250");
    expect(&c.cmd("VRFY postmaster"), "252 2.5.0");
    expect(&c.cmd("HELP"), "214");
    expect(&c.cmd("NOOP"), "250 2.0.0");
    expect(&c.cmd("DATA"), "503 5.5.1");
    expect(&c.cmd("RSET"), "250 2.0.0");
    expect(&c.cmd("FOO"), "500 5.5.2");
    expect(&c.cmd("QUIT"), "221 2.0.0");
    assert!(c.closed());
}

fn auth_config(hash: &str) -> String {
    basic_config(
        r#"auth = "required""#,
        &format!(
            r#"[limits]
auth_max_failures = 4
auth_lockout = "1m"

[user.scanner]
password_hash = "{hash}"
may_send_as = ["scanner@example.com"]
"#
        ),
    )
}

pub fn hash(password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let h = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(h.starts_with("$argon2id$"), "{h}");
    h
}

#[test]
fn auth_plain_and_login_and_may_send_as() {
    let p = Postern::start(&auth_config(&hash("s3cret-pw")));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    let ehlo = c.cmd("EHLO t");
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "loopback may AUTH without TLS: {ehlo}"
    );
    expect(&c.cmd("MAIL FROM:<scanner@example.com>"), "530 5.7.0");
    expect(
        &c.cmd(&format!("AUTH PLAIN {}", b64("\0scanner\0wrong"))),
        "535 5.7.8",
    );
    expect(
        &c.cmd(&format!("AUTH PLAIN {}", b64("\0scanner\0s3cret-pw"))),
        "235 2.7.0",
    );
    expect(&c.cmd("MAIL FROM:<boss@example.com>"), "550 5.7.1");
    expect(&c.cmd("MAIL FROM:<scanner@example.com>"), "250");
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("AUTH LOGIN"), "334");
    expect(&c.cmd(&b64("scanner")), "334");
    expect(&c.cmd(&b64("s3cret-pw")), "235 2.7.0");
    assert!(!p.log_text().contains("s3cret-pw"));
}

#[test]
fn brute_force_is_slowed_then_refused() {
    let p = Postern::start(&auth_config(&hash("right")));
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut refused = false;
    for i in 0..8 {
        let mut c = Raw::connect(p.addr());
        expect(&c.reply(), "220");
        expect(&c.cmd("EHLO t"), "250");
        let r = c.cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0scanner\0guess{i}"))
        ));
        if r.starts_with("454") || r.starts_with("421") {
            refused = true;
            // Even the right password is refused while locked out.
            let mut c = Raw::connect(p.addr());
            let g = c.reply();
            if g.starts_with("220") {
                c.cmd("EHLO t");
                let r = c.cmd(&format!("AUTH PLAIN {}", b64("\0scanner\0right")));
                assert!(r.starts_with("454") || r.starts_with("421"), "{r}");
            }
            break;
        }
        expect(&r, "535 5.7.8");
    }
    assert!(refused, "lockout after auth_max_failures");
}

#[test]
fn low_disk_space_answers_452_before_data() {
    // A reserve larger than any disk: the spool is "full".
    let p = Postern::start(&basic_config("", "[limits]\nmin_free_disk = \"1000 PB\"\n"));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "452 4.3.1");
    expect(&c.cmd("DATA"), "503");
}
