//! Pacing one mailbox to its route's limits (`rate`, `daily_recipients`): pure bookkeeping
//! of what the mailbox started and sent, in milliseconds since the Unix epoch, so it can be
//! saved and survive a restart. The scheduler asks [`Pacer::next_start`] before starting a
//! message and keeps the message queued, in order, while the answer is a later time; no
//! transport ever sleeps for pacing.
//!
//! - `rate` counts message *starts* (every attempt, including ones that fail: Exchange counts
//!   submissions, and a gentle relay errs on the side of fewer).
//! - `daily_recipients` counts recipients *delivered*, in a rolling window, plus those of
//!   deliveries in flight (reserved at the start, settled at the end), so concurrent
//!   deliveries cannot overshoot together. A message with more recipients than the whole
//!   limit goes when the window is empty, rather than never.

use std::collections::VecDeque;

use crate::config::{Pacing, Rate};

/// Entries of the recipient window closer than this fraction of the window are merged, so a
/// mailbox's record stays small (1 minute for 24 hours: at most ~1,440 entries).
const BUCKETS: u64 = 1440;

/// One mailbox's record.
#[derive(Debug, Default, Clone)]
pub struct Pacer {
    /// Start times within the rate window.
    starts: VecDeque<u64>,
    /// (time, recipients delivered) within the recipient window, oldest first.
    sent: VecDeque<(u64, u32)>,
    /// Sum of `sent`.
    sent_total: u64,
    /// Recipients of the deliveries running now.
    in_flight: u64,
}

/// Why a message must wait, and until when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// Until when.
    pub until: u64,
    /// Which limit: `paced: 30/min for scanner@contoso.com`.
    pub why: String,
}

fn ms(r: &Rate) -> u64 {
    u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX)
}

impl Pacer {
    /// A pacer that remembers `sent` (time, recipients) from a previous run.
    pub fn restored(sent: impl IntoIterator<Item = (u64, u32)>) -> Pacer {
        let mut p = Pacer::default();
        let mut v: Vec<(u64, u32)> = sent.into_iter().collect();
        v.sort_unstable();
        for (t, n) in v {
            p.sent.push_back((t, n));
            p.sent_total += u64::from(n);
        }
        p
    }

    /// What was sent within the recipient window, for saving.
    pub fn sent(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.sent.iter().copied()
    }

    /// Nothing to remember (no window entries, nothing in flight).
    pub fn is_idle(&self) -> bool {
        self.starts.is_empty() && self.sent.is_empty() && self.in_flight == 0
    }

    /// Forget what has left the windows at `now`.
    fn prune(&mut self, limits: &Pacing, now: u64) {
        let rate_ms = limits.rate.as_ref().map_or(0, ms);
        while self
            .starts
            .front()
            .is_some_and(|t| t.saturating_add(rate_ms) <= now)
        {
            self.starts.pop_front();
        }
        // Keep 24 hours of record even with no (or a shorter) limit: a reload may set one.
        let rcpt_ms = limits.recipients.as_ref().map_or(0, ms).max(ms_of_day());
        while let Some(&(t, n)) = self.sent.front() {
            if t.saturating_add(rcpt_ms) > now {
                break;
            }
            self.sent.pop_front();
            self.sent_total -= u64::from(n);
        }
    }

