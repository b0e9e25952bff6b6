//! The source's side of "never thaw on a guess".
//!
//! Once the manifest is on its way, the destination may restore the workload
//! at any moment, and only the destination knows whether it did. If the
//! `Result` does not come (the connection broke, or went silent for the peer
//! deadline), the source is *in doubt*: it keeps the workload frozen, shows
//! the migration in `ums status`, and asks the destination on new connections
//! (`Query`, action `fence`) with backoff (0.25 s doubling to 4 s) until an
//! answer settles it:
//!
//! * `running`: the workload runs there; the frozen copy here is ended;
//! * `not_running`: it does not run there, and the destination has fenced the
//!   id so it never will; the source thaws;
//! * `restoring`: ask again.
//!
//! With a witness (`--witness`, `witness`), the source also asks it to record
//! `abort`: if the witness then holds `abort`, the destination can never
//! restore the workload, and the source thaws at once, whatever the link to
//! the destination does; if it holds `commit`, the destination may run it,
//! and the source waits for the destination's answer as above.
//!
//! An operator can settle it instead (`ums resolve --thaw | --abandon`),
//! accepting the risk each names. After `--thaw` the source keeps asking the
//! destination to end any copy it runs (`Query`, action `stop`) until it
//! answers `not_running`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::wire::{self, Kind};
use super::{PeerState, Query, QueryAction, QueryAnswer};
use crate::config::Config;
use crate::supervisor::control::Response;
pub use crate::supervisor::in_doubt::{warning, Board, Info, Resolution, Stopping};

/// How an in-doubt migration was settled.
pub enum Settled {
    /// The destination runs it, since this time (its clock, Unix ms).
    Running { since_unix_ms: u64 },
    /// It does not run there and never will (fenced).
    NotRunning,
    /// The witness holds `abort`: the destination can never restore it.
    AbortedAtWitness { witness: String },
    /// An operator decided; answer `reply` once done.
    Operator(Resolution, oneshot::Sender<Response>),
}

