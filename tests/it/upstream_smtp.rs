//! The Exchange Online SMTP transport against the fake Exchange (library level, with an
//! in-test token source): delivery byte for byte, STARTTLS and certificate checks, every
//! classified reply, per-recipient results, token errors, the concurrency limit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern::config::{AccountConfig, Cloud, Credential, SecretSource, SecretStyle};
use postern::secret::Secret;
use postern::spool::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient};
use postern::token::{AccessToken, Audience, TokenError, TokenSource};
use postern::upstream::smtp::{ReuseSettings, SmtpTransport, Timeouts};
use postern::upstream::{BoxFuture, HoldScope, Outcome, Outgoing, RcptResult, Transport};

use crate::fake::exchange::{AuthFailure, FakeExchange, Script, replies};

const MAILBOX: &str = "printer@contoso.com";
const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake-token-for-printer";

/// Tokens per mailbox, or an error; counts calls. `renewal`, when set, is what `renew`
/// hands out (once) after a refusal.
#[derive(Default)]
struct Tokens {
    map: Mutex<HashMap<String, Result<String, TokenError>>>,
    calls: Mutex<Vec<(String, String, Audience)>>,
    renewal: Mutex<Option<String>>,
    renewed: Mutex<Vec<String>>,
}

impl Tokens {
    fn with(mailbox: &str, token: Result<&str, TokenError>) -> Arc<Tokens> {
        let t = Tokens::default();
        t.map
            .lock()
            .unwrap()
            .insert(mailbox.into(), token.map(str::to_string));
        Arc::new(t)
    }
}

impl TokenSource for Tokens {
    fn token<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
    ) -> BoxFuture<'a, Result<AccessToken, TokenError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push((account.into(), mailbox.into(), audience));
            match self.map.lock().unwrap().get(mailbox) {
                Some(Ok(t)) => Ok(AccessToken {
                    token: Secret::new(t.clone()),
                    expires_at: u64::MAX,
                }),
                Some(Err(e)) => Err(e.clone()),
                None => Err(TokenError::local(
                    "test",
                    mailbox,
                    format!("no token for {mailbox}"),
                    "script one in the test".into(),
                )),
            }
        })
    }

    fn renew<'a>(
        &'a self,
        _account: &'a str,
        _mailbox: &'a str,
        _audience: Audience,
        refused: &'a AccessToken,
    ) -> BoxFuture<'a, Result<Option<AccessToken>, TokenError>> {
        Box::pin(async move {
            self.renewed
                .lock()
                .unwrap()
                .push(refused.token.expose().clone());
            Ok(self.renewal.lock().unwrap().take().map(|t| AccessToken {
                token: Secret::new(t),
                expires_at: u64::MAX,
            }))
        })
    }
}

fn account(port: u16, ca_file: Option<&Path>) -> AccountConfig {
    let mut endpoints = Cloud::Global.endpoints("contoso.com");
    endpoints.smtp_host = "localhost".into();
    endpoints.smtp_port = port;
    AccountConfig {
        name: "contoso".into(),
        tenant: "contoso.com".into(),
        client_id: "11111111-2222-3333-4444-555555555555".into(),
        cloud: Cloud::Global,
        endpoints,
        ca_file: ca_file.map(Path::to_path_buf),
        proxy: None,
        credential: Credential::ClientSecret {
            secret: SecretSource::Inline(Secret::new("s".into())),
            style: SecretStyle::Body,
            expires: None,
        },
    }
}

fn transport(fake: &FakeExchange, tokens: Arc<Tokens>) -> SmtpTransport {
    SmtpTransport::new(
        &account(fake.addr().port(), Some(fake.ca_pem())),
        tokens,
        "relay.test".into(),
    )
    .expect("transport")
    .with_timeouts(short())
}

fn short() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(5),
        data_block: Duration::from_secs(10),
        data_end: Duration::from_secs(10),
    }
}

/// A spooled message in a temp dir.
struct Msg {
    _dir: tempfile::TempDir,
    out: Outgoing,
}

fn message(sender: &str, rcpts: &[(&str, RcptStatus)], body: &[u8]) -> Msg {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("message.eml");
    std::fs::write(&path, body).unwrap();
    let envelope = Envelope {
        version: ENVELOPE_VERSION,
        id: "0123456789AB".into(),
        received_at: 1_700_000_000,
        sender: sender.into(),
        recipients: rcpts
            .iter()
            .map(|(a, s)| Recipient {
                address: (*a).into(),
                status: *s,
                last_reply: None,
            })
            .collect(),
        client_addr: "192.0.2.10:40000".into(),
        client_helo: "printer".into(),
        auth_user: None,
        listener: "local".into(),
        route: "default".into(),
        mailbox: MAILBOX.into(),
        size: body.len() as u64,
        body_8bit: false,
        smtputf8: false,
        attempts: 0,
        next_attempt: None,
        last_error: None,
        hold_reason: None,
        auto_hold: false,
        graph: None,
    };
    Msg {
        _dir: dir,
        out: Outgoing::new(envelope, path),
    }
}

