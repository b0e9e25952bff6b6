//! The relay: TCP connections a client opened to a published port before a
//! migration keep working after it (issue 16).
//!
//! CRIU dumps and restores the workload's established sockets
//! (`--tcp-established`); what is left is getting their packets there. A
//! connection the kernel forwarded (DNAT) is known to the client as
//! `source-outer:port`, and the source's conntrack keeps rewriting its packets
//! to the workload's fixed address. So, after the move:
//!
//! * at the source, a TUN device `umsrelay-out` takes the route to the
//!   workload's address (`/32`): with no workload here, only those old
//!   connections still go there (new ones meet the proxy, which forwards
//!   them). Its packets travel, length-prefixed, over one more connection to
//!   the destination's peer port (mutual TLS with the group's keys, like
//!   every peer connection), which the destination writes into its TUN
//!   device `umsrelay-in`; the kernel forwards them to the restored workload.
//! * at the destination, the workload's answers on exactly those connections
//!   (`ip rule` per 4-tuple, from the veth) go to a routing table whose
//!   default is `umsrelay-in`, back over the stream, out of the source's TUN,
//!   where conntrack rewrites them to come from the address the client knows.
//!
//! Both ends write only packets of the carried connections (checked per
//! packet, `Flows::admits_*`). The source ends the relay once conntrack has
//! none of them open any more; the destination ends its half when the stream
//! closes. A move back to the source ends the relay there before the restore
//! (the connections come home; conntrack sends them to the veth again).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

use crate::config::Config;
use crate::migration::transport::{PeerRead, PeerWrite};
use crate::migration::wire::{self, Kind};
use crate::process::exec;
use crate::process::reaper::Reaper;

/// The source's TUN device.
pub const OUT_DEV: &str = "umsrelay-out";
/// The destination's TUN device.
pub const IN_DEV: &str = "umsrelay-in";
/// The destination's routing table for the answers of carried connections.
pub const TABLE: u32 = 4188;
/// The priority of the destination's rules (before `main`, 32766).
const RULE_PREF: u32 = 4188;
/// The tag of the destination's NAT exemption.
const RULE_TAG: &str = "ums-relay";
/// A prepared destination half that no source connects to ends after this.
const IN_WAIT: Duration = Duration::from_secs(60);
/// The source checks conntrack this often for carried connections still open.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// After the last carried connection closed, the relay lasts this long more
/// (the last ACKs of the close, a retransmitted FIN).
const LINGER: Duration = Duration::from_secs(2);

/// One TCP connection a client opened through a published port: the client's
/// address and port, and the workload's (inner) port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Flow {
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub port: u16,
}

/// One line of `/proc/net/nf_conntrack` (TCP, IPv4): the state, the
/// original and the reply tuple (src, sport, dst, dport).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    state: String,
    orig: (Ipv4Addr, u16, Ipv4Addr, u16),
    reply: (Ipv4Addr, u16, Ipv4Addr, u16),
}

fn parse_conntrack(table: &str) -> Vec<Entry> {
    table
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() != Some(&"ipv4") || w.get(2) != Some(&"tcp") {
                return None;
            }
            let state = w.get(5)?.to_string();
            let get = |key: &str, nth: usize| w.iter().filter_map(|f| f.strip_prefix(key)).nth(nth);
            let ip = |key: &str, nth: usize| get(key, nth)?.parse::<Ipv4Addr>().ok();
            let port = |key: &str, nth: usize| get(key, nth)?.parse::<u16>().ok();
            Some(Entry {
                state,
                orig: (ip("src=", 0)?, port("sport=", 0)?, ip("dst=", 0)?, port("dport=", 0)?),
                reply: (ip("src=", 1)?, port("sport=", 1)?, ip("dst=", 1)?, port("dport=", 1)?),
            })
        })
        .collect()
}

/// Still a connection (not closed, not waiting out its TIME_WAIT).
fn open_state(s: &str) -> bool {
    !matches!(s, "TIME_WAIT" | "CLOSE" | "SYN_SENT" | "NONE")
}

