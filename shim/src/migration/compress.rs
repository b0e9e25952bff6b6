//! zstd on the wire: each data chunk (at most `wire::CHUNK`) of a migration
//! is compressed on its own when that pays, and sent as a `DataZ` frame;
//! a chunk that does not shrink by at least an eighth goes raw (`Data`).
//!
//! The level comes from the link rate (measured by `auto`'s probe; unknown
//! otherwise) and this CPU's measured zstd speed: the highest level that
//! compresses at least twice as fast as the link moves bytes (the CPU also
//! runs CRIU, TLS and the digests meanwhile), none when even level 1 is
//! slower than that, level 1 when the link rate is unknown. The source
//! proposes zstd in `Hello`, the destination accepts in `HelloOk`; `ums init
//! --compress off|auto|LEVEL` sets the source's policy.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The levels tried, fastest first.
pub const LEVELS: [i32; 4] = [1, 3, 6, 9];
/// After this many chunks in a row that did not shrink, only every
/// `RETRY_EVERY`th chunk is tried (incompressible memory costs little CPU).
const GIVE_UP_AFTER: u64 = 8;
const RETRY_EVERY: u64 = 16;

/// `ums init --compress`: `auto` (the level from the link and CPU), `off`,
/// or a fixed level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Auto,
    Off,
    Level(i32),
}

pub fn parse_policy(s: &str) -> Result<Policy, String> {
    match s {
        "auto" => Ok(Policy::Auto),
        "off" | "0" => Ok(Policy::Off),
        n => match n.parse::<i32>() {
            Ok(l) if (1..=19).contains(&l) => Ok(Policy::Level(l)),
            _ => Err(format!("{s:?}: expected auto, off or a zstd level from 1 to 19")),
        },
    }
}

/// The level for a link of `link_bytes_s` (if measured) on a CPU that
/// compresses at `speeds` (level, input bytes per second). 0 is off.
pub fn choose_level(policy: Policy, link_bytes_s: Option<f64>, speeds: &[(i32, f64)]) -> i32 {
    match policy {
        Policy::Off => 0,
        Policy::Level(l) => l,
        Policy::Auto => match link_bytes_s {
            None => 1,
            Some(link) => speeds.iter().filter(|(_, s)| *s >= 2.0 * link).map(|(l, _)| *l).max().unwrap_or(0),
        },
    }
}

/// A sample for measuring speed: half text-like (words of a small
/// vocabulary), half random, 1 MiB.
fn sample() -> Vec<u8> {
    let words = ["memory", "page", "the", "workload", "checkpoint", "value", "key:", "0000", "\n", "{\"id\":"];
    let mut out = Vec::with_capacity(1 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < 1 << 19 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(b' ');
    }
    while out.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(1 << 20);
    out
}

/// This CPU's zstd speed per level on `sample()`, measured once (about
/// 30 ms) and kept.
pub fn speeds() -> &'static [(i32, f64)] {
    static SPEEDS: OnceLock<Vec<(i32, f64)>> = OnceLock::new();
    SPEEDS.get_or_init(|| {
        let s = sample();
        LEVELS
            .iter()
            .map(|&l| {
                let t = Instant::now();
                let _ = zstd::bulk::compress(&s, l);
                (l, s.len() as f64 / t.elapsed().as_secs_f64().max(1e-6))
            })
            .collect()
    })
}

/// The compressing side of one connection: its level and what it did.
#[derive(Debug, Default)]
pub struct Codec {
    level: AtomicI32,
    /// Data bytes before and after compression (frame headers included in `wire`).
    pub raw: AtomicU64,
    pub wire: AtomicU64,
    pub chunks_compressed: AtomicU64,
    pub chunks_raw: AtomicU64,
    misses: AtomicU64,
    seen: AtomicU64,
}

impl Codec {
    pub fn set_level(&self, l: i32) {
        self.level.store(l, Ordering::Relaxed);
    }
    pub fn level(&self) -> i32 {
        self.level.load(Ordering::Relaxed)
    }

