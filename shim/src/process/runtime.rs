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
    /// Another CRIU binary for runc (`runc --criu PATH`; fail points use it).
    pub criu: Option<PathBuf>,
    /// A restore still running after this is killed: the runtime and CRIU
    /// run in a process group of their own, which is killed as a whole.
    pub timeout: std::time::Duration,
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

    /// `create`: the container's init waits (runc's exec fifo) until `start`.
    /// containerd's Create/Start pair maps onto it (containerd-shim-ums).
    /// With `console`, runc sends the terminal's master end to that Unix
    /// socket (a spec with `process.terminal`).
    pub fn create_args(&self, id: &str, bundle: &Path, pid_file: &Path, console: Option<&Path>) -> Vec<String> {
        let mut a = self.global();
        a.extend(["create", "--bundle"].map(String::from));
        a.push(s(bundle));
        a.push("--pid-file".into());
        a.push(s(pid_file));
        if let Some(c) = console {
            a.push("--console-socket".into());
            a.push(s(c));
        }
        a.push(id.into());
        a
    }

    pub fn start_args(&self, id: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["start".to_string(), id.to_string()]);
        a
    }

    /// `exec --detach`: one more process, described by an OCI `process`
    /// JSON file, in a running container.
    pub fn exec_args(&self, id: &str, process: &Path, pid_file: &Path, console: Option<&Path>) -> Vec<String> {
        let mut a = self.global();
        a.extend(["exec", "--detach", "--process"].map(String::from));
        a.push(s(process));
        a.push("--pid-file".into());
        a.push(s(pid_file));
        if let Some(c) = console {
            a.push("--console-socket".into());
            a.push(s(c));
        }
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
        if let Some(criu) = &o.criu {
            a.push("--criu".into());
            a.push(s(criu));
        }
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
        self.detached(reaper, self.run_args(id, bundle, pid_file), stdio, None, None)
    }

    /// Create the container (its init waits for `start`), its stdio being
    /// the given pipe ends.
    pub fn create_detached(
        &self,
        reaper: &Reaper,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        console: Option<&Path>,
        stdio: [Stdio; 3],
    ) -> Result<(), ExecError> {
        self.detached(reaper, self.create_args(id, bundle, pid_file, console), stdio, None, None)
    }

    /// Run one more process in the container, detached, with these stdio.
    pub fn exec_detached(
        &self,
        reaper: &Reaper,
        id: &str,
        process: &Path,
        pid_file: &Path,
        console: Option<&Path>,
        stdio: [Stdio; 3],
    ) -> Result<(), ExecError> {
        self.detached(reaper, self.exec_args(id, process, pid_file, console), stdio, None, None)
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
        self.detached(reaper, self.restore_args(id, opts), stdio, Some(&log), Some(opts.timeout))
    }

    /// `run -d` and `restore -d` hand their stdio to the container, so their
    /// errors cannot be captured from stderr: the runtime writes them to a log.
    /// With a `timeout`, the runtime runs in a process group of its own (CRIU
    /// and whatever they started with it), killed whole when it runs longer.
    fn detached(
        &self,
        reaper: &Reaper,
        args: Vec<String>,
        stdio: [Stdio; 3],
        criu_log: Option<&Path>,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), ExecError> {
        use std::os::unix::process::CommandExt;
        let _ = std::fs::create_dir_all(&self.root);
        let log = self.root.join(format!("ums-{:08x}.log", rand::random::<u32>()));
        let program = format!("{} {}", self.kind.binary(), args.get(2).map(String::as_str).unwrap_or(""));
        let [i, o, e] = stdio;
        let mut c = Command::new(self.kind.binary());
        c.arg("--log").arg(&log).arg("--log-format").arg("text").args(args);
        c.stdin(i).stdout(o).stderr(e);
        if timeout.is_some() {
            c.process_group(0);
        }
        let child = c.spawn().map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
        let mut exit_rx = reaper.watch(child.id() as i32);
        let lost = || ExecError::Lost { program: program.clone() };
        let exit = match timeout {
            None => exit_rx.blocking_recv().map_err(|_| lost())?,
            Some(limit) => match exec::recv_within(&mut exit_rx, limit).map_err(|_| lost())? {
                Some(exit) => exit,
                None => {
                    // Its own group: the runtime's pid is the group's id.
                    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = exit_rx.blocking_recv();
                    let _ = std::fs::remove_file(&log);
                    return Err(ExecError::TimedOut { program, after: limit });
                }
            },
        };
        drop(c);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if exit.success() {
            Ok(())
        } else {
            Err(match criu_log {
                Some(l) => with_criu_log(ExecError::Failed { program, exit, stderr: text }, l),
                None => ExecError::Failed { program, exit, stderr: explain(&text, None) },
            })
        }
    }

    pub fn kill(&self, reaper: &Reaper, id: &str, signal: &str, all: bool) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.kill_args(id, signal, all))).map(|_| ())
    }
    pub fn start(&self, reaper: &Reaper, id: &str) -> Result<(), ExecError> {
        exec::check_blocking(reaper, self.command(self.start_args(id))).map(|_| ())
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

/// Most CRIU `Error` lines quoted in a message (the first is usually the cause).
const MAX_CRIU_ERRORS: usize = 6;

/// `Error` lines CRIU logs and goes on after (this one on every restore by a
/// root without CAP_SYS_RESOURCE): never the cause.
const CRIU_NOT_FATAL: [&str; 1] = ["Can't setup RLIMIT_NOFILE for self"];

/// CRIU's own `Error (file:line): ...` lines of a dump or restore log, without
/// their timestamps, first ones first.
pub fn criu_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| !CRIU_NOT_FATAL.iter().any(|n| l.contains(n)))
        .filter_map(|l| {
            // "(00.012345) Error (criu/sk-inet.c:199): ..." or a pie line
            // "pie: 1: Error (...)": keep from "Error" on.
            if let Some(i) = l.find("Error (") {
                return Some(l[i..].trim_end().to_string());
            }
            // Some causes are logged as plain lines ("(00.093621) Can't
            // connect to server 10.0.0.2:1"), the Error lines after them
            // only say what failed next.
            let msg = l.trim_start().strip_prefix('(').and_then(|r| r.split_once(") ")).map(|(_, m)| m.trim_end())?;
            msg.starts_with("Can't ").then(|| msg.to_string())
        })
        .take(MAX_CRIU_ERRORS)
        .collect()
}

