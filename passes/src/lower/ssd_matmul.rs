//! The Mamba-2 SSD as matrix products (the default on both devices; the other form is
//! [`super::LowerOptions::ssd_scans`]): the chunked "state space dual" of the Mamba-2 paper,
//! so that all but a small part of its work runs as batched GEMMs (on tensor cores where the
//! runtime uses them) instead of a per-step recurrence.
//!
//! Per chunk of `Q` steps (`c`), head `h` (group `g`), with `a_i` the running sum of
//! `dt·A` inside the chunk and `w_j = dt_j·exp(a_last - a_j)`:
//!
//! ```text
//! CB     = C Bᵀ                                  [Q, Q] per group       (GEMM)
//! M_ij   = CB_ij · exp(a_i - a_j) · dt_j, j <= i  [Q, Q] per head        (kernel)
//! Y_diag = M X                                   [Q, P]                 (GEMM)
//! S_own  = (w ⊙ X)ᵀ B                            [P, N]                 (GEMM)
//! S_in(c) = exp(a_last(c-1)) S_in(c-1) + S_own(c-1), S_in(0) = s0       (kernel, carry)
//! y_i    = Y_diag_i + exp(a_i) · C_i S_inᵀ                              (GEMM + kernel)
//! ```
//!
//! Every exponent is at most zero. The operands are copied into chunk-major scratch, zero
//! past the sequence's end (so a partial last chunk is a full one whose extra steps have
//! `dt = 0`, `x = 0`, `B = C = 0`, `dy = 0`), in the layouts the products want: a head's
//! rows contiguous, and where a product pairs heads with their group's `B` or `C`, the
//! group's heads stacked into one matrix (`hpg·P` rows or columns), so every product is
//! one strided-batched GEMM over `B·ceil(L/Q)·(H or G)` matrices.
//!
//! The gradient ([`Lowering::ssd_matmul_grad`]) recomputes `CB`, `S_own` and `S_in` the
//! same way (or reads its forward's, when that was lowered just before it: [`LastPrep`])
//! and derives everything else from nine more products (seven with the tiled kernel,
//! [`super::LowerOptions::ssd_tiles`], which forms `dY Xᵀ` itself); its derivation is at
//! the function.

use super::{Chunks, KB, LowerError, Lowering, carry, carry_chunk};
use ir::DType::{self, BF16, F32};
use ir::kernel::{ArrId, Expr, IExpr, Stmt, TileId, VarId};
use ir::schedule::{BufId, BufKind, Product, Step};
use ir::{BinaryOp, Dim, NodeId, Shape, UnaryOp, Value};

use BinaryOp::{Add, Mul, Sub};

/// The largest chunk of the matrix form. Its scratch is `T·H·Q` floats for each per-head
/// `[Q, Q]` matrix and `T·H·P·N/Q` for each chunk-state tensor (`T = B·L` steps), so
/// `Q ≈ sqrt(P·N)` (90 at P = 64, N = 128) balances them; 128 halves the published 256's
/// `[Q, Q]` matrices.
pub const MAX_SSD_MATMUL_CHUNK: u64 = 128;

/// Shared memory a tiled kernel may use per block: two blocks fit an H100/H200 SM (228 KB);
/// at `Q = 128`, `P = 64` the forward takes 86 KB, the gradient 103 KB.
const MAX_TILE_BYTES: usize = 112 * 1024;

/// The most state elements a block of the tiled carry ([`Lowering::ssd_carry_tiled`]) takes,
/// a thread each: a chunk's row of them is one 1 KB run of memory. Rows of 128 bytes (32
/// elements) made the carry at H = 80, L = 65536 take 1.7 ms, 512 bytes 1.2 ms, 1 KB 1.1 ms
/// (on the H200; 2.0 ms per element).
const CARRY_COLS: usize = ir::tile::TILE_THREADS as usize;
/// Chunks a block of the tiled carry loads at once (a round): 32 KB at 1 KB rows (16 and
/// 64 chunks were slower, 64 by 0.2 ms).
const CARRY_ROWS: usize = 32;

/// The tiled carry's block width for states of `pn` elements: the largest power of two up
/// to [`CARRY_COLS`] that divides `pn`, if at least a warp's 32.
fn carry_cols(pn: i64) -> Option<usize> {
    let cols = (CARRY_COLS as i64).min(1 << pn.trailing_zeros().min(20));
    (cols >= 32).then_some(cols as usize)
}

/// The tiled carry's tiles for blocks of `cols` elements: a round's values (f32
/// `[CARRY_ROWS, cols]`) and decays (`[CARRY_ROWS, 1]`), and the value carried from round
/// to round (`[1, cols]`).
fn carry_tiles(cols: usize) -> [TileDecl; 3] {
    [
        (0, F32, CARRY_ROWS, cols),
        (1, F32, CARRY_ROWS, 1),
        (2, F32, 1, cols),
    ]
}

/// A tile a kernel declares: its number (`TileId`), dtype, rows and columns.
type TileDecl = (u32, DType, usize, usize);

/// The shared-memory bytes of `tiles` where none share bytes.
fn tiles_bytes(tiles: &[TileDecl]) -> usize {
    tiles
        .iter()
        .map(|&(_, dtype, rows, cols)| ir::tile::tile_bytes(dtype, rows, cols))
        .sum()
}

/// Whether `tiles` fit [`MAX_TILE_BYTES`] even where none share bytes.
fn fits(tiles: &[TileDecl]) -> bool {
    tiles_bytes(tiles) <= MAX_TILE_BYTES
}

/// Declares `tiles` at the top of the kernel being built.
fn declare_tiles(kb: &mut KB, tiles: &[TileDecl]) {
    for &(id, dtype, rows, cols) in tiles {
        kb.body.push(Stmt::Tile {
            tile: TileId(id),
            dtype,
            rows,
            cols,
        });
    }
}

/// Stores `value` into element `[row, col]` of `tile`.
fn tile_set(tile: TileId, row: &IExpr, col: &IExpr, value: Expr) -> Stmt {
    Stmt::TileSet {
        tile,
        row: row.clone(),
        col: col.clone(),
        value,
    }
}

/// Element `[row, col]` of `tile`.
fn tile_ld(tile: TileId, row: &IExpr, col: &IExpr) -> Expr {
    Expr::TileLoad {
        tile,
        row: row.clone(),
        col: col.clone(),
    }
}

/// An internal inconsistency of this lowering.
fn internal(node: NodeId, what: &str) -> LowerError {
    LowerError::Unsupported {
        node,
        op: "ssd_scan",
        message: format!("internal: {what}"),
    }
}

/// Sizes and scratch shapes of one SSD op.
struct Ssd {
    ch: Chunks,
    q: i64,
    /// `B`, `ceil(L/Q)`, `H`, `G`, `P`, `N`, `Q`, `hpg·P` as dimensions.
    b: Dim,
    count: Dim,
    h: Dim,
    g: Dim,
    p: Dim,
    n: Dim,
    qd: Dim,
    hp: Dim,
    /// Heads per group and the head width `P`.
    hpg: i64,
    pw: i64,
}

impl Ssd {
    fn new(l: &Lowering, node: NodeId, chunk: u64) -> Result<Ssd, LowerError> {
        let ops = l.g.operands(node);
        let (xs, bs) = (l.shape(ops[0]), l.shape(ops[3]));
        let heads = l.known(node, &xs[2], "the head count")?;
        let groups = l.known(node, &bs[2], "the group count")?.max(1);
        let pw = l.known(node, &xs[3], "the head width")? as i64;
        l.known(node, &bs[3], "d_state")?;
        let hpg = (heads / groups).max(1) as i64;
        let q = chunk.clamp(1, MAX_SSD_MATMUL_CHUNK);
        let (ch, count) = l.chunks(node, &xs[1], q)?;
        Ok(Ssd {
            ch,
            q: q as i64,
            b: xs[0].clone(),
            count,
            h: xs[2].clone(),
            g: bs[2].clone(),
            p: xs[3].clone(),
            n: bs[3].clone(),
            qd: Dim::known(q),
            hp: Dim::known((hpg * pw) as u64),
            hpg,
            pw,
        })
    }

    /// Whether the tiled forward ([`Lowering::ssd_tiled_output`]) can run this op: its tile
    /// product needs `Q` in multiples of 16 and `P` of 8, its row segments ([`seg_fold`])
    /// the same, and its tiles must fit a block's shared memory.
    fn tiles_fit(&self) -> bool {
        let (q, p) = (self.q, self.pw);
        // `a` and `dt` are dead before `Y` is written: `ir::tile::layout` gives them bytes of
        // `Y` (together they are smaller), so the first four tiles are the size.
        q % (2 * SEG) == 0 && p % SEG == 0 && fits(&self.forward_tiles()[..4])
    }

    /// The forward's tiles: `M` (bf16 `[Q, Q]`), `Xᵀ` (bf16 `[P, Q]`), `Y` (f32 `[Q, P]`),
    /// and `exp(a)`, `a` and `dt` (f32 `[1, Q]` each).
    fn forward_tiles(&self) -> [TileDecl; 6] {
        let (q, p) = (self.q as usize, self.pw as usize);
        [
            (0, BF16, q, q),
            (1, BF16, p, q),
            (2, F32, q, p),
            (3, F32, 1, q),
            (4, F32, 1, q),
            (5, F32, 1, q),
        ]
    }

    /// Whether the gradient's tiled kernel ([`Lowering::ssd_grad_mask_tiled`]) can run this
    /// op: its row segments ([`seg_fold`]) and its tile product need `Q` in multiples of 16,
    /// and its tiles must fit.
    fn grad_tiles_fit(&self) -> bool {
        let tiles = self.grad_tiles();
        // The dots' parts take `dM`'s bytes ([`ir::tile::layout`]).
        let parts_fit = tiles_bytes(&tiles[5..]) <= tiles_bytes(&tiles[..1]);
        self.q % (2 * SEG) == 0 && parts_fit && fits(&tiles[..5])
    }

    /// `P` rounded up to the tile product's depth (16): the columns of the gradient's `dY`
    /// and `X` tiles, zero past `P`.
    fn p_tile(&self) -> i64 {
        (self.pw + 15) / 16 * 16
    }

    /// The gradient's tiles: `dM`, then `T'` in place (f32 `[Q, Q]`), `dt` and `a` (f32
    /// `[1, Q]` each), `dY` and `X` (bf16 `[Q, P]`, `P` rounded up to 16), and the parts of
    /// two dots per row segment (f32 `[Q, P/8]` each; dead before `dM` is written, so they
    /// take its bytes).
    fn grad_tiles(&self) -> [TileDecl; 7] {
        let (q, pk) = (self.q as usize, self.p_tile() as usize);
        let segs = pk / SEG as usize;
        [
            (0, F32, q, q),
            (1, F32, 1, q),
            (2, F32, 1, q),
            (3, BF16, q, pk),
            (4, BF16, q, pk),
            (5, F32, q, segs),
            (6, F32, q, segs),
        ]
    }

