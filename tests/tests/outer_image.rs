//! The outer image built and run by real container engines (`make test-image`).
//!
//! Builds the outer image from the Dockerfile with podman, on a Debian bookworm
//! base made with debootstrap (nothing can be pulled here), once with a
//! workload (memctr, 64 MiB, wrapped from an OCI tarball by
//! `image/wrap-workload.sh`) and once as the standby image. Then it runs one
//! outer container under podman and one under a containerd that the test
//! starts itself (`ctr run`), each in the network namespace of its own host
//! (`Host::pair`), and live-migrates the workload from the podman one to the
//! containerd one and back, with the migration tests' assertions: the counter
//! goes on with no gap and no repeat, the memory checksum and the written file
//! are the same.
//!
//! Isolation: podman and buildah use a private storage and engine dir under a
//! temp dir (CONTAINERS_STORAGE_CONF, CONTAINERS_CONF), containerd its own
//! root, state and socket there too; a system podman or containerd is never
//! touched. Everything is removed at the end, containerd stopped by its pid.
//! Only the debootstrap'ed base tarball is kept, in `<target>/ums-e2e/`, so a
//! second run saves the ~35 s of debootstrap.
//!
//! Needs image/install-image-deps.sh (podman, buildah, skopeo, containerd,
//! debootstrap); compiled only with `--features image-tests`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ums_e2e::*;

const T: Duration = Duration::from_secs(90);
const PEER_PORT: u16 = 7411;
/// Where the tests mount the peer keys in both outer containers: ums's
/// default (`--peer-keys`), as in deploy/kubernetes/.
const KEYS_IN_OUTER: &str = "/etc/ums/peer";
/// The ulimits this machine allows (no CAP_SYS_RESOURCE: docs/outer-image.md).
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"];

/// A line for the suite's log that shows even when the test passes (libtest
/// captures only the print macros, not writes to the stderr handle).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn require_image_tools() {
    for (tool, pkg) in [
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("skopeo", "skopeo"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("debootstrap", "debootstrap"),
        ("runc", "runc"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "`{tool}` not found on PATH: install {pkg} (bash image/install-image-deps.sh)");
    }
}

/// A private podman/buildah world: storage, engine temp dir, no systemd.
struct Podman {
    dir: PathBuf,
    storage_conf: PathBuf,
    containers_conf: PathBuf,
    images: Vec<String>,
}

impl Podman {
    fn new(dir: &Path) -> anyhow::Result<Podman> {
        std::fs::create_dir_all(dir)?;
        let storage_conf = dir.join("storage.conf");
        let containers_conf = dir.join("containers.conf");
        std::fs::write(
            &storage_conf,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/runroot\"\n",
                dir.display()
            ),
        )?;
        std::fs::write(
            &containers_conf,
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{0}/events.log\"\ntmp_dir = \"{0}/libpod-tmp\"\n\
                 runtime = \"runc\"\n",
                dir.display()
            ),
        )?;
        Ok(Podman { dir: dir.to_path_buf(), storage_conf, containers_conf, images: Vec::new() })
    }

    /// Sets the environment that points podman, buildah and skopeo here.
    fn env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_STORAGE_CONF", &self.storage_conf).env("CONTAINERS_CONF", &self.containers_conf);
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all", "--force", "--time", "0"]).output();
        for image in &self.images {
            let _ = self.cmd().args(["rmi", "--force", image]).output();
        }
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
        unmount_below(&self.dir);
    }
}

/// A containerd of our own: its own root, state, socket and namespace.
struct Containerd {
    dir: PathBuf,
    /// Whether /run/containerd existed before (the shim and ctr put their
    /// sockets, fifos and runc state there, per namespace, whatever the config).
    had_run_dir: bool,
    socket: PathBuf,
    child: Child,
    log: LineLog,
}

const CTR_NS: &str = "ums-test";

