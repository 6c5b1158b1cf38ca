//! The recorded operation log, a model of the file system it describes, and the crash states
//! a power cut could leave at any point of it.
//!
//! **Persistence model** (POSIX's worst case, with one concession every journaling file
//! system makes: a single metadata operation is atomic):
//! - A write that no later `fsync`/`fdatasync` of its file covers may be lost, in whole or in
//!   any of its 512-byte sectors, independently of every other write; a write that extends the
//!   file may leave the new size without the data (the gap reads as zeroes). `ftruncate` is
//!   lost or kept on its own. `sync_file_range` is no barrier.
//! - A directory entry operation (create, mkdir, unlink, link, rename) that no later fsync of
//!   its directory covers may be lost, independently of every other operation and of the
//!   file's data: a rename may survive while the renamed file's unsynced data does not. A
//!   rename is one operation (it lands whole or not at all) until one of its two directories
//!   is fsynced, which makes that side durable on its own.
//! - Nothing else is ordered: a later unsynced operation may survive an earlier lost one.
//!
//! ext4 with `data=ordered` is kinder (metadata commits in order through its journal, and
//! newly allocated blocks are written before the metadata that points at them), but it
//! overwrites already allocated blocks (recycled queue files, journal segments) in place
//! with no ordering at all, and other file systems promise less. The target is what POSIX
//! permits, so the model allows every combination above.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Sector size: the unit in which an unsynced write may be torn.
pub const SECTOR: u64 = 512;
const PAGE: u64 = 4096;
static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];

fn is_zero(b: &[u8]) -> bool {
    b == &ZERO[..b.len()]
}

/// One record of the log, as the shim wrote it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub op: char,
    /// Process id (several processes share the log).
    pub pid: u32,
    pub comm: String,
    /// Inode number (0 where the op has none).
    pub ino: u64,
    /// Path, or "from\tto" for renames and links; the id for `A`; the text for `M`.
    pub arg: String,
    pub off: u64,
    pub len: u64,
    pub data: Option<Arc<[u8]>>,
}

/// Parse the shim's log (see tests/powercut/shim.c for the format).
pub fn parse(raw: &[u8]) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let nl = raw[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| i + p)
            .unwrap_or_else(|| panic!("log ends in a torn record at byte {i}"));
        let line = String::from_utf8_lossy(&raw[i..nl]).into_owned();
        i = nl + 1;
        let mut f = line.splitn(4, ' ');
        let op = f.next().unwrap().chars().next().unwrap();
        let pid: u32 = f.next().unwrap().parse().unwrap();
        let comm = f.next().unwrap().to_string();
        let rest = f.next().unwrap_or("").to_string();
        let mut r = Rec {
            op,
            pid,
            comm,
            ino: 0,
            arg: String::new(),
            off: 0,
            len: 0,
            data: None,
        };
        let num = |s: &str| -> u64 {
            s.parse()
                .unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}"))
        };
        match op {
            'A' | 'M' => r.arg = rest,
            'Y' => {}
            'C' | 'D' | 'R' | 'U' | 'X' | 'L' => {
                let (ino, path) = rest.split_once(' ').unwrap();
                r.ino = num(ino);
                r.arg = path.to_string();
            }
            'F' | 'Q' => r.ino = num(&rest),
            'T' => {
                let (ino, len) = rest.split_once(' ').unwrap();
                r.ino = num(ino);
                r.len = num(len);
            }
            'W' | 'Z' | 'K' => {
                let v: Vec<&str> = rest.split(' ').collect();
                r.ino = num(v[0]);
                r.off = num(v[1]);
                r.len = num(v[2]);
                if op == 'W' {
                    let end = i + r.len as usize;
                    r.data = Some(Arc::from(&raw[i..end]));
                    i = end;
                }
            }
            _ => panic!("unknown log record {line:?}"),
        }
        out.push(r);
    }
    out
}

