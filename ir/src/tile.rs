//! Tiled kernels: a grid point's threads share 2-D tiles and multiply them.
//!
//! A kernel whose body declares tiles ([`Stmt::Tile`]) is *tiled*. On the GPU each of its grid
//! points runs on a whole block of [`TILE_THREADS`] threads: tiles live in shared memory at
//! the offsets of [`layout`], an [`Stmt::Each`] deals its iterations out over the block's
//! threads and ends with a barrier, and an [`Stmt::Mma`] runs on the tensor cores (each warp
//! takes some 16 x 8 output tiles; bf16 operands, f32 accumulation). Everything else in the
//! body runs in every thread alike. On the CPU a point is one thread: an `Each` is a loop
//! nest and a tile product is the loops of [`mma_as_loops`].
//!
//! What this buys is fusion: the Mamba-2 SSD's masked `[Q, Q]` decay matrix is built in a
//! tile and multiplied where it is built, instead of going through device memory per head.

use crate::kernel::{Expr, IExpr, Kernel, LoopId, Stmt, TileId, VarId};
use crate::types::DType;
use std::collections::HashMap;

/// Threads per grid point of a tiled kernel on the GPU (a block; eight warps).
pub const TILE_THREADS: u32 = crate::lanes::BLOCK;

/// Bytes of padding after each tile row: the tensor-core operand loads of a warp's eight
/// rows then fall into distinct shared-memory banks.
pub const ROW_PAD_BYTES: usize = 16;

/// Where a tile lives in a tiled kernel's shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileSlot {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Byte offset from the start of the kernel's shared memory (16-byte aligned).
    pub offset: usize,
    /// Elements from one row to the next (`cols` plus the padding).
    pub row_stride: usize,
}

/// Whether `k` declares tiles.
pub fn is_tiled(k: &Kernel) -> bool {
    k.body.iter().any(|s| matches!(s, Stmt::Tile { .. }))
}

/// The shared-memory slots of `k`'s tiles, in declaration order, and the bytes they take.
pub fn layout(k: &Kernel) -> (HashMap<TileId, TileSlot>, usize) {
    let mut slots = HashMap::new();
    let mut offset = 0;
    for s in &k.body {
        if let Stmt::Tile {
            tile,
            dtype,
            rows,
            cols,
        } = s
        {
            let elem = dtype.size() as usize;
            let row_stride = cols + ROW_PAD_BYTES / elem;
            slots.insert(
                *tile,
                TileSlot {
                    dtype: *dtype,
                    rows: *rows,
                    cols: *cols,
                    offset,
                    row_stride,
                },
            );
            offset += (rows * row_stride * elem).next_multiple_of(16);
        }
    }
    (slots, offset)
}

/// Shared-memory bytes a tiled kernel's block needs (0 for other kernels).
pub fn shared_bytes(k: &Kernel) -> usize {
    layout(k).1
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32; NaN stays NaN.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let b = x.to_bits();
    let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(r)
}

/// `acc (+)= a bᵀ` as loops over the tiles' elements, for backends without matrix units:
/// statements that use fresh ids (above every id `k` uses).
pub fn mma_as_loops(
    k: &Kernel,
    (acc, a, b): (TileId, TileId, TileId),
    accumulate: bool,
) -> Vec<Stmt> {
    let (slots, _) = layout(k);
    let (Some(c), Some(av)) = (slots.get(&acc), slots.get(&a)) else {
        return Vec::new();
    };
    let (m, n, depth) = (c.rows as i64, c.cols as i64, av.cols as i64);
    let (mut next_loop, mut next_var) = max_ids(&k.body);
    let mut fresh_loop = || {
        next_loop += 1;
        LoopId(next_loop)
    };
    let (i, j, l) = (fresh_loop(), fresh_loop(), fresh_loop());
    next_var += 1;
    let s = VarId(next_var);
    let at = |t: TileId, r: LoopId, c: LoopId| Expr::TileLoad {
        tile: t,
        row: IExpr::Loop(r),
        col: IExpr::Loop(c),
    };
    let init = if accumulate {
        at(acc, i, j)
    } else {
        Expr::Const(0.0)
    };
    let product = Expr::bin(crate::BinaryOp::Mul, at(a, i, l), at(b, j, l));
    vec![Stmt::Each {
        counters: vec![i, j],
        extents: vec![IExpr::c(m), IExpr::c(n)],
        body: vec![
            Stmt::Var { var: s, init },
            Stmt::For {
                counter: l,
                extent: IExpr::c(depth),
                body: vec![Stmt::Set {
                    var: s,
                    value: Expr::bin(crate::BinaryOp::Add, Expr::Var(s), product),
                }],
            },
            Stmt::TileSet {
                tile: acc,
                row: IExpr::Loop(i),
                col: IExpr::Loop(j),
                value: Expr::Var(s),
            },
        ],
    }]
}

/// The largest loop and variable ids of `body` (0 when none).
fn max_ids(body: &[Stmt]) -> (u32, u32) {
    let (mut l, mut v) = (0, 0);
    for s in body {
        match s {
            Stmt::Var { var, .. } | Stmt::Set { var, .. } => v = v.max(var.0),
            Stmt::For { counter, body, .. } => {
                let (bl, bv) = max_ids(body);
                l = l.max(counter.0).max(bl);
                v = v.max(bv);
            }
            Stmt::Each { counters, body, .. } => {
                let (bl, bv) = max_ids(body);
                l = counters.iter().map(|c| c.0).fold(l.max(bl), u32::max);
                v = v.max(bv);
            }
            Stmt::Array { .. }
            | Stmt::ArrSet { .. }
            | Stmt::Store { .. }
            | Stmt::Tile { .. }
            | Stmt::TileSet { .. }
            | Stmt::Mma { .. } => {}
        }
    }
    (l, v)
}
