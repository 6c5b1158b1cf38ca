use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn is_root() -> bool {
    ServiceUser::current().uid == 0
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A configuration with spool and state under `dir` and `extra` appended.
fn config(dir: &Path, extra: &str) -> Config {
    let text = format!(
        "spool_dir = \"{0}/spool\"\nstate_dir = \"{0}/state\"\n[listener.l]\naddress = \"127.0.0.1:0\"\n[route.r]\nsenders = [\"*\"]\ntransport = \"file\"\ndir = \"{0}/out\"\n{extra}",
        dir.display()
    );
    let path = dir.join("postern.toml");
    fs::write(&path, &text).unwrap();
    crate::config::load_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A private directory under /tmp to build spools in (tempdir's own mode is 0700).
fn base() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    d
}

fn refusals(findings: &[Finding]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Refusal)
        .map(ToString::to_string)
        .collect()
}

#[test]
fn a_writable_spool_is_refused_with_the_commands_that_fix_it() {
    let d = base();
    let spool = d.path().join("spool");
    fs::create_dir(&spool).unwrap();
    chmod(&spool, 0o777);
    let cfg = config(d.path(), "");
    let err = prepare_serve(&cfg).unwrap_err().to_string();
    assert!(err.contains("writable by every user (mode 0777)"), "{err}");
    assert!(
        err.contains(&format!("chmod -R go-rwx {}", spool.display())),
        "{err}"
    );
    assert_eq!(mode(&spool), 0o777, "a refused spool is left as it is");
    // Group-writable state directories inside, and a symlink where one belongs.
    chmod(&spool, 0o700);
    fs::create_dir(spool.join("incoming")).unwrap();
    chmod(&spool.join("incoming"), 0o770);
    let elsewhere = d.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, spool.join("deferred")).unwrap();
    let r = refusals(&check(&cfg).findings);
    assert!(
        r.iter()
            .any(|f| f.contains("incoming") && f.contains("writable by group")),
        "{r:?}"
    );
    assert!(
        r.iter().any(|f| f.contains("a symbolic link")
            && f.contains(&format!("rm {}", spool.join("deferred").display()))),
        "{r:?}"
    );
    assert!(prepare_serve(&cfg).is_err());
    // Fixed as told, it starts.
    fs::remove_file(spool.join("deferred")).unwrap();
    chmod(&spool.join("incoming"), 0o700);
    prepare_serve(&cfg).unwrap();
}

/// An existing 0755 spool (and its subdirectories) is postern's own: set to 0700, as Postfix
/// fixes its queue's modes. A spool_dir that also holds other things is left alone.
#[test]
fn a_readable_spool_is_tightened_to_0700() {
    let d = base();
    let spool = d.path().join("spool");
    fs::create_dir_all(spool.join("incoming")).unwrap();
    chmod(&spool, 0o755);
    chmod(&spool.join("incoming"), 0o755);
    let cfg = config(d.path(), "");
    let w: Vec<String> = check(&cfg).findings.iter().map(|f| f.to_string()).collect();
    assert!(
        w.iter()
            .any(|f| f.contains("readable by other users (mode 0755)")
                && f.contains("sets it to 0700")),
        "{w:?}"
    );
    assert!(!check(&cfg).refused());
    prepare_serve(&cfg).unwrap();
    assert_eq!(mode(&spool), 0o700);
    assert_eq!(mode(&spool.join("incoming")), 0o700);
    // Someone else's files beside ours: the root stays as it is; our directories do not.
    chmod(&spool, 0o755);
    chmod(&spool.join("incoming"), 0o755);
    fs::write(spool.join("README"), b"not postern's").unwrap();
    prepare_serve(&cfg).unwrap();
    assert_eq!(mode(&spool), 0o755);
    assert_eq!(mode(&spool.join("incoming")), 0o700);
}

/// A directory above the spool that others can write lets them swap in a spool of their own;
/// a sticky one (like /tmp) does not.
#[test]
fn writable_directories_above_the_spool_are_refused_unless_sticky() {
    let d = base();
    let above = d.path().join("above");
    fs::create_dir(&above).unwrap();
    chmod(&above, 0o777);
    let text = format!("spool_dir = \"{}/spool\"\n", above.display());
    let path = d.path().join("postern.toml");
    fs::write(
        &path,
        format!("{text}[listener.l]\naddress = \"127.0.0.1:0\"\n[route.r]\nsenders = [\"*\"]\ntransport = \"discard\"\n"),
    )
    .unwrap();
    let cfg = crate::config::load_file(&path).unwrap();
    let err = prepare_serve(&cfg).unwrap_err().to_string();
    assert!(
        err.contains(&format!("chmod go-w {}", above.display()))
            && err.contains("a directory above spool_dir writable by every user"),
        "{err}"
    );
    assert!(
        !above.join("spool").exists(),
        "nothing created when refused"
    );
    chmod(&above, 0o1777);
    prepare_serve(&cfg).unwrap();
}