fn simple(rcpts: &[&str]) -> Msg {
    let list: Vec<(&str, RcptStatus)> = rcpts.iter().map(|a| (*a, RcptStatus::Pending)).collect();
    message(
        MAILBOX,
        &list,
        b"From: Printer <printer@contoso.com>\r\nTo: a@example.org\r\nSubject: scan\r\n\r\nhello\r\n",
    )
}

fn fake() -> Script {
    Script::new().token(MAILBOX, TOKEN)
}

/// No outcome text ever carries the token or the SASL string.
fn assert_no_secret(o: &Outcome) {
    let text = format!("{o:?}");
    let sasl = postern::upstream::smtp::xoauth2_sasl(MAILBOX, TOKEN);
    assert!(!text.contains(TOKEN), "token in {text}");
    assert!(!text.contains(sasl.expose().as_str()), "SASL in {text}");
    assert!(!text.contains("fake-token"), "token in {text}");
}

fn held(o: &Outcome) -> &str {
    assert_no_secret(o);
    match o {
        Outcome::Held { reason, .. } => reason,
        other => panic!("expected Held, got {other:?}"),
    }
}

fn throttled(o: &Outcome) -> &str {
    match o {
        Outcome::Throttled { reason, .. } => reason,
        other => panic!("expected Throttled, got {other:?}"),
    }
}

fn transient(o: &Outcome) -> &str {
    assert_no_secret(o);
    match o {
        Outcome::Transient { reason } => reason,
        other => panic!("expected Transient, got {other:?}"),
    }
}

fn permanent(o: &Outcome) -> &str {
    assert_no_secret(o);
    match o {
        Outcome::Permanent { reason } => reason,
        other => panic!("expected Permanent, got {other:?}"),
    }
}

fn sent(o: &Outcome) -> (&str, &[RcptResult]) {
    assert_no_secret(o);
    match o {
        Outcome::Sent {
            reply, recipients, ..
        } => (reply, recipients),
        other => panic!("expected Sent, got {other:?}"),
    }
}

#[tokio::test]
async fn delivers_byte_for_byte_with_dot_lines() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let body: &[u8] = b"From: printer@contoso.com\r\nTo: a@example.org\r\nSubject: dots\r\n\r\n.\r\n.hidden line\r\n..two dots\r\nmiddle . dot\r\n.\r\nlast line\r\n";
    let m = message(
        MAILBOX,
        &[
            ("a@example.org", RcptStatus::Pending),
            ("b@example.org", RcptStatus::Pending),
        ],
        body,
    );
    let o = t.send(&m.out).await;
    let (reply, rcpts) = sent(&o);
    assert!(reply.starts_with("250 2.6.0 <"), "{reply}");
    assert!(reply.ends_with("Queued mail for delivery"), "{reply}");
    assert_eq!(rcpts.len(), 2);
    assert!(
        rcpts
            .iter()
            .all(|r| r.status == RcptStatus::Sent && r.reply == reply)
    );

    let got = fake.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, body, "message bytes must arrive unchanged");
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpt_to, ["a@example.org", "b@example.org"]);
    assert_eq!(got[0].mail_params, [format!("SIZE={}", body.len())]);

    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert!(s.tls);
    assert_eq!(s.commands[0], "EHLO relay.test");
    assert_eq!(s.commands[1], "STARTTLS");
    assert_eq!(s.commands[2], "EHLO relay.test");
    assert!(
        s.commands[3].starts_with("AUTH XOAUTH2 "),
        "inline, uppercase"
    );
    assert_eq!(s.commands.last().unwrap(), "QUIT");
    assert_eq!(s.auths.len(), 1);
    assert_eq!(s.auths[0].user, MAILBOX);
    assert_eq!(s.auths[0].token, TOKEN);
    assert!(!s.auths[0].two_step);
    // Exchange offers CHUNKING: one BDAT with the bytes as they are, no DATA.
    assert!(got[0].bdat);
    assert!(
        s.commands.contains(&format!("BDAT {} LAST", body.len())),
        "{:?}",
        s.commands
    );
    assert!(!s.commands.iter().any(|c| c == "DATA"));
}

#[tokio::test]
async fn without_chunking_data_is_dot_stuffed_and_arrives_unchanged() {
    let mut script = fake();
    script.chunking = false;
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let body: &[u8] = b"From: printer@contoso.com\r\nSubject: dots\r\n\r\n.\r\n.hidden line\r\n..two dots\r\n.\r\nlast line\r\n";
    let m = message(MAILBOX, &[("a@example.org", RcptStatus::Pending)], body);
    sent(&t.send(&m.out).await);
    let got = fake.delivered();
    assert_eq!(got[0].data, body);
    assert!(!got[0].bdat);
    let s = &fake.sessions()[0];
    assert!(s.commands.iter().any(|c| c == "DATA"), "{:?}", s.commands);
    assert!(!s.commands.iter().any(|c| c.starts_with("BDAT")));
}

