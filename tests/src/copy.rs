//! Moving files between simulated hosts the way a user would without ums:
//! `tar` over one TCP connection across the link ([`tar_dir_over_tcp`]), and a
//! `criu page-server` in a destination outer container
//! ([`start_page_server`]) for `ums checkpoint --page-server`. The benchmark
//! (ums-bench section 4) and the page-server tests share these.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{Host, Outer};

/// A path inside an outer container, seen from the host.
pub fn proc_root(o: &Outer, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", o.pid1())).join(path.trim_start_matches('/'))
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

/// Waits until something in the network namespace of `pid` listens on TCP `port`.
pub fn wait_listening(pid: i32, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X} ");
    loop {
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            let listening = text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && format!("{} ", f[1]).ends_with(&needle) && f[3] == "0A"
            });
            if listening {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} in the network namespace of pid {pid}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `criu page-server` in outer container `dst` (all its namespaces: CRIU
/// needs the /proc of its pid namespace), writing into `dir`/criu there
/// (where `ums restore dir` looks for the CRIU images); returns once it
/// listens on `port`. It serves one dump and exits.
pub fn start_page_server(dst: &Outer, dir: &str, port: u16) -> anyhow::Result<Child> {
    let images = format!("{dir}/criu");
    std::fs::create_dir_all(proc_root(dst, &images))?;
    let mut child = dst
        .command("criu")
        .args(["page-server", "--images-dir", &images, "--port", &port.to_string(), "-v2"])
        .stdout(Stdio::null())
        .spawn()
        .context("spawn criu page-server in the destination outer container")?;
    if let Err(e) = wait_listening(dst.pid1(), port, Duration::from_secs(10)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}
