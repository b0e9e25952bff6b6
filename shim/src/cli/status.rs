//! `ums status`: what runs here, and the last operation.

use super::{finish, request, ClientOpts};
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub client: ClientOpts,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let r = request(&a.client.socket, Request::Status)?;
    finish(&a.client, r, |v| {
        println!("state:      {}", v["state"].to_string().trim_matches('"'));
        println!("runtime:    {}", v["runtime"].as_str().unwrap_or("-"));
        println!("peer port:  {}", v["peer_listen"].as_str().unwrap_or("-"));
        let w = &v["workload"];
        if w.is_null() {
            println!("workload:   none (standby)");
        } else {
            println!(
                "workload:   {} pid {} ({} processes)",
                w["id"].as_str().unwrap_or("-"),
                w["pid"],
                w["pids"].as_array().map_or(0, |a| a.len())
            );
            println!("image:      {}", w["image_digest"].as_str().unwrap_or("-"));
            println!("command:    {}", w["command"]);
            println!("ports:      {}", w["exposed_ports"]);
            println!("uptime:     {:.1} s", w["uptime_s"].as_f64().unwrap_or(0.0));
        }
        let p = &v["published"];
        if let Some(ports) = p["ports"].as_array() {
            let list: Vec<String> = ports
                .iter()
                .map(|x| format!("{}->{}/{}", x["outer"], x["inner"], x["proto"].as_str().unwrap_or("?")))
                .collect();
            println!(
                "published:  {} mode {} (open {}, held {} now, {} in all, {} forwarded, {} refused)",
                if list.is_empty() { "none".to_string() } else { list.join(" ") },
                p["mode"],
                p["open_connections"],
                p["held_now"],
                p["held_total"],
                p["forwarded_total"],
                p["refused_total"]
            );
        }
        let op = &v["last_op"];
        if !op.is_null() {
            let status = if op["ok"].as_bool() == Some(true) {
                "ok".to_string()
            } else {
                format!("failed: {}", op["error"].as_str().unwrap_or(""))
            };
            println!(
                "last op:    {} {} {}",
                op["op"].as_str().unwrap_or("-"),
                status,
                if op["timings"].is_null() { String::new() } else { op["timings"].to_string() }
            );
        }
        println!(
            "ums:        pid {} rss {} KiB, {} orphans reaped",
            v["ums"]["pid"], v["ums"]["rss_kib"], v["orphans_reaped"]
        );
    })
}
