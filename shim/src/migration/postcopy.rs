//! Post-copy migration (CRIU lazy pages), the parts that stop-copy lacks:
//!
//! * host facts read once (userfaultfd, `fs.pipe-max-size`, the CRIU
//!   version) and the checks made on them before anything is frozen;
//! * the page link: CRIU's page-server bytes between the source's CRIU (its
//!   page server, listening on a loopback port inside the source's outer
//!   container) and the destination's `criu lazy-pages` daemon (which
//!   connects to a loopback port of the destination's ums). Each ums bridges
//!   its loopback side into a second mutual-TLS connection of the same
//!   migration, opened by the source, whose first frame is `PageLink`. The
//!   page-server protocol itself never touches the network;
//! * the destination's end of a post-copy: the lazy-pages daemon, and what
//!   happens when the source or the link goes away before the last page.
//!
//! The rule throughout: the destination never lets its copy run on once a
//! page may be missing. Until the lazy-pages daemon has every page it keeps
//! its connection to our loopback bridge open, so a fault waits (it is never
//! served a zero page); if the source cannot deliver any more, the
//! destination kills its copy first and only then lets the daemon go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::resumable::{End, Resumable};
use super::transport::PeerWrite;
use super::wire::{self, Kind};
use crate::config::Config;
use crate::process::reaper::{Exit, Reaper};

/// How a migration moves memory (`ums migrate --mode`).
pub use crate::supervisor::control::MigrationMode as Mode;

/// Lazy dumps with a smaller `fs.pipe-max-size` fail in CRIU's page pipes
/// (`page-pipe: splice: -1: Bad file descriptor`).
pub const MIN_PIPE_MAX_SIZE: u64 = 4 << 20;

/// What this host offers post-copy, read once when ums starts.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `criu --version`'s first line, e.g. `Version: 4.2.1`.
    pub criu_version: String,
    /// `/proc/sys/fs/pipe-max-size`.
    pub pipe_max_size: Option<u64>,
    /// Why userfaultfd cannot be used, if so.
    pub uffd_problem: Option<String>,
}

static FACTS: OnceLock<HostFacts> = OnceLock::new();

/// The host facts, read on first use and kept: no child process (the CRIU
/// version is the one `ums init` read at start), so this never waits on the
/// reaper.
pub fn host_facts() -> &'static HostFacts {
    FACTS.get_or_init(|| {
        let f = HostFacts {
            criu_version: crate::process::criu_version().to_string(),
            pipe_max_size: std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok()),
            uffd_problem: userfaultfd_problem(),
        };
        tracing::debug!(?f, "post-copy host facts");
        f
    })
}

/// `None` when a userfaultfd can be opened here (the syscall, or
/// `/dev/userfaultfd`); otherwise why not.
fn userfaultfd_problem() -> Option<String> {
    // SAFETY: a plain syscall; the fd it returns is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is ours.
        unsafe { libc::close(fd as i32) };
        return None;
    }
    let err = std::io::Error::last_os_error();
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
        Ok(_) => None,
        Err(e) => Some(format!("userfaultfd is not usable: the syscall says {err}, /dev/userfaultfd says {e}")),
    }
}

/// The source's own check, before it connects: can CRIU dump lazily here?
pub fn check_source(f: &HostFacts) -> Result<(), String> {
    match f.pipe_max_size {
        Some(n) if n >= MIN_PIPE_MAX_SIZE => Ok(()),
        n => Err(format!(
            "post-copy is not possible on this host: fs.pipe-max-size is {} bytes, CRIU's lazy dump needs at least \
             {MIN_PIPE_MAX_SIZE} (raise it on the host: sysctl -w fs.pipe-max-size={MIN_PIPE_MAX_SIZE})",
            n.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into())
        )),
    }
}

/// The destination's check, answered to the source's `Hello` before it
/// freezes anything: can lazy pages be restored here?
pub fn check_destination(f: &HostFacts) -> Result<(), String> {
    match &f.uffd_problem {
        None => Ok(()),
        Some(p) => Err(format!("post-copy is not possible at this destination: {p}")),
    }
}

