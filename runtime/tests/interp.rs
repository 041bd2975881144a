//! The f64 reference interpreter: every op on hand-computed cases, state continuity of the
//! stateful ops, symbol binding and errors, and the tiny library models end to end.

use ir::{
    BinaryOp, DType, Dim, Graph, Init, InputKind, Op, ReduceOp, Span, TensorType, UnaryOp, Value,
};
use runtime::array::{Array, round_to};
use runtime::interp::{Bindings, InterpError, run, run_values};
use std::collections::HashMap;

// ---------------------------------------------------------------------------------------------
// Helpers

fn d(n: u64) -> Dim {
    Dim::known(n)
}

fn s(name: &str) -> Dim {
    Dim::sym(name)
}

fn known(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&n| d(n as u64)).collect()
}

fn arr(shape: &[usize], data: &[f64]) -> Array {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    Array::new(shape.to_vec(), data.to_vec())
}

fn add(g: &mut Graph, op: Op, xs: &[Value]) -> Value {
    let n = g
        .add(op, xs, Span::default(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    Value::from(n)
}

fn input(g: &mut Graph, name: &str, dtype: DType, shape: Vec<Dim>) -> Value {
    let ty = TensorType::new(dtype, shape);
    let kind = InputKind::Data;
    add(
        g,
        Op::Input {
            name: name.into(),
            kind,
            ty,
        },
        &[],
    )
}

fn state(g: &mut Graph, name: &str, shape: Vec<Dim>) -> Value {
    let ty = TensorType::new(DType::F64, shape);
    let kind = InputKind::State;
    add(
        g,
        Op::Input {
            name: name.into(),
            kind,
            ty,
        },
        &[],
    )
}

fn param(g: &mut Graph, name: &str, shape: Vec<Dim>) -> Value {
    let ty = TensorType::new(DType::F64, shape);
    add(
        g,
        Op::Param {
            name: name.into(),
            ty,
            init: Init::Zeros,
        },
        &[],
    )
}

/// Applies `op` to data inputs of known shapes (f64, or the given dtype); all its results.
fn apply_typed(op: Op, args: &[(DType, &Array)]) -> Vec<Array> {
    let mut g = Graph::new("t");
    let mut b = Bindings::default();
    let mut xs = Vec::new();
    for (i, (dt, a)) in args.iter().enumerate() {
        let name = format!("a{i}");
        xs.push(input(&mut g, &name, *dt, known(&a.shape)));
        b.inputs.insert(name, (*a).clone());
    }
    let nres = op.num_results();
    let n = add(&mut g, op, &xs).node;
    for r in 0..nres {
        g.add_output(format!("r{r}"), Value::new(n, r as u16));
    }
    let out = run(&g, &b).unwrap_or_else(|e| panic!("{e}"));
    out.values.into_iter().map(|(_, a)| a).collect()
}

fn apply(op: Op, args: &[&Array]) -> Vec<Array> {
    let typed: Vec<(DType, &Array)> = args.iter().map(|a| (DType::F64, *a)).collect();
    apply_typed(op, &typed)
}

fn apply1(op: Op, args: &[&Array]) -> Array {
    apply(op, args).remove(0)
}

/// A xorshift64* generator: deterministic test data without dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn array(&mut self, shape: &[usize], lo: f64, hi: f64) -> Array {
        let n = shape.iter().product();
        Array::new(
            shape.to_vec(),
            (0..n).map(|_| self.uniform(lo, hi)).collect(),
        )
    }
}

/// `a[.., start..start+len, ..]` along `axis` (test-side slicing, independent of the op).
fn slice_axis(a: &Array, axis: usize, start: usize, len: usize) -> Array {
    let outer: usize = a.shape[..axis].iter().product();
    let inner: usize = a.shape[axis + 1..].iter().product();
    let n = a.shape[axis];
    let mut data = Vec::new();
    for o in 0..outer {
        data.extend_from_slice(&a.data[(o * n + start) * inner..(o * n + start + len) * inner]);
    }
    let mut shape = a.shape.clone();
    shape[axis] = len;
    Array::new(shape, data)
}

/// Joins arrays along `axis` (test side).
fn join_axis(parts: &[Array], axis: usize) -> Array {
    let outer: usize = parts[0].shape[..axis].iter().product();
    let inner: usize = parts[0].shape[axis + 1..].iter().product();
    let mut data = Vec::new();
    for o in 0..outer {
        for p in parts {
            let c = p.shape[axis] * inner;
            data.extend_from_slice(&p.data[o * c..(o + 1) * c]);
        }
    }
    let mut shape = parts[0].shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    Array::new(shape, data)
}

fn max_diff(a: &Array, b: &Array) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
}

