//! How a peer connection is opened and accepted. Everything above this module
//! sees a reader and a writer; what they run over is decided here, so
//! authentication and encryption live in one place.
//!
//! By default every peer connection is mutual TLS 1.3 (rustls, ring): both
//! sides present a member certificate of the group's key set (`crate::migration::keys`)
//! and check the other's against the group CA, with the fixed name
//! `ums-peer` in place of the address. A peer without such a certificate is
//! refused in the handshake, before a single frame is read. The key set is
//! read again for every connection, so a rotated Secret needs no restart.
//! `--insecure-peer` is plain TCP (the explicit opt-out).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::migration::keys::{self, KeySet, KeysError};

pub type PeerRead = Box<dyn AsyncRead + Unpin + Send>;
pub type PeerWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An open peer connection, split, with the peer's identity for the logs.
pub struct PeerConn {
    pub read: PeerRead,
    pub write: PeerWrite,
    /// The peer's name (its certificate's common name) and address, or
    /// `insecure <address>` on plain TCP.
    pub peer: String,
}

fn io_err(kind: std::io::ErrorKind, msg: String) -> std::io::Error {
    std::io::Error::new(kind, msg)
}

fn keys_err(cfg: &Config, e: KeysError) -> std::io::Error {
    io_err(std::io::ErrorKind::PermissionDenied, format!("peer key set {}: {e}", cfg.peer_keys.display()))
}

/// What `ums init` checks at start: the key set loads and is consistent, or
/// `--insecure-peer` was given. Returns this member's identity (`None` when
/// insecure). The error names both ways out.
pub fn check(cfg: &Config) -> Result<Option<String>, String> {
    if cfg.insecure_peer {
        return Ok(None);
    }
    match keys::load(&cfg.peer_keys) {
        Ok(set) => Ok(Some(set.identity)),
        Err(e) => Err(format!(
            "no usable peer key set: {e}. Mount one at {} or pass --peer-keys DIR (UMS_PEER_KEYS; make one with \
             `ums keys create DIR`), or run without peer authentication and encryption with --insecure-peer \
             (UMS_INSECURE_PEER=1)",
            cfg.peer_keys.display()
        )),
    }
}

fn client_config(set: &KeySet) -> Result<rustls::ClientConfig, KeysError> {
    let tls = |source| KeysError::Tls { path: set.dir.clone(), source };
    rustls::ClientConfig::builder_with_provider(keys::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(set.roots()?)
        .with_client_auth_cert(set.chain.clone(), set.key.clone_key())
        .map_err(tls)
}

fn server_config(set: &KeySet) -> Result<rustls::ServerConfig, KeysError> {
    let tls = |source| KeysError::Tls { path: set.dir.clone(), source };
    // Client certificates are required: anonymous clients fail the handshake.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(set.roots()?, keys::provider())
        .build()
        .map_err(|e| tls(rustls::Error::General(e.to_string())))?;
    rustls::ServerConfig::builder_with_provider(keys::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(set.chain.clone(), set.key.clone_key())
        .map_err(tls)
}

/// The peer's name from the certificate it presented.
fn identity(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> String {
    certs.and_then(|c| c.first()).and_then(|c| keys::common_name(c)).unwrap_or_else(|| "(unnamed)".into())
}

fn split<S: AsyncRead + AsyncWrite + Send + 'static>(s: S, peer: String) -> PeerConn {
    let (r, w) = tokio::io::split(s);
    PeerConn { read: Box::new(r), write: Box::new(w), peer }
}

/// Keepalive probes and a bound on unacknowledged data, both derived from the
/// peer deadline `t`: a link that went silent (a partition drops packets, it
/// resets nothing) fails the connection within about `t` instead of after
/// the kernel's default of minutes of retransmissions.
pub fn tune(stream: &TcpStream, t: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = stream.set_nodelay(true);
    let secs = t.as_secs().max(3) as u32;
    let r = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepIdle, &(secs / 3).max(1)))
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepInterval, &(secs / 6).max(1)))
        .and_then(|_| setsockopt(stream, sockopt::TcpKeepCount, &3))
        .and_then(|_| {
            setsockopt(stream, sockopt::TcpUserTimeout, &(t.as_millis().clamp(1000, u32::MAX as u128) as u32))
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot set keepalive and TCP_USER_TIMEOUT on a peer connection");
    }
}

