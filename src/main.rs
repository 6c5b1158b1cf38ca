//! CLI edge: parse arguments, load the configuration, set up logging, map errors to exit codes.

use std::ffi::OsString;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser};
use postern::cli::{Api, Cli, Command, ConfigArg, LogArgs, LogFormat, QueueArgs, QueueCommand};
use postern::config::{self, Config, ConfigErrors};
use postern::spool::{Spool, SpoolError};
use postern::{admin, control, daemon, maillog, sendmail};

/// Default configuration file.
const DEFAULT_CONFIG: &str = "/etc/postern/postern.toml";

// Exit codes from sysexits.h, as Postfix and sendmail use them.
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_SOFTWARE: u8 = 70;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // Invoked through a `sendmail` (or `mailq`) link, as PHP, cron and mailx do: sendmail's
    // own command line, not ours.
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match argv0.as_str() {
        "sendmail" => return ExitCode::from(sendmail_main(args.split_off(1), None)),
        "mailq" => {
            return ExitCode::from(sendmail_main(vec![OsString::from("-bp")], None));
        }
        _ => {}
    }
    let cli = Cli::parse();
    let json = init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let text = error_text(&e);
            if json {
                tracing::error!("{text}");
            } else {
                eprintln!("postern: {text}");
            }
            let untrusted = matches!(
                e.downcast_ref::<daemon::DaemonError>(),
                Some(daemon::DaemonError::Untrusted(_))
            );
            if e.downcast_ref::<ConfigErrors>().is_some() || untrusted {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::from(EX_SOFTWARE)
            }
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text the message already
/// carries (so "Address already in use (os error 98)" is not said twice).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// A subcommand's `--config`, else the one before the subcommand (or `$POSTERN_CONFIG`).
fn config_path(sub: &ConfigArg, top: &Option<PathBuf>) -> Option<PathBuf> {
    sub.config.clone().or_else(|| top.clone())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("postern {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::HashPassword => hash_password(),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "postern",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpages { dir } => {
            write_man_pages(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sendmail(a) => Ok(ExitCode::from(sendmail_main(a.args, cli.config))),
        Command::Health { config } => {
            let cfg = ConfigSource::resolve(config_path(&config, &cli.config).as_deref())
                .load_for_client()?;
            match postern::health::check(&cfg) {
                Ok(line) => {
                    println!("postern: healthy: {line}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(why) => {
                    eprintln!("postern: unhealthy: {why}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Check { config } => {
            let source = ConfigSource::resolve(config_path(&config, &cli.config).as_deref());
            let cfg = source.load()?;
            if let Some(w) = source.ignored_warning() {
                println!("warning: {w}");
            }
            println!("{}: configuration OK", cfg.source);
            print!("{}", cfg.describe());
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            // Client-secret expiry is in Config::warnings; certificates need their file read.
            let certs: Vec<_> = cfg
                .accounts
                .iter()
                .filter(|a| matches!(a.credential, config::Credential::Certificate { .. }))
                .cloned()
                .collect();
            let horizon = postern::token::StoreOptions::default().expiry_warning;
            for w in postern::token::store::expiry_warnings(&certs, horizon) {
                println!("warning: {w}");
            }
            Ok(check_files(&cfg))
        }
        Command::Serve { config, .. } => {
            tune_allocator();
            let source = ConfigSource::resolve(config_path(&config, &cli.config).as_deref());
            let cfg = source.load()?;
            match &source {
                ConfigSource::Default => {
                    tracing::info!(
                        "no config file at {DEFAULT_CONFIG} and none given: using the embedded default (see `postern check`)"
                    );
                    remember_default_dir();
                }
                ConfigSource::Env(vars) => tracing::info!(
                    "configured by environment variables ({}); see `postern check`",
                    vars.join(", ")
                ),
                _ => {}
            }
            if let Some(w) = source.ignored_warning() {
                tracing::warn!("{w}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let reload = move || source.load();
            let result = rt.block_on(daemon::run(cfg, Box::new(reload)));
            // Everything that matters is done (the spool is checkpointed). Do not wait for a
            // blocking task still running, such as a DNS lookup of the token endpoint that the
            // resolver cannot cancel: it would delay the exit by seconds past "stopped".
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Login(a) => {
            let cfg =
                ConfigSource::resolve(config_path(&a.config, &cli.config).as_deref()).load()?;
            let code = runtime()?.block_on(postern::token::login::run(
                &cfg,
                &a.account,
                &a.mailbox,
                audience(a.api),
                a.browser,
                a.shared,
            ));
            Ok(ExitCode::from(code))
        }
        Command::Token(a) => {
            let cfg =
                ConfigSource::resolve(config_path(&a.config, &cli.config).as_deref()).load()?;
            let code = runtime()?.block_on(postern::token::inspect::run(
                &cfg,
                &a.account,
                a.mailbox.as_deref(),
                audience(a.api),
                a.show_token,
            ));
            Ok(ExitCode::from(code))
        }
        Command::Explain(a) => {
            if a.list {
                print!("{}", postern::diagnosis::list());
                return Ok(ExitCode::SUCCESS);
            }
            let input = if a.text.is_empty() {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the error from standard input")?;
                s
            } else {
                a.text.join(" ")
            };
            // The configuration only adds detail (queue ids, the account's names): explain
            // works without one, e.g. on a laptop.
            let cfg = ConfigSource::resolve(config_path(&a.config, &cli.config).as_deref())
                .load_for_client()
                .ok();
            let (text, known) = postern::explain::run(&input, cfg.as_ref());
            print!("{text}");
            Ok(if known {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Test(a) => {
            let cfg = ConfigSource::resolve(config_path(&a.config, &cli.config).as_deref())
                .load_for_client()?;
            let code = runtime()?.block_on(postern::trial::run(
                &cfg,
                &postern::trial::Trial {
                    from: a.from,
                    to: a.to,
                    route: a.route,
                    dry_run: a.dry_run,
                },
            ));
            Ok(ExitCode::from(code))
        }
        Command::Doctor(a) => {
            let source = ConfigSource::resolve(config_path(&a.config, &cli.config).as_deref());
            let name = match &source {
                ConfigSource::File(p) => p.display().to_string(),
                ConfigSource::FileIgnoringEnv(_) => DEFAULT_CONFIG.to_string(),
                ConfigSource::Env(_) => "the POSTERN_* environment variables".to_string(),
                ConfigSource::Default => config::EMBEDDED_SOURCE.to_string(),
            };
            let report = runtime()?.block_on(postern::doctor::run(
                source.load_for_client(),
                &name,
                a.offline,
            ));
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("encoding the report")?
                );
            } else {
                print!("{}", report.text());
            }
            Ok(if report.failed() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Queue(QueueArgs { config, command }) => {
            let cfg = ConfigSource::resolve(config.or(cli.config).as_deref()).load_for_client()?;
            queue(&cfg, command)
        }
    }
}

/// `postern sendmail ARGS` or the binary run as `sendmail`: returns the exit status.
fn sendmail_main(args: Vec<OsString>, config: Option<PathBuf>) -> u8 {
    let opts = match sendmail::parse_args(&args) {
        Ok(o) => o,
        Err(code) => return code,
    };
    // Run as `sendmail`, clap did not read $POSTERN_CONFIG: do it here.
    let given = opts
        .config
        .as_ref()
        .map(PathBuf::from)
        .or(config)
        .or_else(|| std::env::var_os("POSTERN_CONFIG").map(PathBuf::from));
    let source = ConfigSource::resolve(given.as_deref());
    if opts.mode == sendmail::Mode::ListQueue {
        return match source
            .load_for_client()
            .map_err(anyhow::Error::from)
            .and_then(|cfg| queue(&cfg, QueueCommand::List { json: false }))
        {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("postern: {}", error_text(&e));
                EX_SOFTWARE
            }
        };
    }
    // With $POSTERN_SERVER the configuration only lends its host name, so a client in another
    // container (or a user who may not read it) needs none.
    let cfg = if std::env::var_os(sendmail::SERVER_ENV).is_some() {
        source.load_for_client().ok()
    } else {
        match source.load_for_client() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("postern sendmail: {e}");
                return EX_CONFIG;
            }
        }
    };
    let target = match sendmail::Target::resolve(cfg.as_ref()) {
        Ok(t) => t,
        Err(msg) => {
            eprintln!("postern sendmail: {msg}");
            return EX_CONFIG;
        }
    };
    sendmail::run(
        &opts,
        &target,
        std::io::BufReader::new(std::io::stdin()),
        std::io::stdout(),
    )
}

/// Man pages for postern and each subcommand (`postern-queue-list.8`...), section 8.
fn write_man_pages(dir: &Path) -> Result<()> {
    fn write(cmd: clap::Command, name: &str, dir: &Path) -> Result<()> {
        let cmd = cmd.name(name.to_string());
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .manual("postern")
            .render(&mut out)
            .context("rendering a man page")?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() != "help" {
                write(sub.clone(), &format!("{name}-{}", sub.get_name()), dir)?;
            }
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write(cmd, "postern", dir)
}

/// Where `serve` on the embedded default notes the directory it runs in, so that queue
/// commands, `health` and `sendmail` find its spool from any directory.
fn default_dir_note() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })?;
    Some(base.join("postern/embedded-default-dir"))
}

fn remember_default_dir() {
    let (Some(note), Ok(cwd)) = (default_dir_note(), std::env::current_dir()) else {
        return;
    };
    let saved = note
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&note, cwd.as_os_str().as_encoded_bytes()));
    if let Err(e) = saved {
        tracing::debug!(note = %note.display(), error = %e, "cannot note the embedded default's directory");
    }
}

/// `check`: who may touch the spool, state and secret files (exit 78 on a refusal).
fn check_files(cfg: &Config) -> ExitCode {
    let report = postern::trust::check(cfg);
    println!("files checked for {}, {}", report.user, report.basis);
    for f in &report.findings {
        match f.severity {
            postern::trust::Severity::Warning => println!("warning: {f}"),
            postern::trust::Severity::Refusal => println!("error: {f}"),
        }
    }
    if !report.refused() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "postern: {}: files and directories are not safe to use; fix with (as root):",
        cfg.source
    );
    for c in postern::trust::fix_commands(&report.findings) {
        eprintln!("  {c}");
    }
    ExitCode::from(EX_CONFIG)
}

/// A small runtime for one-shot commands that talk to Entra.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn audience(api: Api) -> postern::token::Audience {
    match api {
        Api::Smtp => postern::token::Audience::Smtp,
        Api::Graph => postern::token::Audience::Graph,
    }
}

/// Where the configuration comes from.
enum ConfigSource {
    File(PathBuf),
    /// `POSTERN_*` variables (the Docker sidecar), with the ones that are set.
    Env(Vec<&'static str>),
    /// The default file, and `POSTERN_*` variables that it makes ignored (a file, when there
    /// is one, is the configuration; `serve` and `check` say which variables are ignored).
    FileIgnoringEnv(Vec<&'static str>),
    Default,
}

impl ConfigSource {
    fn resolve(given: Option<&Path>) -> Self {
        let vars = config::env::present();
        match given {
            Some(p) => Self::File(p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG).exists() && !vars.is_empty() => {
                Self::FileIgnoringEnv(vars)
            }
            None if Path::new(DEFAULT_CONFIG).exists() => Self::File(DEFAULT_CONFIG.into()),
            None if !vars.is_empty() => Self::Env(vars),
            None => Self::Default,
        }
    }

    fn load(&self) -> Result<Config, ConfigErrors> {
        match self {
            Self::File(p) => config::load_file(p),
            Self::Env(_) => config::env::load_env(),
            Self::FileIgnoringEnv(_) => config::load_file(Path::new(DEFAULT_CONFIG)),
            Self::Default => config::load_default(),
        }
    }

    /// The warning for variables a configuration file makes ignored.
    fn ignored_warning(&self) -> Option<String> {
        match self {
            Self::FileIgnoringEnv(vars) => Some(format!(
                "{DEFAULT_CONFIG} exists, so it is the configuration and these environment \
                 variables are ignored: {}",
                vars.join(", ")
            )),
            _ => None,
        }
    }

    /// For commands that need a running daemon's spool: like [`load`](Self::load), but the
    /// embedded default's relative spool is found from any directory, through the note its
    /// daemon left.
    fn load_for_client(&self) -> Result<Config, ConfigErrors> {
        let cfg = self.load()?;
        if !matches!(self, Self::Default) || cfg.spool_dir.is_dir() {
            return Ok(cfg);
        }
        let noted = default_dir_note()
            .and_then(|n| std::fs::read(n).ok())
            .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
        match noted.map(|dir| config::load_default_in(&dir)) {
            Some(Ok(c)) if c.spool_dir.is_dir() => Ok(c),
            _ => Ok(cfg),
        }
    }
}

fn queue(cfg: &Config, cmd: QueueCommand) -> Result<ExitCode> {
    match std::fs::read_dir(&cfg.spool_dir) {
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && cfg.source == config::EMBEDDED_SOURCE =>
        {
            bail!(
                "spool directory {} does not exist: the embedded default keeps its spool in \
             ./postern-data of the directory `postern serve` runs in, and no daemon on it has \
             run as this user yet; start one, or pass --config",
                cfg.spool_dir.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "spool directory {} does not exist (has postern ever run with this configuration?)",
            cfg.spool_dir.display()
        ),
        Err(e) => bail!(
            "cannot read the spool directory {}: {e}; run queue commands as root or as the user postern runs as (the owner of {})",
            cfg.spool_dir.display(),
            cfg.spool_dir.display()
        ),
    }
    let spool = Spool::open_shared(&cfg.spool_dir)?;
    let changed = |what: &str| {
        if !control::notify(&cfg.spool_dir) {
            eprintln!(
                "postern: {what}; no daemon is running on {}, so it takes effect at the next start",
                cfg.spool_dir.display()
            );
        }
    };
    // The daemon logs what the admin did (its log is where admins look); with no daemon
    // running, the event is logged here instead.
    let event = |verb: &str, id: &str, log_here: &dyn Fn()| {
        if !control::notify_event(&cfg.spool_dir, verb, id) {
            log_here();
            eprintln!(
                "postern: no daemon is running on {}, so it takes effect at the next start",
                cfg.spool_dir.display()
            );
        }
    };
    let result = match cmd {
        QueueCommand::List { json } => {
            let items = spool.list()?;
            // Why mail waits without having failed (pacing, throttles): the daemon's record.
            let saved = postern::forward::state::load(&cfg.state_dir).unwrap_or_default();
            let notes = admin::waiting_notes(&items, &saved, postern::forward::pacing::now_ms());
            if json {
                println!("{}", admin::list_json(&items, &notes));
            } else {
                print!("{}", admin::list_table(&items, &notes));
            }
            return Ok(ExitCode::SUCCESS);
        }
        QueueCommand::Show { id } => spool
            .find(&id)
            .ok_or(SpoolError::NotFound(id.clone()))
            .and_then(|s| {
                let env = spool.read_envelope(s, &id)?;
                print!("{}", admin::show(s, &env));
                Ok(())
            }),
        QueueCommand::Retry(t) => {
            if t.all {
                let ids = spool.ids(postern::spool::State::Deferred)?;
                let mut n = 0;
                for id in &ids {
                    if spool.requeue(id).is_ok() {
                        n += 1;
                    }
                }
                println!("{n} deferred message(s) queued for immediate delivery");
                changed("queue changed");
                return Ok(ExitCode::SUCCESS);
            }
            let id = t.id.unwrap_or_default();
            spool.requeue(&id).map(|from| {
                println!("{id}: moved from {from}/ to incoming/ for immediate delivery");
                if from == postern::spool::State::Hold {
                    event("released", &id, &|| maillog::released(&id));
                } else {
                    event("retried", &id, &|| maillog::retried(&id));
                }
            })
        }
        QueueCommand::Hold { id } => spool
            .hold(&id, "held by the administrator (postern queue hold)")
            .map(|()| {
                println!("{id}: held");
                event("held", &id, &|| {
                    maillog::held(&id, "", "held by the administrator (postern queue hold)")
                });
            }),
        QueueCommand::Release { id } => match spool.find(&id) {
            Some(postern::spool::State::Hold) => spool.requeue(&id).map(|_| {
                println!("{id}: released");
                event("released", &id, &|| maillog::released(&id));
            }),
            Some(s) => Err(SpoolError::WrongState {
                id: id.clone(),
                state: s,
                why: "only held messages can be released",
            }),
            None => Err(SpoolError::NotFound(id.clone())),
        },
        QueueCommand::Delete { id } => spool.delete(&id).map(|from| {
            println!("{id}: deleted from {from}/");
            event("deleted", &id, &|| maillog::deleted(&id));
        }),
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ SpoolError::NotFound(_)) => {
            eprintln!("postern: {e}");
            Ok(ExitCode::from(EX_NOINPUT))
        }
        Err(e @ SpoolError::WrongState { .. }) => {
            eprintln!("postern: {e}");
            Ok(ExitCode::from(EX_TEMPFAIL))
        }
        Err(e) => Err(e.into()),
    }
}

fn hash_password() -> Result<ExitCode> {
    let password = if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Password: ").context("reading the password")?;
        let b = rpassword::prompt_password("Again: ").context("reading the password")?;
        if a != b {
            eprintln!("postern: the passwords differ");
            return Ok(ExitCode::from(EX_DATAERR));
        }
        a
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the password from standard input")?;
        s.trim_end_matches(['\r', '\n']).to_string()
    };
    let password = zeroize::Zeroizing::new(password);
    if password.is_empty() {
        eprintln!("postern: empty password");
        return Ok(ExitCode::from(EX_DATAERR));
    }
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

/// The log filter with rustls held to errors, unless it names rustls itself: rustls logs a
/// warning for things any peer can do at will (`Sending warning alert NoRenegotiation` for
/// each renegotiation attempt), outside the refusal log's bounds; what matters of those is in
/// postern's own, bounded, disconnect line.
fn quiet_peer_noise(level: String) -> String {
    if level.contains("rustls") {
        level
    } else {
        format!("{level},rustls=error")
    }
}

/// Set up logging to standard error; returns whether it is JSON. A subcommand's options win
/// over those before it; `--log-level` was validated by clap (a bad filter is a usage error).
fn init_logging(cli: &Cli) -> bool {
    use tracing_subscriber::EnvFilter;
    let sub = match &cli.command {
        Command::Serve { log, .. } => Some(log),
        Command::Login(a) => Some(&a.log),
        Command::Token(a) => Some(&a.log),
        _ => None,
    };
    let level = sub
        .and_then(|l: &LogArgs| l.log_level.clone())
        .or_else(|| cli.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let format = sub.and_then(|l| l.log_format).or(cli.log_format);
    let level = quiet_peer_noise(level);
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = format == Some(LogFormat::Json);
    postern::daemon::set_json_stdout(json);
    // Every line passes through the escaping writer: client text can carry control and
    // bidi characters, and the JSON formatter leaves C1 and bidi characters raw.
    let ansi = std::io::stderr().is_terminal();
    let format = if json {
        postern::escape::LogFormat::Json
    } else {
        postern::escape::LogFormat::Human { ansi }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(postern::escape::LogWriter::new(format));
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_ansi(ansi).init();
    }
    json
}

/// Keep the buffers of messages being received (up to the journal's 1 MiB record) in the
/// allocator's heap between messages. By default glibc maps buffers over 128 KiB afresh and
/// unmaps them when freed, and trims free heap over 128 KiB: every 100 KB message then
/// costs page faults and zeroed pages (measured: 10-17% of the daemon's CPU at 100 KB and 10
/// clients). With these bounds at most 4 MiB of free heap per arena stays mapped (a few MB
/// of RSS after a burst), well inside the drafts' shared budget (`limits.message_memory`).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (glibc takes its own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::quiet_peer_noise;

    #[test]
    fn rustls_warnings_are_off_unless_asked_for() {
        assert_eq!(quiet_peer_noise("info".into()), "info,rustls=error");
        assert_eq!(
            quiet_peer_noise("debug,postern::smtp=trace".into()),
            "debug,postern::smtp=trace,rustls=error"
        );
        assert_eq!(quiet_peer_noise("rustls=debug".into()), "rustls=debug");
        for f in ["info", "warn,postern=debug"] {
            tracing_subscriber::EnvFilter::try_new(quiet_peer_noise(f.into())).unwrap();
        }
    }
}