/// An operation on the model, resolved from a record.
#[derive(Debug, Clone)]
pub enum MOp {
    /// Not a file-system change inside the spool (acks, marks, other directories).
    Nothing,
    Write {
        node: usize,
        off: u64,
        len: u64,
        data: Option<Arc<[u8]>>,
    },
    Trunc {
        node: usize,
        len: u64,
    },
    /// Create, mkdir, link (target Some) or unlink, rmdir (None) of `name` in `dir`.
    Entry {
        dir: usize,
        name: String,
        target: Option<usize>,
    },
    Rename {
        sdir: usize,
        sname: String,
        ddir: usize,
        dname: String,
        node: usize,
    },
    /// fsync/fdatasync of a file or directory.
    Barrier(usize),
    SyncAll,
}

/// The resolved log.
pub struct Log {
    pub recs: Vec<Rec>,
    pub ops: Vec<MOp>,
    /// For each op: the index of the first barrier that makes it durable (for renames: the
    /// destination side), or usize::MAX.
    pub durable_at: Vec<usize>,
    /// For renames: the index of the first barrier of the source directory.
    pub src_durable_at: Vec<usize>,
    /// Path (relative to the spool) each op touched, for classification.
    pub paths: Vec<String>,
    pub initial: Fs,
    root_node: usize,
    spool_abs: String,
    dir_nodes: HashSet<usize>,
}

/// A file's bytes, sparse (absent pages read as zeroes).
#[derive(Clone, Default)]
pub struct FileData {
    pub size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
}

impl FileData {
    fn write(&mut self, off: u64, data: Option<&[u8]>, len: u64) {
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let pg = pos / PAGE;
            let in_pg = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            match data {
                Some(d) => {
                    let src = &d[(pos - off) as usize..(pos - off) as usize + n];
                    let page = self
                        .pages
                        .entry(pg)
                        .or_insert_with(|| Box::new([0u8; PAGE as usize]));
                    page[in_pg..in_pg + n].copy_from_slice(src);
                }
                None => {
                    if n == PAGE as usize {
                        self.pages.remove(&pg);
                    } else if let Some(page) = self.pages.get_mut(&pg) {
                        page[in_pg..in_pg + n].fill(0);
                    }
                }
            }
            pos += n as u64;
        }
    }

    fn set_len(&mut self, len: u64) {
        if len < self.size {
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if !len.is_multiple_of(PAGE)
                && let Some(page) = self.pages.get_mut(&(len / PAGE))
            {
                page[(len % PAGE) as usize..].fill(0);
            }
        }
        self.size = len;
    }

    /// The whole content (for small files and comparisons).
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        for (&p, page) in &self.pages {
            let start = (p * PAGE) as usize;
            if start >= v.len() {
                break;
            }
            let n = (v.len() - start).min(PAGE as usize);
            v[start..start + n].copy_from_slice(&page[..n]);
        }
        v
    }

    fn hash_into(&self, h: &mut impl Hasher) {
        self.size.hash(h);
        for (&p, page) in &self.pages {
            if p * PAGE < self.size && !is_zero(&page[..]) {
                p.hash(h);
                crc32fast::hash(&page[..]).hash(h);
            }
        }
    }

    fn materialize(&self, path: &Path) -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        for (&p, page) in &self.pages {
            let start = p * PAGE;
            if start >= self.size {
                break;
            }
            let n = (self.size - start).min(PAGE) as usize;
            if !is_zero(&page[..n]) {
                f.write_all_at(&page[..n], start)?;
            }
        }
        f.set_len(self.size)
    }
}

/// A file-system state: directories and files by node.
#[derive(Clone, Default)]
pub struct Fs {
    pub dirs: HashMap<usize, BTreeMap<String, usize>>,
    pub files: HashMap<usize, FileData>,
}

impl Fs {
    /// Visible files under `dir`, as relative paths, sorted.
    pub fn walk(&self, dir: usize) -> Vec<(String, usize, bool)> {
        let mut out = Vec::new();
        self.walk_into(dir, "", &mut out, &mut HashSet::new());
        out
    }

