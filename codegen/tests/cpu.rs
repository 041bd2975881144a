//! The Cranelift backend against the kernel IR's reference evaluator
//! (`ir::kernel::eval::run` in f32 mode), in both compile modes (with and without bounds
//! checks).

use codegen::cpu::{CodegenError, CpuKernel, CpuModule, CpuOptions, KArg, bytes_of, bytes_of_mut};
use half::{bf16, f16};
use ir::kernel::{ArrId, Expr, IExpr, KBuf, Kernel, LoopId, Stmt, VarId, eval};
use ir::{BinaryOp, DType, UnaryOp};
use proptest::prelude::*;
use std::time::Instant;

mod common;

// ---------- building kernels ----------

fn kb(name: &str, dtype: DType, writable: bool) -> KBuf {
    KBuf {
        name: name.into(),
        dtype,
        writable,
    }
}
fn g(i: usize) -> IExpr {
    IExpr::Grid(i)
}
fn sz(i: usize) -> IExpr {
    IExpr::Size(i)
}
fn c(n: i64) -> IExpr {
    IExpr::Const(n)
}
fn lp(i: u32) -> IExpr {
    IExpr::Loop(LoopId(i))
}
fn ld(buf: usize, index: IExpr) -> Expr {
    Expr::Load { buf, index }
}
fn fc(x: f64) -> Expr {
    Expr::Const(x)
}
fn var(i: u32) -> Expr {
    Expr::Var(VarId(i))
}
fn un(op: UnaryOp, a: Expr) -> Expr {
    Expr::un(op, a)
}
fn add(a: Expr, b: Expr) -> Expr {
    Expr::bin(BinaryOp::Add, a, b)
}
fn mul(a: Expr, b: Expr) -> Expr {
    Expr::bin(BinaryOp::Mul, a, b)
}
fn store(buf: usize, index: IExpr, value: Expr) -> Stmt {
    Stmt::Store { buf, index, value }
}
fn for_(i: u32, extent: IExpr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        counter: LoopId(i),
        extent,
        body,
    }
}
fn kernel(
    name: &str,
    bufs: Vec<KBuf>,
    sizes: &[&str],
    grid: Vec<IExpr>,
    body: Vec<Stmt>,
) -> Kernel {
    Kernel {
        name: name.into(),
        bufs,
        sizes: sizes.iter().map(|s| s.to_string()).collect(),
        grid,
        body,
    }
}

// ---------- storage ----------

fn quantize(d: DType, x: f64) -> f64 {
    match d {
        DType::F64 => x,
        DType::F32 => x as f32 as f64,
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::I32 => x as i32 as f64,
        DType::I64 => x as i64 as f64,
    }
}

/// The evaluator stores f32 values; a real f16/bf16 buffer rounds once more, from f32.
fn quantize_store(d: DType, x: f64) -> f64 {
    match d {
        DType::F16 => f16::from_f32(x as f32).to_f64(),
        DType::BF16 => bf16::from_f32(x as f32).to_f64(),
        _ => x,
    }
}

fn encode(d: DType, v: &[f64]) -> Vec<u8> {
    match d {
        DType::F64 => bytes_of(v).to_vec(),
        DType::F32 => bytes_of(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).to_vec(),
        DType::F16 => bytes_of(&v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>()).to_vec(),
        DType::BF16 => bytes_of(&v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>()).to_vec(),
        DType::I32 => bytes_of(&v.iter().map(|&x| x as i32).collect::<Vec<_>>()).to_vec(),
        DType::I64 => bytes_of(&v.iter().map(|&x| x as i64).collect::<Vec<_>>()).to_vec(),
    }
}

fn decode(d: DType, b: &[u8]) -> Vec<f64> {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| c.try_into().expect("chunk"))
    }
    match d {
        DType::F64 => chunks::<8>(b).map(f64::from_ne_bytes).collect(),
        DType::F32 => chunks::<4>(b)
            .map(|c| f32::from_ne_bytes(c) as f64)
            .collect(),
        DType::F16 => chunks::<2>(b)
            .map(|c| f16::from_ne_bytes(c).to_f64())
            .collect(),
        DType::BF16 => chunks::<2>(b)
            .map(|c| bf16::from_ne_bytes(c).to_f64())
            .collect(),
        DType::I32 => chunks::<4>(b)
            .map(|c| i32::from_ne_bytes(c) as f64)
            .collect(),
        DType::I64 => chunks::<8>(b)
            .map(|c| i64::from_ne_bytes(c) as f64)
            .collect(),
    }
}

fn close(a: f64, e: f64, atol: f64, rtol: f64) -> bool {
    (a.is_nan() && e.is_nan()) || a == e || (a - e).abs() <= atol + rtol * e.abs()
}

/// Deterministic pseudo-random values in `[lo, hi)`.
fn values(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

fn compile_with(k: &Kernel, opts: CpuOptions) -> CpuKernel {
    let mut m = CpuModule::with_options(opts).expect("module");
    m.compile(k).unwrap_or_else(|e| panic!("{e}\n{k}"))
}

fn compile(k: &Kernel, checked: bool) -> CpuKernel {
    compile_with(
        k,
        CpuOptions {
            bounds_checks: checked,
            ..CpuOptions::default()
        },
    )
}

/// The option sets every hand-written kernel is checked in, with the tolerance each gets:
/// with `exact_math` the backend must reproduce the evaluator's f32 mode bit for bit.
const MODES: [(CpuOptions, f64, f64); 3] = [
    (
        CpuOptions {
            bounds_checks: false,
            exact_math: false,
        },
        1e-6,
        1e-6,
    ),
    (
        CpuOptions {
            bounds_checks: true,
            exact_math: false,
        },
        1e-6,
        1e-6,
    ),
    (
        CpuOptions {
            bounds_checks: false,
            exact_math: true,
        },
        0.0,
        0.0,
    ),
];

/// Runs `k` through the JIT (given chunking) and returns the decoded buffers.
fn run_jit(
    ck: &CpuKernel,
    sizes: &[i64],
    inputs: &[Vec<f64>],
    chunk: Option<i64>,
) -> Vec<Vec<f64>> {
    let k = ck.kernel().clone();
    let mut bytes: Vec<Vec<u8>> = k
        .bufs
        .iter()
        .zip(inputs)
        .map(|(b, v)| encode(b.dtype, v))
        .collect();
    let mut args: Vec<KArg<'_>> = bytes
        .iter_mut()
        .zip(&k.bufs)
        .map(|(b, kb)| {
            if kb.writable {
                KArg::Out(b)
            } else {
                KArg::In(b)
            }
        })
        .collect();
    ck.run_chunked(&mut args, sizes, chunk)
        .unwrap_or_else(|e| panic!("{e}\n{k}"));
    drop(args);
    k.bufs
        .iter()
        .zip(&bytes)
        .map(|(b, v)| decode(b.dtype, v))
        .collect()
}

/// The evaluator's result, with inputs and outputs rounded to the buffers' storage.
fn run_eval(k: &Kernel, sizes: &[i64], inputs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut bufs: Vec<Vec<f64>> = k
        .bufs
        .iter()
        .zip(inputs)
        .map(|(b, v)| v.iter().map(|&x| quantize(b.dtype, x)).collect())
        .collect();
    eval::run(k, sizes, &mut bufs, true).unwrap_or_else(|e| panic!("{e}\n{k}"));
    for (b, v) in k.bufs.iter().zip(&mut bufs) {
        if b.writable {
            v.iter_mut().for_each(|x| *x = quantize_store(b.dtype, *x));
        }
    }
    bufs
}

fn assert_bufs(k: &Kernel, got: &[Vec<f64>], want: &[Vec<f64>], atol: f64, rtol: f64, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len());
        for (j, (a, e)) in g.iter().zip(w).enumerate() {
            assert!(
                close(*a, *e, atol, rtol),
                "{what}: kernel `{}` b{i}[{j}]: jit {a:e} vs evaluator {e:e}\n{k}",
                k.name
            );
        }
    }
}

