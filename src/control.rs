//! The control socket (`<spool_dir>/control.sock`): admin commands tell a running daemon that
//! the queue changed on disk, so it acts at once instead of at its next rescan.
//!
//! Why in `spool_dir` and not `state_dir`: the socket speaks for one spool ("this queue
//! changed"), queue commands find it from the spool they opened, and the spool lock makes its
//! daemon the only one that may replace a stale socket file; two instances may share a
//! `state_dir`, never a spool. It is 0600 inside the 0700 spool, so only the service user and
//! root reach it, the same people who may change the queue. A path longer than a Unix socket
//! name can hold stops the daemon at start-up (and `postern check` says so), since queue
//! commands could never reach it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::forward::Kick;

/// Why the control socket cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path does not fit in a Unix socket address.
    #[error("control socket path {} is {len} bytes long, but a Unix socket path can have at most {max}, so queue commands could not reach the daemon; choose a shorter spool_dir (at most {} bytes)", path.display(), max - SOCKET_NAME.len() - 1)]
    TooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest possible.
        max: usize,
    },
    /// Binding or setting its mode failed.
    #[error("cannot open the control socket {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

const SOCKET_NAME: &str = "control.sock";

/// Path of the control socket for a spool.
pub fn socket_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join(SOCKET_NAME)
}

/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
fn max_path_len() -> usize {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_path.len() - 1
}

/// Does `path` fit in a Unix socket address?
pub fn check_path(path: &Path) -> Result<(), ControlError> {
    let len = path.as_os_str().len();
    let max = max_path_len();
    if len > max {
        return Err(ControlError::TooLong {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    Ok(())
}

/// Bind the control socket, mode 0600 whatever the umask. Call before announcing readiness:
/// a daemon that queue commands cannot reach must not start.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    check_path(path)?;
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A socket file left by a killed daemon would make bind fail; we hold the spool lock, so
    // no other daemon owns it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io)?;
    // The 0700 spool directory already keeps others out while the mode is still the umask's.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serve the control socket until `shutdown`: every connection wakes the forwarder.
pub async fn serve(listener: UnixListener, path: PathBuf, kick: Kick, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = listener.accept() => match conn {
                Ok((mut s, _)) => {
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut buf)).await;
                    debug!("control socket: queue changed, rescanning");
                    kick.kick();
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Tell a running daemon the queue changed. Returns false when no daemon listens.
pub fn notify(spool_dir: &Path) -> bool {
    use std::io::Write;
    match std::os::unix::net::UnixStream::connect(socket_path(spool_dir)) {
        Ok(mut s) => s.write_all(b"kick\n").is_ok(),
        Err(_) => false,
    }
}
