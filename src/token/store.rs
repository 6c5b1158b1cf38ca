//! [`TokenStore`]: the [`TokenSource`] the transports use.
//!
//! - One cache slot per (account, mailbox, audience); app-only tokens do not depend on the
//!   mailbox, so every mailbox of an app-only account shares one slot.
//! - Refresh ahead: a token is replaced once it is within `refresh_margin` (10 min) of expiry
//!   or 80 % through its life, whichever comes first, so Exchange never sees a token about to
//!   expire (smtp-hve refuses those: §3.3).
//! - Single-flight: each slot has an async mutex held across the request, so 100 concurrent
//!   callers cause one request; the others wait and take the fresh token.
//! - Failures are remembered in the slot: transient ones back off exponentially (capped),
//!   configuration ones are retried only every `config_retry`; callers meanwhile get the
//!   remembered error (or the still-valid old token) without touching Entra, so a broken
//!   secret never turns into a request storm, and mail flows again by itself once it is fixed.
//! - Delegated refresh tokens rotate on every refresh; the new one is saved (atomically)
//!   before the access token is handed out. Idle mailboxes are refreshed weekly by
//!   [`TokenStore::run_maintenance`] so they never reach the 90-day AADSTS700082.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::assertion::parse_cert;
use super::entra::{EntraClient, GrantKind, TokenResponse, grant_kind, now_secs};
use super::files::{FileError, StoredToken, TokenFiles};
use super::{AccessToken, Audience, TokenError, TokenSource};
use crate::config::{AccountConfig, Config, Credential};
use crate::secret::Secret;
use crate::upstream::BoxFuture;

/// Tuning of the store; the defaults are for production, tests shorten them.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Refresh at the latest this long before expiry.
    pub refresh_margin: Duration,
    /// Refresh at the latest after this fraction of the token's lifetime.
    pub refresh_fraction: f64,
    /// First retry delay after a transient failure.
    pub backoff_initial: Duration,
    /// Longest retry delay after transient failures.
    pub backoff_max: Duration,
    /// Retry delay after a configuration error (the admin is fixing Entra meanwhile).
    pub config_retry: Duration,
    /// Refresh a delegated refresh token when it was last saved longer ago than this.
    pub idle_refresh: Duration,
    /// Warn this long before a client secret or certificate expires.
    pub expiry_warning: Duration,
    /// How often [`TokenStore::run_maintenance`] wakes up.
    pub maintenance_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            refresh_margin: Duration::from_secs(600),
            refresh_fraction: 0.8,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            config_retry: Duration::from_secs(300),
            idle_refresh: Duration::from_secs(7 * 24 * 3600),
            expiry_warning: Duration::from_secs(30 * 24 * 3600),
            maintenance_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    account: String,
    mailbox: String,
    audience: Audience,
}

impl Key {
    /// The mailbox for log fields: none for app-only tokens, which serve every mailbox.
    fn shown_mailbox(&self) -> Option<&str> {
        (!self.mailbox.is_empty()).then_some(self.mailbox.as_str())
    }
}

/// The same failure again (ignoring Entra's per-request trace and correlation ids)?
fn same_error(a: &TokenError, b: &TokenError) -> bool {
    match (a, b) {
        (TokenError::Transient(x), TokenError::Transient(y)) => x == y,
        (TokenError::Configuration(x), TokenError::Configuration(y)) => {
            (x.code, &x.error, &x.meaning) == (y.code, &y.error, &y.meaning)
        }
        _ => false,
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    /// Past this it is not handed out even when a refresh fails.
    usable_until: Instant,
    /// The same limit by the wall clock (seconds since the epoch): the monotonic clock stands
    /// still while the host is suspended, Entra's and Exchange's clocks do not.
    wall_usable_until: u64,
    /// Fetched to replace a refused token: if the service refuses this one too, the cause is
    /// not the token's age (see [`TokenSource::renew`]).
    replacement: bool,
}

impl Cached {
    /// Still good for handing out at `now` (monotonic and wall clock).
    fn usable(&self, now: Instant) -> bool {
        now < self.usable_until && now_secs() < self.wall_usable_until
    }

    /// Not yet due for its refresh at `now`.
    fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at && self.usable(now)
    }
}

struct Failure {
    error: TokenError,
    retry_at: Instant,
    consecutive: u32,
}

#[derive(Default)]
struct Slot {
    token: Option<Cached>,
    failure: Option<Failure>,
    /// The last token a service refused, and whether it was a replacement: late reports of
    /// the same refusal (concurrent deliveries) get the same answer without a request.
    refused: Option<(Secret<String>, bool)>,
    /// The next token fetched replaces a refused one.
    next_is_replacement: bool,
}

