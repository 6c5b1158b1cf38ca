//! `doctor`'s check of a Graph route: the token, `Mail.Send` and the mailbox, without sending
//! (see [`GraphTransport::probe`]).

use std::sync::Arc;

use super::{NET_TIMEOUT, Report, Status, tokens};
use crate::config::{Config, RouteConfig, TransportConfig};
use crate::diagnosis;
use crate::token::TokenSource;
use crate::upstream::Outcome;
use crate::upstream::graph::GraphTransport;

/// Check `route` if it is a Graph route with a fixed mailbox.
pub(super) async fn route(
    r: &mut Report,
    cfg: &Config,
    route: &RouteConfig,
    offline: bool,
    tokens: &Arc<tokens::DoctorTokens>,
) {
    let TransportConfig::Graph {
        account,
        save_to_sent_items,
        ..
    } = &route.transport
    else {
        return;
    };
    let s = format!("Route {} (Graph, account {account})", route.name);
    let Some(acc) = cfg.account(account) else {
        r.add(
            &s,
            Status::Fail,
            format!("account {account} is not configured"),
        );
        return;
    };
    let Some(mailbox) = route.mailbox.clone() else {
        r.add(
            &s,
            Status::Skip,
            "sends as each sender's own mailbox: no fixed mailbox to check",
        );
        return;
    };
    if offline {
        r.add(&s, Status::Skip, "Graph check: skipped (offline)");
        return;
    }
    let source: Arc<dyn TokenSource> = tokens.clone();
    let transport = match GraphTransport::new(acc, source, *save_to_sent_items) {
        Ok(t) => t,
        Err(e) => {
            r.add(
                &s,
                Status::Fail,
                format!("the transport cannot be set up: {e}"),
            );
            return;
        }
    };
    let vars = crate::explain::graph_vars(
        crate::explain::account_vars(diagnosis::Vars::new(), acc, &mailbox),
        acc,
        &mailbox,
    );
    match tokio::time::timeout(NET_TIMEOUT * 6, transport.probe(&mailbox)).await {
        Ok(Ok(what)) => {
            r.add(&s, Status::Ok, what);
        }
        Ok(Err(o)) => {
            let reason = match o {
                Outcome::Held { reason, .. }
                | Outcome::Transient { reason }
                | Outcome::Permanent { reason }
                | Outcome::Throttled { reason, .. } => reason,
                Outcome::Sent { reply, .. } => reply,
                Outcome::Partial { then, .. } => format!("{then:?}"),
            };
            // The hold hint of a delivery ("postern queue release ID") does not apply here.
            let reason = reason
                .split(" postern pauses this mailbox")
                .next()
                .unwrap_or(&reason)
                .trim()
                .to_string();
            r.problem(
                &s,
                Status::Fail,
                format!("Graph check of {mailbox} failed: {reason}"),
                &reason,
                &vars,
                Some(format!(
                    "check graph_url of [account.{account}] and that this host reaches {}",
                    acc.endpoints.graph_url
                )),
            );
        }
        Err(_) => {
            let x = r.add(
                &s,
                Status::Fail,
                format!("the Graph check of {mailbox} timed out"),
            );
            x.fix = Some(format!(
                "check that this host reaches {} (outbound TCP 443, proxy)",
                acc.endpoints.graph_url
            ));
        }
    }
}
