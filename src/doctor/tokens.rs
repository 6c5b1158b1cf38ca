//! Tokens for doctor's checks: asked of Entra directly and never stored, so doctor changes
//! nothing on disk (a delegated refresh token stays valid after Entra rotates it).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::{Config, Credential};
use crate::token::entra::EntraClient;
use crate::token::files::TokenFiles;
use crate::token::{AccessToken, Audience, TokenError, TokenSource};
use crate::upstream::BoxFuture;

type Key = (String, String, Audience);

/// A [`TokenSource`] that remembers answers for the run (each check asks once).
pub struct DoctorTokens {
    clients: HashMap<String, Result<EntraClient, TokenError>>,
    files: TokenFiles,
    cache: tokio::sync::Mutex<HashMap<Key, Result<AccessToken, TokenError>>>,
    delegated: Mutex<HashMap<String, bool>>,
}

impl DoctorTokens {
    /// Clients for every account of `config`.
    pub fn new(config: &Config) -> Self {
        let mut delegated = HashMap::new();
        let clients = config
            .accounts
            .iter()
            .map(|a| {
                delegated.insert(
                    a.name.clone(),
                    matches!(a.credential, Credential::Delegated { .. }),
                );
                (a.name.clone(), EntraClient::new(a.clone()))
            })
            .collect();
        DoctorTokens {
            clients,
            files: TokenFiles::new(&config.state_dir),
            cache: tokio::sync::Mutex::new(HashMap::new()),
            delegated: Mutex::new(delegated),
        }
    }

    async fn fetch(
        &self,
        account: &str,
        mailbox: &str,
        audience: Audience,
    ) -> Result<AccessToken, TokenError> {
        let client = match self.clients.get(account) {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e.clone()),
            None => {
                return Err(TokenError::local(
                    account,
                    mailbox,
                    format!("there is no [account.{account}] in the configuration"),
                    "fix the route's account name".into(),
                ));
            }
        };
        let delegated = self
            .delegated
            .lock()
            .map(|d| d.get(account).copied().unwrap_or(false))
            .unwrap_or(false);
        let t = if delegated {
            let stored = self.files.load(account, mailbox).map_err(|e| {
                TokenError::local(
                    account,
                    mailbox,
                    e.to_string(),
                    format!("run `postern login {account} --mailbox {mailbox}`"),
                )
            })?;
            let Some(stored) = stored else {
                return Err(TokenError::local(
                    account,
                    mailbox,
                    "this mailbox has not been signed in (no refresh token)".into(),
                    format!(
                        "run `postern login {account} --mailbox {mailbox} --for {audience}` once"
                    ),
                ));
            };
            client
                .refresh(&stored.refresh_token, mailbox, audience, stored.shared)
                .await?
        } else {
            client.client_credentials(audience).await?
        };
        Ok(AccessToken {
            token: t.access_token,
            expires_at: crate::token::entra::now_secs() + t.expires_in,
        })
    }
}

impl TokenSource for DoctorTokens {
    fn token<'a>(
        &'a self,
        account: &'a str,
        mailbox: &'a str,
        audience: Audience,
    ) -> BoxFuture<'a, Result<AccessToken, TokenError>> {
        Box::pin(async move {
            let delegated = self
                .delegated
                .lock()
                .map(|d| d.get(account).copied().unwrap_or(false))
                .unwrap_or(false);
            // App-only tokens do not depend on the mailbox.
            let key = (
                account.to_string(),
                if delegated {
                    mailbox.to_string()
                } else {
                    String::new()
                },
                audience,
            );
            let mut cache = self.cache.lock().await;
            if let Some(r) = cache.get(&key) {
                return r.clone();
            }
            let r = self.fetch(account, mailbox, audience).await;
            cache.insert(key, r.clone());
            r
        })
    }
}
