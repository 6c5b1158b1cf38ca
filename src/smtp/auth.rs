//! Local AUTH: SASL PLAIN/LOGIN decoding, argon2 password checks and the brute-force guard.
//!
//! Passwords are never logged; decoded credentials live in [`Zeroizing`] buffers and are wiped
//! when dropped. An unknown user still costs one argon2 verification (against a dummy hash
//! with the most expensive parameters among the configured users), so user names cannot be
//! probed by timing. Few checks run at once ([`AuthGuard::check`]), so a crowd of clients
//! sending wrong passwords costs time, not memory.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::{Config, GlobalLimits};

/// A user name and password from AUTH. `Debug` never shows the password.
pub struct Credentials {
    /// Login name (authentication identity).
    pub user: String,
    /// The password bytes, wiped on drop.
    pub password: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Why a SASL response could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslError {
    /// Not base64 (`501 5.5.2`).
    BadBase64,
    /// Decoded, but not a usable PLAIN message (counts as a failed login).
    Malformed,
}

/// Decode a base64 SASL response (surrounding whitespace ignored).
pub fn decode_b64(s: &str) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    STANDARD
        .decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|_| SaslError::BadBase64)
}

/// Decode an AUTH PLAIN response: `authzid NUL authcid NUL passwd` (RFC 4616). An authzid
/// other than empty or the authcid itself is refused (we do not support proxy auth).
pub fn decode_plain(b64: &str) -> Result<Credentials, SaslError> {
    let raw = decode_b64(b64)?;
    let mut parts = raw.splitn(3, |&b| b == 0);
    let (Some(authz), Some(authc), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    let user = std::str::from_utf8(authc).map_err(|_| SaslError::Malformed)?;
    if user.is_empty() || (!authz.is_empty() && authz != authc) {
        return Err(SaslError::Malformed);
    }
    Ok(Credentials {
        user: user.to_string(),
        password: Zeroizing::new(pass.to_vec()),
    })
}

/// Argon2 working memory for one check (1 KiB blocks), kept and reused: see
/// [`AuthGuard::check`].
pub type Memory = Vec<Block>;

/// Check a password against the configured users, computing in `memory` (grown to the hash's
/// memory cost if smaller). Slow on purpose (argon2): run it on a blocking thread, through
/// [`AuthGuard::check`] so that few run at once. Unknown users cost as much as the most
/// expensive known one.
pub fn verify_password(config: &Config, user: &str, password: &[u8], memory: &mut Memory) -> bool {
    let Some(u) = config.user(user) else {
        dummy_verify(config, password, memory);
        return false;
    };
    match PasswordHash::new(&u.password_hash) {
        Ok(hash) => verify_hash(&hash, password, memory),
        Err(e) => {
            tracing::warn!(user = %u.name, error = %e, "password_hash of user is not a valid argon2 PHC string");
            dummy_verify(config, password, memory);
            false
        }
    }
}

/// What argon2's `verify_password` does, in caller-provided memory instead of a fresh
/// allocation per check (which the C allocator keeps per thread after it is freed: with
/// allocations of 19 MiB, 200 checks queued one after the other still grew RSS to 669 MB).
fn verify_hash(hash: &PasswordHash<'_>, password: &[u8], memory: &mut Memory) -> bool {
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(hash.algorithm), Params::try_from(hash))
    else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let computed = argon2_in(
        algorithm,
        version,
        params,
        password,
        salt,
        expected.len(),
        memory,
    );
    // `Output`'s equality is constant-time.
    computed.is_some_and(|c| c == *expected)
}

/// Argon2 of `password` in `memory`, with an output of `len` bytes.
fn argon2_in(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    len: usize,
    memory: &mut Memory,
) -> Option<Output> {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let argon = Argon2::new(algorithm, version, params);
    let out = Output::init_with(len, |out| {
        argon
            .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
            .map_err(Into::into)
    });
    // What the blocks hold is derived from the password: do not leave it lying around.
    memory[..blocks].fill(Block::default());
    out.ok()
}

