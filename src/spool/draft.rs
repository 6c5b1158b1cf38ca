//! A message being received: bytes stream into `tmp/<id>` in bounded chunks; `commit` appends
//! the envelope, makes the file durable and moves it into `incoming/`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Envelope, Inner, SpoolError, durable, msgfile};
use crate::smtp::MessageDraft;

/// Bytes buffered in memory before they are written out (bounds RSS per connection).
const CHUNK: usize = 64 * 1024;

/// A message being received into `tmp/`.
pub struct Draft {
    pub(super) id: String,
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
    pub(super) buf: Vec<u8>,
    pub(super) size: u64,
    pub(super) spool: Arc<Inner>,
    pub(super) done: bool,
}

impl Draft {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn flush_buf(&mut self) -> Result<(), SpoolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(mut file) = self.file.take() else {
            return Err(SpoolError::other(
                "write",
                &self.path,
                "draft already closed",
            ));
        };
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let path = self.path.clone();
        let (file, res) = tokio::task::spawn_blocking(move || {
            let r = file.write_all(&buf);
            (file, r)
        })
        .await
        .map_err(|e| SpoolError::other("write", &path, e))?;
        self.file = Some(file);
        res.map_err(|e| SpoolError::io("write", &path, e))
    }
}

impl MessageDraft for Draft {
    fn id(&self) -> &str {
        &self.id
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.size += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= CHUNK {
            self.flush_buf().await?;
        }
        Ok(())
    }

    async fn commit(mut self, mut envelope: Envelope) -> Result<(), SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.size;
        let trailer = msgfile::trailer(&envelope)
            .map_err(|e| SpoolError::other("encode envelope", &self.path, e))?;
        let Some(mut file) = self.file.take() else {
            return Err(SpoolError::other(
                "commit",
                &self.path,
                "draft already closed",
            ));
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(&trailer);
        let path = self.path.clone();
        // Per message, in one trip to the blocking pool: the last bytes and the envelope, then
        // one fdatasync. Concurrent sessions' flushes overlap on the blocking pool.
        tokio::task::spawn_blocking(move || -> Result<(), SpoolError> {
            file.write_all(&buf)
                .map_err(|e| SpoolError::io("write", &path, e))?;
            file.sync_data()
                .map_err(|e| SpoolError::io("fsync", &path, e))
        })
        .await
        .map_err(|e| SpoolError::other("commit", &self.path, e))??;
        // The rename into incoming/ and the fsync of incoming/ and tmp/ are shared by every
        // message committed at about the same time (group commit).
        self.spool.committer.commit(self.id.clone()).await?;
        self.done = true;
        self.spool.notify_new(&self.id);
        Ok(())
    }

    async fn discard(mut self) {
        self.done = true;
        self.file = None;
        let path = self.path.clone();
        let _ = tokio::task::spawn_blocking(move || durable::remove_file(&path)).await;
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.done {
            // Never acknowledged: leave nothing behind (start-up wipes tmp/ too, after a crash).
            self.file = None;
            let _ = durable::remove_file(&self.path);
        }
    }
}