/// `major.minor` of a `criu --version` line.
fn criu_major_minor(v: &str) -> Option<(u32, u32)> {
    let num = v.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut it = num.split('.').map(|x| x.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// CRIU's page-server protocol changed between minor versions (4.1 to 4.2:
/// the page header's `nr_pages` grew to 64 bits): both ends must agree.
pub fn check_criu_versions(ours: &str, theirs: &str) -> Result<(), String> {
    match (criu_major_minor(ours), criu_major_minor(theirs)) {
        (Some(a), Some(b)) if a == b => Ok(()),
        _ => Err(format!(
            "post-copy needs the same CRIU page-server protocol on both sides: here {ours:?}, at the destination \
             {theirs:?}"
        )),
    }
}

// ---------------------------------------------------------------- page link

/// The TLS connection of a page link, after its `PageLink` frame, and what
/// the source said it received of the destination's stream.
pub struct Link {
    pub read: Box<dyn AsyncRead + Unpin + Send>,
    pub write: PeerWrite,
    pub peer_received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageLinkHello {
    pub migration_id: String,
    /// Bytes of the destination's stream (the daemon's requests) the source
    /// holds: 0 on the first link, more on a resumed one.
    #[serde(default)]
    pub received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageLinkOk {
    /// Bytes of the source's stream (pages) the destination holds.
    pub received: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostCopyDone {
    /// Page-server bytes that reached the lazy-pages daemon.
    pub page_bytes: u64,
    /// From the workload running here until the last page arrived.
    pub last_page_after_running_ms: f64,
    /// Page faults the daemon served (each fetched its page at once).
    #[serde(default)]
    pub pages_on_fault: u64,
    /// Pages the daemon placed in all, on fault or pushed in the background.
    #[serde(default)]
    pub pages_copied: u64,
}

/// From the lazy-pages daemon's log (written at -v4): the page faults it
/// served, and the pages it copied in all (its per-process summary lines).
pub fn daemon_page_counts(log: &str) -> (u64, u64) {
    let mut faults = 0;
    let mut copied = 0;
    for line in log.lines() {
        if line.contains("#PF at 0x") {
            faults += 1;
        } else if let Some(rest) = line.split("UFFD transferred pages: (").nth(1) {
            copied += rest.split('/').next().and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (faults, copied)
}

/// How long a page link may stay silent before it counts as cut: the peer
/// timeout, between 1 and 5 s (both sides send an acknowledgement every
/// quarter of it).
pub fn link_idle(cfg: &Config) -> Duration {
    cfg.peer_read_timeout.clamp(Duration::from_secs(1), Duration::from_secs(5))
}

type Waiting = Mutex<HashMap<String, (u64, oneshot::Sender<Link>)>>;
static WAITING: OnceLock<Waiting> = OnceLock::new();
static GENERATION: AtomicU64 = AtomicU64::new(0);

fn waiting() -> &'static Waiting {
    WAITING.get_or_init(Default::default)
}

/// A destination waiting for a page link of migration `id` (the first one,
/// or one that replaces it); forgotten when dropped.
pub struct LinkSlot {
    id: String,
    generation: u64,
    pub rx: Option<oneshot::Receiver<Link>>,
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        let mut w = waiting().lock().expect("page links");
        // Only our own registration: a newer slot for the id may be waiting.
        if w.get(&self.id).is_some_and(|(g, _)| *g == self.generation) {
            w.remove(&self.id);
        }
    }
}

/// Expect a page link for migration `id` (registered before the source can
/// open it).
pub fn expect_link(id: &str) -> LinkSlot {
    let (tx, rx) = oneshot::channel();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    waiting().lock().expect("page links").insert(id.to_string(), (generation, tx));
    LinkSlot { id: id.to_string(), generation, rx: Some(rx) }
}

/// A page link arrived: hand it to the migration waiting for it. Unknown
/// ids are refused (only a running post-copy migration takes one), and the
/// link is handed back for the refusal.
pub fn deliver_link(id: &str, link: Link) -> Result<(), (String, Link)> {
    let tx = waiting().lock().expect("page links").remove(id);
    match tx {
        Some((_, tx)) => tx.send(link).map_err(|l| (format!("migration {id} no longer waits for its page link"), l)),
        None => Err((format!("no post-copy migration {id} waits for a page link here"), link)),
    }
}

// ------------------------------------------------------- page link status

/// A page link as `ums status` shows it (`operation.page_links`).
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub migration_id: String,
    /// `source` (serves pages) or `destination` (fetches them).
    pub side: &'static str,
    /// `streaming`, or `paused: <why>` while the link is being reopened.
    pub state: String,
    /// Times the link was reopened after a cut.
    pub resumes: u32,
    /// Page-server bytes carried: pages (source to destination) and requests.
    pub page_bytes: u64,
}

type Links = Mutex<HashMap<(String, &'static str), LinkStatus>>;
static LINKS: OnceLock<Links> = OnceLock::new();

fn links() -> &'static Links {
    LINKS.get_or_init(Default::default)
}

/// Every page link of this ums, for `ums status`.
pub fn links_status() -> serde_json::Value {
    let mut v: Vec<LinkStatus> = links().lock().expect("links").values().cloned().collect();
    v.sort_by(|a, b| a.migration_id.cmp(&b.migration_id));
    serde_json::to_value(v).unwrap_or_default()
}

/// One page link's line in the status, removed when dropped.
struct LinkEntry {
    key: (String, &'static str),
    pages: Arc<AtomicU64>,
}

impl LinkEntry {
    fn new(id: &str, side: &'static str, pages: Arc<AtomicU64>) -> LinkEntry {
        let key = (id.to_string(), side);
        let s =
            LinkStatus { migration_id: id.to_string(), side, state: "connecting".into(), resumes: 0, page_bytes: 0 };
        links().lock().expect("links").insert(key.clone(), s);
        LinkEntry { key, pages }
    }

    fn set(&self, state: impl Into<String>, resumed: bool) {
        if let Some(s) = links().lock().expect("links").get_mut(&self.key) {
            s.state = state.into();
            s.resumes += resumed as u32;
            s.page_bytes = self.pages.load(Ordering::Relaxed);
        }
    }
}

impl Drop for LinkEntry {
    fn drop(&mut self) {
        links().lock().expect("links").remove(&self.key);
    }
}

// ----------------------------------------------------- source: page link

/// A free loopback port for CRIU's page server at the source (runc takes only
/// an address, so the port is chosen here and released just before CRIU binds
/// it).
pub fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

/// Open a page link (or reopen it) to `to`: the error says whether trying
/// again makes sense (a refusal by the destination does not).
async fn open_link(cfg: &Config, to: &str, id: &str, received: u64, idle: Duration) -> Result<Link, (String, bool)> {
    let conn = super::transport::connect(cfg, to, idle.max(Duration::from_secs(5)))
        .await
        .map_err(|e| (format!("page link to {to}: {e}"), true))?;
    let (mut r, mut w) = (conn.read, conn.write);
    let hello = PageLinkHello { migration_id: id.to_string(), received };
    wire::send_json(&mut w, Kind::PageLink, &hello).await.map_err(|e| (format!("page link to {to}: {e}"), true))?;
    let answer = wire::read_frame_within(&mut r, idle).await.and_then(|f| f.expect::<PageLinkOk>(Kind::PageLinkOk));
    match answer {
        Ok(ok) => Ok(Link { read: r, write: w, peer_received: ok.received }),
        Err(wire::WireError::Peer(m)) => Err((format!("the destination refused the page link: {m}"), false)),
        Err(e) => Err((format!("page link to {to}: {e}"), true)),
    }
}

/// The source's end of the page link: CRIU's page server at `criu` (loopback)
/// to a TLS connection to the destination, reopened after a cut for up to
/// `cfg.post_copy_resume`. Ends when both directions ended (the last page
/// was served and CRIU closed), or with an error; `pages` counts the bytes
/// sent to the destination, `resumes` the reconnections.
pub async fn source_link(
    cfg: Config,
    to: String,
    migration_id: String,
    criu: SocketAddr,
    pages: Arc<AtomicU64>,
    resumes: Arc<std::sync::atomic::AtomicU32>,
) -> Result<(), String> {
    let local = TcpStream::connect(criu).await.map_err(|e| format!("CRIU's page server at {criu}: {e}"))?;
    let mut rs = Resumable::new(local, true);
    rs.count_out = pages.clone();
    let entry = LinkEntry::new(&migration_id, "source", pages);
    let idle = link_idle(&cfg);
    // Since when, and why, there has been no link.
    let mut lost: Option<(Instant, String)> = None;
    let mut backoff = Duration::from_millis(100);
    // A first link that needed retries is not a resumed one.
    let mut had_link = false;
    loop {
        let link = match open_link(&cfg, &to, &migration_id, rs.received(), idle).await {
            Ok(l) => l,
            Err((e, false)) => return Err(e),
            Err((e, true)) => {
                let (since, why) = lost.get_or_insert_with(|| (Instant::now(), e.clone()));
                if since.elapsed() >= cfg.post_copy_resume {
                    return Err(format!(
                        "{why}; the page link could not be reopened within {:?} (last try: {e})",
                        cfg.post_copy_resume
                    ));
                }
                entry.set(format!("paused: {why}; reconnecting"), false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let resumed = lost.take().is_some() && had_link;
        had_link = true;
        if resumed {
            resumes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(id = %migration_id, "page link reopened; the page stream resumes");
        }
        entry.set("streaming", resumed);
        backoff = Duration::from_millis(100);
        match rs.run(link.read, link.write, link.peer_received, idle, &mut std::future::pending::<()>()).await? {
            End::Done => return Ok(()),
            End::Lost(why) => {
                tracing::warn!(id = %migration_id, %why, "page link cut; reconnecting");
                entry.set(format!("paused: {why}; reconnecting"), false);
                lost = Some((Instant::now(), why));
            }
            End::Superseded(()) => unreachable!("nothing supersedes the source's link"),
        }
    }
}

/// What a destination's bridge leaves behind when the source side ended:
/// the daemon's connection, still open (closing it would let the daemon
/// give up and the workload read zero pages).
pub struct Keep {
    _stream: Resumable,
}

/// The destination's end of a post-copy: the page link bridge and the
/// lazy-pages daemon.
pub struct DestPostCopy {
    pub daemon_pid: i32,
    pub daemon_exit: oneshot::Receiver<Exit>,
    pub bridge: tokio::task::JoinHandle<(String, Option<Keep>)>,
    pub pages: Arc<AtomicU64>,
    pub work: PathBuf,
}

/// Start the destination's side before the restore: a loopback listener
/// for the daemon, the bridge to the page link, and `criu lazy-pages`, which
/// must be listening on `work/lazy-pages.socket` before `restore
/// --lazy-pages` runs.
pub async fn start_destination(
    reaper: &Reaper,
    slot: &mut LinkSlot,
    images: &Path,
    work: &Path,
    cfg: &Config,
) -> Result<DestPostCopy, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("loopback listener: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let link = slot.rx.take().ok_or("the page link was already taken")?;
    let pages = Arc::new(AtomicU64::new(0));
    let timing = (link_idle(cfg), cfg.post_copy_resume);
    let bridge = tokio::spawn(dest_bridge(listener, slot.id.clone(), link, timing, pages.clone()));
    match start_daemon(reaper, images, work, Some(port)).await {
        Ok((daemon_pid, daemon_exit)) => {
            Ok(DestPostCopy { daemon_pid, daemon_exit, bridge, pages, work: work.to_path_buf() })
        }
        Err(e) => {
            bridge.abort();
            Err(e)
        }
    }
}

/// Start `criu lazy-pages` on `images` with its socket in `work`: fetching
/// pages from a page server at the loopback `port`, or with none, serving
/// them from the image files themselves. Returns once it listens.
async fn start_daemon(
    reaper: &Reaper,
    images: &Path,
    work: &Path,
    port: Option<u16>,
) -> Result<(i32, oneshot::Receiver<Exit>), String> {
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut c = std::process::Command::new("criu");
    c.arg("lazy-pages");
    if let Some(port) = port {
        c.arg("--page-server").arg("--address").arg("127.0.0.1").arg("--port").arg(port.to_string());
    }
    c.arg("--images-dir").arg(images).arg("--work-dir").arg(work).arg("--log-file").arg("lazy-pages.log").arg("-v4");
    c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let child = c.spawn().map_err(|e| format!("cannot start criu lazy-pages: {e}"))?;
    let daemon_pid = child.id() as i32;
    let mut daemon_exit = reaper.watch(daemon_pid);
    let sock = work.join("lazy-pages.socket");
    let t0 = Instant::now();
    while !sock.exists() {
        if let Ok(exit) = daemon_exit.try_recv() {
            return Err(format!("criu lazy-pages ended ({exit}): {}", daemon_log_tail(work)));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            kill(daemon_pid);
            return Err("criu lazy-pages did not start within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((daemon_pid, daemon_exit))
}

/// Pre-copy: the memory of a restore served from the destination's own
/// images by a `criu lazy-pages` daemon without a page server, so the
/// restore inside the freeze does not copy it (it arrives right after).
pub struct LocalPages {
    pub pid: i32,
    pub exit: oneshot::Receiver<Exit>,
    pub work: PathBuf,
    _busy: crate::workload::checkpoint::PagingIn,
}

/// Start serving the pages of `images` locally for a lazy restore.
pub async fn start_local_pages(reaper: &Reaper, images: &Path, work: &Path) -> Result<LocalPages, String> {
    let busy = crate::workload::checkpoint::PagingIn::new();
    let (pid, exit) = start_daemon(reaper, images, work, None).await?;
    Ok(LocalPages { pid, exit, work: work.to_path_buf(), _busy: busy })
}

pub fn daemon_log_tail(work: &Path) -> String {
    std::fs::read_to_string(work.join("lazy-pages.log"))
        .map(|t| crate::process::runtime::last_lines(&t, 4))
        .unwrap_or_default()
}

pub fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

/// Accept the daemon's connection and the page link, then carry bytes both
/// ways, taking a new link whenever the source opens one (after a cut, or
/// when it found the old one dead first). Returns when the page stream is
/// complete, or when no link came back within `resume` after a cut, with
/// why, and the daemon's connection still open.
async fn dest_bridge(
    listener: TcpListener,
    id: String,
    first: oneshot::Receiver<Link>,
    (idle, resume): (Duration, Duration),
    pages: Arc<AtomicU64>,
) -> (String, Option<Keep>) {
    let local = match tokio::time::timeout(Duration::from_secs(120), listener.accept()).await {
        Ok(Ok((s, addr))) if addr.ip().is_loopback() => s,
        Ok(Ok((_, addr))) => return (format!("unexpected connection from {addr}"), None),
        Ok(Err(e)) => return (format!("loopback accept: {e}"), None),
        Err(_) => return ("the lazy-pages daemon did not connect".into(), None),
    };
    drop(listener);
    let mut rs = Resumable::new(local, false);
    rs.count_in = pages.clone();
    let mut link = match tokio::time::timeout(Duration::from_secs(30), first).await {
        Ok(Ok(l)) => l,
        _ => return ("the source opened no page link".into(), Some(Keep { _stream: rs })),
    };
    let entry = LinkEntry::new(&id, "destination", pages);
    let mut resumed = false;
    loop {
        // The next link may come at any moment from now on.
        let mut slot = expect_link(&id);
        let mut next = slot.rx.take().expect("a fresh slot");
        let Link { read, mut write, peer_received } = link;
        entry.set("streaming", resumed);
        let ok = PageLinkOk { received: rs.received() };
        let end = match wire::send_json(&mut write, Kind::PageLinkOk, &ok).await {
            Ok(()) => rs.run(read, write, peer_received, idle, &mut next).await,
            Err(e) => Ok(End::Lost(format!("page link: {e}"))),
        };
        let why = match end {
            Ok(End::Done) => return ("the page stream is complete".into(), Some(Keep { _stream: rs })),
            Ok(End::Superseded(Ok(l))) => {
                tracing::info!(%id, "a newer page link replaces the current one");
                (link, resumed) = (l, true);
                continue;
            }
            Ok(End::Superseded(Err(_))) => "page link: no longer expected".to_string(),
            Ok(End::Lost(why)) => why,
            Err(e) => return (format!("page link: {e}"), Some(Keep { _stream: rs })),
        };
        tracing::warn!(%id, %why, "page link cut; faults wait until the source reconnects");
        entry.set(format!("paused: {why}; waiting for the source to reconnect"), false);
        match tokio::time::timeout(resume, &mut next).await {
            Ok(Ok(l)) => (link, resumed) = (l, true),
            _ => {
                return (
                    format!("{why}; the source did not reopen the page link within {resume:?}"),
                    Some(Keep { _stream: rs }),
                )
            }
        }
        drop(slot);
    }
}

impl DestPostCopy {
    fn complete(&self) -> DestEnd {
        let log = std::fs::read_to_string(self.work.join("lazy-pages.log")).unwrap_or_default();
        DestEnd::Complete { page_bytes: self.pages.load(Ordering::Relaxed), pages: daemon_page_counts(&log) }
    }
}

/// How a post-copy ended at the destination.
pub enum DestEnd {
    /// Every page arrived; the daemon exited cleanly.
    Complete { page_bytes: u64, pages: (u64, u64) },
    /// Pages can no longer arrive; the caller must kill its copy before
    /// dropping `keep`.
    Lost { reason: String, keep: Option<Keep> },
}

/// Wait until the lazy-pages daemon has every page, or the source can no
/// longer send any. After the source's side ends, the daemon gets a moment
/// to finish (a clean end closes the link just before the daemon exits).
pub async fn wait_destination(p: &mut DestPostCopy) -> DestEnd {
    let bridge_end = tokio::select! {
        exit = &mut p.daemon_exit => {
            return match exit {
                Ok(e) if e.success() => p.complete(),
                Ok(e) => DestEnd::Lost {
                    reason: format!("criu lazy-pages failed ({e}): {}", daemon_log_tail(&p.work)),
                    keep: None,
                },
                Err(_) => DestEnd::Lost { reason: "criu lazy-pages was not reaped".into(), keep: None },
            };
        }
        b = &mut p.bridge => b.unwrap_or_else(|e| (format!("bridge task: {e}"), None)),
    };
    let (why, keep) = bridge_end;
    match tokio::time::timeout(Duration::from_secs(3), &mut p.daemon_exit).await {
        Ok(Ok(e)) if e.success() => p.complete(),
        Ok(Ok(e)) => {
            DestEnd::Lost { reason: format!("{why}; criu lazy-pages failed ({e}): {}", daemon_log_tail(&p.work)), keep }
        }
        _ => DestEnd::Lost { reason: format!("{why} before the last page arrived"), keep },
    }
}

// --------------------------------------------------------- source: settle

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_counts_come_from_the_daemons_log() {
        let log = "(00.1) uffd: 75-5: #PF at 0x7f0000001000\n(00.1) uffd: 75-5: uffd_copy: 0x7f0000001000/4096\n\
                   (00.2) uffd: 76-6: #PF at 0x7f0000009000\n(01.5) uffd: 75-5: UFFD transferred pages: (65000/65536)\n\
                   (01.5) uffd: 76-6: UFFD transferred pages: (12/12)\n";
        assert_eq!(daemon_page_counts(log), (2, 65012));
        assert_eq!(daemon_page_counts(""), (0, 0));
    }

    #[test]
    fn criu_versions_must_share_major_and_minor() {
        assert!(check_criu_versions("Version: 4.2.1", "Version: 4.2").is_ok());
        assert!(check_criu_versions("Version: 4.2.1", "Version: 4.1.1").is_err());
        assert!(check_criu_versions("", "Version: 4.2.1").is_err());
        assert_eq!(criu_major_minor("Version: 4.2.1"), Some((4, 2)));
    }

    #[test]
    fn a_small_pipe_max_size_is_refused_with_the_fix() {
        let f = HostFacts { criu_version: String::new(), pipe_max_size: Some(1 << 20), uffd_problem: None };
        let e = check_source(&f).unwrap_err();
        assert!(e.contains("fs.pipe-max-size") && e.contains("4194304"), "{e}");
        assert!(check_source(&HostFacts { pipe_max_size: Some(4 << 20), ..f.clone() }).is_ok());
        assert!(check_destination(&f).is_ok());
        let no = HostFacts { uffd_problem: Some("no".into()), ..f };
        assert!(check_destination(&no).unwrap_err().contains("post-copy is not possible"));
    }

    #[test]
    fn a_page_link_for_an_unknown_migration_is_refused() {
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        let link = Link { read: Box::new(r), write: Box::new(w), peer_received: 0 };
        assert!(deliver_link("m-unknown", link).is_err());
        let mut slot = expect_link("m-known");
        let (a, _b) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(a);
        assert!(deliver_link("m-known", Link { read: Box::new(r), write: Box::new(w), peer_received: 7 }).is_ok());
        assert_eq!(slot.rx.take().unwrap().try_recv().map(|l| l.peer_received).ok(), Some(7));
        drop(slot);
        assert!(!waiting().lock().unwrap().contains_key("m-known"));
        // A slot dropped after a newer one for the same id leaves the newer.
        let old = expect_link("m-again");
        let _new = expect_link("m-again");
        drop(old);
        assert!(waiting().lock().unwrap().contains_key("m-again"));
    }
}
