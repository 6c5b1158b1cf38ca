//! Every reply the SMTP server sends, as named constructors in one table.
//!
//! All 2xx/4xx/5xx replies carry an enhanced status code (RFC 2034, codes from RFC 3463) on
//! every line, multi-line replies included. The exceptions are the ones RFC 2034 itself makes:
//! the initial `220` greeting and the replies to EHLO/HELO (their first line is our host
//! name), plus the intermediate replies `334` (base64 SASL challenge, which must stay bare)
//! and `354`.
//!
//! | constructor | reply |
//! |---|---|
//! | [`Reply::greeting`] | `220 <host> ESMTP postern` |
//! | [`Reply::ehlo`] | `250-<host>` + extensions |
//! | [`Reply::helo`] | `250 <host>` |
//! | [`Reply::ok`] | `250 2.0.0 Ok` |
//! | [`Reply::sender_ok`] | `250 2.1.0 Ok` |
//! | [`Reply::rcpt_ok`] | `250 2.1.5 Ok` |
//! | [`Reply::queued`] | `250 2.0.0 Ok: queued as <id>` |
//! | [`Reply::chunk_ok`] | `250 2.0.0 <n> octets received` |
//! | [`Reply::start_data`] | `354 End data with <CR><LF>.<CR><LF>` |
//! | [`Reply::bye`] | `221 2.0.0 Bye` |
//! | [`Reply::non_smtp`] | `221 2.7.0 Error: I can break rules, too. Goodbye.` |
//! | [`Reply::vrfy`] | `252 2.5.0 Cannot VRFY user, ...` |
//! | [`Reply::expn`] | `502 5.5.1 Error: EXPN not available` |
//! | [`Reply::help`] | `214-2.0.0 ...` (two lines) |
//! | [`Reply::tls_ready`] | `220 2.0.0 Ready to start TLS` |
//! | [`Reply::not_implemented`] | `502 5.5.1 Error: command not implemented` |
//! | [`Reply::tls_already_active`] | `503 5.5.1 Error: TLS already active` |
//! | [`Reply::unknown_command`] | `500 5.5.2 Error: command not recognized` |
//! | [`Reply::line_too_long`] | `500 5.5.2 Error: line too long` |
//! | [`Reply::syntax`] | `501 5.5.4 Syntax: ...` |
//! | [`Reply::invalid_parameter`] | `501 5.5.4 Error: invalid ... parameter` |
//! | [`Reply::unsupported_parameter`] | `555 5.5.4 Unsupported option: ...` |
//! | [`Reply::bad_size`] | `501 5.5.4 Bad SIZE parameter: ...` |
//! | [`Reply::bad_sender_syntax`] | `501 5.1.7 Bad sender address syntax` |
//! | [`Reply::bad_recipient_syntax`] | `501 5.1.3 Bad recipient address syntax` |
//! | [`Reply::bad_sender`] | `501 5.1.7 Bad sender address syntax: <why>` or `553 5.1.7 Sender address rejected: <why>` |
//! | [`Reply::bad_recipient`] | `501 5.1.3 Bad recipient address syntax: <why>` or `553 5.1.3 Recipient address rejected: <why>` |
//! | [`Reply::need_helo`] | `503 5.5.1 Error: send HELO/EHLO first` |
//! | [`Reply::need_ehlo`] | `503 5.5.1 Error: send EHLO first` |
//! | [`Reply::need_mail`] | `503 5.5.1 Error: need MAIL command` |
//! | [`Reply::need_rcpt`] | `503 5.5.1 Error: need RCPT command` |
//! | [`Reply::nested_mail`] | `503 5.5.1 Error: nested MAIL command` |
//! | [`Reply::in_transaction`] | `503 5.5.1 Error: MAIL transaction in progress` |
//! | [`Reply::bdat_in_progress`] | `503 5.5.1 Error: BDAT transfer in progress` |
//! | [`Reply::auth_required`] | `530 5.7.0 Authentication required` |
//! | [`Reply::encryption_required`] | `538 5.7.11 Encryption required for requested authentication mechanism` |
//! | [`Reply::auth_not_enabled`] | `503 5.5.1 Error: authentication not enabled` |
//! | [`Reply::already_authenticated`] | `503 5.5.1 Error: already authenticated` |
//! | [`Reply::auth_mechanism_unknown`] | `504 5.5.4 Unrecognized authentication type` |
//! | [`Reply::auth_challenge`] | `334 <base64>` |
//! | [`Reply::auth_cancelled`] | `501 5.0.0 Authentication cancelled` |
//! | [`Reply::auth_bad_base64`] | `501 5.5.2 Cannot decode response` |
//! | [`Reply::auth_ok`] | `235 2.7.0 Authentication successful` |
//! | [`Reply::auth_failed`] | `535 5.7.8 Authentication credentials invalid` |
//! | [`Reply::auth_locked_out`] | `454 4.7.0 Too many failed authentication attempts; try again later` |
//! | [`Reply::auth_unavailable`] | `454 4.7.0 Temporary authentication failure` |
//! | [`Reply::sender_no_route`] | `550 5.7.1 Sender <x> rejected: this relay does not send mail from that address` |
//! | [`Reply::sender_not_permitted`] | `550 5.7.1 Sender <x> rejected: user "u" may not send as it` (its `may_send_as` in the log only) |
//! | [`Reply::null_sender_no_mailbox`] | `550 5.7.1 Sender <> rejected: this relay has no mailbox to send the null sender as` |
//! | [`Reply::sender_not_a_mailbox`] | `553 5.1.7 Sender <x> rejected: it cannot be a Microsoft 365 mailbox ...` |
//! | [`Reply::size_exceeded`] | `552 5.3.4 Message size exceeds fixed maximum message size` |
//! | [`Reply::insufficient_storage`] | `452 4.3.1 Insufficient system storage` |
//! | [`Reply::non_ascii_address`] | `553 5.6.7 Non-ASCII address requires SMTPUTF8` |
//! | [`Reply::too_many_recipients`] | `452 4.5.3 Too many recipients` (not an error: the client sends the rest in a new transaction) |
//! | [`Reply::bare_lf`] | `550 5.6.0 Message contains bare LF` |
//! | [`Reply::nul_characters`] | `550 5.6.0 Message contains NUL characters` |
//! | [`Reply::queue_write_error`] | `451 4.3.0 Error: queue file write error` |
//! | [`Reply::access_denied`] | `554 5.7.1 Access denied for <ip>` (the listener and `allow_networks` in the log only) |
//! | [`Reply::too_many_connections`] | `421 4.7.0 <host> Too many connections, try again later` |
//! | [`Reply::too_many_connections_from_ip`] | `421 4.7.0 <host> Too many connections from your address, try again later` |
//! | [`Reply::timeout`] | `421 4.4.2 <host> Error: timeout exceeded` |
//! | [`Reply::too_many_errors`] | `421 4.7.0 <host> Error: too many errors` |
//! | [`Reply::shutting_down`] | `421 4.3.2 <host> Service shutting down` |
//!
//! A reply may carry a [`detail`](Reply::detail) for the log only (the configuration file and
//! the rules that refused a sender, the text a client sent): the client never sees it.
//! Every 4xx/5xx counts against `max_errors` except those the client did not cause (our own
//! temporary conditions, 4.3.x) and `452 4.5.3 Too many recipients`, which RFC 5321 §3.3 makes
//! part of a normal dialogue (see [`Reply::counts_as_error`]).

