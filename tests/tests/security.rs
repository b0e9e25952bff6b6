//! End-to-end: only trusted peers can push a workload. Two hosts (network
//! namespaces joined by a veth pair), outer containers with real runc, CRIU
//! and TCP; every outer gets the test run's key set unless a test says
//! otherwise. Each attack is refused or ends cleanly, the workload runs on at
//! the source with its memory intact, and the destination stays a standby
//! that takes the next, legitimate migration. The frame-level attacks are in
//! shim/tests/peer_security.rs.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use ums_e2e::outer::create_peer_keys;
use ums_e2e::*;

const T: Duration = Duration::from_secs(60);
const PEER_PORT: u16 = 7411;

fn image(tmp: &std::path::Path, mib: &str) -> OciImage {
    let memctr = build_workload(tmp);
    ImageBuilder::new(&memctr).cmd(&[mib]).build(&tmp.join("layout")).expect("build the workload image")
}

fn checksum(o: &Outer) -> String {
    let from = o.log().len();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(o.pid1()), nix::sys::signal::Signal::SIGUSR1).unwrap();
    let (_, line) = o.log().wait_for_from(from, "sum ", T).unwrap();
    parse_sum(&line).unwrap()
}

/// The workload still runs at `a`, counting on, with its memory intact.
fn still_running(a: &Outer, sum0: &str) {
    assert_eq!(status(a)["state"], "running");
    let last = last_tick(a);
    a.log().wait_for_from(0, &format!("tick {} ", last + 2), T).expect("the workload runs on at the source");
    assert_eq!(checksum(a), sum0, "memory checksum at the source");
}

