//! End to end through the real binary over Microsoft Graph: a device sends plain SMTP to
//! postern, which gets a token from the fake Entra and delivers with `sendMail` (or through a
//! draft) to the fake Graph.

use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::fake::entra::{CLIENT_ID, FakeEntra, SECRET, TENANT};
use crate::fake::graph::{FakeGraph, GraphErr, Lose};
use crate::harness::*;
use crate::m365::wait_until;

pub(crate) const MAILBOX: &str = "scanner@contoso.com";

/// A fake Entra and Graph and a postern whose route `m365` (`*@contoso.com`) sends over Graph.
pub(crate) struct World {
    pub(crate) entra: FakeEntra,
    pub(crate) graph: FakeGraph,
    pub(crate) postern: Postern,
    _dir: tempfile::TempDir,
}

/// How the world is set up.
pub(crate) struct Setup<'a> {
    /// Lines of `[account.contoso]` that say how it signs in (`SECRET_FILE`, `CERT_FILE` and
    /// `KEY_FILE` are replaced by files the world writes).
    pub(crate) auth: &'a str,
    /// More lines of `[route.m365]`.
    pub(crate) route: &'a str,
    /// More lines of `[delivery]`.
    pub(crate) delivery: &'a str,
    /// Application permissions of app-only tokens.
    pub(crate) roles: &'a [&'a str],
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            auth: "auth = \"client_secret\"\nclient_secret_file = \"SECRET_FILE\"",
            route: "",
            delivery: "",
            roles: &["Mail.Send"],
        }
    }
}

pub(crate) fn world(setup: Setup<'_>) -> World {
    let entra = FakeEntra::start();
    entra.state().app_roles = Some(setup.roles.iter().map(|r| r.to_string()).collect());
    let graph = FakeGraph::start(entra.issued_check());
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let mut auth = setup
        .auth
        .replace("SECRET_FILE", &secret.display().to_string());
    if auth.contains("CERT_FILE") {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["postern-graph-test".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, kp.serialize_pem()).unwrap();
        entra.state().register_cert(&cert.pem());
        auth = auth
            .replace("CERT_FILE", &cert_path.display().to_string())
            .replace("KEY_FILE", &key_path.display().to_string());
    }
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

[account.contoso]
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
{auth}
authority = "{authority}"
graph_url = "{graph}"

[route.m365]
senders = ["*@contoso.com"]
transport = "graph"
account = "contoso"
{route}
"#,
        delivery = setup.delivery,
        authority = entra.base,
        graph = graph.base,
        route = setup.route,
    );
    let postern = Postern::start(&cfg);
    World {
        entra,
        graph,
        postern,
        _dir: dir,
    }
}

impl World {
    /// Wait (generously) until the fake Graph sent `n` messages.
    fn wait_sent(&self, n: usize) -> Vec<crate::fake::graph::Sent> {
        assert!(
            wait_until(Duration::from_secs(30), || self.graph.sent().len() >= n),
            "{} of {n} sent; log:\n{}",
            self.graph.sent().len(),
            self.postern.log_text()
        );
        self.graph.sent()
    }

    /// Wait until message `id` is in `spool/hold`, and return its envelope.
    fn wait_held(&self, id: &str) -> serde_json::Value {
        let path = self.postern.path("spool/hold").join(id);
        assert!(
            wait_until(Duration::from_secs(30), || path.exists()),
            "{id} not held; log:\n{}",
            self.postern.log_text()
        );
        queue_envelope(&path).expect("envelope")
    }

    /// The message bytes of held message `id`, as its queue file holds them.
    fn held_message(&self, id: &str) -> Vec<u8> {
        let path = self.postern.path("spool/hold").join(id);
        let env = queue_envelope(&path).expect("envelope");
        let size = env["size"].as_u64().expect("size") as usize;
        std::fs::read(&path).unwrap()[..size].to_vec()
    }