    fn shape(&self, dims: &[&Dim]) -> Shape {
        dims.iter().map(|d| (*d).clone()).collect()
    }
    /// `[B, nc, H, Q]`: one value per step and head.
    fn per_step(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.h, &self.qd])
    }
    /// `[B, nc, H]`: one value per chunk and head.
    fn per_chunk(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.h])
    }
    /// `[B, nc, H, Q, P]`: a head's steps as rows.
    fn head_rows(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.h, &self.qd, &self.p])
    }
    /// `[B, nc, G, Q, N]`: a group's `B` or `C` rows.
    fn group_rows(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.g, &self.qd, &self.n])
    }
    /// `[B, nc, G, Q, hpg·P]`: a group's heads side by side, a step per row.
    fn group_heads(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.g, &self.qd, &self.hp])
    }
    /// `[B, nc, H or G, Q, Q]`.
    fn square(&self, by: &Dim) -> Shape {
        self.shape(&[&self.b, &self.count, by, &self.qd, &self.qd])
    }
    /// `[B, nc, H, P, N]`: a state per chunk and head.
    fn states(&self) -> Shape {
        self.shape(&[&self.b, &self.count, &self.h, &self.p, &self.n])
    }
    fn batch(&self, by: &Dim) -> Product {
        Product(vec![self.b.clone(), self.count.clone(), by.clone()])
    }
    /// The group of head `h`.
    fn group(&self, h: &IExpr) -> IExpr {
        h.clone().div(IExpr::c(self.hpg))
    }
    /// The column of head `h`'s element `p` among its group's heads.
    fn in_group(&self, h: &IExpr, p: IExpr) -> IExpr {
        h.clone()
            .rem(IExpr::c(self.hpg))
            .mul(IExpr::c(self.pw))
            .add(p)
    }
    /// Step `i` of chunk `c` clamped into the sequence, and 1 (0) where it does (does not)
    /// lie in it: the copies into chunks read a real step everywhere and multiply by it.
    fn clamped(&self, c: &IExpr, i: &IExpr) -> (IExpr, Expr) {
        let t = self.ch.start(c).add(i.clone());
        (
            t.min(self.ch.l.clone().sub(IExpr::c(1))),
            Expr::FromIndex(self.valid(c, i)),
        )
    }

    /// 1 if step `j` of chunk `c` lies in the sequence, else 0.
    fn valid(&self, c: &IExpr, j: &IExpr) -> IExpr {
        self.ch
            .len(c)
            .add(IExpr::c(self.q - 1))
            .sub(j.clone())
            .div(IExpr::c(self.q))
    }
}

/// A load of `buf` at `idx` of `shape`.
fn ld(kb: &mut KB, buf: BufId, idx: &[IExpr], shape: &[Dim]) -> Expr {
    let slot = kb.buf(buf, false);
    Expr::Load {
        buf: slot,
        index: kb.l.linear(idx, shape),
    }
}

/// A store into `buf` at `idx` of `shape`.
fn st(kb: &mut KB, buf: BufId, idx: &[IExpr], shape: &[Dim], value: Expr) -> Stmt {
    let slot = kb.buf(buf, true);
    Stmt::Store {
        buf: slot,
        index: kb.l.linear(idx, shape),
        value,
    }
}

fn for_(kb: &mut KB, extent: IExpr, body: impl FnOnce(&mut KB, IExpr) -> Vec<Stmt>) -> Stmt {
    let counter = kb.counter();
    let body = body(kb, IExpr::Loop(counter));
    Stmt::For {
        counter,
        extent,
        body,
    }
}

fn var(kb: &mut KB, init: Expr) -> (VarId, Stmt) {
    let v = kb.var();
    (v, Stmt::Var { var: v, init })
}

fn add(a: Expr, b: Expr) -> Expr {
    Expr::bin(Add, a, b)
}
fn mul(a: Expr, b: Expr) -> Expr {
    Expr::bin(Mul, a, b)
}
fn sub(a: Expr, b: Expr) -> Expr {
    Expr::bin(Sub, a, b)
}
fn exp(a: Expr) -> Expr {
    Expr::un(UnaryOp::Exp, a)
}
fn grid(i: usize) -> IExpr {
    IExpr::Grid(i)
}

/// `exp(min(a_i - a_j, 0))`: finite everywhere, exact on and below the diagonal (`a` does not
/// grow along a chunk).
fn capped_exp(ai: Expr, aj: Expr) -> Expr {
    exp(Expr::bin(BinaryOp::Min, sub(ai, aj), Expr::Const(0.0)))
}

/// The exact 0/1 indicator `[j <= i]` of a `Q x Q` matrix's lower triangle: `(i - j + Q) / Q`.
fn on_or_below(q: i64, i: &IExpr, j: &IExpr) -> IExpr {
    i.clone().sub(j.clone()).add(IExpr::c(q)).div(IExpr::c(q))
}

/// Element `(i, j)` of the masked decay matrix of head `h` in chunk `c` of batch `b`:
/// `CB_ij exp(a_i - a_j) [j <= i]`, times `dt_j` when `with_dt`. Without branches:
/// `exp(min(a_i - a_j, 0))` is finite everywhere and exact below the diagonal, and the exact
/// 0/1 indicator `(i - j + Q) / Q` masks the rest.
fn mask_value(
    kb: &mut KB,
    s: &Ssd,
    pr: &Prep,
    [b, c, h]: [&IExpr; 3],
    (i, j): (&IExpr, &IExpr),
    with_dt: bool,
) -> Expr {
    let (ps, sqg) = (s.per_step(), s.square(&s.g));
    let step = |k: &IExpr| [b.clone(), c.clone(), h.clone(), k.clone()];
    let at = [b.clone(), c.clone(), s.group(h), i.clone(), j.clone()];
    let cbv = ld(kb, pr.cb, &at, &sqg);
    let (ai, aj) = (ld(kb, pr.acs, &step(i), &ps), ld(kb, pr.acs, &step(j), &ps));
    let below = on_or_below(s.q, i, j);
    let v = mul(mul(cbv, capped_exp(ai, aj)), Expr::FromIndex(below));
    if with_dt {
        mul(v, ld(kb, pr.dtc, &step(j), &ps))
    } else {
        v
    }
}

/// An `Each` over the chunk's `Q` steps that copies per-step values (`[B, nc, H, Q]`
/// buffers) of head `h` in chunk `c` of batch `b` into `[1, Q]` tiles: a row segment's
/// neighbouring steps are then neighbouring words.
fn stage_steps(kb: &mut KB, s: &Ssd, [b, c, h]: [&IExpr; 3], tiles: &[(TileId, BufId)]) -> Stmt {
    let ps = s.per_step();
    let ci = kb.counter();
    let i = IExpr::Loop(ci);
    let at = [b.clone(), c.clone(), h.clone(), i.clone()];
    let sets = tiles
        .iter()
        .map(|&(tile, buf)| {
            let v = ld(kb, buf, &at, &ps);
            tile_set(tile, &IExpr::c(0), &i, v)
        })
        .collect();
    each(&[ci], &[s.q as usize], sets)
}

/// The per-step sums the gradient's tiled kernel stores: the row and column sums of `T'`
/// (`rowt`, `colt`) and the dots `u_j = x_j · (dS_out B_j)` and `dy_j · (C_j S_inᵀ)` (`yod`).
struct GradSums {
    colt: BufId,
    rowt: BufId,
    u: BufId,
    yod: BufId,
}

/// Where the gradient's `dCB` finds each head's terms `dM_ij exp(a_i - a_j) dt_j`: written by
/// the tiled kernel, or to be formed from `dM` (a product's result).
#[derive(Clone, Copy)]
enum DcbTerms {
    Tiled(BufId),
    FromDm(BufId),
}

/// A forward's [`Prep`] and what it was computed from: the op's six operands, the chunk and
/// the prep's flags (`with_rows`, `with_xdt`). A gradient with the same key (or one that
/// needs only `dt ⊙ x` more: [`Lowering::kept_prep`]), lowered right after it (no other SSD
/// node between), reads these buffers instead of running the prep's
/// kernels and products again (at H = 80, L = 65536: about 1.5 ms, most of it the own
/// states and their carry). The buffers then live from the forward to the gradient, which
/// the memory plan sees (their lifetimes are the steps that touch them); the rule keeps
/// that to one op's scratch at a time.
pub(super) struct LastPrep {
    key: (Vec<Value>, i64, (bool, bool)),
    prep: Prep,
}

/// The scratch tensors both directions compute from the operands.
#[derive(Clone, Copy)]
struct Prep {
    /// `dt` and the running sum `a` of `dt·A` (`[B, nc, H, Q]`).
    dtc: BufId,
    acs: BufId,
    /// `x` as rows (`[B, nc, H, Q, P]`; not for the tiled forward, which reads `x`) and
    /// `w ⊙ x` as group rows (`[B, nc, G, Q, hpg·P]`); for the gradient without tiles,
    /// `dt ⊙ x` as rows.
    xc: Option<BufId>,
    xs: BufId,
    xdt: Option<BufId>,
    /// `B` and `C` rows (`[B, nc, G, Q, N]`).
    bc: BufId,
    cc: BufId,
    /// `C Bᵀ` per group and the state entering each chunk (`[B, nc, H, P, N]`).
    cb: BufId,
    sin: BufId,
    /// `exp(a_i)` and `exp(a_last - a_i)` per step (`[B, nc, H, Q]`): computed once, not
    /// per element of the kernels that scale by them. `exp(a_last)` is each chunk's decay.
    ea: BufId,
    el: BufId,
    /// `C S_inᵀ` per chunk, a group's heads at once (`[B, nc, G, Q, hpg·P]`).
    yo: BufId,
}

