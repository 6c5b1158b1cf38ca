//! The control socket (`<spool_dir>/control.sock`): admin commands tell a running daemon that
//! the queue changed on disk, so it acts at once instead of at its next rescan.

use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::forward::Kick;

/// Path of the control socket for a spool.
pub fn socket_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("control.sock")
}

/// Serve the control socket until `shutdown`: every connection wakes the forwarder.
pub async fn serve(path: PathBuf, kick: Kick, shutdown: CancellationToken) {
    // A socket file left by a killed daemon would make bind fail; we hold the spool lock, so
    // no other daemon owns it.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the control socket; queue commands will take effect at the next rescan (30 s)");
            return;
        }
    };
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
