//! `postern token`: acquire a token and show what is in it (never the token itself unless
//! asked), with warnings when its claims cannot work for the chosen API.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::Value;

use super::Audience;
use crate::config::Endpoints;

/// Exchange Online's well-known application id (v1 tokens may carry it as `aud`).
const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";
/// Microsoft Graph's well-known application id.
const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";

/// Why a token's claims could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    /// Not header.claims.signature.
    #[error("the access token is not a JWT (opaque token): its claims cannot be shown")]
    NotJwt,
    /// The middle part is not base64url JSON.
    #[error("the access token's claims are not base64url JSON")]
    BadClaims,
}

/// The claims that matter for sending mail.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    /// `aud`.
    pub aud: Option<String>,
    /// `scp`, split on spaces (delegated permissions).
    pub scp: Vec<String>,
    /// `roles` (application permissions).
    pub roles: Vec<String>,
    /// `upn`, `preferred_username` or `unique_name`.
    pub upn: Option<String>,
    /// `oid`.
    pub oid: Option<String>,
    /// `tid`.
    pub tid: Option<String>,
    /// `appid` (v1) or `azp` (v2).
    pub appid: Option<String>,
    /// `exp`, seconds since the epoch.
    pub exp: Option<u64>,
}

/// Decode (not verify: we are the client, not the API) a JWT's claims.
pub fn decode_claims(token: &str) -> Result<Claims, InspectError> {
    let mut parts = token.split('.');
    let (Some(_), Some(body), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(InspectError::NotJwt);
    };
    let bytes = B64URL
        .decode(body.trim_end_matches('='))
        .map_err(|_| InspectError::BadClaims)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| InspectError::BadClaims)?;
    if !v.is_object() {
        return Err(InspectError::BadClaims);
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Claims {
        aud: match v.get("aud") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_string),
            _ => s("aud"),
        },
        scp: s("scp")
            .map(|x| x.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        roles: v
            .get("roles")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        upn: s("upn")
            .or_else(|| s("preferred_username"))
            .or_else(|| s("unique_name")),
        oid: s("oid"),
        tid: s("tid"),
        appid: s("appid").or_else(|| s("azp")),
        exp: v.get("exp").and_then(Value::as_u64),
    })
}

fn has(list: &[String], p: &str) -> bool {
    list.iter().any(|x| x.eq_ignore_ascii_case(p))
}

fn is_graph_aud(aud: &str, endpoints: &Endpoints) -> bool {
    let a = aud.trim_end_matches('/');
    a == GRAPH_APP_ID
        || a.eq_ignore_ascii_case(&endpoints.graph_url)
        || a.contains("graph.microsoft")
}

fn is_exchange_aud(aud: &str, endpoints: &Endpoints) -> bool {
    let a = aud.trim_end_matches('/');
    a == EXCHANGE_APP_ID
        || a.eq_ignore_ascii_case(&endpoints.smtp_delegated_resource)
        || a.eq_ignore_ascii_case(&endpoints.smtp_app_resource)
        || a.contains("outlook.")
}

