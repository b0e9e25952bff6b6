//! Local checkpoint and restore of the nested container: a directory holding
//! the CRIU images (`criu/`), the writable layer (`rootfs-diff.tar`) and a
//! small description (`ums-checkpoint.json`) naming the workload image by
//! digest. The same directory restores in this outer container or in a fresh
//! one started from the same workload image (that is the base of migration).
//!
//! The workload is frozen (runtime `pause`) before its writable layer is
//! packed and CRIU dumps it, so memory and files agree.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::image::upper_diff;
use crate::process::reaper::Reaper;
use crate::process::runtime::{CheckpointOpts, Runtime};
use crate::workload::nested::{self, CheckpointDir, ImageInfo, Nested, NestedError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot use checkpoint dir {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint dir {0} is not empty")]
    NotEmpty(PathBuf),
    #[error("page server {0:?} is not IP:PORT")]
    BadPageServer(String),
    #[error("cannot checkpoint a workload running as uid {0} without CAP_SYS_RESOURCE (CRIU reads its resource limits with prlimit); give the outer container that capability or run the workload as root")]
    NeedsSysResource(u32),
    #[error("freeze failed: {0}")]
    Freeze(#[source] crate::process::exec::ExecError),
    #[error("dump failed: {0}")]
    Dump(#[source] crate::process::exec::ExecError),
    #[error("cannot pack the writable layer: {0}")]
    Diff(#[source] upper_diff::DiffError),
    #[error("{path} is not a ums checkpoint: {detail}")]
    BadMeta { path: PathBuf, detail: String },
    #[error("the checkpoint is of workload image {theirs}, this outer container has {ours}")]
    WrongImage { theirs: String, ours: String },
    #[error(transparent)]
    Nested(#[from] NestedError),
}

/// What `ums-checkpoint.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub ums_version: String,
    pub runtime: crate::config::RuntimeKind,
    pub image: ImageInfo,
    pub created_unix_ms: u128,
    pub tcp_established: bool,
    /// What the workload was started with (absent in checkpoints of older
    /// ums: the restoring side's own flags apply then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<nested::Settings>,
    /// A migration's client connections that the source relays to the
    /// destination after the move (`net::relay`): the destination routes the
    /// workload's answers on them back through the relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relay_flows: Vec<crate::net::relay::Flow>,
}

/// The config to restore the checkpoint described by `m` with: `cfg` with the
/// workload's own settings (command, hostname, published ports, TCP mode).
pub fn restore_config(cfg: &Config, m: &Meta) -> Config {
    match &m.settings {
        Some(s) => s.apply(cfg),
        None => Config { tcp_established: m.tcp_established, ..cfg.clone() },
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub diff_ms: f64,
    pub restore_ms: f64,
    pub total_ms: f64,
    /// How long the freeze waited for the listening sockets' accept queues
    /// to empty (at most `Config::listen_drain`).
    pub listen_drain_ms: f64,
    /// Connections still waiting in an accept queue (or half open) when
    /// CRIU dumped: left out of the checkpoint (`skip-in-flight`).
    pub in_flight_skipped: u64,
}

/// Connections the kernel holds for the workload's listening sockets that the
/// workload has not accepted: complete ones in accept queues, and half-open
/// ones (SYN received) that may still complete.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub queued: u64,
    pub half_open: u64,
}

impl Pending {
    pub fn total(&self) -> u64 {
        self.queued + self.half_open
    }
}

/// `Pending` from the text of /proc/PID/net/tcp or tcp6: LISTEN sockets
/// (state 0A) report their accept queue as rx_queue; SYN_RECV (03) entries
/// are the half-open requests.
pub fn parse_pending(text: &str) -> Pending {
    let mut p = Pending::default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        match f[3] {
            "0A" => {
                let rx = f[4].split(':').nth(1).and_then(|x| u64::from_str_radix(x, 16).ok()).unwrap_or(0);
                p.queued += rx;
            }
            "03" => p.half_open += 1,
            _ => {}
        }
    }
    p
}

/// `Pending` of the network namespace process `pid` lives in.
pub fn pending_connections(pid: i32) -> Pending {
    let mut p = Pending::default();
    for f in ["tcp", "tcp6"] {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) {
            let q = parse_pending(&t);
            p.queued += q.queued;
            p.half_open += q.half_open;
        }
    }
    p
}

/// Once new connections no longer reach the workload, let it accept what the
/// kernel already handed its listening sockets: wait until nothing is
/// pending, at most `bound`. Returns how long it waited.
pub fn drain_accept_queues(pid: i32, bound: Duration) -> Duration {
    let t0 = Instant::now();
    while pending_connections(pid).total() > 0 && t0.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

/// Lazy restores from local images still paging in here: the workload's
/// memory is not all in its processes yet, and CRIU must not dump it then.
static PAGING_IN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held while a lazy restore from local images pages in.
pub struct PagingIn(());

impl PagingIn {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        PAGING_IN.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        PagingIn(())
    }
}

impl Drop for PagingIn {
    fn drop(&mut self) {
        PAGING_IN.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Wait (at most `bound`) until no lazy restore still pages in here, before
/// a dump. Blocking.
pub fn wait_paging_in(bound: Duration) {
    let t0 = Instant::now();
    while PAGING_IN.load(std::sync::atomic::Ordering::Acquire) > 0 && t0.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Freeze the workload and dump it into `images`; it stays frozen on success
/// and is thawed again on failure.
pub fn freeze_and_dump(
    cfg: &Config,
    reaper: &Reaper,
    runtime: &Runtime,
    n: &Nested,
    images: &Path,
    work: &Path,
    t: &mut Timings,
) -> Result<(), CheckpointError> {
    if n.uid != 0 && !crate::sys::has_cap_sys_resource() {
        return Err(CheckpointError::NeedsSysResource(n.uid));
    }
    t.listen_drain_ms = ms(drain_accept_queues(n.pid, cfg.listen_drain));
    let t0 = Instant::now();
    runtime.pause(reaper, &n.id).map_err(CheckpointError::Freeze)?;
    t.freeze_ms = ms(t0.elapsed());
    let t1 = Instant::now();
    let opts = CheckpointOpts {
        image_path: images.into(),
        work_path: work.into(),
        leave_running: true,
        tcp_established: n.settings.tcp_established,
        page_server: None,
        ..Default::default()
    };
    if let Err(e) = runtime.checkpoint(reaper, &n.id, &opts) {
        thaw(reaper, runtime, n);
        return Err(CheckpointError::Dump(e));
    }
    t.dump_ms = ms(t1.elapsed());
    // Still frozen: what waits now was not in the dump.
    t.in_flight_skipped = pending_connections(n.pid).total();
    Ok(())
}

/// The fd number under which the runtime gets the status pipe of a
/// lazy-pages dump: high, so the runtime's own extra files (runc hands CRIU
/// its socket as fd 3) never land on it.
pub const LAZY_STATUS_FD: i32 = 42;

/// A lazy-pages (post-copy) dump whose non-memory part is done: CRIU now
/// serves the memory of the frozen tasks at its page server and the runtime
/// exits once every page has been fetched (or the page server failed).
pub struct LazyDump {
    pub pid: i32,
    pub exit: tokio::sync::oneshot::Receiver<crate::process::reaper::Exit>,
    /// The runtime's output.
    pub log: PathBuf,
    /// CRIU's work dir (its `dump.log`).
    pub work: PathBuf,
}

impl LazyDump {
    /// What went wrong, from the runtime's output and CRIU's log.
    pub fn failure(&self, exit: crate::process::reaper::Exit) -> crate::process::exec::ExecError {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let e = crate::process::exec::ExecError::Failed {
            program: "runc checkpoint --lazy-pages".into(),
            exit,
            stderr: crate::process::runtime::last_lines(&text, 6),
        };
        crate::process::runtime::with_criu_log(e, &self.work.join("dump.log"))
    }
}

/// Freeze the workload and dump it with lazy pages: everything but its
/// private memory goes into `images`; the memory stays in the frozen tasks and
/// CRIU serves it at `page_server` (`IP:PORT`, where it listens). Returns once
/// CRIU says it listens. On failure the workload is thawed.
#[allow(clippy::too_many_arguments)]
pub fn freeze_and_dump_lazy(
    reaper: &Reaper,
    runtime: &Runtime,
    cfg: &Config,
    n: &Nested,
    images: &Path,
    work: &Path,
    page_server: &str,
    t: &mut Timings,
) -> Result<LazyDump, CheckpointError> {
    if n.uid != 0 && !crate::sys::has_cap_sys_resource() {
        return Err(CheckpointError::NeedsSysResource(n.uid));
    }
    std::fs::create_dir_all(work).map_err(|source| CheckpointError::Dir { path: work.into(), source })?;
    let t0 = Instant::now();
    runtime.pause(reaper, &n.id).map_err(CheckpointError::Freeze)?;
    t.freeze_ms = ms(t0.elapsed());
    let t1 = Instant::now();
    let opts = CheckpointOpts {
        image_path: images.into(),
        work_path: work.into(),
        leave_running: true,
        tcp_established: cfg.tcp_established,
        page_server: Some(page_server.into()),
        lazy_pages: true,
        status_fd: Some(LAZY_STATUS_FD),
    };
    let fail = |e| {
        thaw(reaper, runtime, n);
        CheckpointError::Dump(e)
    };
    let pipe = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail(crate::process::exec::ExecError::Spawn { program: "pipe".into(), source: e.into() }));
    let (r, w) = pipe?;
    let log = work.join("runtime-checkpoint.log");
    let (pid, exit) = runtime.checkpoint_spawn(reaper, &n.id, &opts, w, &log).map_err(fail)?;
    let mut dump = LazyDump { pid, exit, log, work: work.into() };
    let mut byte = [0u8; 1];
    let ready = matches!(nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut byte), Ok(1));
    if !ready {
        // The status pipe closed without a byte: the dump failed and ends.
        let exit_rx = std::mem::replace(&mut dump.exit, tokio::sync::oneshot::channel().1);
        let exit = exit_rx.blocking_recv().unwrap_or(crate::process::reaper::Exit::Code(-1));
        return Err(fail(dump.failure(exit)));
    }
    if let Ok(exit) = dump.exit.try_recv() {
        return Err(fail(dump.failure(exit)));
    }
    t.dump_ms = ms(t1.elapsed());
    Ok(dump)
}

/// Let a frozen workload run again (after a failed or a leave-running checkpoint).
pub fn thaw(reaper: &Reaper, runtime: &Runtime, n: &Nested) {
    if let Err(e) = runtime.resume(reaper, &n.id) {
        tracing::error!(error = %e, workload = %n.id, "cannot thaw the workload");
    }
}

pub fn meta(cfg: &Config, n: &Nested) -> Meta {
    Meta {
        ums_version: env!("CARGO_PKG_VERSION").into(),
        runtime: cfg.runtime,
        image: n.image.clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        tcp_established: n.settings.tcp_established,
        settings: Some(n.settings.clone()),
        relay_flows: Vec::new(),
    }
}

/// The `checkpoint` request: dump into `dir` (which must be empty or absent),
/// then either thaw the workload (`leave_running`) or end it. With a
/// `page_server` (`IP:PORT` of a `criu page-server`), CRIU sends the memory
/// pages there while it dumps, and `dir` gets everything else.
pub fn checkpoint_to_dir(
    cfg: &Config,
    reaper: &Reaper,
    runtime: &Runtime,
    n: &Nested,
    dir: &Path,
    leave_running: bool,
    page_server: Option<&str>,
) -> Result<Timings, CheckpointError> {
    let t0 = Instant::now();
    let mut t = Timings::default();
    if let Some(ps) = page_server {
        if ps.parse::<std::net::SocketAddr>().is_err() {
            return Err(CheckpointError::BadPageServer(ps.into()));
        }
    }
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(CheckpointError::NotEmpty(dir.into()));
    }
    // A workload restored lazily from local images is dumped once its memory is all in.
    wait_paging_in(Duration::from_secs(30));
    let cd = CheckpointDir(dir);
    std::fs::create_dir_all(cd.images()).map_err(|source| CheckpointError::Dir { path: dir.into(), source })?;
    if n.uid != 0 && !crate::sys::has_cap_sys_resource() {
        return Err(CheckpointError::NeedsSysResource(n.uid));
    }
    t.listen_drain_ms = ms(drain_accept_queues(n.pid, cfg.listen_drain));
    // Frozen first, so the writable layer packed now is the one the dump sees.
    let tf = Instant::now();
    runtime.pause(reaper, &n.id).map_err(CheckpointError::Freeze)?;
    t.freeze_ms = ms(tf.elapsed());
    let at_freeze = pending_connections(n.pid).total();
    let t1 = Instant::now();
    let packed = (|| {
        let f = std::fs::File::create(cd.upper_diff())
            .map_err(|source| CheckpointError::Dir { path: dir.into(), source })?;
        let w = std::io::BufWriter::with_capacity(1 << 20, f);
        upper_diff::pack(&n.bundle.upper(), w).map_err(CheckpointError::Diff)?;
        let m = serde_json::to_vec_pretty(&meta(cfg, n)).expect("meta serializes");
        std::fs::write(cd.meta(), m).map_err(|source| CheckpointError::Dir { path: dir.into(), source })
    })();
    t.diff_ms = ms(t1.elapsed());
    if let Err(e) = packed {
        thaw(reaper, runtime, n);
        return Err(e);
    }
    // With --stop, CRIU ends the tasks itself after the dump, which spares
    // it removing its parasite code from them (about 50 ms here).
    let td = Instant::now();
    let opts = CheckpointOpts {
        image_path: cd.images(),
        work_path: dir.join("work"),
        leave_running,
        tcp_established: n.settings.tcp_established,
        page_server: page_server.map(String::from),
        ..Default::default()
    };
    if let Err(e) = runtime.checkpoint(reaper, &n.id, &opts) {
        thaw(reaper, runtime, n);
        return Err(CheckpointError::Dump(e));
    }
    t.dump_ms = ms(td.elapsed());
    // Not in the dump: what waited at the freeze, or now (still frozen; with
    // `leave_running` the workload accepts it once thawed, with --stop CRIU
    // ended it and the clients were reset).
    t.in_flight_skipped = at_freeze.max(pending_connections(n.pid).total());
    if leave_running {
        thaw(reaper, runtime, n);
    }
    t.total_ms = ms(t0.elapsed());
    Ok(t)
}

pub fn read_meta(dir: &Path) -> Result<Meta, CheckpointError> {
    let p = CheckpointDir(dir).meta();
    let text = std::fs::read(&p).map_err(|e| CheckpointError::BadMeta { path: p.clone(), detail: e.to_string() })?;
    serde_json::from_slice(&text).map_err(|e| CheckpointError::BadMeta { path: p, detail: e.to_string() })
}

/// The `restore` request: bring the workload back from a checkpoint dir.
pub fn restore_from_dir(
    cfg: &Config,
    reaper: &Reaper,
    runtime: &Runtime,
    dir: &Path,
) -> Result<(Nested, Timings), CheckpointError> {
    let t0 = Instant::now();
    let m = read_meta(dir)?;
    if let Err(NestedError::ImageNotHere(_)) = nested::open_image(cfg, Some(&m.image.manifest_digest)) {
        let ours = nested::open_image(cfg, None).map(|(_, i, _)| i.manifest_digest).unwrap_or_else(|_| "none".into());
        return Err(CheckpointError::WrongImage { theirs: m.image.manifest_digest, ours });
    }
    let cd = CheckpointDir(dir);
    let diff = cd.upper_diff();
    let max = cfg.max_checkpoint_bytes;
    let rcfg = restore_config(cfg, &m);
    let (n, restore) = nested::restore(
        &rcfg,
        reaper,
        runtime,
        &m.image.manifest_digest,
        &cd.images(),
        &dir.join("restore-work"),
        false,
        move |upper| {
            let f = std::fs::File::open(&diff).map_err(|e| format!("{}: {e}", diff.display()))?;
            upper_diff::unpack(std::io::BufReader::with_capacity(1 << 20, f), upper, max)
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )?;
    let t = Timings { restore_ms: ms(restore), total_ms: ms(t0.elapsed()), ..Default::default() };
    Ok((n, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_connections_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0
   2: 0200580A:1F90 0100580A:C350 03 00000000:00000000 02:00000064 00000000     0        0 0 0 0000000000000000
   3: 0200580A:1F90 0100580A:C351 01 00000000:00000010 00:00000000 00000000     0        0 1236 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(parse_pending(text), Pending { queued: 3, half_open: 1 });
        assert_eq!(parse_pending("").total(), 0);
        // A pid that does not exist has nothing pending.
        assert_eq!(pending_connections(-1).total(), 0);
    }

    #[test]
    fn settings_travel_in_the_meta_and_old_metas_still_parse() {
        let old = r#"{"ums_version":"0.1.0","runtime":"runc","image":{"manifest_digest":"sha256:ab","command":["/bin/x"],"exposed_ports":[]},"created_unix_ms":1,"tcp_established":false}"#;
        let m: Meta = serde_json::from_str(old).unwrap();
        assert!(m.settings.is_none());
        let cfg = Config { command: vec!["/own".into()], ..Config::default() };
        let r = restore_config(&cfg, &m);
        assert!(!r.tcp_established, "the checkpoint's TCP mode");
        assert_eq!(r.command, ["/own"], "no settings: this side's own flags");
        let s = nested::Settings {
            command: vec!["/bin/websrv".into(), "9090".into()],
            hostname: "web-a".into(),
            publish: vec!["9090:9090".parse().unwrap(), "9191/udp".parse().unwrap()],
            tcp_established: true,
        };
        let m = Meta { settings: Some(s.clone()), ..m };
        let back: Meta = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back.settings.as_ref(), Some(&s));
        let r = restore_config(&cfg, &back);
        assert_eq!(r.command, s.command);
        assert_eq!(r.hostname.as_deref(), Some("web-a"));
        assert_eq!(r.publish, s.publish);
        assert!(r.tcp_established);
    }
}
