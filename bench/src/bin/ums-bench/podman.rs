//! Method 4 of the comparison (issue 7): podman's documented recipe for moving
//! a container to another host, `podman container checkpoint --export`, the
//! archive copied over, `podman container restore --import`, each host with
//! its own podman.
//!
//! Each host's podman keeps everything (storage, run and temp dirs, the
//! archive) on a tmpfs of its own, mounted under a unique /tmp dir: CRIU
//! writes its images into the container's storage before podman tars them,
//! and the other methods checkpoint to tmpfs too. The archive is written
//! uncompressed (`--compress none`; podman's default is zstd) because the
//! other methods send their images as they are. The container runs with
//! runc (crun refuses this host's hybrid cgroups), cgroupfs (no systemd) and
//! events in a file.
//!
//! A host's podman runs under `nsenter --net=<host's netns>` and the
//! container uses `--network host`, i.e. that namespace: the checkpoint does
//! not carry a namespace path, so the restore lands in the destination's
//! namespace. `--network ns:<path>` would be saved in the archive and
//! `restore --import` has no option to change it; `ip netns exec` remounts
//! /sys without the cgroup mounts, and runc then fails ("no cgroup mount
//! found in mountinfo").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::resource::{getrlimit, Resource};
use ums_e2e::{parse_tick, Host, ImageBuilder, Tick};

use crate::common::*;
use crate::compare::{downtime, pipe_over_tcp, LinkMeter, Method, Point, Run, Workload, CONTINUE, START};

/// The nproc limit podman 4.3 sets on itself when it cannot raise it.
const PODMAN_NPROC: u64 = 32768;

/// One host's podman: its own root, runroot and tmpdir on its own tmpfs.
struct Podman<'a> {
    host: &'a Host,
    dir: tempfile::TempDir,
    mounted: bool,
}

impl<'a> Podman<'a> {
    fn new(host: &'a Host) -> anyhow::Result<Podman<'a>> {
        let dir = tempfile::Builder::new().prefix(&ums_e2e::unique_name("bench-podman")).tempdir()?;
        let mut p = Podman { host, dir, mounted: false };
        ums_e2e::run(
            Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0700", "ums-bench-podman"]).arg(p.dir.path()),
        )
        .context("mounting a tmpfs for podman")?;
        p.mounted = true;
        Ok(p)
    }

    /// A path on this host's tmpfs.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `podman` with this host's storage and settings, in its network namespace.
    fn cmd(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.host.netns_path().display()))
            .arg("podman")
            .arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("run"))
            .arg("--tmpdir")
            .arg(self.path("tmp"))
            .args(["--storage-driver", "overlay", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .stdin(Stdio::null());
        c
    }

    /// Runs podman with `args`; its stdout, or the command and its stderr.
    fn podman(&self, args: &[&str]) -> anyhow::Result<String> {
        ums_e2e::run(self.cmd().args(args))
    }

    /// Copies the OCI image layout into this host's storage as `name` (skopeo:
    /// `podman pull oci:<dir>` names the image after the directory, which
    /// fails on a temp dir's capitals).
    fn load(&self, layout: &Path, name: &str) -> anyhow::Result<()> {
        let store = format!(
            "containers-storage:[overlay@{}+{}]{name}",
            self.path("root").display(),
            self.path("run").display()
        );
        ums_e2e::run(
            Command::new("skopeo").args(["copy", "--quiet"]).arg(format!("oci:{}", layout.display())).arg(store),
        )?;
        Ok(())
    }

    /// `podman run -d` of `image` with `args`, output to a k8s-file log.
    fn run(&self, name: &str, image: &str, args: &[String]) -> anyhow::Result<()> {
        let mut cmd = self.cmd();
        cmd.args(["run", "--detach", "--name", name, "--network", "host", "--log-driver", "k8s-file"]);
        // podman as root asks runc for rlimits this machine does not allow
        // (no CAP_SYS_RESOURCE), and caps its own nproc (hence conmon's and
        // runc's) at 32768: the container keeps the bench's limits, nproc
        // at most that.
        let (_, nofile) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit nofile")?;
        let (_, nproc) = getrlimit(Resource::RLIMIT_NPROC).context("getrlimit nproc")?;
        let nproc = nproc.min(PODMAN_NPROC);
        cmd.args(["--ulimit", &format!("nofile={nofile}:{nofile}"), "--ulimit", &format!("nproc={nproc}:{nproc}")]);
        ums_e2e::run(cmd.arg(image).args(args))?;
        Ok(())
    }

    /// The file conmon writes the container's output to.
    fn log_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        let out = self.podman(&["container", "inspect", "--format", "{{.HostConfig.LogConfig.Path}}", name])?;
        Ok(PathBuf::from(out.trim()))
    }

    /// Kills and removes one container (its conmon ends with it).
    fn remove(&self, name: &str) -> anyhow::Result<()> {
        self.podman(&["rm", "--force", "--time", "0", name])?;
        Ok(())
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Only this host's storage is listed: containers and images made here.
        let _ = self.cmd().args(["rm", "--all", "--force", "--time", "0"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
        // Overlay mounts podman may have left, deepest first, then the tmpfs.
        let below = ums_e2e::outer::mounts_below;
        if self.mounted {
            for m in below(self.dir.path()) {
                let ok = Command::new("umount").arg(&m).status().map(|s| s.success()).unwrap_or(false);
                if !ok {
                    let _ = Command::new("umount").arg("-l").arg(&m).status();
                }
            }
        }
        let left = below(self.dir.path());
        if !left.is_empty() {
            eprintln!("warning: mounts left under {}: {left:?}", self.dir.path().display());
        }
    }
}

/// memctr's tick lines in a conmon log file (a missing file has none).
fn log_ticks(path: &Path) -> Vec<Tick> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(parse_tick).collect()
}

