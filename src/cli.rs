//! Command-line interface: every subcommand and option, with help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// postern: a local SMTP relay that sends your devices' mail through Microsoft 365 with OAuth2.
///
/// Options given before the subcommand apply to it too (`postern --config FILE queue list`).
#[derive(Debug, Parser)]
#[command(
    name = "postern",
    version,
    propagate_version = true,
    after_long_help = EXIT_CODES
)]
pub struct Cli {
    /// Configuration file [default: /etc/postern/postern.toml if it exists, else the embedded
    /// default, or the POSTERN_* variables of a container]
    #[arg(long, short = 'c', env = "POSTERN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(long, value_enum, env = "POSTERN_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. "info", "debug" or "postern=debug".
    #[arg(long, env = "POSTERN_LOG", value_name = "FILTER", value_parser = log_filter)]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Exit codes, for `postern --help` and the man page.
pub const EXIT_CODES: &str = "Exit codes (sysexits.h, as Postfix and sendmail use them):
  0   success
  1   `postern health`: the daemon is not healthy; `postern doctor`: a check failed;
      `postern explain`: the error is not known
  2   wrong command line (clap usage error)
  64  wrong sendmail command line (EX_USAGE)
  65  bad input: an empty password, a malformed message (EX_DATAERR)
  66  no such queue id (EX_NOINPUT)
  67  sendmail: a recipient was refused (EX_NOUSER)
  69  sendmail: refused for another permanent reason (EX_UNAVAILABLE)
  70  internal error, or the daemon could not start: the message says why (EX_SOFTWARE)
  75  temporary failure, try again: the daemon is not running or said 4xx (EX_TEMPFAIL)
  77  sendmail: the sender or this client is not allowed (EX_NOPERM)
  78  configuration error: every mistake with file:line:key (EX_CONFIG)";

/// `--config` for a subcommand (`postern check --config FILE`).
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Configuration file [env: POSTERN_CONFIG] [default: /etc/postern/postern.toml if it
    /// exists, else the embedded default, or the POSTERN_* variables of a container]
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Logging options for the subcommands that log.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format: human-readable lines, or one JSON object per line.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. "info", "debug" or "postern=debug" [env: POSTERN_LOG]
    #[arg(long, value_name = "FILTER", value_parser = log_filter)]
    pub log_level: Option<String>,
}

/// A `--log-level` that tracing can use, or clap's usage error (exit 2) naming it.
fn log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| {
            format!("{e}; write a level (error, warn, info, debug, trace) or TARGET=LEVEL, e.g. postern=debug")
        })
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: listen for SMTP, spool, and forward.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Validate the configuration and print the effective listeners, users and routes.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Inspect and manage the queue (works while the daemon runs).
    Queue(QueueArgs),
    /// Read a password (from the terminal without echo, or from standard input) and print its
    /// argon2id hash for a [user.NAME] password_hash.
    HashPassword,
    /// Sign a mailbox in to Microsoft Entra once (device code, or --browser) and store its
    /// refresh token, for accounts with auth = "delegated".
    Login(LoginArgs),
    /// Get an access token now and show its claims (audience, permissions, user, expiry), with
    /// warnings when they cannot work; never prints the token unless --show-token.
    Token(TokenArgs),
    /// Queue a message read from standard input, with sendmail's options (-t, -i, -f ADDR,
    /// -F NAME, -oi, -oem, -bm, -bs...), through the running daemon; the same as running
    /// postern as `sendmail`.
    #[command(after_long_help = SENDMAIL_HELP)]
    Sendmail(SendmailArgs),
    /// Explain an error: paste an SMTP reply, an AADSTS code or Entra's error JSON, a Graph
    /// error, a postern log line, or give a queue id; prints what it means, the likely causes
    /// and the fix (exit 1 when the error is not known).
    Explain(ExplainArgs),
    /// Send one test message through the configured path now, printing every step with the
    /// upstream's reply (route, token, connect, STARTTLS, AUTH, MAIL, RCPT, DATA) and, on
    /// failure, the cause and fix; exit 0 only when the upstream accepted it.
    Test(TestArgs),
    /// Check everything postern depends on, in order (configuration, spool, listeners, TLS,
    /// Entra, Exchange, the queue) and print each ✓/✗ with its fix; exit 1 if any failed.
    Doctor(DoctorArgs),
    /// Is the running daemon healthy? With an [admin] listener its /healthz (listeners bound,
    /// forwarder running), else its control socket answers: exit 0, else exit 1; for Docker's
    /// HEALTHCHECK and monitoring.
    Health {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages into DIR (for packaging).
    #[command(hide = true)]
    Manpages {
        /// Output directory.
        dir: PathBuf,
    },
    /// Print the version.
    Version,
}