    fn walk_into(
        &self,
        dir: usize,
        prefix: &str,
        out: &mut Vec<(String, usize, bool)>,
        seen: &mut HashSet<usize>,
    ) {
        if !seen.insert(dir) {
            return;
        }
        let Some(entries) = self.dirs.get(&dir) else {
            return;
        };
        for (name, &node) in entries {
            let p = format!("{prefix}{name}");
            let is_dir = self.dirs.contains_key(&node);
            out.push((p.clone(), node, is_dir));
            if is_dir {
                self.walk_into(node, &format!("{p}/"), out, seen);
            }
        }
    }

    /// A hash of everything visible under `dir`.
    pub fn hash(&self, dir: Option<usize>) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        if let Some(dir) = dir {
            for (p, node, is_dir) in self.walk(dir) {
                p.hash(&mut h);
                is_dir.hash(&mut h);
                if let Some(f) = self.files.get(&node) {
                    f.hash_into(&mut h);
                }
            }
        }
        h.finish()
    }

    /// Write everything visible under `dir` into `to` (which must not exist).
    pub fn materialize(&self, dir: Option<usize>, to: &Path) -> std::io::Result<()> {
        let mk = |p: &Path| {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(false)
                .create(p)
        };
        mk(to)?;
        let Some(dir) = dir else { return Ok(()) };
        for (p, node, is_dir) in self.walk(dir) {
            let path = to.join(&p);
            if is_dir {
                mk(&path)?;
            } else if let Some(f) = self.files.get(&node) {
                f.materialize(&path)?;
            } else {
                // a name whose inode the model never saw written: an empty file
                std::fs::File::create(&path)?.flush()?;
            }
        }
        Ok(())
    }

    /// Read a directory tree from disk (everything taken as durable).
    fn load(&mut self, dir: usize, path: &Path, next: &mut usize, inos: &mut HashMap<u64, usize>) {
        use std::os::unix::fs::MetadataExt;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(path).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let md = e.metadata().unwrap();
            let node = *next;
            *next += 1;
            inos.insert(md.ino(), node);
            if md.is_dir() {
                self.dirs.insert(node, BTreeMap::new());
                self.load(node, &e.path(), next, inos);
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                let mut f = FileData::default();
                // sparse: only nonzero pages
                for (i, chunk) in bytes.chunks(PAGE as usize).enumerate() {
                    if !is_zero(chunk) {
                        f.write(i as u64 * PAGE, Some(chunk), chunk.len() as u64);
                    }
                }
                f.size = bytes.len() as u64;
                self.files.insert(node, f);
            }
            entries.insert(name, node);
        }
        self.dirs.insert(dir, entries);
    }
}

/// The file system under a root directory before a recorded run: `root` itself and, if it
/// exists, `root/spool` with everything in it (taken as durable).
pub struct Snapshot {
    fs: Fs,
    next: usize,
    inos: HashMap<u64, usize>,
}

impl Snapshot {
    /// Read `root` now, before the run that the log will record starts.
    pub fn take(root: &Path) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        let mut fs = Fs::default();
        let mut next = 1usize;
        fs.dirs.insert(0, BTreeMap::new());
        let mut inos: HashMap<u64, usize> = HashMap::new();
        inos.insert(std::fs::metadata(root).unwrap().ino(), 0);
        let sp = root.join("spool");
        if sp.is_dir() {
            let node = next;
            next += 1;
            inos.insert(std::fs::metadata(&sp).unwrap().ino(), node);
            fs.dirs.insert(node, BTreeMap::new());
            fs.load(node, &sp, &mut next, &mut inos);
            fs.dirs.get_mut(&0).unwrap().insert("spool".into(), node);
        }
        Snapshot { fs, next, inos }
    }
}

