//! Training graphs (forward, loss, backward) of the tiny models run through the lowering and
//! Cranelift against the f64 reference interpreter: the loss and every gradient.

mod common;

use ir::{InputKind, Op};
use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use passes::autodiff::training_graph;
use runtime::array::Array;
use runtime::cpu::HostData;
use runtime::init::Rng;
use runtime::interp::{self, Bindings};
use std::collections::HashMap;

/// Normwise relative error allowed per tensor: f32 through a whole backward pass.
const NORMWISE: f64 = 2e-3;

fn rounded(a: &Array) -> (Vec<f32>, Array) {
    let v: Vec<f32> = a.data.iter().map(|&x| x as f32).collect();
    let back = Array::new(a.shape.clone(), v.iter().map(|&x| x as f64).collect());
    (v, back)
}

fn check_training(name: &str, bn: usize, l: usize, seed: u64) {
    check_training_with(name, bn, l, seed, &LowerOptions::default(), NORMWISE);
}

/// [`check_training`] lowered with `opts`, gradients within `normwise`; returns the outputs.
fn check_training_with(
    name: &str,
    bn: usize,
    l: usize,
    seed: u64,
    opts: &LowerOptions,
    normwise: f64,
) -> Vec<(String, Vec<f32>)> {
    let graph = common::compile_name(name).graph;
    let grads = training_graph(&graph, "logits", -100).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = &grads.graph;
    let mut rng = Rng::new(seed);
    let mut b = Bindings::default();
    let mut params = HashMap::new();
    for (pname, arr) in runtime::init::init_params(&graph, seed) {
        let (v, back) = rounded(&arr);
        params.insert(pname.clone(), v);
        b.params.insert(pname, back);
    }
    let vocab = 61u64;
    let ids: Vec<i32> = (0..bn * l)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    let mut targets: Vec<i32> = (0..bn * l)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    targets[l - 1] = -100;
    targets[bn * l - 1] = -100;
    let mut data = HashMap::new();
    for (n, v) in [("input_ids", &ids), ("targets", &targets)] {
        b.inputs.insert(
            n.into(),
            Array::new(vec![bn, l], v.iter().map(|&x| x as f64).collect()),
        );
        data.insert(n.to_string(), HostData::I32(v.clone()));
    }
    let syms = [("B", bn as i64), ("L", l as i64)];
    let bind = |s: &str| syms.iter().find(|(n, _)| *n == s).map(|(_, v)| *v as u64);
    let mut states = HashMap::new();
    for n in g.nodes() {
        if let Op::Input {
            name: sname,
            kind: InputKind::State,
            ty,
        } = g.op(n)
        {
            let shape: Vec<usize> = ty
                .shape
                .iter()
                .map(|d| d.eval(&bind).expect("bound") as usize)
                .collect();
            let count = shape.iter().product();
            let v: Vec<f32> = (0..count).map(|_| (rng.uniform() - 0.5) as f32).collect();
            b.states.insert(
                sname.clone(),
                Array::new(shape, v.iter().map(|&x| x as f64).collect()),
            );
            states.insert(sname.clone(), v);
        }
    }
    let want = interp::run(g, &b).unwrap_or_else(|e| panic!("{name}: interpreter: {e}"));
    let started = std::time::Instant::now();
    let cpu = CpuGraph::compile(g, opts).unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    let compiled = started.elapsed();
    let started = std::time::Instant::now();
    let (got, _) = cpu
        .run(&syms, &data, &params, &states)
        .unwrap_or_else(|e| panic!("{name}: run: {e}"));
    eprintln!(
        "{name} training graph (B={bn}, L={l}): {} kernels, {} steps; compile {compiled:?}, run {:?}",
        cpu.lowered.kernels.len(),
        cpu.lowered.steps.len(),
        started.elapsed()
    );
    // Fusion changes no arithmetic order, in the backward kernels too (in f32: unfused, more
    // values are stored, so more are rounded to bf16).
    if !opts.bf16_activations {
        let unfused = CpuGraph::compile(
            g,
            &LowerOptions {
                no_fusion: true,
                ..opts.clone()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: compile unfused: {e}"));
        let (got_unfused, _) = unfused
            .run(&syms, &data, &params, &states)
            .unwrap_or_else(|e| panic!("{name}: run unfused: {e}"));
        for ((n, a), (_, b)) in got.iter().zip(&got_unfused) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}: {n} differs with fusion off");
        }
    }
    for k in &cpu.lowered.kernels {
        k.check().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let plan = passes::plan_memory(&cpu.lowered, &|s: &str| bind(s)).expect("plans");
    passes::check_memory(&plan).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(got.len(), want.values.len());
    let mut grads_seen = 0;
    let mut worst = (String::new(), 0.0f64);
    for ((gn, gv), (wn, wv)) in got.iter().zip(&want.values) {
        assert_eq!(gn, wn);
        assert_eq!(gv.len(), wv.data.len(), "{name}: {gn}");
        grads_seen += usize::from(gn.starts_with("grad."));
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&x, &e) in gv.iter().zip(&wv.data) {
            assert!(x.is_finite(), "{name}: {gn} has {x}");
            diff += (x as f64 - e).powi(2);
            norm += e * e;
        }
        let (diff, norm) = (diff.sqrt(), norm.sqrt());
        if norm > 0.0 && diff / norm > worst.1 {
            worst = (gn.clone(), diff / norm);
        }
        assert!(
            diff <= normwise * norm || diff <= 1e-6,
            "{name}: {gn}: |got - want| = {diff:e}, |want| = {norm:e}"
        );
    }
    eprintln!(
        "{name}: worst normwise relative error {:e} ({})",
        worst.1, worst.0
    );
    assert_eq!(
        grads_seen,
        grads.param_grads.len() + grads.state_grads.len()
    );
    got
}

