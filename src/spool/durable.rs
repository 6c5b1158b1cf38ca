//! The only code that renames, removes or fsyncs spool paths (besides the intake journal's own
//! segment files in `journal.rs`), so the crash-safety argument can be reviewed in two files.
//!
//! The rules: a file's bytes are `fdatasync`ed before the name that makes it visible is
//! created (rename), unless they are already in a flushed journal record (small new messages,
//! see `journal.rs`; the checkpoint in `commit.rs` flushes those files before the record is
//! retired); a rename is durable only once the directories on both sides are fsynced.
//! Nothing else in the crate calls `rename`, `sync_*` or `remove_*` on spool paths.
//! Two renames are deliberately not synced (see `Spool::claim` and `Spool::remove_delivered`):
//! claiming a message, because recovery treats both sides alike, and removing a delivered one,
//! because losing that removal only resends, which at-least-once delivery already allows.
//!
//! "Both sides alike" needs one more rule where renames are not atomic (ext2, ext4 without a
//! journal: an fsync of one directory writes that directory alone). An unflushed claim moved a
//! message out of `incoming/` or `deferred/` into `active/`; flushing the source directory
//! first would make the removal durable while the arrival is not, and a power cut would lose
//! the message (found by tests/it/powercut/). So every fsync of a claim's source directory
//! runs with renames paused ([`Moves::write`]) after [`Moves::flush_claims`] flushed
//! `active/`. Admin commands in another process cannot pause the daemon's claims: they flush
//! `active/` first every time, which leaves only a claim landing between their two flushes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The spool's move lock: held for reading by every rename the daemon makes, for writing by a
/// checkpoint while it opens the files it must flush and by every flush of a directory that
/// claims move messages out of; and whether claims happened since `active/` was flushed.
#[derive(Debug)]
pub struct Moves {
    lock: RwLock<()>,
    claimed: AtomicBool,
}

impl Default for Moves {
    fn default() -> Self {
        Self {
            lock: RwLock::new(()),
            // a previous run's claims may not have reached the disk either
            claimed: AtomicBool::new(true),
        }
    }
}

impl Moves {
    /// Renames may go on while this is held.
    pub fn read(&self) -> RwLockReadGuard<'_, ()> {
        // A panic while holding the lock leaves no data behind it; keep going.
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Renames are paused while this is held.
    pub fn write(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A claim renamed a message into `active/` (call while holding [`Moves::read`]).
    pub fn claimed(&self) {
        self.claimed.store(true, Ordering::SeqCst);
    }

    /// Flush `active` if a claim moved a message into it since it was last flushed, or if
    /// `blind` (another process claims). Call holding [`Moves::write`], before fsyncing a
    /// directory claims move messages out of.
    pub fn flush_claims(
        &self,
        _paused: &RwLockWriteGuard<'_, ()>,
        active: &Path,
        blind: bool,
    ) -> io::Result<()> {
        if self.claimed.swap(false, Ordering::SeqCst) || blind {
            fsync_dir(active).inspect_err(|_| self.claimed.store(true, Ordering::SeqCst))?;
        }
        Ok(())
    }
}

/// Mode of every file postern creates in the spool: mail is private to the service user.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory postern creates in the spool.
pub const DIR_MODE: u32 = 0o700;

/// fsync a directory so the entries created, renamed or removed in it are on disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create `path` (it must not exist), write `bytes` and `fdatasync` it.
pub fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// Create `path` (it must not exist) with `bytes`, without a flush (the intake journal holds
/// the bytes; see `journal.rs`). A partial file is removed again on failure.
pub fn write_new_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.write_all(bytes).inspect_err(|_| {
        let _ = fs::remove_file(path);
    })
}

/// Replace `path` atomically: write a sibling temp file, fsync it, rename it over `path`,
/// fsync the directory. A crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    write_synced(path, bytes)?;
    fsync_dir(dir)
}

/// Rename without fsync; the caller fsyncs both parents (used by group commit, which fsyncs
/// each directory once for a whole batch).
pub fn rename_unsynced(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)
}

/// Rename and make it durable: fsync the destination's directory, then the source's.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    if let Some(p) = to.parent() {
        fsync_dir(p)?;
    }
    match (from.parent(), to.parent()) {
        (Some(a), Some(b)) if a != b => fsync_dir(a),
        _ => Ok(()),
    }
}

/// Remove a file without making the removal durable (see `Spool::remove_delivered`).
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Remove a file and fsync its directory, so the removal survives a crash.
pub fn remove_file_durable(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

/// Remove a directory tree (leftovers in `tmp/`).
pub fn remove_dir(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Create a directory (and parents) and fsync its parent so it survives a crash.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    if let Some(p) = path.parent() {
        fsync_dir(p)?;
    }
    Ok(())
}

/// Copy everything `from` yields into `to` atomically (temp file, fdatasync, rename). The
/// caller fsyncs the directory, once for several files.
pub fn copy_synced(mut from: impl io::Read, to: &Path) -> io::Result<u64> {
    let tmp = sibling_tmp(to);
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    let n = io::copy(&mut from, &mut out)?;
    out.sync_data()?;
    drop(out);
    fs::rename(&tmp, to)?;
    Ok(n)
}

/// Replace `path` atomically (temp file, fdatasync, rename). The caller fsyncs the directory.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = sibling_tmp(path);
    // A leftover from a crash mid-write is garbage: replace it.
    let _ = fs::remove_file(&tmp);
    write_new_synced(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn sibling_tmp(path: &Path) -> std::path::PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    tmp.into()
}