/// The connections the kernel forwarded to `target` (DNAT: the reply comes
/// from it although the client addressed another address) that are still
/// open: what a dump with `--tcp-established` takes along.
pub fn dnat_flows(table: &str, target: Ipv4Addr) -> Vec<Flow> {
    let mut v: Vec<Flow> = parse_conntrack(table)
        .into_iter()
        .filter(|e| open_state(&e.state) && e.state != "SYN_RECV")
        .filter(|e| e.reply.0 == target && e.orig.2 != target && e.orig.0 == e.reply.2)
        .map(|e| Flow { client: e.orig.0, client_port: e.orig.1, port: e.reply.1 })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// How many of `flows` conntrack still has open, either way round (the
/// source's DNAT entries, or the destination's entries of packets the relay
/// brought in or the workload sent out).
fn open_flows(table: &str, target: Ipv4Addr, flows: &HashSet<Flow>) -> usize {
    let mut seen = HashSet::new();
    for e in parse_conntrack(table).into_iter().filter(|e| open_state(&e.state)) {
        let f = if e.reply.0 == target {
            Flow { client: e.reply.2, client_port: e.reply.3, port: e.reply.1 }
        } else if e.orig.0 == target {
            Flow { client: e.orig.2, client_port: e.orig.3, port: e.orig.1 }
        } else {
            continue;
        };
        if flows.contains(&f) {
            seen.insert(f);
        }
    }
    seen.len()
}

fn conntrack() -> String {
    std::fs::read_to_string("/proc/net/nf_conntrack").unwrap_or_default()
}

/// The remote ends (address, port, local port) of the TCP sockets that a
/// process owns (inode not 0) in `/proc/PID/net/tcp` or `tcp6` text, IPv4
/// and IPv4-mapped: the connections CRIU dumps. A connection still in a
/// listening socket's accept queue has no inode, and is not dumped.
fn owned_sockets(text: &str) -> HashSet<(Ipv4Addr, u16, u16)> {
    let addr = |s: &str| -> Option<(Ipv4Addr, u16)> {
        let (ip, port) = s.split_once(':')?;
        let ip = match ip.len() {
            8 => ip,
            32 if ip.starts_with("0000000000000000FFFF0000") => &ip[24..],
            _ => return None,
        };
        let v = u32::from_str_radix(ip, 16).ok()?;
        Some((Ipv4Addr::from(v.swap_bytes()), u16::from_str_radix(port, 16).ok()?))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.get(9)?;
            if *inode == "0" {
                return None;
            }
            let (_, local_port) = addr(f.get(1)?)?;
            let (remote, remote_port) = addr(f.get(2)?)?;
            Some((remote, remote_port, local_port))
        })
        .collect()
}

/// At the dump (the workload `pid` frozen): the connections the kernel
/// forwarded to `target` that the dump takes along, to relay after the move.
/// The others (still in an accept queue, not dumped) are let through the
/// cut of the workload's veth, so their clients see the reset when the copy
/// here ends, as without a relay.
pub async fn at_dump(publisher: &crate::net::proxy::Publisher, target: Ipv4Addr, pid: i32) -> Vec<Flow> {
    let mut owned = HashSet::new();
    for f in ["tcp", "tcp6"] {
        owned.extend(owned_sockets(&std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default()));
    }
    let (carried, left): (Vec<Flow>, Vec<Flow>) =
        dnat_flows(&conntrack(), target).into_iter().partition(|f| owned.contains(&(f.client, f.client_port, f.port)));
    if !left.is_empty() {
        let conns: Vec<(Ipv4Addr, u16, u16)> = left.iter().map(|f| (f.client, f.client_port, f.port)).collect();
        publisher.let_through(&conns).await;
    }
    carried
}

/// The carried connections, and which packets may pass.
#[derive(Debug, Clone)]
struct Flows {
    target: Ipv4Addr,
    set: HashSet<Flow>,
}

/// (src, dst, protocol, sport, dport) of an IPv4 packet whose first fragment
/// carries its ports.
fn ports_of(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    if ihl < 20 || p.len() < ihl + 4 || frag_offset != 0 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
    let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
    Some((src, dst, p[9], sport, dport))
}

/// The Internet checksum of `data` (ones' complement sum, folded).
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The reset a closed port answers TCP packet `p` with (RFC 9293 3.10.7.1),
/// from `p`'s destination to its source; none for a reset, or not TCP.
fn reset_for(p: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, proto, sport, dport) = ports_of(p)?;
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let tcp = p.get(ihl..)?;
    if proto != 6 || tcp.len() < 20 {
        return None;
    }
    let flags = tcp[13];
    if flags & 0x04 != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let payload = total.saturating_sub(ihl + usize::from(tcp[12] >> 4) * 4) as u32;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let (rseq, rack, rflags) = if flags & 0x10 != 0 {
        (ack, 0, 0x04)
    } else {
        let len = payload + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        (0, seq.wrapping_add(len), 0x14)
    };
    let mut r = vec![0u8; 40];
    r[0] = 0x45;
    r[2..4].copy_from_slice(&40u16.to_be_bytes());
    r[6] = 0x40; // don't fragment
    r[8] = 64;
    r[9] = 6;
    r[12..16].copy_from_slice(&dst.octets());
    r[16..20].copy_from_slice(&src.octets());
    let c = checksum(&r[..20], 0);
    r[10..12].copy_from_slice(&c.to_be_bytes());
    r[20..22].copy_from_slice(&dport.to_be_bytes());
    r[22..24].copy_from_slice(&sport.to_be_bytes());
    r[24..28].copy_from_slice(&rseq.to_be_bytes());
    r[28..32].copy_from_slice(&rack.to_be_bytes());
    r[32] = 0x50;
    r[33] = rflags;
    let pseudo: u32 = [dst.octets(), src.octets()]
        .iter()
        .flat_map(|o| [u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]])])
        .map(u32::from)
        .sum::<u32>()
        + 6
        + 20;
    let c = checksum(&r[20..], pseudo);
    r[36..38].copy_from_slice(&c.to_be_bytes());
    Some(r)
}

