//! The process layer: the one reaper that waits for every child of PID 1,
//! the helper that runs a program and collects its output, and the OCI
//! runtime's (runc/crun) command line. Everything that spawns goes through here.

pub mod exec;
pub mod reaper;
pub mod runtime;

/// The first line of `criu --version`, read once (empty when CRIU is
/// missing). `ums init` reads it at start, so a peer's `Hello` never waits
/// for a child process on an async worker.
pub fn criu_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        std::process::Command::new("criu")
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
            .unwrap_or_default()
    })
}
