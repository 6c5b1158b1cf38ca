//! No secret ever reaches a log line: passwords given to AUTH, in any test.

use crate::harness::*;

/// Passwords the suite's tests send (AUTH); none may appear in any daemon log.
const SECRETS: &[&str] = &["s3cret-pw", "tls-pass", "guess0", "guess1"];

#[test]
fn zz_no_secret_in_any_log_of_this_run() {
    // Runs in the same binary as the other tests; it sees the logs of the daemons that ran
    // before it and additionally runs its own AUTH dialogue.
    let hash = crate::protocol::hash("s3cret-pw");
    let cfg = basic_config(
        r#"auth = "optional""#,
        &format!("[user.u]\npassword_hash = \"{hash}\"\nmay_send_as = [\"*\"]\n"),
    );
    let p = Postern::start(&cfg);
    let mut c = Raw::connect(p.addr());
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO t"), "250");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode("\0u\0s3cret-pw");
    expect(&c.cmd(&format!("AUTH PLAIN {b64}")), "235");
    let wrong = base64::engine::general_purpose::STANDARD.encode("\0u\0guess0");
    let mut c2 = Raw::connect(p.addr());
    c2.reply();
    c2.cmd("EHLO t");
    expect(&c2.cmd(&format!("AUTH PLAIN {wrong}")), "535");
    drop(p);
    let logs = ALL_LOGS.lock().unwrap();
    assert!(!logs.is_empty());
    for line in logs.iter() {
        for s in SECRETS.iter().chain([&crate::fake::entra::SECRET]) {
            assert!(!line.contains(s), "secret {s:?} in log line {line}");
        }
        assert!(
            !line.contains(&b64) && !line.contains(&wrong),
            "encoded credentials in log line {line}"
        );
    }
}
