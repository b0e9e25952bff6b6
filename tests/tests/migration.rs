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

/// Migrate from `src` to `dst` (whose host address is `addr`); returns the
/// report and checks the counter continues at the destination with no gap,
/// no repeat and no restart.
fn migrate(src: &Outer, dst: &Outer, addr: std::net::Ipv4Addr) -> serde_json::Value {
    let from_dst = dst.log().len();
    let out = src.ums(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{addr}:{PEER_PORT}")]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last_src = last_tick(src);
    dst.log()
        .wait_for_from(from_dst, &format!("tick {} ", last_src + 3), T)
        .expect("the counter goes on at the destination");
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
    let file0 =
        a.lines().iter().find(|l| l.starts_with("file ")).unwrap().split_whitespace().nth(2).unwrap().to_string();

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

/// A source, a standby destination, and the workload running at the source.
struct Pair {
    _tmp: tempfile::TempDir,
    ha: Host,
    hb: Host,
    a: Outer,
    b: Outer,
    img: OciImage,
}

fn pair(name: &str, mib: &str, b_env: &[(&str, &str)]) -> Pair {
    pair_with(name, mib, b_env, false)
}

/// `pair`, with both outer containers on plain TCP when `insecure`.
fn pair_with(name: &str, mib: &str, b_env: &[(&str, &str)], insecure: bool) -> Pair {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), mib);
    let (ha, hb) = Host::pair(name, None).unwrap();
    let mut ab = Outer::builder(&format!("{name}-a")).host(&ha).layout(&img.layout);
    let mut bb = Outer::builder(&format!("{name}-b")).host(&hb).layout(&img.layout).args(&["--standby"]);
    if insecure {
        (ab, bb) = (ab.insecure_peer(), bb.insecure_peer());
    }
    let a = ab.start().unwrap();
    for (k, v) in b_env {
        bb = bb.env(k, v);
    }
    let b = bb.start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    Pair { _tmp: tmp, ha, hb, a, b, img }
}

/// A migration that must fail, leaving the workload running at the source
/// with its counter and memory intact.
fn failed_migration(p: &Pair, to: &str, expect_in_error: &str) {
    let sum0 = p.a.lines().iter().find_map(|l| parse_sum(l)).unwrap();
    let from = p.a.log().len();
    let out = p.a.ums(&["migrate", "--mode", "stop-copy", "--to", to]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "migration should have failed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(expect_in_error), "error {err:?} does not mention {expect_in_error:?}");
    let st = status(&p.a);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["last_op"]["ok"], false);
    // The counter resumes where it was: no restart, nothing missing.
    let before: Vec<u64> = ticks(&p.a, 0).into_iter().take_while(|_| true).collect();
    let last = *before.last().unwrap();
    p.a.log().wait_for_from(from, &format!("tick {} ", last + 3), T).expect("the workload runs on at the source");
    let t = ticks(&p.a, 0);
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks at the source: {t:?}");
    }
    assert_eq!(checksum(&p.a), sum0, "memory checksum at the source after the failed migration");
}

#[test]
fn a_connection_cut_mid_stream_leaves_the_workload_at_the_source() {
    let p = pair("cut", "64", &[]);
    let target: std::net::SocketAddr = format!("127.0.0.1:{PEER_PORT}").parse().unwrap();
    let proxy = FaultProxy::start(&p.hb.netns_path(), 7500, target, Fault::CutAfter(20 << 20)).unwrap();
    failed_migration(&p, &format!("{}:{}", p.hb.addr(), proxy.port()), "");
    // The destination went back to standby; a retry (through the proxy,
    // which now passes everything) succeeds.
    assert_eq!(status(&p.b)["state"], "standby");
    migrate(&p.a, &p.b, p.hb.addr());
}

