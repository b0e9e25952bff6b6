//! Line-by-line capture of a child's stdout and stderr.
//!
//! The end-to-end tests judge `ums` and the workload by what they print, so a
//! test must be able to wait for a line ("tick 12", "sum ...") with a timeout
//! instead of sleeping. Reader threads append every line to one shared log and
//! wake the waiters; each line is also echoed to the test's stderr with a tag
//! (the test harness shows it when a test fails, or with `--nocapture`).

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    lines: Vec<String>,
    open_streams: usize,
    attached_streams: usize,
}

/// A shared, growing list of output lines. Cloning shares the same log.
#[derive(Clone, Default)]
pub struct LineLog {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl LineLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `stream` line by line in a thread until EOF, appending to the log.
    pub fn capture<R: Read + Send + 'static>(&self, stream: R, tag: String) -> JoinHandle<()> {
        let log = self.clone();
        {
            let mut state = log.inner.0.lock().unwrap();
            state.open_streams += 1;
            state.attached_streams += 1;
        }
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                        eprintln!("[{tag}] {line}");
                        log.push(line);
                    }
                }
            }
            let (lock, cvar) = &*log.inner;
            lock.lock().unwrap().open_streams -= 1;
            cvar.notify_all();
        })
    }

    /// Appends a line (readers do this; tests may add markers).
    pub fn push(&self, line: String) {
        let (lock, cvar) = &*self.inner;
        lock.lock().unwrap().lines.push(line);
        cvar.notify_all();
    }

    /// A copy of all lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Number of lines so far (an index to pass to [`LineLog::wait_for_from`]).
    pub fn len(&self) -> usize {
        self.inner.0.lock().unwrap().lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the first line, at index `from` or later, that contains
    /// `pattern`; returns its index and text. Fails on timeout, or once every
    /// captured stream has closed without such a line.
    pub fn wait_for_from(&self, from: usize, pattern: &str, timeout: Duration) -> anyhow::Result<(usize, String)> {
        self.wait_until(from, timeout, |l| l.contains(pattern))
            .map_err(|e| anyhow::anyhow!("waiting for a line containing {pattern:?}: {e}"))
    }

    /// Waits for the first line at index `from` or later that satisfies `pred`.
    pub fn wait_until(
        &self,
        from: usize,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut state = lock.lock().unwrap();
        let mut next = from;
        loop {
            while next < state.lines.len() {
                if pred(&state.lines[next]) {
                    return Ok((next, state.lines[next].clone()));
                }
                next += 1;
            }
            if state.attached_streams > 0 && state.open_streams == 0 {
                anyhow::bail!("output closed after {} lines", state.lines.len());
            }
            let now = Instant::now();
            if now >= deadline {
                anyhow::bail!("timed out after {timeout:?} ({} lines so far)", state.lines.len());
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}
