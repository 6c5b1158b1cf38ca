//! Who may touch postern's files, checked the way `postfix check` and `postfix set-permissions`
//! do: the spool and state directories, and every directory above them, must be writable by
//! the service user alone; secret files must be readable by it alone.
//!
//! `serve` refuses to start when another user could write there (they could forge queued mail,
//! or swap in links that make postern overwrite files), and prints the exact `chown`/`chmod`
//! to run. Directories of postern's own that are merely *readable* by others (an existing
//! 0755 spool) are set to 0700 with a warning: mail and tokens are private, and postern owns
//! them, as Postfix fixes the modes of its queue. Secret files readable by others are logged.
//! `postern check` (also as systemd's `ExecStartPre`) reports all of it, and refuses a
//! world-readable secret file, a directory the service user cannot write, or a control socket
//! path too long for a Unix socket name.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::{Config, Credential, SecretSource};

/// The user postern runs as (for `check` run by root: the user `serve` will run as).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl ServiceUser {
    /// The effective user and group of this process.
    pub fn current() -> Self {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        unsafe {
            Self {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }

    fn name(&self) -> String {
        passwd(self.uid).map_or_else(|| self.uid.to_string(), |(n, _)| n)
    }

    fn group(&self) -> String {
        group(self.gid).map_or_else(|| self.gid.to_string(), |(n, _)| n)
    }

    /// `user:group` for `chown`.
    fn chown_spec(&self) -> String {
        format!("{}:{}", self.name(), self.group())
    }
}

impl fmt::Display for ServiceUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_user(self.uid))
    }
}

/// "postern (uid 998)", or "uid 998" when the user has no name.
pub fn describe_user(uid: u32) -> String {
    match passwd(uid) {
        Some((name, _)) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Name and primary group of a user, from the password database.
fn passwd(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid out-parameter (pointers null, numbers 0).
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is its real size.
        let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 || out.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pw.pw_name) };
        return Some((name.to_string_lossy().into_owned(), pw.pw_gid));
    }
}

/// Name and explicit members of a group, from the group database.
fn group(gid: u32) -> Option<(String, Vec<String>)> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: an all-zero group is a valid out-parameter.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is its real size.
        let r = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
        if r == libc::ERANGE && buf.len() < 1 << 22 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 || out.is_null() || gr.gr_name.is_null() {
            return None;
        }
        // SAFETY: on success gr_name is a NUL-terminated string and gr_mem a NULL-terminated
        // array of them, all inside `buf`.
        let name = unsafe { CStr::from_ptr(gr.gr_name) }
            .to_string_lossy()
            .into_owned();
        let mut members = Vec::new();
        let mut p = gr.gr_mem;
        // SAFETY: see above; we stop at the terminating NULL.
        unsafe {
            while !p.is_null() && !(*p).is_null() {
                members.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
        }
        return Some((name, members));
    }
}

fn group_name(gid: u32) -> String {
    group(gid).map_or_else(|| format!("gid {gid}"), |(n, _)| n)
}

/// Does the effective user have `mode` (`libc::R_OK`...) access to `path`? The kernel's
/// answer, so ACLs and read-only filesystems count.
fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let r = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Worth fixing; postern works.
    Warning,
    /// `serve` (for directories) or `check` refuses.
    Refusal,
}

/// One thing wrong with a file or directory, and how to fix it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// The file or directory.
    pub path: PathBuf,
    /// What is wrong, in the admin's words.
    pub problem: String,
    /// The shell command that fixes it, when there is one.
    pub fix: Option<String>,
    /// A directory of postern's own that `serve` sets to 0700 itself.
    tighten: bool,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Why `serve` will not start: other users could write where postern keeps mail and tokens.