/// Nothing was left in the destination's images dir.
fn images_dir_empty(b: &Outer) {
    let out = b.exec("sh", &["-c", "ls -A /var/lib/ums/images 2>/dev/null | wc -l"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "left in the images dir");
}

fn migrate(a: &Outer, to: &str) -> std::process::Output {
    a.ums(&["migrate", "--json", "--mode", "stop-copy", "--to", to]).unwrap()
}

fn ok(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "migrate failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone()
}

fn err(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "the migration should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

struct Setup {
    tmp: tempfile::TempDir,
    ha: Host,
    hb: Host,
    img: OciImage,
}

fn setup(name: &str) -> Setup {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "32");
    let (ha, hb) = Host::pair(name, None).unwrap();
    Setup { tmp, ha, hb, img }
}

impl Setup {
    fn to_b(&self) -> String {
        format!("{}:{PEER_PORT}", self.hb.addr())
    }
    fn source(&self, b: OuterBuilder) -> (Outer, String) {
        let a = b.host(&self.ha).layout(&self.img.layout).start().unwrap();
        a.wait_for_line("tick 3 ", T).unwrap();
        let sum0 = a.lines().iter().find_map(|l| parse_sum(l)).unwrap();
        (a, sum0)
    }
    fn standby(&self, b: OuterBuilder) -> Outer {
        let b = b.host(&self.hb).layout(&self.img.layout).args(&["--standby"]).start().unwrap();
        b.wait_for_line("standby", T).unwrap();
        b
    }
}

#[test]
fn a_peer_of_another_group_is_refused_and_nothing_moves() {
    let s = setup("wkey");
    let other = create_peer_keys(&s.tmp.path().join("other-group"), &["intruder"]).unwrap();
    let (a, sum0) = s.source(Outer::builder("wkey-a"));
    let b = s.standby(Outer::builder("wkey-b").peer_keys(&other[0]));
    let from_b = b.log().len();
    let e = err(&migrate(&a, &s.to_b()));
    println!("source, to a standby of another group: {e}");
    assert!(e.contains("certificate"), "{e}");
    // B refused in the handshake: no incoming migration began.
    assert!(!b.lines()[from_b..].iter().any(|l| l.contains("incoming migration")), "{:?}", b.lines());
    still_running(&a, &sum0);
    assert_eq!(status(&b)["state"], "standby");
    images_dir_empty(&b);
    // The intruder as the source: refused by A's group in turn.
    let c = Outer::builder("wkey-c")
        .netns(s.hb.netns_path())
        .layout(&s.img.layout)
        .peer_keys(&other[0])
        .args(&["--peer-listen", "0.0.0.0:7412"])
        .start()
        .unwrap();
    c.wait_for_line("tick 3 ", T).unwrap();
    let from_b = b.log().len();
    // B (group "other") accepts the intruder's own group; A's group does not.
    let hb_a = Outer::builder("wkey-a2")
        .host(&s.ha)
        .layout(&s.img.layout)
        .args(&["--standby", "--peer-listen", "0.0.0.0:7413"])
        .start()
        .unwrap();
    hb_a.wait_for_line("standby", T).unwrap();
    let e = err(&migrate(&c, &format!("{}:7413", s.ha.addr())));
    println!("intruder source, to a standby of the test group: {e}");
    assert!(e.contains("certificate") || e.contains("alert") || e.to_lowercase().contains("unknownca"), "{e}");
    hb_a.wait_for_line("TLS handshake", T).expect("the standby logs the refused handshake");
    assert_eq!(status(&hb_a)["state"], "standby");
    images_dir_empty(&hb_a);
    let _ = from_b;
}

#[test]
fn plain_tcp_peers_and_secure_peers_do_not_mix() {
    let s = setup("mix");
    let (a, sum0) = s.source(Outer::builder("mix-a").insecure_peer());
    a.wait_for_line("NOT authenticated", T).expect("--insecure-peer warns at start");
    let b = s.standby(Outer::builder("mix-b"));
    let e = err(&migrate(&a, &s.to_b()));
    println!("plain TCP source, to a TLS standby: {e}");
    b.wait_for_line("TLS handshake", T).expect("B refuses the plain TCP peer in the handshake");
    assert!(!b.lines().iter().any(|l| l.contains("incoming migration")));
    still_running(&a, &sum0);
    assert_eq!(status(&b)["state"], "standby");
    images_dir_empty(&b);
    assert!(e.contains("speaks TLS"), "{e}");
}

#[test]
fn without_keys_or_the_opt_out_ums_init_refuses_to_start() {
    require_root();
    let mut o = Outer::builder("nokeys").no_peer_keys().args(&["--standby"]).start().unwrap();
    let status = o.wait(T).unwrap();
    assert!(!status.success());
    let text = o.lines().join("\n");
    assert!(text.contains("--peer-keys") && text.contains("--insecure-peer"), "{text}");
}

#[test]
fn a_flipped_byte_on_the_wire_is_caught_by_tls() {
    let s = setup("tflip");
    let (a, sum0) = s.source(Outer::builder("tflip-a"));
    let b = s.standby(Outer::builder("tflip-b"));
    let target: std::net::SocketAddr = format!("127.0.0.1:{PEER_PORT}").parse().unwrap();
    let proxy = FaultProxy::start(&s.hb.netns_path(), 7502, target, Fault::FlipByteAt(10 << 20)).unwrap();
    err(&migrate(&a, &format!("{}:{}", s.hb.addr(), proxy.port())));
    b.wait_for_line("incoming peer connection ended", T).unwrap();
    still_running(&a, &sum0);
    assert_eq!(status(&b)["state"], "standby");
    images_dir_empty(&b);
    // The next one, through the same proxy (now clean), goes through.
    let r = ok(&migrate(&a, &format!("{}:{}", s.hb.addr(), proxy.port())));
    assert!(r["peer"].as_str().unwrap().starts_with("ums-peer ("), "{r}");
    assert_eq!(status(&b)["state"], "running");
}

#[test]
fn a_peer_that_stops_mid_stream_is_dropped_and_the_source_goes_on() {
    let s = setup("stall");
    let (a, sum0) = s.source(Outer::builder("stall-a"));
    let b = s.standby(Outer::builder("stall-b").args(&["--peer-timeout", "2s"]));
    let target: std::net::SocketAddr = format!("127.0.0.1:{PEER_PORT}").parse().unwrap();
    let proxy = FaultProxy::start(&s.hb.netns_path(), 7503, target, Fault::StallAfter(8 << 20)).unwrap();
    let t = std::time::Instant::now();
    let e = err(&migrate(&a, &format!("{}:{}", s.hb.addr(), proxy.port())));
    println!("source, through a stalled link: {e} (after {:?})", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}: {e}", t.elapsed());
    b.wait_for_line("no data from the peer", T).expect("B drops the silent peer at its deadline");
    still_running(&a, &sum0);
    assert_eq!(status(&b)["state"], "standby");
    images_dir_empty(&b);
    // A client that connects and never says anything is dropped too.
    let ns = std::fs::File::open(s.ha.netns_path()).unwrap();
    let to = s.to_b();
    let silent = std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut c = std::net::TcpStream::connect(&to).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut c, &mut buf);
        let _ = c.write_all(b"late");
        t.elapsed()
    });
    let waited = silent.join().unwrap();
    assert!(waited < Duration::from_secs(10), "the silent client was kept {waited:?}");
    ok(&migrate(&a, &s.to_b()));
}

#[test]
fn two_sources_pushing_at_once_one_is_busy() {
    let s = setup("two");
    let (a1, sum1) = s.source(Outer::builder("two-a1"));
    let (a2, sum2) = s.source(Outer::builder("two-a2").args(&["--peer-listen", "0.0.0.0:7412"]));
    let b = s.standby(Outer::builder("two-b"));
    let to = s.to_b();
    let (mut c1, mut c2) = (a1.command("/opt/ums/ums"), a2.command("/opt/ums/ums"));
    c1.args(["migrate", "--json", "--mode", "stop-copy", "--to", &to]);
    c2.args(["migrate", "--json", "--mode", "stop-copy", "--to", &to]);
    let h1 = std::thread::spawn(move || c1.output().unwrap());
    let h2 = std::thread::spawn(move || c2.output().unwrap());
    let (o1, o2) = (h1.join().unwrap(), h2.join().unwrap());
    let (won, lost, lost_out, lost_sum) = match (o1.status.success(), o2.status.success()) {
        (true, false) => (&a1, &a2, &o2, &sum2),
        (false, true) => (&a2, &a1, &o1, &sum1),
        other => panic!("exactly one must win: {other:?}\n{o1:?}\n{o2:?}"),
    };
    println!("the second source: {}", err(lost_out));
    assert!(err(lost_out).contains("busy"), "{}", err(lost_out));
    assert_eq!(status(won)["state"], "standby");
    assert_eq!(status(&b)["state"], "running");
    still_running(lost, lost_sum);
}
