//! Live migration of the nested workload to a peer outer container, in the
//! three phases of UMS (section III-B):
//!
//! * pre-migration: `Hello` (version, image digest and blobs, resource needs);
//!   the destination, a standby, checks it can host the workload and answers
//!   with the blobs it lacks; the source sends exactly those; the destination
//!   unpacks the image and says `Ready`. The workload has not been touched.
//! * migration: the source freezes the workload and CRIU dumps it into an
//!   images dir on tmpfs, while `streamer` ships every file's new bytes as
//!   CRIU writes them (inotify), so dump and transfer overlap. The writable
//!   layer follows, then a `Manifest` with every file's size and digest, sent
//!   only after CRIU succeeded. The destination verifies and restores.
//! * post-migration: on `Result { running }` the source kills its frozen copy
//!   and becomes standby. A failure before the manifest is sent thaws the
//!   source; after it, only a definite answer does (`in_doubt`): the source
//!   stays frozen and asks the destination, which fences the migration if it
//!   has not started it (`outcomes`).
//!
//! Post-copy (`--mode post-copy`, module `postcopy`) moves only the
//! non-memory state during the freeze; the destination runs the workload
//! at once and its memory follows over a second TLS connection (the page
//! link). The source's frozen copy ends when the destination has every page.
//!
//! The frame format is in `wire`, the sides in `source` and `destination`.

pub mod auto;
pub mod compress;
pub mod cpu;
pub mod destination;
pub mod in_doubt;
pub mod keys;
pub mod outcomes;
pub mod pagedelta;
pub mod postcopy;
pub mod precopy;
pub mod progress;
pub mod resumable;
pub mod source;
pub mod streamer;
pub mod transport;
pub mod wire;
pub mod witness;

use serde::{Deserialize, Serialize};

pub use destination::serve_peers;
pub use source::{migrate_out, Finish};