#[test]
fn a_flipped_byte_is_caught_by_the_manifest() {
    // Over TLS the record layer catches it first (tests/tests/security.rs);
    // on plain TCP the manifest's digests must.
    let p = pair_with("flip", "64", &[], true);
    let target: std::net::SocketAddr = format!("127.0.0.1:{PEER_PORT}").parse().unwrap();
    let proxy = FaultProxy::start(&p.hb.netns_path(), 7501, target, Fault::FlipByteAt(30 << 20)).unwrap();
    failed_migration(&p, &format!("{}:{}", p.hb.addr(), proxy.port()), "mismatch");
    assert_eq!(status(&p.b)["state"], "standby");
    migrate(&p.a, &p.b, p.hb.addr());
}

#[test]
fn a_failed_restore_thaws_the_source() {
    let p = pair("rfail", "64", &[("UMS_FAILPOINT", "restore")]);
    failed_migration(&p, &format!("{}:{PEER_PORT}", p.hb.addr()), "failpoint");
    assert_eq!(status(&p.b)["state"], "standby");
    assert!(status(&p.b)["workload"].is_null());
}

#[test]
fn a_destination_killed_during_restore_leaves_the_workload_at_the_source() {
    let mut p = pair("dkill", "64", &[("UMS_FAILPOINT", "slow-restore")]);
    let to = format!("{}:{PEER_PORT}", p.hb.addr());
    let mut cmd = p.a.command("/opt/ums/ums");
    cmd.args(["migrate", "--mode", "stop-copy", "--to", &to]);
    let h = std::thread::spawn(move || cmd.output().unwrap());
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    p.b.signal(Signal::SIGKILL).unwrap();
    // After the manifest, an unreachable destination is no answer: the source
    // stays frozen and in doubt (tests/tests/fail_closed.rs has the details)...
    let until = std::time::Instant::now() + T;
    while status(&p.a)["operation"]["in_doubt"].is_null() {
        assert!(std::time::Instant::now() < until, "the source never went in doubt");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!h.is_finished(), "ums migrate returned while in doubt");
    // ...until a new standby on the same host answers that the migration does
    // not run there (it never heard of it, and fences it).
    drop(std::mem::replace(
        &mut p.b,
        Outer::builder("dkill-b2").host(&p.hb).layout(&p.img.layout).args(&["--standby"]).start().unwrap(),
    ));
    p.b.wait_for_line("standby", T).unwrap();
    let out = h.join().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fenced"), "{out:?}");
    assert_eq!(status(&p.a)["state"], "running");
    let last = last_tick(&p.a);
    p.a.log().wait_for_from(0, &format!("tick {} ", last + 3), T).expect("runs on at the source");
    // And a retry succeeds.
    migrate(&p.a, &p.b, p.hb.addr());
}

#[test]
fn a_destination_without_the_image_gets_the_missing_blobs() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "16");
    let (ha, hb) = Host::pair("blobs", None).unwrap();
    let empty = tmp.path().join("empty-layout");
    std::fs::create_dir_all(empty.join("blobs/sha256")).unwrap();
    std::fs::write(empty.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(empty.join("index.json"), r#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
    let a = Outer::builder("blobs-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("blobs-b").host(&hb).layout(&empty).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let r = migrate(&a, &b, hb.addr());
    assert!(r["blob_bytes"].as_u64().unwrap() > 100_000, "the layers were sent: {r}");
    let _ = ha;
}

#[test]
fn a_busy_or_occupied_destination_refuses_and_nothing_moves() {
    let p = pair("busy", "16", &[]);
    // To itself: the destination (A) is busy with this very migration.
    let sum0 = p.a.lines().iter().find_map(|l| parse_sum(l)).unwrap();
    let out = p.a.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", p.ha.addr())]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer refused: busy"), "{out:?}");
    // B -> A while A runs a workload: A is not a standby.
    let out = p.b.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", p.ha.addr())]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload"), "{out:?}");
    // A peer that is not listening at all.
    let out = p.a.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:1", p.hb.addr())]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"), "{out:?}");
    assert_eq!(status(&p.a)["state"], "running");
    assert_eq!(checksum(&p.a), sum0);
}

