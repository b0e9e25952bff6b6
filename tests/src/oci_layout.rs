//! Deterministic OCI image layouts for the tests (no registry is reachable).
//!
//! [`ImageBuilder`] writes an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) holding a busybox base layer, an app layer with
//! `/bin/memctr` and any extra files, optional further layers (gzip, zstd or
//! plain tar), and an image config whose Entrypoint, Cmd, Env, WorkingDir, User
//! and ExposedPorts the test sets. Layers use fixed mtimes, owners and sorted
//! entries, so the same inputs always give the same manifest digest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Fixed mtime of every entry (2023-11-14).
const MTIME: u64 = 1_700_000_000;
/// Where the base layer takes busybox from (Debian's busybox-static).
const HOST_BUSYBOX: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];
/// Applets linked in /bin and /usr/bin.
const APPLETS: &[&str] =
    &["sh", "ls", "cat", "sleep", "echo", "id", "env", "ps", "wc", "sha256sum", "httpd", "nc", "unshare"];

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    /// Uses the `zstd` command (Debian package `zstd`).
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_LAYER_TAR,
            Compression::Gzip => MEDIA_LAYER_GZIP,
            Compression::Zstd => MEDIA_LAYER_ZSTD,
        }
    }
}

#[derive(Clone, Debug)]
enum Entry {
    Dir { mode: u32, uid: u64, gid: u64 },
    File { data: Vec<u8>, mode: u32, uid: u64, gid: u64 },
    Symlink { target: String },
}

/// One layer: entries by path (relative, no leading `/`), written sorted.
#[derive(Clone, Debug)]
pub struct Layer {
    compression: Compression,
    entries: BTreeMap<String, Entry>,
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Layer {
    pub fn new(compression: Compression) -> Self {
        Layer { compression, entries: BTreeMap::new() }
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32, uid: u64, gid: u64) -> Self {
        self.entries.insert(clean(path), Entry::File { data: data.into(), mode, uid, gid });
        self
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        self.entries.insert(clean(path), Entry::Dir { mode, uid, gid });
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.insert(clean(path), Entry::Symlink { target: target.to_string() });
        self
    }

    /// The uncompressed tar: parents before children, every missing parent
    /// directory added as root-owned 0755.
    fn tar(&self) -> anyhow::Result<Vec<u8>> {
        let mut entries = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = Path::new(path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                entries.entry(p.to_string_lossy().into_owned()).or_insert(Entry::Dir { mode: 0o755, uid: 0, gid: 0 });
                parent = p.parent();
            }
        }
        let mut builder = tar::Builder::new(Vec::new());
        for (path, entry) in &entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(MTIME);
            match entry {
                Entry::Dir { mode, uid, gid } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_uid(*uid);
                    header.set_gid(*gid);
                    header.set_size(0);
                    builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
                }
                Entry::File { data, mode, uid, gid } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_uid(*uid);
                    header.set_gid(*gid);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_uid(0);
                    header.set_gid(0);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)?;
                }
            }
        }
        Ok(builder.into_inner()?)
    }
}

fn compress(tar: &[u8], compression: Compression) -> anyhow::Result<Vec<u8>> {
    match compression {
        Compression::None => Ok(tar.to_vec()),
        Compression::Gzip => {
            // GzBuilder writes mtime 0 and no file name: deterministic.
            let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::new(6));
            enc.write_all(tar)?;
            Ok(enc.finish()?)
        }
        Compression::Zstd => {
            let mut child = Command::new("zstd")
                .args(["-q", "-3", "-c", "--no-progress"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot run `zstd` for a zstd layer: install the Debian package zstd")?;
            let mut stdin = child.stdin.take().unwrap();
            let input = tar.to_vec();
            let writer = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output()?;
            writer.join().unwrap()?;
            ensure!(out.status.success(), "zstd failed: {}", String::from_utf8_lossy(&out.stderr));
            Ok(out.stdout)
        }
    }
}

/// Describes a blob written to the layout.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An OCI image layout written by [`ImageBuilder::build`].
#[derive(Clone, Debug)]
pub struct OciImage {
    /// The layout directory (holds `index.json`).
    pub layout: PathBuf,
    /// `sha256:<hex>` of the manifest: the image's identity.
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<Descriptor>,
    /// `sha256:<hex>` of each uncompressed layer tar, as in the config.
    pub diff_ids: Vec<String>,
}

/// Builds a workload image. See the module docs.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    memctr: PathBuf,
    app: Layer,
    extra: Vec<Layer>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<(String, String)>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Vec<String>,
    tag: String,
}

