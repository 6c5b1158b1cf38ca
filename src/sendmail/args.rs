//! The sendmail command line, parsed the way Postfix's `sendmail` reads it (getopt style:
//! `-oi`, `-fADDR` or `-f ADDR`, clustered flags such as `-ti`), because callers pass exactly
//! what they always passed to sendmail: PHP `-t -i [-f ADDR]`, cron
//! `-FCronDaemon -i -B8BITMIME -oem root`, mailx `-i -- rcpt`, unattended-upgrades `-oi -t`.

use std::ffi::OsString;

/// What the invocation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `-bm` (the default): read a message on standard input and queue it.
    Deliver,
    /// `-bs`: speak SMTP on standard input and output (relayed to the daemon).
    Smtp,
    /// `-bp` (or invoked as `mailq`): list the queue.
    ListQueue,
    /// `-bi` (newaliases): postern has no aliases database; nothing to do.
    NewAliases,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// What to do.
    pub mode: Mode,
    /// `-t`: take recipients from the To:, Cc: and Bcc: headers (added to those given as
    /// arguments, as Postfix does).
    pub extract_recipients: bool,
    /// `-i` / `-oi`: a line with a single "." does not end the message.
    pub ignore_dots: bool,
    /// `-f ADDR` / `-r ADDR`: envelope sender; `Some("")` for the null sender (`-f ''`, `-f '<>'`).
    pub sender: Option<String>,
    /// `-F NAME`: full name for a From: header we add.
    pub full_name: Option<String>,
    /// `-B 8BITMIME` / `-B 7BIT`: the body type to declare.
    pub body_type: Option<String>,
    /// `-C FILE`: the postern configuration file.
    pub config: Option<String>,
    /// `-v`: show the SMTP dialogue on standard error.
    pub verbose: bool,
    /// Recipients given as arguments.
    pub recipients: Vec<String>,
}

/// A command line sendmail would refuse (exit 64, EX_USAGE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Options that take a value (attached, `-fADDR`, or as the next argument, `-f ADDR`).
const WITH_VALUE: &[char] = &[
    'A', 'B', 'C', 'F', 'L', 'N', 'O', 'R', 'V', 'X', 'b', 'e', 'f', 'h', 'o', 'p', 'r',
];
/// Flags accepted and ignored, as Postfix does: `-G` (gateway), `-I`/`-n` (aliases), `-m`
/// (me too), `-U` (initial submission), `-x`/`-c` (obsolete).
const IGNORED_FLAGS: &[char] = &['G', 'I', 'U', 'c', 'm', 'n', 'x'];

