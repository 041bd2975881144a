//! The primitive operations: the one place where every op of the IR is declared.
//!
//! The set is small and closed. Matches on [`Op`] are exhaustive everywhere (no `_ =>`), so a
//! new op fails to compile until shape inference, the verifier, the text form and every later
//! pass handle it. ARCHITECTURE.md gives the reason each primitive exists.
//!
//! Operand and result conventions (shapes outermost first):
//! - `CausalConv1d(x [B,L,C], w [C,K], b [C], s0 [B,C,K-1]) -> (y [B,L,C], s1 [B,C,K-1])`
//! - `SelectiveScan(x [B,L,E], dt [B,L,E], A [E,N], Bm [B,L,N], Cm [B,L,N], h0 [B,E,N])
//!   -> (y [B,L,E], h1 [B,E,N])` with `h_t = exp(dt_t*A) h_{t-1} + dt_t x_t Bm_t`, `y_t = h_t Cm_t`
//! - `SsdScan(x [B,L,H,P], dt [B,L,H], A [H], Bm [B,L,G,N], Cm [B,L,G,N], s0 [B,H,P,N])
//!   -> (y [B,L,H,P], s1 [B,H,P,N])`, the same recurrence with one scalar `A` per head and
//!   `B`/`C` shared by the heads of a group; `chunk` only chooses the algorithm.
//!
//! The stateful ops take their initial state as an operand and return the final state, so
//! any stack of layers can run over a time segment with carried states.
//!
//! The backward ops (for training) are vector-Jacobian products of a forward op: their
//! operands are the forward operands followed by the cotangents of the forward results, and
//! their results are the cotangents of the forward operands, in operand order:
//! - `CausalConv1dGrad(x, w, b, s0, dy, ds1) -> (dx, dw, db, ds0)`
//! - `SelectiveScanGrad(x, dt, A, Bm, Cm, h0, dy, dh1) -> (dx, ddt, dA, dBm, dCm, dh0)`
//! - `SsdScanGrad(x, dt, A, Bm, Cm, s0, dy, ds1) -> (dx, ddt, dA, dBm, dCm, ds0)`
//!
//! The loss:
//! - `CrossEntropy(logits [..., V], targets [...] int) -> (loss [...], valid [...])`: per
//!   position `logsumexp(logits) - logits[target]`, and `valid = 1`; both 0 where
//!   `target == ignore_index`. Results have the dtype of `logits`.
//! - `CrossEntropyGrad(logits [..., V], targets [...], dloss [...]) -> dlogits [..., V]`:
//!   `(softmax(logits) - onehot(target)) * dloss`, rows of 0 where ignored (`valid` has no
//!   gradient).

use crate::types::{DType, Shape, TensorType};

/// Elementwise functions of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    /// `log(1 + exp(x))`, a primitive for its numerically stable form and derivative.
    Softplus,
    /// `x * sigmoid(x)`.
    Silu,
    Sigmoid,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 9] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Softplus,
        UnaryOp::Silu,
        UnaryOp::Sigmoid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Silu => "silu",
            UnaryOp::Sigmoid => "sigmoid",
        }
    }
}

/// Elementwise functions of two tensors of the same type (broadcasts are explicit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 6] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
}

/// Reductions over a set of axes; reduced axes are kept with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

/// How a parameter is initialised when training from scratch (REFERENCE.md sections 1-2).
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with mean 0.
    Normal {
        std: f64,
    },
    Uniform {
        lo: f64,
        hi: f64,
    },
    /// `log(1..=N)` along the last axis, the same for every row (Mamba-1 `A_log`).
    ALogArange,
    /// `log(u)`, `u ~ U(lo, hi)` (Mamba-2 `A_log`, `A_init_range`).
    ALogUniform {
        lo: f64,
        hi: f64,
    },
    /// `softplus^-1(dt)`, `dt` log-uniform in `[min, max]`, floored at `floor` (dt bias).
    DtBias {
        min: f64,
        max: f64,
        floor: f64,
    },
}