#[tokio::test]
async fn a_kept_connection_carries_the_next_message_after_rset() {
    // The first message's only recipient is refused: MAIL was accepted and the BDAT
    // pipelined behind the RCPT refused (no recipient), so the transaction is reset before
    // the connection carries the next one.
    let fake = fake()
        .rcpt_reply(
            "nobody@example.org",
            crate::fake::exchange::replies::RECIPIENT_NOT_FOUND,
        )
        .start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN))).with_reuse(ReuseSettings::default());
    let o = t.send(&simple(&["nobody@example.org"]).out).await;
    assert_eq!(sent(&o).1[0].status, RcptStatus::Failed);
    sent(&t.send(&simple(&["a@example.org"]).out).await);
    sent(&t.send(&simple(&["b@example.org"]).out).await);
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1, "one connection for all three");
    let s = &sessions[0];
    assert_eq!(s.auths.len(), 1, "one AUTH");
    let verbs: Vec<&str> = s
        .commands
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap_or(""))
        .filter(|v| ["MAIL", "RSET", "BDAT"].contains(v))
        .collect();
    assert_eq!(
        verbs,
        ["MAIL", "BDAT", "RSET", "MAIL", "BDAT", "MAIL", "BDAT"]
    );
    assert_eq!(fake.delivered().len(), 2);
    assert_eq!(fake.active(MAILBOX), 1, "kept open for the next message");
    drop(t);
    // Dropping the transport closes its kept connections politely.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.active(MAILBOX) > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.sessions()[0].commands.last().unwrap(), "QUIT");
}

#[tokio::test]
async fn a_kept_connection_is_not_used_with_another_token() {
    let fake = fake().start();
    let tokens = Tokens::with(MAILBOX, Ok(TOKEN));
    let t = transport(&fake, tokens.clone()).with_reuse(ReuseSettings::default());
    sent(&t.send(&simple(&["a@example.org"]).out).await);
    // The token store now hands out another token (refreshed ahead of expiry).
    tokens
        .map
        .lock()
        .unwrap()
        .insert(MAILBOX.into(), Ok("second-token".into()));
    fake.update(|s| {
        s.tokens.insert(MAILBOX.into(), "second-token".into());
    });
    sent(&t.send(&simple(&["a@example.org"]).out).await);
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 2, "a new connection for the new token");
    assert_eq!(sessions[1].auths[0].token, "second-token");
    // The old one was closed, not left open.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.sessions()[0].closed_at.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.sessions()[0].commands.last().unwrap(), "QUIT");
}

#[tokio::test]
async fn twenty_megabytes_arrive_identical() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let mut body = b"From: printer@contoso.com\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while body.len() < 20 * 1024 * 1024 {
        // Every 7th line starts with a dot, every 11th is a lone dot.
        match i % 77 {
            n if n % 11 == 0 => body.extend_from_slice(b".\r\n"),
            n if n % 7 == 0 => body.extend_from_slice(format!(".line {i}\r\n").as_bytes()),
            _ => body.extend_from_slice(
                format!(
                    "line {i} ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789\r\n"
                )
                .as_bytes(),
            ),
        }
        i += 1;
    }
    let m = message(MAILBOX, &[("a@example.org", RcptStatus::Pending)], &body);
    let o = t.send(&m.out).await;
    sent(&o);
    let got = fake.delivered();
    assert_eq!(got.len(), 1);
    assert!(got[0].data == body, "20 MB message differs");
}

#[tokio::test]
async fn only_the_message_part_of_the_queue_file_is_sent() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let body: &[u8] = b"From: printer@contoso.com\r\n\r\nbody\r\n";
    let m = simple(&["a@example.org"]);
    // The spool appends its envelope trailers after the message bytes.
    let mut file = body.to_vec();
    file.extend_from_slice(b"{\"version\":1}\n0000000013POSTERN1\n");
    std::fs::write(&m.out.message, &file).unwrap();
    let mut out = m.out.clone();
    out.envelope.size = body.len() as u64;
    sent(&t.send(&out).await);
    assert_eq!(fake.delivered()[0].data, body);
    assert_eq!(
        fake.delivered()[0].mail_params,
        [format!("SIZE={}", body.len())]
    );

    // A queue file shorter than the envelope says is never sent truncated.
    out.envelope.size = file.len() as u64 + 1;
    let reason = transient(&t.send(&out).await).to_string();
    assert!(
        reason.contains("not sending a truncated message"),
        "{reason}"
    );
    assert_eq!(fake.messages().len(), 1);
}

