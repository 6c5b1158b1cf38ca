//! The worker's bookkeeping for every outcome, with a scripted transport.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::worker::{self, Next, RetryPolicy};
use crate::smtp::{MessageDraft, MessageSink};
use crate::spool::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient, Spool, State, now_secs};
use crate::upstream::{BoxFuture, Outcome, Outgoing, RcptResult, Transport};

/// Answers with the outcomes it is given, in order, and records the recipients it was asked for.
struct Scripted {
    outcomes: Mutex<Vec<Outcome>>,
    asked: Mutex<Vec<Vec<String>>>,
}

impl Transport for Scripted {
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        self.asked
            .lock()
            .unwrap()
            .push(msg.envelope.pending().map(|r| r.address.clone()).collect());
        let o = self.outcomes.lock().unwrap().remove(0);
        Box::pin(async move { o })
    }
}

const POLICY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(60),
    max: Duration::from_secs(3600),
    lifetime: Duration::from_secs(86400),
};

async fn claimed(spool: &Spool, rcpts: &[&str]) -> String {
    let mut d = spool.begin().await.unwrap();
    let id = d.id().to_string();
    d.write(b"Subject: t\r\n\r\nx\r\n").await.unwrap();
    let mut env = spool_envelope();
    env.recipients = rcpts
        .iter()
        .map(|r| Recipient {
            address: r.to_string(),
            status: RcptStatus::Pending,
            last_reply: None,
        })
        .collect();
    d.commit(env).await.unwrap();
    spool.move_msg(&id, State::Incoming, State::Active).unwrap();
    id
}

fn rcpt(a: &str, status: RcptStatus, reply: &str) -> RcptResult {
    RcptResult {
        address: a.into(),
        status,
        reply: reply.into(),
    }
}

#[tokio::test]
async fn partial_success_keeps_sent_recipients_and_retries_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = claimed(&spool, &["ok@x.test", "bad@x.test", "later@x.test"]).await;
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![
            Outcome::Sent {
                relay: "r".into(),
                reply: "250 ok".into(),
                recipients: vec![
                    rcpt("ok@x.test", RcptStatus::Sent, "250 2.1.5 ok"),
                    rcpt("bad@x.test", RcptStatus::Failed, "550 5.1.1 no such user"),
                    rcpt("later@x.test", RcptStatus::Pending, "452 4.5.3 try later"),
                ],
            },
            Outcome::Sent {
                relay: "r".into(),
                reply: "250 ok".into(),
                recipients: vec![rcpt("later@x.test", RcptStatus::Sent, "250 ok")],
            },
        ]),
        asked: Mutex::new(vec![]),
    });
    let next = worker::attempt(&spool, &id, Some(t.clone()), POLICY, "relay.test")
        .await
        .unwrap()
        .next;
    let Next::Deferred(at) = next else {
        panic!("{next:?}")
    };
    assert!(
        at >= now_secs() + 45 && at <= now_secs() + 75,
        "first retry about retry_initial later"
    );
    let env = spool.read_envelope(State::Deferred, &id).unwrap();
    assert_eq!(env.attempts, 1);
    assert_eq!(env.recipients[0].status, RcptStatus::Sent);
    assert_eq!(env.recipients[1].status, RcptStatus::Failed);
    assert_eq!(env.recipients[2].status, RcptStatus::Pending);
    assert_eq!(env.last_error.as_deref(), Some("452 4.5.3 try later"));
    // The refused recipient is reported to the sender at once, not when the rest is done.
    let (report_env, report) = only_report(&spool);
    assert_eq!(report_env.sender, "");
    assert_eq!(report_env.recipients[0].address, "a@example.com");
    assert!(
        report
            .contains("Final-Recipient: rfc822; bad@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"),
        "{report}"
    );
    assert!(
        !report.contains("later@x.test"),
        "pending recipients are not reported"
    );
    assert!(
        report.contains("Subject: t\r\n"),
        "the original's header is attached"
    );
    spool.move_msg(&id, State::Deferred, State::Active).unwrap();
    assert_eq!(
        worker::attempt(&spool, &id, Some(t.clone()), POLICY, "relay.test")
            .await
            .unwrap()
            .next,
        Next::Done
    );
    assert_eq!(
        *t.asked.lock().unwrap(),
        vec![
            vec!["ok@x.test", "bad@x.test", "later@x.test"],
            vec!["later@x.test"]
        ],
        "a sent recipient is never sent again"
    );
    assert_eq!(spool.find(&id), None);
}

