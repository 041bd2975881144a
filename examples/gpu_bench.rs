//! GPU timings of forward passes and whole training steps of presets with random weights,
//! f32, through `GpuGraph` with the parameters resident on the device and the schedule bound
//! once (arena, inputs), followed by one profiled run: device time per kernel kind.
//!
//! ```sh
//! cargo build --release --features cuda --example gpu_bench   # here (LLVM 19)
//! ./gpu_bench [models, comma-separated] [forward|train|both] [B] [L]   # on the GPU machine
//! ```
//!
//! Each case: one warm-up run, then the median of `REPEAT` runs of the bound schedule (inputs
//! already on the device; the time from enqueueing the first step to the end of the last).
//! Compile time (lowering + PTX + module load) is reported separately.

use ma2mba::gpu::GpuGraph;
use ma2mba::model::IGNORE_INDEX;
use passes::LowerOptions;
use runtime::cpu::HostData;
use runtime::cuda::ExecOptions;
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let models: Vec<String> = args
        .first()
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["mamba-130m".into(), "mamba2-130m".into()]);
    let passes = args.get(1).cloned().unwrap_or_else(|| "both".into());
    let b: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let l: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let target = codegen::nvptx::Target::Sm90;
    let mut rows = Vec::new();
    for name in &models {
        let fwd = graph(name);
        let params = runtime::init::init_params(&fwd, 1)
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let training = passes::training_graph(&fwd, "logits", IGNORE_INDEX)?.graph;
        let mut cases = Vec::new();
        if passes != "train" {
            cases.push(("forward", &fwd));
        }
        if passes != "forward" {
            cases.push(("train step", &training));
        }
        for (pass, g) in cases {
            let t0 = Instant::now();
            let gpu = GpuGraph::compile(g, &LowerOptions::default(), target, 0)?;
            let compile = t0.elapsed();
            let dev = gpu.upload_params(&params)?;
            let syms = [("B", b as i64), ("L", l as i64)];
            let mut bound = gpu.bind(&syms, &dev, false)?;
            let ex = gpu.exec();
            let mut rng = runtime::init::Rng::new(7);
            let ids: Vec<i32> = (0..b * l)
                .map(|_| (rng.next_u64() % 50000) as i32)
                .collect();
            let mut targets = ids[1..].to_vec();
            targets.push(IGNORE_INDEX as i32);
            ex.write(&gpu.lowered, &bound, "input_ids", &HostData::I32(ids))?;
            if pass != "forward" {
                ex.write(&gpu.lowered, &bound, "targets", &HostData::I32(targets))?;
            }
            let mut times = Vec::new();
            for i in 0..=REPEAT {
                let t = Instant::now();
                ex.run(&gpu.lowered, &mut bound, ExecOptions::default())?;
                ex.synchronize()?;
                if i > 0 {
                    times.push(t.elapsed());
                }
            }
            times.sort();
            let med = times[times.len() / 2];
            let prof = ex.run(
                &gpu.lowered,
                &mut bound,
                ExecOptions {
                    profile: true,
                    ..ExecOptions::default()
                },
            )?;
            let total: f32 = prof.iter().map(|t| t.ms).sum();
            eprintln!(
                "{name} {pass} B={b} L={l}: {} launches, {total:.1} ms device time, arena {:.2} GB",
                prof.len(),
                bound.plan().peak as f64 / 1e9
            );
            let mut kinds: Vec<(String, f32, usize)> = Vec::new();
            for t in &prof {
                let kind = t
                    .name
                    .trim_end_matches(|c: char| c.is_ascii_digit() || c == '_')
                    .to_string();
                match kinds.iter_mut().find(|(k, _, _)| *k == kind) {
                    Some(e) => {
                        e.1 += t.ms;
                        e.2 += 1;
                    }
                    None => kinds.push((kind, t.ms, 1)),
                }
            }
            kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (k, ms, n) in kinds.iter().take(12) {
                eprintln!(
                    "  {k:<28} {n:>5} launches {ms:>10.2} ms ({:.1}%)",
                    100.0 * ms / total.max(1e-9)
                );
            }
            rows.push(format!(
                "| {name} | {pass} | {b} | {l} | {:.1?} | {:.1?} | {:.0} |",
                compile,
                med,
                (b * l) as f64 / med.as_secs_f64()
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