impl Lowering<'_> {
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        node: NodeId,
        (lhs, rhs, out): (BufId, BufId, BufId),
        batch: Product,
        (m, k, n): (&Dim, &Dim, &Dim),
        (lhs_t, rhs_t): (bool, bool),
    ) {
        self.gemm_with(
            node,
            (lhs, rhs, out),
            batch,
            (m, k, n),
            (lhs_t, rhs_t),
            false,
        );
    }

    /// [`Self::gemm`], `exact` as in [`Step::MatMul`].
    #[allow(clippy::too_many_arguments)]
    fn gemm_with(
        &mut self,
        node: NodeId,
        (lhs, rhs, out): (BufId, BufId, BufId),
        batch: Product,
        (m, k, n): (&Dim, &Dim, &Dim),
        (lhs_t, rhs_t): (bool, bool),
        exact: bool,
    ) {
        self.out.steps.push(Step::MatMul {
            lhs,
            rhs,
            out,
            batch,
            m: m.clone(),
            k: k.clone(),
            n: n.clone(),
            lhs_t,
            rhs_t,
            rhs_batched: true,
            exact,
            node,
        });
    }

    /// The prep kernels, `CB`, the chunks' own end states, the carry that turns them into
    /// the states entering each chunk and `C S_inᵀ`; returns the final state's variable-free
    /// kernel output through `s1` when given. With bf16 activations the carry writes the entering states to
    /// a buffer of their own, fit for bf16 ([`Lowering::bf16_scratch`]), instead of over the
    /// f32 own states.
    fn ssd_prep(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        s1: Option<BufId>,
        (with_rows, with_xdt): (bool, bool),
    ) -> Result<Prep, LowerError> {
        let states_apart = self.bf16_activations;
        let g = self.g;
        let ops = g.operands(node);
        let (x, dt, a, bm, cm, s0) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
        let (ps, hr, gh, gr) = (s.per_step(), s.head_rows(), s.group_heads(), s.group_rows());
        let dtc = self.scratch(node, ps.clone());
        let acs = self.scratch(node, ps.clone());
        // A chunk copy of `x`: fit for bf16 (bf16 already where activations are, and the
        // products round it), but f32 where `dt ⊙ x` feeds the exact sums of the gradient
        // without tiles, which pair with sums over this copy.
        let xc = with_rows.then(|| {
            if with_xdt {
                self.scratch(node, hr.clone())
            } else {
                self.bf16_scratch(node, hr.clone())
            }
        });
        let xs = self.scratch(node, gh.clone());
        let xdt = with_xdt.then(|| self.scratch(node, hr.clone()));
        let bc = self.scratch(node, gr.clone());
        let cc = self.scratch(node, gr.clone());
        let cb = self.scratch(node, s.square(&s.g));
        // Apart, the entering states are read at bf16 precision only (by products, and by the
        // gradient's `<dS_out, S_in>`, a sum), as the reference keeps them.
        let sin = if states_apart {
            self.bf16_scratch(node, s.states())
        } else {
            self.scratch(node, s.states())
        };
        let ch = &s.ch;
        let qc = IExpr::c(s.q);

        // dt and dt·A per (batch, chunk, head, step): the op's `dt` prologue (a softplus in
        // f64) parallel over the steps.
        let dta = self.scratch(node, ps.clone());
        let mut kb = KB::new(self, &format!("{name}_decay"));
        let (b, c, h, i) = (grid(0), grid(1), grid(2), grid(3));
        let (tc, ok) = s.clamped(&c, &i);
        let dv = kb.value(dt, &[b.clone(), tc, h.clone()])?;
        let (d, decl) = var(&mut kb, mul(dv, ok));
        let av = kb.value(a, std::slice::from_ref(&h))?;
        let at = [b, c, h, i];
        let dt_store = st(&mut kb, dtc, &at, &ps, Expr::Var(d));
        let dta_store = st(&mut kb, dta, &at, &ps, mul(Expr::Var(d), av));
        kb.body.extend([decl, dt_store, dta_store]);
        let grid_d = vec![kb.l.dim(&s.b), ch.count.clone(), kb.l.dim(&s.h), qc.clone()];
        kb.finish(grid_d, node);

        // Per (batch, chunk, head), over the chunk's steps in order: the running sum `a` of
        // dt·A (the exponent of every decay), then exp(a_i) and exp(a_last - a_i). This
        // replaced a product with the lower-triangular ones, which cuBLAS ran at 1 TFLOP/s
        // (1.4 ms at H = 80, L = 65536, where this takes a few hundredths).
        let (ea, el) = (
            self.scratch(node, ps.clone()),
            self.scratch(node, ps.clone()),
        );
        let mut kb = KB::new(self, &format!("{name}_sums"));
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let (run, dr) = var(&mut kb, Expr::Const(0.0));
        kb.body.push(dr);
        let step = |i: &IExpr| [b.clone(), c.clone(), h.clone(), i.clone()];
        let sums = for_(&mut kb, qc.clone(), |kb, i| {
            let v = ld(kb, dta, &step(&i), &ps);
            vec![
                Stmt::Set {
                    var: run,
                    value: add(Expr::Var(run), v),
                },
                st(kb, acs, &step(&i), &ps, Expr::Var(run)),
            ]
        });
        let exps = for_(&mut kb, qc.clone(), |kb, i| {
            let ai = ld(kb, acs, &step(&i), &ps);
            let (aiv, decl) = var(kb, ai);
            vec![
                decl,
                st(kb, ea, &step(&i), &ps, exp(Expr::Var(aiv))),
                st(
                    kb,
                    el,
                    &step(&i),
                    &ps,
                    exp(sub(Expr::Var(run), Expr::Var(aiv))),
                ),
            ]
        });
        kb.body.extend([sums, exps]);
        let grid_s = vec![kb.l.dim(&s.b), ch.count.clone(), kb.l.dim(&s.h)];
        kb.finish(grid_s, node);

        // x as rows, and w ⊙ x as group rows, per (batch, chunk, head, step, p).
        let mut kb = KB::new(self, &format!("{name}_x"));
        let (b, c, h, i, p) = (grid(0), grid(1), grid(2), grid(3), grid(4));
        let (tc, ok) = s.clamped(&c, &i);
        let xv = kb.value(x, &[b.clone(), tc, h.clone(), p.clone()])?;
        let (xv, decl) = var(&mut kb, mul(xv, ok));
        kb.body.push(decl);
        let at = [b.clone(), c.clone(), h.clone(), i.clone()];
        let w = ssd_weight_at(&mut kb, s, (dtc, el), &at);
        let rows = [b.clone(), c.clone(), h.clone(), i.clone(), p.clone()];
        let grow = [b, c, s.group(&h), i, s.in_group(&h, p)];
        if let Some(xc) = xc {
            let rows_store = st(&mut kb, xc, &rows, &hr, Expr::Var(xv));
            kb.body.push(rows_store);
        }
        let group_store = st(&mut kb, xs, &grow, &gh, mul(Expr::Var(xv), w));
        kb.body.push(group_store);
        if let Some(xdt) = xdt {
            let dtv = ld(&mut kb, dtc, &at, &ps);
            let store = st(&mut kb, xdt, &rows, &hr, mul(Expr::Var(xv), dtv));
            kb.body.push(store);
        }
        let grid_x = vec![
            kb.l.dim(&s.b),
            ch.count.clone(),
            kb.l.dim(&s.h),
            qc.clone(),
            kb.l.dim(&s.p),
        ];
        kb.finish(grid_x, node);

        // B and C rows, per (batch, chunk, group, step, n).
        let mut kb = KB::new(self, &format!("{name}_bc"));
        let (b, c, gg, i, nn) = (grid(0), grid(1), grid(2), grid(3), grid(4));
        let (tc, ok) = s.clamped(&c, &i);
        let src = [b.clone(), tc, gg.clone(), nn.clone()];
        let at = [b, c, gg, i, nn];
        for (v, dst) in [(bm, bc), (cm, cc)] {
            let e = kb.value(v, &src)?;
            let store = st(&mut kb, dst, &at, &gr, mul(e, ok.clone()));
            kb.body.push(store);
        }
        let grid_bc = vec![
            kb.l.dim(&s.b),
            ch.count.clone(),
            kb.l.dim(&s.g),
            qc.clone(),
            kb.l.dim(&s.n),
        ];
        kb.finish(grid_bc, node);

        // CB = C Bᵀ per group; each chunk's own end state (w ⊙ X)ᵀ B, a group's heads at once.
        self.gemm(
            node,
            (cc, bc, cb),
            s.batch(&s.g),
            (&s.qd, &s.n, &s.qd),
            (false, true),
        );
        // Apart, the own states stay f32 for the carry while the entering ones are bf16 with
        // bf16 activations (see `sin`).
        let own = if states_apart {
            self.scratch(node, s.states())
        } else {
            sin
        };
        self.gemm(
            node,
            (xs, bc, own),
            s.batch(&s.g),
            (&s.hp, &s.qd, &s.n),
            (true, false),
        );

        // The states entering each chunk, in order from s0.
        self.ssd_carry(
            node,
            s,
            &format!("{name}_carry"),
            (own, sin, ea),
            (s0, false),
            s1,
        )?;
        // `C S_inᵀ` per chunk, a group's heads at once (`[B, nc, G, Q, hpg·P]`): the part of
        // `y` that the states entering the chunks give, before the factor `exp(a_i)`; the
        // gradient's dots read it too.
        let yo = self.bf16_scratch(node, s.group_heads());
        self.gemm(
            node,
            (cc, sin, yo),
            s.batch(&s.g),
            (&s.qd, &s.n, &s.hp),
            (false, true),
        );
        Ok(Prep {
            dtc,
            acs,
            xc,
            xs,
            xdt,
            bc,
            cc,
            cb,
            sin,
            ea,
            el,
            yo,
        })
    }

    /// `SsdScan` in the matrix form (module doc): seven kernels and four products, or with
    /// tiles three products and the tiled output kernel in place of the mask, `M X` and the
    /// output kernel.
    pub(super) fn ssd_matmul(&mut self, node: NodeId, chunk: u64) -> Result<(), LowerError> {
        let s = Ssd::new(self, node, chunk)?;
        let name = format!("ssd_scan_{}", node.index());
        let y = self.new_buf(Value::new(node, 0), BufKind::Temp);
        let s1 = self.new_buf(Value::new(node, 1), BufKind::Temp);
        if self.ssd_tiles && s.tiles_fit() {
            let pr = self.ssd_prep(node, &s, &name, Some(s1), (false, false))?;
            self.keep_prep(node, &s, (false, false), pr);
            return self.ssd_tiled_output(node, &s, &name, &pr, y);
        }
        let pr = self.ssd_prep(node, &s, &name, Some(s1), (true, false))?;
        self.keep_prep(node, &s, (true, false), pr);
        let xc = pr.xc.ok_or_else(|| internal(node, "no x rows"))?;
        let (ps, hr) = (s.per_step(), s.head_rows());
        let sq = s.square(&s.h);
        let mm = self.scratch(node, sq.clone());
        let yd = self.scratch(node, hr.clone());
        let gh = s.group_heads();

        // M = CB ⊙ exp(a_i - a_j) dt_j below the diagonal, per (batch, chunk, head, i).
        self.ssd_mask(node, &s, &format!("{name}_mask"), &pr, mm, (false, true));
        self.gemm(
            node,
            (mm, xc, yd),
            s.batch(&s.h),
            (&s.qd, &s.qd, &s.p),
            (false, false),
        );
        let yo = pr.yo;

        // y = Y_diag + exp(a) C S_inᵀ, per (batch, step, head, p).
        let mut kb = KB::new(self, &name);
        let (b, t, h, p) = (grid(0), grid(1), grid(2), grid(3));
        let (c, i) = (t.clone().div(IExpr::c(s.q)), t.clone().rem(IExpr::c(s.q)));
        let d = ld(
            &mut kb,
            yd,
            &[b.clone(), c.clone(), h.clone(), i.clone(), p.clone()],
            &hr,
        );
        let e = ld(
            &mut kb,
            pr.ea,
            &[b.clone(), c.clone(), h.clone(), i.clone()],
            &ps,
        );
        let o = ld(
            &mut kb,
            yo,
            &[b.clone(), c, s.group(&h), i, s.in_group(&h, p.clone())],
            &gh,
        );
        let (yv, decl) = var(&mut kb, add(d, mul(e, o)));
        kb.body.push(decl);
        let xs = kb.l.shape(Value::new(node, 0));
        let stores = kb.store_with_epilogues(Value::new(node, 0), y, &[b, t, h, p], yv)?;
        kb.body.extend(stores);
        let grid_y = xs.iter().map(|d| kb.l.dim(d)).collect();
        kb.finish(grid_y, node);
        Ok(())
    }

    /// Keeps the forward `node`'s prep for its gradient ([`LastPrep`]).
    fn keep_prep(&mut self, node: NodeId, s: &Ssd, flags: (bool, bool), prep: Prep) {
        let operands = self.g.operands(node)[..6].to_vec();
        self.ssd_last_prep = Some(LastPrep {
            key: (operands, s.q, flags),
            prep,
        });
    }

    /// The prep the forward lowered just before the gradient `node` kept, if it was computed
    /// from the same operands with the same chunk and flags; forgets it either way. Without
    /// tiles the gradient also wants `dt ⊙ x` (`with_xdt`), which the forward has no use for,
    /// and an f32 copy of `x`: with f32 activations the forward's copy is f32, and the
    /// gradient forms `dt ⊙ x` from it ([`Self::ssd_xdt`]).
    fn kept_prep(&mut self, node: NodeId, s: &Ssd, flags: (bool, bool)) -> Option<Prep> {
        let kept = self.ssd_last_prep.take()?;
        let ops = self.g.operands(node);
        let (operands, q, kept_flags) = &kept.key;
        if ops.len() < 6 || operands[..] != ops[..6] || *q != s.q {
            return None;
        }
        let wants_xdt = *kept_flags == (true, false) && flags == (true, true);
        (*kept_flags == flags || (wants_xdt && !self.bf16_activations)).then_some(kept.prep)
    }

    /// `dt ⊙ x` as rows (`[B, nc, H, Q, P]`, f32) from the prep's chunk copy of `x` and `dt`,
    /// for a gradient that reads its forward's prep ([`Self::kept_prep`]): the products its
    /// own prep's `x` kernel would have formed.
    fn ssd_xdt(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        pr: &Prep,
    ) -> Result<BufId, LowerError> {
        let xc = pr.xc.ok_or_else(|| internal(node, "no x rows"))?;
        let (ps, hr) = (s.per_step(), s.head_rows());
        let xdt = self.scratch(node, hr.clone());
        let mut kb = KB::new(self, &format!("{name}_xdt"));
        let (b, c, h, i, p) = (grid(0), grid(1), grid(2), grid(3), grid(4));
        let rows = [b.clone(), c.clone(), h.clone(), i.clone(), p];
        let xv = ld(&mut kb, xc, &rows, &hr);
        let dtv = ld(&mut kb, pr.dtc, &[b, c, h, i], &ps);
        let store = st(&mut kb, xdt, &rows, &hr, mul(xv, dtv));
        kb.body.push(store);
        let grid_x = vec![
            kb.l.dim(&s.b),
            s.ch.count.clone(),
            kb.l.dim(&s.h),
            IExpr::c(s.q),
            kb.l.dim(&s.p),
        ];
        kb.finish(grid_x, node);
        Ok(xdt)
    }

    /// The carry of per-chunk states `src` (`[B, nc, H, P, N]`, each chunk's own part) across
    /// the chunks, per (batch, head, p, n): from `init` (`[B, H, P, N]`), in order or from the
    /// last chunk (`reverse`), with each chunk's decay `exp(a_last)`, read from `ea` (`exp(a)`
    /// per step: one load per chunk, where an `exp` per state element was half the carry's
    /// instructions); `dst` (`src` itself for a carry in place) gets the value entering each
    /// chunk, and the value after the last one is stored in `out`.
    fn ssd_carry(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        (src, dst, ea): (BufId, BufId, BufId),
        (init, reverse): (Value, bool),
        out: Option<BufId>,
    ) -> Result<(), LowerError> {
        if self.tiled_carries {
            let width = self.dim(&s.p).mul(self.dim(&s.n));
            if let IExpr::Const(pn) = width
                && let Some(cols) = carry_cols(pn)
            {
                let fit = (pn, cols);
                let bufs = (src, dst, ea);
                return self.ssd_carry_tiled(node, s, name, bufs, (init, reverse), out, fit);
            }
        }
        let (ps, sts) = (s.per_step(), s.states());
        let mut kb = KB::new(self, name);
        let (b, h, p, nn) = (grid(0), grid(1), grid(2), grid(3));
        let sidx = [b.clone(), h.clone(), p.clone(), nn.clone()];
        let init_v = kb.value(init, &sidx)?;
        let slots = (kb.buf(src, false), kb.buf(dst, true));
        let ea_slot = kb.buf(ea, false);
        let at = |kb: &KB, c: &IExpr| {
            kb.l.linear(
                &[b.clone(), c.clone(), h.clone(), p.clone(), nn.clone()],
                &sts,
            )
        };
        let decay = |kb: &KB, c: &IExpr| Expr::Load {
            buf: ea_slot,
            index: kb
                .l
                .linear(&[b.clone(), c.clone(), h.clone(), IExpr::c(s.q - 1)], &ps),
        };
        let (stmts, v) = carry(&mut kb, init_v, (&s.ch.count, reverse), slots, &at, &decay);
        kb.body.extend(stmts);
        if let Some(out) = out {
            let shape = kb.l.shape(init);
            let store = st(&mut kb, out, &sidx, &shape, Expr::Var(v));
            kb.body.push(store);
        }
        let grid_s = vec![
            kb.l.dim(&s.b),
            kb.l.dim(&s.h),
            kb.l.dim(&s.p),
            kb.l.dim(&s.n),
        ];
        kb.finish(grid_s, node);
        Ok(())
    }

    /// [`Self::ssd_carry`] as a tiled kernel, a block per (batch, head, `cols` consecutive
    /// state elements) and a thread per element, in rounds of [`CARRY_ROWS`] chunks:
    ///
    /// ```text
    /// V[i, e] = src(chunk i, e), d[i] = exp(a_last(chunk i))    independent loads
    /// V[i, e] = the value entering chunk i, v = d[i] v + own    in shared memory, in order
    /// dst(chunk i, e) = V[i, e]
    /// ```
    ///
    /// The per-element carry walks the chunks with about two loads in flight per thread,
    /// each a 128-byte run per warp and chunk (2.0 ms, 1 TB/s at H = 80, L = 65536 on the
    /// H200); a round here reads and writes 1 KB runs, and each thread has as many loads in
    /// flight as an `Each` unrolls (8 on the GPU).
    #[allow(clippy::too_many_arguments)]
    fn ssd_carry_tiled(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        (src, dst, ea): (BufId, BufId, BufId),
        (init, reverse): (Value, bool),
        out: Option<BufId>,
        (pn, cols): (i64, usize),
    ) -> Result<(), LowerError> {
        let (ps, sts) = (s.per_step(), s.states());
        let (w, rows) = (cols as i64, CARRY_ROWS as i64);
        let mut kb = KB::new(self, name);
        let (b, h, blk) = (grid(0), grid(1), grid(2));
        let [tv, td, ts] = [0, 1, 2].map(TileId);
        declare_tiles(&mut kb, &carry_tiles(cols));
        let nd = kb.l.dim(&s.n);
        // The state index `[p, n]` of the block's element `e`.
        let elem = |e: &IExpr| {
            let k = blk.clone().mul(IExpr::c(w)).add(e.clone());
            (k.clone().div(nd.clone()), k.rem(nd.clone()))
        };
        let count = s.ch.count.clone();
        let chunk = |pos: IExpr| carry_chunk(&count, pos, reverse);
        let zero = IExpr::c(0);
        let state = |kb: &mut KB, pos: IExpr, e: &IExpr, buf: BufId| {
            let (p, n) = elem(e);
            let at = [b.clone(), chunk(pos), h.clone(), p, n];
            (kb.l.linear(&at, &sts), kb.buf(buf, buf == dst))
        };

        // The value entering the first chunk, a tile row carried from round to round.
        let ce = kb.counter();
        let e = IExpr::Loop(ce);
        let (p, n) = elem(&e);
        let iv = kb.value(init, &[b.clone(), h.clone(), p, n])?;
        kb.body
            .push(each(&[ce], &[cols], vec![tile_set(ts, &zero, &e, iv)]));

        let cr = kb.counter();
        let first = IExpr::Loop(cr).mul(IExpr::c(rows));
        let len = IExpr::c(rows).min(count.clone().sub(first.clone()));
        let mut round = Vec::new();
        // The round's own values and decays.
        let (ci, ce) = (kb.counter(), kb.counter());
        let (i, e) = (IExpr::Loop(ci), IExpr::Loop(ce));
        let (index, buf) = state(&mut kb, first.clone().add(i.clone()), &e, src);
        round.push(Stmt::Each {
            counters: vec![ci, ce],
            extents: vec![len.clone(), IExpr::c(w)],
            body: vec![tile_set(tv, &i, &e, Expr::Load { buf, index })],
        });
        let ci = kb.counter();
        let i = IExpr::Loop(ci);
        let at = [
            b.clone(),
            chunk(first.clone().add(i.clone())),
            h.clone(),
            IExpr::c(s.q - 1),
        ];
        let decay = ld(&mut kb, ea, &at, &ps);
        round.push(Stmt::Each {
            counters: vec![ci],
            extents: vec![len.clone()],
            body: vec![tile_set(td, &i, &zero, decay)],
        });

        // The recurrence over the round, each own value replaced by the value entering.
        let ce = kb.counter();
        let e = IExpr::Loop(ce);
        let (v, dv) = var(&mut kb, tile_ld(ts, &zero, &e));
        let scan = for_(&mut kb, len.clone(), |kb, i| {
            let (o, dox) = var(kb, tile_ld(tv, &i, &e));
            vec![
                dox,
                tile_set(tv, &i, &e, Expr::Var(v)),
                Stmt::Set {
                    var: v,
                    value: add(mul(tile_ld(td, &i, &zero), Expr::Var(v)), Expr::Var(o)),
                },
            ]
        });
        let keep = tile_set(ts, &zero, &e, Expr::Var(v));
        round.push(each(&[ce], &[cols], vec![dv, scan, keep]));

        let (ci, ce) = (kb.counter(), kb.counter());
        let (i, e) = (IExpr::Loop(ci), IExpr::Loop(ce));
        let (index, buf) = state(&mut kb, first.add(i.clone()), &e, dst);
        round.push(Stmt::Each {
            counters: vec![ci, ce],
            extents: vec![len, IExpr::c(w)],
            body: vec![Stmt::Store {
                buf,
                index,
                value: tile_ld(tv, &i, &e),
            }],
        });
        kb.body.push(Stmt::For {
            counter: cr,
            extent: count.add(IExpr::c(rows - 1)).div(IExpr::c(rows)),
            body: round,
        });

        if let Some(out) = out {
            let ce = kb.counter();
            let e = IExpr::Loop(ce);
            let (p, n) = elem(&e);
            let shape = kb.l.shape(init);
            let value = tile_ld(ts, &zero, &e);
            let store = st(&mut kb, out, &[b.clone(), h.clone(), p, n], &shape, value);
            kb.body.push(each(&[ce], &[cols], vec![store]));
        }
        let grid_c = vec![kb.l.dim(&s.b), kb.l.dim(&s.h), IExpr::c(pn / w)];
        kb.finish(grid_c, node);
        Ok(())
    }

    /// The masked decay matrix `M_ij = CB_ij exp(a_i - a_j) dt_j` (`j <= i`, else 0), an
    /// element per grid point (stored transposed, `[j, i]`, when `transposed`; without the
    /// factor `dt_j` unless `with_dt`); [`mask_value`] says how.
    fn ssd_mask(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        pr: &Prep,
        out: BufId,
        (transposed, with_dt): (bool, bool),
    ) {
        let sqh = s.square(&s.h);
        let mut kb = KB::new(self, name);
        let (b, c, h, r, o) = (grid(0), grid(1), grid(2), grid(3), grid(4));
        let (i, j) = if transposed { (&o, &r) } else { (&r, &o) };
        let v = mask_value(&mut kb, s, pr, [&b, &c, &h], (i, j), with_dt);
        let store = st(&mut kb, out, &[b, c, h, r, o], &sqh, v);
        kb.body.push(store);
        let grid_m = vec![
            kb.l.dim(&s.b),
            s.ch.count.clone(),
            kb.l.dim(&s.h),
            IExpr::c(s.q),
            IExpr::c(s.q),
        ];
        kb.finish(grid_m, node);
    }
}

