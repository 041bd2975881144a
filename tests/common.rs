//! Helpers shared by the integration tests.
#![allow(dead_code)]

use frontend::{Compiled, Diagnostic, ModelSpec, Sources};
use ir::{DType, Dim, Graph, InputKind, Op, Span, TensorType, UnaryOp, Value};

/// Compiles a library preset or model name.
pub fn compile_name(name: &str) -> Compiled {
    let spec = ModelSpec {
        model: name.into(),
        ..ModelSpec::default()
    };
    let (sources, r) = frontend::compile(&spec);
    match r {
        Ok(c) => c,
        Err(d) => panic!(
            "{name} does not compile:\n{}",
            frontend::render(&d, &sources, false)
        ),
    }
}

/// tiny-mamba2 with chunks of 16 (its preset's 8 is below what the tiled SSD kernels take).
pub fn tiny_mamba2_chunk16() -> Compiled {
    let (sources, r) = compile_source(
        "preset \"tiny16\" = mamba2_lm(d_model: 32, n_layer: 2, vocab_size: 61, d_state: 8,\n\
         headdim: 16, chunk_size: 16)\n",
    );
    match r {
        Ok(c) => c,
        Err(d) => panic!(
            "tiny16 does not compile:\n{}",
            frontend::render(&d, &sources, false)
        ),
    }
}

/// Compiles DSL source text as a user file named `test.m2`.
pub fn compile_source(text: &str) -> (Sources, Result<Compiled, Vec<Diagnostic>>) {
    let spec = ModelSpec {
        model: "test.m2".into(),
        file_text: Some(text.into()),
        ..ModelSpec::default()
    };
    frontend::compile(&spec)
}

/// Runs the CLI in-process.
pub fn cli(args: &[&str]) -> ma2mba::cli::Outcome {
    let mut all = vec!["ma2mba"];
    all.extend_from_slice(args);
    ma2mba::cli::run(all)
}

/// `ssd_scan{chunk}` and its gradient alone (`hpg` heads per group): every output of the
/// GPU's matrix form against the CPU's scans.
pub fn ssd_graph(dims: (u64, u64, u64, u64), chunk: u64) -> Graph {
    ssd_graph_with(dims, chunk, true)
}

/// [`ssd_graph`], or without the forward (`forward` false): the gradient then computes the
/// chunk states itself instead of reading its forward's.
pub fn ssd_graph_with(
    (hpg, groups, p, n): (u64, u64, u64, u64),
    chunk: u64,
    forward: bool,
) -> Graph {
    let h = hpg * groups;
    let mut g = Graph::new("ssd");
    let (bd, ld, k) = (Dim::sym("B"), Dim::sym("L"), Dim::known);
    let input = |g: &mut Graph, name: &str, kind: InputKind, shape: Vec<Dim>| {
        let ty = TensorType::new(DType::F32, shape);
        graph_add(
            g,
            Op::Input {
                name: name.into(),
                kind,
                ty,
            },
            &[],
        )
    };
    let data = InputKind::Data;
    let xsh = vec![bd.clone(), ld.clone(), k(h), k(p)];
    let x = input(&mut g, "x", data, xsh.clone());
    let dt_raw = input(&mut g, "dt", data, vec![bd.clone(), ld.clone(), k(h)]);
    let dt = graph_add(&mut g, Op::Unary(UnaryOp::Softplus), &[dt_raw]);
    let a_log = input(&mut g, "A_log", data, vec![k(h)]);
    let a = graph_add(&mut g, Op::Unary(UnaryOp::Exp), &[a_log]);
    let a = graph_add(&mut g, Op::Unary(UnaryOp::Neg), &[a]);
    let bsh = vec![bd.clone(), ld.clone(), k(groups), k(n)];
    let bm = input(&mut g, "Bm", data, bsh.clone());
    let cm = input(&mut g, "Cm", data, bsh);
    let ssh = vec![bd, k(h), k(p), k(n)];
    let s0 = input(&mut g, "s0", InputKind::State, ssh.clone());
    let dy = input(&mut g, "dy", data, xsh);
    let ds1 = input(&mut g, "ds1", data, ssh);
    let ops = [x, dt, a, bm, cm, s0];
    if forward {
        let y = graph_add(&mut g, Op::SsdScan { chunk }, &ops);
        g.add_output("y", y);
        g.add_output("s1", Value::new(y.node, 1));
    }
    let mut gops = ops.to_vec();
    gops.extend([dy, ds1]);
    let gr = graph_add(&mut g, Op::SsdScanGrad { chunk }, &gops);
    for (i, name) in ["dx", "ddt", "dA", "dB", "dC", "ds0"].iter().enumerate() {
        g.add_output(*name, Value::new(gr.node, i as u16));
    }
    g
}

fn graph_add(g: &mut Graph, op: Op, xs: &[Value]) -> Value {
    Value::from(g.add(op, xs, Span::default(), None).expect("well-typed"))
}
