//! The GPU path (NVPTX kernels + cuBLAS through the CUDA executor) against the CPU path
//! (Cranelift kernels + CPU GEMM) on the same programs and inputs: the transcendental ops
//! over a wide range of inputs, the tiny models' logits and final states (and the f64
//! interpreter's logits), every output of their training graphs (loss, every gradient), and
//! the 130m models' forward and training graphs. The arena is poisoned with NaN before each
//! GPU run, so an element no kernel writes fails the comparison.
//!
//! Without a GPU (no libcuda, no device, no cuBLAS) every test prints a `skipped:` line and
//! passes; with `MA2MBA_REQUIRE_GPU=1` (the device machine) a missing GPU fails instead.
#![cfg(feature = "cuda")]

mod common;

use codegen::nvptx::Target;
use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, UnaryOp, Value};
use ma2mba::gpu::{CudaError, GpuError, GpuGraph};
use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use runtime::array::Array;
use runtime::cpu::HostData;
use runtime::cuda::ExecOptions;
use runtime::init::Rng;
use runtime::interp::{self, Bindings};
use std::collections::HashMap;

/// CPU vs GPU, same dtype (RELIABILITY.md): |a - e| <= atol + rtol |e|.
const CPU_GPU: (f64, f64) = (1e-3, 1e-3);
/// f32 reductions, matmul, scans vs the f64 interpreter.
const REDUCTION: (f64, f64) = (6e-4, 2e-3);
/// Normwise relative error allowed for the 130m models' gradients (deep f32 chains whose
/// GEMMs sum in different orders on the two devices).
const NORMWISE: f64 = 1e-3;

/// Compiles for the GPU, or says why the test is skipped (`None`).
fn gpu(what: &str, g: &Graph) -> Option<GpuGraph> {
    gpu_with(what, g, &LowerOptions::default())
}

/// [`gpu`] lowered with `lo`.
fn gpu_with(what: &str, g: &Graph, lo: &LowerOptions) -> Option<GpuGraph> {
    match GpuGraph::compile(g, lo, Target::Sm90, 0) {
        Ok(x) => Some(x),
        Err(GpuError::Cuda(e @ (CudaError::NoDevice(_) | CudaError::NoCublas(_))))
            if std::env::var("MA2MBA_REQUIRE_GPU").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: {what}: {e}");
            None
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

fn opts() -> ExecOptions {
    ExecOptions {
        poison: true,
        sync_each_step: std::env::var("MA2MBA_SYNC_EACH_STEP").as_deref() == Ok("1"),
        ..ExecOptions::default()
    }
}

/// Elementwise comparison: prints max and mean |diff| and the worst index; NaN never passes.
fn assert_close(what: &str, got: &[f32], want: &[f32], (atol, rtol): (f64, f64)) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut max_abs, mut sum_abs, mut worst, mut worst_excess) =
        (0.0f64, 0.0f64, 0usize, f64::MIN);
    let mut max_rel = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        let d = (g - w).abs();
        let excess = if d.is_nan() {
            f64::INFINITY
        } else {
            d - (atol + rtol * w.abs())
        };
        if excess > worst_excess {
            (worst, worst_excess) = (i, excess);
        }
        if d.is_finite() {
            max_abs = max_abs.max(d);
            sum_abs += d;
            if w != 0.0 {
                max_rel = max_rel.max(d / w.abs());
            }
        }
    }
    let mean = sum_abs / got.len().max(1) as f64;
    eprintln!(
        "{what}: {} values, max |diff| {max_abs:.3e}, mean |diff| {mean:.3e}, max rel {max_rel:.3e}",
        got.len()
    );
    assert!(
        worst_excess <= 0.0,
        "{what}: index {worst}: got {} want {} (max |diff| {max_abs:e}, mean {mean:e})",
        got.get(worst).copied().unwrap_or(f32::NAN),
        want.get(worst).copied().unwrap_or(f32::NAN)
    );
    max_abs
}

/// Normwise relative error |got - want| / |want|; NaN and inf fail.
fn assert_normwise(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] is {g} on the GPU (CPU {w})");
        diff += (f64::from(g) - f64::from(w)).powi(2);
        norm += f64::from(w).powi(2);
    }
    let rel = if norm > 0.0 {
        diff.sqrt() / norm.sqrt()
    } else {
        diff.sqrt()
    };
    assert!(
        rel <= tol,
        "{what}: normwise relative error {rel:e} > {tol:e}"
    );
    rel
}

struct Case {
    syms: Vec<(&'static str, i64)>,
    data: HashMap<String, HostData>,
    params: HashMap<String, Vec<f32>>,
    states: HashMap<String, Vec<f32>>,
}

/// Random token ids (targets end each sequence with the ignore index), random states, and
/// the model's initial parameters rounded to f32.
fn case(model: &Graph, g: &Graph, b: usize, l: usize, vocab: u64, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let syms = vec![("B", b as i64), ("L", l as i64)];
    let bind = |s: &str| syms.iter().find(|(n, _)| *n == s).map(|(_, v)| *v as u64);
    let mut data = HashMap::new();
    let mut states = HashMap::new();
    for n in g.nodes() {
        let Op::Input { name, kind, ty } = g.op(n) else {
            continue;
        };
        let count: usize = ty
            .shape
            .iter()
            .map(|d| d.eval(&bind).expect("bound") as usize)
            .product();
        match kind {
            InputKind::State => {
                let v = (0..count).map(|_| (rng.uniform() - 0.5) as f32).collect();
                states.insert(name.clone(), v);
            }
            _ if !ty.dtype.is_float() => {
                let mut ids: Vec<i32> = (0..count)
                    .map(|_| (rng.next_u64() % vocab) as i32)
                    .collect();
                if name == "targets" {
                    for s in 0..b {
                        ids[s * l + l - 1] = -100;
                    }
                }
                data.insert(name.clone(), HostData::I32(ids));
            }
            _ => {
                let v = (0..count).map(|_| rng.normal() as f32).collect();
                data.insert(name.clone(), HostData::F32(v));
            }
        }
    }
    let params = runtime::init::init_params(model, seed)
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    Case {
        syms,
        data,
        params,
        states,
    }
}

/// Runs `g` on the CPU and (compiled as `gpu`) on the GPU; returns (name, cpu, gpu) for every
/// output.
fn both(what: &str, gpu: &GpuGraph, g: &Graph, c: &Case) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    both_with(what, gpu, g, c, &LowerOptions::default())
}

