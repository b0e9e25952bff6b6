//! `ums-bench-clients`: what the published-port proxy of `ums` costs its
//! clients, and what they see through a live migration (issue 4's benchmark).
//!
//!     ums-bench-clients [--rounds N] [--requests N] [--clients N] [--rate RATE] [--no-timeline]
//!                       [--png PATH] [--verbose]
//!
//! One image: busybox httpd serving a 64 MiB file on 8081 (bulk data) and
//! `websrv` (tests/workloads/websrv.c) answering small HTTP responses on 8080
//! (UDP echo on 5353). Two simulated hosts joined by a veth pair (no rate
//! limit, or `--rate`: tc tbf on both ends, e.g. 1gbit); outer container A
//! runs the workload, B is a standby.
//!
//! 1. Throughput: HTTP GETs of the 64 MiB file, 1 and 4 parallel connections,
//!    direct to the nested container's address (10.88.0.2, no proxy) beside the
//!    published port (through ums's proxy), from two places: a client in A's
//!    own network namespace (direct: over the nested veth; proxy: 127.0.0.1)
//!    and a client on host B (direct: routed through A to 10.88.0.2; proxy: A's
//!    address). Median of N rounds, direct and proxy interleaved.
//! 2. Added latency: thousands of sequential one-request connections to websrv,
//!    direct beside proxy, interleaved in blocks; p50/p90/p99/max.
//! 3. A timeline across a migration A → B: 50 clients on host B hammer A's
//!    published port 8080; every request's start, latency and outcome is
//!    recorded; the PNG (default docs/bench/migration-latency.png) plots them.
//!
//! Nothing is asserted. Tables go to stdout, progress to stderr, the output of
//! the outer containers to `target/ums-bench-clients.log` (stderr with
//! --verbose). Needs root, runc, CRIU and `$UMS_BIN` (use a release build).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ums_e2e::{build_websrv, Host, ImageBuilder, Outer};

const HTTP: u16 = 8080;
const BULK: u16 = 8081;
const BIG_MIB: usize = 64;
/// The nested container's address (ums's default, shim/src/config.rs).
const NESTED: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const T: Duration = Duration::from_secs(60);

struct Opts {
    rounds: usize,
    requests: usize,
    clients: usize,
    rate: Option<String>,
    timeline: bool,
    png: PathBuf,
    verbose: bool,
}

const USAGE: &str = "usage: ums-bench-clients [--rounds N] [--requests N] [--clients N] [--rate RATE] [--no-timeline]
                         [--png PATH] [--verbose]
  --rounds N     throughput rounds per figure (median and min–max; default 5)
  --requests N   sequential latency requests per path and client place (default 5000)
  --clients N    concurrent clients in the migration timeline (default 50)
  --rate RATE    rate limit of the link between the two hosts (tc tbf, e.g. 1gbit; default none)
  --no-timeline  skip the migration timeline (section 3) and its figure
  --png PATH     the timeline figure (default docs/bench/migration-latency.png)
  --verbose      output of the outer containers to stderr (default: target/ums-bench-clients.log)
