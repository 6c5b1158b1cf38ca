//! `postern sendmail` and the binary invoked as `sendmail`: the interface PHP's `mail()`,
//! cron, `mail`/`mailx`, logwatch and unattended-upgrades use.
//!
//! The message is submitted to the running daemon over SMTP, on the first listener this
//! machine may use without AUTH (loopback, or `$POSTERN_SERVER` for a sidecar), rather than
//! written into the spool: the spool stays writable by the postern user alone (no setgid
//! helper, no world-writable drop directory to police), and the message gets exactly the
//! routing, policy, size limits and durability of SMTP mail, because it *is* SMTP mail: the
//! daemon answers 250 only once it is on disk for good. When the daemon cannot take it,
//! sendmail exits 75 (EX_TEMPFAIL) with the reason, so the caller (cron, PHP, mailx) knows
//! the message was not queued and can try again, as it would with Postfix's sendmail when
//! the queue is unwritable.

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;

use crate::config::{AuthMode, Config, TlsMode};

pub mod args;
pub mod message;
pub mod submit;

pub use args::{Mode, Options, UsageError};
use message::{Header, Lines};
use submit::{EX_DATAERR, Envelope, SubmitError};

/// The environment variable that names the daemon to submit to (`host:port`), for a client
/// in another container or when no listener in the configuration fits.
pub const SERVER_ENV: &str = "POSTERN_SERVER";

/// Usage error (sysexits.h).
pub const EX_USAGE: u8 = 64;
/// Configuration error (sysexits.h).
pub const EX_CONFIG: u8 = 78;

/// Where to submit, and the domain that qualifies bare names ("root" → "root@DOMAIN").
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub server: String,
    /// Domain for bare names, and our EHLO name.
    pub domain: String,
}

impl Target {
    /// The target from `$POSTERN_SERVER`, or else from the configuration's listeners.
    pub fn resolve(config: Option<&Config>) -> Result<Target, String> {
        let domain = config
            .map(|c| c.hostname.clone())
            .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
            .unwrap_or_else(|| "localhost".into());
        if let Some(server) = std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty()) {
            return Ok(Target { server, domain });
        }
        let Some(config) = config else {
            return Err(format!("no configuration, and {SERVER_ENV} is not set"));
        };
        match submission_address(config) {
            Some(a) => Ok(Target {
                server: a.to_string(),
                domain,
            }),
            None => Err(format!(
                "no listener in {} takes mail from this machine without AUTH: add one, e.g. \
                 [listener.local] address = \"127.0.0.1:25\" (allow_networks includes \
                 127.0.0.1 by default), or set {SERVER_ENV}=HOST:PORT",
                config.source
            )),
        }
    }
}

/// The first listener this machine can submit to without TLS-from-the-first-byte or AUTH,
/// reached at loopback when it listens on every address.
pub fn submission_address(config: &Config) -> Option<SocketAddr> {
    config.listeners.iter().find_map(|l| {
        if l.tls == TlsMode::Implicit || l.auth == AuthMode::Required || l.address.port() == 0 {
            return None;
        }
        let ip = match l.address.ip() {
            std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        // Connecting to the listener's own address makes it our source address too.
        l.allow_networks
            .iter()
            .any(|n| n.contains(&ip))
            .then(|| SocketAddr::new(ip, l.address.port()))
    })
}

/// Run sendmail with `opts`; returns the exit status. `input` is the message (standard
/// input), `output` standard output (for `-bs`).
pub fn run<R: BufRead + Send + 'static, W: Write + Send>(
    opts: &Options,
    target: &Target,
    input: R,
    output: W,
) -> u8 {
    let result = match opts.mode {
        Mode::Smtp => relay_smtp(opts, target, input, output),
        Mode::Deliver => deliver(opts, target, input),
        Mode::NewAliases => {
            eprintln!("postern sendmail: postern has no aliases database; nothing to rebuild");
            Ok(())
        }
        // `main` lists the queue itself (it needs the spool, not a daemon).
        Mode::ListQueue => Ok(()),
    };
    match result {
        Ok(()) => 0,
        Err((code, msg)) => {
            eprintln!("postern sendmail: {msg}");
            code
        }
    }
}

type Failure = (u8, String);

fn submit_failure(e: SubmitError) -> Failure {
    (e.exit_code(), e.to_string())
}

