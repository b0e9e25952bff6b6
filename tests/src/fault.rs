//! A TCP proxy that sits inside a test host's network namespace between a
//! migration's source and destination, and breaks the stream on purpose: cut
//! it after N bytes, or flip one byte, or take the link down for a while.
//! Only the first connection (or the nth ones, with `start_on` and
//! `start_on_each`) gets the fault; the others (a retry, the source's status
//! query) pass untouched, except during an outage.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Close both directions once this many bytes went source -> destination.
    CutAfter(u64),
    /// Invert the byte at this offset of the source -> destination stream.
    FlipByteAt(u64),
    /// Forward this many bytes source -> destination, then nothing more while
    /// keeping the connection open (a peer that stops mid-stream); hang up
    /// once the destination has.
    StallAfter(u64),
    /// Like `CutAfter`, and then an outage: for this long every new
    /// connection is closed as soon as it comes (the link is down).
    CutThenDown(u64, std::time::Duration),
}

pub struct FaultProxy {
    stop: Arc<AtomicBool>,
    port: u16,
}

impl FaultProxy {
    /// Listen on 0.0.0.0:`port` inside the namespace at `netns` and forward
    /// to `target` (an address reachable from that namespace).
    pub fn start(netns: &Path, port: u16, target: SocketAddr, fault: Fault) -> anyhow::Result<FaultProxy> {
        Self::start_on(netns, port, target, fault, 0)
    }

    /// [`FaultProxy::start`], with the fault on the `nth` connection (from
    /// 0) instead of the first; the others pass untouched.
    pub fn start_on(
        netns: &Path,
        port: u16,
        target: SocketAddr,
        fault: Fault,
        nth: usize,
    ) -> anyhow::Result<FaultProxy> {
        Self::start_on_each(netns, port, target, fault, &[nth])
    }

    /// [`FaultProxy::start`], with the fault on each of the connections
    /// numbered in `nths` (from 0).
    pub fn start_on_each(
        netns: &Path,
        port: u16,
        target: SocketAddr,
        fault: Fault,
        nths: &[usize],
    ) -> anyhow::Result<FaultProxy> {
        let nths = nths.to_vec();
        let down_until = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let ns = std::fs::File::open(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            // This thread (and the threads it starts) live in the host's netns.
            if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(anyhow::anyhow!("setns: {e}")));
                return;
            }
            let l = match TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            l.set_nonblocking(true).unwrap();
            let _ = ready_tx.send(Ok(()));
            let mut accepted = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((client, _)) => {
                        if down_until.lock().unwrap().is_some_and(|t| std::time::Instant::now() < t) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        client.set_nonblocking(false).unwrap();
                        let f = if nths.contains(&accepted) { Some(fault) } else { None };
                        accepted += 1;
                        let down = down_until.clone();
                        std::thread::spawn(move || relay(client, target, f, down));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv()??;
        Ok(FaultProxy { stop, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(
    client: TcpStream,
    target: SocketAddr,
    fault: Option<Fault>,
    down_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
) {
    let Ok(server) = TcpStream::connect(target) else { return };
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    // destination -> source: plain copy
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let (mut c, mut s) = (client, server);
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let cut = match fault {
            Some(Fault::CutAfter(limit)) => Some((limit, None)),
            Some(Fault::CutThenDown(limit, d)) => Some((limit, Some(d))),
            _ => None,
        };
        match fault {
            _ if cut.is_some_and(|(limit, _)| sent + n as u64 >= limit) => {
                let (limit, down) = cut.expect("a cut");
                if let Some(d) = down {
                    *down_until.lock().unwrap() = Some(std::time::Instant::now() + d);
                }
                let keep = (limit - sent) as usize;
                let _ = s.write_all(&chunk[..keep]);
                let _ = s.shutdown(Shutdown::Both);
                let _ = c.shutdown(Shutdown::Both);
                break;
            }
            Some(Fault::StallAfter(limit)) if sent + n as u64 >= limit => {
                let keep = (limit - sent) as usize;
                let _ = s.write_all(&chunk[..keep]);
                // Unread bytes stay queued: closing then resets the source.
                let _ = back.join();
                return;
            }
            Some(Fault::FlipByteAt(at)) if at >= sent && at < sent + n as u64 => {
                chunk[(at - sent) as usize] ^= 0xff;
            }
            _ => {}
        }
        if s.write_all(chunk).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = back.join();
}

/// A network partition between two test hosts: every packet between them is
/// dropped (iptables DROP in one host's namespace, both directions), so
/// nothing is reset and both sides only see silence. Healed on drop.
pub struct Partition {
    netns: String,
    peer: std::net::Ipv4Addr,
    on: bool,
}

impl Partition {
    fn rules(&self, op: &str) -> anyhow::Result<()> {
        let peer = self.peer.to_string();
        for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
            crate::run(std::process::Command::new("ip").args([
                "netns",
                "exec",
                &self.netns,
                "iptables",
                "-w",
                op,
                chain,
                dir,
                &peer,
                "-j",
                "DROP",
            ]))?;
        }
        Ok(())
    }

    /// Cut `host` off from its peer on the link.
    pub fn start(host: &crate::Host) -> anyhow::Result<Partition> {
        crate::require_tool("iptables", "iptables");
        let mut p = Partition { netns: host.name().to_string(), peer: host.peer_addr(), on: false };
        p.rules("-I")?;
        p.on = true;
        Ok(p)
    }

    /// Cut `host` off from `addr` only (one of several links, say).
    pub fn between(host: &crate::Host, addr: std::net::Ipv4Addr) -> anyhow::Result<Partition> {
        crate::require_tool("iptables", "iptables");
        let mut p = Partition { netns: host.name().to_string(), peer: addr, on: false };
        p.rules("-I")?;
        p.on = true;
        Ok(p)
    }

    /// Let packets through again.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if self.on {
            self.rules("-D")?;
            self.on = false;
        }
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Err(e) = self.heal() {
            eprintln!("warning: could not heal the partition in {}: {e}", self.netns);
        }
    }
}