impl Flows {
    /// A packet from a client of a carried connection to the workload.
    fn admits_inbound(&self, p: &[u8]) -> bool {
        matches!(ports_of(p), Some((src, dst, 6, sport, dport))
            if dst == self.target && self.set.contains(&Flow { client: src, client_port: sport, port: dport }))
    }
    /// An answer of the workload on a carried connection.
    fn admits_outbound(&self, p: &[u8]) -> bool {
        matches!(ports_of(p), Some((src, dst, 6, sport, dport))
            if src == self.target && self.set.contains(&Flow { client: dst, client_port: dport, port: sport }))
    }
}

/// One half of a relay, for `ums status`.
struct Half {
    peer: Mutex<String>,
    migration_id: String,
    flows: Flows,
    started: Instant,
    /// Carried connections still open (updated by the source's watch, and
    /// read from conntrack at the destination).
    open: AtomicU64,
    packets_sent: AtomicU64,
    bytes_sent: AtomicU64,
    packets_received: AtomicU64,
    bytes_received: AtomicU64,
    /// Packets from the peer that belong to no carried connection.
    dropped: AtomicU64,
    /// Ends the half (its pump and the device).
    stop: tokio::sync::watch::Sender<bool>,
}

impl Half {
    fn new(peer: String, migration_id: String, flows: Flows) -> Arc<Half> {
        Arc::new(Half {
            peer: Mutex::new(peer),
            migration_id,
            open: AtomicU64::new(flows.set.len() as u64),
            flows,
            started: Instant::now(),
            packets_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            packets_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: tokio::sync::watch::channel(false).0,
        })
    }

    fn status(&self, live_open: Option<u64>) -> serde_json::Value {
        serde_json::json!({
            "peer": self.peer.lock().expect("peer").clone(),
            "migration_id": self.migration_id,
            "connections": self.flows.set.len(),
            "open_connections": live_open.unwrap_or_else(|| self.open.load(Ordering::Relaxed)),
            "packets_sent": self.packets_sent.load(Ordering::Relaxed),
            "bytes_sent": self.bytes_sent.load(Ordering::Relaxed),
            "packets_received": self.packets_received.load(Ordering::Relaxed),
            "bytes_received": self.bytes_received.load(Ordering::Relaxed),
            "dropped_packets": self.dropped.load(Ordering::Relaxed),
            "age_s": self.started.elapsed().as_secs_f64(),
        })
    }
}

/// Totals of the relays that ended here.
#[derive(Default)]
struct Ended {
    relays: u64,
    connections: u64,
    bytes: u64,
}

#[derive(Default)]
struct Relays {
    /// This side sends the old connections of a workload that left.
    out: Option<Arc<Half>>,
    /// This side receives them for a workload that arrived.
    inn: Option<(Arc<Half>, Option<InDevice>)>,
    ended: Ended,
}

/// The destination's device, prepared before the restore, until the
/// source's stream takes it.
struct InDevice {
    tun: OwnedFd,
    cleanup: Cleanup,
}

static RELAYS: Mutex<Option<Relays>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Relays) -> T) -> T {
    let mut g = RELAYS.lock().expect("relays");
    f(g.get_or_insert_with(Relays::default))
}

/// For `ums status`: the relays of this side, and what ended ones carried.
pub fn status(target: Ipv4Addr) -> serde_json::Value {
    let (out, inn, ended) = with(|r| {
        (
            r.out.clone(),
            r.inn.as_ref().map(|(h, _)| h.clone()),
            serde_json::json!({
                "relays": r.ended.relays,
                "connections": r.ended.connections,
                "bytes": r.ended.bytes,
            }),
        )
    });
    let inn_open = inn.as_ref().map(|h| open_flows(&conntrack(), target, &h.flows.set) as u64);
    serde_json::json!({
        "out": out.map(|h| h.status(None)),
        "in": inn.map(|h| h.status(inn_open)),
        "ended": ended,
    })
}

