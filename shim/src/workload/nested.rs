//! Starting, restoring and ending the nested container. Everything here blocks
//! (runc, CRIU, unpacking), so the supervisor calls it on the blocking pool.
//!
//! The workload's stdio are pipes whose read ends `ums` copies to its own
//! stdout and stderr: `kubectl logs` shows them, and CRIU can dump pipes (it
//! cannot dump a file of the outer container, see DESIGN.md).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::image::oci_layout::{self, OciLayout, ResolvedImage};
use crate::process::exec::{self, ExecError};
use crate::process::reaper::Reaper;
use crate::process::runtime::{RestoreOpts, Runtime};
use crate::workload::bundle::{Bundle, BundleError};
use crate::workload::spec::{self, SpecError, SpecInput};

#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// Boxed, as in `NoImage`: layout errors are large, and every result
    /// that can fail here would carry their size.
    #[error("workload image: {0}")]
    Layout(#[source] Box<oci_layout::LayoutError>),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot create the workload's network namespace at {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the workload's stdio pipes: {0}")]
    Pipes(#[source] nix::Error),
    #[error("{op} failed: {source}")]
    Runtime {
        op: &'static str,
        #[source]
        source: ExecError,
    },
    #[error("the runtime wrote no usable pid file at {path}")]
    PidFile { path: PathBuf },
    #[error("workload image {0} is in no layout of this outer container")]
    ImageNotHere(String),
    #[error("failpoint {0} (UMS_FAILPOINT) triggered")]
    Failpoint(&'static str),
    #[error("no workload image at {path}: {source}")]
    NoImage {
        path: PathBuf,
        #[source]
        source: Box<oci_layout::LayoutError>,
    },
}

impl From<oci_layout::LayoutError> for NestedError {
    fn from(e: oci_layout::LayoutError) -> Self {
        NestedError::Layout(Box::new(e))
    }
}

/// Facts about the workload image that travel with checkpoints and status.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub manifest_digest: String,
    pub command: Vec<String>,
    pub exposed_ports: Vec<String>,
}

/// What the workload was started with besides its image: the command line,
/// the hostname, the published ports (`-p` flags and the image's
/// ExposedPorts, TCP and UDP), and whether CRIU keeps its established TCP
/// connections. They travel in a checkpoint's meta, so a destination runs and
/// publishes exactly what the source did (not its own flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// The command line that runs (the image's Entrypoint and Cmd, or the
    /// command given to `ums init -- CMD`).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub hostname: String,
    /// Every published port, in order, without duplicates.
    #[serde(default)]
    pub publish: Vec<crate::net::proxy::PortMap>,
    #[serde(default = "yes")]
    pub tcp_established: bool,
}

fn yes() -> bool {
    true
}

impl Settings {
    /// The settings `cfg` gives a workload of image `img`.
    pub fn from_config(cfg: &Config, img: &ResolvedImage) -> Settings {
        let mut publish = cfg.publish.clone();
        for m in crate::net::proxy::from_exposed(&spec::exposed_ports(&img.config)) {
            if !publish.iter().any(|p| p.proto == m.proto && p.outer == m.outer) {
                publish.push(m);
            }
        }
        Settings {
            command: spec::command_line(&img.config, &cfg.command).unwrap_or_default(),
            hostname: hostname(cfg),
            publish,
            tcp_established: cfg.tcp_established,
        }
    }

    /// `cfg` with these settings in place of its own per-workload ones, for
    /// restoring a workload that was started elsewhere.
    pub fn apply(&self, cfg: &Config) -> Config {
        let mut c = cfg.clone();
        if !self.command.is_empty() {
            c.command = self.command.clone();
        }
        if !self.hostname.is_empty() {
            c.hostname = Some(self.hostname.clone());
        }
        c.publish = self.publish.clone();
        c.tcp_established = self.tcp_established;
        c
    }
}

/// A nested container that runs (or is frozen) here.
#[derive(Debug)]
pub struct Nested {
    pub id: String,
    pub pid: i32,
    pub bundle: Bundle,
    pub image: ImageInfo,
    /// What it runs with (`Settings::from_config` of the config it was
    /// started or restored with).
    pub settings: Settings,
    pub started: Instant,
    /// The uid the workload runs as (CRIU needs CAP_SYS_RESOURCE for non-root).
    pub uid: u32,
}

