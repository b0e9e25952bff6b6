//! End-to-end: a real server under real load. An HTTP server (websrv, with
//! keep-alive) published with `-p` runs in outer container A; clients on a
//! third host C (linked to A and to B) keep it busy while it migrates between
//! A and B and while `ums checkpoint` dumps it. Migrations must not fail for
//! connections the kernel already handed the server (its accept queue at the
//! freeze), the ports and command it was started with must travel, and a
//! failure inside CRIU must name CRIU's own error.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;

fn web_image(tmp: &std::path::Path) -> OciImage {
    let memctr = build_workload(tmp);
    let websrv = std::fs::read(build_websrv(tmp)).unwrap();
    ImageBuilder::new(&memctr)
        .file("bin/websrv", websrv, 0o755)
        .entrypoint(&["/bin/websrv"])
        .cmd(&["8080", "5353"])
        .expose("8080/tcp")
        .expose("5353/udp")
        .build(&tmp.join("layout"))
        .expect("build the web image")
}

/// Hosts A and B (the outer containers, linked for migrations) and the
/// client host C, linked to each; `a` and `b` are their addresses as C
/// reaches them.
struct Net {
    ha: Host,
    hb: Host,
    hc: Host,
    a: Ipv4Addr,
    b: Ipv4Addr,
}

fn net(prefix: &str) -> Net {
    require_root();
    let (ha, hb) = Host::pair(prefix, None).unwrap();
    let hc = Host::isolated(&format!("{prefix}c")).unwrap();
    let (_, a) = hc.link(&ha).unwrap();
    let (_, b) = hc.link(&hb).unwrap();
    Net { ha, hb, hc, a, b }
}

