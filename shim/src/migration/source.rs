//! The source side of a migration: pre-migration handshake, freeze and dump
//! with streaming, manifest, and the decision to kill or thaw.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::compress::{self, Codec};
use super::in_doubt::{self, Resolution, Settled};
use super::pagedelta::Held;
use super::postcopy::{self, Mode};
use super::precopy::{self, Stop, StopRule};
use super::streamer::{self, Out};
use super::wire::{self, Frame, Kind, WireError};
use super::{FileEntry, FileKind, Hello, HelloOk, Manifest, MigrationResult, RoundEnd, RoundOk};
use crate::image::oci_layout::OciLayout;
use crate::supervisor::control::Response;
use crate::supervisor::Ctx;
use crate::workload::checkpoint::{self, ms, CheckpointError, Timings};
use crate::workload::nested::{self, Nested};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot reach the peer {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pre-migration: {0}")]
    Pre(#[source] WireError),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("workload image: {0}")]
    Image(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("streaming the checkpoint: {0}")]
    Stream(String),
    #[error("transfer: {0}")]
    Transfer(#[source] WireError),
    #[error("the destination could not restore: {0}")]
    Restore(String),
    /// Settled by an operator (`ums resolve --thaw`): the workload already
    /// runs here again.
    #[error("{0}")]
    Resolved(String),
    #[error("post-copy failed: {0}")]
    PostCopy(String),
}

impl MigrateError {
    /// A short label for the metrics (`ums_migrations_failed_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            MigrateError::Connect { .. } => "connect",
            MigrateError::Pre(_) => "pre_migration",
            MigrateError::Refused(_) => "refused",
            MigrateError::Image(_) => "image",
            MigrateError::Checkpoint(_) => "checkpoint",
            MigrateError::Stream(_) => "stream",
            MigrateError::Transfer(_) => "transfer",
            MigrateError::Restore(_) => "restore",
            MigrateError::Resolved(_) => "resolved",
            MigrateError::PostCopy(_) => "post_copy",
        }
    }
}

/// Frames (data chunks of up to `wire::CHUNK`) queued for the writer.
const OUT_QUEUE: usize = 8;

/// The single writer of a peer connection: frames arrive on a channel, in
/// order; data is flushed whenever the channel runs dry.
async fn writer(
    mut w: BufWriter<super::transport::PeerWrite>,
    mut rx: mpsc::Receiver<Out>,
    codec: Arc<Codec>,
) -> Result<u64, WireError> {
    let mut bytes = 0u64;
    while let Some(o) = rx.recv().await {
        match o {
            Out::Control(f) => {
                wire::send(&mut w, &f).await?;
                w.flush().await?;
                continue;
            }
            Out::Flushed(done) => {
                w.flush().await?;
                let _ = done.send(Instant::now());
                continue;
            }
            Out::Open(f) => wire::send(&mut w, &Frame::json(Kind::FileOpen, &f)).await?,
            Out::Data { id, offset, bytes: b } => {
                // zstd, when agreed and when it pays (compress.rs), off the async threads.
                let (z, b) = match codec.level() {
                    0 => (None, b),
                    _ => {
                        let c = codec.clone();
                        tokio::task::spawn_blocking(move || (c.pack(&b), b)).await.map_err(std::io::Error::other)?
                    }
                };
                let sent = match &z {
                    Some(z) => {
                        let h = wire::dataz_header(id, offset, b.len() as u32);
                        wire::write_frame(&mut w, Kind::DataZ, &[&h, z]).await?;
                        h.len() + z.len()
                    }
                    None => {
                        let h = wire::data_header(id, offset);
                        wire::write_frame(&mut w, Kind::Data, &[&h, &b]).await?;
                        h.len() + b.len()
                    }
                };
                codec.count(b.len(), sent, z.is_some());
                bytes += sent as u64;
            }
        }
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    Ok(bytes)
}

fn resident_bytes(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|p| procfs::process::Process::new(*p).ok()?.status().ok()?.vmrss).sum::<u64>() * 1024
}

