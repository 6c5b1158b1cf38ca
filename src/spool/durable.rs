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
//!
//! Trust: files are opened and created with `O_NOFOLLOW` (a symlink planted in the spool is
//! never written or read through) and `O_NONBLOCK` (a FIFO never blocks a thread), and spool
//! directories are listed through `O_DIRECTORY|O_NOFOLLOW` descriptors. Only `fsync_dir`
//! follows a symlink at the last component: syncing reads and changes nothing, and the
//! directories an admin configures (spool root, file transport, state) may be symlinks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
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

/// Flags for every file opened in the spool: see the module docs.
pub const OPEN_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK;

/// fsync a directory so the entries created, renamed or removed in it are on disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?
        .sync_all()
}

/// Options that create a new spool file (mode 0600, never through a symlink).
pub fn create_new() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(OPEN_FLAGS);
    o
}

/// Open an existing spool file for reading (or also writing) without following a symlink or
/// blocking on a FIFO. The caller checks with `metadata()` that it got a regular file.
pub fn open_existing(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(OPEN_FLAGS)
        .open(path)
}

/// Open a spool directory without following a symlink (`O_DIRECTORY|O_NOFOLLOW`).
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    Ok(f.into())
}

/// An entry of a spool directory: its name (UTF-8 names only: postern writes no others),
/// inode number, and whether it is known to be a regular file (`None`: the filesystem does
/// not say without a `stat`).
pub struct Entry {
    /// File name.
    pub name: String,
    /// Inode number.
    pub ino: u64,
    /// Regular file?
    pub regular: Option<bool>,
}

/// List a spool directory opened with `O_DIRECTORY|O_NOFOLLOW`.
pub fn list_dir(dir: &Path) -> io::Result<Vec<Entry>> {
    use rustix::fs::FileType;
    let mut out = Vec::new();
    for e in rustix::fs::Dir::new(open_dir(dir)?)? {
        let e = e?;
        let Ok(name) = e.file_name().to_str() else {
            continue;
        };
        if name == "." || name == ".." {
            continue;
        }
        let regular = match e.file_type() {
            FileType::Unknown => None,
            t => Some(t == FileType::RegularFile),
        };
        out.push(Entry {
            name: name.to_owned(),
            ino: e.ino(),
            regular,
        });
    }
    Ok(out)
}

/// Create `path` (it must not exist), write `bytes` and `fdatasync` it.
pub fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_new().open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// Create `path` (it must not exist) with `bytes`, without a flush (the intake journal holds
/// the bytes; see `journal.rs`). A partial file is removed again on failure.
pub fn write_new_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_new().open(path)?;
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
    // A leftover from a crash mid-copy is garbage: replace it (never write through it).
    let _ = fs::remove_file(&tmp);
    let mut out = create_new().open(&tmp)?;
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
