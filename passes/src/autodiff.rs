//! Reverse-mode automatic differentiation as a graph-to-graph pass.
//!
//! # API
//!
//! ```text
//! grad(&graph, loss) -> Result<Gradients, AdError>
//! training_graph(&forward, "logits", ignore_index) -> Result<Gradients, AdError>
//! training_graph_segment(&forward, "logits", ignore_index) -> Result<Gradients, AdError>
//! ```
//!
//! [`grad`] returns a new graph that holds the input graph's nodes (copied node by node, same
//! ids, spans and layers), then the backward nodes, and these outputs, in order: the original
//! outputs, `loss`, `grad.<name>` for every parameter (graph order) and `grad.<name>` for every
//! float initial state (`InputKind::State`, graph order). A parameter or state the loss does
//! not depend on gets a zero gradient. [`training_graph`] first appends a data input `targets`
//! and the mean next-token cross-entropy (`sum(loss per token) / sum(valid)`) of a logits
//! output, then calls [`grad`]. [`training_graph_segment`] builds the training graph of one
//! time segment: a summed loss and a data input `cotangent.<S>` per recurrent state `S`,
//! seeding the gradient of the final state `S` with the gradient flowing back from the
//! next segment.
//!
//! # How
//!
//! 1. *Activity.* A value is **varying** when it is a float value that depends
//!    differentiably on a parameter or a state input (integer values, `gather` ids,
//!    cross-entropy targets and its `valid` mask carry no gradient).
//! 2. *Backward sweep.* Nodes are visited in reverse id order. The gradient of a value is the
//!    sum of the contributions its users made, finalized when its producer is visited (all
//!    users have larger ids, so they are done). A node is differentiated only when one of its
//!    results received a contribution, and only towards its varying operands: exactly the
//!    nodes on a path from a parameter/state to the loss.
//! 3. *Accumulation.* Several contributions are added with `add`. The contributions of
//!    `slice`s of one value (the splits of a fused projection) are joined by one `concat`,
//!    with zero blocks in the gaps, instead of padding each slice to full size and adding.
//!
//! Provenance: every backward node gets the span and layer of the forward node whose
//! derivative it computes (the loss-building nodes of [`training_graph`] get the logits
//! node's).
//!
//! # Rules
//!
//! Elementwise derivatives are built from primitives and forward values (`exp' = y`,
//! `softplus' = sigmoid(x)`, `silu' = s (1 + x (1 - s))`, `rsqrt' = -y^3 / 2`, ...). `matmul`
//! gives `dlhs = g @ rhs^T` and `drhs = lhs^T @ g`, summed over the batch axes for a shared
//! 2-D `rhs` (by reshaping to `[M_total, K]`). Layout ops invert (inverse permutation, reshape
//! back, sums over broadcast axes, slices of a concat, zero-padded concat for a slice).
//! `gather`'s table gradient (a scatter-add) is `onehot(ids)^T @ g` with the one-hot built
//! exactly from `max`: `onehot[v, i] = max(0, 1 - |id_i - v|)` for integer ids, and
//! `v = 0..V` built by doubling concats. The stateful ops and the cross-entropy use their
//! gradient primitives (`*_grad`).
//!
//! Unsupported ([`AdError::Unsupported`], only when on a path to the loss): binary `max`/`min`
//! and `reduce_max` (routing needs a comparison; the IR has no compare/select op), the
//! gradient ops themselves (no second order), and parameters of symbolic shape in `gather`.

use ir::types::numel;
use ir::{
    BinaryOp, BuildError, DType, Dim, Graph, InputKind, NodeId, Op, ReduceOp, Shape, Span,
    TensorType, UnaryOp, Value,
};
use std::collections::HashMap;
use thiserror::Error;

/// A graph with its backward pass.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// The forward nodes, the backward nodes; outputs: the original ones, `loss`, `grad.*`.
    pub graph: Graph,
    /// The loss in `graph`.
    pub loss: Value,
    /// `(parameter name, its gradient in graph)`, in graph order.
    pub param_grads: Vec<(String, Value)>,
    /// `(state input name, its gradient in graph)`, in graph order.
    pub state_grads: Vec<(String, Value)>,
    /// `(data input name, its gradient in graph)` for the inputs differentiated on request
    /// ([`stage_training_graph`]'s boundary inputs), in graph order.
    pub input_grads: Vec<(String, Value)>,
}

/// Why a gradient graph could not be built.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum AdError {
    #[error("{node} `{op}`: no gradient: {reason}")]
    Unsupported {
        node: NodeId,
        op: &'static str,
        reason: String,
    },
    #[error("{node} `{op}`: building its gradient failed: {error}")]
    Build {
        node: NodeId,
        op: &'static str,
        error: BuildError,
    },
    #[error("the loss {value} is not a value of the graph")]
    NoSuchValue { value: Value },
    #[error("the loss must be a single float element, found {ty}")]
    NotScalar { ty: TensorType },
    #[error("the graph has no output `{name}`")]
    NoOutput { name: String },
    #[error("logits must be a float tensor [..., V] of rank at least 2, found {ty}")]
    BadLogits { ty: TensorType },
    #[error("the name `{name}` is already used by the graph ({what})")]
    NameTaken { name: String, what: &'static str },
}

/// The forward node a backward node differentiates (for errors and provenance).
#[derive(Clone, Copy, Debug)]
struct Origin {
    node: NodeId,
    op: &'static str,
    span: Span,
    layer: Option<u32>,
}

/// One contribution to the gradient of a forward value.
#[derive(Clone, Copy, Debug)]
struct Contrib {
    grad: Value,
    at: Origin,
    /// `Some((axis, start, len))`: the gradient of only that slice of the value.
    piece: Option<(usize, u64, u64)>,
}

