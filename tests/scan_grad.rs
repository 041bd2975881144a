//! The scans and their gradients at sequence lengths around their chunks: one step, a chunk
//! less one, a chunk, a chunk plus one, several chunks and a partial one. The Mamba-2 SSD in
//! both of its forms: the matrix form (the default, chunks of the op's `chunk` at most
//! `MAX_SSD_MATMUL_CHUNK`) and as scans (`LowerOptions::ssd_scans`: the forward chunk-parallel
//! in chunks of at most `MAX_SSD_SCAN_CHUNK`, the gradient checkpointing every `chunk` steps,
//! tiny-mamba2: 8). Mamba-1's forward scans run chunk-parallel (`SELECTIVE_SCAN_CHUNK`), its
//! gradient checkpoints every `SELECTIVE_GRAD_CHUNK` steps. Batches of one and two, with and
//! without initial states.
//!
//! Each case runs the Cranelift kernels (inline `exp`) against the f64 reference interpreter
//! within the f32 tolerances of the other tests, and Cranelift with `exact_math` against the
//! kernel IR evaluator, which must agree bit for bit. And the scratch memory of the gradients
//! of a published config is their checkpoints, not every state.

mod common;

use codegen::cpu::CpuOptions;
use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, UnaryOp, Value};
use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use passes::autodiff::training_graph;
use runtime::array::Array;
use runtime::cpu::{EvalLauncher, HostData, Inputs, Outputs, execute};
use runtime::init::Rng;
use runtime::interp::{self, Bindings};
use std::collections::HashMap;

/// The checkpoint interval of the Mamba-1 scan gradient.
const SELECTIVE_CHUNK: usize = passes::lower::SELECTIVE_GRAD_CHUNK as usize;
/// The chunk of the Mamba-1 forward scan.
const SELECTIVE_SCAN_CHUNK: usize = passes::lower::SELECTIVE_SCAN_CHUNK as usize;
/// The largest chunk of the Mamba-2 forward scan.
const MAX_SSD_SCAN_CHUNK: usize = passes::lower::MAX_SSD_SCAN_CHUNK as usize;
/// The largest chunk of the Mamba-2 matrix form.
const MAX_SSD_MATMUL_CHUNK: usize = passes::lower::MAX_SSD_MATMUL_CHUNK as usize;
/// tiny-mamba2's `chunk_size`.
const TINY_MAMBA2_CHUNK: usize = 8;
/// Normwise relative error per tensor for a whole training graph (tests/training.rs).
const NORMWISE: f64 = 2e-3;
/// Elementwise `atol + rtol |want|` for one op (tests/kernels.rs, reductions and scans).
const REDUCTION: (f64, f64) = (6e-4, 2e-3);

/// Lengths around a chunk of `q` steps.
fn lengths(q: usize) -> Vec<usize> {
    let mut ls = vec![1, q - 1, q, q + 1, 3 * q + 5];
    ls.dedup();
    ls
}

/// A graph with every input bound, for the interpreter and for the compiled program.
struct Case {
    what: String,
    graph: Graph,
    syms: Vec<(&'static str, i64)>,
    interp: Bindings,
    data: HashMap<String, HostData>,
    params: HashMap<String, Vec<f32>>,
    states: HashMap<String, Vec<f32>>,
}

impl Case {
    fn new(what: String, graph: Graph, b: usize, l: usize) -> Case {
        Case {
            what,
            graph,
            syms: vec![("B", b as i64), ("L", l as i64)],
            interp: Bindings::default(),
            data: HashMap::new(),
            params: HashMap::new(),
            states: HashMap::new(),
        }
    }

    fn shape(&self, ty: &TensorType) -> Vec<usize> {
        let bind = |s: &str| {
            self.syms
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(_, v)| *v as u64)
        };
        ty.shape
            .iter()
            .map(|d| d.eval(&bind).expect("bound") as usize)
            .collect()
    }

