//! The causal depthwise convolution and its gradient, parallel over every output element.
//!
//! With `hist = K - 1` and the extended input `xin = concat(s0, x)` along time (`xin[a]` is
//! the state's element `a` for `a < hist`, else `x[a - hist]`):
//!
//! ```text
//! y[t]    = bias + sum_k w[k] · xin[t + k]                  t < L
//! s1[i]   = xin[L + i]                                      i < hist
//! dxin[m] = [m >= L] ds1[m - L] + sum_k [0 <= m-k < L] w[k] · dy[m - k]
//! dx[t]   = dxin[hist + t],   ds0[i] = dxin[i]
//! dw[k]   = sum_{b,t} dy[t] · xin[t + k],   db = sum_{b,t} dy[t]
//! ```
//!
//! `y` is one grid point per (batch row, chunk of [`CONV_CHUNK`] steps, channel) with the
//! last inputs in a sliding window (the whole sequence per point in the CPU's
//! whole-sequence runs); `s1`, `dx` and `ds0` one point per element. Every output sums its
//! `K` terms in the order above, so a value does not depend on how the sequence is cut
//! into chunks or segments. `dw`/`db` are sums over batch and time: one point per (batch,
//! chunk of [`CONV_GRAD_CHUNK`] steps, channel) sums its chunk into scratch, and one point
//! per channel adds the chunks in order. The kernel IR has no branches: a term that exists
//! only for some positions is a loop of extent 0 or 1 (an exact integer indicator), so no
//! load ever leaves its buffer, whatever `L` is (0 included).

use super::{KB, LowerError, Lowering};
use ir::kernel::{ArrId, Expr, IExpr, Stmt, VarId};
use ir::schedule::BufKind;
use ir::{BinaryOp, Dim, NodeId, Value};

use BinaryOp::{Add, Mul};

/// Time steps per grid point of the forward conv (outside the CPU's whole-sequence runs):
/// the window of the last inputs is loaded once per chunk, and `B·ceil(L/16)·C` points
/// (1.8M at mamba2-130m, B = 8, L = 2048) still fill a GPU.
pub const CONV_CHUNK: u64 = 16;

/// Time steps per grid point of the weight gradient's first pass: enough work per point to
/// hide the loads, and `B·ceil(L/64)·C` points (458k at mamba2-130m, B = 8, L = 2048).
pub const CONV_GRAD_CHUNK: u64 = 64;

/// 1 where `d >= 1`, else 0: `min(max(d, 0), 1)`, with `max(d, 0) = d - min(d, 0)` (no
/// division: these indicators are evaluated per tap of every element).
fn positive(d: IExpr) -> IExpr {
    d.clone().sub(d.min(IExpr::c(0))).min(IExpr::c(1))
}

/// `1 - v` for an indicator `v`.
fn not(v: IExpr) -> IExpr {
    IExpr::c(1).sub(v)
}

/// `for _ in 0..extent { body }`: with an indicator as the extent, `body` where it is 1.
fn when(kb: &mut KB, extent: IExpr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        counter: kb.counter(),
        extent,
        body,
    }
}

/// `var += a * b`, as every term of the convolution and its gradient is accumulated.
fn accumulate(var: VarId, a: Expr, b: Expr) -> Stmt {
    Stmt::Set {
        var,
        value: Expr::bin(Add, Expr::Var(var), Expr::bin(Mul, a, b)),
    }
}

/// Statements that slide the window `win` of the last `hist` inputs one step on, `xt`
/// entering it.
fn slide(win: ArrId, hist: i64, xt: VarId) -> Vec<Stmt> {
    (0..hist)
        .map(|i| Stmt::ArrSet {
            arr: win,
            index: IExpr::c(i),
            value: match i + 1 < hist {
                true => Expr::ArrLoad {
                    arr: win,
                    index: IExpr::c(i + 1),
                },
                false => Expr::Var(xt),
            },
        })
        .collect()
}