/// Gradients of the scalar `loss` with respect to every parameter and every (float) state
/// input of `g`; see the module documentation for the graph returned.
pub fn grad(g: &Graph, loss: Value) -> Result<Gradients, AdError> {
    grad_seeded(g, loss, &[], &[])
}

/// [`grad`] with extra cotangents: each `(value, seed)` (both values of `g`) adds `seed` to
/// the gradient of `value`, as if the loss were `loss + sum(seed * value)` (the reported
/// loss stays `loss`). Seeds of values that do not vary are ignored. The float data inputs
/// named in `wrt_inputs` are differentiated too (gradients in `Gradients::input_grads`).
fn grad_seeded(
    g: &Graph,
    loss: Value,
    seeds: &[(Value, Value)],
    wrt_inputs: &[String],
) -> Result<Gradients, AdError> {
    let loss_ty = g
        .value_type(loss)
        .cloned()
        .ok_or(AdError::NoSuchValue { value: loss })?;
    if !loss_ty.dtype.is_float() || numel(&loss_ty.shape).and_then(|d| d.as_known()) != Some(1) {
        return Err(AdError::NotScalar { ty: loss_ty });
    }
    check_output_names(g, loss, wrt_inputs)?;

    let mut ad = Ad {
        g: Graph::new(g.name.clone()),
        at: origin(g, loss.node),
        contribs: HashMap::new(),
    };
    ad.g.sources = g.sources.clone();
    // The forward copy; ids are the same, mapped anyway so nothing depends on it.
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    for n in g.nodes() {
        ad.at = origin(g, n);
        let ops: Vec<Value> = g
            .operands(n)
            .into_iter()
            .map(|v| mapv(&map, v))
            .collect::<Result<_, _>>()?;
        let id = ad.add_node(g.op(n).clone(), &ops)?;
        map.push(id);
    }
    let varying = activity(g, wrt_inputs);
    let new_loss = mapv(&map, loss)?;

    let mut leaf_grads: HashMap<NodeId, Value> = HashMap::new();
    if is_varying(&varying, loss) {
        ad.at = origin(g, loss.node);
        let seed = ad.full(1.0, &loss_ty)?;
        ad.contribute(loss, seed, None);
    }
    for &(v, seed) in seeds {
        if is_varying(&varying, v) {
            ad.at = origin(g, v.node);
            let seed = mapv(&map, seed)?;
            ad.contribute(v, seed, None);
        }
    }
    for i in (0..g.len()).rev() {
        let n = NodeId::from_index(i);
        let nres = g.types(n).len();
        let any = (0..nres).any(|r| ad.contribs.contains_key(&Value::new(n, r as u16)));
        if !any {
            continue;
        }
        ad.at = origin(g, n);
        let mut gs: Vec<Option<Value>> = Vec::with_capacity(nres);
        for r in 0..nres {
            gs.push(ad.finalize(&map, Value::new(n, r as u16))?);
        }
        if let Op::Param { .. } | Op::Input { .. } = g.op(n) {
            if let Some(Some(v)) = gs.first() {
                leaf_grads.insert(n, *v);
            }
            continue;
        }
        ad.at = origin(g, n);
        vjp(&mut ad, g, &map, &varying, n, &gs)?;
    }

    let mut out = Gradients {
        graph: Graph::default(),
        loss: new_loss,
        param_grads: Vec::new(),
        state_grads: Vec::new(),
        input_grads: Vec::new(),
    };
    for n in g.nodes() {
        let (name, list) = match g.op(n) {
            Op::Param { name, .. } => (name, &mut out.param_grads),
            Op::Input {
                name,
                kind: InputKind::State,
                ty,
            } if ty.dtype.is_float() => (name, &mut out.state_grads),
            Op::Input {
                name,
                kind: InputKind::Data,
                ty,
            } if ty.dtype.is_float() && wrt_inputs.contains(name) => (name, &mut out.input_grads),
            _ => continue,
        };
        let v = match leaf_grads.get(&n) {
            Some(v) => *v,
            None => {
                ad.at = origin(g, n);
                let ty = g.types(n).first().cloned().ok_or(AdError::NoSuchValue {
                    value: Value::from(n),
                })?;
                ad.full(0.0, &ty)?
            }
        };
        list.push((name.clone(), v));
    }
    let mut graph = ad.g;
    for (name, v) in g.outputs() {
        graph.add_output(name.clone(), mapv(&map, *v)?);
    }
    if !g.outputs().iter().any(|(n, v)| n == "loss" && *v == loss) {
        graph.add_output("loss", new_loss);
    }
    for (name, v) in out
        .param_grads
        .iter()
        .chain(&out.state_grads)
        .chain(&out.input_grads)
    {
        graph.add_output(format!("grad.{name}"), *v);
    }
    out.graph = graph;
    Ok(out)
}

/// The forward graph plus the mean cross-entropy of the output `logits_output` (`[B, L, V]`)
/// against a new data input `targets` (`[B, L]` i32; positions equal to `ignore_index` do not
/// count), and its backward pass. The loss is `sum(loss per token) / sum(valid)` (NaN when
/// every position is ignored).
pub fn training_graph(
    forward: &Graph,
    logits_output: &str,
    ignore_index: i64,
) -> Result<Gradients, AdError> {
    build_training(
        forward,
        Loss::MeanCrossEntropy(logits_output),
        ignore_index,
        Seeds::None,
        &[],
    )
}