/// [`both`] with the CPU lowering `g` with `lo`.
fn both_with(
    what: &str,
    gpu: &GpuGraph,
    g: &Graph,
    c: &Case,
    lo: &LowerOptions,
) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let t = std::time::Instant::now();
    let cpu = CpuGraph::compile(g, lo).expect("cpu compile");
    let (want, _) = cpu
        .run(&c.syms, &c.data, &c.params, &c.states)
        .unwrap_or_else(|e| panic!("{what}: cpu: {e}"));
    let cpu_time = t.elapsed();
    let t = std::time::Instant::now();
    let got = gpu
        .run(&c.syms, &c.data, &c.params, &c.states, opts())
        .unwrap_or_else(|e| panic!("{what}: gpu: {e}"));
    eprintln!(
        "{what}: {} kernels, {} steps on {}; cpu {cpu_time:.2?}, gpu {:.2?} (first run)",
        gpu.lowered.kernels.len(),
        gpu.lowered.steps.len(),
        gpu.device_name(),
        t.elapsed()
    );
    assert_eq!(got.len(), want.len());
    got.into_iter()
        .zip(want)
        .map(|((n, gv), (wn, wv))| {
            assert_eq!(n, wn);
            (n, wv, gv)
        })
        .collect()
}

fn add(g: &mut Graph, op: Op, xs: &[Value]) -> Value {
    Value::from(g.add(op, xs, Span::default(), None).expect("well-typed"))
}

/// Bits apart of two finite f32 of the same sign (ulps).
fn ulps(a: f32, b: f32) -> u32 {
    if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
        0
    } else if a.is_sign_negative() != b.is_sign_negative() {
        u32::MAX
    } else {
        a.to_bits().abs_diff(b.to_bits())
    }
}

#[test]
fn transcendentals_match_the_cpu_to_the_ulp() {
    let n = (1usize << 16) + 3;
    let mut g = Graph::new("unary");
    let ty = TensorType::new(DType::F32, vec![Dim::known(n as u64)]);
    let input = |g: &mut Graph, name: &str| {
        let op = Op::Input {
            name: name.into(),
            kind: InputKind::Data,
            ty: ty.clone(),
        };
        add(g, op, &[])
    };
    let x = input(&mut g, "x");
    let p = input(&mut g, "p");
    let ops = [
        (UnaryOp::Exp, x),
        (UnaryOp::Sigmoid, x),
        (UnaryOp::Silu, x),
        (UnaryOp::Softplus, x),
        (UnaryOp::Recip, x),
        (UnaryOp::Neg, x),
        (UnaryOp::Log, p),
        (UnaryOp::Sqrt, p),
        (UnaryOp::Rsqrt, p),
    ];
    for (op, a) in ops {
        let y = add(&mut g, Op::Unary(op), &[a]);
        g.add_output(op.name(), y);
    }
    let mut rng = Rng::new(7);
    // Signed values from 1e-8 to 1e2.5 (exp's whole range and past it), and positive ones
    // over 60 decades; a few exact special points.
    let mut xs: Vec<f32> = (0..n)
        .map(|_| {
            let m = 10f64.powf(rng.uniform() * 10.5 - 8.0);
            (if rng.next_u64().is_multiple_of(2) {
                m
            } else {
                -m
            }) as f32
        })
        .collect();
    let mut ps: Vec<f32> = (0..n)
        .map(|_| 10f64.powf(rng.uniform() * 60.0 - 30.0) as f32)
        .collect();
    for (i, v) in [0.0f32, -0.0, 1.0, 20.0, 20.000002, -104.0, 89.0, 88.7]
        .iter()
        .enumerate()
    {
        xs[i] = *v;
    }
    ps[0] = 1.0;
    ps[1] = f32::MIN_POSITIVE;
    ps[2] = 1e-40;
    let mut data = HashMap::new();
    data.insert("x".to_string(), HostData::F32(xs));
    data.insert("p".to_string(), HostData::F32(ps));
    let c = Case {
        syms: vec![],
        data,
        params: HashMap::new(),
        states: HashMap::new(),
    };
    let Some(dev) = gpu("unary ops", &g) else {
        return;
    };
    let outs = both("unary ops", &dev, &g, &c);
    for (name, cpu, gpu) in outs {
        let diff: Vec<u32> = cpu.iter().zip(&gpu).map(|(&a, &b)| ulps(a, b)).collect();
        let same = diff.iter().filter(|&&d| d == 0).count();
        let worst = diff.iter().copied().max().unwrap_or(0);
        eprintln!(
            "{name}: {same} of {} bit-identical, worst {worst} ulp",
            diff.len()
        );
        assert!(worst <= 2, "{name}: up to {worst} ulps apart from the CPU");
    }
}

fn forward(name: &str, shapes: &[(usize, usize)], vocab: u64) {
    let model = common::compile_name(name).graph;
    let Some(dev) = gpu(&format!("{name} forward"), &model) else {
        return;
    };
    for (i, &(b, l)) in shapes.iter().enumerate() {
        let what = format!("{name} forward B={b} L={l}");
        let c = case(&model, &model, b, l, vocab, 11 + i as u64);
        let outs = both(&what, &dev, &model, &c);
        for (out, cpu, gpu) in &outs {
            assert_close(&format!("{what} {out}"), gpu, cpu, CPU_GPU);
        }
        if model.params().count() < 100 {
            // Tiny models: the GPU's logits against the f64 interpreter too.
            let mut bind = Bindings::default();
            for (k, v) in &c.params {
                let shape = model
                    .params()
                    .find_map(|n| match model.op(n) {
                        Op::Param { name, ty, .. } if name == k => Some(
                            ty.shape
                                .iter()
                                .map(|d| d.as_known().expect("known") as usize)
                                .collect(),
                        ),
                        _ => None,
                    })
                    .expect("param shape");
                bind.params.insert(
                    k.clone(),
                    Array::new(shape, v.iter().map(|&x| f64::from(x)).collect()),
                );
            }
            if let Some(HostData::I32(ids)) = c.data.get("input_ids") {
                bind.inputs.insert(
                    "input_ids".into(),
                    Array::new(vec![b, l], ids.iter().map(|&x| f64::from(x)).collect()),
                );
            }
            for (k, v) in &c.states {
                let n = model
                    .nodes()
                    .find(|&n| matches!(model.op(n), Op::Input { name, .. } if name == k))
                    .expect("state node");
                let Op::Input { ty, .. } = model.op(n) else {
                    unreachable!()
                };
                let bindf = |s: &str| {
                    if s == "B" {
                        Some(b as u64)
                    } else {
                        Some(l as u64)
                    }
                };
                let shape = ty
                    .shape
                    .iter()
                    .map(|d| d.eval(&bindf).expect("bound") as usize)
                    .collect();
                bind.states.insert(
                    k.clone(),
                    Array::new(shape, v.iter().map(|&x| f64::from(x)).collect()),
                );
            }
            let want = interp::run(&model, &bind).expect("interpreter");
            let (_, _, logits) = outs
                .iter()
                .find(|(n, _, _)| n == "logits")
                .expect("a logits output");
            let reference: Vec<f32> = want
                .get("logits")
                .expect("interpreter logits")
                .data
                .iter()
                .map(|&x| x as f32)
                .collect();
            assert_close(
                &format!("{what} logits vs f64 interpreter"),
                logits,
                &reference,
                REDUCTION,
            );
        }
    }
}

