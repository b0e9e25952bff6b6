//! Real servers from Debian's packages as nested workloads: the `.deb` files
//! `image/install-deps.sh --test` downloads (never installs: that would start
//! them as services on this host) unpacked once under the target dir, and a
//! layer with a server's binary and every shared library `ldd` names for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::oci_layout::{Compression, Layer};

/// Where install-deps.sh puts the packages.
pub const DEBS_DIR: &str = "/var/cache/ums-test-debs";

/// The package's files, unpacked (once) under `<target>/ums-e2e/debs/`.
/// Panics naming install-deps.sh when the package is not there.
pub fn unpack(package: &str) -> PathBuf {
    let deb = std::fs::read_dir(DEBS_DIR)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
        })
        .unwrap_or_else(|| {
            panic!("{DEBS_DIR}/{package}_*.deb not found: run bash image/install-deps.sh --test (it downloads it)")
        });
    let root = crate::target_dir().join("ums-e2e/debs").join(deb.file_stem().unwrap());
    if !root.join(".unpacked").is_file() {
        let staged = root.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staged);
        std::fs::create_dir_all(&staged).unwrap();
        crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staged))
            .unwrap_or_else(|e| panic!("dpkg-deb -x {}: {e}", deb.display()));
        std::fs::write(staged.join(".unpacked"), b"").unwrap();
        let _ = std::fs::remove_dir_all(&root);
        if std::fs::rename(&staged, &root).is_err() {
            // Another test unpacked it meanwhile.
            let _ = std::fs::remove_dir_all(&staged);
        }
    }
    root
}

/// A layer with `bin` (a path inside `root`) at `at`, and every shared
/// library `ldd` names for it, looked up first in `lib_roots` (other
/// unpacked packages) and then on this host, each at the path it is
/// loaded from.
pub fn server_layer(bin: &Path, at: &str, lib_roots: &[PathBuf]) -> Layer {
    let mut layer = Layer::new(Compression::Gzip).file(at, std::fs::read(bin).unwrap(), 0o755);
    let lib_dirs: Vec<String> = lib_roots
        .iter()
        .flat_map(|r| ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"].map(|d| r.join(d)))
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect();
    let out = Command::new("ldd").arg(bin).env("LD_LIBRARY_PATH", lib_dirs.join(":")).output().expect("ldd (libc-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("not found"), "ldd {}: a library is missing:\n{text}", bin.display());
    for line in text.lines() {
        // "libx.so.1 => /path/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or("");
        if !path.starts_with('/') {
            continue;
        }
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // A library from an unpacked package goes where the host keeps its own.
        let inside = lib_roots
            .iter()
            .find_map(|r| Path::new(path).strip_prefix(r).ok().map(|p| p.to_path_buf()))
            .unwrap_or_else(|| Path::new(path).strip_prefix("/").unwrap().to_path_buf());
        layer = layer.file(&inside.to_string_lossy(), data, 0o755);
    }
    layer
}
