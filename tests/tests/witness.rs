//! End-to-end: the witness (`ums init --witness ADDR`, a third ums of the
//! group) settles a partition between source and destination from the side
//! that still reaches it (docs/migration-protocol.md, "The witness").
//!
//! Three hosts: A (the workload, `--witness W`), B (a standby) and W (a
//! standby that witnesses), each pair on a link of its own; B reaches W's
//! address on the A-W link through W. A partition between A and B after the
//! manifest leaves A in doubt. Without a witness A would stay frozen until
//! the link heals (tests/fail_closed.rs); with one:
//! * B could not commit at W (cut off from it too): A records `abort` at W
//!   and runs the workload again at once, while the A-B partition lasts; B,
//!   once it reaches W, learns `abort` and never restores it;
//! * B committed at W before the cut: W holds `commit`, A stays frozen (it
//!   never thaws on the witness's word alone that B may not run it), B runs
//!   the workload, and after healing A ends its copy.
//!
//! Either way exactly one copy runs, continuing the counter, with the memory
//! checksum intact.

use std::net::Ipv4Addr;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ums_e2e::pair::PEER_PORT;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);

struct Three {
    _tmp: tempfile::TempDir,
    hosts: Vec<Host>,
    a: Outer,
    b: Outer,
    _w: Outer,
    /// W's address as A names it (`--witness`), which B reaches too.
    w_addr: Ipv4Addr,
    b_addr: Ipv4Addr,
}

fn three(name: &str, b_env: &[(&str, &str)]) -> Three {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let memctr = build_workload(tmp.path());
    let img = ImageBuilder::new(&memctr)
        .cmd(&["64"])
        .env("MEMCTR_FILE", "/data-marker")
        .build(&tmp.path().join("layout"))
        .expect("build the workload image");
    let (ha, hb) = Host::pair(name, None).unwrap();
    let hw = Host::isolated(&format!("{name}w")).unwrap();
    let (w_addr, _) = hw.link(&ha).unwrap();
    let (w_for_b, _) = hw.link(&hb).unwrap();
    run(hb.command("ip").args(["route", "add", &w_addr.to_string(), "via", &w_for_b.to_string()]))
        .expect("a route from B to the witness's address");
    let witness = format!("{w_addr}:{PEER_PORT}");
    let a = Outer::builder(&format!("{name}-a"))
        .host(&ha)
        .layout(&img.layout)
        .args(&["--peer-timeout", "3s", "--witness", &witness])
        .start()
        .unwrap();
    // B's peer deadline (how long it tries to commit at W) outlasts A's.
    let mut bb = Outer::builder(&format!("{name}-b")).host(&hb).layout(&img.layout).args(&[
        "--standby",
        "--peer-timeout",
        "12s",
    ]);
    for (k, v) in b_env {
        bb = bb.env(k, v);
    }
    let b = bb.start().unwrap();
    let w = Outer::builder(&format!("{name}-w")).host(&hw).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    w.wait_for_line("standby", T).unwrap();
    let b_addr = hb.addr();
    Three { _tmp: tmp, hosts: vec![ha, hb, hw], a, b, _w: w, w_addr, b_addr }
}

fn start_migrate(p: &Three) -> JoinHandle<Output> {
    let mut cmd = p.a.command("/opt/ums/ums");
    cmd.args(["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", p.b_addr)]);
    std::thread::spawn(move || cmd.output().unwrap())
}

