//! Every path, port and limit `ums` uses, with its default in one place.
//! Tests point the real code at temporary directories by building a `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which OCI runtime runs the nested container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Runc,
    Crun,
}

impl RuntimeKind {
    pub fn binary(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runc" => Ok(RuntimeKind::Runc),
            "crun" => Ok(RuntimeKind::Crun),
            other => Err(format!("unknown runtime {other:?} (runc or crun)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The workload's OCI image layout (index.json, blobs/sha256/...).
    pub layout_dir: PathBuf,
    /// Unpacked layers (read-only lower dirs), bundles, writable layers, images dirs.
    pub state_dir: PathBuf,
    /// Control socket and the OCI runtime's own state live under here (tmpfs).
    pub run_dir: PathBuf,
    pub runtime: RuntimeKind,
    /// Overrides the image's Entrypoint+Cmd when non-empty.
    pub command: Vec<String>,
    /// Start with no workload and wait for one to arrive from a peer.
    pub standby: bool,
    /// How long a SIGTERM waits for the workload before SIGKILL.
    pub stop_grace: Duration,
    /// Peer port listen address.
    pub peer_listen: SocketAddr,
    /// Hostname of the nested container (default: the outer's hostname).
    pub hostname: Option<String>,
    /// Largest checkpoint a destination accepts (bytes of the images dir plus writable layer).
    pub max_checkpoint_bytes: u64,
    /// Deadline for any single read from a peer.
    pub peer_read_timeout: Duration,
    /// Post-copy: how long a cut page link may take to be reconnected.
    pub post_copy_resume: Duration,
    /// Pass `--tcp-established` to CRIU.
    pub tcp_established: bool,
    /// The peer key set (ca.pem, peer.pem, peer-key.pem): mutual TLS with the group's peers.
    pub peer_keys: PathBuf,
    /// Plain TCP to peers, no authentication (an explicit opt-out).
    pub insecure_peer: bool,
    /// The nested container's network: the same in every outer container.
    pub net: NetConfig,
    /// Ports published with `--publish`, besides the image's ExposedPorts.
    pub publish: Vec<crate::net::proxy::PortMap>,
    /// How published ports behave during and after a migration.
    pub hold: crate::net::proxy::HoldConfig,
    /// Before a freeze (migration or checkpoint), once new connections no
    /// longer reach the workload, how long to wait at most for its listening
    /// sockets to accept what the kernel already queued for them.
    pub listen_drain: Duration,
    /// Stream the images dir while CRIU writes it (the default), or dump
    /// first and send afterwards (for comparison). `UMS_STREAMING`.
    pub streaming: bool,
    /// Forward published TCP ports in the kernel while the workload runs
    /// here (the default), or leave every connection to the user-space
    /// proxy. `UMS_KERNEL_FORWARD`.
    pub kernel_forward: bool,
    /// A fault to inject, for the fault tests only. `UMS_FAILPOINT`.
    pub failpoint: Option<Failpoint>,
    /// CPU features this machine pretends to lack in pre-migration, for
    /// the tests only. `UMS_CPU_HIDE`.
    pub cpu_hide: Vec<String>,
    /// Limits that replace the outer container's own for the workload.
    pub ulimits: Vec<crate::workload::spec::Ulimit>,
    /// The workload's seccomp filter.
    pub seccomp: crate::workload::seccomp::Seccomp,
    /// Peers (HOST:PORT) a SIGTERM migrates the workload to, in order, instead of stopping it.
    pub evacuate_to: Vec<String>,
    /// After a SIGTERM, no new evacuation attempt starts later than this.
    pub evacuate_within: Duration,
    /// A restore (runc and CRIU) still running after this is killed.
    pub restore_timeout: Duration,
    /// The witness (HOST:PORT, a third `ums` of the group) that outgoing
    /// migrations name as their commit point (`migration::witness`).
    pub witness: Option<String>,
    /// Where the workload's cgroups go: below the outer container's own
    /// (`workload::cgroup::setup` decides it at start).
    pub cgroup_parent: crate::workload::cgroup::Parent,
    /// Pre-copy: the freeze the rounds aim at; they stop once the next
    /// delta would cross the link in this time.
    pub precopy_target_freeze: Duration,
    /// Pre-copy: most rounds while the workload runs (then the final one).
    pub precopy_rounds: u32,
    /// zstd on the wire, as a source (`migration::compress`).
    pub compress: crate::migration::compress::Policy,
}

/// Faults the end-to-end tests inject into a real `ums init` (hidden flag
/// `--failpoint`, or `UMS_FAILPOINT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Failpoint {
    /// Every restore fails just before the runtime is called (after the
    /// bundle is laid out, so the cleanup path runs).
    Restore,
    /// Every restore waits 3 s there: a window in which a test can kill
    /// the destination mid-restore.
    SlowRestore,
    /// Every start waits 3 s once the workload runs, before the start ends
    /// here: the window in which a workload already prints while `ums
    /// status` still says `busy: start`.
    SlowStart,
    /// Every restore's CRIU hangs: runc is handed (`--criu`) a program that
    /// never answers, so only `--restore-timeout` ends the restore.
    HangRestore,
    /// Every restore's CRIU fails: runc is handed (`--criu`) a program that
    /// exits 1 at once, so runc's own error path runs.
    CriuFails,
}

/// Addresses of the link between the outer container and the nested one.
/// Every outer container uses the same ones, so the sockets CRIU restores
/// find their address at any destination.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The outer side of the veth, and the nested container's gateway.
    pub gateway: std::net::Ipv4Addr,
    /// The nested container's address.
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    /// Name of the veth end in the outer container's namespace.
    pub host_if: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            gateway: std::net::Ipv4Addr::new(10, 88, 0, 1),
            address: std::net::Ipv4Addr::new(10, 88, 0, 2),
            prefix_len: 24,
            host_if: "ums0".into(),
        }
    }
}