/// The training graph of one time segment of a longer sequence (the basis of time
/// checkpointing). As [`training_graph`], with two differences:
///
/// * the loss is the **sum** of the per-token cross-entropies over the valid positions (no
///   division by their count), so the losses and gradients of consecutive segments add up to
///   those of the whole sequence (divide by the total number of valid tokens afterwards for
///   the mean);
/// * for every recurrent state `S` (a float graph input of kind `State` whose final value is
///   the graph output also named `S`) there is a new data input `cotangent.S`, of the type of
///   that output, seeded as the cotangent of the final state: the gradient of the later
///   segments' loss with respect to this segment's final state (zeros for the last segment).
///
/// Run the segments' forward passes in order (carrying the final states), then their
/// training graphs in reverse order, feeding each segment the states it started from and,
/// as `cotangent.S`, the `grad.S` of the segment after it.
pub fn training_graph_segment(
    forward: &Graph,
    logits_output: &str,
    ignore_index: i64,
) -> Result<Gradients, AdError> {
    build_training(
        forward,
        Loss::SummedCrossEntropy(logits_output),
        ignore_index,
        Seeds::States,
        &[],
    )
}

/// The training graph of one stage of a checkpoint grid (a layer group over a time segment,
/// or the embedding, or the head with the loss): the stage's forward nodes, then its backward.
///
/// * with `logits_output`, the stage ends the model: a data input `targets` and the **summed**
///   cross-entropy as in [`training_graph_segment`]; without it the loss is the constant 0
///   and every gradient comes from the seeds;
/// * every other float output `O` (recurrent final states, and values a later stage reads)
///   gets a data input `cotangent.O` seeding its gradient;
/// * the float data inputs named in `wrt_inputs` (values an earlier stage produced) are
///   differentiated: outputs `grad.<name>`, in [`Gradients::input_grads`].
pub fn stage_training_graph(
    stage: &Graph,
    logits_output: Option<&str>,
    ignore_index: i64,
    wrt_inputs: &[String],
) -> Result<Gradients, AdError> {
    let loss = match logits_output {
        Some(l) => Loss::SummedCrossEntropy(l),
        None => Loss::Zero,
    };
    build_training(stage, loss, ignore_index, Seeds::AllOutputs, wrt_inputs)
}

/// Which loss a training graph appends.
#[derive(Clone, Copy)]
enum Loss<'a> {
    /// Mean cross-entropy of the named logits output.
    MeanCrossEntropy(&'a str),
    /// Summed cross-entropy (segments and stages: the parts add up).
    SummedCrossEntropy(&'a str),
    /// No loss of its own: gradients come from the seeded outputs only.
    Zero,
}

/// Which outputs get a `cotangent.<name>` input seeding their gradient.
#[derive(Clone, Copy, PartialEq)]
enum Seeds {
    None,
    /// Final recurrent states (an output named as a float state input).
    States,
    /// Every float output except the logits.
    AllOutputs,
}

fn build_training(
    forward: &Graph,
    loss_kind: Loss<'_>,
    ignore_index: i64,
    seeds_kind: Seeds,
    wrt_inputs: &[String],
) -> Result<Gradients, AdError> {
    let logits_output = match loss_kind {
        Loss::MeanCrossEntropy(l) | Loss::SummedCrossEntropy(l) => Some(l),
        Loss::Zero => None,
    };
    let logits = match logits_output {
        Some(name) => {
            let v = forward
                .outputs()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| AdError::NoOutput {
                    name: name.to_string(),
                })?;
            let ty = forward
                .value_type(v)
                .cloned()
                .ok_or(AdError::NoSuchValue { value: v })?;
            if !ty.dtype.is_float() || ty.rank() < 2 {
                return Err(AdError::BadLogits { ty });
            }
            Some((v, ty))
        }
        None => None,
    };
    const TARGETS: &str = "targets";
    // The seeded outputs: (output value, its type, the cotangent input name).
    let mut seeded: Vec<(Value, TensorType, String)> = Vec::new();
    let is_state = |name: &str| {
        forward.nodes().any(|n| {
            matches!(forward.op(n), Op::Input { name: s, kind: InputKind::State, ty }
                if s == name && ty.dtype.is_float())
        })
    };
    for (name, v) in forward.outputs() {
        let wanted = match seeds_kind {
            Seeds::None => false,
            Seeds::States => is_state(name),
            Seeds::AllOutputs => Some(name.as_str()) != logits_output,
        };
        if !wanted
            || seeded
                .iter()
                .any(|(_, _, c)| *c == format!("cotangent.{name}"))
        {
            continue;
        }
        let out_ty = forward
            .value_type(*v)
            .cloned()
            .ok_or(AdError::NoSuchValue { value: *v })?;
        if out_ty.dtype.is_float() {
            seeded.push((*v, out_ty, format!("cotangent.{name}")));
        }
    }
    for n in forward.nodes() {
        if let Op::Input { name, .. } = forward.op(n)
            && ((logits.is_some() && name == TARGETS) || seeded.iter().any(|(_, _, c)| c == name))
        {
            return Err(AdError::NameTaken {
                name: name.clone(),
                what: "an input",
            });
        }
    }
    let at = match (&logits, forward.outputs().first()) {
        (Some((v, _)), _) => origin(forward, v.node),
        (None, Some((_, v))) => origin(forward, v.node),
        (None, None) => Origin {
            node: NodeId::from_index(0),
            op: "loss",
            span: Span::default(),
            layer: None,
        },
    };
    let mut ad = Ad {
        g: forward.clone(),
        at,
        contribs: HashMap::new(),
    };
    let loss = match (&logits, loss_kind) {
        (Some((logits, ty)), _) => {
            let shape: Shape = ty.shape[..ty.rank() - 1].to_vec();
            let targets = ad.add(
                Op::Input {
                    name: TARGETS.into(),
                    kind: InputKind::Data,
                    ty: TensorType::new(DType::I32, shape),
                },
                &[],
            )?;
            let ce = ad.add_node(Op::CrossEntropy { ignore_index }, &[*logits, targets])?;
            let (per_token, valid) = (Value::new(ce, 0), Value::new(ce, 1));
            let total = ad.sum_all(per_token)?;
            if matches!(loss_kind, Loss::MeanCrossEntropy(_)) {
                let count = ad.sum_all(valid)?;
                ad.bin(BinaryOp::Div, total, count)?
            } else {
                total
            }
        }
        (None, _) => ad.full(0.0, &TensorType::new(DType::F32, Vec::new()))?,
    };
    let mut seeds: Vec<(Value, Value)> = Vec::with_capacity(seeded.len());
    for (v, ty, name) in seeded {
        ad.at = origin(forward, v.node);
        let input = ad.add(
            Op::Input {
                name,
                kind: InputKind::Data,
                ty,
            },
            &[],
        )?;
        seeds.push((v, input));
    }
    grad_seeded(&ad.g, loss, &seeds, wrt_inputs)
}

