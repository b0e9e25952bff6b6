//! The destination side: a standby `ums` accepts a peer connection, checks it
//! can host the workload, takes the missing image blobs, prepares the image
//! before the source freezes, receives and verifies the checkpoint, restores
//! it and reports. Whatever fails, it discards what it received and goes back
//! to standby; the source then thaws its copy.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::outcomes::{self, Answer, Outcomes};
use super::postcopy::{self, DestEnd, DestPostCopy};
use super::wire::{self, Frame, Kind, WireError};
use super::{safe_name, FileKind, FileOpen, Hello, HelloOk, Manifest, MigrationResult, PeerState, Query, QueryAnswer};
use crate::image::oci_layout::{self, OciLayout};
use crate::metrics::Direction;
use crate::supervisor::control::MigrationMode;
use crate::supervisor::{Ctx, Msg};
use crate::workload::checkpoint::ms;

/// Peer connections handled at once; more are closed at once (each one costs
/// a TLS handshake, and only one migration can come in at a time anyway).
pub const MAX_PEER_CONNECTIONS: usize = 8;

/// Accept peer connections until shutdown.
pub async fn serve_peers(
    ctx: Ctx,
    listener: TcpListener,
    inbox: mpsc::Sender<Msg>,
    mut shutdown: watch::Receiver<bool>,
) {
    let outcomes = Outcomes::default();
    let witness = super::witness::Store::open(ctx.cfg.state_dir.join("witness.json"));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(peer = %addr, "too many peer connections; closing this one");
                        continue;
                    };
                    let (ctx, inbox, outcomes, witness) =
                        (ctx.clone(), inbox.clone(), outcomes.clone(), witness.clone());
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) = handle(ctx, stream, inbox, outcomes, witness).await {
                            tracing::warn!(peer = %addr, error = %e, "incoming peer connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum InError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Refuse(String),
}

async fn handle(
    ctx: Ctx,
    stream: TcpStream,
    inbox: mpsc::Sender<Msg>,
    outcomes: Outcomes,
    witness: super::witness::Store,
) -> Result<(), InError> {
    let conn = super::transport::accept(&ctx.cfg, stream)
        .await
        .map_err(|e| InError::Refuse(format!("peer connection: {e}")))?;
    let (peer, r, w) = (conn.peer, conn.read, conn.write);
    // Small on purpose: frame headers come from this buffer, and a chunk's
    // payload, larger than it, is read past it straight from the TLS stream
    // (a buffer as large as a chunk meant copying every byte once more).
    let mut r = BufReader::with_capacity(wire::SMALL_BUF, r);
    let mut w = BufWriter::new(w);
    let first = refuse_malformed(&mut w, wire::read_frame_within(&mut r, ctx.cfg.peer_read_timeout).await).await?;
    if first.kind == Kind::Query {
        let q: Query = refuse_malformed(&mut w, first.parse()).await?;
        let answer = answer_query(&q, &outcomes, &inbox).await;
        tracing::info!(peer = %peer, id = %q.migration_id, action = ?q.action, state = ?answer.state, "query answered");
        wire::send_json(&mut w, Kind::QueryAnswer, &answer).await?;
        return Ok(());
    }
    if first.kind == Kind::Probe {
        let received = super::auto::answer_probe(&ctx.cfg, &first, &mut r, &mut w).await?;
        tracing::info!(peer = %peer, received, "link probe answered");
        return Ok(());
    }
    if first.kind == Kind::Relay {
        return crate::net::relay::serve_in(peer, first, r, w).await.map_err(InError::Refuse);
    }
    if first.kind == Kind::WitnessRecord {
        let rec: super::witness::Record = refuse_malformed(&mut w, first.parse()).await?;
        let held = match witness.record(&rec) {
            Ok(h) => h,
            Err(message) => {
                wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: message.clone() }).await?;
                return Err(InError::Refuse(message));
            }
        };
        tracing::info!(peer = %peer, id = %rec.migration_id, asked = ?rec.decision, held = ?held.decision, "witness: decision held");
        wire::send_json(&mut w, Kind::WitnessAnswer, &held).await?;
        return Ok(());
    }
    if first.kind == Kind::PageLink {
        let h: postcopy::PageLinkHello = refuse_malformed(&mut w, first.parse()).await?;
        let link = postcopy::Link { read: Box::new(r), write: Box::new(w), peer_received: h.received };
        if let Err((msg, mut link)) = postcopy::deliver_link(&h.migration_id, link) {
            let _ = wire::send_json(&mut link.write, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await;
            return Err(InError::Refuse(msg));
        }
        tracing::info!(peer = %peer, id = %h.migration_id, resumed_at = h.received, "page link open");
        return Ok(());
    }
    let hello: Hello = refuse_malformed(&mut w, first.expect(Kind::Hello)).await?;
    if hello.protocol != wire::PROTOCOL_VERSION {
        let msg =
            format!("protocol version {} not supported (this ums speaks {})", hello.protocol, wire::PROTOCOL_VERSION);
        wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await?;
        return Err(InError::Refuse(msg));
    }
    if !safe_name(&hello.migration_id) || hello.migration_id.starts_with('.') {
        let msg = format!("bad migration id {:?}", hello.migration_id);
        wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await?;
        return Err(InError::Refuse(msg));
    }
    // Only ever a fresh directory of our own making: never one the peer names twice.
    if std::fs::symlink_metadata(ctx.cfg.images_root().join(&hello.migration_id)).is_ok() {
        let msg = format!("migration id {} is already in use here", hello.migration_id);
        wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await?;
        return Err(InError::Refuse(msg));
    }
    let (tx, rx) = oneshot::channel();
    inbox.send(Msg::BeginIncoming(tx)).await.map_err(|_| InError::Refuse("shutting down".into()))?;
    if let Err(refusal) = rx.await.map_err(|_| InError::Refuse("shutting down".into()))? {
        let msg = refusal.to_string();
        wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await?;
        return Err(InError::Refuse(msg));
    }
    // A fenced (or otherwise known) id is never received again.
    if !outcomes.begin(&hello.migration_id) {
        let msg = format!("migration id {} is known here already (fenced or used)", hello.migration_id);
        let _ = inbox.send(Msg::IncomingDone(Err(msg.clone()))).await;
        wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await?;
        return Err(InError::Refuse(msg));
    }
    tracing::info!(peer = %peer, id = %hello.migration_id, image = %hello.image.manifest_digest, "incoming migration");
    let t_hello = Instant::now();
    let mode = if hello.post_copy { MigrationMode::PostCopy } else { MigrationMode::StopCopy };
    ctx.metrics.migration_started(Direction::In, mode);
    let dir = ctx.cfg.images_root().join(&hello.migration_id);
    // A refused migration leaves nothing behind: not its images dir, nor the
    // dirs it made to hold them and the blobs it never got.
    let new_dirs: Vec<PathBuf> =
        [ctx.cfg.received_layout_dir(), ctx.cfg.images_root()].into_iter().filter(|d| !d.exists()).collect();
    let r2 = receive(&ctx, &hello, &dir, &mut r, &mut w, &outcomes).await;
    let (result, report, post, local) = match r2 {
        Ok(v) => v,
        Err(e) => {
            outcomes.finish(&hello.migration_id, false);
            let reason = match &e {
                InError::Wire(_) => "transfer",
                InError::Refuse(_) => "refused",
            };
            ctx.metrics.migration_failed(Direction::In, mode, reason);
            let msg = e.to_string();
            let _ = wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await;
            let _ = std::fs::remove_dir_all(&dir);
            for d in &new_dirs {
                let _ = std::fs::remove_dir_all(d);
            }
            let _ = inbox.send(Msg::IncomingDone(Err(msg.clone()))).await;
            return Err(InError::Refuse(msg));
        }
    };
    match (&result, local) {
        // The images serve the memory until every page is in.
        (Ok(_), Some(l)) => {
            tokio::spawn(local_pages_done(l, dir.clone()));
        }
        _ if post.is_none() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        _ => {}
    }
    // A post-copy that runs here stays `restoring` for queries until every
    // page is here (`post_copy` finishes it): the source must not end its
    // frozen copy, which serves the pages, before that.
    if post.is_none() || result.is_err() {
        outcomes.finish(&hello.migration_id, result.is_ok());
    }
    let answer = match &result {
        Ok(_) => MigrationResult { running: true, error: None, verify_ms: report.0, restore_ms: report.1 },
        Err(e) => MigrationResult { running: false, error: Some(e.clone()), verify_ms: report.0, restore_ms: report.1 },
    };
    // Its published ports answer before the source starts sending clients.
    if let Ok(n) = &result {
        // Exactly what the source published (the workload's settings).
        if let Err(e) = ctx.publisher.publish(&n.settings.publish).await {
            tracing::error!(error = %e, "cannot publish the workload's ports");
        }
        ctx.publisher.direct().await;
    }
    let result = match (post, result) {
        (Some(p), Ok(n)) => {
            // Post-copy: the source learns at once that the workload runs
            // here (its freeze ends); the supervisor when every page is here.
            let t_running = Instant::now();
            let _ = wire::send_json(&mut w, Kind::Result, &answer).await;
            let times = (t_hello, t_running);
            return post_copy(&ctx, &hello, &dir, n, p, times, (peer, report), &mut w, &inbox, &outcomes).await;
        }
        (_, result) => result,
    };
    // Report to the supervisor first: the workload runs here from now on,
    // whether or not the source hears about it.
    match &result {
        Ok(_) => ctx.metrics.migration_in_succeeded(mode, t_hello.elapsed()),
        Err(_) => ctx.metrics.migration_failed(Direction::In, mode, "restore"),
    }
    let msg = match result {
        Ok(n) => Msg::IncomingDone(Ok((
            n,
            serde_json::json!({
                "peer": peer,
                "migration_id": hello.migration_id,
                "verify_ms": report.0,
                "restore_ms": report.1,
            }),
        ))),
        Err(e) => Msg::IncomingDone(Err(e)),
    };
    let _ = inbox.send(msg).await;
    wire::send_json(&mut w, Kind::Result, &answer).await?;
    Ok(())
}