impl Init {
    pub fn name(&self) -> &'static str {
        match self {
            Init::Zeros => "zeros",
            Init::Ones => "ones",
            Init::Normal { .. } => "normal",
            Init::Uniform { .. } => "uniform",
            Init::ALogArange => "a_log_arange",
            Init::ALogUniform { .. } => "a_log_uniform",
            Init::DtBias { .. } => "dt_bias",
        }
    }

    /// The numeric arguments, in the order the text form and the DSL write them.
    pub fn args(&self) -> Vec<f64> {
        match *self {
            Init::Zeros | Init::Ones | Init::ALogArange => vec![],
            Init::Normal { std } => vec![std],
            Init::Uniform { lo, hi } | Init::ALogUniform { lo, hi } => vec![lo, hi],
            Init::DtBias { min, max, floor } => vec![min, max, floor],
        }
    }

    /// Builds an initializer from its name and arguments; `None` if either is wrong.
    pub fn from_parts(name: &str, args: &[f64]) -> Option<Init> {
        Some(match (name, args) {
            ("zeros", []) => Init::Zeros,
            ("ones", []) => Init::Ones,
            ("normal", [std]) => Init::Normal { std: *std },
            ("uniform", [lo, hi]) => Init::Uniform { lo: *lo, hi: *hi },
            ("a_log_arange", []) => Init::ALogArange,
            ("a_log_uniform", [lo, hi]) => Init::ALogUniform { lo: *lo, hi: *hi },
            ("dt_bias", [min, max, floor]) => Init::DtBias {
                min: *min,
                max: *max,
                floor: *floor,
            },
            _ => return None,
        })
    }

    /// Expected argument count of the initializer called `name`.
    pub fn arity(name: &str) -> Option<usize> {
        Some(match name {
            "zeros" | "ones" | "a_log_arange" => 0,
            "normal" => 1,
            "uniform" | "a_log_uniform" => 2,
            "dt_bias" => 3,
            _ => return None,
        })
    }

    pub const NAMES: [&'static str; 7] = [
        "zeros",
        "ones",
        "normal",
        "uniform",
        "a_log_arange",
        "a_log_uniform",
        "dt_bias",
    ];
}

/// Where a graph input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Data fed per call (token ids).
    Data,
    /// The initial value of a recurrent state; zeros unless the caller carries one in.
    State,
}