impl Containerd {
    fn start(dir: &Path) -> anyhow::Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let had_run_dir = Path::new("/run/containerd").exists();
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                dir.display(),
                socket.display()
            ),
        )?;
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start containerd")?;
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), "containerd".into());
        log.capture(child.stderr.take().unwrap(), "containerd".into());
        let c = Containerd { dir: dir.to_path_buf(), had_run_dir, socket, child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.socket.exists() && c.ctr().arg("version").output().map(|o| o.status.success()).unwrap_or(false) {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!("containerd did not come up:\n{}", c.log.lines().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["--namespace", CTR_NS]);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Shim processes serving this containerd (they outlive it if left).
    fn shims(&self) -> Vec<i32> {
        let needle = self.socket.to_string_lossy().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks, containers, images, then containerd itself (by pid).
        if let Ok(out) = self.ctr().args(["containers", "list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr().args(["task", "kill", "--signal", "SIGKILL", id]).output();
                let _ = self.ctr().args(["task", "delete", "--force", id]).output();
                let _ = self.ctr().args(["containers", "delete", id]).output();
            }
        }
        if let Ok(out) = self.ctr().args(["images", "list", "--quiet"]).output() {
            for image in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr().args(["images", "remove", "--sync", image]).output();
            }
        }
        let shims = self.shims();
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in shims {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        unmount_below(&self.dir);
        // Our namespace's runc state dir, and /run/containerd if we made it
        // (remove_dir: only ever empty directories).
        let _ = std::fs::remove_dir(format!("/run/containerd/runc/{CTR_NS}"));
        if !self.had_run_dir {
            for d in ["/run/containerd/runc", "/run/containerd/fifo", "/run/containerd/s", "/run/containerd"] {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// A Docker Engine of our own: `dockerd` with its own config, data root,
/// exec root (where it keeps its own containerd), pidfile and socket, no
/// bridge and no iptables rules; its containers get `--network none` and the
/// test links their network namespaces itself. It runs in the machine's
/// network namespace so that `docker build`'s RUN steps reach Debian's
/// mirror (`--network host`), as podman's builds do.
struct Docker {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
    log: LineLog,
    /// Paths dockerd 20.10 and its containerd use whatever the flags say
    /// (the trust key, the plugin and shim socket dirs) that did not exist
    /// before: removed at the end when empty, deepest first.
    made: Vec<PathBuf>,
}

/// What dockerd and its containerd create outside their roots.
const DOCKER_FIXED_PATHS: [&str; 9] = [
    "/etc/docker",
    "/etc/docker/key.json",
    "/run/docker",
    "/run/docker/plugins",
    "/run/containerd",
    "/run/containerd/s",
    "/run/containerd/fifo",
    "/run/containerd/runc",
    "/run/containerd/runc/moby",
];

/// Debian's docker.io client: newer clients (docker 23 and later) want the
/// buildx plugin for BuildKit builds, which Debian bookworm does not have.
const DOCKER_CLIENT: &str = "/usr/bin/docker";

impl Docker {
    fn start(dir: &Path) -> anyhow::Result<Docker> {
        std::fs::create_dir_all(dir.join("client"))?;
        let made: Vec<PathBuf> =
            DOCKER_FIXED_PATHS.iter().map(PathBuf::from).filter(|p| std::fs::symlink_metadata(p).is_err()).collect();
        let socket = dir.join("docker.sock");
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}\n")?;
        let mut child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"])
            .args(["--userland-proxy=false", "--exec-opt", "native.cgroupdriver=cgroupfs"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start dockerd")?;
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), "dockerd".into());
        log.capture(child.stderr.take().unwrap(), "dockerd".into());
        let d = Docker { dir: dir.to_path_buf(), socket, child, log, made };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.socket.exists() && d.cmd().arg("version").output().map(|o| o.status.success()).unwrap_or(false) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("dockerd did not come up:\n{}", d.log.lines().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets the environment that points the docker client here.
    fn env(&self, cmd: &mut Command) {
        cmd.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.join("client"))
            // build-outer.sh's `docker` is Debian's client (see DOCKER_CLIENT).
            .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(DOCKER_CLIENT);
        self.env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Ok(out) = self.cmd().args(["ps", "--all", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.cmd().args(["rm", "--force", id]).output();
            }
        }
        // dockerd stops the containerd it started, and that its shims.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Shims of ours left behind, found by our exec root in their command line.
        let needle = self.dir.join("exec").to_string_lossy().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if (cmdline.contains("containerd-shim") || cmdline.contains("containerd ")) && cmdline.contains(&needle) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        unmount_below(&self.dir);
        // Only what we made, only if empty (the key file is ours if we made it).
        for p in self.made.iter().rev() {
            if p.ends_with("key.json") {
                let _ = std::fs::remove_file(p);
            } else {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// What the outer container needs from Docker, short of `--privileged`
/// (which Docker cannot grant on a host whose root lacks a capability:
/// docs/outer-image.md): four capabilities beyond Docker's default set
/// (SYS_ADMIN: mounts and namespaces; NET_ADMIN: the nested container's
/// network namespace, routes, iptables, CRIU's TCP repair; SYS_PTRACE:
/// CRIU's dump; SYS_TIME: CRIU restores the workload's monotonic clock
/// offset into a time namespace), no seccomp or AppArmor profile, no masked
/// or read-only /proc paths, and the cgroup hierarchy read-write.
const DOCKER_OUTER: [&str; 16] = [
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "NET_ADMIN",
    "--cap-add",
    "SYS_PTRACE",
    "--cap-add",
    "SYS_TIME",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
    "--volume",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
];

/// `docker run` with `DOCKER_OUTER`, with no network: the caller links the
/// container's network namespace (`Host::attach`).
fn docker_run<'a>(d: &'a Docker, name: &str, image: &str, keys: Option<&Path>, args: &[&str]) -> EngineOuter<'a> {
    let mut cmd = d.cmd();
    cmd.args(["run", "--rm", "--name", name, "--hostname", name, "--network", "none"])
        .args(DOCKER_OUTER)
        .args(ULIMITS)
        .args(["--tmpfs", "/run:rw,mode=0755"]);
    if let Some(keys) = keys {
        cmd.arg("--volume").arg(format!("{}:{KEYS_IN_OUTER}:ro", keys.display()));
    }
    cmd.arg(image).args(args);
    spawn_outer(name, Engine::Docker(d), cmd)
}

/// Unmounts (lazily) everything mounted at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    for m in ums_e2e::outer::mounts_below(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}

/// An outer container run by a real engine, its stdout and stderr captured.
struct EngineOuter<'a> {
    name: String,
    engine: Engine<'a>,
    /// The attached `podman run` / `ctr run`.
    child: Child,
    log: LineLog,
}

enum Engine<'a> {
    Podman(&'a Podman),
    Containerd(&'a Containerd),
    Docker(&'a Docker),
}

impl EngineOuter<'_> {
    /// A command that runs `program args` inside the outer container.
    fn exec_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = match &self.engine {
            Engine::Podman(p) => {
                let mut c = p.cmd();
                c.args(["exec", &self.name, program]);
                c
            }
            Engine::Containerd(c) => {
                let mut cmd = c.ctr();
                let id = format!("x{:08x}", rand::random::<u32>());
                cmd.args(["task", "exec", "--exec-id", &id, &self.name, program]);
                cmd
            }
            Engine::Docker(d) => {
                let mut c = d.cmd();
                c.args(["exec", &self.name, program]);
                c
            }
        };
        cmd.args(args);
        cmd
    }

    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.exec_cmd(program, args);
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    fn ums_ok(&self, args: &[&str]) -> String {
        let out = self.exec("ums", args);
        assert!(
            out.status.success(),
            "ums {} in {} failed ({}): {}{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Host pid of the outer container's PID 1 (ums).
    fn pid1(&self) -> i32 {
        match &self.engine {
            Engine::Podman(p) => {
                let out = run(p.cmd().args(["inspect", "--format", "{{.State.Pid}}", &self.name])).unwrap();
                out.trim().parse().unwrap()
            }
            Engine::Docker(d) => {
                let out = run(d.cmd().args(["inspect", "--format", "{{.State.Pid}}", &self.name])).unwrap();
                out.trim().parse().unwrap()
            }
            Engine::Containerd(c) => {
                let out = run(c.ctr().args(["task", "list"])).unwrap();
                out.lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.first() == Some(&self.name.as_str())).then(|| f[1].parse().unwrap())
                    })
                    .unwrap_or_else(|| panic!("no task {} in {out}", self.name))
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lines()
    }

    fn wait_for_line(&self, pattern: &str) -> String {
        self.log
            .wait_for_from(0, pattern, T)
            .map(|(_, l)| l)
            .unwrap_or_else(|e| panic!("{}: {e:#}\n{}", self.name, self.lines().join("\n")))
    }
}

impl Drop for EngineOuter<'_> {
    fn drop(&mut self) {
        match &self.engine {
            Engine::Podman(p) => {
                let _ = p.cmd().args(["rm", "--force", "--time", "0", &self.name]).output();
            }
            Engine::Docker(d) => {
                let _ = d.cmd().args(["rm", "--force", &self.name]).output();
            }
            Engine::Containerd(c) => {
                let _ = c.ctr().args(["task", "kill", "--signal", "SIGKILL", &self.name]).output();
                std::thread::sleep(Duration::from_millis(200));
                let _ = c.ctr().args(["task", "delete", "--force", &self.name]).output();
                let _ = c.ctr().args(["containers", "delete", &self.name]).output();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_outer<'a>(name: &str, engine: Engine<'a>, mut cmd: Command) -> EngineOuter<'a> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let log = LineLog::new();
    log.capture(child.stdout.take().unwrap(), name.into());
    log.capture(child.stderr.take().unwrap(), name.into());
    EngineOuter { name: name.into(), engine, child, log }
}

/// `podman run --privileged` in `host`'s network namespace.
fn podman_run<'a>(
    p: &'a Podman,
    name: &str,
    host: &Host,
    image: &str,
    keys: Option<&Path>,
    args: &[&str],
) -> EngineOuter<'a> {
    let mut cmd = p.cmd();
    cmd.args(["run", "--rm", "--name", name, "--hostname", name, "--privileged", "--runtime", "/usr/sbin/runc"])
        .args(ULIMITS)
        .arg(format!("--network=ns:{}", host.netns_path().display()))
        .args(["--tmpfs", "/run:rw,mode=0755"]);
    if let Some(keys) = keys {
        cmd.arg("--volume").arg(format!("{}:{KEYS_IN_OUTER}:ro", keys.display()));
    }
    cmd.arg(image).args(args);
    spawn_outer(name, Engine::Podman(p), cmd)
}

/// `ctr run --privileged` in `host`'s network namespace. ctr replaces the
/// image's Entrypoint and Cmd when given a command, so `args` is the whole
/// command (`ums init ...`), or empty for the image's own.
fn ctr_run<'a>(
    c: &'a Containerd,
    name: &str,
    host: &Host,
    image: &str,
    keys: Option<&Path>,
    args: &[&str],
) -> EngineOuter<'a> {
    let mut cmd = c.ctr();
    cmd.args(["run", "--rm", "--privileged", "--runtime", "io.containerd.runc.v2"])
        .arg("--with-ns")
        .arg(format!("network:{}", host.netns_path().display()))
        .args(["--mount", "type=tmpfs,src=tmpfs,dst=/run,options=rw:nosuid:nodev:mode=0755"])
        // ctr's spec has no /sys/fs/cgroup at all (runc restore then fails:
        // "no cgroup mount found in mountinfo"); podman --privileged mounts it rw.
        .args(["--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=rw:nosuid:noexec:nodev"]);
    if let Some(keys) = keys {
        cmd.arg("--mount").arg(format!("type=bind,src={},dst={KEYS_IN_OUTER},options=rbind:ro", keys.display()));
    }
    cmd.arg(image).arg(name).args(args);
    spawn_outer(name, Engine::Containerd(c), cmd)
}

fn status(o: &EngineOuter) -> serde_json::Value {
    let out = o.ums_ok(&["status", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out).expect("status json")["result"].clone()
}

fn ticks(o: &EngineOuter, from: usize) -> Vec<u64> {
    o.lines()[from..].iter().filter_map(|l| parse_tick(l)).map(|t| t.n).collect()
}

fn last_tick(o: &EngineOuter) -> u64 {
    *ticks(o, 0).last().expect("some ticks")
}

/// As in tests/migration.rs: migrate, then the counter goes on at the
/// destination with no gap, no repeat and no restart; the source is a standby.
fn migrate(src: &EngineOuter, dst: &EngineOuter, addr: std::net::Ipv4Addr) -> serde_json::Value {
    let from_dst = dst.log.len();
    let out = src.exec("ums", &["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{addr}:{PEER_PORT}")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate {} -> {} failed: {text} {}\n--- {}:\n{}\n--- {}:\n{}",
        src.name,
        dst.name,
        String::from_utf8_lossy(&out.stderr),
        src.name,
        src.lines().join("\n"),
        dst.name,
        dst.lines().join("\n")
    );
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last_src = last_tick(src);
    dst.log
        .wait_for_from(from_dst, &format!("tick {} ", last_src + 3), T)
        .expect("the counter goes on at the destination");
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

fn checksum(o: &EngineOuter) -> String {
    let from = o.log.len();
    kill(Pid::from_raw(o.pid1()), Signal::SIGUSR1).unwrap();
    let (_, line) = o.log.wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

fn marker(o: &EngineOuter) -> String {
    let pid = status(o)["workload"]["pid"].as_i64().unwrap();
    let f = o.exec("cat", &[&format!("/proc/{pid}/root/data-marker")]);
    String::from_utf8_lossy(&f.stdout).trim().to_string()
}

/// Runs an image/ script with the private podman world; returns its last
/// stdout line (`image=... size_bytes=... build_seconds=...`).
fn image_script(p: &Podman, script: &str, args: &[&str]) -> String {
    image_script_with(|cmd| p.env(cmd), script, args)
}

/// `image_script`, with the environment `env` sets (an engine's).
fn image_script_with(env: impl FnOnce(&mut Command), script: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("image").join(script)).args(args);
    env(&mut cmd);
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    let t0 = Instant::now();
    let out = run(&mut cmd).unwrap_or_else(|e| panic!("{script} {args:?}: {e:#}"));
    let line = out.lines().last().unwrap_or_default().to_string();
    say!("{script}: {line} ({:.1} s)", t0.elapsed().as_secs_f64());
    line
}

fn field<'s>(line: &'s str, key: &str) -> &'s str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Peer authentication for `ums init`, whichever this ums has: a key set
/// made with `ums keys create DIR`, mounted at ums's default path (no flag),
/// as a Kubernetes Secret would be; or nothing for a ums without keys.
fn peer_keys(ums: &Path, tmp: &Path) -> Option<PathBuf> {
    let help = Command::new(ums).args(["init", "--help"]).output().expect("ums init --help");
    let help = String::from_utf8_lossy(&help.stdout);
    if !help.contains("--peer-keys") {
        return None;
    }
    assert!(help.contains(KEYS_IN_OUTER), "ums's default --peer-keys is no longer {KEYS_IN_OUTER}: {help}");
    let dir = tmp.join("peer-keys");
    run(Command::new(ums).args(["keys", "create"]).arg(&dir)).expect("ums keys create");
    Some(dir)
}

/// `ums-ready` (the Kubernetes readiness probe) in the outer container.
fn ready(o: &EngineOuter) -> bool {
    o.exec("ums-ready", &[]).status.success()
}

/// The workload image as an OCI tarball (what `skopeo copy ... oci-archive:`
/// or a registry export hands a user): the layout directory, tarred.
fn oci_tarball(layout: &Path, to: &Path) {
    run(Command::new("tar").arg("-C").arg(layout).arg("-cf").arg(to).arg(".")).unwrap();
}

#[test]
fn outer_image_migrates_between_podman_and_containerd() {
    require_root();
    require_image_tools();
    let ums = ums_bin().unwrap();
    let t_all = Instant::now();
    let tmp = tempfile::Builder::new().prefix("ums-test-image-").tempdir().unwrap();
    let podman = Podman::new(&tmp.path().join("podman")).unwrap();
    let tag = unique_name("outer").replace("ums-test-", "localhost/ums-test-");
    let (workload_tag, standby_tag) = (format!("{tag}:workload"), format!("{tag}:standby"));

    // The workload: memctr, 64 MiB, writes a file; as an OCI tarball.
    let memctr = build_workload(tmp.path());
    let img = ImageBuilder::new(&memctr)
        .cmd(&["64"])
        .env("MEMCTR_FILE", "/data-marker")
        .build(&tmp.path().join("layout"))
        .expect("build the workload image");
    let tarball = tmp.path().join("workload.oci.tar");
    oci_tarball(&img.layout, &tarball);

    // Build both outer images from the Dockerfile (the second one reuses every
    // layer but the last few).
    let base_tar = target_dir().join("ums-e2e").join("bookworm-base.tar");
    let base_tar = base_tar.to_str().unwrap();
    let ums_s = ums.to_str().unwrap();
    let standby_archive = tmp.path().join("standby.docker.tar");
    let built_w = image_script(
        &podman,
        "wrap-workload.sh",
        &[tarball.to_str().unwrap(), "--tag", &workload_tag, "--base-tar", base_tar, "--ums", ums_s],
    );
    let built_s = image_script(
        &podman,
        "wrap-workload.sh",
        &[
            "--standby",
            "--tag",
            &standby_tag,
            "--base-tar",
            base_tar,
            "--ums",
            ums_s,
            "--save",
            standby_archive.to_str().unwrap(),
        ],
    );
    let size: u64 = field(&built_w, "size_bytes").parse().unwrap();
    say!(
        "outer image: {:.1} MiB with the workload, {:.1} MiB standby; built in {} s and {} s",
        size as f64 / 1048576.0,
        field(&built_s, "size_bytes").parse::<f64>().unwrap() / 1048576.0,
        field(&built_w, "build_seconds"),
        field(&built_s, "build_seconds")
    );
    assert!(size < 400 << 20, "the outer image grew to {size} bytes");

    // The workload went in unchanged: the same manifest, by digest.
    let index = run(podman.cmd().args(["run", "--rm", "--runtime", "/usr/sbin/runc"]).args(ULIMITS).args([
        "--network=none",
        "--entrypoint",
        "cat",
        &workload_tag,
        "/var/lib/ums-image/index.json",
    ]))
    .unwrap();
    assert!(index.contains(&img.manifest_digest), "wrapped layout {index} lacks {}", img.manifest_digest);

    // containerd gets the standby image from a docker-archive.
    let containerd = Containerd::start(&tmp.path().join("containerd")).unwrap();
    run(containerd.ctr().args(["images", "import"]).arg(&standby_archive)).unwrap();
    let ctr_images = run(containerd.ctr().args(["images", "list", "--quiet"])).unwrap();
    let ctr_standby = ctr_images
        .lines()
        .find(|l| l.contains(&standby_tag.replace("localhost/", "")))
        .unwrap_or_else(|| panic!("{standby_tag} not in containerd's images: {ctr_images}"))
        .to_string();

    let keys = peer_keys(&ums, tmp.path());
    let (ha, hb) = Host::pair("img", None).unwrap();
    let a_name = unique_name("pod");
    let b_name = unique_name("ctr");
    // Each image as it is: its own Entrypoint (ums init) and environment.
    let a = podman_run(&podman, &a_name, &ha, &workload_tag, keys.as_deref(), &[]);
    let b = ctr_run(&containerd, &b_name, &hb, &ctr_standby, keys.as_deref(), &[]);
    a.wait_for_line("tick 5 ");
    b.wait_for_line("standby");
    assert_eq!(status(&b)["state"], "standby", "the standby image starts as a standby");
    assert!(ready(&a) && !ready(&b), "ums-ready: the workload's outer container only");
    let sum0 = a.lines().iter().find_map(|l| parse_sum(l)).unwrap();
    let file0 =
        a.lines().iter().find(|l| l.starts_with("file ")).unwrap().split_whitespace().nth(2).unwrap().to_string();

    let r1 = migrate(&a, &b, hb.addr());
    say!("podman -> containerd: {r1}");
    assert!(r1["bytes"].as_u64().unwrap() > 64 << 20, "{r1}");
    assert!(r1["blob_bytes"].as_u64().unwrap() > 100_000, "the standby image got the workload's layers: {r1}");
    assert_eq!(checksum(&b), sum0, "memory checksum after podman -> containerd");
    assert_eq!(marker(&b), file0, "file written before the migration");
    assert!(!ready(&a) && ready(&b), "ums-ready follows the workload");

    let r2 = migrate(&b, &a, ha.addr());
    say!("containerd -> podman: {r2}");
    assert_eq!(checksum(&a), sum0, "memory checksum after containerd -> podman");
    assert_eq!(marker(&a), file0, "file written before the first migration");

    drop(b);
    drop(a);
    say!("cross-engine round trip in {:.1} s in all", t_all.elapsed().as_secs_f64());
}

fn require_docker_tools() {
    for (tool, pkg) in
        [("dockerd", "docker.io"), ("podman", "podman"), ("skopeo", "skopeo"), ("debootstrap", "debootstrap")]
    {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "`{tool}` not found on PATH: install {pkg} (bash image/install-image-deps.sh)");
    }
    assert!(
        Path::new(DOCKER_CLIENT).is_file(),
        "{DOCKER_CLIENT} not found: install docker.io (bash image/install-image-deps.sh)"
    );
}

/// Docker Engine: `docker build` of the Dockerfile (on the debootstrap'ed
/// base, `docker import`ed into a dockerd the test starts), `docker run`
/// with the least-privileged flags (DOCKER_OUTER, not `--privileged`), and a
/// live migration Docker -> podman -> Docker of a web workload whose port is
/// published: a client on a third host asks both outer containers' published
/// ports before, between and after the moves, and the server's request
/// counter (in its memory) goes on across both, in the same process.
#[test]
fn outer_image_migrates_between_docker_and_podman() {
    require_root();
    require_docker_tools();
    let ums = ums_bin().unwrap();
    let t_all = Instant::now();
    let tmp = tempfile::Builder::new().prefix("ums-test-docker-").tempdir().unwrap();
    let podman = Podman::new(&tmp.path().join("podman")).unwrap();
    let docker = Docker::start(&tmp.path().join("docker")).unwrap();
    let tag = unique_name("dk").replace("ums-test-", "localhost/ums-test-");
    let workload_tag = format!("{tag}:workload");

    // websrv (HTTP on 8080, exposed by the image, so ums publishes it on the
    // outer container's addresses), with a file written into its image.
    let memctr = build_workload(tmp.path());
    let websrv = std::fs::read(build_websrv(tmp.path())).unwrap();
    let img = ImageBuilder::new(&memctr)
        .file("bin/websrv", websrv, 0o755)
        .file("data-marker", b"written-by-the-image".to_vec(), 0o644)
        .entrypoint(&["/bin/websrv"])
        .cmd(&["8080", "5353"])
        .expose("8080/tcp")
        .build(&tmp.path().join("layout"))
        .expect("build the web workload image");
    let tarball = tmp.path().join("workload.oci.tar");
    oci_tarball(&img.layout, &tarball);

    // docker build, from the Dockerfile, in our dockerd.
    let base_tar = target_dir().join("ums-e2e").join("bookworm-base.tar");
    let built = image_script_with(
        |cmd| docker.env(cmd),
        "wrap-workload.sh",
        &[
            tarball.to_str().unwrap(),
            "--engine",
            "docker",
            "--tag",
            &workload_tag,
            "--base-tar",
            base_tar.to_str().unwrap(),
            "--ums",
            ums.to_str().unwrap(),
        ],
    );
    let size: u64 = field(&built, "size_bytes").parse().unwrap();
    say!("docker build: {:.1} MiB in {} s", size as f64 / 1048576.0, field(&built, "build_seconds"));
    assert!(size < 400 << 20, "the outer image grew to {size} bytes");

    // `--privileged` cannot start a container on a host whose root lacks a
    // capability Docker knows (this machine's lacks CAP_SYS_RESOURCE); when
    // it can, the documented simple form works as well. Either way: say so.
    let privileged = d_output(docker.cmd().args(["run", "--rm", "--network", "none", "--privileged"]).args([
        "--entrypoint",
        "true",
        &workload_tag,
    ]));
    say!("docker run --privileged here: {privileged}");

    // The same image for podman, through a docker-archive.
    let archive = tmp.path().join("workload.docker.tar");
    run(docker.cmd().args(["save", "-o"]).arg(&archive).arg(&workload_tag)).unwrap();
    run(podman.cmd().args(["load", "-i"]).arg(&archive)).unwrap();

    let keys = peer_keys(&ums, tmp.path());
    let a_name = unique_name("dock");
    let b_name = unique_name("pod");
    let hb = Host::isolated("dk-b").unwrap();
    let a = docker_run(&docker, &a_name, &workload_tag, keys.as_deref(), &[]);
    a.wait_for_line("ums ready");
    let ha = Host::attach("dk-a", a.pid1()).unwrap();
    let (a_addr, b_addr) = ha.link(&hb).unwrap();
    // The client's host, linked to both outer containers.
    let hc = Host::isolated("dk-c").unwrap();
    let (_, a_for_c) = hc.link(&ha).unwrap();
    let (_, b_for_c) = hc.link(&hb).unwrap();
    let b = podman_run(&podman, &b_name, &hb, &workload_tag, keys.as_deref(), &["--standby"]);
    a.wait_for_line("listening");
    b.wait_for_line("standby");
    assert!(ready(&a) && !ready(&b), "ums-ready: the workload's outer container only");
    assert_eq!(web_file(&a), "written-by-the-image");

    let at_a = SocketAddr::from((a_for_c, 8080));
    let at_b = SocketAddr::from((b_for_c, 8080));
    let (n0, token) = hits(&hc, at_a, "docker's published port before the move");
    let mut last = n0;
    let mut next = |addr: SocketAddr, what: &str| {
        let (n, t) = hits(&hc, addr, what);
        assert_eq!(t, token, "{what}: another process answered (the server restarted)");
        assert!(n > last, "{what}: the request counter went from {last} to {n}");
        last = n;
    };

    let r1 = migrate_web(&a, &b, b_addr);
    say!("docker -> podman: {r1}");
    assert!(r1["bytes"].as_u64().unwrap() > 1 << 20, "{r1}");
    next(at_b, "podman's published port after docker -> podman");
    next(at_a, "docker's published port (forwarded to podman) after docker -> podman");
    assert_eq!(web_file(&b), "written-by-the-image", "the image's file after docker -> podman");
    assert!(!ready(&a) && ready(&b), "ums-ready follows the workload");

    let r2 = migrate_web(&b, &a, a_addr);
    say!("podman -> docker: {r2}");
    next(at_a, "docker's published port after podman -> docker");
    next(at_b, "podman's published port (forwarded to docker) after podman -> docker");
    assert_eq!(web_file(&a), "written-by-the-image", "the image's file after podman -> docker");
    assert!(ready(&a) && !ready(&b));

    drop(b);
    drop(a);
    drop(hc);
    drop(ha);
    say!("docker round trip in {:.1} s in all", t_all.elapsed().as_secs_f64());
}

/// `ums migrate --json` from `src` to `dst`; then `src` is a standby and
/// `dst` runs the workload.
fn migrate_web(src: &EngineOuter, dst: &EngineOuter, addr: std::net::Ipv4Addr) -> serde_json::Value {
    let out = src.exec("ums", &["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{addr}:{PEER_PORT}")]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "migrate {} -> {} failed: {text} {}\n--- {}:\n{}\n--- {}:\n{}",
        src.name,
        dst.name,
        String::from_utf8_lossy(&out.stderr),
        src.name,
        src.lines().join("\n"),
        dst.name,
        dst.lines().join("\n")
    );
    assert_eq!(status(src)["state"], "standby");
    assert_eq!(status(dst)["state"], "running");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone()
}

/// One HTTP/1.0 request to websrv from `client`'s namespace: (its request
/// count, its process's start token). Retries for a few seconds (a
/// connection refused while a moved port comes up).
fn hits(client: &Host, addr: SocketAddr, what: &str) -> (u64, String) {
    let body = client
        .spawn_in(move || {
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                match http_get(addr) {
                    Ok(b) => return Ok(b),
                    Err(e) if Instant::now() > until => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what} ({addr}): {e}"));
    // "hits <n> pid-start <token>"
    let f: Vec<&str> = body.split_whitespace().collect();
    assert!(f.len() == 4 && f[0] == "hits" && f[2] == "pid-start", "{what}: unexpected answer {body:?}");
    (f[1].parse().unwrap(), f[3].to_string())
}

fn http_get(addr: SocketAddr) -> Result<String, String> {
    use std::io::Read;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("read: {e}"))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
        _ => Err(format!("bad response {resp:?}")),
    }
}

/// The image's file, read through the workload's root.
fn web_file(o: &EngineOuter) -> String {
    let pid = status(o)["workload"]["pid"].as_i64().unwrap();
    let f = o.exec("cat", &[&format!("/proc/{pid}/root/data-marker")]);
    String::from_utf8_lossy(&f.stdout).trim().to_string()
}

/// A command's outcome in one line: `ok`, or its exit status and last line.
fn d_output(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) if o.status.success() => "ok".into(),
        Ok(o) => format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
        ),
        Err(e) => format!("cannot run: {e}"),
    }
}

