//! A byte stream between a local socket and a peer that survives a cut
//! connection: the post-copy page link (CRIU's page server at the source,
//! the lazy-pages daemon at the destination) carried over a TLS connection
//! that may be replaced by a new one at any moment.
//!
//! Each side numbers the bytes it read from its local socket (the stream
//! offset) and keeps those the peer has not acknowledged. On the wire:
//! - `Data` frames with file id 0 and the stream offset of their bytes; an
//!   empty one marks the end of the sender's stream;
//! - `PageAck` frames, 9 bytes: the count of bytes received (u64, big
//!   endian) and a flag for "your end of stream arrived". They are sent
//!   every quarter of the idle deadline too, so they double as heartbeats.
//!
//! After a reconnection each side learns what the other received (in the
//! page link's hello and its answer) and sends again from there; bytes that
//! arrive twice are dropped by offset. Nothing is lost as long as both
//! processes live.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::wire::{self, Kind};

/// Bytes read from the local socket and not yet acknowledged, at most: the
/// local side is not read while this much waits.
pub const MAX_UNACKED: u64 = 32 << 20;
/// Bytes per data frame.
const CHUNK: usize = 256 << 10;
/// An acknowledgement at least after this many bytes received.
const ACK_EVERY: u64 = 1 << 20;

/// How one connection's part of the stream ended.
#[derive(Debug)]
pub enum End<T> {
    /// Both directions ended and each side has all of the other's bytes.
    Done,
    /// The connection failed or went silent: resume on a new one.
    Lost(String),
    /// A newer connection arrived (the peer found this one dead first).
    Superseded(T),
}

/// One side of a resumable stream; it owns the local socket.
pub struct Resumable {
    local_r: OwnedReadHalf,
    /// Bytes for the local socket, written by a task of their own so that a
    /// slow local reader never stalls acknowledgements and heartbeats.
    to_local: Option<mpsc::UnboundedSender<Vec<u8>>>,
    local_writer: tokio::task::JoinHandle<()>,
    /// Chunks read locally and not acknowledged; `base` is the stream
    /// offset of the first byte of the first one.
    unacked: VecDeque<Vec<u8>>,
    base: u64,
    /// Stream offset of the next byte read locally.
    read: u64,
    local_eof: bool,
    eof_acked: bool,
    /// Bytes of the peer's stream received (handed to the local writer).
    received: u64,
    peer_eof: bool,
    /// Counters for reports: bytes read locally, bytes received.
    pub count_out: Arc<AtomicU64>,
    pub count_in: Arc<AtomicU64>,
}

impl Drop for Resumable {
    fn drop(&mut self) {
        self.local_writer.abort();
    }
}

/// A failed write to the connection: it is lost (not a protocol error).
macro_rules! lost {
    ($e:expr) => {
        if let Err(e) = $e {
            return Ok(End::Lost(e));
        }
    };
}

