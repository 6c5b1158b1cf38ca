//! Power-cut safety, tested the way crash-consistency research does it (ALICE, CrashMonkey).
//!
//! 1. **Record.** The real binary runs real SMTP traffic under an `LD_PRELOAD` shim
//!    (tests/powercut/shim.c, built here with `cc`) that logs every file-system operation
//!    postern makes in its spool, and every `250 ... queued as ID` it sends, in one ordered
//!    log. The run covers accepting (small messages through the intake journal, > 1 MiB ones
//!    the POSIX way, several clients at once so group commit batches), checkpoints (every
//!    300 ms via `POSTERN_TEST_CHECKPOINT_MS`), delivery to the file transport, failed
//!    deliveries (deferred, envelope appends), recycled queue files (`free/`), `queue delete`,
//!    a SIGKILL and the next start's recovery, and a clean shutdown.
//! 2. **Build crash states.** `model.rs` replays the log and builds the states a power cut
//!    could leave after any operation (the persistence model is described there): for each
//!    crash point it keeps everything made durable by then and chooses which unsynced
//!    operations and sectors reached the disk: all of them, none, metadata only, data only,
//!    an in-order prefix, all but one, only one, and seeded random subsets with torn writes.
//!    Identical states are explored once.
//! 3. **Recover and check.** postern starts on each state and delivers to the file transport;
//!    every message acknowledged before the crash point must be delivered (or have been
//!    delivered before it) with its bytes intact, nothing else may be delivered but mail a
//!    client sent, a deleted message stays deleted, postern must start without panicking, and
//!    `corrupt/` may hold no acknowledged message.
//! 4. **Cut the recoveries.** A few crash states are recovered again under the shim, and the
//!    states a power cut during those recoveries could leave are checked the same way.
//!
//! Before any of that, the recording must replay to exactly the spool on disk (the shim
//! missed nothing), and no move between queue directories may flush its source directory
//! before its destination (see `source_flushed_first`).
//!
//! `POWERCUT_STATES` (default 1100) sets how many states are checked, `POWERCUT_SEED` the
//! seed and `POWERCUT_JOBS` how many postern instances run at once (2); `scripts/powercut`
//! runs a larger exploration. On failure the failing states (under /dev/shm) and the
//! recording (with a readable `ops.txt`) are kept and their paths printed.

mod model;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use model::{Fs, Log, MOp, Snapshot};

/// Build the recorder shim into the test's scratch directory.
fn build_shim() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("powercut-shim.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/shim.c");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed to build {}", src.display());
    out
}

/// The log file, shared with the shim's lock protocol (flock), so the test can write marks
/// in order and stop every recorded process between two operations.
struct LogFile {
    f: std::fs::File,
}

impl LogFile {
    fn open(path: &Path) -> LogFile {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open log");
        LogFile { f }
    }

    fn lock(&self) {
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(self.f.as_raw_fd(), libc::LOCK_EX) }, 0);
    }

    fn unlock(&self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.f.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Write a mark while holding the lock (the caller holds it).
    fn mark_locked(&mut self, text: &str) {
        writeln!(self.f, "M {} test {text}", std::process::id()).expect("write mark");
    }

    fn mark(&mut self, text: &str) {
        self.lock();
        self.mark_locked(text);
        self.unlock();
    }
}

/// A postern process and what it printed.
struct Daemon {
    child: Child,
    addr: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// Start `postern serve`; Err with its output when it does not become ready.
    fn start(config: &Path, env: &[(&str, &str)]) -> Result<Daemon, String> {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("POSTERN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l == "postern: ready" => break,
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix("postern: listening on ") {
                        addr = rest.split(' ').nth(1).and_then(|a| a.parse().ok());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(50));
                    return Err(format!(
                        "postern did not start:\n{}",
                        stderr.lock().unwrap()
                    ));
                }
            }
        }
        Ok(Daemon {
            child,
            addr,
            stderr,
        })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn config(spool: &Path, state: &Path, delivered: &Path) -> String {
    format!(
        r#"hostname = "relay.test"
spool_dir = "{}"
state_dir = "{}"

[delivery]
retry_initial = "1s"
retry_max = "2s"

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]
max_message_size = "10 MB"

[route.default]
senders = ["*"]
transport = "file"
dir = "{}"
"#,
        spool.display(),
        state.display(),
        delivered.display()
    )
}

