//! `ums-bench-tls`: what mutual TLS costs a live migration. The same
//! migration (memctr at each size, between two hosts joined by a veth pair
//! with a rate limit) with the peer key set (TLS 1.3) and with
//! `--insecure-peer` (plain TCP), side by side, interleaved run by run so
//! drift on this shared machine hits both alike.
//!
//!     ums-bench-tls [--runs N] [--sizes 128,1024] [--rate 1gbit|none]
//!
//! Prints a table (median and min–max of N runs): migration time (the
//! migrate request until the workload runs at the destination), time frozen,
//! and the TLS/plain ratio. Nothing is asserted. Needs root, runc, CRIU and
//! the ums binary (`$UMS_BIN`; use a release build).

use std::time::Duration;

use anyhow::{bail, Context};
use ums_e2e::{build_workload, Host, ImageBuilder, Outer};

const T: Duration = Duration::from_secs(120);

struct Sample {
    total_ms: f64,
    frozen_ms: f64,
    bytes: u64,
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn fmt(v: &[f64]) -> String {
    let (m, lo, hi) = stats(v);
    format!("{:>7.2} s ({:.2}–{:.2})", m / 1000.0, lo / 1000.0, hi / 1000.0)
}

fn one(img: &std::path::Path, rate: Option<&str>, tls: bool, mib: u32) -> anyhow::Result<Sample> {
    let (ha, hb) = Host::pair("btls", rate)?;
    let mode = if tls { "tls" } else { "plain" };
    let mut ab = Outer::builder(&format!("btls-{mode}-a")).host(&ha).layout(img);
    let mut bb = Outer::builder(&format!("btls-{mode}-b")).host(&hb).layout(img).args(&["--standby"]);
    if !tls {
        (ab, bb) = (ab.insecure_peer(), bb.insecure_peer());
    }
    let a = ab.start()?;
    let b = bb.start()?;
    a.wait_for_line("tick 3 ", T)?;
    b.wait_for_line("standby", T)?;
    let out = a.ums(&["migrate", "--json", "--mode", "stop-copy", "--to", &format!("{}:7411", hb.addr())])?;
    if !out.status.success() {
        bail!("{mode} migration of {mib} MiB failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("migration report")?;
    let r = &v["result"];
    let peer = r["peer"].as_str().unwrap_or("");
    if tls == peer.starts_with("insecure") {
        bail!("{mode} migration went over the wrong transport: peer {peer}");
    }
    Ok(Sample {
        total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
        frozen_ms: r["frozen_ms"].as_f64().unwrap_or(0.0),
        bytes: r["bytes"].as_u64().unwrap_or(0),
    })
}

fn main() -> anyhow::Result<()> {
    let mut runs = 3usize;
    let mut sizes = vec![128u32, 1024];
    let mut rate = Some("1gbit".to_string());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().context("a value after the option");
        match a.as_str() {
            "--runs" => runs = val()?.parse()?,
            "--sizes" => sizes = val()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
            "--rate" => rate = Some(val()?).filter(|r| r != "none"),
            _ => bail!("usage: ums-bench-tls [--runs N] [--sizes 128,1024] [--rate 1gbit|none]"),
        }
    }
    ums_e2e::require_root();
    let ums = ums_e2e::ums_bin()?;
    eprintln!("ums: {}", ums.display());
    let tmp = tempfile::tempdir()?;
    let memctr = build_workload(tmp.path());
    println!(
        "migration with mutual TLS vs --insecure-peer, link {}, {runs} runs each, interleaved",
        rate.as_deref().unwrap_or("unlimited")
    );
    println!("{:>6}  {:<6} {:>28} {:>28} {:>10}", "MiB", "peer", "migration time", "frozen", "MiB sent");
    for mib in sizes {
        let img =
            ImageBuilder::new(&memctr).cmd(&[&mib.to_string()]).build(&tmp.path().join(format!("layout-{mib}")))?;
        let mut res: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for run in 0..runs {
            // Alternate which goes first, so neither always runs on a warmer machine.
            let order = if run % 2 == 0 { [true, false] } else { [false, true] };
            for tls in order {
                let s = one(&img.layout, rate.as_deref(), tls, mib)?;
                eprintln!("  {mib} MiB {} run {}: {:.0} ms", if tls { "tls" } else { "plain" }, run + 1, s.total_ms);
                res[tls as usize].push(s);
            }
        }
        let total = |i: usize| res[i].iter().map(|s| s.total_ms).collect::<Vec<_>>();
        let frozen = |i: usize| res[i].iter().map(|s| s.frozen_ms).collect::<Vec<_>>();
        for (i, name) in [(0, "plain"), (1, "tls")] {
            let mb = res[i].iter().map(|s| s.bytes).max().unwrap_or(0) as f64 / 1048576.0;
            println!("{mib:>6}  {name:<6} {:>28} {:>28} {mb:>10.1}", fmt(&total(i)), fmt(&frozen(i)));
        }
        let ratio = stats(&total(1)).0 / stats(&total(0)).0;
        println!("{mib:>6}  tls/plain migration time (medians): {ratio:.3} ({:+.1} %)", (ratio - 1.0) * 100.0);
    }
    Ok(())
}
