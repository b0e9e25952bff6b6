//! Component tests of the peer port against hostile peers: the real
//! `serve_peers` on 127.0.0.1:0 with real TLS, a workload image layout in a
//! temporary directory, and the real state machine standing in for the
//! supervisor. Each attack must end that connection cleanly, before anything
//! is accepted where it says so, leave nothing outside the images dir, and
//! leave the destination a standby that takes the next migration.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use ums::config::Config;
use ums::image::oci_layout::OciLayout;
use ums::migration::transport::{self, PeerConn};
use ums::migration::wire::{self, Kind, WireError};
use ums::migration::{FileKind, FileOpen, Hello, HelloOk};
use ums::supervisor::state::{Op, Outcome, State};
use ums::supervisor::{Ctx, Msg};

/// What the stand-in supervisor saw.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Begin(bool),
    Done(Option<String>),
}

struct Dest {
    addr: SocketAddr,
    tmp: tempfile::TempDir,
    events: mpsc::UnboundedReceiver<Ev>,
    hello: Hello,
    /// The tree outside the state dir's images and layer cache, before.
    before: BTreeSet<PathBuf>,
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A one-layer image in an OCI layout at `dir`.
fn make_layout(dir: &Path) -> (ums::workload::nested::ImageInfo, Vec<(String, u64)>, u64) {
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(5);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": [sha(&layer)] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len() }],
    }))
    .unwrap();
    let l = OciLayout::create(dir).unwrap();
    for b in [&layer, &config, &manifest] {
        l.add_blob(&sha(b), &b[..], b.len() as u64).unwrap();
    }
    l.set_index(&sha(&manifest), manifest.len() as u64).unwrap();
    let img = l.resolve().unwrap();
    let info = ums::workload::nested::image_info(&Config::default(), &img);
    (info, l.image_blobs(&img), manifest.len() as u64)
}

fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("state/images") || rel.starts_with("state/layers") {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p.clone());
            }
            out.insert(rel);
        }
    }
    out
}

