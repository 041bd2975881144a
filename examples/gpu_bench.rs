//! End-to-end GPU timings of the first (unoptimized) CUDA path: forward passes and whole
//! training steps of the 130m presets with random weights, f32, through `GpuGraph`.
//!
//! ```sh
//! cargo build --release --features cuda --example gpu_bench   # here (LLVM 19)
//! ./gpu_bench                                                # on the GPU machine
//! ```
//!
//! Each case: one warm-up run, then the median of `REPEAT` runs, wall time of `GpuGraph::run`
//! (which uploads the parameters and inputs, runs every step, synchronizes and downloads the
//! outputs). Compile time (lowering + PTX + module load) is reported separately.

use ma2mba::gpu::GpuGraph;
use ma2mba::model::IGNORE_INDEX;
use passes::LowerOptions;
use runtime::cpu::HostData;
use runtime::cuda::ExecOptions;
use std::collections::HashMap;
use std::time::Instant;

const REPEAT: usize = 3;

fn graph(name: &str) -> ir::Graph {
    let spec = frontend::ModelSpec {
        model: name.into(),
        ..frontend::ModelSpec::default()
    };
    match frontend::compile(&spec).1 {
        Ok(c) => c.graph,
        Err(_) => panic!("{name} does not compile"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = codegen::nvptx::Target::Sm90;
    println!("| model | pass | B | L | compile | median step | tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    for name in ["mamba-130m", "mamba2-130m"] {
        let fwd = graph(name);
        let params: HashMap<String, Vec<f32>> = runtime::init::init_params(&fwd, 1)
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let training = passes::training_graph(&fwd, "logits", IGNORE_INDEX)?.graph;
        for (pass, g) in [("forward", &fwd), ("train step", &training)] {
            let t0 = Instant::now();
            let gpu = GpuGraph::compile(g, &LowerOptions::default(), target, 0)?;
            let compile = t0.elapsed();
            for (b, l) in [(1usize, 2048usize), (8, 2048)] {
                let mut rng = runtime::init::Rng::new(7);
                let ids: Vec<i32> = (0..b * l)
                    .map(|_| (rng.next_u64() % 50000) as i32)
                    .collect();
                let mut targets = ids[1..].to_vec();
                targets.push(IGNORE_INDEX as i32);
                let mut data = HashMap::from([("input_ids".to_string(), HostData::I32(ids))]);
                if pass != "forward" {
                    data.insert("targets".to_string(), HostData::I32(targets));
                }
                let syms = [("B", b as i64), ("L", l as i64)];
                let mut times = Vec::new();
                for i in 0..=REPEAT {
                    let t = Instant::now();
                    let out = gpu.run(
                        &syms,
                        &data,
                        &params,
                        &HashMap::new(),
                        ExecOptions::default(),
                    );
                    if let Err(e) = out {
                        println!("| {name} | {pass} | {b} | {l} | | error: {e} | |");
                        break;
                    }
                    if i > 0 {
                        times.push(t.elapsed());
                    }
                }
                if times.is_empty() {
                    continue;
                }
                times.sort();
                let med = times[times.len() / 2];
                println!(
                    "| {name} | {pass} | {b} | {l} | {:.1?} | {:.1?} | {:.0} |",
                    compile,
                    med,
                    (b * l) as f64 / med.as_secs_f64()
                );
            }
        }
    }
    Ok(())
}
