//! The peer protocol's framing (docs/migration-protocol.md): every frame is a
//! 4-byte big-endian length, a 1-byte type and a payload. Control frames carry
//! JSON; `Data` frames carry raw file bytes behind a 12-byte header. Lengths
//! are checked before anything is allocated.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 2: file digests are BLAKE3 (`blake3` in the manifest) instead of SHA-256.
/// 4: the post-copy page link is framed and resumable (`PageLinkOk`,
/// `PageAck`, offsets in its `Data` frames).
/// 5: pre-copy (`Hello.pre_copy`, `RoundEnd`, `RoundOk`, page deltas).
/// 6: `--mode auto`'s probe (`Probe`, `ProbeAnswer`); zstd chunks
/// (`DataZ`, `Hello.compression`, `HelloOk.compression`); the witness
/// fields of `Hello` and `HelloOk` came in the same version.
pub const PROTOCOL_VERSION: u32 = 6;
/// Largest frame accepted (a data chunk is at most `CHUNK` plus its header).
pub const MAX_FRAME: usize = 4 << 20;
/// Largest JSON frame accepted.
pub const MAX_JSON: usize = 1 << 20;
/// File bytes per data frame.
pub const CHUNK: usize = 1 << 20;
/// Buffer size for the frame reader and writer of a peer connection: holds
/// headers and control frames; data chunks bypass it.
pub const SMALL_BUF: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Error = 3,
    /// JSON: a file starts (or restarts from zero): id, kind, name, size hint.
    FileOpen = 4,
    /// Binary: u32 file id, u64 offset, bytes.
    Data = 5,
    BlobsDone = 6,
    Ready = 7,
    Manifest = 8,
    Result = 9,
    /// JSON: "did migration X end with a running workload here?"
    Query = 10,
    QueryAnswer = 11,
    /// Empty: the destination is alive and working (receiving, unpacking,
    /// verifying, restoring); it resets the source's read deadline and means
    /// nothing else.
    Heartbeat = 12,
    /// JSON, the first frame of a second connection of a post-copy migration:
    /// `{migration_id}`. CRIU's page-server bytes follow it, raw, both ways.
    PageLink = 13,
    /// JSON, destination to source after `Result { running }` in post-copy:
    /// every page has arrived (the source may end its frozen copy).
    PostCopyDone = 14,
    /// JSON, the destination's answer to `PageLink`: `{received}`, the bytes
    /// of the source's page stream it holds (a resumed link sends from there).
    PageLinkOk = 20,
    /// Binary, on a page link, both ways: u64 bytes received and a 1-byte
    /// "your end of stream arrived"; also the link's heartbeat.
    PageAck = 21,
    /// JSON, source to destination in pre-copy: the files of a round
    /// while the workload runs are all sent (names, sizes, digests).
    RoundEnd = 15,
    /// JSON, destination to source: the round's images are rebuilt and held.
    RoundOk = 16,
    /// JSON, the first frame of a connection that only measures (`auto`):
    /// `{protocol}`; `Data` frames of file id 0 follow, an empty one ends them.
    Probe = 17,
    /// JSON, destination to source: what arrived of the probe, and what the
    /// destination supports (`auto::ProbeAnswer`).
    ProbeAnswer = 18,
    /// Binary: u32 file id, u64 offset, u32 length before compression, a
    /// zstd frame of those bytes (only when `HelloOk.compression` is zstd).
    DataZ = 19,
    /// JSON, the first frame of a connection that carries the packets of the
    /// client connections a migration took along (`net::relay`):
    /// `{migration_id}`; then u16-length-prefixed IPv4 packets, both ways.
    Relay = 22,
    /// JSON, the destination's answer to `Relay`: its half is ready.
    RelayOk = 23,
    /// JSON, the first frame of a connection to a witness (`witness`):
    /// `{migration_id, decision}`, "record this unless a decision is held".
    WitnessRecord = 30,
    /// JSON, the witness's answer: `{decision, since_unix_ms}`, the held one.
    WitnessAnswer = 31,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => HelloOk,
            3 => Error,
            4 => FileOpen,
            5 => Data,
            6 => BlobsDone,
            7 => Ready,
            8 => Manifest,
            9 => Result,
            10 => Query,
            11 => QueryAnswer,
            12 => Heartbeat,
            13 => PageLink,
            14 => PostCopyDone,
            20 => PageLinkOk,
            21 => PageAck,
            15 => RoundEnd,
            16 => RoundOk,
            17 => Probe,
            18 => ProbeAnswer,
            19 => DataZ,
            22 => Relay,
            23 => RelayOk,
            30 => WitnessRecord,
            31 => WitnessAnswer,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("bad {kind:?} frame: {detail}")]
    Malformed { kind: Kind, detail: String },
    #[error("peer reported: {0}")]
    Peer(String),
    #[error("no data from the peer for {0:?}")]
    Timeout(std::time::Duration),
    #[error("the peer speaks TLS and this ums plain TCP: give it the group's key set instead of --insecure-peer")]
    PeerSpeaksTls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(kind: Kind, v: &T) -> Frame {
        Frame { kind, payload: serde_json::to_vec(v).expect("protocol messages serialize") }
    }
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        if self.payload.len() > MAX_JSON {
            return Err(WireError::TooLarge(self.payload.len()));
        }
        serde_json::from_slice(&self.payload)
            .map_err(|e| WireError::Malformed { kind: self.kind, detail: e.to_string() })
    }
    /// Expect `kind`; an `Error` frame from the peer becomes `WireError::Peer`.
    pub fn expect<T: DeserializeOwned>(self, kind: Kind) -> Result<T, WireError> {
        if self.kind == Kind::Error {
            let e: ErrorMsg = self.parse()?;
            return Err(WireError::Peer(e.message));
        }
        if self.kind != kind {
            return Err(WireError::Unexpected { expected: kind, got: self.kind });
        }
        self.parse()
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorMsg {
    pub message: String,
}

/// Header of a data frame.
pub fn data_header(id: u32, offset: u64) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&id.to_be_bytes());
    h[4..].copy_from_slice(&offset.to_be_bytes());
    h
}

