//! `ums init`: the outer container's PID 1. Process-wide setup happens here,
//! before the async runtime starts: signal mask, subreaper, logging, the
//! state dir on a filesystem that can hold an overlay upper dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, RuntimeKind};
use crate::process::reaper::Reaper;
use crate::process::runtime::Runtime;
use crate::supervisor::{Ctx, Supervisor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The workload's OCI image layout.
    #[arg(long, env = "UMS_LAYOUT", default_value = Config::DEFAULT_LAYOUT_DIR)]
    pub layout: PathBuf,
    /// Unpacked layers, the bundle and images dirs (tmpfs is mounted here when it is on overlayfs).
    #[arg(long, env = "UMS_STATE_DIR", default_value = Config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Control socket and runtime state.
    #[arg(long, env = "UMS_RUN_DIR", default_value = Config::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// OCI runtime for the nested container: runc or crun.
    #[arg(long, env = "UMS_RUNTIME", default_value = "runc")]
    pub runtime: RuntimeKind,
    /// Start without a workload and wait for one to arrive (restore or migration).
    #[arg(long, env = "UMS_STANDBY", value_parser = clap::builder::FalseyValueParser::new())]
    pub standby: bool,
    /// How long SIGTERM waits for the workload before SIGKILL (10s, 500ms).
    #[arg(long, env = "UMS_STOP_GRACE", default_value = "10s", value_parser = crate::supervisor::parse_duration)]
    pub stop_grace: std::time::Duration,
    /// Address of the peer port.
    #[arg(long, env = "UMS_PEER_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], Config::DEFAULT_PEER_PORT)))]
    pub peer_listen: SocketAddr,
    /// Hostname of the nested container (default: the outer container's).
    #[arg(long, env = "UMS_HOSTNAME")]
    pub hostname: Option<String>,
    /// Do not ask CRIU to keep established TCP connections.
    #[arg(long)]
    pub no_tcp_established: bool,
    /// Publish a port of the workload on the outer container: OUTER:INNER[/udp]
    /// (repeatable; the image's ExposedPorts are published too).
    #[arg(long = "publish", short = 'p', env = "UMS_PUBLISH", value_delimiter = ',')]
    pub publish: Vec<crate::net::proxy::PortMap>,
    /// Most client connections held during a migration's freeze.
    #[arg(long, env = "UMS_HOLD_MAX", default_value_t = 1024)]
    pub hold_max: usize,
    /// Longest a client connection is held (30s).
    #[arg(long, env = "UMS_HOLD_TIMEOUT", default_value = "30s", value_parser = crate::supervisor::parse_duration)]
    pub hold_timeout: std::time::Duration,
    /// After a migration, forward clients to the destination until none came for this long.
    #[arg(long, env = "UMS_DRAIN", default_value = "10s", value_parser = crate::supervisor::parse_duration)]
    pub drain: std::time::Duration,
    /// Before a freeze, how long connections already open to the workload
    /// may take to finish (2s); those still open then are closed once the
    /// workload has left. Keep-alive clients never finish: a shorter wait
    /// holds new clients for less time before the freeze.
    #[arg(long, env = "UMS_IN_FLIGHT_WAIT", default_value = "2s", value_parser = crate::supervisor::parse_duration)]
    pub in_flight_wait: std::time::Duration,
    /// Before a freeze, how long at most the workload may accept connections
    /// already queued on its listening sockets (500ms); any left are not
    /// dumped (CRIU's skip-in-flight) and counted as `in_flight_skipped`.
    #[arg(long, env = "UMS_LISTEN_DRAIN", default_value = "500ms", value_parser = crate::supervisor::parse_duration)]
    pub listen_drain: std::time::Duration,
    /// The peer key set: ca.pem, peer.pem, peer-key.pem (`ums keys create`).
    #[arg(long, env = "UMS_PEER_KEYS", default_value = Config::DEFAULT_PEER_KEYS)]
    pub peer_keys: PathBuf,
    /// Talk to peers over plain TCP, unauthenticated and unencrypted (an explicit opt-out).
    #[arg(long, env = "UMS_INSECURE_PEER", value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure_peer: bool,
    /// Deadline for every read from a peer, and for its TLS handshake (30s).
    #[arg(long, env = "UMS_PEER_TIMEOUT", default_value = "30s", value_parser = crate::supervisor::parse_duration)]
    pub peer_timeout: std::time::Duration,
    /// Post-copy: how long a cut page link may take to come back (60s).
    /// Meanwhile the workload at the destination waits on the pages it
    /// lacks and the frozen copy here holds them; after it, the destination
    /// ends its copy and the source's copy runs on.
    #[arg(long, env = "UMS_POST_COPY_RESUME", default_value = "60s", value_parser = crate::supervisor::parse_duration)]
    pub post_copy_resume: std::time::Duration,
    /// Stream the checkpoint while CRIU writes it (on), or dump first and
    /// send afterwards (off, for comparison).
    #[arg(long, env = "UMS_STREAMING", default_value = "on", hide = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub streaming: bool,
    /// Forward published TCP ports in the kernel while the workload runs
    /// here (on), or proxy every connection in user space (off).
    #[arg(long, env = "UMS_KERNEL_FORWARD", default_value = "on", hide = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub kernel_forward: bool,
    /// A restore (runc and CRIU, at a migration's destination or `ums
    /// restore`) still running after this is killed, with everything it
    /// started, and fails (5m).
    #[arg(long, env = "UMS_RESTORE_TIMEOUT", default_value = "5m", value_parser = crate::supervisor::parse_duration)]
    pub restore_timeout: std::time::Duration,
    /// A third ums of the peer group (HOST:PORT) that witnesses this side's
    /// outgoing migrations: its record is their commit point, so that a
    /// partition between source and destination is settled by the side
    /// that still reaches it (docs/migration-protocol.md, "The witness").
    #[arg(long, env = "UMS_WITNESS")]
    pub witness: Option<String>,
    /// Inject a fault (tests only).
    #[arg(long, env = "UMS_FAILPOINT", hide = true, value_enum)]
    pub failpoint: Option<crate::config::Failpoint>,
    /// CPU features to pretend this machine lacks, comma-separated (tests only).
    #[arg(long, env = "UMS_CPU_HIDE", hide = true, value_delimiter = ',')]
    pub cpu_hide: Vec<String>,
    /// Set one resource limit of the workload, as Docker spells it: NAME=SOFT[:HARD]
    /// (nofile, nproc, core, memlock, stack, ...; -1 is unlimited; repeatable).
    /// The others are the outer container's own.
    #[arg(long = "ulimit", env = "UMS_ULIMIT", value_delimiter = ',')]
    pub ulimit: Vec<crate::workload::spec::Ulimit>,
    /// The workload's seccomp filter: default (like Docker's), unconfined, or
    /// the path of an OCI LinuxSeccomp JSON file.
    #[arg(long, env = "UMS_SECCOMP", default_value = "default", value_parser = crate::workload::seccomp::Seccomp::parse)]
    pub seccomp: crate::workload::seccomp::Seccomp,
    /// On SIGTERM, migrate the workload to the first of these peers
    /// (HOST:PORT) that takes it, and exit 0; stop it only if none does.
    #[arg(long, env = "UMS_EVACUATE_TO", value_delimiter = ',')]
    pub evacuate_to: Vec<String>,
    /// No evacuation attempt starts later than this after the SIGTERM (20s).
    #[arg(long, env = "UMS_EVACUATE_WITHIN", default_value = "20s", value_parser = crate::supervisor::parse_duration)]
    pub evacuate_within: std::time::Duration,
    /// Serve Prometheus metrics on this address (GET /metrics, plain HTTP;
    /// off by default). Bind it to loopback or the pod IP: the metrics are
    /// not secret, but nothing authenticates the scraper.
    #[arg(long, env = "UMS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Pre-copy (`ums migrate --mode pre-copy` from here): the freeze the
    /// rounds aim at. They stop once the next round's changed pages would
    /// cross the link, at the rate measured so far, in this time (500ms).
    #[arg(long, env = "UMS_PRECOPY_TARGET_FREEZE", default_value = "500ms", value_parser = crate::supervisor::parse_duration)]
    pub precopy_target_freeze: std::time::Duration,
    /// Pre-copy: most rounds while the workload runs before the final,
    /// frozen one (5); fewer when rounds stop shrinking.
    #[arg(long, env = "UMS_PRECOPY_ROUNDS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub precopy_rounds: u32,
    /// zstd on the wire for migrations from here: `auto` (the level from
    /// the link rate `--mode auto` measured and this CPU's measured zstd
    /// speed; level 1 when the link was not measured), `off`, or a level
    /// from 1 to 19. Chunks that do not shrink go raw.
    #[arg(long, env = "UMS_COMPRESS", default_value = "auto", value_parser = crate::migration::compress::parse_policy)]
    pub compress: crate::migration::compress::Policy,
    /// Command to run instead of the image's Entrypoint and Cmd.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl Args {
    fn config(self) -> Config {
        Config {
            layout_dir: self.layout,
            state_dir: self.state_dir,
            run_dir: self.run_dir,
            runtime: self.runtime,
            command: self.command,
            standby: self.standby,
            stop_grace: self.stop_grace,
            peer_listen: self.peer_listen,
            hostname: self.hostname,
            tcp_established: !self.no_tcp_established,
            peer_keys: self.peer_keys,
            insecure_peer: self.insecure_peer,
            peer_read_timeout: self.peer_timeout,
            post_copy_resume: self.post_copy_resume,
            publish: self.publish,
            hold: crate::net::proxy::HoldConfig {
                max_held: self.hold_max,
                max_hold: self.hold_timeout,
                in_flight: self.in_flight_wait,
                drain: self.drain,
            },
            listen_drain: self.listen_drain,
            streaming: self.streaming,
            kernel_forward: self.kernel_forward,
            failpoint: self.failpoint,
            cpu_hide: self.cpu_hide,
            ulimits: self.ulimit,
            seccomp: self.seccomp,
            evacuate_to: self.evacuate_to,
            evacuate_within: self.evacuate_within,
            restore_timeout: self.restore_timeout,
            witness: self.witness,
            precopy_target_freeze: self.precopy_target_freeze,
            precopy_rounds: self.precopy_rounds,
            compress: self.compress,
            ..Config::default()
        }
    }
}

