//! A minimal SMTP client that hands one message to the running postern over a plain
//! connection (loopback, or the sidecar's address): EHLO, MAIL, every RCPT, DATA, QUIT.
//! All or nothing: if any recipient is refused, the transaction is reset, so a caller that
//! retries never sends a duplicate to the others.

use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::upstream::smtp::Reply;

/// How long to wait to connect, and for each reply (postern answers DATA only once the message
/// is on disk for good, which is quick).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a submission failed; [`SubmitError::exit_code`] maps it to sysexits.h.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The daemon could not be reached (not running, wrong address).
    #[error(
        "cannot connect to postern at {server}: {error}; is it running (systemctl status postern)? \
         The message was not queued"
    )]
    Connect {
        /// Where we tried.
        server: String,
        /// The last connect error.
        error: io::Error,
    },
    /// The connection broke or timed out.
    #[error(
        "connection to postern at {server} failed while {stage}: {error}; the message was not queued"
    )]
    Io {
        /// Where.
        server: String,
        /// What we were doing.
        stage: &'static str,
        /// The I/O error.
        error: io::Error,
    },
    /// The server refused something.
    #[error("postern at {server} refused {what}: {reply}{hint}")]
    Refused {
        /// Where.
        server: String,
        /// What was refused ("the sender <a@b>", "recipient <c@d>", "the message").
        what: String,
        /// The reply as received.
        reply: Reply,
        /// What to do about it, when we know.
        hint: &'static str,
    },
    /// The server said something that is not SMTP.
    #[error("postern at {server} answered {stage} with something that is not an SMTP reply")]
    Garbled {
        /// Where.
        server: String,
        /// What we were doing.
        stage: &'static str,
    },
}

/// sysexits.h codes, as sendmail uses them.
pub const EX_NOUSER: u8 = 67;
/// Service unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// Temporary failure: the caller should try again later.
pub const EX_TEMPFAIL: u8 = 75;
/// Permission denied.
pub const EX_NOPERM: u8 = 77;
/// Input data error.
pub const EX_DATAERR: u8 = 65;

impl SubmitError {
    /// The exit status for this failure: 75 (try again) for anything temporary.
    pub fn exit_code(&self) -> u8 {
        match self {
            SubmitError::Connect { .. } | SubmitError::Io { .. } | SubmitError::Garbled { .. } => {
                EX_TEMPFAIL
            }
            SubmitError::Refused { reply, what, .. } => {
                if reply.code < 500 {
                    EX_TEMPFAIL
                } else if what.starts_with("recipient") {
                    EX_NOUSER
                } else if what.starts_with("the sender") || what.starts_with("the connection") {
                    EX_NOPERM
                } else if what.starts_with("the message") {
                    EX_DATAERR
                } else {
                    EX_UNAVAILABLE
                }
            }
        }
    }
}

/// The envelope of one submission.
pub struct Envelope<'a> {
    /// Our name for EHLO.
    pub helo: &'a str,
    /// Envelope sender ("" for the null sender).
    pub sender: &'a str,
    /// Recipients (at least one).
    pub recipients: &'a [String],
    /// `BODY=` parameter to declare, if any.
    pub body_type: Option<&'a str>,
}

/// An open SMTP session with the daemon.
pub struct Session {
    server: String,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    verbose: bool,
    smtputf8: bool,
    eight_bit: bool,
}

/// Connect to `server` ("host:port"), trying each address it resolves to.
pub fn connect(server: &str, verbose: bool) -> Result<Session, SubmitError> {
    let addrs: Vec<SocketAddr> = server
        .to_socket_addrs()
        .map_err(|error| SubmitError::Connect {
            server: server.to_string(),
            error,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let io_err = |error| SubmitError::Io {
                    server: server.to_string(),
                    stage: "connecting",
                    error,
                };
                s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io_err)?;
                s.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io_err)?;
                let w = s.try_clone().map_err(io_err)?;
                return Ok(Session {
                    server: server.to_string(),
                    reader: BufReader::new(s),
                    writer: BufWriter::new(w),
                    verbose,
                    smtputf8: false,
                    eight_bit: false,
                });
            }
            Err(e) => last = e,
        }
    }
    Err(SubmitError::Connect {
        server: server.to_string(),
        error: last,
    })
}

impl Session {
    /// The raw streams, for `-bs` (relaying an SMTP dialogue).
    pub fn into_streams(self) -> (BufReader<TcpStream>, BufWriter<TcpStream>) {
        (self.reader, self.writer)
    }