fn assert_bits(a: &Array, b: &Array, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

#[test]
fn unary_ops() {
    let x = arr(&[4], &[0.0, 1.0, 4.0, -2.0]);
    let cases: [(UnaryOp, [f64; 4]); 9] = [
        (UnaryOp::Neg, [-0.0, -1.0, -4.0, 2.0]),
        (UnaryOp::Exp, [1.0, 1f64.exp(), 4f64.exp(), (-2f64).exp()]),
        (UnaryOp::Log, [f64::NEG_INFINITY, 0.0, 4f64.ln(), f64::NAN]),
        (UnaryOp::Sqrt, [0.0, 1.0, 2.0, f64::NAN]),
        (UnaryOp::Rsqrt, [f64::INFINITY, 1.0, 0.5, f64::NAN]),
        (UnaryOp::Recip, [f64::INFINITY, 1.0, 0.25, -0.5]),
        (
            UnaryOp::Softplus,
            [
                1f64.ln_1p(),
                1f64.exp().ln_1p(),
                4f64.exp().ln_1p(),
                (-2f64).exp().ln_1p(),
            ],
        ),
        (
            UnaryOp::Silu,
            [
                0.0,
                1.0 / (1.0 + (-1f64).exp()),
                4.0 * (1.0 / (1.0 + (-4f64).exp())),
                {
                    let e = (-2f64).exp();
                    -2.0 * (e / (1.0 + e))
                },
            ],
        ),
        (
            UnaryOp::Sigmoid,
            [
                0.5,
                1.0 / (1.0 + (-1f64).exp()),
                1.0 / (1.0 + (-4f64).exp()),
                {
                    let e = (-2f64).exp();
                    e / (1.0 + e)
                },
            ],
        ),
    ];
    for (op, want) in cases {
        let got = apply1(Op::Unary(op), &[&x]);
        for (g, w) in got.data.iter().zip(want) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{}: {:?} vs {want:?}",
                op.name(),
                got.data
            );
        }
    }
    // softplus: x itself above 20, and no overflow far out.
    let big = arr(&[3], &[20.5, 800.0, -800.0]);
    assert_eq!(
        apply1(Op::Unary(UnaryOp::Softplus), &[&big]).data,
        vec![20.5, 800.0, 0.0]
    );
    let sig = apply1(Op::Unary(UnaryOp::Sigmoid), &[&big]).data;
    assert_eq!(sig, vec![1.0 / (1.0 + (-20.5f64).exp()), 1.0, 0.0]);
}

#[test]
fn binary_ops() {
    let l = arr(&[2, 2], &[1.0, -2.0, 3.0, 8.0]);
    let r = arr(&[2, 2], &[4.0, 5.0, -6.0, 2.0]);
    let cases: [(BinaryOp, [f64; 4]); 6] = [
        (BinaryOp::Add, [5.0, 3.0, -3.0, 10.0]),
        (BinaryOp::Sub, [-3.0, -7.0, 9.0, 6.0]),
        (BinaryOp::Mul, [4.0, -10.0, -18.0, 16.0]),
        (BinaryOp::Div, [0.25, -0.4, -0.5, 4.0]),
        (BinaryOp::Max, [4.0, 5.0, 3.0, 8.0]),
        (BinaryOp::Min, [1.0, -2.0, -6.0, 2.0]),
    ];
    for (op, want) in cases {
        let got = apply1(Op::Binary(op), &[&l, &r]);
        assert_eq!(got.shape, vec![2, 2]);
        assert_eq!(got.data, want.to_vec(), "{}", op.name());
    }
}

#[test]
fn cast_rounds_to_the_target_dtype() {
    let x = arr(&[4], &[0.1, 1.0 + 2f64.powi(-10), 2.6, -1e-300]);
    let f32s = apply1(Op::Cast { to: DType::F32 }, &[&x]);
    assert_eq!(
        f32s.data,
        vec![
            0.1f32 as f64,
            (1.0 + 2f64.powi(-10)) as f32 as f64,
            2.6f32 as f64,
            -0.0
        ]
    );
    let bf = apply1(Op::Cast { to: DType::BF16 }, &[&x]);
    assert_eq!(bf.data[1], 1.0); // 8 bits of mantissa
    assert_eq!(bf.data[0], round_to(DType::BF16, 0.1));
    let i = apply1(Op::Cast { to: DType::I32 }, &[&x]);
    assert_eq!(&i.data[2..], &[3.0, -0.0]);
    let same = apply1(Op::Cast { to: DType::F64 }, &[&x]);
    assert_eq!(same, x);
}

// ---------------------------------------------------------------------------------------------
// Reductions and matmul

#[test]
fn reductions_keep_axes() {
    // x[i, j, k] = 100 i + 10 j + k, shape [2, 3, 2]
    let mut data = Vec::new();
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..2 {
                data.push((100 * i + 10 * j + k) as f64);
            }
        }
    }
    let x = arr(&[2, 3, 2], &data);
    let r = |op, axes: &[usize]| {
        apply1(
            Op::Reduce {
                op,
                axes: axes.to_vec(),
            },
            &[&x],
        )
    };

    let s1 = r(ReduceOp::Sum, &[1]);
    assert_eq!(s1.shape, vec![2, 1, 2]);
    assert_eq!(s1.data, vec![30.0, 33.0, 330.0, 333.0]);
    let m02 = r(ReduceOp::Mean, &[0, 2]);
    assert_eq!(m02.shape, vec![1, 3, 1]);
    assert_eq!(m02.data, vec![50.5, 60.5, 70.5]);
    let mx = r(ReduceOp::Max, &[2, 0]);
    assert_eq!(mx.shape, vec![1, 3, 1]);
    assert_eq!(mx.data, vec![101.0, 111.0, 121.0]);
    let all = r(ReduceOp::Sum, &[0, 1, 2]);
    assert_eq!((all.shape, all.data), (vec![1, 1, 1], vec![726.0]));
    assert_eq!(r(ReduceOp::Max, &[]), x);

    // max: NaN wins, and negatives are not beaten by the -inf start.
    let y = arr(&[2, 2], &[-3.0, f64::NAN, -5.0, -4.0]);
    let m = apply1(
        Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![1],
        },
        &[&y],
    );
    assert!(m.data[0].is_nan());
    assert_eq!(m.data[1], -4.0);
}