/// The migration layer's entry point in the form the supervisor takes it
/// (`supervisor::Ctx::migrate_out`).
pub fn migrate_out_boxed() -> crate::supervisor::MigrateOut {
    std::sync::Arc::new(|ctx, n, to, how| {
        Box::pin(async move {
            use crate::metrics::{Direction, Measured};
            let _progress = progress::Tracker::begin(match how.mode {
                crate::supervisor::control::MigrationMode::Auto => "measuring the workload and the link",
                _ => "pre-migration",
            });
            // `auto` measures and chooses first; the metrics count the mode chosen.
            let resolved = match auto::resolve(&ctx, &n, &to, how).await {
                Ok(r) => r,
                Err(e) => {
                    ctx.metrics.migration_started(Direction::Out, how.mode);
                    ctx.metrics.migration_failed(Direction::Out, how.mode, e.reason());
                    return Err(crate::supervisor::describe(&e));
                }
            };
            let mode = resolved.mode;
            ctx.metrics.migration_started(Direction::Out, mode);
            match migrate_out(&ctx, &n, &to, mode, resolved.link_bytes_s).await {
                Ok((mut report, finish)) => {
                    report["requested_mode"] = serde_json::json!(how.mode.as_str());
                    report["choice"] = serde_json::json!(resolved.line.unwrap_or_else(|| mode.as_str().to_string()));
                    if let Some(a) = resolved.report {
                        // The measuring came before the migration proper: its time counts.
                        let measure_ms = a["measure_ms"].as_f64().unwrap_or(0.0);
                        report["total_ms"] = serde_json::json!(report["total_ms"].as_f64().unwrap_or(0.0) + measure_ms);
                        report["auto"] = a;
                    }
                    let s = |k: &str| report[k].as_f64().unwrap_or(0.0) / 1000.0;
                    let measured =
                        Measured { duration: s("total_ms"), downtime: s("downtime_ms"), freeze: s("freeze_ms") };
                    ctx.metrics.migration_out_succeeded(mode, measured);
                    let finish: crate::supervisor::BoxFuture<f64> = Box::pin(finish.run());
                    Ok((report, finish))
                }
                Err(e) => {
                    ctx.metrics.migration_failed(Direction::Out, mode, e.reason());
                    Err(crate::supervisor::describe(&e))
                }
            }
        })
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    pub migration_id: String,
    pub ums_version: String,
    pub image: crate::workload::nested::ImageInfo,
    /// Every blob of the workload image: digest and size.
    pub blobs: Vec<(String, u64)>,
    pub manifest_size: u64,
    pub runtime: crate::config::RuntimeKind,
    /// Resident memory of the workload: the images dir needs about this much.
    pub memory_bytes: u64,
    pub tcp_established: bool,
    /// The user-space CPU features of the source (`cpu`); the destination
    /// refuses when it lacks one. Absent from older sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<Vec<String>>,
    /// Post-copy: the memory follows after the destination runs the workload
    /// (`postcopy`). The destination refuses it when lazy pages cannot work there.
    #[serde(default)]
    pub post_copy: bool,
    /// Pre-copy: rounds of images while the workload runs, each answered
    /// with `RoundOk`, before the final, frozen one (`precopy`).
    #[serde(default)]
    pub pre_copy: bool,
    /// The source would compress data chunks with this (`"zstd"`), if the
    /// destination accepts (`HelloOk.compression`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// The witness (HOST:PORT, a third `ums` of the group) whose record is
    /// this migration's commit point (`witness`). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloOk {
    pub protocol: u32,
    pub missing_blobs: Vec<String>,
    pub criu_version: String,
    /// The compression accepted (the one `Hello` proposed), if any: the
    /// source may then send `DataZ` frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// The destination commits at the Hello's witness before it restores.
    /// A source that named a witness migrates only when this is true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub witness: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A blob of the workload image, named by digest.
    Blob,
    /// A file of the CRIU images dir.
    Image,
    /// The writable layer, as a tar stream.
    UpperDiff,
    /// Pre-copy: the pages of a pagemap (named) that the destination does
    /// not hold yet (`pagedelta`).
    PageDelta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOpen {
    pub id: u32,
    pub kind: FileKind,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// BLAKE3 of the bytes as sent, hex.
    pub blake3: String,
}

/// The digest of a streamed file: BLAKE3, not SHA-256, because it is computed
/// on both sides of every byte of a checkpoint (SHA-256 here: 1.8 GB/s, about
/// 0.3 s of CPU per side for 512 MiB; BLAKE3 is several times faster). Image
/// blobs keep their OCI SHA-256 digests.
pub type FileHasher = blake3::Hasher;

pub fn hex_digest(h: &FileHasher) -> String {
    h.finalize().to_hex().to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
    pub meta: crate::workload::checkpoint::Meta,
    /// Pre-copy: the pages images the destination rebuilds, with their digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PagesCheck>,
}

/// Pre-copy: a pages image the destination rebuilds from a delta, and the
/// combined digest of its pages as the source dumped them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PagesCheck {
    pub pagemap: String,
    pub pages: u64,
    pub digest: String,
}

/// Pre-copy: the end of a round while the workload runs (`RoundEnd`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundEnd {
    pub round: u32,
    pub files: Vec<FileEntry>,
    pub pages: Vec<PagesCheck>,
}

/// Pre-copy: the destination holds the complete images of this round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundOk {
    pub round: u32,
    pub rebuild_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationResult {
    pub running: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub verify_ms: f64,
    #[serde(default)]
    pub restore_ms: f64,
}

/// What a source asks of the destination about one migration, on a new
/// connection, when it does not know how the migration ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub migration_id: String,
    #[serde(default)]
    pub action: QueryAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryAction {
    /// "Did it run? If you have not started it, never start it."
    #[default]
    Fence,
    /// "End your copy if you run it, and never start it": the source runs
    /// the workload again (an operator's `ums resolve --thaw`).
    Stop,
}

/// The destination's state for one migration id, as it answers a `Query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// The workload runs here.
    Running,
    /// It does not run here and never will (fenced, failed or stopped).
    NotRunning,
    /// `runc restore` is under way: ask again later.
    Restoring,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryAnswer {
    pub state: PeerState,
    /// Since when (the destination's clock, Unix ms).
    #[serde(default)]
    pub since_unix_ms: u64,
}

/// A name from the peer must be one plain file name: no separators, no `..`.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_names_are_plain_file_names() {
        use super::safe_name;
        assert!(safe_name("pages-1.img"));
        assert!(!safe_name("../etc/passwd"));
        assert!(!safe_name("/abs"));
        assert!(!safe_name(".."));
        assert!(!safe_name(""));
        assert!(!safe_name("a/b"));
        assert!(!safe_name("nul\0"));
    }
}