/// The operands every kernel of one conv node shares.
struct Conv {
    x: Value,
    w: Value,
    s0: Value,
    /// `[B, L, C]` of `x` (and `y`, `dy`, `dx`).
    xs: Vec<Dim>,
    /// The kernel width.
    k: usize,
}

impl Conv {
    fn hist(&self) -> i64 {
        self.k as i64 - 1
    }

    /// Statements that set `var` to `xin[a]` of batch row `b`, channel `c` (`0 <= a <
    /// L + hist`): one of two loops of extent 0 or 1 loads it.
    fn xin(
        &self,
        kb: &mut KB,
        var: VarId,
        (b, a, c): (&IExpr, IExpr, &IExpr),
    ) -> Result<Vec<Stmt>, LowerError> {
        let hist = self.hist();
        let from_x = |kb: &mut KB, a: IExpr| -> Result<Stmt, LowerError> {
            Ok(Stmt::Set {
                var,
                value: kb.value(self.x, &[b.clone(), a, c.clone()])?,
            })
        };
        if hist == 0 {
            return Ok(vec![from_x(kb, a)?]);
        }
        let in_state = positive(IExpr::c(hist).sub(a.clone()));
        let sv = kb.value(
            self.s0,
            &[b.clone(), c.clone(), a.clone().min(IExpr::c(hist - 1))],
        )?;
        let state = when(kb, in_state.clone(), vec![Stmt::Set { var, value: sv }]);
        let xv = from_x(kb, a.sub(IExpr::c(hist)))?;
        let input = when(kb, not(in_state), vec![xv]);
        Ok(vec![state, input])
    }

    /// Declares the local array `win` and loads it with the `hist` inputs before step
    /// `start` of batch row `b`, channel `c` (`xin[start..start + hist]`).
    fn load_window(
        &self,
        kb: &mut KB,
        win: ArrId,
        (b, start, c): (&IExpr, &IExpr, &IExpr),
    ) -> Result<(), LowerError> {
        let hist = self.hist();
        if hist == 0 {
            return Ok(());
        }
        kb.body.push(Stmt::Array {
            arr: win,
            len: hist as usize,
            init: 0.0,
        });
        let v = kb.var();
        kb.body.push(Stmt::Var {
            var: v,
            init: Expr::Const(0.0),
        });
        for i in 0..hist {
            let set = self.xin(kb, v, (b, start.clone().add(IExpr::c(i)), c))?;
            kb.body.extend(set);
            kb.body.push(Stmt::ArrSet {
                arr: win,
                index: IExpr::c(i),
                value: Expr::Var(v),
            });
        }
        Ok(())
    }

    fn weight(&self, kb: &mut KB, c: &IExpr, k: usize) -> Result<Expr, LowerError> {
        kb.value(self.w, &[c.clone(), IExpr::c(k as i64)])
    }
}