/// Migrate the workload `n` to the peer at `to`. On success the workload runs
/// at the destination and the report says how it went; the frozen copy here
/// is ended by running the returned [`Finish`]. On failure the workload runs
/// here as before.
pub async fn migrate_out(
    ctx: &Ctx,
    n: &Arc<Nested>,
    to: &str,
    mode: Mode,
    link_bytes_s: Option<f64>,
) -> Result<(serde_json::Value, Finish), MigrateError> {
    use tracing::Instrument;
    let migration_id = format!("m-{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("migrate", peer = %to, workload = %n.id, id = %migration_id, mode = mode.as_str());
    migrate(ctx, n, to, migration_id, (mode, link_bytes_s)).instrument(span).await
}

/// An open connection to the destination after pre-migration.
struct Session {
    r: super::transport::PeerRead,
    tx: mpsc::Sender<Out>,
    writer_task: tokio::task::JoinHandle<Result<u64, WireError>>,
    peer: String,
    blob_bytes: u64,
    missing_blobs: usize,
    /// Compression of the data chunks (level 0 until agreed).
    codec: Arc<Codec>,
}

/// Pre-migration (UMS III-B): connect, say hello, send the blobs the
/// destination lacks, and wait until it has the image ready. The workload is
/// not touched.
async fn pre_migration(
    ctx: &Ctx,
    n: &Nested,
    to: &str,
    migration_id: &str,
    (mode, link_bytes_s): (Mode, Option<f64>),
) -> Result<Session, MigrateError> {
    let cfg = &ctx.cfg;
    let facts = postcopy::host_facts();
    if mode == Mode::PostCopy {
        postcopy::check_source(facts).map_err(MigrateError::Refused)?;
    }
    let layout = cfg
        .layout_candidates()
        .into_iter()
        .filter_map(|d| OciLayout::open(&d).ok())
        .find(|l| l.resolve().map(|i| i.manifest_digest == n.image.manifest_digest).unwrap_or(false))
        .ok_or_else(|| {
            MigrateError::Image(format!("the workload image {} is in no layout here", n.image.manifest_digest))
        })?;
    let img = layout.resolve().map_err(|e| MigrateError::Image(e.to_string()))?;
    let blobs = layout.image_blobs(&img);
    let manifest_size = blobs.iter().find(|(d, _)| *d == img.manifest_digest).map(|b| b.1).unwrap_or(0);
    let conn = super::transport::connect(cfg, to, cfg.peer_read_timeout)
        .await
        .map_err(|source| MigrateError::Connect { peer: to.into(), source })?;
    let peer = conn.peer.clone();
    tracing::info!(identity = %peer, "connected to the peer");
    let (mut r, w) = (conn.read, conn.write);
    // At most this many 1 MiB chunks wait for the socket: enough to keep it
    // busy while the streamer reads, and a bound on ums's memory (issue 7:
    // at most 32 MiB beyond socket buffers while migrating).
    let (tx, rx) = mpsc::channel::<Out>(OUT_QUEUE);
    // Small on purpose, as on the receiving side: a chunk larger than the
    // buffer goes straight to the TLS stream instead of being copied first.
    let codec = Arc::new(Codec::default());
    super::progress::attach(&codec);
    super::progress::phase("pre-migration", None);
    let writer_task = tokio::spawn(writer(BufWriter::with_capacity(wire::SMALL_BUF, w), rx, codec.clone()));
    let send = |f: Frame| {
        let tx = tx.clone();
        async move { tx.send(Out::Control(f)).await.map_err(|_| WireError::Closed) }
    };
    let hello = Hello {
        protocol: wire::PROTOCOL_VERSION,
        migration_id: migration_id.to_string(),
        ums_version: env!("CARGO_PKG_VERSION").into(),
        image: n.image.clone(),
        blobs: blobs.clone(),
        manifest_size,
        runtime: cfg.runtime,
        memory_bytes: resident_bytes(&nested::pids(n.pid)),
        tcp_established: n.settings.tcp_established,
        cpu_features: Some(super::cpu::local(&cfg.cpu_hide).into_iter().collect()),
        post_copy: mode == Mode::PostCopy,
        pre_copy: mode == Mode::PreCopy,
        compression: (cfg.compress != compress::Policy::Off).then(|| "zstd".to_string()),
        witness: cfg.witness.clone(),
    };
    send(Frame::json(Kind::Hello, &hello)).await.map_err(MigrateError::Pre)?;
    let ok: HelloOk =
        match wire::read_frame_within(&mut r, cfg.peer_read_timeout).await.and_then(|f| f.expect(Kind::HelloOk)) {
            Ok(ok) => ok,
            Err(WireError::Peer(m)) => return Err(MigrateError::Refused(m)),
            Err(e) => return Err(MigrateError::Pre(e)),
        };
    if mode == Mode::PostCopy {
        postcopy::check_criu_versions(&facts.criu_version, &ok.criu_version).map_err(MigrateError::Refused)?;
    }
    if ok.compression.as_deref() == Some("zstd") {
        let policy = cfg.compress;
        let speeds = tokio::task::spawn_blocking(compress::speeds).await.unwrap_or(&[]);
        codec.set_level(compress::choose_level(policy, link_bytes_s, speeds));
        tracing::info!(level = codec.level(), link_bytes_s, "zstd on the wire");
    }
    if let (Some(w), false) = (&cfg.witness, ok.witness) {
        return Err(MigrateError::Refused(format!(
            "the destination does not commit at the witness {w} (an older ums?): a partition could then leave the \
             workload running twice; upgrade it, or migrate without --witness"
        )));
    }
    // Exactly the missing blobs, each one of ours.
    let blobs_sent: Result<u64, MigrateError> = async {
        let mut blob_bytes = 0u64;
        for (i, d) in ok.missing_blobs.iter().enumerate() {
            if !blobs.iter().any(|(b, _)| b == d) {
                return Err(MigrateError::Refused(format!("peer asked for a blob that is not part of the image: {d}")));
            }
            let path = layout.blob_path(d).map_err(|e| MigrateError::Image(e.to_string()))?;
            let (tx2, d2) = (tx.clone(), d.clone());
            let entry = tokio::task::spawn_blocking(move || {
                streamer::send_file(&path, i as u32 + 1, FileKind::Blob, &d2, &tx2)
            })
            .await
            .map_err(|e| MigrateError::Stream(e.to_string()))?
            .map_err(|e| MigrateError::Stream(e.to_string()))?;
            blob_bytes += entry.size;
        }
        send(Frame::json(Kind::BlobsDone, &json!({}))).await.map_err(MigrateError::Pre)?;
        Ok(blob_bytes)
    }
    .await;
    let blob_bytes = match blobs_sent {
        Ok(b) => b,
        Err(e) => return Err(peer_reason(&mut r).await.map(MigrateError::Refused).unwrap_or(e)),
    };
    // The destination unpacks the image now, sending heartbeats meanwhile.
    wire::read_frame_live(&mut r, cfg.peer_read_timeout)
        .await
        .and_then(|f| f.expect::<serde_json::Value>(Kind::Ready))
        .map_err(|e| match e {
            WireError::Peer(m) => MigrateError::Refused(m),
            e => MigrateError::Pre(e),
        })?;
    Ok(Session { r, tx, writer_task, peer, blob_bytes, missing_blobs: ok.missing_blobs.len(), codec })
}

/// The migration in its phases: pre-migration (the workload untouched),
/// freeze and stream, commit (manifest, then the destination's `Result`),
/// settle (what a failure after the freeze means: thaw here, or the
/// destination runs it), post-migration (clients to the destination).
async fn migrate(
    ctx: &Ctx,
    n: &Arc<Nested>,
    to: &str,
    migration_id: String,
    (mode, link_bytes_s): (Mode, Option<f64>),
) -> Result<(serde_json::Value, Finish), MigrateError> {
    let t_start = Instant::now();
    // A workload restored lazily here may still be paging in from its local
    // images: dump it only once its memory is all there.
    let _ = tokio::task::spawn_blocking(|| checkpoint::wait_paging_in(Duration::from_secs(30))).await;
    let mut session = pre_migration(ctx, n, to, &migration_id, (mode, link_bytes_s)).await?;
    let pre_ms = ms(t_start.elapsed());
    tracing::info!(
        pre_ms,
        missing_blobs = session.missing_blobs,
        blob_bytes = session.blob_bytes,
        "pre-migration done"
    );

    let dir = ctx.cfg.images_root().join(&migration_id);
    let cleanup_dir = scopeguard_dir(dir.clone());
    // Pre-copy: rounds while the workload runs; any failure leaves it
    // running here, never frozen.
    let mut rounds = match mode {
        Mode::PreCopy => match live_rounds(ctx, n, &dir, &mut session).await {
            Ok(r) => Some(r),
            Err(e) => {
                session.writer_task.abort();
                return Err(e);
            }
        },
        _ => None,
    };
    let held = rounds.as_mut().map(|r| std::mem::take(&mut r.held));
    let expected = (mode == Mode::StopCopy).then(|| resident_bytes(&nested::pids(n.pid)));
    super::progress::phase("frozen: dump and transfer", expected);
    let mut frozen = freeze_and_stream(ctx, n, &dir, &session.tx, mode).await?;
    // Post-copy: the page link to the destination, open while the rest of
    // the checkpoint streams, so its lazy-pages daemon finds it.
    let mut lazy = frozen.lazy.take();
    let pages = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let resumes = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut link = lazy.as_ref().map(|(_, at)| {
        let (cfg, to, id) = ((*ctx.cfg).clone(), to.to_string(), migration_id.clone());
        tokio::spawn(postcopy::source_link(cfg, to, id, *at, pages.clone(), resumes.clone()))
    });
    // From here the workload is frozen: every failure path must thaw it,
    // unless the destination may run it (settle decides).
    let mut sent = None;
    let committed =
        commit(ctx, n, &dir, &mut session, (frozen.streamer.take(), &frozen.flows), held, frozen.t_freeze, &mut sent)
            .await;
    let committed = match settle(
        ctx,
        n,
        (to, mode),
        &migration_id,
        &mut session.r,
        committed,
        sent,
        (frozen.t_freeze, frozen.freeze_unix_ms),
    )
    .await
    {
        Ok(c) => c,
        Err(e @ MigrateError::Resolved(_)) => {
            // `settle` thawed it already, on the operator's word; a lazy dump
            // still holding it ends now, and the workload is resumed again.
            if let Some((d, at)) = lazy.take() {
                end_lazy_dump(d, link.take(), at).await;
                thaw(ctx, n).await;
            }
            session.writer_task.abort();
            return Err(e);
        }
        Err(e) => {
            tracing::warn!(error = %e, "migration failed; thawing the workload here");
            if let Some((d, at)) = lazy.take() {
                end_lazy_dump(d, link.take(), at).await;
            }
            thaw(ctx, n).await;
            session.writer_task.abort();
            return Err(e);
        }
    };
    // Downtime: until the workload ran at the destination (after a doubt, by
    // its word), not until we heard of it.
    let frozen_for = committed.ran_after.unwrap_or_else(|| frozen.t_freeze.elapsed());
    // ---- post-migration: the destination runs it. Clients go there; the
    // frozen copy here is ended by `Finish`, outside the reported time.
    match tokio::net::lookup_host(to).await.ok().and_then(|mut a| a.next()) {
        Some(sa) => ctx.publisher.forward_to(sa.ip()).await,
        None => ctx.publisher.close().await,
    }
    let relayed = frozen.flows.len();
    let flows = std::mem::take(&mut frozen.flows);
    crate::net::relay::start_out(ctx.cfg.clone(), ctx.reaper.clone(), to.into(), migration_id.clone(), flows);
    // Post-copy: the frozen copy here holds memory the destination still
    // fetches; it ends only once the destination has every page.
    let pages_at_running = pages.load(std::sync::atomic::Ordering::Relaxed);
    let mut last_page = frozen_for;
    let mut done = None;
    if let (Some((d, at)), Some(l)) = (lazy.take(), link.take()) {
        super::progress::phase("post-copy: it runs there, its memory follows", None);
        match post_copy(ctx, to, &migration_id, &mut session.r, l, d, at).await {
            Ok(d) => (last_page, done) = (frozen.t_freeze.elapsed(), d),
            Err((e, thaw_here)) => {
                session.writer_task.abort();
                if thaw_here {
                    tracing::warn!(error = %e, "post-copy failed and the destination ended its copy; thawing here");
                    let (c2, n2) = (ctx.clone(), n.clone());
                    let _ = tokio::task::spawn_blocking(move || checkpoint::thaw(&c2.reaper, &c2.runtime, &n2)).await;
                    ctx.publisher.direct().await;
                } else {
                    tracing::error!(error = %e, "post-copy failed; the destination's state is unknown: the workload \
                                                stays frozen here");
                }
                return Err(e);
            }
        }
    }
    let page_bytes = pages.load(std::sync::atomic::Ordering::Relaxed);
    let Session { tx, writer_task, peer, blob_bytes, codec, .. } = session;
    drop(tx);
    // A writer stuck on a dead connection (after a doubt) is not waited for.
    let wire_bytes = match tokio::time::timeout(Duration::from_secs(1), writer_task).await {
        Ok(Ok(Ok(b))) => b,
        _ => committed.bytes,
    };
    let total = t_start.elapsed();
    // Transfer: until the last byte was handed to the socket, counted from the
    // start of the dump when streaming (they overlap), from its end otherwise.
    let transfer_from = if frozen.live { Duration::ZERO } else { frozen.dump_end };
    let transfer_s = (committed.sent_at.saturating_sub(transfer_from)).as_secs_f64().max(1e-6);
    let (t, res) = (&frozen.timings, &committed.result);
    let report = json!({
        "migration_id": migration_id,
        "mode": mode.as_str(),
        "downtime_ms": ms(frozen_for),
        "last_page_ms": ms(last_page),
        "bytes_before_running": committed.bytes + pages_at_running,
        "bytes_after_running": page_bytes - pages_at_running,
        "page_link_resumes": resumes.load(std::sync::atomic::Ordering::Relaxed),
        "pages_on_fault": done.as_ref().map(|d| d.pages_on_fault),
        "pages_in_background": done.as_ref().map(|d| d.pages_copied.saturating_sub(d.pages_on_fault)),
        "peer": peer,
        "streaming": frozen.live,
        "pre_migration_ms": pre_ms,
        "freeze_ms": t.freeze_ms,
        "checkpoint_ms": t.dump_ms,
        "checkpoint_end_ms": ms(frozen.dump_end),
        "listen_drain_ms": t.listen_drain_ms,
        "in_flight_skipped": t.in_flight_skipped,
        "relayed_connections": relayed,
        "closed_connections": frozen.closed,
        "rootfs_diff_ms": committed.diff_ms,
        "transfer_ms": ms(Duration::from_secs_f64(transfer_s)),
        "verify_ms": res.verify_ms,
        "restore_ms": res.restore_ms,
        "frozen_ms": ms(frozen_for),
        "in_doubt_ms": committed.in_doubt_ms,
        "total_ms": ms(total),
        "bytes": committed.bytes,
        "wire_bytes": wire_bytes,
        "blob_bytes": blob_bytes,
        "throughput_mib_s": (committed.bytes as f64 / 1048576.0) / transfer_s,
        "compression": codec.report(),
    });
    let mut report = report;
    if let Some(r) = &rounds {
        let live_bytes: u64 = r.report.iter().filter_map(|l| l["bytes"].as_u64()).sum();
        report["rounds"] = json!(r.report);
        report["live_bytes"] = json!(live_bytes);
        report["stop_reason"] = json!(r.stop.as_str());
        report["link_rate_mib_s"] = json!(r.rate.map(|b| b / 1048576.0));
        // The final round: its own figures, and the freeze it cost.
        let mut fin = serde_json::to_value(committed.final_round).unwrap_or_default();
        if fin.is_object() {
            fin["round"] = json!(r.report.len() + 1);
            fin["dump_ms"] = json!(t.dump_ms);
            fin["freeze_ms"] = json!(ms(frozen_for));
        }
        report["final_round"] = fin;
    }
    tracing::info!(total_ms = ms(total), frozen_ms = ms(frozen_for), bytes = committed.bytes, "migration done");
    ctx.metrics.bytes_sent(wire_bytes + page_bytes);
    ctx.metrics.data_bytes_sent(codec.raw.load(std::sync::atomic::Ordering::Relaxed) + page_bytes);
    ctx.metrics.postcopy_page_bytes(crate::metrics::Direction::Out, page_bytes);
    Ok((report, Finish { ctx: ctx.clone(), n: n.clone(), images: cleanup_dir }))
}

/// Pre-copy: the rounds while the workload runs.
struct Rounds {
    /// What the destination holds after the last round, per pagemap.
    held: HashMap<String, Held>,
    report: Vec<serde_json::Value>,
    stop: Stop,
    rate: Option<f64>,
}

/// Send the files of the dump in `images` against what the destination
/// holds (`held`): deltas for the pages it holds, the rest whole. Blocking.
fn send_round(
    images: &Path,
    deltas: &Path,
    held: &HashMap<String, Held>,
    tx: &mpsc::Sender<Out>,
) -> Result<(precopy::Prepared, Vec<FileEntry>), MigrateError> {
    let p = precopy::prepare(images, deltas, held).map_err(MigrateError::Stream)?;
    let mut files = Vec::with_capacity(p.sends.len());
    for (i, f) in p.sends.iter().enumerate() {
        let e = streamer::send_file(&f.path, i as u32 + 1, f.kind, &f.name, tx)
            .map_err(|e| MigrateError::Stream(e.to_string()))?;
        files.push(e);
    }
    Ok((p, files))
}

/// Pre-copy: dump with the tasks left running (CRIU freezes them only while
/// it dumps), send what the destination lacks, wait for its `RoundOk`; again
/// until the stop rule says the final, frozen round is due. The workload is
/// never frozen by us here: on any failure it simply runs on.
async fn live_rounds(ctx: &Ctx, n: &Arc<Nested>, dir: &Path, session: &mut Session) -> Result<Rounds, MigrateError> {
    let cfg = &ctx.cfg;
    if n.uid != 0 && !crate::sys::has_cap_sys_resource() {
        return Err(CheckpointError::NeedsSysResource(n.uid).into());
    }
    let mut rule = StopRule::new(cfg.precopy_target_freeze, cfg.precopy_rounds);
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut report = Vec::new();
    let mut expected = resident_bytes(&nested::pids(n.pid));
    for round in 1u32.. {
        super::progress::phase(&format!("pre-copy round {round} (the workload runs)"), Some(expected));
        let rdir = dir.join(format!("round-{round}"));
        let images = rdir.join("criu");
        std::fs::create_dir_all(&images).map_err(|e| MigrateError::Stream(format!("{}: {e}", images.display())))?;
        let t_dump = Instant::now();
        let (c2, n2, im2, work) = (ctx.clone(), n.clone(), images.clone(), rdir.join("work"));
        tokio::task::spawn_blocking(move || {
            let opts = crate::process::runtime::CheckpointOpts {
                image_path: im2,
                work_path: work,
                leave_running: true,
                tcp_established: n2.settings.tcp_established,
                ..Default::default()
            };
            c2.runtime.checkpoint(&c2.reaper, &n2.id, &opts)
        })
        .await
        .map_err(|e| MigrateError::Stream(e.to_string()))?
        .map_err(|e| MigrateError::Checkpoint(CheckpointError::Dump(e)))?;
        let dump_ms = ms(t_dump.elapsed());
        // CRIU's own count of how long the tasks were frozen.
        let pause_ms = std::fs::read(rdir.join("work").join("stats-dump"))
            .or_else(|_| std::fs::read(images.join("stats-dump")))
            .ok()
            .and_then(|b| super::pagedelta::frozen_time_us(&b))
            .map(|us| us as f64 / 1000.0);
        let t_send = Instant::now();
        let (tx, im2, d2, h2) = (session.tx.clone(), images.clone(), rdir.join("delta"), held.clone());
        let sent = tokio::task::spawn_blocking(move || send_round(&im2, &d2, &h2, &tx))
            .await
            .map_err(|e| MigrateError::Stream(e.to_string()))?;
        let (p, files) = match sent {
            Ok(v) => v,
            Err(e) => return Err(peer_reason(&mut session.r).await.map(MigrateError::Refused).unwrap_or(e)),
        };
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        // The next round's delta is about this one's.
        expected = bytes;
        let end = RoundEnd { round, files, pages: p.pages.clone() };
        session
            .tx
            .send(Out::Control(Frame::json(Kind::RoundEnd, &end)))
            .await
            .map_err(|_| MigrateError::Transfer(WireError::Closed))?;
        let ok: RoundOk = wire::read_frame_live(&mut session.r, cfg.peer_read_timeout)
            .await
            .and_then(|f| f.expect(Kind::RoundOk))
            .map_err(|e| match e {
                WireError::Peer(m) => MigrateError::Refused(m),
                e => MigrateError::Transfer(e),
            })?;
        let took = t_send.elapsed();
        held = p.held;
        let _ = std::fs::remove_dir_all(&rdir);
        let stop = rule.after_round(bytes, took);
        let line = json!({
            "round": round,
            "bytes": bytes,
            "pages": p.pages_total,
            "pages_sent": p.pages_sent,
            "pause_ms": pause_ms.unwrap_or(dump_ms),
            "dump_ms": dump_ms,
            "send_ms": ms(took),
            "rebuild_ms": ok.rebuild_ms,
        });
        tracing::info!(%line, "pre-copy round done");
        report.push(line);
        if let Some(stop) = stop {
            tracing::info!(
                reason = stop.as_str(),
                rate_mib_s = rule.rate().unwrap_or(0.0) / 1048576.0,
                "pre-copy: the final round"
            );
            return Ok(Rounds { held, report, stop, rate: rule.rate() });
        }
    }
    unreachable!("the stop rule ends the rounds at the limit")
}

/// The workload frozen and dumped, its images streaming to the destination.
struct Frozen {
    /// Stop-copy and post-copy: the images as CRIU writes them. Pre-copy
    /// sends after the dump, against what the destination holds.
    streamer: Option<streamer::Streamer>,
    timings: Timings,
    t_freeze: Instant,
    /// The freeze on the wall clock (Unix ms), to compare with the
    /// destination's word on when the workload ran there.
    freeze_unix_ms: u64,
    /// From the freeze until CRIU finished the dump.
    dump_end: Duration,
    /// Streaming while CRIU writes (the default), or dump first, then send.
    live: bool,
    /// Post-copy: the lazy dump, whose CRIU serves the memory at this address.
    lazy: Option<(checkpoint::LazyDump, std::net::SocketAddr)>,
    /// Client connections the dump took along, relayed after the move.
    flows: Vec<crate::net::relay::Flow>,
    /// Client connections that could not be taken along (proxied ones open
    /// at the freeze): closed when the workload has left.
    closed: usize,
}

/// Freeze and dump: new clients wait from here; CRIU dumps into `dir/criu`
/// while the streamer sends what it writes. On failure the workload runs
/// here again and nothing was committed.
async fn freeze_and_stream(
    ctx: &Ctx,
    n: &Arc<Nested>,
    dir: &Path,
    tx: &mpsc::Sender<Out>,
    mode: Mode,
) -> Result<Frozen, MigrateError> {
    let images = dir.join("criu");
    std::fs::create_dir_all(&images).map_err(|e| MigrateError::Stream(format!("{}: {e}", images.display())))?;
    let live = ctx.cfg.streaming;
    // Post-copy: CRIU serves the memory at a loopback port after the dump.
    let lazy_at = match mode {
        Mode::PostCopy => Some(postcopy::free_loopback_port().map_err(|e| MigrateError::Stream(e.to_string()))?),
        Mode::StopCopy | Mode::PreCopy | Mode::Auto => None,
    };
    // Clients: new connections wait from here on; those in flight may finish.
    // With its established connections dumped, the ones the kernel forwarded
    // move along (relayed afterwards): only the proxy's need to finish.
    let carry = n.settings.tcp_established;
    let still_open =
        if carry { ctx.publisher.hold_and_drain_proxied().await } else { ctx.publisher.hold_and_drain().await };
    if still_open > 0 {
        tracing::info!(still_open, "connections still open at the freeze; they end when the workload has left");
    }
    let t_freeze = Instant::now();
    let freeze_unix_ms = super::outcomes::now_ms();
    let s = match mode {
        Mode::PreCopy => None,
        _ => match streamer::start(&images, 1000, tx.clone(), live) {
            Ok(s) => Some(s),
            Err(e) => {
                ctx.publisher.direct().await;
                return Err(MigrateError::Stream(e.to_string()));
            }
        },
    };
    let (c2, n2, images2, work) = (ctx.clone(), n.clone(), images.clone(), dir.join("work"));
    let dumped = tokio::task::spawn_blocking(move || {
        let mut t = Timings::default();
        match lazy_at {
            Some(at) => checkpoint::freeze_and_dump_lazy(
                &c2.reaper,
                &c2.runtime,
                &c2.cfg,
                &n2,
                &images2,
                &work,
                &at.to_string(),
                &mut t,
            )
            .map(|d| (t, Some(d))),
            None => checkpoint::freeze_and_dump(&c2.cfg, &c2.reaper, &c2.runtime, &n2, &images2, &work, &mut t)
                .map(|_| (t, None)),
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(CheckpointError::Freeze(crate::process::exec::ExecError::Lost { program: format!("dump task: {e}") }))
    });
    match dumped {
        Ok((timings, lazy)) => Ok(Frozen {
            streamer: s,
            timings,
            t_freeze,
            freeze_unix_ms,
            dump_end: t_freeze.elapsed(),
            live,
            lazy: lazy.zip(lazy_at),
            // Frozen: the connections open now are those in the dump.
            flows: match carry {
                true => crate::net::relay::at_dump(&ctx.publisher, ctx.cfg.net.address, n.pid).await,
                false => Vec::new(),
            },
            closed: still_open,
        }),
        Err(e) => {
            if let Some(s) = s {
                tokio::task::spawn_blocking(move || s.abort()).await.ok();
            }
            ctx.publisher.direct().await;
            let msg = Frame::json(Kind::Error, &wire::ErrorMsg { message: format!("source: {e}") });
            let _ = tx.send(Out::Control(msg)).await;
            Err(e.into())
        }
    }
}

/// What the destination answered to the manifest.
struct Committed {
    bytes: u64,
    result: MigrationResult,
    /// From the freeze until the last byte was handed to the socket.
    sent_at: Duration,
    diff_ms: f64,
    /// After a doubt: from the freeze until the workload ran at the destination.
    ran_after: Option<Duration>,
    /// Time spent in doubt.
    in_doubt_ms: f64,
    /// Pre-copy: what the frozen round sent.
    final_round: Option<FinalRound>,
}

/// Pre-copy: the final round, sent while the workload is frozen.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct FinalRound {
    pages: u64,
    pages_sent: u64,
    bytes: u64,
    /// From the end of the dump until its files were queued: the delta
    /// computed and sent.
    send_ms: f64,
}

/// The manifest handed to the connection: the destination may restore.
#[derive(Clone, Copy)]
struct Sent {
    bytes: u64,
    /// From the freeze until it was flushed, when that is known.
    flushed_at: Option<Duration>,
}

async fn thaw(ctx: &Ctx, n: &Arc<Nested>) {
    let (c2, n2) = (ctx.clone(), n.clone());
    let _ = tokio::task::spawn_blocking(move || checkpoint::thaw(&c2.reaper, &c2.runtime, &n2)).await;
    ctx.publisher.direct().await;
}

/// Commit: the rest of the images and the writable layer, then the
/// manifest (the commit point: from here the destination may run the
/// workload), then the destination's `Result`.
#[allow(clippy::too_many_arguments)]
async fn commit(
    ctx: &Ctx,
    n: &Arc<Nested>,
    dir: &Path,
    session: &mut Session,
    (s, flows): (Option<streamer::Streamer>, &[crate::net::relay::Flow]),
    held: Option<HashMap<String, Held>>,
    t_freeze: Instant,
    sent: &mut Option<Sent>,
) -> Result<Committed, MigrateError> {
    let tx = session.tx.clone();
    let mut final_round = None;
    let mut pages = Vec::new();
    let mut files = match (s, held) {
        (Some(s), _) => {
            tokio::task::spawn_blocking(move || s.finish())
                .await
                .map_err(|e| MigrateError::Stream(e.to_string()))?
                .map_err(|e| MigrateError::Stream(e.to_string()))?
                .0
        }
        (None, Some(held)) => {
            // Pre-copy: only what changed since the last round.
            let t = Instant::now();
            let (images, deltas, tx2) = (dir.join("criu"), dir.join("delta"), tx.clone());
            let (p, files) = tokio::task::spawn_blocking(move || send_round(&images, &deltas, &held, &tx2))
                .await
                .map_err(|e| MigrateError::Stream(e.to_string()))??;
            pages = p.pages.clone();
            final_round = Some(FinalRound {
                pages: p.pages_total,
                pages_sent: p.pages_sent,
                bytes: files.iter().map(|f| f.size).sum(),
                send_ms: ms(t.elapsed()),
            });
            files
        }
        (None, None) => return Err(MigrateError::Stream("nothing streams the images".into())),
    };
    let t_diff = Instant::now();
    let diff_path = dir.join("rootfs-diff.tar");
    let (upper, dp, tx2) = (n.bundle.upper(), diff_path.clone(), tx.clone());
    let diff_entry = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let f = std::fs::File::create(&dp).map_err(|e| e.to_string())?;
        crate::image::upper_diff::pack(&upper, std::io::BufWriter::with_capacity(1 << 20, f))
            .map_err(|e| e.to_string())?;
        streamer::send_file(&dp, 999, FileKind::UpperDiff, "rootfs-diff.tar", &tx2).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| MigrateError::Stream(e.to_string()))?
    .map_err(MigrateError::Stream)?;
    let diff_ms = ms(t_diff.elapsed());
    files.push(diff_entry);
    let meta = checkpoint::Meta { relay_flows: flows.to_vec(), ..checkpoint::meta(&ctx.cfg, n) };
    let manifest = Manifest { files, meta, pages };
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    // From here on the destination may restore: only its word settles it.
    *sent = Some(Sent { bytes, flushed_at: None });
    tx.send(Out::Control(Frame::json(Kind::Manifest, &manifest)))
        .await
        .map_err(|_| MigrateError::Transfer(WireError::Closed))?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tx.send(Out::Flushed(done_tx)).await.map_err(|_| MigrateError::Transfer(WireError::Closed))?;
    let sent_at = done_rx.await.map(|t| t.duration_since(t_freeze)).unwrap_or_else(|_| t_freeze.elapsed());
    *sent = Some(Sent { bytes, flushed_at: Some(sent_at) });
    super::progress::phase("frozen: the destination verifies and restores", None);
    // The destination verifies and restores, sending heartbeats meanwhile.
    let result: MigrationResult = wire::read_frame_live(&mut session.r, ctx.cfg.peer_read_timeout)
        .await
        .and_then(|f| f.expect(Kind::Result))
        .map_err(|e| match e {
            WireError::Peer(m) => MigrateError::Restore(m),
            e => MigrateError::Transfer(e),
        })?;
    Ok(Committed { bytes, result, sent_at, diff_ms, ran_after: None, in_doubt_ms: 0.0, final_round })
}

