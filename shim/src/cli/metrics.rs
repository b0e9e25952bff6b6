//! `ums metrics`: the Prometheus text that `--metrics-listen` serves, read
//! through the control socket (no port needed).

use super::{print_error, request, ClientOpts};
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientOpts,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let r = request(&a.client.socket, Request::Metrics)?;
    if a.client.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    if !r.ok {
        return Ok(print_error(&r));
    }
    if !a.client.json {
        let text = r.result.as_ref().and_then(|v| v["text"].as_str()).unwrap_or("");
        print!("{text}");
    }
    Ok(0)
}
