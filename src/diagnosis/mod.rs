//! The one table of errors postern meets (microsoft-reference.md §1.7, §3.4, §3.5, §4.5 and
//! every row of §9), and what each means, why it happens and how to fix it, in the words of
//! the Entra and Exchange admin centres.
//!
//! - `table.rs`: the entries, as data: how to recognise each (SMTP replies by enhanced code
//!   and text, AADSTS codes, Entra `error` values, Graph error codes and messages, phrases
//!   postern itself prints), its meaning, likely causes in order, and the fix (admin-centre
//!   path and PowerShell), some steps only for app-only or delegated accounts.
//! - `parse.rs`: what a pasted text holds: SMTP replies, AADSTS codes, Entra and Graph error
//!   JSON, postern's own log lines (text or JSON).
//! - `render.rs`: an entry as text for `postern explain`, and as one-line advice for log
//!   lines, holds, `doctor` and the status page.
//!
//! Everything that tells the admin what an error means takes its words from here, so
//! `explain`, the daemon's log lines, `doctor` and the status page never disagree.

mod parse;
mod render;
mod table;

pub use parse::{Evidence, SmtpReply, evidence, first_reply};
pub use render::{Vars, advice, explain_text, fix_steps, list, render};
pub use table::TABLE;

/// One known error.
#[derive(Debug)]
pub struct Entry {
    /// Stable name, shown by `explain` and used by code to fetch advice (`smtp.auth.tenant`).
    pub id: &'static str,
    /// Rows of microsoft-reference.md §9 this entry covers (empty: postern's own).
    pub rows: &'static [u8],
    /// One line: what went wrong.
    pub title: &'static str,
    /// How to recognise it.
    pub signs: &'static [Sign],
    /// What it means.
    pub meaning: &'static str,
    /// Likely causes, the most likely first.
    pub causes: &'static [&'static str],
    /// What to do, in order.
    pub fix: &'static [Step],
    /// What postern does when it meets this (hold, retry, fail).
    pub postern: &'static str,
}

/// A way to recognise an entry in what a user pasted or postern met.
#[derive(Debug, Clone, Copy)]
pub enum Sign {
    /// An SMTP reply with this enhanced status code (class, subject, detail); `text`, when
    /// given, must also appear in the reply (case-insensitively).
    Smtp {
        /// `(5, 7, 139)` for `5.7.139`.
        esc: (u8, u16, u16),
        /// A phrase of the reply text.
        text: Option<&'static str>,
    },
    /// An SMTP reply with this basic code and no enhanced code matched (`421` ...); `text`
    /// must appear in it.
    Reply {
        /// The three-digit code.
        code: u16,
        /// A phrase of the reply text.
        text: &'static str,
    },
    /// An Entra `AADSTSnnnn` code.
    Aadsts(u32),
    /// An Entra `error` value without a more specific code (device flow states).
    EntraError(&'static str),
    /// A Microsoft Graph error `code`, optionally with a phrase of its `message`.
    Graph {
        /// `ErrorAccessDenied`.
        code: &'static str,
        /// A phrase of the message.
        message: Option<&'static str>,
    },
    /// A phrase (case-insensitive) of a message postern itself writes, or of a server's text
    /// without a code.
    Phrase(&'static str),
}

/// One step of a fix.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Which accounts it applies to.
    pub when: When,
    /// The step; `{name}` placeholders are filled from [`Vars`].
    pub text: &'static str,
}

/// Which accounts a fix step applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Every account.
    Always,
    /// Accounts that sign in as the app (client secret or certificate).
    AppOnly,
    /// Delegated accounts (a signed-in user per mailbox).
    Delegated,
}

/// An entry that matched, and how specifically.
#[derive(Debug, Clone, Copy)]
pub struct Match {
    /// The entry.
    pub entry: &'static Entry,
    /// Higher is more specific (a code with its text beats the code alone).
    pub score: u32,
}

/// The entry called `id`. Panics only in tests: every id used in code is checked by one.
pub fn entry(id: &str) -> Option<&'static Entry> {
    TABLE.iter().find(|e| e.id == id)
}

/// The entry for an AADSTS code, if the table knows it.
pub fn for_aadsts(code: u32) -> Option<&'static Entry> {
    TABLE.iter().find(|e| {
        e.signs
            .iter()
            .any(|s| matches!(s, Sign::Aadsts(c) if *c == code))
    })
}