#[tokio::test]
async fn already_sent_recipients_are_not_sent_again() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let m = message(
        MAILBOX,
        &[
            ("done@example.org", RcptStatus::Sent),
            ("gone@example.org", RcptStatus::Failed),
            ("next@example.org", RcptStatus::Pending),
        ],
        b"From: printer@contoso.com\r\n\r\nx\r\n",
    );
    let o = t.send(&m.out).await;
    let (_, rcpts) = sent(&o);
    assert_eq!(rcpts.len(), 1);
    assert_eq!(rcpts[0].address, "next@example.org");
    assert_eq!(fake.delivered()[0].rcpt_to, ["next@example.org"]);
}

#[tokio::test]
async fn mixed_recipient_results() {
    let fake = fake()
        .rcpt_reply("nobody@contoso.com", replies::RECIPIENT_NOT_FOUND)
        .rcpt_reply("later@example.org", replies::TEMPORARY)
        .start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let m = simple(&["a@example.org", "nobody@contoso.com", "later@example.org"]);
    let o = t.send(&m.out).await;
    let (reply, rcpts) = sent(&o);
    let by: HashMap<&str, &RcptResult> = rcpts.iter().map(|r| (r.address.as_str(), r)).collect();
    assert_eq!(by["a@example.org"].status, RcptStatus::Sent);
    assert_eq!(by["a@example.org"].reply, reply);
    assert_eq!(by["nobody@contoso.com"].status, RcptStatus::Failed);
    assert_eq!(by["nobody@contoso.com"].reply, replies::RECIPIENT_NOT_FOUND);
    assert_eq!(by["later@example.org"].status, RcptStatus::Pending);
    assert_eq!(by["later@example.org"].reply, replies::TEMPORARY);
    assert_eq!(fake.delivered()[0].rcpt_to, ["a@example.org"]);
}

#[tokio::test]
async fn without_pipelining_commands_go_one_by_one() {
    let mut script = fake().rcpt_reply("nobody@contoso.com", replies::RECIPIENT_NOT_FOUND);
    script.pipelining = false;
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let m = simple(&["a@example.org", "nobody@contoso.com", "b@example.org"]);
    let o = t.send(&m.out).await;
    let (_, rcpts) = sent(&o);
    let statuses: Vec<RcptStatus> = rcpts.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [RcptStatus::Sent, RcptStatus::Failed, RcptStatus::Sent]
    );
    assert_eq!(
        fake.delivered()[0].rcpt_to,
        ["a@example.org", "b@example.org"]
    );
}

/// Even the client's trace log (every command and reply) never shows the token.
#[tokio::test]
async fn trace_log_never_shows_the_token() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    // Tests in other threads may have registered the transport's log call sites before this
    // subscriber existed, leaving them disabled: once every call site is registered (one
    // warm-up delivery), rebuild their interest, then start recording.
    sent(&t.send(&simple(&["a@example.org"]).out).await);
    tracing::callsite::rebuild_interest_cache();
    buf.0.lock().unwrap().clear();

    fake.update(|s| {
        s.auth_failures
            .insert(MAILBOX.into(), AuthFailure::MailboxDisabled);
    });
    held(&t.send(&simple(&["a@example.org"]).out).await);
    fake.update(|s| s.auth_failures.clear());
    sent(&t.send(&simple(&["a@example.org"]).out).await);

    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    assert!(log.contains("C: AUTH XOAUTH2 [redacted]"), "{log}");
    assert!(
        log.contains("S: 235 2.7.0 Authentication successful"),
        "{log}"
    );
    let sasl = postern::upstream::smtp::xoauth2_sasl(MAILBOX, TOKEN);
    assert!(!log.contains(TOKEN) && !log.contains("fake-token"), "{log}");
    assert!(!log.contains(sasl.expose().as_str()), "{log}");
}

#[tokio::test]
async fn no_recipient_accepted_sends_no_data() {
    let fake = fake()
        .rcpt_reply("nobody@contoso.com", replies::RECIPIENT_NOT_FOUND)
        .start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let m = simple(&["nobody@contoso.com"]);
    let o = t.send(&m.out).await;
    let (reply, rcpts) = sent(&o);
    assert!(reply.contains(replies::RECIPIENT_NOT_FOUND), "{reply}");
    assert_eq!(rcpts[0].status, RcptStatus::Failed);
    assert!(fake.messages().is_empty());
    assert!(!fake.sessions()[0].commands.iter().any(|c| c == "DATA"));
}

#[tokio::test]
async fn starttls_is_required_and_the_token_never_sent_in_clear() {
    let fake = fake().no_starttls().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let o = t.send(&simple(&["a@example.org"]).out).await;
    let reason = held(&o);
    assert!(reason.contains("did not offer STARTTLS"), "{reason}");
    assert!(reason.contains("smtp_port"), "{reason}");
    let s = &fake.sessions()[0];
    assert!(!s.tls);
    assert!(
        !s.commands
            .iter()
            .any(|c| c.to_uppercase().starts_with("AUTH")),
        "{:?}",
        s.commands
    );
    assert!(fake.auths().is_empty());
}

