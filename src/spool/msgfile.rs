//! The queue file: one file per message, like Postfix's queue files.
//!
//! ```text
//! <message bytes: exactly envelope.size of them>
//! <envelope JSON> "\n" <JSON length, 10 decimal digits> "POSTERN1\n"     ← first trailer
//! <envelope JSON> "\n" <JSON length, 10 decimal digits> "POSTERN1\n"     ← each later update
//! ```
//!
//! Why one file and not a directory with `message.eml` and `envelope.json`: accepting a message
//! then costs one new inode and one data flush instead of three inodes and three flushes
//! (measured in bench/: the flushes and ext4's inode allocation dominated the accept path).
//! The envelope changes only when a delivery attempt fails or the admin acts; each change is
//! *appended* as a new trailer and fdatasynced, so the message bytes are never rewritten and
//! the newest complete trailer is the truth. A crash in the middle of an append leaves a torn
//! tail, which readers skip (they search back for the last complete trailer) and recovery cuts off.
//!
//! Only a regular file owned by the spool's owner is a queue file: anything else in a queue
//! directory (a symlink, a FIFO, another user's file) was not written by postern and is refused
//! with [`SpoolError::Untrusted`] before a byte of it is read.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::{ENVELOPE_VERSION, Envelope, SpoolError, durable};

/// Ends every trailer.
const MAGIC: &[u8] = b"POSTERN1\n";
/// `"\n"` + 10 digits + [`MAGIC`].
const FOOTER_LEN: u64 = 1 + 10 + MAGIC.len() as u64;
/// How far back from the end a reader searches for a complete trailer when the tail is torn.
const SEARCH_BACK: u64 = 1 << 20;
/// Largest envelope accepted (thousands of recipients with long replies still fit).
const MAX_ENVELOPE: u64 = 16 << 20;

/// The bytes appended for `env`: JSON, newline, length, magic.
pub fn trailer(env: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(env)?;
    let mut out = Vec::with_capacity(json.len() + FOOTER_LEN as usize);
    out.extend_from_slice(&json);
    out.push(b'\n');
    out.extend_from_slice(format!("{:010}", json.len()).as_bytes());
    out.extend_from_slice(MAGIC);
    Ok(out)
}

/// Open the queue file at `path` (for writing too if `write`): never through a symlink, and
/// only if it is a regular file owned by `owner` (when given: the spool's owner).
pub fn open(path: &Path, write: bool, owner: Option<u32>) -> Result<File, SpoolError> {
    let file = durable::open_existing(path, write).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            SpoolError::untrusted(path, "a symbolic link".into())
        } else {
            SpoolError::io("open", path, e)
        }
    })?;
    let m = file
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?;
    if !m.file_type().is_file() {
        return Err(SpoolError::untrusted(path, kind(&m.file_type()).into()));
    }
    if let Some(owner) = owner
        && m.uid() != owner
    {
        return Err(SpoolError::untrusted(
            path,
            format!(
                "owned by {}, not by {}, the spool's owner",
                crate::trust::describe_user(m.uid()),
                crate::trust::describe_user(owner)
            ),
        ));
    }
    Ok(file)
}

/// What kind of file this is, for messages.
pub fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The newest complete envelope of the queue file at `path`, and the file length at which
/// that trailer ends (anything after it is a torn append). `owner`: see [`open`].
pub fn read(path: &Path, owner: Option<u32>) -> Result<(Envelope, u64), SpoolError> {
    let file = open(path, false, owner)?;
    let len = file
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?
        .len();
    if let Some(found) = trailer_ending_at(&file, len, path)? {
        return Ok((found, len));
    }
    // Torn tail: look back for the last trailer that is complete and parses.
    let start = len.saturating_sub(SEARCH_BACK);
    let mut tail = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut tail, start)
        .map_err(|e| SpoolError::io("read", path, e))?;
    let mut end = tail.len();
    while let Some(pos) = find_last(&tail[..end], MAGIC) {
        let candidate_end = start + pos as u64 + MAGIC.len() as u64;
        if let Some(env) = trailer_ending_at(&file, candidate_end, path)? {
            return Ok((env, candidate_end));
        }
        end = pos;
    }
    Err(SpoolError::other(
        "read envelope",
        path,
        "no complete envelope trailer (not a postern queue file, or damaged)",
    ))
}

