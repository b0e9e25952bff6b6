//! Pre-copy by content (`ums migrate --mode pre-copy`), the parts on disk:
//! which files of a dump go, whole or as a page delta ([`prepare`], source);
//! the rebuild of complete images from the previous round plus the deltas
//! ([`rebuild_dir`], destination); and the stop rule ([`StopRule`]).
//!
//! The kernel here has no soft-dirty tracking, so CRIU's own pre-dump chain
//! cannot work; instead every round is a full CRIU dump with the tasks left
//! running, and the source compares its pages with what the destination
//! holds, by digest (`pagedelta`). The rounds' conversation is in
//! docs/migration-protocol.md ("Pre-copy").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pagedelta::{self, Held, Pagemap};
use super::{FileKind, PagesCheck};

/// A file of a round to send: its path, kind and name on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub path: PathBuf,
    pub kind: FileKind,
    pub name: String,
}

/// A dump, ready to send against what the destination holds.
#[derive(Debug, Default)]
pub struct Prepared {
    pub sends: Vec<Send>,
    /// The pages images the destination rebuilds from a delta.
    pub pages: Vec<PagesCheck>,
    /// What the destination holds once it has this round: per pagemap.
    pub held: HashMap<String, Held>,
    /// Pages in the dump, and pages sent (changed or new).
    pub pages_total: u64,
    pub pages_sent: u64,
}

fn err(p: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", p.display())
}

/// Sort the files of the dump in `images`: a pages image whose pagemap the
/// destination holds from an earlier round (`held`) goes as a delta (written
/// into `deltas`), any other as it is; every other file goes whole.
pub fn prepare(images: &Path, deltas: &Path, held: &HashMap<String, Held>) -> Result<Prepared, String> {
    let mut names: Vec<String> = std::fs::read_dir(images)
        .map_err(|e| err(images, e))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Prepared::default();
    let mut by_delta: Vec<String> = Vec::new();
    for name in names.iter().filter(|n| pagedelta::is_pagemap(n)) {
        let path = images.join(name);
        let pm =
            pagedelta::parse_pagemap(&std::fs::read(&path).map_err(|e| err(&path, e))?).map_err(|e| err(&path, e))?;
        let pages_path = images.join(pm.pages_file());
        let mut f = match std::fs::File::open(&pages_path) {
            Ok(f) => std::io::BufReader::with_capacity(1 << 20, f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && pm.present_pages() == 0 => continue,
            Err(e) => return Err(err(&pages_path, e)),
        };
        let before = held.get(name);
        let (scan, now) = match before {
            Some(h) => {
                std::fs::create_dir_all(deltas).map_err(|e| err(deltas, e))?;
                let dpath = deltas.join(name);
                let mut w = std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&dpath).map_err(|e| err(&dpath, e))?,
                );
                let r = pagedelta::scan(&pm, &mut f, Some(h), Some(&mut w)).map_err(|e| err(&pages_path, e))?;
                std::io::Write::flush(&mut w).map_err(|e| err(&dpath, e))?;
                out.sends.push(Send { path: dpath, kind: FileKind::PageDelta, name: name.clone() });
                out.pages.push(PagesCheck { pagemap: name.clone(), pages: r.0.pages, digest: r.0.digest.clone() });
                by_delta.push(pm.pages_file());
                r
            }
            None => pagedelta::scan(&pm, &mut f, None, None).map_err(|e| err(&pages_path, e))?,
        };
        out.pages_total += scan.pages;
        out.pages_sent += scan.changed;
        out.held.insert(name.clone(), now);
    }
    for name in names {
        if !by_delta.contains(&name) {
            out.sends.push(Send { path: images.join(&name), kind: FileKind::Image, name });
        }
    }
    Ok(out)
}

