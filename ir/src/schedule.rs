//! The executable form of a graph: kernels, matrix products and buffers in launch order,
//! and the memory plan that places intermediates in one arena. `passes` produces them; the
//! runtimes execute them; an artifact stores them.

use crate::graph::{NodeId, Value};
use crate::kernel::Kernel;
use crate::types::{DType, Dim, Shape};

/// Index of a buffer in [`Lowered::buffers`].
pub type BufId = usize;

/// Where a buffer's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// A data input (token ids), by graph input name.
    Input(String),
    /// An initial state, by graph input name (zeros unless the caller carries one in).
    State(String),
    /// A parameter, by checkpoint name.
    Param(String),
    /// An intermediate value: lives in the arena, placed by the memory planner.
    Temp,
    /// Working memory of one op's kernels (a scan gradient's state checkpoints, one chunk of
    /// recomputed states per grid point): in the arena like `Temp`, alive only across the
    /// steps of the op that uses it, never read by another op. Its `BufInfo::shape` is its own
    /// (not the type of `BufInfo::value`, which names the op's first result for errors and
    /// profiles) and may count chunks (`ceil(L/64)`); no element is defined before its kernel
    /// writes it.
    Scratch,
}

impl BufKind {
    /// Whether the memory planner places the buffer in the arena.
    pub fn in_arena(&self) -> bool {
        matches!(self, BufKind::Temp | BufKind::Scratch)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufInfo {
    pub kind: BufKind,
    pub dtype: DType,
    pub shape: Shape,
    /// The node result that produced it (for errors and profiles).
    pub value: Value,
}

/// A product of dimensions: a matrix product's batch count (`B·ceil(L/Q)·G`, the chunks of
/// every sequence, is a product of dimensions but no single [`Dim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product(pub Vec<Dim>);

impl Product {
    pub fn of(d: Dim) -> Product {
        Product(vec![d])
    }

    /// The value with every symbol bound by `bind`; `None` if one is unbound or on overflow.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        self.0
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(d.eval(bind)?))
    }
}

impl std::fmt::Display for Product {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|d| !d.is_one())
            .map(|d| d.to_string())
            .collect();
        if parts.is_empty() {
            write!(f, "1")
        } else {
            write!(f, "{}", parts.join("*"))
        }
    }
}

/// One step of the schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Launch `kernels[kernel]` with these buffers (in the kernel's order) and the graph's
    /// symbol values as its sizes.
    Kernel {
        kernel: usize,
        bufs: Vec<BufId>,
        node: NodeId,
    },
    /// `out[b] = lhs[b](^T) @ rhs(^T)` for `batch` row-major matrices: lhs `[M, K]` (or
    /// `[K, M]` when `lhs_t`), rhs `[K, N]` (or `[N, K]` when `rhs_t`), shared by every batch
    /// unless `rhs_batched`.
    MatMul {
        lhs: BufId,
        rhs: BufId,
        out: BufId,
        batch: Product,
        m: Dim,
        k: Dim,
        n: Dim,
        lhs_t: bool,
        rhs_t: bool,
        rhs_batched: bool,
        /// Full f32 even where the runtime may round products' inputs (TF32): the result
        /// feeds a sum that cancels (a gradient's difference of row and column sums).
        exact: bool,
        node: NodeId,
    },
}

impl Step {
    /// Buffers read and written by the step.
    pub fn buffers(&self, kernels: &[Kernel]) -> (Vec<BufId>, Vec<BufId>) {
        match self {
            Step::Kernel { kernel, bufs, .. } => {
                let mut r = Vec::new();
                let mut w = Vec::new();
                for (i, b) in bufs.iter().enumerate() {
                    if kernels[*kernel].bufs[i].writable {
                        w.push(*b);
                    } else {
                        r.push(*b);
                    }
                }
                (r, w)
            }
            Step::MatMul { lhs, rhs, out, .. } => (vec![*lhs, *rhs], vec![*out]),
        }
    }
}

/// A graph lowered to kernels and a schedule (steps in a topological order).
#[derive(Clone, Debug)]
pub struct Lowered {
    pub kernels: Vec<Kernel>,
    pub steps: Vec<Step>,
    pub buffers: Vec<BufInfo>,
    /// Symbol names; kernels take their values as sizes in this order.
    pub syms: Vec<String>,
    /// Graph outputs: name and buffer.
    pub outputs: Vec<(String, BufId)>,
}

/// Where every intermediate buffer lives in the arena, for one binding of the symbols.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Arena offset of each buffer; `None` for inputs, states and parameters.
    pub offsets: Vec<Option<u64>>,
    /// Bytes of each buffer at the planned sizes.
    pub bytes: Vec<u64>,
    /// Step interval during which each buffer is alive (`None` if unused).
    pub lifetimes: Vec<Option<(usize, usize)>>,
    /// Arena size: the peak of simultaneously live intermediates.
    pub peak: u64,
}
