//! Delivery status notifications (RFC 3464, multipart/report per RFC 6522): when recipients
//! fail for good (a permanent refusal, or the message outlived `max_lifetime`), the envelope
//! sender gets a report, queued like any other message and sent the same way as the original.
//!
//! A report goes out with the null sender `<>` and `Auto-Submitted: auto-replied`, and a
//! message with the null sender never gets one, so reports cannot loop. Its `From:` is the
//! mailbox the original went out as (named "Mail Delivery System"): Microsoft 365 only lets a
//! mailbox send as itself, so that is what makes the report deliverable.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use crate::address;
use crate::smtp::{MessageDraft, MessageSink};
use crate::spool::{
    ENVELOPE_VERSION, Envelope, RcptStatus, Recipient, Spool, SpoolError, msgfile, now_secs,
};

/// At most this much of the original's header is returned in the report.
const MAX_HEADERS: u64 = 64 * 1024;

/// A report to send.
#[derive(Debug, Clone)]
pub struct Bounce {
    /// The original message's envelope (after the failed attempt).
    pub original: Envelope,
    /// Recipients that failed for good, with the reply or reason for each.
    pub failed: Vec<(String, String)>,
    /// The original message's header section.
    pub headers: Vec<u8>,
    /// True when the message outlived its lifetime (status 4.4.7) rather than being refused.
    pub expired: bool,
}

impl Bounce {
    /// A report for `original` if it needs one (not for the null sender, not for nothing).
    pub fn for_failed(
        original: &Envelope,
        failed: Vec<(String, String)>,
        queue_file: &Path,
        expired: bool,
    ) -> Option<Bounce> {
        if original.sender.is_empty() || failed.is_empty() {
            return None;
        }
        // The report goes to the sender as the address type writes it (into `To:` and the
        // report's RCPT); one that cannot be written safely gets no report.
        let mut original = original.clone();
        original.sender = address::wire_form(&original.sender).ok()?;
        Some(Bounce {
            headers: header_section(queue_file, original.size),
            original,
            failed,
            expired,
        })
    }

