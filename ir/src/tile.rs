//! Tiled kernels: a grid point's threads share 2-D tiles and multiply them.
//!
//! A kernel whose body declares tiles ([`Stmt::Tile`]) is *tiled*. On the GPU each of its grid
//! points runs on a whole block of [`TILE_THREADS`] threads: tiles live in shared memory at
//! the offsets of [`layout`], an [`Stmt::Each`] deals its iterations out over the block's
//! threads, and an [`Stmt::Mma`] runs on the tensor cores (each warp takes some 16 x 8
//! output tiles; bf16 operands, f32 accumulation). What one of them writes is visible to
//! the statements after it: the backend puts a barrier before a statement that touches it.
//! Everything else in the body runs in every thread alike. On the CPU a point is one thread: an `Each` is the loop
//! nest of [`each_as_loops`] and a tile product the loops of [`mma_as_loops`].
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

/// The shared-memory slots of `k`'s tiles and the bytes they take. Tiles whose live ranges
/// (from the first top-level statement that uses one to the last) do not overlap may share
/// bytes: first fit, in declaration order.
pub fn layout(k: &Kernel) -> (HashMap<TileId, TileSlot>, usize) {
    let live = live_ranges(&k.body);
    let mut slots: HashMap<TileId, TileSlot> = HashMap::new();
    // Placed tiles: (byte range, live range).
    let mut placed: Vec<((usize, usize), (usize, usize))> = Vec::new();
    let mut total = 0;
    for s in &k.body {
        let Stmt::Tile {
            tile,
            dtype,
            rows,
            cols,
        } = s
        else {
            continue;
        };
        let row_stride = row_stride(*dtype, *cols);
        let bytes = tile_bytes(*dtype, *rows, *cols);
        let range = live.get(tile).copied().unwrap_or((0, 0));
        let mut clashes: Vec<(usize, usize)> = placed
            .iter()
            .filter(|(_, r)| r.0 <= range.1 && range.0 <= r.1)
            .map(|(b, _)| *b)
            .collect();
        clashes.sort_unstable();
        let mut offset = 0;
        for (start, end) in clashes {
            if offset + bytes <= start {
                break;
            }
            offset = offset.max(end);
        }
        placed.push(((offset, offset + bytes), range));
        total = total.max(offset + bytes);
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
    }
    (slots, total)
}

/// Per tile: the first and last top-level statement that uses it.
fn live_ranges(body: &[Stmt]) -> HashMap<TileId, (usize, usize)> {
    let mut live: HashMap<TileId, (usize, usize)> = HashMap::new();
    for (at, s) in body.iter().enumerate() {
        let mut note = |t: TileId| {
            let r = live.entry(t).or_insert((at, at));
            r.1 = at;
        };
        stmt_tiles(s, &mut note);
    }
    live
}

fn stmt_tiles(s: &Stmt, f: &mut dyn FnMut(TileId)) {
    match s {
        // A declaration is not a use: every tile is declared first.
        Stmt::Tile { .. } => {}
        Stmt::Mma { acc, a, b, .. } => {
            f(*acc);
            f(*a);
            f(*b);
        }
        Stmt::TileSet { tile, value, .. } => {
            f(*tile);
            expr_tiles(value, f);
        }
        Stmt::Var { init: e, .. }
        | Stmt::Set { value: e, .. }
        | Stmt::ArrSet { value: e, .. }
        | Stmt::Store { value: e, .. } => expr_tiles(e, f),
        Stmt::For { body, .. } | Stmt::Each { body, .. } => {
            for s in body {
                stmt_tiles(s, f);
            }
        }
        Stmt::Array { .. } => {}
    }
}

fn expr_tiles(e: &Expr, f: &mut dyn FnMut(TileId)) {
    e.walk(&mut |x| {
        if let Expr::TileLoad { tile, .. } = x {
            f(*tile)
        }
    });
}

/// Elements from one row of a tile of `dtype` with `cols` columns to the next: padded by
/// [`ROW_PAD_BYTES`].
fn row_stride(dtype: DType, cols: usize) -> usize {
    cols + ROW_PAD_BYTES / dtype.size() as usize
}

/// Shared-memory bytes of a `rows x cols` tile of `dtype` (padded rows, 16-byte multiple):
/// what [`layout`] gives it, for a lowering that checks what fits before it declares tiles.
pub fn tile_bytes(dtype: DType, rows: usize, cols: usize) -> usize {
    (rows * row_stride(dtype, cols) * dtype.size() as usize).next_multiple_of(16)
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

/// An `Each` as the loop nest one thread runs it as (the iterations in order, the last
/// counter fastest): for backends and evaluators where a point is one thread.
pub fn each_as_loops(counters: &[LoopId], extents: &[IExpr], body: &[Stmt]) -> Vec<Stmt> {
    let mut nest = body.to_vec();
    for (c, e) in counters.iter().zip(extents).rev() {
        nest = vec![Stmt::For {
            counter: *c,
            extent: e.clone(),
            body: nest,
        }];
    }
    nest
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(id: u32, rows: usize) -> Stmt {
        Stmt::Tile {
            tile: TileId(id),
            dtype: DType::F32,
            rows,
            cols: 4,
        }
    }
    fn fill(id: u32) -> Stmt {
        Stmt::Each {
            counters: vec![LoopId(id)],
            extents: vec![IExpr::c(1)],
            body: vec![Stmt::TileSet {
                tile: TileId(id),
                row: IExpr::c(0),
                col: IExpr::c(0),
                value: Expr::Const(1.0),
            }],
        }
    }

    /// Tiles used one after the other share bytes; tiles used together do not.
    #[test]
    fn tiles_share_memory_when_their_lives_do_not_overlap() {
        let k = Kernel {
            name: "t".into(),
            bufs: vec![],
            sizes: vec![],
            grid: vec![IExpr::c(1)],
            body: vec![
                tile(0, 2),
                tile(1, 1),
                tile(2, 3),
                fill(0),
                fill(1),
                fill(2),
            ],
        };
        // Rows of 4 f32 + 16 bytes of padding = 32 bytes.
        let (slots, bytes) = layout(&k);
        assert_eq!(
            [0, 1, 2].map(|t| slots[&TileId(t)].offset),
            [0, 0, 0],
            "{slots:?}"
        );
        assert_eq!(bytes, 96);
        let mut k = k;
        // Tile 0 now lives until the end: the others go after it.
        k.body.push(fill(0));
        if let Some(Stmt::Each { counters, .. }) = k.body.last_mut() {
            counters[0] = LoopId(9);
        }
        let (slots, bytes) = layout(&k);
        assert_eq!(
            [0, 1, 2].map(|t| slots[&TileId(t)].offset),
            [0, 64, 64],
            "{slots:?}"
        );
        assert_eq!(bytes, 160);
    }
}
