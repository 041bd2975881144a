//! bf16 activations ([`super::LowerOptions::bf16_activations`]): after lowering, the values
//! stored between steps become bf16 where training in mixed precision keeps them so, and every
//! matrix product reads bf16 operands (f32 accumulation).
//!
//! - **Stay f32:** parameters (the master weights), recurrent states (inputs, final states,
//!   their cotangents and gradients), parameter gradients, the loss, values that do not grow
//!   with the sequence (sums over tokens) ([`keeps_f32`]), scratch
//!   that kernels read (scan carries, the SSD's own chunk states that its carries sum), and
//!   the operands and results of `exact` products (the running sums that are the exponents
//!   of every decay), whatever else holds.
//! - **Become bf16:** every other float intermediate and activation input (boundary values,
//!   saved values and their cotangents between checkpointed stages), scratch that only
//!   matrix products read (the SSD's chunk copies and masked decay matrices), and scratch
//!   that the lowering marks as bf16 already or read at bf16 precision
//!   ([`super::Lowering::bf16_scratch`]: the SSD's chunk copies of `x` and `dy`, the states
//!   and state cotangents its carries write apart from the own ones, and the results
//!   `C S_inᵀ`, `M'ᵀ dY` and `B dS_outᵀ`, each rounded into a bf16 value or summed).
//! - Kernels compute in f32 as before: loads widen, stores round to nearest even.
//! - A product whose operand is not in its dtype (an f32 parameter or state into a bf16
//!   product, a bf16 activation into an `exact` one) reads a converted copy, made by a
//!   conversion kernel just before it. The copy serves later products until its source is
//!   written again; a weight's is made at each use (2 bytes per parameter while its product
//!   runs, not for the whole step). Where the kernel that last wrote the source can, it
//!   stores the copy as it stores the source ([`fused_copy`]): a write instead of a
//!   conversion's read and write (the SSD's chunk copies where an exact product keeps them
//!   f32).

use super::{BufId, BufInfo, BufKind, Lowered, Step, dim_index};
use ir::kernel::{Expr, IExpr, KBuf, Kernel, Stmt};
use ir::{DType, Graph, InputKind, Op};
use std::collections::HashMap;

/// Input and output names that hold f32 whatever the activation dtype: `loss`, every state
/// `S` (final state), `cotangent.S`, and every gradient output `grad.X` but those of
/// activation inputs (a parameter's gradient is f32 even where the graph no longer reads
/// the parameter: a stage that saved `dt + dt_bias` needs no `dt_bias`).
pub fn f32_names(graph: &Graph) -> Vec<String> {
    let mut v = vec!["loss".to_string()];
    let mut activations = Vec::new();
    for n in graph.nodes() {
        match graph.op(n) {
            Op::Input {
                name,
                kind: InputKind::State,
                ..
            } => {
                v.push(name.clone());
                v.push(format!("cotangent.{name}"));
                v.push(format!("grad.{name}"));
            }
            Op::Input { name, .. } => activations.push(name.as_str()),
            Op::Param { name, .. } => v.push(format!("grad.{name}")),
            _ => {}
        }
    }
    for (name, _) in graph.outputs() {
        if let Some(x) = name.strip_prefix("grad.")
            && !activations.contains(&x)
            && !v.contains(name)
        {
            v.push(name.clone());
        }
    }
    v
}

/// Whether buffer `buf` of `l` (lowered from `graph`) stays f32 when activations are stored
/// in a narrower dtype, by what it holds: parameters, states, scratch, the inputs and outputs
/// `f32_names` names ([`f32_names`]), the final states of the stateful ops, and values whose
/// size does not depend on the sequence length `L`.
pub fn keeps_f32(l: &Lowered, graph: &Graph, buf: BufId, f32_names: &[String]) -> bool {
    let b = &l.buffers[buf];
    match &b.kind {
        BufKind::Scratch | BufKind::State(_) | BufKind::Param(_) => true,
        BufKind::Input(name) => f32_names.contains(name),
        // What does not grow with the sequence (sums over tokens: the loss's, parameter
        // gradients') costs nothing to keep exact.
        BufKind::Temp if !b.shape.iter().any(|d| d.syms().iter().any(|s| s == "L")) => true,
        BufKind::Temp => {
            let named = l
                .outputs
                .iter()
                .any(|(n, id)| *id == buf && f32_names.contains(n));
            // Final states of the stateful ops (result 1).
            let state_result = graph.contains(b.value.node)
                && matches!(
                    graph.op(b.value.node),
                    Op::CausalConv1d | Op::SelectiveScan | Op::SsdScan { .. }
                )
                && b.value.result == 1;
            named || state_result
        }
    }
}