/// Compiles `k` with and without bounds checks, runs it serially and in chunks, and compares
/// every buffer with the evaluator.
fn check(k: &Kernel, sizes: &[i64], inputs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let want = run_eval(k, sizes, inputs);
    for (opts, atol, rtol) in MODES {
        let ck = compile_with(k, opts);
        for chunk in [None, Some(1), Some(7)] {
            let got = run_jit(&ck, sizes, inputs, chunk);
            let what = format!("{opts:?} chunk={chunk:?}");
            assert_bufs(k, &got, &want, atol, rtol, &what);
        }
    }
    want
}

// ---------- hand-written kernels ----------

/// `out[b,l,e] = f(x[b,l,e], w[e], bias[l])` over a 3-d grid, and the same over a 1-d grid
/// whose coordinates come from Div/Rem.
#[test]
fn elementwise_broadcast_chain() {
    use UnaryOp::*;
    let body = |idx: IExpr, e: IExpr, l: IExpr| {
        let x = ld(0, idx.clone());
        let pos = add(mul(x.clone(), x.clone()), fc(1.0));
        let v = add(
            un(Silu, mul(x.clone(), ld(1, e))),
            mul(un(Sigmoid, ld(2, l)), un(Softplus, x.clone())),
        );
        let v = add(v, un(Log, un(Exp, x.clone())));
        let v = add(v, mul(un(Sqrt, pos.clone()), un(Rsqrt, pos.clone())));
        let v = Expr::bin(BinaryOp::Sub, v, un(Recip, pos.clone()));
        let v = Expr::bin(BinaryOp::Div, v, un(Neg, pos));
        let v = Expr::bin(
            BinaryOp::Max,
            Expr::bin(BinaryOp::Min, v, fc(2.5)),
            fc(-2.5),
        );
        vec![store(3, idx.clone(), v), store(4, idx, un(Exp, x))]
    };
    let bufs = vec![
        kb("x", DType::F32, false),
        kb("w", DType::F32, false),
        kb("bias", DType::F32, false),
        kb("out", DType::F32, true),
        kb("out_bf16", DType::BF16, true),
    ];
    let idx3 = g(0).mul(sz(1)).add(g(1)).mul(sz(2)).add(g(2));
    let k3 = kernel(
        "ew3",
        bufs.clone(),
        &["B", "L", "E"],
        vec![sz(0), sz(1), sz(2)],
        body(idx3, g(2), g(1)),
    );
    let k1 = kernel(
        "ew1",
        bufs,
        &["B", "L", "E"],
        vec![sz(0).mul(sz(1)).mul(sz(2))],
        body(g(0), g(0).rem(sz(2)), g(0).div(sz(2)).rem(sz(1))),
    );
    let (b, l, e) = (2i64, 3i64, 37i64);
    let n = (b * l * e) as usize;
    let inputs = vec![
        values(1, n, -4.0, 4.0),
        values(2, e as usize, -2.0, 2.0),
        values(3, l as usize, -3.0, 3.0),
        vec![0.0; n],
        vec![0.0; n],
    ];
    let r3 = check(&k3, &[b, l, e], &inputs);
    let r1 = check(&k1, &[b, l, e], &inputs);
    assert_eq!(r3, r1);
}

/// `out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w`: For + Var + FromIndex.
#[test]
fn rmsnorm_rows() {
    let row = |i: IExpr| g(0).mul(sz(1)).add(i);
    let k = kernel(
        "rmsnorm",
        vec![
            kb("x", DType::F32, false),
            kb("w", DType::F32, false),
            kb("out", DType::F32, true),
        ],
        &["R", "D"],
        vec![sz(0)],
        vec![
            Stmt::Var {
                var: VarId(0),
                init: fc(0.0),
            },
            for_(
                0,
                sz(1),
                vec![Stmt::Set {
                    var: VarId(0),
                    value: add(var(0), mul(ld(0, row(lp(0))), ld(0, row(lp(0))))),
                }],
            ),
            Stmt::Var {
                var: VarId(1),
                init: un(
                    UnaryOp::Rsqrt,
                    add(
                        Expr::bin(BinaryOp::Div, var(0), Expr::FromIndex(sz(1))),
                        fc(1e-5),
                    ),
                ),
            },
            for_(
                1,
                sz(1),
                vec![store(
                    2,
                    row(lp(1)),
                    mul(mul(ld(0, row(lp(1))), var(1)), ld(1, lp(1))),
                )],
            ),
        ],
    );
    for (r, d) in [(5i64, 64i64), (1, 1), (3, 1000), (7, 0)] {
        let n = (r * d) as usize;
        let inputs = vec![
            values(4, n, -2.0, 2.0),
            values(5, d as usize, 0.5, 1.5),
            vec![0.0; n],
        ];
        check(&k, &[r, d], &inputs);
    }
}

