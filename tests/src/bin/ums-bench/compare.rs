//! Section 4: ums beside the migration methods a user can pick today, in the
//! same run, on the same two hosts (issue 7):
//!
//! 1. **ums**: `ums migrate` (streaming dump, mutual TLS);
//! 2. **stop-then-copy**, UMS's container-level method reproduced in the same
//!    outer containers: `ums checkpoint --stop` to the source's tmpfs, the
//!    whole directory (CRIU images and the writable layer) copied with tar
//!    over TCP once the dump has ended, then `ums restore` at the destination;
//! 3. **CRIU page server**: `criu page-server` started in the destination
//!    outer container, `ums checkpoint --stop --page-server` sends the pages
//!    to it while dumping, the other image files and the writable layer
//!    follow with tar over TCP, then `ums restore`;
//! 4. **podman**: `podman container checkpoint --export`, the archive copied
//!    over TCP, `podman container restore --import`, each host with its own
//!    podman (its own storage) (`podman.rs`).
//!
//! Every method moves the same memctr workload between the same two network
//! namespaces over the same (rate-limited) veth pair. Migration time is the
//! bench's own clock from the first command of the method until the command
//! that starts the workload at the destination returned; downtime is the gap
//! in the workload's counter minus its print interval (UMS section IV-B);
//! "link MiB" counts the bytes both hosts sent on the link (`ip -s link`).

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ums_e2e::{Host, OciImage, Outer, Tick};

use crate::common::*;

/// Long enough for a 1 GiB workload to touch its memory on a busy machine.
pub const START: Duration = Duration::from_secs(240);
pub const CONTINUE: Duration = Duration::from_secs(120);
/// The port ums listens on for peers in every outer container.
const PEER_PORT: u16 = 7411;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Ums,
    StopCopy,
    PageServer,
    Podman,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Ums, Method::StopCopy, Method::PageServer, Method::Podman];

    /// The name used on the command line (`--methods`).
    pub fn key(self) -> &'static str {
        match self {
            Method::Ums => "ums",
            Method::StopCopy => "stop-copy",
            Method::PageServer => "page-server",
            Method::Podman => "podman",
        }
    }

    /// The name used in tables and the plot's legend.
    pub fn title(self) -> &'static str {
        match self {
            Method::Ums => "ums migrate",
            Method::StopCopy => "stop-then-copy (UMS container-level)",
            Method::PageServer => "CRIU page server",
            Method::Podman => "podman checkpoint --export / restore --import",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Method> {
        Method::ALL.into_iter().find(|m| m.key() == s).with_context(|| {
            format!("unknown method {s:?} (ums, stop-copy, page-server, podman)")
        })
    }
}

/// One workload: memctr touching `mib` MiB, as `procs` processes.
pub struct Workload {
    pub mib: u32,
    pub procs: u32,
    pub img: OciImage,
}

impl Workload {
    pub fn label(&self) -> String {
        if self.procs > 1 {
            format!("{} MiB, {} processes", self.mib, self.procs)
        } else {
            format!("{} MiB", self.mib)
        }
    }

    /// memctr's arguments (the image's Cmd).
    pub fn args(&self) -> Vec<String> {
        if self.procs > 1 {
            vec![self.mib.to_string(), self.procs.to_string()]
        } else {
            vec![self.mib.to_string()]
        }
    }
}

/// What a method needs for one figure: the two hosts, the workload, the runs.
pub struct Point<'a> {
    pub ums: &'a Path,
    pub ha: &'a Host,
    pub hb: &'a Host,
    /// `1gbit`, `unlimited`, ...
    pub link: &'a str,
    pub w: &'a Workload,
    pub runs: usize,
}

impl Point<'_> {
    pub fn label(&self, m: Method) -> String {
        format!("{}, {}, {}", m.key(), self.link, self.w.label())
    }
}

/// One migration.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// From the first command of the method until the workload runs at the destination.
    pub total_s: f64,
    /// First tick at the destination minus last tick at the source minus the print interval.
    pub downtime_s: f64,
    /// Bytes both hosts sent on the link during the migration, in MiB.
    pub link_mib: f64,
    /// The method's own phases, in order (seconds; they may overlap).
    pub phases: Vec<(&'static str, f64)>,
    /// ums only: the largest growth of a ums process's resident memory (source
    /// or destination) during the migration, in MiB.
    pub mem_mib: Option<f64>,
    /// Anything odd (a counter that did not continue, ...).
    pub notes: Vec<String>,
}

/// The runs of one method at one point.
pub struct Cell {
    pub method: Method,
    pub link: String,
    pub mib: u32,
    pub procs: u32,
    pub runs: Vec<Run>,
    /// Why the series stopped early, or why the method could not run at all.
    pub error: Option<String>,
}