/// A primitive operation. Attributes live in the variant; operands are graph edges.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input (data or initial state) of the given type.
    Input {
        name: String,
        kind: InputKind,
        ty: TensorType,
    },
    /// A trainable parameter, named as in the reference checkpoints.
    Param {
        name: String,
        ty: TensorType,
        init: Init,
    },
    /// A scalar constant (rank 0).
    Const {
        value: f64,
        dtype: DType,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Cast {
        to: DType,
    },
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
    },
    /// Batched `lhs [..., M, K] @ rhs`, rhs `[K, N]` (or `[N, K]` when `rhs_t`), either 2-D and
    /// shared over the batch axes or with the same batch axes as `lhs`.
    MatMul {
        rhs_t: bool,
    },
    /// Same elements, new shape (equal element counts).
    Reshape {
        shape: Shape,
    },
    /// Axes reordered: result axis `i` is operand axis `perm[i]`.
    Permute {
        perm: Vec<usize>,
    },
    /// Right-aligned broadcast to `shape` (operand dims equal or 1).
    Broadcast {
        shape: Shape,
    },
    /// `len` elements from `start` along `axis`.
    Slice {
        axis: usize,
        start: u64,
        len: u64,
    },
    /// Operands joined along `axis` (variadic).
    Concat {
        axis: usize,
    },
    /// Rows of `table [V, D]` picked by integer `ids [...]`: `[..., D]` (embeddings).
    Gather,
    CausalConv1d,
    SelectiveScan,
    SsdScan {
        chunk: u64,
    },
    /// The VJP of [`Op::CausalConv1d`] w.r.t. all four operands (module doc).
    CausalConv1dGrad,
    /// The VJP of [`Op::SelectiveScan`] w.r.t. all six operands (module doc).
    SelectiveScanGrad,
    /// The VJP of [`Op::SsdScan`] w.r.t. all six operands; `chunk` as in the forward op.
    SsdScanGrad {
        chunk: u64,
    },
    /// Per-position softmax cross-entropy over the last axis, and the valid-position mask.
    CrossEntropy {
        ignore_index: i64,
    },
    /// The VJP of [`Op::CrossEntropy`]'s loss w.r.t. the logits.
    CrossEntropyGrad {
        ignore_index: i64,
    },
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input {
                kind: InputKind::Data,
                ..
            } => "input",
            Op::Input {
                kind: InputKind::State,
                ..
            } => "state",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Mean => "reduce_mean",
                ReduceOp::Max => "reduce_max",
            },
            Op::MatMul { .. } => "matmul",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Broadcast { .. } => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather => "gather",
            Op::CausalConv1d => "causal_conv1d",
            Op::SelectiveScan => "selective_scan",
            Op::SsdScan { .. } => "ssd_scan",
            Op::CausalConv1dGrad => "causal_conv1d_grad",
            Op::SelectiveScanGrad => "selective_scan_grad",
            Op::SsdScanGrad { .. } => "ssd_scan_grad",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
        }
    }

    /// Number of operands, `None` for variadic ops (at least one operand).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => 0,
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. } => 1,
            Op::Binary(_) | Op::MatMul { .. } | Op::Gather | Op::CrossEntropy { .. } => 2,
            Op::CrossEntropyGrad { .. } => 3,
            Op::Concat { .. } => return None,
            Op::CausalConv1d => 4,
            Op::SelectiveScan | Op::SsdScan { .. } | Op::CausalConv1dGrad => 6,
            Op::SelectiveScanGrad | Op::SsdScanGrad { .. } => 8,
        })
    }

    /// Number of results: 2 for the stateful ops (output, final state) and the loss (loss,
    /// valid), one per forward operand for the backward ops, else 1.
    pub fn num_results(&self) -> usize {
        match self {
            Op::CausalConv1d | Op::SelectiveScan | Op::SsdScan { .. } | Op::CrossEntropy { .. } => {
                2
            }
            Op::CausalConv1dGrad => 4,
            Op::SelectiveScanGrad | Op::SsdScanGrad { .. } => 6,
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Const { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::MatMul { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Gather
            | Op::CrossEntropyGrad { .. } => 1,
        }
    }

    /// Names of the operands, for diagnostics and the text form's documentation.
    pub fn operand_names(&self) -> &'static [&'static str] {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => &[],
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. } => &["x"],
            Op::Binary(_) | Op::MatMul { .. } => &["lhs", "rhs"],
            Op::Gather => &["table", "ids"],
            Op::CausalConv1d => &["x", "weight", "bias", "state"],
            Op::SelectiveScan | Op::SsdScan { .. } => &["x", "dt", "A", "B", "C", "state"],
            Op::CausalConv1dGrad => &["x", "weight", "bias", "state", "dy", "dstate"],
            Op::SelectiveScanGrad | Op::SsdScanGrad { .. } => {
                &["x", "dt", "A", "B", "C", "state", "dy", "dstate"]
            }
            Op::CrossEntropy { .. } => &["logits", "targets"],
            Op::CrossEntropyGrad { .. } => &["logits", "targets", "dloss"],
        }
    }

    /// True for the forward ops that carry a recurrent state through time (their backward
    /// ops take and return state cotangents but carry nothing forward).
    pub fn is_stateful(&self) -> bool {
        match self {
            Op::CausalConv1d | Op::SelectiveScan | Op::SsdScan { .. } => true,
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Const { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::MatMul { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Gather
            | Op::CausalConv1dGrad
            | Op::SelectiveScanGrad
            | Op::SsdScanGrad { .. }
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyGrad { .. } => false,
        }
    }
}
