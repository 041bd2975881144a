//! Graph builders and comparisons shared by the integration tests.
#![allow(dead_code)]

use ir::{
    BinaryOp, DType, Dim, Graph, Init, InputKind, NodeId, Op, ReduceOp, Span, TensorType, UnaryOp,
    Value,
};

pub fn d(n: u64) -> Dim {
    Dim::known(n)
}

pub fn s(name: &str) -> Dim {
    Dim::sym(name)
}

pub fn f32t(shape: &[Dim]) -> TensorType {
    TensorType::new(DType::F32, shape.to_vec())
}

/// Asserts that two graphs agree in every op (attributes compared by their `Debug` text, so
/// `-0.0 != 0.0` and NaN equals NaN), operand, type, span, layer, output, name and source.
pub fn assert_same(a: &Graph, b: &Graph) {
    assert_eq!(a.name, b.name, "graph names");
    assert_eq!(a.sources, b.sources, "sources");
    assert_eq!(a.len(), b.len(), "node counts");
    for n in a.nodes() {
        assert_eq!(
            format!("{:?}", a.op(n)),
            format!("{:?}", b.op(n)),
            "op of {n}"
        );
        if let (Op::Const { value: x, .. }, Op::Const { value: y, .. }) = (a.op(n), b.op(n)) {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "const {n}"
            );
        }
        assert_eq!(a.operands(n), b.operands(n), "operands of {n}");
        assert_eq!(a.types(n), b.types(n), "types of {n}");
        assert_eq!(a.span(n), b.span(n), "span of {n}");
        assert_eq!(a.layer(n), b.layer(n), "layer of {n}");
    }
    assert_eq!(a.outputs(), b.outputs(), "outputs");
}

