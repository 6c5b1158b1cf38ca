//! Sans-IO decoders for the message body: [`DataDecoder`] for `DATA` (dot-stuffed, ends at
//! `CRLF.CRLF`) and [`BdatDecoder`] for `BDAT` chunks (exact byte counts, no stuffing).
//!
//! Both are fed arbitrary byte chunks and append the bytes to store to a caller-supplied
//! buffer, so memory stays bounded by the chunk size: nothing ever buffers a line, and a body
//! line may be endlessly long.
//!
//! # What is stored
//! - **End of DATA**: only `CRLF "." CRLF` ends DATA, where the first CRLF may also be the
//!   start of the data (a `.CRLF` right after the 354). Nothing else does: not `LF.LF`,
//!   `LF.CRLF`, `CRLF.LF`, `CR.CR`, `CR.CRLF`... (the SMTP smuggling sequences). Bytes after
//!   the real end are left unconsumed: they are the next pipelined commands.
//! - **Dot-unstuffing** (RFC 5321 §4.5.2) applies to lines that begin after a real CRLF (or at
//!   the start): a leading `.` followed by anything other than CRLF is removed. A line that is
//!   just `.` but ends with a bare LF is not an end and is stored as `.` + CRLF. After a bare
//!   LF or a bare CR nothing is unstuffed: the `.` is kept as data.
//! - **Bare LF** (LF not preceded by CR): with [`BareLfPolicy::Normalize`] it is stored as
//!   CRLF; with [`BareLfPolicy::Reject`] the message is refused (`550 5.6.0 Message contains
//!   bare LF`) after it has been read to the end. A bare LF never ends DATA either way.
//! - **Bare CR** (CR not followed by LF) is stored as it is, as data.
//! - **NUL bytes**: the message is refused (`550 5.6.0 Message contains NUL characters`) after
//!   it has been read to the end: Microsoft 365 and many MUAs mishandle NULs, and a message
//!   we cannot forward must not be acknowledged.
//! - **8-bit bytes** in headers or body are accepted and stored verbatim, whatever `BODY=`
//!   said (Postfix does the same); SMTPUTF8/8BITMIME are recorded in the envelope.
//! - **Size**: counted over the stored bytes as they arrive; past the limit nothing more is
//!   produced, the rest is read and thrown away, and the message is refused with `552 5.3.4`.
//!
//! Once a message is doomed (too big, NUL, bare LF under `reject`) the decoders stop producing
//! output, because the draft will be discarded anyway.

use crate::config::BareLfPolicy;

/// Reads a message's `From:` field as the message is stored, to check it at the end of DATA
/// (policy: an address the route's upstream never sends as is refused). Keeps only the line
/// being read and the `From:` field (each at most [`HeaderCapture::MAX`] bytes), and stops at
/// the end of the header section: a few bytes per session, whatever the message.
#[derive(Debug, Default)]
pub struct HeaderCapture {
    line: Vec<u8>,
    field: Vec<u8>,
    in_from: bool,
    done: bool,
}

impl HeaderCapture {
    /// Longest line or `From:` field kept (RFC 5322 allows 998 bytes a line).
    pub const MAX: usize = 4096;

    /// Append stored message bytes (CRLF line ends), until the header section has ended.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b != b'\n' {
                if self.line.len() < Self::MAX {
                    self.line.push(b);
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.end_line(&line);
        }
    }

    fn end_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.done = true;
        } else if matches!(line[0], b' ' | b'\t') {
            if self.in_from && self.field.len() + line.len() + 2 <= Self::MAX {
                self.field.extend_from_slice(b"\r\n");
                self.field.extend_from_slice(line);
            }
        } else if self.in_from {
            // The first From: field is complete: nothing else is needed.
            self.done = true;
        } else if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"from:") {
            self.in_from = true;
            self.field = line.to_vec();
        }
    }

    /// The `From:` address read, lowercased.
    pub fn from(&self) -> Option<String> {
        let mut f = self.field.clone();
        f.extend_from_slice(b"\r\n\r\n");
        crate::address::header_from(&f)
    }
}

/// How a body ended up, for the reply at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataOutcome {
    /// Bytes produced (stored), up to the point the message was doomed.
    pub size: u64,
    /// The body exceeded the size limit.
    pub too_big: bool,
    /// The body contained a bare LF and the policy is `reject`.
    pub bare_lf: bool,
    /// The body contained a NUL byte.
    pub nul: bool,
}

