//! End-to-end: the nested container's defaults a user brings a real image
//! to: the outer container's own resource limits (each replaceable with
//! `--ulimit`) and a seccomp filter like Docker's (`--seccomp`).

use std::time::Duration;

use ums_e2e::*;

const T: Duration = Duration::from_secs(30);

fn busybox_image(tmp: &std::path::Path) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr).cmd(&["0"]).build(&tmp.join("layout")).expect("build the workload image")
}

/// The rows of a /proc/PID/limits table, blanks squeezed.
fn limits_table(text: &str) -> Vec<String> {
    text.lines().filter(|l| l.starts_with("Max ")).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

/// Runs `script` in the workload (busybox sh) and returns its output lines
/// (stdout only: stderr reaches the log on another pipe, in no set order)
/// up to the line `done`; the workload then sleeps until the outer is dropped.
fn run_script(name: &str, img: &OciImage, ums_args: &[&str], script: &str) -> (Outer, Vec<String>) {
    let mut args: Vec<&str> = ums_args.to_vec();
    let script = format!("{script}; echo done; exec sleep 1000");
    args.extend(["--", "/bin/sh", "-c", &script]);
    let o = Outer::builder(name).layout(&img.layout).args(&args).start().unwrap();
    let (end, _) = o.log().wait_for_from(0, "done", T).unwrap_or_else(|e| panic!("{e:#}: {:?}", o.lines()));
    let lines = o.lines()[..end].to_vec();
    (o, lines)
}

#[test]
fn the_workload_gets_the_outer_containers_limits_unless_told_otherwise() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = busybox_image(tmp.path());

    // By default: every limit is the one ums runs with (not 1024 open files).
    let (o, lines) = run_script("lim-own", &img, &[], "cat /proc/self/limits");
    let own = std::fs::read_to_string(format!("/proc/{}/limits", o.pid1())).unwrap();
    let workload = limits_table(&lines.join("\n"));
    assert_eq!(workload.len(), 16, "{lines:?}");
    assert_eq!(workload, limits_table(&own), "the workload's limits differ from the outer container's");
    drop(o);

    // --ulimit replaces one limit each, the rest stay the outer's.
    let (o, lines) = run_script(
        "lim-set",
        &img,
        &["--ulimit", "nofile=512:1024", "--ulimit", "core=0"],
        "ulimit -n; ulimit -c; cat /proc/self/limits",
    );
    let table = limits_table(&lines.join("\n"));
    assert!(table.contains(&"Max open files 512 1024 files".to_string()), "{table:?}");
    assert!(table.contains(&"Max core file size 0 0 bytes".to_string()), "{table:?}");
    let stack = |t: &[String]| t.iter().find(|l| l.starts_with("Max stack size")).cloned();
    let own = std::fs::read_to_string(format!("/proc/{}/limits", o.pid1())).unwrap();
    assert_eq!(stack(&table), stack(&limits_table(&own)));
    assert!(lines.iter().any(|l| l.trim().ends_with("512")), "ulimit -n in the workload: {lines:?}");
    drop(o);

    // Bad input: a clear error, and no workload.
    for (bad, says) in [("files=10", "unknown limit"), ("nofile=ten", "not a number"), ("nofile=9:8", "soft limit")] {
        let mut o = Outer::builder("lim-bad").layout(&img.layout).args(&["--ulimit", bad]).start().unwrap();
        let st = o.wait(T).unwrap();
        assert!(!st.success(), "{bad} accepted");
        o.wait_for_line(says, T).unwrap_or_else(|e| panic!("{bad}: {e:#}: {:?}", o.lines()));
    }
}

#[test]
fn the_default_seccomp_filter_refuses_what_docker_refuses() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = busybox_image(tmp.path());
    let probe = "grep -E '^Seccomp:' /proc/self/status; unshare -r true 2>&1; echo unshare-rc=$?";

    // Default: a filter, and a new user namespace is refused with EPERM.
    let (o, lines) = run_script("sec-default", &img, &[], probe);
    let text = lines.join("\n");
    assert!(text.contains("Seccomp:\t2") || text.contains("Seccomp: 2"), "no seccomp filter: {text}");
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("unshare-rc=1"), "{text}");
    drop(o);

    // Unconfined: no filter, and the same call works (it needs no capability).
    let (o, lines) = run_script("sec-none", &img, &["--seccomp", "unconfined"], probe);
    let text = lines.join("\n");
    assert!(text.contains("Seccomp:\t0") || text.contains("Seccomp: 0"), "{text}");
    assert!(text.contains("unshare-rc=0"), "{text}");
    drop(o);

    // A profile from a file (put in the image layout dir, which the outer
    // container sees at /var/lib/ums-image): `unshare` gets EACCES.
    let profile = img.layout.join("seccomp.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["unshare"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let (o, lines) = run_script("sec-file", &img, &["--seccomp", "/var/lib/ums-image/seccomp.json"], probe);
    let text = lines.join("\n");
    assert!(text.contains("Permission denied"), "{text}");
    assert!(text.contains("unshare-rc=1"), "{text}");
    drop(o);

    let mut o =
        Outer::builder("sec-bad").layout(&img.layout).args(&["--seccomp", "/nonexistent.json"]).start().unwrap();
    assert!(!o.wait(T).unwrap().success());
    o.wait_for_line("cannot read", T).unwrap_or_else(|e| panic!("{e:#}: {:?}", o.lines()));
}
