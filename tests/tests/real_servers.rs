//! End-to-end: real servers from Debian's packages, unchanged, as nested
//! workloads moved with each mode in turn (stop-copy, pre-copy, post-copy,
//! then auto) between two outer containers on two hosts, their clients on
//! the other host reaching the published port before and after each move:
//!
//! * nginx: a master and two worker processes sharing memory (a
//!   `limit_req` zone, and the connection counter, which lives in shared
//!   memory and keeps counting across the moves: a restarted nginx would
//!   count from 1 again);
//! * memcached with four threads: every key stored before is there after
//!   each move, and its connection count keeps counting.
//!
//! The packages are downloaded by `image/install-deps.sh --test`, never
//! installed (tests/src/debs.rs).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;
const MODES: [&str; 4] = ["stop-copy", "pre-copy", "post-copy", "auto"];

fn raise_pipe_max_size() {
    // Post-copy's lazy dump needs pipes of 4 MiB (a host-wide sysctl).
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p).unwrap().trim().parse().unwrap();
    if cur < 4 << 20 {
        std::fs::write(p, (4u64 << 20).to_string()).expect("raise fs.pipe-max-size");
    }
}

fn migrate(src: &Outer, dst: &Outer, dst_host: &Host, mode: &str) -> serde_json::Value {
    let to = format!("{}:{PEER_PORT}", dst_host.addr());
    let out = src.ums(&["migrate", "--json", "--mode", mode, "--to", &to]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{mode} failed: {text} {}\n--- source:\n{}\n--- destination:\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.lines().join("\n"),
        dst.lines().join("\n")
    );
    assert_eq!(status(src)["state"], "standby", "{mode}");
    assert_eq!(status(dst)["state"], "running", "{mode}");
    let r = serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone();
    println!("{mode}: downtime {} ms, restore {} ms, {} bytes", r["downtime_ms"], r["restore_ms"], r["bytes"]);
    r
}

/// The workload's processes, as the outer container sees them.
fn processes(o: &Outer) -> usize {
    let pid = status(o)["workload"]["pid"].as_i64().expect("a workload pid");
    let out = o.exec("sh", &["-c", &format!("cat /proc/{pid}/task/*/children")]).unwrap();
    1 + String::from_utf8_lossy(&out.stdout).split_whitespace().count()
}

fn nginx_image(tmp: &std::path::Path) -> OciImage {
    let ngx = debs::unpack("nginx");
    let conf = "user root;\n\
        worker_processes 2;\n\
        pid /tmp/nginx.pid;\n\
        error_log stderr notice;\n\
        events { worker_connections 512; }\n\
        http {\n\
          access_log off;\n\
          client_body_temp_path /tmp/body; proxy_temp_path /tmp/proxy; fastcgi_temp_path /tmp/fastcgi;\n\
          uwsgi_temp_path /tmp/uwsgi; scgi_temp_path /tmp/scgi;\n\
          limit_req_zone $binary_remote_addr zone=perip:1m rate=10000r/s;\n\
          server {\n\
            listen 8080;\n\
            location / { limit_req zone=perip burst=10000; return 200 \"connection $connection worker $pid\\n\"; }\n\
          }\n\
        }\n";
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr)
        .layer(debs::server_layer(&ngx.join("usr/sbin/nginx"), "usr/sbin/nginx", &[]))
        .layer(
            Layer::new(Compression::Gzip)
                .file("etc/nginx/nginx.conf", conf.as_bytes().to_vec(), 0o644)
                .dir("var/log/nginx", 0o755, 0, 0)
                .dir("var/lib/nginx", 0o755, 0, 0)
                .dir("tmp", 0o1777, 0, 0),
        )
        .entrypoint(&["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf", "-g", "daemon off;"])
        .expose("8080/tcp")
        .build(&tmp.join("nginx-layout"))
        .expect("build the nginx image")
}