/// At the destination: in `incoming` (this round's files, pages images that
/// came whole included), build every pages image of `checks` from its delta
/// in `deltas` and the previous round's images in `held`, and check its
/// digest against the source's. `digests` keeps the page digests of the
/// held images (one file per pagemap, 16 bytes a page): with them, an image
/// whose layout did not move is rebuilt in place, writing only the delta.
/// With `keep_digests` (a round before the final one) they are written for
/// every pagemap of this round, to serve the next.
pub fn rebuild_dir(
    incoming: &Path,
    deltas: &Path,
    held: Option<&Path>,
    digests: &Path,
    checks: &[PagesCheck],
    keep_digests: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(digests).map_err(|e| err(digests, e))?;
    for c in checks {
        if !super::safe_name(&c.pagemap) || !pagedelta::is_pagemap(&c.pagemap) {
            return Err(format!("bad pagemap name {:?}", c.pagemap));
        }
        let pm = read_pagemap(&incoming.join(&c.pagemap))?;
        let dpath = deltas.join(&c.pagemap);
        let delta = std::fs::File::open(&dpath).map_err(|e| err(&dpath, e))?;
        let out_path = incoming.join(pm.pages_file());
        if out_path.exists() {
            return Err(format!("{}: sent whole and as a delta", out_path.display()));
        }
        let old: Option<(Pagemap, PathBuf)> = match held {
            Some(h) if h.join(&c.pagemap).exists() => {
                let opm = read_pagemap(&h.join(&c.pagemap))?;
                let p = h.join(opm.pages_file());
                Some((opm, p))
            }
            _ => None,
        };
        let sidecar = digests.join(&c.pagemap);
        let old_digests: Option<Vec<u128>> = old.as_ref().and_then(|(opm, _)| {
            let b = std::fs::read(&sidecar).ok()?;
            (b.len() as u64 == opm.present_pages() * 16)
                .then(|| b.chunks(16).map(|d| u128::from_le_bytes(d.try_into().expect("16 bytes"))).collect())
        });
        let didx = pagedelta::delta_index(&delta).map_err(|e| err(&dpath, e))?;
        let oidx = old.as_ref().map(|(p, _)| pagedelta::image_index(p)).unwrap_or_default();
        let copies = pagedelta::plan(&pm, &didx, &oidx).map_err(|e| err(&out_path, e))?;
        let page_digests = match (&old, &old_digests) {
            (Some((_, old_path)), Some(od)) if pagedelta::in_place(&copies) && old_path.exists() => {
                std::fs::rename(old_path, &out_path).map_err(|e| err(old_path, e))?;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&out_path)
                    .map_err(|e| err(&out_path, e))?;
                pagedelta::rebuild_in_place(&copies, &delta, od, &f).map_err(|e| err(&out_path, e))?
            }
            _ => {
                let old_file = match &old {
                    Some((opm, p)) => match std::fs::File::open(p) {
                        Ok(f) => Some((opm, f)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && opm.present_pages() == 0 => None,
                        Err(e) => return Err(err(p, e)),
                    },
                    None => None,
                };
                let out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&out_path)
                    .map_err(|e| err(&out_path, e))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
                let old_ref = old_file.as_ref().map(|(p, f)| (*p, f as &dyn pagedelta::ReadAt));
                let d = pagedelta::rebuild(&pm, &delta, old_ref, &mut w).map_err(|e| err(&out_path, e))?;
                std::io::Write::flush(&mut w).map_err(|e| err(&out_path, e))?;
                d
            }
        };
        if pagedelta::combined(&page_digests) != c.digest || pm.present_pages() != c.pages {
            return Err(format!("{}: the rebuilt pages differ from the source's", out_path.display()));
        }
        if keep_digests {
            write_digests(&sidecar, &page_digests)?;
        }
    }
    if keep_digests {
        // Pages images that came whole: their digests, for the next round.
        let names: Vec<String> = std::fs::read_dir(incoming)
            .map_err(|e| err(incoming, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| pagedelta::is_pagemap(n) && !checks.iter().any(|c| &c.pagemap == n))
            .collect();
        for n in names {
            let pm = read_pagemap(&incoming.join(&n))?;
            let p = incoming.join(pm.pages_file());
            let d = match std::fs::File::open(&p) {
                Ok(f) => pagedelta::page_digests(&pm, &mut std::io::BufReader::with_capacity(1 << 20, f))
                    .map_err(|e| err(&p, e))?,
                Err(_) => continue,
            };
            write_digests(&digests.join(&n), &d)?;
        }
    }
    Ok(())
}