    /// Binds every unbound float input, state and parameter to random values (`|x| + 0.05`
    /// for names in `positive`), the same f32 values for both executors.
    fn fill(&mut self, rng: &mut Rng, positive: &[&str]) {
        let leaves: Vec<(String, TensorType, Option<InputKind>)> = self
            .graph
            .nodes()
            .filter_map(|n| match self.graph.op(n) {
                Op::Input { name, ty, kind } => Some((name.clone(), ty.clone(), Some(*kind))),
                Op::Param { name, ty, .. } => Some((name.clone(), ty.clone(), None)),
                _ => None,
            })
            .collect();
        for (name, ty, kind) in leaves {
            let bound = self.data.contains_key(&name)
                || self.params.contains_key(&name)
                || self.states.contains_key(&name);
            if bound || !ty.dtype.is_float() {
                continue;
            }
            let shape = self.shape(&ty);
            let count = shape.iter().product();
            let v: Vec<f32> = (0..count)
                .map(|_| {
                    let x = (rng.normal() * 0.8) as f32;
                    if positive.contains(&name.as_str()) {
                        x.abs() + 0.05
                    } else {
                        x
                    }
                })
                .collect();
            let arr = Array::new(shape, v.iter().map(|&x| x as f64).collect());
            match kind {
                Some(InputKind::Data) => {
                    self.interp.inputs.insert(name.clone(), arr);
                    self.data.insert(name, HostData::F32(v));
                }
                Some(InputKind::State) => {
                    self.interp.states.insert(name.clone(), arr);
                    self.states.insert(name, v);
                }
                None => {
                    self.interp.params.insert(name.clone(), arr);
                    self.params.insert(name, v);
                }
            }
        }
    }

    fn ids(&mut self, name: &str, v: Vec<i32>) {
        let (b, l) = (self.syms[0].1 as usize, self.syms[1].1 as usize);
        self.interp.inputs.insert(
            name.into(),
            Array::new(vec![b, l], v.iter().map(|&x| x as f64).collect()),
        );
        self.data.insert(name.into(), HostData::I32(v));
    }
}

/// The training graph (loss and every gradient) of a library model, with its initialized
/// parameters, random tokens and targets (some ignored) and random initial states.
fn training_case(model: &str, b: usize, l: usize, seed: u64) -> Case {
    let forward = common::compile_name(model).graph;
    let graph = training_graph(&forward, "logits", -100)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
        .graph;
    let mut c = Case::new(format!("{model} B={b} L={l}"), graph, b, l);
    let mut rng = Rng::new(seed);
    for (name, arr) in runtime::init::init_params(&forward, seed) {
        let v: Vec<f32> = arr.data.iter().map(|&x| x as f32).collect();
        let back = Array::new(arr.shape.clone(), v.iter().map(|&x| x as f64).collect());
        c.interp.params.insert(name.clone(), back);
        c.params.insert(name, v);
    }
    let vocab = 61;
    let ids = (0..b * l)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    let mut targets: Vec<i32> = (0..b * l)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    // Some ignored positions, never all of them (the mean loss would be NaN).
    targets[b * l - 1] = -100;
    if l > 1 {
        targets[l - 1] = -100;
    }
    c.ids("input_ids", ids);
    c.ids("targets", targets);
    c.fill(&mut rng, &[]);
    c
}

fn add(g: &mut Graph, op: Op, xs: &[Value]) -> Value {
    Value::from(g.add(op, xs, Span::default(), None).expect("well-typed"))
}

fn leaf(g: &mut Graph, name: &str, kind: Option<InputKind>, shape: &[Dim]) -> Value {
    let ty = TensorType::new(DType::F32, shape.to_vec());
    let op = match kind {
        Some(kind) => Op::Input {
            name: name.into(),
            kind,
            ty,
        },
        None => Op::Param {
            name: name.into(),
            ty,
            init: ir::Init::Zeros,
        },
    };
    add(g, op, &[])
}

/// `dt = softplus(dt_raw)` and `A = -exp(A_log)`: the prologues the scans see in a model.
fn dt_and_a(g: &mut Graph, dt_shape: &[Dim], a_shape: &[Dim]) -> (Value, Value) {
    let dt_raw = leaf(g, "dt", Some(InputKind::Data), dt_shape);
    let dt = add(g, Op::Unary(UnaryOp::Softplus), &[dt_raw]);
    let a_log = leaf(g, "A_log", None, a_shape);
    let ea = add(g, Op::Unary(UnaryOp::Exp), &[a_log]);
    let a = add(g, Op::Unary(UnaryOp::Neg), &[ea]);
    (dt, a)
}

/// Drops the bound initial states (they start at zeros) unless `with_state`.
fn states(mut c: Case, with_state: bool) -> Case {
    if !with_state {
        c.states.clear();
        c.interp.states.clear();
        c.what.push_str(" no initial state");
    }
    c
}

