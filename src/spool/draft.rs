//! A message being received. Messages up to the journal's record size stay in memory until
//! commit, which hands the whole queue file (body, then envelope) to the intake journal;
//! larger ones stream into `tmp/<id>` in bounded chunks (the file is created when the body
//! spills over). Beyond the first chunk, memory comes from a budget shared by all sessions,
//! so RSS stays bounded however many clients send at once; without budget a draft spills.

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

/// Bytes every draft may buffer in memory before it writes them out.
const CHUNK: usize = 64 * 1024;
/// Memory all drafts together may hold beyond their first chunk.
pub(super) const MEMORY_BUDGET: u64 = 64 << 20;
/// What a draft takes from the budget to keep a whole journal-sized message in memory.
const RESERVE: u64 = MAX_RECORD - CHUNK as u64;

/// A message being received.
pub struct Draft {
    pub(super) id: String,
    pub(super) path: PathBuf,
    /// `tmp/<id>`, once the body outgrew the buffer.
    pub(super) file: Option<File>,
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

    /// Take memory from the shared budget to keep the whole message in memory.
    fn reserve(&mut self) -> bool {
        let budget = &self.spool.draft_memory;
        let ok = budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(RESERVE)
            })
            .is_ok();
        if ok {
            self.reserved = RESERVE;
        }
        ok
    }

    fn release(&mut self) {
        if self.reserved > 0 {
            self.spool
                .draft_memory
                .fetch_add(self.reserved, Ordering::AcqRel);
            self.reserved = 0;
        }
    }

    /// Should the buffer be written out now?
    fn must_spill(&mut self) -> bool {
        if self.buf.len() < CHUNK {
            return false;
        }
        if self.file.is_none() && self.spool.journal.is_some() {
            // Still small enough for the journal: keep it in memory if the budget allows.
            let fits = self.buf.len() as u64 + 4096 <= MAX_RECORD;
            if fits && (self.reserved > 0 || self.reserve()) {
                return false;
            }
        }
        self.release();
        true
    }

    async fn flush_buf(&mut self) -> Result<(), SpoolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let file = self.file.take();
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let path = self.path.clone();
        let (file, res) = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(f) => f,
                None => match create(&path) {
                    Ok(f) => f,
                    Err(e) => return (None, Err(e)),
                },
            };
            let r = file
                .write_all(&buf)
                .map_err(|e| SpoolError::io("write", &path, e));
            (Some(file), r)
        })
        .await
        .map_err(|e| SpoolError::other("write", &self.path, e))?;
        self.file = file;
        res
    }
}

impl MessageDraft for Draft {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.size += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
        if self.must_spill() {
            self.flush_buf().await?;
        }
        Ok(())
    }

    async fn commit(mut self, mut envelope: Envelope) -> Result<(), SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.size;
        let trailer = msgfile::trailer(&envelope)
            .map_err(|e| SpoolError::other("encode envelope", &self.path, e))?;
        let total = self.size + trailer.len() as u64;
        let journal = self.spool.journal.is_some() && total <= MAX_RECORD;
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&trailer);
        self.release();
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
