//! The graph: ops as petgraph nodes, operands as edges, per-node facts in side tables.
//!
//! Operands are stored once, as edges `producer -> consumer` weighted by [`Operand`] (which
//! operand slot, which result of the producer). Result types, source spans and layer indices
//! are side tables indexed by [`NodeId`]. Nodes are only appended, never removed: passes that
//! delete build a new graph, so ids stay dense and side tables stay plain vectors.

use crate::infer::{TypeError, infer};
use crate::op::Op;
use crate::types::TensorType;
use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::fmt;

/// A node of a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex<u32>);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }

    pub fn from_index(i: usize) -> NodeId {
        NodeId(NodeIndex::new(i))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.index())
    }
}

/// One result of a node: `%n` is result 0, `%n.1` result 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub result: u16,
}

impl Value {
    pub fn new(node: NodeId, result: u16) -> Value {
        Value { node, result }
    }
}

impl From<NodeId> for Value {
    fn from(node: NodeId) -> Value {
        Value { node, result: 0 }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.result == 0 {
            write!(f, "{}", self.node)
        } else {
            write!(f, "{}.{}", self.node, self.result)
        }
    }
}

/// Edge weight: the consumer's operand slot and the producer's result index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub slot: u16,
    pub result: u16,
}

/// A byte range in a DSL source file; `file` indexes [`Graph::sources`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: u16,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: u16, start: u32, end: u32) -> Span {
        Span { file, start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

/// Why a node could not be added.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("operand {slot} refers to {value}, which does not exist")]
    DanglingOperand { slot: usize, value: Value },
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error("the graph is limited to {limit} nodes")]
    TooManyNodes { limit: usize },
    #[error("a node takes at most {limit} operands, got {got}")]
    TooManyOperands { limit: usize, got: usize },
}

/// A dataflow graph of primitive ops.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The model's name (`mamba-130m`, or the model definition's name).
    pub name: String,
    /// Source file names that spans point into.
    pub sources: Vec<String>,
    g: DiGraph<Op, Operand, u32>,
    types: Vec<Vec<TensorType>>,
    spans: Vec<Span>,
    layers: Vec<Option<u32>>,
    outputs: Vec<(String, Value)>,
}

impl Graph {
    /// The most nodes one graph may hold; elaboration reports a limit error past it.
    pub const MAX_NODES: usize = 4_000_000;

    /// The most operands one node may take: operand slots are `u16`.
    pub const MAX_OPERANDS: usize = u16::MAX as usize + 1;

    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Node ids in creation order, which is a topological order (operands exist first).
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    pub fn contains(&self, n: NodeId) -> bool {
        n.index() < self.len()
    }

    /// Appends a node after inferring its result types; operands must already exist.
    pub fn add(
        &mut self,
        op: Op,
        operands: &[Value],
        span: Span,
        layer: Option<u32>,
    ) -> Result<NodeId, BuildError> {
        if self.len() >= Self::MAX_NODES {
            return Err(BuildError::TooManyNodes {
                limit: Self::MAX_NODES,
            });
        }
        if operands.len() > Self::MAX_OPERANDS {
            return Err(BuildError::TooManyOperands {
                limit: Self::MAX_OPERANDS,
                got: operands.len(),
            });
        }
        let mut tys = Vec::with_capacity(operands.len());
        for (slot, v) in operands.iter().enumerate() {
            match self.value_type(*v) {
                Some(t) => tys.push(t),
                None => return Err(BuildError::DanglingOperand { slot, value: *v }),
            }
        }
        let results = infer(&op, &tys)?;
        let id = NodeId(self.g.add_node(op));
        for (slot, v) in operands.iter().enumerate() {
            let w = Operand {
                slot: slot as u16,
                result: v.result,
            };
            self.g.add_edge(v.node.0, id.0, w);
        }
        self.types.push(results);
        self.spans.push(span);
        self.layers.push(layer);
        Ok(id)
    }

    pub fn op(&self, n: NodeId) -> &Op {
        &self.g[n.0]
    }