/// A standby destination with the workload image already in its layout.
async fn dest(peer_timeout: Duration) -> Dest {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    ums::migration::keys::create(&root.join("keys"), &["dest".into(), "src".into()], false).unwrap();
    ums::migration::keys::create(&root.join("other"), &[], false).unwrap();
    let (image, blobs, manifest_size) = make_layout(&root.join("layout"));
    let cfg = Arc::new(Config {
        layout_dir: root.join("layout"),
        state_dir: root.join("state"),
        run_dir: root.join("run"),
        standby: true,
        peer_keys: root.join("keys/dest"),
        peer_read_timeout: peer_timeout,
        max_checkpoint_bytes: 8 << 20,
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    });
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let (sig_tx, _sig_rx) = mpsc::unbounded_channel();
    let ctx = Ctx {
        cfg: cfg.clone(),
        reaper: ums::process::reaper::Reaper::start(sig_tx).unwrap(),
        runtime: ums::process::runtime::Runtime::new(cfg.runtime, cfg.runtime_root()),
        publisher: ums::net::proxy::Publisher::new(cfg.net.address, cfg.hold.clone()),
        migrate_out: ums::migration::migrate_out_boxed(),
        page_links: ums::migration::postcopy::links_status,
        progress: ums::migration::progress::status,
        in_doubt: Default::default(),
        metrics: Default::default(),
    };
    // The real state machine, as the supervisor runs it.
    let (inbox, mut rx) = mpsc::channel::<Msg>(16);
    let (ev_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut state = State::Standby;
        while let Some(m) = rx.recv().await {
            match m {
                Msg::BeginIncoming(reply) => {
                    let r = state.begin(Op::MigrateIn).map(|s| state = s);
                    let _ = ev_tx.send(Ev::Begin(r.is_ok()));
                    let _ = reply.send(r);
                }
                Msg::IncomingDone(r) => {
                    state = state.finish(if r.is_ok() { Outcome::Running } else { Outcome::Gone });
                    let _ = ev_tx.send(Ev::Done(r.err()));
                }
                _ => {}
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    std::mem::forget(_stop_tx);
    tokio::spawn(ums::migration::serve_peers(ctx, listener, inbox, stop_rx));
    let hello = Hello {
        protocol: wire::PROTOCOL_VERSION,
        migration_id: format!("m-{:016x}", rand::random::<u64>()),
        ums_version: "test".into(),
        image,
        blobs,
        manifest_size,
        runtime: cfg.runtime,
        memory_bytes: 1 << 20,
        tcp_established: true,
        cpu_features: None,
        post_copy: false,
        pre_copy: false,
        compression: None,
        witness: None,
    };
    let before = tree(root);
    Dest { addr, tmp, events, hello, before }
}

impl Dest {
    fn keys(&self, set: &str) -> Config {
        Config { peer_keys: self.tmp.path().join(set), ..Config::default() }
    }
    async fn connect(&self, set: &str) -> std::io::Result<PeerConn> {
        transport::connect(&self.keys(set), &self.addr.to_string(), Duration::from_secs(5)).await
    }
    /// An authenticated source through pre-migration: Hello, BlobsDone, Ready.
    async fn ready(&self, id: &str) -> PeerConn {
        let mut c = self.connect("keys/src").await.unwrap();
        let hello = Hello { migration_id: id.into(), ..self.hello.clone() };
        wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
        let ok: HelloOk = read(&mut c).await.unwrap().expect(Kind::HelloOk).unwrap();
        assert!(ok.missing_blobs.is_empty(), "{:?}", ok.missing_blobs);
        wire::send_json(&mut c.write, Kind::BlobsDone, &serde_json::json!({})).await.unwrap();
        read(&mut c).await.unwrap().expect::<serde_json::Value>(Kind::Ready).unwrap();
        c
    }
    async fn event(&mut self) -> Ev {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv()).await.expect("an event").expect("open")
    }
    /// No migration began (nothing reached the supervisor).
    async fn no_event(&mut self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(self.events.try_recv().ok(), None);
    }
    /// Nothing was written outside the images dir, and the images dir is empty again.
    fn clean(&self) {
        let root = self.tmp.path();
        assert_eq!(tree(root), self.before, "files appeared outside the images dir");
        let left: Vec<_> =
            std::fs::read_dir(root.join("state/images")).into_iter().flatten().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "left in the images dir: {left:?}");
        assert!(!root.parent().unwrap().join("escape").exists());
    }
}

async fn read(c: &mut PeerConn) -> Result<wire::Frame, WireError> {
    // Heartbeats (the destination unpacking or restoring) are skipped.
    wire::read_frame_live(&mut c.read, Duration::from_secs(20)).await
}

/// The error message the destination ends with, if any.
async fn refusal(c: &mut PeerConn) -> String {
    loop {
        match read(c).await {
            Ok(f) if f.kind == Kind::Error => return f.parse::<wire::ErrorMsg>().unwrap().message,
            Ok(_) => continue,
            Err(e) => return format!("(no reason: {e})"),
        }
    }
}

#[tokio::test]
async fn a_peer_of_another_group_is_refused_in_the_handshake() {
    let mut d = dest(Duration::from_secs(5)).await;
    // Its certificate is not from our CA: the destination refuses it (TLS 1.3
    // lets the client finish first; its first read then fails).
    let Err(e) = d.connect("other").await else { panic!("our destination's certificate is not of its group") };
    assert!(e.to_string().contains("certificate"), "{e}");
    // And the other way round: a client with a foreign certificate, trusting our CA.
    let elsewhere = tempfile::tempdir().unwrap();
    let foreign = elsewhere.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    for f in ["peer.pem", "peer-key.pem"] {
        std::fs::copy(d.tmp.path().join("other").join(f), foreign.join(f)).unwrap();
    }
    std::fs::copy(d.tmp.path().join("keys/src/ca.pem"), foreign.join("ca.pem")).unwrap();
    let cfg = Config { peer_keys: foreign.clone(), ..Config::default() };
    // `connect` checks its own key set first; speak TLS by hand with the foreign pair.
    assert!(transport::connect(&cfg, &d.addr.to_string(), Duration::from_secs(5)).await.is_err());
    let set_other = ums::migration::keys::load(&d.tmp.path().join("other")).unwrap();
    let set_ours = ums::migration::keys::load(&d.tmp.path().join("keys/src")).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(ums::migration::keys::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(set_ours.roots().unwrap())
        .with_client_auth_cert(set_other.chain.clone(), set_other.key.clone_key())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("ums-peer").unwrap();
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await?;
        let mut buf = Vec::new();
        wire::send_json(&mut buf, Kind::Hello, &d.hello).await.unwrap();
        tls.write_all(&buf).await?;
        tls.flush().await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map(|_| ())
    }
    .await;
    let e = result.expect_err("a foreign client certificate must be refused");
    assert!(e.to_string().to_lowercase().contains("unknownca") || e.to_string().contains("alert"), "{e}");
    d.no_event().await;
    d.clean();
    // The destination still takes a real peer.
    let _c = d.ready("m-after").await;
    assert_eq!(d.event().await, Ev::Begin(true));
}

#[tokio::test]
async fn plain_tcp_and_garbage_are_refused_before_any_frame() {
    let mut d = dest(Duration::from_secs(5)).await;
    // A Hello frame on plain TCP.
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut buf = Vec::new();
    wire::send_json(&mut buf, Kind::Hello, &d.hello).await.unwrap();
    s.write_all(&buf).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.expect("closed");
    assert!(answer.len() < 16, "only a TLS alert may come back: {answer:?}");
    // Random bytes.
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let junk: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let _ = s.write_all(&junk).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.expect("closed");
    // Garbage inside an authenticated connection: an Error frame that says
    // what was wrong (a bad length, an unknown type, or a frame that never
    // ends), then the end of the connection; no migration.
    let mut c = d.connect("keys/src").await.unwrap();
    c.write.write_all(&junk).await.unwrap();
    c.write.flush().await.unwrap();
    let why = refusal(&mut c).await;
    assert!(!why.starts_with("(no reason"), "{why}");
    assert!(read(&mut c).await.is_err(), "the connection ends after the Error frame");
    d.no_event().await;
    d.clean();
}

#[tokio::test]
async fn an_oversize_frame_ends_the_migration_and_the_standby_goes_on() {
    let mut d = dest(Duration::from_secs(5)).await;
    let mut c = d.ready("m-oversize").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    c.write.write_all(&[0x7f, 0xff, 0xff, 0xff, Kind::Data as u8, 0, 0]).await.unwrap();
    c.write.flush().await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("exceeds the limit"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(e)) if e.contains("exceeds")));
    d.clean();
    let _c = d.ready("m-next").await;
    assert_eq!(d.event().await, Ev::Begin(true));
}

