//! Plain runc, the way a user would run the same workload without ums: the
//! same OCI image layout unpacked with tar into a rootfs, a `runc spec`
//! config patched for it, `runc run -d` with pipes as stdio, and
//! `runc checkpoint` / `runc restore -d` with images on a tmpfs.
//!
//! Everything lives on one tmpfs mounted under a unique /tmp dir, with its
//! own runc `--root`, so only containers made here are ever listed, killed or
//! deleted. Drop removes the containers, unmounts the tmpfs and the dir.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ums_e2e::{oci_layout::unpack_with_tar, run, LineLog};

pub struct RuncEnv {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    root: PathBuf,
    mounted: bool,
}

/// A container started by [`RuncEnv::run`] or brought back by
/// [`RuncEnv::restore`]: its output lines, and the write end of its stdin.
pub struct RuncContainer {
    pub id: String,
    pub bundle: PathBuf,
    pub log: LineLog,
    stdin: Vec<ChildStdin>,
}

impl RuncEnv {
    pub fn new() -> anyhow::Result<RuncEnv> {
        let dir = tempfile::Builder::new().prefix(&ums_e2e::unique_name("bench-runc")).tempdir()?;
        let mnt = dir.path().join("tmpfs");
        std::fs::create_dir_all(&mnt)?;
        let mut env = RuncEnv { root: mnt.join("runc-root"), mnt, dir, mounted: false };
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0700", "ums-bench-tmpfs"]).arg(&env.mnt))
            .context("mounting a tmpfs for plain runc")?;
        env.mounted = true;
        std::fs::create_dir_all(&env.root)?;
        Ok(env)
    }

    /// A directory on the tmpfs.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn runc(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.root);
        c
    }

    /// Unpacks `layout` into `<name>/rootfs` and writes a config.json from
    /// `runc spec`, running `args` with pipes, in a unique cgroup.
    pub fn bundle(&self, name: &str, layout: &Path, args: &[&str]) -> anyhow::Result<PathBuf> {
        let bundle = self.path(name);
        std::fs::create_dir_all(&bundle)?;
        unpack_with_tar(layout, &bundle.join("rootfs")).context("unpacking the image layout with tar")?;
        run(Command::new("runc").arg("spec").arg("--bundle").arg(&bundle))?;
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["process"]["args"] = serde_json::json!(args);
        spec["process"]["terminal"] = false.into();
        spec["root"]["readonly"] = false.into();
        spec["hostname"] = "runc-bench".into();
        spec["linux"]["cgroupsPath"] = format!("/{}", ums_e2e::unique_name("bench-cg")).into();
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
        Ok(bundle)
    }

    /// Spawns a runc command with pipes for stdio, its output going to `log`;
    /// waits for runc itself (not the container, which keeps the pipes).
    fn spawn_detached(&self, mut cmd: Command, log: &LineLog, tag: &str) -> anyhow::Result<ChildStdin> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child: Child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        log.capture(child.stdout.take().context("no stdout pipe")?, tag.into());
        log.capture(child.stderr.take().context("no stderr pipe")?, tag.into());
        let status = child.wait()?;
        if !status.success() {
            bail!("{cmd:?} failed ({status}); its output: {:?}", log.lines().iter().rev().take(5).collect::<Vec<_>>());
        }
        Ok(stdin)
    }

    /// `runc run -d`. Returns once runc has exited (the container runs).
    pub fn run(&self, bundle: &Path, id: &str) -> anyhow::Result<RuncContainer> {
        let log = LineLog::new();
        let mut cmd = self.runc();
        cmd.args(["run", "-d", "--bundle"]).arg(bundle).arg(id);
        let stdin = self.spawn_detached(cmd, &log, id)?;
        Ok(RuncContainer { id: id.into(), bundle: bundle.into(), log, stdin: vec![stdin] })
    }

    /// `runc checkpoint --image-path DIR ID` (the container ends); wall time.
    pub fn checkpoint(&self, c: &RuncContainer, images: &Path) -> anyhow::Result<Duration> {
        let mut cmd = self.runc();
        cmd.arg("checkpoint").arg("--image-path").arg(images).arg(&c.id);
        cmd.stdin(Stdio::null());
        let t = Instant::now();
        run(&mut cmd)?;
        Ok(t.elapsed())
    }

    /// `runc restore -d --image-path DIR --bundle B ID` with new pipes as
    /// stdio (appended to the container's log); wall time until runc exits.
    pub fn restore(&self, c: &mut RuncContainer, images: &Path) -> anyhow::Result<Duration> {
        let mut cmd = self.runc();
        cmd.args(["restore", "-d", "--image-path"]).arg(images).arg("--bundle").arg(&c.bundle).arg(&c.id);
        let t = Instant::now();
        let stdin = self.spawn_detached(cmd, &c.log, &c.id)?;
        let took = t.elapsed();
        c.stdin.push(stdin);
        Ok(took)
    }

    /// Kills and deletes one container.
    pub fn remove(&self, c: RuncContainer) {
        let _ = self.runc().args(["kill", &c.id, "KILL"]).output();
        let _ = self.runc().args(["delete", "-f", &c.id]).output();
        drop(c.stdin);
    }
}

impl Drop for RuncEnv {
    fn drop(&mut self) {
        // Only containers under our own --root are listed here.
        if let Ok(out) = self.runc().args(["list", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.runc().args(["kill", id, "KILL"]).output();
                let _ = self.runc().args(["delete", "-f", id]).output();
            }
        }
        if self.mounted {
            let ok = Command::new("umount").arg(&self.mnt).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        let _ = &self.dir; // the TempDir removes the (now empty) directory
    }
}
