//! End to end through the real binary: a device sends plain SMTP to postern, which gets a
//! token from the fake Entra and delivers over STARTTLS + AUTH XOAUTH2 to the fake Exchange.

use std::time::{Duration, Instant};

use crate::fake::entra::{CLIENT_ID, FakeEntra, SECRET, Scripted, TENANT};
use crate::fake::exchange::{FakeExchange, Script};
use crate::harness::*;

const MAILBOX: &str = "scanner@contoso.com";

pub(crate) struct World {
    pub(crate) entra: FakeEntra,
    pub(crate) exchange: FakeExchange,
    pub(crate) postern: Postern,
    _secret_dir: tempfile::TempDir,
}

impl World {
    /// The first message the fake Exchange accepted, waiting up to 15 s for it.
    pub(crate) fn first_delivered(&self) -> crate::fake::exchange::Message {
        assert!(
            wait_until(Duration::from_secs(15), || !self
                .exchange
                .delivered()
                .is_empty()),
            "nothing delivered; log:\n{}",
            self.postern.log_text()
        );
        self.exchange.delivered().swap_remove(0)
    }
}

/// A fake Entra and Exchange and a postern whose route `m365` (`*@contoso.com`) has
/// `mailbox_line`.
pub(crate) fn world(mailbox_line: &str) -> World {
    world_with(
        mailbox_line,
        "auth = \"client_secret\"\nclient_secret_file = \"SECRET_FILE\"",
    )
}

/// A world whose account signs in with `auth_lines` (`SECRET_FILE` is replaced by the path of
/// a file holding the fake's client secret).
fn world_with(mailbox_line: &str, auth_lines: &str) -> World {
    let entra = FakeEntra::start();
    let exchange = Script::new()
        .accept_tokens(entra.smtp_token_check())
        .start();
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

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]

[account.contoso]
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
{auth}
authority = "{authority}"
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{ca}"

[route.m365]
senders = ["*@contoso.com"]
{mailbox_line}
transport = "smtp"
account = "contoso"
"#,
        auth = auth_lines.replace("SECRET_FILE", &secret.display().to_string()),
        authority = entra.base,
        port = exchange.addr().port(),
        ca = exchange.ca_pem().display(),
    );
    let postern = Postern::start(&cfg);
    World {
        entra,
        exchange,
        postern,
        _secret_dir: secret_dir,
    }
}

pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

fn assert_no_secret_in_logs(w: &World) {
    let logs = w.postern.log_text();
    for s in w.entra.secrets() {
        assert!(
            !logs.contains(&s),
            "a secret or token from the fake Entra is in the daemon's log"
        );
    }
}

#[test]
fn printer_mail_goes_out_over_xoauth2_with_an_app_only_token() {
    let w = world("");
    let body = b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: Scan\r\n\r\n..leading dot\r\nscan attached";
    let r = send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com", "ops@fabrikam.com"],
        body,
    );
    expect(&r, "250 2.0.0");
    assert!(
        wait_until(Duration::from_secs(15), || !w
            .exchange
            .delivered()
            .is_empty()),
        "log:\n{}",
        w.postern.log_text()
    );
    let m = &w.exchange.delivered()[0];
    assert_eq!(m.mailbox, MAILBOX, "SASL user= is the sender's own mailbox");
    assert_eq!(m.mail_from, MAILBOX);
    assert_eq!(m.rcpt_to, vec!["boss@fabrikam.com", "ops@fabrikam.com"]);
    let data = String::from_utf8_lossy(&m.data);
    assert!(data.starts_with("Received: from "), "{data}");
    assert!(
        data.ends_with("\r\n.leading dot\r\nscan attached\r\n"),
        "dot-stuffing round trip: {data:?}"
    );
    // app-only: client credentials with the secret, the SMTP app-only scope
    let req = w
        .entra
        .state()
        .log
        .iter()
        .find(|r| r.path.ends_with("/token"))
        .cloned()
        .expect("a token request");
    assert_eq!(req.field("grant_type"), Some("client_credentials"));
    assert_eq!(
        req.field("scope"),
        Some("https://outlook.office365.com/.default")
    );
    assert!(w.postern.wait_log("event=\"sent\"", Duration::from_secs(5)));
    // the spool is empty again
    assert!(wait_until(Duration::from_secs(5), || delivered_ids(
        &w.postern.path("spool/incoming")
    )
    .is_empty()
        && std::fs::read_dir(w.postern.path("spool/active"))
            .map(|d| d.count() == 0)
            .unwrap_or(false)));
    assert_no_secret_in_logs(&w);
}

