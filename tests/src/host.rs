//! Simulated hosts: network namespaces joined by a veth pair.
//!
//! A migration test needs two machines and a link between them. Here a host is
//! a network namespace `ums-test-<prefix>-<pid>-<rand>-a|b`; its end of the
//! veth pair is called `eth0` and has `10.X.Y.(4k+1|4k+2)/30`, with X, Y and k
//! drawn at random (X in 200..=250). Addresses only matter inside the two
//! namespaces, so concurrent tests cannot clash. A rate such as `1gbit` puts a
//! token bucket filter on both ends, the UMS testbed's link (`tbf rate 1gbit
//! burst 1mb` measured about 940 Mbit/s of TCP goodput here; burst 256kb gave
//! about 880).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::run;

/// One end of a pair made by [`Host::pair`]. Dropping it deletes its network
/// namespace (and with it the veth pair).
#[derive(Debug)]
pub struct Host {
    name: String,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
}

/// The interface name of each host's end of the link.
pub const LINK_DEV: &str = "eth0";

impl Host {
    /// Two hosts joined by a veth pair, loopback up in both, optionally rate
    /// limited (`rate`: a tc rate such as `"1gbit"`, applied on both ends).
    pub fn pair(name_prefix: &str, rate: Option<&str>) -> anyhow::Result<(Host, Host)> {
        crate::require_root();
        crate::require_tool("ip", "iproute2");
        let base = crate::unique_name(name_prefix);
        let x: u8 = 200 + rand::random::<u8>() % 51;
        let y: u8 = rand::random();
        let k: u8 = rand::random::<u8>() % 64;
        let a_addr = Ipv4Addr::new(10, x, y, 4 * k + 1);
        let b_addr = Ipv4Addr::new(10, x, y, 4 * k + 2);
        // Each Host deletes its namespace on drop, even if a later step fails.
        let a = Host::create(format!("{base}-a"), a_addr, b_addr)?;
        let b = Host::create(format!("{base}-b"), b_addr, a_addr)?;

        let tmp_a = format!("ut{:08x}a", rand::random::<u32>());
        let tmp_b = format!("{}b", &tmp_a[..tmp_a.len() - 1]);
        run(Command::new("ip")
            .args(["link", "add", &tmp_a, "netns", &a.name, "type", "veth", "peer", "name", &tmp_b, "netns", &b.name]))
        .context("creating the veth pair")?;
        for (host, dev) in [(&a, &tmp_a), (&b, &tmp_b)] {
            run(Command::new("ip").args(["-n", &host.name, "link", "set", dev, "name", LINK_DEV]))?;
            run(Command::new("ip").args([
                "-n",
                &host.name,
                "addr",
                "add",
                &format!("{}/30", host.addr),
                "dev",
                LINK_DEV,
            ]))?;
            run(Command::new("ip").args(["-n", &host.name, "link", "set", LINK_DEV, "up"]))?;
            if let Some(rate) = rate {
                crate::require_tool("tc", "iproute2");
                run(Command::new("tc").args([
                    "-n", &host.name, "qdisc", "add", "dev", LINK_DEV, "root", "tbf", "rate", rate, "burst", "1mb",
                    "latency", "50ms",
                ]))
                .context("adding the rate limit")?;
            }
        }
        Ok((a, b))
    }

    /// A host with only loopback, for [`Host::link`] (a client host that
    /// reaches both hosts of a pair, say). Its `addr` is unspecified.
    pub fn isolated(name_prefix: &str) -> anyhow::Result<Host> {
        crate::require_root();
        Host::create(crate::unique_name(name_prefix), Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
    }

    /// The network namespace of process `pid` (a container that an engine
    /// made with no network, say) as a host: named with `ip netns attach`,
    /// loopback up, for [`Host::link`]. Dropping it removes the name only;
    /// the namespace lives as long as its processes.
    pub fn attach(name_prefix: &str, pid: i32) -> anyhow::Result<Host> {
        crate::require_root();
        let name = crate::unique_name(name_prefix);
        run(Command::new("ip").args(["netns", "attach", &name, &pid.to_string()]))
            .with_context(|| format!("naming the network namespace of pid {pid}"))?;
        let host = Host { name, addr: Ipv4Addr::UNSPECIFIED, peer: Ipv4Addr::UNSPECIFIED };
        run(Command::new("ip").args(["-n", &host.name, "link", "set", "lo", "up"]))?;
        Ok(host)
    }

    /// Another veth pair, between this host and `other`, on a /30 of its own
    /// (devices `ul<8 hex>a|b`); returns (this end's address, the other
    /// end's address). No rate limit.
    pub fn link(&self, other: &Host) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
        let x: u8 = 200 + rand::random::<u8>() % 51;
        let y: u8 = rand::random();
        let k: u8 = rand::random::<u8>() % 64;
        let (mine, theirs) = (Ipv4Addr::new(10, x, y, 4 * k + 1), Ipv4Addr::new(10, x, y, 4 * k + 2));
        let tmp_a = format!("ul{:08x}a", rand::random::<u32>());
        let tmp_b = format!("{}b", &tmp_a[..tmp_a.len() - 1]);
        run(Command::new("ip").args([
            "link",
            "add",
            &tmp_a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &tmp_b,
            "netns",
            &other.name,
        ]))
        .context("creating the veth pair")?;
        for (host, dev, addr) in [(self, &tmp_a, mine), (other, &tmp_b, theirs)] {
            run(Command::new("ip").args(["-n", &host.name, "addr", "add", &format!("{addr}/30"), "dev", dev]))?;
            run(Command::new("ip").args(["-n", &host.name, "link", "set", dev, "up"]))?;
        }
        Ok((mine, theirs))
    }

    fn create(name: String, addr: Ipv4Addr, peer: Ipv4Addr) -> anyhow::Result<Host> {
        run(Command::new("ip").args(["netns", "add", &name])).context("creating a network namespace")?;
        let host = Host { name, addr, peer };
        run(Command::new("ip").args(["-n", &host.name, "link", "set", "lo", "up"]))?;
        Ok(host)
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This host's address on the link.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The other host's address.
    pub fn peer_addr(&self) -> Ipv4Addr {
        self.peer
    }

    /// The namespace's path, for `nsenter --net=` and `outer.sh --netns`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Run `f` on a thread that lives in this host's network namespace (a
    /// client on this host, say).
    pub fn spawn_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> std::thread::JoinHandle<R> {
        in_netns(self.netns_path(), f)
    }

    /// A command that runs `program` inside this host's network namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("warning: could not delete network namespace {}: {out:?}", self.name);
        }
    }
}

/// Run `f` on a thread that lives in the network namespace at `netns`.
pub fn in_netns<R: Send + 'static>(
    netns: PathBuf,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let ns = std::fs::File::open(&netns).expect("the network namespace");
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}
