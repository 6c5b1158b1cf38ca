//! The token store seam: transports ask a [`TokenSource`] for an OAuth2 access token for a
//! (account, mailbox, audience). The Entra implementation (client credentials, certificate,
//! delegated refresh tokens, refresh ahead, single-flight) lives behind this trait.

use crate::secret::Secret;
use crate::upstream::BoxFuture;

/// Which API a token is for (it decides the scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Exchange Online SMTP AUTH XOAUTH2.
    Smtp,
    /// Microsoft Graph `sendMail`.
    Graph,
}

/// A bearer token and when it expires.
#[derive(Debug, Clone)]
pub struct AccessToken {
    /// The token itself; never logged.
    pub token: Secret<String>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Temporary (network, 5xx, throttling): retry the delivery later.
    #[error("token endpoint temporarily unavailable: {0}")]
    Transient(String),
    /// Our configuration is wrong (secret, consent, tenant...): hold the mailbox.
    #[error("{0}")]
    Configuration(String),
}

/// Hands out access tokens per mailbox.
pub trait TokenSource: Send + Sync {
    /// A valid token for `mailbox` of `account`, for `audience`.
    fn token<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
    ) -> BoxFuture<'a, Result<AccessToken, TokenError>>;
}
