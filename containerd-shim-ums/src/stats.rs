//! `Stats`: the task's cgroup v1 figures as containerd's
//! `io.containerd.cgroups.v1.Metrics` (what `ctr task metrics` prints).
//! runc puts the container in one cgroup per v1 controller; the paths come
//! from the init's `/proc/<pid>/cgroup`.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_shim::protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat};

/// The path of the v1 hierarchy that has `controller`, from a
/// `/proc/<pid>/cgroup` text (`N:controllers:path` lines).
pub fn v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
    })
}

/// `key value` lines (memory.stat, cpuacct.stat).
pub fn key_values(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// A number file; `max` (no limit) and anything unreadable are 0.
fn number(dir: &Option<PathBuf>, file: &str) -> u64 {
    dir.as_ref()
        .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn text(dir: &Option<PathBuf>, file: &str) -> String {
    dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(file)).ok()).unwrap_or_default()
}

/// The figures of the cgroups `pid` is in; `None` when it has no v1 memory
/// hierarchy (cgroup v2 only: not read yet).
pub fn metrics(pid: i32) -> Option<Metrics> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let dir = |controller: &str, mount: &str| {
        v1_path(&own, controller).map(|p| PathBuf::from(format!("/sys/fs/cgroup/{mount}{p}")))
    };
    let memory = dir("memory", "memory");
    memory.as_ref()?;
    let cpuacct = dir("cpuacct", "cpuacct");
    let pids = dir("pids", "pids");
    let stat = key_values(&text(&memory, "memory.stat"));
    let get = |k: &str| stat.get(k).copied().unwrap_or(0);
    let mem = MemoryStat {
        cache: get("cache"),
        rss: get("rss"),
        mapped_file: get("mapped_file"),
        total_cache: get("total_cache"),
        total_rss: get("total_rss"),
        total_mapped_file: get("total_mapped_file"),
        usage: Some(MemoryEntry {
            usage: number(&memory, "memory.usage_in_bytes"),
            limit: number(&memory, "memory.limit_in_bytes"),
            max: number(&memory, "memory.max_usage_in_bytes"),
            failcnt: number(&memory, "memory.failcnt"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    // cpuacct.stat counts USER_HZ ticks (100 per second on Linux).
    let ticks = key_values(&text(&cpuacct, "cpuacct.stat"));
    let cpu = CPUStat {
        usage: Some(CPUUsage {
            total: number(&cpuacct, "cpuacct.usage"),
            user: ticks.get("user").copied().unwrap_or(0) * 10_000_000,
            kernel: ticks.get("system").copied().unwrap_or(0) * 10_000_000,
            per_cpu: text(&cpuacct, "cpuacct.usage_percpu").split_whitespace().filter_map(|v| v.parse().ok()).collect(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let pid_stat =
        PidsStat { current: number(&pids, "pids.current"), limit: number(&pids, "pids.max"), ..Default::default() };
    Some(Metrics { memory: Some(mem).into(), cpu: Some(cpu).into(), pids: Some(pid_stat).into(), ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_paths_by_controller() {
        let text = "12:pids:/ums-test/c1\n11:cpu,cpuacct:/ums-test/c1\n4:memory:/ums-test/c1\n0::/ums-test/c1\n";
        assert_eq!(v1_path(text, "memory").as_deref(), Some("/ums-test/c1"));
        assert_eq!(v1_path(text, "cpuacct").as_deref(), Some("/ums-test/c1"));
        assert_eq!(v1_path(text, "cpu").as_deref(), Some("/ums-test/c1"));
        assert_eq!(v1_path(text, "blkio"), None);
        assert_eq!(v1_path("0::/only-v2\n", "memory"), None);
    }

    #[test]
    fn key_value_lines() {
        let kv = key_values("cache 4096\nrss 8192\nbad line x\n");
        assert_eq!(kv["cache"], 4096);
        assert_eq!(kv["rss"], 8192);
        assert_eq!(kv.len(), 2);
    }

    #[test]
    fn own_cgroups_are_readable() {
        // This process's own figures: present on a v1 or hybrid host, None on v2 only.
        if let Some(m) = metrics(std::process::id() as i32) {
            assert!(m.memory.usage.usage > 0);
        }
    }
}