/// Open the workload image and unpack it (cached) into a lower dir. With
/// `want`, the image with that manifest digest, from whichever layout has it.
pub fn open_image(cfg: &Config, want: Option<&str>) -> Result<(OciLayout, ResolvedImage, PathBuf), NestedError> {
    let mut first_err = None;
    for dir in cfg.layout_candidates() {
        let found = OciLayout::open(&dir).and_then(|l| l.resolve().map(|img| (l, img)));
        match found {
            Ok((layout, img)) if want.is_none_or(|w| w == img.manifest_digest) => {
                let lower = oci_layout::unpack_image(&layout, &img, &cfg.layer_cache())?;
                return Ok((layout, img, lower));
            }
            Ok(_) => {}
            Err(source) => {
                if first_err.is_none() {
                    first_err = Some(NestedError::NoImage { path: dir.clone(), source: Box::new(source) });
                }
            }
        }
    }
    Err(match (want, first_err) {
        (Some(w), _) => NestedError::ImageNotHere(w.to_string()),
        (None, Some(e)) => e,
        (None, None) => NestedError::ImageNotHere("any".into()),
    })
}

pub fn image_info(cfg: &Config, img: &ResolvedImage) -> ImageInfo {
    ImageInfo {
        manifest_digest: img.manifest_digest.clone(),
        command: spec::command_line(&img.config, &cfg.command).unwrap_or_default(),
        exposed_ports: spec::exposed_ports(&img.config),
    }
}

fn hostname(cfg: &Config) -> String {
    cfg.hostname
        .clone()
        .or_else(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_else(|| "ums".into())
}

/// A fresh network namespace for the workload, pinned at its fixed path:
/// loopback up, and a veth to the outer container's namespace with the fixed
/// addresses of `NetConfig`, a default route through the outer side, and
/// outbound NAT there. Made anew for every start and restore.
pub fn make_netns(cfg: &Config, reaper: &Reaper) -> Result<(), NestedError> {
    use std::io::Write as _;
    let path = cfg.netns_path();
    crate::sys::remove_netns(&path);
    let net = cfg.net.clone();
    // Two `ip -batch` runs (one per side) instead of one process per step:
    // every spawn costs milliseconds, and a restore waits for all of them.
    let batch = |mut c: Command, script: String| -> std::io::Result<()> {
        let mut child =
            c.arg("-batch").arg("-").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let exit = reaper.watch(child.id() as i32);
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        match exit.blocking_recv() {
            Ok(x) if x.success() => Ok(()),
            Ok(x) => Err(std::io::Error::other(format!("ip -batch ({x}): {}", err.trim()))),
            Err(_) => Err(std::io::Error::other("ip -batch was not reaped")),
        }
    };
    // A veth left from an earlier workload (its namespace not yet gone).
    let mut del = Command::new("ip");
    del.args(["link", "del", &net.host_if]);
    let _ = exec::output_blocking(reaper, del);
    crate::sys::create_netns(&path, || Ok(())).map_err(|source| NestedError::Netns { path: path.clone(), source })?;
    let setup = || -> std::io::Result<()> {
        let outer = format!(
            "link add {if} type veth peer name eth0 netns {ns}\naddr add {gw}/{len} dev {if}\nlink set {if} up\n",
            if = net.host_if,
            ns = path.display(),
            gw = net.gateway,
            len = net.prefix_len
        );
        batch(Command::new("ip"), outer)?;
        let inside = format!(
            "link set lo up\naddr add {addr}/{len} dev eth0\nlink set eth0 up\nroute add default via {gw}\n",
            addr = net.address,
            len = net.prefix_len,
            gw = net.gateway
        );
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", path.display())).arg("ip");
        batch(c, inside)
    };
    setup().map_err(|source| NestedError::Netns { path: path.clone(), source })?;
    outbound_nat(cfg, reaper);
    Ok(())
}

/// Let the workload reach the network through the outer container: forward
/// and masquerade its subnet. Best effort: a workload that only serves
/// published ports does not need it, so a failure is logged, not fatal.
fn outbound_nat(cfg: &Config, reaper: &Reaper) {
    // The rule lives in the outer container's namespace and outlasts every
    // workload: set it up once per ums.
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        tracing::warn!(error = %e, "cannot enable IP forwarding; the workload has no outbound network");
        return;
    }
    let subnet = format!("{}/{}", cfg.net.address, cfg.net.prefix_len);
    let rule = ["-t", "nat", "POSTROUTING", "-s", &subnet, "!", "-o", &cfg.net.host_if, "-j", "MASQUERADE"];
    let mut check = Command::new("iptables");
    check.args(&rule[..2]).arg("-C").args(&rule[2..]);
    if exec::check_blocking(reaper, check).is_ok() {
        return;
    }
    let mut add = Command::new("iptables");
    add.args(&rule[..2]).arg("-A").args(&rule[2..]);
    if let Err(e) = exec::check_blocking(reaper, add) {
        tracing::warn!(error = %e, "cannot add the outbound NAT rule; the workload has no outbound network");
    }
}