    /// Compress `bytes` if it shrinks by at least an eighth; `None`: send raw.
    /// Blocking (CPU).
    pub fn pack(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let level = self.level();
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let giving_up = self.misses.load(Ordering::Relaxed) >= GIVE_UP_AFTER;
        if level == 0 || bytes.len() < 4096 || (giving_up && !n.is_multiple_of(RETRY_EVERY)) {
            return None;
        }
        match zstd::bulk::compress(bytes, level) {
            Ok(z) if z.len() + z.len() / 7 < bytes.len() => {
                self.misses.store(0, Ordering::Relaxed);
                Some(z)
            }
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Count a data chunk of `raw` bytes sent as `wire` bytes (payload).
    pub fn count(&self, raw: usize, wire: usize, compressed: bool) {
        self.raw.fetch_add(raw as u64, Ordering::Relaxed);
        self.wire.fetch_add(wire as u64, Ordering::Relaxed);
        if compressed {
            self.chunks_compressed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.chunks_raw.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// For the report.
    pub fn report(&self) -> serde_json::Value {
        let (raw, wire) = (self.raw.load(Ordering::Relaxed), self.wire.load(Ordering::Relaxed));
        serde_json::json!({
            "algorithm": if self.level() > 0 { "zstd" } else { "none" },
            "level": self.level(),
            "data_bytes": raw,
            "wire_bytes": wire,
            "ratio": if wire > 0 { raw as f64 / wire as f64 } else { 1.0 },
            "chunks_compressed": self.chunks_compressed.load(Ordering::Relaxed),
            "chunks_raw": self.chunks_raw.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    #[test]
    fn the_level_follows_the_link_and_the_cpu() {
        let cpu = [(1, 400.0 * MIB), (3, 200.0 * MIB), (6, 60.0 * MIB), (9, 35.0 * MIB)];
        // Unlimited here (about 900 MiB/s): compressing would slow it down.
        assert_eq!(choose_level(Policy::Auto, Some(900.0 * MIB), &cpu), 0);
        // 1 Gbit/s: level 1 keeps up twice over, level 3 does not.
        assert_eq!(choose_level(Policy::Auto, Some(116.0 * MIB), &cpu), 1);
        assert_eq!(choose_level(Policy::Auto, Some(90.0 * MIB), &cpu), 3);
        // 20 MiB/s: level 6 keeps up twice over, 9 does not; on 100 Mbit/s, 9 does.
        assert_eq!(choose_level(Policy::Auto, Some(20.0 * MIB), &cpu), 6);
        assert_eq!(choose_level(Policy::Auto, Some(12.0 * MIB), &cpu), 9);
        assert_eq!(choose_level(Policy::Auto, Some(1.0 * MIB), &cpu), 9);
        // Unknown link: the cheap level.
        assert_eq!(choose_level(Policy::Auto, None, &cpu), 1);
        assert_eq!(choose_level(Policy::Off, Some(1.0), &cpu), 0);
        assert_eq!(choose_level(Policy::Level(7), Some(1e12), &cpu), 7);
    }

    #[test]
    fn policies_parse() {
        assert_eq!(parse_policy("auto"), Ok(Policy::Auto));
        assert_eq!(parse_policy("off"), Ok(Policy::Off));
        assert_eq!(parse_policy("3"), Ok(Policy::Level(3)));
        assert!(parse_policy("20").is_err() && parse_policy("fast").is_err());
    }

    #[test]
    fn compressible_chunks_shrink_and_random_ones_go_raw() {
        let c = Codec::default();
        c.set_level(1);
        let text: Vec<u8> = b"key:0001 value value value\n".iter().cycle().take(1 << 20).copied().collect();
        let z = c.pack(&text).expect("text shrinks");
        assert!(z.len() < text.len() / 10);
        assert_eq!(zstd::bulk::decompress(&z, text.len()).unwrap(), text);
        let random: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
        assert!(c.pack(&random).is_none(), "random bytes do not shrink");
        // After enough misses, most chunks are not even tried.
        for _ in 0..GIVE_UP_AFTER {
            assert!(c.pack(&random).is_none());
        }
        let tried: usize = (0..RETRY_EVERY).filter(|_| c.pack(&text).is_some()).count();
        assert!(tried >= 1 && tried < RETRY_EVERY as usize, "{tried}");
        // Off: nothing is compressed.
        c.set_level(0);
        assert!(c.pack(&text).is_none());
    }

    #[test]
    fn speeds_are_measured() {
        let s = speeds();
        assert_eq!(s.len(), LEVELS.len());
        assert!(s.iter().all(|(_, v)| *v > 0.0), "{s:?}");
    }
}