#[test]
fn one_app_only_token_serves_every_mailbox() {
    let w = world("");
    for i in 0..20 {
        let r = send_mail(
            w.postern.addr(),
            &format!("dev{}@contoso.com", i % 5),
            &["x@fabrikam.com"],
            b"Subject: burst\r\n\r\nx\r\n",
        );
        expect(&r, "250");
    }
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 20),
        "log:\n{}",
        w.postern.log_text()
    );
    let mut mailboxes: Vec<String> = w
        .exchange
        .delivered()
        .iter()
        .map(|m| m.mailbox.clone())
        .collect();
    mailboxes.sort();
    mailboxes.dedup();
    assert_eq!(mailboxes.len(), 5, "each device sends as its own mailbox");
    assert_eq!(
        w.entra.token_requests(),
        1,
        "an app-only token is cached and shared by every mailbox"
    );
}

#[test]
fn expired_secret_holds_the_mailbox_without_spending_retries_then_mail_flows_by_itself() {
    let w = world("");
    w.entra.state().broken = Some(Scripted::aadsts(7000222));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = send_mail(
            w.postern.addr(),
            MAILBOX,
            &["boss@fabrikam.com"],
            b"Subject: held\r\n\r\nx\r\n",
        );
        expect(&r, "250");
        ids.push(queued_id(&r));
    }
    // All held by postern itself, no attempt counted, one clear log line with the code and fix.
    assert!(
        wait_until(Duration::from_secs(15), || ids.iter().all(|id| w
            .postern
            .path("spool/hold")
            .join(id)
            .exists())),
        "log:\n{}",
        w.postern.log_text()
    );
    for id in &ids {
        let env = queue_envelope(&w.postern.path("spool/hold").join(id)).expect("envelope");
        assert_eq!(env["auto_hold"], true);
        assert_eq!(env["attempts"], 0, "{env}");
        assert!(
            env["hold_reason"]
                .as_str()
                .unwrap()
                .contains("AADSTS7000222"),
            "{env}"
        );
    }
    let log = w.postern.log_text();
    assert!(
        log.contains("mailbox paused") && log.contains("Certificates & secrets"),
        "{log}"
    );
    assert!(w.exchange.delivered().is_empty());
    // The token endpoint is not hammered while the mailbox is paused.
    let before = w.entra.token_requests();
    std::thread::sleep(Duration::from_millis(2500));
    let during = w.entra.token_requests() - before;
    assert!(
        during <= 4,
        "{during} token requests in 2.5 s with hold_retry = 1s"
    );
    let (code, out, _) = w.postern.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("hold") && out.contains("AADSTS7000222"),
        "{out}"
    );

    // The admin puts a new secret in Entra: mail flows again without anyone touching postern.
    w.entra.state().broken = None;
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 3),
        "released and delivered; log:\n{}",
        w.postern.log_text()
    );
    assert!(
        w.postern
            .wait_log("mailbox works again", Duration::from_secs(5))
    );
    assert_no_secret_in_logs(&w);
}

#[test]
fn smtp_auth_disabled_for_the_mailbox_is_held_with_the_exchange_fix() {
    let w = world("");
    w.exchange.update(|s| {
        s.auth_failures.insert(
            MAILBOX.into(),
            crate::fake::exchange::AuthFailure::MailboxDisabled,
        );
    });
    let id = queued_id(&send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com"],
        b"Subject: x\r\n\r\nx\r\n",
    ));
    assert!(
        wait_until(Duration::from_secs(15), || w
            .postern
            .path("spool/hold")
            .join(&id)
            .exists()),
        "log:\n{}",
        w.postern.log_text()
    );
    let env = queue_envelope(&w.postern.path("spool/hold").join(&id)).unwrap();
    let reason = env["hold_reason"].as_str().unwrap();
    assert!(
        reason.contains("5.7.139") && reason.contains("Set-CASMailbox"),
        "{reason}"
    );
    // Fixed in Exchange: the next probe delivers it.
    w.exchange.update(|s| {
        s.auth_failures.clear();
    });
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 1),
        "log:\n{}",
        w.postern.log_text()
    );
}

