//! The NVPTX backend on hand-written kernels: every storage dtype, local arrays, loops, floor
//! division and every op lower to `.entry` PTX; errors name the kernel; entry names are
//! valid PTX identifiers and unique. (Whole models and ptxas: the root's tests/nvptx.rs.)
#![cfg(feature = "nvptx")]

mod common;

use codegen::nvptx::{PtxError, Target, compile_ptx, entry_names, llvm_ir};
use ir::kernel::{ArrId, Expr, IExpr, KBuf, Kernel, LoopId, Stmt, VarId};
use ir::{BinaryOp, DType, UnaryOp};

fn kb(name: &str, dtype: DType, writable: bool) -> KBuf {
    KBuf {
        name: name.into(),
        dtype,
        writable,
    }
}

/// `out[g0, g1] = f(in[...])` touching every feature of the IR.
fn everything() -> Kernel {
    let g0 = IExpr::Grid(0);
    let g1 = IExpr::Grid(1);
    let n = IExpr::Size(1);
    let flat = g0.clone().mul(n.clone()).add(g1.clone());
    let mut e = Expr::Load {
        buf: 0,
        index: flat.clone(),
    };
    // The f64, f16 and bf16 inputs.
    for buf in 1..4 {
        e = Expr::bin(
            BinaryOp::Add,
            e,
            Expr::Load {
                buf,
                index: flat.clone(),
            },
        );
    }
    for op in [
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Softplus,
        UnaryOp::Silu,
        UnaryOp::Sigmoid,
        UnaryOp::Neg,
    ] {
        e = Expr::bin(BinaryOp::Add, e.clone(), Expr::un(op, e));
    }
    for op in [
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Div,
        BinaryOp::Sub,
        BinaryOp::Mul,
    ] {
        e = Expr::bin(op, e, Expr::Const(0.5));
    }
    let tok = IExpr::LoadIndex {
        buf: 4,
        index: Box::new(g0.clone()),
    };
    let body = vec![
        Stmt::Var {
            var: VarId(0),
            init: e,
        },
        Stmt::Array {
            arr: ArrId(0),
            len: 40,
            init: 0.0,
        },
        Stmt::For {
            counter: LoopId(0),
            extent: n.clone(),
            body: vec![
                Stmt::ArrSet {
                    arr: ArrId(0),
                    index: IExpr::Loop(LoopId(0)).rem(IExpr::c(40)),
                    value: Expr::bin(
                        BinaryOp::Add,
                        Expr::Var(VarId(0)),
                        Expr::FromIndex(IExpr::Loop(LoopId(0)).div(IExpr::c(3))),
                    ),
                },
                Stmt::Set {
                    var: VarId(0),
                    value: Expr::bin(
                        BinaryOp::Add,
                        Expr::Var(VarId(0)),
                        Expr::ArrLoad {
                            arr: ArrId(0),
                            index: IExpr::Loop(LoopId(0)).rem(IExpr::c(8)),
                        },
                    ),
                },
            ],
        },
        Stmt::Store {
            buf: 5,
            index: flat.clone(),
            value: Expr::Var(VarId(0)),
        },
        Stmt::Store {
            buf: 6,
            index: flat.clone(),
            value: Expr::FromIndex(tok.div(n.clone()).add(g1.rem(n))),
        },
        Stmt::Store {
            buf: 7,
            index: flat.clone(),
            value: Expr::Var(VarId(0)),
        },
        Stmt::Store {
            buf: 8,
            index: flat,
            value: Expr::Var(VarId(0)),
        },
    ];
    Kernel {
        name: "every.thing/1".into(),
        bufs: vec![
            kb("a", DType::F32, false),
            kb("b", DType::F64, false),
            kb("c", DType::F16, false),
            kb("d", DType::BF16, false),
            kb("ids", DType::I32, false),
            kb("out", DType::F32, true),
            kb("out64", DType::F64, true),
            kb("out16", DType::F16, true),
            kb("outb", DType::BF16, true),
        ],
        sizes: vec!["B".into(), "N".into()],
        grid: vec![IExpr::Size(0), IExpr::Size(1)],
        body,
    }
}

