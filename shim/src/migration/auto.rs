//! `ums migrate --mode auto` (the default): choose stop-copy, pre-copy or
//! post-copy from what is measured just before the migration.
//!
//! * the workload's memory (the sum of its processes' PSS, so memory that
//!   processes share counts once) and how much of it is shared between them
//!   (RSS minus PSS: what post-copy would move more than once, since lazy
//!   pages do not keep copy-on-write sharing);
//! * its dirty rate: the digests of a sample of its resident private
//!   writable pages, read twice `SAMPLE_INTERVAL` apart from
//!   `/proc/PID/mem` (the workload is not stopped);
//! * the link rate: a probe connection to the destination (the same mutual
//!   TLS as a migration) carries up to `PROBE_BYTES` of random bytes for at
//!   most `PROBE_TIME`; the destination answers how much arrived, and what it
//!   supports (userfaultfd, its CRIU version, room for pre-copy's images).
//!
//! Both measurements run at the same time. [`choose`] is the rule, a pure
//! function of those inputs.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufWriter};

use super::postcopy::{self, Mode};
use super::source::MigrateError;
use super::wire::{self, Frame, Kind, WireError};
use crate::config::Config;
use crate::supervisor::control::MigrateHow;
use crate::supervisor::Ctx;
use crate::workload::nested::{self, Nested};

/// The two reads of the dirty-rate sample are this far apart.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(300);
/// At most this many pages are read per pass (32 MiB).
pub const SAMPLE_PAGES: usize = 8192;
/// The probe sends at most this much...
pub const PROBE_BYTES: u64 = 32 << 20;
/// ...and stops sending after this long.
pub const PROBE_TIME: Duration = Duration::from_millis(200);
/// A multi-process workload whose processes share more than this (and more
/// than a tenth of its memory) is not moved by post-copy.
pub const SHARED_LIMIT: u64 = 32 << 20;

const PAGE: u64 = 4096;

/// What the choice is made from (all measured, none guessed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// The workload's memory: the sum of its processes' PSS.
    pub memory_bytes: u64,
    /// Bytes of memory rewritten per second, from the sample.
    pub dirty_bytes_s: f64,
    /// The link rate the probe measured, bytes per second.
    pub link_bytes_s: f64,
    pub processes: usize,
    /// RSS minus PSS over the processes: memory counted in more than one.
    pub shared_bytes: u64,
    /// Pre-copy's target freeze (`ums init --precopy-target-freeze`).
    pub target_freeze_ms: f64,
    /// Why post-copy cannot run between these two hosts, if so.
    pub post_copy_problem: Option<String>,
    /// The destination's images dir holds two copies of the memory.
    pub pre_copy_room: bool,
    /// The operator ruled post-copy out.
    pub no_post_copy: bool,
}

/// The mode chosen, and why, in a line for the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub mode: Mode,
    pub why: String,
}

fn mib(b: f64) -> String {
    let m = b / 1048576.0;
    if m >= 10.0 {
        format!("{m:.0}")
    } else {
        format!("{m:.1}")
    }
}

/// The rule:
/// 1. stop-copy when all the memory crosses the link within pre-copy's
///    target freeze: rounds would only add dumps;
/// 2. pre-copy when the workload dirties memory at most half as fast as the
///    link moves it (each round's delta is then at most half the one
///    before, so the rounds converge) and the destination has room for it;
/// 3. otherwise post-copy, the only mode whose freeze does not grow with the
///    write rate, unless it is ruled out (`--no-post-copy`, no userfaultfd
///    at the destination, ...) or the workload has several processes sharing
///    much memory (lazy pages would move the shared memory once per process);
/// 4. otherwise pre-copy if the writer is still slower than the link (the
///    stop rule ends the rounds when they stop shrinking), else stop-copy.
pub fn choose(i: &Inputs) -> Choice {
    let m = i.memory_bytes as f64;
    let link = i.link_bytes_s.max(1.0);
    let wire_s = m / link;
    let facts = format!("{} MiB, dirty {} MiB/s, link {} MiB/s", mib(m), mib(i.dirty_bytes_s), mib(i.link_bytes_s));
    let c = |mode, why: String| Choice { mode, why: format!("{facts}: {why}") };
    let target_s = i.target_freeze_ms / 1000.0;
    if wire_s <= target_s {
        return c(
            Mode::StopCopy,
            format!("all memory crosses in {wire_s:.2} s, within the {target_s:.2} s target freeze"),
        );
    }
    let converges = i.dirty_bytes_s <= link / 2.0;
    if converges && i.pre_copy_room {
        return c(Mode::PreCopy, "the writer is at most half the link rate: rounds converge".into());
    }
    let shared_much = i.processes > 1 && i.shared_bytes > SHARED_LIMIT && i.shared_bytes * 10 > i.memory_bytes;
    let no_post = if i.no_post_copy {
        Some("--no-post-copy".to_string())
    } else if let Some(p) = &i.post_copy_problem {
        Some(p.clone())
    } else if shared_much {
        Some(format!(
            "{} processes share {} MiB, which lazy pages would move once per process",
            i.processes,
            mib(i.shared_bytes as f64)
        ))
    } else {
        None
    };
    let why_not_pre = if i.pre_copy_room {
        "the writer is faster than half the link rate"
    } else {
        "no room at the destination for pre-copy's two copies"
    };
    match no_post {
        None => c(Mode::PostCopy, format!("{why_not_pre}: only post-copy's freeze does not grow with it")),
        Some(why) if i.pre_copy_room && i.dirty_bytes_s < link => {
            c(Mode::PreCopy, format!("{why_not_pre}, post-copy ruled out ({why}): rounds until they stop shrinking"))
        }
        Some(why) => c(Mode::StopCopy, format!("{why_not_pre}, post-copy ruled out ({why})")),
    }
}

