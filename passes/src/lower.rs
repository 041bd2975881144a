//! Lowering: a graph becomes kernels, matrix products and a launch schedule.
//!
//! Fusion is by inlining. A value is *materialized* (given a buffer) when it must be: graph
//! inputs, parameters and outputs, results of the ops that need loops of their own (reduce,
//! gather, concat, conv, scans), operands of matrix products (a GEMM library reads
//! buffers), and values used more than once unless they are cheap to recompute (constants,
//! views of buffers). Everything else — elementwise math, casts, broadcasts, slices,
//! reshapes, permutes — is inlined as an expression at every place that reads it, with the
//! index arithmetic of the views composed. So an elementwise chain becomes one kernel, and
//! each reduction, conv and scan kernel computes its own prologue (`softplus(dt + bias)` is
//! evaluated inside the scan; the discretized `[B, L, E, N]` tensors never exist).
//!
//! A reshape of a materialized buffer is an alias of it, not a copy.
//!
//! The scans run chunk-parallel over time (`selective_scan`, `ssd_scan`): chunks scanned from
//! zero states in parallel, a cheap sequential carry of the states across chunks, and the
//! chunks rescanned from their start states, so their grids grow with `B·ceil(L/Q)`.
//!
//! The backward and loss ops get kernels of their own (see `cross_entropy`, `conv_grad`,
//! `selective_scan_grad`, `ssd_scan_grad`). Sums over grid points (`dA`, `dB`, `dC`) are
//! reduced by later kernels of the same op, never by racing writes, in a fixed order. A
//! scan's gradient does not keep every forward state: it checkpoints the state entering and
//! the state cotangent leaving every chunk of `Q` steps in scratch buffers
//! (`[B, ceil(L/Q), E, N]`), found chunk-parallel as the forward scans find their start
//! states, and each of its later kernels recomputes a chunk's states from them where it
//! needs them, with the forward sweep's arithmetic. Scratch memory is `O(B·E·N·L/Q)`, not
//! `O(B·L·E·N)`.
//!
//! The result is executable by any backend that runs [`ir::kernel::Kernel`]s and row-major
//! f32 matrix products: steps in graph order, which is a topological order.

use ir::kernel::{ArrId, Expr, IExpr, KBuf, Kernel, LoopId, Stmt, VarId};
pub use ir::schedule::{BufId, BufInfo, BufKind, Lowered, Product, Step};
use ir::{BinaryOp, DType, Dim, Graph, InputKind, NodeId, Op, ReduceOp, Shape, UnaryOp, Value};
use std::collections::HashMap;

/// Why a graph cannot be lowered.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LowerError {
    #[error("{node} (`{op}`): {message}")]
    Unsupported {
        node: NodeId,
        op: &'static str,
        message: String,
    },
}

/// Options of the lowering.
#[derive(Clone, Debug, Default)]
pub struct LowerOptions {
    /// Materialize every value (no fusion): the differential baseline for fusion.
    pub no_fusion: bool,
    /// Forward selective scans (Mamba-1, and the SSD with `ssd_scans`) as one sequential
    /// kernel per op (a grid point per state row walks every step), not chunk-parallel: the
    /// CPU's form for whole-sequence runs, where the few cores are busy anyway and the
    /// chunk-parallel form does twice the work. The planner prices the default
    /// (chunk-parallel) form, so checkpointed runs keep it.
    pub sequential_scans: bool,
    /// The Mamba-2 SSD and its gradient as scans over time (the recurrence, chunk-parallel or
    /// sequential) instead of the matrix form ([`ssd_matmul`], most of the work as batched
    /// GEMMs), which is the default on both devices: 2.2x faster for the mamba2-130m forward
    /// and 4.3x for its training step on the CPU, and what the GPU needs. The decode step
    /// (`L = 1`) is one sequential kernel either way.
    pub ssd_scans: bool,
    /// Activations stored as bf16 and matrix products on bf16 operands with f32 accumulation
    /// ([`bf16`] says which values stay f32: parameters, states, gradients, the loss).
    pub bf16_activations: bool,
    /// The SSD forward's output as one tiled kernel (tensor-core tile products on bf16
    /// operands in shared memory, [`ir::tile`]), and the gradient's masked decay matrix with
    /// the sums of `dM ⊙ M` as another, where the sizes allow: what the GPU runs with bf16
    /// activations ([`LowerOptions::on_gpu`]). The CPU runs tile products as scalar loops,
    /// slower than its GEMMs, so it keeps the products.
    pub ssd_tiles: bool,
    /// The SSD's carries across chunks as tiled kernels (a block per up to 256 state
    /// elements loads 32 chunks of them to shared memory per round and walks them there),
    /// where `P·N` is a multiple of 32: what the GPU runs ([`LowerOptions::on_gpu`]). The
    /// per-element carry has a few loads in flight per thread; on the CPU it is the cheaper
    /// form.
    pub tiled_carries: bool,
}

impl LowerOptions {
    /// Whole-sequence runs on the CPU: sequential Mamba-1 scans (the SSD stays in the matrix
    /// form).
    pub fn cpu() -> LowerOptions {
        LowerOptions {
            sequential_scans: true,
            ..LowerOptions::default()
        }
    }

    /// What the GPU runs: these options with the tiled SSD kernels (`ssd_tiles`) where
    /// activations are bf16 (the forward's tile products take bf16 operands; f32
    /// activations keep f32 or TF32 products), and tiled carries (`tiled_carries`) always.
    pub fn on_gpu(&self) -> LowerOptions {
        LowerOptions {
            ssd_tiles: self.ssd_tiles || self.bf16_activations,
            tiled_carries: true,
            ..self.clone()
        }
    }

    /// The SSD as scans over time (`ssd_scans`): the differential baseline of the matrix
    /// form.
    pub fn ssd_scans() -> LowerOptions {
        LowerOptions {
            ssd_scans: true,
            ..LowerOptions::default()
        }
    }
}

pub mod bf16;
mod conv;
mod reduce;
mod ssd_matmul;
pub use ssd_matmul::MAX_SSD_MATMUL_CHUNK;

/// Chunks whose values a carry across chunks ([`carry`]) loads before it updates them. The
/// carries are bound by loads in flight: the SSD's at H = 80, L = 65536 took 3.2 ms with 8
/// and 2.0 ms with 16 on the H200 (the Mamba-1 and `ssd_scans` carries use it too; they
/// were not timed with it).
const CARRY_BATCH: i64 = 16;

/// Steps per checkpoint of the Mamba-1 scan gradient. Its scratch is a state, a state
/// cotangent and a decay product per chunk (`[B, ceil(L/Q), E, N]` each): `3·B·E·N·ceil(L/Q)`
/// floats, `3N/Q` times `x` (3/4 at d_state 16). Its grids are `B·ceil(L/Q)·E` points, each
/// recomputing `Q` steps per state element in `[Q]` local arrays; the carry across chunks
/// runs `ceil(L/Q)` steps.
pub const SELECTIVE_GRAD_CHUNK: u64 = 64;

/// Steps per chunk of the chunk-parallel Mamba-1 forward scan. Its grid is `B·ceil(L/Q)·E`
/// points and its scratch `2·B·ceil(L/Q)·E·N` floats (`2N/Q = 1/2` of `x` at d_state 16);
/// each point runs `2Q` steps, the carry between chunks `ceil(L/Q)`.
pub const SELECTIVE_SCAN_CHUNK: u64 = 64;

/// The most steps per chunk of the chunk-parallel Mamba-2 forward scan, which otherwise takes
/// its op's `chunk`. Its grid is `B·ceil(L/Q)·H·P` points and its scratch about
/// `B·ceil(L/Q)·H·P·N` floats (`N/Q` of `x`: twice `x` at d_state 128); each point runs `2Q`
/// steps, the carry between chunks `ceil(L/Q)`.
pub const MAX_SSD_SCAN_CHUNK: u64 = 64;

/// The most steps per checkpoint of the Mamba-2 scan gradient, which otherwise takes its op's
/// `chunk` (256 in the published configs): its kernels recompute a chunk one state element at
/// a time, so `Q` costs only a few `[Q]` local arrays per grid point while the checkpoints
/// shrink as `1/Q`. The cap bounds the local arrays (at most 7
/// per kernel, 28 KiB at 1024).
pub const MAX_SSD_GRAD_CHUNK: u64 = 1024;

/// Lowers `g` for f32 compute (parameters and activations stored as f32, or activations as
/// bf16 with [`LowerOptions::bf16_activations`]).
pub fn lower(g: &Graph, opts: &LowerOptions) -> Result<Lowered, LowerError> {
    let mut syms: Vec<String> = Vec::new();
    for n in g.nodes() {
        for t in g.types(n) {
            for d in &t.shape {
                for s in d.syms() {
                    if !syms.contains(s) {
                        syms.push(s.clone());
                    }
                }
            }
        }
    }
    let mut l = Lowering {
        g,
        syms,
        buf_of: HashMap::new(),
        out: Lowered {
            kernels: Vec::new(),
            steps: Vec::new(),
            buffers: Vec::new(),
            syms: Vec::new(),
            outputs: Vec::new(),
        },
        materialize: vec![false; g.len()],
        epilogues: HashMap::new(),
        fused: Default::default(),
        unstored: Default::default(),
        row_prologues: HashMap::new(),
        sequential_scans: opts.sequential_scans,
        ssd_scans: opts.ssd_scans,
        ssd_tiles: opts.ssd_tiles,
        tiled_carries: opts.tiled_carries,
        bf16_activations: opts.bf16_activations,
        bf16_marked: Vec::new(),
        ssd_last_prep: None,
    };
    l.decide(opts);
    if !opts.no_fusion {
        l.find_epilogues();
        l.find_row_fusions();
    }
    // Inputs and parameters first: an epilogue may read one declared after its producer.
    for n in g.nodes() {
        if matches!(g.op(n), Op::Input { .. } | Op::Param { .. }) {
            l.node(n)?;
        }
    }
    for n in g.nodes() {
        if !matches!(g.op(n), Op::Input { .. } | Op::Param { .. }) {
            l.node(n)?;
        }
    }
    for (name, v) in g.outputs() {
        let b = l.buffer_of(*v)?;
        l.out.outputs.push((name.clone(), b));
    }
    l.out.syms = l.syms.clone();
    let mut out = l.out;
    if opts.bf16_activations {
        bf16::store_bf16(&mut out, g, &l.bf16_marked);
    }
    Ok(out)
}

struct Lowering<'g> {
    g: &'g Graph,
    /// [`LowerOptions::sequential_scans`].
    sequential_scans: bool,
    /// [`LowerOptions::ssd_scans`].
    ssd_scans: bool,
    /// [`LowerOptions::ssd_tiles`].
    ssd_tiles: bool,
    /// [`LowerOptions::tiled_carries`].
    tiled_carries: bool,
    /// [`LowerOptions::bf16_activations`].
    bf16_activations: bool,
    /// Scratch whose values are bf16 already or whose readers need them only at bf16
    /// precision: bf16 with [`LowerOptions::bf16_activations`] ([`bf16::store_bf16`]).
    bf16_marked: Vec<BufId>,
    /// The scratch of the last SSD node lowered when it was a forward in the matrix form:
    /// its gradient, lowered next, reads it instead of computing it again
    /// ([`ssd_matmul::LastPrep`]).
    ssd_last_prep: Option<ssd_matmul::LastPrep>,
    syms: Vec<String>,
    buf_of: HashMap<Value, BufId>,
    out: Lowered,
    /// Per node: its results get buffers.
    materialize: Vec<bool>,
    /// Epilogues: materialized elementwise nodes computed inside the conv/scan kernel that
    /// produces the one kernel result they depend on, keyed by that producer.
    epilogues: HashMap<NodeId, Vec<NodeId>>,
    /// Nodes emitted as an epilogue (they get no kernel of their own).
    fused: std::collections::HashSet<NodeId>,
    /// Kernel results read only through epilogues: never stored.
    unstored: std::collections::HashSet<Value>,
    /// Row prologues: elementwise values computed (and stored) inside the row reduction
    /// that reads them, keyed by the reduction.
    row_prologues: HashMap<NodeId, Vec<NodeId>>,
}

/// Ops that need a kernel shape of their own (loops, or several results).
fn needs_own_kernel(op: &Op) -> bool {
    match op {
        Op::Reduce { .. }
        | Op::Gather
        | Op::Concat { .. }
        | Op::CausalConv1d
        | Op::SelectiveScan
        | Op::SsdScan { .. }
        | Op::CausalConv1dGrad
        | Op::SelectiveScanGrad
        | Op::SsdScanGrad { .. }
        | Op::CrossEntropy { .. }
        | Op::CrossEntropyGrad { .. }
        | Op::MatMul { .. }
        | Op::Input { .. }
        | Op::Param { .. } => true,
        Op::Const { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Cast { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Broadcast { .. }
        | Op::Slice { .. } => false,
    }
}

/// Whether `perm` swaps the last two axes and keeps the others: a matrix transpose.
fn is_transpose(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i)
}

fn is_view(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. } | Op::Permute { .. } | Op::Broadcast { .. } | Op::Slice { .. }
    )
}

impl<'g> Lowering<'g> {
    /// The source of operand `i` of product `n` where that operand is a transpose
    /// (`permute` of the last two axes) the product can read transposed instead: the lhs
    /// when it is a single matrix or the rhs is batched (a transposed lhs cannot be merged
    /// into the rows of one product with a shared weight), the rhs always. The weight
    /// gradients `xᵀ dy` (the LM head's `[V, B·L]` above all) then copy nothing.
    fn transposed_operand(&self, n: NodeId, i: usize) -> Option<Value> {
        let g = self.g;
        if !matches!(g.op(n), Op::MatMul { .. }) {
            return None;
        }
        let ops = g.operands(n);
        let v = *ops.get(i)?;
        let Op::Permute { perm } = g.op(v.node) else {
            return None;
        };
        if !is_transpose(perm) {
            return None;
        }
        let rhs_batched = self.shape(ops[1]).len() > 2;
        (i == 1 || perm.len() == 2 || rhs_batched).then(|| g.operands(v.node)[0])
    }

    /// Which nodes get buffers (see the module doc).
    fn decide(&mut self, opts: &LowerOptions) {
        let g = self.g;
        let mut uses = vec![0usize; g.len()];
        let mut gemm_operand = vec![false; g.len()];
        for n in g.nodes() {
            let operands = g.operands(n);
            for v in &operands {
                uses[v.node.index()] += 1;
            }
            if matches!(g.op(n), Op::MatMul { .. } | Op::Gather) {
                for (i, v) in operands.iter().enumerate() {
                    // A transposed operand of a product: the product reads its source
                    // transposed instead (`transposed_operand`).
                    let v = match self.transposed_operand(n, i) {
                        Some(src) => src,
                        None => *v,
                    };
                    gemm_operand[v.node.index()] = true;
                }
            }
        }
        for (_, v) in g.outputs() {
            uses[v.node.index()] += 1;
            gemm_operand[v.node.index()] = true;
        }
        // Cheap to recompute at every use: constants, and chains of views ending in buffers
        // (only index arithmetic and a load).
        let mut cheap_view = vec![false; g.len()];
        for n in g.nodes() {
            let op = g.op(n);
            let i = n.index();
            let cheap = match op {
                Op::Const { .. } => true,
                o if is_view(o) => g
                    .operands(n)
                    .iter()
                    .all(|v| self.materialize[v.node.index()] || cheap_view[v.node.index()]),
                _ => false,
            };
            cheap_view[i] = cheap && is_view(op);
            self.materialize[i] = needs_own_kernel(op)
                || gemm_operand[i]
                || (uses[i] > 1 && !cheap)
                || (opts.no_fusion && !matches!(op, Op::Const { .. }));
        }
    }