impl Lowering<'_> {
    /// The forward's output in one tiled kernel ([`ir::tile`]) per (batch, chunk, head),
    /// instead of the `[Q, Q]` mask per head in memory, its product and an output kernel:
    ///
    /// ```text
    /// M  (bf16 [Q, Q]) = CB ⊙ exp(a_i - a_j) dt_j, j <= i      from CB (per group) and a, dt
    /// Xᵀ (bf16 [P, Q]) = x of the chunk, zero past the end    read from x itself
    /// Y  (f32 [Q, P])  = M X                                  tensor cores
    /// y  = Y + exp(a_i) (C S_inᵀ)_i for the chunk's steps     (and the epilogues of y)
    /// ```
    ///
    /// `C S_inᵀ` stays one product per group (its heads stacked), as in the matrix form:
    /// per head in the kernel it would convert and scale the group's `C` once per head.
    fn ssd_tiled_output(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        pr: &Prep,
        y: BufId,
    ) -> Result<(), LowerError> {
        let x = self.g.operands(node)[0];
        let gh = s.group_heads();
        let yo = pr.yo;
        let (q, pw) = (s.q as usize, s.pw as usize);
        let mut kb = KB::new(self, name);
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let [tm, tx, ty, te, ta, td] = [0, 1, 2, 3, 4, 5].map(TileId);
        declare_tiles(&mut kb, &s.forward_tiles());

        // exp(a), a and dt per step, so that building M reads only CB from memory.
        let stage = stage_steps(
            &mut kb,
            s,
            [&b, &c, &h],
            &[(te, pr.ea), (ta, pr.acs), (td, pr.dtc)],
        );
        kb.body.push(stage);

        // Xᵀ first (it needs none of the staged steps, so its loads overlap theirs without a
        // barrier between): a thread reads a segment of a step's row of x (16 bytes) and
        // writes it down a column of the tile; neighbouring threads take neighbouring steps,
        // so the stores of a warp fall into distinct banks.
        let (cs, cj, cu) = (kb.counter(), kb.counter(), kb.counter());
        let (j, p0) = (IExpr::Loop(cj), IExpr::Loop(cs).mul(IExpr::c(SEG)));
        let (tcl, ok) = s.clamped(&c, &j);
        let p = p0.clone().add(IExpr::Loop(cu));
        let xv = kb.value(x, &[b.clone(), tcl, h.clone(), p])?;
        let fill = seg_run(&mut kb, cu, (vec![], vec![mul(xv, ok)]), |_, u, v| {
            Ok(vec![tile_set(
                tx,
                &p0.clone().add(u.clone()),
                &j,
                v[0].clone(),
            )])
        })?;
        kb.body.push(each(&[cs, cj], &[pw / SEG as usize, q], fill));
        // M, as the mask kernel computes it, by row segments: those holding its lower
        // triangle ([`seg_fold`]: the loads of CB and the exponentials only where they count),
        // and zeros in the rest.
        let zero = IExpr::c(0);
        let zeros = |_: &mut KB, i: &IExpr, j0: &IExpr| {
            (0..SEG)
                .map(|u| tile_set(tm, i, &j0.clone().add(IExpr::c(u)), Expr::Const(0.0)))
                .collect()
        };
        let mask = seg_each(
            &mut kb,
            s.q,
            |kb, i, j0| {
                let r = mask_run(kb, s, pr, [&b, &c, &h], (ta, i, j0));
                let m = mul(mul(r.cb, r.decay), tile_ld(td, &zero, &r.j));
                let run = seg_run(kb, r.u, (vec![], vec![m]), |_, u, v| {
                    Ok(vec![tile_set(
                        tm,
                        i,
                        &j0.clone().add(u.clone()),
                        v[0].clone(),
                    )])
                })?;
                Ok([vec![r.decl], run].concat())
            },
            zeros,
        )?;
        kb.body.push(mask);

        kb.body.push(Stmt::Mma {
            acc: ty,
            a: tm,
            b: tx,
            accumulate: false,
        });

        // y for the chunk's steps, a row segment per thread.
        let (ci, cs, cu) = (kb.counter(), kb.counter(), kb.counter());
        let (i, p0) = (IExpr::Loop(ci), IExpr::Loop(cs).mul(IExpr::c(SEG)));
        let p = p0.clone().add(IExpr::Loop(cu));
        let (ea, decl) = var(&mut kb, tile_ld(te, &zero, &i));
        let o = ld(
            &mut kb,
            yo,
            &[
                b.clone(),
                c.clone(),
                s.group(&h),
                i.clone(),
                s.in_group(&h, p.clone()),
            ],
            &gh,
        );
        let v = add(tile_ld(ty, &i, &p), mul(Expr::Var(ea), o));
        let t = s.ch.start(&c).add(i);
        let mut body = vec![decl];
        body.extend(seg_run(&mut kb, cu, (vec![], vec![v]), |kb, u, v| {
            let (yv, decl) = var(kb, v[0].clone());
            let mut out = vec![decl];
            let at = [b.clone(), t, h.clone(), p0.clone().add(u.clone())];
            out.extend(kb.store_with_epilogues(Value::new(node, 0), y, &at, yv)?);
            Ok(out)
        })?);
        let len = s.ch.len(&grid(1));
        kb.body.push(Stmt::Each {
            counters: vec![ci, cs],
            extents: vec![len, IExpr::c(s.pw / SEG)],
            body,
        });
        let grid_t = vec![kb.l.dim(&s.b), s.ch.count.clone(), kb.l.dim(&s.h)];
        kb.finish(grid_t, node);
        Ok(())
    }
}

