//! Connection reuse and BDAT through the real binary (issue 8 items 1 and 2): devices send
//! plain SMTP to postern, which delivers to the fake Exchange over kept, authenticated
//! connections, never more than 3 per mailbox, with `BDAT` since Exchange offers CHUNKING.

use std::time::Duration;

use crate::fake::entra::{CLIENT_ID, FakeEntra, SECRET, TENANT};
use crate::fake::exchange::{FakeExchange, Script};
use crate::harness::*;
use crate::m365::wait_until;

const MAILBOX: &str = "scanner@contoso.com";

struct World {
    _entra: FakeEntra,
    exchange: FakeExchange,
    postern: Postern,
    _secret_dir: tempfile::TempDir,
}

/// A fake Entra and Exchange (scripted by `script`) and a postern whose route `m365` sends
/// as each sender's own mailbox without pacing; `delivery` goes into `[delivery]`.
fn world(script: Script, delivery: &str) -> World {
    let entra = FakeEntra::start();
    let exchange = script.accept_tokens(entra.smtp_token_check()).start();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("client-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let cfg = format!(
        r#"hostname = "relay.test"
spool_dir = "spool"
state_dir = "state"

[delivery]
retry_initial = "1s"
retry_max = "2s"
hold_retry = "1s"
{delivery}

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]
max_message_size = "30 MB"

[account.contoso]
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
auth = "client_secret"
client_secret_file = "{secret}"
authority = "{authority}"
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{ca}"

[route.m365]
senders = ["*@contoso.com"]
rate = "unlimited"
transport = "smtp"
account = "contoso"
"#,
        secret = secret.display(),
        authority = entra.base,
        port = exchange.addr().port(),
        ca = exchange.ca_pem().display(),
    );
    let postern = Postern::start(&cfg);
    World {
        _entra: entra,
        exchange,
        postern,
        _secret_dir: secret_dir,
    }
}

impl World {
    /// Send one message from the mailbox to `to` through postern (accepted with 250).
    fn send(&self, to: &str, subject: &str) {
        let body = format!("From: {MAILBOX}\r\nSubject: {subject}\r\n\r\nbody\r\n");
        expect(
            &send_mail(self.postern.addr(), MAILBOX, &[to], body.as_bytes()),
            "250",
        );
    }

    /// Wait until `n` messages were accepted by the fake Exchange.
    fn wait_delivered(&self, n: usize, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.exchange.delivered().len() >= n),
            "{} of {n} delivered; log:\n{}",
            self.exchange.delivered().len(),
            self.postern.log_text()
        );
    }

    /// Every message was sent at its first attempt: nothing deferred, `n` sent lines, each
    /// with `attempt=1`.
    fn assert_all_first_attempt(&self, n: usize) {
        let ok = wait_until(Duration::from_secs(15), || {
            self.postern.log_text().matches("event=\"sent\"").count() >= n
        });
        let log = self.postern.log_text();
        assert!(ok, "fewer than {n} sent lines; log:\n{log}");
        assert!(
            !log.contains("event=\"deferred\""),
            "a deferral; log:\n{log}"
        );
        let sent: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("event=\"sent\""))
            .collect();
        assert_eq!(sent.len(), n, "log:\n{log}");
        for l in sent {
            assert!(l.contains("attempt=1"), "not the first attempt: {l}");
        }
    }
}

