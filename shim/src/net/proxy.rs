//! Published ports: `ums` owns the outer container's ports and proxies them to
//! the nested container's fixed address, which is what lets it hold clients
//! while the workload is frozen and send them to wherever it runs next
//! (UMS's Frontman and CloudHopper's holding app plus HAProxy, for any TCP or
//! UDP service).
//!
//! Modes, switched by the supervisor and the migration:
//! * `Direct`: connections go to the workload here.
//! * `Hold`: during a migration's freeze new connections are accepted and
//!   wait (bounded by count and time); datagrams are dropped.
//! * `Forward(ip)`: after a successful migration, connections and datagrams
//!   go to the same port of the destination outer container, until no new
//!   connection came for the drain time; then `Closed`.
//! * `Closed`: no workload here; connections are closed at once.
//!
//! Connections already open when a migration starts are given a short time
//! to finish (`HoldConfig::in_flight`), then the freeze goes ahead; any still
//! open are closed when the workload has left (their far end moved with it).
//! Clients reconnect and are held or forwarded like new ones.
//!
//! In `Direct` mode, TCP connections skip the user-space proxy: iptables DNAT
//! rules per published TCP port (tagged `ums-publish`; PREROUTING for clients
//! from outside, OUTPUT for clients in the outer container, with
//! route_localnet and an SNAT rule for 127.0.0.1) send them to the workload
//! in the kernel, as Docker's published ports do without its userland proxy.
//! A new connection then costs what a direct one costs; the user-space proxy
//! measured 58–78% of direct throughput and +110 µs per connection on an
//! unlimited veth (docs/bench/clients.md). The rules go away before any other
//! mode takes effect, so held and forwarded connections always meet the
//! proxy; connections the kernel forwarded count as in flight (from the
//! conntrack table) when a migration drains them. UDP always uses the proxy.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// One published port: outer port → the workload's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
pub struct PortMap {
    pub outer: u16,
    pub inner: u16,
    pub proto: Proto,
}

impl FromStr for PortMap {
    type Err = String;
    /// `OUTER:INNER[/udp]`, `PORT[/tcp|/udp]` (the same on both sides).
    fn from_str(s: &str) -> Result<Self, String> {
        let (ports, proto) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some((_, other)) => return Err(format!("unknown protocol {other:?} in {s:?} (tcp or udp)")),
            None => (s, Proto::Tcp),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("bad port {p:?} in {s:?}"));
        let (outer, inner) = match ports.split_once(':') {
            Some((o, i)) => (port(o)?, port(i)?),
            None => (port(ports)?, port(ports)?),
        };
        Ok(PortMap { outer, inner, proto })
    }
}

/// The image's ExposedPorts ("8080/tcp") as port maps (same port outside).
pub fn from_exposed(exposed: &[String]) -> Vec<PortMap> {
    exposed.iter().filter_map(|e| e.parse().ok()).collect()
}

#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// Most connections held at once; more are closed.
    pub max_held: usize,
    /// Longest a connection is held before it is closed.
    pub max_hold: Duration,
    /// After a migration, forward until no new connection came for this long.
    pub drain: Duration,
    /// How long connections open at the start of a migration may finish.
    pub in_flight: Duration,
}

