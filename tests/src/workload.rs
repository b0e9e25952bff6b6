//! The test workload, `memctr` (source: `tests/workloads/memctr.c`).
//!
//! Built statically so it runs in any root filesystem, including the busybox
//! one of [`crate::oci_layout::ImageBuilder`]. The binary is cached under
//! `<target>/ums-e2e/` by the hash of its source, so concurrent tests share it.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Path of the workload's C source.
pub fn workload_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join("memctr.c")
}

/// Compiles `memctr.c` with `gcc -O2 -static` (once per source version) and
/// returns the binary's path. `tmp` is the scratch directory for the compiler's
/// output before it is moved into the cache. Panics with a message naming
/// `gcc` and `libc6-dev` when compiling fails.
pub fn build_workload(tmp: &Path) -> PathBuf {
    try_build_workload(tmp).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`build_workload`], returning the error instead of panicking.
pub fn try_build_workload(tmp: &Path) -> anyhow::Result<PathBuf> {
    try_build(tmp, "memctr")
}

/// Compiles `tests/workloads/websrv.c` (the HTTP + UDP echo workload).
pub fn build_websrv(tmp: &Path) -> PathBuf {
    try_build(tmp, "websrv").unwrap_or_else(|e| panic!("{e:#}"))
}

/// Compiles `tests/workloads/clockmon.c` (prints its clocks every 100 ms).
pub fn build_clockmon(tmp: &Path) -> PathBuf {
    try_build(tmp, "clockmon").unwrap_or_else(|e| panic!("{e:#}"))
}

fn try_build(tmp: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(format!("{name}.c"));
    let code = std::fs::read(&source).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", source.display()))?;
    let hash = hex::encode(&Sha256::digest(&code)[..8]);
    let cache_dir = crate::target_dir().join("ums-e2e");
    let cached = cache_dir.join(format!("{name}-{hash}"));
    if cached.is_file() {
        return Ok(cached);
    }
    std::fs::create_dir_all(&cache_dir)?;
    std::fs::create_dir_all(tmp)?;
    let out = tmp.join(format!("{name}-{hash}-{}", std::process::id()));
    let result = Command::new("gcc").args(["-O2", "-static", "-Wall", "-o"]).arg(&out).arg(&source).output();
    match result {
        Err(e) => anyhow::bail!("cannot run gcc to build the {name} workload ({e}): install gcc and libc6-dev"),
        Ok(o) if !o.status.success() => anyhow::bail!(
            "gcc -O2 -static {} failed: install gcc and libc6-dev (static libc):\n{}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
    // Copy next to the cache entry, then rename: atomic for concurrent tests.
    let staged = cache_dir.join(format!(".{name}-{hash}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::copy(&out, &staged)?;
    std::fs::rename(&staged, &cached)?;
    let _ = std::fs::remove_file(&out);
    Ok(cached)
}

/// One `tick <n> <unix ms>` line of memctr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub n: u64,
    pub unix_ms: u64,
}

/// Parses a `tick <n> <unix ms>` line (leading text such as a log prefix is
/// allowed before `tick`).
pub fn parse_tick(line: &str) -> Option<Tick> {
    let rest = &line[line.find("tick ")? + 5..];
    let mut it = rest.split_whitespace();
    let n = it.next()?.parse().ok()?;
    let unix_ms = it.next()?.parse().ok()?;
    Some(Tick { n, unix_ms })
}

/// Parses a `sum <16 hex>` line into the hex string.
pub fn parse_sum(line: &str) -> Option<String> {
    let rest = &line[line.find("sum ")? + 4..];
    let sum = rest.split_whitespace().next()?;
    (sum.len() == 16 && sum.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sum.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        assert_eq!(parse_tick("tick 3 1700000000123"), Some(Tick { n: 3, unix_ms: 1700000000123 }));
        assert_eq!(parse_tick("[w] tick 4 5"), Some(Tick { n: 4, unix_ms: 5 }));
        assert_eq!(parse_tick("tick x"), None);
        assert_eq!(parse_sum("sum 00ff00ff00ff00ff").as_deref(), Some("00ff00ff00ff00ff"));
        assert_eq!(parse_sum("sum 123"), None);
    }
}
