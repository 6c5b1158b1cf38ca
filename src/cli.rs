//! Command-line interface: every subcommand and option, with help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// postern: a local SMTP relay that sends your devices' mail through Microsoft 365 with OAuth2.
#[derive(Debug, Parser)]
#[command(name = "postern", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: /etc/postern/postern.toml if it exists, else the embedded default]
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "POSTERN_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Log format: human-readable (default on a terminal) or JSON lines.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. "info", "debug" or "postern=debug" [env: POSTERN_LOG]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    Serve,
    /// Validate the configuration and print the effective listeners, users and routes.
    Check,
    /// Inspect and manage the queue (works while the daemon runs).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Read a password (from the terminal without echo, or from standard input) and print its
    /// argon2id hash for a [user.NAME] password_hash.
    HashPassword,
    /// Sign a mailbox in to Microsoft Entra once (device code, or --browser) and store its
    /// refresh token, for accounts with auth = "delegated".
    Login(LoginArgs),
    /// Get an access token now and show its claims (audience, permissions, user, expiry), with
    /// warnings when they cannot work; never prints the token unless --show-token.
    Token(TokenArgs),
    /// Explain an error: paste an SMTP reply, an AADSTS code or Entra's error JSON, a Graph
    /// error, a postern log line, or give a queue id; prints what it means, the likely causes
    /// and the fix (exit 1 when the error is not known).
    Explain(ExplainArgs),
    /// Check everything postern depends on, in order (configuration, spool, listeners, TLS,
    /// Entra, Exchange, Graph, the queue) and print each ✓/✗ with its fix; exit 1 if any failed.
    Doctor(DoctorArgs),
    /// Ask the running daemon whether it is healthy (for Docker HEALTHCHECK and monitoring):
    /// exit 0 when it is, 1 when not.
    Health,
    /// Print the version.
    Version,
}

/// `postern explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
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

/// `postern doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print one JSON object (for scripts) instead of the ✓/✗ lines.
    #[arg(long)]
    pub json: bool,
    /// Skip the checks that need the network (Entra, Exchange, Graph).
    #[arg(long)]
    pub offline: bool,
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
