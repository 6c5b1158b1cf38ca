//! One delivery attempt: the message is already claimed (in `active/`); send it, classify,
//! record per-recipient results, and move it to its next state.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::bounce::{Bounce, NoReport};
use super::retry;
use crate::maillog;
use crate::spool::{Envelope, RcptStatus, Spool, SpoolError, State, now_secs};
use crate::upstream::{HoldScope, Outcome, Outgoing, RcptResult, Transport};

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
    /// Held by postern (in `hold/`) for a configuration problem covering `scope`.
    Held(HoldScope),
    /// Failed permanently.
    Failed,
    /// In `deferred/` without a time of its own: the upstream asked the whole mailbox to wait
    /// (see [`Outcome::Throttled`]); the forwarder holds the mailbox's mail back.
    Throttled {
        /// The wait the upstream asked for; `None`: until the recipient window frees.
        wait: Option<Duration>,
        /// What the upstream said.
        reason: String,
    },
}

/// What the forwarder learns from one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Where the message went.
    pub next: Next,
    /// Recipients the upstream accepted in this attempt (for `daily_recipients`).
    pub delivered: u32,
}

/// Run one attempt for the claimed message `id`. `transport` is `None` when the message's
/// route no longer exists (the message is held until the admin fixes the config).
pub async fn attempt(
    spool: &Spool,
    id: &str,
    transport: Option<Arc<dyn Transport>>,
    policy: RetryPolicy,
    hostname: &str,
) -> Result<Report, SpoolError> {
    let mut env = spool.read_envelope(State::Active, id)?;
    let outcome = match transport {
        Some(t) => {
            let msg = Outgoing::new(env.clone(), spool.msg_path(State::Active, id));
            let outcome = t.send(&msg).await;
            // The transport may have recorded how far it got (Graph's draft): keep that in
            // the envelope written with the outcome. A message it delivered is removed anyway.
            if t.records_progress()
                && !matches!(outcome, Outcome::Sent { .. })
                && let Ok(now) = spool.read_envelope(State::Active, id)
            {
                env.graph = now.graph;
            }
            outcome
        }
        None => Outcome::held(format!(
            "route \"{}\" no longer exists in the configuration and no other route accepts sender <{}>; add a route for it, then run `postern queue release {}`",
            env.route, env.sender, env.id
        )),
    };
    let (report, bounces) = if delivered_to_all(&env, &outcome) {
        // The usual end: a done record in the journal and a rename, no fsync. Two thread
        // wake-ups to the blocking pool and back would cost more than that.
        record(spool, id, env, outcome, policy)?
    } else {
        // Recording any other outcome may rename and fsync: keep that off the async
        // runtime's threads, where it would stall every SMTP session scheduled there.
        let blocking_spool = spool.clone();
        let owned_id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            record(&blocking_spool, &owned_id, env, outcome, policy)
        })
        .await
        .map_err(|e| SpoolError::other("record outcome", std::path::Path::new("active"), e))??
    };
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
    Ok(report)
}

/// Whether `outcome` delivered the message to every recipient still pending in `env`: then
/// [`record`] only logs it and removes the queue file (no fsync, no report to send).
fn delivered_to_all(env: &Envelope, outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Sent { recipients, .. } => {
            recipients.iter().all(|r| r.status == RcptStatus::Sent)
                && env
                    .pending()
                    .all(|p| recipients.iter().any(|r| r.address == p.address))
        }
        _ => false,
    }
}

