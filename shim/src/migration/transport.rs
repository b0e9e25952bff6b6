//! How a peer connection is opened and accepted. Everything above this module
//! sees a reader and a writer; what they run over (plain TCP today) is decided
//! here, so authentication and encryption live in one place.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Config;

pub type PeerRead = Box<dyn AsyncRead + Unpin + Send>;
pub type PeerWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An open peer connection, split, with the peer's identity for the logs.
pub struct PeerConn {
    pub read: PeerRead,
    pub write: PeerWrite,
    /// Address, and (when authenticated) the peer's name.
    pub peer: String,
}

/// Connect to the peer port at `to`.
pub async fn connect(_cfg: &Config, to: &str, timeout: Duration) -> std::io::Result<PeerConn> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| to.into());
    let (r, w) = stream.into_split();
    Ok(PeerConn { read: Box::new(r), write: Box::new(w), peer })
}

/// Take an accepted connection into use.
pub async fn accept(_cfg: &Config, stream: TcpStream) -> std::io::Result<PeerConn> {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (r, w) = stream.into_split();
    Ok(PeerConn { read: Box::new(r), write: Box::new(w), peer })
}
