//! The spool: one queue file per message (the message bytes followed by its envelope, see
//! `msgfile.rs`), moved between state directories by atomic renames, like Postfix's queue.
//!
//! The only path to "250": stream the body into `tmp/<id>`, append the envelope, fdatasync;
//! rename into `incoming/`; fsync `incoming/` and `tmp/` (shared by every commit of the same
//! moment, see `commit.rs`); wake the forwarder. Start-up recovery wipes `tmp/`, moves
//! `active/` back to `incoming/`, cuts torn envelope appends and quarantines anything
//! unreadable in `corrupt/`. All raw filesystem writes live in `durable.rs` and `msgfile.rs`.

mod commit;
mod draft;
pub mod durable;
mod envelope;
mod id;
pub mod msgfile;
mod state;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::warn;

pub use draft::Draft;
pub use envelope::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient};
pub use id::{is_valid as is_valid_id, new_id};
pub use state::State;

use crate::smtp::MessageSink;

/// Errors from spool operations; each names the operation and path.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Something else went wrong with a spool path.
    #[error("{op} {}: {msg}", path.display())]
    Other {
        /// What we were doing.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// No message with this id is in the queue.
    #[error("no message {0} in the queue")]
    NotFound(String),
    /// The message is in a state that does not allow the operation.
    #[error("message {id} is in {state}/: {why}")]
    WrongState {
        /// Queue id.
        id: String,
        /// Where it is.
        state: State,
        /// Why the operation is refused.
        why: &'static str,
    },
    /// Another postern process already owns this spool.
    #[error("spool {} is locked by another running postern (lock file {}); stop it first or use another spool_dir", root.display(), root.join("lock").display())]
    Locked {
        /// Spool root.
        root: PathBuf,
    },
}

impl SpoolError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn other(op: &'static str, path: &Path, msg: impl ToString) -> Self {
        Self::Other {
            op,
            path: path.to_path_buf(),
            msg: msg.to_string(),
        }
    }
}

/// What start-up recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Unacknowledged drafts removed from `tmp/`.
    pub drafts_removed: usize,
    /// Messages moved from `active/` back to `incoming/`.
    pub requeued: usize,
    /// Messages moved to `corrupt/`.
    pub quarantined: usize,
}

/// A message as listed by `queue list`.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its state directory.
    pub state: State,
    /// Its envelope.
    pub envelope: Envelope,
}

pub(crate) struct Inner {
    root: PathBuf,
    committer: commit::Committer,
    min_free: AtomicU64,
    new_tx: mpsc::UnboundedSender<String>,
    new_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    _lock: Option<File>,
}

