//! The shim's two halves: `UmsShim` (containerd's `start` and `delete`
//! actions and the server's lifetime) and `Service`, the Task service that
//! maps containerd's calls onto ums's runc verbs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{self, Empty, Status};
use containerd_shim::asynchronous::util::mount_rootfs;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, Flags, StartOpts, Task, TtrpcContext, TtrpcResult};
use tokio::sync::{watch, Mutex};
use ums::config::RuntimeKind;
use ums::process::reaper::Reaper;
use ums::process::runtime::{CheckpointOpts, RestoreOpts, Runtime};

use crate::stdio::{self, StdinHandle};

/// The annotation that names a container's pod sandbox (containerd's CRI):
/// the containers of one pod share one shim, as with the runc shim.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Where runc keeps a container's state: inside its bundle, so nothing of
/// it outlives the bundle containerd removes.
const RUNC_ROOT: &str = ".ums-runc";
/// How long an exit waits for the copies of the process's output to end.
const COPY_GRACE: Duration = Duration::from_secs(2);
/// A restore still running after this is killed (ums's `RestoreOpts`).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

/// The shim process: `start` (spawn the server), `delete` (clean up after a
/// server that died), and the server's lifetime.
pub struct UmsShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// Which shim serves a container: its pod's (the sandbox id annotation), or
/// its own.
pub fn grouping(id: &str, config_json: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(config_json)
        .ok()
        .and_then(|v| v["annotations"][SANDBOX_ID].as_str().map(String::from))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| id.to_string())
}

fn runtime_for(bundle: &Path) -> Runtime {
    Runtime::new(RuntimeKind::Runc, bundle.join(RUNC_ROOT))
}

