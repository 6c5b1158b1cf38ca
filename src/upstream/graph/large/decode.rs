//! Streaming Content-Transfer-Encoding decoders: a MIME part's body as it sits in the queue
//! file (base64, quoted-printable, or as is) turned back into the attachment's bytes, a buffer
//! at a time, so a 100 MB attachment never sits in memory.
//!
//! mail-parser decodes only whole in-memory messages, hence these small readers. They are
//! lenient like mail clients: characters outside the base64 alphabet are skipped (RFC 2045
//! §6.8), a malformed `=XY` in quoted-printable is kept as written.

use std::io::{self, Read};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// How a part's body is encoded in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `base64`.
    Base64,
    /// `quoted-printable`.
    QuotedPrintable,
    /// `7bit`, `8bit`, `binary`, absent, or unknown: the bytes are the content.
    #[default]
    Identity,
}

impl Encoding {
    /// The encoding named by a `Content-Transfer-Encoding` value.
    pub fn from_header(value: Option<&str>) -> Encoding {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("base64") => Encoding::Base64,
            Some("quoted-printable") => Encoding::QuotedPrintable,
            _ => Encoding::Identity,
        }
    }
}

/// Read size from the underlying reader.
const IN_CHUNK: usize = 64 * 1024;

/// Lenient base64: no padding required, trailing bits allowed (some encoders leave them).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A reader of the decoded content of `inner` (the encoded body).
pub struct Decoder<R> {
    inner: R,
    encoding: Encoding,
    /// Decoded bytes not yet handed out: `out[pos..]`.
    out: Vec<u8>,
    /// The read buffer.
    input: Vec<u8>,
    pos: usize,
    /// Encoded input carried over between reads (a base64 quantum or a QP escape cut in two).
    carry: Vec<u8>,
    /// Quoted-printable: white space seen but not yet known to be trailing (then dropped).
    spaces: Vec<u8>,
    /// Base64: `=` was seen, the data is over.
    done: bool,
    eof: bool,
}

impl<R: Read> Decoder<R> {
    /// Decode `inner` according to `encoding`.
    pub fn new(inner: R, encoding: Encoding) -> Decoder<R> {
        Decoder {
            inner,
            encoding,
            out: Vec::with_capacity(IN_CHUNK),
            input: Vec::new(),
            pos: 0,
            carry: Vec::new(),
            spaces: Vec::new(),
            done: false,
            eof: false,
        }
    }

