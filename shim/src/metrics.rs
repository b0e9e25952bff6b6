//! Prometheus metrics (docs/metrics.md): what ums counts while it runs, and
//! the text exposition format (version 0.0.4) it is served in, on
//! `--metrics-listen ADDR` (`GET /metrics`, plain HTTP) and by `ums metrics`
//! through the control socket. Both render the same text, in the
//! supervisor, from the counters here and a snapshot of what it owns (state,
//! published ports, in-doubt board).
//!
//! The counters only ever grow while ums runs; they start from zero with
//! every ums (a new outer container, or a restarted one), which Prometheus'
//! `rate()` and `increase()` handle as a counter reset.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::supervisor::control::MigrationMode;

/// Which way a migration went, seen from this ums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// This ums was the source: the workload left.
    Out,
    /// This ums was the destination: the workload arrived.
    In,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }

    /// The failure reasons of this direction (`ums_migrations_failed_total`).
    pub fn reasons(self) -> &'static [&'static str] {
        match self {
            Direction::Out => &OUT_REASONS,
            Direction::In => &IN_REASONS,
        }
    }
}

/// Why an outgoing migration failed (`MigrateError::reason`).
pub const OUT_REASONS: [&str; 10] = [
    "connect",
    "pre_migration",
    "refused",
    "image",
    "checkpoint",
    "stream",
    "transfer",
    "restore",
    "resolved",
    "post_copy",
];

/// Why an incoming migration failed.
pub const IN_REASONS: [&str; 4] = ["refused", "transfer", "restore", "post_copy"];

/// How a workload came to run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StartKind {
    /// From the OCI image, when ums started.
    Image,
    /// `ums restore` of a checkpoint.
    Restore,
    /// An incoming migration.
    Migration,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Image => "image",
            StartKind::Restore => "restore",
            StartKind::Migration => "migration",
        }
    }
}

/// Upper bounds of the duration histograms, in seconds: from a quick
/// post-copy freeze on a fast link to a large stop-copy over a slow one.
pub const BUCKETS: [f64; 12] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// A Prometheus histogram: cumulative counts per upper bound, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at most `BUCKETS[i]` (not yet cumulative).
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

fn mode_key(m: MigrationMode) -> u8 {
    match m {
        MigrationMode::StopCopy => 0,
        MigrationMode::PostCopy => 1,
        MigrationMode::PreCopy => 2,
        // Counted only when `auto` failed before it chose (a migration is
        // counted under the mode it chose).
        MigrationMode::Auto => 3,
    }
}

/// What one finished outgoing migration measured (from its report).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    /// From the request until the workload ran at the destination.
    pub duration: f64,
    /// From the freeze until the workload ran at the destination.
    pub downtime: f64,
    /// CRIU's freeze of the workload (before the dump).
    pub freeze: f64,
}

#[derive(Debug, Default)]
struct Inner {
    started: BTreeMap<(Direction, u8), u64>,
    succeeded: BTreeMap<(Direction, u8), u64>,
    failed: BTreeMap<(Direction, u8, String), u64>,
    in_doubt: BTreeMap<u8, u64>,
    duration: BTreeMap<(Direction, u8), Histogram>,
    downtime: BTreeMap<u8, Histogram>,
    last: BTreeMap<u8, Measured>,
    bytes_sent: u64,
    data_bytes_sent: u64,
    bytes_received: u64,
    postcopy_page_bytes: BTreeMap<Direction, u64>,
    starts: BTreeMap<StartKind, u64>,
}

/// The counters of one ums, shared by the supervisor and the migration tasks.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// What the supervisor owns, read at the moment of a scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `standby`, `running`, `busy`, `exited`.
    pub state: &'static str,
    /// The operation under way when busy (`migrate`, `checkpoint`, ...).
    pub operation: Option<String>,
    /// An outgoing migration waits in doubt now.
    pub in_doubt: bool,
    /// Remote copies being asked to stop (after `ums resolve --thaw`).
    pub stopping_remote: usize,
    /// Seconds the workload has run here, if one does.
    pub workload_uptime: Option<f64>,
    /// Client connections through the published ports.
    pub connections_open: u64,
    pub connections_held_now: u64,
    pub connections_held_total: u64,
    pub connections_forwarded_total: u64,
    pub connections_refused_total: u64,
    /// ums's own process.
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

