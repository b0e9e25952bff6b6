//! End-to-end: `ums init` as PID 1 of a simulated outer container, running a
//! workload image under real runc and checkpointing it with real CRIU.

use std::time::Duration;

use nix::sys::signal::Signal;
use ums_e2e::*;

const T: Duration = Duration::from_secs(30);

/// The counter workload. Runs as `app` (uid 1000) when `user` is set; CRIU
/// can only dump a non-root workload with CAP_SYS_RESOURCE, which this
/// machine's root lacks, so the checkpoint tests run it as root.
fn image(tmp: &std::path::Path, mib: &str, user: bool) -> OciImage {
    let memctr = build_workload(tmp);
    let b = ImageBuilder::new(&memctr);
    let b = if user { b.user("app") } else { b };
    b.cmd(&[mib])
        .env("FOO", "from-image")
        .env("MEMCTR_FILE", "/home/app/marker")
        .working_dir("/home/app")
        .expose("8080/tcp")
        .build(&tmp.join("layout"))
        .expect("build the workload image")
}

fn assert_consecutive(t: &[u64]) {
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks not consecutive: {t:?}");
    }
}

#[test]
fn runs_the_image_as_configured_and_stops_on_sigterm() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "8", true);
    let mut o = Outer::builder("sup-run").layout(&img.layout).env("UMS_STOP_GRACE", "5s").start().unwrap();
    o.wait_for_line("tick 3 ", T).expect("the workload's output reaches ums's stdout");
    let lines = o.lines();
    assert!(lines.iter().any(|l| l.contains("env FOO=from-image")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("cwd /home/app")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("uid 1000 gid 1000")), "{lines:?}");
    let s = status(&o);
    assert_eq!(s["state"], "running");
    assert_eq!(s["workload"]["image_digest"], img.manifest_digest);
    assert_eq!(s["workload"]["exposed_ports"][0], "8080/tcp");
    // SIGTERM to the outer PID 1: memctr prints "term" and exits 0 ... with
    // MEMCTR_EXIT_CODE unset; the next test checks a non-zero code.
    o.signal(Signal::SIGTERM).unwrap();
    o.wait_for_line("term", T).expect("SIGTERM forwarded to the workload");
    let st = o.wait(T).unwrap();
    assert_eq!(st.code(), Some(0), "{:?}", o.lines());
}

#[test]
fn exit_code_and_signals_are_passed_through() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let memctr = build_workload(tmp.path());
    let img = ImageBuilder::new(&memctr).cmd(&["0"]).env("MEMCTR_EXIT_CODE", "7").build(&tmp.path().join("l")).unwrap();
    let mut o = Outer::builder("sup-code").layout(&img.layout).start().unwrap();
    o.wait_for_line("tick 2 ", T).unwrap();
    // SIGUSR1 is forwarded: memctr answers with its checksum.
    let from = o.log().len();
    o.signal(Signal::SIGUSR1).unwrap();
    o.log().wait_for_from(from, "sum ", T).expect("SIGUSR1 forwarded");
    o.signal(Signal::SIGTERM).unwrap();
    let st = o.wait(T).unwrap();
    assert_eq!(st.code(), Some(7), "ums exits with the workload's code: {:?}", o.lines());

    // A workload killed by a signal: 128+N.
    let mut o = Outer::builder("sup-kill").layout(&img.layout).start().unwrap();
    o.wait_for_line("tick 2 ", T).unwrap();
    let pid = status(&o)["workload"]["pid"].as_i64().unwrap();
    // The workload's pid as ums sees it is in the outer's pid namespace.
    let out = o.exec("kill", &["-KILL", &pid.to_string()]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let st = o.wait(T).unwrap();
    assert_eq!(st.code(), Some(137), "{:?}", o.lines());
}

#[test]
fn orphans_are_reaped() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "0", true);
    let o = Outer::builder("sup-orphans").layout(&img.layout).start().unwrap();
    o.wait_for_line("tick 2 ", T).unwrap();
    // Processes that orphan themselves inside the outer container become
    // children of ums (PID 1), which must reap them.
    for _ in 0..5 {
        let out = o.exec("sh", &["-c", "sleep 0.3 & sleep 0.3 & exit 0"]).unwrap();
        assert!(out.status.success());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let zombies = o.exec("sh", &["-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"]).unwrap();
    let z = String::from_utf8_lossy(&zombies.stdout);
    assert!(z.trim().is_empty(), "zombies left: {z}");
    assert!(status(&o)["orphans_reaped"].as_u64().unwrap() >= 10, "{}", status(&o));
}

