//! `ma2mba plan`: the checkpoint plan chosen for a budget, beside the classic strategies, as a
//! table, JSON, or an SVG of memory over the schedule.

use passes::remat::{self, Keep, Plan, Planner, Request};
use std::fmt::Write;

/// Parses a byte size: `40GiB`, `42.2GB`, `512MiB`, `1e9`, `123456`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 40GiB, 42.2GB, 512MiB, 1e9)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (B, KB, MB, GB, KiB, MiB, GiB, ...)"
            ));
        }
    };
    let v = x * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("`{s}` is not a size in bytes"));
    }
    Ok(v as u64)
}

/// Parses a count: `524288`, `2^19`, `512k`, `1M`.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a count (examples: 4096, 2^19, 512k)");
    if let Some((b, e)) = t.split_once('^') {
        let b: u64 = b.trim().parse().map_err(|_| bad())?;
        let e: u32 = e.trim().parse().map_err(|_| bad())?;
        return b.checked_pow(e).ok_or_else(bad);
    }
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1024),
        Some('m' | 'M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// `--batch`, `--seq` (counts of at least 1) and an optional `--budget` (bytes), parsed; the
/// error names the flag.
pub fn shape_args(
    batch: &str,
    seq: &str,
    budget: Option<&str>,
) -> Result<(u64, u64, Option<u64>), String> {
    let positive = |flag: &str, s: &str| match parse_count(s) {
        Ok(0) => Err(format!("{flag} must be at least 1")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{flag}: {e}")),
    };
    let budget = budget
        .map(parse_bytes)
        .transpose()
        .map_err(|e| format!("--budget: {e}"))?;
    Ok((positive("--batch", batch)?, positive("--seq", seq)?, budget))
}

/// `1.23 GB` (decimal units, as the Ma2mba paper reports).
pub fn human(bytes: u64) -> String {
    remat::human_bytes(bytes)
}

/// The chosen plan and the classic strategies.
pub struct Report {
    pub chosen: Plan,
    pub classics: Vec<Plan>,
}

/// Plans `graph` for `req`; the classic strategies are priced with the same accounting.
pub fn make(graph: &ir::Graph, req: Request) -> Result<Report, remat::PlanError> {
    let mut planner = Planner::new(graph, req, crate::model::IGNORE_INDEX)?;
    let classics = planner.classics()?;
    let chosen = planner.plan()?;
    Ok(Report { chosen, classics })
}

fn grid(p: &Plan) -> String {
    let l = p.groups.first().map_or(0, |r| r.end - r.start);
    format!("l={l} x s={}", p.seg_len)
}

/// The table `ma2mba plan` prints.
pub fn table(r: &Report, req: &Request) -> String {
    let mut s = String::new();
    let c = &r.chosen;
    let _ = writeln!(
        s,
        "plan: {}{}",
        remat::describe(c),
        match req.budget {
            Some(b) => format!(" (budget {})", human(b)),
            None => " (no budget: least memory)".into(),
        }
    );
    let _ = writeln!(
        s,
        "peak {} = weights {} + gradients {} + optimizer {} + data {} + checkpoints {} + saved {} + working set {}",
        human(c.peak),
        human(c.breakdown.weights),
        human(c.breakdown.gradients),
        human(c.breakdown.optimizer),
        human(c.breakdown.data),
        human(c.breakdown.checkpoints),
        human(c.breakdown.saved),
        human(c.breakdown.working),
    );
    let _ = writeln!(
        s,
        "recompute {:.1}% of a step ({:.3e} of {:.3e} FLOPs)\n",
        c.recompute_pct(),
        c.recompute_flops,
        c.step_flops
    );
    let _ = writeln!(
        s,
        "{:<22} {:>14} {:>12} {:>12} {:>11} {:>10}  fits",
        "strategy", "grid", "peak", "checkpoints", "working", "recompute"
    );
    for p in r.classics.iter().chain(std::iter::once(c)) {
        let fits = match req.budget {
            Some(b) if p.peak <= b => "yes",
            Some(_) => "no",
            None => "-",
        };
        let _ = writeln!(
            s,
            "{:<22} {:>14} {:>12} {:>12} {:>11} {:>9.1}%  {}",
            p.strategy,
            grid(p),
            human(p.peak),
            human(p.breakdown.checkpoints + p.breakdown.saved),
            human(p.breakdown.working),
            p.recompute_pct(),
            fits
        );
    }
    s.push('\n');
    s.push_str(&cell_grid(c));
    s
}

/// The grid of cells: one row per layer group (top first), one column per segment (at most
/// 64 shown); `.` recomputes, `g` keeps GEMM results, `#` keeps everything.
pub fn cell_grid(p: &Plan) -> String {
    let nseg = p.segments();
    let shown = nseg.min(64);
    let mut s = format!(
        "cells ({} groups x {} segments; . recompute, g keep GEMM results, # keep all{}):\n",
        p.groups.len(),
        nseg,
        if shown < nseg {
            format!("; last {shown} segments shown")
        } else {
            String::new()
        }
    );
    for g in (0..p.groups.len()).rev() {
        let r = &p.groups[g];
        let _ = write!(s, "  layers {:>3}..{:<3} ", r.start, r.end);
        for t in nseg - shown..nseg {
            s.push(match p.keep(t, g) {
                Keep::Nothing => '.',
                Keep::Gemm => 'g',
                Keep::All => '#',
            });
        }
        s.push('\n');
    }
    s
}

pub(crate) fn plan_json(p: &Plan) -> serde_json::Value {
    serde_json::json!({
        "strategy": p.strategy,
        "groups": p.groups.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
        "group_size": p.groups.first().map_or(0, |r| r.end - r.start),
        "segment_len": p.seg_len,
        "segments": p.segments(),
        "keep_all_cells": p.keep_all,
        "keep_gemm_cells": p.keep_gemm,
        "peak_bytes": p.peak,
        "breakdown": {
            "weights": p.breakdown.weights,
            "gradients": p.breakdown.gradients,
            "optimizer": p.breakdown.optimizer,
            "data": p.breakdown.data,
            "checkpoints": p.breakdown.checkpoints,
            "saved": p.breakdown.saved,
            "working": p.breakdown.working,
        },
        "recompute_flops": p.recompute_flops,
        "step_flops": p.step_flops,
        "recompute_pct": p.recompute_pct(),
    })
}

/// The report as one JSON object.
pub fn json(r: &Report, req: &Request) -> serde_json::Value {
    serde_json::json!({
        "batch": req.batch,
        "seq": req.seq,
        "budget_bytes": req.budget,
        "act_dtype": req.act_dtype.name(),
        "count_weights": req.count_weights,
        "plan": plan_json(&r.chosen),
        "strategies": r.classics.iter().map(plan_json).collect::<Vec<_>>(),
    })
}

/// Memory over the schedule of every strategy, one polyline each, as an SVG document.
pub fn svg(graph: &ir::Graph, r: &Report, req: &Request) -> Result<String, remat::PlanError> {
    let mut planner = Planner::new(graph, req.clone(), crate::model::IGNORE_INDEX)?;
    let (w, h, pad) = (900.0f64, 420.0f64, 60.0f64);
    let plans: Vec<&Plan> = r
        .classics
        .iter()
        .chain(std::iter::once(&r.chosen))
        .collect();
    let mut lines = Vec::new();
    let mut ymax = 1u64;
    for p in &plans {
        let sim = remat::simulate(&mut planner, p)?;
        ymax = ymax.max(sim.timeline.iter().map(|x| x.1).max().unwrap_or(0));
        lines.push((p.strategy.clone(), sim.timeline));
    }
    if let Some(b) = req.budget {
        ymax = ymax.max(b);
    }
    let colors = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#1f77b4"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<text x=\"{pad}\" y=\"20\">{}: live memory over the schedule (B={}, L={}; runs of identical segments collapsed)</text>",
        xml(&graph.name),
        req.batch,
        req.seq
    );
    let (x0, x1, y0, y1) = (pad, w - 180.0, h - pad, 40.0);
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>"
    );
    for i in 0..=4 {
        let v = ymax as f64 * i as f64 / 4.0;
        let y = y0 - (y0 - y1) * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"4\" y=\"{y:.1}\">{}</text>",
            xml(&human(v as u64))
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{x0}\" y=\"{:.1}\">schedule (forward, then backward) →</text>",
        h - 20.0
    );
    if let Some(b) = req.budget {
        let y = y0 - (y0 - y1) * b as f64 / ymax as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"gray\" stroke-dasharray=\"4 4\"/><text x=\"{x1}\" y=\"{y:.1}\">budget</text>"
        );
    }
    for (i, (name, tl)) in lines.iter().enumerate() {
        let color = colors[i % colors.len()];
        let n = tl.len().max(2) as f64 - 1.0;
        let pts: Vec<String> = tl
            .iter()
            .enumerate()
            .map(|(k, (_, v))| {
                let x = x0 + (x1 - x0) * k as f64 / n;
                let y = y0 - (y0 - y1) * *v as f64 / ymax as f64;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        let ly = 50.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{ly:.1}\" fill=\"{color}\">{}</text>",
            x1 + 10.0,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// an interrupted write leaves the old file (or none), never half of the new one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
