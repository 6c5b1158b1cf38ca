//! The control socket (`<spool_dir>/control.sock`): admin commands tell a running daemon that
//! the queue changed on disk, so it acts at once instead of at its next rescan, and so the
//! daemon's own log records what the admin did; `postern health` asks it whether it is alive.
//!
//! Protocol: one line per connection, one line back. `ping` → `pong` (nothing else happens);
//! `held ID`, `released ID`, `deleted ID`, `retried ID` → the daemon logs the event and
//! rescans; anything else (`kick`) → it rescans. The answer to those is `ok`.
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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                    // A task per request, so a slow client never holds up the next one.
                    let kick = kick.clone();
                    // Who is asking (SO_PEERCRED): the socket's 0600 mode already keeps others
                    // out; this holds even if its mode or the spool's were loosened.
                    let peer = s.peer_cred().ok().map(|c| c.uid());
                    tokio::spawn(async move {
                        let wait = std::time::Duration::from_secs(5);
                        let mut buf = [0u8; 128];
                        let n = tokio::time::timeout(wait, s.read(&mut buf))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or(0);
                        let line = String::from_utf8_lossy(&buf[..n]);
                        let answer = if may_command(peer, own_uid()) || line.trim() == "ping" {
                            handle(line.trim(), &kick)
                        } else {
                            warn!(uid = ?peer, "control socket: request from a user other than root or postern's own refused");
                            "denied\n"
                        };
                        let _ = tokio::time::timeout(wait, s.write_all(answer.as_bytes())).await;
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The user postern runs as.
fn own_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// May a peer of uid `peer` give commands other than `ping` (they make the daemon log queue
/// events and rescan)? Only root and the user postern runs as, the users who may change the
/// queue on disk; an unknown peer may not.
fn may_command(peer: Option<u32>, own: u32) -> bool {
    peer.is_some_and(|uid| uid == 0 || uid == own)
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
    // One write: the daemon answers as soon as it has read the request, and a second write
    // could then meet a closed socket.
    s.write_all(format!("{line}\n").as_bytes())?;
    let _ = s.shutdown(std::net::Shutdown::Write);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_service_user_may_command() {
        assert!(may_command(Some(0), 998));
        assert!(may_command(Some(998), 998));
        assert!(!may_command(Some(1000), 998));
        assert!(!may_command(None, 998));
    }
}
