//! The workload's OCI image layout on disk (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`): find the manifest to run, receive missing blobs from a
//! peer with their digests checked, and unpack the layers once into a cached
//! rootfs that becomes the nested container's read-only overlay lower dir.
//!
//! Layer entries are written by [`TreeWriter`], which never writes outside its
//! root: names are checked, parents are resolved as if the root were `/`, and the
//! last component of a name is never followed. `upper_diff` reuses it with a
//! stricter policy (no symlinked parents at all).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use oci_spec::image::{Arch, Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use sha2::{Digest as _, Sha256};

/// Name of the file, inside `cache_dir/<manifest hex>/`, that marks a finished unpack.
const COMPLETE_MARKER: &str = "complete";
/// Prefix of a whiteout entry in a layer (OCI image spec, "Whiteouts").
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker entry in a layer.
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Symlinks followed while resolving one name, as Linux's MAXSYMLINKS.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Makes temporary names unique within this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path} is not an oci image layout: {missing} is missing")]
    NotALayout { path: PathBuf, missing: &'static str },
    #[error("create layout directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read index {path}")]
    ReadIndex {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("index {path} lists no manifest")]
    EmptyIndex { path: PathBuf },
    #[error("index {path} lists {count} manifests and none is for {os}/{arch}")]
    NoPlatformMatch { path: PathBuf, count: usize, os: String, arch: String },
    #[error("index {path} nests image indexes more than one level deep")]
    IndexTooDeep { path: PathBuf },
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },
    #[error("read blob {path}")]
    ReadBlob {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {path} hashes to sha256:{actual}, expected {expected}")]
    DigestMismatch { path: PathBuf, expected: String, actual: String },
    #[error("blob {digest} is larger than the limit of {max_size} bytes")]
    BlobTooLarge { digest: String, max_size: u64 },
    #[error("parse manifest {path}")]
    ParseManifest {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("parse nested index {path}")]
    ParseNestedIndex {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("parse image config {path}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported layer media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    #[error("start decompressing layer into {dest}")]
    Decompress {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read layer tar stream for {dest}")]
    ReadTar {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("apply layer entry {name:?} under {dest}")]
    ApplyEntry {
        name: PathBuf,
        dest: PathBuf,
        #[source]
        source: EntryError,
    },
    #[error("unpack layer {digest} into {dest}")]
    UnpackLayer {
        digest: String,
        dest: PathBuf,
        #[source]
        source: Box<LayoutError>,
    },
}

/// Why one tar entry could not be written into a tree. Shared by layers and
/// writable-layer diffs.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("empty name")]
    EmptyName,
    #[error("absolute name")]
    AbsoluteName,
    #[error("name has a `..` component")]
    DotDot,
    #[error("parent {0} is a symlink")]
    SymlinkParent(PathBuf),
    #[error("too many levels of symlinks below {0}")]
    SymlinkLoop(PathBuf),
    #[error("parent {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("hard link target {0} does not exist or is a directory")]
    LinkTargetMissing(PathBuf),
    #[error("inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read symlink {path}")]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write file {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create symlink {path}")]
    Symlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hard link {path} to {target}")]
    HardLink {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create device node or fifo {path}")]
    Mknod {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("chown {path}")]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chmod {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("set mtime of {path}")]
    SetTime {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("read tar metadata of entry")]
    Header {
        #[source]
        source: io::Error,
    },
}

/// The workload image on disk.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

/// The manifest chosen from a layout's index, with its image config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// `sha256:<hex>` of the manifest blob.
    pub manifest_digest: String,
    /// Size in bytes of the manifest blob.
    pub manifest_size: u64,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    pub config_digest: String,
}

impl OciLayout {
    /// Open an existing layout; `oci-layout` and `index.json` must exist.
    pub fn open(root: &Path) -> Result<Self, LayoutError> {
        for missing in ["oci-layout", "index.json"] {
            if !root.join(missing).is_file() {
                return Err(LayoutError::NotALayout { path: root.to_path_buf(), missing });
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// Make an empty layout (or keep an existing one) that can receive blobs.
    pub fn create(root: &Path) -> Result<Self, LayoutError> {
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|source| LayoutError::CreateDir { path: blobs.clone(), source })?;
        let marker = root.join("oci-layout");
        if !marker.is_file() {
            write_atomically(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = root.join("index.json");
        if !index.is_file() {
            write_atomically(&index, br#"{"schemaVersion":2,"manifests":[]}"#)?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Find the image to run: the index's only manifest, or the one for this
    /// host's platform (linux/amd64 here); a nested image index is followed one level.
    pub fn resolve(&self) -> Result<ResolvedImage, LayoutError> {
        let index_path = self.index_path();
        let index = ImageIndex::from_file(&index_path)
            .map_err(|source| LayoutError::ReadIndex { path: index_path.clone(), source })?;
        let mut chosen = pick_manifest(index.manifests(), &index_path)?.clone();
        if is_index_media_type(chosen.media_type()) {
            let nested_digest = chosen.digest().to_string();
            let nested_path = self.blob_path(&nested_digest)?;
            let bytes = self.read_verified(&nested_digest)?;
            let nested = ImageIndex::from_reader(&bytes[..])
                .map_err(|source| LayoutError::ParseNestedIndex { path: nested_path.clone(), source })?;
            chosen = pick_manifest(nested.manifests(), &nested_path)?.clone();
            if is_index_media_type(chosen.media_type()) {
                return Err(LayoutError::IndexTooDeep { path: index_path });
            }
        }

        let manifest_digest = chosen.digest().to_string();
        let manifest_path = self.blob_path(&manifest_digest)?;
        let bytes = self.read_verified(&manifest_digest)?;
        let manifest = ImageManifest::from_reader(&bytes[..])
            .map_err(|source| LayoutError::ParseManifest { path: manifest_path, source })?;
        let config_digest = manifest.config().digest().to_string();
        let config_path = self.blob_path(&config_digest)?;
        let config_bytes = self.read_verified(&config_digest)?;
        let config =
            parse_config(&config_bytes).map_err(|source| LayoutError::ParseConfig { path: config_path, source })?;
        Ok(ResolvedImage { manifest_digest, manifest_size: bytes.len() as u64, manifest, config, config_digest })
    }

    /// Path of a blob; only `sha256:<64 lowercase hex>` is accepted, so a digest
    /// can never name a file outside `blobs/sha256`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        let hex = sha256_hex(digest)?;
        Ok(self.root.join("blobs").join("sha256").join(hex))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// The digests of `digests` that this layout does not hold.
    pub fn missing_blobs(&self, digests: &[String]) -> Vec<String> {
        digests.iter().filter(|d| !self.has_blob(d)).cloned().collect()
    }

    /// Write a blob from `reader` into a temporary file in `blobs/sha256`, hashing
    /// as it goes, and rename it into place only if its digest matches and it is
    /// no larger than `max_size`. On any failure the temporary file is removed.
    /// Returns the blob's size.
    pub fn add_blob(&self, digest: &str, mut reader: impl Read, max_size: u64) -> Result<u64, LayoutError> {
        let final_path = self.blob_path(digest)?;
        let expected_hex = sha256_hex(digest)?;
        let dir = final_path.parent().unwrap_or(&self.root).to_path_buf();
        let temp_path = dir.join(temp_name(expected_hex));
        let mut temp = TempGuard::file(temp_path.clone());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp_path)
            .map_err(|source| LayoutError::WriteFile { path: temp_path.clone(), source })?;
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LayoutError::ReadBlob { path: temp_path.clone(), source }),
            };
            total += n as u64;
            if total > max_size {
                return Err(LayoutError::BlobTooLarge { digest: digest.to_string(), max_size });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|source| LayoutError::WriteFile { path: temp_path.clone(), source })?;
        }
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != expected_hex {
            return Err(LayoutError::DigestMismatch { path: temp_path, expected: digest.to_string(), actual });
        }
        fs::rename(&temp_path, &final_path).map_err(|source| LayoutError::Rename {
            from: temp_path.clone(),
            to: final_path.clone(),
            source,
        })?;
        temp.disarm();
        Ok(total)
    }

    /// Make `index.json` list exactly this manifest, so `resolve` finds it. The
    /// manifest blob must already be present (its media type is read from it).
    pub fn set_index(&self, manifest_digest: &str, manifest_size: u64) -> Result<(), LayoutError> {
        let path = self.blob_path(manifest_digest)?;
        let bytes = fs::read(&path).map_err(|source| LayoutError::ReadBlob { path: path.clone(), source })?;
        // Docker's v2 manifests carry their own media type; keep it so tools agree.
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(MediaType::from))
            .unwrap_or(MediaType::ImageManifest);
        let digest = Digest::from_str(manifest_digest)
            .map_err(|_| LayoutError::InvalidDigest { digest: manifest_digest.to_string() })?;
        let mut index = ImageIndex::default();
        index.set_manifests(vec![Descriptor::new(media_type, manifest_size, digest)]);
        let json = index.to_string().map_err(|source| LayoutError::ReadIndex { path: self.index_path(), source })?;
        write_atomically(&self.index_path(), json.as_bytes())
    }

    /// Every blob an image needs (manifest, config, layers) with its size.
    pub fn image_blobs(&self, img: &ResolvedImage) -> Vec<(String, u64)> {
        let mut blobs = vec![
            (img.manifest_digest.clone(), img.manifest_size),
            (img.manifest.config().digest().to_string(), img.manifest.config().size()),
        ];
        blobs.extend(img.manifest.layers().iter().map(|l| (l.digest().to_string(), l.size())));
        blobs
    }

    /// Read a whole (small) blob and check its digest.
    fn read_verified(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest)?;
        let bytes = fs::read(&path).map_err(|source| LayoutError::ReadBlob { path: path.clone(), source })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256_hex(digest)? {
            return Err(LayoutError::DigestMismatch { path, expected: digest.to_string(), actual });
        }
        Ok(bytes)
    }
}

/// Unpack every layer of `img`, in order, into `cache_dir/<manifest hex>/rootfs`,
/// once. The layers go into a temporary directory that is renamed into place
/// with a completion marker inside, so a crash never leaves a half-made cache.
/// Returns the rootfs path (the nested container's read-only lower dir).
pub fn unpack_image(layout: &OciLayout, img: &ResolvedImage, cache_dir: &Path) -> Result<PathBuf, LayoutError> {
    let hex = sha256_hex(&img.manifest_digest)?;
    let final_dir = cache_dir.join(hex);
    if final_dir.join(COMPLETE_MARKER).is_file() {
        tracing::debug!(path = %final_dir.display(), "unpacked image found in cache");
        return Ok(final_dir.join("rootfs"));
    }
    if final_dir.exists() {
        // Not made by us (we only ever rename complete trees here): start over.
        fs::remove_dir_all(&final_dir).map_err(|source| LayoutError::Remove { path: final_dir.clone(), source })?;
    }
    fs::create_dir_all(cache_dir).map_err(|source| LayoutError::CreateDir { path: cache_dir.to_path_buf(), source })?;
    let temp_dir = cache_dir.join(temp_name(hex));
    let mut guard = TempGuard::dir(temp_dir.clone());
    let rootfs = temp_dir.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|source| LayoutError::CreateDir { path: rootfs.clone(), source })?;
    for layer in img.manifest.layers() {
        let digest = layer.digest().to_string();
        let media_type = layer.media_type().to_string();
        unpack_one_layer(layout, &digest, &media_type, &rootfs).map_err(|source| LayoutError::UnpackLayer {
            digest: digest.clone(),
            dest: rootfs.clone(),
            source: Box::new(source),
        })?;
    }
    let marker = temp_dir.join(COMPLETE_MARKER);
    fs::write(&marker, img.manifest_digest.as_bytes())
        .map_err(|source| LayoutError::WriteFile { path: marker.clone(), source })?;
    match fs::rename(&temp_dir, &final_dir) {
        Ok(()) => guard.disarm(),
        // Someone else finished the same image first: theirs is as good as ours.
        Err(_) if final_dir.join(COMPLETE_MARKER).is_file() => {}
        Err(source) => return Err(LayoutError::Rename { from: temp_dir, to: final_dir, source }),
    }
    tracing::info!(
        image = %img.manifest_digest,
        layers = img.manifest.layers().len(),
        path = %final_dir.display(),
        "unpacked image"
    );
    Ok(final_dir.join("rootfs"))
}

/// Apply one layer blob, checking its digest over the compressed bytes.
fn unpack_one_layer(layout: &OciLayout, digest: &str, media_type: &str, rootfs: &Path) -> Result<(), LayoutError> {
    let path = layout.blob_path(digest)?;
    let file = File::open(&path).map_err(|source| LayoutError::ReadBlob { path: path.clone(), source })?;
    let compressed = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hashing = HashingReader { inner: io::BufReader::new(file), hasher: Sha256::new() };
    apply_layer_bounded(&mut hashing, media_type, rootfs, expansion_limit(compressed))?;
    // The tar reader stops at its end-of-archive blocks; hash whatever follows.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| LayoutError::ReadBlob { path: path.clone(), source })?;
    let actual = hex::encode(hashing.hasher.finalize());
    if actual != sha256_hex(digest)? {
        return Err(LayoutError::DigestMismatch { path, expected: digest.to_string(), actual });
    }
    Ok(())
}

/// Apply one layer tar onto `dest`; the media type decides the compression
/// (plain tar, gzip, zstd; OCI and Docker names). Whiteouts delete from earlier
/// layers, opaque markers empty a directory of earlier layers' children.
pub fn apply_layer(reader: impl Read, media_type: &str, dest: &Path) -> Result<(), LayoutError> {
    apply_layer_bounded(reader, media_type, dest, u64::MAX)
}

/// How far a layer of `compressed` bytes may expand: real layers compress 2
/// to 10 times; a decompression bomb (gzip reaches 1000:1) is stopped long
/// before it fills the state dir.
pub fn expansion_limit(compressed: u64) -> u64 {
    compressed.saturating_mul(64).max(256 << 20)
}

/// Counts the bytes a decompressor produced and fails past the limit.
struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("layer expands beyond {} bytes; refusing it as a decompression bomb", self.limit),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// `apply_layer`, failing once the uncompressed tar exceeds `limit` bytes.
pub fn apply_layer_bounded(reader: impl Read, media_type: &str, dest: &Path, limit: u64) -> Result<(), LayoutError> {
    let decompress_err = |source| LayoutError::Decompress { dest: dest.to_path_buf(), source };
    let stream: Box<dyn Read + '_> = match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar"
        | "application/x-tar" => Box::new(reader),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Box::new(flate2::read::MultiGzDecoder::new(reader))
        }
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Box::new(zstd::stream::read::Decoder::new(reader).map_err(decompress_err)?)
        }
        other => return Err(LayoutError::UnsupportedMediaType { media_type: other.to_string() }),
    };
    apply_tar(Bounded { inner: stream, left: limit, limit }, dest)
}