/// Settle: a committed migration that runs at the destination succeeds; a
/// failure before the manifest, or the destination's word that it does not
/// run it, is an error, and the caller thaws the workload here. No word after
/// the manifest is no answer: the workload stays frozen, in doubt, until the
/// destination answers a fencing query or an operator decides (`in_doubt`).
#[allow(clippy::too_many_arguments)]
async fn settle(
    ctx: &Ctx,
    n: &Arc<Nested>,
    (to, mode): (&str, Mode),
    migration_id: &str,
    r: &mut super::transport::PeerRead,
    committed: Result<Committed, MigrateError>,
    sent: Option<Sent>,
    (t_freeze, freeze_unix_ms): (Instant, u64),
) -> Result<Committed, MigrateError> {
    // A broken stream is often the destination hanging up with a reason.
    let committed = match committed {
        Err(MigrateError::Stream(m)) => Err(match peer_reason(r).await {
            Some(reason) => MigrateError::Refused(reason),
            None => MigrateError::Stream(m),
        }),
        other => other,
    };
    let e = match (committed, sent) {
        (Ok(c), _) if c.result.running => return Ok(c),
        (Ok(c), _) => return Err(MigrateError::Restore(c.result.error.unwrap_or_else(|| "unknown error".into()))),
        (Err(e @ MigrateError::Transfer(_)), Some(_)) => e,
        (Err(e), _) => return Err(e),
    };
    let sent = sent.expect("matched above");
    let t_doubt = Instant::now();
    let known = vec![
        "the workload is frozen here".to_string(),
        format!("the manifest ({} bytes of checkpoint) was sent to {to}", sent.bytes),
        "no Result came back: the destination may or may not have restored it".to_string(),
    ];
    ctx.metrics.migration_in_doubt(mode);
    let witness = ctx.cfg.witness.as_deref();
    let settled = in_doubt::settle(&ctx.cfg, &ctx.in_doubt, (to, witness), migration_id, e.to_string(), known).await;
    let in_doubt_ms = ms(t_doubt.elapsed());
    let flushed_at = sent.flushed_at.unwrap_or_else(|| t_freeze.elapsed());
    let none = MigrationResult { running: true, error: None, verify_ms: 0.0, restore_ms: 0.0 };
    match settled {
        Settled::Running { since_unix_ms } => {
            tracing::warn!(error = %e, in_doubt_ms, "connection lost, but the destination runs the workload");
            let ran = Duration::from_millis(since_unix_ms.saturating_sub(freeze_unix_ms));
            let ran_after = Some(ran.min(t_freeze.elapsed()));
            Ok(Committed {
                bytes: sent.bytes,
                result: none,
                sent_at: flushed_at,
                diff_ms: 0.0,
                ran_after,
                in_doubt_ms,
                final_round: None,
            })
        }
        Settled::NotRunning => Err(MigrateError::Restore(format!(
            "{e}; the destination then said the workload does not run there, and fenced the migration"
        ))),
        Settled::AbortedAtWitness { witness } => Err(MigrateError::Restore(format!(
            "{e}; the witness {witness} holds `abort` for this migration, so the destination can never restore it"
        ))),
        Settled::Operator(Resolution::Abandon, reply) => {
            tracing::warn!(error = %e, "in doubt; the operator ended the frozen copy here (ums resolve --abandon)");
            let _ = reply.send(Response::ok(json!({
                "migration_id": migration_id,
                "outcome": "the frozen copy here is ended; the workload runs at the destination, or nowhere",
            })));
            Ok(Committed {
                bytes: sent.bytes,
                result: none,
                sent_at: flushed_at,
                diff_ms: 0.0,
                ran_after: None,
                in_doubt_ms,
                final_round: None,
            })
        }
        Settled::Operator(Resolution::Thaw, reply) => {
            tracing::warn!(error = %e, "in doubt; the operator thaws the workload here (ums resolve --thaw)");
            thaw(ctx, n).await;
            in_doubt::stop_remote(ctx.cfg.clone(), ctx.in_doubt.clone(), to.to_string(), migration_id.to_string());
            let _ = reply.send(Response::ok(json!({
                "migration_id": migration_id,
                "outcome": "the workload runs here again; the destination is told to end any copy until it confirms",
            })));
            Err(MigrateError::Resolved(format!(
                "{e}; in doubt, then the operator thawed the workload here (ums resolve --thaw)"
            )))
        }
    }
}

