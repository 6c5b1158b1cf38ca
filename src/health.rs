//! `postern health`: is the running daemon healthy? For Docker `HEALTHCHECK`, systemd and
//! monitoring scripts: exit 0 when it is, 1 when not, with one line saying why.
//!
//! With an `[admin]` listener it asks `/healthz` (process alive, listeners bound, forwarder
//! running); without one it can only tell that the daemon answers on its control socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::Config;

/// The verdict, and the line to print.
pub fn check(config: &Config) -> Result<String, String> {
    if let Some(admin) = &config.admin {
        return healthz(admin.address, config);
    }
    let path = crate::control::socket_path(&config.spool_dir);
    crate::control::ping(&path).map(|()| {
        format!(
            "the daemon answers on {} (an [admin] listener makes this check its listeners and forwarder too)",
            path.display()
        )
    })
}

/// GET /healthz on the admin listener.
fn healthz(addr: SocketAddr, config: &Config) -> Result<String, String> {
    // A wildcard address is reached through loopback.
    let target = if addr.ip().is_unspecified() {
        let ip: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    };
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(|e| {
        format!("the admin listener {target} does not answer: {e} (is postern running with this configuration?)")
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            config.hostname
        )
        .as_bytes(),
    )
    .map_err(|e| format!("the admin listener {target}: {e}"))?;
    let mut answer = Vec::new();
    let _ = s.take(64 * 1024).read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or("");
    match status {
        "200" => Ok(format!("{target}/healthz: {body}")),
        "" => Err(format!("the admin listener {target} gave no HTTP answer")),
        _ => Err(format!("{target}/healthz: HTTP {status}: {body}")),
    }
}