/// Directories owned by another (non-root) user, above or in the spool, are refused with the
/// chown that fixes them. Needs root to chown (CI runs as root).
#[test]
fn directories_of_another_user_are_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give a directory to another user (CI runs as root)");
        return;
    }
    let d = base();
    let spool = d.path().join("spool");
    fs::create_dir(&spool).unwrap();
    std::os::unix::fs::chown(&spool, Some(65534), Some(65534)).unwrap();
    let cfg = config(d.path(), "");
    let err = prepare_serve(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("owned by nobody (uid 65534), but postern runs as root (uid 0)")
            && err.contains("runuser -u nobody -- postern serve")
            && err.contains(&format!("chown -R root:root {}", spool.display())),
        "{err}"
    );
    // `check` run by root checks for the spool's owner, as whom serve will run.
    let report = check(&cfg);
    assert_eq!(report.user.uid, 65534);
    assert!(
        report.basis.contains("owner of spool_dir"),
        "{}",
        report.basis
    );
    // An ancestor owned by another user.
    std::os::unix::fs::chown(&spool, Some(0), Some(0)).unwrap();
    std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap();
    let err = prepare_serve(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("a directory above spool_dir owned by nobody (uid 65534)")
            && err.contains(&format!("chown root:root {}", d.path().display())),
        "{err}"
    );
    std::os::unix::fs::chown(d.path(), Some(0), Some(0)).unwrap();
}

/// `check` for a service user who cannot create (or write) the spool: the issue's
/// "create .../spool/tmp: Permission denied" must fail at `check`, not at start.
#[test]
fn check_says_when_the_service_user_cannot_use_the_spool() {
    let d = base();
    let cfg = config(d.path(), "");
    let nobody = ServiceUser {
        uid: 65534,
        gid: 65534,
    };
    let r = refusals(&check_dirs(&cfg, nobody).findings);
    let spool = d.path().join("spool");
    assert!(
        r.iter().any(|f| f.contains("spool_dir does not exist")
            && f.contains("install -d -o nobody -g ")
            && f.contains(&format!("-m 0700 {}", spool.display()))),
        "{r:?}"
    );
    // Exists, owned by root, as a package's postinst might leave it.
    fs::create_dir(&spool).unwrap();
    chmod(&spool, 0o755);
    let r = refusals(&check_dirs(&cfg, nobody).findings);
    assert!(
        r.iter().any(
            |f| f.contains("owned by root (uid 0), but postern runs as nobody")
                && f.contains("chown -R nobody:")
        ),
        "{r:?}"
    );
    // The owner without write permission.
    chmod(&spool, 0o500);
    let me = ServiceUser::current();
    let r = refusals(&check_dirs(&cfg, me).findings);
    assert!(
        r.iter().any(|f| f.contains("cannot use it (mode 0500)")
            && f.contains(&format!("chmod u+rwx {}", spool.display()))),
        "{r:?}"
    );
}

/// Secret files: world-readable refused by `check` (a warning for `serve`), group-readable a
/// warning, private fine; each names the file and the chmod.
#[test]
fn secret_files_must_not_be_readable_by_others() {
    let d = base();
    let secret = d.path().join("client-secret");
    fs::write(&secret, b"s3cret\n").unwrap();
    let cfg = config(
        d.path(),
        "[account.a]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"0f8fad5b-d9cb-469f-a165-70867728950e\"\nauth = \"client_secret\"\nclient_secret_file = \"client-secret\"\n",
    );
    chmod(&secret, 0o644);
    let report = check(&cfg);
    assert!(report.refused());
    let r = refusals(&report.findings);
    assert!(
        r.iter().any(|f| f
            .contains("account.a: client secret file: readable by every user (mode 0644)")
            && f.contains(&format!("chmod o-rwx {}", secret.display()))),
        "{r:?}"
    );
    prepare_serve(&cfg).expect("serve only warns about secret files");
    chmod(&secret, 0o640);
    fs::create_dir_all(d.path().join("grp")).unwrap();
    let report = check(&cfg);
    let all: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
    if ServiceUser::current().gid == fs::metadata(&secret).unwrap().gid()
        && group(ServiceUser::current().gid).is_some_and(|(_, m)| m.is_empty())
    {
        // root:root 0640 with nobody else in group root: as private as 0600.
        assert!(
            !all.iter().any(|f| f.contains("readable by group")),
            "{all:?}"
        );
    } else {
        assert!(
            all.iter().any(|f| f.contains("readable by group")),
            "{all:?}"
        );
    }
    assert!(!report.refused(), "{all:?}");
    chmod(&secret, 0o600);
    let all: Vec<String> = check(&cfg)
        .findings
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(!all.iter().any(|f| f.contains("client-secret")), "{all:?}");
}

/// A group other users are in may not read a secret; root:postern 0640 (postern alone in its
/// group) may. Needs root to chgrp.
#[test]
fn group_readable_secrets_warn_unless_the_group_is_the_service_users_own() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to chgrp (CI runs as root)");
        return;
    }
    let d = base();
    let secret = d.path().join("key.pem");
    fs::write(&secret, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
    chmod(&secret, 0o640);
    // Group "users" (100) is not root's own group.
    std::os::unix::fs::chown(&secret, Some(0), Some(100)).unwrap();
    let mut c = Checker::new(ServiceUser::current());
    c.secret("TLS private key", &secret);
    let all: Vec<String> = c.findings.iter().map(ToString::to_string).collect();
    assert!(
        all.iter().any(|f| f.contains("readable by group")
            && f.contains(&format!("chmod 0600 {}", secret.display()))),
        "{all:?}"
    );
    assert!(c.findings.iter().all(|f| f.severity == Severity::Warning));
}

/// `check` refuses a spool whose control socket path does not fit in a socket address.
#[test]
fn check_refuses_a_control_socket_path_too_long() {
    let d = base();
    let long = d.path().join("x".repeat(100));
    fs::create_dir(&long).unwrap();
    let cfg = config(&long, "");
    let r = refusals(&check(&cfg).findings);
    let sock = long.join("spool/control.sock");
    assert!(
        r.iter().any(|f| f.contains(&format!(
            "control socket path {} is {} bytes long",
            sock.display(),
            sock.as_os_str().len()
        ))),
        "{r:?}"
    );
}