impl Lowering<'_> {
    /// The gradient's `dM = dY Xᵀ` on the tensor cores, and from it `M'` (the mask without
    /// its factor `dt_j`, for the product `D' = M'ᵀ dY`), each head's terms of `dCB` and the
    /// sums of `T = dM ⊙ M` that `da` takes the difference of, in one tiled kernel per
    /// (batch, chunk, head):
    ///
    /// ```text
    /// dM     = dY Xᵀ                                  f32 tile, from x and dy themselves
    /// e_ij   = exp(a_i - a_j) [j <= i]
    /// M'_ij  = CB_ij e_ij                             to memory (zero above the diagonal)
    /// E_ij   = dM_ij e_ij dt_j                        to memory (dCB = Σ_heads E; j <= i only)
    /// T'_ij  = dM_ij M'_ij                            in place of dM (T_ij = T'_ij dt_j)
    /// colt_j = Σ_i T'_ij   (= x_j · D'_j)              rowt_i = Σ_j T'_ij dt_j
    /// ```
    ///
    /// `[Q, Q]` per head reaches memory twice (`M'` and `E`, bf16 with bf16 activations),
    /// where `dM` was written in f32 by a product and read by this kernel and by `dCB`'s.
    /// Both sums come from the same f32 tile, so their difference is as exact as its
    /// elements; the matrix form gets them from two f32 products instead.
    #[allow(clippy::too_many_arguments)]
    fn ssd_grad_mask_tiled(
        &mut self,
        node: NodeId,
        s: &Ssd,
        name: &str,
        pr: &Prep,
        (mp, dce): (BufId, BufId),
        (dxsu, yo): (BufId, BufId),
        sums: GradSums,
    ) -> Result<(), LowerError> {
        let GradSums { colt, rowt, u, yod } = sums;
        let ops = self.g.operands(node);
        let (x, dy) = (ops[0], ops[6]);
        let (ps, sqh) = (s.per_step(), s.square(&s.h));
        let (q, pk) = (s.q as usize, s.p_tile());
        let mut kb = KB::new(self, name);
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let [tt, td, ta, tdy, tx, tpu, tpy] = [0, 1, 2, 3, 4, 5, 6].map(TileId);
        declare_tiles(&mut kb, &s.grad_tiles());
        let step = |k: &IExpr| [b.clone(), c.clone(), h.clone(), k.clone()];
        let zero = IExpr::c(0);

        // dt and a per step; the chunk's rows of dy and x (a row segment of 16 bytes per
        // thread, zero past the sequence's end and past `P`), and with them the segment's
        // parts of `u_j = x_j · (dS_out B_j)` and `dy_j · (C_j S_inᵀ)` (the dots of a row,
        // summed over its segments in order below); then dM = dY Xᵀ.
        let stage = stage_steps(&mut kb, s, [&b, &c, &h], &[(td, pr.dtc), (ta, pr.acs)]);
        kb.body.push(stage);
        let (ci, cs, cu) = (kb.counter(), kb.counter(), kb.counter());
        let (i, sg) = (IExpr::Loop(ci), IExpr::Loop(cs));
        let p0 = sg.clone().mul(IExpr::c(SEG));
        let (tcl, ok) = s.clamped(&c, &i);
        let p = p0.clone().add(IExpr::Loop(cu));
        let (pc, ok) = if pk == s.pw {
            (p, ok)
        } else {
            let inside = IExpr::c(s.pw - 1 + pk).sub(p.clone()).div(IExpr::c(pk));
            (p.min(IExpr::c(s.pw - 1)), mul(ok, Expr::FromIndex(inside)))
        };
        let at = [b.clone(), tcl, h.clone(), pc.clone()];
        let (dyv, xv) = (kb.value(dy, &at)?, kb.value(x, &at)?);
        let (dv, d1) = var(&mut kb, mul(dyv, ok.clone()));
        let (xv, d2) = var(&mut kb, mul(xv, ok));
        let (gh, grow) = (
            s.group_heads(),
            [
                b.clone(),
                c.clone(),
                s.group(&h),
                i.clone(),
                s.in_group(&h, pc),
            ],
        );
        let (su, oy) = (ld(&mut kb, dxsu, &grow, &gh), ld(&mut kb, yo, &grow, &gh));
        let (pu, d3) = var(&mut kb, Expr::Const(0.0));
        let (py, d4) = var(&mut kb, Expr::Const(0.0));
        let pre = vec![
            d1,
            d2,
            Stmt::Set {
                var: pu,
                value: add(Expr::Var(pu), mul(Expr::Var(xv), su)),
            },
            Stmt::Set {
                var: py,
                value: add(Expr::Var(py), mul(Expr::Var(dv), oy)),
            },
        ];
        let vals = vec![Expr::Var(dv), Expr::Var(xv)];
        let fill = seg_run(&mut kb, cu, (pre, vals), |_, u, v| {
            let col = p0.clone().add(u.clone());
            Ok(vec![
                tile_set(tdy, &i, &col, v[0].clone()),
                tile_set(tx, &i, &col, v[1].clone()),
            ])
        })?;
        let mut body = vec![d3, d4];
        body.extend(fill);
        body.extend([
            tile_set(tpu, &i, &sg, Expr::Var(pu)),
            tile_set(tpy, &i, &sg, Expr::Var(py)),
        ]);
        kb.body
            .push(each(&[ci, cs], &[q, pk as usize / SEG as usize], body));
        let cj = kb.counter();
        let j = IExpr::Loop(cj);
        let mut body = Vec::new();
        for (tile, out) in [(tpu, u), (tpy, yod)] {
            let (sum, decl) = var(&mut kb, Expr::Const(0.0));
            let parts = for_(&mut kb, IExpr::c(pk / SEG), |_, sg| {
                vec![Stmt::Set {
                    var: sum,
                    value: add(Expr::Var(sum), tile_ld(tile, &j, &sg)),
                }]
            });
            let store = st(&mut kb, out, &step(&j), &ps, Expr::Var(sum));
            body.extend([decl, parts, store]);
        }
        kb.body.push(each(&[cj], &[q], body));
        kb.body.push(Stmt::Mma {
            acc: tt,
            a: tdy,
            b: tx,
            accumulate: false,
        });

        // M', E and T' by row segments of the lower triangle ([`seg_fold`]), zeros of M'
        // above it.
        let zeros = |kb: &mut KB, i: &IExpr, j0: &IExpr| {
            (0..SEG)
                .map(|u| {
                    let at = [
                        b.clone(),
                        c.clone(),
                        h.clone(),
                        i.clone(),
                        j0.clone().add(IExpr::c(u)),
                    ];
                    st(kb, mp, &at, &sqh, Expr::Const(0.0))
                })
                .collect()
        };
        let mask = seg_each(
            &mut kb,
            s.q,
            |kb, i, j0| {
                let r = mask_run(kb, s, pr, [&b, &c, &h], (ta, i, j0));
                let (e, de) = var(kb, r.decay);
                let (dm, dd) = var(kb, tile_ld(tt, i, &r.j));
                let (mv, dmv) = var(kb, mul(r.cb, Expr::Var(e)));
                let dtj = tile_ld(td, &zero, &r.j);
                let vals = vec![
                    mul(Expr::Var(dm), Expr::Var(mv)),
                    Expr::Var(mv),
                    mul(mul(Expr::Var(dm), Expr::Var(e)), dtj),
                ];
                let run = seg_run(kb, r.u, (vec![de, dd, dmv], vals), |kb, u, v| {
                    let col = j0.clone().add(u.clone());
                    let at = [b.clone(), c.clone(), h.clone(), i.clone(), col.clone()];
                    Ok(vec![
                        tile_set(tt, i, &col, v[0].clone()),
                        st(kb, mp, &at, &sqh, v[1].clone()),
                        st(kb, dce, &at, &sqh, v[2].clone()),
                    ])
                });
                Ok([vec![r.decl], run?].concat())
            },
            zeros,
        )?;
        kb.body.push(mask);

        // The sums over the triangle, a row (column) per iteration.
        for (out, by_row) in [(rowt, true), (colt, false)] {
            let ck = kb.counter();
            let k = IExpr::Loop(ck);
            let (sum, decl) = var(&mut kb, Expr::Const(0.0));
            // Row k: columns 0..=k; column k: rows k..Q.
            let len = if by_row {
                k.clone().add(IExpr::c(1))
            } else {
                IExpr::c(s.q).sub(k.clone())
            };
            let lp = for_(&mut kb, len, |_, l| {
                let term = if by_row {
                    mul(tile_ld(tt, &k, &l), tile_ld(td, &zero, &l))
                } else {
                    tile_ld(tt, &l.clone().add(k.clone()), &k)
                };
                vec![Stmt::Set {
                    var: sum,
                    value: add(Expr::Var(sum), term),
                }]
            });
            let store = st(&mut kb, out, &step(&k), &ps, Expr::Var(sum));
            kb.body.push(each(&[ck], &[q], vec![decl, lp, store]));
        }
        let grid_t = vec![kb.l.dim(&s.b), s.ch.count.clone(), kb.l.dim(&s.h)];
        kb.finish(grid_t, node);
        Ok(())
    }
}

