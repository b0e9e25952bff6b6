//! End-to-end: Prometheus metrics (`ums init --metrics-listen`, `ums metrics`).
//! Two outer containers on two hosts; each serves GET /metrics on its host's
//! address. The test scrapes them over real TCP, from the other host across
//! the veth link, parses the text with a Prometheus text parser (the
//! `prometheus-parse` crate), and checks that a failed, a stop-copy and a
//! post-copy migration move the counters they should, on both sides.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use ums_e2e::copy::in_netns;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;
const METRICS_PORT: u16 = 9464;

/// Every sample of a scrape, keyed `name{label="value",...}` with the labels
/// sorted (histogram buckets and summaries are left out).
type Samples = BTreeMap<String, f64>;

/// GET /metrics from `addr` over TCP, made from inside the namespace `from`.
fn scrape(from: &Host, addr: Ipv4Addr) -> (String, Samples) {
    let raw = in_netns(&from.netns_path(), || {
        let mut s = TcpStream::connect((addr, METRICS_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("scrape /metrics over TCP");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    (body.to_string(), parse(body))
}

/// Parse the text format with a real Prometheus parser.
fn parse(body: &str) -> Samples {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let mut out = Samples::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<(String, String)> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        let key = if labels.is_empty() {
            s.metric.clone()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{}{{{}}}", s.metric, l.join(","))
        };
        out.insert(key, v);
    }
    out
}

fn get(s: &Samples, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key} in {:#?}", s.keys().collect::<Vec<_>>()))
}

/// The histogram's count, parsed by the same parser (histograms come out of
/// it as one sample whose value is the buckets).
fn histogram_count(body: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .find_map(|s| {
            let matches = s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
            match (&s.value, matches) {
                (prometheus_parse::Value::Histogram(buckets), true) => {
                    Some(buckets.iter().map(|b| b.count as u64).max().unwrap_or(0))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no histogram {name} {labels:?}"))
}

fn counter_image(tmp: &std::path::Path, mib: &str) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr).cmd(&[mib]).build(&tmp.join("layout")).expect("build the workload image")
}

fn lazy_pages_host() {
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p).unwrap().trim().parse().unwrap();
    if cur < 4 << 20 {
        std::fs::write(p, (4u64 << 20).to_string()).expect("raise fs.pipe-max-size");
    }
}

fn migrate(src: &Outer, dst: &Outer, addr: Ipv4Addr, mode: &str) -> serde_json::Value {
    let from = dst.log().len();
    let to = format!("{addr}:{PEER_PORT}");
    let out = src.ums(&["migrate", "--json", "--mode", mode, "--to", &to]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    let last = last_tick(src);
    dst.log().wait_for_from(from, &format!("tick {} ", last + 2), T).expect("the counter goes on at the destination");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone()
}

const OUT_SC: &str = r#"direction="out",mode="stop-copy""#;
const IN_SC: &str = r#"direction="in",mode="stop-copy""#;
const OUT_PC: &str = r#"direction="out",mode="post-copy""#;
const IN_PC: &str = r#"direction="in",mode="post-copy""#;

#[test]
fn scrapes_show_failed_stop_copy_and_post_copy_migrations_on_both_sides() {
    require_root();
    lazy_pages_host();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "64");
    let (ha, hb) = Host::pair("met", None).unwrap();
    let listen = format!("0.0.0.0:{METRICS_PORT}");
    let a = Outer::builder("met-a").host(&ha).layout(&img.layout).args(&["--metrics-listen", &listen]).start().unwrap();
    let b = Outer::builder("met-b")
        .host(&hb)
        .layout(&img.layout)
        .args(&["--standby", "--metrics-listen", &listen])
        .start()
        .unwrap();
    a.wait_for_line("tick 3 ", T).unwrap();
    b.wait_for_line("standby", T).unwrap();

    // Before: A runs its workload, B waits; no migration yet.
    let (_, sa) = scrape(&hb, ha.addr());
    let (_, sb) = scrape(&ha, hb.addr());
    assert_eq!(get(&sa, r#"ums_workload_state{state="running"}"#), 1.0);
    assert_eq!(get(&sb, r#"ums_workload_state{state="standby"}"#), 1.0);
    assert_eq!(get(&sa, r#"ums_workload_starts_total{how="image"}"#), 1.0);
    assert_eq!(get(&sa, &format!("ums_migrations_started_total{{{OUT_SC}}}")), 0.0);
    assert_eq!(get(&sa, "ums_migration_sent_bytes_total"), 0.0);
    assert_eq!(get(&sa, "ums_migration_in_doubt"), 0.0);
    assert!(get(&sa, "process_resident_memory_bytes") > 0.0);
    assert!(!sa.keys().any(|k| k.starts_with("ums_migration_last_downtime_seconds")));

    // `ums metrics` prints the same families through the control socket.
    let text = a.ums_ok(&["metrics"]).unwrap();
    let local = parse(&text);
    assert_eq!(
        local.keys().filter(|k| k.starts_with("ums_")).count(),
        sa.keys().filter(|k| k.starts_with("ums_")).count()
    );
    assert_eq!(get(&local, r#"ums_workload_state{state="running"}"#), 1.0);

    // A migration to a port nobody listens on fails, by reason `connect`.
    let out = a.ums(&["migrate", "--mode", "stop-copy", "--to", &format!("{}:1", hb.addr())]).unwrap();
    assert!(!out.status.success());
    let (_, sa) = scrape(&hb, ha.addr());
    assert_eq!(get(&sa, &format!("ums_migrations_started_total{{{OUT_SC}}}")), 1.0);
    assert_eq!(get(&sa, &format!(r#"ums_migrations_failed_total{{{OUT_SC},reason="connect"}}"#)), 1.0);
    assert_eq!(get(&sa, &format!("ums_migrations_succeeded_total{{{OUT_SC}}}")), 0.0);
    assert_eq!(get(&sa, r#"ums_workload_state{state="running"}"#), 1.0);

    // Stop-copy A -> B.
    let r = migrate(&a, &b, hb.addr(), "stop-copy");
    let (ta, sa) = scrape(&hb, ha.addr());
    let (tb, sb) = scrape(&ha, hb.addr());
    println!("A after stop-copy:\n{ta}");
    assert_eq!(get(&sa, r#"ums_workload_state{state="standby"}"#), 1.0);
    assert_eq!(get(&sa, &format!("ums_migrations_started_total{{{OUT_SC}}}")), 2.0);
    assert_eq!(get(&sa, &format!("ums_migrations_succeeded_total{{{OUT_SC}}}")), 1.0);
    assert_eq!(
        histogram_count(&ta, "ums_migration_duration_seconds", &[("direction", "out"), ("mode", "stop-copy")]),
        1
    );
    assert_eq!(histogram_count(&ta, "ums_migration_downtime_seconds", &[("mode", "stop-copy")]), 1);
    let downtime = get(&sa, r#"ums_migration_last_downtime_seconds{mode="stop-copy"}"#);
    assert!((downtime - r["downtime_ms"].as_f64().unwrap() / 1000.0).abs() < 1e-3, "{downtime} vs {r}");
    let duration = get(&sa, r#"ums_migration_last_duration_seconds{mode="stop-copy"}"#);
    assert!(duration >= downtime && duration > 0.0, "{duration}");
    let sent = get(&sa, "ums_migration_sent_bytes_total");
    assert!(sent >= r["bytes"].as_f64().unwrap() && sent > (64 << 20) as f64, "sent {sent}, report {r}");
    assert_eq!(get(&sb, r#"ums_workload_state{state="running"}"#), 1.0);
    assert_eq!(get(&sb, &format!("ums_migrations_started_total{{{IN_SC}}}")), 1.0);
    assert_eq!(get(&sb, &format!("ums_migrations_succeeded_total{{{IN_SC}}}")), 1.0);
    assert_eq!(get(&sb, r#"ums_workload_starts_total{how="migration"}"#), 1.0);
    assert_eq!(
        histogram_count(&tb, "ums_migration_duration_seconds", &[("direction", "in"), ("mode", "stop-copy")]),
        1
    );
    let received = get(&sb, "ums_migration_received_bytes_total");
    assert!(received > (64 << 20) as f64 && received <= sent, "received {received}, sent {sent}");

    // Post-copy B -> A: the memory follows over the page link.
    migrate(&b, &a, ha.addr(), "post-copy");
    let (_, sa) = scrape(&hb, ha.addr());
    let (_, sb) = scrape(&ha, hb.addr());
    assert_eq!(get(&sb, &format!("ums_migrations_succeeded_total{{{OUT_PC}}}")), 1.0);
    assert_eq!(get(&sa, &format!("ums_migrations_succeeded_total{{{IN_PC}}}")), 1.0);
    assert_eq!(get(&sa, r#"ums_workload_state{state="running"}"#), 1.0);
    assert_eq!(get(&sa, r#"ums_workload_restarts_total"#), 1.0, "image, then back by migration");
    let pages_out = get(&sb, r#"ums_postcopy_pages_total{direction="out"}"#);
    let pages_in = get(&sa, r#"ums_postcopy_pages_total{direction="in"}"#);
    // Most of the 64 MiB moved as lazy pages (4 KiB each).
    assert!(pages_in > 8192.0, "{pages_in} pages in");
    assert!(pages_out >= pages_in, "{pages_out} pages out, {pages_in} in");
    assert!(get(&sb, r#"ums_migration_last_downtime_seconds{mode="post-copy"}"#) > 0.0);
    let failed_pc: f64 = sb
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("ums_migrations_failed_total{{{OUT_PC}")))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failed_pc, 0.0, "no post-copy migration failed");
    assert_eq!(get(&sb, &format!(r#"ums_migrations_failed_total{{{OUT_PC},reason="post_copy"}}"#)), 0.0);
}

#[test]
fn the_metrics_port_answers_only_get_metrics() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = counter_image(tmp.path(), "0");
    let (ha, hb) = Host::pair("met404", None).unwrap();
    let listen = format!("{}:{METRICS_PORT}", ha.addr());
    let a =
        Outer::builder("met404-a").host(&ha).layout(&img.layout).args(&["--metrics-listen", &listen]).start().unwrap();
    a.wait_for_line("tick 2 ", T).unwrap();
    let ask = |req: &'static str| {
        in_netns(&hb.netns_path(), || {
            let mut s = TcpStream::connect((ha.addr(), METRICS_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap()
    };
    assert!(ask("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(ask("garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    // And it still serves a scrape after those.
    let (_, s) = scrape(&hb, ha.addr());
    assert_eq!(get(&s, r#"ums_workload_state{state="running"}"#), 1.0);
}