#[derive(Debug, thiserror::Error)]
pub struct Refusal {
    /// Who postern runs as.
    pub user: ServiceUser,
    /// What is wrong (refusals only).
    pub findings: Vec<Finding>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "refusing to start: postern runs as {}, and other users could change its spool or state directory (forge queued mail, or plant links that make postern overwrite files):",
            self.user
        )?;
        for x in &self.findings {
            writeln!(f, "  {}: {}", x.path.display(), x.problem)?;
        }
        let fixes = fix_commands(&self.findings);
        if !fixes.is_empty() {
            writeln!(f, "fix it with (as root):")?;
            for c in fixes {
                writeln!(f, "  {c}")?;
            }
        }
        write!(
            f,
            "then start postern again (`postern check` shows every finding)"
        )
    }
}

/// The distinct fix commands of `findings`, `chown` before `chmod` so the modes stick.
pub fn fix_commands(findings: &[Finding]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in findings {
        if let Some(c) = &f.fix
            && !out.contains(c)
        {
            out.push(c.clone());
        }
    }
    out.sort_by_key(|c| !c.starts_with("chown"));
    out
}

/// A directory of postern's own: what to look at and how.
struct Tree<'a> {
    /// The config key naming it.
    key: &'static str,
    root: &'a Path,
    /// Subdirectories postern manages.
    subdirs: Vec<PathBuf>,
    /// Files postern keeps in it (must be plain files of the service user).
    files: Vec<PathBuf>,
    /// Names directly under the root that postern put there (decides whether `serve` may
    /// tighten the root's mode: never a directory that also holds other things).
    own_names: Vec<String>,
    /// Must exist or be creatable (false: only checked if it exists).
    required: bool,
}

struct Checker {
    user: ServiceUser,
    /// The user is who runs this process, so the kernel can answer access questions.
    same_user: bool,
    findings: Vec<Finding>,
}

impl Checker {
    fn new(user: ServiceUser) -> Self {
        Self {
            user,
            same_user: ServiceUser::current().uid == user.uid,
            findings: Vec::new(),
        }
    }

    fn add(&mut self, severity: Severity, path: &Path, problem: String, fix: Option<String>) {
        let dup = self
            .findings
            .iter()
            .any(|f| f.path == path && f.problem == problem);
        if !dup {
            self.findings.push(Finding {
                severity,
                path: path.to_path_buf(),
                problem,
                fix,
                tighten: false,
            });
        }
    }

    fn refuse(&mut self, path: &Path, problem: String, fix: Option<String>) {
        self.add(Severity::Refusal, path, problem, fix);
    }

