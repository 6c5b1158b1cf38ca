//! Configuration from `POSTERN_*` environment variables, for the common Docker sidecar case
//! (one listener set, one Entra account, one route) so that a compose file needs no TOML.
//!
//! The variables are turned into the TOML they stand for and validated by the same code as a
//! file; an error names the variable instead of a line. Anything beyond this (several routes,
//! users, TLS) takes a mounted configuration file.

use super::{ConfigErrors, load_str};
use crate::config::Config;

/// Every variable read here, with what it sets (for docs and `postern check`).
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "POSTERN_LISTEN",
        "addresses to listen on, comma-separated [0.0.0.0:25]",
    ),
    (
        "POSTERN_ALLOW_NETWORKS",
        "client networks allowed to connect [loopback and the private ranges]",
    ),
    (
        "POSTERN_HOSTNAME",
        "name in the greeting and Received: [the host name]",
    ),
    (
        "POSTERN_MAX_MESSAGE_SIZE",
        "largest message accepted [35 MB]",
    ),
    (
        "POSTERN_SHUTDOWN_GRACE",
        "delivery.shutdown_grace [8s: inside docker stop's 10 s]",
    ),
    ("POSTERN_SPOOL_DIR", "spool directory [/var/spool/postern]"),
    ("POSTERN_STATE_DIR", "state directory [/var/lib/postern]"),
    ("POSTERN_TENANT", "Entra tenant (domain or Tenant ID)"),
    ("POSTERN_CLIENT_ID", "Application (client) ID"),
    (
        "POSTERN_AUTH",
        "certificate, client_secret or delegated [certificate if POSTERN_CERTIFICATE is set, else client_secret]",
    ),
    (
        "POSTERN_CLIENT_SECRET_FILE",
        "file holding the client secret (e.g. /run/secrets/...)",
    ),
    ("POSTERN_CLIENT_SECRET", "the client secret itself"),
    ("POSTERN_CERTIFICATE", "certificate file (PEM)"),
    ("POSTERN_PRIVATE_KEY_FILE", "its private key file (PEM)"),
    (
        "POSTERN_CLOUD",
        "global, usgov, usgov-dod or china [global]",
    ),
    (
        "POSTERN_SENDERS",
        "envelope senders accepted, comma-separated [*]",
    ),
    ("POSTERN_MAILBOX", "mailbox to send as [each sender's own]"),
    (
        "POSTERN_TRANSPORT",
        "smtp, graph, file or discard [smtp with POSTERN_TENANT, else file]",
    ),
    (
        "POSTERN_FILE_DIR",
        "directory of the file transport [STATE_DIR/delivered]",
    ),
];

/// The source name of a configuration built from the environment.
pub const ENV_SOURCE: &str = "<environment>";

/// The `POSTERN_*` configuration variables that are set (non-empty), in [`VARIABLES`] order.
pub fn present() -> Vec<&'static str> {
    VARIABLES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()))
        .collect()
}

