//! The queue commands' output: `queue list` as a table or JSON, `queue show` in detail.

use std::fmt::Write;

use serde::Serialize;

use crate::spool::{Envelope, Listed, RcptStatus, State};

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
}

/// `queue list --json`.
pub fn list_json(items: &[Listed]) -> String {
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
            }
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
}

/// `queue list`: a table in the spirit of `mailq`.
pub fn list_table(items: &[Listed]) -> String {
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
