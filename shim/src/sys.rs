//! Process-wide setup a PID 1 needs, done once before the async runtime starts
//! (become a subreaper), and facts about our own privileges.
//! Also the namespace plumbing that must run on a dedicated OS thread.
//! Everything here uses nix's safe wrappers; there is no `unsafe` in ums.

use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

/// Signals `ums` forwards to the workload (SIGTERM and SIGINT also start a stop).
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Whether this process may read and set other processes' resource limits.
/// CRIU needs that (prlimit) to dump a workload that does not run as root.
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Orphans anywhere below us are reparented to us, even when we are not PID 1
/// (for example when started by hand or by a test harness).
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Create a new network namespace and pin it at `path` (a bind mount of the
/// namespace file), without moving `ums` itself: the unshare happens on a
/// short-lived thread, which is the only task that enters it. `setup` runs on
/// that thread inside the new namespace (children it spawns start there too).
pub fn create_netns<F>(path: &Path, setup: F) -> std::io::Result<()>
where
    F: FnOnce() -> std::io::Result<()> + Send + 'static,
{
    use nix::mount::{mount, MsFlags};
    if !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::File::create(path)?;
    }
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("ums-netns".into())
        .spawn(move || -> std::io::Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let tid = nix::unistd::gettid();
            let ns = format!("/proc/self/task/{tid}/ns/net");
            mount(Some(ns.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(std::io::Error::from)?;
            setup()
        })?
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
}

/// Undo `create_netns`: unmount the pin (the namespace dies with its last user).
pub fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// Filesystem type magic of the filesystem holding `path`.
pub fn is_overlayfs(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC,
        Err(_) => false,
    }
}