/// Build and validate the configuration the variables describe.
pub fn load_env() -> Result<Config, ConfigErrors> {
    load_from(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(s: &str) -> String {
    let items: Vec<String> = s
        .split([',', ' ', '\n', '\t'])
        .filter(|p| !p.is_empty())
        .map(quote)
        .collect();
    format!("[{}]", items.join(", "))
}

/// The TOML the variables stand for.
fn toml_text(get: &dyn Fn(&str) -> Option<String>) -> String {
    let mut t = String::new();
    let mut line = |s: String| {
        t.push_str(&s);
        t.push('\n');
    };
    if let Some(h) = get("POSTERN_HOSTNAME") {
        line(format!("hostname = {}", quote(&h)));
    }
    let state = get("POSTERN_STATE_DIR").unwrap_or_else(|| "/var/lib/postern".into());
    line(format!(
        "spool_dir = {}",
        quote(&get("POSTERN_SPOOL_DIR").unwrap_or_else(|| "/var/spool/postern".into()))
    ));
    line(format!("state_dir = {}", quote(&state)));
    line("[delivery]".into());
    line(format!(
        "shutdown_grace = {}",
        quote(&get("POSTERN_SHUTDOWN_GRACE").unwrap_or_else(|| "8s".into()))
    ));
    let listen = get("POSTERN_LISTEN").unwrap_or_else(|| "0.0.0.0:25".into());
    let networks = get("POSTERN_ALLOW_NETWORKS").unwrap_or_else(|| {
        "127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7".into()
    });
    for (i, addr) in listen
        .split([',', ' ', '\n', '\t'])
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        line(format!("[listener.env{}]", i + 1));
        line(format!("address = {}", quote(addr)));
        line(format!("allow_networks = {}", list(&networks)));
        if let Some(size) = get("POSTERN_MAX_MESSAGE_SIZE") {
            line(format!("max_message_size = {}", quote(&size)));
        }
    }
    let tenant = get("POSTERN_TENANT");
    let has_account = tenant.is_some() || get("POSTERN_CLIENT_ID").is_some();
    if has_account {
        line("[account.m365]".into());
        line(format!("tenant = {}", quote(&tenant.unwrap_or_default())));
        line(format!(
            "client_id = {}",
            quote(&get("POSTERN_CLIENT_ID").unwrap_or_default())
        ));
        if let Some(c) = get("POSTERN_CLOUD") {
            line(format!("cloud = {}", quote(&c)));
        }
        let auth = get("POSTERN_AUTH").unwrap_or_else(|| {
            if get("POSTERN_CERTIFICATE").is_some() {
                "certificate".into()
            } else {
                "client_secret".into()
            }
        });
        line(format!("auth = {}", quote(&auth)));
        if let Some(f) = get("POSTERN_CLIENT_SECRET_FILE") {
            line(format!("client_secret_file = {}", quote(&f)));
        }
        if get("POSTERN_CLIENT_SECRET").is_some() {
            line("client_secret_env = \"POSTERN_CLIENT_SECRET\"".into());
        }
        if let Some(f) = get("POSTERN_CERTIFICATE") {
            line(format!("certificate = {}", quote(&f)));
        }
        if let Some(f) = get("POSTERN_PRIVATE_KEY_FILE") {
            line(format!("private_key_file = {}", quote(&f)));
        }
    }
    line("[route.env]".into());
    line(format!(
        "senders = {}",
        list(&get("POSTERN_SENDERS").unwrap_or_else(|| "*".into()))
    ));
    if let Some(m) = get("POSTERN_MAILBOX") {
        line(format!("mailbox = {}", quote(&m)));
    }
    let transport = get("POSTERN_TRANSPORT").unwrap_or_else(|| {
        if has_account {
            "smtp".into()
        } else {
            "file".into()
        }
    });
    line(format!("transport = {}", quote(&transport)));
    if transport == "file" {
        let dir = get("POSTERN_FILE_DIR").unwrap_or_else(|| format!("{state}/delivered"));
        line(format!("dir = {}", quote(&dir)));
    } else if transport == "smtp" || transport == "graph" {
        line("account = \"m365\"".into());
    }
    t
}

/// The variable behind a key of the generated TOML.
fn variable_for(key: &str) -> &'static str {
    let field = key.rsplit('.').next().unwrap_or("");
    let field = field.split('[').next().unwrap_or("");
    match (key.split('.').next().unwrap_or(""), field) {
        ("listener", "allow_networks") => "POSTERN_ALLOW_NETWORKS",
        ("listener", "max_message_size") => "POSTERN_MAX_MESSAGE_SIZE",
        ("listener", _) => "POSTERN_LISTEN",
        ("account", "tenant") => "POSTERN_TENANT",
        ("account", "client_id") => "POSTERN_CLIENT_ID",
        ("account", "cloud") => "POSTERN_CLOUD",
        ("account", "client_secret_file") => "POSTERN_CLIENT_SECRET_FILE",
        ("account", "client_secret_env") => "POSTERN_CLIENT_SECRET",
        ("account", "certificate") => "POSTERN_CERTIFICATE",
        ("account", "private_key_file") => "POSTERN_PRIVATE_KEY_FILE",
        ("account", _) => "POSTERN_AUTH",
        ("route", "senders") => "POSTERN_SENDERS",
        ("route", "mailbox") => "POSTERN_MAILBOX",
        ("route", "dir") => "POSTERN_FILE_DIR",
        ("route", _) => "POSTERN_TRANSPORT",
        ("hostname", _) => "POSTERN_HOSTNAME",
        ("delivery", _) => "POSTERN_SHUTDOWN_GRACE",
        ("spool_dir", _) => "POSTERN_SPOOL_DIR",
        ("state_dir", _) => "POSTERN_STATE_DIR",
        _ => "POSTERN_*",
    }
}

