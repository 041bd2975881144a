//! Splitting a model graph into the stages of a checkpoint grid, and rewriting a stage's
//! training graph to read saved values instead of recomputing them.
//!
//! # Stages
//!
//! [`split`] cuts a forward graph along the layer axis: the embedding (layer-less nodes before
//! the first layer), one stage per layer group, and the head (layer-less nodes after). Every
//! stage is a graph of its own, with the same symbolic shapes, so it runs over any time segment
//! by binding `L` to the segment length. A value one stage produces and a later one reads
//! becomes an output `value.%N` of the producer and a data input of the same name of the
//! consumer (for a group, the residual stream: the layer checkpoint). Parameters, state inputs
//! and constants are copied into every stage that reads them; each graph output (final states,
//! logits) belongs to the stage that computes it.
//!
//! # Saved values
//!
//! [`substitute`] replaces chosen values of a graph by data inputs (`saved.%N`) and drops
//! every node no output needs any more. Applied to a stage's training graph with the values
//! the forward pass kept (matrix-product results, or everything the backward reads), it
//! removes the recomputation those values make unnecessary; the gradient of a matrix product
//! needs its operands, not its result, so its backward nodes survive.

use ir::{BuildError, Graph, InputKind, NodeId, Op, Value};
use std::collections::HashMap;
use std::ops::Range;

/// What part of the model a stage is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageKind {
    /// Layer-less nodes before the first layer (the embedding lookup).
    Embed,
    /// The layers `range` (a layer group).
    Layers(Range<u32>),
    /// Layer-less nodes after the last layer (final norm, LM head).
    Head,
}

