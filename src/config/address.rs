//! Address patterns used by `may_send_as` and route `senders`.

use std::fmt;

/// `user@example.com`, `*@example.com` (any user of that domain) or `*` (anyone).
/// Matching is ASCII case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    /// Any address, including the null sender `<>`.
    Any,
    /// Any local part at this domain (lower-cased).
    Domain(String),
    /// Exactly this address (lower-cased).
    Exact(String),
}

impl AddressPattern {
    /// Parse a pattern, or say what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::Any);
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return Err(format!(
                "\"{s}\" is not an address pattern; write \"user@example.com\", \"*@example.com\" or \"*\""
            ));
        };
        if domain.is_empty() || domain.contains('*') || domain.contains(char::is_whitespace) {
            return Err(format!(
                "\"{s}\" has no valid domain; write \"user@example.com\" or \"*@example.com\""
            ));
        }
        if local == "*" {
            return Ok(Self::Domain(domain.to_ascii_lowercase()));
        }
        if local.is_empty() || local.contains('*') || local.contains(char::is_whitespace) {
            return Err(format!(
                "\"{s}\": wildcards are only allowed as the whole local part (\"*@{domain}\")"
            ));
        }
        Ok(Self::Exact(s.to_ascii_lowercase()))
    }

    /// Does `address` (an envelope address without angle brackets) match?
    pub fn matches(&self, address: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Domain(d) => address
                .rsplit_once('@')
                .is_some_and(|(l, dom)| !l.is_empty() && dom.eq_ignore_ascii_case(d)),
            Self::Exact(a) => address.eq_ignore_ascii_case(a),
        }
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Domain(d) => write!(f, "*@{d}"),
            Self::Exact(a) => f.write_str(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_case_insensitively() {
        let p = AddressPattern::parse("*@Example.com").unwrap();
        assert!(p.matches("scanner@EXAMPLE.com"));
        assert!(!p.matches("scanner@example.org"));
        assert!(!p.matches("@example.com"));
        let e = AddressPattern::parse("Printer@example.com").unwrap();
        assert!(e.matches("printer@example.COM"));
        assert!(!e.matches("printer2@example.com"));
        assert!(AddressPattern::parse("*").unwrap().matches(""));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        for bad in ["example.com", "a*b@example.com", "user@", "user@*.com"] {
            let err = AddressPattern::parse(bad).unwrap_err();
            assert!(
                err.contains("write") || err.contains("wildcards"),
                "{bad}: {err}"
            );
        }
    }
}