type SlotRef = Arc<tokio::sync::Mutex<Slot>>;
/// Serialises rotations of one (account, mailbox) refresh token.
type RtLock = Arc<tokio::sync::Mutex<()>>;

/// Per-account, per-mailbox OAuth2 tokens from Entra (see the module docs).
pub struct TokenStore {
    accounts: HashMap<String, (AccountConfig, Result<EntraClient, TokenError>)>,
    files: TokenFiles,
    opts: StoreOptions,
    slots: Mutex<HashMap<Key, SlotRef>>,
    /// One lock per (account, mailbox) refresh token: its SMTP and Graph slots both rotate it.
    rt_locks: Mutex<HashMap<(String, String), RtLock>>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("accounts", &self.accounts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenStore {
    /// A store for `accounts`, keeping refresh tokens under `{state_dir}/tokens`.
    ///
    /// Never fails: an account whose HTTPS client cannot be built (bad `ca_file`, `proxy`)
    /// answers every request with that configuration error, and the other accounts work.
    pub fn new(accounts: Vec<AccountConfig>, state_dir: &Path, opts: StoreOptions) -> TokenStore {
        let accounts = accounts
            .into_iter()
            .map(|a| {
                let client = EntraClient::new(a.clone());
                (a.name.clone(), (a, client))
            })
            .collect();
        TokenStore {
            accounts,
            files: TokenFiles::new(state_dir),
            opts,
            slots: Mutex::new(HashMap::new()),
            rt_locks: Mutex::new(HashMap::new()),
        }
    }

    /// A store for every account of `cfg`. A configuration error is retried every
    /// `delivery.hold_retry`, the pace at which the forwarder re-tries a paused mailbox, so the
    /// two knobs cannot disagree; a reload (SIGHUP) builds a new store and retries at once.
    pub fn from_config(cfg: &Config) -> TokenStore {
        TokenStore::new(
            cfg.accounts.clone(),
            &cfg.state_dir,
            StoreOptions {
                config_retry: cfg.delivery.hold_retry,
                ..StoreOptions::default()
            },
        )
    }

    /// The refresh-token files this store uses.
    pub fn files(&self) -> &TokenFiles {
        &self.files
    }

    /// A valid access token for (`account`, `mailbox`, `audience`). `mailbox` is ignored for
    /// app-only accounts.
    pub async fn get(
        &self,
        account: &str,
        mailbox: &str,
        audience: Audience,
    ) -> Result<AccessToken, TokenError> {
        let key = self.key(account, mailbox, audience)?;
        let slot = self.slot(&key);
        let mut s = slot.lock().await;
        self.get_locked(&key, &mut s).await
    }

    /// [`get`](Self::get) with the slot already locked.
    async fn get_locked(&self, key: &Key, s: &mut Slot) -> Result<AccessToken, TokenError> {
        let now = Instant::now();
        if let Some(c) = &s.token
            && c.fresh(now)
        {
            return Ok(c.token.clone());
        }
        if let Some(f) = &s.failure
            && now < f.retry_at
        {
            // Backing off: the old token while it lasts, else the remembered error.
            if let Some(c) = &s.token
                && c.usable(now)
            {
                return Ok(c.token.clone());
            }
            return Err(f.error.clone());
        }
        self.fetch_into(key, s).await
    }

    /// The service refused `refused`: drop it and return the token to retry with, or `None`
    /// when `refused` was itself a replacement (see [`TokenSource::renew`]). The slot's lock
    /// makes concurrent reports of one refusal share a single request.
    pub async fn renew(
        &self,
        account: &str,
        mailbox: &str,
        audience: Audience,
        refused: &AccessToken,
    ) -> Result<Option<AccessToken>, TokenError> {
        let key = self.key(account, mailbox, audience)?;
        let slot = self.slot(&key);
        let mut s = slot.lock().await;
        let same = |t: &Secret<String>| t.expose() == refused.token.expose();
        let was_replacement = match (&s.refused, &s.token) {
            // Reported already (by a concurrent delivery): the same answer.
            (Some((t, r)), _) if same(t) => *r,
            (_, Some(c)) if same(&c.token.token) => {
                let r = c.replacement;
                s.token = None;
                s.refused = Some((refused.token.clone(), r));
                s.next_is_replacement = true;
                if r {
                    // The hold that follows explains it (once, not per probe).
                    tracing::debug!(
                        account = %key.account,
                        mailbox = key.shown_mailbox(),
                        audience = %key.audience,
                        "the service refused a freshly issued access token as well; the cause is a permission, not the token"
                    );
                } else {
                    tracing::info!(
                        account = %key.account,
                        mailbox = key.shown_mailbox(),
                        audience = %key.audience,
                        "the service refused a cached access token; getting a new one"
                    );
                }
                r
            }
            // Not cached (any more): a newer token is cached or will be fetched.
            _ => {
                s.next_is_replacement = s.token.is_none();
                false
            }
        };
        if was_replacement {
            return Ok(None);
        }
        self.get_locked(&key, &mut s).await.map(Some)
    }

    /// Get a new token now, whatever is cached (used for idle refresh and `postern token`).
    pub async fn refresh_now(
        &self,
        account: &str,
        mailbox: &str,
        audience: Audience,
    ) -> Result<AccessToken, TokenError> {
        let key = self.key(account, mailbox, audience)?;
        let slot = self.slot(&key);
        let mut s = slot.lock().await;
        self.fetch_into(&key, &mut s).await
    }

    fn key(&self, account: &str, mailbox: &str, audience: Audience) -> Result<Key, TokenError> {
        let (cfg, _) = self.accounts.get(account).ok_or_else(|| {
            TokenError::local(
                account,
                mailbox,
                format!("there is no [account.{account}] in the configuration"),
                format!("add an [account.{account}] table, or fix the route's account name"),
            )
        })?;
        let mailbox = match grant_kind(cfg) {
            GrantKind::AppOnly => String::new(),
            GrantKind::Delegated if mailbox.trim().is_empty() => {
                return Err(TokenError::local(
                    account,
                    "",
                    "a delegated account needs a mailbox for every token".into(),
                    "give the route a mailbox (or use the envelope sender)".into(),
                ));
            }
            GrantKind::Delegated => mailbox.trim().to_lowercase(),
        };
        Ok(Key {
            account: account.to_string(),
            mailbox,
            audience,
        })
    }

    fn slot(&self, key: &Key) -> SlotRef {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key.clone()).or_default().clone()
    }

    fn rt_lock(&self, account: &str, mailbox: &str) -> RtLock {
        let mut m = self.rt_locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((account.to_string(), mailbox.to_string()))
            .or_default()
            .clone()
    }

    /// Request a token for `key` and record the outcome in its slot (caller holds the slot).
    async fn fetch_into(&self, key: &Key, s: &mut Slot) -> Result<AccessToken, TokenError> {
        match self.fetch(key).await {
            Ok(t) => {
                let now = Instant::now();
                let life = Duration::from_secs(t.expires_in.max(1));
                let by_fraction = life.mul_f64(self.opts.refresh_fraction.clamp(0.0, 1.0));
                let by_margin = life.saturating_sub(self.opts.refresh_margin);
                let refresh_in = by_fraction.min(by_margin);
                // Keep a safety gap so a token is never handed out in its last seconds.
                let gap = (life / 10).min(Duration::from_secs(60));
                let token = AccessToken {
                    token: t.access_token,
                    expires_at: now_secs() + t.expires_in,
                };
                tracing::debug!(
                    account = %key.account,
                    mailbox = key.shown_mailbox(),
                    audience = %key.audience,
                    expires_in = t.expires_in,
                    "access token acquired"
                );
                if let Some(f) = &s.failure {
                    tracing::info!(
                        account = %key.account,
                        mailbox = key.shown_mailbox(),
                        after_failures = f.consecutive,
                        "token endpoint works again for this account"
                    );
                }
                s.token = Some(Cached {
                    token: token.clone(),
                    refresh_at: now + refresh_in,
                    usable_until: now + life.saturating_sub(gap),
                    wall_usable_until: token.expires_at.saturating_sub(gap.as_secs()),
                    replacement: std::mem::take(&mut s.next_is_replacement),
                });
                s.failure = None;
                Ok(token)
            }
            Err(error) => {
                let consecutive = s.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
                let delay = match &error {
                    TokenError::Configuration(_) => self.opts.config_retry,
                    TokenError::Transient(_) => {
                        let exp = consecutive.saturating_sub(1).min(20);
                        self.opts
                            .backoff_initial
                            .saturating_mul(1u32 << exp)
                            .min(self.opts.backoff_max)
                    }
                };
                // The full advice reaches the admin through the held mailbox's reason; here
                // one short line when the error starts or changes, and debug lines meanwhile.
                let repeated = s
                    .failure
                    .as_ref()
                    .is_some_and(|f| same_error(&f.error, &error));
                if repeated {
                    tracing::debug!(
                        account = %key.account,
                        mailbox = key.shown_mailbox(),
                        audience = %key.audience,
                        consecutive,
                        retry_in = %humantime::format_duration(delay),
                        "still no access token: {}", error.summary()
                    );
                } else {
                    tracing::warn!(
                        account = %key.account,
                        mailbox = key.shown_mailbox(),
                        audience = %key.audience,
                        retry_in = %humantime::format_duration(delay),
                        "no access token: {}", error.summary()
                    );
                }
                s.failure = Some(Failure {
                    error: error.clone(),
                    retry_at: Instant::now() + delay,
                    consecutive,
                });
                match &s.token {
                    Some(c) if c.usable(Instant::now()) => Ok(c.token.clone()),
                    _ => Err(error),
                }
            }
        }
    }

    /// One token request for `key`, without the cache.
    async fn fetch(&self, key: &Key) -> Result<TokenResponse, TokenError> {
        let (cfg, client) = self.accounts.get(&key.account).ok_or_else(|| {
            TokenError::local(
                &key.account,
                &key.mailbox,
                "unknown account".into(),
                "fix the route".into(),
            )
        })?;
        let client = client.as_ref().map_err(Clone::clone)?;
        if grant_kind(cfg) == GrantKind::AppOnly {
            return client.client_credentials(key.audience).await;
        }
        let lock = self.rt_lock(&key.account, &key.mailbox);
        let _guard = lock.lock().await;
        let stored = self
            .files
            .load(&key.account, &key.mailbox)
            .map_err(|e| self.file_error(key, e))?
            .ok_or_else(|| {
                TokenError::local(
                    &key.account,
                    &key.mailbox,
                    "this mailbox has not been signed in (no refresh token)".into(),
                    format!(
                        "run `postern login {} --mailbox {} --for {}` once",
                        key.account, key.mailbox, key.audience
                    ),
                )
            })?;
        let t = client
            .refresh(
                &stored.refresh_token,
                &key.mailbox,
                key.audience,
                stored.shared && key.audience == Audience::Graph,
            )
            .await?;
        if let Some(rt) = &t.refresh_token {
            // Save the rotated token before anyone uses the access token: if this fails we
            // hand out nothing, and the old refresh token (still valid, §1.3) is retried.
            let new = StoredToken {
                mailbox: key.mailbox.clone(),
                audience: stored.audience,
                shared: stored.shared,
                refresh_token: rt.clone(),
                saved_at: now_secs(),
            };
            self.files.save(&key.account, &new).map_err(|e| {
                TokenError::Transient(format!(
                    "could not save the new refresh token ({e}); the old one stays valid"
                ))
            })?;
        }
        Ok(t)
    }

    fn file_error(&self, key: &Key, e: FileError) -> TokenError {
        match e {
            FileError::Corrupt { .. } => TokenError::local(
                &key.account,
                &key.mailbox,
                e.to_string(),
                format!(
                    "run `postern login {} --mailbox {}`",
                    key.account, key.mailbox
                ),
            ),
            FileError::Io { .. } => TokenError::Transient(format!("reading the token file: {e}")),
        }
    }

    /// Refresh every delegated refresh token not refreshed for `idle_refresh` (a week), so an
    /// idle mailbox never reaches Entra's 90-day inactivity limit (AADSTS700082). Returns
    /// (account, mailbox, outcome) for each one tried.
    pub async fn refresh_idle(&self) -> Vec<(String, String, Result<(), TokenError>)> {
        let mut out = Vec::new();
        let now = now_secs();
        let mut names: Vec<&String> = self.accounts.keys().collect();
        names.sort();
        for name in names {
            let Some((cfg, _)) = self.accounts.get(name) else {
                continue;
            };
            if grant_kind(cfg) != GrantKind::Delegated {
                continue;
            }
            let stored = match self.files.list(name) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(account = %name, "cannot list refresh tokens: {e}");
                    continue;
                }
            };
            for t in stored {
                if now.saturating_sub(t.saved_at) < self.opts.idle_refresh.as_secs() {
                    continue;
                }
                let r = self
                    .refresh_now(name, &t.mailbox, t.audience)
                    .await
                    .map(|_| ());
                match &r {
                    Ok(()) => {
                        tracing::info!(account = %name, mailbox = %t.mailbox, "idle refresh token renewed")
                    }
                    Err(e) => {
                        tracing::warn!(account = %name, mailbox = %t.mailbox, "idle refresh token could not be renewed: {e}")
                    }
                }
                out.push((name.clone(), t.mailbox.clone(), r));
            }
        }
        out
    }

    /// Warnings about client secrets and certificates that expire within `expiry_warning`
    /// (30 days) or have expired; one line each, for `postern check` and the daily log.
    pub fn expiry_warnings(&self) -> Vec<String> {
        let mut accounts: Vec<AccountConfig> =
            self.accounts.values().map(|(a, _)| a.clone()).collect();
        accounts.sort_by(|a, b| a.name.cmp(&b.name));
        expiry_warnings(&accounts, self.opts.expiry_warning)
    }

    /// The background task the daemon spawns: every `maintenance_interval` refresh idle
    /// delegated tokens; once a day (and at start) log expiry warnings. Returns on `cancel`.
    pub async fn run_maintenance(self: Arc<Self>, cancel: CancellationToken) {
        let mut last_warned: Option<Instant> = None;
        loop {
            let day = Duration::from_secs(24 * 3600);
            if last_warned.is_none_or(|t| t.elapsed() >= day) {
                for w in self.expiry_warnings() {
                    tracing::warn!("{w}");
                }
                last_warned = Some(Instant::now());
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.refresh_idle() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.opts.maintenance_interval) => {}
            }
        }
    }
}

