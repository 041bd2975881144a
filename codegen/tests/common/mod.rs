//! Kernels both backends' tests build.

use ir::kernel::{Expr, IExpr, KBuf, Kernel, LoopId, Stmt, TileId};
use ir::{BinaryOp, DType};

/// A tiled kernel over a grid of `P` products (size 0; size 1 is `R`, the rows to write):
/// `out[p, i, j] = 0.5 · (2 · a[p] b[p]ᵀ)[i, j] + 1` for `i < min(R, m)`, with `a[p]` `[m, k]`
/// and `b[p]` `[n, k]` rounded to bf16 in tiles; the product runs once overwriting and once
/// accumulating.
pub fn tile_product(m: usize, n: usize, k: usize) -> Kernel {
    let buf = |name: &str, writable| KBuf {
        name: name.into(),
        dtype: DType::F32,
        writable,
    };
    let (ta, tb, tc) = (TileId(0), TileId(1), TileId(2));
    let p = IExpr::Grid(0);
    let (i, j) = (LoopId(0), LoopId(1));
    let (i2, j2) = (LoopId(2), LoopId(3));
    let (i3, j3) = (LoopId(4), LoopId(5));
    let at = |base: IExpr, r: LoopId, c: LoopId, rows: usize, cols: usize| {
        base.mul(IExpr::c((rows * cols) as i64))
            .add(IExpr::Loop(r).mul(IExpr::c(cols as i64)))
            .add(IExpr::Loop(c))
    };
    let fill = |tile, buf, rows: usize, (r, c): (LoopId, LoopId)| Stmt::Each {
        counters: vec![r, c],
        extents: vec![IExpr::c(rows as i64), IExpr::c(k as i64)],
        body: vec![Stmt::TileSet {
            tile,
            row: IExpr::Loop(r),
            col: IExpr::Loop(c),
            value: Expr::Load {
                buf,
                index: at(p.clone(), r, c, rows, k),
            },
        }],
    };
    let tl = |t, r: LoopId, c: LoopId| Expr::TileLoad {
        tile: t,
        row: IExpr::Loop(r),
        col: IExpr::Loop(c),
    };
    let out = Expr::bin(
        BinaryOp::Add,
        Expr::bin(BinaryOp::Mul, tl(tc, i3, j3), Expr::Const(0.5)),
        Expr::Const(1.0),
    );
    Kernel {
        name: "tile_product".into(),
        bufs: vec![buf("a", false), buf("b", false), buf("out", true)],
        sizes: vec!["P".into(), "R".into()],
        grid: vec![IExpr::Size(0)],
        body: vec![
            Stmt::Tile {
                tile: ta,
                dtype: DType::BF16,
                rows: m,
                cols: k,
            },
            Stmt::Tile {
                tile: tb,
                dtype: DType::BF16,
                rows: n,
                cols: k,
            },
            Stmt::Tile {
                tile: tc,
                dtype: DType::F32,
                rows: m,
                cols: n,
            },
            fill(ta, 0, m, (i, j)),
            fill(tb, 1, n, (i2, j2)),
            Stmt::Mma {
                acc: tc,
                a: ta,
                b: tb,
                accumulate: false,
            },
            Stmt::Mma {
                acc: tc,
                a: ta,
                b: tb,
                accumulate: true,
            },
            Stmt::Each {
                counters: vec![i3, j3],
                extents: vec![IExpr::Size(1).min(IExpr::c(m as i64)), IExpr::c(n as i64)],
                body: vec![Stmt::Store {
                    buf: 2,
                    index: at(p, i3, j3, m, n),
                    value: out,
                }],
            },
        ],
    }
}
