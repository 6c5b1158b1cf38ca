//! Fuzz the DATA and BDAT decoders: no panics, output independent of how the input is
//! chunked, never more than the size limit, and only `CRLF.CRLF` ends DATA.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::config::BareLfPolicy;
use postern::smtp::data::{BdatDecoder, DataDecoder};

const MAX: u64 = 4096;

fn run(input: &[u8], cuts: &[usize], policy: BareLfPolicy) -> (Vec<u8>, usize, bool) {
    let mut d = DataDecoder::new(policy, MAX);
    let mut out = Vec::new();
    let mut pos = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        if end < pos {
            continue;
        }
        let fed = d.feed(&input[pos..end], &mut out);
        assert!(fed.consumed <= end - pos);
        pos += fed.consumed;
        if fed.done {
            return (out, pos, true);
        }
    }
    (out, pos, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let policy = if ctl & 1 == 0 {
        BareLfPolicy::Normalize
    } else {
        BareLfPolicy::Reject
    };
    // Cut points derived from the input itself.
    let mut cuts: Vec<usize> = input
        .iter()
        .take(8)
        .map(|&b| (b as usize * 7 + ctl as usize) % (input.len() + 1))
        .collect();
    cuts.sort_unstable();

    let whole = run(input, &[], policy);
    assert_eq!(
        whole,
        run(input, &cuts, policy),
        "chunking changed the result"
    );
    let ones: Vec<usize> = (1..input.len().min(256)).collect();
    assert_eq!(
        whole,
        run(input, &ones, policy),
        "byte-at-a-time changed the result"
    );
    let (out, consumed, done) = whole;
    assert!(out.len() as u64 <= MAX);
    if done {
        // The only terminator: CRLF.CRLF (or .CRLF at the very start).
        let end = &input[..consumed];
        assert!(
            end == b".\r\n" || end.ends_with(b"\r\n.\r\n"),
            "ended on {end:?}"
        );
    }
    if policy == BareLfPolicy::Normalize {
        // Stored text never holds a bare LF.
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r', "bare LF stored");
            }
        }
    }

    let mut b1 = BdatDecoder::new(policy, MAX);
    let mut o1 = Vec::new();
    b1.feed(input, &mut o1);
    let mut b2 = BdatDecoder::new(policy, MAX);
    let mut o2 = Vec::new();
    let mut pos = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        b2.feed(&input[pos..c], &mut o2);
        pos = c;
    }
    assert_eq!((o1, b1.outcome()), (o2, b2.outcome()));
});
