//! `ums migrate --to HOST:PORT`: live-migrate the workload and print the
//! per-phase table (in the manner of CloudHopper's Table III).

use super::{finish, request, ClientOpts};
use crate::migration::postcopy::Mode;
use crate::supervisor::control::Request;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The peer port of the destination outer container.
    #[arg(long)]
    pub to: String,
    /// How memory moves: `auto` (the default: chooses one of the others from
    /// the workload's memory, a short sample of its dirty rate, the link rate
    /// measured by a probe, and what both sides support; the report says
    /// which and why), `stop-copy` (all of it while the workload is frozen),
    /// `pre-copy` (rounds while it runs, each sending only the pages that
    /// changed, found by content; then a short freeze for the last changes;
    /// tuned by `ums init --precopy-target-freeze` and `--precopy-rounds` at
    /// the source) or `post-copy` (the workload runs at the destination at
    /// once and its memory follows; needs userfaultfd there and
    /// fs.pipe-max-size >= 4 MiB here).
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// `auto` never chooses post-copy (whose workload memory lives on both
    /// hosts until the last page arrived).
    #[arg(long)]
    pub no_post_copy: bool,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// The table printed after a migration, from its JSON report.
pub fn table(v: &serde_json::Value) -> String {
    let s =
        |k: &str| v[k].as_f64().map(|ms| format!("{:>10.3} s", ms / 1000.0)).unwrap_or_else(|| format!("{:>12}", "-"));
    let mib = v["bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
    let mut out = String::new();
    out.push_str(&format!(
        "migrated to {} ({}, {})\n",
        v["peer"].as_str().unwrap_or("?"),
        v["migration_id"].as_str().unwrap_or(""),
        v["mode"].as_str().unwrap_or("stop-copy")
    ));
    if let Some(c) = v["choice"].as_str() {
        out.push_str(&format!("mode: {c}\n"));
    }
    out.push_str("phase                    time\n");
    out.push_str(&format!("pre-migration    {}\n", s("pre_migration_ms")));
    out.push_str(&format!(
        "checkpoint       {}   (freeze {:.3} s + CRIU dump)\n",
        s("checkpoint_ms"),
        v["freeze_ms"].as_f64().unwrap_or(0.0) / 1000.0
    ));
    out.push_str(&format!(
        "transfer         {}   ({})\n",
        s("transfer_ms"),
        if v["streaming"].as_bool() == Some(true) {
            "from the start of the dump: they overlap"
        } else {
            "after the dump"
        }
    ));
    if let Some(rounds) = v["rounds"].as_array() {
        out.push_str("pre-copy rounds  (while the workload ran)\n");
        out.push_str("  round        sent     pages sent / in dump     pause      send\n");
        for r in rounds {
            out.push_str(&format!(
                "  {:>5} {:>8.1} MiB  {:>10} / {:<10} {:>7.3} s {:>7.3} s\n",
                r["round"].as_u64().unwrap_or(0),
                r["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                r["pages_sent"].as_u64().unwrap_or(0),
                r["pages"].as_u64().unwrap_or(0),
                r["pause_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                r["send_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            ));
        }
        let f = &v["final_round"];
        out.push_str(&format!(
            "  final {:>8.1} MiB  {:>10} / {:<10} {:>7.3} s   (frozen: the freeze below)\n",
            f["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            f["pages_sent"].as_u64().unwrap_or(0),
            f["pages"].as_u64().unwrap_or(0),
            f["freeze_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        ));
        out.push_str(&format!(
            "  stopped by {} (link {:.1} MiB/s)\n",
            v["stop_reason"].as_str().unwrap_or("?"),
            v["link_rate_mib_s"].as_f64().unwrap_or(0.0)
        ));
    }
    out.push_str(&format!("restore          {}\n", s("restore_ms")));
    if let Some(skipped) = v["in_flight_skipped"].as_u64() {
        out.push_str(&format!(
            "in flight        {skipped:>10}     (connections not yet accepted at the freeze, after a {:.3} s drain; reset)\n",
            v["listen_drain_ms"].as_f64().unwrap_or(0.0) / 1000.0
        ));
    }
    out.push_str(&format!("downtime         {}   (workload frozen until the destination ran it)\n", s("frozen_ms")));
    let post_copy = v["mode"] == "post-copy";
    out.push_str(&format!(
        "total            {}   (request until {})\n",
        s("total_ms"),
        if post_copy { "the last page arrived" } else { "the workload ran at the destination" }
    ));
    if v["in_doubt_ms"].as_f64().unwrap_or(0.0) > 0.0 {
        out.push_str(&format!(
            "in doubt         {}   (no word from the destination; frozen here, asking: not downtime)\n",
            s("in_doubt_ms")
        ));
    }
    if post_copy {
        out.push_str(&format!(
            "last page        {}   (from the freeze; the source stayed frozen until then)\n",
            s("last_page_ms")
        ));
        out.push_str(&format!(
            "memory after     {:>10.1} MiB  (moved after the destination ran; {:.1} MiB before)\n",
            v["bytes_after_running"].as_f64().unwrap_or(0.0) / 1048576.0,
            v["bytes_before_running"].as_f64().unwrap_or(0.0) / 1048576.0
        ));
        if let (Some(f), Some(b)) = (v["pages_on_fault"].as_u64(), v["pages_in_background"].as_u64()) {
            out.push_str(&format!("pages            {f:>10} on fault, {b} pushed in the background\n"));
        }
    }
    if v.get("finish_ms").is_some() {
        out.push_str(&format!("then             {}   (ending the frozen copy here)\n", s("finish_ms")));
    }
    out.push_str(&format!(
        "bytes            {:>10.1} MiB  (+{:.1} MiB image blobs{})\n",
        mib,
        v["blob_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if post_copy {
            "; the checkpoint without its memory"
        } else if v["rounds"].is_array() {
            "; the final round only"
        } else {
            ""
        }
    ));
    let c = &v["compression"];
    if let (Some(data), Some(wire)) = (c["data_bytes"].as_f64(), c["wire_bytes"].as_f64()) {
        out.push_str(&format!(
            "on the wire      {:>10.1} MiB  (of {:.1} MiB of data: ratio {:.2}, {})\n",
            wire / 1048576.0,
            data / 1048576.0,
            c["ratio"].as_f64().unwrap_or(1.0),
            match c["level"].as_i64() {
                Some(l) if l > 0 => format!("zstd level {l}, {} chunks compressed", c["chunks_compressed"]),
                _ => "not compressed".to_string(),
            }
        ));
    }
    // Post-copy's memory moves after the transfer phase, pre-copy's mostly
    // before it (its link rate is in the rounds above): no rate to show.
    if !post_copy && !v["rounds"].is_array() {
        out.push_str(&format!("throughput       {:>10.1} MiB/s\n", v["throughput_mib_s"].as_f64().unwrap_or(0.0)));
    }
    out
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    let req = Request::Migrate { to: a.to.clone(), mode: a.mode, no_post_copy: a.no_post_copy };
    // Live progress only for a person watching: a terminal, and no --json.
    let live = (!a.client.json && std::io::stdout().is_terminal()).then(|| Live::start(a.client.socket.clone()));
    let r = request(&a.client.socket, req);
    drop(live);
    finish(&a.client, r?, |v| print!("{}", table(v)))
}

/// The progress bar of a migration under way: a thread that asks `status`
/// four times a second on its own connection and draws
/// `operation.progress` (phase, bytes, rate, time left) until dropped.
struct Live {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Live {
    fn start(socket: std::path::PathBuf) -> Live {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            // Hidden until the first phase arrives.
            let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
            let mut phase = String::new();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = rt.block_on(crate::supervisor::control::call(&socket, &Request::Status)) {
                    let p = r.result.as_ref().map(|v| v["operation"]["progress"].clone()).unwrap_or_default();
                    draw(&bar, &p, &mut phase);
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            bar.finish_and_clear();
        });
        Live { stop, thread: Some(thread) }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One update of the bar from `operation.progress`.
fn draw(bar: &indicatif::ProgressBar, p: &serde_json::Value, shown: &mut String) {
    let Some(phase) = p["phase"].as_str() else { return };
    let done = p["phase_bytes"].as_u64().unwrap_or(0);
    let expected = p["phase_expected_bytes"].as_u64();
    let first = shown.is_empty();
    if phase != shown {
        *shown = phase.to_string();
        bar.reset();
        bar.set_length(expected.unwrap_or(0).max(done));
        bar.set_position(done);
        let template = match expected {
            Some(_) => "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {prefix}",
            None => "{spinner} {msg} {bytes} {prefix}",
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(phase.to_string());
    }
    // ums's own rate over the phase (indicatif's estimate jumps at a phase's start).
    let rate = p["rate_bytes_s"].as_f64().unwrap_or(0.0);
    let mut prefix = if rate > 0.0 { format!("{:.1} MiB/s", rate / 1048576.0) } else { String::new() };
    if let Some(eta) = p["eta_s"].as_f64() {
        prefix.push_str(&format!(", ~{eta:.0} s left"));
    }
    bar.set_prefix(prefix);
    bar.set_length(expected.unwrap_or(0).max(done));
    bar.set_position(done);
    // Shown only now, with its style and figures set.
    if first {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stdout());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_shows_post_copy_figures_only_for_post_copy() {
        let mut v = serde_json::json!({
            "peer": "p", "migration_id": "m-1", "mode": "post-copy", "frozen_ms": 500.0, "last_page_ms": 2700.0,
            "bytes_before_running": 3145728, "bytes_after_running": 268435456,
        });
        let t = super::table(&v);
        assert!(t.contains("post-copy") && t.contains("last page") && t.contains("256.0 MiB"), "{t}");
        assert!(t.contains("until the last page arrived") && !t.contains("throughput"), "{t}");
        v["mode"] = "stop-copy".into();
        let t = super::table(&v);
        assert!(!t.contains("last page") && t.contains("throughput"), "{t}");
        assert!(!t.contains("on the wire"), "{t}");
        v["compression"] = serde_json::json!({"level": 3, "data_bytes": 268435456u64, "wire_bytes": 67108864u64,
                                              "ratio": 4.0, "chunks_compressed": 256});
        let t = super::table(&v);
        assert!(t.contains("on the wire") && t.contains("64.0 MiB") && t.contains("ratio 4.00, zstd level 3"), "{t}");
        assert!(!t.contains("pre-copy rounds"), "{t}");
    }

    #[test]
    fn the_table_shows_each_pre_copy_round() {
        let v = serde_json::json!({
            "peer": "p", "migration_id": "m-1", "mode": "pre-copy", "frozen_ms": 700.0, "bytes": 3145728,
            "rounds": [
                {"round": 1, "bytes": 268435456, "pages": 65536, "pages_sent": 65536, "pause_ms": 310.0, "send_ms": 2200.0},
                {"round": 2, "bytes": 4194304, "pages": 65536, "pages_sent": 1024, "pause_ms": 290.0, "send_ms": 40.0},
            ],
            "final_round": {"bytes": 3145728, "pages": 65536, "pages_sent": 700, "freeze_ms": 700.0},
            "stop_reason": "the round limit", "link_rate_mib_s": 117.0,
        });
        let t = super::table(&v);
        assert!(!t.contains("mode: "), "{t}");
        let mut v = v;
        v["choice"] = "pre-copy (auto: 256 MiB, dirty 2.0 MiB/s, link 117 MiB/s: rounds converge)".into();
        let t = super::table(&v);
        assert!(t.lines().nth(1).unwrap().starts_with("mode: pre-copy (auto: 256 MiB"), "{t}");
        assert!(t.contains("pre-copy rounds") && t.contains("256.0 MiB") && t.contains("1024 / 65536"), "{t}");
        assert!(t.contains("final") && t.contains("700 / 65536") && t.contains("the round limit"), "{t}");
        assert!(t.contains("the final round only") && !t.contains("throughput"), "{t}");
    }
}