fn apply_tar(stream: impl Read, dest: &Path) -> Result<(), LayoutError> {
    let read_err = |source| LayoutError::ReadTar { dest: dest.to_path_buf(), source };
    let mut archive = tar::Archive::new(stream);
    let mut writer = TreeWriter::new(dest, ParentPolicy::FollowInRoot);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let name = entry.path().map_err(read_err)?.into_owned();
        let apply_err = |source| LayoutError::ApplyEntry { name: name.clone(), dest: dest.to_path_buf(), source };
        let Some(node) = read_node(&mut entry).map_err(apply_err)? else {
            continue;
        };
        let mut comps = entry_components(&name, true).map_err(apply_err)?;
        let Some(last) = comps.pop() else {
            if matches!(node.kind, NodeKind::Dir) {
                writer.set_root_meta(&node.meta).map_err(apply_err)?;
            }
            continue;
        };
        let last_bytes = last.as_bytes();
        if last_bytes == OPAQUE_MARKER.as_bytes() {
            if let Some(parent) = writer.resolve_parent(&comps, false).map_err(apply_err)? {
                writer.make_opaque(&parent).map_err(apply_err)?;
            }
        } else if let Some(hidden) = last_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if let Some(parent) = writer.resolve_parent(&comps, false).map_err(apply_err)? {
                writer.whiteout(&parent, OsStr::from_bytes(hidden)).map_err(apply_err)?;
            }
        } else {
            let parent = writer.resolve_parent(&comps, true).map_err(apply_err)?.unwrap_or_default();
            writer.write_node(&parent, &last, &node, &mut entry).map_err(apply_err)?;
        }
    }
    writer.finish().map_err(|source| LayoutError::ApplyEntry {
        name: PathBuf::from("."),
        dest: dest.to_path_buf(),
        source,
    })
}

