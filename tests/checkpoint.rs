//! Layer x time checkpointing: training steps run under random plans of the rematerialization
//! planner give the loss and gradients of the unsplit training graph; recomputing or keeping
//! a cell's values changes no bit; the planner's peak is the executor's measured peak; the
//! planner's choices respect the budget and recompute less as the budget grows.

mod common;

use frontend::{ConfigArg, ConfigValue};
use ir::{DType, Graph};
use ma2mba::checkpoint::CheckpointedStep;
use ma2mba::model::{CpuGraph, IGNORE_INDEX};
use passes::LowerOptions;
use passes::remat::{Planner, Request};
use proptest::prelude::*;
use runtime::cpu::HostData;
use std::collections::HashMap;

fn arg(name: &str, v: i64) -> ConfigArg {
    ConfigArg {
        name: name.into(),
        value: ConfigValue::Int(v),
        span: None,
        origin: None,
    }
}

/// A tiny model with `layers` layers (Mamba-2 with chunk 4, or Mamba-1).
fn tiny(mamba2: bool, layers: i64, tie: bool) -> Graph {
    let mut args = vec![
        arg("d_model", 8),
        arg("n_layer", layers),
        arg("vocab_size", 23),
        arg("d_state", 4),
        ConfigArg {
            name: "tie_embeddings".into(),
            value: ConfigValue::Bool(tie),
            span: None,
            origin: None,
        },
    ];
    let model = if mamba2 {
        args.push(arg("headdim", 4));
        args.push(arg("chunk_size", 4));
        "mamba2_lm"
    } else {
        "mamba_lm"
    };
    let prog = frontend::Program::with_library().expect("library");
    let (g, _) = frontend::elaborate::elaborate(&prog, model, "tiny", &args)
        .unwrap_or_else(|d| panic!("{}", frontend::render(&d, &prog.sources, false)));
    g
}

fn params_of(g: &Graph, seed: u64) -> HashMap<String, Vec<f32>> {
    runtime::init::init_params(g, seed)
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
        .collect()
}

fn tokens(b: usize, l: usize, seed: u64) -> (Vec<i32>, Vec<i32>) {
    let mut rng = runtime::init::Rng::new(seed);
    let ids: Vec<i32> = (0..b * l).map(|_| (rng.next_u64() % 23) as i32).collect();
    let mut targets = vec![IGNORE_INDEX as i32; b * l];
    for bi in 0..b {
        for t in 0..l - 1 {
            targets[bi * l + t] = ids[bi * l + t + 1];
        }
    }
    // A padded position in the middle too.
    targets[l / 2] = IGNORE_INDEX as i32;
    (ids, targets)
}

fn request(b: usize, l: usize, quantum: u64) -> Request {
    Request {
        batch: b as u64,
        seq: l as u64,
        budget: None,
        act_dtype: DType::F32,
        count_weights: false,
        quantum,
        logits: false,
        copy_outputs: true,
        lower: passes::LowerOptions::default(),
    }
}

/// The unsplit training graph's loss and gradients (mean loss).
fn whole(
    g: &Graph,
    states: &HashMap<String, Vec<f32>>,
    params: &HashMap<String, Vec<f32>>,
    ids: &[i32],
    targets: &[i32],
    b: usize,
    l: usize,
) -> (f64, HashMap<String, Vec<f32>>) {
    whole_with(
        g,
        states,
        params,
        ids,
        targets,
        (b, l),
        &LowerOptions::default(),
    )
}

/// [`whole`] lowered with `lo`.
fn whole_with(
    g: &Graph,
    states: &HashMap<String, Vec<f32>>,
    params: &HashMap<String, Vec<f32>>,
    ids: &[i32],
    targets: &[i32],
    (b, l): (usize, usize),
    lo: &LowerOptions,
) -> (f64, HashMap<String, Vec<f32>>) {
    let tg = passes::training_graph(g, "logits", IGNORE_INDEX).expect("training graph");
    let cpu = CpuGraph::compile(&tg.graph, lo).expect("compiles");
    let data = HashMap::from([
        ("input_ids".to_string(), HostData::I32(ids.to_vec())),
        ("targets".to_string(), HostData::I32(targets.to_vec())),
    ]);
    let syms = [("B", b as i64), ("L", l as i64)];
    let (outs, _) = cpu.run(&syms, &data, params, states).expect("runs");
    let mut loss = f64::NAN;
    let mut grads = HashMap::new();
    for (n, v) in outs {
        if n == "loss" {
            loss = v[0] as f64;
        } else if let Some(p) = n.strip_prefix("grad.")
            && params.contains_key(p)
        {
            grads.insert(p.to_string(), v);
        }
    }
    (loss, grads)
}

