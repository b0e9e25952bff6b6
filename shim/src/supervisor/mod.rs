//! The single owner of the workload's state. Control requests, signals, the
//! workload's exit and the ends of long operations all arrive here as
//! messages; long operations (CRIU, runc, streaming) run on other tasks and
//! report back, so the owner always answers at once: `busy` while one runs.

pub mod control;
pub mod in_doubt;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::process::reaper::{Exit, Reaper};
use crate::process::runtime::Runtime;
use crate::supervisor::control::{ErrorKind, Request, Response};
use crate::supervisor::state::{Op, Outcome, Refusal, State};
use crate::workload::checkpoint::{self, Timings};
use crate::workload::nested::{self, Nested};

/// Everything an operation needs, cheap to clone onto a task.
#[derive(Clone)]
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub reaper: Reaper,
    pub runtime: Runtime,
    pub publisher: crate::net::proxy::Publisher,
    /// Moves the workload to a peer (`ums init` passes the migration layer's
    /// entry point, which sits above this one).
    pub migrate_out: MigrateOut,
    /// An outgoing migration in doubt, for `status` and `resolve`.
    pub in_doubt: in_doubt::Board,
    /// Counters for `ums metrics` and `--metrics-listen`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The migration layer's page links (post-copy), for `status`.
    pub page_links: fn() -> serde_json::Value,
    /// The outgoing migration's progress (phase, bytes, rate), for `status`.
    pub progress: fn() -> serde_json::Value,
}

/// A boxed future, sendable to a task.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// An outgoing migration of a workload to a peer address: on success, the
/// report and the step that ends the frozen copy here (it answers how long
/// that took, in ms); on failure, the message for the operator.
pub type MigrateOut = Arc<
    dyn Fn(
            Ctx,
            Arc<Nested>,
            String,
            crate::supervisor::control::MigrateHow,
        ) -> BoxFuture<Result<(serde_json::Value, BoxFuture<f64>), String>>
        + Send
        + Sync,
>;

/// The record of the last operation, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpRecord {
    pub op: Op,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub timings: serde_json::Value,
    pub finished_unix_ms: u128,
}

/// Messages to the owner.
pub enum Msg {
    Control(Request, oneshot::Sender<Response>),
    /// A peer wants to push a workload here; reply whether it may.
    BeginIncoming(oneshot::Sender<Result<(), Refusal>>),
    /// The incoming migration ended: the restored workload, or why not.
    IncomingDone(Result<(Nested, serde_json::Value), String>),
    /// The source of migration `id` runs the workload again and asks this
    /// destination to end its copy: reply true once no copy of it runs here.
    StopIncoming(String, oneshot::Sender<bool>),
    Done(OpResult),
}

/// How an operation on the running workload ended.
pub struct OpResult {
    op: Op,
    reply: Option<oneshot::Sender<Response>>,
    /// Ok: what to report, and whether the workload still runs here.
    result: Result<(serde_json::Value, Outcome), String>,
    /// A workload that replaced the previous one (restore).
    new_workload: Option<Nested>,
}

pub struct Supervisor {
    ctx: Ctx,
    state: State,
    workload: Option<Arc<Nested>>,
    exit_rx: Option<oneshot::Receiver<Exit>>,
    /// The workload ended while an operation ran (killed after a migration,
    /// or by itself): decided when the operation ends.
    exited_during_op: Option<Exit>,
    started: Instant,
    last_op: Option<OpRecord>,
    term_pending: bool,
    /// A SIGTERM already tried to evacuate the workload (`--evacuate-to`):
    /// the next one stops it.
    evacuation_tried: bool,
    kill_at: Option<tokio::time::Instant>,
    /// The migration id the running workload arrived with, if it did.
    incoming_id: Option<String>,
    /// Checkpoints and migrations asked for while the workload was still
    /// starting: the workload may already print before its start has ended
    /// here, and a user acting on that output should not be told "busy".
    /// They begin, in order, once the start has ended.
    after_start: Vec<(Request, oneshot::Sender<Response>)>,
    inbox_tx: mpsc::Sender<Msg>,
    inbox: mpsc::Receiver<Msg>,
    signals: mpsc::UnboundedReceiver<Signal>,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn refusal(r: Refusal) -> Response {
    let kind = match r {
        Refusal::Busy(_) => ErrorKind::Busy,
        _ => ErrorKind::InvalidState,
    };
    Response::err(kind, r.to_string())
}

impl Supervisor {
    pub fn new(ctx: Ctx, signals: mpsc::UnboundedReceiver<Signal>) -> Self {
        let (inbox_tx, inbox) = mpsc::channel(64);
        Supervisor {
            ctx,
            state: State::Standby,
            workload: None,
            exit_rx: None,
            exited_during_op: None,
            started: Instant::now(),
            last_op: None,
            term_pending: false,
            evacuation_tried: false,
            kill_at: None,
            incoming_id: None,
            after_start: Vec::new(),
            inbox_tx,
            inbox,
            signals,
        }
    }

