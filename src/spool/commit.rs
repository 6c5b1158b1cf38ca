//! Group commit and checkpoints.
//!
//! One committer thread takes every message that is ready at about the same moment as one
//! batch. Small messages go through the intake journal (`journal.rs`): one `pwrite` and one
//! `fdatasync` for the whole batch; then their queue files are written into `tmp/` and renamed
//! into `incoming/` without a flush (the journal holds them), the forwarder is woken and the
//! sessions get their answer. Large messages arrive already written and fdatasynced in
//! `tmp/`; they are renamed into `incoming/` and both directories are fsynced once per batch.
//!
//! A checkpoint thread retires sealed journal segments: it `fdatasync`s the queue files that
//! segment still owes (messages not yet delivered), fsyncs every state directory, then bumps
//! the segment's generation. Segments are sealed when full or 5 s after their first record.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{error, warn};

use super::durable::Moves;
use super::journal::Journal;
use super::recycle::{FREE_DIR, FreeFiles};
use super::{SpoolError, State, durable};

/// How long a journal segment takes records before it is sealed and checkpointed.
const CHECKPOINT_AGE: Duration = Duration::from_secs(5);

/// The checkpoint age in force: [`CHECKPOINT_AGE`], or, for tests only,
/// `POSTERN_TEST_CHECKPOINT_MS` (the power-cut tests in tests/it/powercut/ checkpoint every
/// few hundred milliseconds so that a short run crosses many checkpoints). Not a setting:
/// five seconds is how much acknowledged mail waits in the journal alone.
fn checkpoint_age() -> Duration {
    std::env::var("POSTERN_TEST_CHECKPOINT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(CHECKPOINT_AGE, Duration::from_millis)
}

/// What a session hands over at commit.
pub(super) enum Payload {
    /// A small message, only in memory so far: its whole queue file.
    Memory(Vec<u8>),
    /// Written to `tmp/<id>`; `journal` holds its bytes when it is small enough for the
    /// journal, otherwise the file is already fdatasynced.
    File { journal: Option<Vec<u8>> },
}

struct Request {
    id: String,
    payload: Payload,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Handle to the committer thread.
pub(super) struct Committer {
    tx: mpsc::Sender<Request>,
}

/// What the committer and checkpoint threads share.
struct Ctx {
    root: PathBuf,
    journal: Option<Arc<Journal>>,
    /// The move lock (see `durable::Moves`): a checkpoint opens the files it must flush with
    /// renames paused, so a message cannot slip between two directories unseen.
    moves: Arc<Moves>,
    new_tx: tokio::sync::mpsc::UnboundedSender<String>,
    /// Emptied queue files to write new ones over.
    free: Arc<FreeFiles>,
}

impl Committer {
    /// Start the committer (and, with a journal, the checkpoint) thread for the spool at `root`.
    pub(super) fn start(
        root: PathBuf,
        journal: Option<Arc<Journal>>,
        moves: Arc<Moves>,
        new_tx: tokio::sync::mpsc::UnboundedSender<String>,
        free: Arc<FreeFiles>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let (ckpt_tx, ckpt_rx) = mpsc::channel::<usize>();
        let ctx = Arc::new(Ctx {
            root,
            journal,
            moves,
            new_tx,
            free,
        });
        if ctx.journal.is_some() {
            let c = ctx.clone();
            std::thread::Builder::new()
                .name("spool-checkpoint".into())
                .spawn(move || checkpointer(&c, ckpt_rx))?;
        }
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || run(&ctx, rx, ckpt_tx))?;
        Ok(Self { tx })
    }

    /// Make a message durable and queue it in `incoming/`; returns once it may be acknowledged.
    pub(super) async fn commit(&self, id: String, payload: Payload) -> Result<(), SpoolError> {
        let (done, rx) = oneshot::channel();
        let gone = || SpoolError::other("commit", &PathBuf::from(&id), "spool committer stopped");
        self.tx
            .send(Request {
                id: id.clone(),
                payload,
                done,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn io_err(op: &'static str, path: &Path, e: &io::Error) -> SpoolError {
    SpoolError::io(op, path, io::Error::new(e.kind(), e.to_string()))
}

fn run(ctx: &Ctx, rx: mpsc::Receiver<Request>, ckpt_tx: mpsc::Sender<usize>) {
    let tmp = ctx.root.join("tmp");
    let incoming = ctx.root.join("incoming");
    // Journaled messages whose queue file could not be written yet (they are safe in the
    // journal; retried until it works, and recovered from the journal after a restart).
    let mut pending: VecDeque<(String, Payload)> = VecDeque::new();
    loop {
        let first = if pending.is_empty() {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut batch: Vec<Request> = first.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let (journaled, classic): (Vec<Request>, Vec<Request>) =
            batch.into_iter().partition(|r| match &r.payload {
                Payload::Memory(_) => true,
                Payload::File { journal } => journal.is_some(),
            });

        // 1. The journal: one write and one flush for every small message of the batch.
        //    Pooled files older than the ticket may be written over after that flush.
        let mut ticket = 0;
        let jres: Result<(), SpoolError> = match (&ctx.journal, journaled.is_empty()) {
            (_, true) => Ok(()),
            (None, false) => Err(SpoolError::other(
                "commit",
                &ctx.root,
                "this spool handle has no journal",
            )),
            (Some(j), false) => {
                ticket = ctx.free.ticket();
                let msgs: Vec<(&str, &[u8])> = journaled
                    .iter()
                    .map(|r| {
                        let bytes: &[u8] = match &r.payload {
                            Payload::Memory(b) => b,
                            Payload::File { journal } => journal.as_deref().unwrap_or_default(),
                        };
                        (r.id.as_str(), bytes)
                    })
                    .collect();
                match j.append(&msgs) {
                    Ok((files, sealed)) => {
                        for s in sealed {
                            let _ = ckpt_tx.send(s);
                        }
                        files
                            .iter()
                            .try_for_each(|f| f.sync_data())
                            .map_err(|e| io_err("fdatasync", &ctx.root.join("journal"), &e))
                    }
                    Err(e) => Err(io_err("write", &ctx.root.join("journal"), &e)),
                }
            }
        };

        // 2. Large messages: already flushed; rename, then fsync both directories once.
        let mut moved = Vec::with_capacity(classic.len());
        for req in classic {
            let (from, to) = (tmp.join(&req.id), incoming.join(&req.id));
            let r = {
                let _g = ctx.moves.read();
                durable::rename_unsynced(&from, &to)
            };
            match r {
                Ok(()) => moved.push(req),
                Err(e) => {
                    let _ = req.done.send(Err(SpoolError::io("rename", &from, e)));
                }
            }
        }
        if !moved.is_empty() {
            let synced = {
                // incoming/ is a claim source (see durable.rs)
                let paused = ctx.moves.write();
                ctx.moves
                    .flush_claims(&paused, &ctx.root.join(State::Active.dir()), false)
                    .and_then(|()| durable::fsync_dir(&incoming))
                    .map_err(|e| io_err("fsync", &incoming, &e))
            }
            .and_then(|()| durable::fsync_dir(&tmp).map_err(|e| io_err("fsync", &tmp, &e)));
            for req in moved {
                if let Err(e) = &synced {
                    // Not acknowledged, so take it back out of incoming/ if we still can; if
                    // that fails too, recovery will see a complete message (at-least-once).
                    let _ = durable::rename_unsynced(&incoming.join(&req.id), &tmp.join(&req.id));
                    let _ = req.done.send(Err(SpoolError::other("commit", &tmp, e)));
                } else {
                    let _ = req.done.send(Ok(()));
                    let _ = ctx.new_tx.send(req.id);
                }
            }
        }

        // 3. Make the journaled messages' queue files visible, then answer their sessions, so
        //    a queue id in a 250 can be looked up at once.
        for req in journaled {
            match &jres {
                Ok(()) => {
                    // Durable in the journal, so acknowledged even if the queue file has to
                    // wait for a retry.
                    if !make_visible(ctx, &tmp, &incoming, &req.id, &req.payload, ticket) {
                        pending.push_back((req.id.clone(), req.payload));
                    }
                    let _ = req.done.send(Ok(()));
                }
                Err(e) => {
                    if let Some(j) = &ctx.journal {
                        let _ = j.done(&req.id); // never acknowledged: recovery must not replay it
                    }
                    let _ = req
                        .done
                        .send(Err(SpoolError::other("commit", &ctx.root, e)));
                }
            }
        }
        let retry = std::mem::take(&mut pending);
        for (id, payload) in retry {
            // A retry writes a new file: the ticket of its batch has gone stale.
            if !make_visible(ctx, &tmp, &incoming, &id, &payload, 0) {
                pending.push_back((id, payload));
            }
        }
    }
}

/// Put a journaled message's queue file into `incoming/` (no flush: the journal holds it) and
/// wake the forwarder; false (logged) if that failed. A pooled file older than `ticket` may
/// be written over (see recycle.rs).
fn make_visible(
    ctx: &Ctx,
    tmp: &Path,
    incoming: &Path,
    id: &str,
    payload: &Payload,
    ticket: u64,
) -> bool {
    let (from, to) = (tmp.join(id), incoming.join(id));
    let r = {
        let _g = ctx.moves.read();
        match payload {
            Payload::Memory(bytes) => ctx
                .free
                .write_as(bytes, &from, &to, ticket)
                .map_err(|e| SpoolError::io("write", &to, e)),
            Payload::File { .. } => {
                durable::rename_unsynced(&from, &to).map_err(|e| SpoolError::io("rename", &from, e))
            }
        }
    };
    match r {
        Ok(()) => {
            if let Some(j) = &ctx.journal {
                j.materialized(id);
            }
            let _ = ctx.new_tx.send(id.to_string());
            true
        }
        Err(e) => {
            error!(id = %id, error = %e, "cannot write the queue file of an accepted message; it is safe in the journal, retrying");
            false
        }
    }
}

/// The checkpoint thread: retire sealed segments, and seal the active one once it is old.
fn checkpointer(ctx: &Ctx, rx: mpsc::Receiver<usize>) {
    let Some(journal) = &ctx.journal else { return };
    let age = checkpoint_age();
    let mut sealed: VecDeque<usize> = VecDeque::new();
    loop {
        let wait = if sealed.is_empty() {
            Duration::from_secs(1)
                .min(age / 2)
                .max(Duration::from_millis(10))
        } else {
            Duration::from_millis(50)
        };
        match rx.recv_timeout(wait) {
            Ok(s) => sealed.push_back(s),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(s) = rx.try_recv() {
            sealed.push_back(s);
        }
        match journal.rotate_if_older(age) {
            Ok(Some(s)) => sealed.push_back(s),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot seal the journal segment"),
        }
        while let Some(&s) = sealed.front() {
            match checkpoint(ctx, journal, s) {
                Ok(true) => {
                    sealed.pop_front();
                }
                Ok(false) => break, // a queue file is still being written; shortly
                Err(e) => {
                    warn!(error = %e, "journal checkpoint failed; will retry");
                    std::thread::sleep(Duration::from_secs(1));
                    break;
                }
            }
        }
    }
}

/// Make the messages a sealed segment still owes durable as queue files, then retire it.
/// `Ok(false)`: not yet (a queue file is still being written).
pub(super) fn checkpoint_segment(
    root: &Path,
    journal: &Journal,
    moves: &Moves,
    seg: usize,
) -> Result<bool, SpoolError> {
    let Some(ids) = journal.owed(seg) else {
        return Ok(false);
    };
    flush_queue_files(root, &ids, moves)?;
    journal
        .retire(seg, root)
        .map_err(|e| SpoolError::io("retire journal segment", &root.join("journal"), e))?;
    Ok(true)
}

/// fdatasync the queue files of `ids` wherever they are queued, then fsync every spool
/// directory: afterwards those messages no longer need the journal.
pub(super) fn flush_queue_files(
    root: &Path,
    ids: &[String],
    moves: &Moves,
) -> Result<(), SpoolError> {
    let files: Vec<File> = {
        // Opened while no rename of ours can move a file between two directories we look in.
        let _g = moves.write();
        ids.iter()
            .filter_map(|id| {
                State::QUEUED
                    .iter()
                    .find_map(|s| durable::open_existing(&root.join(s.dir()).join(id), false).ok())
            })
            .collect()
    };
    for f in &files {
        f.sync_data()
            .map_err(|e| SpoolError::io("fdatasync", root, e))?;
    }
    let fsync = |d: &Path| durable::fsync_dir(d).map_err(|e| SpoolError::io("fsync", d, e));
    {
        // active/ before the directories claims move messages out of (see durable.rs)
        let paused = moves.write();
        let active = root.join(State::Active.dir());
        moves
            .flush_claims(&paused, &active, true)
            .map_err(|e| SpoolError::io("fsync", &active, e))?;
        fsync(&root.join(State::Incoming.dir()))?;
        fsync(&root.join(State::Deferred.dir()))?;
    }
    for d in State::ALL
        .iter()
        .filter(|s| !matches!(s, State::Active | State::Incoming | State::Deferred))
        .map(|s| root.join(s.dir()))
        .chain([root.join(FREE_DIR)])
    {
        if d.is_dir() {
            fsync(&d)?;
        }
    }
    Ok(())
}

fn checkpoint(ctx: &Ctx, journal: &Journal, seg: usize) -> Result<bool, SpoolError> {
    checkpoint_segment(&ctx.root, journal, &ctx.moves, seg)
}