/// Apply one attempt's outcome to the spool: per-recipient status, then the message's move.
///
/// An attempt counts (and moves the backoff on) only when the message itself was tried: not
/// for a hold (our configuration) or a throttle (the mailbox's quota), and not when the admin
/// ran it early with `postern queue retry` (then a failure keeps the scheduled retry time).
fn record(
    spool: &Spool,
    id: &str,
    mut env: Envelope,
    outcome: Outcome,
    policy: RetryPolicy,
) -> Result<(Report, Vec<Bounce>), SpoolError> {
    let now = now_secs();
    let early = env.next_attempt.filter(|t| *t > now);
    let count = |env: &mut Envelope| {
        if early.is_none() {
            env.attempts = env.attempts.saturating_add(1);
        }
    };
    let (refused, outcome) = match outcome {
        Outcome::Partial { refused, then } => (refused, *then),
        o => (Vec::new(), o),
    };
    // Recipients refused for good in this attempt, whatever happened to the rest.
    let (mut sent, mut failed) = (Vec::new(), Vec::new());
    for r in refused {
        settle(&mut env, id, r, &mut sent, &mut failed);
    }
    let report = |next: Next| Report { next, delivered: 0 };
    let queue_file = spool.msg_path(State::Active, id);
    let bounce_now = |env: &Envelope, failed: Vec<(String, String)>| -> Vec<Bounce> {
        Bounce::for_failed(env, failed, &queue_file, false)
            .into_iter()
            .collect()
    };
    // Recipients failed and nobody will be told (a report itself, automatic mail, the null
    // sender): the message is kept in failed/ with the reason instead of being removed.
    let unreported = |env: &Envelope, failed: &[(String, String)]| -> Option<NoReport> {
        if failed.is_empty() {
            return None;
        }
        Bounce::report_for(env, failed.to_vec(), &queue_file, false).err()
    };
    match outcome {
        Outcome::Sent {
            relay,
            reply,
            recipients,
        } => {
            count(&mut env);
            for r in recipients {
                settle(&mut env, id, r, &mut sent, &mut failed);
            }
            if !sent.is_empty() {
                maillog::sent(id, &env.mailbox, &sent, &relay, &reply, env.attempts);
                crate::metrics::sent(&env);
            }
            let delivered = u32::try_from(sent.len()).unwrap_or(u32::MAX);
            // The report needs the original's header, so it is built before the file goes.
            let why_none = unreported(&env, &failed);
            let mut bounces = bounce_now(&env, failed.clone());
            if env.pending().next().is_none() {
                if let Some(why) = why_none {
                    keep_unreported(spool, env, &failed, &why)?;
                    return Ok((
                        Report {
                            next: Next::Failed,
                            delivered,
                        },
                        bounces,
                    ));
                }
                spool.remove_delivered(id)?;
                return Ok((
                    Report {
                        next: Next::Done,
                        delivered,
                    },
                    bounces,
                ));
            }
            let reason = env
                .pending()
                .filter_map(|r| r.last_reply.clone())
                .next()
                .unwrap_or_else(|| reply.clone());
            let (next, more) = defer(spool, env, reason, now, policy, early)?;
            bounces.extend(more);
            Ok((Report { next, delivered }, bounces))
        }
        // Every recipient was refused at RCPT and nothing else is left to try.
        _ if !failed.is_empty() && env.pending().next().is_none() => {
            count(&mut env);
            if let Some(why) = unreported(&env, &failed) {
                keep_unreported(spool, env, &failed, &why)?;
                return Ok((report(Next::Failed), Vec::new()));
            }
            let bounces = bounce_now(&env, failed);
            spool.remove_delivered(id)?;
            Ok((report(Next::Done), bounces))
        }
        Outcome::Transient { reason } => {
            count(&mut env);
            let mut bounces = bounce_now(&env, failed);
            let (next, more) = defer(spool, env, reason, now, policy, early)?;
            bounces.extend(more);
            Ok((report(next), bounces))
        }
        Outcome::Permanent { reason } => {
            count(&mut env);
            let (next, bounces) = fail(spool, env, reason, false, failed)?;
            Ok((report(next), bounces))
        }
        Outcome::Held { reason, scope } => {
            // Our configuration is at fault, not the message: the attempt does not count.
            let bounces = bounce_now(&env, failed);
            env.hold_reason = Some(reason.clone());
            env.auto_hold = true;
            env.last_error = Some(reason.clone());
            spool.write_envelope(State::Active, &env)?;
            spool.move_msg(id, State::Active, State::Hold)?;
            maillog::held(id, &env.mailbox, super::hold::brief(&reason));
            crate::metrics::held(&env);
            Ok((report(Next::Held(scope)), bounces))
        }
        Outcome::Throttled { reason, wait } => {
            // The mailbox is over a quota, not the message: the attempt does not count, and
            // the forwarder decides when the mailbox's mail goes again.
            let mut bounces = bounce_now(&env, failed);
            if retry::expired(env.received_at, now, policy.lifetime) {
                let (next, more) = expire(spool, env, &reason, policy)?;
                bounces.extend(more);
                return Ok((report(next), bounces));
            }
            let retry_in = wait.map_or(0, |w| w.as_secs());
            // The mailbox's wait is explained once by the forwarder; per message, the gist.
            let gist = super::hold::brief(&reason).to_string();
            to_deferred(spool, env, &reason, &gist, None, retry_in)?;
            Ok((report(Next::Throttled { wait, reason }), bounces))
        }
        Outcome::Partial { then, .. } => {
            // Never nested by a transport; treat the inner outcome as a retry.
            let reason = format!("unexpected nested outcome: {then:?}");
            count(&mut env);
            let mut bounces = bounce_now(&env, failed);
            let (next, more) = defer(spool, env, reason, now, policy, early)?;
            bounces.extend(more);
            Ok((report(next), bounces))
        }
    }
}

