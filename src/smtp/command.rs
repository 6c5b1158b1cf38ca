//! One SMTP command line → [`Command`], over smtp-proto 0.2's `Request` parser.
//!
//! Parsing never fails: a line we cannot use becomes [`Command::Unknown`],
//! [`Command::Invalid`] (with the exact reply to send) or [`Command::NonSmtp`] (an HTTP request
//! or header line: the connection is closed, as Postfix does).

use std::borrow::Cow;
use std::fmt;

use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ProtoError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME,
    MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, Request,
};
use zeroize::Zeroizing;

use super::reply::Reply;

/// `BODY=` on MAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    /// Not given.
    #[default]
    Unspecified,
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
}

/// `MAIL FROM:<address> [SIZE=n] [BODY=...] [SMTPUTF8]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// Reverse-path without angle brackets; empty for the null sender `<>`.
    pub address: String,
    /// Declared size (`SIZE=`), if given and not zero.
    pub size: Option<u64>,
    /// Declared body type.
    pub body: Body,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
}

/// A SASL mechanism named in AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// The de-facto LOGIN mechanism.
    Login,
    /// Anything else (not offered).
    Other,
}

/// One parsed command.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO host`
    Ehlo(String),
    /// `HELO host`
    Helo(String),
    /// `MAIL FROM:`
    Mail(MailFrom),
    /// `RCPT TO:<address>` (address without brackets).
    Rcpt(String),
    /// `DATA`
    Data,
    /// `BDAT size [LAST]`
    Bdat {
        /// Exact chunk size in octets.
        size: u64,
        /// `LAST` was given.
        last: bool,
    },
    /// `RSET`
    Rset,
    /// `NOOP`
    Noop,
    /// `QUIT`
    Quit,
    /// `VRFY`
    Vrfy,
    /// `EXPN`
    Expn,
    /// `HELP`
    Help,
    /// `STARTTLS`
    StartTls,
    /// `AUTH mechanism [initial-response]`; `initial` is `None` when absent, `Some("")` for `=`.
    Auth {
        /// The mechanism.
        mechanism: Mechanism,
        /// The initial response (base64), wiped on drop.
        initial: Option<Zeroizing<String>>,
    },
    /// An HTTP request line or header (`GET / HTTP/1.1`, `Host: x`): close the connection.
    NonSmtp,
    /// Not a command we know.
    Unknown,
    /// A known command with bad syntax or parameters, with the reply to send.
    Invalid(Reply),
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never print credentials.
            Self::Auth { mechanism, initial } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial", &initial.as_ref().map(|_| "[redacted]"))
                .finish(),
            Self::Ehlo(h) => f.debug_tuple("Ehlo").field(h).finish(),
            Self::Helo(h) => f.debug_tuple("Helo").field(h).finish(),
            Self::Mail(m) => f.debug_tuple("Mail").field(m).finish(),
            Self::Rcpt(r) => f.debug_tuple("Rcpt").field(r).finish(),
            Self::Bdat { size, last } => f
                .debug_struct("Bdat")
                .field("size", size)
                .field("last", last)
                .finish(),
            Self::Invalid(r) => f.debug_tuple("Invalid").field(r).finish(),
            other => f.write_str(other.name()),
        }
    }
}

impl Command {
    /// The command verb, for logs (`"UNKNOWN"` for what we could not parse).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Helo(_) => "HELO",
            Self::Mail(_) => "MAIL",
            Self::Rcpt(_) => "RCPT",
            Self::Data => "DATA",
            Self::Bdat { .. } => "BDAT",
            Self::Rset => "RSET",
            Self::Noop => "NOOP",
            Self::Quit => "QUIT",
            Self::Vrfy => "VRFY",
            Self::Expn => "EXPN",
            Self::Help => "HELP",
            Self::StartTls => "STARTTLS",
            Self::Auth { .. } => "AUTH",
            Self::NonSmtp => "NON-SMTP",
            Self::Unknown => "UNKNOWN",
            Self::Invalid(_) => "INVALID",
        }
    }
}

