//! Section 4: ums beside the migration methods a user can pick today, in the
//! same run, on the same two hosts (issue 7):
//!
//! 1. **ums**: `ums migrate --mode stop-copy` (streaming dump, mutual
//!    TLS), and ums's other modes: `--mode pre-copy`, `--mode post-copy`
//!    and `--mode auto` (the default, which chooses among them; the bench
//!    notes its choice);
//! 2. **stop-then-copy**, UMS's container-level method reproduced in the same
//!    outer containers: `ums checkpoint --stop` to the source's tmpfs, the
//!    whole directory (CRIU images and the writable layer) copied with tar
//!    over TCP once the dump has ended, then `ums restore` at the destination;
//! 3. **CRIU page server**: `criu page-server` started in the destination
//!    outer container, `ums checkpoint --stop --page-server` sends the pages
//!    to it while dumping, the other image files and the writable layer
//!    follow with tar over TCP, then `ums restore`;
//! 4. **podman**: `podman container checkpoint --export`, the archive copied
//!    over TCP, `podman container restore --import`, each host with its own
//!    podman (its own storage) (`podman.rs`).
//!
//! Every method moves the same memctr workload between the same two network
//! namespaces over the same (rate-limited) veth pair. Migration time is the
//! bench's own clock from the first command of the method until the command
//! that starts the workload at the destination returned (for ums, minus the
//! `finish_ms` its report gives for ending the frozen copy at the source
//! after the destination confirmed it runs the workload); downtime is the gap
//! in the workload's counter minus its print interval (UMS section IV-B);
//! "link MiB" counts the bytes both hosts sent on the link (`ip -s link`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
pub use ums_e2e::copy::pipe_over_tcp;
use ums_e2e::copy::{proc_root, start_page_server, tar_dir_over_tcp};
use ums_e2e::{Host, OciImage, Outer, Tick};

use crate::common::*;

/// Long enough for a 1 GiB workload to touch its memory on a busy machine.
pub const START: Duration = Duration::from_secs(240);
pub const CONTINUE: Duration = Duration::from_secs(120);
/// The port ums listens on for peers in every outer container.
const PEER_PORT: u16 = 7411;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Ums,
    UmsPreCopy,
    UmsPostCopy,
    UmsAuto,
    StopCopy,
    PageServer,
    Podman,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Ums,
        Method::UmsPreCopy,
        Method::UmsPostCopy,
        Method::UmsAuto,
        Method::StopCopy,
        Method::PageServer,
        Method::Podman,
    ];

    /// ums's `--mode` for this method, if it is one of ums's.
    pub fn ums_mode(self) -> Option<&'static str> {
        match self {
            Method::Ums => Some("stop-copy"),
            Method::UmsPreCopy => Some("pre-copy"),
            Method::UmsPostCopy => Some("post-copy"),
            Method::UmsAuto => Some("auto"),
            _ => None,
        }
    }

    /// The name used on the command line (`--methods`).
    pub fn key(self) -> &'static str {
        match self {
            Method::Ums => "ums",
            Method::UmsPreCopy => "ums-pre-copy",
            Method::UmsPostCopy => "ums-post-copy",
            Method::UmsAuto => "ums-auto",
            Method::StopCopy => "stop-copy",
            Method::PageServer => "page-server",
            Method::Podman => "podman",
        }
    }

    /// The name used in tables and the plot's legend.
    pub fn title(self) -> &'static str {
        match self {
            Method::Ums => "ums migrate",
            Method::UmsPreCopy => "ums pre-copy",
            Method::UmsPostCopy => "ums post-copy",
            Method::UmsAuto => "ums auto",
            Method::StopCopy => "stop-then-copy (UMS container-level)",
            Method::PageServer => "CRIU page server",
            Method::Podman => "podman checkpoint --export / restore --import",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Method> {
        Method::ALL.into_iter().find(|m| m.key() == s).with_context(|| {
            format!("unknown method {s:?} (ums, ums-pre-copy, ums-post-copy, ums-auto, stop-copy, page-server, podman)")
        })
    }
}

/// One workload: memctr touching `mib` MiB, as `procs` processes.
pub struct Workload {
    pub mib: u32,
    pub procs: u32,
    pub img: OciImage,
    /// memctr's compressible memory (`MEMCTR_COMPRESSIBLE=1`): its cells
    /// go under the link's name plus ", compressible memory".
    pub compressible: bool,
}

impl Workload {
    pub fn label(&self) -> String {
        if self.procs > 1 {
            format!("{} MiB, {} processes", self.mib, self.procs)
        } else {
            format!("{} MiB", self.mib)
        }
    }

