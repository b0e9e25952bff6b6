//! Ships the files of an images dir while CRIU is still writing them.
//!
//! A blocking thread watches the dir with inotify (create, modify, close) and,
//! for every file that grew, reads the new bytes from where it left off and
//! hands them to the connection as data frames; a bounded channel makes a slow
//! link hold the reader back instead of buffering the dump in memory. When the
//! dump has ended (`finish`), one last sweep sends what is left and returns
//! every file's size and SHA-256, the content of the manifest.
//!
//! CRIU writes image files front to back (a buffered protobuf writer, splice
//! for pages), which is what makes "send what was appended" correct. As a
//! guard, files below `REVERIFY_BELOW` are hashed again from disk in the final
//! sweep and sent again whole if they changed behind our back.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;

use super::{FileEntry, FileKind, FileOpen};

const REVERIFY_BELOW: u64 = 1 << 20;

/// What the streamer asks the connection to send.
#[derive(Debug)]
pub enum Out {
    /// A control frame, sent in order with the data.
    Control(super::wire::Frame),
    /// Tell when everything before this point has been handed to the socket.
    Flushed(tokio::sync::oneshot::Sender<std::time::Instant>),
    Open(FileOpen),
    Data {
        id: u32,
        offset: u64,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection is gone")]
    Closed,
    #[error("unexpected entry {0} in the images dir (only regular files are streamed)")]
    NotAFile(PathBuf),
}

struct Tracked {
    id: u32,
    sent: u64,
    hash: super::FileHasher,
}

struct State {
    dir: PathBuf,
    kind: FileKind,
    next_id: u32,
    files: HashMap<String, Tracked>,
    tx: mpsc::Sender<Out>,
    bytes: u64,
}

impl State {
    /// Send whatever `name` has beyond what was sent already.
    fn pump(&mut self, name: &str) -> Result<(), StreamError> {
        self.pump_as(name, name)
    }

    /// `pump`, announcing the file under `wire_name` to the peer.
    fn pump_as(&mut self, name: &str, wire_name: &str) -> Result<(), StreamError> {
        let path = self.dir.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) => return Ok(()), // vanished (a CRIU temp file)
        };
        if !meta.is_file() {
            return if meta.is_dir() { Ok(()) } else { Err(StreamError::NotAFile(path)) };
        }
        if !self.files.contains_key(name) {
            let id = self.next_id;
            self.next_id += 1;
            self.tx
                .blocking_send(Out::Open(FileOpen { id, kind: self.kind, name: wire_name.to_string() }))
                .map_err(|_| StreamError::Closed)?;
            self.files.insert(name.to_string(), Tracked { id, sent: 0, hash: super::FileHasher::new() });
        }
        let t = self.files.get_mut(name).expect("tracked above");
        if meta.len() <= t.sent {
            return Ok(());
        }
        let read_err = |source| StreamError::Read { path: path.clone(), source };
        let mut f = std::fs::File::open(&path).map_err(read_err)?;
        f.seek(SeekFrom::Start(t.sent)).map_err(read_err)?;
        loop {
            let buf = read_chunk(&mut f).map_err(read_err)?;
            let n = buf.len();
            if n == 0 {
                break;
            }
            t.hash.update(&buf);
            let offset = t.sent;
            t.sent += n as u64;
            self.bytes += n as u64;
            self.tx.blocking_send(Out::Data { id: t.id, offset, bytes: buf }).map_err(|_| StreamError::Closed)?;
        }
        Ok(())
    }

    /// The final sweep: every file complete, small ones re-verified.
    fn finish(mut self) -> Result<(Vec<FileEntry>, u64), StreamError> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|source| StreamError::Read { path: self.dir.clone(), source })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in &names {
            self.pump(n)?;
        }
        let mut out = Vec::new();
        for n in names {
            let Some(t) = self.files.remove(&n) else { continue };
            let mut digest = super::hex_digest(&t.hash);
            let path = self.dir.join(&n);
            if t.sent < REVERIFY_BELOW {
                let disk = std::fs::read(&path).map_err(|source| StreamError::Read { path: path.clone(), source })?;
                let disk_digest = blake3::hash(&disk).to_hex().to_string();
                if disk_digest != digest || disk.len() as u64 != t.sent {
                    tracing::debug!(file = %n, "rewritten after streaming; sending it again");
                    self.tx
                        .blocking_send(Out::Open(FileOpen { id: t.id, kind: self.kind, name: n.clone() }))
                        .map_err(|_| StreamError::Closed)?;
                    for (i, chunk) in disk.chunks(super::wire::CHUNK).enumerate() {
                        self.tx
                            .blocking_send(Out::Data {
                                id: t.id,
                                offset: (i * super::wire::CHUNK) as u64,
                                bytes: chunk.to_vec(),
                            })
                            .map_err(|_| StreamError::Closed)?;
                    }
                    self.bytes += disk.len() as u64;
                    digest = disk_digest;
                }
                out.push(FileEntry { name: n, kind: self.kind, size: disk.len() as u64, blake3: digest });
            } else {
                out.push(FileEntry { name: n, kind: self.kind, size: t.sent, blake3: digest });
            }
        }
        Ok((out, self.bytes))
    }
}

