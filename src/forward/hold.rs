//! Holds postern puts on a mailbox's mail when our configuration is wrong
//! ([`Outcome::Held`](crate::upstream::Outcome::Held)): which mail a hold covers, how it is
//! probed, and how it is logged.
//!
//! - A hold covers a whole mailbox ([`HoldScope::Mailbox`]: credentials, consent, SMTP AUTH
//!   off...) or one (mailbox, From address) pair ([`HoldScope::Sender`]: Send As refused);
//!   the mailbox's other mail keeps flowing under a sender hold.
//! - Every `hold_retry` one held message of the hold is tried again (the probe). A mailbox
//!   hold is lifted by any probe that is not held again; a sender hold only by a probe that
//!   was delivered, since only that proves Exchange now lets the mailbox send as the address.
//!   Sender-hold probes back off (doubling up to an hour): each failed one is a refused
//!   submission, and Exchange blocks mailboxes with many of those (5.2.252).
//! - The probe is the held message with the fewest pending recipients, then the smallest,
//!   then the oldest: if it fails again it costs the least, and if it goes through it
//!   reaches the fewest people first.
//! - The full explanation is logged when a hold starts and when its cause changes (compared
//!   without the per-attempt diagnostics Exchange and Entra append); every other probe logs
//!   one short line.

use std::time::{Duration, Instant};

use crate::upstream::HoldScope;

/// The longest wait between two probes of a sender hold.
const MAX_SENDER_PROBE: Duration = Duration::from_secs(3600);

/// What a hold covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldKey {
    /// The mailbox (as in the envelope).
    pub mailbox: String,
    /// All of its mail, or its mail from one address.
    pub scope: HoldScope,
}

impl HoldKey {
    /// "mailbox M" or "mail from B through mailbox M", for log lines.
    pub fn describe(&self) -> String {
        match &self.scope {
            HoldScope::Mailbox => format!("mailbox {}", self.mailbox),
            HoldScope::Sender(b) => format!("mail from {b} through mailbox {}", self.mailbox),
        }
    }

    /// Does the hold cover a message of `mailbox` from envelope sender `sender` whose
    /// `From:` address is `from`?
    pub fn covers(&self, mailbox: &str, sender: &str, from: Option<&str>) -> bool {
        if self.mailbox != mailbox {
            return false;
        }
        match &self.scope {
            HoldScope::Mailbox => true,
            HoldScope::Sender(b) => {
                sender.eq_ignore_ascii_case(b) || from.is_some_and(|f| f.eq_ignore_ascii_case(b))
            }
        }
    }
}

/// A hold in force.
#[derive(Debug)]
pub struct Pause {
    /// What is wrong and how to fix it (the last held outcome's reason).
    pub reason: String,
    /// [`fingerprint`] of `reason`, to tell a changed cause from the same one again.
    pub fingerprint: String,
    /// When the next probe may start.
    pub next_probe: Instant,
    /// The message being tried as the probe.
    pub probe: Option<String>,
    /// Probes held again in a row.
    pub failures: u32,
}

impl Pause {
    /// A new hold for `reason`, first probed after `interval`.
    pub fn new(reason: String, interval: Duration) -> Pause {
        Pause {
            fingerprint: fingerprint(&reason),
            reason,
            next_probe: Instant::now() + interval,
            probe: None,
            failures: 0,
        }
    }
}

/// How long after a failed probe the next one starts: `hold_retry` for a mailbox hold;
/// doubling from `hold_retry` up to an hour (or `hold_retry`, if longer) for a sender hold.
pub fn probe_interval(scope: &HoldScope, hold_retry: Duration, failures: u32) -> Duration {
    match scope {
        HoldScope::Mailbox => hold_retry,
        HoldScope::Sender(_) => hold_retry
            .saturating_mul(1u32 << failures.min(16))
            .min(MAX_SENDER_PROBE.max(hold_retry)),
    }
}

