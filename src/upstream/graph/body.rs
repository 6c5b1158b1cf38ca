//! The MIME request body: the message as received (with an optional header section in front,
//! such as an added `Bcc:`), base64-encoded while it is sent. The queue file is read in
//! chunks and each chunk is encoded as the HTTP client asks for it, so neither the message nor
//! its base64 is ever whole in memory (a 4 MB request costs two 48 KiB buffers).

use std::io;

use base64::Engine as _;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from the file per chunk: a multiple of 3, so chunks encode without padding.
const CHUNK: usize = 48 * 1024;

/// Length of the base64 (standard alphabet, padded, no line breaks) of `n` bytes.
pub fn encoded_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

/// The base64 of `prefix` followed by `message` (which yields exactly `size` bytes), as a
/// stream body for reqwest, and its length (for `Content-Length`).
pub fn base64_body<R>(prefix: Vec<u8>, message: R, size: u64) -> (reqwest::Body, u64)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let total = prefix.len() as u64 + size;
    let state = Encoder {
        carry: prefix,
        message,
        left: size,
        done: false,
    };
    let stream = futures_util::stream::try_unfold(state, |mut st| async move {
        match st.next_chunk().await? {
            Some(b) => Ok::<_, io::Error>(Some((b, st))),
            None => Ok(None),
        }
    });
    (reqwest::Body::wrap_stream(stream), encoded_len(total))
}

/// A small queue file read in place on the async thread (see [`crate::upstream::READ_INLINE`]):
/// `tokio::fs::File` would hop to the blocking pool and back for every read.
pub struct CachedFile(pub std::fs::File);

impl AsyncRead for CachedFile {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let n = io::Read::read(&mut self.get_mut().0, buf.initialize_unfilled())?;
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

struct Encoder<R> {
    /// Bytes read but not yet encoded (fewer than 3 after each chunk, except at the start).
    carry: Vec<u8>,
    message: R,
    /// Message bytes still to read.
    left: u64,
    done: bool,
}

impl<R: AsyncRead + Unpin> Encoder<R> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut self.carry);
        // Fill up to CHUNK (at least one full group unless the message is over).
        while buf.len() < CHUNK && self.left > 0 {
            let want = (CHUNK - buf.len()).min(usize::try_from(self.left).unwrap_or(CHUNK));
            let start = buf.len();
            buf.resize(start + want, 0);
            let n = self.message.read(&mut buf[start..]).await?;
            buf.truncate(start + n);
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the queue file ended {} bytes before the message's recorded size",
                        self.left
                    ),
                ));
            }
            self.left -= n as u64;
        }
        let whole = if self.left == 0 {
            self.done = true;
            buf.len()
        } else {
            buf.len() - buf.len() % 3
        };
        self.carry = buf.split_off(whole);
        if buf.is_empty() {
            return Ok(if self.done { None } else { Some(Bytes::new()) });
        }
        Ok(Some(Bytes::from(
            base64::engine::general_purpose::STANDARD.encode(&buf),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(prefix: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut st = Encoder {
            carry: prefix.to_vec(),
            message: msg,
            left: msg.len() as u64,
            done: false,
        };
        let mut out = Vec::new();
        while let Some(b) = st.next_chunk().await.unwrap() {
            out.extend_from_slice(&b);
        }
        out
    }

    #[tokio::test]
    async fn equals_the_base64_of_the_whole_at_every_size() {
        for n in [
            0usize,
            1,
            2,
            3,
            4,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 2,
        ] {
            let msg: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            for prefix in [&b""[..], b"B", b"Bcc: a@b.test\r\n"] {
                let got = collect(prefix, &msg).await;
                let mut whole = prefix.to_vec();
                whole.extend_from_slice(&msg);
                let want = base64::engine::general_purpose::STANDARD.encode(&whole);
                assert_eq!(got, want.as_bytes(), "n={n} prefix={prefix:?}");
                assert_eq!(encoded_len(whole.len() as u64), want.len() as u64);
            }
        }
    }

    #[tokio::test]
    async fn a_short_file_is_an_error_not_a_truncated_message() {
        let mut st = Encoder {
            carry: Vec::new(),
            message: &b"abc"[..],
            left: 10,
            done: false,
        };
        let mut err = None;
        for _ in 0..3 {
            match st.next_chunk().await {
                Err(e) => {
                    err = Some(e);
                    break;
                }
                Ok(None) => break,
                Ok(Some(_)) => {}
            }
        }
        assert!(err.is_some_and(|e| e.kind() == io::ErrorKind::UnexpectedEof));
    }
}