#[test]
fn sigterm_during_a_migration_waits_for_it_to_end() {
    let mut p = pair("term", "32", &[("UMS_FAILPOINT", "slow-restore")]);
    let to = format!("{}:{PEER_PORT}", p.hb.addr());
    let mut cmd = p.a.command("/opt/ums/ums");
    cmd.args(["migrate", "--mode", "stop-copy", "--to", &to]);
    let h = std::thread::spawn(move || cmd.output().unwrap());
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    // The orchestrator stops the source pod in the middle of the migration.
    p.a.signal(Signal::SIGTERM).unwrap();
    p.a.wait_for_line("applied when it ends", T).unwrap();
    let out = h.join().unwrap();
    assert!(out.status.success(), "the migration finished despite the SIGTERM: {out:?}");
    // Then the SIGTERM took effect: the source, a standby now, exits cleanly,
    // and the workload runs on at the destination.
    let st = p.a.wait(T).unwrap();
    assert_eq!(st.code(), Some(0));
    let from = p.b.log().len();
    p.b.log().wait_for_from(from, "tick ", T).expect("the workload runs at the destination");
    assert_eq!(status(&p.b)["state"], "running");
}

/// The workload's seccomp mode at `o` (2: a filter), from /proc.
fn workload_seccomp(o: &Outer) -> String {
    let pid = status(o)["workload"]["pid"].as_i64().unwrap();
    let s = o.exec("grep", &["^Seccomp:", &format!("/proc/{pid}/status")]).unwrap();
    String::from_utf8_lossy(&s.stdout).split_whitespace().nth(1).unwrap_or("").to_string()
}

#[test]
fn sigterm_evacuates_the_workload_to_the_first_peer_that_takes_it() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "32");
    let (ha, hb) = Host::pair("evac", None).unwrap();
    // The first peer refuses connections (nothing listens there); the second is a standby.
    let peers = format!("{0}:1,{0}:{PEER_PORT}", hb.addr());
    let mut a =
        Outer::builder("evac-a").host(&ha).layout(&img.layout).args(&["--evacuate-to", &peers]).start().unwrap();
    let b = Outer::builder("evac-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    assert_eq!(workload_seccomp(&a), "2", "the workload runs under the default seccomp filter");
    let sum0 = a.lines().iter().find_map(|l| parse_sum(l)).unwrap();

    // The orchestrator stops the source (a node drain).
    let from_b = b.log().len();
    let t0 = std::time::Instant::now();
    a.signal(Signal::SIGTERM).unwrap();
    let st = a.wait(T).unwrap();
    println!("SIGTERM to the source's exit, evacuated: {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(st.code(), Some(0), "the source exits 0 once the workload moved: {:?}", a.lines());
    // (The log is read by threads: wait for the lines rather than assume them.)
    a.wait_for_line("did not take the workload", T).expect("the first peer was tried");
    a.wait_for_line("evacuated", T).unwrap();
    assert!(!a.lines().iter().any(|l| l.trim() == "term"), "the workload was stopped, not moved: {:?}", a.lines());

    let last_a = last_tick(&a);
    b.log().wait_for_from(from_b, &format!("tick {} ", last_a + 3), T).expect("the counter goes on at the peer");
    let t = ticks(&b, from_b);
    assert_eq!(t[0], last_a + 1, "source ended at {last_a}, peer printed {t:?}");
    assert_eq!(status(&b)["state"], "running");
    assert_eq!(checksum(&b), sum0, "memory checksum at the peer");
    assert_eq!(workload_seccomp(&b), "2", "the seccomp filter came along");
}

#[test]
fn sigterm_with_no_peer_to_take_the_workload_stops_it() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "8");
    let (ha, hb) = Host::pair("evno", None).unwrap();
    let to = format!("{}:{PEER_PORT}", hb.addr());
    let mut a = Outer::builder("evno-a").host(&ha).layout(&img.layout).args(&["--evacuate-to", &to]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    a.signal(Signal::SIGTERM).unwrap();
    let st = a.wait(T).unwrap();
    a.wait_for_line("no peer took the workload", T).unwrap();
    a.wait_for_line("term", T).expect("the workload got the SIGTERM");
    assert_eq!(st.code(), Some(0), "the workload's own exit code: {:?}", a.lines());
}