use std::fmt;

use crate::address::AddressError;
use crate::escape;

/// Longest text we put on one reply line (RFC 5321 allows 512 octets including the code).
const MAX_TEXT: usize = 480;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Basic reply code (RFC 5321).
    pub code: u16,
    /// Enhanced status code (RFC 3463), repeated on every line; `None` only where RFC 2034
    /// says so (greeting, EHLO/HELO) and for the intermediate 334/354.
    pub status: Option<&'static str>,
    /// Text of each line (at least one).
    pub lines: Vec<String>,
    /// For the log only, never sent: what the operator needs and the client must not learn.
    pub detail: Option<String>,
    /// Whether this refusal counts against `max_errors` (see [`Reply::counts_as_error`]).
    blame_client: bool,
}

impl Reply {
    fn one(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            status: Some(status),
            lines: vec![clip(text.into())],
            detail: None,
            blame_client: code >= 400 && code != 421,
        }
    }

    fn bare(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            status: None,
            lines: vec![clip(text.into())],
            detail: None,
            blame_client: false,
        }
    }

    /// The same reply with `detail` for the log.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A refusal the client did not cause.
    fn not_the_clients_fault(mut self) -> Self {
        self.blame_client = false;
        self
    }

    /// Is this a 4xx/5xx reply?
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Does this refusal count against the listener's `max_errors`? Every 4xx/5xx except
    /// 421 (the connection ends anyway), our own temporary conditions (full disk, queue write
    /// error, a password check that could not run) and "too many recipients".
    pub fn counts_as_error(&self) -> bool {
        self.blame_client
    }

    /// The reply on the wire, CRLF-terminated.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = match self.status {
                Some(s) => format!("{}{}{} {}\r\n", self.code, sep, s, line),
                None if line.is_empty() => format!("{}{}\r\n", self.code, sep),
                None => format!("{}{}{}\r\n", self.code, sep, line),
            };
            out.extend_from_slice(text.as_bytes());
        }
    }

    /// The reply as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    // ---- connection ----

    /// `220 <host> ESMTP postern`
    pub fn greeting(host: &str) -> Self {
        Self::bare(220, format!("{host} ESMTP postern"))
    }

    /// The EHLO reply: host name, then one extension per line.
    pub fn ehlo(host: &str, extensions: Vec<String>) -> Self {
        let mut lines = vec![host.to_string()];
        lines.extend(extensions);
        Self {
            code: 250,
            status: None,
            lines,
            detail: None,
            blame_client: false,
        }
    }

    /// The HELO reply.
    pub fn helo(host: &str) -> Self {
        Self::bare(250, host.to_string())
    }

    /// `250 2.0.0 Ok` (NOOP, RSET).
    pub fn ok() -> Self {
        Self::one(250, "2.0.0", "Ok")
    }

    /// `250 2.1.0 Ok` (MAIL accepted).
    pub fn sender_ok() -> Self {
        Self::one(250, "2.1.0", "Ok")
    }

    /// `250 2.1.5 Ok` (RCPT accepted).
    pub fn rcpt_ok() -> Self {
        Self::one(250, "2.1.5", "Ok")
    }

    /// `250 2.0.0 Ok: queued as <id>`: only after the spool committed the message.
    pub fn queued(id: &str) -> Self {
        Self::one(250, "2.0.0", format!("Ok: queued as {id}"))
    }

    /// A non-final BDAT chunk was received.
    pub fn chunk_ok(n: u64) -> Self {
        Self::one(250, "2.0.0", format!("{n} octets received"))
    }

    /// `354 End data with <CR><LF>.<CR><LF>`
    pub fn start_data() -> Self {
        Self::bare(354, "End data with <CR><LF>.<CR><LF>")
    }

    /// `221 2.0.0 Bye`
    pub fn bye() -> Self {
        Self::one(221, "2.0.0", "Bye")
    }

    /// An HTTP request or header line instead of SMTP (a browser, or a cross-protocol attack):
    /// Postfix's answer, then we close.
    pub fn non_smtp() -> Self {
        Self::one(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
    }

    /// VRFY is answered, never answered truthfully.
    pub fn vrfy() -> Self {
        Self::one(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    /// EXPN is not offered.
    pub fn expn() -> Self {
        Self::one(502, "5.5.1", "Error: EXPN not available")
    }

    /// HELP (two lines, both with the enhanced code).
    pub fn help() -> Self {
        Self {
            code: 214,
            status: Some("2.0.0"),
            lines: vec![
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
                    .into(),
                "postern, see RFC 5321".into(),
            ],
            detail: None,
            blame_client: false,
        }
    }

    /// STARTTLS accepted.
    pub fn tls_ready() -> Self {
        Self::one(220, "2.0.0", "Ready to start TLS")
    }

    /// A known command we do not offer here (STARTTLS on a plain listener).
    pub fn not_implemented() -> Self {
        Self::one(502, "5.5.1", "Error: command not implemented")
    }

    /// STARTTLS inside TLS.
    pub fn tls_already_active() -> Self {
        Self::one(503, "5.5.1", "Error: TLS already active")
    }

    // ---- syntax ----

    /// `500 5.5.2 Error: command not recognized`
    pub fn unknown_command() -> Self {
        Self::one(500, "5.5.2", "Error: command not recognized")
    }

    /// A command line longer than the limit.
    pub fn line_too_long() -> Self {
        Self::one(500, "5.5.2", "Error: line too long")
    }

    /// `501 5.5.4 Syntax: <usage>`
    pub fn syntax(usage: &str) -> Self {
        Self::one(501, "5.5.4", format!("Syntax: {usage}"))
    }

    /// A parameter we know with a value we cannot use.
    pub fn invalid_parameter(param: &str) -> Self {
        Self::one(501, "5.5.4", format!("Error: invalid {param} parameter"))
    }

    /// A MAIL/RCPT parameter we do not support (RFC 5321 §4.1.1.11: 555).
    pub fn unsupported_parameter(param: &str) -> Self {
        Self::one(
            555,
            "5.5.4",
            format!("Unsupported option: {}", printable(param)),
        )
    }

    /// `SIZE=` that is not 1 to 20 digits (RFC 1870).
    pub fn bad_size() -> Self {
        Self::one(
            501,
            "5.5.4",
            "Bad SIZE parameter: the size must be 1 to 20 digits",
        )
    }

    /// A reverse-path we cannot parse (not UTF-8).
    pub fn bad_sender_syntax() -> Self {
        Self::one(501, "5.1.7", "Bad sender address syntax")
    }

    /// A forward-path we cannot parse (not UTF-8).
    pub fn bad_recipient_syntax() -> Self {
        Self::one(501, "5.1.3", "Bad recipient address syntax")
    }

    /// A reverse-path refused by the address parser; `sent` (what the client wrote) goes to
    /// the log.
    pub fn bad_sender(e: &AddressError, sent: &str) -> Self {
        Self::bad_address(e, sent, "5.1.7", ["Sender", "sender"])
    }

    /// A forward-path refused by the address parser; `sent` goes to the log.
    pub fn bad_recipient(e: &AddressError, sent: &str) -> Self {
        Self::bad_address(e, sent, "5.1.3", ["Recipient", "recipient"])
    }

    fn bad_address(
        e: &AddressError,
        sent: &str,
        status: &'static str,
        [what, w]: [&str; 2],
    ) -> Self {
        let why = printable(&e.to_string());
        // RFC 5321: 553 is "mailbox name not allowed", 501 a syntax error.
        let reply = if e.is_unsafe() {
            Self::one(553, status, format!("{what} address rejected: {why}"))
        } else {
            Self::one(501, status, format!("Bad {w} address syntax: {why}"))
        };
        reply.with_detail(format!("{w} as sent: {sent}"))
    }

    // ---- sequence ----

    /// MAIL (or AUTH, DATA...) before EHLO/HELO.
    pub fn need_helo() -> Self {
        Self::one(503, "5.5.1", "Error: send HELO/EHLO first")
    }

    /// AUTH after HELO: it is an ESMTP extension.
    pub fn need_ehlo() -> Self {
        Self::one(503, "5.5.1", "Error: send EHLO first")
    }

    /// RCPT/DATA without MAIL.
    pub fn need_mail() -> Self {
        Self::one(503, "5.5.1", "Error: need MAIL command")
    }

    /// DATA/BDAT without RCPT.
    pub fn need_rcpt() -> Self {
        Self::one(503, "5.5.1", "Error: need RCPT command")
    }

    /// MAIL inside a transaction.
    pub fn nested_mail() -> Self {
        Self::one(503, "5.5.1", "Error: nested MAIL command")
    }

    /// AUTH or STARTTLS inside a transaction.
    pub fn in_transaction() -> Self {
        Self::one(503, "5.5.1", "Error: MAIL transaction in progress")
    }

    /// DATA, MAIL or RCPT between BDAT chunks.
    pub fn bdat_in_progress() -> Self {
        Self::one(503, "5.5.1", "Error: BDAT transfer in progress")
    }

    // ---- authentication ----

    /// `530 5.7.0 Authentication required`
    pub fn auth_required() -> Self {
        Self::one(530, "5.7.0", "Authentication required")
    }

    /// AUTH over plain text from a non-loopback client (RFC 4954 §6).
    pub fn encryption_required() -> Self {
        Self::one(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }

    /// AUTH on a listener with `auth = "none"`.
    pub fn auth_not_enabled() -> Self {
        Self::one(503, "5.5.1", "Error: authentication not enabled")
    }

    /// A second AUTH.
    pub fn already_authenticated() -> Self {
        Self::one(503, "5.5.1", "Error: already authenticated")
    }

    /// A SASL mechanism other than PLAIN/LOGIN.
    pub fn auth_mechanism_unknown() -> Self {
        Self::one(504, "5.5.4", "Unrecognized authentication type")
    }

    /// `334 <base64>` (empty for PLAIN without an initial response).
    pub fn auth_challenge(b64: &str) -> Self {
        Self::bare(334, b64.to_string())
    }

    /// The client answered a challenge with `*`.
    pub fn auth_cancelled() -> Self {
        Self::one(501, "5.0.0", "Authentication cancelled")
    }

    /// A SASL response that is not base64.
    pub fn auth_bad_base64() -> Self {
        Self::one(501, "5.5.2", "Cannot decode response")
    }

    /// `235 2.7.0 Authentication successful`
    pub fn auth_ok() -> Self {
        Self::one(235, "2.7.0", "Authentication successful")
    }

    /// `535 5.7.8 Authentication credentials invalid`
    pub fn auth_failed() -> Self {
        Self::one(535, "5.7.8", "Authentication credentials invalid")
    }

    /// The client address is locked out by the brute-force guard.
    pub fn auth_locked_out() -> Self {
        Self::one(
            454,
            "4.7.0",
            "Too many failed authentication attempts; try again later",
        )
    }

    /// The password check itself failed (not the password).
    pub fn auth_unavailable() -> Self {
        Self::one(454, "4.7.0", "Temporary authentication failure").not_the_clients_fault()
    }

    // ---- policy ----

    /// No route accepts the sender. The client learns only that; `rules` (the configuration
    /// file and the routes' patterns tried) go to the log.
    pub fn sender_no_route(sender: &str, rules: String) -> Self {
        Self::one(
            550,
            "5.7.1",
            format!(
                "Sender <{}> rejected: this relay does not send mail from that address",
                printable(sender)
            ),
        )
        .with_detail(rules)
    }

    /// The route delivers to Microsoft 365, which never sends as an address in a local-only
    /// domain (`scanner@localhost`); `why` (the route, and `rewrite_from`) goes to the log.
    pub fn sender_cannot_be_sent_as(sender: &str, why: String) -> Self {
        Self::one(
            550,
            "5.7.1",
            format!(
                "Sender <{}> rejected: Microsoft 365 cannot send mail as this address",
                printable(sender)
            ),
        )
        .with_detail(why)
    }

    /// The message's `From:` is an address Microsoft 365 never sends as (end of DATA).
    pub fn from_cannot_be_sent_as(from: &str, why: String) -> Self {
        Self::one(
            550,
            "5.7.1",
            format!(
                "Message rejected: its From: <{}> is not an address Microsoft 365 can send as",
                printable(from)
            ),
        )
        .with_detail(why)
    }

    /// The authenticated user may not use this sender.
    pub fn sender_not_permitted(sender: &str, user: &str, may_send_as: &str) -> Self {
        // The patterns go to the log only: they name other mailboxes and the configuration.
        Self::one(
            550,
            "5.7.1",
            format!(
                "Sender <{}> rejected: user \"{}\" may not send as it",
                printable(sender),
                printable(user),
            ),
        )
        .with_detail(format!(
            "may_send_as of user \"{}\": {may_send_as}",
            printable(user)
        ))
    }

    /// The null sender matched a route that sends as the envelope sender; `why` (the route
    /// and the file) goes to the log.
    pub fn null_sender_no_mailbox(why: String) -> Self {
        Self::one(
            550,
            "5.7.1",
            "Sender <> rejected: this relay has no mailbox to send the null sender as",
        )
        .with_detail(why)
    }

    /// The route sends as the envelope sender, and this one needs quoting: no one signs in
    /// to Microsoft 365 as that, so it would only be held upstream.
    pub fn sender_not_a_mailbox(sender: &str) -> Self {
        Self::one(
            553,
            "5.1.7",
            format!(
                "Sender <{}> rejected: it cannot be a Microsoft 365 mailbox (its local part needs quoting)",
                printable(sender)
            ),
        )
    }

    /// `552 5.3.4 Message size exceeds fixed maximum message size`
    pub fn size_exceeded() -> Self {
        Self::one(
            552,
            "5.3.4",
            "Message size exceeds fixed maximum message size",
        )
    }

    /// `452 4.3.1 Insufficient system storage`
    pub fn insufficient_storage() -> Self {
        Self::one(452, "4.3.1", "Insufficient system storage").not_the_clients_fault()
    }

    /// A non-ASCII address without `SMTPUTF8` on MAIL (RFC 6531 §3.5).
    pub fn non_ascii_address() -> Self {
        Self::one(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    }

    /// `452 4.5.3 Too many recipients`: the client sends the rest in another transaction
    /// (RFC 5321 §3.3), so it is not an error — unless `overshoot` (the client went on
    /// sending far past the limit in one transaction, like Postfix's
    /// `smtpd_recipient_overshoot_limit`).
    pub fn too_many_recipients(overshoot: bool) -> Self {
        let r = Self::one(452, "4.5.3", "Too many recipients");
        if overshoot {
            r
        } else {
            r.not_the_clients_fault()
        }
    }

    /// `550 5.6.0 Message contains bare LF` (`bare_lf = "reject"`).
    pub fn bare_lf() -> Self {
        Self::one(550, "5.6.0", "Message contains bare LF")
    }

    /// `550 5.6.0 Message contains NUL characters`
    pub fn nul_characters() -> Self {
        Self::one(550, "5.6.0", "Message contains NUL characters")
    }

    /// `451 4.3.0 Error: queue file write error`: the message was not accepted.
    pub fn queue_write_error() -> Self {
        Self::one(451, "4.3.0", "Error: queue file write error").not_the_clients_fault()
    }

    /// The client is not in the listener's `allow_networks`. The client learns only that its
    /// address is refused; which listener and which setting said so go to the log (`detail`),
    /// like every other refusal's rule.
    pub fn access_denied(ip: &str, listener: &str) -> Self {
        Self::one(554, "5.7.1", format!("Access denied for {ip}")).with_detail(format!(
            "{ip} is not in allow_networks of listener \"{}\"",
            printable(listener)
        ))
    }

    // ---- closing (421) ----

    /// Over `limits.max_connections`.
    pub fn too_many_connections(host: &str) -> Self {
        Self::one(
            421,
            "4.7.0",
            format!("{host} Too many connections, try again later"),
        )
    }

    /// Over `limits.max_connections_per_ip`.
    pub fn too_many_connections_from_ip(host: &str) -> Self {
        Self::one(
            421,
            "4.7.0",
            format!("{host} Too many connections from your address, try again later"),
        )
    }

    /// A command, DATA or the whole session took too long.
    pub fn timeout(host: &str) -> Self {
        Self::one(421, "4.4.2", format!("{host} Error: timeout exceeded"))
    }

    /// `max_errors` reached.
    pub fn too_many_errors(host: &str) -> Self {
        Self::one(421, "4.7.0", format!("{host} Error: too many errors"))
    }

    /// The daemon is stopping.
    pub fn shutting_down(host: &str) -> Self {
        Self::one(421, "4.3.2", format!("{host} Service shutting down"))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        let s = String::from_utf8_lossy(&bytes);
        f.write_str(s.trim_end().replace("\r\n", " / ").as_str())
    }
}

/// Client-supplied text made safe for a reply line or a header: controls and bidi controls
/// escaped ([`escape::untrusted`]).
pub fn printable(s: &str) -> String {
    escape::untrusted(s).into_owned()
}

fn clip(mut s: String) -> String {
    // Never let a reply line carry CR/LF or grow past the RFC limit.
    if s.contains(['\r', '\n']) {
        s = s.replace(['\r', '\n'], " ");
    }
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Reply> {
        let h = "mx.example";
        vec![
            Reply::ok(),
            Reply::sender_ok(),
            Reply::rcpt_ok(),
            Reply::queued("ABC"),
            Reply::chunk_ok(10),
            Reply::bye(),
            Reply::non_smtp(),
            Reply::vrfy(),
            Reply::expn(),
            Reply::help(),
            Reply::tls_ready(),
            Reply::not_implemented(),
            Reply::tls_already_active(),
            Reply::unknown_command(),
            Reply::line_too_long(),
            Reply::syntax("MAIL FROM:<x>"),
            Reply::invalid_parameter("SIZE"),
            Reply::unsupported_parameter("FOO"),
            Reply::bad_sender_syntax(),
            Reply::bad_recipient_syntax(),
            Reply::need_helo(),
            Reply::need_ehlo(),
            Reply::need_mail(),
            Reply::need_rcpt(),
            Reply::nested_mail(),
            Reply::in_transaction(),
            Reply::bdat_in_progress(),
            Reply::auth_required(),
            Reply::encryption_required(),
            Reply::auth_not_enabled(),
            Reply::already_authenticated(),
            Reply::auth_mechanism_unknown(),
            Reply::auth_cancelled(),
            Reply::auth_bad_base64(),
            Reply::auth_ok(),
            Reply::auth_failed(),
            Reply::auth_locked_out(),
            Reply::auth_unavailable(),
            Reply::sender_no_route("a@b", "rules".into()),
            Reply::sender_not_permitted("a@b", "scanner", "c@d"),
            Reply::null_sender_no_mailbox("why".into()),
            Reply::sender_not_a_mailbox("\"a b\"@c"),
            Reply::bad_size(),
            Reply::bad_sender(&AddressError::EmptyDomain, "<a@>"),
            Reply::bad_recipient(&AddressError::Control('\u{1b}'), "<\"\u{1b}\"@b>"),
            Reply::size_exceeded(),
            Reply::insufficient_storage(),
            Reply::non_ascii_address(),
            Reply::too_many_recipients(false),
            Reply::bare_lf(),
            Reply::nul_characters(),
            Reply::queue_write_error(),
            Reply::access_denied("192.0.2.1", "local"),
            Reply::too_many_connections(h),
            Reply::too_many_connections_from_ip(h),
            Reply::timeout(h),
            Reply::too_many_errors(h),
            Reply::shutting_down(h),
        ]
    }

    #[test]
    fn every_final_reply_has_a_matching_enhanced_code_on_every_line() {
        for r in all() {
            let status = r.status.unwrap_or_else(|| panic!("{r}: no enhanced code"));
            assert_eq!(
                status.as_bytes()[0],
                b'0' + (r.code / 100) as u8,
                "{r}: class mismatch"
            );
            let wire = String::from_utf8(r.to_bytes()).unwrap();
            for line in wire.split_terminator("\r\n") {
                assert_eq!(&line[4..4 + status.len()], status, "{line}");
                assert!(line.len() <= 512, "{line}");
            }
        }
    }

    #[test]
    fn multi_line_replies_use_dashes_until_the_last_line() {
        let wire = String::from_utf8(Reply::help().to_bytes()).unwrap();
        assert!(wire.starts_with("214-2.0.0 Commands"));
        assert!(wire.contains("\r\n214 2.0.0 postern"));
        let ehlo = Reply::ehlo("h", vec!["PIPELINING".into(), "SIZE 10".into()]);
        assert_eq!(
            String::from_utf8(ehlo.to_bytes()).unwrap(),
            "250-h\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        assert_eq!(Reply::auth_challenge("").to_bytes(), b"334 \r\n");
    }

    #[test]
    fn exact_texts() {
        assert_eq!(
            Reply::greeting("mx").to_bytes(),
            b"220 mx ESMTP postern\r\n"
        );
        assert_eq!(
            Reply::queued("0123").to_bytes(),
            b"250 2.0.0 Ok: queued as 0123\r\n"
        );
        assert_eq!(
            Reply::shutting_down("mx").to_bytes(),
            b"421 4.3.2 mx Service shutting down\r\n"
        );
    }

    #[test]
    fn only_refusals_the_client_caused_count_as_errors() {
        let not_counted = [
            Reply::too_many_recipients(false),
            Reply::insufficient_storage(),
            Reply::queue_write_error(),
            Reply::auth_unavailable(),
            Reply::too_many_errors("h"),
            Reply::shutting_down("h"),
            Reply::ok(),
            Reply::start_data(),
        ];
        for r in not_counted {
            assert!(!r.counts_as_error(), "{r}");
        }
        let counted = [
            Reply::too_many_recipients(true),
            Reply::unknown_command(),
            Reply::need_mail(),
            Reply::auth_failed(),
            Reply::auth_locked_out(),
            Reply::bad_size(),
            Reply::sender_no_route("a@b", String::new()),
            Reply::size_exceeded(),
        ];
        for r in counted {
            assert!(r.counts_as_error(), "{r}");
        }
    }

    #[test]
    fn details_stay_out_of_the_reply() {
        let r = Reply::sender_no_route("a@b", "no route in /etc/postern/postern.toml".into());
        assert!(
            !String::from_utf8(r.to_bytes())
                .unwrap()
                .contains("postern.toml")
        );
        assert!(!r.to_string().contains("postern.toml"));
        assert_eq!(
            r.detail.as_deref(),
            Some("no route in /etc/postern/postern.toml")
        );
    }

    #[test]
    fn client_text_cannot_inject_lines() {
        let r = Reply::sender_no_route("a\r\n250 ok@b", "d".into());
        let wire = r.to_bytes();
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        let long = Reply::unsupported_parameter(&"X".repeat(2000));
        assert!(long.to_bytes().len() <= 512);
    }
}