/// Stores `l`'s activations as bf16 (the module doc says which).
/// `marked`: scratch that the lowering marked as fit for bf16
/// ([`super::Lowering::bf16_scratch`]).
pub(super) fn store_bf16(l: &mut Lowered, graph: &Graph, marked: &[BufId]) {
    let n = l.buffers.len();
    // What the steps do with each buffer.
    let mut product_in = vec![false; n];
    let mut product_out = vec![false; n];
    let mut exact = vec![false; n];
    let mut kernel_reads = vec![false; n];
    for step in &l.steps {
        match step {
            Step::MatMul {
                lhs,
                rhs,
                out,
                exact: e,
                ..
            } => {
                for b in [*lhs, *rhs] {
                    product_in[b] = true;
                    exact[b] |= *e;
                }
                product_out[*out] = true;
                exact[*out] |= *e;
            }
            Step::Kernel { kernel, bufs, .. } => {
                for (slot, read) in l.kernels[*kernel].loaded().into_iter().enumerate() {
                    if read && let Some(&b) = bufs.get(slot) {
                        kernel_reads[b] = true;
                    }
                }
            }
        }
    }
    let names = f32_names(graph);
    let mut is_marked = vec![false; n];
    for &b in marked {
        is_marked[b] = true;
    }
    for b in 0..n {
        if l.buffers[b].dtype != DType::F32 || exact[b] {
            continue;
        }
        let narrow = match &l.buffers[b].kind {
            // Read only by products, or marked by the lowering.
            BufKind::Scratch => {
                (product_in[b] && !product_out[b] && !kernel_reads[b]) || is_marked[b]
            }
            BufKind::Temp | BufKind::Input(_) => !keeps_f32(l, graph, b, &names),
            BufKind::State(_) | BufKind::Param(_) => false,
        };
        if narrow {
            l.buffers[b].dtype = DType::BF16;
        }
    }
    // Kernels take their buffers' dtypes (one kernel per step; a shared one is copied).
    let mut typed = vec![false; l.kernels.len()];
    for step in &mut l.steps {
        let Step::Kernel { kernel, bufs, .. } = step else {
            continue;
        };
        let want: Vec<DType> = bufs.iter().map(|&b| l.buffers[b].dtype).collect();
        let have: Vec<DType> = l.kernels[*kernel].bufs.iter().map(|k| k.dtype).collect();
        if typed[*kernel] && have != want {
            let copy = l.kernels[*kernel].clone();
            l.kernels.push(copy);
            typed.push(false);
            *kernel = l.kernels.len() - 1;
        }
        typed[*kernel] = true;
        for (k, d) in l.kernels[*kernel].bufs.iter_mut().zip(want) {
            k.dtype = d;
        }
    }
    // Products read operands in their dtype: bf16, or f32 when exact. A copy serves every
    // product until its source is written again (an SSD chunk copy feeds two products),
    // except a parameter's, made at each use so that no bf16 weight outlives its product.
    let steps = std::mem::take(&mut l.steps);
    let mut copies: HashMap<BufId, BufId> = HashMap::new();
    for mut step in steps {
        if let Step::MatMul {
            lhs,
            rhs,
            exact,
            node,
            ..
        } = &mut step
        {
            let want = if *exact { DType::F32 } else { DType::BF16 };
            for operand in [lhs, rhs] {
                let src = *operand;
                if l.buffers[src].dtype == want {
                    continue;
                }
                *operand = match copies.get(&src) {
                    Some(&c) if l.buffers[c].dtype == want => c,
                    _ => {
                        let param = matches!(l.buffers[src].kind, BufKind::Param(_));
                        let fused = if param {
                            None
                        } else {
                            fused_copy(l, src, want)
                        };
                        let c = fused.unwrap_or_else(|| converted(l, src, want, *node));
                        if !matches!(l.buffers[src].kind, BufKind::Param(_)) {
                            copies.insert(src, c);
                        }
                        c
                    }
                };
            }
        }
        let (_, written) = step.buffers(&l.kernels);
        copies.retain(|src, _| !written.contains(src));
        l.steps.push(step);
    }
}