/// Neighbouring elements of a tile row that one thread of a tiled kernel builds together
/// (16 bytes of bf16): the NVPTX backend unrolls the `For` over them, and LLVM merges their
/// loads and stores into vector accesses ([`seg_run`]).
const SEG: i64 = 8;

/// The row segments of `SEG` elements of a `Q x Q` matrix (`Q` a multiple of `2·SEG`) that
/// hold its lower triangle (an element `j <= i`; with `upper`, the segments wholly above the
/// diagonal) as the points `(r, t)` of a rectangle: row `r < Q/2` and row `Q-1-r` together
/// have `Q/SEG + 1` such segments (`Q/SEG - 1` above), so the rectangle is
/// `Q/2 x (Q/SEG + 1)` (`Q/2 x (Q/SEG - 1)`), covers each segment once, and no iteration of
/// an `Each` over it idles. Returns the segment's row `i` and first column `j0`.
fn seg_fold(q: i64, r: &IExpr, t: &IExpr, upper: bool) -> (IExpr, IExpr) {
    let n = q / SEG;
    let rs = r.clone().div(IExpr::c(SEG));
    // 1 where (r, t) lies in row Q - 1 - r: past row r's `rs + 1` segments (its `n - 1 - rs`
    // segments above).
    let second = if upper {
        t.clone().add(rs.clone()).add(IExpr::c(1)).div(IExpr::c(n))
    } else {
        t.clone()
            .add(IExpr::c(n))
            .sub(rs.clone())
            .div(IExpr::c(n + 1))
    };
    let i = r.clone().add(
        second
            .clone()
            .mul(IExpr::c(q - 1).sub(r.clone().mul(IExpr::c(2)))),
    );
    let seg = if upper {
        t.clone()
            .add(IExpr::c(1))
            .add(rs.clone())
            .sub(second.mul(rs))
    } else {
        t.clone().sub(second.mul(rs.add(IExpr::c(1))))
    };
    (i, seg.mul(IExpr::c(SEG)))
}

/// One `Each` over the row segments of a `Q x Q` tile: those holding its lower triangle
/// (`lower` gets each one's row and first column), and those wholly above it (`upper`), both
/// folded by [`seg_fold`]; the upper rectangle is two columns narrower, so iteration
/// `(r, t)` takes upper segment `(r, t)` too where `t < Q/SEG - 1`.
fn seg_each(
    kb: &mut KB,
    q: i64,
    lower: impl FnOnce(&mut KB, &IExpr, &IExpr) -> Result<Vec<Stmt>, LowerError>,
    upper: impl FnOnce(&mut KB, &IExpr, &IExpr) -> Vec<Stmt>,
) -> Result<Stmt, LowerError> {
    let (cr, ct) = (kb.counter(), kb.counter());
    let (r, t) = (IExpr::Loop(cr), IExpr::Loop(ct));
    let (i, j0) = seg_fold(q, &r, &t, false);
    let mut body = lower(kb, &i, &j0)?;
    let n = q / SEG;
    // 1 where t < n - 1 (t <= n).
    let has_upper = IExpr::c(2 * n - 2).sub(t.clone()).div(IExpr::c(n));
    let (iu, ju) = seg_fold(q, &r, &t, true);
    body.push(for_(kb, has_upper, |kb, _| upper(kb, &iu, &ju)));
    Ok(each(&[cr, ct], &[q as usize / 2, (n + 1) as usize], body))
}

/// A thread's `SEG` neighbouring elements: `pre` and `values` (in the counter `u`,
/// `0..SEG`) into local arrays (one per value) for every `u`, then `put(u, values)` for every
/// `u`, so that all of a segment's loads come before its stores (LLVM may then merge both;
/// the arrays become registers).
fn seg_run(
    kb: &mut KB,
    u: ir::kernel::LoopId,
    (pre, values): (Vec<Stmt>, Vec<Expr>),
    put: impl FnOnce(&mut KB, &IExpr, Vec<Expr>) -> Result<Vec<Stmt>, LowerError>,
) -> Result<Vec<Stmt>, LowerError> {
    let arrs: Vec<ArrId> = values.iter().map(|_| kb.arr()).collect();
    let mut out: Vec<Stmt> = arrs
        .iter()
        .map(|&arr| Stmt::Array {
            arr,
            len: SEG as usize,
            init: 0.0,
        })
        .collect();
    let mut sets = pre;
    sets.extend(arrs.iter().zip(values).map(|(&arr, value)| Stmt::ArrSet {
        arr,
        index: IExpr::Loop(u),
        value,
    }));
    out.push(Stmt::For {
        counter: u,
        extent: IExpr::c(SEG),
        body: sets,
    });
    let cv = kb.counter();
    let v = IExpr::Loop(cv);
    let loads = arrs
        .iter()
        .map(|&arr| Expr::ArrLoad {
            arr,
            index: v.clone(),
        })
        .collect();
    let body = put(kb, &v, loads)?;
    out.push(Stmt::For {
        counter: cv,
        extent: IExpr::c(SEG),
        body,
    });
    Ok(out)
}

/// The start of a mask row segment in a tiled kernel ([`seg_each`]) of head `h` in chunk `c`
/// of batch `b`: row `i`'s staged running sum `a_i` (`decl` declares it), the run's counter
/// `u` and column `j = j0 + u`, `CB_ij` and `exp(a_i - a_j) [j <= i]` ([`seg_decay`]).
struct MaskRun {
    decl: Stmt,
    u: ir::kernel::LoopId,
    j: IExpr,
    cb: Expr,
    decay: Expr,
}

fn mask_run(
    kb: &mut KB,
    s: &Ssd,
    pr: &Prep,
    [b, c, h]: [&IExpr; 3],
    (ta, i, j0): (TileId, &IExpr, &IExpr),
) -> MaskRun {
    let (ai, decl) = var(kb, tile_ld(ta, &IExpr::c(0), i));
    let u = kb.counter();
    let j = j0.clone().add(IExpr::Loop(u));
    let at = [b.clone(), c.clone(), s.group(h), i.clone(), j.clone()];
    let cb = ld(kb, pr.cb, &at, &s.square(&s.g));
    let decay = seg_decay(s.q, ta, Expr::Var(ai), (i, &j));
    MaskRun {
        decl,
        u,
        j,
        cb,
        decay,
    }
}

/// `exp(a_i - a_j) [j <= i]` in a tiled kernel: `ai` is row `i`'s running sum, `a_j` comes
/// from the staged `[1, Q]` tile `ta` ([`stage_steps`]). As in [`mask_value`], the exponent
/// is capped at 0 so that it stays finite above the diagonal, where the exact 0/1 indicator
/// zeroes it (only the diagonal segment has such elements).
fn seg_decay(q: i64, ta: TileId, ai: Expr, (i, j): (&IExpr, &IExpr)) -> Expr {
    let aj = tile_ld(ta, &IExpr::c(0), j);
    mul(capped_exp(ai, aj), Expr::FromIndex(on_or_below(q, i, j)))
}

fn each(counters: &[ir::kernel::LoopId], extents: &[usize], body: Vec<Stmt>) -> Stmt {
    Stmt::Each {
        counters: counters.to_vec(),
        extents: extents.iter().map(|&e| IExpr::c(e as i64)).collect(),
        body,
    }
}