/// `selective_scan` alone: `e` channels, `n` states.
fn selective_forward_case(b: usize, l: usize, e: usize, n: usize, seed: u64) -> Case {
    let mut g = Graph::new("selective_scan");
    let (bd, ld, k) = (Dim::sym("B"), Dim::sym("L"), |n: usize| {
        Dim::known(n as u64)
    });
    let ble = [bd.clone(), ld.clone(), k(e)];
    let data = Some(InputKind::Data);
    let x = leaf(&mut g, "x", data, &ble);
    let (dt, a) = dt_and_a(&mut g, &ble, &[k(e), k(n)]);
    let bm = leaf(&mut g, "Bm", data, &[bd.clone(), ld.clone(), k(n)]);
    let cm = leaf(&mut g, "Cm", data, &[bd.clone(), ld.clone(), k(n)]);
    let h0 = leaf(&mut g, "h0", Some(InputKind::State), &[bd, k(e), k(n)]);
    let s = g
        .add(
            Op::SelectiveScan,
            &[x, dt, a, bm, cm, h0],
            Span::default(),
            None,
        )
        .expect("well-typed");
    g.add_output("y", Value::new(s, 0));
    g.add_output("h1", Value::new(s, 1));
    let mut c = Case::new(format!("selective_scan E={e} N={n} B={b} L={l}"), g, b, l);
    c.fill(&mut Rng::new(seed), &[]);
    c
}

/// `ssd_scan{chunk}` alone: `groups` groups of `hpg` heads of size `p`, `n` states.
fn ssd_forward_case(
    b: usize,
    l: usize,
    (hpg, groups, p, n): (usize, usize, usize, usize),
    chunk: u64,
    seed: u64,
) -> Case {
    let h = hpg * groups;
    let mut g = Graph::new("ssd_scan");
    let (bd, ld, k) = (Dim::sym("B"), Dim::sym("L"), |n: usize| {
        Dim::known(n as u64)
    });
    let bsh = [bd.clone(), ld.clone(), k(groups), k(n)];
    let data = Some(InputKind::Data);
    let x = leaf(&mut g, "x", data, &[bd.clone(), ld.clone(), k(h), k(p)]);
    let (dt, a) = dt_and_a(&mut g, &[bd.clone(), ld.clone(), k(h)], &[k(h)]);
    let bm = leaf(&mut g, "Bm", data, &bsh);
    let cm = leaf(&mut g, "Cm", data, &bsh);
    let s0 = leaf(
        &mut g,
        "s0",
        Some(InputKind::State),
        &[bd, k(h), k(p), k(n)],
    );
    let s = g
        .add(
            Op::SsdScan { chunk },
            &[x, dt, a, bm, cm, s0],
            Span::default(),
            None,
        )
        .expect("well-typed");
    g.add_output("y", Value::new(s, 0));
    g.add_output("s1", Value::new(s, 1));
    let mut c = Case::new(
        format!("ssd_scan{{chunk: {chunk}}} H={h} G={groups} P={p} N={n} B={b} L={l}"),
        g,
        b,
        l,
    );
    c.fill(&mut Rng::new(seed), &[]);
    c
}

/// `selective_scan_grad` alone: `e` channels, `n` states.
fn selective_case(b: usize, l: usize, e: usize, n: usize, seed: u64) -> Case {
    let mut g = Graph::new("selective_scan_grad");
    let (bd, ld, k) = (Dim::sym("B"), Dim::sym("L"), |n: usize| {
        Dim::known(n as u64)
    });
    let ble = [bd.clone(), ld.clone(), k(e)];
    let data = Some(InputKind::Data);
    let x = leaf(&mut g, "x", data, &ble);
    let (dt, a) = dt_and_a(&mut g, &ble, &[k(e), k(n)]);
    let bm = leaf(&mut g, "Bm", data, &[bd.clone(), ld.clone(), k(n)]);
    let cm = leaf(&mut g, "Cm", data, &[bd.clone(), ld.clone(), k(n)]);
    let h0 = leaf(
        &mut g,
        "h0",
        Some(InputKind::State),
        &[bd.clone(), k(e), k(n)],
    );
    let dy = leaf(&mut g, "dy", data, &ble);
    let dh1 = leaf(&mut g, "dh1", data, &[bd.clone(), k(e), k(n)]);
    let sg = g
        .add(
            Op::SelectiveScanGrad,
            &[x, dt, a, bm, cm, h0, dy, dh1],
            Span::default(),
            None,
        )
        .expect("well-typed");
    for (r, name) in ["dx", "ddt", "dA", "dB", "dC", "dh0"].iter().enumerate() {
        g.add_output(*name, Value::new(sg, r as u16));
    }
    let mut c = Case::new(
        format!("selective_scan_grad E={e} N={n} B={b} L={l}"),
        g,
        b,
        l,
    );
    c.fill(&mut Rng::new(seed), &[]);
    c
}

