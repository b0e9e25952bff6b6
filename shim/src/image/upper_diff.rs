//! The nested container's writable layer (its overlayfs upper dir) travels to
//! the destination as a tar stream next to the CRIU checkpoint, so the restored
//! rootfs sees the same files, deletions and opaque directories.
//!
//! Overlayfs marks a deletion with a 0/0 character device and an opaque
//! directory with the `trusted.overlay.opaque` xattr; on the wire these become
//! OCI layer whiteouts (`.wh.NAME`, `DIR/.wh..wh..opq`), so the stream is also
//! a valid image layer. Unpacking turns them back into overlay's own markers.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::image::oci_layout::{
    entry_components, read_node, EntryError, Node, NodeKind, NodeMeta, ParentPolicy, TreeWriter, OPAQUE_MARKER,
    WHITEOUT_PREFIX,
};

/// Overlay's opaque-directory xattr in the trusted namespace (set by unpack).
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The same marker when the upper was mounted with `userxattr`.
const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Marks a regular file as a whiteout in a directory whose opaque xattr is `x`
/// (overlayfs "xwhiteouts", Linux 6.7+).
const XWHITEOUT_XATTRS: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];
/// Overlay features whose xattrs refer to the lower dir and cannot be carried.
const REDIRECT_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];
const METACOPY_XATTRS: [&str; 2] = ["trusted.overlay.metacopy", "user.overlay.metacopy"];
/// File capabilities are the one xattr a workload commonly relies on.
const CARRIED_XATTRS: [&str; 1] = ["security.capability"];

