//! What a pasted text holds: SMTP replies (with or without the basic code), `AADSTSnnnn`
//! codes, Entra error JSON (§1.6), Graph error JSON (§4.5), Graph error codes named in text,
//! postern's own log lines as text or JSON, and queue ids.

use serde_json::Value;

use super::{Sign, TABLE};

/// An SMTP reply found in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    /// Basic code (0 when only the enhanced code was given).
    pub code: u16,
    /// Enhanced status code, when present.
    pub esc: Option<(u8, u16, u16)>,
    /// The reply from its code to the end of the quote or line.
    pub text: String,
}

/// Everything recognisable in one input.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// The input as searched for phrases (JSON strings unescaped and joined).
    pub text: String,
    /// SMTP replies, in order of appearance, without repeats.
    pub replies: Vec<SmtpReply>,
    /// AADSTS codes.
    pub aadsts: Vec<u32>,
    /// Entra `error` values named (device flow states and the like).
    pub entra_errors: Vec<String>,
    /// Graph error codes with their message when known.
    pub graph: Vec<(String, Option<String>)>,
    /// Things shaped like queue ids.
    pub queue_ids: Vec<String>,
    /// What a log line says about the context: `mailbox`, `from` (the address Exchange
    /// refused to send as), `queue_id`, `account`, `server`.
    pub context: Vec<(&'static str, String)>,
}

impl Evidence {
    /// Nothing recognisable but the text itself.
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
            && self.aadsts.is_empty()
            && self.entra_errors.is_empty()
            && self.graph.is_empty()
    }
}

/// Find everything recognisable in `input`.
pub fn evidence(input: &str) -> Evidence {
    let mut ev = Evidence::default();
    let mut texts = Vec::new();
    // Whole input as JSON, or one JSON object per line (a pasted JSON log).
    let trimmed = input.trim();
    let json_lines: Vec<Value> = if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        vec![v]
    } else {
        trimmed
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let start = l.find('{')?;
                serde_json::from_str::<Value>(&l[start..]).ok()
            })
            .collect()
    };
    if json_lines.is_empty() {
        texts.push(input.to_string());
    }
    for v in &json_lines {
        json_evidence(v, &mut ev);
        let mut strings = Vec::new();
        collect_strings(v, &mut strings);
        texts.push(strings.join("\n"));
    }
    let text = texts.join("\n");
    if trimmed.len() >= 5 && trimmed.len() <= 8 && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        // A bare number: an AADSTS code without its prefix.
        if let Ok(c) = trimmed.parse() {
            push(&mut ev.aadsts, c);
        }
    }
    for c in aadsts_codes(&text) {
        push(&mut ev.aadsts, c);
    }
    for r in smtp_replies(&text) {
        if !ev
            .replies
            .iter()
            .any(|x| x.esc == r.esc && x.code == r.code)
        {
            ev.replies.push(r);
        }
    }
    // Codes the table knows, named in free text.
    for e in TABLE {
        for s in e.signs {
            match s {
                Sign::EntraError(name) if contains_word(&text, name) => {
                    push(&mut ev.entra_errors, name.to_string());
                }
                Sign::Graph { code, .. }
                    if contains_word(&text, code) && !ev.graph.iter().any(|(c, _)| c == code) =>
                {
                    ev.graph.push((code.to_string(), Some(text.clone())));
                }
                _ => {}
            }
        }
    }
    for w in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        if crate::spool::is_valid_id(w) {
            push(&mut ev.queue_ids, w.to_string());
        }
    }
    for v in &json_lines {
        for key in ["mailbox", "queue_id", "account"] {
            if let Some(x) = v.get(key).and_then(Value::as_str) {
                ev.context.push((key, x.to_string()));
            }
        }
    }
    for key in ["mailbox", "queue_id", "account"] {
        if ev.context.iter().any(|(k, _)| *k == key) {
            continue;
        }
        if let Some(x) = field(&text, key) {
            ev.context.push((key, x));
        }
    }
    if ev.context.iter().all(|(k, _)| *k != "queue_id")
        && let [one] = ev.queue_ids.as_slice()
    {
        ev.context.push(("queue_id", one.clone()));
    }
    if let Some(i) = text.find("not allowed to send as ") {
        let rest = &text[i + "not allowed to send as ".len()..];
        let b = rest
            .split([';', ' ', '"', '\\'])
            .next()
            .unwrap_or("")
            .trim();
        if b.contains('@') {
            ev.context.push(("from", b.to_string()));
        }
    }
    if let Some(i) = text.find(" answered ") {
        let server = text[..i].rsplit([' ', '"', '=']).next().unwrap_or("");
        if server.contains(':') || server.contains('.') {
            ev.context.push(("server", server.to_string()));
        }
    }
    ev.text = text;
    ev
}

