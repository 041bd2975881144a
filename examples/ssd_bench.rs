//! The Mamba-2 SSD alone on the GPU, forward and forward+backward, at the shapes of
//! PERFORMANCE.md's table (P = 64, N = 128, one group, chunk 256), with random inputs:
//! median device time over runs of the bound schedule, the ratio to the reference
//! implementation's time on the H200, and a profile by kernel kind. Products in f32, with
//! TF32 tensor cores, and with bf16 activations with and without the tiled kernels
//! (`LowerOptions::ssd_tiles`: the forward's output and the gradient's sums of `T`). The
//! carries across chunks are tiled in every variant, as on the GPU (`on_gpu`).
//!
//! ```sh
//! cargo build --release --features cuda --example ssd_bench   # here (LLVM 19)
//! ./ssd_bench [H,b,L ...]                                      # on the GPU machine
//! SSD_BF16=1 ./ssd_bench 80,1,8192                             # only the bf16 variants
//! SSD_PRODUCTS=1 ./ssd_bench ...                               # and each product's time
//! ```

use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, Value};
use ma2mba::gpu::GpuGraph;
use passes::LowerOptions;
use runtime::cpu::HostData;
use runtime::cuda::ExecOptions;
use std::collections::HashMap;

const P: u64 = 64;
const N: u64 = 128;
const CHUNK: u64 = 256;

/// The reference's (fwd, fwd+bwd) ms on the H200 (PERFORMANCE.md), by (H, b, L).
fn reference(h: u64, b: u64, l: u64) -> Option<(f64, f64)> {
    match (h, b, l) {
        (24, 8, 2048) => Some((0.44, 4.18)),
        (24, 1, 65536) => Some((1.05, 4.38)),
        (80, 1, 8192) => Some((0.42, 4.95)),
        (80, 1, 65536) => Some((3.07, 12.33)),
        (80, 8, 8192) => Some((3.00, 12.36)),
        _ => None,
    }
}

fn leaf(g: &mut Graph, name: &str, kind: InputKind, shape: Vec<Dim>) -> Value {
    let op = Op::Input {
        name: name.into(),
        kind,
        ty: TensorType::new(DType::F32, shape),
    };
    Value::from(g.add(op, &[], Span::default(), None).expect("well-typed"))
}

/// `ssd_scan` over inputs `x, dt, A, B, C` (state zero), and with `backward` its gradient
/// for a cotangent `dy` input.
fn graph(h: u64, backward: bool) -> Graph {
    let mut g = Graph::new("ssd");
    let (b, l, k) = (Dim::sym("B"), Dim::sym("L"), Dim::known);
    let data = InputKind::Data;
    let x = leaf(&mut g, "x", data, vec![b.clone(), l.clone(), k(h), k(P)]);
    let dt = leaf(&mut g, "dt", data, vec![b.clone(), l.clone(), k(h)]);
    let a = leaf(&mut g, "A", data, vec![k(h)]);
    let bsh = vec![b.clone(), l.clone(), k(1), k(N)];
    let bm = leaf(&mut g, "Bm", data, bsh.clone());
    let cm = leaf(&mut g, "Cm", data, bsh);
    let s0 = leaf(
        &mut g,
        "s0",
        InputKind::State,
        vec![b.clone(), k(h), k(P), k(N)],
    );
    let ops = [x, dt, a, bm, cm, s0];
    let s = g
        .add(Op::SsdScan { chunk: CHUNK }, &ops, Span::default(), None)
        .expect("well-typed");
    g.add_output("y", Value::new(s, 0));
    if backward {
        let dy = leaf(&mut g, "dy", data, vec![b.clone(), l, k(h), k(P)]);
        let ds1 = leaf(&mut g, "ds1", InputKind::Data, vec![b, k(h), k(P), k(N)]);
        let mut gops = ops.to_vec();
        gops.extend([dy, ds1]);
        let gr = g
            .add(
                Op::SsdScanGrad { chunk: CHUNK },
                &gops,
                Span::default(),
                None,
            )
            .expect("well-typed");
        for (i, name) in ["dx", "ddt", "dA", "dB", "dC"].iter().enumerate() {
            g.add_output(*name, Value::new(gr, i as u16));
        }
    }
    g
}

