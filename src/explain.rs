//! `postern explain TEXT…`: what an error means and how to fix it. TEXT is anything an admin
//! pastes (an SMTP reply, an AADSTS code or Entra's error JSON, a Graph error code or body, a
//! postern log line in text or JSON, an entry id) or a queue id, whose hold reason or last
//! error is explained. The words come from [`crate::diagnosis`]; the configuration, when
//! there is one, fills in the account's client id, tenant and kind of sign-in.

use std::fmt::Write;

use crate::config::{AccountConfig, Config, Credential, TransportConfig};
use crate::diagnosis::{self, Vars};
use crate::spool::{Spool, State};

/// The placeholders the configuration can fill for mail sent as `mailbox`.
pub fn vars_for(config: &Config, mailbox: &str) -> Vars {
    let mut v = Vars::new().set("mailbox", mailbox);
    let route = config
        .routes
        .iter()
        .find(|r| {
            r.mailbox
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(mailbox))
        })
        .or_else(|| config.route_for(mailbox));
    let account = route.and_then(|r| match &r.transport {
        TransportConfig::Smtp { account } | TransportConfig::Graph { account, .. } => {
            config.account(account).map(|a| (a, &r.transport))
        }
        _ => None,
    });
    if let Some((a, transport)) = account {
        v = account_vars(v, a, mailbox);
        if matches!(transport, TransportConfig::Graph { .. }) {
            v = graph_vars(v, a, mailbox);
        }
    }
    v
}

/// The placeholders an account fills.
pub fn account_vars(v: Vars, a: &AccountConfig, mailbox: &str) -> Vars {
    let app_only = !matches!(a.credential, Credential::Delegated { .. });
    let secret_place = match &a.credential {
        Credential::ClientSecret { secret, .. }
        | Credential::Delegated {
            secret: Some(secret),
        } => crate::token::entra::describe_source(secret),
        _ => String::new(),
    };
    let cert = match &a.credential {
        Credential::Certificate { cert, .. } => cert.display().to_string(),
        _ => String::new(),
    };
    let m = if mailbox.is_empty() {
        "<mailbox>"
    } else {
        mailbox
    };
    v.set("account", a.name.clone())
        .set("client_id", a.client_id.clone())
        .set("tenant", a.tenant.clone())
        .set(
            "app",
            format!(
                "Microsoft Entra admin center > App registrations > the app with Application (client) ID {}",
                a.client_id
            ),
        )
        .set("secret_place", secret_place)
        .set("cert", cert)
        .set(
            "login_cmd",
            format!("`postern login {} --mailbox {m}`", a.name),
        )
        .set(
            "server",
            format!("{}:{}", a.endpoints.smtp_host, a.endpoints.smtp_port),
        )
        .app_only(app_only)
}

/// The placeholders that differ for a Graph route: the server is Graph, and a delegated
/// sign-in is for Graph.
pub fn graph_vars(v: Vars, a: &AccountConfig, mailbox: &str) -> Vars {
    let m = if mailbox.is_empty() {
        "<mailbox>"
    } else {
        mailbox
    };
    v.set("server", a.endpoints.graph_url.clone()).set(
        "login_cmd",
        format!("`postern login {} --mailbox {m} --for graph`", a.name),
    )
}

/// Explain `input`; `config` (when one could be loaded) resolves queue ids and fills in the
/// account. Returns the text and whether the input was recognised.
pub fn run(input: &str, config: Option<&Config>) -> (String, bool) {
    let trimmed = input.trim();
    if crate::spool::is_valid_id(trimmed) {
        return queue_id(trimmed, config);
    }
    let ev = diagnosis::evidence(input);
    let mailbox = ev
        .context
        .iter()
        .find(|(k, _)| *k == "mailbox")
        .map(|(_, v)| v.clone());
    let vars = match (config, mailbox) {
        (Some(c), Some(m)) => vars_for(c, &m),
        _ => Vars::new(),
    };
    diagnosis::explain_text(input, &vars)
}

/// A queue id: explain why that message waits or failed.
fn queue_id(id: &str, config: Option<&Config>) -> (String, bool) {
    let Some(config) = config else {
        return (
            format!(
                "{id} looks like a queue id, but no configuration could be loaded to find the spool; give --config\n"
            ),
            false,
        );
    };
    let spool = match Spool::open_shared(&config.spool_dir) {
        Ok(s) => s,
        Err(e) => return (format!("{id}: cannot open the spool: {e}\n"), false),
    };
    let Some(state) = spool.find(id) else {
        return (
            format!(
                "{id} is not in the queue of {} (delivered messages leave it; see the log)\n",
                config.spool_dir.display()
            ),
            false,
        );
    };
    let env = match spool.read_envelope(state, id) {
        Ok(e) => e,
        Err(e) => return (format!("{id}: {e}\n"), false),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Message {id} from <{}> as mailbox {} is in {}/ after {} attempt(s).",
        env.sender, env.mailbox, state, env.attempts
    );
    let mut problems: Vec<String> = Vec::new();
    if let Some(r) = &env.hold_reason {
        problems.push(r.clone());
    } else if let Some(r) = &env.last_error {
        problems.push(r.clone());
    }
    for r in env.recipients.iter().filter(|r| r.last_reply.is_some()) {
        if let Some(reply) = &r.last_reply
            && !reply.starts_with('2')
        {
            problems.push(format!("<{}>: {reply}", r.address));
        }
    }
    if problems.is_empty() {
        let _ = writeln!(
            o,
            "It has no error{}.",
            if state == State::Incoming || state == State::Active {
                ": it is waiting for (or in) its first delivery attempt"
            } else {
                ""
            }
        );
        return (o, true);
    }
    let vars = vars_for(config, &env.mailbox).set("queue_id", id);
    let mut known = false;
    for p in problems {
        let _ = writeln!(o, "\n{p}\n");
        let (text, matched) = diagnosis::explain_text(&p, &vars);
        known |= matched;
        o.push_str(&text);
    }
    (o, known)
}