#[tokio::test]
async fn a_truncated_frame_ends_the_migration() {
    let mut d = dest(Duration::from_secs(5)).await;
    let mut c = d.ready("m-trunc").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::Image, name: "pages-1.img".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    // A data frame announcing 1000 bytes, of which 10 come, then the end.
    let mut f = 1001u32.to_be_bytes().to_vec();
    f.push(Kind::Data as u8);
    f.extend(wire::data_header(1, 0));
    f.extend([7u8; 10]);
    c.write.write_all(&f).await.unwrap();
    c.write.shutdown().await.unwrap();
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
}

#[tokio::test]
async fn path_traversal_names_are_refused() {
    let mut d = dest(Duration::from_secs(5)).await;
    for (i, name) in ["../escape", "../../escape", "/tmp/escape", "..", "a/b"].into_iter().enumerate() {
        let mut c = d.ready(&format!("m-trav-{i}")).await;
        assert_eq!(d.event().await, Ev::Begin(true));
        let open = FileOpen { id: 1, kind: FileKind::Image, name: name.into() };
        wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
        let why = refusal(&mut c).await;
        assert!(why.contains("unsafe file name"), "{name}: {why}");
        assert!(matches!(d.event().await, Ev::Done(Some(_))));
        d.clean();
    }
    // A blob nobody asked for, and a traversing migration id.
    let mut c = d.connect("keys/src").await.unwrap();
    let hello = Hello { migration_id: "..".into(), ..d.hello.clone() };
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    assert!(refusal(&mut c).await.contains("bad migration id"));
    let mut c = d.ready("m-blob").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::Blob, name: format!("sha256:{}", "0".repeat(64)) };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    assert!(refusal(&mut c).await.contains("unexpected"));
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.no_event().await;
    d.clean();
}