fn deliver<R: BufRead>(opts: &Options, target: &Target, input: R) -> Result<(), Failure> {
    let mut lines = Lines::new(input);
    let mut header =
        Header::read(&mut lines, opts.ignore_dots).map_err(|e| (EX_DATAERR, e.to_string()))?;
    let domain = &target.domain;

    let sender = match &opts.sender {
        Some(s) => message::qualify(s, domain),
        None => header
            .addresses(&["from"])
            .first()
            .map(|a| message::qualify(a, domain))
            .unwrap_or_else(|| message::qualify(&login_name(), domain)),
    };
    let mut recipients: Vec<String> = Vec::new();
    let mut add = |a: String| {
        let a = message::qualify(&a, domain);
        if !recipients.contains(&a) {
            recipients.push(a);
        }
    };
    for arg in &opts.recipients {
        message::address_list(arg).into_iter().for_each(&mut add);
    }
    if opts.extract_recipients {
        header
            .addresses(&["to", "cc", "bcc"])
            .into_iter()
            .for_each(&mut add);
    }
    if recipients.is_empty() {
        return Err(if opts.extract_recipients {
            (
                EX_DATAERR,
                "no recipient addresses found in the message header (To:, Cc:, Bcc:)".into(),
            )
        } else {
            (
                EX_USAGE,
                "no recipients: give them as arguments, or use -t to take them from the message header"
                    .into(),
            )
        });
    }

    // What a local submission gets from Postfix's cleanup: Bcc: never leaves, and the fields
    // every message needs are added when the program did not write them.
    header.remove("bcc");
    if !header.has("from") {
        let from_addr = if sender.is_empty() {
            message::qualify(&login_name(), domain)
        } else {
            sender.clone()
        };
        let from = match opts.full_name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => format!("{} <{from_addr}>", display_name(name)),
            None => from_addr,
        };
        header.push("From", &from);
    }
    if !header.has("date") {
        header.push("Date", &message::date_now());
    }
    if !header.has("message-id") {
        header.push("Message-ID", &message::message_id(domain));
    }

    let mut session = submit::connect(&target.server, opts.verbose).map_err(submit_failure)?;
    session.hello(domain).map_err(submit_failure)?;
    session
        .envelope(&Envelope {
            helo: domain,
            sender: &sender,
            recipients: &recipients,
            body_type: opts.body_type.as_deref(),
        })
        .map_err(submit_failure)?;
    let head = header.to_bytes();
    let ended = header.message_ended;
    let reply = session
        .data(|w| {
            if ended {
                let mut none = Lines::new(io::empty());
                message::copy_body(&mut none, &head, true, w).map(|_| ())
            } else {
                message::copy_body(&mut lines, &head, opts.ignore_dots, w).map(|_| ())
            }
        })
        .map_err(submit_failure)?;
    if opts.verbose {
        eprintln!("postern sendmail: {reply}");
    }
    session.quit();
    Ok(())
}

/// `-bs`: relay an SMTP dialogue between standard input/output and the daemon.
fn relay_smtp<R: Read + Send + 'static, W: Write + Send>(
    opts: &Options,
    target: &Target,
    mut input: R,
    mut output: W,
) -> Result<(), Failure> {
    let session = match submit::connect(&target.server, opts.verbose) {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(output, "421 4.3.2 {e}\r\n");
            let _ = output.flush();
            return Err(submit_failure(e));
        }
    };
    let (mut from_server, mut to_server) = session.into_streams();
    // Not joined: once the server ends the dialogue (QUIT, 421), we are done even if the
    // client's input is still open.
    std::thread::spawn(move || {
        let _ = io::copy(&mut input, &mut to_server);
        let _ = to_server.flush();
    });
    let _ = io::copy(&mut from_server, &mut output);
    let _ = output.flush();
    Ok(())
}

/// The invoking user's login name (for bare senders), as Postfix's sendmail finds it.
fn login_name() -> String {
    // SAFETY: getpwuid_r with a buffer we own; the result points into it.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 4096];
        if libc::getpwuid_r(
            libc::getuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        ) == 0
            && !out.is_null()
            && !pw.pw_name.is_null()
        {
            return std::ffi::CStr::from_ptr(pw.pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    std::env::var("LOGNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "nobody".into())
}

/// `name` as an RFC 5322 display name: quoted when it has specials.
fn display_name(name: &str) -> String {
    let plain = name
        .chars()
        .all(|c| c.is_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c));
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Parse the arguments after the program name; usage errors are printed here.
pub fn parse_args(args: &[OsString]) -> Result<Options, u8> {
    Options::parse(args).map_err(|UsageError(msg)| {
        eprintln!("postern sendmail: {msg}");
        EX_USAGE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_are_quoted_when_needed() {
        assert_eq!(display_name("Cron Daemon"), "Cron Daemon");
        assert_eq!(display_name("Doe, John"), "\"Doe, John\"");
        assert_eq!(display_name("a \"b\""), "\"a \\\"b\\\"\"");
    }

    #[test]
    fn the_submission_listener_is_the_first_local_one_without_required_auth() {
        let cfg = crate::config::load_str(
            r#"
spool_dir = "/tmp/s"
state_dir = "/tmp/t"
[listener.lan]
address = "0.0.0.0:587"
tls = "none"
auth = "none"
allow_networks = ["192.168.1.0/24"]
[listener.all]
address = "0.0.0.0:25"
[listener.v6]
address = "[::]:2526"
[route.r]
senders = ["*"]
transport = "file"
dir = "/tmp/d"
"#,
            "<test>",
        )
        .unwrap();
        // lan does not allow 127.0.0.1; "all" listens everywhere and allows loopback.
        assert_eq!(
            submission_address(&cfg),
            Some("127.0.0.1:25".parse().unwrap())
        );
    }
}
