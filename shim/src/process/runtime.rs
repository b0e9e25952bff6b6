//! The OCI runtime (runc or crun) as typed calls. Each verb turns its options
//! into an argument list (pure, unit-tested); `Runtime` runs them under the
//! reaper with the runtime's state kept inside the outer container (`--root`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::RuntimeKind;
use crate::process::exec::{self, ExecError};
use crate::process::reaper::Reaper;

#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub leave_running: bool,
    pub tcp_established: bool,
    /// `IP:PORT` of a CRIU page server that receives the memory pages; with
    /// `lazy_pages`, the address where CRIU itself serves them after the dump.
    pub page_server: Option<String>,
    /// Post-copy: memory stays in the frozen tasks and is served on demand.
    pub lazy_pages: bool,
    /// With `lazy_pages`: the fd (in the runtime's process) CRIU writes a
    /// byte to once the dump is done and its page server listens.
    pub status_fd: Option<i32>,
}

#[derive(Debug, Clone)]
pub struct RestoreOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub bundle: PathBuf,
    pub pid_file: PathBuf,
    pub tcp_established: bool,
    /// Memory comes later from a `criu lazy-pages` daemon sharing `work_path`.
    pub lazy_pages: bool,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    pub kind: RuntimeKind,
    pub root: PathBuf,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Runtime {
    pub fn new(kind: RuntimeKind, root: PathBuf) -> Self {
        Runtime { kind, root }
    }

    fn global(&self) -> Vec<String> {
        vec!["--root".into(), s(&self.root)]
    }

    pub fn run_args(&self, id: &str, bundle: &Path, pid_file: &Path) -> Vec<String> {
        let mut a = self.global();
        a.extend(["run", "--detach", "--bundle"].map(String::from));
        a.push(s(bundle));
        a.push("--pid-file".into());
        a.push(s(pid_file));
        a.push(id.into());
        a
    }

    pub fn kill_args(&self, id: &str, signal: &str, all: bool) -> Vec<String> {
        let mut a = self.global();
        a.push("kill".into());
        if all {
            a.push("--all".into());
        }
        a.push(id.into());
        a.push(signal.into());
        a
    }

    pub fn delete_args(&self, id: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["delete".to_string(), "--force".to_string(), id.to_string()]);
        a
    }

    pub fn pause_args(&self, id: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["pause".to_string(), id.to_string()]);
        a
    }

    pub fn resume_args(&self, id: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["resume".to_string(), id.to_string()]);
        a
    }

    pub fn checkpoint_args(&self, id: &str, o: &CheckpointOpts) -> Vec<String> {
        let mut a = self.global();
        a.push("checkpoint".into());
        a.push("--image-path".into());
        a.push(s(&o.image_path));
        a.push("--work-path".into());
        a.push(s(&o.work_path));
        if o.leave_running {
            a.push("--leave-running".into());
        }
        if o.tcp_established {
            a.push("--tcp-established".into());
        }
        if let Some(ps) = &o.page_server {
            a.push("--page-server".into());
            a.push(ps.clone());
        }
        if o.lazy_pages {
            a.push("--lazy-pages".into());
        }
        if let Some(fd) = o.status_fd {
            a.push("--status-fd".into());
            a.push(fd.to_string());
        }
        a.push("--file-locks".into());
        a.push(id.into());
        a
    }

    pub fn restore_args(&self, id: &str, o: &RestoreOpts) -> Vec<String> {
        let mut a = self.global();
        a.extend(["restore", "--detach", "--image-path"].map(String::from));
        a.push(s(&o.image_path));
        a.push("--work-path".into());
        a.push(s(&o.work_path));
        a.push("--bundle".into());
        a.push(s(&o.bundle));
        a.push("--pid-file".into());
        a.push(s(&o.pid_file));
        if o.tcp_established {
            a.push("--tcp-established".into());
        }
        if o.lazy_pages {
            a.push("--lazy-pages".into());
        }
        a.push("--file-locks".into());
        a.push(id.into());
        a
    }

    fn command(&self, args: Vec<String>) -> Command {
        let mut c = Command::new(self.kind.binary());
        c.args(args);
        c
    }

    /// Start the container detached, its stdio being the given pipe ends.
    pub fn run_detached(
        &self,
        reaper: &Reaper,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        stdio: [Stdio; 3],
    ) -> Result<(), ExecError> {
        self.detached(reaper, self.run_args(id, bundle, pid_file), stdio, None)
    }

    /// Restore detached; the new pipe ends replace the checkpointed stdio.
    pub fn restore_detached(
        &self,
        reaper: &Reaper,
        id: &str,
        opts: &RestoreOpts,
        stdio: [Stdio; 3],
    ) -> Result<(), ExecError> {
        let log = opts.work_path.join("restore.log");
        self.detached(reaper, self.restore_args(id, opts), stdio, Some(&log))
    }

    /// `run -d` and `restore -d` hand their stdio to the container, so their
    /// errors cannot be captured from stderr: the runtime writes them to a log.
    fn detached(
        &self,
        reaper: &Reaper,
        args: Vec<String>,
        stdio: [Stdio; 3],
        criu_log: Option<&Path>,
    ) -> Result<(), ExecError> {
        let _ = std::fs::create_dir_all(&self.root);
        let log = self.root.join(format!("ums-{:08x}.log", rand::random::<u32>()));
        let program = format!("{} {}", self.kind.binary(), args.get(2).map(String::as_str).unwrap_or(""));
        let [i, o, e] = stdio;
        let mut c = Command::new(self.kind.binary());
        c.arg("--log").arg(&log).arg("--log-format").arg("text").args(args);
        c.stdin(i).stdout(o).stderr(e);
        let child = c.spawn().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
        let exit = reaper
            .watch(child.id() as i32)
            .blocking_recv()
            .map_err(|_| ExecError::Lost { program: program.clone() })?;
        drop(c);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if exit.success() {
            Ok(())
        } else {
            let err = ExecError::Failed { program, exit, stderr: last_lines(&text, 10) };
            Err(match criu_log {
                Some(l) => with_criu_log(err, l),
                None => err,
            })
        }
    }

    pub fn kill(&self, reaper: &Reaper, id: &str, signal: &str, all: bool) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.kill_args(id, signal, all))).map(|_| ())
    }
    pub fn delete(&self, reaper: &Reaper, id: &str) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.delete_args(id))).map(|_| ())
    }
    pub fn pause(&self, reaper: &Reaper, id: &str) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.pause_args(id))).map(|_| ())
    }
    pub fn resume(&self, reaper: &Reaper, id: &str) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.resume_args(id))).map(|_| ())
    }
    /// Start a checkpoint without waiting for it (a lazy-pages dump runs
    /// until its pages are served). `status` becomes fd `o.status_fd` in the
    /// runtime. Its output goes to `log`; the exit comes from the reaper.
    pub fn checkpoint_spawn(
        &self,
        reaper: &Reaper,
        id: &str,
        o: &CheckpointOpts,
        status: std::os::fd::OwnedFd,
        log: &Path,
    ) -> Result<(i32, tokio::sync::oneshot::Receiver<crate::process::reaper::Exit>), ExecError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let program = format!("{} checkpoint --lazy-pages", self.kind.binary());
        let spawn_err = |source| ExecError::Spawn { program: program.clone(), source };
        let out = std::fs::File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut c = self.command(self.checkpoint_args(id, o));
        c.stdin(Stdio::null()).stdout(out).stderr(err);
        let (from, to) = (status.as_raw_fd(), o.status_fd.unwrap_or(3));
        // SAFETY: only dup2 (async-signal-safe) between fork and exec; the
        // copy loses O_CLOEXEC, so the runtime inherits it as fd `to`.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().map_err(spawn_err)?;
        let exit = reaper.watch(child.id() as i32);
        drop(status);
        Ok((child.id() as i32, exit))
    }

    pub fn checkpoint(&self, reaper: &Reaper, id: &str, o: &CheckpointOpts) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.checkpoint_args(id, o)))
            .map(|_| ())
            .map_err(|e| with_criu_log(e, &o.work_path.join("dump.log")))
    }
}

