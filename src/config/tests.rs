//! Tests of the whole configuration module: the error cases kept as data in `tests/configs/`,
//! the shipped configurations, path resolution and error collection.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    ACCOUNT_KEYS, ADMIN_KEYS, DELIVERY_KEYS, LIMITS_KEYS, LISTENER_KEYS, ROUTE_KEYS, TOP_KEYS,
    USER_KEYS,
};
use super::*;

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$cG9zdGVybi10ZXN0LXNhbHQ$vQHoBfYySye3Ul3+1wE9tIiPw+P/TYI5Er0b+aERM6c";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(manifest_dir().join("tests/configs"))
        .expect("tests/configs exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Every `tests/configs/NN-name/postern.toml` must fail to load, and every non-empty line of
/// its `expected-error` must appear in the error output.
#[test]
fn error_cases_report_what_is_expected() {
    let dirs = case_dirs();
    assert!(
        dirs.len() >= 15,
        "expected at least 15 cases, found {}",
        dirs.len()
    );
    let mut failures = Vec::new();
    for dir in &dirs {
        let expected = fs::read_to_string(dir.join("expected-error"))
            .unwrap_or_else(|e| panic!("{}: expected-error: {e}", dir.display()));
        let output = match load_file(&dir.join("postern.toml")) {
            Ok(_) => {
                failures.push(format!("{}: loaded without errors", dir.display()));
                continue;
            }
            Err(e) => e.to_string(),
        };
        for line in expected
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if !output.contains(line) {
                failures.push(format!(
                    "{}:\n  missing: {line}\n  output:\n{output}\n",
                    dir.display()
                ));
            }
        }
        // Every error line has the shape FILE:LINE:COLUMN: ...
        for err_line in output.lines() {
            let after = err_line.split_once("postern.toml:").map(|(_, rest)| rest);
            let located = after.is_some_and(|rest| {
                let mut parts = rest.splitn(3, ':');
                parts.next().is_some_and(|l| l.parse::<usize>().is_ok())
                    && parts.next().is_some_and(|c| c.parse::<usize>().is_ok())
            });
            if !located {
                failures.push(format!(
                    "{}: line without file:line:column: {err_line}",
                    dir.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn multiple_errors_come_at_once() {
    let dir = manifest_dir().join("tests/configs/14-multiple-errors");
    let errors = load_file(&dir.join("postern.toml")).expect_err("case 14 must fail");
    assert_eq!(errors.len(), 3, "{errors}");
    // One per line, in file order.
    let text = errors.to_string();
    assert_eq!(text.lines().count(), 3);
    let lines: Vec<usize> = errors.iter().filter_map(|e| e.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

#[test]
fn embedded_default_loads() {
    let config = load_default().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.source, "<embedded default>");
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].address.to_string(), "127.0.0.1:2525");
    assert_eq!(config.listeners[0].auth, AuthMode::None);
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(config.spool_dir, cwd.join("postern-data/spool"));
    match &config.routes[0].transport {
        TransportConfig::File { dir } => assert_eq!(dir, &cwd.join("postern-data/delivered")),
        other => panic!("expected the file transport, got {other:?}"),
    }
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn example_config_loads_and_documents_every_key() {
    let path = manifest_dir().join("config/postern.toml");
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 2);
    let lan = &config.listeners[0];
    assert_eq!(lan.max_message_size, 35_000_000);
    assert_eq!(lan.allow_networks.len(), 2);
    assert_eq!(config.delivery.max_lifetime, Duration::from_secs(5 * 86400));
    // Every key the parser knows appears in the example (commented or not).
    let text = fs::read_to_string(&path).expect("example readable");
    for key in TOP_KEYS
        .iter()
        .chain(LIMITS_KEYS)
        .chain(DELIVERY_KEYS)
        .chain(LISTENER_KEYS)
        .chain(USER_KEYS)
        .chain(ROUTE_KEYS)
        .chain(ACCOUNT_KEYS)
        .chain(ADMIN_KEYS)
    {
        assert!(
            text.contains(&format!("{key} =")) || text.contains(&format!("[{key}")),
            "example lacks {key}"
        );
    }
}

#[test]
fn example_config_loads_with_tls_and_users_uncommented() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path());
    let text = fs::read_to_string(manifest_dir().join("config/postern.toml"))
        .expect("example readable")
        .replace("tls = \"none\"\n#tls = \"starttls\"", "tls = \"starttls\"")
        .replace(
            "#tls_cert = \"/etc/postern/tls/cert.pem\"",
            "tls_cert = \"cert.pem\"",
        )
        .replace(
            "#tls_key = \"/etc/postern/tls/key.pem\"",
            "tls_key = \"key.pem\"",
        )
        .replace("#tls_min_version", "tls_min_version")
        .replace("#[user.scanner]", "[user.scanner]")
        .replace(
            "#password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$...$...\"",
            &format!("password_hash = \"{HASH}\""),
        )
        .replace("#may_send_as", "may_send_as")
        .replace("auth = \"none\"", "auth = \"optional\"");
    let path = tmp.path().join("postern.toml");
    fs::write(&path, text).expect("write");
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let lan = &config.listeners[0];
    assert_eq!(lan.tls, TlsMode::StartTls);
    let files = lan.tls_files.as_ref().expect("tls files");
    assert_eq!(files.cert, tmp.path().join("cert.pem"));
    assert_eq!(files.min_version, TlsMinVersion::Tls12);
    assert_eq!(config.users.len(), 1);
    assert!(
        config
            .user("scanner")
            .is_some_and(|u| u.may_send_as.len() == 2)
    );
    let described = config.describe();
    assert!(
        !described.contains("argon2"),
        "describe must not print hashes:\n{described}"
    );
    assert!(
        described.contains("user scanner: may send as scanner@example.com, *@example.org"),
        "{described}"
    );
}

fn write_cert(dir: &Path) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["relay.example.com".to_owned()]).expect("rcgen");
    fs::write(dir.join("cert.pem"), ck.cert.pem()).expect("write cert");
    fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).expect("write key");
}