/// Record one recipient's result in `env` (if it was pending), adding it to `sent` or
/// `failed` (with the reply, for the report).
fn settle(
    env: &mut Envelope,
    id: &str,
    r: RcptResult,
    sent: &mut Vec<String>,
    failed: &mut Vec<(String, String)>,
) {
    let Some(e) = env
        .recipients
        .iter_mut()
        .find(|e| e.address == r.address && e.status == RcptStatus::Pending)
    else {
        return;
    };
    e.status = r.status;
    e.last_reply = Some(r.reply.clone());
    match r.status {
        RcptStatus::Sent => sent.push(r.address),
        RcptStatus::Failed => {
            maillog::failed(id, &env.mailbox, &format!("<{}>: {}", r.address, r.reply));
            crate::metrics::failed(env);
            failed.push((r.address, r.reply));
        }
        RcptStatus::Pending => {}
    }
}

/// Fail a message that outlived its lifetime, quoting the last error.
fn expire(
    spool: &Spool,
    env: Envelope,
    reason: &str,
    policy: RetryPolicy,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    let why = format!(
        "message outlived max_lifetime ({}); last error: {reason}",
        humantime::format_duration(policy.lifetime)
    );
    fail(spool, env, why, true, Vec::new())
}

/// Back to `deferred/` for a retry after the backoff, or, after an early retry the admin
/// asked for (`early`: the time already scheduled), at that same time.
fn defer(
    spool: &Spool,
    env: Envelope,
    reason: String,
    now: u64,
    policy: RetryPolicy,
    early: Option<u64>,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    if retry::expired(env.received_at, now, policy.lifetime) {
        return expire(spool, env, &reason, policy);
    }
    let next = early.unwrap_or_else(|| {
        let delay = retry::backoff(
            env.attempts,
            policy.initial,
            policy.max,
            rand::rng().random::<f64>(),
        );
        now + delay.as_secs()
    });
    to_deferred(
        spool,
        env,
        &reason,
        &reason,
        Some(next),
        next.saturating_sub(now),
    )?;
    Ok((Next::Deferred(next), Vec::new()))
}

/// Move the claimed message to `deferred/` with `next_attempt` (`None`: the forwarder decides)
/// and `reason` as its last error; the log line gives `logged` and says it retries in
/// `retry_in` seconds.
fn to_deferred(
    spool: &Spool,
    mut env: Envelope,
    reason: &str,
    logged: &str,
    next_attempt: Option<u64>,
    retry_in: u64,
) -> Result<(), SpoolError> {
    env.next_attempt = next_attempt;
    env.last_error = Some(reason.to_string());
    spool.write_envelope(State::Active, &env)?;
    spool.move_msg(&env.id, State::Active, State::Deferred)?;
    maillog::deferred(&env.id, &env.mailbox, logged, env.attempts, retry_in);
    crate::metrics::deferred(&env);
    Ok(())
}

/// Fail the message's pending recipients for good (`expired`: it outlived its lifetime);
/// `already` lists recipients refused earlier in the same attempt, reported together.
fn fail(
    spool: &Spool,
    mut env: Envelope,
    reason: String,
    expired: bool,
    already: Vec<(String, String)>,
) -> Result<(Next, Vec<Bounce>), SpoolError> {
    let mut failed = already;
    for r in env
        .recipients
        .iter_mut()
        .filter(|r| r.status == RcptStatus::Pending)
    {
        r.status = RcptStatus::Failed;
        failed.push((r.address.clone(), reason.clone()));
    }
    let bounce = Bounce::report_for(
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
    match bounce {
        Ok(b) => Ok((Next::Failed, vec![b])),
        Err(why) => {
            log_unreported(&env, &reason, &why);
            Ok((Next::Failed, Vec::new()))
        }
    }
}

/// Move a message whose every recipient is settled, some failed, to `failed/` rather than
/// removing it, because no report tells its sender (`why`): the admin finds it there
/// (`postern queue list`), with the replies in its envelope.
fn keep_unreported(
    spool: &Spool,
    mut env: Envelope,
    failed: &[(String, String)],
    why: &NoReport,
) -> Result<(), SpoolError> {
    let reason = failed
        .iter()
        .map(|(a, r)| format!("<{a}>: {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    env.last_error = Some(reason.clone());
    env.next_attempt = None;
    spool.write_envelope(State::Active, &env)?;
    spool.move_msg(&env.id, State::Active, State::Failed)?;
    log_unreported(&env, &reason, why);
    Ok(())
}

/// The log line for a failure nobody is told about: a report that could not be delivered,
/// or mail that gets no report.
fn log_unreported(env: &Envelope, reason: &str, why: &NoReport) {
    if Bounce::is_report(env) {
        let to = env
            .recipients
            .first()
            .map(|r| r.address.as_str())
            .unwrap_or("");
        maillog::report_undeliverable(&env.id, &env.mailbox, to, reason);
    } else {
        maillog::unreported(&env.id, &env.mailbox, &why.to_string());
    }
}
