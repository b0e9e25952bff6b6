//! Smoke tests of the end-to-end support code itself, runnable without ums:
//! the memctr workload, image layouts (checked, and run with plain runc),
//! simulated hosts, and outer.sh with a stand-in PID 1.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use ums_e2e::oci_layout::{self, Compression, Layer};
use ums_e2e::{build_workload, parse_sum, parse_tick, run, unique_name, Host, ImageBuilder, LineLog, Outer};

const WAIT: Duration = Duration::from_secs(10);

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("ums-test-infra-").tempdir().unwrap()
}

/// Ticks in `lines` must be 1, 2, 3, ... about 100 ms apart.
fn check_ticks(lines: &[String], at_least: usize) {
    let ticks: Vec<_> = lines.iter().filter_map(|l| parse_tick(l)).collect();
    assert!(ticks.len() >= at_least, "only {} ticks in {lines:?}", ticks.len());
    for (i, pair) in ticks.windows(2).enumerate() {
        assert_eq!(pair[1].n, pair[0].n + 1, "ticks not consecutive at {i}: {ticks:?}");
        let gap = pair[1].unix_ms - pair[0].unix_ms;
        assert!((50..=300).contains(&gap), "tick gap {gap} ms: {ticks:?}");
    }
    assert_eq!(ticks[0].n, 1);
}

#[test]
fn memctr_ticks_sums_and_terminates() {
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let mut child = Command::new(&memctr)
        .env("MEMCTR_MIB", "8")
        .env("FOO", "bar")
        .env("MEMCTR_EXIT_CODE", "3")
        .env("MEMCTR_FILE", tmp.path().join("written"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let log = LineLog::new();
    log.capture(child.stdout.take().unwrap(), "memctr".into());
    let pid = Pid::from_raw(child.id() as i32);

    log.wait_for_from(0, "tick 5 ", WAIT).unwrap();
    let lines = log.lines();
    assert_eq!(lines[0], "env FOO=bar");
    assert!(lines[1].starts_with("cwd /"), "{lines:?}");
    assert_eq!(lines[2], "uid 0 gid 0");
    let sum = parse_sum(&lines[3]).expect("sum line");
    let (_, file_line) = log.wait_for_from(0, "file ", WAIT).unwrap();
    let content = file_line.rsplit(' ').next().unwrap();
    assert!(content.starts_with(&format!("written-by-{pid}-")), "{file_line}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("written")).unwrap(), format!("{content}\n"));
    check_ticks(&lines, 5);

    let from = log.len();
    kill(pid, Signal::SIGUSR1).unwrap();
    let (_, again) = log.wait_for_from(from, "sum ", WAIT).unwrap();
    assert_eq!(parse_sum(&again).unwrap(), sum, "memory checksum changed");

    kill(pid, Signal::SIGTERM).unwrap();
    log.wait_for_from(from, "term", WAIT).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(3));
    check_ticks(&log.lines(), 5);
}

#[test]
fn memctr_reaps_orphans() {
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let mut child =
        Command::new(&memctr).args(["spawn-orphans", "4"]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let log = LineLog::new();
    log.capture(child.stdout.take().unwrap(), "memctr".into());
    let result = log.wait_for_from(0, "orphans-done", WAIT);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    result.unwrap();
}

fn test_image(memctr: &std::path::Path) -> ImageBuilder {
    ImageBuilder::new(memctr)
        .cmd(&["8"])
        .env("FOO", "from-image")
        .working_dir("/home/app")
        .user("1000:1000")
        .expose("8080/tcp")
        .file("etc/motd", "hello\n", 0o644)
        .layer(Layer::new(Compression::Zstd).file("opt/zstd.txt", "zstd layer\n", 0o644))
        .layer(Layer::new(Compression::None).symlink("opt/link", "zstd.txt"))
}

#[test]
fn image_layout_is_consistent_and_deterministic() {
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let one = test_image(&memctr).build(&tmp.path().join("one")).unwrap();
    let two = test_image(&memctr).build(&tmp.path().join("two")).unwrap();
    assert_eq!(one.manifest_digest, two.manifest_digest, "same inputs, different manifest");
    let other = test_image(&memctr).env("FOO", "x").build(&tmp.path().join("three")).unwrap();
    assert_ne!(one.manifest_digest, other.manifest_digest);

    let config = oci_layout::verify_layout(&one.layout).unwrap();
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], json!(["/bin/memctr"]));
    assert_eq!(c["Cmd"], json!(["8"]));
    assert_eq!(c["WorkingDir"], "/home/app");
    assert_eq!(c["User"], "1000:1000");
    assert_eq!(c["ExposedPorts"], json!({"8080/tcp": {}}));
    assert!(c["Env"].as_array().unwrap().contains(&json!("FOO=from-image")));

    let index: Value = serde_json::from_slice(&std::fs::read(one.layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], one.manifest_digest.as_str());
    let manifest = oci_layout::read_manifest(&one.layout).unwrap();
    let media: Vec<_> = manifest["layers"].as_array().unwrap().iter().map(|l| l["mediaType"].clone()).collect();
    assert_eq!(
        media,
        [
            oci_layout::MEDIA_LAYER_GZIP,
            oci_layout::MEDIA_LAYER_GZIP,
            oci_layout::MEDIA_LAYER_ZSTD,
            oci_layout::MEDIA_LAYER_TAR
        ]
    );
    assert_eq!(manifest["config"]["digest"], one.config_digest.as_str());

    // Every blob in the directory is referenced and matches its name.
    let blobs = std::fs::read_dir(one.layout.join("blobs/sha256")).unwrap();
    let mut count = 0;
    for blob in blobs {
        let blob = blob.unwrap();
        let data = std::fs::read(blob.path()).unwrap();
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(&data)), blob.file_name().to_string_lossy());
        count += 1;
    }
    assert_eq!(count, 4 + 2, "4 layers, config, manifest");
}

