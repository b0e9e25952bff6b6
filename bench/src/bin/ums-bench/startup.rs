//! Section 1: start-up time and footprint, ums beside plain runc.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ums_e2e::{OciImage, Outer};

use crate::common::*;
use crate::runc::RuncEnv;

const T: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Samples {
    ums_total: Vec<f64>,
    ums_share: Vec<f64>,
    runc_run: Vec<f64>,
    runc_all: Vec<f64>,
    runc_prep: Vec<f64>,
    rss_running: Vec<f64>,
    hwm_running: Vec<f64>,
    rss_standby: Vec<f64>,
    hwm_standby: Vec<f64>,
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss_mib(pid: i32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> anyhow::Result<f64> {
        let line = status.lines().find(|l| l.starts_with(key)).with_context(|| format!("no {key} for pid {pid}"))?;
        let v: f64 = line[key.len()..].split_whitespace().next().context("empty")?.parse()?;
        Ok(v / 1024.0)
    };
    Ok((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// One ums start: outer spawn -> `tick 1`, and `ums-outer: exec` -> `tick 1`.
fn ums_once(s: &mut Samples, ums: &Path, img: &OciImage, i: usize) -> anyhow::Result<()> {
    let t_spawn = unix_ms_now();
    let o = Outer::builder(&format!("bench-start-{i}")).layout(&img.layout).ums(ums).start()?;
    // start() returns as soon as the `ums-outer: exec` line is read (it
    // waits on the log's condvar), i.e. just before ums init is exec'd.
    let t_exec = unix_ms_now();
    let (_, tick) = wait_line(o.log(), 0, "tick 1 ", T).context("ums: no tick 1")?;
    let tick = ums_e2e::parse_tick(&tick).context("bad tick line")?;
    s.ums_total.push(tick.unix_ms as f64 - t_spawn);
    s.ums_share.push(tick.unix_ms as f64 - t_exec);
    std::thread::sleep(Duration::from_secs(2));
    check_interrupted()?;
    let (rss, hwm) = rss_mib(o.pid1())?;
    s.rss_running.push(rss);
    s.hwm_running.push(hwm);
    drop(o);

    let o = Outer::builder(&format!("bench-standby-{i}")).layout(&img.layout).ums(ums).args(&["--standby"]).start()?;
    wait_line(o.log(), 0, "standby", T).context("no standby line")?;
    std::thread::sleep(Duration::from_secs(2));
    check_interrupted()?;
    let (rss, hwm) = rss_mib(o.pid1())?;
    s.rss_standby.push(rss);
    s.hwm_standby.push(hwm);
    Ok(())
}

/// One plain runc start: unpack + spec, then `runc run -d` -> `tick 1`.
fn runc_once(s: &mut Samples, env: &RuncEnv, img: &OciImage, i: usize) -> anyhow::Result<()> {
    let t_prep = unix_ms_now();
    let bundle = env.bundle(&format!("start-{i}"), &img.layout, &["/bin/memctr", "0"])?;
    let t_run = unix_ms_now();
    let c = env.run(&bundle, &ums_e2e::unique_name(&format!("bench-start-{i}")))?;
    let r = wait_line(&c.log, 0, "tick 1 ", T).context("runc: no tick 1");
    env.remove(c);
    let (_, tick) = r?;
    let tick = ums_e2e::parse_tick(&tick).context("bad tick line")?;
    s.runc_run.push(tick.unix_ms as f64 - t_run);
    s.runc_all.push(tick.unix_ms as f64 - t_prep);
    s.runc_prep.push(t_run - t_prep);
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(())
}

pub fn run(ums: &Path, img: &OciImage, runs: usize) -> anyhow::Result<()> {
    let env = RuncEnv::new()?;
    let mut s = Samples::default();
    for i in 0..runs {
        check_interrupted()?;
        progress(&format!("start-up run {}/{runs}", i + 1));
        // Alternate the order so that neither side always goes first.
        if i % 2 == 0 {
            ums_once(&mut s, ums, img, i)?;
            runc_once(&mut s, &env, img, i)?;
        } else {
            runc_once(&mut s, &env, img, i)?;
            ums_once(&mut s, ums, img, i)?;
        }
    }

    let mut t = Table::new(
        &format!("1a. Start-up to the workload's first `tick 1` (ms; median (min–max) of {runs} runs; 0 MiB memctr)"),
        &["what", "ms"],
    );
    t.row(vec!["ums: outer.sh spawned -> tick 1 (outer.sh mounts + ums)".into(), fmt_stat(&s.ums_total)]);
    t.row(vec!["ums: `ums-outer: exec` line -> tick 1 (ums's own share)".into(), fmt_stat(&s.ums_share)]);
    t.row(vec!["plain runc: `runc run -d` spawned -> tick 1".into(), fmt_stat(&s.runc_run)]);
    t.row(vec!["plain runc: tar unpack + runc spec (before run)".into(), fmt_stat(&s.runc_prep)]);
    t.row(vec!["plain runc: unpack + spec + run -> tick 1".into(), fmt_stat(&s.runc_all)]);
    if let (Some(a), Some(b)) = (median(&s.ums_share), median(&s.runc_run)) {
        t.note(&format!(
            "ums's share minus runc run: {} ms (medians; target: within 50 ms); vs runc unpack+spec+run: {} ms",
            num(a - b),
            num(a - median(&s.runc_all).unwrap_or(f64::NAN))
        ));
    }
    t.note("ums's share includes ums unpacking the image layout itself, so its fair counterpart is runc's");
    t.note("  unpack + spec + run row; the `runc run -d` row alone starts from an already unpacked bundle.");
    t.note("memctr prints tick 1 100 ms after it starts; every row includes those 100 ms.");
    t.print();

    let mut t = Table::new(
        &format!(
            "1b. ums (PID 1 of the outer container) memory, 2 s after start (MiB; median (min–max) of {runs} runs)"
        ),
        &["state", "VmRSS", "VmHWM"],
    );
    t.row(vec!["running a 0 MiB workload".into(), fmt_stat(&s.rss_running), fmt_stat(&s.hwm_running)]);
    t.row(vec!["standby".into(), fmt_stat(&s.rss_standby), fmt_stat(&s.hwm_standby)]);
    t.note("target: VmRSS <= 15 MiB");
    t.print();
    Ok(())
}