/// Output names `grad` will add must be free (`loss` may already name the loss itself).
fn check_output_names(g: &Graph, loss: Value, wrt_inputs: &[String]) -> Result<(), AdError> {
    let mut taken: Vec<String> = wrt_inputs.iter().map(|n| format!("grad.{n}")).collect();
    for n in g.nodes() {
        match g.op(n) {
            Op::Param { name, .. }
            | Op::Input {
                name,
                kind: InputKind::State,
                ..
            } => taken.push(format!("grad.{name}")),
            _ => {}
        }
    }
    for (name, v) in g.outputs() {
        if (name == "loss" && *v != loss) || taken.contains(name) {
            return Err(AdError::NameTaken {
                name: name.clone(),
                what: "an output",
            });
        }
    }
    Ok(())
}

fn origin(g: &Graph, n: NodeId) -> Origin {
    Origin {
        node: n,
        op: g.op(n).name(),
        span: g.span(n),
        layer: g.layer(n),
    }
}

fn mapv(map: &[NodeId], v: Value) -> Result<Value, AdError> {
    map.get(v.node.index())
        .map(|n| Value::new(*n, v.result))
        .ok_or(AdError::NoSuchValue { value: v })
}

fn is_varying(varying: &[Vec<bool>], v: Value) -> bool {
    varying
        .get(v.node.index())
        .and_then(|r| r.get(v.result as usize))
        .copied()
        .unwrap_or(false)
}

/// Operand slots through which a gradient flows (integer operands never carry one).
fn diff_slot(op: &Op, slot: usize) -> bool {
    match op {
        Op::Gather => slot == 0,
        Op::CrossEntropy { .. } | Op::CrossEntropyGrad { .. } => slot != 1,
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
        | Op::CausalConv1d
        | Op::SelectiveScan
        | Op::SsdScan { .. }
        | Op::CausalConv1dGrad
        | Op::SelectiveScanGrad
        | Op::SsdScanGrad { .. } => true,
    }
}

/// Results that are piecewise constant in every operand (no gradient flows back from them).
fn constant_result(op: &Op, result: usize) -> bool {
    matches!(op, Op::CrossEntropy { .. }) && result == 1
}

/// Per node and result: does the value depend differentiably on a parameter or state?
fn activity(g: &Graph, wrt_inputs: &[String]) -> Vec<Vec<bool>> {
    let mut varying: Vec<Vec<bool>> = Vec::with_capacity(g.len());
    for n in g.nodes() {
        let op = g.op(n);
        let tys = g.types(n);
        let source = match op {
            Op::Param { .. } => true,
            Op::Input { kind, name, .. } => *kind == InputKind::State || wrt_inputs.contains(name),
            _ => false,
        };
        let any_in = source
            || g.operands(n)
                .iter()
                .enumerate()
                .any(|(s, v)| diff_slot(op, s) && is_varying(&varying, *v));
        varying.push(
            tys.iter()
                .enumerate()
                .map(|(r, t)| any_in && t.dtype.is_float() && !constant_result(op, r))
                .collect(),
        );
    }
    varying
}

/// The graph under construction and the backward bookkeeping.
struct Ad {
    g: Graph,
    /// The forward node being differentiated: provenance of every node added.
    at: Origin,
    /// Contributions to the gradients of forward values (keyed by forward value).
    contribs: HashMap<Value, Vec<Contrib>>,
}

impl Ad {
    fn err(&self, error: BuildError) -> AdError {
        AdError::Build {
            node: self.at.node,
            op: self.at.op,
            error,
        }
    }

    fn add_node(&mut self, op: Op, operands: &[Value]) -> Result<NodeId, AdError> {
        self.g
            .add(op, operands, self.at.span, self.at.layer)
            .map_err(|e| self.err(e))
    }

    fn add(&mut self, op: Op, operands: &[Value]) -> Result<Value, AdError> {
        self.add_node(op, operands).map(Value::from)
    }

    fn ty(&self, v: Value) -> Result<TensorType, AdError> {
        self.g
            .value_type(v)
            .cloned()
            .ok_or_else(|| self.err(BuildError::DanglingOperand { slot: 0, value: v }))
    }

    fn konst(&mut self, value: f64, dtype: DType) -> Result<Value, AdError> {
        self.add(Op::Const { value, dtype }, &[])
    }

    /// A tensor of type `ty` filled with `value`.
    fn full(&mut self, value: f64, ty: &TensorType) -> Result<Value, AdError> {
        let c = self.konst(value, ty.dtype)?;
        if ty.shape.is_empty() {
            return Ok(c);
        }
        self.add(
            Op::Broadcast {
                shape: ty.shape.clone(),
            },
            &[c],
        )
    }

    /// `full(value)` of the type of `like`.
    fn full_like(&mut self, value: f64, like: Value) -> Result<Value, AdError> {
        let ty = self.ty(like)?;
        self.full(value, &ty)
    }

    fn un(&mut self, u: UnaryOp, x: Value) -> Result<Value, AdError> {
        self.add(Op::Unary(u), &[x])
    }

    fn bin(&mut self, b: BinaryOp, x: Value, y: Value) -> Result<Value, AdError> {
        self.add(Op::Binary(b), &[x, y])
    }