    fn assert_no_secret_in_logs(&self) {
        let logs = self.postern.log_text();
        for s in self.entra.secrets() {
            assert!(
                !logs.contains(&s),
                "a secret or token from the fake Entra is in the daemon's log"
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn send(w: &World, from: &str, to: &[&str], body: &[u8]) -> String {
    let r = send_mail(w.postern.addr(), from, to, body);
    expect(&r, "250");
    queued_id(&r)
}

/// Hold `mailbox` with `err`, check the hold's reason has `advice`, then lift the error and
/// check the held message goes out by itself.
fn hold_then_release(err: GraphErr, advice: &str) {
    let w = world(Setup::default());
    w.graph
        .state()
        .mailbox_errors
        .insert(MAILBOX.into(), err.clone());
    let id = send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: held\r\n\r\nx\r\n",
    );
    let env = w.wait_held(&id);
    assert_eq!(env["auto_hold"], true, "{env}");
    assert_eq!(env["attempts"], 0, "a hold spends no attempt: {env}");
    let reason = env["hold_reason"].as_str().unwrap();
    assert!(
        reason.contains(&err.code) && reason.contains(advice),
        "{} -> {reason}",
        err.code
    );
    assert!(
        reason.contains("request-id") && reason.contains("client-request-id"),
        "{reason}"
    );
    assert!(w.graph.sent().is_empty());
    w.graph.state().mailbox_errors.clear();
    let sent = w.wait_sent(1);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    assert!(
        w.postern
            .wait_log("mailbox works again", Duration::from_secs(10)),
        "{}",
        w.postern.log_text()
    );
}

#[test]
fn printer_mail_goes_out_over_graph_byte_exact_with_an_app_only_token() {
    let w = world(Setup::default());
    // Held first (the app lacks Mail.Send), so the queue file can be read before delivery.
    w.graph
        .state()
        .mailbox_errors
        .insert(MAILBOX.into(), GraphErr::access_denied());
    let body: &[u8] = b"From: scanner@contoso.com\r\nTo: Boss <boss@fabrikam.com>\r\nSubject: Scan\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n..leading dot\r\n\xc3\xa9t\xc3\xa9 8-bit\r\nscan attached";
    let id = send(&w, MAILBOX, &["boss@fabrikam.com"], body);
    let env = w.wait_held(&id);
    assert!(
        env["hold_reason"]
            .as_str()
            .unwrap()
            .contains("Application permissions > Mail.Send"),
        "{env}"
    );
    let queued = w.held_message(&id);
    w.graph.state().mailbox_errors.clear();
    let sent = w.wait_sent(1);
    // Byte for byte the queue file's message: the recipients were all in To, nothing added.
    assert_eq!(
        String::from_utf8_lossy(&sent[0].mime),
        String::from_utf8_lossy(&queued)
    );
    assert_eq!(sent[0].mime, queued);
    assert!(
        queued.starts_with(b"Received: "),
        "postern's trace header first"
    );
    assert_eq!(sent[0].via, "sendMail");
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    let reqs = w.graph.requests();
    let ok = reqs.iter().find(|r| r.status == 202).expect("a 202");
    assert_eq!(ok.method, "POST");
    assert_eq!(ok.path, "/v1.0/users/scanner@contoso.com/sendMail");
    assert_eq!(ok.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        ok.content_length.as_deref(),
        Some(ok.body.len().to_string().as_str()),
        "the streamed body has its length"
    );
    assert!(
        ok.authorization
            .as_deref()
            .unwrap()
            .starts_with("Bearer ey")
    );
    // A client-request-id of our own, a UUID, different for every request.
    let ids: Vec<&str> = reqs
        .iter()
        .filter_map(|r| r.client_request_id.as_deref())
        .collect();
    assert_eq!(ids.len(), reqs.len());
    assert!(
        ids.iter().all(|i| uuid::Uuid::parse_str(i).is_ok()),
        "{ids:?}"
    );
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    assert!(
        w.postern
            .wait_log("event=\"sent\"", Duration::from_secs(10)),
        "{}",
        w.postern.log_text()
    );
    w.assert_no_secret_in_logs();
}

#[test]
fn bcc_only_recipients_reach_graph_in_a_bcc_header_added_for_the_request() {
    let w = world(Setup::default());
    w.graph
        .state()
        .mailbox_errors
        .insert(MAILBOX.into(), GraphErr::access_denied());
    let body =
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: with bcc\r\n\r\nbody\r\n";
    let id = send(
        &w,
        MAILBOX,
        &[
            "boss@fabrikam.com",
            "hidden@fabrikam.com",
            "Audit@Contoso.com",
        ],
        body,
    );
    w.wait_held(&id);
    let queued = w.held_message(&id);
    w.graph.state().mailbox_errors.clear();
    let sent = w.wait_sent(1);
    // Exactly the queue file's message with one Bcc field in front naming the two envelope
    // recipients the headers do not name.
    let mut want = b"Bcc: <hidden@fabrikam.com>,\r\n <Audit@Contoso.com>\r\n".to_vec();
    want.extend_from_slice(&queued);
    assert_eq!(
        String::from_utf8_lossy(&sent[0].mime),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    assert_eq!(
        sent[0].bcc,
        vec!["hidden@fabrikam.com", "audit@contoso.com"]
    );
    assert_eq!(sent[0].via, "sendMail");
    // The queue file was not changed for it: the Bcc went into the request only.
    assert!(!queued.windows(4).any(|x| x == b"Bcc:"));
}

#[test]
fn header_only_recipients_do_not_receive_it_the_draft_carries_the_envelope() {
    let w = world(Setup {
        roles: &["Mail.Send", "Mail.ReadWrite"],
        ..Setup::default()
    });
    // A client split one message into two transactions: this one is for boss and a hidden
    // recipient only; ops (in Cc) gets the other copy elsewhere.
    let body = b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nCc: ops@fabrikam.com\r\nSubject: split\r\n\r\nbody\r\n";
    let _id = send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com", "hidden@fabrikam.com"],
        body,
    );
    let sent = w.wait_sent(1);
    assert_eq!(sent.len(), 1);
    let m = &sent[0];
    assert_eq!(m.via, "draft");
    assert_eq!(m.to, vec!["boss@fabrikam.com"]);
    assert!(m.cc.is_empty(), "ops is not an envelope recipient: {m:?}");
    assert_eq!(m.bcc, vec!["hidden@fabrikam.com"]);
    assert!(m.saved_to_sent_items);
    // The draft was made from the MIME as received (no Bcc added: the lists say it).
    assert!(
        contains(&m.mime, body),
        "{}",
        String::from_utf8_lossy(&m.mime)
    );
    assert!(m.mime.starts_with(b"Received: "));
    let reqs = w.graph.requests();
    let steps: Vec<(String, String)> = reqs
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    let draft = &reqs[0];
    assert_eq!(draft.path, "/v1.0/users/scanner@contoso.com/messages");
    assert_eq!(draft.prefer.as_deref(), Some("IdType=\"ImmutableId\""));
    assert_eq!(steps[1].0, "PATCH", "{steps:?}");
    assert_eq!(steps[2].0, "POST", "{steps:?}");
    assert!(steps[2].1.ends_with("/send"), "{steps:?}");
    assert_eq!(reqs[2].content_length.as_deref(), Some("0"));
    // The envelope recorded the draft before it was sent (read back from the log of
    // requests: the PATCH names the id the 201 gave).
    assert!(steps[1].1.contains("/messages/AAkALg"), "{steps:?}");
}

#[test]
fn a_draft_needs_mail_readwrite_held_with_that_advice_then_sent_once_granted() {
    let w = world(Setup::default());
    let body = b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com, ops@fabrikam.com\r\nSubject: split\r\n\r\nbody\r\n";
    let id = send(&w, MAILBOX, &["boss@fabrikam.com"], body);
    let env = w.wait_held(&id);
    let reason = env["hold_reason"].as_str().unwrap();
    assert!(
        reason.contains("Mail.ReadWrite") && reason.contains("ErrorAccessDenied"),
        "{reason}"
    );
    assert!(w.graph.sent().is_empty());
    // The admin grants Mail.ReadWrite: a new token carries it, and the message goes.
    w.entra.state().app_roles = Some(vec!["Mail.Send".into(), "Mail.ReadWrite".into()]);
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    assert!(sent[0].cc.is_empty() && sent[0].bcc.is_empty());
}

#[test]
fn save_to_sent_items_false_sends_through_a_draft_deleted_after_submission() {
    let w = world(Setup {
        roles: &["Mail.Send", "Mail.ReadWrite"],
        route: "save_to_sent_items = false",
        ..Setup::default()
    });
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: no copy\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].via, "draft");
    assert!(!sent[0].saved_to_sent_items);
    assert!(
        w.graph.state().drafts.is_empty(),
        "nothing left in the mailbox"
    );
}

#[test]
fn retry_after_is_honoured_by_the_whole_mailbox() {
    let w = world(Setup::default());
    w.graph.state().script.push_back(GraphErr::throttled(3));
    let t0 = Instant::now();
    for i in 0..3 {
        send(
            &w,
            MAILBOX,
            &["boss@fabrikam.com"],
            format!(
                "From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: {i}\r\n\r\nx\r\n"
            )
            .as_bytes(),
        );
    }
    let sent = w.wait_sent(3);
    assert_eq!(sent.len(), 3);
    let reqs = w.graph.requests();
    let throttled = reqs
        .iter()
        .find(|r| r.status == 429)
        .expect("a 429 was answered");
    // Every message that went out after the 429 waited at least its Retry-After.
    let after: Vec<Duration> = w
        .graph
        .requests()
        .iter()
        .filter(|r| r.status == 202 && r.at > throttled.at)
        .map(|r| r.at - throttled.at)
        .collect();
    assert!(!after.is_empty());
    for d in &after {
        assert!(
            *d >= Duration::from_secs(3),
            "sent {d:?} after a 429 with Retry-After: 3; log:\n{}",
            w.postern.log_text()
        );
    }
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert!(
        w.postern.log_text().contains("ApplicationThrottled"),
        "{}",
        w.postern.log_text()
    );
    // A throttle spends no attempt and bounces nothing.
    assert!(!w.postern.log_text().contains("event=\"bounced\""));
}

#[test]
fn at_most_four_requests_per_mailbox_under_a_burst_of_100() {
    let w = world(Setup {
        route: "rate = \"unlimited\"\ndaily_recipients = \"unlimited\"",
        delivery: "max_concurrency = 20\nper_mailbox_concurrency = 10",
        ..Setup::default()
    });
    // Each request takes a while, so deliveries overlap.
    w.graph.state().delay = Duration::from_millis(60);
    let addr = w.postern.addr();
    let threads: Vec<_> = (0..10)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..10 {
                    let r = send_mail(
                        addr,
                        MAILBOX,
                        &["boss@fabrikam.com"],
                        format!("From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: {t}-{i}\r\n\r\nx\r\n")
                            .as_bytes(),
                    );
                    expect(&r, "250");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(120), || w.graph.sent().len() >= 100),
        "{} sent; log:\n{}",
        w.graph.sent().len(),
        w.postern.log_text()
    );
    let st = w.graph.state();
    let max = st.max_concurrency(MAILBOX);
    assert!(max <= 4, "{max} requests in flight for one mailbox");
    assert!(max >= 2, "deliveries overlapped ({max})");
    assert!(
        st.requests.iter().all(|r| r.status != 429),
        "Graph never had to throttle"
    );
    assert_eq!(st.sent.len(), 100);
}