const MINIMAL: &str = r#"
spool_dir = "spool"
state_dir = "/abs/state"
[listener.local]
address = "127.0.0.1:2525"
[route.default]
senders = ["*"]
transport = "file"
dir = "out/delivered"
"#;

#[test]
fn relative_paths_resolve_against_the_file_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("postern.toml");
    fs::write(&path, MINIMAL).expect("write");
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.spool_dir, tmp.path().join("spool"));
    assert_eq!(config.state_dir, PathBuf::from("/abs/state"));
    match &config.routes[0].transport {
        TransportConfig::File { dir } => assert_eq!(dir, &tmp.path().join("out/delivered")),
        other => panic!("expected the file transport, got {other:?}"),
    }
    // load_str with a path-like source resolves the same way.
    let source = path.display().to_string();
    let config = load_str(MINIMAL, &source).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.spool_dir, tmp.path().join("spool"));
}

#[test]
fn defaults_are_applied() {
    let c = load_str(MINIMAL, "<test>").unwrap_or_else(|e| panic!("{e}"));
    let l = &c.listeners[0];
    assert_eq!(l.tls, TlsMode::None);
    assert!(l.tls_files.is_none());
    assert_eq!(l.auth, AuthMode::None);
    assert_eq!(
        l.allow_networks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["127.0.0.0/8", "::1/128"]
    );
    assert_eq!(l.max_message_size, 35_000_000);
    assert_eq!(l.max_recipients, 100);
    assert_eq!(l.command_timeout, Duration::from_secs(300));
    assert_eq!(l.session_timeout, Duration::from_secs(1800));
    assert_eq!(l.max_errors, 10);
    assert_eq!(l.bare_lf, BareLfPolicy::Normalize);
    assert_eq!(c.limits.max_connections, 200);
    assert_eq!(c.limits.min_free_disk, 100_000_000);
    assert_eq!(c.limits.auth_lockout, Duration::from_secs(900));
    assert_eq!(c.delivery.per_mailbox_concurrency, 3);
    assert_eq!(c.delivery.retry_max, Duration::from_secs(3600));
    assert!(c.routes[0].mailbox.is_none());
    assert!(!c.hostname.is_empty());
}

