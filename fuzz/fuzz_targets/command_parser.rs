//! Fuzz the command parser, and a session fed whatever lines it produces: neither may panic,
//! and every reply must be a well-formed SMTP reply.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use postern::config::{
    AddressPattern, AuthMode, BareLfPolicy, Config, DeliveryConfig, GlobalLimits, ListenerConfig,
    RouteConfig, TlsMode, TransportConfig,
};
use postern::smtp::command;
use postern::smtp::data::DataOutcome;
use postern::smtp::reply::Reply;
use postern::smtp::session::{AuthResult, Finish, Session, SessionParams, Step};

fn config() -> Config {
    let listener = ListenerConfig {
        name: "fuzz".into(),
        address: "127.0.0.1:2525".parse().unwrap(),
        tls: TlsMode::StartTls,
        tls_files: None,
        auth: AuthMode::Optional,
        allow_networks: vec!["0.0.0.0/0".parse().unwrap()],
        max_message_size: 1000,
        max_recipients: 5,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(300),
        session_timeout: Duration::from_secs(3600),
        max_errors: 10,
        bare_lf: BareLfPolicy::Normalize,
    };
    Config {
        source: "fuzz.toml".into(),
        hostname: "mx.fuzz".into(),
        spool_dir: "/nonexistent".into(),
        state_dir: "/nonexistent".into(),
        limits: GlobalLimits {
            max_connections: 10,
            max_connections_per_ip: 10,
            min_free_disk: 0,
            auth_max_failures: 5,
            auth_lockout: Duration::from_secs(600),
        },
        listeners: vec![listener],
        users: vec![],
        routes: vec![RouteConfig {
            name: "r".into(),
            senders: vec![AddressPattern::parse("*@example.com").unwrap()],
            mailbox: None,
            transport: TransportConfig::File {
                dir: "/nonexistent".into(),
            },
        }],
        delivery: DeliveryConfig {
            max_concurrency: 1,
            per_mailbox_concurrency: 1,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
            max_lifetime: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
        },
    }
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
        config: Arc::new(cfg),
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