impl DataOutcome {
    /// Will this message be refused?
    pub fn doomed(&self) -> bool {
        self.too_big || self.bare_lf || self.nul
    }
}

/// Output side shared by both decoders: size accounting and refusal flags.
#[derive(Debug, Clone)]
struct Output {
    policy: BareLfPolicy,
    max: u64,
    outcome: DataOutcome,
}

impl Output {
    fn new(policy: BareLfPolicy, max: u64) -> Self {
        Self {
            policy,
            max,
            outcome: DataOutcome::default(),
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if self.outcome.doomed() || bytes.is_empty() {
            return;
        }
        // Emit exactly the prefix before the first refusal reason, so that what is produced
        // does not depend on how the input was chunked.
        let nul = memchr::memchr(0, bytes);
        let upto = nul.unwrap_or(bytes.len());
        let room = self.max.saturating_sub(self.outcome.size);
        if upto as u64 > room {
            let room = room as usize;
            out.extend_from_slice(&bytes[..room]);
            self.outcome.size += room as u64;
            self.outcome.too_big = true;
            return;
        }
        out.extend_from_slice(&bytes[..upto]);
        self.outcome.size += upto as u64;
        if nul.is_some() {
            self.outcome.nul = true;
        }
    }

    fn bare_lf(&mut self, out: &mut Vec<u8>) {
        match self.policy {
            BareLfPolicy::Normalize => self.emit(out, b"\r\n"),
            BareLfPolicy::Reject => self.outcome.bare_lf = true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// At the start of a line that began after a real CRLF (or the start of data).
    Bol,
    /// Saw `.` at `Bol`.
    BolDot,
    /// Saw `.CR` at `Bol`.
    BolDotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line (not yet known whether bare).
    Cr,
    /// `CRLF.CRLF` seen.
    Done,
}

/// Result of feeding bytes to [`DataDecoder::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Input bytes consumed (all of them unless `done`).
    pub consumed: usize,
    /// The end of data was reached; bytes after `consumed` are the next commands.
    pub done: bool,
}

/// Decoder for the body after `DATA`.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    st: St,
    out: Output,
}

impl DataDecoder {
    /// A decoder storing at most `max` bytes, treating bare LF per `policy`.
    pub fn new(policy: BareLfPolicy, max: u64) -> Self {
        Self {
            st: St::Bol,
            out: Output::new(policy, max),
        }
    }

    /// Has `CRLF.CRLF` been seen?
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// What happened so far.
    pub fn outcome(&self) -> DataOutcome {
        self.out.outcome
    }

    /// Decode `input`, appending the bytes to store to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        let mut i = 0;
        while i < input.len() {
            // Fast path: whole CRLF-ended lines, none starting with a dot, pass through as they
            // are (a bare CR inside a line is kept as is by the byte-wise machine below too), so
            // they are found with memchr and emitted in one go.
            if matches!(self.st, St::Bol | St::Mid) {
                let end = Self::plain_lines(input, i, self.st == St::Bol);
                if end > i {
                    self.out.emit(out, &input[i..end]);
                    i = end;
                    self.st = St::Bol;
                    continue;
                }
            }
            let b = input[i];
            match self.st {
                St::Done => {
                    return Fed {
                        consumed: i,
                        done: true,
                    };
                }
                St::Mid => {
                    // Fast path: copy the run of ordinary bytes in one go.
                    let run = input[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(input.len() - i);
                    if run > 0 {
                        self.out.emit(out, &input[i..i + run]);
                        i += run;
                        continue;
                    }
                    self.mid(b, out);
                }
                St::Bol => match b {
                    b'.' => self.st = St::BolDot,
                    _ => self.mid(b, out),
                },
                St::BolDot => match b {
                    b'\r' => self.st = St::BolDotCr,
                    b'\n' => {
                        // ".LF": not an end; keep the dot, the LF is a bare LF.
                        self.out.emit(out, b".");
                        self.out.bare_lf(out);
                        self.st = St::Mid;
                    }
                    _ => {
                        // Unstuff: drop the dot, the byte is ordinary line content.
                        self.st = St::Mid;
                        self.mid(b, out);
                    }
                },
                St::BolDotCr => {
                    if b == b'\n' {
                        self.st = St::Done;
                        return Fed {
                            consumed: i + 1,
                            done: true,
                        };
                    }
                    // ".CR x": the line has more than the dot, so the dot goes; the CR is bare.
                    self.out.emit(out, b"\r");
                    self.st = St::Mid;
                    self.mid(b, out);
                }
                St::Cr => match b {
                    b'\n' => {
                        self.out.emit(out, b"\r\n");
                        self.st = St::Bol;
                    }
                    b'\r' => self.out.emit(out, b"\r"),
                    _ => {
                        self.out.emit(out, b"\r");
                        self.st = St::Mid;
                        self.mid(b, out);
                    }
                },
            }
            i += 1;
        }
        Fed {
            consumed: input.len(),
            done: self.st == St::Done,
        }
    }

