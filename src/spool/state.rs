//! Queue states and the directories that hold them.

use std::fmt;

/// Where a message is in its life; each state is a directory under the spool root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Being received; wiped at start-up, after recovery queued what the journal vouches for.
    Tmp,
    /// Committed and acknowledged, not yet claimed by a delivery.
    Incoming,
    /// Claimed by a delivery; moved back to incoming at start-up.
    Active,
    /// Waiting for its next attempt (time in the envelope).
    Deferred,
    /// Paused by the admin or because its mailbox's configuration is broken.
    Hold,
    /// Failed permanently or outlived its lifetime; kept with the reason.
    Failed,
    /// Unreadable; moved aside, never deleted automatically.
    Corrupt,
}

impl State {
    /// Every state, in directory creation order.
    pub const ALL: [State; 7] = [
        State::Tmp,
        State::Incoming,
        State::Active,
        State::Deferred,
        State::Hold,
        State::Failed,
        State::Corrupt,
    ];

    /// States that hold acknowledged messages an admin can list.
    pub const QUEUED: [State; 5] = [
        State::Incoming,
        State::Active,
        State::Deferred,
        State::Hold,
        State::Failed,
    ];

    /// Directory name under the spool root.
    pub fn dir(self) -> &'static str {
        match self {
            State::Tmp => "tmp",
            State::Incoming => "incoming",
            State::Active => "active",
            State::Deferred => "deferred",
            State::Hold => "hold",
            State::Failed => "failed",
            State::Corrupt => "corrupt",
        }
    }

    /// Is moving a message from `self` to `to` a legal transition?
    pub fn can_move_to(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Tmp, Incoming)
                | (Incoming, Active)
                | (Deferred, Active)
                | (Active, Deferred)
                | (Active, Hold)
                | (Active, Failed)
                | (Active, Incoming) // recovery after a crash
                | (Incoming, Hold)
                | (Deferred, Hold)
                | (Hold, Incoming)
                | (Deferred, Incoming)
                | (Failed, Incoming) // admin retry of a failed message
                | (_, Corrupt)
        ) && self != to
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir())
    }
}

#[cfg(test)]
mod tests {
    use super::State::*;

    #[test]
    fn legal_moves() {
        assert!(Tmp.can_move_to(Incoming));
        assert!(
            !Tmp.can_move_to(Active),
            "unacknowledged mail is never delivered"
        );
        assert!(!Incoming.can_move_to(Tmp));
        assert!(!Failed.can_move_to(Active));
        assert!(Active.can_move_to(Incoming));
        assert!(Hold.can_move_to(Corrupt));
        assert!(!Corrupt.can_move_to(Corrupt));
    }
}
