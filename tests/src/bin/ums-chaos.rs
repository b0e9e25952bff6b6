//! `ums-chaos`: the bounded soak of `make chaos` (ums_e2e::chaos). Runs up
//! to `--count` migrations between two outer containers, each with a random
//! fault drawn from `--seed`, checks the invariants after every one, and
//! prints a summary table. Exits 1 if any invariant was violated.
//!
//!   ums-chaos [--count N] [--seed S] [--time-limit SECS] [--mib N] [--fault-rate R]

use std::time::Duration;

use ums_e2e::chaos::{run, ChaosOpts};

fn main() {
    let mut o = ChaosOpts::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--count" => o.count = val().parse().expect("--count N"),
            "--seed" => o.seed = val().parse().expect("--seed S"),
            "--time-limit" => o.time_limit = Duration::from_secs(val().parse().expect("--time-limit SECS")),
            "--mib" => o.mib = val().parse().expect("--mib N"),
            "--fault-rate" => o.fault_rate = val().parse().expect("--fault-rate 0..1"),
            _ => {
                eprintln!("usage: ums-chaos [--count N] [--seed S] [--time-limit SECS] [--mib N] [--fault-rate R]");
                std::process::exit(2);
            }
        }
    }
    println!("ums-chaos: seed {} (replay with --seed {}), up to {} migrations", o.seed, o.seed, o.count);
    let sum = run(&o, |line| println!("{line}"));
    println!("\n{}", sum.table());
    std::process::exit(if sum.violations.is_empty() { 0 } else { 1 });
}
