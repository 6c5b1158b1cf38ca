//! The spool: one queue file per message (the message bytes followed by its envelope, see
//! `msgfile.rs`), moved between state directories by atomic renames, like Postfix's queue.
//!
//! The path to "250" for a message up to 1 MiB (queue file: body, then envelope): append it to
//! the intake journal and flush that once for every message committed at the same moment
//! (`journal.rs`, `commit.rs`); then write the queue file into `tmp/` and rename it into
//! `incoming/` without a flush, and wake the forwarder. A checkpoint flushes the queue files
//! the journal still owes before it retires a segment. Larger messages stream into `tmp/<id>`,
//! are fdatasynced, renamed into `incoming/`, and `incoming/` and `tmp/` are fsynced (shared
//! by every commit of the same moment). Start-up recovery rewrites from the journal whatever
//! a crash took, wipes `tmp/`, moves `active/` back to `incoming/`, cuts torn envelope appends
//! and quarantines anything unreadable in `corrupt/`. All raw filesystem writes live in
//! `durable.rs`, `msgfile.rs`, `journal.rs` and `recycle.rs`.
//!
//! Trust, as Postfix's: the spool is private to the service user (the daemon refuses to start
//! otherwise, see `crate::trust`), nothing in it is opened through a symlink, and a queue file
//! that is not a regular file owned by the spool's owner is never delivered: the daemon moves
//! it to `corrupt/` with a warning naming its owner. Admin commands (`queue ...`) never create
//! anything in the spool, so running them as root leaves no root-owned directory behind.

mod commit;
mod draft;
pub mod durable;
mod envelope;
mod id;
mod journal;
pub mod msgfile;
mod recycle;
mod state;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::warn;

