//! A task's stdio through containerd's FIFOs.
//!
//! The workload gets pipes, as under `ums init` (CRIU can dump pipes, not a
//! FIFO of the host: DESIGN.md, "Can't lookup mount"). Threads copy between
//! the pipes and the FIFOs containerd made (`ctr` and the CRI's log files
//! read them). An output FIFO is opened read-write, so opening never waits
//! for a reader and a reader that goes away never makes the workload's
//! writes fail (containerd's own runc shim keeps a read end open too).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

/// The write end of the workload's stdin pipe, shared with `CloseIO`.
pub type StdinHandle = Arc<Mutex<Option<File>>>;

/// The ends that go to the workload, the handle on its stdin, and the end
/// of its output copies: `recv` fails once every copy thread has ended.
pub struct Io {
    pub child: [Stdio; 3],
    pub stdin: Option<StdinHandle>,
    pub copies: std::sync::mpsc::Receiver<()>,
}

/// Held by each output copy thread until it has written everything.
pub type CopyToken = std::sync::mpsc::Sender<()>;

/// Wait (at most `limit`) until every copy thread holding a token of
/// `copies` has ended: a process's last output reaches its FIFO before
/// containerd hears that it exited.
pub fn wait_copies(copies: &std::sync::mpsc::Receiver<()>, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match copies.recv_timeout(left) {
            Ok(()) => continue,
            Err(_) => return, // disconnected (all done) or timed out
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Pipes for the three FIFOs (an empty path: /dev/null for that stream).
pub fn open(stdin: &str, stdout: &str, stderr: &str) -> std::io::Result<Io> {
    let (token, copies) = std::sync::mpsc::channel();
    let (child_in, handle) = if stdin.is_empty() {
        (Stdio::null(), None)
    } else {
        let (r, w) = pipe()?;
        let handle: StdinHandle = Arc::new(Mutex::new(Some(File::from(w))));
        copy_stdin(stdin.to_string(), handle.clone());
        (Stdio::from(r), Some(handle))
    };
    let out = output(stdout, &token)?;
    let err = if stderr == stdout && !stderr.is_empty() {
        // One FIFO for both (a terminal would do this): share the pipe.
        match &out {
            Some(w) => Some(w.try_clone()?),
            None => None,
        }
    } else {
        output(stderr, &token)?
    };
    let to_stdio = |w: Option<OwnedFd>| w.map(Stdio::from).unwrap_or_else(Stdio::null);
    Ok(Io { child: [child_in, to_stdio(out), to_stdio(err)], stdin: handle, copies })
}

/// The write end of a pipe whose read end a thread copies into `fifo`.
fn output(fifo: &str, token: &CopyToken) -> std::io::Result<Option<OwnedFd>> {
    if fifo.is_empty() {
        return Ok(None);
    }
    let f = OpenOptions::new().read(true).write(true).open(Path::new(fifo))?;
    let (r, w) = pipe()?;
    let name = format!("stdio-out {fifo}");
    let token = token.clone();
    std::thread::Builder::new().name(name).spawn(move || {
        pump(File::from(r), f);
        drop(token);
    })?;
    Ok(Some(w))
}

/// Copy until the workload side closes; each read is written at once.
fn pump(mut from: File, mut to: File) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    // Keep draining, so the workload never blocks on a dead reader.
                    continue;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// Copy the stdin FIFO into the pipe until its writer closes it or
/// `CloseIO` takes the pipe away.
fn copy_stdin(fifo: String, handle: StdinHandle) {
    let _ = std::thread::Builder::new().name("stdio-in".into()).spawn(move || {
        // Blocks until the client opens its end.
        let Ok(mut f) = File::open(&fifo) else {
            handle.lock().map(|mut h| h.take()).ok();
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut h = match handle.lock() {
                Ok(h) => h,
                Err(_) => break,
            };
            let written = h.as_mut().map(|w| w.write_all(&buf[..n]).is_ok());
            if written != Some(true) {
                break;
            }
        }
        handle.lock().map(|mut h| h.take()).ok();
    });
}

/// `CloseIO`: the workload sees the end of its stdin.
pub fn close_stdin(handle: &StdinHandle) {
    if let Ok(mut h) = handle.lock() {
        h.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_fifo_and_stdin_closes() {
        let dir = std::env::temp_dir().join(format!("ums-shim-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        nix::unistd::mkfifo(&out, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = OpenOptions::new().read(true).custom_flags_nonblock().open(&out).unwrap();
        let io = open("", out.to_str().unwrap(), "").unwrap();
        let [_, o, _] = io.child;
        let mut child = std::process::Command::new("sh").args(["-c", "echo hello"]).stdout(o).spawn().unwrap();
        child.wait().unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !got.ends_with(b"hello\n") && std::time::Instant::now() < deadline {
            let mut buf = [0u8; 64];
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        assert_eq!(got, b"hello\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    trait NonBlock {
        fn custom_flags_nonblock(&mut self) -> &mut Self;
    }
    impl NonBlock for OpenOptions {
        fn custom_flags_nonblock(&mut self) -> &mut Self {
            use std::os::unix::fs::OpenOptionsExt;
            self.custom_flags(libc::O_NONBLOCK)
        }
    }
}
