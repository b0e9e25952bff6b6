//! End-to-end: a migration whose outcome the source cannot know fails
//! closed. After the manifest, a source that hears nothing keeps the workload
//! frozen and asks the destination until it answers (docs/migration-protocol.md,
//! "Fail closed"): a partition, a destination killed mid-restore, and an
//! operator's `ums resolve --thaw` all end with exactly one copy running.

use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;
/// Short, so that the source is in doubt soon after the partition.
const PEER_TIMEOUT: &str = "3s";
/// After healing, the outcome is settled within this.
const SETTLE: Duration = Duration::from_secs(15);

struct Pair {
    _tmp: tempfile::TempDir,
    ha: Host,
    hb: Host,
    a: Outer,
    b: Outer,
    img: OciImage,
}

/// A runs the workload; B is a standby whose restore waits 3 s before runc
/// (the window in which a test cuts the link or kills it).
fn pair(name: &str) -> Pair {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let memctr = build_workload(tmp.path());
    let img = ImageBuilder::new(&memctr)
        .cmd(&["64"])
        .env("MEMCTR_FILE", "/data-marker")
        .build(&tmp.path().join("layout"))
        .expect("build the workload image");
    let (ha, hb) = Host::pair(name, None).unwrap();
    let a = Outer::builder(&format!("{name}-a"))
        .host(&ha)
        .layout(&img.layout)
        .args(&["--peer-timeout", PEER_TIMEOUT])
        .start()
        .unwrap();
    let b = standby(&format!("{name}-b"), &hb, &img, true);
    a.wait_for_line("tick 3 ", T).unwrap();
    Pair { _tmp: tmp, ha, hb, a, b, img }
}

fn standby(name: &str, h: &Host, img: &OciImage, slow_restore: bool) -> Outer {
    let mut bb = Outer::builder(name).host(h).layout(&img.layout).args(&["--standby", "--peer-timeout", PEER_TIMEOUT]);
    if slow_restore {
        bb = bb.env("UMS_FAILPOINT", "slow-restore");
    }
    let b = bb.start().unwrap();
    b.wait_for_line("standby", T).unwrap();
    b
}

/// `ums migrate` A -> B, in the background.
fn start_migrate(p: &Pair) -> JoinHandle<Output> {
    let mut cmd = p.a.command("/opt/ums/ums");
    cmd.args(["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", p.hb.addr())]);
    std::thread::spawn(move || cmd.output().unwrap())
}