fn inputs(h: u64, b: u64, l: u64, backward: bool) -> HashMap<String, HostData> {
    let mut rng = runtime::init::Rng::new(3);
    let mut fill = |n: u64, lo: f64, hi: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * rng.uniform()) as f32)
            .collect()
    };
    let t = b * l;
    let mut m = HashMap::from([
        ("x".to_string(), HostData::F32(fill(t * h * P, -1.0, 1.0))),
        ("dt".to_string(), HostData::F32(fill(t * h, 0.001, 0.1))),
        ("A".to_string(), HostData::F32(fill(h, -16.0, -1.0))),
        ("Bm".to_string(), HostData::F32(fill(t * N, -1.0, 1.0))),
        ("Cm".to_string(), HostData::F32(fill(t * N, -1.0, 1.0))),
    ]);
    if backward {
        m.insert("dy".into(), HostData::F32(fill(t * h * P, -1.0, 1.0)));
        m.insert(
            "ds1".into(),
            HostData::F32(vec![0.0; (b * h * P * N) as usize]),
        );
    }
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shapes: Vec<(u64, u64, u64)> = {
        let args: Vec<Vec<u64>> = std::env::args()
            .skip(1)
            .map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect())
            .filter(|v: &Vec<u64>| v.len() == 3)
            .collect();
        if args.is_empty() {
            vec![
                (24, 8, 2048),
                (24, 1, 65536),
                (80, 1, 8192),
                (80, 1, 65536),
                (80, 8, 8192),
            ]
        } else {
            args.into_iter().map(|v| (v[0], v[1], v[2])).collect()
        }
    };
    // SSD_BF16=1: only the bf16 variants (the GPU's default), e.g. under a profiler.
    let bf16_only = std::env::var("SSD_BF16").is_ok_and(|v| v == "1");
    println!("| H | b | L | pass | products | ms | reference ms | ratio | arena |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &(h, b, l) in &shapes {
        for (backward, bf16, tiles) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (false, true, true),
            (true, true, false),
            (true, true, true),
        ] {
            if bf16_only && !bf16 {
                continue;
            }
            let g = graph(h, backward);
            let lower = LowerOptions {
                bf16_activations: bf16,
                ssd_tiles: tiles,
                tiled_carries: true,
                ..LowerOptions::default()
            };
            let gpu = GpuGraph::compile_exactly(&g, &lower, codegen::nvptx::Target::Sm90, 0)?;
            let dev = gpu.upload_params(&HashMap::new())?;
            let syms = [("B", b as i64), ("L", l as i64)];
            let mut bound = gpu.bind(&syms, &dev, false)?;
            let ex = gpu.exec();
            for (name, d) in inputs(h, b, l, backward) {
                ex.write(&gpu.lowered, &bound, &name, &d)?;
            }
            // bf16 activations: every product on bf16 operands (TF32 does not apply).
            let modes: &[bool] = if bf16 { &[false] } else { &[false, true] };
            for &tf32 in modes {
                ex.set_tf32(tf32);
                let mut times = Vec::new();
                for i in 0..6 {
                    let t = std::time::Instant::now();
                    ex.run(&gpu.lowered, &mut bound, ExecOptions::default())?;
                    ex.synchronize()?;
                    if i > 0 {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                times.sort_by(f64::total_cmp);
                let ms = times[times.len() / 2];
                let reference = reference(h, b, l).map(|r| if backward { r.1 } else { r.0 });
                let (rs, ratio) = match reference {
                    Some(r) => (format!("{r:.2}"), format!("{:.2}x", ms / r)),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "| {h} | {b} | {l} | {} | {} | {ms:.2} | {rs} | {ratio} | {:.2} GB |",
                    if backward { "fwd+bwd" } else { "fwd" },
                    match (bf16, tf32, tiles) {
                        (true, _, true) => "bf16, tiled",
                        (true, _, false) => "bf16",
                        (false, true, _) => "tf32",
                        (false, false, _) => "f32",
                    },
                    bound.plan().peak as f64 / 1e9,
                );
                let prof = ex.run(
                    &gpu.lowered,
                    &mut bound,
                    ExecOptions {
                        profile: true,
                        ..ExecOptions::default()
                    },
                )?;
                // SSD_PRODUCTS=1: each product in schedule order (its FLOPs tell which).
                if std::env::var("SSD_PRODUCTS").is_ok_and(|v| v == "1") {
                    for t in prof.iter().filter(|t| t.flops > 0) {
                        eprintln!(
                            "      product {:>9.3} GFLOP {:>8.3} ms {:>7.1} TFLOP/s",
                            t.flops as f64 / 1e9,
                            t.ms,
                            t.flops as f64 / f64::from(t.ms) / 1e9
                        );
                    }
                }
                // By kernel name without node numbers: the forward's and the gradient's
                // kernels stay apart (`ssd_scan_mask`, `ssd_scan_grad_mask`).
                for k in ma2mba::gpu::by_kind(&prof) {
                    eprintln!(
                        "    {:<26} {:>8.3} ms  {:>7.1} GB/s floor  {:>7.1} TFLOP/s",
                        k.kind,
                        k.ms,
                        k.bytes as f64 / k.ms / 1e6,
                        k.flops as f64 / k.ms / 1e9
                    );
                }
            }
        }
    }
    Ok(())
}
