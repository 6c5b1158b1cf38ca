//! Local policy: which clients may connect, and which envelope sender goes out through which
//! route as which mailbox. Checked at MAIL time, so nothing undeliverable is ever accepted.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::address::ReversePath;
use crate::config::{
    AddressPattern, Config, ListenerConfig, RouteConfig, TransportConfig, UserConfig,
};

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

/// The client as the limits count it: an IPv4 address (IPv4-mapped IPv6 included) as it is,
/// an IPv6 address reduced to its network of `v6_prefix` bits (`limits.ipv6_prefix`, 64 by
/// default). A host usually has a whole /64; counted per /128 it could open a million
/// "clients", each with its own connection slots and AUTH attempts.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) if v6_prefix < 128 => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        other => other,
    }
}

/// [`client_key`] as text for logs: `192.0.2.1`, or `2001:db8::/64` for an IPv6 network.
pub fn client_key_text(ip: IpAddr, v6_prefix: u8) -> String {
    match client_key(ip, v6_prefix) {
        IpAddr::V6(net) if v6_prefix < 128 => format!("{net}/{v6_prefix}"),
        other => other.to_string(),
    }
}

/// Is `ip` in the listener's `allow_networks`?
pub fn network_allowed(listener: &ListenerConfig, ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    listener.allow_networks.iter().any(|n| n.contains(&ip))
}

/// Decide the route and mailbox for `sender`, as sent by `user` (if the client
/// authenticated). A refusal names the rule concretely in the log only: the client is told
/// that it was refused, not which file or which other routes' patterns said so.
pub fn route_sender(
    config: &Config,
    sender: &ReversePath,
    user: Option<&UserConfig>,
) -> Result<Routing, Reply> {
    // Patterns match the RFC 5321 text (empty for <>); their domain part compares
    // case-insensitively.
    let text = sender.to_string();
    if let Some(user) = user
        && !user.may_send_as.iter().any(|p| p.matches(&text))
    {
        return Err(Reply::sender_not_permitted(
            &text,
            &user.name,
            &patterns(&user.may_send_as),
        ));
    }
    let Some(route) = config.route_for(&text) else {
        return Err(Reply::sender_no_route(
            &text,
            format!(
                "no route in {} accepts it ({})",
                config.source,
                route_summary(config)
            ),
        ));
    };
    if let Some(why) = cannot_send_as(config, route, &text, true) {
        return Err(Reply::sender_cannot_be_sent_as(&text, why));
    }
    let mailbox = match (&route.mailbox, sender) {
        (Some(m), _) => m.clone(),
        (None, ReversePath::Mailbox(a)) if a.needs_quoting() => {
            return Err(Reply::sender_not_a_mailbox(&text).with_detail(format!(
                "route \"{}\" in {} sends as the envelope sender; give it a mailbox to send such senders' mail as",
                route.name, config.source
            )));
        }
        (None, ReversePath::Mailbox(a)) => a.to_string(),
        (None, ReversePath::Null) => {
            return Err(Reply::null_sender_no_mailbox(format!(
                "route \"{}\" in {} matched <> but has no fixed mailbox to send the null sender as; set its mailbox",
                route.name, config.source
            )));
        }
    };
    Ok(Routing {
        route: route.name.clone(),
        mailbox,
    })
}

/// Why `route` cannot deliver mail that names `address` as its sender (the envelope sender
/// when `envelope`, else the `From:`), or `None` if it may: Microsoft 365 never sends as an
/// address in a local-only domain (`scanner@localhost`, a printer's serial number), so such
/// mail would only be held upstream with `SendAsDenied`. With `rewrite_from` the route sends
/// as its mailbox instead, which for the envelope sender needs a fixed `mailbox` (a route
/// without one would sign in as the device's address itself).
pub fn cannot_send_as(
    config: &Config,
    route: &RouteConfig,
    address: &str,
    envelope: bool,
) -> Option<String> {
    let microsoft = matches!(
        route.transport,
        TransportConfig::Smtp { .. } | TransportConfig::Graph { .. }
    );
    let (_, domain) = address.rsplit_once('@')?;
    if !microsoft || !crate::address::local_only_domain(domain) {
        return None;
    }
    match (&route.mailbox, route.rewrite_from) {
        (Some(_), true) => None,
        (None, true) if !envelope => None,
        (Some(m), false) => Some(format!(
            "route \"{}\" in {} delivers to Microsoft 365, which sends only as real mailboxes; set rewrite_from = true in [route.{}] to send such mail as {m}",
            route.name, config.source, route.name
        )),
        (None, _) => Some(format!(
            "route \"{}\" in {} delivers to Microsoft 365 as each sender's own mailbox, and no mailbox has this address; set mailbox = \"ADDRESS\" and rewrite_from = true in [route.{}] to send such mail as that mailbox",
            route.name, config.source, route.name
        )),
    }
}

