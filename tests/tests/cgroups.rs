//! End-to-end: the workload lives inside its outer container's resources.
//! Each outer container here runs in a cgroup of its own, as an orchestrator
//! would put it ([`OuterCgroup`]): the nested container's cgroup must be below
//! it in every hierarchy, a memory limit on the outer container must bind the
//! workload, and an outer container killed with SIGKILL must leave no process
//! and nothing outside its own cgroup (docs/design.md, "Cgroups").

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ums_e2e::cgroup::of_pid;
use ums_e2e::outer::mounts_below;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn image(tmp: &std::path::Path, mib: &str) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr).cmd(&[mib]).build(&tmp.join("layout")).expect("build the workload image")
}

/// The host pid of the workload (memctr) among the outer container's processes.
fn workload_pid(o: &Outer) -> i32 {
    let cg = o.cgroup().expect("the outer has a cgroup");
    cg.pids()
        .into_iter()
        .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).map(|c| c.trim() == "memctr").unwrap_or(false))
        .unwrap_or_else(|| panic!("no memctr process in the outer's cgroup: {:?}", cg.pids()))
}

#[test]
fn the_workload_sits_below_the_outer_cgroup_and_a_killed_outer_leaves_nothing() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "16");
    let mut o = Outer::builder("cgin").layout(&img.layout).cgroup(None).start().unwrap();
    o.wait_for_line("tick 3 ", T).unwrap();
    let pid = workload_pid(&o);
    // A second handle on the same cgroup (removing it twice is harmless).
    let cg = OuterCgroup { dirs: o.cgroup().unwrap().dirs.clone() };
    let mine = of_pid(pid).unwrap();
    let mut below = Vec::new();
    // A hybrid host's v2 hierarchy has no resource controllers (here at most
    // hugetlb): runc 1.1 puts the
    // workload there at /ums/<id> from its root whatever the path (no limit
    // is set there; docs/design.md). Every hierarchy with controllers counts.
    let hybrid = cg.dirs.len() > 1;
    let mut stray = None;
    for d in &cg.dirs {
        if hybrid && d.controllers.is_empty() {
            let (_, path) = mine.iter().find(|(c, _)| c.is_empty()).unwrap();
            let ctrls = std::fs::read_to_string(d.mount.join("cgroup.controllers")).unwrap();
            for c in ["memory", "pids", "cpu", "io", "cpuset"] {
                assert!(!ctrls.split_whitespace().any(|x| x == c), "the hybrid v2 hierarchy has {c}: {ctrls}");
            }
            println!("{:>14}: outer {} workload {path} (controllers: {})", "v2", d.path, ctrls.trim());
            stray = Some(d.mount.join(path.trim_start_matches('/')));
            continue;
        }
        let (_, path) = mine
            .iter()
            .find(|(c, _)| *c == d.controllers)
            .unwrap_or_else(|| panic!("the workload is in no {:?} cgroup: {mine:?}", d.controllers));
        println!("{:>14}: outer {} workload {path}", d.controllers, d.path);
        let inside = path == &d.path || path.starts_with(&format!("{}/", d.path));
        assert!(inside, "{}: the workload's cgroup {path} is outside the outer's {}", d.controllers, d.path);
        if path != &d.path {
            below.push(d.mount.join(path.trim_start_matches('/')));
        }
    }
    // Its own cgroup, below the outer's, where the memory is accounted.
    let mem = cg.memory().unwrap();
    let (_, mem_path) = mine.iter().find(|(c, _)| *c == mem.controllers).unwrap();
    assert!(mem_path.starts_with(&format!("{}/", mem.path)), "memory cgroup {mem_path} not below {}", mem.path);
    assert!(!cg.children().is_empty());

    // SIGKILL, as an orchestrator kills a container that does not stop.
    let (root, wl_ns) = (o.root_dir().to_path_buf(), std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap());
    o.signal(Signal::SIGKILL).unwrap();
    o.wait(T).unwrap();
    let t0 = Instant::now();
    while !cg.pids().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "processes left in the outer's cgroup: {:?}", cg.pids());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::metadata(format!("/proc/{pid}")).is_err(), "the workload (pid {pid}) outlived its outer");
    assert!(mounts_below(&root).is_empty(), "mounts left: {:?}", mounts_below(&root));
    let _ = wl_ns;
    // What is left is the empty cgroups below the outer's own, which go
    // with it (runc removes a container's cgroup children first).
    cg.remove(Duration::from_secs(10)).expect("the outer's cgroup and the workload's below it can be removed");
    for b in &below {
        assert!(!b.exists(), "{} is left", b.display());
    }
    // The one cgroup outside (see above): empty, and removed here.
    if let Some(s) = stray {
        std::fs::remove_dir(&s).unwrap_or_else(|e| panic!("{}: {e}", s.display()));
    }
}

#[test]
fn a_memory_limit_on_the_outer_container_binds_the_workload() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // 192 MiB of touched memory in an outer container limited to 96 MiB.
    let img = image(tmp.path(), "192");
    let mut o = Outer::builder("cgmem").layout(&img.layout).cgroup(Some(96 * MIB)).start().unwrap();
    let status = o.wait(T).expect("the workload is killed by the outer's memory limit, and ums exits");
    let lines = o.lines();
    assert!(!lines.iter().any(|l| parse_tick(l).is_some()), "the workload ran past the limit: {lines:?}");
    // ums exits with the workload's code: 128 + SIGKILL from the OOM killer.
    assert_eq!(status.code(), Some(137), "{status:?} {lines:?}");
    // The outer's limit is what the workload hit (the OOM kill itself is
    // counted in the workload's own cgroup, which ended with it).
    let mem = o.cgroup().unwrap().memory().unwrap().dir();
    let hits = match std::fs::read_to_string(mem.join("memory.failcnt")) {
        Ok(v1) => v1.trim().parse::<u64>().unwrap(),
        Err(_) => {
            let events = std::fs::read_to_string(mem.join("memory.events")).unwrap();
            events.lines().find_map(|l| l.strip_prefix("max ")).and_then(|v| v.trim().parse().ok()).unwrap()
        }
    };
    println!("{}: the limit was hit {hits} times", mem.display());
    assert!(hits >= 1, "the outer's memory limit was never hit");
}
