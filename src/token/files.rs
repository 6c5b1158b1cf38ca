//! Refresh tokens on disk: one JSON file per (account, mailbox) at
//! `{state_dir}/tokens/{account}/{mailbox}.json`, mode 0600 in 0700 directories.
//!
//! Writes are atomic and durable: a temp file created with mode 0600 (never world-readable,
//! not even for a moment), written, fsynced, renamed over the old file, then the directory
//! fsynced. A crash leaves the old token or the new one, never a torn file; and because Entra
//! does not revoke a refresh token when it rotates it (microsoft-reference.md §1.3), the old
//! one still works after such a crash.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;
use zeroize::Zeroize;

use super::Audience;
use crate::secret::Secret;
use crate::spool::durable::fsync_dir;

/// Format version of token files.
const VERSION: u64 = 1;

/// Why a token file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The filesystem said no.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not a token file we can read.
    #[error("{path}: not a postern token file ({why}); run `postern login` for this mailbox again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// A refresh token as stored.
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// The mailbox (as given at login, lower-cased).
    pub mailbox: String,
    /// What it was obtained for (decides the scope of refreshes).
    pub audience: Audience,
    /// Graph: the mailbox is not the signed-in user's own (`Mail.Send.Shared`).
    pub shared: bool,
    /// The refresh token.
    pub refresh_token: Secret<String>,
    /// When it was saved (seconds since the epoch): the last successful refresh.
    pub saved_at: u64,
}

/// The token directory of one state directory.
#[derive(Debug, Clone)]
pub struct TokenFiles {
    root: PathBuf,
}

/// A file-name-safe form of an account or mailbox name: lower-case ASCII letters, digits and
/// `@._+-` kept, every other byte as `%XX`; so names never collide and never escape the
/// directory (`/`, `..`, leading dots).
pub fn sanitise(name: &str) -> String {
    let lower = name.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    for (i, b) in lower.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'@' | b'_' | b'+' | b'-')
            || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

impl TokenFiles {
    /// Token files below `{state_dir}/tokens`.
    pub fn new(state_dir: &Path) -> Self {
        TokenFiles {
            root: state_dir.join("tokens"),
        }
    }

    /// The directory of `account`.
    pub fn account_dir(&self, account: &str) -> PathBuf {
        self.root.join(sanitise(account))
    }

    /// The file of (`account`, `mailbox`).
    pub fn path(&self, account: &str, mailbox: &str) -> PathBuf {
        self.account_dir(account)
            .join(format!("{}.json", sanitise(mailbox)))
    }

    /// Read the refresh token of (`account`, `mailbox`); `None` when there is none yet.
    pub fn load(&self, account: &str, mailbox: &str) -> Result<Option<StoredToken>, FileError> {
        let path = self.path(account, mailbox);
        read_file(&path)
    }

    /// Every stored token of `account`.
    pub fn list(&self, account: &str) -> Result<Vec<StoredToken>, FileError> {
        let dir = self.account_dir(account);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(FileError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "json")
                && let Some(t) = read_file(&p)?
            {
                out.push(t);
            }
        }
        out.sort_by(|a, b| a.mailbox.cmp(&b.mailbox));
        Ok(out)
    }

    /// Save (atomically replace) the refresh token of (`account`, `token.mailbox`).
    pub fn save(&self, account: &str, token: &StoredToken) -> Result<(), FileError> {
        let dir = self.account_dir(account);
        make_private_dir(&self.root)?;
        make_private_dir(&dir)?;
        // `postern login` usually runs as root, the daemon as the service user: files written
        // by root are handed to whoever owns the state directory, so the daemon can read them.
        let owner = self.service_owner();
        for d in [&self.root, &dir] {
            give_to(d, owner)?;
        }
        let path = self.path(account, &token.mailbox);
        let doc = serde_json::json!({
            "version": VERSION,
            "account": account,
            "mailbox": token.mailbox.to_lowercase(),
            "audience": token.audience.as_str(),
            "shared": token.shared,
            "saved_at": token.saved_at,
            "refresh_token": token.refresh_token.expose(),
        });
        let mut doc = doc;
        let bytes = serde_json::to_vec_pretty(&doc);
        wipe(&mut doc);
        // Never write an empty file over a good token.
        let mut bytes = bytes.map_err(|e| FileError::Corrupt {
            path: path.clone(),
            why: format!("cannot encode: {e}"),
        })?;
        let r = write_private_atomic(&path, &bytes, owner);
        bytes.zeroize();
        r
    }

    /// The owner (uid, gid) token files must have when we run as root: the state directory's,
    /// if that is not root. `None` means "leave ownership as created".
    fn service_owner(&self) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let state_dir = self.root.parent()?;
        let m = fs::metadata(state_dir).ok()?;
        (m.uid() != 0).then_some((m.uid(), m.gid()))
    }
}

/// chown `path` to `owner` (see `TokenFiles::service_owner`).
fn give_to(path: &Path, owner: Option<(u32, u32)>) -> Result<(), FileError> {
    match owner {
        Some((uid, gid)) => {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(path))
        }
        None => Ok(()),
    }
}

/// Overwrite the secret inside a JSON document before it is dropped.
fn wipe(doc: &mut Value) {
    if let Some(Value::String(s)) = doc.get_mut("refresh_token") {
        s.zeroize();
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create `dir` with mode 0700 (and fsync its parent); tighten an existing one we own.
fn make_private_dir(dir: &Path) -> Result<(), FileError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    mode = format!("{mode:o}"),
                    "token directory is accessible to other users; setting it to 0700"
                );
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            }
            Ok(())
        }
        _ => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            if let Some(p) = dir.parent() {
                fsync_dir(p).map_err(io_err(p))?;
            }
            Ok(())
        }
    }
}