    /// Recipients delivered within the last `per` at `now`.
    fn sent_within(&self, per: u64, now: u64) -> u64 {
        self.sent
            .iter()
            .rev()
            .take_while(|(t, _)| t.saturating_add(per) > now)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    /// `None` if a message to `rcpts` recipients may start at `now` under `limits`; else
    /// when it may, and why. `mailbox` is only for the reason.
    pub fn next_start(
        &mut self,
        limits: &Pacing,
        rcpts: u32,
        now: u64,
        mailbox: &str,
    ) -> Option<Wait> {
        self.prune(limits, now);
        let mut wait: Option<Wait> = None;
        let mut later = |until: u64, why: String| {
            if wait.as_ref().is_none_or(|w| until > w.until) {
                wait = Some(Wait { until, why });
            }
        };
        if let Some(r) = &limits.rate {
            let n = r.count as usize;
            if self.starts.len() >= n {
                // The start that must leave the window before one more fits.
                let t = self.starts[self.starts.len() - n];
                later(
                    t.saturating_add(ms(r)),
                    format!("paced: {} for {mailbox}", r.shown),
                );
            }
        }
        if let Some(r) = &limits.recipients {
            let per = ms(r);
            let limit = u64::from(r.count);
            let need = u64::from(rcpts);
            let used = self.sent_within(per, now) + self.in_flight;
            if used > 0 && used + need > limit {
                // Walk the window from its oldest entry until enough has left it.
                let mut free = limit.saturating_sub(used);
                let mut until = None;
                for &(t, k) in self
                    .sent
                    .iter()
                    .filter(|(t, _)| t.saturating_add(per) > now)
                {
                    free += u64::from(k);
                    if free >= need || free >= limit {
                        until = Some(t.saturating_add(per));
                        break;
                    }
                }
                // Not enough in the window alone (deliveries in flight hold the rest): their
                // end will settle it; look again in a little while.
                let until = until.unwrap_or(now.saturating_add((per / BUCKETS).max(100)));
                later(until, format!("paced: {} for {mailbox}", r.shown));
            }
        }
        wait
    }

    /// A message to `rcpts` recipients starts at `now`.
    pub fn started(&mut self, rcpts: u32, now: u64) {
        self.starts.push_back(now);
        self.in_flight += u64::from(rcpts);
    }

    /// A delivery started with `reserved` recipients ended at `now`, having delivered to
    /// `delivered` of them.
    pub fn finished(&mut self, reserved: u32, delivered: u32, limits: &Pacing, now: u64) {
        self.in_flight = self.in_flight.saturating_sub(u64::from(reserved));
        if delivered == 0 {
            return;
        }
        let bucket = limits
            .recipients
            .as_ref()
            .map_or(ms_of_day(), ms)
            .checked_div(BUCKETS)
            .unwrap_or(0);
        match self.sent.back_mut() {
            Some((t, n)) if now.saturating_sub(*t) < bucket => *n = n.saturating_add(delivered),
            _ => self.sent.push_back((now, delivered)),
        }
        self.sent_total += u64::from(delivered);
    }

    /// When the recipient window will have freed room, as far as this record knows: when its
    /// oldest entry leaves it. `None` when the record is empty (the quota was used by others).
    pub fn window_frees_at(&mut self, limits: &Pacing, now: u64) -> Option<u64> {
        self.prune(limits, now);
        let per = limits.recipients.as_ref().map_or(ms_of_day(), ms);
        self.sent
            .iter()
            .find(|(t, _)| t.saturating_add(per) > now)
            .map(|(t, _)| t.saturating_add(per))
    }
}

fn ms_of_day() -> u64 {
    u64::try_from(crate::config::pacing::DAY.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::pacing::{parse_rate, parse_recipients};

    fn limits(rate: &str, rcpts: &str) -> Pacing {
        Pacing {
            rate: parse_rate(rate).unwrap(),
            recipients: parse_recipients(rcpts).unwrap(),
        }
    }

    #[test]
    fn thirty_a_minute_then_the_thirty_first_waits_for_the_first_to_leave() {
        let l = limits("30/min", "unlimited");
        let mut p = Pacer::default();
        let t0 = 1_000_000;
        for i in 0..30 {
            assert_eq!(p.next_start(&l, 1, t0 + i * 100, "m@x"), None, "{i}");
            p.started(1, t0 + i * 100);
            p.finished(1, 1, &l, t0 + i * 100 + 50);
        }
        let w = p.next_start(&l, 1, t0 + 3000, "m@x").unwrap();
        assert_eq!(w.until, t0 + 60_000);
        assert_eq!(w.why, "paced: 30/min for m@x");
        // Once the first start is a minute old, one more fits; the next waits for the second.
        assert_eq!(p.next_start(&l, 1, t0 + 60_000, "m@x"), None);
        p.started(1, t0 + 60_000);
        assert_eq!(
            p.next_start(&l, 1, t0 + 60_001, "m@x").unwrap().until,
            t0 + 60_100
        );
    }

    #[test]
    fn recipients_in_a_rolling_window_include_those_in_flight() {
        let l = limits("unlimited", "10/10s");
        let mut p = Pacer::default();
        let t0 = 5_000_000;
        p.started(4, t0);
        p.finished(4, 4, &l, t0); // 4 sent at t0
        p.started(4, t0 + 1000); // 4 in flight
        // 8 used: a message to 3 must wait until the t0 entry leaves the window.
        let w = p.next_start(&l, 3, t0 + 2000, "m@x").unwrap();
        assert_eq!(w.until, t0 + 10_000);
        assert!(w.why.contains("10 recipients/10s"), "{}", w.why);
        // A message to 2 fits.
        assert_eq!(p.next_start(&l, 2, t0 + 2000, "m@x"), None);
        // The delivery in flight failed for all: its reservation is freed.
        p.finished(4, 0, &l, t0 + 3000);
        assert_eq!(p.next_start(&l, 6, t0 + 3000, "m@x"), None);
        // After the window, everything is free again.
        assert_eq!(p.next_start(&l, 10, t0 + 10_000, "m@x"), None);
        // A message larger than the whole limit goes alone, when nothing else is counted.
        let mut q = Pacer::default();
        assert_eq!(q.next_start(&l, 50, t0, "m@x"), None);
    }

    #[test]
    fn the_window_survives_a_restart_and_tells_when_it_frees() {
        let l = limits("unlimited", "3/1h");
        let mut p = Pacer::default();
        let t0 = 9_000_000;
        p.started(2, t0);
        p.finished(2, 2, &l, t0);
        p.started(1, t0 + 5000);
        p.finished(1, 1, &l, t0 + 5000);
        let saved: Vec<_> = p.sent().collect();
        let mut q = Pacer::restored(saved);
        let w = q.next_start(&l, 1, t0 + 6000, "m@x").unwrap();
        assert_eq!(w.until, t0 + 3_600_000);
        assert_eq!(q.window_frees_at(&l, t0 + 6000), Some(t0 + 3_600_000));
        assert_eq!(Pacer::default().window_frees_at(&l, t0), None);
        // 24 hours later the record is empty.
        let day = u64::try_from(Duration::from_secs(86_400).as_millis()).unwrap();
        assert!(q.next_start(&l, 3, t0 + day + 5001, "m@x").is_none());
        q.finished(0, 0, &l, t0 + day + 5001);
        assert!(q.is_idle());
    }
}
