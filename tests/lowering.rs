//! The lowered schedule (fused kernels, GEMMs, memory plan) computes what the graph means:
//! executed through the kernel IR evaluator, it matches the f64 reference interpreter; with
//! fusion off it gives bit-identical results; its memory plan never overlaps live buffers.

mod common;

use passes::{LowerOptions, lower};
use runtime::array::Array;
use runtime::cpu::{EvalLauncher, HostData, Inputs, execute};
use runtime::interp::{self, Bindings};
use std::collections::HashMap;

struct Case {
    graph: ir::Graph,
    params64: HashMap<String, Array>,
    ids: Vec<i32>,
    b: usize,
    l: usize,
}

fn case(name: &str, b: usize, l: usize, seed: u64) -> Case {
    let graph = common::compile_name(name).graph;
    let params64 = runtime::init::init_params(&graph, seed);
    let mut rng = runtime::init::Rng::new(seed + 1);
    let vocab = 61;
    let ids = (0..b * l)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    Case {
        graph,
        params64,
        ids,
        b,
        l,
    }
}

fn reference(c: &Case) -> Vec<(String, Array)> {
    let mut bind = Bindings::default();
    bind.inputs.insert(
        "input_ids".into(),
        Array::new(vec![c.b, c.l], c.ids.iter().map(|&x| x as f64).collect()),
    );
    // The reference sees exactly the f32 weights the lowered program reads.
    for (k, v) in &c.params64 {
        bind.params.insert(
            k.clone(),
            Array::new(
                v.shape.clone(),
                v.data.iter().map(|&x| x as f32 as f64).collect(),
            ),
        );
    }
    interp::run(&c.graph, &bind).expect("interpreter").values
}

fn lowered_run(c: &Case, opts: &LowerOptions) -> Vec<(String, Vec<f32>)> {
    let l = lower(&c.graph, opts).expect("lowers");
    for k in &l.kernels {
        k.check().expect("kernel invariants");
    }
    let sizes: Vec<i64> = l
        .syms
        .iter()
        .map(|s| if s == "B" { c.b as i64 } else { c.l as i64 })
        .collect();
    let bind = |s: &str| l.syms.iter().position(|x| x == s).map(|i| sizes[i] as u64);
    let plan = passes::plan_memory(&l, &bind).expect("plan");
    passes::check_memory(&plan).expect("memory plan is sound");
    let params: HashMap<String, Vec<f32>> = c
        .params64
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let mut data = HashMap::new();
    data.insert("input_ids".to_string(), HostData::I32(c.ids.clone()));
    let launcher = EvalLauncher {
        lowered: &l,
        bytes: plan.bytes.clone(),
    };
    let states = HashMap::new();
    let inp = Inputs {
        sizes: &sizes,
        data: &data,
        params: &params,
        states: &states,
    };
    let (outs, profile) = execute(&l, &plan, &launcher, &inp).expect("executes");
    // The executor allocated exactly the planned arena.
    assert_eq!(profile.arena_bytes, plan.peak);
    outs
}

fn assert_close(name: &str, got: &[f32], want: &Array, atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.data.len(), "{name}: length");
    let mut worst = (0usize, 0.0f64);
    let mut sum = 0.0;
    for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
        let d = (g as f64 - w).abs();
        sum += d;
        assert!(!g.is_nan(), "{name}[{i}] is NaN");
        if d - (atol + rtol * w.abs()) > worst.1 {
            worst = (i, d - (atol + rtol * w.abs()));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{name}: worst index {} got {} want {} (mean |diff| {})",
        worst.0,
        got[worst.0],
        want.data[worst.0],
        sum / got.len() as f64
    );
}

#[test]
fn lowered_tiny_models_match_the_interpreter() {
    for (name, b, l) in [
        ("tiny-mamba", 2, 13),
        ("tiny-mamba2", 2, 13),
        ("tiny-mamba2", 1, 1),
    ] {
        let c = case(name, b, l, 5);
        let want = reference(&c);
        let got = lowered_run(&c, &LowerOptions::default());
        assert_eq!(got.len(), want.len());
        for ((gn, gv), (wn, wv)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            // f32 vs f64 through a whole model: the reductions/scan row of RELIABILITY.md.
            assert_close(&format!("{name} {gn}"), gv, wv, 6e-4, 2e-3);
        }
    }
}