#[tokio::test]
async fn untrusted_certificate_is_held_before_auth() {
    let fake = fake().start();
    // No ca_file: the fake's self-signed certificate is not in the platform's roots.
    let t = SmtpTransport::new(
        &account(fake.addr().port(), None),
        Tokens::with(MAILBOX, Ok(TOKEN)),
        "relay.test".into(),
    )
    .unwrap()
    .with_timeouts(short());
    let o = t.send(&simple(&["a@example.org"]).out).await;
    let reason = held(&o);
    assert!(reason.contains("not trusted"), "{reason}");
    assert!(reason.contains("ca_file"), "{reason}");
    assert!(fake.auths().is_empty());
}

#[tokio::test]
async fn certificate_for_another_name_is_held() {
    let fake = fake().start();
    let mut acc = account(fake.addr().port(), Some(fake.ca_pem()));
    acc.endpoints.smtp_host = "127.0.0.1".into();
    let t = SmtpTransport::new(&acc, Tokens::with(MAILBOX, Ok(TOKEN)), "relay.test".into())
        .unwrap()
        .with_timeouts(short());
    let reason = held(&t.send(&simple(&["a@example.org"]).out).await).to_string();
    assert!(
        reason.contains("not valid for the name \"127.0.0.1\""),
        "{reason}"
    );
    assert!(fake.auths().is_empty());
}

