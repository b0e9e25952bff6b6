//! Section 3: live migration between two hosts (network namespaces joined by
//! a veth pair), 1 Gbit/s and unlimited, streaming on beside streaming off.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use ums_e2e::{Host, OciImage, Outer};

use crate::common::*;

const PEER_PORT: u16 = 7411;
/// Long enough for a 512 MiB workload to touch its memory on a busy machine.
const START: Duration = Duration::from_secs(180);
const CONTINUE: Duration = Duration::from_secs(120);

/// UMS section IV raw data, 1 Gbit/s, memhog: (MiB, container-level s, service-level s).
pub(crate) const UMS_ANCHORS: &[(u32, f64, f64)] = &[(0, 8.42, 4.20), (128, 14.72, 5.94), (1024, 76.85, 16.80)];
/// The UMS paper's one orchestrator-level figure (Table I: Kubernetes, a
/// service of 128 MiB, mean of 30 migrations): (MiB, seconds).
pub(crate) const UMS_ORCHESTRATOR_LEVEL: (u32, f64) = (128, 6.94);

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    frozen: Vec<f64>,
    downtime: Vec<f64>,
    mib: Vec<f64>,
    wire: Vec<f64>,
    pre: Vec<f64>,
    ckpt: Vec<f64>,
    transfer: Vec<f64>,
    restore: Vec<f64>,
    throughput: Vec<f64>,
    wall: Vec<f64>,
    notes: Vec<String>,
}

/// One migration `src` -> `dst`; records the report and the downtime seen
/// in the workload's own counter.
fn migrate_once(
    s: &mut Samples,
    src: &Outer,
    dst: &Outer,
    dst_addr: std::net::Ipv4Addr,
    limited: bool,
) -> anyhow::Result<()> {
    let from_src = src.log().len();
    let from_dst = dst.log().len();
    let to = format!("{dst_addr}:{PEER_PORT}");
    let t = Instant::now();
    let out = src.ums_ok(&["migrate", "--json", "--mode", "stop-copy", "--to", &to])?;
    let wall = ms(t.elapsed());
    let r = json_result(&out)?;
    // The source's last tick may still be in the pipe: read it once the
    // destination has ticked a few times.
    let (_, first) = wait_tick(dst.log(), from_dst, CONTINUE).context("no tick at the destination")?;
    wait_line(dst.log(), from_dst, &format!("tick {} ", first.n + 2), CONTINUE)?;
    let last = *ticks(src.log(), 0).last().context("no tick at the source")?;
    if first.n != last.n + 1 {
        s.notes.push(format!("counter: source ended at {}, destination began at {}", last.n, first.n));
    }
    let late = ticks(src.log(), from_src).iter().filter(|t| t.n > last.n).count();
    if late > 0 {
        s.notes.push(format!("{late} ticks at the source after its last one"));
    }
    let bytes = field(&r, "bytes")?;
    s.total.push(field(&r, "total_ms")? / 1000.0);
    s.frozen.push(field(&r, "frozen_ms")? / 1000.0);
    s.downtime.push((first.unix_ms as f64 - last.unix_ms as f64 - TICK_MS) / 1000.0);
    s.mib.push(bytes / 1048576.0);
    if limited {
        s.wire.push(bytes * 8.0 / 1e9);
    }
    s.pre.push(field(&r, "pre_migration_ms")? / 1000.0);
    s.ckpt.push(field(&r, "checkpoint_ms")? / 1000.0);
    s.transfer.push(field(&r, "transfer_ms")? / 1000.0);
    s.restore.push(field(&r, "restore_ms")? / 1000.0);
    s.throughput.push(field(&r, "throughput_mib_s")?);
    s.wall.push(wall / 1000.0);
    if r["streaming"].as_bool().is_none() {
        s.notes.push("report without `streaming`".into());
    }
    s.notes.dedup();
    Ok(())
}

/// A fresh pair of outer containers on `ha`/`hb`, then `runs` migrations
/// alternately A -> B and B -> A.
struct Config<'a> {
    ums: &'a Path,
    img: &'a OciImage,
    ha: &'a Host,
    hb: &'a Host,
    mib: u32,
    streaming: bool,
    limited: bool,
    runs: usize,
    label: &'a str,
}

fn one_config(s: &mut Samples, c: &Config<'_>) -> anyhow::Result<()> {
    let Config { ums, img, ha, hb, mib, streaming, limited, runs, label } = *c;
    let mk = |name: &str, host: &Host, standby: bool| {
        let mut b = Outer::builder(name).host(host).layout(&img.layout).ums(ums);
        if standby {
            b = b.args(&["--standby"]);
        }
        if !streaming {
            b = b.env("UMS_STREAMING", "0");
        }
        b.start()
    };
    let a = mk(&format!("bench-mig-{mib}-a"), ha, false)?;
    let b = mk(&format!("bench-mig-{mib}-b"), hb, true)?;
    wait_line(b.log(), 0, "standby", START).context("B did not reach standby")?;
    wait_line(a.log(), 0, "tick 5 ", START).context("the workload in A did not start ticking")?;
    for i in 0..runs {
        check_interrupted()?;
        progress(&format!("migration {label}: run {}/{runs} ({})", i + 1, if i % 2 == 0 { "A->B" } else { "B->A" }));
        if i % 2 == 0 {
            migrate_once(s, &a, &b, hb.addr(), limited)?;
        } else {
            migrate_once(s, &b, &a, ha.addr(), limited)?;
        }
        // Let the new source settle (it ran the workload only a moment ago).
        std::thread::sleep(Duration::from_millis(500));
    }
    drop((a, b));
    Ok(())
}