environment: UMS_BIN  the ums binary (default target/debug/ums; use a release build)";

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        requests: 5000,
        clients: 50,
        rate: None,
        timeline: true,
        png: ums_e2e::workspace_root().join("docs/bench/migration-latency.png"),
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> anyhow::Result<usize> {
            let v = args.next().with_context(|| format!("{a} needs {what}"))?;
            let n: usize = v.parse().with_context(|| format!("{a} {v:?}"))?;
            anyhow::ensure!(n > 0, "{a} must be at least 1");
            Ok(n)
        };
        match a.as_str() {
            "--rounds" => o.rounds = num("a number")?,
            "--requests" => o.requests = num("a number")?,
            "--clients" => o.clients = num("a number")?,
            "--rate" => o.rate = Some(args.next().context("--rate needs a rate (tc syntax, e.g. 1gbit)")?),
            "--no-timeline" => o.timeline = false,
            "--png" => o.png = args.next().context("--png needs a path")?.into(),
            "--verbose" | "-v" => o.verbose = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

static PROGRESS: Mutex<Option<File>> = Mutex::new(None);

fn progress(msg: &str) {
    match PROGRESS.lock().unwrap().as_mut() {
        Some(f) => {
            let _ = writeln!(f, "ums-bench-clients: {msg}");
        }
        None => eprintln!("ums-bench-clients: {msg}"),
    }
}

/// Runs `f` on a thread that lives in the network namespace at `netns`.
fn in_netns<R: Send + 'static>(netns: PathBuf, f: impl FnOnce() -> R + Send + 'static) -> std::thread::JoinHandle<R> {
    std::thread::spawn(move || {
        let ns = File::open(&netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// One HTTP/1.0 GET on a fresh connection; returns the bytes received
/// (headers included). Errors on anything but a 200.
fn get(addr: SocketAddr, path: &str, buf: &mut [u8]) -> Result<u64, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut total = 0u64;
    let mut head_ok = None;
    loop {
        match s.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                if head_ok.is_none() {
                    head_ok = Some(buf[..n].starts_with(b"HTTP/1.0 200") || buf[..n].starts_with(b"HTTP/1.1 200"));
                }
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    match head_ok {
        Some(true) => Ok(total),
        Some(false) => Err(format!("not a 200: {:?}", String::from_utf8_lossy(&buf[..buf.len().min(40)]))),
        None => Err("empty response".into()),
    }
}

fn wait_answers(netns: PathBuf, addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    in_netns(netns, move || {
        let until = Instant::now() + within;
        let mut buf = vec![0u8; 4096];
        loop {
            match get(addr, "/", &mut buf) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > until => return Err(anyhow::anyhow!("{addr} does not answer: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (pct(&s, 50.0), s[0], s[s.len() - 1])
}

/// A place clients run, and the two ways it reaches the workload.
#[derive(Clone)]
struct Place {
    name: &'static str,
    netns: PathBuf,
    /// Direct to the nested container (no proxy), if reachable.
    direct: Option<Ipv4Addr>,
    /// The published port's address (through the proxy).
    proxy: Ipv4Addr,
}

// ---------------------------------------------------------------- section 1

/// CPU seconds (user + system, all threads) used so far by process `pid`.
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks: f64 = [11, 12].iter().filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok())).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// `conns` connections in parallel, each fetching the big file `gets` times.
/// Returns Gbit/s of HTTP bytes received.
fn bulk(netns: &Path, ip: Ipv4Addr, conns: usize, gets: usize) -> anyhow::Result<f64> {
    let addr = SocketAddr::from((ip, BULK));
    let start = Arc::new(std::sync::Barrier::new(conns + 1));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let start = start.clone();
            in_netns(netns.to_path_buf(), move || -> Result<u64, String> {
                let mut buf = vec![0u8; 256 * 1024];
                start.wait();
                let mut bytes = 0;
                for _ in 0..gets {
                    let n = get(addr, "/big", &mut buf)?;
                    if n < (BIG_MIB << 20) as u64 {
                        return Err(format!("short body: {n} bytes"));
                    }
                    bytes += n;
                }
                Ok(bytes)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut bytes = 0;
    for h in handles {
        bytes +=
            h.join().map_err(|_| anyhow::anyhow!("client panicked"))?.map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    }
    Ok(bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9)
}

fn throughput(places: &[Place], rounds: usize, ums_pid: i32) -> anyhow::Result<()> {
    println!();
    println!("1. Throughput: HTTP GET of a {BIG_MIB} MiB file from busybox httpd in the nested container,");
    println!(
        "   direct to {NESTED} beside the published port (ums proxy); Gbit/s, median (min–max) of {rounds} rounds"
    );
    println!();
    println!(
        "   (ums CPU: CPU time of outer A's ums process during the proxied runs / their wall time; 100% = one core)"
    );
    println!();
    println!(
        "   {:<22} {:>7} {:>9} {:>22} {:>22} {:>12} {:>8}",
        "client", "streams", "data", "direct", "through proxy", "proxy/direct", "ums CPU"
    );
    for p in places {
        let Some(direct_ip) = p.direct else {
            println!("   {:<22} (no direct path; skipped)", p.name);
            continue;
        };
        for (conns, gets) in [(1usize, 8usize), (4, 4)] {
            progress(&format!("throughput: {} with {conns} stream(s)", p.name));
            // Warm up both paths once.
            bulk(&p.netns, direct_ip, conns, 1)?;
            bulk(&p.netns, p.proxy, conns, 1)?;
            let (mut d, mut x) = (Vec::new(), Vec::new());
            let (mut cpu, mut wall) = (0.0, 0.0);
            let mut proxied = |x: &mut Vec<f64>| -> anyhow::Result<()> {
                let (c0, t0) = (cpu_s(ums_pid), Instant::now());
                x.push(bulk(&p.netns, p.proxy, conns, gets)?);
                cpu += cpu_s(ums_pid) - c0;
                wall += t0.elapsed().as_secs_f64();
                Ok(())
            };
            for r in 0..rounds {
                // Alternate which goes first, so drift hits both alike.
                if r % 2 == 0 {
                    d.push(bulk(&p.netns, direct_ip, conns, gets)?);
                    proxied(&mut x)?;
                } else {
                    proxied(&mut x)?;
                    d.push(bulk(&p.netns, direct_ip, conns, gets)?);
                }
            }
            let (dm, dl, dh) = median_min_max(&d);
            let (xm, xl, xh) = median_min_max(&x);
            println!(
                "   {:<22} {:>7} {:>9} {:>22} {:>22} {:>11.0}% {:>7.0}%",
                p.name,
                conns,
                format!("{} MiB", conns * gets * BIG_MIB),
                format!("{dm:.2} ({dl:.2}–{dh:.2})"),
                format!("{xm:.2} ({xl:.2}–{xh:.2})"),
                100.0 * xm / dm,
                100.0 * cpu / wall
            );
        }
    }
    println!("   target (issue 4): proxy ≥ 90% of direct");
    Ok(())
}

// ---------------------------------------------------------------- section 2

/// `n` sequential one-request connections to websrv; latencies in µs.
fn latencies(netns: &Path, ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<f64>> {
    let addr = SocketAddr::from((ip, HTTP));
    in_netns(netns.to_path_buf(), move || -> Result<Vec<f64>, String> {
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            get(addr, "/", &mut buf)?;
            out.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client panicked"))?
    .map_err(|e| anyhow::anyhow!("{addr}: {e}"))
}

fn latency(places: &[Place], requests: usize) -> anyhow::Result<()> {
    println!();
    println!("2. Latency of one small HTTP request (new TCP connection, GET, response, close) to websrv,");
    println!("   {requests} sequential requests per path, direct and proxy interleaved in blocks of 500; µs");
    println!();
    println!("   {:<22} {:<14} {:>8} {:>8} {:>8} {:>9}", "client", "path", "p50", "p90", "p99", "max");
    for p in places {
        let Some(direct_ip) = p.direct else {
            println!("   {:<22} (no direct path; skipped)", p.name);
            continue;
        };
        progress(&format!("latency: {}", p.name));
        latencies(&p.netns, direct_ip, 300)?;
        latencies(&p.netns, p.proxy, 300)?;
        let (mut d, mut x) = (Vec::new(), Vec::new());
        let block = 500.min(requests);
        let mut done = 0;
        while done < requests {
            let k = block.min(requests - done);
            d.extend(latencies(&p.netns, direct_ip, k)?);
            x.extend(latencies(&p.netns, p.proxy, k)?);
            done += k;
        }
        d.sort_by(f64::total_cmp);
        x.sort_by(f64::total_cmp);
        let row = |what: &str, v: &[f64]| {
            println!(
                "   {:<22} {:<14} {:>8.0} {:>8.0} {:>8.0} {:>9.0}",
                p.name,
                what,
                pct(v, 50.0),
                pct(v, 90.0),
                pct(v, 99.0),
                v[v.len() - 1]
            )
        };
        row("direct", &d);
        row("through proxy", &x);
        println!(
            "   {:<22} {:<14} {:>8.0} {:>8.0} {:>8.0} {:>9}",
            p.name,
            "added",
            pct(&x, 50.0) - pct(&d, 50.0),
            pct(&x, 90.0) - pct(&d, 90.0),
            pct(&x, 99.0) - pct(&d, 99.0),
            ""
        );
    }
    println!("   target (issue 4): p50 added ≤ 100 µs");
    Ok(())
}

// ---------------------------------------------------------------- section 3

#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the load started.
    start: f64,
    latency_ms: f64,
    ok: bool,
}

struct Timeline {
    samples: Vec<Sample>,
    errors: Vec<String>,
    /// The `ums migrate` command, seconds since the load started.
    cmd_start: f64,
    cmd_end: f64,
    report: serde_json::Value,
    end: f64,
    clients: usize,
}

fn timeline(a: &Outer, ha: &Host, hb: &Host, clients: usize) -> anyhow::Result<Timeline> {
    progress(&format!("timeline: {clients} clients, migration A → B in the middle"));
    let target = SocketAddr::from((ha.addr(), HTTP));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            in_netns(hb.netns_path(), move || {
                let mut buf = vec![0u8; 4096];
                let (mut samples, mut errors) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let s = Instant::now();
                    let r = get(target, "/", &mut buf);
                    let latency_ms = s.elapsed().as_secs_f64() * 1000.0;
                    let start = s.duration_since(t0).as_secs_f64();
                    samples.push(Sample { start, latency_ms, ok: r.is_ok() });
                    if let Err(e) = r {
                        errors.push(format!("at {start:.3} s: {e}"));
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let cmd_start = t0.elapsed().as_secs_f64();
    let out = a.ums(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:7411", hb.addr())]);
    let cmd_end = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        let (s, e) = h.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
        samples.extend(s);
        errors.extend(e);
    }
    let end = t0.elapsed().as_secs_f64();
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("ums migrate failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    samples.sort_by(|x, y| x.start.total_cmp(&y.start));
    Ok(Timeline { samples, errors, cmd_start, cmd_end, report: v["result"].clone(), end, clients })
}

impl Timeline {
    fn num(&self, key: &str) -> f64 {
        self.report[key].as_f64().unwrap_or(f64::NAN)
    }

    /// The freeze, estimated in load time: ums's own clock starts `total_ms`
    /// before the CLI returned; the freeze begins after the pre-migration.
    fn freeze(&self) -> (f64, f64) {
        let daemon_start = self.cmd_end - self.num("total_ms") / 1000.0;
        let from = daemon_start + self.num("pre_migration_ms") / 1000.0;
        (from, from + self.num("frozen_ms") / 1000.0)
    }

    fn print(&self, clients: usize) {
        let mut lat: Vec<f64> = self.samples.iter().filter(|s| s.ok).map(|s| s.latency_ms).collect();
        lat.sort_by(f64::total_cmp);
        let (f0, f1) = self.freeze();
        let slow = self.samples.iter().filter(|s| s.latency_ms > 100.0).count();
        let before = self.samples.iter().filter(|s| s.start + s.latency_ms / 1000.0 < self.cmd_start).count();
        println!();
        println!("3. Request latency across a live migration A → B ({clients} clients on host B → A's published port {HTTP})");
        println!();
        println!(
            "   requests           {} ({} completed before `ums migrate` started), over {:.1} s",
            self.samples.len(),
            before,
            self.end
        );
        println!("   errors             {}", self.errors.len());
        for e in self.errors.iter().take(5) {
            println!("                      {e}");
        }
        println!("   latency p50        {:.2} ms", pct(&lat, 50.0));
        println!("   latency p99        {:.2} ms", pct(&lat, 99.0));
        println!("   latency max        {:.1} ms", lat.last().copied().unwrap_or(f64::NAN));
        println!("   requests > 100 ms  {slow}");
        println!("   frozen_ms          {:.1}   (ums migrate --json report)", self.num("frozen_ms"));
        println!(
            "   report             total {:.0} ms, pre-migration {:.0} ms, checkpoint {:.0} ms, restore {:.0} ms, {} bytes",
            self.num("total_ms"),
            self.num("pre_migration_ms"),
            self.num("checkpoint_ms"),
            self.num("restore_ms"),
            self.report["bytes"]
        );
        println!(
            "   `ums migrate`      {:.3} s → {:.3} s after the load started; freeze ≈ {:.3} s → {:.3} s",
            self.cmd_start, self.cmd_end, f0, f1
        );
    }
}

// ---------------------------------------------------------------- the figure

mod figure {
    use plotters::prelude::*;
    use ums_bench::plot::{nice_step, Align, Label};

    use super::Timeline;

    const W: u32 = 1280;
    const H: u32 = 820;

    fn decade_label(v: f64) -> String {
        if v >= 1.0 {
            format!("{v:.0}")
        } else {
            format!("{v}")
        }
    }

    /// Renders the timeline to a PNG; returns whether text could be drawn.
    pub fn render(t: &Timeline, path: &std::path::Path) -> anyhow::Result<bool> {
        let mut buf = vec![255u8; (W * H * 3) as usize];
        let mut labels: Vec<Label> = Vec::new();
        let black = [0, 0, 0];
        let lab = |labels: &mut Vec<Label>, x: i32, y: i32, text: String, px: f32, align: Align, color: [u8; 3]| {
            labels.push(Label::new(x, y, text, px, align, color))
        };
        let (f0, f1) = t.freeze();
        let xmax = t.end.ceil().max(1.0);
        let max_lat = t.samples.iter().map(|s| s.latency_ms).fold(0.0, f64::max);
        let min_lat = t.samples.iter().map(|s| s.latency_ms).fold(f64::INFINITY, f64::min);
        let mut ymin = 1.0f64;
        while ymin > min_lat.max(0.001) {
            ymin /= 10.0;
        }
        let mut ymax = 1.0f64;
        while ymax < max_lat * 1.2 {
            ymax *= 10.0;
        }
        // Completions per 100 ms bin, as requests/s.
        // Only whole bins before the clients stopped.
        let bins = (t.end * 10.0).floor() as usize;
        let mut done = vec![0u64; bins];
        for s in t.samples.iter().filter(|s| s.ok) {
            let b = ((s.start + s.latency_ms / 1000.0) * 10.0) as usize;
            if b < bins {
                done[b] += 1;
            }
        }
        let rate_max = done.iter().copied().max().unwrap_or(1) as f64 * 10.0 * 1.15;
        {
            let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
            let (top, bottom) = root.split_vertically(560);
            let mut c1 = ChartBuilder::on(&top)
                .margin_top(50)
                .margin_right(30)
                .margin_left(90)
                .margin_bottom(30)
                .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())?;
            let mut c2 = ChartBuilder::on(&bottom)
                .margin_top(20)
                .margin_right(30)
                .margin_left(90)
                .margin_bottom(60)
                .build_cartesian_2d(0f64..xmax, 0f64..rate_max)?;
            let grid = RGBColor(225, 225, 225);
            let freeze_fill = RGBColor(255, 220, 200);
            // Freeze window and grid, behind the data.
            c1.draw_series(std::iter::once(Rectangle::new([(f0, ymin), (f1, ymax)], freeze_fill.filled())))?;
            c2.draw_series(std::iter::once(Rectangle::new([(f0, 0.0), (f1, rate_max)], freeze_fill.filled())))?;
            let xstep = if xmax > 12.0 { 2.0 } else { 1.0 };
            let xticks: Vec<f64> = (0..=(xmax / xstep) as usize).map(|i| i as f64 * xstep).collect();
            let mut decades = Vec::new();
            let mut d = ymin;
            while d <= ymax * 1.0001 {
                decades.push(d);
                d *= 10.0;
            }
            for &x in &xticks {
                c1.draw_series(LineSeries::new([(x, ymin), (x, ymax)], grid))?;
                c2.draw_series(LineSeries::new([(x, 0.0), (x, rate_max)], grid))?;
            }
            for &y in &decades {
                c1.draw_series(LineSeries::new([(0.0, y), (xmax, y)], grid))?;
            }
            let rstep = nice_step(rate_max / 4.0);
            let rticks: Vec<f64> = (0..).map(|i| i as f64 * rstep).take_while(|v| *v <= rate_max).collect();
            for &y in &rticks {
                c2.draw_series(LineSeries::new([(0.0, y), (xmax, y)], grid))?;
            }
            // Data.
            let blue = RGBColor(31, 90, 200).mix(0.35);
            c1.draw_series(
                t.samples
                    .iter()
                    .filter(|s| s.ok)
                    .map(|s| Circle::new((s.start, s.latency_ms.max(ymin)), 2, blue.filled())),
            )?;
            c1.draw_series(
                t.samples
                    .iter()
                    .filter(|s| !s.ok)
                    .map(|s| Cross::new((s.start, s.latency_ms.max(ymin)), 5, RED.stroke_width(2))),
            )?;
            c2.draw_series(LineSeries::new(
                done.iter().enumerate().map(|(i, n)| (i as f64 / 10.0 + 0.05, *n as f64 * 10.0)),
                RGBColor(31, 90, 200).stroke_width(2),
            ))?;
            // `ums migrate` start and end.
            let mark = RGBColor(90, 90, 90).stroke_width(2);
            for x in [t.cmd_start, t.cmd_end] {
                c1.draw_series(DashedLineSeries::new([(x, ymin), (x, ymax)], 6, 4, mark))?;
                c2.draw_series(DashedLineSeries::new([(x, 0.0), (x, rate_max)], 6, 4, mark))?;
            }
            // Axes boxes.
            c1.draw_series(std::iter::once(Rectangle::new([(0.0, ymin), (xmax, ymax)], BLACK.stroke_width(1))))?;
            c2.draw_series(std::iter::once(Rectangle::new([(0.0, 0.0), (xmax, rate_max)], BLACK.stroke_width(1))))?;

            // Text, placed now (pixel positions), drawn after plotters is done.
            for &x in &xticks {
                let (px, py) = c2.backend_coord(&(x, 0.0));
                lab(&mut labels, px, py + 14, format!("{x:.0}"), 15.0, Align::Center, black);
            }
            for &y in &decades {
                let (px, py) = c1.backend_coord(&(0.0, y));
                lab(&mut labels, px - 8, py, decade_label(y), 15.0, Align::Right, black);
            }
            for &y in &rticks {
                let (px, py) = c2.backend_coord(&(0.0, y));
                lab(&mut labels, px - 8, py, format!("{y:.0}"), 15.0, Align::Right, black);
            }
            let (lx, _) = c2.backend_coord(&(xmax / 2.0, 0.0));
            let (_, by) = c2.backend_coord(&(0.0, 0.0));
            lab(&mut labels, lx, by + 40, "time since the clients started (s)".into(), 17.0, Align::Center, black);
            let (l1x, t1y) = c1.backend_coord(&(0.0, ymax));
            lab(
                &mut labels,
                l1x,
                t1y - 12,
                "request latency (ms, log scale); one dot per request, red x = failed".into(),
                16.0,
                Align::Left,
                black,
            );
            let (l2x, t2y) = c2.backend_coord(&(0.0, rate_max));
            lab(&mut labels, l2x, t2y - 10, "completed requests/s (100 ms bins)".into(), 16.0, Align::Left, black);
            let (_, t0y) = c1.backend_coord(&(0.0, ymax));
            lab(
                &mut labels,
                (W / 2) as i32,
                t0y - 36,
                format!(
                    "{} clients through ums's published port while the workload migrates A → B: {} requests, {} errors",
                    t.clients,
                    t.samples.len(),
                    t.errors.len()
                ),
                18.0,
                Align::Center,
                black,
            );
            let (sx, _) = c1.backend_coord(&(t.cmd_start, ymax));
            lab(&mut labels, sx - 6, t1y + 14, "ums migrate".into(), 14.0, Align::Right, [70, 70, 70]);
            let (ex, _) = c1.backend_coord(&(t.cmd_end, ymax));
            lab(&mut labels, ex + 6, t1y + 14, "returns".into(), 14.0, Align::Left, [70, 70, 70]);
            let (fx, fy) = c1.backend_coord(&((f0 + f1) / 2.0, ymin));
            lab(
                &mut labels,
                fx,
                fy - 14,
                format!("frozen {:.0} ms", t.num("frozen_ms")),
                14.0,
                Align::Center,
                [190, 80, 30],
            );
            root.present()?;
        }
        ums_bench::plot::finish(&mut buf, (W, H), &labels, path)
    }
}

// ---------------------------------------------------------------- main

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn run(o: &Opts) -> anyhow::Result<()> {
    ums_e2e::require_root();
    let ums = ums_e2e::ums_bin()?;
    println!("ums-bench-clients");
    println!("  ums:     {}", ums.display());
    println!("  machine: {}", machine());
    println!("  load:    {} (1, 5, 15 min) at the start", loadavg());
    println!(
        "  link:    {}",
        o.rate.as_deref().map_or("veth, no rate limit".into(), |r| format!("veth, tc tbf rate {r}"))
    );

    let tmp = tempfile::Builder::new().prefix(&ums_e2e::unique_name("bench-clients")).tempdir()?;
    progress("building the workload image");
    let memctr = ums_e2e::workload::try_build_workload(tmp.path())?;
    let websrv = std::fs::read(build_websrv(tmp.path()))?;
    let img = ImageBuilder::new(&memctr)
        .file("bin/websrv", websrv, 0o755)
        .file("www/big", vec![0x5au8; BIG_MIB << 20], 0o644)
        .entrypoint(&["/bin/sh", "-c", "httpd -p 8081 -h /www && exec /bin/websrv 8080 5353"])
        .expose("8080/tcp")
        .expose("8081/tcp")
        .expose("5353/udp")
        .build(&tmp.path().join("layout"))?;

    progress("starting two hosts and two outer containers");
    let (ha, hb) = Host::pair("bcli", o.rate.as_deref())?;
    let a = Outer::builder("bcli-a").host(&ha).layout(&img.layout).start()?;
    let b = Outer::builder("bcli-b").host(&hb).layout(&img.layout).args(&["--standby"]).start()?;
    a.wait_for_line("listening", T)?;
    b.wait_for_line("standby", T)?;
    wait_answers(hb.netns_path(), SocketAddr::from((ha.addr(), HTTP)), Duration::from_secs(10))?;

    // A route from host B to the nested address through A, for the direct
    // path from B (replies go back by conntrack, untouched by ums's NAT).
    let _ = ums_e2e::run(ha.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    let routed = ums_e2e::run(std::process::Command::new("ip").args([
        "-n",
        hb.name(),
        "route",
        "add",
        &format!("{NESTED}/32"),
        "via",
        &ha.addr().to_string(),
    ]))
    .map_err(|e| progress(&format!("no route from B to {NESTED}: {e:#}")))
    .is_ok()
        && wait_answers(hb.netns_path(), SocketAddr::from((NESTED, HTTP)), Duration::from_secs(3))
            .map_err(|e| progress(&format!("B cannot reach {NESTED} directly: {e:#}")))
            .is_ok();
    let places = [
        Place { name: "in outer A's netns", netns: ha.netns_path(), direct: Some(NESTED), proxy: Ipv4Addr::LOCALHOST },
        Place {
            name: "on host B (veth link)",
            netns: hb.netns_path(),
            direct: routed.then_some(NESTED),
            proxy: ha.addr(),
        },
    ];
    wait_answers(ha.netns_path(), SocketAddr::from((NESTED, HTTP)), Duration::from_secs(3))?;

    throughput(&places, o.rounds, a.pid1())?;
    latency(&places, o.requests)?;
    if routed {
        let _ = ums_e2e::run(std::process::Command::new("ip").args([
            "-n",
            hb.name(),
            "route",
            "del",
            &format!("{NESTED}/32"),
        ]));
    }

    if o.timeline {
        let t = timeline(&a, &ha, &hb, o.clients)?;
        t.print(o.clients);
        progress(&format!("drawing {}", o.png.display()));
        let text = figure::render(&t, &o.png)?;
        println!();
        println!(
            "   figure: {}{}",
            o.png.display(),
            if text { "" } else { " (no TTF font found: drawn without text)" }
        );
    }
    drop((a, b));
    println!();
    println!("  load:    {} (1, 5, 15 min) at the end", loadavg());
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ums-bench-clients: {e:#}");
            std::process::exit(2);
        }
    };
    if !opts.verbose {
        let path = ums_e2e::target_dir().join("ums-bench-clients.log");
        if let Ok(f) = File::create(&path) {
            if let Ok(saved) = nix::unistd::dup(2) {
                // SAFETY: `saved` is a fresh descriptor that nothing else owns.
                *PROGRESS.lock().unwrap() = Some(unsafe { File::from_raw_fd(saved) });
                if nix::unistd::dup2(f.as_raw_fd(), 2).is_ok() {
                    progress(&format!("output of the outer containers: {}", path.display()));
                }
            }
        }
    }
    let result = run(&opts);
    let _ = std::io::stdout().flush();
    if let Err(e) = result {
        progress(&format!("failed: {e:#}"));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small synthetic timeline: the figure renders, decodes at its size and is not blank.
    #[test]
    fn figure_renders_a_synthetic_timeline() {
        let mut samples = Vec::new();
        let mut rng = 12345u64;
        for i in 0..3000 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = i as f64 * 0.003;
            let jitter = (rng >> 40) as f64 / (1u64 << 24) as f64;
            let in_freeze = (4.0..4.3).contains(&start);
            let latency_ms = if in_freeze { 300.0 * jitter + 50.0 } else { 0.2 + jitter };
            samples.push(Sample { start, latency_ms, ok: i % 997 != 0 });
        }
        let report = serde_json::json!({
            "total_ms": 1500.0, "pre_migration_ms": 900.0, "frozen_ms": 300.0,
            "checkpoint_ms": 100.0, "restore_ms": 150.0, "bytes": 1234567
        });
        let t = Timeline {
            samples,
            errors: vec!["x".into(); 3],
            cmd_start: 3.0,
            cmd_end: 4.5,
            report,
            end: 9.0,
            clients: 50,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clients.png");
        figure::render(&t, &path).expect("render");
        let img = ums_bench::plot::read_png(&path).expect("decode");
        assert_eq!((img.width, img.height), (1280, 820));
        assert!(img.non_white() > 10_000, "{} non-white pixels", img.non_white());
        // To look at it, or to compare renderings byte for byte across a change.
        if let Some(keep) = std::env::var_os("UMS_TEST_CLIENTS_PNG") {
            std::fs::copy(&path, keep).expect("copy");
        }
    }
}