#[test]
fn image_runs_under_plain_runc() {
    ums_e2e::require_root();
    ums_e2e::require_tool("runc", "runc");
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let image = test_image(&memctr).build(&tmp.path().join("layout")).unwrap();
    let bundle = tmp.path().join("bundle");
    oci_layout::unpack_with_tar(&image.layout, &bundle.join("rootfs")).unwrap();
    assert_eq!(std::fs::read_to_string(bundle.join("rootfs/opt/link")).unwrap(), "zstd layer\n");
    let home = std::fs::metadata(bundle.join("rootfs/home/app")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&home), 1000);

    run(Command::new("runc").arg("spec").arg("--bundle").arg(&bundle)).unwrap();
    let config_path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let id = unique_name("runc");
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/bin/memctr", "8"]);
    spec["process"]["cwd"] = json!("/home/app");
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    spec["process"]["env"].as_array_mut().unwrap().push(json!("FOO=runc"));
    spec["root"] = json!({"path": "rootfs", "readonly": false});
    spec["linux"]["cgroupsPath"] = json!(format!("/{id}"));
    std::fs::write(&config_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let state = std::path::PathBuf::from("/run").join(&id);
    let runc = |args: &[&str]| {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&state).args(args);
        cmd
    };
    let mut child = runc(&["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = LineLog::new();
    log.capture(child.stdout.take().unwrap(), "runc".into());
    log.capture(child.stderr.take().unwrap(), "runc".into());
    let started = child.wait().unwrap();
    let result = (|| -> anyhow::Result<()> {
        anyhow::ensure!(started.success(), "runc run failed: {:?}", log.lines());
        log.wait_for_from(0, "tick 3 ", WAIT)?;
        Ok(())
    })();
    let _ = runc(&["kill", &id, "KILL"]).status();
    let deleted = runc(&["delete", "-f", &id]).status();
    let _ = std::fs::remove_dir_all(&state);
    result.unwrap();
    assert!(deleted.unwrap().success(), "runc delete -f failed");

    let lines = log.lines();
    assert!(lines.contains(&"env FOO=runc".to_string()), "{lines:?}");
    assert!(lines.contains(&"cwd /home/app".to_string()), "{lines:?}");
    assert!(lines.contains(&"uid 1000 gid 1000".to_string()), "{lines:?}");
    check_ticks(&lines, 3);
}

#[test]
fn host_pair_connects_over_a_rate_limited_link() {
    let (a, b) = Host::pair("infra", Some("1gbit")).unwrap();
    assert_eq!(a.peer_addr(), b.addr());
    let qdisc = run(Command::new("tc").args(["-n", a.name(), "qdisc", "show", "dev", "eth0"])).unwrap();
    assert!(qdisc.contains("tbf"), "{qdisc}");

    // busybox nc listens in b; bash's /dev/tcp connects from a.
    let mut server = b
        .command("busybox")
        .args(["nc", "-l", "-p", "7071"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let log = LineLog::new();
    log.capture(server.stdout.take().unwrap(), "nc".into());
    let script = format!(
        "for i in $(seq 50); do echo hello-from-a 2>/dev/null >/dev/tcp/{}/7071 && exit 0; sleep 0.1; done; exit 1",
        b.addr()
    );
    let sent = a.command("bash").args(["-c", &script]).status().unwrap();
    let received = log.wait_for_from(0, "hello-from-a", WAIT);
    let _ = kill(Pid::from_raw(server.id() as i32), Signal::SIGKILL);
    let _ = server.wait();
    assert!(sent.success(), "could not connect from {} to {}", a.addr(), b.addr());
    received.unwrap();

    // No route out of the pair: the hosts see only each other.
    let addrs = run(a.command("ip").args(["-4", "-o", "addr"])).unwrap();
    assert!(addrs.contains(&a.addr().to_string()), "{addrs}");
}

#[test]
fn outer_sh_runs_pid1_in_its_own_namespaces() {
    let (a, _b) = Host::pair("outer", None).unwrap();
    let script = r#"
        echo "pid1 $$"
        echo "hostname $(cat /proc/sys/kernel/hostname)"
        grep -E ' /(run|tmp|var/lib/ums) ' /proc/mounts | awk '{print "mount", $2, $3}'
        echo "layout $(cat /var/lib/ums-image/oci-layout)"
        echo "runc $(runc --version | head -n1)"
        echo "criu $(criu --version | head -n1)"
        echo "iptables-restore $(command -v iptables-restore)"
        echo "addr $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
        echo "env UMS_X=${UMS_X:-unset} OTHER=${OTHER:-unset}"
        if touch /usr/ums-test-ro 2>/dev/null; then echo "usr writable"; else echo "usr read-only"; fi
        trap 'echo term; exit 7' TERM
        echo ready
        while :; do sleep 1 & wait $!; done
    "#;
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let image = ImageBuilder::new(&memctr).build(&tmp.path().join("layout")).unwrap();
    let mut outer = Outer::builder("ums-test-outer")
        .host(&a)
        .layout(&image.layout)
        .exec_override("/bin/sh")
        .env("UMS_X", "passed")
        .env("OTHER", "dropped")
        .args(&["-c", script])
        .start()
        .unwrap();
    assert!(outer.pid1() > 1);
    outer.wait_for_line("ready", WAIT).unwrap();
    let lines = outer.lines();
    let has = |l: &str| assert!(lines.iter().any(|x| x == l), "no line {l:?} in {lines:#?}");
    has("pid1 1");
    has("hostname ums-test-outer");
    has("mount /run tmpfs");
    has("mount /tmp tmpfs");
    has("mount /var/lib/ums tmpfs");
    has(r#"layout {"imageLayoutVersion":"1.0.0"}"#);
    has("criu Version: 4.2.1");
    has("env UMS_X=passed OTHER=unset");
    has("usr read-only");
    has(&format!("addr {}/30", a.addr()));
    assert!(lines.iter().any(|l| l.starts_with("runc runc version")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("iptables-restore /")), "{lines:#?}");

    // nsenter reaches the same namespaces and root.
    let out = outer.exec("cat", &["/proc/1/cmdline", "/proc/sys/kernel/hostname"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ums-test-outer"), "{out:?}");

    let root = outer.root_dir().to_path_buf();
    outer.signal(Signal::SIGTERM).unwrap();
    outer.wait_for_line("term", WAIT).unwrap();
    let status = outer.wait(WAIT).unwrap();
    assert_eq!(status.code(), Some(7));
    drop(outer);
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn outer_without_netns_gets_only_loopback_and_drop_kills_it() {
    let outer = Outer::builder("ums-test-lo")
        .exec_override("/bin/sh")
        .args(&["-c", "ip -o link | awk '{print \"link\", $2}'; echo ready; exec sleep 1000"])
        .start()
        .unwrap();
    outer.wait_for_line("ready", WAIT).unwrap();
    let links: Vec<_> = outer.lines().into_iter().filter(|l| l.starts_with("link ")).collect();
    assert_eq!(links, ["link lo:"]);
    let pid1 = outer.pid1();
    let root = outer.root_dir().to_path_buf();
    drop(outer);
    assert!(!std::path::Path::new(&format!("/proc/{pid1}")).exists(), "PID 1 survived drop");
    assert!(!root.exists());
}

#[test]
fn outer_without_ums_binary_says_how_to_build_it() {
    let missing = "/nonexistent/ums-test-no-ums";
    let err = Outer::builder("ums-test-none").ums(missing).start().err().expect("start must fail");
    assert!(format!("{err:#}").contains("cargo build -p ums"), "{err:#}");

    // outer.sh itself says the same when run by hand.
    let root = tempdir();
    let out = Command::new("bash")
        .arg(ums_e2e::outer_script())
        .args(["--name", "ums-test-none", "--root"])
        .arg(root.path().join("root"))
        .args(["--ums", missing, "--"])
        .env_remove("UMS_OUTER_EXEC")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo build -p ums"), "{out:?}");
}

/// The layout outer.sh builds is enough for what ums will do in it: run the
/// workload with runc, checkpoint it with CRIU, restore it with its memory.
#[test]
fn runc_checkpoint_and_restore_work_inside_the_outer() {
    let tmp = tempdir();
    let memctr = build_workload(tmp.path());
    let image = ImageBuilder::new(&memctr).build(&tmp.path().join("layout")).unwrap();
    let bundle = tmp.path().join("bundle");
    oci_layout::unpack_with_tar(&image.layout, &bundle.join("rootfs")).unwrap();
    run(Command::new("runc").arg("spec").arg("--bundle").arg(&bundle)).unwrap();
    let id = unique_name("nested");
    let config_path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/bin/memctr", "16"]);
    spec["root"] = json!({"path": "rootfs", "readonly": false});
    spec["linux"]["cgroupsPath"] = json!(format!("/{id}"));
    std::fs::write(&config_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let outer = Outer::builder("ums-test-nested")
        .exec_override("/bin/sh")
        .args(&["-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 1 & wait $!; done"])
        .start()
        .unwrap();
    outer.wait_for_line("ready", WAIT).unwrap();
    // The bundle goes onto the outer's tmpfs, as ums will put it.
    let mut untar = outer.command("tar");
    untar.args(["-x", "-C", "/var/lib/ums"]).stdin(Stdio::piped());
    let mut untar = untar.spawn().unwrap();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(tmp.path())
        .args(["-c", "bundle"])
        .stdout(untar.stdin.take().unwrap())
        .spawn()
        .unwrap();
    assert!(tar.wait().unwrap().success() && untar.wait().unwrap().success());

    let runc = |args: &[&str]| {
        let mut cmd = outer.command("runc");
        cmd.args(args);
        cmd
    };
    let start = |args: &[&str], tag: &str| {
        let mut child = runc(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), tag.into());
        log.capture(child.stderr.take().unwrap(), tag.into());
        let status = child.wait().unwrap();
        (status, log)
    };
    let result = (|| -> anyhow::Result<()> {
        let (status, first) = start(&["run", "-d", "--bundle", "/var/lib/ums/bundle", &id], "nested-1");
        anyhow::ensure!(status.success(), "runc run in the outer failed: {:?}", first.lines());
        first.wait_for_from(0, "tick 3 ", WAIT)?;
        let sum = first.lines().iter().find_map(|l| parse_sum(l)).unwrap();
        let images = "/var/lib/ums/images";
        run(&mut runc(&["checkpoint", "--image-path", images, &id]))?;
        let last = first.lines().iter().rev().find_map(|l| parse_tick(l)).unwrap();
        let (status, second) =
            start(&["restore", "-d", "--image-path", images, "--bundle", "/var/lib/ums/bundle", &id], "nested-2");
        anyhow::ensure!(status.success(), "runc restore in the outer failed: {:?}", second.lines());
        let (_, line) = second.wait_for_from(0, "tick ", WAIT)?;
        let tick = parse_tick(&line).unwrap();
        anyhow::ensure!(tick.n == last.n + 1, "counter went from {} to {} across restore", last.n, tick.n);
        run(&mut runc(&["kill", &id, "USR1"]))?;
        let (_, again) = second.wait_for_from(0, "sum ", WAIT)?;
        anyhow::ensure!(parse_sum(&again).as_deref() == Some(sum.as_str()), "memory changed across restore");
        Ok(())
    })();
    let _ = runc(&["delete", "-f", &id]).status();
    result.unwrap();
}