/// A response's body ("hits N pid-start TOKEN"), read from a keep-alive
/// connection (opened first when there is none); any error drops it.
fn keepalive_get(conn: &mut Option<BufReader<TcpStream>>, addr: SocketAddr) -> Result<String, String> {
    let r = (|| {
        if conn.is_none() {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            *conn = Some(BufReader::new(s));
        }
        let c = conn.as_mut().unwrap();
        c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
        let mut status = String::new();
        match c.read_line(&mut status) {
            Ok(0) => return Err("read: closed before a response".to_string()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {}", e.kind())),
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("bad status {status:?}"));
        }
        let (mut len, mut keep) = (0usize, true);
        loop {
            let mut h = String::new();
            c.read_line(&mut h).map_err(|e| format!("read: {}", e.kind()))?;
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                len = v.trim().parse().map_err(|_| format!("bad header {h:?}"))?;
            }
            if h == "connection: close" {
                keep = false;
            }
        }
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).map_err(|e| format!("read: {}", e.kind()))?;
        Ok((String::from_utf8_lossy(&body).into_owned(), keep))
    })();
    match r {
        Ok((body, keep)) => {
            if !keep {
                *conn = None;
            }
            Ok(body)
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

/// One HTTP/1.0 request on a new connection; returns the body.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("read: {}", e.kind()))?;
    if !resp.starts_with("HTTP/1.0 200 OK") {
        return Err(format!("bad response {resp:?}"));
    }
    Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// `get`, retried for up to 10 s (a port published a moment ago).
fn get_soon(addr: SocketAddr) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match get(addr) {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A datagram to `addr` and its echo, retried for up to 10 s.
fn udp_echo(addr: SocketAddr) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
    for _ in 0..40 {
        s.send_to(b"ping-udp", addr).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// The `hits` number of a response body.
fn hits(body: &str) -> Option<u64> {
    let f: Vec<&str> = body.split_whitespace().collect();
    (f.len() == 4 && f[0] == "hits").then(|| f[1].parse().ok()).flatten()
}

#[derive(Default)]
struct Load {
    ok: u64,
    /// Client errors by kind, with a count.
    errors: BTreeMap<String, u64>,
    /// Every `hits` number answered: no request is answered twice.
    answered: Vec<u64>,
}

#[test]
fn fifty_keepalive_clients_through_ten_migrations() {
    keepalive_clients_through_migrations("uload", "stop-copy", 10);
}

/// Pre-copy's rounds dump the workload with its established connections
/// while clients keep talking to it.
#[test]
fn fifty_keepalive_clients_through_four_pre_copy_migrations() {
    keepalive_clients_through_migrations("uloadpc", "pre-copy", 4);
}

/// 50 keep-alive clients from a third host through `moves` migrations in
/// `mode`, A to B and back: every migration succeeds, no request is
/// answered twice, the clients are served after each move.
fn keepalive_clients_through_migrations(name: &str, mode: &str, moves: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let n = net(name);
    let a = Outer::builder(&format!("{name}-a")).host(&n.ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder(&format!("{name}-b")).host(&n.hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("listening", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    assert_eq!(status(&a)["listen_drain_ms"], 500.0, "the bound of the accept-queue drain is shown");
    // Clients use A's address throughout: after a move, A forwards them.
    let target = SocketAddr::from((n.a, 8080));
    in_netns(n.hc.netns_path(), move || get_soon(target)).join().unwrap().expect("the published port answers");

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (stop, load) = (stop.clone(), load.clone());
            in_netns(n.hc.netns_path(), move || {
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = keepalive_get(&mut conn, target);
                    let mut l = load.lock().unwrap();
                    match r.as_deref().map(hits) {
                        Ok(Some(h)) => {
                            l.ok += 1;
                            l.answered.push(h);
                        }
                        Ok(None) => *l.errors.entry(format!("bad body {r:?}")).or_default() += 1,
                        Err(e) => *l.errors.entry(e.to_string()).or_default() += 1,
                    }
                    drop(l);
                    if r.is_err() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));

    let mut failed = Vec::new();
    let mut skipped = 0u64;
    let mut frozen = Vec::new();
    let (t0, n0) = (Instant::now(), load.lock().unwrap().ok);
    std::thread::sleep(Duration::from_millis(1000));
    let mut rates = vec![("direct at A", (load.lock().unwrap().ok - n0) as f64 / t0.elapsed().as_secs_f64())];
    for i in 0..moves {
        let (src, dst_addr) = if i % 2 == 0 { (&a, n.hb.addr()) } else { (&b, n.ha.addr()) };
        let out = src.ums(&["migrate", "--json", "--mode", mode, "--to", &format!("{dst_addr}:{PEER_PORT}")]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if !out.status.success() {
            failed.push(format!("migration {i}: {text} {}", String::from_utf8_lossy(&out.stderr)));
            continue;
        }
        let r = &v["result"];
        skipped += r["in_flight_skipped"].as_u64().expect("in_flight_skipped in the report");
        frozen.push(r["frozen_ms"].as_f64().unwrap());
        println!(
            "migration {i}: frozen {} ms, listen drain {} ms, in flight skipped {}",
            r["frozen_ms"], r["listen_drain_ms"], r["in_flight_skipped"]
        );
        // The clients are served again before the next move.
        let served = load.lock().unwrap().ok;
        let until = Instant::now() + Duration::from_secs(20);
        while load.lock().unwrap().ok < served + 100 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Requests per second over the next second: the workload at B means
        // every client goes through A's forwarding (user-space proxy).
        let (t0, n0) = (Instant::now(), load.lock().unwrap().ok);
        std::thread::sleep(Duration::from_millis(1000));
        let rate = (load.lock().unwrap().ok - n0) as f64 / t0.elapsed().as_secs_f64();
        rates.push((if i % 2 == 0 { "forwarded by A to B" } else { "direct at A" }, rate));
    }
    let served_at_end = load.lock().unwrap().ok;
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let l = load.lock().unwrap();
    let errors: u64 = l.errors.values().sum();
    println!(
        "{moves} {mode} migrations under 50 keep-alive clients: {} failed; requests answered {}, client errors \
         {errors}, in-flight connections skipped {skipped}, frozen ms {frozen:?}",
        failed.len(),
        l.ok
    );
    for kind in ["direct at A", "forwarded by A to B"] {
        let r: Vec<String> = rates.iter().filter(|(k, _)| *k == kind).map(|(_, r)| format!("{r:.0}")).collect();
        println!("  requests/s, {kind}: {}", r.join(" "));
    }
    for (e, count) in &l.errors {
        println!("  client error x{count}: {e}");
    }
    assert!(failed.is_empty(), "failed migrations: {failed:#?}");
    let mut answered = l.answered.clone();
    answered.sort_unstable();
    let before = answered.len();
    answered.dedup();
    assert_eq!(answered.len(), before, "a request number was answered twice");
    assert!(l.ok > served_at_end, "clients are served after the last migration");
    // The workload ended at A (an even number of moves) and runs there.
    assert_eq!(status(&a)["state"], "running");
    assert_eq!(status(&b)["state"], "standby");
}

#[test]
fn checkpoint_while_a_client_connects_every_20ms() {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let n = net("uckpt");
    let a = Outer::builder("uckpt-a").host(&n.ha).layout(&img.layout).start().unwrap();
    a.wait_for_line("listening", T).unwrap();
    let target = SocketAddr::from((n.a, 8080));
    in_netns(n.hc.netns_path(), move || get_soon(target)).join().unwrap().expect("the published port answers");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let client = in_netns(n.hc.netns_path(), move || {
        let (mut ok, mut errors) = (0u64, Vec::new());
        while !stop2.load(Ordering::Relaxed) {
            match get(target) {
                Ok(_) => ok += 1,
                Err(e) => errors.push(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, errors)
    });
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let dir = format!("/var/lib/ums/ck-{i}");
        let out = a.ums_ok(&["checkpoint", "--json", &dir]).expect("checkpoint under a connecting client");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        println!(
            "checkpoint {i}: dump {} ms, listen drain {} ms, in flight skipped {}",
            v["result"]["dump_ms"], v["result"]["listen_drain_ms"], v["result"]["in_flight_skipped"]
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = client.join().unwrap();
    let st = status(&a);
    println!("client: {ok} answered, {} errors {:?}; published: {}", errors.len(), errors, st["published"]);
    assert_eq!(st["state"], "running");
    assert_eq!(st["published"]["mode"], "direct", "ports are direct again after the checkpoints: {st}");
    assert!(st["published"]["held_total"].as_u64().unwrap() > 0, "clients were held during the dumps: {st}");
    assert!(errors.is_empty(), "a client connecting during a checkpoint failed: {errors:?}");
}

#[test]
fn ports_and_command_outside_the_image_travel_there_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let n = net("uport");
    // Ports the image does not expose, and a command that is not its Cmd.
    let a = Outer::builder("uport-a")
        .host(&n.ha)
        .layout(&img.layout)
        .args(&["--publish", "9090", "--publish", "9191/udp", "--", "/bin/websrv", "9090", "9191"])
        .start()
        .unwrap();
    let b = Outer::builder("uport-b").host(&n.hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("listening http 9090 udp 9191", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let at_a = status(&a)["workload"].clone();
    assert_eq!(at_a["command"], serde_json::json!(["/bin/websrv", "9090", "9191"]), "{at_a}");
    let reach_both = |when: &str| {
        let (a_addr, b_addr) = (n.a, n.b);
        let r = in_netns(n.hc.netns_path(), move || {
            [a_addr, b_addr].map(|ip| (get_soon(SocketAddr::from((ip, 9090))), udp_echo(SocketAddr::from((ip, 9191)))))
        })
        .join()
        .unwrap();
        for (ip, (http, udp)) in [n.a, n.b].iter().zip(r) {
            let body = http.unwrap_or_else(|e| panic!("{when}: TCP 9090 via {ip}: {e}"));
            assert!(hits(&body).is_some(), "{when}: {body:?}");
            assert_eq!(udp.as_deref(), Some(&b"ping-udp"[..]), "{when}: UDP 9191 via {ip}");
        }
    };
    let migrate = |src: &Outer, to: Ipv4Addr| {
        src.ums_ok(&["migrate", "--mode", "stop-copy", "--to", &format!("{to}:{PEER_PORT}")]).expect("migration");
    };
    migrate(&a, n.hb.addr());
    let at_b = status(&b)["workload"].clone();
    println!("at B: {at_b}");
    assert_eq!(at_b["command"], at_a["command"], "B shows the command that runs");
    assert_eq!(at_b["hostname"], at_a["hostname"]);
    assert_eq!(at_b["published_ports"], at_a["published_ports"], "B publishes exactly what A did");
    let ports = at_b["published_ports"].as_array().unwrap();
    let has =
        |port: u16, proto: &str| ports.iter().any(|p| p["outer"] == port && p["inner"] == port && p["proto"] == proto);
    assert!(has(9090, "tcp") && has(9191, "udp") && has(8080, "tcp"), "{ports:?}");
    reach_both("after A->B");
    migrate(&b, n.ha.addr());
    assert_eq!(status(&a)["workload"]["command"], at_a["command"]);
    reach_both("after B->A");
}

/// Connections the server has not accepted when the freeze comes (it stopped
/// accepting: websrv's /pause-accept) are left out of the dump instead of
/// failing the migration, counted, and reset when the source's copy ends.
#[test]
fn connections_not_yet_accepted_are_skipped_counted_and_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let n = net("uskip");
    let a = Outer::builder("uskip-a").host(&n.ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("uskip-b").host(&n.hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("listening", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let target = SocketAddr::from((n.a, 8080));
    let queued = in_netns(n.hc.netns_path(), move || {
        get_soon(target).expect("the published port answers");
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
        s.write_all(b"GET /pause-accept HTTP/1.0\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.0 200"), "{resp:?}");
        // The kernel completes these handshakes; the server does not accept them.
        (0..5)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                s
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let out = a
        .ums_ok(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", n.hb.addr())])
        .expect("migration");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["result"];
    println!("migration: in flight skipped {}, listen drain {} ms", r["in_flight_skipped"], r["listen_drain_ms"]);
    assert!(r["in_flight_skipped"].as_u64().unwrap() >= 5, "{r}");
    assert!(r["listen_drain_ms"].as_f64().unwrap() >= 490.0, "the drain waited its bound: {r}");
    // What those clients see: their connection reset (or closed), no answer.
    for mut s in queued {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut resp = String::new();
        let seen = match s.read_to_string(&mut resp) {
            Ok(_) => format!("closed after {resp:?}"),
            Err(e) => format!("{:?}", e.kind()),
        };
        println!("a queued client saw: {seen}");
        assert!(seen == "ConnectionReset" || seen == "closed after \"\"", "{seen}");
    }
    // The workload runs at B, and serves once its pause is over.
    assert_eq!(status(&b)["state"], "running");
    let at_b = SocketAddr::from((n.b, 8080));
    in_netns(n.hc.netns_path(), move || get(at_b)).join().unwrap().expect("served at B");
}

#[test]
fn a_restore_failing_inside_criu_prints_criu_s_error() {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let (ha, _hb) = Host::pair("ufail", None).unwrap();
    let a = Outer::builder("ufail-a").host(&ha).layout(&img.layout).start().unwrap();
    a.wait_for_line("listening", T).unwrap();
    // The workload prints before ums has ended its start operation.
    let until = std::time::Instant::now() + T;
    while status(&a)["state"] != "running" && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.ums_ok(&["checkpoint", "--stop", "/var/lib/ums/ck"]).unwrap();
    assert_eq!(status(&a)["state"], "standby");
    // A process tree CRIU cannot read.
    let out = a.exec("sh", &["-c", "printf 'not a criu image' > /var/lib/ums/ck/criu/pstree.img"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = a.ums(&["restore", "/var/lib/ums/ck"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("ums restore: {err}");
    assert!(!out.status.success());
    assert!(err.contains("CRIU: Error ("), "CRIU's own Error line is in the message: {err}");
    assert!(!err.contains("Restoring FAILED"), "not the log's tail: {err}");
    let out = a.ums(&["restore", "--json", "/var/lib/ums/ck"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("Error ("), "{v}");
    assert_eq!(status(&a)["state"], "standby");
}

#[test]
fn a_destination_lacking_a_cpu_feature_refuses_before_the_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    // A feature this CPU has, which B is made to hide (UMS_CPU_HIDE).
    let feature = if cpuinfo.lines().any(|l| l.starts_with("flags") && l.contains(" sse2")) { "sse2" } else { "fp" };
    let (ha, hb) = Host::pair("ucpu", None).unwrap();
    let a = Outer::builder("ucpu-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("ucpu-b")
        .host(&hb)
        .layout(&img.layout)
        .args(&["--standby"])
        .env("UMS_CPU_HIDE", feature)
        .start()
        .unwrap();
    a.wait_for_line("listening", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let out = a.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:{PEER_PORT}", hb.addr())]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("ums migrate: {err}");
    assert!(!out.status.success());
    assert!(err.contains("CPU lacks") && err.contains(feature), "the refusal names the feature: {err}");
    let st = status(&a);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["last_op"]["ok"], false);
    assert_eq!(status(&b)["state"], "standby");
    // Never frozen: nothing was dumped.
    assert!(!a.lines().iter().any(|l| l.contains("migration failed; thawing")), "the workload was frozen");
}