#[test]
fn routes_keep_file_order_and_bare_ips_become_host_networks() {
    let text = format!(
        r#"
[listener.local]
address = "127.0.0.1:2525"
allow_networks = ["192.168.1.7", "fd00::1", "10.1.2.3/8"]
auth = "optional"
[user.zz]
password_hash = "{HASH}"
may_send_as = ["zz@example.com"]
[user.aa]
password_hash = "{HASH}"
may_send_as = ["*@example.com"]
[route.zz]
senders = ["zz@example.com"]
mailbox = "Shared@Example.com"
transport = "file"
dir = "a"
[route.aa]
senders = ["*"]
transport = "file"
dir = "b"
"#
    );
    let c = load_str(&text, "<test>").unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["zz", "aa"]);
    assert_eq!(c.users[0].name, "zz");
    assert_eq!(
        c.route_for("zz@example.com").map(|r| r.name.as_str()),
        Some("zz")
    );
    assert_eq!(
        c.route_for("other@example.org").map(|r| r.name.as_str()),
        Some("aa")
    );
    assert_eq!(c.routes[0].mailbox.as_deref(), Some("Shared@Example.com"));
    let nets: Vec<String> = c.listeners[0]
        .allow_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["192.168.1.7/32", "fd00::1/128", "10.0.0.0/8"]);
}

#[test]
fn auth_required_with_public_networks_and_tls_is_accepted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path());
    let text = format!(
        r#"
[listener.submission]
address = "0.0.0.0:587"
tls = "starttls"
tls_cert = "cert.pem"
tls_key = "key.pem"
tls_min_version = "1.3"
auth = "required"
allow_networks = ["0.0.0.0/0", "::/0"]
[user.app]
password_hash = "{HASH}"
may_send_as = ["app@example.com"]
[route.app]
senders = ["app@example.com"]
transport = "file"
dir = "out"
"#
    );
    let path = tmp.path().join("postern.toml");
    fs::write(&path, text).expect("write");
    let c = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.listeners[0].tls_files.as_ref().map(|f| f.min_version),
        Some(TlsMinVersion::Tls13)
    );
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let d = c.describe();
    assert!(d.contains("listener submission: 0.0.0.0:587"), "{d}");
    assert!(d.contains("starttls (cert "), "{d}");
    assert!(
        d.contains("route app (#1): app@example.com -> file "),
        "{d}"
    );
}

#[test]
fn tls_file_that_is_not_pem_is_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_cert(tmp.path());
    let text = r#"
[listener.s]
address = "127.0.0.1:465"
tls = "implicit"
tls_cert = "key.pem"
tls_key = "cert.pem"
[route.r]
senders = ["*"]
transport = "file"
dir = "out"
"#;
    let path = tmp.path().join("postern.toml");
    fs::write(&path, text).expect("write");
    let e = load_file(&path)
        .expect_err("swapped cert and key")
        .to_string();
    assert!(
        e.contains("listener.s.tls_cert: ") && e.contains("holds no PEM certificate chain"),
        "{e}"
    );
    assert!(
        e.contains("listener.s.tls_key: ") && e.contains("holds no PEM private key"),
        "{e}"
    );
}

#[test]
fn unreadable_file_names_the_path() {
    let e = load_file(Path::new("/nonexistent/postern.toml")).expect_err("missing file");
    let text = e.to_string();
    assert!(
        text.starts_with("/nonexistent/postern.toml: cannot read the configuration file"),
        "{text}"
    );
}

#[test]
fn warnings_flag_risky_but_legal_settings() {
    let text = r#"
[listener.lan]
address = "0.0.0.0:2525"
allow_networks = ["192.168.1.0/24"]
max_message_size = "200 MiB"
[route.all]
senders = ["*"]
transport = "file"
dir = "a"
[route.late]
senders = ["x@example.com"]
transport = "file"
dir = "b"
"#;
    let c = load_str(text, "<test>").unwrap_or_else(|e| panic!("{e}"));
    let w = c.warnings().join("\n");
    assert!(
        w.contains("listener.lan: any device on 192.168.1.0/24 may send"),
        "{w}"
    );
    assert!(w.contains("route.late: never used"), "{w}");
    assert!(w.contains("listener.lan.max_message_size"), "{w}");
}

