//! End-to-end: clients of a published port keep working through a live
//! migration. A small HTTP + UDP-echo workload runs in outer container A; 50
//! clients hammer A's published port from the other host while the workload
//! moves to B. The clients never learn anything happened.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ums_e2e::*;

const T: Duration = Duration::from_secs(60);

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

/// One HTTP/1.0 request; returns the body.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("read: {e}"))?;
    if !resp.starts_with("HTTP/1.0 200 OK") {
        return Err(format!("bad response {resp:?}"));
    }
    Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[derive(Default)]
struct LoadResult {
    ok: u64,
    errors: Vec<String>,
    max_latency: Duration,
    tokens: std::collections::BTreeSet<String>,
}

#[test]
fn fifty_clients_see_no_error_through_a_migration() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let (ha, hb) = Host::pair("cli", None).unwrap();
    let a = Outer::builder("cli-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("cli-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    a.wait_for_line("listening", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    let target = SocketAddr::from((ha.addr(), 8080));
    // The port is published as soon as the workload runs.
    let first = in_netns(hb.netns_path(), move || {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match get(target) {
                Ok(b) => return Ok(b),
                Err(e) if Instant::now() > until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .join()
    .unwrap()
    .expect("the published port answers");
    assert!(first.starts_with("hits "), "{first}");
    // While the workload runs here, TCP from outside is forwarded in the
    // kernel (DNAT), not through the proxy.
    let kernel_ports = |o: &Outer| status(o)["published"]["kernel_forwarded_ports"].clone();
    assert!(kernel_ports(&a).as_array().is_some_and(|p| p.contains(&8080.into())), "{}", status(&a));

    let stop = Arc::new(AtomicBool::new(false));
    let result = Arc::new(Mutex::new(LoadResult::default()));
    let mut clients = Vec::new();
    for _ in 0..50 {
        let (stop, result) = (stop.clone(), result.clone());
        clients.push(in_netns(hb.netns_path(), move || {
            let mut last_hits = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let r = get(target);
                let dt = t0.elapsed();
                let mut res = result.lock().unwrap();
                res.max_latency = res.max_latency.max(dt);
                match r {
                    Ok(body) => {
                        // "hits N pid-start TOKEN": N grows, TOKEN never changes.
                        let f: Vec<&str> = body.split_whitespace().collect();
                        let hits: u64 = f.get(1).and_then(|h| h.parse().ok()).unwrap_or(0);
                        if f.len() != 4 || hits <= last_hits {
                            res.errors.push(format!("wrong response {body:?} after hits {last_hits}"));
                        }
                        last_hits = hits;
                        res.tokens.insert(f.get(3).unwrap_or(&"").to_string());
                        res.ok += 1;
                    }
                    Err(e) => res.errors.push(e),
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let before = result.lock().unwrap().ok;
    let out = a.ums_ok(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:7411", hb.addr())]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let frozen_ms = report["result"]["frozen_ms"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let res = result.lock().unwrap();
    println!(
        "requests: {} ({} before the migration), errors: {}, slowest: {:?}, frozen: {frozen_ms} ms",
        res.ok,
        before,
        res.errors.len(),
        res.max_latency
    );
    assert!(res.errors.is_empty(), "failed requests: {:?}", &res.errors[..res.errors.len().min(10)]);
    assert!(res.ok > before + 100, "clients were served after the migration too");
    assert_eq!(res.tokens.len(), 1, "the same workload (no restart) answered every request: {:?}", res.tokens);
    assert!(
        res.max_latency.as_secs_f64() * 1000.0 < frozen_ms + 1500.0,
        "slowest response {:?} is far above the freeze of {frozen_ms} ms",
        res.max_latency
    );
    // A forwards to B now; the workload runs at B.
    let sa = status(&a);
    assert_eq!(sa["state"], "standby");
    assert!(sa["published"]["mode"].to_string().contains("forward"), "{sa}");
    assert_eq!(kernel_ports(&a), serde_json::json!([]), "A forwards through the proxy, not the kernel: {sa}");
    assert_eq!(status(&b)["state"], "running");
    assert!(kernel_ports(&b).as_array().is_some_and(|p| p.contains(&8080.into())), "{}", status(&b));

    // UDP echo, both directly at B and through A's forwarding.
    for addr in [SocketAddr::from((hb.addr(), 5353)), SocketAddr::from((ha.addr(), 5353))] {
        let echoed = in_netns(hb.netns_path(), move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            for _ in 0..20 {
                s.send_to(b"ping-udp", addr).unwrap();
                let mut buf = [0u8; 64];
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return Some(buf[..n].to_vec());
                }
            }
            None
        })
        .join()
        .unwrap();
        assert_eq!(echoed.as_deref(), Some(&b"ping-udp"[..]), "UDP echo via {addr}");
    }
}

#[test]
fn bad_clients_and_floods_get_clean_closes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = web_image(tmp.path());
    let (ha, hb) = Host::pair("clibad", None).unwrap();
    let a = Outer::builder("clibad-a")
        .host(&ha)
        .layout(&img.layout)
        .args(&["--publish", "9999:9999"])
        .env("UMS_HOLD_MAX", "5")
        .start()
        .unwrap();
    let b = Outer::builder("clibad-b")
        .host(&hb)
        .layout(&img.layout)
        .args(&["--standby"])
        .env("UMS_FAILPOINT", "slow-restore")
        .start()
        .unwrap();
    a.wait_for_line("listening", T).unwrap();
    b.wait_for_line("standby", T).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let web = SocketAddr::from((ha.addr(), 8080));
    let dead = SocketAddr::from((ha.addr(), 9999));
    in_netns(hb.netns_path(), move || {
        // Nothing behind 9999: refused at once (forwarded in the kernel, the
        // workload's namespace answers with a reset), or accepted and closed
        // (the proxy); never a hang.
        let t = std::time::Instant::now();
        match TcpStream::connect_timeout(&dead, Duration::from_secs(5)) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = Vec::new();
                assert_eq!(s.read_to_end(&mut buf).unwrap_or(0), 0);
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the dead port hung for {:?}", t.elapsed());
        // Garbage: the workload answers 400 and closes; ums passes it through.
        let mut s = TcpStream::connect_timeout(&web, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"\x00\x01\x02garbage\r\n\r\n").unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.0 400"), "{resp:?}");
        assert!(get(web).is_ok(), "the workload still serves");
    })
    .join()
    .unwrap();

    // During the freeze (the destination restores slowly) a flood of 20
    // connections: 5 are held and served afterwards, the rest closed cleanly.
    let mut cmd = a.command("/opt/ums/ums");
    cmd.args(["migrate", "--mode", "stop-copy", "--to", &format!("{}:7411", hb.addr())]);
    let mig = std::thread::spawn(move || cmd.output().unwrap());
    b.wait_for_line("checkpoint verified; restoring", T).unwrap();
    let flood = in_netns(hb.netns_path(), move || {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect_timeout(&web, Duration::from_secs(5)).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    Ok::<String, String>(resp)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let out = mig.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let results = flood.join().unwrap();
    let served = results.iter().filter(|r| r.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.0 200"))).count();
    let closed = results.iter().filter(|r| r.as_ref().is_ok_and(|s| s.is_empty())).count();
    println!("flood: {served} served, {closed} closed, of {}", results.len());
    assert_eq!(served + closed, 20, "every flood connection is served or closed cleanly: {results:?}");
    assert!(served >= 5, "the held connections were served after the freeze: {results:?}");
    assert_eq!(status(&b)["state"], "running");
    let at_b = SocketAddr::from((hb.addr(), 8080));
    in_netns(hb.netns_path(), move || assert!(get(at_b).is_ok(), "the workload serves at B")).join().unwrap();
}
