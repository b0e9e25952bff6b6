//! "Never twice, never lost", checked from what a user sees.
//!
//! After a migration (clean or faulted) between the two sides of a
//! [`crate::pair::Pair`], [`check`] asserts:
//! - exactly one copy of the workload runs (`ums status` says `running` on one
//!   side and its counter moves), or the migration is in doubt and the
//!   workload is frozen at the source (no counter moves anywhere): never two;
//! - the counter never repeats or restarts: the ticks printed since the
//!   migration began, over both sides, are distinct and consecutive, and go
//!   on from the last one before it (ticks of a copy that has died since,
//!   with its killed outer container, may be printed again by the live one:
//!   counted as `rolled_back`, as that copy's work is lost with its host);
//! - the memory checksum is the one memctr printed at its start, and the
//!   file it wrote in its writable layer is still there;
//! - the side without the workload is a clean standby: no process of a
//!   workload, no runtime container, no images dir left.
//!
//! It also measures the longest gap between two ticks (the time the
//! workload was unavailable, as its clients would see it).

use std::time::{Duration, Instant};

use crate::{parse_sum, parse_tick, status, Outer};

/// Where the workload is after a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It runs on this side, and only there.
    Runs(usize),
    /// The migration is in doubt at this (source) side; the workload is
    /// frozen there.
    InDoubt(usize),
}

/// What [`check`] found besides the verdict.
#[derive(Debug, Clone)]
pub struct Checked {
    pub verdict: Verdict,
    /// The longest gap between consecutive ticks since the marks, minus the
    /// 100 ms print interval.
    pub longest_gap: Duration,
    /// The last tick printed so far (the next migration's `last_before`).
    pub last_tick: u64,
    /// Ticks printed by a copy that has died since (a destination killed
    /// after it ran the workload) and printed again by the copy that lives
    /// on from the same state: work lost with a dead host, never two at once.
    pub rolled_back: u64,
}

/// What was true before the migration: per side, the log index from which
/// its output belongs to this migration, and the last tick printed anywhere.
#[derive(Debug, Clone, Copy)]
pub struct Marks {
    pub from: [usize; 2],
    /// Each side's PID 1 then: a side replaced since (a fresh standby) is
    /// read from its first line.
    pub pid1: [i32; 2],
    pub last_before: u64,
    /// The unix ms of that tick (for the gap over the migration).
    pub last_before_ms: u64,
}

impl Marks {
    /// Now, for the two sides (the workload runs at one of them).
    pub fn now(sides: &[&Outer; 2]) -> Marks {
        // One snapshot per side: the last tick and the index after it must
        // come from the same lines (a tick arriving between two reads would
        // be neither before the mark nor after it).
        let snap = [sides[0].lines(), sides[1].lines()];
        let mut last = (0, 0);
        for lines in &snap {
            for l in lines {
                if let Some(t) = parse_tick(l) {
                    if t.n >= last.0 {
                        last = (t.n, t.unix_ms);
                    }
                }
            }
        }
        Marks {
            from: [snap[0].len(), snap[1].len()],
            pid1: [sides[0].pid1(), sides[1].pid1()],
            last_before: last.0,
            last_before_ms: last.1,
        }
    }
}

fn alive(o: &mut Outer) -> bool {
    o.try_wait().ok().flatten().is_none()
}

/// Host pids of every process below `o`'s PID 1 (its workload, helpers).
pub fn descendants(o: &Outer) -> Vec<i32> {
    crate::outer::descendants(o.pid1())
}