fn write_digests(path: &Path, d: &[u128]) -> Result<(), String> {
    let bytes: Vec<u8> = d.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).map_err(|e| err(path, e))
}

fn read_pagemap(p: &Path) -> Result<Pagemap, String> {
    pagedelta::parse_pagemap(&std::fs::read(p).map_err(|e| err(p, e))?).map_err(|e| err(p, e))
}

/// Why the rounds while the workload runs ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The last round's delta crosses the link within the target freeze.
    Fits,
    /// The delta did not shrink: the workload writes as fast as the link moves.
    NotShrinking,
    /// The most rounds allowed.
    Limit,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Fits => "the next delta fits the target freeze at the measured link rate",
            Stop::NotShrinking => "the rounds stopped shrinking (the workload writes about as fast as the link moves)",
            Stop::Limit => "the round limit",
        }
    }
}

/// The stop rule, from what the rounds measured.
#[derive(Debug, Clone)]
pub struct StopRule {
    pub target: Duration,
    pub max_rounds: u32,
    /// Bytes of each round so far, and the time they took to reach the
    /// destination (from the first byte until its `RoundOk`).
    sent: Vec<(u64, Duration)>,
}

impl StopRule {
    pub fn new(target: Duration, max_rounds: u32) -> Self {
        StopRule { target, max_rounds: max_rounds.max(1), sent: Vec::new() }
    }

    /// The link rate measured so far, bytes per second.
    pub fn rate(&self) -> Option<f64> {
        let bytes: u64 = self.sent.iter().map(|s| s.0).sum();
        let t: f64 = self.sent.iter().map(|s| s.1.as_secs_f64()).sum();
        (t > 0.0 && bytes > 0).then(|| bytes as f64 / t)
    }

