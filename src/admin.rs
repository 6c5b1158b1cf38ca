//! The queue commands' output: `queue list` as a table or JSON, `queue show` in detail.

use std::collections::HashMap;
use std::fmt::Write;

use serde::Serialize;

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
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
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
            e.id,
            l.state.to_string(),
            e.size,
            time(e.received_at),
            if e.sender.is_empty() { "<>" } else { &e.sender },
            rcpts.join(", ")
        );
        if let Some(why) = notes.get(&e.id) {
            let _ = writeln!(out, "{:<16} ({why})", "");
        }
        if let Some(why) = e.hold_reason.as_deref().or(e.last_error.as_deref()) {
            let _ = writeln!(out, "{:<16} ({why})", "");
        }
    }
    let _ = writeln!(out, "-- {} message(s)", items.len());
    out
}

/// `queue show ID`.
pub fn show(state: State, e: &Envelope) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "id:           {}", e.id);
    let _ = writeln!(o, "state:        {state}");
    let _ = writeln!(
        o,
        "received:     {} UTC from {} (helo {})",
        time(e.received_at),
        e.client_addr,
        e.client_helo
    );
    let _ = writeln!(o, "listener:     {}", e.listener);
    let _ = writeln!(o, "auth user:    {}", e.auth_user.as_deref().unwrap_or("-"));
    let _ = writeln!(o, "sender:       <{}>", e.sender);
    let _ = writeln!(o, "route:        {} (as mailbox {})", e.route, e.mailbox);
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
        let _ = writeln!(o, "held:         {r}");
    }
    if let Some(r) = &e.last_error {
        let _ = writeln!(o, "last error:   {r}");
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
            r.address,
            r.last_reply
                .as_deref()
                .map(|x| format!(": {x}"))
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