#[test]
fn matmul_plain_transposed_and_batched() {
    let a = arr(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = arr(&[3, 2], &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
    let want = vec![58.0, 64.0, 139.0, 154.0];
    let c = apply1(Op::MatMul { rhs_t: false }, &[&a, &b]);
    assert_eq!(
        (c.shape.clone(), c.data.clone()),
        (vec![2, 2], want.clone())
    );
    let bt = arr(&[2, 3], &[7.0, 9.0, 11.0, 8.0, 10.0, 12.0]);
    assert_eq!(apply1(Op::MatMul { rhs_t: true }, &[&a, &bt]), c);

    // lhs [2, 2, 3] with a shared 2-D rhs [N=2, K=3] (rhs_t).
    let a3 = arr(
        &[2, 2, 3],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    );
    let c3 = apply1(Op::MatMul { rhs_t: true }, &[&a3, &bt]);
    assert_eq!(c3.shape, vec![2, 2, 2]);
    assert_eq!(
        c3.data,
        vec![58.0, 64.0, 139.0, 154.0, 7.0, 8.0, 11.0, 12.0]
    );

    // Batched rhs [2, 3, 1]: each batch its own.
    let rb = arr(&[2, 3, 1], &[1.0, 1.0, 1.0, 1.0, 2.0, 3.0]);
    let cb = apply1(Op::MatMul { rhs_t: false }, &[&a3, &rb]);
    assert_eq!(cb.shape, vec![2, 2, 1]);
    assert_eq!(cb.data, vec![6.0, 15.0, 1.0, 3.0]);
}

// ---------------------------------------------------------------------------------------------
// Layout

fn iota(shape: &[usize]) -> Array {
    let n: usize = shape.iter().product();
    Array::new(shape.to_vec(), (0..n).map(|i| i as f64).collect())
}

#[test]
fn reshape_keeps_data() {
    let x = iota(&[2, 3]);
    let r = apply1(
        Op::Reshape {
            shape: known(&[3, 1, 2]),
        },
        &[&x],
    );
    assert_eq!((r.shape, r.data), (vec![3, 1, 2], x.data.clone()));

    // Symbolic: [B, L, 2] -> [B*L, 2] with B = 2, L = 3.
    let mut g = Graph::new("t");
    let v = input(&mut g, "x", DType::F64, vec![s("B"), s("L"), d(2)]);
    let bl = s("B").mul(&s("L")).unwrap();
    let r = add(
        &mut g,
        Op::Reshape {
            shape: vec![bl, d(2)],
        },
        &[v],
    );
    g.add_output("r", r);
    let mut b = Bindings::default();
    b.inputs.insert("x".into(), iota(&[2, 3, 2]));
    let out = run(&g, &b).unwrap();
    assert_eq!(out.values[0].1, Array::new(vec![6, 2], iota(&[12]).data));
}

#[test]
fn permute_moves_axes() {
    let x = iota(&[2, 3, 4]);
    let p = apply1(
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[&x],
    );
    assert_eq!(p.shape, vec![4, 2, 3]);
    for i in 0..4 {
        for j in 0..2 {
            for k in 0..3 {
                // result[i, j, k] = x[j, k, i]
                assert_eq!(p.data[(i * 2 + j) * 3 + k], x.data[(j * 3 + k) * 4 + i]);
            }
        }
    }
    let t = apply1(Op::Permute { perm: vec![1, 0] }, &[&iota(&[2, 3])]);
    assert_eq!(t.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn broadcast_right_aligned() {
    let v = arr(&[3], &[1.0, 2.0, 3.0]);
    let b = apply1(
        Op::Broadcast {
            shape: known(&[2, 3]),
        },
        &[&v],
    );
    assert_eq!(b.data, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let c = arr(&[2, 1], &[1.0, 2.0]);
    let b = apply1(
        Op::Broadcast {
            shape: known(&[2, 2, 3]),
        },
        &[&c],
    );
    assert_eq!(b.shape, vec![2, 2, 3]);
    assert_eq!(b.data, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0].repeat(2));

    // A scalar const to a symbolic shape.
    let mut g = Graph::new("t");
    let x = input(&mut g, "x", DType::F64, vec![s("B"), d(2)]);
    let k = add(
        &mut g,
        Op::Const {
            value: 1.5,
            dtype: DType::F64,
        },
        &[],
    );
    let kb = add(
        &mut g,
        Op::Broadcast {
            shape: vec![s("B"), d(2)],
        },
        &[k],
    );
    let y = add(&mut g, Op::Binary(BinaryOp::Mul), &[x, kb]);
    g.add_output("y", y);
    let mut b = Bindings::default();
    b.inputs
        .insert("x".into(), arr(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    let out = run(&g, &b).unwrap();
    assert_eq!(
        out.get("y").unwrap().data,
        vec![1.5, 3.0, 4.5, 6.0, 7.5, 9.0]
    );
}

#[test]
fn slice_and_concat() {
    let x = iota(&[2, 4]);
    let sl = apply1(
        Op::Slice {
            axis: 1,
            start: 1,
            len: 2,
        },
        &[&x],
    );
    assert_eq!((sl.shape, sl.data), (vec![2, 2], vec![1.0, 2.0, 5.0, 6.0]));
    let sl0 = apply1(
        Op::Slice {
            axis: 0,
            start: 1,
            len: 1,
        },
        &[&x],
    );
    assert_eq!(sl0.data, vec![4.0, 5.0, 6.0, 7.0]);

    let a = arr(&[2, 1], &[1.0, 2.0]);
    let b = arr(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    let c = arr(&[2, 1], &[7.0, 8.0]);
    let cat1 = apply1(Op::Concat { axis: 1 }, &[&a, &b, &c]);
    assert_eq!(cat1.shape, vec![2, 4]);
    assert_eq!(cat1.data, vec![1.0, 3.0, 4.0, 7.0, 2.0, 5.0, 6.0, 8.0]);
    let cat0 = apply1(Op::Concat { axis: 0 }, &[&b, &b]);
    assert_eq!(cat0.shape, vec![4, 2]);
    assert_eq!(cat0.data, [3.0, 4.0, 5.0, 6.0].repeat(2));
    assert_eq!(apply1(Op::Concat { axis: 0 }, &[&a]), a);
}

#[test]
fn gather_rows() {
    let table = arr(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let ids = arr(&[2, 2], &[2.0, 0.0, 1.0, 2.0]);
    let out = apply_typed(Op::Gather, &[(DType::F64, &table), (DType::I32, &ids)]).remove(0);
    assert_eq!(out.shape, vec![2, 2, 2]);
    assert_eq!(out.data, vec![20.0, 21.0, 0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
}

// ---------------------------------------------------------------------------------------------
// causal_conv1d

fn conv(x: &Array, w: &Array, b: &Array, s0: &Array) -> (Array, Array) {
    let mut r = apply(Op::CausalConv1d, &[x, w, b, s0]);
    let s1 = r.remove(1);
    (r.remove(0), s1)
}

#[test]
fn conv_by_hand() {
    // B=1, L=3, C=2, K=3; state = the 2 inputs before x.
    let x = arr(&[1, 3, 2], &[1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
    let w = arr(&[2, 3], &[1.0, 2.0, 3.0, 0.5, 0.0, -1.0]);
    let b = arr(&[2], &[100.0, 0.0]);
    let s0 = arr(&[1, 2, 2], &[-2.0, -1.0, -20.0, -10.0]);
    let (y, s1) = conv(&x, &w, &b, &s0);
    // channel 0 sees [-2, -1, 1, 2, 3]; y_t = 100 + 1*xx[t] + 2*xx[t+1] + 3*xx[t+2]
    // channel 1 sees [-20, -10, 10, 20, 30]; y_t = 0.5*xx[t] - xx[t+2]
    let y0 = [
        100.0 - 2.0 - 2.0 + 3.0,
        100.0 - 1.0 + 2.0 + 6.0,
        100.0 + 1.0 + 4.0 + 9.0,
    ];
    let y1 = [-10.0 - 10.0, -5.0 - 20.0, 5.0 - 30.0];
    assert_eq!(y.data, vec![y0[0], y1[0], y0[1], y1[1], y0[2], y1[2]]);
    assert_eq!(s1.shape, vec![1, 2, 2]);
    assert_eq!(s1.data, vec![2.0, 3.0, 20.0, 30.0]);

    // L = 1 < K-1: the new state mixes the old state and x.
    let x1 = arr(&[1, 1, 2], &[5.0, 50.0]);
    let (y, s1) = conv(&x1, &w, &b, &s0);
    assert_eq!(y.data, vec![100.0 - 2.0 - 2.0 + 15.0, -10.0 - 50.0]);
    assert_eq!(s1.data, vec![-1.0, 5.0, -10.0, 50.0]);
}

#[test]
fn conv_kernel_width_one_has_an_empty_state() {
    let x = arr(&[2, 2, 1], &[1.0, 2.0, 3.0, 4.0]);
    let w = arr(&[1, 1], &[3.0]);
    let b = arr(&[1], &[0.5]);
    let s0 = Array::zeros(vec![2, 1, 0]);
    let (y, s1) = conv(&x, &w, &b, &s0);
    assert_eq!(y.data, vec![3.5, 6.5, 9.5, 12.5]);
    assert_eq!((s1.shape, s1.data.len()), (vec![2, 1, 0], 0));
}

/// Runs a stateful op over `x`'s time axis cut at `cuts`, carrying the state; returns the
/// joined outputs and the final state.
fn segmented(
    op: &Op,
    seq: &[&Array],
    fixed: &[&Array],
    fixed_at: &[usize],
    s0: &Array,
    cuts: &[usize],
) -> (Array, Array) {
    let l = seq[0].shape[1];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(l);
    let mut state = s0.clone();
    let mut ys = Vec::new();
    for w in bounds.windows(2) {
        let parts: Vec<Array> = seq
            .iter()
            .map(|a| slice_axis(a, 1, w[0], w[1] - w[0]))
            .collect();
        let mut args: Vec<&Array> = Vec::new();
        let (mut si, mut fi) = (0, 0);
        for slot in 0..op.arity().unwrap() - 1 {
            if fixed_at.contains(&slot) {
                args.push(fixed[fi]);
                fi += 1;
            } else {
                args.push(&parts[si]);
                si += 1;
            }
        }
        args.push(&state);
        let mut r = apply(op.clone(), &args);
        state = r.remove(1);
        ys.push(r.remove(0));
    }
    (join_axis(&ys, 1), state)
}

#[test]
fn conv_segments_equal_one_run() {
    let mut rng = Rng(7);
    let (bn, l, c, k) = (2, 7, 3, 4);
    let x = rng.array(&[bn, l, c], -1.0, 1.0);
    let w = rng.array(&[c, k], -1.0, 1.0);
    let b = rng.array(&[c], -1.0, 1.0);
    let s0 = rng.array(&[bn, c, k - 1], -1.0, 1.0);
    let (y, s1) = conv(&x, &w, &b, &s0);
    for cuts in [&[2][..], &[3], &[5], &[1, 2, 4, 6], &[1, 2, 3, 4, 5, 6]] {
        let (ys, ss) = segmented(&Op::CausalConv1d, &[&x], &[&w, &b], &[1, 2], &s0, cuts);
        assert_bits(&ys, &y, &format!("conv y, cuts {cuts:?}"));
        assert_bits(&ss, &s1, &format!("conv state, cuts {cuts:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// selective_scan and ssd_scan

#[test]
fn selective_scan_by_hand() {
    // B=1, L=2, E=1, N=2; A = [0, ln 0.5] so the decays are 1 and (about) 0.5 at dt = 1.
    let x = arr(&[1, 2, 1], &[2.0, 3.0]);
    let dt = arr(&[1, 2, 1], &[1.0, 0.5]);
    let a = arr(&[1, 2], &[0.0, -2.0]);
    let bm = arr(&[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let cm = arr(&[1, 2, 2], &[1.0, 1.0, 2.0, -1.0]);
    let h0 = arr(&[1, 1, 2], &[10.0, 20.0]);
    let mut r = apply(Op::SelectiveScan, &[&x, &dt, &a, &bm, &cm, &h0]);
    // t=0: h = [1*10 + 2*1, e^-2*20 + 2*2]; y = h0 + h1
    let h_0 = [12.0, (-2f64).exp() * 20.0 + 4.0];
    // t=1: dt*x = 1.5; h = [12 + 4.5, e^-1*h_0[1] + 6]; y = 2 h0 - h1
    let h_1 = [16.5, (-1f64).exp() * h_0[1] + 6.0];
    assert_eq!(r[0].data, vec![h_0[0] + h_0[1], 2.0 * h_1[0] - h_1[1]]);
    assert_eq!(r.remove(1).data, h_1.to_vec());
}

/// An independent SSD reference: time outermost, the whole state `[B, H, P, N]` at once.
fn naive_ssd(
    x: &Array,
    dt: &Array,
    a: &Array,
    bm: &Array,
    cm: &Array,
    s0: &Array,
) -> (Array, Array) {
    let [bn, l, hn, p] = <[usize; 4]>::try_from(x.shape.as_slice()).unwrap();
    let (g, n) = (bm.shape[2], bm.shape[3]);
    let at4 = |arr: &Array, i: [usize; 4]| {
        let sh = &arr.shape;
        arr.data[((i[0] * sh[1] + i[1]) * sh[2] + i[2]) * sh[3] + i[3]]
    };
    let mut st = s0.clone();
    let mut y = Array::zeros(vec![bn, l, hn, p]);
    for t in 0..l {
        for b in 0..bn {
            for h in 0..hn {
                let grp = h * g / hn; // == h / (H / G)
                let dtv = dt.data[(b * l + t) * hn + h];
                for pi in 0..p {
                    let xv = at4(x, [b, t, h, pi]);
                    let mut acc = 0.0;
                    for ni in 0..n {
                        let si = ((b * hn + h) * p + pi) * n + ni;
                        st.data[si] = (dtv * a.data[h]).exp() * st.data[si]
                            + dtv * xv * at4(bm, [b, t, grp, ni]);
                        acc += st.data[si] * at4(cm, [b, t, grp, ni]);
                    }
                    y.data[((b * l + t) * hn + h) * p + pi] = acc;
                }
            }
        }
    }
    (y, st)
}

struct SsdCase {
    x: Array,
    dt: Array,
    a: Array,
    bm: Array,
    cm: Array,
    s0: Array,
}

fn ssd_case(seed: u64, bn: usize, l: usize, hn: usize, p: usize, g: usize, n: usize) -> SsdCase {
    let mut rng = Rng(seed);
    SsdCase {
        x: rng.array(&[bn, l, hn, p], -1.0, 1.0),
        dt: rng.array(&[bn, l, hn], 0.01, 0.5),
        a: rng.array(&[hn], -4.0, -0.5),
        bm: rng.array(&[bn, l, g, n], -1.0, 1.0),
        cm: rng.array(&[bn, l, g, n], -1.0, 1.0),
        s0: rng.array(&[bn, hn, p, n], -1.0, 1.0),
    }
}

#[test]
fn ssd_scan_matches_a_naive_reference_with_groups() {
    for (g, seed) in [(1, 1), (2, 2), (4, 3)] {
        let c = ssd_case(seed, 2, 5, 4, 3, g, 2);
        let op = Op::SsdScan { chunk: 2 };
        let r = apply(op, &[&c.x, &c.dt, &c.a, &c.bm, &c.cm, &c.s0]);
        let (y, s1) = naive_ssd(&c.x, &c.dt, &c.a, &c.bm, &c.cm, &c.s0);
        assert!(max_diff(&r[0], &y) <= 1e-14, "y, groups {g}");
        assert!(max_diff(&r[1], &s1) <= 1e-14, "state, groups {g}");
    }
    // The groups matter: with G = 2, heads 0-1 read group 0 and heads 2-3 group 1, so
    // changing group 1's B leaves heads 0-1 alone and changes heads 2-3.
    let c = ssd_case(9, 1, 3, 4, 2, 2, 2);
    let op = Op::SsdScan { chunk: 8 };
    let r = apply(op.clone(), &[&c.x, &c.dt, &c.a, &c.bm, &c.cm, &c.s0]);
    let mut bm2 = c.bm.clone();
    for t in 0..3 {
        for ni in 0..2 {
            bm2.data[(t * 2 + 1) * 2 + ni] += 1.0;
        }
    }
    let r2 = apply(op, &[&c.x, &c.dt, &c.a, &bm2, &c.cm, &c.s0]);
    for t in 0..3 {
        for h in 0..4 {
            for pi in 0..2 {
                let i = (t * 4 + h) * 2 + pi;
                assert_eq!(r[0].data[i] == r2[0].data[i], h < 2, "t {t} head {h}");
            }
        }
    }
}

#[test]
fn ssd_scan_is_selective_scan_with_one_channel_per_head() {
    // H = E heads of P = 1, G = 1 group, A[e, n] = A[e] for every n.
    let (bn, l, e, n) = (2, 6, 3, 4);
    let c = ssd_case(5, bn, l, e, 1, 1, n);
    let y_ssd = apply(
        Op::SsdScan { chunk: 4 },
        &[&c.x, &c.dt, &c.a, &c.bm, &c.cm, &c.s0],
    );
    let x = Array::new(vec![bn, l, e], c.x.data.clone());
    let a = Array::new(
        vec![e, n],
        c.a.data.iter().flat_map(|&v| vec![v; n]).collect(),
    );
    let bm = Array::new(vec![bn, l, n], c.bm.data.clone());
    let cm = Array::new(vec![bn, l, n], c.cm.data.clone());
    let h0 = Array::new(vec![bn, e, n], c.s0.data.clone());
    let y_sel = apply(Op::SelectiveScan, &[&x, &c.dt, &a, &bm, &cm, &h0]);
    assert_bits(
        &Array::new(vec![bn, l, e], y_ssd[0].data.clone()),
        &y_sel[0],
        "y",
    );
    assert_bits(
        &Array::new(vec![bn, e, n], y_ssd[1].data.clone()),
        &y_sel[1],
        "state",
    );
}

#[test]
fn scan_segments_equal_one_run() {
    let mut rng = Rng(11);
    let (bn, l, e, n) = (2, 7, 3, 4);
    let x = rng.array(&[bn, l, e], -1.0, 1.0);
    let dt = rng.array(&[bn, l, e], 0.01, 0.5);
    let a = rng.array(&[e, n], -3.0, -0.1);
    let bm = rng.array(&[bn, l, n], -1.0, 1.0);
    let cm = rng.array(&[bn, l, n], -1.0, 1.0);
    let h0 = rng.array(&[bn, e, n], -1.0, 1.0);
    let whole = apply(Op::SelectiveScan, &[&x, &dt, &a, &bm, &cm, &h0]);
    let c = ssd_case(12, bn, l, 4, 2, 2, n);
    let ssd = Op::SsdScan { chunk: 3 };
    let whole_ssd = apply(ssd.clone(), &[&c.x, &c.dt, &c.a, &c.bm, &c.cm, &c.s0]);
    for cuts in [&[1][..], &[3], &[2, 5], &[1, 2, 3, 4, 5, 6]] {
        let seq = [&x, &dt, &bm, &cm];
        let (y, s) = segmented(&Op::SelectiveScan, &seq, &[&a], &[2], &h0, cuts);
        assert_bits(&y, &whole[0], &format!("selective y, cuts {cuts:?}"));
        assert_bits(&s, &whole[1], &format!("selective state, cuts {cuts:?}"));
        let seq = [&c.x, &c.dt, &c.bm, &c.cm];
        let (y, s) = segmented(&ssd, &seq, &[&c.a], &[2], &c.s0, cuts);
        assert_bits(&y, &whole_ssd[0], &format!("ssd y, cuts {cuts:?}"));
        assert_bits(&s, &whole_ssd[1], &format!("ssd state, cuts {cuts:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Bindings, symbols, memory and errors

/// `y = gather(emb, ids) * broadcast(w)`, plus a state `[B, 2]` passed through `+ 0`.
fn small_graph() -> Graph {
    let mut g = Graph::new("small");
    let ids = input(&mut g, "ids", DType::I32, vec![s("B"), s("L")]);
    let emb = param(&mut g, "emb", known(&[5, 2]));
    let w = param(&mut g, "w", known(&[2]));
    let st = state(&mut g, "st", vec![s("B"), d(2)]);
    let e = add(&mut g, Op::Gather, &[emb, ids]);
    let wb = add(
        &mut g,
        Op::Broadcast {
            shape: vec![s("B"), s("L"), d(2)],
        },
        &[w],
    );
    let y = add(&mut g, Op::Binary(BinaryOp::Mul), &[e, wb]);
    let st2 = add(&mut g, Op::Binary(BinaryOp::Add), &[st, st]);
    g.add_output("y", y);
    g.add_output("st", st2);
    g
}

fn small_bindings() -> Bindings {
    let mut b = Bindings::default();
    b.inputs
        .insert("ids".into(), arr(&[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 0.0]));
    b.params.insert("emb".into(), iota(&[5, 2]));
    b.params.insert("w".into(), arr(&[2], &[1.0, -1.0]));
    b
}

#[test]
fn missing_states_are_zeros_and_given_ones_are_used() {
    let g = small_graph();
    let mut b = small_bindings();
    let out = run(&g, &b).unwrap();
    assert_eq!(
        out.values
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["y", "st"]
    );
    assert_eq!(out.get("st").unwrap(), &Array::zeros(vec![3, 2]));
    assert_eq!(out.get("y").unwrap().shape, vec![3, 2, 2]);
    assert_eq!(&out.get("y").unwrap().data[..4], &[0.0, -1.0, 2.0, -3.0]);
    b.states.insert("st".into(), iota(&[3, 2]));
    let out = run(&g, &b).unwrap();
    assert_eq!(
        out.get("st").unwrap().data,
        vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    );

    // run_values keeps every node, and agrees with run.
    let all = run_values(&g, &b).unwrap();
    assert_eq!(all.len(), g.len());
    assert_eq!(&all[6][0], out.get("y").unwrap());
    assert_eq!(all[0][0], b.inputs["ids"]);
}

fn err(g: &Graph, b: &Bindings) -> InterpError {
    match run(g, b) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn missing_and_unknown_bindings() {
    let g = small_graph();
    let mut b = small_bindings();
    b.params.remove("w");
    let e = err(&g, &b);
    assert!(
        matches!(&e, InterpError::Missing { kind: "param", name, .. } if name == "w"),
        "{e}"
    );
    assert_eq!(e.to_string(), "missing param `w` (%2)");

    let mut b = small_bindings();
    b.inputs.remove("ids");
    let e = err(&g, &b);
    assert!(
        matches!(&e, InterpError::Missing { kind: "input", name, .. } if name == "ids"),
        "{e}"
    );

    let mut b = small_bindings();
    b.inputs.insert("st".into(), Array::zeros(vec![3, 2]));
    let e = err(&g, &b);
    assert_eq!(
        e.to_string(),
        "the graph has no input `st` (it is a state; pass it in `states`)"
    );
    let mut b = small_bindings();
    b.params.insert("embb".into(), Array::zeros(vec![1]));
    assert!(matches!(
        err(&g, &b),
        InterpError::Unknown {
            kind: "param",
            actual: None,
            ..
        }
    ));

    let mut b = small_bindings();
    b.params.insert(
        "w".into(),
        Array {
            shape: vec![3],
            data: vec![1.0],
        },
    );
    assert!(matches!(
        err(&g, &b),
        InterpError::MalformedArray {
            expected: 3,
            found: 1,
            ..
        }
    ));
}

#[test]
fn param_shapes_must_match_exactly() {
    let g = small_graph();
    let mut b = small_bindings();
    b.params.insert("emb".into(), iota(&[2, 5]));
    let e = err(&g, &b);
    assert!(
        matches!(&e, InterpError::ParamShape { name, expected, found, .. }
            if name == "emb" && expected == &[5, 2] && found == &[2, 5]),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "param `emb` (%1) has shape [2, 5] but the graph declares [5, 2]"
    );
}

#[test]
fn symbols_bind_once() {
    let g = small_graph();
    // B = 3 from ids; the state says B = 2.
    let mut b = small_bindings();
    b.states.insert("st".into(), Array::zeros(vec![2, 2]));
    let e = err(&g, &b);
    assert_eq!(
        e.to_string(),
        "state `st` (%3) has shape [2, 2] but the graph expects [B, 2] with B = 3"
    );
    let mut b = small_bindings();
    b.states.insert("st".into(), Array::zeros(vec![3, 3]));
    assert!(matches!(err(&g, &b), InterpError::InputShape { .. }));
    let mut b = small_bindings();
    b.inputs.insert("ids".into(), Array::zeros(vec![6]));
    assert!(matches!(err(&g, &b), InterpError::InputShape { .. }));

    // The brief's example: a second input disagrees with the first on B.
    let mut g = Graph::new("t");
    let _ = input(&mut g, "mask", DType::F64, vec![s("B")]);
    let _ = input(&mut g, "ids", DType::I32, vec![s("B"), s("L")]);
    let mut b = Bindings::default();
    b.inputs.insert("mask".into(), Array::zeros(vec![3]));
    b.inputs.insert("ids".into(), Array::zeros(vec![2, 5]));
    assert_eq!(
        err(&g, &b).to_string(),
        "input `ids` (%1) has shape [2, 5] but the graph expects [B, L] with B = 3"
    );

    // Products: [B, 2*L] binds L by division; [B*L] then checks.
    let mut g = Graph::new("t");
    let two_l = d(2).mul(&s("L")).unwrap();
    let bl = s("B").mul(&s("L")).unwrap();
    let x = input(&mut g, "x", DType::F64, vec![bl.clone()]);
    let _ = input(&mut g, "y", DType::F64, vec![s("B"), two_l]);
    g.add_output("x", x);
    let mut b = Bindings::default();
    b.inputs.insert("x".into(), Array::zeros(vec![12]));
    b.inputs.insert("y".into(), Array::zeros(vec![3, 8]));
    assert!(run(&g, &b).is_ok());
    b.inputs.insert("y".into(), Array::zeros(vec![3, 7]));
    assert!(matches!(err(&g, &b), InterpError::InputShape { .. }));
    b.inputs.insert("y".into(), Array::zeros(vec![2, 8]));
    assert!(matches!(err(&g, &b), InterpError::InputShape { .. }));

    // B*L alone cannot be split.
    let mut g = Graph::new("t");
    let _ = input(&mut g, "x", DType::F64, vec![bl]);
    let mut b = Bindings::default();
    b.inputs.insert("x".into(), Array::zeros(vec![12]));
    assert!(matches!(
        err(&g, &b),
        InterpError::Unresolved { axis: 0, .. }
    ));

    // A symbol only a missing state has.
    let mut g = Graph::new("t");
    let st = state(&mut g, "st", vec![s("S")]);
    g.add_output("st", st);
    let e = err(&g, &Bindings::default());
    assert!(
        matches!(&e, InterpError::UnboundSymbol { symbol, .. } if symbol == "S"),
        "{e}"
    );
}

#[test]
fn gather_ids_must_be_in_range() {
    let g = small_graph();
    let mut b = small_bindings();
    b.inputs
        .insert("ids".into(), arr(&[3, 2], &[0.0, 1.0, 2.0, 3.0, 5.0, 0.0]));
    let e = err(&g, &b);
    assert!(
        matches!(&e, InterpError::IdOutOfRange { position, value, vocab: 5, .. }
            if position == &[2, 0] && *value == 5.0),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "%4 `gather`: id 5 at position [2, 0] is not an integer in [0, 5)"
    );
    for bad in [-1.0, 1.5, f64::NAN] {
        b.inputs
            .insert("ids".into(), arr(&[3, 2], &[0.0, bad, 2.0, 3.0, 4.0, 0.0]));
        assert!(
            matches!(err(&g, &b), InterpError::IdOutOfRange { .. }),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tiny library models end to end

fn load(name: &str) -> Graph {
    let path = format!("{}/tests/data/{name}.ir", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    ir::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn inv_softplus(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

/// Deterministic parameters that follow each initializer (ones/zeros get a little noise so
/// that norms and skips are exercised).
fn params(g: &Graph, seed: u64) -> HashMap<String, Array> {
    let mut rng = Rng(seed);
    let mut out = HashMap::new();
    for n in g.params() {
        let Op::Param { name, ty, init } = g.op(n) else {
            unreachable!()
        };
        let shape: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| d.as_known().unwrap() as usize)
            .collect();
        let len: usize = shape.iter().product();
        let last = *shape.last().unwrap_or(&1);
        let data = (0..len)
            .map(|i| match *init {
                Init::Zeros => rng.uniform(-0.1, 0.1),
                Init::Ones => 1.0 + rng.uniform(-0.1, 0.1),
                Init::Normal { std } => std * (0..12).map(|_| rng.unit()).sum::<f64>() - 6.0 * std,
                Init::Uniform { lo, hi } => rng.uniform(lo, hi),
                Init::ALogArange => ((i % last) as f64 + 1.0).ln(),
                Init::ALogUniform { lo, hi } => rng.uniform(lo, hi).ln(),
                Init::DtBias { min, max, floor } => {
                    inv_softplus(rng.uniform(min.ln(), max.ln()).exp().max(floor))
                }
            })
            .collect();
        out.insert(name.clone(), Array::new(shape, data));
    }
    out
}

fn state_names(g: &Graph) -> Vec<String> {
    g.nodes()
        .filter_map(|n| match g.op(n) {
            Op::Input {
                name,
                kind: InputKind::State,
                ..
            } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Runs the model over `ids` cut at `cuts` along time, feeding each segment's final states to
/// the next; returns the joined logits and the last states.
fn run_segments(
    g: &Graph,
    params: &HashMap<String, Array>,
    ids: &Array,
    cuts: &[usize],
) -> (Array, HashMap<String, Array>) {
    let l = ids.shape[1];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(l);
    let mut b = Bindings {
        params: params.clone(),
        ..Bindings::default()
    };
    let mut logits = Vec::new();
    for w in bounds.windows(2) {
        b.inputs
            .insert("input_ids".into(), slice_axis(ids, 1, w[0], w[1] - w[0]));
        let out = run(g, &b).unwrap_or_else(|e| panic!("{e}"));
        b.states.clear();
        for (name, a) in out.values {
            if name == "logits" {
                logits.push(a);
            } else {
                b.states.insert(name, a);
            }
        }
    }
    (join_axis(&logits, 1), b.states)
}

fn end_to_end(name: &str, vocab: usize) {
    let t0 = std::time::Instant::now();
    let g = load(name);
    let params = params(&g, 42);
    let (bn, l) = (2, 8);
    let mut rng = Rng(3);
    let ids_data: Vec<f64> = (0..bn * l).map(|_| (rng.next() % 61) as f64).collect();
    let ids = Array::new(vec![bn, l], ids_data);

    let (logits, states) = run_segments(&g, &params, &ids, &[]);
    assert_eq!(logits.shape, vec![bn, l, vocab]);
    assert!(
        logits.data.iter().all(|v| v.is_finite()),
        "{name}: non-finite logits"
    );
    let spread = logits.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(spread > 1e-6, "{name}: logits are all about zero");
    let names = state_names(&g);
    assert_eq!(states.len(), names.len());
    for s in &names {
        assert!(
            states[s].data.iter().all(|v| v.is_finite()),
            "{name}: state {s}"
        );
        assert!(
            states[s].data.iter().any(|v| *v != 0.0),
            "{name}: state {s} stayed zero"
        );
    }
    let whole_time = t0.elapsed();

    for cuts in [&[2][..], &[5], &[1, 2, 3, 4, 5, 6, 7]] {
        let (seg, seg_states) = run_segments(&g, &params, &ids, cuts);
        let diff = max_diff(&seg, &logits);
        println!("{name}: cuts {cuts:?}: max |logits diff| = {diff:e}");
        assert!(
            diff <= 1e-12,
            "{name}: cuts {cuts:?}: logits differ by {diff:e}"
        );
        for s in &names {
            let diff = max_diff(&seg_states[s], &states[s]);
            assert!(
                diff <= 1e-12,
                "{name}: cuts {cuts:?}: state {s} differs by {diff:e}"
            );
        }
    }

    // Batch rows are independent: row 1 alone gives row 1's logits.
    let (one, _) = run_segments(&g, &params, &slice_axis(&ids, 0, 1, 1), &[]);
    assert!(max_diff(&one, &slice_axis(&logits, 0, 1, 1)) <= 1e-12);
    println!(
        "{name}: whole run {whole_time:?}, all checks {:?}",
        t0.elapsed()
    );
}

#[test]
fn tiny_mamba_end_to_end() {
    end_to_end("tiny-mamba", 64);
}

#[test]
fn tiny_mamba2_end_to_end() {
    end_to_end("tiny-mamba2", 64);
}
