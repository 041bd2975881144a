//! The f64 reference interpreter: the oracle every backend (Cranelift CPU, CUDA) is tested
//! against. It is written to be obviously correct, not fast: plain loops over row-major
//! [`Array`]s, every value in f64, sums accumulated in index order.
//!
//! # API
//!
//! ```text
//! run(&graph, &Bindings { inputs, params, states }) -> Result<Outputs, InterpError>
//! run_values(&graph, &bindings) -> Result<Vec<Vec<Array>>, InterpError>   // every node's results
//! ```
//!
//! - [`Bindings::inputs`]: the data inputs (`InputKind::Data`, e.g. `input_ids`) by name; all
//!   are required. Integer inputs hold their integer values as f64.
//! - [`Bindings::params`]: every parameter by its checkpoint name, with exactly the declared
//!   shape.
//! - [`Bindings::states`]: initial states (`InputKind::State`) by graph input name; a missing
//!   state starts at zeros.
//! - A name that the graph does not have (in the map it was passed in) is an error, so typos
//!   and a state passed as an input do not go unnoticed.
//! - [`Outputs::values`]: the graph's outputs in the graph's order (for the library models:
//!   the final states, named like their state inputs so they can be fed back, then `logits`).
//!
//! Symbols (`B`, `L`, ...) are bound by unifying the data and state inputs' declared shapes
//! with the given arrays, in node order and axis order: the first occurrence of a symbol binds
//! it, later ones must agree. A dim such as `2*L` or `B*L` binds its one unknown symbol by
//! division once the rest is known. Every other shape (params, reshape and broadcast targets,
//! result types) is then evaluated with these bindings; every computed result is checked
//! against its evaluated type.
//!
//! Nodes are evaluated in id order (a topological order). A value is dropped after its last
//! use unless it is a graph output ([`run_values`] keeps everything), and inputs and params
//! are borrowed, not copied, so a graph of `mamba-130m`'s size runs in bounded memory.
//!
//! # Semantics
//!
//! - `input`/`param`: the bound array as given (no rounding to the declared dtype); `const`:
//!   the scalar value.
//! - Unary: `neg exp log sqrt`, `rsqrt x = 1/sqrt(x)`, `recip x = 1/x`,
//!   `softplus x = x` for `x > 20` else `ln_1p(exp x)`, `sigmoid` in the form that does not
//!   overflow for either sign, `silu x = x * sigmoid(x)`.
//! - Binary: `add sub mul div` as f64; `max min` return NaN when either operand is NaN.
//! - `cast{to}`: every value rounded to `to` with [`round_to`] (models storage precision).
//! - `reduce_{sum,mean,max}{axes}`: reduced axes kept with size 1; elements visited in
//!   row-major order; `mean = sum / count`; `max` of an empty set is `-inf`, and NaN wins.
//! - `matmul{rhs_t}`: `lhs [..., M, K] @ rhs [K, N]` (`rhs [N, K]` when `rhs_t`), `rhs` 2-D
//!   and shared over the batch axes or with the batch axes of `lhs`; each output is
//!   `0 + l_0 r_0 + l_1 r_1 + ...` in `k` order.
//! - `reshape` (row-major, same data), `permute` (result axis `i` is operand axis `perm[i]`),
//!   `broadcast` (right-aligned, operand dims 1 or equal), `slice`, `concat` (variadic).
//! - `gather(table [V, D], ids [...]) -> [..., D]`: ids must be integers in `[0, V)`.
//! - `causal_conv1d(x [B,L,C], w [C,K], b [C], s0 [B,C,K-1]) -> (y, s1)`: with `xx` the
//!   sequence `[s0 ; x]` along time (`s0`'s last column is the most recent past input),
//!   `y[b,t,c] = b[c] + sum_k w[c,k] * xx[b, t+k, c]` (terms added to `b[c]` in `k` order),
//!   `s1` = the last `K-1` steps of `xx`.
//! - `selective_scan(x [B,L,E], dt, A [E,N], Bm [B,L,N], Cm [B,L,N], h0 [B,E,N])`:
//!   `h = exp(dt*A[e,n]) * h + (dt*x) * Bm[n]`, `y = sum_n h[n] * Cm[n]`, sequentially in `t`.
//! - `ssd_scan{chunk}(x [B,L,H,P], dt [B,L,H], A [H], Bm [B,L,G,N], Cm, s0 [B,H,P,N])`: the
//!   same recurrence per head with the scalar `A[h]`, head `h` reading group `h / (H/G)`,
//!   computed sequentially (`chunk` picks an algorithm elsewhere; it does not change the math).
//! - `causal_conv1d_grad(x, w, b, s0, dy, ds1) -> (dx, dw, db, ds0)`: the exact VJP of
//!   `causal_conv1d`'s `(y, s1)`: `dxx` (the cotangent of `[s0 ; x]`) gets `w[c,k] * dy[t]` at
//!   `t+k` and `ds1` at its last `K-1` steps, then splits into `ds0` and `dx`;
//!   `dw[c,k] = sum_{b,t} dy * xx[t+k]`, `db[c] = sum_{b,t} dy`.
//! - `selective_scan_grad(x, dt, A, Bm, Cm, h0, dy, dh1)` and
//!   `ssd_scan_grad{chunk}(x, dt, A, Bm, Cm, s0, dy, ds1)`: the forward recurrence is rerun
//!   keeping every state `h_t` (`h_{-1} = h0`), then one reverse pass in time carries the state
//!   cotangent `g`: `g += Cm_t dy_t` (with `g = dh1` before the last step), then with
//!   `a = exp(dt_t A)`: `dCm_t += h_t dy_t`, `dBm_t += dt_t x_t g`,
//!   `dx_t = dt_t (g . Bm_t)`, `ddt_t = x_t (g . Bm_t) + sum g a A h_{t-1}`,
//!   `dA += g a dt_t h_{t-1}`, and `g = a g` is the cotangent of `h_{t-1}`; the final `g` is
//!   the initial state's cotangent. `dBm`/`dCm` sum over channels (over a group's heads and
//!   `P` for SSD), `dA` over batch and time (and `N`, `P` for SSD's scalar `A`).
//! - `cross_entropy{ignore_index}(logits [..., V], targets [...])`: per position
//!   `loss = logsumexp(logits) - logits[target]` (max-shifted) and `valid = 1`, both 0 where
//!   `target == ignore_index`; any other target must be an integer in `[0, V)`.
//! - `cross_entropy_grad{ignore_index}(logits, targets, dloss)`:
//!   `(softmax(logits) - onehot(target)) * dloss` per row, rows of 0 where ignored.
//!
//! # Errors
//!
//! [`InterpError`]: missing or unknown bindings, shape mismatches (with the symbol values
//! bound so far), malformed arrays, out-of-range gather ids and cross-entropy targets
//! (position and value), and, for
//! graphs that break the IR's invariants, the node `%n`, its op and the problem.

use crate::array::{Array, round_to, strides};
use ir::{BinaryOp, Dim, Graph, InputKind, NodeId, Op, ReduceOp, UnaryOp, Value, shape_to_string};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