/// The hex part of `sha256:<64 lowercase hex>`, or an error for anything else.
pub fn sha256_hex(digest: &str) -> Result<&str, LayoutError> {
    let invalid = || LayoutError::InvalidDigest { digest: digest.to_string() };
    let hex = digest.strip_prefix("sha256:").ok_or_else(invalid)?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(invalid())
    }
}

/// Parse an image config. oci-spec 0.7 requires `history` (and `rootfs`), which
/// the image spec leaves optional; fill them in when an image omits them.
fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, oci_spec::OciSpecError> {
    let first_err = match ImageConfiguration::from_reader(bytes) {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(bytes) else {
        return Err(first_err);
    };
    object.entry("history").or_insert_with(|| serde_json::json!([]));
    object.entry("rootfs").or_insert_with(|| serde_json::json!({"type": "layers", "diff_ids": []}));
    let patched = serde_json::Value::Object(object).to_string();
    ImageConfiguration::from_reader(patched.as_bytes()).map_err(|_| first_err)
}

fn is_index_media_type(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == "application/vnd.docker.distribution.manifest.list.v2+json",
        _ => false,
    }
}

/// This host's platform in OCI terms (linux/amd64 on x86_64).
fn host_platform() -> (Os, Arch) {
    (Os::Linux, Arch::default())
}

fn pick_manifest<'a>(manifests: &'a [Descriptor], index_path: &Path) -> Result<&'a Descriptor, LayoutError> {
    match manifests {
        [] => Err(LayoutError::EmptyIndex { path: index_path.to_path_buf() }),
        [only] => Ok(only),
        many => {
            let (os, arch) = host_platform();
            many.iter()
                .find(|d| d.platform().as_ref().is_some_and(|p| *p.os() == os && *p.architecture() == arch))
                .ok_or_else(|| LayoutError::NoPlatformMatch {
                    path: index_path.to_path_buf(),
                    count: many.len(),
                    os: os.to_string(),
                    arch: arch.to_string(),
                })
        }
    }
}

fn temp_name(hex: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".tmp-{hex}-{}-{n}", std::process::id())
}

/// Write a small file through a temporary name and rename it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let temp = path.with_file_name(temp_name("write"));
    fs::write(&temp, bytes).map_err(|source| LayoutError::WriteFile { path: temp.clone(), source })?;
    fs::rename(&temp, path).map_err(|source| {
        let _ = fs::remove_file(&temp);
        LayoutError::Rename { from: temp.clone(), to: path.to_path_buf(), source }
    })
}

