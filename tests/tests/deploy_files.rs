//! The operator files in deploy/ checked with the tools' own validators
//! (`make test-image`): the Prometheus alert rules with `promtool check
//! rules` and `promtool test rules` (their unit tests), the Grafana
//! dashboard's queries with promtool's PromQL parser, and every metric the
//! rules and the dashboard name against what a real `ums` exports.
//!
//! Needs promtool (Debian package `prometheus`, installed by
//! image/install-image-deps.sh); compiled only with `--features image-tests`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ums_e2e::*;

fn promtool() -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join("promtool").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`promtool` not found on PATH: install the Debian package prometheus (bash image/install-image-deps.sh)"
    );
    Command::new("promtool")
}

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn promtool_ok(args: &[&str], dir: &Path) -> String {
    let out = promtool().args(args).current_dir(dir).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

/// The queries of the Grafana dashboard, with Grafana's variables replaced
/// by what Grafana would put there.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/ums-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(d["title"].is_string() && d["uid"].is_string(), "a dashboard needs a title and a uid");
    let panels = d["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title").to_string();
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel id twice: {title}");
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$job", ".+")
                .replace('\n', " ");
            queries.push((title.clone(), expr));
        }
    }
    queries
}

/// Metric names in a PromQL expression or rules file: `ums_...` and
/// `process_...` identifiers (not inside label matchers' values).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts = (rest.starts_with("ums_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = deploy("prometheus");
    let out = promtool_ok(&["check", "rules", "ums-alerts.yaml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool_ok(&["test", "rules", "ums-alerts.test.yaml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    // The alerts the docs promise.
    let rules = std::fs::read_to_string(dir.join("ums-alerts.yaml")).unwrap();
    for alert in ["UmsMigrationInDoubt", "UmsMigrationFailed", "UmsSlowFreeze", "UmsWorkloadNotRunning", "UmsDown"] {
        assert!(rules.contains(&format!("alert: {alert}")), "no alert {alert}");
        let tests = std::fs::read_to_string(dir.join("ums-alerts.test.yaml")).unwrap();
        assert!(tests.contains(&format!("alertname: {alert}")), "alert {alert} has no unit test");
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    // promtool has no bare-query check; a rules file of recording rules, one
    // per query, goes through the same PromQL parser.
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: ums-dashboard\n    rules:\n");
    for (i, (title, expr)) in dashboard_queries().iter().enumerate() {
        let quoted = serde_json::to_string(expr).unwrap();
        rules.push_str(&format!("      # {title}\n      - record: ums_dashboard_query_{i}\n        expr: {quoted}\n"));
    }
    std::fs::write(tmp.path().join("dashboard.rules.yaml"), &rules).unwrap();
    let out = promtool_ok(&["check", "rules", "dashboard.rules.yaml"], tmp.path());
    assert!(out.contains("SUCCESS"), "{out}\n{rules}");
}

#[test]
fn every_metric_the_rules_and_dashboard_use_is_one_ums_exports() {
    require_root();
    // A real ums (a standby: no workload needed) says what it exports.
    let o = Outer::builder("deploy-metrics").args(&["--standby"]).start().unwrap();
    o.wait_for_line("standby", Duration::from_secs(60)).unwrap();
    let text = o.ums_ok(&["metrics"]).unwrap();
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split(' ');
            let (name, kind) = (f.next().unwrap(), f.next().unwrap());
            exported.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{s}"));
                }
            }
        }
    }
    assert!(exported.contains("ums_migration_in_doubt"), "{text}");
    let rules = std::fs::read_to_string(deploy("prometheus/ums-alerts.yaml")).unwrap();
    let mut used = metric_names(&rules);
    for (_, q) in dashboard_queries() {
        used.extend(metric_names(&q));
    }
    let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(unknown.is_empty(), "deploy/ names metrics ums does not export: {unknown:?}\nexported: {exported:?}");
    assert!(used.len() >= 15, "{used:?}");
}
