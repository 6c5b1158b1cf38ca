//! `{state_dir}/delivery.json`: what the forwarder must remember across a restart and what
//! `postern queue list` shows about mail that waits without having failed.
//!
//! - Per mailbox, the recipients it delivered in the last 24 hours (`daily_recipients` is a
//!   rolling window; the spool cannot tell, because delivered mail leaves it at once), the
//!   end of an upstream throttle (`SubmissionQuotaExceeded`, `Retry-After`), and the senders
//!   whose Send As was refused (their held mail stays held after a restart while the
//!   mailbox's other mail flows).
//! - Per mailbox whose queued mail is waiting, why and until when (`paced: 30/min for
//!   scanner@contoso.com`), for `queue list`.
//!
//! It is rewritten (atomically, mode 0600, at most about once a second) when something
//! changed. It is not fsynced: after a power cut it may miss the last seconds, which costs at
//! most a few recipients of the count (Exchange's own `554 5.2.0` is handled too) or one
//! extra Send As probe. A missing or unreadable file means an empty record.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file name under `state_dir`.
pub const FILE: &str = "delivery.json";
/// Every name it uses under `state_dir` (the file, and the temp file it is written through),
/// for the permission checks.
pub const FILES: &[&str] = &[FILE, TMP];
const TMP: &str = ".delivery.json.tmp";
const VERSION: u32 = 1;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// Format version.
    #[serde(default)]
    pub version: u32,
    /// Per mailbox (lowercase).
    #[serde(default)]
    pub mailboxes: BTreeMap<String, SavedMailbox>,
}

/// One mailbox's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMailbox {
    /// (ms since the epoch, recipients delivered), oldest first, within the last 24 hours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<(u64, u32)>,
    /// The upstream asked the whole mailbox to wait until then (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Note>,
    /// Addresses the mailbox may not send as (Send As refused): their mail stays held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_senders: Vec<String>,
    /// Queued mail waits: why and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Note>,
}

impl SavedMailbox {
    /// Nothing worth writing.
    pub fn is_empty(&self) -> bool {
        self == &SavedMailbox::default()
    }
}

/// Why, and until when (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// Until when.
    pub until: u64,
    /// Why, in a few words.
    pub why: String,
}

/// The file's path for a state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Read the record; an absent or unreadable file is an empty one (said in the log by the
/// caller when `Err`).
pub fn load(state_dir: &Path) -> Result<Saved, String> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not readable ({e}); starting with an empty record",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Replace the record: write a temp file (0600) beside it and rename it over the old one.
pub fn save(state_dir: &Path, saved: &Saved) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let mut doc = saved.clone();
    doc.version = VERSION;
    doc.mailboxes.retain(|_, m| !m.is_empty());
    let bytes = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
    let target = path(state_dir);
    let tmp = state_dir.join(TMP);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(&tmp, &target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Saved::default());
        let mut s = Saved::default();
        s.mailboxes.insert(
            "a@x".into(),
            SavedMailbox {
                sent: vec![(1, 2), (3, 4)],
                blocked: Some(Note {
                    until: 9,
                    why: "throttled".into(),
                }),
                held_senders: vec!["bob@x".into()],
                waiting: None,
            },
        );
        s.mailboxes.insert("idle@x".into(), SavedMailbox::default());
        let sub = dir.path().join("state");
        save(&sub, &s).unwrap();
        let back = load(&sub).unwrap();
        assert_eq!(back.version, VERSION);
        assert_eq!(back.mailboxes.len(), 1, "empty records are not written");
        assert_eq!(back.mailboxes["a@x"], s.mailboxes["a@x"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(&sub)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(path(&sub), b"{not json").unwrap();
        assert!(load(&sub).is_err());
    }
}
