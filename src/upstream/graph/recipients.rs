//! Who receives the message: Graph has no envelope, it sends to the message's `To:`, `Cc:` and
//! `Bcc:` (microsoft-reference.md §4.2). postern's envelope decides, so the transport
//! compares the two (headers parsed with mail-parser) and picks how to send:
//!
//! - every header recipient is a pending envelope recipient: `sendMail` with the MIME as
//!   received, plus a `Bcc:` header in front naming the envelope recipients the headers miss
//!   (the usual Bcc case; the queue file is not changed);
//! - otherwise (a header names someone who is not, or no longer, a pending envelope
//!   recipient: a client that split one message into several transactions, a DSN, a list
//!   expansion, a recipient already delivered or refused), or when a `Bcc:` header is already
//!   there and more recipients must be added (a message has at most one `Bcc:` field):
//!   the draft path, whose recipient lists are set from the envelope (see `super`).

use mail_parser::{HeaderName, MessageParser};

/// How to send, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// `sendMail` with the MIME; `bcc` (may be empty) goes into a `Bcc:` header added in front.
    Fast {
        /// Envelope recipients no header names.
        bcc: Vec<String>,
    },
    /// A draft from the MIME whose recipients are then set to exactly these.
    Draft(Recipients),
}

/// The recipient lists of a draft: each pending envelope recipient exactly once. Those the
/// message's `To:` (or `Cc:`) names stay there; every other one goes to Bcc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipients {
    /// `toRecipients`.
    pub to: Vec<String>,
    /// `ccRecipients`.
    pub cc: Vec<String>,
    /// `bccRecipients`.
    pub bcc: Vec<String>,
}

/// The addresses of the `To:`, `Cc:` and `Bcc:` fields (every occurrence) of `header` (the
/// message's header section; what follows it is ignored), lowercased, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeaderRecipients {
    /// `To:`.
    pub to: Vec<String>,
    /// `Cc:`.
    pub cc: Vec<String>,
    /// `Bcc:`.
    pub bcc: Vec<String>,
    /// A `Bcc:` field is present (even an empty one).
    pub has_bcc: bool,
}

impl HeaderRecipients {
    /// Parse `header` with mail-parser.
    pub fn parse(header: &[u8]) -> HeaderRecipients {
        let Some(msg) = MessageParser::new().parse_headers(header) else {
            return HeaderRecipients::default();
        };
        let list = |name: HeaderName<'static>| -> Vec<String> {
            let mut out = Vec::new();
            for v in msg.header_values(name) {
                if let Some(a) = v.as_address() {
                    for addr in a.iter() {
                        if let Some(x) = addr.address() {
                            let x = x.trim().to_lowercase();
                            if !x.is_empty() && !out.contains(&x) {
                                out.push(x);
                            }
                        }
                    }
                }
            }
            out
        };
        HeaderRecipients {
            to: list(HeaderName::To),
            cc: list(HeaderName::Cc),
            bcc: list(HeaderName::Bcc),
            has_bcc: msg.header_values(HeaderName::Bcc).next().is_some(),
        }
    }

    fn names(&self, a: &str) -> bool {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .any(|x| x == a)
    }
}

/// Decide how to send to `wanted` (the pending envelope recipients, in envelope order) a
/// message whose headers name `h`. `force_draft`: the draft path regardless (the route keeps
/// no copy in Sent Items, which only a draft can say).
pub fn plan(h: &HeaderRecipients, wanted: &[String], force_draft: bool) -> Plan {
    let wanted_lc: Vec<String> = wanted.iter().map(|w| w.to_lowercase()).collect();
    let is_wanted = |a: &str| wanted_lc.iter().any(|w| w == a);
    let extra =
        h.to.iter()
            .chain(&h.cc)
            .chain(&h.bcc)
            .any(|a| !is_wanted(a));
    let mut missing = Vec::new();
    for (w, lc) in wanted.iter().zip(&wanted_lc) {
        if !h.names(lc) && !missing.iter().any(|m: &String| m.eq_ignore_ascii_case(w)) {
            missing.push(w.clone());
        }
    }
    // A second Bcc field would be one too many: then the draft path sets the list.
    let bcc_clash = h.has_bcc && !missing.is_empty();
    if !(extra || force_draft || bcc_clash) {
        return Plan::Fast { bcc: missing };
    }
    let mut r = Recipients::default();
    let mut placed: Vec<String> = Vec::new();
    for (w, lc) in wanted.iter().zip(&wanted_lc) {
        if placed.contains(lc) {
            continue;
        }
        placed.push(lc.clone());
        if h.to.contains(lc) {
            r.to.push(w.clone());
        } else if h.cc.contains(lc) {
            r.cc.push(w.clone());
        } else {
            r.bcc.push(w.clone());
        }
    }
    Plan::Draft(r)
}