#[async_trait]
impl Shim for UmsShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        UmsShim { id: args.id.clone(), namespace: args.namespace.clone(), exit: Arc::new(ExitSignal::default()) }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // containerd starts the shim in the bundle.
        let config = tokio::fs::read("config.json").await.unwrap_or_default();
        let group = grouping(&opts.id, &config);
        let address = spawn(opts, &group, Vec::new()).await?;
        tokio::fs::write("address", &address)
            .await
            .map_err(|e| containerd_shim::Error::Other(format!("write address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // The server is gone: remove what it left of this container. No
        // reaper runs in this process, so a plain wait is safe here.
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let rt = runtime_for(&bundle);
        let _ = std::process::Command::new(rt.kind.binary())
            .args(rt.delete_args(&self.id))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        unmount(&bundle.join("rootfs"));
        let _ = std::fs::remove_dir_all(bundle.join(RUNC_ROOT));
        log::info!("shim delete {} in namespace {}", self.id, self.namespace);
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        // ums's reaper: every child's exit (runc, CRIU, the containers'
        // processes, reparented to this subreaper) comes through it.
        let (signals, _ignored) = tokio::sync::mpsc::unbounded_channel();
        let reaper = Reaper::start(signals).expect("install the SIGCHLD handler");
        Service {
            inner: Arc::new(Inner {
                containers: Mutex::new(HashMap::new()),
                reaper,
                publisher,
                namespace: self.namespace.clone(),
                exit: self.exit.clone(),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Exited {
    status: u32,
    at: SystemTime,
}

/// One process of a task: the init or an exec.
struct Proc {
    pid: i32,
    io: TaskIO,
    exited: watch::Receiver<Option<Exited>>,
    stdin: Option<StdinHandle>,
    /// The terminal's master, for `ResizePty`.
    console: Option<std::fs::File>,
    /// Ends when the copies of its output have written everything.
    copies: Option<std::sync::mpsc::Receiver<()>>,
}

impl Proc {
    fn new(io: TaskIO) -> Proc {
        Proc { pid: 0, io, exited: watch::channel(None).1, stdin: None, console: None, copies: None }
    }
    fn exited(&self) -> Option<Exited> {
        *self.exited.borrow()
    }
}

struct ExecProc {
    proc: Proc,
    spec: PathBuf,
    started: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
}

struct Container {
    id: String,
    bundle: PathBuf,
    runtime: Runtime,
    init: Proc,
    phase: Phase,
    /// Create with a checkpoint: `Start` restores from these CRIU images.
    restore_from: Option<PathBuf>,
    /// The stdio a restore hands to runc at `Start`.
    pending_io: Option<[Stdio; 3]>,
    execs: HashMap<String, ExecProc>,
    rootfs_mounted: bool,
}

impl Container {
    fn status(&self) -> Status {
        match (self.init.exited(), self.phase) {
            (Some(_), _) => Status::STOPPED,
            (None, Phase::Created) => Status::CREATED,
            (None, Phase::Running) => Status::RUNNING,
            (None, Phase::Paused) => Status::PAUSED,
        }
    }
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    containers: Mutex<HashMap<String, Container>>,
    reaper: Reaper,
    publisher: RemotePublisher,
    namespace: String,
    exit: Arc<ExitSignal>,
}

fn status_err(code: ttrpc::Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}
fn not_found(what: &str) -> ttrpc::Error {
    status_err(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}
fn internal(msg: impl ToString) -> ttrpc::Error {
    status_err(ttrpc::Code::INTERNAL, msg)
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32, ..Default::default() }
}

fn unmount(path: &Path) {
    // Lazily: a process still holding the rootfs must not keep the mount.
    while nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}

fn read_pid(path: &Path) -> Result<i32, ttrpc::Error> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| internal(format!("runc wrote no pid to {}", path.display())))
}

/// What a `Checkpoint` call asks for, from containerd's runc options (ctr
/// and the CRI send `containerd.runc.v1.CheckpointOptions`, or nothing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckpointAsk {
    pub exit: bool,
    pub tcp_established: bool,
    pub work_path: Option<PathBuf>,
}

pub fn checkpoint_ask(options: Option<&Any>) -> CheckpointAsk {
    let Some(any) = options else { return CheckpointAsk::default() };
    if !any.type_url.ends_with("CheckpointOptions") {
        return CheckpointAsk::default();
    }
    match CheckpointOptions::parse_from_bytes(&any.value) {
        Ok(o) => CheckpointAsk {
            exit: o.exit,
            tcp_established: o.open_tcp,
            work_path: (!o.work_path.is_empty()).then(|| PathBuf::from(o.work_path)),
        },
        Err(_) => CheckpointAsk::default(),
    }
}

impl Service {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::with_timeout(0);
        if let Err(e) = self.inner.publisher.publish(ctx, topic, &self.inner.namespace, event).await {
            log::warn!("publish {topic}: {e}");
        }
    }

    /// Learn when `pid` exits (from ums's reaper); then record it and tell
    /// containerd (`TaskExit`).
    fn watch_exit(
        &self,
        container_id: &str,
        exec_id: &str,
        pid: i32,
        copies: Option<std::sync::mpsc::Receiver<()>>,
    ) -> watch::Receiver<Option<Exited>> {
        let (tx, rx) = watch::channel(None);
        let exit = self.inner.reaper.watch(pid);
        let svc = self.clone();
        let (cid, id) = (container_id.to_string(), if exec_id.is_empty() { container_id } else { exec_id }.to_string());
        tokio::spawn(async move {
            let status = exit.await.map(|e| e.code() as u32).unwrap_or(255);
            let at = SystemTime::now();
            // Its last output reaches the FIFO before anyone hears it ended.
            if let Some(c) = copies {
                let _ = tokio::task::spawn_blocking(move || stdio::wait_copies(&c, COPY_GRACE)).await;
            }
            tx.send_replace(Some(Exited { status, at }));
            let ev = TaskExit {
                container_id: cid,
                id,
                pid: pid as u32,
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            };
            svc.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
        });
        rx
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, ttrpc::Error> + Send + 'static,
    ) -> Result<T, ttrpc::Error> {
        tokio::task::spawn_blocking(f).await.map_err(internal)?
    }

    /// The runtime and id of a container, or NOT_FOUND.
    async fn handle(&self, id: &str) -> Result<(Runtime, PathBuf), ttrpc::Error> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(id).ok_or_else(|| not_found(&format!("container {id}")))?;
        Ok((c.runtime.clone(), c.bundle.clone()))
    }
}

#[async_trait]
impl Task for Service {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if req.terminal && !req.checkpoint.is_empty() {
            return Err(status_err(
                ttrpc::Code::UNIMPLEMENTED,
                "io.containerd.ums.v1 restores no terminal yet (restore without -t)",
            ));
        }
        if self.inner.containers.lock().await.contains_key(&req.id) {
            return Err(status_err(ttrpc::Code::ALREADY_EXISTS, format!("container {} exists", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        let mut mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs).map_err(internal)?;
            for m in &req.rootfs {
                mount_rootfs(m, &rootfs).await.map_err(|e| internal(format!("mount rootfs: {e}")))?;
                mounted = true;
            }
        }
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        let fail = |e: ttrpc::Error| {
            if mounted {
                unmount(&rootfs);
            }
            e
        };
        // A terminal: runc makes it and sends its master to this socket;
        // the workload's stdio are the terminal, runc's own are /dev/null.
        let console = if req.terminal {
            Some(crate::console::ConsoleSocket::new().map_err(|e| fail(internal(format!("console socket: {e}"))))?)
        } else {
            None
        };
        let opened = if req.terminal {
            stdio::Io {
                child: [Stdio::null(), Stdio::null(), Stdio::null()],
                stdin: None,
                copies: std::sync::mpsc::channel().1,
            }
        } else {
            stdio::open(&req.stdin, &req.stdout, &req.stderr).map_err(|e| fail(internal(format!("stdio: {e}"))))?
        };
        let runtime = runtime_for(&bundle);
        let mut init = Proc::new(io.clone());
        init.stdin = opened.stdin;
        init.copies = (!req.terminal).then_some(opened.copies);
        let (restore_from, pending_io) = if req.checkpoint.is_empty() {
            let (rt, reaper, id, b) = (runtime.clone(), self.inner.reaper.clone(), req.id.clone(), bundle.clone());
            let child = opened.child;
            let (pid, master) = Self::blocking(move || {
                let pid_file = b.join("init.pid");
                let sock = console.as_ref().map(|c| c.path().to_path_buf());
                rt.create_detached(&reaper, &id, &b, &pid_file, sock.as_deref(), child)
                    .map_err(|e| internal(format!("runc create: {e}")))?;
                let master = match &console {
                    Some(c) => Some(c.receive().map_err(|e| internal(format!("terminal from runc: {e}")))?),
                    None => None,
                };
                Ok((read_pid(&pid_file)?, master))
            })
            .await
            .map_err(fail)?;
            if let Some(m) = master {
                let (f, copies) = crate::console::attach(m, &req.stdin, &req.stdout)
                    .map_err(|e| fail(internal(format!("terminal: {e}"))))?;
                init.console = Some(f);
                init.copies = Some(copies);
            }
            init.pid = pid;
            init.exited = self.watch_exit(&req.id, "", pid, init.copies.take());
            (None, None)
        } else {
            (Some(PathBuf::from(&req.checkpoint)), Some(opened.child))
        };
        let pid = init.pid;
        let c = Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            runtime,
            init,
            phase: Phase::Created,
            restore_from,
            pending_io,
            execs: HashMap::new(),
            rootfs_mounted: mounted,
        };
        self.inner.containers.lock().await.insert(req.id.clone(), c);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(io).into(),
            checkpoint: req.checkpoint.clone(),
            pid: pid as u32,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::CreateTaskResponse { pid: pid as u32, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let reaper = self.inner.reaper.clone();
        if !req.exec_id.is_empty() {
            return self.start_exec(req).await;
        }
        let mut cs = self.inner.containers.lock().await;
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if c.phase != Phase::Created {
            return Err(status_err(ttrpc::Code::FAILED_PRECONDITION, format!("container {} already started", c.id)));
        }
        let (rt, id, bundle) = (c.runtime.clone(), c.id.clone(), c.bundle.clone());
        if let Some(images) = c.restore_from.take() {
            let child = c.pending_io.take().ok_or_else(|| internal("stdio already used"))?;
            let pid = Self::blocking(move || {
                let opts = RestoreOpts {
                    image_path: images,
                    work_path: bundle.join("restore-work"),
                    bundle: bundle.clone(),
                    pid_file: bundle.join("init.pid"),
                    tcp_established: true,
                    lazy_pages: false,
                    criu: None,
                    timeout: RESTORE_TIMEOUT,
                };
                let _ = std::fs::create_dir_all(&opts.work_path);
                rt.restore_detached(&reaper, &id, &opts, child).map_err(|e| internal(format!("restore: {e}")))?;
                read_pid(&opts.pid_file)
            })
            .await?;
            c.init.pid = pid;
            c.init.exited = self.watch_exit(&req.id, "", pid, c.init.copies.take());
        } else {
            Self::blocking(move || rt.start(&reaper, &id).map_err(|e| internal(format!("runc start: {e}")))).await?;
        }
        c.phase = Phase::Running;
        let pid = c.init.pid;
        drop(cs);
        let ev = TaskStart { container_id: req.id.clone(), pid: pid as u32, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::StartResponse { pid: pid as u32, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let (p, status) = if req.exec_id.is_empty() {
            (&c.init, c.status())
        } else {
            let e = c.execs.get(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            let s = match (e.proc.exited(), e.started) {
                (Some(_), _) => Status::STOPPED,
                (None, false) => Status::CREATED,
                (None, true) => Status::RUNNING,
            };
            (&e.proc, s)
        };
        let mut r = api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid as u32,
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            ..Default::default()
        };
        r.set_status(status);
        if let Some(x) = p.exited() {
            r.exit_status = x.status;
            r.exited_at = Some(timestamp(x.at)).into();
        }
        Ok(r)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if !req.exec_id.is_empty() {
            let e = c.execs.get(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            if e.proc.pid <= 0 || e.proc.exited().is_some() {
                return Err(not_found(&format!("process of exec {}", req.exec_id)));
            }
            let sig = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(internal)?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(e.proc.pid), sig).map_err(internal)?;
            return Ok(Empty::new());
        }
        if c.init.exited().is_some() && !req.all {
            return Err(not_found(&format!("process of container {} (it has exited)", req.id)));
        }
        let (rt, id, reaper, sig, all) =
            (c.runtime.clone(), c.id.clone(), self.inner.reaper.clone(), req.signal.to_string(), req.all);
        drop(cs);
        Self::blocking(move || rt.kill(&reaper, &id, &sig, all).map_err(|e| internal(format!("runc kill: {e}"))))
            .await?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let mut cs = self.inner.containers.lock().await;
            let c = cs.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            let e = c.execs.get(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            if e.started && e.proc.exited().is_none() {
                return Err(status_err(ttrpc::Code::FAILED_PRECONDITION, format!("exec {} still runs", req.exec_id)));
            }
            let e = c.execs.remove(&req.exec_id).expect("checked above");
            let _ = std::fs::remove_file(&e.spec);
            let x = e.proc.exited();
            return Ok(api::DeleteResponse {
                pid: e.proc.pid as u32,
                exit_status: x.map(|x| x.status).unwrap_or(0),
                exited_at: x.map(|x| timestamp(x.at)).into(),
                ..Default::default()
            });
        }
        let c = self
            .inner
            .containers
            .lock()
            .await
            .remove(&req.id)
            .ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let (rt, id, reaper) = (c.runtime.clone(), c.id.clone(), self.inner.reaper.clone());
        // `delete --force` kills what still runs; then wait for the exit.
        let _ = Self::blocking(move || rt.delete(&reaper, &id).map_err(internal)).await;
        let mut rx = c.init.exited.clone();
        let x = if c.init.pid > 0 {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.is_some())).await.ok();
            c.init.exited()
        } else {
            None
        };
        if c.rootfs_mounted {
            unmount(&c.bundle.join("rootfs"));
        }
        let _ = std::fs::remove_dir_all(c.bundle.join(RUNC_ROOT));
        let status = x.map(|x| x.status).unwrap_or(if c.init.pid > 0 { 137 } else { 0 });
        let at = x.map(|x| x.at).unwrap_or_else(SystemTime::now);
        let ev = TaskDelete {
            container_id: req.id.clone(),
            pid: c.init.pid as u32,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::DeleteResponse {
            pid: c.init.pid as u32,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            if req.exec_id.is_empty() {
                c.init.exited.clone()
            } else {
                c.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?
                    .proc
                    .exited
                    .clone()
            }
        };
        // A task created for a restore gets its exit watch at Start: wait
        // for the one that comes then.
        loop {
            let x = rx.wait_for(|v| v.is_some()).await.map(|v| *v);
            if let Ok(Some(x)) = x {
                return Ok(api::WaitResponse {
                    exit_status: x.status,
                    exited_at: Some(timestamp(x.at)).into(),
                    ..Default::default()
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            rx = if req.exec_id.is_empty() {
                c.init.exited.clone()
            } else {
                c.execs
                    .get(&req.exec_id)
                    .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?
                    .proc
                    .exited
                    .clone()
            };
        }
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let mut r = api::PidsResponse::new();
        if c.init.pid > 0 && c.init.exited().is_none() {
            for pid in ums::workload::nested::pids(c.init.pid) {
                r.processes.push(containerd_shim::protos::api::ProcessInfo { pid: pid as u32, ..Default::default() });
            }
        }
        Ok(r)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let (rt, _) = self.handle(&req.id).await?;
        let (id, reaper) = (req.id.clone(), self.inner.reaper.clone());
        Self::blocking(move || rt.pause(&reaper, &id).map_err(|e| internal(format!("runc pause: {e}")))).await?;
        if let Some(c) = self.inner.containers.lock().await.get_mut(&req.id) {
            c.phase = Phase::Paused;
        }
        let ev = TaskPaused { container_id: req.id.clone(), ..Default::default() };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let (rt, _) = self.handle(&req.id).await?;
        let (id, reaper) = (req.id.clone(), self.inner.reaper.clone());
        Self::blocking(move || rt.resume(&reaper, &id).map_err(|e| internal(format!("runc resume: {e}")))).await?;
        if let Some(c) = self.inner.containers.lock().await.get_mut(&req.id) {
            c.phase = Phase::Running;
        }
        let ev = TaskResumed { container_id: req.id.clone(), ..Default::default() };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        let (rt, bundle) = self.handle(&req.id).await?;
        let ask = checkpoint_ask(req.options.as_ref());
        let (id, reaper) = (req.id.clone(), self.inner.reaper.clone());
        let images = PathBuf::from(&req.path);
        let work = ask.work_path.clone().unwrap_or_else(|| bundle.join("checkpoint-work"));
        let leave_running = !ask.exit;
        Self::blocking(move || {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).map_err(internal)?;
            std::fs::create_dir_all(&images).map_err(internal)?;
            let opts = CheckpointOpts {
                image_path: images,
                work_path: work,
                leave_running,
                tcp_established: ask.tcp_established,
                ..Default::default()
            };
            rt.checkpoint(&reaper, &id, &opts).map_err(|e| internal(format!("checkpoint: {e}")))
        })
        .await?;
        let ev = TaskCheckpointed { container_id: req.id.clone(), checkpoint: req.path.clone(), ..Default::default() };
        self.publish(topics::TASK_CHECKPOINTED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let mut cs = self.inner.containers.lock().await;
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(status_err(ttrpc::Code::ALREADY_EXISTS, format!("exec {} exists", req.exec_id)));
        }
        // The OCI `process` object, as JSON: what `runc exec --process` reads.
        let spec = c.bundle.join(format!("exec-{}.json", req.exec_id));
        let value = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        std::fs::write(&spec, value).map_err(internal)?;
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        c.execs.insert(req.exec_id.clone(), ExecProc { proc: Proc::new(io), spec, started: false });
        drop(cs);
        let ev = TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let p = if req.exec_id.is_empty() {
            &c.init
        } else {
            &c.execs.get(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?.proc
        };
        let master = p.console.as_ref().ok_or_else(|| status_err(ttrpc::Code::FAILED_PRECONDITION, "no terminal"))?;
        crate::console::resize(master, req.width, req.height).map_err(internal)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let cs = self.inner.containers.lock().await;
        let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let p = if req.exec_id.is_empty() {
            &c.init
        } else {
            &c.execs.get(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?.proc
        };
        if let Some(h) = &p.stdin {
            stdio::close_stdin(h);
        }
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let pid = {
            let cs = self.inner.containers.lock().await;
            let c = cs.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            if c.init.pid <= 0 || c.init.exited().is_some() {
                return Err(not_found(&format!("process of container {}", req.id)));
            }
            c.init.pid
        };
        let m = Self::blocking(move || {
            crate::stats::metrics(pid).ok_or_else(|| {
                status_err(ttrpc::Code::UNIMPLEMENTED, "Stats reads cgroup v1 only (no v1 memory cgroup)")
            })
        })
        .await?;
        let any = containerd_shim::util::convert_to_any(Box::new(m)).map_err(internal)?;
        Ok(api::StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let cs = self.inner.containers.lock().await;
        let task_pid = cs.get(&req.id).map(|c| c.init.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: format!("ums {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // One shim may serve a whole pod: it ends with its last container.
        if req.now || self.inner.containers.lock().await.is_empty() {
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}

impl Service {
    async fn start_exec(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let reaper = self.inner.reaper.clone();
        let mut cs = self.inner.containers.lock().await;
        let c = cs.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let (rt, id) = (c.runtime.clone(), c.id.clone());
        let bundle = c.bundle.clone();
        let e = c.execs.get_mut(&req.exec_id).ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
        if e.started {
            return Err(status_err(ttrpc::Code::FAILED_PRECONDITION, format!("exec {} already started", req.exec_id)));
        }
        let terminal = e.proc.io.terminal;
        let console = if terminal {
            Some(crate::console::ConsoleSocket::new().map_err(|err| internal(format!("console socket: {err}")))?)
        } else {
            None
        };
        let opened = if terminal {
            stdio::Io {
                child: [Stdio::null(), Stdio::null(), Stdio::null()],
                stdin: None,
                copies: std::sync::mpsc::channel().1,
            }
        } else {
            stdio::open(&e.proc.io.stdin, &e.proc.io.stdout, &e.proc.io.stderr)
                .map_err(|err| internal(format!("stdio: {err}")))?
        };
        let spec = e.spec.clone();
        let pid_file = bundle.join(format!("exec-{}.pid", req.exec_id));
        let child = opened.child;
        let (pid, master) = Self::blocking(move || {
            let sock = console.as_ref().map(|c| c.path().to_path_buf());
            rt.exec_detached(&reaper, &id, &spec, &pid_file, sock.as_deref(), child)
                .map_err(|e| internal(format!("runc exec: {e}")))?;
            let master = match &console {
                Some(c) => Some(c.receive().map_err(|e| internal(format!("terminal from runc: {e}")))?),
                None => None,
            };
            let pid = read_pid(&pid_file);
            let _ = std::fs::remove_file(&pid_file);
            Ok((pid?, master))
        })
        .await?;
        let mut copies = (!terminal).then_some(opened.copies);
        if let Some(m) = master {
            let (f, c) = crate::console::attach(m, &e.proc.io.stdin, &e.proc.io.stdout)
                .map_err(|err| internal(format!("terminal: {err}")))?;
            e.proc.console = Some(f);
            copies = Some(c);
        }
        e.proc.pid = pid;
        e.proc.stdin = opened.stdin;
        e.proc.exited = self.watch_exit(&req.id, &req.exec_id, pid, copies);
        e.started = true;
        drop(cs);
        let ev = TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid: pid as u32,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::StartResponse { pid: pid as u32, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_of_a_pod_share_its_shim() {
        let spec = br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1","io.kubernetes.cri.container-type":"container"}}"#;
        assert_eq!(grouping("c1", spec), "pod1");
        assert_eq!(grouping("c1", br#"{"annotations":{}}"#), "c1");
        assert_eq!(grouping("c1", b"not json"), "c1");
        assert_eq!(grouping("c1", br#"{"annotations":{"io.kubernetes.cri.sandbox-id":""}}"#), "c1");
    }

    #[test]
    fn checkpoint_leaves_running_unless_asked_to_exit() {
        assert_eq!(checkpoint_ask(None), CheckpointAsk::default());
        assert!(!checkpoint_ask(None).exit);
        let o = CheckpointOptions { exit: true, open_tcp: true, work_path: "/w".into(), ..Default::default() };
        let any = Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(
            checkpoint_ask(Some(&any)),
            CheckpointAsk { exit: true, tcp_established: true, work_path: Some("/w".into()) }
        );
        let other = Any { type_url: "something.Else".into(), value: vec![1, 2, 3], ..Default::default() };
        assert_eq!(checkpoint_ask(Some(&other)), CheckpointAsk::default());
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }
}