/// Waits until the log at `path` has `count` ticks printed after `after_ms`
/// (unix ms); the first of them.
fn wait_ticks(path: &Path, after_ms: f64, count: usize, timeout: Duration) -> anyhow::Result<Tick> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let new: Vec<Tick> = log_ticks(path).into_iter().filter(|t| t.unix_ms as f64 > after_ms).collect();
        if new.len() >= count {
            return Ok(new[0]);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} ticks after unix ms {after_ms:.0} not seen in {} within {timeout:?} ({} seen)",
            count,
            path.display(),
            new.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// podman's version if it can checkpoint and restore here, or exactly why not
/// (the command and its error). Only a real checkpoint tells (CRIU's own
/// checks run then), so this migrates a 0 MiB memctr once between two hosts
/// of its own.
pub fn check() -> Result<String, String> {
    let version = ums_e2e::run(Command::new("podman").arg("--version"))
        .map_err(|e| format!("{e:#} (install podman and skopeo: image/install-image-deps.sh)"))?;
    round_trip().map_err(|e| format!("{e:#}"))?;
    Ok(version.trim().to_string())
}

fn round_trip() -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix(&ums_e2e::unique_name("bench-podman-check")).tempdir()?;
    let memctr = ums_e2e::workload::try_build_workload(tmp.path())?;
    let img = ImageBuilder::new(&memctr).cmd(&["0"]).build(&tmp.path().join("layout"))?;
    let w = Workload { mib: 0, procs: 1, img, compressible: false };
    let (ha, hb) = Host::pair("podman-check", None)?;
    // `ums` is not used by this method.
    let p = Point { ums: Path::new("ums"), ha: &ha, hb: &hb, link: "unlimited", w: &w, runs: 1 };
    series(&p, &mut Vec::new())
}

/// `p.runs` migrations of `p.w` alternately A->B and B->A with podman, each
/// pushed to `out` as it completes.
pub fn series(p: &Point<'_>, out: &mut Vec<Run>) -> anyhow::Result<()> {
    let label = p.label(Method::Podman);
    let a = Podman::new(p.ha)?;
    let b = Podman::new(p.hb)?;
    progress(&format!("{label}: loading the image into both hosts' podman"));
    let image = format!("localhost/ums-bench-memctr:{}", p.w.mib);
    a.load(&p.w.img.layout, &image)?;
    b.load(&p.w.img.layout, &image)?;
    let name = ums_e2e::unique_name("bench-podman");
    a.run(&name, &image, &p.w.args())?;
    wait_ticks(&a.log_path(&name)?, 0.0, 5, START).context("the workload in A did not start ticking")?;
    for i in 0..p.runs {
        check_interrupted()?;
        let (src, dst, dir) = if i % 2 == 0 { (&a, &b, "A->B") } else { (&b, &a, "B->A") };
        progress(&format!("{label}: run {}/{} ({dir})", i + 1, p.runs));
        out.push(migrate_once(p, src, dst, &name)?);
        // Let the new source settle (it ran the workload only a moment ago).
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

/// One migration of container `name` from `src` to `dst`; afterwards the
/// source's exited container is removed so that the next migration can
/// import it back under the same name (and ID).
fn migrate_once(p: &Point<'_>, src: &Podman, dst: &Podman, name: &str) -> anyhow::Result<Run> {
    let export = src.path("export.tar");
    let import = dst.path("import.tar");
    let src_log = src.log_path(name)?;
    let mut run = Run::default();

    let meter = LinkMeter::start(p.ha, p.hb)?;
    let t0 = Instant::now();
    src.podman(&["container", "checkpoint", "--export", &export.to_string_lossy(), "--compress", "none", name])?;
    let t1 = Instant::now();
    // Every tick the source printed is older than this; every tick of the
    // restored workload is newer.
    let frozen_by = unix_ms_now();
    let mut cat = Command::new("cat");
    cat.arg(&export);
    let mut write = Command::new("cat");
    write.stdout(File::create(&import).with_context(|| format!("create {}", import.display()))?);
    pipe_over_tcp(src.host, cat, dst.host, write).context("copying the archive")?;
    let t2 = Instant::now();
    dst.podman(&["container", "restore", "--import", &import.to_string_lossy()])?;
    let t3 = Instant::now();
    run.link_mib = meter.mib()?;
    run.total_s = (t3 - t0).as_secs_f64();
    run.phases = vec![
        ("checkpoint --export", (t1 - t0).as_secs_f64()),
        ("copy", (t2 - t1).as_secs_f64()),
        ("restore --import", (t3 - t2).as_secs_f64()),
    ];

    // The restored log starts with the source's (it is in the archive): the
    // destination's own ticks are those after `frozen_by`.
    let first = wait_ticks(&dst.log_path(name)?, frozen_by, 3, CONTINUE).context("no ticks at the destination")?;
    let last = *log_ticks(&src_log).last().context("no tick at the source")?;
    run.downtime_s = downtime(last, first, &mut run.notes);

    src.remove(name)?;
    for f in [&export, &import] {
        std::fs::remove_file(f).with_context(|| format!("remove {}", f.display()))?;
    }
    Ok(run)
}