    fn mul(&mut self, x: Value, y: Value) -> Result<Value, AdError> {
        self.bin(BinaryOp::Mul, x, y)
    }

    /// `x * c` for a scalar constant `c`.
    fn scale(&mut self, x: Value, c: f64) -> Result<Value, AdError> {
        let k = self.full_like(c, x)?;
        self.mul(x, k)
    }

    /// `c - x` for a scalar constant `c`.
    fn rsub(&mut self, c: f64, x: Value) -> Result<Value, AdError> {
        let k = self.full_like(c, x)?;
        self.bin(BinaryOp::Sub, k, x)
    }

    fn reshape(&mut self, x: Value, shape: Shape) -> Result<Value, AdError> {
        if self.ty(x)?.shape == shape {
            return Ok(x);
        }
        self.add(Op::Reshape { shape }, &[x])
    }

    fn broadcast(&mut self, x: Value, shape: Shape) -> Result<Value, AdError> {
        if self.ty(x)?.shape == shape {
            return Ok(x);
        }
        self.add(Op::Broadcast { shape }, &[x])
    }

    fn permute(&mut self, x: Value, perm: Vec<usize>) -> Result<Value, AdError> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.add(Op::Permute { perm }, &[x])
    }

    fn reduce_sum(&mut self, x: Value, axes: Vec<usize>) -> Result<Value, AdError> {
        if axes.is_empty() {
            return Ok(x);
        }
        self.add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes,
            },
            &[x],
        )
    }

    /// The sum of every element, as a rank-0 value.
    fn sum_all(&mut self, x: Value) -> Result<Value, AdError> {
        let r = self.ty(x)?.rank();
        let s = self.reduce_sum(x, (0..r).collect())?;
        self.reshape(s, vec![])
    }

    fn cast(&mut self, x: Value, to: DType) -> Result<Value, AdError> {
        if self.ty(x)?.dtype == to {
            return Ok(x);
        }
        self.add(Op::Cast { to }, &[x])
    }

    fn concat(&mut self, parts: &[Value], axis: usize) -> Result<Value, AdError> {
        match parts {
            [one] => Ok(*one),
            _ => self.add(Op::Concat { axis }, parts),
        }
    }

    fn slice(&mut self, x: Value, axis: usize, start: u64, len: u64) -> Result<Value, AdError> {
        let ty = self.ty(x)?;
        if start == 0 && ty.shape.get(axis).and_then(Dim::as_known) == Some(len) {
            return Ok(x);
        }
        self.add(Op::Slice { axis, start, len }, &[x])
    }

    fn matmul(&mut self, l: Value, r: Value, rhs_t: bool) -> Result<Value, AdError> {
        self.add(Op::MatMul { rhs_t }, &[l, r])
    }

    /// Zeros of type `ty` with `len` along `axis`.
    fn zeros_along(&mut self, ty: &TensorType, axis: usize, len: u64) -> Result<Value, AdError> {
        let mut t = ty.clone();
        if let Some(d) = t.shape.get_mut(axis) {
            *d = Dim::known(len);
        }
        self.full(0.0, &t)
    }

    /// `0, 1, ..., n-1` as a `[n]` tensor of `dtype`, by doubling: `a ++ (a + len)`.
    fn iota(&mut self, n: u64, dtype: DType) -> Result<Value, AdError> {
        let zero = self.konst(0.0, dtype)?;
        let mut a = self.reshape(zero, vec![Dim::known(1)])?;
        let mut len = 1u64;
        while len < n {
            let off = self.full_like(len as f64, a)?;
            let b = self.bin(BinaryOp::Add, a, off)?;
            a = self.concat(&[a, b], 0)?;
            len *= 2;
        }
        self.slice(a, 0, 0, n)
    }

    fn contribute(&mut self, v: Value, grad: Value, piece: Option<(usize, u64, u64)>) {
        let at = self.at;
        self.contribs
            .entry(v)
            .or_default()
            .push(Contrib { grad, at, piece });
    }

    /// The gradient of the forward value `v` (mapped to `map`), from its contributions;
    /// `None` when there are none.
    fn finalize(&mut self, map: &[NodeId], v: Value) -> Result<Option<Value>, AdError> {
        let Some(cs) = self.contribs.remove(&v) else {
            return Ok(None);
        };
        let ty = self.ty(mapv(map, v)?)?;
        let saved = self.at;
        let mut dense: Vec<Contrib> = Vec::new();
        let mut pieces: Vec<Contrib> = Vec::new();
        for c in cs {
            if c.piece.is_some() {
                pieces.push(c);
            } else {
                dense.push(c);
            }
        }
        // Slices along the axis of the first piece that do not overlap: one concat.
        if let Some(axis) = pieces.first().and_then(|c| c.piece).map(|p| p.0) {
            pieces.sort_by_key(|c| c.piece.map(|p| (p.0 != axis, p.1)));
            let size = ty.shape.get(axis).and_then(Dim::as_known);
            let mut parts: Vec<Value> = Vec::new();
            let mut pos = 0u64;
            let mut first_at = None;
            let mut rest: Vec<Contrib> = Vec::new();
            for c in pieces {
                let Some((ax, start, len)) = c.piece else {
                    continue;
                };
                if ax != axis || start < pos || size.is_none() {
                    rest.push(c);
                    continue;
                }
                self.at = c.at;
                first_at.get_or_insert(c.at);
                if start > pos {
                    let z = self.zeros_along(&ty, axis, start - pos)?;
                    parts.push(z);
                }
                parts.push(c.grad);
                pos = start + len;
            }
            if let Some(at) = first_at {
                self.at = at;
                let size = size.unwrap_or(pos);
                if pos < size {
                    let z = self.zeros_along(&ty, axis, size - pos)?;
                    parts.push(z);
                }
                let joined = self.concat(&parts, axis)?;
                dense.insert(
                    0,
                    Contrib {
                        grad: joined,
                        at,
                        piece: None,
                    },
                );
            }
            // Overlapping or off-axis slices: padded one by one.
            for c in rest {
                let Some((ax, start, len)) = c.piece else {
                    continue;
                };
                self.at = c.at;
                let size = ty.shape.get(ax).and_then(Dim::as_known).ok_or_else(|| {
                    AdError::Unsupported {
                        node: c.at.node,
                        op: c.at.op,
                        reason: "slice of a symbolic axis".into(),
                    }
                })?;
                let mut parts = Vec::new();
                if start > 0 {
                    parts.push(self.zeros_along(&ty, ax, start)?);
                }
                parts.push(c.grad);
                if start + len < size {
                    parts.push(self.zeros_along(&ty, ax, size - start - len)?);
                }
                let padded = self.concat(&parts, ax)?;
                dense.push(Contrib {
                    grad: padded,
                    at: c.at,
                    piece: None,
                });
            }
        }
        let mut acc: Option<Value> = None;
        for c in dense {
            acc = Some(match acc {
                None => c.grad,
                Some(a) => {
                    self.at = c.at;
                    self.bin(BinaryOp::Add, a, c.grad)?
                }
            });
        }
        self.at = saved;
        Ok(acc)
    }
}