/// A Mamba-1-style selective scan: the `[N]` state is a local array carried over time.
fn scan_kernel(n: usize) -> Kernel {
    use UnaryOp::*;
    // sizes: B, L, E; grid [B, E]
    let ble = |t: IExpr| g(0).mul(sz(1)).add(t).mul(sz(2)).add(g(1));
    let bln = |t: IExpr, i: IExpr| g(0).mul(sz(1)).add(t).mul(c(n as i64)).add(i);
    let ben = |i: IExpr| g(0).mul(sz(2)).add(g(1)).mul(c(n as i64)).add(i);
    let h = ArrId(0);
    let hl = |i: IExpr| Expr::ArrLoad { arr: h, index: i };
    kernel(
        "scan",
        vec![
            kb("x", DType::F32, false),
            kb("dt", DType::BF16, false),
            kb("A", DType::F32, false),
            kb("Bm", DType::F16, false),
            kb("Cm", DType::F32, false),
            kb("h0", DType::F64, false),
            kb("y", DType::F32, true),
            kb("hN", DType::F64, true),
        ],
        &["B", "L", "E"],
        vec![sz(0), sz(2)],
        vec![
            Stmt::Array {
                arr: h,
                len: n,
                init: 0.0,
            },
            for_(
                0,
                c(n as i64),
                vec![Stmt::ArrSet {
                    arr: h,
                    index: lp(0),
                    value: ld(5, ben(lp(0))),
                }],
            ),
            for_(
                1,
                sz(1),
                vec![
                    Stmt::Var {
                        var: VarId(0),
                        init: un(Softplus, ld(1, ble(lp(1)))),
                    },
                    Stmt::Var {
                        var: VarId(1),
                        init: ld(0, ble(lp(1))),
                    },
                    Stmt::Var {
                        var: VarId(2),
                        init: fc(0.0),
                    },
                    for_(
                        2,
                        c(n as i64),
                        vec![
                            Stmt::ArrSet {
                                arr: h,
                                index: lp(2),
                                value: add(
                                    mul(
                                        un(
                                            Exp,
                                            mul(var(0), ld(2, g(1).mul(c(n as i64)).add(lp(2)))),
                                        ),
                                        hl(lp(2)),
                                    ),
                                    mul(mul(var(0), ld(3, bln(lp(1), lp(2)))), var(1)),
                                ),
                            },
                            Stmt::Set {
                                var: VarId(2),
                                value: add(var(2), mul(hl(lp(2)), ld(4, bln(lp(1), lp(2))))),
                            },
                        ],
                    ),
                    store(6, ble(lp(1)), var(2)),
                ],
            ),
            for_(3, c(n as i64), vec![store(7, ben(lp(3)), hl(lp(3)))]),
        ],
    )
}

#[test]
fn selective_scan_with_local_state() {
    for n in [16usize, 40] {
        let k = scan_kernel(n);
        let (b, l, e) = (2i64, 9i64, 5i64);
        let (b_, l_, e_) = (b as usize, l as usize, e as usize);
        let inputs = vec![
            values(6, b_ * l_ * e_, -1.0, 1.0),
            values(7, b_ * l_ * e_, -2.0, 1.0),
            values(8, e_ * n, -1.5, -0.1),
            values(9, b_ * l_ * n, -1.0, 1.0),
            values(10, b_ * l_ * n, -1.0, 1.0),
            values(11, b_ * e_ * n, -0.5, 0.5),
            vec![0.0; b_ * l_ * e_],
            vec![0.0; b_ * e_ * n],
        ];
        check(&k, &[b, l, e], &inputs);
    }
}

/// `out[t, :] = emb[ids[t] + 3, :]` with i32 and i64 ids (i32 is sign-extended), an index
/// buffer read as f32, and a grid extent read from a buffer.
#[test]
fn gather_through_load_index() {
    for idt in [DType::I32, DType::I64] {
        let row = IExpr::LoadIndex {
            buf: 0,
            index: Box::new(g(0)),
        }
        .add(c(3));
        let k = kernel(
            "gather",
            vec![
                kb("ids", idt, false),
                kb("emb", DType::F32, false),
                kb("out", DType::F32, true),
                kb("ids_f", DType::F32, true),
                kb("count", DType::I64, false),
            ],
            &["T", "D"],
            vec![
                IExpr::LoadIndex {
                    buf: 4,
                    index: Box::new(c(0)),
                },
                sz(1),
            ],
            vec![
                store(
                    2,
                    g(0).mul(sz(1)).add(g(1)),
                    ld(1, row.mul(sz(1)).add(g(1))),
                ),
                store(3, g(0), ld(0, g(0))),
            ],
        );
        let ids = vec![-3.0, 0.0, 4.0, 1.0, -2.0, 2.0];
        let (t, d, v) = (ids.len() as i64, 6i64, 8usize);
        let inputs = vec![
            ids.clone(),
            values(12, v * d as usize, -1.0, 1.0),
            vec![-9.0; (t * d) as usize],
            vec![0.0; t as usize],
            vec![(t - 1) as f64],
        ];
        let want = check(&k, &[t, d], &inputs);
        assert_eq!(want[3][..5], [-3.0, 0.0, 4.0, 1.0, -2.0]);
        assert_eq!(
            want[2][(t as usize - 1) * d as usize],
            -9.0,
            "last row untouched"
        );
    }
}

/// Copies between every pair of float storage dtypes, on special values; f16/bf16 results
/// must be exactly `half`'s rounding of the f32 value.
#[test]
fn storage_round_trips() {
    let mut vals = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        1.00390625,         // bf16 tie, rounds to even (1.0)
        1.01171875,         // bf16 tie, rounds to even (1.015625)
        1.0 + 1.0 / 2048.0, // f16 tie
        3.4e38,
        -3.4e38,
        65504.0,
        65520.0,
        1e-40,
        6e-8,
        1e-45,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        std::f64::consts::PI,
        1e300,
    ];
    vals.extend(values(13, 200, -1e5, 1e5));
    vals.extend(values(14, 200, -1e-3, 1e-3));
    let floats = [DType::F64, DType::F32, DType::F16, DType::BF16];
    for src in floats {
        for dst in floats {
            let k = kernel(
                "copy",
                vec![kb("in", src, false), kb("out", dst, true)],
                &["N"],
                vec![sz(0)],
                vec![store(1, g(0), ld(0, g(0)))],
            );
            let n = vals.len();
            let inputs = vec![vals.clone(), vec![0.0; n]];
            let want = check(&k, &[n as i64], &inputs);
            // Bits: compare against half directly.
            let ck = compile(&k, false);
            let mut inb = encode(src, &vals);
            let mut outb = vec![0u8; n * dst_bytes(dst)];
            ck.run(&mut [&mut inb, &mut outb], &[n as i64])
                .expect("run");
            for (i, &v) in vals.iter().enumerate() {
                let x = quantize(src, v) as f32;
                let got = &outb[i * dst_bytes(dst)..(i + 1) * dst_bytes(dst)];
                let exp: Vec<u8> = match dst {
                    DType::F16 => f16::from_f32(x).to_ne_bytes().to_vec(),
                    DType::BF16 => bf16::from_f32(x).to_ne_bytes().to_vec(),
                    DType::F32 => x.to_ne_bytes().to_vec(),
                    _ => (x as f64).to_ne_bytes().to_vec(),
                };
                if !x.is_nan() {
                    assert_eq!(got, &exp[..], "{src}->{dst} of {v:e}");
                }
                assert_eq!(decode(dst, got)[0].is_nan(), x.is_nan(), "{src}->{dst} NaN");
            }
            assert!(
                want[1]
                    .iter()
                    .zip(&vals)
                    .all(|(a, b)| a.is_nan() == b.is_nan())
            );
        }
    }
}

