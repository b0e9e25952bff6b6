//! `containerd-shim-ums-v1` (runtime `io.containerd.ums.v1`) under a real
//! containerd that the test starts itself (own root, state, socket and
//! namespace: `ums_e2e::containerd`), with real runc and CRIU, driven by
//! `ctr` as a user would:
//!
//! - `ctr run --runtime io.containerd.ums.v1` of the memctr image the test
//!   imports: its output reaches `ctr`; `ctr task ps`, `metrics`, `exec`,
//!   `pause`, `resume` and `checkpoint` work (the task runs on after the
//!   checkpoint); `ctr task kill` ends it with the workload's own exit
//!   status (SIGKILL: 137); after `ctr containers delete` no shim, no
//!   workload process and no mount is left;
//! - `ctr run -t` and `ctr task exec -t` get terminals;
//! - `ctr containers checkpoint --task --rw` (the form ctr 1.6 can restore;
//!   the same Checkpoint call to the shim), then `ctr containers restore
//!   --live --rw` of it into a new container: memctr's counter goes on from
//!   where the checkpoint saw it and its memory checksum is the same;
//! - start time, shim RSS and checkpoint time beside io.containerd.runc.v2
//!   (printed, docs/containerd.md).
//!
//! Needs containerd (image/install-deps.sh --test) and the shim binary:
//! `cargo build -p containerd-shim-ums` (or UMS_SHIM_BIN).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ums_e2e::containerd::Containerd;
use ums_e2e::*;

const RUNTIME: &str = "io.containerd.ums.v1";
const T: Duration = Duration::from_secs(60);

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// containerd 1.6 keeps shim sockets and FIFOs under /run/containerd for
/// every instance: one of our containerds at a time, so that one never
/// removes a directory another is about to use.
static ONE_CONTAINERD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The shim under test: `$UMS_SHIM_BIN`, or `<target>/debug/containerd-shim-ums-v1`.
fn shim_bin() -> PathBuf {
    let path = match std::env::var_os("UMS_SHIM_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("containerd-shim-ums-v1"),
    };
    assert!(
        path.is_file(),
        "shim binary {} does not exist: build it first: cargo build -p containerd-shim-ums (or set UMS_SHIM_BIN)",
        path.display()
    );
    path
}

/// A containerd of our own that finds `containerd-shim-ums-v1` on its PATH.
fn containerd(tmp: &Path) -> Containerd {
    require_root();
    require_tool("runc", "runc");
    require_tool("criu", "criu (image/install-deps.sh builds 4.2.1)");
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(shim_bin(), bin.join("containerd-shim-ums-v1")).unwrap();
    Containerd::start(&tmp.join("containerd"), &unique_name("shim"), Some(&bin)).unwrap()
}

/// The memctr image (busybox + memctr), imported; returns its name.
fn import_memctr(c: &Containerd, tmp: &Path) -> String {
    let memctr = build_workload(&tmp.join("build"));
    let img = ImageBuilder::new(&memctr).build(&tmp.join("layout")).unwrap();
    let tarball = tmp.join("memctr.oci.tar");
    run(Command::new("tar").arg("-C").arg(&img.layout).arg("-cf").arg(&tarball).arg(".")).unwrap();
    let name = format!("localhost/{}", unique_name("memctr"));
    run(c.ctr().args(["images", "import", "--base-name", &name]).arg(&tarball)).unwrap();
    let listed = run(c.ctr().args(["images", "list", "--quiet"])).unwrap();
    let full = listed.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{name} not imported: {listed}"));
    full.to_string()
}

/// An attached `ctr` (run or restore) with its output captured line by line.
struct Attached {
    child: Child,
    log: LineLog,
}

