//! What clients send, through the real binary: addresses keep their meaning all the way to
//! Exchange and never become parameters, refusals say why without revealing the
//! configuration, many recipients are not an error, and client text never reaches a terminal
//! or a log raw.

use std::process::Command;
use std::time::Duration;

use postern::escape::needs_escape;

use crate::harness::*;
use crate::m365::world;

/// Characters that must never be printed raw (a line break ends a line, so it may stay).
fn raw_controls(text: &str) -> String {
    text.chars()
        .filter(|&c| needs_escape(c) && c != '\n')
        .collect()
}

#[test]
fn quoted_addresses_reach_exchange_quoted_and_intact_never_as_parameters() {
    let w = world("mailbox = \"scanner@contoso.com\"");
    let mut c = Raw::connect(w.postern.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO printer.test"), "250");
    // Issue 7 item 2: these went out as `MAIL FROM:<x> RET=HDRS ENVID=evil@contoso.com>`.
    expect(
        &c.cmd(r#"MAIL FROM:<"x> RET=HDRS ENVID=evil"@contoso.com>"#),
        "250 2.1.0",
    );
    expect(
        &c.cmd(r#"RCPT TO:<"y> NOTIFY=NEVER ORCPT=rfc822;boss@fabrikam.com"@fabrikam.com>"#),
        "250 2.1.5",
    );
    expect(&c.cmd(r#"RCPT TO:<"a b"@fabrikam.com>"#), "250 2.1.5");
    // Issue 8 item 7: RFC 5321 §4.5.1; it goes to the route's mailbox.
    expect(&c.cmd("RCPT TO:<postmaster>"), "250 2.1.5");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: scanner@contoso.com\r\nSubject: quoted\r\n\r\nhello\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0");
    c.cmd("QUIT");

    let m = &w.first_delivered();
    assert_eq!(m.mailbox, "scanner@contoso.com", "XOAUTH2 user=");
    assert_eq!(m.mail_from, r#""x> RET=HDRS ENVID=evil"@contoso.com"#);
    assert!(
        m.mail_params.iter().all(|p| p.starts_with("SIZE=")),
        "no parameter but SIZE: {:?}",
        m.mail_params
    );
    assert_eq!(
        m.rcpt_to,
        vec![
            r#""y> NOTIFY=NEVER ORCPT=rfc822;boss@fabrikam.com"@fabrikam.com"#,
            r#""a b"@fabrikam.com"#,
            "scanner@contoso.com",
        ]
    );
    // Byte for byte, as Exchange read the lines.
    let commands: Vec<String> = w
        .exchange
        .sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .collect();
    let mail = commands
        .iter()
        .find(|l| l.starts_with("MAIL FROM:"))
        .expect("a MAIL command");
    assert!(
        mail.starts_with(r#"MAIL FROM:<"x> RET=HDRS ENVID=evil"@contoso.com> SIZE="#),
        "{mail}"
    );
    assert!(commands.contains(&r#"RCPT TO:<"a b"@fabrikam.com>"#.to_string()));
}

#[test]
fn a_version_1_spool_from_before_the_address_type_is_delivered_quoted() {
    let mut w = world("mailbox = \"scanner@contoso.com\"");
    // Stopped hard: the spool's recovery at the next start picks the file up either way.
    w.postern.kill9();
    // A queue file as postern wrote it before: the local parts of `"a b"@contoso.com` and
    // `"x> NOTIFY=NEVER"@fabrikam.com` without their quotes.
    let id = "0000000000001ABC";
    let body = b"From: scanner@contoso.com\r\nSubject: old spool\r\n\r\nhello\r\n";
    let envelope = format!(
        r#"{{"version":1,"id":"{id}","received_at":1700000000,"sender":"a b@contoso.com","recipients":[{{"address":"x> NOTIFY=NEVER@fabrikam.com","status":"pending"}},{{"address":"boss@fabrikam.com","status":"pending"}}],"client_addr":"127.0.0.1:4000","client_helo":"printer","listener":"local","route":"m365","mailbox":"scanner@contoso.com","size":{},"body_8bit":false,"smtputf8":false,"attempts":0}}"#,
        body.len()
    );
    let mut file = body.to_vec();
    file.extend_from_slice(envelope.as_bytes());
    file.extend_from_slice(format!("\n{:010}POSTERN1\n", envelope.len()).as_bytes());
    std::fs::write(w.postern.path("spool/incoming").join(id), file).unwrap();
    w.postern.spawn();

    let m = &w.first_delivered();
    assert_eq!(m.mail_from, r#""a b"@contoso.com"#);
    assert_eq!(
        m.rcpt_to,
        vec![r#""x> NOTIFY=NEVER"@fabrikam.com"#, "boss@fabrikam.com"]
    );
    assert!(m.mail_params.iter().all(|p| p.starts_with("SIZE=")));
}

#[test]
fn smtplib_with_250_recipients_delivers_to_all_of_them() {
    if !require("python3") {
        return;
    }
    // Defaults: max_recipients 100, max_errors 10 (issue 7 item 5).
    let p = Postern::start(&basic_config("", ""));
    let script = format!(
        r#"
import smtplib
rcpts = ["user%03d@example.org" % i for i in range(250)]
msg = "From: app@example.com\r\nSubject: newsletter\r\n\r\nhello\r\n"
transactions = 0
with smtplib.SMTP("{}", {}) as s:
    todo = rcpts
    while todo:
        refused = s.sendmail("app@example.com", todo, msg)
        transactions += 1
        assert all(code == 452 for code, _ in refused.values()), refused
        todo = [r for r in todo if r in refused]
        assert transactions <= 3, transactions
print(transactions)
"#,
        p.addr().ip(),
        p.addr().port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    let ids = p.wait_delivered(3, Duration::from_secs(15));
    assert_eq!(ids.len(), 3);
    let mut all: Vec<String> = Vec::new();
    for id in &ids {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(p.path("delivered").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        let rcpts = meta["recipients"].as_array().unwrap();
        assert!(rcpts.len() <= 100);
        all.extend(rcpts.iter().map(|r| r.as_str().unwrap().to_string()));
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 250, "every recipient got the mail exactly once");
}

/// Routes that accept `*@example.com` only, as `relay@example.com`.
fn office_config() -> String {
    r#"hostname = "relay.test"
spool_dir = "spool"
state_dir = "state"

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]

[route.office]
senders = ["*@example.com"]
mailbox = "relay@example.com"
transport = "file"
dir = "delivered"

[route.lab]
senders = ["*@lab.internal.example"]
transport = "file"
dir = "delivered"
"#
    .into()
}

#[test]
fn refusals_say_why_but_not_the_configuration_and_postmaster_is_accepted() {
    let p = Postern::start(&office_config());
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO printer.test"), "250");
    // Issue 10 item 6: the reply names neither the file nor the other routes.
    let r = c.cmd("MAIL FROM:<x@elsewhere.test>");
    assert_eq!(
        r,
        "550 5.7.1 Sender <x@elsewhere.test> rejected: this relay does not send mail from that address"
    );
    expect(&c.cmd("MAIL FROM:<scanner@example.com>"), "250");
    // Issue 10 item 6: an empty domain is refused.
    assert_eq!(
        c.cmd("RCPT TO:<bob@>"),
        "501 5.1.3 Bad recipient address syntax: the domain after \"@\" is empty"
    );
    expect(&c.cmd("RCPT TO:<Postmaster>"), "250 2.1.5");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: to the postmaster\r\n\r\nhello\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0");
    c.cmd("QUIT");

    let ids = p.wait_delivered(1, Duration::from_secs(10));
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("delivered").join(format!("{}.json", ids[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["recipients"],
        serde_json::json!(["relay@example.com"]),
        "<postmaster> goes to the mailbox the route sends as"
    );
    // The log names the rule and the address the client sent.
    let config = p.config_path.display().to_string();
    assert!(
        p.wait_log(
            &format!("no route in {config} accepts it"),
            Duration::from_secs(5)
        ),
        "{}",
        p.log_text()
    );
    let log = p.log_text();
    assert!(log.contains("*@lab.internal.example"), "{log}");
    assert!(log.contains("recipient as sent: <bob@>"), "{log}");
}

/// A message that stays queued (its route's directory cannot be created) from a client whose
/// HELO and addresses carry terminal escapes and bidi controls; returns its queue id.
fn queue_hostile_message(p: &Postern) -> String {
    std::fs::write(p.path("blocked"), b"a file where a directory should be").unwrap();
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    // OSC title change, C1 CSI (U+009B), right-to-left override, an isolate.
    c.send("EHLO host\u{1b}]0;pwned\u{7}\u{9b}2J\u{202e}txt.exe\u{2066}\r\n".as_bytes());
    expect(&c.reply(), "250");
    // Refused (a C1 control), but what it said goes to the log.
    expect(&c.cmd("MAIL FROM:<\"\u{9b}31m\"@example.com>"), "553 5.1.7");
    expect(
        &c.cmd("MAIL FROM:<\"\u{202e}moc.elgoog\"@example.com> SMTPUTF8"),
        "250",
    );
    expect(&c.cmd("RCPT TO:<j\u{f6}rg\u{2066}@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n");
    let r = c.reply();
    expect(&r, "250 2.0.0");
    c.cmd("QUIT");
    assert!(
        p.wait_log("deferred", Duration::from_secs(10)),
        "{}",
        p.log_text()
    );
    queued_id(&r)
}

#[test]
fn queue_commands_print_client_text_escaped() {
    let p = Postern::start(
        &basic_config("", "").replace("dir = \"delivered\"", "dir = \"blocked/sub\""),
    );
    let id = queue_hostile_message(&p);

    let (code, list, _) = p.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert_eq!(raw_controls(&list), "", "{list}");
    assert!(list.contains("\\u{202e}moc.elgoog"), "{list}");

    let (code, show, _) = p.cli(&["queue", "show", &id]);
    assert_eq!(code, 0);
    assert_eq!(raw_controls(&show), "", "{show}");
    assert!(
        show.contains("helo host\\u{1b}]0;pwned\\u{7}\\u{9b}2J\\u{202e}txt.exe\\u{2066}"),
        "{show}"
    );

    let (code, json, _) = p.cli(&["queue", "list", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(raw_controls(&json), "", "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(
        v[0]["sender"], "\u{202e}moc.elgoog@example.com",
        "the same string to a JSON reader (bidi characters are atext: no quotes needed)"
    );
    assert_eq!(v[0]["recipients"][0], "j\u{f6}rg\u{2066}@example.org");
}

#[test]
fn logs_carry_client_text_escaped_in_both_formats() {
    let config = basic_config("", "").replace("dir = \"delivered\"", "dir = \"blocked/sub\"");
    // Human lines (stderr is not a terminal: no colours).
    let p = Postern::start(&config);
    queue_hostile_message(&p);
    let log = p.log_text();
    assert!(log.contains("sender as sent"), "{log}");
    assert_eq!(raw_controls(&log), "", "{log}");

    // JSON lines: serde_json leaves C1 and bidi characters raw; they must be escaped, and
    // every line must still be JSON with the same strings.
    let p = Postern::start_with(&config, &["--log-format", "json"]);
    queue_hostile_message(&p);
    let log = p.log_text();
    assert_eq!(raw_controls(&log), "", "{log}");
    let rejected = log
        .lines()
        .find(|l| l.contains("sender as sent"))
        .unwrap_or_else(|| panic!("no rejected line: {log}"));
    assert!(rejected.contains("\\u009b"), "{rejected}");
    let v: serde_json::Value = serde_json::from_str(rejected).expect("a JSON line");
    assert_eq!(v["detail"], "sender as sent: <\"\u{9b}31m\"@example.com>");
}