    fn tree(&mut self, t: &Tree) {
        let root = std::path::absolute(t.root).unwrap_or_else(|_| t.root.to_path_buf());
        self.ancestors(t.key, &root);
        let meta = match std::fs::metadata(&root) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if t.required {
                    self.creatable(t.key, &root);
                }
                return;
            }
            Err(e) => {
                self.refuse(&root, format!("{} cannot be examined: {e}", t.key), None);
                return;
            }
        };
        if !meta.is_dir() {
            self.refuse(
                &root,
                format!(
                    "{} is not a directory; point {} at a directory",
                    t.key, t.key
                ),
                None,
            );
            return;
        }
        let only_ours = std::fs::read_dir(&root).is_ok_and(|rd| {
            rd.flatten().all(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| t.own_names.iter().any(|o| o == n))
            })
        });
        self.own_dir(t, &root, &meta, &root, only_ours);
        for d in &t.subdirs {
            match std::fs::symlink_metadata(d) {
                Err(_) => {} // created 0700 when needed
                Ok(m) if m.file_type().is_symlink() || !m.is_dir() => self.refuse(
                    d,
                    format!(
                        "is {}, where postern keeps a directory of its own in {} (it must be a real directory)",
                        crate::spool::msgfile::kind(&m.file_type()),
                        t.key
                    ),
                    Some(format!("rm {}", d.display())),
                ),
                Ok(m) => self.own_dir(t, d, &m, &root, true),
            }
        }
        for p in &t.files {
            let Ok(m) = std::fs::symlink_metadata(p) else {
                continue;
            };
            if m.file_type().is_symlink() || m.is_dir() {
                self.refuse(
                    p,
                    format!(
                        "is {}, where postern keeps a file of its own",
                        crate::spool::msgfile::kind(&m.file_type())
                    ),
                    Some(format!("rm {}", p.display())),
                );
            } else if m.uid() != self.user.uid {
                self.refuse(
                    p,
                    format!(
                        "owned by {}, but postern runs as {}",
                        describe_user(m.uid()),
                        self.user
                    ),
                    Some(format!(
                        "chown -R {} {}",
                        self.user.chown_spec(),
                        root.display()
                    )),
                );
            }
        }
    }

    /// Every directory above `root` (as written, and as the symlinks resolve) must be
    /// writable by root and the service user only; a sticky directory such as /tmp is fine,
    /// since nobody else can rename what is ours inside it.
    fn ancestors(&mut self, key: &str, root: &Path) {
        let mut dirs: Vec<PathBuf> = root.ancestors().skip(1).map(Path::to_path_buf).collect();
        let existing = root.ancestors().find(|p| p.exists()).map(Path::to_path_buf);
        if let Some(e) = existing
            && let Ok(c) = e.canonicalize()
        {
            let from = if e == root { 1 } else { 0 };
            dirs.extend(c.ancestors().skip(from).map(Path::to_path_buf));
        }
        let mut seen = std::collections::HashSet::new();
        for a in dirs {
            if !seen.insert(a.clone()) {
                continue;
            }
            let Ok(m) = std::fs::metadata(&a) else {
                continue;
            };
            if !m.is_dir() {
                continue;
            }
            let mode = m.permissions().mode();
            if m.uid() != 0 && m.uid() != self.user.uid {
                self.refuse(
                    &a,
                    format!(
                        "a directory above {key} owned by {}, who could swap in a {key} of their own; make root own it or move {key} elsewhere",
                        describe_user(m.uid())
                    ),
                    Some(format!("chown root:root {}", a.display())),
                );
            }
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                self.refuse(
                    &a,
                    format!(
                        "a directory above {key} writable by {} (mode {:04o}), who could swap in a {key} of their own",
                        writers(&m),
                        mode & 0o7777
                    ),
                    Some(format!("chmod go-w {}", a.display())),
                );
            }
        }
    }

    /// `root` does not exist: can the service user create it?
    fn creatable(&mut self, key: &str, root: &Path) {
        let Some(parent) = root.ancestors().skip(1).find(|p| p.exists()) else {
            return;
        };
        let fix = Some(format!(
            "install -d -o {} -g {} -m 0700 {}",
            self.user.name(),
            self.user.group(),
            root.display()
        ));
        if self.same_user {
            if let Err(e) = access(parent, libc::W_OK | libc::X_OK) {
                self.refuse(
                    root,
                    format!(
                        "{key} does not exist and {} cannot create it in {} ({e})",
                        self.user,
                        parent.display()
                    ),
                    fix,
                );
            }
        } else if let Ok(m) = std::fs::metadata(parent)
            && !(m.uid() == self.user.uid && m.permissions().mode() & 0o300 == 0o300)
        {
            self.refuse(
                root,
                format!(
                    "{key} does not exist and {} cannot create it in {}",
                    self.user,
                    parent.display()
                ),
                fix,
            );
        }
    }

    /// A directory of postern's own (`top` is the configured one, for recursive fixes).
    fn own_dir(&mut self, t: &Tree, d: &Path, m: &std::fs::Metadata, top: &Path, tighten: bool) {
        let key = t.key;
        let mode = m.permissions().mode() & 0o7777;
        let before = self.findings.len();
        if m.uid() == 0 && !t.required && mode & 0o022 == 0 {
            // Root's and unused (no delegated account keeps tokens there): nobody else can
            // write it, and postern has no need to.
            return;
        }
        if m.uid() != self.user.uid {
            let hint = if self.user.uid == 0 {
                format!(
                    " (or run postern as that user, e.g. `runuser -u {} -- postern serve`)",
                    passwd(m.uid()).map_or_else(|| m.uid().to_string(), |(n, _)| n)
                )
            } else {
                String::new()
            };
            self.refuse(
                d,
                format!(
                    "{key}: owned by {}, but postern runs as {}{hint}",
                    describe_user(m.uid()),
                    self.user
                ),
                Some(format!(
                    "chown -R {} {}",
                    self.user.chown_spec(),
                    top.display()
                )),
            );
        }
        if mode & 0o022 != 0 {
            self.refuse(
                d,
                format!("{key}: writable by {} (mode {mode:04o})", writers(m)),
                Some(format!("chmod -R go-rwx {}", top.display())),
            );
        } else if m.uid() == self.user.uid && mode & 0o700 != 0o700 {
            self.refuse(
                d,
                format!("{key}: {} cannot use it (mode {mode:04o})", self.user),
                Some(format!("chmod u+rwx {}", d.display())),
            );
        }
        if self.findings.len() == before
            && self.same_user
            && let Err(e) = access(d, libc::R_OK | libc::W_OK | libc::X_OK)
        {
            self.refuse(
                d,
                format!("{key}: {} cannot write it ({e})", self.user),
                None,
            );
        }
        if self.findings.len() == before && mode & 0o077 != 0 {
            let problem = if tighten {
                format!(
                    "{key}: readable by other users (mode {mode:04o}); mail and tokens are private, so postern serve sets it to 0700"
                )
            } else {
                format!(
                    "{key}: readable by other users (mode {mode:04o}); it holds more than postern's files, so postern leaves it alone"
                )
            };
            self.findings.push(Finding {
                severity: Severity::Warning,
                path: d.to_path_buf(),
                problem,
                fix: Some(format!("chmod 0700 {}", d.display())),
                tighten,
            });
        }
    }

    /// A secret file must be readable by the service user and nobody else.
    fn secret(&mut self, what: &str, p: &Path) {
        let Ok(m) = std::fs::metadata(p) else {
            return; // a missing file is reported where it is read
        };
        let mode = m.permissions().mode() & 0o777;
        let name = self.user.name();
        let private_fix = if m.uid() == self.user.uid {
            format!("chmod 0600 {}", p.display())
        } else {
            format!("chown {name} {0} && chmod 0600 {0}", p.display())
        };
        if mode & 0o004 != 0 {
            self.refuse(
                p,
                format!("{what}: readable by every user (mode {mode:04o})"),
                Some(format!("chmod o-rwx {}", p.display())),
            );
        }
        if mode & 0o040 != 0 && !self.private_group(m.gid()) {
            self.add(
                Severity::Warning,
                p,
                format!(
                    "{what}: readable by group {} (mode {mode:04o})",
                    group_name(m.gid())
                ),
                Some(private_fix.clone()),
            );
        }
        if self.same_user {
            if let Err(e) = access(p, libc::R_OK) {
                self.refuse(
                    p,
                    format!("{what}: {} cannot read it ({e})", self.user),
                    Some(private_fix),
                );
            }
        } else {
            let u = self.user;
            let readable = (m.uid() == u.uid && mode & 0o400 != 0)
                || (m.gid() == u.gid && mode & 0o040 != 0)
                || mode & 0o004 != 0;
            if !readable {
                self.add(
                    Severity::Warning,
                    p,
                    format!("{what}: {u} may not be able to read it (mode {mode:04o})"),
                    Some(private_fix),
                );
            }
        }
    }

    /// A group only the service user is in (`root:postern 0640` is how root shares a secret
    /// with the service).
    fn private_group(&self, gid: u32) -> bool {
        if gid != self.user.gid {
            return false;
        }
        let me = self.user.name();
        group(gid).is_some_and(|(_, members)| members.iter().all(|m| *m == me))
    }
}

