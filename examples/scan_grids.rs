//! The parallel extents (grid points) of the scan kernels and their gradients, for the
//! published Mamba-1 and Mamba-2 widths at batch 1: what a GPU launches one thread per.
//!
//! ```sh
//! cargo run --release --example scan_grids
//! ```

use ir::Graph;
use ir::kernel::IExpr;
use ma2mba::model::IGNORE_INDEX;
use passes::LowerOptions;

/// A one-layer language model of the library (`mamba_lm`, `mamba2_lm`) at `d_model`.
fn graph(model: &str, d_model: i64) -> Graph {
    use frontend::{ConfigArg, ConfigValue};
    let arg = |n: &str, v: i64| ConfigArg {
        name: n.into(),
        value: ConfigValue::Int(v),
        span: None,
        origin: None,
    };
    let prog = frontend::Program::with_library().expect("the library parses");
    let args = [arg("d_model", d_model), arg("n_layer", 1)];
    frontend::elaborate::elaborate(&prog, model, model, &args)
        .expect("the config elaborates")
        .0
}

/// The value of a grid extent.
fn extent(e: &IExpr, sizes: &[i64]) -> i64 {
    let two = |a: &IExpr, b: &IExpr| (extent(a, sizes), extent(b, sizes));
    match e {
        IExpr::Const(n) => *n,
        IExpr::Size(i) => sizes[*i],
        IExpr::Add(a, b) => two(a, b).0 + two(a, b).1,
        IExpr::Sub(a, b) => two(a, b).0 - two(a, b).1,
        IExpr::Mul(a, b) => two(a, b).0 * two(a, b).1,
        IExpr::Div(a, b) => two(a, b).0.div_euclid(two(a, b).1),
        IExpr::Rem(a, b) => two(a, b).0.rem_euclid(two(a, b).1),
        IExpr::Min(a, b) => two(a, b).0.min(two(a, b).1),
        other => panic!("not a grid extent: {other}"),
    }
}

fn main() {
    let lens = [2048i64, 65536];
    println!("| model | kernel | grid | points at L = 2048 | points at L = 65536 |");
    println!("|---|---|---|---|---|");
    for (label, model, d_model) in [
        ("mamba2-130m", "mamba2_lm", 768),
        ("mamba2-2.7b", "mamba2_lm", 2560),
        ("mamba-130m", "mamba_lm", 768),
        ("mamba-2.8b", "mamba_lm", 2560),
    ] {
        let fwd = graph(model, d_model);
        let train = passes::training_graph(&fwd, "logits", IGNORE_INDEX)
            .expect("differentiates")
            .graph;
        let l = passes::lower(&train, &LowerOptions::default()).expect("lowers");
        for k in &l.kernels {
            if !k.name.contains("scan") {
                continue;
            }
            // The node index names the op; the kind is the rest.
            let kind: String = k
                .name
                .split('_')
                .filter(|w| w.parse::<u64>().is_err())
                .collect::<Vec<_>>()
                .join("_");
            let grid: Vec<String> = k
                .grid
                .iter()
                .map(|g| {
                    let mut t = g.to_string();
                    for (i, sym) in l.syms.iter().enumerate() {
                        t = t.replace(&format!("s{i}"), sym);
                    }
                    t
                })
                .collect();
            let points: Vec<String> = lens
                .iter()
                .map(|&len| {
                    let sizes: Vec<i64> = l
                        .syms
                        .iter()
                        .map(|s| if s == "B" { 1 } else { len })
                        .collect();
                    let p: i64 = k.grid.iter().map(|g| extent(g, &sizes)).product();
                    p.to_string()
                })
                .collect();
            println!(
                "| {label} | {kind} | [{}] | {} | {} |",
                grid.join(", "),
                points[0],
                points[1]
            );
        }
    }
}
