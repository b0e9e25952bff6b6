//! End-to-end: a workload's monotonic and boot-time clocks at a migration
//! between hosts whose clocks differ (issue 15, item 6).
//!
//! Two hosts never agree on CLOCK_MONOTONIC or CLOCK_BOOTTIME: they count
//! from each one's boot. Servers measure timeouts, leases and rate limits
//! with them, so a clock that went back or leapt by days at a move would
//! break them. Here outer container B runs in a time namespace whose clocks
//! are 11.6 days ahead of A's (a host booted that much earlier), and the
//! workload (clockmon) prints its clocks every 100 ms while it moves
//! A -> B -> A: they never go back and never leap by more than the freeze.

use std::time::Duration;

use ums_e2e::pair::PEER_PORT;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
/// How far B's clocks run ahead of A's.
const OFFSET_S: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
struct Clocks {
    n: u64,
    mono: i64,
    boot: i64,
}

fn clocks(o: &Outer, from: usize) -> Vec<Clocks> {
    o.lines()[from..]
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[0] == "clock").then(|| Clocks {
                n: f[1].parse().unwrap(),
                mono: f[2].parse().unwrap(),
                boot: f[3].parse().unwrap(),
            })
        })
        .collect()
}

/// Migrates `src` -> `dst`; returns the report, the workload's last clock
/// line at the source and its first lines at the destination.
fn migrate(src: &Outer, dst: &Outer, addr: std::net::Ipv4Addr) -> (serde_json::Value, Clocks, Vec<Clocks>) {
    let from_dst = dst.log().len();
    let out = src.ums(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{addr}:{PEER_PORT}")]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone();
    let last = *clocks(src, 0).last().expect("clock lines at the source");
    dst.log().wait_for_from(from_dst, &format!("clock {} ", last.n + 5), T).expect("the workload goes on there");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(clocks(src, 0).last().unwrap().n, last.n, "the workload still runs at the source");
    (report, last, clocks(dst, from_dst))
}

/// Across the move and after it, each clock goes forward, by at most the
/// freeze (plus the 100 ms between lines and some scheduling slack).
fn assert_continuous(what: &str, report: &serde_json::Value, before: Clocks, after: &[Clocks]) {
    let frozen_ms = report["frozen_ms"].as_f64().unwrap_or_else(|| panic!("no frozen_ms in {report}"));
    let bound = frozen_ms as i64 + 100 + 400;
    assert_eq!(after[0].n, before.n + 1, "{what}: lines {} then {}", before.n, after[0].n);
    let mut prev = before;
    for c in after {
        for (clock, d) in [("CLOCK_MONOTONIC", c.mono - prev.mono), ("CLOCK_BOOTTIME", c.boot - prev.boot)] {
            assert!(d >= 0, "{what}: {clock} went back by {} ms (line {} -> {})", -d, prev.n, c.n);
            let limit = if prev.n == before.n { bound } else { 100 + 400 };
            assert!(d <= limit, "{what}: {clock} leapt by {d} ms (line {} -> {}; frozen {frozen_ms} ms)", prev.n, c.n);
        }
        prev = *c;
    }
    eprintln!(
        "{what}: frozen {frozen_ms:.0} ms; across the move CLOCK_MONOTONIC advanced {} ms, CLOCK_BOOTTIME {} ms",
        after[0].mono - before.mono,
        after[0].boot - before.boot
    );
}

#[test]
fn monotonic_and_boot_clocks_neither_go_back_nor_leap_between_hosts_whose_clocks_differ() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let memctr = build_workload(tmp.path());
    let clockmon = std::fs::read(build_clockmon(tmp.path())).unwrap();
    let img = ImageBuilder::new(&memctr)
        .file("bin/clockmon", clockmon, 0o755)
        .entrypoint(&["/bin/clockmon"])
        .build(&tmp.path().join("layout"))
        .expect("build the clockmon image");
    let (ha, hb) = Host::pair("clk", None).unwrap();
    let a = Outer::builder("clk-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("clk-b")
        .host(&hb)
        .layout(&img.layout)
        .clock_offset(OFFSET_S)
        .args(&["--standby"])
        .start()
        .unwrap();
    a.wait_for_line("clock 5 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    // The two outer containers' clocks really differ by the offset.
    let uptime = |o: &Outer| -> f64 {
        let out = o.exec("cat", &["/proc/uptime"]).unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
    };
    let skew = uptime(&b) - uptime(&a);
    assert!((skew - OFFSET_S as f64).abs() < 60.0, "B's clocks run {skew} s ahead of A's, not {OFFSET_S}");

    let (r1, last, after) = migrate(&a, &b, hb.addr());
    assert_continuous("A -> B", &r1, last, &after);
    let (r2, last, after) = migrate(&b, &a, ha.addr());
    assert_continuous("B -> A", &r2, last, &after);
    // And once more, so that a workload restored into a clock offset of its
    // own is dumped and restored again.
    let (r3, last, after) = migrate(&a, &b, hb.addr());
    assert_continuous("A -> B again", &r3, last, &after);
}