    /// Finds epilogues (module doc): a materialized elementwise node `E` whose inlined
    /// expression reads exactly one conv/scan output `r`, only through elementwise ops and
    /// reshapes (which keep the element order), with as many elements as `r`, and whose other
    /// inputs exist before `r`'s kernel runs. `E` is then computed and stored by that kernel,
    /// element by element, from the value in registers.
    fn find_epilogues(&mut self) {
        let g = self.g;
        for e in g.nodes() {
            let op = g.op(e);
            if !self.materialize[e.index()]
                || needs_own_kernel(op)
                || matches!(op, Op::Const { .. })
            {
                continue;
            }
            if matches!(op, Op::Reshape { .. })
                && g.operands(e)
                    .iter()
                    .all(|v| self.materialize[v.node.index()])
            {
                continue; // an alias, not a kernel
            }
            let mut leaves = Vec::new();
            self.leaves(Value::new(e, 0), true, true, &mut leaves);
            let producers: Vec<&(Value, bool)> = leaves
                .iter()
                .filter(|(v, _)| {
                    matches!(
                        g.op(v.node),
                        Op::CausalConv1d | Op::SelectiveScan | Op::SsdScan { .. }
                    ) && v.result == 0
                })
                .collect();
            let Some(&&(r, _)) = producers.first() else {
                continue;
            };
            if producers.iter().any(|(v, ok)| *v != r || !ok) {
                continue;
            }
            let numel = |v: Value| g.value_type(v).and_then(|t| ir::types::numel(&t.shape));
            if numel(r) != numel(Value::new(e, 0)) {
                continue;
            }
            let ready = leaves.iter().all(|(v, _)| {
                *v == r
                    || v.node < r.node
                    || matches!(g.op(v.node), Op::Param { .. } | Op::Input { .. })
            });
            if ready {
                self.epilogues.entry(r.node).or_default().push(e);
                self.fused.insert(e);
            }
        }
        // A producer result read only through its epilogues need not be stored.
        for (&h, es) in &self.epilogues {
            let r = Value::new(h, 0);
            let is_output = g.outputs().iter().any(|(_, v)| *v == r);
            if !is_output && self.only_feeds(r, es) {
                self.unstored.insert(r);
            }
        }
    }

