//! End-to-end: pre-copy by content (`ums migrate --mode pre-copy`) between
//! two outer containers on two hosts, with real runc and CRIU: rounds of
//! dumps with the workload left running, only changed pages sent after the
//! first, then a short freeze. The workload (memctr with a writer,
//! `MEMCTR_WRITE_MIB_S`) rewrites memory all along; on SIGUSR1 it prints the
//! checksum of its memory (`sum`) and the one it must have (`expect`), which
//! differ if any page was lost or stale.

use std::time::Duration;

use nix::sys::signal::Signal;
use ums_e2e::*;

const T: Duration = Duration::from_secs(90);
const PEER_PORT: u16 = 7411;

fn writer_image(tmp: &std::path::Path, mib: u64, write_mib_s: u64) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr)
        .cmd(&[&mib.to_string()])
        .env("MEMCTR_WRITE_MIB_S", &write_mib_s.to_string())
        .build(&tmp.join("layout"))
        .expect("build the workload image")
}

/// The memory's checksum and the one it must have, from a fresh SIGUSR1.
fn sums(o: &Outer) -> (String, String) {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (at, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    let (_, exp) = o.log().wait_for_from(at, "expect ", T).unwrap();
    (parse_sum(&line).unwrap(), exp.split_whitespace().nth(1).unwrap().to_string())
}

fn assert_memory_intact(o: &Outer, what: &str) {
    let (sum, expect) = sums(o);
    assert_eq!(sum, expect, "{what}: the memory differs from what the writer wrote");
}

/// Migrate `src` to `dst` (at `addr`) in `mode`: the counter continues at
/// the destination with no gap, no repeat and no restart, and the source
/// prints nothing more. Returns the report.
fn migrate(src: &Outer, dst: &Outer, addr: std::net::Ipv4Addr, mode: &str) -> serde_json::Value {
    let from_dst = dst.log().len();
    let to = format!("{addr}:{PEER_PORT}");
    let out = src.ums(&["migrate", "--json", "--mode", mode, "--to", &to]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last_src = last_tick(src);
    dst.log().wait_for_from(from_dst, &format!("tick {} ", last_src + 3), T).expect("the counter goes on");
    let t = ticks(dst, from_dst);
    assert_eq!(t[0], last_src + 1, "source ended at {last_src}, destination printed {t:?}");
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks not consecutive at the destination: {t:?}");
    }
    assert_eq!(status(src)["state"], "standby");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_tick(src), last_src, "the workload still runs at the source");
    assert_eq!(status(dst)["state"], "running");
    report["result"].clone()
}