fn unsupported(g: &Graph, n: NodeId, reason: &str) -> AdError {
    AdError::Unsupported {
        node: n,
        op: g.op(n).name(),
        reason: reason.into(),
    }
}

/// Adds the backward nodes of forward node `n` given its result gradients `gs` (`None`:
/// zero), contributing to the gradients of its varying operands.
fn vjp(
    ad: &mut Ad,
    g: &Graph,
    map: &[NodeId],
    varying: &[Vec<bool>],
    n: NodeId,
    gs: &[Option<Value>],
) -> Result<(), AdError> {
    let op = g.op(n);
    let fops = g.operands(n);
    let want: Vec<bool> = fops
        .iter()
        .enumerate()
        .map(|(s, v)| diff_slot(op, s) && is_varying(varying, *v))
        .collect();
    if !want.iter().any(|&w| w) {
        return Ok(());
    }
    // `Graph::add` inferred the node, so this holds; checked so the indexing below cannot fail.
    let arity_ok = match op.arity() {
        Some(k) => fops.len() == k,
        None => !fops.is_empty(),
    };
    if !arity_ok {
        return Err(unsupported(g, n, "malformed node (wrong operand count)"));
    }
    let x: Vec<Value> = fops
        .iter()
        .map(|v| mapv(map, *v))
        .collect::<Result<_, _>>()?;
    let y0 = Value::new(mapv(map, Value::from(n))?.node, 0);
    // The gradient of result `r`, zeros when it received none.
    let result_grad = |ad: &mut Ad, r: usize| -> Result<Value, AdError> {
        match gs.get(r).copied().flatten() {
            Some(v) => Ok(v),
            None => {
                let ty = g
                    .types(n)
                    .get(r)
                    .cloned()
                    .ok_or_else(|| unsupported(g, n, "missing result type"))?;
                ad.full(0.0, &ty)
            }
        }
    };
    let gy = result_grad(ad, 0)?;
    let w = |s: usize| want.get(s).copied().unwrap_or(false);
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => {}
        Op::Unary(u) => {
            let (a, y) = (x[0], y0);
            let d = match u {
                UnaryOp::Neg => ad.un(UnaryOp::Neg, gy)?,
                UnaryOp::Exp => ad.mul(gy, y)?,
                UnaryOp::Log => ad.bin(BinaryOp::Div, gy, a)?,
                UnaryOp::Sqrt => {
                    // 0.5 / y
                    let h = ad.scale(gy, 0.5)?;
                    ad.bin(BinaryOp::Div, h, y)?
                }
                UnaryOp::Rsqrt => {
                    // -0.5 y^3
                    let y2 = ad.mul(y, y)?;
                    let y3 = ad.mul(y2, y)?;
                    let t = ad.mul(gy, y3)?;
                    ad.scale(t, -0.5)?
                }
                UnaryOp::Recip => {
                    // -y^2
                    let y2 = ad.mul(y, y)?;
                    let t = ad.mul(gy, y2)?;
                    ad.un(UnaryOp::Neg, t)?
                }
                UnaryOp::Softplus => {
                    let s = ad.un(UnaryOp::Sigmoid, a)?;
                    ad.mul(gy, s)?
                }
                UnaryOp::Silu => {
                    // s (1 + x (1 - s))
                    let s = ad.un(UnaryOp::Sigmoid, a)?;
                    let one_m = ad.rsub(1.0, s)?;
                    let xs = ad.mul(a, one_m)?;
                    let one = ad.full_like(1.0, a)?;
                    let inner = ad.bin(BinaryOp::Add, one, xs)?;
                    let d = ad.mul(s, inner)?;
                    ad.mul(gy, d)?
                }
                UnaryOp::Sigmoid => {
                    // y (1 - y)
                    let one_m = ad.rsub(1.0, y)?;
                    let d = ad.mul(y, one_m)?;
                    ad.mul(gy, d)?
                }
            };
            ad.contribute(fops[0], d, None);
        }
        Op::Binary(b) => {
            let (l, r) = (x[0], x[1]);
            match b {
                BinaryOp::Add => {
                    if w(0) {
                        ad.contribute(fops[0], gy, None);
                    }
                    if w(1) {
                        ad.contribute(fops[1], gy, None);
                    }
                }
                BinaryOp::Sub => {
                    if w(0) {
                        ad.contribute(fops[0], gy, None);
                    }
                    if w(1) {
                        let d = ad.un(UnaryOp::Neg, gy)?;
                        ad.contribute(fops[1], d, None);
                    }
                }
                BinaryOp::Mul => {
                    if w(0) {
                        let d = ad.mul(gy, r)?;
                        ad.contribute(fops[0], d, None);
                    }
                    if w(1) {
                        let d = ad.mul(gy, l)?;
                        ad.contribute(fops[1], d, None);
                    }
                }
                BinaryOp::Div => {
                    if w(0) {
                        let d = ad.bin(BinaryOp::Div, gy, r)?;
                        ad.contribute(fops[0], d, None);
                    }
                    if w(1) {
                        // -g y / r
                        let t = ad.mul(gy, y0)?;
                        let t = ad.bin(BinaryOp::Div, t, r)?;
                        let d = ad.un(UnaryOp::Neg, t)?;
                        ad.contribute(fops[1], d, None);
                    }
                }
                BinaryOp::Max | BinaryOp::Min => {
                    return Err(unsupported(
                        g,
                        n,
                        "routing the gradient to the selected operand needs a comparison \
                         (the IR has no compare/select op)",
                    ));
                }
            }
        }
        Op::Cast { .. } => {
            let from = g
                .value_type(fops[0])
                .map(|t| t.dtype)
                .ok_or_else(|| unsupported(g, n, "operand without a type"))?;
            let d = ad.cast(gy, from)?;
            ad.contribute(fops[0], d, None);
        }
        Op::Reduce { op: rop, axes } => {
            let xt = ad.ty(x[0])?;
            match rop {
                ReduceOp::Sum => {
                    let d = ad.broadcast(gy, xt.shape.clone())?;
                    ad.contribute(fops[0], d, None);
                }
                ReduceOp::Mean => {
                    let mut count = Some(1u64);
                    for &a in axes {
                        count = match (count, xt.shape.get(a).and_then(Dim::as_known)) {
                            (Some(c), Some(k)) => c.checked_mul(k),
                            _ => None,
                        };
                    }
                    let c = match count {
                        Some(c) => ad.full_like(c as f64, gy)?,
                        None => {
                            // A symbolic count: the sum of ones over the reduced axes.
                            let ones = ad.full(1.0, &xt)?;
                            ad.reduce_sum(ones, axes.clone())?
                        }
                    };
                    let t = ad.bin(BinaryOp::Div, gy, c)?;
                    let d = ad.broadcast(t, xt.shape.clone())?;
                    ad.contribute(fops[0], d, None);
                }
                ReduceOp::Max => {
                    return Err(unsupported(
                        g,
                        n,
                        "routing the gradient to the maximum needs a comparison \
                         (the IR has no compare/select op)",
                    ));
                }
            }
        }
        Op::MatMul { rhs_t } => vjp_matmul(ad, &fops, &x, gy, *rhs_t, w(0), w(1))?,
        Op::Reshape { .. } => {
            let shape = ad.ty(x[0])?.shape;
            let d = ad.reshape(gy, shape)?;
            ad.contribute(fops[0], d, None);
        }
        Op::Permute { perm } => {
            let mut inv = vec![0usize; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                if let Some(slot) = inv.get_mut(p) {
                    *slot = i;
                }
            }
            let d = ad.permute(gy, inv)?;
            ad.contribute(fops[0], d, None);
        }
        Op::Broadcast { shape } => {
            let src = ad.ty(x[0])?.shape;
            let off = shape.len() - src.len().min(shape.len());
            let mut axes: Vec<usize> = (0..off).collect();
            for (i, d) in src.iter().enumerate() {
                if let Some(to) = shape.get(off + i)
                    && d.is_one()
                    && !to.is_one()
                {
                    axes.push(off + i);
                }
            }
            let s = ad.reduce_sum(gy, axes)?;
            let d = ad.reshape(s, src)?;
            ad.contribute(fops[0], d, None);
        }
        Op::Slice { axis, start, len } => {
            ad.contribute(fops[0], gy, Some((*axis, *start, *len)));
        }
        Op::Concat { axis } => {
            let mut off = 0u64;
            for (s, v) in x.iter().enumerate() {
                let len = ad
                    .ty(*v)?
                    .shape
                    .get(*axis)
                    .and_then(Dim::as_known)
                    .ok_or_else(|| unsupported(g, n, "concat along a symbolic axis"))?;
                if w(s) {
                    let d = ad.slice(gy, *axis, off, len)?;
                    ad.contribute(fops[s], d, None);
                }
                off += len;
            }
        }
        Op::Gather => {
            let d = vjp_gather(ad, g, n, x[0], x[1], gy)?;
            ad.contribute(fops[0], d, None);
        }
        Op::CausalConv1d => {
            let ds1 = result_grad(ad, 1)?;
            let mut ops = x.clone();
            ops.extend([gy, ds1]);
            let gn = ad.add_node(Op::CausalConv1dGrad, &ops)?;
            for (s, fv) in fops.iter().enumerate() {
                if w(s) {
                    ad.contribute(*fv, Value::new(gn, s as u16), None);
                }
            }
        }
        Op::SelectiveScan | Op::SsdScan { .. } => {
            let ds1 = result_grad(ad, 1)?;
            let mut ops = x.clone();
            ops.extend([gy, ds1]);
            let gop = match op {
                Op::SsdScan { chunk } => Op::SsdScanGrad { chunk: *chunk },
                _ => Op::SelectiveScanGrad,
            };
            let gn = ad.add_node(gop, &ops)?;
            for (s, fv) in fops.iter().enumerate() {
                if w(s) {
                    ad.contribute(*fv, Value::new(gn, s as u16), None);
                }
            }
        }
        Op::CrossEntropy { ignore_index } => {
            let d = ad.add(
                Op::CrossEntropyGrad {
                    ignore_index: *ignore_index,
                },
                &[x[0], x[1], gy],
            )?;
            ad.contribute(fops[0], d, None);
        }
        Op::CausalConv1dGrad
        | Op::SelectiveScanGrad
        | Op::SsdScanGrad { .. }
        | Op::CrossEntropyGrad { .. } => {
            return Err(unsupported(
                g,
                n,
                "gradient ops are not differentiated (no second-order derivatives)",
            ));
        }
    }
    Ok(())
}

