//! Queue ids: 16 upper-case hex digits, time-ordered (13 digits of microseconds since the
//! epoch, 3 of a per-process counter), so `ls` sorts them by arrival like Postfix's long ids.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new queue id.
pub fn new_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
    format!("{:013X}{:03X}", micros & 0x1f_ffff_ffff_ffff, n)
}

/// Is `s` shaped like a queue id? (Guards every path built from user input.)
pub fn is_valid(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_unique_and_ordered() {
        let a = new_id();
        let b = new_id();
        assert!(is_valid(&a) && is_valid(&b));
        assert_ne!(a, b);
        assert!(!is_valid("../../etc/passwd"));
        assert!(!is_valid("0123456789abcdef"));
    }
}