impl ImageBuilder {
    /// An image with busybox, `/bin/memctr` (copied from `memctr`, see
    /// [`crate::build_workload`]) as its Entrypoint, and a standard PATH.
    pub fn new(memctr: &Path) -> Self {
        ImageBuilder {
            memctr: memctr.to_path_buf(),
            app: Layer::new(Compression::Gzip),
            extra: Vec::new(),
            entrypoint: Some(vec!["/bin/memctr".into()]),
            cmd: None,
            env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())],
            working_dir: None,
            user: None,
            exposed_ports: Vec::new(),
            tag: "latest".into(),
        }
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn no_entrypoint(mut self) -> Self {
        self.entrypoint = None;
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets (or replaces) one `KEY=value` of the config's Env.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// `User`, e.g. `app`, `1000`, `1000:1000`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// An ExposedPorts key such as `8080/tcp`.
    pub fn expose(mut self, port: &str) -> Self {
        self.exposed_ports.push(port.into());
        self
    }

    /// The `org.opencontainers.image.ref.name` of the manifest in index.json.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.into();
        self
    }

    /// Adds a root-owned file to the app layer (the one with /bin/memctr).
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.app = self.app.file(path, data, mode);
        self
    }

    /// Changes the compression of the app layer (gzip by default).
    pub fn app_compression(mut self, compression: Compression) -> Self {
        self.app.compression = compression;
        self
    }

    /// Adds a further layer on top of the app layer.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.extra.push(layer);
        self
    }

    fn base_layer() -> anyhow::Result<Layer> {
        let busybox = HOST_BUSYBOX
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .context("busybox not found: install busybox-static")?;
        let data = std::fs::read(busybox)?;
        let mut layer = Layer::new(Compression::Gzip)
            .file("bin/busybox", data, 0o755)
            .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n", 0o644)
            .file("etc/group", "root:x:0:\napp:x:1000:\n", 0o644)
            .dir("tmp", 0o1777, 0, 0)
            .dir("root", 0o700, 0, 0)
            .dir("home/app", 0o755, 1000, 1000)
            .dir("proc", 0o555, 0, 0)
            .dir("sys", 0o555, 0, 0)
            .dir("dev", 0o755, 0, 0)
            .dir("etc", 0o755, 0, 0);
        for applet in APPLETS {
            layer = layer
                .symlink(&format!("bin/{applet}"), "busybox")
                .symlink(&format!("usr/bin/{applet}"), "/bin/busybox");
        }
        Ok(layer)
    }

    /// Writes the layout into `dir` (created if missing) and returns it.
    pub fn build(&self, dir: &Path) -> anyhow::Result<OciImage> {
        let memctr = std::fs::read(&self.memctr)
            .with_context(|| format!("cannot read memctr binary {}", self.memctr.display()))?;
        let app = self.app.clone().file("bin/memctr", memctr, 0o755);
        let mut all = vec![Self::base_layer()?, app];
        all.extend(self.extra.iter().cloned());

        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in &all {
            let tar = layer.tar()?;
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
            let blob = compress(&tar, layer.compression)?;
            layers.push(write_blob(dir, layer.compression.media_type(), &blob)?);
        }

        let mut config = serde_json::Map::new();
        if let Some(e) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(e));
        }
        if let Some(c) = &self.cmd {
            config.insert("Cmd".into(), json!(c));
        }
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        config.insert("Env".into(), json!(env));
        if let Some(w) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(w));
        }
        if let Some(u) = &self.user {
            config.insert("User".into(), json!(u));
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, Value> =
                self.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect();
            config.insert("ExposedPorts".into(), Value::Object(ports));
        }
        let (os, arch) = platform();
        let config_json = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": all.iter().map(|_| json!({"created": "2023-11-14T22:13:20Z", "created_by": "ums-e2e ImageBuilder"})).collect::<Vec<_>>(),
        });
        let config_desc = write_blob(dir, MEDIA_CONFIG, &serde_json::to_vec(&config_json)?)?;

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc.to_json(),
            "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        let manifest_desc = write_blob(dir, MEDIA_MANIFEST, &serde_json::to_vec(&manifest)?)?;

        let mut entry = manifest_desc.to_json();
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": self.tag});
        entry["platform"] = json!({"architecture": arch, "os": os});
        let index = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

        Ok(OciImage {
            layout: dir.to_path_buf(),
            manifest_digest: manifest_desc.digest,
            config_digest: config_desc.digest,
            layers,
            diff_ids,
        })
    }
}

fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