#[tokio::test]
async fn bad_ca_file_fails_construction() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ca.pem");
    std::fs::write(&p, "not a certificate\n").unwrap();
    let e = SmtpTransport::new(
        &account(587, Some(&p)),
        Tokens::with(MAILBOX, Ok(TOKEN)),
        "relay.test".into(),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("ca_file") && text.contains("no certificate"),
        "{text}"
    );
    let e = SmtpTransport::new(
        &account(587, Some(&dir.path().join("missing.pem"))),
        Tokens::with(MAILBOX, Ok(TOKEN)),
        "relay.test".into(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
}

#[tokio::test]
async fn a_refused_token_is_renewed_and_the_message_sent_at_once() {
    let fake = Script::new().token(MAILBOX, "the-new-token").start();
    let tokens = Tokens::with(MAILBOX, Ok(TOKEN));
    *tokens.renewal.lock().unwrap() = Some("the-new-token".into());
    let t = transport(&fake, tokens.clone());
    sent(&t.send(&simple(&["a@example.org"]).out).await);
    assert_eq!(*tokens.renewed.lock().unwrap(), vec![TOKEN.to_string()]);
    let auths = fake.auths();
    assert_eq!(auths.len(), 2, "refused once, then the new token");
    assert!(auths[0].reply.starts_with("535 5.7.3"), "{auths:?}");
    assert!(auths[1].reply.starts_with("235"), "{auths:?}");
    assert_eq!(fake.delivered().len(), 1);
}

#[tokio::test]
async fn rejected_token_is_held_with_the_service_principal_fix() {
    // The source has nothing newer (the refused token was fresh): hold with the advice.
    let fake = Script::new().token(MAILBOX, "another-token").start();
    let tokens = Tokens::with(MAILBOX, Ok(TOKEN));
    let t = transport(&fake, tokens.clone());
    let o = t.send(&simple(&["a@example.org"]).out).await;
    assert_eq!(
        tokens.renewed.lock().unwrap().len(),
        1,
        "asked for a new one"
    );
    assert_eq!(
        fake.auths().len(),
        1,
        "no second sign-in without a new token"
    );
    let reason = held(&o);
    assert!(
        reason.contains(
            "\"535 5.7.3 Authentication unsuccessful [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM "
        ),
        "{reason}"
    );
    assert!(reason.contains("New-ServicePrincipal"), "{reason}");
    assert!(reason.contains("Add-MailboxPermission"), "{reason}");
    assert!(reason.contains("SMTP.SendAsApp"), "{reason}");
    assert!(
        reason.contains("postern queue release 0123456789AB"),
        "{reason}"
    );
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn an_error_challenge_is_answered_with_an_empty_line() {
    let mut script = Script::new().token(MAILBOX, "another-token");
    script.error_challenge = true;
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let reason = held(&t.send(&simple(&["a@example.org"]).out).await).to_string();
    assert!(reason.contains("535 5.7.3"), "{reason}");
    let cmds = &fake.sessions()[0].commands;
    let auth = cmds.iter().position(|c| c.starts_with("AUTH")).unwrap();
    assert_eq!(cmds[auth + 1], "", "empty response after the 334 challenge");
}

#[tokio::test]
async fn smtp_auth_disabled_variants_are_held_with_their_fix() {
    let cases = [
        (
            AuthFailure::TenantDisabled,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [",
            "Set-TransportConfig -SmtpClientAuthenticationDisabled $false",
        ),
        (
            AuthFailure::MailboxDisabled,
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [",
            "Set-CASMailbox -Identity printer@contoso.com -SmtpClientAuthenticationDisabled $false",
        ),
        (
            AuthFailure::ConditionalAccess,
            "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria",
            "Conditional Access",
        ),
        (
            AuthFailure::SecurityDefaults,
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy",
            "Manage security defaults",
        ),
        (
            AuthFailure::BasicDisabled,
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            "XOAUTH2",
        ),
        (
            AuthFailure::Reply(replies::BASIC_NOT_SUPPORTED.into()),
            replies::BASIC_NOT_SUPPORTED,
            "smtp-legacy.office365.com",
        ),
    ];
    for (failure, reply, fix) in cases {
        let fake = fake().auth_failure(MAILBOX, failure.clone()).start();
        let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
        let o = t.send(&simple(&["a@example.org"]).out).await;
        let reason = held(&o);
        assert!(reason.contains(reply), "{failure:?}: {reason}");
        assert!(reason.contains(fix), "{failure:?}: {reason}");
        assert!(fake.messages().is_empty());
    }
}

#[tokio::test]
async fn send_as_denied_after_data_is_held() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let m = message(
        "scanner@contoso.com",
        &[("a@example.org", RcptStatus::Pending)],
        b"From: Scanner <scanner@contoso.com>\r\n\r\nscan\r\n",
    );
    let o = t.send(&m.out).await;
    let Outcome::Held { scope, .. } = &o else {
        panic!("{o:?}")
    };
    assert_eq!(
        *scope,
        HoldScope::Sender("scanner@contoso.com".into()),
        "only this sender's mail is held"
    );
    let reason = held(&o);
    assert!(
        reason.contains("554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as scanner@contoso.com;"),
        "{reason}"
    );
    assert!(
        reason.contains(
            "Add-RecipientPermission -Identity scanner@contoso.com -Trustee printer@contoso.com -AccessRights SendAs"
        ),
        "{reason}"
    );
    assert!(reason.contains("own mailbox"), "{reason}");
    // The refusal came after the whole message, as Exchange does it.
    let msgs = fake.messages();
    assert_eq!(msgs.len(), 1);
    assert!(!msgs[0].accepted());

    // With Send As granted, the same message goes.
    fake.update(|s| {
        s.send_as
            .insert(MAILBOX.into(), vec!["scanner@contoso.com".into()]);
    });
    sent(&t.send(&m.out).await);
}

#[tokio::test]
async fn replies_during_sending_are_classified() {
    struct Case {
        stage: &'static str,
        reply: &'static str,
        kind: &'static str,
        advice: &'static str,
    }
    let cases = [
        Case {
            stage: "mail",
            reply: replies::NO_SEND_AS,
            kind: "held",
            advice: "-AccessRights SendAs",
        },
        Case {
            stage: "mail",
            reply: replies::THROTTLED_SEND_AS,
            kind: "throttled",
            advice: "prolongs",
        },
        Case {
            stage: "data",
            reply: replies::QUOTA,
            kind: "throttled",
            advice: "10,000, rolling",
        },
        Case {
            stage: "data",
            reply: replies::MAILBOX_FULL,
            kind: "held",
            advice: "Sent Items",
        },
        Case {
            stage: "data",
            reply: replies::TEMPORARY,
            kind: "transient",
            advice: "retry",
        },
        Case {
            stage: "mail",
            reply: replies::TEMPORARY,
            kind: "transient",
            advice: "retry",
        },
        Case {
            stage: "data",
            reply: replies::TENANT_THRESHOLD,
            kind: "held",
            advice: "Microsoft support",
        },
        Case {
            stage: "mail",
            reply: replies::IP_BLOCKED,
            kind: "held",
            advice: "IP address",
        },
        Case {
            stage: "mail",
            reply: replies::BAD_OUTBOUND_SENDER,
            kind: "held",
            advice: "Restricted entities",
        },
        Case {
            stage: "data",
            reply: replies::NO_EXTERNAL_FORWARDING,
            kind: "permanent",
            advice: "Automatic forwarding",
        },
        Case {
            stage: "data",
            reply: replies::TERRL,
            kind: "transient",
            advice: "external recipient",
        },
        Case {
            stage: "data",
            reply: "550 5.6.0 Something permanently wrong with the message",
            kind: "permanent",
            advice: "permanently",
        },
    ];
    for c in cases {
        let script = match c.stage {
            "mail" => fake().mail_reply(MAILBOX, c.reply),
            _ => fake().data_end_reply(MAILBOX, c.reply),
        };
        let fake = script.start();
        let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
        let o = t.send(&simple(&["a@example.org"]).out).await;
        let reason = match c.kind {
            "held" => held(&o),
            "transient" => transient(&o),
            "throttled" => throttled(&o),
            _ => permanent(&o),
        };
        assert!(reason.contains(c.reply), "{}: {reason}", c.reply);
        assert!(reason.contains(c.advice), "{}: {reason}", c.reply);
    }
}

#[tokio::test]
async fn old_tls_complaint_is_held() {
    let mut script = fake();
    script.ehlo_after_tls = Some(replies::OLD_TLS.into());
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let reason = held(&t.send(&simple(&["a@example.org"]).out).await).to_string();
    assert!(reason.contains(replies::OLD_TLS), "{reason}");
    assert!(fake.auths().is_empty());
}

#[tokio::test]
async fn sender_quota_throttles_the_mailbox_once_used_up() {
    let mut script = fake();
    script.recipient_quota = 2;
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    sent(
        &t.send(&simple(&["a@example.org", "b@example.org"]).out)
            .await,
    );
    let o = t.send(&simple(&["c@example.org"]).out).await;
    assert!(throttled(&o).contains(replies::QUOTA));
    assert!(
        matches!(o, Outcome::Throttled { wait: None, .. }),
        "waits for the recipient window: {o:?}"
    );
}

#[tokio::test]
async fn recipients_refused_at_rcpt_stay_refused_when_the_message_then_fails() {
    let fake = fake()
        .rcpt_reply("nobody@example.org", replies::RECIPIENT_NOT_FOUND)
        .data_end_reply(MAILBOX, replies::TEMPORARY)
        .start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let o = t
        .send(&simple(&["a@example.org", "nobody@example.org"]).out)
        .await;
    let Outcome::Partial { refused, then } = o else {
        panic!("{o:?}")
    };
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].address, "nobody@example.org");
    assert_eq!(refused[0].status, RcptStatus::Failed);
    assert!(refused[0].reply.contains("5.1.10"));
    assert!(transient(&then).contains(replies::TEMPORARY));
}

#[tokio::test]
async fn a_connection_cut_after_tls_is_told_in_plain_words() {
    let mut script = fake();
    script.drop_after_tls = true;
    let fake = script.start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let reason = transient(&t.send(&simple(&["a@example.org"]).out).await).to_string();
    assert!(
        reason.contains("the server closed the connection while waiting for the reply to EHLO"),
        "{reason}"
    );
    for jargon in ["close_notify", "docs.rs", "http", "peer"] {
        assert!(!reason.contains(jargon), "{jargon} in {reason}");
    }
}

#[tokio::test]
async fn token_errors_map_to_transient_and_held_without_connecting() {
    let fake = fake().start();
    let t = transport(
        &fake,
        Tokens::with(
            MAILBOX,
            Err(TokenError::Transient(
                "HTTP 503 from login.microsoftonline.com".into(),
            )),
        ),
    );
    let o = t.send(&simple(&["a@example.org"]).out).await;
    assert!(transient(&o).contains("HTTP 503"), "{o:?}");

    let tokens = Tokens::with(
        MAILBOX,
        Err(TokenError::local(
            "test",
            MAILBOX,
            "AADSTS7000222: the client secret has expired".into(),
            "create a new one".into(),
        )),
    );
    let t = transport(&fake, tokens.clone());
    let o = t.send(&simple(&["a@example.org"]).out).await;
    let reason = held(&o);
    assert!(reason.contains("AADSTS7000222"), "{reason}");
    assert!(reason.contains(MAILBOX), "{reason}");
    assert_eq!(
        tokens.calls.lock().unwrap()[0],
        ("contoso".to_string(), MAILBOX.to_string(), Audience::Smtp)
    );
    assert!(fake.sessions().is_empty(), "no connection without a token");
}

#[tokio::test]
async fn fourth_concurrent_connection_is_transient() {
    let fake = fake().start();
    let t = Arc::new(transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN))));
    fake.hold_data_end(true);
    let mut first = Vec::new();
    for _ in 0..3 {
        let t = t.clone();
        first.push(tokio::spawn(async move {
            let m = simple(&["a@example.org"]);
            t.send(&m.out).await
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.active(MAILBOX) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "3 sessions never authenticated"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One transport never opens a 4th connection for a mailbox (its pool waits for a free
    // one): another postern, or another program signed in as the mailbox, gets the 432.
    let other = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let o = other.send(&simple(&["a@example.org"]).out).await;
    let reason = transient(&o);
    assert!(reason.contains(replies::CONCURRENT), "{reason}");
    assert!(reason.contains("per_mailbox_concurrency"), "{reason}");
    fake.hold_data_end(false);
    for h in first {
        sent(&h.await.unwrap());
    }
    assert_eq!(fake.delivered().len(), 3);
}

#[tokio::test]
async fn silent_server_times_out_as_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let keep = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let t = SmtpTransport::new(
        &account(port, None),
        Tokens::with(MAILBOX, Ok(TOKEN)),
        "relay.test".into(),
    )
    .unwrap()
    .with_timeouts(Timeouts {
        command: Duration::from_millis(300),
        ..short()
    });
    let o = t.send(&simple(&["a@example.org"]).out).await;
    assert!(transient(&o).contains("the greeting"), "{o:?}");
    keep.abort();
}

#[tokio::test]
async fn refused_connection_is_transient() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut acc = account(port, None);
    acc.endpoints.smtp_host = "127.0.0.1".into();
    let t =
        SmtpTransport::new(&acc, Tokens::with(MAILBOX, Ok(TOKEN)), "relay.test".into()).unwrap();
    let reason = transient(&t.send(&simple(&["a@example.org"]).out).await).to_string();
    assert!(reason.contains("cannot connect to 127.0.0.1:"), "{reason}");
}

#[tokio::test]
async fn eight_bit_and_smtputf8_are_declared() {
    let fake = fake().start();
    let t = transport(&fake, Tokens::with(MAILBOX, Ok(TOKEN)));
    let mut m = message(
        MAILBOX,
        &[("jörg@example.org", RcptStatus::Pending)],
        "From: printer@contoso.com\r\n\r\nGrüße\r\n".as_bytes(),
    );
    m.out.envelope.body_8bit = true;
    m.out.envelope.smtputf8 = true;
    sent(&t.send(&m.out).await);
    let d = &fake.delivered()[0];
    assert!(
        d.mail_params.contains(&"BODY=8BITMIME".to_string()),
        "{:?}",
        d.mail_params
    );
    assert!(
        d.mail_params.contains(&"SMTPUTF8".to_string()),
        "{:?}",
        d.mail_params
    );
    assert_eq!(d.rcpt_to, ["jörg@example.org"]);
}

/// The fake itself: the two-step XOAUTH2 form (`AUTH XOAUTH2`, `334 `, then the string) and
/// lowercase mechanism names work, as they do against Exchange.
#[tokio::test]
async fn fake_accepts_two_step_xoauth2() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let fake = fake().start();
    let tcp = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let mut io = BufReader::new(tcp);
    async fn reply<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        io: &mut BufReader<S>,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            io.read_line(&mut l).await.unwrap();
            let l = l.trim_end_matches(['\r', '\n']).to_string();
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l);
            if last {
                return lines;
            }
        }
    }
    let banner = reply(&mut io).await;
    assert!(
        banner[0].starts_with(
            "220 SY5P282CA0097.outlook.office365.com Microsoft ESMTP MAIL Service ready at "
        ),
        "{banner:?}"
    );
    io.write_all(b"EHLO me\r\n").await.unwrap();
    let ehlo = reply(&mut io).await;
    assert!(ehlo.contains(&"250-STARTTLS".to_string()));
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")));
    io.write_all(b"AUTH XOAUTH2\r\n").await.unwrap();
    assert_eq!(
        reply(&mut io).await,
        ["504 5.7.4 Unrecognized authentication type"]
    );
    io.write_all(b"STARTTLS\r\n").await.unwrap();
    assert_eq!(reply(&mut io).await, ["220 2.0.0 SMTP server ready"]);

    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_file_iter(fake.ca_pem()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), io.into_inner())
        .await
        .unwrap();
    let mut io = BufReader::new(tls);
    io.write_all(b"EHLO me\r\n").await.unwrap();
    let ehlo = reply(&mut io).await;
    assert!(
        ehlo.contains(&"250-AUTH LOGIN XOAUTH2".to_string()),
        "{ehlo:?}"
    );
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    io.write_all(b"auth xoauth2\r\n").await.unwrap();
    assert_eq!(reply(&mut io).await, ["334 "]);
    let sasl = postern::upstream::smtp::xoauth2_sasl(MAILBOX, TOKEN);
    io.write_all(format!("{}\r\n", sasl.expose()).as_bytes())
        .await
        .unwrap();
    assert_eq!(
        reply(&mut io).await,
        ["235 2.7.0 Authentication successful"]
    );
    io.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(
        reply(&mut io).await,
        ["221 2.0.0 Service closing transmission channel"]
    );
    let a = &fake.auths()[0];
    assert!(a.two_step);
    assert_eq!(a.mechanism, "xoauth2");
    assert_eq!((a.user.as_str(), a.token.as_str()), (MAILBOX, TOKEN));
}

/// The fake also serves synchronous tests (end-to-end tests with the real binary).
#[test]
fn fake_runs_without_a_caller_runtime() {
    let fake = FakeExchange::start();
    let mut s = std::net::TcpStream::connect(fake.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    let banner = String::from_utf8_lossy(&buf[..n]);
    // 220 <host> Microsoft ESMTP MAIL Service ready at Sun, 23 Nov 2025 11:12:20 +0000 [08DE2A6028D26C22]
    let rest = banner
        .strip_prefix(
            "220 SY5P282CA0097.outlook.office365.com Microsoft ESMTP MAIL Service ready at ",
        )
        .unwrap();
    let (date, id) = rest.trim_end().rsplit_once(" [").unwrap();
    assert!(date.ends_with(" +0000") && date.len() == 31, "{date}");
    assert!(id.len() == 17 && id.ends_with(']'), "{id}");
    assert!(banner.ends_with("]\r\n"));
}
