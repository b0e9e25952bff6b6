//! The control socket: a local Unix socket speaking JSON, one request per
//! line, one response line each (docs/control-protocol.md). Only callers with
//! our own uid (or root) are served (SO_PEERCRED). Each request is parsed into
//! a typed `Request` and handed to the supervisor, which answers once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// The Prometheus text of `ums metrics` and `--metrics-listen`.
    Metrics,
    Checkpoint {
        dir: PathBuf,
        #[serde(default = "yes")]
        leave_running: bool,
        /// `IP:PORT` of a `criu page-server`: the memory pages go there
        /// during the dump instead of into `dir`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_server: Option<String>,
    },
    Restore {
        dir: PathBuf,
    },
    Migrate {
        to: String,
        /// `auto` (the default), `stop-copy`, `pre-copy` or `post-copy`.
        #[serde(default)]
        mode: MigrationMode,
        /// `auto` never chooses post-copy (the split-state mode); refused
        /// with `post-copy`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        no_post_copy: bool,
    },
    /// Settle a migration that is in doubt (`ums resolve`).
    Resolve {
        action: crate::supervisor::in_doubt::Resolution,
    },
}

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Choose one of the others from what is measured before the migration
    /// (memory, dirty rate, link rate, what both sides support): the default.
    #[default]
    Auto,
    /// Freeze, copy everything, then run at the destination.
    StopCopy,
    /// Freeze, copy all but the memory, run at the destination at once and
    /// fetch the memory afterwards (CRIU lazy pages, userfaultfd).
    PostCopy,
    /// Copy the memory in rounds while the workload runs, each round only
    /// the pages that changed (found by content), then freeze and copy
    /// what changed since the last round.
    PreCopy,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::StopCopy => "stop-copy",
            MigrationMode::PostCopy => "post-copy",
            MigrationMode::PreCopy => "pre-copy",
            MigrationMode::Auto => "auto",
        }
    }
}

/// What a `migrate` request asks for: the mode, and whether `auto` may
/// choose post-copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateHow {
    pub mode: MigrationMode,
    pub no_post_copy: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be parsed.
    BadRequest,
    /// Another operation is in progress.
    Busy,
    /// The request does not fit the current state (no workload, not standby).
    InvalidState,
    /// The operation ran and failed; the workload is where it was.
    Failed,
    /// ums is shutting down.
    Unavailable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response { ok: true, result: Some(result), error: None }
    }
    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(ErrorBody { kind, message: message.into() }) }
    }
}

/// Parse one request line; the error is the message a caller gets back.
pub fn parse(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("empty request".into());
    }
    serde_json::from_str::<Request>(line).map_err(|e| format!("malformed request: {e}"))
}

/// A request on its way to the supervisor, with the slot for its answer.
pub type Envelope = (Request, oneshot::Sender<Response>);

