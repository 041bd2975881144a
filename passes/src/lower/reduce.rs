//! Reductions of many elements into few outputs (a parameter's gradient summed over batch
//! and time: `[B, L, C] -> [1, 1, C]`, or `[B, L, H, P] -> [1, 1, H, 1]`) in two passes,
//! parallel over the reduced elements.
//!
//! The general form (one grid point per output walking its reduced elements; on the GPU a
//! block whose lanes share that walk) suits many outputs of short rows, such as a norm's
//! mean over the last axis. With few outputs it leaves most of a GPU idle (mamba2's `dD` is
//! 24 outputs of `B·L·64` elements each), and where the last axis is kept an output's
//! elements are a column, `K` apart, so lanes read scattered words. Instead:
//!
//! 1. one point per (chunk of [`REDUCE_ROWS`] reduced elements, output) sums its chunk in
//!    order into scratch `[ceil(R/64), K]`; neighbouring points are neighbouring outputs,
//!    so each step reads a contiguous run of memory;
//! 2. one point per output adds the chunks (and divides a mean by `R`): in order on the
//!    CPU; on the GPU a block's lanes share that walk and combine their sums in a tree.
//!
//! Either way a device sums in one fixed order, run after run.

use super::{KB, LowerError, Lowering, reduced};
use ir::kernel::{Expr, IExpr, Stmt};
use ir::schedule::BufKind;
use ir::types::numel;
use ir::{BinaryOp, Dim, NodeId, Op, ReduceOp, Value};

/// Reduced elements per grid point of the first pass.
pub const REDUCE_ROWS: u64 = 64;

/// Outputs below which a reduction runs in two passes whatever its layout: a GPU holds
/// thousands of blocks at once, so fewer outputs than that leave it idle in the general form.
pub const FEW_OUTPUTS: u64 = 4096;

impl Lowering<'_> {
    /// The number of reduced elements `R` when `Reduce` node `n` runs in two passes: a sum or
    /// mean with no row fusion around it, of more than one chunk of elements (or an unknown
    /// count), that keeps the last axis or has at most [`FEW_OUTPUTS`] outputs.
    pub(super) fn column_reduction(&self, n: NodeId) -> Option<Dim> {
        let Op::Reduce { op, axes } = self.g.op(n) else {
            return None;
        };
        let xs = self.shape(self.g.operands(n)[0]);
        let fused = self.row_prologues.get(&n).is_some_and(|p| !p.is_empty())
            || self.epilogues.get(&n).is_some_and(|e| !e.is_empty());
        let keeps_last = !xs.is_empty() && !axes.contains(&(xs.len() - 1));
        let os = self.shape(Value::new(n, 0));
        let few = numel(&os)
            .and_then(|d| d.as_known())
            .is_some_and(|k| k <= FEW_OUTPUTS);
        if matches!(op, ReduceOp::Max) || fused || !(keeps_last || few) {
            return None;
        }
        let red: Vec<Dim> = axes.iter().map(|&a| xs[a].clone()).collect();
        let count = numel(&red)?;
        if count.as_known().is_some_and(|r| r <= REDUCE_ROWS) {
            return None;
        }
        count.ceil_div(REDUCE_ROWS).map(|_| count)
    }

    /// Lowers `Reduce` node `n` in two passes, `count` elements per output (see the module
    /// doc).
    pub(super) fn reduce_columns(&mut self, n: NodeId, count: Dim) -> Result<(), LowerError> {
        let Op::Reduce { op: rop, axes } = self.g.op(n) else {
            return Ok(());
        };
        let (rop, axes) = (*rop, axes.clone());
        let name = self.g.op(n).name();
        let v0 = Value::new(n, 0);
        let x = self.g.operands(n)[0];
        let xs = self.shape(x);
        let os = self.shape(v0);
        let red: Vec<Dim> = axes.iter().map(|&a| xs[a].clone()).collect();
        let outs = numel(&os).ok_or_else(|| LowerError::Unsupported {
            node: n,
            op: name,
            message: "the output's size is not a product of dimensions".into(),
        })?;
        let (chunks, nch) = self.chunks(n, &count, REDUCE_ROWS)?;
        let out = self.new_buf(v0, BufKind::Temp);
        let ps = vec![nch.clone(), outs.clone()];
        let part = self.scratch(n, ps.clone());

        // 1. A chunk of one output's elements per point; the sum in a local array, which
        //    lanes do not share (a scalar sum would read as a reduction for a warp).
        let mut kb = KB::new(self, &format!("{name}_{}_part", n.index()));
        let (ch, o) = (IExpr::Grid(0), IExpr::Grid(1));
        let sum = kb.arr();
        kb.body.push(Stmt::Array {
            arr: sum,
            len: 1,
            init: 0.0,
        });
        let step = kb.counter();
        let r = chunks.start(&ch).add(IExpr::Loop(step));
        let mut xidx = kb.l.delinear(o.clone(), &os);
        let ridx = kb.l.delinear(r, &red);
        for (j, &a) in axes.iter().enumerate() {
            xidx[a] = ridx[j].clone();
        }
        let xv = kb.value(x, &xidx)?;
        let at0 = IExpr::c(0);
        kb.body.push(Stmt::For {
            counter: step,
            extent: chunks.len(&ch),
            body: vec![Stmt::ArrSet {
                arr: sum,
                index: at0.clone(),
                value: Expr::bin(
                    BinaryOp::Add,
                    Expr::ArrLoad {
                        arr: sum,
                        index: at0.clone(),
                    },
                    xv,
                ),
            }],
        });
        let slot = kb.buf(part, true);
        let index = kb.l.linear(&[ch, o], &ps);
        kb.body.push(Stmt::Store {
            buf: slot,
            index,
            value: Expr::ArrLoad {
                arr: sum,
                index: at0,
            },
        });
        let grid = vec![kb.l.dim(&nch), kb.l.dim(&outs)];
        kb.finish(grid, n);

        // 2. One output per point: the chunks (lanes may share them; few outputs of many
        //    chunks want that).
        let mut kb = KB::new(self, &format!("{name}_{}", n.index()));
        let o = IExpr::Grid(0);
        let acc = kb.var();
        kb.body.push(Stmt::Var {
            var: acc,
            init: Expr::Const(0.0),
        });
        let c = kb.counter();
        let pslot = kb.buf(part, false);
        let index = kb.l.linear(&[IExpr::Loop(c), o.clone()], &ps);
        kb.body.push(Stmt::For {
            counter: c,
            extent: kb.l.dim(&nch),
            body: vec![Stmt::Set {
                var: acc,
                value: Expr::bin(
                    BinaryOp::Add,
                    Expr::Var(acc),
                    Expr::Load { buf: pslot, index },
                ),
            }],
        });
        let result = reduced(rop, acc, kb.l.dim(&count));
        if !kb.l.unstored.contains(&v0) {
            let ob = kb.buf(out, true);
            kb.body.push(Stmt::Store {
                buf: ob,
                index: o,
                value: result,
            });
        }
        let grid = vec![kb.l.dim(&outs)];
        kb.finish(grid, n);
        Ok(())
    }
}
