//! Many parallel connections against the connection limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::harness::*;

#[test]
fn thousand_parallel_connections_respect_the_limits() {
    let p = Postern::start(&basic_config(
        "",
        "[limits]\nmax_connections = 300\nmax_connections_per_ip = 200\n",
    ));
    let addr = p.addr();
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(std::sync::Barrier::new(1000));
    let mut threads = Vec::new();
    for _ in 0..1000 {
        let (a, r, o, b) = (
            accepted.clone(),
            refused.clone(),
            other.clone(),
            barrier.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let Some(mut c) = Raw::try_connect(addr) else {
                        o.fetch_add(1, Ordering::Relaxed);
                        b.wait();
                        return;
                    };
                    let g = c.reply();
                    if g.starts_with("220") {
                        a.fetch_add(1, Ordering::Relaxed);
                    } else if g.starts_with("421 4.7.0") {
                        r.fetch_add(1, Ordering::Relaxed);
                    } else {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    // hold every connection open until all have been answered
                    b.wait();
                    if g.starts_with("220") {
                        let _ = c.cmd("QUIT");
                    }
                })
                .unwrap(),
        );
    }
    for t in threads {
        t.join().unwrap();
    }
    let (a, r, o) = (
        accepted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    assert_eq!(a + r + o, 1000);
    assert!(a <= 200, "per-IP limit 200, accepted {a}");
    assert!(a >= 150, "accepted {a}");
    assert!(r >= 700, "refused {r}, other {o}");
    // and the daemon still serves normally afterwards
    std::thread::sleep(Duration::from_millis(200));
    expect(
        &send_mail(
            addr,
            "a@example.com",
            &["b@example.org"],
            b"Subject: after\r\n\r\nx",
        ),
        "250",
    );
}
