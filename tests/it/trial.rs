//! `postern test`: one test message through the configured path, every step printed with the
//! fake Exchange's replies; the fix from the explanation table on failure.

use crate::fake::exchange::AuthFailure;
use crate::m365::world;

const MAILBOX: &str = "scanner@contoso.com";

fn assert_lines(out: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(
            out.lines().any(|l| l.starts_with(w)),
            "no line starting with {w:?} in:\n{out}"
        );
    }
}

#[test]
fn postern_test_prints_every_step_and_exits_0_when_exchange_accepts() {
    let w = world("");
    let (code, out, err) = w
        .postern
        .cli(&["test", "--from", MAILBOX, "--to", "boss@fabrikam.com"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_lines(
        &out,
        &[
            "✓ route: m365 (smtp, account contoso), sending as scanner@contoso.com",
            "✓ token: for scanner@contoso.com",
            "✓ connect: localhost:",
            "✓ greeting: 220 ",
            "✓ EHLO ",
            "✓ STARTTLS: 220 2.0.0 SMTP server ready",
            "✓ TLS: TLS 1.3, server certificate CN=rcgen self signed cert",
            "✓ AUTH XOAUTH2 [redacted]: 235 2.7.0 Authentication successful",
            "✓ MAIL FROM:<scanner@contoso.com> SIZE=",
            "✓ RCPT TO:<boss@fabrikam.com>: 250 2.1.5",
            "result: accepted by the upstream",
        ],
    );
    // The message itself went as DATA (354, then the reply after it) or, when the server
    // offers CHUNKING and the transport uses it, as BDAT; either way Exchange's queued reply.
    let accepted = out.lines().any(|l| {
        (l.starts_with("✓ message: ") || l.starts_with("✓ BDAT ")) && l.contains(": 250 2.6.0")
    });
    assert!(accepted, "the reply after the message: {out}");
    assert!(!out.contains("✗"), "{out}");
    let token_line = out.lines().find(|l| l.starts_with("✓ token")).unwrap();
    assert!(
        token_line.contains("audience https://outlook.office365.com")
            && token_line.contains("roles SMTP.SendAsApp")
            && token_line.contains("expires "),
        "{token_line}"
    );
    // It really went: the fake Exchange has it.
    let m = w.first_delivered();
    assert_eq!(m.mail_from, MAILBOX);
    assert_eq!(m.rcpt_to, vec!["boss@fabrikam.com"]);
    assert!(String::from_utf8_lossy(&m.data).contains("Subject: postern test message"));
    // The token never appears.
    for s in w.entra.secrets() {
        assert!(
            !out.contains(&s) && !err.contains(&s),
            "a secret in the output"
        );
    }
}

#[test]
fn postern_test_exits_non_zero_with_the_fix_on_5_7_139() {
    let w = world("");
    w.exchange.update(|s| {
        s.auth_failures
            .insert(MAILBOX.into(), AuthFailure::MailboxDisabled);
    });
    let (code, out, err) = w
        .postern
        .cli(&["test", "--from", MAILBOX, "--to", "boss@fabrikam.com"]);
    assert_ne!(code, 0, "{out}{err}");
    assert_lines(
        &out,
        &[
            "✓ STARTTLS: 220",
            "✗ AUTH XOAUTH2 [redacted]: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
            "  cause: SMTP AUTH is turned off for this mailbox (535 5.7.139)",
            "  fix: ",
            "result: failed",
        ],
    );
    let fix = out.lines().find(|l| l.starts_with("  fix: ")).unwrap();
    assert!(
        fix.contains(
            "Set-CASMailbox -Identity scanner@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{fix}"
    );
    assert!(!out.contains("MAIL FROM"), "{out}");
    assert!(w.exchange.messages().is_empty());
}

#[test]
fn postern_test_dry_run_signs_in_and_sends_no_mail() {
    let w = world("");
    let (code, out, err) = w.postern.cli(&[
        "test",
        "--from",
        MAILBOX,
        "--to",
        "boss@fabrikam.com",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_lines(
        &out,
        &[
            "✓ token: ",
            "✓ AUTH XOAUTH2 [redacted]: 235",
            "result: signed in; dry run: stopped before MAIL FROM",
        ],
    );
    assert!(!out.contains("MAIL FROM:<"), "{out}");
    let sessions = w.exchange.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(
        sessions[0]
            .commands
            .iter()
            .all(|c| !c.to_ascii_uppercase().starts_with("MAIL")),
        "{:?}",
        sessions[0].commands
    );
    assert!(w.exchange.messages().is_empty());
}

#[test]
fn postern_test_refuses_a_sender_no_route_takes_and_an_unknown_route() {
    let w = world("");
    let (code, out, _) = w.postern.cli(&[
        "test",
        "--from",
        "someone@elsewhere.example",
        "--to",
        "boss@fabrikam.com",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✗ route: no route in"), "{out}");
    let (code, out, _) = w.postern.cli(&[
        "test", "--from", MAILBOX, "--to", "b@f.test", "--route", "nope",
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("there is no [route.nope]"), "{out}");
    assert!(out.contains("m365"), "the routes are listed: {out}");
}