/// `y = lhs @ R` with `R = rhs` (or `rhs^T` when `rhs_t`): `dlhs = g @ R^T`,
/// `dR = lhs^T @ g` (summed over the batch axes when `rhs` is 2-D and shared).
fn vjp_matmul(
    ad: &mut Ad,
    fops: &[Value],
    x: &[Value],
    gy: Value,
    rhs_t: bool,
    want_l: bool,
    want_r: bool,
) -> Result<(), AdError> {
    let (l, r) = (x[0], x[1]);
    if want_l {
        // g [.., M, N] @ R^T: R^T is `rhs` itself when rhs_t, else `rhs` transposed.
        let d = ad.matmul(gy, r, !rhs_t)?;
        ad.contribute(fops[0], d, None);
    }
    if want_r {
        let lt = ad.ty(l)?;
        let rt = ad.ty(r)?;
        let gt = ad.ty(gy)?;
        let rank = lt.rank();
        let swap = |rank: usize| -> Vec<usize> {
            let mut p: Vec<usize> = (0..rank).collect();
            p.swap(rank - 2, rank - 1);
            p
        };
        let (l2, g2, rank2) = if rt.rank() == 2 && rank > 2 {
            let m = numel(&lt.shape[..rank - 1])
                .ok_or_else(|| ad.err(BuildError::DanglingOperand { slot: 0, value: l }))?;
            let k = lt.shape[rank - 1].clone();
            let nn = gt.shape[rank - 1].clone();
            let l2 = ad.reshape(l, vec![m.clone(), k])?;
            let g2 = ad.reshape(gy, vec![m, nn])?;
            (l2, g2, 2)
        } else {
            (l, gy, rank)
        };
        let d = if rhs_t {
            // dR^T = g^T @ lhs: [.., N, M] @ [.., M, K]
            let gtr = ad.permute(g2, swap(rank2))?;
            ad.matmul(gtr, l2, false)?
        } else {
            // lhs^T @ g: [.., K, M] @ [.., M, N]
            let ltr = ad.permute(l2, swap(rank2))?;
            ad.matmul(ltr, g2, false)?
        };
        ad.contribute(fops[1], d, None);
    }
    Ok(())
}

