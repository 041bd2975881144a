//! The recurrent step, derived from the model graph.
//!
//! A model graph's stateful ops (`causal_conv1d`, `selective_scan`, `ssd_scan`) take explicit
//! initial states and return final states, and its shapes are symbolic in the batch `B` and
//! the sequence length `L`. The decode step is therefore the same graph with `L` bound to 1:
//! tokens `[B, 1]` and the carried states in, logits `[B, 1, V]` and the next states out.
//! [`specialize`] binds symbols to numbers in every shape (inputs, reshapes, broadcasts) and
//! re-infers every type, so lowering sees a time loop whose trip count is the constant 1 and
//! the memory plan depends on `B` alone. Prefill needs no pass: it is the graph itself over
//! the prompt, returning the final states.

use ir::{Dim, Graph, Op, Shape, TensorType, Value};
use std::collections::HashMap;

/// Why a graph could not be specialized.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("cannot bind `{sym}` to 0: a specialized graph keeps every dimension at least 1")]
    Zero { sym: String },
    #[error("specializing `{graph}`: node {node} ({op}): {source}")]
    Build {
        graph: String,
        node: usize,
        op: &'static str,
        source: Box<ir::BuildError>,
    },
    #[error("internal compiler error: the specialized graph does not verify: {0}")]
    Verify(String),
}

/// `d` with the symbols in `bind` replaced by their values.
pub fn bind_dim(d: &Dim, bind: &HashMap<&str, u64>) -> Dim {
    let mut out = Dim::known(d.coeff());
    for s in d.syms() {
        let f = match bind.get(s.as_str()) {
            Some(&v) => Dim::known(v),
            None => Dim::sym(s),
        };
        // Binding can only make a dimension smaller than its symbolic form could be; an
        // overflow here would need an impossible shape, and the verifier catches the rest.
        out = out.mul(&f).unwrap_or(Dim::known(0));
    }
    out
}

fn bind_shape(s: &Shape, bind: &HashMap<&str, u64>) -> Shape {
    s.iter().map(|d| bind_dim(d, bind)).collect()
}

fn bind_type(t: &TensorType, bind: &HashMap<&str, u64>) -> TensorType {
    TensorType::new(t.dtype, bind_shape(&t.shape, bind))
}

/// The op with its shape attributes bound; ops without shapes are returned as they are.
fn bind_op(op: &Op, bind: &HashMap<&str, u64>) -> Op {
    match op {
        Op::Input { name, kind, ty } => Op::Input {
            name: name.clone(),
            kind: *kind,
            ty: bind_type(ty, bind),
        },
        Op::Param { name, ty, init } => Op::Param {
            name: name.clone(),
            ty: bind_type(ty, bind),
            init: init.clone(),
        },
        Op::Reshape { shape } => Op::Reshape {
            shape: bind_shape(shape, bind),
        },
        Op::Broadcast { shape } => Op::Broadcast {
            shape: bind_shape(shape, bind),
        },
        Op::Const { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Cast { .. }
        | Op::Reduce { .. }
        | Op::MatMul { .. }
        | Op::Permute { .. }
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
        | Op::CrossEntropyGrad { .. } => op.clone(),
    }
}

/// A copy of `g` with the symbols of `bind` (`("L", 1)`) fixed in every shape. Node ids,
/// spans, layers and output names are kept; every type is inferred again, so a binding
/// that makes the graph ill-typed is an error rather than a wrong graph.
pub fn specialize(g: &Graph, bind: &[(&str, u64)]) -> Result<Graph, StepError> {
    if let Some((s, _)) = bind.iter().find(|(_, v)| *v == 0) {
        return Err(StepError::Zero { sym: s.to_string() });
    }
    let bind: HashMap<&str, u64> = bind.iter().copied().collect();
    let mut out = Graph::new(g.name.clone());
    out.sources = g.sources.clone();
    for n in g.nodes() {
        let op = bind_op(g.op(n), &bind);
        let operands = g.operands(n);
        let id = out
            .add(op, &operands, g.span(n), g.layer(n))
            .map_err(|source| StepError::Build {
                graph: g.name.clone(),
                node: n.index(),
                op: g.op(n).name(),
                source: Box::new(source),
            })?;
        debug_assert_eq!(id, n, "nodes are appended in order");
    }
    for (name, v) in g.outputs() {
        out.add_output(name.clone(), Value::new(v.node, v.result));
    }
    ir::verify(&out).map_err(|errs| {
        StepError::Verify(
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(out)
}

/// The one-token step of a model graph: `L` bound to 1.
pub fn step_graph(g: &Graph) -> Result<Graph, StepError> {
    specialize(g, &[("L", 1)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{DType, InputKind, Span};

    #[test]
    fn binds_symbols_in_monomials() {
        let bl = Dim::sym("B")
            .mul(&Dim::sym("L"))
            .unwrap()
            .mul(&Dim::known(3))
            .unwrap();
        let bind = HashMap::from([("L", 1u64)]);
        assert_eq!(
            bind_dim(&bl, &bind),
            Dim::sym("B").mul(&Dim::known(3)).unwrap()
        );
        let bind = HashMap::from([("L", 4u64), ("B", 2)]);
        assert_eq!(bind_dim(&bl, &bind), Dim::known(24));
    }

    #[test]
    fn specializes_inputs_and_reshapes() {
        let mut g = Graph::new("t");
        let (b, l) = (Dim::sym("B"), Dim::sym("L"));
        let x = g
            .add(
                Op::Input {
                    name: "x".into(),
                    kind: InputKind::Data,
                    ty: TensorType::new(DType::F32, vec![b.clone(), l.clone(), Dim::known(4)]),
                },
                &[],
                Span::default(),
                None,
            )
            .unwrap();
        let bl = b.mul(&l).unwrap();
        let r = g
            .add(
                Op::Reshape {
                    shape: vec![bl, Dim::known(4)],
                },
                &[Value::new(x, 0)],
                Span::default(),
                None,
            )
            .unwrap();
        g.add_output("y", Value::new(r, 0));
        let s = step_graph(&g).unwrap();
        let t = s.value_type(s.outputs()[0].1).unwrap();
        assert_eq!(t.shape, vec![Dim::sym("B"), Dim::known(4)]);
        assert!(matches!(
            specialize(&g, &[("L", 0)]),
            Err(StepError::Zero { .. })
        ));
    }
}
