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
    world_with(mailbox_line, CLIENT_SECRET_AUTH)
}

/// The account's sign-in for most tests: app-only with a client secret in a file.
pub(crate) const CLIENT_SECRET_AUTH: &str =
    "auth = \"client_secret\"\nclient_secret_file = \"SECRET_FILE\"";

/// A world whose account signs in with `auth_lines` (`SECRET_FILE` is replaced by the path of
/// a file holding the fake's client secret).
fn world_with(mailbox_line: &str, auth_lines: &str) -> World {
    world_routes(
        auth_lines,
        &format!(
            "[route.m365]\nsenders = [\"*@contoso.com\"]\n{mailbox_line}\ntransport = \"smtp\"\naccount = \"contoso\"\n"
        ),
    )
}

/// A world whose account signs in with `auth_lines` and whose route tables are `routes`
/// (their account is `contoso`).
pub(crate) fn world_routes(auth_lines: &str, routes: &str) -> World {
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

{routes}"#,
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
    // The long explanation once, when the hold started; a short line per probe since.
    assert!(
        count_lines(&w, "still paused, same cause") >= 1,
        "{}",
        w.postern.log_text()
    );
    assert_eq!(
        count_lines(&w, "Certificates & secrets"),
        1,
        "{}",
        w.postern.log_text()
    );
    assert_no_empty_mailbox_field(&w);
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
    // same mailbox, from it (Exchange's client submission takes mail from a mailbox).
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    let msgs = w.exchange.delivered();
    assert_eq!(msgs[0].rcpt_to, vec!["boss@fabrikam.com"]);
    let report = &msgs[1];
    assert_eq!(report.mail_from, MAILBOX, "reports come from the mailbox");
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

/// Log lines containing `needle`.
fn count_lines(w: &World, needle: &str) -> usize {
    w.postern
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// No log line shows an empty mailbox (app-only tokens serve every mailbox).
fn assert_no_empty_mailbox_field(w: &World) {
    let log = w.postern.log_text();
    for l in log.lines() {
        assert!(
            !l.contains("mailbox=\"\"") && !l.contains("mailbox= ") && !l.ends_with("mailbox="),
            "{l}"
        );
    }
}

#[test]
fn a_token_exchange_stops_accepting_is_replaced_and_the_mail_delivered_at_once() {
    let w = world("");
    // The kept connection does not outlive the suspension below (Exchange ends idle
    // sessions): the next message signs in again, with the cached token.
    w.exchange.update(|s| s.close_after_messages = Some(1));
    expect(
        &send_mail(
            w.postern.addr(),
            MAILBOX,
            &["boss@fabrikam.com"],
            b"Subject: before\r\n\r\nx\r\n",
        ),
        "250",
    );
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 1),
        "log:\n{}",
        w.postern.log_text()
    );
    assert_eq!(w.entra.token_requests(), 1);
    // This host was suspended for two hours: Microsoft's clocks went on, the cached token
    // (valid for an hour) is expired for Exchange although postern's monotonic clock says not.
    let two_hours = Duration::from_secs(7200);
    w.exchange.update(|s| s.clock_offset = two_hours);
    w.entra.state().clock_offset = two_hours.as_secs();
    let t = Instant::now();
    let id = queued_id(&send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com"],
        b"Subject: after\r\n\r\nx\r\n",
    ));
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
    // Generous bound: the point is "at once, not at the store's refresh time or a hold probe".
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(w.entra.token_requests(), 2, "exactly one new token request");
    let auths = w.exchange.auths();
    assert_eq!(auths.len(), 3, "{auths:?}");
    assert!(
        auths[1]
            .reply
            .starts_with("535 5.7.3 Authentication unsuccessful")
    );
    assert!(auths[2].reply.starts_with("235"));
    assert!(!w.postern.path("spool/hold").join(&id).exists());
    let log = w.postern.log_text();
    assert!(!log.contains("mailbox paused"), "{log}");
    assert!(
        !log.contains("New-ServicePrincipal"),
        "no permission advice: {log}"
    );
    assert!(log.contains("refused a cached access token"), "{log}");
    assert_no_empty_mailbox_field(&w);
    assert_no_secret_in_logs(&w);
}

