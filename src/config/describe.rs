//! What `postern check` prints: the effective configuration (defaults filled in, paths
//! resolved) and non-fatal warnings, in the spirit of `postconf -n` and `nginx -t`.

use std::fmt::Write as _;
use std::time::Duration;

use super::{
    AccountConfig, AddressPattern, AssertionAlg, AuthMode, BareLfPolicy, Cloud, Config, Credential,
    ListenerConfig, SecretSource, SecretStyle, TlsMinVersion, TlsMode, TransportConfig,
};

/// Exchange Online's largest accepted message (its EHLO advertises `SIZE 157286400`).
const EXCHANGE_MAX_MESSAGE_SIZE: u64 = 157_286_400;

impl Config {
    /// The effective configuration, one setting per line, with every default filled in and
    /// every path resolved. Password hashes are never printed.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = self.write_description(&mut out);
        out
    }

    fn write_description(&self, o: &mut String) -> std::fmt::Result {
        let l = &self.limits;
        let d = &self.delivery;
        writeln!(o, "configuration:  {}", self.source)?;
        writeln!(o, "hostname:       {}", self.hostname)?;
        writeln!(o, "spool_dir:      {}", self.spool_dir.display())?;
        writeln!(o, "state_dir:      {}", self.state_dir.display())?;
        writeln!(
            o,
            "limits:         {} connections, {} per client address ({} before login where auth is required; an IPv6 client is its /{}); {} of memory for messages being received; AUTH lockout after {} failures per client, {} per user name, for {}; {}",
            l.max_connections,
            l.max_connections_per_ip,
            l.max_unauthenticated_per_ip,
            l.ipv6_prefix,
            size(l.message_memory),
            l.auth_max_failures,
            l.auth_max_failures_per_user,
            dur(l.auth_lockout),
            if l.min_free_disk == 0 {
                "no free-disk reserve".to_owned()
            } else {
                format!("refuse mail below {} free disk", size(l.min_free_disk))
            },
        )?;
        writeln!(
            o,
            "delivery:       {} in flight, {} per mailbox; retry every {} growing to {}; give up after {}; shutdown grace {}; held mailboxes retried every {}; {}",
            d.max_concurrency,
            d.per_mailbox_concurrency,
            dur(d.retry_initial),
            dur(d.retry_max),
            dur(d.max_lifetime),
            dur(d.shutdown_grace),
            dur(d.hold_retry),
            if d.connection_idle_timeout.is_zero() {
                "one upstream connection per message".to_owned()
            } else {
                format!(
                    "upstream connections kept {} for the next message",
                    dur(d.connection_idle_timeout)
                )
            },
        )?;
        for listener in &self.listeners {
            writeln!(o)?;
            write_listener(o, listener)?;
        }
        if !self.users.is_empty() {
            writeln!(o)?;
        }
        for user in &self.users {
            writeln!(
                o,
                "user {}: may send as {}",
                user.name,
                patterns(&user.may_send_as)
            )?;
        }
        for a in &self.accounts {
            writeln!(o)?;
            write_account(o, a)?;
        }
        writeln!(o)?;
        for (i, route) in self.routes.iter().enumerate() {
            let transport = match &route.transport {
                TransportConfig::File { dir } => format!("file {}", dir.display()),
                TransportConfig::Smtp { account } => format!("smtp (XOAUTH2, account {account})"),
                TransportConfig::Graph {
                    account,
                    save_to_sent_items,
                    max_message_size,
                } => format!(
                    "graph (Microsoft Graph sendMail, account {account}{}, messages up to {})",
                    if *save_to_sent_items {
                        ""
                    } else {
                        ", no copy in Sent Items"
                    },
                    size(*max_message_size)
                ),
                TransportConfig::Discard => "discard (accepted and dropped)".to_owned(),
            };
            let mut mailbox = match &route.mailbox {
                Some(m) => format!("as mailbox {m}"),
                None => "as the sender's own mailbox".to_owned(),
            };
            if route.rewrite_from {
                mailbox.push_str(" (sender and From: rewritten to it)");
            }
            writeln!(
                o,
                "route {} (#{}): {} -> {transport}, {mailbox}",
                route.name,
                i + 1,
                patterns(&route.senders)
            )?;
        }
        Ok(())
    }

    /// Settings that are legal but probably not what the operator meant. Each names the
    /// setting and what to change; none stops postern from starting.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for a in &self.accounts {
            let secret = match &a.credential {
                Credential::ClientSecret { secret, .. } => Some(secret),
                Credential::Delegated { secret } => secret.as_ref(),
                Credential::Certificate { .. } => None,
            };
            if let Some(SecretSource::Inline(_)) = secret {
                w.push(format!(
                    "account.{}.client_secret: the secret is written in the configuration file itself; move it to client_secret_file (mode 0600) or a systemd credential (client_secret_credential) so the config can be shared and backed up safely",
                    a.name
                ));
            }
            if let Credential::ClientSecret {
                expires: Some(t), ..
            } = &a.credential
            {
                let now = crate::spool::now_secs();
                if *t <= now {
                    w.push(format!(
                        "account.{}: the client secret expired on {} by secret_expires (postern still uses it until Entra refuses it, AADSTS7000222); create a new one in Entra admin centre → App registrations → your app → Certificates & secrets, then update the secret file",
                        a.name,
                        date(*t)
                    ));
                } else if *t - now < 30 * 86_400 {
                    w.push(format!(
                        "account.{}: the client secret expires on {} ({} days); create a new one in Entra admin centre → App registrations → your app → Certificates & secrets before then",
                        a.name,
                        date(*t),
                        (*t - now) / 86_400
                    ));
                }
            }
        }
        for l in &self.listeners {
            let name = &l.name;
            let remote = !l.address.ip().is_loopback();
            if l.auth == AuthMode::Optional && l.tls == TlsMode::None && remote {
                w.push(format!(
                    "listener.{name}: auth is \"optional\" but tls is \"none\" on {}: AUTH is only offered after STARTTLS on non-loopback addresses, so no client will log in; set tls = \"starttls\" or auth = \"none\"",
                    l.address
                ));
            }
            if l.max_message_size > EXCHANGE_MAX_MESSAGE_SIZE {
                w.push(format!(
                    "listener.{name}.max_message_size: {} is more than Microsoft 365 accepts (150 MiB); larger messages would be queued and then fail; write \"150 MiB\" or less",
                    size(l.max_message_size)
                ));
            }
            let lan: Vec<String> = l
                .allow_networks
                .iter()
                .filter(|n| !n.addr().is_loopback())
                .map(ToString::to_string)
                .collect();
            if l.auth != AuthMode::Required
                && !lan.is_empty()
                && let Some(r) = self
                    .routes
                    .iter()
                    .find(|r| r.senders.contains(&AddressPattern::Any))
            {
                w.push(format!(
                        "listener.{name}: any device on {} may send without logging in, and route.{} accepts every sender (\"*\"), so it may send as any address; list the real senders in route.{}.senders, or set auth = \"required\" and use [user.NAME] may_send_as",
                        lan.join(", "),
                        r.name,
                        r.name
                    ));
            }
        }
        for (j, later) in self.routes.iter().enumerate() {
            let shadow = self.routes[..j].iter().find(|earlier| {
                later
                    .senders
                    .iter()
                    .all(|p| earlier.senders.iter().any(|q| covers(q, p)))
            });
            if let Some(earlier) = shadow {
                w.push(format!(
                    "route.{}: never used, because route.{} comes first and matches all of its senders; move route.{} above route.{}",
                    later.name, earlier.name, later.name, earlier.name
                ));
            }
        }
        for user in &self.users {
            for p in &user.may_send_as {
                let routed = self
                    .routes
                    .iter()
                    .any(|r| r.senders.iter().any(|q| covers(q, p)));
                if !routed {
                    w.push(format!(
                        "user.{}.may_send_as: no route accepts \"{p}\" for every address it covers, so some of this user's mail would be refused; add it to a route's senders",
                        user.name
                    ));
                }
            }
        }
        w
    }
}