/// One random case: a model, a plan on its grid, and the checks of the module doc.
#[allow(clippy::too_many_arguments)]
fn check_case(
    mamba2: bool,
    layers: i64,
    tie: bool,
    b: usize,
    l: usize,
    gsize: u32,
    seg: u64,
    keep_all: u64,
    keep_gemm: u64,
) {
    let g = tiny(mamba2, layers, tie);
    let params = params_of(&g, 5);
    let (ids, targets) = tokens(b, l, 11);
    let mut planner = Planner::new(&g, request(b, l, 1), IGNORE_INDEX).expect("planner");
    planner.exact_groups = u32::MAX;
    let plan = planner
        .grid_plan(gsize, seg, keep_all, keep_gemm)
        .expect("plan");
    let step = CheckpointedStep::compile(&g, &plan).expect("compiles");
    let out = step
        .run(&params, &ids, &targets, &HashMap::new())
        .expect("runs");
    let what = format!(
        "{} layers {layers}, tie {tie}, B{b} L{l}: {}",
        if mamba2 { "mamba2" } else { "mamba" },
        passes::remat::describe(&plan)
    );

    // The planner's peak is what the executor held.
    assert_eq!(
        out.peak_bytes, plan.peak,
        "{what}: planned vs measured peak"
    );

    // Keeping everything (no recomputation) on the same grid changes no bit.
    let kept = planner.grid_plan(gsize, seg, u64::MAX, 0).expect("plan");
    let kept_out = CheckpointedStep::compile(&g, &kept)
        .expect("compiles")
        .run(&params, &ids, &targets, &HashMap::new())
        .expect("runs");
    assert_eq!(
        out.loss.to_bits(),
        kept_out.loss.to_bits(),
        "{what}: loss vs no recomputation"
    );
    for (name, v) in &out.grads {
        let w = &kept_out.grads[name];
        assert!(
            v.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: gradient of {name} differs from the run without recomputation"
        );
    }
    // Other layer groupings at the same segment length: bit-identical as well.
    let regrouped = planner.grid_plan(1, seg, 0, 0).expect("plan");
    let re_out = CheckpointedStep::compile(&g, &regrouped)
        .expect("compiles")
        .run(&params, &ids, &targets, &HashMap::new())
        .expect("runs");
    assert_eq!(
        out.loss.to_bits(),
        re_out.loss.to_bits(),
        "{what}: loss vs one-layer groups"
    );
    for (name, v) in &out.grads {
        assert!(
            v.iter()
                .zip(&re_out.grads[name])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: gradient of {name} differs with one-layer groups"
        );
    }

    // The unsplit training graph: equal up to the regrouping of sums over time.
    let (wl, wg) = whole(&g, &HashMap::new(), &params, &ids, &targets, b, l);
    assert!(
        (out.loss - wl).abs() <= 1e-5 * wl.abs().max(1.0),
        "{what}: loss {} vs {wl}",
        out.loss
    );
    assert_eq!(out.grads.len(), wg.len(), "{what}: gradient count");
    for (name, w) in &wg {
        let v = &out.grads[name];
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let err = v.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 2e-4 * scale,
            "{what}: gradient of {name}: max error {err} (scale {scale})"
        );
    }
}

