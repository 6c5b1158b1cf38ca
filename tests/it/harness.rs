//! Start the real `postern` binary in a temp dir and talk to it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every log line any daemon of this test binary printed, for the secret scan.
pub static ALL_LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A running postern.
pub struct Postern {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub listeners: HashMap<String, SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
    /// The umask the daemon starts with (None: inherited).
    pub umask: Option<u32>,
    /// More arguments for `postern serve` (e.g. `--log-format json`).
    pub serve_args: Vec<String>,
    /// More environment variables for the daemon.
    pub envs: Vec<(String, String)>,
    /// What the daemon printed on standard output, line by line.
    pub stdout_lines: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_postern")
}

/// A config with one plain listener on a random port and a file route.
pub fn basic_config(extra_listener_keys: &str, rest: &str) -> String {
    format!(
        r#"hostname = "relay.test"
spool_dir = "spool"
state_dir = "state"

[delivery]
retry_initial = "1s"
retry_max = "2s"
shutdown_grace = "10s"

[listener.local]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]
{extra_listener_keys}

{rest}

[route.default]
senders = ["*"]
transport = "file"
dir = "delivered"
"#
    )
}

impl Postern {
    /// Write `config` into a new temp dir and start `postern serve` on it.
    pub fn start(config: &str) -> Postern {
        Self::start_inner(config, None, &[], &[])
    }

    /// Like `start`, with the daemon's umask set to `umask`.
    pub fn start_with_umask(config: &str, umask: u32) -> Postern {
        Self::start_inner(config, Some(umask), &[], &[])
    }

    /// Like `start`, with more arguments for `postern serve`.
    pub fn start_with(config: &str, serve_args: &[&str]) -> Postern {
        Self::start_inner(config, None, serve_args, &[])
    }

    /// Like `start`, with more arguments and environment variables for `postern serve`.
    pub fn start_with_env(config: &str, serve_args: &[&str], envs: &[(&str, &str)]) -> Postern {
        Self::start_inner(config, None, serve_args, envs)
    }

