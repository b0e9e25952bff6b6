//! End-to-end: Debian's redis server, with keys loaded by the test through
//! its published port, moved with each mode in turn (stop-copy, pre-copy,
//! post-copy, then auto, the default) between two outer containers on two hosts: every key and
//! value is there after each move, read by a client on the other host.

use std::time::Duration;

use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;
const KEYS: usize = 30_000;

fn migrate(src: &Outer, dst: &Outer, dst_host: &Host, mode: &str) -> serde_json::Value {
    let to = format!("{}:{PEER_PORT}", dst_host.addr());
    let out = src.ums(&["migrate", "--json", "--mode", mode, "--to", &to]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{mode} failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(src)["state"], "standby", "{mode}");
    assert_eq!(status(dst)["state"], "running", "{mode}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let r = v["result"].clone();
    println!("redis {mode}: downtime {} ms, restore {} ms", r["downtime_ms"], r["restore_ms"]);
    r
}

/// Every key and value, read through `at`'s published port from `from`.
fn check(from: &Host, at: &Host, extra: usize) {
    let addr = at.addr();
    from.spawn_in(move || {
        let mut c = redis::Client::connect(addr, T);
        assert_eq!(c.cmd(&[b"DBSIZE"]).0, format!(":{}", KEYS + extra));
        // The keys written before, then one more write that must stay.
        c.cmd(&[b"DEL", b"probe"]);
        assert_eq!(c.cmd(&[b"SET", b"probe", b"x"]).0, "+OK");
        c.cmd(&[b"DEL", b"probe"]);
        for i in 0..KEYS {
            let (_, v) = c.cmd(&[b"GET", format!("key:{i}").as_bytes()]);
            assert!(v.as_deref() == Some(&redis::value(i)[..]), "key:{i}: {:?}", v.map(|v| v.len()));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn redis_keeps_every_key_through_stop_copy_pre_copy_and_post_copy() {
    require_root();
    // Post-copy's lazy dump needs pipes of 4 MiB (a host-wide sysctl).
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p).unwrap().trim().parse().unwrap();
    if cur < 4 << 20 {
        std::fs::write(p, (4u64 << 20).to_string()).expect("raise fs.pipe-max-size");
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = redis::image(tmp.path());
    let (ha, hb) = Host::pair("rds", Some("1gbit")).unwrap();
    let a = Outer::builder("rds-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("rds-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("Ready to accept connections", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let a_addr = ha.addr();
    // The outer container's file limit reaches the server (not 1024): it
    // keeps the full 10000 clients it asks for by default.
    let info = hb.spawn_in(move || redis::Client::connect(a_addr, T).cmd(&[b"INFO", b"clients"]).1).join().unwrap();
    let info = String::from_utf8_lossy(&info.expect("INFO clients")).to_string();
    assert!(info.lines().any(|l| l.trim() == "maxclients:10000"), "redis's maxclients: {info}");
    assert!(
        !a.lines().iter().any(|l| l.contains("maxclients") && l.contains("max file descriptors")),
        "redis lowered maxclients for lack of file descriptors:\n{}",
        a.lines().join("\n")
    );
    hb.spawn_in(move || redis::Client::connect(a_addr, T).load(KEYS)).join().unwrap();
    // Stop-copy (its restore serves the memory from the received images).
    migrate(&a, &b, &hb, "stop-copy");
    check(&ha, &hb, 0);
    // Pre-copy back: rounds while redis runs, then the last changes.
    let r = migrate(&b, &a, &ha, "pre-copy");
    assert!(r["rounds"].as_array().is_some_and(|r| !r.is_empty()), "pre-copy rounds in the report: {r}");
    check(&hb, &ha, 0);
    // Post-copy there again.
    migrate(&a, &b, &hb, "post-copy");
    check(&ha, &hb, 0);
    // And back with the default, auto: whatever it chose, every key is there.
    let r = migrate(&b, &a, &ha, "auto");
    assert_eq!(r["requested_mode"], "auto", "{r}");
    println!("redis auto: {}", r["choice"]);
    assert!(r["choice"].as_str().is_some_and(|c| c.contains("(auto: ")), "{r}");
    check(&hb, &ha, 0);
}