/// `ssd_scan_grad{chunk}` alone: `groups` groups of `hpg` heads of size `p`, `n` states.
fn ssd_case(
    b: usize,
    l: usize,
    (hpg, groups, p, n): (usize, usize, usize, usize),
    chunk: u64,
    seed: u64,
) -> Case {
    let h = hpg * groups;
    let mut g = Graph::new("ssd_scan_grad");
    let (bd, ld, k) = (Dim::sym("B"), Dim::sym("L"), |n: usize| {
        Dim::known(n as u64)
    });
    let xsh = [bd.clone(), ld.clone(), k(h), k(p)];
    let bsh = [bd.clone(), ld.clone(), k(groups), k(n)];
    let ssh = [bd.clone(), k(h), k(p), k(n)];
    let data = Some(InputKind::Data);
    let x = leaf(&mut g, "x", data, &xsh);
    let (dt, a) = dt_and_a(&mut g, &[bd.clone(), ld.clone(), k(h)], &[k(h)]);
    let bm = leaf(&mut g, "Bm", data, &bsh);
    let cm = leaf(&mut g, "Cm", data, &bsh);
    let s0 = leaf(&mut g, "s0", Some(InputKind::State), &ssh);
    let dy = leaf(&mut g, "dy", data, &xsh);
    let ds1 = leaf(&mut g, "ds1", data, &ssh);
    let sg = g
        .add(
            Op::SsdScanGrad { chunk },
            &[x, dt, a, bm, cm, s0, dy, ds1],
            Span::default(),
            None,
        )
        .expect("well-typed");
    for (r, name) in ["dx", "ddt", "dA", "dB", "dC", "ds0"].iter().enumerate() {
        g.add_output(*name, Value::new(sg, r as u16));
    }
    let mut c = Case::new(
        format!("ssd_scan_grad{{chunk: {chunk}}} H={h} G={groups} P={p} N={n} B={b} L={l}"),
        g,
        b,
        l,
    );
    c.fill(&mut Rng::new(seed), &[]);
    c
}

/// The compiled program's outputs, through Cranelift with these options.
fn cranelift(c: &Case, lo: &LowerOptions, opts: CpuOptions) -> Outputs {
    let cpu = CpuGraph::compile_with(&c.graph, lo, opts)
        .unwrap_or_else(|e| panic!("{}: compile: {e}", c.what));
    let (out, _) = cpu
        .run(&c.syms, &c.data, &c.params, &c.states)
        .unwrap_or_else(|e| panic!("{}: run: {e}", c.what));
    out
}

/// The compiled program's outputs, every kernel run by the kernel IR evaluator (f32 mode).
fn evaluated(c: &Case, lo: &LowerOptions) -> Outputs {
    let l = passes::lower(&c.graph, lo).expect("lowers");
    let sizes: Vec<i64> = l
        .syms
        .iter()
        .map(|s| c.syms.iter().find(|(n, _)| n == s).expect("bound").1)
        .collect();
    let bind = |s: &str| l.syms.iter().position(|x| x == s).map(|i| sizes[i] as u64);
    let plan = passes::plan_memory(&l, &bind).expect("plans");
    passes::check_memory(&plan).unwrap_or_else(|e| panic!("{}: {e}", c.what));
    let launcher = EvalLauncher {
        lowered: &l,
        bytes: plan.bytes.clone(),
    };
    let inp = Inputs {
        sizes: &sizes,
        data: &c.data,
        params: &c.params,
        states: &c.states,
    };
    execute(&l, &plan, &launcher, &inp)
        .unwrap_or_else(|e| panic!("{}: evaluator: {e}", c.what))
        .0
}

