//! The operator's mail log: one line per message state change, keyed by queue id, in the
//! spirit of Postfix's maillog. Bodies, passwords and tokens never pass through here.
//!
//! Refusals are the one kind of line a stranger can make postern write at will, so they are
//! bounded per client and in total ([`throttle`]): past the bound they are counted, and one
//! `rejected_unlogged` line per client says how many when the minute is over.

pub mod throttle;

use std::sync::Mutex;
use std::time::Instant;

use tracing::{info, warn};

use throttle::{Summary, Throttle};

static THROTTLE: Mutex<Option<Throttle>> = Mutex::new(None);

/// Count one refusal-type line about `client` (`ip:port`); true if it may be written now.
/// Writes the summary of the minute that ended, if one did.
pub fn may_log_refusal(client: &str) -> bool {
    let (log, ended) = match THROTTLE.lock() {
        Ok(mut t) => t
            .get_or_insert_with(Throttle::default)
            .refusal(client, Instant::now()),
        Err(_) => (true, Vec::new()),
    };
    write_summaries(&ended);
    log
}

/// Group IPv6 clients by `bits` (`limits.ipv6_prefix`) in the refusal counts.
pub fn set_ipv6_prefix(bits: u8) {
    if let Ok(mut t) = THROTTLE.lock() {
        t.get_or_insert_with(Throttle::default).set_v6_prefix(bits);
    }
}

/// Write the summary of the refusal counts' minute if it is over (called every few seconds,
/// so a flood that stopped is summed up too); with `finish`, whatever its age (shutdown).
pub fn flush_refusals(finish: bool) {
    let ended = match THROTTLE.lock() {
        Ok(mut t) => match t.as_mut() {
            Some(t) if finish => t.finish(),
            Some(t) => t.roll(Instant::now()),
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    write_summaries(&ended);
}

fn write_summaries(ended: &[Summary]) {
    for s in ended {
        match s {
            Summary::Client { client, suppressed } => warn!(
                target: "postern::maillog",
                event = "rejected_unlogged",
                client = client.as_str(),
                count = suppressed,
                "refusals not logged one by one (at most {} a minute per client, {} in all)",
                throttle::PER_CLIENT,
                throttle::TOTAL
            ),
            Summary::Others {
                clients,
                suppressed,
            } => warn!(
                target: "postern::maillog",
                event = "rejected_unlogged",
                client = "others",
                clients,
                count = suppressed,
                "refusals of other clients not logged one by one (at most {} a minute per client, {} in all)",
                throttle::PER_CLIENT,
                throttle::TOTAL
            ),
        }
    }
}

/// A client's command or message was refused (policy, limits, protocol).
pub fn rejected(client: &str, stage: &str, reply: &str, sender: Option<&str>, rcpt: Option<&str>) {
    rejected_because(client, stage, reply, None, sender, rcpt);
}

/// [`rejected`], with what the log may say and the client was not told (the rule that
/// refused it, the text the client sent).
pub fn rejected_because(
    client: &str,
    stage: &str,
    reply: &str,
    detail: Option<&str>,
    sender: Option<&str>,
    rcpt: Option<&str>,
) {
    if !may_log_refusal(client) {
        return;
    }
    warn!(
        target: "postern::maillog",
        event = "rejected",
        client,
        stage,
        from = sender.unwrap_or(""),
        to = rcpt.unwrap_or(""),
        reply,
        detail = detail.unwrap_or(""),
        "rejected"
    );
}

/// A message was committed to the spool and acknowledged with 250.
pub fn queued(id: &str, client: &str, sender: &str, nrcpt: usize, size: u64, user: Option<&str>) {
    info!(
        target: "postern::maillog",
        event = "queued",
        queue_id = id,
        client,
        from = sender,
        nrcpt,
        size,
        user = user.unwrap_or(""),
        "queued"
    );
}

/// Recipients of a message were accepted upstream.
pub fn sent(id: &str, mailbox: &str, rcpts: &[String], relay: &str, reply: &str, attempt: u32) {
    info!(
        target: "postern::maillog",
        event = "sent",
        queue_id = id,
        mailbox,
        to = rcpts.join(",").as_str(),
        relay,
        reply,
        attempt,
        "sent"
    );
}

/// A message went out as its route's mailbox (`rewrite_from`): what the device had written.
pub fn rewritten(
    id: &str,
    mailbox: &str,
    sender: &str,
    header_from: Option<&str>,
    from_changed: bool,
    reply_to_added: bool,
) {
    let what = match (from_changed, reply_to_added) {
        (true, true) => {
            "sender and From: rewritten to the mailbox; the device's address is in Reply-To:"
        }
        (true, false) => {
            "sender and From: rewritten to the mailbox; the message's own Reply-To: kept"
        }
        (false, _) => "sender rewritten to the mailbox (From: already was the mailbox)",
    };
    info!(
        target: "postern::maillog",
        event = "rewritten",
        queue_id = id,
        mailbox,
        from = sender,
        header_from = header_from.unwrap_or(""),
        "{what}"
    );
}

/// A delivery attempt failed temporarily; the message will be retried.
pub fn deferred(id: &str, mailbox: &str, reason: &str, attempt: u32, retry_in_secs: u64) {
    warn!(
        target: "postern::maillog",
        event = "deferred",
        queue_id = id,
        mailbox,
        reason,
        attempt,
        retry_in_secs,
        "deferred"
    );
}

/// A message was put on hold (by the admin, or because its mailbox's configuration is broken).
pub fn held(id: &str, mailbox: &str, reason: &str) {
    warn!(target: "postern::maillog", event = "held", queue_id = id, mailbox, reason, "held");
}

/// A held message was released.
pub fn released(id: &str) {
    info!(target: "postern::maillog", event = "released", queue_id = id, "released");
}

/// A message was queued for immediate delivery by the admin (`postern queue retry`).
pub fn retried(id: &str) {
    info!(target: "postern::maillog", event = "retried", queue_id = id, "retry requested");
}

/// A message failed permanently or outlived its lifetime.
pub fn failed(id: &str, mailbox: &str, reason: &str) {
    warn!(target: "postern::maillog", event = "failed", queue_id = id, mailbox, reason, "failed");
}

/// A delivery status notification postern sent could not be delivered; it is kept in
/// `failed/` (reports never get reports of their own).
pub fn report_undeliverable(id: &str, mailbox: &str, to: &str, reason: &str) {
    warn!(
        target: "postern::maillog",
        event = "report_undeliverable",
        queue_id = id,
        mailbox,
        to,
        reason,
        "a delivery status notification could not be delivered; kept in failed/ (postern queue list)"
    );
}

/// Recipients of a message failed and its sender gets no report (`why`); it is kept in
/// `failed/`.
pub fn unreported(id: &str, mailbox: &str, why: &str) {
    warn!(
        target: "postern::maillog",
        event = "unreported",
        queue_id = id,
        mailbox,
        why,
        "no delivery status notification for this failure; kept in failed/ (postern queue list)"
    );
}

/// A message was deleted by the admin.
pub fn deleted(id: &str) {
    info!(target: "postern::maillog", event = "deleted", queue_id = id, "deleted");
}

/// A delivery status notification about a failed message was queued for its sender.
pub fn bounced(id: &str, report_id: &str, to: &str) {
    info!(target: "postern::maillog", event = "bounced", queue_id = id, report = report_id, to, "bounced");
}
