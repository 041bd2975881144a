//! Every kernel kind, compiled by Cranelift, against the f64 reference interpreter on random
//! shapes (1, primes, odd sizes, longer sequences), with the f32 tolerances of RELIABILITY.md.

mod common;

use ir::{
    BinaryOp, DType, Dim, Graph, Init, InputKind, Op, ReduceOp, Span, TensorType, UnaryOp, Value,
};
use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use proptest::prelude::*;
use runtime::array::Array;
use runtime::cpu::HostData;
use runtime::init::Rng;
use runtime::interp::{self, Bindings};
use std::collections::HashMap;

/// Elementwise ops: |a - e| <= 1.3e-6 + 1e-5 |e| per op; a chain of a few ops gets a few.
const ELEMENTWISE: (f64, f64) = (1e-5, 5e-5);
/// Reductions, matmul, scans.
const REDUCTION: (f64, f64) = (6e-4, 2e-3);

fn t(shape: &[Dim]) -> TensorType {
    TensorType::new(DType::F32, shape.to_vec())
}

fn k(n: usize) -> Dim {
    Dim::known(n as u64)
}

struct G {
    g: Graph,
}

impl G {
    fn new() -> G {
        G {
            g: Graph::new("case"),
        }
    }
    fn add(&mut self, op: Op, xs: &[Value]) -> Value {
        let n = self
            .g
            .add(op, xs, Span::default(), None)
            .expect("well-typed case");
        Value::from(n)
    }
    fn input(&mut self, name: &str, shape: &[Dim]) -> Value {
        self.add(
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
                ty: t(shape),
            },
            &[],
        )
    }
    fn state(&mut self, name: &str, shape: &[Dim]) -> Value {
        self.add(
            Op::Input {
                name: name.into(),
                kind: InputKind::State,
                ty: t(shape),
            },
            &[],
        )
    }
    fn param(&mut self, name: &str, shape: &[Dim]) -> Value {
        self.add(
            Op::Param {
                name: name.into(),
                ty: t(shape),
                init: Init::Zeros,
            },
            &[],
        )
    }
    fn un(&mut self, op: UnaryOp, x: Value) -> Value {
        self.add(Op::Unary(op), &[x])
    }
    fn bin(&mut self, op: BinaryOp, a: Value, b: Value) -> Value {
        self.add(Op::Binary(op), &[a, b])
    }
}

/// Random data for every input, state and parameter; runs both executors; compares outputs.
fn compare(g: &Graph, syms: &[(&str, i64)], seed: u64, tol: (f64, f64), positive: &[&str]) {
    compare_ids(g, syms, seed, tol, positive, 1);
}

/// As [`compare`]; integer inputs get ids in `0..classes`, about one in `classes + 1` of
/// them the ignore index -100.
fn compare_ids(
    g: &Graph,
    syms: &[(&str, i64)],
    seed: u64,
    tol: (f64, f64),
    positive: &[&str],
    classes: u64,
) {
    compare_lowered(
        g,
        syms,
        seed,
        tol,
        positive,
        classes,
        &LowerOptions::default(),
    );
}

/// Random values for every input, parameter and state of `g` at `syms`: normal with
/// standard deviation 0.8 (positive for the names in `positive`); integer inputs get ids in
/// `0..classes`, about one in `classes + 1` of them the ignore index -100. As interpreter
/// bindings and as the compiled graph's host data, parameters and states.
type Random = (
    Bindings,
    HashMap<String, HostData>,
    HashMap<String, Vec<f32>>,
    HashMap<String, Vec<f32>>,
);

fn random_values(
    g: &Graph,
    syms: &[(&str, i64)],
    seed: u64,
    positive: &[&str],
    classes: u64,
) -> Random {
    let mut rng = Rng::new(seed);
    let bind = |s: &str| syms.iter().find(|(n, _)| *n == s).map(|(_, v)| *v as u64);
    let mut b = Bindings::default();
    let mut data = HashMap::new();
    let mut params = HashMap::new();
    let mut states = HashMap::new();
    for n in g.nodes() {
        let (name, ty, kind) = match g.op(n) {
            Op::Input { name, ty, kind } => (name.clone(), ty.clone(), Some(*kind)),
            Op::Param { name, ty, .. } => (name.clone(), ty.clone(), None),
            _ => continue,
        };
        let shape: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| d.eval(&bind).expect("bound") as usize)
            .collect();
        let count: usize = shape.iter().product();
        if !ty.dtype.is_float() {
            let ids: Vec<i32> = (0..count)
                .map(|_| match rng.next_u64() % (classes + 1) {
                    c if c == classes => -100,
                    c => c as i32,
                })
                .collect();
            b.inputs.insert(
                name.clone(),
                Array::new(shape, ids.iter().map(|&x| x as f64).collect()),
            );
            data.insert(name, HostData::I32(ids));
            continue;
        }
        let vals: Vec<f32> = (0..count)
            .map(|_| {
                let x = (rng.normal() * 0.8) as f32;
                if positive.contains(&name.as_str()) {
                    x.abs() + 0.05
                } else {
                    x
                }
            })
            .collect();
        let arr = Array::new(shape, vals.iter().map(|&x| x as f64).collect());
        match kind {
            Some(InputKind::Data) => {
                data.insert(name.clone(), HostData::F32(vals));
                b.inputs.insert(name, arr);
            }
            Some(InputKind::State) => {
                states.insert(name.clone(), vals);
                b.states.insert(name, arr);
            }
            None => {
                params.insert(name.clone(), vals);
                b.params.insert(name, arr);
            }
        }
    }
    (b, data, params, states)
}