fn write_blob(dir: &Path, media_type: &str, data: &[u8]) -> anyhow::Result<Descriptor> {
    let hex = hex::encode(Sha256::digest(data));
    std::fs::write(dir.join("blobs/sha256").join(&hex), data)?;
    Ok(Descriptor { media_type: media_type.into(), digest: format!("sha256:{hex}"), size: data.len() as u64 })
}

fn blob_path(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("digest {digest} is not sha256"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Reads and checks a blob against its descriptor (`{mediaType, digest, size}`).
pub fn read_blob(layout: &Path, descriptor: &Value) -> anyhow::Result<Vec<u8>> {
    let digest = descriptor["digest"].as_str().context("descriptor without digest")?;
    let data = std::fs::read(blob_path(layout, digest)?).with_context(|| format!("blob {digest} missing"))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    ensure!(actual == digest, "blob {digest} has digest {actual}");
    let size = descriptor["size"].as_u64().context("descriptor without size")?;
    ensure!(size == data.len() as u64, "blob {digest}: size {} in descriptor, {} on disk", size, data.len());
    Ok(data)
}

/// The (only) manifest of a layout, checked against its digest.
pub fn read_manifest(layout: &Path) -> anyhow::Result<Value> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifests = index["manifests"].as_array().context("index.json without manifests")?;
    ensure!(manifests.len() == 1, "expected one manifest in index.json, found {}", manifests.len());
    ensure!(manifests[0]["mediaType"] == MEDIA_MANIFEST, "unexpected manifest media type");
    Ok(serde_json::from_slice(&read_blob(layout, &manifests[0])?)?)
}

/// Checks a whole layout: index, manifest, config and every layer (digests,
/// sizes, and each layer's diff_id after decompression). Returns the config.
pub fn verify_layout(layout: &Path) -> anyhow::Result<Value> {
    let layout_file: Value = serde_json::from_slice(&std::fs::read(layout.join("oci-layout"))?)?;
    ensure!(layout_file["imageLayoutVersion"] == "1.0.0", "bad oci-layout file");
    let manifest = read_manifest(layout)?;
    ensure!(manifest["config"]["mediaType"] == MEDIA_CONFIG, "unexpected config media type");
    let config: Value = serde_json::from_slice(&read_blob(layout, &manifest["config"])?)?;
    let layers = manifest["layers"].as_array().context("manifest without layers")?;
    let diff_ids = config["rootfs"]["diff_ids"].as_array().context("config without diff_ids")?;
    ensure!(layers.len() == diff_ids.len(), "{} layers but {} diff_ids", layers.len(), diff_ids.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let blob = read_blob(layout, layer)?;
        let tar = decompress(&blob, layer["mediaType"].as_str().unwrap_or(""))?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        ensure!(diff_id == &json!(actual), "layer {} has diff_id {actual}, config says {diff_id}", layer["digest"]);
    }
    Ok(config)
}

fn decompress(blob: &[u8], media_type: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    match media_type {
        MEDIA_LAYER_TAR => Ok(blob.to_vec()),
        MEDIA_LAYER_GZIP => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(blob).read_to_end(&mut out)?;
            Ok(out)
        }
        MEDIA_LAYER_ZSTD => {
            let mut child = Command::new("zstd")
                .args(["-q", "-d", "-c"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot run `zstd`: install the Debian package zstd")?;
            let mut stdin = child.stdin.take().unwrap();
            let input = blob.to_vec();
            let writer = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output()?;
            writer.join().unwrap()?;
            ensure!(out.status.success(), "zstd -d failed");
            Ok(out.stdout)
        }
        other => bail!("unknown layer media type {other:?}"),
    }
}

/// Unpacks a layout's layers in order into `rootfs` with the `tar` command
/// (independent of ums's own unpacker). Whiteouts are not handled: images made
/// by [`ImageBuilder`] have none.
pub fn unpack_with_tar(layout: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let manifest = read_manifest(layout)?;
    std::fs::create_dir_all(rootfs)?;
    for layer in manifest["layers"].as_array().context("manifest without layers")? {
        let digest = layer["digest"].as_str().context("layer without digest")?;
        let filter = match layer["mediaType"].as_str().unwrap_or("") {
            MEDIA_LAYER_TAR => None,
            MEDIA_LAYER_GZIP => Some("-z"),
            MEDIA_LAYER_ZSTD => Some("--zstd"),
            other => bail!("unknown layer media type {other:?}"),
        };
        let mut cmd = Command::new("tar");
        cmd.arg("-x").args(filter).arg("--numeric-owner").arg("-p").arg("-f");
        cmd.arg(blob_path(layout, digest)?).arg("-C").arg(rootfs);
        crate::run(&mut cmd)?;
    }
    Ok(())
}