    /// The end of the run of complete lines from `at` that the byte-wise machine would copy
    /// verbatim: each ends with CRLF (no bare LF), and none after the first starts with a dot
    /// (the first does not either when `bol`). `at` itself when there is none.
    fn plain_lines(input: &[u8], at: usize, bol: bool) -> usize {
        let mut pos = at;
        let mut bol = bol;
        while pos < input.len() {
            if bol && input[pos] == b'.' {
                break;
            }
            match memchr::memchr(b'\n', &input[pos..]) {
                Some(k) if k > 0 && input[pos + k - 1] == b'\r' => {
                    pos += k + 1;
                    bol = true;
                }
                _ => break,
            }
        }
        pos
    }

    /// One byte of ordinary line content (state becomes `Mid` or `Cr`).
    fn mid(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.st = St::Cr,
            b'\n' => {
                self.out.bare_lf(out);
                self.st = St::Mid;
            }
            _ => {
                self.out.emit(out, &[b]);
                self.st = St::Mid;
            }
        }
    }
}

/// Decoder for `BDAT` chunks: every byte is data; bare LF handled as in DATA (a CR at the end
/// of one chunk followed by LF at the start of the next is a CRLF, not a bare LF).
#[derive(Debug, Clone)]
pub struct BdatDecoder {
    last_cr: bool,
    out: Output,
}

impl BdatDecoder {
    /// A decoder storing at most `max` bytes.
    pub fn new(policy: BareLfPolicy, max: u64) -> Self {
        Self {
            last_cr: false,
            out: Output::new(policy, max),
        }
    }

    /// What happened so far.
    pub fn outcome(&self) -> DataOutcome {
        self.out.outcome
    }

