//! The `ums` command line: one file per subcommand. `init` is the PID 1; the
//! others are thin clients of the control socket.

pub mod checkpoint;
pub mod init;
pub mod keys;
pub mod metrics;
pub mod migrate;
pub mod resolve;
pub mod restore;
pub mod status;

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::supervisor::control::{self, Request, Response};

/// Options every client subcommand shares.
#[derive(Debug, clap::Args)]
pub struct ClientOpts {
    /// The control socket of the ums to talk to.
    #[arg(long, env = "UMS_SOCKET", default_value_os_t = PathBuf::from(Config::DEFAULT_RUN_DIR).join("ums.sock"))]
    pub socket: PathBuf,
    /// Print the raw JSON response.
    #[arg(long)]
    pub json: bool,
}

/// Send a request and print the answer; the exit code says whether it worked.
pub fn request(socket: &Path, req: Request) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(control::call(socket, &req))?)
}

/// Print a failed response and give the exit code for it.
pub fn print_error(r: &Response) -> i32 {
    if let Some(e) = &r.error {
        eprintln!("ums: {} ({})", e.message, serde_json::to_string(&e.kind).unwrap_or_default().trim_matches('"'));
    }
    match r.error.as_ref().map(|e| e.kind) {
        Some(control::ErrorKind::Busy) => 3,
        Some(control::ErrorKind::BadRequest) => 2,
        _ => 1,
    }
}

pub fn finish(opts: &ClientOpts, r: Response, human: impl FnOnce(&serde_json::Value)) -> anyhow::Result<i32> {
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(if r.ok { 0 } else { print_error(&Response { ok: false, result: None, error: r.error.clone() }) });
    }
    if r.ok {
        human(r.result.as_ref().unwrap_or(&serde_json::Value::Null));
        Ok(0)
    } else {
        Ok(print_error(&r))
    }
}

/// Milliseconds from a JSON field, printed as seconds.
pub fn secs(v: &serde_json::Value) -> String {
    v.as_f64().map(|ms| format!("{:.3} s", ms / 1000.0)).unwrap_or_else(|| "-".into())
}
