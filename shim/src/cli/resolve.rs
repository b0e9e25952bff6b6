//! `ums resolve --thaw | --abandon`: settle a migration that is in doubt (the
//! destination did not say whether it runs the workload). Both are the
//! operator's call, and each prints what it risks.

use super::{finish, request, ClientOpts};
use crate::migration::in_doubt::{warning, Resolution};
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the frozen copy here again, and keep telling the destination to end any copy it runs.
    #[arg(long, conflicts_with = "abandon", required_unless_present = "abandon")]
    pub thaw: bool,
    /// End the frozen copy here, trusting that the destination runs the workload.
    #[arg(long)]
    pub abandon: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let action = if a.thaw { Resolution::Thaw } else { Resolution::Abandon };
    eprintln!("ums: warning: {}", warning(action));
    let r = request(&a.client.socket, Request::Resolve { action })?;
    finish(&a.client, r, |v| {
        println!("resolved {}: {}", v["migration_id"].as_str().unwrap_or("?"), v["outcome"].as_str().unwrap_or("-"));
    })
}
