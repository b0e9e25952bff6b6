//! Shared pieces of ums-bench: options, progress messages, interrupts,
//! waiting for lines, statistics and tables.

use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use ums_e2e::{parse_tick, LineLog, Tick};

/// The workload's print interval.
pub const TICK_MS: f64 = 100.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Where progress messages go: the original stderr (saved before the outer
/// containers' echoed lines were redirected to the log file).
static PROGRESS: Mutex<Option<File>> = Mutex::new(None);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops waits on Ctrl-C or SIGTERM so that everything made is dropped
/// (and removed) instead of left behind.
pub fn install_interrupt_handlers() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_interrupt), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &action) }.with_context(|| format!("install a {sig} handler"))?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

pub fn set_progress(f: File) {
    *PROGRESS.lock().unwrap() = Some(f);
}

/// A progress line (to the terminal's stderr, never to the log file).
pub fn progress(msg: &str) {
    let mut g = PROGRESS.lock().unwrap();
    match g.as_mut() {
        Some(f) => {
            let _ = writeln!(f, "ums-bench: {msg}");
        }
        None => eprintln!("ums-bench: {msg}"),
    }
}

pub fn unix_ms_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits for a line containing `pattern` at index `from` or later, in short
/// slices so that Ctrl-C ends the wait.
pub fn wait_line(log: &LineLog, from: usize, pattern: &str, timeout: Duration) -> anyhow::Result<(usize, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let slice = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
        match log.wait_for_from(from, pattern, slice) {
            Ok(found) => return Ok(found),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) if e.to_string().contains("output closed") => return Err(e),
            Err(_) => {}
        }
    }
}

/// The first tick line at index `from` or later.
pub fn wait_tick(log: &LineLog, from: usize, timeout: Duration) -> anyhow::Result<(usize, Tick)> {
    let (i, line) = wait_line(log, from, "tick ", timeout)?;
    let t = parse_tick(&line).with_context(|| format!("unreadable tick line {line:?}"))?;
    Ok((i, t))
}

/// Tick lines from index `from` on.
pub fn ticks(log: &LineLog, from: usize) -> Vec<Tick> {
    log.lines().get(from..).unwrap_or(&[]).iter().filter_map(|l| parse_tick(l)).collect()
}

/// The `result` object of a `--json` reply of the ums CLI.
pub fn json_result(text: &str) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))?;
    if v["ok"] != serde_json::Value::Bool(true) {
        bail!("ums replied with an error: {text}");
    }
    Ok(v["result"].clone())
}

pub fn field(v: &serde_json::Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().with_context(|| format!("no number {key:?} in {v}"))
}

/// Median, minimum and maximum of some samples.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(samples: &[f64]) -> Option<Stat> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Stat { median, min: v[0], max: v[n - 1], n })
}

/// A number with as many decimals as its size deserves.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median (min–max)`, or `-` without samples; a single sample is shown alone.
pub fn fmt_stat(samples: &[f64]) -> String {
    match stat(samples) {
        None => "-".into(),
        Some(s) if s.n == 1 => num(s.median),
        Some(s) => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
    }
}

/// `median (min–max)` with a fixed number of decimals.
pub fn fmt_stat_dp(samples: &[f64], dp: usize) -> String {
    match stat(samples) {
        None => "-".into(),
        Some(s) if s.n == 1 => format!("{:.dp$}", s.median),
        Some(s) => format!("{:.dp$} ({:.dp$}–{:.dp$})", s.median, s.min, s.max),
    }
}

pub fn median(samples: &[f64]) -> Option<f64> {
    stat(samples).map(|s| s.median)
}

/// A plain-text table: first column left-aligned, the others right-aligned.
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Table {
            title: title.into(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, text: &str) {
        self.notes.push(text.into());
    }

    pub fn print(&self) {
        let cols = self.headers.len();
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, width) in w.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = width.saturating_sub(c.chars().count());
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_string()
        };
        let total: usize = w.iter().sum::<usize>() + 2 * (cols.saturating_sub(1));
        println!("\n{}", self.title);
        println!("{}", line(&self.headers));
        println!("{}", "-".repeat(total));
        for r in &self.rows {
            println!("{}", line(r));
        }
        for n in &self.notes {
            println!("  {n}");
        }
        let _ = std::io::stdout().flush();
    }
}