/// A message body of about `size` bytes: headers naming `tag`, then lines of varied text
/// (no line starts with a dot, none is longer than 998 bytes).
fn body(tag: &str, size: usize) -> Vec<u8> {
    let mut b = format!("Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n").into_bytes();
    let mut n: u64 = tag
        .bytes()
        .fold(7, |a, c| a.wrapping_mul(31).wrapping_add(c as u64));
    while b.len() < size {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let line = format!(
            "{tag} line {} {:016x}{:016x}\r\n",
            b.len(),
            n,
            n.rotate_left(17)
        );
        b.extend_from_slice(line.as_bytes());
    }
    b
}

/// What the recording produced.
struct Recording {
    log: Log,
    /// Client bytes of each acknowledged message.
    sent: HashMap<String, Vec<u8>>,
    /// What the file transport delivered in the recording, per id (the reference).
    reference: HashMap<String, Vec<u8>>,
}

/// Send messages from several clients at once; returns (queue id, body) of each.
fn burst(
    addr: SocketAddr,
    label: &str,
    clients: usize,
    per: usize,
    sizes: &[usize],
) -> Vec<(String, Vec<u8>)> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for c in 0..clients {
        let out = out.clone();
        let sizes = sizes.to_vec();
        let label = label.to_string();
        threads.push(std::thread::spawn(move || {
            for m in 0..per {
                let tag = format!("{label}-c{c}-m{m}");
                let b = body(&tag, sizes[(c + m) % sizes.len()]);
                let r = send_mail(addr, "dev@example.com", &["rcpt@example.org"], &b);
                expect(&r, "250 2.0.0");
                let mut stored = b.clone();
                stored.extend_from_slice(b"\r\n");
                out.lock().unwrap().push((queued_id(&r), stored));
            }
        }));
    }
    for t in threads {
        t.join().expect("client thread");
    }
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json_ids(dir: &Path) -> HashSet<String> {
    delivered_ids(dir).into_iter().collect()
}

