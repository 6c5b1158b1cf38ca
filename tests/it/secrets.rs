//! No secret ever reaches a log line: passwords given to AUTH, in any test.

use std::time::Duration;

use crate::harness::*;

/// Passwords the suite's tests send (AUTH); none may appear in any daemon log.
const SECRETS: &[&str] = &["s3cret-pw", "tls-pass", "guess0", "guess1"];

#[test]
fn zz_no_secret_in_any_log_of_this_run() {
    // Runs in the same binary as the other tests; it sees the logs of the daemons that ran
    // before it and additionally runs its own AUTH dialogue.
    let hash = crate::protocol::hash("s3cret-pw");
    let cfg = basic_config(
        r#"auth = "optional""#,
        &format!("[user.u]\npassword_hash = \"{hash}\"\nmay_send_as = [\"*\"]\n"),
    );
    let p = Postern::start(&cfg);
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode("\0u\0s3cret-pw");
    expect(&c.cmd(&format!("AUTH PLAIN {b64}")), "235");
    let wrong = base64::engine::general_purpose::STANDARD.encode("\0u\0guess0");
    let mut c2 = Raw::connect(p.addr());
    c2.reply();
    c2.cmd("EHLO t");
    expect(&c2.cmd(&format!("AUTH PLAIN {wrong}")), "535");
    drop(p);
    let logs = ALL_LOGS.lock().unwrap();
    assert!(!logs.is_empty());
    for line in logs.iter() {
        for s in SECRETS.iter().chain([&crate::fake::entra::SECRET]) {
            assert!(!line.contains(s), "secret {s:?} in log line {line}");
        }
        assert!(
            !line.contains(&b64) && !line.contains(&wrong),
            "encoded credentials in log line {line}"
        );
    }
}

/// What admins run and paste into tickets must not carry a secret either: `doctor` (which
/// signs in), `explain`, `token`, `queue show`, `check`, and the daemon's log across a
/// successful delivery, then a token refusal (the client secret "expired": AADSTS7000222),
/// its hold, probes and `explain` of the held message. Checked against every secret and
/// token the fake Entra issued, the client secret itself and the SMTP XOAUTH2 string.
#[test]
fn doctor_explain_token_and_token_failures_show_no_secret() {
    use crate::fake::entra::Scripted;
    let mut w = crate::m365::world("");
    let mut outputs = Vec::new();
    let run = |p: &Postern, outputs: &mut Vec<String>, args: &[&str]| {
        let (_, out, err) = p.cli(args);
        outputs.push(format!("$ postern {}\n{out}{err}", args.join(" ")));
    };
    let r = send_mail(
        w.postern.addr(),
        "scanner@contoso.com",
        &["boss@fabrikam.com"],
        b"Subject: ok\r\n\r\nx\r\n",
    );
    let sent = queued_id(&r);
    w.first_delivered();
    for args in [
        &["doctor"][..],
        &["doctor", "--json"],
        &["token", "contoso", "--mailbox", "scanner@contoso.com"],
        &["check"],
        &["explain", &sent],
    ] {
        run(&w.postern, &mut outputs, args);
    }
    // The secret stops working; a restarted daemon has no token in memory and must ask:
    // refresh failure, hold, probes.
    w.entra.state().broken = Some(Scripted::aadsts(7000222));
    w.postern.signal("TERM");
    assert_eq!(w.postern.wait_exit(Duration::from_secs(30)), Some(0));
    w.postern.spawn();
    let p = &w.postern;
    let r = send_mail(
        p.addr(),
        "printer@contoso.com",
        &["boss@fabrikam.com"],
        b"Subject: held\r\n\r\nx\r\n",
    );
    let held = queued_id(&r);
    assert!(
        crate::m365::wait_until(Duration::from_secs(30), || p
            .path("spool/hold")
            .join(&held)
            .exists()),
        "{}",
        p.log_text()
    );
    for args in [
        &["explain", &held][..],
        &["queue", "show", &held],
        &["queue", "list"],
        &["doctor"],
        &["token", "contoso", "--mailbox", "scanner@contoso.com"],
    ] {
        run(p, &mut outputs, args);
    }
    let mut secrets = w.entra.secrets();
    secrets.push(crate::fake::entra::SECRET.to_string());
    assert!(secrets.len() > 2, "the fake issued tokens: {secrets:?}");
    let log = p.log_text();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for s in &secrets {
        // The XOAUTH2 initial response carries the access token inside a base64 string.
        let xoauth2: Vec<String> = ["scanner@contoso.com", "printer@contoso.com"]
            .iter()
            .map(|m| b64(&format!("user={m}\x01auth=Bearer {s}\x01\x01")))
            .collect();
        for (what, text) in std::iter::once(("daemon log", &log))
            .chain(outputs.iter().map(|o| ("command output", o)))
        {
            assert!(
                !text.contains(s.as_str()) && !xoauth2.iter().any(|x| text.contains(x)),
                "a secret or token of the fake Entra in the {what}:\n{text}"
            );
        }
    }
    assert!(
        outputs.iter().any(|o| o.contains("AADSTS7000222")),
        "the failure is explained: {outputs:?}"
    );
}