fn write_listener(o: &mut String, l: &ListenerConfig) -> std::fmt::Result {
    writeln!(o, "listener {}: {}", l.name, l.address)?;
    let tls = match (l.tls, &l.tls_files) {
        (TlsMode::None, _) => "none".to_owned(),
        (mode, files) => {
            let word = if mode == TlsMode::Implicit {
                "implicit"
            } else {
                "starttls"
            };
            match files {
                Some(f) => {
                    let min = match f.min_version {
                        TlsMinVersion::Tls12 => "1.2",
                        TlsMinVersion::Tls13 => "1.3",
                    };
                    format!(
                        "{word} (cert {}, key {}, TLS {min} or newer)",
                        f.cert.display(),
                        f.key.display()
                    )
                }
                None => word.to_owned(),
            }
        }
    };
    let auth = match l.auth {
        AuthMode::None => "none",
        AuthMode::Optional => "optional",
        AuthMode::Required => "required",
    };
    let networks: Vec<String> = l.allow_networks.iter().map(ToString::to_string).collect();
    writeln!(o, "  tls:            {tls}")?;
    writeln!(o, "  auth:           {auth}")?;
    writeln!(o, "  allow_networks: {}", networks.join(", "))?;
    writeln!(
        o,
        "  limits:         max_message_size {}, max_recipients {}, max_errors {}",
        size(l.max_message_size),
        l.max_recipients,
        l.max_errors
    )?;
    writeln!(
        o,
        "  timeouts:       command {}, data {} (at least {}), session {}",
        dur(l.command_timeout),
        dur(l.data_timeout),
        if l.min_data_rate == 0 {
            "any rate".to_owned()
        } else {
            format!("{} bytes/s", l.min_data_rate)
        },
        dur(l.session_timeout)
    )?;
    let bare_lf = match l.bare_lf {
        BareLfPolicy::Normalize => "normalize",
        BareLfPolicy::Reject => "reject",
    };
    writeln!(o, "  bare_lf:        {bare_lf}")
}