/// Why these claims will not work for `audience` (empty when they look right).
pub fn warnings(c: &Claims, audience: Audience, endpoints: &Endpoints, now: u64) -> Vec<String> {
    let mut w = Vec::new();
    let aud = c.aud.as_deref().unwrap_or("");
    match audience {
        Audience::Smtp => {
            if is_graph_aud(aud, endpoints) {
                w.push(format!(
                    "this is a Microsoft Graph token (aud {aud}); Exchange SMTP AUTH will refuse it with 535 5.7.3: ask for --for smtp"
                ));
            } else if !is_exchange_aud(aud, endpoints) {
                w.push(format!(
                    "the audience {aud:?} is not Exchange Online ({}): SMTP AUTH will refuse it",
                    endpoints.smtp_app_resource
                ));
            }
            if !c.scp.is_empty() && !has(&c.scp, "SMTP.Send") {
                w.push("the token has no SMTP.Send permission (scp): add Office 365 Exchange Online → Delegated permissions → SMTP.Send to the app registration and sign in again".into());
            }
            if c.scp.is_empty() && !has(&c.roles, "SMTP.SendAsApp") {
                w.push("the token has no SMTP.SendAsApp role: fine only with RBAC for Applications (New-ManagementRoleAssignment -Role 'Application SMTP.SendAsApp'); otherwise add Office 365 Exchange Online → Application permissions → SMTP.SendAsApp and grant admin consent".into());
            }
        }
        Audience::Graph => {
            if !is_graph_aud(aud, endpoints) {
                w.push(format!(
                    "the audience {aud:?} is not Microsoft Graph ({}): sendMail will answer 401 InvalidAuthenticationToken",
                    endpoints.graph_url
                ));
            }
            if !has(&c.scp, "Mail.Send") && !has(&c.roles, "Mail.Send") {
                w.push("the token has no Mail.Send permission: Graph will answer 403 ErrorAccessDenied; add Microsoft Graph → Mail.Send (Application for app-only, Delegated for login) and grant admin consent".into());
            }
        }
    }
    match c.exp {
        Some(e) if e <= now => w.push("the token has expired".into()),
        None => w.push("the token has no exp claim".into()),
        _ => {}
    }
    w
}

/// The claims as aligned `name: value` lines.
pub fn render(c: &Claims, now: u64) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<6} {v}\n"));
    line("aud:", c.aud.as_deref().unwrap_or("-"));
    if !c.scp.is_empty() {
        line("scp:", &c.scp.join(" "));
    }
    if !c.roles.is_empty() {
        line("roles:", &c.roles.join(" "));
    }
    if c.scp.is_empty() && c.roles.is_empty() {
        line("scp:", "- (no scp or roles claim)");
    }
    if let Some(u) = &c.upn {
        line("upn:", u);
    }
    line("oid:", c.oid.as_deref().unwrap_or("-"));
    line("tid:", c.tid.as_deref().unwrap_or("-"));
    line("appid:", c.appid.as_deref().unwrap_or("-"));
    match c.exp {
        Some(e) => {
            let when = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(e));
            let rel = if e > now {
                format!(
                    "in {}",
                    humantime::format_duration(Duration::from_secs(e - now))
                )
            } else {
                format!(
                    "{} ago",
                    humantime::format_duration(Duration::from_secs(now - e))
                )
            };
            line("exp:", &format!("{when} ({rel})"));
        }
        None => line("exp:", "-"),
    }
    out
}

