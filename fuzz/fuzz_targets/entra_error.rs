//! Fuzz the Entra token endpoint's answer parsers (`token::entra`): any body with any HTTP
//! status is parsed, classified and explained for every kind of account without panicking,
//! and the operator's summary stays one bounded line.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postern::config::Config;
use postern::token::Audience;
use postern::token::entra::{self, Context, EntraError};

/// Tables after `postern_fuzz`'s common top.
const CONFIG: &str = r#"
[listener.fuzz]
address = "127.0.0.1:2525"

[account.secret]
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
auth = "client_secret"
client_secret_env = "POSTERN_FUZZ_SECRET"

[account.delegated]
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
cloud = "usgov"
auth = "delegated"

[route.r]
senders = ["*"]
transport = "smtp"
account = "secret"
"#;

fn config() -> &'static Config {
    static CONFIG_ONCE: OnceLock<Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| postern_fuzz::config(CONFIG))
}

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*head) % 600;
    let _ = entra::parse_token_response(body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = entra::aadsts_in(text);
    }
    let Some(e) = EntraError::parse(status, body) else {
        return;
    };
    assert_eq!(e.status, status);
    let summary = e.summary();
    assert!(!summary.contains(['\r', '\n']), "summary spans lines");
    assert!(summary.chars().count() <= 400, "summary too long");
    let _ = e.is_transient();
    for account in &config().accounts {
        for audience in [Audience::Smtp, Audience::Graph] {
            for mailbox in ["", "printer@contoso.com"] {
                let cx = Context {
                    account,
                    mailbox,
                    audience,
                };
                let (meaning, advice) = entra::explain(e.code(), &e, &cx);
                assert!(!meaning.is_empty() && !advice.is_empty());
                let _ = entra::classify(&e, &cx).to_string();
            }
        }
    }
});