fn load_from(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let text = toml_text(&get);
    load_str(&text, ENV_SOURCE).map_err(|errs| {
        ConfigErrors(
            errs.0
                .into_iter()
                .map(|mut e| {
                    e.file = format!("environment variable {}", variable_for(&e.key));
                    e.line = None;
                    e.column = None;
                    e
                })
                .collect(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_from(move |n| m.get(n).cloned())
    }

    #[test]
    fn defaults_make_a_working_sidecar_with_the_file_transport() {
        let c = load(&[("POSTERN_LISTEN", "0.0.0.0:25")]).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.to_string(), "0.0.0.0:25");
        assert!(
            c.listeners[0]
                .allow_networks
                .iter()
                .any(|n| n.to_string() == "172.16.0.0/12")
        );
        assert_eq!(c.spool_dir.to_str(), Some("/var/spool/postern"));
        assert!(matches!(
            &c.routes[0].transport,
            crate::config::TransportConfig::File { dir } if dir.to_str() == Some("/var/lib/postern/delivered")
        ));
    }

    #[test]
    fn an_account_makes_the_smtp_route() {
        let c = load(&[
            ("POSTERN_LISTEN", "0.0.0.0:25, [::]:25"),
            ("POSTERN_TENANT", "contoso.onmicrosoft.com"),
            ("POSTERN_CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
            ("POSTERN_CLIENT_SECRET", "x"),
            ("POSTERN_SENDERS", "*@contoso.com"),
            ("POSTERN_MAILBOX", "printer@contoso.com"),
        ])
        .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.accounts[0].tenant, "contoso.onmicrosoft.com");
        assert!(matches!(
            &c.routes[0].transport,
            crate::config::TransportConfig::Smtp { account } if account == "m365"
        ));
        assert_eq!(c.routes[0].mailbox.as_deref(), Some("printer@contoso.com"));
    }

    #[test]
    fn postern_transport_graph_makes_a_graph_route() {
        let c = load(&[
            ("POSTERN_TENANT", "contoso.onmicrosoft.com"),
            ("POSTERN_CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
            ("POSTERN_CLIENT_SECRET", "x"),
            ("POSTERN_TRANSPORT", "graph"),
        ])
        .unwrap();
        assert!(matches!(
            &c.routes[0].transport,
            crate::config::TransportConfig::Graph { account, save_to_sent_items: true, .. } if account == "m365"
        ));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = load(&[
            ("POSTERN_LISTEN", "nonsense"),
            ("POSTERN_ALLOW_NETWORKS", "0.0.0.0/0"),
            ("POSTERN_TRANSPORT", "carrier-pigeon"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("environment variable POSTERN_LISTEN"), "{e}");
        assert!(e.contains("environment variable POSTERN_TRANSPORT"), "{e}");
        assert!(!e.contains("<environment>:"), "{e}");
    }
}
