//! Fuzz the envelope address type (`address.rs`) and the escaping of untrusted text: whatever
//! a client writes after `MAIL FROM:` or `RCPT TO:`, a path that parses writes itself back in
//! a form that parses to the same path with the same parameters after it (so nothing inside
//! an address can end the path early or add an ESMTP parameter upstream), holds no control
//! character, and stays within RFC 5321's length; and escaped text holds nothing a terminal
//! would act on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::address::{self, Address, ForwardPath, MAX_PATH, ReversePath};
use postern::escape;

/// The written form of a mailbox is safe on the wire, and means the same mailbox.
fn check_written(a: &Address) {
    let w = a.to_string();
    assert!(w.len() + 2 <= MAX_PATH, "written form too long: {w:?}");
    assert!(!w.chars().any(escape::is_control), "control in {w:?}");
    assert_eq!(
        Address::parse(&w).as_ref(),
        Ok(a),
        "{w:?} reads back differently"
    );
    assert_eq!(
        Address::from_spool(&w).as_ref(),
        Ok(a),
        "spool form of {w:?}"
    );
    assert_eq!(address::wire_form(&w).as_deref(), Ok(w.as_str()));
    // As upstream would see it, followed by a parameter of ours.
    let line = format!("<{w}> NOTIFY=NEVER");
    match ForwardPath::parse(&line) {
        Ok((ForwardPath::Mailbox(b), rest)) => {
            assert_eq!(&b, a, "{line:?}");
            assert_eq!(rest, " NOTIFY=NEVER", "{line:?}");
        }
        other => panic!("{line:?} parsed as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let shown = escape::untrusted(text);
    assert!(!shown.chars().any(escape::needs_escape), "{shown:?}");

    if let Ok(a) = Address::parse(text) {
        check_written(&a);
    }
    if let Ok(a) = Address::from_spool(text) {
        check_written(&a);
    }
    if let Ok((p, rest)) = ReversePath::parse(text) {
        if let Some(a) = p.mailbox() {
            check_written(a);
        }
        let again = format!("<{p}>{rest}");
        assert_eq!(
            ReversePath::parse(&again),
            Ok((p.clone(), rest)),
            "{again:?}"
        );
    }
    if let Ok((p, rest)) = ForwardPath::parse(text) {
        if let ForwardPath::Mailbox(a) = &p {
            check_written(a);
        }
        let again = format!("<{p}>{rest}");
        assert_eq!(
            ForwardPath::parse(&again),
            Ok((p.clone(), rest)),
            "{again:?}"
        );
    }
});