    /// memctr's arguments (the image's Cmd).
    pub fn args(&self) -> Vec<String> {
        if self.procs > 1 {
            vec![self.mib.to_string(), self.procs.to_string()]
        } else {
            vec![self.mib.to_string()]
        }
    }
}

/// What a method needs for one figure: the two hosts, the workload, the runs.
pub struct Point<'a> {
    pub ums: &'a Path,
    pub ha: &'a Host,
    pub hb: &'a Host,
    /// `1gbit`, `unlimited`, ...
    pub link: &'a str,
    pub w: &'a Workload,
    pub runs: usize,
}

impl Point<'_> {
    pub fn label(&self, m: Method) -> String {
        format!("{}, {}, {}", m.key(), self.link, self.w.label())
    }
}

/// One migration.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// From the first command of the method until the workload runs at the destination.
    pub total_s: f64,
    /// First tick at the destination minus last tick at the source minus the print interval.
    pub downtime_s: f64,
    /// Bytes both hosts sent on the link during the migration, in MiB.
    pub link_mib: f64,
    /// The method's own phases, in order (seconds; they may overlap).
    pub phases: Vec<(&'static str, f64)>,
    /// ums only: the largest growth of a ums process's resident memory (source
    /// or destination) during the migration, in MiB.
    pub mem_mib: Option<f64>,
    /// Anything odd (a counter that did not continue, ...).
    pub notes: Vec<String>,
    /// Time the method's last command spent after the workload ran at the
    /// destination (ums: ending the frozen copy); not part of `total_s`.
    pub after_s: f64,
}

/// The runs of one method at one point.
pub struct Cell {
    pub method: Method,
    pub link: String,
    pub mib: u32,
    pub procs: u32,
    pub runs: Vec<Run>,
    /// Why the series stopped early, or why the method could not run at all.
    pub error: Option<String>,
}

// ------------------------------------------------------------------ helpers