/// Pre-copy of `mib` MiB with a slow writer on a 1 Gbit/s link, then back
/// with stop-copy: the freezes side by side.
fn slow_writer(name: &str, mib: u64) {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = writer_image(tmp.path(), mib, 2);
    let (ha, hb) = Host::pair(name, Some("1gbit")).unwrap();
    let a = Outer::builder(&format!("{name}-a")).host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder(&format!("{name}-b")).host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    assert_memory_intact(&a, "before");

    let pre = migrate(&a, &b, hb.addr(), "pre-copy");
    println!("{name}: pre-copy A->B: {pre:#}");
    assert_eq!(pre["mode"], "pre-copy", "{pre}");
    assert_memory_intact(&b, "after pre-copy");
    let rounds = pre["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{pre}");
    // The first round sent all the memory while the workload ran; the
    // frozen one far less.
    assert!(rounds[0]["bytes"].as_u64().unwrap() >= (mib << 20) * 9 / 10, "{pre}");
    let fin = &pre["final_round"];
    let final_bytes = fin["bytes"].as_u64().unwrap();
    assert!(final_bytes < (mib << 20) / 8, "final round sent {final_bytes} bytes of {mib} MiB: {pre}");
    assert!(fin["pages_sent"].as_u64().unwrap() < fin["pages"].as_u64().unwrap() / 8, "{pre}");
    for r in rounds {
        assert!(r["pause_ms"].as_f64().unwrap() > 0.0, "each round's own pause is reported: {r}");
    }

    let stop = migrate(&b, &a, ha.addr(), "stop-copy");
    println!("{name}: stop-copy B->A: {stop:#}");
    assert_memory_intact(&a, "after stop-copy back");
    println!(
        "FREEZE {mib} MiB, 1 Gbit/s: pre-copy {:.3} s ({} rounds, final {:.1} MiB, dump {:.3} s, restore {:.3} s); \
         stop-copy {:.3} s ({:.1} MiB)",
        pre["frozen_ms"].as_f64().unwrap() / 1000.0,
        rounds.len(),
        final_bytes as f64 / 1048576.0,
        fin["dump_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        pre["restore_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        stop["frozen_ms"].as_f64().unwrap() / 1000.0,
        stop["bytes"].as_f64().unwrap() / 1048576.0,
    );
}

#[test]
fn pre_copy_512_mib_with_a_slow_writer_freezes_for_the_last_changes_only() {
    slow_writer("pc512", 512);
}

#[test]
fn pre_copy_256_mib_with_a_slow_writer_freezes_for_the_last_changes_only() {
    slow_writer("pc256", 256);
}

#[test]
fn a_writer_faster_than_the_link_ends_the_rounds_and_the_migration_completes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB rewritten at 30 MiB/s over a link of about 12 MiB/s: every
    // round finds all of it changed again.
    let img = writer_image(tmp.path(), 64, 30);
    let (ha, hb) = Host::pair("pcfast", Some("100mbit")).unwrap();
    let a = Outer::builder("pcfast-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("pcfast-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let r = migrate(&a, &b, hb.addr(), "pre-copy");
    println!("{r:#}");
    let rounds = r["rounds"].as_array().unwrap();
    let reason = r["stop_reason"].as_str().unwrap();
    assert!(reason.contains("stopped shrinking"), "{reason}: {r}");
    assert!(rounds.len() < 5, "the stop rule, not the round limit, ended the rounds: {r}");
    assert_memory_intact(&b, "after pre-copy");
}

/// A link cut during a round (the first, then the second): the workload
/// runs on at the source, never frozen by the migration, its memory
/// intact; the destination keeps nothing and takes a later migration.
#[test]
fn a_link_cut_during_a_round_leaves_the_source_running_intact() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mib = 128u64;
    // 50 MiB/s: the second round carries tens of MiB.
    let img = writer_image(tmp.path(), mib, 50);
    let (ha, hb) = Host::pair("pccutr", None).unwrap();
    let a = Outer::builder("pccutr-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("pccutr-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let target: std::net::SocketAddr = format!("127.0.0.1:{PEER_PORT}").parse().unwrap();
    for (port, cut) in [(7501u16, 32u64 << 20), (7502, (mib + 6) << 20)] {
        let proxy = FaultProxy::start(&hb.netns_path(), port, target, Fault::CutAfter(cut)).unwrap();
        let from = a.log().len();
        let to = format!("{}:{}", hb.addr(), proxy.port());
        let out = a.ums(&["migrate", "--json", "--mode", "pre-copy", "--to", &to]).unwrap();
        assert!(!out.status.success(), "the cut migration succeeded: {}", String::from_utf8_lossy(&out.stdout));
        println!("cut after {} MiB: {}", cut >> 20, String::from_utf8_lossy(&out.stderr).trim());
        let st = status(&a);
        assert_eq!(st["state"], "running", "{st}");
        let last = last_tick(&a);
        a.log().wait_for_from(from, &format!("tick {} ", last + 3), T).expect("the workload runs on at the source");
        let t = ticks(&a, 0);
        for w in t.windows(2) {
            assert_eq!(w[1], w[0] + 1, "ticks at the source: {t:?}");
        }
        assert_memory_intact(&a, "at the source after the cut");
        // The destination discarded what it had received.
        let until = std::time::Instant::now() + T;
        while status(&b)["state"] != "standby" && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(status(&b)["state"], "standby");
        let left = b.exec("sh", &["-c", "ls -A /var/lib/ums/images 2>/dev/null | wc -l"]).unwrap();
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0", "images left at the destination");
    }
    // And then a pre-copy goes through.
    migrate(&a, &b, hb.addr(), "pre-copy");
    assert_memory_intact(&b, "after pre-copy");
}

/// The destination killed while a round streams: the source runs on, intact.
#[test]
fn a_destination_killed_during_a_round_leaves_the_source_running_intact() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = writer_image(tmp.path(), 128, 10);
    // About 11 s for the first round: time to kill the destination in it.
    let (ha, hb) = Host::pair("pcdkill", Some("100mbit")).unwrap();
    let a = Outer::builder("pcdkill-a").host(&ha).layout(&img.layout).start().unwrap();
    let mut b = Outer::builder("pcdkill-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let from = a.log().len();
    let to = format!("{}:{PEER_PORT}", hb.addr());
    let mut cmd = a.command("/opt/ums/ums");
    cmd.args(["migrate", "--mode", "pre-copy", "--to", &to]);
    let h = std::thread::spawn(move || cmd.output().unwrap());
    b.wait_for_line("incoming migration", T).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    b.signal(Signal::SIGKILL).unwrap();
    let out = h.join().unwrap();
    assert!(!out.status.success(), "{out:?}");
    println!("destination killed: {}", String::from_utf8_lossy(&out.stderr).trim());
    let st = status(&a);
    assert_eq!(st["state"], "running", "{st}");
    let last = last_tick(&a);
    a.log().wait_for_from(from, &format!("tick {} ", last + 3), T).expect("the workload runs on at the source");
    let t = ticks(&a, 0);
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks at the source: {t:?}");
    }
    assert_memory_intact(&a, "at the source after the destination died");
}
