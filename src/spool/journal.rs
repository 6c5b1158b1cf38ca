//! The intake journal: how a small message becomes durable with one shared flush.
//!
//! Making a new queue file durable the POSIX way takes three flushes in a row (the file's
//! data, the directory it is renamed into, the directory it left), and a client waits for all
//! three before its `250`. The journal is a write-ahead log instead, like a database's: the
//! committer appends every message of a batch (its whole queue file: body and envelope) to a
//! preallocated segment file with one `pwrite` and makes the batch durable with **one
//! `fdatasync`**. The segment's blocks were written and synced when it was created, so that
//! flush carries no metadata. Only then is the `250` sent; the queue file itself is written
//! into `tmp/` and renamed into `incoming/` without any flush.
//!
//! A **checkpoint** later makes the queue files of a segment durable the ordinary way
//! (`fdatasync` each message still queued, then fsync every state directory) and retires the
//! segment by bumping its generation. Mail that was delivered before the checkpoint is never
//! flushed at all: its queue file is gone, and a *done* record says so.
//!
//! Start-up recovery reads every segment that is not retired. A message record that is not
//! done and not deleted by the admin (`deleted/<id>` tombstones) must exist as a queue file
//! whose first bytes equal the record; when it is missing or damaged (a power loss ate the
//! unflushed file), it is written again from the journal into `incoming/`.
//!
//! Segment layout (little-endian):
//! ```text
//! header (4096 bytes): "PSTNJRN1" | generation u64 | crc32 of the 16 bytes before it
//! record:  magic u32 | kind u8 | id length u8 | 0 u16 | payload length u32 | generation u64
//!          | crc32 of everything in the record except this field | id | payload
//! ```
//! Records are written in order by one writer at a time and each batch is flushed before the
//! next one is written, so a scan stops at the first record that is torn or belongs to an older
//! generation: nothing acknowledged can lie beyond it.
//!
//! Messages larger than [`MAX_RECORD`] skip the journal: their queue file is flushed and
//! renamed the POSIX way (they are rare, and their data flush dominates anyway).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::durable;

/// Size of one segment file.
pub(super) const SEGMENT_SIZE: u64 = 32 << 20;
/// Largest queue file that goes through the journal.
pub(super) const MAX_RECORD: u64 = 1 << 20;
/// Room kept at the end of a segment for done records.
const DONE_RESERVE: u64 = 1 << 20;
const HEADER_LEN: u64 = 4096;
const HEADER_MAGIC: &[u8; 8] = b"PSTNJRN1";
const REC_MAGIC: u32 = u32::from_le_bytes(*b"PJR1");
const REC_HEAD: usize = 24;
const KIND_MESSAGE: u8 = 1;
const KIND_DONE: u8 = 2;

/// A message record found by a start-up scan.
#[derive(Debug, Clone)]
pub(super) struct Found {
    /// Queue id.
    pub id: String,
    seg: usize,
    offset: u64,
    len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Retired: its records are history.
    Free,
    /// Taking new records.
    Active,
    /// Full or rotated; waiting for its checkpoint.
    Sealed,
}

struct Segment {
    file: Arc<File>,
    generation: u64,
    status: Status,
}

struct JState {
    segs: Vec<Segment>,
    active: usize,
    /// Write offset in the active segment.
    used: u64,
    /// When the active segment got its first record.
    first_record: Option<Instant>,
    /// Ids whose message record is in an unretired segment and not done: id → segment.
    live: HashMap<String, usize>,
    /// Journaled ids whose queue file is not yet in `incoming/` (a checkpoint must wait).
    unmaterialized: HashSet<String>,
    /// False until `reset` ran: records of a previous run may still be owed.
    ready: bool,
    /// Segments that got done records since the committer's last flush: the next batch
    /// flushes them too (see [`Journal::done`]).
    dirty: Vec<usize>,
}

