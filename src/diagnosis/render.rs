//! Entries as text: in full for `postern explain`, as one line for log lines and holds.

use std::fmt::Write;

use super::{Entry, When, closest, diagnose, entry, evidence};

/// Values for the `{name}` placeholders of the table's texts, and which kind of account the
/// advice is for (`None`: show the steps for every kind, labelled).
#[derive(Debug, Clone, Default)]
pub struct Vars {
    values: Vec<(&'static str, String)>,
    grant: Option<When>,
}

/// What a placeholder says when its value is not known.
const GENERIC: &[(&str, &str)] = &[
    ("mailbox", "<mailbox>"),
    ("from", "<From address>"),
    ("account", "<account>"),
    ("client_id", "<Application (client) ID>"),
    ("tenant", "<tenant>"),
    ("server", "the server"),
    ("queue_id", "<queue id>"),
    (
        "app",
        "Microsoft Entra admin center > App registrations > your app",
    ),
    (
        "secret_place",
        "the account's client secret (client_secret_file)",
    ),
    ("login_cmd", "`postern login <account> --mailbox <mailbox>`"),
    (
        "permission",
        "the permission the route needs (SMTP, app-only: Office 365 Exchange Online > Application permissions > SMTP.SendAsApp; SMTP, delegated: SMTP.Send; Graph: Microsoft Graph > Mail.Send)",
    ),
    ("scope", "the scope of the API"),
    ("cert", "the account's certificate"),
    ("cloud", "the account's"),
];

impl Vars {
    /// No values known.
    pub fn new() -> Self {
        Self::default()
    }

    /// `{key}` is `value` (empty values are ignored).
    pub fn set(mut self, key: &'static str, value: impl Into<String>) -> Self {
        let value = value.into();
        if !value.is_empty() {
            self.values.retain(|(k, _)| *k != key);
            self.values.push((key, value));
        }
        self
    }

    /// Only the fix steps for an app-only (`true`) or delegated (`false`) account.
    pub fn app_only(mut self, app_only: bool) -> Self {
        self.grant = Some(if app_only {
            When::AppOnly
        } else {
            When::Delegated
        });
        self
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `text` with its placeholders filled (known names only; `@{Add=...}` stays as is).
    pub fn fill(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 32);
        let mut rest = text;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let name_len = after
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
            let name = &after[..name_len];
            let known = GENERIC.iter().find(|(k, _)| *k == name);
            match (known, after.as_bytes().get(name_len)) {
                (Some((_, generic)), Some(b'}')) => {
                    out.push_str(self.get(name).unwrap_or(generic));
                    rest = &after[name_len + 1..];
                }
                _ => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    fn applies(&self, when: When) -> bool {
        match self.grant {
            None => true,
            Some(g) => when == When::Always || when == g,
        }
    }
}

/// One paragraph of advice for entry `id`: what it means, then the fix steps that apply to
/// this account, for log lines, holds, `doctor` and the status page.
pub fn advice(id: &str, vars: &Vars) -> String {
    let Some(e) = entry(id) else {
        return String::new();
    };
    let mut out = vars.fill(e.meaning);
    for step in e.fix.iter().filter(|s| vars.applies(s.when)) {
        let t = vars.fill(step.text);
        out.push(' ');
        out.push_str(&t);
        if !t.ends_with('.') {
            out.push('.');
        }
    }
    out
}

/// The fix steps of `e` that apply, filled in, joined with "; " (no meaning): the advice of
/// a token error, whose meaning is shown apart.
pub fn fix_steps(e: &Entry, vars: &Vars) -> String {
    e.fix
        .iter()
        .filter(|s| vars.applies(s.when))
        .map(|s| vars.fill(s.text))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The whole entry, for `postern explain`.
pub fn render(e: &Entry, vars: &Vars) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}  [{}]", e.title, e.id);
    let _ = writeln!(o);
    let _ = writeln!(o, "What it means:");
    let _ = writeln!(o, "  {}", vars.fill(e.meaning));
    let _ = writeln!(o, "Likely causes, most likely first:");
    for (i, c) in e.causes.iter().enumerate() {
        let _ = writeln!(o, "  {}. {}", i + 1, vars.fill(c));
    }
    let _ = writeln!(o, "Fix:");
    let steps: Vec<_> = e.fix.iter().filter(|s| vars.applies(s.when)).collect();
    for (i, s) in steps.iter().enumerate() {
        let label = match (vars.grant, s.when) {
            (None, When::AppOnly) => "(accounts that sign in as the app) ",
            (None, When::Delegated) => "(delegated accounts) ",
            _ => "",
        };
        let _ = writeln!(o, "  {}. {label}{}", i + 1, vars.fill(s.text));
    }
    let _ = writeln!(o, "What postern does:");
    let _ = writeln!(o, "  {}", e.postern);
    o
}

/// Explain `input`: every entry it matches, rendered with what the input itself tells
/// (mailbox, sender, queue id); or, when nothing matches, say so and list the closest
/// entries. Returns the text and whether anything matched.
pub fn explain_text(input: &str, vars: &Vars) -> (String, bool) {
    if let Some(e) = entry(input.trim()) {
        return (render(e, vars), true);
    }
    let ev = evidence(input);
    let mut vars = vars.clone();
    for (k, v) in &ev.context {
        if vars.get(k).is_none() {
            vars = vars.set(k, v.clone());
        }
    }
    let matches = diagnose(&ev);
    let mut o = String::new();
    if matches.is_empty() {
        let shown: String = input.trim().chars().take(300).collect();
        let _ = writeln!(o, "postern does not know this error: {shown:?}");
        let near = closest(input, 3);
        if near.is_empty() {
            let _ = writeln!(
                o,
                "Nothing similar is known either. Paste the whole reply or log line (with its code), or see `postern explain --list`."
            );
        } else {
            let _ = writeln!(o, "The closest known errors:");
            for e in near {
                let _ = writeln!(o, "  {:<30} {}", e.id, e.title);
            }
            let _ = writeln!(
                o,
                "`postern explain ID` shows one of them; `postern explain --list` lists every known error."
            );
        }
        return (o, false);
    }
    for (i, m) in matches.iter().enumerate() {
        if i > 0 {
            let _ = writeln!(o, "\n----\n");
        }
        o.push_str(&render(m.entry, &vars));
    }
    (o, true)
}

/// Every entry, one line each, for `postern explain --list`.
pub fn list() -> String {
    let mut o = String::new();
    for e in super::TABLE {
        let signs: Vec<String> = e.signs.iter().map(super::sign_text).collect();
        let _ = writeln!(o, "{:<34} {}", e.id, e.title);
        let _ = writeln!(o, "{:<34} matches: {}", "", signs.join(" | "));
    }
    o
}