/// Why a side is not a clean standby, if it is not.
pub fn standby_leftovers(o: &Outer) -> Option<String> {
    let st = status(o);
    if st["state"] != "standby" {
        return Some(format!("state {}", st["state"]));
    }
    let procs = descendants(o);
    if !procs.is_empty() {
        let names: Vec<String> = procs
            .iter()
            .map(|p| format!("{p}:{}", std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim()))
            .collect();
        return Some(format!("processes left: {names:?}"));
    }
    let ls = |dir: &str| {
        o.exec("ls", &["-A", dir])
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let images = ls("/var/lib/ums/images");
    if !images.is_empty() {
        return Some(format!("images dirs left: {images}"));
    }
    let runc = o.exec("runc", &["--root", "/run/ums/runtime", "list", "-q"]).ok()?;
    let ids = String::from_utf8_lossy(&runc.stdout).trim().to_string();
    if !ids.is_empty() {
        return Some(format!("runtime containers left: {ids}"));
    }
    None
}

/// Polls `cond` until it holds or `limit` passes.
fn settle(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks the invariants over the two sides (see the module docs). A dead
/// side (a killed outer container) holds no copy. `expect_sum` and
/// `expect_file` are memctr's checksum and file at its start. Waits up to
/// `within` for the sides to settle (a destination still discarding after a
/// fault, say).
pub fn check(
    sides: &mut [Outer; 2],
    marks: &Marks,
    expect_sum: &str,
    expect_file: &str,
    within: Duration,
) -> Result<Checked, String> {
    // Settled: no side busy, except a source in doubt.
    let busy = |o: &Outer| {
        let st = status(o);
        st["state"].get("busy").is_some() && !st["operation"]["in_doubt"].is_object()
    };
    let live: Vec<bool> = sides.iter_mut().map(alive).collect();
    for (i, o) in sides.iter().enumerate() {
        if live[i] && !settle(within, || !busy(o)) {
            return Err(format!("side {i} still busy after {within:?}: {}", status(o)));
        }
    }
    let st: Vec<Option<serde_json::Value>> = sides.iter().zip(&live).map(|(o, &l)| l.then(|| status(o))).collect();
    let running: Vec<usize> = (0..2).filter(|&i| st[i].as_ref().is_some_and(|s| s["state"] == "running")).collect();
    let doubt: Vec<usize> =
        (0..2).filter(|&i| st[i].as_ref().is_some_and(|s| s["operation"]["in_doubt"].is_object())).collect();
    if running.len() > 1 {
        return Err(format!("the workload runs on both sides: {st:?}"));
    }
    // Whose counter moves over a second and a half.
    let before: Vec<usize> = sides.iter().map(|o| o.log().len()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let moving: Vec<usize> =
        (0..2).filter(|&i| sides[i].lines()[before[i]..].iter().any(|l| parse_tick(l).is_some())).collect();
    let verdict = match (running.as_slice(), doubt.as_slice(), moving.as_slice()) {
        ([r], [], [m]) if r == m => Verdict::Runs(*r),
        ([r], [], []) => return Err(format!("side {r} says running but its counter does not move")),
        ([], [d], []) => Verdict::InDoubt(*d),
        ([r], [d], [m]) if r == m && r != d => Verdict::InDoubt(*d),
        (_, _, m) if m.len() > 1 => return Err("the counter moves on both sides: two copies run".into()),
        ([], [], _) => return Err(format!("no copy runs and no migration is in doubt: lost ({st:?})")),
        _ => return Err(format!("running {running:?}, in doubt {doubt:?}, counting {moving:?}: {st:?}")),
    };
    // The counter: distinct and consecutive from last_before + 1, over both sides.
    let mut ticks: Vec<(u64, u64, usize)> = Vec::new();
    for (i, o) in sides.iter().enumerate() {
        let from = if o.pid1() == marks.pid1[i] { marks.from[i] } else { 0 };
        for l in &o.lines()[from..] {
            if let Some(t) = parse_tick(l) {
                ticks.push((t.n, t.unix_ms, i));
            }
        }
    }
    ticks.sort();
    let mut prev = (marks.last_before, marks.last_before_ms);
    let mut prev_side = None;
    let mut longest = 0u64;
    let mut rolled_back = 0;
    for &(n, ms, side) in &ticks {
        if n == prev.0 {
            // A copy that ran and then died with its outer container (a
            // killed destination) is gone with what it did: the frozen copy
            // at the source goes on from the freeze. Never at the same time.
            if prev_side.is_some_and(|p: usize| !live[p]) || !live[side] {
                rolled_back += 1;
                continue;
            }
            return Err(format!("tick {n} printed twice (again by side {side}): two copies ran from one state"));
        }
        if n != prev.0 + 1 {
            return Err(format!("tick {n} (side {side}) follows tick {}: the counter skipped or restarted", prev.0));
        }
        longest = longest.max(ms.saturating_sub(prev.1));
        prev = (n, ms);
        prev_side = Some(side);
    }
    let longest_gap = Duration::from_millis(longest.saturating_sub(100));
    if let Verdict::Runs(r) = verdict {
        let o = &sides[r];
        let from = o.log().len();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), nix::sys::signal::Signal::SIGUSR1)
            .map_err(|e| format!("SIGUSR1: {e}"))?;
        let (_, line) =
            o.log().wait_for_from(from, "sum ", Duration::from_secs(10)).map_err(|e| format!("side {r}: {e}"))?;
        let sum = parse_sum(&line).unwrap_or_default();
        if sum != expect_sum {
            return Err(format!("memory checksum {sum} at side {r}, {expect_sum} at the start"));
        }
        let pid = st[r].as_ref().unwrap()["workload"]["pid"].as_i64().unwrap_or(0);
        let file = o.exec("cat", &[&format!("/proc/{pid}/root/data-marker")]).map_err(|e| e.to_string())?;
        let file = String::from_utf8_lossy(&file.stdout).trim().to_string();
        if file != expect_file {
            return Err(format!("the workload's file holds {file:?} at side {r}, {expect_file:?} at the start"));
        }
        let other = 1 - r;
        if live[other] {
            let o = &sides[other];
            let mut why = None;
            if !settle(within, || {
                why = standby_leftovers(o);
                why.is_none()
            }) {
                return Err(format!("side {other} is not a clean standby: {}", why.unwrap_or_default()));
            }
        }
    }
    Ok(Checked { verdict, longest_gap, last_tick: prev.0, rolled_back })
}