/// The carried connections both ways now (for the metrics and tests).
pub fn relayed_connections() -> usize {
    with(|r| {
        r.out.as_ref().map(|h| h.open.load(Ordering::Relaxed) as usize).unwrap_or(0)
            + r.inn.as_ref().map(|(h, _)| h.flows.set.len()).unwrap_or(0)
    })
}

// ---- TUN devices and the kernel's routing ----

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_int!(tun_set_iff, b'T', 202);

/// A TUN device (IPv4 packets, no header), non-blocking; it goes away with
/// the descriptor, and its routes with it.
fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("/dev/net/tun: {e}")));
    }
    // SAFETY: `fd` was just opened and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("device name {name} too long")));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as.
    unsafe { tun_set_iff(fd.as_raw_fd(), &mut req as *mut IfReq as u64) }
        .map_err(|e| std::io::Error::other(format!("TUNSETIFF {name}: {e}")))?;
    Ok(fd)
}

/// `ip -batch` with `script`; `force` goes on past errors (for cleanup).
async fn ip_batch(reaper: &Reaper, script: String, force: bool) -> Result<(), String> {
    let reaper = reaper.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut c = Command::new("ip");
        if force {
            c.arg("-force");
        }
        let mut child = c
            .args(["-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip: {e}"))?;
        let exit = reaper.watch(child.id() as i32);
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(script.as_bytes());
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        match exit.blocking_recv() {
            Ok(x) if x.success() => Ok(()),
            Ok(x) => Err(format!("ip -batch ({x}): {}", err.trim())),
            Err(_) => Err("ip -batch was not reaped".into()),
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

async fn iptables(reaper: &Reaper, args: &[&str]) -> Result<(), String> {
    let mut c = Command::new("iptables");
    c.args(args);
    exec::check(reaper, c).await.map(|_| ()).map_err(|e| e.to_string())
}

/// A relay device takes packets whose source routes elsewhere (no reverse
/// path filter), and carries IPv4 only (no IPv6 of its own, such as MLD).
fn tune_device(dev: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), "0");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
}

/// The destination's rules for the answers of `flows`: one per connection,
/// from the workload's veth to the relay's table.
fn in_rules(op: &str, host_if: &str, flows: &Flows) -> String {
    let mut s = String::new();
    let mut v: Vec<&Flow> = flows.set.iter().collect();
    v.sort();
    for f in v {
        s += &format!(
            "rule {op} pref {RULE_PREF} iif {host_if} from {t} to {c} ipproto tcp sport {p} dport {cp} table {TABLE}\n",
            t = flows.target,
            c = f.client,
            p = f.port,
            cp = f.client_port
        );
    }
    s
}

fn nat_exempt(op: &str) -> Vec<&str> {
    vec!["-t", "nat", op, "POSTROUTING", "-o", IN_DEV, "-m", "comment", "--comment", RULE_TAG, "-j", "RETURN"]
}

/// What the destination's half put in place, to take away again.
struct Cleanup {
    reaper: Reaper,
    rules: String,
}

impl Cleanup {
    async fn run(self) {
        if let Err(e) = ip_batch(&self.reaper, self.rules, true).await {
            tracing::debug!(error = %e, "relay rules");
        }
        let _ = iptables(&self.reaper, &nat_exempt("-D")).await;
    }
}

// ---- the destination's half ----

/// Before a restore here: end a relay this side sent for the workload (it
/// comes back: conntrack sends its old connections to the veth again), and
/// prepare to receive the connections `flows` of the source, so the
/// workload's answers on them never take the direct way out (its peer would
/// reset them). Returns an error only for the log: the connections are then
/// closed, as without a relay.
pub async fn before_restore(cfg: &Config, reaper: &Reaper, migration_id: &str, flows: &[Flow]) -> Result<(), String> {
    end_out("the workload comes back here").await;
    if flows.is_empty() {
        return Ok(());
    }
    end_in("a new migration arrives").await;
    let flows = Flows { target: cfg.net.address, set: flows.iter().copied().collect() };
    let tun = open_tun(IN_DEV).map_err(|e| e.to_string())?;
    tune_device(IN_DEV);
    let rules = in_rules("add", &cfg.net.host_if, &flows);
    let cleanup = Cleanup { reaper: reaper.clone(), rules: in_rules("del", &cfg.net.host_if, &flows) };
    let script = format!("link set {IN_DEV} up\nroute replace default dev {IN_DEV} table {TABLE}\n{rules}");
    if let Err(e) = ip_batch(reaper, script, false).await {
        cleanup.run().await;
        return Err(e);
    }
    // Answers that open a conntrack entry here (the workload speaks first)
    // must keep the workload's address: no masquerade on the relay.
    if let Err(e) = iptables(reaper, &nat_exempt("-I")).await {
        cleanup.run().await;
        return Err(e);
    }
    let half = Half::new(String::new(), migration_id.to_string(), flows);
    tracing::info!(connections = half.flows.set.len(), id = %migration_id, "relay prepared for the carried connections");
    with(|r| r.inn = Some((half.clone(), Some(InDevice { tun, cleanup }))));
    // A source that never connects: end it.
    tokio::spawn(async move {
        tokio::time::sleep(IN_WAIT).await;
        let unused = with(|r| matches!(&r.inn, Some((h, Some(_))) if Arc::ptr_eq(h, &half)));
        if unused {
            end_in("no source connected").await;
        }
    });
    Ok(())
}

