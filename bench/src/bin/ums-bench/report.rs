//! Section 4's output: markdown tables of every method side by side, the
//! issue's targets as met or short, and the plot (migration time and
//! downtime against memory size, the wire time as the floor).

use std::fmt::Write as _;
use std::path::Path;

use ums_bench::plot::{Panel, Series, SeriesPoint};

use crate::common::*;
use crate::compare::{Cell, Method};

/// A tc rate (`1gbit`, `500mbit`, `10gbit`) in bits per second.
pub fn rate_bps(rate: &str) -> Option<f64> {
    // "1gbit, compressible memory": the link is the part before the comma.
    let r = rate.split(',').next().unwrap_or("").trim().to_ascii_lowercase();
    let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suffix, m)| r.strip_suffix(suffix).map(|n| (n.to_string(), *m)))?;
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// The time the workload's memory alone needs on the link (size / rate).
pub fn wire_s(link: &str, mib: u32) -> Option<f64> {
    rate_bps(link).map(|bps| mib as f64 * 1048576.0 * 8.0 / bps)
}

fn cell<'a>(cells: &'a [Cell], m: Method, link: &str, mib: u32, procs: u32) -> Option<&'a Cell> {
    cells.iter().find(|c| c.method == m && c.link == link && c.mib == mib && c.procs == procs)
}

fn totals(c: Option<&Cell>) -> Vec<f64> {
    c.map(|c| c.runs.iter().map(|r| r.total_s).collect()).unwrap_or_default()
}

fn med_total(cells: &[Cell], m: Method, link: &str, mib: u32, procs: u32) -> Option<f64> {
    median(&totals(cell(cells, m, link, mib, procs)))
}

fn phase_median(c: &Cell, name: &str) -> Option<f64> {
    let v: Vec<f64> =
        c.runs.iter().filter_map(|r| r.phases.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)).collect();
    median(&v)
}