/// Waits until `ums status` shows the migration in doubt with at least one
/// query asked; returns `operation.in_doubt`.
fn wait_in_doubt(o: &Outer) -> serde_json::Value {
    let until = Instant::now() + T;
    loop {
        let st = status(o);
        let d = &st["operation"]["in_doubt"];
        if d.is_object() && d["queries"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(st["state"]["busy"], "migrate_out", "{st}");
            return d.clone();
        }
        assert!(Instant::now() < until, "never in doubt: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The workload prints nothing at `o` for a while: it is frozen there.
fn assert_frozen(o: &Outer, what: &str) -> u64 {
    let t = last_tick(o);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(last_tick(o), t, "{what}");
    t
}

fn checksum(o: &Outer) -> String {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (_, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

fn consecutive(t: &[u64], what: &str) {
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: ticks not consecutive: {t:?}");
    }
}

fn first_sum(o: &Outer) -> String {
    o.lines().iter().find_map(|l| parse_sum(l)).unwrap()
}

fn poll(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// One sample of `ums metrics` (docs/metrics.md), by its exact series.
fn metric(o: &Outer, series: &str) -> f64 {
    let text = o.ums_ok(&["metrics"]).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in ums metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_partition_after_the_manifest_keeps_the_source_frozen_until_it_heals() {
    let p = pair("fcpart");
    let sum0 = first_sum(&p.a);
    let from_b = p.b.log().len();
    let h = start_migrate(&p);
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    // Packets vanish from here on; the destination restores and sends its
    // Result into the void.
    let mut cut = Partition::start(&p.ha).unwrap();
    let doubt = wait_in_doubt(&p.a);
    println!("in doubt: {doubt}");
    assert!(doubt["migration_id"].as_str().unwrap().starts_with("m-"), "{doubt}");
    assert!(!doubt["cause"].as_str().unwrap().is_empty(), "{doubt}");
    assert!(doubt["known"].as_array().unwrap().len() >= 2, "{doubt}");
    assert!(doubt["since_unix_ms"].as_u64().unwrap() > 0, "{doubt}");
    p.b.log().wait_for_from(from_b, "tick ", T).expect("the destination runs the workload behind the partition");
    let frozen_at = assert_frozen(&p.a, "the source thawed on a guess during the partition");
    assert!(!h.is_finished(), "ums migrate returned while in doubt");
    // What an operator's alert (UmsMigrationInDoubt) sees meanwhile.
    assert_eq!(metric(&p.a, "ums_migration_in_doubt"), 1.0);
    assert_eq!(metric(&p.a, r#"ums_migrations_in_doubt_total{direction="out",mode="stop-copy"}"#), 1.0);
    assert_eq!(metric(&p.a, r#"ums_workload_state{state="busy"}"#), 1.0);

    cut.heal().unwrap();
    let healed = Instant::now();
    let out = h.join().unwrap();
    let settled_in = healed.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(settled_in < SETTLE, "settled {settled_in:?} after healing");
    let report = serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone();
    println!("settled {settled_in:?} after healing; report {report}");
    // Downtime counts until the workload ran there, not the doubt: the
    // partition lasted at least 1.5 s after the destination ran it.
    let (frozen, doubt_ms, total) = (
        report["frozen_ms"].as_f64().unwrap(),
        report["in_doubt_ms"].as_f64().unwrap(),
        report["total_ms"].as_f64().unwrap(),
    );
    assert!(doubt_ms > 1000.0, "{report}");
    assert!(frozen < total - 1000.0, "downtime includes the doubt: {report}");

    // Exactly one copy: at the destination, continuing the counter.
    assert_eq!(status(&p.a)["state"], "standby");
    assert!(status(&p.a)["operation"]["in_doubt"].is_null());
    assert_eq!(metric(&p.a, "ums_migration_in_doubt"), 0.0);
    assert_eq!(metric(&p.a, r#"ums_migrations_succeeded_total{direction="out",mode="stop-copy"}"#), 1.0);
    assert_eq!(metric(&p.b, r#"ums_migrations_succeeded_total{direction="in",mode="stop-copy"}"#), 1.0);
    assert_eq!(status(&p.b)["state"], "running");
    let t = ticks(&p.b, from_b);
    assert_eq!(t[0], frozen_at + 1, "source ended at {frozen_at}, destination printed {t:?}");
    consecutive(&t, "destination");
    assert_eq!(checksum(&p.b), sum0, "memory checksum at the destination");
    assert_eq!(last_tick(&p.a), frozen_at, "the source printed ticks after the migration");
    let _ = (&p.img, &p.hb);
}

#[test]
fn a_destination_killed_mid_restore_keeps_the_source_frozen_until_a_standby_answers() {
    let mut p = pair("fckill");
    let sum0 = first_sum(&p.a);
    let h = start_migrate(&p);
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    p.b.signal(Signal::SIGKILL).unwrap();
    p.b.wait(T).unwrap();
    // Nothing answers at the destination's address now: the source cannot
    // know, so it does not guess.
    let doubt = wait_in_doubt(&p.a);
    println!("in doubt: {doubt}");
    assert!(doubt["last_error"].is_string(), "{doubt}");
    let frozen_at = assert_frozen(&p.a, "the source thawed while the destination was unreachable");
    assert!(!h.is_finished(), "ums migrate returned while in doubt");

    // A new standby at the same address has never heard of the migration:
    // it answers not_running and fences it; the source thaws.
    let b2 = standby("fckill-b2", &p.hb, &p.img, false);
    drop(std::mem::replace(&mut p.b, b2));
    let out = h.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("fenced"), "{err}");
    let st = status(&p.a);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["operation"]["in_doubt"].is_null(), "{st}");
    p.a.log().wait_for_from(0, &format!("tick {} ", frozen_at + 3), T).expect("the workload runs on at the source");
    consecutive(&ticks(&p.a, 0), "source");
    assert_eq!(checksum(&p.a), sum0, "memory checksum at the source");
    let sb = status(&p.b);
    assert_eq!(sb["state"], "standby", "{sb}");
    assert!(sb["workload"].is_null(), "{sb}");
}

#[test]
fn an_operator_thaw_while_in_doubt_then_the_destination_ends_its_copy() {
    let p = pair("fcthaw");
    let from_b = p.b.log().len();
    let h = start_migrate(&p);
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    let mut cut = Partition::start(&p.ha).unwrap();
    wait_in_doubt(&p.a);
    p.b.log().wait_for_from(from_b, "tick ", T).expect("the destination runs its copy behind the partition");
    let frozen_at = last_tick(&p.a);

    // The operator decides to run it here again, and is told the risk.
    let from_a = p.a.log().len();
    let out = p.a.ums(&["resolve", "--thaw"]).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout} {stderr}");
    assert!(stderr.contains("warning") && stderr.contains("two copies"), "{stderr}");
    p.a.log().wait_for_from(from_a, &format!("tick {} ", frozen_at + 3), T).expect("the workload runs here again");
    let out = h.join().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resolve --thaw"), "{out:?}");
    let st = status(&p.a);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["operation"]["stopping_remote"].as_array().map(|a| a.len()), Some(1), "{st}");
    // Nothing more to resolve.
    let again = p.a.ums(&["resolve", "--abandon"]).unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no migration is in doubt"), "{again:?}");

    // Healed: the destination hears "stop" and ends its copy.
    cut.heal().unwrap();
    let took = poll("the destination ends its copy", SETTLE, || status(&p.b)["state"] == "standby");
    println!("the destination ended its copy {took:?} after healing");
    poll("the source stops asking", SETTLE, || {
        status(&p.a)["operation"]["stopping_remote"].as_array().map(|a| a.is_empty()).unwrap_or(false)
    });
    // Exactly one copy: here.
    let b_last = ticks(&p.b, from_b).last().copied();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(&p.b, from_b).last().copied(), b_last, "the destination still prints ticks");
    assert!(status(&p.b)["workload"].is_null());
    let last = last_tick(&p.a);
    p.a.log().wait_for_from(0, &format!("tick {} ", last + 2), T).expect("the workload runs on at the source");
    consecutive(&ticks(&p.a, 0), "source");
    let _ = &p.ha;
}