impl Log {
    /// Resolve `recs`, recorded under `root`, against the file system `snap` saw before the
    /// run. Only `<root>/spool` is modelled; everything else under `root` is the upstream's
    /// and shows up as records only.
    pub fn resolve(recs: Vec<Rec>, root: &Path, snap: Snapshot) -> Log {
        let root_abs = root.to_string_lossy().into_owned();
        let spool_abs = format!("{root_abs}/spool");
        let Snapshot { fs, mut next, inos } = snap;
        let root_node = 0usize;
        let initial = fs.clone();
        // Live namespace while resolving: absolute path -> node.
        let mut names: HashMap<String, usize> = HashMap::new();
        names.insert(root_abs.clone(), root_node);
        for (p, node, _) in initial.walk(root_node) {
            names.insert(format!("{root_abs}/{p}"), node);
        }
        let modelled = |p: &str| p == spool_abs || p.starts_with(&format!("{spool_abs}/"));
        let split = |p: &str| -> (String, String) {
            let (d, n) = p.rsplit_once('/').unwrap();
            (d.to_string(), n.to_string())
        };
        let rel = |p: &str| {
            p.strip_prefix(&format!("{spool_abs}/"))
                .unwrap_or("")
                .to_string()
        };
        // Inodes outside the model (the upstream's files) map to None.
        let mut ino_node: HashMap<u64, Option<usize>> =
            inos.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let mut node_path: HashMap<usize, String> = HashMap::new();
        for (p, &n) in &names {
            node_path.insert(n, p.clone());
        }
        let mut dir_nodes: HashSet<usize> = initial.dirs.keys().copied().collect();
        let mut ops = Vec::with_capacity(recs.len());
        let mut paths = Vec::with_capacity(recs.len());
        for r in &recs {
            let fd_node = |ino: u64| -> Option<usize> {
                match ino_node.get(&ino) {
                    Some(n) => *n,
                    None => panic!(
                        "the shim saw an operation on inode {ino} that it never saw created or opened: {r:?}"
                    ),
                }
            };
            let (op, path) = match r.op {
                'C' | 'D' => {
                    if modelled(&r.arg) {
                        let node = next;
                        next += 1;
                        ino_node.insert(r.ino, Some(node));
                        let (d, n) = split(&r.arg);
                        let dir = names[&d];
                        names.insert(r.arg.clone(), node);
                        node_path.insert(node, r.arg.clone());
                        if r.op == 'D' {
                            dir_nodes.insert(node);
                        }
                        (
                            MOp::Entry {
                                dir,
                                name: n,
                                target: Some(node),
                            },
                            rel(&r.arg),
                        )
                    } else {
                        ino_node.insert(r.ino, None);
                        (MOp::Nothing, String::new())
                    }
                }
                'W' | 'Z' => match fd_node(r.ino) {
                    Some(node) => (
                        MOp::Write {
                            node,
                            off: r.off,
                            len: r.len,
                            data: r.data.clone(),
                        },
                        rel(node_path.get(&node).map(String::as_str).unwrap_or("")),
                    ),
                    None => (MOp::Nothing, String::new()),
                },
                'K' => match fd_node(r.ino) {
                    Some(_) => panic!("fallocate on a spool file is outside the model: {r:?}"),
                    None => (MOp::Nothing, String::new()),
                },
                'T' => match fd_node(r.ino) {
                    Some(node) => (
                        MOp::Trunc { node, len: r.len },
                        rel(node_path.get(&node).map(String::as_str).unwrap_or("")),
                    ),
                    None => (MOp::Nothing, String::new()),
                },
                'F' => match fd_node(r.ino) {
                    Some(node) => (
                        MOp::Barrier(node),
                        rel(node_path.get(&node).map(String::as_str).unwrap_or("")),
                    ),
                    None => (MOp::Nothing, String::new()),
                },
                'Y' => (MOp::SyncAll, String::new()),
                'U' | 'X' => {
                    if modelled(&r.arg) {
                        let (d, n) = split(&r.arg);
                        let node = names.remove(&r.arg);
                        let _ = node;
                        (
                            MOp::Entry {
                                dir: names[&d],
                                name: n,
                                target: None,
                            },
                            rel(&r.arg),
                        )
                    } else {
                        (MOp::Nothing, String::new())
                    }
                }
                'R' | 'L' => {
                    let (from, to) = r.arg.split_once('\t').unwrap();
                    match (modelled(from), modelled(to)) {
                        (true, true) => {
                            let node = names[from];
                            let (sd, sn) = split(from);
                            let (dd, dn) = split(to);
                            let (sdir, ddir) = (names[&sd], names[&dd]);
                            if r.op == 'R' {
                                // a renamed directory takes its children's paths along
                                let moved: Vec<(String, usize)> = names
                                    .iter()
                                    .filter(|(p, _)| p.starts_with(&format!("{from}/")))
                                    .map(|(p, n)| (p.clone(), *n))
                                    .collect();
                                for (p, n) in moved {
                                    names.remove(&p);
                                    let np = format!("{to}{}", &p[from.len()..]);
                                    node_path.insert(n, np.clone());
                                    names.insert(np, n);
                                }
                                names.remove(from);
                            }
                            names.insert(to.to_string(), node);
                            node_path.insert(node, to.to_string());
                            if r.op == 'R' {
                                (
                                    MOp::Rename {
                                        sdir,
                                        sname: sn,
                                        ddir,
                                        dname: dn,
                                        node,
                                    },
                                    format!("{} -> {}", rel(from), rel(to)),
                                )
                            } else {
                                (
                                    MOp::Entry {
                                        dir: ddir,
                                        name: dn,
                                        target: Some(node),
                                    },
                                    rel(to),
                                )
                            }
                        }
                        (false, false) => (MOp::Nothing, String::new()),
                        _ => {
                            panic!("a rename into or out of the spool is outside the model: {r:?}")
                        }
                    }
                }
                _ => (MOp::Nothing, String::new()),
            };
            ops.push(op);
            paths.push(path);
        }
        // For each op, the first later barrier that makes it durable.
        let n = ops.len();
        let mut durable_at = vec![usize::MAX; n];
        let mut src_durable_at = vec![usize::MAX; n];
        let mut next_barrier: HashMap<usize, usize> = HashMap::new();
        let mut next_all = usize::MAX;
        for j in (0..n).rev() {
            let nb = |node: usize| {
                next_barrier
                    .get(&node)
                    .copied()
                    .unwrap_or(usize::MAX)
                    .min(next_all)
            };
            match &ops[j] {
                MOp::Barrier(node) => {
                    next_barrier.insert(*node, j);
                }
                MOp::SyncAll => next_all = j,
                MOp::Write { node, .. } | MOp::Trunc { node, .. } => durable_at[j] = nb(*node),
                MOp::Entry { dir, .. } => durable_at[j] = nb(*dir),
                MOp::Rename { sdir, ddir, .. } => {
                    durable_at[j] = nb(*ddir);
                    src_durable_at[j] = nb(*sdir);
                }
                MOp::Nothing => {}
            }
        }
        Log {
            recs,
            ops,
            durable_at,
            src_durable_at,
            paths,
            initial,
            root_node,
            spool_abs,
            dir_nodes,
        }
    }