/// One stage's forward graph and how it connects to the others.
#[derive(Clone, Debug)]
pub struct Stage {
    pub kind: StageKind,
    pub graph: Graph,
    /// Data inputs holding values of earlier stages (`value.%N`).
    pub boundary_inputs: Vec<String>,
    /// Outputs read by later stages (`value.%N`).
    pub boundary_outputs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StageError {
    #[error("layer groups must cover layers 0..{layers} in order without gaps, got {got:?}")]
    BadGroups { layers: u32, got: Vec<Range<u32>> },
    #[error("{node} (layer {layer:?}) reads {value} of a later stage: the layers are not in order")]
    Backward {
        node: NodeId,
        layer: Option<u32>,
        value: Value,
    },
    #[error("building the stage graph failed: {0}")]
    Build(#[from] BuildError),
}

/// The name of the boundary between stages carrying `v`.
pub fn boundary_name(v: Value) -> String {
    if v.result == 0 {
        format!("value.{}", v.node)
    } else {
        format!("value.{}.{}", v.node, v.result)
    }
}

/// The name under which a stage's training graph reads the saved value `v`.
pub fn saved_name(v: Value) -> String {
    if v.result == 0 {
        format!("saved.{}", v.node)
    } else {
        format!("saved.{}.{}", v.node, v.result)
    }
}

fn is_leaf(op: &Op) -> bool {
    matches!(op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
}

/// Splits `g` into the embedding stage, one stage per group of `groups` (consecutive ranges
/// covering every layer), and the head stage. Stages that would be empty are still returned,
/// so stage `i + 1` is always group `i`.
pub fn split(g: &Graph, groups: &[Range<u32>]) -> Result<Vec<Stage>, StageError> {
    let layers = g.num_layers();
    let covers = !groups.is_empty()
        && groups[0].start == 0
        && groups.last().is_some_and(|r| r.end == layers)
        && groups.windows(2).all(|w| w[0].end == w[1].start)
        && groups.iter().all(|r| r.start < r.end);
    if !covers {
        return Err(StageError::BadGroups {
            layers,
            got: groups.to_vec(),
        });
    }
    let first_layered = g
        .nodes()
        .find(|&n| !is_leaf(g.op(n)) && g.layer(n).is_some())
        .map_or(usize::MAX, |n| n.index());
    let nstages = groups.len() + 2;
    let stage_of = |n: NodeId| -> usize {
        match g.layer(n) {
            Some(l) => 1 + groups.iter().position(|r| r.contains(&l)).unwrap_or(0),
            None if n.index() < first_layered => 0,
            None => nstages - 1,
        }
    };
    // Which values cross into a later stage.
    let mut crossing: Vec<Value> = Vec::new();
    for n in g.nodes() {
        if is_leaf(g.op(n)) {
            continue;
        }
        for v in g.operands(n) {
            if is_leaf(g.op(v.node)) {
                continue;
            }
            let (p, c) = (stage_of(v.node), stage_of(n));
            if p > c {
                return Err(StageError::Backward {
                    node: n,
                    layer: g.layer(n),
                    value: v,
                });
            }
            if p < c && !crossing.contains(&v) {
                crossing.push(v);
            }
        }
    }
    let mut stages = Vec::with_capacity(nstages);
    for s in 0..nstages {
        let kind = match s {
            0 => StageKind::Embed,
            _ if s == nstages - 1 => StageKind::Head,
            _ => StageKind::Layers(groups[s - 1].clone()),
        };
        let mut sg = Graph::new(g.name.clone());
        sg.sources = g.sources.clone();
        let mut map: HashMap<Value, Value> = HashMap::new();
        let mut boundary_inputs = Vec::new();
        for n in g.nodes() {
            if is_leaf(g.op(n)) || stage_of(n) != s {
                continue;
            }
            let mut ops = Vec::new();
            for v in g.operands(n) {
                if let Some(m) = map.get(&v) {
                    ops.push(*m);
                    continue;
                }
                let new = if is_leaf(g.op(v.node)) {
                    sg.add(g.op(v.node).clone(), &[], g.span(v.node), g.layer(v.node))?
                } else {
                    let name = boundary_name(v);
                    let ty = g
                        .value_type(v)
                        .cloned()
                        .ok_or(BuildError::DanglingOperand { slot: 0, value: v })?;
                    boundary_inputs.push(name.clone());
                    sg.add(
                        Op::Input {
                            name,
                            kind: InputKind::Data,
                            ty,
                        },
                        &[],
                        g.span(v.node),
                        g.layer(v.node),
                    )?
                };
                let mv = Value::new(new, 0);
                map.insert(v, mv);
                ops.push(mv);
            }
            let id = sg.add(g.op(n).clone(), &ops, g.span(n), g.layer(n))?;
            for r in 0..g.types(n).len() {
                map.insert(Value::new(n, r as u16), Value::new(id, r as u16));
            }
        }
        let mut boundary_outputs = Vec::new();
        for v in &crossing {
            if stage_of(v.node) == s
                && let Some(m) = map.get(v)
            {
                let name = boundary_name(*v);
                sg.add_output(name.clone(), *m);
                boundary_outputs.push(name);
            }
        }
        for (name, v) in g.outputs() {
            if let Some(m) = map.get(v) {
                sg.add_output(name.clone(), *m);
            }
        }
        stages.push(Stage {
            kind,
            graph: sg,
            boundary_inputs,
            boundary_outputs,
        });
    }
    Ok(stages)
}

/// `g` with every value of `saved` replaced by a data input (`saved_name(v)`, the value's
/// type), only the outputs `keep_output` accepts, and only the nodes those outputs need.
/// Node ids change; names, spans and layers are kept. Also returns the ids in `g` of the
/// nodes kept, in order.
pub fn substitute(
    g: &Graph,
    saved: &[Value],
    keep_output: &dyn Fn(&str) -> bool,
) -> Result<(Graph, Vec<NodeId>), BuildError> {
    let outputs: Vec<(String, Value)> = g
        .outputs()
        .iter()
        .filter(|(n, _)| keep_output(n))
        .cloned()
        .collect();
    // Liveness from the outputs, not looking through saved values.
    let mut live = vec![false; g.len()];
    let mut live_saved: Vec<Value> = Vec::new();
    let mut stack: Vec<Value> = outputs.iter().map(|(_, v)| *v).collect();
    while let Some(v) = stack.pop() {
        if saved.contains(&v) {
            if !live_saved.contains(&v) {
                live_saved.push(v);
            }
            continue;
        }
        if live[v.node.index()] {
            continue;
        }
        live[v.node.index()] = true;
        stack.extend(g.operands(v.node));
    }
    let mut out = Graph::new(g.name.clone());
    out.sources = g.sources.clone();
    let mut map: HashMap<Value, Value> = HashMap::new();
    // Saved inputs first, in graph order, so their order does not depend on `saved`'s.
    live_saved.sort_by_key(|v| (v.node.index(), v.result));
    for v in &live_saved {
        let ty = g
            .value_type(*v)
            .cloned()
            .ok_or(BuildError::DanglingOperand { slot: 0, value: *v })?;
        let id = out.add(
            Op::Input {
                name: saved_name(*v),
                kind: InputKind::Data,
                ty,
            },
            &[],
            g.span(v.node),
            g.layer(v.node),
        )?;
        map.insert(*v, Value::new(id, 0));
    }
    for n in g.nodes() {
        if !live[n.index()] {
            continue;
        }
        let ops: Vec<Value> = g
            .operands(n)
            .into_iter()
            .map(|v| {
                map.get(&v)
                    .copied()
                    .ok_or(BuildError::DanglingOperand { slot: 0, value: v })
            })
            .collect::<Result<_, _>>()?;
        let id = out.add(g.op(n).clone(), &ops, g.span(n), g.layer(n))?;
        for r in 0..g.types(n).len() {
            let v = Value::new(n, r as u16);
            map.entry(v).or_insert(Value::new(id, r as u16));
        }
    }
    for (name, v) in outputs {
        let m = map
            .get(&v)
            .copied()
            .ok_or(BuildError::DanglingOperand { slot: 0, value: v })?;
        out.add_output(name, m);
    }
    let kept = g.nodes().filter(|n| live[n.index()]).collect();
    Ok((out, kept))
}