#[test]
fn fusion_on_and_off_are_bit_identical() {
    let c = case("tiny-mamba2", 2, 9, 11);
    let fused = lowered_run(&c, &LowerOptions::default());
    let unfused = lowered_run(
        &c,
        &LowerOptions {
            no_fusion: true,
            ..LowerOptions::default()
        },
    );
    assert_eq!(fused, unfused);
    let g = &c.graph;
    let (a, b) = (
        lower(g, &LowerOptions::default()).unwrap(),
        lower(
            g,
            &LowerOptions {
                no_fusion: true,
                ..LowerOptions::default()
            },
        )
        .unwrap(),
    );
    assert!(
        a.kernels.len() * 2 < b.kernels.len(),
        "fusion merges kernels: {} vs {}",
        a.kernels.len(),
        b.kernels.len()
    );
}

#[test]
fn memory_plans_of_published_models_are_sound() {
    for name in ["mamba-130m", "mamba2-130m"] {
        let g = common::compile_name(name).graph;
        let l = lower(&g, &LowerOptions::default()).unwrap();
        for (b, seq) in [(1u64, 512u64), (8, 2048)] {
            let bind = |s: &str| Some(if s == "B" { b } else { seq });
            let plan = passes::plan_memory(&l, &bind).unwrap();
            passes::check_memory(&plan).unwrap();
            // Reusing memory: the arena is far smaller than all intermediates together.
            let total: u64 = l
                .buffers
                .iter()
                .enumerate()
                .filter(|(_, x)| x.kind == passes::BufKind::Temp)
                .map(|(i, _)| plan.bytes[i])
                .sum();
            assert!(
                plan.peak * 4 < total,
                "{name}: peak {} of {}",
                plan.peak,
                total
            );
        }
    }
}

