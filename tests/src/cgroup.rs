//! The cgroup an orchestrator gives an outer container, made by the tests.
//!
//! Kubernetes, podman and Docker put every container in a cgroup of its own
//! and set its limits there. [`OuterCgroup`] does the same for a simulated
//! outer container: a cgroup named `ums-test-...` below the test process's
//! own cgroup, in every hierarchy of this host (cgroup v1, hybrid or v2), with
//! an optional memory limit. `tests/outer.sh --cgroup-procs FILE` moves the
//! outer container into it before its PID 1 starts. Removed (children first,
//! as runc removes a container's cgroup) on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// One hierarchy's cgroup of the outer container.
#[derive(Debug, Clone)]
pub struct Dir {
    /// The hierarchy's controllers as `/proc/PID/cgroup` names them
    /// (`memory`, `cpu,cpuacct`, `name=systemd`; empty for cgroup v2).
    pub controllers: String,
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The cgroup's path in the hierarchy (what `/proc/PID/cgroup` shows).
    pub path: String,
}

impl Dir {
    pub fn dir(&self) -> PathBuf {
        self.mount.join(self.path.trim_start_matches('/'))
    }
}

pub struct OuterCgroup {
    pub dirs: Vec<Dir>,
}

/// The hierarchies this process belongs to: (controllers, mount point, own path).
pub fn hierarchies() -> anyhow::Result<Vec<(String, PathBuf, String)>> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    // (mount point, fstype, super options) of every cgroup mount.
    let mounts: Vec<(PathBuf, String, String)> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split_whitespace().nth(4)?;
            let mut p = post.split_whitespace();
            let (fstype, _src, opts) = (p.next()?, p.next()?, p.next()?);
            fstype.starts_with("cgroup").then(|| (PathBuf::from(mnt), fstype.to_string(), opts.to_string()))
        })
        .collect();
    let mut out = Vec::new();
    for line in own.lines() {
        let mut it = line.splitn(3, ':');
        let (_, ctrls, path) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""));
        let mount = mounts.iter().find(|(_, fstype, opts)| {
            if ctrls.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && ctrls.split(',').all(|c| opts.split(',').any(|o| o == c))
            }
        });
        if let Some((m, _, _)) = mount {
            out.push((ctrls.to_string(), m.clone(), path.to_string()));
        }
    }
    anyhow::ensure!(!out.is_empty(), "no cgroup hierarchy found in /proc/self/cgroup and /proc/self/mountinfo");
    Ok(out)
}

/// The cgroup paths of `pid`, by controllers (as in [`Dir::controllers`]).
pub fn of_pid(pid: i32) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).with_context(|| format!("pid {pid}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _ = it.next()?;
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect())
}

impl OuterCgroup {
    /// A cgroup `name` below ours in every hierarchy; with `memory_limit`,
    /// its memory limit in bytes.
    pub fn create(name: &str, memory_limit: Option<u64>) -> anyhow::Result<OuterCgroup> {
        let mut cg = OuterCgroup { dirs: Vec::new() };
        for (controllers, mount, own) in hierarchies()? {
            let path = format!("{}/{name}", own.trim_end_matches('/'));
            let d = Dir { controllers, mount, path };
            let dir = d.dir();
            std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            cg.dirs.push(d.clone());
            // A new v1 cpuset has no CPUs and no memory nodes: copy the parent's.
            if d.controllers.split(',').any(|c| c == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(dir.parent().unwrap().join(f))?;
                    std::fs::write(dir.join(f), v.trim()).with_context(|| format!("{}/{f}", dir.display()))?;
                }
            }
        }
        if let Some(limit) = memory_limit {
            let d = cg.memory().context("no memory controller on this host")?;
            let file = if d.controllers.is_empty() { "memory.max" } else { "memory.limit_in_bytes" };
            std::fs::write(d.dir().join(file), limit.to_string())
                .with_context(|| format!("{}/{file}", d.dir().display()))?;
        }
        Ok(cg)
    }

    /// The hierarchy with the memory controller (v1), or the v2 one.
    pub fn memory(&self) -> Option<&Dir> {
        self.dirs
            .iter()
            .find(|d| d.controllers.split(',').any(|c| c == "memory"))
            .or_else(|| self.dirs.iter().find(|d| d.controllers.is_empty()))
    }

    /// The `cgroup.procs` files outer.sh writes its pid to.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.dir().join("cgroup.procs")).collect()
    }

    /// Every process in the cgroup and below it, in every hierarchy.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            for dir in tree(&d.dir()) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                out.extend(procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The cgroups below the outer's own (the nested containers'), in every hierarchy.
    pub fn children(&self) -> Vec<PathBuf> {
        self.dirs.iter().flat_map(|d| tree(&d.dir()).into_iter().skip(1)).collect()
    }

    /// Removes the cgroup and everything below it, deepest first, waiting
    /// up to `within` for processes that are dying to leave.
    pub fn remove(&self, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        for d in &self.dirs {
            let mut dirs = tree(&d.dir());
            dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for dir in dirs {
                loop {
                    match std::fs::remove_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e) if Instant::now() >= until => {
                            anyhow::bail!("cannot remove the cgroup {}: {e}", dir.display())
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            }
        }
        Ok(())
    }
}

/// `dir` and every cgroup directory below it, parents first.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if !dir.is_dir() {
        return out;
    }
    out.push(dir.to_path_buf());
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            let subs: Vec<PathBuf> =
                rd.flatten().filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()).collect();
            out.extend(subs);
        }
        i += 1;
    }
    out
}

impl Drop for OuterCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove(Duration::from_secs(5)) {
            eprintln!("warning: {e:#}");
        }
    }
}