/// Removes a temporary file or directory when dropped, unless disarmed.
struct TempGuard {
    path: Option<PathBuf>,
    is_dir: bool,
}

impl TempGuard {
    fn file(path: PathBuf) -> Self {
        Self { path: Some(path), is_dir: false }
    }
    fn dir(path: PathBuf) -> Self {
        Self { path: Some(path), is_dir: true }
    }
    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let result = if self.is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "remove temporary");
                }
            }
        }
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Writing tar entries into a tree without ever leaving it.

/// How symlinks among a name's parent directories are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParentPolicy {
    /// Follow them as if the tree's root were `/` (image layers may say
    /// `lib/x` where `lib -> usr/lib`); `..` and absolute targets stop at the root.
    FollowInRoot,
    /// Refuse them: a writable-layer diff never needs one.
    Reject,
}

/// What a tar entry creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Dir,
    File,
    Symlink(PathBuf),
    /// Target name relative to the tree's root.
    HardLink(PathBuf),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct NodeMeta {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    /// From PAX `SCHILY.xattr.<name>` records.
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: NodeKind,
    pub(crate) meta: NodeMeta,
}

/// Read a tar entry's type and metadata; `None` for entry types that create
/// nothing (global PAX headers and the like).
pub(crate) fn read_node<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Node>, EntryError> {
    let hdr_err = |source| EntryError::Header { source };
    let bad = |what: &str| EntryError::Header { source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()) };
    let header = entry.header();
    let device = |h: &tar::Header| -> Result<(u32, u32), EntryError> {
        Ok((h.device_major().map_err(hdr_err)?.unwrap_or(0), h.device_minor().map_err(hdr_err)?.unwrap_or(0)))
    };
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => NodeKind::File,
        tar::EntryType::Directory => NodeKind::Dir,
        tar::EntryType::Symlink => NodeKind::Symlink(
            entry.link_name().map_err(hdr_err)?.ok_or_else(|| bad("symlink without target"))?.into_owned(),
        ),
        tar::EntryType::Link => NodeKind::HardLink(
            entry.link_name().map_err(hdr_err)?.ok_or_else(|| bad("hard link without target"))?.into_owned(),
        ),
        tar::EntryType::Char => {
            let (major, minor) = device(header)?;
            NodeKind::Char(major, minor)
        }
        tar::EntryType::Block => {
            let (major, minor) = device(header)?;
            NodeKind::Block(major, minor)
        }
        tar::EntryType::Fifo => NodeKind::Fifo,
        other => {
            tracing::debug!(entry_type = ?other, "tar entry creates nothing; passed over");
            return Ok(None);
        }
    };
    let header = entry.header();
    let mut uid = header.uid().map_err(hdr_err)?;
    let mut gid = header.gid().map_err(hdr_err)?;
    let mut meta = NodeMeta {
        mode: header.mode().map_err(hdr_err)? & 0o7777,
        uid: 0,
        gid: 0,
        mtime: header.mtime().map_err(hdr_err)? as i64,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions().map_err(hdr_err)? {
        for ext in pax {
            let ext = ext.map_err(hdr_err)?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value).ok().and_then(|s| s.split('.').next()).and_then(|s| s.parse::<i64>().ok())
            };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                meta.xattrs.push((name.to_string(), value.to_vec()));
            } else if key == "uid" {
                uid = number().ok_or_else(|| bad("bad pax uid"))? as u64;
            } else if key == "gid" {
                gid = number().ok_or_else(|| bad("bad pax gid"))? as u64;
            } else if key == "mtime" {
                meta.mtime = number().ok_or_else(|| bad("bad pax mtime"))?;
            }
        }
    }
    meta.uid = u32::try_from(uid).map_err(|_| bad("uid out of range"))?;
    meta.gid = u32::try_from(gid).map_err(|_| bad("gid out of range"))?;
    Ok(Some(Node { kind, meta }))
}

/// Split an entry name into normal components. `./` is dropped; a leading `/`
/// is dropped when `allow_absolute` (layers) and refused otherwise; `..` is refused.
pub(crate) fn entry_components(name: &Path, allow_absolute: bool) -> Result<Vec<OsString>, EntryError> {
    let mut out = Vec::new();
    for comp in name.components() {
        match comp {
            Component::Normal(c) => out.push(c.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                if !allow_absolute {
                    return Err(EntryError::AbsoluteName);
                }
            }
            Component::ParentDir => return Err(EntryError::DotDot),
        }
    }
    Ok(out)
}

/// Remove whatever is at `path` (a directory with its whole tree), never following it.
pub(crate) fn remove_any(path: &Path) -> Result<(), EntryError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(EntryError::Inspect { path: path.to_path_buf(), source }),
    };
    let result = if meta.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    result.map_err(|source| EntryError::Remove { path: path.to_path_buf(), source })
}

fn lstat_opt(path: &Path) -> Result<Option<fs::Metadata>, EntryError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EntryError::Inspect { path: path.to_path_buf(), source }),
    }
}

/// Writes tar entries under one root. Every path it touches is the root joined
/// with normal components it resolved itself, so nothing lands outside.
pub(crate) struct TreeWriter {
    root: PathBuf,
    policy: ParentPolicy,
    /// Resolved paths (relative to root) that this stream created or rewrote:
    /// whiteouts and opaque markers only hide what earlier layers made.
    created: HashSet<PathBuf>,
    /// Directory mtimes, set last because adding children changes them.
    dir_mtimes: Vec<(PathBuf, i64)>,
}

