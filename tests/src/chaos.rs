//! A bounded soak: migrations back and forth between the two sides of a
//! [`Pair`], each with a fault drawn from a seeded random generator (or none),
//! and the invariants ([`crate::invariants::check`]) after every one.
//!
//! The same seed replays the same faults at the same moments (as far as the
//! machine's timing lets a moment be the same). `ums-chaos` (`make chaos`)
//! runs it long; tests/tests/chaos.rs runs a few migrations in `make test`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fault::{Fault as ProxyFault, FaultProxy, Partition};
use crate::invariants::{check, Marks, Verdict};
use crate::pair::{Pair, PairOpts, PEER_PORT};

/// The faults the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    None,
    /// The migration's connection is cut after a random number of bytes.
    Cut,
    /// One byte of the stream, at a random offset, is flipped.
    Corrupt,
    /// Packets between the hosts are dropped from a random moment of the
    /// migration, for 0.5 to 4 s.
    Partition,
    /// Packets are dropped from the moment the destination verified the
    /// checkpoint (after the manifest), for 0.5 to 4 s: in doubt.
    PartitionAfterManifest,
    /// The destination's outer container is killed at a random moment; a
    /// fresh standby replaces it.
    KillDestination,
    /// The destination's CRIU fails (fail point `criu-fails`).
    RestoreFails,
    /// The destination's state dir is a tmpfs too small for the checkpoint.
    FullDisk,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Cut,
        Fault::Corrupt,
        Fault::Partition,
        Fault::PartitionAfterManifest,
        Fault::KillDestination,
        Fault::RestoreFails,
        Fault::FullDisk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Cut => "cut",
            Fault::Corrupt => "corrupt byte",
            Fault::Partition => "partition",
            Fault::PartitionAfterManifest => "partition after manifest",
            Fault::KillDestination => "killed destination",
            Fault::RestoreFails => "failing restore",
            Fault::FullDisk => "full disk",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChaosOpts {
    /// Migrations to run at most.
    pub count: usize,
    /// No new migration starts after this.
    pub time_limit: Duration,
    pub seed: u64,
    /// MiB the workload touches.
    pub mib: u32,
    /// Share of migrations with a fault (0.0 to 1.0).
    pub fault_rate: f64,
}

