//! End-to-end: live migration between two outer containers on two hosts
//! (network namespaces joined by a veth pair), with real runc, CRIU and TCP.

use std::time::Duration;

use nix::sys::signal::Signal;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;

fn counter_image(tmp: &std::path::Path, mib: &str) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr)
        .cmd(&[mib])
        .env("MEMCTR_FILE", "/data-marker")
        .build(&tmp.join("layout"))
        .expect("build the workload image")
}

fn status(o: &Outer) -> serde_json::Value {
    let out = o.ums_ok(&["status", "--json"]).expect("ums status");
    serde_json::from_str::<serde_json::Value>(&out).expect("status json")["result"].clone()
}

fn ticks(o: &Outer, from: usize) -> Vec<u64> {
    o.lines()[from..].iter().filter_map(|l| parse_tick(l)).map(|t| t.n).collect()
}

/// The last tick printed so far by `o`.
fn last_tick(o: &Outer) -> u64 {
    *ticks(o, 0).last().expect("some ticks")
}

/// Migrate from `src` to `dst` (whose host address is `addr`); returns the
/// report and checks the counter continues at the destination with no gap,
/// no repeat and no restart.
fn migrate(src: &Outer, dst: &Outer, addr: std::net::Ipv4Addr) -> serde_json::Value {
    let from_dst = dst.log().len();
    let out = src.ums(&["migrate", "--json", "--to", &format!("{addr}:{PEER_PORT}")]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last_src = last_tick(src);
    dst.log().wait_for_from(from_dst, &format!("tick {} ", last_src + 3), T).expect("the counter goes on at the destination");
    let t = ticks(dst, from_dst);
    assert_eq!(t[0], last_src + 1, "source ended at {last_src}, destination printed {t:?}");
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks not consecutive at the destination: {t:?}");
    }
    // The source is a standby now, and prints no more ticks.
    assert_eq!(status(src)["state"], "standby");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_tick(src), last_src, "the workload still runs at the source");
    assert_eq!(status(dst)["state"], "running");
    report["result"].clone()
}

fn checksum(o: &Outer) -> String {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (_, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

fn marker(o: &Outer) -> String {
    let pid = status(o)["workload"]["pid"].as_i64().unwrap();
    let f = o.exec("cat", &[&format!("/proc/{pid}/root/data-marker")]).unwrap();
    String::from_utf8_lossy(&f.stdout).trim().to_string()
}

#[test]
fn migrates_there_and_back_and_there_again() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "128");
    let (ha, hb) = Host::pair("mig", None).unwrap();
    let a = Outer::builder("mig-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("mig-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 5 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let sum0 = a.lines().iter().find_map(|l| parse_sum(l)).unwrap();
    let file0 = a.lines().iter().find(|l| l.starts_with("file ")).unwrap().split_whitespace().nth(2).unwrap().to_string();

    let r1 = migrate(&a, &b, hb.addr());
    println!("A->B: {r1}");
    assert!(r1["bytes"].as_u64().unwrap() > 128 << 20, "{r1}");
    assert_eq!(checksum(&b), sum0, "memory checksum after A->B");
    assert_eq!(marker(&b), file0, "file written before the migration");

    let r2 = migrate(&b, &a, ha.addr());
    println!("B->A: {r2}");
    assert_eq!(checksum(&a), sum0, "memory checksum after B->A");
    let r3 = migrate(&a, &b, hb.addr());
    println!("A->B: {r3}");
    assert_eq!(checksum(&b), sum0);
    assert_eq!(marker(&b), file0);
}
