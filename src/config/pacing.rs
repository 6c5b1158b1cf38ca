//! Per-route pacing limits (`rate`, `daily_recipients`): their values and how they are written.
//!
//! Exchange Online accepts 30 messages a minute and 10,000 recipients a rolling 24 hours per
//! mailbox (microsoft-reference.md §3.6, §5); the same limits apply to Graph sends (§4.4).
//! The forwarder keeps every mailbox under its route's limits (`forward::pacing`).

use std::fmt;
use std::time::Duration;

/// At most `count` events per rolling `per`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// In what rolling period.
    pub per: Duration,
    /// As written in the configuration (`30/min`), for messages.
    pub shown: String,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A route's limits for each mailbox it sends as; `None` = unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pacing {
    /// Messages started per period (`rate`).
    pub rate: Option<Rate>,
    /// Recipients sent to per rolling period (`daily_recipients`).
    pub recipients: Option<Rate>,
}

impl Pacing {
    /// Exchange Online's limits: 30 messages a minute, 10,000 recipients a rolling 24 hours.
    pub fn exchange() -> Pacing {
        Pacing {
            rate: Some(Rate {
                count: 30,
                per: Duration::from_secs(60),
                shown: "30/min".into(),
            }),
            recipients: Some(Rate {
                count: 10_000,
                per: DAY,
                shown: "10000 recipients/24h".into(),
            }),
        }
    }
}

/// The rolling window of `daily_recipients` when only a number is written.
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// Parse `rate`: `"30/min"`, `"5/2s"`, `"100/1h"` (count, then `/` and a unit or a duration),
/// or `"unlimited"`.
pub fn parse_rate(s: &str) -> Result<Option<Rate>, String> {
    parse(s, "message", "\"30/min\"")
}

/// Parse `daily_recipients` written as a string: `"10000/24h"`, `"5/3s"`, or `"unlimited"`.
/// (A plain number N means N per 24 hours: see [`daily_count`].)
pub fn parse_recipients(s: &str) -> Result<Option<Rate>, String> {
    parse(s, "recipient", "10000")
}

/// `daily_recipients = N`: N recipients per rolling 24 hours.
pub fn daily_count(n: i64) -> Result<Rate, String> {
    match u32::try_from(n) {
        Ok(count) if count >= 1 => Ok(Rate {
            count,
            per: DAY,
            shown: format!("{count} recipients/24h"),
        }),
        _ => Err(format!(
            "{n} is out of range; write a number of recipients per 24 hours from 1 to {}, such as 10000, or \"unlimited\"",
            u32::MAX
        )),
    }
}

fn parse(s: &str, what: &str, example: &str) -> Result<Option<Rate>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let bad = || {
        format!(
            "{s:?} is not a rate; write a number of {what}s per period such as {example} or \"5/2s\" (count/period), or \"unlimited\""
        )
    };
    let (count, period) = t.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "{s:?} allows no {what} at all; write at least 1 per period, such as {example}, or \"unlimited\""
        ));
    }
    let period = period.trim();
    // A bare unit means one of it: "30/min" is 30 per 1 min.
    let spelled = if period.starts_with(|c: char| c.is_ascii_digit()) {
        period.to_string()
    } else {
        format!("1{period}")
    };
    let per = humantime::parse_duration(&spelled).map_err(|_| bad())?;
    if per.is_zero() {
        return Err(bad());
    }
    let shown = if what == "recipient" {
        format!("{count} recipients/{period}")
    } else {
        format!("{count}/{period}")
    };
    Ok(Some(Rate { count, per, shown }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_as_written() {
        let r = parse_rate("30/min").unwrap().unwrap();
        assert_eq!(
            (r.count, r.per, r.shown.as_str()),
            (30, Duration::from_secs(60), "30/min")
        );
        let r = parse_rate(" 5/2s ").unwrap().unwrap();
        assert_eq!((r.count, r.per), (5, Duration::from_secs(2)));
        assert_eq!(
            parse_rate("100/1h").unwrap().unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_rate("2/hour").unwrap().unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!(parse_rate("unlimited").unwrap(), None);
        for bad in [
            "30",
            "30/",
            "/min",
            "x/min",
            "30/fortnight",
            "-1/min",
            "30/0s",
            "0/min",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let r = parse_recipients("5/3s").unwrap().unwrap();
        assert_eq!((r.count, r.shown.as_str()), (5, "5 recipients/3s"));
        assert_eq!(daily_count(10_000).unwrap().per, DAY);
        assert!(daily_count(0).is_err() && daily_count(-5).is_err());
        assert!(daily_count(i64::from(u32::MAX) + 1).is_err());
    }
}