/// `postern token ACCOUNT [--mailbox M] [--for smtp|graph] [--show-token]`: get a fresh token
/// and print its claims and warnings; returns the exit code (0, 64 usage, 75 temporary,
/// 78 configuration).
pub async fn run(
    cfg: &crate::config::Config,
    account: &str,
    mailbox: Option<&str>,
    audience: Audience,
    show_token: bool,
) -> u8 {
    use super::entra::{GrantKind, grant_kind, now_secs};
    use super::{StoreOptions, TokenError, TokenStore};
    let Some(acct) = cfg.account(account) else {
        eprintln!("postern: there is no [account.{account}] in {}", cfg.source);
        return 78;
    };
    let delegated = grant_kind(acct) == GrantKind::Delegated;
    if delegated && mailbox.is_none() {
        eprintln!(
            "postern: [account.{account}] is delegated: give the signed-in mailbox with --mailbox"
        );
        return 64;
    }
    let store = TokenStore::new(vec![acct.clone()], &cfg.state_dir, StoreOptions::default());
    for w in store.expiry_warnings() {
        println!("warning: {w}");
    }
    let t = match store
        .refresh_now(account, mailbox.unwrap_or(""), audience)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("postern: {e}");
            return match e {
                TokenError::Configuration(_) => 78,
                TokenError::Transient(_) => 75,
            };
        }
    };
    let now = now_secs();
    println!(
        "account {account}{}: {audience} token acquired",
        mailbox.map(|m| format!(" mailbox {m}")).unwrap_or_default()
    );
    match decode_claims(t.token.expose()) {
        Ok(c) => {
            print!("{}", render(&c, now));
            for w in warnings(&c, audience, &acct.endpoints, now) {
                println!("warning: {w}");
            }
        }
        Err(e) => println!("note: {e}"),
    }
    if show_token {
        println!("token: {}", t.token.expose());
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cloud;

    fn jwt(claims: Value) -> String {
        format!(
            "{}.{}.sig",
            B64URL.encode(r#"{"typ":"JWT","alg":"RS256"}"#),
            B64URL.encode(claims.to_string())
        )
    }

    #[test]
    fn decodes_delegated_and_app_claims() {
        let t = jwt(serde_json::json!({
            "aud": "https://outlook.office.com", "scp": "SMTP.Send User.Read",
            "upn": "scanner@contoso.com", "oid": "o", "tid": "t", "appid": "a", "exp": 100
        }));
        let c = decode_claims(&t).unwrap();
        assert_eq!(c.aud.as_deref(), Some("https://outlook.office.com"));
        assert_eq!(c.scp, vec!["SMTP.Send", "User.Read"]);
        assert_eq!(c.upn.as_deref(), Some("scanner@contoso.com"));
        assert_eq!(c.exp, Some(100));
        let t = jwt(
            serde_json::json!({"aud": "https://graph.microsoft.com", "roles": ["Mail.Send"], "azp": "x", "exp": 1}),
        );
        let c = decode_claims(&t).unwrap();
        assert_eq!(c.roles, vec!["Mail.Send"]);
        assert_eq!(c.appid.as_deref(), Some("x"));
    }

    #[test]
    fn opaque_and_broken_tokens_are_errors() {
        assert_eq!(
            decode_claims("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"),
            Err(InspectError::NotJwt)
        );
        assert_eq!(decode_claims("a.!!!.c"), Err(InspectError::BadClaims));
        assert_eq!(decode_claims("a.b.c.d"), Err(InspectError::NotJwt));
    }

    #[test]
    fn warns_when_claims_cannot_work() {
        let ep = Cloud::Global.endpoints("contoso.com");
        let graph = decode_claims(&jwt(serde_json::json!({"aud": "https://graph.microsoft.com", "scp": "Mail.Send", "exp": 10}))).unwrap();
        let w = warnings(&graph, Audience::Smtp, &ep, 5);
        assert!(
            w.iter().any(|x| x.contains("Microsoft Graph token")),
            "{w:?}"
        );
        assert!(w.iter().any(|x| x.contains("SMTP.Send")), "{w:?}");
        assert!(warnings(&graph, Audience::Graph, &ep, 5).is_empty());
        assert!(
            warnings(&graph, Audience::Graph, &ep, 11)
                .iter()
                .any(|x| x.contains("expired"))
        );
        let smtp_app = decode_claims(&jwt(serde_json::json!({"aud": "https://outlook.office365.com", "roles": ["SMTP.SendAsApp"], "exp": 10}))).unwrap();
        assert!(warnings(&smtp_app, Audience::Smtp, &ep, 5).is_empty());
        let no_role = decode_claims(&jwt(
            serde_json::json!({"aud": "00000002-0000-0ff1-ce00-000000000000", "exp": 10}),
        ))
        .unwrap();
        let w = warnings(&no_role, Audience::Smtp, &ep, 5);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("RBAC"));
        let graph_no_perm = decode_claims(&jwt(serde_json::json!({"aud": "https://graph.microsoft.com", "scp": "User.Read", "exp": 10}))).unwrap();
        assert!(warnings(&graph_no_perm, Audience::Graph, &ep, 5)[0].contains("Mail.Send"));
    }

    #[test]
    fn render_shows_every_field() {
        let c = decode_claims(&jwt(serde_json::json!({"aud": "A", "roles": ["R"], "tid": "T", "appid": "P", "oid": "O", "exp": 3600}))).unwrap();
        let r = render(&c, 0);
        for s in [
            "aud:   A", "roles: R", "tid:   T", "appid: P", "oid:   O", "in 1h",
        ] {
            assert!(r.contains(s), "{s} in {r}");
        }
    }
}
