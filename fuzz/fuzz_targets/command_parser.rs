//! Fuzz the command parser, and a session fed whatever lines it produces: neither may panic,
//! and every reply must be a well-formed SMTP reply.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use postern::config::Config;
use postern::smtp::command;
use postern::smtp::data::DataOutcome;
use postern::smtp::reply::Reply;
use postern::smtp::session::{AuthResult, Finish, Session, SessionParams, Step};

/// Tables after `postern_fuzz`'s common top.
const CONFIG: &str = r#"
[listener.fuzz]
address = "127.0.0.1:2525"
auth = "optional"
allow_networks = ["127.0.0.0/8"]
max_message_size = 1000
max_recipients = 5

[user.scanner]
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$cG9zdGVybi10ZXN0LXNhbHQ$vQHoBfYySye3Ul3+1wE9tIiPw+P/TYI5Er0b+aERM6c"
may_send_as = ["*@example.com"]

[route.r]
senders = ["*@example.com"]
transport = "file"
dir = "/nonexistent"
"#;

fn config() -> Arc<Config> {
    static CONFIG_ONCE: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG_ONCE
        .get_or_init(|| Arc::new(postern_fuzz::config(CONFIG)))
        .clone()
}

fn check(r: &Reply) {
    assert!((200..600).contains(&r.code), "{r:?}");
    let wire = r.to_bytes();
    assert!(wire.ends_with(b"\r\n"));
    for line in wire.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() <= 512, "reply line too long");
        assert!(
            !line[..line.len() - 1].contains(&b'\r'),
            "CR inside a reply line"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = command::parse(data);

    let cfg = config();
    let mut s = Session::new(SessionParams {
        listener: cfg.listeners[0].clone(),
        config: cfg,
        client: "127.0.0.1:1".parse().unwrap(),
        tls_active: false,
        starttls: true,
    });
    for line in data.split_inclusive(|&b| b == b'\n') {
        let step = if s.expects_auth_line() {
            s.auth_line(line)
        } else {
            s.handle(command::parse(line), &|n| n < 500)
        };
        match step {
            Step::Reply(r) | Step::Challenge(r) | Step::SkipBdat { reply: r, .. } => check(&r),
            Step::Quit(r) | Step::Drop(r) => {
                check(&r);
                return;
            }
            Step::StartTls(r) => {
                check(&r);
                s.tls_started();
            }
            Step::Verify(_) => check(&s.auth_result(AuthResult::Failed)),
            Step::Data => {
                let h = s.received_header("Q1", 0);
                assert!(h.ends_with("\r\n") && h.matches("\r\n").count() <= 4);
                match s.finish_data(&DataOutcome::default(), "Q1", 10, 0) {
                    Finish::Commit(env) => assert!(!env.recipients.is_empty()),
                    Finish::Reject(r) => check(&r),
                }
            }
            Step::Bdat { size, last } => {
                if last {
                    let _ = s.finish_data(
                        &DataOutcome {
                            size,
                            ..Default::default()
                        },
                        "Q1",
                        size,
                        0,
                    );
                } else {
                    check(&s.chunk_done(size));
                }
            }
        }
    }
});
