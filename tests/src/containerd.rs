//! A containerd of a test's own: its own config, root, state, socket and
//! namespace under the test's temp dir (the way tests/outer_image.rs starts
//! one), optionally with extra shims on its PATH (containerd finds the shim
//! of runtime `io.containerd.NAME.vN` as `containerd-shim-NAME-vN` there).
//!
//! containerd 1.6 and its shims put shim sockets and ctr's FIFOs under
//! `/run/containerd` whatever the config says; what this containerd made
//! there is removed at the end (only empty directories, and only the ones
//! that did not exist before). Tasks, containers, images, containerd itself
//! (by its pid) and any shim left (by pid) go on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::LineLog;

/// Directories under /run/containerd that containerd 1.6 and its shims use.
const RUN_DIRS: [&str; 4] = ["/run/containerd/runc", "/run/containerd/fifo", "/run/containerd/s", "/run/containerd"];

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    /// Which of `RUN_DIRS` existed before.
    had: Vec<bool>,
    child: Child,
    pub log: LineLog,
}

impl Containerd {
    /// Starts containerd (the CRI plugin off) and waits until `ctr version`
    /// answers. `path_first`: a directory put first on containerd's PATH.
    pub fn start(dir: &Path, namespace: &str, path_first: Option<&Path>) -> anyhow::Result<Containerd> {
        crate::require_tool("containerd", "containerd");
        crate::require_tool("ctr", "containerd");
        std::fs::create_dir_all(dir)?;
        let had = RUN_DIRS.iter().map(|d| Path::new(d).exists()).collect();
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
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(first) = path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", first.display()));
        }
        let mut child = cmd.spawn().context("start containerd")?;
        let log = LineLog::new();
        log.capture(child.stdout.take().unwrap(), "containerd".into());
        log.capture(child.stderr.take().unwrap(), "containerd".into());
        let c = Containerd { dir: dir.to_path_buf(), socket, namespace: namespace.into(), had, child, log };
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

    /// `ctr` pointed at this containerd and namespace, stdin /dev/null.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["--namespace", &self.namespace]);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Shim processes serving this containerd (they outlive it if left).
    pub fn shims(&self) -> Vec<i32> {
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
        for m in crate::outer::mounts_below(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = std::fs::remove_dir(format!("/run/containerd/runc/{}", self.namespace));
        for (d, had) in RUN_DIRS.iter().zip(&self.had) {
            if !had {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}