/// Temp file (0600, created new) → write → fsync → rename → fsync dir.
fn write_private_atomic(
    path: &Path,
    bytes: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    let dir = path.parent().ok_or_else(|| FileError::Io {
        path: path.to_path_buf(),
        source: io::Error::other("no parent directory"),
    })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash mid-write is garbage (the real file is intact): replace it.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let written = match owner {
        Some((uid, gid)) => std::os::unix::fs::fchown(&f, Some(uid), Some(gid)),
        None => Ok(()),
    }
    .and_then(|()| f.write_all(bytes))
    .and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    fsync_dir(dir).map_err(io_err(dir))
}

fn read_file(path: &Path) -> Result<Option<StoredToken>, FileError> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if let Ok(m) = fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:o}"),
                "refresh token file is readable by other users; run chmod 600 on it"
            );
        }
    }
    let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
    bytes.zeroize();
    let corrupt = |why: &str| FileError::Corrupt {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut v = parsed.map_err(|_| corrupt("not JSON"))?;
    let result = (|| {
        if v.get("version").and_then(Value::as_u64) != Some(VERSION) {
            return Err(corrupt("unknown version"));
        }
        let rt = v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| corrupt("no refresh_token"))?;
        let mailbox = v
            .get("mailbox")
            .and_then(Value::as_str)
            .ok_or_else(|| corrupt("no mailbox"))?;
        let audience = match v.get("audience").and_then(Value::as_str) {
            Some("graph") => Audience::Graph,
            _ => Audience::Smtp,
        };
        Ok(StoredToken {
            mailbox: mailbox.to_string(),
            audience,
            shared: v.get("shared").and_then(Value::as_bool).unwrap_or(false),
            refresh_token: Secret::new(rt.to_string()),
            saved_at: v.get("saved_at").and_then(Value::as_u64).unwrap_or(0),
        })
    })();
    wipe(&mut v);
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(mailbox: &str, rt: &str) -> StoredToken {
        StoredToken {
            mailbox: mailbox.into(),
            audience: Audience::Graph,
            shared: true,
            refresh_token: Secret::new(rt.into()),
            saved_at: 42,
        }
    }

    #[test]
    fn root_hands_token_files_to_the_state_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (as `postern login` usually runs)");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(state.path(), Some(65534), Some(65534)).unwrap();
        let files = TokenFiles::new(state.path());
        files
            .save("contoso", &tok("a@contoso.com", "rt-1"))
            .unwrap();
        for p in [
            files.root.clone(),
            files.account_dir("contoso"),
            files.path("contoso", "a@contoso.com"),
        ] {
            let m = fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", p.display());
        }
    }

    #[test]
    fn names_are_sanitised_and_distinct() {
        assert_eq!(sanitise("Scanner@Contoso.com"), "scanner@contoso.com");
        assert_eq!(sanitise("../etc/passwd"), "%2E.%2Fetc%2Fpasswd");
        assert_eq!(sanitise(".hidden"), "%2Ehidden");
        assert_eq!(sanitise(""), "%00");
        assert_ne!(sanitise("a/b"), sanitise("a%2Fb"));
    }

    #[test]
    fn save_load_roundtrip_with_private_modes_and_atomic_replace() {
        let d = tempfile::tempdir().unwrap();
        let files = TokenFiles::new(d.path());
        assert!(files.load("acct", "a@x.com").unwrap().is_none());
        files.save("acct", &tok("a@x.com", "rt-one")).unwrap();
        let p = files.path("acct", "a@x.com");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&files.account_dir("acct")), 0o700);
        assert_eq!(mode(&d.path().join("tokens")), 0o700);
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&p).unwrap().ino();
        files.save("acct", &tok("A@X.com", "rt-two")).unwrap();
        // Replaced by rename: a new inode, no temp file left behind.
        assert_ne!(fs::metadata(&p).unwrap().ino(), ino);
        assert!(!p.with_extension("json.new").exists());
        let t = files.load("acct", "a@x.com").unwrap().unwrap();
        assert_eq!(t.refresh_token.expose(), "rt-two");
        assert_eq!(t.audience, Audience::Graph);
        assert!(t.shared);
        assert_eq!(files.list("acct").unwrap().len(), 1);
    }

    #[test]
    fn a_failed_save_keeps_the_old_token() {
        let d = tempfile::tempdir().unwrap();
        let files = TokenFiles::new(d.path());
        files.save("acct", &tok("a@x.com", "rt-one")).unwrap();
        let p = files.path("acct", "a@x.com");
        // Something that cannot be removed as a file where the temp file goes.
        let tmp = PathBuf::from(format!("{}.new", p.display()));
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("x"), b"x").unwrap();
        assert!(files.save("acct", &tok("a@x.com", "rt-two")).is_err());
        let t = files.load("acct", "a@x.com").unwrap().unwrap();
        assert_eq!(t.refresh_token.expose(), "rt-one");
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let d = tempfile::tempdir().unwrap();
        let files = TokenFiles::new(d.path());
        fs::create_dir_all(files.account_dir("acct")).unwrap();
        fs::write(files.path("acct", "a@x.com"), b"{not json").unwrap();
        let e = files.load("acct", "a@x.com").unwrap_err();
        assert!(e.to_string().contains("postern login"), "{e}");
    }
}
