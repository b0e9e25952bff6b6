//! Running helper programs (runc, crun, criu, ip) under the reaper: spawn,
//! register the pid in the same step, collect output on threads, and learn the
//! exit from the reaper rather than `Child::wait` (which would race it).
//! Blocking by design; async callers go through `run` on the blocking pool.

use std::io::Read;
use std::process::{Command, Stdio};

use crate::process::reaper::{Exit, Reaper};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} was not reaped (reaper gone)")]
    Lost { program: String },
    #[error("{program} failed ({exit}): {stderr}")]
    Failed { program: String, exit: Exit, stderr: String },
    #[error("{program} did not finish within {after:?}: killed it and everything it started")]
    TimedOut { program: String, after: std::time::Duration },
}

/// The exit `rx` reports, if it comes within `limit`: `Ok(None)` when the
/// time is up, `Err` when the reaper is gone.
pub fn recv_within(
    rx: &mut tokio::sync::oneshot::Receiver<Exit>,
    limit: std::time::Duration,
) -> Result<Option<Exit>, tokio::sync::oneshot::error::TryRecvError> {
    use tokio::sync::oneshot::error::TryRecvError;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match rx.try_recv() {
            Ok(exit) => return Ok(Some(exit)),
            Err(TryRecvError::Closed) => return Err(TryRecvError::Closed),
            Err(TryRecvError::Empty) if std::time::Instant::now() >= deadline => return Ok(None),
            Err(TryRecvError::Empty) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

#[derive(Debug)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn program_name(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    if let Some(first) = cmd.get_args().next() {
        s.push(' ');
        s.push_str(&first.to_string_lossy());
    }
    s
}

/// Run to completion, capturing stdout and stderr (unless the caller set them).
pub fn output_blocking(reaper: &Reaper, mut cmd: Command) -> Result<Output, ExecError> {
    let program = program_name(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    let exit_rx = reaper.watch(child.id() as i32);
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let mut stderr = Vec::new();
    if let Some(p) = err_pipe.as_mut() {
        let _ = p.read_to_end(&mut stderr);
    }
    let stdout = out_thread.join().unwrap_or_default();
    let exit = exit_rx.blocking_recv().map_err(|_| ExecError::Lost { program })?;
    Ok(Output { exit, stdout, stderr })
}

/// Like `output_blocking`, but a non-zero exit is an error carrying stderr.
pub fn check_blocking(reaper: &Reaper, cmd: Command) -> Result<Output, ExecError> {
    let program = program_name(&cmd);
    let out = output_blocking(reaper, cmd)?;
    if out.exit.success() {
        Ok(out)
    } else {
        Err(ExecError::Failed {
            program,
            exit: out.exit,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Async front door: runs `check_blocking` on the blocking pool.
pub async fn check(reaper: &Reaper, cmd: Command) -> Result<Output, ExecError> {
    let reaper = reaper.clone();
    let program = program_name(&cmd);
    tokio::task::spawn_blocking(move || check_blocking(&reaper, cmd)).await.unwrap_or(Err(ExecError::Lost { program }))
}