impl Resumable {
    /// `shutdown_local_on_eof`: when the peer's stream ends, end the local
    /// socket's write side too (at the source, so CRIU's page server sees
    /// the daemon leave; the daemon's side is kept open instead).
    pub fn new(local: TcpStream, shutdown_local_on_eof: bool) -> Resumable {
        let _ = local.set_nodelay(true);
        let (local_r, mut local_w) = local.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let local_writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if local_w.write_all(&b).await.is_err() || local_w.flush().await.is_err() {
                    return;
                }
            }
            if shutdown_local_on_eof {
                let _ = local_w.shutdown().await;
            } else {
                // Held open until the stream is dropped.
                std::future::pending::<()>().await;
            }
        });
        Resumable {
            local_r,
            to_local: Some(tx),
            local_writer,
            unacked: VecDeque::new(),
            base: 0,
            read: 0,
            local_eof: false,
            eof_acked: false,
            received: 0,
            peer_eof: false,
            count_out: Arc::new(AtomicU64::new(0)),
            count_in: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes of the peer's stream received so far (what a new connection's
    /// hello tells the peer).
    pub fn received(&self) -> u64 {
        self.received
    }

    fn unacked_bytes(&self) -> u64 {
        self.read - self.base
    }

    /// Forget what the peer says it has.
    fn trim(&mut self, acked: u64) -> Result<(), String> {
        if acked > self.read {
            return Err(format!("the peer acknowledged {acked} bytes, more than the {} sent", self.read));
        }
        while self.base < acked {
            let Some(front) = self.unacked.front_mut() else { break };
            let skip = (acked - self.base) as usize;
            if skip >= front.len() {
                self.base += front.len() as u64;
                self.unacked.pop_front();
            } else {
                front.drain(..skip);
                self.base += skip as u64;
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.local_eof && self.eof_acked && self.peer_eof
    }

    async fn send_ack(&self, w: &mut (impl AsyncWrite + Unpin), idle: Duration) -> Result<(), String> {
        let mut p = [0u8; 9];
        p[..8].copy_from_slice(&self.received.to_be_bytes());
        p[8] = self.peer_eof as u8;
        timed(idle, async {
            wire::write_frame(w, Kind::PageAck, &[&p]).await?;
            w.flush().await?;
            Ok(())
        })
        .await
    }

    /// Carry the stream over one connection until it ends, fails, goes
    /// silent for `idle`, or `newer` yields a replacement. `peer_received`
    /// is what the peer said it has: everything after it is sent again.
    pub async fn run<T>(
        &mut self,
        conn_r: impl AsyncRead + Unpin + Send + 'static,
        conn_w: impl AsyncWrite + Unpin,
        peer_received: u64,
        idle: Duration,
        newer: &mut (impl Future<Output = T> + Unpin),
    ) -> Result<End<T>, String> {
        let mut conn_w = conn_w;
        if peer_received < self.base {
            return Err(format!(
                "the peer has {peer_received} bytes, fewer than the {} it acknowledged before",
                self.base
            ));
        }
        self.trim(peer_received)?;
        // The frames of this connection, read by a task (a frame read is not
        // cancel-safe, so it is not raced against the rest).
        let (ftx, mut frames) = mpsc::channel(8);
        let reader = tokio::spawn(async move {
            let mut r = tokio::io::BufReader::with_capacity(wire::SMALL_BUF, conn_r);
            loop {
                let f = wire::read_frame(&mut r).await;
                let stop = f.is_err();
                if ftx.send(f).await.is_err() || stop {
                    return;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let end = self.carry(&mut frames, &mut conn_w, idle, newer).await;
        if let Ok(End::Lost(why)) = end {
            // Frames that came before the connection failed still count: the
            // peer's last acknowledgement may be among them, and with it the
            // end of the stream.
            while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_millis(100), frames.recv()).await {
                if self.on_frame(f).is_err() {
                    break;
                }
            }
            return Ok(if self.done() { End::Done } else { End::Lost(why) });
        }
        end
    }

    /// [`Resumable::run`] on a connection whose frames arrive on `frames`.
    async fn carry<T>(
        &mut self,
        frames: &mut mpsc::Receiver<Result<wire::Frame, wire::WireError>>,
        mut conn_w: impl AsyncWrite + Unpin,
        idle: Duration,
        newer: &mut (impl Future<Output = T> + Unpin),
    ) -> Result<End<T>, String> {
        // Send again what the peer lacks.
        let mut off = self.base;
        for c in &self.unacked {
            for part in c.chunks(CHUNK) {
                lost!(send_data(&mut conn_w, off, part, idle).await);
                off += part.len() as u64;
            }
        }
        if self.local_eof && !self.eof_acked {
            lost!(send_data(&mut conn_w, self.read, &[], idle).await);
        }
        lost!(self.send_ack(&mut conn_w, idle).await);
        let (mut acked_sent, mut told_eof) = (self.received, self.peer_eof);
        let tick = (idle / 4).max(Duration::from_millis(10));
        let mut next_tick = Instant::now() + tick;
        let mut last_heard = Instant::now();
        let mut buf = vec![0u8; CHUNK];
        loop {
            if self.done() {
                // The peer may still lack our word that its end arrived.
                lost!(self.send_ack(&mut conn_w, idle).await);
                return Ok(End::Done);
            }
            let room = !self.local_eof && self.unacked_bytes() < MAX_UNACKED;
            tokio::select! {
                n = self.local_r.read(&mut buf), if room => {
                    let n = n.map_err(|e| format!("local socket: {e}"))?;
                    // Kept (and counted) before it is sent: a failed send
                    // sends it again on the next connection.
                    let at = self.read;
                    if n == 0 {
                        self.local_eof = true;
                    } else {
                        self.unacked.push_back(buf[..n].to_vec());
                        self.read += n as u64;
                        self.count_out.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    lost!(send_data(&mut conn_w, at, &buf[..n], idle).await);
                }
                f = frames.recv() => {
                    let f = match f {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => return Ok(End::Lost(format!("page link: {e}"))),
                        None => return Ok(End::Lost("page link: reader ended".into())),
                    };
                    last_heard = Instant::now();
                    let data = self.on_frame(f)?;
                    if data && (self.received - acked_sent >= ACK_EVERY || (self.peer_eof && !told_eof)) {
                        lost!(self.send_ack(&mut conn_w, idle).await);
                        (acked_sent, told_eof) = (self.received, self.peer_eof);
                    }
                }
                _ = tokio::time::sleep_until(next_tick) => {
                    next_tick = Instant::now() + tick;
                    if last_heard.elapsed() >= idle {
                        return Ok(End::Lost(format!("page link: nothing heard for {idle:?}")));
                    }
                    lost!(self.send_ack(&mut conn_w, idle).await);
                    (acked_sent, told_eof) = (self.received, self.peer_eof);
                }
                n = &mut *newer => return Ok(End::Superseded(n)),
            }
        }
    }

    /// A frame from the peer; says whether it carried stream bytes (which
    /// may call for an acknowledgement).
    fn on_frame(&mut self, f: wire::Frame) -> Result<bool, String> {
        match f.kind {
            Kind::Data => {
                let (_, at, bytes) = wire::parse_data(&f.payload).map_err(|e| e.to_string())?;
                self.take(at, bytes)?;
                Ok(true)
            }
            Kind::PageAck => {
                let (got, eof) = parse_ack(&f.payload)?;
                self.trim(got)?;
                if eof && self.local_eof && got == self.read {
                    self.eof_acked = true;
                }
                Ok(false)
            }
            Kind::Error => {
                let e: wire::ErrorMsg = f.parse().map_err(|e| e.to_string())?;
                Err(format!("the peer ended the page link: {}", e.message))
            }
            k => Err(format!("unexpected {k:?} frame on the page link")),
        }
    }

    /// Bytes of the peer's stream at offset `at`; repeats are dropped.
    fn take(&mut self, at: u64, bytes: &[u8]) -> Result<(), String> {
        if at > self.received {
            return Err(format!("page link: bytes at {at} while {} were received (a gap)", self.received));
        }
        if bytes.is_empty() {
            if at == self.received && !self.peer_eof {
                self.peer_eof = true;
                // Ends the local writer once it wrote everything before.
                self.to_local = None;
            }
            return Ok(());
        }
        let end = at + bytes.len() as u64;
        if end <= self.received {
            return Ok(());
        }
        let fresh = &bytes[(self.received - at) as usize..];
        if let Some(tx) = &self.to_local {
            let _ = tx.send(fresh.to_vec());
        }
        self.received = end;
        self.count_in.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn timed(idle: Duration, f: impl Future<Output = Result<(), wire::WireError>>) -> Result<(), String> {
    match tokio::time::timeout(idle, f).await {
        Ok(r) => r.map_err(|e| format!("page link: {e}")),
        Err(_) => Err(format!("page link: a write took longer than {idle:?}")),
    }
}

async fn send_data(w: &mut (impl AsyncWrite + Unpin), at: u64, bytes: &[u8], idle: Duration) -> Result<(), String> {
    timed(idle, async {
        wire::write_frame(w, Kind::Data, &[&wire::data_header(0, at), bytes]).await?;
        w.flush().await?;
        Ok(())
    })
    .await
}

fn parse_ack(p: &[u8]) -> Result<(u64, bool), String> {
    if p.len() != 9 {
        return Err(format!("page link: an acknowledgement of {} bytes (9 expected)", p.len()));
    }
    Ok((u64::from_be_bytes(p[..8].try_into().expect("8 bytes")), p[8] != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected loopback pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Runs side `rs` over the connections that `conns` yields until done.
    /// Each connection starts as the page link's does: both sides say how
    /// many bytes they received. A lost connection is reported on `lost`,
    /// and the side waits for the next one.
    async fn side(
        mut rs: Resumable,
        mut conns: mpsc::Receiver<TcpStream>,
        lost: mpsc::UnboundedSender<()>,
        idle: Duration,
    ) -> (Resumable, u32) {
        let mut s = conns.recv().await.expect("a first connection");
        let mut losses = 0;
        loop {
            s.write_all(&rs.received().to_be_bytes()).await.unwrap();
            let mut p = [0u8; 8];
            if s.read_exact(&mut p).await.is_err() {
                let _ = lost.send(());
                s = conns.recv().await.expect("a new connection after a loss");
                continue;
            }
            let (r, w) = s.into_split();
            let mut next = Box::pin(conns.recv());
            match rs.run(r, w, u64::from_be_bytes(p), idle, &mut next).await.expect("no protocol error") {
                End::Done => return (rs, losses),
                End::Superseded(Some(s2)) => s = s2,
                End::Superseded(None) => panic!("no more connections"),
                End::Lost(_) => {
                    losses += 1;
                    drop(next);
                    let _ = lost.send(());
                    s = conns.recv().await.expect("a new connection after a loss");
                }
            }
        }
    }

    /// Two sockets joined by a relay task; aborting the task cuts them
    /// (both ends see the connection close). With `silent`, the relay
    /// carries nothing and holds both ends open.
    async fn relayed(silent: bool) -> (TcpStream, TcpStream, tokio::task::JoinHandle<()>) {
        let (a, mut ra) = pair().await;
        let (b, mut rb) = pair().await;
        let t = tokio::spawn(async move {
            if silent {
                // The hellos pass; then nothing more.
                let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
                ra.read_exact(&mut x).await.unwrap();
                rb.read_exact(&mut y).await.unwrap();
                rb.write_all(&x).await.unwrap();
                ra.write_all(&y).await.unwrap();
                std::future::pending::<()>().await;
            }
            let _ = tokio::io::copy_bidirectional(&mut ra, &mut rb).await;
        });
        (a, b, t)
    }

    /// A local application: writes `out` (in small pieces, slowly enough
    /// for cuts to land mid-stream), ends its side, and reads all it gets.
    fn app(mut s: TcpStream, out: Vec<u8>) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let write = async {
                for c in out.chunks(64 << 10) {
                    w.write_all(c).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, n) = tokio::join!(write, r.read_to_end(&mut got));
            n.unwrap();
            got
        })
    }

    async fn transfer(cuts: usize, silent_first: bool) {
        // Generous: a loaded machine must not make a live link look dead.
        let idle = Duration::from_secs(1);
        let up = pattern(6 << 20, 7);
        let down = pattern(3 << 20, 11);
        let (a_local, a_app) = pair().await;
        let (b_local, b_app) = pair().await;
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let (lost_tx, mut lost) = mpsc::unbounded_channel();
        let a_task = tokio::spawn(side(Resumable::new(a_local, true), a_rx, lost_tx.clone(), idle));
        let b_task = tokio::spawn(side(Resumable::new(b_local, true), b_rx, lost_tx, idle));
        let (a_app, b_app) = (app(a_app, up.clone()), app(b_app, down.clone()));
        // The link: the first `cuts` connections are cut (or the first goes
        // silent); after that, a new one whenever a side lost its own.
        let driver = tokio::spawn(async move {
            let mut relays = Vec::new();
            for round in 0.. {
                let (x, y, relay) = relayed(silent_first && round == 0).await;
                if a_tx.send(x).await.is_err() || b_tx.send(y).await.is_err() {
                    return;
                }
                if round < cuts && !silent_first {
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    relay.abort();
                } else {
                    relays.push(relay);
                }
                if lost.recv().await.is_none() {
                    return;
                }
            }
        });
        let all = async {
            let (a_got, b_got) = (a_app.await.unwrap(), b_app.await.unwrap());
            (a_got, b_got, a_task.await.unwrap(), b_task.await.unwrap())
        };
        let (a_got, b_got, (a, a_losses), (b, b_losses)) =
            tokio::time::timeout(Duration::from_secs(60), all).await.expect("the transfer ends within 60 s");
        driver.abort();
        assert!(a_got == down, "a got {} of {} bytes, or different ones", a_got.len(), down.len());
        assert!(b_got == up, "b got {} of {} bytes, or different ones", b_got.len(), up.len());
        assert_eq!((a.received(), b.received()), (down.len() as u64, up.len() as u64));
        assert_eq!(a.count_out.load(Ordering::Relaxed), up.len() as u64);
        if cuts > 0 {
            assert!(a_losses + b_losses >= cuts as u32, "the cuts were seen: {a_losses} + {b_losses}");
        }
    }

    #[tokio::test]
    async fn carries_both_ways() {
        transfer(0, false).await;
    }

    #[tokio::test]
    async fn resumes_after_cuts() {
        transfer(2, false).await;
    }

    #[tokio::test]
    async fn a_silent_connection_is_lost_and_replaced() {
        transfer(1, true).await;
    }

    #[test]
    fn trim_drops_whole_and_partial_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (l, _app) = pair().await;
            let mut r = Resumable::new(l, false);
            r.unacked = VecDeque::from(vec![vec![1u8; 10], vec![2u8; 10]]);
            r.read = 20;
            r.trim(5).unwrap();
            assert_eq!((r.base, r.unacked[0].len()), (5, 5));
            r.trim(15).unwrap();
            assert_eq!((r.base, r.unacked.len(), r.unacked[0].len()), (15, 1, 5));
            r.trim(20).unwrap();
            assert!(r.unacked.is_empty());
            assert!(r.trim(21).is_err(), "more than was sent");
        });
    }

    #[test]
    fn repeated_bytes_are_dropped_and_gaps_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (l, _app) = pair().await;
            let mut r = Resumable::new(l, false);
            r.take(0, b"abcd").unwrap();
            r.take(2, b"cdef").unwrap();
            assert_eq!(r.received(), 6);
            r.take(0, b"ab").unwrap();
            assert_eq!(r.received(), 6);
            assert!(r.take(9, b"x").is_err());
            r.take(6, b"").unwrap();
            assert!(r.peer_eof);
        });
    }
}