#[test]
fn access_denied_holds_then_releases() {
    hold_then_release(
        GraphErr::access_denied(),
        "Application permissions > Mail.Send",
    );
}

#[test]
fn odata_disabled_holds_with_the_access_policy_fix_then_releases() {
    hold_then_release(GraphErr::odata_disabled(), "Test-ApplicationAccessPolicy");
}

#[test]
fn mailbox_not_enabled_for_rest_holds_then_releases() {
    hold_then_release(GraphErr::no_rest_api(), "Exchange Online licence");
}

#[test]
fn invalid_user_holds_then_releases() {
    hold_then_release(GraphErr::invalid_user(MAILBOX), "primary SMTP address");
}

#[test]
fn send_as_denied_holds_only_that_sender_then_releases() {
    let w = world(Setup::default());
    // The route sends as scanner, but this message's From is the CEO.
    let held = send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: ceo@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: as ceo\r\n\r\nx\r\n",
    );
    let env = w.wait_held(&held);
    let reason = env["hold_reason"].as_str().unwrap();
    assert!(
        reason.contains("ErrorSendAsDenied")
            && reason.contains("Add-RecipientPermission -Identity ceo@contoso.com"),
        "{reason}"
    );
    // The mailbox's own mail keeps flowing meanwhile.
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: own\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(1);
    assert!(String::from_utf8_lossy(&sent[0].mime).contains("Subject: own"));
    assert!(w.postern.path("spool/hold").join(&held).exists());
    // The admin grants Send As: the held message goes.
    w.graph
        .state()
        .send_as
        .insert((MAILBOX.into(), "ceo@contoso.com".into()));
    let sent = w.wait_sent(2);
    assert!(String::from_utf8_lossy(&sent[1].mime).contains("Subject: as ceo"));
}