impl TreeWriter {
    pub(crate) fn new(root: &Path, policy: ParentPolicy) -> Self {
        Self { root: root.to_path_buf(), policy, created: HashSet::new(), dir_mtimes: Vec::new() }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Resolve parent components to a real directory under the root (relative
    /// path). Missing directories are made (mode 0755) when `create`; otherwise
    /// a missing one gives `None`.
    pub(crate) fn resolve_parent(&mut self, comps: &[OsString], create: bool) -> Result<Option<PathBuf>, EntryError> {
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut cur = PathBuf::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            if comp == ".." {
                cur.pop();
                continue;
            }
            if comp == "." || comp.is_empty() {
                continue;
            }
            let rel = cur.join(&comp);
            let full = self.root.join(&rel);
            match lstat_opt(&full)? {
                Some(m) if m.is_dir() => cur = rel,
                Some(m) if m.file_type().is_symlink() => {
                    if self.policy == ParentPolicy::Reject {
                        return Err(EntryError::SymlinkParent(full));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(EntryError::SymlinkLoop(self.root.clone()));
                    }
                    let target =
                        fs::read_link(&full).map_err(|source| EntryError::ReadLink { path: full.clone(), source })?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::Normal(n) => pending.push(n.to_os_string()),
                            Component::ParentDir => pending.push(OsString::from("..")),
                            _ => {}
                        }
                    }
                }
                Some(_) => return Err(EntryError::NotADirectory(full)),
                None if create => {
                    fs::create_dir(&full).map_err(|source| EntryError::CreateDir { path: full.clone(), source })?;
                    self.created.insert(rel.clone());
                    cur = rel;
                }
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Create `parent/name` as `node` describes, replacing whatever was there
    /// unless both are directories (then the directory stays and takes the new
    /// metadata). The last component is never followed.
    pub(crate) fn write_node(
        &mut self,
        parent: &Path,
        name: &OsStr,
        node: &Node,
        data: &mut dyn Read,
    ) -> Result<(), EntryError> {
        let rel = parent.join(name);
        let full = self.root.join(&rel);
        let existing = lstat_opt(&full)?;
        match &node.kind {
            NodeKind::Dir => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    if existing.is_some() {
                        remove_any(&full)?;
                    }
                    fs::create_dir(&full).map_err(|source| EntryError::CreateDir { path: full.clone(), source })?;
                }
            }
            NodeKind::HardLink(target) => {
                let target_full = self.resolve_link_target(target)?;
                let target_meta = lstat_opt(&target_full)?
                    .filter(|m| !m.is_dir())
                    .ok_or_else(|| EntryError::LinkTargetMissing(target.clone()))?;
                let same =
                    existing.as_ref().is_some_and(|m| m.dev() == target_meta.dev() && m.ino() == target_meta.ino());
                if !same {
                    if existing.is_some() {
                        remove_any(&full)?;
                    }
                    fs::hard_link(&target_full, &full).map_err(|source| EntryError::HardLink {
                        path: full.clone(),
                        target: target_full.clone(),
                        source,
                    })?;
                }
                self.created.insert(rel);
                // A hard link shares its target's inode and metadata.
                return Ok(());
            }
            other => {
                if existing.is_some() {
                    remove_any(&full)?;
                }
                self.create_leaf(&full, other, &node.meta, data)?;
            }
        }
        self.created.insert(rel.clone());
        self.apply_meta(&full, &rel, &node.kind, &node.meta)
    }

    fn create_leaf(
        &self,
        full: &Path,
        kind: &NodeKind,
        meta: &NodeMeta,
        data: &mut dyn Read,
    ) -> Result<(), EntryError> {
        let mknod = |sflag: SFlag, dev: u64| {
            nix::sys::stat::mknod(full, sflag, Mode::from_bits_truncate(meta.mode), dev)
                .map_err(|source| EntryError::Mknod { path: full.to_path_buf(), source })
        };
        match kind {
            NodeKind::File => {
                let write_err = |source| EntryError::WriteFile { path: full.to_path_buf(), source };
                let mut file =
                    OpenOptions::new().write(true).create_new(true).mode(0o600).open(full).map_err(write_err)?;
                io::copy(data, &mut file).map_err(write_err)?;
                Ok(())
            }
            NodeKind::Symlink(target) => std::os::unix::fs::symlink(target, full)
                .map_err(|source| EntryError::Symlink { path: full.to_path_buf(), source }),
            NodeKind::Char(major, minor) => {
                mknod(SFlag::S_IFCHR, nix::sys::stat::makedev(u64::from(*major), u64::from(*minor)))
            }
            NodeKind::Block(major, minor) => {
                mknod(SFlag::S_IFBLK, nix::sys::stat::makedev(u64::from(*major), u64::from(*minor)))
            }
            NodeKind::Fifo => mknod(SFlag::S_IFIFO, 0),
            NodeKind::Dir | NodeKind::HardLink(_) => {
                unreachable!("directories and hard links are not leaves")
            }
        }
    }