/// The state dir must not be on overlayfs (no overlay upper on overlay, and
/// CRIU cannot dump files of a nested overlay lower); use a tmpfs then.
fn prepare_dirs(cfg: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("create {}", cfg.state_dir.display()))?;
    std::fs::create_dir_all(&cfg.run_dir).with_context(|| format!("create {}", cfg.run_dir.display()))?;
    if crate::sys::is_overlayfs(&cfg.state_dir) {
        tracing::info!(dir = %cfg.state_dir.display(), "state dir is on overlayfs; mounting a tmpfs there");
        nix::mount::mount(
            Some("tmpfs"),
            &cfg.state_dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .with_context(|| format!("mount tmpfs on {}", cfg.state_dir.display()))?;
    }
    // Leftovers of an earlier ums in the same outer container are stale.
    let _ = std::fs::remove_dir_all(cfg.images_root());
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if !crate::sys::is_pid1() {
        crate::sys::become_subreaper().context("become a subreaper")?;
    }
    let metrics_listen = a.metrics_listen;
    let mut cfg = a.config();
    // Below the outer container's own cgroup, before anything runs in it.
    cfg.cgroup_parent = crate::workload::cgroup::setup();
    tracing::debug!(parent = ?cfg.cgroup_parent, "workload cgroups");
    let cfg = Arc::new(cfg);
    crate::workload::spec::check_ulimits(&cfg.ulimits).map_err(|e| anyhow::anyhow!(e))?;
    match cfg.seccomp.profile() {
        None => tracing::warn!("--seccomp unconfined: the workload runs without a seccomp filter"),
        Some(p) => tracing::debug!(rules = p.syscalls().as_ref().map_or(0, |s| s.len()), "seccomp filter"),
    }
    if !cfg.evacuate_to.is_empty() {
        tracing::info!(peers = ?cfg.evacuate_to, within_s = cfg.evacuate_within.as_secs_f64(), "SIGTERM evacuates the workload");
    }
    match crate::migration::transport::check(&cfg) {
        Ok(Some(identity)) => tracing::info!(identity = %identity, keys = %cfg.peer_keys.display(), "peer connections: mutual TLS"),
        Ok(None) => tracing::warn!("--insecure-peer: peer connections are NOT authenticated or encrypted; anyone who reaches the peer port can push a workload that runs as root here"),
        Err(e) => anyhow::bail!("{e}"),
    }
    prepare_dirs(&cfg)?;
    // Before the reaper owns waitpid: this child is waited for here.
    let criu = crate::process::criu_version();
    tracing::debug!(criu, "CRIU version");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let code = rt.block_on(async move {
        let (sig_tx, sig_rx) = mpsc::unbounded_channel();
        let reaper = Reaper::start(sig_tx).context("start the reaper")?;
        let runtime = Runtime::new(cfg.runtime, cfg.runtime_root());
        let publisher = crate::net::proxy::Publisher::new(cfg.net.address, cfg.hold.clone());
        if cfg.kernel_forward {
            let r = reaper.clone();
            // iptables runs on the blocking pool and its exit comes from the
            // reaper: no async worker waits for it.
            let run: crate::net::proxy::IptablesRunner = Box::new(move |args| {
                let r = r.clone();
                Box::pin(async move {
                    let mut cmd = std::process::Command::new("iptables");
                    cmd.args(&args);
                    crate::process::exec::check(&r, cmd)
                        .await
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .map_err(|e| e.to_string())
                })
            });
            if let Err(e) = publisher.enable_kernel_path(run, cfg.net.gateway, &cfg.net.host_if).await {
                tracing::warn!(error = %e, "no in-kernel forwarding of published ports; the proxy serves them all");
            }
        }
        let ctx = Ctx {
            cfg: cfg.clone(),
            reaper,
            runtime,
            publisher,
            migrate_out: crate::migration::migrate_out_boxed(),
            page_links: crate::migration::postcopy::links_status,
            progress: crate::migration::progress::status,
            in_doubt: Default::default(),
            metrics: Default::default(),
        };
        let mut sup = Supervisor::new(ctx.clone(), sig_rx);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let listener = crate::supervisor::control::bind(&cfg.socket_path())
            .with_context(|| format!("bind the control socket {}", cfg.socket_path().display()))?;
        let inbox = sup.inbox();
        let (ctl_tx, mut ctl_rx) = mpsc::channel(16);
        let open_controls = crate::supervisor::control::OpenConnections::default();
        tokio::spawn(crate::supervisor::control::serve_counted(
            listener,
            ctl_tx.clone(),
            shutdown_rx.clone(),
            open_controls.clone(),
        ));
        let to_sup = inbox.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = ctl_rx.recv().await {
                if to_sup.send(crate::supervisor::Msg::Control(req, reply)).await.is_err() {
                    break;
                }
            }
        });
        if let Some(addr) = metrics_listen {
            let l =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind the metrics port {addr}"))?;
            let tx = ctl_tx.clone();
            let render = move || {
                let tx = tx.clone();
                async move {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    tx.send((crate::supervisor::control::Request::Metrics, reply)).await.ok()?;
                    let r = rx.await.ok()?;
                    r.result?.get("text")?.as_str().map(String::from)
                }
            };
            tracing::info!(%addr, "metrics: GET /metrics");
            tokio::spawn(crate::metrics::serve_http(l, render, shutdown_rx.clone()));
        }
        let peer = tokio::net::TcpListener::bind(cfg.peer_listen)
            .await
            .with_context(|| format!("bind the peer port {}", cfg.peer_listen))?;
        tokio::spawn(crate::migration::serve_peers(ctx.clone(), peer, inbox, shutdown_rx));
        // The control socket answers from here on, also while the workload
        // image unpacks (the start runs as an operation of the supervisor).
        if cfg.standby {
            tracing::info!(peer = %cfg.peer_listen, "standby: waiting for a workload");
        } else if let Err(e) = sup.start_workload() {
            anyhow::bail!("cannot start the workload: {e}");
        }
        tracing::info!(socket = %cfg.socket_path().display(), "ums ready");
        let code = sup.run(shutdown_tx).await;
        // Let clients read the answer to the request that ended it all.
        open_controls.drain(Duration::from_secs(2)).await;
        Ok::<i32, anyhow::Error>(code)
    })?;
    let _ = std::fs::remove_file(Config { ..Config::default() }.socket_path());
    Ok(code)
}