// ------------------------------------------------------------ measurements

/// The workload's side of the inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sampled {
    pub memory_bytes: u64,
    pub processes: usize,
    pub shared_bytes: u64,
    pub dirty_bytes_s: f64,
    pub sampled_pages: usize,
    pub changed_pages: usize,
    pub resident_private_bytes: u64,
}

/// `Rss` and `Pss` of a process, in bytes, from its `smaps_rollup`.
fn rss_pss(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let l = s.lines().find(|l| l.starts_with(name))?;
        l[name.len()..].split_whitespace().next()?.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Private writable mappings of a process: (start, end).
fn writable_private(pid: i32) -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return Vec::new() };
    maps.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?.as_bytes();
            if perms.len() < 4 || perms[0] != b'r' || perms[1] != b'w' || perms[3] != b'p' {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

/// The resident pages of `ranges` (bit 63 of each `/proc/PID/pagemap` entry).
fn present_pages(pid: i32, ranges: &[(u64, u64)]) -> Vec<u64> {
    let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else { return Vec::new() };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    for &(start, end) in ranges {
        let mut va = start;
        while va < end {
            let n = (((end - va) / PAGE) as usize).min(4096);
            if f.seek(SeekFrom::Start(va / PAGE * 8)).is_err() || f.read_exact(&mut buf[..n * 8]).is_err() {
                break;
            }
            for (k, e) in buf[..n * 8].chunks(8).enumerate() {
                if u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1 {
                    out.push(va + k as u64 * PAGE);
                }
            }
            va += n as u64 * PAGE;
        }
    }
    out
}

/// Digests of the sampled pages (None where a page cannot be read).
fn digests(mems: &[Option<std::fs::File>], sample: &[(usize, u64)]) -> Vec<Option<u64>> {
    let mut buf = vec![0u8; PAGE as usize];
    sample
        .iter()
        .map(|&(p, va)| {
            let f = mems[p].as_ref()?;
            f.read_exact_at(&mut buf, va).ok()?;
            Some(xxhash_rust::xxh3::xxh3_64(&buf))
        })
        .collect()
}

/// Measure the workload's processes (blocking): memory, sharing, and the
/// dirty rate from two reads of a page sample `interval` apart.
pub fn sample_workload(pids: &[i32], interval: Duration) -> Sampled {
    let mut s = Sampled { processes: pids.len(), ..Default::default() };
    let (mut rss, mut pss) = (0u64, 0u64);
    for &p in pids {
        if let Some((r, q)) = rss_pss(p) {
            rss += r;
            pss += q;
        }
    }
    s.memory_bytes = pss;
    s.shared_bytes = rss.saturating_sub(pss);
    let mut all: Vec<(usize, u64)> = Vec::new();
    for (k, &p) in pids.iter().enumerate() {
        all.extend(present_pages(p, &writable_private(p)).into_iter().map(|va| (k, va)));
    }
    s.resident_private_bytes = all.len() as u64 * PAGE;
    if all.is_empty() {
        return s;
    }
    let stride = all.len().div_ceil(SAMPLE_PAGES);
    let sample: Vec<(usize, u64)> = all.into_iter().step_by(stride).collect();
    let mems: Vec<Option<std::fs::File>> =
        pids.iter().map(|p| std::fs::File::open(format!("/proc/{p}/mem")).ok()).collect();
    let t1 = Instant::now();
    let first = digests(&mems, &sample);
    std::thread::sleep(interval);
    let t2 = Instant::now();
    let second = digests(&mems, &sample);
    let (mut valid, mut changed) = (0usize, 0usize);
    for (a, b) in first.iter().zip(&second) {
        if let (Some(a), Some(b)) = (a, b) {
            valid += 1;
            changed += usize::from(a != b);
        }
    }
    s.sampled_pages = valid;
    s.changed_pages = changed;
    if valid > 0 {
        let secs = t2.duration_since(t1).as_secs_f64().max(1e-3);
        s.dirty_bytes_s = changed as f64 / valid as f64 * s.resident_private_bytes as f64 / secs;
    }
    s
}

/// The first frame of a probe connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub protocol: u32,
}

