//! Hostile clients against the real binary: memory before login, slow clients, floods.
//!
//! Memory is read from the daemon's `/proc/PID/status` and compared with generous bounds: the
//! bounds are correctness limits (postern must not grow with the number of hostile clients),
//! not performance claims.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A fast test hash (`postern hash-password`'s parameters: 19 MiB, 2 passes).
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$cG9zdGVybi10ZXN0LXNhbHQ$vQHoBfYySye3Ul3+1wE9tIiPw+P/TYI5Er0b+aERM6c";

/// `127.0.0.n`: every 127/8 address is local on Linux, so one machine can be many clients.
fn lo(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
}

/// A blocking connection to `addr` from the local address `src`.
fn connect_from(src: IpAddr, addr: SocketAddr) -> Option<Raw> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .ok()?;
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().ok()?;
        sock.bind(SocketAddr::new(src, 0)).ok()?;
        sock.connect(addr).await.ok()?.into_std().ok()
    })?;
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    Some(Raw::from_stream(s))
}

/// A `VmRSS`/`VmHWM` figure of the daemon, in bytes.
fn memory(p: &Postern, field: &str) -> u64 {
    let pid = p.child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    kb * 1024
}

const MB: u64 = 1 << 20;

/// Issue 7 item 3: 200 clients sending one wrong AUTH PLAIN each took RSS from 7 MB to
/// 3.2–3.7 GB, one 19 MiB argon2 check each, all at once. Now the checks queue for a few slots.
#[test]
fn wrong_passwords_from_200_clients_do_not_cost_memory() {
    let p = Postern::start(&basic_config(
        "auth = \"optional\"",
        &format!(
            "[limits]\nmax_connections = 400\n\n[user.scanner]\npassword_hash = \"{HASH}\"\nmay_send_as = [\"*\"]\n"
        ),
    ));
    let addr = p.addr();
    let before = memory(&p, "VmRSS:");
    let n = 200;
    let ready = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let ready = ready.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    // One address each: the brute-force guard's delays stay out of the way.
                    let mut c = connect_from(lo(2 + i as u32), addr).expect("connect");
                    expect(&c.reply(), "220");
                    expect(&c.cmd("EHLO attacker.test"), "250");
                    ready.wait();
                    // Half known, half unknown user names (the unknown ones take the dummy).
                    let user = if i % 2 == 0 { "scanner" } else { "nobody" };
                    let plain = base64(format!("\0{user}\0guess{i}").as_bytes());
                    c.cmd(&format!("AUTH PLAIN {plain}"))
                })
                .expect("thread")
        })
        .collect();
    let replies: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &replies {
        expect(r, "535 5.7.8");
    }
    let peak = memory(&p, "VmHWM:");
    eprintln!(
        "{n} wrong passwords: peak RSS {} MB (idle {} MB)",
        peak / MB,
        before / MB
    );
    assert!(
        peak < 150 * MB,
        "peak RSS {} MB (idle {} MB) after {n} wrong passwords",
        peak / MB,
        before / MB
    );
    // And the daemon goes on serving.
    let mut c = Raw::connect(addr);
    expect(&c.reply(), "220");
    expect(&c.cmd("QUIT"), "221");
}

/// Standard base64, for AUTH PLAIN.
fn base64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Issue 7 item 3: 190 unfinished 900 KB DATA transfers took 109 MB RSS. Memory for messages
/// being received is a configured budget now; beyond it bodies go to tmp/.
#[test]
fn unfinished_data_from_190_clients_stays_within_message_memory() {
    let p = Postern::start(&basic_config(
        "max_message_size = \"10 MB\"",
        "[limits]\nmax_connections = 400\nmessage_memory = \"8 MiB\"\n",
    ));
    let addr = p.addr();
    let idle = memory(&p, "VmRSS:");
    let n = 190;
    let body: Vec<u8> =
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n".repeat(900_000 / 64);
    let sent = Arc::new(Barrier::new(n + 1));
    let go = Arc::new(Barrier::new(n + 1));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (sent, go, body) = (sent.clone(), go.clone(), body.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut c = connect_from(lo(2 + (i as u32) / 10), addr).expect("connect");
                    expect(&c.reply(), "220");
                    expect(&c.cmd("EHLO sender.test"), "250");
                    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
                    expect(&c.cmd("RCPT TO:<b@example.org>"), "250");
                    expect(&c.cmd("DATA"), "354");
                    c.s.write_all(&body).expect("send body");
                    sent.wait();
                    go.wait();
                    // Ten finish their message; the others hang up.
                    if i % 19 == 0 {
                        c.send(b".\r\n");
                        let r = c.reply();
                        let _ = c.cmd("QUIT");
                        Some(r)
                    } else {
                        None
                    }
                })
                .expect("thread")
        })
        .collect();
    sent.wait();
    // Every byte has been sent; give the daemon time to read what the sockets hold.
    let spilled = |p: &Postern| std::fs::read_dir(p.path("spool/tmp")).map_or(0, |d| d.count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while spilled(&p) < n - 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = memory(&p, "VmRSS:");
    let on_disk = spilled(&p);
    eprintln!(
        "{n} unfinished messages: RSS {} MB (idle {} MB), {on_disk} drafts in tmp/",
        rss / MB,
        idle / MB
    );
    go.wait();
    let replies: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    // 8 MiB hold at most 8 whole messages; the rest went to tmp/.
    assert!(on_disk >= n - 8, "only {on_disk} of {n} drafts in tmp/");
    // The budget, plus per connection its read and decode buffers (under 160 KiB). Before,
    // the budget was a fixed 64 MiB on top of 64 KiB per session: 109 MB here.
    assert!(
        rss < idle + 8 * MB + n as u64 * 160 * 1024,
        "RSS {} MB with {n} unfinished messages (idle {} MB)",
        rss / MB,
        idle / MB
    );
    assert_eq!(replies.len(), 10);
    for r in &replies {
        expect(r, "250 2.0.0");
    }
    assert_eq!(p.wait_delivered(10, Duration::from_secs(60)).len(), 10);
    // The abandoned ones left nothing behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    while spilled(&p) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(spilled(&p), 0, "drafts of abandoned messages left in tmp/");
}

