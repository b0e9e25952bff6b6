//! `containerd-shim-ums-v1`: the containerd shim v2 of runtime
//! `io.containerd.ums.v1`, on the `containerd-shim` crate.
//!
//! It is a second front door onto the ums library: the OCI runtime's verbs
//! (create, start, exec, kill, pause, resume, checkpoint, restore) are ums's
//! typed runc calls (`ums::process::runtime`), run under ums's reaper
//! (`ums::process::reaper`), with ums's error reports (CRIU's `Error` lines
//! quoted). What is containerd's here is only the protocol: the bundle
//! containerd hands over, its stdio FIFOs, its events. See docs/containerd.md.

mod console;
mod service;
mod stats;
mod stdio;

use containerd_shim::asynchronous::run;
use containerd_shim::Config;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.ums.v1";

fn main() {
    // Two workers: the shim waits on runc and CRIU on the blocking pool,
    // the workers only answer containerd and relay exits.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    // ums's reaper owns waitpid(-1) in the shim (started with the task
    // service), so the crate's own reaping is off.
    let config = Config { no_reaper: true, ..Default::default() };
    rt.block_on(run::<service::UmsShim>(RUNTIME_ID, Some(config)));
}
