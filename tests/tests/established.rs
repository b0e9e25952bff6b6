//! End-to-end: a client's open connection to a published port survives a
//! migration (issue 16). Debian's redis server runs in outer container A; a
//! client on a third host, C, opens one connection to A's published port and
//! writes through it; the workload moves to B; the same connection, used
//! again, is answered by the migrated workload (what it wrote after the move
//! is at B), through the relay from A to B. When the client closes, the
//! relay ends by itself and leaves nothing behind on either side.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;

/// One redis command on an open connection: the reply's first line.
fn cmd(c: &mut BufReader<TcpStream>, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req += &format!("${}\r\n{a}\r\n", a.len());
    }
    c.get_mut().write_all(req.as_bytes()).expect("write on the open connection");
    let mut line = String::new();
    c.read_line(&mut line).expect("read on the open connection");
    let line = line.trim_end().to_string();
    if let Some(n) = line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
        let mut v = vec![0u8; n + 2];
        std::io::Read::read_exact(c, &mut v).unwrap();
        return String::from_utf8_lossy(&v[..n]).into_owned();
    }
    line
}

/// What a host's namespace holds that the relay could leave behind: TUN
/// devices, routes to the workload's address, rules, NAT rules.
fn leftovers(h: &Host) -> Vec<String> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(["-n", h.name()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut found = Vec::new();
    for l in run(&["link", "show"]).lines().filter(|l| l.contains("umsrelay")) {
        found.push(format!("device: {l}"));
    }
    for l in run(&["route", "show", "table", "all"]).lines().filter(|l| l.contains("umsrelay") || l.contains("4188")) {
        found.push(format!("route: {l}"));
    }
    for l in run(&["rule", "show"]).lines().filter(|l| l.contains("4188")) {
        found.push(format!("rule: {l}"));
    }
    let nat = h.command("iptables").args(["-t", "nat", "-S"]).output().unwrap();
    for l in String::from_utf8_lossy(&nat.stdout).lines().filter(|l| l.contains("ums-relay")) {
        found.push(format!("iptables: {l}"));
    }
    found
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Until A forwards the published port in the kernel (DNAT): clients that
/// connect before go through the proxy, and those connections cannot move.
fn wait_kernel_path(o: &Outer) {
    wait_until("the published port is forwarded in the kernel", T, || {
        status(o)["published"]["kernel_forwarded_ports"].as_array().is_some_and(|p| p.contains(&redis::PORT.into()))
    });
}

fn fds(o: &Outer) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", o.pid1())).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_open_connection_is_answered_by_the_migrated_workload() {
    require_root();
    require_tool("iptables", "iptables");
    let tmp = tempfile::tempdir().unwrap();
    let img = redis::image(tmp.path());
    let (ha, hb) = Host::pair("est", None).unwrap();
    // The client's host reaches A only.
    let hc = Host::isolated("estc").unwrap();
    let (a_on_c, c_addr) = ha.link(&hc).unwrap();
    let a = Outer::builder("est-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("est-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("Ready to accept connections", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    wait_kernel_path(&a);
    let (fds_a, fds_b) = (fds(&a), fds(&b));

    // C opens one connection and keeps it.
    let (to_client, from_test) = std::sync::mpsc::channel::<&'static str>();
    let (to_test, from_client) = std::sync::mpsc::channel::<String>();
    let client = hc.spawn_in(move || {
        let s = {
            let until = Instant::now() + T;
            loop {
                match TcpStream::connect_timeout(&(a_on_c, redis::PORT).into(), Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > until => panic!("redis at A: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        let mut c = BufReader::new(s);
        assert_eq!(cmd(&mut c, &["SET", "before", "1"]), "+OK");
        to_test.send(cmd(&mut c, &["INCR", "n"])).unwrap();
        // After the move: the same connection.
        assert_eq!(from_test.recv().unwrap(), "moved");
        let t0 = Instant::now();
        let after = cmd(&mut c, &["SET", "after", "2"]);
        let first_ms = t0.elapsed().as_millis();
        let n = cmd(&mut c, &["INCR", "n"]);
        let before = cmd(&mut c, &["GET", "before"]);
        to_test.send(format!("{after} {n} {before} {first_ms}")).unwrap();
        assert_eq!(from_test.recv().unwrap(), "close");
        drop(c);
    });
    assert_eq!(from_client.recv_timeout(T).unwrap(), ":1");
    // A forwards it in the kernel: a conntrack entry, no proxy.
    let sa = status(&a);
    assert_eq!(sa["published"]["kernel_open_connections"], 1, "{sa}");

    let out = a.ums_ok(&["migrate", "--json", "--to", &format!("{}:{PEER_PORT}", hb.addr())]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &report["result"];
    println!(
        "migration: frozen {} ms, relayed {}, closed {}",
        r["frozen_ms"], r["relayed_connections"], r["closed_connections"]
    );
    assert_eq!(r["relayed_connections"], 1, "{r}");
    assert_eq!(r["closed_connections"], 0, "{r}");
    assert_eq!(status(&b)["state"], "running");

    to_client.send("moved").unwrap();
    let answer = from_client.recv_timeout(T).expect("the client's answers after the move");
    println!("after the move, on the old connection: {answer}");
    let f: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(&f[..3], ["+OK", ":2", "1"], "the old connection is answered by the same redis: {answer}");

    // The answer came from the migrated workload: what the old connection
    // wrote after the move is at B (read directly there, from A's host).
    let b_addr = hb.addr();
    let at_b = ha
        .spawn_in(move || {
            let mut c = redis::Client::connect(b_addr, T);
            (c.cmd(&[b"GET", b"after"]).1, c.cmd(&[b"GET", b"n"]).1)
        })
        .join()
        .unwrap();
    assert_eq!(at_b, (Some(b"2".to_vec()), Some(b"2".to_vec())), "written through the relay, read at B");

    // Both sides show the relay and what it carried.
    let (ra, rb) = (status(&a)["relay"].clone(), status(&b)["relay"].clone());
    println!("relay at A: {ra}\nrelay at B: {rb}");
    assert_eq!(ra["out"]["connections"], 1, "{ra}");
    assert_eq!(ra["out"]["open_connections"], 1, "{ra}");
    assert!(ra["out"]["bytes_sent"].as_u64().unwrap() > 0, "{ra}");
    assert!(ra["out"]["bytes_received"].as_u64().unwrap() > 0, "{ra}");
    assert_eq!(rb["in"]["connections"], 1, "{rb}");
    assert!(rb["in"]["bytes_received"].as_u64().unwrap() > 0, "{rb}");

    // The client closes: the relay ends by itself, on both sides, and leaves
    // nothing behind.
    to_client.send("close").unwrap();
    client.join().unwrap();
    wait_until("the relay ends at A", Duration::from_secs(20), || status(&a)["relay"]["out"].is_null());
    wait_until("the relay ends at B", Duration::from_secs(10), || status(&b)["relay"]["in"].is_null());
    let (ra, rb) = (status(&a)["relay"].clone(), status(&b)["relay"].clone());
    assert_eq!(ra["ended"]["relays"], 1, "{ra}");
    assert_eq!(rb["ended"]["relays"], 1, "{rb}");
    for h in [&ha, &hb] {
        assert_eq!(leftovers(h), Vec::<String>::new(), "after the relay ended, in {}", h.name());
    }
    // Descriptors: back to what they were, give or take the workload's pipes.
    let (now_a, now_b) = (fds(&a), fds(&b));
    println!("fds: A {fds_a} -> {now_a}, B {fds_b} -> {now_b}");
    assert!(now_a <= fds_a, "A holds no more descriptors than before: {fds_a} -> {now_a}");
    assert!(now_b <= fds_b + 4, "B holds only the workload's: {fds_b} -> {now_b}");
    let _ = (c_addr, Ipv4Addr::UNSPECIFIED);
}

/// `redis-benchmark` running on `host`: its progress lines ("INCR:
/// rps=... (overall: ...) avg_msec=...") with the time each arrived.
struct Bench {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Bench {
    fn start(host: &Host, to: Ipv4Addr, clients: usize, requests: u64) -> Bench {
        require_tool("redis-benchmark", "redis-tools");
        let mut child = host
            .command("redis-benchmark")
            .args(["-h", &to.to_string(), "-p", &redis::PORT.to_string(), "-c", &clients.to_string()])
            .args(["-n", &requests.to_string(), "-t", "incr"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("redis-benchmark");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            let e = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut s);
                s
            });
            let mut buf = [0u8; 4096];
            let mut cur = String::new();
            loop {
                let n = std::io::Read::read(&mut out, &mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                for ch in String::from_utf8_lossy(&buf[..n]).chars() {
                    if ch == '\r' || ch == '\n' {
                        if !cur.trim().is_empty() {
                            l2.lock().unwrap().push((Instant::now(), std::mem::take(&mut cur)));
                        }
                        cur.clear();
                    } else {
                        cur.push(ch);
                    }
                }
            }
            let e = e.join().unwrap();
            for line in e.lines().filter(|l| !l.trim().is_empty()) {
                l2.lock().unwrap().push((Instant::now(), format!("stderr: {line}")));
            }
        });
        Bench { child, lines, reader }
    }

    /// Waits for the end; returns its exit status and every line.
    fn wait(mut self, within: Duration) -> (bool, Vec<(Instant, String)>) {
        let until = Instant::now() + within;
        let ok = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.success();
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.reader.join().unwrap();
        let lines = self.lines.lock().unwrap().clone();
        (ok, lines)
    }
}

/// The "rps=N" of a progress line.
fn rps(line: &str) -> Option<f64> {
    line.split("rps=").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// The median of the progress lines' rps between `from` and `to`.
fn median_rps(lines: &[(Instant, String)], from: Instant, to: Instant) -> Option<f64> {
    let mut v: Vec<f64> = lines.iter().filter(|(t, _)| *t >= from && *t < to).filter_map(|(_, l)| rps(l)).collect();
    v.retain(|r| *r > 0.0);
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// Debian's redis server under ums; `redis-benchmark -c 50` (persistent
/// connections, INCR of one counter) from a third host through A's
/// published port while the workload moves A->B (its connections relayed
/// from A to B) and back B->A (the relay ends): no error, and the counter
/// holds exactly the number of requests (each answered, none lost or done
/// twice). Prints the rate directly, through the relay, and after the move
/// back (the 1 Gbit/s link between A and B).
#[test]
fn redis_benchmark_through_a_to_b_and_back() {
    require_root();
    require_tool("iptables", "iptables");
    let tmp = tempfile::tempdir().unwrap();
    let img = redis::image(tmp.path());
    let (ha, hb) = Host::pair("estb", Some("1gbit")).unwrap();
    let hc = Host::isolated("estbc").unwrap();
    let (a_on_c, _) = ha.link(&hc).unwrap();
    let a = Outer::builder("estb-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("estb-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("Ready to accept connections", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    wait_kernel_path(&a);
    // How fast it goes directly, to size the run: about 16 s in all.
    let (ok, lines) = Bench::start(&hc, a_on_c, 50, 100_000).wait(T);
    assert!(ok, "{lines:?}");
    let direct = lines.iter().filter_map(|(_, l)| rps(l)).fold(0.0, f64::max);
    assert!(direct > 0.0, "{lines:?}");
    let requests = (direct * 16.0) as u64 + 100_000;
    // The first run's counter, then this run's.
    let before = get_counter(&hc, a_on_c);
    assert_eq!(before, 100_000);

    let bench = Bench::start(&hc, a_on_c, 50, requests);
    std::thread::sleep(Duration::from_secs(4));
    let t_out = Instant::now();
    let out = a.ums_ok(&["migrate", "--json", "--to", &format!("{}:{PEER_PORT}", hb.addr())]).unwrap();
    let r1: serde_json::Value = serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"].clone();
    let t_moved = Instant::now();
    println!(
        "A->B: frozen {} ms, relayed {}, closed {}",
        r1["frozen_ms"], r1["relayed_connections"], r1["closed_connections"]
    );
    assert_eq!(r1["relayed_connections"], 50, "{r1}");
    let cpu0 = (cpu_s(a.pid1()), cpu_s(b.pid1()));
    std::thread::sleep(Duration::from_secs(5));
    println!("ums CPU while relaying 5 s: A {:.2} s, B {:.2} s", cpu_s(a.pid1()) - cpu0.0, cpu_s(b.pid1()) - cpu0.1);
    let (ra, rb) = (status(&a)["relay"].clone(), status(&b)["relay"].clone());
    println!("relay at A: {ra}\nrelay at B: {rb}");
    assert_eq!(ra["out"]["open_connections"], 50, "{ra}");
    assert_eq!(rb["in"]["open_connections"], 50, "{rb}");
    assert!(ra["out"]["bytes_sent"].as_u64().unwrap() > 0 && rb["in"]["bytes_sent"].as_u64().unwrap() > 0);
    let t_back = Instant::now();
    let out = b.ums_ok(&["migrate", "--json", "--to", &format!("{}:{PEER_PORT}", ha.addr())]).unwrap();
    let r2: serde_json::Value = serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"].clone();
    let t_home = Instant::now();
    println!(
        "B->A: frozen {} ms, relayed {}, closed {}",
        r2["frozen_ms"], r2["relayed_connections"], r2["closed_connections"]
    );
    assert_eq!(status(&a)["state"], "running");
    let (ok, lines) = bench.wait(Duration::from_secs(180));
    let t_end = lines.last().map(|l| l.0).unwrap_or_else(Instant::now);
    let errors: Vec<&String> = lines.iter().map(|(_, l)| l).filter(|l| l.to_lowercase().contains("error")).collect();
    for l in lines.iter().rev().take(3) {
        println!("redis-benchmark: {}", l.1);
    }
    assert!(
        ok && errors.is_empty(),
        "redis-benchmark failed: {errors:?} {:?}",
        &lines[lines.len().saturating_sub(5)..]
    );
    assert_eq!(get_counter(&hc, a_on_c), before + requests, "every INCR answered exactly once");
    let before_rps = median_rps(&lines, t_out - Duration::from_secs(3), t_out);
    let relayed_rps = median_rps(&lines, t_moved + Duration::from_millis(500), t_back);
    let after_rps = median_rps(&lines, t_home + Duration::from_millis(500), t_end);
    println!(
        "redis-benchmark -c 50 INCR rps: direct at A {before_rps:?}, relayed A->B {relayed_rps:?} ({:.0}%), \
         direct at A after the move back {after_rps:?}",
        100.0 * relayed_rps.unwrap_or(0.0) / before_rps.unwrap_or(1.0)
    );
    // The move back ended the relay on both sides, and left nothing behind.
    wait_until("the relay ends at A", Duration::from_secs(10), || status(&a)["relay"]["out"].is_null());
    wait_until("the relay ends at B", Duration::from_secs(10), || status(&b)["relay"]["in"].is_null());
    for h in [&ha, &hb] {
        assert_eq!(leftovers(h), Vec::<String>::new(), "after the relay ended, in {}", h.name());
    }
}

/// CPU seconds (user and system) process `pid` used so far.
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The benchmark's counter, read through `at` from `host`.
fn get_counter(host: &Host, at: Ipv4Addr) -> u64 {
    host.spawn_in(move || {
        let mut c = redis::Client::connect(at, T);
        let v = c.cmd(&[b"GET", b"counter:__rand_int__"]).1.unwrap_or_default();
        String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0)
    })
    .join()
    .unwrap()
}

/// Connected clients redis counts, read through `at` from `host` (the
/// reading connection included).
fn connected_clients(host: &Host, at: Ipv4Addr) -> u64 {
    host.spawn_in(move || {
        let mut c = redis::Client::connect(at, T);
        let info = c.cmd(&[b"INFO", b"clients"]).1.unwrap_or_default();
        let info = String::from_utf8_lossy(&info).into_owned();
        info.lines().find_map(|l| l.strip_prefix("connected_clients:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    })
    .join()
    .unwrap()
}

/// The relay's endpoint is the peer port, behind the group's mutual TLS: a
/// host without the keys that writes a `Relay` frame and a packet of a
/// carried connection there is refused, and the packet never reaches the
/// workload. A connection its client closes during the freeze is closed at
/// the destination once the relay carries the client's FIN; the other
/// carried connection works on; when it closes too, the relay ends and
/// leaves no device, route, rule or descriptor behind.
#[test]
fn only_the_group_reaches_the_relay_and_a_close_during_the_freeze_ends_cleanly() {
    require_root();
    require_tool("iptables", "iptables");
    let tmp = tempfile::tempdir().unwrap();
    let img = redis::image(tmp.path());
    let (ha, hb) = Host::pair("estn", None).unwrap();
    let hc = Host::isolated("estnc").unwrap();
    let (a_on_c, c_addr) = ha.link(&hc).unwrap();
    let (b_on_c, _) = hb.link(&hc).unwrap();
    let a = Outer::builder("estn-a").host(&ha).layout(&img.layout).start().unwrap();
    // A restore that takes 3 s more: a freeze long enough to act in.
    let b = Outer::builder("estn-b")
        .host(&hb)
        .layout(&img.layout)
        .args(&["--standby"])
        .env("UMS_FAILPOINT", "slow-restore")
        .start()
        .unwrap();
    a.wait_for_line("Ready to accept connections", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    wait_kernel_path(&a);
    let (fds_a, fds_b) = (fds(&a), fds(&b));

    // Two connections from C: one stays, one is closed during the freeze.
    let (to_client, from_test) = std::sync::mpsc::channel::<&'static str>();
    let (to_test, from_client) = std::sync::mpsc::channel::<String>();
    let client = hc.spawn_in(move || {
        let open = || {
            let s = TcpStream::connect_timeout(&(a_on_c, redis::PORT).into(), Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            BufReader::new(s)
        };
        let (mut stays, mut closes) = (open(), open());
        assert_eq!(cmd(&mut stays, &["SET", "k", "before"]), "+OK");
        assert_eq!(cmd(&mut closes, &["PING"]), "+PONG");
        to_test.send("open".into()).unwrap();
        assert_eq!(from_test.recv().unwrap(), "frozen");
        closes.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
        drop(closes);
        assert_eq!(from_test.recv().unwrap(), "moved");
        let r = format!("{} {}", cmd(&mut stays, &["GET", "k"]), cmd(&mut stays, &["SET", "k", "after"]));
        to_test.send(r).unwrap();
        assert_eq!(from_test.recv().unwrap(), "close");
    });
    assert_eq!(from_client.recv_timeout(T).unwrap(), "open");
    let mut mig = a.command(outer::UMS_IN_OUTER);
    mig.args(["migrate", "--json", "--to", &format!("{}:{PEER_PORT}", hb.addr())]);
    let mig = std::thread::spawn(move || mig.output().unwrap());
    b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    to_client.send("frozen").unwrap();
    let out = mig.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["result"]["relayed_connections"], 2, "{report}");
    to_client.send("moved").unwrap();
    assert_eq!(from_client.recv_timeout(T).unwrap(), "before +OK");
    // The closed one is gone at B too: redis counts the one that stays and
    // the one asking.
    wait_until("redis at B sees the close from the freeze", Duration::from_secs(10), || {
        connected_clients(&hc, b_on_c) == 2
    });

    // A host without the keys writes a Relay frame and a packet of the
    // connection that stays to B's peer port: refused before any frame is read.
    let received = |o: &Outer| status(o)["relay"]["in"]["packets_received"].as_u64().unwrap_or(0);
    let dropped = |o: &Outer| status(o)["relay"]["in"]["dropped_packets"].as_u64().unwrap_or(0);
    let (rx0, drop0) = (received(&b), dropped(&b));
    let id = report["result"]["migration_id"].as_str().unwrap().to_string();
    let answer = hc
        .spawn_in(move || {
            let mut s = TcpStream::connect_timeout(&(b_on_c, PEER_PORT).into(), Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let hello = format!("{{\"migration_id\":\"{id}\"}}");
            let mut frame = ((hello.len() + 1) as u32).to_be_bytes().to_vec();
            frame.push(22); // Kind::Relay
            frame.extend_from_slice(hello.as_bytes());
            // A TCP RST "from" the client to redis, in the relay's framing.
            let mut p = vec![0u8; 40];
            p[0] = 0x45;
            p[3] = 40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&c_addr.octets());
            p[16..20].copy_from_slice(&[10, 88, 0, 2]);
            p[22..24].copy_from_slice(&redis::PORT.to_be_bytes());
            p[32] = 0x50;
            p[33] = 0x04;
            frame.extend_from_slice(&(p.len() as u16).to_be_bytes());
            frame.extend_from_slice(&p);
            let _ = s.write_all(&frame);
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut buf);
            buf
        })
        .join()
        .unwrap();
    // At most a TLS alert (record type 21), never a frame (RelayOk is 23).
    assert!(answer.is_empty() || answer[0] == 0x15, "no relay answer to a host without keys: {answer:?}");
    // The only way into B's relay device is an accepted relay stream: still
    // the one from A, and no packet from elsewhere was even looked at.
    assert_eq!(dropped(&b), drop0, "nothing of it entered the relay");
    assert!(received(&b) >= rx0);
    let streams = b.lines().iter().filter(|l| l.contains("relay in carries")).count();
    assert_eq!(streams, 1, "B carries A's relay only");
    assert!(
        b.lines().iter().any(|l| l.contains("incoming peer connection ended") && l.contains("TLS")),
        "B refused the handshake"
    );

    // The connection that stays still works, with what it wrote.
    to_client.send("close").unwrap();
    client.join().unwrap();
    let at_b = hb.spawn_in(move || redis::Client::connect(b_on_c, T).cmd(&[b"GET", b"k"]).1).join().unwrap();
    assert_eq!(at_b.as_deref(), Some(&b"after"[..]));
    wait_until("the relay ends at A", Duration::from_secs(20), || status(&a)["relay"]["out"].is_null());
    wait_until("the relay ends at B", Duration::from_secs(10), || status(&b)["relay"]["in"].is_null());
    for h in [&ha, &hb] {
        assert_eq!(leftovers(h), Vec::<String>::new(), "after the relay ended, in {}", h.name());
    }
    let (now_a, now_b) = (fds(&a), fds(&b));
    println!("fds: A {fds_a} -> {now_a}, B {fds_b} -> {now_b}");
    assert!(now_a <= fds_a, "A holds no more descriptors than before: {fds_a} -> {now_a}");
    assert!(now_b <= fds_b + 4, "B holds only the workload's: {fds_b} -> {now_b}");
}