/// What a graph runs on: data inputs, parameters and initial states, by name.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    pub inputs: HashMap<String, Array>,
    pub params: HashMap<String, Array>,
    /// Initial states by graph input name; a missing state starts at zeros.
    pub states: HashMap<String, Array>,
}

/// The graph's outputs, in the graph's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    pub values: Vec<(String, Array)>,
}

impl Outputs {
    /// The output called `name` (the first one, should two share it).
    pub fn get(&self, name: &str) -> Option<&Array> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
}

/// Why a graph could not be evaluated.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum InterpError {
    #[error("missing {kind} `{name}` ({node})")]
    Missing {
        node: NodeId,
        /// `input` or `param`.
        kind: &'static str,
        name: String,
    },
    #[error("the graph has no {kind} `{name}`{}", is_a(*.actual))]
    Unknown {
        /// The map it was passed in: `input`, `state` or `param`.
        kind: &'static str,
        name: String,
        /// What the graph has under that name, if anything.
        actual: Option<&'static str>,
    },
    #[error("{kind} `{name}`: its shape {} holds {expected} elements but its data has {found}", fmt_shape(.shape))]
    MalformedArray {
        kind: &'static str,
        name: String,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error(
        "{kind} `{name}` ({node}) has shape {} but the graph expects {expected}{}",
        fmt_shape(.found),
        fmt_bound(.bound)
    )]
    InputShape {
        node: NodeId,
        /// `input` or `state`.
        kind: &'static str,
        name: String,
        found: Vec<usize>,
        /// The declared shape, symbolically (`[B, L]`).
        expected: String,
        /// Values of the symbols of `expected` bound by earlier inputs.
        bound: Vec<(String, u64)>,
    },
    #[error(
        "{kind} `{name}` ({node}): the symbols of axis {axis} ({dim}) cannot be determined from its shape {}",
        fmt_shape(.found)
    )]
    Unresolved {
        node: NodeId,
        kind: &'static str,
        name: String,
        axis: usize,
        dim: String,
        found: Vec<usize>,
    },
    #[error("param `{name}` ({node}) has shape {} but the graph declares {}", fmt_shape(.found), fmt_shape(.expected))]
    ParamShape {
        node: NodeId,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{node} `{op}`: symbol `{symbol}` is not bound by any input")]
    UnboundSymbol {
        node: NodeId,
        op: &'static str,
        symbol: String,
    },
    #[error(
        "{node} `{op}`: id {value} at position {} is not an integer in [0, {vocab})",
        fmt_shape(.position)
    )]
    IdOutOfRange {
        node: NodeId,
        op: &'static str,
        /// Index of the id in the `ids` operand.
        position: Vec<usize>,
        value: f64,
        vocab: usize,
    },
    #[error("{node} `{op}`: {problem}")]
    Op {
        node: NodeId,
        op: &'static str,
        problem: String,
    },
    #[error(
        "{node} `{op}`: result {result} has shape {} but its type says {}",
        fmt_shape(.found),
        fmt_shape(.expected)
    )]
    ResultShape {
        node: NodeId,
        op: &'static str,
        result: usize,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("output `{name}` refers to {value}, which the graph does not define")]
    BadOutput { name: String, value: Value },
}

fn fmt_shape(s: &[usize]) -> String {
    let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

fn fmt_bound(b: &[(String, u64)]) -> String {
    if b.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = b.iter().map(|(s, v)| format!("{s} = {v}")).collect();
    format!(" with {}", parts.join(", "))
}

fn is_a(actual: Option<&'static str>) -> String {
    match actual {
        Some(k) => format!(" (it is a {k}; pass it in `{k}s`)"),
        None => String::new(),
    }
}

/// Evaluates `graph` and returns its outputs in order.
pub fn run(graph: &Graph, b: &Bindings) -> Result<Outputs, InterpError> {
    let mut vals = execute(graph, b, false)?;
    let outputs = graph.outputs();
    let mut values = Vec::with_capacity(outputs.len());
    for (i, (name, v)) in outputs.iter().enumerate() {
        let again = outputs[i + 1..].iter().any(|(_, w)| w == v);
        let a = take(&mut vals, *v, again).ok_or_else(|| InterpError::BadOutput {
            name: name.clone(),
            value: *v,
        })?;
        values.push((name.clone(), a));
    }
    Ok(Outputs { values })
}

/// Evaluates `graph` and returns every node's results (`[node][result]`), for debugging.
pub fn run_values(graph: &Graph, b: &Bindings) -> Result<Vec<Vec<Array>>, InterpError> {
    let vals = execute(graph, b, true)?;
    let mut all = Vec::with_capacity(vals.len());
    for (i, rs) in vals.into_iter().enumerate() {
        let mut out = Vec::with_capacity(rs.len());
        for (r, a) in rs.into_iter().enumerate() {
            let node = NodeId::from_index(i);
            let a = a.ok_or_else(|| internal(graph, node, format!("result {r} was dropped")))?;
            out.push(a.into_owned());
        }
        all.push(out);
    }
    Ok(all)
}

/// Per node, per result: the value, or `None` once dropped.
type Values<'a> = Vec<Vec<Option<Cow<'a, Array>>>>;

/// Takes a value out of the table, or a copy of it when `clone` (an output named twice).
fn take(vals: &mut Values<'_>, v: Value, clone: bool) -> Option<Array> {
    let slot = vals.get_mut(v.node.index())?.get_mut(v.result as usize)?;
    if clone {
        slot.as_ref().map(|a| a.as_ref().clone())
    } else {
        slot.take().map(Cow::into_owned)
    }
}

fn internal(graph: &Graph, node: NodeId, problem: String) -> InterpError {
    InterpError::Op {
        node,
        op: graph.op(node).name(),
        problem,
    }
}

fn execute<'a>(graph: &Graph, b: &'a Bindings, keep_all: bool) -> Result<Values<'a>, InterpError> {
    check_bindings(graph, b)?;
    let bind = bind_symbols(graph, b)?;

    // Remaining uses of every value; outputs count as one use that is never released.
    let mut uses: Vec<Vec<usize>> = graph
        .nodes()
        .map(|n| vec![0; graph.types(n).len()])
        .collect();
    let bump = |uses: &mut Vec<Vec<usize>>, v: Value| match uses
        .get_mut(v.node.index())
        .and_then(|r| r.get_mut(v.result as usize))
    {
        Some(c) => {
            *c += 1;
            true
        }
        None => false,
    };
    for n in graph.nodes() {
        for v in graph.operands(n) {
            if v.node >= n || !bump(&mut uses, v) {
                return Err(internal(
                    graph,
                    n,
                    format!("operand {v} is not an earlier value"),
                ));
            }
        }
    }
    for (name, v) in graph.outputs() {
        if !bump(&mut uses, *v) {
            return Err(InterpError::BadOutput {
                name: name.clone(),
                value: *v,
            });
        }
    }

    let mut vals: Values<'a> = Vec::with_capacity(graph.len());
    for n in graph.nodes() {
        let op = graph.op(n);
        let operands = graph.operands(n);
        let mut out_shapes = Vec::new();
        for t in graph.types(n) {
            out_shapes.push(eval_shape(&t.shape, &bind).map_err(|e| e.at(n, op))?);
        }
        let results = {
            let mut args: Vec<&Array> = Vec::with_capacity(operands.len());
            for v in &operands {
                let a = vals
                    .get(v.node.index())
                    .and_then(|r| r.get(v.result as usize))
                    .and_then(|a| a.as_deref())
                    .ok_or_else(|| internal(graph, n, format!("operand {v} is not available")))?;
                args.push(a);
            }
            eval_node(graph, n, &args, b, &bind)?
        };
        if results.len() != out_shapes.len() {
            return Err(internal(
                graph,
                n,
                format!(
                    "{} results, the graph types {}",
                    results.len(),
                    out_shapes.len()
                ),
            ));
        }
        for (i, (r, want)) in results.iter().zip(&out_shapes).enumerate() {
            if r.shape != *want {
                return Err(InterpError::ResultShape {
                    node: n,
                    op: op.name(),
                    result: i,
                    expected: want.clone(),
                    found: r.shape.clone(),
                });
            }
        }
        if !keep_all {
            for v in &operands {
                let (ni, ri) = (v.node.index(), v.result as usize);
                uses[ni][ri] -= 1;
                if uses[ni][ri] == 0 {
                    vals[ni][ri] = None;
                }
            }
        }
        let live = &uses[n.index()];
        vals.push(
            results
                .into_iter()
                .enumerate()
                .map(|(i, r)| (keep_all || live[i] > 0).then_some(r))
                .collect(),
        );
    }
    Ok(vals)
}

