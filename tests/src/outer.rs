//! A simulated outer container: `tests/outer.sh` run from Rust.
//!
//! The outer image's real home is an orchestrator, none of which runs here, so
//! the tests build the same layout with namespaces (see the header of
//! `tests/outer.sh`): `ums init ARGS` runs as PID 1 of its own pid, mount, uts
//! and ipc namespaces, in a [`crate::Host`]'s network namespace or a fresh one.
//! [`Outer`] holds the host pid of that PID 1, captures its stdout and stderr
//! line by line, runs the `ums` CLI inside with `nsenter`, and on drop kills
//! what it started (by pid) and removes its root directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::output::LineLog;

/// Where outer.sh puts the ums binary inside the outer container.
pub const UMS_IN_OUTER: &str = "/opt/ums/ums";
/// Where outer.sh mounts the workload's OCI image layout (`UMS_LAYOUT_DIR`).
pub const LAYOUT_IN_OUTER: &str = "/var/lib/ums-image";
/// PATH inside the outer container.
pub const OUTER_PATH: &str = "/opt/ums:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where outer.sh mounts the peer key set (`--peer-keys`), as a Secret would be.
pub const PEER_KEYS_IN_OUTER: &str = "/etc/ums/peer";
/// How long [`OuterBuilder::start`] waits for the root to be in place.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for an outer container; [`OuterBuilder::start`] launches it.
#[derive(Clone, Debug)]
pub struct OuterBuilder {
    name: String,
    netns: Option<PathBuf>,
    layout: Option<PathBuf>,
    ums: Option<PathBuf>,
    exec: Option<String>,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    peer_keys: PeerKeys,
    cgroup: Option<Option<u64>>,
    state_size: Option<String>,
    clock_offset: Option<u64>,
}

/// Which peer key set an outer container gets at [`PEER_KEYS_IN_OUTER`].
#[derive(Clone, Debug)]
pub enum PeerKeys {
    /// The test process's shared group ([`default_peer_keys`]): every outer
    /// of a test talks mutual TLS with every other.
    Default,
    /// This key set directory.
    Dir(PathBuf),
    /// None, and `UMS_INSECURE_PEER=1`: plain TCP.
    Insecure,
    /// None at all (ums init must then refuse to start).
    Absent,
}