/// `postern explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The error text (several words are joined); read from standard input when absent.
    #[arg(
        value_name = "TEXT",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub text: Vec<String>,
    /// List every known error instead.
    #[arg(long, conflicts_with = "text")]
    pub list: bool,
}

/// `postern test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Envelope sender and From: of the test message (picks the route, as the daemon would).
    #[arg(long, value_name = "ADDRESS")]
    pub from: String,
    /// The recipient.
    #[arg(long, value_name = "ADDRESS")]
    pub to: String,
    /// Use this route instead of the one the sender picks.
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// Sign in only: stop before MAIL FROM, send nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `postern doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print one JSON object (for scripts) instead of the ✓/✗ lines.
    #[arg(long)]
    pub json: bool,
    /// Skip the checks that need the network (Entra, Exchange, Graph).
    #[arg(long)]
    pub offline: bool,
}

/// Help for `postern sendmail`.
pub const SENDMAIL_HELP: &str = "Options (as Postfix's sendmail; clustered flags such as -ti work):
  -t            also send to the To:, Cc: and Bcc: addresses of the message (Bcc: is removed)
  -i, -oi       a line with a single \".\" does not end the message
  -f ADDR       envelope sender (also -r); -f '' or -f '<>' for the null sender.
                Default: the From: address of the message, else LOGIN@HOSTNAME
  -F NAME       full name for the From: header added when the message has none
  -B 8BITMIME   declare the body type (or 7BIT)
  -C FILE       postern configuration file (to find the listener to submit to)
  -v            show the SMTP dialogue on standard error
  -bm           read a message on standard input and queue it (the default)
  -bs           speak SMTP on standard input and output
  -bp           list the queue (like mailq)
  -oem -oep -odb -odi -N -R -V -U -G -n -m -x   accepted and ignored
Recipients follow the options (\"--\" ends them). Missing From:, Date: and Message-ID: headers
are added. The message goes to the first listener of the configuration that takes mail from
this machine without AUTH, or to $POSTERN_SERVER (HOST:PORT) when set, and is queued only when
the daemon answers 250: then the exit status is 0. If the daemon cannot be reached or answers
4xx, the exit status is 75 (EX_TEMPFAIL): nothing was queued, try again later.";

/// `postern sendmail`: everything after it is sendmail's command line.
#[derive(Debug, Args)]
pub struct SendmailArgs {
    /// sendmail options and recipients.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..,
        value_name = "ARGS"
    )]
    pub args: Vec<std::ffi::OsString>,
}

/// `postern queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Configuration file [env: POSTERN_CONFIG] [default: /etc/postern/postern.toml if it
    /// exists, else the embedded default (found from any directory while its daemon runs)]
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: QueueCommand,
}

/// Which Microsoft API a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// Exchange Online SMTP AUTH (XOAUTH2).
    Smtp,
    /// Microsoft Graph sendMail.
    Graph,
}

/// `postern login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub log: LogArgs,
    /// The [account.NAME] to sign in with.
    pub account: String,
    /// The mailbox this sign-in is for (the signed-in user's, or one it may send as).
    #[arg(long, value_name = "ADDRESS")]
    pub mailbox: String,
    /// Which API the tokens are for.
    #[arg(long = "for", value_enum, default_value = "smtp")]
    pub api: Api,
    /// Sign in in a browser on this machine (authorization code + PKCE, loopback redirect)
    /// instead of with a device code.
    #[arg(long)]
    pub browser: bool,
    /// The mailbox is not the signed-in user's own (Graph: adds Mail.Send.Shared).
    #[arg(long)]
    pub shared: bool,
}

/// `postern token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub log: LogArgs,
    /// The [account.NAME].
    pub account: String,
    /// The mailbox (required for delegated accounts).
    #[arg(long, value_name = "ADDRESS")]
    pub mailbox: Option<String>,
    /// Which API the token is for.
    #[arg(long = "for", value_enum, default_value = "smtp")]
    pub api: Api,
    /// Also print the access token itself (it is a credential: handle with care).
    #[arg(long)]
    pub show_token: bool,
}

/// Queue subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages (incoming, active, deferred, hold, failed).
    List {
        /// Print JSON (one array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message's envelope and delivery history.
    Show {
        /// Queue id.
        id: String,
    },
    /// Retry a deferred, held or failed message now (or every deferred one).
    Retry(Target),
    /// Put a message on hold: it stays queued but is not delivered until released.
    Hold {
        /// Queue id.
        id: String,
    },
    /// Release a held message for delivery.
    Release {
        /// Queue id.
        id: String,
    },
    /// Delete a message from the queue without delivering it.
    Delete {
        /// Queue id.
        id: String,
    },
}

/// One message, or all.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// Queue id.
    pub id: Option<String>,
    /// Every deferred message.
    #[arg(long)]
    pub all: bool,
}