pub const STATES: [&str; 4] = ["standby", "running", "busy", "exited"];

const MODES: [MigrationMode; 3] = [MigrationMode::StopCopy, MigrationMode::PreCopy, MigrationMode::PostCopy];
/// The modes, and `auto` when something was counted under it (an `auto`
/// migration that failed before it chose a mode).
fn with_auto(modes: [MigrationMode; 3], auto: bool) -> impl Iterator<Item = MigrationMode> {
    modes.into_iter().chain(auto.then_some(MigrationMode::Auto))
}
const DIRECTIONS: [Direction; 2] = [Direction::Out, Direction::In];

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn migration_started(&self, d: Direction, m: MigrationMode) {
        *self.lock().started.entry((d, mode_key(m))).or_default() += 1;
    }

    /// An outgoing migration ended with the workload running at the destination.
    pub fn migration_out_succeeded(&self, m: MigrationMode, t: Measured) {
        let mut g = self.lock();
        *g.succeeded.entry((Direction::Out, mode_key(m))).or_default() += 1;
        g.duration.entry((Direction::Out, mode_key(m))).or_default().observe(t.duration);
        g.downtime.entry(mode_key(m)).or_default().observe(t.downtime);
        g.last.insert(mode_key(m), t);
    }

    /// An incoming migration ended with the workload running here;
    /// `duration` from the `Hello` until then.
    pub fn migration_in_succeeded(&self, m: MigrationMode, duration: Duration) {
        let mut g = self.lock();
        *g.succeeded.entry((Direction::In, mode_key(m))).or_default() += 1;
        g.duration.entry((Direction::In, mode_key(m))).or_default().observe(duration.as_secs_f64());
    }

    /// A migration failed; `reason` is a short label (`metrics::reason_*`).
    pub fn migration_failed(&self, d: Direction, m: MigrationMode, reason: &str) {
        *self.lock().failed.entry((d, mode_key(m), reason.to_string())).or_default() += 1;
    }

    /// An outgoing migration went in doubt (the source does not know whether
    /// the destination runs the workload; it stays frozen and asks).
    pub fn migration_in_doubt(&self, m: MigrationMode) {
        *self.lock().in_doubt.entry(mode_key(m)).or_default() += 1;
    }

    pub fn bytes_sent(&self, n: u64) {
        self.lock().bytes_sent += n;
    }

    /// The same data before zstd (`migration::compress`).
    pub fn data_bytes_sent(&self, n: u64) {
        self.lock().data_bytes_sent += n;
    }

    pub fn bytes_received(&self, n: u64) {
        self.lock().bytes_received += n;
    }

    pub fn postcopy_page_bytes(&self, d: Direction, n: u64) {
        *self.lock().postcopy_page_bytes.entry(d).or_default() += n;
    }

    pub fn workload_started(&self, k: StartKind) {
        *self.lock().starts.entry(k).or_default() += 1;
    }

    /// The text exposition format of every metric, with `s` for the gauges
    /// the supervisor owns.
    pub fn render(&self, s: &Snapshot) -> String {
        let g = self.lock();
        let mut out = Text::default();

        out.family("ums_workload_state", "gauge", "1 for the state ums is in now (standby, running, busy, exited).");
        for st in STATES {
            out.sample("ums_workload_state", &[("state", st)], if s.state == st { 1.0 } else { 0.0 });
        }
        out.family("ums_operation", "gauge", "1 while this operation runs (busy state).");
        if let Some(op) = &s.operation {
            out.sample("ums_operation", &[("op", op)], 1.0);
        }
        out.family("ums_workload_uptime_seconds", "gauge", "Seconds the workload has run in this outer container.");
        if let Some(u) = s.workload_uptime {
            out.sample("ums_workload_uptime_seconds", &[], u);
        }
        out.family(
            "ums_workload_starts_total",
            "counter",
            "Times a workload started running here, by how: image, restore, migration (arrived).",
        );
        for k in [StartKind::Image, StartKind::Restore, StartKind::Migration] {
            out.sample(
                "ums_workload_starts_total",
                &[("how", k.as_str())],
                g.starts.get(&k).copied().unwrap_or(0) as f64,
            );
        }
        let restarts: u64 = g.starts.values().sum::<u64>().saturating_sub(1);
        out.family(
            "ums_workload_restarts_total",
            "counter",
            "Starts of a workload in this outer container after the first (all hows).",
        );
        out.sample("ums_workload_restarts_total", &[], restarts as f64);

        for (name, help, map) in [
            ("ums_migrations_started_total", "Migrations begun, by direction and mode.", &g.started),
            (
                "ums_migrations_succeeded_total",
                "Migrations that ended with the workload running at the destination.",
                &g.succeeded,
            ),
        ] {
            out.family(name, "counter", help);
            for d in DIRECTIONS {
                for m in with_auto(MODES, map.keys().any(|k| k.0 == d && k.1 == mode_key(MigrationMode::Auto))) {
                    let v = map.get(&(d, mode_key(m))).copied().unwrap_or(0);
                    out.sample(name, &[("direction", d.as_str()), ("mode", m.as_str())], v as f64);
                }
            }
        }
        out.family(
            "ums_migrations_failed_total",
            "counter",
            "Migrations that failed, by direction, mode and reason; a failed outgoing migration leaves the workload \
             running at the source.",
        );
        for d in DIRECTIONS {
            for m in with_auto(MODES, g.failed.keys().any(|k| k.0 == d && k.1 == mode_key(MigrationMode::Auto))) {
                // Every known reason from the start, at zero, so that
                // increase() sees the first failure of each; then any other.
                let known = d.reasons();
                let others = g
                    .failed
                    .keys()
                    .filter(|(d2, m2, r)| *d2 == d && *m2 == mode_key(m) && !known.contains(&r.as_str()))
                    .map(|(_, _, r)| r.as_str());
                for reason in known.iter().copied().chain(others) {
                    let v = g.failed.get(&(d, mode_key(m), reason.to_string())).copied().unwrap_or(0);
                    out.sample(
                        "ums_migrations_failed_total",
                        &[("direction", d.as_str()), ("mode", m.as_str()), ("reason", reason)],
                        v as f64,
                    );
                }
            }
        }
        out.family(
            "ums_migrations_in_doubt_total",
            "counter",
            "Outgoing migrations that went in doubt: the source did not hear whether the destination runs the \
             workload, and kept it frozen.",
        );
        for m in MODES {
            let v = g.in_doubt.get(&mode_key(m)).copied().unwrap_or(0);
            out.sample("ums_migrations_in_doubt_total", &[("direction", "out"), ("mode", m.as_str())], v as f64);
        }
        out.family(
            "ums_migration_in_doubt",
            "gauge",
            "1 while an outgoing migration is in doubt (the workload is frozen here; see ums status, ums resolve).",
        );
        out.sample("ums_migration_in_doubt", &[], if s.in_doubt { 1.0 } else { 0.0 });
        out.family("ums_migration_stopping_remote", "gauge", "Remote copies being asked to stop after a resolve.");
        out.sample("ums_migration_stopping_remote", &[], s.stopping_remote as f64);

        out.family(
            "ums_migration_duration_seconds",
            "histogram",
            "Migration time: from the request (out) or the Hello (in) until the workload ran at the destination.",
        );
        for d in DIRECTIONS {
            for m in MODES {
                let h = g.duration.get(&(d, mode_key(m))).cloned().unwrap_or_default();
                out.histogram("ums_migration_duration_seconds", &[("direction", d.as_str()), ("mode", m.as_str())], &h);
            }
        }
        out.family(
            "ums_migration_downtime_seconds",
            "histogram",
            "Downtime of outgoing migrations: from the freeze until the workload ran at the destination.",
        );
        for m in MODES {
            let h = g.downtime.get(&mode_key(m)).cloned().unwrap_or_default();
            out.histogram("ums_migration_downtime_seconds", &[("mode", m.as_str())], &h);
        }
        for (name, help, pick) in [
            (
                "ums_migration_last_duration_seconds",
                "Migration time of the last successful outgoing migration.",
                (|t: &Measured| t.duration) as fn(&Measured) -> f64,
            ),
            (
                "ums_migration_last_downtime_seconds",
                "Downtime of the last successful outgoing migration.",
                |t: &Measured| t.downtime,
            ),
            (
                "ums_migration_last_freeze_seconds",
                "How long freezing the workload took in the last successful outgoing migration.",
                |t: &Measured| t.freeze,
            ),
        ] {
            out.family(name, "gauge", help);
            for m in MODES {
                if let Some(t) = g.last.get(&mode_key(m)) {
                    out.sample(name, &[("mode", m.as_str())], pick(t));
                }
            }
        }
        out.family(
            "ums_migration_sent_bytes_total",
            "counter",
            "Checkpoint, writable-layer and image bytes sent to destinations as they went on the wire (after zstd; \
             post-copy pages included).",
        );
        out.sample("ums_migration_sent_bytes_total", &[], g.bytes_sent as f64);
        out.family(
            "ums_migration_sent_data_bytes_total",
            "counter",
            "The same bytes before zstd: divided by ums_migration_sent_bytes_total, the compression ratio.",
        );
        out.sample("ums_migration_sent_data_bytes_total", &[], g.data_bytes_sent as f64);
        out.family(
            "ums_migration_received_bytes_total",
            "counter",
            "Checkpoint, writable-layer and image bytes received from sources (post-copy pages included).",
        );
        out.sample("ums_migration_received_bytes_total", &[], g.bytes_received as f64);
        let page = page_size();
        let page_bytes = |d| g.postcopy_page_bytes.get(&d).copied().unwrap_or(0);
        out.family(
            "ums_postcopy_page_bytes_total",
            "counter",
            "Memory moved over the page link of post-copy migrations (lazy pages), by direction.",
        );
        for d in DIRECTIONS {
            out.sample("ums_postcopy_page_bytes_total", &[("direction", d.as_str())], page_bytes(d) as f64);
        }
        out.family(
            "ums_postcopy_pages_total",
            "counter",
            "Memory pages moved over the page link of post-copy migrations (lazy pages), by direction.",
        );
        for d in DIRECTIONS {
            out.sample("ums_postcopy_pages_total", &[("direction", d.as_str())], (page_bytes(d) / page) as f64);
        }
        drop(g);

        out.family("ums_connections_open", "gauge", "Client connections through the published ports, open now.");
        out.sample("ums_connections_open", &[], s.connections_open as f64);
        out.family("ums_connections_held", "gauge", "Client connections held now (a freeze is under way).");
        out.sample("ums_connections_held", &[], s.connections_held_now as f64);
        for (name, help, v) in [
            ("ums_connections_held_total", "Client connections held during freezes.", s.connections_held_total),
            (
                "ums_connections_forwarded_total",
                "Client connections forwarded to the destination after a migration.",
                s.connections_forwarded_total,
            ),
            (
                "ums_connections_refused_total",
                "Client connections refused (hold limit or timeout, nothing behind the port).",
                s.connections_refused_total,
            ),
        ] {
            out.family(name, "counter", help);
            out.sample(name, &[], v as f64);
        }
        // The process metrics every Prometheus client library exports.
        if let Some(v) = s.resident_bytes {
            out.family("process_resident_memory_bytes", "gauge", "Resident memory of ums itself.");
            out.sample("process_resident_memory_bytes", &[], v as f64);
        }
        if let Some(v) = s.cpu_seconds {
            out.family("process_cpu_seconds_total", "counter", "User and system CPU time of ums itself.");
            out.sample("process_cpu_seconds_total", &[], v);
        }
        if let Some(v) = s.start_time_seconds {
            out.family("process_start_time_seconds", "gauge", "Start time of ums, seconds since the Unix epoch.");
            out.sample("process_start_time_seconds", &[], v);
        }
        out.family("ums_build_info", "gauge", "The version of ums.");
        out.sample("ums_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        out.0
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |v| v.max(1) as u64)
}

