//! The one owner of `waitpid(-1)`. A PID 1 must reap every orphan, and a second
//! waiter (`Child::wait`) racing it would get ECHILD; so every process `ums`
//! starts is registered here and learns its exit through a channel instead.
//!
//! One task listens for SIGCHLD and the forwarded signals: on
//! SIGCHLD it reaps everything that has exited and hands each status to whoever
//! registered that pid (or keeps it a while for a late registration); other
//! signals go to the supervisor's channel.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

/// How a process ended, decoded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell convention: the exit code, or 128+N for death by signal N.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// Decode a wait status; `None` for stops and continues, which are not exits.
pub fn decode(status: WaitStatus) -> Option<(i32, Exit)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), Exit::Code(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), Exit::Signal(sig as i32))),
        _ => None,
    }
}

/// Exit statuses nobody asked for yet are kept this long (by count), so a
/// registration that comes right after a fast exit still gets its status.
const UNCLAIMED_KEEP: usize = 4096;

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, Exit>,
    unclaimed_order: VecDeque<i32>,
    orphans_reaped: u64,
}

impl Registry {
    fn deliver(&mut self, pid: i32, exit: Exit) {
        if let Some(tx) = self.waiting.remove(&pid) {
            let _ = tx.send(exit);
            return;
        }
        self.orphans_reaped += 1;
        if self.unclaimed.insert(pid, exit).is_none() {
            self.unclaimed_order.push_back(pid);
        }
        while self.unclaimed_order.len() > UNCLAIMED_KEEP {
            if let Some(old) = self.unclaimed_order.pop_front() {
                self.unclaimed.remove(&old);
            }
        }
    }

    fn watch(&mut self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        if let Some(exit) = self.unclaimed.remove(&pid) {
            self.unclaimed_order.retain(|p| *p != pid);
            self.orphans_reaped = self.orphans_reaped.saturating_sub(1);
            let _ = tx.send(exit);
        } else {
            self.waiting.insert(pid, tx);
        }
        rx
    }
}

/// Handle to the reaper; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

impl Reaper {
    /// Start the reaper task on the current tokio runtime. It listens for
    /// SIGCHLD and the forwarded signals with handlers (not a blocked mask:
    /// a blocked mask is inherited by runc and then by the workload, which
    /// would never see SIGUSR1), reaps on every SIGCHLD and passes the other
    /// signals to `signals`.
    pub fn start(signals: mpsc::UnboundedSender<Signal>) -> std::io::Result<Reaper> {
        use tokio::signal::unix::{signal, SignalKind};
        let reaper = Reaper { registry: Arc::default() };
        let mut chld = signal(SignalKind::child())?;
        let mut streams = Vec::new();
        for s in crate::sys::FORWARDED {
            streams.push((s, signal(SignalKind::from_raw(s as i32))?));
        }
        let registry = reaper.registry.clone();
        tokio::spawn(async move {
            loop {
                let forwarded = futures_select(&mut streams);
                tokio::select! {
                    _ = chld.recv() => reap_all(&registry),
                    sig = forwarded => {
                        let _ = signals.send(sig);
                    }
                }
            }
        });
        // Children may have exited before the handler was installed.
        reap_all(&reaper.registry);
        Ok(reaper)
    }

    /// Learn when `pid` exits. Safe to call after the process already exited.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let rx = self.registry.lock().expect("reaper registry").watch(pid);
        rx
    }

    /// How many processes were reaped that nobody had registered (orphans).
    pub fn orphans_reaped(&self) -> u64 {
        self.registry.lock().expect("reaper registry").orphans_reaped
    }

    /// A reaper for tests that do not run the signal thread: reaps on demand.
    pub fn poll_now(&self) {
        reap_all(&self.registry);
    }
}

/// Wait for the first of several signal streams.
async fn futures_select(streams: &mut [(Signal, tokio::signal::unix::Signal)]) -> Signal {
    std::future::poll_fn(|cx| {
        for (sig, s) in streams.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*sig);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn reap_all(registry: &Mutex<Registry>) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => break,
            Ok(status) => {
                if let Some((pid, exit)) = decode(status) {
                    registry.lock().expect("reaper registry").deliver(pid, exit);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break, // ECHILD: nothing left
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let p = Pid::from_raw(42);
        assert_eq!(decode(WaitStatus::Exited(p, 3)), Some((42, Exit::Code(3))));
        let (_, e) = decode(WaitStatus::Signaled(p, Signal::SIGKILL, false)).unwrap();
        assert_eq!(e.code(), 137);
        let (_, e) = decode(WaitStatus::Signaled(p, Signal::SIGTERM, true)).unwrap();
        assert_eq!(e.code(), 143);
        assert_eq!(decode(WaitStatus::Stopped(p, Signal::SIGSTOP)), None);
        assert!(Exit::Code(0).success());
        assert!(!Exit::Signal(9).success());
        assert_eq!(Exit::Signal(9).to_string(), "killed by SIGKILL");
    }

    #[test]
    fn a_late_registration_still_gets_the_status() {
        let mut r = Registry::default();
        r.deliver(7, Exit::Code(1));
        assert_eq!(r.orphans_reaped, 1);
        let mut rx = r.watch(7);
        assert_eq!(rx.try_recv().unwrap(), Exit::Code(1));
        assert_eq!(r.orphans_reaped, 0);
        let mut rx = r.watch(8);
        r.deliver(8, Exit::Signal(15));
        assert_eq!(rx.try_recv().unwrap(), Exit::Signal(15));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let mut r = Registry::default();
        for pid in 0..(UNCLAIMED_KEEP as i32 + 10) {
            r.deliver(pid, Exit::Code(0));
        }
        assert_eq!(r.unclaimed.len(), UNCLAIMED_KEEP);
        assert!(!r.unclaimed.contains_key(&0));
    }
}
