//! Recycled queue files. A delivered message's file is renamed into `free/` instead of being
//! unlinked, and the next new message is written over it, so a busy spool stops creating and
//! freeing an inode per message. Why: ext4 without a journal will not reuse an inode freed
//! within the last 30 s and checks every such inode in the group on each allocation
//! (`recently_deleted`); at a few thousand messages a second that took 40 % of postern's CPU
//! (perf, bench/). The pool is small and bounded, lives only in memory, and `free/` is wiped
//! at start-up: a file there holds nothing anybody is owed.
//!
//! A pooled file is written over only if it is still the plain file we put there: opened
//! without following a symlink, a regular file of ours with no second link. Anything else
//! (someone swapped in a symlink or a hard link to a file outside the spool) is unlinked and
//! never written.
//!
//! The move into `free/` is not flushed, so after a power cut the delivered message's old
//! name may come back, and it names the same inode that a new message was written over: a
//! mix of the new message's sectors and the old one's tail that would be delivered as the old
//! message (found by tests/it/powercut/). Two rules make that harmless:
//! - only a file whose journal *done* record was written is pooled ([`Spool::remove_delivered`]
//!   writes the record and moves the file under the spool's move lock, so a checkpoint that
//!   retires the record's segment has flushed the move first), and recovery removes every
//!   queue file that has a done record instead of delivering it;
//! - a pooled file is written over only by a batch whose journal flush began after the file
//!   was pooled ([`FreeFiles::ticket`]), and that flush carries the done record along
//!   (`Journal::append` flushes the segments `done` wrote to).
//!
//! So whenever new bytes can reach a recycled inode, either its old name's removal is durable
//! or its done record is.
//!
//! [`Spool::remove_delivered`]: super::Spool::remove_delivered

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;

use super::durable;

/// The pool's directory under the spool root.
pub(super) const FREE_DIR: &str = "free";
/// Most files kept for reuse; more are unlinked.
const MAX_FREE: usize = 256;

/// Pooled files, oldest first, each with the number it was pooled under.
#[derive(Default)]
struct Pool {
    files: VecDeque<(String, u64)>,
    next: u64,
}

/// The pool of emptied queue files.
pub(super) struct FreeFiles {
    dir: PathBuf,
    /// The uid every pooled file must belong to (the service user).
    owner: u32,
    pool: Mutex<Pool>,
}

impl FreeFiles {
    /// An empty pool over `<spool_root>/free` of files owned by `owner`.
    pub(super) fn new(spool_root: &Path, owner: u32) -> Self {
        Self {
            dir: spool_root.join(FREE_DIR),
            owner,
            pool: Mutex::new(Pool::default()),
        }
    }

    /// Open a pooled file for writing if it is still the plain file of ours we put there.
    fn open_pooled(&self, p: &Path) -> io::Result<File> {
        let f = durable::open_existing(p, true)?;
        let m = f.metadata()?;
        if !m.file_type().is_file() || m.uid() != self.owner || m.nlink() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not the plain file postern put there",
            ));
        }
        Ok(f)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files pooled before this call may be written over by a batch whose journal flush
    /// starts after it (their done records are written by then, and that flush carries them).
    pub(super) fn ticket(&self) -> u64 {
        self.pool().next
    }

    /// Take the file at `path` (named `name`, unique) out of the queue: into the pool if it
    /// has room, else unlinked. Not flushed, like any removal of delivered mail. Only for a
    /// file whose done record was written (see the module docs).
    pub(super) fn put(&self, path: &Path, name: &str) -> io::Result<()> {
        let mut pool = self.pool();
        if pool.files.len() < MAX_FREE {
            match durable::rename_unsynced(path, &self.dir.join(name)) {
                Ok(()) => {
                    let n = pool.next;
                    pool.next += 1;
                    pool.files.push_back((name.to_string(), n));
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(_) => {} // e.g. free/ vanished: just unlink
            }
        }
        drop(pool);
        durable::remove_file(path)
    }

    /// Write `bytes` as the new file `to`, over a pooled file older than `ticket` when there
    /// is one (no inode allocated), else into a new one at `fallback` first; then rename it
    /// to `to`. No flush.
    pub(super) fn write_as(
        &self,
        bytes: &[u8],
        fallback: &Path,
        to: &Path,
        ticket: u64,
    ) -> io::Result<()> {
        let reused = {
            let mut pool = self.pool();
            match pool.files.front() {
                Some((_, n)) if *n < ticket => pool.files.pop_front().map(|(name, _)| name),
                _ => None,
            }
        };
        if let Some(name) = reused {
            let p = self.dir.join(&name);
            let opened = self.open_pooled(&p);
            if let Err(e) = &opened
                && (e.raw_os_error() == Some(libc::ELOOP)
                    || e.kind() == io::ErrorKind::PermissionDenied)
            {
                warn!(path = %p.display(), error = %e, "recycled queue file was replaced (a symlink, a hard link or another user's file); removed, not written");
            }
            let ok = opened
                .and_then(|f| {
                    f.write_all_at(bytes, 0)?;
                    f.set_len(bytes.len() as u64)
                })
                .and_then(|()| durable::rename_unsynced(&p, to));
            match ok {
                Ok(()) => return Ok(()),
                Err(_) => {
                    let _ = durable::remove_file(&p); // a damaged pool file is not worth keeping
                }
            }
        }
        durable::write_new_unsynced(fallback, bytes).or_else(|e| {
            // A retry after a failed rename: the file is complete already.
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        durable::rename_unsynced(fallback, to)
    }
}