impl Inner {
    fn notify_new(&self, id: &str) {
        let _ = self.new_tx.send(id.to_string());
    }
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl Spool {
    /// Open (creating if needed) the spool at `root` for the daemon, taking its lock so two
    /// daemons never share a spool.
    pub fn open_exclusive(root: &Path) -> Result<Self, SpoolError> {
        Self::open_inner(root, true)
    }

    /// Open the spool for admin commands (`queue ...`) while the daemon may be running.
    pub fn open_shared(root: &Path) -> Result<Self, SpoolError> {
        Self::open_inner(root, false)
    }

    fn open_inner(root: &Path, exclusive: bool) -> Result<Self, SpoolError> {
        durable::create_dir_durable(root).map_err(|e| SpoolError::io("create", root, e))?;
        for s in State::ALL {
            let d = root.join(s.dir());
            durable::create_dir_durable(&d).map_err(|e| SpoolError::io("create", &d, e))?;
        }
        let lock = if exclusive { Some(lock(root)?) } else { None };
        let committer = commit::Committer::start(root.to_path_buf())
            .map_err(|e| SpoolError::io("start committer", root, e))?;
        let (new_tx, new_rx) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                committer,
                min_free: AtomicU64::new(0),
                new_tx,
                new_rx: Mutex::new(Some(new_rx)),
                _lock: lock,
            }),
        })
    }

    /// Spool root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Path of a state directory.
    pub fn state_dir(&self, s: State) -> PathBuf {
        self.inner.root.join(s.dir())
    }

    /// Path of a message's queue file in a state. Its first `envelope.size` bytes are the
    /// message; what follows is envelope bookkeeping (see `msgfile.rs`).
    pub fn msg_path(&self, s: State, id: &str) -> PathBuf {
        self.state_dir(s).join(id)
    }

    /// Set the free-space reserve below which new mail is refused.
    pub fn set_min_free(&self, bytes: u64) {
        self.inner.min_free.store(bytes, Ordering::Relaxed);
    }

    /// The stream of ids committed by this process (taken once, by the forwarder).
    pub fn take_new_messages(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.inner.new_rx.lock().ok()?.take()
    }

    /// Free bytes available to us on the spool's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        free_bytes(&self.inner.root)
    }

    /// Start-up recovery: wipe `tmp/`, move `active/` back to `incoming/`, cut torn envelope
    /// appends, quarantine what cannot be read. Run before the forwarder and listeners start.
    pub fn recover(&self) -> Result<Recovery, SpoolError> {
        let mut r = Recovery::default();
        let tmp = self.state_dir(State::Tmp);
        for name in list_names(&tmp)? {
            let p = tmp.join(&name);
            std::fs::remove_file(&p)
                .or_else(|_| durable::remove_dir(&p))
                .map_err(|e| SpoolError::io("remove", &p, e))?;
            r.drafts_removed += 1;
        }
        durable::fsync_dir(&tmp).map_err(|e| SpoolError::io("fsync", &tmp, e))?;
        for id in list_names(&self.state_dir(State::Active))? {
            if self.move_msg(&id, State::Active, State::Incoming).is_ok() {
                r.requeued += 1;
            }
        }
        for s in [State::Incoming, State::Deferred, State::Hold, State::Failed] {
            for name in list_names(&self.state_dir(s))? {
                if let Err(why) = self.check_message(s, &name) {
                    self.quarantine(s, &name, &why)?;
                    r.quarantined += 1;
                }
            }
        }
        Ok(r)
    }

    fn check_message(&self, s: State, name: &str) -> Result<(), String> {
        if !is_valid_id(name) {
            return Err("name is not a queue id".into());
        }
        let path = self.msg_path(s, name);
        if !path.is_file() {
            return Err("not a queue file".into());
        }
        // A crash during an envelope append leaves a torn tail: cut it; the previous envelope
        // stays in force.
        msgfile::repair(&path).map_err(|e| e.to_string())?;
        let env = self.read_envelope_at(&path).map_err(|e| e.to_string())?;
        if env.id != name {
            return Err(format!(
                "envelope says id {} but the file is {name}",
                env.id
            ));
        }
        msgfile::check_size(&path, &env)
    }

    fn quarantine(&self, s: State, name: &str, why: &str) -> Result<(), SpoolError> {
        let from = self.msg_path(s, name);
        let mut to = self.msg_path(State::Corrupt, name);
        if to.exists() {
            to = self.msg_path(State::Corrupt, &format!("{name}.{}", new_id()));
        }
        warn!(path = %from.display(), reason = why, "unreadable message moved to corrupt/");
        durable::rename_durable(&from, &to).map_err(|e| SpoolError::io("rename", &from, e))
    }

    /// Read the envelope of a message in a state.
    pub fn read_envelope(&self, s: State, id: &str) -> Result<Envelope, SpoolError> {
        self.read_envelope_at(&self.msg_path(s, id))
    }

    fn read_envelope_at(&self, path: &Path) -> Result<Envelope, SpoolError> {
        msgfile::read(path).map(|(env, _)| env)
    }

    /// Record a new envelope for a message: appended to its queue file and fdatasynced.
    pub fn write_envelope(&self, s: State, env: &Envelope) -> Result<(), SpoolError> {
        msgfile::append(&self.msg_path(s, &env.id), env)
    }

    fn rename_err(id: &str, path: &Path, e: io::Error) -> SpoolError {
        if e.kind() == io::ErrorKind::NotFound {
            SpoolError::NotFound(id.into())
        } else {
            SpoolError::io("rename", path, e)
        }
    }

    /// Move a message between states durably. `NotFound` means someone else moved it first
    /// (the daemon and the admin commands race only through these renames).
    pub fn move_msg(&self, id: &str, from: State, to: State) -> Result<(), SpoolError> {
        if !from.can_move_to(to) {
            return Err(SpoolError::WrongState {
                id: id.into(),
                state: from,
                why: "illegal move",
            });
        }
        let src = self.msg_path(from, id);
        durable::rename_durable(&src, &self.msg_path(to, id))
            .map_err(|e| Self::rename_err(id, &src, e))
    }

    /// Claim a waiting message for delivery (`incoming/` or `deferred/` → `active/`). No fsync:
    /// after a crash a message is recovered to `incoming/` from either side of this rename, so
    /// making the rename durable would buy nothing.
    pub fn claim(&self, id: &str, from: State) -> Result<(), SpoolError> {
        if !from.can_move_to(State::Active) {
            return Err(SpoolError::WrongState {
                id: id.into(),
                state: from,
                why: "illegal move",
            });
        }
        let src = self.msg_path(from, id);
        durable::rename_unsynced(&src, &self.msg_path(State::Active, id))
            .map_err(|e| Self::rename_err(id, &src, e))
    }

    /// Remove a delivered message. Not fsynced, like Postfix's queue file removal: if a crash
    /// undoes the removal, the message is sent again at restart, which is the at-least-once
    /// window the design already accepts (crash after the upstream accepted, before we record
    /// it), and it saves a flush per message on the hot path.
    pub fn remove_delivered(&self, id: &str) -> Result<(), SpoolError> {
        let path = self.msg_path(State::Active, id);
        durable::remove_file(&path).map_err(|e| SpoolError::io("remove", &path, e))
    }

    /// Remove a message for good (`queue delete`), durably: a deleted message never comes back.
    pub fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        let path = self.msg_path(from, id);
        durable::remove_file_durable(&path).map_err(|e| Self::rename_err(id, &path, e))
    }

    /// Ids in a state directory, oldest first.
    pub fn ids(&self, s: State) -> Result<Vec<String>, SpoolError> {
        let mut v: Vec<String> = list_names(&self.state_dir(s))?
            .into_iter()
            .filter(|n| is_valid_id(n))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Find which state a message is in.
    pub fn find(&self, id: &str) -> Option<State> {
        if !is_valid_id(id) {
            return None;
        }
        State::QUEUED
            .into_iter()
            .find(|s| self.msg_path(*s, id).is_file())
    }

    /// Every queued message with its envelope, oldest first.
    pub fn list(&self) -> Result<Vec<Listed>, SpoolError> {
        let mut out = Vec::new();
        for s in State::QUEUED {
            for id in self.ids(s)? {
                // A message may move while we look; skip what vanished.
                if let Ok(envelope) = self.read_envelope(s, &id) {
                    out.push(Listed { state: s, envelope });
                }
            }
        }
        out.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        Ok(out)
    }

    /// Put a queued message on hold (admin).
    pub fn hold(&self, id: &str, reason: &str) -> Result<(), SpoolError> {
        let from = self
            .find(id)
            .ok_or_else(|| SpoolError::NotFound(id.into()))?;
        match from {
            State::Incoming | State::Deferred => {}
            State::Hold => return Ok(()),
            State::Active => {
                return Err(SpoolError::WrongState {
                    id: id.into(),
                    state: from,
                    why: "it is being delivered right now; try again in a moment",
                });
            }
            _ => {
                return Err(SpoolError::WrongState {
                    id: id.into(),
                    state: from,
                    why: "only queued messages can be held",
                });
            }
        }
        self.move_msg(id, from, State::Hold)?;
        let mut env = self.read_envelope(State::Hold, id)?;
        env.hold_reason = Some(reason.to_string());
        env.auto_hold = false;
        self.write_envelope(State::Hold, &env)
    }

    /// Hold a waiting message because its mailbox is paused (postern's own hold, released
    /// automatically once the mailbox works again).
    pub fn auto_hold(&self, id: &str, from: State, reason: &str) -> Result<(), SpoolError> {
        // Envelope first, then the move: whoever sees the message in hold/ sees why. (Only the
        // forwarder, which owns waiting messages, calls this.)
        let mut env = self.read_envelope(from, id)?;
        env.hold_reason = Some(reason.to_string());
        env.auto_hold = true;
        self.write_envelope(from, &env)?;
        self.move_msg(id, from, State::Hold)
    }

    /// Release a held message (or retry a deferred/failed one) now: back to `incoming/`.
    pub fn requeue(&self, id: &str) -> Result<State, SpoolError> {
        let from = self
            .find(id)
            .ok_or_else(|| SpoolError::NotFound(id.into()))?;
        if !matches!(from, State::Hold | State::Deferred | State::Failed) {
            return Err(SpoolError::WrongState {
                id: id.into(),
                state: from,
                why: "it is already waiting for delivery",
            });
        }
        // Update the envelope first: if we crash between the two steps the message is still
        // in its old state with a harmless, cleared next_attempt.
        let mut env = self.read_envelope(from, id)?;
        env.hold_reason = None;
        env.auto_hold = false;
        env.next_attempt = None;
        if from == State::Failed {
            env.received_at = now_secs(); // a fresh lifetime, as the admin asked for a retry
            for r in env
                .recipients
                .iter_mut()
                .filter(|r| r.status == RcptStatus::Failed)
            {
                r.status = RcptStatus::Pending;
            }
        }
        self.write_envelope(from, &env)?;
        self.move_msg(id, from, State::Incoming)?;
        Ok(from)
    }

    /// Delete a queued message (admin).
    pub fn delete(&self, id: &str) -> Result<State, SpoolError> {
        let from = self
            .find(id)
            .ok_or_else(|| SpoolError::NotFound(id.into()))?;
        if from == State::Active {
            return Err(SpoolError::WrongState {
                id: id.into(),
                state: from,
                why: "it is being delivered right now; hold it or try again in a moment",
            });
        }
        self.remove(id, from)?;
        Ok(from)
    }
}