/// Every entry the evidence matches, most specific first; per piece of evidence only its
/// best-scoring entries are kept (so `535 5.7.139 ... Tenant` does not also list the
/// generic 5.7.139 entry).
pub fn diagnose(ev: &Evidence) -> Vec<Match> {
    let mut out: Vec<Match> = Vec::new();
    let mut push = |m: Match| {
        if !out.iter().any(|o| std::ptr::eq(o.entry, m.entry)) {
            out.push(m);
        }
    };
    for reply in &ev.replies {
        for m in best(|s| score_reply(s, reply)) {
            push(m);
        }
    }
    for code in &ev.aadsts {
        for m in best(|s| matches!(s, Sign::Aadsts(c) if c == code).then_some(100)) {
            push(m);
        }
    }
    for e in &ev.entra_errors {
        for m in
            best(|s| matches!(s, Sign::EntraError(x) if x.eq_ignore_ascii_case(e)).then_some(50))
        {
            push(m);
        }
    }
    for (code, message) in &ev.graph {
        for m in best(|s| score_graph(s, code, message.as_deref())) {
            push(m);
        }
    }
    let lower = ev.text.to_ascii_lowercase();
    for m in best(|s| match s {
        Sign::Phrase(p) if lower.contains(&p.to_ascii_lowercase()) => Some(10 + p.len() as u32),
        _ => None,
    }) {
        push(m);
    }
    out
}

/// The entries whose best sign scores highest under `score`.
fn best(score: impl Fn(&Sign) -> Option<u32>) -> Vec<Match> {
    let scored: Vec<Match> = TABLE
        .iter()
        .filter_map(|e| {
            e.signs
                .iter()
                .filter_map(&score)
                .max()
                .map(|score| Match { entry: e, score })
        })
        .collect();
    let top = scored.iter().map(|m| m.score).max().unwrap_or(0);
    scored.into_iter().filter(|m| m.score == top).collect()
}

fn score_reply(s: &Sign, r: &parse::SmtpReply) -> Option<u32> {
    let text = r.text.to_ascii_lowercase();
    match *s {
        Sign::Smtp { esc, text: phrase } if Some(esc) == r.esc => match phrase {
            None => Some(100),
            Some(p) if text.contains(&p.to_ascii_lowercase()) => Some(200 + p.len() as u32),
            Some(_) => None,
        },
        Sign::Reply { code, text: p }
            if code == r.code && text.contains(&p.to_ascii_lowercase()) =>
        {
            Some(150 + p.len() as u32)
        }
        _ => None,
    }
}

fn score_graph(s: &Sign, code: &str, message: Option<&str>) -> Option<u32> {
    match *s {
        Sign::Graph {
            code: c,
            message: None,
        } if c.eq_ignore_ascii_case(code) => Some(100),
        Sign::Graph {
            code: c,
            message: Some(p),
        } if c.eq_ignore_ascii_case(code)
            && message
                .is_some_and(|m| m.to_ascii_lowercase().contains(&p.to_ascii_lowercase())) =>
        {
            Some(200)
        }
        _ => None,
    }
}

/// Entries that resemble `text` although nothing matched exactly: shared words and codes,
/// best first, at most `n`.
pub fn closest(text: &str, n: usize) -> Vec<&'static Entry> {
    let words = |s: &str| -> std::collections::HashSet<String> {
        s.split(|c: char| !c.is_ascii_alphanumeric() && c != '.')
            .map(|w| w.trim_matches('.').to_ascii_lowercase())
            .filter(|w| w.len() > 2)
            .collect()
    };
    let query = words(text);
    let mut scored: Vec<(usize, &'static Entry)> = TABLE
        .iter()
        .map(|e| {
            let mut hay = format!("{} {} {}", e.id, e.title, e.meaning);
            for s in e.signs {
                hay.push(' ');
                hay.push_str(&sign_text(s));
            }
            let ws = words(&hay);
            (query.intersection(&ws).count(), e)
        })
        .filter(|(n, _)| *n > 0)
        .collect();
    scored.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    scored.into_iter().take(n).map(|(_, e)| e).collect()
}

/// A sign as the text one would see (for `explain --list` and similarity).
pub fn sign_text(s: &Sign) -> String {
    match s {
        Sign::Smtp { esc, text } => format!(
            "{}.{}.{}{}",
            esc.0,
            esc.1,
            esc.2,
            text.map(|t| format!(" {t}")).unwrap_or_default()
        ),
        Sign::Reply { code, text } => format!("{code} {text}"),
        Sign::Aadsts(c) => format!("AADSTS{c}"),
        Sign::EntraError(e) => (*e).to_string(),
        Sign::Graph { code, message } => format!(
            "Graph {code}{}",
            message.map(|m| format!(" \"{m}\"")).unwrap_or_default()
        ),
        Sign::Phrase(p) => format!("\"{p}\""),
    }
}

#[cfg(test)]
mod tests;