/// `reason` without what changes from one attempt to the next: bracketed diagnostics
/// (`[host timestamp id]`), queue ids in `postern queue release ID`, Entra's trace and
/// correlation ids.
pub fn fingerprint(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut depth = 0u32;
    for ch in reason.chars() {
        match ch {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    for marker in ["; trace id", "Trace ID:", "request-id"] {
        if let Some(i) = out.find(marker) {
            let end = out[i..]
                .find(['.', ';'])
                .map_or(out.len(), |j| if j == 0 { out.len() } else { i + j });
            out.replace_range(i..end, "");
        }
    }
    const RELEASE: &str = "postern queue release ";
    if let Some(i) = out.find(RELEASE) {
        let from = i + RELEASE.len();
        let end = out[from..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(out.len(), |j| from + j);
        out.replace_range(from..end, "ID");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first sentence of `reason` (a sentence ends at ". " outside double quotes, or at
/// "; fix:"), at most 240 bytes: for the lines logged per message and per probe, while the
/// envelope and `queue show` keep the whole reason.
pub fn brief(reason: &str) -> &str {
    let mut in_quotes = false;
    let bytes = reason.as_bytes();
    let mut end = reason.len();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => in_quotes = !in_quotes,
            b'.' if !in_quotes && bytes.get(i + 1) == Some(&b' ') => {
                end = i + 1;
                break;
            }
            b';' if !in_quotes && reason[i..].starts_with("; fix:") => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let mut cut = end.min(240);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    &reason[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_what_changes_per_attempt() {
        let a = "localhost:587 answered AUTH XOAUTH2 as a@x with \"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]\". SMTP AUTH is turned off. postern pauses this mailbox; after fixing it, `postern queue release 0123456789AB` tries at once.";
        let b = a
            .replace(
                "2025-11-23T11:12:20.123Z 08DE2A6028D26C22",
                "2025-11-23T11:17:20.999Z 08DE2A6028D26FFF",
            )
            .replace("0123456789AB", "BA9876543210");
        assert_eq!(fingerprint(a), fingerprint(b.as_str()));
        assert_ne!(fingerprint(a), fingerprint(&a.replace("Mailbox", "Tenant")));
        let e1 = "no access token for a@x (account c): account c: the client secret expired (AADSTS7000222, invalid_client); fix: new secret; trace id 1111, correlation id 2222. x";
        let e2 = e1.replace("1111", "3333").replace("2222", "4444");
        assert_eq!(fingerprint(e1), fingerprint(&e2));
    }

    #[test]
    fn brief_is_the_first_sentence_with_the_reply() {
        let r = "localhost:587 answered the message with \"554 5.2.252 SendAsDenied; a not allowed to send as b. More\". Mailbox a may not send as b. Either route...";
        assert_eq!(
            brief(r),
            "localhost:587 answered the message with \"554 5.2.252 SendAsDenied; a not allowed to send as b. More\"."
        );
        let t = "no access token for m (account c): account c: the client secret expired (AADSTS7000222, invalid_client); fix: Entra admin centre";
        assert_eq!(
            brief(t),
            "no access token for m (account c): account c: the client secret expired (AADSTS7000222, invalid_client)"
        );
        let long = "é".repeat(300);
        assert!(brief(&long).len() <= 240);
    }

    #[test]
    fn sender_holds_cover_their_address_only_and_back_off() {
        let k = HoldKey {
            mailbox: "alice@x".into(),
            scope: HoldScope::Sender("bob@x".into()),
        };
        assert!(k.covers("alice@x", "BOB@x", None));
        assert!(k.covers("alice@x", "printer@x", Some("bob@x")));
        assert!(!k.covers("alice@x", "alice@x", Some("alice@x")));
        assert!(!k.covers("carol@x", "bob@x", None));
        let m = HoldKey {
            mailbox: "alice@x".into(),
            scope: HoldScope::Mailbox,
        };
        assert!(m.covers("alice@x", "anyone@y", None));
        let s = Duration::from_secs(300);
        assert_eq!(probe_interval(&m.scope, s, 5), s);
        assert_eq!(probe_interval(&k.scope, s, 0), s);
        assert_eq!(probe_interval(&k.scope, s, 2), 4 * s);
        assert_eq!(probe_interval(&k.scope, s, 30), Duration::from_secs(3600));
        let long = Duration::from_secs(7200);
        assert_eq!(probe_interval(&k.scope, long, 3), long);
    }
}