impl Default for HoldConfig {
    fn default() -> Self {
        HoldConfig {
            max_held: 1024,
            max_hold: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            in_flight: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Closed,
    Direct,
    Hold,
    Forward(IpAddr),
}

struct Shared {
    mode: watch::Sender<Mode>,
    target: Ipv4Addr,
    hold: HoldConfig,
    bound: Mutex<BTreeMap<(Proto, u16), u16>>,
    /// The task serving each bound port (aborted to unbind it).
    servers: Mutex<HashMap<(Proto, u16), tokio::task::AbortHandle>>,
    /// Proxied connections open to the workload here.
    active: AtomicUsize,
    held: AtomicUsize,
    held_total: AtomicU64,
    refused_total: AtomicU64,
    forwarded_total: AtomicU64,
    last_forward: Mutex<Option<Instant>>,
    /// Bumped when connections to the workload must end (it left).
    generation: watch::Sender<u64>,
    /// Held only while rules change, never by status or the drain (an async
    /// lock: iptables runs while it is held, and no worker thread waits).
    kernel: tokio::sync::Mutex<Kernel>,
    /// The in-kernel path is enabled (set once).
    kernel_enabled: std::sync::atomic::AtomicBool,
    /// The outer ports whose DNAT rule is in place, for status.
    kernel_ports: Mutex<Vec<u16>>,
}

/// Runs `iptables` with these arguments and returns its stdout (through the
/// reaper: ums is PID 1), without blocking an async worker.
pub type IptablesRunner = Box<
    dyn Fn(Vec<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

/// The in-kernel path of `Direct` mode.
#[derive(Default)]
struct Kernel {
    run: Option<IptablesRunner>,
    /// The ports whose DNAT rule is in place.
    on: std::collections::BTreeSet<PortMap>,
    /// The workload's veth, and whether it is cut off (`isolate_rules`).
    host_if: String,
    isolated: bool,
    /// Rules that let some of the workload's packets through the cut.
    exempt: Vec<Vec<String>>,
}

/// The comment that tags the rules that cut the workload's veth off.
const ISOLATE_TAG: &str = "ums-isolate";

/// `iptables` arguments that add (`-I`) or delete (`-D`) the rules that cut
/// the workload's veth `host_if` off: nothing from it (raw PREROUTING, before
/// conntrack), nothing to it (mangle POSTROUTING).
fn isolate_rules(op: &str, host_if: &str) -> [Vec<String>; 2] {
    let rule = |table: &str, chain: &str, dir: &str| -> Vec<String> {
        ["-t", table, op, chain, dir, host_if, "-m", "comment", "--comment", ISOLATE_TAG, "-j", "DROP"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    [rule("raw", "PREROUTING", "-i"), rule("mangle", "POSTROUTING", "-o")]
}

/// The comment that tags ums's DNAT rules.
const RULE_TAG: &str = "ums-publish";

/// `iptables` arguments that add (`-A`) or delete (`-D`) the DNAT rules of
/// `m`: in PREROUTING for clients from outside, and in OUTPUT for clients in
/// this namespace that address one of its own addresses (127.0.0.1 included).
fn dnat_rules(op: &str, m: PortMap, target: Ipv4Addr) -> [Vec<String>; 2] {
    let to = format!("{target}:{}", m.inner);
    let port = m.outer.to_string();
    let rule = |chain: &str, local_only: &[&str]| -> Vec<String> {
        ["-t", "nat", op, chain, "-p", "tcp", "--dport", &port]
            .iter()
            .chain(local_only.iter())
            .chain(["-m", "comment", "--comment", RULE_TAG, "-j", "DNAT", "--to-destination", &to].iter())
            .map(|s| s.to_string())
            .collect()
    };
    [rule("PREROUTING", &[]), rule("OUTPUT", &["-m", "addrtype", "--dst-type", "LOCAL"])]
}

/// The rule that gives connections from this namespace's loopback, once
/// redirected to the workload, a source the workload can answer (`gateway`,
/// the outer end of its veth `host_if`).
fn loopback_snat_rule(op: &str, target: Ipv4Addr, gateway: Ipv4Addr, host_if: &str) -> Vec<String> {
    let (dst, gw) = (format!("{target}/32"), gateway.to_string());
    ["-t", "nat", op, "POSTROUTING", "-s", "127.0.0.0/8", "-d", &dst, "-o", host_if]
        .iter()
        .chain(["-m", "comment", "--comment", RULE_TAG, "-j", "SNAT", "--to-source", &gw].iter())
        .map(|s| s.to_string())
        .collect()
}

/// The delete commands for the `ums-publish` rules in `iptables -t nat -S`
/// output (left by an earlier ums in this network namespace).
fn stale_rules(listing: &str) -> Vec<Vec<String>> {
    stale_rules_in("nat", RULE_TAG, listing)
}

/// The delete commands for the rules tagged `tag` in `iptables -t TABLE -S`
/// output.
fn stale_rules_in(table: &str, tag: &str, listing: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter(|l| l.starts_with("-A ") && l.split_whitespace().any(|w| w == tag))
        .map(|l| {
            let mut v: Vec<String> = vec!["-t".into(), table.into(), "-D".into()];
            v.extend(l.split_whitespace().skip(1).map(String::from));
            v
        })
        .collect()
}

/// Connections the kernel forwarded to `target` that are still established,
/// from `/proc/net/nf_conntrack` (this network namespace's table): entries
/// whose reply comes from `target` although the client addressed another
/// destination (DNAT), in state ESTABLISHED.
fn count_dnat_established(table: &str, target: Ipv4Addr) -> usize {
    let reply_src = format!("src={target}");
    let orig_dst = format!("dst={target}");
    table
        .lines()
        .filter(|l| l.contains(" tcp ") && l.contains(" ESTABLISHED "))
        .filter(|l| {
            let srcs: Vec<&str> = l.split_whitespace().filter(|f| f.starts_with("src=")).collect();
            let dsts: Vec<&str> = l.split_whitespace().filter(|f| f.starts_with("dst=")).collect();
            // The original tuple comes first, the reply tuple second.
            srcs.len() >= 2 && dsts.len() >= 2 && srcs[1] == reply_src && dsts[0] != orig_dst
        })
        .count()
}

/// Handle to the published ports; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    s: Arc<Shared>,
}

impl Publisher {
    pub fn new(target: Ipv4Addr, hold: HoldConfig) -> Self {
        Publisher {
            s: Arc::new(Shared {
                mode: watch::channel(Mode::Closed).0,
                target,
                hold,
                bound: Mutex::default(),
                servers: Mutex::default(),
                active: AtomicUsize::new(0),
                held: AtomicUsize::new(0),
                held_total: AtomicU64::new(0),
                refused_total: AtomicU64::new(0),
                forwarded_total: AtomicU64::new(0),
                last_forward: Mutex::new(None),
                generation: watch::channel(0).0,
                kernel: Default::default(),
                kernel_enabled: std::sync::atomic::AtomicBool::new(false),
                kernel_ports: Mutex::default(),
            }),
        }
    }

    /// Forward TCP in the kernel while in `Direct` mode, with `run` to run
    /// iptables. First removes the rules an earlier ums in this network
    /// namespace left behind. `gateway` and `host_if` are the outer end of the
    /// workload's veth: loopback clients reach the workload from there.
    pub async fn enable_kernel_path(
        &self,
        run: IptablesRunner,
        gateway: Ipv4Addr,
        host_if: &str,
    ) -> Result<(), String> {
        let rules = run(["-t", "nat", "-S"].map(String::from).to_vec()).await?;
        for stale in stale_rules(&rules) {
            run(stale).await?;
        }
        for table in ["raw", "mangle"] {
            let rules = run(["-t", table, "-S"].map(String::from).to_vec()).await.unwrap_or_default();
            for stale in stale_rules_in(table, ISOLATE_TAG, &rules) {
                run(stale).await?;
            }
        }
        // A packet from 127.0.0.1 may leave loopback only with route_localnet
        // (as kube-proxy sets it for node ports on localhost).
        std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1")
            .map_err(|e| format!("route_localnet: {e}"))?;
        run(loopback_snat_rule("-A", self.s.target, gateway, host_if)).await?;
        let mut k = self.s.kernel.lock().await;
        k.run = Some(run);
        k.on.clear();
        k.host_if = host_if.to_string();
        k.isolated = false;
        self.s.kernel_enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Puts a DNAT rule in place for every published TCP port (`on`) or
    /// none, changing only what differs (nothing without the kernel path). A
    /// rule that cannot be added leaves its port to the proxy.
    async fn kernel_rules(&self, on: bool) {
        let mut k = self.s.kernel.lock().await;
        let Some(run) = k.run.as_ref() else { return };
        let want: std::collections::BTreeSet<PortMap> = if on {
            self.s
                .bound
                .lock()
                .expect("bound")
                .iter()
                .filter(|((proto, _), _)| *proto == Proto::Tcp)
                .map(|((proto, outer), inner)| PortMap { outer: *outer, inner: *inner, proto: *proto })
                .collect()
        } else {
            Default::default()
        };
        let mut now = k.on.clone();
        for m in k.on.difference(&want) {
            let mut removed = Ok(());
            for r in dnat_rules("-D", *m, self.s.target) {
                if let Err(e) = run(r).await {
                    removed = Err(e);
                }
            }
            match removed {
                Ok(()) => {
                    now.remove(m);
                }
                Err(e) => tracing::error!(error = %e, port = m.outer, "a DNAT rule could not be removed"),
            }
        }
        for m in want.difference(&k.on) {
            let [outside, local] = dnat_rules("-A", *m, self.s.target);
            if let Err(e) = run(outside).await {
                tracing::warn!(error = %e, port = m.outer, "no in-kernel forwarding; the proxy serves it");
                continue;
            }
            if let Err(e) = run(local).await {
                // Loopback clients alone would use the proxy: keep it simple
                // and leave the whole port to the proxy.
                tracing::warn!(error = %e, port = m.outer, "no in-kernel forwarding; the proxy serves it");
                let [outside, _] = dnat_rules("-D", *m, self.s.target);
                let _ = run(outside).await;
                continue;
            }
            now.insert(*m);
        }
        if now != k.on {
            tracing::debug!(ports = now.len(), "in-kernel forwarding");
        }
        *self.s.kernel_ports.lock().expect("kernel_ports") = now.iter().map(|m| m.outer).collect();
        k.on = now;
    }

    /// Connections the kernel forwarded that are still open.
    fn kernel_in_flight(&self) -> usize {
        if !self.s.kernel_enabled.load(Ordering::Acquire) {
            return 0;
        }
        std::fs::read_to_string("/proc/net/nf_conntrack")
            .map(|t| count_dnat_established(&t, self.s.target))
            .unwrap_or(0)
    }

    /// Listen on exactly the outer ports of `maps`: bind those not yet
    /// bound, and unbind those bound for an earlier workload that `maps`
    /// lacks (or maps to another inner port).
    pub async fn publish(&self, maps: &[PortMap]) -> std::io::Result<()> {
        let stale: Vec<(Proto, u16)> = self
            .s
            .bound
            .lock()
            .expect("bound")
            .iter()
            .filter(|((proto, outer), inner)| {
                !maps.iter().any(|m| m.proto == *proto && m.outer == *outer && m.inner == **inner)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(task) = self.s.servers.lock().expect("servers").remove(&k) {
                task.abort();
            }
            self.s.bound.lock().expect("bound").remove(&k);
            tracing::info!(outer = k.1, proto = ?k.0, "unpublished port (not the workload's)");
        }
        if self.mode() == Mode::Direct {
            self.kernel_rules(true).await;
        }
        for m in maps {
            if self.s.bound.lock().expect("bound").contains_key(&(m.proto, m.outer)) {
                continue;
            }
            let addr = SocketAddr::from(([0, 0, 0, 0], m.outer));
            let task = match m.proto {
                Proto::Tcp => {
                    let l = TcpListener::bind(addr).await?;
                    tokio::spawn(serve_tcp(self.s.clone(), l, *m))
                }
                Proto::Udp => {
                    let sock = UdpSocket::bind(addr).await?;
                    tokio::spawn(serve_udp(self.s.clone(), Arc::new(sock), *m))
                }
            };
            tracing::info!(outer = m.outer, inner = m.inner, proto = ?m.proto, "published port");
            self.s.servers.lock().expect("servers").insert((m.proto, m.outer), task.abort_handle());
            self.s.bound.lock().expect("bound").insert((m.proto, m.outer), m.inner);
        }
        if self.mode() == Mode::Direct {
            self.kernel_rules(true).await;
        }
        Ok(())
    }

    pub fn mode(&self) -> Mode {
        *self.s.mode.borrow()
    }

    async fn set(&self, m: Mode) {
        tracing::debug!(mode = ?m, "published ports");
        if m != Mode::Direct {
            // Before the mode changes: from now on every new connection
            // meets the proxy, which holds or forwards it.
            self.kernel_rules(false).await;
        }
        self.s.mode.send_replace(m);
        if m == Mode::Direct {
            self.isolate(false).await;
            self.kernel_rules(true).await;
        }
    }

    /// Cut the workload's veth off (`on`), or join it again. A migration that
    /// takes established connections along cuts it before the dump: once
    /// CRIU has their state, the copy left here must neither acknowledge a
    /// client's bytes (they would be lost) nor send anything (its end, when
    /// it is killed, would close the client's connection). Conntrack keeps
    /// the connections' translation; the relay carries them afterwards. The
    /// cut holds until the workload runs here again (`Direct`): after a
    /// failed migration, or a restore here.
    async fn isolate(&self, on: bool) {
        let mut k = self.s.kernel.lock().await;
        if k.isolated == on {
            return;
        }
        let exempt = std::mem::take(&mut k.exempt);
        let Some(run) = k.run.as_ref() else { return };
        let op = if on { "-I" } else { "-D" };
        let mut ok = true;
        for mut r in exempt {
            r[2] = "-D".into();
            let _ = run(r).await;
        }
        for r in isolate_rules(op, &k.host_if) {
            if let Err(e) = run(r).await {
                tracing::error!(error = %e, on, "cutting the workload's veth off");
                ok = false;
            }
        }
        if ok || !on {
            k.isolated = on;
        }
    }

    /// The workload runs here.
    pub async fn direct(&self) {
        self.set(Mode::Direct).await;
    }

    /// The workload is about to freeze: hold new connections, and give those
    /// in flight `in_flight` to finish. Returns how many were still open.
    pub async fn hold_and_drain(&self) -> usize {
        self.set(Mode::Hold).await;
        let until = Instant::now() + self.s.hold.in_flight;
        let open = || self.s.active.load(Ordering::Acquire) + self.kernel_in_flight();
        while open() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        open()
    }

    /// Let the packets the workload's copy here sends on these connections
    /// (client address, client port, workload port) through the cut (see
    /// `isolate`): connections that did not move, whose clients must see
    /// them end (reset) when the copy here is ended.
    pub async fn let_through(&self, conns: &[(Ipv4Addr, u16, u16)]) {
        let mut k = self.s.kernel.lock().await;
        if !k.isolated {
            return;
        }
        let Some(run) = k.run.as_ref() else { return };
        let mut added = Vec::new();
        for (client, client_port, port) in conns {
            let r: Vec<String> = [
                "-t",
                "raw",
                "-I",
                "PREROUTING",
                "-i",
                &k.host_if,
                "-s",
                &self.s.target.to_string(),
                "-d",
                &client.to_string(),
                "-p",
                "tcp",
                "--sport",
                &port.to_string(),
                "--dport",
                &client_port.to_string(),
                "-m",
                "comment",
                "--comment",
                ISOLATE_TAG,
                "-j",
                "ACCEPT",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            match run(r.clone()).await {
                Ok(_) => added.push(r),
                Err(e) => tracing::warn!(error = %e, "a connection left behind may not see its reset"),
            }
        }
        k.exempt.extend(added);
    }

    /// As `hold_and_drain`, for a migration that takes the connections the
    /// kernel forwarded along (`net::relay`): only the proxy's own
    /// connections, which cannot move, are given time to finish.
    /// The workload's veth is then cut off (see `isolate`) until it runs
    /// here again.
    pub async fn hold_and_drain_proxied(&self) -> usize {
        self.set(Mode::Hold).await;
        let until = Instant::now() + self.s.hold.in_flight;
        let open = || self.s.active.load(Ordering::Acquire);
        while open() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let still = open();
        self.isolate(true).await;
        still
    }

    /// The workload left for `ip`: end connections to the old copy, send
    /// held and new clients there until the drain time passes quietly.
    pub async fn forward_to(&self, ip: IpAddr) {
        self.s.generation.send_modify(|g| *g += 1);
        *self.s.last_forward.lock().expect("last_forward") = Some(Instant::now());
        self.set(Mode::Forward(ip)).await;
        let p = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(p.s.hold.drain / 4).await;
                if p.mode() != Mode::Forward(ip) {
                    return;
                }
                let last = p.s.last_forward.lock().expect("last_forward").unwrap_or_else(Instant::now);
                if last.elapsed() >= p.s.hold.drain {
                    tracing::info!(to = %ip, "no new clients for the drain time; stop forwarding");
                    p.set(Mode::Closed).await;
                    return;
                }
            }
        });
    }

    /// No workload here any more and nowhere to forward to.
    pub async fn close(&self) {
        self.s.generation.send_modify(|g| *g += 1);
        self.set(Mode::Closed).await;
    }

    pub fn status(&self) -> serde_json::Value {
        let ports: Vec<serde_json::Value> = self
            .s
            .bound
            .lock()
            .expect("bound")
            .iter()
            .map(|((proto, outer), inner)| serde_json::json!({ "proto": proto, "outer": outer, "inner": inner }))
            .collect();
        serde_json::json!({
            "mode": self.mode(),
            "ports": ports,
            "open_connections": self.s.active.load(Ordering::Relaxed),
            "kernel_forwarded_ports": self.s.kernel_ports.lock().expect("kernel_ports").clone(),
            "kernel_open_connections": self.kernel_in_flight(),
            "held_now": self.s.held.load(Ordering::Relaxed),
            "held_total": self.s.held_total.load(Ordering::Relaxed),
            "refused_total": self.s.refused_total.load(Ordering::Relaxed),
            "forwarded_total": self.s.forwarded_total.load(Ordering::Relaxed),
        })
    }
}

async fn serve_tcp(s: Arc<Shared>, l: TcpListener, m: PortMap) {
    loop {
        let (client, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, port = m.outer, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(handle_tcp(s.clone(), client, m));
    }
}

/// Where a connection goes once it may go somewhere.
async fn route(s: &Shared, m: PortMap) -> Option<(SocketAddr, bool)> {
    let mut rx = s.mode.subscribe();
    let mut held = false;
    let deadline = tokio::time::Instant::now() + s.hold.max_hold;
    let out = loop {
        let mode = *rx.borrow_and_update();
        match mode {
            Mode::Closed => break None,
            Mode::Direct => break Some((SocketAddr::from((s.target, m.inner)), true)),
            Mode::Forward(ip) => {
                *s.last_forward.lock().expect("last_forward") = Some(Instant::now());
                s.forwarded_total.fetch_add(1, Ordering::Relaxed);
                break Some((SocketAddr::new(ip, m.outer), false));
            }
            Mode::Hold => {
                if !held {
                    if s.held.load(Ordering::Acquire) >= s.hold.max_held {
                        s.refused_total.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    s.held.fetch_add(1, Ordering::AcqRel);
                    s.held_total.fetch_add(1, Ordering::Relaxed);
                    held = true;
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => break None,
                }
            }
        }
    };
    if held {
        s.held.fetch_sub(1, Ordering::AcqRel);
    }
    out
}

async fn handle_tcp(s: Arc<Shared>, client: TcpStream, m: PortMap) {
    let Some((to, local)) = route(&s, m).await else { return };
    let mut gen = s.generation.subscribe();
    gen.borrow_and_update();
    let upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
        Ok(Ok(u)) => u,
        _ => {
            tracing::debug!(%to, "nothing answers behind the published port; closing the client");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if local {
        s.active.fetch_add(1, Ordering::AcqRel);
    }
    tokio::select! {
        _ = splice_bidirectional(&client, &upstream) => {}
        // The workload left: this connection's far end is gone.
        _ = gen.changed(), if local => {}
    }
    if local {
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Move bytes both ways between two sockets with splice(2) through a pipe,
/// so they never enter user space; each direction ends with a half-close.
/// An error in either direction ends both.
async fn splice_bidirectional(a: &TcpStream, b: &TcpStream) -> std::io::Result<()> {
    let ab = splice_one_way(a, b);
    let ba = splice_one_way(b, a);
    tokio::pin!(ab, ba);
    tokio::select! {
        r = &mut ab => { r?; ba.await.map(|_| ()) }
        r = &mut ba => { r?; ab.await.map(|_| ()) }
    }
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> std::io::Result<u64> {
    use nix::fcntl::{splice, SpliceFFlags};
    use std::os::fd::{AsFd, AsRawFd};
    use tokio::io::Interest;
    const CHUNK: usize = 1 << 20;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let (pr, pw) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // The default pipe (64 KiB) serves requests and answers; a stream that
    // fills it is bulk, and gets a bigger pipe so each call moves more.
    let mut grown = false;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pw.as_fd(), None, CHUNK, flags).map_err(std::io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(total);
        }
        if !grown && n >= 64 << 10 {
            grown = true;
            let _ = nix::fcntl::fcntl(pw.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pr.as_fd(), None, to.as_fd(), None, left, flags).map_err(std::io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// UDP: one socket per client and destination carries its datagrams, and a
/// task sends the replies back; sessions end after a minute of silence.
async fn serve_udp(s: Arc<Shared>, sock: Arc<UdpSocket>, m: PortMap) {
    let mut sessions: HashMap<(SocketAddr, SocketAddr), (Arc<UdpSocket>, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(_) => continue,
        };
        let to = match *s.mode.borrow() {
            Mode::Direct => SocketAddr::from((s.target, m.inner)),
            Mode::Forward(ip) => SocketAddr::new(ip, m.outer),
            Mode::Hold | Mode::Closed => continue,
        };
        sessions.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(60));
        let key = (from, to);
        let up = match sessions.get_mut(&key) {
            Some((up, t)) => {
                *t = Instant::now();
                up.clone()
            }
            None => {
                let Ok(up) = UdpSocket::bind("0.0.0.0:0").await else { continue };
                if up.connect(to).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                let (up2, back) = (up.clone(), sock.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(60), up2.recv(&mut b)).await {
                        let _ = back.send_to(&b[..n], from).await;
                    }
                });
                sessions.insert(key, (up.clone(), Instant::now()));
                up
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_rules_and_their_cleanup() {
        let m = PortMap { outer: 80, inner: 8080, proto: Proto::Tcp };
        let [outside, local] = dnat_rules("-A", m, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(
            outside.join(" "),
            "-t nat -A PREROUTING -p tcp --dport 80 -m comment --comment ums-publish -j DNAT --to-destination 10.88.0.2:8080"
        );
        assert_eq!(
            local.join(" "),
            "-t nat -A OUTPUT -p tcp --dport 80 -m addrtype --dst-type LOCAL -m comment --comment ums-publish \
             -j DNAT --to-destination 10.88.0.2:8080"
        );
        let snat = loopback_snat_rule("-A", Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 1), "ums0");
        assert_eq!(
            snat.join(" "),
            "-t nat -A POSTROUTING -s 127.0.0.0/8 -d 10.88.0.2/32 -o ums0 -m comment --comment ums-publish \
             -j SNAT --to-source 10.88.0.1"
        );
        let listing = "-P PREROUTING ACCEPT\n\
            -A PREROUTING -p tcp -m tcp --dport 80 -m comment --comment ums-publish -j DNAT --to-destination 10.88.0.2:8080\n\
            -A PREROUTING -p tcp -m tcp --dport 22 -j DNAT --to-destination 10.0.0.9:22\n\
            -A POSTROUTING -s 127.0.0.0/8 -d 10.88.0.2/32 -o ums0 -m comment --comment ums-publish -j SNAT --to-source 10.88.0.1\n";
        let stale = stale_rules(listing);
        assert_eq!(stale.len(), 2, "only ums's own rules");
        assert_eq!(&stale[0][..4], &["-t", "nat", "-D", "PREROUTING"]);
        assert_eq!(&stale[1][..4], &["-t", "nat", "-D", "POSTROUTING"]);
        assert!(stale[0].contains(&"10.88.0.2:8080".to_string()));
        let [from, to] = isolate_rules("-I", "ums0");
        assert_eq!(from.join(" "), "-t raw -I PREROUTING -i ums0 -m comment --comment ums-isolate -j DROP");
        assert_eq!(to.join(" "), "-t mangle -I POSTROUTING -o ums0 -m comment --comment ums-isolate -j DROP");
        let listing = format!("-P PREROUTING ACCEPT\n{}\n", isolate_rules("-A", "ums0")[0][2..].join(" "));
        let stale = stale_rules_in("raw", ISOLATE_TAG, &listing);
        assert_eq!(stale, vec![isolate_rules("-D", "ums0")[0].clone()]);
    }

    #[test]
    fn counts_only_established_connections_the_kernel_forwarded() {
        let table = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.9.0.2 dst=10.9.0.1 sport=40000 dport=80 src=10.88.0.2 dst=10.9.0.2 sport=8080 dport=40000 [ASSURED] mark=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.88.0.1 dst=10.88.0.2 sport=50000 dport=8080 src=10.88.0.2 dst=10.88.0.1 sport=8080 dport=50000 [ASSURED] mark=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=10.9.0.2 dst=10.9.0.1 sport=40001 dport=80 src=10.88.0.2 dst=10.9.0.2 sport=8080 dport=40001 [ASSURED] mark=0 use=1
ipv4     2 udp      17 29 src=10.9.0.2 dst=10.9.0.1 sport=5353 dport=53 src=10.88.0.2 dst=10.9.0.2 sport=53 dport=5353 mark=0 use=1
ipv4     2 tcp      6 431999 ESTABLISHED src=10.88.0.2 dst=1.1.1.1 sport=41000 dport=443 src=1.1.1.1 dst=10.9.0.1 sport=443 dport=41000 [ASSURED] mark=0 use=1
";
        assert_eq!(count_dnat_established(table, Ipv4Addr::new(10, 88, 0, 2)), 1);
        assert_eq!(count_dnat_established("", Ipv4Addr::new(10, 88, 0, 2)), 0);
    }

    #[test]
    fn port_maps_parse() {
        assert_eq!("8080:80".parse::<PortMap>().unwrap(), PortMap { outer: 8080, inner: 80, proto: Proto::Tcp });
        assert_eq!("53/udp".parse::<PortMap>().unwrap(), PortMap { outer: 53, inner: 53, proto: Proto::Udp });
        assert_eq!("5353:53/udp".parse::<PortMap>().unwrap().proto, Proto::Udp);
        assert!("0:80".parse::<PortMap>().is_err());
        assert!("80/sctp".parse::<PortMap>().is_err());
        assert!("x".parse::<PortMap>().is_err());
        assert_eq!(from_exposed(&["8080/tcp".into(), "bad".into()]).len(), 1);
    }

    async fn echo_server() -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (port, h)
    }

    async fn roundtrip(port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = TcpStream::connect(("127.0.0.1", port)).await?;
        c.write_all(msg).await?;
        c.shutdown().await?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Held connections wait through the freeze and are served after it;
    /// beyond the limit they are closed; a port with nothing behind it closes.
    #[tokio::test]
    async fn holds_then_serves_and_bounds_the_hold() {
        let (inner, _srv) = echo_server().await;
        let outer = free_port();
        let p = Publisher::new(Ipv4Addr::LOCALHOST, HoldConfig { max_held: 2, ..Default::default() });
        p.publish(&[PortMap { outer, inner, proto: Proto::Tcp }]).await.unwrap();
        p.direct().await;
        assert_eq!(roundtrip(outer, b"a").await.unwrap(), b"a");
        assert_eq!(p.hold_and_drain().await, 0);
        let h1 = tokio::spawn(roundtrip(outer, b"held-1"));
        let h2 = tokio::spawn(roundtrip(outer, b"held-2"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.status()["held_now"], 2);
        // The third is over the limit: a clean close, no data.
        assert_eq!(roundtrip(outer, b"flood").await.unwrap_or_default(), b"");
        p.direct().await;
        assert_eq!(h1.await.unwrap().unwrap(), b"held-1");
        assert_eq!(h2.await.unwrap().unwrap(), b"held-2");
        // Nothing behind a published port: closed, not hung.
        let dead = free_port();
        let outer2 = free_port();
        let first = PortMap { outer, inner, proto: Proto::Tcp };
        p.publish(&[first, PortMap { outer: outer2, inner: dead, proto: Proto::Tcp }]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(6), roundtrip(outer2, b"x")).await.unwrap();
        assert_eq!(r.unwrap_or_default(), b"");
        p.close().await;
        assert_eq!(roundtrip(outer, b"closed").await.unwrap_or_default(), b"");
    }

    /// A workload with other ports: exactly its ports are published.
    #[tokio::test]
    async fn publishes_exactly_the_workload_s_ports() {
        let (inner, _srv) = echo_server().await;
        let (old, new) = (free_port(), free_port());
        let p = Publisher::new(Ipv4Addr::LOCALHOST, HoldConfig::default());
        p.publish(&[PortMap { outer: old, inner, proto: Proto::Tcp }]).await.unwrap();
        p.direct().await;
        assert_eq!(roundtrip(old, b"a").await.unwrap(), b"a");
        p.publish(&[PortMap { outer: new, inner, proto: Proto::Tcp }]).await.unwrap();
        assert_eq!(roundtrip(new, b"b").await.unwrap(), b"b");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(("127.0.0.1", old)).await.is_err(), "the old port is no longer published");
        assert_eq!(p.status()["ports"].as_array().unwrap().len(), 1);
    }
}