/// One HTTP/1.0 GET to nginx from `client`: (connection number, worker pid).
fn nginx_get(client: &Host, at: Ipv4Addr, n: usize) -> Vec<(u64, u64)> {
    client
        .spawn_in(move || {
            let mut seen = Vec::new();
            for _ in 0..n {
                let until = Instant::now() + T;
                let body = loop {
                    let attempt = (|| -> std::io::Result<String> {
                        let mut s = TcpStream::connect_timeout(&(at, 8080).into(), Duration::from_secs(5))?;
                        s.set_read_timeout(Some(Duration::from_secs(20)))?;
                        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
                        let mut r = String::new();
                        s.read_to_string(&mut r)?;
                        Ok(r)
                    })();
                    match attempt {
                        Ok(r) => {
                            assert!(r.starts_with("HTTP/1.1 200"), "nginx answered {r:?}");
                            break r.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                        }
                        Err(e) if Instant::now() > until => panic!("nginx at {at}:8080: {e}"),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                let f: Vec<&str> = body.split_whitespace().collect();
                assert!(f.len() == 4 && f[0] == "connection" && f[2] == "worker", "{body:?}");
                seen.push((f[1].parse().unwrap(), f[3].parse().unwrap()));
            }
            seen
        })
        .join()
        .unwrap()
}

#[test]
fn nginx_with_two_workers_moves_with_every_mode_and_keeps_counting() {
    require_root();
    raise_pipe_max_size();
    let tmp = tempfile::tempdir().unwrap();
    let img = nginx_image(tmp.path());
    let (ha, hb) = Host::pair("ngx", Some("1gbit")).unwrap();
    let hosts = [&ha, &hb];
    let a = Outer::builder("ngx-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("ngx-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    let outers = [&a, &b];
    b.wait_for_line("standby", T).unwrap();
    let first = nginx_get(&hb, ha.addr(), 20);
    assert_eq!(processes(&a), 3, "nginx runs a master and two workers");
    let workers: std::collections::BTreeSet<u64> = first.iter().map(|c| c.1).collect();
    let mut last = first.iter().map(|c| c.0).max().unwrap();
    let mut at = 0;
    for mode in MODES {
        let to = 1 - at;
        migrate(outers[at], outers[to], hosts[to], mode);
        // From the other host, through the published port where it runs now.
        let seen = nginx_get(hosts[at], hosts[to].addr(), 20);
        let lowest = seen.iter().map(|c| c.0).min().unwrap();
        assert!(lowest > last, "{mode}: the connection counter went from {last} to {lowest}: nginx restarted");
        for (_, w) in &seen {
            assert!(workers.contains(w), "{mode}: worker {w} is not one of {workers:?}");
        }
        assert_eq!(processes(outers[to]), 3, "{mode}: a master and two workers");
        last = seen.iter().map(|c| c.0).max().unwrap();
        at = to;
    }
}

fn memcached_image(tmp: &std::path::Path) -> OciImage {
    let mc = debs::unpack("memcached");
    let ev = debs::unpack("libevent-2.1-7");
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr)
        .layer(debs::server_layer(&mc.join("usr/bin/memcached"), "usr/bin/memcached", &[ev]))
        .entrypoint(&["/usr/bin/memcached"])
        .cmd(&["-u", "root", "-t", "4", "-p", "11211", "-U", "0", "-l", "0.0.0.0", "-m", "256"])
        .expose("11211/tcp")
        .build(&tmp.join("memcached-layout"))
        .expect("build the memcached image")
}

const MC_KEYS: usize = 20_000;

fn mc_value(i: usize) -> String {
    format!("value-{i}-").repeat(20)
}

/// Connects to memcached, retrying for up to T.
fn mc_connect(at: Ipv4Addr) -> BufReader<TcpStream> {
    let until = Instant::now() + T;
    loop {
        match TcpStream::connect_timeout(&(at, 11211).into(), Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(T)).unwrap();
                // One request per write, sent at once (no Nagle wait for
                // the server's delayed ACK).
                s.set_nodelay(true).unwrap();
                return BufReader::new(s);
            }
            Err(e) if Instant::now() > until => panic!("memcached at {at}:11211: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn mc_line(c: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    c.read_line(&mut l).unwrap();
    l.trim_end().to_string()
}

/// `total_connections` from `stats`.
fn mc_total_connections(c: &mut BufReader<TcpStream>) -> u64 {
    c.get_mut().write_all(b"stats\r\n").unwrap();
    let mut total = None;
    loop {
        let l = mc_line(c);
        if l == "END" {
            break;
        }
        if let Some(v) = l.strip_prefix("STAT total_connections ") {
            total = Some(v.parse().unwrap());
        }
    }
    total.expect("total_connections in stats")
}

#[test]
fn memcached_with_four_threads_keeps_every_key_through_every_mode() {
    require_root();
    raise_pipe_max_size();
    let tmp = tempfile::tempdir().unwrap();
    let img = memcached_image(tmp.path());
    let (ha, hb) = Host::pair("mcd", Some("1gbit")).unwrap();
    let hosts = [&ha, &hb];
    let a = Outer::builder("mcd-a").host(&ha).layout(&img.layout).start().unwrap();
    let b = Outer::builder("mcd-b").host(&hb).layout(&img.layout).args(&["--standby"]).start().unwrap();
    let outers = [&a, &b];
    b.wait_for_line("standby", T).unwrap();
    let a_addr = ha.addr();
    let mut conns = hb
        .spawn_in(move || {
            let mut c = mc_connect(a_addr);
            for i in 0..MC_KEYS {
                let v = mc_value(i);
                c.get_mut().write_all(format!("set key:{i} 0 0 {}\r\n{v}\r\n", v.len()).as_bytes()).unwrap();
                assert_eq!(mc_line(&mut c), "STORED");
            }
            mc_total_connections(&mut c)
        })
        .join()
        .unwrap();
    let mut at = 0;
    for mode in MODES {
        let to = 1 - at;
        migrate(outers[at], outers[to], hosts[to], mode);
        let addr = hosts[to].addr();
        let now = hosts[at]
            .spawn_in(move || {
                let mut c = mc_connect(addr);
                for i in 0..MC_KEYS {
                    c.get_mut().write_all(format!("get key:{i}\r\n").as_bytes()).unwrap();
                    let head = mc_line(&mut c);
                    let v = mc_value(i);
                    assert_eq!(head, format!("VALUE key:{i} 0 {}", v.len()), "key:{i} after {mode}");
                    assert_eq!(mc_line(&mut c), v, "key:{i} after {mode}");
                    assert_eq!(mc_line(&mut c), "END");
                }
                mc_total_connections(&mut c)
            })
            .join()
            .unwrap();
        assert!(now > conns, "{mode}: total_connections went from {conns} to {now}: memcached restarted");
        conns = now;
        at = to;
    }
}