/// A restore after `before_restore` failed: nothing to carry.
pub async fn restore_failed() {
    end_in("the restore failed").await;
}

/// End the destination's half, if any.
async fn end_in(why: &str) {
    let taken = with(|r| {
        r.inn.take().inspect(|(h, _)| {
            r.ended.relays += 1;
            r.ended.connections += h.flows.set.len() as u64;
            r.ended.bytes += h.bytes_sent.load(Ordering::Relaxed) + h.bytes_received.load(Ordering::Relaxed);
        })
    });
    if let Some((h, dev)) = taken {
        tracing::info!(why, id = %h.migration_id, "relay in ends");
        let _ = h.stop.send(true);
        if let Some(d) = dev {
            drop(d.tun);
            d.cleanup.run().await;
        }
    }
}

/// A peer's `Relay` frame on the peer port (its certificate already checked
/// by the TLS handshake): take the prepared half of that migration and carry
/// packets until either side ends.
pub async fn serve_in(
    peer: String,
    first: wire::Frame,
    r: BufReader<PeerRead>,
    mut w: BufWriter<PeerWrite>,
) -> Result<(), String> {
    let hello: RelayHello = first.parse().map_err(|e| e.to_string())?;
    let taken = with(|rel| match &mut rel.inn {
        Some((h, dev @ Some(_))) if h.migration_id == hello.migration_id => Some((h.clone(), dev.take())),
        _ => None,
    });
    let Some((half, Some(dev))) = taken else {
        let msg = format!("no relay is prepared here for migration {}", hello.migration_id);
        let _ = wire::send_json(&mut w, Kind::Error, &wire::ErrorMsg { message: msg.clone() }).await;
        return Err(msg);
    };
    *half.peer.lock().expect("peer") = peer.clone();
    wire::send_json(&mut w, Kind::RelayOk, &serde_json::json!({})).await.map_err(|e| e.to_string())?;
    tracing::info!(%peer, id = %half.migration_id, connections = half.flows.set.len(), "relay in carries");
    let InDevice { tun, cleanup } = dev;
    let result = pump(tun, r, w, half.clone(), Direction::In).await;
    // Ours still, unless something ended it meanwhile.
    let ours = with(|rel| matches!(&rel.inn, Some((h, _)) if Arc::ptr_eq(h, &half)));
    if ours {
        with(|rel| {
            rel.inn = None;
            rel.ended.relays += 1;
            rel.ended.connections += half.flows.set.len() as u64;
            rel.ended.bytes += half.bytes_sent.load(Ordering::Relaxed) + half.bytes_received.load(Ordering::Relaxed);
        });
    }
    cleanup.run().await;
    tracing::info!(id = %half.migration_id, bytes_in = half.bytes_received.load(Ordering::Relaxed),
        bytes_out = half.bytes_sent.load(Ordering::Relaxed), "relay in ended");
    result
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RelayHello {
    pub migration_id: String,
}

// ---- the source's half ----

/// After a migration to `to` succeeded: carry `flows` there until they end.
/// Runs in the background; a relay that cannot start leaves those
/// connections to their fate (their packets find no workload here).
pub fn start_out(cfg: Arc<Config>, reaper: Reaper, to: String, migration_id: String, flows: Vec<Flow>) {
    if flows.is_empty() {
        return;
    }
    tokio::spawn(async move {
        if let Err(e) = run_out(&cfg, &reaper, &to, &migration_id, flows).await {
            tracing::warn!(error = %e, peer = %to, "relay out failed; the carried connections break");
        }
    });
}

async fn run_out(cfg: &Config, reaper: &Reaper, to: &str, migration_id: &str, flows: Vec<Flow>) -> Result<(), String> {
    let flows = Flows { target: cfg.net.address, set: flows.into_iter().collect() };
    let conn = crate::migration::transport::connect(cfg, to, cfg.peer_read_timeout).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = (BufReader::with_capacity(wire::SMALL_BUF, conn.read), BufWriter::new(conn.write));
    wire::send_json(&mut w, Kind::Relay, &RelayHello { migration_id: migration_id.into() })
        .await
        .map_err(|e| e.to_string())?;
    wire::read_frame_within(&mut r, cfg.peer_read_timeout)
        .await
        .and_then(|f| f.expect::<serde_json::Value>(Kind::RelayOk))
        .map_err(|e| e.to_string())?;
    let tun = open_tun(OUT_DEV).map_err(|e| e.to_string())?;
    tune_device(OUT_DEV);
    let script = format!("link set {OUT_DEV} up\nroute replace {}/32 dev {OUT_DEV}\n", cfg.net.address);
    ip_batch(reaper, script, false).await?;
    let half = Half::new(conn.peer.clone(), migration_id.into(), flows);
    let prev = with(|r| r.out.replace(half.clone()));
    if let Some(p) = prev {
        let _ = p.stop.send(true);
    }
    tracing::info!(peer = %conn.peer, connections = half.flows.set.len(), "relay out carries");
    // Ends the relay once conntrack has none of the carried connections open.
    let watch = {
        let half = half.clone();
        let target = cfg.net.address;
        tokio::spawn(async move {
            let mut quiet_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                let open = open_flows(&conntrack(), target, &half.flows.set) as u64;
                half.open.store(open, Ordering::Relaxed);
                match (open, quiet_since) {
                    (0, None) => quiet_since = Some(Instant::now()),
                    (0, Some(t)) if t.elapsed() >= LINGER => {
                        let _ = half.stop.send(true);
                        return;
                    }
                    (0, Some(_)) => {}
                    _ => quiet_since = None,
                }
            }
        })
    };
    let result = pump(tun, r, w, half.clone(), Direction::Out).await;
    watch.abort();
    with(|r| {
        if r.out.as_ref().is_some_and(|h| Arc::ptr_eq(h, &half)) {
            r.out = None;
            r.ended.relays += 1;
            r.ended.connections += half.flows.set.len() as u64;
            r.ended.bytes += half.bytes_sent.load(Ordering::Relaxed) + half.bytes_received.load(Ordering::Relaxed);
        }
    });
    tracing::info!(
        bytes_out = half.bytes_sent.load(Ordering::Relaxed),
        bytes_in = half.bytes_received.load(Ordering::Relaxed),
        "relay out ended"
    );
    result
}

