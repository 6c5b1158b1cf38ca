//! STARTTLS and implicit TLS with real clients, and garbage where a handshake should be.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

fn write_cert(dir: &std::path::Path) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "relay.test".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
}

fn tls_postern(mode: &str) -> Postern {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    let cfg = basic_config(
        &format!(
            "tls = \"{mode}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nauth = \"optional\"",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        ),
        &format!(
            "[user.printer]\npassword_hash = \"{}\"\nmay_send_as = [\"*@example.com\"]\n",
            crate::protocol::hash("tls-pass")
        ),
    );
    let p = Postern::start(&cfg);
    // keep the cert dir alive as long as the daemon
    std::mem::forget(dir);
    p
}

#[test]
fn starttls_with_python_swaks_and_curl() {
    let p = tls_postern("starttls");
    let (host, port) = (p.addr().ip().to_string(), p.addr().port().to_string());
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("{host}", {port}) as s:
    s.ehlo()
    assert s.has_extn("starttls")
    s.starttls(context=ctx)
    s.ehlo()
    assert not s.has_extn("starttls")
    s.login("printer", "tls-pass")
    s.sendmail("printer@example.com", ["a@example.org"], "Subject: py tls\r\n\r\nhi\r\n")
print("ok")
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    if have("swaks") {
        let out = Command::new("swaks")
            .args([
                "--server",
                &host,
                "--port",
                &port,
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "printer",
                "--auth-password",
                "tls-pass",
            ])
            .args(["--from", "printer@example.com", "--to", "b@example.org"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("queued as"),
            "swaks: {text}"
        );
    } else {
        assert!(std::env::var_os("CI").is_none(), "swaks required in CI");
    }

    let mail = p.path("m.txt");
    std::fs::write(&mail, "Subject: curl tls\r\n\r\nhi\r\n").unwrap();
    curl_send(
        &format!("smtp://{}", p.addr()),
        &["-k", "--ssl-reqd", "--user", "printer:tls-pass"],
        "printer@example.com",
        "c@example.org",
        &mail,
    );
    let expected = if std::env::var_os("CI").is_some() || have("swaks") {
        3
    } else {
        2
    };
    assert_eq!(
        p.wait_delivered(expected, Duration::from_secs(10)).len(),
        expected
    );
    let log = p.log_text();
    assert!(!log.contains("tls-pass"), "password in the log");
}

#[test]
fn implicit_tls_with_python_and_curl() {
    let p = tls_postern("implicit");
    let (host, port) = (p.addr().ip().to_string(), p.addr().port().to_string());
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP_SSL("{host}", {port}, context=ctx) as s:
    s.ehlo()
    assert not s.has_extn("starttls")
    s.login("printer", "tls-pass")
    s.sendmail("printer@example.com", ["a@example.org"], "Subject: implicit\r\n\r\nhi\r\n")
    assert s.sock.version() in ("TLSv1.2", "TLSv1.3"), s.sock.version()
print("ok")
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mail = p.path("m.txt");
    std::fs::write(&mail, "Subject: curl smtps\r\n\r\nhi\r\n").unwrap();
    curl_send(
        &format!("smtps://{}", p.addr()),
        &["-k", "--user", "printer:tls-pass"],
        "printer@example.com",
        "c@example.org",
        &mail,
    );
    assert_eq!(p.wait_delivered(2, Duration::from_secs(10)).len(), 2);
}

#[test]
fn old_tls_versions_are_refused() {
    let p = tls_postern("implicit");
    let script = format!(
        r#"
import socket, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1; ctx.maximum_version = ssl.TLSVersion.TLSv1_1
try:
    ctx.set_ciphers("ALL:@SECLEVEL=0")
except Exception:
    pass
s = socket.create_connection(("{}", {}))
try:
    ctx.wrap_socket(s)
    print("handshake succeeded")
except (ssl.SSLError, OSError) as e:
    print("refused", e)
"#,
        p.addr().ip(),
        p.addr().port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("refused"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn garbage_instead_of_a_handshake_closes_cleanly() {
    let p = tls_postern("starttls");
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    // STARTTLS with a pipelined command behind it: the command must be dropped, and the
    // "handshake" is garbage.
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n");
    expect(&c.reply(), "220 2.0.0");
    c.send(&[
        0x16, 0x03, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0xff, 0x00, 0x13,
    ]);
    let mut buf = [0u8; 256];
    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.s.read(&mut buf).unwrap_or(0);
    // Either closed, or a TLS alert; never an SMTP reply to the injected command.
    assert!(n == 0 || buf[0] == 0x15, "got {:?}", &buf[..n]);
    // Implicit-TLS style garbage on a fresh connection, then the daemon still serves.
    let mut s = std::net::TcpStream::connect(p.addr()).unwrap();
    let _ = s.write_all(&[0u8; 4096]);
    drop(s);
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("NOOP"), "250");
}
