//! Floating-point operation counts of graph nodes, for pricing recomputation.
//!
//! Counts are what our kernels execute, per element: a matrix product `2 M N K`; elementwise
//! ops and reductions one per element (a transcendental counts as one); layout ops, gathers
//! and inputs nothing. The sequential scans do a fixed number of operations per state element
//! and time step (selective scan: `exp(dt A)`, `dt B x`, the update and the `C h` dot: 8; SSD:
//! the decay is per head, so 5), their gradients twice that plus one more forward sweep (the
//! states are recomputed chunk by chunk); the causal convolution `2 K` per output element and
//! three times that for its gradient; the cross-entropy 4 per logit and its gradient 3.
//!
//! Not yet updated for the chunk-parallel scans (`lower::selective_scan`, `lower::ssd_scan`):
//! they scan every chunk twice (from a zero state, then from its start state), about 14
//! operations per state element and step for the selective scan and 8 for SSD, where the
//! counts here are the sequential recurrence's.

use ir::types::numel;
use ir::{Graph, NodeId, Op};

/// Operations node `n` performs with the symbols bound by `bind` (0 when a size is unbound).
pub fn flops(g: &Graph, n: NodeId, bind: &dyn Fn(&str) -> Option<u64>) -> f64 {
    let size = |shape: &[ir::Dim]| -> f64 {
        numel(shape)
            .and_then(|d| d.eval(bind))
            .map_or(0.0, |v| v as f64)
    };
    let result = || g.types(n).first().map_or(0.0, |t| size(&t.shape));
    let operand = |slot: usize| -> Option<ir::TensorType> {
        g.operands(n)
            .get(slot)
            .and_then(|v| g.value_type(*v))
            .cloned()
    };
    let dim = |slot: usize, axis: usize| -> f64 {
        operand(slot)
            .and_then(|t| t.shape.get(axis).and_then(|d| d.eval(bind)))
            .map_or(0.0, |v| v as f64)
    };
    // Time steps of a stateful op: axis 1 of its first operand `[B, L, ...]`.
    let steps = || dim(0, 1);
    let state_elems = |slot: usize| operand(slot).map_or(0.0, |t| size(&t.shape));
    match g.op(n) {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Broadcast { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::Gather => 0.0,
        Op::Unary(_) | Op::Binary(_) | Op::Cast { .. } => result(),
        Op::Reduce { .. } => operand(0).map_or(0.0, |t| size(&t.shape)),
        Op::MatMul { rhs_t } => {
            let k = match operand(1) {
                Some(t) if t.rank() >= 2 => {
                    let axis = if *rhs_t { t.rank() - 1 } else { t.rank() - 2 };
                    t.shape[axis].eval(bind).map_or(0.0, |v| v as f64)
                }
                _ => 0.0,
            };
            2.0 * result() * k
        }
        Op::CausalConv1d => 2.0 * result() * dim(1, 1),
        Op::CausalConv1dGrad => {
            6.0 * size(&operand(0).map(|t| t.shape).unwrap_or_default()) * dim(1, 1)
        }
        Op::SelectiveScan => 8.0 * state_elems(5) * steps(),
        Op::SelectiveScanGrad => 24.0 * state_elems(5) * steps(),
        Op::SsdScan { .. } => 5.0 * state_elems(5) * steps(),
        Op::SsdScanGrad { .. } => 15.0 * state_elems(5) * steps(),
        Op::CrossEntropy { .. } => 4.0 * operand(0).map_or(0.0, |t| size(&t.shape)),
        Op::CrossEntropyGrad { .. } => 3.0 * operand(0).map_or(0.0, |t| size(&t.shape)),
    }
}

/// Operations of the nodes `ids` of `g`.
pub fn total(
    g: &Graph,
    ids: impl Iterator<Item = NodeId>,
    bind: &dyn Fn(&str) -> Option<u64>,
) -> f64 {
    ids.map(|n| flops(g, n, bind)).sum()
}
