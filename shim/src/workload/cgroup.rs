//! Where the nested container's cgroup goes, and how much memory the outer
//! container's cgroup leaves for a workload.
//!
//! The workload must live inside the outer container's resources: the limits
//! an orchestrator puts on the outer container (memory, pids, CPU) bind it
//! only if its cgroup is created *below* the outer container's own. runc
//! (cgroupfs driver) reads `cgroupsPath` two ways:
//! - cgroup v1 and hybrid hosts: a relative path is joined to runc's own
//!   cgroup in every hierarchy, which is ums's (runc is its child), so
//!   `ums/<id>` lands below the outer container's cgroup in each controller;
//! - cgroup v2: a relative path is joined to the *parent* of runc's own
//!   cgroup (beside the outer, outside its limits), so ums gives an absolute
//!   path below the outer's cgroup instead. v2 allows no processes in a
//!   cgroup whose children have controllers, so at start-up ums moves the
//!   outer's processes into a leaf `<outer>/ums-init` and delegates the
//!   controllers to the workload's subtree (as Docker-in-Docker does).
//!   On hybrid hosts runc 1.1 puts the workload's cgroup in the v2
//!   hierarchy (which has no controllers there, so no limits) at
//!   `/ums/<id>` from that hierarchy's root, whatever the path: an outer
//!   killed there leaves that one empty cgroup behind (docs/design.md).
//!
//! With the workload's cgroup inside the outer's, an orchestrator that
//! removes the outer container's cgroup (runc removes child cgroups first)
//! removes the workload's too: a killed outer leaves nothing at the host's
//! cgroup root.

use std::path::{Path, PathBuf};

const MOUNT: &str = "/sys/fs/cgroup";

/// The parent below which the workload's cgroups are made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Parent {
    /// cgroup v1 or hybrid: relative to the runtime's own cgroup (ums's).
    #[default]
    Relative,
    /// cgroup v2: this absolute path (below the outer container's cgroup).
    Absolute(String),
}

impl Parent {
    /// The `cgroupsPath` of the workload container `id`.
    pub fn cgroups_path(&self, id: &str) -> String {
        match self {
            Parent::Relative => format!("ums/{id}"),
            Parent::Absolute(p) => format!("{}/{id}", p.trim_end_matches('/')),
        }
    }
}

/// Is this a pure cgroup v2 host (what runc calls unified mode)?
pub fn is_v2() -> bool {
    Path::new(MOUNT).join("cgroup.controllers").exists()
}

/// The cgroup v2 path in a `/proc/<pid>/cgroup` text (the `0::` line).
pub fn v2_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_string())
}

/// The cgroup v1 path of `controller` in a `/proc/<pid>/cgroup` text.
pub fn v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| path.trim().to_string())
    })
}

/// Process-wide set-up at start, before any workload: decides the parent of
/// the workload's cgroups. On a pure v2 host ums moves itself into a leaf
/// `ums-init` of the outer's cgroup and delegates the controllers to the
/// workload's subtree; failures there are logged (the outer's limits still
/// bind the subtree, only the workload's own cgroup then lacks controllers).
pub fn setup() -> Parent {
    if !is_v2() {
        return Parent::Relative;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| v2_path(&t)).unwrap_or_else(|| "/".into());
    let outer = Path::new(MOUNT).join(own.trim_start_matches('/'));
    let leaf = outer.join("ums-init");
    let moved = std::fs::create_dir_all(&leaf).and_then(|()| {
        // Only ums itself: it is the outer container's PID 1 and runs alone
        // at this point (and it is all it may move when it is not).
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
        let controllers = std::fs::read_to_string(outer.join("cgroup.controllers"))?;
        for c in controllers.split_whitespace() {
            let _ = std::fs::write(outer.join("cgroup.subtree_control"), format!("+{c}"));
        }
        Ok(())
    });
    if let Err(e) = moved {
        tracing::warn!(error = %e, cgroup = %outer.display(), "cannot delegate cgroup controllers to the workload");
    }
    Parent::Absolute(format!("{}/ums", own.trim_end_matches('/')))
}

