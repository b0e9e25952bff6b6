//! The progress of the outgoing migration under way, for `ums status`
//! (`operation.progress`), which `ums migrate` polls to draw its progress
//! bar on a terminal: the phase, the data bytes sent so far and over the
//! phase, the rate, and how many bytes the phase is expected to move.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::compress::Codec;

struct Current {
    phase: String,
    since: Instant,
    /// Data bytes sent when the phase began.
    at_start: u64,
    /// Bytes the phase is expected to move, when known.
    expected: Option<u64>,
    codec: Option<Arc<Codec>>,
}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);

/// The outgoing migration's progress; cleared when dropped.
pub struct Tracker(());

impl Tracker {
    pub fn begin(phase: &str) -> Tracker {
        *CURRENT.lock().expect("progress") =
            Some(Current { phase: phase.into(), since: Instant::now(), at_start: 0, expected: None, codec: None });
        Tracker(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        *CURRENT.lock().expect("progress") = None;
    }
}

/// The connection's counters, once it is open.
pub fn attach(codec: &Arc<Codec>) {
    if let Some(c) = CURRENT.lock().expect("progress").as_mut() {
        c.codec = Some(codec.clone());
    }
}

/// A new phase, expected to move about `expected` data bytes.
pub fn phase(name: &str, expected: Option<u64>) {
    if let Some(c) = CURRENT.lock().expect("progress").as_mut() {
        c.at_start = c.codec.as_ref().map(|k| k.raw.load(Ordering::Relaxed)).unwrap_or(0);
        c.phase = name.into();
        c.since = Instant::now();
        c.expected = expected;
    }
}

/// For `status`: null when no migration goes out.
pub fn status() -> serde_json::Value {
    let g = CURRENT.lock().expect("progress");
    let Some(c) = g.as_ref() else { return serde_json::Value::Null };
    let (data, wire) =
        c.codec.as_ref().map(|k| (k.raw.load(Ordering::Relaxed), k.wire.load(Ordering::Relaxed))).unwrap_or((0, 0));
    let in_phase = data.saturating_sub(c.at_start);
    let secs = c.since.elapsed().as_secs_f64();
    let rate = if secs > 0.2 { in_phase as f64 / secs } else { 0.0 };
    serde_json::json!({
        "phase": c.phase,
        "phase_s": secs,
        "data_bytes": data,
        "wire_bytes": wire,
        "phase_bytes": in_phase,
        "phase_expected_bytes": c.expected,
        "rate_bytes_s": rate,
        "eta_s": eta(in_phase, c.expected, rate),
    })
}

/// Seconds left at `rate` for the bytes still expected, if it can be told.
pub fn eta(done: u64, expected: Option<u64>, rate: f64) -> Option<f64> {
    let left = expected?.checked_sub(done)?;
    (rate > 0.0).then(|| left as f64 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_only_when_it_can_be_told() {
        assert_eq!(eta(50, Some(150), 10.0), Some(10.0));
        assert_eq!(eta(50, None, 10.0), None);
        assert_eq!(eta(200, Some(150), 10.0), None);
        assert_eq!(eta(0, Some(150), 0.0), None);
    }

    #[test]
    fn status_follows_the_tracker() {
        assert!(status().is_null());
        let t = Tracker::begin("measuring");
        assert_eq!(status()["phase"], "measuring");
        let codec = Arc::new(Codec::default());
        attach(&codec);
        codec.count(1000, 400, true);
        phase("frozen: dump and transfer", Some(5000));
        codec.count(2000, 2012, false);
        let s = status();
        assert_eq!(s["phase"], "frozen: dump and transfer");
        assert_eq!((s["data_bytes"].as_u64(), s["phase_bytes"].as_u64()), (Some(3000), Some(2000)));
        assert_eq!(s["wire_bytes"].as_u64(), Some(2412));
        drop(t);
        assert!(status().is_null());
    }
}