/// The destination's answer to a probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeAnswer {
    pub protocol: u32,
    /// Probe bytes received.
    pub received: u64,
    pub criu_version: String,
    /// Why lazy pages cannot be restored there, if so.
    pub post_copy_problem: Option<String>,
    /// Free bytes in its images dir.
    pub images_free_bytes: Option<u64>,
}

/// What the probe measured.
#[derive(Debug, Clone)]
pub struct Probed {
    pub answer: ProbeAnswer,
    pub link_bytes_s: f64,
    pub probe_ms: f64,
}

/// The source's probe: connect, send random bytes for at most
/// `PROBE_TIME`, and time until the destination says they all arrived.
pub async fn probe(cfg: &Config, to: &str) -> Result<Probed, MigrateError> {
    let conn = super::transport::connect(cfg, to, cfg.peer_read_timeout)
        .await
        .map_err(|source| MigrateError::Connect { peer: to.into(), source })?;
    let (mut r, w) = (conn.read, conn.write);
    let mut w = BufWriter::with_capacity(wire::SMALL_BUF, w);
    let run = async {
        wire::send_json(&mut w, Kind::Probe, &Probe { protocol: wire::PROTOCOL_VERSION }).await?;
        let chunk: Vec<u8> = (0..256 << 10).map(|_| rand::random::<u8>()).collect();
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < PROBE_BYTES && t.elapsed() < PROBE_TIME {
            wire::write_frame(&mut w, Kind::Data, &[&wire::data_header(0, sent), &chunk]).await?;
            w.flush().await?;
            sent += chunk.len() as u64;
        }
        wire::write_frame(&mut w, Kind::Data, &[&wire::data_header(0, sent)]).await?;
        w.flush().await?;
        let a: ProbeAnswer = wire::read_frame_within(&mut r, cfg.peer_read_timeout).await?.expect(Kind::ProbeAnswer)?;
        let took = t.elapsed().as_secs_f64().max(1e-6);
        Ok::<_, WireError>(Probed { link_bytes_s: a.received as f64 / took, answer: a, probe_ms: took * 1000.0 })
    };
    run.await.map_err(|e| match e {
        WireError::Peer(m) => MigrateError::Refused(m),
        e => MigrateError::Pre(e),
    })
}

