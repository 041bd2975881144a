//! DOT output: well-formed, and accepted by Graphviz when it is installed.

mod common;

use common::every_op_graph;
use ir::dot::{DotOptions, to_dot};
use std::io::Write;
use std::process::{Command, Stdio};

/// Braces outside quoted strings balance, and every string is closed.
fn assert_balanced(dot: &str) {
    let (mut depth, mut in_str, mut esc) = (0i64, false, false);
    for c in dot.chars() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                assert!(depth >= 0, "unbalanced `}}` in\n{dot}");
            }
            _ => {}
        }
    }
    assert!(!in_str, "unterminated string in\n{dot}");
    assert_eq!(depth, 0, "unbalanced braces in\n{dot}");
}

/// Runs `dot -Tsvg` when Graphviz is installed; prints a line and passes otherwise.
fn graphviz_accepts(dot: &str) {
    let child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("skipping the Graphviz check: no `dot` binary");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(dot.as_bytes())
        .expect("write to dot");
    let out = child.wait_with_output().expect("dot runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dot failed: {stderr}\n{dot}");
    assert!(!stderr.contains("syntax error"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("<svg"));
}

#[test]
fn whole_graph() {
    let g = every_op_graph();
    let dot = to_dot(&g, &DotOptions::default());
    assert!(
        dot.starts_with("digraph \"every \\\"op\\\"\\\\graph\" {\n"),
        "{dot}"
    );
    assert_balanced(&dot);
    assert!(dot.contains("subgraph cluster_layer_0 {\n    label=\"layer 0\";"));
    assert!(dot.contains("subgraph cluster_layer_1 {"));
    // Labels: op head and types, with the text form's quoting inside DOT's.
    assert!(dot.contains(
        "n1 [label=\"%1 param \\\"backbone.embedding.weight\\\" normal(0.02)\\n[16, 8] f32\", \
         shape=box, style=\"filled\""
    ));
    assert!(dot.contains("matmul{rhs_t}"));
    assert!(dot.contains("\\\\u{1}"), "control characters stay visible");
    // Edge labels: slot for multi-operand consumers, `.1` for result 1.
    assert!(dot.contains("  n1 -> n2 [label=\"0\"];\n"));
    assert!(dot.contains("  n6 -> n"), "{dot}");
    assert!(dot.contains("[label=\".1\"]"));
    // Outputs as sinks.
    assert!(dot.contains("out0 [label=\"output \\\"logits\\\"\", shape=invhouse"));
    assert!(dot.contains("  n6 -> out1 [label=\".1\"];\n"));
    let nodes = dot
        .lines()
        .filter(|l| l.trim_start().starts_with('n') && l.contains("[label=") && !l.contains("->"))
        .count();
    assert_eq!(nodes, g.len());
    graphviz_accepts(&dot);
}

#[test]
fn layer_range() {
    let g = every_op_graph();
    let dot = to_dot(&g, &DotOptions { layers: Some(1..2) });
    assert_balanced(&dot);
    assert!(dot.contains("subgraph cluster_layer_1 {"));
    assert!(!dot.contains("cluster_layer_0"));
    assert!(!dot.contains("causal_conv1d"));
    // The embedding table is an operand of the layer-free head, not of layer 1: left out.
    assert!(!dot.contains("n1 ["));
    assert!(!dot.contains("output \\\"logits\\\""));
    assert!(dot.contains("output \\\"backbone.layers.1.mixer.ssm_state\\\""));
    graphviz_accepts(&dot);

    // Nodes outside any layer that feed the range are drawn dashed.
    let dot0 = to_dot(&g, &DotOptions { layers: Some(0..1) });
    assert_balanced(&dot0);
    let gather = dot0
        .lines()
        .find(|l| l.starts_with("  n2 ["))
        .expect("gather is context");
    assert!(gather.contains("dashed"), "{gather}");
    assert!(dot0.contains("  n2 -> n6 [label=\"0\"];"));
    assert!(!dot0.contains("  n0 ["), "only direct operands are context");
    graphviz_accepts(&dot0);

    let empty = to_dot(&g, &DotOptions { layers: Some(5..9) });
    assert_balanced(&empty);
    assert!(!empty.contains("->"));
    graphviz_accepts(&empty);
}

#[test]
fn empty_and_odd_graphs() {
    let mut g = ir::Graph::new("");
    g.add_output("nothing", ir::Value::from(ir::NodeId::from_index(3)));
    let dot = to_dot(&g, &DotOptions::default());
    assert_balanced(&dot);
    assert!(dot.starts_with("digraph \"\" {"));
    graphviz_accepts(&dot);
}