impl Lowering<'_> {
    fn conv_operands(&self, n: NodeId, x: Value, w: Value, s0: Value) -> Result<Conv, LowerError> {
        let k = self.known(n, &self.shape(w)[1], "the kernel width")?;
        if k == 0 {
            return Err(LowerError::Unsupported {
                node: n,
                op: self.g.op(n).name(),
                message: "kernel width must be at least 1".into(),
            });
        }
        Ok(Conv {
            x,
            w,
            s0,
            xs: self.shape(x),
            k,
        })
    }

    /// `CausalConv1d(x, w, bias, s0) -> (y, s1)`. `y`: one point per (batch row, chunk of
    /// [`CONV_CHUNK`] steps, channel) walks its chunk with the last `hist` inputs in a local
    /// window (loaded from `xin` at the chunk's start), computing the conv's epilogues (the
    /// SiLU after it) from the value in registers; with `sequential_scans` (the CPU's
    /// whole-sequence runs, where a few cores want few long points) the chunk is the whole
    /// sequence. Every output sums its terms in the same order either way. `s1`: one point
    /// per state element.
    pub(super) fn conv(&mut self, n: NodeId) -> Result<(), LowerError> {
        let ops = self.g.operands(n);
        let (bias, cv) = (ops[2], self.conv_operands(n, ops[0], ops[1], ops[3])?);
        let chunks = match self.sequential_scans {
            true => None,
            false => Some(self.chunks(n, &cv.xs[1], CONV_CHUNK)?),
        };
        let y = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let s1 = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let mut kb = KB::new(self, &format!("causal_conv1d_{}", n.index()));
        let (b, c) = (
            IExpr::Grid(0),
            IExpr::Grid(chunks.as_ref().map_or(1, |_| 2)),
        );
        let (start, len) = match &chunks {
            Some((ch, _)) => (ch.start(&IExpr::Grid(1)), ch.len(&IExpr::Grid(1))),
            None => (IExpr::c(0), kb.l.dim(&cv.xs[1])),
        };
        let hist = cv.hist();
        let win = kb.arr();
        cv.load_window(&mut kb, win, (&b, &start, &c))?;
        let step = kb.counter();
        let t = start.add(IExpr::Loop(step));
        let (xt, acc) = (kb.var(), kb.var());
        let mut body = vec![
            Stmt::Var {
                var: xt,
                init: kb.value(cv.x, &[b.clone(), t.clone(), c.clone()])?,
            },
            Stmt::Var {
                var: acc,
                init: kb.value(bias, std::slice::from_ref(&c))?,
            },
        ];
        for k in 0..cv.k {
            let input = match k < hist as usize {
                true => Expr::ArrLoad {
                    arr: win,
                    index: IExpr::c(k as i64),
                },
                false => Expr::Var(xt),
            };
            let wv = cv.weight(&mut kb, &c, k)?;
            body.push(accumulate(acc, wv, input));
        }
        body.extend(kb.store_with_epilogues(Value::new(n, 0), y, &[b, t, c], acc)?);
        body.extend(slide(win, hist, xt));
        kb.body.push(Stmt::For {
            counter: step,
            extent: len,
            body,
        });
        let grid = match &chunks {
            Some((_, count)) => vec![kb.l.dim(&cv.xs[0]), kb.l.dim(count), kb.l.dim(&cv.xs[2])],
            None => vec![kb.l.dim(&cv.xs[0]), kb.l.dim(&cv.xs[2])],
        };
        kb.finish(grid, n);
        if cv.hist() > 0 {
            let mut kb = KB::new(self, &format!("causal_conv1d_{}_state", n.index()));
            let (b, c, i) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
            let v = kb.var();
            let l = kb.l.dim(&cv.xs[1]);
            kb.body.push(Stmt::Var {
                var: v,
                init: Expr::Const(0.0),
            });
            let set = cv.xin(&mut kb, v, (&b, l.add(i.clone()), &c))?;
            kb.body.extend(set);
            let ss = kb.l.shape(Value::new(n, 1));
            let slot = kb.buf(s1, true);
            kb.body.push(Stmt::Store {
                buf: slot,
                index: kb.l.linear(&[b, c, i], &ss),
                value: Expr::Var(v),
            });
            let grid = ss.iter().map(|d| kb.l.dim(d)).collect();
            kb.finish(grid, n);
        }
        Ok(())
    }

    /// `CausalConv1dGrad(x, w, bias, s0, dy, ds1) -> (dx, dw, db, ds0)` in four kernels (the
    /// module doc has the formulas): `dx` and `ds0` one point per element, `dw`/`db` as
    /// per-chunk partial sums in scratch `[B, ceil(L/64), K + 1, C]` and their sum over
    /// batch rows and chunks in order.
    pub(super) fn conv_grad(&mut self, n: NodeId) -> Result<(), LowerError> {
        let ops = self.g.operands(n);
        let (dy, ds1) = (ops[4], ops[5]);
        let cv = self.conv_operands(n, ops[0], ops[1], ops[3])?;
        let (hist, k) = (cv.hist(), cv.k);
        let dxb = self.new_buf(Value::new(n, 0), BufKind::Temp);
        let dwb = self.new_buf(Value::new(n, 1), BufKind::Temp);
        let dbb = self.new_buf(Value::new(n, 2), BufKind::Temp);
        let ds0b = self.new_buf(Value::new(n, 3), BufKind::Temp);
        let ss = self.shape(Value::new(n, 3));

        // dxin[m] for batch row b, channel c, over the k whose dy[m - k] exists: the
        // statements and the variable holding it.
        let dxin = |kb: &mut KB,
                    b: &IExpr,
                    m: IExpr,
                    c: &IExpr|
         -> Result<(Vec<Stmt>, VarId), LowerError> {
            let acc = kb.var();
            let l = kb.l.dim(&cv.xs[1]);
            let mut out = vec![Stmt::Var {
                var: acc,
                init: Expr::Const(0.0),
            }];
            if hist > 0 {
                // m >= L, and m - L < hist there.
                let tail = not(positive(l.clone().sub(m.clone())));
                let j = m.clone().sub(l.clone()).min(IExpr::c(hist - 1));
                let v = kb.value(ds1, &[b.clone(), c.clone(), j])?;
                out.push(when(kb, tail, vec![Stmt::Set { var: acc, value: v }]));
            }
            // Each term is loaded inside its 0-or-1 loop and added after it: an add inside
            // the loop would read as a reduction that warp lanes share (a warp per point).
            let g = kb.var();
            out.push(Stmt::Var {
                var: g,
                init: Expr::Const(0.0),
            });
            for kk in 0..k {
                let a = m.clone().sub(IExpr::c(kk as i64));
                let mut exists = IExpr::c(1);
                if hist > 0 {
                    // 0 <= a and a < L.
                    exists = positive(a.clone().add(IExpr::c(1)))
                        .mul(positive(l.clone().sub(a.clone())));
                }
                let gv = kb.value(dy, &[b.clone(), a, c.clone()])?;
                out.push(Stmt::Set {
                    var: g,
                    value: Expr::Const(0.0),
                });
                out.push(when(kb, exists, vec![Stmt::Set { var: g, value: gv }]));
                let wv = cv.weight(kb, c, kk)?;
                out.push(accumulate(acc, wv, Expr::Var(g)));
            }
            Ok((out, acc))
        };
        let finish_store =
            |mut kb: KB, acc, buf, idx: &[IExpr], shape: &[Dim], grid: Vec<IExpr>| {
                let slot = kb.buf(buf, true);
                let index = kb.l.linear(idx, shape);
                kb.body.push(Stmt::Store {
                    buf: slot,
                    index,
                    value: Expr::Var(acc),
                });
                kb.finish(grid, n);
            };

        // dx: one point per (b, t, c).
        let mut kb = KB::new(self, &format!("causal_conv1d_grad_{}", n.index()));
        let (b, t, c) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (body, acc) = dxin(&mut kb, &b, t.clone().add(IExpr::c(hist)), &c)?;
        kb.body = body;
        let grid = cv.xs.iter().map(|d| kb.l.dim(d)).collect();
        finish_store(kb, acc, dxb, &[b, t, c], &cv.xs, grid);

        // ds0: one point per (b, c, i).
        if hist > 0 {
            let mut kb = KB::new(self, &format!("causal_conv1d_grad_{}_ds0", n.index()));
            let (b, c, i) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
            let (body, acc) = dxin(&mut kb, &b, i.clone(), &c)?;
            kb.body = body;
            let grid = ss.iter().map(|d| kb.l.dim(d)).collect();
            finish_store(kb, acc, ds0b, &[b, c, i], &ss, grid);
        }

        // dw, db partial sums: one point per (b, chunk, c), a window of the last hist inputs.
        let (chunks, count) = self.chunks(n, &cv.xs[1], CONV_GRAD_CHUNK)?;
        let kp = Dim::known(k as u64 + 1);
        let ps = vec![cv.xs[0].clone(), count.clone(), kp, cv.xs[2].clone()];
        let part = self.scratch(n, ps.clone());
        let mut kb = KB::new(self, &format!("causal_conv1d_grad_{}_dwp", n.index()));
        let (b, ch, c) = (IExpr::Grid(0), IExpr::Grid(1), IExpr::Grid(2));
        let (win, sums) = (kb.arr(), kb.arr());
        kb.body.push(Stmt::Array {
            arr: sums,
            len: k + 1,
            init: 0.0,
        });
        let al = |arr, j: i64| Expr::ArrLoad {
            arr,
            index: IExpr::c(j),
        };
        cv.load_window(&mut kb, win, (&b, &chunks.start(&ch), &c))?;
        let step = kb.counter();
        let tt = chunks.start(&ch).add(IExpr::Loop(step));
        let (xt, g) = (kb.var(), kb.var());
        let at = [b.clone(), tt, c.clone()];
        let mut body = vec![
            Stmt::Var {
                var: xt,
                init: kb.value(cv.x, &at)?,
            },
            Stmt::Var {
                var: g,
                init: kb.value(dy, &at)?,
            },
            Stmt::ArrSet {
                arr: sums,
                index: IExpr::c(k as i64),
                value: Expr::bin(Add, al(sums, k as i64), Expr::Var(g)),
            },
        ];
        for j in 0..k as i64 {
            let input = if j < hist { al(win, j) } else { Expr::Var(xt) };
            body.push(Stmt::ArrSet {
                arr: sums,
                index: IExpr::c(j),
                value: Expr::bin(Add, al(sums, j), Expr::bin(Mul, Expr::Var(g), input)),
            });
        }
        body.extend(slide(win, hist, xt));
        kb.body.push(Stmt::For {
            counter: step,
            extent: chunks.len(&ch),
            body,
        });
        let slot = kb.buf(part, true);
        for j in 0..=k as i64 {
            let index =
                kb.l.linear(&[b.clone(), ch.clone(), IExpr::c(j), c.clone()], &ps);
            kb.body.push(Stmt::Store {
                buf: slot,
                index,
                value: al(sums, j),
            });
        }
        let grid = vec![kb.l.dim(&cv.xs[0]), kb.l.dim(&count), kb.l.dim(&cv.xs[2])];
        kb.finish(grid, n);

        // dw, db: one point per channel adds the partial sums, batch rows then chunks.
        let mut kb = KB::new(self, &format!("causal_conv1d_grad_{}_dw", n.index()));
        let c = IExpr::Grid(0);
        let sums = kb.arr();
        kb.body.push(Stmt::Array {
            arr: sums,
            len: k + 1,
            init: 0.0,
        });
        let (bl, chl) = (kb.counter(), kb.counter());
        let pslot = kb.buf(part, false);
        let inner = (0..=k as i64)
            .map(|j| {
                let index = kb.l.linear(
                    &[IExpr::Loop(bl), IExpr::Loop(chl), IExpr::c(j), c.clone()],
                    &ps,
                );
                Stmt::ArrSet {
                    arr: sums,
                    index: IExpr::c(j),
                    value: Expr::bin(Add, al(sums, j), Expr::Load { buf: pslot, index }),
                }
            })
            .collect();
        kb.body.push(Stmt::For {
            counter: bl,
            extent: kb.l.dim(&cv.xs[0]),
            body: vec![Stmt::For {
                counter: chl,
                extent: kb.l.dim(&count),
                body: inner,
            }],
        });
        let (dws, dbs) = (kb.buf(dwb, true), kb.buf(dbb, true));
        let wshape = kb.l.shape(Value::new(n, 1));
        for j in 0..k as i64 {
            let index = kb.l.linear(&[c.clone(), IExpr::c(j)], &wshape);
            kb.body.push(Stmt::Store {
                buf: dws,
                index,
                value: al(sums, j),
            });
        }
        kb.body.push(Stmt::Store {
            buf: dbs,
            index: c,
            value: al(sums, k as i64),
        });
        let grid = vec![kb.l.dim(&cv.xs[2])];
        kb.finish(grid, n);
        Ok(())
    }
}