/// What one pack or unpack moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Tar entries, whiteouts and opaque markers included.
    pub entries: u64,
    /// Bytes of the tar stream.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("list upper directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read xattr {name} of {path}")]
    ReadXattr {
        path: PathBuf,
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} uses overlay {feature}, which refers to the lower dir and cannot be carried")]
    UnsupportedOverlayFeature { path: PathBuf, feature: &'static str },
    #[error("read symlink {path}")]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open {path}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write tar entry for {path}")]
    WriteEntry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("finish tar stream of {path}")]
    Finish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create upper directory {path}")]
    CreateUpper {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("diff stream is larger than the limit of {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },
    #[error("read diff stream into {upper}")]
    ReadTar {
        upper: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unpack diff entry {name:?} into {upper}")]
    UnpackEntry {
        name: PathBuf,
        upper: PathBuf,
        #[source]
        source: EntryError,
    },
    #[error("mark {path} opaque")]
    SetOpaque {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Write the upper dir `upper` as a tar stream: files, directories, symlinks,
/// hard links (by inode), device nodes and fifos with modes, ownership and
/// mtimes; a 0/0 character device becomes `.wh.NAME`, an opaque directory gets
/// an extra `DIR/.wh..wh..opq`. The upper dir must not change meanwhile (the
/// workload is frozen).
pub fn pack(upper: &Path, writer: impl Write) -> Result<DiffStats, DiffError> {
    let mut counting = CountingWriter { inner: writer, count: 0 };
    let entries = {
        let mut packer = Packer { builder: tar::Builder::new(&mut counting), upper, links: HashMap::new(), entries: 0 };
        let root_xwhiteouts = packer.opaque_marker(upper, Path::new(""))?;
        packer.walk(Path::new(""), root_xwhiteouts)?;
        packer.builder.finish().map_err(|source| DiffError::Finish { path: upper.to_path_buf(), source })?;
        packer.entries
    };
    let stats = DiffStats { entries, bytes: counting.count };
    tracing::debug!(upper = %upper.display(), entries = stats.entries, bytes = stats.bytes, "packed writable layer");
    Ok(stats)
}

struct Packer<'a, W: Write> {
    builder: tar::Builder<W>,
    upper: &'a Path,
    /// (dev, inode) of files with several links -> the name first written.
    links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
}

impl<W: Write> Packer<'_, W> {
    /// Emit the children of `dir` (relative), parents before children, sorted
    /// by name so the same tree always gives the same stream.
    fn walk(&mut self, dir: &Path, xwhiteouts: bool) -> Result<(), DiffError> {
        let full_dir = self.upper.join(dir);
        let read_err = |source| DiffError::ReadDir { path: full_dir.clone(), source };
        let mut names = Vec::new();
        for child in fs::read_dir(&full_dir).map_err(read_err)? {
            names.push(child.map_err(read_err)?.file_name());
        }
        names.sort();
        for name in names {
            let rel = dir.join(&name);
            let full = self.upper.join(&rel);
            let meta =
                fs::symlink_metadata(&full).map_err(|source| DiffError::Inspect { path: full.clone(), source })?;
            let ft = meta.file_type();
            let mut header = header_from(&meta);
            if ft.is_char_device() && meta.rdev() == 0 {
                self.whiteout(dir, &name, &meta)?;
            } else if ft.is_dir() {
                reject_xattrs(&full, &REDIRECT_XATTRS, "redirect_dir")?;
                header.set_entry_type(tar::EntryType::Directory);
                self.append(&mut header, &rel, io::empty())?;
                let child_xwhiteouts = self.opaque_marker(&full, &rel)?;
                self.walk(&rel, child_xwhiteouts)?;
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&full).map_err(|source| DiffError::ReadLink { path: full.clone(), source })?;
                header.set_entry_type(tar::EntryType::Symlink);
                self.append_link(&mut header, &rel, &target)?;
            } else if ft.is_file() {
                if xwhiteouts && has_any_xattr(&full, &XWHITEOUT_XATTRS)? {
                    self.whiteout(dir, &name, &meta)?;
                    continue;
                }
                reject_xattrs(&full, &METACOPY_XATTRS, "metacopy")?;
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&(meta.dev(), meta.ino())).cloned() {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        self.append_link(&mut header, &rel, &first)?;
                        continue;
                    }
                    self.links.insert((meta.dev(), meta.ino()), rel.clone());
                }
                self.carry_xattrs(&full)?;
                let file =
                    fs::File::open(&full).map_err(|source| DiffError::OpenFile { path: full.clone(), source })?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(meta.len());
                self.append(&mut header, &rel, file.take(meta.len()))?;
            } else if ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_char_device() { tar::EntryType::Char } else { tar::EntryType::Block };
                header.set_entry_type(kind);
                let major = nix::sys::stat::major(meta.rdev());
                let minor = nix::sys::stat::minor(meta.rdev());
                let dev_err = |source| DiffError::WriteEntry { path: full.clone(), source };
                header.set_device_major(major as u32).map_err(dev_err)?;
                header.set_device_minor(minor as u32).map_err(dev_err)?;
                self.append(&mut header, &rel, io::empty())?;
            } else if ft.is_fifo() {
                header.set_entry_type(tar::EntryType::Fifo);
                self.append(&mut header, &rel, io::empty())?;
            } else {
                // Sockets: nothing to carry, their owner recreates them on restore.
                tracing::debug!(path = %full.display(), "a socket in the writable layer is not carried");
            }
        }
        Ok(())
    }

    /// If `full` (the directory `rel`) is opaque, emit its opaque marker.
    /// Returns whether its children may be xwhiteouts (opaque value `x`).
    fn opaque_marker(&mut self, full: &Path, rel: &Path) -> Result<bool, DiffError> {
        let mut value = None;
        for name in [OPAQUE_XATTR, USER_OPAQUE_XATTR] {
            value = get_xattr(full, name).map_err(|source| DiffError::ReadXattr {
                path: full.to_path_buf(),
                name,
                source,
            })?;
            if value.is_some() {
                break;
            }
        }
        match value.as_deref() {
            Some(b"y") => {
                let mut header = marker_header(0);
                self.append(&mut header, &rel.join(OPAQUE_MARKER), io::empty())?;
                Ok(false)
            }
            Some(b"x") => Ok(true),
            _ => Ok(false),
        }
    }

    fn whiteout(&mut self, dir: &Path, name: &OsStr, meta: &fs::Metadata) -> Result<(), DiffError> {
        let mut wh_name = WHITEOUT_PREFIX.as_bytes().to_vec();
        wh_name.extend_from_slice(name.as_bytes());
        let mut header = marker_header(meta.mtime());
        self.append(&mut header, &dir.join(OsStr::from_bytes(&wh_name)), io::empty())
    }

    /// Put the carried xattrs of `full` in a PAX header for the next entry.
    fn carry_xattrs(&mut self, full: &Path) -> Result<(), DiffError> {
        let mut records = Vec::new();
        for name in CARRIED_XATTRS {
            let value = get_xattr(full, name).map_err(|source| DiffError::ReadXattr {
                path: full.to_path_buf(),
                name,
                source,
            })?;
            if let Some(value) = value {
                records.push((format!("SCHILY.xattr.{name}"), value));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|source| DiffError::WriteEntry { path: full.to_path_buf(), source })
    }

    fn append(&mut self, header: &mut tar::Header, rel: &Path, data: impl Read) -> Result<(), DiffError> {
        self.builder
            .append_data(header, rel, data)
            .map_err(|source| DiffError::WriteEntry { path: self.upper.join(rel), source })?;
        self.entries += 1;
        Ok(())
    }

    fn append_link(&mut self, header: &mut tar::Header, rel: &Path, target: &Path) -> Result<(), DiffError> {
        self.builder
            .append_link(header, rel, target)
            .map_err(|source| DiffError::WriteEntry { path: self.upper.join(rel), source })?;
        self.entries += 1;
        Ok(())
    }
}