    /// Where control requests and peer events are sent.
    pub fn inbox(&self) -> mpsc::Sender<Msg> {
        self.inbox_tx.clone()
    }

    fn adopt(&mut self, n: Nested) {
        self.exit_rx = Some(self.ctx.reaper.watch(n.pid));
        let maps = n.settings.publish.clone();
        let p = self.ctx.publisher.clone();
        tokio::spawn(async move {
            if let Err(e) = p.publish(&maps).await {
                tracing::error!(error = %e, "cannot publish the workload's ports");
            }
            p.direct().await;
        });
        tracing::info!(workload = %n.id, pid = n.pid, "workload running");
        self.workload = Some(Arc::new(n));
        self.exited_during_op = None;
    }

    /// Start the workload from the image (not in standby mode), as an
    /// operation: unpacking a large image takes a while, and meanwhile the
    /// supervisor answers `status` (state `busy: start`) like at any time.
    /// A start that fails ends ums with exit code 1.
    pub fn start_workload(&mut self) -> Result<(), String> {
        self.state = self.state.begin(Op::Start).map_err(|e| e.to_string())?;
        let ctx = self.ctx.clone();
        let inbox = self.inbox_tx.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = tokio::task::spawn_blocking(move || nested::start(&ctx.cfg, &ctx.reaper, &ctx.runtime))
                .await
                .map_err(|e| e.to_string());
            let (result, new_workload) = match r {
                Ok(Ok(n)) => (Ok((json!({ "start_ms": checkpoint::ms(t0.elapsed()) }), Outcome::Running)), Some(n)),
                Ok(Err(e)) => (Err(describe(&e)), None),
                Err(e) => (Err(e), None),
            };
            let _ = inbox.send(Msg::Done(OpResult { op: Op::Start, reply: None, result, new_workload })).await;
        });
        Ok(())
    }

    fn record(&mut self, op: Op, r: Result<serde_json::Value, String>) {
        let (ok, error, timings) = match r {
            Ok(t) => (true, None, t),
            Err(e) => (false, Some(e), serde_json::Value::Null),
        };
        self.last_op = Some(OpRecord { op, ok, error, timings, finished_unix_ms: now_ms() });
    }

    fn status(&self) -> serde_json::Value {
        let workload = self.workload.as_ref().map(|n| {
            json!({
                "id": n.id,
                "pid": n.pid,
                "pids": nested::pids(n.pid),
                "image_digest": n.image.manifest_digest,
                "command": n.settings.command,
                "hostname": n.settings.hostname,
                "published_ports": n.settings.publish,
                "tcp_established": n.settings.tcp_established,
                "exposed_ports": n.image.exposed_ports,
                "uptime_s": n.started.elapsed().as_secs_f64(),
                "rootfs": n.bundle.mode,
            })
        });
        let rss_kib = procfs::process::Process::myself().and_then(|p| p.status()).ok().and_then(|s| s.vmrss);
        let (in_doubt, stopping_remote) = self.ctx.in_doubt.status();
        json!({
            "state": self.state,
            "operation": {
                "in_doubt": in_doubt,
                "stopping_remote": stopping_remote,
                "page_links": (self.ctx.page_links)(),
                "progress": (self.ctx.progress)(),
            },
            "workload": workload,
            "runtime": self.ctx.cfg.runtime,
            "peer_listen": self.ctx.cfg.peer_listen.to_string(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "last_op": self.last_op,
            "orphans_reaped": self.ctx.reaper.orphans_reaped(),
            "published": self.ctx.publisher.status(),
            "listen_drain_ms": checkpoint::ms(self.ctx.cfg.listen_drain),
            "ums": { "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id(), "rss_kib": rss_kib },
        })
    }

    /// What the metrics need of the state this supervisor owns.
    fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let (state, operation) = match self.state {
            State::Standby => ("standby", None),
            State::Running => ("running", None),
            State::Busy(op) => (
                "busy",
                Some(serde_json::to_value(op).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()),
            ),
            State::Exited => ("exited", None),
        };
        let (in_doubt, stopping) = self.ctx.in_doubt.status();
        let p = self.ctx.publisher.status();
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        let (resident_bytes, cpu_seconds, start_time_seconds) = crate::metrics::process_stats();
        crate::metrics::Snapshot {
            state,
            operation,
            in_doubt: in_doubt.is_some(),
            stopping_remote: stopping.len(),
            workload_uptime: self.workload.as_ref().map(|w| w.started.elapsed().as_secs_f64()),
            connections_open: n("open_connections") + n("kernel_open_connections"),
            connections_held_now: n("held_now"),
            connections_held_total: n("held_total"),
            connections_forwarded_total: n("forwarded_total"),
            connections_refused_total: n("refused_total"),
            resident_bytes,
            cpu_seconds,
            start_time_seconds,
        }
    }

    /// Run until the workload ends (its exit code) or a stop in standby (0).
    pub async fn run(mut self, shutdown: watch::Sender<bool>) -> i32 {
        let code = loop {
            let exit_fut = async {
                match self.exit_rx.as_mut() {
                    Some(rx) => rx.await.ok(),
                    None => std::future::pending().await,
                }
            };
            let kill_fut = async {
                match self.kill_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(msg) = self.inbox.recv() => {
                    if let Some(code) = self.on_msg(msg).await { break code; }
                }
                Some(sig) = self.signals.recv() => {
                    if let Some(code) = self.on_signal(sig) { break code; }
                }
                exit = exit_fut => {
                    self.exit_rx = None;
                    let exit = exit.unwrap_or(Exit::Signal(9));
                    if let Some(code) = self.on_exit(exit).await { break code; }
                }
                _ = kill_fut => {
                    self.kill_at = None;
                    if let Some(n) = &self.workload {
                        tracing::warn!(grace_s = self.ctx.cfg.stop_grace.as_secs_f64(), "workload ignored SIGTERM; killing it");
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid), Signal::SIGKILL);
                    }
                }
            }
        };
        let _ = shutdown.send(true);
        code
    }

    async fn on_exit(&mut self, exit: Exit) -> Option<i32> {
        if let State::Busy(op) = self.state {
            if op != Op::Stop {
                self.exited_during_op = Some(exit);
                return None;
            }
        }
        tracing::info!(%exit, "workload ended");
        self.ctx.publisher.close().await;
        if let Some(n) = self.workload.take() {
            let ctx = self.ctx.clone();
            let _ = tokio::task::spawn_blocking(move || nested::cleanup(&ctx.cfg, &ctx.reaper, &ctx.runtime, &n)).await;
        }
        self.state = State::Exited;
        Some(exit.code())
    }

    fn on_signal(&mut self, sig: Signal) -> Option<i32> {
        let workload_pid = self.workload.as_ref().map(|n| n.pid);
        match (sig, self.state) {
            (Signal::SIGTERM, State::Standby) => {
                tracing::info!("SIGTERM in standby: exiting");
                return Some(0);
            }
            (Signal::SIGTERM, State::Running) if !self.ctx.cfg.evacuate_to.is_empty() && !self.evacuation_tried => {
                self.evacuate();
                return None;
            }
            (Signal::SIGTERM, State::Running) => {
                self.state = State::Busy(Op::Stop);
                self.kill_at = Some(tokio::time::Instant::now() + self.ctx.cfg.stop_grace);
                tracing::info!(grace_s = self.ctx.cfg.stop_grace.as_secs_f64(), "SIGTERM: stopping the workload");
            }
            (Signal::SIGTERM, State::Busy(op)) if op != Op::Stop => {
                tracing::info!(%op, "SIGTERM during an operation: applied when it ends");
                self.term_pending = true;
                return None;
            }
            _ => {}
        }
        if let (Some(pid), State::Running | State::Busy(Op::Stop)) = (workload_pid, self.state) {
            tracing::debug!(%sig, pid, "forwarding signal");
            if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
                tracing::warn!(%sig, error = %e, "cannot forward signal");
            }
        }
        None
    }

    /// SIGTERM with `--evacuate-to`: migrate the workload to the first peer
    /// that takes it, trying them in order until `evacuate_within` has
    /// passed (an attempt under way is never cut: a migration ends either at
    /// the destination or thawed here). The SIGTERM is then applied as if it
    /// had come during a migration: a standby exits 0, a workload that is
    /// still here is stopped.
    fn evacuate(&mut self) {
        let Ok(next) = self.state.begin(Op::MigrateOut) else { return };
        self.state = next;
        self.evacuation_tried = true;
        self.term_pending = true;
        let n = self.workload.clone().expect("running state has a workload");
        let (ctx, inbox) = (self.ctx.clone(), self.inbox_tx.clone());
        let peers = ctx.cfg.evacuate_to.clone();
        let deadline = Instant::now() + ctx.cfg.evacuate_within;
        tracing::info!(?peers, within_s = ctx.cfg.evacuate_within.as_secs_f64(), "SIGTERM: evacuating the workload");
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut result = None;
            for peer in peers {
                if Instant::now() >= deadline {
                    errors.push(format!("{peer}: not tried, the evacuation time is over"));
                    continue;
                }
                match (ctx.migrate_out)(
                    ctx.clone(),
                    n.clone(),
                    peer.clone(),
                    // Evacuation keeps stop-copy: no measuring, no split state.
                    crate::supervisor::control::MigrateHow {
                        mode: crate::supervisor::control::MigrationMode::StopCopy,
                        no_post_copy: true,
                    },
                )
                .await
                {
                    Ok((mut report, finish)) => {
                        report["finish_ms"] = json!(finish.await);
                        report["to"] = json!(peer);
                        tracing::info!(%peer, "evacuated: the workload runs at the peer now");
                        result = Some(Ok((report, Outcome::Gone)));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "evacuation: this peer did not take the workload");
                        errors.push(format!("{peer}: {e}"));
                    }
                }
            }
            let result = result.unwrap_or_else(|| {
                tracing::error!(
                    tried = ?errors,
                    "evacuation failed: no peer took the workload; stopping it as without --evacuate-to"
                );
                Err(format!("evacuation failed: {}", errors.join("; ")))
            });
            let _ =
                inbox.send(Msg::Done(OpResult { op: Op::MigrateOut, reply: None, result, new_workload: None })).await;
        });
    }

    async fn on_msg(&mut self, msg: Msg) -> Option<i32> {
        match msg {
            Msg::Control(req, reply) => self.on_request(req, reply),
            Msg::BeginIncoming(reply) => {
                let r = self.state.begin(Op::MigrateIn).map(|s| self.state = s);
                let _ = reply.send(r);
            }
            Msg::StopIncoming(id, reply) => self.stop_incoming(id, reply),
            Msg::IncomingDone(r) => match r {
                Ok((n, report)) => {
                    self.incoming_id = report["migration_id"].as_str().map(String::from);
                    self.ctx.metrics.workload_started(crate::metrics::StartKind::Migration);
                    self.adopt(n);
                    self.state = self.state.finish(Outcome::Running);
                    self.record(Op::MigrateIn, Ok(report));
                }
                Err(e) => {
                    self.state = self.state.finish(Outcome::Gone);
                    self.record(Op::MigrateIn, Err(e));
                }
            },
            Msg::Done(done) => return self.on_done(done).await,
        }
        self.after_op()
    }

    /// End the copy that migration `id` brought here, if it runs; the
    /// source runs the workload again (an operator's `ums resolve --thaw`).
    fn stop_incoming(&mut self, id: String, reply: oneshot::Sender<bool>) {
        let ours = self.incoming_id.as_deref() == Some(id.as_str());
        match self.state {
            State::Running if ours => {}
            // Busy with it (a migration onwards, a stop): ask again later.
            State::Busy(_) if ours => {
                let _ = reply.send(false);
                return;
            }
            // No copy of that migration runs here.
            _ => {
                let _ = reply.send(!ours || self.workload.is_none());
                return;
            }
        }
        let Some(n) = self.workload.clone() else {
            let _ = reply.send(true);
            return;
        };
        self.state = State::Busy(Op::Surrender);
        tracing::warn!(id = %id, workload = %n.id, "the source runs the workload again: ending the copy here");
        let (ctx, inbox) = (self.ctx.clone(), self.inbox_tx.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = ctx.runtime.kill(&ctx.reaper, &n.id, "KILL", true);
                nested::cleanup(&ctx.cfg, &ctx.reaper, &ctx.runtime, &n);
            })
            .await;
            let _ = reply.send(true);
            let result = Ok((json!({ "migration_id": id, "ms": checkpoint::ms(t.elapsed()) }), Outcome::Gone));
            let _ =
                inbox.send(Msg::Done(OpResult { op: Op::Surrender, reply: None, result, new_workload: None })).await;
        });
    }

    /// A SIGTERM that arrived during an operation takes effect now.
    fn after_op(&mut self) -> Option<i32> {
        if self.term_pending && !matches!(self.state, State::Busy(_)) {
            self.term_pending = false;
            return self.on_signal(Signal::SIGTERM);
        }
        None
    }

    async fn on_done(&mut self, d: OpResult) -> Option<i32> {
        if let (Op::Start, Err(e)) = (d.op, &d.result) {
            tracing::error!(error = %e, "cannot start the workload");
            eprintln!("ums: cannot start the workload: {e}");
            self.state = State::Exited;
            for (_, reply) in self.after_start.drain(..) {
                let _ = reply.send(Response::err(ErrorKind::InvalidState, format!("the workload did not start: {e}")));
            }
            return Some(1);
        }
        let response = match &d.result {
            Ok((report, _)) => Response::ok(report.clone()),
            Err(e) => Response::err(ErrorKind::Failed, e.clone()),
        };
        let mut outcome = match &d.result {
            Ok((_, o)) => *o,
            Err(_) => {
                if self.workload.is_some() {
                    Outcome::Running
                } else {
                    Outcome::Gone
                }
            }
        };
        if let Some(n) = d.new_workload {
            self.ctx.metrics.workload_started(match d.op {
                Op::Restore => crate::metrics::StartKind::Restore,
                _ => crate::metrics::StartKind::Image,
            });
            self.adopt(n);
        }
        if outcome == Outcome::Gone {
            self.incoming_id = None;
            if matches!(d.op, Op::Checkpoint | Op::Surrender) {
                // Checkpointed and stopped: nothing behind the published ports.
                self.ctx.publisher.close().await;
            }
            self.workload = None;
            self.exit_rx = None;
            self.exited_during_op = None;
        } else if let Some(exit) = self.exited_during_op.take() {
            tracing::info!(%exit, "the workload ended during the operation");
            outcome = Outcome::Exited;
            self.state = self.state.finish(outcome);
            if let Some(r) = d.reply {
                let _ = r.send(response);
            }
            return Some(exit.code());
        }
        self.state = self.state.finish(outcome);
        self.record(d.op, d.result.map(|(r, _)| r));
        if let Some(r) = d.reply {
            let _ = r.send(response);
        }
        if d.op == Op::Start {
            // The first begins; any later one is refused as busy, as it
            // would have been had it arrived after the start.
            for (req, reply) in std::mem::take(&mut self.after_start) {
                self.on_request(req, reply);
            }
        }
        self.after_op()
    }

    fn on_request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let op = match &req {
            Request::Status => {
                let _ = reply.send(Response::ok(self.status()));
                return;
            }
            Request::Metrics => {
                let text = self.ctx.metrics.render(&self.metrics_snapshot());
                let _ = reply.send(Response::ok(json!({ "text": text })));
                return;
            }
            Request::Resolve { action } => {
                // Passed to the migration that waits in doubt; it answers.
                if let Err(reply) = self.ctx.in_doubt.resolve(*action, reply) {
                    let _ = reply.send(Response::err(ErrorKind::InvalidState, "no migration is in doubt here"));
                }
                return;
            }
            Request::Checkpoint { .. } => Op::Checkpoint,
            Request::Restore { .. } => Op::Restore,
            Request::Migrate { .. } => Op::MigrateOut,
        };
        if self.state == State::Busy(Op::Start) && matches!(op, Op::Checkpoint | Op::MigrateOut) {
            tracing::info!(op = %op, "asked for while the workload starts: begins once the start has ended");
            self.after_start.push((req, reply));
            return;
        }
        let next = match self.state.begin(op) {
            Ok(s) => s,
            Err(r) => {
                let _ = reply.send(refusal(r));
                return;
            }
        };
        self.state = next;
        let ctx = self.ctx.clone();
        let inbox = self.inbox_tx.clone();
        let workload = self.workload.clone();
        match req {
            Request::Status | Request::Metrics | Request::Resolve { .. } => unreachable!(),
            Request::Checkpoint { dir, leave_running, page_server } => {
                let n = workload.expect("running state has a workload");
                tokio::spawn(async move {
                    // As a migration does: new clients wait (held) while
                    // CRIU dumps, so none lands in an accept queue meanwhile.
                    let publisher = ctx.publisher.clone();
                    publisher.hold_and_drain().await;
                    let r = tokio::task::spawn_blocking(move || {
                        let r = checkpoint::checkpoint_to_dir(
                            &ctx.cfg,
                            &ctx.reaper,
                            &ctx.runtime,
                            &n,
                            &dir,
                            leave_running,
                            page_server.as_deref(),
                        );
                        if r.is_ok() && !leave_running {
                            nested::cleanup(&ctx.cfg, &ctx.reaper, &ctx.runtime, &n);
                        }
                        r.map(|t| {
                            (timings_json(&t, &dir), if leave_running { Outcome::Running } else { Outcome::Gone })
                        })
                        .map_err(|e| describe(&e))
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    // Running here still (or after a failure): clients go to it
                    // again; stopped: `on_done` closes the ports.
                    if !matches!(r, Ok((_, Outcome::Gone))) {
                        publisher.direct().await;
                    }
                    let _ =
                        inbox.send(Msg::Done(OpResult { op, reply: Some(reply), result: r, new_workload: None })).await;
                });
            }
            Request::Restore { dir } => {
                tokio::spawn(async move {
                    let r = tokio::task::spawn_blocking(move || {
                        checkpoint::restore_from_dir(&ctx.cfg, &ctx.reaper, &ctx.runtime, &dir)
                    })
                    .await;
                    let (result, new_workload) = match r {
                        Ok(Ok((n, t))) => (Ok((timings_json(&t, &PathBuf::new()), Outcome::Running)), Some(n)),
                        Ok(Err(e)) => (Err(describe(&e)), None),
                        Err(e) => (Err(e.to_string()), None),
                    };
                    let _ = inbox.send(Msg::Done(OpResult { op, reply: Some(reply), result, new_workload })).await;
                });
            }
            Request::Migrate { to, mode, no_post_copy } => {
                let n = workload.expect("running state has a workload");
                let how = crate::supervisor::control::MigrateHow { mode, no_post_copy };
                tokio::spawn(async move {
                    let result = match (ctx.migrate_out)(ctx.clone(), n, to, how).await {
                        Ok((mut report, finish)) => {
                            // Answered once this outer is a standby again, so
                            // that a migration back is never refused as busy.
                            report["finish_ms"] = json!(finish.await);
                            Ok((report, Outcome::Gone))
                        }
                        Err(e) => Err(e),
                    };
                    let _ =
                        inbox.send(Msg::Done(OpResult { op, reply: Some(reply), result, new_workload: None })).await;
                });
            }
        }
    }
}

fn timings_json(t: &Timings, dir: &std::path::Path) -> serde_json::Value {
    let mut v = serde_json::to_value(t).expect("timings serialize");
    if !dir.as_os_str().is_empty() {
        v["dir"] = json!(dir);
    }
    v
}

/// Grace period helper for the CLI.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let x: f64 = num.trim().parse().map_err(|_| format!("bad duration {s:?} (like 10s, 500ms, 2m)"))?;
    if !(0.0..=86400.0).contains(&(x * mul)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(x * mul))
}

/// An error and its causes on one line, for replies and logs.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