#[test]
fn a_fresh_token_refused_is_held_with_the_permission_advice_logged_once() {
    let w = world("");
    // The service principal has no right on the mailbox: every token is refused.
    w.exchange.update(|s| {
        s.auth_failures.insert(
            MAILBOX.into(),
            crate::fake::exchange::AuthFailure::Reply(
                "535 5.7.3 Authentication unsuccessful [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]".into(),
            ),
        );
    });
    let ids: Vec<String> = (0..2)
        .map(|i| {
            queued_id(&send_mail(
                w.postern.addr(),
                MAILBOX,
                &["boss@fabrikam.com"],
                format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
            ))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || ids.iter().all(|id| w
            .postern
            .path("spool/hold")
            .join(id)
            .exists())),
        "log:\n{}",
        w.postern.log_text()
    );
    let reason =
        queue_envelope(&w.postern.path("spool/hold").join(&ids[0])).unwrap()["hold_reason"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(reason.contains("New-ServicePrincipal"), "{reason}");
    // Let a few probes run (hold_retry = 1s).
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        count_lines(&w, "still paused, same cause") >= 1,
        "probes ran: {}",
        w.postern.log_text()
    );
    assert_eq!(count_lines(&w, "mailbox paused"), 1);
    assert_eq!(
        count_lines(&w, "New-ServicePrincipal"),
        1,
        "the long explanation once: {}",
        w.postern.log_text()
    );
    // One token per probe at most (a fresh one), not a storm.
    // (+1: a probe may be between its token request and its log line.)
    let probes = count_lines(&w, "still paused, same cause") + 1;
    assert!(
        w.entra.token_requests() <= 2 + probes,
        "{} token requests for {probes} probes",
        w.entra.token_requests()
    );
    assert_no_empty_mailbox_field(&w);
    // The admin grants the permission: the next probe delivers both.
    w.exchange.update(|s| s.auth_failures.clear());
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 2),
        "log:\n{}",
        w.postern.log_text()
    );
}

