//! Two hosts, one outer container on each, and the memctr workload between
//! them: what the fault tests and the chaos soak migrate back and forth.
//!
//! Side 0 starts the workload, side 1 is a standby. Either side can be
//! replaced by a fresh standby on the same host (after a kill, or to give it
//! other flags such as a fail point), the way an orchestrator recreates a
//! container.

use std::time::Duration;

use crate::{build_workload, parse_sum, Host, ImageBuilder, OciImage, Outer, OuterBuilder};

pub const PEER_PORT: u16 = 7411;
const T: Duration = Duration::from_secs(60);

/// Options every outer container of a pair gets.
#[derive(Clone, Debug)]
pub struct PairOpts {
    /// MiB of memory the workload touches.
    pub mib: u32,
    /// `--peer-timeout` on both sides (short, so faults settle soon).
    pub peer_timeout: String,
    /// A rate limit on the link (`tc ... tbf rate`), to make a transfer last.
    pub rate: Option<String>,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts { mib: 32, peer_timeout: "3s".into(), rate: None }
    }
}

pub struct Pair {
    pub name: String,
    pub opts: PairOpts,
    pub hosts: [Host; 2],
    pub sides: [Outer; 2],
    pub img: OciImage,
    /// memctr's memory checksum and the content of its file, at the start.
    pub sum0: String,
    pub file0: String,
    pub _tmp: tempfile::TempDir,
}

impl Pair {
    /// Starts the pair; `tweak(side, builder)` may change either side's
    /// builder (side 1 is already a standby).
    pub fn start(name: &str, opts: PairOpts, tweak: impl Fn(usize, OuterBuilder) -> OuterBuilder) -> Pair {
        crate::require_root();
        let tmp = tempfile::tempdir().unwrap();
        let memctr = build_workload(tmp.path());
        let img = ImageBuilder::new(&memctr)
            .cmd(&[&opts.mib.to_string()])
            .env("MEMCTR_FILE", "/data-marker")
            .build(&tmp.path().join("layout"))
            .expect("build the workload image");
        let (ha, hb) = Host::pair(name, opts.rate.as_deref()).unwrap();
        let a = tweak(0, builder(&format!("{name}-a"), &ha, &img, &opts, false)).start().unwrap();
        let b = tweak(1, builder(&format!("{name}-b"), &hb, &img, &opts, true)).start().unwrap();
        a.wait_for_line("tick 3 ", T).unwrap();
        b.wait_for_line("standby", T).unwrap();
        let (sum0, file0) = first_sum_and_file(&a);
        Pair { name: name.into(), opts, hosts: [ha, hb], sides: [a, b], img, sum0, file0, _tmp: tmp }
    }

    /// The peer address of `side`.
    pub fn addr(&self, side: usize) -> String {
        format!("{}:{PEER_PORT}", self.hosts[side].addr())
    }

    /// Replaces `side` with a fresh standby on the same host (the old one is
    /// killed if it still runs); `tweak` may change its builder.
    pub fn replace_with_standby(&mut self, side: usize, tweak: impl FnOnce(OuterBuilder) -> OuterBuilder) {
        let n = crate::unique_name("r");
        let name = format!("{}-{}{}", self.name, ["a", "b"][side], &n[n.len() - 4..]);
        let b = tweak(builder(&name, &self.hosts[side], &self.img, &self.opts, true));
        // The old one goes first: the new one binds the same peer port.
        self.kill(side);
        let placeholder = std::mem::replace(&mut self.sides[side], b.start().unwrap_or_else(|e| panic!("{e:#}")));
        drop(placeholder);
        self.sides[side].wait_for_line("standby", T).unwrap();
    }

    /// Replaces `side` with an outer container that starts the workload
    /// afresh (its checksum and file are then the new ones).
    pub fn restart_workload(&mut self, side: usize) {
        let n = crate::unique_name("w");
        let name = format!("{}-{}{}", self.name, ["a", "b"][side], &n[n.len() - 4..]);
        self.kill(side);
        let o =
            builder(&name, &self.hosts[side], &self.img, &self.opts, false).start().unwrap_or_else(|e| panic!("{e:#}"));
        drop(std::mem::replace(&mut self.sides[side], o));
        self.sides[side].wait_for_line("tick 3 ", T).unwrap();
        (self.sum0, self.file0) = first_sum_and_file(&self.sides[side]);
    }

    /// `ums migrate --json --to OTHER` from `side`, in the background.
    pub fn start_migrate(&self, side: usize) -> std::thread::JoinHandle<std::process::Output> {
        let mut cmd = self.sides[side].command(crate::outer::UMS_IN_OUTER);
        cmd.args(["migrate", "--json", "--mode", "stop-copy", "--to", &self.addr(1 - side)]);
        std::thread::spawn(move || cmd.output().expect("run ums migrate"))
    }

    /// Waits until the images dir at `side` (a destination) holds at least
    /// `mib` MiB: the checkpoint is on its way.
    pub fn wait_receiving(&self, side: usize, mib: u64) {
        let t0 = std::time::Instant::now();
        loop {
            let out = self.sides[side].exec("du", &["-sm", "/var/lib/ums/images"]).unwrap();
            let got: u64 = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if got >= mib {
                return;
            }
            assert!(t0.elapsed() < T, "side {side} never received {mib} MiB");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the outer container of `side` with SIGKILL (as a lost host).
    pub fn kill(&mut self, side: usize) {
        self.sides[side].kill();
    }
}

/// memctr's checksum and file content, as it printed them at its start.
fn first_sum_and_file(o: &Outer) -> (String, String) {
    let lines = o.lines();
    let sum = lines.iter().find_map(|l| parse_sum(l)).expect("memctr printed its checksum");
    let file = lines
        .iter()
        .find(|l| l.starts_with("file "))
        .and_then(|l| l.split_whitespace().nth(2).map(String::from))
        .expect("memctr printed its file");
    (sum, file)
}

fn builder(name: &str, host: &Host, img: &OciImage, opts: &PairOpts, standby: bool) -> OuterBuilder {
    let mut args = vec!["--peer-timeout", &opts.peer_timeout];
    if standby {
        args.push("--standby");
    }
    Outer::builder(name).host(host).layout(&img.layout).args(&args)
}