    /// Ownership first (chown clears setuid bits), then mode, xattrs, mtime.
    fn apply_meta(&mut self, full: &Path, rel: &Path, kind: &NodeKind, meta: &NodeMeta) -> Result<(), EntryError> {
        std::os::unix::fs::lchown(full, Some(meta.uid), Some(meta.gid))
            .map_err(|source| EntryError::Chown { path: full.to_path_buf(), source })?;
        let is_symlink = matches!(kind, NodeKind::Symlink(_));
        if !is_symlink {
            fs::set_permissions(full, fs::Permissions::from_mode(meta.mode & 0o7777))
                .map_err(|source| EntryError::Chmod { path: full.to_path_buf(), source })?;
        }
        for (name, value) in &meta.xattrs {
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                tracing::debug!(path = %full.display(), xattr = %name, "ignoring overlay xattr in entry");
                continue;
            }
            if let Err(e) = crate::image::upper_diff::set_xattr(full, name, value) {
                tracing::debug!(path = %full.display(), xattr = %name, error = %e, "xattr not applied");
            }
        }
        if matches!(kind, NodeKind::Dir) {
            self.dir_mtimes.push((rel.to_path_buf(), meta.mtime));
            Ok(())
        } else {
            set_mtime(full, meta.mtime)
        }
    }

    /// Take a `./` entry's metadata for the root itself.
    pub(crate) fn set_root_meta(&mut self, meta: &NodeMeta) -> Result<(), EntryError> {
        let root = self.root.clone();
        self.apply_meta(&root, Path::new(""), &NodeKind::Dir, meta)
    }

    fn resolve_link_target(&mut self, target: &Path) -> Result<PathBuf, EntryError> {
        let mut comps = entry_components(target, true)?;
        let last = comps.pop().ok_or(EntryError::EmptyName)?;
        let parent =
            self.resolve_parent(&comps, false)?.ok_or_else(|| EntryError::LinkTargetMissing(target.to_path_buf()))?;
        Ok(self.root.join(parent).join(last))
    }

    /// `.wh.NAME`: remove `parent/NAME` left by earlier layers.
    pub(crate) fn whiteout(&mut self, parent: &Path, name: &OsStr) -> Result<(), EntryError> {
        if name.is_empty() || name == "." || name == ".." {
            return Err(EntryError::DotDot);
        }
        let rel = parent.join(name);
        if self.created.contains(&rel) {
            // The spec: a whiteout only hides what lower layers made.
            return Ok(());
        }
        remove_any(&self.root.join(rel))
    }

    /// `.wh..wh..opq`: remove every child of `dir` that earlier layers made,
    /// keeping what this layer made, whichever order the entries came in.
    pub(crate) fn make_opaque(&mut self, dir: &Path) -> Result<(), EntryError> {
        let full = self.root.join(dir);
        let read_err = |source| EntryError::Inspect { path: full.clone(), source };
        for child in fs::read_dir(&full).map_err(read_err)? {
            let child = child.map_err(read_err)?;
            let rel = dir.join(child.file_name());
            if !self.created.contains(&rel) {
                remove_any(&child.path())?;
            } else if child.file_type().map_err(read_err)?.is_dir() {
                self.make_opaque(&rel)?;
            }
        }
        Ok(())
    }

    /// Set the directory mtimes held back while their children were written.
    pub(crate) fn finish(self) -> Result<(), EntryError> {
        for (rel, mtime) in self.dir_mtimes.iter().rev() {
            let full = self.root.join(rel);
            // A later entry may have replaced the directory with something else.
            if lstat_opt(&full)?.is_some_and(|m| m.is_dir()) {
                set_mtime(&full, *mtime)?;
            }
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, mtime: i64) -> Result<(), EntryError> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .map_err(|source| EntryError::SetTime { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_decompression_bomb_is_stopped() {
        use std::io::Write;
        // 300 MiB of zeros in a tar entry compress to a few hundred KiB.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(300 << 20);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        tar.append_data(&mut h, "zeros", std::io::repeat(0).take(300 << 20)).unwrap();
        let plain = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let packed = gz.finish().unwrap();
        assert!(packed.len() < 4 << 20);
        let dir = tempfile::tempdir().unwrap();
        let limit = super::expansion_limit(packed.len() as u64);
        let err =
            super::apply_layer_bounded(&packed[..], "application/vnd.oci.image.layer.v1.tar+gzip", dir.path(), limit)
                .unwrap_err();
        assert!(crate::supervisor::describe(&err).contains("decompression bomb"), "{err}");
    }

    use super::*;
    use std::os::unix::fs::FileTypeExt;

    /// Builds a layer tar in memory.
    struct LayerBuilder {
        builder: tar::Builder<Vec<u8>>,
    }

    impl LayerBuilder {
        fn new() -> Self {
            Self { builder: tar::Builder::new(Vec::new()) }
        }
        fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_600_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h
        }
        fn file(mut self, name: &str, body: &[u8]) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, 0o644, body.len() as u64);
            self.builder.append_data(&mut h, name, body).unwrap();
            self
        }
        fn file_owned(mut self, name: &str, body: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, mode, body.len() as u64);
            h.set_uid(uid);
            h.set_gid(gid);
            self.builder.append_data(&mut h, name, body).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
            self.builder.append_data(&mut h, name, io::empty()).unwrap();
            self
        }
        fn symlink(mut self, name: &str, target: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
            self.builder.append_link(&mut h, name, target).unwrap();
            self
        }
        fn hardlink(mut self, name: &str, target: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
            self.builder.append_link(&mut h, name, target).unwrap();
            self
        }
        fn tar(self) -> Vec<u8> {
            self.builder.into_inner().unwrap()
        }
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

    fn apply(dest: &Path, layer: Vec<u8>) {
        apply_layer(&layer[..], TAR, dest).unwrap();
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn whiteout_removes_file_from_earlier_layer() {
        let dest = tempfile::tempdir().unwrap();
        apply(dest.path(), LayerBuilder::new().dir("etc").file("etc/a", b"a").file("etc/b", b"b").tar());
        apply(dest.path(), LayerBuilder::new().file("etc/.wh.a", b"").tar());
        assert!(!dest.path().join("etc/a").exists());
        assert!(!dest.path().join("etc/.wh.a").exists());
        assert_eq!(read(&dest.path().join("etc/b")), "b");
    }

    #[test]
    fn whiteout_removes_directory_tree() {
        let dest = tempfile::tempdir().unwrap();
        apply(
            dest.path(),
            LayerBuilder::new()
                .dir("opt")
                .dir("opt/app")
                .dir("opt/app/lib")
                .file("opt/app/lib/x.so", b"x")
                .file("opt/keep", b"k")
                .tar(),
        );
        apply(dest.path(), LayerBuilder::new().file("opt/.wh.app", b"").tar());
        assert!(!dest.path().join("opt/app").exists());
        assert_eq!(read(&dest.path().join("opt/keep")), "k");
    }

    #[test]
    fn opaque_dir_keeps_only_same_layer_children_in_any_order() {
        for marker_first in [true, false] {
            let dest = tempfile::tempdir().unwrap();
            apply(
                dest.path(),
                LayerBuilder::new().dir("d").file("d/old", b"old").dir("d/sub").file("d/sub/old", b"old").tar(),
            );
            let mut layer = LayerBuilder::new().dir("d");
            if marker_first {
                layer = layer.file("d/.wh..wh..opq", b"");
            }
            layer = layer.file("d/new", b"new").dir("d/sub").file("d/sub/new", b"n");
            if !marker_first {
                layer = layer.file("d/.wh..wh..opq", b"");
            }
            apply(dest.path(), layer.tar());
            let d = dest.path().join("d");
            assert!(!d.join("old").exists(), "marker_first={marker_first}");
            assert!(!d.join("sub/old").exists(), "marker_first={marker_first}");
            assert!(!d.join(OPAQUE_MARKER).exists());
            assert_eq!(read(&d.join("new")), "new");
            assert_eq!(read(&d.join("sub/new")), "n");
        }
    }

    #[test]
    fn hard_link_shares_inode() {
        let dest = tempfile::tempdir().unwrap();
        apply(
            dest.path(),
            LayerBuilder::new()
                .dir("bin")
                .file("bin/busybox", b"bb")
                .hardlink("bin/sh", "bin/busybox")
                .hardlink("bin/ls", "/bin/busybox")
                .tar(),
        );
        let a = fs::metadata(dest.path().join("bin/busybox")).unwrap();
        let b = fs::metadata(dest.path().join("bin/sh")).unwrap();
        let c = fs::metadata(dest.path().join("bin/ls")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.ino(), c.ino());
        assert_eq!(a.nlink(), 3);
    }

    #[test]
    fn hard_link_outside_root_is_refused() {
        let dest = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = LayerBuilder::header(tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "passwd", "etc/passwd").unwrap();
        // Craft a `..` link target by hand: the builder refuses to write one.
        let mut h = LayerBuilder::header(tar::EntryType::Link, 0o644, 0);
        h.set_path("shadow").unwrap();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.linkname[..13].copy_from_slice(b"../etc/passwd");
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let layer = b.into_inner().unwrap();
        assert!(apply_layer(&layer[..], TAR, dest.path()).is_err());
        assert!(!dest.path().join("shadow").exists());
    }

    #[test]
    fn symlink_kept_and_never_written_through_outside() {
        let outside = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let outside_abs = outside.path().to_str().unwrap().to_string();
        apply(
            dest.path(),
            LayerBuilder::new()
                .symlink("link", "/")
                .symlink("out", &outside_abs)
                .symlink("up", "../../../../..")
                .file("link/etc/x", b"x")
                .file("out/y", b"y")
                .file("up/z", b"z")
                .tar(),
        );
        let link = fs::symlink_metadata(dest.path().join("link")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(fs::read_link(dest.path().join("link")).unwrap(), Path::new("/"));
        // Written inside, as if dest were `/`.
        assert_eq!(read(&dest.path().join("etc/x")), "x");
        assert!(!Path::new("/etc/x").exists());
        assert!(!outside.path().join("y").exists());
        assert_eq!(read(&dest.path().join(outside.path().strip_prefix("/").unwrap()).join("y")), "y");
        assert_eq!(read(&dest.path().join("z")), "z");
    }

    #[test]
    fn entry_replacing_symlink_does_not_follow_it() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"safe").unwrap();
        let dest = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        apply(dest.path(), LayerBuilder::new().symlink("f", victim.to_str().unwrap()).file("f", b"overwritten").tar());
        assert_eq!(read(&victim), "safe");
        assert_eq!(read(&dest.path().join("f")), "overwritten");
    }

    #[test]
    fn absolute_names_are_rooted_and_dotdot_refused() {
        let dest = tempfile::tempdir().unwrap();
        apply(dest.path(), LayerBuilder::new().file("./a", b"a").tar());
        assert_eq!(read(&dest.path().join("a")), "a");

        let mut b = tar::Builder::new(Vec::new());
        let mut h = LayerBuilder::header(tar::EntryType::Regular, 0o644, 1);
        h.as_gnu_mut().unwrap().name[..6].copy_from_slice(b"../esc");
        h.set_cksum();
        b.append(&h, &b"e"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let err = apply_layer(&layer[..], TAR, dest.path()).unwrap_err();
        assert!(matches!(err, LayoutError::ApplyEntry { source: EntryError::DotDot, .. }));
        assert!(!dest.path().parent().unwrap().join("esc").exists());
    }

    #[test]
    fn mode_setuid_and_ownership_preserved() {
        let dest = tempfile::tempdir().unwrap();
        apply(dest.path(), LayerBuilder::new().file_owned("su", b"#!", 0o4755, 1000, 1000).tar());
        let m = fs::metadata(dest.path().join("su")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        assert_eq!(m.mtime(), 1_600_000_000);
    }

    #[test]
    fn directory_kept_but_takes_new_mode_and_file_replaces_tree() {
        let dest = tempfile::tempdir().unwrap();
        apply(dest.path(), LayerBuilder::new().dir("d").file("d/x", b"x").dir("t").file("t/y", b"y").tar());
        let mut b = LayerBuilder::new();
        let mut h = LayerBuilder::header(tar::EntryType::Directory, 0o1777, 0);
        b.builder.append_data(&mut h, "d", io::empty()).unwrap();
        let layer = b.file("t", b"now a file").tar();
        apply(dest.path(), layer);
        let d = fs::metadata(dest.path().join("d")).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o1777);
        assert_eq!(d.mtime(), 1_600_000_000);
        assert_eq!(read(&dest.path().join("d/x")), "x");
        assert_eq!(read(&dest.path().join("t")), "now a file");
    }

    #[test]
    fn device_nodes_and_fifos_created() {
        let dest = tempfile::tempdir().unwrap();
        let mut b = LayerBuilder::new();
        let mut h = LayerBuilder::header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.builder.append_data(&mut h, "null", io::empty()).unwrap();
        let mut h = LayerBuilder::header(tar::EntryType::Fifo, 0o600, 0);
        b.builder.append_data(&mut h, "pipe", io::empty()).unwrap();
        apply(dest.path(), b.tar());
        let null = fs::symlink_metadata(dest.path().join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
        assert!(fs::symlink_metadata(dest.path().join("pipe")).unwrap().file_type().is_fifo());
    }

    #[test]
    fn gzip_and_zstd_layers() {
        let dest = tempfile::tempdir().unwrap();
        let plain = LayerBuilder::new().file("gz", b"g").tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        apply_layer(&gz[..], "application/vnd.docker.image.rootfs.diff.tar.gzip", dest.path()).unwrap();
        let plain = LayerBuilder::new().file("zst", b"z").tar();
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        apply_layer(&zst[..], "application/vnd.oci.image.layer.v1.tar+zstd", dest.path()).unwrap();
        assert_eq!(read(&dest.path().join("gz")), "g");
        assert_eq!(read(&dest.path().join("zst")), "z");
        assert!(matches!(
            apply_layer(&plain[..], "application/x-unknown", dest.path()),
            Err(LayoutError::UnsupportedMediaType { .. })
        ));
    }

    // --- layouts -----------------------------------------------------------

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn put_blob(layout: &OciLayout, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        layout.add_blob(&digest, bytes, u64::MAX).unwrap();
        digest
    }

    /// Writes config, layers and manifest; returns (manifest digest, size).
    fn put_image(layout: &OciLayout, layers: &[(Vec<u8>, &str)], marker: &str) -> (String, u64) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["M={marker}"]}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let config_digest = put_blob(layout, config.as_bytes());
        let layer_json: Vec<String> = layers
            .iter()
            .map(|(bytes, media_type)| {
                let d = put_blob(layout, bytes);
                format!(r#"{{"mediaType":"{media_type}","digest":"{d}","size":{}}}"#, bytes.len())
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layer_json.join(",")
        );
        (put_blob(layout, manifest.as_bytes()), manifest.len() as u64)
    }

    /// (digest, size, media type, optional (os, architecture)) of one index entry.
    type IndexEntry<'a> = (String, u64, &'a str, Option<(&'a str, &'a str)>);

    fn write_index(layout: &OciLayout, entries: &[IndexEntry<'_>]) {
        let items: Vec<String> = entries
            .iter()
            .map(|(d, size, media_type, platform)| {
                let p = platform
                    .map(|(os, arch)| format!(r#","platform":{{"os":"{os}","architecture":"{arch}"}}"#))
                    .unwrap_or_default();
                format!(r#"{{"mediaType":"{media_type}","digest":"{d}","size":{size}{p}}}"#)
            })
            .collect();
        fs::write(
            layout.root().join("index.json"),
            format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, items.join(",")),
        )
        .unwrap();
    }

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    #[test]
    fn resolve_single_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        assert!(matches!(layout.resolve(), Err(LayoutError::EmptyIndex { .. })));
        let layer = LayerBuilder::new().file("hello", b"hi").tar();
        let (digest, size) = put_image(&layout, &[(layer, TAR)], "one");
        layout.set_index(&digest, size).unwrap();
        let layout = OciLayout::open(dir.path()).unwrap();
        let img = layout.resolve().unwrap();
        assert_eq!(img.manifest_digest, digest);
        assert_eq!(img.manifest.layers().len(), 1);
        let env = img.config.config().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env, vec!["M=one".to_string()]);
        let blobs = layout.image_blobs(&img);
        assert_eq!(blobs.len(), 3);
        assert_eq!(blobs[0], (digest, size));
        let names: Vec<String> = blobs.iter().map(|b| b.0.clone()).collect();
        assert!(layout.missing_blobs(&names).is_empty());
        let absent = format!("sha256:{}", "0".repeat(64));
        assert_eq!(layout.missing_blobs(std::slice::from_ref(&absent)), vec![absent]);
    }

    #[test]
    fn resolve_prefers_linux_amd64_and_follows_nested_index() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let arm = put_image(&layout, &[], "arm64");
        let amd = put_image(&layout, &[], "amd64");
        write_index(
            &layout,
            &[
                (arm.0.clone(), arm.1, MANIFEST, Some(("linux", "arm64"))),
                (amd.0.clone(), amd.1, MANIFEST, Some(("linux", "amd64"))),
            ],
        );
        assert_eq!(layout.resolve().unwrap().manifest_digest, amd.0);

        // The same, one level down in a nested index.
        let nested = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"arm64"}}}},{{"mediaType":"{MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            arm.0, arm.1, amd.0, amd.1
        );
        let nested_digest = put_blob(&layout, nested.as_bytes());
        write_index(&layout, &[(nested_digest, nested.len() as u64, "application/vnd.oci.image.index.v1+json", None)]);
        let img = layout.resolve().unwrap();
        assert_eq!(img.manifest_digest, amd.0);

        // No match for this host.
        write_index(
            &layout,
            &[
                (arm.0.clone(), arm.1, MANIFEST, Some(("linux", "arm64"))),
                (arm.0.clone(), arm.1, MANIFEST, Some(("windows", "amd64"))),
            ],
        );
        assert!(matches!(layout.resolve(), Err(LayoutError::NoPlatformMatch { .. })));
    }

    #[test]
    fn open_refuses_a_directory_that_is_not_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(OciLayout::open(dir.path()), Err(LayoutError::NotALayout { missing: "oci-layout", .. })));
    }

    #[test]
    fn blob_path_rejects_traversal_and_bad_hex() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        for bad in [
            "sha256:../../x",
            "sha256:zz",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
            "",
        ] {
            assert!(matches!(layout.blob_path(bad), Err(LayoutError::InvalidDigest { .. })), "{bad}");
            assert!(!layout.has_blob(bad));
        }
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(layout.blob_path(&ok).unwrap(), dir.path().join("blobs/sha256").join("a".repeat(64)));
    }

    #[test]
    fn add_blob_checks_digest_and_size_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let wrong = digest_of(b"something else");
        let err = layout.add_blob(&wrong, &b"payload"[..], 1024).unwrap_err();
        assert!(matches!(err, LayoutError::DigestMismatch { .. }));
        let right = digest_of(b"payload");
        let err = layout.add_blob(&right, &b"payload"[..], 3).unwrap_err();
        assert!(matches!(err, LayoutError::BlobTooLarge { .. }));
        let entries: Vec<_> = fs::read_dir(dir.path().join("blobs/sha256")).unwrap().collect();
        assert!(entries.is_empty(), "left behind: {entries:?}");
        assert!(!layout.has_blob(&wrong));
        assert_eq!(layout.add_blob(&right, &b"payload"[..], 1024).unwrap(), 7);
        assert!(layout.has_blob(&right));
    }

    #[test]
    fn unpack_image_applies_layers_in_order_and_reuses_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let base = LayerBuilder::new().dir("etc").file("etc/os", b"base").file("etc/gone", b"x").tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&LayerBuilder::new().file("etc/os", b"top").file("etc/.wh.gone", b"").tar()).unwrap();
        let top = gz.finish().unwrap();
        let (digest, size) =
            put_image(&layout, &[(base, TAR), (top, "application/vnd.oci.image.layer.v1.tar+gzip")], "x");
        layout.set_index(&digest, size).unwrap();
        let img = layout.resolve().unwrap();
        let rootfs = unpack_image(&layout, &img, cache.path()).unwrap();
        assert_eq!(rootfs, cache.path().join(&digest[7..]).join("rootfs"));
        assert_eq!(read(&rootfs.join("etc/os")), "top");
        assert!(!rootfs.join("etc/gone").exists());
        // Only the finished tree is left in the cache dir.
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 1);

        // A second call must not unpack again: a file we add survives.
        fs::write(rootfs.join("sentinel"), b"s").unwrap();
        let again = unpack_image(&layout, &img, cache.path()).unwrap();
        assert_eq!(again, rootfs);
        assert!(rootfs.join("sentinel").exists());
    }

    #[test]
    fn unpack_image_detects_corrupt_layer_and_leaves_no_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let layer = LayerBuilder::new().file("a", b"a").tar();
        let (digest, size) = put_image(&layout, &[(layer.clone(), TAR)], "x");
        layout.set_index(&digest, size).unwrap();
        let img = layout.resolve().unwrap();
        // Corrupt the stored layer after the fact (append garbage after the tar end).
        let path = layout.blob_path(&digest_of(&layer)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"garbage").unwrap();
        drop(f);
        let err = unpack_image(&layout, &img, cache.path()).unwrap_err();
        assert!(matches!(err, LayoutError::UnpackLayer { .. }), "{err:?}");
        assert_eq!(fs::read_dir(cache.path()).unwrap().count(), 0);
    }
}