/// The embedding gradient: `dtable[v, :] = sum over positions i with ids[i] = v of g[i, :]`,
/// as `onehot^T @ g` with `onehot^T[v, i] = max(0, 1 - |ids[i] - v|)` (exact for integers).
fn vjp_gather(
    ad: &mut Ad,
    g: &Graph,
    n: NodeId,
    table: Value,
    ids: Value,
    gy: Value,
) -> Result<Value, AdError> {
    let tt = ad.ty(table)?;
    let it = ad.ty(ids)?;
    let (Some(v), Some(d)) = (
        tt.shape.first().and_then(Dim::as_known),
        tt.shape.get(1).cloned(),
    ) else {
        return Err(unsupported(g, n, "the table's row count must be a number"));
    };
    if v == 0 {
        return Err(unsupported(g, n, "an empty table"));
    }
    // Integers are exact in f32 up to 2^24.
    let f = if tt.dtype == DType::F64 || v > 1 << 24 {
        DType::F64
    } else {
        DType::F32
    };
    let count = numel(&it.shape).ok_or_else(|| unsupported(g, n, "ids shape overflows"))?;
    let vn = vec![Dim::known(v), count.clone()];
    let idf = ad.cast(ids, f)?;
    let idf = ad.reshape(idf, vec![Dim::known(1), count.clone()])?;
    let idf = ad.broadcast(idf, vn.clone())?;
    let rows = ad.iota(v, f)?;
    let rows = ad.reshape(rows, vec![Dim::known(v), Dim::known(1)])?;
    let rows = ad.broadcast(rows, vn)?;
    let diff = ad.bin(BinaryOp::Sub, idf, rows)?;
    let neg = ad.un(UnaryOp::Neg, diff)?;
    let abs = ad.bin(BinaryOp::Max, diff, neg)?;
    let one_m = ad.rsub(1.0, abs)?;
    let zero = ad.full_like(0.0, one_m)?;
    let onehot_t = ad.bin(BinaryOp::Max, one_m, zero)?;
    let g2 = ad.reshape(gy, vec![count, d])?;
    let g2 = ad.cast(g2, f)?;
    let dt = ad.matmul(onehot_t, g2, false)?;
    ad.cast(dt, tt.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32t(shape: &[u64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&d| Dim::known(d)).collect())
    }

    #[test]
    fn unsupported_max_is_reported_only_on_the_path() {
        let mut g = Graph::new("t");
        let s = Span::default();
        let p = g
            .add(
                Op::Param {
                    name: "p".into(),
                    ty: f32t(&[3]),
                    init: ir::Init::Zeros,
                },
                &[],
                s,
                None,
            )
            .map(Value::from);
        let Ok(p) = p else { panic!("param") };
        let Ok(m) = g.add(Op::Binary(BinaryOp::Max), &[p, p], s, None) else {
            panic!("max")
        };
        let Ok(sum) = g.add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
            },
            &[p],
            s,
            None,
        ) else {
            panic!("sum")
        };
        // The max is not on the path to the loss: fine.
        let r = grad(&g, Value::from(sum));
        assert!(r.is_ok(), "{r:?}");
        let Ok(sm) = g.add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
            },
            &[Value::from(m)],
            s,
            None,
        ) else {
            panic!("sum")
        };
        let r = grad(&g, Value::from(sm));
        assert!(matches!(r, Err(AdError::Unsupported { .. })), "{r:?}");
    }
}