/// Does pattern `outer` match every address `inner` matches?
fn covers(outer: &AddressPattern, inner: &AddressPattern) -> bool {
    match (outer, inner) {
        (AddressPattern::Any, _) => true,
        (AddressPattern::Domain(a), AddressPattern::Domain(b)) => a == b,
        (AddressPattern::Domain(_), AddressPattern::Exact(addr)) => outer.matches(addr),
        (AddressPattern::Exact(a), AddressPattern::Exact(b)) => a == b,
        _ => false,
    }
}

fn patterns(p: &[AddressPattern]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn size(bytes: u64) -> String {
    super::validate::human_size(bytes)
}

fn write_account(o: &mut String, a: &AccountConfig) -> std::fmt::Result {
    let cloud = match a.cloud {
        Cloud::Global => "global",
        Cloud::UsGov => "usgov",
        Cloud::UsGovDod => "usgov-dod",
        Cloud::China => "china",
    };
    writeln!(
        o,
        "account {}: tenant {}, client_id {}, cloud {cloud}",
        a.name, a.tenant, a.client_id
    )?;
    let cred = match &a.credential {
        Credential::ClientSecret {
            secret,
            style,
            expires,
        } => format!(
            "client secret from {} ({}){}",
            source(secret),
            match style {
                SecretStyle::Body => "sent in the form body",
                SecretStyle::Basic => "sent with HTTP Basic",
            },
            expires
                .map(|t| format!(", expires {}", date(t)))
                .unwrap_or_default()
        ),
        Credential::Certificate { cert, key, alg } => format!(
            "certificate {} with key from {} ({})",
            cert.display(),
            source(key),
            match alg {
                AssertionAlg::Ps256 => "PS256, x5t#S256",
                AssertionAlg::Rs256 => "RS256, x5t",
            }
        ),
        Credential::Delegated { secret } => format!(
            "delegated: one refresh token per mailbox from `postern login`{}",
            secret
                .as_ref()
                .map(|s| format!("; client secret from {}", source(s)))
                .unwrap_or_default()
        ),
    };
    writeln!(o, "  credential:   {cred}")?;
    let e = &a.endpoints;
    writeln!(o, "  token:        {}", e.token_url)?;
    writeln!(
        o,
        "  smtp:         {}:{} (STARTTLS, XOAUTH2)",
        e.smtp_host, e.smtp_port
    )?;
    writeln!(o, "  graph:        {}", e.graph_url)?;
    if let Some(ca) = &a.ca_file {
        writeln!(o, "  extra CA:     {}", ca.display())?;
    }
    if let Some(p) = &a.proxy {
        writeln!(o, "  proxy:        {p}")?;
    }
    Ok(())
}

/// Where a secret comes from; never the secret itself.
fn source(s: &SecretSource) -> String {
    match s {
        SecretSource::File(p) => format!("file {}", p.display()),
        SecretSource::Env(v) => format!("environment variable {v}"),
        SecretSource::SystemdCredential(n) => format!("systemd credential {n}"),
        SecretSource::Inline(_) => "the configuration file (inline)".to_owned(),
    }
}

fn date(t: u64) -> String {
    let s = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
        .to_string();
    s.get(..10).unwrap_or(&s).to_owned()
}