/// Split a data frame's payload into id, offset and bytes.
pub fn parse_data(payload: &[u8]) -> Result<(u32, u64, &[u8]), WireError> {
    if payload.len() < 12 {
        return Err(WireError::Malformed { kind: Kind::Data, detail: "shorter than its header".into() });
    }
    let id = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
    let off = u64::from_be_bytes(payload[4..12].try_into().expect("8 bytes"));
    Ok((id, off, &payload[12..]))
}

/// Header of a compressed data frame.
pub fn dataz_header(id: u32, offset: u64, raw_len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..12].copy_from_slice(&data_header(id, offset));
    h[12..].copy_from_slice(&raw_len.to_be_bytes());
    h
}

/// A `DataZ` frame as the `Data` frame it stands for. The announced
/// length is checked against `CHUNK` before anything is allocated, and the
/// output may not exceed it.
pub fn inflate(f: &Frame) -> Result<Frame, WireError> {
    let bad = |detail: String| WireError::Malformed { kind: Kind::DataZ, detail };
    if f.payload.len() < 16 {
        return Err(bad("shorter than its header".into()));
    }
    let raw_len = u32::from_be_bytes(f.payload[12..16].try_into().expect("4 bytes")) as usize;
    if raw_len > CHUNK {
        return Err(bad(format!("{raw_len} bytes announced, more than a chunk")));
    }
    let mut payload = Vec::with_capacity(12 + raw_len);
    payload.extend_from_slice(&f.payload[..12]);
    let out = zstd::bulk::decompress(&f.payload[16..], raw_len).map_err(|e| bad(e.to_string()))?;
    if out.len() != raw_len {
        return Err(bad(format!("{} bytes after decompression, {raw_len} announced", out.len())));
    }
    payload.extend_from_slice(&out);
    Ok(Frame { kind: Kind::Data, payload })
}

pub async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    w.write_all(&(len as u32).to_be_bytes()).await?;
    w.write_all(&[kind as u8]).await?;
    for p in parts {
        w.write_all(p).await?;
    }
    Ok(())
}

pub async fn send(w: &mut (impl AsyncWriteExt + Unpin), f: &Frame) -> Result<(), WireError> {
    write_frame(w, f.kind, &[&f.payload]).await
}

pub async fn send_json<T: Serialize>(w: &mut (impl AsyncWriteExt + Unpin), kind: Kind, v: &T) -> Result<(), WireError> {
    send(w, &Frame::json(kind, v)).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Frame, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    // A TLS record (alert or handshake, version 3.x) where a frame should be.
    if matches!(len, [0x15 | 0x16, 3, 0..=4, _]) {
        return Err(WireError::PeerSpeaksTls);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).await?;
    let kind = Kind::from_u8(kind[0]).ok_or(WireError::UnknownKind(kind[0]))?;
    // Filled without zeroing it first (`read_to_end` uses spare capacity).
    let mut payload = Vec::with_capacity(len - 1);
    r.take((len - 1) as u64).read_to_end(&mut payload).await?;
    if payload.len() != len - 1 {
        return Err(WireError::Closed);
    }
    Ok(Frame { kind, payload })
}