impl Config {
    pub const DEFAULT_LAYOUT_DIR: &'static str = "/var/lib/ums-image";
    pub const DEFAULT_STATE_DIR: &'static str = "/var/lib/ums";
    pub const DEFAULT_RUN_DIR: &'static str = "/run/ums";
    pub const DEFAULT_PEER_PORT: u16 = 7411;
    pub const DEFAULT_PEER_KEYS: &'static str = "/etc/ums/peer";
    pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(300);

    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join("ums.sock")
    }
    /// Where runc/crun keep their container state (`--root`).
    pub fn runtime_root(&self) -> PathBuf {
        self.run_dir.join("runtime")
    }
    pub fn netns_path(&self) -> PathBuf {
        self.run_dir.join("netns-workload")
    }
    /// Where blobs received from a peer go when `layout_dir` is read-only
    /// (an image layout baked into the outer image usually is).
    pub fn received_layout_dir(&self) -> PathBuf {
        self.state_dir.join("image")
    }
    /// The layouts a workload image is looked up in, in order.
    pub fn layout_candidates(&self) -> [PathBuf; 2] {
        [self.layout_dir.clone(), self.received_layout_dir()]
    }
    pub fn layer_cache(&self) -> PathBuf {
        self.state_dir.join("layers")
    }
    pub fn bundle_dir(&self) -> PathBuf {
        self.state_dir.join("bundle")
    }
    /// Images dirs of checkpoints made for migrations, and received ones.
    pub fn images_root(&self) -> PathBuf {
        self.state_dir.join("images")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layout_dir: Self::DEFAULT_LAYOUT_DIR.into(),
            state_dir: Self::DEFAULT_STATE_DIR.into(),
            run_dir: Self::DEFAULT_RUN_DIR.into(),
            runtime: RuntimeKind::Runc,
            command: Vec::new(),
            standby: false,
            stop_grace: Duration::from_secs(10),
            peer_listen: SocketAddr::from(([0, 0, 0, 0], Self::DEFAULT_PEER_PORT)),
            hostname: None,
            max_checkpoint_bytes: 64 << 30,
            peer_read_timeout: Duration::from_secs(30),
            post_copy_resume: Duration::from_secs(60),
            tcp_established: true,
            peer_keys: Self::DEFAULT_PEER_KEYS.into(),
            insecure_peer: false,
            net: NetConfig::default(),
            publish: Vec::new(),
            hold: crate::net::proxy::HoldConfig::default(),
            listen_drain: Duration::from_millis(500),
            streaming: true,
            kernel_forward: true,
            failpoint: None,
            cpu_hide: Vec::new(),
            ulimits: Vec::new(),
            seccomp: crate::workload::seccomp::Seccomp::Default,
            evacuate_to: Vec::new(),
            evacuate_within: Duration::from_secs(20),
            cgroup_parent: crate::workload::cgroup::Parent::Relative,
            restore_timeout: Self::DEFAULT_RESTORE_TIMEOUT,
            witness: None,
            precopy_target_freeze: Duration::from_millis(500),
            precopy_rounds: 5,
            compress: crate::migration::compress::Policy::Auto,
        }
    }
}