impl Attached {
    fn spawn(mut cmd: Command) -> Attached {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ctr");
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), "ctr".into());
        log.capture(child.stderr.take().unwrap(), "ctr".into());
        Attached { child, log }
    }

    fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "ctr did not exit; output:\n{}", self.log.lines().join("\n"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ticks(&self) -> Vec<u64> {
        self.log.lines().iter().filter_map(|l| parse_tick(l)).map(|t| t.n).collect()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ctr_run(c: &Containerd, image: &str, id: &str, env: &[&str], args: &[&str]) -> Attached {
    let mut cmd = c.ctr();
    cmd.args(["run", "--runtime", RUNTIME]);
    for e in env {
        cmd.args(["--env", e]);
    }
    cmd.args([image, id]).args(args);
    Attached::spawn(cmd)
}

/// The task's state and pid as `ctr task ls` shows them.
fn task_state(c: &Containerd, id: &str) -> Option<(String, i32)> {
    let out = run(c.ctr().args(["task", "ls"])).unwrap();
    out.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[2].to_string(), f[1].parse().unwrap_or(0)))
    })
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn wait_gone(what: &str, within: Duration, mut left: impl FnMut() -> Vec<i32>) {
    let deadline = Instant::now() + within;
    loop {
        let l = left();
        if l.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} still there: {l:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctr_runs_execs_kills_and_deletes_through_the_ums_shim() {
    let _one = ONE_CONTAINERD.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::Builder::new().prefix("ums-test-cshim-").tempdir().unwrap();
    let c = containerd(tmp.path());
    let image = import_memctr(&c, tmp.path());
    let id = unique_name("run");

    // Run: the output reaches ctr.
    let t0 = Instant::now();
    let mut a = ctr_run(&c, &image, &id, &["MEMCTR_EXIT_CODE=7"], &[]);
    let (_, first) = a.log.wait_for_from(0, "tick 1 ", T).unwrap();
    say!("ctr run -> first tick after {} ms ({first})", t0.elapsed().as_millis());
    a.log.wait_for_from(0, "tick 3 ", T).unwrap();
    let (state, pid) = task_state(&c, &id).expect("task listed");
    assert_eq!(state, "RUNNING");
    assert!(alive(pid), "task pid {pid} runs");
    let ps = run(c.ctr().args(["task", "ps", &id])).unwrap();
    assert!(ps.lines().any(|l| l.split_whitespace().next() == Some(&pid.to_string())), "ctr task ps: {ps}");

    // Stats: `ctr task metrics` prints the task's cgroup figures.
    let metrics = run(c.ctr().args(["task", "metrics", &id])).unwrap();
    let value = |key: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse::<u64>().unwrap_or(0)))
            .unwrap_or_else(|| panic!("no {key} in ctr task metrics:\n{metrics}"))
    };
    assert!(value("memory.usage_in_bytes") > 0, "{metrics}");
    assert!(value("pids.current") >= 1, "{metrics}");

    // Exec: output and exit status of a second process.
    let out =
        run(c.ctr().args(["task", "exec", "--exec-id", "e1", &id, "/bin/busybox", "echo", "hello-from-exec"])).unwrap();
    assert_eq!(out.trim(), "hello-from-exec");
    let st = c.ctr().args(["task", "exec", "--exec-id", "e2", &id, "/bin/sh", "-c", "exit 3"]).status().unwrap();
    assert_eq!(st.code(), Some(3), "exec's exit status reaches ctr");

    // Pause and resume: the counter stops, then goes on.
    run(c.ctr().args(["task", "pause", &id])).unwrap();
    assert_eq!(task_state(&c, &id).unwrap().0, "PAUSED");
    let before = a.ticks().len();
    std::thread::sleep(Duration::from_millis(600));
    assert!(a.ticks().len() <= before + 1, "no ticks while paused");
    run(c.ctr().args(["task", "resume", &id])).unwrap();
    let n = a.log.len();
    a.log.wait_for_from(n, "tick ", T).unwrap();
    assert_eq!(task_state(&c, &id).unwrap().0, "RUNNING");

    // `ctr task checkpoint`: containerd pauses the task, the shim dumps it
    // with CRIU into the path containerd gives, containerd stores a
    // checkpoint image of it, and the task goes on (leave-running).
    let t0 = Instant::now();
    let out = run(c.ctr().args(["task", "checkpoint", &id])).unwrap();
    say!("ctr task checkpoint: {} ms -> {}", t0.elapsed().as_millis(), out.trim());
    let task_image = out.trim().to_string();
    assert!(task_image.contains("checkpoint/"), "ctr printed the checkpoint image's name: {out}");
    let images = run(c.ctr().args(["images", "list", "--quiet"])).unwrap();
    assert!(images.lines().any(|l| l == task_image), "{task_image} stored: {images}");
    let n = a.log.len();
    a.log.wait_for_from(n, "tick ", T).unwrap();
    assert_eq!(task_state(&c, &id).unwrap().0, "RUNNING", "the task runs on after the checkpoint");

    // SIGTERM: memctr says "term" and exits with its code; ctr run returns it.
    run(c.ctr().args(["task", "kill", &id])).unwrap();
    assert_eq!(a.wait_exit(T), 7, "the workload's own exit status; output:\n{}", a.log.lines().join("\n"));
    assert!(a.log.lines().iter().any(|l| l == "term"), "memctr saw SIGTERM");
    run(c.ctr().args(["containers", "delete", &id])).unwrap();
    assert!(!alive(pid));

    // SIGKILL: 137.
    let id2 = unique_name("run");
    let mut b = ctr_run(&c, &image, &id2, &[], &[]);
    b.log.wait_for_from(0, "tick 2 ", T).unwrap();
    let (_, pid2) = task_state(&c, &id2).unwrap();
    run(c.ctr().args(["task", "kill", "--signal", "SIGKILL", &id2])).unwrap();
    assert_eq!(b.wait_exit(T), 137);
    run(c.ctr().args(["containers", "delete", &id2])).unwrap();

    // Nothing left: no shim, no workload process, no rootfs mount.
    wait_gone("shim processes", Duration::from_secs(10), || c.shims());
    wait_gone("workload processes", Duration::from_secs(10), || {
        [pid, pid2].into_iter().filter(|p| alive(*p)).collect()
    });
    let mounts = ums_e2e::outer::mounts_below(&c.dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

#[test]
fn ctr_checkpoint_then_restore_into_a_new_container() {
    let _one = ONE_CONTAINERD.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::Builder::new().prefix("ums-test-cshim-").tempdir().unwrap();
    let c = containerd(tmp.path());
    let image = import_memctr(&c, tmp.path());
    let id = unique_name("ckpt");

    // ctr run's arguments replace Entrypoint and Cmd: the whole command line.
    let mut a = ctr_run(&c, &image, &id, &[], &["/bin/memctr", "64"]);
    a.log.wait_for_from(0, "tick 5 ", T).unwrap_or_else(|e| panic!("{e}: {:?}", a.log.lines()));
    let sum = |x: &Attached, from: usize| {
        let (_, l) = x.log.wait_until(from, T, |l| parse_sum(l).is_some()).unwrap();
        parse_sum(&l).unwrap()
    };
    let first_sum = sum(&a, 0);

    // ctr 1.6 restores only what `ctr containers checkpoint --task` makes
    // (the index `ctr task checkpoint` makes has no spec and names the
    // image under another key); both reach the shim's Checkpoint the same
    // way (the first test runs `ctr task checkpoint`). containerd pauses the
    // task, the shim dumps it with CRIU into the path containerd gives
    // (leave-running), containerd stores the checkpoint image.
    let checkpoint = format!("localhost/{}:1", unique_name("checkpoint"));
    let before_checkpoint = *a.ticks().last().unwrap();
    let t0 = Instant::now();
    run(c.ctr().args(["containers", "checkpoint", "--task", "--rw", &id, &checkpoint])).unwrap();
    say!("ctr containers checkpoint --task --rw (64 MiB): {} ms", t0.elapsed().as_millis());
    let after_checkpoint = *a.ticks().last().unwrap();
    let n = a.log.len();
    a.log.wait_for_from(n, "tick ", T).unwrap();
    assert_eq!(task_state(&c, &id).unwrap().0, "RUNNING", "the task runs on after the checkpoint");

    // The original goes away; the checkpoint comes back in a new container.
    let (_, pid) = task_state(&c, &id).unwrap();
    run(c.ctr().args(["task", "kill", "--signal", "SIGKILL", &id])).unwrap();
    assert_eq!(a.wait_exit(T), 137);
    run(c.ctr().args(["containers", "delete", &id])).unwrap();

    let id2 = unique_name("restored");
    let t1 = Instant::now();
    let mut r = Attached::spawn({
        let mut cmd = c.ctr();
        cmd.args(["containers", "restore", "--live", "--rw", &id2, &checkpoint]);
        cmd
    });
    let (_, l) = r.log.wait_until(0, T, |l| parse_tick(l).is_some()).unwrap_or_else(|e| {
        panic!("{e}: restore output:\n{}\ncontainerd:\n{}", r.log.lines().join("\n"), c.log.lines().join("\n"))
    });
    say!("ctr containers restore --live -> first tick after {} ms", t1.elapsed().as_millis());
    let resumed = parse_tick(&l).unwrap().n;
    // The dump saw the counter between the last tick before the checkpoint
    // and the last one when it returned: the restored copy goes on from
    // there (no restart at 1, nothing skipped).
    assert!(
        resumed > before_checkpoint && resumed <= after_checkpoint + 1,
        "the counter goes on from the checkpoint (last tick before it {before_checkpoint}, after it {after_checkpoint}, restored copy's first {resumed})"
    );
    assert_eq!(task_state(&c, &id2).unwrap().0, "RUNNING");
    // `ctr containers restore` returns once the task started: attach to
    // the restored task's FIFOs to read on.
    r.wait_exit(T);
    let att = Attached::spawn({
        let mut cmd = c.ctr();
        cmd.args(["task", "attach", &id2]);
        cmd
    });
    att.log.wait_until(0, T, |l| parse_tick(l).is_some_and(|t| t.n > resumed)).unwrap();
    let n = att.log.len();
    run(c.ctr().args(["task", "kill", "--signal", "SIGUSR1", &id2])).unwrap();
    assert_eq!(sum(&att, n), first_sum, "memory checksum after restore");
    let ticks = att.ticks();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "the restored counter counts on: {ticks:?}");
    let (_, pid2) = task_state(&c, &id2).unwrap();
    run(c.ctr().args(["task", "kill", "--signal", "SIGKILL", &id2])).unwrap();
    // The attached ctr sees the exit (and deletes the task, as ctr does).
    let mut att = att;
    assert_eq!(att.wait_exit(T), 137);
    if task_state(&c, &id2).is_some() {
        run(c.ctr().args(["task", "delete", &id2])).unwrap();
    }
    run(c.ctr().args(["containers", "delete", &id2])).unwrap();
    drop(att);
    drop(r);
    wait_gone("shim processes", Duration::from_secs(10), || c.shims());
    wait_gone("workload processes", Duration::from_secs(10), || {
        [pid, pid2].into_iter().filter(|p| alive(*p)).collect()
    });
    let mounts = ums_e2e::outer::mounts_below(&c.dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The shim serving container `id` (its command line names the id).
fn shim_of(c: &Containerd, id: &str) -> Option<i32> {
    c.shims().into_iter().find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).split('\0').any(|a| a == id)
    })
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Start time, shim RSS and `ctr task checkpoint` time at 128 MiB, beside
/// containerd's own `io.containerd.runc.v2` in the same containerd and the
/// same run, rounds interleaved. Prints the figures (docs/containerd.md);
/// asserts only that both runtimes did every step.
#[test]
fn figures_beside_the_runc_v2_shim() {
    let _one = ONE_CONTAINERD.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("containerd-shim-runc-v2", "containerd");
    let tmp = tempfile::Builder::new().prefix("ums-test-cshim-").tempdir().unwrap();
    let c = containerd(tmp.path());
    let image = import_memctr(&c, tmp.path());
    let runtimes = ["io.containerd.runc.v2", RUNTIME];
    const ROUNDS: usize = 5;
    let mut start = [Vec::new(), Vec::new()];
    let mut rss = [Vec::new(), Vec::new()];
    let mut ckpt = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for (i, rt) in runtimes.iter().enumerate() {
            let id = unique_name("fig");
            let mib = if round < 3 { "128" } else { "0" };
            let mut cmd = c.ctr();
            cmd.args(["run", "--runtime", rt, &image, &id, "/bin/memctr", mib]);
            let t0 = Instant::now();
            let mut a = Attached::spawn(cmd);
            // The first output line comes before memctr touches its memory.
            a.log.wait_for_from(0, "env ", T).unwrap_or_else(|e| panic!("{rt}: {e}: {:?}", a.log.lines()));
            start[i].push(t0.elapsed().as_secs_f64() * 1e3);
            a.log.wait_for_from(0, "tick 2 ", T).unwrap();
            let shim = shim_of(&c, &id).unwrap_or_else(|| panic!("{rt}: no shim for {id}"));
            rss[i].push(rss_kib(shim) as f64 / 1024.0);
            if mib == "128" {
                let t1 = Instant::now();
                run(c.ctr().args(["task", "checkpoint", &id])).unwrap_or_else(|e| panic!("{rt}: {e:#}"));
                ckpt[i].push(t1.elapsed().as_secs_f64() * 1e3);
                let n = a.log.len();
                a.log.wait_for_from(n, "tick ", T).unwrap();
            }
            run(c.ctr().args(["task", "kill", "--signal", "SIGKILL", &id])).unwrap();
            assert_eq!(a.wait_exit(T), 137, "{rt}");
            run(c.ctr().args(["containers", "delete", &id])).unwrap();
        }
    }
    say!("containerd {} shim figures, median of {ROUNDS} runs (checkpoint: 3 runs, 128 MiB):", RUNTIME);
    say!("| runtime | start to first output (ms) | shim RSS (MiB) | ctr task checkpoint 128 MiB (ms) |");
    say!("|---|---|---|---|");
    for (i, rt) in runtimes.iter().enumerate() {
        say!(
            "| {rt} | {:.0} (min {:.0}, max {:.0}) | {:.1} | {:.0} (min {:.0}, max {:.0}) |",
            median(&mut start[i].clone()),
            start[i].iter().cloned().fold(f64::MAX, f64::min),
            start[i].iter().cloned().fold(0.0, f64::max),
            median(&mut rss[i].clone()),
            median(&mut ckpt[i].clone()),
            ckpt[i].iter().cloned().fold(f64::MAX, f64::min),
            ckpt[i].iter().cloned().fold(0.0, f64::max),
        );
    }
    assert!(rss.iter().all(|r| r.iter().all(|k| *k > 0.0)), "every shim's RSS was read");
    wait_gone("shim processes", Duration::from_secs(10), || c.shims());
}