    /// The spool's node in a state (None while its directory entry is not there).
    pub fn spool_in(&self, fs: &Fs) -> Option<usize> {
        fs.dirs.get(&self.root_node)?.get("spool").copied()
    }

    /// Absolute path of the recorded spool.
    pub fn spool_abs(&self) -> &str {
        &self.spool_abs
    }

    /// The state a power cut right after op `k` leaves when `keep` decides, for every op not
    /// made durable by then, which of its parts reached the disk. Parts: 0 is the op as a
    /// whole (for a write: the size change), 1.. the sectors of a write.
    pub fn crash_state(&self, k: usize, keep: &dyn Fn(usize, usize) -> bool) -> Fs {
        let mut fs = self.initial.clone();
        for j in 0..=k.min(self.ops.len().saturating_sub(1)) {
            let forced = self.durable_at[j] <= k;
            match &self.ops[j] {
                MOp::Nothing | MOp::Barrier(_) | MOp::SyncAll => {}
                MOp::Write {
                    node,
                    off,
                    len,
                    data,
                } => {
                    let f = fs.files.entry(*node).or_default();
                    if forced {
                        f.write(*off, data.as_deref(), *len);
                        f.size = f.size.max(off + len);
                        continue;
                    }
                    // sector pieces, aligned to the file offset
                    let mut pos = *off;
                    let end = off + len;
                    let mut piece = 1;
                    while pos < end {
                        let n = (SECTOR - pos % SECTOR).min(end - pos);
                        if keep(j, piece) {
                            let d = data
                                .as_ref()
                                .map(|d| &d[(pos - off) as usize..(pos - off + n) as usize]);
                            f.write(pos, d, n);
                        }
                        pos += n;
                        piece += 1;
                    }
                    if keep(j, 0) {
                        f.size = f.size.max(off + len);
                    }
                }
                MOp::Trunc { node, len } => {
                    if forced || keep(j, 0) {
                        fs.files.entry(*node).or_default().set_len(*len);
                    }
                }
                MOp::Entry { dir, name, target } => {
                    if forced || keep(j, 0) {
                        let d = fs.dirs.entry(*dir).or_default();
                        match target {
                            Some(t) => {
                                d.insert(name.clone(), *t);
                            }
                            None => {
                                d.remove(name);
                            }
                        }
                        if let Some(t) = target
                            && self.is_dir_node(*t)
                        {
                            fs.dirs.entry(*t).or_default();
                        }
                    }
                }
                MOp::Rename {
                    sdir,
                    sname,
                    ddir,
                    dname,
                    node,
                } => {
                    let whole = keep(j, 0);
                    if whole || self.src_durable_at[j] <= k {
                        let d = fs.dirs.entry(*sdir).or_default();
                        if d.get(sname) == Some(node) {
                            d.remove(sname);
                        }
                    }
                    if whole || forced {
                        fs.dirs
                            .entry(*ddir)
                            .or_default()
                            .insert(dname.clone(), *node);
                    }
                }
            }
        }
        fs
    }

