//! The queue commands' output: `queue list` as a table or JSON, `queue show` in detail.
//!
//! Envelopes hold text from clients (HELO names, addresses) and from upstreams (replies):
//! every string goes through [`escape`] before it reaches the admin's terminal, in the
//! tables as `\u{1b}` and in JSON as `\u001b` (the same string to a JSON parser).

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

use crate::escape::{self, untrusted as u};
use crate::forward::state::Saved;
use crate::spool::{Envelope, Listed, RcptStatus, State};

/// Why queued messages that have not failed are waiting, by queue id: their mailbox is paced
/// or throttled (from the forwarder's state file, `state`), e.g. `paced: 30/min for
/// scanner@contoso.com, next at 2026-01-31 10:42:05 UTC`.
pub fn waiting_notes(items: &[Listed], state: &Saved, now_ms: u64) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for l in items {
        let e = &l.envelope;
        let due = match l.state {
            State::Incoming => true,
            State::Deferred => e
                .next_attempt
                .is_none_or(|t| t.saturating_mul(1000) <= now_ms),
            _ => false,
        };
        if !due {
            continue;
        }
        let Some(m) = state.mailboxes.get(&e.mailbox) else {
            continue;
        };
        let note = m
            .waiting
            .iter()
            .chain(m.blocked.iter())
            .filter(|n| n.until > now_ms)
            .max_by_key(|n| n.until);
        if let Some(n) = note {
            out.insert(
                e.id.clone(),
                format!("{}, next at {}", n.why, crate::forward::fmt_ms(n.until)),
            );
        }
    }
    out
}

#[derive(Serialize)]
struct Row<'a> {
    id: &'a str,
    state: String,
    sender: &'a str,
    mailbox: &'a str,
    recipients: Vec<&'a str>,
    size: u64,
    received_at: u64,
    attempts: u32,
    next_attempt: Option<u64>,
    last_error: Option<&'a str>,
    hold_reason: Option<&'a str>,
    /// Why it waits although nothing failed (pacing, an upstream throttle).
    waiting: Option<&'a str>,
}

/// `queue list --json`; `notes` from [`waiting_notes`].
pub fn list_json(items: &[Listed], notes: &HashMap<String, String>) -> String {
    let rows: Vec<Row> = items
        .iter()
        .map(|l| {
            let e = &l.envelope;
            Row {
                id: &e.id,
                state: l.state.to_string(),
                sender: &e.sender,
                mailbox: &e.mailbox,
                recipients: e.recipients.iter().map(|r| r.address.as_str()).collect(),
                size: e.size,
                received_at: e.received_at,
                attempts: e.attempts,
                next_attempt: e.next_attempt,
                last_error: e.last_error.as_deref(),
                hold_reason: e.hold_reason.as_deref(),
                waiting: notes.get(&e.id).map(String::as_str),
            }
        })
        .collect();
    escape::to_json_pretty(&rows).unwrap_or_else(|_| "[]".into())
}

/// `queue list`: a table in the spirit of `mailq`; `notes` from [`waiting_notes`].
pub fn list_table(items: &[Listed], notes: &HashMap<String, String>) -> String {
    let mut out = String::new();
    if items.is_empty() {
        return "Mail queue is empty\n".into();
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:>9} {:<19} {:<30} recipients",
        "id", "state", "size", "arrival (UTC)", "sender"
    );
    for l in items {
        let e = &l.envelope;
        let rcpts: Vec<&str> = e.recipients.iter().map(|r| r.address.as_str()).collect();
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:>9} {:<19} {:<30} {}",
            u(&e.id),
            l.state.to_string(),
            e.size,
            time(e.received_at),
            if e.sender.is_empty() {
                "<>".into()
            } else {
                u(&e.sender)
            },
            u(&rcpts.join(", "))
        );
        if let Some(why) = notes.get(&e.id) {
            let _ = writeln!(out, "{:<16} ({})", "", u(why));
        }
        if let Some(why) = e.hold_reason.as_deref().or(e.last_error.as_deref()) {
            let _ = writeln!(out, "{:<16} ({})", "", u(why));
        }
    }
    let _ = writeln!(out, "-- {} message(s)", items.len());
    out
}