    /// Decode chunk bytes (all are consumed).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for (i, &b) in input.iter().enumerate() {
            if b == b'\n' {
                let bare = if i == 0 {
                    !self.last_cr
                } else {
                    input[i - 1] != b'\r'
                };
                if bare {
                    self.out.emit(out, &input[start..i]);
                    self.out.bare_lf(out);
                    start = i + 1;
                }
            }
        }
        self.out.emit(out, &input[start..]);
        if let Some(&last) = input.last() {
            self.last_cr = last == b'\r';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BIG: u64 = 1 << 30;

    /// Feed `input` split at `cuts`; return (stored, consumed-in-total, done, outcome).
    fn run_split(
        input: &[u8],
        cuts: &[usize],
        policy: BareLfPolicy,
        max: u64,
    ) -> (Vec<u8>, usize, bool, DataOutcome) {
        let mut d = DataDecoder::new(policy, max);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(input.len());
        for &end in &bounds {
            if end < pos {
                continue;
            }
            let fed = d.feed(&input[pos..end], &mut out);
            pos += fed.consumed;
            if fed.done {
                return (out, pos, true, d.outcome());
            }
        }
        (out, pos, false, d.outcome())
    }

    /// Check that every single split and (for short inputs) every pair of splits gives the
    /// same result as feeding all at once; return that result.
    fn decode_all_splits(
        input: &[u8],
        policy: BareLfPolicy,
    ) -> (Vec<u8>, usize, bool, DataOutcome) {
        let whole = run_split(input, &[], policy, BIG);
        for a in 0..=input.len() {
            assert_eq!(
                run_split(input, &[a], policy, BIG),
                whole,
                "split at {a} of {input:?}"
            );
            if input.len() <= 40 {
                for b in a..=input.len() {
                    assert_eq!(
                        run_split(input, &[a, b], policy, BIG),
                        whole,
                        "split at {a},{b} of {input:?}"
                    );
                }
            }
        }
        // One byte at a time.
        let ones: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run_split(input, &ones, policy, BIG), whole);
        whole
    }

    fn stored(input: &[u8]) -> (Vec<u8>, usize, bool) {
        let (o, c, d, _) = decode_all_splits(input, BareLfPolicy::Normalize);
        (o, c, d)
    }

    #[test]
    fn plain_message_and_pipelined_commands_after_the_end() {
        let input = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";
        let (out, consumed, done) = stored(input);
        assert!(done);
        assert_eq!(out, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(&input[consumed..], b"QUIT\r\n");
    }

    #[test]
    fn empty_message_ends_right_after_354() {
        let (out, consumed, done) = stored(b".\r\nMAIL");
        assert!(done);
        assert!(out.is_empty());
        assert_eq!(consumed, 3);
    }

    #[test]
    fn dot_unstuffing() {
        let (out, _, done) = stored(b"..leading\r\n...two\r\n.x\r\n. \r\n.\r\n");
        assert!(done);
        assert_eq!(out, b".leading\r\n..two\r\nx\r\n \r\n");
        let (out, _, done) = stored(b"..\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b".\r\n");
    }

    /// The SMTP smuggling sequences: none of them ends DATA; what is stored is defined.
    #[test]
    fn smuggling_sequences_do_not_end_data() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\n.\nMAIL FROM:<x@y>\n", b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"),
            (b"a\n.\r\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r\n.\nMAIL", b"a\r\n.\r\nMAIL"),
            (b"a\r.\r\nMAIL", b"a\r.\r\nMAIL"),
            (b"a\r\n.\rMAIL", b"a\r\n\rMAIL"),
            (b"a\r\n.\r\rMAIL", b"a\r\n\r\rMAIL"),
            (b".\nMAIL", b".\r\nMAIL"),
            (b".\rMAIL", b"\rMAIL"),
            (b"\n.\n", b"\r\n.\r\n"),
            (b"a\r\r\n.\n", b"a\r\r\n.\r\n"),
            (b"a\n\r\n.\n", b"a\r\n\r\n.\r\n"),
            (b"a\r.\r", b"a\r.\r"),
            (b"a\r\n..\n", b"a\r\n.\r\n"),
        ];
        for (input, want) in cases {
            let (out, consumed, done) = stored(input);
            assert!(!done, "{input:?} ended DATA");
            assert_eq!(consumed, input.len());
            // A trailing CR is pending until the next byte; compare what is known.
            let want_known: &[u8] = if want.ends_with(b"\r") && !want.ends_with(b"\r\n") {
                &want[..want.len() - 1]
            } else {
                want
            };
            assert_eq!(&out[..], want_known, "{input:?}");
        }
    }

    #[test]
    fn smuggling_then_real_end() {
        let input = b"a\n.\nRCPT TO:<evil@x>\r\nb\r\n.\r\nRSET\r\n";
        let (out, consumed, done) = stored(input);
        assert!(done);
        assert_eq!(out, b"a\r\n.\r\nRCPT TO:<evil@x>\r\nb\r\n");
        assert_eq!(&input[consumed..], b"RSET\r\n");
    }

    #[test]
    fn line_after_bare_lf_is_not_unstuffed() {
        let (out, _, _) = stored(b"a\n..b\r\n");
        assert_eq!(out, b"a\r\n..b\r\n");
    }

    #[test]
    fn bare_lf_reject_policy_flags_and_reads_to_the_end() {
        let input = b"a\nb\r\n.\r\nQUIT";
        let (_, consumed, done, outcome) = decode_all_splits(input, BareLfPolicy::Reject);
        assert!(done);
        assert!(outcome.bare_lf);
        assert_eq!(&input[consumed..], b"QUIT");
        let (_, _, done, outcome) = decode_all_splits(b"a\r\nb\r\n.\r\n", BareLfPolicy::Reject);
        assert!(done && !outcome.bare_lf);
        let (_, _, done, outcome) = decode_all_splits(b".\n.\r\n", BareLfPolicy::Reject);
        assert!(!done && outcome.bare_lf);
    }

    #[test]
    fn nul_is_refused_after_reading_to_the_end() {
        let input = b"a\0b\r\n.\r\nQUIT";
        let (_, consumed, done, outcome) = decode_all_splits(input, BareLfPolicy::Normalize);
        assert!(done && outcome.nul);
        assert_eq!(&input[consumed..], b"QUIT");
        let (_, _, _, outcome) = decode_all_splits(b".\0\r\n.\r\n", BareLfPolicy::Normalize);
        assert!(outcome.nul);
    }

    #[test]
    fn eight_bit_is_stored_verbatim() {
        let mut input = "Subject: gr\u{fc}\u{df}e\r\n\r\n\u{e9}t\u{e9}"
            .as_bytes()
            .to_vec();
        input.extend_from_slice(b"\xff\x80\r\n");
        let want = input.clone();
        input.extend_from_slice(b".\r\n");
        let (out, _, done) = stored(&input);
        assert!(done);
        assert_eq!(out, want);
    }

    #[test]
    fn size_limit_stops_output_and_reads_to_the_end() {
        let input = b"0123456789\r\n0123456789\r\n.\r\nQUIT\r\n";
        for cut in 0..=input.len() {
            let (out, consumed, done, outcome) =
                run_split(input, &[cut], BareLfPolicy::Normalize, 15);
            assert!(done);
            assert!(outcome.too_big);
            assert!(out.len() <= 15);
            assert_eq!(&input[consumed..], b"QUIT\r\n");
        }
        let (_, _, done, outcome) = run_split(input, &[], BareLfPolicy::Normalize, 24);
        assert!(done && !outcome.too_big);
        let (_, _, _, outcome) = run_split(input, &[], BareLfPolicy::Normalize, 23);
        assert!(outcome.too_big);
    }

    #[test]
    fn endless_line_stays_bounded() {
        let mut d = DataDecoder::new(BareLfPolicy::Normalize, 1 << 20);
        let chunk = vec![b'x'; 64 * 1024];
        let mut total = 0;
        for _ in 0..100 {
            let mut out = Vec::new();
            let fed = d.feed(&chunk, &mut out);
            assert!(!fed.done);
            assert!(out.len() <= chunk.len());
            total += out.len();
        }
        assert!(d.outcome().too_big);
        assert_eq!(total, 1 << 20);
    }

    fn bdat(chunks: &[&[u8]], policy: BareLfPolicy, max: u64) -> (Vec<u8>, DataOutcome) {
        let mut d = BdatDecoder::new(policy, max);
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out);
        }
        (out, d.outcome())
    }

    #[test]
    fn bdat_is_exact_and_unstuffed() {
        let body: &[u8] = b"a\r\n.\r\n..b\r\n";
        for cut in 0..=body.len() {
            let (out, o) = bdat(&[&body[..cut], &body[cut..]], BareLfPolicy::Normalize, BIG);
            assert_eq!(out, body);
            assert!(!o.doomed());
        }
    }

    #[test]
    fn bdat_bare_lf_normalized_across_chunk_boundaries() {
        let body: &[u8] = b"a\nb\r\nc\n\n";
        for cut in 0..=body.len() {
            let (out, _) = bdat(&[&body[..cut], &body[cut..]], BareLfPolicy::Normalize, BIG);
            assert_eq!(out, b"a\r\nb\r\nc\r\n\r\n", "cut {cut}");
        }
        let (_, o) = bdat(&[b"a\r", b"\nb"], BareLfPolicy::Reject, BIG);
        assert!(!o.bare_lf);
        let (_, o) = bdat(&[b"a", b"\nb"], BareLfPolicy::Reject, BIG);
        assert!(o.bare_lf);
        let (_, o) = bdat(&[b"a\0"], BareLfPolicy::Normalize, BIG);
        assert!(o.nul);
        let (out, o) = bdat(&[b"0123456789", b"0123456789"], BareLfPolicy::Normalize, 15);
        assert!(o.too_big);
        assert_eq!(out, b"012345678901234", "exactly the first max bytes");
    }

    /// RFC 5321 dot-stuffing of CRLF text plus the terminator.
    fn stuff(text: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let mut bol = true;
        for &b in text {
            if bol && b == b'.' {
                v.push(b'.');
            }
            v.push(b);
            bol = b == b'\n';
        }
        if !text.is_empty() && !text.ends_with(b"\r\n") {
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b".\r\n");
        v
    }

    fn crlf_text() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b".".to_vec()),
                Just(b"..".to_vec()),
                "[a-z \\x80-\\xff]{1,5}".prop_map(|s| s.into_bytes()),
            ],
            0..40,
        )
        .prop_map(|parts| {
            let mut t: Vec<u8> = parts.concat();
            if !t.is_empty() && !t.ends_with(b"\r\n") {
                t.extend_from_slice(b"\r\n");
            }
            t
        })
    }

    proptest! {
        #[test]
        fn unstuffing_inverts_stuffing(text in crlf_text(), cut in any::<prop::sample::Index>()) {
            let wire = stuff(&text);
            let c = cut.index(wire.len() + 1);
            let (out, consumed, done, o) = run_split(&wire, &[c], BareLfPolicy::Normalize, BIG);
            prop_assert!(done);
            prop_assert_eq!(consumed, wire.len());
            prop_assert!(!o.doomed());
            prop_assert_eq!(out, text);
        }

        #[test]
        fn output_is_independent_of_chunking(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), Just(b'a'), Just(0xffu8)], 0..64),
            cuts in proptest::collection::vec(0usize..64, 0..6),
            reject in any::<bool>(),
        ) {
            let policy = if reject { BareLfPolicy::Reject } else { BareLfPolicy::Normalize };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            prop_assert_eq!(run_split(&input, &cuts, policy, 40), run_split(&input, &[], policy, 40));
            let mut d = BdatDecoder::new(policy, 40);
            let mut out = Vec::new();
            let mut pos = 0;
            for &c in cuts.iter().chain(std::iter::once(&input.len())) {
                d.feed(&input[pos..c], &mut out);
                pos = c;
            }
            prop_assert_eq!((out, d.outcome()), bdat(&[&input], policy, 40));
        }

        #[test]
        fn whole_lines_decode_as_byte_by_byte(
            parts in proptest::collection::vec(prop_oneof![
                Just(b"\r\n".to_vec()), Just(b"\n".to_vec()), Just(b"\r".to_vec()),
                Just(b".".to_vec()), Just(b"\r\n.\r\n".to_vec()), Just(vec![0u8]),
                "[a-z \\x80-\\xff]{1,30}".prop_map(|s| s.into_bytes()),
            ], 0..60),
            reject in any::<bool>(),
            max in prop_oneof![Just(BIG), 0u64..200],
        ) {
            // One byte at a time never takes the fast path (a line needs its CR and LF in
            // the same input): it is the byte-wise machine alone, the reference.
            let input = parts.concat();
            let policy = if reject { BareLfPolicy::Reject } else { BareLfPolicy::Normalize };
            let every: Vec<usize> = (1..input.len()).collect();
            prop_assert_eq!(run_split(&input, &[], policy, max), run_split(&input, &every, policy, max));
        }
    }

    #[test]
    fn header_capture_finds_from_at_every_split_and_stops_at_the_body() {
        let msg: &[u8] =
            b"Received: x\r\nFrom: \"Scanner\" <Scanner@Localhost>\r\n\r\nFrom: body@x.test\r\n";
        for i in 0..=msg.len() {
            let mut h = HeaderCapture::default();
            h.feed(&msg[..i]);
            h.feed(&msg[i..]);
            assert_eq!(
                h.from().as_deref(),
                Some("scanner@localhost"),
                "split at {i}"
            );
        }
        let mut h = HeaderCapture::default();
        h.feed(b"Subject: x\r\n\r\n");
        h.feed(b"From: body@x.test\r\n");
        assert_eq!(h.from(), None, "a From: in the body is not the header's");
        let mut h = HeaderCapture::default();
        h.feed(b"Subject: x\r\nFrom:\r\n  Folded <f@sn1>\r\nTo: y\r\n");
        assert_eq!(h.from().as_deref(), Some("f@sn1"));
        let mut h = HeaderCapture::default();
        for _ in 0..10_000 {
            h.feed(b"X-Filler: aaaaaaaaaaaaaaaa");
        }
        assert!(h.line.len() <= HeaderCapture::MAX && h.field.is_empty());
    }
}