/// Run the traffic under the recorder and resolve the log.
fn record(base: &Path, shim: &Path) -> Recording {
    let root = base.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let log_path = base.join("ops.log");
    let spool = root.join("spool");
    let delivered = root.join("delivered");
    let parked = root.join("delivered-1");
    let cfg = base.join("postern.toml");
    std::fs::write(&cfg, config(&spool, &base.join("state"), &delivered)).unwrap();
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("POWERCUT_LOG", log_path.to_str().unwrap()),
        ("POWERCUT_ROOT", root.to_str().unwrap()),
        ("POSTERN_TEST_CHECKPOINT_MS", "300"),
    ];
    let snap = Snapshot::take(&root);
    let mut logf = LogFile::open(&log_path);
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    let small = [900, 6_000, 30_000, 120_000];
    let large = [1_300_000];

    // 1. Accept with delivery flowing: journal batches, recycled files, one large message.
    let mut d = Daemon::start(&cfg, &env).expect("recorded postern starts");
    let addr = d.addr.unwrap();
    logf.mark("phase accept");
    let big = std::thread::spawn(move || burst(addr, "big1", 1, 1, &large));
    sent.extend(burst(addr, "a", 3, 4, &small));
    sent.extend(big.join().unwrap());
    wait_for("first deliveries", Duration::from_secs(30), || {
        json_ids(&delivered).len() >= sent.len()
    });
    sent.extend(burst(addr, "b", 3, 2, &small)); // written over recycled queue files
    wait_for("second deliveries", Duration::from_secs(30), || {
        json_ids(&delivered).len() >= sent.len()
    });
    std::thread::sleep(Duration::from_millis(700)); // a checkpoint retires the done records

    // 2. Delivery fails (the transport's directory is a file): deferred, envelope appends,
    //    checkpoints that flush queued files.
    logf.mark("phase blocked");
    std::fs::rename(&delivered, &parked).unwrap();
    std::fs::write(&delivered, b"not a directory").unwrap();
    let big = std::thread::spawn(move || burst(addr, "big2", 1, 1, &large));
    let blocked = burst(addr, "c", 3, 3, &small);
    sent.extend(blocked.iter().cloned());
    sent.extend(big.join().unwrap());
    let spool2 = spool.clone();
    wait_for("deferrals", Duration::from_secs(30), || {
        std::fs::read_dir(spool2.join("deferred"))
            .map(|d| d.count())
            .unwrap_or(0)
            >= 4
    });
    std::thread::sleep(Duration::from_millis(700));

    // 3. The admin deletes a deferred message (one that a retry is not delivering right now).
    let mut victim = None;
    for _ in 0..50 {
        let Some(id) = blocked
            .iter()
            .map(|(id, _)| id.clone())
            .find(|id| spool.join("deferred").join(id).exists())
        else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        logf.mark(&format!("delete-start {id}"));
        let out = Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .args(["queue", "delete", &id])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        if out.status.success() {
            logf.mark(&format!("delete-end {id}"));
            victim = Some(id);
            break;
        }
    }
    let victim = victim.expect("`queue delete` of a deferred message");

    // 4. More mail, then SIGKILL before its checkpoint: the journal owes it at the restart.
    sent.extend(burst(addr, "d", 2, 2, &small));
    logf.lock();
    logf.mark_locked("kill");
    d.kill9();
    logf.unlock();

    // 5. Recovery, then delivery works again and more mail arrives over recycled files.
    logf.mark("recovery-start");
    let mut d = Daemon::start(&cfg, &env).expect("recorded postern restarts");
    logf.mark("recovery-end");
    let addr = d.addr.unwrap();
    std::fs::remove_file(&delivered).unwrap();
    sent.extend(burst(addr, "e", 2, 3, &small));
    let want: HashSet<String> = sent
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| *id != victim)
        .collect();
    wait_for("every delivery", Duration::from_secs(60), || {
        let mut got = json_ids(&delivered);
        got.extend(json_ids(&parked));
        want.is_subset(&got)
    });
    std::thread::sleep(Duration::from_millis(700));
    logf.mark("shutdown");
    let pid = d.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.alive() {
        assert!(Instant::now() < deadline, "postern did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!d.log().contains("panicked"), "{}", d.log());

    let mut reference = HashMap::new();
    for dir in [&parked, &delivered] {
        for id in json_ids(dir) {
            reference.insert(
                id.clone(),
                std::fs::read(dir.join(format!("{id}.eml"))).unwrap(),
            );
        }
    }
    for (id, b) in &sent {
        if let Some(r) = reference.get(id) {
            assert!(
                r.ends_with(b) && r.starts_with(b"Received: "),
                "recording delivered {id} damaged"
            );
        }
    }
    let recs = model::parse(&std::fs::read(&log_path).unwrap());
    let log = Log::resolve(recs, &root, snap);
    // The recorder's self-check: replaying every operation must give what is on disk.
    let all = log.crash_state(log.ops.len() - 1, &|_, _| true);
    let diff = model::diff(&all, log.spool_in(&all), &spool);
    assert!(
        diff.is_empty(),
        "the recorded log does not replay to the spool on disk (the shim misses an operation):\n{}",
        diff.join("\n")
    );
    Recording {
        log,
        sent: sent.into_iter().collect(),
        reference,
    }
}

/// Moves between queue directories whose source directory was flushed before their
/// destination: where renames are not atomic (ext2, ext4 without a journal) a power cut
/// between the two flushes loses the message. Claims (unflushed moves into `active/`) did
/// this whenever another move or a checkpoint flushed `incoming/` or `deferred/` first; see
/// src/spool/durable.rs.
fn source_flushed_first(log: &Log) -> Vec<String> {
    const QUEUE: [&str; 5] = ["incoming", "active", "deferred", "hold", "failed"];
    let dir = |p: &str| p.split('/').next().unwrap_or("").to_string();
    let mut out = Vec::new();
    for (j, op) in log.ops.iter().enumerate() {
        let MOp::Rename { .. } = op else { continue };
        let Some((from, to)) = log.paths[j].split_once(" -> ") else {
            continue;
        };
        let (src, dst) = (dir(from), dir(to));
        if QUEUE.contains(&src.as_str())
            && QUEUE.contains(&dst.as_str())
            && log.src_durable_at[j] < log.durable_at[j]
        {
            out.push(format!(
                "op {j} {}: source flushed at op {}, destination at {}",
                log.paths[j], log.src_durable_at[j], log.durable_at[j] as i64
            ));
        }
    }
    out
}

/// Which part of postern's life a crash point falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Phase {
    Accept,
    Checkpoint,
    Recycle,
    Delivery,
    Delete,
    Recovery,
    /// A power cut while postern recovers from a power cut.
    RecoveryOfRecovery,
}