    /// The report's envelope and bytes.
    pub fn build(&self, hostname: &str, now: u64) -> (Envelope, Vec<u8>) {
        let o = &self.original;
        let boundary = format!("{}/{}", o.id, hostname);
        let date = httpdate_rfc2822(now);
        let mut m = String::new();
        let _ = write!(
            m,
            "Date: {date}\r\nFrom: Mail Delivery System <{mailbox}>\r\nTo: <{to}>\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: <{id}.report@{hostname}>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
            mailbox = o.mailbox,
            to = o.sender,
            id = o.id,
        );
        // 1: for people
        let _ = write!(
            m,
            "--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        let what = if self.expired {
            "could not be delivered before it expired, and postern has given up"
        } else {
            "was refused for good by the receiving system"
        };
        let intro = format!(
            "This is postern, the mail relay at {hostname}. Your message with queue id {} (received {}) {what} for the recipients below. Its headers are attached.",
            o.id,
            httpdate_rfc2822(o.received_at)
        );
        push_wrapped(&mut m, &intro, "");
        m.push_str("\r\n");
        for (rcpt, why) in &self.failed {
            push_wrapped(&mut m, &format!("<{rcpt}>: {why}"), "    ");
            m.push_str("\r\n");
        }
        // 2: for programs
        let _ = write!(
            m,
            "--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; {hostname}\r\nX-Postern-Queue-ID: {}\r\nArrival-Date: {}\r\n",
            o.id,
            httpdate_rfc2822(o.received_at)
        );
        for (rcpt, why) in &self.failed {
            let status = if self.expired {
                "4.4.7".to_owned()
            } else {
                enhanced_code(why).unwrap_or_else(|| "5.0.0".into())
            };
            let _ = write!(
                m,
                "\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {status}\r\n"
            );
            push_folded(&mut m, &format!("Diagnostic-Code: smtp; {why}"));
            let _ = write!(m, "Last-Attempt-Date: {date}\r\n");
        }
        // 3: the original's headers
        let _ = write!(
            m,
            "\r\n--{boundary}\r\nContent-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        );
        let mut bytes = m.into_bytes();
        bytes.extend_from_slice(&self.headers);
        if !self.headers.ends_with(b"\r\n") {
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let env = Envelope {
            version: ENVELOPE_VERSION,
            id: String::new(),
            received_at: now,
            sender: String::new(),
            recipients: vec![Recipient {
                address: o.sender.clone(),
                status: RcptStatus::Pending,
                last_reply: None,
            }],
            client_addr: "postern".into(),
            client_helo: hostname.into(),
            auth_user: None,
            listener: "bounce".into(),
            route: o.route.clone(),
            mailbox: o.mailbox.clone(),
            size: bytes.len() as u64,
            body_8bit: !bytes.is_ascii(),
            smtputf8: o.smtputf8,
            attempts: 0,
            next_attempt: None,
            last_error: None,
            hold_reason: None,
            auto_hold: false,
            graph: None,
        };
        (env, bytes)
    }

    /// Queue the report; returns its queue id.
    pub async fn queue(&self, spool: &Spool, hostname: &str) -> Result<String, SpoolError> {
        let (env, bytes) = self.build(hostname, now_secs());
        let mut draft = spool.begin().await?;
        let id = draft.id().to_string();
        draft.write(&bytes).await?;
        draft.commit(env).await?;
        Ok(id)
    }
}

/// The header section of the queue file's message (up to the blank line, at most 64 KiB).
fn header_section(path: &Path, size: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(r) = msgfile::open_message(path, size.min(MAX_HEADERS)) {
        let _ = r.take(MAX_HEADERS).read_to_end(&mut buf);
    }
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => buf.truncate(end + 2),
        None => {
            // No end of header within the limit: cut at the last complete line.
            if let Some(last) = buf.windows(2).rposition(|w| w == b"\r\n") {
                buf.truncate(last + 2);
            }
        }
    }
    buf
}

/// The first enhanced status code (RFC 3463) in a reply, if any, e.g. "5.1.10".
fn enhanced_code(reply: &str) -> Option<String> {
    reply.split_whitespace().take(3).find_map(|w| {
        let parts: Vec<&str> = w.split('.').collect();
        let ok = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then(|| w.to_string())
    })
}

/// Append `text` wrapped at about 76 columns, continuation lines indented by `indent`.
fn push_wrapped(out: &mut String, text: &str, indent: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 76 {
            out.push_str(&line);
            out.push_str("\r\n");
            line = indent.to_string();
        } else if !line.is_empty() && line != indent {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.trim().is_empty() {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Append a header field folded (RFC 5322 §2.2.3) so no line exceeds 78 characters unless a
/// single word is longer.
fn push_folded(out: &mut String, field: &str) {
    push_wrapped(out, field, "\t");
}

/// An RFC 5322 date for `secs` (UTC).
fn httpdate_rfc2822(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    // httpdate gives "Sun, 06 Nov 1994 08:49:37 GMT"; RFC 5322 wants a numeric zone.
    httpdate::fmt_http_date(t).replace(" GMT", " +0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: "0123456789ABCDEF".into(),
            received_at: 1_700_000_000,
            sender: "scanner@contoso.com".into(),
            recipients: vec![],
            client_addr: "192.0.2.1:1".into(),
            client_helo: "printer".into(),
            auth_user: None,
            listener: "lan".into(),
            route: "m365".into(),
            mailbox: "scanner@contoso.com".into(),
            size: 0,
            body_8bit: false,
            smtputf8: false,
            attempts: 1,
            next_attempt: None,
            last_error: None,
            hold_reason: None,
            auto_hold: false,
            graph: None,
        }
    }

    #[test]
    fn report_structure() {
        let long = format!(
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup {}",
            "x".repeat(300)
        );
        let b = Bounce {
            original: original(),
            failed: vec![("nobody@fabrikam.com".into(), long)],
            headers: b"Subject: scan\r\nFrom: scanner@contoso.com\r\n".to_vec(),
            expired: false,
        };
        let (env, bytes) = b.build("relay.test", 1_700_000_100);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(env.sender, "", "reports go out with the null sender");
        assert_eq!(env.recipients[0].address, "scanner@contoso.com");
        assert_eq!(
            (env.route.as_str(), env.mailbox.as_str()),
            ("m365", "scanner@contoso.com")
        );
        assert_eq!(env.size, bytes.len() as u64);
        assert!(text.contains("From: Mail Delivery System <scanner@contoso.com>\r\n"));
        assert!(text.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains(
            "Final-Recipient: rfc822; nobody@fabrikam.com\r\nAction: failed\r\nStatus: 5.1.10\r\n"
        ));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: scan\r\n"));
        assert!(text.ends_with("--0123456789ABCDEF/relay.test--\r\n"));
        for line in text.split("\r\n") {
            assert!(line.len() <= 998, "line too long: {}", line.len());
        }
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "only CRLF line ends"
        );
    }

    #[test]
    fn expiry_uses_4_4_7_and_no_report_for_the_null_sender() {
        let b = Bounce {
            original: original(),
            failed: vec![("a@b.test".into(), "421 4.3.2 busy".into())],
            headers: vec![],
            expired: true,
        };
        let text = String::from_utf8(b.build("h", 0).1).unwrap();
        assert!(text.contains("Status: 4.4.7"));
        let mut null = original();
        null.sender = String::new();
        assert!(
            Bounce::for_failed(
                &null,
                vec![("a@b.test".into(), "x".into())],
                Path::new("/nonexistent"),
                false
            )
            .is_none()
        );
        assert!(
            Bounce::for_failed(&original(), vec![], Path::new("/nonexistent"), false).is_none()
        );
    }

    #[test]
    fn reports_go_to_the_sender_as_the_address_type_writes_it() {
        let failed = || vec![("a@b.test".into(), "550 5.1.1 no".into())];
        let mut o = original();
        // An older spool's unquoted text for the local part "a b".
        o.sender = "a b@contoso.com".into();
        let b = Bounce::for_failed(&o, failed(), Path::new("/nonexistent"), false).unwrap();
        let (env, bytes) = b.build("h", 0);
        assert_eq!(env.recipients[0].address, "\"a b\"@contoso.com");
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .contains("To: <\"a b\"@contoso.com>\r\n")
        );
        // A sender that would break the header gets no report.
        o.sender = "x\r\nBcc: victim@example.com@contoso.com".into();
        assert!(Bounce::for_failed(&o, failed(), Path::new("/nonexistent"), false).is_none());
    }

    #[test]
    fn codes_are_found_only_where_they_belong() {
        assert_eq!(
            enhanced_code("550 5.1.10 RESOLVER.ADR.RecipientNotFound").as_deref(),
            Some("5.1.10")
        );
        assert_eq!(enhanced_code("554 Transaction failed 1.2.3.4"), None);
        assert_eq!(enhanced_code("cannot write into /x: 5.0"), None);
    }
}