/// A shell command line that prints the tty, then the terminal's size once
/// it is set: ctr resizes a terminal only after it started the process.
const WAIT_SIZE: &str = "/bin/sh -c 'tty; for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
     s=$(stty size 2>/dev/null) && [ \"$s\" != \"0 0\" ] && break; sleep 0.25; done; echo \"$s\"";

/// Runs `line` under `script` (a terminal for ctr), its stdin a pipe kept
/// open until it ends: an end of input would reach the workload's terminal.
fn in_script(line: &str) -> std::process::Output {
    let mut child = Command::new("timeout")
        .args(["60", "script", "-qec", line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script");
    let stdin = child.stdin.take();
    let out = child.wait_with_output().expect("script's output");
    drop(stdin);
    out
}

/// `ctr run -t` and `ctr task exec -t`: the process gets a terminal
/// (runc's console socket hands the shim its master), its output reaches
/// ctr and its exit status too. ctr runs under `script` (a terminal of
/// 33x77, then 20x50); the size the workload sees is printed, not asserted:
/// it reached the workload in some runs and not in others (see
/// docs/containerd.md).
#[test]
fn ctr_run_with_a_terminal() {
    let _one = ONE_CONTAINERD.lock().unwrap_or_else(|e| e.into_inner());
    require_tool("script", "util-linux");
    let tmp = tempfile::Builder::new().prefix("ums-test-cshim-").tempdir().unwrap();
    let c = containerd(tmp.path());
    let image = import_memctr(&c, tmp.path());
    let id = unique_name("tty");
    let line = format!(
        "stty rows 33 cols 77; ctr --address {} --namespace {} run -t --rm --runtime {RUNTIME} {image} {id} \
         {WAIT_SIZE}; exit 5'",
        c.socket.display(),
        c.namespace
    );
    let out = in_script(&line);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).replace('\r', "");
    say!("ctr run -t: {text:?}");
    assert!(text.lines().any(|l| l.contains("/dev/pts/")), "the workload's stdin is a terminal: {text}");
    assert_eq!(out.status.code(), Some(5), "the exit status reaches ctr through script: {text}");

    // `ctr task exec -t` into a running task: a terminal of its own.
    let id2 = unique_name("tty");
    run(c.ctr().args(["run", "-d", "--null-io", "--runtime", RUNTIME, &image, &id2])).unwrap();
    let line = format!(
        "stty rows 20 cols 50; ctr --address {} --namespace {} task exec -t --exec-id t1 {id2} \
         {WAIT_SIZE}; exit 4'",
        c.socket.display(),
        c.namespace
    );
    let out = in_script(&line);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).replace('\r', "");
    say!("ctr task exec -t: {text:?}");
    assert!(text.lines().any(|l| l.contains("/dev/pts/")), "the exec's stdin is a terminal: {text}");
    assert_eq!(out.status.code(), Some(4), "the exec's exit status: {text}");
    assert_eq!(task_state(&c, &id2).unwrap().0, "RUNNING");
    run(c.ctr().args(["task", "kill", "--signal", "SIGKILL", &id2])).unwrap();
    let deadline = Instant::now() + T;
    while task_state(&c, &id2).is_some_and(|(s, _)| s != "STOPPED") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    run(c.ctr().args(["task", "delete", &id2])).unwrap();
    run(c.ctr().args(["containers", "delete", &id2])).unwrap();
    wait_gone("shim processes", Duration::from_secs(10), || c.shims());
}