/// Dot-stuff `body` for DATA (the test is the client here).
fn stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 50);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// Send `body` (not ending in CRLF) with `MAIL FROM:<from> params`; the message postern
/// stores is `body` + CRLF.
fn send_with_params(w: &World, from: &str, params: &str, body: &[u8]) {
    let mut c = Raw::connect(w.postern.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO client.test"), "250");
    expect(&c.cmd(&format!("MAIL FROM:<{from}>{params}")), "250");
    expect(&c.cmd("RCPT TO:<boss@fabrikam.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(&stuffed(body));
    c.send(b"\r\n.\r\n");
    expect(&c.reply(), "250");
    let _ = c.cmd("QUIT");
}

#[test]
fn a_hundred_messages_from_one_mailbox_use_at_most_three_connections() {
    // The fake refuses a 4th concurrent connection of a mailbox with 432 4.3.2 (as Exchange).
    let w = world(Script::new(), "");
    let addr = w.postern.addr();
    // Ten devices at once, ten messages each, one message per connection (as printers send).
    let senders: Vec<_> = (0..10)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..10 {
                    let body = format!(
                        "From: {MAILBOX}\r\nTo: boss@fabrikam.com\r\nSubject: page {t}-{i}\r\n\r\nscan\r\n"
                    );
                    let r = send_mail(addr, MAILBOX, &["boss@fabrikam.com"], body.as_bytes());
                    expect(&r, "250");
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    w.wait_delivered(100, Duration::from_secs(120));
    let t = w.exchange.totals();
    assert_eq!(t.messages, 100, "every message was accepted at once: {t:?}");
    assert!(
        t.connections <= 3,
        "{} connections for 100 messages",
        t.connections
    );
    assert_eq!(t.auths, t.connections, "one AUTH per connection: {t:?}");
    assert_eq!(t.auths_ok, t.auths, "{t:?}");
    assert!(
        w.exchange.delivered().iter().all(|m| m.bdat),
        "BDAT, as offered"
    );
    w.assert_all_first_attempt(100);
}

#[test]
fn a_connection_closed_by_the_server_between_messages_is_replaced_without_a_failed_attempt() {
    // The server ends each session, silently, after its second message.
    let mut script = Script::new();
    script.close_after_messages = Some(2);
    let w = world(script, "");
    for i in 0..3 {
        w.send("boss@fabrikam.com", &i.to_string());
        w.wait_delivered(i + 1, Duration::from_secs(30));
    }
    let sessions = w.exchange.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    assert_eq!(
        sessions[0].messages.len(),
        2,
        "the first connection was reused"
    );
    assert_eq!(sessions[1].messages.len(), 1);
    // The third message found the kept connection closed and went over a new one at once.
    w.assert_all_first_attempt(3);
}

#[test]
fn bdat_delivers_the_same_bytes_dot_lines_8bit_and_20_megabytes() {
    let w = world(Script::new(), "");
    let small: &[u8] = b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: dots\r\n\r\n.\r\n.hidden line\r\n..two dots\r\n\xc3\xa9t\xc3\xa9 and a raw \xe9 byte\r\nmiddle . dot\r\n.";
    send_with_params(&w, MAILBOX, " BODY=8BITMIME", small);

    let mut big = b"From: scanner@contoso.com\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while big.len() < 20 * 1024 * 1024 {
        match i % 77 {
            n if n % 11 == 0 => big.extend_from_slice(b".\r\n"),
            n if n % 7 == 0 => big.extend_from_slice(format!(".line {i}\r\n").as_bytes()),
            _ => big.extend_from_slice(
                format!("line {i} \u{e9}ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
                    .as_bytes(),
            ),
        }
        i += 1;
    }
    big.extend_from_slice(b"end");
    send_with_params(&w, MAILBOX, " BODY=8BITMIME", &big);
    w.wait_delivered(2, Duration::from_secs(120));

    let got = w.exchange.delivered();
    for (m, body) in got.iter().zip([small, &big[..]]) {
        assert!(m.bdat, "sent with BDAT");
        assert!(
            m.mail_params.contains(&"BODY=8BITMIME".to_string()),
            "{:?}",
            m.mail_params
        );
        // postern's Received: header, then exactly what the client sent.
        assert!(
            m.data.starts_with(b"Received: "),
            "starts with our trace header"
        );
        let mut want = body.to_vec();
        want.extend_from_slice(b"\r\n");
        assert!(
            m.data.ends_with(&want),
            "the message bytes differ ({} bytes received, {} sent)",
            m.data.len(),
            want.len()
        );
        let header_end = m.data.windows(2).position(|p| p == b"\r\n").unwrap();
        assert!(header_end < 1024);
        assert!(
            m.data.len() - want.len() < 2048,
            "only the Received: header is added"
        );
    }
    // The SIZE declared is the bytes sent.
    for m in &got {
        assert!(
            m.mail_params.contains(&format!("SIZE={}", m.size)),
            "{:?} vs {}",
            m.mail_params,
            m.size
        );
    }
}

#[test]
fn an_idle_connection_is_closed_with_quit_after_the_idle_time() {
    let w = world(Script::new(), "connection_idle_timeout = \"2s\"");
    w.send("boss@fabrikam.com", "one");
    w.wait_delivered(1, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || w.exchange.sessions()[0]
            .closed_at
            .is_some()),
        "the idle connection was never closed"
    );
    let s = &w.exchange.sessions()[0];
    assert_eq!(s.commands.last().map(String::as_str), Some("QUIT"));
    let open_for = s.closed_at.unwrap() - s.messages[0].at;
    // Never before the idle time (an upper bound would depend on the machine's speed).
    assert!(
        open_for >= Duration::from_secs(2),
        "closed {open_for:?} after the message: kept for the next one first"
    );
    assert_eq!(w.exchange.active(MAILBOX), 0);
}

#[test]
fn a_small_message_goes_in_one_flight_and_a_refused_recipient_keeps_the_dialogue_in_step() {
    // MAIL, RCPT and BDAT go out together (one round trip per message on a kept connection).
    // When the RCPT is refused the server still reads the BDAT chunk and refuses it: the
    // next message on the same connection must find the dialogue in step.
    let mut script = Script::new();
    script.rcpt_replies.insert(
        "gone@fabrikam.com".into(),
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient gone@fabrikam.com not found by SMTP address lookup".into(),
    );
    let w = world(script, "");
    w.send("gone@fabrikam.com", "to nobody");
    assert!(
        wait_until(Duration::from_secs(30), || w
            .postern
            .log_text()
            .contains("RecipientNotFound")),
        "the refusal was not logged; log:\n{}",
        w.postern.log_text()
    );
    w.send("boss@fabrikam.com", "to the boss");
    assert!(
        wait_until(Duration::from_secs(30), || w
            .exchange
            .delivered()
            .iter()
            .any(|m| m.rcpt_to == ["boss@fabrikam.com"])),
        "the second message was not delivered; log:\n{}",
        w.postern.log_text()
    );
    let sessions = w.exchange.sessions();
    let s = &sessions[0];
    assert!(
        s.messages
            .iter()
            .any(|m| m.rcpt_to == ["boss@fabrikam.com"]),
        "the second message went over the first connection: {sessions:#?}"
    );
    // Each transaction's MAIL and RCPT came with what followed them in one write.
    let mails: Vec<&String> = s
        .commands
        .iter()
        .filter(|c| c.starts_with("MAIL FROM:"))
        .collect();
    assert!(mails.len() >= 2, "{s:#?}");
    for c in s.commands.iter().filter(|c| {
        c.starts_with("MAIL FROM:")
            || c.starts_with("RCPT TO:<boss")
            || c.starts_with("RCPT TO:<gone")
    }) {
        assert!(s.pipelined.contains(c), "{c} was not pipelined: {s:#?}");
    }
    // After the refused chunk, a RSET settled the transaction before the next MAIL.
    let refused_bdat = s
        .commands
        .iter()
        .position(|c| c.starts_with("BDAT"))
        .unwrap();
    assert_eq!(s.commands[refused_bdat + 1], "RSET", "{:#?}", s.commands);
    assert!(
        !w.exchange
            .delivered()
            .iter()
            .any(|m| m.rcpt_to.iter().any(|r| r == "gone@fabrikam.com")),
        "nothing was delivered to the refused recipient"
    );
}
