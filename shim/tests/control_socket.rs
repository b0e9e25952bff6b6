//! The control socket refuses other users: the file is mode 0600, and even
//! through a socket opened to everyone, SO_PEERCRED turns a caller with
//! another uid away. The caller is the real `ums` CLI run as uid 65534 with
//! setpriv (util-linux).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use tokio::sync::mpsc;
use ums::supervisor::control::{self, Envelope, Request, Response};

fn as_nobody(socket: &std::path::Path) -> std::process::Output {
    assert!(nix::unistd::geteuid().is_root(), "this test must run as root (it runs the client as uid 65534)");
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_ums"))
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .expect("run setpriv (util-linux)")
}

#[tokio::test]
async fn another_uid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("ums.sock");
    let listener = control::bind(&sock).unwrap();
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let (tx, mut rx) = mpsc::channel::<Envelope>(4);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(control::serve(listener, tx, stop_rx));
    let served = tokio::spawn(async move {
        let mut n = 0;
        while let Some((_, reply)) = rx.recv().await {
            n += 1;
            let _ = reply.send(Response::ok(serde_json::json!({ "state": "standby" })));
        }
        n
    });

    // Mode 0600: another user cannot even connect.
    let s2 = sock.clone();
    let out = tokio::task::spawn_blocking(move || as_nobody(&s2)).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ermission denied"), "{out:?}");

    // Opened to everyone by mistake: SO_PEERCRED still refuses the caller.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let s2 = sock.clone();
    let out = tokio::task::spawn_blocking(move || as_nobody(&s2)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("caller uid not allowed"), "{text}");

    // Root (our uid) is served.
    let r = control::call(&sock, &Request::Status).await.unwrap();
    assert!(r.ok, "{r:?}");
    drop(_stop);
    assert!(!served.is_finished() || served.await.unwrap() == 1);
}
