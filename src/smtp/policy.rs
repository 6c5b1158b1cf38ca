//! Local policy: which clients may connect, and which envelope sender goes out through which
//! route as which mailbox. Checked at MAIL time, so nothing undeliverable is ever accepted.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::{AddressPattern, Config, ListenerConfig, UserConfig};

use super::reply::Reply;

/// Where an accepted sender's mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Route name.
    pub route: String,
    /// Mailbox the message is sent as upstream.
    pub mailbox: String,
}

/// The address as we compare it: IPv4-mapped IPv6 (`::ffff:192.0.2.1`) becomes IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Is `ip` in the listener's `allow_networks`?
pub fn network_allowed(listener: &ListenerConfig, ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    listener.allow_networks.iter().any(|n| n.contains(&ip))
}

/// Decide the route and mailbox for `sender` (empty = null sender), as sent by `user` (if the
/// client authenticated). The refusal names the rule concretely.
pub fn route_sender(
    config: &Config,
    sender: &str,
    user: Option<&UserConfig>,
) -> Result<Routing, Reply> {
    if let Some(user) = user
        && !user.may_send_as.iter().any(|p| p.matches(sender))
    {
        return Err(Reply::sender_not_permitted(
            sender,
            &user.name,
            &patterns(&user.may_send_as),
        ));
    }
    let Some(route) = config.route_for(sender) else {
        return Err(Reply::sender_no_route(
            sender,
            &config.source,
            &route_summary(config),
        ));
    };
    let mailbox = match (&route.mailbox, sender.is_empty()) {
        (Some(m), _) => m.clone(),
        (None, false) => sender.to_string(),
        (None, true) => return Err(Reply::null_sender_no_mailbox(&route.name, &config.source)),
    };
    Ok(Routing {
        route: route.name.clone(),
        mailbox,
    })
}

fn patterns(p: &[AddressPattern]) -> String {
    if p.is_empty() {
        return "nothing".into();
    }
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `route "a" senders = [x, y]; route "b" ...`, or a note that there are no routes.
fn route_summary(config: &Config) -> String {
    if config.routes.is_empty() {
        return "no routes are configured".into();
    }
    let mut s = String::new();
    for (i, r) in config.routes.iter().enumerate() {
        if i > 0 {
            s.push_str("; ");
        }
        let _ = write!(
            s,
            "route \"{}\" senders = [{}]",
            r.name,
            patterns(&r.senders)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::testkit::{config, user};

    #[test]
    fn sender_routing() {
        let cfg = config();
        let r = route_sender(&cfg, "printer@example.com", None).unwrap();
        assert_eq!(
            r,
            Routing {
                route: "office".into(),
                mailbox: "relay@example.com".into()
            }
        );
        let r = route_sender(&cfg, "alice@example.org", None).unwrap();
        assert_eq!(
            r,
            Routing {
                route: "own".into(),
                mailbox: "alice@example.org".into()
            }
        );
        let e = route_sender(&cfg, "x@elsewhere.test", None).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.code, 550);
        assert!(text.starts_with("550 5.7.1 Sender <x@elsewhere.test> rejected: no route in test.toml accepts it (route \"office\" senders = [*@example.com]; route \"own\" senders = [*@example.org]"), "{text}");
    }

    #[test]
    fn null_sender_needs_fixed_mailbox() {
        let mut cfg = config();
        assert!(route_sender(&cfg, "", None).is_err(), "no * route");
        cfg.routes[1].senders.push(AddressPattern::Any);
        let e = route_sender(&cfg, "", None).unwrap_err();
        assert!(e.to_string().contains("route \"own\""), "{e}");
        cfg.routes[0].senders.push(AddressPattern::Any);
        assert_eq!(
            route_sender(&cfg, "", None).unwrap().mailbox,
            "relay@example.com"
        );
    }

    #[test]
    fn may_send_as() {
        let cfg = config();
        let u = user("scanner", "pw", &["scanner@example.com"]);
        assert!(route_sender(&cfg, "scanner@example.com", Some(&u)).is_ok());
        let e = route_sender(&cfg, "boss@example.com", Some(&u)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "550 5.7.1 Sender <boss@example.com> rejected: user \"scanner\" may not send as it (may_send_as: scanner@example.com)"
        );
    }

    #[test]
    fn networks() {
        let cfg = config();
        let l = &cfg.listeners[0];
        assert!(network_allowed(l, "127.0.0.1".parse().unwrap()));
        assert!(network_allowed(l, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!network_allowed(l, "203.0.113.9".parse().unwrap()));
    }
}
