//! `ums restore DIR`: bring a checkpointed workload back (this outer container
//! must be in standby, started from the same workload image).

use std::path::PathBuf;

use super::{finish, request, secs, ClientOpts};
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A directory written by `ums checkpoint`.
    pub dir: PathBuf,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let dir = std::path::absolute(&a.dir)?;
    let r = request(&a.client.socket, Request::Restore { dir })?;
    finish(&a.client, r, |v| {
        println!("restored");
        println!("  restore  {}", secs(&v["restore_ms"]));
        println!("  total    {}", secs(&v["total_ms"]));
    })
}