/// A valid graph (it passes `verify`) with every op, every unary/binary/reduce kind, every
/// initializer, both input kinds, both result indices, two layers and two sources.
pub fn every_op_graph() -> Graph {
    let mut g = Graph::new("every \"op\"\\graph");
    g.sources = vec!["lib/mamba.m2".into(), "user \"x\".m2".into()];
    let (b, l) = (s("B"), s("L"));
    let sp = |f: u16, a: u32| Span::new(f, a, a + 7);
    let add = |g: &mut Graph, op: Op, xs: &[Value], span: Span, layer: Option<u32>| {
        g.add(op, xs, span, layer).unwrap_or_else(|e| panic!("{e}"))
    };
    let v = |n: NodeId| Value::from(n);

    let ids = add(
        &mut g,
        Op::Input {
            name: "ids".into(),
            kind: InputKind::Data,
            ty: TensorType::new(DType::I32, vec![b.clone(), l.clone()]),
        },
        &[],
        sp(1, 0),
        None,
    );
    let emb = add(
        &mut g,
        Op::Param {
            name: "backbone.embedding.weight".into(),
            ty: f32t(&[d(16), d(8)]),
            init: Init::Normal { std: 0.02 },
        },
        &[],
        sp(0, 10),
        None,
    );
    let x = add(&mut g, Op::Gather, &[v(emb), v(ids)], sp(0, 20), None);

    // Layer 0: conv, every unary and binary op, constants.
    let l0 = Some(0);
    let conv_state = add(
        &mut g,
        Op::Input {
            name: "backbone.layers.0.mixer.conv_state".into(),
            kind: InputKind::State,
            ty: f32t(&[b.clone(), d(8), d(3)]),
        },
        &[],
        sp(0, 30),
        l0,
    );
    let cw = add(
        &mut g,
        Op::Param {
            name: "backbone.layers.0.mixer.conv1d.weight".into(),
            ty: f32t(&[d(8), d(4)]),
            init: Init::Uniform { lo: -0.5, hi: 0.5 },
        },
        &[],
        sp(0, 40),
        l0,
    );
    let cb = add(
        &mut g,
        Op::Param {
            name: "backbone.layers.0.mixer.conv1d.bias".into(),
            ty: f32t(&[d(8)]),
            init: Init::Zeros,
        },
        &[],
        sp(0, 50),
        l0,
    );
    let conv = add(
        &mut g,
        Op::CausalConv1d,
        &[v(x), v(cw), v(cb), v(conv_state)],
        sp(0, 60),
        l0,
    );
    let mut h = v(conv);
    for u in UnaryOp::ALL {
        h = v(add(&mut g, Op::Unary(u), &[h], sp(0, 70), l0));
    }
    for bo in BinaryOp::ALL {
        h = v(add(&mut g, Op::Binary(bo), &[h, v(conv)], sp(0, 80), l0));
    }
    for (value, dtype) in [
        (1e-5, DType::F32),
        (f64::INFINITY, DType::F32),
        (f64::NEG_INFINITY, DType::F16),
        (f64::NAN, DType::BF16),
        (-0.0, DType::F64),
        (5e-324, DType::F32),
        (3.0, DType::I64),
        (0.1 + 0.2, DType::F32),
    ] {
        add(&mut g, Op::Const { value, dtype }, &[], sp(1, 90), l0);
    }
    let eps = add(
        &mut g,
        Op::Const {
            value: 1e-5,
            dtype: DType::F32,
        },
        &[],
        sp(1, 100),
        l0,
    );
    let eps_b = add(
        &mut g,
        Op::Broadcast {
            shape: vec![b.clone(), l.clone(), d(8)],
        },
        &[v(eps)],
        sp(0, 110),
        l0,
    );
    h = v(add(
        &mut g,
        Op::Binary(BinaryOp::Add),
        &[h, v(eps_b)],
        sp(0, 120),
        l0,
    ));
    let hb = add(&mut g, Op::Cast { to: DType::BF16 }, &[h], sp(0, 130), l0);
    h = v(add(
        &mut g,
        Op::Cast { to: DType::F32 },
        &[v(hb)],
        sp(0, 140),
        l0,
    ));
    for (op, axes) in [
        (ReduceOp::Sum, vec![2]),
        (ReduceOp::Mean, vec![1, 0]),
        (ReduceOp::Max, vec![]),
    ] {
        add(&mut g, Op::Reduce { op, axes }, &[h], sp(0, 150), l0);
    }
    let norm = add(
        &mut g,
        Op::Param {
            name: "backbone.layers.0.norm.weight".into(),
            ty: f32t(&[d(8)]),
            init: Init::Ones,
        },
        &[],
        sp(0, 160),
        l0,
    );
    let norm_b = add(
        &mut g,
        Op::Broadcast {
            shape: vec![b.clone(), l.clone(), d(8)],
        },
        &[v(norm)],
        sp(0, 170),
        l0,
    );
    h = v(add(
        &mut g,
        Op::Binary(BinaryOp::Mul),
        &[h, v(norm_b)],
        sp(0, 180),
        l0,
    ));

    // The conv's backward op, with a cotangent for each result.
    let conv_grad = add(
        &mut g,
        Op::CausalConv1dGrad,
        &[v(x), v(cw), v(cb), v(conv_state), h, Value::new(conv, 1)],
        sp(0, 190),
        l0,
    );

    // Layer 1: selective scan, ssd scan, their backward ops, shapes.
    let l1 = Some(1);
    let param = |g: &mut Graph, name: &str, shape: &[Dim], init: Init| {
        g.add(
            Op::Param {
                name: format!("backbone.layers.1.mixer.{name}"),
                ty: f32t(shape),
                init,
            },
            &[],
            Span::new(1, 200, 210),
            l1,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let w_bc = param(
        &mut g,
        "x_proj.weight",
        &[d(8), d(4)],
        Init::Normal { std: 1e-3 },
    );
    let a_log = param(&mut g, "A_log", &[d(8), d(4)], Init::ALogArange);
    let bm = add(
        &mut g,
        Op::MatMul { rhs_t: false },
        &[h, v(w_bc)],
        sp(0, 220),
        l1,
    );
    let h0 = add(
        &mut g,
        Op::Input {
            name: "backbone.layers.1.mixer.ssm_state".into(),
            kind: InputKind::State,
            ty: f32t(&[b.clone(), d(8), d(4)]),
        },
        &[],
        sp(0, 230),
        l1,
    );
    let scan = add(
        &mut g,
        Op::SelectiveScan,
        &[h, h, v(a_log), v(bm), v(bm), v(h0)],
        sp(0, 240),
        l1,
    );
    // SSD: heads 2, head dim 4, groups 1, state 4.
    let xh = add(
        &mut g,
        Op::Reshape {
            shape: vec![b.clone(), l.clone(), d(2), d(4)],
        },
        &[v(scan)],
        sp(0, 250),
        l1,
    );
    let w_dt = param(
        &mut g,
        "dt_proj.weight",
        &[d(2), d(8)],
        Init::Normal { std: 0.1 },
    );
    let dt = add(
        &mut g,
        Op::MatMul { rhs_t: true },
        &[h, v(w_dt)],
        sp(0, 260),
        l1,
    );
    let dt_bias = param(
        &mut g,
        "dt_bias",
        &[d(2)],
        Init::DtBias {
            min: 0.001,
            max: 0.1,
            floor: 1e-4,
        },
    );
    let dt_bias_b = add(
        &mut g,
        Op::Broadcast {
            shape: vec![b.clone(), l.clone(), d(2)],
        },
        &[v(dt_bias)],
        sp(0, 265),
        l1,
    );
    let dt = add(
        &mut g,
        Op::Binary(BinaryOp::Add),
        &[v(dt), v(dt_bias_b)],
        sp(0, 268),
        l1,
    );
    let a = param(
        &mut g,
        "A_log2",
        &[d(2)],
        Init::ALogUniform { lo: 1.0, hi: 16.0 },
    );
    let bg = add(
        &mut g,
        Op::Reshape {
            shape: vec![b.clone(), l.clone(), d(1), d(4)],
        },
        &[v(bm)],
        sp(0, 270),
        l1,
    );
    let s0 = add(
        &mut g,
        Op::Input {
            name: "backbone.layers.1.mixer.ssd_state".into(),
            kind: InputKind::State,
            ty: f32t(&[b.clone(), d(2), d(4), d(4)]),
        },
        &[],
        sp(0, 280),
        l1,
    );
    let ssd = add(
        &mut g,
        Op::SsdScan { chunk: 256 },
        &[v(xh), v(dt), v(a), v(bg), v(bg), v(s0)],
        sp(0, 290),
        l1,
    );
    let scan_grad = add(
        &mut g,
        Op::SelectiveScanGrad,
        &[
            h,
            h,
            v(a_log),
            v(bm),
            v(bm),
            v(h0),
            v(scan),
            Value::new(scan, 1),
        ],
        sp(0, 292),
        l1,
    );
    let ssd_grad = add(
        &mut g,
        Op::SsdScanGrad { chunk: 64 },
        &[
            v(xh),
            v(dt),
            v(a),
            v(bg),
            v(bg),
            v(s0),
            v(ssd),
            Value::new(ssd, 1),
        ],
        sp(0, 294),
        l1,
    );
    let y = add(
        &mut g,
        Op::Reshape {
            shape: vec![b.clone(), l.clone().mul(&d(2)).unwrap(), d(4)],
        },
        &[v(ssd)],
        sp(0, 300),
        l1,
    );
    let flat = add(
        &mut g,
        Op::Reshape {
            shape: vec![b.clone().mul(&l).unwrap(), d(8)],
        },
        &[v(scan)],
        sp(0, 305),
        l1,
    );
    let perm = add(
        &mut g,
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &[v(y)],
        sp(0, 310),
        l1,
    );
    let sl = add(
        &mut g,
        Op::Slice {
            axis: 1,
            start: 1,
            len: 2,
        },
        &[v(perm)],
        sp(0, 320),
        l1,
    );
    let cat = add(
        &mut g,
        Op::Concat { axis: 1 },
        &[v(sl), v(perm), v(sl)],
        sp(0, 330),
        l1,
    );
    let one = add(&mut g, Op::Concat { axis: 1 }, &[v(flat)], sp(0, 335), l1);

    // Head, outside the layers.
    let logits = add(
        &mut g,
        Op::MatMul { rhs_t: true },
        &[v(scan), v(emb)],
        sp(1, 340),
        None,
    );
    // The loss and its backward op; a negative ignore index.
    let ce = add(
        &mut g,
        Op::CrossEntropy { ignore_index: -100 },
        &[v(logits), v(ids)],
        sp(1, 350),
        None,
    );
    let ce_grad = add(
        &mut g,
        Op::CrossEntropyGrad { ignore_index: -100 },
        &[v(logits), v(ids), v(ce)],
        sp(1, 360),
        None,
    );
    // A symbol that is not an identifier must still round-trip.
    add(
        &mut g,
        Op::Input {
            name: "weird \\ \"name\"\n\t\u{1}é".into(),
            kind: InputKind::Data,
            ty: TensorType::new(
                DType::F64,
                vec![
                    Dim::sym("T x"),
                    d(3).mul(&Dim::sym("0")).unwrap(),
                    Dim::sym(""),
                ],
            ),
        },
        &[],
        Span::new(1, 0, 0),
        None,
    );
    g.add_output("logits", v(logits));
    g.add_output("backbone.layers.0.mixer.conv_state", Value::new(conv, 1));
    g.add_output("backbone.layers.1.mixer.ssm_state", Value::new(scan, 1));
    g.add_output("backbone.layers.1.mixer.ssd_state", Value::new(ssd, 1));
    g.add_output("cat", v(cat));
    g.add_output("one", v(one));
    g.add_output("conv_grad.ds0", Value::new(conv_grad, 3));
    g.add_output("scan_grad.dA", Value::new(scan_grad, 2));
    g.add_output("ssd_grad.dh0", Value::new(ssd_grad, 5));
    g.add_output("loss", v(ce));
    g.add_output("valid", Value::new(ce, 1));
    g.add_output("dlogits", v(ce_grad));
    g
}