/// A copy of buffer `src` in `to`, stored by the kernel of the last step that wrote `src`
/// (already in `l.steps`) beside each store to `src`: where that step is a kernel no other
/// step runs, and no stored value reads `src` (so the second store sees what the first
/// stored). `None` where it cannot.
fn fused_copy(l: &mut Lowered, src: BufId, to: DType) -> Option<BufId> {
    let at = l
        .steps
        .iter()
        .rposition(|s| s.buffers(&l.kernels).1.contains(&src))?;
    let Step::Kernel { kernel, bufs, .. } = &l.steps[at] else {
        return None;
    };
    let (kernel, slot) = (*kernel, bufs.iter().position(|&b| b == src)?);
    let runs = l
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Kernel { kernel: k, .. } if *k == kernel))
        .count();
    if runs != 1 {
        return None;
    }
    let k = &l.kernels[kernel];
    let copy_slot = k.bufs.len();
    let body = with_copies(&k.body, slot, copy_slot)?;
    let dst = copy_buffer(l, src, to);
    let k = &mut l.kernels[kernel];
    k.body = body;
    k.bufs.push(KBuf {
        name: format!("buf{dst}"),
        dtype: to,
        writable: true,
    });
    if let Step::Kernel { bufs, .. } = &mut l.steps[at] {
        bufs.push(dst);
    }
    Some(dst)
}

/// `body` with every store to buffer slot `from` followed by the same store to slot `to`;
/// `None` where a stored value reads slot `from`.
fn with_copies(body: &[Stmt], from: usize, to: usize) -> Option<Vec<Stmt>> {
    let mut out = Vec::with_capacity(body.len());
    for s in body {
        match s {
            Stmt::Store { buf, index, value } if *buf == from => {
                if reads(value, from) {
                    return None;
                }
                out.push(s.clone());
                out.push(Stmt::Store {
                    buf: to,
                    index: index.clone(),
                    value: value.clone(),
                });
            }
            Stmt::For {
                counter,
                extent,
                body,
            } => out.push(Stmt::For {
                counter: *counter,
                extent: extent.clone(),
                body: with_copies(body, from, to)?,
            }),
            Stmt::Each {
                counters,
                extents,
                body,
            } => out.push(Stmt::Each {
                counters: counters.clone(),
                extents: extents.clone(),
                body: with_copies(body, from, to)?,
            }),
            _ => out.push(s.clone()),
        }
    }
    Some(out)
}

/// Whether `e` loads from buffer slot `buf`.
fn reads(e: &Expr, buf: usize) -> bool {
    let mut found = false;
    e.walk(&mut |x| found |= matches!(x, Expr::Load { buf: b, .. } if *b == buf));
    found
}

/// A new buffer like `src` (shape, value) in dtype `to`, for a copy of it.
fn copy_buffer(l: &mut Lowered, src: BufId, to: DType) -> BufId {
    let info = &l.buffers[src];
    let copy = BufInfo {
        kind: BufKind::Temp,
        dtype: to,
        shape: info.shape.clone(),
        value: info.value,
    };
    l.buffers.push(copy);
    l.buffers.len() - 1
}

/// A copy of buffer `src` in `to`, written by a conversion kernel appended to the steps.
fn converted(l: &mut Lowered, src: BufId, to: DType, node: ir::NodeId) -> BufId {
    let info = &l.buffers[src];
    let from = info.dtype;
    let numel = info
        .shape
        .iter()
        .fold(IExpr::c(1), |acc, d| acc.mul(dim_index(&l.syms, d)));
    let dst = copy_buffer(l, src, to);
    // The runtime's conversion kernel, over the buffer's elements at the schedule's sizes.
    let mut k = Kernel::convert(&format!("to_{}", to.name()), from, to);
    k.sizes = l.syms.clone();
    k.grid = vec![numel];
    l.kernels.push(k);
    l.steps.push(Step::Kernel {
        kernel: l.kernels.len() - 1,
        bufs: vec![src, dst],
        node,
    });
    dst
}