fn new_id() -> String {
    format!("ums-{:08x}", rand::random::<u32>())
}

fn write_spec(cfg: &Config, img: &ResolvedImage, bundle: &Bundle, id: &str) -> Result<u32, NestedError> {
    let host = hostname(cfg);
    let netns = cfg.netns_path();
    let cgroups_path = cfg.cgroup_parent.cgroups_path(id);
    let lower = bundle.lower.clone();
    let rlimits = spec::rlimits(&cfg.ulimits)?;
    let seccomp = cfg.seccomp.profile();
    let mut s = spec::build(
        &img.config,
        &SpecInput {
            command: &cfg.command,
            hostname: &host,
            netns: &netns,
            cgroups_path: &cgroups_path,
            rootfs: &lower,
            rlimits: &rlimits,
            seccomp: seccomp.as_ref(),
        },
    )?;
    // runc hands CRIU the configuration file this annotation names, for
    // the options runc has no flag for (see `criu_config`).
    if let Some(conf) = criu_config(cfg) {
        let mut a = s.annotations().clone().unwrap_or_default();
        a.insert("org.criu.config".into(), conf.to_string_lossy().into_owned());
        s.set_annotations(Some(a));
    }
    spec::write(&s, &bundle.dir)?;
    Ok(s.process().as_ref().map(|p| p.user().uid()).unwrap_or(0))
}

/// The options ums gives CRIU beyond runc's flags, one per line:
/// `skip-in-flight`: connections a listening socket of the workload has
/// completed but not accepted yet (its accept queue, after the freeze drained
/// it for `Config::listen_drain`) are left out of the dump instead of failing
/// it (CRIU: "In-flight connection (l)"); then whatever runc's default file
/// `/etc/criu/runc.conf` says, which the annotation replaces. Written under the run dir, where
/// runc's CRIU (in this outer container's mount namespace) reads it; `None`
/// if it cannot be written (CRIU then fails on in-flight connections).
pub fn criu_config(cfg: &Config) -> Option<PathBuf> {
    let path = cfg.run_dir.join("criu.conf");
    // The annotation replaces runc's default file: keep what it says.
    let runc_default = std::fs::read_to_string("/etc/criu/runc.conf").unwrap_or_default();
    let text = format!("# written by ums: options runc has no flag for\nskip-in-flight\n{runc_default}");
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Some(path);
    }
    let _ = std::fs::create_dir_all(&cfg.run_dir);
    match std::fs::write(&path, text) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the CRIU config file");
            None
        }
    }
}

/// Pipes for the workload's stdout and stderr; the read ends are pumped to
/// our own stdout/stderr by threads that end when the workload closes them.
fn stdio_pipes() -> Result<[Stdio; 3], NestedError> {
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NestedError::Pipes)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NestedError::Pipes)?;
    pump(out_r, false);
    pump(err_r, true);
    Ok([Stdio::null(), Stdio::from(out_w), Stdio::from(err_w)])
}

fn pump(fd: OwnedFd, stderr: bool) {
    let _ = std::thread::Builder::new().name("ums-output".into()).spawn(move || {
        let mut src = std::fs::File::from(fd);
        if stderr {
            let _ = std::io::copy(&mut src, &mut std::io::stderr());
        } else {
            // stdout is line-buffered by std; flush so log followers see lines at once.
            let mut buf = [0u8; 16384];
            loop {
                match std::io::Read::read(&mut src, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&buf[..n]);
                        let _ = out.flush();
                    }
                }
            }
        }
    });
}

fn read_pid(path: &Path) -> Result<i32, NestedError> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| NestedError::PidFile { path: path.into() })
}