/// Verbs and header-like words that mean "this is HTTP, not SMTP" (Postfix's
/// `smtpd_forbidden_commands` default plus the other HTTP methods).
const HTTP_VERBS: &[&str] = &["GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"];

/// Parse one command line (with or without its CRLF). Never panics.
pub fn parse(line: &[u8]) -> Command {
    let verb_end = line
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let verb = &line[..verb_end];
    if HTTP_VERBS
        .iter()
        .any(|v| verb.eq_ignore_ascii_case(v.as_bytes()))
        || (verb.len() > 1 && verb.ends_with(b":"))
    {
        return Command::NonSmtp;
    }

    let owned;
    let line = if line.ends_with(b"\n") {
        line
    } else {
        owned = [line, b"\r\n"].concat();
        &owned[..]
    };
    let is_address_command =
        verb.eq_ignore_ascii_case(b"MAIL") || verb.eq_ignore_ascii_case(b"RCPT");
    let utf8_ok = std::str::from_utf8(line).is_ok();

    match Request::parse(&mut line.iter()) {
        Ok(req) => from_request(req, utf8_ok),
        Err(_) if is_address_command && !utf8_ok => {
            if verb.eq_ignore_ascii_case(b"MAIL") {
                Command::Invalid(Reply::bad_sender_syntax())
            } else {
                Command::Invalid(Reply::bad_recipient_syntax())
            }
        }
        Err(e) => from_error(e),
    }
}

fn from_request(req: Request<Cow<'_, str>>, utf8_ok: bool) -> Command {
    match req {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::Mail { from } => {
            if !utf8_ok {
                return Command::Invalid(Reply::bad_sender_syntax());
            }
            if from.flags & MAIL_BODY_BINARYMIME != 0 {
                return Command::Invalid(Reply::unsupported_parameter("BODY=BINARYMIME"));
            }
            let body = if from.flags & MAIL_BODY_8BITMIME != 0 {
                Body::EightBitMime
            } else if from.flags & MAIL_BODY_7BIT != 0 {
                Body::SevenBit
            } else {
                Body::Unspecified
            };
            Command::Mail(MailFrom {
                address: from.address.into_owned(),
                size: (from.size != 0).then_some(from.size as u64),
                body,
                smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            })
        }
        Request::Rcpt { to } => {
            if !utf8_ok {
                return Command::Invalid(Reply::bad_recipient_syntax());
            }
            Command::Rcpt(to.address.into_owned())
        }
        Request::Data => Command::Data,
        Request::Bdat {
            chunk_size,
            is_last,
        } => Command::Bdat {
            size: chunk_size as u64,
            last: is_last,
        },
        Request::Auth {
            mechanism,
            initial_response,
        } => {
            let mechanism = match mechanism {
                AUTH_PLAIN => Mechanism::Plain,
                AUTH_LOGIN => Mechanism::Login,
                _ => Mechanism::Other,
            };
            let initial = match initial_response.as_ref() {
                "" => None,
                "=" => Some(Zeroizing::new(String::new())),
                s => Some(Zeroizing::new(s.to_string())),
            };
            if let Cow::Owned(s) = initial_response {
                drop(Zeroizing::new(s));
            }
            Command::Auth { mechanism, initial }
        }
        Request::Noop { .. } => Command::Noop,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Expn { .. } => Command::Expn,
        Request::Help { .. } => Command::Help,
        Request::StartTls => Command::StartTls,
        Request::Rset => Command::Rset,
        Request::Quit => Command::Quit,
        Request::Lhlo { .. }
        | Request::Etrn { .. }
        | Request::Atrn { .. }
        | Request::Burl { .. } => Command::Unknown,
    }
}

