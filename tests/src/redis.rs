//! Debian's redis server as a real workload: an image with the server and
//! its shared libraries, and a small client in redis's own protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::oci_layout::{Compression, ImageBuilder, Layer, OciImage};

/// The port the server listens on (published: the image exposes it).
pub const PORT: u16 = 6379;

/// An image whose Entrypoint is Debian's redis server (the
/// `redis-check-rdb` binary of redis-tools, which is redis-server under
/// another name) at /usr/bin/redis-server, with the shared libraries `ldd`
/// names at the paths it names; no persistence, listening on every address.
pub fn image(tmp: &Path) -> OciImage {
    let bin = Path::new("/usr/bin/redis-check-rdb");
    assert!(bin.is_file(), "redis-server not found: install redis-tools (image/install-deps.sh --test)");
    let mut layer = Layer::new(Compression::Gzip).file("usr/bin/redis-server", std::fs::read(bin).unwrap(), 0o755);
    let out = std::process::Command::new("ldd").arg(bin).output().expect("ldd (libc-bin)");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or("");
        if let Some(rel) = path.strip_prefix('/') {
            layer = layer.file(rel, std::fs::read(path).unwrap(), 0o755);
        }
    }
    let memctr = crate::build_workload(tmp);
    ImageBuilder::new(&memctr)
        .layer(layer)
        .entrypoint(&["/usr/bin/redis-server"])
        .cmd(&["--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"])
        .expose("6379/tcp")
        .build(&tmp.join("layout"))
        .expect("build the redis image")
}

/// The value the tests store under `key:{i}` (about 1 KiB).
pub fn value(i: usize) -> Vec<u8> {
    format!("value {i} ").repeat(100).into_bytes()
}

/// A client connection.
pub struct Client(BufReader<TcpStream>);

impl Client {
    /// Connect to `addr`, trying again for up to `within`.
    pub fn connect(addr: Ipv4Addr, within: Duration) -> Client {
        let until = Instant::now() + within;
        loop {
            match TcpStream::connect_timeout(&(addr, PORT).into(), Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(within)).unwrap();
                    return Client(BufReader::new(s));
                }
                Err(e) if Instant::now() > until => panic!("redis at {addr}:{PORT}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// One command; the reply's first line and, for a bulk string, its value.
    pub fn cmd(&mut self, args: &[&[u8]]) -> (String, Option<Vec<u8>>) {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&req).unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        let line = line.trim_end().to_string();
        if let Some(n) = line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            let mut v = vec![0u8; n + 2];
            self.0.read_exact(&mut v).unwrap();
            v.truncate(n);
            return (line, Some(v));
        }
        (line, None)
    }

    /// Store `value(i)` under `key:{i}` for i in 0..n.
    pub fn load(&mut self, n: usize) {
        for i in 0..n {
            let (r, _) = self.cmd(&[b"SET", format!("key:{i}").as_bytes(), &value(i)]);
            assert_eq!(r, "+OK");
        }
    }

    /// Exactly `n` keys, each with its value.
    pub fn check(&mut self, n: usize) {
        assert_eq!(self.cmd(&[b"DBSIZE"]).0, format!(":{n}"));
        for i in 0..n {
            let (_, v) = self.cmd(&[b"GET", format!("key:{i}").as_bytes()]);
            assert!(v.as_deref() == Some(&value(i)[..]), "key:{i}: {:?}", v.map(|v| v.len()));
        }
    }
}
