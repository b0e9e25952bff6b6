//! What the supervisor knows of an outgoing migration in doubt
//! (`crate::migration::in_doubt` does the waiting and asking): shown by
//! `status` as `operation`, and the way an operator's `resolve` reaches the
//! waiting migration.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::oneshot;

use super::control::Response;

/// What the destination answered last (`crate::migration::PeerState`, as text).
pub type PeerAnswer = String;

/// How an operator settled an in-doubt migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Run the frozen copy here again; tell the destination to end any copy.
    Thaw,
    /// End the frozen copy here, trusting that the destination runs it.
    Abandon,
}

/// What `ums status` shows of an in-doubt migration (`operation.in_doubt`).
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub migration_id: String,
    pub peer: String,
    /// What the source knows for sure.
    pub known: Vec<String>,
    /// Why it is in doubt: the error that ended the wait for `Result`.
    pub cause: String,
    pub since_unix_ms: u64,
    pub queries: u64,
    pub last_error: Option<String>,
    pub last_answer: Option<PeerAnswer>,
    /// With a witness (`--witness`): the decision it holds for this
    /// migration (`commit`: the destination may run it, so this side waits
    /// for it), or the last error reaching it. Absent without a witness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
}

/// A migration whose copy here was thawed by an operator while the
/// destination may run one: asked to stop until it says it does not.
#[derive(Debug, Clone, Serialize)]
pub struct Stopping {
    pub migration_id: String,
    pub peer: String,
    pub since_unix_ms: u64,
    pub queries: u64,
    pub last_error: Option<String>,
}

pub type Decision = (Resolution, oneshot::Sender<Response>);

#[derive(Default)]
pub struct Inner {
    pub info: Option<Info>,
    pub decide: Option<oneshot::Sender<Decision>>,
    pub stopping: Vec<Stopping>,
}

/// Shared between the migration task (which writes) and the supervisor
/// (which shows it and passes on an operator's decision).
#[derive(Clone, Default)]
pub struct Board(Arc<Mutex<Inner>>);

impl Board {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("in-doubt board")
    }

    /// For `ums status`: the in-doubt migration, and remote copies being stopped.
    pub fn status(&self) -> (Option<Info>, Vec<Stopping>) {
        let g = self.lock();
        (g.info.clone(), g.stopping.clone())
    }

    /// An operator's decision; `Err` (the request back) when nothing is in doubt.
    pub fn resolve(&self, r: Resolution, reply: oneshot::Sender<Response>) -> Result<(), oneshot::Sender<Response>> {
        match self.lock().decide.take() {
            Some(tx) => tx.send((r, reply)).map_err(|(_, reply)| reply),
            None => Err(reply),
        }
    }
}

/// The warning printed by `ums resolve`, saying what each choice risks.
pub fn warning(r: Resolution) -> &'static str {
    match r {
        Resolution::Thaw => {
            "the workload runs here again. If the destination restored it, two copies run until the destination \
             hears from this ums and ends its copy (it is asked until it answers); whatever its copy did meanwhile \
             is lost"
        }
        Resolution::Abandon => {
            "the frozen copy here is ended. If the destination did not restore the workload, it runs nowhere and \
             its memory state is lost"
        }
    }
}
