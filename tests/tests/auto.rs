//! End-to-end: `ums migrate` with its default, `--mode auto`, between two
//! outer containers on two hosts, with real runc and CRIU. Before the
//! migration, auto samples the workload's dirty rate and probes the link;
//! the test reads those measured inputs from the report and checks that the
//! mode that ran is the one the rule (`ums::migration::auto::choose`) gives
//! for them; then, as for every migration: the counter continues with no gap
//! or repeat, the memory checksum is equal, and exactly one copy runs.
//!
//! Also zstd on the wire: compressible memory (`MEMCTR_COMPRESSIBLE=1`)
//! moves with fewer bytes on the wire than bytes of data; random memory
//! goes raw and moves as before.

use std::time::Duration;

use nix::sys::signal::Signal;
use ums::migration::auto::{choose, Inputs};
use ums_e2e::*;

const T: Duration = Duration::from_secs(120);
const PEER_PORT: u16 = 7411;

fn image(tmp: &std::path::Path, mib: u64, write_mib_s: Option<u64>) -> OciImage {
    image_with(tmp, mib, write_mib_s, false)
}

fn image_with(tmp: &std::path::Path, mib: u64, write_mib_s: Option<u64>, compressible: bool) -> OciImage {
    let memctr = build_workload(tmp);
    let mut b = ImageBuilder::new(&memctr).cmd(&[&mib.to_string()]);
    if compressible {
        b = b.env("MEMCTR_COMPRESSIBLE", "1");
    }
    if let Some(w) = write_mib_s {
        b = b.env("MEMCTR_WRITE_MIB_S", &w.to_string());
    }
    b.build(&tmp.join("layout")).expect("build the workload image")
}

/// The memory's checksum (and, with a writer, the one it must have).
fn sums(o: &Outer, writer: bool) -> (String, Option<String>) {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (at, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    let exp = writer.then(|| o.log().wait_for_from(at, "expect ", T).unwrap().1);
    (parse_sum(&line).unwrap(), exp.map(|e| e.split_whitespace().nth(1).unwrap().to_string()))
}

/// `ums migrate --json [extra...]` from `src` to `dst`: the counter goes on
/// at the destination with no gap, no repeat and no restart; the source is a
/// standby and prints nothing more. Returns the report.
fn migrate(src: &Outer, dst: &Outer, addr: std::net::Ipv4Addr, extra: &[&str]) -> serde_json::Value {
    let from_dst = dst.log().len();
    let to = format!("{addr}:{PEER_PORT}");
    let mut args = vec!["migrate", "--json", "--to", &to];
    args.extend_from_slice(extra);
    let out = src.ums(&args).unwrap();
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

/// The report of an auto migration: the mode that ran is what the rule
/// says for the inputs it measured; the table's line says so. Returns the inputs.
fn assert_rule_followed(r: &serde_json::Value) -> Inputs {
    assert_eq!(r["requested_mode"], "auto", "{r}");
    let inputs: Inputs = serde_json::from_value(r["auto"]["inputs"].clone()).expect("auto inputs in the report");
    let rule = choose(&inputs);
    assert_eq!(r["mode"], rule.mode.as_str(), "the rule says {rule:?} for {inputs:?}: {r}");
    let choice = r["choice"].as_str().unwrap();
    assert!(choice.starts_with(&format!("{} (auto: ", rule.mode.as_str())), "{choice}");
    assert!(inputs.link_bytes_s > 0.0 && inputs.memory_bytes > 0, "{inputs:?}");
    println!("CHOICE {choice}");
    inputs
}

fn pair(name: &str, img: &OciImage, rate: Option<&str>) -> (Host, Host, Outer, Outer) {
    let (ha, hb) = Host::pair(name, rate).unwrap();
    let a = Outer::builder(&format!("{name}-a")).host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder(&format!("{name}-b")).host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    (ha, hb, a, b)
}

#[test]
fn auto_moves_an_idle_small_workload() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 32, None);
    let (_ha, hb, a, b) = pair("auidle", &img, None);
    let (before, _) = sums(&a, false);
    let r = migrate(&a, &b, hb.addr(), &[]);
    println!("{r:#}");
    let i = assert_rule_followed(&r);
    // Idle: the sample finds (almost) nothing rewritten.
    assert!(i.dirty_bytes_s < (4 << 20) as f64, "{i:?}");
    assert!(i.memory_bytes >= 32 << 20 && i.memory_bytes < 64 << 20, "{i:?}");
    let (after, _) = sums(&b, false);
    assert_eq!(before, after, "the memory differs after the migration");
}

#[test]
fn auto_moves_a_large_workload_with_a_slow_writer() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 512, Some(2));
    let (_ha, hb, a, b) = pair("aularge", &img, Some("1gbit"));
    let r = migrate(&a, &b, hb.addr(), &[]);
    println!("{r:#}");
    let i = assert_rule_followed(&r);
    // The writer was seen, at about its rate (2 MiB/s; the sample is coarse).
    assert!(i.dirty_bytes_s > 0.0 && i.dirty_bytes_s < (20 << 20) as f64, "{i:?}");
    // 512 MiB on about 110 MiB/s, a slow writer: the rule says pre-copy.
    assert_eq!(r["mode"], "pre-copy", "{r}");
    let (sum, expect) = sums(&b, true);
    assert_eq!(Some(sum), expect, "the memory differs from what the writer wrote");
}