/// Connect to the peer port at `to`; `timeout` covers the TCP connect and
/// the handshake.
pub async fn connect(cfg: &Config, to: &str, timeout: Duration) -> std::io::Result<PeerConn> {
    let timed_out = || io_err(std::io::ErrorKind::TimedOut, format!("no connection to {to} within {timeout:?}"));
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(to)).await.map_err(|_| timed_out())??;
    tune(&stream, cfg.peer_read_timeout);
    let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| to.into());
    if cfg.insecure_peer {
        let (r, w) = stream.into_split();
        return Ok(PeerConn { read: Box::new(r), write: Box::new(w), peer: format!("insecure {addr}") });
    }
    let set = keys::load(&cfg.peer_keys).map_err(|e| keys_err(cfg, e))?;
    let client = client_config(&set).map_err(|e| keys_err(cfg, e))?;
    let name = rustls::pki_types::ServerName::try_from(keys::SERVER_NAME).expect("a valid DNS name");
    let tls =
        tokio::time::timeout_at(deadline, tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, stream))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| io_err(e.kind(), format!("TLS handshake with {addr}: {e}")))?;
    let peer = format!("{} ({addr})", identity(tls.get_ref().1.peer_certificates()));
    Ok(split(tls, peer))
}

/// Take an accepted connection into use: the handshake must end within the
/// peer read deadline, with a certificate of the group.
pub async fn accept(cfg: &Config, stream: TcpStream) -> std::io::Result<PeerConn> {
    tune(&stream, cfg.peer_read_timeout);
    let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    if cfg.insecure_peer {
        let (r, w) = stream.into_split();
        return Ok(PeerConn { read: Box::new(r), write: Box::new(w), peer: format!("insecure {addr}") });
    }
    let set = keys::load(&cfg.peer_keys).map_err(|e| keys_err(cfg, e))?;
    let server = server_config(&set).map_err(|e| keys_err(cfg, e))?;
    let deadline = cfg.peer_read_timeout;
    let tls = tokio::time::timeout(deadline, tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(stream))
        .await
        .map_err(|_| {
            io_err(std::io::ErrorKind::TimedOut, format!("TLS handshake with {addr}: no answer within {deadline:?}"))
        })?
        .map_err(|e| io_err(e.kind(), format!("TLS handshake with {addr} refused: {e}")))?;
    let peer = format!("{} ({addr})", identity(tls.get_ref().1.peer_certificates()));
    Ok(split(tls, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg_with(dir: &std::path::Path) -> Config {
        Config { peer_keys: dir.to_path_buf(), peer_read_timeout: Duration::from_secs(5), ..Config::default() }
    }

    #[tokio::test]
    async fn members_of_a_group_talk_and_learn_each_others_names() {
        let tmp = tempfile::tempdir().unwrap();
        let sets = keys::create(tmp.path(), &["alpha".into(), "beta".into()], false).unwrap();
        let (a, b) = (cfg_with(&sets[0]), cfg_with(&sets[1]));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut c = accept(&b, s).await.unwrap();
            let mut buf = [0u8; 5];
            c.read.read_exact(&mut buf).await.unwrap();
            c.write.write_all(b"world").await.unwrap();
            c.write.flush().await.unwrap();
            (c.peer, buf)
        });
        let mut c = connect(&a, &to, Duration::from_secs(5)).await.unwrap();
        assert!(c.peer.starts_with("beta ("), "{}", c.peer);
        c.write.write_all(b"hello").await.unwrap();
        c.write.flush().await.unwrap();
        let mut buf = [0u8; 5];
        c.read.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"world");
        let (peer, got) = server.await.unwrap();
        assert!(peer.starts_with("alpha ("), "{peer}");
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn check_names_both_ways_out() {
        let tmp = tempfile::tempdir().unwrap();
        let e = check(&cfg_with(&tmp.path().join("none"))).unwrap_err();
        assert!(e.contains("--peer-keys") && e.contains("--insecure-peer") && e.contains("ums keys create"), "{e}");
        assert_eq!(check(&Config { insecure_peer: true, ..cfg_with(tmp.path()) }), Ok(None));
        keys::create(&tmp.path().join("k"), &[], false).unwrap();
        assert_eq!(check(&cfg_with(&tmp.path().join("k"))), Ok(Some(keys::SHARED_NAME.into())));
    }
}