#[test]
fn invalid_recipients_fail_with_a_dsn_the_others_are_delivered() {
    let w = world(Setup {
        roles: &["Mail.Send", "Mail.ReadWrite"],
        ..Setup::default()
    });
    // The report is From the mailbox itself, so Send As lets it through.
    w.graph
        .state()
        .invalid_recipients
        .insert("nobody@fabrikam.com".into());
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com", "nobody@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com, nobody@fabrikam.com\r\nSubject: Scan 7\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(2);
    let original = &sent[0];
    assert_eq!(original.recipients(), vec!["boss@fabrikam.com"]);
    let report = &sent[1];
    assert_eq!(report.recipients(), vec![MAILBOX]);
    let text = String::from_utf8_lossy(&report.mime);
    assert!(
        text.contains("multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@fabrikam.com"),
        "{text}"
    );
    assert!(text.contains("ErrorInvalidRecipients"), "{text}");
    assert!(
        w.postern
            .wait_log("event=\"bounced\"", Duration::from_secs(10))
    );
}

#[test]
fn a_refused_token_is_renewed_once_and_the_request_repeated_at_once() {
    let w = world(Setup::default());
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: 1\r\n\r\nx\r\n",
    );
    w.wait_sent(1);
    let tokens_before = w.entra.token_requests();
    // The cached token is revoked (as after a password reset or a clock jump).
    w.graph.state().revoke_seen();
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: 2\r\n\r\nx\r\n",
    );
    w.wait_sent(2);
    assert_eq!(
        w.entra.token_requests(),
        tokens_before + 1,
        "exactly one renewal"
    );
    let statuses: Vec<u16> = w.graph.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![202, 401, 202]);
    let reqs = w.graph.requests();
    assert_ne!(reqs[1].authorization, reqs[2].authorization);
    // Repeated at once, not after the retry backoff.
    assert!(reqs[2].at - reqs[1].at < Duration::from_secs(1));
    assert!(!w.postern.log_text().contains("event=\"deferred\""));
}