/// The most expensive argon2 parameters among the configured users (memory × passes, then
/// lanes), or argon2's defaults without users. A dummy check with them takes at least as long
/// as any real one, so a fast "535" never tells that a name is unknown.
fn dummy_params(config: &Config) -> Params {
    config
        .users
        .iter()
        .filter_map(|u| {
            let h = PasswordHash::new(&u.password_hash).ok()?;
            Params::try_from(&h).ok()
        })
        .max_by_key(|p| {
            (
                u64::from(p.m_cost()) * u64::from(p.t_cost()),
                p.p_cost(),
                p.output_len(),
            )
        })
        .unwrap_or_default()
}

/// The work of a check against [`dummy_params`], so an unknown user name takes as long as the
/// slowest known one. (Computing the hash is the cost; comparing it with nothing costs nothing.)
fn dummy_verify(config: &Config, password: &[u8], memory: &mut Memory) {
    let params = dummy_params(config);
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let _ = argon2_in(
        Algorithm::Argon2id,
        Version::V0x13,
        params,
        password,
        b"postern-dummy-salt",
        len,
        memory,
    );
}

/// Password checks that may run at once, over all listeners. Each needs its hash's memory
/// cost (19 MiB with `postern hash-password`'s parameters): without a bound, 200 clients
/// sending one wrong password each took 3.5 GB. One per core (so checks never queue behind
/// each other for CPU), and no more than four even on a big machine. Each slot keeps its
/// memory for the next check, so the checks never hold more than slots × the largest cost.
fn check_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Why a password could not be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckError {
    /// No check slot came free before the deadline (`454 4.7.0`, try again).
    Busy,
    /// The blocking task failed (panicked).
    Failed,
}

/// What the guard says after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureVerdict {
    /// Wait this long before answering 535.
    pub delay: Duration,
    /// The address is now locked out.
    pub locked: bool,
    /// The user name is now locked out (for addresses it has not logged in from).
    pub user_locked: bool,
}

/// Failed attempts on one user name, from any address, and the addresses it logged in from.
#[derive(Debug, Clone)]
struct UserEntry {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
    /// Client keys that logged in as this user (most recent last): they are not locked out
    /// with the name, so a guesser elsewhere cannot lock the real device out.
    known: Vec<IpAddr>,
}

/// Addresses remembered per user as having logged in.
const KNOWN_PER_USER: usize = 16;
/// Longest user name kept as a key (longer ones are cut: they are never real users).
const USER_KEY_MAX: usize = 256;

/// The guard's settings, from `[limits]`.
#[derive(Debug, Clone, Copy)]
struct GuardLimits {
    max_failures: u32,
    lockout: Duration,
    per_user: u32,
    v6_prefix: u8,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Longest delay before a 535.
const MAX_DELAY: Duration = Duration::from_secs(16);
/// Prune forgotten entries when the table grows past this.
const PRUNE_AT: usize = 4096;

/// Brute-force guard, shared by all connections and listeners, keyed by client (an IPv4
/// address or an IPv6 network of `limits.ipv6_prefix` bits, see
/// [`client_key`](super::policy::client_key)) and by user name.
///
/// Per client: the first two failures are answered at once; each further failure waits 1 s,
/// 2 s, 4 s … (at most 16 s) before its 535; after `auth_max_failures` failures the client is
/// refused AUTH (`454 4.7.0`) for `auth_lockout`. Failures older than `auth_lockout` are
/// forgotten; a success clears the count.
///
/// Per user name (any name, known or not, so a lockout tells nothing about which names
/// exist): after `auth_max_failures_per_user` failures from anywhere, that name is refused
/// AUTH for `auth_lockout`, except from clients that have logged in as it before: a guesser
/// spreading its attempts over many addresses gets nowhere, and the real device keeps working.
#[derive(Debug)]
pub struct AuthGuard {
    table: Mutex<HashMap<IpAddr, Entry>>,
    users: Mutex<HashMap<String, UserEntry>>,
    limits: Mutex<GuardLimits>,
    /// Permits to run an argon2 check (see [`check_slots`]).
    checks: Arc<Semaphore>,
    /// Working memory of the checks, one per slot, reused (see [`verify_hash`]).
    memory: Arc<Mutex<Vec<Memory>>>,
}

impl AuthGuard {
    /// A guard locking a client out after `max_failures` (0 = never) for `lockout`, and a
    /// user name after four times as many.
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            limits: Mutex::new(GuardLimits {
                max_failures,
                lockout,
                per_user: max_failures.saturating_mul(4),
                v6_prefix: crate::config::DEFAULT_IPV6_PREFIX,
            }),
            checks: Arc::new(Semaphore::new(check_slots())),
            memory: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Check `creds` against `config`'s users on a blocking thread, once one of the few check
    /// slots is free. Clients queue here holding nothing but their place in line; one still
    /// waiting at `deadline` gets [`CheckError::Busy`].
    pub async fn check(
        &self,
        config: Arc<Config>,
        creds: Credentials,
        deadline: Instant,
    ) -> Result<bool, CheckError> {
        let permit =
            match tokio::time::timeout_at(deadline, self.checks.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) | Err(_) => return Err(CheckError::Busy),
            };
        let pool = self.memory.clone();
        // The blocking task gives back the memory, then the slot, even if this client is gone
        // by then: at most one buffer per slot ever exists.
        tokio::task::spawn_blocking(move || {
            let mut memory = pool
                .lock()
                .ok()
                .and_then(|mut p| p.pop())
                .unwrap_or_default();
            let ok = verify_password(&config, &creds.user, &creds.password, &mut memory);
            if let Ok(mut p) = pool.lock() {
                p.push(memory);
            }
            drop(permit);
            ok
        })
        .await
        .map_err(|_| CheckError::Failed)
    }