/// Classify the op after which the power goes.
fn phases(rec: &Recording) -> Vec<Option<Phase>> {
    let log = &rec.log;
    let mut out = Vec::with_capacity(log.ops.len());
    // The first start (creating the spool) counts as a recovery of an empty spool.
    let mut in_recovery = true;
    let mut deleting = false;
    for (j, r) in log.recs.iter().enumerate() {
        if r.op == 'M' {
            in_recovery = match r.arg.as_str() {
                "recovery-start" => true,
                "recovery-end" | "phase accept" => false,
                _ => in_recovery,
            };
            if r.arg.starts_with("delete-start") {
                deleting = true;
            }
            if r.arg.starts_with("delete-end") {
                deleting = false;
            }
        }
        let p = if r.op == 'A' {
            Some(Phase::Accept)
        } else if matches!(log.ops[j], MOp::Nothing) {
            None
        } else if in_recovery {
            Some(Phase::Recovery)
        } else if deleting && r.comm == "postern" {
            Some(Phase::Delete)
        } else if r.comm == "spool-checkpoin" {
            Some(Phase::Checkpoint)
        } else if log.paths[j].contains("free/") || log.paths[j].starts_with("free") {
            Some(Phase::Recycle)
        } else if r.comm == "spool-commit"
            || log.paths[j].starts_with("tmp/")
            || log.paths[j].starts_with("journal/000")
        {
            if r.comm == "spool-commit" || !log.paths[j].starts_with("journal/") {
                Some(Phase::Accept)
            } else {
                Some(Phase::Delivery) // a done record
            }
        } else {
            Some(Phase::Delivery)
        };
        out.push(p);
    }
    out
}

/// What must hold after recovering from a crash right after op `k`.
#[derive(Clone)]
struct Expect {
    /// Acknowledged by then, not delivered before the crash, not being deleted.
    must: HashSet<String>,
    /// Delivered before the crash (resending them is a duplicate, allowed).
    before: HashSet<String>,
    /// Deleted by the admin before the crash: must not come back.
    deleted: HashSet<String>,
    /// Acknowledged by then.
    acked: HashSet<String>,
}

/// What the log says happened outside the spool, by op index.
enum Event {
    Acked(String),
    Delivered(String),
    Deleting(String),
    Deleted(String),
}

fn events(log: &Log) -> Vec<(usize, Event)> {
    let delivered = format!("{}/delivered/", log.spool_abs().trim_end_matches("/spool"));
    let mut out = Vec::new();
    for (j, r) in log.recs.iter().enumerate() {
        let e = match r.op {
            'A' => Event::Acked(r.arg.clone()),
            'R' => match r
                .arg
                .split_once('\t')
                .and_then(|(_, to)| to.strip_prefix(&delivered)?.strip_suffix(".json"))
            {
                Some(id) => Event::Delivered(id.to_string()),
                None => continue,
            },
            'M' => match (
                r.arg.strip_prefix("delete-start "),
                r.arg.strip_prefix("delete-end "),
            ) {
                (Some(id), _) => Event::Deleting(id.to_string()),
                (_, Some(id)) => Event::Deleted(id.to_string()),
                _ => continue,
            },
            _ => continue,
        };
        out.push((j, e));
    }
    out
}

fn expectations(events: &[(usize, Event)], k: usize) -> Expect {
    let mut acked = HashSet::new();
    let mut before = HashSet::new();
    let mut deleting = HashSet::new();
    let mut deleted = HashSet::new();
    for (_, e) in events.iter().take_while(|(j, _)| *j <= k) {
        match e {
            Event::Acked(id) => acked.insert(id.clone()),
            Event::Delivered(id) => before.insert(id.clone()),
            Event::Deleting(id) => deleting.insert(id.clone()),
            Event::Deleted(id) => deleted.insert(id.clone()),
        };
    }
    let must = acked
        .iter()
        .filter(|id| !before.contains(*id) && !deleting.contains(*id))
        .cloned()
        .collect();
    Expect {
        must,
        before,
        deleted,
        acked,
    }
}

/// How a crash state chooses which unsynced operations reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Strat {
    /// Every operation (what SIGKILL leaves).
    All,
    /// Only what was made durable.
    None,
    /// Directory operations, no data.
    MetaOnly,
    /// Directory operations and size changes, no data (files full of zeroes).
    MetaSize,
    /// Data, no directory operations.
    DataOnly,
    /// Unsynced operations up to and including op `n`, in order.
    Prefix(usize),
    /// Everything but op `n`.
    DropOne(usize),
    /// Nothing unsynced but op `n`.
    OnlyOne(usize),
    /// Each op with probability 1/2; a kept write torn (random sectors) one time in four.
    Random(u64),
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9E3779B97F4A7C15) ^ c.wrapping_mul(0xC2B2AE3D27D4EB4F);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