/// Start the workload from the image.
pub fn start(cfg: &Config, reaper: &Reaper, runtime: &Runtime) -> Result<Nested, NestedError> {
    let (_layout, img, lower) = open_image(cfg, None)?;
    let bundle = Bundle::prepare(reaper, &cfg.bundle_dir(), &lower, |_| Ok(()))?;
    let id = new_id();
    let result = (|| {
        let uid = write_spec(cfg, &img, &bundle, &id)?;
        make_netns(cfg, reaper)?;
        runtime
            .run_detached(reaper, &id, &bundle.dir, &bundle.pid_file(), stdio_pipes()?)
            .map_err(|source| NestedError::Runtime { op: "start", source })?;
        if cfg.failpoint == Some(crate::config::Failpoint::SlowStart) {
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok((read_pid(&bundle.pid_file())?, uid))
    })();
    match result {
        Ok((pid, uid)) => Ok(Nested {
            id,
            pid,
            image: image_info(cfg, &img),
            settings: Settings::from_config(cfg, &img),
            bundle,
            started: Instant::now(),
            uid,
        }),
        Err(e) => {
            let _ = runtime.delete(reaper, &id);
            bundle.teardown();
            Err(e)
        }
    }
}

/// Where the pieces of a checkpoint live inside its directory.
pub struct CheckpointDir<'a>(pub &'a Path);
impl CheckpointDir<'_> {
    pub fn images(&self) -> PathBuf {
        self.0.join("criu")
    }
    pub fn upper_diff(&self) -> PathBuf {
        self.0.join("rootfs-diff.tar")
    }
    pub fn meta(&self) -> PathBuf {
        self.0.join("ums-checkpoint.json")
    }
}

/// Restore the workload from CRIU images, its writable layer laid in place
/// by `fill_upper` first. On failure nothing of it is left behind.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    cfg: &Config,
    reaper: &Reaper,
    runtime: &Runtime,
    image_digest: &str,
    images_dir: &Path,
    work_dir: &Path,
    lazy_pages: bool,
    fill_upper: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(Nested, Duration), NestedError> {
    let t0 = Instant::now();
    let (_layout, img, lower) = open_image(cfg, Some(image_digest))?;
    let bundle = Bundle::prepare(reaper, &cfg.bundle_dir(), &lower, fill_upper)?;
    let id = new_id();
    let result = (|| {
        let uid = write_spec(cfg, &img, &bundle, &id)?;
        make_netns(cfg, reaper)?;
        let _ = std::fs::create_dir_all(work_dir);
        failpoint_before_restore(cfg)?;
        let opts = RestoreOpts {
            criu: failpoint_criu(cfg)?,
            timeout: cfg.restore_timeout,
            image_path: images_dir.into(),
            work_path: work_dir.into(),
            bundle: bundle.dir.clone(),
            pid_file: bundle.pid_file(),
            tcp_established: cfg.tcp_established,
            lazy_pages,
        };
        runtime
            .restore_detached(reaper, &id, &opts, stdio_pipes()?)
            .map_err(|source| NestedError::Runtime { op: "restore", source })?;
        Ok((read_pid(&bundle.pid_file())?, uid))
    })();
    match result {
        Ok((pid, uid)) => Ok((
            Nested {
                id,
                pid,
                image: image_info(cfg, &img),
                settings: Settings::from_config(cfg, &img),
                bundle,
                started: Instant::now(),
                uid,
            },
            t0.elapsed(),
        )),
        Err(e) => {
            let _ = runtime.delete(reaper, &id);
            bundle.teardown();
            crate::sys::remove_netns(&cfg.netns_path());
            Err(e)
        }
    }
}

/// Fault injection for the fault tests (`Config::failpoint`), just before
/// the runtime restores.
fn failpoint_before_restore(cfg: &Config) -> Result<(), NestedError> {
    match cfg.failpoint {
        Some(crate::config::Failpoint::Restore) => Err(NestedError::Failpoint("restore")),
        Some(crate::config::Failpoint::SlowRestore) => {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The CRIU program a fail point hands runc instead of the real one: a
/// script under the run dir that hangs or fails.
fn failpoint_criu(cfg: &Config) -> Result<Option<PathBuf>, NestedError> {
    use std::os::unix::fs::PermissionsExt;
    let (name, body) = match cfg.failpoint {
        Some(crate::config::Failpoint::HangRestore) => ("criu-hang", "exec sleep 1000000\n"),
        Some(crate::config::Failpoint::CriuFails) => {
            ("criu-fails", "echo 'criu: fail point criu-fails (UMS_FAILPOINT)' >&2\nexit 1\n")
        }
        _ => return Ok(None),
    };
    let path = cfg.run_dir.join(name);
    let written = std::fs::write(&path, format!("#!/bin/sh\n{body}"))
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)));
    written.map_err(|_| NestedError::Failpoint(name))?;
    Ok(Some(path))
}

/// Remove what is left of an ended (or killed) workload.
pub fn cleanup(cfg: &Config, reaper: &Reaper, runtime: &Runtime, n: &Nested) {
    let _ = runtime.delete(reaper, &n.id);
    n.bundle.teardown();
    crate::sys::remove_netns(&cfg.netns_path());
}

/// Every pid of the workload (init and its descendants), from /proc.
pub fn pids(init: i32) -> Vec<i32> {
    let mut out = vec![init];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
        i += 1;
        if out.len() > 100_000 {
            break;
        }
    }
    out
}