/// The key set shared by this test run's outer containers, made once with
/// `ums keys create` under the target dir (reused while it stays valid).
pub fn default_peer_keys() -> anyhow::Result<PathBuf> {
    static KEYS: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| make_peer_keys(&crate::target_dir().join("ums-e2e-peer-keys")).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn make_peer_keys(dir: &Path) -> anyhow::Result<PathBuf> {
    let ums = crate::ums_bin()?;
    let valid = |d: &Path| {
        Command::new(&ums).args(["keys", "check"]).arg(d).output().map(|o| o.status.success()).unwrap_or(false)
    };
    if valid(dir) {
        return Ok(dir.to_path_buf());
    }
    // Made aside and renamed into place: concurrent test processes agree.
    let tmp = dir.with_file_name(crate::unique_name("peer-keys"));
    crate::run(Command::new(&ums).args(["keys", "create"]).arg(&tmp))?;
    if dir.exists() && !valid(dir) {
        let _ = std::fs::remove_dir_all(dir); // stale: from an older ums
    }
    if std::fs::rename(&tmp, dir).is_err() || !valid(dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow::ensure!(valid(dir), "cannot make the test peer key set in {}", dir.display());
    }
    Ok(dir.to_path_buf())
}

/// A new group's key set in `dir` (`ums keys create DIR [--names ...]`);
/// returns the key set directories.
pub fn create_peer_keys(dir: &Path, names: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = Command::new(crate::ums_bin()?);
    cmd.args(["keys", "create"]).arg(dir);
    if !names.is_empty() {
        cmd.arg("--names").arg(names.join(","));
        crate::run(&mut cmd)?;
        return Ok(names.iter().map(|n| dir.join(n)).collect());
    }
    crate::run(&mut cmd)?;
    Ok(vec![dir.to_path_buf()])
}

impl OuterBuilder {
    /// Joins this network namespace (default: a fresh one with only loopback).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Joins the network namespace of `host`.
    pub fn host(self, host: &crate::Host) -> Self {
        self.netns(host.netns_path())
    }

    /// Mounts this OCI image layout at [`LAYOUT_IN_OUTER`], read-only.
    pub fn layout(mut self, layout: impl Into<PathBuf>) -> Self {
        self.layout = Some(layout.into());
        self
    }

    /// The ums binary (default: [`crate::ums_bin`]).
    pub fn ums(mut self, path: impl Into<PathBuf>) -> Self {
        self.ums = Some(path.into());
        self
    }

    /// Mounts this key set at [`PEER_KEYS_IN_OUTER`] instead of the default one.
    pub fn peer_keys(mut self, dir: impl Into<PathBuf>) -> Self {
        self.peer_keys = PeerKeys::Dir(dir.into());
        self
    }

    /// No key set, and `UMS_INSECURE_PEER=1`: plain TCP to peers.
    pub fn insecure_peer(mut self) -> Self {
        self.peer_keys = PeerKeys::Insecure;
        self
    }

    /// No key set and no opt-out: `ums init` must refuse to start.
    pub fn no_peer_keys(mut self) -> Self {
        self.peer_keys = PeerKeys::Absent;
        self
    }

    /// Runs `program ARGS` as PID 1 instead of `ums init ARGS`
    /// (`UMS_OUTER_EXEC`, for testing outer.sh itself).
    pub fn exec_override(mut self, program: &str) -> Self {
        self.exec = Some(program.into());
        self
    }

    /// Arguments after `ums init` (or after the override program).
    pub fn args<S: Into<OsString> + Clone>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().cloned().map(Into::into));
        self
    }

    /// An environment variable for PID 1. outer.sh passes on only `UMS_*`,
    /// `RUST_LOG` and `RUST_BACKTRACE`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the outer container in a cgroup of its own, as an orchestrator
    /// would ([`crate::OuterCgroup`]), with this memory limit if any.
    pub fn cgroup(mut self, memory_limit: Option<u64>) -> Self {
        self.cgroup = Some(memory_limit);
        self
    }

    /// The size of the tmpfs on the state dir (/var/lib/ums: layers,
    /// bundle, images dirs), as `mount -o size=` spells it (`48m`).
    /// A time namespace for the outer container whose CLOCK_MONOTONIC and
    /// CLOCK_BOOTTIME run `secs` ahead of the host's (a host booted earlier).
    pub fn clock_offset(mut self, secs: u64) -> Self {
        self.clock_offset = Some(secs);
        self
    }

    pub fn state_size(mut self, size: &str) -> Self {
        self.state_size = Some(size.into());
        self
    }

    /// Launches outer.sh and returns once PID 1 is about to exec (its root,
    /// mounts and hostname are in place).
    pub fn start(self) -> anyhow::Result<Outer> {
        crate::require_root();
        for tool in ["unshare", "nsenter", "pivot_root"] {
            crate::require_tool(tool, "util-linux");
        }
        let mut cmd = Command::new("bash");
        cmd.arg(crate::outer_script());
        let root = std::env::temp_dir().join(crate::unique_name(&format!("outer-{}", self.name)));
        cmd.arg("--name").arg(&self.name).arg("--root").arg(&root);
        if let Some(netns) = &self.netns {
            cmd.arg("--netns").arg(netns);
        }
        if let Some(layout) = &self.layout {
            cmd.arg("--layout").arg(layout);
        }
        match &self.peer_keys {
            PeerKeys::Default if self.exec.is_none() => {
                cmd.arg("--peer-keys").arg(default_peer_keys()?);
            }
            PeerKeys::Dir(dir) => {
                cmd.arg("--peer-keys").arg(dir);
            }
            PeerKeys::Insecure => {
                cmd.env("UMS_INSECURE_PEER", "1");
            }
            PeerKeys::Default | PeerKeys::Absent => {}
        }
        if !matches!(self.peer_keys, PeerKeys::Insecure) {
            cmd.env_remove("UMS_INSECURE_PEER");
        }
        cmd.env_remove("UMS_PEER_KEYS");
        match &self.exec {
            Some(program) => {
                cmd.env("UMS_OUTER_EXEC", program);
                if let Some(ums) = &self.ums {
                    cmd.arg("--ums").arg(ums);
                }
            }
            None => {
                let ums = match &self.ums {
                    Some(p) => p.clone(),
                    None => crate::ums_bin()?,
                };
                anyhow::ensure!(
                    ums.is_file(),
                    "ums binary {} does not exist: build ums first: cargo build -p ums",
                    ums.display()
                );
                cmd.arg("--ums").arg(ums);
                cmd.env_remove("UMS_OUTER_EXEC");
            }
        }
        let cgroup = match self.cgroup {
            Some(limit) => Some(crate::OuterCgroup::create(&crate::unique_name(&self.name), limit)?),
            None => None,
        };
        for f in cgroup.iter().flat_map(|c| c.procs_files()) {
            cmd.arg("--cgroup-procs").arg(f);
        }
        if let Some(size) = &self.state_size {
            cmd.arg("--state-size").arg(size);
        }
        if let Some(secs) = self.clock_offset {
            cmd.arg("--clock-offset").arg(secs.to_string());
        }
        cmd.arg("--").args(&self.args);
        cmd.env_remove("UMS_OUTER_STAGE");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());

        let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), self.name.clone());
        log.capture(child.stderr.take().unwrap(), self.name.clone());
        let mut outer = Outer {
            name: self.name,
            root,
            unshare_pid: child.id() as i32,
            child,
            pid1: None,
            status: None,
            log,
            cgroup,
        };
        outer.pid1 = Some(outer.find_pid1()?);
        outer
            .log
            .wait_for_from(0, "ums-outer: exec", START_TIMEOUT)
            .with_context(|| format!("outer container {} did not start", outer.name))?;
        Ok(outer)
    }
}