/// How close the compiled result must be to the interpreter's.
#[derive(Clone, Copy)]
enum Tolerance {
    Normwise(f64),
    Elementwise(f64, f64),
}

/// Cranelift against the interpreter; Cranelift (`exact_math`) against the evaluator, bit
/// for bit.
fn check(c: &Case, tol: Tolerance) {
    check_with(c, tol, &LowerOptions::default())
}

/// [`check`] with the program lowered with `lo`.
fn check_with(c: &Case, tol: Tolerance, lo: &LowerOptions) {
    let want = interp::run(&c.graph, &c.interp)
        .unwrap_or_else(|e| panic!("{}: interpreter: {e}", c.what))
        .values;
    let got = cranelift(c, lo, CpuOptions::default());
    assert_eq!(got.len(), want.len(), "{}", c.what);
    for ((gn, gv), (wn, wv)) in got.iter().zip(&want) {
        assert_eq!(gn, wn, "{}", c.what);
        assert_eq!(gv.len(), wv.data.len(), "{}: {gn}", c.what);
        match tol {
            Tolerance::Normwise(rel) => {
                let (mut diff, mut norm) = (0.0f64, 0.0f64);
                for (&x, &e) in gv.iter().zip(&wv.data) {
                    assert!(x.is_finite(), "{}: {gn} has {x}", c.what);
                    diff += (x as f64 - e).powi(2);
                    norm += e * e;
                }
                let (diff, norm) = (diff.sqrt(), norm.sqrt());
                assert!(
                    diff <= rel * norm || diff <= 1e-6,
                    "{}: {gn}: |got - want| = {diff:e}, |want| = {norm:e}",
                    c.what
                );
            }
            Tolerance::Elementwise(atol, rtol) => {
                for (i, (&x, &e)) in gv.iter().zip(&wv.data).enumerate() {
                    assert!(
                        (x as f64 - e).abs() <= atol + rtol * e.abs(),
                        "{}: {gn}[{i}] got {x} want {e}",
                        c.what
                    );
                }
            }
        }
    }
    let exact = cranelift(
        c,
        lo,
        CpuOptions {
            exact_math: true,
            ..CpuOptions::default()
        },
    );
    let eval = evaluated(c, lo);
    assert_eq!(exact.len(), eval.len(), "{}", c.what);
    for ((n, a), (_, b)) in exact.iter().zip(&eval) {
        let differ = a
            .iter()
            .zip(b)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        if let Some(i) = differ {
            panic!(
                "{}: {n}[{i}]: Cranelift (exact math) {} vs evaluator {}",
                c.what, a[i], b[i]
            );
        }
    }
}

#[test]
fn tiny_mamba_gradients_around_the_chunk() {
    for (i, l) in lengths(SELECTIVE_CHUNK).into_iter().enumerate() {
        let b = if l > SELECTIVE_CHUNK { 1 } else { 2 };
        let c = training_case("tiny-mamba", b, l, 40 + i as u64);
        check(&c, Tolerance::Normwise(NORMWISE));
    }
}

#[test]
fn tiny_mamba2_gradients_around_the_chunk() {
    for (i, l) in lengths(TINY_MAMBA2_CHUNK).into_iter().enumerate() {
        let c = training_case("tiny-mamba2", 2, l, 50 + i as u64);
        check(&c, Tolerance::Normwise(NORMWISE));
    }
}

/// Batch sizes and whether the initial state is given (else zeros).
const VARIANTS: [(usize, bool); 3] = [(1, true), (2, true), (2, false)];

#[test]
fn selective_scan_around_the_chunk() {
    // And no step at all: no chunk, h1 = h0.
    for (i, l) in lengths(SELECTIVE_SCAN_CHUNK)
        .into_iter()
        .chain([0])
        .enumerate()
    {
        for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
            let c = selective_forward_case(b, l, 3, 4, 80 + (3 * i + v) as u64);
            check(
                &states(c, with_state),
                Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
            );
        }
    }
}

#[test]
fn ssd_scan_around_the_chunk() {
    // Grouped heads; chunks of 1 (every step a chunk), 4, and the op's chunk beyond the cap
    // (chunks of MAX_SSD_SCAN_CHUNK).
    for (chunk, q) in [(4u64, 4usize), (1, 2), (256, MAX_SSD_SCAN_CHUNK)] {
        for (i, l) in lengths(q).into_iter().chain([0]).enumerate() {
            for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
                let c = ssd_forward_case(b, l, (2, 2, 3, 5), chunk, 90 + (3 * i + v) as u64);
                check_with(
                    &states(c, with_state),
                    Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
                    &LowerOptions::ssd_scans(),
                );
            }
        }
    }
}