#[test]
fn auto_with_no_post_copy_never_chooses_post_copy() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB rewritten at 40 MiB/s over about 12 MiB/s: pre-copy cannot
    // converge, so the rule would pick post-copy if it were allowed.
    let img = image(tmp.path(), 64, Some(40));
    let (_ha, hb, a, b) = pair("aunopc", &img, Some("100mbit"));
    let r = migrate(&a, &b, hb.addr(), &["--no-post-copy"]);
    println!("{r:#}");
    let i = assert_rule_followed(&r);
    assert!(i.no_post_copy, "{i:?}");
    assert_ne!(r["mode"], "post-copy", "{r}");
    assert!(i.dirty_bytes_s > i.link_bytes_s / 2.0, "the writer was measured faster than half the link: {i:?}");
    // Without the flag, the same inputs would have meant post-copy (when
    // this pair of hosts can do it at all).
    if i.post_copy_problem.is_none() {
        let allowed = Inputs { no_post_copy: false, ..i.clone() };
        assert_eq!(choose(&allowed).mode.as_str(), "post-copy", "{allowed:?}");
        assert!(r["choice"].as_str().unwrap().contains("--no-post-copy"), "{r}");
    }
    let (sum, expect) = sums(&b, true);
    assert_eq!(Some(sum), expect, "the memory differs from what the writer wrote");
}

/// The compression figures of a report: (level, data bytes, wire bytes).
fn compression(r: &serde_json::Value) -> (i64, u64, u64) {
    let c = &r["compression"];
    (c["level"].as_i64().unwrap(), c["data_bytes"].as_u64().unwrap(), c["wire_bytes"].as_u64().unwrap())
}

#[test]
fn compressible_memory_moves_with_fewer_bytes_on_the_wire() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mib = 128u64;
    let img = image_with(tmp.path(), mib, None, true);
    let (ha, hb, a, b) = pair("auzip", &img, Some("1gbit"));
    let (before, _) = sums(&a, false);
    // Stop-copy: the link is not measured, so level 1.
    let r = migrate(&a, &b, hb.addr(), &["--mode", "stop-copy"]);
    let (level, data, wire) = compression(&r);
    println!("ZSTD stop-copy {mib} MiB: level {level}, data {data}, wire {wire}, ratio {}", r["compression"]["ratio"]);
    assert_eq!(level, 1, "{r}");
    assert!(data >= mib << 20, "all the memory went through the codec: {r}");
    assert!(wire * 10 < data * 6, "compressible memory: {wire} bytes on the wire for {data} of data: {r}");
    let (after, _) = sums(&b, false);
    assert_eq!(before, after, "the memory differs after the migration");
    // And back with auto: the level follows the link the probe measured.
    let r = migrate(&b, &a, ha.addr(), &[]);
    let (level, data, wire) = compression(&r);
    println!("ZSTD auto {mib} MiB: {} level {level}, data {data}, wire {wire}", r["choice"]);
    assert!(wire < data, "{r}");
    let (back, _) = sums(&a, false);
    assert_eq!(before, back, "the memory differs after the migration back");
}

#[test]
fn random_memory_goes_raw_and_still_moves() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 64, None);
    let (_ha, hb, a, b) = pair("aurand", &img, Some("1gbit"));
    let (before, _) = sums(&a, false);
    let r = migrate(&a, &b, hb.addr(), &["--mode", "stop-copy"]);
    let (level, data, wire) = compression(&r);
    let c = &r["compression"];
    println!("ZSTD random 64 MiB: level {level}, data {data}, wire {wire}, {c}");
    assert!(data >= 64 << 20, "{r}");
    // Random pages do not shrink: sent raw (headers aside), at most 1% more.
    assert!(wire <= data + data / 100, "{r}");
    assert!(c["chunks_raw"].as_u64().unwrap() >= 60, "{c}");
    let (after, _) = sums(&b, false);
    assert_eq!(before, after, "the memory differs after the migration");
}

/// On a terminal, `ums migrate` draws live progress (phase, bytes, rate,
/// time left) while the migration runs, then the table; without one (or
/// with `--json`) it prints only the table.
#[test]
fn a_terminal_sees_live_progress_and_a_pipe_only_the_table() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), 256, None);
    let (ha, hb, a, b) = pair("auprog", &img, Some("1gbit"));
    let (before, _) = sums(&a, false);
    // A pseudo-terminal from util-linux's `script`, around the same nsenter
    // every test command goes through.
    let from_dst = b.log().len();
    let line = format!(
        "nsenter -t {} -m -p -n -u -i -r -w -- {} migrate --mode stop-copy --to {}:{PEER_PORT}",
        a.pid1(),
        ums_e2e::outer::UMS_IN_OUTER,
        hb.addr()
    );
    let out = std::process::Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env_clear()
        .env("PATH", ums_e2e::outer::OUTER_PATH)
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    println!("{text}");
    assert!(text.contains("frozen: dump and transfer"), "no progress drawn on the terminal: {text}");
    assert!(text.contains("MiB/s"), "no rate drawn: {text}");
    assert!(text.contains("migrated to") && text.contains("downtime"), "no table: {text}");
    b.log().wait_for_from(from_dst, "tick ", T).expect("the counter goes on at the destination");
    let (after, _) = sums(&b, false);
    assert_eq!(before, after, "the memory differs after the migration");
    // Back, through a pipe: only the table.
    let out = b.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", ha.addr())]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("migrated to"), "{text}");
    assert!(!text.contains("frozen: dump and transfer") && !text.contains('\r'), "{text}");
}