/// A running simulated outer container. See the module docs.
pub struct Outer {
    name: String,
    root: PathBuf,
    /// The process we spawned: bash running outer.sh, then (same pid) unshare.
    child: Child,
    unshare_pid: i32,
    pid1: Option<i32>,
    status: Option<ExitStatus>,
    log: LineLog,
    /// Its own cgroup ([`OuterBuilder::cgroup`]), removed after it ends.
    cgroup: Option<crate::OuterCgroup>,
}

impl Outer {
    /// An outer container named `name` (its hostname); set options, then
    /// [`OuterBuilder::start`].
    pub fn builder(name: &str) -> OuterBuilder {
        OuterBuilder {
            name: name.into(),
            netns: None,
            layout: None,
            ums: None,
            exec: None,
            args: Vec::new(),
            env: Vec::new(),
            peer_keys: PeerKeys::Default,
            cgroup: None,
            state_size: None,
            clock_offset: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its own cgroup, when started with [`OuterBuilder::cgroup`].
    pub fn cgroup(&self) -> Option<&crate::OuterCgroup> {
        self.cgroup.as_ref()
    }

    /// The host directory holding the outer's root (mount points only: the
    /// mounts themselves exist only inside the outer's mount namespace).
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// Host pid of PID 1 (ums) of the outer container.
    pub fn pid1(&self) -> i32 {
        self.pid1.expect("pid1 is known once started")
    }

    /// Sends `sig` to PID 1. The kernel delivers to a pid namespace's init only
    /// signals it installed a handler for (SIGKILL always).
    pub fn signal(&mut self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.live_pid1().with_context(|| format!("outer container {} has exited", self.name))?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("kill -{sig} {pid}"))?;
        Ok(())
    }

    /// The shared log of PID 1's stdout and stderr lines (outer.sh's own
    /// lines start with `ums-outer:`).
    pub fn log(&self) -> &LineLog {
        &self.log
    }

    /// All output lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// Waits for the first line (from the start) containing `pattern`.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> anyhow::Result<String> {
        self.log
            .wait_for_from(0, pattern, timeout)
            .map(|(_, line)| line)
            .with_context(|| format!("outer container {}", self.name))
    }

    /// Waits for a line containing `pattern` at index `from` or later; returns
    /// its index and text. Use `log().len()` before an action as `from`.
    pub fn wait_for_line_from(&self, from: usize, pattern: &str, timeout: Duration) -> anyhow::Result<(usize, String)> {
        self.log.wait_for_from(from, pattern, timeout).with_context(|| format!("outer container {}", self.name))
    }

    /// Waits for the outer container to exit (PID 1 exit status, as passed on
    /// by unshare: an exit code, or 128+N for a signal).
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("outer container {} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the outer container has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// A command that runs `program` inside the outer container (all its
    /// namespaces, its time namespace too, and its root), with the outer's
    /// PATH and no other env.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid1().to_string())
            .args(["-m", "-p", "-n", "-u", "-i", "-T", "-r", "-w", "--"])
            .arg(program);
        cmd.env_clear().env("PATH", OUTER_PATH).env("HOME", "/root");
        for key in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `program args` inside the outer container and collects its output.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        cmd.output().with_context(|| format!("cannot run {cmd:?}"))
    }

    /// Runs the ums CLI inside the outer container (`/opt/ums/ums ARGS`; its
    /// control socket is /run/ums/ums.sock in there).
    pub fn ums(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.exec(UMS_IN_OUTER, args)
    }