    /// Operands of `n`, in slot order.
    pub fn operands(&self, n: NodeId) -> Vec<Value> {
        let mut ops: Vec<(u16, Value)> = self
            .g
            .edges_directed(n.0, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().slot,
                    Value::new(NodeId(e.source()), e.weight().result),
                )
            })
            .collect();
        ops.sort_by_key(|(slot, _)| *slot);
        ops.into_iter().map(|(_, v)| v).collect()
    }

    /// Raw operand edges of `n` (slot, value), unsorted; for the verifier.
    pub fn operand_edges(&self, n: NodeId) -> Vec<(Operand, NodeId)> {
        self.g
            .edges_directed(n.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect()
    }

    /// Nodes that use a result of `n`.
    pub fn users(&self, n: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self
            .g
            .neighbors_directed(n.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        u.sort();
        u.dedup();
        u
    }

    /// Result types of `n`.
    pub fn types(&self, n: NodeId) -> &[TensorType] {
        &self.types[n.index()]
    }

    /// Type of one value; `None` if it does not exist.
    pub fn value_type(&self, v: Value) -> Option<&TensorType> {
        self.types.get(v.node.index())?.get(v.result as usize)
    }

    pub fn span(&self, n: NodeId) -> Span {
        self.spans[n.index()]
    }

    /// The layer instance `n` belongs to (`None` outside `repeat`).
    pub fn layer(&self, n: NodeId) -> Option<u32> {
        self.layers[n.index()]
    }

    pub fn outputs(&self) -> &[(String, Value)] {
        &self.outputs
    }

    /// Declares `v` a graph output named `name`.
    pub fn add_output(&mut self, name: impl Into<String>, v: Value) {
        self.outputs.push((name.into(), v));
    }

    /// The underlying petgraph graph, for algorithms (topological sort, cycles, DOT).
    pub fn petgraph(&self) -> &DiGraph<Op, Operand, u32> {
        &self.g
    }

    /// Side-table lengths, for the verifier: (nodes, types, spans, layers).
    pub(crate) fn table_lens(&self) -> (usize, usize, usize, usize) {
        (
            self.g.node_count(),
            self.types.len(),
            self.spans.len(),
            self.layers.len(),
        )
    }

    /// Nodes whose op is a parameter, in creation order.
    pub fn params(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes()
            .filter(|&n| matches!(self.op(n), Op::Param { .. }))
    }

    /// Total number of parameter elements; `None` if a parameter shape is symbolic.
    pub fn param_count(&self) -> Option<u64> {
        self.params().try_fold(0u64, |acc, n| {
            let t = &self.types(n)[0];
            let n = crate::types::numel(&t.shape)?.as_known()?;
            acc.checked_add(n)
        })
    }

    /// Highest layer index + 1 (0 without layers).
    pub fn num_layers(&self) -> u32 {
        self.layers
            .iter()
            .flatten()
            .map(|l| l + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Raw building for the verifier's tests: these bypass inference and every check, so they can
/// produce graphs that break the invariants `verify` checks. Test builds only.
#[cfg(test)]
impl Graph {
    /// Appends a node with the given result types and no operands, without inference.
    pub(crate) fn add_unchecked(
        &mut self,
        op: Op,
        types: Vec<TensorType>,
        span: Span,
        layer: Option<u32>,
    ) -> NodeId {
        let id = NodeId(self.g.add_node(op));
        self.types.push(types);
        self.spans.push(span);
        self.layers.push(layer);
        id
    }

    /// Adds an operand edge `from -> to` as is (any slot, any result, any direction).
    pub(crate) fn add_edge_unchecked(&mut self, from: NodeId, to: NodeId, w: Operand) {
        self.g.add_edge(from.0, to.0, w);
    }

    /// The side tables, for tampering: (types, spans, layers).
    pub(crate) fn tables_mut(
        &mut self,
    ) -> (
        &mut Vec<Vec<TensorType>>,
        &mut Vec<Span>,
        &mut Vec<Option<u32>>,
    ) {
        (&mut self.types, &mut self.spans, &mut self.layers)
    }
}