#[test]
fn certificate_tokens_work() {
    let w = world(Setup {
        auth: "auth = \"certificate\"\ncertificate = \"CERT_FILE\"\nprivate_key_file = \"KEY_FILE\"",
        ..Setup::default()
    });
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: cert\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    let st = w.entra.state();
    let req = st
        .log
        .iter()
        .find(|r| r.path.ends_with("/token"))
        .expect("a token request");
    assert!(req.field("client_assertion").is_some());
    assert_eq!(
        req.field("scope"),
        Some(format!("{}/.default", w.graph.base).as_str())
    );
}

#[test]
fn delegated_tokens_use_me_for_the_own_mailbox() {
    let w = world(Setup {
        auth: "auth = \"delegated\"",
        ..Setup::default()
    });
    let (code, out, err) =
        w.postern
            .cli(&["login", "contoso", "--mailbox", MAILBOX, "--for", "graph"]);
    assert_eq!(code, 0, "{out}\n{err}");
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: delegated\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].mailbox, MAILBOX);
    let reqs = w.graph.requests();
    assert_eq!(reqs.last().unwrap().path, "/v1.0/me/sendMail");
    let st = w.entra.state();
    let refresh = st
        .log
        .iter()
        .find(|r| r.field("grant_type") == Some("refresh_token"))
        .expect("the daemon refreshed the stored token");
    assert_eq!(
        refresh.field("scope"),
        Some(format!("{}/Mail.Send offline_access", w.graph.base).as_str())
    );
    drop(st);
    w.assert_no_secret_in_logs();
}

#[test]
fn a_lost_answer_on_the_draft_path_is_not_sent_twice() {
    lost_draft_answer_is_not_sent_twice("");
}

#[test]
fn a_lost_answer_on_the_draft_path_is_not_sent_twice_with_rewrite_from() {
    // The rewrite wraps the transport: the draft id Graph's transport records must survive it.
    lost_draft_answer_is_not_sent_twice("rewrite_from = true");
}

