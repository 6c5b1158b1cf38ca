//! `rewrite_from`: a device whose sender and `From:` Microsoft 365 will never accept
//! (`scanner@localhost`) sends through a route that rewrites them to its mailbox, against the
//! fake Exchange (which refuses a `From:` the mailbox may not send as, after DATA).

use std::time::Duration;

use crate::harness::*;
use crate::m365::{CLIENT_SECRET_AUTH, wait_until, world_routes};

const MAILBOX: &str = "scanner@contoso.com";

fn devices_route(extra: &str) -> String {
    format!(
        "[route.devices]\nsenders = [\"*\"]\nmailbox = \"{MAILBOX}\"\n{extra}\ntransport = \"smtp\"\naccount = \"contoso\"\n"
    )
}

/// The value of header field `name` in a message's header section (first occurrence).
fn header(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[test]
fn rewrite_from_sends_as_the_mailbox_and_keeps_the_device_in_reply_to() {
    let w = world_routes(CLIENT_SECRET_AUTH, &devices_route("rewrite_from = true"));
    let body = b"From: \"Scanner 3rd floor\" <scanner@localhost>\r\nTo: boss@fabrikam.com\r\nSubject: Scan 1\r\n\r\n..leading dot\r\nbody \xc3\xa9\r\n";
    let id = queued_id(&send_mail(
        w.postern.addr(),
        "scanner@localhost",
        &["boss@fabrikam.com"],
        body,
    ));
    // A second message without a display name, and with its own Reply-To.
    send_mail(
        w.postern.addr(),
        "SN-4711@printer",
        &["boss@fabrikam.com"],
        b"From: SN-4711@printer\r\nReply-To: facilities@contoso.com\r\nSubject: Scan 2\r\n\r\nx\r\n",
    );
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    let mut msgs = w.exchange.delivered();
    msgs.sort_by_key(|m| header(&m.data, "Subject"));
    let (first, second) = (&msgs[0], &msgs[1]);
    assert_eq!(first.mail_from, MAILBOX, "envelope sender rewritten");
    assert_eq!(first.mailbox, MAILBOX);
    assert_eq!(
        header(&first.data, "From").as_deref(),
        Some("\"Scanner 3rd floor\" <scanner@contoso.com>"),
        "display name kept"
    );
    assert_eq!(
        header(&first.data, "Reply-To").as_deref(),
        Some("\"Scanner 3rd floor\" <scanner@localhost>")
    );
    // Everything else arrives byte for byte: the body (a dot line, stuffed by the client as
    // SMTP requires; 8-bit) and the size announced at MAIL FROM.
    assert!(
        first
            .data
            .ends_with(b"\r\n\r\n.leading dot\r\nbody \xc3\xa9\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&first.data)
    );
    let size = format!("SIZE={}", first.data.len());
    assert!(
        first.mail_params.contains(&size),
        "{:?} vs {size}",
        first.mail_params
    );
    assert_eq!(second.mail_from, MAILBOX);
    assert_eq!(header(&second.data, "From").as_deref(), Some(MAILBOX));
    assert_eq!(
        header(&second.data, "Reply-To").as_deref(),
        Some("facilities@contoso.com"),
        "an existing Reply-To stays"
    );
    // One log line per message says so.
    assert!(
        w.postern
            .wait_log("event=\"rewritten\"", Duration::from_secs(5))
    );
    let log = w.postern.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"rewritten\""))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    let mine = lines.iter().find(|l| l.contains(&id)).expect("line for it");
    assert!(
        mine.contains("from=\"scanner@localhost\"") || mine.contains("from=scanner@localhost"),
        "{mine}"
    );
    assert!(mine.contains("Reply-To"), "{mine}");
    // Nothing was refused by Exchange on the way.
    assert!(w.exchange.messages().iter().all(|m| m.accepted()));
}

#[test]
fn without_rewrite_from_an_address_microsoft_never_sends_as_is_refused_when_sent() {
    let w = world_routes(CLIENT_SECRET_AUTH, &devices_route(""));
    // The envelope sender: refused at MAIL FROM.
    let mut c = Raw::connect(w.postern.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO printer"), "250");
    let r = c.cmd("MAIL FROM:<scanner@localhost>");
    assert!(
        r.starts_with("550 5.7.1 Sender <scanner@localhost> rejected: Microsoft 365 cannot send mail as this address"),
        "{r}"
    );
    // A good envelope sender, but the From: is the device's: refused at the end of DATA.
    expect(&c.cmd("MAIL FROM:<scanner@contoso.com>"), "250");
    expect(&c.cmd("RCPT TO:<boss@fabrikam.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: Printer <printer@SN-4711>\r\nSubject: x\r\n\r\nFrom: not@this.one\r\n.\r\n");
    let r = c.reply();
    assert!(
        r.starts_with("550 5.7.1 Message rejected: its From: <printer@sn-4711> is not an address Microsoft 365 can send as"),
        "{r}"
    );
    // The session goes on; a message Exchange can take is accepted.
    expect(&c.cmd("MAIL FROM:<scanner@contoso.com>"), "250");
    expect(&c.cmd("RCPT TO:<boss@fabrikam.com>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: scanner@contoso.com\r\nSubject: ok\r\n\r\nx\r\n.\r\n");
    expect(&c.reply(), "250");
    let _ = c.cmd("QUIT");
    let m = w.first_delivered();
    assert_eq!(header(&m.data, "Subject").as_deref(), Some("ok"));
    assert_eq!(
        w.exchange.messages().len(),
        1,
        "nothing refused reached Exchange"
    );
    // The log says what to change.
    let log = w.postern.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("event=\"rejected\"") && l.contains("rewrite_from = true in [route.devices]")
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{log}");
    // `postern test` says the same before trying anything.
    let (code, out, _) = w.postern.cli(&[
        "test",
        "--from",
        "scanner@localhost",
        "--to",
        "boss@fabrikam.com",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✗ sender: the daemon refuses <scanner@localhost> at MAIL FROM")
            && out.contains("rewrite_from = true in [route.devices]"),
        "{out}"
    );
}