/// The value of `key=value` in a human log line (quoted or not).
fn field(text: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut start = 0;
    while let Some(i) = text[start..].find(&pat) {
        let at = start + i;
        let before = text[..at].chars().next_back();
        if before.is_none_or(|c| c == ' ' || c == '\t') {
            let rest = &text[at + pat.len()..];
            let v = match rest.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or(""),
                None => rest.split([' ', '\t', '\n']).next().unwrap_or(""),
            };
            if !v.is_empty() {
                return Some(v.to_string());
            }
        }
        start = at + pat.len();
    }
    None
}

/// The first SMTP reply in `text` (cheap: no table lookups), for metrics labels.
pub fn first_reply(text: &str) -> Option<SmtpReply> {
    smtp_replies(text).into_iter().next()
}

fn push<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// Entra's error JSON (`error` + `error_codes`) and Graph's (`{"error":{"code","message"}}`),
/// anywhere in the value.
fn json_evidence(v: &Value, ev: &mut Evidence) {
    match v {
        Value::Object(m) => {
            match m.get("error") {
                Some(Value::String(e)) => {
                    push(&mut ev.entra_errors, e.clone());
                    if let Some(Value::Array(codes)) = m.get("error_codes") {
                        for c in codes.iter().filter_map(Value::as_u64) {
                            if let Ok(c) = u32::try_from(c) {
                                push(&mut ev.aadsts, c);
                            }
                        }
                    }
                }
                Some(Value::Object(g)) => {
                    if let Some(code) = g.get("code").and_then(Value::as_str) {
                        let message = g.get("message").and_then(Value::as_str).map(str::to_string);
                        ev.graph.push((code.to_string(), message));
                    }
                }
                _ => {}
            }
            for x in m.values() {
                json_evidence(x, ev);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| json_evidence(x, ev)),
        // A log line may carry JSON as a string (an upstream body quoted in a reason).
        Value::String(s) if s.trim_start().starts_with('{') => {
            if let Ok(inner) = serde_json::from_str::<Value>(s.trim()) {
                json_evidence(&inner, ev);
            }
        }
        _ => {}
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

fn aadsts_codes(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let upper = text.to_ascii_uppercase();
    let mut rest = upper.as_str();
    while let Some(i) = rest.find("AADSTS") {
        rest = &rest[i + 6..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(c) = digits.parse() {
            out.push(c);
        }
    }
    out
}

fn contains_word(text: &str, word: &str) -> bool {
    let mut start = 0;
    while let Some(i) = text[start..].find(word) {
        let at = start + i;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        if boundary(before) && boundary(after) {
            return true;
        }
        start = at + word.len();
    }
    false
}

/// `d.d.d` at `s`, as (class, subject, detail) and its length, when class is 2, 4 or 5 and it
/// is not part of a longer dotted number.
fn enhanced_at(s: &[u8]) -> Option<((u8, u16, u16), usize)> {
    let class = match s.first()? {
        b @ (b'2' | b'4' | b'5') => b - b'0',
        _ => return None,
    };
    if s.get(1) != Some(&b'.') {
        return None;
    }
    let num = |from: usize| -> Option<(u16, usize)> {
        let n = s[from..].iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || n > 3 {
            return None;
        }
        let v = std::str::from_utf8(&s[from..from + n]).ok()?.parse().ok()?;
        Some((v, from + n))
    };
    let (subject, end) = num(2)?;
    if s.get(end) != Some(&b'.') {
        return None;
    }
    let (detail, end) = num(end + 1)?;
    // "5.7.139.1" is an address, not a status code.
    if s.get(end) == Some(&b'.') && s.get(end + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    if s.get(end).is_some_and(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(((class, subject, detail), end))
}

/// Replies in the text: `NNN[ -]d.d.d ...`, a bare `d.d.d ...`, or `NNN text` at the start of
/// a line. The text of each runs to the end of its line or of the quote around it.
fn smtp_replies(text: &str) -> Vec<SmtpReply> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.');
        if !boundary || !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        // Without an enhanced code, a reply counts only where one begins: at the start of a
        // line or a quote, or after "Error: " (never "host:587").
        let line_start = {
            let before = &text[..i];
            let trimmed = before.trim_end_matches([' ', '\t']);
            trimmed.is_empty()
                || trimmed.ends_with(['\n', '"'])
                || (trimmed.ends_with(':') && trimmed.len() < before.len())
        };
        let three = b.len() >= i + 4
            && b[i..i + 3].iter().all(u8::is_ascii_digit)
            && (b'2'..=b'5').contains(&b[i])
            && (b[i + 3] == b' ' || b[i + 3] == b'-');
        if three {
            let code: u16 = text[i..i + 3].parse().unwrap_or(0);
            if let Some((esc, len)) = enhanced_at(&b[i + 4..]) {
                // The enhanced code's class must agree with the basic code's.
                if esc.0 as u16 == code / 100 {
                    out.push(SmtpReply {
                        code,
                        esc: Some(esc),
                        text: reply_text(&text[i..]),
                    });
                    i += 4 + len;
                    continue;
                }
            } else if line_start && (400..600).contains(&code) {
                out.push(SmtpReply {
                    code,
                    esc: None,
                    text: reply_text(&text[i..]),
                });
                i += 4;
                continue;
            }
        }
        // A bare enhanced code counts only for failures: "version 2.4.1" is not a reply.
        if let Some((esc, len)) = enhanced_at(&b[i..]).filter(|(e, _)| e.0 != 2) {
            out.push(SmtpReply {
                code: 0,
                esc: Some(esc),
                text: reply_text(&text[i..]),
            });
            i += len;
            continue;
        }
        i += 1;
    }
    out
}

/// A reply's text: up to the end of its line or the closing quote of the log field it sits in.
fn reply_text(s: &str) -> String {
    let end = s.find(['\n', '"', '\\']).unwrap_or(s.len());
    s[..end].trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_found_in_log_lines() {
        let line = r#"2025-01-01T00:00:00Z WARN postern::maillog: held queue_id=0190A1B2C3D4E5F6 mailbox=printer@contoso.com reason="smtp.office365.com:587 answered AUTH XOAUTH2 as printer@contoso.com with \"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [X 2025 1]\". Exchange ...""#;
        let ev = evidence(line);
        assert_eq!(ev.replies.len(), 1, "{:?}", ev.replies);
        assert_eq!(ev.replies[0].code, 535);
        assert_eq!(ev.replies[0].esc, Some((5, 7, 139)));
        assert!(
            ev.replies[0].text.ends_with("[X 2025 1]"),
            "{:?}",
            ev.replies[0]
        );
        assert_eq!(ev.queue_ids, vec!["0190A1B2C3D4E5F6"]);
    }

    #[test]
    fn multibyte_text_around_codes() {
        let ev = evidence("Entra admin centre → App registrations → 535 5.7.3 x → y");
        assert_eq!(ev.replies[0].esc, Some((5, 7, 3)));
    }

    #[test]
    fn bare_codes_and_addresses() {
        let ev = evidence("5.7.139");
        assert_eq!(ev.replies[0].esc, Some((5, 7, 139)));
        assert!(evidence("connect to 5.7.139.1 failed").replies.is_empty());
        assert!(evidence("version 2.4.1").replies.is_empty());
        let ev = evidence("421 Service not available, closing transmission channel");
        assert_eq!(ev.replies[0].code, 421);
        assert_eq!(ev.replies[0].esc, None);
    }

    #[test]
    fn entra_and_graph_json() {
        let entra = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x","error_codes":[7000215]}"#;
        let ev = evidence(entra);
        assert_eq!(ev.aadsts, vec![7000215]);
        assert!(ev.entra_errors.contains(&"invalid_client".to_string()));
        let graph = r#"{"error":{"code":"ErrorAccessDenied","message":"Access to OData is disabled.","innerError":{"request-id":"1"}}}"#;
        let ev = evidence(graph);
        assert_eq!(
            ev.graph[0],
            (
                "ErrorAccessDenied".to_string(),
                Some("Access to OData is disabled.".to_string())
            )
        );
        assert_eq!(evidence("7000222").aadsts, vec![7000222]);
    }
}