#[tokio::test]
async fn permanent_fails_held_keeps_its_retry_budget_missing_route_holds() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![
            Outcome::Permanent {
                reason: "554 5.6.0 rejected".into(),
            },
            Outcome::held("AADSTS7000222: the client secret expired"),
        ]),
        asked: Mutex::new(vec![]),
    });
    let a = claimed(&spool, &["x@x.test"]).await;
    assert_eq!(
        worker::attempt(&spool, &a, Some(t.clone()), POLICY, "relay.test")
            .await
            .unwrap()
            .next,
        Next::Failed
    );
    let env = spool.read_envelope(State::Failed, &a).unwrap();
    assert_eq!(env.recipients[0].status, RcptStatus::Failed);
    assert_eq!(env.last_error.as_deref(), Some("554 5.6.0 rejected"));
    let (_, report) = only_report(&spool);
    assert!(report.contains("Status: 5.6.0"), "{report}");
    remove_reports(&spool);

    let b = claimed(&spool, &["x@x.test"]).await;
    assert_eq!(
        worker::attempt(&spool, &b, Some(t.clone()), POLICY, "relay.test")
            .await
            .unwrap()
            .next,
        Next::Held(crate::upstream::HoldScope::Mailbox)
    );
    let env = spool.read_envelope(State::Hold, &b).unwrap();
    assert_eq!(
        env.attempts, 0,
        "a configuration problem does not use up the message's retries"
    );
    assert!(env.hold_reason.unwrap().contains("AADSTS7000222"));

    let c = claimed(&spool, &["x@x.test"]).await;
    assert_eq!(
        worker::attempt(&spool, &c, None, POLICY, "relay.test")
            .await
            .unwrap()
            .next,
        Next::Held(crate::upstream::HoldScope::Mailbox)
    );
    assert!(
        spool
            .read_envelope(State::Hold, &c)
            .unwrap()
            .hold_reason
            .unwrap()
            .contains("no longer exists")
    );
    assert!(
        spool.ids(State::Incoming).unwrap().is_empty(),
        "holds are not reported"
    );
}

#[tokio::test]
async fn a_recipient_refused_before_a_temporary_failure_is_failed_and_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = claimed(&spool, &["ok@x.test", "bad@x.test"]).await;
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![
            Outcome::Partial {
                refused: vec![rcpt(
                    "bad@x.test",
                    RcptStatus::Failed,
                    "550 5.1.10 not found",
                )],
                then: Box::new(Outcome::Transient {
                    reason: "451 4.7.0 Temporary server error".into(),
                }),
            },
            Outcome::Sent {
                relay: "r".into(),
                reply: "250 ok".into(),
                recipients: vec![rcpt("ok@x.test", RcptStatus::Sent, "250 ok")],
            },
        ]),
        asked: Mutex::new(vec![]),
    });
    let next = worker::attempt(&spool, &id, Some(t.clone()), POLICY, "relay.test")
        .await
        .unwrap()
        .next;
    assert!(matches!(next, Next::Deferred(_)), "{next:?}");
    let env = spool.read_envelope(State::Deferred, &id).unwrap();
    assert_eq!(env.attempts, 1);
    assert_eq!(env.recipients[1].status, RcptStatus::Failed);
    assert_eq!(
        env.last_error.as_deref(),
        Some("451 4.7.0 Temporary server error")
    );
    let (_, report) = only_report(&spool);
    assert!(
        report.contains("Final-Recipient: rfc822; bad@x.test"),
        "{report}"
    );
    assert!(!report.contains("ok@x.test\r\nAction"), "{report}");
    remove_reports(&spool);
    spool.move_msg(&id, State::Deferred, State::Active).unwrap();
    let r = worker::attempt(&spool, &id, Some(t.clone()), POLICY, "relay.test")
        .await
        .unwrap();
    assert_eq!(r.next, Next::Done);
    assert_eq!(r.delivered, 1);
    assert_eq!(
        t.asked.lock().unwrap()[1],
        vec!["ok@x.test"],
        "the refused recipient is not tried again"
    );
}

#[tokio::test]
async fn a_throttle_spends_no_attempt_and_leaves_the_time_to_the_forwarder() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = claimed(&spool, &["x@x.test"]).await;
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![Outcome::Throttled {
            reason: "429 ApplicationThrottled".into(),
            wait: Some(Duration::from_secs(30)),
        }]),
        asked: Mutex::new(vec![]),
    });
    let next = worker::attempt(&spool, &id, Some(t), POLICY, "relay.test")
        .await
        .unwrap()
        .next;
    assert_eq!(
        next,
        Next::Throttled {
            wait: Some(Duration::from_secs(30)),
            reason: "429 ApplicationThrottled".into()
        }
    );
    let env = spool.read_envelope(State::Deferred, &id).unwrap();
    assert_eq!(env.attempts, 0);
    assert_eq!(env.next_attempt, None);
    assert!(spool.ids(State::Incoming).unwrap().is_empty(), "no report");
}

/// The one report queued in incoming/: its envelope and text.
fn only_report(spool: &Spool) -> (Envelope, String) {
    let ids = spool.ids(State::Incoming).unwrap();
    assert_eq!(ids.len(), 1, "one report queued");
    let env = spool.read_envelope(State::Incoming, &ids[0]).unwrap();
    let mut text = String::new();
    use std::io::Read;
    crate::spool::msgfile::open_message(&spool.msg_path(State::Incoming, &ids[0]), env.size)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    (env, text)
}