/// Every bound array is well formed and every name exists in the graph under its kind.
fn check_bindings(graph: &Graph, b: &Bindings) -> Result<(), InterpError> {
    let mut kinds: HashMap<&str, &'static str> = HashMap::new();
    for n in graph.nodes() {
        match graph.op(n) {
            Op::Input { name, kind, .. } => {
                let k = match kind {
                    InputKind::Data => "input",
                    InputKind::State => "state",
                };
                kinds.insert(name, k);
            }
            Op::Param { name, .. } => {
                kinds.insert(name, "param");
            }
            Op::Const { .. }
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
            | Op::CausalConv1d
            | Op::SelectiveScan
            | Op::SsdScan { .. }
            | Op::CausalConv1dGrad
            | Op::SelectiveScanGrad
            | Op::SsdScanGrad { .. }
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyGrad { .. } => {}
        }
    }
    for (kind, map) in [
        ("input", &b.inputs),
        ("state", &b.states),
        ("param", &b.params),
    ] {
        // Sorted, so the error does not depend on hash order.
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let actual = kinds.get(name.as_str()).copied();
            if actual != Some(kind) {
                return Err(InterpError::Unknown {
                    kind,
                    name: name.clone(),
                    actual,
                });
            }
            let a = &map[name];
            let expected = a
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if expected != Some(a.data.len()) {
                return Err(InterpError::MalformedArray {
                    kind,
                    name: name.clone(),
                    shape: a.shape.clone(),
                    expected: expected.unwrap_or(usize::MAX),
                    found: a.data.len(),
                });
            }
        }
    }
    Ok(())
}

type Symbols = BTreeMap<String, u64>;

/// One axis of an input to unify: `dim` must equal `found`.
struct Pending<'g> {
    node: NodeId,
    kind: &'static str,
    name: &'g str,
    declared: &'g [Dim],
    found: &'g [usize],
    axis: usize,
}

/// Binds the symbols from the data and state inputs' shapes (see the module doc).
fn bind_symbols(graph: &Graph, b: &Bindings) -> Result<Symbols, InterpError> {
    let mut pending: Vec<Pending<'_>> = Vec::new();
    for n in graph.nodes() {
        let Op::Input { name, kind, ty } = graph.op(n) else {
            continue;
        };
        let (k, given) = match kind {
            InputKind::Data => ("input", b.inputs.get(name)),
            InputKind::State => ("state", b.states.get(name)),
        };
        let Some(a) = given else {
            if *kind == InputKind::Data {
                return Err(InterpError::Missing {
                    node: n,
                    kind: "input",
                    name: name.clone(),
                });
            }
            continue;
        };
        if a.shape.len() != ty.shape.len() {
            return Err(InterpError::InputShape {
                node: n,
                kind: k,
                name: name.clone(),
                found: a.shape.clone(),
                expected: shape_to_string(&ty.shape),
                bound: vec![],
            });
        }
        for axis in 0..a.shape.len() {
            pending.push(Pending {
                node: n,
                kind: k,
                name,
                declared: &ty.shape,
                found: &a.shape,
                axis,
            });
        }
    }

    let mut bind = Symbols::new();
    loop {
        let before = pending.len();
        let mut rest = Vec::new();
        for p in pending {
            let dim = &p.declared[p.axis];
            let found = p.found[p.axis] as u64;
            let mismatch = |bind: &Symbols| {
                let mut bound: Vec<(String, u64)> = Vec::new();
                for d in p.declared {
                    for s in d.syms() {
                        if let Some(v) = bind.get(s)
                            && !bound.iter().any(|(x, _)| x == s)
                        {
                            bound.push((s.clone(), *v));
                        }
                    }
                }
                InterpError::InputShape {
                    node: p.node,
                    kind: p.kind,
                    name: p.name.to_string(),
                    found: p.found.to_vec(),
                    expected: shape_to_string(p.declared),
                    bound,
                }
            };
            let mut unknown: Vec<&String> = dim
                .syms()
                .iter()
                .filter(|s| !bind.contains_key(*s))
                .collect();
            // The product of the coefficient and the bound symbols.
            let known = dim
                .syms()
                .iter()
                .filter_map(|s| bind.get(s))
                .try_fold(dim.coeff(), |acc, v| acc.checked_mul(*v));
            let Some(known) = known else {
                return Err(mismatch(&bind));
            };
            match unknown.len() {
                0 => {
                    if known != found {
                        return Err(mismatch(&bind));
                    }
                }
                1 if known != 0 => {
                    if !found.is_multiple_of(known) {
                        return Err(mismatch(&bind));
                    }
                    if let Some(s) = unknown.pop() {
                        bind.insert(s.clone(), found / known);
                    }
                }
                _ => rest.push(p), // `B*L` with both unknown, `L*L`: maybe later
            }
        }
        pending = rest;
        if pending.is_empty() {
            return Ok(bind);
        }
        if pending.len() == before {
            let p = &pending[0];
            return Err(InterpError::Unresolved {
                node: p.node,
                kind: p.kind,
                name: p.name.to_string(),
                axis: p.axis,
                dim: p.declared[p.axis].to_string(),
                found: p.found.to_vec(),
            });
        }
    }
}

enum ShapeError {
    Unbound(String),
    Overflow(String),
}

impl ShapeError {
    fn at(self, node: NodeId, op: &Op) -> InterpError {
        match self {
            ShapeError::Unbound(symbol) => InterpError::UnboundSymbol {
                node,
                op: op.name(),
                symbol,
            },
            ShapeError::Overflow(dim) => InterpError::Op {
                node,
                op: op.name(),
                problem: format!("dim {dim} overflows"),
            },
        }
    }
}