/// The messages of runc's `level=error` lines (its text log format:
/// `time="..." level=error msg="..."`), unescaped; other lines as they are.
pub fn runtime_errors(stderr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("level=") && !line.contains("level=error") && !line.contains("level=fatal") {
            continue; // warnings and debug lines of runc
        }
        let msg = match line.find("msg=\"") {
            Some(i) => {
                let rest = &line[i + 5..];
                let end = rest.rfind('"').unwrap_or(rest.len());
                rest[..end].replace("\\n", " ").replace("\\\"", "\"").replace("\\t", " ")
            }
            None => line.to_string(),
        };
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        if !msg.is_empty() && !out.contains(&msg) {
            out.push(msg);
        }
    }
    out
}

/// The cause of a failed runtime call in one message: CRIU's `Error` lines
/// from its log `criu_log` (the cause of most failures), then the runtime's
/// own error lines, then where the log is. Without any `Error` line in
/// the log, its last lines stand in for them.
pub fn explain(runtime_stderr: &str, criu_log: Option<(&Path, &str)>) -> String {
    let mut parts = Vec::new();
    if let Some((path, text)) = criu_log {
        let errors = criu_errors(text);
        if !errors.is_empty() {
            parts.push(format!("CRIU: {}", errors.join("; ")));
        } else if !text.trim().is_empty() {
            parts.push(format!("CRIU log ends: {}", last_lines(text, 4).lines().collect::<Vec<_>>().join(" | ")));
        }
        let rt = runtime_errors(runtime_stderr);
        if !rt.is_empty() {
            parts.push(format!("runtime: {}", rt.join("; ")));
        }
        if !text.is_empty() {
            parts.push(format!("(CRIU log {})", path.display()));
        }
    } else {
        let rt = runtime_errors(runtime_stderr);
        if !rt.is_empty() {
            parts.push(rt.join("; "));
        }
    }
    if parts.is_empty() {
        return runtime_stderr.trim().to_string();
    }
    parts.join(" ")
}

