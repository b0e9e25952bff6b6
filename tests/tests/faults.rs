//! End-to-end: real faults during a migration, each with the outcome
//! docs/migration-protocol.md ("Faults and their outcomes") promises, checked
//! by the invariant checker (`ums_e2e::invariants`): exactly one copy runs
//! (or none, frozen and in doubt, never two), its counter goes on without a
//! repeat or a restart, its memory checksum and file are intact, and the
//! other side is a clean standby.
//!
//! The faults are real: a small tmpfs under the destination's state dir, a
//! memory limit on the destination's cgroup, CRIU hanging or failing at the
//! destination (fail points hand runc another CRIU program), outer
//! containers killed with SIGKILL, and packets dropped by iptables in the
//! network namespaces the test made. (A partition after the manifest, and a
//! destination killed mid-restore, are in fail_closed.rs.)

use std::time::Duration;

use ums_e2e::invariants::{check, standby_leftovers, Marks, Verdict};
use ums_e2e::pair::{Pair, PairOpts};
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// A pair-builder tweak that changes only the destination (side 1).
fn destination(f: impl Fn(OuterBuilder) -> OuterBuilder) -> impl Fn(usize, OuterBuilder) -> OuterBuilder {
    move |side, b| if side == 1 { f(b) } else { b }
}

fn marks(p: &Pair) -> Marks {
    Marks::now(&[&p.sides[0], &p.sides[1]])
}

fn verdict(p: &mut Pair, m: &Marks) -> ums_e2e::invariants::Checked {
    let c = check(&mut p.sides, m, &p.sum0, &p.file0, T).unwrap_or_else(|e| panic!("invariant violated: {e}"));
    println!("verdict {:?}, longest gap {:?}", c.verdict, c.longest_gap);
    c
}

/// `ums migrate` A -> B, expected to fail with a message containing `what`.
fn migrate_fails(p: &Pair, what: &str) -> String {
    let out = p.start_migrate(0).join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the migration succeeded: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(what), "expected {what:?} in: {err}");
    println!("refused: {}", err.trim());
    err
}

#[test]
fn a_full_disk_at_the_destination_is_refused_before_anything_is_frozen() {
    // 64 MiB of workload memory; the destination's state dir holds 24 MiB.
    let mut p = Pair::start("fdisk", PairOpts { mib: 64, ..Default::default() }, destination(|b| b.state_size("24m")));
    let m = marks(&p);
    migrate_fails(&p, "not enough space for the checkpoint");
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    assert!(c.longest_gap < Duration::from_millis(400), "the workload was frozen for {:?}", c.longest_gap);
}

#[test]
fn a_destination_memory_limit_too_small_is_refused_before_anything_is_frozen() {
    let mut p =
        Pair::start("fmem", PairOpts { mib: 64, ..Default::default() }, destination(|b| b.cgroup(Some(48 * MIB))));
    let m = marks(&p);
    migrate_fails(&p, "memory limit is too small for the workload");
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    assert!(c.longest_gap < Duration::from_millis(400), "the workload was frozen for {:?}", c.longest_gap);
}

#[test]
fn criu_failing_at_the_destination_thaws_the_source() {
    let mut p = Pair::start("fcriu", PairOpts::default(), destination(|b| b.env("UMS_FAILPOINT", "criu-fails")));
    let m = marks(&p);
    migrate_fails(&p, "restore");
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    // And the pair still works: a good standby takes it.
    p.replace_with_standby(1, |b| b);
    let m = marks(&p);
    let out = p.start_migrate(0).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}

#[test]
fn criu_hanging_at_the_destination_is_killed_after_the_restore_timeout() {
    let mut p = Pair::start(
        "fhang",
        PairOpts::default(),
        destination(|b| b.env("UMS_FAILPOINT", "hang-restore").env("UMS_RESTORE_TIMEOUT", "4s")),
    );
    let m = marks(&p);
    let t0 = std::time::Instant::now();
    migrate_fails(&p, "did not finish within 4s");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "the hung restore held the migration for {took:?}");
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    // The hung program and runc were killed with their process group.
    assert!(standby_leftovers(&p.sides[1]).is_none(), "{:?}", standby_leftovers(&p.sides[1]));
}

fn slow_link() -> PairOpts {
    PairOpts { mib: 128, rate: Some("400mbit".into()), ..Default::default() }
}

#[test]
fn the_source_killed_during_the_transfer_leaves_a_clean_standby() {
    let mut p = Pair::start("fsrck", slow_link(), |_, b| b);
    let h = p.start_migrate(0);
    p.wait_receiving(1, 16);
    p.kill(0);
    let _ = h.join();
    // The workload died with the outer container that ran it (frozen there);
    // the destination has no manifest, so it never restores: it discards.
    let b = &p.sides[1];
    let t0 = std::time::Instant::now();
    while let Some(why) = standby_leftovers(b) {
        assert!(t0.elapsed() < T, "the destination is not a clean standby: {why}");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("the destination discarded the partial checkpoint after {:?}", t0.elapsed());
    assert!(status(b)["workload"].is_null());
}

#[test]
fn the_source_killed_after_the_manifest_the_destination_runs_it() {
    let mut p = Pair::start("fsrcm", PairOpts::default(), destination(|b| b.env("UMS_FAILPOINT", "slow-restore")));
    let m = marks(&p);
    let h = p.start_migrate(0);
    p.sides[1].wait_for_line("checkpoint verified; restoring", T).unwrap();
    p.kill(0);
    let _ = h.join();
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(1));
}