    /// RMSNorm-style row fusion around a reduction `R` over trailing axes:
    /// - a row epilogue `E` (a materialized elementwise node shaped like `R`'s input) whose
    ///   expression reads `R` only through elementwise ops and broadcasts along the reduced
    ///   axes is computed in a second pass over the row, from `R` in registers;
    /// - a row prologue `A` (a materialized elementwise node shaped like `R`'s input, read by
    ///   `R` through elementwise ops only, used by nothing before `R`) is computed and stored
    ///   in the reduction's own pass.
    fn find_row_fusions(&mut self) {
        let g = self.g;
        for r in g.nodes() {
            let Op::Reduce { axes, .. } = g.op(r) else {
                continue;
            };
            let x = g.operands(r)[0];
            let xs = self.shape(x);
            let rank = xs.len();
            let trailing = axes.iter().all(|&a| a >= rank - axes.len());
            if !trailing || self.fused.contains(&r) {
                continue;
            }
            let rv = Value::new(r, 0);
            let rshape = self.shape(rv);
            // Epilogues.
            let mut eps = Vec::new();
            for e in g.nodes().skip(r.index() + 1) {
                let op = g.op(e);
                if !self.materialize[e.index()]
                    || needs_own_kernel(op)
                    || matches!(op, Op::Const { .. })
                    || self.fused.contains(&e)
                    || self.shape(Value::new(e, 0)) != xs
                {
                    continue;
                }
                let mut leaves = Vec::new();
                self.row_leaves(Value::new(e, 0), true, &xs, &rshape, true, &mut leaves);
                let reads_r = leaves.iter().any(|(v, _)| *v == rv);
                let clean = leaves.iter().all(|(v, ok)| *v != rv || *ok);
                let ready = leaves.iter().all(|(v, _)| {
                    *v == rv
                        || v.node < r
                        || matches!(g.op(v.node), Op::Param { .. } | Op::Input { .. })
                });
                if reads_r && clean && ready {
                    eps.push(e);
                }
            }
            if !eps.is_empty() {
                for &e in &eps {
                    self.fused.insert(e);
                }
                if !g.outputs().iter().any(|(_, v)| *v == rv) && self.only_feeds(rv, &eps) {
                    self.unstored.insert(rv);
                }
                self.epilogues.entry(r).or_default().extend(eps);
            }
            // Prologues: materialized elementwise leaves of R's operand reached in order.
            let mut leaves = Vec::new();
            self.leaves(x, !self.materialize[x.node.index()], true, &mut leaves);
            let mut pros = Vec::new();
            for (a, ordered) in leaves {
                let op = g.op(a.node);
                let elementwise = matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Cast { .. });
                if !ordered
                    || !elementwise
                    || self.fused.contains(&a.node)
                    || self.shape(a) != xs
                    || pros.contains(&a.node)
                {
                    continue;
                }
                let mut inner = Vec::new();
                self.leaves(a, true, true, &mut inner);
                let ready = inner.iter().all(|(v, _)| v.node < a.node);
                let later_users = g
                    .users(a.node)
                    .iter()
                    .all(|&u| u > r || self.inlined_into(u, r));
                if ready && later_users {
                    pros.push(a.node);
                }
            }
            for &a in &pros {
                self.fused.insert(a);
            }
            if !pros.is_empty() {
                self.row_prologues.insert(r, pros);
            }
        }
    }

    /// Whether `n` is inlined (not materialized) and every use of it ends in `target`.
    fn inlined_into(&self, n: NodeId, target: NodeId) -> bool {
        !self.materialize[n.index()]
            && self
                .g
                .users(n)
                .iter()
                .all(|&u| u == target || self.inlined_into(u, target))
    }

    /// As [`Self::leaves`], marking whether each path keeps the row structure: elementwise ops
    /// on values shaped like the row (`full`) or like the reduction (`reduced`), and
    /// broadcasts from the reduced shape to the full one.
    fn row_leaves(
        &self,
        v: Value,
        top: bool,
        full: &[Dim],
        reduced: &[Dim],
        ok: bool,
        out: &mut Vec<(Value, bool)>,
    ) {
        let g = self.g;
        if !top && self.materialize[v.node.index()] {
            out.push((v, ok));
            return;
        }
        let shape = self.shape(v);
        let op = g.op(v.node);
        let keeps = match op {
            Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } => {
                ok && (shape == full || shape == reduced)
            }
            Op::Broadcast { .. } => {
                ok && shape == full && g.operands(v.node).iter().all(|o| self.shape(*o) == reduced)
            }
            Op::Const { .. } => return,
            _ => false,
        };
        for o in g.operands(v.node) {
            self.row_leaves(o, false, full, reduced, keeps, out);
        }
    }

    /// The materialized values `v`'s inlined expression reads, each with whether the path to
    /// it keeps the element order (elementwise ops and reshapes only).
    fn leaves(&self, v: Value, top: bool, ordered: bool, out: &mut Vec<(Value, bool)>) {
        let g = self.g;
        if !top && self.materialize[v.node.index()] {
            out.push((v, ordered));
            return;
        }
        let op = g.op(v.node);
        let keeps_order = match op {
            Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } | Op::Reshape { .. } => ordered,
            Op::Const { .. } => return,
            _ => false,
        };
        for o in g.operands(v.node) {
            self.leaves(o, false, keeps_order, out);
        }
    }

    /// Whether every use of `v` is inside the inlined expression of one of `ends`.
    fn only_feeds(&self, v: Value, ends: &[NodeId]) -> bool {
        let g = self.g;
        for u in g.users(v.node) {
            if !g.operands(u).contains(&v) {
                continue;
            }
            if ends.contains(&u) {
                continue;
            }
            if self.materialize[u.index()] || !self.only_feeds(Value::new(u, 0), ends) {
                return false;
            }
        }
        true
    }

    fn buffer_of(&self, v: Value) -> Result<BufId, LowerError> {
        self.buf_of
            .get(&v)
            .copied()
            .ok_or_else(|| LowerError::Unsupported {
                node: v.node,
                op: self.g.op(v.node).name(),
                message: "value has no buffer (internal error)".into(),
            })
    }

    fn new_buf(&mut self, v: Value, kind: BufKind) -> BufId {
        let ty = self
            .g
            .value_type(v)
            .cloned()
            .unwrap_or_else(|| ir::TensorType::new(DType::F32, vec![]));
        // Compute is f32: float values are stored as f32 here.
        let dtype = if ty.dtype.is_float() {
            DType::F32
        } else {
            ty.dtype
        };
        self.out.buffers.push(BufInfo {
            kind,
            dtype,
            shape: ty.shape,
            value: v,
        });
        let id = self.out.buffers.len() - 1;
        self.buf_of.insert(v, id);
        id
    }

    fn dim(&self, d: &Dim) -> IExpr {
        dim_index(&self.syms, d)
    }

    fn numel(&self, shape: &[Dim]) -> IExpr {
        shape
            .iter()
            .fold(IExpr::c(1), |acc, d| acc.mul(self.dim(d)))
    }

    /// Row-major linear index of `idx` in `shape`.
    fn linear(&self, idx: &[IExpr], shape: &[Dim]) -> IExpr {
        let mut e = IExpr::c(0);
        for (i, d) in idx.iter().zip(shape) {
            e = e.mul(self.dim(d)).add(i.clone());
        }
        e
    }

    /// The index in shape `to` of element `idx` of shape `from` (of as many elements), in
    /// row-major order. Leading and trailing dims the shapes share map one to one; only the
    /// dims between go through a linear index (no division by `L` where a reshape merges or
    /// splits the last axes, as `[B, L, H, P]` <-> `[B, L, H·P]`).
    fn reshape_index(&self, idx: &[IExpr], from: &[Dim], to: &[Dim]) -> Vec<IExpr> {
        let pre = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        let most = from.len().min(to.len()) - pre;
        let suf = from
            .iter()
            .rev()
            .zip(to.iter().rev())
            .take(most)
            .take_while(|(a, b)| a == b)
            .count();
        let (fe, te) = (from.len() - suf, to.len() - suf);
        let flat = self.linear(&idx[pre..fe], &from[pre..fe]);
        let mut out = idx[..pre].to_vec();
        out.extend(self.delinear(flat, &to[pre..te]));
        out.extend_from_slice(&idx[fe..]);
        out
    }

    /// Multi-index of the linear index `flat` in `shape`.
    fn delinear(&self, flat: IExpr, shape: &[Dim]) -> Vec<IExpr> {
        let mut idx = vec![IExpr::c(0); shape.len()];
        let mut rest = flat;
        for (i, d) in shape.iter().enumerate().rev() {
            let de = self.dim(d);
            if i == 0 {
                idx[i] = rest.clone();
            } else {
                idx[i] = rest.clone().rem(de.clone());
                rest = rest.div(de);
            }
        }
        idx
    }

    fn shape(&self, v: Value) -> Shape {
        self.g
            .value_type(v)
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    }

    fn node(&mut self, n: NodeId) -> Result<(), LowerError> {
        let g = self.g;
        let op = g.op(n);
        let unsupported = |m: &str| LowerError::Unsupported {
            node: n,
            op: op.name(),
            message: m.into(),
        };
        if !self.materialize[n.index()] || self.fused.contains(&n) {
            return Ok(());
        }
        let v0 = Value::new(n, 0);
        match op {
            Op::Input { name, kind, .. } => {
                let kind = match kind {
                    InputKind::Data => BufKind::Input(name.clone()),
                    InputKind::State => BufKind::State(name.clone()),
                };
                self.new_buf(v0, kind);
            }
            Op::Param { name, .. } => {
                self.new_buf(v0, BufKind::Param(name.clone()));
            }
            Op::Reshape { .. } if self.buf_of.contains_key(&g.operands(n)[0]) => {
                // Same elements in the same order: an alias.
                let b = self.buffer_of(g.operands(n)[0])?;
                self.buf_of.insert(v0, b);
            }
            Op::MatMul { rhs_t } => {
                let ops = g.operands(n);
                // An operand that is a transpose without a buffer of its own: its source,
                // read transposed.
                let source = |l: &Self, i: usize| match l.transposed_operand(n, i) {
                    Some(src) if !l.buf_of.contains_key(&ops[i]) => (src, true),
                    _ => (ops[i], false),
                };
                let ((lv, lhs_t), (rv, flip)) = (source(self, 0), source(self, 1));
                let (lhs, rhs) = (self.buffer_of(lv)?, self.buffer_of(rv)?);
                let (ls, rs) = (self.shape(ops[0]), self.shape(ops[1]));
                let out = self.new_buf(v0, BufKind::Temp);
                let rl = ls.len();
                let batch =
                    ir::types::numel(&ls[..rl - 2]).ok_or_else(|| unsupported("batch overflow"))?;
                let m = ls[rl - 2].clone();
                let k = ls[rl - 1].clone();
                let rr = rs.len();
                let nn = if *rhs_t {
                    rs[rr - 2].clone()
                } else {
                    rs[rr - 1].clone()
                };
                let rhs_batched = rr > 2;
                // A 2-D weight shared by all batches: one GEMM over all rows.
                let (batch, m) = if rhs_batched {
                    (Product::of(batch), m)
                } else {
                    (
                        Product::of(Dim::known(1)),
                        batch.mul(&m).ok_or_else(|| unsupported("size overflow"))?,
                    )
                };
                self.out.steps.push(Step::MatMul {
                    lhs,
                    rhs,
                    out,
                    batch,
                    m,
                    k,
                    n: nn,
                    lhs_t,
                    rhs_t: *rhs_t != flip,
                    rhs_batched,
                    exact: false,
                    node: n,
                });
            }
            Op::Concat { axis } => {
                let out = self.new_buf(v0, BufKind::Temp);
                let out_shape = self.shape(v0);
                let mut offset = 0u64;
                for v in g.operands(n) {
                    let s = self.shape(v);
                    let mut kb = KB::new(self, &format!("concat_{}", n.index()));
                    let ob = kb.buf(out, true);
                    let flat = IExpr::Grid(0);
                    let idx = kb.l.delinear(flat, &s);
                    let val = kb.value(v, &idx)?;
                    let mut oidx = idx.clone();
                    oidx[*axis] = oidx[*axis].clone().add(IExpr::c(offset as i64));
                    let store = Stmt::Store {
                        buf: ob,
                        index: kb.l.linear(&oidx, &out_shape),
                        value: val,
                    };
                    kb.body.push(store);
                    let grid = vec![kb.l.numel(&s)];
                    kb.finish(grid, n);
                    offset += s[*axis].as_known().unwrap_or(0);
                }
            }
            Op::Reduce { .. } if let Some(count) = self.column_reduction(n) => {
                self.reduce_columns(n, count)?;
            }
            Op::Reduce { op: rop, axes } => {
                let out = self.new_buf(v0, BufKind::Temp);
                let x = g.operands(n)[0];
                let xs = self.shape(x);
                let os = self.shape(v0);
                let prologues = self.row_prologues.get(&n).cloned().unwrap_or_default();
                let mut kb = KB::new(self, &format!("{}_{}", op.name(), n.index()));
                let idx = kb.l.delinear(IExpr::Grid(0), &os);
                let red: Vec<Dim> = axes.iter().map(|&a| xs[a].clone()).collect();
                let count = kb.l.numel(&red);
                let acc = kb.var();
                let init = match rop {
                    ReduceOp::Sum | ReduceOp::Mean => 0.0,
                    ReduceOp::Max => f64::NEG_INFINITY,
                };
                kb.body.push(Stmt::Var {
                    var: acc,
                    init: Expr::Const(init),
                });
                let r = kb.counter();
                let ridx = kb.l.delinear(IExpr::Loop(r), &red);
                let mut xidx = idx.clone();
                for (j, &a) in axes.iter().enumerate() {
                    xidx[a] = ridx[j].clone();
                }
                // Row prologues (the residual add before a norm): computed, stored, and used
                // from registers by the reduction.
                let mut body = Vec::new();
                let mut held = Vec::new();
                for a in prologues {
                    let av = Value::new(a, 0);
                    let buf = kb.l.new_buf(av, BufKind::Temp);
                    let slot = kb.buf(buf, true);
                    let var = kb.var();
                    body.push(Stmt::Var {
                        var,
                        init: kb.compute(a, &xidx)?,
                    });
                    body.push(Stmt::Store {
                        buf: slot,
                        index: kb.l.linear(&xidx, &xs),
                        value: Expr::Var(var),
                    });
                    kb.overrides.insert(av, Expr::Var(var));
                    held.push(av);
                }
                let xv = kb.value(x, &xidx)?;
                for av in held {
                    kb.overrides.remove(&av);
                }
                let combine = match rop {
                    ReduceOp::Sum | ReduceOp::Mean => BinaryOp::Add,
                    ReduceOp::Max => BinaryOp::Max,
                };
                body.push(Stmt::Set {
                    var: acc,
                    value: Expr::bin(combine, Expr::Var(acc), xv),
                });
                kb.body.push(Stmt::For {
                    counter: r,
                    extent: count.clone(),
                    body,
                });
                let result = reduced(*rop, acc, count.clone());
                let res = kb.var();
                kb.body.push(Stmt::Var {
                    var: res,
                    init: result,
                });
                if !kb.l.unstored.contains(&v0) {
                    let ob = kb.buf(out, true);
                    kb.body.push(Stmt::Store {
                        buf: ob,
                        index: IExpr::Grid(0),
                        value: Expr::Var(res),
                    });
                }
                // Row epilogues (the normalization): a second pass over the row.
                let eps = kb.l.epilogues.get(&n).cloned().unwrap_or_default();
                if !eps.is_empty() {
                    let k2 = kb.counter();
                    let ridx2 = kb.l.delinear(IExpr::Loop(k2), &red);
                    let mut eidx = idx.clone();
                    for (j, &a) in axes.iter().enumerate() {
                        eidx[a] = ridx2[j].clone();
                    }
                    let mut body2 = Vec::new();
                    kb.overrides.insert(v0, Expr::Var(res));
                    for e in eps {
                        let ev = Value::new(e, 0);
                        let buf = kb.l.new_buf(ev, BufKind::Temp);
                        let slot = kb.buf(buf, true);
                        let value = kb.compute(e, &eidx)?;
                        body2.push(Stmt::Store {
                            buf: slot,
                            index: kb.l.linear(&eidx, &xs),
                            value,
                        });
                    }
                    kb.overrides.remove(&v0);
                    kb.body.push(Stmt::For {
                        counter: k2,
                        extent: count,
                        body: body2,
                    });
                }
                let grid = vec![kb.l.numel(&os)];
                kb.finish(grid, n);
            }
            Op::Gather => {
                let out = self.new_buf(v0, BufKind::Temp);
                let ops = g.operands(n);
                let (table, ids) = (self.buffer_of(ops[0])?, self.buffer_of(ops[1])?);
                let ids_shape = self.shape(ops[1]);
                let os = self.shape(v0);
                let d = self.dim(&os[os.len() - 1]);
                let mut kb = KB::new(self, &format!("gather_{}", n.index()));
                let ob = kb.buf(out, true);
                let tb = kb.buf(table, false);
                let ib = kb.buf(ids, false);
                let idx = kb.l.delinear(IExpr::Grid(0), &os);
                let row = IExpr::LoadIndex {
                    buf: ib,
                    index: Box::new(kb.l.linear(&idx[..idx.len() - 1], &ids_shape)),
                };
                let col = idx[idx.len() - 1].clone();
                let val = Expr::Load {
                    buf: tb,
                    index: row.mul(d).add(col),
                };
                kb.body.push(Stmt::Store {
                    buf: ob,
                    index: IExpr::Grid(0),
                    value: val,
                });
                let grid = vec![kb.l.numel(&os)];
                kb.finish(grid, n);
            }
            Op::CausalConv1d => self.conv(n)?,
            Op::SelectiveScan => self.selective_scan(n)?,
            Op::SsdScan { chunk } => self.ssd_scan(n, *chunk)?,
            Op::CausalConv1dGrad => self.conv_grad(n)?,
            Op::SelectiveScanGrad => self.selective_scan_grad(n)?,
            Op::SsdScanGrad { chunk } => self.ssd_scan_grad(n, *chunk)?,
            Op::CrossEntropy { ignore_index } => self.cross_entropy(n, false, *ignore_index)?,
            Op::CrossEntropyGrad { ignore_index } => self.cross_entropy(n, true, *ignore_index)?,
            Op::Const { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. } => {
                // A materialized elementwise or view value: one kernel over its elements.
                let out = self.new_buf(v0, BufKind::Temp);
                let os = self.shape(v0);
                let mut kb = KB::new(self, &format!("{}_{}", op.name(), n.index()));
                let ob = kb.buf(out, true);
                let idx = kb.l.delinear(IExpr::Grid(0), &os);
                let val = kb.compute(n, &idx)?;
                kb.body.push(Stmt::Store {
                    buf: ob,
                    index: IExpr::Grid(0),
                    value: val,
                });
                let grid = vec![kb.l.numel(&os)];
                kb.finish(grid, n);
            }
        }
        Ok(())
    }

    fn known(&self, n: NodeId, d: &Dim, what: &str) -> Result<usize, LowerError> {
        d.as_known()
            .map(|k| k as usize)
            .ok_or_else(|| LowerError::Unsupported {
                node: n,
                op: self.g.op(n).name(),
                message: format!("{what} must be a number, found {d}"),
            })
    }

    /// The first kernel of the chunk-parallel Mamba-1 scan and of its gradient: one (batch,
    /// chunk, channel) per grid point runs its chunk forward from a zero state, storing the
    /// end state in `H` and the products of the decays `exp(dt A)` in `D` (both
    /// `ck_shape`, `[B, ceil(L/Q), E, N]`); given `back = (dy, G)`, also backward from a zero
    /// cotangent at the chunk's end, storing the cotangent reaching its start in `G`. `n` is
    /// the scan or its gradient (both take `x, dt, A, B, C` first).
    fn selective_chunk_kernel(
        &mut self,
        n: NodeId,
        name: &str,
        ch: &Chunks,
        (hck, dck, ck_shape): (BufId, BufId, &Shape),
        back: Option<(Value, BufId)>,
    ) -> Result<(), LowerError> {
        use BinaryOp::{Add, Mul};
        let ops = self.g.operands(n);
        let (x, dt, a, bm, cm) = (ops[0], ops[1], ops[2], ops[3], ops[4]);
        let xs = self.shape(x);
        let nst = self.known(n, &self.shape(a)[1], "d_state")?;
        let ns = IExpr::c(nst as i64);
        let grid = vec![self.dim(&xs[0]), ch.count.clone(), self.dim(&xs[2])];
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };
        let mut kb = KB::new(self, name);
        let (b, c, e) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (h_slot, d_slot) = (kb.buf(hck, true), kb.buf(dck, true));
        let (h, pr) = (kb.arr(), kb.arr());
        for (arr, init) in [(h, 0.0), (pr, 1.0)] {
            kb.body.push(Stmt::Array {
                arr,
                len: nst,
                init,
            });
        }
        let (tl, nn) = (kb.counter(), kb.counter());
        let t = t0.clone().add(IExpr::Loop(tl));
        let (dtv, uv, decay) = (kb.var(), kb.var(), kb.var());
        let bt = [b.clone(), t.clone(), e.clone()];
        let dte = kb.value(dt, &bt)?;
        let xe = kb.value(x, &bt)?;
        let av = kb.value(a, &[e.clone(), IExpr::Loop(nn)])?;
        let bv = kb.value(bm, &[b.clone(), t, IExpr::Loop(nn)])?;
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len.clone(),
            body: vec![
                Stmt::Var {
                    var: dtv,
                    init: dte,
                },
                Stmt::Var {
                    var: uv,
                    init: Expr::bin(Mul, Expr::Var(dtv), xe),
                },
                Stmt::For {
                    counter: nn,
                    extent: ns.clone(),
                    body: vec![
                        Stmt::Var {
                            var: decay,
                            init: Expr::un(UnaryOp::Exp, Expr::bin(Mul, Expr::Var(dtv), av)),
                        },
                        Stmt::ArrSet {
                            arr: pr,
                            index: IExpr::Loop(nn),
                            value: Expr::bin(Mul, al(pr, nn), Expr::Var(decay)),
                        },
                        Stmt::ArrSet {
                            arr: h,
                            index: IExpr::Loop(nn),
                            value: next_state(Expr::Var(decay), al(h, nn), Expr::Var(uv), bv),
                        },
                    ],
                },
            ],
        });
        let j = kb.counter();
        let at =
            kb.l.linear(&[b.clone(), c, e.clone(), IExpr::Loop(j)], ck_shape);
        let mut stores = vec![
            Stmt::Store {
                buf: h_slot,
                index: at.clone(),
                value: al(h, j),
            },
            Stmt::Store {
                buf: d_slot,
                index: at.clone(),
                value: al(pr, j),
            },
        ];
        if let Some((dy, gck)) = back {
            let g_slot = kb.buf(gck, true);
            let gr = kb.arr();
            kb.body.push(Stmt::Array {
                arr: gr,
                len: nst,
                init: 0.0,
            });
            let (k, n2) = (kb.counter(), kb.counter());
            let tt = t0.add(len.clone().sub(IExpr::c(1)).sub(IExpr::Loop(k)));
            let (d2, gy) = (kb.var(), kb.var());
            let btt = [b.clone(), tt.clone(), e.clone()];
            let dte2 = kb.value(dt, &btt)?;
            let gye = kb.value(dy, &btt)?;
            let cv = kb.value(cm, &[b, tt, IExpr::Loop(n2)])?;
            let av2 = kb.value(a, &[e, IExpr::Loop(n2)])?;
            kb.body.push(Stmt::For {
                counter: k,
                extent: len,
                body: vec![
                    Stmt::Var {
                        var: d2,
                        init: dte2,
                    },
                    Stmt::Var { var: gy, init: gye },
                    Stmt::For {
                        counter: n2,
                        extent: ns.clone(),
                        body: vec![
                            Stmt::ArrSet {
                                arr: gr,
                                index: IExpr::Loop(n2),
                                value: Expr::bin(
                                    Add,
                                    al(gr, n2),
                                    Expr::bin(Mul, cv, Expr::Var(gy)),
                                ),
                            },
                            Stmt::ArrSet {
                                arr: gr,
                                index: IExpr::Loop(n2),
                                value: Expr::bin(
                                    Mul,
                                    al(gr, n2),
                                    Expr::un(UnaryOp::Exp, Expr::bin(Mul, Expr::Var(d2), av2)),
                                ),
                            },
                        ],
                    },
                ],
            });
            stores.push(Stmt::Store {
                buf: g_slot,
                index: at,
                value: al(gr, j),
            });
        }
        kb.body.push(Stmt::For {
            counter: j,
            extent: ns,
            body: stores,
        });
        kb.finish(grid, n);
        Ok(())
    }

    /// The first kernel of the chunk-parallel Mamba-2 scan and of its gradient: one (batch,
    /// chunk, head, p) per grid point runs its chunk forward from a zero state, storing the
    /// end state in `S` (`ck_shape`, `[B, ceil(L/Q), H, P, N]`) and, the `p = 0` point, the
    /// product of the decays in `D` (`d_shape`, `[B, ceil(L/Q), H]`); given `back = (dy, G)`,
    /// also backward from a zero cotangent at the chunk's end, storing the cotangent reaching
    /// its start in `G` (as `S`). `n` is the scan or its gradient (both take `x, dt, A, B, C`
    /// first).
    fn ssd_chunk_kernel(
        &mut self,
        n: NodeId,
        name: &str,
        ch: &Chunks,
        (sck, dck): (BufId, BufId),
        (ck_shape, d_shape): (&Shape, &Shape),
        back: Option<(Value, BufId)>,
    ) -> Result<(), LowerError> {
        use BinaryOp::{Add, Mul};
        let ops = self.g.operands(n);
        let (x, dt, a, bm, cm) = (ops[0], ops[1], ops[2], ops[3], ops[4]);
        let xs = self.shape(x);
        let bs = self.shape(bm);
        let nst = self.known(n, &bs[3], "d_state")?;
        let heads = self.known(n, &xs[2], "the head count")?;
        let groups = self.known(n, &bs[2], "the group count")?.max(1);
        let hpg = (heads / groups).max(1) as i64;
        let ns = IExpr::c(nst as i64);
        let grid = vec![
            self.dim(&xs[0]),
            ch.count.clone(),
            self.dim(&xs[2]),
            self.dim(&xs[3]),
        ];
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };
        let exp_mul = |d: Expr, a: Expr| Expr::un(UnaryOp::Exp, Expr::bin(Mul, d, a));
        let mut kb = KB::new(self, name);
        let (b, c, hh, p) = (
            IExpr::Grid(0),
            IExpr::Grid(1),
            IExpr::Grid(2),
            IExpr::Grid(3),
        );
        let grp = hh.clone().div(IExpr::c(hpg));
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (s_slot, d_slot) = (kb.buf(sck, true), kb.buf(dck, true));
        let s = kb.arr();
        kb.body.push(Stmt::Array {
            arr: s,
            len: nst,
            init: 0.0,
        });
        let prod = kb.var();
        kb.body.push(Stmt::Var {
            var: prod,
            init: Expr::Const(1.0),
        });
        let ah = kb.value(a, std::slice::from_ref(&hh))?;
        let (tl, nn) = (kb.counter(), kb.counter());
        let tv = t0.clone().add(IExpr::Loop(tl));
        let (dtv, decay, uv) = (kb.var(), kb.var(), kb.var());
        let dte = kb.value(dt, &[b.clone(), tv.clone(), hh.clone()])?;
        let xe = kb.value(x, &[b.clone(), tv.clone(), hh.clone(), p.clone()])?;
        let bv = kb.value(bm, &[b.clone(), tv, grp.clone(), IExpr::Loop(nn)])?;
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len.clone(),
            body: vec![
                Stmt::Var {
                    var: dtv,
                    init: dte,
                },
                Stmt::Var {
                    var: decay,
                    init: exp_mul(Expr::Var(dtv), ah.clone()),
                },
                Stmt::Var {
                    var: uv,
                    init: Expr::bin(Mul, Expr::Var(dtv), xe),
                },
                Stmt::Set {
                    var: prod,
                    value: Expr::bin(Mul, Expr::Var(prod), Expr::Var(decay)),
                },
                Stmt::For {
                    counter: nn,
                    extent: ns.clone(),
                    body: vec![Stmt::ArrSet {
                        arr: s,
                        index: IExpr::Loop(nn),
                        value: next_state(Expr::Var(decay), al(s, nn), Expr::Var(uv), bv),
                    }],
                },
            ],
        });
        let j = kb.counter();
        let at = kb.l.linear(
            &[b.clone(), c.clone(), hh.clone(), p.clone(), IExpr::Loop(j)],
            ck_shape,
        );
        let mut stores = vec![Stmt::Store {
            buf: s_slot,
            index: at.clone(),
            value: al(s, j),
        }];
        if let Some((dy, gck)) = back {
            let g_slot = kb.buf(gck, true);
            let gs = kb.arr();
            kb.body.push(Stmt::Array {
                arr: gs,
                len: nst,
                init: 0.0,
            });
            let (k, n2) = (kb.counter(), kb.counter());
            let tt = t0.add(len.clone().sub(IExpr::c(1)).sub(IExpr::Loop(k)));
            let (d2, decay2, gy) = (kb.var(), kb.var(), kb.var());
            let dte2 = kb.value(dt, &[b.clone(), tt.clone(), hh.clone()])?;
            let gye = kb.value(dy, &[b.clone(), tt.clone(), hh.clone(), p.clone()])?;
            let cv = kb.value(cm, &[b.clone(), tt, grp, IExpr::Loop(n2)])?;
            kb.body.push(Stmt::For {
                counter: k,
                extent: len,
                body: vec![
                    Stmt::Var {
                        var: d2,
                        init: dte2,
                    },
                    Stmt::Var {
                        var: decay2,
                        init: exp_mul(Expr::Var(d2), ah),
                    },
                    Stmt::Var { var: gy, init: gye },
                    Stmt::For {
                        counter: n2,
                        extent: ns.clone(),
                        body: vec![
                            Stmt::ArrSet {
                                arr: gs,
                                index: IExpr::Loop(n2),
                                value: Expr::bin(
                                    Add,
                                    al(gs, n2),
                                    Expr::bin(Mul, cv, Expr::Var(gy)),
                                ),
                            },
                            Stmt::ArrSet {
                                arr: gs,
                                index: IExpr::Loop(n2),
                                value: Expr::bin(Mul, al(gs, n2), Expr::Var(decay2)),
                            },
                        ],
                    },
                ],
            });
            stores.push(Stmt::Store {
                buf: g_slot,
                index: at,
                value: al(gs, j),
            });
        }
        kb.body.push(Stmt::For {
            counter: j,
            extent: ns,
            body: stores,
        });
        let once = kb.counter();
        kb.body.push(Stmt::For {
            counter: once,
            extent: if_zero(&p),
            body: vec![Stmt::Store {
                buf: d_slot,
                index: kb.l.linear(&[b, c, hh], d_shape),
                value: Expr::Var(prod),
            }],
        });
        kb.finish(grid, n);
        Ok(())
    }

    /// `SelectiveScan` (Mamba-1). With `LowerOptions::sequential_scans`, or the chunk count
    /// `ceil(L/Q)` known to be at most 1 (the decode step), one sequential kernel ([`Self::selective_scan_sequential`]); otherwise
    /// chunk-parallel over time in three kernels, `Q = SELECTIVE_SCAN_CHUNK`:
    ///
    /// 1. One (batch, chunk, channel) per grid point scans its chunk from a zero state,
    ///    storing the chunk's end state in scratch `H [B, ceil(L/Q), E, N]` and the product
    ///    of its decays `exp(dt A)` in scratch `D` (as `H`).
    /// 2. One (batch, channel, n) per grid point walks the chunks in order from `h0`:
    ///    `H[c] <- h; h = D[c] h + H[c]`; it writes `h1 = h0` when there is no chunk.
    /// 3. One (batch, chunk, channel) per grid point rescans its chunk from `H[c]`, writing
    ///    `y` (and its epilogues) and, in the last chunk, `h1`.
    ///
    /// As for [`Self::ssd_scan`]: the rescans are the sequential arithmetic, the start states
    /// regrouped sums. Scratch: `2·B·ceil(L/Q)·E·N` floats, `2N/Q` times `x`
    /// (mamba-2.8b at B = 1, L = 65536: 671 MB).
    fn selective_scan(&mut self, n: NodeId) -> Result<(), LowerError> {
        use BinaryOp::Mul;
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, h0) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
        let xs = self.shape(x);
        let (ch, count) = self.chunks(n, &xs[1], SELECTIVE_SCAN_CHUNK)?;
        if self.sequential_scans || count.as_known().is_some_and(|c| c <= 1) {
            return self.selective_scan_sequential(n);
        }
        let nd = self.shape(a)[1].clone();
        let nst = self.known(n, &nd, "d_state")?;
        let ns = IExpr::c(nst as i64);
        let y = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let h1 = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let hs = self.shape(Value::new(n, 1));
        let ck_shape = vec![xs[0].clone(), count, xs[2].clone(), nd];
        let hck = self.scratch(n, ck_shape.clone());
        let dck = self.scratch(n, ck_shape.clone());
        let (bext, eext) = (self.dim(&xs[0]), self.dim(&xs[2]));
        let name = format!("selective_scan_{}", n.index());
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };

        // Kernel 1: each chunk from a zero state.
        self.selective_chunk_kernel(
            n,
            &format!("{name}_chunk"),
            &ch,
            (hck, dck, &ck_shape),
            None,
        )?;

        // Kernel 2: the chunks' start states, in order.
        let mut kb = KB::new(self, &format!("{name}_carry"));
        let (b, e, nn) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (h_slot, d_slot, h1_slot) = (kb.buf(hck, true), kb.buf(dck, false), kb.buf(h1, true));
        let h0v = kb.value(h0, &[b.clone(), e.clone(), nn.clone()])?;
        let at = |kb: &KB, c: &IExpr| {
            kb.l.linear(&[b.clone(), c.clone(), e.clone(), nn.clone()], &ck_shape)
        };
        let decay = |kb: &KB, c: &IExpr| Expr::Load {
            buf: d_slot,
            index: at(kb, c),
        };
        let (stmts, hv) = carry_in_place(&mut kb, h0v, (&ch.count, false), h_slot, &at, &decay);
        kb.body.extend(stmts);
        let none = kb.counter();
        kb.body.push(Stmt::For {
            counter: none,
            extent: if_zero(&ch.count),
            body: vec![Stmt::Store {
                buf: h1_slot,
                index: kb.l.linear(&[b, e, nn], &hs),
                value: Expr::Var(hv),
            }],
        });
        kb.finish(vec![bext.clone(), eext.clone(), ns.clone()], n);

        // Kernel 3: each chunk again from its start state, writing y.
        let mut kb = KB::new(self, &name);
        let (b, c, e) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let h_slot = kb.buf(hck, false);
        let h = kb.arr();
        kb.body.push(Stmt::Array {
            arr: h,
            len: nst,
            init: 0.0,
        });
        let j = kb.counter();
        kb.body.push(Stmt::For {
            counter: j,
            extent: ns.clone(),
            body: vec![Stmt::ArrSet {
                arr: h,
                index: IExpr::Loop(j),
                value: Expr::Load {
                    buf: h_slot,
                    index: kb.l.linear(
                        &[b.clone(), c.clone(), e.clone(), IExpr::Loop(j)],
                        &ck_shape,
                    ),
                },
            }],
        });
        let (tl, nn) = (kb.counter(), kb.counter());
        let t = ch.start(&c).add(IExpr::Loop(tl));
        let (dtv, xv, yv) = (kb.var(), kb.var(), kb.var());
        let bt = [b.clone(), t.clone(), e.clone()];
        let mut body = vec![
            Stmt::Var {
                var: dtv,
                init: kb.value(dt, &bt)?,
            },
            Stmt::Var {
                var: xv,
                init: kb.value(x, &bt)?,
            },
            Stmt::Var {
                var: yv,
                init: Expr::Const(0.0),
            },
        ];
        let av = kb.value(a, &[e.clone(), IExpr::Loop(nn)])?;
        let decay = Expr::un(UnaryOp::Exp, Expr::bin(Mul, Expr::Var(dtv), av));
        let bv = kb.value(bm, &[b.clone(), t.clone(), IExpr::Loop(nn)])?;
        let cv = kb.value(cm, &[b.clone(), t, IExpr::Loop(nn)])?;
        body.push(scan_update(h, nn, dtv, xv, yv, decay, bv, cv, nst));
        body.extend(kb.store_with_epilogues(Value::new(n, 0), y, &bt, yv)?);
        kb.body.push(Stmt::For {
            counter: tl,
            extent: ch.len(&c),
            body,
        });
        let (last, j2) = (kb.counter(), kb.counter());
        let h1_slot = kb.buf(h1, true);
        kb.body.push(Stmt::For {
            counter: last,
            extent: ch.is_last(&c),
            body: vec![Stmt::For {
                counter: j2,
                extent: ns,
                body: vec![Stmt::Store {
                    buf: h1_slot,
                    index: kb.l.linear(&[b, e, IExpr::Loop(j2)], &hs),
                    value: al(h, j2),
                }],
            }],
        });
        kb.finish(vec![bext, ch.count.clone(), eext], n);
        Ok(())
    }

    /// Mamba-1 sequentially: one (batch, channel) per grid point over every step, the `[N]`
    /// state in a local array.
    fn selective_scan_sequential(&mut self, n: NodeId) -> Result<(), LowerError> {
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, h0) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
        let xs = self.shape(x);
        let nst = self.known(n, &self.shape(a)[1], "d_state")?;
        let y = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let h1 = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let hs = self.shape(Value::new(n, 1));
        let mut kb = KB::new(self, &format!("selective_scan_{}", n.index()));
        let hb = kb.buf(h1, true);
        let (b, e) = (IExpr::Grid(0), IExpr::Grid(1));
        let h = kb.arr();
        kb.body.push(Stmt::Array {
            arr: h,
            len: nst,
            init: 0.0,
        });
        let j = kb.counter();
        let hv = kb.value(h0, &[b.clone(), e.clone(), IExpr::Loop(j)])?;
        kb.body.push(Stmt::For {
            counter: j,
            extent: IExpr::c(nst as i64),
            body: vec![Stmt::ArrSet {
                arr: h,
                index: IExpr::Loop(j),
                value: hv,
            }],
        });
        let t = kb.counter();
        let nn = kb.counter();
        let (dtv, xv, yv) = (kb.var(), kb.var(), kb.var());
        let bt = [b.clone(), IExpr::Loop(t), e.clone()];
        let mut body = vec![
            Stmt::Var {
                var: dtv,
                init: kb.value(dt, &bt)?,
            },
            Stmt::Var {
                var: xv,
                init: kb.value(x, &bt)?,
            },
            Stmt::Var {
                var: yv,
                init: Expr::Const(0.0),
            },
        ];
        let av = kb.value(a, &[e.clone(), IExpr::Loop(nn)])?;
        let decay = Expr::un(UnaryOp::Exp, Expr::bin(BinaryOp::Mul, Expr::Var(dtv), av));
        let bv = kb.value(bm, &[b.clone(), IExpr::Loop(t), IExpr::Loop(nn)])?;
        let cv = kb.value(cm, &[b.clone(), IExpr::Loop(t), IExpr::Loop(nn)])?;
        body.push(scan_update(h, nn, dtv, xv, yv, decay, bv, cv, nst));
        body.extend(kb.store_with_epilogues(Value::new(n, 0), y, &bt, yv)?);
        let l = kb.l.dim(&xs[1]);
        kb.body.push(Stmt::For {
            counter: t,
            extent: l,
            body,
        });
        let j2 = kb.counter();
        let hi = kb.l.linear(&[b.clone(), e.clone(), IExpr::Loop(j2)], &hs);
        kb.body.push(Stmt::For {
            counter: j2,
            extent: IExpr::c(nst as i64),
            body: vec![Stmt::Store {
                buf: hb,
                index: hi,
                value: Expr::ArrLoad {
                    arr: h,
                    index: IExpr::Loop(j2),
                },
            }],
        });
        let grid = vec![kb.l.dim(&xs[0]), kb.l.dim(&xs[2])];
        kb.finish(grid, n);
        Ok(())
    }

    /// `SsdScan` (Mamba-2). With `LowerOptions::sequential_scans`, or the chunk count
    /// `ceil(L/Q)` known to be at most 1 (the
    /// decode step, `L = 1`), one sequential kernel ([`Self::ssd_scan_sequential`]);
    /// otherwise chunk-parallel over time in three kernels, `Q` the op's `chunk` at most
    /// `MAX_SSD_SCAN_CHUNK`:
    ///
    /// 1. One (batch, chunk, head, p) per grid point scans its chunk from a zero state,
    ///    storing the chunk's end state in scratch `S [B, ceil(L/Q), H, P, N]` and (the
    ///    `p = 0` point) the product of the chunk's decays in scratch `D [B, ceil(L/Q), H]`.
    /// 2. One (batch, head, p, n) per grid point walks the chunks in order from `s0`:
    ///    `S[c] <- s; s = D[c] s + S[c]` (the start state of each chunk replaces its local
    ///    end state); it writes `s1 = s0` when there is no chunk.
    /// 3. One (batch, chunk, head, p) per grid point rescans its chunk from `S[c]`, writing `y`
    ///    (and its epilogues) and, in the last chunk, `s1`.
    ///
    /// The rescans are the sequential scan's arithmetic from their start states, so a
    /// sequence of one or two chunks from a zero state gives the sequential bits; across more
    /// chunks the start states are regrouped sums (f32 rounding apart, the same). Scratch:
    /// `B·ceil(L/Q)·H·(P·N + 1)` floats, `N/Q` times `x` (mamba2-2.7b at B = 1, L = 65536:
    /// 2.7 GB), alive only during the op.
    fn ssd_scan(&mut self, n: NodeId, chunk: u64) -> Result<(), LowerError> {
        use BinaryOp::Mul;
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, s0) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
        let xs = self.shape(x);
        let q = chunk.clamp(1, MAX_SSD_SCAN_CHUNK);
        let (ch, count) = self.chunks(n, &xs[1], q)?;
        // Only the matrix form leaves its scratch for the gradient.
        self.ssd_last_prep = None;
        if count.as_known().is_some_and(|c| c <= 1) {
            return self.ssd_scan_sequential(n);
        }
        if !self.ssd_scans {
            return self.ssd_matmul(n, chunk);
        }
        if self.sequential_scans {
            return self.ssd_scan_sequential(n);
        }
        let bs = self.shape(bm);
        let nst = self.known(n, &bs[3], "d_state")?;
        let heads = self.known(n, &xs[2], "the head count")?;
        let groups = self.known(n, &bs[2], "the group count")?.max(1);
        let hpg = (heads / groups).max(1) as i64;
        let ns = IExpr::c(nst as i64);
        let y = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let s1 = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let ss = self.shape(Value::new(n, 1));
        let mut ck_shape = xs.clone();
        ck_shape[1] = count.clone();
        ck_shape.push(bs[3].clone());
        let d_shape = vec![xs[0].clone(), count, xs[2].clone()];
        let sck = self.scratch(n, ck_shape.clone());
        let dck = self.scratch(n, d_shape.clone());
        let (bext, hext, pext) = (self.dim(&xs[0]), self.dim(&xs[2]), self.dim(&xs[3]));
        let name = format!("ssd_scan_{}", n.index());
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };

        // Kernel 1: each chunk from a zero state.
        self.ssd_chunk_kernel(
            n,
            &format!("{name}_chunk"),
            &ch,
            (sck, dck),
            (&ck_shape, &d_shape),
            None,
        )?;

        // Kernel 2: the chunks' start states, in order.
        let mut kb = KB::new(self, &format!("{name}_carry"));
        let (b, hh, p, nn) = (
            IExpr::Grid(0),
            IExpr::Grid(1),
            IExpr::Grid(2),
            IExpr::Grid(3),
        );
        let (s_slot, d_slot, s1_slot) = (kb.buf(sck, true), kb.buf(dck, false), kb.buf(s1, true));
        let s0v = kb.value(s0, &[b.clone(), hh.clone(), p.clone(), nn.clone()])?;
        let at = |kb: &KB, c: &IExpr| {
            kb.l.linear(
                &[b.clone(), c.clone(), hh.clone(), p.clone(), nn.clone()],
                &ck_shape,
            )
        };
        let decay = |kb: &KB, c: &IExpr| Expr::Load {
            buf: d_slot,
            index: kb.l.linear(&[b.clone(), c.clone(), hh.clone()], &d_shape),
        };
        let (stmts, sv) = carry_in_place(&mut kb, s0v, (&ch.count, false), s_slot, &at, &decay);
        kb.body.extend(stmts);
        let none = kb.counter();
        kb.body.push(Stmt::For {
            counter: none,
            extent: if_zero(&ch.count),
            body: vec![Stmt::Store {
                buf: s1_slot,
                index: kb.l.linear(&[b, hh, p, nn], &ss),
                value: Expr::Var(sv),
            }],
        });
        kb.finish(
            vec![bext.clone(), hext.clone(), pext.clone(), ns.clone()],
            n,
        );

        // Kernel 3: each chunk again from its start state, writing y.
        let mut kb = KB::new(self, &name);
        let (b, c, hh, p) = (
            IExpr::Grid(0),
            IExpr::Grid(1),
            IExpr::Grid(2),
            IExpr::Grid(3),
        );
        let grp = hh.clone().div(IExpr::c(hpg));
        let s_slot = kb.buf(sck, false);
        let s = kb.arr();
        kb.body.push(Stmt::Array {
            arr: s,
            len: nst,
            init: 0.0,
        });
        let j = kb.counter();
        kb.body.push(Stmt::For {
            counter: j,
            extent: ns.clone(),
            body: vec![Stmt::ArrSet {
                arr: s,
                index: IExpr::Loop(j),
                value: Expr::Load {
                    buf: s_slot,
                    index: kb.l.linear(
                        &[b.clone(), c.clone(), hh.clone(), p.clone(), IExpr::Loop(j)],
                        &ck_shape,
                    ),
                },
            }],
        });
        let (tl, nn) = (kb.counter(), kb.counter());
        let t = ch.start(&c).add(IExpr::Loop(tl));
        let (dtv, xv, yv, decay) = (kb.var(), kb.var(), kb.var(), kb.var());
        let xi = [b.clone(), t.clone(), hh.clone(), p.clone()];
        let mut body = vec![
            Stmt::Var {
                var: dtv,
                init: kb.value(dt, &[b.clone(), t.clone(), hh.clone()])?,
            },
            Stmt::Var {
                var: xv,
                init: kb.value(x, &xi)?,
            },
            Stmt::Var {
                var: yv,
                init: Expr::Const(0.0),
            },
        ];
        let av = kb.value(a, std::slice::from_ref(&hh))?;
        body.push(Stmt::Var {
            var: decay,
            init: Expr::un(UnaryOp::Exp, Expr::bin(Mul, Expr::Var(dtv), av)),
        });
        let bi = [b.clone(), t, grp, IExpr::Loop(nn)];
        let bv = kb.value(bm, &bi)?;
        let cv = kb.value(cm, &bi)?;
        body.push(scan_update(
            s,
            nn,
            dtv,
            xv,
            yv,
            Expr::Var(decay),
            bv,
            cv,
            nst,
        ));
        body.extend(kb.store_with_epilogues(Value::new(n, 0), y, &xi, yv)?);
        kb.body.push(Stmt::For {
            counter: tl,
            extent: ch.len(&c),
            body,
        });
        let (last, j2) = (kb.counter(), kb.counter());
        let s1_slot = kb.buf(s1, true);
        kb.body.push(Stmt::For {
            counter: last,
            extent: ch.is_last(&c),
            body: vec![Stmt::For {
                counter: j2,
                extent: ns,
                body: vec![Stmt::Store {
                    buf: s1_slot,
                    index: kb.l.linear(&[b, hh, p, IExpr::Loop(j2)], &ss),
                    value: al(s, j2),
                }],
            }],
        });
        kb.finish(vec![bext, ch.count.clone(), hext, pext], n);
        Ok(())
    }

    /// Mamba-2 sequentially: one (batch, head, p) per grid point over every step, the `[N]`
    /// state row local.
    fn ssd_scan_sequential(&mut self, n: NodeId) -> Result<(), LowerError> {
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, s0) = (ops[0], ops[1], ops[2], ops[3], ops[4], ops[5]);
        let xs = self.shape(x);
        let bs = self.shape(bm);
        let nst = self.known(n, &bs[3], "d_state")?;
        let heads = self.known(n, &xs[2], "the head count")?;
        let groups = self.known(n, &bs[2], "the group count")?.max(1);
        let y = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let s1 = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let ss = self.shape(Value::new(n, 1));
        let mut kb = KB::new(self, &format!("ssd_scan_{}", n.index()));
        let sb = kb.buf(s1, true);
        let (b, hh, p) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let grp = hh.clone().div(IExpr::c((heads / groups).max(1) as i64));
        let s = kb.arr();
        kb.body.push(Stmt::Array {
            arr: s,
            len: nst,
            init: 0.0,
        });
        let j = kb.counter();
        let sv = kb.value(s0, &[b.clone(), hh.clone(), p.clone(), IExpr::Loop(j)])?;
        kb.body.push(Stmt::For {
            counter: j,
            extent: IExpr::c(nst as i64),
            body: vec![Stmt::ArrSet {
                arr: s,
                index: IExpr::Loop(j),
                value: sv,
            }],
        });
        let t = kb.counter();
        let nn = kb.counter();
        let (dtv, xv, yv) = (kb.var(), kb.var(), kb.var());
        let xi = [b.clone(), IExpr::Loop(t), hh.clone(), p.clone()];
        let mut body = vec![
            Stmt::Var {
                var: dtv,
                init: kb.value(dt, &[b.clone(), IExpr::Loop(t), hh.clone()])?,
            },
            Stmt::Var {
                var: xv,
                init: kb.value(x, &xi)?,
            },
            Stmt::Var {
                var: yv,
                init: Expr::Const(0.0),
            },
        ];
        // One decay per head and step: computed once, outside the state loop.
        let av = kb.value(a, std::slice::from_ref(&hh))?;
        let decay = kb.var();
        body.push(Stmt::Var {
            var: decay,
            init: Expr::un(UnaryOp::Exp, Expr::bin(BinaryOp::Mul, Expr::Var(dtv), av)),
        });
        let bi = [b.clone(), IExpr::Loop(t), grp.clone(), IExpr::Loop(nn)];
        let bv = kb.value(bm, &bi)?;
        let cv = kb.value(cm, &bi)?;
        body.push(scan_update(
            s,
            nn,
            dtv,
            xv,
            yv,
            Expr::Var(decay),
            bv,
            cv,
            nst,
        ));
        body.extend(kb.store_with_epilogues(Value::new(n, 0), y, &xi, yv)?);
        let l = kb.l.dim(&xs[1]);
        kb.body.push(Stmt::For {
            counter: t,
            extent: l,
            body,
        });
        let j2 = kb.counter();
        let si =
            kb.l.linear(&[b.clone(), hh.clone(), p.clone(), IExpr::Loop(j2)], &ss);
        kb.body.push(Stmt::For {
            counter: j2,
            extent: IExpr::c(nst as i64),
            body: vec![Stmt::Store {
                buf: sb,
                index: si,
                value: Expr::ArrLoad {
                    arr: s,
                    index: IExpr::Loop(j2),
                },
            }],
        });
        let grid = vec![kb.l.dim(&xs[0]), kb.l.dim(&xs[2]), kb.l.dim(&xs[3])];
        kb.finish(grid, n);
        Ok(())
    }

    /// A scratch buffer of node `n`'s kernels (`BufKind::Scratch`), f32, with its own shape.
    fn scratch(&mut self, n: NodeId, shape: Shape) -> BufId {
        self.out.buffers.push(BufInfo {
            kind: BufKind::Scratch,
            dtype: DType::F32,
            shape,
            value: Value::new(n, 0),
        });
        self.out.buffers.len() - 1
    }

    /// [`Self::scratch`] for values that are bf16 already (a bf16 activation's copy) or that
    /// every reader needs only at bf16 precision (a product's result that is rounded into a
    /// bf16 value or summed with others): bf16 with bf16 activations, half the bytes to write
    /// and read. Not for values a kernel accumulates into (the chunk states of a carry).
    fn bf16_scratch(&mut self, n: NodeId, shape: Shape) -> BufId {
        let b = self.scratch(n, shape);
        self.bf16_marked.push(b);
        b
    }

    /// `CrossEntropy` (`grad` false: loss and valid per row) or `CrossEntropyGrad` (`grad`
    /// true: dlogits): one row per grid point; a max pass, a sum-of-exp pass that also picks
    /// the target logit, and for the gradient a third pass writing the row. Ignored rows (and
    /// the target pick) use the exact integer indicator `max(0, 1 - d^2)` of `d == 0`, so the
    /// kernel needs no branch and never loads at the ignore index.
    fn cross_entropy(&mut self, n: NodeId, grad: bool, ignore: i64) -> Result<(), LowerError> {
        use BinaryOp::{Add, Max, Mul, Sub};
        // No class index reaches 2^40, so a larger ignore index matches the same targets
        // (none) clamped, and `target - ignore` cannot overflow (index math may assume so).
        let ignore = ignore.clamp(-(1 << 40), 1 << 40);
        let g = self.g;
        let ops = g.operands(n);
        let (logits, targets) = (ops[0], ops[1]);
        let ls = self.shape(logits);
        let ts = self.shape(targets);
        let Some(vd) = ls.last().cloned() else {
            return Err(LowerError::Unsupported {
                node: n,
                op: g.op(n).name(),
                message: "logits of rank 0".into(),
            });
        };
        let out0 = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let out1 = (!grad).then(|| self.new_buf(Value::new(n, 1), BufKind::Temp));
        let mut kb = KB::new(self, &format!("{}_{}", g.op(n).name(), n.index()));
        let idx = kb.l.delinear(IExpr::Grid(0), &ts);
        let tgt = kb.index_value(targets, &idx)?;
        let vext = kb.l.dim(&vd);
        let indicator = |d: IExpr| {
            let df = Expr::FromIndex(d);
            Expr::bin(
                Max,
                Expr::Const(0.0),
                Expr::bin(Sub, Expr::Const(1.0), Expr::bin(Mul, df.clone(), df)),
            )
        };
        let valid = kb.var();
        kb.body.push(Stmt::Var {
            var: valid,
            init: Expr::bin(
                Sub,
                Expr::Const(1.0),
                indicator(tgt.clone().sub(IExpr::c(ignore))),
            ),
        });
        let at = |kb: &KB, l: LoopId| {
            let mut li = idx.clone();
            li.push(IExpr::Loop(l));
            kb.l.linear(&li, &ls)
        };
        let logit = |kb: &mut KB, l: LoopId| -> Result<Expr, LowerError> {
            let mut li = idx.clone();
            li.push(IExpr::Loop(l));
            kb.value(logits, &li)
        };
        let (m, s, pick) = (kb.var(), kb.var(), kb.var());
        kb.body.push(Stmt::Var {
            var: m,
            init: Expr::Const(f64::NEG_INFINITY),
        });
        let v1 = kb.counter();
        let x1 = logit(&mut kb, v1)?;
        kb.body.push(Stmt::For {
            counter: v1,
            extent: vext.clone(),
            body: vec![Stmt::Set {
                var: m,
                value: Expr::bin(Max, Expr::Var(m), x1),
            }],
        });
        kb.body.push(Stmt::Var {
            var: s,
            init: Expr::Const(0.0),
        });
        kb.body.push(Stmt::Var {
            var: pick,
            init: Expr::Const(0.0),
        });
        let v2 = kb.counter();
        let x2 = kb.var();
        let x2e = logit(&mut kb, v2)?;
        kb.body.push(Stmt::For {
            counter: v2,
            extent: vext.clone(),
            body: vec![
                Stmt::Var { var: x2, init: x2e },
                Stmt::Set {
                    var: s,
                    value: Expr::bin(
                        Add,
                        Expr::Var(s),
                        Expr::un(UnaryOp::Exp, Expr::bin(Sub, Expr::Var(x2), Expr::Var(m))),
                    ),
                },
                Stmt::Set {
                    var: pick,
                    value: Expr::bin(
                        Add,
                        Expr::Var(pick),
                        Expr::bin(
                            Mul,
                            Expr::Var(x2),
                            indicator(IExpr::Loop(v2).sub(tgt.clone())),
                        ),
                    ),
                },
            ],
        });
        let lse = Expr::un(UnaryOp::Log, Expr::Var(s));
        if let Some(out1) = out1 {
            let (lb, vb) = (kb.buf(out0, true), kb.buf(out1, true));
            let loss = Expr::bin(Add, Expr::bin(Sub, Expr::Var(m), Expr::Var(pick)), lse);
            kb.body.push(Stmt::Store {
                buf: lb,
                index: IExpr::Grid(0),
                value: Expr::bin(Mul, Expr::Var(valid), loss),
            });
            kb.body.push(Stmt::Store {
                buf: vb,
                index: IExpr::Grid(0),
                value: Expr::Var(valid),
            });
        } else {
            let dl = kb.value(ops[2], &idx)?;
            let (lsev, dlv) = (kb.var(), kb.var());
            kb.body.push(Stmt::Var {
                var: lsev,
                init: lse,
            });
            kb.body.push(Stmt::Var { var: dlv, init: dl });
            let ob = kb.buf(out0, true);
            let v3 = kb.counter();
            let x3 = logit(&mut kb, v3)?;
            let p = Expr::un(
                UnaryOp::Exp,
                Expr::bin(Sub, Expr::bin(Sub, x3, Expr::Var(m)), Expr::Var(lsev)),
            );
            let d = Expr::bin(
                Mul,
                Expr::bin(Sub, p, indicator(IExpr::Loop(v3).sub(tgt.clone()))),
                Expr::Var(dlv),
            );
            let index = at(&kb, v3);
            kb.body.push(Stmt::For {
                counter: v3,
                extent: vext,
                body: vec![Stmt::Store {
                    buf: ob,
                    index,
                    value: Expr::bin(Mul, d, Expr::Var(valid)),
                }],
            });
        }
        let grid = vec![kb.l.numel(&ts)];
        kb.finish(grid, n);
        Ok(())
    }

    /// The chunks of a scan gradient over the sequence axis `l` of node `n`: `q` steps each,
    /// the last one partial, and their count `ceil(l / q)` as a dimension.
    fn chunks(&self, n: NodeId, l: &Dim, q: u64) -> Result<(Chunks, Dim), LowerError> {
        let count = l.ceil_div(q).ok_or_else(|| LowerError::Unsupported {
            node: n,
            op: self.g.op(n).name(),
            message: format!("cannot split {l} steps into chunks of {q}"),
        })?;
        let chunks = Chunks {
            q: q as i64,
            l: self.dim(l),
            count: self.dim(&count),
        };
        Ok((chunks, count))
    }

    /// `SelectiveScanGrad` in five kernels, with the forward states and the state cotangents
    /// checkpointed at the boundaries of chunks of `Q = SELECTIVE_GRAD_CHUNK` steps and
    /// recomputed where needed (scratch `3·B·ceil(L/Q)·E·N` floats, not `[B, L, E, N]`).
    /// Both recurrences are linear, so their checkpoints come chunk-parallel, as in
    /// [`Self::selective_scan`]:
    ///
    /// 1. One (batch, chunk, channel) per grid point runs its chunk forward from a zero state
    ///    and backward from a zero cotangent, storing the end state in scratch
    ///    `H [B, ceil(L/Q), E, N]`, the product of the decays in `D` and the cotangent
    ///    reaching the chunk's start in `G` (as `H`).
    /// 2. One (batch, channel, n) per grid point carries them across chunks: `H[c]` becomes
    ///    the state entering chunk `c` (in order from `h0`), `G[c]` the cotangent of the
    ///    state leaving it (from the last chunk, from `dh1`); it writes `dh0`.
    /// 3. `dx`, `ddt [B, L, E]`, one (batch, chunk, channel) per grid point, summed over the
    ///    state elements one at a time: per element, the cotangents backwards from `G`, then
    ///    the states forwards from `H`, in `[Q]` local arrays.
    /// 4. One (batch, chunk, n) per grid point sums `dB`, `dC` over channels: per channel,
    ///    the same two chains ([`bc_accumulate`]); on the way, each channel's `dA` over the
    ///    chunk, stored over the element of `H` it has read (no kernel reads it again).
    /// 5. One (channel, n) per grid point sums those partial `dA` over batch and chunks, in
    ///    order.
    ///
    /// Recomputation repeats the forward sweep's arithmetic, and every sum has a fixed
    /// order.
    fn selective_scan_grad(&mut self, n: NodeId) -> Result<(), LowerError> {
        use BinaryOp::{Add, Mul};
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, h0, dy, dh1) = (
            ops[0], ops[1], ops[2], ops[3], ops[4], ops[5], ops[6], ops[7],
        );
        let xs = self.shape(x);
        let nd = self.shape(a)[1].clone();
        let nst = self.known(n, &nd, "d_state")?;
        let ns = IExpr::c(nst as i64);
        let hs = self.shape(h0);
        let bls = self.shape(bm);
        let q = SELECTIVE_GRAD_CHUNK;
        let (ch, count) = self.chunks(n, &xs[1], q)?;
        let outs: Vec<BufId> = (0..6)
            .map(|r| self.new_buf(Value::new(n, r), BufKind::Temp))
            .collect();
        let ck_shape = vec![xs[0].clone(), count, xs[2].clone(), nd];
        let hck = self.scratch(n, ck_shape.clone());
        let gck = self.scratch(n, ck_shape.clone());
        let dck = self.scratch(n, ck_shape.clone());
        let (bext, eext) = (self.dim(&xs[0]), self.dim(&xs[2]));
        let name = format!("selective_scan_grad_{}", n.index());
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };
        let qn = q as usize;

        // Kernel 1: each chunk's own states, decay products and cotangents, from zero.
        self.selective_chunk_kernel(
            n,
            &format!("{name}_chunk"),
            &ch,
            (hck, dck, &ck_shape),
            Some((dy, gck)),
        )?;

        // Kernel 2: the states entering each chunk, in order from `h0`, and the cotangents
        // leaving each chunk, from the last from `dh1`; `dh0`.
        let mut kb = KB::new(self, &format!("{name}_carry"));
        let (b, e, nn) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (h_slot, g_slot, d_slot) = (kb.buf(hck, true), kb.buf(gck, true), kb.buf(dck, false));
        let at = |kb: &KB, c: &IExpr| {
            kb.l.linear(&[b.clone(), c.clone(), e.clone(), nn.clone()], &ck_shape)
        };
        let decay = |kb: &KB, c: &IExpr| Expr::Load {
            buf: d_slot,
            index: at(kb, c),
        };
        let ben = [b.clone(), e.clone(), nn.clone()];
        let h0v = kb.value(h0, &ben)?;
        let (stmts, _) = carry_in_place(&mut kb, h0v, (&ch.count, false), h_slot, &at, &decay);
        kb.body.extend(stmts);
        let dh1v = kb.value(dh1, &ben)?;
        let (stmts, gv) = carry_in_place(&mut kb, dh1v, (&ch.count, true), g_slot, &at, &decay);
        kb.body.extend(stmts);
        let dh0s = kb.buf(outs[5], true);
        kb.body.push(Stmt::Store {
            buf: dh0s,
            index: kb.l.linear(&ben, &hs),
            value: Expr::Var(gv),
        });
        kb.finish(vec![bext.clone(), eext.clone(), ns.clone()], n);

        // The chunk arrays of state element (b, e, nn) over chunk `c` (at `t0`): each step's
        // `dt`, `decay = exp(dt A)`, `u = dt x`, then its cotangents `g` backwards from `G`.
        let steps = |kb: &mut KB,
                     (b, e, nn): (&IExpr, &IExpr, &IExpr),
                     (t0, len): (&IExpr, &IExpr),
                     (gck_slot, c): (usize, &IExpr),
                     arrs: ChunkArrays| {
            let tl = kb.counter();
            let bt = [b.clone(), t0.clone().add(IExpr::Loop(tl)), e.clone()];
            let dte = kb.value(dt, &bt)?;
            let xe = kb.value(x, &bt)?;
            let av = kb.value(a, &[e.clone(), nn.clone()])?;
            let at = |arr| Expr::ArrLoad {
                arr,
                index: IExpr::Loop(tl),
            };
            let set = |arr, value| Stmt::ArrSet {
                arr,
                index: IExpr::Loop(tl),
                value,
            };
            let mut s = vec![Stmt::For {
                counter: tl,
                extent: len.clone(),
                body: vec![
                    set(arrs.dt, dte),
                    set(
                        arrs.decay,
                        Expr::un(UnaryOp::Exp, Expr::bin(Mul, at(arrs.dt), av)),
                    ),
                    set(arrs.u, Expr::bin(Mul, at(arrs.dt), xe)),
                ],
            }];
            let (k, gv) = (kb.counter(), kb.var());
            let tlr = len.clone().sub(IExpr::c(1)).sub(IExpr::Loop(k));
            let t = t0.clone().add(tlr.clone());
            let cv = kb.value(cm, &[b.clone(), t.clone(), nn.clone()])?;
            let gye = kb.value(dy, &[b.clone(), t, e.clone()])?;
            let init = Expr::Load {
                buf: gck_slot,
                index: kb
                    .l
                    .linear(&[b.clone(), c.clone(), e.clone(), nn.clone()], &ck_shape),
            };
            s.extend(g_chain(gv, init, arrs, k, len.clone(), tlr, cv, gye));
            Ok::<_, LowerError>(s)
        };

        // Kernel 3: dx, ddt [B, L, E], one (batch, chunk, channel) per grid point, summed over
        // the state elements one at a time.
        let mut kb = KB::new(self, &name);
        let (b, c, e) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (h_slot, g_slot) = (kb.buf(hck, false), kb.buf(gck, false));
        let arrs = ChunkArrays::declare(&mut kb, qn);
        let (dua, dda) = (kb.arr(), kb.arr());
        for arr in [dua, dda] {
            kb.body.push(Stmt::Array {
                arr,
                len: qn,
                init: 0.0,
            });
        }
        let nl = kb.counter();
        let nv = IExpr::Loop(nl);
        let mut per_n = steps(&mut kb, (&b, &e, &nv), (&t0, &len), (g_slot, &c), arrs)?;
        let (tl, hv) = (kb.counter(), kb.var());
        let bv = kb.value(
            bm,
            &[b.clone(), t0.clone().add(IExpr::Loop(tl)), nv.clone()],
        )?;
        let av = kb.value(a, &[e.clone(), nv.clone()])?;
        per_n.push(Stmt::Var {
            var: hv,
            init: Expr::Load {
                buf: h_slot,
                index: kb
                    .l
                    .linear(&[b.clone(), c.clone(), e.clone(), nv], &ck_shape),
            },
        });
        let add_to = |arr: ArrId, v: Expr| Stmt::ArrSet {
            arr,
            index: IExpr::Loop(tl),
            value: Expr::bin(Add, al(arr, tl), v),
        };
        per_n.push(Stmt::For {
            counter: tl,
            extent: len.clone(),
            body: vec![
                add_to(dua, Expr::bin(Mul, al(arrs.g, tl), bv.clone())),
                add_to(
                    dda,
                    Expr::bin(
                        Mul,
                        Expr::bin(Mul, Expr::bin(Mul, al(arrs.g, tl), al(arrs.decay, tl)), av),
                        Expr::Var(hv),
                    ),
                ),
                Stmt::Set {
                    var: hv,
                    value: next_state(al(arrs.decay, tl), Expr::Var(hv), al(arrs.u, tl), bv),
                },
            ],
        });
        kb.body.push(Stmt::For {
            counter: nl,
            extent: ns.clone(),
            body: per_n,
        });
        let (dxs, ddts) = (kb.buf(outs[0], true), kb.buf(outs[1], true));
        let tl = kb.counter();
        let bt = [b.clone(), t0.add(IExpr::Loop(tl)), e.clone()];
        let xe = kb.value(x, &bt)?;
        let oi = kb.l.linear(&bt, &xs);
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len,
            body: vec![
                Stmt::Store {
                    buf: dxs,
                    index: oi.clone(),
                    value: Expr::bin(Mul, al(arrs.dt, tl), al(dua, tl)),
                },
                Stmt::Store {
                    buf: ddts,
                    index: oi,
                    value: Expr::bin(Add, Expr::bin(Mul, xe, al(dua, tl)), al(dda, tl)),
                },
            ],
        });
        kb.finish(vec![bext.clone(), ch.count.clone(), eext.clone()], n);

        // Kernel 4: dB, dC [B, L, N], summed over channels.
        let mut kb = KB::new(self, &format!("{name}_bc"));
        let (b, c, nn) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (h_slot, g_slot) = (kb.buf(hck, true), kb.buf(gck, false));
        let arrs = ChunkArrays::declare(&mut kb, qn);
        let (dba, dca) = (kb.arr(), kb.arr());
        for arr in [dba, dca] {
            kb.body.push(Stmt::Array {
                arr,
                len: qn,
                init: 0.0,
            });
        }
        let el = kb.counter();
        let ev = IExpr::Loop(el);
        let mut per_channel = steps(&mut kb, (&b, &ev, &nn), (&t0, &len), (g_slot, &c), arrs)?;
        let (tl, hv) = (kb.counter(), kb.var());
        let t = t0.clone().add(IExpr::Loop(tl));
        let bv = kb.value(bm, &[b.clone(), t.clone(), nn.clone()])?;
        let gye = kb.value(dy, &[b.clone(), t, ev.clone()])?;
        let hi =
            kb.l.linear(&[b.clone(), c.clone(), ev, nn.clone()], &ck_shape);
        let init = Expr::Load {
            buf: h_slot,
            index: hi.clone(),
        };
        let da = kb.var();
        per_channel.extend(bc_accumulate(
            hv,
            init,
            arrs,
            tl,
            len.clone(),
            bv,
            gye,
            (dba, dca),
            Some(da),
        ));
        // The checkpoint element is dead once read: its dA partial takes its place.
        per_channel.push(Stmt::Store {
            buf: h_slot,
            index: hi,
            value: Expr::Var(da),
        });
        kb.body.push(Stmt::For {
            counter: el,
            extent: eext.clone(),
            body: per_channel,
        });
        let (dbs, dcs) = (kb.buf(outs[3], true), kb.buf(outs[4], true));
        let tl = kb.counter();
        let oi = kb.l.linear(&[b, t0.add(IExpr::Loop(tl)), nn], &bls);
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len,
            body: vec![
                Stmt::Store {
                    buf: dbs,
                    index: oi.clone(),
                    value: al(dba, tl),
                },
                Stmt::Store {
                    buf: dcs,
                    index: oi,
                    value: al(dca, tl),
                },
            ],
        });
        kb.finish(vec![bext.clone(), ch.count.clone(), ns.clone()], n);

        // Kernel 5: dA [E, N], the sum of kernel 4's partial sums (in `H`) over batch and
        // chunks.
        let mut kb = KB::new(self, &format!("{name}_a"));
        let (e, nn) = (IExpr::Grid(0), IExpr::Grid(1));
        let h_slot = kb.buf(hck, false);
        let acc = kb.var();
        kb.body.push(Stmt::Var {
            var: acc,
            init: Expr::Const(0.0),
        });
        let (bl, c) = (kb.counter(), kb.counter());
        let part = Expr::Load {
            buf: h_slot,
            index: kb.l.linear(
                &[IExpr::Loop(bl), IExpr::Loop(c), e.clone(), nn.clone()],
                &ck_shape,
            ),
        };
        kb.body.push(Stmt::For {
            counter: bl,
            extent: bext,
            body: vec![Stmt::For {
                counter: c,
                extent: ch.count.clone(),
                body: vec![Stmt::Set {
                    var: acc,
                    value: Expr::bin(Add, Expr::Var(acc), part),
                }],
            }],
        });
        let das = kb.buf(outs[2], true);
        let ash = kb.l.shape(Value::new(n, 2));
        kb.body.push(Stmt::Store {
            buf: das,
            index: kb.l.linear(&[e, nn], &ash),
            value: Expr::Var(acc),
        });
        kb.finish(vec![eext, ns], n);
        Ok(())
    }

    /// `SsdScanGrad` in five kernels, with the forward states and the state cotangents
    /// checkpointed at the boundaries of chunks of `Q` steps (the op's `chunk`, at most
    /// `MAX_SSD_GRAD_CHUNK`) and recomputed where needed (scratch `O(B·H·P·N·L/Q)`, not
    /// `[B, L, H, P, N]`). Both recurrences are linear, so their checkpoints come
    /// chunk-parallel, as in [`Self::ssd_scan`]:
    ///
    /// 1. One (batch, chunk, head, p) per grid point runs its chunk forward from a zero state
    ///    and backward from a zero cotangent, storing the end state in scratch
    ///    `S [B, ceil(L/Q), H, P, N]`, the cotangent reaching the chunk's start in `G` (as
    ///    `S`) and (the `p = 0` point) the product of the decays in `D [B, ceil(L/Q), H]`.
    /// 2. One (batch, head, p, n) per grid point carries them across chunks: `S[c]` becomes
    ///    the state entering chunk `c` (in order from `s0`), `G[c]` the cotangent of the
    ///    state leaving it (from the last chunk, from `ds1`); it writes `ds0`.
    /// 3. `ddt [B, L, H]` and `dx`, one (batch, chunk, head) per grid point, summed over p
    ///    and n; the same `G . S` per step gives the chunk's partial `dA` (summed over p and
    ///    its steps), stored in scratch `[B, ceil(L/Q), H]`.
    /// 4. `dA [H]`, one head per grid point, sums the partials over batch and chunks.
    /// 5. `dB`, `dC [B, L, G, N]`, one (batch, chunk, group, n) per grid point, summed over
    ///    the group's heads and p ([`bc_accumulate`]).
    ///
    /// Kernels 3 and 5 recompute the states one element (one n) at a time: per chunk, the
    /// cotangents backwards from `G`, then the states forwards from `S`, with the decay of
    /// each (step, head) computed once per chunk. The arithmetic is the forward sweep's and
    /// every sum has a fixed order.
    fn ssd_scan_grad(&mut self, n: NodeId, chunk: u64) -> Result<(), LowerError> {
        use BinaryOp::{Add, Mul};
        if !self.ssd_scans {
            return self.ssd_matmul_grad(n, chunk);
        }
        self.ssd_last_prep = None;
        let g = self.g;
        let ops = g.operands(n);
        let (x, dt, a, bm, cm, s0, dy, ds1) = (
            ops[0], ops[1], ops[2], ops[3], ops[4], ops[5], ops[6], ops[7],
        );
        let xs = self.shape(x);
        let bs = self.shape(bm);
        let nst = self.known(n, &bs[3], "d_state")?;
        let heads = self.known(n, &xs[2], "the head count")?;
        let groups = self.known(n, &bs[2], "the group count")?.max(1);
        let hpg = (heads / groups).max(1) as i64;
        let ns = IExpr::c(nst as i64);
        let ss = self.shape(s0);
        let q = chunk.clamp(1, MAX_SSD_GRAD_CHUNK);
        let qn = q as usize;
        let (ch, count) = self.chunks(n, &xs[1], q)?;
        let mut ck_shape = xs.clone();
        ck_shape[1] = count.clone();
        ck_shape.push(bs[3].clone());
        let d_shape = vec![xs[0].clone(), count.clone(), xs[2].clone()];
        let pa_shape = d_shape.clone();
        let outs: Vec<BufId> = (0..6)
            .map(|r| self.new_buf(Value::new(n, r), BufKind::Temp))
            .collect();
        let sck = self.scratch(n, ck_shape.clone());
        let gck = self.scratch(n, ck_shape.clone());
        let dck = self.scratch(n, d_shape.clone());
        let pabuf = self.scratch(n, pa_shape.clone());
        let (bext, hext, pext) = (self.dim(&xs[0]), self.dim(&xs[2]), self.dim(&xs[3]));
        let gext = self.dim(&bs[2]);
        let name = format!("ssd_scan_grad_{}", n.index());
        let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
            arr,
            index: IExpr::Loop(l),
        };
        let exp_mul = |d: Expr, a: Expr| Expr::un(UnaryOp::Exp, Expr::bin(Mul, d, a));

        // Kernel 1: each chunk's own states and cotangents, from zero.
        self.ssd_chunk_kernel(
            n,
            &format!("{name}_chunk"),
            &ch,
            (sck, dck),
            (&ck_shape, &d_shape),
            Some((dy, gck)),
        )?;

        // Kernel 2: the states entering each chunk, in order from `s0`, and the cotangents
        // leaving each chunk, from the last from `ds1`; `ds0`.
        let mut kb = KB::new(self, &format!("{name}_carry"));
        let (b, hh, p, nn) = (
            IExpr::Grid(0),
            IExpr::Grid(1),
            IExpr::Grid(2),
            IExpr::Grid(3),
        );
        let (s_slot, g_slot, d_slot) = (kb.buf(sck, true), kb.buf(gck, true), kb.buf(dck, false));
        let at = |kb: &KB, c: &IExpr| {
            kb.l.linear(
                &[b.clone(), c.clone(), hh.clone(), p.clone(), nn.clone()],
                &ck_shape,
            )
        };
        let decay = |kb: &KB, c: &IExpr| Expr::Load {
            buf: d_slot,
            index: kb.l.linear(&[b.clone(), c.clone(), hh.clone()], &d_shape),
        };
        let bhpn = [b.clone(), hh.clone(), p.clone(), nn.clone()];
        let s0v = kb.value(s0, &bhpn)?;
        let (stmts, _) = carry_in_place(&mut kb, s0v, (&ch.count, false), s_slot, &at, &decay);
        kb.body.extend(stmts);
        let ds1v = kb.value(ds1, &bhpn)?;
        let (stmts, gv) = carry_in_place(&mut kb, ds1v, (&ch.count, true), g_slot, &at, &decay);
        kb.body.extend(stmts);
        let ds0s = kb.buf(outs[5], true);
        kb.body.push(Stmt::Store {
            buf: ds0s,
            index: kb.l.linear(&bhpn, &ss),
            value: Expr::Var(gv),
        });
        kb.finish(
            vec![bext.clone(), hext.clone(), pext.clone(), ns.clone()],
            n,
        );

        // The chunk arrays `dt` and `decay = exp(dt A)` of head `hh` over the chunk at `t0`,
        // shared by the head's P x N state elements.
        let head_steps = |kb: &mut KB,
                          (b, hh): (&IExpr, &IExpr),
                          (t0, len): (&IExpr, &IExpr),
                          arrs: ChunkArrays| {
            let tl = kb.counter();
            let dte = kb.value(
                dt,
                &[b.clone(), t0.clone().add(IExpr::Loop(tl)), hh.clone()],
            )?;
            let ah = kb.value(a, std::slice::from_ref(hh))?;
            Ok::<_, LowerError>(Stmt::For {
                counter: tl,
                extent: len.clone(),
                body: vec![
                    Stmt::ArrSet {
                        arr: arrs.dt,
                        index: IExpr::Loop(tl),
                        value: dte,
                    },
                    Stmt::ArrSet {
                        arr: arrs.decay,
                        index: IExpr::Loop(tl),
                        value: exp_mul(al(arrs.dt, tl), ah),
                    },
                ],
            })
        };
        // The chunk array `u = dt x` of head dim `p` of head `hh` (after `head_steps`), plus
        // `extra` statements per step (given the step's loop counter).
        let u_steps = |kb: &mut KB,
                       (b, hh, p): (&IExpr, &IExpr, &IExpr),
                       (t0, len): (&IExpr, &IExpr),
                       arrs: ChunkArrays,
                       extra: &dyn Fn(&KB, LoopId) -> Vec<Stmt>| {
            let tl = kb.counter();
            let xe = kb.value(
                x,
                &[
                    b.clone(),
                    t0.clone().add(IExpr::Loop(tl)),
                    hh.clone(),
                    p.clone(),
                ],
            )?;
            let mut body = vec![Stmt::ArrSet {
                arr: arrs.u,
                index: IExpr::Loop(tl),
                value: Expr::bin(Mul, al(arrs.dt, tl), xe),
            }];
            body.extend(extra(kb, tl));
            Ok::<_, LowerError>(Stmt::For {
                counter: tl,
                extent: len.clone(),
                body,
            })
        };
        // Element (b, hh, p, nn) of the checkpoint in `slot` at chunk `c`.
        let ck_load =
            |kb: &KB, slot, (b, c, hh, p, nn): (&IExpr, &IExpr, &IExpr, &IExpr, &IExpr)| {
                Expr::Load {
                    buf: slot,
                    index: kb.l.linear(
                        &[b.clone(), c.clone(), hh.clone(), p.clone(), nn.clone()],
                        &ck_shape,
                    ),
                }
            };
        // The cotangents `g` of state element (b, hh, p, nn) over chunk `c`, backwards from
        // `G` (after `head_steps`).
        let g_steps = |kb: &mut KB,
                       (b, hh, p, nn): (&IExpr, &IExpr, &IExpr, &IExpr),
                       (c, t0, len): (&IExpr, &IExpr, &IExpr),
                       gck_slot: usize,
                       arrs: ChunkArrays| {
            let (k, gv) = (kb.counter(), kb.var());
            let tlr = len.clone().sub(IExpr::c(1)).sub(IExpr::Loop(k));
            let t = t0.clone().add(tlr.clone());
            let grp = hh.clone().div(IExpr::c(hpg));
            let cv = kb.value(cm, &[b.clone(), t.clone(), grp, nn.clone()])?;
            let gye = kb.value(dy, &[b.clone(), t, hh.clone(), p.clone()])?;
            let init = ck_load(kb, gck_slot, (b, c, hh, p, nn));
            Ok::<_, LowerError>(g_chain(gv, init, arrs, k, len.clone(), tlr, cv, gye))
        };

        // Kernel 3: ddt [B, L, H] = sum_p x du + decay A (G . S), du = G . B; dx = dt du.
        let mut kb = KB::new(self, &format!("{name}_dt"));
        let (b, c, hh) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let grp = hh.clone().div(IExpr::c(hpg));
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (s_slot, g_slot) = (kb.buf(sck, false), kb.buf(gck, false));
        let arrs = ChunkArrays::declare(&mut kb, qn);
        let (acc, dua, qa) = (kb.arr(), kb.arr(), kb.arr());
        for arr in [acc, dua, qa] {
            kb.body.push(Stmt::Array {
                arr,
                len: qn,
                init: 0.0,
            });
        }
        let st = head_steps(&mut kb, (&b, &hh), (&t0, &len), arrs)?;
        kb.body.push(st);
        let part = kb.var();
        kb.body.push(Stmt::Var {
            var: part,
            init: Expr::Const(0.0),
        });
        let (pl, nl) = (kb.counter(), kb.counter());
        let (pv, nv) = (IExpr::Loop(pl), IExpr::Loop(nl));
        let zero = |_: &KB, tl: LoopId| {
            [dua, qa]
                .map(|arr| Stmt::ArrSet {
                    arr,
                    index: IExpr::Loop(tl),
                    value: Expr::Const(0.0),
                })
                .to_vec()
        };
        let mut per_p = vec![u_steps(&mut kb, (&b, &hh, &pv), (&t0, &len), arrs, &zero)?];
        let mut per_n = g_steps(&mut kb, (&b, &hh, &pv, &nv), (&c, &t0, &len), g_slot, arrs)?;
        let (tl, sv) = (kb.counter(), kb.var());
        let bv = kb.value(
            bm,
            &[b.clone(), t0.clone().add(IExpr::Loop(tl)), grp, nv.clone()],
        )?;
        per_n.push(Stmt::Var {
            var: sv,
            init: ck_load(&kb, s_slot, (&b, &c, &hh, &pv, &nv)),
        });
        let add_to = |arr: ArrId, v: Expr| Stmt::ArrSet {
            arr,
            index: IExpr::Loop(tl),
            value: Expr::bin(Add, al(arr, tl), v),
        };
        per_n.push(Stmt::For {
            counter: tl,
            extent: len.clone(),
            body: vec![
                add_to(dua, Expr::bin(Mul, al(arrs.g, tl), bv.clone())),
                add_to(qa, Expr::bin(Mul, al(arrs.g, tl), Expr::Var(sv))),
                Stmt::Set {
                    var: sv,
                    value: next_state(al(arrs.decay, tl), Expr::Var(sv), al(arrs.u, tl), bv),
                },
            ],
        });
        per_p.push(Stmt::For {
            counter: nl,
            extent: ns.clone(),
            body: per_n,
        });
        let tl = kb.counter();
        let xi = [b.clone(), t0.clone().add(IExpr::Loop(tl)), hh.clone(), pv];
        let xe = kb.value(x, &xi)?;
        let ah = kb.value(a, std::slice::from_ref(&hh))?;
        let dxs = kb.buf(outs[0], true);
        per_p.push(Stmt::For {
            counter: tl,
            extent: len.clone(),
            body: vec![
                Stmt::Store {
                    buf: dxs,
                    index: kb.l.linear(&xi, &xs),
                    value: Expr::bin(Mul, al(arrs.dt, tl), al(dua, tl)),
                },
                Stmt::ArrSet {
                    arr: acc,
                    index: IExpr::Loop(tl),
                    value: Expr::bin(
                        Add,
                        al(acc, tl),
                        Expr::bin(
                            Add,
                            Expr::bin(Mul, xe, al(dua, tl)),
                            Expr::bin(Mul, Expr::bin(Mul, al(arrs.decay, tl), ah), al(qa, tl)),
                        ),
                    ),
                },
                Stmt::Set {
                    var: part,
                    value: Expr::bin(
                        Add,
                        Expr::Var(part),
                        Expr::bin(
                            Mul,
                            Expr::bin(Mul, al(arrs.decay, tl), al(arrs.dt, tl)),
                            al(qa, tl),
                        ),
                    ),
                },
            ],
        });
        kb.body.push(Stmt::For {
            counter: pl,
            extent: pext.clone(),
            body: per_p,
        });
        let ddts = kb.buf(outs[1], true);
        let dts = kb.l.shape(Value::new(n, 1));
        let pa_slot = kb.buf(pabuf, true);
        kb.body.push(Stmt::Store {
            buf: pa_slot,
            index: kb.l.linear(&[b.clone(), c, hh.clone()], &pa_shape),
            value: Expr::Var(part),
        });
        let tl = kb.counter();
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len,
            body: vec![Stmt::Store {
                buf: ddts,
                index: kb.l.linear(&[b, t0.add(IExpr::Loop(tl)), hh], &dts),
                value: al(acc, tl),
            }],
        });
        kb.finish(vec![bext.clone(), ch.count.clone(), hext.clone()], n);

        // Kernel 4: dA [H], the sum of kernel 3's partial sums over batch and chunks.
        let mut kb = KB::new(self, &format!("{name}_a"));
        let hh = IExpr::Grid(0);
        let pa_slot = kb.buf(pabuf, false);
        let acc = kb.var();
        kb.body.push(Stmt::Var {
            var: acc,
            init: Expr::Const(0.0),
        });
        let (bl, c) = (kb.counter(), kb.counter());
        let pa = Expr::Load {
            buf: pa_slot,
            index: kb
                .l
                .linear(&[IExpr::Loop(bl), IExpr::Loop(c), hh.clone()], &pa_shape),
        };
        kb.body.push(Stmt::For {
            counter: bl,
            extent: bext.clone(),
            body: vec![Stmt::For {
                counter: c,
                extent: ch.count.clone(),
                body: vec![Stmt::Set {
                    var: acc,
                    value: Expr::bin(Add, Expr::Var(acc), pa),
                }],
            }],
        });
        let das = kb.buf(outs[2], true);
        kb.body.push(Stmt::Store {
            buf: das,
            index: hh,
            value: Expr::Var(acc),
        });
        kb.finish(vec![hext], n);

        // Kernel 5: dB, dC [B, L, G, N], summed over the group's heads and p.
        let mut kb = KB::new(self, &format!("{name}_bc"));
        let (b, c, gi, nn) = (
            IExpr::Grid(0),
            IExpr::Grid(1),
            IExpr::Grid(2),
            IExpr::Grid(3),
        );
        let (t0, len) = (ch.start(&c), ch.len(&c));
        let (s_slot, g_slot) = (kb.buf(sck, false), kb.buf(gck, false));
        let arrs = ChunkArrays::declare(&mut kb, qn);
        let (dba, dca) = (kb.arr(), kb.arr());
        for arr in [dba, dca] {
            kb.body.push(Stmt::Array {
                arr,
                len: qn,
                init: 0.0,
            });
        }
        let (hl, pl) = (kb.counter(), kb.counter());
        let hh = gi.clone().mul(IExpr::c(hpg)).add(IExpr::Loop(hl));
        let pv = IExpr::Loop(pl);
        let mut per_head = vec![head_steps(&mut kb, (&b, &hh), (&t0, &len), arrs)?];
        let mut per_p = vec![u_steps(
            &mut kb,
            (&b, &hh, &pv),
            (&t0, &len),
            arrs,
            &|_, _| Vec::new(),
        )?];
        per_p.extend(g_steps(
            &mut kb,
            (&b, &hh, &pv, &nn),
            (&c, &t0, &len),
            g_slot,
            arrs,
        )?);
        let (tl, sv) = (kb.counter(), kb.var());
        let t = t0.clone().add(IExpr::Loop(tl));
        let bv = kb.value(bm, &[b.clone(), t.clone(), gi.clone(), nn.clone()])?;
        let gye = kb.value(dy, &[b.clone(), t, hh.clone(), pv.clone()])?;
        let init = ck_load(&kb, s_slot, (&b, &c, &hh, &pv, &nn));
        per_p.extend(bc_accumulate(
            sv,
            init,
            arrs,
            tl,
            len.clone(),
            bv,
            gye,
            (dba, dca),
            None,
        ));
        per_head.push(Stmt::For {
            counter: pl,
            extent: pext,
            body: per_p,
        });
        kb.body.push(Stmt::For {
            counter: hl,
            extent: IExpr::c(hpg),
            body: per_head,
        });
        let (dbs, dcs) = (kb.buf(outs[3], true), kb.buf(outs[4], true));
        let tl = kb.counter();
        let oi = kb.l.linear(&[b, t0.add(IExpr::Loop(tl)), gi, nn], &bs);
        kb.body.push(Stmt::For {
            counter: tl,
            extent: len,
            body: vec![
                Stmt::Store {
                    buf: dbs,
                    index: oi.clone(),
                    value: al(dba, tl),
                },
                Stmt::Store {
                    buf: dcs,
                    index: oi,
                    value: al(dca, tl),
                },
            ],
        });
        kb.finish(vec![bext, ch.count.clone(), gext, ns], n);
        Ok(())
    }
}

