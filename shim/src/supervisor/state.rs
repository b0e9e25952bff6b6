//! The workload's lifecycle as an explicit state machine. The supervisor is
//! its only owner; every request first asks `begin` whether it may start,
//! which is what turns "migrate while a checkpoint runs" into a clean `busy`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No workload here; ready to receive or restore one.
    Standby,
    Running,
    /// An operation is in progress; see `Op`.
    Busy(Op),
    /// The workload ended; ums is about to exit with its code.
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Start,
    Checkpoint,
    Restore,
    MigrateOut,
    MigrateIn,
    Stop,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Op::Start => "start",
            Op::Checkpoint => "checkpoint",
            Op::Restore => "restore",
            Op::MigrateOut => "migrate",
            Op::MigrateIn => "incoming migration",
            Op::Stop => "stop",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("busy: a {0} is in progress")]
    Busy(Op),
    #[error("no workload is running (state {0:?})")]
    NoWorkload(State),
    #[error("a workload is already here (state {0:?}); restore and incoming migrations need a standby")]
    NotStandby(State),
}

/// What an operation left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The workload runs (again, or newly) here.
    Running,
    /// No workload here any more (it moved, or was checkpointed and stopped).
    Gone,
    /// The workload ended on its own.
    Exited,
}

impl State {
    /// May `op` start now? Returns the state to enter.
    pub fn begin(self, op: Op) -> Result<State, Refusal> {
        match (self, op) {
            (State::Busy(current), _) => Err(Refusal::Busy(current)),
            (State::Exited, _) => Err(Refusal::NoWorkload(self)),
            (State::Running, Op::Checkpoint | Op::MigrateOut | Op::Stop) => Ok(State::Busy(op)),
            (State::Standby, Op::Start | Op::Restore | Op::MigrateIn) => Ok(State::Busy(op)),
            (State::Standby, Op::Stop) => Ok(State::Exited),
            (State::Standby, _) => Err(Refusal::NoWorkload(self)),
            (State::Running, _) => Err(Refusal::NotStandby(self)),
        }
    }

    /// The operation ended with `outcome`.
    pub fn finish(self, outcome: Outcome) -> State {
        match outcome {
            Outcome::Running => State::Running,
            Outcome::Gone => State::Standby,
            Outcome::Exited => State::Exited,
        }
    }

    pub fn has_workload(self) -> bool {
        !matches!(self, State::Standby | State::Exited | State::Busy(Op::Start | Op::Restore | Op::MigrateIn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_operations_are_busy() {
        let s = State::Running.begin(Op::Checkpoint).unwrap();
        assert_eq!(s, State::Busy(Op::Checkpoint));
        assert_eq!(s.begin(Op::Checkpoint), Err(Refusal::Busy(Op::Checkpoint)));
        assert_eq!(s.begin(Op::MigrateOut), Err(Refusal::Busy(Op::Checkpoint)));
        assert_eq!(State::Busy(Op::MigrateOut).begin(Op::Stop), Err(Refusal::Busy(Op::MigrateOut)));
    }

    #[test]
    fn standby_receives_running_sends() {
        assert_eq!(State::Standby.begin(Op::Restore), Ok(State::Busy(Op::Restore)));
        assert_eq!(State::Standby.begin(Op::MigrateIn), Ok(State::Busy(Op::MigrateIn)));
        assert!(matches!(State::Standby.begin(Op::MigrateOut), Err(Refusal::NoWorkload(_))));
        assert!(matches!(State::Standby.begin(Op::Checkpoint), Err(Refusal::NoWorkload(_))));
        assert!(matches!(State::Running.begin(Op::Restore), Err(Refusal::NotStandby(_))));
        assert!(matches!(State::Running.begin(Op::MigrateIn), Err(Refusal::NotStandby(_))));
        assert_eq!(State::Standby.begin(Op::Stop), Ok(State::Exited));
    }

    #[test]
    fn outcomes_decide_the_next_state() {
        let s = State::Running.begin(Op::MigrateOut).unwrap();
        assert_eq!(s.finish(Outcome::Gone), State::Standby);
        assert_eq!(s.finish(Outcome::Running), State::Running);
        let s = State::Standby.begin(Op::MigrateIn).unwrap();
        assert_eq!(s.finish(Outcome::Running), State::Running);
        assert_eq!(s.finish(Outcome::Gone), State::Standby);
        assert_eq!(State::Exited.begin(Op::Checkpoint), Err(Refusal::NoWorkload(State::Exited)));
    }
}