impl Lowering<'_> {
    /// `SsdScanGrad` in the matrix form. With `dy`, `ds1` the cotangents and, per chunk,
    /// `dS_out` the cotangent of the state leaving it (`ds1` for the last, else the next
    /// chunk's `dS_in`), where `dS_in = exp(a_last) dS_out + Σ_i exp(a_i) dy_iᵀ C_i`:
    ///
    /// ```text
    /// dx_j  = (Mᵀ dY)_j + w_j (dS_out B_j)                dM = dY Xᵀ (masked)
    /// dCB   = Σ_heads dM ⊙ exp(a_i - a_j) dt_j            dC = dCB B + Σ_h exp(a) dY_h S_in,h
    /// dB    = dCBᵀ C + Σ_h (w ⊙ X_h) dS_out,h             ds0 = dS_in of the first chunk
    /// da_i  = Σ_j T_ij - Σ_k T_ki + exp(a_i) dy_i·(C_i S_inᵀ) - w_i u_i   (T = dM ⊙ M)
    ///         + [i = last] (exp(a_last) <dS_out, S_in> + Σ_j w_j u_j)
    /// u_j   = x_j · (dS_out B_j)
    /// ddt_j = Σ_i dM_ij CB_ij exp(a_i - a_j) + exp(a_last - a_j) u_j + A Σ_{i>=j} da_i
    /// dA    = Σ dt_j Σ_{i>=j} da_i
    /// ```
    ///
    /// Without tiles the row and column sums of `T` come from products too: with
    /// `M = M' diag(dt)`, `Σ_k T_jk = dy_j · Y_diag,j` (`Y_diag = M'(dt ⊙ X)`) and
    /// `Σ_i T_ij = dt_j x_j · D'_j` (`D' = M'ᵀ dY`, and `(Mᵀ dY)_j = dt_j D'_j`), whose
    /// `x_j · D'_j` is also `ddt`'s first term; both products are exact (f32), since `da`
    /// takes the difference of sums that nearly cancel. With tiles
    /// ([`Self::ssd_grad_mask_tiled`]) the sums come from `T` itself and `D'` is an ordinary
    /// product, and `dM = dY Xᵀ` is a tile product inside it. Nine products and twelve kernels
    /// (seven and eleven with tiles) after the prep's five kernels and three products (none
    /// with the forward's prep, [`LastPrep`], but a `dt ⊙ x` kernel without tiles); sums over
    /// heads, steps and chunks run in kernels in a fixed order.
    pub(super) fn ssd_matmul_grad(&mut self, node: NodeId, chunk: u64) -> Result<(), LowerError> {
        let s = Ssd::new(self, node, chunk)?;
        let g = self.g;
        let ops = g.operands(node);
        let (a, dy, ds1) = (ops[2], ops[6], ops[7]);
        let name = format!("ssd_scan_grad_{}", node.index());
        let outs: Vec<BufId> = (0..6)
            .map(|r| self.new_buf(Value::new(node, r), BufKind::Temp))
            .collect();
        // With tiles, the sums of T come from a tiled kernel ([`Self::ssd_grad_mask_tiled`])
        // and `dt ⊙ x` is not needed.
        let tiled = self.ssd_tiles && s.grad_tiles_fit();
        // With tiles, no product reads `x` as rows: the tiled kernel and the dots read `x`.
        let flags = (!tiled, !tiled);
        let mut pr = match self.kept_prep(node, &s, flags) {
            Some(pr) => pr,
            None => self.ssd_prep(node, &s, &name, None, flags)?,
        };
        if flags.1 && pr.xdt.is_none() {
            pr.xdt = Some(self.ssd_xdt(node, &s, &name, &pr)?);
        }
        let (ps, pc, hr, gr, gh, sts) = (
            s.per_step(),
            s.per_chunk(),
            s.head_rows(),
            s.group_rows(),
            s.group_heads(),
            s.states(),
        );
        let (sqh, sqg) = (s.square(&s.h), s.square(&s.g));
        // A chunk copy of `dy`: as `x`'s ([`Self::ssd_prep`]), f32 where an exact product
        // reads it.
        let dyc = if tiled {
            self.bf16_scratch(node, hr.clone())
        } else {
            self.scratch(node, hr.clone())
        };
        let dye = self.scratch(node, gh.clone());
        // With bf16 activations the own parts stay f32 for the carry, the carried dS_out (read
        // by products and summed in `<dS_out, S_in>`) is bf16, as the states are.
        let dst_own = self.scratch(node, sts.clone());
        let dst = if self.bf16_activations {
            self.bf16_scratch(node, sts.clone())
        } else {
            dst_own
        };
        let ch = &s.ch;
        let qc = IExpr::c(s.q);

        // dy as rows; exp(a) dy as group rows; per (batch, chunk, head, step, p).
        let mut kb = KB::new(self, &format!("{name}_dy"));
        let (b, c, h, i, p) = (grid(0), grid(1), grid(2), grid(3), grid(4));
        let (tc, ok) = s.clamped(&c, &i);
        let dv = kb.value(dy, &[b.clone(), tc, h.clone(), p.clone()])?;
        let (dv, decl) = var(&mut kb, mul(dv, ok));
        kb.body.push(decl);
        let e = ld(
            &mut kb,
            pr.ea,
            &[b.clone(), c.clone(), h.clone(), i.clone()],
            &ps,
        );
        let rows = [b.clone(), c.clone(), h.clone(), i.clone(), p.clone()];
        let grow = [b, c, s.group(&h), i, s.in_group(&h, p)];
        let s1 = st(&mut kb, dyc, &rows, &hr, Expr::Var(dv));
        let s2 = st(&mut kb, dye, &grow, &gh, mul(e, Expr::Var(dv)));
        kb.body.extend([s1, s2]);
        let grid_x = vec![
            kb.l.dim(&s.b),
            ch.count.clone(),
            kb.l.dim(&s.h),
            qc.clone(),
            kb.l.dim(&s.p),
        ];
        kb.finish(grid_x, node);

        // dS_in's own part Σ_i exp(a_i) dy_iᵀ C_i, then carried from the last chunk.
        self.gemm(
            node,
            (dye, pr.cc, dst_own),
            s.batch(&s.g),
            (&s.hp, &s.qd, &s.n),
            (true, false),
        );
        let carry_out = Some(outs[5]);
        self.ssd_carry(
            node,
            &s,
            &format!("{name}_carry_back"),
            (dst_own, dst, pr.ea),
            (ds1, true),
            carry_out,
        )?;

        // dY Xᵀ (in the tiled kernel with tiles), Mᵀ dY, dS_out B.
        // bf16 where rounded into dx; the exact product of the form without tiles keeps f32.
        let dxd = self.bf16_scratch(node, hr.clone());
        let sq = (&s.qd, &s.qd, &s.p);
        // M' = M without its dt_j column factor: D' = M'ᵀ dY. The column and row sums of T
        // (`colt_j = Σ_i dM_ij M'_ij`, `rowt_i = Σ_j T_ij`) come from a tiled kernel that
        // forms T itself, or from the dots kernel below and one more product, Y_diag. `dCB`
        // sums each head's terms `E = dM ⊙ exp(a_i - a_j) dt_j` that the tiled kernel wrote
        // (bf16 with bf16 activations: every head's term is rounded as dM's operands were),
        // or forms them from `dM`.
        let [colt, rowt] = [0; 2].map(|_| self.scratch(node, ps.clone()));
        // `B dS_outᵀ` and `C S_inᵀ` again, for `dx` and for `u_j = x_j · (dS_out B_j)` and
        // `dy_j · (C_j S_inᵀ)`, which the tiled kernel sums as it loads `x` and `dy` (else the
        // dots kernel below).
        let dxsu = self.bf16_scratch(node, gh.clone());
        self.gemm(
            node,
            (pr.bc, dst, dxsu),
            s.batch(&s.g),
            (&s.qd, &s.n, &s.hp),
            (false, true),
        );
        let yo = pr.yo;
        let [u, yod] = [0; 2].map(|_| self.scratch(node, ps.clone()));
        let (ydg, dcb_terms) = if tiled {
            let (mp, dce) = (
                self.scratch(node, sqh.clone()),
                self.bf16_scratch(node, sqh.clone()),
            );
            let mask = format!("{name}_mask_tiled");
            let sums = GradSums { colt, rowt, u, yod };
            self.ssd_grad_mask_tiled(node, &s, &mask, &pr, (mp, dce), (dxsu, yo), sums)?;
            self.gemm(node, (mp, dyc, dxd), s.batch(&s.h), sq, (true, false));
            (None, DcbTerms::Tiled(dce))
        } else {
            let xc = pr.xc.ok_or_else(|| internal(node, "no x rows"))?;
            let dmm = self.scratch(node, sqh.clone());
            self.gemm(
                node,
                (dyc, xc, dmm),
                s.batch(&s.h),
                (&s.qd, &s.p, &s.qd),
                (false, true),
            );
            // M' transposed; both products feed row and column sums of T whose difference
            // (in da) cancels: exact.
            let mmt = self.scratch(node, sqh.clone());
            self.ssd_mask(node, &s, &format!("{name}_mask"), &pr, mmt, (true, false));
            self.gemm_with(
                node,
                (mmt, dyc, dxd),
                s.batch(&s.h),
                sq,
                (false, false),
                true,
            );
            let ydg = self.scratch(node, hr.clone());
            let xdt = pr.xdt.ok_or_else(|| internal(node, "no dt ⊙ x rows"))?;
            self.gemm_with(
                node,
                (mmt, xdt, ydg),
                s.batch(&s.h),
                sq,
                (true, false),
                true,
            );
            (Some((ydg, xc)), DcbTerms::FromDm(dmm))
        };
        // dCB per (batch, chunk, group, i), summed over the group's heads, zero above the
        // diagonal: a row's `j` loop has the constant extent `Q`, so for `Q >= 64`
        // ([`ir::lanes::MIN_SPLIT_EXTENT`]) a warp shares it (lanes read consecutive `j`) and
        // each lane walks the heads; a row of unknown length took a block of 256 lanes, of
        // which at most `Q` had work.
        let dcb = self.scratch(node, sqg.clone());
        let mut kb = KB::new(self, &format!("{name}_dcb"));
        let (b, c, gg, i) = (grid(0), grid(1), grid(2), grid(3));
        let row = for_(&mut kb, qc.clone(), |kb, j| {
            let (sum, decl) = var(kb, Expr::Const(0.0));
            let below = on_or_below(s.q, &i, &j);
            let heads = for_(kb, below.mul(IExpr::c(s.hpg)), |kb, hl| {
                let h = gg.clone().mul(IExpr::c(s.hpg)).add(hl);
                let at = [b.clone(), c.clone(), h.clone(), i.clone(), j.clone()];
                let term = match dcb_terms {
                    DcbTerms::Tiled(dce) => ld(kb, dce, &at, &sqh),
                    DcbTerms::FromDm(dmm) => {
                        let step = |kb: &mut KB, buf: BufId, k: &IExpr| {
                            ld(kb, buf, &[b.clone(), c.clone(), h.clone(), k.clone()], &ps)
                        };
                        let (ai, aj, dtj) = (
                            step(kb, pr.acs, &i),
                            step(kb, pr.acs, &j),
                            step(kb, pr.dtc, &j),
                        );
                        let dm = ld(kb, dmm, &at, &sqh);
                        mul(mul(dm, exp(sub(ai, aj))), dtj)
                    }
                };
                vec![Stmt::Set {
                    var: sum,
                    value: add(Expr::Var(sum), term),
                }]
            });
            let ij = [b.clone(), c.clone(), gg.clone(), i.clone(), j];
            vec![decl, heads, st(kb, dcb, &ij, &sqg, Expr::Var(sum))]
        });
        kb.body.push(row);
        let grid_q = |kb: &KB, by: &Dim| {
            vec![
                kb.l.dim(&s.b),
                ch.count.clone(),
                kb.l.dim(by),
                IExpr::c(s.q),
            ]
        };
        let gq = grid_q(&kb, &s.g);
        kb.finish(gq, node);

        // dC's and dB's two parts each.
        let [dcd, dco, dbd, dbs] = [0; 4].map(|_| self.scratch(node, gr.clone()));
        self.gemm(
            node,
            (dcb, pr.bc, dcd),
            s.batch(&s.g),
            (&s.qd, &s.qd, &s.n),
            (false, false),
        );
        self.gemm(
            node,
            (dye, pr.sin, dco),
            s.batch(&s.g),
            (&s.qd, &s.hp, &s.n),
            (false, false),
        );
        self.gemm(
            node,
            (dcb, pr.cc, dbd),
            s.batch(&s.g),
            (&s.qd, &s.qd, &s.n),
            (true, false),
        );
        self.gemm(
            node,
            (pr.xs, dst, dbs),
            s.batch(&s.g),
            (&s.qd, &s.hp, &s.n),
            (false, false),
        );

        // dx, per (batch, step, head, p).
        let mut kb = KB::new(self, &format!("{name}_dx"));
        let (b, t, h, p) = (grid(0), grid(1), grid(2), grid(3));
        let (c, j) = (t.clone().div(qc.clone()), t.clone().rem(qc.clone()));
        let at = [b.clone(), c.clone(), h.clone()];
        let (c_dt, j_dt) = (c.clone(), j.clone());
        let w = ssd_weight(&mut kb, &s, &pr, &at, &j);
        let d = ld(
            &mut kb,
            dxd,
            &[b.clone(), c.clone(), h.clone(), j.clone(), p.clone()],
            &hr,
        );
        let su = ld(
            &mut kb,
            dxsu,
            &[b.clone(), c, s.group(&h), j, s.in_group(&h, p.clone())],
            &gh,
        );
        let dtj = ld(&mut kb, pr.dtc, &[b.clone(), c_dt, h.clone(), j_dt], &ps);
        let xsh = kb.l.shape(ops[0]);
        let store = st(
            &mut kb,
            outs[0],
            &[b, t, h, p],
            &xsh,
            add(mul(dtj, d), mul(w, su)),
        );
        kb.body.push(store);
        let grid_x = xsh.iter().map(|d| kb.l.dim(d)).collect();
        kb.finish(grid_x, node);

        // Without tiles, per (batch, chunk, head, j): u_j = x_j · (dS_out B_j),
        // dy_j · (C_j S_inᵀ), colt_j = x_j · D'_j (so Σ_i T_ij = dt_j x_j · D'_j) and
        // rowt_j = dy_j · Y_diag,j.
        if let Some((ydg, xc)) = ydg {
            let mut kb = KB::new(self, &format!("{name}_dots"));
            let (b, c, h, j) = (grid(0), grid(1), grid(2), grid(3));
            let vars: Vec<(VarId, Stmt)> = (0..4).map(|_| var(&mut kb, Expr::Const(0.0))).collect();
            let [uv, yv, cv, rv] = [0, 1, 2, 3].map(|k| vars[k].0);
            kb.body.extend(vars.into_iter().map(|(_, d)| d));
            let dots = for_(&mut kb, IExpr::c(s.pw), |kb, p| {
                let rows = [b.clone(), c.clone(), h.clone(), j.clone(), p.clone()];
                let grow = [
                    b.clone(),
                    c.clone(),
                    s.group(&h),
                    j.clone(),
                    s.in_group(&h, p),
                ];
                let xe = ld(kb, xc, &rows, &hr);
                let (xv, d1) = var(kb, xe);
                let de = ld(kb, dyc, &rows, &hr);
                let (dv, d2) = var(kb, de);
                let (xv, dv) = (Expr::Var(xv), Expr::Var(dv));
                let terms = [
                    (uv, xv.clone(), ld(kb, dxsu, &grow, &gh)),
                    (yv, dv.clone(), ld(kb, yo, &grow, &gh)),
                    (cv, xv, ld(kb, dxd, &rows, &hr)),
                    (rv, dv, ld(kb, ydg, &rows, &hr)),
                ];
                let mut body = vec![d1, d2];
                body.extend(terms.into_iter().map(|(v, a, b)| Stmt::Set {
                    var: v,
                    value: add(Expr::Var(v), mul(a, b)),
                }));
                body
            });
            kb.body.push(dots);
            let at = [b, c, h, j];
            for (buf, v) in [(u, uv), (yod, yv), (colt, cv), (rowt, rv)] {
                let store = st(&mut kb, buf, &at, &ps, Expr::Var(v));
                kb.body.push(store);
            }
            let gq = grid_q(&kb, &s.h);
            kb.finish(gq, node);
        }

        // <dS_out, S_in> per (batch, chunk, head).
        let dl = self.scratch(node, pc.clone());
        let mut kb = KB::new(self, &format!("{name}_dlast"));
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let (sum, decl) = var(&mut kb, Expr::Const(0.0));
        kb.body.push(decl);
        let pn = IExpr::c(s.pw).mul(kb.l.dim(&s.n));
        let nd = kb.l.dim(&s.n);
        let dot = for_(&mut kb, pn, |kb, e| {
            let idx = [
                b.clone(),
                c.clone(),
                h.clone(),
                e.clone().div(nd.clone()),
                e.rem(nd.clone()),
            ];
            let v = mul(ld(kb, dst, &idx, &sts), ld(kb, pr.sin, &idx, &sts));
            vec![Stmt::Set {
                var: sum,
                value: add(Expr::Var(sum), v),
            }]
        });
        kb.body.push(dot);
        let store = st(&mut kb, dl, &[b, c, h], &pc, Expr::Var(sum));
        kb.body.push(store);
        let grid_c = vec![kb.l.dim(&s.b), ch.count.clone(), kb.l.dim(&s.h)];
        kb.finish(grid_c.clone(), node);

        // Per step, what needs no sum over steps: da_i without the last step's extra terms,
        // and ddt_i's own part colt_i + exp(a_last - a_i) u_i. Parallel over the steps, so
        // the backward walk below loads one value per step, not seven (the walk runs in
        // every lane of its warp, one step after another: 0.38 ms at H = 80, L = 65536).
        let [das, dto] = [0; 2].map(|_| self.scratch(node, ps.clone()));
        let mut kb = KB::new(self, &format!("{name}_ddt_terms"));
        let at4 = [grid(0), grid(1), grid(2), grid(3)];
        let step = |kb: &mut KB, buf: BufId| ld(kb, buf, &at4, &ps);
        let vars: Vec<(VarId, Stmt)> = [pr.dtc, colt, u, pr.el]
            .into_iter()
            .map(|buf| {
                let e = step(&mut kb, buf);
                var(&mut kb, e)
            })
            .collect();
        let [dtv, d1v, uv, lv] = [0, 1, 2, 3].map(|k| Expr::Var(vars[k].0));
        kb.body.extend(vars.into_iter().map(|(_, d)| d));
        let (rowt_i, ea_i, yod_i) = (
            step(&mut kb, rowt),
            step(&mut kb, pr.ea),
            step(&mut kb, yod),
        );
        let da = sub(
            add(sub(rowt_i, mul(d1v.clone(), dtv.clone())), mul(ea_i, yod_i)),
            mul(mul(dtv, lv.clone()), uv.clone()),
        );
        let own = add(d1v, mul(lv, uv));
        let (s1, s2) = (
            st(&mut kb, das, &at4, &ps, da),
            st(&mut kb, dto, &at4, &ps, own),
        );
        kb.body.extend([s1, s2]);
        let gq = grid_q(&kb, &s.h);
        kb.finish(gq, node);

        // R_i = exp(a_last) <dS_out, S_in> + Σ_j w_j u_j + Σ_{k >= i} da_k per (batch, chunk,
        // head), backwards over the steps: one load and one store per step, since the walk
        // runs in every lane of its warp, one step after another.
        let rs = self.scratch(node, ps.clone());
        let mut kb = KB::new(self, &format!("{name}_ddt_sums"));
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let at = [b.clone(), c.clone(), h.clone()];
        let step = |kb: &mut KB, buf: BufId, i: &IExpr| {
            ld(kb, buf, &[b.clone(), c.clone(), h.clone(), i.clone()], &ps)
        };
        let decay = step(&mut kb, pr.ea, &IExpr::c(s.q - 1));
        let dlv = ld(&mut kb, dl, &at, &pc);
        let (rv, d2) = var(&mut kb, mul(decay, dlv));
        kb.body.push(d2);
        let ext = for_(&mut kb, qc.clone(), |kb, j| {
            let w = ssd_weight(kb, &s, &pr, &at, &j);
            let uj = step(kb, u, &j);
            vec![Stmt::Set {
                var: rv,
                value: add(Expr::Var(rv), mul(w, uj)),
            }]
        });
        kb.body.push(ext);
        let back = for_(&mut kb, qc.clone(), |kb, k| {
            let i = IExpr::c(s.q - 1).sub(k);
            let dai = step(kb, das, &i);
            vec![
                Stmt::Set {
                    var: rv,
                    value: add(Expr::Var(rv), dai),
                },
                st(
                    kb,
                    rs,
                    &[b.clone(), c.clone(), h.clone(), i],
                    &ps,
                    Expr::Var(rv),
                ),
            ]
        });
        kb.body.push(back);
        kb.finish(grid_c.clone(), node);

        // ddt_i = own_i + A R_i and each chunk's part of dA, Σ_i dt_i R_i, per (batch, chunk,
        // head): the steps are independent (a warp shares them).
        let dap = self.scratch(node, pc.clone());
        let mut kb = KB::new(self, &format!("{name}_ddt"));
        let (b, c, h) = (grid(0), grid(1), grid(2));
        let at = [b.clone(), c.clone(), h.clone()];
        let av = kb.value(a, std::slice::from_ref(&h))?;
        let step = |kb: &mut KB, buf: BufId, i: &IExpr| {
            ld(kb, buf, &[b.clone(), c.clone(), h.clone(), i.clone()], &ps)
        };
        let (dav, d3) = var(&mut kb, Expr::Const(0.0));
        kb.body.push(d3);
        let dts = kb.l.shape(ops[1]);
        let terms = for_(&mut kb, qc.clone(), |kb, i| {
            let (ri, owni, dti) = (step(kb, rs, &i), step(kb, dto, &i), step(kb, pr.dtc, &i));
            let (rv, d1) = var(kb, ri);
            let ddt = add(owni, mul(av.clone(), Expr::Var(rv)));
            let t = ch.start(&c).add(i.clone());
            let store = for_(kb, s.valid(&c, &i), |kb, _| {
                vec![st(kb, outs[1], &[b.clone(), t, h.clone()], &dts, ddt)]
            });
            vec![
                d1,
                store,
                Stmt::Set {
                    var: dav,
                    value: add(Expr::Var(dav), mul(dti, Expr::Var(rv))),
                },
            ]
        });
        kb.body.push(terms);
        let store = st(&mut kb, dap, &at, &pc, Expr::Var(dav));
        kb.body.push(store);
        kb.finish(grid_c, node);

        // dA per head: the chunks' parts in order.
        let mut kb = KB::new(self, &format!("{name}_da"));
        let h = grid(0);
        let (sum, decl) = var(&mut kb, Expr::Const(0.0));
        kb.body.push(decl);
        let bext = kb.l.dim(&s.b);
        let sum_b = for_(&mut kb, bext, |kb, b| {
            vec![for_(kb, ch.count.clone(), |kb, c| {
                let v = ld(kb, dap, &[b.clone(), c, h.clone()], &pc);
                vec![Stmt::Set {
                    var: sum,
                    value: add(Expr::Var(sum), v),
                }]
            })]
        });
        kb.body.push(sum_b);
        let ash = kb.l.shape(ops[2]);
        let store = st(
            &mut kb,
            outs[2],
            std::slice::from_ref(&h),
            &ash,
            Expr::Var(sum),
        );
        kb.body.push(store);
        let grid_h = vec![kb.l.dim(&s.h)];
        kb.finish(grid_h, node);

        // dB, dC, per (batch, step, group, n).
        let mut kb = KB::new(self, &format!("{name}_dbc"));
        let (b, t, gg, nn) = (grid(0), grid(1), grid(2), grid(3));
        let (c, j) = (t.clone().div(qc.clone()), t.clone().rem(qc));
        let at = [b.clone(), c, gg.clone(), j, nn.clone()];
        let bsh = kb.l.shape(ops[3]);
        let out_at = [b, t, gg, nn];
        let mut stores = Vec::new();
        for (out, parts) in [(outs[3], [dbd, dbs]), (outs[4], [dcd, dco])] {
            let v = add(
                ld(&mut kb, parts[0], &at, &gr),
                ld(&mut kb, parts[1], &at, &gr),
            );
            stores.push(st(&mut kb, out, &out_at, &bsh, v));
        }
        kb.body.extend(stores);
        let grid_b = bsh.iter().map(|d| kb.l.dim(d)).collect();
        kb.finish(grid_b, node);
        Ok(())
    }
}