    /// Record a round; then whether to stop, and why. The first round
    /// (everything) says nothing of how fast memory changes, so a second
    /// always follows unless the limit is one.
    pub fn after_round(&mut self, bytes: u64, took: Duration) -> Option<Stop> {
        self.sent.push((bytes, took));
        let k = self.sent.len();
        if k >= self.max_rounds as usize {
            return Some(Stop::Limit);
        }
        if k < 2 {
            return None;
        }
        // The next delta is about this one: the pages written during a round.
        let rate = self.rate()?;
        if bytes as f64 / rate <= self.target.as_secs_f64() {
            return Some(Stop::Fits);
        }
        if k >= 3 && bytes as f64 >= 0.9 * self.sent[k - 2].0 as f64 {
            return Some(Stop::NotShrinking);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::pagedelta::{tests::encode, Run, PAGE};
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        (0..PAGE).map(|i| (seed as usize * 31 + i * 7 % 251) as u8).collect()
    }

    /// A fake dump: one process with `pages` (address, seed), a core file.
    fn write_dump(dir: &Path, id: u32, pages: &[(u64, u64)]) {
        std::fs::create_dir_all(dir).unwrap();
        let runs = pages.iter().map(|(va, _)| Run { vaddr: *va, nr_pages: 1, present: true }).collect();
        let pm = Pagemap { pages_id: id, runs };
        std::fs::write(dir.join("pagemap-1.img"), encode(&pm)).unwrap();
        let bytes: Vec<u8> = pages.iter().flat_map(|(_, s)| page(*s)).collect();
        std::fs::write(dir.join(pm.pages_file()), bytes).unwrap();
        std::fs::write(dir.join("core-1.img"), format!("core {id}")).unwrap();
    }

    /// What the destination does with a round: receive the files, rebuild,
    /// and keep the result as the held images of the next round.
    fn deliver(p: &Prepared, dst: &Path, round: u32) {
        let incoming = dst.join("criu");
        let deltas = dst.join("delta");
        std::fs::create_dir_all(&incoming).unwrap();
        std::fs::create_dir_all(&deltas).unwrap();
        for s in &p.sends {
            let to = match s.kind {
                FileKind::PageDelta => deltas.join(&s.name),
                _ => incoming.join(&s.name),
            };
            std::fs::copy(&s.path, to).unwrap();
        }
        let held = dst.join("held");
        rebuild_dir(&incoming, &deltas, held.exists().then_some(held.as_path()), &dst.join("digests"), &p.pages, true)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let _ = std::fs::remove_dir_all(&held);
        std::fs::rename(&incoming, &held).unwrap();
        std::fs::remove_dir_all(&deltas).unwrap();
    }

    #[test]
    fn rounds_on_disk_end_with_the_source_images_at_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        let mut mem: Vec<(u64, u64)> = (0..32).map(|i| (0x10000 + i * PAGE as u64, i)).collect();
        write_dump(&src.join("r1"), 3, &mem);
        let p1 = prepare(&src.join("r1"), &src.join("d1"), &HashMap::new()).unwrap();
        assert_eq!((p1.pages_total, p1.pages_sent), (32, 32));
        assert!(p1.pages.is_empty() && p1.sends.iter().any(|s| s.name == "pages-3.img"), "{:?}", p1.sends);
        deliver(&p1, &dst, 1);
        // Round 2: three pages rewritten, a new page; CRIU numbered the pages image anew.
        mem[4].1 = 1004;
        mem[9].1 = 1009;
        mem[31].1 = 1031;
        mem.push((0x90000, 77));
        write_dump(&src.join("r2"), 5, &mem);
        let p2 = prepare(&src.join("r2"), &src.join("d2"), &p1.held).unwrap();
        assert_eq!((p2.pages_total, p2.pages_sent), (33, 4));
        assert!(!p2.sends.iter().any(|s| s.name.starts_with("pages-")), "{:?}", p2.sends);
        let delta = p2.sends.iter().find(|s| s.kind == FileKind::PageDelta).unwrap();
        assert!(std::fs::metadata(&delta.path).unwrap().len() < 5 * PAGE as u64);
        deliver(&p2, &dst, 2);
        assert!(
            std::fs::read(dst.join("held/pages-5.img")).unwrap() == std::fs::read(src.join("r2/pages-5.img")).unwrap()
        );
        assert_eq!(std::fs::read(dst.join("held/core-1.img")).unwrap(), b"core 5");
        // A wrong digest is caught.
        let mut bad = prepare(&src.join("r2"), &src.join("d3"), &p1.held).unwrap();
        bad.pages[0].digest = "0".repeat(32);
        let inc = dst.join("x");
        std::fs::create_dir_all(&inc).unwrap();
        for s in &bad.sends {
            std::fs::copy(&s.path, inc.join(&s.name)).unwrap();
        }
        let e = rebuild_dir(&inc, &src.join("d3"), Some(&dst.join("held")), &dst.join("digests"), &bad.pages, false)
            .unwrap_err();
        assert!(e.contains("differ"), "{e}");
    }

    #[test]
    fn the_stop_rule() {
        let s = Duration::from_secs(1);
        // 100 MB/s; a 20 MB delta takes 0.2 s: fits a 0.5 s target.
        let mut r = StopRule::new(Duration::from_millis(500), 5);
        assert_eq!(r.after_round(500_000_000, 5 * s), None);
        assert_eq!(r.after_round(20_000_000, s / 5), Some(Stop::Fits));
        // A writer as fast as the link: deltas stop shrinking.
        let mut r = StopRule::new(Duration::from_millis(500), 5);
        assert_eq!(r.after_round(500_000_000, 5 * s), None);
        assert_eq!(r.after_round(300_000_000, 3 * s), None);
        assert_eq!(r.after_round(290_000_000, 3 * s), Some(Stop::NotShrinking));
        // The limit.
        let mut r = StopRule::new(Duration::from_millis(1), 2);
        assert_eq!(r.after_round(500_000_000, 5 * s), None);
        assert_eq!(r.after_round(400_000_000, 4 * s), Some(Stop::Limit));
        let mut r = StopRule::new(Duration::from_millis(1), 1);
        assert_eq!(r.after_round(1, s), Some(Stop::Limit));
    }
}
