//! Graphviz DOT output, for looking at graphs: `dot -Tsvg graph.dot > graph.svg`.
//!
//! - one node per IR node, labelled `%n op{attrs}` over its result type(s), in the text
//!   form's notation; inputs, states, parameters and constants are filled boxes of distinct
//!   colours, the other ops plain ellipses;
//! - one edge per operand, labelled with the operand slot when the consumer has more than one
//!   operand and with `.1` when it uses result 1 of the producer;
//! - nodes of layer `i` inside `subgraph cluster_layer_i { label="layer i" }`;
//! - one sink node (`shape=invhouse`) per graph output.
//!
//! Labels are plain double-quoted strings (no record or HTML labels), so only `"` and `\`
//! need escaping; braces and angle brackets are ordinary characters there. Names inside
//! labels are quoted as in the text form, so control characters appear as escapes.

use crate::graph::{Graph, NodeId};
use crate::op::{InputKind, Op};
use crate::text::{node_head, types_to_string, write_string};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::ops::Range;

/// What [`to_dot`] draws.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DotOptions {
    /// When set, only the nodes whose layer is in this range, plus the nodes outside any layer
    /// that are direct operands of those (drawn dashed), and the outputs of drawn nodes.
    /// Operands in other layers are left out, with their edges.
    pub layers: Option<Range<u32>>,
}

/// How a node is drawn.
#[derive(Clone, Copy, PartialEq)]
enum Shown {
    Hidden,
    Full,
    /// An operand from outside the selected layers, drawn dashed for context.
    Context,
}

/// The DOT text of `g`.
pub fn to_dot(g: &Graph, opts: &DotOptions) -> String {
    let mut shown = vec![Shown::Full; g.len()];
    if let Some(range) = &opts.layers {
        for n in g.nodes() {
            if !g.layer(n).is_some_and(|l| range.contains(&l)) {
                shown[n.index()] = Shown::Hidden;
            }
        }
        for n in g.nodes() {
            if shown[n.index()] != Shown::Full {
                continue;
            }
            for v in g.operands(n) {
                let p = v.node.index();
                if g.layer(v.node).is_none() && shown.get(p) == Some(&Shown::Hidden) {
                    shown[p] = Shown::Context;
                }
            }
        }
    }
    let is_shown = |n: NodeId| shown.get(n.index()).is_some_and(|s| *s != Shown::Hidden);

    let mut out = String::new();
    out.push_str("digraph ");
    out.push_str(&quote(&g.name));
    out.push_str(" {\n");
    out.push_str("  node [fontname=\"monospace\", fontsize=10];\n");
    out.push_str("  edge [fontname=\"monospace\", fontsize=9];\n");

    let mut layers: BTreeMap<u32, Vec<NodeId>> = BTreeMap::new();
    for n in g.nodes() {
        let s = shown[n.index()];
        if s == Shown::Hidden {
            continue;
        }
        match g.layer(n) {
            Some(l) => layers.entry(l).or_default().push(n),
            None => node_line(&mut out, g, n, s, "  "),
        }
    }
    for (l, nodes) in &layers {
        let _ = writeln!(out, "  subgraph cluster_layer_{l} {{");
        let _ = writeln!(out, "    label=\"layer {l}\";");
        for &n in nodes {
            node_line(&mut out, g, n, shown[n.index()], "    ");
        }
        out.push_str("  }\n");
    }

    for n in g.nodes() {
        if shown[n.index()] != Shown::Full {
            continue;
        }
        let operands = g.operands(n);
        for (slot, v) in operands.iter().enumerate() {
            if !is_shown(v.node) {
                continue;
            }
            let mut label = Vec::new();
            if operands.len() > 1 {
                label.push(slot.to_string());
            }
            if v.result != 0 {
                label.push(format!(".{}", v.result));
            }
            let _ = write!(out, "  n{} -> n{}", v.node.index(), n.index());
            if !label.is_empty() {
                let _ = write!(out, " [label={}]", quote(&label.join(" ")));
            }
            out.push_str(";\n");
        }
    }

    for (i, (name, v)) in g.outputs().iter().enumerate() {
        let exists = g.contains(v.node);
        if opts.layers.is_some() && !(exists && is_shown(v.node)) {
            continue;
        }
        let mut label = String::from("output ");
        let _ = write_string(&mut label, name);
        let _ = writeln!(
            out,
            "  out{i} [label={}, shape=invhouse, style=filled, fillcolor=\"#f4cccc\"];",
            quote(&label)
        );
        if exists && is_shown(v.node) {
            let _ = write!(out, "  n{} -> out{i}", v.node.index());
            if v.result != 0 {
                let _ = write!(out, " [label=\".{}\"]", v.result);
            }
            out.push_str(";\n");
        }
    }
    out.push_str("}\n");
    out
}

fn node_line(out: &mut String, g: &Graph, n: NodeId, shown: Shown, indent: &str) {
    let label = format!("{}\n{}", node_head(g, n), types_to_string(g.types(n)));
    let mut style: Vec<&str> = Vec::new();
    let fill = match g.op(n) {
        Op::Input {
            kind: InputKind::Data,
            ..
        } => Some("#cfe2f3"),
        Op::Input {
            kind: InputKind::State,
            ..
        } => Some("#fff2cc"),
        Op::Param { .. } => Some("#d9ead3"),
        Op::Const { .. } => Some("#eeeeee"),
        _ => None,
    };
    let mut attrs = format!("label={}", quote(&label));
    if fill.is_some() {
        attrs.push_str(", shape=box");
        style.push("filled");
    }
    if shown == Shown::Context {
        style.push("dashed");
    }
    if !style.is_empty() {
        let _ = write!(attrs, ", style=\"{}\"", style.join(","));
    }
    if let Some(c) = fill {
        let _ = write!(attrs, ", fillcolor=\"{c}\"");
    }
    let _ = writeln!(out, "{indent}n{} [{attrs}];", n.index());
}

/// A DOT double-quoted string: `"` and `\` escaped, newlines as the `\n` line break, other
/// control characters shown as `\u{..}`.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(q, "\\\\u{{{:x}}}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}