    /// A guard from `config.limits`.
    pub fn from_limits(limits: &GlobalLimits) -> Self {
        let g = Self::new(limits.auth_max_failures, limits.auth_lockout);
        g.set_limits(limits);
        g
    }

    /// Change the limits (config reload); counts are kept.
    pub fn set_limits(&self, limits: &GlobalLimits) {
        if let Ok(mut l) = self.limits.lock() {
            *l = GuardLimits {
                max_failures: limits.auth_max_failures,
                lockout: limits.auth_lockout,
                per_user: limits.auth_max_failures_per_user,
                v6_prefix: limits.ipv6_prefix,
            };
        }
    }

    fn limits(&self) -> GuardLimits {
        self.limits.lock().map(|l| *l).unwrap_or(GuardLimits {
            max_failures: 0,
            lockout: Duration::ZERO,
            per_user: 0,
            v6_prefix: crate::config::DEFAULT_IPV6_PREFIX,
        })
    }

    fn key(&self, ip: IpAddr) -> IpAddr {
        super::policy::client_key(ip, self.limits().v6_prefix)
    }

    /// Is `user` locked out for a client at `ip` right now (too many failures on that name,
    /// and the client never logged in as it)?
    pub fn is_user_locked(&self, ip: IpAddr, user: &str) -> bool {
        let key = self.key(ip);
        let now = Instant::now();
        let Ok(mut t) = self.users.lock() else {
            return false;
        };
        let Some(e) = t.get_mut(user_key(user)) else {
            return false;
        };
        match e.locked_until {
            Some(until) if until > now => !e.known.contains(&key),
            Some(_) => {
                e.locked_until = None;
                e.failures = 0;
                false
            }
            None => false,
        }
    }