/// The destination's side of a probe, after its first frame: count the
/// bytes, answer with what this host supports.
pub async fn answer_probe(
    cfg: &Config,
    first: &Frame,
    r: &mut (impl tokio::io::AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
) -> Result<u64, WireError> {
    let p: Probe = first.parse()?;
    if p.protocol != wire::PROTOCOL_VERSION {
        let message =
            format!("protocol version {} not supported (this ums speaks {})", p.protocol, wire::PROTOCOL_VERSION);
        wire::send_json(w, Kind::Error, &wire::ErrorMsg { message: message.clone() }).await?;
        return Err(WireError::Peer(message));
    }
    let mut received = 0u64;
    loop {
        let f = wire::read_frame_within(r, cfg.peer_read_timeout).await?;
        if f.kind != Kind::Data {
            return Err(WireError::Unexpected { expected: Kind::Data, got: f.kind });
        }
        let (_, _, bytes) = wire::parse_data(&f.payload)?;
        if bytes.is_empty() {
            break;
        }
        received += bytes.len() as u64;
    }
    let facts = postcopy::host_facts();
    let root = cfg.images_root();
    let _ = std::fs::create_dir_all(&root);
    let images_free_bytes = nix::sys::statvfs::statvfs(&root).ok().map(|st| st.blocks_available() * st.fragment_size());
    let a = ProbeAnswer {
        protocol: wire::PROTOCOL_VERSION,
        received,
        criu_version: facts.criu_version.clone(),
        post_copy_problem: postcopy::check_destination(facts).err(),
        images_free_bytes,
    };
    wire::send_json(w, Kind::ProbeAnswer, &a).await?;
    Ok(received)
}

/// `--mode auto`: measure, choose, and say so. Any other mode is taken as
/// asked (`--no-post-copy` with `post-copy` is refused).
pub async fn resolve(ctx: &Ctx, n: &Nested, to: &str, how: MigrateHow) -> Result<Resolved, MigrateError> {
    if how.no_post_copy && how.mode == Mode::PostCopy {
        return Err(MigrateError::Refused("--no-post-copy rules out --mode post-copy".into()));
    }
    if how.mode != Mode::Auto {
        return Ok(Resolved { mode: how.mode, report: None, line: None, link_bytes_s: None });
    }
    let t = Instant::now();
    let pids = nested::pids(n.pid);
    let sampling = tokio::task::spawn_blocking(move || sample_workload(&pids, SAMPLE_INTERVAL));
    let probed = probe(&ctx.cfg, to).await;
    let sampled = sampling.await.map_err(|e| MigrateError::Stream(e.to_string()))?;
    let probed = probed?;
    let facts = postcopy::host_facts();
    let post_copy_problem = postcopy::check_source(facts)
        .err()
        .or_else(|| probed.answer.post_copy_problem.clone())
        .or_else(|| postcopy::check_criu_versions(&facts.criu_version, &probed.answer.criu_version).err());
    // Pages that could not be read (no ptrace access to the workload here)
    // say nothing: then assume it writes as fast as the link, never 0.
    let dirty_measured = sampled.sampled_pages > 0 || sampled.resident_private_bytes == 0;
    if !dirty_measured {
        tracing::warn!("auto: the workload's pages could not be read; its dirty rate is taken as the link rate");
    }
    let inputs = Inputs {
        memory_bytes: sampled.memory_bytes,
        dirty_bytes_s: if dirty_measured { sampled.dirty_bytes_s } else { probed.link_bytes_s },
        link_bytes_s: probed.link_bytes_s,
        processes: sampled.processes,
        shared_bytes: sampled.shared_bytes,
        target_freeze_ms: ctx.cfg.precopy_target_freeze.as_secs_f64() * 1000.0,
        post_copy_problem,
        // The destination's own check wants room for twice the resident memory.
        pre_copy_room: probed
            .answer
            .images_free_bytes
            .is_none_or(|f| f >= (sampled.memory_bytes + sampled.shared_bytes) * 2 + (16 << 20)),
        no_post_copy: how.no_post_copy,
    };
    let choice = choose(&inputs);
    let line = format!("{} (auto: {})", choice.mode.as_str(), choice.why);
    tracing::info!(choice = %line, "auto: mode chosen");
    let report = serde_json::json!({
        "inputs": inputs,
        "why": choice.why,
        "dirty_measured": dirty_measured,
        "sampled_pages": sampled.sampled_pages,
        "changed_pages": sampled.changed_pages,
        "probe_bytes": probed.answer.received,
        "probe_ms": probed.probe_ms,
        "measure_ms": t.elapsed().as_secs_f64() * 1000.0,
    });
    Ok(Resolved { mode: choice.mode, report: Some(report), line: Some(line), link_bytes_s: Some(probed.link_bytes_s) })
}

/// The mode a migration runs in, and for `auto`, what it measured.
pub struct Resolved {
    pub mode: Mode,
    pub report: Option<serde_json::Value>,
    pub line: Option<String>,
    /// The link rate measured (by `auto`), for the compression level.
    pub link_bytes_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn inputs(mem_mib: u64, dirty_mib_s: f64, link_mib_s: f64) -> Inputs {
        Inputs {
            memory_bytes: mem_mib * MIB,
            dirty_bytes_s: dirty_mib_s * MIB as f64,
            link_bytes_s: link_mib_s * MIB as f64,
            processes: 1,
            shared_bytes: 0,
            target_freeze_ms: 500.0,
            post_copy_problem: None,
            pre_copy_room: true,
            no_post_copy: false,
        }
    }

    #[test]
    fn small_memory_on_a_fast_link_is_stop_copy() {
        // 64 MiB at 400 MiB/s: 0.16 s on the wire.
        let c = choose(&inputs(64, 50.0, 400.0));
        assert_eq!(c.mode, Mode::StopCopy, "{c:?}");
        assert!(c.why.starts_with("64 MiB, dirty 50 MiB/s, link 400 MiB/s"), "{c:?}");
        // The same on 1 Gbit/s takes 0.58 s: more than the target.
        assert_eq!(choose(&inputs(64, 0.0, 110.0)).mode, Mode::PreCopy);
    }

    #[test]
    fn large_memory_with_a_slow_writer_is_pre_copy() {
        let c = choose(&inputs(512, 3.0, 110.0));
        assert_eq!(c.mode, Mode::PreCopy, "{c:?}");
        assert!(c.why.contains("512 MiB, dirty 3.0 MiB/s, link 110 MiB/s"), "{c:?}");
        // Exactly half the link still converges.
        assert_eq!(choose(&inputs(512, 55.0, 110.0)).mode, Mode::PreCopy);
    }

    #[test]
    fn a_fast_writer_is_post_copy_unless_ruled_out() {
        let mut i = inputs(512, 80.0, 110.0);
        assert_eq!(choose(&i).mode, Mode::PostCopy);
        // Ruled out: pre-copy while the writer is slower than the link...
        i.no_post_copy = true;
        let c = choose(&i);
        assert_eq!(c.mode, Mode::PreCopy, "{c:?}");
        assert!(c.why.contains("--no-post-copy"), "{c:?}");
        // ...stop-copy when it is as fast or faster.
        i.dirty_bytes_s = 200.0 * MIB as f64;
        assert_eq!(choose(&i).mode, Mode::StopCopy);
        // No userfaultfd at the destination.
        let mut i = inputs(512, 80.0, 110.0);
        i.post_copy_problem = Some("post-copy is not possible at this destination: no uffd".into());
        let c = choose(&i);
        assert_eq!(c.mode, Mode::PreCopy);
        assert!(c.why.contains("no uffd"), "{c:?}");
    }

    #[test]
    fn several_processes_sharing_much_memory_are_never_post_copy() {
        // 4 processes x 128 MiB shared copy-on-write: PSS 128 MiB, RSS 512 MiB.
        let mut i = inputs(128, 200.0, 110.0);
        i.processes = 4;
        i.shared_bytes = 384 * MIB;
        let c = choose(&i);
        assert_ne!(c.mode, Mode::PostCopy, "{c:?}");
        assert!(c.why.contains("4 processes share 384 MiB"), "{c:?}");
        // A little sharing (libraries) does not count.
        i.shared_bytes = 4 * MIB;
        assert_eq!(choose(&i).mode, Mode::PostCopy);
        // Nor does sharing in a single process (RSS - PSS of one is file pages shared with others).
        i.processes = 1;
        i.shared_bytes = 384 * MIB;
        assert_eq!(choose(&i).mode, Mode::PostCopy);
    }

    #[test]
    fn no_room_for_two_copies_rules_out_pre_copy() {
        let mut i = inputs(512, 3.0, 110.0);
        i.pre_copy_room = false;
        let c = choose(&i);
        assert_eq!(c.mode, Mode::PostCopy, "{c:?}");
        i.no_post_copy = true;
        let c = choose(&i);
        assert_eq!(c.mode, Mode::StopCopy, "{c:?}");
        assert!(c.why.contains("no room"), "{c:?}");
    }

    #[test]
    fn an_unmeasured_link_does_not_divide_by_zero() {
        let c = choose(&inputs(64, 0.0, 0.0));
        assert_eq!(c.mode, Mode::PreCopy, "{c:?}");
    }

    #[test]
    fn the_sample_finds_a_writer_in_this_process() {
        // This test process: a buffer rewritten by a thread while sampled.
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let buf: &'static [AtomicU64] = Box::leak((0..(1 << 20)).map(|_| AtomicU64::new(1)).collect());
        let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let w = std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                for x in buf.iter().step_by(512) {
                    x.store(k, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let s = sample_workload(&[std::process::id() as i32], Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        assert!(s.memory_bytes >= 8 << 20, "{s:?}");
        assert!(s.sampled_pages > 0 && s.changed_pages > 0, "{s:?}");
        // At least the 8 MiB buffer changed within the interval.
        assert!(s.dirty_bytes_s >= 8.0 * MIB as f64 * 0.5 / 1.0, "{s:?}");
    }
}