fn eval_shape(shape: &[Dim], bind: &Symbols) -> Result<Vec<usize>, ShapeError> {
    let mut out = Vec::with_capacity(shape.len());
    for d in shape {
        if let Some(s) = d.syms().iter().find(|s| !bind.contains_key(*s)) {
            return Err(ShapeError::Unbound(s.clone()));
        }
        let v = d
            .eval(&|s| bind.get(s).copied())
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| ShapeError::Overflow(d.to_string()))?;
        out.push(v);
    }
    Ok(out)
}

/// Why an op failed on its operands.
enum Fail {
    Problem(String),
    Id {
        position: Vec<usize>,
        value: f64,
        vocab: usize,
    },
}

type OpResult<T> = Result<T, Fail>;

fn fail<T>(msg: String) -> OpResult<T> {
    Err(Fail::Problem(msg))
}

/// Evaluates node `n` on its operand values.
fn eval_node<'a>(
    graph: &Graph,
    n: NodeId,
    args: &[&Array],
    b: &'a Bindings,
    bind: &Symbols,
) -> Result<Vec<Cow<'a, Array>>, InterpError> {
    let op = graph.op(n);
    let arity_ok = match op.arity() {
        Some(k) => args.len() == k,
        None => !args.is_empty(),
    };
    if !arity_ok {
        return Err(internal(graph, n, format!("{} operands", args.len())));
    }
    let owned = |r: OpResult<Array>| r.map(|a| vec![Cow::Owned(a)]);
    let res: OpResult<Vec<Cow<'a, Array>>> = match op {
        Op::Input { name, kind, ty } => {
            let shape = eval_shape(&ty.shape, bind).map_err(|e| e.at(n, op))?;
            let given = match kind {
                InputKind::Data => b.inputs.get(name),
                InputKind::State => b.states.get(name),
            };
            match (given, kind) {
                (Some(a), _) => Ok(vec![Cow::Borrowed(a)]),
                (None, InputKind::State) => Ok(vec![Cow::Owned(Array::zeros(shape))]),
                (None, InputKind::Data) => {
                    return Err(InterpError::Missing {
                        node: n,
                        kind: "input",
                        name: name.clone(),
                    });
                }
            }
        }
        Op::Param { name, ty, .. } => {
            let shape = eval_shape(&ty.shape, bind).map_err(|e| e.at(n, op))?;
            let Some(a) = b.params.get(name) else {
                return Err(InterpError::Missing {
                    node: n,
                    kind: "param",
                    name: name.clone(),
                });
            };
            if a.shape != shape {
                return Err(InterpError::ParamShape {
                    node: n,
                    name: name.clone(),
                    expected: shape,
                    found: a.shape.clone(),
                });
            }
            Ok(vec![Cow::Borrowed(a)])
        }
        Op::Const { value, .. } => owned(Ok(Array::scalar(*value))),
        Op::Unary(u) => owned(Ok(map(args[0], |x| unary(*u, x)))),
        Op::Binary(o) => owned(binary(*o, args[0], args[1])),
        Op::Cast { to } => owned(Ok(map(args[0], |x| round_to(*to, x)))),
        Op::Reduce { op: r, axes } => owned(reduce(*r, args[0], axes)),
        Op::MatMul { rhs_t } => owned(matmul(args[0], args[1], *rhs_t)),
        Op::Reshape { shape } => {
            let shape = eval_shape(shape, bind).map_err(|e| e.at(n, op))?;
            owned(reshape(args[0], shape))
        }
        Op::Permute { perm } => owned(permute(args[0], perm)),
        Op::Broadcast { shape } => {
            let shape = eval_shape(shape, bind).map_err(|e| e.at(n, op))?;
            owned(broadcast(args[0], &shape))
        }
        Op::Slice { axis, start, len } => owned(slice(args[0], *axis, *start, *len)),
        Op::Concat { axis } => owned(concat(args, *axis)),
        Op::Gather => owned(gather(args[0], args[1])),
        Op::CausalConv1d => causal_conv1d(args[0], args[1], args[2], args[3])
            .map(|(y, s)| vec![Cow::Owned(y), Cow::Owned(s)]),
        Op::SelectiveScan => selective_scan(args[0], args[1], args[2], args[3], args[4], args[5])
            .map(|(y, s)| vec![Cow::Owned(y), Cow::Owned(s)]),
        Op::SsdScan { .. } => ssd_scan(args[0], args[1], args[2], args[3], args[4], args[5])
            .map(|(y, s)| vec![Cow::Owned(y), Cow::Owned(s)]),
        Op::CausalConv1dGrad => {
            causal_conv1d_grad(args[0], args[1], args[2], args[3], args[4], args[5]).map(owned_all)
        }
        Op::SelectiveScanGrad => selective_scan_grad(args).map(owned_all),
        Op::SsdScanGrad { .. } => ssd_scan_grad(args).map(owned_all),
        Op::CrossEntropy { ignore_index } => cross_entropy(args[0], args[1], *ignore_index)
            .map(|(loss, valid)| vec![Cow::Owned(loss), Cow::Owned(valid)]),
        Op::CrossEntropyGrad { ignore_index } => {
            owned(cross_entropy_grad(args[0], args[1], args[2], *ignore_index))
        }
    };
    res.map_err(|f| match f {
        Fail::Problem(problem) => InterpError::Op {
            node: n,
            op: op.name(),
            problem,
        },
        Fail::Id {
            position,
            value,
            vocab,
        } => InterpError::IdOutOfRange {
            node: n,
            op: op.name(),
            position,
            value,
            vocab,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Shape checks and indexing helpers

fn numel(shape: &[usize]) -> OpResult<usize> {
    match shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) {
        Some(n) => Ok(n),
        None => fail(format!("shape {} overflows", fmt_shape(shape))),
    }
}

/// The dims of `a`, which must have rank `R`.
fn dims<const R: usize>(name: &str, a: &Array) -> OpResult<[usize; R]> {
    match <[usize; R]>::try_from(a.shape.as_slice()) {
        Ok(d) => Ok(d),
        Err(_) => fail(format!(
            "operand `{name}` must have rank {R}, found {}",
            fmt_shape(&a.shape)
        )),
    }
}

fn expect_shape(name: &str, a: &Array, want: &[usize]) -> OpResult<()> {
    if a.shape == want {
        Ok(())
    } else {
        fail(format!(
            "operand `{name}` has shape {}, expected {}",
            fmt_shape(&a.shape),
            fmt_shape(want)
        ))
    }
}

/// The multi-index of the row-major flat index `i` in `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for ax in (0..shape.len()).rev() {
        if shape[ax] > 0 {
            idx[ax] = i % shape[ax];
            i /= shape[ax];
        }
    }
    idx
}

