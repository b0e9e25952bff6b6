//! End-to-end: a group's keys are rotated while its workload runs and
//! migrates. The group is made with `ums keys create --keep-ca`; each outer
//! container mounts its member's key set (as a Secret), which `ums keys
//! rotate` rewrites in place, step by step; peers reload it for every
//! connection. A migration after each step keeps every invariant, and after
//! the rotation the old member certificates are refused.

use std::process::Command;
use std::time::Duration;

use ums_e2e::invariants::{check, Marks, Verdict};
use ums_e2e::pair::{Pair, PairOpts};
use ums_e2e::*;

fn keys(args: &[&str]) -> String {
    let out = Command::new(ums_bin().unwrap()).arg("keys").args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ums keys {args:?}: {text}");
    text
}

fn migrate(p: &mut Pair, from: usize) {
    let m = Marks::now(&[&p.sides[0], &p.sides[1]]);
    let out = p.start_migrate(from).join().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let c = check(&mut p.sides, &m, &p.sum0, &p.file0, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("invariant violated: {e}"));
    assert_eq!(c.verdict, Verdict::Runs(1 - from));
}

#[test]
fn a_migration_after_each_step_of_a_key_rotation() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("group");
    let g_s = g.to_str().unwrap().to_string();
    println!("{}", keys(&["create", &g_s, "--names", "a,b", "--keep-ca"]));
    let old_a = tmp.path().join("old-a");
    std::fs::create_dir(&old_a).unwrap();
    for f in ["ca.pem", "peer.pem", "peer-key.pem"] {
        std::fs::copy(g.join("a").join(f), old_a.join(f)).unwrap();
    }
    let (ka, kb) = (g.join("a"), g.join("b"));
    let mut p = Pair::start("krot", PairOpts { mib: 16, ..Default::default() }, |side, b| {
        b.peer_keys(if side == 0 { &ka } else { &kb })
    });
    migrate(&mut p, 0);
    for step in ["trust", "certs", "finish"] {
        println!("{}", keys(&["rotate", &g_s, "--step", step]));
        let from = if step == "certs" { 0 } else { 1 };
        migrate(&mut p, from);
    }
    // Four migrations (A to B, back, there, back): the workload is at A.
    // A member certificate of the old CA is refused by the group now.
    p.replace_with_standby(1, |b| b.peer_keys(&old_a));
    let out = p.start_migrate(0).join().unwrap();
    assert!(!out.status.success(), "a member of the old CA took the workload");
    println!("old certificate refused: {}", String::from_utf8_lossy(&out.stderr).trim());
    // And a member added after the rotation takes it.
    println!("{}", keys(&["add", &g_s, "c"]));
    p.replace_with_standby(1, |b| b.peer_keys(g.join("c")));
    migrate(&mut p, 0);
}