/// The SSD as matrix products (the default): chunks of 1, 4 and the op's 256 capped
/// at `MAX_SSD_MATMUL_CHUNK`, partial last chunks, grouped heads, given or zero states.
#[test]
fn ssd_matmul_around_the_chunk() {
    for (chunk, q) in [(4u64, 4usize), (1, 2), (256, MAX_SSD_MATMUL_CHUNK)] {
        for (i, l) in lengths(q).into_iter().chain([0]).enumerate() {
            for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
                let seed = 190 + (3 * i + v) as u64;
                let c = ssd_forward_case(b, l, (2, 2, 3, 5), chunk, seed);
                assert_eq!(gemms(&c, &LowerOptions::default()), 4, "{}", c.what);
                assert_eq!(gemms(&c, &LowerOptions::ssd_scans()), 0, "{}", c.what);
                check_with(
                    &states(c, with_state),
                    Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
                    &LowerOptions::default(),
                );
            }
        }
    }
}

/// The number of matrix products in `c`'s program lowered with `lo`.
fn gemms(c: &Case, lo: &LowerOptions) -> usize {
    let l = passes::lower(&c.graph, lo).expect("lowers");
    l.steps
        .iter()
        .filter(|s| matches!(s, passes::Step::MatMul { .. }))
        .count()
}

/// The gradient of the matrix form, as [`ssd_matmul_around_the_chunk`].
#[test]
fn ssd_matmul_grad_around_the_chunk() {
    for (chunk, q) in [(4u64, 4usize), (1, 2), (64, 64)] {
        for (i, l) in lengths(q).into_iter().chain([0]).enumerate() {
            for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
                let c = ssd_case(b, l, (2, 2, 3, 5), chunk, 170 + (3 * i + v) as u64);
                assert_eq!(gemms(&c, &LowerOptions::default()), 12, "{}", c.what);
                check_with(
                    &states(c, with_state),
                    Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
                    &LowerOptions::default(),
                );
            }
        }
    }
}

/// A whole tiny-mamba2 training graph with the SSD as scans over time.
#[test]
fn tiny_mamba2_gradients_with_ssd_scans() {
    for (i, l) in lengths(TINY_MAMBA2_CHUNK).into_iter().enumerate() {
        let c = training_case("tiny-mamba2", 2, l, 150 + i as u64);
        check_with(
            &c,
            Tolerance::Normwise(NORMWISE),
            &LowerOptions::ssd_scans(),
        );
    }
}

#[test]
fn selective_scan_grad_around_the_chunk() {
    // And no step at all: no chunk, dh0 = dh1.
    for (i, l) in lengths(SELECTIVE_CHUNK).into_iter().chain([0]).enumerate() {
        for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
            let c = selective_case(b, l, 3, 4, 60 + (3 * i + v) as u64);
            check(
                &states(c, with_state),
                Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
            );
        }
    }
}

#[test]
fn ssd_scan_grad_around_the_chunk() {
    // Grouped heads; chunks of 1 (every step a checkpoint), 4, and one longer than L.
    for (chunk, q) in [(4u64, 4usize), (1, 2), (64, 4)] {
        for (i, l) in lengths(q).into_iter().chain([0]).enumerate() {
            for (v, &(b, with_state)) in VARIANTS.iter().enumerate() {
                let c = ssd_case(b, l, (2, 2, 3, 5), chunk, 70 + (3 * i + v) as u64);
                check_with(
                    &states(c, with_state),
                    Tolerance::Elementwise(REDUCTION.0, REDUCTION.1),
                    &LowerOptions::ssd_scans(),
                );
            }
        }
    }
}

/// Scratch bytes of one scan gradient (the SSD's as a scan) at B = 1, L = 8192, by the
/// lowered buffers.
fn scratch_bytes(c: &Case) -> Vec<u64> {
    let l = passes::lower(&c.graph, &LowerOptions::ssd_scans()).expect("lowers");
    let bind = |s: &str| Some(if s == "B" { 1 } else { 8192 });
    let bytes = passes::memory::buffer_bytes(&l, &bind).expect("sizes");
    l.buffers
        .iter()
        .zip(bytes)
        .filter(|(b, _)| b.kind == passes::BufKind::Scratch)
        .map(|(_, n)| n)
        .collect()
}