    /// Is `ip` locked out right now?
    pub fn is_locked(&self, ip: IpAddr) -> bool {
        let ip = self.key(ip);
        let now = Instant::now();
        let Ok(mut t) = self.table.lock() else {
            return false;
        };
        match t.get(&ip).and_then(|e| e.locked_until) {
            Some(until) if until > now => true,
            Some(_) => {
                t.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Record a failed attempt from `ip` as `user`.
    pub fn record_failure(&self, ip: IpAddr, user: &str) -> FailureVerdict {
        let mut v = self.record_client_failure(ip);
        v.user_locked = self.record_user_failure(user);
        v
    }

    /// Count a failure on `user`; true if the name is now locked out.
    fn record_user_failure(&self, user: &str) -> bool {
        let GuardLimits {
            lockout, per_user, ..
        } = self.limits();
        let now = Instant::now();
        let Ok(mut t) = self.users.lock() else {
            return false;
        };
        if t.len() >= PRUNE_AT {
            t.retain(|_, e| {
                !e.known.is_empty()
                    || now.duration_since(e.last) < lockout
                    || e.locked_until.is_some_and(|u| u > now)
            });
        }
        if t.len() >= PRUNE_AT * 4 && !t.contains_key(user_key(user)) {
            // Full of live entries (a flood of names): count nothing new rather than grow.
            return false;
        }
        let e = t.entry(user_key(user).to_string()).or_insert(UserEntry {
            failures: 0,
            last: now,
            locked_until: None,
            known: Vec::new(),
        });
        if now.duration_since(e.last) >= lockout && e.locked_until.is_none_or(|u| u <= now) {
            e.failures = 0;
            e.locked_until = None;
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        let lock = per_user > 0 && e.failures >= per_user && e.locked_until.is_none();
        if lock {
            e.locked_until = Some(now + lockout.min(Duration::from_secs(365 * 86_400)));
        }
        lock
    }

    fn record_client_failure(&self, ip: IpAddr) -> FailureVerdict {
        let GuardLimits {
            max_failures: max,
            lockout,
            v6_prefix,
            ..
        } = self.limits();
        let ip = super::policy::client_key(ip, v6_prefix);
        let now = Instant::now();
        let Ok(mut t) = self.table.lock() else {
            return FailureVerdict {
                delay: MAX_DELAY,
                locked: false,
                user_locked: false,
            };
        };
        if t.len() >= PRUNE_AT {
            t.retain(|_, e| {
                now.duration_since(e.last) < lockout || e.locked_until.is_some_and(|u| u > now)
            });
        }
        let e = t.entry(ip).or_insert(Entry {
            failures: 0,
            last: now,
            locked_until: None,
        });
        if now.duration_since(e.last) >= lockout && e.locked_until.is_none_or(|u| u <= now) {
            e.failures = 0;
            e.locked_until = None;
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        let delay = match e.failures {
            0..=2 => Duration::ZERO,
            n => Duration::from_secs(1u64 << (n - 3).min(10)).min(MAX_DELAY),
        };
        let locked = max > 0 && e.failures >= max;
        if locked {
            e.locked_until = Some(now + lockout.min(Duration::from_secs(365 * 86_400)));
        }
        FailureVerdict {
            delay,
            locked,
            user_locked: false,
        }
    }

    /// Record a successful login from `ip` as `user`: the client's failures are forgotten,
    /// and it may log in as `user` even while that name is locked out. (The name's failures
    /// are not forgotten: a guesser elsewhere is not let off by the real device's login.)
    pub fn record_success(&self, ip: IpAddr, user: &str) {
        let key = self.key(ip);
        if let Ok(mut t) = self.table.lock() {
            t.remove(&key);
        }
        if let Ok(mut t) = self.users.lock() {
            let e = t.entry(user_key(user).to_string()).or_insert(UserEntry {
                failures: 0,
                last: Instant::now(),
                locked_until: None,
                known: Vec::new(),
            });
            e.known.retain(|k| *k != key);
            if e.known.len() >= KNOWN_PER_USER {
                e.known.remove(0);
            }
            e.known.push(key);
        }
    }
}

/// `user` as the guard keys it: cut at [`USER_KEY_MAX`] bytes (on a character boundary).
fn user_key(user: &str) -> &str {
    if user.len() <= USER_KEY_MAX {
        return user;
    }
    let mut end = USER_KEY_MAX;
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    &user[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::testkit::{config_with_users, user};

    #[test]
    fn plain_decoding() {
        let c = decode_plain(&STANDARD.encode(b"\0scanner\0s3cret")).unwrap();
        assert_eq!(c.user, "scanner");
        assert_eq!(&c.password[..], b"s3cret");
        let c = decode_plain(&STANDARD.encode(b"scanner\0scanner\0pw\0with nul")).unwrap();
        assert_eq!(&c.password[..], b"pw\0with nul");
        assert_eq!(
            decode_plain(&STANDARD.encode(b"other\0scanner\0pw")).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            decode_plain(&STANDARD.encode(b"scanner\0pw")).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            decode_plain(&STANDARD.encode(b"\0\0pw")).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(decode_plain("!!!").unwrap_err(), SaslError::BadBase64);
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn argon2_verification() {
        let cfg = config_with_users(vec![user("scanner", "right", &["*"])]);
        let mut m = Memory::new();
        assert!(verify_password(&cfg, "scanner", b"right", &mut m));
        assert!(!verify_password(&cfg, "scanner", b"wrong", &mut m));
        assert!(!verify_password(&cfg, "nobody", b"right", &mut m));
        let mut bad = cfg.clone();
        bad.users[0].password_hash = "not-a-hash".into();
        assert!(!verify_password(&bad, "scanner", b"right", &mut m));
        // The same answers as the argon2 crate's own verifier, for every variant and version
        // `postern hash-password` or another tool may have written.
        use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
        let salt = SaltString::encode_b64(b"some-salt-bytes").unwrap();
        for alg in [Algorithm::Argon2id, Algorithm::Argon2i, Algorithm::Argon2d] {
            for ver in [Version::V0x10, Version::V0x13] {
                let params = Params::new(64, 2, 2, Some(24)).unwrap();
                let phc = Argon2::new(alg, ver, params)
                    .hash_password(b"pw", &salt)
                    .unwrap()
                    .to_string();
                let hash = PasswordHash::new(&phc).unwrap();
                for pw in [&b"pw"[..], b"px", b""] {
                    assert_eq!(
                        verify_hash(&hash, pw, &mut m),
                        Argon2::default().verify_password(pw, &hash).is_ok(),
                        "{phc} {pw:?}"
                    );
                }
            }
        }
        // The memory grew to the largest cost seen and was wiped after use.
        assert!(m.len() >= 64);
        assert!(m.iter().all(|b| b.as_ref().iter().all(|&x| x == 0)));
    }

    /// A PHC string with these parameters (the hash bytes are never checked here).
    fn phc(m: u32, t: u32, p: u32) -> String {
        format!(
            "$argon2id$v=19$m={m},t={t},p={p}$cG9zdGVybi10ZXN0LXNhbHQ$vQHoBfYySye3Ul3+1wE9tIiPw+P/TYI5Er0b+aERM6c"
        )
    }

    #[test]
    fn unknown_users_cost_as_much_as_the_most_expensive_user() {
        let mut cfg = config_with_users(vec![
            user("cheap", "a", &["*"]),
            user("default", "b", &["*"]),
            user("heavy", "c", &["*"]),
            user("wide", "d", &["*"]),
        ]);
        // The first user is the cheapest (the old dummy copied its parameters): the dummy
        // must take the heaviest, by memory × passes, not the first or the widest.
        cfg.users[0].password_hash = phc(8, 1, 1);
        cfg.users[1].password_hash = phc(19456, 2, 1);
        cfg.users[2].password_hash = phc(65536, 3, 4);
        cfg.users[3].password_hash = phc(32768, 1, 8);
        let p = dummy_params(&cfg);
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (65536, 3, 4));
        // Whatever the file order.
        cfg.users.reverse();
        let p = dummy_params(&cfg);
        assert_eq!((p.m_cost(), p.t_cost(), p.p_cost()), (65536, 3, 4));
        // No users: argon2's defaults (what `postern hash-password` uses).
        let p = dummy_params(&config_with_users(vec![]));
        let d = Params::default();
        assert_eq!(
            (p.m_cost(), p.t_cost(), p.p_cost()),
            (d.m_cost(), d.t_cost(), d.p_cost())
        );
    }

    #[tokio::test]
    async fn checks_wait_for_a_free_slot_without_running() {
        let cfg = Arc::new(config_with_users(vec![user("scanner", "right", &["*"])]));
        let g = AuthGuard::new(5, Duration::from_secs(600));
        assert!(g.checks.available_permits() >= 1);
        let creds = |pw: &[u8]| Credentials {
            user: "scanner".into(),
            password: Zeroizing::new(pw.to_vec()),
        };
        let soon = || Instant::now() + Duration::from_millis(200);
        assert_eq!(
            g.check(cfg.clone(), creds(b"right"), soon()).await,
            Ok(true)
        );
        assert_eq!(
            g.check(cfg.clone(), creds(b"wrong"), soon()).await,
            Ok(false)
        );
        // Every slot busy: a client waits, then gives up at its deadline.
        let held = g
            .checks
            .clone()
            .acquire_many_owned(g.checks.available_permits() as u32)
            .await
            .unwrap();
        assert_eq!(
            g.check(cfg.clone(), creds(b"right"), soon()).await,
            Err(CheckError::Busy)
        );
        // A slot comes free while it waits: it runs.
        let waiting = tokio::spawn({
            let g = Arc::new(g);
            let cfg = cfg.clone();
            async move {
                let r = g
                    .check(
                        cfg,
                        creds(b"right"),
                        Instant::now() + Duration::from_secs(30),
                    )
                    .await;
                (r, g.checks.available_permits())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        let (r, free) = waiting.await.unwrap();
        assert_eq!(r, Ok(true));
        assert_eq!(free, check_slots(), "every slot given back");
    }

    /// A guesser spreading its attempts over many addresses (each under the per-address
    /// limit) is stopped by the count on the user name; the address the user logs in from
    /// keeps working; unknown names are counted the same, so a lockout tells nothing.
    #[tokio::test(start_paused = true)]
    async fn a_user_name_is_locked_against_guessers_but_not_its_own_device() {
        let mut limits = crate::smtp::testkit::config().limits;
        limits.auth_max_failures = 5;
        limits.auth_max_failures_per_user = 20;
        let g = AuthGuard::from_limits(&limits);
        let device: IpAddr = "192.0.2.10".parse().unwrap();
        g.record_success(device, "scanner");
        let mut locked = false;
        for n in 0..20u8 {
            let ip = IpAddr::from([203, 0, 113, n]);
            assert!(!g.is_user_locked(ip, "scanner"), "attempt {n}");
            let v = g.record_failure(ip, "scanner");
            assert!(!v.locked, "each address alone stays under its limit");
            locked |= v.user_locked;
        }
        assert!(locked, "the 20th failure locks the name");
        assert!(g.is_user_locked("198.51.100.1".parse().unwrap(), "scanner"));
        assert!(!g.is_user_locked(device, "scanner"), "its own device");
        assert!(!g.is_user_locked("198.51.100.1".parse().unwrap(), "printer"));
        // Unknown names too (no hint which names exist).
        for n in 0..20u8 {
            g.record_failure(IpAddr::from([203, 0, 113, n]), "nobody");
        }
        assert!(g.is_user_locked("198.51.100.1".parse().unwrap(), "nobody"));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(!g.is_user_locked("198.51.100.1".parse().unwrap(), "scanner"));
    }

    /// One IPv6 /64 is one client for the guard: guessing from ::1, ::2, ... of the same
    /// network does not reset the count.
    #[tokio::test(start_paused = true)]
    async fn an_ipv6_network_is_one_client_for_the_guard() {
        let g = AuthGuard::from_limits(&crate::smtp::testkit::config().limits);
        for n in 1..=5u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, n]);
            g.record_failure(ip, &format!("user{n}"));
        }
        assert!(g.is_locked("2001:db8:1:2::99".parse().unwrap()));
        assert!(!g.is_locked("2001:db8:1:3::1".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn guard_delays_then_locks_out_then_forgets() {
        let g = AuthGuard::new(5, Duration::from_secs(600));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let delays: Vec<_> = (0..5).map(|_| g.record_failure(ip, "u")).collect();
        assert_eq!(
            delays[0],
            FailureVerdict {
                delay: Duration::ZERO,
                locked: false,
                user_locked: false
            }
        );
        assert_eq!(delays[1].delay, Duration::ZERO);
        assert_eq!(delays[2].delay, Duration::from_secs(1));
        assert_eq!(delays[3].delay, Duration::from_secs(2));
        assert_eq!(
            delays[4],
            FailureVerdict {
                delay: Duration::from_secs(4),
                locked: true,
                user_locked: false
            }
        );
        assert!(g.is_locked(ip));
        assert!(!g.is_locked(other));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(!g.is_locked(ip));
        assert_eq!(
            g.record_failure(ip, "u").delay,
            Duration::ZERO,
            "count starts again"
        );
        g.record_success(ip, "u");
        assert_eq!(g.record_failure(ip, "u").delay, Duration::ZERO);
        let capped = AuthGuard::new(0, Duration::from_secs(600));
        let last = (0..20)
            .map(|_| capped.record_failure(ip, "u"))
            .last()
            .unwrap();
        assert_eq!(
            last,
            FailureVerdict {
                delay: MAX_DELAY,
                locked: false,
                user_locked: false
            }
        );
    }
}
