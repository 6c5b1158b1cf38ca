//! Bounded logging of refusals. A client that triggers thousands of refusals (connections from
//! outside `allow_networks`, a password guesser, a scanner) must not be able to write thousands
//! of log lines: each client may log [`PER_CLIENT`] refusals a minute and all clients together
//! [`TOTAL`]; the rest are counted, and when the minute is over one line per client (for the
//! [`SUMMARIES`] busiest, then one line for all others) says how many were not logged. So the
//! refusal log is at most `TOTAL + SUMMARIES + 1` lines a minute, whatever the traffic.
//!
//! "Client" is the address as the connection limits count it: an IPv4 address, or the IPv6
//! network of `limits.ipv6_prefix` bits (a /64 is one machine's, often), see
//! [`crate::smtp::policy::client_key`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The period the limits apply to.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Refusal lines one client may write in a [`WINDOW`].
pub const PER_CLIENT: u32 = 20;
/// Refusal lines all clients together may write in a [`WINDOW`].
pub const TOTAL: u32 = 300;
/// Clients named in the summary of a window; the others are summed up in one line.
pub const SUMMARIES: usize = 10;
/// Clients tracked in one window; refusals of clients beyond are counted together.
const MAX_CLIENTS: usize = 4096;

/// What a window left unlogged, to be logged when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Summary {
    /// One client's refusals that were not logged.
    Client {
        /// The client (address or IPv6 network).
        client: String,
        /// Refusals not logged.
        suppressed: u64,
    },
    /// Refusals of all other clients that were not logged.
    Others {
        /// How many clients.
        clients: u64,
        /// Refusals not logged.
        suppressed: u64,
    },
}

/// The counts of the current window.
#[derive(Debug)]
pub struct Throttle {
    start: Option<Instant>,
    v6_prefix: u8,
    total: u32,
    clients: HashMap<String, (u32, u64)>,
    /// Refusals of clients that did not fit in the table: (refusals, clients).
    untracked: (u64, u64),
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(crate::config::DEFAULT_IPV6_PREFIX)
    }
}

impl Throttle {
    /// Empty counts; IPv6 clients are grouped by `v6_prefix` bits.
    pub fn new(v6_prefix: u8) -> Self {
        Self {
            start: None,
            v6_prefix,
            total: 0,
            clients: HashMap::new(),
            untracked: (0, 0),
        }
    }

    /// Group IPv6 clients by `bits` from now on.
    pub fn set_v6_prefix(&mut self, bits: u8) {
        self.v6_prefix = bits;
    }

    /// The key `client` (`ip:port`, or any text) is counted under.
    fn key(&self, client: &str) -> String {
        match client
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| client.parse::<IpAddr>())
        {
            Ok(ip) => crate::smtp::policy::client_key_text(ip, self.v6_prefix),
            Err(_) => client.to_string(),
        }
    }

    /// One refusal of `client` at `now`: whether to log it, and the summary of the window that
    /// ended before it, if one did.
    pub fn refusal(&mut self, client: &str, now: Instant) -> (bool, Vec<Summary>) {
        let ended = self.roll(now);
        let key = self.key(client);
        let tracked = self.clients.len() < MAX_CLIENTS || self.clients.contains_key(&key);
        if !tracked {
            self.untracked.0 += 1;
            self.untracked.1 += 1;
            return (false, ended);
        }
        let entry = self.clients.entry(key).or_insert((0, 0));
        let log = entry.0 < PER_CLIENT && self.total < TOTAL;
        if log {
            entry.0 += 1;
            self.total += 1;
        } else {
            entry.1 += 1;
        }
        (log, ended)
    }

    /// End the window if it is over at `now`; returns what it left unlogged.
    pub fn roll(&mut self, now: Instant) -> Vec<Summary> {
        match self.start {
            Some(s) if now.saturating_duration_since(s) < WINDOW => Vec::new(),
            Some(_) => {
                let out = self.summaries();
                self.start = Some(now);
                self.total = 0;
                self.clients.clear();
                self.untracked = (0, 0);
                out
            }
            None => {
                self.start = Some(now);
                Vec::new()
            }
        }
    }

    /// End the window now, whatever its age (shutdown): what it left unlogged.
    pub fn finish(&mut self) -> Vec<Summary> {
        let out = self.summaries();
        self.start = None;
        self.total = 0;
        self.clients.clear();
        self.untracked = (0, 0);
        out
    }

    fn summaries(&self) -> Vec<Summary> {
        let mut busy: Vec<(&String, u64)> = self
            .clients
            .iter()
            .filter(|(_, (_, s))| *s > 0)
            .map(|(k, (_, s))| (k, *s))
            .collect();
        busy.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut out: Vec<Summary> = busy
            .iter()
            .take(SUMMARIES)
            .map(|(k, s)| Summary::Client {
                client: (*k).clone(),
                suppressed: *s,
            })
            .collect();
        let rest = &busy[busy.len().min(SUMMARIES)..];
        let (mut suppressed, mut clients) = self.untracked;
        for (_, s) in rest {
            suppressed += s;
            clients += 1;
        }
        if suppressed > 0 {
            out.push(Summary::Others {
                clients,
                suppressed,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_logs_its_share_then_is_counted_and_summed_up() {
        let mut t = Throttle::new(64);
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|i| t.refusal(&format!("192.0.2.7:{}", 1000 + i), t0).0)
            .count();
        assert_eq!(logged, PER_CLIENT as usize);
        // Another client still gets its lines.
        assert!(t.refusal("198.51.100.1:25", t0).0);
        // The window ends: one summary line for the flood.
        let (log, ended) = t.refusal("192.0.2.7:1", t0 + WINDOW);
        assert!(log, "a new window");
        assert_eq!(
            ended,
            vec![Summary::Client {
                client: "192.0.2.7".into(),
                suppressed: 1000 - u64::from(PER_CLIENT),
            }]
        );
    }

    #[test]
    fn an_ipv6_network_is_one_client() {
        let mut t = Throttle::new(64);
        let t0 = Instant::now();
        let logged = (0..100u32)
            .filter(|i| t.refusal(&format!("[2001:db8:1:2::{:x}]:25", i + 1), t0).0)
            .count();
        assert_eq!(logged, PER_CLIENT as usize, "one /64, one share");
        assert_eq!(
            t.finish(),
            vec![Summary::Client {
                client: "2001:db8:1:2::/64".into(),
                suppressed: 100 - u64::from(PER_CLIENT),
            }]
        );
    }

    #[test]
    fn many_clients_together_stay_within_the_total_and_few_summary_lines() {
        let mut t = Throttle::new(64);
        let t0 = Instant::now();
        let mut logged = 0;
        for n in 0..10_000u32 {
            for _ in 0..3 {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + n);
                if t.refusal(&format!("{ip}:25"), t0).0 {
                    logged += 1;
                }
            }
        }
        assert_eq!(logged, TOTAL as usize);
        let s = t.finish();
        assert_eq!(s.len(), SUMMARIES + 1, "{s:?}");
        let total: u64 = s
            .iter()
            .map(|x| match x {
                Summary::Client { suppressed, .. } | Summary::Others { suppressed, .. } => {
                    *suppressed
                }
            })
            .sum();
        assert_eq!(total, 30_000 - u64::from(TOTAL));
    }
}