/// `read_frame` with a deadline on progress: a peer from which no byte
/// arrives for `deadline` is dropped. A frame that keeps arriving, however
/// slowly (a chunk of 1 MiB over a link of a few KiB/s), is waited for: the
/// deadline detects a dead or silent peer, not a slow link.
pub async fn read_frame_within(
    r: &mut (impl AsyncReadExt + Unpin),
    deadline: std::time::Duration,
) -> Result<Frame, WireError> {
    let mut idle = tokio_io_timeout::TimeoutReader::new(r);
    idle.set_timeout(Some(deadline));
    tokio::pin!(idle);
    match read_frame(&mut idle).await {
        Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => Err(WireError::Timeout(deadline)),
        other => other,
    }
}

/// The next frame that is not a `Heartbeat`: every frame, heartbeats
/// included, must come within `deadline` of the one before it. A peer that
/// works for long (an unpack, a restore) keeps the connection alive this way,
/// and a silent one is dropped after `deadline`.
pub async fn read_frame_live(
    r: &mut (impl AsyncReadExt + Unpin),
    deadline: std::time::Duration,
) -> Result<Frame, WireError> {
    loop {
        let f = read_frame_within(r, deadline).await?;
        if f.kind != Kind::Heartbeat {
            return Ok(f);
        }
    }
}