#[test]
fn private_networks_are_recognised() {
    use super::validate::{is_private, parse_network};
    for private in [
        "127.0.0.1",
        "10.0.0.0/8",
        "172.20.0.0/16",
        "192.168.1.0/24",
        "fd12::/16",
        "fe80::1",
        "::ffff:10.1.1.1",
    ] {
        let net = parse_network(private).unwrap_or_else(|e| panic!("{e}"));
        assert!(is_private(&net), "{private}");
    }
    for public in [
        "0.0.0.0/0",
        "::/0",
        "8.8.8.8",
        "172.32.0.0/16",
        "10.0.0.0/7",
        "2001:db8::/32",
        "::ffff:0:0/96",
        "100.64.0.0/10",
    ] {
        let net = parse_network(public).unwrap_or_else(|e| panic!("{e}"));
        assert!(!is_private(&net), "{public}");
    }
}

#[test]
fn every_known_key_is_accepted_by_its_table() {
    // If a key is listed (for suggestions) but has no match arm, it would be "unknown".
    let text = format!(
        r#"
hostname = "relay.example.com"
spool_dir = "s"
state_dir = "t"
[limits]
{}
[delivery]
{}
[listener.l]
address = "127.0.0.1:1"
tls = "none"
auth = "optional"
allow_networks = ["127.0.0.1"]
max_message_size = 1000
max_recipients = 1
command_timeout = "1s"
data_timeout = "1s"
min_data_rate = 1
session_timeout = "1s"
max_errors = 1
bare_lf = "reject"
[user.u]
password_hash = "{HASH}"
may_send_as = ["*"]
[route.r]
senders = ["*"]
mailbox = "a@example.com"
transport = "file"
dir = "d"
"#,
        LIMITS_KEYS
            .iter()
            .map(|k| if k.contains("lockout") {
                format!("{k} = \"1m\"")
            } else if *k == "ipv6_prefix" {
                format!("{k} = 56")
            } else {
                format!("{k} = 1")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        DELIVERY_KEYS
            .iter()
            .map(|k| if k.contains("concurrency") {
                format!("{k} = 1")
            } else {
                format!("{k} = \"1m\"")
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let c = load_str(&text, "<test>").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.hostname, "relay.example.com");
    assert_eq!(c.listeners[0].bare_lf, BareLfPolicy::Reject);
    // tls_cert, tls_key and tls_min_version are covered by the TLS tests above.
    assert_eq!(LISTENER_KEYS.len(), 15);
}

#[test]
fn suggestions_use_edit_distance() {
    use super::raw::nearest;
    assert_eq!(
        nearest("max_mesage_size", LISTENER_KEYS),
        Some("max_message_size")
    );
    assert_eq!(nearest("listeners", TOP_KEYS), Some("listener"));
    assert_eq!(nearest("password", USER_KEYS), Some("password_hash"));
    assert_eq!(
        nearest("allowed_networks", LISTENER_KEYS),
        Some("allow_networks")
    );
    assert_eq!(nearest("colour", LISTENER_KEYS), None);
}

#[test]
fn errors_display_one_per_line_with_location() {
    let e = load_str(
        "[listener.x]\naddress = \"127.0.0.1:1\"\ntls = \"startls\"\n",
        "postern.toml",
    )
    .expect_err("bad");
    let text = e.to_string();
    assert!(
        text.contains(r#"postern.toml:3:7: listener.x.tls: unknown value "startls"; write one of "none", "starttls", "implicit""#),
        "{text}"
    );
}

/// Prints every case's actual output; run with
/// `cargo test --lib config::tests::show_case_outputs -- --ignored --nocapture` when writing a case.
#[test]
#[ignore]
fn show_case_outputs() {
    for dir in case_dirs() {
        let out = match load_file(&dir.join("postern.toml")) {
            Ok(_) => "(loaded without errors)".to_owned(),
            Err(e) => e.to_string(),
        };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "== {name}\n{}",
            out.replace(&format!("{}/", dir.display()), "")
        );
    }
}
#[test]
#[ignore]
fn show_describe() {
    let c =
        load_file(&manifest_dir().join("config/postern.toml")).unwrap_or_else(|e| panic!("{e}"));
    println!("{}\n--\n{}", c.describe(), c.warnings().join("\n"));
}

#[test]
fn accounts_load_with_cloud_endpoints_and_overrides() {
    use crate::config::{AssertionAlg, Cloud, Credential, SecretSource, SecretStyle};
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["postern".into()]).expect("cert");
    fs::write(tmp.path().join("cert.pem"), ck.cert.pem()).expect("write");
    fs::write(tmp.path().join("key.pem"), ck.signing_key.serialize_pem()).expect("write");
    fs::write(tmp.path().join("secret"), "s3cret\n").expect("write");
    let text = r#"
[listener.local]
address = "127.0.0.1:2525"

[account.app]
tenant = "contoso.onmicrosoft.com"
client_id = "0F8FAD5B-D9CB-469F-A165-70867728950E"
auth = "client_secret"
client_secret_file = "secret"
secret_style = "basic"
secret_expires = 2027-01-31

[account.cert]
tenant = "0f8fad5b-d9cb-469f-a165-70867728950e"
client_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
cloud = "usgov"
auth = "certificate"
certificate = "cert.pem"
private_key_file = "key.pem"
assertion_alg = "RS256"

[account.fake]
tenant = "contoso.onmicrosoft.com"
client_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
auth = "delegated"
authority = "http://127.0.0.1:8080/"
graph_url = "http://127.0.0.1:8081"
smtp_host = "localhost"
smtp_port = 2587
ca_file = "cert.pem"

[route.m365]
senders = ["*@contoso.com"]
transport = "smtp"
account = "app"
"#;
    let path = tmp.path().join("postern.toml");
    fs::write(&path, text).expect("write");
    let config = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let app = config.account("app").expect("app");
    assert_eq!(app.client_id, "0f8fad5b-d9cb-469f-a165-70867728950e");
    assert_eq!(
        app.endpoints.token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(app.endpoints.smtp_host, "smtp.office365.com");
    match &app.credential {
        Credential::ClientSecret {
            secret: SecretSource::File(p),
            style: SecretStyle::Basic,
            expires: Some(1_801_353_600),
        } => {
            assert_eq!(p, &tmp.path().join("secret"))
        }
        other => panic!("{other:?}"),
    }
    let cert = config.account("cert").expect("cert");
    assert_eq!(cert.cloud, Cloud::UsGov);
    assert!(
        cert.endpoints
            .token_url
            .starts_with("https://login.microsoftonline.us/")
    );
    assert_eq!(cert.endpoints.graph_url, "https://graph.microsoft.us");
    assert!(matches!(
        cert.credential,
        Credential::Certificate {
            alg: AssertionAlg::Rs256,
            ..
        }
    ));
    let fake = config.account("fake").expect("fake");
    assert_eq!(
        fake.endpoints.token_url,
        "http://127.0.0.1:8080/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(
        fake.endpoints.device_code_url,
        "http://127.0.0.1:8080/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
    );
    assert_eq!(
        (fake.endpoints.smtp_host.as_str(), fake.endpoints.smtp_port),
        ("localhost", 2587)
    );
    assert_eq!(
        fake.ca_file.as_deref(),
        Some(tmp.path().join("cert.pem").as_path())
    );
    assert!(
        matches!(config.routes[0].transport, crate::config::TransportConfig::Smtp { ref account } if account == "app")
    );
    let described = config.describe();
    assert!(
        described.contains("account app:") && described.contains("file "),
        "{described}"
    );
    assert!(!described.contains("s3cret"));
}

#[test]
fn inline_secret_is_accepted_with_a_warning() {
    let text = r#"
[listener.local]
address = "127.0.0.1:2525"
[account.a]
tenant = "contoso.onmicrosoft.com"
client_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
auth = "client_secret"
client_secret = "inline-secret-value"
secret_expires = 2020-01-01
[route.r]
senders = ["*"]
transport = "smtp"
account = "a"
"#;
    let config = load_str(text, "<test>").unwrap_or_else(|e| panic!("{e}"));
    let w = config.warnings().join("\n");
    assert!(
        w.contains("client_secret_file") && w.contains("expired on 2020-01-01"),
        "{w}"
    );
    assert!(
        !format!("{config:?}").contains("inline-secret-value"),
        "Debug must not print the secret"
    );
}