/// Bytes sent on the link so far by both hosts (`ip -s link` of `eth0`).
pub fn link_tx_bytes(ha: &Host, hb: &Host) -> anyhow::Result<u64> {
    let mut sum = 0;
    for h in [ha, hb] {
        let out = ums_e2e::run(Command::new("ip").args([
            "-n",
            h.name(),
            "-s",
            "-j",
            "link",
            "show",
            ums_e2e::host::LINK_DEV,
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("ip -s -j link: {out}"))?;
        sum += v[0]["stats64"]["tx"]["bytes"].as_u64().with_context(|| format!("no tx bytes in {out}"))?;
    }
    Ok(sum)
}

/// Counts the link's bytes from its creation until [`LinkMeter::mib`].
pub struct LinkMeter<'a> {
    ha: &'a Host,
    hb: &'a Host,
    start: u64,
}

impl<'a> LinkMeter<'a> {
    pub fn start(ha: &'a Host, hb: &'a Host) -> anyhow::Result<Self> {
        Ok(LinkMeter { ha, hb, start: link_tx_bytes(ha, hb)? })
    }

    pub fn mib(&self) -> anyhow::Result<f64> {
        Ok((link_tx_bytes(self.ha, self.hb)? - self.start) as f64 / 1048576.0)
    }
}

/// Downtime seen by the workload, and a note when the counter did not go on
/// from where it stopped.
pub fn downtime(last_src: Tick, first_dst: Tick, notes: &mut Vec<String>) -> f64 {
    if first_dst.n != last_src.n + 1 {
        notes.push(format!("counter: source ended at {}, destination began at {}", last_src.n, first_dst.n));
    }
    (first_dst.unix_ms as f64 - last_src.unix_ms as f64 - TICK_MS) / 1000.0
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss_hwm(pid: i32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> anyhow::Result<f64> {
        let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} for pid {pid}"))?;
        let v: f64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(v / 1024.0)
    };
    Ok((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Resets a process's VmHWM to its current RSS (`clear_refs` 5), so that the
/// next reading is the peak from now on; returns the current RSS.
fn reset_peak(pid: i32) -> anyhow::Result<f64> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").with_context(|| format!("clear_refs of pid {pid}"))?;
    Ok(rss_hwm(pid)?.0)
}

/// One side of a migration: an outer container and the host it runs on.
#[derive(Clone, Copy)]
struct Side<'a> {
    outer: &'a Outer,
    host: &'a Host,
}

/// `ums checkpoint|restore --json ...` in `o`; returns the reply's `total_ms` in seconds.
fn ums_step(o: &Outer, args: &[&str]) -> anyhow::Result<f64> {
    let out = o.ums_ok(args)?;
    Ok(field(&json_result(&out)?, "total_ms")? / 1000.0)
}

/// CPU time (user + system, all threads) a process has used, in seconds.
fn cpu_s(pid: i32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("unreadable /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).context("no utime")?.parse::<f64>()? + f.get(12).context("no stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn ums_once(mode: &str, src: Side<'_>, dst: Side<'_>, run: &mut Run) -> anyhow::Result<()> {
    let (ps, pd) = (src.outer.pid1(), dst.outer.pid1());
    let (rs, rd) = (reset_peak(ps)?, reset_peak(pd)?);
    let (cs, cd) = (cpu_s(ps)?, cpu_s(pd)?);
    let to = format!("{}:{PEER_PORT}", dst.host.addr());
    let out = src.outer.ums_ok(&["migrate", "--json", "--mode", mode, "--to", &to])?;
    let r = json_result(&out)?;
    if mode == "auto" {
        run.notes.push(format!("auto chose {}", r["choice"].as_str().unwrap_or("?")));
    }
    if let Some(ratio) = r["compression"]["ratio"].as_f64().filter(|x| *x > 1.05) {
        run.notes.push(format!("zstd level {}: data/wire ratio {ratio:.2}", r["compression"]["level"]));
    }
    let grown = (rss_hwm(ps)?.1 - rs).max(rss_hwm(pd)?.1 - rd);
    run.mem_mib = Some(grown);
    run.phases.push(("ums CPU source", cpu_s(ps)? - cs));
    run.phases.push(("ums CPU destination", cpu_s(pd)? - cd));
    for (name, key) in [("checkpoint", "checkpoint_ms"), ("transfer", "transfer_ms"), ("restore", "restore_ms")] {
        if let Ok(v) = field(&r, key) {
            run.phases.push((name, v / 1000.0));
        }
    }
    run.phases.push(("ums total_ms", field(&r, "total_ms")? / 1000.0));
    // ums answers once it has ended its frozen copy, after the destination
    // ran the workload: that part is not migration time.
    run.after_s = field(&r, "finish_ms")? / 1000.0;
    run.phases.push(("then ending the frozen copy", run.after_s));
    Ok(())
}

fn stop_copy_once(dir: &str, src: Side<'_>, dst: Side<'_>, run: &mut Run) -> anyhow::Result<()> {
    let t = Instant::now();
    ums_step(src.outer, &["checkpoint", "--json", "--stop", dir])?;
    run.phases.push(("checkpoint", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    tar_dir_over_tcp(src.outer, src.host, dst.outer, dst.host, dir)?;
    run.phases.push(("copy", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    ums_step(dst.outer, &["restore", "--json", dir])?;
    run.phases.push(("restore", t.elapsed().as_secs_f64()));
    Ok(())
}

fn page_server_once(dir: &str, src: Side<'_>, dst: Side<'_>, run: &mut Run) -> anyhow::Result<()> {
    let port = 20000 + rand::random::<u16>() % 20000;
    let mut server = start_page_server(dst.outer, dir, port)?;
    let ps = format!("{}:{port}", dst.host.addr());
    let t0 = Instant::now();
    let dumped = ums_step(src.outer, &["checkpoint", "--json", "--stop", "--page-server", &ps, dir]);
    if dumped.is_err() {
        let _ = server.kill();
    }
    let status = server.wait()?;
    dumped?;
    if !status.success() {
        bail!("criu page-server failed: {status} (its log is in {dir}/criu of the destination)");
    }
    run.phases.push(("dump + pages", t0.elapsed().as_secs_f64()));
    let listing = |o: &Outer| {
        let mut names: Vec<String> = std::fs::read_dir(proc_root(o, &format!("{dir}/criu")))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names.join(" ")
    };
    let received = listing(dst.outer);
    let t = Instant::now();
    tar_dir_over_tcp(src.outer, src.host, dst.outer, dst.host, dir)?;
    run.phases.push(("copy the rest", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    ums_step(dst.outer, &["restore", "--json", dir]).with_context(|| {
        format!(
            "page server received: {received}; source had: {}; destination has: {}",
            listing(src.outer),
            listing(dst.outer)
        )
    })?;
    run.phases.push(("restore", t.elapsed().as_secs_f64()));
    Ok(())
}

/// One migration by method `m` from `src` to `dst`, with the figures every
/// method shares (time, downtime, bytes on the link).
fn migrate_once(p: &Point<'_>, m: Method, i: usize, src: Side<'_>, dst: Side<'_>) -> anyhow::Result<Run> {
    let mut run = Run::default();
    let from_dst = dst.outer.log().len();
    let dir = format!("/run/bench-cmp-{}-{i}", std::process::id());
    let meter = LinkMeter::start(p.ha, p.hb)?;
    let t = Instant::now();
    let result = match m {
        Method::Ums | Method::UmsPreCopy | Method::UmsPostCopy | Method::UmsAuto => {
            ums_once(m.ums_mode().expect("a ums method"), src, dst, &mut run)
        }
        Method::StopCopy => stop_copy_once(&dir, src, dst, &mut run),
        Method::PageServer => page_server_once(&dir, src, dst, &mut run),
        Method::Podman => bail!("podman runs in its own containers (podman.rs)"),
    };
    run.total_s = t.elapsed().as_secs_f64() - run.after_s;
    run.link_mib = meter.mib()?;
    for side in [src, dst] {
        let path = proc_root(side.outer, &dir);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("rm -r {}", path.display()))?;
        }
    }
    result?;
    // The source's last tick may still be in the pipe: read it once the
    // destination has ticked a few times.
    let (_, first) = wait_tick(dst.outer.log(), from_dst, CONTINUE).context("no tick at the destination")?;
    wait_line(dst.outer.log(), from_dst, &format!("tick {} ", first.n + 2), CONTINUE)?;
    let last = *ticks(src.outer.log(), 0).last().context("no tick at the source")?;
    run.downtime_s = downtime(last, first, &mut run.notes);
    Ok(run)
}

/// `p.runs` migrations by `m` (ums, stop-then-copy or page server) between
/// two fresh outer containers, alternately A -> B and B -> A.
fn outer_series(p: &Point<'_>, m: Method, out: &mut Vec<Run>) -> anyhow::Result<()> {
    let mk = |side: &str, host: &Host, standby: bool| {
        let mut b = Outer::builder(&format!(
            "bench-cmp-{}-{}{}-{side}",
            m.key(),
            p.w.mib,
            if p.w.compressible { "z" } else { "" }
        ))
        .host(host)
        .layout(&p.w.img.layout)
        .ums(p.ums);
        if standby {
            b = b.args(&["--standby"]);
        }
        b.start()
    };
    let a = mk("a", p.ha, false)?;
    let b = mk("b", p.hb, true)?;
    wait_line(b.log(), 0, "standby", START).context("B did not reach standby")?;
    wait_line(a.log(), 0, "tick 5 ", START).context("the workload in A did not start ticking")?;
    let (sa, sb) = (Side { outer: &a, host: p.ha }, Side { outer: &b, host: p.hb });
    for i in 0..p.runs {
        check_interrupted()?;
        let forward = i % 2 == 0;
        progress(&format!("{}: run {}/{} ({})", p.label(m), i + 1, p.runs, if forward { "A->B" } else { "B->A" }));
        let r = if forward { migrate_once(p, m, i, sa, sb)? } else { migrate_once(p, m, i, sb, sa)? };
        out.push(r);
        // Let the new source settle (it ran the workload only a moment ago).
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// What section 4 runs.
pub struct Opts<'a> {
    pub ums: &'a Path,
    pub workloads: &'a [Workload],
    pub rates: &'a [Option<String>],
    pub methods: &'a [Method],
    pub runs: usize,
}

/// Every method at every point on every link; a method that fails at a point
/// keeps the runs it made and the error, and the bench goes on.
pub fn run(o: &Opts<'_>) -> anyhow::Result<Vec<Cell>> {
    let podman = if o.methods.contains(&Method::Podman) { Some(crate::podman::check()) } else { None };
    if let Some(Err(why)) = &podman {
        progress(&format!("podman cannot run here, its rows say why: {why}"));
    }
    let mut cells = Vec::new();
    for rate in o.rates {
        check_interrupted()?;
        let link = rate.clone().unwrap_or_else(|| "unlimited".into());
        let (ha, hb) = Host::pair("bench-cmp", rate.as_deref())?;
        for w in o.workloads {
            let link = if w.compressible { format!("{link}, compressible memory") } else { link.clone() };
            for &m in o.methods {
                check_interrupted()?;
                let p = Point { ums: o.ums, ha: &ha, hb: &hb, link: &link, w, runs: o.runs };
                let mut cell =
                    Cell { method: m, link: link.clone(), mib: w.mib, procs: w.procs, runs: Vec::new(), error: None };
                progress(&format!("{}: starting", p.label(m)));
                let result = match (m, &podman) {
                    (Method::Podman, Some(Err(why))) => Err(anyhow::anyhow!("podman cannot run here: {why}")),
                    (Method::Podman, _) => crate::podman::series(&p, &mut cell.runs),
                    _ => outer_series(&p, m, &mut cell.runs),
                };
                if let Err(e) = result {
                    check_interrupted()?;
                    progress(&format!("{}: FAILED after {} runs: {e:#}", p.label(m), cell.runs.len()));
                    cell.error = Some(format!("{e:#}"));
                }
                cells.push(cell);
            }
        }
    }
    Ok(cells)
}