    fn read_reply(&mut self, stage: &'static str) -> Result<Reply, SubmitError> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = io::Read::take(&mut self.reader, 4096)
                .read_until(b'\n', &mut line)
                .map_err(|error| self.io(stage, error))?;
            if n == 0 {
                return Err(self.io(
                    stage,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                ));
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if self.verbose {
                eprintln!("<<< {text}");
            }
            let last = text.as_bytes().get(3) != Some(&b'-');
            lines.push(text);
            if last {
                break;
            }
        }
        Reply::from_lines(&lines).ok_or_else(|| SubmitError::Garbled {
            server: self.server.clone(),
            stage,
        })
    }

    fn io(&self, stage: &'static str, error: io::Error) -> SubmitError {
        SubmitError::Io {
            server: self.server.clone(),
            stage,
            error,
        }
    }

    fn send(&mut self, line: &str, stage: &'static str) -> Result<(), SubmitError> {
        if self.verbose {
            eprintln!(">>> {line}");
        }
        self.writer
            .write_all(line.as_bytes())
            .and_then(|()| self.writer.write_all(b"\r\n"))
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.io(stage, e))
    }

    fn refused(&self, what: String, reply: Reply) -> SubmitError {
        let hint = match reply.code {
            554 if what.starts_with("the connection") => {
                "; this machine's address must be in the listener's allow_networks"
            }
            530 => {
                "; the listener requires AUTH: submit through a listener with auth = \"none\" or \"optional\""
            }
            _ => "",
        };
        SubmitError::Refused {
            server: self.server.clone(),
            what,
            reply,
            hint,
        }
    }

    /// Greeting and EHLO.
    pub fn hello(&mut self, helo: &str) -> Result<(), SubmitError> {
        let r = self.read_reply("waiting for the greeting")?;
        if r.code != 220 {
            return Err(self.refused("the connection".into(), r));
        }
        self.send(&format!("EHLO {helo}"), "saying EHLO")?;
        let r = self.read_reply("saying EHLO")?;
        if !r.is_positive() {
            return Err(self.refused("EHLO".into(), r));
        }
        for l in r.lines().iter().skip(1) {
            let kw = l.get(4..).unwrap_or("").to_ascii_uppercase();
            self.smtputf8 |= kw == "SMTPUTF8";
            self.eight_bit |= kw == "8BITMIME";
        }
        Ok(())
    }

    /// MAIL and every RCPT; on any refusal, RSET and the error (all or nothing).
    pub fn envelope(&mut self, env: &Envelope<'_>) -> Result<(), SubmitError> {
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if let Some(body) = env.body_type.filter(|_| self.eight_bit) {
            mail.push_str(&format!(" BODY={body}"));
        }
        let utf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.is_ascii());
        if utf8 && self.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        self.send(&mail, "sending MAIL FROM")?;
        let r = self.read_reply("sending MAIL FROM")?;
        if !r.is_positive() {
            return Err(self.refused(format!("the sender <{}>", env.sender), r));
        }
        for rcpt in env.recipients {
            self.send(&format!("RCPT TO:<{rcpt}>"), "sending RCPT TO")?;
            let r = self.read_reply("sending RCPT TO")?;
            if !r.is_positive() {
                let e = self.refused(format!("recipient <{rcpt}>"), r);
                self.reset();
                return Err(e);
            }
        }
        Ok(())
    }

    /// DATA, the content written by `write` (already dot-stuffed and ended by `.CRLF`), and
    /// the final reply; returns that reply ("250 2.0.0 Ok: queued as ID").
    pub fn data<F>(&mut self, write: F) -> Result<Reply, SubmitError>
    where
        F: FnOnce(&mut BufWriter<TcpStream>) -> io::Result<()>,
    {
        self.send("DATA", "sending DATA")?;
        let r = self.read_reply("sending DATA")?;
        if r.code != 354 {
            return Err(self.refused("DATA".into(), r));
        }
        write(&mut self.writer)
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.io("sending the message", e))?;
        let r = self.read_reply("waiting for the message to be queued")?;
        if !r.is_positive() {
            return Err(self.refused("the message".into(), r));
        }
        Ok(r)
    }

    /// RSET, ignoring the outcome (we are giving up on this transaction anyway).
    fn reset(&mut self) {
        if self.send("RSET", "sending RSET").is_ok() {
            let _ = self.read_reply("sending RSET");
        }
    }

    /// QUIT politely; the message is already queued, so errors do not matter.
    pub fn quit(mut self) {
        if self.send("QUIT", "sending QUIT").is_ok() {
            let _ = self.read_reply("sending QUIT");
        }
    }
}
