//! At most [`PER_MAILBOX`] Graph requests in flight per app and mailbox: Outlook's limit
//! (microsoft-reference.md §4.4: "up to 4 concurrent requests"; beyond it Graph answers
//! `429 ApplicationThrottled` "over its MailboxConcurrency limit").
//!
//! The slots are process-wide, keyed by the app's client id and the mailbox, so every route
//! and account using the same app and mailbox shares them, and a configuration reload (which
//! builds new transports) does not reset them while old deliveries still run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests in flight per app and mailbox.
pub const PER_MAILBOX: usize = 4;

type Key = (String, String);

fn slots() -> &'static Mutex<HashMap<Key, Arc<Semaphore>>> {
    static SLOTS: OnceLock<Mutex<HashMap<Key, Arc<Semaphore>>>> = OnceLock::new();
    SLOTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Wait for a free slot for `client_id` and `mailbox`; it is freed when dropped.
pub async fn slot(client_id: &str, mailbox: &str) -> OwnedSemaphorePermit {
    let key = (client_id.to_ascii_lowercase(), mailbox.to_lowercase());
    let sem = {
        let mut map = slots().lock().unwrap_or_else(|p| p.into_inner());
        // Forget idle mailboxes now and then, so the map does not grow with every sender.
        if map.len() > 1024 {
            map.retain(|_, s| s.available_permits() < PER_MAILBOX || Arc::strong_count(s) > 1);
        }
        map.entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(PER_MAILBOX)))
            .clone()
    };
    let mut sem = sem;
    loop {
        match sem.clone().acquire_owned().await {
            Ok(p) => return p,
            // Never closed; if it were, a fresh semaphore still bounds this request.
            Err(_) => sem = Arc::new(Semaphore::new(PER_MAILBOX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fifth_request_waits_for_a_slot_of_the_same_app_and_mailbox() {
        let mut held = Vec::new();
        for _ in 0..PER_MAILBOX {
            held.push(slot("app-limit-test", "A@x.test").await);
        }
        let fifth = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            slot("app-limit-test", "a@X.TEST"),
        )
        .await;
        assert!(fifth.is_err(), "a fifth slot was handed out");
        // Another mailbox of the same app is not affected.
        let other = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            slot("app-limit-test", "b@x.test"),
        )
        .await;
        assert!(other.is_ok());
        held.pop();
        let now = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            slot("app-limit-test", "a@x.test"),
        )
        .await;
        assert!(now.is_ok());
    }
}