fn dst_bytes(d: DType) -> usize {
    match d {
        DType::F64 | DType::I64 => 8,
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::BF16 => 2,
    }
}

/// A 4-d grid with runtime extents: every point writes its coordinates; many chunkings.
#[test]
fn multi_dim_grid_coordinates() {
    let flat = g(0)
        .mul(sz(1))
        .add(g(1))
        .mul(sz(2))
        .add(g(2))
        .mul(sz(3))
        .add(g(3));
    let coord = Expr::FromIndex(
        g(0).mul(c(1000))
            .add(g(1).mul(c(100)))
            .add(g(2).mul(c(10)))
            .add(g(3)),
    );
    let k = kernel(
        "coords",
        vec![kb("out", DType::F32, true)],
        &["A", "B", "C", "D"],
        vec![sz(0), sz(1), sz(2), sz(3)],
        vec![store(0, flat, coord)],
    );
    for sizes in [[3i64, 1, 5, 7], [2, 3, 1, 1], [1, 1, 1, 9], [4, 2, 3, 2]] {
        let n: i64 = sizes.iter().product();
        let inputs = vec![vec![-1.0; n as usize]];
        let want = run_eval(&k, &sizes, &inputs);
        assert!(want[0].iter().all(|&x| x >= 0.0));
        for checked in [false, true] {
            let ck = compile(&k, checked);
            for chunk in 1..=n {
                let got = run_jit(&ck, &sizes, &inputs, Some(chunk));
                assert_eq!(got, want, "sizes {sizes:?} chunk {chunk}");
            }
        }
    }
    // A 0-d grid runs the body once.
    let k0 = kernel(
        "scalar",
        vec![kb("out", DType::F32, true)],
        &[],
        vec![],
        vec![store(0, c(0), fc(7.0))],
    );
    check(&k0, &[], &[vec![0.0]]);
}

/// Grids with no points run nothing and touch nothing.
#[test]
fn empty_grids() {
    let k = kernel(
        "empty",
        vec![kb("out", DType::F32, true)],
        &["A", "B"],
        vec![sz(0), sz(1), c(3)],
        vec![store(0, c(0), fc(1.0))],
    );
    for sizes in [[4i64, 0], [0, 4], [0, 0]] {
        for checked in [false, true] {
            let ck = compile(&k, checked);
            let mut out = vec![5.0f32];
            ck.run(&mut [bytes_of_mut(&mut out)], &sizes).expect("run");
            assert_eq!(out, [5.0]);
        }
    }
    // An empty range does nothing either.
    let ck = compile(&k, false);
    let mut out = vec![5.0f32];
    let p = bytes_of_mut(&mut out).as_mut_ptr();
    // SAFETY: no point runs.
    unsafe { ck.run_range(&[p], &[4, 4], 3, 3).expect("run_range") };
    assert_eq!(out, [5.0]);
}

/// `max`/`min` with NaN operands yield the other operand (as `f32::max`).
#[test]
fn max_min_nan() {
    let k = kernel(
        "maxmin",
        vec![
            kb("a", DType::F32, false),
            kb("b", DType::F32, false),
            kb("mx", DType::F32, true),
            kb("mn", DType::F32, true),
        ],
        &["N"],
        vec![sz(0)],
        vec![
            store(2, g(0), Expr::bin(BinaryOp::Max, ld(0, g(0)), ld(1, g(0)))),
            store(3, g(0), Expr::bin(BinaryOp::Min, ld(0, g(0)), ld(1, g(0)))),
        ],
    );
    let nan = f64::NAN;
    let a = vec![nan, 1.0, nan, -2.0, 3.0, f64::INFINITY, -1.0];
    let b = vec![1.0, nan, nan, 5.0, -4.0, 2.0, f64::NEG_INFINITY];
    let n = a.len();
    let want = check(&k, &[n as i64], &[a, b, vec![0.0; n], vec![0.0; n]]);
    assert_eq!(want[2][..2], [1.0, 1.0]);
    assert!(want[2][2].is_nan());
    assert_eq!(want[3][3..], [-2.0, -4.0, 2.0, f64::NEG_INFINITY]);
}

/// Div/Rem are floor division and the non-negative remainder, negative dividends included,
/// for power-of-two, other constant and runtime divisors.
#[test]
fn floor_div_rem() {
    let v = g(0).sub(c(10));
    let divisors = [c(3), c(4), c(1), sz(1), sz(2)];
    let mut body = Vec::new();
    for (i, d) in divisors.iter().enumerate() {
        let i = i as i64;
        body.push(store(
            0,
            c(2 * i).mul(sz(0)).add(g(0)),
            Expr::FromIndex(v.clone().div(d.clone())),
        ));
        body.push(store(
            0,
            c(2 * i + 1).mul(sz(0)).add(g(0)),
            Expr::FromIndex(v.clone().rem(d.clone())),
        ));
    }
    let k = kernel(
        "divrem",
        vec![kb("out", DType::F32, true)],
        &["N", "P", "Q"],
        vec![sz(0)],
        body,
    );
    let n = 23i64;
    let want = check(&k, &[n, 5, 8], &[vec![0.0; (n * 10) as usize]]);
    // -10 / 3 = -4, -10 % 3 = 2
    assert_eq!((want[0][0], want[0][n as usize]), (-4.0, 2.0));
}