/// Keep the end of a log, where CRIU and runc say what went wrong.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Attach the tail of CRIU's own log to a failed runtime call.
pub fn with_criu_log(e: ExecError, log: &Path) -> ExecError {
    match e {
        ExecError::Failed { program, exit, stderr } => {
            let criu = std::fs::read_to_string(log).map(|t| last_lines(&t, 8)).unwrap_or_default();
            let stderr =
                if criu.is_empty() { stderr } else { format!("{stderr}\ncriu log {}:\n{criu}", log.display()) };
            ExecError::Failed { program, exit, stderr }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> Runtime {
        Runtime::new(RuntimeKind::Runc, "/run/ums/runtime".into())
    }

    #[test]
    fn run_is_detached_with_a_pid_file() {
        let a = rt().run_args("w1", Path::new("/b"), Path::new("/b/pid"));
        assert_eq!(
            a,
            ["--root", "/run/ums/runtime", "run", "--detach", "--bundle", "/b", "--pid-file", "/b/pid", "w1"]
        );
    }

    #[test]
    fn checkpoint_flags_follow_options() {
        let mut o = CheckpointOpts { image_path: "/i".into(), work_path: "/w".into(), ..Default::default() };
        let a = rt().checkpoint_args("w1", &o);
        assert!(!a.contains(&"--leave-running".to_string()));
        assert!(!a.contains(&"--tcp-established".to_string()));
        o.leave_running = true;
        o.tcp_established = true;
        let a = rt().checkpoint_args("w1", &o);
        assert!(a.contains(&"--leave-running".to_string()));
        assert!(a.contains(&"--tcp-established".to_string()));
        assert_eq!(a.last().unwrap(), "w1");
        let i = a.iter().position(|x| x == "--image-path").unwrap();
        assert_eq!(a[i + 1], "/i");
        assert!(!a.contains(&"--page-server".to_string()));
        o.page_server = Some("10.0.0.2:27000".into());
        let a = rt().checkpoint_args("w1", &o);
        let i = a.iter().position(|x| x == "--page-server").unwrap();
        assert_eq!(a[i + 1], "10.0.0.2:27000");
    }

    #[test]
    fn restore_is_detached_into_the_bundle() {
        let o = RestoreOpts {
            image_path: "/i".into(),
            work_path: "/w".into(),
            bundle: "/b".into(),
            pid_file: "/b/pid".into(),
            tcp_established: false,
            lazy_pages: false,
        };
        let a = rt().restore_args("w2", &o);
        assert_eq!(&a[2..4], ["restore", "--detach"]);
        assert!(a.windows(2).any(|w| w == ["--bundle", "/b"]));
        assert_eq!(a.last().unwrap(), "w2");
    }

    #[test]
    fn kill_all_and_crun_binary() {
        let a = rt().kill_args("w1", "KILL", true);
        assert_eq!(&a[2..], ["kill", "--all", "w1", "KILL"]);
        assert_eq!(RuntimeKind::Crun.binary(), "crun");
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
