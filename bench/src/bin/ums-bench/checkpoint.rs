//! Section 2: local checkpoint and restore to tmpfs, ums beside plain runc.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ums_e2e::{OciImage, Outer};

use crate::common::*;
use crate::runc::{RuncContainer, RuncEnv};

/// Long enough for a 512 MiB workload to touch its memory on a busy machine.
const T: Duration = Duration::from_secs(180);

#[derive(Default)]
struct Samples {
    ums_ck: Vec<f64>,
    ums_ck_wall: Vec<f64>,
    ums_rs: Vec<f64>,
    ums_rs_wall: Vec<f64>,
    runc_ck: Vec<f64>,
    runc_rs: Vec<f64>,
}

/// The next tick after line `from`, proving the workload runs again.
fn runs_again(log: &ums_e2e::LineLog, from: usize, who: &str) -> anyhow::Result<()> {
    wait_tick(log, from, Duration::from_secs(30)).with_context(|| format!("{who}: no tick after restore"))?;
    Ok(())
}

fn ums_once(s: &mut Samples, o: &Outer, i: usize) -> anyhow::Result<()> {
    let dir = format!("/run/bench-ckpt-{i}");
    let t = Instant::now();
    let out = o.ums_ok(&["checkpoint", "--json", "--stop", &dir])?;
    s.ums_ck_wall.push(ms(t.elapsed()));
    s.ums_ck.push(field(&json_result(&out)?, "total_ms")?);
    let from = o.log().len();
    let t = Instant::now();
    let out = o.ums_ok(&["restore", "--json", &dir])?;
    s.ums_rs_wall.push(ms(t.elapsed()));
    s.ums_rs.push(field(&json_result(&out)?, "total_ms")?);
    runs_again(o.log(), from, "ums")?;
    let rm = o.exec("rm", &["-rf", &dir])?;
    if !rm.status.success() {
        bail!("rm -rf {dir} in the outer container failed: {rm:?}");
    }
    Ok(())
}

fn runc_once(s: &mut Samples, env: &RuncEnv, c: &mut RuncContainer, i: usize) -> anyhow::Result<()> {
    let images = env.path(&format!("ckpt-{i}"));
    s.runc_ck.push(ms(env.checkpoint(c, &images)?));
    let from = c.log.len();
    s.runc_rs.push(ms(env.restore(c, &images)?));
    runs_again(&c.log, from, "runc")?;
    std::fs::remove_dir_all(&images)?;
    Ok(())
}

fn pct(a: &[f64], b: &[f64]) -> String {
    match (median(a), median(b)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:+.0}%", (a / b - 1.0) * 100.0),
        _ => "-".into(),
    }
}

pub fn run(ums: &Path, images: &[(u32, OciImage)], runs: usize) -> anyhow::Result<()> {
    let mut table = Table::new(
        &format!("2. Checkpoint and restore to tmpfs (ms; median (min–max) of {runs} runs)"),
        &[
            "MiB",
            "ums ckpt total_ms",
            "ums ckpt (CLI wall)",
            "runc ckpt (wall)",
            "ums/runc",
            "ums restore total_ms",
            "ums restore (CLI wall)",
            "runc restore (wall)",
            "ums/runc",
        ],
    );
    for (mib, img) in images {
        check_interrupted()?;
        progress(&format!("checkpoint/restore at {mib} MiB: starting ums and plain runc"));
        let mut s = Samples::default();
        let env = RuncEnv::new()?;
        let o = Outer::builder(&format!("bench-ck-{mib}")).layout(&img.layout).ums(ums).start()?;
        let bundle = env.bundle("ck", &img.layout, &["/bin/memctr", &mib.to_string()])?;
        let mut c = env.run(&bundle, &ums_e2e::unique_name(&format!("bench-ck-{mib}")))?;
        wait_line(o.log(), 0, "tick 3 ", T).context("ums: the workload did not start ticking")?;
        wait_line(&c.log, 0, "tick 3 ", T).context("runc: the workload did not start ticking")?;
        for i in 0..runs {
            check_interrupted()?;
            progress(&format!("checkpoint/restore at {mib} MiB: run {}/{runs}", i + 1));
            if i % 2 == 0 {
                ums_once(&mut s, &o, i)?;
                runc_once(&mut s, &env, &mut c, i)?;
            } else {
                runc_once(&mut s, &env, &mut c, i)?;
                ums_once(&mut s, &o, i)?;
            }
        }
        drop(o);
        env.remove(c);
        drop(env);
        table.row(vec![
            mib.to_string(),
            fmt_stat(&s.ums_ck),
            fmt_stat(&s.ums_ck_wall),
            fmt_stat(&s.runc_ck),
            pct(&s.ums_ck, &s.runc_ck),
            fmt_stat(&s.ums_rs),
            fmt_stat(&s.ums_rs_wall),
            fmt_stat(&s.runc_rs),
            pct(&s.ums_rs, &s.runc_rs),
        ]);
    }
    table.note("ums: `ums checkpoint --json --stop /run/DIR` then `ums restore --json /run/DIR` in the same outer");
    table.note(
        "  container (its /run is a tmpfs); total_ms from ums's JSON; CLI wall adds nsenter + the socket round trip.",
    );
    table.note("plain runc: `runc checkpoint --image-path` / `runc restore -d --image-path` on a tmpfs, wall clock.");
    table.note("ums/runc: median ums total_ms against median runc wall time (target: within +10%).");
    table.print();
    Ok(())
}