fn checksum(o: &Outer) -> String {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (_, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

fn consecutive(t: &[u64], what: &str) {
    assert!(!t.is_empty(), "{what}: no ticks");
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: ticks not consecutive: {t:?}");
    }
}

fn first_sum(o: &Outer) -> String {
    o.lines().iter().find_map(|l| parse_sum(l)).unwrap()
}

#[test]
fn a_source_in_doubt_runs_the_workload_again_at_once_when_the_witness_holds_abort() {
    let p = three("wab", &[]);
    let sum0 = first_sum(&p.a);
    let (from_a, from_b) = (p.a.log().len(), p.b.log().len());
    // B cannot reach the witness: it cannot commit.
    let mut b_w = Partition::between(&p.hosts[1], p.w_addr).unwrap();
    let h = start_migrate(&p);
    p.b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    let mut a_b = Partition::start(&p.hosts[0]).unwrap();
    let cut_at = Instant::now();
    let frozen_at = last_tick(&p.a);

    // A settles alone, through the witness, while A and B are still cut off.
    let out = h.join().unwrap();
    let took = cut_at.elapsed();
    let err = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the migration cannot have succeeded: {err}");
    assert!(err.contains("holds `abort`"), "{err}");
    println!("settled through the witness {took:?} after the cut: {}", err.trim());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    p.a.log().wait_for_from(from_a, &format!("tick {} ", frozen_at + 3), T).expect("the workload runs at A again");
    let st = status(&p.a);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["operation"]["in_doubt"].is_null(), "{st}");

    // B, once it reaches the witness, learns `abort` and never restores.
    b_w.heal().unwrap();
    p.b.wait_for_line("abandoned", T).expect("B hears the witness's `abort`");
    a_b.heal().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(ticks(&p.b, from_b).is_empty(), "the workload ran at B too");
    let until = Instant::now() + T;
    while status(&p.b)["state"] != "standby" {
        assert!(Instant::now() < until, "B is not a standby again: {}", status(&p.b));
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = ticks(&p.a, from_a);
    consecutive(&t, "A, across the failed migration");
    assert_eq!(checksum(&p.a), sum0);

    // With the links back, the next migration commits at the witness and moves.
    let from_b = p.b.log().len();
    let out = start_migrate(&p).join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.b.wait_for_line("committed at the witness", T).unwrap();
    let last_a = last_tick(&p.a);
    p.b.log().wait_for_from(from_b, &format!("tick {} ", last_a + 3), T).expect("the workload runs at B");
    let t = ticks(&p.b, from_b);
    assert_eq!(t[0], last_a + 1, "A ended at {last_a}, B printed {t:?}");
    consecutive(&t, "B");
    assert_eq!(checksum(&p.b), sum0);
    assert_eq!(status(&p.a)["state"], "standby");
}

#[test]
fn a_source_in_doubt_stays_frozen_when_the_destination_committed_at_the_witness() {
    // B's restore waits 3 s after the commit: the window for the cut.
    let p = three("wco", &[("UMS_FAILPOINT", "slow-restore")]);
    let sum0 = first_sum(&p.a);
    let from_b = p.b.log().len();
    let h = start_migrate(&p);
    p.b.wait_for_line("committed at the witness", T).unwrap();
    let mut a_b = Partition::start(&p.hosts[0]).unwrap();
    // A is in doubt, W holds `commit`: A stays frozen, and says why.
    let until = Instant::now() + T;
    let doubt = loop {
        let d = status(&p.a)["operation"]["in_doubt"].clone();
        if d["witness"] == "commit" {
            break d;
        }
        assert!(Instant::now() < until, "never in doubt with the witness's `commit`: {}", status(&p.a));
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("in doubt: {doubt}");
    let frozen_at = last_tick(&p.a);
    p.b.log().wait_for_from(from_b, "tick ", T).expect("B runs the workload behind the partition");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(last_tick(&p.a), frozen_at, "A thawed while the witness held `commit`");
    assert!(!h.is_finished(), "ums migrate returned while in doubt");

    a_b.heal().unwrap();
    let out = h.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&p.a)["state"], "standby");
    assert_eq!(status(&p.b)["state"], "running");
    let t = ticks(&p.b, from_b);
    assert_eq!(t[0], frozen_at + 1, "A ended at {frozen_at}, B printed {t:?}");
    consecutive(&t, "B");
    assert_eq!(checksum(&p.b), sum0);
    assert_eq!(last_tick(&p.a), frozen_at);
}