#[test]
fn checkpointed_steps_fixed_cases() {
    // Whole sequence, one group: the no-checkpointing plan.
    check_case(true, 2, true, 2, 12, 2, 12, 0, 0);
    // Per-layer, segments of 4 (the chunk), partial last segment, both keep kinds.
    check_case(true, 3, true, 2, 14, 1, 4, 2, 3);
    check_case(false, 3, false, 1, 11, 2, 3, 1, 1);
    check_case(false, 2, true, 2, 9, 1, 9, 0, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]
    #[test]
    fn checkpointed_steps_random_plans(
        mamba2 in any::<bool>(),
        layers in 1i64..5,
        tie in any::<bool>(),
        b in 1usize..3,
        l in 2usize..17,
        gsize in 1u32..5,
        seg in 1u64..17,
        keep_all in 0u64..6,
        keep_gemm in 0u64..6,
    ) {
        check_case(mamba2, layers, tie, b, l, gsize.min(layers as u32), seg.min(l as u64), keep_all, keep_gemm);
    }
}

#[test]
fn budget_sweep_fits_and_recompute_never_grows() {
    let g = tiny(true, 4, true);
    let mut planner = Planner::new(&g, request(2, 64, 4), IGNORE_INDEX).expect("planner");
    planner.exact_groups = u32::MAX;
    let least = planner.plan().expect("least-memory plan");
    let most = planner
        .grid_plan(4, 64, u64::MAX, 0)
        .expect("no checkpointing");
    assert!(least.peak < most.peak);
    let mut last_recompute = f64::INFINITY;
    let mut last_step = 0.0;
    let steps = 12;
    for i in 0..=steps {
        let budget = least.peak + (most.peak - least.peak) * i / steps;
        planner.request.budget = Some(budget);
        let p = planner.plan().expect("a plan fits");
        assert!(p.peak <= budget, "budget {budget}: plan needs {}", p.peak);
        assert!(
            p.recompute_flops <= last_recompute,
            "budget {budget}: recompute {} grew from {last_recompute}",
            p.recompute_flops
        );
        last_recompute = p.recompute_flops;
        last_step = p.step_flops;
    }
    // Keeping everything recomputes only functions of the parameters (exp(A_log), ...).
    assert!(
        last_recompute < 1e-4 * last_step,
        "the budget of no checkpointing recomputes {last_recompute} of {last_step} FLOPs"
    );
}

#[test]
fn infeasible_budget_names_the_smallest_plan() {
    let g = tiny(false, 2, true);
    let mut planner = Planner::new(&g, request(1, 32, 4), IGNORE_INDEX).expect("planner");
    planner.request.budget = Some(1000);
    let err = planner
        .plan()
        .expect_err("1000 bytes cannot fit")
        .to_string();
    assert!(err.contains("no plan fits in 1.0 kB"), "{err}");
    assert!(err.contains("the smallest needs"), "{err}");
    assert!(err.contains("dominate"), "{err}");
}

#[test]
fn extrapolated_group_prices_match_exact_ones() {
    // Identical layers: a group's price is affine in its size, so groups of 5 priced from
    // groups of 3 and 4 equal the exact prices.
    let g = tiny(true, 6, true);
    let mut exact = Planner::new(&g, request(2, 16, 4), IGNORE_INDEX).expect("planner");
    exact.exact_groups = u32::MAX;
    let mut extra = Planner::new(&g, request(2, 16, 4), IGNORE_INDEX).expect("planner");
    extra.exact_groups = 4;
    for (ka, kg) in [(0, 0), (3, 0), (0, 4)] {
        let a = exact.grid_plan(5, 8, ka, kg).expect("plan");
        let b = extra.grid_plan(5, 8, ka, kg).expect("plan");
        let rel = (a.peak as f64 - b.peak as f64).abs() / a.peak as f64;
        assert!(
            rel < 0.02,
            "keeps ({ka}, {kg}): exact {} vs extrapolated {}",
            a.peak,
            b.peak
        );
        let rf = (a.recompute_flops - b.recompute_flops).abs() / a.recompute_flops.max(1.0);
        assert!(
            rf < 1e-9,
            "recompute {} vs {}",
            a.recompute_flops,
            b.recompute_flops
        );
    }
}