/// Up to `CHUNK` bytes from the file's position. The buffer is not zeroed
/// first (`read_to_end` fills spare capacity): zeroing a fresh megabyte per
/// chunk cost as much as reading it.
fn read_chunk(f: &mut std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(super::wire::CHUNK);
    f.take(super::wire::CHUNK as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A running streamer.
pub struct Streamer {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(Vec<FileEntry>, u64), StreamError>>,
}

/// Start watching `dir` (which must exist) and streaming its files; ids start
/// at `first_id`. When `live` is false, nothing is sent until `finish` (the
/// "dump, then send" mode the benchmark compares against).
pub fn start(dir: &Path, first_id: u32, tx: mpsc::Sender<Out>, live: bool) -> Result<Streamer, StreamError> {
    let mut inotify = Inotify::init().map_err(|source| StreamError::Watch { path: dir.into(), source })?;
    inotify
        .watches()
        .add(dir, WatchMask::CREATE | WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
        .map_err(|source| StreamError::Watch { path: dir.into(), source })?;
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let mut st =
        State { dir: dir.into(), kind: FileKind::Image, next_id: first_id, files: HashMap::new(), tx, bytes: 0 };
    let thread = std::thread::Builder::new()
        .name("ums-streamer".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !flag.load(Ordering::Acquire) {
                let ready = {
                    let mut fds = [nix::poll::PollFd::new(inotify.as_fd(), nix::poll::PollFlags::POLLIN)];
                    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16)).unwrap_or(0) > 0
                };
                if !ready || !live {
                    continue;
                }
                let mut dirty: Vec<String> = Vec::new();
                if let Ok(events) = inotify.read_events(&mut buf) {
                    for ev in events {
                        if let Some(name) = ev.name {
                            let name = name.to_string_lossy().into_owned();
                            if !dirty.contains(&name) {
                                dirty.push(name);
                            }
                        }
                    }
                }
                for name in dirty {
                    st.pump(&name)?;
                }
            }
            st.finish()
        })
        .map_err(|source| StreamError::Watch { path: dir.into(), source })?;
    Ok(Streamer { done, thread })
}

impl Streamer {
    /// The dump has ended: send the rest, return the manifest entries and
    /// the number of bytes sent.
    pub fn finish(self) -> Result<(Vec<FileEntry>, u64), StreamError> {
        self.done.store(true, Ordering::Release);
        self.thread.join().unwrap_or(Err(StreamError::Closed))
    }

    /// Abandon the stream (the dump failed).
    pub fn abort(self) {
        self.done.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

/// Send one whole file (a blob, the writable layer) with id `id`.
pub fn send_file(
    path: &Path,
    id: u32,
    kind: FileKind,
    name: &str,
    tx: &mpsc::Sender<Out>,
) -> Result<FileEntry, StreamError> {
    let mut st = State {
        dir: path.parent().unwrap_or(Path::new("/")).into(),
        kind,
        next_id: id,
        files: HashMap::new(),
        tx: tx.clone(),
        bytes: 0,
    };
    let fname = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    st.pump_as(&fname, name)?;
    let t = st.files.remove(&fname).ok_or_else(|| StreamError::Read {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })?;
    Ok(FileEntry { name: name.into(), kind, size: t.sent, blake3: super::hex_digest(&t.hash) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files written while the streamer runs arrive complete and with the
    /// right digests, including a small file rewritten in place at the end.
    #[test]
    fn streams_growing_files_and_catches_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let s = start(dir.path(), 1, tx, true).unwrap();
        let mut big = std::fs::File::create(dir.path().join("pages-1.img")).unwrap();
        let mut expect = Vec::new();
        for i in 0..50u8 {
            let chunk = vec![i; 100_000];
            std::io::Write::write_all(&mut big, &chunk).unwrap();
            expect.extend_from_slice(&chunk);
            if i % 10 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        }
        std::fs::write(dir.path().join("inventory.img"), b"first").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        std::fs::write(dir.path().join("inventory.img"), b"FIRST").unwrap(); // same size, new bytes
        let (entries, _) = s.finish().unwrap();
        let mut files: HashMap<u32, (String, Vec<u8>)> = HashMap::new();
        while let Ok(o) = rx.try_recv() {
            match o {
                Out::Open(f) => {
                    files.insert(f.id, (f.name, Vec::new()));
                }
                Out::Control(_) | Out::Flushed(_) => {}
                Out::Data { id, offset, bytes } => {
                    let buf = &mut files.get_mut(&id).unwrap().1;
                    assert!(offset as usize <= buf.len());
                    buf.truncate(offset as usize);
                    buf.extend_from_slice(&bytes);
                }
            }
        }
        let got: HashMap<String, Vec<u8>> = files.into_values().collect();
        assert_eq!(got["pages-1.img"], expect);
        assert_eq!(got["inventory.img"], b"FIRST");
        let inv = entries.iter().find(|e| e.name == "inventory.img").unwrap();
        assert_eq!(inv.blake3, blake3::hash(b"FIRST").to_hex().to_string());
        let pages = entries.iter().find(|e| e.name == "pages-1.img").unwrap();
        assert_eq!(pages.size, expect.len() as u64);
    }
}
