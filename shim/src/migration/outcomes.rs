//! The destination's record of every migration id it has heard of, and the
//! fence that makes "not running" a promise rather than a guess.
//!
//! A source that lost its connection after the manifest asks (`Query`). If the
//! workload of that migration has not started here, the answer is
//! `not_running` and the id is fenced in the same step, under one lock: a
//! receive still in progress then refuses to restore it. So once a source has
//! heard `not_running` it may thaw its copy, whatever the receive here does
//! next. An id never heard of (this ums restarted, or the Hello never came)
//! is recorded as fenced too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{PeerState, QueryAction};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The Hello came; files are arriving.
    Receiving,
    /// `runc restore` is under way.
    Restoring,
    /// The workload runs here.
    Running,
    /// The receive or the restore failed; nothing runs.
    Failed,
    /// A source asked before the restore began: never restore it.
    Fenced,
    /// It ran here and was ended on the source's request.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Record {
    pub phase: Phase,
    pub since_unix_ms: u64,
}

/// What to do about a `Query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Answer with this state now.
    Now(PeerState, u64),
    /// A `stop` for a workload that runs here: end it, then call `stopped`.
    MustStop,
}

/// Records are kept for the most recent this many ids.
const KEEP: usize = 1024;

#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<HashMap<String, Record>>>);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Outcomes {
    fn set(map: &mut HashMap<String, Record>, id: &str, phase: Phase) {
        if map.len() >= KEEP && !map.contains_key(id) {
            // Forget the oldest finished one; fences are kept longest.
            if let Some(old) = map
                .iter()
                .filter(|(_, r)| !matches!(r.phase, Phase::Receiving | Phase::Restoring | Phase::Running))
                .min_by_key(|(_, r)| (r.phase == Phase::Fenced, r.since_unix_ms))
                .map(|(k, _)| k.clone())
            {
                map.remove(&old);
            }
        }
        map.insert(id.to_string(), Record { phase, since_unix_ms: now_ms() });
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.0.lock().expect("outcomes").get(id).copied()
    }

    /// A Hello for `id`: false if the id is known already (fenced or used).
    pub fn begin(&self, id: &str) -> bool {
        let mut m = self.0.lock().expect("outcomes");
        if m.contains_key(id) {
            return false;
        }
        Self::set(&mut m, id, Phase::Receiving);
        true
    }

    /// Just before `runc restore`: Receiving becomes Restoring, unless a
    /// source fenced the id meanwhile (then the phase it is in).
    pub fn start_restore(&self, id: &str) -> Result<(), Phase> {
        let mut m = self.0.lock().expect("outcomes");
        match m.get(id).map(|r| r.phase) {
            Some(Phase::Receiving) => {
                Self::set(&mut m, id, Phase::Restoring);
                Ok(())
            }
            Some(p) => Err(p),
            None => Err(Phase::Fenced),
        }
    }

    /// The receive or restore ended: running here, or not.
    pub fn finish(&self, id: &str, running: bool) {
        let mut m = self.0.lock().expect("outcomes");
        // A fence stays a fence: it was given as a promise.
        if m.get(id).map(|r| r.phase) == Some(Phase::Fenced) {
            return;
        }
        Self::set(&mut m, id, if running { Phase::Running } else { Phase::Failed });
    }

    /// The workload of `id` was ended on request.
    pub fn stopped(&self, id: &str) {
        Self::set(&mut self.0.lock().expect("outcomes"), id, Phase::Stopped);
    }

    /// A source asks about `id`.
    pub fn query(&self, id: &str, action: QueryAction) -> Answer {
        let mut m = self.0.lock().expect("outcomes");
        let not_running = |r: &Record| Answer::Now(PeerState::NotRunning, r.since_unix_ms);
        match m.get(id).copied() {
            None | Some(Record { phase: Phase::Receiving, .. }) => {
                Self::set(&mut m, id, Phase::Fenced);
                not_running(&m[id])
            }
            Some(r @ Record { phase: Phase::Restoring, .. }) => Answer::Now(PeerState::Restoring, r.since_unix_ms),
            Some(r @ Record { phase: Phase::Running, .. }) => match action {
                QueryAction::Fence => Answer::Now(PeerState::Running, r.since_unix_ms),
                QueryAction::Stop => Answer::MustStop,
            },
            Some(r) => not_running(&r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_before_the_restore_refuses_the_restore() {
        let o = Outcomes::default();
        assert!(o.begin("m-1"));
        assert!(matches!(o.query("m-1", QueryAction::Fence), Answer::Now(PeerState::NotRunning, _)));
        assert_eq!(o.start_restore("m-1"), Err(Phase::Fenced));
        o.finish("m-1", false);
        assert_eq!(o.get("m-1").unwrap().phase, Phase::Fenced);
        assert!(!o.begin("m-1"), "a fenced id is never received again");
    }

    #[test]
    fn unknown_ids_are_fenced_and_not_running() {
        let o = Outcomes::default();
        assert!(matches!(o.query("m-x", QueryAction::Fence), Answer::Now(PeerState::NotRunning, _)));
        assert_eq!(o.get("m-x").unwrap().phase, Phase::Fenced);
        assert!(!o.begin("m-x"));
    }

    #[test]
    fn restoring_says_ask_again_and_running_is_running_until_stopped() {
        let o = Outcomes::default();
        assert!(o.begin("m-2"));
        o.start_restore("m-2").unwrap();
        assert!(matches!(o.query("m-2", QueryAction::Fence), Answer::Now(PeerState::Restoring, _)));
        assert!(matches!(o.query("m-2", QueryAction::Stop), Answer::Now(PeerState::Restoring, _)));
        o.finish("m-2", true);
        assert!(matches!(o.query("m-2", QueryAction::Fence), Answer::Now(PeerState::Running, _)));
        assert_eq!(o.query("m-2", QueryAction::Stop), Answer::MustStop);
        o.stopped("m-2");
        assert!(matches!(o.query("m-2", QueryAction::Stop), Answer::Now(PeerState::NotRunning, _)));
        assert!(matches!(o.query("m-2", QueryAction::Fence), Answer::Now(PeerState::NotRunning, _)));
    }

    #[test]
    fn a_failed_restore_is_not_running() {
        let o = Outcomes::default();
        assert!(o.begin("m-3"));
        o.start_restore("m-3").unwrap();
        o.finish("m-3", false);
        assert!(matches!(o.query("m-3", QueryAction::Fence), Answer::Now(PeerState::NotRunning, _)));
    }
}