/// What is left of a migration once the destination runs the workload: the
/// frozen copy here and its images. Ending it takes runc and unmounts (tens
/// of milliseconds or more) while the workload already runs elsewhere, so the
/// report's `total_ms` stops before it and [`Finish::run`] says how long it took.
pub struct Finish {
    ctx: Ctx,
    n: Arc<Nested>,
    /// The migration's images dir, removed when this is dropped.
    images: DirGuard,
}

impl Finish {
    /// Ends the frozen copy; returns how long that took, in ms.
    pub async fn run(self) -> f64 {
        let Finish { ctx, n, images } = self;
        let t = Instant::now();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = ctx.runtime.kill(&ctx.reaper, &n.id, "KILL", true);
            nested::cleanup(&ctx.cfg, &ctx.reaper, &ctx.runtime, &n);
        })
        .await;
        drop(images);
        let took = ms(t.elapsed());
        tracing::info!(ms = took, "frozen copy ended");
        took
    }
}

/// After the destination runs a post-copied workload: wait for its
/// `PostCopyDone`, then for the lazy dump here to end. On failure, says
/// whether the destination ended its copy (thaw here) or cannot be known.
async fn post_copy(
    ctx: &Ctx,
    to: &str,
    id: &str,
    r: &mut super::transport::PeerRead,
    mut link: tokio::task::JoinHandle<Result<(), String>>,
    mut dump: checkpoint::LazyDump,
    at: std::net::SocketAddr,
) -> Result<Option<postcopy::PostCopyDone>, (MigrateError, bool)> {
    let mut link_done = false;
    // One read, polled across the loop (a frame read is not cancel-safe).
    let read = wire::read_frame(r);
    tokio::pin!(read);
    let done: Result<postcopy::PostCopyDone, String> = loop {
        tokio::select! {
            f = &mut read => break f.and_then(|f| f.expect(Kind::PostCopyDone)).map_err(|e| e.to_string()),
            l = &mut link, if !link_done => {
                link_done = true;
                if let Err(e) = l.unwrap_or_else(|e| Err(e.to_string())) {
                    break Err(e);
                }
            }
        }
    };
    match done {
        Ok(d) => {
            tracing::info!(page_bytes = d.page_bytes, "post-copy: the destination has every page");
            // CRIU's page server ends once the destination closed: normally at once.
            match tokio::time::timeout(Duration::from_secs(10), &mut dump.exit).await {
                Ok(Ok(e)) if e.success() => {}
                Ok(Ok(e)) => tracing::warn!(error = %dump.failure(e), "the lazy dump ended badly after the last page"),
                _ => {
                    tracing::warn!("the lazy dump did not end after the last page; ending it");
                    postcopy::kill(dump.pid);
                }
            }
            link.abort();
            Ok(Some(d))
        }
        Err(reason) => {
            tracing::warn!(%reason, "post-copy interrupted; asking the destination");
            // The page link, if it still runs, keeps serving pages meanwhile:
            // a destination that gets them all reports the workload running.
            // The destination ends its copy when pages can no longer arrive;
            // until it says so, or says it has them all, ours stays frozen.
            let known = vec![
                "the destination ran the workload, with part of its memory still here".to_string(),
                "the workload here is frozen and holds that memory".to_string(),
                format!("post-copy was interrupted: {reason}"),
            ];
            ctx.metrics.migration_in_doubt(Mode::PostCopy);
            // The destination ran the workload: its commit is on record, so
            // the witness is not asked (in_doubt::settle).
            match in_doubt::settle(&ctx.cfg, &ctx.in_doubt, (to, None), id, reason.clone(), known).await {
                Settled::Running { .. } => {
                    end_lazy_dump(dump, (!link_done).then_some(link), at).await;
                    Ok(None)
                }
                // (AbortedAtWitness cannot come: the witness was not asked.)
                Settled::NotRunning | Settled::AbortedAtWitness { .. } => {
                    end_lazy_dump(dump, (!link_done).then_some(link), at).await;
                    Err((
                        MigrateError::PostCopy(format!(
                            "{reason}; the destination ended its copy, so the workload runs here again from its state \
                             at the freeze (what it did at the destination meanwhile is lost)"
                        )),
                        true,
                    ))
                }
                Settled::Operator(Resolution::Abandon, reply) => {
                    end_lazy_dump(dump, (!link_done).then_some(link), at).await;
                    let _ = reply.send(Response::ok(json!({
                        "migration_id": id,
                        "outcome": "the frozen copy here is ended; the workload runs at the destination, or nowhere",
                    })));
                    Ok(None)
                }
                Settled::Operator(Resolution::Thaw, reply) => {
                    end_lazy_dump(dump, (!link_done).then_some(link), at).await;
                    in_doubt::stop_remote(ctx.cfg.clone(), ctx.in_doubt.clone(), to.to_string(), id.to_string());
                    let _ = reply.send(Response::ok(json!({
                        "migration_id": id,
                        "outcome": "the workload runs here again; the destination is told to end any copy until it confirms",
                    })));
                    Err((
                        MigrateError::Resolved(format!(
                            "{reason}; in doubt during post-copy, then the operator thawed the workload here"
                        )),
                        true,
                    ))
                }
            }
        }
    }
}