/// "every user" or "group NAME".
fn writers(m: &std::fs::Metadata) -> String {
    if m.permissions().mode() & 0o002 != 0 {
        "every user".into()
    } else {
        format!("group {}", group_name(m.gid()))
    }
}

fn spool_tree(cfg: &Config) -> Tree<'_> {
    let root = cfg.spool_dir.as_path();
    let subdirs: Vec<PathBuf> = crate::spool::managed_dirs(root)
        .into_iter()
        .skip(1)
        .collect();
    let mut files: Vec<PathBuf> = crate::spool::ROOT_FILES
        .iter()
        .map(|n| root.join(n))
        .collect();
    if let Ok(rd) = std::fs::read_dir(root.join("journal")) {
        files.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !p.ends_with("deleted")),
        );
    }
    let own_names = subdirs
        .iter()
        .chain(&files)
        .filter_map(|p| p.strip_prefix(root).ok()?.iter().next())
        .filter_map(|n| n.to_str().map(str::to_owned))
        .collect();
    Tree {
        key: "spool_dir",
        root,
        subdirs,
        files,
        own_names,
        required: true,
    }
}

fn state_tree(cfg: &Config) -> Tree<'_> {
    let root = cfg.state_dir.as_path();
    let tokens = root.join("tokens");
    let mut subdirs = vec![tokens.clone()];
    if let Ok(rd) = std::fs::read_dir(&tokens) {
        subdirs.extend(rd.flatten().map(|e| e.path()));
    }
    let delegated = cfg
        .accounts
        .iter()
        .any(|a| matches!(a.credential, Credential::Delegated { .. }));
    // The forwarder's record (pacing windows, waits, refused senders) and its temp file.
    let state_files = crate::forward::state::FILES;
    Tree {
        key: "state_dir",
        root,
        subdirs,
        files: state_files.iter().map(|n| root.join(n)).collect(),
        own_names: std::iter::once("tokens")
            .chain(state_files.iter().copied())
            .map(String::from)
            .collect(),
        // Only delegated accounts keep refresh tokens there.
        required: delegated,
    }
}

