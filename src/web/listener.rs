//! The admin listener's own bounds, so that whoever can reach it cannot starve the daemon:
//! at most [`MAX_CONNECTIONS`] connections at once (more wait in the kernel's backlog, and
//! the SMTP listeners never run out of file descriptors because of it), and every connection
//! closed [`LIFETIME`] after it was accepted, whatever it is doing (hyper on its own waits for
//! a request's headers forever: one byte now and then held a connection open indefinitely).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one admin connection may live: plenty for a status page or a scrape (clients
/// reconnect for the next), too short to hoard.
pub const LIFETIME: Duration = Duration::from_secs(30);

/// A TCP listener that hands out at most `limit` connections at once, each closed after
/// `lifetime`.
pub struct Bounded {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    lifetime: Duration,
}

impl Bounded {
    /// Bound `inner` by [`MAX_CONNECTIONS`] and [`LIFETIME`].
    pub fn new(inner: TcpListener) -> Self {
        Self::with(inner, MAX_CONNECTIONS, LIFETIME)
    }

    /// Bound `inner` by `limit` connections, each living at most `lifetime`.
    pub fn with(inner: TcpListener, limit: usize, lifetime: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limit)),
            lifetime,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Expiring;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Take a slot first: beyond the limit, connections stay in the backlog.
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                // The semaphore is never closed; be safe anyway.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let io = Expiring {
                        stream,
                        deadline: Box::pin(tokio::time::sleep(self.lifetime)),
                        _permit: permit,
                    };
                    return (io, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails every read and write once its deadline has passed (hyper then
/// closes it), and gives its slot back when dropped.
pub struct Expiring {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Expiring {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn expired_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "admin connection lifetime over")
}

impl AsyncRead for Expiring {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Expiring {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve(limit: usize, lifetime: Duration) -> std::net::SocketAddr {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(async move {
            let _ = axum::serve(Bounded::with(tcp, limit, lifetime), app).await;
        });
        addr
    }

    /// Read until EOF or error; true if the server closed within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        let end = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// One byte of headers now and then held an admin connection open forever.
    #[tokio::test]
    async fn a_slow_request_is_cut_off_at_the_lifetime() {
        let addr = serve(4, Duration::from_millis(500)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(30)).await);
    }

    /// Beyond the limit, connections wait (in the backlog) until one closes, then are served.
    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_slot() {
        let addr = serve(2, Duration::from_secs(5)).await;
        let mut hogs = Vec::new();
        for _ in 0..2 {
            let mut h = TcpStream::connect(addr).await.unwrap();
            h.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
            hogs.push(h);
        }
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        // Not served while both slots are held...
        assert!(
            tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf))
                .await
                .is_err()
        );
        // ...and served once the hogs' lifetime is over.
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    }
}
