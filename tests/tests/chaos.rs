//! End-to-end: a short chaos soak (`ums_e2e::chaos`) in `make test`: a few
//! migrations back and forth with seeded random faults, and the invariants
//! after each. `make chaos` runs the long one (200 migrations).

use std::time::Duration;

use ums_e2e::chaos::{run, ChaosOpts};

#[test]
fn a_short_soak_of_faulted_migrations_keeps_every_invariant() {
    ums_e2e::require_root();
    // Seed from the environment to replay a failure, else a fixed one.
    let seed = std::env::var("UMS_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let o = ChaosOpts { count: 4, seed, time_limit: Duration::from_secs(120), mib: 16, fault_rate: 0.75 };
    let sum = run(&o, |l| println!("{l}"));
    println!("{}", sum.table());
    assert!(sum.violations.is_empty(), "seed {seed}: {:?}", sum.violations);
    assert_eq!(sum.migrations, 4, "seed {seed}");
}
