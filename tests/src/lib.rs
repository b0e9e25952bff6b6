//! Support code shared by the end-to-end tests of `ums`.
//!
//! The tests run the real `ums` binary, real runc and real CRIU, in namespaces
//! they create themselves. This crate gives them the pieces:
//! - [`workload`]: builds `memctr`, the memhog-with-a-counter test workload, and
//!   parses its output lines;
//! - [`oci_layout`]: writes a deterministic OCI image layout (busybox + memctr);
//! - [`host`]: simulated hosts, network namespaces joined by a veth pair;
//! - [`copy`]: tar over TCP between hosts, `criu page-server` in an outer;
//! - [`containerd`]: a containerd of a test's own (root, state, socket);
//! - [`outer`]: a simulated outer container (`tests/outer.sh`) with `ums init`
//!   as its PID 1, its output captured line by line ([`output`]);
//!
//! Everything it creates on the machine is named `ums-test-...-<pid>-<random>`
//! and removed on drop. When a tool the tests need is missing, the helpers panic
//! or fail with a message that names it: a missing tool is never a silent pass.

pub mod cgroup;
pub mod chaos;
pub mod containerd;
pub mod copy;
pub mod debs;
pub mod fault;
pub mod host;
pub mod invariants;
pub mod oci_layout;
pub mod outer;
pub mod output;
pub mod pair;
pub mod redis;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use cgroup::OuterCgroup;
pub use fault::{Fault, FaultProxy, Partition};
pub use host::{in_netns, Host};
pub use oci_layout::{Compression, ImageBuilder, Layer, OciImage};
pub use outer::{last_tick, status, ticks, Outer, OuterBuilder};
pub use output::LineLog;
pub use workload::{build_clockmon, build_websrv, build_workload, parse_sum, parse_tick, Tick};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crate dir has a parent").to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The `ums` binary under test: `$UMS_BIN`, or `<target>/debug/ums`.
/// Fails with a message saying how to build it.
pub fn ums_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("UMS_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("ums"),
    };
    anyhow::ensure!(
        path.is_file(),
        "ums binary {} does not exist: build ums first: cargo build -p ums (or set UMS_BIN)",
        path.display()
    );
    Ok(path)
}

/// Path of `tests/outer.sh`.
pub fn outer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("outer.sh")
}

/// A name unique on this machine: `ums-test-<what>-<pid>-<6 hex>`.
pub fn unique_name(what: &str) -> String {
    format!("ums-test-{what}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// Panics, naming the tool, unless `tool` is found on PATH. Tests call it first
/// so that a missing dependency is a clear failure, not a confusing one.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` not found on PATH: install {package} (image/install-deps.sh --test)");
}

/// Panics unless running as root (the tests create namespaces and mounts).
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "the end-to-end tests must run as root");
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
