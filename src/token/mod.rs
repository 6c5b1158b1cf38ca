//! The token store seam: transports ask a [`TokenSource`] for an OAuth2 access token for a
//! (account, mailbox, audience). The Entra implementation (client credentials, certificate,
//! delegated refresh tokens, refresh ahead, single-flight) lives behind this trait.
//!
//! - `http.rs`: one HTTPS client per account (platform roots + `ca_file`, proxy, timeouts).
//! - `entra.rs`: the token endpoint flows, Entra's error JSON, and the classification of every
//!   failure into transient or configuration (with the Entra admin centre fix).
//! - `assertion.rs`: certificate client assertions (PS256 + `x5t#S256`, or RS256 + `x5t`).
//! - `files.rs`: refresh tokens on disk, one 0600 file per (account, mailbox), atomic writes.
//! - `store.rs`: [`TokenStore`]: cache, refresh ahead, single-flight, backoff, idle refresh.
//! - `login.rs` / `inspect.rs`: the `postern login` and `postern token` commands.

use std::fmt;

use crate::secret::Secret;
use crate::upstream::BoxFuture;

pub mod assertion;
pub mod entra;
pub mod files;
pub mod http;
pub mod inspect;
pub mod login;
pub mod store;

pub use entra::EntraError;
pub use store::{StoreOptions, TokenStore};

/// Which API a token is for (it decides the scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Exchange Online SMTP AUTH XOAUTH2.
    Smtp,
    /// Microsoft Graph `sendMail`.
    Graph,
}

impl Audience {
    /// Lower-case name, as used on the command line (`--for smtp|graph`) and in token files.
    pub fn as_str(self) -> &'static str {
        match self {
            Audience::Smtp => "smtp",
            Audience::Graph => "graph",
        }
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bearer token and when it expires.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The token itself; never logged.
    pub token: Secret<String>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// A configuration problem: what Entra (or our own check) said, and what the admin must do.
///
/// Everything here is safe to log: it never holds a secret or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misconfiguration {
    /// The `[account.NAME]` concerned.
    pub account: String,
    /// The mailbox concerned, for delegated tokens (empty for app-only tokens).
    pub mailbox: String,
    /// The AADSTS code (`7000215`), when Entra gave one.
    pub code: Option<u32>,
    /// Entra's `error` value (`invalid_client`), when Entra answered.
    pub error: Option<String>,
    /// Entra's `suberror` (`consent_required`, `bad_token`...), when present.
    pub suberror: Option<String>,
    /// The first line of Entra's `error_description` (without the trace lines).
    pub description: Option<String>,
    /// Entra's trace id (quote it to Microsoft support).
    pub trace_id: Option<String>,
    /// Entra's correlation id.
    pub correlation_id: Option<String>,
    /// What it means, in a few words ("the client secret is wrong").
    pub meaning: String,
    /// What to do, in the words of the Entra admin centre.
    pub advice: String,
}

impl Misconfiguration {
    /// Who and what, with the AADSTS code, without the advice and the per-request ids.
    pub fn summary(&self) -> String {
        let mut s = format!("account {}", self.account);
        if !self.mailbox.is_empty() {
            s.push_str(&format!(" mailbox {}", self.mailbox));
        }
        s.push_str(&format!(": {}", self.meaning));
        match (self.code, &self.error) {
            (Some(c), Some(e)) => s.push_str(&format!(" (AADSTS{c}, {e})")),
            (Some(c), None) => s.push_str(&format!(" (AADSTS{c})")),
            (None, Some(e)) => s.push_str(&format!(" ({e})")),
            (None, None) => {}
        }
        s
    }
}

impl fmt::Display for Misconfiguration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())?;
        write!(f, "; fix: {}", self.advice)?;
        if let Some(t) = &self.trace_id {
            write!(f, "; trace id {t}")?;
        }
        if let Some(c) = &self.correlation_id {
            write!(f, ", correlation id {c}")?;
        }
        Ok(())
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Temporary (network, 5xx, throttling): retry the delivery later.
    #[error("token endpoint temporarily unavailable: {0}")]
    Transient(String),
    /// Our configuration is wrong (secret, consent, tenant...): hold the mailbox.
    #[error("{0}")]
    Configuration(Box<Misconfiguration>),
}

impl TokenError {
    /// True for configuration problems (hold the mailbox rather than retry the message).
    pub fn is_configuration(&self) -> bool {
        matches!(self, TokenError::Configuration(_))
    }

    /// The AADSTS code behind a configuration error, if any.
    pub fn aadsts(&self) -> Option<u32> {
        match self {
            TokenError::Configuration(m) => m.code,
            TokenError::Transient(_) => None,
        }
    }

    /// One short line for logs that repeat: what happened, without the advice and the
    /// per-request ids (the advice reaches the admin with the held mailbox's reason).
    pub fn summary(&self) -> String {
        match self {
            TokenError::Transient(e) => format!("token endpoint temporarily unavailable: {e}"),
            TokenError::Configuration(m) => m.summary(),
        }
    }

    /// A configuration error found locally (no Entra answer behind it).
    pub fn local(account: &str, mailbox: &str, meaning: String, advice: String) -> Self {
        TokenError::Configuration(Box::new(Misconfiguration {
            account: account.to_string(),
            mailbox: mailbox.to_string(),
            code: None,
            error: None,
            suberror: None,
            description: None,
            trace_id: None,
            correlation_id: None,
            meaning,
            advice,
        }))
    }
}

/// Hands out access tokens per mailbox.
///
/// Transports use two calls: [`token`](Self::token) before each sign-in, and
/// [`renew`](Self::renew) when the service refuses the token it handed out (SMTP
/// `535 5.7.3`, Graph `401 InvalidAuthenticationToken`).
pub trait TokenSource: Send + Sync {
    /// A valid token for `mailbox` of `account`, for `audience`.
    fn token<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
    ) -> BoxFuture<'a, Result<AccessToken, TokenError>>;

    /// The service refused `refused` (a token this source handed out for the same account,
    /// mailbox and audience): forget it and return the token to retry with, once, at once.
    ///
    /// - `Ok(Some(new))`: retry the request with `new` now. A cached token can be refused
    ///   before its scheduled refresh (revoked, or the host's clock was suspended or wrong),
    ///   so a new one usually works.
    /// - `Ok(None)`: `refused` was itself a fresh replacement, so a new token would be refused
    ///   the same way: the cause is a permission or consent, not the token's age. Hold, with
    ///   the permission advice.
    /// - `Err(e)`: no new token could be had; treat `e` like an error of [`token`](Self::token).
    ///
    /// Concurrent callers that report the same refused token cause one token request (the
    /// first drops and fetches; the others get that result), so a burst of refusals does not
    /// stampede Entra. The default is for sources without a cache: nothing newer exists.
    fn renew<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
        refused: &'a AccessToken,
    ) -> BoxFuture<'a, Result<Option<AccessToken>, TokenError>> {
        let _ = (account, mailbox, audience, refused);
        Box::pin(async { Ok(None) })
    }
}