/// Every secret file the configuration names, with what it is.
fn secret_files(cfg: &Config) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    // systemd credentials are not checked: systemd keeps them on a private, unswappable
    // filesystem and grants the service user read access by ACL, whose mask shows as
    // group bits.
    let file = |s: &SecretSource| match s {
        SecretSource::File(p) => Some(p.clone()),
        SecretSource::SystemdCredential(_) | SecretSource::Env(_) | SecretSource::Inline(_) => None,
    };
    let mut inline = false;
    for a in &cfg.accounts {
        let (what, src) = match &a.credential {
            Credential::ClientSecret { secret, .. } => ("client secret", Some(secret)),
            Credential::Delegated { secret } => ("client secret", secret.as_ref()),
            Credential::Certificate { key, .. } => ("private key", Some(key)),
        };
        if let Some(src) = src {
            inline |= matches!(src, SecretSource::Inline(_));
            if let Some(p) = file(src) {
                out.push((format!("account.{}: {what} file", a.name), p));
            }
        }
    }
    // The admin token opens the status page (mailboxes, errors) to whoever holds it.
    if let Some(src) = cfg.admin.as_ref().and_then(|a| a.token.as_ref()) {
        inline |= matches!(src, SecretSource::Inline(_));
        if let Some(p) = file(src) {
            out.push(("admin: token file".into(), p));
        }
    }
    for l in &cfg.listeners {
        if let Some(t) = &l.tls_files {
            out.push((
                format!("listener.{}: TLS private key", l.name),
                t.key.clone(),
            ));
        }
    }
    if inline && Path::new(&cfg.source).is_file() {
        out.push((
            "configuration file (it holds a client secret or the admin token)".into(),
            PathBuf::from(&cfg.source),
        ));
    }
    let tokens = cfg.state_dir.join("tokens");
    for d in std::fs::read_dir(&tokens).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "json") {
                out.push(("refresh token file".into(), f.path()));
            }
        }
    }
    out
}