#[test]
fn the_destination_killed_during_the_transfer_thaws_the_source() {
    let mut p = Pair::start("fdstk", slow_link(), |_, b| b);
    let m = marks(&p);
    let h = p.start_migrate(0);
    p.wait_receiving(1, 16);
    p.kill(1);
    let out = h.join().unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    // A recreated destination takes it.
    p.replace_with_standby(1, |b| b);
    let m = marks(&p);
    let out = p.start_migrate(0).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}

#[test]
fn a_partition_during_the_transfer_thaws_the_source_and_the_destination_discards() {
    let mut p = Pair::start("fpart", slow_link(), |_, b| b);
    let m = marks(&p);
    let h = p.start_migrate(0);
    p.wait_receiving(1, 16);
    let mut cut = Partition::start(&p.hosts[0]).unwrap();
    let out = h.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    println!("migrate: {}", err.trim());
    // Before the manifest the destination cannot restore: the source thaws
    // at its deadline, and the destination, at its own, discards.
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    cut.heal().unwrap();
    let m = marks(&p);
    let out = p.start_migrate(0).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}

#[test]
fn a_disk_that_fills_up_during_the_transfer_thaws_the_source_and_the_destination_discards() {
    // Room for the checkpoint when the migration starts (the pre-migration
    // check passes); then something else on the destination's disk takes
    // what is left while the checkpoint streams in.
    let mut p = Pair::start("ffill", slow_link(), destination(|b| b.state_size("320m")));
    let m = marks(&p);
    let h = p.start_migrate(0);
    p.wait_receiving(1, 16);
    let fill = p.sides[1]
        .exec(
            "sh",
            &["-c", "dd if=/dev/zero of=/var/lib/ums/filler bs=1M 2>&1 | tail -1; df -m /var/lib/ums | tail -1"],
        )
        .unwrap();
    println!("filled: {}", String::from_utf8_lossy(&fill.stdout).trim());
    let out = h.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the migration succeeded: {}", String::from_utf8_lossy(&out.stdout));
    println!("migrate: {}", err.trim());
    // The write failed mid-stream (not the pre-migration check's refusal).
    assert!(err.contains("No space left on device"), "the cause is not named: {err}");
    // The filler is someone else's: the destination discards only its own
    // files, so remove it before checking that it is a clean standby.
    let rm = p.sides[1].exec("rm", &["-f", "/var/lib/ums/filler"]).unwrap();
    assert!(rm.status.success());
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    // With its disk back, the destination takes it.
    let m = marks(&p);
    let out = p.start_migrate(0).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}

#[test]
fn a_partition_while_the_image_is_sent_fails_before_anything_is_frozen() {
    // A's image carries a 48 MiB layer that B lacks: pre-migration sends it
    // (over 400 Mbit/s, about a second) before anything is frozen.
    let tmp = tempfile::tempdir().unwrap();
    let memctr = build_workload(tmp.path());
    let mut big = vec![0u8; 48 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for c in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let img = ImageBuilder::new(&memctr)
        .cmd(&["128"])
        .env("MEMCTR_FILE", "/data-marker")
        .layer(Layer::new(Compression::None).file("opt/big.bin", big, 0o644))
        .build(&tmp.path().join("big-layout"))
        .expect("build the image with a big layer");
    let layout = img.layout.clone();
    let mut p = Pair::start("fprem", slow_link(), move |side, b| if side == 0 { b.layout(&layout) } else { b });
    let m = marks(&p);
    let h = p.start_migrate(0);
    // Wait for the blob to be on its way into B's image layout.
    let t0 = std::time::Instant::now();
    loop {
        let out = p.sides[1].exec("du", &["-sm", "/var/lib/ums/image"]).unwrap();
        let mib: u64 =
            String::from_utf8_lossy(&out.stdout).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if mib >= 8 {
            break;
        }
        assert!(t0.elapsed() < T, "B never received the image's blob");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cut = Partition::start(&p.hosts[0]).unwrap();
    let out = h.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    println!("migrate: {}", err.trim());
    let c = verdict(&mut p, &m);
    assert_eq!(c.verdict, Verdict::Runs(0));
    assert!(c.longest_gap < Duration::from_millis(400), "the workload was frozen for {:?}", c.longest_gap);
    cut.heal().unwrap();
    let m = marks(&p);
    let out = p.start_migrate(0).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}

#[test]
fn a_link_of_a_few_hundred_kib_per_second_is_slow_but_not_a_fault() {
    // 800 kbit/s (100 KB/s after a 1 MB burst), no compression, a 6 s peer
    // deadline: the checkpoint of a 2 MiB workload takes about twice the
    // deadline to arrive, while the source wrote its last byte (into socket
    // buffers) almost at once and waits for `Result`. Each read on either
    // side still gets a frame within the deadline (data one way, the
    // destination's heartbeats the other), so the migration completes.
    let opts = PairOpts { mib: 2, rate: Some("800kbit".into()), peer_timeout: "6s".into() };
    let mut p = Pair::start("fslow", opts, |side, b| if side == 0 { b.args(&["--compress", "off"]) } else { b });
    let m = marks(&p);
    let t0 = std::time::Instant::now();
    let out = p.start_migrate(0).join().unwrap();
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{took:?}: {} bytes, frozen {} ms", r["result"]["bytes"], r["result"]["frozen_ms"]);
    assert!(took > Duration::from_secs(7), "the link was not slow: {took:?}");
    assert_eq!(r["result"]["in_doubt_ms"], 0.0, "the source went in doubt: {r}");
    assert_eq!(verdict(&mut p, &m).verdict, Verdict::Runs(1));
}