/// How often a working peer sends `Heartbeat`: a quarter of the deadline the
/// other side reads with, between 0.1 and 5 s.
pub fn heartbeat_interval(deadline: std::time::Duration) -> std::time::Duration {
    (deadline / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn heartbeats_are_skipped_and_keep_the_deadline() {
        let mut buf = Vec::new();
        for _ in 0..3 {
            write_frame(&mut buf, Kind::Heartbeat, &[]).await.unwrap();
        }
        send_json(&mut buf, Kind::Ready, &serde_json::json!({})).await.unwrap();
        let mut r = &buf[..];
        let f = read_frame_live(&mut r, std::time::Duration::from_secs(1)).await.unwrap();
        assert_eq!(f.kind, Kind::Ready);
        assert_eq!(heartbeat_interval(std::time::Duration::from_secs(30)), std::time::Duration::from_secs(5));
        assert_eq!(heartbeat_interval(std::time::Duration::from_secs(2)), std::time::Duration::from_millis(500));
    }

    /// A frame that trickles in, a piece every 60 ms, takes far longer than
    /// the 150 ms deadline in all and is still read; one that stops
    /// mid-frame is dropped at the deadline.
    #[tokio::test]
    async fn the_deadline_is_on_progress_not_on_the_whole_frame() {
        use std::time::Duration;
        let mut frame = Vec::new();
        write_frame(&mut frame, Kind::Data, &[&[7u8; 40]]).await.unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        let f2 = frame.clone();
        let sender = tokio::spawn(async move {
            for piece in f2.chunks(5) {
                tx.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            tx
        });
        let t0 = std::time::Instant::now();
        let f = read_frame_within(&mut rx, Duration::from_millis(150)).await.unwrap();
        assert_eq!((f.kind, f.payload.len()), (Kind::Data, 40));
        assert!(t0.elapsed() > Duration::from_millis(300), "{:?}", t0.elapsed());
        let mut tx = sender.await.unwrap();
        tx.write_all(&frame[..10]).await.unwrap();
        let t0 = std::time::Instant::now();
        let err = read_frame_within(&mut rx, Duration::from_millis(150)).await.unwrap_err();
        assert!(matches!(err, WireError::Timeout(_)), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn compressed_data_frames_inflate_within_bounds() {
        let bytes: Vec<u8> = b"abcabcabc".iter().cycle().take(100_000).copied().collect();
        let z = zstd::bulk::compress(&bytes, 3).unwrap();
        let mut payload = dataz_header(7, 4096, bytes.len() as u32).to_vec();
        payload.extend_from_slice(&z);
        let f = inflate(&Frame { kind: Kind::DataZ, payload: payload.clone() }).unwrap();
        assert_eq!(f.kind, Kind::Data);
        let (id, off, b) = parse_data(&f.payload).unwrap();
        assert_eq!((id, off, b), (7, 4096, &bytes[..]));
        // A length above a chunk, a lie about the length, or garbage: refused.
        let mut big = payload.clone();
        big[12..16].copy_from_slice(&((CHUNK as u32) + 1).to_be_bytes());
        assert!(inflate(&Frame { kind: Kind::DataZ, payload: big }).is_err());
        let mut short = payload.clone();
        short[12..16].copy_from_slice(&1000u32.to_be_bytes());
        assert!(inflate(&Frame { kind: Kind::DataZ, payload: short }).is_err());
        let mut long = payload.clone();
        long[12..16].copy_from_slice(&200_000u32.to_be_bytes());
        assert!(inflate(&Frame { kind: Kind::DataZ, payload: long }).is_err());
        let mut junk = dataz_header(1, 0, 10).to_vec();
        junk.extend_from_slice(b"not zstd at all");
        assert!(inflate(&Frame { kind: Kind::DataZ, payload: junk }).is_err());
        assert!(inflate(&Frame { kind: Kind::DataZ, payload: vec![0; 15] }).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        send_json(&mut buf, Kind::Hello, &serde_json::json!({"x": 1})).await.unwrap();
        write_frame(&mut buf, Kind::Data, &[&data_header(7, 1 << 40), b"abc"]).await.unwrap();
        let mut r = &buf[..];
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!(f.kind, Kind::Hello);
        let v: serde_json::Value = f.parse().unwrap();
        assert_eq!(v["x"], 1);
        let f = read_frame(&mut r).await.unwrap();
        assert_eq!(parse_data(&f.payload).unwrap(), (7, 1 << 40, &b"abc"[..]));
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn bad_frames_are_refused_before_allocation() {
        let alert = [0x15u8, 3, 3, 0, 2, 2, 40];
        assert!(matches!(read_frame(&mut &alert[..]).await, Err(WireError::PeerSpeaksTls)));
        let huge = [0xffu8, 0xff, 0xff, 0xff, 1];
        assert!(matches!(read_frame(&mut &huge[..]).await, Err(WireError::TooLarge(_))));
        let zero = [0u8, 0, 0, 0];
        assert!(matches!(read_frame(&mut &zero[..]).await, Err(WireError::Empty)));
        let unknown = [0u8, 0, 0, 1, 200];
        assert!(matches!(read_frame(&mut &unknown[..]).await, Err(WireError::UnknownKind(200))));
        let truncated = [0u8, 0, 0, 10, 5, 1, 2];
        assert!(matches!(read_frame(&mut &truncated[..]).await, Err(WireError::Closed)));
        assert!(parse_data(&[1, 2, 3]).is_err());
        let err = Frame::json(Kind::Error, &ErrorMsg { message: "no".into() });
        assert!(matches!(err.expect::<serde_json::Value>(Kind::HelloOk), Err(WireError::Peer(m)) if m == "no"));
        let wrong = Frame::json(Kind::Ready, &serde_json::json!({}));
        assert!(matches!(wrong.expect::<serde_json::Value>(Kind::HelloOk), Err(WireError::Unexpected { .. })));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) -> (Vec<Frame>, Option<String>) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = bytes;
            let mut frames = Vec::new();
            loop {
                match read_frame(&mut r).await {
                    Ok(f) => {
                        assert!(f.payload.len() < MAX_FRAME);
                        frames.push(f);
                    }
                    Err(e) => return (frames, Some(e.to_string())),
                }
            }
        })
    }

    fn valid_stream() -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut buf = Vec::new();
            send_json(&mut buf, Kind::Hello, &serde_json::json!({"protocol": 1, "migration_id": "m-1"})).await.unwrap();
            send_json(&mut buf, Kind::FileOpen, &serde_json::json!({"id": 1, "kind": "image", "name": "core-1.img"}))
                .await
                .unwrap();
            write_frame(&mut buf, Kind::Data, &[&data_header(1, 0), b"0123456789"]).await.unwrap();
            send_json(&mut buf, Kind::BlobsDone, &serde_json::json!({})).await.unwrap();
            buf
        })
    }

    proptest! {
        /// Random bytes: the decoder ends with an error, never panics and never
        /// hands out a frame over the limit.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let (_, err) = decode_all(&bytes);
            prop_assert!(err.is_some());
        }

        /// A valid stream with bytes flipped, cut short or spliced: the frames
        /// before the damage decode, then a clean error.
        #[test]
        fn mutated_frames_end_cleanly(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in any::<usize>()) {
            let mut s = valid_stream();
            for (at, x) in flips {
                let i = at % s.len();
                s[i] ^= x;
            }
            let cut = cut % (s.len() + 1);
            let (frames, err) = decode_all(&s[..cut]);
            prop_assert!(err.is_some());
            for f in frames {
                // Parsing what came through is an error or a value, never a panic.
                let _ = f.parse::<crate::migration::Hello>();
                let _ = f.parse::<crate::migration::FileOpen>();
                let _ = parse_data(&f.payload);
            }
        }
    }
}
