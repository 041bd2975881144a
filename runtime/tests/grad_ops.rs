//! The backward and loss ops in the reference interpreter: every vector-Jacobian product
//! agrees with central finite differences of the forward op (f64, eps 1e-6, tolerance
//! `|a - e| <= 1e-5 + 1e-3 |e|` from RELIABILITY.md), for every element of every operand,
//! initial states included, with random cotangents for every result (final states included).
//! Plus the cross-entropy forward values and its errors.

use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, Value};
use runtime::array::Array;
use runtime::interp::{Bindings, InterpError, run};

const EPS: f64 = 1e-6;
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-3;

/// A xorshift64* generator: deterministic test data without dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }

    fn array(&mut self, shape: &[usize], lo: f64, hi: f64) -> Array {
        let n = shape.iter().product();
        Array::new(
            shape.to_vec(),
            (0..n).map(|_| self.uniform(lo, hi)).collect(),
        )
    }
}

/// Applies `op` to data inputs of known shapes and the given dtypes; all its results.
fn eval(op: &Op, args: &[(DType, &Array)]) -> Result<Vec<Array>, InterpError> {
    let mut g = Graph::new("t");
    let mut b = Bindings::default();
    let mut xs = Vec::new();
    for (i, (dtype, a)) in args.iter().enumerate() {
        let name = format!("a{i}");
        let shape = a.shape.iter().map(|&n| Dim::known(n as u64)).collect();
        let input = Op::Input {
            name: name.clone(),
            kind: InputKind::Data,
            ty: TensorType::new(*dtype, shape),
        };
        let n = g
            .add(input, &[], Span::default(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        xs.push(Value::from(n));
        b.inputs.insert(name, (*a).clone());
    }
    let n = g
        .add(op.clone(), &xs, Span::default(), None)
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    for r in 0..op.num_results() {
        g.add_output(format!("r{r}"), Value::new(n, r as u16));
    }
    Ok(run(&g, &b)?.values.into_iter().map(|(_, a)| a).collect())
}

fn eval_ok(op: &Op, args: &[(DType, &Array)]) -> Vec<Array> {
    eval(op, args).unwrap_or_else(|e| panic!("{}: {e}", op.name()))
}

fn dot(a: &Array, b: &Array) -> f64 {
    assert_eq!(a.shape, b.shape);
    a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
}

/// A VJP to check: `grad(args ++ cots[..grad_cots])` returns the cotangents of the operands
/// `wrt` (in that order) of `fwd(args)` for the objective `sum_r <cots[r], fwd(args)[r]>`.
struct Case {
    fwd: Op,
    grad: Op,
    args: Vec<(DType, Array)>,
    wrt: Vec<usize>,
    cots: Vec<Array>,
    grad_cots: usize,
}

impl Case {
    fn objective(&self, args: &[(DType, Array)]) -> f64 {
        let refs: Vec<(DType, &Array)> = args.iter().map(|(t, a)| (*t, a)).collect();
        let outs = eval_ok(&self.fwd, &refs);
        assert_eq!(outs.len(), self.cots.len());
        outs.iter().zip(&self.cots).map(|(o, c)| dot(c, o)).sum()
    }

    fn check(&self, label: &str) {
        let mut gargs: Vec<(DType, &Array)> = self.args.iter().map(|(t, a)| (*t, a)).collect();
        for c in &self.cots[..self.grad_cots] {
            gargs.push((DType::F64, c));
        }
        let grads = eval_ok(&self.grad, &gargs);
        assert_eq!(grads.len(), self.wrt.len(), "{label}: result count");
        for (&operand, got) in self.wrt.iter().zip(&grads) {
            let name = self.fwd.operand_names()[operand];
            assert_eq!(
                got.shape, self.args[operand].1.shape,
                "{label}: shape of d{name}"
            );
            let mut args = self.args.clone();
            let want: Vec<f64> = (0..got.data.len())
                .map(|i| {
                    let x = self.args[operand].1.data[i];
                    args[operand].1.data[i] = x + EPS;
                    let plus = self.objective(&args);
                    args[operand].1.data[i] = x - EPS;
                    let minus = self.objective(&args);
                    args[operand].1.data[i] = x;
                    (plus - minus) / (2.0 * EPS)
                })
                .collect();
            assert_close(&format!("{label}: d{name}"), &got.data, &want);
        }
    }
}

/// `|a - e| <= ATOL + RTOL |e|`; false when either is NaN.
fn within(a: f64, e: f64) -> bool {
    (a - e).abs() <= ATOL + RTOL * e.abs()
}

/// [`within`] everywhere; prints max and mean |diff| and the worst index
/// before failing.
fn assert_close(label: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    let diffs: Vec<f64> = got.iter().zip(want).map(|(a, e)| (a - e).abs()).collect();
    let bad = got.iter().zip(want).position(|(&a, &e)| !within(a, e));
    if let Some(i) = bad {
        let (worst, max) = diffs
            .iter()
            .enumerate()
            .fold((0, 0.0f64), |(wi, m), (j, &d)| {
                if d > m || d.is_nan() { (j, d) } else { (wi, m) }
            });
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        panic!(
            "{label}: element {i}: vjp {} vs finite difference {}; max |diff| {max:e} at {worst} \
             ({} vs {}), mean |diff| {mean:e}",
            got[i], want[i], got[worst], want[worst]
        );
    }
}

fn f64s(arrays: Vec<Array>) -> Vec<(DType, Array)> {
    arrays.into_iter().map(|a| (DType::F64, a)).collect()
}

#[test]
fn causal_conv1d_grad_matches_finite_differences() {
    let (b, l, c) = (2, 5, 3);
    for (seed, k) in [(1u64, 1usize), (2, 2), (3, 4)] {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        let args = f64s(vec![
            rng.array(&[b, l, c], -1.0, 1.0),
            rng.array(&[c, k], -1.0, 1.0),
            rng.array(&[c], -1.0, 1.0),
            rng.array(&[b, c, k - 1], -1.0, 1.0),
        ]);
        let cots = vec![
            rng.array(&[b, l, c], -1.0, 1.0),
            rng.array(&[b, c, k - 1], -1.0, 1.0),
        ];
        Case {
            fwd: Op::CausalConv1d,
            grad: Op::CausalConv1dGrad,
            args,
            wrt: vec![0, 1, 2, 3],
            cots,
            grad_cots: 2,
        }
        .check(&format!("causal_conv1d K={k}"));
    }
}

#[test]
fn causal_conv1d_grad_sends_the_state_cotangent_to_the_inputs_it_keeps() {
    // With dy = 0, only ds1 flows back: s1 is the last K-1 entries of [s0 ; x].
    let (b, l, c, k) = (1, 2, 1, 4);
    let x = Array::new(vec![b, l, c], vec![1.0, 2.0]);
    let w = Array::new(vec![c, k], vec![1.0; 4]);
    let bias = Array::new(vec![c], vec![0.0]);
    let s0 = Array::new(vec![b, c, k - 1], vec![0.0; 3]);
    let dy = Array::zeros(vec![b, l, c]);
    let ds1 = Array::new(vec![b, c, k - 1], vec![10.0, 20.0, 30.0]);
    let f = |a: &Array| (DType::F64, a.clone());
    let args: Vec<(DType, Array)> = [&x, &w, &bias, &s0, &dy, &ds1].map(f).to_vec();
    let refs: Vec<(DType, &Array)> = args.iter().map(|(t, a)| (*t, a)).collect();
    let r = eval_ok(&Op::CausalConv1dGrad, &refs);
    // [s0 ; x] = [s0_0, s0_1, s0_2, x_0, x_1]; s1 = [s0_2, x_0, x_1].
    assert_eq!(r[0].data, vec![20.0, 30.0], "dx");
    assert_eq!(r[3].data, vec![0.0, 0.0, 10.0], "ds0");
    assert_eq!(r[1].data, vec![0.0; 4], "dw");
    assert_eq!(r[2].data, vec![0.0], "db");
}

#[test]
fn selective_scan_grad_matches_finite_differences() {
    let (b, l, e, n) = (2, 5, 3, 2);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let args = f64s(vec![
        rng.array(&[b, l, e], -1.0, 1.0),
        rng.array(&[b, l, e], 0.05, 0.8), // dt > 0, as after softplus
        rng.array(&[e, n], -1.5, -0.2),   // A = -exp(A_log) < 0
        rng.array(&[b, l, n], -1.0, 1.0),
        rng.array(&[b, l, n], -1.0, 1.0),
        rng.array(&[b, e, n], -1.0, 1.0),
    ]);
    let cots = vec![
        rng.array(&[b, l, e], -1.0, 1.0),
        rng.array(&[b, e, n], -1.0, 1.0),
    ];
    Case {
        fwd: Op::SelectiveScan,
        grad: Op::SelectiveScanGrad,
        args,
        wrt: vec![0, 1, 2, 3, 4, 5],
        cots,
        grad_cots: 2,
    }
    .check("selective_scan");
}

#[test]
fn ssd_scan_grad_matches_finite_differences() {
    let (b, l, h, p, n) = (2, 5, 4, 2, 3);
    for g in [1, 2] {
        let mut rng = Rng(0x94D0_49BB_1331_11EB ^ g as u64);
        let args = f64s(vec![
            rng.array(&[b, l, h, p], -1.0, 1.0),
            rng.array(&[b, l, h], 0.05, 0.8),
            rng.array(&[h], -1.5, -0.2),
            rng.array(&[b, l, g, n], -1.0, 1.0),
            rng.array(&[b, l, g, n], -1.0, 1.0),
            rng.array(&[b, h, p, n], -1.0, 1.0),
        ]);
        let cots = vec![
            rng.array(&[b, l, h, p], -1.0, 1.0),
            rng.array(&[b, h, p, n], -1.0, 1.0),
        ];
        Case {
            fwd: Op::SsdScan { chunk: 2 },
            grad: Op::SsdScanGrad { chunk: 2 },
            args,
            wrt: vec![0, 1, 2, 3, 4, 5],
            cots,
            grad_cots: 2,
        }
        .check(&format!("ssd_scan G={g}"));
    }
}

/// Targets `[2, 5]` in `[0, 7)` with position `[1, 2]` ignored (-100).
fn targets(rng: &mut Rng) -> Array {
    let mut t: Vec<f64> = (0..10).map(|_| (rng.next() % 7) as f64).collect();
    t[7] = -100.0;
    Array::new(vec![2, 5], t)
}

#[test]
fn cross_entropy_grad_matches_finite_differences() {
    let mut rng = Rng(0xBF58_476D_1CE4_E5B9);
    let logits = rng.array(&[2, 5, 7], -3.0, 3.0);
    let t = targets(&mut rng);
    let cots = vec![rng.array(&[2, 5], -1.0, 1.0), rng.array(&[2, 5], -1.0, 1.0)];
    let case = Case {
        fwd: Op::CrossEntropy { ignore_index: -100 },
        grad: Op::CrossEntropyGrad { ignore_index: -100 },
        args: vec![(DType::F64, logits), (DType::I64, t)],
        wrt: vec![0],
        cots,
        // `valid` does not depend on the logits: only `dloss` is passed.
        grad_cots: 1,
    };
    case.check("cross_entropy");
    // The ignored row of the gradient is exactly zero.
    let mut gargs: Vec<(DType, &Array)> = case.args.iter().map(|(d, a)| (*d, a)).collect();
    gargs.push((DType::F64, &case.cots[0]));
    let dlogits = eval_ok(&case.grad, &gargs).remove(0);
    assert!(dlogits.data[7 * 7..8 * 7].iter().all(|&v| v == 0.0));
    assert!(dlogits.data[..7].iter().any(|&v| v != 0.0));
}

#[test]
fn cross_entropy_values_and_mask() {
    // Row 0: logits [1, 2, 3], target 2; row 1: ignored; row 2: huge logits stay finite.
    let logits = Array::new(
        vec![3, 3],
        vec![1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 1000.0, 0.0, -1000.0],
    );
    let t = Array::new(vec![3], vec![2.0, 4.0, 1.0]);
    let out = eval_ok(
        &Op::CrossEntropy { ignore_index: 4 },
        &[(DType::F32, &logits), (DType::I32, &t)],
    );
    let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
    assert!(
        (out[0].data[0] - (lse0 - 3.0)).abs() < 1e-12,
        "{:?}",
        out[0]
    );
    assert_eq!(out[0].data[1], 0.0);
    assert!((out[0].data[2] - 1000.0).abs() < 1e-9, "{:?}", out[0]);
    assert_eq!(out[1].data, vec![1.0, 0.0, 1.0]);
    assert_eq!(out[0].shape, vec![3]);

    // The gradient of row 0 is softmax - onehot, scaled by dloss; its entries sum to 0.
    let dloss = Array::new(vec![3], vec![2.0, 5.0, 1.0]);
    let d = eval_ok(
        &Op::CrossEntropyGrad { ignore_index: 4 },
        &[
            (DType::F32, &logits),
            (DType::I32, &t),
            (DType::F32, &dloss),
        ],
    )
    .remove(0);
    let soft = |j: i32| (f64::from(j + 1) - lse0).exp();
    for j in 0..3 {
        let want = 2.0 * (soft(j) - if j == 2 { 1.0 } else { 0.0 });
        assert!((d.data[j as usize] - want).abs() < 1e-12);
    }
    assert_eq!(&d.data[3..6], &[0.0; 3]);
    assert!(d.data[6..].iter().all(|v| v.is_finite()));
    assert!(
        (d.data[7] + 1.0).abs() < 1e-12,
        "target 1 of row 2: softmax 0 - 1"
    );
}

#[test]
fn cross_entropy_rejects_targets_outside_the_vocabulary() {
    let logits = Array::zeros(vec![2, 3, 4]);
    for bad in [4.0, -1.0, 1.5] {
        let mut t = Array::zeros(vec![2, 3]);
        t.data[4] = bad; // position [1, 1]
        for op in [
            Op::CrossEntropy { ignore_index: -100 },
            Op::CrossEntropyGrad { ignore_index: -100 },
        ] {
            let dloss = Array::zeros(vec![2, 3]);
            let mut args = vec![(DType::F64, &logits), (DType::I64, &t)];
            if matches!(op, Op::CrossEntropyGrad { .. }) {
                args.push((DType::F64, &dloss));
            }
            let err = eval(&op, &args).expect_err("target out of range");
            match &err {
                InterpError::IdOutOfRange {
                    position,
                    value,
                    vocab,
                    ..
                } => {
                    assert_eq!(position, &vec![1, 1]);
                    assert_eq!(*value, bad);
                    assert_eq!(*vocab, 4);
                }
                other => panic!("{other}"),
            }
            assert!(err.to_string().contains("position [1, 1]"), "{err}");
            assert!(err.to_string().contains(op.name()), "{err}");
        }
    }
}
