//! Spool trust through the real binary: a spool others can write is refused with the fix,
//! nothing is written through planted links, queue files postern did not write are never
//! delivered, the lock file and control socket are private, queue commands create nothing,
//! and a control socket path too long fails at start-up.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Run `postern ARGS` (e.g. `serve`) on `config` and wait for it to exit (killed after 20 s:
/// a serve that does not refuse). Returns (exit code, stdout, stderr).
fn run_until_exit(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let (o, e) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn postern");
    let code = wait_child(&mut child, Duration::from_secs(20));
    (
        code,
        std::fs::read_to_string(o).unwrap_or_default(),
        std::fs::read_to_string(e).unwrap_or_default(),
    )
}

/// A config file for `basic_config` in a fresh temp dir (not started).
fn config_in(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("postern.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn serve_and_check_refuse_a_spool_others_can_write_and_say_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in(dir.path(), &basic_config("", ""));
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    chmod(&spool, 0o777); // as after `chmod -R 777`
    chmod(&spool.join("incoming"), 0o777);
    let (code, _, err) = run_until_exit(&cfg, &["serve"]);
    assert_eq!(code, Some(78), "serve must refuse: {err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(
        err.contains(&format!(
            "{}: spool_dir: writable by every user (mode 0777)",
            spool.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("  chmod -R go-rwx {}\n", spool.display())),
        "the exact command: {err}"
    );
    assert!(
        !spool.join("tmp").exists(),
        "nothing created in a refused spool"
    );
    // `check` (systemd's ExecStartPre) fails the same way, before serve would.
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(
        out.contains(&format!(
            "error: {}: spool_dir: writable by every user",
            spool.display()
        )),
        "{out}"
    );
    assert!(
        err.contains(&format!("chmod -R go-rwx {}", spool.display())),
        "{err}"
    );
    // Fixed as told, it starts.
    let status = Command::new("chmod")
        .args(["-R", "go-rwx"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// An existing 0755 spool is postern's own: set to 0700 with a warning, as Postfix fixes
/// the modes of its queue, and the daemon runs.
#[test]
fn an_existing_0755_spool_is_set_to_0700() {
    let mut p = Postern::start(&basic_config("", ""));
    let (spool, incoming) = (p.path("spool"), p.path("spool/incoming"));
    restart_after(&mut p, || {
        chmod(&spool, 0o755);
        chmod(&incoming, 0o755);
    });
    assert_eq!(mode(&p.path("spool")), 0o700);
    assert_eq!(mode(&p.path("spool/incoming")), 0o700);
    assert!(
        p.log_text().contains("set to 0700") && p.log_text().contains("0755"),
        "{}",
        p.log_text()
    );
    expect(
        &send_mail(
            p.addr(),
            "a@example.com",
            &["b@example.org"],
            b"Subject: x\r\n\r\nx",
        ),
        "250",
    );
}

/// The issue's attack: a delivered queue file recycled in free/ is replaced by a symlink to a
/// file outside the spool; the next message must not be written into that file.
#[test]
fn a_recycled_file_swapped_for_a_symlink_is_not_written_through() {
    let p = Postern::start(&basic_config("", ""));
    let target = p.path("precious");
    std::fs::write(&target, b"root:x:0:0::/root:/bin/sh\n").unwrap();
    let first = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: one\r\n\r\none",
    ));
    assert_eq!(p.wait_delivered(1, Duration::from_secs(15)).len(), 1);
    let pooled = p.path("spool/free").join(&first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pooled.is_file() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pooled.is_file(),
        "the delivered queue file is kept for reuse"
    );
    std::fs::remove_file(&pooled).unwrap();
    std::os::unix::fs::symlink(&target, &pooled).unwrap();
    for i in 0..3 {
        expect(
            &send_mail(
                p.addr(),
                "a@example.com",
                &["b@example.org"],
                format!("Subject: next {i}\r\n\r\nnext").as_bytes(),
            ),
            "250",
        );
    }
    assert_eq!(p.wait_delivered(4, Duration::from_secs(15)).len(), 4);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n",
        "the file outside the spool is untouched"
    );
    assert!(
        p.log_text().contains("recycled queue file was replaced"),
        "{}",
        p.log_text()
    );
}

/// A daemon whose deliveries fail (its file route's directory is blocked by a file) until
/// `unblock`, so messages stay queued.
fn blocked_postern() -> Postern {
    let cfg = basic_config("", "").replace(r#"dir = "delivered""#, r#"dir = "blocked/delivered""#);
    let p = Postern::start(&cfg);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    p
}

fn unblock(p: &Postern) {
    std::fs::remove_file(p.path("blocked")).unwrap();
}

/// Queue a message and wait until it waits in deferred/ (its delivery failed).
fn deferred_message(p: &Postern) -> String {
    let id = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: forged\r\n\r\nforged",
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !p.path("spool/deferred").join(&id).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    id
}

/// Take a queued message's file out of the spool (so a test can plant it back in forms
/// postern did not write). Returns (id, path of the file outside the spool).
fn held_queue_file(p: &Postern) -> (String, PathBuf) {
    let id = deferred_message(p);
    // Held (the retry may have it in active/ for a moment), so the forwarder lets go of it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, out, err) = p.cli(&["queue", "hold", &id]);
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{out}{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let outside = p.path(&format!("outside-{id}"));
    std::fs::rename(p.path("spool/hold").join(&id), &outside).unwrap();
    (id, outside)
}

/// Deliveries work (a control message arrives) yet `forged` was not delivered.
fn only_control_message_delivered(p: &Postern, forged: &str) {
    let control = queued_id(&send_mail(
        p.addr(),
        "a@example.com",
        &["b@example.org"],
        b"Subject: control\r\n\r\ncontrol",
    ));
    let dir = p.path("blocked/delivered");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !delivered_ids(&dir).contains(&control) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ids = delivered_ids(&dir);
    assert!(ids.contains(&control), "deliveries work: {ids:?}");
    assert!(!ids.iter().any(|i| i == forged), "{forged} was delivered");
}

/// Stop the daemon, let `plant` put something into its spool, start it again.
fn restart_after(p: &mut Postern, plant: impl FnOnce()) {
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(20));
    plant();
    p.spawn();
}

/// Assert that a warning says `path` (`what`, e.g. its owner) was moved to corrupt/.
#[track_caller]
fn assert_set_aside(p: &Postern, path: &Path, what: &str) {
    let needles = ["moved to corrupt/", &path.display().to_string(), what];
    assert!(wait_log_all(p, &needles), "{what}: {}", p.log_text());
}

/// Wait for a log line containing all of `needles`.
fn wait_log_all(p: &Postern, needles: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if p.log_text()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A symlink (to a well-formed queue file) and a FIFO dropped into incoming/ of a running
/// daemon are never delivered: moved to corrupt/ with a warning naming them and their owner.
/// At start-up, recovery does the same.
#[test]
fn symlinks_and_fifos_in_the_queue_are_never_delivered() {
    let mut p = blocked_postern();
    let (id, outside) = held_queue_file(&p);
    unblock(&p);
    let original = std::fs::read(&outside).unwrap();
    let link = p.path("spool/incoming").join(&id);
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo_id = "0000000000000F1F";
    let fifo = p.path("spool/incoming").join(fifo_id);
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    // Wake the forwarder the way an admin's queue command does.
    let (code, _, _) = p.cli(&["queue", "retry", "--all"]);
    assert_eq!(code, 0);
    for (path, what) in [(&link, "a symbolic link"), (&fifo, "a FIFO")] {
        assert_set_aside(&p, path, what);
    }
    assert!(p.log_text().contains("owner="), "{}", p.log_text());
    assert!(p.path("spool/corrupt").join(&id).symlink_metadata().is_ok());
    assert!(
        p.path("spool/corrupt")
            .join(fifo_id)
            .symlink_metadata()
            .is_ok()
    );
    only_control_message_delivered(&p, &id);
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        original,
        "target untouched"
    );

    // The same, found at start-up.
    let link2 = p.path("spool/deferred").join(&id);
    restart_after(&mut p, || {
        std::os::unix::fs::symlink(&outside, &link2).unwrap();
    });
    assert_set_aside(&p, &link2, "a symbolic link");
    only_control_message_delivered(&p, &id);
}

/// A well-formed queue file owned by another user (anyone could otherwise send forged mail by
/// dropping one in) is moved to corrupt/ with a warning naming its owner, never delivered.
/// Needs root to chown; CI runs as root.
#[test]
fn queue_files_of_another_user_are_never_delivered() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give a file to another user (CI runs as root)");
        return;
    }
    let mut p = blocked_postern();
    let (id, outside) = held_queue_file(&p);
    unblock(&p);
    let planted = p.path("spool/incoming").join(&id);
    std::fs::rename(&outside, &planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
    let (code, _, _) = p.cli(&["queue", "retry", "--all"]);
    assert_eq!(code, 0);
    assert_set_aside(&p, &planted, "nobody (uid 65534)");
    let moved = p.path("spool/corrupt").join(&id);
    assert_eq!(std::fs::metadata(&moved).unwrap().uid(), 65534);
    // At start-up too.
    let planted = p.path("spool/deferred").join(&id);
    restart_after(&mut p, || std::fs::rename(&moved, &planted).unwrap());
    assert_set_aside(&p, &planted, "nobody (uid 65534)");
    only_control_message_delivered(&p, &id);
}

/// Under umask 000 the lock file and the control socket (in spool_dir, where the docs now say
/// it is) are 0600, directories 0700 and queue files 0600.
#[test]
fn lock_file_and_control_socket_are_private_under_umask_000() {
    let cfg = basic_config("", "").replace(r#"dir = "delivered""#, r#"dir = "blocked/delivered""#);
    let p = Postern::start_with_umask(&cfg, 0o000);
    std::fs::write(p.path("blocked"), b"x").unwrap();
    let id = deferred_message(&p);
    let sock = p.path("spool/control.sock");
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_socket_like(),
        "control socket at {}",
        sock.display()
    );
    assert_eq!(mode(&sock), 0o600, "control socket");
    assert_eq!(mode(&p.path("spool/lock")), 0o600, "lock file");
    for d in [
        "spool",
        "spool/incoming",
        "spool/deferred",
        "spool/journal",
        "spool/free",
    ] {
        assert_eq!(mode(&p.path(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&p.path("spool/journal/0000")), 0o600);
    assert_eq!(mode(&p.path("spool/deferred").join(&id)), 0o600);
}

trait SocketLike {
    fn is_socket_like(&self) -> bool;
}
impl SocketLike for std::fs::FileType {
    fn is_socket_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_socket(self)
    }
}

/// `queue list`/`show` create nothing: not a missing spool, not a missing state directory,
/// and run as another user they fail clearly without leaving anything behind.
#[test]
fn queue_commands_create_no_directories() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_in(dir.path(), &basic_config("", ""));
    let spool = dir.path().join("spool");
    let (code, _, err) = run_until_exit(&cfg, &["queue", "list"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!spool.exists(), "queue list created the spool");

    let mut p = blocked_postern();
    let id = deferred_message(&p);
    p.signal("TERM");
    p.wait_exit(Duration::from_secs(20));
    for d in ["corrupt", "free", "failed", "hold"] {
        std::fs::remove_dir(p.path("spool").join(d)).unwrap();
    }
    let (code, out, err) = p.cli(&["queue", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = p.cli(&["queue", "show", &id]);
    assert_eq!(code, 0, "{out}{err}");
    for d in ["corrupt", "free", "failed", "hold"] {
        assert!(
            !p.path("spool").join(d).exists(),
            "{d} created by a queue command"
        );
    }

    // As another user (root's admin running `queue list` as themselves, say).
    if !is_root() {
        eprintln!("SKIPPED (part): running as another user needs root (CI runs as root)");
        return;
    }
    let Some(tool) = ["setpriv", "runuser"].into_iter().find(|t| have(t)) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs setpriv or runuser"
        );
        eprintln!("SKIPPED (part): neither setpriv nor runuser is installed");
        return;
    };
    chmod(p.dir.path(), 0o755);
    chmod(&p.config_path, 0o644);
    let before = std::fs::read_dir(p.path("spool")).unwrap().count();
    let mut cmd = Command::new(tool);
    if tool == "setpriv" {
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    } else {
        cmd.args(["-u", "nobody", "--"]);
    }
    let out = cmd
        .arg(bin())
        .arg("--config")
        .arg(&p.config_path)
        .args(["queue", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && err.contains("exec") {
        eprintln!("SKIPPED (part): nobody cannot execute the test binary here: {err}");
        return;
    }
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot read the spool directory")
            && err.contains("run queue commands as root"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(p.path("spool")).unwrap().count(), before);
}

/// A control socket path longer than a Unix socket name stops the daemon at start-up with the
/// path and its length, instead of a warning and queue commands that silently never reach it.
#[test]
fn a_control_socket_path_too_long_fails_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("d".repeat(110));
    std::fs::create_dir(&long).unwrap();
    let cfg = config_in(&long, &basic_config("", ""));
    let sock = long.join("spool/control.sock");
    let (code, out, err) = run_until_exit(&cfg, &["serve"]);
    assert!(matches!(code, Some(c) if c != 0), "{code:?} {out} {err}");
    assert!(!out.contains("postern: ready"), "{out}");
    assert!(
        err.contains(&format!(
            "control socket path {} is {} bytes long",
            sock.display(),
            sock.as_os_str().len()
        )) && err.contains("choose a shorter spool_dir"),
        "{err}"
    );
    let (code, out, _) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("control socket path"), "{out}");
}

/// `check` refuses a world-readable client secret file (exit 78, so systemd's ExecStartPre
/// stops the start) and names the file and the chmod; a private one passes.
#[test]
fn check_refuses_a_world_readable_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, b"s3cret\n").unwrap();
    chmod(&secret, 0o644);
    let cfg = config_in(
        dir.path(),
        &basic_config(
            "",
            "[account.a]\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"0f8fad5b-d9cb-469f-a165-70867728950e\"\nauth = \"client_secret\"\nclient_secret_file = \"client-secret\"\n",
        ),
    );
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(
        out.contains(&format!(
            "error: {}: account.a: client secret file: readable by every user (mode 0644)",
            secret.display()
        )),
        "{out}"
    );
    assert!(
        err.contains(&format!("chmod o-rwx {}", secret.display())),
        "{err}"
    );
    chmod(&secret, 0o600);
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// The admin token is a secret like the client secret: `check` refuses it world-readable, in
/// its own file or inline in a world-readable configuration. Before, it was not checked at
/// all (anyone on the machine could read the token and with it the status page).
#[test]
fn check_refuses_a_world_readable_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, b"0123456789abcdef\n").unwrap();
    chmod(&token, 0o644);
    let cfg = config_in(
        dir.path(),
        &basic_config(
            "",
            "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"admin-token\"\n",
        ),
    );
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(
        out.contains(&format!(
            "error: {}: admin: token file: readable by every user (mode 0644)",
            token.display()
        )),
        "{out}"
    );
    chmod(&token, 0o600);
    let (code, out, err) = run_until_exit(&cfg, &["check"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Inline, in a configuration file every user can read.
    let inline = config_in(
        dir.path(),
        &basic_config(
            "",
            "[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"0123456789abcdef\"\n",
        ),
    );
    chmod(&inline, 0o644);
    let (code, out, err) = run_until_exit(&inline, &["check"]);
    assert_eq!(code, Some(78), "{out}{err}");
    assert!(
        out.contains("it holds a client secret or the admin token"),
        "{out}"
    );
}

/// The control socket checks who is asking (SO_PEERCRED): even with its mode and the spool's
/// loosened by a careless admin, a user other than root or postern's own cannot make the
/// daemon log forged queue events ("held ID" by the administrator) or rescan; `ping` (health)
/// still answers. Before, anyone who could reach the socket got "ok" and the forged line.
#[test]
fn the_control_socket_refuses_commands_from_other_users() {
    if !is_root() {
        eprintln!("SKIPPED: needs root, to connect as another user");
        return;
    }
    let p = Postern::start(&basic_config("", ""));
    let sock = p.path("spool/control.sock");
    // What a careless admin could do: every directory on the way passable, the socket open.
    chmod(p.dir.path(), 0o711);
    chmod(&p.path("spool"), 0o711);
    chmod(&sock, 0o666);
    let ask = |line: &'static str| {
        let sock = sock.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            // setresuid(2) as a raw system call changes this thread's credentials only (the
            // C library's wrapper would change every thread's).
            // SAFETY: plain system call on this thread's own credentials.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(r, 0, "setresuid");
            let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
            s.write_all(format!("{line}\n").as_bytes()).unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
        })
        .join()
        .unwrap()
    };
    let forged = "held 0DEADBEEF0000001";
    assert_eq!(ask(forged).trim(), "denied");
    assert_eq!(ask("ping").trim(), "pong");
    assert!(
        p.wait_log(
            "request from a user other than root",
            Duration::from_secs(10)
        ),
        "{}",
        p.log_text()
    );
    assert!(
        !p.log_text().contains("0DEADBEEF0000001"),
        "{}",
        p.log_text()
    );
}

/// Run as root (by hand, or in a container without USER), postern says that it should not be:
/// all its parsing of untrusted input would run with every privilege.
#[test]
fn serve_as_root_warns() {
    if !is_root() {
        eprintln!("SKIPPED: not root");
        return;
    }
    let p = Postern::start(&basic_config("", ""));
    assert!(p.log_text().contains("running as root"), "{}", p.log_text());
}