/// Put CRIU's own `Error` lines (from its log) and the runtime's error lines
/// into a failed runtime call's message.
pub fn with_criu_log(e: ExecError, log: &Path) -> ExecError {
    match e {
        ExecError::Failed { program, exit, stderr } => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let stderr = explain(&stderr, Some((log, &text)));
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
            criu: None,
            timeout: std::time::Duration::from_secs(1),
        };
        let a = rt().restore_args("w2", &o);
        assert_eq!(&a[2..4], ["restore", "--detach"]);
        assert!(a.windows(2).any(|w| w == ["--bundle", "/b"]));
        assert_eq!(a.last().unwrap(), "w2");
        let a = rt().restore_args("w2", &RestoreOpts { criu: Some("/run/ums/criu-hang".into()), ..o });
        assert_eq!(&a[2..5], ["--criu", "/run/ums/criu-hang", "restore"]);
    }

    #[test]
    fn create_start_and_exec_name_the_container_last() {
        let a = rt().create_args("w1", Path::new("/b"), Path::new("/b/init.pid"), None);
        assert_eq!(a, ["--root", "/run/ums/runtime", "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "w1"]);
        let a = rt().create_args("w1", Path::new("/b"), Path::new("/b/init.pid"), Some(Path::new("/c.sock")));
        assert_eq!(a[7..], ["--console-socket", "/c.sock", "w1"]);
        assert_eq!(rt().start_args("w1")[2..], ["start", "w1"]);
        let a = rt().exec_args("w1", Path::new("/b/e1.json"), Path::new("/b/e1.pid"), None);
        assert_eq!(a[2..], ["exec", "--detach", "--process", "/b/e1.json", "--pid-file", "/b/e1.pid", "w1"]);
        let a = rt().exec_args("w1", Path::new("/b/e1.json"), Path::new("/b/e1.pid"), Some(Path::new("/c.sock")));
        assert_eq!(a[8..], ["--console-socket", "/c.sock", "w1"]);
    }

    #[test]
    fn kill_all_and_crun_binary() {
        let a = rt().kill_args("w1", "KILL", true);
        assert_eq!(&a[2..], ["kill", "--all", "w1", "KILL"]);
        assert_eq!(RuntimeKind::Crun.binary(), "crun");
    }

    #[test]
    fn criu_and_runc_errors_name_the_cause() {
        let log = "(00.001000) Dumping path for 1 fd via self 12 [/]\n\
            (00.010000) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
            (00.020000) Error (criu/sk-inet.c:188): inet: In-flight connection (l) for 2a1f\n\
            (00.020010) Error (criu/sk-inet.c:189): inet: In-flight connections can be ignored with the --skip-in-flight option.\n\
            (00.020100) Error (criu/cr-dump.c:1600): Dump files (pid: 7) failed with -1\n\
            (00.030000) Dumping FAILED.\n";
        let errs = criu_errors(log);
        assert_eq!(errs.len(), 3);
        assert_eq!(errs[0], "Error (criu/sk-inet.c:188): inet: In-flight connection (l) for 2a1f");
        let runc = "time=\"2026-12-06T03:00:00Z\" level=warning msg=\"some warning\"\n\
            time=\"2026-12-06T03:00:00Z\" level=error msg=\"criu failed: type NOTIFY errno 0\\nlog file: /w/dump.log\"\n";
        assert_eq!(runtime_errors(runc), ["criu failed: type NOTIFY errno 0 log file: /w/dump.log"]);
        let m = explain(runc, Some((Path::new("/w/dump.log"), log)));
        assert!(m.starts_with("CRIU: Error (criu/sk-inet.c:188): inet: In-flight connection (l) for 2a1f; "), "{m}");
        assert!(m.contains("runtime: criu failed: type NOTIFY errno 0"), "{m}");
        assert!(!m.contains("some warning") && !m.contains("Dumping FAILED"), "{m}");
        // No Error line: the log's tail stands in.
        let m = explain("", Some((Path::new("/w/dump.log"), "a\nb\nDumping FAILED.\n")));
        assert!(m.contains("CRIU log ends: a | b | Dumping FAILED."), "{m}");
        // A cause CRIU logs without the Error prefix comes first.
        let log = "(00.093559) Connecting to server 127.0.0.1:1\n\
            (00.093621) Can't connect to server 127.0.0.1:1\n\
            (00.093996) Error (compel/src/lib/infect.c:417): Unable to detach from 10838: No such process\n";
        assert_eq!(criu_errors(log)[0], "Can't connect to server 127.0.0.1:1");
        // crun-style plain stderr passes through.
        assert_eq!(explain("plain failure\n", None), "plain failure");
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