/// The longest one query may take: half the peer deadline, 1 to 5 s, so that
/// after a partition heals an answer comes within seconds.
pub fn query_timeout(cfg: &Config) -> Duration {
    (cfg.peer_read_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// One query on a new connection, bounded by [`query_timeout`].
pub async fn query(cfg: &Config, to: &str, id: &str, action: QueryAction) -> Result<QueryAnswer, String> {
    let t = query_timeout(cfg);
    let attempt = async {
        let c = super::transport::connect(cfg, to, t).await.map_err(|e| e.to_string())?;
        let (mut r, mut w) = (c.read, c.write);
        wire::send_json(&mut w, Kind::Query, &Query { migration_id: id.into(), action })
            .await
            .map_err(|e| e.to_string())?;
        wire::read_frame(&mut r)
            .await
            .and_then(|f| f.expect::<QueryAnswer>(Kind::QueryAnswer))
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(t, attempt).await.map_err(|_| format!("no answer from {to} within {t:?}"))?
}

fn backoff(d: Duration) -> Duration {
    (d * 2).min(Duration::from_secs(4))
}

/// Stay in doubt until the destination answers `running` or `not_running`,
/// or an operator decides. Shown on `board` meanwhile.
/// `witness`: ask it too (stop-copy and pre-copy, where the destination may
/// not have committed); `None` once the destination is known to have run the
/// workload (post-copy), where a witness's `abort` could only come from one
/// that lost its records, and must not thaw this copy while that one runs.
pub async fn settle(
    cfg: &Config,
    board: &Board,
    (to, witness): (&str, Option<&str>),
    id: &str,
    cause: String,
    known: Vec<String>,
) -> Settled {
    let (tx, mut decided) = oneshot::channel();
    {
        let mut g = board.lock();
        g.info = Some(Info {
            migration_id: id.into(),
            peer: to.into(),
            known,
            cause: cause.clone(),
            since_unix_ms: super::outcomes::now_ms(),
            queries: 0,
            last_error: None,
            last_answer: None,
            witness: None,
        });
        g.decide = Some(tx);
    }
    tracing::warn!(id, peer = to, cause = %cause, "migration in doubt: the workload stays frozen here until the destination answers (or `ums resolve`)");
    let mut wait = Duration::from_millis(250);
    let mut witness_held = None;
    // The sender stays on the board until an operator uses it.
    let settled = loop {
        if let (Some(addr), None) = (witness, witness_held) {
            let asked = tokio::select! {
                Ok((r, reply)) = &mut decided => break Settled::Operator(r, reply),
                a = super::witness::ask(cfg, addr, id, super::witness::Decision::Abort, query_timeout(cfg)) => a,
            };
            let shown = match &asked {
                Ok(h) => format!("{:?}", h.decision).to_lowercase(),
                Err(e) => format!("not reached: {e}"),
            };
            if let Some(i) = board.lock().info.as_mut() {
                i.witness = Some(shown);
            }
            match asked {
                Ok(h) if h.decision == super::witness::Decision::Abort => {
                    tracing::warn!(
                        id,
                        witness = addr,
                        "the witness holds `abort`: the destination can never restore the workload; it runs here again"
                    );
                    break Settled::AbortedAtWitness { witness: addr.to_string() };
                }
                Ok(h) => {
                    tracing::warn!(
                        id,
                        witness = addr,
                        "the witness holds `commit`: the destination may run the workload; waiting for its answer"
                    );
                    witness_held = Some(h.decision);
                }
                Err(e) => tracing::info!(id, witness = addr, error = %e, "the witness does not answer yet"),
            }
        }
        let asked = tokio::select! {
            Ok((r, reply)) = &mut decided => break Settled::Operator(r, reply),
            a = query(cfg, to, id, QueryAction::Fence) => a,
        };
        {
            let mut g = board.lock();
            if let Some(i) = g.info.as_mut() {
                i.queries += 1;
                match &asked {
                    Ok(a) => {
                        i.last_answer = serde_json::to_value(a.state).ok().and_then(|v| v.as_str().map(String::from))
                    }
                    Err(e) => i.last_error = Some(e.clone()),
                }
            }
        }
        match asked {
            Ok(QueryAnswer { state: PeerState::Running, since_unix_ms }) => break Settled::Running { since_unix_ms },
            Ok(QueryAnswer { state: PeerState::NotRunning, .. }) => break Settled::NotRunning,
            Ok(QueryAnswer { state: PeerState::Restoring, .. }) => tracing::info!(id, "the destination is restoring"),
            Err(e) => tracing::info!(id, error = %e, "the destination does not answer yet"),
        }
        tokio::select! {
            Ok((r, reply)) = &mut decided => break Settled::Operator(r, reply),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = backoff(wait);
    };
    let mut g = board.lock();
    g.info = None;
    g.decide = None;
    settled
}

/// After `ums resolve --thaw`: ask the destination to end any copy of `id`
/// until it answers that none runs there. Runs in the background, shown in
/// `ums status` as `operation.stopping_remote`.
pub fn stop_remote(cfg: Arc<Config>, board: Board, to: String, id: String) {
    board.lock().stopping.push(Stopping {
        migration_id: id.clone(),
        peer: to.clone(),
        since_unix_ms: super::outcomes::now_ms(),
        queries: 0,
        last_error: None,
    });
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(250);
        loop {
            let a = query(&cfg, &to, &id, QueryAction::Stop).await;
            {
                let mut g = board.lock();
                if let Some(s) = g.stopping.iter_mut().find(|s| s.migration_id == id) {
                    s.queries += 1;
                    match &a {
                        Ok(a) => s.last_error = Some(format!("answered {:?}", a.state)),
                        Err(e) => s.last_error = Some(e.clone()),
                    }
                }
            }
            if let Ok(QueryAnswer { state: PeerState::NotRunning, .. }) = a {
                tracing::info!(id, peer = %to, "the destination runs no copy of the workload: exactly one copy runs, here");
                board.lock().stopping.retain(|s| s.migration_id != id);
                return;
            }
            tokio::time::sleep(wait).await;
            wait = backoff(wait);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_four_seconds() {
        let mut d = Duration::from_millis(250);
        let mut seen = vec![];
        for _ in 0..6 {
            seen.push(d.as_millis());
            d = backoff(d);
        }
        assert_eq!(seen, vec![250, 500, 1000, 2000, 4000, 4000]);
    }

    #[tokio::test]
    async fn an_operator_decision_ends_the_doubt() {
        // Nothing listens at this address: every query fails.
        let cfg = Config { insecure_peer: true, peer_read_timeout: Duration::from_secs(2), ..Config::default() };
        let board = Board::default();
        let b2 = board.clone();
        let t = tokio::spawn(async move {
            settle(&cfg, &b2, ("127.0.0.1:1", None), "m-1", "test".into(), vec!["the manifest was sent".into()]).await
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while board.status().0.map(|i| i.queries).unwrap_or(0) == 0 {
            assert!(tokio::time::Instant::now() < until, "no query was made");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let info = board.status().0.unwrap();
        assert_eq!(info.migration_id, "m-1");
        assert!(info.last_error.is_some());
        let (tx, _rx) = oneshot::channel();
        assert!(board.resolve(Resolution::Thaw, tx).is_ok());
        assert!(matches!(t.await.unwrap(), Settled::Operator(Resolution::Thaw, _)));
        assert!(board.status().0.is_none());
        let (tx, _rx) = oneshot::channel();
        assert!(board.resolve(Resolution::Abandon, tx).is_err(), "nothing is in doubt any more");
    }
}
