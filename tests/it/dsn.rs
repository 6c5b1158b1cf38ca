//! Delivery status notifications Exchange accepts: sent from the route's mailbox with
//! `Auto-Submitted: auto-replied` as RFC 3464 `multipart/report` (parsed here with Python's
//! `email` package, a real MIME parser); never for automatic mail or the null sender; a
//! report that cannot be delivered is kept in `failed/` and logged.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fake::exchange::replies::RECIPIENT_NOT_FOUND;
use crate::harness::*;
use crate::m365::{CLIENT_SECRET_AUTH, wait_until, world, world_routes};

const MAILBOX: &str = "scanner@contoso.com";

/// What Python's `email` parser sees in `data`: one `key=value` line per fact.
fn parse_with_python(data: &[u8]) -> String {
    let script = r#"
import sys, email, email.policy
m = email.message_from_bytes(sys.stdin.buffer.read(), policy=email.policy.default)
print("content_type=" + m.get_content_type())
print("report_type=" + str(m.get_param("report-type")))
print("auto_submitted=" + str(m["Auto-Submitted"]))
print("from=" + str(m["From"].addresses[0].addr_spec))
print("defects=" + str(len(m.defects)))
for p in m.iter_parts():
    print("part=" + p.get_content_type())
    if p.get_content_type() == "message/delivery-status":
        blocks = p.get_payload()
        print("per_message_mta=" + str(blocks[0]["Reporting-MTA"]))
        for r in blocks[1:]:
            print("recipient=%s|%s|%s|%s" % (r["Final-Recipient"], r["Action"], r["Status"], str(r["Diagnostic-Code"]).split(";")[0]))
    if p.get_content_type() == "text/rfc822-headers":
        print("original_subject=" + ("Scan 7" if "Subject: Scan 7" in p.get_content() else "missing"))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_report_goes_out_from_the_mailbox_and_parses_as_multipart_report() {
    if !require("python3") {
        return;
    }
    let w = world("");
    w.exchange.update(|s| {
        s.rcpt_replies
            .insert("nobody@fabrikam.com".into(), RECIPIENT_NOT_FOUND.into());
    });
    expect(
        &send_mail(
            w.postern.addr(),
            MAILBOX,
            &["boss@fabrikam.com", "nobody@fabrikam.com"],
            b"From: scanner@contoso.com\r\nSubject: Scan 7\r\n\r\nx\r\n",
        ),
        "250",
    );
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    let report = &w.exchange.delivered()[1];
    assert_eq!(report.mail_from, MAILBOX, "from the mailbox, not <>");
    assert_eq!(report.mailbox, MAILBOX);
    assert_eq!(report.rcpt_to, vec![MAILBOX]);
    assert!(report.accepted(), "{}", report.reply);
    let parsed = parse_with_python(&report.data);
    for want in [
        "content_type=multipart/report",
        "report_type=delivery-status",
        "auto_submitted=auto-replied",
        "from=scanner@contoso.com",
        "defects=0",
        "part=text/plain",
        "part=message/delivery-status",
        "part=text/rfc822-headers",
        "per_message_mta=dns; relay.test",
        "recipient=rfc822; nobody@fabrikam.com|failed|5.1.10|smtp",
        "original_subject=Scan 7",
    ] {
        assert!(
            parsed.lines().any(|l| l == want),
            "{want} not in:\n{parsed}"
        );
    }
    assert!(
        !parsed.contains("boss@fabrikam.com"),
        "delivered recipients are not reported:\n{parsed}"
    );
}

#[test]
fn automatic_mail_and_the_null_sender_get_no_report_and_are_kept_in_failed() {
    let route = format!(
        "[route.all]\nsenders = [\"*\"]\nmailbox = \"{MAILBOX}\"\ntransport = \"smtp\"\naccount = \"contoso\"\n"
    );
    let w = world_routes(CLIENT_SECRET_AUTH, &route);
    w.exchange.update(|s| {
        s.rcpt_replies
            .insert("nobody@fabrikam.com".into(), RECIPIENT_NOT_FOUND.into());
    });
    let auto = queued_id(&send_mail(
        w.postern.addr(),
        MAILBOX,
        &["nobody@fabrikam.com"],
        b"From: scanner@contoso.com\r\nAuto-Submitted: auto-generated\r\nSubject: out of office\r\n\r\nx\r\n",
    ));
    let null = queued_id(&send_mail(
        w.postern.addr(),
        "",
        &["nobody@fabrikam.com"],
        b"From: scanner@contoso.com\r\nSubject: a device's own report\r\n\r\nx\r\n",
    ));
    for id in [&auto, &null] {
        assert!(
            wait_until(Duration::from_secs(20), || w
                .postern
                .path("spool/failed")
                .join(id)
                .exists()),
            "{id} not in failed/; log:\n{}",
            w.postern.log_text()
        );
    }
    // One `unreported` line each, written just after its message reached failed/.
    for why in ["Auto-Submitted: auto-generated", "null sender"] {
        assert!(
            w.postern.wait_log(why, Duration::from_secs(10)),
            "no unreported line naming {why:?}:\n{}",
            w.postern.log_text()
        );
    }
    let log = w.postern.log_text();
    assert_eq!(log.matches("event=\"unreported\"").count(), 2, "{log}");
    assert!(!log.contains("event=\"bounced\""), "{log}");
    // Nothing but the two originals ever reached Exchange's DATA (both were refused at RCPT,
    // so not even those): no report went out.
    assert!(
        w.exchange.messages().is_empty(),
        "{:?}",
        w.exchange.messages()
    );
    let (code, out, _) = w.postern.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&auto) && out.contains(&null), "{out}");
}

#[test]
fn an_undeliverable_report_is_kept_in_failed_and_logged() {
    let w = world("");
    // The sender's own address is gone too: the report about its message cannot be delivered.
    w.exchange.update(|s| {
        s.rcpt_replies
            .insert("nobody@fabrikam.com".into(), RECIPIENT_NOT_FOUND.into());
        s.rcpt_replies
            .insert("gone@contoso.com".into(), RECIPIENT_NOT_FOUND.into());
    });
    let original = queued_id(&send_mail(
        w.postern.addr(),
        "gone@contoso.com",
        &["nobody@fabrikam.com"],
        b"From: gone@contoso.com\r\nSubject: x\r\n\r\nx\r\n",
    ));
    assert!(
        w.postern
            .wait_log("event=\"report_undeliverable\"", Duration::from_secs(20)),
        "log:\n{}",
        w.postern.log_text()
    );
    let log = w.postern.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("event=\"report_undeliverable\""))
        .unwrap();
    assert!(line.contains("5.1.10"), "the reason is logged: {line}");
    assert!(line.contains("gone@contoso.com"), "{line}");
    assert!(line.contains("kept in failed/"), "{line}");
    // The report is in failed/ (the original, whose sender was told nothing, is gone: its
    // report carries the news), and no report about the report was made.
    let failed: Vec<String> = std::fs::read_dir(w.postern.path("spool/failed"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_ne!(failed[0], original);
    assert_eq!(log.matches("event=\"bounced\"").count(), 1, "{log}");
    let env = queue_envelope(&w.postern.path("spool/failed").join(&failed[0])).unwrap();
    assert_eq!(env["sender"], "gone@contoso.com", "from the mailbox");
    assert_eq!(env["recipients"][0]["address"], "gone@contoso.com");
    assert_eq!(env["recipients"][0]["status"], "failed");
}