/// `for n: h[n] = decay h[n] + dt*x*B; y += h[n]*C`, with `decay = exp(dt*A)`.
#[allow(clippy::too_many_arguments)]
fn scan_update(
    h: ArrId,
    nn: LoopId,
    dt: VarId,
    x: VarId,
    y: VarId,
    decay: Expr,
    b: Expr,
    c: Expr,
    n: usize,
) -> Stmt {
    use BinaryOp::{Add, Mul};
    let hn = Expr::ArrLoad {
        arr: h,
        index: IExpr::Loop(nn),
    };
    let input = Expr::bin(Mul, Expr::bin(Mul, Expr::Var(dt), Expr::Var(x)), b);
    let new_h = Expr::bin(Add, Expr::bin(Mul, decay, hn), input);
    Stmt::For {
        counter: nn,
        extent: IExpr::c(n as i64),
        body: vec![
            Stmt::ArrSet {
                arr: h,
                index: IExpr::Loop(nn),
                value: new_h,
            },
            Stmt::Set {
                var: y,
                value: Expr::bin(
                    Add,
                    Expr::Var(y),
                    Expr::bin(
                        Mul,
                        Expr::ArrLoad {
                            arr: h,
                            index: IExpr::Loop(nn),
                        },
                        c,
                    ),
                ),
            },
        ],
    }
}