/// The elements `src[offset + sum_ax idx[ax] * strides[ax]]` for every multi-index `idx` of
/// `shape`, in row-major order. Callers guarantee that every such position is in `src`.
fn strided(src: &[f64], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    let mut pos = offset;
    for _ in 0..n {
        out.push(src[pos]);
        // Advance the multi-index like an odometer, keeping `pos` in step.
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            pos += strides[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            pos -= strides[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
    out
}

fn owned_all<'a>(xs: Vec<Array>) -> Vec<Cow<'a, Array>> {
    xs.into_iter().map(Cow::Owned).collect()
}

fn map(a: &Array, f: impl Fn(f64) -> f64) -> Array {
    Array::new(a.shape.clone(), a.data.iter().map(|&x| f(x)).collect())
}

// ---------------------------------------------------------------------------------------------
// Elementwise

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Softplus => {
            if x > 20.0 {
                x
            } else {
                x.exp().ln_1p()
            }
        }
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Sigmoid => sigmoid(x),
    }
}

/// `max`/`min` that return NaN when either operand is NaN.
fn nan_or(x: f64, y: f64, pick: f64) -> f64 {
    if x.is_nan() || y.is_nan() {
        f64::NAN
    } else {
        pick
    }
}

fn binary(op: BinaryOp, l: &Array, r: &Array) -> OpResult<Array> {
    if l.shape != r.shape {
        return fail(format!(
            "operand shapes differ: {} vs {}",
            fmt_shape(&l.shape),
            fmt_shape(&r.shape)
        ));
    }
    let f = |x: f64, y: f64| match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max => nan_or(x, y, if x >= y { x } else { y }),
        BinaryOp::Min => nan_or(x, y, if x <= y { x } else { y }),
    };
    let data = l.data.iter().zip(&r.data).map(|(&x, &y)| f(x, y)).collect();
    Ok(Array::new(l.shape.clone(), data))
}

// ---------------------------------------------------------------------------------------------
// Reductions and matmul

fn reduce(op: ReduceOp, x: &Array, axes: &[usize]) -> OpResult<Array> {
    let mut shape = x.shape.clone();
    let mut count = 1usize;
    for (i, &a) in axes.iter().enumerate() {
        if a >= shape.len() || axes[..i].contains(&a) {
            return fail(format!(
                "axes {axes:?} do not name distinct axes of {}",
                fmt_shape(&x.shape)
            ));
        }
        count = count.saturating_mul(x.shape[a]);
        shape[a] = 1;
    }
    // Position of each input element in the output: reduced axes do not move it.
    let mut ostr = strides(&shape);
    for &a in axes {
        ostr[a] = 0;
    }
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
    };
    let mut out = vec![init; numel(&shape)?];
    let mut idx = vec![0usize; x.shape.len()];
    let mut pos = 0usize;
    for &v in &x.data {
        let acc = &mut out[pos];
        match op {
            ReduceOp::Sum | ReduceOp::Mean => *acc += v,
            ReduceOp::Max => {
                if v > *acc || v.is_nan() {
                    *acc = v;
                }
            }
        }
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            pos += ostr[ax];
            if idx[ax] < x.shape[ax] {
                break;
            }
            pos -= ostr[ax] * x.shape[ax];
            idx[ax] = 0;
        }
    }
    if op == ReduceOp::Mean {
        let c = count as f64;
        for v in &mut out {
            *v /= c;
        }
    }
    Ok(Array::new(shape, out))
}

fn matmul(l: &Array, r: &Array, rhs_t: bool) -> OpResult<Array> {
    let lr = l.shape.len();
    let rr = r.shape.len();
    if lr < 2 || (rr != 2 && rr != lr) {
        return fail(format!(
            "cannot multiply {} by {}",
            fmt_shape(&l.shape),
            fmt_shape(&r.shape)
        ));
    }
    let (m, k) = (l.shape[lr - 2], l.shape[lr - 1]);
    let (rk, n) = if rhs_t {
        (r.shape[rr - 1], r.shape[rr - 2])
    } else {
        (r.shape[rr - 2], r.shape[rr - 1])
    };
    let batch_dims = &l.shape[..lr - 2];
    if rk != k || (rr == lr && r.shape[..rr - 2] != *batch_dims) {
        return fail(format!(
            "cannot multiply {} by {}{}",
            fmt_shape(&l.shape),
            fmt_shape(&r.shape),
            if rhs_t { " (transposed)" } else { "" }
        ));
    }
    let batch = numel(batch_dims)?;
    let r_batched = rr == lr;
    let mut out_shape = l.shape.clone();
    out_shape[lr - 1] = n;
    let mut out = Vec::with_capacity(numel(&out_shape)?);
    for bi in 0..batch {
        let lb = &l.data[bi * m * k..][..m * k];
        let rb = if r_batched {
            &r.data[bi * k * n..][..k * n]
        } else {
            &r.data[..k * n]
        };
        // The rhs as rows of K: `rt[j*k + kk]` is element (kk, j).
        let rt: Cow<'_, [f64]> = if rhs_t {
            Cow::Borrowed(rb)
        } else {
            Cow::Owned(strided(rb, 0, &[n, k], &[1, n]))
        };
        for i in 0..m {
            let row = &lb[i * k..][..k];
            for j in 0..n {
                let col = &rt[j * k..][..k];
                let mut acc = 0.0;
                for (a, c) in row.iter().zip(col) {
                    acc += a * c;
                }
                out.push(acc);
            }
        }
    }
    Ok(Array::new(out_shape, out))
}

// ---------------------------------------------------------------------------------------------
// Layout

fn reshape(x: &Array, shape: Vec<usize>) -> OpResult<Array> {
    if numel(&shape)? != x.data.len() {
        return fail(format!(
            "cannot reshape {} into {}",
            fmt_shape(&x.shape),
            fmt_shape(&shape)
        ));
    }
    Ok(Array::new(shape, x.data.clone()))
}

fn permute(x: &Array, perm: &[usize]) -> OpResult<Array> {
    let r = x.shape.len();
    let mut seen = vec![false; r];
    for &p in perm {
        if p >= r || std::mem::replace(&mut seen[p], true) {
            return fail(format!("{perm:?} is not a permutation of {r} axes"));
        }
    }
    if perm.len() != r {
        return fail(format!("{perm:?} is not a permutation of {r} axes"));
    }
    let src = x.strides();
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let st: Vec<usize> = perm.iter().map(|&p| src[p]).collect();
    Ok(Array::new(shape.clone(), strided(&x.data, 0, &shape, &st)))
}

fn broadcast(x: &Array, shape: &[usize]) -> OpResult<Array> {
    if x.shape.len() > shape.len() {
        return fail(format!(
            "cannot broadcast {} to {}",
            fmt_shape(&x.shape),
            fmt_shape(shape)
        ));
    }
    let off = shape.len() - x.shape.len();
    let src = x.strides();
    let mut st = vec![0usize; shape.len()];
    for (i, &d) in x.shape.iter().enumerate() {
        if d == shape[off + i] {
            st[off + i] = src[i];
        } else if d != 1 {
            return fail(format!(
                "cannot broadcast {} to {}",
                fmt_shape(&x.shape),
                fmt_shape(shape)
            ));
        }
    }
    Ok(Array::new(shape.to_vec(), strided(&x.data, 0, shape, &st)))
}

fn slice(x: &Array, axis: usize, start: u64, len: u64) -> OpResult<Array> {
    let (start, len) = (start as usize, len as usize);
    match x.shape.get(axis) {
        Some(&size) if start.checked_add(len).is_some_and(|end| end <= size) => {}
        _ => {
            return fail(format!(
                "range {start}..+{len} along axis {axis} is outside {}",
                fmt_shape(&x.shape)
            ));
        }
    }
    let mut shape = x.shape.clone();
    shape[axis] = len;
    let st = x.strides();
    Ok(Array::new(
        shape.clone(),
        strided(&x.data, start * st[axis], &shape, &st),
    ))
}