#[test]
fn a_send_as_refusal_holds_only_that_senders_mail() {
    let w = world("mailbox = \"alice@contoso.com\"");
    w.exchange.update(|s| {
        s.send_as.insert(
            "alice@contoso.com".into(),
            vec!["shared@contoso.com".into()],
        );
    });
    let send = |from: &str, rcpts: &[&str], subject: &str| {
        queued_id(&send_mail(
            w.postern.addr(),
            from,
            rcpts,
            format!("From: {from}\r\nSubject: {subject}\r\n\r\nx\r\n").as_bytes(),
        ))
    };
    let bob1 = send(
        "bob@contoso.com",
        &["a@fabrikam.com", "b@fabrikam.com", "c@fabrikam.com"],
        "bob 1",
    );
    assert!(
        wait_until(Duration::from_secs(15), || w
            .postern
            .path("spool/hold")
            .join(&bob1)
            .exists()),
        "log:\n{}",
        w.postern.log_text()
    );
    let alice1 = send("alice@contoso.com", &["a@fabrikam.com"], "alice 1");
    let bob2 = send("bob@contoso.com", &["a@fabrikam.com"], "bob 2");
    let shared1 = send("shared@contoso.com", &["a@fabrikam.com"], "shared 1");
    let alice2 = send("alice@contoso.com", &["a@fabrikam.com"], "alice 2");
    // alice@'s and shared@'s mail flows while bob@'s waits.
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 3),
        "log:\n{}",
        w.postern.log_text()
    );
    let subjects = |msgs: Vec<crate::fake::exchange::Message>| -> Vec<String> {
        msgs.iter()
            .map(|m| {
                let d = String::from_utf8_lossy(&m.data).into_owned();
                d.lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut got = subjects(w.exchange.delivered());
    got.sort();
    assert_eq!(got, vec!["alice 1", "alice 2", "shared 1"]);
    for id in [&alice1, &alice2, &shared1] {
        assert!(!w.postern.path("spool/hold").join(id).exists());
    }
    assert!(w.postern.path("spool/hold").join(&bob2).exists());
    let log = w.postern.log_text();
    assert!(log.contains("sender paused"), "{log}");
    assert!(!log.contains("mailbox paused"), "{log}");
    // Probes (hold_retry 1s, doubling) use the least suspicious message: bob 2 (one
    // recipient), never bob 1 again.
    std::thread::sleep(Duration::from_millis(3500));
    let refused = subjects(
        w.exchange
            .messages()
            .into_iter()
            .filter(|m| !m.accepted())
            .collect(),
    );
    assert!(refused.len() >= 2, "probes ran: {refused:?}");
    assert_eq!(refused[0], "bob 1");
    assert!(refused[1..].iter().all(|s| s == "bob 2"), "{refused:?}");
    // The admin grants Send As and releases one: everything of bob@ goes.
    w.exchange.update(|s| {
        s.send_as
            .get_mut("alice@contoso.com")
            .unwrap()
            .push("bob@contoso.com".into());
    });
    let (code, out, err) = w.postern.cli(&["queue", "release", &bob2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_until(Duration::from_secs(15), || w.exchange.delivered().len()
            == 5),
        "log:\n{}",
        w.postern.log_text()
    );
    assert!(w.postern.wait_log("works again", Duration::from_secs(5)));
}

/// `postern queue list` once it shows `needle` (the daemon writes what it shows at once, but
/// asynchronously).
fn queue_list_showing(w: &World, needle: &str) -> String {
    let mut out = String::new();
    let shown = wait_until(Duration::from_secs(5), || {
        let (code, o, _) = w.postern.cli(&["queue", "list"]);
        assert_eq!(code, 0);
        out = o;
        out.contains(needle)
    });
    assert!(
        shown,
        "{needle:?} not in:\n{out}\nlog:\n{}",
        w.postern.log_text()
    );
    out
}

/// The `Subject:` of a delivered message.
fn subject(m: &crate::fake::exchange::Message) -> String {
    String::from_utf8_lossy(&m.data)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn thirty_messages_in_the_window_go_and_the_thirty_first_waits_its_turn() {
    // 30 per 10 s here (30/min in production): a short window, no minute-long sleep.
    let w = world("rate = \"30/10s\"");
    for i in 1..=31 {
        expect(
            &send_mail(
                w.postern.addr(),
                MAILBOX,
                &["boss@fabrikam.com"],
                format!("Subject: scan {i}\r\n\r\npage {i}\r\n").as_bytes(),
            ),
            "250",
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || w.exchange.delivered().len()
            == 30),
        "log:\n{}",
        w.postern.log_text()
    );
    // The 31st waits in the queue and says why.
    let out = queue_list_showing(&w, "(paced: 30/10s for scanner@contoso.com, next at ");
    assert!(out.contains("-- 1 message(s)"), "{out}");
    assert_eq!(w.exchange.delivered().len(), 30, "nothing went early");
    let (_, json, _) = w.postern.cli(&["queue", "list", "--json"]);
    assert!(json.contains("\"waiting\": \"paced: 30/10s"), "{json}");
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 31),
        "log:\n{}",
        w.postern.log_text()
    );
    let order: Vec<String> = w.exchange.delivered().iter().map(subject).collect();
    assert_eq!(order[30], "scan 31", "in order: {order:?}");
    // Nothing failed or was retried: pacing is not an error.
    assert!(!w.postern.log_text().contains("event=\"deferred\""));
    assert!(w.exchange.messages().iter().all(|m| m.accepted()));
}

#[test]
fn submission_quota_exceeded_holds_the_mailbox_until_the_window_frees() {
    // Exchange counts 2 recipients per 4 s for the mailbox (10,000 per 24 h in production);
    // postern's own count is higher (other systems may send as the same mailbox), so Exchange
    // refuses first.
    let w = world("daily_recipients = \"100/4s\"");
    w.exchange.update(|s| {
        s.recipient_quota = 2;
        s.quota_window = Some(Duration::from_secs(4));
    });
    let send = |i: u32| {
        queued_id(&send_mail(
            w.postern.addr(),
            MAILBOX,
            &["boss@fabrikam.com"],
            format!("Subject: report {i}\r\n\r\nx\r\n").as_bytes(),
        ))
    };
    for i in 1..=2 {
        send(i);
        assert!(
            wait_until(Duration::from_secs(10), || w.exchange.delivered().len()
                == i as usize),
            "log:\n{}",
            w.postern.log_text()
        );
    }
    let third = send(3);
    assert!(
        wait_until(Duration::from_secs(10), || w
            .exchange
            .messages()
            .iter()
            .any(|m| m.reply.contains("SubmissionQuotaExceeded"))),
        "log:\n{}",
        w.postern.log_text()
    );
    let fourth = send(4);
    // Both wait: the mailbox as a whole, without spending attempts, with the reason shown.
    let out = queue_list_showing(&w, "(throttled by the upstream: ");
    assert!(out.contains("SubmissionQuotaExceeded"), "{out}");
    assert_eq!(
        out.matches("(throttled by the upstream: ").count(),
        2,
        "both messages of the mailbox wait: {out}"
    );
    assert!(out.contains("-- 2 message(s)"), "{out}");
    let env = queue_envelope(&w.postern.path("spool/deferred").join(&third)).expect("deferred");
    assert_eq!(env["attempts"], 0, "{env}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w.exchange
            .messages()
            .iter()
            .filter(|m| !m.accepted())
            .count(),
        1,
        "the mailbox is not hammered while it waits"
    );
    // When the window frees, both go, in order, and nothing bounced.
    assert!(
        wait_until(Duration::from_secs(20), || w.exchange.delivered().len()
            == 4),
        "log:\n{}",
        w.postern.log_text()
    );
    let order: Vec<String> = w.exchange.delivered().iter().map(subject).collect();
    assert_eq!(order, vec!["report 1", "report 2", "report 3", "report 4"]);
    assert!(!w.postern.log_text().contains("event=\"failed\""));
    assert!(!w.postern.log_text().contains("event=\"bounced\""));
    let _ = fourth;
}

#[test]
fn a_recipient_refused_at_rcpt_is_not_tried_again_when_the_message_is_retried() {
    let w = world("");
    w.exchange.update(|s| {
        s.rcpt_replies.insert(
            "nobody@fabrikam.com".into(),
            crate::fake::exchange::replies::RECIPIENT_NOT_FOUND.into(),
        );
        s.data_end_replies.insert(
            MAILBOX.into(),
            crate::fake::exchange::replies::TEMPORARY.into(),
        );
    });
    let id = queued_id(&send_mail(
        w.postern.addr(),
        MAILBOX,
        &["boss@fabrikam.com", "nobody@fabrikam.com"],
        b"From: scanner@contoso.com\r\nSubject: twice\r\n\r\nx\r\n",
    ));
    assert!(
        wait_until(Duration::from_secs(15), || w
            .postern
            .path("spool/deferred")
            .join(&id)
            .exists()),
        "log:\n{}",
        w.postern.log_text()
    );
    w.exchange.update(|s| {
        s.data_end_replies.clear();
    });
    // The retry (retry_initial 1s) goes to the good recipient only; the sender got a report
    // about the refused one at once.
    assert!(
        wait_until(Duration::from_secs(15), || w
            .exchange
            .delivered()
            .iter()
            .any(|m| subject(m) == "twice")),
        "log:\n{}",
        w.postern.log_text()
    );
    let rcpt_cmds = w
        .exchange
        .sessions()
        .iter()
        .flat_map(|s| s.commands.clone())
        .filter(|c| c.contains("RCPT TO:<nobody@fabrikam.com>"))
        .count();
    assert_eq!(rcpt_cmds, 1, "the refused recipient was tried once");
    // The report goes out from the mailbox too, so it met the same temporary refusal while
    // it was in force and may still be waiting for its own retry.
    let is_report = |m: &crate::fake::exchange::Message| {
        String::from_utf8_lossy(&m.data).contains("multipart/report")
    };
    assert!(
        wait_until(Duration::from_secs(15), || w
            .exchange
            .delivered()
            .iter()
            .any(is_report)),
        "no report to the sender; log:\n{}",
        w.postern.log_text()
    );
    let report = w
        .exchange
        .delivered()
        .into_iter()
        .find(is_report)
        .expect("a report to the sender");
    assert!(
        String::from_utf8_lossy(&report.data)
            .contains("Final-Recipient: rfc822; nobody@fabrikam.com")
    );
}
