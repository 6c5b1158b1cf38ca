//! The status page: one HTML document with its style inline, no script, no external assets;
//! it reloads itself (`<meta http-equiv="refresh">`). Every text from the spool or the
//! configuration is escaped.

use std::fmt::Write;

use crate::status::{MailboxState, Snapshot};

/// HTML-escape `s` (text and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

fn age(secs: u64) -> String {
    let s = secs;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:1rem 1.5rem;color:#1d2330;background:#fafbfc}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #d8dde6;padding-bottom:.2rem}
.sub{color:#5b6475;margin:0}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #e4e8ee;vertical-align:top}
th{font-weight:600;color:#3b4456;background:#f0f3f7}.badge{display:inline-block;padding:.05rem .55rem;border-radius:.8rem;font-size:.85rem;font-weight:600}
.flowing{background:#dff3e4;color:#17662f}.retrying{background:#fff1cc;color:#7a5600}.paced{background:#e3ecfb;color:#1d4a8f}.held{background:#fde0e0;color:#9b1c1c}
tr.held td{background:#fff6f6}.ok{color:#17662f}.bad{color:#9b1c1c;font-weight:600}.why{font-size:.9rem;color:#3b4456}
.fix{margin:.3rem 0 0;padding:.4rem .6rem;background:#f4f6fa;border-left:3px solid #9b1c1c;font-size:.9rem}
code{font:13px ui-monospace,monospace;background:#eef1f5;padding:0 .2rem;border-radius:3px}footer{margin-top:2rem;color:#5b6475;font-size:.85rem}";

/// The page for `s`, reloading every `refresh` seconds.
pub fn render(s: &Snapshot, refresh: u32) -> String {
    let mut o = String::new();
    let host = esc(&s.hostname);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>postern on {host}</title><style>{STYLE}</style></head><body>\n"
    );
    let _ = writeln!(
        o,
        "<header><h1>postern on {host}</h1><p class=\"sub\">version {} &middot; as of {} &middot; this page reloads every {refresh} s</p></header>",
        env!("CARGO_PKG_VERSION"),
        time(s.at)
    );

    // Health of the process.
    let _ = writeln!(o, "<section id=\"health\"><h2>Health</h2><ul>");
    if s.forwarder_running {
        let _ = writeln!(o, "<li class=\"ok\">&#10003; the forwarder is running</li>");
    }
    for p in &s.problems {
        let _ = writeln!(o, "<li class=\"bad\">&#10007; {}</li>", esc(p));
    }
    if let Some(free) = s.spool_free_bytes {
        let _ = writeln!(
            o,
            "<li>spool: {} free</li>",
            esc(&bytesize::ByteSize(free).to_string())
        );
    }
    let _ = writeln!(o, "</ul></section>");

    // Mailboxes.
    let held = s
        .mailboxes
        .iter()
        .filter(|b| b.state == MailboxState::Held)
        .count();
    let _ = writeln!(
        o,
        "<section id=\"mailboxes\"><h2>Mailboxes ({} held)</h2>",
        held
    );
    if s.mailboxes.is_empty() {
        let _ = writeln!(
            o,
            "<p>No mailbox yet: routes that send as each sender's own mailbox show theirs once mail is queued.</p>"
        );
    } else {
        let _ = writeln!(
            o,
            "<table><thead><tr><th>Mailbox</th><th>Route</th><th>State</th><th>Waiting</th><th>Why, and what to do</th></tr></thead><tbody>"
        );
        for b in &s.mailboxes {
            let (class, word) = match b.state {
                MailboxState::Flowing => ("flowing", "flowing"),
                MailboxState::Retrying => ("retrying", "retrying"),
                MailboxState::Paced => ("paced", "paced"),
                MailboxState::Held => ("held", "held"),
            };
            let mut why = String::new();
            if let Some(h) = &b.held {
                let _ = write!(
                    why,
                    "<strong>{}</strong><div class=\"why\">{}</div>",
                    esc(h.title.unwrap_or("held")),
                    esc(crate::status::reason_summary(&h.reason))
                );
                if let Some(fix) = &h.fix {
                    let _ = write!(
                        why,
                        "<p class=\"fix\"><strong>Fix:</strong> {} Then <code>postern queue release {}</code> (or wait: postern retries by itself).</p>",
                        esc(fix),
                        esc(&h.oldest_id)
                    );
                }
                let _ = write!(
                    why,
                    "<div class=\"why\">{} message(s) held; <code>postern explain {}</code> says more.</div>",
                    h.messages,
                    esc(&h.oldest_id)
                );
            } else if let Some(p) = &b.paced {
                let _ = write!(
                    why,
                    "<div class=\"why\">{}</div><div class=\"why\">nothing failed: the mail goes out in order as the limit allows</div>",
                    esc(p)
                );
            } else if let Some(e) = &b.last_error {
                let _ = write!(why, "<div class=\"why\">last error: {}</div>", esc(e));
            }
            let _ = writeln!(
                o,
                "<tr class=\"{class}\" data-mailbox=\"{m}\" data-state=\"{word}\"><td>{m}</td><td>{r}</td><td><span class=\"badge {class}\">{word}</span></td><td>{w}</td><td>{why}</td></tr>",
                m = esc(&b.mailbox),
                r = esc(&b.routes.join(", ")),
                w = b.waiting
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    let _ = writeln!(o, "</section>");

    // Queue.
    let _ = writeln!(o, "<section id=\"queue\"><h2>Queue</h2><table><thead><tr>");
    for (state, _) in &s.queue {
        let _ = write!(o, "<th>{}</th>", esc(state));
    }
    let _ = write!(o, "</tr></thead><tbody><tr>");
    for (state, n) in &s.queue {
        let _ = write!(o, "<td data-state=\"{}\">{n}</td>", esc(state));
    }
    let _ = writeln!(o, "</tr></tbody></table>");
    match (&s.oldest_id, s.oldest_age_secs) {
        (Some(id), Some(a)) => {
            let _ = writeln!(
                o,
                "<p>Oldest message: <code>{}</code>, waiting for {}.</p>",
                esc(id),
                age(a)
            );
        }
        _ => {
            let _ = writeln!(o, "<p>The queue is empty.</p>");
        }
    }
    let _ = writeln!(o, "</section>");

    // Credentials and certificates.
    let _ = writeln!(
        o,
        "<section id=\"credentials\"><h2>Secrets, certificates and sign-ins</h2>"
    );
    if s.credentials.is_empty() && s.tls.is_empty() {
        let _ = writeln!(o, "<p>None configured.</p>");
    } else {
        let _ = writeln!(
            o,
            "<table><thead><tr><th>Account / listener</th><th>What</th><th>Expires</th></tr></thead><tbody>"
        );
        let expiry = |days: Option<i64>, problem: &Option<String>| -> String {
            match (days, problem) {
                (_, Some(p)) => format!("<span class=\"bad\">{}</span>", esc(p)),
                (Some(d), _) if d < 0 => {
                    format!("<span class=\"bad\">expired {} day(s) ago</span>", -d)
                }
                (Some(d), _) if d <= 30 => format!("<span class=\"bad\">in {d} day(s)</span>"),
                (Some(d), _) => format!("in {d} days"),
                (None, None) => "unknown (set secret_expires to be warned)".into(),
            }
        };
        for c in &s.credentials {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}: {}</td><td>{}</td></tr>",
                esc(&c.account),
                esc(c.kind),
                esc(&c.what),
                expiry(c.days_left, &c.problem)
            );
        }
        for t in &s.tls {
            let _ = writeln!(
                o,
                "<tr><td>listener {}</td><td>TLS certificate: {}</td><td>{}</td></tr>",
                esc(&t.listener),
                esc(&t.cert),
                expiry(t.days_left, &t.problem)
            );
        }
        let _ = writeln!(o, "</tbody></table>");
    }
    let _ = writeln!(o, "</section>");
    let _ = writeln!(
        o,
        "<footer><code>postern doctor</code> checks everything postern depends on; <code>postern explain</code> explains any error or queue id. Metrics: <a href=\"/metrics\">/metrics</a>, health: <a href=\"/healthz\">/healthz</a>, JSON: <a href=\"/status.json\">/status.json</a>.</footer>"
    );
    let _ = writeln!(o, "</body></html>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\"\u{7}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot; "
        );
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(age(5), "5 s");
        assert_eq!(age(125), "2 min");
        assert_eq!(age(7_260), "2 h 1 min");
        assert_eq!(age(90_000), "1 d 1 h");
    }
}
