//! One HTTPS client per account: rustls (aws-lc-rs) with the platform's roots plus the
//! account's `ca_file`, the account's proxy (else the standard environment variables), and
//! timeouts so a hung Entra never hangs a delivery.

use std::time::Duration;

use reqwest::Url;

use crate::config::AccountConfig;

/// TCP + TLS connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout (connect, send, wait, read).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an account's HTTPS client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// `ca_file` unreadable.
    #[error("ca_file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ca_file` holds no usable PEM certificate.
    #[error("ca_file {path}: no PEM certificate in it ({why})")]
    CaPem {
        /// The file.
        path: String,
        /// What the parser said.
        why: String,
    },
    /// `proxy` is not a URL reqwest accepts.
    #[error("proxy {proxy:?}: {why}")]
    Proxy {
        /// The configured value.
        proxy: String,
        /// What is wrong.
        why: String,
    },
    /// An endpoint is not usable (not a URL, or plain http to a non-loopback host).
    #[error("{what} {url:?}: {why}")]
    Endpoint {
        /// Which endpoint (`token_url`...).
        what: &'static str,
        /// The configured value.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// reqwest refused the configuration.
    #[error("building the HTTPS client: {0}")]
    Build(String),
}

/// Build the HTTPS client for `account`.
pub fn client(account: &AccountConfig) -> Result<reqwest::Client, HttpSetupError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("postern/", env!("CARGO_PKG_VERSION")))
        // Entra never redirects the token endpoint; following a redirect could send the
        // client secret somewhere else.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &account.ca_file {
        let pem = std::fs::read(path).map_err(|source| HttpSetupError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| HttpSetupError::CaPem {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(HttpSetupError::CaPem {
                path: path.display().to_string(),
                why: "empty".into(),
            });
        }
        b = b.tls_certs_merge(certs);
    }
    if let Some(p) = &account.proxy {
        let proxy = reqwest::Proxy::all(p).map_err(|e| HttpSetupError::Proxy {
            proxy: p.clone(),
            why: e.to_string(),
        })?;
        b = b.proxy(proxy);
    }
    for (what, url) in [
        ("token_url", &account.endpoints.token_url),
        ("device_code_url", &account.endpoints.device_code_url),
        ("authorize_url", &account.endpoints.authorize_url),
    ] {
        check_endpoint(what, url)?;
    }
    b.build().map_err(|e| HttpSetupError::Build(e.to_string()))
}

/// An endpoint must be `https://`, or `http://` to a loopback address (tests, local proxies):
/// secrets must never cross a network in clear text.
pub fn check_endpoint(what: &'static str, url: &str) -> Result<Url, HttpSetupError> {
    let bad = |why: &str| HttpSetupError::Endpoint {
        what,
        url: url.to_string(),
        why: why.to_string(),
    };
    let u = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match u.scheme() {
        "https" => Ok(u),
        "http" if is_loopback(&u) => Ok(u),
        "http" => Err(bad(
            "plain http is allowed only for loopback hosts (127.0.0.1, ::1, localhost); use https",
        )),
        _ => Err(bad("not an http(s) URL")),
    }
}

fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(check_endpoint("token_url", "https://login.microsoftonline.com/x").is_ok());
        assert!(check_endpoint("token_url", "http://127.0.0.1:8080/t").is_ok());
        assert!(check_endpoint("token_url", "http://[::1]:8080/t").is_ok());
        assert!(check_endpoint("token_url", "http://localhost/t").is_ok());
        let e = check_endpoint("token_url", "http://login.example.com/t").unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(check_endpoint("token_url", "ftp://127.0.0.1/").is_err());
        assert!(check_endpoint("token_url", "not a url").is_err());
    }
}