impl Default for ChaosOpts {
    fn default() -> Self {
        ChaosOpts { count: 200, time_limit: Duration::from_secs(3600), seed: 2027, mib: 32, fault_rate: 0.8 }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub seed: u64,
    pub migrations: usize,
    pub faults: BTreeMap<&'static str, usize>,
    /// "moved", "stayed", "rolled back", "in doubt then settled".
    pub outcomes: BTreeMap<&'static str, usize>,
    pub violations: Vec<String>,
    /// The longest gap in the workload's counter, and in which migration.
    pub longest_unavailable: Duration,
    pub longest_at: usize,
    pub elapsed: Duration,
}

impl Summary {
    /// The table `ums-chaos` prints.
    pub fn table(&self) -> String {
        let mut t = String::new();
        t += &format!("seed                     {}\n", self.seed);
        t += &format!("migrations               {}\n", self.migrations);
        let faulted: usize = self.faults.iter().filter(|(k, _)| !k.starts_with("none")).map(|(_, v)| v).sum();
        t += &format!("faults                   {faulted}\n");
        for (k, v) in &self.faults {
            t += &format!("  {k:<27}{v}\n");
        }
        t += "outcomes\n";
        for (k, v) in &self.outcomes {
            t += &format!("  {k:<27}{v}\n");
        }
        t += &format!("invariant violations     {}\n", self.violations.len());
        for v in &self.violations {
            t += &format!("  {v}\n");
        }
        t += &format!(
            "longest unavailability   {:.2} s (migration {})\n",
            self.longest_unavailable.as_secs_f64(),
            self.longest_at
        );
        t += &format!("elapsed                  {:.0} s\n", self.elapsed.as_secs_f64());
        t
    }
}

/// Runs the soak; `log` gets one line per migration.
pub fn run(opts: &ChaosOpts, mut log: impl FnMut(&str)) -> Summary {
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut sum = Summary { seed: opts.seed, ..Default::default() };
    let mut p = Pair::start("chaos", PairOpts { mib: opts.mib, ..Default::default() }, |_, b| b);
    let mut at = 0; // the side the workload runs at
    for i in 1..=opts.count {
        if t0.elapsed() >= opts.time_limit {
            log(&format!("time limit {:?} reached", opts.time_limit));
            break;
        }
        let fault =
            if rng.gen_bool(opts.fault_rate) { Fault::ALL[rng.gen_range(0..Fault::ALL.len())] } else { Fault::None };
        sum.migrations = i;
        let to = 1 - at;
        let marks = Marks::now(&[&p.sides[0], &p.sides[1]]);
        let started = Instant::now();
        let (ok, note, injected) = inject(&mut p, &mut rng, fault, at, opts.mib);
        let label = if injected { fault.name() } else { "none (kill drawn too late)" };
        *sum.faults.entry(label).or_default() += 1;
        let result = check(&mut p.sides, &marks, &p.sum0, &p.file0, Duration::from_secs(60));
        let line = match result {
            Ok(c) => {
                let outcome = match c.verdict {
                    Verdict::Runs(s) if c.rolled_back > 0 => {
                        at = s;
                        "rolled back"
                    }
                    Verdict::Runs(s) if s == to => {
                        at = s;
                        "moved"
                    }
                    Verdict::Runs(s) => {
                        at = s;
                        "stayed"
                    }
                    Verdict::InDoubt(_) => "in doubt",
                };
                *sum.outcomes.entry(outcome).or_default() += 1;
                if c.longest_gap > sum.longest_unavailable {
                    sum.longest_unavailable = c.longest_gap;
                    sum.longest_at = i;
                }
                if outcome == "in doubt" {
                    sum.violations
                        .push(format!("migration {i} ({}): still in doubt after the fault healed", fault.name()));
                    break;
                }
                format!(
                    "{i:>4} {:<24} {outcome:<25} migrate {} gap {:>5} ms  {:>5.1} s  {note}",
                    fault.name(),
                    if ok { "ok  " } else { "fail" },
                    c.longest_gap.as_millis(),
                    started.elapsed().as_secs_f64()
                )
            }
            // The destination was killed in the instant after it ran the
            // workload and the migration ended: the workload went with its
            // host, as it would from any host. Not the protocol's doing;
            // start it afresh.
            Err(e) if fault == Fault::KillDestination && ok && e.contains("no copy runs") => {
                *sum.outcomes.entry("lost with its killed host").or_default() += 1;
                p.restart_workload(to);
                at = to;
                format!("{i:>4} {:<24} lost with its killed host (started afresh)  {note}", fault.name())
            }
            Err(e) => {
                sum.violations.push(format!("migration {i} ({}): {e}", fault.name()));
                log(&format!("{i:>4} {:<24} VIOLATION: {e}  {note}", fault.name()));
                break;
            }
        };
        log(&line);
        if matches!(fault, Fault::RestoreFails | Fault::FullDisk) && p.sides[to].try_wait().ok().flatten().is_none() {
            if let Some(why) = crate::invariants::standby_leftovers(&p.sides[to]) {
                if at != to {
                    sum.violations.push(format!("migration {i} ({}): not a clean standby: {why}", fault.name()));
                    break;
                }
            }
            if at != to {
                p.replace_with_standby(to, |b| b);
            }
        }
        // A killed side (the destination of a fault) is replaced by a standby.
        for side in 0..2 {
            if p.sides[side].try_wait().ok().flatten().is_some() {
                p.replace_with_standby(side, |b| b);
            }
        }
    }
    sum.elapsed = t0.elapsed();
    sum
}

/// Migrates the workload from side `from` with `fault`; returns whether
/// `ums migrate` succeeded, a note on what was done, and whether the fault
/// was injected (a kill drawn after the destination ran the workload is not).
fn inject(p: &mut Pair, rng: &mut StdRng, fault: Fault, from: usize, mib: u32) -> (bool, String, bool) {
    let to = 1 - from;
    let bytes = (mib as u64) << 20;
    let mut note = String::new();
    let ok = match fault {
        Fault::None => p.start_migrate(from).join().map(|o| o.status.success()).unwrap_or(false),
        Fault::Cut | Fault::Corrupt => {
            let at = rng.gen_range(1024..bytes + (2 << 20));
            let f = if fault == Fault::Cut { ProxyFault::CutAfter(at) } else { ProxyFault::FlipByteAt(at) };
            let port = 20000 + rng.gen_range(0..20000u16);
            let target = SocketAddr::from((p.hosts[to].addr(), PEER_PORT));
            let proxy = FaultProxy::start(&p.hosts[to].netns_path(), port, target, f).expect("fault proxy");
            note = format!("at byte {at}");
            let mut cmd = p.sides[from].command(crate::outer::UMS_IN_OUTER);
            cmd.args([
                "migrate",
                "--json",
                "--mode",
                "stop-copy",
                "--to",
                &format!("{}:{}", p.hosts[to].addr(), proxy.port()),
            ]);
            let out = cmd.output().expect("ums migrate");
            out.status.success()
        }
        Fault::Partition | Fault::PartitionAfterManifest => {
            let hold = Duration::from_millis(rng.gen_range(500..4000));
            let from_log = p.sides[to].log().len();
            let h = p.start_migrate(from);
            if fault == Fault::Partition {
                let after = Duration::from_millis(rng.gen_range(0..1500));
                std::thread::sleep(after);
                note = format!("from {} ms for {} ms", after.as_millis(), hold.as_millis());
            } else {
                let seen =
                    p.sides[to].wait_for_line_from(from_log, "checkpoint verified; restoring", Duration::from_secs(30));
                note = format!("for {} ms{}", hold.as_millis(), if seen.is_err() { " (no manifest seen)" } else { "" });
            }
            let mut cut = Partition::start(&p.hosts[from]).expect("partition");
            std::thread::sleep(hold);
            cut.heal().expect("heal");
            h.join().map(|o| o.status.success()).unwrap_or(false)
        }
        Fault::KillDestination => {
            let after = Duration::from_millis(rng.gen_range(0..900));
            let from_log = p.sides[to].log().len();
            let h = p.start_migrate(from);
            std::thread::sleep(after);
            // Only a destination that does not run the workload yet: one
            // killed after it would take the workload with it, as any host.
            let ran = p.sides[to].lines()[from_log..].iter().any(|l| l.contains("workload running"));
            if ran {
                note = format!("after {} ms: not killed, it ran the workload already", after.as_millis());
                return (h.join().map(|o| o.status.success()).unwrap_or(false), note, false);
            }
            p.kill(to);
            note = format!("after {} ms", after.as_millis());
            // A fresh standby at the same address answers the source's
            // queries (an unknown migration: fenced), as a recreated pod would.
            p.replace_with_standby(to, |b| b);
            h.join().map(|o| o.status.success()).unwrap_or(false)
        }
        Fault::RestoreFails | Fault::FullDisk => {
            // The faulty standby is replaced by a good one after the check.
            p.replace_with_standby(to, |b| {
                if fault == Fault::RestoreFails {
                    b.env("UMS_FAILPOINT", "criu-fails")
                } else {
                    b.state_size(&format!("{}m", (mib / 2).max(8)))
                }
            });
            p.start_migrate(from).join().map(|o| o.status.success()).unwrap_or(false)
        }
    };
    (ok, note, true)
}