/// The refusal at the end of DATA for a message whose `From:` (`from`, when it has one) its
/// route `route` cannot send (see [`cannot_send_as`]).
pub fn check_header_from(config: &Config, route: &str, from: Option<&str>) -> Option<Reply> {
    let from = from?;
    let route = config.routes.iter().find(|r| r.name == route)?;
    cannot_send_as(config, route, from, false).map(|why| Reply::from_cannot_be_sent_as(from, why))
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
    use crate::address::Address;
    use crate::smtp::testkit::{config, user};

    fn from(s: &str) -> ReversePath {
        if s.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::Mailbox(Address::parse(s).unwrap())
        }
    }

    #[test]
    fn sender_routing() {
        let cfg = config();
        let r = route_sender(&cfg, &from("printer@example.com"), None).unwrap();
        assert_eq!(
            r,
            Routing {
                route: "office".into(),
                mailbox: "relay@example.com".into()
            }
        );
        let r = route_sender(&cfg, &from("alice@example.org"), None).unwrap();
        assert_eq!(
            r,
            Routing {
                route: "own".into(),
                mailbox: "alice@example.org".into()
            }
        );
        let e = route_sender(&cfg, &from("x@elsewhere.test"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "550 5.7.1 Sender <x@elsewhere.test> rejected: this relay does not send mail from that address"
        );
        // The rules go to the log, not to the client.
        assert_eq!(
            e.detail.as_deref(),
            Some(
                "no route in test.toml accepts it (route \"office\" senders = [*@example.com]; route \"own\" senders = [*@example.org])"
            )
        );
        let wire = String::from_utf8(e.to_bytes()).unwrap();
        assert!(
            !wire.contains("test.toml") && !wire.contains("example.org"),
            "{wire}"
        );
    }

    #[test]
    fn a_route_sending_as_the_sender_needs_a_mailbox_name() {
        let cfg = config();
        let e = route_sender(&cfg, &from("\"a b\"@example.org"), None).unwrap_err();
        assert_eq!(e.code, 553);
        assert!(e.detail.unwrap().contains("route \"own\""));
        // A quoted sender on a route with a fixed mailbox is fine.
        let r = route_sender(&cfg, &from("\"a b\"@example.com"), None).unwrap();
        assert_eq!(r.mailbox, "relay@example.com");
        // The domain matches whatever its case.
        assert!(route_sender(&cfg, &from("Alice@EXAMPLE.org"), None).is_ok());
    }

    #[test]
    fn null_sender_needs_fixed_mailbox() {
        let mut cfg = config();
        assert!(route_sender(&cfg, &from(""), None).is_err(), "no * route");
        cfg.routes[1].senders.push(AddressPattern::Any);
        let e = route_sender(&cfg, &from(""), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "550 5.7.1 Sender <> rejected: this relay has no mailbox to send the null sender as"
        );
        assert!(e.detail.unwrap().contains("route \"own\" in test.toml"));
        cfg.routes[0].senders.push(AddressPattern::Any);
        assert_eq!(
            route_sender(&cfg, &from(""), None).unwrap().mailbox,
            "relay@example.com"
        );
    }

    #[test]
    fn may_send_as() {
        let cfg = config();
        let u = user("scanner", "pw", &["scanner@example.com"]);
        assert!(route_sender(&cfg, &from("scanner@example.com"), Some(&u)).is_ok());
        let e = route_sender(&cfg, &from("boss@example.com"), Some(&u)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "550 5.7.1 Sender <boss@example.com> rejected: user \"scanner\" may not send as it"
        );
        // The user's patterns (other mailboxes, the configuration) are for the log only.
        assert_eq!(
            e.detail.as_deref(),
            Some("may_send_as of user \"scanner\": scanner@example.com")
        );
    }

    #[test]
    fn ipv6_clients_count_by_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_eq!(client_key(a, 48), client_key(c, 48));
        assert_ne!(client_key(a, 128), client_key(b, 128));
        assert_eq!(client_key_text(b, 64), "2001:db8:1:2::/64");
        assert_eq!(client_key_text(b, 128), "2001:db8:1:2:ffff:1:2:3");
        // IPv4 and IPv4-mapped IPv6 are the address itself.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap(), 64), v4);
        assert_eq!(client_key_text(v4, 64), "192.0.2.7");
    }

    #[test]
    fn microsoft_never_sends_as_local_only_addresses() {
        let mut cfg = config();
        cfg.routes[0].transport = TransportConfig::Smtp {
            account: "contoso".into(),
        };
        cfg.routes[0].senders.push(AddressPattern::Any);
        let e = route_sender(&cfg, &from("scanner@localhost"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "550 5.7.1 Sender <scanner@localhost> rejected: Microsoft 365 cannot send mail as this address"
        );
        assert!(
            e.detail
                .unwrap()
                .contains("rewrite_from = true in [route.office]")
        );
        assert!(route_sender(&cfg, &from("scanner@example.com"), None).is_ok());
        let r = check_header_from(&cfg, "office", Some("printer@sn12345")).unwrap();
        assert_eq!(r.code, 550);
        assert!(check_header_from(&cfg, "office", Some("printer@example.com")).is_none());
        assert!(check_header_from(&cfg, "office", None).is_none());
        // With rewrite_from the route sends as its mailbox: both are fine.
        cfg.routes[0].rewrite_from = true;
        assert!(route_sender(&cfg, &from("scanner@localhost"), None).is_ok());
        assert!(check_header_from(&cfg, "office", Some("printer@sn12345")).is_none());
        // Without a fixed mailbox, rewrite_from cannot make the device's address one.
        cfg.routes[0].mailbox = None;
        let e = route_sender(&cfg, &from("scanner@localhost"), None).unwrap_err();
        assert!(
            e.detail
                .unwrap()
                .contains("set mailbox = \"ADDRESS\" and rewrite_from = true")
        );
        assert!(check_header_from(&cfg, "office", Some("printer@sn12345")).is_none());
        // The file transport sends as anything.
        assert!(check_header_from(&cfg, "own", Some("printer@sn12345")).is_none());
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