#[test]
fn plan_cli_prints_the_grid_and_json() {
    let out = common::cli(&[
        "plan",
        "tiny-mamba2",
        "--seq",
        "64",
        "--batch",
        "2",
        "--budget",
        "2MB",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for s in [
        "plan:",
        "no checkpointing",
        "per-layer",
        "sqrt(L) groups",
        "Ma2mba (memory only)",
        "cells (",
    ] {
        assert!(out.stdout.contains(s), "missing {s}:\n{}", out.stdout);
    }
    let out = common::cli(&["plan", "tiny-mamba2", "--seq", "2^6", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert!(v["plan"]["peak_bytes"].as_u64().is_some_and(|p| p > 0));
    assert_eq!(v["strategies"].as_array().map(|a| a.len()), Some(4));
    let bad = common::cli(&[
        "plan",
        "tiny-mamba2",
        "--seq",
        "64",
        "--budget",
        "12 parsecs",
    ]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("--budget"), "{}", bad.stderr);
    // Pricing does not allocate per segment: a trillion tokens plan instantly.
    let huge = common::cli(&["plan", "tiny-mamba2", "--seq", "2^40"]);
    assert_eq!(huge.code, 0, "{}", huge.stderr);
    let tiny_budget = common::cli(&["plan", "tiny-mamba2", "--seq", "64", "--budget", "10kB"]);
    assert_eq!(tiny_budget.code, 1);
    assert!(
        tiny_budget.stderr.contains("no plan fits"),
        "{}",
        tiny_budget.stderr
    );
}

/// `plan --device cuda` prices the stages as the GPU lowers them (bf16 buffers, the tiled
/// SSD kernels): the plan `train --device cuda --budget` makes, which is not the CPU's.
#[test]
fn plan_cli_prices_the_training_device() {
    use ma2mba::checkpoint::Device;
    let json = |device: &str| {
        let args = ["plan", "mamba2-2.7b", "--seq", "2^16", "--budget", "90GB"];
        let out = common::cli(&[&args[..], &["--device", device, "--json"]].concat());
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        v["plan"]["peak_bytes"].as_u64().expect("a peak")
    };
    let (cpu, cuda) = (json("cpu"), json("cuda"));
    let g = common::compile_name("mamba2-2.7b").graph;
    let on = |device| {
        let act = (DType::BF16, device);
        ma2mba::train::plan_for(&g, 90_000_000_000, (1, 65536), false, act)
            .expect("plan")
            .peak
    };
    assert_eq!(cuda, on(Device::Cuda));
    assert_eq!(cpu, on(Device::Cpu));
    assert_ne!(cpu, cuda, "the GPU's tiled SSD prices differently");
}

#[test]
fn carried_initial_states_flow_through_the_schedule() {
    // Truncated BPTT: a step starting from non-zero states (the previous batch's final ones)
    // gives the unsplit graph's loss, gradients and final states.
    let g = tiny(true, 2, true);
    let params = params_of(&g, 8);
    let (b, l) = (2usize, 13usize);
    let (ids, targets) = tokens(b, l, 4);
    // States from a forward pass over other tokens.
    let fwd = CpuGraph::compile(&g, &LowerOptions::default()).expect("compiles");
    let (warm, _) = tokens(b, 7, 99);
    let data = HashMap::from([("input_ids".to_string(), HostData::I32(warm))]);
    let (outs, _) = fwd
        .run(
            &[("B", b as i64), ("L", 7)],
            &data,
            &params,
            &HashMap::new(),
        )
        .expect("runs");
    let states: HashMap<String, Vec<f32>> =
        outs.into_iter().filter(|(n, _)| n != "logits").collect();
    assert_eq!(states.len(), 4);
    let mut planner = Planner::new(&g, request(b, l, 4), IGNORE_INDEX).expect("planner");
    planner.exact_groups = u32::MAX;
    let plan = planner.grid_plan(1, 4, 1, 1).expect("plan");
    let out = CheckpointedStep::compile(&g, &plan)
        .expect("compiles")
        .run(&params, &ids, &targets, &states)
        .expect("runs");
    let (wl, wg) = whole(&g, &states, &params, &ids, &targets, b, l);
    assert!(
        (out.loss - wl).abs() <= 1e-5 * wl.abs(),
        "loss {} vs {wl}",
        out.loss
    );
    for (name, w) in &wg {
        let v = &out.grads[name];
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let err = v.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 2e-4 * scale, "{name}: {err} (scale {scale})");
    }
    // Final states: those of a forward pass over the same tokens from the same states, up to
    // f32 rounding (the whole pass scans its 4 chunks in parallel and sums their states in
    // another grouping than the segments' sequential scans).
    let data = HashMap::from([("input_ids".to_string(), HostData::I32(ids.clone()))]);
    let (outs, _) = fwd
        .run(&[("B", b as i64), ("L", l as i64)], &data, &params, &states)
        .expect("runs");
    for (n, w) in outs {
        if n != "logits" {
            let v = &out.final_states[&n];
            assert_eq!(v.len(), w.len(), "final state {n}");
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
            let err = v
                .iter()
                .zip(&w)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale,
                "final state {n}: {err} (scale {scale})"
            );
        }
    }
}

/// bf16 activations under a checkpoint plan (boundary values, saved values and cotangents
/// between stages rounded to bf16). Not bit-identical to keeping everything: a saved value is
/// rounded where the forward stage stores it, while a recomputing cell may compute it inside
/// a fused kernel, unrounded. So a plan's gradients differ from keeping everything by about
/// bf16's own error (each against f32), which reaches 0.2 normwise for the cancelling sum of
/// a tiny model's first `A_log` gradient.
#[test]
fn checkpointed_bf16_steps_match_keeping_everything() {
    for (mamba2, b, l, gsize, seg) in [
        (true, 2usize, 14usize, 1u32, 4u64),
        (true, 2, 14, 3, 14),
        (false, 1, 11, 2, 3),
    ] {
        let g = tiny(mamba2, 3, true);
        let params = params_of(&g, 5);
        let (ids, targets) = tokens(b, l, 11);
        let mut req = request(b, l, 1);
        req.act_dtype = DType::BF16;
        let mut planner = Planner::new(&g, req, IGNORE_INDEX).expect("planner");
        planner.exact_groups = u32::MAX;
        // Recomputing cells of both kinds (one keeps the products' results).
        let plan = planner.grid_plan(gsize, seg, 0, 1).expect("plan");
        let kept = planner.grid_plan(gsize, seg, u64::MAX, 0).expect("plan");
        let what = format!(
            "mamba2 {mamba2} B{b} L{l} bf16: {}",
            passes::remat::describe(&plan)
        );
        let run = |p: &passes::remat::Plan| {
            CheckpointedStep::compile(&g, p)
                .expect("compiles")
                .run(&params, &ids, &targets, &HashMap::new())
                .expect("runs")
        };
        let (out, kept_out) = (run(&plan), run(&kept));
        // The planner priced bf16 activations at 2 bytes; the executor held them so.
        assert_eq!(
            out.peak_bytes, plan.peak,
            "{what}: planned vs measured peak"
        );
        assert_eq!(
            kept_out.peak_bytes, kept.peak,
            "{what}: planned vs measured peak"
        );
        let (f32_loss, f32_grads) = whole(&g, &HashMap::new(), &params, &ids, &targets, b, l);
        assert_ne!(out.loss, f32_loss, "{what}: bf16 changed nothing");
        assert!(
            (out.loss - kept_out.loss).abs() <= 1e-3 * kept_out.loss.abs(),
            "{what}: loss {} vs keeping everything {}",
            out.loss,
            kept_out.loss
        );
        let rel = |a: &[f32], b: &[f32]| {
            let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (d / n.max(1e-30)).sqrt()
        };
        let mut worst = (0f64, String::new());
        for (name, f) in &f32_grads {
            let (p, k) = (&out.grads[name], &kept_out.grads[name]);
            let noise = rel(k, f).max(1e-2);
            let (between, off) = (rel(p, k), rel(p, f));
            assert!(
                between <= 3.0 * noise && off <= 3.0 * noise,
                "{what}: gradient of {name}: {between:.3e} from keeping everything, {off:.3e} \
                 from f32, where keeping everything is {noise:.3e} from f32"
            );
            if between > worst.0 {
                worst = (between, name.clone());
            }
        }
        eprintln!(
            "{what}: loss {} (keeping everything {}, f32 {f32_loss}); worst normwise {:.2e} ({})",
            out.loss, kept_out.loss, worst.0, worst.1
        );
    }
}
