//! CLI edge: parse arguments, load the configuration, set up logging, map errors to exit codes.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use postern::cli::{Api, Cli, Command, LogFormat, QueueCommand};
use postern::config::{self, Config, ConfigErrors};
use postern::spool::{Spool, SpoolError};
use postern::{admin, control, daemon, maillog};

/// Default configuration file.
const DEFAULT_CONFIG: &str = "/etc/postern/postern.toml";

// Exit codes from sysexits.h, as Postfix and sendmail use them.
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_SOFTWARE: u8 = 70;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postern: {e:#}");
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("postern {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::HashPassword => hash_password(),
        Command::Check => {
            let source = ConfigSource::resolve(cli.config.as_deref());
            let cfg = source.load()?;
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
        Command::Serve => {
            let source = ConfigSource::resolve(cli.config.as_deref());
            let cfg = source.load()?;
            if matches!(source, ConfigSource::Default) {
                tracing::info!(
                    "no config file at {DEFAULT_CONFIG} and none given: using the embedded default (see `postern check`)"
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let reload = move || source.load();
            rt.block_on(daemon::run(cfg, Box::new(reload)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Login(a) => {
            let cfg = ConfigSource::resolve(cli.config.as_deref()).load()?;
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
            let cfg = ConfigSource::resolve(cli.config.as_deref()).load()?;
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
            let cfg = ConfigSource::resolve(cli.config.as_deref()).load().ok();
            let (text, known) = postern::explain::run(&input, cfg.as_ref());
            print!("{text}");
            Ok(if known {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Doctor(a) => {
            let source = ConfigSource::resolve(cli.config.as_deref());
            let name = match &source {
                ConfigSource::File(p) => p.display().to_string(),
                ConfigSource::Default => config::EMBEDDED_SOURCE.to_string(),
            };
            let report = runtime()?.block_on(postern::doctor::run(source.load(), &name, a.offline));
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
        Command::Health => {
            let cfg = ConfigSource::resolve(cli.config.as_deref()).load()?;
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
        Command::Queue(q) => {
            let source = ConfigSource::resolve(cli.config.as_deref());
            let cfg = source.load()?;
            queue(&cfg, q)
        }
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
    Default,
}

impl ConfigSource {
    fn resolve(given: Option<&Path>) -> Self {
        match given {
            Some(p) => Self::File(p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG).exists() => Self::File(DEFAULT_CONFIG.into()),
            None => Self::Default,
        }
    }

    fn load(&self) -> Result<Config, ConfigErrors> {
        match self {
            Self::File(p) => config::load_file(p),
            Self::Default => config::load_default(),
        }
    }
}

fn queue(cfg: &Config, cmd: QueueCommand) -> Result<ExitCode> {
    match std::fs::read_dir(&cfg.spool_dir) {
        Ok(_) => {}
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
                    maillog::released(&id);
                }
                changed("queue changed");
            })
        }
        QueueCommand::Hold { id } => spool
            .hold(&id, "held by the administrator (postern queue hold)")
            .map(|()| {
                println!("{id}: held");
                maillog::held(&id, "", "held by the administrator");
                changed("queue changed");
            }),
        QueueCommand::Release { id } => match spool.find(&id) {
            Some(postern::spool::State::Hold) => spool.requeue(&id).map(|_| {
                println!("{id}: released");
                maillog::released(&id);
                changed("queue changed");
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
            maillog::deleted(&id);
            changed("queue changed");
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

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("POSTERN_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match cli.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Human) => false,
        None => false,
    };
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
}