/// Min of index values, negative ones included, with constant and runtime operands (a loop
/// extent too: the length of a chunk, `min(Q, N - c*Q)`).
#[test]
fn index_min() {
    let v = g(0).sub(c(10));
    let body = vec![
        store(0, g(0), Expr::FromIndex(v.clone().min(c(3)))),
        store(0, sz(0).add(g(0)), Expr::FromIndex(sz(1).min(v.clone()))),
        Stmt::Var {
            var: VarId(0),
            init: fc(0.0),
        },
        for_(
            1,
            c(4).min(sz(0).sub(g(0).mul(c(4)))),
            vec![Stmt::Set {
                var: VarId(0),
                value: add(var(0), fc(1.0)),
            }],
        ),
        store(0, c(2).mul(sz(0)).add(g(0)), var(0)),
    ];
    let k = kernel(
        "min",
        vec![kb("out", DType::F32, true)],
        &["N", "P"],
        vec![sz(0)],
        body,
    );
    let n = 23i64;
    let want = check(&k, &[n, 5], &[vec![0.0; (n * 3) as usize]]);
    let n = n as usize;
    assert_eq!(want[0][..2], [-10.0, -9.0]);
    assert_eq!(want[0][20], 3.0);
    assert_eq!((want[0][n], want[0][n + 20]), (-10.0, 5.0));
    // Chunks of 4 over 23: five full, one of 3, then none.
    assert_eq!(
        want[0][2 * n..2 * n + 7],
        [4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 0.0]
    );
}