fn lost_draft_answer_is_not_sent_twice(route: &str) {
    let w = world(Setup {
        roles: &["Mail.Send", "Mail.ReadWrite"],
        route,
        ..Setup::default()
    });
    // Graph sends the draft, but its 202 never arrives (the connection drops).
    w.graph.state().lose.push(Lose::SendDraft);
    let id = send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nCc: ops@fabrikam.com\r\nSubject: once\r\n\r\nx\r\n",
    );
    w.wait_sent(1);
    // The retry asks Graph about the draft (by the id the envelope recorded), sees it was
    // sent, and finishes without sending again.
    assert!(
        wait_until(Duration::from_secs(30), || w
            .graph
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.status == 200)),
        "log:\n{}",
        w.postern.log_text()
    );
    assert!(
        w.postern
            .wait_log("event=\"sent\"", Duration::from_secs(15)),
        "{}",
        w.postern.log_text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(w.graph.sent().len(), 1, "sent exactly once");
    let sends = w
        .graph
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/send"))
        .count();
    assert_eq!(sends, 1);
    for dir in [
        "spool/deferred",
        "spool/active",
        "spool/incoming",
        "spool/hold",
    ] {
        assert!(
            !w.postern.path(dir).join(&id).exists(),
            "{id} still in {dir}"
        );
    }
    let log = w.postern.log_text();
    assert!(log.contains("isDraft false"), "{log}");
}

#[test]
fn a_lost_sendmail_answer_is_retried_and_logged_as_a_possible_duplicate() {
    let w = world(Setup::default());
    w.graph.state().lose.push(Lose::SendMail);
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: twice?\r\n\r\nx\r\n",
    );
    // sendMail leaves nothing to ask Graph about: the retry sends again, and says so.
    w.wait_sent(2);
    assert!(
        w.postern
            .wait_log("possible duplicate", Duration::from_secs(10)),
        "{}",
        w.postern.log_text()
    );
}

#[test]
fn the_base64_request_streams_the_queue_file() {
    // A 2 MB message: the request body is the base64 of exactly the queue file's message.
    let w = world(Setup::default());
    let mut body =
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: big\r\n\r\n".to_vec();
    let line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&'()*+,-./:;<=>?\r\n";
    while body.len() < 2_000_000 {
        body.extend_from_slice(line);
    }
    send(&w, MAILBOX, &["boss@fabrikam.com"], &body);
    let sent = w.wait_sent(1);
    assert!(contains(&sent[0].mime, &body));
    let req = w
        .graph
        .requests()
        .into_iter()
        .find(|r| r.status == 202)
        .unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&req.body)
            .unwrap(),
        sent[0].mime
    );
}

#[test]
fn delegated_shared_mailbox_uses_users_path_with_mail_send_shared() {
    let w = world(Setup {
        auth: "auth = \"delegated\"",
        route: "mailbox = \"shared@contoso.com\"",
        ..Setup::default()
    });
    // The signed-in user (scanner) has Send As on the shared mailbox.
    w.graph
        .state()
        .shared_access
        .insert((MAILBOX.into(), "shared@contoso.com".into()));
    let (code, out, err) = w.postern.cli(&[
        "login",
        "contoso",
        "--mailbox",
        "shared@contoso.com",
        "--for",
        "graph",
        "--shared",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: shared@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: from the shared mailbox\r\n\r\nx\r\n",
    );
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].mailbox, "shared@contoso.com");
    let last = w.graph.requests().pop().unwrap();
    assert_eq!(last.path, "/v1.0/users/shared@contoso.com/sendMail");
    let st = w.entra.state();
    let refresh = st
        .log
        .iter()
        .find(|r| r.field("grant_type") == Some("refresh_token"))
        .expect("refreshed");
    assert_eq!(
        refresh.field("scope"),
        Some(
            format!(
                "{g}/Mail.Send {g}/Mail.Send.Shared offline_access",
                g = w.graph.base
            )
            .as_str()
        )
    );
}

