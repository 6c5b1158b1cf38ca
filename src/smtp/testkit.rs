//! Test support for the smtp module: a typed `Config` built in code, users with cheap argon2
//! hashes, and an in-memory [`MessageSink`] test double with switchable failures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::config::{
    AddressPattern, AuthMode, BareLfPolicy, Config, DeliveryConfig, GlobalLimits, ListenerConfig,
    RouteConfig, TlsMode, TransportConfig, UserConfig,
};
use crate::spool::{Envelope, SpoolError};

use super::{MessageDraft, MessageSink};

/// An argon2id PHC string with cheap parameters.
pub fn hash(password: &str) -> String {
    let params = Params::new(8, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"postern-test-salt").unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// A user with a cheap hash of `password`.
pub fn user(name: &str, password: &str, may_send_as: &[&str]) -> UserConfig {
    UserConfig {
        name: name.into(),
        password_hash: hash(password),
        may_send_as: may_send_as
            .iter()
            .map(|p| AddressPattern::parse(p).unwrap())
            .collect(),
    }
}

/// The listener used in tests: loopback + 192.0.2.0/24 allowed, AUTH optional, small limits.
pub fn listener() -> ListenerConfig {
    ListenerConfig {
        name: "test".into(),
        address: "127.0.0.1:2525".parse().unwrap(),
        tls: TlsMode::None,
        tls_files: None,
        auth: AuthMode::Optional,
        allow_networks: vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ],
        max_message_size: 10_000,
        max_recipients: 3,
        command_timeout: Duration::from_secs(300),
        data_timeout: Duration::from_secs(600),
        min_data_rate: 0,
        session_timeout: Duration::from_secs(3600),
        max_errors: 10,
        bare_lf: BareLfPolicy::Normalize,
    }
}

/// A config with routes `office` (`*@example.com` as relay@example.com) and `own`
/// (`*@example.org` as the sender itself), and user `scanner` (password `s3cret`).
pub fn config() -> Config {
    config_with_users(vec![user("scanner", "s3cret", &["scanner@example.com"])])
}

/// [`config`] with other users.
pub fn config_with_users(users: Vec<UserConfig>) -> Config {
    let route = |name: &str, pattern: &str, mailbox: Option<&str>| RouteConfig {
        name: name.into(),
        senders: vec![AddressPattern::parse(pattern).unwrap()],
        mailbox: mailbox.map(Into::into),
        transport: TransportConfig::File {
            dir: PathBuf::from("/nonexistent"),
        },
        pacing: Default::default(),
    };
    Config {
        source: "test.toml".into(),
        hostname: "mx.test".into(),
        spool_dir: PathBuf::from("/nonexistent/spool"),
        state_dir: PathBuf::from("/nonexistent/state"),
        limits: GlobalLimits {
            max_connections: 10,
            max_connections_per_ip: 5,
            max_unauthenticated_per_ip: 3,
            message_memory: 1 << 20,
            min_free_disk: 0,
            auth_max_failures: 5,
            auth_lockout: Duration::from_secs(600),
        },
        listeners: vec![listener()],
        users,
        routes: vec![
            route("office", "*@example.com", Some("relay@example.com")),
            route("own", "*@example.org", None),
        ],
        accounts: vec![],
        delivery: DeliveryConfig {
            max_concurrency: 1,
            per_mailbox_concurrency: 1,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(86400),
            shutdown_grace: Duration::from_secs(5),
            hold_retry: Duration::from_secs(300),
            connection_idle_timeout: Duration::from_secs(60),
        },
        admin: None,
    }
}

/// A loopback client address.
pub fn loopback() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// A non-loopback client address inside `allow_networks`.
pub fn lan() -> SocketAddr {
    "192.0.2.10:40000".parse().unwrap()
}

#[derive(Default)]
struct MemState {
    committed: Mutex<Vec<(Envelope, Vec<u8>)>>,
    discarded: AtomicU32,
    next_id: AtomicU32,
    fail_begin: AtomicBool,
    fail_write: AtomicBool,
    fail_commit: AtomicBool,
    no_room: AtomicBool,
}

/// In-memory sink: committed messages are kept with their envelope.
#[derive(Clone, Default)]
pub struct MemSink {
    state: Arc<MemState>,
}

fn io_err(op: &'static str) -> SpoolError {
    SpoolError::Io {
        op,
        path: PathBuf::from("/mem"),
        source: std::io::Error::other("injected failure"),
    }
}

impl MemSink {
    /// Committed messages so far.
    pub fn committed(&self) -> Vec<(Envelope, Vec<u8>)> {
        self.state.committed.lock().unwrap().clone()
    }
    /// Drafts discarded so far.
    pub fn discarded(&self) -> u32 {
        self.state.discarded.load(Ordering::SeqCst)
    }
    /// Make `begin` fail.
    pub fn fail_begin(&self, v: bool) {
        self.state.fail_begin.store(v, Ordering::SeqCst);
    }
    /// Make `write` fail.
    pub fn fail_write(&self, v: bool) {
        self.state.fail_write.store(v, Ordering::SeqCst);
    }
    /// Make `commit` fail.
    pub fn fail_commit(&self, v: bool) {
        self.state.fail_commit.store(v, Ordering::SeqCst);
    }
    /// Make `has_room` say no.
    pub fn no_room(&self, v: bool) {
        self.state.no_room.store(v, Ordering::SeqCst);
    }
}

/// A draft of [`MemSink`].
pub struct MemDraft {
    id: String,
    buf: Vec<u8>,
    state: Arc<MemState>,
}

impl MessageSink for MemSink {
    type Draft = MemDraft;

    fn has_room(&self, _size: u64) -> bool {
        !self.state.no_room.load(Ordering::SeqCst)
    }

    async fn begin(&self) -> Result<MemDraft, SpoolError> {
        if self.state.fail_begin.load(Ordering::SeqCst) {
            return Err(io_err("begin"));
        }
        let n = self.state.next_id.fetch_add(1, Ordering::SeqCst);
        Ok(MemDraft {
            id: format!("Q{n:04}"),
            buf: Vec::new(),
            state: self.state.clone(),
        })
    }
}

impl MessageDraft for MemDraft {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        if self.state.fail_write.load(Ordering::SeqCst) {
            return Err(io_err("write"));
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    async fn commit(self, envelope: Envelope) -> Result<(), SpoolError> {
        if self.state.fail_commit.load(Ordering::SeqCst) {
            self.state.discarded.fetch_add(1, Ordering::SeqCst);
            return Err(io_err("commit"));
        }
        self.state
            .committed
            .lock()
            .unwrap()
            .push((envelope, self.buf));
        Ok(())
    }

    async fn discard(self) {
        self.state.discarded.fetch_add(1, Ordering::SeqCst);
    }
}