/// A reduction's result from its accumulator `acc` over `count` elements (a mean divides).
/// `d` as an index expression over the runtime sizes named `syms`.
fn dim_index(syms: &[String], d: &Dim) -> IExpr {
    let mut e = IExpr::c(d.coeff() as i64);
    for s in d.syms() {
        let i = syms.iter().position(|x| x == s).unwrap_or(0);
        e = e.mul(IExpr::Size(i));
    }
    // A chunk count: ceil(e / div).
    let div = d.div() as i64;
    e.add(IExpr::c(div - 1)).div(IExpr::c(div))
}

fn reduced(rop: ReduceOp, acc: VarId, count: IExpr) -> Expr {
    match rop {
        ReduceOp::Mean => Expr::bin(BinaryOp::Div, Expr::Var(acc), Expr::FromIndex(count)),
        ReduceOp::Sum | ReduceOp::Max => Expr::Var(acc),
    }
}

/// `decay * h + u * b`: one step of a scan's state element, in the forward sweep's order of
/// operations (a recomputation must round exactly as the sweep did).
fn next_state(decay: Expr, h: Expr, u: Expr, b: Expr) -> Expr {
    use BinaryOp::{Add, Mul};
    Expr::bin(Add, Expr::bin(Mul, decay, h), Expr::bin(Mul, u, b))
}

