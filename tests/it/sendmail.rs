//! `postern sendmail` and the binary run as `sendmail`: the option matrix of PHP, cron, mailx
//! and unattended-upgrades, with Debian's php-cli `mail()` and bsd-mailx driving it for real.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::*;

/// A daemon plus a directory with `sendmail` and `mailq` links to the binary.
struct Setup {
    p: Postern,
    links: tempfile::TempDir,
}

impl Setup {
    fn new(extra_listener_keys: &str) -> Setup {
        let p = Postern::start(&basic_config(extra_listener_keys, ""));
        let links = tempfile::tempdir().unwrap();
        for name in ["sendmail", "mailq"] {
            std::os::unix::fs::symlink(bin(), links.path().join(name)).unwrap();
        }
        Setup { p, links }
    }

    fn sendmail_path(&self) -> PathBuf {
        self.links.path().join("sendmail")
    }

    /// Environment for a client: where the daemon is, and its config (for the host name).
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("POSTERN_SERVER".into(), self.p.addr().to_string()),
            (
                "POSTERN_CONFIG".into(),
                self.p.config_path.display().to_string(),
            ),
        ]
    }

    /// Run the `sendmail` link with `args`, `input` on stdin.
    fn sendmail(&self, args: &[&str], input: &str) -> Output {
        run_with_input(
            Command::new(self.sendmail_path())
                .args(args)
                .envs(self.env()),
            input,
        )
    }

    /// The newest delivered message: (.eml text, envelope JSON).
    fn delivered(&self, n: usize) -> Vec<(String, serde_json::Value)> {
        let ids = self.p.wait_delivered(n, Duration::from_secs(10));
        assert_eq!(ids.len(), n, "log:\n{}", self.p.log_text());
        ids.iter()
            .map(|id| {
                let dir = self.p.path("delivered");
                let eml = std::fs::read_to_string(dir.join(format!("{id}.eml"))).unwrap();
                let json = std::fs::read_to_string(dir.join(format!("{id}.json"))).unwrap();
                (eml, serde_json::from_str(&json).unwrap())
            })
            .collect()
    }
}