pub use draft::{DEFAULT_MEMORY_BUDGET as DEFAULT_MESSAGE_MEMORY, Draft};
pub use envelope::{ENVELOPE_VERSION, Envelope, GraphProgress, RcptStatus, Recipient};
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
    /// A file in a queue directory that postern did not write (not a regular file, or another
    /// user's): never delivered.
    #[error("{}: {why}; not a queue file postern wrote, so it is never delivered", path.display())]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// What it is (a symbolic link, a FIFO, owned by another user...).
        why: String,
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
    pub(crate) fn untrusted(path: &Path, why: String) -> Self {
        Self::Untrusted {
            path: path.to_path_buf(),
            why,
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
    /// Acknowledged messages whose queue file a crash took, written again from the journal.
    pub restored: usize,
    /// Queue files of delivered messages that a crash brought back, removed (their journal
    /// done record says they were sent).
    pub delivered_removed: usize,
    /// Second names of one message in two queue directories (a move a crash left on both
    /// sides), removed.
    pub duplicates_removed: usize,
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
    /// Whose queue files we trust: the daemon's own uid (its start-up check makes sure the
    /// spool is its own), for admin commands the spool root's owner.
    owner: u32,
    committer: commit::Committer,
    /// The intake journal; only the daemon's (exclusive) handle has one.
    journal: Option<Arc<journal::Journal>>,
    /// The move lock (see `durable::Moves`).
    moves: Arc<durable::Moves>,
    /// Queue files of delivered mail, kept to be written over (daemon only, see `recycle.rs`).
    free: Option<Arc<recycle::FreeFiles>>,
    min_free: AtomicU64,
    /// Memory all drafts together may buffer (`limits.message_memory`, see draft.rs).
    draft_memory_budget: AtomicU64,
    /// Memory drafts hold now.
    draft_memory_used: AtomicU64,
    new_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    _lock: Option<File>,
}

impl Inner {
    fn moving(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.moves.read()
    }

    /// Pause renames and flush `active/` if claims left it unflushed, before a directory
    /// claims move messages out of is fsynced (see durable.rs). Admin commands cannot see the
    /// daemon's claims, so they flush `active/` every time.
    fn pause_for_claims(&self) -> Result<std::sync::RwLockWriteGuard<'_, ()>, SpoolError> {
        let paused = self.moves.write();
        let active = self.root.join(State::Active.dir());
        self.moves
            .flush_claims(&paused, &active, self.journal.is_none())
            .map_err(|e| SpoolError::io("fsync", &active, e))?;
        Ok(paused)
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

    /// Open the spool for admin commands (`queue ...`) while the daemon may be running. Creates
    /// nothing: an admin command run as root must not leave root-owned directories in the
    /// service user's spool (a missing state directory reads as empty).
    pub fn open_shared(root: &Path) -> Result<Self, SpoolError> {
        Self::open_inner(root, false)
    }

    fn open_inner(root: &Path, exclusive: bool) -> Result<Self, SpoolError> {
        use std::os::unix::fs::MetadataExt;
        if exclusive {
            for d in managed_dirs(root) {
                durable::create_dir_durable(&d).map_err(|e| SpoolError::io("create", &d, e))?;
            }
        }
        let meta = std::fs::metadata(root).map_err(|e| SpoolError::io("open", root, e))?;
        if !meta.is_dir() {
            return Err(SpoolError::other("open", root, "not a directory"));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = if exclusive {
            unsafe { libc::geteuid() }
        } else {
            meta.uid()
        };
        let lock = if exclusive { Some(lock(root)?) } else { None };
        // Admin commands never accept mail, so only the daemon opens the journal.
        let journal = if exclusive {
            let j = journal::Journal::open(root)
                .map_err(|e| SpoolError::io("open journal", &root.join("journal"), e))?;
            Some(Arc::new(j))
        } else {
            None
        };
        let moves = Arc::new(durable::Moves::default());
        let free = Arc::new(recycle::FreeFiles::new(root, owner));
        let (new_tx, new_rx) = mpsc::unbounded_channel();
        let committer = commit::Committer::start(
            root.to_path_buf(),
            journal.clone(),
            moves.clone(),
            new_tx,
            free.clone(),
        )
        .map_err(|e| SpoolError::io("start committer", root, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                owner,
                committer,
                journal,
                moves,
                free: exclusive.then_some(free),
                min_free: AtomicU64::new(0),
                draft_memory_budget: AtomicU64::new(draft::DEFAULT_MEMORY_BUDGET),
                draft_memory_used: AtomicU64::new(0),
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

    /// Set the memory all messages being received may buffer together; beyond it their
    /// bodies go to `tmp/` as they arrive. Drafts keep what they hold until they finish.
    pub fn set_message_memory(&self, bytes: u64) {
        self.inner
            .draft_memory_budget
            .store(bytes, Ordering::Relaxed);
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

    /// Start-up recovery: write again from the journal every acknowledged message whose queue
    /// file a crash took, wipe `tmp/`, move `active/` back to `incoming/`, cut torn envelope
    /// appends, quarantine what cannot be read, then checkpoint and reset the journal. Run
    /// before the forwarder and listeners start.
    pub fn recover(&self) -> Result<Recovery, SpoolError> {
        let mut r = Recovery::default();
        let root = self.inner.root.clone();
        let jpath = root.join("journal");
        // Claims the previous run left unflushed reach the disk before any source directory
        // is flushed below (see durable.rs).
        drop(self.inner.pause_for_claims()?);
        let (owed, done) = match &self.inner.journal {
            Some(j) => j
                .scan(&root)
                .map_err(|e| SpoolError::io("read", &jpath, e))?,
            None => Default::default(),
        };
        if let Some(j) = &self.inner.journal {
            for f in &owed {
                let bytes = j.read(f).map_err(|e| SpoolError::io("read", &jpath, e))?;
                if self.restore(&f.id, &bytes)? {
                    r.restored += 1;
                }
            }
        }
        // A delivered message whose removal the crash undid: never send it again, since its
        // inode may hold a newer message's bytes by now (see recycle.rs).
        for s in State::QUEUED {
            for id in list_names(&self.state_dir(s))? {
                if done.contains(&id) {
                    let p = self.msg_path(s, &id);
                    warn!(path = %p.display(), "queue file of a delivered message left by a crash; removed");
                    durable::remove_file(&p).map_err(|e| SpoolError::io("remove", &p, e))?;
                    r.delivered_removed += 1;
                }
            }
        }
        let tmp = self.state_dir(State::Tmp);
        let free = root.join(recycle::FREE_DIR);
        let queued = self.queued_inodes()?;
        let leftovers = [&tmp, &free]
            .into_iter()
            .map(|d| {
                list_names(d).map(|names| names.into_iter().map(|n| d.join(n)).collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>, _>>()?;
        for p in leftovers.into_iter().flatten() {
            // After a power loss on a filesystem without a journal, a draft's old name can
            // survive beside its new one: unlinking it would free the queued message's inode.
            if let Ok(m) = std::fs::symlink_metadata(&p)
                && queued.contains(&std::os::unix::fs::MetadataExt::ino(&m))
            {
                warn!(path = %p.display(), "second link to a queued message left by a crash; left alone (run fsck)");
                continue;
            }
            std::fs::remove_file(&p)
                .or_else(|_| durable::remove_dir(&p))
                .map_err(|e| SpoolError::io("remove", &p, e))?;
            if p.starts_with(&tmp) {
                r.drafts_removed += 1;
            }
        }
        durable::fsync_dir(&tmp).map_err(|e| SpoolError::io("fsync", &tmp, e))?;
        for id in list_names(&self.state_dir(State::Active))? {
            if self.move_msg(&id, State::Active, State::Incoming).is_ok() {
                r.requeued += 1;
            }
        }
        r.duplicates_removed = self.remove_second_names()?;
        for s in [State::Incoming, State::Deferred, State::Hold, State::Failed] {
            for name in list_names(&self.state_dir(s))? {
                match self.check_message(s, &name) {
                    Ok(()) => continue,
                    Err(SpoolError::Untrusted { why, .. }) => self.set_aside(s, &name, &why),
                    Err(e) => self.quarantine(s, &name, &e.to_string())?,
                }
                r.quarantined += 1;
            }
        }
        if let Some(j) = &self.inner.journal {
            // Everything the journal owed is now a queue file: flush those, then the journal
            // can start empty.
            let ids: Vec<String> = owed.into_iter().map(|f| f.id).collect();
            commit::flush_queue_files(&root, &ids, &self.inner.moves)?;
            j.reset(&root)
                .map_err(|e| SpoolError::io("reset", &jpath, e))?;
        }
        Ok(r)
    }

    /// After a power cut, a move between two queue directories can survive on both sides (the
    /// destination's directory was flushed, the source's was not): one message, two names.
    /// Keep one, so the message is neither scheduled twice nor skipped as already known. The
    /// name kept is the one that sends least eagerly (failed, then hold, incoming, deferred):
    /// the crash may have undone an admin's retry or release, never a delivery or a refusal.
    fn remove_second_names(&self) -> Result<usize, SpoolError> {
        let mut seen = std::collections::HashSet::new();
        let mut removed = 0;
        for s in [State::Failed, State::Hold, State::Incoming, State::Deferred] {
            for id in list_names(&self.state_dir(s))? {
                if !is_valid_id(&id) || seen.insert(id.clone()) {
                    continue;
                }
                let p = self.msg_path(s, &id);
                warn!(path = %p.display(), "second name of a queued message left by a crash; removed");
                durable::remove_file_durable(&p).map_err(|e| SpoolError::io("remove", &p, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Make sure the journaled message `id` exists as a queue file starting with `bytes`;
    /// returns true when it had to be put back (from `tmp/` or from the journal).
    fn restore(&self, id: &str, bytes: &[u8]) -> Result<bool, SpoolError> {
        if !is_valid_id(id) {
            return Ok(false);
        }
        let mut intact = false;
        for s in State::QUEUED {
            let p = self.msg_path(s, id);
            if std::fs::symlink_metadata(&p).is_err() {
                continue;
            }
            // A tail past the record is fine when it is a later envelope; a recycled file
            // whose truncation was lost can end in the previous message's envelope instead.
            if self.starts_with(&p, bytes)
                && msgfile::read(&p, Some(self.inner.owner)).is_ok_and(|(env, _)| env.id == id)
            {
                intact = true;
            } else {
                warn!(path = %p.display(), "queue file damaged by a crash; writing it again from the journal");
                durable::remove_file_durable(&p).map_err(|e| SpoolError::io("remove", &p, e))?;
            }
        }
        if intact {
            return Ok(false);
        }
        let t = self.msg_path(State::Tmp, id);
        let to = self.msg_path(State::Incoming, id);
        if !self.starts_with(&t, bytes) {
            durable::remove_file(&t).map_err(|e| SpoolError::io("remove", &t, e))?;
            durable::write_new_synced(&t, bytes).map_err(|e| SpoolError::io("write", &t, e))?;
        }
        durable::rename_durable(&t, &to).map_err(|e| SpoolError::io("rename", &t, e))?;
        Ok(true)
    }

    /// Inode numbers of every file in the queue's state directories.
    fn queued_inodes(&self) -> Result<std::collections::HashSet<u64>, SpoolError> {
        let mut set = std::collections::HashSet::new();
        for s in State::QUEUED {
            let d = self.state_dir(s);
            let entries = durable::list_dir(&d).map_err(|e| SpoolError::io("list", &d, e))?;
            set.extend(entries.into_iter().map(|e| e.ino));
        }
        Ok(set)
    }

    /// Does the queue file at `path` (regular, ours) start with `bytes`?
    fn starts_with(&self, path: &Path, bytes: &[u8]) -> bool {
        use std::os::unix::fs::FileExt;
        let Ok(f) = msgfile::open(path, false, Some(self.inner.owner)) else {
            return false;
        };
        let mut buf = vec![0u8; bytes.len()];
        f.read_exact_at(&mut buf, 0).is_ok() && buf == bytes
    }

    /// Checkpoint the whole journal (at shutdown): afterwards every queued message is durable
    /// as a queue file of its own and the journal owes nothing.
    pub fn checkpoint(&self) -> Result<(), SpoolError> {
        let Some(j) = &self.inner.journal else {
            return Ok(());
        };
        let jpath = self.inner.root.join("journal");
        for seg in j
            .seal_all()
            .map_err(|e| SpoolError::io("seal", &jpath, e))?
        {
            // A segment waits only for queue files the committer is writing right now.
            let mut tries = 0;
            while !commit::checkpoint_segment(&self.inner.root, j, &self.inner.moves, seg)? {
                tries += 1;
                if tries > 500 {
                    return Err(SpoolError::other(
                        "checkpoint",
                        &jpath,
                        "queue files still being written after 5 s; the journal keeps them",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn check_message(&self, s: State, name: &str) -> Result<(), SpoolError> {
        let path = self.msg_path(s, name);
        if !is_valid_id(name) {
            return Err(SpoolError::other("check", &path, "name is not a queue id"));
        }
        // A crash during an envelope append leaves a torn tail: cut it; the previous envelope
        // stays in force. (Opening it also refuses what postern did not write.)
        msgfile::repair(&path, Some(self.inner.owner))?;
        let (env, _) = msgfile::read(&path, Some(self.inner.owner))?;
        if env.id != name {
            return Err(SpoolError::other(
                "check",
                &path,
                format!("envelope says id {} but the file is {name}", env.id),
            ));
        }
        msgfile::check_size(&path, &env).map_err(|why| SpoolError::other("check", &path, why))
    }

    /// Move something postern did not write out of a queue directory into `corrupt/`, so it is
    /// never delivered; if even that fails, leave it (still never delivered) and say so.
    fn set_aside(&self, s: State, name: &str, why: &str) {
        use std::os::unix::fs::MetadataExt;
        let from = self.msg_path(s, name);
        let owner = std::fs::symlink_metadata(&from)
            .map(|m| crate::trust::describe_user(m.uid()))
            .unwrap_or_else(|_| "unknown".into());
        match self.quarantine_to(s, name) {
            Ok(to) => warn!(
                path = %from.display(),
                owner = %owner,
                reason = why,
                moved_to = %to.display(),
                "file in the queue that postern did not write (not a regular file, or another user's): moved to corrupt/, never delivered"
            ),
            Err(e) => warn!(
                path = %from.display(),
                owner = %owner,
                reason = why,
                error = %e,
                "file in the queue that postern did not write cannot be moved to corrupt/; ignored, never delivered"
            ),
        }
    }

    fn quarantine(&self, s: State, name: &str, why: &str) -> Result<(), SpoolError> {
        let from = self.msg_path(s, name);
        warn!(path = %from.display(), reason = why, "unreadable message moved to corrupt/");
        self.quarantine_to(s, name).map(|_| ())
    }

    /// Rename `s/name` into `corrupt/` (under a fresh name if taken); returns where it went.
    fn quarantine_to(&self, s: State, name: &str) -> Result<PathBuf, SpoolError> {
        let from = self.msg_path(s, name);
        let mut to = self.msg_path(State::Corrupt, name);
        if std::fs::symlink_metadata(&to).is_ok() {
            to = self.msg_path(State::Corrupt, &format!("{name}.{}", new_id()));
        }
        durable::rename_durable(&from, &to).map_err(|e| SpoolError::io("rename", &from, e))?;
        Ok(to)
    }

    /// Is this the daemon's handle (the one that moves untrusted files aside)?
    fn is_daemon(&self) -> bool {
        self.inner.journal.is_some()
    }

    /// Read the envelope of a message in a state. In the daemon, a file postern did not write
    /// is moved to `corrupt/` on the spot (and the error returned).
    pub fn read_envelope(&self, s: State, id: &str) -> Result<Envelope, SpoolError> {
        let r = msgfile::read(&self.msg_path(s, id), Some(self.inner.owner));
        if let Err(SpoolError::Untrusted { why, .. }) = &r
            && self.is_daemon()
        {
            self.set_aside(s, id, why);
        }
        r.map(|(env, _)| env)
    }

    /// Record a new envelope for a message: appended to its queue file and fdatasynced.
    pub fn write_envelope(&self, s: State, env: &Envelope) -> Result<(), SpoolError> {
        msgfile::append(&self.msg_path(s, &env.id), env, Some(self.inner.owner))
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
        // Moves are rare (deferrals, holds, admin commands): pause renames for all of them.
        let _paused = self.inner.pause_for_claims()?;
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
        let _g = self.inner.moving();
        durable::rename_unsynced(&src, &self.msg_path(State::Active, id))
            .map_err(|e| Self::rename_err(id, &src, e))?;
        self.inner.moves.claimed();
        Ok(())
    }

    /// Remove a delivered message. Not fsynced, like Postfix's queue file removal: if a crash
    /// undoes the removal, the message is sent again at restart, which is the at-least-once
    /// window the design already accepts (crash after the upstream accepted, before we record
    /// it), and it saves a flush per message on the hot path. The journal gets a done record
    /// first; the file goes into the recycling pool (`recycle.rs`) when the daemon has one.
    pub fn remove_delivered(&self, id: &str) -> Result<(), SpoolError> {
        let path = self.msg_path(State::Active, id);
        // The done record and the move into free/ under the move lock: a checkpoint that
        // retires the record's segment flushes the move first (see recycle.rs).
        let _g = self.inner.moving();
        let recorded = self.inner.journal.as_ref().is_some_and(|j| j.done(id));
        match &self.inner.free {
            Some(free) if recorded => free.put(&path, id),
            _ => durable::remove_file(&path),
        }
        .map_err(|e| SpoolError::io("remove", &path, e))
    }

    /// Remove a message for good (`queue delete`), durably: a deleted message never comes back.
    pub fn remove(&self, id: &str, from: State) -> Result<(), SpoolError> {
        // The tombstone first: whatever happens next, recovery will not bring it back from
        // the journal.
        journal::tombstone(&self.inner.root, id).map_err(|e| {
            SpoolError::io("tombstone", &journal::tombstone_dir(&self.inner.root), e)
        })?;
        if let Some(j) = &self.inner.journal {
            let _ = j.done(id);
        }
        let path = self.msg_path(from, id);
        let _paused = self.inner.pause_for_claims()?;
        durable::remove_file_durable(&path).map_err(|e| Self::rename_err(id, &path, e))
    }

    /// Ids in a state directory, oldest first. In the daemon, an entry that is not a regular
    /// file (a symlink, FIFO, directory...) is moved to `corrupt/` as it is seen.
    pub fn ids(&self, s: State) -> Result<Vec<String>, SpoolError> {
        let mut v = Vec::new();
        for e in list_entries(&self.state_dir(s))? {
            if !is_valid_id(&e.name) {
                continue;
            }
            if e.regular == Some(false) {
                if self.is_daemon() {
                    let kind = std::fs::symlink_metadata(self.msg_path(s, &e.name))
                        .map(|m| msgfile::kind(&m.file_type()))
                        .unwrap_or("not a regular file");
                    self.set_aside(s, &e.name, kind);
                }
                continue;
            }
            v.push(e.name);
        }
        v.sort();
        Ok(v)
    }

    /// Find which state a message is in.
    pub fn find(&self, id: &str) -> Option<State> {
        if !is_valid_id(id) {
            return None;
        }
        State::QUEUED.into_iter().find(|s| {
            std::fs::symlink_metadata(self.msg_path(*s, id)).is_ok_and(|m| m.file_type().is_file())
        })
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
        // A deferred message keeps its scheduled time: the forwarder sees the attempt is early
        // (the admin's `queue retry`), so it neither counts it nor stretches the backoff.
        if from != State::Deferred {
            env.next_attempt = None;
        }
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
        // No I/O yet: a small message never touches tmp/ (see draft.rs).
        let id = new_id();
        Ok(Draft {
            path: self.inner.root.join(State::Tmp.dir()).join(&id),
            id,
            file: None,
            buf: Vec::new(),
            reserved: 0,
            size: 0,
            spool: self.inner.clone(),
            done: false,
        })
    }
}

/// Every directory postern keeps under the spool root, parents first (the root included).
pub fn managed_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v = vec![root.to_path_buf()];
    v.extend(State::ALL.iter().map(|s| root.join(s.dir())));
    v.push(root.join(recycle::FREE_DIR));
    v.push(root.join("journal"));
    v.push(journal::tombstone_dir(root));
    v
}

/// Names of the files postern keeps directly in the spool root besides `managed_dirs`.
pub const ROOT_FILES: [&str; 2] = ["lock", "control.sock"];

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The entries of a spool directory (opened without following a symlink); a directory that
/// does not exist (yet: admin commands create nothing) has none.
fn list_entries(dir: &Path) -> Result<Vec<durable::Entry>, SpoolError> {
    match durable::list_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        r => r.map_err(|e| SpoolError::io("list", dir, e)),
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>, SpoolError> {
    Ok(list_entries(dir)?.into_iter().map(|e| e.name).collect())
}

fn lock(root: &Path) -> Result<File, SpoolError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let p = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(durable::FILE_MODE)
        .custom_flags(durable::OPEN_FLAGS)
        .open(&p)
        .map_err(|e| SpoolError::io("open", &p, e))?;
    // 0600 whatever the umask, also when an older postern (or an admin) left it wider.
    let m = f.metadata().map_err(|e| SpoolError::io("stat", &p, e))?;
    if !m.is_file() {
        return Err(SpoolError::other("open", &p, "not a regular file"));
    }
    if m.permissions().mode() & 0o777 != durable::FILE_MODE {
        f.set_permissions(std::fs::Permissions::from_mode(durable::FILE_MODE))
            .map_err(|e| SpoolError::io("chmod", &p, e))?;
    }
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