/// Directory findings for `cfg` as seen by `user`.
fn check_dirs(cfg: &Config, user: ServiceUser) -> Checker {
    let mut c = Checker::new(user);
    c.tree(&spool_tree(cfg));
    c.tree(&state_tree(cfg));
    c
}

/// Start-up (`serve`): refuse when other users could write the spool or state directory;
/// otherwise set directories of postern's own that others can read to 0700, and log every
/// warning (secret files readable by others included: `serve` starts anyway, since container
/// runtimes often mount secrets 0444, but `postern check` refuses world-readable ones).
pub fn prepare_serve(cfg: &Config) -> Result<(), Refusal> {
    let user = ServiceUser::current();
    let c = check_dirs(cfg, user);
    let refusals: Vec<Finding> = c
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Refusal)
        .cloned()
        .collect();
    if !refusals.is_empty() {
        return Err(Refusal {
            user,
            findings: refusals,
        });
    }
    for f in c.findings {
        if f.tighten {
            let old = std::fs::metadata(&f.path).map_or(0, |m| m.permissions().mode() & 0o7777);
            match std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o700)) {
                Ok(()) => {
                    warn!(dir = %f.path.display(), old_mode = format!("{old:04o}"), "directory was readable by other users; set to 0700 (mail and tokens are private)")
                }
                Err(e) => {
                    warn!(dir = %f.path.display(), error = %e, "directory is readable by other users and cannot be set to 0700")
                }
            }
        } else {
            warn!("{f}");
        }
    }
    let mut s = Checker::new(user);
    for (what, p) in secret_files(cfg) {
        s.secret(&what, &p);
    }
    for f in s.findings {
        warn!("{f}");
    }
    Ok(())
}

/// What `postern check` found about files and directories.
pub struct CheckReport {
    /// The user the checks are for.
    pub user: ServiceUser,
    /// Why that user (running the check, or the owner of the spool when root runs it).
    pub basis: String,
    /// Everything found, refusals and warnings.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Does `check` fail?
    pub fn refused(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::Refusal)
    }
}

/// The user `check` checks for: whoever runs it, except that root checks for the owner of an
/// existing spool or state directory (the user `serve` runs as under systemd).
fn check_user(cfg: &Config) -> (ServiceUser, String) {
    let me = ServiceUser::current();
    if me.uid != 0 {
        return (me, "the user running this check".into());
    }
    for (key, d) in [("spool_dir", &cfg.spool_dir), ("state_dir", &cfg.state_dir)] {
        if let Ok(m) = std::fs::metadata(d)
            && m.uid() != 0
        {
            let gid = passwd(m.uid()).map_or(m.gid(), |(_, g)| g);
            let u = ServiceUser { uid: m.uid(), gid };
            return (
                u,
                format!(
                    "the owner of {key} {}, as whom postern serve must run",
                    d.display()
                ),
            );
        }
    }
    (me, "the user running this check".into())
}

/// `postern check`: directories, secret files and the control socket path.
pub fn check(cfg: &Config) -> CheckReport {
    let (user, basis) = check_user(cfg);
    let mut c = check_dirs(cfg, user);
    for (what, p) in secret_files(cfg) {
        c.secret(&what, &p);
    }
    let sock = crate::control::socket_path(&cfg.spool_dir);
    if let Err(e) = crate::control::check_path(&sock) {
        c.refuse(&sock, e.to_string(), None);
    }
    CheckReport {
        user,
        basis,
        findings: c.findings,
    }
}

#[cfg(test)]
mod tests;