/// Parse the trailer that ends exactly at `end`, if there is a valid one.
fn trailer_ending_at(file: &File, end: u64, path: &Path) -> Result<Option<Envelope>, SpoolError> {
    if end < FOOTER_LEN {
        return Ok(None);
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut footer, end - FOOTER_LEN)
        .map_err(|e| SpoolError::io("read", path, e))?;
    if footer[0] != b'\n' || &footer[11..] != MAGIC {
        return Ok(None);
    }
    let Some(json_len) = std::str::from_utf8(&footer[1..11])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return Ok(None);
    };
    if json_len > MAX_ENVELOPE || json_len + FOOTER_LEN > end {
        return Ok(None);
    }
    let mut json = vec![0u8; json_len as usize];
    file.read_exact_at(&mut json, end - FOOTER_LEN - json_len)
        .map_err(|e| SpoolError::io("read", path, e))?;
    let Ok(env) = serde_json::from_slice::<Envelope>(&json) else {
        // An unknown version must not be mistaken for a torn tail: say what it is.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
            && let Some(ver) = v.get("version").and_then(|x| x.as_u64())
            && ver != u64::from(ENVELOPE_VERSION)
        {
            return Err(SpoolError::other(
                "decode",
                path,
                format!(
                    "envelope version {ver} is not supported (this postern reads {ENVELOPE_VERSION})"
                ),
            ));
        }
        return Ok(None);
    };
    if env.version != ENVELOPE_VERSION {
        return Err(SpoolError::other(
            "decode",
            path,
            format!(
                "envelope version {} is not supported (this postern reads {ENVELOPE_VERSION})",
                env.version
            ),
        ));
    }
    Ok(Some(env))
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// Append a new envelope to the queue file and fdatasync it. Only the newest trailer counts,
/// so a crash during the append leaves the previous envelope in force.
pub fn append(path: &Path, env: &Envelope, owner: Option<u32>) -> Result<(), SpoolError> {
    let bytes = trailer(env).map_err(|e| SpoolError::other("encode envelope", path, e))?;
    let (_, valid_end) = read(path, owner)?;
    let mut f = open(path, true, owner)?;
    // Cut a torn tail first, so the new trailer follows a complete one.
    let len = f
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?
        .len();
    if len != valid_end {
        f.set_len(valid_end)
            .map_err(|e| SpoolError::io("truncate", path, e))?;
    }
    f.seek(SeekFrom::Start(valid_end))
        .map_err(|e| SpoolError::io("seek", path, e))?;
    f.write_all(&bytes)
        .map_err(|e| SpoolError::io("write", path, e))?;
    f.sync_data().map_err(|e| SpoolError::io("fsync", path, e))
}

/// Cut a torn tail off (recovery), returning whether anything was cut.
pub fn repair(path: &Path, owner: Option<u32>) -> Result<bool, SpoolError> {
    let (_, valid_end) = read(path, owner)?;
    let f = open(path, true, owner)?;
    let len = f
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?
        .len();
    if len == valid_end {
        return Ok(false);
    }
    f.set_len(valid_end)
        .map_err(|e| SpoolError::io("truncate", path, e))?;
    f.sync_data()
        .map_err(|e| SpoolError::io("fsync", path, e))?;
    Ok(true)
}

/// Check that the message bytes the envelope claims are all there.
pub fn check_size(path: &Path, env: &Envelope) -> Result<(), String> {
    let len = std::fs::symlink_metadata(path)
        .map_err(|e| e.to_string())?
        .len();
    if env.size + FOOTER_LEN > len {
        return Err(format!(
            "file has {len} bytes, envelope says the message alone has {}",
            env.size
        ));
    }
    Ok(())
}

/// A reader of just the message bytes (not the trailers) of a queue file (a regular file,
/// never read through a symlink).
pub fn open_message(path: &Path, size: u64) -> io::Result<io::Take<File>> {
    let f = durable::open_existing(path, false)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f.take(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u32) -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: "0123456789ABCDEF".into(),
            received_at: 1,
            sender: "a@example.com".into(),
            recipients: vec![],
            client_addr: String::new(),
            client_helo: String::new(),
            auth_user: None,
            listener: String::new(),
            route: String::new(),
            mailbox: String::new(),
            size: 5,
            body_8bit: false,
            smtputf8: false,
            attempts: n,
            next_attempt: None,
            last_error: None,
            hold_reason: None,
            auto_hold: false,
            graph: None,
        }
    }

    #[test]
    fn append_read_and_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q");
        let mut bytes = b"hello".to_vec();
        bytes.extend(trailer(&env(0)).unwrap());
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read(&p, None).unwrap().0.attempts, 0);
        append(&p, &env(1), None).unwrap();
        append(&p, &env(2), None).unwrap();
        assert_eq!(read(&p, None).unwrap().0.attempts, 2);
        // the message bytes are untouched
        let mut m = String::new();
        open_message(&p, 5).unwrap().read_to_string(&mut m).unwrap();
        assert_eq!(m, "hello");
        // a torn append at every possible length leaves the previous envelope in force
        let whole = std::fs::read(&p).unwrap();
        let t3 = trailer(&env(3)).unwrap();
        for cut in 0..t3.len() {
            let mut torn = whole.clone();
            torn.extend_from_slice(&t3[..cut]);
            std::fs::write(&p, &torn).unwrap();
            assert_eq!(read(&p, None).unwrap().0.attempts, 2, "cut at {cut}");
        }
        assert!(repair(&p, None).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), whole);
        append(&p, &env(3), None).unwrap();
        assert_eq!(read(&p, None).unwrap().0.attempts, 3);
    }

    #[test]
    fn garbage_and_unknown_versions_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q");
        std::fs::write(&p, b"just some mail\r\n").unwrap();
        assert!(read(&p, None).is_err());
        let mut e = env(0);
        e.version = 99;
        let mut bytes = b"hello".to_vec();
        bytes.extend(trailer(&e).unwrap());
        std::fs::write(&p, &bytes).unwrap();
        let err = read(&p, None).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
    }
}