#[test]
fn checkpoint_restore_keeps_counting_with_128mib() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "128", false);
    let a = Outer::builder("sup-ckpt-a").layout(&img.layout).start().unwrap();
    a.wait_for_line("tick 5 ", Duration::from_secs(60)).unwrap();
    let sum_before = a.lines().iter().find_map(|l| parse_sum(l)).expect("initial checksum");
    let marker = a.lines().iter().find(|l| l.starts_with("file ")).cloned().expect("marker file line");

    // Garbage on the control socket (reached from the host through the outer
    // container's root): an error for each line, and the workload keeps running.
    {
        use std::io::{BufRead, Write};
        let sock = format!("/proc/{}/root/run/ums/ums.sock", a.pid1());
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("the control socket");
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"garbage\x00\xff\n{\"op\":\"nope\"}\n").unwrap();
        let mut r = std::io::BufReader::new(s);
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON error reply");
            assert_eq!(v["ok"], false, "{line}");
            assert_eq!(v["error"]["kind"], "bad_request", "{line}");
        }
        let from = a.log().len();
        a.log().wait_for_from(from, "tick ", T).expect("the workload runs on after garbage");
        assert_eq!(status(&a)["state"], "running");
    }
    let bad = a.ums(&["restore", "/nonexistent"]).unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a standby")
            || String::from_utf8_lossy(&bad.stderr).contains("already"),
        "{bad:?}"
    );

    // A leave-running checkpoint, and a second one while it runs: busy. The
    // second is sent once status shows the first under way; a first one
    // that ended before it was seen (a loaded machine) is tried again.
    let from = a.log().len();
    let mut saw_busy = false;
    for round in 0..5 {
        let h = {
            let mut cmd = a.command("/opt/ums/ums");
            cmd.args(["checkpoint", &format!("/run/c1-{round}")]);
            std::thread::spawn(move || cmd.output().unwrap())
        };
        while !h.is_finished() {
            if status(&a)["state"]["busy"] == "checkpoint" {
                let c2 = a.ums(&["checkpoint", &format!("/run/c2-{round}")]).unwrap();
                if c2.status.code() == Some(3) {
                    assert!(String::from_utf8_lossy(&c2.stderr).contains("busy"), "{c2:?}");
                    saw_busy = true;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let c1 = h.join().unwrap();
        assert!(c1.status.success(), "{c1:?}");
        if saw_busy {
            break;
        }
    }
    assert!(saw_busy, "a second checkpoint during the first was not refused as busy (5 tries)");
    a.log().wait_for_from(a.log().len(), "tick ", T).expect("runs on after a leave-running checkpoint");
    assert_consecutive(&ticks(&a, from));

    // Checkpoint and stop; restore in a fresh standby outer container.
    let from = a.log().len();
    let out = a.ums_ok(&["checkpoint", "--stop", "/run/final"]).unwrap();
    assert!(out.contains("checkpoint written"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let last_a = *ticks(&a, 0).last().unwrap();
    assert_eq!(status(&a)["state"], "standby");
    let _ = from;

    let b = Outer::builder("sup-ckpt-b").layout(&img.layout).args(&["--standby"]).start().unwrap();
    b.wait_for_line("standby", T).unwrap();
    // Carry the checkpoint dir from A's tmpfs to B's.
    let src = format!("/proc/{}/root/run/final", a.pid1());
    let dst = format!("/proc/{}/root/run/final", b.pid1());
    let cp = std::process::Command::new("cp").args(["-a", &src, &dst]).status().unwrap();
    assert!(cp.success());
    let from_b = b.log().len();
    let out = b.ums_ok(&["restore", "/run/final"]).unwrap();
    assert!(out.contains("restored"), "{out}");
    b.log().wait_for_from(from_b, &format!("tick {} ", last_a + 3), T).expect("counter continues in B");
    let tb = ticks(&b, from_b);
    assert_eq!(tb[0], last_a + 1, "no restart, no repeated or missing values: A ended at {last_a}, B printed {tb:?}");
    assert_consecutive(&tb);
    let from_b = b.log().len();
    let pid = status(&b)["workload"]["pid"].as_i64().unwrap();
    b.exec("kill", &["-USR1", &pid.to_string()]).unwrap();
    let (_, line) = b.log().wait_for_from(from_b, "sum ", T).unwrap();
    assert_eq!(parse_sum(&line).unwrap(), sum_before, "memory checksum after restore");
    let content = marker.split_whitespace().nth(2).unwrap().to_string();
    let f = b.exec("cat", &[&format!("/proc/{pid}/root/home/app/marker")]).unwrap();
    assert_eq!(String::from_utf8_lossy(&f.stdout).trim(), content, "file written before the checkpoint");
}

/// The workload prints before ums has ended its start operation (here held
/// open 3 s by a fail point): `ums status` answers at once meanwhile, and a
/// checkpoint asked for then is not refused as busy but begins once the
/// start has ended; the workload counts on after it.
#[test]
fn a_checkpoint_asked_for_during_start_up_waits_for_the_start() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "16", false);
    let mut o = Outer::builder("sup-early").layout(&img.layout).env("UMS_FAILPOINT", "slow-start").start().unwrap();
    o.wait_for_line("tick 1 ", T).expect("the workload runs");
    let t0 = std::time::Instant::now();
    let s = status(&o);
    assert!(t0.elapsed() < Duration::from_secs(2), "status took {:?}", t0.elapsed());
    assert_eq!(s["state"]["busy"], "start", "the start has not ended yet: {s}");
    let out = o.ums_ok(&["checkpoint", "/run/early"]).expect("a checkpoint during start-up is carried out");
    assert!(out.contains("checkpoint written"), "{out}");
    assert_eq!(status(&o)["state"], "running");
    let files = o.exec("ls", &["/run/early/criu"]).unwrap();
    assert!(String::from_utf8_lossy(&files.stdout).contains("pages-"), "{files:?}");
    let from = o.log().len();
    o.log().wait_for_from(from, "tick ", T).expect("runs on after the checkpoint");
    o.signal(Signal::SIGTERM).unwrap();
    o.wait(T).unwrap();
}