/// Bind the socket (mode 0600), replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Control connections open right now: on the way out, ums waits (briefly)
/// for them to end, so a client that asked for the operation which preceded
/// the exit (a migration, then a deferred SIGTERM) gets its answer.
#[derive(Clone, Default)]
pub struct OpenConnections(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnections {
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
    /// Wait until none is open, at most `limit`.
    pub async fn drain(&self, limit: Duration) {
        let until = tokio::time::Instant::now() + limit;
        while self.count() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Accept connections until `shutdown` fires.
pub async fn serve(
    listener: UnixListener,
    to_supervisor: mpsc::Sender<Envelope>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    serve_counted(listener, to_supervisor, shutdown, OpenConnections::default()).await;
}

/// `serve`, counting open connections in `open`.
pub async fn serve_counted(
    listener: UnixListener,
    to_supervisor: mpsc::Sender<Envelope>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    open: OpenConnections,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tx = to_supervisor.clone();
                    let open = open.clone();
                    open.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, tx).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                        open.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn caller_allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

async fn write_response(w: &mut (impl AsyncWriteExt + Unpin), r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("response serializes");
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(stream: UnixStream, to_supervisor: mpsc::Sender<Envelope>) -> std::io::Result<()> {
    if !caller_allowed(&stream) {
        let (_, mut w) = stream.into_split();
        return write_response(
            &mut w,
            &Response::err(ErrorKind::BadRequest, "permission denied: caller uid not allowed"),
        )
        .await;
    }
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_REQUEST {
            write_response(
                &mut w,
                &Response::err(ErrorKind::BadRequest, format!("request longer than {MAX_REQUEST} bytes")),
            )
            .await?;
            return Ok(());
        }
        let response = match std::str::from_utf8(&buf).map_err(|_| "request is not UTF-8".to_string()).and_then(parse) {
            Err(msg) => Response::err(ErrorKind::BadRequest, msg),
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                if to_supervisor.send((req, tx)).await.is_err() {
                    Response::err(ErrorKind::Unavailable, "ums is shutting down")
                } else {
                    rx.await.unwrap_or_else(|_| Response::err(ErrorKind::Unavailable, "ums is shutting down"))
                }
            }
        };
        write_response(&mut w, &response).await?;
    }
}

use tokio::io::AsyncReadExt as _;

/// Client side: send one request, wait for its response.
pub async fn call(socket: &Path, req: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot reach ums at {}: {e}", socket.display())))?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    // A server that refuses us (SO_PEERCRED) answers and hangs up before
    // reading: our write may then fail, but its reason is there to read.
    let written = w.write_all(&line).await;
    let mut reader = BufReader::new(r);
    let mut resp = String::new();
    let read = reader.read_line(&mut resp).await;
    if resp.is_empty() {
        written?;
        read?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "ums closed the connection without an answer",
        ));
    }
    serde_json::from_str(&resp).map_err(|e| std::io::Error::other(format!("bad response from ums: {e}: {resp:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse(r#"{"op":"status"}"#), Ok(Request::Status));
        assert_eq!(parse(r#"{"op":"metrics"}"#), Ok(Request::Metrics));
        assert_eq!(
            parse(r#"{"op":"checkpoint","dir":"/tmp/c"}"#),
            Ok(Request::Checkpoint { dir: "/tmp/c".into(), leave_running: true, page_server: None })
        );
        assert_eq!(
            parse(r#"{"op":"checkpoint","dir":"/tmp/c","leave_running":false}"#),
            Ok(Request::Checkpoint { dir: "/tmp/c".into(), leave_running: false, page_server: None })
        );
        assert_eq!(
            parse(r#"{"op":"checkpoint","dir":"/tmp/c","page_server":"10.0.0.2:27000"}"#),
            Ok(Request::Checkpoint {
                dir: "/tmp/c".into(),
                leave_running: true,
                page_server: Some("10.0.0.2:27000".into())
            })
        );
        assert_eq!(
            parse(r#"{"op":"migrate","to":"10.0.0.2:7411"}"#),
            Ok(Request::Migrate { to: "10.0.0.2:7411".into(), mode: Default::default(), no_post_copy: false })
        );
        use crate::supervisor::in_doubt::Resolution;
        assert_eq!(parse(r#"{"op":"resolve","action":"thaw"}"#), Ok(Request::Resolve { action: Resolution::Thaw }));
        assert_eq!(
            parse(r#"{"op":"resolve","action":"abandon"}"#),
            Ok(Request::Resolve { action: Resolution::Abandon })
        );
        assert!(parse(r#"{"op":"resolve","action":"guess"}"#).is_err());
    }

    #[test]
    fn bad_requests_say_why() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("garbage\x00\x01").unwrap_err().contains("malformed"));
        assert!(parse(r#"{"op":"explode"}"#).unwrap_err().contains("malformed"));
        assert!(parse(r#"{"op":"restore"}"#).unwrap_err().contains("dir"));
        assert!(parse(r#"{"op":"checkpoint","dir":"/x","extra":1}"#).is_err());
    }

    #[tokio::test]
    async fn the_socket_answers_garbage_and_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ums.sock");
        let listener = bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(listener, tx, stop_rx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(Response::ok(serde_json::json!({ "echo": format!("{req:?}") })));
            }
        });
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"\xff\xfe not json\n").await.unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        assert!(!resp.ok);
        assert_eq!(resp.error.unwrap().kind, ErrorKind::BadRequest);
        let resp = call(&sock, &Request::Status).await.unwrap();
        assert!(resp.ok, "{resp:?}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any line, however hostile: a typed request or a message, no panic.
        #[test]
        fn random_lines_parse_or_say_why(line in any::<String>()) {
            if let Err(m) = parse(&line) {
                prop_assert!(!m.is_empty());
            }
        }

        /// Valid requests with bytes changed: still a request or a message.
        #[test]
        fn mutated_requests_parse_or_say_why(
            base in prop_oneof![
                Just(r#"{"op":"status"}"#),
                Just(r#"{"op":"checkpoint","dir":"/tmp/c","leave_running":false}"#),
                Just(r#"{"op":"restore","dir":"/tmp/c"}"#),
                Just(r#"{"op":"migrate","to":"10.0.0.2:7411"}"#),
            ],
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let mut b = base.as_bytes().to_vec();
            for (at, x) in edits {
                let i = at % b.len();
                b[i] = x;
            }
            let line = String::from_utf8_lossy(&b);
            match parse(&line) {
                Ok(Request::Migrate { to, .. }) => prop_assert!(!to.contains('\n')),
                Ok(_) => {}
                Err(m) => prop_assert!(!m.is_empty()),
            }
        }
    }
}
