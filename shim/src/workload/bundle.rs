//! The bundle handed to runc/crun: config.json plus a rootfs that is an
//! overlay of the unpacked image (read-only lower, cached by digest) and a
//! writable upper dir. The bundle lives at the same path in every outer
//! container, which is what lets CRIU restore a checkpoint made elsewhere.
//!
//! Fallback when overlayfs cannot be mounted (for example a kernel without it):
//! the lower dir is copied into the rootfs, and the whole rootfs then plays the
//! writable layer (a migration carries all of it).

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::process::exec;
use crate::process::reaper::Reaper;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the image into {path} (overlay fallback): {source}")]
    Copy {
        path: PathBuf,
        #[source]
        source: exec::ExecError,
    },
    #[error("cannot lay the writable layer in place: {0}")]
    Upper(String),
    #[error("cannot mount the rootfs at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsMode {
    Overlay,
    Copy,
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub lower: PathBuf,
    pub mode: RootfsMode,
}

impl Bundle {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// The writable layer: what a checkpoint must carry besides memory.
    pub fn upper(&self) -> PathBuf {
        match self.mode {
            RootfsMode::Overlay => self.dir.join("upper"),
            RootfsMode::Copy => self.rootfs(),
        }
    }
    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("container.pid")
    }

    /// Lay out `dir` over `lower` with an empty writable layer.
    /// `fill_upper` runs before the mount, to put a checkpoint's writable
    /// layer in place (it receives the upper dir).
    pub fn prepare(
        reaper: &Reaper,
        dir: &Path,
        lower: &Path,
        fill_upper: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<Bundle, BundleError> {
        // Start clean: a previous workload's leftovers must not leak in.
        teardown_dir(dir);
        let mk = |p: &Path| std::fs::create_dir_all(p).map_err(|source| BundleError::Create { path: p.into(), source });
        let mut b = Bundle { dir: dir.to_path_buf(), lower: lower.to_path_buf(), mode: RootfsMode::Overlay };
        mk(&b.rootfs())?;
        mk(&b.dir.join("upper"))?;
        mk(&b.work())?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            b.dir.join("upper").display(),
            b.work().display()
        );
        if let Err(e) = fill_upper(&b.dir.join("upper")) {
            teardown_dir(dir);
            return Err(BundleError::Upper(e));
        }
        match mount(Some("overlay"), &b.rootfs(), Some("overlay"), MsFlags::empty(), Some(opts.as_str())) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "overlayfs unavailable; copying the image into the rootfs instead");
                b.mode = RootfsMode::Copy;
                let mut cp = Command::new("cp");
                cp.arg("-a").arg(format!("{}/.", lower.display())).arg(b.rootfs());
                exec::check_blocking(reaper, cp).map_err(|source| BundleError::Copy { path: b.rootfs(), source })?;
                // The upper contents (a restored writable layer) go on top.
                let upper = b.dir.join("upper");
                if std::fs::read_dir(&upper).map(|mut d| d.next().is_some()).unwrap_or(false) {
                    let mut cp = Command::new("cp");
                    cp.arg("-a").arg(format!("{}/.", upper.display())).arg(b.rootfs());
                    exec::check_blocking(reaper, cp)
                        .map_err(|source| BundleError::Copy { path: b.rootfs(), source })?;
                }
            }
        }
        // Make the rootfs a private mount so runc's pivot_root is happy.
        let _ = mount(None::<&str>, &b.rootfs(), None::<&str>, MsFlags::MS_PRIVATE, None::<&str>);
        Ok(b)
    }

    /// Unmount and delete everything of this bundle.
    pub fn teardown(&self) {
        teardown_dir(&self.dir);
    }
}

fn teardown_dir(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for _ in 0..4 {
        if umount2(&rootfs, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