/// The (link, MiB, processes) points in the order they ran.
fn points(cells: &[Cell]) -> Vec<(String, u32, u32)> {
    let mut v: Vec<(String, u32, u32)> = Vec::new();
    for c in cells {
        let k = (c.link.clone(), c.mib, c.procs);
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

fn links(cells: &[Cell]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for c in cells {
        if !v.contains(&c.link) {
            v.push(c.link.clone());
        }
    }
    v
}

fn methods(cells: &[Cell]) -> Vec<Method> {
    Method::ALL.into_iter().filter(|m| cells.iter().any(|c| c.method == *m)).collect()
}

fn workload_label(mib: u32, procs: u32) -> String {
    if procs > 1 {
        format!("{mib} MiB × {procs} processes")
    } else {
        format!("{mib} MiB")
    }
}

fn md_row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn md_header(out: &mut String, headers: &[String]) {
    md_row(out, headers);
    let _ = writeln!(out, "|{}", headers.iter().map(|_| "---|").collect::<String>());
}

/// One table: a row per workload, a column per method, `f` giving a cell.
fn method_table(
    out: &mut String,
    cells: &[Cell],
    link: &str,
    title: &str,
    wire_col: bool,
    f: impl Fn(&Cell) -> String,
) {
    let ms = methods(cells);
    let _ = writeln!(out, "\n**{title}**\n");
    let mut headers = vec!["workload".to_string()];
    if wire_col {
        headers.push("wire time".into());
    }
    headers.extend(ms.iter().map(|m| m.title().to_string()));
    md_header(out, &headers);
    for (l, mib, procs) in points(cells).into_iter().filter(|p| p.0 == link) {
        let mut row = vec![workload_label(mib, procs)];
        if wire_col {
            row.push(wire_s(&l, mib).map(|w| format!("{w:.2}")).unwrap_or_else(|| "n/a".into()));
        }
        for m in &ms {
            row.push(match cell(cells, *m, &l, mib, procs) {
                None => "not run".into(),
                Some(c) if c.runs.is_empty() => "failed".into(),
                Some(c) => f(c),
            });
        }
        md_row(out, &row);
    }
}

/// The tables, the per-phase breakdown and the failures, in markdown.
pub fn tables(cells: &[Cell], runs: usize) -> String {
    let mut out = String::new();
    for link in links(cells) {
        let _ = writeln!(out, "\n### Link: {link}\n");
        let _ = writeln!(out, "Seconds, median (min–max) of {runs} runs, alternately A→B and B→A.");
        method_table(&mut out, cells, &link, "Migration time (s)", true, |c| {
            fmt_stat_dp(&c.runs.iter().map(|r| r.total_s).collect::<Vec<_>>(), 2)
        });
        method_table(&mut out, cells, &link, "Downtime seen by the workload's counter (s)", false, |c| {
            fmt_stat_dp(&c.runs.iter().map(|r| r.downtime_s).collect::<Vec<_>>(), 2)
        });
        method_table(&mut out, cells, &link, "Bytes on the link, both directions (MiB)", false, |c| {
            fmt_stat_dp(&c.runs.iter().map(|r| r.link_mib).collect::<Vec<_>>(), 1)
        });
        method_table(&mut out, cells, &link, "Phases (s, medians; ums's phases overlap by design)", false, |c| {
            let mut names: Vec<&str> = Vec::new();
            for r in &c.runs {
                for (n, _) in &r.phases {
                    if !names.contains(n) {
                        names.push(n);
                    }
                }
            }
            names
                .iter()
                .filter_map(|n| phase_median(c, n).map(|v| format!("{n} {v:.2}")))
                .collect::<Vec<_>>()
                .join(", ")
        });
        if cells.iter().any(|c| c.link == link && c.method == Method::Ums) {
            let _ = writeln!(out, "\n**ums: growth of a ums process's resident memory while migrating (MiB)**\n");
            md_header(&mut out, &["workload".into(), "source or destination, the larger (MiB)".into()]);
            for (l, mib, procs) in points(cells).into_iter().filter(|p| p.0 == link) {
                if let Some(c) = cell(cells, Method::Ums, &l, mib, procs) {
                    let v: Vec<f64> = c.runs.iter().filter_map(|r| r.mem_mib).collect();
                    md_row(&mut out, &[workload_label(mib, procs), fmt_stat_dp(&v, 1)]);
                }
            }
        }
    }
    let problems: Vec<String> = cells
        .iter()
        .flat_map(|c| {
            let label = format!("{} on {}, {}", c.method.key(), c.link, workload_label(c.mib, c.procs));
            let mut v: Vec<String> = c.error.iter().map(|e| format!("{label}: {e}")).collect();
            for r in &c.runs {
                v.extend(r.notes.iter().map(|n| format!("{label}: {n}")));
            }
            v.dedup();
            v
        })
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\n**Failures and notes**\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    out
}

/// Least-squares line through (x, y); returns (slope, intercept, r²).
pub fn linear_fit(pts: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let n = pts.len() as f64;
    if pts.len() < 3 {
        return None;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 { 1.0 } else { sxy * sxy / (sxx * syy) };
    Some((slope, my - slope * mx, r2))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "SHORT"
    }
}

/// Issue 7's targets, each as met or short with the distance.
pub fn targets(cells: &[Cell]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n### Targets\n");
    let sizes: Vec<(String, u32)> =
        points(cells).into_iter().filter(|p| p.2 == 1).map(|(l, m, _)| (l, m)).collect::<Vec<_>>();
    // 1. Hug the floor.
    let _ = writeln!(out, "1. ums migration time ≤ 1.15 × wire time + 0.5 s, at every size (rate-limited links):");
    for (link, mib) in sizes.iter().filter(|(l, _)| rate_bps(l).is_some()) {
        let (Some(u), Some(w)) = (med_total(cells, Method::Ums, link, *mib, 1), wire_s(link, *mib)) else {
            continue;
        };
        let bound = 1.15 * w + 0.5;
        let _ = writeln!(
            out,
            "   - {link}, {mib} MiB: {u:.2} s against {bound:.2} s: {} ({:+.2} s)",
            verdict(u <= bound),
            u - bound
        );
    }
    // 2. No worse than any other; below stop-then-copy by the dump it overlaps.
    let _ = writeln!(out, "2. ums no slower than any other method, and faster than stop-then-copy by at least");
    let _ = writeln!(out, "   stop-then-copy's checkpoint time (the dump ums overlaps with the transfer):");
    for (link, mib, procs) in points(cells) {
        let Some(u) = med_total(cells, Method::Ums, &link, mib, procs) else { continue };
        let others: Vec<(Method, f64)> = Method::ALL
            .into_iter()
            .filter(|m| m.ums_mode().is_none())
            .filter_map(|m| med_total(cells, m, &link, mib, procs).map(|t| (m, t)))
            .collect();
        let faster: Vec<String> =
            others.iter().filter(|(_, t)| *t < u).map(|(m, t)| format!("{} {t:.2} s", m.key())).collect();
        let mut line = format!(
            "   - {link}, {}: ums {u:.2} s; {}",
            workload_label(mib, procs),
            if faster.is_empty() {
                "none faster: met".to_string()
            } else {
                format!("SHORT, faster: {}", faster.join(", "))
            }
        );
        if let Some(sc) = cell(cells, Method::StopCopy, &link, mib, procs) {
            if let (Some(t), Some(ck)) = (median(&totals(Some(sc))), phase_median(sc, "checkpoint")) {
                let gain = t - u;
                let _ = write!(
                    line,
                    "; stop-then-copy − ums = {gain:.2} s against its checkpoint {ck:.2} s: {}",
                    verdict(gain >= ck)
                );
            }
        }
        let _ = writeln!(out, "{line}");
    }
    // 3. Unlimited link, 512 MiB and above: 1.3 x faster than stop-then-copy.
    let _ = writeln!(out, "3. on the unlimited link, ums ≥ 1.3 × faster than stop-then-copy at 512 MiB and above:");
    for (link, mib) in sizes.iter().filter(|(l, m)| rate_bps(l).is_none() && *m >= 512) {
        if let (Some(u), Some(s)) =
            (med_total(cells, Method::Ums, link, *mib, 1), med_total(cells, Method::StopCopy, link, *mib, 1))
        {
            let _ =
                writeln!(out, "   - {link}, {mib} MiB: {:.2}× ({s:.2} s / {u:.2} s): {}", s / u, verdict(s / u >= 1.3));
        }
    }
    // Issue 14's targets: ums's modes side by side.
    let _ = writeln!(out, "6. (issue 14) pre-copy freeze at 1 GiB on 1 Gbit/s at most 1.5 s (idle workload):");
    for (link, mib) in sizes.iter().filter(|(l, m)| rate_bps(l) == Some(1e9) && !l.contains(',') && *m >= 1024) {
        if let Some(c) = cell(cells, Method::UmsPreCopy, link, *mib, 1) {
            if let Some(d) = median(&c.runs.iter().map(|r| r.downtime_s).collect::<Vec<_>>()) {
                let _ = writeln!(out, "   - {link}, {mib} MiB: {d:.2} s: {}", verdict(d <= 1.5));
            }
        }
    }
    let _ = writeln!(
        out,
        "7. (issue 14) compressible memory: total migration time at most 0.6 × the wire time of its memory:"
    );
    for (link, mib) in sizes.iter().filter(|(l, _)| l.contains("compressible") && rate_bps(l).is_some()) {
        let best = Method::ALL
            .into_iter()
            .filter(|m| m.ums_mode().is_some())
            .filter_map(|m| med_total(cells, m, link, *mib, 1).map(|t| (m, t)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some((m, t)), Some(w)) = (best, wire_s(link, *mib)) {
            let _ = writeln!(
                out,
                "   - {link}, {mib} MiB: best {} {t:.2} s against 0.6 × {w:.2} s = {:.2} s: {}",
                m.key(),
                0.6 * w,
                verdict(t <= 0.6 * w)
            );
        }
    }
    let _ = writeln!(
        out,
        "8. (issue 14) auto at most 10% slower (total) than the best single ums mode, and no longer a freeze than \
         the shortest:"
    );
    for (link, mib, procs) in points(cells) {
        let Some(a) = cell(cells, Method::UmsAuto, &link, mib, procs) else { continue };
        let med = |c: &Cell, f: fn(&crate::compare::Run) -> f64| median(&c.runs.iter().map(f).collect::<Vec<_>>());
        let (Some(at), Some(ad)) = (med(a, |r| r.total_s), med(a, |r| r.downtime_s)) else { continue };
        let singles: Vec<(Method, f64, f64)> = [Method::Ums, Method::UmsPreCopy, Method::UmsPostCopy]
            .into_iter()
            .filter_map(|m| {
                let c = cell(cells, m, &link, mib, procs)?;
                Some((m, med(c, |r| r.total_s)?, med(c, |r| r.downtime_s)?))
            })
            .collect();
        let (Some(bt), Some(bd)) =
            (singles.iter().min_by(|x, y| x.1.total_cmp(&y.1)), singles.iter().min_by(|x, y| x.2.total_cmp(&y.2)))
        else {
            continue;
        };
        let chose = a.runs.iter().flat_map(|r| r.notes.iter()).find(|n| n.starts_with("auto chose")).cloned();
        let _ = writeln!(
            out,
            "   - {link}, {}: auto {at:.2} s against {} {:.2} s: {}; freeze {ad:.2} s against {} {:.2} s: {}{}",
            workload_label(mib, procs),
            bt.0.key(),
            bt.1,
            verdict(at <= 1.1 * bt.1),
            bd.0.key(),
            bd.2,
            verdict(ad <= bd.2),
            chose.map(|c| format!(" ({})", c.split(" (auto").next().unwrap_or(&c))).unwrap_or_default()
        );
    }
    // 4. Memory.
    let mem: Vec<f64> = cells
        .iter()
        .filter(|c| c.method == Method::Ums)
        .flat_map(|c| c.runs.iter().filter_map(|r| r.mem_mib))
        .collect();
    if let Some(s) = stat(&mem) {
        let _ = writeln!(
            out,
            "4. ums memory while migrating ≤ 32 MiB beyond socket buffers: the largest growth of a ums process's \
             resident memory (VmHWM after − VmRSS before, source or destination) in any run was {:.1} MiB: {}",
            s.max,
            verdict(s.max <= 32.0)
        );
    }
    // 5. Linear cost.
    let _ = writeln!(out, "5. cost growing linearly with memory size (least squares over the sizes, 1 process):");
    for link in links(cells) {
        for m in methods(cells) {
            let pts: Vec<(f64, f64)> = sizes
                .iter()
                .filter(|(l, _)| *l == link)
                .filter_map(|(l, mib)| med_total(cells, m, l, *mib, 1).map(|t| (*mib as f64, t)))
                .collect();
            if let Some((slope, icpt, r2)) = linear_fit(&pts) {
                let _ = writeln!(
                    out,
                    "   - {link}, {}: {:.2} s per GiB + {icpt:.2} s, r² = {r2:.4}{}",
                    m.key(),
                    slope * 1024.0,
                    if m == Method::Ums {
                        if r2 >= 0.99 {
                            ": met"
                        } else {
                            ": SHORT (r² < 0.99)"
                        }
                    } else {
                        ""
                    }
                );
            }
        }
    }
    out
}

const COLORS: [[u8; 3]; 7] =
    [[31, 90, 200], [90, 170, 230], [20, 160, 160], [0, 40, 110], [230, 120, 20], [40, 150, 70], [200, 40, 60]];
/// The UMS paper's series: muted, so that the methods measured here stand out.
const PAPER_COLORS: [[u8; 3]; 3] = [[140, 60, 160], [150, 110, 40], [90, 130, 140]];

/// Migration time and downtime against memory size, a panel per link and
/// figure, a line per method, the wire time as the floor.
pub fn plot(cells: &[Cell], path: &Path) -> anyhow::Result<bool> {
    let mut panels = Vec::new();
    for link in links(cells) {
        let sizes: Vec<u32> =
            points(cells).into_iter().filter(|p| p.0 == link && p.2 == 1).map(|p| p.1).collect::<Vec<_>>();
        let link_name = match rate_bps(&link) {
            Some(b) if b >= 1e9 => format!("{} Gbit/s link", b / 1e9),
            Some(b) => format!("{} Mbit/s link", b / 1e6),
            None => format!("{link} link"),
        };
        for (what, pick) in [("migration time", 0), ("downtime", 1)] {
            let series = Method::ALL
                .into_iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let points: Vec<SeriesPoint> = sizes
                        .iter()
                        .filter_map(|mib| {
                            let c = cell(cells, m, &link, *mib, 1)?;
                            let v: Vec<f64> =
                                c.runs.iter().map(|r| if pick == 0 { r.total_s } else { r.downtime_s }).collect();
                            let s = stat(&v)?;
                            Some(SeriesPoint { x: *mib as f64, median: s.median, min: s.min, max: s.max })
                        })
                        .collect();
                    (!points.is_empty()).then(|| Series { label: m.title().into(), color: COLORS[i], points })
                })
                .collect();
            let floor = rate_bps(&link).map(|_| Series {
                label: "wire time (floor)".into(),
                color: [110, 110, 110],
                points: sizes
                    .iter()
                    .filter_map(|mib| {
                        let w = wire_s(&link, *mib)?;
                        Some(SeriesPoint { x: *mib as f64, median: w, min: w, max: w })
                    })
                    .collect(),
            });
            // The UMS paper's own measured migration times (memhog, 1 Gbit/s:
            // container-level, i.e. nesting, and service-level; for
            // orchestrator-level it gives one figure, 6.94 s at 128 MiB on
            // Kubernetes, its Table I), beside ums on a log axis: on a
            // linear one, ums's sub-second points at 0 MiB would sit flat on
            // the axis under the paper's 77 s.
            let mut series: Vec<Series> = series;
            let paper = pick == 0 && rate_bps(&link) == Some(1e9);
            if paper {
                for (i, label) in [(1, "UMS paper: container-level (nesting)"), (2, "UMS paper: service-level")] {
                    let points = crate::migration::UMS_ANCHORS
                        .iter()
                        .map(|a| {
                            let v = if i == 1 { a.1 } else { a.2 };
                            SeriesPoint { x: a.0 as f64, median: v, min: v, max: v }
                        })
                        .collect();
                    series.push(Series { label: label.into(), color: PAPER_COLORS[i - 1], points });
                }
                let (mib, secs) = crate::migration::UMS_ORCHESTRATOR_LEVEL;
                series.push(Series {
                    label: "UMS paper: orchestrator-level (Kubernetes, Table I)".into(),
                    color: PAPER_COLORS[2],
                    points: vec![SeriesPoint { x: mib as f64, median: secs, min: secs, max: secs }],
                });
            }
            panels.push(Panel {
                title: format!("{link_name}: {what}{}", if paper { " (log scale)" } else { "" }),
                x_label: "workload memory (MiB)".into(),
                y_label: "seconds".into(),
                series,
                floor,
                log_y: paper,
            });
        }
    }
    ums_bench::plot::render_panels(
        "live migration of a memhog-like workload: ums beside the alternatives",
        &panels,
        2,
        path,
    )
}

/// The cells of a `compare.md` written earlier, from its migration-time and
/// downtime tables (single-process rows), to draw its figure again without
/// running the benchmark (`ums-bench --replot compare.md`). Each cell gets
/// three runs, the minimum, the median and the maximum of the table, which
/// have the same median and range as the runs it summarised.
pub fn cells_from_markdown(md: &str) -> anyhow::Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = Vec::new();
    let (mut link, mut table, mut methods): (Option<String>, Option<usize>, Vec<Option<Method>>) = (None, None, vec![]);
    for line in md.lines() {
        if let Some(l) = line.strip_prefix("### Link: ") {
            link = Some(l.trim().to_string());
            table = None;
        } else if line.starts_with("**Migration time") {
            table = Some(0);
        } else if line.starts_with("**Downtime") {
            table = Some(1);
        } else if line.starts_with("**") {
            table = None;
        } else if let (Some(link), Some(t), true) = (&link, table, line.starts_with('|')) {
            let cols: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cols[0] == "workload" {
                methods = cols.iter().map(|c| Method::ALL.into_iter().find(|m| m.title() == *c)).collect();
                continue;
            }
            let Some(mib) = cols[0].strip_suffix(" MiB").and_then(|m| m.parse::<u32>().ok()) else { continue };
            for (i, col) in cols.iter().enumerate() {
                let Some(Some(m)) = methods.get(i) else { continue };
                // "0.48 (0.36–0.55)"
                let nums: Vec<f64> = col
                    .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| s.parse().ok())
                    .collect();
                let [median, min, max] = nums[..] else { continue };
                let c = match cells.iter_mut().position(|c| c.method == *m && &c.link == link && c.mib == mib) {
                    Some(k) => &mut cells[k],
                    None => {
                        let run = |_| crate::compare::Run {
                            total_s: f64::NAN,
                            downtime_s: f64::NAN,
                            link_mib: f64::NAN,
                            phases: vec![],
                            mem_mib: None,
                            notes: vec![],
                            after_s: 0.0,
                        };
                        cells.push(Cell {
                            method: *m,
                            link: link.clone(),
                            mib,
                            procs: 1,
                            runs: (0..3).map(run).collect(),
                            error: None,
                        });
                        cells.last_mut().expect("just pushed")
                    }
                };
                for (r, v) in c.runs.iter_mut().zip([min, median, max]) {
                    if t == 0 {
                        r.total_s = v;
                    } else {
                        r.downtime_s = v;
                    }
                }
            }
        }
    }
    anyhow::ensure!(!cells.is_empty(), "no migration-time or downtime table found");
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_comparison_draws_again_with_the_papers_points() {
        let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench/compare.md")).unwrap();
        let cells = cells_from_markdown(&md).unwrap();
        let ums = cell(&cells, Method::Ums, "1gbit", 1024, 1).expect("ums at 1024 MiB on 1gbit");
        let (t, d): (Vec<f64>, Vec<f64>) = ums.runs.iter().map(|r| (r.total_s, r.downtime_s)).unzip();
        assert_eq!(stat(&t).unwrap().median, 10.08);
        assert_eq!((stat(&t).unwrap().min, stat(&t).unwrap().max), (9.99, 10.68));
        assert_eq!(stat(&d).unwrap().median, 9.81);
        assert!(cell(&cells, Method::Podman, "unlimited", 0, 1).is_some() || links(&cells).len() == 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("compare.png");
        plot(&cells, &path).unwrap();
        assert!(ums_bench::plot::read_png(&path).unwrap().non_white() > 20_000);
    }

    #[test]
    fn rates_and_wire() {
        assert_eq!(rate_bps("1gbit"), Some(1e9));
        assert_eq!(rate_bps("10gbit"), Some(1e10));
        assert_eq!(rate_bps("500mbit"), Some(5e8));
        assert_eq!(rate_bps("unlimited"), None);
        let w = wire_s("1gbit", 1024).unwrap();
        assert!((w - 8.589934592).abs() < 1e-9);
    }

    #[test]
    fn fit_of_a_line() {
        let (m, b, r2) = linear_fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((m - 2.0).abs() < 1e-12 && (b - 1.0).abs() < 1e-12 && (r2 - 1.0).abs() < 1e-12);
        assert!(linear_fit(&[(0.0, 1.0), (1.0, 3.0)]).is_none());
    }
}
