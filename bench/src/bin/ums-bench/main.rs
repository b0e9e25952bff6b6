//! `ums-bench`: the figures of DESIGN.md's "How a migration is measured",
//! ums beside the alternatives, in the same run.
//!
//!     ums-bench [--runs N] [--sizes 0,128,512] [--only startup|checkpoint|migration|compare[,...]]
//!               [--rates 1gbit,none] [--methods ums,stop-copy,page-server,podman] [--procs 1,4,8]
//!               [--out DIR] [--verbose]
//!
//! Sections:
//! 1. start-up (outer container spawn, and ums's own share, to the workload's
//!    first tick) beside plain `runc run -d`; ums's idle RSS, running and standby;
//! 2. checkpoint and restore to tmpfs at each size, ums beside plain runc;
//! 3. live migration at each size between two hosts joined by a veth pair,
//!    1 Gbit/s and unlimited, streaming on beside streaming off, with the
//!    workload-observed downtime, the wire time and the UMS paper's figures;
//! 4. ums beside the methods a user has today (stop-then-copy as UMS did it,
//!    CRIU's page server, podman's export/import) at each size and process
//!    count, on each link, with the targets as met or short; with
//!    --out, also as `compare.md` and `compare.png` in DIR.
//!
//! Every figure is the median and min–max of N runs (default 3). Nothing is
//! asserted: the tables go to stdout, progress to stderr, and the output of
//! the outer containers and runc to `target/ums-bench.log` (to stderr with
//! --verbose). Needs root, runc, CRIU and the ums binary (`$UMS_BIN`; use a
//! release build: `make bench`). Everything made is removed at the end, on an
//! error and on Ctrl-C.

mod checkpoint;
mod common;
mod compare;
mod migration;
mod podman;
mod report;
mod runc;
mod startup;

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use anyhow::{bail, Context};
use ums_e2e::ImageBuilder;

use common::*;

struct Opts {
    runs: usize,
    sizes: Vec<u32>,
    only: Vec<String>,
    rates: Vec<Option<String>>,
    methods: Vec<compare::Method>,
    procs: Vec<u32>,
    /// compare: sizes of a workload with compressible memory.
    compressible: Vec<u32>,
    out: Option<PathBuf>,
    verbose: bool,
    /// Draw compare.png again from this compare.md, run nothing.
    replot: Option<PathBuf>,
}

const SECTIONS: &[&str] = &["startup", "checkpoint", "migration", "compare"];

const USAGE: &str =
    "usage: ums-bench [--runs N] [--sizes 0,128,512] [--only startup|checkpoint|migration|compare[,...]]
                 [--rates 1gbit,none] [--methods ums,stop-copy,page-server,podman] [--procs 1,4,8]
                 [--compressible 512] [--out DIR] [--verbose]
  --runs N       runs per figure (median and min–max are shown; default 3)
  --sizes LIST   workload memory sizes in MiB for checkpoint and migration (default 0,128,512)
  --only LIST    run only these sections (default: all four)
  --rates LIST   links for the migrations: tc rates, or none for unlimited (default 1gbit,none)
  --methods LIST compare: the methods (default: all: ums (stop-copy), ums-pre-copy, ums-post-copy, ums-auto,
                 stop-copy, page-server, podman)
  --procs LIST   compare: also a 0 MiB workload of each of these process counts above 1 (default 1,4,8)
  --compressible LIST  compare: also memctr with compressible memory (MEMCTR_COMPRESSIBLE=1) of these
                 sizes in MiB, in tables of their own (default 512; none for no such row)
  --out DIR      compare: also write compare.md and compare.png into DIR (make bench-compare: docs/bench)
  --replot MD    draw compare.png again from a compare.md written earlier (into --out DIR, or beside MD); run nothing
  --verbose      output of the outer containers and runc to stderr (default: target/ums-bench.log)