#[tokio::test]
async fn more_than_the_quota_is_refused() {
    let mut d = dest(Duration::from_secs(5)).await;
    // Declared: more memory than the limit.
    let mut c = d.connect("keys/src").await.unwrap();
    let hello = Hello { migration_id: "m-big".into(), memory_bytes: 1 << 40, ..d.hello.clone() };
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("limit") || why.contains("not enough"), "{why}");
    assert_eq!(d.event().await, Ev::Begin(true));
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    // Actual: more bytes than the limit (8 MiB here).
    let mut c = d.ready("m-big2").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::Image, name: "pages-1.img".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    let chunk = vec![0u8; wire::CHUNK];
    for i in 0..12u64 {
        let sent =
            wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(1, i * wire::CHUNK as u64), &chunk]).await;
        if sent.is_err() || c.write.flush().await.is_err() {
            break; // the destination hung up
        }
    }
    let why = refusal(&mut c).await;
    assert!(why.contains("larger than the limit") || why.starts_with("(no reason"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(e)) if e.contains("larger than the limit")));
    d.clean();
}

#[tokio::test]
async fn a_peer_that_stops_mid_stream_is_dropped_at_the_deadline() {
    let mut d = dest(Duration::from_secs(1)).await;
    let mut c = d.ready("m-silent").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::Image, name: "pages-1.img".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(1, 0), b"some bytes"]).await.unwrap();
    c.write.flush().await.unwrap();
    let t = std::time::Instant::now();
    let why = refusal(&mut c).await;
    assert!(why.contains("no data from the peer"), "{why}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
    // A handshake that never comes is dropped too.
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut b = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut b)).await;
    assert!(r.is_ok(), "a silent client must be dropped within the deadline");
}

#[tokio::test]
async fn two_peers_pushing_at_once_one_is_busy() {
    let mut d = dest(Duration::from_secs(5)).await;
    let _first = d.ready("m-first").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let mut c = d.connect("keys/src").await.unwrap();
    let hello = Hello { migration_id: "m-second".into(), ..d.hello.clone() };
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("busy"), "{why}");
    assert_eq!(d.event().await, Ev::Begin(false));
    // The first one's files are untouched by the second.
    assert!(d.tmp.path().join("state/images/m-first/criu").is_dir());
    assert!(!d.tmp.path().join("state/images/m-second").exists());
}

