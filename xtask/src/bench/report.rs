//! The report: markdown table (median and min–max of the rounds), JSON with every sample, and SVG
//! bar charts of the headline comparisons, under `benches/results/`.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::targets::{self, Tools};
use super::{Results, Row, Scale, Workload};

/// Machine, kernel, versions, and how the run was made.
pub struct Header {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gb: f64,
    pub kernel: String,
    pub versions: Vec<(&'static str, String)>,
    pub rounds: usize,
    pub scale: String,
    pub seconds: f64,
}

fn first_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            // nginx -v writes to stderr.
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "unknown".into())
}

impl Header {
    pub fn collect(
        root: &Path,
        tools: &Tools,
        scale: &Scale,
        workloads: &[Workload],
        started: Instant,
    ) -> Header {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
        let memory_gb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let mut rev = git(&["rev-parse", "--short", "HEAD"]);
        if !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            rev.push_str("-dirty");
        }
        let versions = vec![
            ("wsplice", format!("git {rev}")),
            ("nginx", first_line(&tools.nginx, &["-v"])),
            ("haproxy", first_line(&tools.haproxy, &["-v"])),
            ("rustc", first_line(Path::new("rustc"), &["-V"])),
            ("openssl", first_line(Path::new("openssl"), &["version"])),
        ];
        Header {
            date: first_line(Path::new("date"), &["-u", "+%Y-%m-%d %H:%M UTC"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gb,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            versions,
            rounds: scale.rounds,
            scale: format!(
                "workloads {}; {} s per bulk/storm/latency run, hold {} tunnels, fleet {} conns over {} s, \
                 http {} s after {} s of warm-up",
                workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(", "),
                scale.seconds,
                scale.hold,
                scale.fleet,
                scale.fleet_window,
                scale.http_seconds,
                scale.warmup
            ),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// Median, min, max of the samples.
pub fn summary(samples: &[f64]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some((median, sorted[0], sorted[n - 1]))
}

fn median(row: &Row, target: usize) -> Option<f64> {
    row.cells
        .get(target)
        .and_then(|c| summary(&c.samples))
        .map(|s| s.0)
}

pub(super) fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Ratio columns: (label, numerator target, denominator target).
const RATIOS: [(&str, usize, usize); 4] = [
    ("haproxy / nginx", 2, 1),
    ("userspace / nginx", 3, 1),
    ("kernel / nginx", 4, 1),
    ("auto / nginx", 5, 1),
];

/// The order of the table's rows.
const ROW_ORDER: [&str; 27] = [
    "bulk1",
    "bulk16",
    "storm",
    "latency_p50",
    "latency_p99",
    "hold_rss",
    "hold_slab",
    "hold_machine",
    "fleet_p50",
    "fleet_p99",
    "fleet_messages",
    "fleet_failures",
    "fleet_cpu",
    "fleet_cpu_proxy",
    "wss_storm_full",
    "wss_storm_resumed",
    "wss_storm_resumed_share",
    "wss_storm_full_cpu",
    "wss_storm_resumed_cpu",
    "wss_bulk1",
    "wss_hold_rss",
    "http_rps",
    "http_p50",
    "http_p99",
    "http_cpu",
    "http_errors",
    "http_upstream",
];

/// Rows without ratio columns: counts, not performance.
const NO_RATIO: [&str; 4] = [
    "fleet_failures",
    "wss_storm_resumed_share",
    "http_errors",
    "http_upstream",
];

fn markdown(header: &Header, results: &Results) -> String {
    let mut out = format!(
        "Measured {} on {} ({} cores, {:.0} GiB, Linux {}). Versions: {}.\n\n\
         Same load generator (`wsplice-load`) and echo upstream (`wsplice echo`) for every target; \
         targets run in alternation (direct, nginx, haproxy, wsplice userspace, wsplice kernel, \
         wsplice auto: userspace first, promoted to the kernel after 1 s or 1 MiB), \
         {} round(s); each cell is the median, with the min–max of the rounds in parentheses. \
         Every proxy runs 2 workers (nginx worker_processes 2, HAProxy nbthread 2, wsplice --workers 2). \
         CPU is machine-wide (/proc/stat: user+nice+system+irq+softirq+steal of all CPUs) over the \
         measured window; the proxy's share is that minus the direct run's of the same round. \
         Lower is better for latency, memory, CPU and failures. {}. Whole run {:.0} s.\n\n",
        header.date,
        header.cpu,
        header.cores,
        header.memory_gb,
        header.kernel,
        header
            .versions
            .iter()
            .map(|(name, v)| format!("{name}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        header.rounds,
        header.scale,
        header.seconds,
    );
    if results.rows.iter().any(|r| r.key.starts_with("wss_")) {
        out.push_str(
            "The wss rows: every proxy serves the same ECDSA P-256 certificate (TLS 1.3 with the \
             `wsplice-load` rustls client); TLS tunnels are relayed in userspace on every wsplice \
             data path. *Full handshakes*: the client never offers a session (rustls resumption \
             disabled), so every tunnel costs a certificate signature and its verification. \
             *Resumed sessions*: each of the 64 loops keeps its own session store, so each \
             connection offers a ticket from its loop's previous one (the first connection of \
             each loop is a full handshake); the share of handshakes resumed row shows whether \
             the target accepted them (a target that does not resume shows a low share and \
             full-handshake rates). Servers keep their defaults (session tickets on: nginx, \
             HAProxy: OpenSSL; wsplice: `session_tickets`), except that nginx is told \
             `ssl_protocols TLSv1.2 TLSv1.3` (Debian's 1.22 offers TLS 1.2 at most, where a \
             resumption skips the key exchange); a note names any handshake that was not TLS 1.3. The load generator is one thread on the same \
             two cores and caps every target's tunnels per second alike; the proxy process CPU \
             rows give each proxy's own cost per tunnel. Idle wss tunnels are opened \
             with full handshakes, 4 at a time, in the first round only.\n\n",
        );
    }
    if results.rows.iter().any(|r| r.key.starts_with("http_")) {
        out.push_str(
            "The http rows: 64 keep-alive client connections each sending sequential GETs to the \
             echo upstream's plain HTTP/1.1 (a 25-byte answer), through each proxy's pool of \
             upstream connections (nginx `keepalive 64`, HAProxy `http-reuse always`); only 200 \
             answers count, and a target answering anything else fails its cells.\n\n",
        );
    }
    let mut rows: Vec<&Row> = results.rows.iter().collect();
    rows.sort_by_key(|row| {
        ROW_ORDER
            .iter()
            .position(|k| *k == row.key)
            .unwrap_or(usize::MAX)
    });
    if !rows.is_empty() {
        out.push_str("| metric |");
        for kind in targets::ALL {
            out.push_str(&format!(" {} |", kind.name()));
        }
        for (label, ..) in RATIOS {
            out.push_str(&format!(" {label} |"));
        }
        out.push_str("\n|---|");
        for _ in 0..targets::ALL.len() + RATIOS.len() {
            out.push_str("---:|");
        }
        out.push('\n');
        for row in rows {
            out.push_str(&format!("| {} |", row.label));
            for cell in &row.cells {
                match (summary(&cell.samples), &cell.note) {
                    (Some((m, lo, hi)), _) if cell.samples.len() > 1 => {
                        out.push_str(&format!(" {} ({}–{}) |", number(m), number(lo), number(hi)));
                    }
                    (Some((m, ..)), _) => out.push_str(&format!(" {} |", number(m))),
                    (None, Some(note)) => out.push_str(&format!(" {note} |")),
                    (None, None) => out.push_str(" – |"),
                }
            }
            for (_, a, b) in RATIOS {
                match (median(row, a), median(row, b)) {
                    (Some(a), Some(b))
                        if b.abs() > f64::EPSILON && !NO_RATIO.contains(&row.key) =>
                    {
                        out.push_str(&format!(" {:.2} |", a / b));
                    }
                    _ => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
    }
    if !results.percore.is_empty() {
        out.push_str(
            "\n**Per core** (fleet, 64 B every 2 s; proxy with one worker on CPU 0 via `taskset -c 0`, \
             echo upstream and load generators on CPU 1; largest N with p99 ≤ 10 ms and no failure, a step failing on p99 alone is tried twice; \
             `direct` shows the limit of the load side alone; *per machine core* is N divided by the machine-wide CPU \
             above the direct run's at that N, in cores, so kernel work on any CPU counts):\n\n\
             | target | largest N passing | per machine core | processes on CPU 0 | p99 at that N, ms | steps (N: p99 ms) | stopped because |\n\
             |---|---:|---:|---:|---:|---|---|\n",
        );
        let direct = results.percore.iter().find(|r| r.target == "direct");
        for result in &results.percore {
            let per_core = match (result.target, result.per_machine_core(direct)) {
                ("direct", _) => "–".to_owned(),
                (_, Some(n)) => format!("{n:.0}"),
                (_, None) => "n/a".to_owned(),
            };
            let steps = result
                .steps
                .iter()
                .map(|s| {
                    format!(
                        "{}: {:.1}{}",
                        s.conns,
                        s.p99_us / 1000.0,
                        if s.passed { "" } else { " ✗" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let (n, processes, p99) =
                result
                    .largest()
                    .map_or(("none".into(), "–".into(), "–".into()), |s| {
                        (
                            s.conns.to_string(),
                            s.processes.to_string(),
                            format!("{:.1}", s.p99_us / 1000.0),
                        )
                    });
            out.push_str(&format!(
                "| {} | {n} | {per_core} | {processes} | {p99} | {steps} | {} |\n",
                result.target, result.stopped
            ));
        }
    }
    if let Some(packet) = &results.packet {
        out.push_str(&packet.markdown());
    }
    if let Some(scale) = &results.packet_scale {
        out.push_str(&scale.markdown());
    }
    if !results.notes.is_empty() {
        out.push_str("\nNotes:\n");
        for note in &results.notes {
            out.push_str(&format!("- {}\n", note.replace('\n', " ")));
        }
    }
    out
}

fn json(header: &Header, results: &Results) -> serde_json::Value {
    serde_json::json!({
        "date": header.date,
        "machine": {"cpu": header.cpu, "cores": header.cores, "memory_gb": header.memory_gb, "kernel": header.kernel},
        "versions": header.versions.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "rounds": header.rounds,
        "scale": header.scale,
        "seconds": header.seconds,
        "targets": targets::ALL.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "rows": results.rows.iter().map(|row| serde_json::json!({
            "key": row.key,
            "metric": row.label,
            "cells": row.cells.iter().map(|cell| {
                let s = summary(&cell.samples);
                serde_json::json!({
                    "samples": cell.samples,
                    "median": s.map(|s| s.0), "min": s.map(|s| s.1), "max": s.map(|s| s.2),
                    "note": cell.note,
                })
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "percore": results.percore.iter().map(|r| serde_json::json!({
            "target": r.target,
            "largest_passing": r.largest().map(|s| s.conns),
            "per_machine_core": r.per_machine_core(results.percore.iter().find(|d| d.target == "direct")),
            "stopped": r.stopped,
            "steps": r.steps.iter().map(|s| serde_json::json!({
                "conns": s.conns, "processes": s.processes, "p99_us": s.p99_us,
                "failures": s.failures, "messages": s.messages, "machine_cores": s.machine_cores,
                "passed": s.passed, "why": s.why,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "packet": results.packet.as_ref().map(super::packet::PacketReport::json),
        "packet_scale": results.packet_scale.as_ref().map(super::packet::scale::ScaleReport::json),
        "notes": results.notes,
    })
}

/// One bar per target: (name, median, min, max).
type Bars = Vec<(String, f64, f64, f64)>;

fn bars_of(row: &Row, skip_direct: bool) -> Bars {
    targets::ALL
        .iter()
        .enumerate()
        .filter(|(_, k)| !(skip_direct && **k == targets::Kind::Direct))
        .filter_map(|(i, k)| {
            let (m, lo, hi) = summary(&row.cells[i].samples)?;
            Some((k.name().to_owned(), m, lo, hi))
        })
        .collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(140, 140, 140),
    RGBColor(0, 150, 57),
    RGBColor(30, 90, 180),
    RGBColor(230, 140, 20),
    RGBColor(200, 40, 40),
    RGBColor(130, 60, 170),
];

fn color_of(name: &str) -> RGBColor {
    targets::ALL
        .iter()
        .position(|k| k.name() == name)
        .map_or(BLACK, |i| COLORS[i])
}

/// A bar chart with min–max whiskers.
fn bar_chart(path: &Path, title: &str, unit: &str, bars: &Bars) -> anyhow::Result<()> {
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars
        .iter()
        .map(|b| b.3.max(b.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let bottom = bars.iter().map(|b| b.2.min(b.1)).fold(0.0f64, f64::min);
    let bottom = if bottom < 0.0 { bottom * 1.15 } else { 0.0 };
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = bars.len() as i32;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), bottom..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let i = i as i32;
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.1),
            ],
            color_of(&b.0).filled(),
        );
        rect.set_margin(0, 0, 14, 14);
        rect
    }))?;
    chart.draw_series(
        bars.iter()
            .enumerate()
            .filter(|(_, b)| b.3 > b.2)
            .map(|(i, b)| {
                let x = SegmentValue::CenterOf(i as i32);
                PathElement::new(vec![(x.clone(), b.2), (x, b.3)], BLACK.stroke_width(2))
            }),
    )?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(
            number(b.1),
            (
                SegmentValue::CenterOf(i as i32),
                b.1.max(0.0) + (top - bottom) * 0.01,
            ),
            TextStyle::from(("sans-serif", 14).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn charts(dir: &Path, results: &Results) -> anyhow::Result<Vec<String>> {
    let mut written = Vec::new();
    let specs: [(&str, &str, &str, &str, bool); 9] = [
        (
            "hold_rss",
            "memory-per-idle-tunnel.svg",
            "Proxy RSS per idle tunnel",
            "KB",
            true,
        ),
        (
            "fleet_cpu_proxy",
            "fleet-cpu-per-million.svg",
            "Fleet: proxy CPU-s per million messages",
            "CPU-s / 1M msgs",
            true,
        ),
        (
            "bulk1",
            "bulk-1-tunnel.svg",
            "Bulk, 1 tunnel",
            "MB/s",
            false,
        ),
        (
            "bulk16",
            "bulk-16-tunnels.svg",
            "Bulk, 16 tunnels",
            "MB/s",
            false,
        ),
        (
            "storm",
            "storm.svg",
            "Storm: new tunnels per second",
            "tunnels/s",
            false,
        ),
        (
            "wss_storm_full",
            "wss-storm.svg",
            "wss storm, full handshakes: new tunnels per second",
            "tunnels/s",
            true,
        ),
        (
            "wss_storm_resumed",
            "wss-storm-resumed.svg",
            "wss storm, resumed sessions: new tunnels per second",
            "tunnels/s",
            true,
        ),
        (
            "wss_hold_rss",
            "memory-per-idle-wss-tunnel.svg",
            "Proxy RSS per idle wss tunnel",
            "KB",
            true,
        ),
        (
            "http_rps",
            "http-requests.svg",
            "Plain HTTP: keep-alive GETs per second, 64 connections",
            "requests/s",
            false,
        ),
    ];
    for (key, file, title, unit, skip_direct) in specs {
        if let Some(row) = results.rows.iter().find(|r| r.key == key) {
            let bars = bars_of(row, skip_direct);
            if !bars.is_empty() {
                bar_chart(&dir.join(file), title, unit, &bars)?;
                written.push(file.to_owned());
            }
        }
    }
    if !results.percore.is_empty() {
        let bars: Bars = results
            .percore
            .iter()
            .map(|r| {
                let n = r.largest().map_or(0.0, |s| s.conns as f64);
                (r.target.to_owned(), n, n, n)
            })
            .collect();
        bar_chart(
            &dir.join("percore.svg"),
            "Fleet connections one core serves (p99 <= 10 ms)",
            "connections",
            &bars,
        )?;
        written.push("percore.svg".into());
    }
    Ok(written)
}

/// Writes `FOLDER/STEM.md`, `FOLDER/STEM.json` and the charts (`folder` is relative to `root`).
pub fn write(
    root: &Path,
    folder: &str,
    stem: &str,
    header: &Header,
    results: &Results,
) -> anyhow::Result<()> {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir)?;
    let charts = charts(&dir, results)?;
    let mut markdown = markdown(header, results);
    if !charts.is_empty() {
        markdown.push_str(&format!("\nCharts: {}\n", charts.join(", ")));
    }
    std::fs::write(dir.join(format!("{stem}.md")), &markdown)?;
    let mut file = std::fs::File::create(dir.join(format!("{stem}.json")))?;
    writeln!(file, "{:#}", json(header, results))?;
    println!("\n{markdown}");
    println!(
        "written to {folder}/{stem}.md, {stem}.json and {} chart(s)",
        charts.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_median_min_max() {
        assert_eq!(summary(&[]), None);
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
    }
}
