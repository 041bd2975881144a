//! The planner's figures for BENCHMARKS.md: the mamba2-2.7b config at batch 1, bf16
//! activations, weights and optimizer state left out, beside the Ma2mba paper's measured
//! activation memory; and activation memory against depth.
//!
//! ```sh
//! cargo run --release --example planner_tables
//! ```

use ir::{DType, Graph};
use ma2mba::model::IGNORE_INDEX;
use passes::remat::{Plan, Planner, Request, describe, human_bytes};
use std::time::Instant;

fn graph(model: &str, d_model: i64, layers: i64) -> Graph {
    use frontend::{ConfigArg, ConfigValue};
    let arg = |n: &str, v: i64| ConfigArg {
        name: n.into(),
        value: ConfigValue::Int(v),
        span: None,
        origin: None,
    };
    let prog = frontend::Program::with_library().expect("the library parses");
    let args = [arg("d_model", d_model), arg("n_layer", layers)];
    frontend::elaborate::elaborate(&prog, model, model, &args)
        .expect("the config elaborates")
        .0
}

fn request(seq: u64, budget: Option<u64>) -> Request {
    Request {
        batch: 1,
        seq,
        budget,
        act_dtype: DType::BF16,
        count_weights: false,
        quantum: 256,
        logits: false,
        copy_outputs: false,
        lower: passes::LowerOptions::default(),
    }
}

fn row(p: &Plan) -> String {
    let l = p.groups.first().map_or(0, |r| r.end - r.start);
    format!(
        "| {} | l={l}, s={} | {} | {} | {} | {:.1}% |",
        p.strategy,
        p.seg_len,
        human_bytes(p.peak),
        human_bytes(p.breakdown.checkpoints + p.breakdown.saved),
        human_bytes(p.breakdown.working),
        p.recompute_pct()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let g = graph("mamba2_lm", 2560, 64);
    let paper = [
        ("no checkpointing", "42.6 GB", "-"),
        ("per-layer", "17.4 GB", "-"),
        ("sqrt(L) groups", "8.7 GB", "-"),
        ("Ma2mba (memory only)", "4.2 GB", "42.2 GB"),
    ];
    println!(
        "### mamba2-2.7b config, batch 1, bf16 activations (weights, gradients, optimizer left out)\n"
    );
    for seq in [1u64 << 14, 1 << 19] {
        let t0 = Instant::now();
        let mut pl = Planner::new(&g, request(seq, None), IGNORE_INDEX)?;
        let classics = pl.classics()?;
        let least = pl.plan()?;
        println!("L = {seq} tokens (planned in {:.2?}):\n", t0.elapsed());
        println!(
            "| strategy | grid | peak | checkpoints + saved | working set | recompute | paper (measured) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for p in &classics {
            let paper_mem = paper
                .iter()
                .find(|x| x.0 == p.strategy)
                .map_or("-", |x| if seq == 1 << 14 { x.1 } else { x.2 });
            println!("{} {paper_mem} |", row(p));
        }
        println!("{} - |", row(&least));
        // Our plan at the paper's measured multi-axis memory, and at Ma2mba's own memory.
        let ma2mba = classics
            .iter()
            .find(|p| p.strategy.starts_with("Ma2mba"))
            .cloned()
            .ok_or("no Ma2mba plan")?;
        for (what, budget) in [
            ("the paper's 42.2 GB", 42_200_000_000u64),
            ("Ma2mba's own peak", ma2mba.peak),
        ] {
            pl.request.budget = Some(budget);
            match pl.plan() {
                Ok(p) => println!(
                    "| ma2mba within {what} ({}) | {} | {} | {} | {} | {:.1}% (Ma2mba's choice: {:.1}%) |",
                    human_bytes(budget),
                    describe(&p),
                    human_bytes(p.peak),
                    human_bytes(p.breakdown.checkpoints + p.breakdown.saved),
                    human_bytes(p.breakdown.working),
                    p.recompute_pct(),
                    ma2mba.recompute_pct()
                ),
                Err(e) => println!("| ma2mba within {what} | {e} | | | | |"),
            }
        }
        println!();
    }
    println!("### Activation memory against depth (d_model 2560, bf16, least-memory plans)\n");
    println!(
        "| layers | L | ma2mba least memory | grid | Ma2mba (memory only) | per-layer | no checkpointing |"
    );
    println!("|---|---|---|---|---|---|---|");
    for layers in [24i64, 48, 64] {
        let g = graph("mamba2_lm", 2560, layers);
        for seq in [1u64 << 16, 1 << 19] {
            let mut pl = Planner::new(&g, request(seq, None), IGNORE_INDEX)?;
            let classics = pl.classics()?;
            let least = pl.plan()?;
            let get = |name: &str| {
                classics
                    .iter()
                    .find(|p| p.strategy.starts_with(name))
                    .map_or("-".to_string(), |p| human_bytes(p.peak))
            };
            println!(
                "| {layers} | 2^{} | {} | {} | {} | {} | {} |",
                seq.trailing_zeros(),
                human_bytes(least.peak),
                describe(&least),
                get("Ma2mba"),
                get("per-layer"),
                get("no checkpointing"),
            );
        }
    }
    let t0 = Instant::now();
    let mut pl = Planner::new(&g, request(1 << 20, Some(80_000_000_000)), IGNORE_INDEX)?;
    let _ = pl.classics()?;
    let p = pl.plan();
    println!(
        "\nplanner time, mamba2-2.7b at L = 2^20 with an 80 GB budget (classics + choice): {:.2?} ({})",
        t0.elapsed(),
        p.map_or_else(|e| e.to_string(), |p| describe(&p))
    );
    Ok(())
}