environment: UMS_BIN  the ums binary (default target/debug/ums; make bench uses a release build)";

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 3,
        sizes: vec![0, 128, 512],
        only: SECTIONS.iter().map(|s| s.to_string()).collect(),
        rates: vec![Some("1gbit".into()), None],
        methods: compare::Method::ALL.to_vec(),
        procs: vec![1, 4, 8],
        compressible: vec![512],
        out: None,
        verbose: false,
        replot: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().with_context(|| format!("{a} needs {what}"));
        match a.as_str() {
            "--runs" => {
                let v = value("a number")?;
                o.runs = v.parse().with_context(|| format!("--runs {v:?}"))?;
                if o.runs == 0 {
                    bail!("--runs must be at least 1");
                }
            }
            "--sizes" => {
                let v = value("a list of MiB")?;
                o.sizes = list(&v)
                    .iter()
                    .map(|s| s.parse::<u32>().with_context(|| format!("--sizes: {s:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--only" => {
                let v = value("a list of sections")?;
                o.only = list(&v);
                for s in &o.only {
                    if !SECTIONS.contains(&s.as_str()) {
                        bail!("--only: unknown section {s:?} (startup, checkpoint, migration, compare)");
                    }
                }
            }
            "--rates" => {
                let v = value("a list of rates")?;
                o.rates = list(&v).into_iter().map(|r| if r == "none" { None } else { Some(r) }).collect();
            }
            "--methods" => {
                let v = value("a list of methods")?;
                o.methods = list(&v).iter().map(|s| compare::Method::parse(s)).collect::<Result<_, _>>()?;
            }
            "--procs" => {
                let v = value("a list of process counts")?;
                o.procs = list(&v)
                    .iter()
                    .map(|s| s.parse::<u32>().ok().filter(|n| *n >= 1).with_context(|| format!("--procs: {s:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--compressible" => {
                let v = value("a list of sizes in MiB, or none")?;
                o.compressible = list(&v)
                    .iter()
                    .filter(|s| *s != "none")
                    .map(|s| s.parse::<u32>().with_context(|| format!("--compressible: {s:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--out" => o.out = Some(PathBuf::from(value("a directory")?)),
            "--replot" => o.replot = Some(PathBuf::from(value("a compare.md")?)),
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

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| format!("{:.1} GiB", kb / 1048576.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let virt = std::process::Command::new("systemd-detect-virt")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("{cpus} CPUs ({model}), {mem} RAM, Linux {}, virtualization: {virt}", kernel.trim())
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The UTC date and time, as `date -u` prints it.
fn chrono_now() -> String {
    tool_version("date", "-u")
}

fn tool_version(cmd: &str, arg: &str) -> String {
    std::process::Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "missing".into())
}

fn run(o: &Opts) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("ums-bench must run as root (it creates network namespaces, mounts and containers)");
    }
    for (tool, pkg) in [("runc", "runc"), ("criu", "criu 4.2.1"), ("tc", "iproute2"), ("nsenter", "util-linux")] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found on PATH: install {pkg} (image/install-deps.sh --test)");
        }
    }
    let ums = ums_e2e::ums_bin()?;
    println!("ums-bench: {} run(s) per figure; median (min–max)", o.runs);
    println!("  ums:     {}", ums.display());
    println!("  runc:    {}; criu: {}", tool_version("runc", "--version"), tool_version("criu", "--version"));
    println!("  machine: {}", machine());

    // Declared first, dropped last.
    let tmp = tempfile::Builder::new().prefix(&ums_e2e::unique_name("bench")).tempdir()?;
    let memctr = ums_e2e::workload::try_build_workload(tmp.path())?;
    let mut sizes = o.sizes.clone();
    if o.only.iter().any(|s| s == "startup") && !sizes.contains(&0) {
        sizes.push(0);
    }
    let mut images = Vec::new();
    for mib in &sizes {
        let m = mib.to_string();
        let img = ImageBuilder::new(&memctr).cmd(&[&m]).build(&tmp.path().join(format!("layout-{mib}")))?;
        images.push((*mib, img));
    }
    let img_for = |mibs: &[u32]| images.iter().filter(|(m, _)| mibs.contains(m)).cloned().collect::<Vec<_>>();

    if o.only.iter().any(|s| s == "startup") {
        let zero = img_for(&[0]).pop().context("no 0 MiB image")?.1;
        startup::run(&ums, &zero, o.runs)?;
    }
    if o.only.iter().any(|s| s == "checkpoint") {
        checkpoint::run(&ums, &img_for(&o.sizes), o.runs)?;
    }
    if o.only.iter().any(|s| s == "migration") {
        migration::run(&ums, &img_for(&o.sizes), &o.rates, o.runs)?;
    }
    if o.only.iter().any(|s| s == "compare") {
        let mut workloads: Vec<compare::Workload> = img_for(&o.sizes)
            .into_iter()
            .map(|(mib, img)| compare::Workload { mib, procs: 1, img, compressible: false })
            .collect();
        for &procs in o.procs.iter().filter(|p| **p > 1) {
            let img = ImageBuilder::new(&memctr)
                .cmd(&["0", &procs.to_string()])
                .build(&tmp.path().join(format!("layout-0-x{procs}")))?;
            workloads.push(compare::Workload { mib: 0, procs, img, compressible: false });
        }
        for &mib in &o.compressible {
            let img = ImageBuilder::new(&memctr)
                .cmd(&[&mib.to_string()])
                .env("MEMCTR_COMPRESSIBLE", "1")
                .build(&tmp.path().join(format!("layout-{mib}-z")))?;
            workloads.push(compare::Workload { mib, procs: 1, img, compressible: true });
        }
        let started_load = format!("load average at the start: {}", loadavg());
        let cells = compare::run(&compare::Opts {
            ums: &ums,
            workloads: &workloads,
            rates: &o.rates,
            methods: &o.methods,
            runs: o.runs,
        })?;
        let header = format!(
            "ums-bench --only compare, {}; {} run(s) per figure\n\n- machine: {}\n- {}; at the end: {} (the machine may be shared)\n- ums: {}\n- runc: {}; criu: {}; podman: {}\n",
            chrono_now(),
            o.runs,
            machine(),
            started_load,
            loadavg(),
            ums.display(),
            tool_version("runc", "--version"),
            tool_version("criu", "--version"),
            tool_version("podman", "--version"),
        );
        let text = format!("{header}{}{}", report::tables(&cells, o.runs), report::targets(&cells));
        println!("\n4. Live migration, ums beside the alternatives\n{text}");
        if let Some(dir) = &o.out {
            std::fs::create_dir_all(dir)?;
            let md = dir.join("compare.md");
            std::fs::write(&md, format!("# Live migration: ums beside the alternatives\n\n{text}"))?;
            let png = dir.join("compare.png");
            let with_text = report::plot(&cells, &png)?;
            progress(&format!(
                "wrote {} and {}{}",
                md.display(),
                png.display(),
                if with_text { "" } else { " (no TTF font found: the plot has no text; install fonts-dejavu-core)" }
            ));
        }
    }
    drop(tmp);
    Ok(())
}

fn log_path() -> PathBuf {
    ums_e2e::target_dir().join("ums-bench.log")
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ums-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Some(md) = &opts.replot {
        let out = opts.out.clone().unwrap_or_else(|| md.parent().map(PathBuf::from).unwrap_or_default());
        let drawn = std::fs::read_to_string(md)
            .with_context(|| format!("read {}", md.display()))
            .and_then(|t| report::cells_from_markdown(&t))
            .and_then(|cells| report::plot(&cells, &out.join("compare.png")));
        match drawn {
            Ok(_) => println!("wrote {}", out.join("compare.png").display()),
            Err(e) => {
                eprintln!("ums-bench --replot: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    // ums_e2e echoes every line of the outer containers to stderr: keep them
    // in a log file, and progress messages on the original stderr.
    if !opts.verbose {
        let path = log_path();
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&PathBuf::from(".")));
        match File::create(&path) {
            Ok(f) => {
                if let Ok(saved) = nix::unistd::dup(2) {
                    // SAFETY: `saved` is a fresh descriptor that nothing else owns.
                    set_progress(unsafe { File::from_raw_fd(saved) });
                    if nix::unistd::dup2(f.as_raw_fd(), 2).is_ok() {
                        progress(&format!("output of the outer containers and runc: {}", path.display()));
                    }
                }
            }
            Err(e) => eprintln!("ums-bench: cannot create {}: {e}; output goes to stderr", path.display()),
        }
    }
    if let Err(e) = install_interrupt_handlers() {
        eprintln!("ums-bench: {e:#}");
    }
    let result = run(&opts);
    let _ = std::io::stdout().flush();
    if let Err(e) = result {
        if interrupted() {
            progress("interrupted; everything it created was removed");
        } else {
            progress(&format!("failed: {e:#}"));
        }
        std::process::exit(1);
    }
}