fn concat(xs: &[&Array], axis: usize) -> OpResult<Array> {
    let Some(first) = xs.first() else {
        return fail("no operands".into());
    };
    let mut shape = first.shape.clone();
    if axis >= shape.len() {
        return fail(format!(
            "axis {axis} is out of range for {}",
            fmt_shape(&shape)
        ));
    }
    shape[axis] = 0;
    for x in xs {
        let same = x.shape.len() == shape.len()
            && (0..shape.len()).all(|ax| ax == axis || x.shape[ax] == first.shape[ax]);
        if !same {
            return fail(format!(
                "cannot concatenate {} and {} along axis {axis}",
                fmt_shape(&first.shape),
                fmt_shape(&x.shape)
            ));
        }
        shape[axis] += x.shape[axis];
    }
    let outer = numel(&shape[..axis])?;
    let inner = numel(&shape[axis + 1..])?;
    let mut out = Vec::with_capacity(numel(&shape)?);
    for o in 0..outer {
        for x in xs {
            let chunk = x.shape[axis] * inner;
            out.extend_from_slice(&x.data[o * chunk..][..chunk]);
        }
    }
    Ok(Array::new(shape, out))
}

fn gather(table: &Array, ids: &Array) -> OpResult<Array> {
    let [v, d] = dims::<2>("table", table)?;
    let mut shape = ids.shape.clone();
    shape.push(d);
    let mut out = Vec::with_capacity(numel(&shape)?);
    for (i, &id) in ids.data.iter().enumerate() {
        if !(id >= 0.0 && id < v as f64 && id.fract() == 0.0) {
            return Err(Fail::Id {
                position: unravel(i, &ids.shape),
                value: id,
                vocab: v,
            });
        }
        let row = id as usize;
        out.extend_from_slice(&table.data[row * d..][..d]);
    }
    Ok(Array::new(shape, out))
}

// ---------------------------------------------------------------------------------------------
// The stateful ops

fn causal_conv1d(x: &Array, w: &Array, bias: &Array, s0: &Array) -> OpResult<(Array, Array)> {
    let [bn, l, c] = dims::<3>("x", x)?;
    let [_, k] = dims::<2>("weight", w)?;
    if k == 0 {
        return fail("kernel width must be at least 1".into());
    }
    let km1 = k - 1;
    expect_shape("weight", w, &[c, k])?;
    expect_shape("bias", bias, &[c])?;
    expect_shape("state", s0, &[bn, c, km1])?;
    // `xx(b, tau, ch)`: the sequence [s0 ; x] along time, `tau` in 0..K-1+L.
    let xx = |b: usize, tau: usize, ch: usize| {
        if tau < km1 {
            s0.data[(b * c + ch) * km1 + tau]
        } else {
            x.data[(b * l + tau - km1) * c + ch]
        }
    };
    let mut y = vec![0.0; bn * l * c];
    let mut s1 = vec![0.0; bn * c * km1];
    for b in 0..bn {
        for t in 0..l {
            for ch in 0..c {
                let mut acc = bias.data[ch];
                for j in 0..k {
                    acc += w.data[ch * k + j] * xx(b, t + j, ch);
                }
                y[(b * l + t) * c + ch] = acc;
            }
        }
        for ch in 0..c {
            for j in 0..km1 {
                s1[(b * c + ch) * km1 + j] = xx(b, l + j, ch);
            }
        }
    }
    Ok((
        Array::new(vec![bn, l, c], y),
        Array::new(vec![bn, c, km1], s1),
    ))
}

fn selective_scan(
    x: &Array,
    dt: &Array,
    a: &Array,
    bm: &Array,
    cm: &Array,
    h0: &Array,
) -> OpResult<(Array, Array)> {
    let [bn, l, e] = dims::<3>("x", x)?;
    let [_, n] = dims::<2>("A", a)?;
    expect_shape("dt", dt, &[bn, l, e])?;
    expect_shape("A", a, &[e, n])?;
    expect_shape("B", bm, &[bn, l, n])?;
    expect_shape("C", cm, &[bn, l, n])?;
    expect_shape("state", h0, &[bn, e, n])?;
    let mut y = vec![0.0; bn * l * e];
    let mut h1 = h0.data.clone();
    for b in 0..bn {
        for ei in 0..e {
            let h = &mut h1[(b * e + ei) * n..][..n];
            let arow = &a.data[ei * n..][..n];
            for t in 0..l {
                let bt = (b * l + t) * n;
                let (bv, cv) = (&bm.data[bt..][..n], &cm.data[bt..][..n]);
                let d = dt.data[(b * l + t) * e + ei];
                let dx = d * x.data[(b * l + t) * e + ei];
                let mut acc = 0.0;
                for j in 0..n {
                    h[j] = (d * arow[j]).exp() * h[j] + dx * bv[j];
                    acc += h[j] * cv[j];
                }
                y[(b * l + t) * e + ei] = acc;
            }
        }
    }
    Ok((
        Array::new(vec![bn, l, e], y),
        Array::new(vec![bn, e, n], h1),
    ))
}

fn ssd_scan(
    x: &Array,
    dt: &Array,
    a: &Array,
    bm: &Array,
    cm: &Array,
    s0: &Array,
) -> OpResult<(Array, Array)> {
    let [bn, l, hn, p] = dims::<4>("x", x)?;
    let [_, _, g, n] = dims::<4>("B", bm)?;
    expect_shape("dt", dt, &[bn, l, hn])?;
    expect_shape("A", a, &[hn])?;
    expect_shape("B", bm, &[bn, l, g, n])?;
    expect_shape("C", cm, &[bn, l, g, n])?;
    expect_shape("state", s0, &[bn, hn, p, n])?;
    if g == 0 || hn % g != 0 {
        return fail(format!("heads ({hn}) must be a multiple of groups ({g})"));
    }
    let heads_per_group = hn / g;
    let mut y = vec![0.0; bn * l * hn * p];
    let mut s1 = s0.data.clone();
    for b in 0..bn {
        for h in 0..hn {
            let gi = h / heads_per_group;
            for t in 0..l {
                let d = dt.data[(b * l + t) * hn + h];
                let decay = (d * a.data[h]).exp();
                let bt = ((b * l + t) * g + gi) * n;
                let (bv, cv) = (&bm.data[bt..][..n], &cm.data[bt..][..n]);
                for pi in 0..p {
                    let xi = ((b * l + t) * hn + h) * p + pi;
                    let dx = d * x.data[xi];
                    let s = &mut s1[((b * hn + h) * p + pi) * n..][..n];
                    let mut acc = 0.0;
                    for j in 0..n {
                        s[j] = decay * s[j] + dx * bv[j];
                        acc += s[j] * cv[j];
                    }
                    y[xi] = acc;
                }
            }
        }
    }
    Ok((
        Array::new(vec![bn, l, hn, p], y),
        Array::new(vec![bn, hn, p, n], s1),
    ))
}