impl TokenSource for TokenStore {
    fn token<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
    ) -> BoxFuture<'a, Result<AccessToken, TokenError>> {
        Box::pin(self.get(account, mailbox, audience))
    }

    fn renew<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
        refused: &'a AccessToken,
    ) -> BoxFuture<'a, Result<Option<AccessToken>, TokenError>> {
        Box::pin(TokenStore::renew(self, account, mailbox, audience, refused))
    }
}

/// Warnings about the client secrets and certificates of `accounts` that expire within
/// `horizon` or have expired (without building a store: `postern check` uses it).
pub fn expiry_warnings(accounts: &[AccountConfig], horizon: Duration) -> Vec<String> {
    let now = now_secs();
    let horizon = now + horizon.as_secs();
    let mut out = Vec::new();
    for a in accounts {
        let (what, at, fix) = match &a.credential {
            Credential::ClientSecret {
                expires: Some(e), ..
            } => (
                "client secret".to_string(),
                i64::try_from(*e).unwrap_or(i64::MAX),
                "Entra admin centre → App registrations → the app → Certificates & secrets → New client secret; put its Value in place and update secret_expires",
            ),
            Credential::Certificate { cert, .. } => {
                match std::fs::read(cert)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| parse_cert(&pem).map_err(|e| e.to_string()))
                {
                    Ok((_, not_after, _)) => (
                        format!("certificate {}", cert.display()),
                        not_after,
                        "make a new certificate, upload it under Entra admin centre → App registrations → the app → Certificates & secrets → Certificates, then replace the files",
                    ),
                    Err(e) => {
                        out.push(format!(
                            "account {}: cannot read certificate {}: {e}",
                            a.name,
                            cert.display()
                        ));
                        continue;
                    }
                }
            }
            _ => continue,
        };
        let when = httpdate::fmt_http_date(
            UNIX_EPOCH + Duration::from_secs(u64::try_from(at.max(0)).unwrap_or(0)),
        );
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        let secret = matches!(a.credential, Credential::ClientSecret { .. });
        if secret && at <= now_i {
            // secret_expires is a date, read as 00:00 UTC; the secret itself lives until a time
            // of that day only Entra knows. So this is a reminder: Entra's answer decides.
            let day = when.get(..16).unwrap_or(&when);
            let state = if now_i < at.saturating_add(86_400) {
                format!(
                    "expires today ({day}, by secret_expires; the exact time is under Certificates & secrets)"
                )
            } else {
                format!("expired on {day} (by secret_expires)")
            };
            out.push(format!(
                "account {}: the {what} {state}; postern keeps using it until Entra refuses it (AADSTS7000222); fix: {fix}",
                a.name
            ));
        } else if at <= now_i {
            out.push(format!(
                "account {}: the {what} expired on {when}; fix: {fix}",
                a.name
            ));
        } else if at <= i64::try_from(horizon).unwrap_or(i64::MAX) {
            let days = (at - now_i) / 86_400;
            out.push(format!(
                "account {}: the {what} expires on {when} (in {days} days); fix: {fix}",
                a.name
            ));
        }
    }
    out
}