/// `w_j = dt_j exp(a_last - a_j)` of step `j` at (batch, chunk, head) `at`.
fn ssd_weight(kb: &mut KB, s: &Ssd, pr: &Prep, at: &[IExpr; 3], j: &IExpr) -> Expr {
    let idx = [at[0].clone(), at[1].clone(), at[2].clone(), j.clone()];
    ssd_weight_at(kb, s, (pr.dtc, pr.el), &idx)
}

/// `w` at (batch, chunk, head, step) `at`, from the `dt` and `exp(a_last - a)` buffers.
fn ssd_weight_at(kb: &mut KB, s: &Ssd, (dtc, el): (BufId, BufId), at: &[IExpr; 4]) -> Expr {
    let ps = s.per_step();
    let dtj = ld(kb, dtc, at, &ps);
    mul(dtj, ld(kb, el, at, &ps))
}

#[cfg(test)]
mod tests {
    use super::{SEG, seg_fold};
    use ir::kernel::IExpr;
    use ir::kernel::eval::extent;

    /// The folded rectangles cover each segment of their triangle exactly once: the lower
    /// one every segment holding an element `j <= i`, the upper one the rest.
    #[test]
    fn seg_fold_covers_each_segment_once() {
        for q in [16i64, 32, 64, 128] {
            let n = q / SEG;
            let mut seen = vec![0u32; (q * n) as usize];
            for upper in [false, true] {
                let (i, j0) = seg_fold(q, &IExpr::Size(0), &IExpr::Size(1), upper);
                let cols = if upper { n - 1 } else { n + 1 };
                for r in 0..q / 2 {
                    for t in 0..cols {
                        let at = |e: &IExpr| extent(e, &[r, t]).unwrap().unwrap();
                        let (i, j0) = (at(&i), at(&j0));
                        assert!((0..q).contains(&i), "{q} {r} {t}");
                        assert!((0..q).contains(&j0) && j0 % SEG == 0, "{q} {r} {t}");
                        assert_eq!(j0 > i, upper, "q {q}, (r, t) = ({r}, {t}) -> ({i}, {j0})");
                        seen[(i * n + j0 / SEG) as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "q {q}: {seen:?}");
        }
    }
}