// ---------------------------------------------------------------------------------------------
// Backward ops (vector-Jacobian products of the stateful ops)

fn causal_conv1d_grad(
    x: &Array,
    w: &Array,
    bias: &Array,
    s0: &Array,
    dy: &Array,
    ds1: &Array,
) -> OpResult<Vec<Array>> {
    let [bn, l, c] = dims::<3>("x", x)?;
    let [_, k] = dims::<2>("weight", w)?;
    if k == 0 {
        return fail("kernel width must be at least 1".into());
    }
    let km1 = k - 1;
    expect_shape("weight", w, &[c, k])?;
    expect_shape("bias", bias, &[c])?;
    expect_shape("state", s0, &[bn, c, km1])?;
    expect_shape("dy", dy, &[bn, l, c])?;
    expect_shape("dstate", ds1, &[bn, c, km1])?;
    let xx = |b: usize, tau: usize, ch: usize| {
        if tau < km1 {
            s0.data[(b * c + ch) * km1 + tau]
        } else {
            x.data[(b * l + tau - km1) * c + ch]
        }
    };
    let mut dx = vec![0.0; bn * l * c];
    let mut dw = vec![0.0; c * k];
    let mut db = vec![0.0; c];
    let mut ds0 = vec![0.0; bn * c * km1];
    // `dxx[tau]`: the cotangent of `[s0 ; x]` at time `tau` for one (batch, channel).
    let mut dxx = vec![0.0; km1 + l];
    for b in 0..bn {
        for ch in 0..c {
            dxx.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..km1 {
                dxx[l + j] += ds1.data[(b * c + ch) * km1 + j];
            }
            for t in 0..l {
                let g = dy.data[(b * l + t) * c + ch];
                db[ch] += g;
                for j in 0..k {
                    dw[ch * k + j] += g * xx(b, t + j, ch);
                    dxx[t + j] += w.data[ch * k + j] * g;
                }
            }
            for (tau, &v) in dxx.iter().enumerate() {
                if tau < km1 {
                    ds0[(b * c + ch) * km1 + tau] = v;
                } else {
                    dx[(b * l + tau - km1) * c + ch] = v;
                }
            }
        }
    }
    Ok(vec![
        Array::new(vec![bn, l, c], dx),
        Array::new(vec![c, k], dw),
        Array::new(vec![c], db),
        Array::new(vec![bn, c, km1], ds0),
    ])
}

/// `args`: `x [B,L,E], dt [B,L,E], A [E,N], Bm [B,L,N], Cm [B,L,N], h0 [B,E,N], dy, dh1`.
fn selective_scan_grad(args: &[&Array]) -> OpResult<Vec<Array>> {
    let &[x, dt, a, bm, cm, h0, dy, dh1] = args else {
        return fail(format!("{} operands, expected 8", args.len()));
    };
    let [bn, l, e] = dims::<3>("x", x)?;
    let [_, n] = dims::<2>("A", a)?;
    expect_shape("dt", dt, &[bn, l, e])?;
    expect_shape("A", a, &[e, n])?;
    expect_shape("B", bm, &[bn, l, n])?;
    expect_shape("C", cm, &[bn, l, n])?;
    expect_shape("state", h0, &[bn, e, n])?;
    expect_shape("dy", dy, &[bn, l, e])?;
    expect_shape("dstate", dh1, &[bn, e, n])?;
    let mut dx = vec![0.0; bn * l * e];
    let mut ddt = vec![0.0; bn * l * e];
    let mut da = vec![0.0; e * n];
    let mut dbm = vec![0.0; bn * l * n];
    let mut dcm = vec![0.0; bn * l * n];
    let mut dh0 = vec![0.0; bn * e * n];
    // `hs[(t+1)*n + j]` is `h_t[j]`; `hs[j]` is `h0`.
    let mut hs = vec![0.0; (l + 1) * n];
    for b in 0..bn {
        for ei in 0..e {
            let arow = &a.data[ei * n..][..n];
            let row = (b * e + ei) * n;
            hs[..n].copy_from_slice(&h0.data[row..][..n]);
            for t in 0..l {
                let bt = (b * l + t) * n;
                let at = (b * l + t) * e + ei;
                let (d, u) = (dt.data[at], dt.data[at] * x.data[at]);
                for j in 0..n {
                    hs[(t + 1) * n + j] = (d * arow[j]).exp() * hs[t * n + j] + u * bm.data[bt + j];
                }
            }
            let mut g = dh1.data[row..][..n].to_vec();
            for t in (0..l).rev() {
                let bt = (b * l + t) * n;
                let at = (b * l + t) * e + ei;
                let (d, xv, gy) = (dt.data[at], x.data[at], dy.data[at]);
                let (h, hprev) = (&hs[(t + 1) * n..][..n], &hs[t * n..][..n]);
                let mut du = 0.0;
                let mut ddt_decay = 0.0;
                for j in 0..n {
                    g[j] += cm.data[bt + j] * gy;
                    dcm[bt + j] += h[j] * gy;
                    dbm[bt + j] += d * xv * g[j];
                    du += g[j] * bm.data[bt + j];
                    let decay = (d * arow[j]).exp();
                    ddt_decay += g[j] * decay * arow[j] * hprev[j];
                    da[ei * n + j] += g[j] * decay * d * hprev[j];
                    g[j] *= decay;
                }
                dx[at] = d * du;
                ddt[at] = xv * du + ddt_decay;
            }
            dh0[row..][..n].copy_from_slice(&g);
        }
    }
    Ok(vec![
        Array::new(vec![bn, l, e], dx),
        Array::new(vec![bn, l, e], ddt),
        Array::new(vec![e, n], da),
        Array::new(vec![bn, l, n], dbm),
        Array::new(vec![bn, l, n], dcm),
        Array::new(vec![bn, e, n], dh0),
    ])
}

