//! Crash tests: SIGKILL the daemon under load, mid-DATA and mid-delivery, restart, and check
//! that every acknowledged message is delivered, no unfinished one is, and the spool is clean.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// What a client knows about each message it tried.
#[derive(Default)]
struct Ledger {
    /// Got "250 ... queued as".
    acked: HashSet<String>,
    /// Sent the final CRLF.CRLF but saw no reply (may or may not be queued).
    unknown: HashSet<String>,
    /// Never sent the end of DATA: must never be delivered.
    unfinished: HashSet<String>,
}

fn client_loop(
    addr: std::net::SocketAddr,
    worker: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    slow: bool,
) {
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let tag = format!("w{worker}-m{n}");
        let Some(mut c) = Raw::try_connect(addr) else {
            return;
        };
        if !c.reply().starts_with("220") {
            return;
        }
        let ok = c.cmd("EHLO crash").starts_with("250")
            && c.cmd("MAIL FROM:<load@example.com>").starts_with("250")
            && c.cmd("RCPT TO:<sink@example.org>").starts_with("250")
            && c.cmd("DATA").starts_with("354");
        if !ok {
            return;
        }
        ledger.lock().unwrap().unfinished.insert(tag.clone());
        let body = format!(
            "Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n{}\r\n",
            "0123456789".repeat(200)
        );
        c.send(body.as_bytes());
        if slow {
            // Linger mid-DATA so that a kill lands here.
            std::thread::sleep(Duration::from_millis(150));
        }
        {
            let mut l = ledger.lock().unwrap();
            l.unfinished.remove(&tag);
            l.unknown.insert(tag.clone());
        }
        c.send(b".\r\n");
        let r = c.reply();
        let mut l = ledger.lock().unwrap();
        if r.starts_with("250") {
            l.unknown.remove(&tag);
            l.acked.insert(tag);
        } else if !r.is_empty() {
            l.unknown.remove(&tag); // refused: not queued
        } else {
            return; // server gone
        }
    }
}

fn delivered_tags(p: &Postern) -> Vec<String> {
    let dir = p.path("delivered");
    let mut tags = Vec::new();
    for id in delivered_ids(&dir) {
        let eml = std::fs::read_to_string(dir.join(format!("{id}.eml"))).unwrap_or_default();
        if let Some(line) = eml.lines().find(|l| l.starts_with("X-Tag: ")) {
            tags.push(line["X-Tag: ".len()..].to_string());
        }
    }
    tags
}