#[test]
fn doctor_checks_a_graph_route_without_sending() {
    let w = world(Setup {
        route: "mailbox = \"scanner@contoso.com\"",
        ..Setup::default()
    });
    let (code, out, err) = w.postern.cli(&["doctor"]);
    assert!(
        out.contains("refused as expected") && out.contains("ErrorMimeContentInvalidBase64String"),
        "{code}\n{out}\n{err}"
    );
    assert!(
        out.contains("app-only token for graph: granted by Entra"),
        "{out}"
    );
    assert!(w.graph.sent().is_empty(), "doctor sent nothing");
    // With the mailbox outside the app's access policy, doctor names the fix.
    w.graph
        .state()
        .mailbox_errors
        .insert(MAILBOX.into(), GraphErr::odata_disabled());
    let (code, out, _) = w.postern.cli(&["doctor"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Access to OData is disabled") && out.contains("Test-ApplicationAccessPolicy"),
        "{out}"
    );
    assert!(w.graph.sent().is_empty());
}

#[test]
fn graph_routes_are_paced_like_smtp_ones() {
    let w = world(Setup {
        route: "rate = \"1/2s\"",
        ..Setup::default()
    });
    for i in 0..2 {
        send(
            &w,
            MAILBOX,
            &["boss@fabrikam.com"],
            format!(
                "From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nSubject: {i}\r\n\r\nx\r\n"
            )
            .as_bytes(),
        );
    }
    let sent = w.wait_sent(2);
    let gap = sent[1].at - sent[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "the second message went {gap:?} after the first with rate 1/2s"
    );
}

#[test]
fn sigkill_after_the_draft_was_made_resumes_that_draft_after_restart() {
    let mut w = world(Setup {
        roles: &["Mail.Send", "Mail.ReadWrite"],
        ..Setup::default()
    });
    // Every request takes 2 s: time to kill postern while it sets the draft's recipients.
    w.graph.state().delay = Duration::from_secs(2);
    let id = send(
        &w,
        MAILBOX,
        &["boss@fabrikam.com"],
        b"From: scanner@contoso.com\r\nTo: boss@fabrikam.com\r\nCc: ops@fabrikam.com\r\nSubject: resumed\r\n\r\nx\r\n",
    );
    // The envelope records the draft's id before the next request goes out.
    let active = w.postern.path("spool/active").join(&id);
    assert!(
        wait_until(Duration::from_secs(30), || queue_envelope(&active)
            .is_some_and(|e| e["graph"]["draft_id"].is_string())),
        "no draft recorded; log:\n{}",
        w.postern.log_text()
    );
    let draft_id = queue_envelope(&active).unwrap()["graph"]["draft_id"]
        .as_str()
        .unwrap()
        .to_string();
    w.postern.kill9();
    assert!(w.graph.sent().is_empty());
    w.graph.state().delay = Duration::ZERO;
    w.postern.spawn();
    let sent = w.wait_sent(1);
    assert_eq!(sent[0].to, vec!["boss@fabrikam.com"]);
    assert!(sent[0].cc.is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(w.graph.sent().len(), 1, "sent once");
    let st = w.graph.state();
    assert_eq!(
        st.drafts.len(),
        1,
        "no second draft: the recorded one was used"
    );
    assert!(st.drafts.contains_key(&draft_id));
    assert!(
        st.requests
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with(&draft_id)),
        "the restarted daemon asked about the recorded draft"
    );
}

/// A JWT-shaped token the fake Graph accepts (its issued check says yes to everything).
fn test_token(aud: &str, roles: &[&str]) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        b.encode(r#"{"typ":"JWT","alg":"RS256"}"#),
        b.encode(serde_json::json!({"aud": aud, "appid": "app", "roles": roles}).to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_graph_answers_as_the_reference_says() {
    let g = FakeGraph::start(std::sync::Arc::new(|_: &str| true));
    let http = reqwest::Client::new();
    let url = format!("{}/v1.0/users/{MAILBOX}/sendMail", g.base);
    let token = test_token("https://graph.microsoft.com", &["Mail.Send"]);
    let mime = b"From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nSubject: s\r\n\r\nx\r\n";
    // 202 with an empty body.
    let r = http
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "text/plain")
        .header("client-request-id", "c-1")
        .body(base64::engine::general_purpose::STANDARD.encode(mime))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(r.headers().get("request-id").is_some());
    assert_eq!(r.headers()["client-request-id"], "c-1");
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(g.sent()[0].to, vec!["a@fabrikam.com"]);
    // Not base64: 400 ErrorMimeContentInvalidBase64String, in the §4.5 shape.
    let r = http
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "text/plain")
        .header("client-request-id", "c-2")
        .body("not base64!")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "ErrorMimeContentInvalidBase64String");
    assert_eq!(
        v["error"]["message"],
        "Invalid base64 string for MIME content."
    );
    assert_eq!(v["error"]["innerError"]["client-request-id"], "c-2");
    assert!(v["error"]["innerError"]["request-id"].is_string());
    assert!(v["error"]["innerError"]["date"].is_string());
    // Over 4 MB: 413.
    let r = http
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "text/plain")
        .body(vec![b'A'; 4 * 1024 * 1024 + 4])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // No token, a token for another API: 401 InvalidAuthenticationToken.
    let r = http.post(&url).body("").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "InvalidAuthenticationToken");
    assert_eq!(v["error"]["message"], "Access token is empty.");
    let smtp = test_token("https://outlook.office365.com", &["SMTP.SendAsApp"]);
    let r = http.post(&url).bearer_auth(&smtp).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Throttled: 429 ApplicationThrottled with Retry-After.
    g.state().script.push_back(GraphErr::throttled(7));
    let r = http
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Type", "text/plain")
        .body(base64::engine::general_purpose::STANDARD.encode(mime))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "ApplicationThrottled");
    assert_eq!(
        v["error"]["message"],
        "Application is over its MailboxConcurrency limit."
    );
    // Drafts need Mail.ReadWrite.
    let r = http
        .post(format!("{}/v1.0/users/{MAILBOX}/messages", g.base))
        .bearer_auth(&token)
        .header("Content-Type", "text/plain")
        .body(base64::engine::general_purpose::STANDARD.encode(mime))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let rw = test_token(
        "https://graph.microsoft.com",
        &["Mail.Send", "Mail.ReadWrite"],
    );
    let r = http
        .post(format!("{}/v1.0/users/{MAILBOX}/messages", g.base))
        .bearer_auth(&rw)
        .header("Content-Type", "text/plain")
        .body(base64::engine::general_purpose::STANDARD.encode(mime))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["isDraft"], true);
    let id = v["id"].as_str().unwrap().to_string();
    // send (Content-Length: 0): 202, and the draft is no longer a draft (same immutable id).
    let send = format!("{}/v1.0/users/{MAILBOX}/messages/{id}/send", g.base);
    let r = http
        .post(&send)
        .bearer_auth(&rw)
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let r = http
        .get(format!("{}/v1.0/users/{MAILBOX}/messages/{id}", g.base))
        .bearer_auth(&rw)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["isDraft"], false);
    let r = http
        .delete(format!("{}/v1.0/users/{MAILBOX}/messages/{id}", g.base))
        .bearer_auth(&rw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let r = http
        .get(format!("{}/v1.0/users/{MAILBOX}/messages/{id}", g.base))
        .bearer_auth(&rw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn postern_test_over_graph_prints_the_request_and_graphs_answer() {
    let w = world(Setup::default());
    let (code, out, err) = w
        .postern
        .cli(&["test", "--from", MAILBOX, "--to", "boss@fabrikam.com"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("✓ route: m365 (graph, account contoso)"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("✓ token: ") && l.contains("roles Mail.Send")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("✓ POST ") && l.contains("/sendMail") && l.contains(": 202")),
        "{out}"
    );
    let sent = w.wait_sent(1);
    assert!(String::from_utf8_lossy(&sent[0].mime).contains("Subject: postern test message"));
    // Dry run: the probe's sendMail with a body that is not base64, nothing sent.
    let (code, out, err) = w.postern.cli(&[
        "test",
        "--from",
        MAILBOX,
        "--to",
        "boss@fabrikam.com",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("result: signed in; dry run"), "{out}");
    assert_eq!(w.graph.sent().len(), 1);
}

#[test]
fn rewrite_from_over_graph_sends_the_rewritten_header() {
    let w = world(Setup {
        route: "mailbox = \"scanner@contoso.com\"\nrewrite_from = true",
        ..Setup::default()
    });
    let id = send(
        &w,
        "dev@contoso.com",
        &["boss@fabrikam.com"],
        b"From: \"Scanner 3\" <scanner3@localhost>\r\nTo: boss@fabrikam.com\r\nSubject: Scan\r\n\r\nbody\r\n",
    );
    assert!(!id.is_empty());
    let sent = w.wait_sent(1);
    let mime = String::from_utf8_lossy(&sent[0].mime).into_owned();
    assert!(
        mime.contains("\r\nFrom: \"Scanner 3\" <scanner@contoso.com>\r\nReply-To: \"Scanner 3\" <scanner3@localhost>\r\n"),
        "{mime}"
    );
    assert!(
        mime.ends_with("\r\n\r\nbody\r\n") || mime.ends_with("\r\n\r\nbody\r\n\r\n"),
        "{mime}"
    );
}