fn anchor(mib: u32) -> (String, String) {
    match UMS_ANCHORS.iter().find(|a| a.0 == mib) {
        Some((_, c, sv)) => (format!("{c:.2}"), format!("{sv:.2}")),
        None => ("-".into(), "-".into()),
    }
}

pub fn run(ums: &Path, images: &[(u32, OciImage)], rates: &[Option<String>], runs: usize) -> anyhow::Result<()> {
    let mut main = Table::new(
        &format!("3. Live migration (seconds; median (min–max) of {runs} runs, alternately A->B and B->A)"),
        &[
            "link",
            "MiB",
            "streaming",
            "migration time",
            "ums frozen",
            "downtime (counter)",
            "MiB sent",
            "wire time",
            "UMS container-level",
            "UMS service-level",
        ],
    );
    let mut phases = Table::new(
        &format!("3b. Phases from the migration report (seconds; median (min–max) of {runs} runs)"),
        &["link", "MiB", "streaming", "pre-migration", "checkpoint", "transfer", "restore", "MiB/s", "CLI wall"],
    );
    let mut failures = Vec::new();
    for rate in rates {
        check_interrupted()?;
        let link = rate.clone().unwrap_or_else(|| "unlimited".into());
        let limited = rate.is_some();
        let (ha, hb) = Host::pair("bench", rate.as_deref())?;
        for (mib, img) in images {
            for streaming in [true, false] {
                check_interrupted()?;
                let mode = if streaming { "on" } else { "off" };
                let label = format!("{link}, {mib} MiB, streaming {mode}");
                progress(&format!("migration {label}: starting two outer containers"));
                let mut s = Samples::default();
                if let Err(e) = one_config(
                    &mut s,
                    &Config { ums, img, ha: &ha, hb: &hb, mib: *mib, streaming, limited, runs, label: &label },
                ) {
                    check_interrupted()?;
                    progress(&format!("migration {label}: FAILED: {e:#}"));
                    failures.push(format!("{label}: failed after {} migrations: {e:#}", s.total.len()));
                }
                let (c, sv) = if limited && rate.as_deref() == Some("1gbit") {
                    anchor(*mib)
                } else {
                    ("n/a".into(), "n/a".into())
                };
                main.row(vec![
                    link.clone(),
                    mib.to_string(),
                    mode.into(),
                    fmt_stat_dp(&s.total, 3),
                    fmt_stat_dp(&s.frozen, 3),
                    fmt_stat_dp(&s.downtime, 3),
                    fmt_stat_dp(&s.mib, 1),
                    if limited { fmt_stat_dp(&s.wire, 3) } else { "n/a".into() },
                    c,
                    sv,
                ]);
                phases.row(vec![
                    link.clone(),
                    mib.to_string(),
                    mode.into(),
                    fmt_stat_dp(&s.pre, 3),
                    fmt_stat_dp(&s.ckpt, 3),
                    fmt_stat_dp(&s.transfer, 3),
                    fmt_stat_dp(&s.restore, 3),
                    fmt_stat_dp(&s.throughput, 1),
                    fmt_stat_dp(&s.wall, 3),
                ]);
                for n in &s.notes {
                    failures.push(format!("{label}: {n}"));
                }
            }
        }
        drop((ha, hb));
    }
    main.note("migration time: total_ms of `ums migrate --json` (request until the workload runs at the destination).");
    main.note("ums frozen: frozen_ms (freeze until the destination's ack). downtime (counter): first tick at the");
    main.note("  destination minus last tick at the source (their unix ms) minus the 100 ms print interval.");
    main.note(
        "wire time: bytes * 8 / 1e9 s. UMS columns: the UMS paper's 1 Gbit/s memhog figures (they give 0, 128 and",
    );
    main.note(
        "  1024 MiB: container-level 8.42 / 14.72 / 76.85 s, service-level 4.20 / 5.94 / 16.80 s; '-' = no figure).",
    );
    main.note("streaming off: both outer containers started with UMS_STREAMING=0 (dump first, then send).");
    for f in &failures {
        main.note(&format!("NOTE {f}"));
    }
    main.print();
    phases.note("from the same reports: pre_migration_ms, checkpoint_ms, transfer_ms, restore_ms, throughput_mib_s;");
    phases.note("transfer_ms: until the last byte was handed to the socket, from the start of the dump when");
    phases.note(
        "  streaming (dump and transfer overlap) and from its end otherwise; throughput_mib_s = bytes / transfer_ms.",
    );
    phases.note("CLI wall: the `ums migrate` command as timed by the bench (nsenter included).");
    phases.print();
    Ok(())
}
