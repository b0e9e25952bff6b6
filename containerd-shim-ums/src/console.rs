//! Terminals (`ctr run -t`): runc creates the pty and sends its master end
//! to a Unix socket of the shim (`runc create --console-socket`); the shim
//! copies between it and containerd's FIFOs, and `ResizePty` sets its size.

use std::fs::{File, OpenOptions};
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// A socket runc connects to once, to hand over the terminal's master.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Under the temp dir: a bundle path can be longer than a socket path may be.
    pub fn new() -> std::io::Result<ConsoleSocket> {
        let path =
            std::env::temp_dir().join(format!("ums-shim-console-{}-{:08x}.sock", std::process::id(), rand_u32()));
        let listener = UnixListener::bind(&path)?;
        Ok(ConsoleSocket { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master runc sent (call after `runc create` returned: it has
    /// connected and sent it by then).
    pub fn receive(&self) -> std::io::Result<OwnedFd> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        self.listener.set_nonblocking(true)?;
        let (stream, _) = self.listener.accept()?;
        stream.set_nonblocking(false)?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed this descriptor in
                    // our table for us; nothing else owns or closes it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(std::io::Error::other("runc sent no terminal on the console socket"))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}

/// Copy the master to the stdout FIFO and the stdin FIFO to the master;
/// returns the master for `ResizePty`.
pub fn attach(master: OwnedFd, stdin: &str, stdout: &str) -> std::io::Result<(File, std::sync::mpsc::Receiver<()>)> {
    let master = File::from(master);
    let (token, copies) = std::sync::mpsc::channel::<()>();
    if !stdout.is_empty() {
        let mut out = OpenOptions::new().read(true).write(true).open(stdout)?;
        let mut from = master.try_clone()?;
        std::thread::Builder::new().name("console-out".into()).spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            // EIO once the last process holding the terminal is gone.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            drop(token);
        })?;
    }
    if !stdin.is_empty() {
        let fifo = stdin.to_string();
        let mut to = master.try_clone()?;
        std::thread::Builder::new().name("console-in".into()).spawn(move || {
            let Ok(mut f) = File::open(&fifo) else { return };
            let _ = std::io::copy(&mut f, &mut to);
        })?;
    }
    Ok((master, copies))
}

/// `ResizePty`: the terminal's rows and columns.
pub fn resize(master: &File, width: u32, height: u32) -> std::io::Result<()> {
    let ws = libc::winsize { ws_row: height as u16, ws_col: width as u16, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives
    // across the call; the descriptor is an open pty master.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_hands_over_a_descriptor_and_is_removed() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let s = ConsoleSocket::new().unwrap();
        let path = s.path().to_path_buf();
        let (r, w) = nix::unistd::pipe().unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let fds = [r.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"pty")];
        sendmsg::<()>(client.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
        let got = s.receive().unwrap();
        // The received end reads what the pipe's write end writes.
        let mut w = File::from(w);
        w.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        File::from(got).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        drop(s);
        assert!(!path.exists());
    }
}