fn remove_reports(spool: &Spool) {
    for id in spool.ids(State::Incoming).unwrap() {
        spool.delete(&id).unwrap();
    }
}

#[tokio::test]
async fn transient_past_lifetime_fails() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = claimed(&spool, &["x@x.test"]).await;
    let mut env = spool.read_envelope(State::Active, &id).unwrap();
    env.received_at -= 86400;
    spool.write_envelope(State::Active, &env).unwrap();
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![Outcome::Transient {
            reason: "421 4.3.2 busy".into(),
        }]),
        asked: Mutex::new(vec![]),
    });
    assert_eq!(
        worker::attempt(&spool, &id, Some(t), POLICY, "relay.test")
            .await
            .unwrap()
            .next,
        Next::Failed
    );
    let env = spool.read_envelope(State::Failed, &id).unwrap();
    assert!(env.last_error.unwrap().contains("421 4.3.2 busy"));
    let (_, report) = only_report(&spool);
    assert!(
        report.contains("Status: 4.4.7") && report.contains("max_lifetime"),
        "{report}"
    );
}

/// The whole scheduler with a scripted transport: a mailbox whose configuration is broken is
/// paused (its messages held without spending retries), probed every `hold_retry`, and
/// released as a whole once a probe gets through.
#[tokio::test(flavor = "multi_thread")]
async fn held_mailbox_is_paused_probed_and_released() {
    use std::collections::HashMap;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::{Forwarder, Kick, Plan};

    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::config::load_str(
        &format!(
            "spool_dir = \"{0}/spool\"\nstate_dir = \"{0}/state\"\n[delivery]\nhold_retry = \"1s\"\nretry_initial = \"1s\"\n[listener.l]\naddress = \"127.0.0.1:0\"\n[route.r]\nsenders = [\"*\"]\ntransport = \"file\"\ndir = \"{0}/out\"\n",
            dir.path().display()
        ),
        "<test>",
    )
    .unwrap();
    let spool = Spool::open_exclusive(&cfg.spool_dir).unwrap();
    let held = || Outcome::held("AADSTS7000222: the client secret expired");
    let sent = || Outcome::Sent {
        relay: "r".into(),
        reply: "250 ok".into(),
        recipients: vec![rcpt("x@x.test", RcptStatus::Sent, "250 ok")],
    };
    // First attempt held, first probe held, second probe (after the "fix") sent, then the rest.
    let t = Arc::new(Scripted {
        outcomes: Mutex::new(vec![held(), held(), sent(), sent(), sent()]),
        asked: Mutex::new(vec![]),
    });
    let mut routes: HashMap<String, Arc<dyn Transport>> = HashMap::new();
    routes.insert("r".into(), t.clone());
    let plan = Plan {
        routes,
        config: Arc::new(cfg),
    };
    let (_tx, rx) = watch::channel(plan);
    let shutdown = CancellationToken::new();
    let new_ids = spool.take_new_messages().unwrap();
    let fwd = tokio::spawn(
        Forwarder::new(
            spool.clone(),
            rx,
            new_ids,
            Kick::default(),
            shutdown.clone(),
        )
        .run(),
    );

    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut d = spool.begin().await.unwrap();
        ids.push(d.id().to_string());
        d.write(b"Subject: t\r\n\r\nx\r\n").await.unwrap();
        let mut env = spool_envelope();
        env.route = "r".into();
        d.commit(env).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // All three end up held by postern, none with an attempt spent.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.ids(State::Hold).unwrap().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        let env = spool.read_envelope(State::Hold, id).unwrap();
        assert!(env.auto_hold && env.attempts == 0, "{env:?}");
        assert!(env.hold_reason.unwrap().contains("AADSTS7000222"));
    }
    assert_eq!(
        t.asked.lock().unwrap().len(),
        1,
        "only one attempt before the mailbox paused"
    );
    // Probes every second: the first is held again, the second gets through and releases all.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !spool.list().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        spool.list().unwrap().is_empty(),
        "all delivered: {:?}",
        spool
            .list()
            .unwrap()
            .iter()
            .map(|l| l.state)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        t.asked.lock().unwrap().len(),
        5,
        "1 attempt + 2 probes + 2 released"
    );
    shutdown.cancel();
    fwd.await.unwrap();
}

fn spool_envelope() -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        id: String::new(),
        received_at: now_secs(),
        sender: "a@example.com".into(),
        recipients: vec![Recipient {
            address: "x@x.test".into(),
            status: RcptStatus::Pending,
            last_reply: None,
        }],
        client_addr: "127.0.0.1:1".into(),
        client_helo: "t".into(),
        auth_user: None,
        listener: "l".into(),
        route: "r".into(),
        mailbox: "a@example.com".into(),
        size: 0,
        body_8bit: false,
        smtputf8: false,
        attempts: 0,
        next_attempt: None,
        last_error: None,
        hold_reason: None,
        auto_hold: false,
        graph: None,
    }
}