    /// Refill `out` from one read of `inner`; `false` at the end of the input.
    fn refill(&mut self) -> io::Result<bool> {
        self.out.clear();
        self.pos = 0;
        while self.out.is_empty() {
            if self.eof {
                return Ok(false);
            }
            // The input buffer is kept between reads (no allocation per refill).
            let mut buf = std::mem::take(&mut self.input);
            buf.resize(IN_CHUNK, 0);
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                self.eof = true;
            }
            match self.encoding {
                Encoding::Identity => self.out.extend_from_slice(&buf[..n]),
                Encoding::Base64 => self.base64(&buf[..n])?,
                Encoding::QuotedPrintable => self.quoted_printable(&buf[..n]),
            }
            self.input = buf;
        }
        Ok(true)
    }

    fn base64(&mut self, input: &[u8]) -> io::Result<()> {
        if !self.done {
            for &b in input {
                match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => self.carry.push(b),
                    b'=' => {
                        self.done = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
        // Whole quanta now; the rest waits for more input unless this is the end.
        let whole = if self.eof || self.done {
            self.carry.len()
        } else {
            self.carry.len() / 4 * 4
        };
        // A lone final character carries no whole byte: drop it rather than fail.
        let usable = if whole % 4 == 1 { whole - 1 } else { whole };
        if usable > 0 {
            LENIENT
                .decode_vec(&self.carry[..usable], &mut self.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        self.carry.drain(..whole);
        if self.done {
            self.eof = true;
        }
        Ok(())
    }

    fn quoted_printable(&mut self, input: &[u8]) {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(input);
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match b {
                b' ' | b'\t' => {
                    self.spaces.push(b);
                    i += 1;
                }
                b'\r' | b'\n' => {
                    // Trailing white space before a line break is not content (RFC 2045 §6.7).
                    self.spaces.clear();
                    self.out.push(b);
                    i += 1;
                }
                b'=' => {
                    // Need up to two more bytes to decide.
                    if data.len() - i < 3 && !self.eof {
                        break;
                    }
                    let rest = &data[i + 1..data.len().min(i + 3)];
                    match rest {
                        // A soft line break; white space before the "=" is content.
                        [b'\r', b'\n', ..] => {
                            self.flush_spaces();
                            i += 3;
                        }
                        [b'\n', ..] => {
                            self.flush_spaces();
                            i += 2;
                        }
                        [h, l, ..] if hex(*h).is_some() && hex(*l).is_some() => {
                            self.flush_spaces();
                            self.out
                                .push(hex(*h).unwrap_or(0) << 4 | hex(*l).unwrap_or(0));
                            i += 3;
                        }
                        _ => {
                            // "=" followed by white space to the line end is a soft break too.
                            let mut j = i + 1;
                            while j < data.len() && matches!(data[j], b' ' | b'\t') {
                                j += 1;
                            }
                            if j == data.len() && !self.eof {
                                break;
                            }
                            if j < data.len() && matches!(data[j], b'\r' | b'\n') && j > i + 1 {
                                self.flush_spaces();
                                i = j + usize::from(data[j] == b'\r');
                                i += usize::from(i < data.len() && data[i] == b'\n');
                                continue;
                            }
                            self.flush_spaces();
                            self.out.push(b'=');
                            i += 1;
                        }
                    }
                }
                _ => {
                    self.flush_spaces();
                    self.out.push(b);
                    i += 1;
                }
            }
        }
        self.carry = data.split_off(i);
        if self.eof {
            self.flush_spaces();
        }
    }

    fn flush_spaces(&mut self) {
        self.out.append(&mut self.spaces);
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.out.len() && !self.refill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Fill `buf` as far as `r` allows; the count read (less than `buf.len()` only at the end).
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `input` fed `step` bytes per read.
    fn decode(input: &[u8], encoding: Encoding, step: usize) -> Vec<u8> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        Decoder::new(Trickle(input, step), encoding)
            .read_to_end(&mut out)
            .expect("decode");
        out
    }

    #[test]
    fn base64_with_line_breaks_at_every_split() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
        let wrapped: Vec<u8> = b64
            .as_bytes()
            .chunks(76)
            .flat_map(|l| l.iter().copied().chain(*b"\r\n"))
            .collect();
        for step in [1, 2, 3, 5, 77, 4096] {
            assert_eq!(
                decode(&wrapped, Encoding::Base64, step),
                data,
                "step {step}"
            );
        }
        // No padding, junk characters, and text after the padding are tolerated.
        assert_eq!(decode(b"QUJD\r\nRA", Encoding::Base64, 1), b"ABCD");
        assert_eq!(
            decode(b"QU*JD RA==\r\nignored", Encoding::Base64, 3),
            b"ABCD"
        );
        assert_eq!(decode(b"", Encoding::Base64, 3), b"");
    }

    #[test]
    fn quoted_printable_at_every_split() {
        let qp = b"caf=C3=A9 =\r\nsoft  \r\nline=3D=\nx = y=\r\n";
        let want = b"caf\xC3\xA9 soft\r\nline=x = y";
        for step in 1..=qp.len() {
            assert_eq!(
                decode(qp, Encoding::QuotedPrintable, step),
                want,
                "step {step}"
            );
        }
    }

    #[test]
    fn identity_passes_bytes_through() {
        let data = b"\x00\xff binary\r\n";
        assert_eq!(decode(data, Encoding::Identity, 2), data);
        assert_eq!(Encoding::from_header(Some(" Base64 ")), Encoding::Base64);
        assert_eq!(
            Encoding::from_header(Some("quoted-printable")),
            Encoding::QuotedPrintable
        );
        assert_eq!(Encoding::from_header(Some("8bit")), Encoding::Identity);
        assert_eq!(Encoding::from_header(None), Encoding::Identity);
    }
}