/// The chunks of a scan gradient's checkpointed recomputation: `q` steps each over the `l`
/// steps of the sequence, the last one partial; `count = ceil(l / q)`.
struct Chunks {
    q: i64,
    l: IExpr,
    count: IExpr,
}

impl Chunks {
    /// The first step of chunk `c`.
    fn start(&self, c: &IExpr) -> IExpr {
        c.clone().mul(IExpr::c(self.q))
    }

    /// The number of steps of chunk `c`: `min(q, l - c*q)`.
    fn len(&self, c: &IExpr) -> IExpr {
        IExpr::c(self.q).min(self.l.clone().sub(self.start(c)))
    }

    /// 1 for the last chunk, else 0: the extent of a loop that runs only there.
    fn is_last(&self, c: &IExpr) -> IExpr {
        c.clone().add(IExpr::c(1)).div(self.count.clone())
    }
}

/// The chunk at position `pos` of a carry over `count` chunks: in order, or from the last
/// when `reverse`.
fn carry_chunk(count: &IExpr, pos: IExpr, reverse: bool) -> IExpr {
    if reverse {
        count.clone().sub(IExpr::c(1)).sub(pos)
    } else {
        pos
    }
}

/// [`carry`] in place: each chunk's own result is replaced by the value entering it.
fn carry_in_place(
    kb: &mut KB,
    init: Expr,
    count: (&IExpr, bool),
    slot: usize,
    at: &dyn Fn(&KB, &IExpr) -> IExpr,
    decay: &dyn Fn(&KB, &IExpr) -> Expr,
) -> (Vec<Stmt>, VarId) {
    carry(kb, init, count, (slot, slot), at, decay)
}

