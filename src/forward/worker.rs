//! One delivery attempt: the message is already claimed (in `active/`); send it, classify,
//! record per-recipient results, and move it to its next state.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::bounce::Bounce;
use super::retry;
use crate::maillog;
use crate::spool::{Envelope, RcptStatus, Spool, SpoolError, State, now_secs};
use crate::upstream::{Outcome, Outgoing, Transport};

/// Retry settings the worker needs.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First retry delay.
    pub initial: Duration,
    /// Longest retry delay.
    pub max: Duration,
    /// Message lifetime.
    pub lifetime: Duration,
}

/// Where the message went after the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Delivered to every recipient (or failed for some, permanently): removed from the spool.
    Done,
    /// Deferred until this time (epoch seconds).
    Deferred(u64),
    /// Held.
    Held,
    /// Failed permanently.
    Failed,
}

/// Run one attempt for the claimed message `id`. `transport` is `None` when the message's
/// route no longer exists (the message is held until the admin fixes the config).
pub async fn attempt(
    spool: &Spool,
    id: &str,
    transport: Option<Arc<dyn Transport>>,
    policy: RetryPolicy,
    hostname: &str,
) -> Result<Next, SpoolError> {
    let env = spool.read_envelope(State::Active, id)?;
    let outcome = match transport {
        Some(t) => {
            let msg = Outgoing {
                envelope: env.clone(),
                message: spool.msg_path(State::Active, id),
            };
            t.send(&msg).await
        }
        None => Outcome::Held {
            reason: format!(
                "route \"{}\" no longer exists in the configuration and no other route accepts sender <{}>; add a route for it, then run `postern queue release {}`",
                env.route, env.sender, env.id
            ),
        },
    };
    // Recording the outcome renames and fsyncs: keep that off the async runtime's threads,
    // where it would stall every SMTP session scheduled there.
    let blocking_spool = spool.clone();
    let owned_id = id.to_owned();
    let (next, bounces) = tokio::task::spawn_blocking(move || {
        record(&blocking_spool, &owned_id, env, outcome, policy)
    })
    .await
    .map_err(|e| SpoolError::other("record outcome", std::path::Path::new("active"), e))??;
    for b in bounces {
        match b.queue(spool, hostname).await {
            Ok(report) => {
                maillog::bounced(id, &report, &b.original.sender);
                crate::metrics::bounced(&b.original);
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot queue the delivery status notification")
            }
        }
    }
    Ok(next)
}

/// Apply one attempt's outcome to the spool: per-recipient status, then the message's move.
fn record(
    spool: &Spool,
    id: &str,
    mut env: Envelope,
    outcome: Outcome,
    policy: RetryPolicy,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    env.attempts = env.attempts.saturating_add(1);
    let now = now_secs();
    match outcome {
        Outcome::Sent {
            relay,
            reply,
            recipients,
        } => {
            let mut sent = Vec::new();
            let mut refused = Vec::new();
            for r in recipients {
                if let Some(e) = env
                    .recipients
                    .iter_mut()
                    .find(|e| e.address == r.address && e.status == RcptStatus::Pending)
                {
                    e.status = r.status;
                    e.last_reply = Some(r.reply.clone());
                    match r.status {
                        RcptStatus::Sent => sent.push(r.address),
                        RcptStatus::Failed => {
                            crate::metrics::failed(&env);
                            maillog::failed(
                                id,
                                &env.mailbox,
                                &format!("<{}>: {}", r.address, r.reply),
                            );
                            refused.push((r.address, r.reply));
                        }
                        RcptStatus::Pending => {}
                    }
                }
            }
            if !sent.is_empty() {
                maillog::sent(id, &env.mailbox, &sent, &relay, &reply, env.attempts);
                crate::metrics::sent(&env);
            }
            // The report needs the original's header, so it is built before the file goes.
            let mut bounces: Vec<Bounce> =
                Bounce::for_failed(&env, refused, &spool.msg_path(State::Active, id), false)
                    .into_iter()
                    .collect();
            if env.pending().next().is_none() {
                spool.remove_delivered(id)?;
                return Ok((Next::Done, bounces));
            }
            let reason = env
                .pending()
                .filter_map(|r| r.last_reply.clone())
                .next()
                .unwrap_or_else(|| reply.clone());
            let (next, more) = defer(spool, env, reason, now, policy)?;
            bounces.extend(more);
            Ok((next, bounces))
        }
        Outcome::Transient { reason } => defer(spool, env, reason, now, policy),
        Outcome::Permanent { reason } => fail(spool, env, reason, false),
        Outcome::Held { reason } => {
            // Our configuration is at fault, not the message: give the attempt back.
            env.attempts = env.attempts.saturating_sub(1);
            env.hold_reason = Some(reason.clone());
            env.auto_hold = true;
            env.last_error = Some(reason.clone());
            spool.write_envelope(State::Active, &env)?;
            spool.move_msg(id, State::Active, State::Hold)?;
            maillog::held(id, &env.mailbox, &reason);
            crate::metrics::held(&env);
            Ok((Next::Held, Vec::new()))
        }
    }
}

fn defer(
    spool: &Spool,
    mut env: Envelope,
    reason: String,
    now: u64,
    policy: RetryPolicy,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    if retry::expired(env.received_at, now, policy.lifetime) {
        let why = format!(
            "message outlived max_lifetime ({}); last error: {reason}",
            humantime::format_duration(policy.lifetime)
        );
        return fail(spool, env, why, true);
    }
    let delay = retry::backoff(
        env.attempts,
        policy.initial,
        policy.max,
        rand::rng().random::<f64>(),
    );
    let next = now + delay.as_secs();
    env.next_attempt = Some(next);
    env.last_error = Some(reason.clone());
    spool.write_envelope(State::Active, &env)?;
    spool.move_msg(&env.id, State::Active, State::Deferred)?;
    crate::metrics::deferred(&env);
    maillog::deferred(
        &env.id,
        &env.mailbox,
        &reason,
        env.attempts,
        delay.as_secs(),
    );
    Ok((Next::Deferred(next), Vec::new()))
}

/// Fail the message's pending recipients for good (`expired`: it outlived its lifetime).
fn fail(
    spool: &Spool,
    mut env: Envelope,
    reason: String,
    expired: bool,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    let mut failed = Vec::new();
    for r in env
        .recipients
        .iter_mut()
        .filter(|r| r.status == RcptStatus::Pending)
    {
        r.status = RcptStatus::Failed;
        failed.push((r.address.clone(), reason.clone()));
    }
    let bounce = Bounce::for_failed(
        &env,
        failed,
        &spool.msg_path(State::Active, &env.id),
        expired,
    );
    env.last_error = Some(reason.clone());
    env.next_attempt = None;
    spool.write_envelope(State::Active, &env)?;
    spool.move_msg(&env.id, State::Active, State::Failed)?;
    maillog::failed(&env.id, &env.mailbox, &reason);
    crate::metrics::failed(&env);
    Ok((Next::Failed, bounce.into_iter().collect()))
}