/// How many processes a dump holds (their `pagemap-<pid>.img`, not shared memory's).
fn process_pagemaps(images: &Path) -> usize {
    std::fs::read_dir(images)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    super::pagedelta::is_pagemap(&n) && !n.starts_with("pagemap-shmem-")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Below this resident memory a restore copies the memory itself instead of
/// starting a lazy-pages daemon to serve it from the local images.
const LAZY_LOCAL_MIN: u64 = 32 << 20;

/// A lazy restore from local images (pre-copy, stop-copy): once the daemon
/// has served every page, the images go.
async fn local_pages_done(mut l: postcopy::LocalPages, dir: PathBuf) {
    let t = Instant::now();
    match (&mut l.exit).await {
        Ok(e) if e.success() => {
            tracing::info!(after_ms = ms(t.elapsed()), "every page is in (served from the local images)")
        }
        Ok(e) => tracing::error!(exit = %e, log = %postcopy::daemon_log_tail(&l.work),
            "the lazy-pages daemon serving the local images failed"),
        Err(_) => tracing::error!("the lazy-pages daemon serving the local images was lost"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A frame the peer got wrong (malformed JSON, an unknown field, an unknown
/// type, an oversize length) ends the connection with an `Error` frame that
/// names it; a connection that is gone gets none.
async fn refuse_malformed<T>(w: &mut (impl AsyncWriteExt + Unpin), r: Result<T, WireError>) -> Result<T, InError> {
    match r {
        Ok(v) => Ok(v),
        Err(e @ (WireError::Closed | WireError::Io(_))) => Err(e.into()),
        Err(e) => {
            let message = e.to_string();
            let _ = wire::send_json(w, Kind::Error, &wire::ErrorMsg { message }).await;
            Err(e.into())
        }
    }
}

/// A file being received.
struct Incoming {
    path: PathBuf,
    file: std::fs::File,
    kind: FileKind,
    name: String,
    len: u64,
    hash: super::FileHasher,
}

type Received =
    (Result<crate::workload::nested::Nested, String>, (f64, f64), Option<DestPostCopy>, Option<postcopy::LocalPages>);

/// The rest of a post-copy at the destination, once its copy runs: wait for
/// every page; then hand the workload to the supervisor and tell the source.
/// If pages can no longer arrive, end the copy here (it must never run on
/// with missing memory) and go back to standby.
#[allow(clippy::too_many_arguments)]
async fn post_copy(
    ctx: &Ctx,
    hello: &Hello,
    dir: &Path,
    n: crate::workload::nested::Nested,
    mut p: DestPostCopy,
    (t_hello, t_running): (Instant, Instant),
    (peer, report): (String, (f64, f64)),
    w: &mut (impl AsyncWriteExt + Unpin),
    inbox: &mpsc::Sender<Msg>,
    outcomes: &Outcomes,
) -> Result<(), InError> {
    tracing::info!(id = %hello.migration_id, "post-copy: the workload runs here; its memory follows");
    let end = postcopy::wait_destination(&mut p).await;
    let id = hello.migration_id.clone();
    let result = match end {
        DestEnd::Complete { page_bytes, pages: (pages_on_fault, pages_copied) } => {
            let after_ms = ms(t_running.elapsed());
            tracing::info!(page_bytes, last_page_after_running_ms = after_ms, "post-copy: every page is here");
            ctx.metrics.postcopy_page_bytes(Direction::In, page_bytes);
            ctx.metrics.bytes_received(page_bytes);
            ctx.metrics.migration_in_succeeded(MigrationMode::PostCopy, t_running.duration_since(t_hello));
            outcomes.finish(&id, true);
            let report = serde_json::json!({
                "peer": peer, "verify_ms": report.0, "restore_ms": report.1, "mode": "post-copy",
                "page_bytes": page_bytes, "last_page_after_running_ms": after_ms,
                "pages_on_fault": pages_on_fault, "pages_copied": pages_copied,
            });
            let _ = inbox.send(Msg::IncomingDone(Ok((n, report)))).await;
            let done = postcopy::PostCopyDone {
                page_bytes,
                last_page_after_running_ms: after_ms,
                pages_on_fault,
                pages_copied,
            };
            wire::send_json(w, Kind::PostCopyDone, &done).await.map_err(InError::from)
        }
        DestEnd::Lost { reason, keep } => {
            tracing::error!(reason = %reason, "post-copy lost: ending the copy here");
            ctx.metrics.migration_failed(Direction::In, MigrationMode::PostCopy, "post_copy");
            // Killed while its faults still wait on the daemon; only then
            // may the daemon's connection close.
            let (c2, n2) = (ctx.clone(), n);
            let _ = tokio::task::spawn_blocking(move || {
                let _ = c2.runtime.kill(&c2.reaper, &n2.id, "KILL", true);
                crate::workload::nested::cleanup(&c2.cfg, &c2.reaper, &c2.runtime, &n2);
            })
            .await;
            drop(keep);
            postcopy::kill(p.daemon_pid);
            p.bridge.abort();
            ctx.publisher.close().await;
            outcomes.finish(&id, false);
            let msg = format!(
                "migration lost during post-copy: {reason}; the copy here was ended, since it cannot run with missing \
                 memory"
            );
            let _ = inbox.send(Msg::IncomingDone(Err(msg.clone()))).await;
            let _ = wire::send_json(w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await;
            Err(InError::Refuse(msg))
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// The incoming migration in its phases: can this outer host it, the blobs
/// it lacks, the image unpacked (all before the source freezes), then the
/// checkpoint stream until the manifest, verification, and restore.
async fn receive(
    ctx: &Ctx,
    hello: &Hello,
    dir: &Path,
    r: &mut (impl tokio::io::AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    outcomes: &Outcomes,
) -> Result<Received, InError> {
    let cfg = &ctx.cfg;
    // Post-copy: lazy pages must work here, and the page link is expected
    // from now on (the source opens it right after its dump).
    let mut slot = None;
    if hello.post_copy && hello.pre_copy {
        return Err(InError::Refuse("a migration is either pre-copy or post-copy, not both".into()));
    }
    if hello.post_copy {
        postcopy::check_destination(postcopy::host_facts()).map_err(InError::Refuse)?;
        slot = Some(postcopy::expect_link(&hello.migration_id));
    }
    let (layout, digests) = check_can_host(cfg, hello, dir)?;
    let missing = layout.missing_blobs(&digests);
    let criu_version = crate::process::criu_version().to_string();
    wire::send_json(
        w,
        Kind::HelloOk,
        &HelloOk {
            protocol: wire::PROTOCOL_VERSION,
            missing_blobs: missing.clone(),
            criu_version,
            compression: zstd(hello).then(|| "zstd".to_string()),
            witness: hello.witness.is_some(),
        },
    )
    .await?;

    let mut total = 0u64;
    let received = async {
        receive_blobs(cfg, hello, dir, r, &layout, &missing, &mut total).await?;
        let still = layout.missing_blobs(&digests);
        if !still.is_empty() {
            return Err(InError::Refuse(format!("blobs still missing after transfer: {}", still.join(", "))));
        }
        prepare_image(cfg, hello, &layout, w).await?;
        wire::send_json(w, Kind::Ready, &serde_json::json!({})).await?;
        receive_checkpoint(cfg, dir, r, w, hello, &mut total).await
    }
    .await;
    // Every byte that arrived counts, also of a migration that failed.
    ctx.metrics.bytes_received(total);
    let (manifest, files) = received?;
    let mut verify_ms = verify(hello, &manifest, files)?;
    if hello.pre_copy {
        // The final round: complete pages images from the held ones and the deltas.
        let t = Instant::now();
        rebuild_round(cfg, dir, &manifest.pages, false, w).await?;
        for d in ["held", "delta", "digests"] {
            let _ = std::fs::remove_dir_all(dir.join(d));
        }
        verify_ms += ms(t.elapsed());
    }
    tracing::info!(files = manifest.files.len(), bytes = total, verify_ms, "checkpoint verified; restoring");
    // With a witness, its record is the commit point: no restore unless it
    // holds `commit` (a source in doubt may have recorded `abort` first).
    if let Some(addr) = &hello.witness {
        let commit = super::witness::commit(cfg, addr, &hello.migration_id, cfg.peer_read_timeout);
        with_heartbeats(w, cfg.peer_read_timeout, commit).await.map_err(InError::Refuse)?;
        tracing::info!(id = %hello.migration_id, witness = %addr, "committed at the witness; restoring");
    }
    // A source that asked meanwhile was told "not running": keep the promise.
    if let Err(phase) = outcomes.start_restore(&hello.migration_id) {
        return Err(InError::Refuse(format!(
            "migration {} is {phase:?} here: the source asked and was told it does not run here; not restoring",
            hello.migration_id
        )));
    }
    restore(ctx, hello, &manifest.meta, dir, verify_ms, w, slot.as_mut()).await
}

/// Can this outer container host the workload: runtime, space for the
/// images, memory, this destination's limit, and the image's blobs (from the
/// outer image's own layout or one received earlier). Answers the layout the
/// blobs go into and every digest the image needs.
fn check_can_host(cfg: &crate::config::Config, hello: &Hello, dir: &Path) -> Result<(OciLayout, Vec<String>), InError> {
    if hello.runtime != cfg.runtime {
        return Err(InError::Refuse(format!(
            "the workload ran under {:?}, this outer container uses {:?}",
            hello.runtime, cfg.runtime
        )));
    }
    if let Some(missing) =
        super::cpu::missing(hello.cpu_features.as_deref().unwrap_or(&[]), &super::cpu::local(&cfg.cpu_hide))
    {
        return Err(InError::Refuse(super::cpu::refusal(&missing)));
    }
    std::fs::create_dir_all(dir.join("criu")).map_err(|e| InError::Refuse(format!("{}: {e}", dir.display())))?;
    if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
        let free = st.blocks_available() * st.fragment_size();
        // Pre-copy holds the previous round's images beside the incoming ones.
        let copies = if hello.pre_copy { 2 } else { 1 };
        let need = hello.memory_bytes.saturating_mul(copies) + (16 << 20);
        if free < need {
            return Err(InError::Refuse(format!(
                "not enough space for the checkpoint in {}: {free} bytes free, about {need} needed",
                dir.display()
            )));
        }
    }
    if let Ok(mi) = <procfs::Meminfo as procfs::Current>::current() {
        if let Some(avail) = mi.mem_available {
            if avail < hello.memory_bytes {
                return Err(InError::Refuse(format!(
                    "not enough memory: {avail} bytes available, the workload uses {}",
                    hello.memory_bytes
                )));
            }
        }
    }
    // The outer container's memory limit binds the workload (its cgroup is
    // below ours), and the received images, on a tmpfs, count against it
    // too until the restore ends: a workload that cannot fit is refused
    // now, before anything is frozen, not killed by the OOM killer later.
    if let Some(m) = crate::workload::cgroup::memory_room() {
        let on_tmpfs = nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        let need = hello.memory_bytes.saturating_mul(if on_tmpfs.unwrap_or(false) { 2 } else { 1 });
        if m.room < need {
            return Err(InError::Refuse(format!(
                "this outer container's memory limit is too small for the workload: the cgroup {} allows {} bytes \
                 and {} are in use, leaving {}; the workload uses {} bytes{}",
                m.cgroup.display(),
                m.limit,
                m.usage,
                m.room,
                hello.memory_bytes,
                if need > hello.memory_bytes { ", twice that while its checkpoint is on a tmpfs here" } else { "" }
            )));
        }
    }
    if hello.blobs.len() > 4096 {
        return Err(InError::Refuse("too many blobs".into()));
    }
    let declared = hello.blobs.iter().fold(hello.memory_bytes, |sum, b| sum.saturating_add(b.1));
    if declared > cfg.max_checkpoint_bytes {
        return Err(InError::Refuse(format!(
            "the workload and its image ({declared} bytes) exceed this destination's limit of {} bytes",
            cfg.max_checkpoint_bytes
        )));
    }
    // The image by digest, from the outer image's layout or one received
    // earlier; otherwise the blobs go into the writable received layout.
    let have = hello.blobs.iter().map(|b| b.0.clone()).collect::<Vec<_>>();
    let ready = cfg.layout_candidates().into_iter().find(|d| {
        OciLayout::open(d)
            .and_then(|l| l.resolve())
            .map(|i| i.manifest_digest == hello.image.manifest_digest)
            .unwrap_or(false)
    });
    let layout = match &ready {
        Some(d) => OciLayout::open(d).map_err(|e| InError::Refuse(e.to_string()))?,
        None => {
            let d = cfg.received_layout_dir();
            match OciLayout::open(&d) {
                Ok(l) => l,
                Err(_) => OciLayout::create(&d).map_err(|e| InError::Refuse(e.to_string()))?,
            }
        }
    };
    let digests = have;
    for d in &digests {
        layout.blob_path(d).map_err(|e| InError::Refuse(e.to_string()))?;
    }
    // Blobs the outer image's own layout has need not cross the wire.
    if ready.is_none() {
        if let Ok(base) = OciLayout::open(&cfg.layout_dir) {
            for d in layout.missing_blobs(&digests) {
                if let (true, Ok(p)) = (base.has_blob(&d), base.blob_path(&d)) {
                    if let Ok(f) = std::fs::File::open(&p) {
                        let size = hello.blobs.iter().find(|b| b.0 == d).map(|b| b.1).unwrap_or(0);
                        let _ = layout.add_blob(&d, f, size);
                    }
                }
            }
        }
    }
    Ok((layout, digests))
}

/// The blobs the destination lacks, verified by digest on arrival, into the layout.
async fn receive_blobs(
    cfg: &crate::config::Config,
    hello: &Hello,
    dir: &Path,
    r: &mut (impl tokio::io::AsyncReadExt + Unpin),
    layout: &OciLayout,
    missing: &[String],
    total: &mut u64,
) -> Result<(), InError> {
    let deadline = cfg.peer_read_timeout;
    let mut files: HashMap<u32, Incoming> = HashMap::new();
    loop {
        let f = wire::read_frame_within(r, deadline).await?;
        match f.kind {
            Kind::BlobsDone => break,
            Kind::FileOpen | Kind::Data | Kind::DataZ => {
                let f = plain(f, zstd(hello))?;
                accept_file_frame(&f, dir, &mut files, total, cfg.max_checkpoint_bytes, FileKind::Blob, missing)?
            }
            _ => {
                return Err(f
                    .expect::<serde_json::Value>(Kind::BlobsDone)
                    .err()
                    .map(InError::from)
                    .unwrap_or_else(|| InError::Refuse("unexpected frame".into())))
            }
        }
    }
    for (_, inc) in files.drain() {
        let digest = inc.name.clone();
        let size = hello.blobs.iter().find(|b| b.0 == digest).map(|b| b.1).unwrap_or(0);
        drop(inc.file);
        let file = std::fs::File::open(&inc.path).map_err(|e| InError::Refuse(e.to_string()))?;
        layout
            .add_blob(&digest, file, size.max(inc.len))
            .map_err(|e| InError::Refuse(format!("blob {digest}: {e}")))?;
        let _ = std::fs::remove_file(&inc.path);
    }
    Ok(())
}

/// The image unpacked before the freeze, so that restore does not wait for it.
async fn prepare_image(
    cfg: &crate::config::Config,
    hello: &Hello,
    layout: &OciLayout,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> Result<(), InError> {
    let current = layout.resolve().ok().map(|i| i.manifest_digest);
    if current.as_deref() != Some(hello.image.manifest_digest.as_str()) {
        layout
            .set_index(&hello.image.manifest_digest, hello.manifest_size)
            .map_err(|e| InError::Refuse(e.to_string()))?;
    }
    let (layout_dir, cache) = (layout.root().to_path_buf(), cfg.layer_cache());
    let unpack = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let l = OciLayout::open(&layout_dir).map_err(|e| e.to_string())?;
        let img = l.resolve().map_err(|e| e.to_string())?;
        oci_layout::unpack_image(&l, &img, &cache).map(|_| ()).map_err(|e| e.to_string())
    });
    // Heartbeats tell the source, waiting for `Ready`, that this side works.
    with_heartbeats(w, cfg.peer_read_timeout, unpack)
        .await
        .map_err(|e| InError::Refuse(e.to_string()))?
        .map_err(|e| InError::Refuse(format!("cannot prepare the workload image: {e}")))?;
    Ok(())
}

/// Pre-copy: in `dir/criu`, rebuild the pages images of `checks` from the
/// deltas (`dir/delta`) and the previous round's images (`dir/held`).
async fn rebuild_round(
    cfg: &crate::config::Config,
    dir: &Path,
    checks: &[super::PagesCheck],
    keep_digests: bool,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> Result<(), InError> {
    let (incoming, deltas, held, checks) = (dir.join("criu"), dir.join("delta"), dir.join("held"), checks.to_vec());
    let digests = dir.join("digests");
    let job = tokio::task::spawn_blocking(move || {
        let held = held.exists().then_some(held.as_path());
        super::precopy::rebuild_dir(&incoming, &deltas, held, &digests, &checks, keep_digests)
    });
    with_heartbeats(w, cfg.peer_read_timeout, job)
        .await
        .map_err(|e| InError::Refuse(e.to_string()))?
        .map_err(|e| InError::Refuse(format!("pre-copy: cannot rebuild the pages: {e}")))
}

/// Pre-copy: a round while the workload runs has arrived: check its files,
/// rebuild its pages images, and hold them (in `dir/held`) for the next round.
async fn take_round(
    cfg: &crate::config::Config,
    dir: &Path,
    end: super::RoundEnd,
    files: HashMap<u32, Incoming>,
    w: &mut (impl AsyncWriteExt + Unpin),
) -> Result<(), InError> {
    let t = Instant::now();
    verify_files(&end.files, files)?;
    rebuild_round(cfg, dir, &end.pages, true, w).await?;
    let (criu, held, delta) = (dir.join("criu"), dir.join("held"), dir.join("delta"));
    let rotate = || -> std::io::Result<()> {
        if held.exists() {
            std::fs::remove_dir_all(&held)?;
        }
        std::fs::rename(&criu, &held)?;
        if delta.exists() {
            std::fs::remove_dir_all(&delta)?;
        }
        std::fs::create_dir_all(&criu)
    };
    rotate().map_err(|e| InError::Refuse(format!("pre-copy: cannot keep round {}: {e}", end.round)))?;
    let rebuild_ms = ms(t.elapsed());
    tracing::info!(round = end.round, files = end.files.len(), rebuild_ms, "pre-copy round held");
    wire::send_json(w, Kind::RoundOk, &super::RoundOk { round: end.round, rebuild_ms }).await?;
    Ok(())
}

/// The checkpoint stream until the manifest: the files received, by id.
/// Pre-copy: rounds (files, then `RoundEnd`) come first, each one rebuilt
/// and answered with `RoundOk`.
async fn receive_checkpoint(
    cfg: &crate::config::Config,
    dir: &Path,
    r: &mut (impl tokio::io::AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    hello: &Hello,
    total: &mut u64,
) -> Result<(Manifest, HashMap<u32, Incoming>), InError> {
    let deadline = cfg.peer_read_timeout;
    let mut files: HashMap<u32, Incoming> = HashMap::new();
    let manifest: Manifest = loop {
        // Heartbeats while a frame arrives: on a slow link the source wrote
        // its last byte (into socket buffers) long ago and waits for
        // `Result` with its deadline while the bytes are still on their way
        // here, a chunk taking longer than that deadline on a link of a few
        // KiB/s.
        let f = with_heartbeats(w, deadline, wire::read_frame_within(r, deadline)).await?;
        match f.kind {
            Kind::FileOpen | Kind::Data | Kind::DataZ => {
                let f = plain(f, zstd(hello))?;
                accept_file_frame(&f, dir, &mut files, total, cfg.max_checkpoint_bytes, FileKind::Image, &[])?
            }
            Kind::RoundEnd if hello.pre_copy => {
                let end: super::RoundEnd = f.parse()?;
                take_round(cfg, dir, end, std::mem::take(&mut files), w).await?;
                // Each round is bounded on its own.
                *total = 0;
            }
            Kind::Manifest => break f.parse()?,
            _ => {
                return Err(f
                    .expect::<serde_json::Value>(Kind::Manifest)
                    .err()
                    .map(InError::from)
                    .unwrap_or_else(|| InError::Refuse("unexpected frame".into())))
            }
        }
    };
    Ok((manifest, files))
}

/// Verify: the same files, sizes and digests as the source saw. Answers the time it took, in ms.
fn verify(hello: &Hello, manifest: &Manifest, files: HashMap<u32, Incoming>) -> Result<f64, InError> {
    let t_verify = Instant::now();
    if manifest.meta.image.manifest_digest != hello.image.manifest_digest {
        return Err(InError::Refuse("the manifest names another workload image".into()));
    }
    if !hello.pre_copy && !manifest.pages.is_empty() {
        return Err(InError::Refuse("page deltas in a migration that is not pre-copy".into()));
    }
    verify_files(&manifest.files, files)?;
    Ok(ms(t_verify.elapsed()))
}

/// The files received are exactly those listed, with their sizes and digests.
fn verify_files(expected: &[super::FileEntry], mut files: HashMap<u32, Incoming>) -> Result<(), InError> {
    let mut got: HashMap<(FileKind, String), (u64, String)> = HashMap::new();
    for (_, inc) in files.drain() {
        got.insert((inc.kind, inc.name), (inc.len, super::hex_digest(&inc.hash)));
    }
    if got.len() != expected.len() {
        return Err(InError::Refuse(format!("received {} files, the manifest lists {}", got.len(), expected.len())));
    }
    for e in expected {
        match got.get(&(e.kind, e.name.clone())) {
            None => return Err(InError::Refuse(format!("{} is in the manifest but was not received", e.name))),
            Some((len, digest)) if *len != e.size || *digest != e.blake3 => {
                return Err(InError::Refuse(format!("{}: digest or size mismatch (got {len} bytes)", e.name)))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Restore the verified checkpoint: the writable layer, then CRIU through the runtime.
async fn restore(
    ctx: &Ctx,
    hello: &Hello,
    meta: &crate::workload::checkpoint::Meta,
    dir: &Path,
    verify_ms: f64,
    w: &mut (impl AsyncWriteExt + Unpin),
    slot: Option<&mut postcopy::LinkSlot>,
) -> Result<Received, InError> {
    let cfg = &ctx.cfg;
    let (c2, images, work, diff) = (ctx.clone(), dir.join("criu"), dir.join("work"), dir.join("rootfs-diff.tar"));
    let digest = hello.image.manifest_digest.clone();
    let max = cfg.max_checkpoint_bytes;
    let post = match slot {
        Some(slot) => {
            Some(postcopy::start_destination(&ctx.reaper, slot, &images, &work, cfg).await.map_err(InError::Refuse)?)
        }
        None => None,
    };
    // Pre-copy and stop-copy: the memory is here already; served from these
    // images right after the restore (when userfaultfd works here), not
    // copied inside it.
    // A small memory is copied faster than a daemon starts; and lazy pages
    // would give each of several processes its own copy of the memory they
    // share copy-on-write (README, limitations), which an eager restore keeps.
    let big = hello.memory_bytes >= LAZY_LOCAL_MIN;
    let one_process = process_pagemaps(&images) == 1;
    let local = match (post.is_none() && big && one_process, postcopy::host_facts().uffd_problem.as_deref()) {
        (true, None) => match postcopy::start_local_pages(&ctx.reaper, &images, &work).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no lazy restore from the local images; restoring eagerly");
                None
            }
        },
        (true, Some(p)) => {
            tracing::info!(reason = p, "restoring eagerly (no userfaultfd here)");
            None
        }
        (false, _) => None,
    };
    let lazy = post.is_some() || local.is_some();
    // The workload's own command, hostname, ports and TCP mode, not ours.
    let rcfg = crate::workload::checkpoint::restore_config(&ctx.cfg, meta);
    // The client connections the source will relay here: their answers must
    // take the relay from the workload's first packet on.
    let relay = crate::net::relay::before_restore(cfg, &ctx.reaper, &hello.migration_id, &meta.relay_flows).await;
    if let Err(e) = relay {
        tracing::warn!(error = %e, "no relay for the carried connections; they will be closed");
    }
    let restore = tokio::task::spawn_blocking(move || {
        crate::workload::nested::restore(&rcfg, &c2.reaper, &c2.runtime, &digest, &images, &work, lazy, move |upper| {
            let f = std::fs::File::open(&diff).map_err(|e| format!("{}: {e}", diff.display()))?;
            crate::image::upper_diff::unpack(std::io::BufReader::with_capacity(1 << 20, f), upper, max)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    // Heartbeats tell the source, waiting for `Result`, that this side works.
    let restored =
        with_heartbeats(w, cfg.peer_read_timeout, restore).await.map_err(|e| InError::Refuse(e.to_string()))?;
    Ok(match restored {
        Ok((n, d)) => (Ok(n), (verify_ms, ms(d)), post, local),
        Err(e) => {
            crate::net::relay::restore_failed().await;
            if let Some(p) = post {
                postcopy::kill(p.daemon_pid);
                p.bridge.abort();
            }
            if let Some(l) = local {
                postcopy::kill(l.pid);
            }
            (Err(crate::supervisor::describe(&e)), (verify_ms, 0.0), None, None)
        }
    })
}

/// Wait for `job` while telling the source, with `Heartbeat` frames, that
/// this side still works on it. A heartbeat that cannot be written stops the
/// heartbeats, never the job: a restore that runs on must end, and be
/// recorded, whatever became of the connection.
async fn with_heartbeats<T>(
    w: &mut (impl AsyncWriteExt + Unpin),
    deadline: Duration,
    job: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(job);
    let every = wire::heartbeat_interval(deadline);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut alive = true;
    loop {
        tokio::select! {
            v = &mut job => return v,
            _ = tick.tick(), if alive => {
                let sent = async {
                    wire::write_frame(w, Kind::Heartbeat, &[]).await?;
                    w.flush().await.map_err(WireError::from)
                };
                if !matches!(tokio::time::timeout(every, sent).await, Ok(Ok(()))) {
                    alive = false;
                }
            }
        }
    }
}

/// The answer to a source's `Query`. A `stop` for a workload that runs here
/// ends it first (the supervisor returns to standby).
async fn answer_query(q: &Query, outcomes: &Outcomes, inbox: &mpsc::Sender<Msg>) -> QueryAnswer {
    match outcomes.query(&q.migration_id, q.action) {
        Answer::Now(state, since_unix_ms) => QueryAnswer { state, since_unix_ms },
        Answer::MustStop => {
            let (tx, rx) = oneshot::channel();
            let stopped =
                inbox.send(Msg::StopIncoming(q.migration_id.clone(), tx)).await.is_ok() && rx.await.unwrap_or(false);
            if stopped {
                outcomes.stopped(&q.migration_id);
                tracing::warn!(id = %q.migration_id, "the source runs the workload again: the copy here was ended");
                QueryAnswer { state: PeerState::NotRunning, since_unix_ms: outcomes::now_ms() }
            } else {
                let since = outcomes.get(&q.migration_id).map(|r| r.since_unix_ms).unwrap_or(0);
                QueryAnswer { state: PeerState::Running, since_unix_ms: since }
            }
        }
    }
}

/// Whether this migration's data may come compressed: the source proposed
/// zstd, which this ums always accepts.
fn zstd(hello: &Hello) -> bool {
    hello.compression.as_deref() == Some("zstd")
}

/// A `DataZ` frame as the `Data` frame it stands for (only when zstd was
/// agreed); any other frame as it is.
fn plain(f: wire::Frame, zstd: bool) -> Result<wire::Frame, InError> {
    match f.kind {
        Kind::DataZ if zstd => Ok(wire::inflate(&f)?),
        Kind::DataZ => Err(InError::Refuse("compressed data, but no compression was agreed".into())),
        _ => Ok(f),
    }
}

/// Take one FileOpen or Data frame of the expected kind into `dir`: names
/// are plain file names (blobs: only those asked for), offsets contiguous,
/// the total within `max_total`. Anything else refuses the whole migration.
fn accept_file_frame(
    f: &Frame,
    dir: &Path,
    files: &mut HashMap<u32, Incoming>,
    total: &mut u64,
    max_total: u64,
    phase: FileKind,
    allowed_blobs: &[String],
) -> Result<(), InError> {
    let bad = |m: String| InError::Refuse(m);
    if f.kind == Kind::FileOpen {
        let o: FileOpen = f.parse()?;
        let ok_kind = match phase {
            FileKind::Blob => o.kind == FileKind::Blob && allowed_blobs.contains(&o.name),
            _ => matches!(o.kind, FileKind::Image | FileKind::UpperDiff | FileKind::PageDelta),
        };
        if !ok_kind {
            return Err(bad(format!("unexpected {:?} file {:?} now", o.kind, o.name)));
        }
        let path = match o.kind {
            FileKind::Blob => dir.join(format!("blob-{}", o.name.replace(':', "-"))),
            FileKind::UpperDiff => dir.join("rootfs-diff.tar"),
            FileKind::Image => {
                if !safe_name(&o.name) {
                    return Err(bad(format!("unsafe file name {:?}", o.name)));
                }
                dir.join("criu").join(&o.name)
            }
            FileKind::PageDelta => {
                if !safe_name(&o.name) || !super::pagedelta::is_pagemap(&o.name) {
                    return Err(bad(format!("unsafe page delta name {:?}", o.name)));
                }
                let d = dir.join("delta");
                std::fs::create_dir_all(&d).map_err(|e| bad(format!("{}: {e}", d.display())))?;
                d.join(&o.name)
            }
        };
        if o.kind == FileKind::Blob && !safe_name(&o.name.replace(':', "-")) {
            return Err(bad(format!("unsafe blob name {:?}", o.name)));
        }
        // A FileOpen for a known id restarts that file from zero.
        if let Some(old) = files.remove(&o.id) {
            *total = total.saturating_sub(old.len);
        }
        if files.values().any(|i| i.path == path) {
            return Err(bad(format!("file {:?} opened twice", o.name)));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        files.insert(o.id, Incoming { path, file, kind: o.kind, name: o.name, len: 0, hash: super::FileHasher::new() });
        return Ok(());
    }
    let (id, offset, bytes) = wire::parse_data(&f.payload)?;
    let inc = files.get_mut(&id).ok_or_else(|| bad(format!("data for unknown file id {id}")))?;
    if offset != inc.len {
        return Err(bad(format!("{}: data at offset {offset}, expected {}", inc.name, inc.len)));
    }
    *total += bytes.len() as u64;
    if *total > max_total {
        return Err(bad(format!("checkpoint larger than the limit of {max_total} bytes")));
    }
    inc.file.write_all(bytes).map_err(|e| bad(format!("{}: {e}", inc.path.display())))?;
    inc.hash.update(bytes);
    inc.len += bytes.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every path under `root`, relative to it.
    fn tree(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    todo.push(p.clone());
                }
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
        out
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("pages-1.img".to_string()),
            Just("../escape".to_string()),
            Just("../../escape".to_string()),
            Just("/tmp/escape".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("".to_string()),
            Just("a/b".to_string()),
            Just("sha256:../../escape".to_string()),
            Just(format!("sha256:{}", "a".repeat(64))),
            "[a-z./:\\\\-]{0,20}",
            any::<String>(),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let kind = prop_oneof![Just(FileKind::Blob), Just(FileKind::Image), Just(FileKind::UpperDiff)];
        prop_oneof![
            (0u32..4, kind, name())
                .prop_map(|(id, kind, name)| Frame::json(Kind::FileOpen, &FileOpen { id, kind, name })),
            (0u32..4, 0u64..64, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(id, off, bytes)| {
                let mut payload = wire::data_header(id, off).to_vec();
                payload.extend(bytes);
                Frame { kind: Kind::Data, payload }
            }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|payload| Frame { kind: Kind::FileOpen, payload }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|payload| Frame { kind: Kind::Data, payload }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Random and hostile file frames: no panic, nothing written outside
        /// the migration's directory, never more than the quota.
        #[test]
        fn file_frames_stay_inside_the_images_dir(frames in proptest::collection::vec(frame(), 1..24), blob_phase in any::<bool>()) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("images").join("m-1");
            std::fs::create_dir_all(dir.join("criu")).unwrap();
            let allowed = vec![format!("sha256:{}", "a".repeat(64))];
            let phase = if blob_phase { FileKind::Blob } else { FileKind::Image };
            let mut files = HashMap::new();
            let mut total = 0u64;
            for f in &frames {
                if accept_file_frame(f, &dir, &mut files, &mut total, 100, phase, &allowed).is_err() {
                    break; // the destination ends the connection here
                }
                prop_assert!(total <= 100);
            }
            for p in tree(tmp.path()) {
                prop_assert!(p.starts_with("images/m-1") || p == Path::new("images"), "written outside the migration dir: {}", p.display());
            }
        }
    }

    #[test]
    fn a_symlink_planted_in_the_images_dir_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m-1");
        std::fs::create_dir_all(dir.join("criu")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), dir.join("criu").join("pages-1.img")).unwrap();
        let open = Frame::json(Kind::FileOpen, &FileOpen { id: 1, kind: FileKind::Image, name: "pages-1.img".into() });
        let mut files = HashMap::new();
        let err = accept_file_frame(&open, &dir, &mut files, &mut 0, 100, FileKind::Image, &[]).err().unwrap();
        assert!(err.to_string().contains("pages-1.img"), "{err}");
        assert!(!tmp.path().join("outside").exists());
    }
}