/// End a lazy dump that will not complete: close the page link, wake CRIU's
/// page server if nobody connected (it then fails and leaves the tasks
/// frozen), and wait for the runtime to exit; kill it if it does not.
async fn end_lazy_dump(
    mut dump: checkpoint::LazyDump,
    link: Option<tokio::task::JoinHandle<Result<(), String>>>,
    at: std::net::SocketAddr,
) {
    if let Some(l) = link {
        l.abort();
        let _ = l.await;
    }
    if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(at)).await {
        drop(s);
    }
    if tokio::time::timeout(Duration::from_secs(10), &mut dump.exit).await.is_err() {
        tracing::warn!(pid = dump.pid, "the lazy dump does not end; killing it");
        postcopy::kill(dump.pid);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut dump.exit).await;
    }
}

/// The reason the destination gave for hanging up, if it sent one.
async fn peer_reason(r: &mut super::transport::PeerRead) -> Option<String> {
    loop {
        match wire::read_frame_within(r, Duration::from_millis(500)).await {
            Ok(f) if f.kind == Kind::Error => return f.parse::<wire::ErrorMsg>().ok().map(|e| e.message),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Removes a migration's images dir when dropped.
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scopeguard_dir(p: PathBuf) -> DirGuard {
    DirGuard(p)
}
