//! The `file` transport: writes each message as `<id>.eml` plus `<id>.json` (its envelope)
//! into a directory. For trying postern out, and for tests. Writes are atomic and durable
//! and a redelivery of the same id overwrites the same files, so the directory never holds a
//! partial or duplicate message.

use std::path::PathBuf;

use serde::Serialize;

use super::{BoxFuture, Outcome, Outgoing, RcptResult, Transport};
use crate::address;
use crate::escape;
use crate::spool::{RcptStatus, durable};

/// Delivers into a directory.
#[derive(Debug, Clone)]
pub struct FileTransport {
    dir: PathBuf,
}

/// What `<id>.json` holds; addresses in RFC 5321 form, as an upstream would get them.
#[derive(Serialize)]
struct Delivered<'a> {
    id: &'a str,
    sender: String,
    mailbox: String,
    recipients: Vec<String>,
    received_at: u64,
    client_addr: &'a str,
    auth_user: Option<&'a str>,
}

impl FileTransport {
    /// A transport writing into `dir` (created when needed).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The envelope's addresses as the address type writes them, or why one cannot be.
    fn addresses(msg: &Outgoing) -> Result<(String, String, Vec<String>), String> {
        let env = &msg.envelope;
        let wire = |a: &str| {
            address::wire_form(a).map_err(|e| {
                format!(
                    "the address <{}> cannot be sent on: {e}",
                    escape::untrusted(a)
                )
            })
        };
        let recipients = env
            .pending()
            .map(|r| wire(&r.address))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((wire(msg.sender())?, wire(&env.mailbox)?, recipients))
    }

    fn deliver(&self, msg: &Outgoing) -> std::io::Result<Vec<RcptResult>> {
        let env = &msg.envelope;
        let (sender, mailbox, recipients) = Self::addresses(msg).map_err(std::io::Error::other)?;
        durable::create_dir_durable(&self.dir)?;
        let pending: Vec<&str> = env.pending().map(|r| r.address.as_str()).collect();
        let meta = Delivered {
            id: &env.id,
            sender,
            mailbox,
            recipients,
            received_at: env.received_at,
            client_addr: &env.client_addr,
            auth_user: env.auth_user.as_deref(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
        // Body first, then the envelope: a reader that sees <id>.json can rely on <id>.eml.
        // Both renames are made durable by one fsync of the directory.
        durable::copy_synced(
            msg.open_message()?,
            &self.dir.join(format!("{}.eml", env.id)),
        )?;
        durable::write_synced(&self.dir.join(format!("{}.json", env.id)), &json)?;
        durable::fsync_dir(&self.dir)?;
        Ok(pending
            .into_iter()
            .map(|a| RcptResult {
                address: a.to_string(),
                status: RcptStatus::Sent,
                reply: "250 2.0.0 written".into(),
            })
            .collect())
    }
}

impl Transport for FileTransport {
    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    fn send<'a>(&'a self, msg: &'a Outgoing) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            if let Err(reason) = Self::addresses(msg) {
                return Outcome::Permanent { reason };
            }
            let this = self.clone();
            let m = msg.clone();
            match tokio::task::spawn_blocking(move || this.deliver(&m)).await {
                Ok(Ok(recipients)) => Outcome::Sent {
                    relay: self.describe(),
                    reply: "250 2.0.0 written".into(),
                    recipients,
                },
                // A full disk or a permission problem is the admin's to fix; retry meanwhile.
                Ok(Err(e)) => Outcome::Transient {
                    reason: format!("cannot write into {}: {e}", self.dir.display()),
                },
                Err(e) => Outcome::Transient {
                    reason: format!("delivery task failed: {e}"),
                },
            }
        })
    }
}