impl Options {
    /// Parse the arguments after the program name.
    pub fn parse(args: &[OsString]) -> Result<Options, UsageError> {
        let mut o = Options {
            mode: Mode::Deliver,
            extract_recipients: false,
            ignore_dots: false,
            sender: None,
            full_name: None,
            body_type: None,
            config: None,
            verbose: false,
            recipients: Vec::new(),
        };
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.clone().into_string().map_err(|a| {
                    UsageError(format!(
                        "argument {} is not valid UTF-8",
                        a.to_string_lossy()
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut i = 0;
        let mut options_done = false;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            if options_done || !arg.starts_with('-') || arg == "-" {
                o.recipients.push(arg.clone());
                continue;
            }
            if arg == "--" {
                options_done = true;
                continue;
            }
            for (at, c) in arg[1..].char_indices() {
                if WITH_VALUE.contains(&c) {
                    let rest = &arg[1 + at + c.len_utf8()..];
                    let value = if !rest.is_empty() {
                        rest.to_string()
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(UsageError(format!("option -{c} needs a value")));
                    };
                    o.set(c, value)?;
                    break;
                }
                match c {
                    't' => o.extract_recipients = true,
                    'i' => o.ignore_dots = true,
                    'v' => o.verbose = true,
                    'q' => {
                        return Err(UsageError(
                            "-q: postern retries deferred mail by itself; to retry now, run \
                             `postern queue retry --all`"
                                .into(),
                        ));
                    }
                    c if IGNORED_FLAGS.contains(&c) => {}
                    c => return Err(UsageError(format!("unknown option -{c}"))),
                }
            }
        }
        Ok(o)
    }

    fn set(&mut self, opt: char, value: String) -> Result<(), UsageError> {
        match opt {
            'f' | 'r' => {
                let v = value.trim();
                let v = v
                    .strip_prefix('<')
                    .and_then(|v| v.strip_suffix('>'))
                    .unwrap_or(v);
                self.sender = Some(v.to_string());
            }
            'F' => self.full_name = Some(value),
            'B' => {
                let v = value.to_ascii_uppercase();
                if v != "8BITMIME" && v != "7BIT" {
                    return Err(UsageError(format!(
                        "-B {value}: the body type is 7BIT or 8BITMIME"
                    )));
                }
                self.body_type = Some(v);
            }
            'C' => self.config = Some(value),
            'b' => {
                self.mode = match value.as_str() {
                    "m" => Mode::Deliver,
                    "s" => Mode::Smtp,
                    "p" => Mode::ListQueue,
                    "i" => Mode::NewAliases,
                    "d" | "D" => {
                        return Err(UsageError(
                            "-bd: the daemon is `postern serve` (or systemctl start postern)"
                                .into(),
                        ));
                    }
                    other => return Err(UsageError(format!("-b{other} is not supported"))),
                }
            }
            // -oi is -i; the other -o options (-oem, -oep, -odb, -om...) only tune how
            // sendmail reports errors or queues, and postern always reports errors on standard
            // error with the exit status, so they are accepted and ignored, as Postfix does.
            'o' if value == "i" => self.ignore_dots = true,
            // -A, -L, -N, -O, -R, -V, -X, -e, -h, -p: accepted and ignored (Postfix ignores
            // most of them too).
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, UsageError> {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        Options::parse(&v)
    }

    #[test]
    fn php_cron_mailx_and_unattended_upgrades_command_lines() {
        let php = parse(&["-t", "-i", "-f", "wp@example.com"]).unwrap();
        assert!(php.extract_recipients && php.ignore_dots);
        assert_eq!(php.sender.as_deref(), Some("wp@example.com"));
        assert_eq!(php.mode, Mode::Deliver);

        let cron = parse(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]).unwrap();
        assert_eq!(cron.full_name.as_deref(), Some("CronDaemon"));
        assert_eq!(cron.body_type.as_deref(), Some("8BITMIME"));
        assert!(cron.ignore_dots);
        assert_eq!(cron.recipients, ["root"]);

        let mailx = parse(&["-i", "--", "a@example.com", "-odd@example.com"]).unwrap();
        assert_eq!(mailx.recipients, ["a@example.com", "-odd@example.com"]);

        let uu = parse(&["-oi", "-t"]).unwrap();
        assert!(uu.ignore_dots && uu.extract_recipients);
    }

    #[test]
    fn values_attached_or_separate_and_clustered_flags() {
        let o = parse(&["-ti", "-fa@b.c", "-F", "Full Name", "x@y.z"]).unwrap();
        assert!(o.extract_recipients && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("a@b.c"));
        assert_eq!(o.full_name.as_deref(), Some("Full Name"));
        assert_eq!(o.recipients, ["x@y.z"]);
        // -t and -i clustered before a value-taking option
        let o = parse(&["-tif", "s@x.y"]).unwrap();
        assert!(o.extract_recipients && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("s@x.y"));
        // null sender in its spellings
        assert_eq!(parse(&["-f", ""]).unwrap().sender.as_deref(), Some(""));
        assert_eq!(parse(&["-f<>"]).unwrap().sender.as_deref(), Some(""));
        assert_eq!(
            parse(&["-r", "<a@b.c>"]).unwrap().sender.as_deref(),
            Some("a@b.c")
        );
    }

    #[test]
    fn modes_and_ignored_options() {
        assert_eq!(parse(&["-bs"]).unwrap().mode, Mode::Smtp);
        assert_eq!(parse(&["-bm", "a@b"]).unwrap().mode, Mode::Deliver);
        assert_eq!(parse(&["-b", "p"]).unwrap().mode, Mode::ListQueue);
        assert_eq!(parse(&["-bi"]).unwrap().mode, Mode::NewAliases);
        let o = parse(&[
            "-oep", "-odb", "-N", "never", "-R", "hdrs", "-U", "-v", "a@b",
        ])
        .unwrap();
        assert!(!o.ignore_dots && o.verbose);
        assert_eq!(o.recipients, ["a@b"]);
        assert_eq!(
            parse(&["-C", "/etc/x.toml"]).unwrap().config.as_deref(),
            Some("/etc/x.toml")
        );
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        assert!(parse(&["-f"]).unwrap_err().0.contains("-f needs a value"));
        assert!(parse(&["-k"]).unwrap_err().0.contains("unknown option -k"));
        assert!(parse(&["-bd"]).unwrap_err().0.contains("postern serve"));
        assert!(parse(&["-q"]).unwrap_err().0.contains("queue retry --all"));
        assert!(parse(&["-B", "binary"]).unwrap_err().0.contains("8BITMIME"));
    }
}