/// What the outer container's memory cgroup (and every ancestor that ums
/// can see) leaves for new memory: the smallest `limit - usage` on the way
/// up, with the cgroup that sets it. `None` when no limit is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRoom {
    pub room: u64,
    pub limit: u64,
    pub usage: u64,
    pub cgroup: PathBuf,
}

/// [`MemoryRoom`] of this process's memory cgroup.
pub fn memory_room() -> Option<MemoryRoom> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let (dir, limit_file, usage_file) = if is_v2() {
        (Path::new(MOUNT).join(v2_path(&text)?.trim_start_matches('/')), "memory.max", "memory.current")
    } else {
        let mount = Path::new(MOUNT).join("memory");
        (
            mount.join(v1_path(&text, "memory")?.trim_start_matches('/')),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        )
    };
    room_from(&dir, Path::new(MOUNT), limit_file, usage_file)
}

fn room_from(dir: &Path, stop: &Path, limit_file: &str, usage_file: &str) -> Option<MemoryRoom> {
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok().map(|s| s.trim().to_string());
    let mut best: Option<MemoryRoom> = None;
    let mut d = dir.to_path_buf();
    while d.starts_with(stop) && d != stop {
        if let (Some(l), Some(u)) = (read(&d, limit_file), read(&d, usage_file)) {
            // v1 says "no limit" with a huge number, v2 with "max".
            if let (Ok(limit), Ok(usage)) = (l.parse::<u64>(), u.parse::<u64>()) {
                if limit < (1u64 << 62) {
                    let room = limit.saturating_sub(usage);
                    if best.as_ref().is_none_or(|b| room < b.room) {
                        best = Some(MemoryRoom { room, limit, usage, cgroup: d.clone() });
                    }
                }
            }
        }
        if !d.pop() {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_goes_below_the_outer() {
        assert_eq!(Parent::Relative.cgroups_path("ums-1"), "ums/ums-1");
        assert_eq!(
            Parent::Absolute("/kubepods/pod1/c1/ums".into()).cgroups_path("ums-1"),
            "/kubepods/pod1/c1/ums/ums-1"
        );
        assert_eq!(Parent::Absolute("/ums/".into()).cgroups_path("x"), "/ums/x");
    }

    #[test]
    fn parses_proc_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/76a2\n2:cpu,cpuacct:/a\n0::/\n";
        assert_eq!(v1_path(hybrid, "memory").as_deref(), Some("/process_api/76a2"));
        assert_eq!(v1_path(hybrid, "cpuacct").as_deref(), Some("/a"));
        assert_eq!(v1_path(hybrid, "pids"), None);
        assert_eq!(v2_path(hybrid).as_deref(), Some("/"));
        assert_eq!(v2_path("0::/kubepods/pod1\n").as_deref(), Some("/kubepods/pod1"));
        assert_eq!(v2_path("4:memory:/x\n"), None);
    }

    #[test]
    fn the_tightest_ancestor_sets_the_room() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("memory");
        let (outer, inner) = (root.join("pod"), root.join("pod/ctr"));
        std::fs::create_dir_all(&inner).unwrap();
        let w = |d: &Path, l: &str, u: &str| {
            std::fs::write(d.join("memory.max"), l).unwrap();
            std::fs::write(d.join("memory.current"), u).unwrap();
        };
        w(&root, "max\n", "1000000\n");
        w(&outer, "300\n", "100\n");
        w(&inner, "max\n", "50\n");
        let r = room_from(&inner, &root, "memory.max", "memory.current").unwrap();
        assert_eq!(r, MemoryRoom { room: 200, limit: 300, usage: 100, cgroup: outer.clone() });
        w(&outer, "max\n", "100\n");
        assert_eq!(room_from(&inner, &root, "memory.max", "memory.current"), None);
        w(&inner, "9223372036854771712\n", "10\n");
        assert_eq!(room_from(&inner, &root, "memory.max", "memory.current"), None);
    }
}
