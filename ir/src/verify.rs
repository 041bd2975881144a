//! The verifier: checks the invariants every pass may assume and must keep.
//!
//! [`verify`] checks, and reports every violation it finds (not just the first):
//!
//! 1. **Side tables.** The result-type, span and layer tables have exactly one entry per
//!    node. If not, nothing else is checked (the other checks read those tables).
//! 2. **Operand slots.** A non-leaf node's operand slots are exactly `0..arity` with no gaps
//!    or duplicates; for the variadic `concat`, `0..k` for some `k >= 1`.
//! 3. **Result indices.** Every operand edge uses a result index below the producer's
//!    [`Op::num_results`].
//! 4. **Order and acyclicity.** Every operand is created before its user (so node order is a
//!    topological order), and the graph has no cycle.
//! 5. **Types.** Each node stores exactly [`Op::num_results`] result types, and they equal
//!    [`infer`] applied to the op and its operand types (the stored types of the operands).
//!    The comparison with `infer` is skipped for nodes that fail 2, 3 or 6, and for nodes
//!    whose operands' types are missing (their producers are reported instead).
//! 6. **Leaves.** `input`, `state`, `param` and `const` nodes have no operands.
//! 7. **Names.** Parameter names are non-empty and unique among parameters; input names
//!    (data and state) are non-empty and unique among inputs. Output names are non-empty and
//!    unique among outputs, and every output value exists (its node exists and the result
//!    index is below the node's `num_results`).
//! 8. **Spans.** `start <= end`, and when the graph has sources, `file < sources.len()`.
//! 9. **Layers.** A node's layer index is below [`Graph::num_layers`] (since `num_layers` is
//!    the highest index + 1, this only guards the layer table against a future change of that
//!    definition), and a parameter whose dotted name has the components `layers.{i}.`
//!    (`backbone.layers.3.mixer.A_log`, or the name starting with `layers.3.`) is in layer
//!    `i`.

use crate::graph::{Graph, NodeId, Span, Value};
use crate::infer::{TypeError, infer};
use crate::op::Op;
use crate::text::types_to_string;
use crate::types::TensorType;
use std::collections::HashMap;
use thiserror::Error;

/// One violated invariant (the number in the module documentation is in brackets).
#[derive(Clone, Debug, PartialEq, Error)]
pub enum VerifyError {
    #[error(
        "[1] side tables out of step: {nodes} nodes but {types} type, {spans} span and \
         {layers} layer entries"
    )]
    SideTables {
        nodes: usize,
        types: usize,
        spans: usize,
        layers: usize,
    },
    #[error("[2] {node} ({op}): operand slots are {found:?}, expected {expected}")]
    OperandSlots {
        node: NodeId,
        op: &'static str,
        found: Vec<u16>,
        expected: String,
    },
    #[error(
        "[3] {node} ({op}): operand {slot} uses result {result} of {producer}, which has \
         {available} result(s)"
    )]
    ResultIndex {
        node: NodeId,
        op: &'static str,
        slot: u16,
        producer: NodeId,
        result: u16,
        available: usize,
    },
    #[error("[4] {node} ({op}): operand {slot} is {producer}, which is not created before it")]
    OperandOrder {
        node: NodeId,
        op: &'static str,
        slot: u16,
        producer: NodeId,
    },
    #[error("[4] the graph has a cycle")]
    Cycle,
    #[error("[5] {node} ({op}): stores {found} result type(s), the op has {expected}")]
    ResultCount {
        node: NodeId,
        op: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("[5] {node} ({op}): does not type-check: {error}")]
    Type {
        node: NodeId,
        op: &'static str,
        error: TypeError,
    },
    #[error(
        "[5] {node} ({op}): stored result types {} differ from the inferred {}",
        types_to_string(.stored),
        types_to_string(.inferred)
    )]
    ResultTypes {
        node: NodeId,
        op: &'static str,
        stored: Vec<TensorType>,
        inferred: Vec<TensorType>,
    },
    #[error("[6] {node} ({op}): a leaf op has {count} operand(s)")]
    LeafOperands {
        node: NodeId,
        op: &'static str,
        count: usize,
    },
    #[error("[7] {node} ({op}): the name is empty")]
    EmptyName { node: NodeId, op: &'static str },
    #[error("[7] {node} ({op}): the name {name:?} is already used by {first}")]
    DuplicateName {
        node: NodeId,
        op: &'static str,
        name: String,
        first: NodeId,
    },
    #[error("[7] output #{index}: the name is empty")]
    EmptyOutputName { index: usize },
    #[error("[7] output #{index}: the name {name:?} is already used by output #{first}")]
    DuplicateOutput {
        index: usize,
        name: String,
        first: usize,
    },
    #[error("[7] output #{index} ({name:?}): the value {value} does not exist")]
    DanglingOutput {
        index: usize,
        name: String,
        value: Value,
    },
    #[error(
        "[8] {node} ({op}): span {}:{}..{} is not a valid range of one of the {sources} source(s)",
        .span.file, .span.start, .span.end
    )]
    BadSpan {
        node: NodeId,
        op: &'static str,
        span: Span,
        sources: usize,
    },
    #[error("[9] {node} ({op}): layer {layer} is not below the number of layers {num_layers}")]
    LayerRange {
        node: NodeId,
        op: &'static str,
        layer: u32,
        num_layers: u32,
    },
    #[error("[9] {node} ({op}): parameter {name:?} belongs to layer {expected} by its name, but the node is in {}",
        match .found { Some(l) => format!("layer {l}"), None => "no layer".to_string() })]
    ParamLayer {
        node: NodeId,
        op: &'static str,
        name: String,
        expected: u32,
        found: Option<u32>,
    },
}