fn training(name: &str, b: usize, l: usize, vocab: u64, normwise: bool) {
    let model = common::compile_name(name).graph;
    let tg = passes::training_graph(&model, "logits", -100).expect("training graph");
    let what = format!("{name} training B={b} L={l}");
    let Some(dev) = gpu(&what, &tg.graph) else {
        return;
    };
    let c = case(&model, &tg.graph, b, l, vocab, 23);
    let outs = both(&what, &dev, &tg.graph, &c);
    let (mut worst_abs, mut worst_norm) = ((String::new(), 0.0f64), (String::new(), 0.0f64));
    let mut grads = 0;
    for (out, cpu, gpu) in &outs {
        grads += usize::from(out.starts_with("grad."));
        let label = format!("{what} {out}");
        if normwise && out != "loss" {
            let r = assert_normwise(&label, gpu, cpu, NORMWISE);
            if r > worst_norm.1 {
                worst_norm = (out.clone(), r);
            }
        } else {
            let a = assert_close(&label, gpu, cpu, CPU_GPU);
            if a > worst_abs.1 {
                worst_abs = (out.clone(), a);
            }
        }
    }
    eprintln!(
        "{what}: {grads} gradients; worst max |diff| {:.3e} ({}), worst normwise {:.3e} ({})",
        worst_abs.1, worst_abs.0, worst_norm.1, worst_norm.0
    );
    assert!(grads > 0);
}

#[test]
fn tiny_mamba_matches_the_cpu() {
    forward("tiny-mamba", &[(2, 13), (1, 1), (3, 64)], 61);
    training("tiny-mamba", 2, 13, 61, false);
}

#[test]
fn tiny_mamba2_matches_the_cpu() {
    forward("tiny-mamba2", &[(3, 37), (1, 1), (2, 64)], 61);
    training("tiny-mamba2", 3, 37, 61, false);
}

#[test]
fn ssd_matmul_form_matches_the_cpu() {
    // Grouped heads at awkward sizes over three chunks (the last partial), then
    // mamba2-2.7b's head and state sizes over a chunk and one step.
    for (dims, b, l, chunk) in [((3, 2, 5, 7), 2, 300, 256), ((2, 1, 64, 128), 1, 129, 128)] {
        let g = common::ssd_graph(dims, chunk);
        let what = format!("ssd (hpg, G, P, N) = {dims:?} B={b} L={l} chunk {chunk}");
        let Some(dev) = gpu(&what, &g) else {
            return;
        };
        let c = case(&g, &g, b as usize, l, 1, 31);
        let outs = both(&what, &dev, &g, &c);
        for (out, cpu, gpu) in &outs {
            assert_close(&format!("{what} {out}"), gpu, cpu, CPU_GPU);
        }
        // With TF32 tensor cores: normwise within 5e-3 of the CPU's f32.
        dev.exec().set_tf32(true);
        let got = dev
            .run(&c.syms, &c.data, &c.params, &c.states, opts())
            .unwrap_or_else(|e| panic!("{what}: gpu tf32: {e}"));
        dev.exec().set_tf32(false);
        for ((out, g), (_, cpu, _)) in got.iter().zip(&outs) {
            let r = assert_normwise(&format!("{what} {out} tf32"), g, cpu, 5e-3);
            eprintln!("{what} {out}: tf32 normwise {r:.2e}");
        }
    }
}

/// The tiled SSD (`LowerOptions::ssd_tiles`: the forward's `mma.sync` on bf16 tiles in
/// shared memory, the gradient's f32 tile of `T = dM ⊙ M` and its row and column sums)
/// against the CPU running the same tiled kernels as loops: the same bf16 operands, sums in
/// another order. The GPU's carries across chunks are tiled kernels (`on_gpu`), the CPU's
/// walk the chunks per element. Grouped heads, partial last chunks, mamba2-2.7b's head and
/// state sizes, and more chunks than a round of the tiled carry with blocks of 256 and 64
/// state elements; the gradient after its forward (reading its chunk states) and alone.
/// Normwise within 1e-3: an operand whose f32 value differs in its last bit (the running
/// sums of `dt·A` are products, summed in another order) may round to the neighbouring
/// bf16, which moves a few outputs by one bf16 step of one term (the bf16 rounding itself is
/// 2e-3 to 3e-3 normwise, `tests/kernels.rs`).
#[test]
fn tiled_ssd_matches_the_cpu() {
    let tiled = LowerOptions {
        ssd_tiles: true,
        ..LowerOptions::default()
    };
    for (dims, b, l, chunk, forward) in [
        ((2, 2, 16, 32), 2, 70, 32, true),
        ((2, 2, 16, 32), 2, 70, 32, false),
        ((2, 1, 64, 128), 1, 300, 128, true),
        ((2, 1, 16, 16), 2, 600, 16, true),
        ((1, 2, 8, 8), 1, 530, 16, true),
    ] {
        let g = common::ssd_graph_with(dims, chunk, forward);
        let what = format!(
            "tiled ssd (hpg, G, P, N) = {dims:?} B={b} L={l} chunk {chunk} forward {forward}"
        );
        let Some(dev) = gpu_with(&what, &g, &tiled) else {
            return;
        };
        let tiled_named = |carry: bool| {
            let tiled = dev.lowered.kernels.iter().filter(|k| ir::tile::is_tiled(k));
            tiled.filter(|k| k.name.contains("_carry") == carry).count()
        };
        assert_eq!(
            tiled_named(false),
            1 + usize::from(forward),
            "{what}: the forward's and the gradient's"
        );
        // The GPU's carries are tiled too (`on_gpu`); the CPU's walk the chunks. With its
        // forward just before it, the gradient reads the forward's entering states: the
        // forward's carry and the gradient's backward one. Without, the gradient's two.
        assert_eq!(tiled_named(true), 2, "{what}: the carries");
        let c = case(&g, &g, b as usize, l, 1, 31);
        // Both entries of every kernel: 32-bit index math (what these sizes launch) and i64.
        for index32 in [true, false] {
            dev.exec().set_index32(index32);
            let what = format!("{what} index32 {index32}");
            for (out, cpu, gpu) in &both_with(&what, &dev, &g, &c, &tiled) {
                let r = assert_normwise(&format!("{what} {out}"), gpu, cpu, 1e-3);
                eprintln!("{what} {out}: normwise {r:.2e}");
            }
        }
    }
}