/// Issue 7 item 4: with command_timeout = 5 s, `NOOP\r\n` sent one byte every 3 s got 250
/// after 18 s. The timeout is a deadline for the whole line now.
#[test]
fn a_line_trickled_byte_by_byte_gets_421_at_the_command_deadline() {
    let p = Postern::start(&basic_config("command_timeout = \"2s\"", ""));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    let start = Instant::now();
    for b in b"NOOP\r\n" {
        c.send(&[*b]);
        std::thread::sleep(Duration::from_millis(800));
    }
    let r = c.reply();
    expect(&r, "421 4.4.2");
    assert!(c.closed());
    // Not a timing claim: the line was still incomplete when the reply came.
    assert!(start.elapsed() < Duration::from_secs(30));
    // A line sent in one go still gets its answer.
    let mut c = Raw::connect(p.addr());
    c.reply();
    expect(&c.cmd("NOOP"), "250");
}

/// Issue 7 item 4: DATA has a deadline with a minimum rate (min_data_rate), not only an idle
/// timeout per read.
#[test]
fn data_slower_than_min_data_rate_gets_421() {
    let p = Postern::start(&basic_config(
        "data_timeout = \"2s\"\nmin_data_rate = 1000",
        "",
    ));
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO slow.test"), "250");
    expect(&c.cmd("MAIL FROM:<a@example.com>"), "250");
    expect(&c.cmd("RCPT TO:<b@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    // 100 bytes every 0.4 s (250 bytes/s, a quarter of the minimum), for up to 20 s: each
    // read comes long before data_timeout, which alone would never fire.
    let line = [b"z".repeat(98), b"\r\n".to_vec()].concat();
    let start = Instant::now();
    c.s.set_nonblocking(true).expect("nonblocking");
    let mut answered = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        let _ = c.s.write_all(&line);
        std::thread::sleep(Duration::from_millis(400));
        let mut buf = [0u8; 512];
        if let Ok(n) = std::io::Read::read(&mut c.s, &mut buf)
            && n > 0
        {
            answered = String::from_utf8_lossy(&buf[..n]).to_string();
            break;
        }
    }
    expect(&answered, "421 4.4.2");
    assert!(
        p.wait_log("end=timeout", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
    assert!(delivered_ids(&p.path("delivered")).is_empty());
}

/// Slow connections that never finish a line, from `addresses`, `per_address` each; they
/// trickle a byte now and then until dropped.
fn flood(addr: SocketAddr, addresses: std::ops::Range<u32>, per_address: usize) -> Vec<Raw> {
    let mut held = Vec::new();
    for a in addresses {
        for _ in 0..per_address {
            if let Some(mut c) = connect_from(lo(a), addr) {
                c.send(b"N");
                held.push(c);
            }
        }
    }
    held
}

/// A client from 127.0.0.1 gets its message accepted.
fn assert_served(addr: SocketAddr) {
    let r = send_mail(
        addr,
        "a@example.com",
        &["b@example.org"],
        b"Subject: x\r\n\r\nserved",
    );
    expect(&r, "250 2.0.0");
}

/// Issue 7 item 4, the brief's case: a flood of slow connections from addresses outside
/// allow_networks is refused before it holds a slot, so an allowed client is served.
#[test]
fn a_flood_from_outside_allow_networks_does_not_lock_out_allowed_clients() {
    let p = Postern::start(
        &basic_config(
            "",
            "[limits]\nmax_connections = 20\nmax_connections_per_ip = 10\n",
        )
        .replace(
            "allow_networks = [\"127.0.0.0/8\"]",
            "allow_networks = [\"127.0.0.1\"]",
        ),
    );
    let addr = p.addr();
    let mut held = flood(addr, 2..22, 5);
    assert!(held.len() >= 90, "flood opened {}", held.len());
    for c in held.iter_mut().take(5) {
        expect(&c.reply(), "554 5.7.1");
    }
    assert_served(addr);
}

/// Issue 7 item 4, the reported case: 1,000 slow connections from 50 allowed addresses kept
/// all 200 slots, and a legitimate client got 421. At the limit, a client with fewer
/// connections now takes the slot of an address hoarding more.
#[test]
fn a_flood_from_allowed_addresses_does_not_lock_out_a_client_with_fewer() {
    let p = Postern::start(&basic_config(
        "",
        "[limits]\nmax_connections = 30\nmax_connections_per_ip = 20\n",
    ));
    let addr = p.addr();
    let held = flood(addr, 2..12, 6);
    assert_eq!(held.len(), 60);
    // Let the daemon take them all in: 30 hold a slot, about three per address.
    std::thread::sleep(Duration::from_secs(1));
    // Full: one more from a flooding address gets 421 (nobody holds two more than it).
    let mut more = connect_from(lo(2), addr).expect("connect");
    expect(&more.reply(), "421 4.7.0");
    // A client from an address of its own is served, and delivers its message.
    assert_served(addr);
    assert!(
        p.wait_log("evicted", Duration::from_secs(5)),
        "{}",
        p.log_text()
    );
    drop(held);
}

/// A client that triggers thousands of refusals must not write thousands of log lines: each
/// used to cost two (`refused: client not in allow_networks` and the maillog's `rejected`).
/// Now a client logs at most 20 refusals a minute, and the rest are summed up in one line
/// when the minute is over (here: at shutdown).
#[test]
fn a_refusal_flood_is_summed_up_not_logged_line_by_line() {
    let mut p = Postern::start(&basic_config("", "").replace(
        "allow_networks = [\"127.0.0.0/8\"]",
        "allow_networks = [\"127.0.0.1\"]",
    ));
    let addr = p.addr();
    let n = 1000;
    for _ in 0..n {
        let mut c = connect_from(lo(9), addr).expect("connect");
        expect(&c.reply(), "554 5.7.1");
    }
    // Another client still gets its refusals logged.
    let mut other = connect_from(lo(10), addr).expect("connect");
    expect(&other.reply(), "554 5.7.1");
    assert!(
        p.wait_log("client=\"127.0.0.10:", Duration::from_secs(10)),
        "{}",
        p.log_text()
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(p.wait_log("postern stopped", Duration::from_secs(10)));
    let log = p.log_text();
    let lines = log.lines().filter(|l| l.contains("127.0.0.9")).count();
    // 20 refusals and one summary.
    assert_eq!(lines, 21, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("event=\"rejected_unlogged\"")
                && l.contains("client=\"127.0.0.9\"")
                && l.contains(&format!("count={}", n - 20))),
        "{log}"
    );
}

/// A guesser spreading its attempts over many addresses, each under `auth_max_failures`,
/// is stopped by the count on the user name; the device that logged in as that user before
/// keeps logging in. Before, each address got its own 5 attempts: unlimited guesses from a
/// range of addresses (an IPv6 /64 is 2^64 of them).
#[test]
fn a_guesser_spread_over_addresses_is_locked_out_of_the_user_but_not_its_device() {
    let hash = crate::protocol::hash("device-pw");
    let p = Postern::start(&basic_config(
        "auth = \"optional\"",
        &format!(
            "[limits]\nauth_max_failures = 5\nauth_max_failures_per_user = 8\n\n[user.scanner]\npassword_hash = \"{hash}\"\nmay_send_as = [\"*\"]\n"
        ),
    ));
    let addr = p.addr();
    let login = |src: u32, pw: &str| {
        let mut c = connect_from(lo(src), addr).expect("connect");
        expect(&c.reply(), "220");
        expect(&c.cmd("EHLO t"), "250");
        let plain = base64(format!("\0scanner\0{pw}").as_bytes());
        c.cmd(&format!("AUTH PLAIN {plain}"))
    };
    // The device logs in from its address.
    expect(&login(1, "device-pw"), "235");
    // Four addresses, two guesses each: none reaches its own limit of 5.
    for src in 20..24 {
        for i in 0..2 {
            expect(&login(src, &format!("guess{src}-{i}")), "535");
        }
    }
    // The name is locked now, for a fifth address even with the right password...
    expect(&login(24, "device-pw"), "454 4.7.0");
    // ...but not for the device.
    expect(&login(1, "device-pw"), "235");
    assert!(
        p.wait_log(
            "too many failed AUTH attempts on this user name",
            Duration::from_secs(10)
        ),
        "{}",
        p.log_text()
    );
}
