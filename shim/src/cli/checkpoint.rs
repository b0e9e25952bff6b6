//! `ums checkpoint DIR`: dump the workload into DIR (and leave it running,
//! unless --stop).

use std::path::PathBuf;

use super::{finish, request, secs, ClientOpts};
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the checkpoint into (empty or absent; path inside the outer container).
    pub dir: PathBuf,
    /// Stop the workload after the dump instead of letting it run on.
    #[arg(long)]
    pub stop: bool,
    /// Send the memory pages to a `criu page-server` at IP:PORT while dumping
    /// (DIR then gets everything else; restore needs both put together).
    #[arg(long, value_name = "IP:PORT")]
    pub page_server: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let dir = std::path::absolute(&a.dir)?;
    let r = request(
        &a.client.socket,
        Request::Checkpoint {
            dir: dir.clone(),
            leave_running: !a.stop,
            page_server: a.page_server.map(|s| s.to_string()),
        },
    )?;
    finish(&a.client, r, |v| {
        println!("checkpoint written to {}", dir.display());
        println!("  freeze   {}", secs(&v["freeze_ms"]));
        println!("  dump     {}", secs(&v["dump_ms"]));
        println!("  rootfs   {}", secs(&v["diff_ms"]));
        println!("  total    {}", secs(&v["total_ms"]));
    })
}