#[test]
fn mamba_130m_matches_the_cpu() {
    forward("mamba-130m", &[(1, 33)], 50_000);
    training("mamba-130m", 1, 16, 50_000, true);
}

#[test]
fn mamba2_130m_matches_the_cpu() {
    forward("mamba2-130m", &[(1, 33), (1, 300)], 50_000);
    training("mamba2-130m", 1, 16, 50_000, true);
    training("mamba2-130m", 1, 260, 50_000, true);
}

/// Reads the `logits` tensor of a `--dump-logits` file.
fn dumped(path: &std::path::Path) -> Vec<f32> {
    let ck = runtime::weights::Checkpoint::open(path).expect("open logits");
    ck.to_f32("logits").expect("logits")
}

/// `ma2mba run --device cuda` and `ma2mba train --device cuda` against the same commands on
/// the CPU, and the Rust API (`Model::load` with `Backend::Cuda`).
#[test]
fn cli_run_and_train_on_cuda_match_the_cpu() {
    let tiny = common::compile_name("tiny-mamba2").graph;
    if gpu("cli --device cuda", &tiny).is_none() {
        return;
    }
    let d = std::env::temp_dir().join(format!("ma2mba-gpu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let ids = d.join("batch.txt");
    std::fs::write(&ids, "1 5 9 2 44 3 7 7 12 60\n3 3 8 19 0 2 51 6 6 1\n").unwrap();
    for name in ["tiny-mamba", "tiny-mamba2", "mamba2-130m"] {
        let mut logits = Vec::new();
        for dev in ["cpu", "cuda"] {
            let out = d.join(format!("{name}-{dev}.safetensors"));
            let o = common::cli(&[
                "run",
                name,
                "--tokens-file",
                ids.to_str().unwrap(),
                "--dump-logits",
                out.to_str().unwrap(),
                "--device",
                dev,
            ]);
            assert_eq!(o.code, 0, "run {name} --device {dev}: {}", o.stderr);
            eprintln!("run {name} --device {dev}: {}", o.stderr.trim());
            if dev == "cuda" {
                assert!(o.stderr.contains(" on "), "{}", o.stderr);
            }
            logits.push(dumped(&out));
        }
        assert_close(
            &format!("run {name} --device cuda logits"),
            &logits[1],
            &logits[0],
            CPU_GPU,
        );
    }
    // The Rust API.
    let opts = |backend| ma2mba::model::LoadOptions {
        backend,
        ..Default::default()
    };
    let toks = vec![vec![3u32, 1, 4, 1, 5, 9, 2, 6]; 2];
    let mut cpu =
        ma2mba::model::Model::load("tiny-mamba", &opts(ma2mba::model::Backend::Cranelift)).unwrap();
    let mut gpu_m =
        ma2mba::model::Model::load("tiny-mamba", &opts(ma2mba::model::Backend::Cuda)).unwrap();
    let (a, b) = (cpu.forward(&toks).unwrap(), gpu_m.forward(&toks).unwrap());
    assert_close(
        "Model::load Backend::Cuda logits",
        &b.data,
        &a.data,
        CPU_GPU,
    );
    // Training through the CLI (its log lines go to the process's stdout)...
    let data = d.join("train.txt");
    let stream: Vec<String> = (0..400)
        .map(|i| ((i * 7 + i / 5) % 61).to_string())
        .collect();
    std::fs::write(&data, stream.join(" ")).unwrap();
    let o = common::cli(&[
        "train",
        "tiny-mamba2",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "3",
        "--device",
        "cuda",
    ]);
    assert_eq!(o.code, 0, "train --device cuda: {}", o.stderr);
    assert!(o.stdout.contains("trained steps 0..3"), "{}", o.stdout);
    // ...and through the API: the same losses step by step (AdamW on the host on the CPU,
    // on the device on the GPU).
    let m =
        ma2mba::model::Model::load("tiny-mamba2", &opts(ma2mba::model::Backend::Interp)).unwrap();
    let (g, params) = m.into_parts();
    let config = ma2mba::train::TrainConfig::default();
    let mut cpu_t =
        ma2mba::train::Trainer::new(&g, "logits", params.clone(), config.clone()).unwrap();
    let mut gpu_t = ma2mba::train::Trainer::new_gpu(&g, "logits", params, config).unwrap();
    let (b, l) = (2, 32);
    for step in 0..4 {
        let ids: Vec<i32> = (0..b * l)
            .map(|i| ((i * 7 + step * 3) % 61) as i32)
            .collect();
        let targets: Vec<i32> = (0..b * l)
            .map(|i| ((i * 7 + step * 3 + 7) % 61) as i32)
            .collect();
        let c = cpu_t.step(&ids, &targets, b, l).unwrap();
        let x = gpu_t.step(&ids, &targets, b, l).unwrap();
        eprintln!(
            "train step {step}: loss cpu {:.6} gpu {:.6}; |grad| cpu {:.6} gpu {:.6}; gpu arena {} bytes",
            c.loss, x.loss, c.grad_norm, x.grad_norm, x.arena_bytes
        );
        assert!((c.loss - x.loss).abs() <= 1e-3 * c.loss.abs().max(1.0));
        assert!((c.grad_norm - x.grad_norm).abs() <= 1e-3 * c.grad_norm.max(1.0));
    }
    // AdamW ran on the device: its parameters, brought back, are the CPU's.
    gpu_t.sync_host().unwrap();
    let mut names: Vec<&String> = cpu_t.params.keys().collect();
    names.sort();
    for name in names {
        let r = assert_normwise(
            &format!("parameter {name} after 4 steps"),
            &gpu_t.params[name],
            &cpu_t.params[name],
            1e-4,
        );
        assert!(r.is_finite());
    }
}

/// A model on the GPU and the same model (same seed, same weights) on the CPU, or `None`
/// (with a skip line) without a GPU.
fn model_pair(name: &str) -> Option<(ma2mba::model::Model, ma2mba::model::Model)> {
    use ma2mba::model::{Backend, LoadOptions, Model};
    let opts = |backend| LoadOptions {
        backend,
        seed: 11,
        ..LoadOptions::default()
    };
    let g = match Model::load(name, &opts(Backend::Cuda)) {
        Ok(m) => m,
        Err(e)
            if std::env::var("MA2MBA_REQUIRE_GPU").as_deref() != Ok("1")
                && (e.to_string().contains("no usable CUDA device")
                    || e.to_string().contains("cuBLAS is not available")) =>
        {
            eprintln!("skipped: {name} decode on the GPU: {e}");
            return None;
        }
        Err(e) => panic!("{name} on the GPU: {e}"),
    };
    let c = Model::load(name, &opts(Backend::Cranelift)).expect("cpu model");
    Some((g, c))
}

/// The decode step on the GPU (states on the device, CUDA graph replay) against the parallel
/// forward on the GPU and on the CPU: teacher-forced, every step's logits equal the forward's
/// at that position; the final state equals the prefill's over the whole sequence; one-shot
/// `Model::step` with host states agrees; dropping a sequence mid-decode leaves the other's
/// logits unchanged; greedy generation gives the CPU's tokens.
fn decode_matches_forward(name: &str) {
    let Some((mut g, mut c)) = model_pair(name) else {
        return;
    };
    let vocab = g.vocab() as u64;
    let mut rng = Rng::new(5);
    let (b, prompt, total) = (2usize, 5usize, 12usize);
    let toks: Vec<Vec<u32>> = (0..b)
        .map(|_| {
            (0..total)
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect()
        })
        .collect();
    let want_gpu = g.forward(&toks).unwrap();
    let want_cpu = c.forward(&toks).unwrap();
    assert_close(
        &format!("{name}: GPU forward vs CPU"),
        &want_gpu.data,
        &want_cpu.data,
        CPU_GPU,
    );
    let heads: Vec<Vec<u32>> = toks.iter().map(|t| t[..prompt].to_vec()).collect();
    let mut state = g.new_state(b);
    let pre = g.prefill(&heads, &mut state).unwrap();
    let mut one_shot = state.clone();
    for r in 0..b {
        assert_close(
            &format!("{name}: prefill row {r}"),
            pre.at(r, prompt - 1),
            want_gpu.at(r, prompt - 1),
            CPU_GPU,
        );
    }
    let mut dec = g.begin_decode(state).unwrap();
    let (mut got, mut got_one, mut want) = (Vec::new(), Vec::new(), Vec::new());
    for t in prompt..total {
        let step: Vec<u32> = toks.iter().map(|s| s[t]).collect();
        let lg = g.decode_step(&mut dec, &step).unwrap();
        let lo = g.step(&step, &mut one_shot).unwrap();
        for r in 0..b {
            got.extend_from_slice(lg.at(r, 0));
            got_one.extend_from_slice(lo.at(r, 0));
            want.extend_from_slice(want_cpu.at(r, t));
        }
    }
    assert_close(
        &format!("{name}: GPU decode steps vs CPU forward"),
        &got,
        &want,
        REDUCTION,
    );
    assert_eq!(
        got, got_one,
        "{name}: decode (graph replay) and one-shot steps differ"
    );
    // The final states: decode's equal a prefill over the whole sequence.
    let fin = g.end_decode(dec).unwrap();
    let mut whole = g.new_state(b);
    g.prefill(&toks, &mut whole).unwrap();
    for (n, shape, v) in whole.tensors() {
        let (s2, v2) = fin.get(&n).expect("state");
        assert_eq!(s2, &shape[..]);
        assert_close(&format!("{name}: final state {n}"), v2, &v, REDUCTION);
    }
    // Sequence 1 alone after dropping sequence 0 mid-decode.
    let mut state = g.new_state(b);
    g.prefill(&heads, &mut state).unwrap();
    let mut dec = g.begin_decode(state).unwrap();
    let step: Vec<u32> = toks.iter().map(|s| s[prompt]).collect();
    g.decode_step(&mut dec, &step).unwrap();
    g.decode_select(&mut dec, &[1]).unwrap();
    assert_eq!(dec.batch(), 1);
    for (t, &tok) in toks[1].iter().enumerate().skip(prompt + 1) {
        let lg = g.decode_step(&mut dec, &[tok]).unwrap();
        assert_close(
            &format!("{name}: after select, t={t}"),
            lg.at(0, 0),
            want_cpu.at(1, t),
            REDUCTION,
        );
    }
    // Greedy generation: the GPU's tokens are the CPU's.
    let cfg = ma2mba::generate::GenerateConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let prompts = vec![heads[0].clone(), heads[1][..3].to_vec()];
    let a = g.generate(&prompts, &cfg, |_| true).unwrap();
    let e = c.generate(&prompts, &cfg, |_| true).unwrap();
    for (x, y) in a.sequences.iter().zip(&e.sequences) {
        assert_eq!(x.tokens, y.tokens, "{name}: greedy tokens GPU vs CPU");
    }
    eprintln!(
        "{name}: GPU greedy {:?}, {:.3} ms/step",
        a.sequences[0].tokens,
        a.timings.ms_per_step()
    );
}

#[test]
fn tiny_mamba_decode_matches_the_forward() {
    decode_matches_forward("tiny-mamba");
}

#[test]
fn tiny_mamba2_decode_matches_the_forward() {
    decode_matches_forward("tiny-mamba2");
}

#[test]
fn mamba2_130m_decode_matches_the_forward() {
    decode_matches_forward("mamba2-130m");
}

/// `ma2mba generate --device cuda` prints the CPU's greedy continuation.
#[test]
fn cli_generate_on_cuda_matches_the_cpu() {
    if model_pair("tiny-mamba").is_none() {
        return;
    }
    let mut outs = Vec::new();
    for dev in ["cpu", "cuda"] {
        let o = common::cli(&[
            "generate",
            "tiny-mamba2",
            "--tokens",
            "3 1 4 1 5",
            "--max-new-tokens",
            "12",
            "--device",
            dev,
        ]);
        assert_eq!(o.code, 0, "generate --device {dev}: {}", o.stderr);
        eprintln!(
            "generate --device {dev}: {} | {}",
            o.stdout.trim(),
            o.stderr.trim()
        );
        outs.push(o.stdout.lines().next().unwrap_or_default().to_string());
    }
    assert!(!outs[0].is_empty());
    assert_eq!(outs[0], outs[1], "greedy ids on cpu vs cuda");
}

/// bf16 weights in the matrix products (inference): the decode steps stay close to the
/// CPU's f32 forward (normwise), and to the bf16 forward on the GPU.
#[test]
fn bf16_weights_decode_close_to_f32() {
    let Some((mut g, mut c)) = model_pair("mamba2-130m") else {
        return;
    };
    g.use_bf16_weights().unwrap();
    let toks: Vec<Vec<u32>> = vec![(0..10).map(|i| (i * 977 + 13) % 50000).collect()];
    let want = c.forward(&toks).unwrap();
    let fwd = g.forward(&toks).unwrap();
    let e = assert_normwise(
        "mamba2-130m bf16 forward vs CPU f32",
        &fwd.data,
        &want.data,
        3e-2,
    );
    eprintln!("bf16 forward: normwise {e:.3e}");
    let mut state = g.new_state(1);
    g.prefill(&[toks[0][..4].to_vec()], &mut state).unwrap();
    let mut dec = g.begin_decode(state).unwrap();
    let (mut got, mut exp, mut exp16) = (Vec::new(), Vec::new(), Vec::new());
    for (t, &tok) in toks[0].iter().enumerate().skip(4) {
        let lg = g.decode_step(&mut dec, &[tok]).unwrap();
        got.extend_from_slice(lg.at(0, 0));
        exp.extend_from_slice(want.at(0, t));
        exp16.extend_from_slice(fwd.at(0, t));
    }
    let a = assert_normwise("bf16 decode vs CPU f32 forward", &got, &exp, 3e-2);
    let b = assert_normwise("bf16 decode vs bf16 GPU forward", &got, &exp16, 1e-2);
    eprintln!("bf16 decode: normwise {a:.3e} vs f32, {b:.3e} vs the bf16 forward");
}

/// An artifact runs on the GPU from its manifest and PTX alone (`ma2mba compile`, then
/// `ma2mba run x.m2pack --device cuda`): the logits equal the CPU's forward; a shape the
/// artifact was not compiled for is refused.
#[test]
fn compiled_artifacts_run_on_the_gpu() {
    if model_pair("tiny-mamba").is_none() {
        return;
    }
    let d = std::env::temp_dir().join(format!("ma2mba-gpu-artifact-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let ids = d.join("ids.txt");
    for (name, batch, rows) in [
        (
            "tiny-mamba2",
            "2",
            "1 5 9 2 44 3 7 7 12 60 2 2\n3 3 8 19 0 2 51 6 6 1 9 9\n",
        ),
        ("mamba-130m", "1", "464 1 2 3 3 3 1000 20000 7 8 9 10\n"),
    ] {
        std::fs::write(&ids, rows).unwrap();
        let pack = d.join(format!("{name}.m2pack"));
        let o = common::cli(&[
            "compile",
            name,
            "--batch",
            batch,
            "--seq",
            "12",
            "-o",
            pack.to_str().unwrap(),
        ]);
        assert_eq!(o.code, 0, "compile {name}: {}", o.stderr);
        let mut logits = Vec::new();
        for (model, dev) in [
            (name.to_string(), "cpu"),
            (pack.display().to_string(), "cuda"),
        ] {
            let out = d.join(format!("{name}-{dev}.safetensors"));
            let o = common::cli(&[
                "run",
                &model,
                "--tokens-file",
                ids.to_str().unwrap(),
                "--dump-logits",
                out.to_str().unwrap(),
                "--device",
                dev,
            ]);
            assert_eq!(o.code, 0, "run {model} --device {dev}: {}", o.stderr);
            eprintln!("run {model}: {}", o.stderr.trim());
            logits.push(dumped(&out));
        }
        assert_close(
            &format!("{name}: artifact on the GPU vs CPU forward"),
            &logits[1],
            &logits[0],
            CPU_GPU,
        );
        std::fs::write(&ids, "1 2 3\n").unwrap();
        let o = common::cli(&[
            "run",
            pack.to_str().unwrap(),
            "--tokens-file",
            ids.to_str().unwrap(),
            "--device",
            "cuda",
        ]);
        assert_eq!(o.code, 1);
        assert!(o.stderr.contains("compiled for batch"), "{}", o.stderr);
    }
}

/// Checkpointed training on the GPU (`train --device cuda --budget`): under a plan with
/// several layer groups and time segments and recomputed cells, the loss and every gradient
/// are bit-identical to the same grid keeping everything (no recomputation) on the GPU, and
/// equal the CPU's checkpointed step and the GPU's whole training graph within tolerance.
#[test]
fn checkpointed_training_on_the_gpu_matches() {
    use ma2mba::checkpoint::{CheckpointedStep, Device};
    use passes::remat::{Planner, Request};
    for (name, b, l, gsize, seg) in [
        ("tiny-mamba2", 2usize, 24usize, 1u32, 8u64),
        ("mamba-130m", 1, 32, 6, 16),
    ] {
        let g = common::compile_name(name).graph;
        if gpu(&format!("{name} checkpointed"), &g).is_none() {
            return;
        }
        let params: HashMap<String, Vec<f32>> = runtime::init::init_params(&g, 3)
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let mut rng = Rng::new(17);
        let vocab = if name.starts_with("tiny") { 64 } else { 50000 };
        let ids: Vec<i32> = (0..b * l)
            .map(|_| (rng.next_u64() % vocab) as i32)
            .collect();
        let mut targets = ids[1..].to_vec();
        targets.push(-100);
        let req = Request {
            batch: b as u64,
            seq: l as u64,
            budget: None,
            act_dtype: DType::F32,
            count_weights: false,
            quantum: 1,
            logits: false,
            copy_outputs: false,
            lower: LowerOptions::default(),
        };
        let mut planner = Planner::new(&g, req, -100).expect("planner");
        planner.exact_groups = u32::MAX;
        let plan = planner.grid_plan(gsize, seg, 0, 1).expect("plan");
        let kept = planner.grid_plan(gsize, seg, u64::MAX, 0).expect("plan");
        let what = format!("{name} B{b} L{l}: {}", passes::remat::describe(&plan));
        let run = |p: &passes::remat::Plan, d: Device| {
            let mut step = CheckpointedStep::compile_for(&g, p, d).expect("compiles");
            // Every stage run starts from a NaN arena: a read before a write shows.
            step.poison = true;
            step.run(&params, &ids, &targets, &HashMap::new())
                .expect("runs")
        };
        let out = run(&plan, Device::Cuda);
        let same = run(&kept, Device::Cuda);
        assert_eq!(
            out.loss.to_bits(),
            same.loss.to_bits(),
            "{what}: loss vs keeping everything"
        );
        for (n, v) in &out.grads {
            assert!(
                v.iter()
                    .zip(&same.grads[n])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: gradient of {n} differs from the run without recomputation"
            );
        }
        let cpu = run(&plan, Device::Cpu);
        assert!(
            (out.loss - cpu.loss).abs() <= 1e-5 * cpu.loss.abs().max(1.0),
            "{what}: loss {} vs CPU {}",
            out.loss,
            cpu.loss
        );
        let mut worst = 0f64;
        for (n, v) in &cpu.grads {
            worst = worst.max(assert_normwise(
                &format!("{what}: grad {n} vs CPU"),
                &out.grads[n],
                v,
                NORMWISE,
            ));
        }
        // The GPU's whole training graph.
        let tg = passes::training_graph(&g, "logits", -100).expect("training graph");
        let whole = gpu(&what, &tg.graph).expect("gpu");
        let data = HashMap::from([
            ("input_ids".to_string(), HostData::I32(ids.clone())),
            ("targets".to_string(), HostData::I32(targets.clone())),
        ]);
        let outs = whole
            .run(
                &[("B", b as i64), ("L", l as i64)],
                &data,
                &params,
                &HashMap::new(),
                opts(),
            )
            .expect("runs");
        // The whole graph's loss and gradients are of the mean loss already.
        for (n, v) in outs {
            if n == "loss" {
                let wl = f64::from(v[0]);
                assert!(
                    (out.loss - wl).abs() <= 1e-5 * wl.abs().max(1.0),
                    "{what}: loss {} vs whole {wl}",
                    out.loss
                );
            } else if let Some(p) = n.strip_prefix("grad.")
                && let Some(c) = out.grads.get(p)
            {
                worst = worst.max(assert_normwise(
                    &format!("{what}: grad {p} vs whole"),
                    c,
                    &v,
                    NORMWISE,
                ));
            }
        }
        eprintln!(
            "{what}: loss {:.6} (bit-identical to no recomputation); {} gradients, worst normwise {worst:.2e} vs the CPU and the whole graph",
            out.loss,
            out.grads.len()
        );
    }
}

/// Normwise relative error allowed between the GPU and the CPU with bf16 activations: both
/// round the same values to bf16, but where their products sum in different orders a value
/// can round to the neighbouring bf16 (2^-8 relative), and that difference propagates. A
/// cancelling sum (an `A_log` gradient) amplifies it, so the bound is the larger of this and
/// three times the CPU's own bf16 error against f32.
const BF16_CPU_GPU: f64 = 1e-2;

/// Normwise relative difference of `a` from `b`.
fn normwise(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// Asserts `gpu` is within [`BF16_CPU_GPU`] (or three times bf16's own error, `cpu` against
/// `cpu_f32`) of `cpu`; returns the difference.
fn assert_bf16_close(what: &str, gpu: &[f32], cpu: &[f32], cpu_f32: &[f32]) -> f64 {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    assert!(gpu.iter().all(|x| x.is_finite()), "{what}: not finite");
    let (d, noise) = (normwise(gpu, cpu), normwise(cpu, cpu_f32));
    assert!(
        d <= BF16_CPU_GPU.max(3.0 * noise) || d == 0.0,
        "{what}: normwise {d:.3e} from the CPU in bf16 (which is {noise:.3e} from f32)"
    );
    d
}

/// bf16 activations on the GPU (cuBLAS on bf16 operands, f32 accumulation) against the CPU
/// with bf16 activations.
#[test]
fn bf16_activations_match_the_cpu() {
    let bf16 = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    };
    for (name, b, l, vocab) in [("tiny-mamba2", 3, 37, 61), ("mamba2-130m", 1, 80, 50000)] {
        let model = common::compile_name(name).graph;
        let tg = passes::training_graph(&model, "logits", -100).expect("training graph");
        let what = format!("{name} training B={b} L={l} bf16");
        let Some(dev) = gpu_with(&what, &tg.graph, &bf16) else {
            return;
        };
        let l_ = &dev.lowered;
        let bf16_products = l_
            .steps
            .iter()
            .filter(|s| matches!(s, passes::Step::MatMul { lhs, .. } if l_.buffers[*lhs].dtype == DType::BF16))
            .count();
        assert!(bf16_products > 0, "{what}: no product on bf16 operands");
        let c = case(&model, &tg.graph, b, l, vocab, 29);
        let run_cpu = |lo: &LowerOptions| {
            CpuGraph::compile(&tg.graph, lo)
                .expect("cpu compile")
                .run(&c.syms, &c.data, &c.params, &c.states)
                .unwrap_or_else(|e| panic!("{what}: cpu: {e}"))
                .0
        };
        let (cpu_h, cpu_f) = (run_cpu(&bf16), run_cpu(&LowerOptions::default()));
        let got = dev
            .run(&c.syms, &c.data, &c.params, &c.states, opts())
            .unwrap_or_else(|e| panic!("{what}: gpu: {e}"));
        let mut worst = (0f64, String::new());
        for (((n, g), (_, h)), (_, f)) in got.iter().zip(&cpu_h).zip(&cpu_f) {
            let d = assert_bf16_close(&format!("{what} {n}"), g, h, f);
            if d > worst.0 {
                worst = (d, n.clone());
            }
        }
        eprintln!(
            "{what}: {bf16_products} bf16 products; {} outputs, worst normwise {:.2e} vs the CPU in bf16 ({})",
            got.len(),
            worst.0,
            worst.1
        );
    }
}

/// Checkpointed training with bf16 activations on the GPU (bf16 boundary values, saved values
/// and cotangents kept on the device) against the CPU running the same plan.
#[test]
fn checkpointed_bf16_training_on_the_gpu_matches() {
    use ma2mba::checkpoint::{CheckpointedStep, Device};
    use passes::remat::{Planner, Request};
    let (name, b, l) = ("tiny-mamba2", 2usize, 24usize);
    let g = common::compile_name(name).graph;
    if gpu(&format!("{name} checkpointed bf16"), &g).is_none() {
        return;
    }
    let params: HashMap<String, Vec<f32>> = runtime::init::init_params(&g, 5)
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let mut rng = Rng::new(19);
    let ids: Vec<i32> = (0..b * l).map(|_| (rng.next_u64() % 64) as i32).collect();
    let mut targets = ids[1..].to_vec();
    targets.push(-100);
    let plan_in = |act: DType| {
        let req = Request {
            batch: b as u64,
            seq: l as u64,
            budget: None,
            act_dtype: act,
            count_weights: false,
            quantum: 1,
            logits: false,
            copy_outputs: false,
            lower: LowerOptions::default(),
        };
        let mut planner = Planner::new(&g, req, -100).expect("planner");
        planner.exact_groups = u32::MAX;
        planner.grid_plan(1, 8, 1, 1).expect("plan")
    };
    let (plan, plan_f32) = (plan_in(DType::BF16), plan_in(DType::F32));
    let what = format!("{name} B{b} L{l} bf16: {}", passes::remat::describe(&plan));
    let run = |p: &passes::remat::Plan, d: Device| {
        let mut step = CheckpointedStep::compile_for(&g, p, d).expect("compiles");
        step.poison = true;
        step.run(&params, &ids, &targets, &HashMap::new())
            .expect("runs")
    };
    let out = run(&plan, Device::Cuda);
    let cpu = run(&plan, Device::Cpu);
    let cpu_f32 = run(&plan_f32, Device::Cpu);
    assert_ne!(cpu.loss, cpu_f32.loss, "{what}: bf16 changed nothing");
    assert!(
        (out.loss - cpu.loss).abs() <= 1e-3 * cpu.loss.abs().max(1.0),
        "{what}: loss {} vs CPU {}",
        out.loss,
        cpu.loss
    );
    let mut worst = 0f64;
    for (n, v) in &cpu.grads {
        worst = worst.max(assert_bf16_close(
            &format!("{what}: grad {n}"),
            &out.grads[n],
            v,
            &cpu_f32.grads[n],
        ));
    }
    eprintln!(
        "{what}: loss {:.6} (CPU {:.6}, f32 {:.6}); worst normwise {worst:.2e} vs the CPU",
        out.loss, cpu.loss, cpu_f32.loss
    );
}

/// Checkpointed training on the GPU keeps the parameters and AdamW moments on the device
/// and updates them there: over four steps the losses and gradient norms follow the CPU
/// trainer's under the same plan, and so do the parameters and moments once brought back.
#[test]
fn checkpointed_training_updates_on_the_gpu() {
    use ma2mba::checkpoint::Device;
    use ma2mba::train::{TrainConfig, Trainer};
    let name = "tiny-mamba2";
    let g = common::compile_name(name).graph;
    if gpu(&format!("{name} device optimizer"), &g).is_none() {
        return;
    }
    let params: HashMap<String, Vec<f32>> = runtime::init::init_params(&g, 9)
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let config = TrainConfig {
        lr: 3e-3,
        warmup_steps: 2,
        clip: 0.5,
        ..TrainConfig::default()
    };
    let budget = 4_000_000;
    let make = |d: Device| {
        Trainer::with_budget_on(&g, "logits", params.clone(), config.clone(), budget, d)
            .expect("trainer")
    };
    let (mut gpu_t, mut cpu_t) = (make(Device::Cuda), make(Device::Cpu));
    let (b, l) = (2usize, 32usize);
    let mut rng = Rng::new(5);
    for step in 0..4 {
        let ids: Vec<i32> = (0..b * l).map(|_| (rng.next_u64() % 64) as i32).collect();
        let mut targets = ids[1..].to_vec();
        targets.push(-100);
        let gs = gpu_t.step(&ids, &targets, b, l).expect("gpu step");
        let cs = cpu_t.step(&ids, &targets, b, l).expect("cpu step");
        eprintln!(
            "step {step}: loss cpu {:.6} gpu {:.6}; |grad| cpu {:.6} gpu {:.6} (clip {})",
            cs.loss, gs.loss, cs.grad_norm, gs.grad_norm, config.clip
        );
        assert!(
            (gs.loss - cs.loss).abs() <= 1e-4 * cs.loss.abs(),
            "step {step}: loss"
        );
        assert!(
            (gs.grad_norm - cs.grad_norm).abs() <= 1e-3 * cs.grad_norm,
            "step {step}: gradient norm"
        );
    }
    let before = gpu_t.params.clone();
    gpu_t.sync_host().expect("downloads");
    assert_ne!(
        before, gpu_t.params,
        "the host copy was not stale: nothing on the device"
    );
    let mut worst = 0f64;
    for (n, c) in &cpu_t.params {
        worst = worst.max(assert_normwise(
            &format!("param {n}"),
            &gpu_t.params[n],
            c,
            NORMWISE,
        ));
        let (gm, cm) = (gpu_t.moments(), cpu_t.moments());
        worst = worst.max(assert_normwise(&format!("m {n}"), &gm.0[n], &cm.0[n], 1e-2));
        worst = worst.max(assert_normwise(&format!("v {n}"), &gm.1[n], &cm.1[n], 1e-2));
    }
    eprintln!(
        "{name}: 4 steps with the optimizer on the GPU; worst normwise {worst:.2e} vs the CPU"
    );
}