#[test]
fn loss_ops_lower_to_checked_kernels() {
    use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, Value};
    let mut g = Graph::new("loss");
    let input = |g: &mut Graph, name: &str, dtype: DType, shape: Vec<Dim>| {
        let op = Op::Input {
            name: name.into(),
            kind: InputKind::Data,
            ty: TensorType::new(dtype, shape),
        };
        Value::from(g.add(op, &[], Span::default(), None).unwrap())
    };
    let (b, l) = (Dim::sym("B"), Dim::sym("L"));
    let logits = input(
        &mut g,
        "logits",
        DType::F32,
        vec![b.clone(), l.clone(), Dim::known(7)],
    );
    let ids = input(&mut g, "targets", DType::I32, vec![b, l]);
    let ce = g
        .add(
            Op::CrossEntropy { ignore_index: -100 },
            &[logits, ids],
            Span::default(),
            None,
        )
        .unwrap();
    g.add_output("loss", ce.into());
    let l = lower(&g, &LowerOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        l.kernels
            .iter()
            .any(|k| k.name.starts_with("cross_entropy")),
        "no cross_entropy kernel"
    );
    for k in &l.kernels {
        k.check().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Sequential forward scans (`LowerOptions::sequential_scans`, as `LowerOptions::cpu` runs
/// Mamba-1; for Mamba-2 with `ssd_scans`) are one kernel each with no scratch, and the results
/// match the interpreter like the chunk-parallel scans' and (Mamba-2) the matrix form's, over
/// lengths spanning several chunks.
#[test]
fn sequential_scans_match_the_interpreter_without_scratch() {
    let sequential = LowerOptions {
        sequential_scans: true,
        ..LowerOptions::ssd_scans()
    };
    for (name, b, l) in [("tiny-mamba", 2, 150), ("tiny-mamba2", 2, 150)] {
        let c = case(name, b, l, 7);
        let want = reference(&c);
        let got = lowered_run(&c, &sequential);
        let par = lowered_run(&c, &LowerOptions::ssd_scans());
        let cpu = lowered_run(&c, &LowerOptions::cpu());
        for ((((gn, gv), (_, wv)), (_, pv)), (_, cv)) in got.iter().zip(&want).zip(&par).zip(&cpu) {
            assert_close(&format!("{name} {gn} sequential"), gv, wv, 6e-4, 2e-3);
            assert_close(&format!("{name} {gn} chunk-parallel"), pv, wv, 6e-4, 2e-3);
            assert_close(&format!("{name} {gn} cpu form"), cv, wv, 6e-4, 2e-3);
        }
        let seq = lower(&c.graph, &sequential).unwrap();
        let chunked = lower(&c.graph, &LowerOptions::ssd_scans()).unwrap();
        let scratch = |l: &passes::Lowered| {
            l.buffers
                .iter()
                .filter(|b| b.kind == passes::BufKind::Scratch)
                .count()
        };
        assert_eq!(scratch(&seq), 0, "{name}: sequential scans need no scratch");
        assert!(
            scratch(&chunked) > 0,
            "{name}: chunk-parallel scans use scratch"
        );
        assert!(seq.kernels.len() < chunked.kernels.len());
    }
}

/// What bf16 activations keep in f32, on every schedule a training run lowers (the whole
/// training graph and each checkpointed stage variant): parameters, states, the loss and
/// parameter gradients; every product reads operands of one dtype (bf16, or f32 when
/// `exact`); every kernel's buffers have their buffers' dtypes; scratch gets its bf16 copies
/// from the kernels that write it; the memory plan is sound.
#[test]
fn bf16_schedules_keep_states_parameters_and_gradients_f32() {
    use ir::DType;
    use passes::remat::{Keep, variant};
    use passes::{BufKind, Step};
    let bf16 = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    };
    for name in ["tiny-mamba", "tiny-mamba2"] {
        let g = common::compile_name(name).graph;
        let mut graphs = vec![(
            "whole".to_string(),
            passes::training_graph(&g, "logits", -100)
                .expect("training graph")
                .graph,
        )];
        let stages = passes::stage::split(&g, &[0..1, 1..2]).expect("stages");
        for (i, st) in stages.iter().enumerate() {
            for keep in [Keep::Nothing, Keep::Gemm, Keep::All] {
                let v = variant(st, keep, -100, i + 1 == stages.len(), &bf16).expect("variant");
                graphs.push((format!("stage {i} {}", keep.name()), v.fwd_graph));
                graphs.push((format!("stage {i} {} training", keep.name()), v.train_graph));
            }
        }
        for (what, tg) in &graphs {
            let what = format!("{name} {what}");
            let l = lower(tg, &bf16).expect("lowers");
            let f32_names = passes::lower::bf16::f32_names(tg);
            let mut narrow = 0;
            for b in &l.buffers {
                narrow += usize::from(b.dtype == DType::BF16);
                if matches!(b.kind, BufKind::Param(_) | BufKind::State(_)) {
                    assert_eq!(b.dtype, DType::F32, "{what}: {:?}", b.kind);
                }
            }
            assert!(narrow > 0, "{what}: nothing stored as bf16");
            for (out, b) in &l.outputs {
                let keep = out == "loss"
                    || f32_names.contains(out)
                    || out.strip_prefix("grad.").is_some_and(|p| {
                        g.params()
                            .any(|n| matches!(g.op(n), ir::Op::Param { name, .. } if name == p))
                    });
                if keep {
                    assert_eq!(l.buffers[*b].dtype, DType::F32, "{what}: output {out}");
                }
            }
            for step in &l.steps {
                match step {
                    Step::MatMul {
                        lhs,
                        rhs,
                        out,
                        exact,
                        ..
                    } => {
                        let want = if *exact { DType::F32 } else { DType::BF16 };
                        assert_eq!(l.buffers[*lhs].dtype, want, "{what}: product operand");
                        assert_eq!(l.buffers[*rhs].dtype, want, "{what}: product operand");
                        if *exact {
                            assert_eq!(l.buffers[*out].dtype, DType::F32, "{what}: exact result");
                        }
                    }
                    Step::Kernel { kernel, bufs, .. } => {
                        let k = &l.kernels[*kernel];
                        k.check().expect("kernel invariants");
                        for (kb, b) in k.bufs.iter().zip(bufs) {
                            assert_eq!(kb.dtype, l.buffers[*b].dtype, "{what}: {}", k.name);
                        }
                    }
                }
            }
            // Scratch (the SSD's chunk states and copies) gets its bf16 copies from the kernel
            // that writes it, not from a conversion kernel.
            let converted_scratch = l
                .steps
                .iter()
                .filter(|s| match s {
                    Step::Kernel { kernel, bufs, .. } => {
                        l.kernels[*kernel].name.starts_with("to_")
                            && matches!(l.buffers[bufs[0]].kind, BufKind::Scratch)
                    }
                    Step::MatMul { .. } => false,
                })
                .count();
            assert_eq!(
                converted_scratch, 0,
                "{what}: scratch converted by its own kernel"
            );
            let bind = |s: &str| match s {
                "B" => Some(2),
                "L" => Some(37),
                _ => None,
            };
            let plan = passes::plan_memory(&l, &bind).expect("plan");
            passes::check_memory(&plan).expect("memory plan is sound");
        }
    }
}

/// The weight gradients `xᵀ dy` (and the head's `dlogitsᵀ h`) read their activations
/// transposed in the product (`lhs_t`) instead of copying a transpose: a training graph
/// lowers without permute kernels, and its gradients are checked against the interpreter
/// in `tests/training.rs`.
#[test]
fn transposed_product_operands_are_not_copied() {
    use passes::Step;
    for name in ["tiny-mamba", "tiny-mamba2"] {
        let g = common::compile_name(name).graph;
        let tg = passes::training_graph(&g, "logits", -100)
            .expect("training graph")
            .graph;
        let l = lower(&tg, &LowerOptions::default()).expect("lowers");
        let permutes = l.kernels.iter().filter(|k| k.name.starts_with("permute"));
        assert_eq!(permutes.count(), 0, "{name}: a transpose copied");
        let transposed = l
            .steps
            .iter()
            .filter(|s| matches!(s, Step::MatMul { lhs_t: true, .. }))
            .count();
        assert!(
            transposed > 0,
            "{name}: no product reads its lhs transposed"
        );
    }
}

/// With bf16 activations the SSD's product results that kernels read only at bf16 precision
/// (`C S_inᵀ`; with the tiled gradient also `M'ᵀ dY`; `B dS_outᵀ`) are bf16 while exact
/// results stay f32, every carry reads the own states (or state cotangents) as a product
/// wrote them, in f32, and writes the carried ones, which products and a sum read, as bf16,
/// and with tiles the gradient's chunk copies of `x` and `dy` are bf16 only.
#[test]
fn ssd_results_read_at_bf16_precision_are_bf16() {
    use ir::DType;
    use passes::{BufKind, Step};
    let bf16 = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    };
    let g = common::tiny_mamba2_chunk16().graph;
    let tg = passes::training_graph(&g, "logits", -100)
        .expect("training graph")
        .graph;
    // Results of the forward (C S_inᵀ), of the gradient (C S_inᵀ, B dS_outᵀ, and M'ᵀ dY
    // when tiled, an exact product otherwise), for each of the two layers; with tiles the
    // last layer's gradient reads its forward's `C S_inᵀ` (see the carries below).
    for (opts, want, tiled) in [
        (bf16.clone(), 2 * 3, false),
        (bf16.on_gpu(), 2 * 4 - 1, true),
    ] {
        let l = lower(&tg, &opts).expect("lowers");
        let mut kernel_written = vec![false; l.buffers.len()];
        let mut product_written = vec![false; l.buffers.len()];
        for step in &l.steps {
            match step {
                Step::Kernel { kernel, bufs, .. } => {
                    for (kb, &b) in l.kernels[*kernel].bufs.iter().zip(bufs) {
                        kernel_written[b] |= kb.writable;
                    }
                }
                Step::MatMul { out, .. } => product_written[*out] = true,
            }
        }
        let mut narrow_results = 0;
        for step in &l.steps {
            let Step::MatMul { out, exact, .. } = step else {
                continue;
            };
            let b = &l.buffers[*out];
            if b.kind != BufKind::Scratch {
                continue;
            }
            if kernel_written[*out] || *exact {
                assert_eq!(b.dtype, DType::F32, "a carried or exact result narrowed");
            } else if b.dtype == DType::BF16 {
                narrow_results += 1;
            }
        }
        assert_eq!(narrow_results, want, "bf16 product results");
        // The kernel steps whose kernel name `pick` accepts, with their buffers, and the
        // dtypes of the buffers of one such step that `keep` accepts.
        let named = |pick: &dyn Fn(&str) -> bool| -> Vec<(&ir::kernel::Kernel, &Vec<usize>)> {
            l.steps
                .iter()
                .filter_map(|step| match step {
                    Step::Kernel { kernel, bufs, .. } => Some((&l.kernels[*kernel], bufs)),
                    Step::MatMul { .. } => None,
                })
                .filter(|(k, _)| pick(&k.name))
                .collect()
        };
        let dtypes = |k: &ir::kernel::Kernel,
                      bufs: &[usize],
                      keep: &dyn Fn(&ir::kernel::KBuf, usize) -> bool|
         -> Vec<DType> {
            k.bufs
                .iter()
                .zip(bufs)
                .filter(|(kb, b)| keep(kb, **b))
                .map(|(kb, _)| kb.dtype)
                .collect()
        };
        let carries = named(&|n| {
            n.starts_with("ssd_scan_") && (n.ends_with("_carry") || n.ends_with("_carry_back"))
        });
        for &(k, bufs) in &carries {
            // Read: the own parts, which a product wrote (the decays `exp(a)` are a kernel's).
            let own = dtypes(k, bufs, &|kb, b| !kb.writable && product_written[b]);
            assert_eq!(own, vec![DType::F32], "{}: own states", k.name);
            let written = dtypes(k, bufs, &|kb, b| {
                kb.writable && l.buffers[b].kind == BufKind::Scratch
            });
            assert_eq!(written, vec![DType::BF16], "{}: carried states", k.name);
        }
        // Per layer the forward's carry and the gradient's two, but for the last layer, whose
        // gradient follows its forward with no SSD between: with tiles both prep the same
        // way, and the gradient reads the forward's entering states instead of carrying
        // them again (without tiles the gradient's prep differs with bf16 activations: it
        // copies `x` in f32 where the forward's copy is bf16).
        let reuses = usize::from(tiled);
        assert_eq!(carries.len(), 2 * 3 - reuses, "carries");
        let grad_preps = named(&|n| n.starts_with("ssd_scan_grad_") && n.ends_with("_carry"));
        assert_eq!(grad_preps.len(), 2 - reuses, "gradients that prep again");
        // The gradient's chunk copies of x and dy (bf16 activations already) are bf16 only:
        // no f32 copy beside them (without tiles, `dt ⊙ x` feeds an exact product: f32).
        if !tiled {
            continue;
        }
        let copies = named(&|n| {
            n.starts_with("ssd_scan_grad_") && (n.ends_with("_x") || n.ends_with("_dy"))
        });
        for &(k, bufs) in &copies {
            for (kb, b) in k.bufs.iter().zip(bufs) {
                if kb.writable {
                    assert_eq!(l.buffers[*b].dtype, DType::BF16, "{}: a copy", k.name);
                }
            }
        }
        // The last layer's gradient reads the forward's copy of `x` (its `w ⊙ x`).
        assert_eq!(
            copies.len(),
            4 - reuses,
            "the x and dy copies of each layer's gradient"
        );
    }
}