/// The `Bcc:` header line added in front of the message for `bcc` (empty: nothing), folded
/// so no line grows long.
pub fn bcc_header(bcc: &[String]) -> Vec<u8> {
    if bcc.is_empty() {
        return Vec::new();
    }
    let mut out = String::from("Bcc: ");
    for (i, a) in bcc.iter().enumerate() {
        if i > 0 {
            out.push_str(",\r\n ");
        }
        out.push_str(&format!("<{a}>"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn headers_are_read_with_groups_folding_and_every_occurrence() {
        let h = HeaderRecipients::parse(
            b"Received: from x\r\nTo: \"Boss, The\" <Boss@Fabrikam.com>,\r\n ops@fabrikam.com\r\nCc: team: a@x.test, b@x.test;\r\nTo: late@x.test\r\nSubject: s\r\n\r\nTo: body@x.test\r\n",
        );
        assert_eq!(
            h.to,
            w(&["boss@fabrikam.com", "ops@fabrikam.com", "late@x.test"])
        );
        assert_eq!(h.cc, w(&["a@x.test", "b@x.test"]));
        assert!(h.bcc.is_empty() && !h.has_bcc);
    }

    #[test]
    fn envelope_recipients_missing_from_the_headers_become_a_bcc() {
        let h = HeaderRecipients::parse(b"To: a@x.test\r\n\r\n");
        assert_eq!(
            plan(&h, &w(&["A@x.test", "hidden@y.test"]), false),
            Plan::Fast {
                bcc: w(&["hidden@y.test"])
            }
        );
        assert_eq!(
            plan(&h, &w(&["a@x.test"]), false),
            Plan::Fast { bcc: vec![] }
        );
        assert_eq!(
            bcc_header(&w(&["a@x.test", "b@y.test"])),
            b"Bcc: <a@x.test>,\r\n <b@y.test>\r\n".to_vec()
        );
    }

    #[test]
    fn a_header_recipient_outside_the_envelope_needs_the_draft_path() {
        let h = HeaderRecipients::parse(
            b"To: a@x.test, other@x.test\r\nCc: c@x.test\r\nBcc: d@x.test\r\n\r\n",
        );
        assert_eq!(
            plan(
                &h,
                &w(&["a@x.test", "c@x.test", "d@x.test", "e@x.test"]),
                false
            ),
            Plan::Draft(Recipients {
                to: w(&["a@x.test"]),
                cc: w(&["c@x.test"]),
                bcc: w(&["d@x.test", "e@x.test"]),
            })
        );
    }

    #[test]
    fn a_present_bcc_field_is_not_doubled() {
        let h = HeaderRecipients::parse(b"To: a@x.test\r\nBcc: b@x.test\r\n\r\n");
        assert_eq!(
            plan(&h, &w(&["a@x.test", "b@x.test"]), false),
            Plan::Fast { bcc: vec![] }
        );
        assert!(matches!(
            plan(&h, &w(&["a@x.test", "b@x.test", "c@x.test"]), false),
            Plan::Draft(_)
        ));
    }

    #[test]
    fn each_envelope_recipient_exactly_once() {
        let h = HeaderRecipients::parse(b"To: a@x.test\r\nCc: a@x.test, z@x.test\r\n\r\n");
        let Plan::Draft(r) = plan(&h, &w(&["a@x.test", "A@X.test", "b@x.test"]), false) else {
            panic!("z@x.test is not an envelope recipient");
        };
        assert_eq!(r.to, w(&["a@x.test"]));
        assert!(r.cc.is_empty());
        assert_eq!(r.bcc, w(&["b@x.test"]));
    }

    #[test]
    fn no_header_at_all_sends_to_the_envelope_as_bcc() {
        let h = HeaderRecipients::parse(b"");
        assert_eq!(
            plan(&h, &w(&["a@x.test"]), false),
            Plan::Fast {
                bcc: w(&["a@x.test"])
            }
        );
        assert!(matches!(plan(&h, &w(&["a@x.test"]), true), Plan::Draft(_)));
    }
}
