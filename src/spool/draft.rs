//! A message being received. Messages up to the journal's record size stay in memory until
//! commit, which hands the whole queue file (body, then envelope) to the intake journal;
//! larger ones stream into `tmp/<id>` in bounded chunks (the file is created when the body
//! spills over). Every byte a draft buffers comes from one budget shared by all sessions
//! (`limits.message_memory`): a draft first takes a chunk, then, if the message may still fit
//! the journal, room for a whole record; when the budget is spent a draft spills to `tmp/`,
//! and with no memory at all it writes each piece straight through. So RSS stays bounded
//! however many clients send at once.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::commit::Payload;
use super::journal::MAX_RECORD;
use super::{Envelope, Inner, SpoolError, durable, msgfile};
use crate::smtp::MessageDraft;

/// What a draft buffers before it writes out (when the message is too big for the journal,
/// or the budget has no room for a whole record).
const CHUNK: usize = 64 * 1024;
/// Default of `limits.message_memory`: memory all drafts together may buffer.
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;
/// Room kept free in a journal-sized buffer for the envelope trailer.
const TRAILER_ROOM: usize = 4096;

/// A message being received.
pub struct Draft {
    pub(super) id: String,
    pub(super) path: PathBuf,
    /// `tmp/<id>`, once the body outgrew the buffer.
    pub(super) file: Option<File>,
    /// Never holds more capacity than `reserved`.
    pub(super) buf: Vec<u8>,
    /// Bytes taken from the spool's shared memory budget.
    pub(super) reserved: u64,
    pub(super) size: u64,
    pub(super) spool: Arc<Inner>,
    pub(super) done: bool,
}

fn create(path: &PathBuf) -> Result<File, SpoolError> {
    durable::create_new()
        .read(true)
        .open(path)
        .map_err(|e| SpoolError::io("create", path, e))
}

impl Draft {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hold `total` bytes of the shared budget (more or fewer than now); false, holding what
    /// it held, when the budget has no room.
    fn hold(&mut self, total: u64) -> bool {
        let used = &self.spool.draft_memory_used;
        if total <= self.reserved {
            used.fetch_sub(self.reserved - total, Ordering::AcqRel);
            self.reserved = total;
            return true;
        }
        let more = total - self.reserved;
        let budget = self.spool.draft_memory_budget.load(Ordering::Relaxed);
        let ok = used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(more).filter(|&n| n <= budget)
            })
            .is_ok();
        if ok {
            self.reserved = total;
        }
        ok
    }

    fn release(&mut self) {
        self.buf = Vec::new();
        self.hold(0);
    }

    /// Make room in memory for `extra` more bytes, within the budget. False: write out.
    fn room_for(&mut self, extra: usize) -> bool {
        let need = self.buf.len() + extra;
        if need <= self.buf.capacity() {
            return true;
        }
        // A chunk; or, while the message may still go to the journal in one record, a whole
        // record (never more than that: a message that outgrows it streams to tmp/).
        let journal_ok = self.file.is_none()
            && self.spool.journal.is_some()
            && need + TRAILER_ROOM <= MAX_RECORD as usize;
        let want = if need <= CHUNK {
            CHUNK
        } else if journal_ok {
            MAX_RECORD as usize
        } else {
            return false;
        };
        if !self.hold(want as u64) {
            return false;
        }
        self.buf.reserve_exact(want - self.buf.len());
        true
    }

    /// Write the buffer (then `direct`, if any) to `tmp/<id>`, creating it on first use. The
    /// buffer comes back empty, shrunk to a chunk: a draft that spilled never buffers more.
    async fn spill(&mut self, direct: Option<&[u8]>) -> Result<(), SpoolError> {
        let file = self.file.take();
        let mut buf = std::mem::take(&mut self.buf);
        let direct = direct.map(<[u8]>::to_vec);
        let path = self.path.clone();
        let (file, buf, res) = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(f) => f,
                None => match create(&path) {
                    Ok(f) => f,
                    Err(e) => return (None, buf, Err(e)),
                },
            };
            let mut r = file
                .write_all(&buf)
                .map_err(|e| SpoolError::io("write", &path, e));
            if let (Ok(()), Some(d)) = (&r, &direct) {
                r = file
                    .write_all(d)
                    .map_err(|e| SpoolError::io("write", &path, e));
            }
            buf.clear();
            (Some(file), buf, r)
        })
        .await
        .map_err(|e| SpoolError::other("write", &self.path, e))?;
        self.file = file;
        if buf.capacity() <= CHUNK {
            self.buf = buf;
        } else {
            self.buf = Vec::new();
            self.hold(0);
        }
        res
    }
}

impl MessageDraft for Draft {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.size += chunk.len() as u64;
        if self.room_for(chunk.len()) {
            self.buf.extend_from_slice(chunk);
            return Ok(());
        }
        self.spill(None).await?;
        if self.room_for(chunk.len()) {
            self.buf.extend_from_slice(chunk);
            Ok(())
        } else {
            // No memory left in the budget: straight through to the file.
            self.spill(Some(chunk)).await
        }
    }

    async fn commit(mut self, mut envelope: Envelope) -> Result<(), SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.size;
        let trailer = msgfile::trailer(&envelope)
            .map_err(|e| SpoolError::other("encode envelope", &self.path, e))?;
        let total = self.size + trailer.len() as u64;
        let mut journal = self.spool.journal.is_some() && total <= MAX_RECORD;
        if journal && self.file.is_some() && !self.hold(total.max(self.reserved)) {
            // Spilled, and no memory to read it back for the journal: flush the file itself.
            journal = false;
        }
        // The reservation stays until the committer is done with the bytes (drop gives it back).
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&trailer);
        let payload = match self.file.take() {
            // Never touched the disk: the journal gets it all, the queue file comes later.
            None if journal => Payload::Memory(buf),
            file => {
                let path = self.path.clone();
                // One trip to the blocking pool: the last bytes and the envelope, then either
                // the bytes for the journal or (too big for it) one fdatasync.
                tokio::task::spawn_blocking(move || -> Result<Payload, SpoolError> {
                    let mut file = match file {
                        Some(f) => f,
                        None => create(&path)?,
                    };
                    file.write_all(&buf)
                        .map_err(|e| SpoolError::io("write", &path, e))?;
                    if journal {
                        let mut all = vec![0u8; total as usize];
                        file.read_exact_at(&mut all, 0)
                            .map_err(|e| SpoolError::io("read", &path, e))?;
                        Ok(Payload::File { journal: Some(all) })
                    } else {
                        file.sync_data()
                            .map_err(|e| SpoolError::io("fsync", &path, e))?;
                        Ok(Payload::File { journal: None })
                    }
                })
                .await
                .map_err(|e| SpoolError::other("commit", &self.path, e))??
            }
        };
        // The committer makes it durable together with every message committed at about the
        // same time (group commit), queues it and wakes the forwarder.
        self.spool
            .committer
            .commit(self.id.clone(), payload)
            .await?;
        self.done = true;
        Ok(())
    }

    async fn discard(mut self) {
        self.done = true;
        self.release();
        // Also when `file` is None: a failed commit may have created it already.
        self.file = None;
        let path = self.path.clone();
        let _ = tokio::task::spawn_blocking(move || durable::remove_file(&path)).await;
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        self.release();
        if !self.done {
            // Never acknowledged: leave nothing behind (start-up wipes tmp/ too, after a crash).
            // The file may exist even when `file` is None (a failed commit created it).
            self.file = None;
            let _ = durable::remove_file(&self.path);
        }
    }
}