    /// [`Outer::ums`], failing unless it exits 0; returns its stdout.
    pub fn ums_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ums(args)?;
        if !out.status.success() {
            bail!(
                "ums {} in {} failed ({}): {}{}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the outer container with SIGKILL, as an orchestrator kills a
    /// container, and waits for it to end. A workload frozen by the cgroup
    /// v1 freezer (a migration's source between freeze and end) cannot die
    /// while frozen, and holds the outer's pid namespace (and this wait)
    /// forever: like an orchestrator's clean-up must, this thaws the
    /// freezer cgroups of the outer's processes after the kill.
    pub fn kill(&mut self) {
        let Some(pid1) = self.live_pid1() else { return };
        let freezers = freezer_dirs(&descendants(pid1));
        let _ = kill(Pid::from_raw(pid1), Signal::SIGKILL);
        // Once PID 1 is dead (a zombie until its namespace is empty), the
        // kernel has sent SIGKILL to everything else in it: thawed, it dies.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) && !is_dead(pid1) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for f in &freezers {
            let _ = std::fs::write(f.join("freezer.state"), "THAWED");
        }
        let _ = self.wait(Duration::from_secs(10));
    }

    /// PID 1's host pid while it is certainly still ours: unshare (our
    /// unreaped child) is alive and is its parent.
    fn live_pid1(&mut self) -> Option<i32> {
        let pid1 = self.pid1?;
        if self.try_wait().ok()?.is_some() {
            return None;
        }
        (parent_pid(pid1) == Some(self.unshare_pid)).then_some(pid1)
    }

    /// Finds the child of unshare that is PID 1 of the new pid namespace.
    fn find_pid1(&mut self) -> anyhow::Result<i32> {
        let deadline = Instant::now() + START_TIMEOUT;
        let p = self.unshare_pid;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "outer.sh for {} exited ({status}) before PID 1 started:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if ns_pids(child).as_deref().map(|ns| ns.len() == 2 && ns[1] == 1) == Some(true) {
                    return Ok(child);
                }
            }
            if Instant::now() >= deadline {
                bail!("no PID 1 under unshare (pid {p}) after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Host pids of every process below `pid` (not `pid` itself).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
        i += 1;
    }
    out.remove(0);
    out
}

/// Is `pid` gone or a zombie?
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) == Some("Z"),
    }
}

/// The cgroup v1 freezer directories of `pids` (none on cgroup v2, whose
/// freezer lets SIGKILL through).
fn freezer_dirs(pids: &[i32]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok())
        .filter_map(|t| {
            t.lines().find_map(|l| {
                let mut it = l.splitn(3, ':');
                let (_, c, path) = (it.next()?, it.next()?, it.next()?);
                (c == "freezer").then(|| Path::new("/sys/fs/cgroup/freezer").join(path.trim_start_matches('/')))
            })
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The `NSpid:` line of /proc/PID/status: the pid in each nested pid ns.
fn ns_pids(pid: i32) -> Option<Vec<i32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line["NSpid:".len()..].split_whitespace().map(|s| s.parse().ok()).collect()
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the ppid follows the last ')'.
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Mount points at or below `dir` in our mount namespace, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

impl Drop for Outer {
    fn drop(&mut self) {
        // Kill PID 1 (the kernel then kills its whole pid namespace) and let
        // unshare reap it and exit; kill unshare only if it does not.
        self.kill();
        if self.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.unshare_pid), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        // Its cgroup, once its processes are gone (runc removes an ended
        // container's cgroup and everything below it the same way).
        drop(self.cgroup.take());
        // The mounts live in the outer's private mount namespace, gone with
        // its processes; anything found here leaked, so detach it first.
        for m in mounts_below(&self.root) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if mounts_below(&self.root).is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                eprintln!("warning: cannot remove {}: {e}", self.root.display());
            }
        } else {
            eprintln!("warning: mounts remain below {}; not removing it", self.root.display());
        }
    }
}

/// `ums status --json` in `o`: the reply's `result`. Panics with ums's
/// output when the command fails (a test helper).
pub fn status(o: &Outer) -> serde_json::Value {
    let out = o.ums_ok(&["status", "--json"]).expect("ums status");
    serde_json::from_str::<serde_json::Value>(&out).expect("status json")["result"].clone()
}

/// The counter values of memctr's `tick` lines from output line `from` on.
pub fn ticks(o: &Outer, from: usize) -> Vec<u64> {
    o.lines().get(from..).unwrap_or(&[]).iter().filter_map(|l| crate::parse_tick(l)).map(|t| t.n).collect()
}

/// The last tick printed so far by `o`.
pub fn last_tick(o: &Outer) -> u64 {
    *ticks(o, 0).last().expect("some ticks")
}