/// The carry of a chunked linear recurrence `v <- decay v + input` across its chunks, for one
/// element: from `init`, over `count` chunks in order (from the last when `reverse`), each
/// chunk's element `at(c)` of slot `src` holds the chunk's own result (from a zero value),
/// the value entering the chunk is stored at `at(c)` of slot `dst` (`src` itself for a carry
/// in place), and the value becomes `decay(c) * value + own`. Returns the statements and the
/// variable holding the value after the last chunk.
fn carry(
    kb: &mut KB,
    init: Expr,
    (count, reverse): (&IExpr, bool),
    (src, dst): (usize, usize),
    at: &dyn Fn(&KB, &IExpr) -> IExpr,
    decay: &dyn Fn(&KB, &IExpr) -> Expr,
) -> (Vec<Stmt>, VarId) {
    use BinaryOp::{Add, Mul};
    // The recurrence is one dependent multiply-add per chunk, and each chunk's own value
    // and decay are loads: loaded CARRY_BATCH chunks at a time, before any of them is
    // replaced, so that many loads are in flight per element, not one.
    let k = CARRY_BATCH;
    let (v, group, load, upd) = (kb.var(), kb.counter(), kb.counter(), kb.counter());
    let (own, dec) = (kb.arr(), kb.arr());
    let first = IExpr::Loop(group).mul(IExpr::c(k));
    let chunk = |p: IExpr| carry_chunk(count, p, reverse);
    // Loads past the last chunk read the last chunk again (never used).
    let lc = chunk(
        first
            .clone()
            .add(IExpr::Loop(load))
            .min(count.clone().sub(IExpr::c(1))),
    );
    let uc = chunk(first.clone().add(IExpr::Loop(upd)));
    let al = |arr: ArrId, l: LoopId| Expr::ArrLoad {
        arr,
        index: IExpr::Loop(l),
    };
    let loads = vec![
        Stmt::ArrSet {
            arr: own,
            index: IExpr::Loop(load),
            value: Expr::Load {
                buf: src,
                index: at(kb, &lc),
            },
        },
        Stmt::ArrSet {
            arr: dec,
            index: IExpr::Loop(load),
            value: decay(kb, &lc),
        },
    ];
    let updates = vec![
        Stmt::Store {
            buf: dst,
            index: at(kb, &uc),
            value: Expr::Var(v),
        },
        Stmt::Set {
            var: v,
            value: Expr::bin(
                Add,
                Expr::bin(Mul, al(dec, upd), Expr::Var(v)),
                al(own, upd),
            ),
        },
    ];
    let stmts = vec![
        Stmt::Var { var: v, init },
        Stmt::Array {
            arr: own,
            len: k as usize,
            init: 0.0,
        },
        Stmt::Array {
            arr: dec,
            len: k as usize,
            init: 0.0,
        },
        Stmt::For {
            counter: group,
            extent: count.clone().add(IExpr::c(k - 1)).div(IExpr::c(k)),
            body: vec![
                Stmt::For {
                    counter: load,
                    extent: IExpr::c(k),
                    body: loads,
                },
                Stmt::For {
                    counter: upd,
                    extent: IExpr::c(k).min(count.clone().sub(first)),
                    body: updates,
                },
            ],
        },
    ];
    (stmts, v)
}

