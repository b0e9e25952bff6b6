//! The optional witness: a third `ums` of the group whose record of a
//! migration is its commit point, so that the side that still reaches the
//! witness can settle a partition alone.
//!
//! Two peers cut off from each other cannot tell "the other side runs it"
//! from "the other side never will" (`in_doubt`). With `--witness ADDR` on
//! the source, every migration names a witness in its `Hello`, and the
//! witness keeps one decision per migration id, the first one it is told:
//!
//! * the destination records `commit` just before its restore (before the
//!   workload can run there); if the witness holds `abort` instead, or cannot
//!   be reached within the destination's peer deadline, it does not restore
//!   (it fails closed: `Result { running: false }`);
//! * a source in doubt records `abort`; if the witness then holds `abort`
//!   (its own or an earlier one), the destination can never restore, so the
//!   source thaws at once, partition or not. If it holds `commit`, the
//!   destination may run the workload: the source stays frozen and asks the
//!   destination, as without a witness.
//!
//! First writer wins, under one lock, and the record is written to a file
//! under the state dir before the answer leaves, so a witness's `ums` that
//! restarts in the same outer container keeps its word. A witness whose
//! state is lost (its outer container recreated) answers as if it had never
//! heard of the id: the first writer after that wins, which is safe only if
//! no decision was given before; docs/migration-protocol.md says what each
//! setup guarantees.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::wire::{self, Kind};
use crate::config::Config;

/// One decision per migration id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The destination restores (and runs) the workload.
    Commit,
    /// The source keeps (or takes back) its copy; the destination never restores it.
    Abort,
}

/// Peer frame `WitnessRecord`: "record this decision unless one is held".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub migration_id: String,
    pub decision: Decision,
}

/// Peer frame `WitnessAnswer`: the decision the witness holds (the one asked
/// for, or the one recorded first), and since when (its clock, Unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub decision: Decision,
    pub since_unix_ms: u64,
}

/// Records are kept for the most recent this many ids.
const KEEP: usize = 4096;

/// The witness's records, kept in a file.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<HashMap<String, Held>>>,
    file: Option<PathBuf>,
}

impl Store {
    /// The records in `file` (created on the first record; unreadable or
    /// absent: none).
    pub fn open(file: PathBuf) -> Store {
        let map = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Store { inner: Arc::new(Mutex::new(map)), file: Some(file) }
    }

    #[cfg(test)]
    fn in_memory() -> Store {
        Store { inner: Arc::default(), file: None }
    }

    /// Record `r` unless a decision for its id is held; answer the held one.
    /// `Err` when the record could not be written down (then nothing is
    /// held: the caller must not take it as a decision).
    pub fn record(&self, r: &Record) -> Result<Held, String> {
        let mut m = self.inner.lock().expect("witness records");
        if let Some(h) = m.get(&r.migration_id) {
            return Ok(*h);
        }
        if m.len() >= KEEP {
            if let Some(old) = m.iter().min_by_key(|(_, h)| h.since_unix_ms).map(|(k, _)| k.clone()) {
                m.remove(&old);
            }
        }
        let held = Held { decision: r.decision, since_unix_ms: super::outcomes::now_ms() };
        m.insert(r.migration_id.clone(), held);
        if let Some(file) = &self.file {
            if let Err(e) = write_atomically(file, &serde_json::to_vec(&*m).expect("records serialize")) {
                m.remove(&r.migration_id);
                return Err(format!("cannot write the witness's records to {}: {e}", file.display()));
            }
        }
        Ok(held)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("witness records").len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn write_atomically(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// Ask the witness at `addr` to record `decision` for `id`, on a new peer
/// connection, within `t`; answers the decision it holds.
pub async fn ask(cfg: &Config, addr: &str, id: &str, decision: Decision, t: Duration) -> Result<Held, String> {
    let attempt = async {
        let c = super::transport::connect(cfg, addr, t).await.map_err(|e| e.to_string())?;
        let (mut r, mut w) = (c.read, c.write);
        wire::send_json(&mut w, Kind::WitnessRecord, &Record { migration_id: id.into(), decision })
            .await
            .map_err(|e| e.to_string())?;
        wire::read_frame(&mut r).await.and_then(|f| f.expect::<Held>(Kind::WitnessAnswer)).map_err(|e| e.to_string())
    };
    tokio::time::timeout(t, attempt).await.map_err(|_| format!("no answer from the witness {addr} within {t:?}"))?
}

/// The destination, just before its restore: record `commit` at `addr`,
/// asking again with backoff until `within` has passed. `Ok` only when the
/// witness holds `commit`; otherwise the reason not to restore.
pub async fn commit(cfg: &Config, addr: &str, id: &str, within: Duration) -> Result<(), String> {
    let until = tokio::time::Instant::now() + within;
    let mut wait = Duration::from_millis(100);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let t = super::in_doubt::query_timeout(cfg).min(left.max(Duration::from_millis(100)));
        match ask(cfg, addr, id, Decision::Commit, t).await {
            Ok(Held { decision: Decision::Commit, .. }) => return Ok(()),
            Ok(Held { decision: Decision::Abort, .. }) => {
                return Err(format!(
                    "the source abandoned migration {id} at the witness {addr} (it runs the workload itself): \
                     not restoring"
                ))
            }
            Err(e) if tokio::time::Instant::now() + wait >= until => {
                return Err(format!(
                    "the witness {addr} did not record the commit within {within:?} ({e}): not restoring, so that the \
                     source may keep the workload"
                ))
            }
            Err(e) => tracing::info!(witness = addr, error = %e, "the witness does not answer yet"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, decision: Decision) -> Record {
        Record { migration_id: id.into(), decision }
    }

    #[test]
    fn the_first_decision_holds() {
        let s = Store::in_memory();
        assert_eq!(s.record(&rec("m-1", Decision::Abort)).unwrap().decision, Decision::Abort);
        assert_eq!(s.record(&rec("m-1", Decision::Commit)).unwrap().decision, Decision::Abort);
        assert_eq!(s.record(&rec("m-2", Decision::Commit)).unwrap().decision, Decision::Commit);
        assert_eq!(s.record(&rec("m-2", Decision::Abort)).unwrap().decision, Decision::Commit);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn records_survive_a_restart_in_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("witness.json");
        let s = Store::open(f.clone());
        s.record(&rec("m-1", Decision::Commit)).unwrap();
        s.record(&rec("m-2", Decision::Abort)).unwrap();
        let again = Store::open(f);
        assert_eq!(again.record(&rec("m-1", Decision::Abort)).unwrap().decision, Decision::Commit);
        assert_eq!(again.record(&rec("m-2", Decision::Commit)).unwrap().decision, Decision::Abort);
    }

    #[test]
    fn a_record_that_cannot_be_written_is_not_held() {
        let s = Store::open(PathBuf::from("/nonexistent-dir-for-ums-test/witness.json"));
        assert!(s.record(&rec("m-1", Decision::Commit)).is_err());
        assert!(s.is_empty(), "a decision nobody could write down was kept");
    }

    #[test]
    fn frames_refuse_unknown_fields() {
        assert!(serde_json::from_str::<Record>(r#"{"migration_id":"m","decision":"commit","x":1}"#).is_err());
        let r: Record = serde_json::from_str(r#"{"migration_id":"m","decision":"abort"}"#).unwrap();
        assert_eq!(r.decision, Decision::Abort);
    }
}