/// Runs `op` over `xs` with the default (inline) math.
fn jit_unary(op: UnaryOp, xs: &[f32]) -> Vec<f32> {
    let k = kernel(
        "unary",
        vec![kb("x", DType::F32, false), kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(1, g(0), un(op, ld(0, g(0))))],
    );
    let ck = compile(&k, false);
    let mut ys = vec![0.0f32; xs.len()];
    let mut args = [KArg::In(bytes_of(xs)), KArg::Out(bytes_of_mut(&mut ys))];
    ck.run_args(&mut args, &[xs.len() as i64]).expect("run");
    ys
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// The inline `exp` is within 2 ulp of the correctly rounded result over its whole range,
/// rounds subnormal results once, and gets overflow, underflow and specials right; `sigmoid`
/// and `silu` built on it stay within a few ulp.
#[test]
fn inline_exp_accuracy() {
    let n = 400_000;
    let xs: Vec<f32> = (0..=n)
        .map(|i| -104.0 + 193.0 * i as f32 / n as f32)
        .chain([
            0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 88.72283, 88.72284, 88.7229, 89.0, 100.0,
        ])
        .chain([-87.33, -87.34, -103.28, -103.29, -103.98, -104.5, -200.0])
        .chain([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
        ])
        .collect();
    let reference = |op: UnaryOp, x: f32| eval::unary(op, x as f64) as f32;
    for (op, max_ulps) in [(UnaryOp::Exp, 2), (UnaryOp::Sigmoid, 3), (UnaryOp::Silu, 4)] {
        let ys = jit_unary(op, &xs);
        let mut worst = (0, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = reference(op, x);
            if e.is_nan() {
                assert!(y.is_nan(), "{op:?}({x:e}) = {y:e}, want NaN");
                continue;
            }
            if e.is_infinite() {
                assert_eq!(y, e, "{op:?}({x:e})");
                continue;
            }
            if e.abs() < f32::MIN_POSITIVE || (op != UnaryOp::Exp && x < -87.0) {
                if op == UnaryOp::Exp {
                    // Subnormal results: one rounding, so within one subnormal step.
                    assert!(ulps(y, e) <= 1, "{op:?}({x:e}) = {y:e}, want {e:e}");
                } else {
                    // exp(x) is subnormal there: the evaluator keeps its tail in f64, f32
                    // code cannot (an absolute error below the smallest normal f32).
                    assert!((y - e).abs() < 1e-37, "{op:?}({x:e}) = {y:e}");
                }
                continue;
            }
            let u = ulps(y, e);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        println!("inline {op:?}: worst {} ulp at {:e}", worst.0, worst.1);
        assert!(
            worst.0 <= max_ulps,
            "{op:?}: {} ulp at {:e}",
            worst.0,
            worst.1
        );
    }
    assert_eq!(
        jit_unary(UnaryOp::Exp, &[0.0, 1.0]),
        [1.0, std::f32::consts::E]
    );
}

// ---------- bounds checks and errors ----------

fn expect_oob(r: Result<(), CodegenError>, index: i64) -> String {
    match r {
        Err(CodegenError::OutOfBounds { index: i, what, .. }) => {
            assert_eq!(i, index, "{what}");
            what
        }
        other => panic!("expected an out-of-bounds error, got {other:?}"),
    }
}

#[test]
fn bounds_checked_violations() {
    let m = || {
        CpuModule::with_options(CpuOptions {
            bounds_checks: true,
            ..CpuOptions::default()
        })
        .expect("module")
    };
    // Buffer load one past the end.
    let k = kernel(
        "shift",
        vec![kb("x", DType::F32, false), kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(1, g(0), ld(0, g(0).add(c(1))))],
    );
    let ck = m().compile(&k).expect("compile");
    assert!(ck.bounds_checked());
    let mut x = vec![1.0f32; 10];
    let mut y = vec![0.0f32; 10];
    let what = expect_oob(
        ck.run(&mut [bytes_of_mut(&mut x), bytes_of_mut(&mut y)], &[10]),
        10,
    );
    assert!(what.contains("`x`"), "{what}");
    // Negative store index.
    let k = kernel(
        "neg",
        vec![kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(0, g(0).sub(c(1)), fc(1.0))],
    );
    let ck = m().compile(&k).expect("compile");
    expect_oob(ck.run(&mut [bytes_of_mut(&mut y)], &[3]), -1);
    // Local array.
    let k = kernel(
        "arr",
        vec![kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![
            Stmt::Array {
                arr: ArrId(0),
                len: 4,
                init: 0.0,
            },
            Stmt::ArrSet {
                arr: ArrId(0),
                index: g(0),
                value: fc(1.0),
            },
        ],
    );
    let ck = m().compile(&k).expect("compile");
    let what = expect_oob(ck.run(&mut [bytes_of_mut(&mut y)], &[6]), 4);
    assert!(what.contains("a0"), "{what}");
    // Runtime divisor 0.
    let k = kernel(
        "div0",
        vec![kb("y", DType::F32, true)],
        &["N", "D"],
        vec![sz(0)],
        vec![store(0, g(0), Expr::FromIndex(g(0).div(sz(1))))],
    );
    let ck = m().compile(&k).expect("compile");
    let what = expect_oob(ck.run(&mut [bytes_of_mut(&mut y)], &[3, 0]), 0);
    assert!(what.contains("division"), "{what}");
    // Unchecked, the same in-bounds kernel works.
    ck.run(&mut [bytes_of_mut(&mut y)], &[3, 2])
        .expect("in bounds");
}

#[test]
fn launch_and_compile_errors() {
    let k = kernel(
        "copy",
        vec![kb("x", DType::F32, false), kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(1, g(0), ld(0, g(0)))],
    );
    let ck = compile(&k, false);
    let mut x = vec![0u8; 8];
    let mut y = vec![0u8; 8];
    assert!(matches!(
        ck.run(&mut [&mut x], &[2]),
        Err(CodegenError::Launch { .. })
    ));
    assert!(matches!(
        ck.run(&mut [&mut x, &mut y], &[]),
        Err(CodegenError::Launch { .. })
    ));
    let mut odd = vec![0u8; 7];
    assert!(matches!(
        ck.run(&mut [&mut x, &mut odd], &[1]),
        Err(CodegenError::Launch { .. })
    ));
    assert!(matches!(
        ck.run(&mut [&mut x, &mut y], &[-1]),
        Err(CodegenError::Launch { .. })
    ));
    let r = ck.run_args(&mut [KArg::In(&x), KArg::In(&y)], &[2]);
    assert!(matches!(r, Err(CodegenError::Launch { .. })), "{r:?}");
    ck.run_args(&mut [KArg::In(&x), KArg::Out(&mut y)], &[2])
        .expect("ok");

    let mut m = CpuModule::new().expect("module");
    // check() failures come back as kernel errors.
    let bad = kernel("bad", vec![], &[], vec![], vec![store(0, c(0), fc(1.0))]);
    assert!(matches!(m.compile(&bad), Err(CodegenError::Kernel(_))));
    // Stores to integer buffers break the kernel IR's invariants (`Kernel::check`).
    let int_store = kernel(
        "int_store",
        vec![kb("ids", DType::I32, true)],
        &[],
        vec![],
        vec![store(0, c(0), fc(1.0))],
    );
    assert!(matches!(
        m.compile(&int_store),
        Err(CodegenError::Kernel(_))
    ));
    // Constant divisors must be positive; local arrays are bounded.
    let div0 = kernel(
        "div0",
        vec![kb("y", DType::F32, true)],
        &[],
        vec![],
        vec![store(0, c(0), Expr::FromIndex(c(5).rem(c(0))))],
    );
    assert!(matches!(
        m.compile(&div0),
        Err(CodegenError::Unsupported { .. })
    ));
    let huge = kernel(
        "huge",
        vec![],
        &[],
        vec![],
        vec![Stmt::Array {
            arr: ArrId(0),
            len: 1 << 20,
            init: 0.0,
        }],
    );
    assert!(matches!(
        m.compile(&huge),
        Err(CodegenError::Unsupported { .. })
    ));
    // The module still works after errors.
    let ok = m.compile(&k).expect("compile after errors");
    let mut x = vec![3.0f32, 4.0];
    let mut y = vec![0.0f32; 2];
    ok.run(&mut [bytes_of_mut(&mut x), bytes_of_mut(&mut y)], &[2])
        .expect("run");
    assert_eq!(y, [3.0, 4.0]);
    assert!(m.clif(&k).expect("clif").contains("function"));
    assert!(m.disasm(&k).expect("disasm").contains("ret"));
    if std::env::var_os("MA2MBA_DISASM").is_some() {
        println!("{}", m.disasm(&big_elementwise()).expect("disasm"));
    }
}

/// Kernels keep their code alive after the module is dropped, and can be shared across
/// threads.
#[test]
fn kernels_outlive_module_and_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CpuKernel>();
    send_sync::<CpuModule>();
    let k = kernel(
        "twice",
        vec![kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(0, g(0), mul(ld(0, g(0)), fc(2.0)))],
    );
    let ks = {
        let mut m = CpuModule::new().expect("module");
        m.compile_all(&[k.clone(), k.clone()]).expect("compile")
    };
    let mut y = vec![1.0f32; 3];
    std::thread::scope(|s| {
        s.spawn(|| ks[1].run(&mut [bytes_of_mut(&mut y)], &[3]).expect("run"));
    });
    ks[0].run(&mut [bytes_of_mut(&mut y)], &[3]).expect("run");
    assert_eq!(y, [4.0; 3]);
}

/// `run_raw` takes (address, length) pairs, so one buffer can be read and written in place.
#[test]
fn run_raw_in_place() {
    let k = kernel(
        "inplace",
        vec![kb("x", DType::F32, false), kb("y", DType::F32, true)],
        &["N"],
        vec![sz(0)],
        vec![store(1, g(0), add(mul(ld(0, g(0)), fc(2.0)), fc(1.0)))],
    );
    for checked in [false, true] {
        let ck = compile(&k, checked);
        let n = 50_000usize;
        let mut v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let p = bytes_of_mut(&mut v).as_mut_ptr();
        let bytes = n * 4;
        // SAFETY: `v` is valid for `bytes` bytes and not otherwise used during the call; each
        // point reads and writes only its own element.
        unsafe { ck.run_raw(&[(p, bytes), (p, bytes)], &[n as i64], Some(999)) }.expect("run");
        assert!(
            v.iter()
                .enumerate()
                .all(|(i, &x)| x == 2.0 * i as f32 + 1.0)
        );
        // Too short a buffer is caught by the checked kernel.
        if checked {
            // SAFETY: as above; the short length only makes the check fire.
            let r = unsafe { ck.run_raw(&[(p, bytes), (p, bytes - 4)], &[n as i64], None) };
            assert!(
                matches!(r, Err(CodegenError::OutOfBounds { index, .. }) if index == n as i64 - 1)
            );
        }
    }
}

fn big_elementwise() -> Kernel {
    kernel(
        "ew_big",
        vec![
            kb("x", DType::F32, false),
            kb("y", DType::F32, false),
            kb("z", DType::F32, false),
            kb("out", DType::F32, true),
        ],
        &["N"],
        vec![sz(0)],
        vec![store(
            3,
            g(0),
            add(
                mul(un(UnaryOp::Silu, ld(0, g(0))), ld(1, g(0))),
                ld(2, g(0)),
            ),
        )],
    )
}

/// The parallel run over many chunks equals one `run_range` over everything.
#[test]
fn parallel_run_equals_serial_range() {
    let k = big_elementwise();
    let ck = compile(&k, false);
    let n = 100_003usize;
    let x: Vec<f32> = values(20, n, -5.0, 5.0).iter().map(|&v| v as f32).collect();
    let y: Vec<f32> = values(21, n, -5.0, 5.0).iter().map(|&v| v as f32).collect();
    let z: Vec<f32> = values(22, n, -5.0, 5.0).iter().map(|&v| v as f32).collect();
    let mut serial = vec![0.0f32; n];
    let ptrs = [
        bytes_of(&x).as_ptr().cast_mut(),
        bytes_of(&y).as_ptr().cast_mut(),
        bytes_of(&z).as_ptr().cast_mut(),
        bytes_of_mut(&mut serial).as_mut_ptr(),
    ];
    // SAFETY: every index is g0 < n, in bounds of all four buffers; only `serial` is written.
    unsafe {
        ck.run_range(&ptrs, &[n as i64], 0, n as i64)
            .expect("run_range")
    };
    for chunk in [None, Some(1000), Some(7), Some(n as i64 - 1)] {
        let mut par = vec![0.0f32; n];
        let mut args = [
            KArg::In(bytes_of(&x)),
            KArg::In(bytes_of(&y)),
            KArg::In(bytes_of(&z)),
            KArg::Out(bytes_of_mut(&mut par)),
        ];
        ck.run_chunked(&mut args, &[n as i64], chunk).expect("run");
        assert!(
            par.iter()
                .zip(&serial)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{chunk:?}"
        );
    }
    // And the evaluator agrees on a sample.
    let inputs = vec![
        x.iter().map(|&v| v as f64).collect(),
        y.iter().map(|&v| v as f64).collect(),
        z.iter().map(|&v| v as f64).collect(),
        vec![0.0; n],
    ];
    let want = run_eval(&k, &[n as i64], &inputs);
    let got: Vec<f64> = serial.iter().map(|&v| v as f64).collect();
    assert_bufs(&k, &[got], &want[3..], 1e-6, 1e-6, "serial");
}

/// Prints how long a 1M-element elementwise kernel takes (run with `--nocapture`).
#[test]
fn elementwise_1m_timing() {
    let n = 1usize << 20;
    let x: Vec<f32> = values(30, n, -5.0, 5.0).iter().map(|&v| v as f32).collect();
    let y = x.clone();
    let z = x.clone();
    let arith = kernel(
        "ew_arith",
        vec![
            kb("x", DType::F32, false),
            kb("y", DType::F32, false),
            kb("z", DType::F32, false),
            kb("out", DType::F32, true),
        ],
        &["N"],
        vec![sz(0)],
        vec![store(
            3,
            g(0),
            add(mul(ld(0, g(0)), ld(1, g(0))), ld(2, g(0))),
        )],
    );
    let opts = |bounds_checks, exact_math| CpuOptions {
        bounds_checks,
        exact_math,
    };
    for (k, o) in [
        (arith.clone(), opts(false, false)),
        (arith, opts(true, false)),
        (big_elementwise(), opts(false, false)),
        (big_elementwise(), opts(false, true)),
    ] {
        let ck = compile_with(&k, o);
        let mut out = vec![0.0f32; n];
        let mut best_par = f64::MAX;
        let mut best_ser = f64::MAX;
        for _ in 0..5 {
            let mut args = [
                KArg::In(bytes_of(&x)),
                KArg::In(bytes_of(&y)),
                KArg::In(bytes_of(&z)),
                KArg::Out(bytes_of_mut(&mut out)),
            ];
            let t = Instant::now();
            ck.run_args(&mut args, &[n as i64]).expect("run");
            best_par = best_par.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            ck.run_chunked(&mut args, &[n as i64], Some(n as i64))
                .expect("run");
            best_ser = best_ser.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{} ({o:?}) over {n} f32: {:.2} ms serial, {:.2} ms parallel on {} threads",
            k.name,
            best_ser * 1e3,
            best_par * 1e3,
            rayon::current_num_threads()
        );
    }
}

// ---------- random elementwise trees ----------

#[derive(Clone, Debug)]
enum Tree {
    Leaf(u8),
    Const(f64),
    Un(UnaryOp, Box<Tree>),
    Bin(BinaryOp, Box<Tree>, Box<Tree>),
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (0u8..4).prop_map(Tree::Leaf),
        (-4.0f64..4.0).prop_map(Tree::Const),
    ];
    leaf.prop_recursive(5, 48, 2, |inner| {
        prop_oneof![
            (
                proptest::sample::select(UnaryOp::ALL.to_vec()),
                inner.clone()
            )
                .prop_map(|(op, a)| Tree::Un(op, Box::new(a))),
            (
                proptest::sample::select(BinaryOp::ALL.to_vec()),
                inner.clone(),
                inner
            )
                .prop_map(|(op, a, b)| Tree::Bin(op, Box::new(a), Box::new(b))),
        ]
    })
}

/// Leaves: `a[r, c]`, `b[c]` (row broadcast), `d[r]` (column broadcast), `f32(c)`.
fn lower_tree(t: &Tree) -> Expr {
    match t {
        Tree::Leaf(0) => ld(0, g(0).mul(sz(1)).add(g(1))),
        Tree::Leaf(1) => ld(1, g(1)),
        Tree::Leaf(2) => ld(2, g(0)),
        Tree::Leaf(_) => mul(Expr::FromIndex(g(1)), fc(0.01)),
        Tree::Const(x) => fc(*x),
        Tree::Un(op, a) => {
            let a = lower_tree(a);
            match op {
                // Positive operands: x^2 + 1 (or exp(x)) keeps log/sqrt/rsqrt away from NaN.
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => {
                    un(*op, add(mul(a.clone(), a), fc(1.0)))
                }
                _ => un(*op, a),
            }
        }
        Tree::Bin(op, a, b) => Expr::bin(*op, lower_tree(a), lower_tree(b)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_elementwise_trees(
        t in tree(),
        rows in proptest::sample::select(vec![1i64, 2, 3, 7]),
        cols in proptest::sample::select(vec![1i64, 5, 31, 1009, 1031]),
        dt in proptest::sample::select(vec![DType::F32, DType::BF16, DType::F64]),
        seed in any::<u64>(),
    ) {
        let k = kernel(
            "tree",
            vec![
                kb("a", DType::F32, false),
                kb("b", DType::F32, false),
                kb("d", DType::F32, false),
                kb("out", dt, true),
            ],
            &["R", "C"],
            vec![sz(0), sz(1)],
            vec![store(3, g(0).mul(sz(1)).add(g(1)), lower_tree(&t))],
        );
        let (r, c) = (rows as usize, cols as usize);
        let inputs = vec![
            values(seed, r * c, -3.0, 3.0),
            values(seed ^ 1, c, -3.0, 3.0),
            values(seed ^ 2, r, -3.0, 3.0),
            vec![0.0; r * c],
        ];
        let want = run_eval(&k, &[rows, cols], &inputs);
        // Trees that produce NaN somewhere are out of scope (no NaN-ordering contract).
        prop_assume!(want[3].iter().all(|x| !x.is_nan()));
        // How much this tree amplifies rounding-size perturbations, per element: the f64
        // evaluation against the f32 one, and against f64 evaluations of the inputs moved by
        // about an f32 ulp either way (the f32 rounding alone can land near the exact value
        // by chance). The inline transcendentals are a few ulps off the correctly rounded
        // ones, so an ill-conditioned tree (`silu(a) - silu(b)` with a ~ b, or a sum that
        // cancels, then a division) legitimately moves by a multiple of this; exact mode
        // must not.
        let raw = |f32_mode: bool, scale: f64| {
            let mut bufs: Vec<Vec<f64>> = k
                .bufs
                .iter()
                .zip(&inputs)
                .map(|(b, v)| v.iter().map(|&x| quantize(b.dtype, x * scale)).collect())
                .collect();
            eval::run(&k, &[rows, cols], &mut bufs, f32_mode).unwrap_or_else(|e| panic!("{e}"));
            bufs.swap_remove(3)
        };
        let (raw32, f64_out) = (raw(true, 1.0), raw(false, 1.0));
        let ulp = f64::from(f32::EPSILON);
        let moved = [raw(false, 1.0 + ulp), raw(false, 1.0 - ulp)];
        let spread = |j: usize| {
            moved
                .iter()
                .map(|m| (m[j] - f64_out[j]).abs())
                .filter(|d| d.is_finite())
                .fold((f64_out[j] - raw32[j]).abs(), f64::max)
        };
        // A bf16 store can round the approximate result to the neighbouring value.
        let store_ulp = if dt == DType::BF16 { 1.0 / 256.0 } else { 0.0 };
        for (opts, atol, rtol, cond) in [(MODES[0].0, 1e-5, 1e-5, 16.0), (MODES[2].0, 0.0, 0.0, 0.0)] {
            let ck = compile_with(&k, opts);
            let got = run_jit(&ck, &[rows, cols], &inputs, None);
            for (j, (a, e)) in got[3].iter().zip(&want[3]).enumerate() {
                let sensitivity = cond * (spread(j) + store_ulp * e.abs());
                prop_assert!(
                    close(*a, *e, atol + sensitivity, rtol),
                    "{opts:?} out[{j}]: jit {a:e} vs evaluator {e:e} (f64 {:e})\n{k}",
                    f64_out[j]
                );
            }
        }
    }
}

/// Tiled kernels (`ir::tile`): shared tiles filled by `Each`, two tile products (one
/// overwriting, one accumulating), and a partial store whose row count is a runtime size;
/// against the evaluator (bit for bit with exact math) and against the product computed
/// here from bf16-rounded operands. Rows past `R` keep what the output held.
#[test]
fn tiled_products_match_the_evaluator_and_a_direct_product() {
    for (m, n, k, count, rows) in [(32, 24, 48, 3, 32), (16, 8, 16, 2, 5), (48, 40, 32, 2, 100)] {
        let kern = common::tile_product(m, n, k);
        kern.check().unwrap_or_else(|e| panic!("{e}"));
        let a = values(1, count * m * k, -1.0, 1.0);
        let b = values(2, count * n * k, -1.0, 1.0);
        let init = values(3, count * m * n, -1.0, 1.0);
        let sizes = [count as i64, rows as i64];
        let got = check(&kern, &sizes, &[a.clone(), b.clone(), init.clone()]);
        let r = |x: f64| bf16::from_f32(x as f32).to_f64();
        for p in 0..count {
            for i in 0..m {
                for j in 0..n {
                    let at = (p * m + i) * n + j;
                    let want = if i < rows.min(m) {
                        let dot: f64 = (0..k)
                            .map(|l| r(a[(p * m + i) * k + l]) * r(b[(p * n + j) * k + l]))
                            .sum();
                        dot + 1.0
                    } else {
                        init[at] as f32 as f64
                    };
                    assert!(
                        close(got[2][at], want, 1e-5, 1e-5),
                        "[{m}, {n}, {k}] out[{p}, {i}, {j}] = {} vs {want}",
                        got[2][at]
                    );
                }
            }
        }
    }
}

/// What `Kernel::check` refuses in tiled kernels.
#[test]
fn tile_rules_are_checked() {
    let ok = common::tile_product(32, 24, 48);
    let refuse = |k: &Kernel, what: &str| {
        let e = k.check().expect_err(what).to_string();
        assert!(e.contains(what), "{e}");
    };
    // A product whose shapes do not line up, or are not multiples of the mma shape.
    refuse(
        &common::tile_product(24, 24, 48),
        "m must be a multiple of 16",
    );
    let mut k = ok.clone();
    if let Stmt::Tile { rows, .. } = &mut k.body[1] {
        *rows = 16;
    }
    refuse(&k, "tile product t2 [32, 24]");
    // A tile store outside an Each; a tile declared in a loop; an Each in an Each.
    let mut k = ok.clone();
    k.body.push(Stmt::TileSet {
        tile: ir::kernel::TileId(0),
        row: c(0),
        col: c(0),
        value: fc(1.0),
    });
    refuse(&k, "outside an Each");
    let mut k = ok.clone();
    let decl = k.body.remove(0);
    k.body.insert(0, for_(90, c(1), vec![decl]));
    refuse(&k, "declared inside a loop");
    let mut k = ok.clone();
    let inner = k.body[3].clone();
    if let Stmt::Each { body, .. } = &mut k.body[4] {
        body.push(inner);
    }
    refuse(&k, "an Each inside an Each");
    // An f32 operand.
    let mut k = ok;
    if let Stmt::Tile { dtype, .. } = &mut k.body[0] {
        *dtype = DType::F32;
    }
    refuse(&k, "bf16 operands");
}