#[test]
fn every_feature_lowers_to_an_entry() {
    let k = everything();
    for target in [Target::Sm90, Target::Sm80] {
        let ptx = compile_ptx(std::slice::from_ref(&k), target).expect("compiles");
        assert_eq!(ptx.entries, vec!["every_thing_1".to_string()]);
        assert!(ptx.text.contains(".entry every_thing_1("), "{}", ptx.text);
        assert!(ptx.text.contains(&format!(".target {}", target.arch())));
        // No contraction: the CPU backend rounds every product.
        assert!(
            !ptx.text.contains("fma."),
            "fused multiply-add in:\n{}",
            ptx.text
        );
        // f16 and bf16 storage, IEEE division and square root; read-only buffers through the
        // non-coherent cache (the parameters are `noalias` and `readonly`).
        for needle in [
            "cvt.rn.f16.f32",
            "div.rn.f32",
            "sqrt.rn.f64",
            "ld.global.nc.u16",
        ] {
            assert!(ptx.text.contains(needle), "no `{needle}` in:\n{}", ptx.text);
        }
    }
    let ir = llvm_ir(std::slice::from_ref(&k), Target::Sm90).expect("llvm ir");
    assert!(ir.contains("ptx_kernel"), "{ir}");
}

#[test]
fn errors_name_the_kernel() {
    let mut k = everything();
    k.name = "broken_kernel".into();
    k.bufs[5].writable = false;
    let e = compile_ptx(&[everything(), k], Target::Sm90).unwrap_err();
    assert!(matches!(e, PtxError::Kernel(_)), "{e:?}");
    assert!(e.to_string().contains("broken_kernel"), "{e}");

    let mut k = everything();
    k.name = "bad_divisor".into();
    k.body.push(Stmt::Store {
        buf: 5,
        index: IExpr::Grid(0).div(IExpr::c(0)),
        value: Expr::Const(1.0),
    });
    let e = compile_ptx(&[k], Target::Sm90).unwrap_err();
    assert!(e.to_string().contains("bad_divisor"), "{e}");
}

#[test]
fn entry_names_are_identifiers_and_unique() {
    let mut a = everything();
    a.name = "7up".into();
    let mut b = everything();
    b.name = "x-y".into();
    let mut c = everything();
    c.name = "x_y".into();
    // A name that ends like a 32-bit entry's is moved off it (`index32_entry(x_y)` stays
    // free for `x_y`'s own).
    let mut d = everything();
    d.name = "x_y_idx32".into();
    let names = entry_names(&[a, b, c, d]);
    assert_eq!(names, vec!["k7up", "x_y", "x_y_2", "x_y_idx32_"]);
    assert_eq!(ir::kernel::index32_entry(&names[1]), "x_y_idx32");
}

/// Equal kernel sets share one compiled module; another set or target compiles anew, and
/// the shared module is what `compile_ptx` gives.
#[test]
fn equal_kernel_sets_share_their_ptx() {
    use codegen::nvptx::compile_ptx_shared;
    let set = vec![
        everything(),
        Kernel::convert("to_bf16", DType::F32, DType::BF16),
    ];
    let first = compile_ptx_shared(&set, Target::Sm90).expect("ptx");
    let again = compile_ptx_shared(&set.clone(), Target::Sm90).expect("ptx");
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "an equal set compiled again"
    );
    assert_eq!(
        first.text,
        compile_ptx(&set, Target::Sm90).expect("ptx").text
    );
    let other = compile_ptx_shared(&set[..1], Target::Sm90).expect("ptx");
    assert!(!std::sync::Arc::ptr_eq(&first, &other));
    assert_ne!(first.entries.len(), other.entries.len());
    let sm80 = compile_ptx_shared(&set, Target::Sm80).expect("ptx");
    assert_eq!(sm80.target, Target::Sm80);
    assert!(!std::sync::Arc::ptr_eq(&first, &sm80));
}

/// A tiled kernel: its tiles in dynamic shared memory, its products on the tensor cores
/// (`mma.sync` with bf16 operands read as 32-bit shared loads), barriers after each `Each`
/// and product; for both targets.
#[test]
fn tile_products_use_the_tensor_cores() {
    let k = common::tile_product(32, 24, 48);
    for target in [Target::Sm90, Target::Sm80] {
        let ptx = compile_ptx(std::slice::from_ref(&k), target).expect("compiles");
        for needle in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            ".extern .shared .align 16 .b8 ma2mba_tiles[]",
            "ld.shared.u32",
            "bar.sync",
        ] {
            assert!(ptx.text.contains(needle), "no `{needle}` in:\n{}", ptx.text);
        }
    }
    assert_eq!(
        ir::tile::shared_bytes(&k),
        (32 * (48 + 8) * 2) + (24 * (48 + 8) * 2) + 32 * (24 + 4) * 4
    );
}