/// As [`compare_ids`], lowered with `opts`.
fn compare_lowered(
    g: &Graph,
    syms: &[(&str, i64)],
    seed: u64,
    tol: (f64, f64),
    positive: &[&str],
    classes: u64,
    opts: &LowerOptions,
) {
    let (b, data, params, states) = random_values(g, syms, seed, positive, classes);
    let want = interp::run(g, &b).expect("interpreter");
    let cpu = CpuGraph::compile(g, opts).expect("compiles");
    let (got, _) = cpu.run(syms, &data, &params, &states).expect("runs");
    assert_eq!(got.len(), want.values.len());
    assert!(!got.is_empty());
    for ((gn, gv), (wn, wv)) in got.iter().zip(&want.values) {
        assert_eq!(gn, wn);
        assert_eq!(gv.len(), wv.data.len(), "{gn}");
        let mut worst = (0usize, f64::NEG_INFINITY);
        for (i, (&x, &e)) in gv.iter().zip(&wv.data).enumerate() {
            assert!(!x.is_nan() || e.is_nan(), "{gn}[{i}] is NaN, expected {e}");
            let excess = (x as f64 - e).abs() - (tol.0 + tol.1 * e.abs());
            if excess > worst.1 {
                worst = (i, excess);
            }
        }
        assert!(
            worst.1 <= 0.0,
            "{gn}: index {} got {} want {} (syms {syms:?})",
            worst.0,
            gv[worst.0],
            wv.data[worst.0]
        );
    }
}

fn sizes() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 5, 7, 13, 31])
}

/// Reductions in two passes (keeping the last axis, or into few outputs): over batch and
/// time, over time only, over the batch only, of an inlined product, at counts around the
/// chunks of 64 elements (`L = 0`: means of nothing are NaN in both); max keeps the general
/// form.
#[test]
fn column_reductions_around_chunks() {
    for (i, l) in [0i64, 1, 31, 32, 33, 64, 100].into_iter().enumerate() {
        for (j, op) in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max]
            .into_iter()
            .enumerate()
        {
            let mut g = G::new();
            let x = g.input("x", &[Dim::sym("B"), Dim::sym("L"), k(5)]);
            let y = g.input("y", &[Dim::sym("B"), Dim::sym("L"), k(5)]);
            let xy = g.bin(BinaryOp::Mul, x, y);
            for (name, axes) in [("bt", vec![0, 1]), ("t", vec![1]), ("b", vec![0])] {
                let r = g.add(Op::Reduce { op, axes }, &[xy]);
                g.g.add_output(name, r);
            }
            // Few outputs, the last axis reduced too (mamba2's `dD`), and everything.
            let z = g.input("z", &[Dim::sym("B"), Dim::sym("L"), k(5), k(3)]);
            for (name, axes) in [("btp", vec![0, 1, 3]), ("all", vec![0, 1, 2, 3])] {
                let r = g.add(Op::Reduce { op, axes }, &[z]);
                g.g.add_output(name, r);
            }
            let syms = [("B", 2), ("L", l)];
            compare(&g.g, &syms, 500 + (i * 3 + j) as u64, REDUCTION, &[]);
        }
    }
}

/// `causal_conv1d` with a state, a SiLU epilogue on `y`, over `c` channels of width `kw`.
fn conv_graph(c: usize, kw: usize) -> Graph {
    let mut g = G::new();
    let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
    let x = g.input("x", &[bd.clone(), ld.clone(), k(c)]);
    let w = g.param("w", &[k(c), k(kw)]);
    let bias = g.param("bias", &[k(c)]);
    let s0 = g.state("s0", &[bd.clone(), k(c), k(kw - 1)]);
    let conv =
        g.g.add(Op::CausalConv1d, &[x, w, bias, s0], Span::default(), None)
            .unwrap();
    let y = g.un(UnaryOp::Silu, Value::new(conv, 0));
    g.g.add_output("y", y);
    g.g.add_output("s1", Value::new(conv, 1));
    g.g
}