/// An empty file entry owned by root: a whiteout or an opaque marker.
fn marker_header(mtime: i64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime.max(0) as u64);
    header.set_size(0);
    header
}

fn header_from(meta: &fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_size(0);
    header
}

fn has_any_xattr(path: &Path, names: &[&'static str]) -> Result<bool, DiffError> {
    for &name in names {
        let value =
            get_xattr(path, name).map_err(|source| DiffError::ReadXattr { path: path.to_path_buf(), name, source })?;
        if value.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn reject_xattrs(path: &Path, names: &[&'static str], feature: &'static str) -> Result<(), DiffError> {
    if has_any_xattr(path, names)? {
        return Err(DiffError::UnsupportedOverlayFeature { path: path.to_path_buf(), feature });
    }
    Ok(())
}

/// Read a stream made by [`pack`] into `upper` (created if missing; an existing
/// tree is overwritten entry by entry). `.wh.NAME` becomes a 0/0 character
/// device and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory.
/// Names are checked (no absolute paths, no `..`), no symlink is ever followed
/// while writing, hard link targets must be inside, and the stream may be at
/// most `max_bytes` long.
pub fn unpack(reader: impl Read, upper: &Path, max_bytes: u64) -> Result<DiffStats, DiffError> {
    fs::create_dir_all(upper).map_err(|source| DiffError::CreateUpper { path: upper.to_path_buf(), source })?;
    let mut limited = LimitedReader { inner: reader, count: 0, max: max_bytes, exceeded: false };
    let result = {
        let mut archive = tar::Archive::new(&mut limited);
        unpack_entries(&mut archive, upper)
    };
    // A read error deep inside an entry may really be the limit cutting the stream.
    if limited.exceeded {
        return Err(DiffError::TooLarge { max_bytes });
    }
    let stats = DiffStats { entries: result?, bytes: limited.count };
    tracing::debug!(upper = %upper.display(), entries = stats.entries, bytes = stats.bytes, "unpacked writable layer");
    Ok(stats)
}

fn unpack_entries<R: Read>(archive: &mut tar::Archive<R>, upper: &Path) -> Result<u64, DiffError> {
    let read_err = |source| DiffError::ReadTar { upper: upper.to_path_buf(), source };
    let mut writer = TreeWriter::new(upper, ParentPolicy::Reject);
    let mut entries = 0;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let name = entry.path().map_err(read_err)?.into_owned();
        let entry_err = |source| DiffError::UnpackEntry { name: name.clone(), upper: upper.to_path_buf(), source };
        let Some(node) = read_node(&mut entry).map_err(entry_err)? else {
            continue;
        };
        entries += 1;
        let mut comps = entry_components(&name, false).map_err(entry_err)?;
        let Some(last) = comps.pop() else {
            return Err(entry_err(EntryError::EmptyName));
        };
        let parent = writer.resolve_parent(&comps, true).map_err(entry_err)?.unwrap_or_default();
        let last_bytes = last.as_bytes();
        if last_bytes == OPAQUE_MARKER.as_bytes() {
            let dir = writer.root().join(&parent);
            set_xattr(&dir, OPAQUE_XATTR, b"y").map_err(|source| DiffError::SetOpaque { path: dir, source })?;
        } else if let Some(hidden) = last_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let whiteout =
                Node { kind: NodeKind::Char(0, 0), meta: NodeMeta { mtime: node.meta.mtime, ..NodeMeta::default() } };
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(entry_err(EntryError::DotDot));
            }
            writer.write_node(&parent, hidden, &whiteout, &mut io::empty()).map_err(entry_err)?;
        } else {
            writer.write_node(&parent, &last, &node, &mut entry).map_err(entry_err)?;
        }
    }
    writer.finish().map_err(|source| DiffError::UnpackEntry {
        name: PathBuf::from("."),
        upper: upper.to_path_buf(),
        source,
    })?;
    Ok(entries)
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts what it reads and fails once more than `max` bytes came through.
struct LimitedReader<R> {
    inner: R,
    count: u64,
    max: u64,
    exceeded: bool,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.max {
            self.exceeded = true;
            return Err(io::Error::other("diff stream over its size limit"));
        }
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Extended attributes through the `xattr` crate, which never follows a
// symlink (l*xattr). `oci_layout` uses `set_xattr` too.

/// Set `name` on `path` itself (never through a symlink).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    xattr::set(path, name, value)
}

/// The value of `name` on `path` itself, `None` if it is not set or the
/// filesystem has no xattrs.
pub(crate) fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    match xattr::get(path, name) {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) || e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::{symlink, PermissionsExt};

    const T: i64 = 1_650_000_000;

    fn set_mtime(path: &Path, secs: i64) {
        let t = nix::sys::time::TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn write_file(path: &Path, body: &[u8], mode: u32) {
        fs::write(path, body).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// An upper dir with every kind of node overlayfs leaves behind.
    fn build_upper(upper: &Path) {
        write_file(&upper.join("a.txt"), b"hello", 0o640);
        std::os::unix::fs::lchown(upper.join("a.txt"), Some(1000), Some(1000)).unwrap();
        write_file(&upper.join("suid"), b"#!/bin/sh\n", 0o4755);
        fs::create_dir_all(upper.join("d/e")).unwrap();
        fs::set_permissions(upper.join("d"), fs::Permissions::from_mode(0o750)).unwrap();
        write_file(&upper.join("d/e/f.txt"), b"nested", 0o600);
        symlink("../outside/target", upper.join("link")).unwrap();
        write_file(&upper.join("h1"), b"shared", 0o644);
        fs::hard_link(upper.join("h1"), upper.join("d/h2")).unwrap();
        mknod(&upper.join("gone"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
        mknod(&upper.join("d/e/gone2"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
        mknod(&upper.join("pipe"), SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0).unwrap();
        mknod(&upper.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3)).unwrap();
        fs::create_dir(upper.join("op")).unwrap();
        set_xattr(&upper.join("op"), OPAQUE_XATTR, b"y").unwrap();
        write_file(&upper.join("op/new"), b"n", 0o644);
        for (i, rel) in ["a.txt", "suid", "d/e/f.txt", "link", "h1", "gone", "pipe", "null", "op/new", "d/e", "d", "op"]
            .iter()
            .enumerate()
        {
            set_mtime(&upper.join(rel), T + i as i64);
        }
    }

    /// Everything about a tree that an overlay mount can see, as comparable rows.
    fn snapshot(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, rows: &mut Vec<String>, inodes: &mut HashMap<u64, String>) {
            let mut names: Vec<_> = fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            for name in names {
                let rel = dir.join(&name);
                let full = root.join(&rel);
                let m = fs::symlink_metadata(&full).unwrap();
                let ft = m.file_type();
                let what = if ft.is_dir() {
                    let opaque = get_xattr(&full, OPAQUE_XATTR).unwrap();
                    format!("dir opaque={opaque:?}")
                } else if ft.is_symlink() {
                    format!("symlink -> {}", fs::read_link(&full).unwrap().display())
                } else if ft.is_file() {
                    let first = inodes.entry(m.ino()).or_insert_with(|| rel.display().to_string());
                    format!("file {:?} link-group={first}", String::from_utf8_lossy(&fs::read(&full).unwrap()))
                } else if ft.is_char_device() {
                    format!("char {}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()))
                } else if ft.is_fifo() {
                    "fifo".to_string()
                } else {
                    "other".to_string()
                };
                let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
                rows.push(format!(
                    "{} {what} mode={mode:o} owner={}:{} mtime={}",
                    rel.display(),
                    m.uid(),
                    m.gid(),
                    m.mtime()
                ));
                if ft.is_dir() {
                    walk(root, &rel, rows, inodes);
                }
            }
        }
        let mut rows = Vec::new();
        walk(root, Path::new(""), &mut rows, &mut HashMap::new());
        rows
    }

    fn entry_names(stream: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(stream);
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect()
    }

    #[test]
    fn pack_then_unpack_reproduces_the_upper_dir() {
        let src = tempfile::tempdir().unwrap();
        build_upper(src.path());
        let mut stream = Vec::new();
        let packed = pack(src.path(), &mut stream).unwrap();
        assert_eq!(packed.bytes, stream.len() as u64);

        let names = entry_names(&stream);
        assert!(names.contains(&".wh.gone".to_string()), "{names:?}");
        assert!(names.contains(&"d/e/.wh.gone2".to_string()), "{names:?}");
        assert!(names.contains(&"op/.wh..wh..opq".to_string()), "{names:?}");

        let dst = tempfile::tempdir().unwrap();
        let unpacked = unpack(&stream[..], dst.path(), 1 << 20).unwrap();
        assert_eq!(unpacked.entries, packed.entries);

        let want = snapshot(src.path());
        let got = snapshot(dst.path());
        assert_eq!(got, want);
        // The rows above cover these too; spelled out for the reader.
        let gone = fs::symlink_metadata(dst.path().join("gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!(get_xattr(&dst.path().join("op"), OPAQUE_XATTR).unwrap(), Some(b"y".to_vec()));
        assert_eq!(
            fs::metadata(dst.path().join("h1")).unwrap().ino(),
            fs::metadata(dst.path().join("d/h2")).unwrap().ino()
        );
        assert_eq!(fs::metadata(dst.path().join("suid")).unwrap().mode() & 0o7777, 0o4755);

        // Unpacking again over the same upper dir gives the same tree.
        unpack(&stream[..], dst.path(), 1 << 20).unwrap();
        assert_eq!(snapshot(dst.path()), want);
    }

    fn test_header() -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(T as u64);
        h.set_mode(0o644);
        h
    }

    /// A one-entry stream whose name is written raw (the tar builder refuses bad names).
    fn raw_entry(name: &str, body: &[u8]) -> Vec<u8> {
        let mut header = test_header();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(body.len() as u64);
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&header, body).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn hostile_streams_write_nothing_outside() {
        let base = tempfile::tempdir().unwrap();
        let upper = base.path().join("upper");
        let outside = base.path().join("outside");
        fs::create_dir(&outside).unwrap();

        let err = unpack(&raw_entry("../x", b"x")[..], &upper, 1 << 20).unwrap_err();
        assert!(matches!(err, DiffError::UnpackEntry { source: EntryError::DotDot, .. }), "{err:?}");
        assert!(!base.path().join("x").exists());

        let abs = base.path().join("abs");
        let err = unpack(&raw_entry(abs.to_str().unwrap(), b"a")[..], &upper, 1 << 20).unwrap_err();
        assert!(matches!(err, DiffError::UnpackEntry { source: EntryError::AbsoluteName, .. }), "{err:?}");
        assert!(!abs.exists());

        let mut b = tar::Builder::new(Vec::new());
        let mut h = test_header();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "evil", &outside).unwrap();
        let mut h = test_header();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "evil/f", &b"f"[..]).unwrap();
        let stream = b.into_inner().unwrap();
        let err = unpack(&stream[..], &upper, 1 << 20).unwrap_err();
        assert!(matches!(err, DiffError::UnpackEntry { source: EntryError::SymlinkParent(_), .. }), "{err:?}");
        assert!(!outside.join("f").exists());
        assert!(fs::symlink_metadata(upper.join("evil")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        // A hard link may not reach outside either.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = test_header();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_path("hl").unwrap();
        h.as_gnu_mut().unwrap().linkname[..13].copy_from_slice(b"../outside/hl");
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let stream = b.into_inner().unwrap();
        assert!(unpack(&stream[..], &upper, 1 << 20).is_err());
        assert!(!upper.join("hl").exists());
    }

    #[test]
    fn stream_over_max_bytes_is_refused() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("big"), vec![7u8; 100_000]).unwrap();
        let mut stream = Vec::new();
        let stats = pack(src.path(), &mut stream).unwrap();
        assert!(stats.bytes > 100_000);
        let dst = tempfile::tempdir().unwrap();
        let err = unpack(&stream[..], dst.path(), 10_000).unwrap_err();
        assert!(matches!(err, DiffError::TooLarge { max_bytes: 10_000 }), "{err:?}");
        assert!(unpack(&stream[..], dst.path(), stats.bytes).is_ok());
    }

    /// Unmounts on drop, so a failed assertion leaves no mount behind.
    struct Mounted(PathBuf);

    impl Mounted {
        fn overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Self {
            for d in [upper, work, target] {
                fs::create_dir_all(d).unwrap();
            }
            let options =
                format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
            if let Err(e) = nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(options.as_str()),
            ) {
                panic!(
                    "mounting overlayfs at {} failed: {e}; this test needs root, overlayfs, \
                     and a /tmp that is not itself on overlayfs ({options})",
                    target.display()
                );
            }
            Self(target.to_path_buf())
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn overlay_sees_deletions_after_carrying_the_upper_dir() {
        let base = tempfile::tempdir().unwrap();
        let lower = base.path().join("lower");
        fs::create_dir_all(lower.join("tree/sub")).unwrap();
        fs::create_dir_all(lower.join("opq")).unwrap();
        fs::write(lower.join("keep"), b"keep").unwrap();
        fs::write(lower.join("gone"), b"gone").unwrap();
        fs::write(lower.join("changed"), b"old").unwrap();
        fs::write(lower.join("tree/sub/x"), b"x").unwrap();
        fs::write(lower.join("opq/old"), b"old").unwrap();

        // The workload's changes, made through a real overlay mount.
        let upper1 = base.path().join("upper1");
        {
            let merged = base.path().join("merged1");
            let _m = Mounted::overlay(&lower, &upper1, &base.path().join("work1"), &merged);
            fs::remove_file(merged.join("gone")).unwrap();
            fs::remove_dir_all(merged.join("tree")).unwrap();
            fs::remove_dir_all(merged.join("opq")).unwrap();
            fs::create_dir(merged.join("opq")).unwrap();
            fs::write(merged.join("opq/new"), b"new").unwrap();
            fs::write(merged.join("changed"), b"new").unwrap();
            fs::write(merged.join("added"), b"added").unwrap();
        }

        let mut stream = Vec::new();
        pack(&upper1, &mut stream).unwrap();
        let upper2 = base.path().join("upper2");
        unpack(&stream[..], &upper2, 1 << 20).unwrap();

        let merged = base.path().join("merged2");
        let _m = Mounted::overlay(&lower, &upper2, &base.path().join("work2"), &merged);
        assert!(!merged.join("gone").exists(), "whited-out lower file is visible");
        assert!(!merged.join("tree").exists(), "whited-out lower tree is visible");
        assert_eq!(fs::read(merged.join("keep")).unwrap(), b"keep");
        assert_eq!(fs::read(merged.join("changed")).unwrap(), b"new");
        assert_eq!(fs::read(merged.join("added")).unwrap(), b"added");
        let opq: Vec<_> = fs::read_dir(merged.join("opq")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(opq, vec![std::ffi::OsString::from("new")], "opaque dir shows lower children");
    }
}