/// `queue show ID`.
pub fn show(state: State, e: &Envelope) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "id:           {}", u(&e.id));
    let _ = writeln!(o, "state:        {state}");
    let _ = writeln!(
        o,
        "received:     {} UTC from {} (helo {})",
        time(e.received_at),
        u(&e.client_addr),
        u(&e.client_helo)
    );
    let _ = writeln!(o, "listener:     {}", u(&e.listener));
    let _ = writeln!(
        o,
        "auth user:    {}",
        u(e.auth_user.as_deref().unwrap_or("-"))
    );
    let _ = writeln!(o, "sender:       <{}>", u(&e.sender));
    let _ = writeln!(
        o,
        "route:        {} (as mailbox {})",
        u(&e.route),
        u(&e.mailbox)
    );
    let _ = writeln!(
        o,
        "size:         {} bytes{}{}",
        e.size,
        if e.body_8bit { ", 8BITMIME" } else { "" },
        if e.smtputf8 { ", SMTPUTF8" } else { "" }
    );
    let _ = writeln!(o, "attempts:     {}", e.attempts);
    if let Some(t) = e.next_attempt {
        let _ = writeln!(o, "next attempt: {} UTC", time(t));
    }
    if let Some(r) = &e.hold_reason {
        let _ = writeln!(o, "held:         {}", u(r));
    }
    if let Some(r) = &e.last_error {
        let _ = writeln!(o, "last error:   {}", u(r));
    }
    let _ = writeln!(o, "recipients:");
    for r in &e.recipients {
        let st = match r.status {
            RcptStatus::Pending => "pending",
            RcptStatus::Sent => "sent",
            RcptStatus::Failed => "failed",
        };
        let _ = writeln!(
            o,
            "  <{}> {st}{}",
            u(&r.address),
            r.last_reply
                .as_deref()
                .map(|x| format!(": {}", u(x)))
                .unwrap_or_default()
        );
    }
    o
}

fn time(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{ENVELOPE_VERSION, Recipient};

    /// Client text with an OSC title change, a C1 CSI, a right-to-left override and an
    /// isolate: none of it may reach the terminal raw.
    const HELO: &str = "host\u{1b}]0;pwned\u{7}\u{9b}2J\u{202e}txt.exe\u{2066}";

    fn envelope() -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: "0123456789AB".into(),
            received_at: 1_700_000_000,
            sender: "\"\u{202e}moc.elgoog\"@example.com".into(),
            recipients: vec![Recipient {
                address: "j\u{f6}rg\u{200f}@example.com".into(),
                status: RcptStatus::Pending,
                last_reply: Some("451 4.7.0 \u{1b}[31mtry later".into()),
            }],
            client_addr: "192.0.2.1:4000".into(),
            client_helo: HELO.into(),
            auth_user: None,
            listener: "local".into(),
            route: "default".into(),
            mailbox: "relay@example.com".into(),
            size: 10,
            body_8bit: false,
            smtputf8: true,
            attempts: 1,
            next_attempt: None,
            last_error: Some("upstream said \u{9b}0m".into()),
            hold_reason: None,
            auto_hold: false,
            graph: None,
        }
    }

    fn raw(text: &str) -> Vec<char> {
        text.chars()
            .filter(|&c| escape::needs_escape(c) && c != '\n')
            .collect()
    }

    #[test]
    fn show_and_list_print_no_control_or_bidi_characters() {
        let e = envelope();
        let shown = show(State::Deferred, &e);
        assert_eq!(raw(&shown), Vec::<char>::new(), "{shown}");
        assert!(
            shown.contains("(helo host\\u{1b}]0;pwned\\u{7}\\u{9b}2J\\u{202e}txt.exe\\u{2066})"),
            "{shown}"
        );
        assert!(shown.contains("j\u{f6}rg\\u{200f}@example.com"), "{shown}");
        let listed = [Listed {
            state: State::Deferred,
            envelope: e.clone(),
        }];
        let table = list_table(&listed, &HashMap::new());
        assert_eq!(raw(&table), Vec::<char>::new(), "{table}");
        assert!(table.contains("\\u{9b}0m"), "{table}");
    }

    #[test]
    fn list_json_is_valid_json_with_escapes() {
        let e = envelope();
        let listed = [Listed {
            state: State::Hold,
            envelope: e.clone(),
        }];
        let json = list_json(&listed, &HashMap::new());
        assert_eq!(raw(&json), Vec::<char>::new(), "{json}");
        assert!(
            json.contains("\\u202e") && json.contains("\\u009b"),
            "{json}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v[0]["sender"],
            e.sender.as_str(),
            "the same strings to a JSON reader"
        );
        assert_eq!(v[0]["last_error"], "upstream said \u{9b}0m");
    }
}