#[test]
fn tiny_mamba_training_graph_runs_on_cpu() {
    check_training("tiny-mamba", 2, 7, 5);
    check_training("tiny-mamba", 3, 31, 7);
}

#[test]
fn tiny_mamba2_training_graph_runs_on_cpu() {
    check_training("tiny-mamba2", 2, 7, 6);
    check_training("tiny-mamba2", 3, 31, 8);
}

/// bf16 activations (RELIABILITY.md's bf16 row: gradients normwise within 1e-1 of the f64
/// reference); they round, so they differ from f32, by more than f32's own error.
#[test]
fn tiny_models_train_with_bf16_activations() {
    let bf16 = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    };
    for (name, seed) in [("tiny-mamba", 9), ("tiny-mamba2", 10)] {
        let half = check_training_with(name, 2, 37, seed, &bf16, 1e-1);
        let full = check_training_with(name, 2, 37, seed, &LowerOptions::default(), NORMWISE);
        let loss = |outs: &[(String, Vec<f32>)]| {
            outs.iter()
                .find(|(n, _)| n == "loss")
                .expect("a loss output")
                .1[0]
        };
        let (loss_h, loss_f) = (loss(&half), loss(&full));
        eprintln!("{name}: loss bf16 {loss_h} f32 {loss_f}");
        assert_ne!(loss_h, loss_f, "{name}: bf16 activations changed nothing");
    }
}

/// The GPU's AdamW kernel (evaluated in f32, as the backends compute) against the host's
/// update in f64, for decayed and undecayed parameters at the first and a later step.
#[test]
fn adamw_kernel_matches_the_host_update() {
    use ma2mba::train::{AdamW, TrainConfig};
    let c = TrainConfig {
        lr: 3e-3,
        warmup_steps: 2,
        ..TrainConfig::default()
    };
    let k = ir::kernel::Kernel::adamw("adamw");
    k.check().expect("kernel invariants");
    let mut rng = Rng::new(3);
    let n = 1000;
    for (step, name, scale) in [
        (0, "x.weight", 0.5),
        (7, "x.A_log", 0.01),
        (40, "y.weight", 2.0),
    ] {
        let h = AdamW::of(&c, step, name, scale);
        let r = |rng: &mut Rng, s: f64| -> Vec<f32> {
            (0..n).map(|_| (rng.normal() * s) as f32).collect()
        };
        let (p, g, m) = (r(&mut rng, 1.0), r(&mut rng, 1.0), r(&mut rng, 0.1));
        let v: Vec<f32> = r(&mut rng, 0.1).iter().map(|x| x * x).collect();
        let (mut hp, mut hm, mut hv) = (p.clone(), m.clone(), v.clone());
        h.apply(&mut hp, &g, &mut hm, &mut hv);
        // Row 1 of a two-row table: the kernel indexes rows by its size argument.
        let table: Vec<f64> = [[0f32; ir::kernel::ADAMW_HYPER], h.row()]
            .iter()
            .flatten()
            .map(|&x| x as f64)
            .collect();
        let wide = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
        let mut bufs = vec![wide(&p), wide(&g), wide(&m), wide(&v), table];
        ir::kernel::eval::run(&k, &[n as i64, 1], &mut bufs, true).expect("evaluates");
        for (what, host, dev) in [
            ("param", &hp, &bufs[0]),
            ("m", &hm, &bufs[2]),
            ("v", &hv, &bufs[3]),
        ] {
            for (i, (a, b)) in host.iter().zip(dev).enumerate() {
                let (a, b) = (*a as f64, *b);
                // f32 rounding of terms of order 1 (the moments' sums cancel).
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs() + 1e-7,
                    "step {step} {name} {what}[{i}]: host {a} kernel {b}"
                );
            }
        }
        assert_ne!(hp, p, "{name}: the update changed nothing");
    }
}