/// `args`: `x [B,L,H,P], dt [B,L,H], A [H], Bm [B,L,G,N], Cm [B,L,G,N], s0 [B,H,P,N], dy,
/// ds1`.
fn ssd_scan_grad(args: &[&Array]) -> OpResult<Vec<Array>> {
    let &[x, dt, a, bm, cm, s0, dy, ds1] = args else {
        return fail(format!("{} operands, expected 8", args.len()));
    };
    let [bn, l, hn, p] = dims::<4>("x", x)?;
    let [_, _, g, n] = dims::<4>("B", bm)?;
    expect_shape("dt", dt, &[bn, l, hn])?;
    expect_shape("A", a, &[hn])?;
    expect_shape("B", bm, &[bn, l, g, n])?;
    expect_shape("C", cm, &[bn, l, g, n])?;
    expect_shape("state", s0, &[bn, hn, p, n])?;
    expect_shape("dy", dy, &[bn, l, hn, p])?;
    expect_shape("dstate", ds1, &[bn, hn, p, n])?;
    if g == 0 || hn % g != 0 {
        return fail(format!("heads ({hn}) must be a multiple of groups ({g})"));
    }
    let heads_per_group = hn / g;
    let mut dx = vec![0.0; bn * l * hn * p];
    let mut ddt = vec![0.0; bn * l * hn];
    let mut da = vec![0.0; hn];
    let mut dbm = vec![0.0; bn * l * g * n];
    let mut dcm = vec![0.0; bn * l * g * n];
    let mut ds0 = vec![0.0; bn * hn * p * n];
    // One state row (fixed b, h, p) through time: `hs[(t+1)*n + j]`, `hs[j]` from `s0`.
    let mut hs = vec![0.0; (l + 1) * n];
    for b in 0..bn {
        for (h, da_h) in da.iter_mut().enumerate() {
            let gi = h / heads_per_group;
            let ah = a.data[h];
            for pi in 0..p {
                let row = ((b * hn + h) * p + pi) * n;
                hs[..n].copy_from_slice(&s0.data[row..][..n]);
                for t in 0..l {
                    let d = dt.data[(b * l + t) * hn + h];
                    let decay = (d * ah).exp();
                    let bt = ((b * l + t) * g + gi) * n;
                    let u = d * x.data[((b * l + t) * hn + h) * p + pi];
                    for j in 0..n {
                        hs[(t + 1) * n + j] = decay * hs[t * n + j] + u * bm.data[bt + j];
                    }
                }
                let mut gs = ds1.data[row..][..n].to_vec();
                for t in (0..l).rev() {
                    let ht = (b * l + t) * hn + h;
                    let xi = ht * p + pi;
                    let d = dt.data[ht];
                    let decay = (d * ah).exp();
                    let bt = ((b * l + t) * g + gi) * n;
                    let (xv, gy) = (x.data[xi], dy.data[xi]);
                    let (st, sprev) = (&hs[(t + 1) * n..][..n], &hs[t * n..][..n]);
                    let mut du = 0.0;
                    let mut gs_sprev = 0.0;
                    for j in 0..n {
                        gs[j] += cm.data[bt + j] * gy;
                        dcm[bt + j] += st[j] * gy;
                        dbm[bt + j] += d * xv * gs[j];
                        du += gs[j] * bm.data[bt + j];
                        gs_sprev += gs[j] * sprev[j];
                        gs[j] *= decay;
                    }
                    dx[xi] = d * du;
                    ddt[ht] += xv * du + decay * ah * gs_sprev;
                    *da_h += decay * d * gs_sprev;
                }
                ds0[row..][..n].copy_from_slice(&gs);
            }
        }
    }
    Ok(vec![
        Array::new(vec![bn, l, hn, p], dx),
        Array::new(vec![bn, l, hn], ddt),
        Array::new(vec![hn], da),
        Array::new(vec![bn, l, g, n], dbm),
        Array::new(vec![bn, l, g, n], dcm),
        Array::new(vec![bn, hn, p, n], ds0),
    ])
}

// ---------------------------------------------------------------------------------------------
// The loss

/// Checks `logits [..., V]` against `targets [...]`; returns `(positions, V)`.
fn loss_dims(logits: &Array, targets: &Array) -> OpResult<(usize, usize)> {
    let Some((&v, outer)) = logits.shape.split_last() else {
        return fail("operand `logits` must have rank at least 1, found []".into());
    };
    expect_shape("targets", targets, outer)?;
    Ok((targets.data.len(), v))
}

/// The class of position `i`, `None` where it is ignored.
fn target(targets: &Array, i: usize, v: usize, ignore_index: i64) -> OpResult<Option<usize>> {
    let id = targets.data[i];
    if id == ignore_index as f64 {
        return Ok(None);
    }
    if !(id >= 0.0 && id < v as f64 && id.fract() == 0.0) {
        return Err(Fail::Id {
            position: unravel(i, &targets.shape),
            value: id,
            vocab: v,
        });
    }
    Ok(Some(id as usize))
}

/// `max(row)` and `log(sum(exp(row - max)))`, so that `logsumexp = max + lse`.
fn log_sum_exp(row: &[f64]) -> (f64, f64) {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z));
    let m = if m.is_finite() { m } else { 0.0 };
    let s: f64 = row.iter().map(|&z| (z - m).exp()).sum();
    (m, s.ln())
}

fn cross_entropy(logits: &Array, targets: &Array, ignore_index: i64) -> OpResult<(Array, Array)> {
    let (rows, v) = loss_dims(logits, targets)?;
    let mut loss = vec![0.0; rows];
    let mut valid = vec![0.0; rows];
    for i in 0..rows {
        let Some(t) = target(targets, i, v, ignore_index)? else {
            continue;
        };
        let row = &logits.data[i * v..][..v];
        let (m, lse) = log_sum_exp(row);
        loss[i] = (m - row[t]) + lse;
        valid[i] = 1.0;
    }
    Ok((
        Array::new(targets.shape.clone(), loss),
        Array::new(targets.shape.clone(), valid),
    ))
}

fn cross_entropy_grad(
    logits: &Array,
    targets: &Array,
    dloss: &Array,
    ignore_index: i64,
) -> OpResult<Array> {
    let (rows, v) = loss_dims(logits, targets)?;
    expect_shape("dloss", dloss, &targets.shape)?;
    let mut out = vec![0.0; logits.data.len()];
    for i in 0..rows {
        let Some(t) = target(targets, i, v, ignore_index)? else {
            continue;
        };
        let row = &logits.data[i * v..][..v];
        let (m, lse) = log_sum_exp(row);
        let g = dloss.data[i];
        for (j, o) in out[i * v..][..v].iter_mut().enumerate() {
            let p = (row[j] - m - lse).exp();
            *o = (p - if j == t { 1.0 } else { 0.0 }) * g;
        }
    }
    Ok(Array::new(logits.shape.clone(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_walks_row_major() {
        let src: Vec<f64> = (0..6).map(f64::from).collect();
        // Transpose of a [2, 3] matrix.
        assert_eq!(
            strided(&src, 0, &[3, 2], &[1, 3]),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        // Offset and a size-0 axis.
        assert_eq!(strided(&src, 2, &[2], &[3]), vec![2.0, 5.0]);
        assert!(strided(&src, 0, &[0, 3], &[3, 1]).is_empty());
        // Rank 0: one element.
        assert_eq!(strided(&src, 4, &[], &[]), vec![4.0]);
    }

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }

    #[test]
    fn softplus_and_sigmoid_are_stable() {
        assert_eq!(unary(UnaryOp::Softplus, 1000.0), 1000.0);
        assert_eq!(unary(UnaryOp::Softplus, -1000.0), 0.0);
        assert!((unary(UnaryOp::Softplus, 0.0) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(unary(UnaryOp::Sigmoid, -1000.0), 0.0);
        assert_eq!(unary(UnaryOp::Sigmoid, 1000.0), 1.0);
        assert_eq!(unary(UnaryOp::Silu, -1000.0), -0.0);
        assert!(unary(UnaryOp::Sigmoid, -30.0) > 0.0);
    }

    #[test]
    fn nan_wins_max_and_min() {
        let l = Array::new(vec![2], vec![f64::NAN, 1.0]);
        let r = Array::new(vec![2], vec![0.0, f64::NAN]);
        for op in [BinaryOp::Max, BinaryOp::Min] {
            let Ok(out) = binary(op, &l, &r) else {
                panic!("shapes are equal")
            };
            assert!(out.data.iter().all(|v| v.is_nan()));
        }
    }
}
