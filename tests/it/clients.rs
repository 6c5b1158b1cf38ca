//! Real SMTP clients against the real daemon: lettre (Rust), Python smtplib, swaks, curl.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn lettre_sends_and_file_transport_delivers() {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let p = Postern::start(&basic_config("", ""));
    let addr = p.addr();
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
        .port(addr.port())
        .build();
    let msg = Message::builder()
        .from("Printer <printer@example.com>".parse().unwrap())
        .to("Boss <boss@example.org>".parse().unwrap())
        .subject("Scan 42")
        .body(String::from(
            "Your scan is attached.\n.\nA line with a dot.\n",
        ))
        .unwrap();
    let resp = mailer.send(msg).await.expect("lettre send");
    let text = resp.message().collect::<Vec<_>>().join(" ");
    assert!(text.contains("queued as"), "{text}");
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    assert_eq!(ids.len(), 1);
    let eml = std::fs::read_to_string(p.path("delivered").join(format!("{}.eml", ids[0]))).unwrap();
    assert!(eml.starts_with("Received: from "), "{eml}");
    assert!(eml.contains("Subject: Scan 42"));
    assert!(
        eml.contains("\r\n.\r\nA line with a dot."),
        "dot-stuffing undone: {eml}"
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("delivered").join(format!("{}.json", ids[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["sender"], "printer@example.com");
    assert_eq!(meta["recipients"][0], "boss@example.org");
    assert!(
        p.wait_log("event=\"queued\"", Duration::from_secs(5)),
        "maillog line: {}",
        p.log_text()
    );
}

#[test]
fn python_smtplib_sends() {
    if !require("python3") {
        return;
    }
    let p = Postern::start(&basic_config("", ""));
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "wordpress@example.com"
m["To"] = "a@example.org, b@example.org"
m["Subject"] = "Password reset"
m.set_content("Héllo wörld\n" * 100)
with smtplib.SMTP("{}", {}) as s:
    s.ehlo("wp.test")
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("size")
    refused = s.send_message(m)
    assert refused == {{}}, refused
    code, msg = s.noop()
    assert code == 250
print("ok")
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
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("delivered").join(format!("{}.json", ids[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["recipients"].as_array().unwrap().len(), 2);
}

#[test]
fn swaks_sends_with_pipelining() {
    if !require("swaks") {
        return;
    }
    let p = Postern::start(&basic_config("", ""));
    let out = Command::new("swaks")
        .args([
            "--server",
            &p.addr().ip().to_string(),
            "--port",
            &p.addr().port().to_string(),
        ])
        .args([
            "--from",
            "cron@example.com",
            "--to",
            "ops@example.org",
            "--pipeline",
            "--helo",
            "cron.test",
        ])
        .args(["--header", "Subject: nightly backup", "--body", "backup ok"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("queued as"), "{text}");
    assert_eq!(p.wait_delivered(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn curl_smtp_sends() {
    if !require("curl") {
        return;
    }
    let p = Postern::start(&basic_config("", ""));
    let mail = p.path("mail.txt");
    std::fs::write(
        &mail,
        "From: app@example.com\r\nTo: x@example.org\r\nSubject: curl\r\n\r\nhello from curl\r\n",
    )
    .unwrap();
    curl_send(
        &format!("smtp://{}", p.addr()),
        &[],
        "app@example.com",
        "x@example.org",
        &mail,
    );
    let ids = p.wait_delivered(1, Duration::from_secs(10));
    let eml = std::fs::read_to_string(p.path("delivered").join(format!("{}.eml", ids[0]))).unwrap();
    assert!(eml.contains("hello from curl"));
}
