//! The control socket (`<spool_dir>/control.sock`): admin commands tell a running daemon that
//! the queue changed on disk, so it acts at once instead of at its next rescan, and so the
//! daemon's own log records what the admin did; `postern health` asks it whether it is alive.
//!
//! Protocol: one line per connection, one line back. `ping` → `pong` (nothing else happens);
//! `held ID`, `released ID`, `deleted ID`, `retried ID` → the daemon logs the event and
//! rescans; anything else (`kick`) → it rescans. The answer to those is `ok`.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                    // A task per request, so a slow client never holds up the next one.
                    let kick = kick.clone();
                    tokio::spawn(async move {
                        let wait = std::time::Duration::from_secs(5);
                        let mut buf = [0u8; 128];
                        let n = tokio::time::timeout(wait, s.read(&mut buf))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or(0);
                        let line = String::from_utf8_lossy(&buf[..n]);
                        let answer = handle(line.trim(), &kick);
                        let _ = tokio::time::timeout(wait, s.write_all(answer.as_bytes())).await;
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Act on one request line; returns the answer line.
fn handle(line: &str, kick: &Kick) -> &'static str {
    if line == "ping" {
        return "pong\n";
    }
    // The admin's queue commands: logged here so the daemon's log (journal, docker logs) has
    // them, not only the command's terminal. Ids are checked so nothing odd reaches the log.
    if let Some((verb, id)) = line.split_once(' ')
        && crate::spool::is_valid_id(id)
    {
        match verb {
            "held" => {
                crate::maillog::held(id, "", "held by the administrator (postern queue hold)")
            }
            "released" => crate::maillog::released(id),
            "deleted" => crate::maillog::deleted(id),
            "retried" => crate::maillog::retried(id),
            _ => {}
        }
    }
    debug!("control socket: queue changed, rescanning");
    kick.kick();
    "ok\n"
}

/// One request to a running daemon; `Ok(answer)` or the connect/IO error.
fn request(path: &Path, line: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.take(64).read_to_string(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// Tell a running daemon the queue changed. Returns false when no daemon listens.
pub fn notify(spool_dir: &Path) -> bool {
    request(&socket_path(spool_dir), "kick").is_ok()
}

/// Tell a running daemon the admin did `verb` (held, released, deleted, retried) to message
/// `id`, which it logs; it also rescans. Returns false when no daemon listens.
pub fn notify_event(spool_dir: &Path, verb: &str, id: &str) -> bool {
    request(&socket_path(spool_dir), &format!("{verb} {id}")).is_ok()
}

/// Ask the daemon whether it is alive: `Ok(())` when it answers `pong`.
pub fn ping(path: &Path) -> Result<(), String> {
    match request(path, "ping") {
        Ok(a) if a == "pong" => Ok(()),
        Ok(a) => Err(format!("unexpected answer {a:?} on {}", path.display())),
        Err(e) => Err(format!("no daemon answers on {}: {e}", path.display())),
    }
}