/// A writable-layer diff whose symlink points outside, with a file written
/// "through" it: the stream and its manifest are well formed and verified, but
/// laying the layer in place refuses the entry; the restore fails cleanly,
/// nothing appears outside, and the destination stays a standby.
#[tokio::test]
async fn a_symlink_escaping_the_writable_layer_is_refused() {
    let mut d = dest(Duration::from_secs(5)).await;
    let escape = d.tmp.path().parent().unwrap().join(format!("ums-escape-{}", rand::random::<u32>()));
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_link(&mut h, "evil", &escape).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_data(&mut h, "evil/owned", &b"owned"[..]).unwrap();
    let diff = tar.into_inner().unwrap();
    std::fs::create_dir_all(&escape).unwrap();
    let mut c = d.ready("m-symlink").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::UpperDiff, name: "rootfs-diff.tar".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(1, 0), &diff]).await.unwrap();
    let manifest = ums::migration::Manifest {
        pages: Vec::new(),
        files: vec![ums::migration::FileEntry {
            name: "rootfs-diff.tar".into(),
            kind: FileKind::UpperDiff,
            size: diff.len() as u64,
            blake3: blake3::hash(&diff).to_hex().to_string(),
        }],
        meta: ums::workload::checkpoint::Meta {
            ums_version: "test".into(),
            runtime: d.hello.runtime,
            image: d.hello.image.clone(),
            created_unix_ms: 0,
            tcp_established: true,
            settings: None,
        },
    };
    wire::send_json(&mut c.write, Kind::Manifest, &manifest).await.unwrap();
    let res: ums::migration::MigrationResult = read(&mut c).await.unwrap().expect(Kind::Result).unwrap();
    assert!(!res.running);
    let why = res.error.unwrap_or_default();
    assert!(why.contains("writable layer") || why.contains("symlink"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    assert!(!escape.join("owned").exists(), "a file was written through the symlink");
    let _ = std::fs::remove_dir_all(&escape);
    d.clean();
}

/// A `Query` on its own connection, as a source in doubt sends it.
async fn query(d: &Dest, id: &str, action: ums::migration::QueryAction) -> ums::migration::QueryAnswer {
    let mut c = d.connect("keys/src").await.unwrap();
    let q = ums::migration::Query { migration_id: id.into(), action };
    wire::send_json(&mut c.write, Kind::Query, &q).await.unwrap();
    read(&mut c).await.unwrap().expect(Kind::QueryAnswer).unwrap()
}

#[tokio::test]
async fn a_migration_fenced_by_a_query_is_never_restored() {
    use ums::migration::{PeerState, QueryAction};
    let mut d = dest(Duration::from_secs(5)).await;
    // An id never heard of: not running, and fenced from now on.
    assert_eq!(query(&d, "m-unknown", QueryAction::Fence).await.state, PeerState::NotRunning);
    let mut c = d.connect("keys/src").await.unwrap();
    let hello = Hello { migration_id: "m-unknown".into(), ..d.hello.clone() };
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    assert!(refusal(&mut c).await.contains("fenced"));
    assert_eq!(d.event().await, Ev::Begin(true));
    assert!(matches!(d.event().await, Ev::Done(Some(_))));

    // A receive in progress, fenced before its manifest: it refuses to restore.
    let mut c = d.ready("m-fenced").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    assert_eq!(query(&d, "m-fenced", QueryAction::Fence).await.state, PeerState::NotRunning);
    let diff = b"not a tar, never unpacked".to_vec();
    let open = FileOpen { id: 1, kind: FileKind::UpperDiff, name: "rootfs-diff.tar".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(1, 0), &diff]).await.unwrap();
    let manifest = ums::migration::Manifest {
        pages: Vec::new(),
        files: vec![ums::migration::FileEntry {
            name: "rootfs-diff.tar".into(),
            kind: FileKind::UpperDiff,
            size: diff.len() as u64,
            blake3: blake3::hash(&diff).to_hex().to_string(),
        }],
        meta: ums::workload::checkpoint::Meta {
            ums_version: "test".into(),
            runtime: d.hello.runtime,
            image: d.hello.image.clone(),
            created_unix_ms: 0,
            tcp_established: true,
            settings: None,
        },
    };
    wire::send_json(&mut c.write, Kind::Manifest, &manifest).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("not restoring"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    // The promise holds on every later question, fence or stop.
    assert_eq!(query(&d, "m-fenced", QueryAction::Fence).await.state, PeerState::NotRunning);
    assert_eq!(query(&d, "m-fenced", QueryAction::Stop).await.state, PeerState::NotRunning);
    d.clean();
}

/// Every malformed frame, first or later, ends the connection with an
/// `Error` frame that names what was wrong with it.
#[tokio::test]
async fn malformed_frames_get_an_error_frame_that_names_them() {
    let mut d = dest(Duration::from_secs(5)).await;
    // A Hello with a field this version does not know.
    let mut c = d.connect("keys/src").await.unwrap();
    let mut hello = serde_json::to_value(&d.hello).unwrap();
    hello["surprise"] = serde_json::json!(1);
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("unknown field") && why.contains("surprise"), "{why}");
    // A frame type no version has, and a length above the limit, as the first frame.
    for (bytes, says) in [
        (vec![0u8, 0, 0, 1, 200], "unknown frame type 200"),
        (vec![0x7f, 0xff, 0xff, 0xff, Kind::Hello as u8, 0], "exceeds the limit"),
        (vec![0, 0, 0, 3, Kind::Hello as u8, b'{', b'x'], "bad Hello frame"),
    ] {
        let mut c = d.connect("keys/src").await.unwrap();
        c.write.write_all(&bytes).await.unwrap();
        c.write.flush().await.unwrap();
        let why = refusal(&mut c).await;
        assert!(why.contains(says), "{bytes:?}: {why}");
    }
    d.no_event().await;
    d.clean();
    // Later in the migration: a FileOpen with an unknown field.
    let mut c = d.ready("m-field").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = serde_json::json!({ "id": 1, "kind": "image", "name": "pages-1.img", "extra": true });
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("unknown field") || why.contains("unknown variant"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
    let _c = d.ready("m-next").await;
    assert_eq!(d.event().await, Ev::Begin(true));
}

/// A standby that refuses a migration after its Hello, or whose source goes
/// away after it, keeps no new files: no received image layout for an
/// image it never got.
#[tokio::test]
async fn a_migration_refused_after_hello_leaves_no_files() {
    let mut d = dest(Duration::from_secs(5)).await;
    let base = d.hello.clone();
    let other_image = |id: &str| {
        let mut h = Hello { migration_id: id.into(), ..base.clone() };
        h.image.manifest_digest = format!("sha256:{}", "ab".repeat(32));
        h
    };
    // Refused: a blob digest that is no digest.
    let mut c = d.connect("keys/src").await.unwrap();
    let mut h = other_image("m-bad-blob");
    h.blobs.push(("sha256:../../escape".into(), 1));
    wire::send_json(&mut c.write, Kind::Hello, &h).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(!why.starts_with("(no reason"), "{why}");
    assert_eq!(d.event().await, Ev::Begin(true));
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
    // The source hangs up once the destination said which blobs it lacks.
    let mut c = d.connect("keys/src").await.unwrap();
    wire::send_json(&mut c.write, Kind::Hello, &other_image("m-gone")).await.unwrap();
    let _ok: HelloOk = read(&mut c).await.unwrap().expect(Kind::HelloOk).unwrap();
    drop(c);
    assert_eq!(d.event().await, Ev::Begin(true));
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
    let _c = d.ready("m-next").await;
    assert_eq!(d.event().await, Ev::Begin(true));
}

/// `--mode auto`'s probe: another protocol version is refused by name; this
/// one is answered with what arrived, and no migration begins.
#[tokio::test]
async fn a_probe_is_answered_and_a_wrong_version_refused() {
    use ums::migration::auto::{Probe, ProbeAnswer};
    let mut d = dest(Duration::from_secs(5)).await;
    let mut c = d.connect("keys/src").await.unwrap();
    wire::send_json(&mut c.write, Kind::Probe, &Probe { protocol: 5 }).await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("protocol version 5 not supported"), "{why}");
    let mut c = d.connect("keys/src").await.unwrap();
    wire::send_json(&mut c.write, Kind::Probe, &Probe { protocol: wire::PROTOCOL_VERSION }).await.unwrap();
    for k in 0..3u64 {
        wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(0, k * 1000), &[7u8; 1000]]).await.unwrap();
    }
    wire::write_frame(&mut c.write, Kind::Data, &[&wire::data_header(0, 3000)]).await.unwrap();
    c.write.flush().await.unwrap();
    let a: ProbeAnswer = read(&mut c).await.unwrap().expect(Kind::ProbeAnswer).unwrap();
    assert_eq!(a.received, 3000);
    d.no_event().await;
    d.clean();
}