/// The journal of one spool (owned by the daemon's spool only).
pub(super) struct Journal {
    dir: PathBuf,
    st: Mutex<JState>,
}

/// Path of the tombstone directory (`queue delete` writes one per deleted id).
pub(super) fn tombstone_dir(spool_root: &Path) -> PathBuf {
    spool_root.join("journal").join("deleted")
}

/// Record durably that `id` was deleted by the admin, so recovery never brings it back from
/// the journal. A no-op when the spool has no journal (yet).
pub(super) fn tombstone(spool_root: &Path, id: &str) -> io::Result<()> {
    let dir = tombstone_dir(spool_root);
    if !dir.is_dir() {
        return Ok(());
    }
    let p = dir.join(id);
    match durable::write_new_synced(&p, b"") {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    durable::fsync_dir(&dir)
}

/// A generation newer than `old` and than any a previous life of the file could have used
/// (time-based, so a segment whose header was torn still gets a fresh one).
fn next_generation(old: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    now.max(old + 1)
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn header_bytes(generation: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(HEADER_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let c = crc(&[&h[..16]]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    h
}

fn read_header(file: &File) -> Option<u64> {
    let mut h = [0u8; 20];
    file.read_exact_at(&mut h, 0).ok()?;
    if &h[..8] != HEADER_MAGIC || crc(&[&h[..16]]).to_le_bytes() != h[16..20] {
        return None;
    }
    Some(u64::from_le_bytes(h[8..16].try_into().ok()?))
}

/// Append one encoded record to `out`.
fn encode(out: &mut Vec<u8>, kind: u8, generation: u64, id: &str, payload: &[u8]) {
    let mut head = [0u8; REC_HEAD];
    head[..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    head[4] = kind;
    head[5] = id.len() as u8;
    head[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[12..20].copy_from_slice(&generation.to_le_bytes());
    let c = crc(&[&head[..20], id.as_bytes(), payload]);
    head[20..24].copy_from_slice(&c.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(payload);
}

fn record_len(id: &str, payload: usize) -> u64 {
    (REC_HEAD + id.len() + payload) as u64
}

/// Create a segment: zero-filled to its full size and synced, so later overwrites are pure
/// data and an `fdatasync` of them writes no metadata.
fn create_segment(path: &Path, generation: u64) -> io::Result<File> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(durable::FILE_MODE)
        .custom_flags(durable::OPEN_FLAGS)
        .open(&tmp)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < SEGMENT_SIZE {
        file.write_all_at(&zeros, off)?;
        off += zeros.len() as u64;
    }
    file.write_all_at(&header_bytes(generation), 0)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        durable::fsync_dir(dir)?;
    }
    Ok(file)
}

fn open_segment(path: &Path) -> io::Result<File> {
    durable::open_existing(path, true)
}

impl Journal {
    /// Open the journal under `<spool_root>/journal`, creating it (two segments) if needed.
    pub(super) fn open(spool_root: &Path) -> io::Result<Self> {
        let dir = spool_root.join("journal");
        durable::create_dir_durable(&dir)?;
        durable::create_dir_durable(&tombstone_dir(spool_root))?;
        let mut names: Vec<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        names.sort();
        let mut segs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            // Segments are numbered 0000, 0001, ... without gaps; a gap means a crash while
            // creating one, and the numbering restarts there.
            if *name != format!("{i:04}") {
                break;
            }
            let path = dir.join(name);
            let file = open_segment(&path)?;
            if file.metadata()?.len() != SEGMENT_SIZE {
                break;
            }
            // A header that does not parse was torn while a checkpoint retired the segment:
            // its records were already checkpointed, so it is free (generation 0).
            let generation = read_header(&file).unwrap_or(0);
            segs.push(Segment {
                file: Arc::new(file),
                generation,
                status: Status::Sealed,
            });
        }
        let fresh = segs.is_empty();
        let j = Self {
            dir,
            st: Mutex::new(JState {
                segs,
                active: 0,
                used: HEADER_LEN,
                first_record: None,
                live: HashMap::new(),
                unmaterialized: HashSet::new(),
                ready: false,
                dirty: Vec::new(),
            }),
        };
        if fresh {
            j.reset(spool_root)?;
        }
        Ok(j)
    }

    fn lock(&self) -> MutexGuard<'_, JState> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every message record in unretired segments that is still owed (not done and not
    /// deleted by the admin), and the ids with a done record: delivered messages whose
    /// removal from the queue may not have reached the disk. (Start-up only, before anything
    /// is appended.)
    pub(super) fn scan(&self, spool_root: &Path) -> io::Result<(Vec<Found>, HashSet<String>)> {
        let st = self.lock();
        let mut found: Vec<Found> = Vec::new();
        let mut done: HashSet<String> = HashSet::new();
        for (seg, s) in st.segs.iter().enumerate() {
            let mut off = HEADER_LEN;
            let mut head = [0u8; REC_HEAD];
            while off + REC_HEAD as u64 <= SEGMENT_SIZE {
                if s.file.read_exact_at(&mut head, off).is_err() {
                    break;
                }
                let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let kind = head[4];
                let id_len = head[5] as usize;
                let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
                let generation = u64::from_le_bytes(head[12..20].try_into().unwrap_or([0; 8]));
                let total = record_len("", 0) + id_len as u64 + u64::from(len);
                if magic != REC_MAGIC
                    || generation != s.generation
                    || !matches!(kind, KIND_MESSAGE | KIND_DONE)
                    || id_len == 0
                    || u64::from(len) > MAX_RECORD
                    || off + total > SEGMENT_SIZE
                {
                    break;
                }
                let mut body = vec![0u8; id_len + len as usize];
                s.file.read_exact_at(&mut body, off + REC_HEAD as u64)?;
                if crc(&[&head[..20], &body]).to_le_bytes() != head[20..24] {
                    break; // torn: the end of what was flushed
                }
                let id = String::from_utf8_lossy(&body[..id_len]).into_owned();
                if kind == KIND_MESSAGE {
                    found.push(Found {
                        id,
                        seg,
                        offset: off + (REC_HEAD + id_len) as u64,
                        len,
                    });
                } else {
                    done.insert(id);
                }
                off += total;
            }
        }
        let deleted: HashSet<String> = fs::read_dir(tombstone_dir(spool_root))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        found.retain(|f| !done.contains(&f.id) && !deleted.contains(&f.id));
        // The newest record of an id wins (an id is written once, but be safe).
        let mut seen = HashSet::new();
        found.reverse();
        found.retain(|f| seen.insert(f.id.clone()));
        found.reverse();
        Ok((found, done))
    }

    /// The payload (queue file bytes) of a scanned record.
    pub(super) fn read(&self, f: &Found) -> io::Result<Vec<u8>> {
        let file = self.lock().segs[f.seg].file.clone();
        let mut buf = vec![0u8; f.len as usize];
        file.read_exact_at(&mut buf, f.offset)?;
        Ok(buf)
    }

    /// After recovery made every owed message durable as a queue file: retire every segment,
    /// make sure two exist, start writing into the first, and clear the tombstones.
    pub(super) fn reset(&self, spool_root: &Path) -> io::Result<()> {
        let mut st = self.lock();
        for s in st.segs.iter_mut() {
            s.generation = next_generation(s.generation);
            s.file.write_all_at(&header_bytes(s.generation), 0)?;
            s.file.sync_data()?;
            s.status = Status::Free;
        }
        while st.segs.len() < 2 {
            self.add_segment(&mut st)?;
        }
        st.segs[0].status = Status::Active;
        st.active = 0;
        st.used = HEADER_LEN;
        st.first_record = None;
        st.live.clear();
        st.unmaterialized.clear();
        st.dirty.clear();
        st.ready = true;
        drop(st);
        clear_tombstones(spool_root, |_| true)
    }

    /// Create the next segment file, free; returns its index.
    fn add_segment(&self, st: &mut JState) -> io::Result<usize> {
        let n = st.segs.len();
        let generation = next_generation(0);
        let file = create_segment(&self.dir.join(format!("{n:04}")), generation)?;
        st.segs.push(Segment {
            file: Arc::new(file),
            generation,
            status: Status::Free,
        });
        Ok(n)
    }

    /// Seal the active segment and switch to a free one (creating one if none is free).
    /// Returns the sealed segment, which now needs a checkpoint.
    fn rotate(&self, st: &mut JState) -> io::Result<usize> {
        let next = match st.segs.iter().position(|s| s.status == Status::Free) {
            Some(i) => i,
            None => self.add_segment(st)?,
        };
        let old = st.active;
        st.segs[old].status = Status::Sealed;
        st.segs[next].status = Status::Active;
        st.active = next;
        st.used = HEADER_LEN;
        st.first_record = None;
        Ok(old)
    }

    /// Append message records (id, queue file bytes) in order. Returns the segment files to
    /// `fdatasync` before any of them is acknowledged, and the segments sealed on the way
    /// (they need a checkpoint).
    pub(super) fn append(
        &self,
        msgs: &[(&str, &[u8])],
    ) -> io::Result<(Vec<Arc<File>>, Vec<usize>)> {
        let mut st = self.lock();
        if !st.ready {
            return Err(io::Error::other(
                "the journal holds records of a previous run; run spool recovery first",
            ));
        }
        // Done records written since the last batch are flushed with this one.
        let dirty = std::mem::take(&mut st.dirty);
        let mut to_sync: Vec<Arc<File>> = dirty.iter().map(|&s| st.segs[s].file.clone()).collect();
        let mut sealed = Vec::new();
        let mut buf = Vec::new();
        let mut start = st.used;
        let mut ids: Vec<&str> = Vec::new();
        let limit = SEGMENT_SIZE - DONE_RESERVE;
        for (id, bytes) in msgs {
            let need = record_len(id, bytes.len());
            if start + buf.len() as u64 + need > limit {
                // Write what fits, then continue in a fresh segment.
                self.write_out(&mut st, &mut buf, start, &mut ids, &mut to_sync)?;
                sealed.push(self.rotate(&mut st)?);
                start = st.used;
            }
            let generation = st.segs[st.active].generation;
            encode(&mut buf, KIND_MESSAGE, generation, id, bytes);
            ids.push(id);
        }
        self.write_out(&mut st, &mut buf, start, &mut ids, &mut to_sync)?;
        Ok((to_sync, sealed))
    }

    fn write_out(
        &self,
        st: &mut JState,
        buf: &mut Vec<u8>,
        start: u64,
        ids: &mut Vec<&str>,
        to_sync: &mut Vec<Arc<File>>,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = st.active;
        let file = st.segs[seg].file.clone();
        file.write_all_at(buf, start)?;
        st.used = start + buf.len() as u64;
        st.first_record.get_or_insert_with(Instant::now);
        for id in ids.drain(..) {
            st.live.insert(id.to_string(), seg);
            st.unmaterialized.insert(id.to_string());
        }
        if !to_sync.iter().any(|f| Arc::ptr_eq(f, &file)) {
            to_sync.push(file);
        }
        buf.clear();
        Ok(())
    }

    /// The queue file of `id` is now in `incoming/`.
    pub(super) fn materialized(&self, id: &str) {
        self.lock().unmaterialized.remove(id);
    }

    /// A message left the queue (delivered): note it so recovery neither replays its record
    /// nor delivers again a queue file of it that a crash brought back. Not flushed here: the
    /// next batch's flush carries it (the segment is marked dirty), and a crash before that
    /// only resends the message, which at-least-once delivery allows. Returns whether a done
    /// record was written (only for messages with a record in an unretired segment): only
    /// then may the queue file be recycled (see `recycle.rs`).
    pub(super) fn done(&self, id: &str) -> bool {
        let mut st = self.lock();
        if st.live.remove(id).is_none() {
            return false;
        }
        st.unmaterialized.remove(id);
        let need = record_len(id, 0);
        if st.used + need > SEGMENT_SIZE {
            return false;
        }
        let mut buf = Vec::with_capacity(need as usize);
        let seg = st.active;
        encode(&mut buf, KIND_DONE, st.segs[seg].generation, id, b"");
        if st.segs[seg].file.write_all_at(&buf, st.used).is_err() {
            return false;
        }
        st.used += need;
        if !st.dirty.contains(&seg) {
            st.dirty.push(seg);
        }
        true
    }

    /// Seal the active segment if its first record is older than `age` (so a quiet spool
    /// still gets checkpointed). Returns the sealed segment.
    pub(super) fn rotate_if_older(&self, age: std::time::Duration) -> io::Result<Option<usize>> {
        let mut st = self.lock();
        match st.first_record {
            Some(t) if t.elapsed() >= age => self.rotate(&mut st).map(Some),
            _ => Ok(None),
        }
    }

    /// Seal the active segment if it holds records, and list every sealed segment (shutdown).
    pub(super) fn seal_all(&self) -> io::Result<Vec<usize>> {
        let mut st = self.lock();
        if !st.ready {
            return Ok(Vec::new()); // records of a previous run wait for recovery
        }
        if st.first_record.is_some() {
            self.rotate(&mut st)?;
        }
        Ok((0..st.segs.len())
            .filter(|i| st.segs[*i].status == Status::Sealed)
            .collect())
    }

    /// Ids still owed by a sealed segment, or `None` while one of them is not yet in
    /// `incoming/` (try the checkpoint again shortly).
    pub(super) fn owed(&self, seg: usize) -> Option<Vec<String>> {
        let st = self.lock();
        let ids: Vec<String> = st
            .live
            .iter()
            .filter(|(_, s)| **s == seg)
            .map(|(id, _)| id.clone())
            .collect();
        if ids.iter().any(|id| st.unmaterialized.contains(id)) {
            return None;
        }
        Some(ids)
    }

    /// Retire a sealed segment whose owed messages are durable as queue files. A no-op for a
    /// segment that is not sealed (retired already by a concurrent checkpoint, maybe reused).
    pub(super) fn retire(&self, seg: usize, spool_root: &Path) -> io::Result<()> {
        let (file, generation) = {
            let st = self.lock();
            let s = &st.segs[seg];
            if s.status != Status::Sealed {
                return Ok(());
            }
            (s.file.clone(), next_generation(s.generation))
        };
        file.write_all_at(&header_bytes(generation), 0)?;
        file.sync_data()?;
        let mut st = self.lock();
        if st.segs[seg].status != Status::Sealed {
            return Ok(());
        }
        st.segs[seg].generation = generation;
        st.segs[seg].status = Status::Free;
        st.live.retain(|_, s| *s != seg);
        let live: HashSet<String> = st.live.keys().cloned().collect();
        drop(st);
        // A tombstone is needed only while its id has a record in an unretired segment; one
        // left behind costs nothing and goes at the next start.
        if let Err(e) = clear_tombstones(spool_root, |id| !live.contains(id)) {
            tracing::warn!(error = %e, "cannot clear journal tombstones");
        }
        Ok(())
    }
}

fn clear_tombstones(spool_root: &Path, remove: impl Fn(&str) -> bool) -> io::Result<()> {
    let dir = tombstone_dir(spool_root);
    for e in fs::read_dir(&dir)? {
        let e = e?;
        if let Some(name) = e.file_name().to_str()
            && remove(name)
        {
            durable::remove_file(&e.path())?;
        }
    }
    Ok(())
}