/// 1 where the non-negative `i` is 0, else 0: the extent of a loop that runs only there
/// (the kernel IR has no branches).
fn if_zero(i: &IExpr) -> IExpr {
    IExpr::c(1).sub(i.clone().min(IExpr::c(1)))
}

/// Local arrays over one chunk's steps for recomputing a scan's states one element at a
/// time: each step's `dt`, `decay = exp(dt A)` and `u = dt x`, and the element's state
/// cotangent `g` (after the output's contribution, as the reverse sweep has it).
#[derive(Clone, Copy)]
struct ChunkArrays {
    dt: ArrId,
    decay: ArrId,
    u: ArrId,
    g: ArrId,
}

impl ChunkArrays {
    fn declare(kb: &mut KB, len: usize) -> ChunkArrays {
        let arrs = ChunkArrays {
            dt: kb.arr(),
            decay: kb.arr(),
            u: kb.arr(),
            g: kb.arr(),
        };
        for arr in [arrs.dt, arrs.decay, arrs.u, arrs.g] {
            kb.body.push(Stmt::Array {
                arr,
                len,
                init: 0.0,
            });
        }
        arrs
    }
}

/// One state element's cotangent backwards over a chunk, with the reverse sweep's
/// arithmetic: from `init`, for each step from the last, `g += C dy; arrs.g[tl] = g;
/// g *= decay[tl]`. `k` counts the steps; `tl = len - 1 - k` is the step `c` and `dy`
/// are read at.
#[allow(clippy::too_many_arguments)]
fn g_chain(
    g: VarId,
    init: Expr,
    arrs: ChunkArrays,
    k: LoopId,
    len: IExpr,
    tl: IExpr,
    c: Expr,
    dy: Expr,
) -> Vec<Stmt> {
    use BinaryOp::{Add, Mul};
    vec![
        Stmt::Var { var: g, init },
        Stmt::For {
            counter: k,
            extent: len,
            body: vec![
                Stmt::Set {
                    var: g,
                    value: Expr::bin(Add, Expr::Var(g), Expr::bin(Mul, c, dy)),
                },
                Stmt::ArrSet {
                    arr: arrs.g,
                    index: tl.clone(),
                    value: Expr::Var(g),
                },
                Stmt::Set {
                    var: g,
                    value: Expr::bin(
                        Mul,
                        Expr::Var(g),
                        Expr::ArrLoad {
                            arr: arrs.decay,
                            index: tl,
                        },
                    ),
                },
            ],
        },
    ]
}

/// The `dB`/`dC` contributions of one state element over a chunk (after [`g_chain`]): its
/// states forwards from `init`, adding to `dc[tl]` the state after the step times the
/// output's cotangent `dy`, and to `db[tl]` `u` times the state cotangent. The loops around
/// it run over what the sum is over (Mamba-1: the channels; Mamba-2: the group's heads and
/// the head dim), in the order of the sums of storing every state. With `da`, also the
/// element's `dA` over the chunk in that variable: the sum of `g decay dt` times the state
/// before each step.
#[allow(clippy::too_many_arguments)]
fn bc_accumulate(
    h: VarId,
    init: Expr,
    arrs: ChunkArrays,
    tl: LoopId,
    len: IExpr,
    b: Expr,
    dy: Expr,
    (db, dc): (ArrId, ArrId),
    da: Option<VarId>,
) -> Vec<Stmt> {
    use BinaryOp::{Add, Mul};
    let at = |arr| Expr::ArrLoad {
        arr,
        index: IExpr::Loop(tl),
    };
    let add_to = |arr, v| Stmt::ArrSet {
        arr,
        index: IExpr::Loop(tl),
        value: Expr::bin(Add, at(arr), v),
    };
    let mut out = vec![Stmt::Var { var: h, init }];
    let mut body = Vec::new();
    if let Some(da) = da {
        out.push(Stmt::Var {
            var: da,
            init: Expr::Const(0.0),
        });
        let w = Expr::bin(Mul, Expr::bin(Mul, at(arrs.g), at(arrs.decay)), at(arrs.dt));
        body.push(Stmt::Set {
            var: da,
            value: Expr::bin(Add, Expr::Var(da), Expr::bin(Mul, w, Expr::Var(h))),
        });
    }
    body.extend([
        Stmt::Set {
            var: h,
            value: next_state(at(arrs.decay), Expr::Var(h), at(arrs.u), b),
        },
        add_to(dc, Expr::bin(Mul, Expr::Var(h), dy)),
        add_to(db, Expr::bin(Mul, at(arrs.u), at(arrs.g))),
    ]);
    out.push(Stmt::For {
        counter: tl,
        extent: len,
        body,
    });
    out
}

/// Builds one kernel: its buffer list, fresh ids, and body.
struct KB<'a, 'g> {
    l: &'a mut Lowering<'g>,
    name: String,
    bufs: Vec<(BufId, bool)>,
    body: Vec<Stmt>,
    next: u32,
    /// Values taken from registers instead of memory (an epilogue reads its producer's
    /// result at the element being stored).
    overrides: HashMap<Value, Expr>,
}

impl<'a, 'g> KB<'a, 'g> {
    fn new(l: &'a mut Lowering<'g>, name: &str) -> KB<'a, 'g> {
        KB {
            l,
            name: name.to_string(),
            bufs: Vec::new(),
            body: Vec::new(),
            next: 0,
            overrides: HashMap::new(),
        }
    }

    fn fresh(&mut self) -> u32 {
        self.next += 1;
        self.next - 1
    }
    fn var(&mut self) -> VarId {
        VarId(self.fresh())
    }
    fn counter(&mut self) -> LoopId {
        LoopId(self.fresh())
    }
    fn arr(&mut self) -> ArrId {
        ArrId(self.fresh())
    }

    /// One slot per buffer: a buffer a kernel both writes and reads (a row prologue's
    /// value, re-read in the row's second pass by the same grid point) is one writable slot.
    fn buf(&mut self, b: BufId, writable: bool) -> usize {
        if let Some(i) = self.bufs.iter().position(|(x, _)| *x == b) {
            self.bufs[i].1 |= writable;
            return i;
        }
        self.bufs.push((b, writable));
        self.bufs.len() - 1
    }

    /// The value of `v` at multi-index `idx`: a load when `v` has a buffer, else its
    /// expression inlined.
    fn value(&mut self, v: Value, idx: &[IExpr]) -> Result<Expr, LowerError> {
        if let Some(e) = self.overrides.get(&v) {
            return Ok(e.clone());
        }
        if let Some(&b) = self.l.buf_of.get(&v) {
            let shape = self.l.shape(v);
            let slot = self.buf(b, false);
            let index = self.l.linear(idx, &shape);
            return Ok(Expr::Load { buf: slot, index });
        }
        self.compute(v.node, idx)
    }

    /// The i64 value of the integer `v` (token ids, targets) at `idx`: an index load from its
    /// buffer, through any views (reshape, slice, permute, broadcast) on the way.
    fn index_value(&mut self, v: Value, idx: &[IExpr]) -> Result<IExpr, LowerError> {
        if let Some(&b) = self.l.buf_of.get(&v) {
            let shape = self.l.shape(v);
            let slot = self.buf(b, false);
            let index = self.l.linear(idx, &shape);
            return Ok(IExpr::LoadIndex {
                buf: slot,
                index: Box::new(index),
            });
        }
        match self.view_source(v.node, idx) {
            Some((src, sidx)) => self.index_value(src, &sidx),
            None => Err(LowerError::Unsupported {
                node: v.node,
                op: self.l.g.op(v.node).name(),
                message: "an integer operand must be a buffer or a view of one".into(),
            }),
        }
    }

    /// For a view node `n` (reshape, slice, permute, broadcast): its operand and the operand's
    /// multi-index holding `n`'s element `idx`.
    fn view_source(&self, n: NodeId, idx: &[IExpr]) -> Option<(Value, Vec<IExpr>)> {
        let g = self.l.g;
        let ops = g.operands(n);
        let src = *ops.first()?;
        let sidx = match g.op(n) {
            Op::Broadcast { shape } => {
                let ss = self.l.shape(src);
                let off = shape.len().checked_sub(ss.len())?;
                ss.iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if d.is_one() {
                            IExpr::c(0)
                        } else {
                            idx[off + i].clone()
                        }
                    })
                    .collect()
            }
            Op::Slice { axis, start, .. } => {
                let mut sidx = idx.to_vec();
                sidx[*axis] = sidx[*axis].clone().add(IExpr::c(*start as i64));
                sidx
            }
            Op::Reshape { shape } => self.l.reshape_index(idx, shape, &self.l.shape(src)),
            Op::Permute { perm } => {
                let mut sidx = vec![IExpr::c(0); perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    sidx[p] = idx[i].clone();
                }
                sidx
            }
            _ => return None,
        };
        Some((src, sidx))
    }

    /// The expression computing node `n`'s (single) result at `idx` from its operands.
    fn compute(&mut self, n: NodeId, idx: &[IExpr]) -> Result<Expr, LowerError> {
        let g = self.l.g;
        let ops = g.operands(n);
        let op = g.op(n);
        let err = |m: &str| LowerError::Unsupported {
            node: n,
            op: op.name(),
            message: m.into(),
        };
        Ok(match op {
            Op::Const { value, .. } => Expr::Const(*value),
            Op::Unary(u) => Expr::un(*u, self.value(ops[0], idx)?),
            Op::Binary(b) => Expr::bin(*b, self.value(ops[0], idx)?, self.value(ops[1], idx)?),
            // Compute is f32; a cast between float types changes nothing here.
            Op::Cast { .. } => self.value(ops[0], idx)?,
            Op::Broadcast { .. } | Op::Slice { .. } | Op::Reshape { .. } | Op::Permute { .. } => {
                let (src, sidx) = self
                    .view_source(n, idx)
                    .ok_or_else(|| err("malformed view (internal error)"))?;
                self.value(src, &sidx)?
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Reduce { .. }
            | Op::MatMul { .. }
            | Op::Concat { .. }
            | Op::Gather
            | Op::CausalConv1d
            | Op::SelectiveScan
            | Op::SsdScan { .. }
            | Op::CausalConv1dGrad
            | Op::SelectiveScanGrad
            | Op::SsdScanGrad { .. }
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyGrad { .. } => {
                return Err(err("this op has a buffer; it is never inlined"));
            }
        })
    }

    /// Stores for the producer result `r` (held in `var`) at its multi-index `idx`: `r`
    /// itself unless only epilogues read it, and every epilogue of `r`'s node at the same
    /// element. Epilogues read their operands at `idx` mapped into their shape
    /// ([`Lowering::reshape_index`]), not at coordinates divided back out of the linear
    /// index (divisions by runtime sizes are slow on the GPU).
    fn store_with_epilogues(
        &mut self,
        r: Value,
        buf: BufId,
        idx: &[IExpr],
        var: VarId,
    ) -> Result<Vec<Stmt>, LowerError> {
        let rshape = self.l.shape(r);
        let at = self.l.linear(idx, &rshape);
        let mut stmts = Vec::new();
        if !self.l.unstored.contains(&r) {
            let slot = self.buf(buf, true);
            stmts.push(Stmt::Store {
                buf: slot,
                index: at.clone(),
                value: Expr::Var(var),
            });
        }
        let eps = self.l.epilogues.get(&r.node).cloned().unwrap_or_default();
        for e in eps {
            let ev = Value::new(e, 0);
            let buf = match self.l.buf_of.get(&ev) {
                Some(&b) => b,
                None => self.l.new_buf(ev, BufKind::Temp),
            };
            let eslot = self.buf(buf, true);
            let eshape = self.l.shape(ev);
            let eidx = self.l.reshape_index(idx, &rshape, &eshape);
            self.overrides.insert(r, Expr::Var(var));
            let value = self.compute(e, &eidx);
            self.overrides.remove(&r);
            stmts.push(Stmt::Store {
                buf: eslot,
                index: at.clone(),
                value: value?,
            });
        }
        Ok(stmts)
    }

    fn finish(self, grid: Vec<IExpr>, node: NodeId) {
        let bufs: Vec<KBuf> = self
            .bufs
            .iter()
            .map(|(b, w)| {
                let info = &self.l.out.buffers[*b];
                KBuf {
                    name: format!("buf{b}"),
                    dtype: info.dtype,
                    writable: *w,
                }
            })
            .collect();
        let kernel = Kernel {
            name: self.name,
            bufs,
            sizes: self.l.syms.clone(),
            grid,
            body: self.body,
        };
        self.l.out.kernels.push(kernel);
        let k = self.l.out.kernels.len() - 1;
        let ids = self.bufs.iter().map(|(b, _)| *b).collect();
        self.l.out.steps.push(Step::Kernel {
            kernel: k,
            bufs: ids,
            node,
        });
    }
}
