//! End-to-end: `ums checkpoint --page-server IP:PORT`, CRIU sending the memory
//! pages to a `criu page-server` on the destination host while it dumps; the
//! rest of the checkpoint dir copied with tar over TCP, then `ums restore` at
//! the destination. Two simulated hosts, real runc, CRIU and TCP.

use std::io::{BufRead, Write};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ums_e2e::copy::{proc_root, start_page_server, tar_dir_over_tcp};
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);

fn counter_image(tmp: &std::path::Path, mib: &str) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr).cmd(&[mib]).build(&tmp.join("layout")).expect("build the workload image")
}

fn assert_consecutive(t: &[u64]) {
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks not consecutive: {t:?}");
    }
}

/// memctr's checksum of its memory, printed on SIGUSR1 (sent to the
/// workload through the outer's PID 1, which forwards it).
fn checksum(o: &Outer) -> String {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (_, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

/// The files of `dir`/criu inside outer `o`, sorted, with their sizes.
fn images(o: &Outer, dir: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(proc_root(o, &format!("{dir}/criu")))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn is_page_image(name: &str) -> bool {
    (name.starts_with("pages-") || name.starts_with("pagemap-")) && name.ends_with(".img")
}

/// Waits for the page server to exit (it serves one dump), killing it after `timeout`.
fn wait_child(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A workload in outer A on host A, a standby outer B on host B.
struct Pair {
    _tmp: tempfile::TempDir,
    ha: Host,
    hb: Host,
    a: Outer,
    b: Outer,
}

fn pair(name: &str, mib: &str) -> Pair {
    require_root();
    require_tool("criu", "criu");
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), mib);
    let (ha, hb) = Host::pair(name, None).unwrap();
    let a = Outer::builder(&format!("{name}-a")).host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder(&format!("{name}-b")).host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    Pair { _tmp: tmp, ha, hb, a, b }
}

#[test]
fn pages_go_to_the_page_server_and_the_workload_continues_there() {
    let p = pair("psrv", "64");
    let sum0 = p.a.lines().iter().find_map(|l| parse_sum(l)).expect("initial checksum");
    let dir = "/run/ps-ckpt";
    let port = 20000 + rand::random::<u16>() % 20000;
    let mut server = start_page_server(&p.b, dir, port).unwrap();

    let to = format!("{}:{port}", p.hb.addr());
    let out = p.a.ums(&["checkpoint", "--json", "--stop", "--page-server", &to, dir]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let _ = server.kill();
        let _ = server.wait();
        panic!("checkpoint --page-server failed ({}): {text} {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let reply: serde_json::Value = serde_json::from_str(&text).expect("checkpoint --json reply");
    assert_eq!(reply["ok"], true, "{text}");
    let served = wait_child(&mut server, T);
    assert!(matches!(served, Some(s) if s.success()), "criu page-server did not end well: {served:?}");
    std::thread::sleep(Duration::from_millis(300));
    let last_a = last_tick(&p.a);
    assert_eq!(status(&p.a)["state"], "standby");
    assert_eq!(last_tick(&p.a), last_a, "the workload still runs in A after checkpoint --stop");

    // The pages are at the destination, and only there.
    let at_b = images(&p.b, dir);
    let at_a = images(&p.a, dir);
    println!("page server received: {at_b:?}\nsource kept: {at_a:?}");
    assert!(at_b.iter().any(|(n, _)| n.starts_with("pages-")), "no pages-*.img in B: {at_b:?}");
    assert!(at_b.iter().any(|(n, _)| n.starts_with("pagemap-")), "no pagemap-*.img in B: {at_b:?}");
    let page_bytes: u64 = at_b.iter().filter(|(n, _)| n.starts_with("pages-")).map(|(_, s)| s).sum();
    assert!(page_bytes >= 64 << 20, "only {page_bytes} bytes of pages reached B for a 64 MiB workload");
    assert!(!at_a.iter().any(|(n, _)| is_page_image(n)), "page images were written in A: {at_a:?}");
    assert!(at_a.iter().any(|(n, _)| n.starts_with("core-")), "the other images are not in A: {at_a:?}");

    // The rest over TCP, then restore in B.
    tar_dir_over_tcp(&p.a, &p.ha, &p.b, &p.hb, dir).unwrap();
    let from_b = p.b.log().len();
    let out = p.b.ums_ok(&["restore", "--json", dir]).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&out).expect("restore --json reply");
    assert_eq!(reply["ok"], true, "{out}");
    p.b.log().wait_for_from(from_b, &format!("tick {} ", last_a + 3), T).expect("the counter goes on in B");
    let tb = ticks(&p.b, from_b);
    assert_eq!(tb[0], last_a + 1, "A ended at {last_a}, B printed {tb:?}");
    assert_consecutive(&tb);
    assert_eq!(status(&p.b)["state"], "running");
    assert_eq!(checksum(&p.b), sum0, "memory checksum after the restore in B");
}

#[test]
fn a_bad_or_unreachable_page_server_fails_the_checkpoint_and_the_workload_runs_on() {
    let p = pair("psbad", "16");
    let sum0 = p.a.lines().iter().find_map(|l| parse_sum(l)).expect("initial checksum");

    // Not an address: the CLI refuses it.
    let out = p.a.ums(&["checkpoint", "--stop", "--page-server", "nonsense", "/run/ps-bad1"]).unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonsense"), "{out:?}");

    // The same on the control socket (no CLI in between): an error reply.
    {
        let sock = format!("/proc/{}/root/run/ums/ums.sock", p.a.pid1());
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("the control socket");
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(
            b"{\"op\":\"checkpoint\",\"dir\":\"/run/ps-bad2\",\"leave_running\":false,\"page_server\":\"nonsense\"}\n",
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON reply");
        assert_eq!(v["ok"], false, "{line}");
        assert!(line.contains("is not IP:PORT"), "{line}");
        assert!(!proc_root(&p.a, "/run/ps-bad2").exists(), "a checkpoint dir was made for a bad request");
    }
    assert_eq!(status(&p.a)["state"], "running");

    // A well-formed address where nothing listens (port 1 on host B).
    let from = p.a.log().len();
    let to = format!("{}:1", p.hb.addr());
    let out = p.a.ums(&["checkpoint", "--stop", "--page-server", &to, "/run/ps-bad3"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("checkpoint to a dead page server: {} {err}", out.status);
    assert!(!out.status.success(), "checkpoint to a dead page server succeeded: {out:?}");
    // ums's error, with the tail of CRIU's log saying why.
    assert!(err.contains("dump failed") && err.contains("connect to server"), "unclear error: {err}");
    let st = status(&p.a);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["last_op"]["ok"], false, "{st}");
    let last = last_tick(&p.a);
    p.a.log().wait_for_from(from, &format!("tick {} ", last + 3), T).expect("the workload runs on in A");
    assert_consecutive(&ticks(&p.a, 0));
    assert_eq!(checksum(&p.a), sum0, "memory checksum in A after the failed checkpoint");
    assert!(!images(&p.b, "/run/ps-bad3").iter().any(|(n, _)| is_page_image(n)));
}