fn keep(log: &Log, s: Strat, j: usize, part: usize) -> bool {
    let meta = matches!(log.ops[j], MOp::Entry { .. } | MOp::Rename { .. });
    match s {
        Strat::All => true,
        Strat::None => false,
        Strat::MetaOnly => meta,
        Strat::MetaSize => meta || matches!(log.ops[j], MOp::Trunc { .. }) || part == 0,
        Strat::DataOnly => !meta,
        Strat::Prefix(n) => j <= n,
        Strat::DropOne(n) => j != n,
        Strat::OnlyOne(n) => j == n,
        Strat::Random(seed) => {
            if mix(seed, j as u64, 0) & 1 == 0 {
                return false;
            }
            if part == 0 || !mix(seed, j as u64, 1).is_multiple_of(4) {
                return true;
            }
            mix(seed, j as u64, part as u64 + 2) & 1 == 0
        }
    }
}

/// A crash state chosen for exploration.
#[derive(Debug, Clone, Copy)]
struct Pick {
    k: usize,
    strat: Strat,
    phase: Phase,
}

fn build(log: &Log, k: usize, strat: Strat) -> Fs {
    log.crash_state(k, &|j, part| keep(log, strat, j, part))
}

/// Choose up to `quota` distinct crash states among the crash points `ks` of `log`
/// (seeded, so runs are reproducible). `expect` gives what must hold after a crash at k;
/// `seen` holds (spool, expectation) hashes already taken; `spools` the distinct spools.
fn sample(
    log: &Log,
    ks: &[usize],
    quota: usize,
    seed: u64,
    expect: &dyn Fn(usize) -> Expect,
    seen: &mut HashSet<(u64, u64)>,
    spools: &mut HashSet<u64>,
) -> Vec<(usize, Strat)> {
    // a seeded shuffle
    let mut order: Vec<(u64, usize)> = ks.iter().map(|&k| (mix(seed, k as u64, 99), k)).collect();
    order.sort();
    let mut out = Vec::new();
    let mut pending_at: HashMap<usize, Vec<usize>> = HashMap::new();
    'rounds: for round in 0..40u64 {
        let mut progress = false;
        for &(_, k) in &order {
            if out.len() >= quota {
                break 'rounds;
            }
            let pending = pending_at
                .entry(k)
                .or_insert_with(|| (0..=k).filter(|&j| log.pending(j, k)).collect());
            let r = mix(seed, k as u64, round);
            let pick_pending = || pending[(r as usize) % pending.len()];
            let strat = match round {
                0 => Strat::All,
                _ if pending.is_empty() => continue,
                1 => Strat::None,
                2 => Strat::MetaOnly,
                3 => Strat::MetaSize,
                4 => Strat::DataOnly,
                5 | 9 => Strat::Prefix(pick_pending()),
                6 | 10 => Strat::DropOne(pick_pending()),
                7 | 11 => Strat::OnlyOne(pick_pending()),
                _ => Strat::Random(r),
            };
            let fs = build(log, k, strat);
            let h = fs.hash(log.spool_in(&fs));
            let e = expect(k);
            let mut must: Vec<&String> = e.must.iter().collect();
            must.sort();
            let mut eh = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&must, &mut eh);
            std::hash::Hash::hash(&e.deleted.len(), &mut eh);
            if seen.insert((h, std::hash::Hasher::finish(&eh))) {
                spools.insert(h);
                out.push((k, strat));
                progress = true;
            }
        }
        if !progress && round > 12 {
            break;
        }
    }
    out
}

/// Choose `total` distinct crash states of the recording, shared among the phases by
/// `weights`; what a phase with too few crash points leaves goes to the later ones.
fn choose(
    rec: &Recording,
    weights: &[(Phase, usize)],
    total: usize,
    seed: u64,
) -> (Vec<Pick>, usize) {
    let mut points: BTreeMap<Phase, Vec<usize>> = BTreeMap::new();
    for (k, p) in phases(rec).iter().enumerate() {
        if let Some(p) = p {
            points.entry(*p).or_default().push(k);
        }
    }
    let (mut seen, mut spools) = (HashSet::new(), HashSet::new());
    let events = events(&rec.log);
    let expect = |k: usize| expectations(&events, k);
    let mut picks = Vec::new();
    let mut weight_left: usize = weights.iter().map(|(_, w)| w).sum();
    for (phase, w) in weights {
        let quota = (total - picks.len()) * w / weight_left.max(1);
        weight_left -= w;
        let ks = points.get(phase).map(Vec::as_slice).unwrap_or_default();
        for (k, strat) in sample(&rec.log, ks, quota, seed, &expect, &mut seen, &mut spools) {
            picks.push(Pick {
                k,
                strat,
                phase: *phase,
            });
        }
    }
    (picks, spools.len())
}