/// Checks every invariant listed in the module documentation; `Err` holds all violations,
/// in node order, then the outputs.
pub fn verify(g: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errs = Vec::new();
    // 1. Side tables.
    let (nodes, types, spans, layers) = g.table_lens();
    if types != nodes || spans != nodes || layers != nodes {
        return Err(vec![VerifyError::SideTables {
            nodes,
            types,
            spans,
            layers,
        }]);
    }

    let num_layers = g.num_layers();
    let mut params: HashMap<&str, NodeId> = HashMap::new();
    let mut inputs: HashMap<&str, NodeId> = HashMap::new();
    for n in g.nodes() {
        let op = g.op(n);
        let name = op.name();
        let mut edges = g.operand_edges(n);
        edges.sort_by_key(|(w, _)| w.slot);
        let mut operands_ok = true;

        // 6. Leaves, else 2. operand slots.
        if op.arity() == Some(0) {
            if !edges.is_empty() {
                errs.push(VerifyError::LeafOperands {
                    node: n,
                    op: name,
                    count: edges.len(),
                });
                operands_ok = false;
            }
        } else {
            let dense = edges
                .iter()
                .enumerate()
                .all(|(i, (w, _))| usize::from(w.slot) == i);
            let count_ok = match op.arity() {
                Some(k) => edges.len() == k,
                None => !edges.is_empty(),
            };
            if !dense || !count_ok {
                errs.push(VerifyError::OperandSlots {
                    node: n,
                    op: name,
                    found: edges.iter().map(|(w, _)| w.slot).collect(),
                    expected: match op.arity() {
                        Some(k) => format!("0..{k}"),
                        None => "0..k with k >= 1".into(),
                    },
                });
                operands_ok = false;
            }
        }

        for &(w, producer) in &edges {
            // 3. Result indices.
            let available = g.op(producer).num_results();
            if usize::from(w.result) >= available {
                errs.push(VerifyError::ResultIndex {
                    node: n,
                    op: name,
                    slot: w.slot,
                    producer,
                    result: w.result,
                    available,
                });
                operands_ok = false;
            }
            // 4. Operands come first.
            if producer >= n {
                errs.push(VerifyError::OperandOrder {
                    node: n,
                    op: name,
                    slot: w.slot,
                    producer,
                });
            }
        }

        // 5. Types.
        let stored = g.types(n);
        if stored.len() != op.num_results() {
            errs.push(VerifyError::ResultCount {
                node: n,
                op: name,
                found: stored.len(),
                expected: op.num_results(),
            });
        } else if operands_ok {
            let operand_types: Option<Vec<&TensorType>> = edges
                .iter()
                .map(|&(w, p)| g.value_type(Value::new(p, w.result)))
                .collect();
            if let Some(ts) = operand_types {
                match infer(op, &ts) {
                    Err(error) => errs.push(VerifyError::Type {
                        node: n,
                        op: name,
                        error,
                    }),
                    Ok(inferred) if inferred != stored => errs.push(VerifyError::ResultTypes {
                        node: n,
                        op: name,
                        stored: stored.to_vec(),
                        inferred,
                    }),
                    Ok(_) => {}
                }
            }
        }

        // 7. Parameter and input names.
        let named = match op {
            Op::Param { name: pname, .. } => Some((pname, &mut params)),
            Op::Input { name: iname, .. } => Some((iname, &mut inputs)),
            _ => None,
        };
        if let Some((node_name, seen)) = named {
            if node_name.is_empty() {
                errs.push(VerifyError::EmptyName { node: n, op: name });
            } else if let Some(&first) = seen.get(node_name.as_str()) {
                errs.push(VerifyError::DuplicateName {
                    node: n,
                    op: name,
                    name: node_name.clone(),
                    first,
                });
            } else {
                seen.insert(node_name, n);
            }
        }

        // 8. Spans.
        let span = g.span(n);
        if span.start > span.end
            || (!g.sources.is_empty() && usize::from(span.file) >= g.sources.len())
        {
            errs.push(VerifyError::BadSpan {
                node: n,
                op: name,
                span,
                sources: g.sources.len(),
            });
        }

        // 9. Layers.
        let layer = g.layer(n);
        if let Some(l) = layer.filter(|&l| l >= num_layers) {
            errs.push(VerifyError::LayerRange {
                node: n,
                op: name,
                layer: l,
                num_layers,
            });
        }
        if let Op::Param { name: pname, .. } = op
            && let Some(expected) = layer_of_name(pname)
            && layer != Some(expected)
        {
            errs.push(VerifyError::ParamLayer {
                node: n,
                op: name,
                name: pname.clone(),
                expected,
                found: layer,
            });
        }
    }

    // 4. No cycle. An edge against node order is reported above; this is the global check.
    // `toposort` rather than `is_cyclic_directed`: the latter recurses once per node of a
    // path and overflows the stack on long chains (a few hundred thousand nodes).
    if petgraph::algo::toposort(g.petgraph(), None).is_err() {
        errs.push(VerifyError::Cycle);
    }

    // 7. Outputs.
    let mut outs: HashMap<&str, usize> = HashMap::new();
    for (index, (oname, v)) in g.outputs().iter().enumerate() {
        if oname.is_empty() {
            errs.push(VerifyError::EmptyOutputName { index });
        } else if let Some(&first) = outs.get(oname.as_str()) {
            errs.push(VerifyError::DuplicateOutput {
                index,
                name: oname.clone(),
                first,
            });
        } else {
            outs.insert(oname, index);
        }
        let exists = g.contains(v.node) && usize::from(v.result) < g.op(v.node).num_results();
        if !exists {
            errs.push(VerifyError::DanglingOutput {
                index,
                name: oname.clone(),
                value: *v,
            });
        }
    }

    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// The `i` of a dotted name with the components `layers.{i}.` (followed by at least one more
/// component): `backbone.layers.3.mixer.A_log` -> 3.
fn layer_of_name(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(3).find_map(|w| match w {
        ["layers", i, _] if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
            i.parse().ok()
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Operand;
    use crate::op::{BinaryOp, Init, InputKind, UnaryOp};
    use crate::types::{DType, Dim};

    fn t(shape: &[u64]) -> TensorType {
        TensorType::new(DType::F32, shape.iter().map(|&n| Dim::known(n)).collect())
    }

    fn input(name: &str, ty: TensorType) -> Op {
        Op::Input {
            name: name.into(),
            kind: InputKind::Data,
            ty,
        }
    }

    fn param(name: &str, ty: TensorType) -> Op {
        Op::Param {
            name: name.into(),
            ty,
            init: Init::Zeros,
        }
    }

    fn edge(slot: u16, result: u16) -> Operand {
        Operand { slot, result }
    }

    /// `x [B, 4]`, `w [4]` (layer 0), `exp(x)`, `add(exp, exp)`, one output.
    fn valid() -> (Graph, [NodeId; 4]) {
        let mut g = Graph::new("ok");
        g.sources = vec!["a.m2".into()];
        let sp = Span::new(0, 1, 2);
        let ty = TensorType::new(DType::F32, vec![Dim::sym("B"), Dim::known(4)]);
        let x = g.add(input("x", ty), &[], sp, None).unwrap();
        let w = g
            .add(param("backbone.layers.0.w", t(&[4])), &[], sp, Some(0))
            .unwrap();
        let e = g
            .add(Op::Unary(UnaryOp::Exp), &[x.into()], sp, Some(0))
            .unwrap();
        let a = g
            .add(
                Op::Binary(BinaryOp::Add),
                &[e.into(), e.into()],
                sp,
                Some(0),
            )
            .unwrap();
        g.add_output("y", a.into());
        (g, [x, w, e, a])
    }

    fn errors(g: &Graph) -> Vec<VerifyError> {
        verify(g).expect_err("the graph is invalid")
    }

    #[test]
    fn valid_graph_passes() {
        assert_eq!(verify(&valid().0), Ok(()));
        assert_eq!(verify(&Graph::new("")), Ok(()));
    }

    #[test]
    fn side_tables() {
        let (mut g, _) = valid();
        g.tables_mut().1.pop();
        let errs = errors(&g);
        assert!(matches!(
            errs[..],
            [VerifyError::SideTables {
                nodes: 4,
                types: 4,
                spans: 3,
                layers: 4
            }]
        ));
        assert!(errs[0].to_string().starts_with("[1] side tables"));
    }

    #[test]
    fn operand_slots() {
        let (mut g, [x, ..]) = valid();
        // A gap: slots 0 and 2.
        let n = g.add_unchecked(
            Op::Binary(BinaryOp::Mul),
            vec![t(&[4])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(x, n, edge(0, 0));
        g.add_edge_unchecked(x, n, edge(2, 0));
        // A duplicate: slot 0 twice.
        let m = g.add_unchecked(
            Op::Unary(UnaryOp::Neg),
            vec![t(&[4])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(x, m, edge(0, 0));
        g.add_edge_unchecked(x, m, edge(0, 0));
        // A concat without operands.
        let c = g.add_unchecked(Op::Concat { axis: 0 }, vec![t(&[4])], Span::default(), None);
        let errs = errors(&g);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            matches!(&errs[0], VerifyError::OperandSlots { node, op: "mul", found, .. }
                if *node == n && found == &[0, 2])
        );
        assert_eq!(
            errs[0].to_string(),
            "[2] %4 (mul): operand slots are [0, 2], expected 0..2"
        );
        assert!(matches!(&errs[1], VerifyError::OperandSlots { node, .. } if *node == m));
        assert!(matches!(&errs[2], VerifyError::OperandSlots { node, .. } if *node == c));
    }

    #[test]
    fn result_index() {
        let (mut g, [x, ..]) = valid();
        let n = g.add_unchecked(
            Op::Unary(UnaryOp::Neg),
            vec![t(&[4])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(x, n, edge(0, 1));
        let errs = errors(&g);
        assert!(matches!(
            &errs[..],
            [VerifyError::ResultIndex {
                result: 1,
                available: 1,
                ..
            }]
        ));
        assert!(errs[0].to_string().contains("uses result 1 of %0"));
    }

    #[test]
    fn order_and_cycles() {
        let mut g = Graph::new("cyclic");
        let ty = t(&[4]);
        let a = g.add_unchecked(
            Op::Unary(UnaryOp::Neg),
            vec![ty.clone()],
            Span::default(),
            None,
        );
        let b = g.add_unchecked(Op::Unary(UnaryOp::Exp), vec![ty], Span::default(), None);
        g.add_edge_unchecked(b, a, edge(0, 0));
        g.add_edge_unchecked(a, b, edge(0, 0));
        let errs = errors(&g);
        assert!(
            matches!(&errs[..], [VerifyError::OperandOrder { node, producer, .. }, VerifyError::Cycle]
                if *node == a && *producer == b),
            "{errs:#?}"
        );
        // A self-loop is both.
        let mut g = Graph::new("self");
        let a = g.add_unchecked(
            Op::Unary(UnaryOp::Neg),
            vec![t(&[4])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(a, a, edge(0, 0));
        let errs = errors(&g);
        assert!(matches!(
            errs[..],
            [VerifyError::OperandOrder { .. }, VerifyError::Cycle]
        ));
    }

    #[test]
    fn types() {
        let (mut g, [x, w, ..]) = valid();
        // Wrong stored type.
        let n = g.add_unchecked(
            Op::Unary(UnaryOp::Neg),
            vec![t(&[5])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(x, n, edge(0, 0));
        // Wrong count.
        let c = g.add_unchecked(Op::Unary(UnaryOp::Neg), vec![], Span::default(), None);
        g.add_edge_unchecked(x, c, edge(0, 0));
        // Does not type-check: shapes [B, 4] and [4].
        let m = g.add_unchecked(
            Op::Binary(BinaryOp::Add),
            vec![t(&[4])],
            Span::default(),
            None,
        );
        g.add_edge_unchecked(x, m, edge(0, 0));
        g.add_edge_unchecked(w, m, edge(1, 0));
        let errs = errors(&g);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(matches!(&errs[0], VerifyError::ResultTypes { node, .. } if *node == n));
        assert_eq!(
            errs[0].to_string(),
            "[5] %4 (neg): stored result types [5] f32 differ from the inferred [B, 4] f32"
        );
        assert!(matches!(
            &errs[1],
            VerifyError::ResultCount {
                found: 0,
                expected: 1,
                ..
            }
        ));
        assert!(matches!(
            &errs[2],
            VerifyError::Type {
                error: TypeError::ShapeMismatch { .. },
                ..
            }
        ));
        // Tampering with an existing node's types is caught too.
        let (mut g, [x, ..]) = valid();
        g.tables_mut().0[x.index()] = vec![t(&[4, 4])];
        let errs = errors(&g);
        assert!(matches!(&errs[0], VerifyError::ResultTypes { node, .. } if *node == x));
    }

    #[test]
    fn leaves_have_no_operands() {
        let (mut g, [x, w, ..]) = valid();
        g.add_edge_unchecked(x, w, edge(0, 0));
        let errs = errors(&g);
        assert!(matches!(
            &errs[..],
            [VerifyError::LeafOperands {
                op: "param",
                count: 1,
                ..
            }]
        ));
    }

    #[test]
    fn names() {
        let (mut g, _) = valid();
        let sp = Span::new(0, 0, 0);
        g.add(param("backbone.layers.0.w", t(&[4])), &[], sp, Some(0))
            .unwrap();
        g.add(input("", t(&[1])), &[], sp, None).unwrap();
        // A parameter and an input may share a name; two inputs may not.
        g.add(input("backbone.layers.0.w", t(&[1])), &[], sp, None)
            .unwrap();
        g.add(input("x", t(&[1])), &[], sp, None).unwrap();
        g.add_output("y", NodeId::from_index(0).into());
        g.add_output("", NodeId::from_index(0).into());
        g.add_output("z", NodeId::from_index(99).into());
        g.add_output("w", Value::new(NodeId::from_index(0), 1));
        let errs = errors(&g);
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            [
                "[7] %4 (param): the name \"backbone.layers.0.w\" is already used by %1",
                "[7] %5 (input): the name is empty",
                "[7] %7 (input): the name \"x\" is already used by %0",
                "[7] output #1: the name \"y\" is already used by output #0",
                "[7] output #2: the name is empty",
                "[7] output #3 (\"z\"): the value %99 does not exist",
                "[7] output #4 (\"w\"): the value %0.1 does not exist",
            ]
        );
    }

    #[test]
    fn spans() {
        let (mut g, [x, w, ..]) = valid();
        g.tables_mut().1[x.index()] = Span::new(1, 0, 0);
        g.tables_mut().1[w.index()] = Span::new(0, 5, 4);
        let errs = errors(&g);
        assert_eq!(errs.len(), 2);
        assert!(matches!(&errs[0], VerifyError::BadSpan { node, sources: 1, .. } if *node == x));
        assert!(matches!(&errs[1], VerifyError::BadSpan { node, .. } if *node == w));
        // Without sources any file is accepted.
        let (mut g, [x, ..]) = valid();
        g.sources.clear();
        g.tables_mut().1[x.index()] = Span::new(7, 0, 0);
        assert_eq!(verify(&g), Ok(()));
    }

    #[test]
    fn param_layers() {
        let (mut g, [_, w, ..]) = valid();
        g.tables_mut().2[w.index()] = Some(1);
        let errs = errors(&g);
        assert_eq!(
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            [
                "[9] %1 (param): parameter \"backbone.layers.0.w\" belongs to layer 0 by its name, but the node is in layer 1"
            ]
        );
        g.tables_mut().2[w.index()] = None;
        assert!(
            errors(&g)[0]
                .to_string()
                .ends_with("but the node is in no layer")
        );
    }

    #[test]
    fn layer_names() {
        assert_eq!(layer_of_name("backbone.layers.12.mixer.A_log"), Some(12));
        assert_eq!(layer_of_name("layers.3.norm.weight"), Some(3));
        assert_eq!(layer_of_name("model.layers.x.layers.4.w"), Some(4));
        assert_eq!(layer_of_name("backbone.layers.3"), None);
        assert_eq!(layer_of_name("backbone.mylayers.3.w"), None);
        assert_eq!(layer_of_name("layers..w"), None);
        assert_eq!(layer_of_name("layers.99999999999.w"), None);
        assert_eq!(layer_of_name("lm_head.weight"), None);
    }
}