#[test]
fn scratch_is_checkpoints_not_every_state() {
    // mamba2-2.7b: 80 heads of 64, d_state 128, one group, chunk 256: the states and state
    // cotangents at 32 chunk boundaries, a decay product and a partial dA per (batch, chunk,
    // head) (was 2 x [B, L, H, P, N], 43 GB).
    let ssd = ssd_case(1, 1, (80, 1, 64, 128), 256, 0);
    let ck = 32 * 80 * 64 * 128 * 4;
    assert_eq!(scratch_bytes(&ssd), [ck, ck, 32 * 80 * 4, 32 * 80 * 4]);
    // mamba-2.8b: 5120 channels, d_state 16: states, state cotangents and decay products at
    // 128 chunk boundaries (was 2 x [B, L, E, N], 5.4 GB).
    let sel = selective_case(1, 1, 5120, 16, 0);
    let ck = 128 * 5120 * 16 * 4;
    assert_eq!(scratch_bytes(&sel), [ck, ck, ck]);
}

#[test]
fn forward_scan_scratch_is_a_state_per_chunk() {
    // mamba2-2.7b (chunk 256, capped at 64): 128 chunks' states and a decay per (chunk, head).
    let ssd = ssd_forward_case(1, 1, (80, 1, 64, 128), 256, 0);
    assert_eq!(scratch_bytes(&ssd), [128 * 80 * 64 * 128 * 4, 128 * 80 * 4]);
    // mamba-2.8b: 128 chunks' states and decays.
    let sel = selective_forward_case(1, 1, 5120, 16, 0);
    let ck = 128 * 5120 * 16 * 4;
    assert_eq!(scratch_bytes(&sel), [ck, ck]);
}

/// The grid points of every kernel of `c`'s lowered graph (the SSD as a scan) at `B = 1`,
/// `L = l`, by name.
fn grids(c: &Case, l: i64) -> Vec<(String, i64)> {
    let lw = passes::lower(&c.graph, &LowerOptions::ssd_scans()).expect("lowers");
    let sizes: Vec<i64> = lw
        .syms
        .iter()
        .map(|s| if s == "B" { 1 } else { l })
        .collect();
    lw.kernels
        .iter()
        .map(|k| {
            let points = k.grid.iter().map(|g| extent(g, &sizes)).product();
            (k.name.clone(), points)
        })
        .collect()
}

/// The value of a grid extent (sizes, constants and arithmetic only).
fn extent(e: &ir::kernel::IExpr, sizes: &[i64]) -> i64 {
    use ir::kernel::IExpr;
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

#[test]
fn scan_grids_grow_with_the_sequence() {
    // mamba2-130m's layer: 24 heads of 64, d_state 128, chunk 256, at B = 1, L = 2048. The
    // forward scan ran 24 x 64 = 1536 sequential points.
    let ssd = ssd_forward_case(1, 1, (24, 1, 64, 128), 256, 0);
    // Now chunks of 64: 32 chunks per point, and the carry per state element.
    let got = grids(&ssd, 2048);
    let points: Vec<i64> = got.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        points,
        [32 * 24 * 64, 24 * 64 * 128, 32 * 24 * 64],
        "{got:?}"
    );
    // The gradient (chunks of 256): its first kernel ran 1536 points over the whole sequence
    // forwards and backwards; dA sums partials per head.
    let grad = ssd_case(1, 1, (24, 1, 64, 128), 256, 0);
    let got = grids(&grad, 2048);
    let points: Vec<i64> = got.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        points,
        [8 * 24 * 64, 24 * 64 * 128, 8 * 24, 24, 8 * 128],
        "{got:?}"
    );
    // The decode step (L known to be 1) keeps one sequential kernel and no scratch.
    let mut step = ssd_forward_case(1, 1, (2, 1, 3, 4), 256, 0);
    step.graph = passes::step_graph(&step.graph).expect("step graph");
    let lw = passes::lower(&step.graph, &LowerOptions::default()).expect("lowers");
    assert_eq!(lw.kernels.len(), 1, "{:?}", grids(&step, 1));
    assert!(
        lw.buffers
            .iter()
            .all(|b| b.kind != passes::BufKind::Scratch)
    );
}