impl MessageSink for Spool {
    type Draft = Draft;

    fn has_room(&self, size: u64) -> bool {
        let reserve = self.inner.min_free.load(Ordering::Relaxed);
        match self.free_bytes() {
            Ok(free) => free.saturating_sub(size) >= reserve,
            Err(_) => false,
        }
    }

    async fn begin(&self) -> Result<Draft, SpoolError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let tmp = inner.root.join("tmp");
            loop {
                let id = new_id();
                let path = tmp.join(&id);
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(file) => {
                        return Ok(Draft {
                            id,
                            path,
                            file: Some(file),
                            buf: Vec::new(),
                            size: 0,
                            spool: inner,
                            done: false,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(SpoolError::io("create", &path, e)),
                }
            }
        })
        .await
        .map_err(|e| SpoolError::other("begin", Path::new("tmp"), e))?
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn list_names(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let rd = std::fs::read_dir(dir).map_err(|e| SpoolError::io("list", dir, e))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| SpoolError::io("list", dir, e))?;
        if let Some(n) = e.file_name().to_str() {
            v.push(n.to_string());
        }
    }
    Ok(v)
}

fn lock(root: &Path) -> Result<File, SpoolError> {
    use std::os::fd::AsRawFd;
    let p = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| SpoolError::io("open", &p, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(SpoolError::Locked {
            root: root.to_path_buf(),
        });
    }
    Ok(f)
}

fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests;