/// zstd chunks: only when agreed in the handshake, and a chunk that lies
/// about its length is refused before it is written.
#[tokio::test]
async fn compressed_chunks_only_when_agreed_and_within_bounds() {
    let mut d = dest(Duration::from_secs(5)).await;
    let chunk = |id: u32, raw_len: u32| {
        let z = zstd::bulk::compress(&[1u8; 4096], 1).unwrap();
        let mut p = wire::dataz_header(id, 0, raw_len).to_vec();
        p.extend_from_slice(&z);
        p
    };
    // Not agreed (this Hello proposes none).
    let mut c = d.ready("m-noz").await;
    assert_eq!(d.event().await, Ev::Begin(true));
    let open = FileOpen { id: 1, kind: FileKind::Image, name: "pages-1.img".into() };
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    wire::write_frame(&mut c.write, Kind::DataZ, &[&chunk(1, 4096)]).await.unwrap();
    c.write.flush().await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("no compression was agreed"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
    // Agreed: the answer says so; a lying length is refused.
    let mut c = d.connect("keys/src").await.unwrap();
    let hello = Hello { migration_id: "m-z".into(), compression: Some("zstd".into()), ..d.hello.clone() };
    wire::send_json(&mut c.write, Kind::Hello, &hello).await.unwrap();
    let ok: HelloOk = read(&mut c).await.unwrap().expect(Kind::HelloOk).unwrap();
    assert_eq!(ok.compression.as_deref(), Some("zstd"));
    assert_eq!(d.event().await, Ev::Begin(true));
    wire::send_json(&mut c.write, Kind::BlobsDone, &serde_json::json!({})).await.unwrap();
    read(&mut c).await.unwrap().expect::<serde_json::Value>(Kind::Ready).unwrap();
    wire::send_json(&mut c.write, Kind::FileOpen, &open).await.unwrap();
    wire::write_frame(&mut c.write, Kind::DataZ, &[&chunk(1, 4096)]).await.unwrap();
    wire::write_frame(&mut c.write, Kind::DataZ, &[&chunk(1, 100)]).await.unwrap();
    c.write.flush().await.unwrap();
    let why = refusal(&mut c).await;
    assert!(why.contains("DataZ"), "{why}");
    assert!(matches!(d.event().await, Ev::Done(Some(_))));
    d.clean();
}