    fn is_dir_node(&self, node: usize) -> bool {
        self.dir_nodes.contains(&node)
    }

    /// Number of parts op `j` has (see [`Log::crash_state`]); 0 for ops with none.
    pub fn parts(&self, j: usize) -> usize {
        match &self.ops[j] {
            MOp::Write { off, len, .. } => {
                let first = off / SECTOR;
                let last = (off + len).div_ceil(SECTOR);
                1 + (last - first) as usize
            }
            MOp::Trunc { .. } | MOp::Entry { .. } | MOp::Rename { .. } => 1,
            _ => 0,
        }
    }

    /// Is op `j` still not durable at crash point `k`?
    pub fn pending(&self, j: usize, k: usize) -> bool {
        j <= k
            && self.parts(j) > 0
            && (self.durable_at[j] > k
                || matches!(self.ops[j], MOp::Rename { .. } if self.src_durable_at[j] > k))
    }
}

/// Compare a model state with a real directory (the recorder's self-check). Returns what
/// differs, empty when they agree.
pub fn diff(fs: &Fs, dir: Option<usize>, real: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut model: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    if let Some(d) = dir {
        for (p, node, is_dir) in fs.walk(d) {
            model.insert(
                p,
                if is_dir {
                    None
                } else {
                    Some(fs.files.get(&node).map(|f| f.bytes()).unwrap_or_default())
                },
            );
        }
    }
    let mut disk: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    fn read(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = format!("{prefix}{}", e.file_name().to_string_lossy());
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.insert(p.clone(), None);
                read(&e.path(), &format!("{p}/"), out);
            } else if t.is_file() {
                out.insert(p, Some(std::fs::read(e.path()).unwrap()));
            }
        }
    }
    read(real, "", &mut disk);
    for (p, v) in &model {
        match disk.get(p) {
            None => out.push(format!("{p}: in the model, not on disk")),
            Some(d) if d != v => out.push(format!(
                "{p}: model has {:?} bytes, disk {:?}",
                v.as_ref().map(Vec::len),
                d.as_ref().map(Vec::len)
            )),
            _ => {}
        }
    }
    for p in disk.keys() {
        if !model.contains_key(p) {
            out.push(format!("{p}: on disk, not in the model"));
        }
    }
    out
}