#[test]
fn delegated_mailbox_logs_in_once_then_delivers_with_rotated_refresh_tokens() {
    let w = world_with("", "auth = \"delegated\"");
    // Before `postern login`, mail for the mailbox is held with the fix in the reason.
    let first = queued_id(&send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com"],
        b"Subject: before login\r\n\r\nx\r\n",
    ));
    assert!(
        wait_until(Duration::from_secs(15), || w
            .postern
            .path("spool/hold")
            .join(&first)
            .exists()),
        "log:\n{}",
        w.postern.log_text()
    );
    let reason = queue_envelope(&w.postern.path("spool/hold").join(&first)).unwrap()["hold_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("postern login"), "{reason}");
    // The admin signs the mailbox in with the device code flow (the fake approves on the
    // second poll), while the daemon runs.
    let (code, out, err) = w.postern.cli(&["login", "contoso", "--mailbox", MAILBOX]);
    assert_eq!(code, 0, "{out}\n{err}");
    // The held message goes out on the next probe, with a delegated token for that mailbox.
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 1),
        "log:\n{}",
        w.postern.log_text()
    );
    let r = send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com"],
        b"Subject: after login\r\n\r\nx\r\n",
    );
    expect(&r, "250");
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    assert!(w.exchange.delivered().iter().all(|m| m.mailbox == MAILBOX));
    let st = w.entra.state();
    let refresh = st
        .log
        .iter()
        .filter(|r| r.field("grant_type") == Some("refresh_token"))
        .collect::<Vec<_>>();
    assert!(
        !refresh.is_empty(),
        "the daemon used the stored refresh token"
    );
    assert_eq!(
        refresh[0].field("scope"),
        Some("https://outlook.office.com/SMTP.Send offline_access")
    );
    // The rotated refresh token was saved: the file holds the newest one the fake issued.
    let stored = std::fs::read_to_string(
        w.postern
            .path("state/tokens/contoso/scanner@contoso.com.json"),
    )
    .unwrap();
    assert!(
        stored.contains(st.issued_refresh.last().unwrap()),
        "rotated refresh token stored"
    );
    drop(st);
    assert_no_secret_in_logs(&w);
}

#[test]
fn a_refused_recipient_is_reported_to_the_sender_through_the_same_mailbox() {
    let w = world("");
    w.exchange.update(|s| {
        s.rcpt_replies.insert(
            "nobody@fabrikam.com".into(),
            crate::fake::exchange::replies::RECIPIENT_NOT_FOUND.into(),
        );
    });
    let r = send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com", "nobody@fabrikam.com"],
        b"From: scanner@contoso.com\r\nSubject: Scan 7\r\n\r\nx\r\n",
    );
    expect(&r, "250");
    // The original reaches the good recipient; then the report reaches the sender, sent as the
    // same mailbox with the null sender.
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    let msgs = w.exchange.delivered();
    assert_eq!(msgs[0].rcpt_to, vec!["boss@fabrikam.com"]);
    let report = &msgs[1];
    assert_eq!(report.mail_from, "", "reports use the null sender");
    assert_eq!(report.mailbox, MAILBOX);
    assert_eq!(report.rcpt_to, vec![MAILBOX]);
    let text = String::from_utf8_lossy(&report.data);
    assert!(
        text.contains("multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@fabrikam.com"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert!(
        text.contains("Subject: Scan 7"),
        "the original's header is attached: {text}"
    );
    assert!(
        w.postern
            .wait_log("event=\"bounced\"", Duration::from_secs(5))
    );
}