/// Result of recovering one crash state.
#[derive(Default)]
struct Outcome {
    duplicates: usize,
    restored: usize,
    delivered_removed: usize,
    quarantined_delivered: usize,
}

fn ids_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Where a recorded recovery keeps its log, and the shim that writes it.
struct Recorder<'a> {
    shim: &'a Path,
    log: PathBuf,
}

/// Materialize the crash state `fs` of `log` in `dir`, start postern on it, let it deliver,
/// check the invariants `e`. With a recorder, postern runs under the shim (recording into
/// `dir`'s own log) and the snapshot of `dir` it started from is returned.
fn check(
    rec: &Recording,
    log: &Log,
    fs: &Fs,
    e: &Expect,
    dir: &Path,
    recorder: Option<&Recorder>,
) -> Result<(Outcome, Option<Snapshot>), String> {
    let spool = dir.join("spool");
    let delivered = dir.join("delivered");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    fs.materialize(log.spool_in(fs), &spool)
        .map_err(|e| format!("materialize: {e}"))?;
    let cfg = dir.parent().unwrap().join(format!(
        "{}.toml",
        dir.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&cfg, config(&spool, &dir.join("state"), &delivered)).unwrap();
    let snap = recorder.map(|_| Snapshot::take(dir));
    let env: Vec<(&str, String)> = match recorder {
        Some(r) => vec![
            ("LD_PRELOAD", r.shim.display().to_string()),
            ("POWERCUT_LOG", r.log.display().to_string()),
            ("POWERCUT_ROOT", dir.display().to_string()),
        ],
        None => Vec::new(),
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Daemon::start(&cfg, &env)?;
    let queue = ["incoming", "active", "deferred"];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = json_ids(&delivered);
        let idle = queue.iter().all(|q| ids_in(&spool.join(q)).is_empty());
        if idle && e.must.iter().all(|id| got.contains(id)) {
            break;
        }
        if !d.alive() {
            return Err(format!("postern died:\n{}", d.log()));
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = e.must.iter().filter(|id| !got.contains(*id)).collect();
            return Err(format!(
                "acknowledged but not delivered after 30 s: {missing:?}; queue: {:?}\n{}",
                queue
                    .iter()
                    .map(|q| (q, ids_in(&spool.join(q))))
                    .collect::<Vec<_>>(),
                d.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    let text = d.log();
    if let Some(r) = recorder {
        // No operation cut between the call and its record.
        let logf = LogFile::open(&r.log);
        logf.lock();
        d.kill9();
        logf.unlock();
    }
    d.kill9();
    if text.contains("panicked") {
        return Err(format!("postern panicked:\n{text}"));
    }
    let mut out = Outcome::default();
    for id in json_ids(&delivered) {
        let eml = std::fs::read(delivered.join(format!("{id}.eml"))).map_err(|e| e.to_string())?;
        if !rec.sent.contains_key(&id) {
            return Err(format!(
                "delivered {id}, which no client was ever told was queued"
            ));
        }
        if e.deleted.contains(&id) {
            return Err(format!("delivered {id}, which `queue delete` had deleted"));
        }
        let intact = match rec.reference.get(&id) {
            Some(r) => eml == *r,
            None => rec
                .sent
                .get(&id)
                .is_some_and(|b| eml.ends_with(b) && eml.starts_with(b"Received: ")),
        };
        if !intact {
            return Err(format!("delivered {id} damaged ({} bytes)", eml.len()));
        }
        if e.before.contains(&id) {
            out.duplicates += 1;
        }
    }
    for name in ids_in(&spool.join("corrupt")) {
        let id: String = name.chars().take(16).collect();
        if e.acked.contains(&id) {
            if e.before.contains(&id) {
                out.quarantined_delivered += 1;
            } else {
                return Err(format!(
                    "acknowledged message {id} moved to corrupt/ ({name})"
                ));
            }
        }
    }
    let recovered = |key: &str| -> usize {
        text.lines()
            .find(|l| l.contains("spool recovered"))
            .and_then(|l| l.split(&format!(" {key}=")).nth(1))
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    out.restored = recovered("restored");
    out.delivered_removed = recovered("delivered_removed");
    Ok((out, snap))
}

fn scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    let d = base.join(format!("postern-powercut-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One crash state to recover from.
struct Job<'a> {
    phase: Phase,
    log: &'a Log,
    k: usize,
    strat: Strat,
    e: Expect,
}

/// Per phase: states passed, resends, files restored, delivered files removed, quarantined.
type Stats = BTreeMap<Phase, [usize; 5]>;

/// Recover from every job's crash state, `workers` at a time; returns the failures.
fn explore(
    rec: &Recording,
    jobs: &[Job],
    workers: usize,
    scratch: &Path,
    stats: &Mutex<Stats>,
) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..workers {
            let (next, failures) = (&next, &failures);
            s.spawn(move || {
                let dir = scratch.join(format!("w{w}"));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let fs = build(job.log, job.k, job.strat);
                    match check(rec, job.log, &fs, &job.e, &dir, None) {
                        Ok((o, _)) => {
                            let mut st = stats.lock().unwrap();
                            let e = st.entry(job.phase).or_default();
                            let add = [
                                1,
                                o.duplicates,
                                o.restored,
                                o.delivered_removed,
                                o.quarantined_delivered,
                            ];
                            for (slot, n) in e.iter_mut().zip(add) {
                                *slot += n;
                            }
                        }
                        Err(why) => {
                            let keep = scratch.join(format!("failed-{:?}-{i}", job.phase));
                            let _ = std::fs::rename(&dir, &keep);
                            failures.lock().unwrap().push(format!(
                                "{:?} crash after op {} ({:?}: {}) with {:?}, kept in {}: {why}",
                                job.phase,
                                job.k,
                                job.log.recs[job.k].op,
                                job.log.paths[job.k],
                                job.strat,
                                keep.display()
                            ));
                        }
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

/// Recover from `bases` crash states under the recorder, so that the recoveries themselves
/// can be cut. Returns each recovery's log with what had to hold for its base state.
fn record_recoveries(
    rec: &Recording,
    shim: &Path,
    bases: &[&Job],
    scratch: &Path,
) -> Vec<(Log, Expect)> {
    let mut out = Vec::new();
    for (b, job) in bases.iter().enumerate() {
        let dir = scratch.join(format!("nested-{b}"));
        let r = Recorder {
            shim,
            log: scratch.join(format!("nested-{b}.log")),
        };
        let fs = build(job.log, job.k, job.strat);
        let (_, snap) = check(rec, job.log, &fs, &job.e, &dir, Some(&r)).unwrap_or_else(|why| {
            panic!(
                "recorded recovery of {:?} after op {}: {why}",
                job.strat, job.k
            )
        });
        let log = Log::resolve(
            model::parse(&std::fs::read(&r.log).unwrap()),
            &dir,
            snap.unwrap(),
        );
        let all = log.crash_state(log.ops.len() - 1, &|_, _| true);
        let diff = model::diff(&all, log.spool_in(&all), &dir.join("spool"));
        assert!(
            diff.is_empty(),
            "recorded recovery does not replay:\n{}",
            diff.join("\n")
        );
        out.push((log, job.e.clone()));
    }
    out
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn power_cuts_lose_no_acknowledged_mail() {
    if !require("cc") {
        return;
    }
    let started = Instant::now();
    let total = env_num("POWERCUT_STATES", 1100) as usize;
    let seed = env_num("POWERCUT_SEED", 1);
    let workers = env_num("POWERCUT_JOBS", 2) as usize;
    let shim = build_shim();
    let base = tempfile::tempdir().unwrap();
    let rec = record(base.path(), &shim);
    let recorded = started.elapsed();
    let disordered = source_flushed_first(&rec.log);
    assert!(
        disordered.is_empty(),
        "moves whose source directory was flushed before their destination:\n{}",
        disordered.join("\n")
    );
    // Few crash points fall in a delete or a restart: those phases go first and leave the
    // rest of their share to the others. A tenth is kept for cutting recoveries.
    let nested_quota = total / 10;
    let weights = [
        (Phase::Delete, 3),
        (Phase::Recovery, 11),
        (Phase::Recycle, 15),
        (Phase::Checkpoint, 20),
        (Phase::Delivery, 20),
        (Phase::Accept, 31),
    ];
    let (picks, distinct_fs) = choose(&rec, &weights, total - nested_quota, seed);
    let main_events = events(&rec.log);
    let jobs: Vec<Job> = picks
        .iter()
        .map(|p| Job {
            phase: p.phase,
            log: &rec.log,
            k: p.k,
            strat: p.strat,
            e: expectations(&main_events, p.k),
        })
        .collect();
    let chosen = started.elapsed();
    let scratch = scratch();
    let stats = Mutex::new(Stats::new());
    let mut failures = explore(&rec, &jobs, workers, &scratch, &stats);

    // Power cuts during recovery: record the recovery of a few crash states that had
    // something to repair, and cut it too.
    let mut bases: Vec<&Job> = jobs
        .iter()
        .filter(|j| {
            j.strat != Strat::All
                && matches!(
                    j.phase,
                    Phase::Accept | Phase::Checkpoint | Phase::Recycle | Phase::Delivery
                )
        })
        .collect();
    bases.sort_by_key(|j| mix(seed, j.k as u64, 7));
    bases.truncate(8);
    let nested = if failures.is_empty() {
        record_recoveries(&rec, &shim, &bases, &scratch)
    } else {
        Vec::new()
    };
    let per_base = nested_quota / bases.len().max(1);
    let (mut seen, mut spools) = (HashSet::new(), HashSet::new());
    let mut nested_jobs = Vec::new();
    for (log, e0) in &nested {
        let nested_events = events(log);
        let expect = |k: usize| {
            let mut e = e0.clone();
            for (_, ev) in nested_events.iter().take_while(|(j, _)| *j <= k) {
                if let Event::Delivered(id) = ev {
                    e.must.remove(id.as_str());
                    e.before.insert(id.clone());
                }
            }
            e
        };
        let ks: Vec<usize> = (0..log.ops.len())
            .filter(|&k| !matches!(log.ops[k], MOp::Nothing))
            .collect();
        for (k, strat) in sample(log, &ks, per_base, seed, &expect, &mut seen, &mut spools) {
            nested_jobs.push(Job {
                phase: Phase::RecoveryOfRecovery,
                log,
                k,
                strat,
                e: expect(k),
            });
        }
    }
    failures.extend(explore(&rec, &nested_jobs, workers, &scratch, &stats));

    let stats = stats.into_inner().unwrap();
    eprintln!(
        "powercut: {} ops recorded in {:.1}s, {} crash states chosen ({} distinct spools) in {:.1}s, {} more during {} recorded recoveries; explored in {:.1}s",
        rec.log.ops.len(),
        recorded.as_secs_f64(),
        picks.len(),
        distinct_fs,
        (chosen - recorded).as_secs_f64(),
        nested_jobs.len(),
        nested.len(),
        (started.elapsed() - chosen).as_secs_f64()
    );
    for (p, [n, dups, restored, removed, q]) in &stats {
        eprintln!(
            "powercut: {p:?}: {n} states passed; {dups} resends of mail delivered before the cut, {restored} queue files restored from the journal, {removed} delivered messages' files removed, {q} quarantined"
        );
    }
    let explored = jobs.len() + nested_jobs.len();
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        // Keep the recording, with a readable listing of the log, for the post-mortem.
        let kept = base.keep();
        let mut txt = String::new();
        for (j, (r, op)) in rec.log.recs.iter().zip(&rec.log.ops).enumerate() {
            let op = match op {
                MOp::Write {
                    node,
                    off,
                    len,
                    data,
                } => format!(
                    "Write node {node} {off}+{len}{}",
                    if data.is_none() { " zeroes" } else { "" }
                ),
                other => format!("{other:?}"),
            };
            txt.push_str(&format!(
                "{j} {} {} {} ino={} {} | {op} | durable at {} (source {})\n",
                r.op,
                r.pid,
                r.comm,
                r.ino,
                r.arg,
                rec.log.durable_at[j] as i64,
                rec.log.src_durable_at[j] as i64
            ));
        }
        std::fs::write(kept.join("ops.txt"), txt).unwrap();
        std::fs::write(scratch.join("failures.txt"), failures.join("\n")).unwrap();
        eprintln!(
            "powercut: failing states in {}, the recording in {}",
            scratch.display(),
            kept.display()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} crash states failed:\n{}",
        failures.len(),
        explored,
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        explored >= total * 9 / 10,
        "only {explored} distinct crash states found"
    );
}