fn count(dir: std::path::PathBuf) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn sigkill_under_load_and_mid_data_loses_nothing_acknowledged() {
    let mut p = Postern::start(&basic_config("", ""));
    let addr = p.addr();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..8 {
        let (l, s) = (ledger.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            client_loop(addr, w, l, s, w % 2 == 1)
        }));
    }
    // Let a few hundred messages through, then kill while clients are mid-transaction.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger.lock().unwrap().acked.len() < 150 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    p.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let (acked, unknown, unfinished) = {
        let l = ledger.lock().unwrap();
        (l.acked.clone(), l.unknown.clone(), l.unfinished.clone())
    };
    assert!(
        acked.len() >= 50,
        "load generated only {} messages",
        acked.len()
    );

    p.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tags: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        tags = delivered_tags(&p);
        if acked.iter().all(|t| tags.contains(t)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let set: HashSet<String> = tags.iter().cloned().collect();
    let lost: Vec<_> = acked.iter().filter(|t| !set.contains(*t)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let leaked: Vec<_> = unfinished.iter().filter(|t| set.contains(*t)).collect();
    assert!(
        leaked.is_empty(),
        "never finished DATA but delivered: {leaked:?}"
    );
    for t in &set {
        assert!(
            acked.contains(t) || unknown.contains(t),
            "delivered something nobody sent: {t}"
        );
    }
    assert_eq!(
        set.len(),
        tags.len(),
        "a message was delivered twice under two ids"
    );
    // Let the forwarder settle, then the spool is clean.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(p.path("spool/tmp")), 0, "tmp/ must be empty");
    assert_eq!(count(p.path("spool/corrupt")), 0, "corrupt/ must be empty");
}

#[test]
fn sigkill_mid_delivery_redelivers_after_restart() {
    let mut p = Postern::start(&basic_config(r#"max_message_size = "200 MB""#, ""));
    // A big message makes the file transport's copy slow enough to be killed in the middle.
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    expect(&c.cmd("MAIL FROM:<big@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<x@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"Subject: big\r\nX-Tag: big\r\n\r\n");
    let line = format!("{}\r\n", "y".repeat(998));
    let chunk = line.repeat(1000);
    for _ in 0..80 {
        c.send(chunk.as_bytes());
    }
    c.send(b".\r\n");
    let r = c.reply();
    expect(&r, "250 2.0.0");
    let id = queued_id(&r);
    // Kill as soon as the message is claimed (in active/) and before it is finished.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.path("spool/active").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    p.kill9();
    let json = p.path("delivered").join(format!("{id}.json"));
    let delivered_before = json.exists();
    p.spawn();
    let ids = p.wait_delivered(1, Duration::from_secs(30));
    assert_eq!(
        ids,
        vec![id.clone()],
        "delivered once, under its own id (was delivered before kill: {delivered_before})"
    );
    let size = std::fs::metadata(p.path("delivered").join(format!("{id}.eml")))
        .unwrap()
        .len();
    assert!(size > 80_000_000, "complete copy, got {size}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.path("spool/active").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        count(p.path("spool/incoming")) + count(p.path("spool/active")),
        0
    );
    assert_eq!(count(p.path("spool/corrupt")), 0);
    // No leftover temp files from the interrupted copy under the final names.
    let partial: Vec<_> = std::fs::read_dir(p.path("delivered"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(
        partial
            .iter()
            .all(|n| !n.to_string_lossy().ends_with(".new")),
        "{partial:?}"
    );
}

/// What a power cut can do to queue files that were only in the page cache (the intake
/// journal's bargain, see src/spool/journal.rs): gone, or the right length but zeroes. The
/// daemon is killed before its checkpoint, the files are damaged that way, and every
/// acknowledged message must still be delivered once, intact, from the journal.
#[test]
fn queue_files_a_power_cut_took_come_back_from_the_journal() {
    let mut p = Postern::start(&basic_config("", ""));
    // While `delivered` is a plain file, deliveries fail and the mail stays queued.
    std::fs::write(p.path("delivered"), b"not a directory").unwrap();
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = format!(
            "Subject: cut {i}\r\nX-Tag: cut{i}\r\n\r\n{}\r\n",
            "z".repeat(100 * i)
        );
        let r = send_mail(
            p.addr(),
            "a@example.com",
            &["b@example.org"],
            body.as_bytes(),
        );
        expect(&r, "250 2.0.0");
        sent.push((queued_id(&r), body));
    }
    p.kill9(); // well inside the 5 s before a checkpoint
    for (n, (id, _)) in sent.iter().enumerate() {
        for dir in ["incoming", "active", "deferred"] {
            let f = p.path("spool").join(dir).join(id);
            if let Ok(m) = std::fs::metadata(&f) {
                if n % 2 == 0 {
                    std::fs::remove_file(&f).unwrap();
                } else {
                    std::fs::write(&f, vec![0u8; m.len() as usize]).unwrap();
                }
            }
        }
    }
    std::fs::remove_file(p.path("delivered")).unwrap();
    p.spawn();
    let ids = p.wait_delivered(20, Duration::from_secs(30));
    assert_eq!(ids.len(), 20, "delivered: {ids:?}");
    for (id, body) in &sent {
        let eml = std::fs::read(p.path("delivered").join(format!("{id}.eml"))).unwrap();
        let text = String::from_utf8_lossy(&eml);
        assert!(
            text.contains(body.as_str()) && text.contains("Received: from client.test"),
            "{id} arrived damaged: {text:?}"
        );
    }
    assert!(
        p.wait_log("restored=20", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
    assert_eq!(count(p.path("spool/corrupt")), 0);
}