/// kubernetes-validate from the venv image/install-image-deps.sh makes.
fn kubernetes_validate() -> PathBuf {
    let kv = target_dir().join("ums-tools/kubernetes-validate/bin/kubernetes-validate");
    assert!(kv.is_file(), "{} is missing: run bash image/install-image-deps.sh", kv.display());
    kv
}

/// Every document of the YAML files, as JSON (PyYAML, which kubernetes-validate brings).
fn yaml_docs(kv: &Path, files: &[PathBuf]) -> Vec<serde_json::Value> {
    let python = kv.parent().unwrap().join("python");
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import json, sys, yaml\n\
         print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
    ])
    .args(files);
    serde_json::from_str(&run(&mut cmd).unwrap()).unwrap()
}

/// deploy/kubernetes/: every manifest validates strictly (no unknown field)
/// against the Kubernetes API schemas of the oldest and the newest version
/// the validator knows, and gives the outer container what it needs.
#[test]
fn kubernetes_manifests_validate_and_give_the_outer_container_what_it_needs() {
    let kv = kubernetes_validate();
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = Vec::new();
    for d in [dir.clone(), dir.join("secret")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for version in ["1.25.0", "1.37.0"] {
        let mut cmd = Command::new(&kv);
        cmd.args(["--strict", "--kubernetes-version", version]).args(&files);
        let out = run(&mut cmd).unwrap_or_else(|e| panic!("kubernetes-validate {version}: {e:#}"));
        println!("{out}");
    }

    let docs = yaml_docs(&kv, &files);
    let by_kind = |kind: &str, name: &str| -> serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
            .clone()
    };
    // The key set's file names are the ones `ums keys create` writes.
    let ums = ums_bin().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    if let Some(keys) = peer_keys(&ums, tmp.path()) {
        let mut made: Vec<String> =
            std::fs::read_dir(&keys).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        made.sort();
        let secret = by_kind("Secret", "ums-peer-keys");
        let mut named: Vec<String> = secret["stringData"].as_object().unwrap().keys().cloned().collect();
        named.sort();
        assert_eq!(named, made, "the Secret's keys are what `ums keys create` makes");
    }
    let group_label = "app.kubernetes.io/part-of";
    for (kind, name, standby) in [("StatefulSet", "ums-app", false), ("Deployment", "ums-standby", true)] {
        let w = by_kind(kind, name);
        let pod = &w["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"][group_label], "ums-app", "{name}: in the group the Services select");
        let c = &pod["spec"]["containers"][0];
        let image = c["image"].as_str().unwrap();
        assert!(image.contains("ums-outer"), "{name} runs the outer image, not {image}");
        assert_eq!(c["securityContext"]["privileged"], true, "{name}: nesting needs a privileged container");
        assert_eq!(c["securityContext"]["seccompProfile"]["type"], "Unconfined");
        assert!(c["ports"].as_array().unwrap().iter().any(|p| p["containerPort"] == PEER_PORT), "{name}: peer port");
        assert_eq!(c["readinessProbe"]["exec"]["command"][0], "ums-ready", "{name}: readiness follows the workload");
        assert_eq!(c["livenessProbe"]["exec"]["command"], serde_json::json!(["ums", "status"]));
        let mounts = c["volumeMounts"].as_array().unwrap();
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        let volume_at = |path: &str| -> serde_json::Value {
            let m =
                mounts.iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("{name}: nothing at {path}"));
            volumes.iter().find(|v| v["name"] == m["name"]).unwrap().clone()
        };
        for tmpfs in ["/run", "/var/lib/ums"] {
            assert_eq!(volume_at(tmpfs)["emptyDir"]["medium"], "Memory", "{name}: tmpfs at {tmpfs}");
        }
        assert_eq!(volume_at(KEYS_IN_OUTER)["secret"]["secretName"], "ums-peer-keys", "{name}: peer keys");
        let env_standby = c["env"]
            .as_array()
            .map(|e| e.iter().any(|v| v["name"] == "UMS_STANDBY" && v["value"] == "true"))
            .unwrap_or(false);
        assert_eq!(env_standby, standby, "{name}: UMS_STANDBY");
        if kind == "StatefulSet" {
            assert_eq!(w["spec"]["replicas"], 1, "the workload must never run twice");
            assert_eq!(w["spec"]["serviceName"], "ums-peers");
            // Evacuation on SIGTERM, to the standbys only, within a grace
            // period that covers the attempts, one migration and the stop.
            let env = |k: &str| -> String {
                let e = c["env"].as_array().unwrap().iter().find(|v| v["name"] == k);
                e.unwrap_or_else(|| panic!("{name}: no {k}"))["value"].as_str().unwrap().to_string()
            };
            let to = env("UMS_EVACUATE_TO");
            let svc = by_kind("Service", to.split(':').next().unwrap());
            assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/name"], "ums-standby", "{to}: the standbys only");
            assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
            let secs = |k: &str| env(k).trim_end_matches('s').parse::<u64>().unwrap();
            let grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
            assert!(
                grace >= secs("UMS_EVACUATE_WITHIN") + secs("UMS_STOP_GRACE") + 30,
                "{name}: terminationGracePeriodSeconds {grace} leaves no time for the migration"
            );
        }
    }
    let peers = by_kind("Service", "ums-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], true, "standbys are never ready, yet must be reachable");
    assert_eq!(peers["spec"]["ports"][0]["port"], PEER_PORT);
    for svc in ["ums-peers", "ums-app"] {
        assert_eq!(by_kind("Service", svc)["spec"]["selector"][group_label], "ums-app", "{svc} selects the group");
    }
    let probe = workspace_root().join("rootfs/usr/local/bin/ums-ready");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&probe).unwrap().permissions());
    assert!(mode & 0o111 != 0, "{} is not executable", probe.display());
}
