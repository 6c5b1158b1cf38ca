//! `[account.NAME]` → [`AccountConfig`]: tenant, client id, cloud and endpoint overrides, and
//! exactly one credential, each secret read from a file, an environment variable or a systemd
//! credential (inline only if the admin insists; `check` warns about that).

use std::path::PathBuf;

use serde_spanned::Spanned;

use super::{Checker, Pem, check_pem};
use crate::config::raw::{RawAccount, key_name};
use crate::config::{
    AccountConfig, AssertionAlg, Cloud, Credential, Endpoints, SecretSource, SecretStyle,
};
use crate::secret::Secret;

/// Keys of a client secret (auth = "client_secret", or "delegated" for confidential apps).
const SECRET_KEYS: &[&str] = &[
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "client_secret_credential",
    "secret_style",
    "secret_expires",
];
/// Keys of a certificate credential (auth = "certificate").
const CERTIFICATE_KEYS: &[&str] = &[
    "certificate",
    "private_key_file",
    "private_key_env",
    "private_key_credential",
    "assertion_alg",
];

/// Tenant names that are not one tenant: client credentials need a real tenant (AADSTS50194).
const MULTI_TENANT: &[&str] = &["common", "organizations", "consumers"];

impl Checker<'_, '_> {
    /// `None` when the account is unusable (its errors are recorded).
    pub(super) fn account(&mut self, r: RawAccount) -> Option<AccountConfig> {
        let table = format!("account.{}", key_name(&r.name));
        let key = |k: &str| format!("{table}.{k}");
        let mut ok = true;

        let tenant = match r.get("tenant") {
            Some(t) if valid_tenant(t.get_ref()) => Some(t.get_ref().trim().to_owned()),
            Some(t) => {
                self.c.at(&t.span(), &key("tenant"), format!("{:?} is not a tenant; write the tenant's primary domain (\"contoso.onmicrosoft.com\") or its Tenant ID from Entra admin centre → Overview", t.get_ref()));
                None
            }
            None => {
                self.missing(&r.header, &table, "tenant", "tenant = \"contoso.onmicrosoft.com\" (or the Tenant ID from Entra admin centre → Overview)");
                None
            }
        };
        let client_id = match r.get("client_id") {
            Some(c) if is_guid(c.get_ref()) => Some(c.get_ref().trim().to_ascii_lowercase()),
            Some(c) => {
                self.c.at(&c.span(), &key("client_id"), format!("{:?} is not an Application (client) ID; copy the GUID from Entra admin centre → App registrations → your app → Overview", c.get_ref()));
                None
            }
            None => {
                self.missing(
                    &r.header,
                    &table,
                    "client_id",
                    "client_id = \"<Application (client) ID GUID>\"",
                );
                None
            }
        };
        let cloud = match r.get("cloud") {
            Some(c) => self.choice(
                &key("cloud"),
                c,
                &[
                    ("global", Cloud::Global),
                    ("usgov", Cloud::UsGov),
                    ("usgov-dod", Cloud::UsGovDod),
                    ("china", Cloud::China),
                ],
            ),
            None => Some(Cloud::Global),
        };

        let credential = self.credential(&r, &table);
        if let (Some(t), Some(Credential::ClientSecret { .. } | Credential::Certificate { .. })) =
            (&tenant, &credential)
            && MULTI_TENANT.contains(&t.to_ascii_lowercase().as_str())
            && let Some(raw) = r.get("tenant")
        {
            self.c.at(&raw.span(), &key("tenant"), format!("app-only sign-in needs one tenant, not \"{t}\" (Entra answers AADSTS50194); write your tenant's domain or Tenant ID"));
            ok = false;
        }

        let ca_file = match r.get("ca_file") {
            Some(p) => match self.path(&key("ca_file"), p, "/etc/postern/ca.pem") {
                Some(path) => match check_pem(&path, Pem::Cert) {
                    Ok(()) => Some(path),
                    Err(msg) => {
                        self.c.at(&p.span(), &key("ca_file"), msg);
                        ok = false;
                        None
                    }
                },
                None => None,
            },
            None => None,
        };
        let proxy = match r.get("proxy") {
            Some(p)
                if p.get_ref().starts_with("http://") || p.get_ref().starts_with("https://") =>
            {
                Some(p.get_ref().clone())
            }
            Some(p) => {
                self.c.at(&p.span(), &key("proxy"), format!("{:?} is not a proxy URL; write one such as \"http://proxy.example.com:3128\"", p.get_ref()));
                ok = false;
                None
            }
            None => None,
        };

        let (tenant, client_id, cloud, credential) = (tenant?, client_id?, cloud?, credential?);
        let mut endpoints = cloud.endpoints(&tenant);
        if let Some(a) = r.get("authority") {
            match self.url(&key("authority"), a) {
                Some(u) => {
                    let d = Endpoints::derive(
                        &u,
                        &tenant,
                        &endpoints.graph_url,
                        &endpoints.smtp_host,
                        &endpoints.smtp_delegated_resource,
                        &endpoints.smtp_app_resource,
                    );
                    endpoints.authority = d.authority;
                    endpoints.token_url = d.token_url;
                    endpoints.device_code_url = d.device_code_url;
                    endpoints.authorize_url = d.authorize_url;
                }
                None => ok = false,
            }
        }
        for (k, slot) in [
            ("token_url", &mut endpoints.token_url),
            ("device_code_url", &mut endpoints.device_code_url),
            ("authorize_url", &mut endpoints.authorize_url),
            ("graph_url", &mut endpoints.graph_url),
        ] {
            if let Some(v) = r.get(k) {
                match self.url(&key(k), v) {
                    Some(u) => *slot = u,
                    None => ok = false,
                }
            }
        }
        if let Some(h) = r.get("smtp_host") {
            let host = h.get_ref().trim();
            if host.is_empty() || host.contains(['/', ' ', ':']) {
                self.c.at(&h.span(), &key("smtp_host"), format!("{:?} is not a host name; write one such as \"smtp.office365.com\" (the port goes in smtp_port)", h.get_ref()));
                ok = false;
            } else {
                endpoints.smtp_host = host.to_owned();
            }
        }
        if let Some(p) = r.get("smtp_port") {
            match p.get_ref().parse::<u16>() {
                Ok(n) if n > 0 => endpoints.smtp_port = n,
                _ => {
                    self.c.at(
                        &p.span(),
                        &key("smtp_port"),
                        format!(
                            "{} is not a port; write 587 (Exchange Online's submission port)",
                            p.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(AccountConfig {
            name: r.name,
            tenant,
            client_id,
            cloud,
            endpoints,
            ca_file,
            proxy,
            credential,
        })
    }

    fn credential(&mut self, r: &RawAccount, table: &str) -> Option<Credential> {
        let key = |k: &str| format!("{table}.{k}");
        let Some(auth) = r.get("auth") else {
            self.missing(
                &r.header,
                table,
                "auth",
                "auth = \"client_secret\", \"certificate\" or \"delegated\"",
            );
            return None;
        };
        let auth = self.choice(
            &key("auth"),
            auth,
            &[("client_secret", 0u8), ("certificate", 1), ("delegated", 2)],
        )?;
        // Keys that belong to another kind of credential are errors: they usually mean the
        // admin changed `auth` and forgot the rest, or the other way round.
        let allowed = if auth == 1 {
            CERTIFICATE_KEYS
        } else {
            SECRET_KEYS
        };
        let auth_word = ["client_secret", "certificate", "delegated"][auth as usize];
        let mut ok = true;
        for (k, v) in &r.values {
            let is_credential_key =
                SECRET_KEYS.contains(&k.as_str()) || CERTIFICATE_KEYS.contains(&k.as_str());
            if is_credential_key && !allowed.contains(&k.as_str()) {
                self.c.at(
                    &v.span(),
                    &key(k),
                    format!(
                        "{k} does not apply to auth = \"{auth_word}\"; remove it, or change auth"
                    ),
                );
                ok = false;
            }
        }
        let cred = match auth {
            0 => {
                let secret = self.secret(r, table, "client_secret", true)?;
                // Each key is judged even when another failed: all errors at once.
                let style = match r.get("secret_style") {
                    Some(s) => self.choice(
                        &key("secret_style"),
                        s,
                        &[("body", SecretStyle::Body), ("basic", SecretStyle::Basic)],
                    ),
                    None => Some(SecretStyle::Body),
                };
                let expires = match r.get("secret_expires") {
                    Some(d) => match parse_date(d.get_ref()) {
                        Some(t) => Some(Some(t)),
                        None => {
                            self.c.at(&d.span(), &key("secret_expires"), format!("{:?} is not a date; write the Expires date shown under Certificates & secrets, such as 2027-01-31", d.get_ref()));
                            None
                        }
                    },
                    None => Some(None),
                };
                let (style, expires) = (style?, expires?);
                Credential::ClientSecret {
                    secret: secret?,
                    style,
                    expires,
                }
            }
            1 => {
                let cert = match r.get("certificate") {
                    Some(p) => {
                        let path =
                            self.path(&key("certificate"), p, "/etc/postern/entra-cert.pem")?;
                        if let Err(msg) = check_pem(&path, Pem::Cert) {
                            self.c.at(&p.span(), &key("certificate"), msg);
                            None
                        } else {
                            Some(path)
                        }
                    }
                    None => {
                        self.missing(&r.header, table, "certificate", "certificate = \"/etc/postern/entra-cert.pem\" (the certificate uploaded under Certificates & secrets)");
                        None
                    }
                };
                let key_src = self.secret(r, table, "private_key", true);
                let alg = match r.get("assertion_alg") {
                    Some(a) => self.choice(
                        &key("assertion_alg"),
                        a,
                        &[
                            ("PS256", AssertionAlg::Ps256),
                            ("RS256", AssertionAlg::Rs256),
                        ],
                    )?,
                    None => AssertionAlg::Ps256,
                };
                Credential::Certificate {
                    cert: cert?,
                    key: key_src??,
                    alg,
                }
            }
            _ => Credential::Delegated {
                secret: self.secret(r, table, "client_secret", false)?,
            },
        };
        ok.then_some(cred)
    }

    /// Exactly one of `{base}` (inline), `{base}_file`, `{base}_env`, `{base}_credential`.
    /// `Some(None)` when none is written and none is required.
    pub(super) fn secret(
        &mut self,
        r: &RawAccount,
        table: &str,
        base: &str,
        required: bool,
    ) -> Option<Option<SecretSource>> {
        let inline_key = if base == "private_key" {
            None
        } else {
            Some(base.to_owned())
        };
        let mut found: Vec<(String, &Spanned<String>)> = Vec::new();
        for suffix in ["", "_file", "_env", "_credential"] {
            let k = format!("{base}{suffix}");
            if suffix.is_empty() && inline_key.is_none() {
                continue;
            }
            if let Some(v) = r.get(&k) {
                found.push((k, v));
            }
        }
        match found.as_slice() {
            [] if required => {
                let example = if base == "private_key" {
                    "private_key_file = \"/etc/postern/entra-key.pem\" (mode 0600), private_key_env or private_key_credential"
                } else {
                    "client_secret_file = \"/etc/postern/client-secret\" (mode 0600), client_secret_env = \"VAR\" or client_secret_credential = \"NAME\" (systemd LoadCredential)"
                };
                self.missing(&r.header, table, &format!("{base}_file"), example);
                None
            }
            [] => Some(None),
            [(k, v)] => {
                let path = format!("{table}.{k}");
                let value = v.get_ref().trim();
                if value.is_empty() {
                    self.c.at(&v.span(), &path, "the value is empty".to_owned());
                    return None;
                }
                let src = if k.ends_with("_file") {
                    let p: PathBuf = self.path(&path, v, "/etc/postern/secret")?;
                    if let Err(e) = std::fs::File::open(&p) {
                        self.c.at(&v.span(), &path, format!("cannot read {}: {e}; create the file (mode 0600, readable by the postern user) or fix the path", p.display()));
                        return None;
                    }
                    SecretSource::File(p)
                } else if k.ends_with("_env") {
                    SecretSource::Env(value.to_owned())
                } else if k.ends_with("_credential") {
                    SecretSource::SystemdCredential(value.to_owned())
                } else {
                    SecretSource::Inline(Secret::new(v.get_ref().clone()))
                };
                Some(Some(src))
            }
            [_, (k2, v2), ..] => {
                let names: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
                self.c.at(
                    &v2.span(),
                    &format!("{table}.{k2}"),
                    format!(
                        "write only one of {}; postern would not know which to use",
                        names.join(", ")
                    ),
                );
                None
            }
        }
    }

    /// A URL for an endpoint: https, or http only to a loopback host (test fakes, local proxies).
    fn url(&mut self, path: &str, raw: &Spanned<String>) -> Option<String> {
        let u = raw.get_ref().trim().trim_end_matches('/');
        let loopback = [
            "http://127.",
            "http://localhost:",
            "http://localhost/",
            "http://[::1]",
        ];
        let host_ok = u
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(' '));
        if host_ok || loopback.iter().any(|p| u.starts_with(p)) || u == "http://localhost" {
            return Some(u.to_owned());
        }
        self.c.at(&raw.span(), path, format!("{:?} is not an https:// URL (plain http is only allowed to 127.0.0.1 or localhost); write one such as \"https://login.microsoftonline.com\"", raw.get_ref()));
        None
    }
}

fn is_guid(s: &str) -> bool {
    let s = s.trim();
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn valid_tenant(s: &str) -> bool {
    let s = s.trim();
    is_guid(s)
        || MULTI_TENANT.contains(&s.to_ascii_lowercase().as_str())
        || (s.contains('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && !s.starts_with('.')
            && !s.ends_with('.'))
}

/// `YYYY-MM-DD` (or a TOML date/datetime starting with it) → seconds since the epoch at 00:00 UTC.
pub(crate) fn parse_date(s: &str) -> Option<u64> {
    let d = s.trim().get(..10)?;
    let mut it = d.split('-');
    let (y, m, day) = (
        it.next()?.parse::<i64>().ok()?,
        it.next()?.parse::<u32>().ok()?,
        it.next()?.parse::<u32>().ok()?,
    );
    if d.len() != 10 || !(1..=12).contains(&m) || !(1..=31).contains(&day) || y < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ids() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2027-01-31"), Some(1_801_353_600));
        assert_eq!(parse_date("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        assert_eq!(parse_date("31/01/2027"), None);
        assert!(is_guid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(!is_guid("0f8fad5b-d9cb-469f-a165-70867728950"));
        assert!(valid_tenant("contoso.onmicrosoft.com"));
        assert!(!valid_tenant("contoso"));
    }
}