/// ums's own resident memory, CPU time and start time, from /proc.
pub fn process_stats() -> (Option<u64>, Option<f64>, Option<f64>) {
    let Ok(me) = procfs::process::Process::myself() else { return (None, None, None) };
    let rss = me.status().ok().and_then(|s| s.vmrss).map(|k| k * 1024);
    let tps = procfs::ticks_per_second() as f64;
    let (cpu, start) = match me.stat() {
        Ok(st) => {
            let cpu = (st.utime + st.stime) as f64 / tps;
            let boot = procfs::boot_time_secs().ok();
            (Some(cpu), boot.map(|b| b as f64 + st.starttime as f64 / tps))
        }
        Err(_) => (None, None),
    };
    (rss, cpu, start)
}

/// The text format, built line by line.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(v));
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += h.counts[i];
            let le = number(*b);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, h.count as f64);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

/// A sample value as Prometheus writes it: integers without a fraction,
/// `+Inf`, `-Inf`, `NaN`.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and newline.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// HELP text escapes backslash and newline.
fn escape_help(s: &str) -> String {
    s.replace('\\', r"\\").replace('\n', r"\n")
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head (request line and headers) read from a scraper.
const MAX_HEAD: usize = 8 * 1024;

/// What a request head asks for: the status line and body to answer.
pub fn route(head: &[u8]) -> Route {
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next().unwrap_or("");
    let mut parts = first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Route::Error("400 Bad Request", "not an HTTP/1.x request\n");
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics { head_only: method == "HEAD" },
        (_, "/metrics") => Route::Error("405 Method Not Allowed", "GET /metrics\n"),
        _ => Route::Error("404 Not Found", "ums serves GET /metrics only\n"),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics { head_only: bool },
    Error(&'static str, &'static str),
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

/// Serve `GET /metrics` on `listener` until `shutdown` fires: one request
/// per connection, answered and closed (what Prometheus' scraper needs, and
/// no more). `render` asks the supervisor for the text.
pub async fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    render: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send,
{
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let render = render.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, render).await {
                            tracing::debug!(error = %e, "metrics connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn answer<F, Fut>(mut stream: tokio::net::TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            if head.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too long"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    let reply = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Err(_) => response("408 Request Timeout", "text/plain", "no request within 10 s\n", false),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::Other => {
            response("431 Request Header Fields Too Large", "text/plain", "request head too long\n", false)
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => match route(&head) {
            Route::Metrics { head_only } => match render().await {
                Some(text) => response("200 OK", CONTENT_TYPE, &text, head_only),
                None => response("503 Service Unavailable", "text/plain", "ums is shutting down\n", head_only),
            },
            Route::Error(status, body) => response(status, "text/plain", body, false),
        },
    };
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line is a comment or `name{labels} value`, each family is
    /// declared once before its samples, and a name's samples follow
    /// one another.
    fn check_format(text: &str) -> BTreeMap<String, f64> {
        let mut samples = BTreeMap::new();
        let mut declared: Vec<String> = Vec::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(!declared.contains(&name.to_string()), "{name} declared twice");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                declared.push(name.into());
                types.insert(name.into(), kind.into());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                x => x.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let name = series.split('{').next().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{name}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).map(String::as_str) == Some("histogram")))
                .unwrap_or(name);
            assert_eq!(declared.last().map(String::as_str), Some(family), "{line}: not under its # TYPE");
            if types[family] == "counter" {
                assert!(family.ends_with("_total"), "counter {family} must end in _total");
            }
            assert!(samples.insert(series.to_string(), v).is_none(), "{series} twice");
        }
        samples
    }

    #[test]
    fn numbers_are_written_as_prometheus_does() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(1e20), "100000000000000000000");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), r"x\ny");
        let m = Metrics::default();
        m.migration_failed(Direction::Out, MigrationMode::StopCopy, "odd \"reason\"\n");
        let text = m.render(&Snapshot { state: "running", ..Default::default() });
        assert!(text.contains(r#"reason="odd \"reason\"\n"} 1"#), "{text}");
        check_format(&text);
    }

    #[test]
    fn a_fresh_ums_exports_every_family_at_zero() {
        let m = Metrics::default();
        let s = check_format(&m.render(&Snapshot { state: "standby", ..Default::default() }));
        assert_eq!(s[r#"ums_workload_state{state="standby"}"#], 1.0);
        assert_eq!(s[r#"ums_workload_state{state="running"}"#], 0.0);
        assert_eq!(s[r#"ums_migrations_started_total{direction="out",mode="stop-copy"}"#], 0.0);
        assert_eq!(s[r#"ums_migrations_failed_total{direction="in",mode="post-copy",reason="restore"}"#], 0.0);
        assert_eq!(s[r#"ums_migrations_failed_total{direction="out",mode="stop-copy",reason="connect"}"#], 0.0);
        let failed = s.keys().filter(|k| k.starts_with("ums_migrations_failed_total{")).count();
        assert_eq!(failed, MODES.len() * (OUT_REASONS.len() + IN_REASONS.len()));
        assert_eq!(s[r#"ums_migration_duration_seconds_count{direction="out",mode="stop-copy"}"#], 0.0);
        assert_eq!(s["ums_migration_in_doubt"], 0.0);
        assert_eq!(s["ums_workload_restarts_total"], 0.0);
        assert!(!s.keys().any(|k| k.starts_with("ums_migration_last_")), "no last migration yet");
    }

    #[test]
    fn migrations_move_the_counters_and_histograms() {
        let m = Metrics::default();
        m.workload_started(StartKind::Image);
        m.migration_started(Direction::Out, MigrationMode::StopCopy);
        m.migration_failed(Direction::Out, MigrationMode::StopCopy, "refused");
        m.workload_started(StartKind::Migration);
        m.migration_started(Direction::Out, MigrationMode::StopCopy);
        m.bytes_sent(1000);
        m.migration_out_succeeded(MigrationMode::StopCopy, Measured { duration: 1.5, downtime: 0.3, freeze: 0.01 });
        m.migration_started(Direction::In, MigrationMode::PostCopy);
        m.bytes_received(500);
        m.postcopy_page_bytes(Direction::In, 3 * page_size());
        m.migration_in_succeeded(MigrationMode::PostCopy, Duration::from_millis(700));
        m.migration_in_doubt(MigrationMode::PostCopy);
        let text = m.render(&Snapshot {
            state: "busy",
            operation: Some("migrate".into()),
            in_doubt: true,
            resident_bytes: Some(4096),
            cpu_seconds: Some(0.5),
            ..Default::default()
        });
        let s = check_format(&text);
        assert_eq!(s[r#"ums_workload_state{state="busy"}"#], 1.0);
        assert_eq!(s[r#"ums_operation{op="migrate"}"#], 1.0);
        assert_eq!(s[r#"ums_migrations_started_total{direction="out",mode="stop-copy"}"#], 2.0);
        assert_eq!(s[r#"ums_migrations_succeeded_total{direction="out",mode="stop-copy"}"#], 1.0);
        assert_eq!(s[r#"ums_migrations_failed_total{direction="out",mode="stop-copy",reason="refused"}"#], 1.0);
        assert_eq!(s[r#"ums_migrations_failed_total{direction="out",mode="stop-copy",reason="connect"}"#], 0.0);
        assert_eq!(s[r#"ums_migrations_succeeded_total{direction="in",mode="post-copy"}"#], 1.0);
        assert_eq!(s[r#"ums_migrations_in_doubt_total{direction="out",mode="post-copy"}"#], 1.0);
        assert_eq!(s["ums_migration_in_doubt"], 1.0);
        assert_eq!(s[r#"ums_migration_last_downtime_seconds{mode="stop-copy"}"#], 0.3);
        assert_eq!(s[r#"ums_migration_last_duration_seconds{mode="stop-copy"}"#], 1.5);
        // 1.5 s: not in the 1 s bucket, in the 2.5 s one and all above.
        let b = |le: &str| {
            s[&format!(r#"ums_migration_duration_seconds_bucket{{direction="out",mode="stop-copy",le="{le}"}}"#)]
        };
        assert_eq!((b("1"), b("2.5"), b("300"), b("+Inf")), (0.0, 1.0, 1.0, 1.0));
        assert_eq!(s[r#"ums_migration_duration_seconds_sum{direction="out",mode="stop-copy"}"#], 1.5);
        assert_eq!(s[r#"ums_migration_downtime_seconds_bucket{mode="stop-copy",le="0.5"}"#], 1.0);
        assert_eq!(s[r#"ums_migration_downtime_seconds_bucket{mode="stop-copy",le="0.25"}"#], 0.0);
        assert_eq!(s["ums_migration_sent_bytes_total"], 1000.0);
        assert_eq!(s["ums_migration_received_bytes_total"], 500.0);
        assert_eq!(s[r#"ums_postcopy_pages_total{direction="in"}"#], 3.0);
        assert_eq!(s[r#"ums_workload_starts_total{how="migration"}"#], 1.0);
        assert_eq!(s["ums_workload_restarts_total"], 1.0);
        assert_eq!(s["process_resident_memory_bytes"], 4096.0);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let mut h = Histogram::default();
        for v in [0.05, 0.3, 7.0, 1000.0] {
            h.observe(v);
        }
        let mut t = Text::default();
        t.family("x_seconds", "histogram", "x");
        t.histogram("x_seconds", &[], &h);
        let s = check_format(&t.0);
        let mut last = 0.0;
        for b in BUCKETS {
            let v = s[&format!(r#"x_seconds_bucket{{le="{}"}}"#, number(b))];
            assert!(v >= last);
            last = v;
        }
        assert_eq!(last, 3.0, "1000 s is above every bound");
        assert_eq!(s[r#"x_seconds_bucket{le="+Inf"}"#], 4.0);
        assert_eq!(s["x_seconds_count"], 4.0);
        assert_eq!(s["x_seconds_sum"], 1007.35);
    }

    #[test]
    fn process_stats_read_this_process() {
        let (rss, cpu, start) = process_stats();
        assert!(rss.unwrap() > 0);
        assert!(cpu.unwrap() >= 0.0);
        assert!(start.unwrap() > 1.6e9);
    }

    #[test]
    fn requests_are_routed() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics { head_only: false });
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics { head_only: false });
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Route::Metrics { head_only: true });
        assert!(matches!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::Error(s, _) if s.starts_with("405")));
        assert!(matches!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::Error(s, _) if s.starts_with("404")));
        assert!(matches!(route(b"\x16\x03\x01 tls"), Route::Error(s, _) if s.starts_with("400")));
        assert!(matches!(route(b""), Route::Error(s, _) if s.starts_with("400")));
    }

    #[tokio::test]
    async fn the_http_server_answers_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(serve_http(l, || async { Some("x_total 1\n".to_string()) }, stop_rx));
        let get = |req: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("Content-Length: 10\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        let nf = get("GET /other HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    }
}