fn run_with_input(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn recipients(env: &serde_json::Value) -> Vec<String> {
    let mut r: Vec<String> = env["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    r.sort();
    r
}

#[test]
fn php_style_t_i_takes_recipients_from_the_header_and_drops_bcc() {
    let s = Setup::new("");
    let o = s.sendmail(
        &["-t", "-i", "-f", "wp@example.com"],
        "To: Ann <ann@example.org>, bob@example.org\nCc: \"Doe, Carl\" <carl@example.org>\nBcc: secret@example.org\nSubject: order 42\n\nline one\n.\nline after a dot\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (eml, env) = s.delivered(1).remove(0);
    assert_eq!(env["sender"], "wp@example.com");
    assert_eq!(
        recipients(&env),
        [
            "ann@example.org",
            "bob@example.org",
            "carl@example.org",
            "secret@example.org"
        ]
    );
    assert!(!eml.contains("secret@example.org"), "Bcc left in:\n{eml}");
    // -i: the lone dot is text; missing From:, Date:, Message-ID: were added
    assert!(eml.contains("\r\n.\r\nline after a dot\r\n"), "{eml}");
    assert!(eml.contains("\r\nFrom: wp@example.com\r\n"), "{eml}");
    assert!(
        eml.contains("\r\nDate: ") && eml.contains("\r\nMessage-ID: <"),
        "{eml}"
    );
}

#[test]
fn cron_command_line_qualifies_bare_names_and_names_the_sender() {
    let s = Setup::new("");
    // Debian cron: sendmail -FCronDaemon -i -B8BITMIME -oem root
    let o = s.sendmail(
        &["-FCron Daemon", "-i", "-B8BITMIME", "-oem", "root"],
        "Subject: Cron <root@host> run-parts /etc/cron.daily\nContent-Type: text/plain; charset=UTF-8\n\nNo errors.\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (eml, env) = s.delivered(1).remove(0);
    // No -f and no From: header: the invoking user at the configured host name.
    let login = env["sender"].as_str().unwrap().to_string();
    assert!(login.ends_with("@relay.test"), "{env}");
    assert_eq!(recipients(&env), ["root@relay.test"]);
    assert!(
        eml.contains(&format!("\r\nFrom: Cron Daemon <{login}>\r\n")),
        "{eml}"
    );
}

#[test]
fn a_lone_dot_ends_the_message_without_i_and_arguments_are_recipients() {
    let s = Setup::new("");
    let o = s.sendmail(
        &["-f", "<ops@example.com>", "--", "a@example.org", "b@example.org, c@example.org"],
        "From: Ops <ops@example.com>\nSubject: dots\n\nkept\n..stuffed by the user\n.\nnot part of the message\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (eml, env) = s.delivered(1).remove(0);
    assert_eq!(
        recipients(&env),
        ["a@example.org", "b@example.org", "c@example.org"]
    );
    assert!(
        eml.contains("\r\nkept\r\n..stuffed by the user\r\n"),
        "{eml}"
    );
    assert!(!eml.contains("not part"), "{eml}");
    // The program's own From: is kept, not doubled.
    assert_eq!(eml.matches("From: ").count(), 1, "{eml}");
}

#[test]
fn sender_defaults_to_the_from_header_and_oi_t_as_unattended_upgrades() {
    let s = Setup::new("");
    let o = s.sendmail(
        &["-oi", "-t"],
        "From: root (unattended-upgrades)\nTo: admin@example.org\nSubject: upgrades\n\n.\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (_, env) = s.delivered(1).remove(0);
    assert_eq!(env["sender"], "root@relay.test");
}

#[test]
fn postern_sendmail_subcommand_and_bs_smtp_on_stdin() {
    let s = Setup::new("");
    let o = run_with_input(
        Command::new(bin())
            .args(["sendmail", "-i", "x@example.org"])
            .envs(s.env()),
        "Subject: via subcommand\n\nhello\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = s.sendmail(
        &["-bs"],
        "EHLO client\r\nMAIL FROM:<bs@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nSubject: bs\r\n\r\nover -bs\r\n.\r\nQUIT\r\n",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out.starts_with("220 ") && out.contains("250 2.0.0 Ok: queued as "),
        "{out}"
    );
    assert!(out.contains("221 "), "{out}");
    let all = s.delivered(2);
    assert!(all.iter().any(|(eml, _)| eml.contains("over -bs")));
}

#[test]
fn sendmail_finds_the_listener_in_the_configuration() {
    // A fixed port for this test only (sendmail cannot learn a port 0 listener's port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = basic_config("", "").replace("127.0.0.1:0", &format!("0.0.0.0:{port}"));
    let p = Postern::start(&cfg);
    let o = run_with_input(
        Command::new(bin())
            .args(["--config"])
            .arg(&p.config_path)
            .args(["sendmail", "-t"])
            .env_remove("POSTERN_SERVER"),
        "To: z@example.org\nFrom: cfg@example.com\n\nfound it\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(p.wait_delivered(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn exit_75_when_the_daemon_is_down_or_answers_4xx_and_nothing_is_queued() {
    let mut s = Setup::new("max_recipients = 1");
    // Two recipients, the second gets 452: all or nothing, so nothing is queued and the
    // caller is told to try again.
    let o = s.sendmail(
        &["-i", "a@example.org", "b@example.org"],
        "Subject: x\n\ny\n",
    );
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("recipient <b@example.org>") && err.contains("452"),
        "{err}"
    );
    let (code, list, _) = s.p.cli(&["queue", "list"]);
    assert_eq!(code, 0);
    assert!(list.contains("empty"), "{list}");
    // Daemon stopped: 75 and a message that says so.
    s.p.kill9();
    let o = s.sendmail(&["-i", "a@example.org"], "Subject: x\n\ny\n");
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot connect to postern") && err.contains("not queued"),
        "{err}"
    );
}

#[test]
fn refusals_and_usage_errors_have_their_exit_codes() {
    let s = Setup::new("");
    let usage = s.sendmail(&["-k"], "");
    assert_eq!(usage.status.code(), Some(64), "{}", text(&usage));
    let none = s.sendmail(&["-i"], "Subject: x\n\ny\n");
    assert_eq!(none.status.code(), Some(64), "{}", text(&none));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no recipients"));
    let t_none = s.sendmail(&["-t"], "Subject: x\n\ny\n");
    assert_eq!(t_none.status.code(), Some(65), "{}", text(&t_none));
    // A sender no route accepts: refused for good (EX_NOPERM).
    let cfg = basic_config("", "").replace(r#"senders = ["*"]"#, r#"senders = ["*@example.com"]"#);
    let p = Postern::start(&cfg);
    let o = run_with_input(
        Command::new(s.sendmail_path())
            .args(["-f", "stranger@elsewhere.org", "a@example.org"])
            .env("POSTERN_SERVER", p.addr().to_string())
            .env("POSTERN_CONFIG", &p.config_path),
        "Subject: x\n\ny\n",
    );
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the sender <stranger@elsewhere.org>"));
}

#[test]
fn bp_and_mailq_list_the_queue_and_bi_is_harmless() {
    let s = Setup::new("");
    let o = s.sendmail(&["-bp"], "");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Mail queue is empty"));
    let o = run_with_input(Command::new(s.links.path().join("mailq")).envs(s.env()), "");
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Mail queue is empty"));
    assert!(s.sendmail(&["-bi"], "").status.success());
}

/// php -d sendmail_path=... : Debian's php-cli calling mail() exactly as WordPress does.
fn php_mail(sendmail: &Path, env: &[(String, String)], from: &str) -> Output {
    let script = format!(
        r#"$ok = mail("ann@example.org", "PHP subject", "Hello from PHP\n.\nafter a dot", ["From" => "{from}", "X-Mailer" => "PHP/" . phpversion()]);
exit($ok ? 0 : 3);"#
    );
    Command::new("php")
        .arg("-d")
        .arg(format!("sendmail_path={} -t -i", sendmail.display()))
        .args(["-r", &script])
        .envs(env.iter().cloned())
        .output()
        .unwrap()
}

#[test]
fn php_mail_function_through_the_sendmail_link() {
    if !require("php") {
        return;
    }
    let mut s = Setup::new("");
    let o = php_mail(
        &s.sendmail_path(),
        &s.env(),
        "WordPress <wordpress@example.com>",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (eml, env) = s.delivered(1).remove(0);
    assert_eq!(env["sender"], "wordpress@example.com");
    assert_eq!(recipients(&env), ["ann@example.org"]);
    assert!(eml.contains("Subject: PHP subject\r\n"), "{eml}");
    assert!(eml.contains("\r\n.\r\nafter a dot"), "{eml}");
    // With the daemon down, mail() returns false (sendmail exited 75).
    s.p.kill9();
    let o = php_mail(&s.sendmail_path(), &s.env(), "wordpress@example.com");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn bsd_mailx_through_the_sendmail_link() {
    if !require("bsd-mailx") {
        return;
    }
    let s = Setup::new("");
    let rc = s.links.path().join("mailrc");
    std::fs::write(
        &rc,
        format!("set sendmail={}\n", s.sendmail_path().display()),
    )
    .unwrap();
    let o = run_with_input(
        Command::new("bsd-mailx")
            .args(["-n", "-s", "disk almost full", "-r", "cron@example.com"])
            .args(["-c", "cc@example.org", "ops@example.org"])
            .env("MAILRC", &rc)
            .envs(s.env()),
        "/var is 91% full\n",
    );
    assert!(o.status.success(), "{}", text(&o));
    let (eml, env) = s.delivered(1).remove(0);
    assert_eq!(env["sender"], "cron@example.com");
    assert_eq!(recipients(&env), ["cc@example.org", "ops@example.org"]);
    assert!(eml.contains("Subject: disk almost full\r\n"), "{eml}");
    assert!(eml.contains("/var is 91% full"), "{eml}");
}