    fn start_inner(
        config: &str,
        umask: Option<u32>,
        serve_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Postern {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("postern.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut p = Postern {
            dir,
            child: None,
            listeners: HashMap::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
            config_path,
            umask,
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stdout_lines: Arc::new(Mutex::new(Vec::new())),
        };
        p.spawn();
        p
    }

    /// Start (again) the daemon on the same directory.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"])
            .arg(&self.config_path)
            .args(&self.serve_args)
            .env("POSTERN_LOG", "info")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let started_before = self.started_lines();
        let mut child = cmd.spawn().expect("spawn postern");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                ALL_LOGS.lock().unwrap().push(line.clone());
                logs.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out_lines = self.stdout_lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out_lines.lock().unwrap().push(line.clone());
                if tx.as_ref().is_some_and(|t| t.send(line).is_err()) {
                    tx = None;
                }
            }
        });
        self.listeners.clear();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "postern: ready" || line == r#"{"event":"ready"}"# => break,
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("postern: listening on ") {
                        let (name, addr) = rest.split_once(' ').expect("listening line");
                        self.listeners
                            .insert(name.to_string(), addr.parse().expect("addr"));
                    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["event"] == "listening"
                    {
                        let (name, addr) = (&v["listener"], &v["address"]);
                        self.listeners.insert(
                            name.as_str().expect("listener").to_string(),
                            addr.as_str().expect("address").parse().expect("addr"),
                        );
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "postern did not become ready; logs:\n{}",
                        self.logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        self.child = Some(child);
        // "ready" comes on stdout, the log on stderr, read by another thread: without this,
        // a test could look for a warning logged before "ready" (e.g. the spool's mode being
        // fixed) before that thread had read it. "postern started" is logged right after
        // "ready", so once it is in, everything logged before "ready" is too.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.started_lines() <= started_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn started_lines(&self) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("postern started"))
            .count()
    }

    pub fn addr(&self) -> SocketAddr {
        self.listeners
            .get("local")
            .copied()
            .or_else(|| self.listeners.values().next().copied())
            .expect("a listener")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Send SIGKILL and wait.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal by name (TERM, HUP...).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// Wait for the process to exit after a signal; returns its exit status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        wait_child(&mut c, timeout)
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Wait until some log line contains `needle` (log lines trail the spool's renames).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait until `n` messages were delivered into `delivered/`; returns their ids.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ids = delivered_ids(&self.path("delivered"));
            if ids.len() >= n || Instant::now() > deadline {
                return ids;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `postern ARGS` against this daemon's config; returns (code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .expect("run postern");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }
}

impl Drop for Postern {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait for `c` to exit; killed after `timeout` (returns None then).
pub fn wait_child(c: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ids of messages in a file-transport directory (complete ones: `.json` written last).
pub fn delivered_ids(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A minimal line-oriented SMTP client for exact dialogues.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Self::try_connect(addr).expect("connect")
    }

    pub fn try_connect(addr: SocketAddr) -> Option<Raw> {
        let s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
        Some(Raw::from_stream(s))
    }

    /// A client over a stream connected some other way (e.g. from another local address).
    pub fn from_stream(s: TcpStream) -> Raw {
        Raw { s, buf: Vec::new() }
    }

    /// Write bytes; a server that already closed the connection is not an error here
    /// (the next `reply` sees EOF).
    pub fn send(&mut self, data: &[u8]) {
        let _ = self.s.write_all(data);
    }

    /// Read one complete reply (all lines); returns it joined with '\n'. Empty on EOF.
    pub fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let line = match self.line() {
                Some(l) => l,
                None => return lines.join("\n"),
            };
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&l).trim_end().to_string());
            }
            let mut tmp = [0u8; 4096];
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Send a command line and return the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Is the connection closed by the server (EOF)?
    pub fn closed(&mut self) -> bool {
        self.line().is_none()
    }
}

/// Assert a reply starts with `code` (e.g. "250 2.1.0" or "550 5.7.1").
#[track_caller]
pub fn expect(reply: &str, code: &str) {
    assert!(reply.starts_with(code), "expected {code}, got {reply:?}");
}

/// Send one complete message on a fresh connection; returns the final reply to DATA.
pub fn send_mail(addr: SocketAddr, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Raw::connect(addr);
    expect(&c.reply(), "220");
    expect(&c.cmd("EHLO client.test"), "250");
    expect(&c.cmd(&format!("MAIL FROM:<{from}>")), "250");
    for t in to {
        expect(&c.cmd(&format!("RCPT TO:<{t}>")), "250");
    }
    expect(&c.cmd("DATA"), "354");
    c.send(body);
    c.send(b"\r\n.\r\n");
    let r = c.reply();
    let _ = c.cmd("QUIT");
    r
}

/// Extract the queue id from "250 2.0.0 Ok: queued as ID".
pub fn queued_id(reply: &str) -> String {
    reply.rsplit(' ').next().unwrap_or("").trim().to_string()
}

/// The newest envelope of a queue file (its last trailer: JSON, "\n", 10-digit length,
/// "POSTERN1\n"), read the way an admin's script would, without the library.
pub fn queue_envelope(path: &Path) -> Option<serde_json::Value> {
    let raw = std::fs::read(path).ok()?;
    let footer = raw.len().checked_sub(20)?;
    if &raw[footer + 11..] != b"POSTERN1\n" {
        return None;
    }
    let len: usize = std::str::from_utf8(&raw[footer + 1..footer + 11])
        .ok()?
        .parse()
        .ok()?;
    serde_json::from_slice(&raw[footer.checked_sub(len)?..footer]).ok()
}

/// Is `tool` on the PATH?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// CI installs every tool; on a developer machine without one, say so loudly rather than
/// pass silently.
pub fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} is not installed but CI must run this test"
    );
    eprintln!("SKIPPED: {tool} not installed");
    false
}

/// Send the file `mail` with `curl` to `url` (smtp:// or smtps://) from `from` to `rcpt`;
/// `extra` are more curl options (TLS, credentials). Panics with curl's stderr on failure.
pub fn curl_send(url: &str, extra: &[&str], from: &str, rcpt: &str, mail: &Path) {
    let out = Command::new("curl")
        .args(["-sS", "--url", url])
        .args(extra)
        .args(["--mail-from", from, "--mail-rcpt", rcpt, "--upload-file"])
        .arg(mail)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
