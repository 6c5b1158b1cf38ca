//! `envelope.json`: everything about a queued message except its bytes. Versioned so that a
//! newer postern can read an older spool; an unknown version is quarantined, never guessed at.

use serde::{Deserialize, Serialize};

/// Current envelope format version.
pub const ENVELOPE_VERSION: u32 = 1;

/// Delivery status of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not yet accepted upstream.
    Pending,
    /// Accepted upstream; never sent again.
    Sent,
    /// Permanently refused upstream.
    Failed,
}

/// One envelope recipient with its delivery status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Forward-path without angle brackets.
    pub address: String,
    /// Where delivery to this recipient stands.
    pub status: RcptStatus,
    /// The last upstream reply for this recipient, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

/// The message envelope and its delivery bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version ([`ENVELOPE_VERSION`]).
    pub version: u32,
    /// Queue id (same as the directory name).
    pub id: String,
    /// When the message was accepted, seconds since the Unix epoch.
    pub received_at: u64,
    /// Reverse-path without angle brackets (empty for the null sender).
    pub sender: String,
    /// Recipients in RCPT order.
    pub recipients: Vec<Recipient>,
    /// Client IP address and port.
    pub client_addr: String,
    /// Name the client gave in EHLO/HELO.
    pub client_helo: String,
    /// Local user who authenticated, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// Listener that accepted the message.
    pub listener: String,
    /// Route chosen at MAIL time.
    pub route: String,
    /// Mailbox the message is sent as upstream.
    pub mailbox: String,
    /// Size of `message.eml` in bytes.
    pub size: u64,
    /// Client declared BODY=8BITMIME.
    #[serde(default)]
    pub body_8bit: bool,
    /// Client declared SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Earliest time of the next attempt, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
    /// The last error, for `queue list` and the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the message is held (admin, or broken credentials), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<String>,
    /// Held by postern itself because its mailbox's configuration is broken (not by the
    /// admin): released automatically once a retry of the mailbox succeeds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_hold: bool,
    /// Microsoft Graph: the draft made for this message and how far sending it got, so that a
    /// retry after a lost answer or a restart neither sends the message twice nor leaves the
    /// draft behind. Written by the Graph transport during an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<GraphProgress>,
}

/// How far the Graph transport got with a message (see [`Envelope::graph`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphProgress {
    /// The mailbox's path in Graph the draft lives under (`users/shared@contoso.com`, `me`).
    pub path: String,
    /// The draft's immutable id (`Prefer: IdType="ImmutableId"`: it stays the same when
    /// Exchange moves the sent message to Sent Items), once Graph created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_id: Option<String>,
    /// `send` was requested for the draft; its answer may have been lost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_requested: bool,
    /// A `sendMail` request went out and no answer came back: Graph cannot be asked whether
    /// it sent the message, so the next attempt is logged as a possible duplicate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unanswered: bool,
}

impl Envelope {
    /// Recipients still waiting for delivery.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
    }
}