fn from_error(e: ProtoError) -> Command {
    match e {
        ProtoError::UnknownCommand => Command::Unknown,
        ProtoError::InvalidSenderAddress => Command::Invalid(Reply::bad_sender_syntax()),
        ProtoError::InvalidRecipientAddress => Command::Invalid(Reply::bad_recipient_syntax()),
        ProtoError::SyntaxError { syntax } => Command::Invalid(Reply::syntax(syntax)),
        ProtoError::InvalidParameter { param } => Command::Invalid(Reply::invalid_parameter(param)),
        ProtoError::UnsupportedParameter { param } => {
            Command::Invalid(Reply::unsupported_parameter(&param))
        }
        ProtoError::NeedsMoreData { .. }
        | ProtoError::ResponseTooLong
        | ProtoError::InvalidResponse { .. } => Command::Invalid(Reply::syntax("command")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Command {
        parse(s.as_bytes())
    }

    #[test]
    fn basic_commands() {
        assert_eq!(
            p("EHLO client.example\r\n"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(p("helo x\r\n"), Command::Helo("x".into()));
        assert_eq!(p("DATA\r\n"), Command::Data);
        assert_eq!(p("RSET\r\n"), Command::Rset);
        assert_eq!(p("NOOP hello\r\n"), Command::Noop);
        assert_eq!(p("QUIT\r\n"), Command::Quit);
        assert_eq!(p("VRFY root\r\n"), Command::Vrfy);
        assert_eq!(p("EXPN list\r\n"), Command::Expn);
        assert_eq!(p("HELP\r\n"), Command::Help);
        assert_eq!(p("STARTTLS\r\n"), Command::StartTls);
        assert_eq!(
            p("BDAT 100\r\n"),
            Command::Bdat {
                size: 100,
                last: false
            }
        );
        assert_eq!(
            p("BDAT 0 LAST\r\n"),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(p("XYZZY\r\n"), Command::Unknown);
        assert_eq!(p("ETRN x\r\n"), Command::Unknown);
        assert_eq!(p("QUIT"), Command::Quit, "a missing CRLF is tolerated");
        assert_eq!(p("data\n"), Command::Data, "bare LF ends a command line");
    }

    #[test]
    fn mail_parameters() {
        assert_eq!(
            p("MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8\r\n"),
            Command::Mail(MailFrom {
                address: "a@b.example".into(),
                size: Some(1000),
                body: Body::EightBitMime,
                smtputf8: true
            })
        );
        assert_eq!(
            p("MAIL FROM:<>\r\n"),
            Command::Mail(MailFrom {
                address: String::new(),
                size: None,
                body: Body::Unspecified,
                smtputf8: false
            })
        );
        assert!(
            matches!(p("MAIL FROM:<a@b> BODY=7BIT\r\n"), Command::Mail(m) if m.body == Body::SevenBit)
        );
        assert!(
            matches!(p("MAIL FROM:<a@b> BODY=BINARYMIME\r\n"), Command::Invalid(r) if r.code == 555)
        );
        assert!(matches!(p("MAIL FROM:<a@b> FOO=BAR\r\n"), Command::Invalid(r) if r.code == 555));
        assert!(matches!(p("MAIL FROM:<a@b> SIZE=abc\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL FROM:a@b\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(p("MAIL FROM:<a@@b>\r\n"), Command::Invalid(r) if r.code == 501));
        let bad = parse(b"MAIL FROM:<\xff@b.example>\r\n");
        assert!(
            matches!(bad, Command::Invalid(r) if r.code == 501),
            "invalid UTF-8"
        );
        assert!(
            matches!(p("MAIL FROM:<j\u{f6}rg@b.example> SMTPUTF8\r\n"), Command::Mail(m) if m.address == "j\u{f6}rg@b.example")
        );
    }

    #[test]
    fn rcpt() {
        assert_eq!(
            p("RCPT TO:<x@y.example>\r\n"),
            Command::Rcpt("x@y.example".into())
        );
        assert_eq!(
            p("rcpt to: <x@y.example>\r\n"),
            Command::Rcpt("x@y.example".into())
        );
        assert!(matches!(p("RCPT TO:x@y\r\n"), Command::Invalid(r) if r.code == 501));
        assert!(matches!(
            p("RCPT TO:<x@y> NOTIFY=BOGUS\r\n"),
            Command::Invalid(_)
        ));
    }

    #[test]
    fn auth() {
        match p("AUTH PLAIN AGEAYg==\r\n") {
            Command::Auth {
                mechanism: Mechanism::Plain,
                initial: Some(i),
            } => {
                assert_eq!(i.as_str(), "AGEAYg==")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p("AUTH LOGIN\r\n"),
            Command::Auth {
                mechanism: Mechanism::Login,
                initial: None
            }
        ));
        assert!(
            matches!(p("AUTH PLAIN =\r\n"), Command::Auth { mechanism: Mechanism::Plain, initial: Some(i) } if i.is_empty())
        );
        assert!(matches!(
            p("AUTH CRAM-MD5\r\n"),
            Command::Auth {
                mechanism: Mechanism::Other,
                ..
            }
        ));
        assert!(matches!(p("AUTH\r\n"), Command::Invalid(_)));
        let dbg = format!("{:?}", p("AUTH PLAIN c2VjcmV0\r\n"));
        assert!(!dbg.contains("c2VjcmV0"), "{dbg}");
    }

    #[test]
    fn http_is_not_smtp() {
        assert_eq!(p("GET / HTTP/1.1\r\n"), Command::NonSmtp);
        assert_eq!(p("POST /x HTTP/1.0\r\n"), Command::NonSmtp);
        assert_eq!(p("CONNECT a:443 HTTP/1.1\r\n"), Command::NonSmtp);
        assert_eq!(p("Host: example\r\n"), Command::NonSmtp);
        assert_eq!(p("User-Agent: x\r\n"), Command::NonSmtp);
    }

    fn address() -> impl Strategy<Value = String> {
        (
            "[a-zA-Z0-9][a-zA-Z0-9._+-]{0,20}",
            "[a-z0-9]{1,10}(\\.[a-z]{2,5}){1,2}",
        )
            .prop_filter_map("dots", |(l, d)| {
                if l.contains("..") || l.ends_with('.') {
                    None
                } else {
                    Some(format!("{l}@{d}"))
                }
            })
    }

    proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&line);
        }

        #[test]
        fn never_panics_on_command_like_input(
            verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "EHLO ", "AUTH ", "BDAT ", "DATA", "HELO "]),
            rest in "[ -~\\t\\r\\x80-\\xff]{0,300}",
        ) {
            let _ = parse(format!("{verb}{rest}\r\n").as_bytes());
        }

        #[test]
        fn mail_roundtrip(addr in address(), size in proptest::option::of(1u64..1_000_000_000),
                          body in prop::sample::select(vec![Body::Unspecified, Body::SevenBit, Body::EightBitMime]),
                          utf8 in any::<bool>()) {
            let mut line = format!("MAIL FROM:<{addr}>");
            if let Some(s) = size { line.push_str(&format!(" SIZE={s}")); }
            match body {
                Body::SevenBit => line.push_str(" BODY=7BIT"),
                Body::EightBitMime => line.push_str(" BODY=8BITMIME"),
                Body::Unspecified => {}
            }
            if utf8 { line.push_str(" SMTPUTF8"); }
            line.push_str("\r\n");
            prop_assert_eq!(parse(line.as_bytes()), Command::Mail(MailFrom { address: addr, size, body, smtputf8: utf8 }));
        }

        #[test]
        fn rcpt_and_bdat_roundtrip(addr in address(), n in 0u64..u32::MAX as u64, last in any::<bool>()) {
            prop_assert_eq!(parse(format!("RCPT TO:<{addr}>\r\n").as_bytes()), Command::Rcpt(addr));
            let l = if last { " LAST" } else { "" };
            prop_assert_eq!(parse(format!("BDAT {n}{l}\r\n").as_bytes()), Command::Bdat { size: n, last });
        }
    }
}