// ------------------------------------------------------------------ helpers

/// Bytes sent on the link so far by both hosts (`ip -s link` of `eth0`).
pub fn link_tx_bytes(ha: &Host, hb: &Host) -> anyhow::Result<u64> {
    let mut sum = 0;
    for h in [ha, hb] {
        let out = ums_e2e::run(Command::new("ip").args(["-n", h.name(), "-s", "-j", "link", "show", ums_e2e::host::LINK_DEV]))?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("ip -s -j link: {out}"))?;
        sum += v[0]["stats64"]["tx"]["bytes"].as_u64().with_context(|| format!("no tx bytes in {out}"))?;
    }
    Ok(sum)
}

/// Counts the link's bytes from its creation until [`LinkMeter::mib`].
pub struct LinkMeter<'a> {
    ha: &'a Host,
    hb: &'a Host,
    start: u64,
}

impl<'a> LinkMeter<'a> {
    pub fn start(ha: &'a Host, hb: &'a Host) -> anyhow::Result<Self> {
        Ok(LinkMeter { ha, hb, start: link_tx_bytes(ha, hb)? })
    }

    pub fn mib(&self) -> anyhow::Result<f64> {
        Ok((link_tx_bytes(self.ha, self.hb)? - self.start) as f64 / 1048576.0)
    }
}

/// Downtime seen by the workload, and a note when the counter did not go on
/// from where it stopped.
pub fn downtime(last_src: Tick, first_dst: Tick, notes: &mut Vec<String>) -> f64 {
    if first_dst.n != last_src.n + 1 {
        notes.push(format!("counter: source ended at {}, destination began at {}", last_src.n, first_dst.n));
    }
    (first_dst.unix_ms as f64 - last_src.unix_ms as f64 - TICK_MS) / 1000.0
}

/// Runs `f` on a thread that joined the network namespace at `netns` (the
/// sockets it makes stay in that namespace).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> std::io::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<T> {
            let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {}", netns.display()))?;
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
    })
}

/// Streams `producer`'s stdout into `consumer`'s stdin over one TCP
/// connection from host `src` to host `dst` (across the link, so the rate
/// limit applies), and waits for both to succeed.
pub fn pipe_over_tcp(src: &Host, producer: Command, dst: &Host, consumer: Command) -> anyhow::Result<()> {
    let (mut producer, mut consumer) = (producer, consumer);
    let addr = dst.addr();
    let listener = in_netns(&dst.netns_path(), || TcpListener::bind((addr, 0)))?;
    let port = listener.local_addr()?.port();
    let out = in_netns(&src.netns_path(), || TcpStream::connect((addr, port)))?;
    let (inp, _) = listener.accept()?;
    drop(listener);
    consumer.stdin(Stdio::from(OwnedFd::from(inp)));
    let mut c = consumer.spawn().with_context(|| format!("spawn {consumer:?}"))?;
    drop(consumer); // its copy of the socket, or the consumer never sees EOF
    producer.stdout(Stdio::from(OwnedFd::from(out)));
    let p = producer.spawn().with_context(|| format!("spawn {producer:?}"));
    let pdesc = format!("{producer:?}");
    drop(producer);
    let p_status = match p {
        Ok(mut p) => p.wait()?,
        Err(e) => {
            let _ = c.kill();
            let _ = c.wait();
            return Err(e);
        }
    };
    let c_status = c.wait()?;
    if !p_status.success() {
        bail!("{pdesc} failed: {p_status}");
    }
    if !c_status.success() {
        bail!("the receiving end failed: {c_status}");
    }
    Ok(())
}

/// `tar` of a directory inside outer `src` into the same path inside outer
/// `dst`, over TCP from host `hsrc` to host `hdst`.
pub fn tar_dir_over_tcp(src: &Outer, hsrc: &Host, dst: &Outer, hdst: &Host, dir: &str) -> anyhow::Result<()> {
    let from = proc_root(src, dir);
    let to = proc_root(dst, dir);
    std::fs::create_dir_all(&to).with_context(|| format!("mkdir {}", to.display()))?;
    let mut tar_c = Command::new("tar");
    tar_c.arg("-C").arg(&from).args(["-cf", "-", "."]).stderr(Stdio::inherit());
    let mut tar_x = Command::new("tar");
    tar_x.arg("-C").arg(&to).args(["-xf", "-"]).stdout(Stdio::null());
    pipe_over_tcp(hsrc, tar_c, hdst, tar_x)
}

/// A path inside an outer container, seen from the host.
pub fn proc_root(o: &Outer, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", o.pid1())).join(path.trim_start_matches('/'))
}