/// `causal_conv1d_grad` with every output, `dy` computed by a prologue (a SiLU).
fn conv_grad_graph(c: usize, kw: usize) -> Graph {
    let mut g = G::new();
    let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
    let x = g.input("x", &[bd.clone(), ld.clone(), k(c)]);
    let w = g.param("w", &[k(c), k(kw)]);
    let bias = g.param("bias", &[k(c)]);
    let s0 = g.state("s0", &[bd.clone(), k(c), k(kw - 1)]);
    let dy_raw = g.input("dy", &[bd.clone(), ld.clone(), k(c)]);
    let dy = g.un(UnaryOp::Silu, dy_raw);
    let ds1 = g.input("ds1", &[bd.clone(), k(c), k(kw - 1)]);
    let cg =
        g.g.add(
            Op::CausalConv1dGrad,
            &[x, w, bias, s0, dy, ds1],
            Span::default(),
            None,
        )
        .unwrap();
    for (r, name) in ["dx", "dw", "db", "ds0"].iter().enumerate() {
        g.g.add_output(*name, Value::new(cg, r as u16));
    }
    g.g
}

/// The conv and its gradient at lengths around their chunks (16 steps for the forward, 64
/// for the weight gradient) and shorter than the window (where `s1` and `ds0` mix the state
/// and the sequence), `L = 0` included; the forward also as the CPU's whole-sequence runs
/// lower it (a point walks the whole sequence).
#[test]
fn causal_conv_and_grad_around_chunks_and_short_sequences() {
    for (i, l) in [0i64, 1, 2, 3, 15, 17, 63, 64, 65, 130]
        .into_iter()
        .enumerate()
    {
        for kw in [1usize, 2, 4] {
            let syms = [("B", 2), ("L", l)];
            let seed = 400 + (i * 8 + kw) as u64;
            compare(&conv_graph(3, kw), &syms, seed, REDUCTION, &[]);
            let cpu = LowerOptions::cpu();
            compare_lowered(&conv_graph(3, kw), &syms, seed, REDUCTION, &[], 1, &cpu);
            compare(&conv_grad_graph(5, kw), &syms, seed, REDUCTION, &[]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn elementwise_chains_with_broadcasts(b in 1usize..4, l in sizes(), c in sizes(), seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let x = g.input("x", &[bd.clone(), ld.clone(), k(c)]);
        let w = g.param("w", &[k(c)]);
        let wb = g.add(Op::Broadcast { shape: vec![bd.clone(), ld.clone(), k(c)] }, &[w]);
        let mut acc = g.bin(BinaryOp::Mul, x, wb);
        for op in [UnaryOp::Silu, UnaryOp::Sigmoid, UnaryOp::Softplus, UnaryOp::Neg] {
            let y = g.un(op, x);
            acc = g.bin(BinaryOp::Add, acc, y);
        }
        let e = g.un(UnaryOp::Exp, x);
        let s = g.un(UnaryOp::Sqrt, e);
        let r = g.un(UnaryOp::Rsqrt, e);
        let lg = g.un(UnaryOp::Log, s);
        let q = g.bin(BinaryOp::Div, lg, e);
        let rc = g.un(UnaryOp::Recip, e);
        let m = g.bin(BinaryOp::Max, q, r);
        let n = g.bin(BinaryOp::Min, m, rc);
        let d = g.bin(BinaryOp::Sub, acc, n);
        g.g.add_output("y", d);
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, ELEMENTWISE, &[]);
    }

    #[test]
    fn views_slice_permute_reshape_concat(b in 1usize..3, l in sizes(), c in 2usize..9, seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let x = g.input("x", &[bd.clone(), ld.clone(), k(2 * c)]);
        let lo = g.add(Op::Slice { axis: 2, start: 0, len: c as u64 }, &[x]);
        let hi = g.add(Op::Slice { axis: 2, start: c as u64, len: c as u64 }, &[x]);
        let p = g.add(Op::Permute { perm: vec![2, 0, 1] }, &[hi]);
        let p2 = g.add(Op::Permute { perm: vec![1, 2, 0] }, &[p]);
        let sum = g.bin(BinaryOp::Add, lo, p2);
        let flat = g.add(Op::Reshape { shape: vec![bd.mul(&ld).unwrap(), k(c)] }, &[sum]);
        let back = g.add(Op::Reshape { shape: vec![bd.clone(), ld.clone(), k(c)] }, &[flat]);
        let cat = g.add(Op::Concat { axis: 2 }, &[back, x, lo]);
        g.g.add_output("cat", cat);
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, ELEMENTWISE, &[]);
    }

    #[test]
    fn reductions(b in 1usize..3, l in sizes(), c in sizes(), which in 0usize..3, seed in any::<u64>()) {
        let mut g = G::new();
        let x = g.input("x", &[Dim::sym("B"), Dim::sym("L"), k(c)]);
        let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][which];
        let sq = g.bin(BinaryOp::Mul, x, x);
        let r1 = g.add(Op::Reduce { op, axes: vec![2] }, &[sq]);
        let r2 = g.add(Op::Reduce { op, axes: vec![0, 1] }, &[x]);
        g.g.add_output("last", r1);
        g.g.add_output("outer", r2);
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn matmuls(b in 1usize..3, l in sizes(), kk in sizes(), n in sizes(), rhs_t in any::<bool>(), seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let x = g.input("x", &[bd.clone(), ld.clone(), k(kk)]);
        let w = g.param("w", &if rhs_t { [k(n), k(kk)] } else { [k(kk), k(n)] });
        let y = g.add(Op::MatMul { rhs_t }, &[x, w]);
        // Batched rhs: x @ x^T per batch.
        let xx = g.add(Op::MatMul { rhs_t: true }, &[x, x]);
        g.g.add_output("y", y);
        g.g.add_output("xx", xx);
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn gather(b in 1usize..3, l in sizes(), v in 1usize..40, d in sizes(), seed in any::<u64>()) {
        let mut g = G::new();
        let ids_ty = TensorType::new(DType::I32, vec![Dim::sym("B"), Dim::sym("L")]);
        let ids = g.add(Op::Input { name: "ids".into(), kind: InputKind::Data, ty: ids_ty }, &[]);
        let table = g.param("table", &[k(v), k(d)]);
        let y = g.add(Op::Gather, &[table, ids]);
        g.g.add_output("y", y);
        // Integer ids: built here, not by `compare`'s random floats.
        let mut rng = Rng::new(seed);
        let idv: Vec<i32> = (0..b * l).map(|_| (rng.next_u64() % v as u64) as i32).collect();
        let tab: Vec<f32> = (0..v * d).map(|_| rng.normal() as f32).collect();
        let mut bind = Bindings::default();
        bind.inputs.insert("ids".into(), Array::new(vec![b, l], idv.iter().map(|&x| x as f64).collect()));
        bind.params.insert("table".into(), Array::new(vec![v, d], tab.iter().map(|&x| x as f64).collect()));
        let want = interp::run(&g.g, &bind).unwrap();
        let cpu = CpuGraph::compile(&g.g, &LowerOptions::default()).unwrap();
        let data = HashMap::from([("ids".to_string(), HostData::I32(idv))]);
        let params = HashMap::from([("table".to_string(), tab)]);
        let (got, _) = cpu.run(&[("B", b as i64), ("L", l as i64)], &data, &params, &HashMap::new()).unwrap();
        let exact: Vec<f32> = want.values[0].1.data.iter().map(|&x| x as f32).collect();
        prop_assert_eq!(&got[0].1, &exact);
    }

    #[test]
    fn causal_conv_with_state(b in 1usize..3, l in sizes(), c in sizes(), kw in 1usize..6, seed in any::<u64>()) {
        compare(&conv_graph(c, kw), &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn selective_scan_with_prologue(b in 1usize..3, l in sizes(), e in sizes(), n in prop::sample::select(vec![1usize, 4, 16]), seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let x = g.input("x", &[bd.clone(), ld.clone(), k(e)]);
        let dt_raw = g.input("dt", &[bd.clone(), ld.clone(), k(e)]);
        let dt_bias = g.param("dt_bias", &[k(e)]);
        let db = g.add(Op::Broadcast { shape: vec![bd.clone(), ld.clone(), k(e)] }, &[dt_bias]);
        let dsum = g.bin(BinaryOp::Add, dt_raw, db);
        let dt = g.un(UnaryOp::Softplus, dsum);
        let a_log = g.param("A_log", &[k(e), k(n)]);
        let ea = g.un(UnaryOp::Exp, a_log);
        let a = g.un(UnaryOp::Neg, ea);
        let bm = g.input("Bm", &[bd.clone(), ld.clone(), k(n)]);
        let cm = g.input("Cm", &[bd.clone(), ld.clone(), k(n)]);
        let h0 = g.state("h0", &[bd.clone(), k(e), k(n)]);
        let s = g.g.add(Op::SelectiveScan, &[x, dt, a, bm, cm, h0], Span::default(), None).unwrap();
        g.g.add_output("y", Value::new(s, 0));
        g.g.add_output("h1", Value::new(s, 1));
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn ssd_scan_grouped(b in 1usize..3, l in sizes(), heads_per_group in 1usize..3, groups in 1usize..3,
                        p in prop::sample::select(vec![1usize, 3, 8]), n in prop::sample::select(vec![1usize, 5, 16]), seed in any::<u64>()) {
        let mut g = G::new();
        let ops = ssd_operands(&mut g, heads_per_group * groups, groups, (p, n));
        let s = g.g.add(Op::SsdScan { chunk: 4 }, &ops, Span::default(), None).unwrap();
        g.g.add_output("y", Value::new(s, 0));
        g.g.add_output("s1", Value::new(s, 1));
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The residual add + RMSNorm row fusion and the conv -> silu epilogue, on random shapes.
    #[test]
    fn fused_norm_and_conv_epilogue(b in 1usize..3, l in sizes(), c in sizes(), kw in 1usize..5, seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let full = [bd.clone(), ld.clone(), k(c)];
        let x = g.input("x", &full);
        let y = g.input("y", &full);
        let h = g.bin(BinaryOp::Add, x, y);
        let sq = g.bin(BinaryOp::Mul, h, h);
        let ms = g.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![2] }, &[sq]);
        let eps = g.add(Op::Const { value: 1e-5, dtype: DType::F32 }, &[]);
        let epsb = g.add(Op::Broadcast { shape: vec![bd.clone(), ld.clone(), k(1)] }, &[eps]);
        let ms2 = g.bin(BinaryOp::Add, ms, epsb);
        let inv = g.un(UnaryOp::Rsqrt, ms2);
        let invb = g.add(Op::Broadcast { shape: full.to_vec() }, &[inv]);
        let w = g.param("w", &[k(c)]);
        let wb = g.add(Op::Broadcast { shape: full.to_vec() }, &[w]);
        let hn = g.bin(BinaryOp::Mul, h, invb);
        let normed = g.bin(BinaryOp::Mul, hn, wb);
        // The normalized value feeds a conv whose output goes through silu.
        let cw = g.param("cw", &[k(c), k(kw)]);
        let cb = g.param("cb", &[k(c)]);
        let s0 = g.state("s0", &[bd.clone(), k(c), k(kw - 1)]);
        let conv = g.g.add(Op::CausalConv1d, &[normed, cw, cb, s0], Span::default(), None).unwrap();
        let act = g.un(UnaryOp::Silu, Value::new(conv, 0));
        let act2 = g.bin(BinaryOp::Mul, act, act);
        let later = g.bin(BinaryOp::Add, h, act2);
        g.g.add_output("normed", normed);
        g.g.add_output("later", later);
        g.g.add_output("act", act);
        g.g.add_output("s1", Value::new(conv, 1));
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The loss and its gradient, with ignored rows; a logits scale up to 8 so rows are peaked.
    #[test]
    fn cross_entropy_and_grad(b in 1usize..3, l in sizes(), v in prop::sample::select(vec![1usize, 2, 5, 31, 97]),
                              scale in prop::sample::select(vec![1.0f64, 8.0]), seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let raw = g.input("logits", &[bd.clone(), ld.clone(), k(v)]);
        let sc = g.add(Op::Const { value: scale, dtype: DType::F32 }, &[]);
        let scb = g.add(Op::Broadcast { shape: vec![bd.clone(), ld.clone(), k(v)] }, &[sc]);
        let logits = g.bin(BinaryOp::Mul, raw, scb);
        let targets = g.add(
            Op::Input { name: "targets".into(), kind: InputKind::Data, ty: TensorType::new(DType::I32, vec![bd.clone(), ld.clone()]) },
            &[],
        );
        let dloss = g.input("dloss", &[bd.clone(), ld.clone()]);
        let ce = g.g.add(Op::CrossEntropy { ignore_index: -100 }, &[logits, targets], Span::default(), None).unwrap();
        let ceg = g.g.add(Op::CrossEntropyGrad { ignore_index: -100 }, &[logits, targets, dloss], Span::default(), None).unwrap();
        g.g.add_output("loss", Value::new(ce, 0));
        g.g.add_output("valid", Value::new(ce, 1));
        g.g.add_output("dlogits", Value::new(ceg, 0));
        compare_ids(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[], v as u64);
    }

    #[test]
    fn causal_conv_grad(b in 1usize..3, l in sizes(), c in sizes(), kw in 1usize..6, seed in any::<u64>()) {
        compare(&conv_grad_graph(c, kw), &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn selective_scan_grad(b in 1usize..3, l in sizes(), e in sizes(), n in prop::sample::select(vec![1usize, 4, 16]), seed in any::<u64>()) {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let ble = [bd.clone(), ld.clone(), k(e)];
        let x = g.input("x", &ble);
        let dt_raw = g.input("dt", &ble);
        let dt = g.un(UnaryOp::Softplus, dt_raw);
        let a_log = g.param("A_log", &[k(e), k(n)]);
        let ea = g.un(UnaryOp::Exp, a_log);
        let a = g.un(UnaryOp::Neg, ea);
        let bm = g.input("Bm", &[bd.clone(), ld.clone(), k(n)]);
        let cm = g.input("Cm", &[bd.clone(), ld.clone(), k(n)]);
        let h0 = g.state("h0", &[bd.clone(), k(e), k(n)]);
        let dy = g.input("dy", &ble);
        let dh1 = g.input("dh1", &[bd.clone(), k(e), k(n)]);
        let sg = g.g.add(Op::SelectiveScanGrad, &[x, dt, a, bm, cm, h0, dy, dh1], Span::default(), None).unwrap();
        for (r, name) in ["dx", "ddt", "dA", "dB", "dC", "dh0"].iter().enumerate() {
            g.g.add_output(*name, Value::new(sg, r as u16));
        }
        compare(&g.g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }

    #[test]
    fn ssd_scan_grad(b in 1usize..3, l in sizes(), heads_per_group in 1usize..3, groups in 1usize..3,
                     p in prop::sample::select(vec![1usize, 3, 8]), n in prop::sample::select(vec![1usize, 5, 16]), seed in any::<u64>()) {
        let g = ssd_grad_graph(heads_per_group * groups, groups, (p, n), 4);
        compare(&g, &[("B", b as i64), ("L", l as i64)], seed, REDUCTION, &[]);
    }
}

/// The operands of an SSD of `h` heads in `groups` groups, head width `p`, state size `n`:
/// `x`, `dt` (through softplus), `A = -exp(A_log)`, `B`, `C` and the state `s0`.
fn ssd_operands(g: &mut G, h: usize, groups: usize, (p, n): (usize, usize)) -> [Value; 6] {
    let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
    let x = g.input("x", &[bd.clone(), ld.clone(), k(h), k(p)]);
    let dt_raw = g.input("dt", &[bd.clone(), ld.clone(), k(h)]);
    let dt = g.un(UnaryOp::Softplus, dt_raw);
    let a_log = g.param("A_log", &[k(h)]);
    let ea = g.un(UnaryOp::Exp, a_log);
    let a = g.un(UnaryOp::Neg, ea);
    let bm = g.input("Bm", &[bd.clone(), ld.clone(), k(groups), k(n)]);
    let cm = g.input("Cm", &[bd.clone(), ld.clone(), k(groups), k(n)]);
    let s0 = g.state("s0", &[bd, k(h), k(p), k(n)]);
    [x, dt, a, bm, cm, s0]
}

/// `ssd_scan_grad` of `h` heads in `groups` groups, head width `p`, state size `n`, chunk
/// `chunk`, over [`ssd_operands`] and cotangent inputs: every cotangent an output.
fn ssd_grad_graph(h: usize, groups: usize, (p, n): (usize, usize), chunk: u64) -> Graph {
    let mut g = G::new();
    let mut ops = ssd_operands(&mut g, h, groups, (p, n)).to_vec();
    let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
    ops.push(g.input("dy", &[bd.clone(), ld, k(h), k(p)]));
    ops.push(g.input("ds1", &[bd, k(h), k(p), k(n)]));
    let sg =
        g.g.add(Op::SsdScanGrad { chunk }, &ops, Span::default(), None)
            .unwrap();
    for (r, name) in ["dx", "ddt", "dA", "dB", "dC", "ds0"].iter().enumerate() {
        g.g.add_output(*name, Value::new(sg, r as u16));
    }
    g.g
}

/// The SSD gradient with its tiled kernel (`LowerOptions::ssd_tiles`: `dM = dY Xᵀ` on bf16
/// tiles, `M'`, each head's `dCB` terms and the row and column sums of `T = dM ⊙ M` per
/// (batch, chunk, head), instead of three products) against the interpreter: partial last
/// chunks, grouped heads, `P` padded to the tile product's depth. `dM`'s operands are rounded
/// to bf16 (as the reference's `dout xᵀ`), so the outputs agree normwise to that rounding; a
/// chunk that is no multiple of 16 keeps the products, exact to f32 reductions.
#[test]
fn tiled_ssd_gradient_matches_the_interpreter() {
    let tiled = LowerOptions {
        ssd_tiles: true,
        ..LowerOptions::default()
    };
    for (h, groups, p, n, chunk, l) in [
        (4, 2, 8, 16, 16, 37),
        (3, 1, 5, 8, 32, 64),
        (2, 1, 16, 8, 16, 50),
        (2, 2, 4, 4, 2, 9),
        (2, 1, 3, 4, 5, 12),
    ] {
        let g = ssd_grad_graph(h, groups, (p, n), chunk);
        compare_tiled_ssd(&g, (h, p, chunk, l), &tiled);
    }
}

/// `g`'s outputs with `tiled` options against the interpreter: normwise within 1e-2 where
/// the tiled gradient runs (a chunk in multiples of 16), else to f32 reductions.
fn compare_tiled_ssd(g: &Graph, (h, p, chunk, l): (usize, usize, u64, i64), tiled: &LowerOptions) {
    let cpu = CpuGraph::compile(g, tiled).expect("compiles");
    let fits = chunk % 16 == 0;
    assert_eq!(
        cpu.lowered.kernels.iter().any(ir::tile::is_tiled),
        fits,
        "the tiled gradient kernel (chunk {chunk})"
    );
    let syms = [("B", 2), ("L", l)];
    if !fits {
        compare_lowered(g, &syms, 5, REDUCTION, &[], 1, tiled);
        return;
    }
    let (b, data, params, states) = random_values(g, &syms, 5, &[], 1);
    let want = interp::run(g, &b).expect("interpreter");
    let (got, _) = cpu.run(&syms, &data, &params, &states).expect("runs");
    for ((name, a), (_, e)) in got.iter().zip(&want.values) {
        let diff: f64 = a
            .iter()
            .zip(&e.data)
            .map(|(x, y)| (*x as f64 - y).powi(2))
            .sum();
        let norm: f64 = e.data.iter().map(|y| y.powi(2)).sum();
        let rel = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
        eprintln!("{name} (H {h}, P {p}, chunk {chunk}, L {l}): normwise {rel:.3e}");
        assert!(rel <= 1e-2, "{name}: normwise {rel:.3e}");
    }
}

/// The SSD's gradient lowered right after its forward reads the forward's chunk states,
/// copies and `C S_inᵀ` (`LastPrep`) instead of computing them again: the gradient has no
/// prep kernels of its own (one carry, its backward one), and every output, the forward's
/// and the gradient's, matches the interpreter as in the gradient alone; with tiles and
/// without.
/// The SSD gradient's kernels in `l` whose names end with `end`.
fn grad_kernels(l: &passes::Lowered, end: &str) -> usize {
    let names = l.kernels.iter().map(|k| k.name.as_str());
    names
        .filter(|n| n.starts_with("ssd_scan_grad_") && n.ends_with(end))
        .count()
}

#[test]
fn ssd_gradient_after_its_forward_matches_the_interpreter() {
    let tiled = LowerOptions {
        ssd_tiles: true,
        ..LowerOptions::default()
    };
    for (hpg, groups, p, n, chunk, l) in [(2, 2, 8, 16, 16, 37), (3, 1, 16, 8, 32, 64)] {
        let g = common::ssd_graph((hpg, groups, p, n), chunk);
        let l_cpu = CpuGraph::compile(&g, &tiled).expect("compiles").lowered;
        assert_eq!(
            grad_kernels(&l_cpu, "_carry"),
            0,
            "the gradient's prep carry"
        );
        assert_eq!(
            grad_kernels(&l_cpu, "_carry_back"),
            1,
            "the gradient's backward carry"
        );
        assert_eq!(grad_kernels(&l_cpu, "_x"), 0, "the gradient's copy of x");
        let h = (hpg * groups) as usize;
        compare_tiled_ssd(&g, (h, p as usize, chunk, l), &tiled);
        // Without tiles (the CPU's default) and f32 activations the gradient reads the
        // forward's f32 copy of x and forms only `dt ⊙ x` itself.
        let plain = LowerOptions::default();
        let l_plain = CpuGraph::compile(&g, &plain).expect("compiles").lowered;
        assert_eq!(
            grad_kernels(&l_plain, "_carry"),
            0,
            "the gradient's prep carry (no tiles)"
        );
        assert_eq!(
            grad_kernels(&l_plain, "_xdt"),
            1,
            "the gradient's dt ⊙ x (no tiles)"
        );
        compare_lowered(&g, &[("B", 2), ("L", l)], 5, REDUCTION, &[], 1, &plain);
    }
}

/// The SSD's carries as tiled kernels (`LowerOptions::tiled_carries`: a block per up to 256
/// state elements, rounds of 32 chunks in shared memory) against the interpreter: the
/// forward (its final state) and the gradient (its carries in both directions), with
/// partial rounds, blocks of 32 to 256 elements and several blocks per head; a `P·N` that
/// is no multiple of 32 keeps the per-element carry.
#[test]
fn tiled_carries_match_the_interpreter() {
    let opts = LowerOptions {
        tiled_carries: true,
        ..LowerOptions::default()
    };
    let tiled_carries = |g: &Graph| {
        let cpu = CpuGraph::compile(g, &opts).expect("compiles");
        cpu.lowered
            .kernels
            .iter()
            .filter(|k| k.name.contains("_carry") && ir::tile::is_tiled(k))
            .count()
    };
    for (h, groups, p, n, chunk, l) in [
        (2, 1, 8, 4, 2, 75),
        (3, 3, 4, 16, 4, 45),
        (2, 1, 16, 32, 2, 129),
        (2, 1, 3, 4, 2, 9),
    ] {
        let mut g = G::new();
        let ops = ssd_operands(&mut g, h, groups, (p, n));
        let s =
            g.g.add(Op::SsdScan { chunk }, &ops, Span::default(), None)
                .unwrap();
        g.g.add_output("y", Value::new(s, 0));
        g.g.add_output("s1", Value::new(s, 1));
        let fits = (p * n) % 32 == 0;
        assert_eq!(tiled_carries(&g.g), usize::from(fits), "forward {p} x {n}");
        compare_lowered(&g.g, &[("B", 2), ("L", l)], 7, REDUCTION, &[], 1, &opts);

        let g = ssd_grad_graph(h, groups, (p, n), chunk);
        assert_eq!(
            tiled_carries(&g),
            2 * usize::from(fits),
            "gradient {p} x {n}"
        );
        compare_lowered(&g, &[("B", 2), ("L", l)], 5, REDUCTION, &[], 1, &opts);
    }
}

#[test]
fn long_sequence_scan() {
    // A long sequence: errors of the recurrence must not grow with length.
    let mut g = G::new();
    let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
    let x = g.input("x", &[bd.clone(), ld.clone(), k(2), k(4)]);
    let dt_raw = g.input("dt", &[bd.clone(), ld.clone(), k(2)]);
    let dt = g.un(UnaryOp::Softplus, dt_raw);
    let a = g.param("A", &[k(2)]);
    let na = g.un(UnaryOp::Neg, a);
    let bm = g.input("Bm", &[bd.clone(), ld.clone(), k(1), k(8)]);
    let cm = g.input("Cm", &[bd.clone(), ld.clone(), k(1), k(8)]);
    let s0 = g.state("s0", &[bd.clone(), k(2), k(4), k(8)]);
    let s =
        g.g.add(
            Op::SsdScan { chunk: 64 },
            &[x, dt, na, bm, cm, s0],
            Span::default(),
            None,
        )
        .unwrap();
    g.g.add_output("y", Value::new(s, 0));
    compare(&g.g, &[("B", 1), ("L", 4099)], 3, REDUCTION, &["A"]);
}

/// The SSD forward as one tiled kernel (`LowerOptions::ssd_tiles`: tensor-core tile products
/// on bf16 operands, run as loops on the CPU) against the matrix form: partial last chunks,
/// grouped heads, a fused producer of `x` (read inside the kernel) and an epilogue of `y`.
/// The output agrees to bf16 operand rounding (normwise); the final state does not go
/// through tiles and is the same bits. Shapes the tile products cannot take (`P` not a
/// multiple of 8) keep the matrix form.
#[test]
fn tiled_ssd_forward_matches_the_matrix_form() {
    let graph = |p: usize, n: usize| {
        let mut g = G::new();
        let (bd, ld) = (Dim::sym("B"), Dim::sym("L"));
        let x_raw = g.input("x", &[bd.clone(), ld.clone(), k(4), k(p)]);
        let x = g.un(UnaryOp::Silu, x_raw);
        let dt_raw = g.input("dt", &[bd.clone(), ld.clone(), k(4)]);
        let dt = g.un(UnaryOp::Softplus, dt_raw);
        let a_log = g.param("A_log", &[k(4)]);
        let ea = g.un(UnaryOp::Exp, a_log);
        let a = g.un(UnaryOp::Neg, ea);
        let bm = g.input("Bm", &[bd.clone(), ld.clone(), k(2), k(n)]);
        let cm = g.input("Cm", &[bd.clone(), ld.clone(), k(2), k(n)]);
        let s0 = g.state("s0", &[bd.clone(), k(4), k(p), k(n)]);
        let s =
            g.g.add(
                Op::SsdScan { chunk: 32 },
                &[x, dt, a, bm, cm, s0],
                Span::default(),
                None,
            )
            .unwrap();
        let y = Value::new(s, 0);
        let y2 = g.bin(BinaryOp::Mul, y, y);
        g.g.add_output("y", y);
        g.g.add_output("y2", y2);
        g.g.add_output("s1", Value::new(s, 1));
        g.g
    };
    let tiled = LowerOptions {
        ssd_tiles: true,
        ..LowerOptions::default()
    };
    for (p, n, l, fits) in [
        (16, 32, 70, true),
        (8, 16, 96, true),
        (16, 32, 5, true),
        (3, 16, 40, false),
    ] {
        let g = graph(p, n);
        let syms = [("B", 2), ("L", l)];
        let (_, data, params, states) = random_values(&g, &syms, 7, &[], 1);
        let run = |opts: &LowerOptions| {
            let cpu = CpuGraph::compile(&g, opts).expect("compiles");
            let tiles = cpu.lowered.kernels.iter().any(ir::tile::is_tiled);
            let (out, _) = cpu.run(&syms, &data, &params, &states).expect("runs");
            (out, tiles)
        };
        let (want, plain) = run(&LowerOptions::default());
        let (got, with_tiles) = run(&tiled);
        assert!(!plain);
        assert_eq!(with_tiles, fits, "P = {p}, N = {n}");
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            if name == "s1" {
                assert_eq!(a, b, "the final state");
                continue;
            }
            let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
            let rel = (diff / norm).sqrt();
            let tol = if fits { 1e-2 } else { 0.0 };
            eprintln!("{name} (P = {p}, N = {n}, L = {l}): normwise {rel:.3e}");
            assert!(
                rel <= tol,
                "{name} (P = {p}, N = {n}, L = {l}): normwise {rel:.3e}"
            );
            if fits {
                assert!(rel > 0.0, "{name}: bf16 operands must show");
            }
        }
    }
}
