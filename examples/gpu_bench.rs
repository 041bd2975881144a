//! GPU timings of forward passes and whole training steps of presets with random weights, f32
//! or bf16 activations, through [`ma2mba::gpu::time_graph`] (parameters resident, the
//! schedule bound once), followed by one profiled run: device time per kernel kind. `ma2mba bench --device cuda
//! [--train]` prints the same with achieved bandwidth and FLOP rates.
//!
//! ```sh
//! cargo build --release --features cuda --example gpu_bench   # here (LLVM 19)
//! ./gpu_bench [models, comma-separated] [forward|train|both] [B] [L] [f32|bf16]   # on the GPU
//! ```
//!
//! `bf16`: activations stored as bf16, matrix products on bf16 operands (f32 accumulation).

use ma2mba::model::IGNORE_INDEX;
use runtime::cpu::HostData;
use std::collections::HashMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let models: Vec<String> = args
        .first()
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["mamba-130m".into(), "mamba2-130m".into()]);
    let passes = args.get(1).cloned().unwrap_or_else(|| "both".into());
    let b: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let l: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let act = args.get(4).cloned().unwrap_or_else(|| "f32".into());
    let lower = passes::LowerOptions {
        bf16_activations: act == "bf16",
        ..passes::LowerOptions::default()
    };
    let mut rows = Vec::new();
    for name in &models {
        let spec = frontend::ModelSpec {
            model: name.clone(),
            ..frontend::ModelSpec::default()
        };
        let fwd = frontend::compile(&spec)
            .1
            .map_err(|_| format!("{name} does not compile"))?
            .graph;
        let params = runtime::init::init_params(&fwd, 1)
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let training = passes::training_graph(&fwd, "logits", IGNORE_INDEX)?.graph;
        let mut rng = runtime::init::Rng::new(7);
        let ids: Vec<i32> = (0..b * l)
            .map(|_| (rng.next_u64() % 50000) as i32)
            .collect();
        let mut targets = ids[1..].to_vec();
        targets.push(IGNORE_INDEX as i32);
        let mut cases = Vec::new();
        if passes != "train" {
            cases.push(("forward", &fwd));
        }
        if passes != "forward" {
            cases.push(("train step", &training));
        }
        for (pass, g) in cases {
            let mut data = HashMap::from([("input_ids".to_string(), HostData::I32(ids.clone()))]);
            if pass != "forward" {
                data.insert("targets".to_string(), HostData::I32(targets.clone()));
            }
            let syms = [("B", b as i64), ("L", l as i64)];
            let t = ma2mba::gpu::time_graph(g, &lower, &params, &syms, &data, 3)?;
            let total: f64 = t.profile.iter().map(|s| f64::from(s.ms)).sum();
            eprintln!(
                "{name} {pass} B={b} L={l}: {} launches, {total:.1} ms device time, arena {:.2} GB",
                t.profile.len(),
                t.arena as f64 / 1e9
            );
            for k in ma2mba::gpu::by_kind(&t.profile).iter().take(12) {
                eprintln!(
                    "  {:<28} {:>5} launches {:>10.2} ms ({:.1}%)",
                    k.kind,
                    k.launches,
                    k.ms,
                    100.0 * k.ms / total.max(1e-9)
                );
            }
            rows.push(format!(
                "| {name} | {pass} {act} | {b} | {l} | {:.1?} | {:.1?} | {:.0} |",
                t.compile,
                t.median,
                (b * l) as f64 / t.median.as_secs_f64()
            ));
        }
    }
    println!("| model | pass | B | L | compile | median step | tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