/// End the source's half, if any (the device, and its route, go with it).
async fn end_out(why: &str) {
    let h = with(|r| r.out.clone());
    if let Some(h) = h {
        tracing::info!(why, "relay out ends");
        let _ = h.stop.send(true);
        // The pump drops the device as it returns.
        for _ in 0..100 {
            if with(|r| r.out.is_none()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// ---- moving packets ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The source: packets from the TUN go to the workload, those from the
    /// peer are its answers.
    Out,
    /// The destination: the other way round.
    In,
}

/// Largest packet carried (a TUN device's MTU is 1500; GRO never applies
/// to it).
const MAX_PACKET: usize = 65535;

/// Carry packets between the TUN device and the peer stream until either
/// ends or the half is told to stop: each packet as a u16 length and its
/// bytes; writes are batched while the device has more to read.
async fn pump(
    tun: OwnedFd,
    mut r: BufReader<PeerRead>,
    mut w: BufWriter<PeerWrite>,
    half: Arc<Half>,
    dir: Direction,
) -> Result<(), String> {
    // SAFETY: the OwnedFd stays open, and the same, for the AsyncFd's life.
    let tun = Arc::new(unsafe { AsyncFd::register(tun) }.map_err(|e| e.to_string())?);
    let mut stop = half.stop.subscribe();
    let to_peer = {
        let (tun, half) = (tun.clone(), half.clone());
        async move {
            let mut buf = vec![0u8; MAX_PACKET];
            loop {
                let mut guard = tun.readable().await?;
                loop {
                    match nix::unistd::read(tun.get_ref().as_raw_fd(), &mut buf) {
                        Ok(0) => return Ok::<(), std::io::Error>(()),
                        // At the source, a connection the move did not take
                        // (not dumped: its socket was still queued, or half
                        // open) has no workload anywhere: its client gets the
                        // reset a closed port sends, not silence.
                        Ok(n) if dir == Direction::Out && !half.flows.admits_inbound(&buf[..n]) => {
                            if let Some(r) = reset_for(&buf[..n]) {
                                let _ = nix::unistd::write(tun.get_ref(), &r);
                                half.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(n) => {
                            w.write_all(&(n as u16).to_be_bytes()).await?;
                            w.write_all(&buf[..n]).await?;
                            half.packets_sent.fetch_add(1, Ordering::Relaxed);
                            half.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(nix::errno::Errno::EAGAIN) => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                w.flush().await?;
            }
        }
    };
    let from_peer = {
        let (tun, half) = (tun.clone(), half.clone());
        async move {
            let mut buf = vec![0u8; MAX_PACKET];
            loop {
                let mut len = [0u8; 2];
                match r.read_exact(&mut len).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok::<(), std::io::Error>(()),
                    Err(e) => return Err(e),
                }
                let n = usize::from(u16::from_be_bytes(len));
                r.read_exact(&mut buf[..n]).await?;
                let p = &buf[..n];
                let ok = match dir {
                    Direction::In => half.flows.admits_inbound(p),
                    Direction::Out => half.flows.admits_outbound(p),
                };
                if !ok {
                    half.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                half.packets_received.fetch_add(1, Ordering::Relaxed);
                half.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                loop {
                    match nix::unistd::write(tun.get_ref(), p) {
                        Ok(_) => break,
                        Err(nix::errno::Errno::EAGAIN) => {
                            let mut g = tun.writable().await?;
                            g.clear_ready();
                        }
                        // A packet the kernel refuses is lost, as on a wire.
                        Err(_) => break,
                    }
                }
            }
        }
    };
    // Each direction on its own task: both worker threads can carry packets.
    let mut to_peer = tokio::spawn(to_peer);
    let mut from_peer = tokio::spawn(from_peer);
    let joined = |r: Result<std::io::Result<()>, tokio::task::JoinError>, what: &str| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(e) => Err(format!("{what}: {e}")),
    };
    // Which ended first (the other is then stopped), or the half's stop.
    let first = tokio::select! {
        r = &mut to_peer => Some((true, joined(r, "to the peer"))),
        r = &mut from_peer => Some((false, joined(r, "from the peer"))),
        _ = async { let _ = stop.wait_for(|s| *s).await; } => None,
    };
    to_peer.abort();
    from_peer.abort();
    let r = match first {
        Some((true, r)) => {
            let _ = from_peer.await;
            r
        }
        Some((false, r)) => {
            let _ = to_peer.await;
            r
        }
        None => {
            let _ = to_peer.await;
            let _ = from_peer.await;
            Ok(())
        }
    };
    drop(tun);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE_TEXT: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.9.0.3 dst=10.9.0.1 sport=40000 dport=6380 src=10.88.0.2 dst=10.9.0.3 sport=6379 dport=40000 [ASSURED] mark=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.88.0.1 dst=10.88.0.2 sport=50000 dport=6379 src=10.88.0.2 dst=10.88.0.1 sport=6379 dport=50000 [ASSURED] mark=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=10.9.0.3 dst=10.9.0.1 sport=40001 dport=6380 src=10.88.0.2 dst=10.9.0.3 sport=6379 dport=40001 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 60 CLOSE_WAIT src=10.9.0.3 dst=10.9.0.1 sport=40002 dport=6380 src=10.88.0.2 dst=10.9.0.3 sport=6379 dport=40002 [ASSURED] mark=0 use=1
ipv4     2 udp      17 29 src=10.9.0.3 dst=10.9.0.1 sport=5353 dport=53 src=10.88.0.2 dst=10.9.0.3 sport=53 dport=5353 mark=0 use=1
ipv4     2 tcp      6 431999 ESTABLISHED src=10.88.0.2 dst=1.1.1.1 sport=41000 dport=443 src=1.1.1.1 dst=10.9.0.1 sport=443 dport=41000 [ASSURED] mark=0 use=1
";

    fn t() -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 2)
    }

    #[test]
    fn the_connections_to_carry_are_the_open_forwarded_ones() {
        let f = dnat_flows(TABLE_TEXT, t());
        let c = Ipv4Addr::new(10, 9, 0, 3);
        assert_eq!(
            f,
            vec![
                Flow { client: c, client_port: 40000, port: 6379 },
                Flow { client: c, client_port: 40002, port: 6379 }
            ]
        );
        assert!(dnat_flows("", t()).is_empty());
    }

    #[test]
    fn only_sockets_a_process_owns_are_dumped() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0
   1: 0200580A:18EB 0300090A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 20 4 30 10 -1
   2: 0200580A:18EB 0300090A:9C41 01 00000000:00000012 00:00000000 00000000     0        0 0 1 0 20 4 30 10 -1
";
        let c = Ipv4Addr::new(10, 9, 0, 3);
        let owned = owned_sockets(text);
        assert!(owned.contains(&(c, 40000, 6379)), "{owned:?}");
        assert!(!owned.contains(&(c, 40001, 6379)), "queued, not accepted");
        let six = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000200580A:1F90 0000000000000000FFFF00000300090A:9C42 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 20 4 30 10 -1
";
        assert_eq!(owned_sockets(six), [(c, 40002, 8080)].into_iter().collect());
    }

    #[test]
    fn open_flows_are_counted_either_way_round() {
        let c = Ipv4Addr::new(10, 9, 0, 3);
        let set: HashSet<Flow> =
            [40000, 40001, 40002, 40009].into_iter().map(|p| Flow { client: c, client_port: p, port: 6379 }).collect();
        assert_eq!(open_flows(TABLE_TEXT, t(), &set), 2, "TIME_WAIT and unknown ones are not open");
        // At the destination the entry may start with the workload's packet.
        let dest = "ipv4     2 tcp      6 300 ESTABLISHED src=10.88.0.2 dst=10.9.0.3 sport=6379 dport=40009 \
                    src=10.9.0.3 dst=10.88.0.2 sport=40009 dport=6379 mark=0 use=1\n";
        assert_eq!(open_flows(dest, t(), &set), 1);
    }

    fn packet(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn only_packets_of_carried_connections_pass() {
        let c = Ipv4Addr::new(10, 9, 0, 3);
        let flows = Flows { target: t(), set: [Flow { client: c, client_port: 40000, port: 6379 }].into() };
        let inbound = packet([10, 9, 0, 3], [10, 88, 0, 2], 6, 40000, 6379);
        let outbound = packet([10, 88, 0, 2], [10, 9, 0, 3], 6, 6379, 40000);
        assert!(flows.admits_inbound(&inbound));
        assert!(!flows.admits_outbound(&inbound));
        assert!(flows.admits_outbound(&outbound));
        assert!(!flows.admits_inbound(&outbound));
        // Another port, another client, UDP, a later fragment, garbage.
        assert!(!flows.admits_inbound(&packet([10, 9, 0, 3], [10, 88, 0, 2], 6, 40001, 6379)));
        assert!(!flows.admits_inbound(&packet([10, 9, 0, 4], [10, 88, 0, 2], 6, 40000, 6379)));
        assert!(!flows.admits_inbound(&packet([10, 9, 0, 3], [10, 88, 0, 2], 17, 40000, 6379)));
        let mut frag = inbound.clone();
        frag[7] = 8;
        assert!(!flows.admits_inbound(&frag));
        assert!(!flows.admits_inbound(&[0x60; 40]));
        assert!(!flows.admits_inbound(&[]));
    }

    #[test]
    fn a_reset_answers_a_packet_of_a_connection_left_behind() {
        let mut p = packet([10, 9, 0, 3], [10, 88, 0, 2], 6, 40000, 6379);
        p[2..4].copy_from_slice(&45u16.to_be_bytes());
        p.extend_from_slice(b"hello");
        p[32] = 0x50;
        p[33] = 0x18; // PSH ACK
        p[28..32].copy_from_slice(&777u32.to_be_bytes());
        let r = reset_for(&p).unwrap();
        assert_eq!(ports_of(&r), Some((t(), Ipv4Addr::new(10, 9, 0, 3), 6, 6379, 40000)));
        assert_eq!(&r[24..28], &777u32.to_be_bytes(), "seq = the packet's ack");
        assert_eq!(r[33], 0x04);
        assert_eq!(checksum(&r[..20], 0), 0, "IP header checksum");
        let pseudo = [10u32 * 256 + 88, 2, 10 * 256 + 9, 3, 6, 20].iter().sum::<u32>();
        assert_eq!(checksum(&r[20..], pseudo), 0, "TCP checksum");
        // A SYN gets RST|ACK acknowledging it; a reset gets nothing.
        let mut syn = packet([10, 9, 0, 3], [10, 88, 0, 2], 6, 40001, 6379);
        syn[2..4].copy_from_slice(&40u16.to_be_bytes());
        syn[32] = 0x50;
        syn[33] = 0x02;
        syn[24..28].copy_from_slice(&1000u32.to_be_bytes());
        let r = reset_for(&syn).unwrap();
        assert_eq!((&r[28..32], r[33]), (&1001u32.to_be_bytes()[..], 0x14));
        syn[33] = 0x04;
        assert!(reset_for(&syn).is_none());
    }

    #[test]
    fn rules_name_each_connection() {
        let c = Ipv4Addr::new(10, 9, 0, 3);
        let flows = Flows { target: t(), set: [Flow { client: c, client_port: 40000, port: 6379 }].into() };
        assert_eq!(
            in_rules("add", "ums0", &flows),
            "rule add pref 4188 iif ums0 from 10.88.0.2 to 10.9.0.3 ipproto tcp sport 6379 dport 40000 table 4188\n"
        );
    }
}
