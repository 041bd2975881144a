//! The text form: exact round trips and a parser that never panics.

mod common;

use common::{assert_same, d, every_op_graph, f32t, s};
use ir::text::print_filtered;
use ir::{
    BinaryOp, DType, Dim, Graph, Init, InputKind, Op, ReduceOp, Span, TensorType, UnaryOp, Value,
    parse, print, verify,
};
use proptest::prelude::*;

fn round_trip(g: &Graph) -> String {
    let text = print(g);
    let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_same(g, &back);
    assert_eq!(print(&back), text);
    text
}

#[test]
fn every_op_round_trips() {
    let g = every_op_graph();
    verify(&g).unwrap_or_else(|e| panic!("{e:#?}"));
    let text = round_trip(&g);
    for needle in [
        "graph \"every \\\"op\\\"\\\\graph\"\n",
        "source 1 \"user \\\"x\\\".m2\"\n",
        "%0 = input \"ids\" : [B, L] i32 @1:0..7\n",
        "%1 = param \"backbone.embedding.weight\" normal(0.02) : [16, 8] f32 @0:10..17\n",
        "%2 = gather(%1, %0) : [B, L, 8] f32 @0:20..27\n",
        "state \"backbone.layers.0.mixer.conv_state\" : [B, 8, 3] f32 @0:30..37 layer 0\n",
        "= causal_conv1d(%2, %4, %5, %3) : ([B, L, 8] f32, [B, 8, 3] f32) @0:60..67 layer 0\n",
        "uniform(-0.5, 0.5)",
        " zeros : [8] f32",
        " ones : [8] f32",
        "a_log_arange :",
        "a_log_uniform(1.0, 16.0)",
        "dt_bias(0.001, 0.1, 0.0001)",
        "= const 1e-5 f32 : [] f32",
        "= const inf f32",
        "= const -inf f16",
        "= const nan bf16",
        "= const -0.0 f64",
        "= const 5e-324 f32",
        "= const 3.0 i64 : [] i64",
        "= const 0.30000000000000004 f32",
        "broadcast{[B, L, 8]}(",
        "cast{bf16}(",
        "reduce_sum{axes=[2]}(",
        "reduce_mean{axes=[1, 0]}(",
        "reduce_max{axes=[]}(",
        "matmul{}(",
        "matmul{rhs_t}(",
        "reshape{[B, 2*L, 4]}(",
        "reshape{[B*L, 8]}(",
        "permute{[0, 2, 1]}(",
        "slice{axis=1, start=1, len=2}(",
        "concat{axis=1}(",
        "ssd_scan{chunk=256}(",
        "selective_scan(",
        "= causal_conv1d_grad(%2, %4, %5, %3, %",
        ": ([B, L, 8] f32, [8, 4] f32, [8] f32, [B, 8, 3] f32) @0:190..197 layer 0\n",
        "= selective_scan_grad(",
        "= ssd_scan_grad{chunk=64}(",
        "= cross_entropy{ignore_index=-100}(",
        ": ([B, L] f32, [B, L] f32) @1:350..357\n",
        "= cross_entropy_grad{ignore_index=-100}(",
        ": [\"T x\", 3*\"0\", \"\"] f64",
        "input \"weird \\\\ \\\"name\\\"\\n\\t\\u{1}é\"",
        "output \"backbone.layers.0.mixer.conv_state\" = %6.1\n",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    for u in UnaryOp::ALL {
        assert!(text.contains(&format!(" = {}(", u.name())), "{}", u.name());
    }
    for b in BinaryOp::ALL {
        assert!(text.contains(&format!(" = {}(", b.name())), "{}", b.name());
    }
    for name in Init::NAMES {
        assert!(text.contains(&format!(" {name}")), "{name}");
    }
}

#[test]
fn module_doc_example_parses() {
    let src = include_str!("../src/text.rs");
    let example: String = src
        .lines()
        .skip_while(|l| *l != "//! ```text")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| format!("{}\n", l.trim_start_matches("//! ")))
        .collect();
    assert!(example.starts_with("graph \"mamba-130m\"\n"), "{example}");
    let g = parse(&example).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(print(&g), example);
    verify(&g).unwrap_or_else(|e| panic!("{e:#?}"));
}

#[test]
fn hand_written_text_parses() {
    let text = r#"
// a comment line
graph "mamba-130m"   // trailing comment
source 0 "lib/mamba.m2"
source 1 "user.m2"

%0 = input "ids" : [B, L] i32 @0:120..140
%1 = param "backbone.embedding.weight" normal(0.02) : [50280, 768] f32 @0:200..260
%2 = gather( %1 , %0 ) : [B, L, 768] f32 @0:300..320
%3 = state "backbone.layers.0.mixer.conv_state" : [ B , 768 , 3 ] f32 @0:400..420 layer 0
%4 = const 1e-05 f32 : [] f32 @0:1..2
%5 = param "c" zeros() : [768] f32 @1:0..0 layer 0
%6 = reshape{[L*B*2, 384]}(%2) : [2*B*L, 384] f32 @1:0..0
%7 = matmul{ rhs_t }(%2, %1) : ([B, L, 50280] f32) @0:1..1
output "logits" = %7
output "dangling" = %99.1
"#;
    let g = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.len(), 8);
    assert_eq!(g.name, "mamba-130m");
    assert_eq!(g.sources, ["lib/mamba.m2", "user.m2"]);
    assert_eq!(g.layer(ir::NodeId::from_index(3)), Some(0));
    assert_eq!(
        g.op(ir::NodeId::from_index(4)),
        &Op::Const {
            value: 1e-5,
            dtype: DType::F32
        }
    );
    assert_eq!(
        g.types(ir::NodeId::from_index(6))[0].shape,
        vec![
            Dim::known(2).mul(&s("B")).unwrap().mul(&s("L")).unwrap(),
            d(384)
        ]
    );
    assert_eq!(g.outputs()[1].1, Value::new(ir::NodeId::from_index(99), 1));
    let printed = print(&g);
    assert!(
        printed.contains("%4 = const 1e-5 f32 : [] f32 @0:1..2\n"),
        "{printed}"
    );
    assert!(printed.contains("%5 = param \"c\" zeros : [768] f32 @1:0..0 layer 0\n"));
    assert!(printed.contains("%6 = reshape{[2*B*L, 384]}(%2) : [2*B*L, 384] f32"));
    assert!(printed.contains("%7 = matmul{rhs_t}(%2, %1) : [B, L, 50280] f32 @0:1..1\n"));
    round_trip(&g);
    // The dangling output is kept by the text form and reported by the verifier.
    assert!(verify(&g).is_err());
}

#[test]
fn ignore_index_round_trips_and_rejects_bad_numbers() {
    let head = "graph \"g\"\n\
                %0 = input \"logits\" : [B, 7] f32 @0:0..0\n\
                %1 = input \"t\" : [B] i64 @0:0..0\n";
    for ix in [i64::MIN, -100, -1, 0, 3, i64::MAX] {
        let text = format!(
            "{head}%2 = cross_entropy{{ignore_index={ix}}}(%0, %1) : ([B] f32, [B] f32) @0:0..0\n\
             %3 = cross_entropy_grad{{ignore_index={ix}}}(%0, %1, %2) : [B, 7] f32 @0:0..0\n"
        );
        let g = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            g.op(ir::NodeId::from_index(2)),
            &Op::CrossEntropy { ignore_index: ix }
        );
        assert_eq!(print(&g), text);
        round_trip(&g);
    }
    for (bad, msg) in [
        ("-", "expected an ignore index"),
        ("+3", "expected an ignore index"),
        ("- 3", "expected an ignore index"),
        ("9223372036854775808", "out of range"),
        ("-9223372036854775809", "out of range"),
    ] {
        let text = format!(
            "{head}%2 = cross_entropy{{ignore_index={bad}}}(%0, %1) : ([B] f32, [B] f32) @0:0..0\n"
        );
        let (l, _, m) = err(&text);
        assert_eq!(l, 4, "{m}");
        assert!(m.contains(msg), "{bad}: {m}");
    }
    // Attributes are required where the op has them, and refused where it has none.
    let (_, _, m) = err(&format!(
        "{head}%2 = cross_entropy(%0, %1) : [B] f32 @0:0..0\n"
    ));
    assert!(m.contains("expected `{`"), "{m}");
    let (_, _, m) = err(&format!(
        "{head}%2 = selective_scan_grad{{}}(%0) : [B] f32 @0:0..0\n"
    ));
    assert!(m.contains("takes no attributes"), "{m}");
}

fn err(text: &str) -> (usize, usize, String) {
    match parse(text) {
        Ok(g) => panic!("parsed:\n{}", print(&g)),
        Err(e) => {
            assert_eq!(
                e.to_string(),
                format!("line {}, col {}: {}", e.line, e.col, e.message)
            );
            (e.line, e.col, e.message)
        }
    }
}

#[test]
fn errors_point_at_the_problem() {
    let h = "graph \"g\"\n";
    let (l, c, m) = err(&format!(
        "{h}%0 = input \"x\" : [B] f32 @0:0..0\n%1 exp(%0) : [B] f32 @0:0..0"
    ));
    assert_eq!((l, c), (3, 4), "{m}");
    assert_eq!(m, "expected `=`, found `exp`");

    let (l, c, m) = err(&format!("{h}%1 = input \"x\" : [B] f32 @0:0..0"));
    assert_eq!((l, c), (2, 2), "{m}");
    assert!(m.contains("expected %0"), "{m}");

    // Inferred type differs from the written one.
    let (l, c, m) = err(&format!(
        "{h}%0 = input \"x\" : [B] f32 @0:0..0\n%1 = exp(%0) : [B] f64 @0:0..0"
    ));
    assert_eq!((l, c), (3, 16), "{m}");
    assert!(m.contains("differ from the inferred [B] f32"), "{m}");

    // Type error from inference points at the op.
    let (l, c, m) = err(&format!(
        "{h}%0 = input \"x\" : [B] i32 @0:0..0\n%1 = exp(%0) : [B] i32 @0:0..0"
    ));
    assert_eq!((l, c), (3, 6), "{m}");
    assert!(m.contains("must be a float type"), "{m}");

    // Forward reference points at the operand.
    let (l, c, m) = err(&format!(
        "{h}%0 = input \"x\" : [B] f32 @0:0..0\n%1 = add(%0, %2) : [B] f32 @0:0..0"
    ));
    assert_eq!((l, c), (3, 14), "{m}");
    assert!(m.contains("%2, which does not exist"), "{m}");

    let (l, _, m) = err(&format!(
        "{h}%0 = param \"w\" normal(1, 2) : [2] f32 @0:0..0"
    ));
    assert_eq!(l, 2);
    assert!(m.contains("`normal` takes 1 argument(s), got 2"), "{m}");
    assert!(
        err(&format!("{h}%0 = param \"w\" gauss : [2] f32 @0:0..0"))
            .2
            .contains("unknown initializer")
    );
    assert!(
        err(&format!("{h}%0 = frobnicate(%0) : [2] f32 @0:0..0"))
            .2
            .contains("unknown op")
    );
    assert!(
        err(&format!("{h}%0 = input \"x\" : [2] f99 @0:0..0"))
            .2
            .contains("unknown dtype")
    );
    assert!(
        err(&format!("{h}%0 = input \"x\n\" : [2] f32 @0:0..0"))
            .2
            .contains("unterminated")
    );
    assert!(
        err(&format!("{h}%0 = input \"\\q\" : [2] f32 @0:0..0"))
            .2
            .contains("unknown escape")
    );
    assert!(
        err(&format!(
            "{h}%0 = input \"x\" : [99999999999999999999] f32 @0:0..0"
        ))
        .2
        .contains("out of range")
    );
    assert!(
        err(&format!("{h}%0 = input \"x\" : [2] f32 @0:0..0 layer"))
            .2
            .contains("layer number")
    );
    assert!(
        err(&format!("{h}%0 = input \"x\" : [2] f32 @0:0..0 lair 1"))
            .2
            .contains("`layer`")
    );
    assert!(
        err(&format!("{h}%0 = input \"x\" : ([2] f32, [2] f32) @0:0..0"))
            .2
            .contains("one result type")
    );
    assert!(
        err(&format!(
            "{h}%0 = input \"x\" : [2] f32 @0:0..0\n%1 = exp{{}}(%0) : [2] f32 @0:0..0"
        ))
        .2
        .contains("takes no attributes")
    );
    assert!(
        err(&format!("{h}output \"o\" = %0\nsource 0 \"x\""))
            .2
            .contains("before")
    );
    assert!(
        err(&format!("{h}source 1 \"x\""))
            .2
            .contains("expected source 0")
    );
    assert!(err("").2.contains("expected `graph`"));
    assert!(err("graph").2.contains("expected a string"));
    // A reshape that changes the element count.
    assert!(err(&format!("{h}%0 = input \"x\" : [B, 4] f32 @0:0..0\n%1 = reshape{{[B, 5]}}(%0) : [B, 5] f32 @0:0..0")).2.contains("element counts differ"));
}

#[test]
fn limits_are_errors_not_hangs() {
    let big = format!(
        "graph \"g\"\n%0 = input \"x\" : [{}1] f32 @0:0..0\n",
        "1, ".repeat(300)
    );
    assert!(parse(&big).unwrap_err().message.contains("more than 256"));
    let many = format!(
        "graph \"g\"\n%0 = input \"x\" : [{}B] f32 @0:0..0\n",
        "B*".repeat(300)
    );
    assert!(parse(&many).unwrap_err().message.contains("more than 256"));
    let overflow = "graph \"g\"\n%0 = input \"x\" : [4294967296*4294967296] f32 @0:0..0\n";
    assert!(parse(overflow).unwrap_err().message.contains("overflow"));
    // Node and result numbers that do not fit are errors, not truncations.
    let t = "graph \"g\"\n%0 = input \"x\" : [2] f32 @0:0..0\n%1 = exp(%4294967296) : [2] f32 @0:0..0\n";
    assert!(parse(t).unwrap_err().message.contains("out of range"));
}

#[test]
fn print_filtered_keeps_selected_lines() {
    let g = every_op_graph();
    let text = print_filtered(&g, &|n| g.layer(n) == Some(1));
    assert!(text.starts_with("graph "));
    assert!(text.contains("source 1 "));
    assert!(
        text.lines()
            .filter(|l| l.starts_with('%'))
            .all(|l| l.ends_with(" layer 1"))
    );
    assert!(text.contains("selective_scan("));
    assert!(!text.contains("causal_conv1d("));
    assert!(text.contains("output \"backbone.layers.1.mixer.ssm_state\""));
    assert!(!text.contains("output \"logits\""));
}

// ---------------------------------------------------------------------------------------------
// Random graphs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    Input(String, bool, Vec<Dim>, u8),
    Param(String, u8, [f64; 3], Vec<Dim>),
    Const(f64, u8),
    Unary(u8, usize),
    Binary(u8, usize, usize),
    Cast(u8, usize),
    Reduce(u8, usize, u8),
    MatMul(bool, usize, u8),
    Reshape(u8, usize),
    Permute(u64, usize),
    Broadcast(usize, Dim),
    Slice(usize, u8, u64, u64),
    Concat(usize, u8, u8),
    Conv(usize, u8),
    CrossEntropy(usize, i64, bool),
    Output(String, usize, u16),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_.0-9]{0,12}",
        1 => any::<String>(),
    ]
}

fn dim() -> impl Strategy<Value = Dim> {
    prop_oneof![
        4 => (1u64..7).prop_map(Dim::known),
        2 => Just(s("B")),
        2 => Just(s("L")),
        1 => Just(Dim::known(2).mul(&s("L")).unwrap()),
        1 => Just(s("B").mul(&s("L")).unwrap()),
        1 => "[A-Za-z_][A-Za-z0-9_]{0,3}".prop_map(|n| Dim::sym(&n)),
        1 => any::<String>().prop_map(|n| Dim::sym(&n)),
        1 => Just(Dim::known(0)),
    ]
}

fn shape() -> impl Strategy<Value = Vec<Dim>> {
    proptest::collection::vec(dim(), 0..5)
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => any::<f64>(),
        1 => prop_oneof![
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
            Just(1e-5),
            Just(f64::MIN_POSITIVE),
            Just(f64::MAX),
        ],
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let ix = any::<usize>();
    prop_oneof![
        2 => (name(), any::<bool>(), shape(), any::<u8>()).prop_map(|(n, k, s, t)| Step::Input(n, k, s, t)),
        2 => (name(), any::<u8>(), [float(), float(), float()], shape()).prop_map(|(n, i, a, s)| Step::Param(n, i, a, s)),
        1 => (float(), any::<u8>()).prop_map(|(v, t)| Step::Const(v, t)),
        2 => (any::<u8>(), ix).prop_map(|(u, i)| Step::Unary(u, i)),
        2 => (any::<u8>(), ix, ix).prop_map(|(b, i, j)| Step::Binary(b, i, j)),
        1 => (any::<u8>(), ix).prop_map(|(t, i)| Step::Cast(t, i)),
        1 => (any::<u8>(), ix, any::<u8>()).prop_map(|(r, i, m)| Step::Reduce(r, i, m)),
        1 => (any::<bool>(), ix, 1u8..5).prop_map(|(t, i, n)| Step::MatMul(t, i, n)),
        2 => (any::<u8>(), ix).prop_map(|(k, i)| Step::Reshape(k, i)),
        1 => (any::<u64>(), ix).prop_map(|(p, i)| Step::Permute(p, i)),
        1 => (ix, dim()).prop_map(|(i, d)| Step::Broadcast(i, d)),
        2 => (ix, any::<u8>(), any::<u64>(), any::<u64>()).prop_map(|(i, a, st, l)| Step::Slice(i, a, st, l)),
        2 => (ix, any::<u8>(), 1u8..4).prop_map(|(i, a, k)| Step::Concat(i, a, k)),
        1 => (ix, 1u8..5).prop_map(|(i, k)| Step::Conv(i, k)),
        1 => (ix, any::<i64>(), any::<bool>()).prop_map(|(i, ig, gr)| Step::CrossEntropy(i, ig, gr)),
        2 => (name(), ix, 0u16..3).prop_map(|(n, i, r)| Step::Output(n, i, r)),
    ]
}

fn pick<T: Copy>(xs: &[T], i: usize) -> T {
    xs[i % xs.len()]
}

/// Interprets `steps`, keeping the nodes that type-check.
fn build(
    name: String,
    sources: Vec<String>,
    steps: Vec<(Step, u16, u32, u32, Option<u32>)>,
) -> Graph {
    let mut g = Graph::new(name);
    g.sources = sources;
    let mut vals: Vec<Value> = Vec::new();
    for (step, file, start, len, layer) in steps {
        let span = Span::new(file, start, start.saturating_add(len));
        let ty = |g: &Graph, v: Value| g.value_type(v).cloned().unwrap();
        let op_and_args: Option<(Op, Vec<Value>)> = match step {
            Step::Input(n, state, shape, t) => Some((
                Op::Input {
                    name: n,
                    kind: if state {
                        InputKind::State
                    } else {
                        InputKind::Data
                    },
                    ty: TensorType::new(pick(&DType::ALL, t as usize), shape),
                },
                vec![],
            )),
            Step::Param(n, i, a, shape) => {
                let init_name = pick(&Init::NAMES, i as usize);
                let k = Init::arity(init_name).unwrap();
                let init = Init::from_parts(init_name, &a[..k]).unwrap();
                let dtype = pick(
                    &[DType::F32, DType::F64, DType::BF16, DType::F16],
                    i as usize / 7,
                );
                Some((
                    Op::Param {
                        name: n,
                        ty: TensorType::new(dtype, shape),
                        init,
                    },
                    vec![],
                ))
            }
            Step::Const(value, t) => Some((
                Op::Const {
                    value,
                    dtype: pick(&DType::ALL, t as usize),
                },
                vec![],
            )),
            _ if vals.is_empty() => None,
            Step::Unary(u, i) => Some((
                Op::Unary(pick(&UnaryOp::ALL, u as usize)),
                vec![pick(&vals, i)],
            )),
            Step::Binary(b, i, j) => {
                let a = pick(&vals, i);
                let ta = ty(&g, a);
                let other = (0..vals.len())
                    .map(|k| vals[(j + k) % vals.len()])
                    .find(|&v| ty(&g, v) == ta)
                    .unwrap_or(a);
                Some((Op::Binary(pick(&BinaryOp::ALL, b as usize)), vec![a, other]))
            }
            Step::Cast(t, i) => Some((
                Op::Cast {
                    to: pick(&DType::ALL, t as usize),
                },
                vec![pick(&vals, i)],
            )),
            Step::Reduce(r, i, mask) => {
                let x = pick(&vals, i);
                let rank = ty(&g, x).rank();
                let axes = (0..rank)
                    .filter(|a| mask & (1 << (a % 8)) != 0)
                    .rev()
                    .collect();
                Some((
                    Op::Reduce {
                        op: pick(&ReduceOp::ALL, r as usize),
                        axes,
                    },
                    vec![x],
                ))
            }
            Step::MatMul(rhs_t, i, n) => {
                let x = pick(&vals, i);
                let t = ty(&g, x);
                let k = t.shape.last().cloned().unwrap_or(d(1));
                let shape = if rhs_t {
                    vec![d(n as u64), k]
                } else {
                    vec![k, d(n as u64)]
                };
                let w = g.add(
                    Op::Param {
                        name: format!("w{}", g.len()),
                        ty: TensorType::new(t.dtype, shape),
                        init: Init::Zeros,
                    },
                    &[],
                    span,
                    layer,
                );
                match w {
                    Ok(w) => {
                        vals.push(w.into());
                        Some((Op::MatMul { rhs_t }, vec![x, w.into()]))
                    }
                    Err(_) => None,
                }
            }
            Step::Reshape(kind, i) => {
                let x = pick(&vals, i);
                let sh = ty(&g, x).shape;
                let new = match kind % 3 {
                    0 => ir::types::numel(&sh).map(|n| vec![n]),
                    1 if sh.len() >= 2 => sh[0].mul(&sh[1]).map(|m| {
                        let mut v = vec![m];
                        v.extend(sh[2..].iter().cloned());
                        v
                    }),
                    _ => sh
                        .iter()
                        .position(|d| d.as_known().is_some_and(|n| n % 2 == 0 && n > 0))
                        .map(|p| {
                            let n = sh[p].as_known().unwrap();
                            let mut v = sh[..p].to_vec();
                            v.extend([d(2), d(n / 2)]);
                            v.extend(sh[p + 1..].iter().cloned());
                            v
                        }),
                };
                new.map(|shape| (Op::Reshape { shape }, vec![x]))
            }
            Step::Permute(seed, i) => {
                let x = pick(&vals, i);
                let mut perm: Vec<usize> = (0..ty(&g, x).rank()).collect();
                let mut r = seed;
                for a in (1..perm.len()).rev() {
                    r = r
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    perm.swap(a, (r >> 33) as usize % (a + 1));
                }
                Some((Op::Permute { perm }, vec![x]))
            }
            Step::Broadcast(i, lead) => {
                let x = pick(&vals, i);
                let mut shape = vec![lead];
                shape.extend(ty(&g, x).shape);
                Some((Op::Broadcast { shape }, vec![x]))
            }
            Step::Slice(i, axis, start, len) => {
                let x = pick(&vals, i);
                let sh = ty(&g, x).shape;
                let known: Vec<usize> = (0..sh.len())
                    .filter(|&a| sh[a].as_known().is_some_and(|n| n > 0))
                    .collect();
                (!known.is_empty()).then(|| {
                    let axis = pick(&known, axis as usize);
                    let size = sh[axis].as_known().unwrap();
                    let start = start % size;
                    let len = 1 + len % (size - start);
                    (Op::Slice { axis, start, len }, vec![x])
                })
            }
            Step::Concat(i, axis, k) => {
                let x = pick(&vals, i);
                let sh = ty(&g, x).shape;
                let known: Vec<usize> = (0..sh.len())
                    .filter(|&a| sh[a].as_known().is_some())
                    .collect();
                (!known.is_empty()).then(|| {
                    (
                        Op::Concat {
                            axis: pick(&known, axis as usize),
                        },
                        vec![x; k as usize],
                    )
                })
            }
            Step::Conv(i, k) => {
                let x = pick(&vals, i);
                let t = ty(&g, x);
                if t.rank() != 3 || t.shape[2].as_known().is_none() {
                    None
                } else {
                    let (b, c, k) = (t.shape[0].clone(), t.shape[2].clone(), k as u64);
                    let leaf =
                        |g: &mut Graph, op: Op| g.add(op, &[], span, layer).ok().map(Value::from);
                    let base = g.len();
                    let w = leaf(
                        &mut g,
                        Op::Param {
                            name: format!("cw{base}"),
                            ty: TensorType::new(t.dtype, vec![c.clone(), d(k)]),
                            init: Init::Ones,
                        },
                    );
                    let bias = leaf(
                        &mut g,
                        Op::Param {
                            name: format!("cb{base}"),
                            ty: TensorType::new(t.dtype, vec![c.clone()]),
                            init: Init::Zeros,
                        },
                    );
                    let st = leaf(
                        &mut g,
                        Op::Input {
                            name: format!("cs{base}"),
                            kind: InputKind::State,
                            ty: TensorType::new(t.dtype, vec![b, c, d(k - 1)]),
                        },
                    );
                    match (w, bias, st) {
                        (Some(w), Some(bias), Some(st)) => {
                            Some((Op::CausalConv1d, vec![x, w, bias, st]))
                        }
                        _ => None,
                    }
                }
            }
            Step::CrossEntropy(i, ignore_index, grad) => {
                let logits = pick(&vals, i);
                let t = ty(&g, logits);
                match t.shape.split_last() {
                    Some((_, outer)) if t.dtype.is_float() => {
                        let base = g.len();
                        let targets = g
                            .add(
                                Op::Input {
                                    name: format!("targets{base}"),
                                    kind: InputKind::Data,
                                    ty: TensorType::new(DType::I64, outer.to_vec()),
                                },
                                &[],
                                span,
                                layer,
                            )
                            .ok()
                            .map(Value::from);
                        match targets {
                            Some(tg) if grad => {
                                let dloss = g
                                    .add(
                                        Op::CrossEntropy { ignore_index },
                                        &[logits, tg],
                                        span,
                                        layer,
                                    )
                                    .ok()
                                    .map(Value::from);
                                dloss.map(|dl| {
                                    (Op::CrossEntropyGrad { ignore_index }, vec![logits, tg, dl])
                                })
                            }
                            Some(tg) => Some((Op::CrossEntropy { ignore_index }, vec![logits, tg])),
                            None => None,
                        }
                    }
                    _ => None,
                }
            }
            Step::Output(n, i, r) => {
                let v = pick(&vals, i);
                g.add_output(n, Value::new(v.node, r));
                None
            }
        };
        if let Some((op, args)) = op_and_args
            && let Ok(n) = g.add(op, &args, span, layer)
        {
            for r in 0..g.op(n).num_results() {
                vals.push(Value::new(n, r as u16));
            }
        }
    }
    g
}

fn graph() -> impl Strategy<Value = Graph> {
    let span = (
        0u16..4,
        any::<u32>(),
        0u32..100,
        proptest::option::of(0u32..5),
    );
    (
        name(),
        proptest::collection::vec(name(), 0..3),
        proptest::collection::vec((step(), span), 0..40),
    )
        .prop_map(|(n, srcs, steps)| {
            build(
                n,
                srcs,
                steps
                    .into_iter()
                    .map(|(s, (f, a, l, y))| (s, f, a, l, y))
                    .collect(),
            )
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, char),
    DupLine(usize),
    SwapLines(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let grammar_char = prop_oneof![
        proptest::sample::select(
            "%={}()[],:.@\"\\\n */-+0123456789eLBainf_x"
                .chars()
                .collect::<Vec<_>>()
        ),
        any::<char>(),
    ];
    prop_oneof![
        (any::<usize>(), 1usize..4).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), grammar_char).prop_map(|(p, c)| Mutation::Insert(p, c)),
        any::<usize>().prop_map(Mutation::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(text: &str, ms: &[Mutation]) -> String {
    let mut cs: Vec<char> = text.chars().collect();
    for m in ms {
        let n = cs.len().max(1);
        match *m {
            Mutation::Delete(p, k) => {
                let p = p % n;
                cs.drain(p.min(cs.len())..(p + k).min(cs.len()));
            }
            Mutation::Insert(p, c) => cs.insert(p % (cs.len() + 1), c),
            Mutation::Truncate(p) => cs.truncate(p % n),
            Mutation::DupLine(_) | Mutation::SwapLines(..) => {
                let s: String = cs.iter().collect();
                let mut lines: Vec<&str> = s.split('\n').collect();
                match *m {
                    Mutation::DupLine(i) => {
                        let l = lines[i % lines.len()];
                        lines.insert(i % lines.len(), l);
                    }
                    Mutation::SwapLines(a, b) => {
                        let len = lines.len();
                        lines.swap(a % len, b % len);
                    }
                    _ => {}
                }
                cs = lines.join("\n").chars().collect();
            }
        }
    }
    cs.into_iter().collect()
}

/// Whatever parses, prints and parses back to the same text.
fn check_stable(text: &str) {
    if let Ok(g) = parse(text) {
        let p = print(&g);
        let g2 = parse(&p).unwrap_or_else(|e| panic!("{e}\n{p}"));
        assert_same(&g, &g2);
        assert_eq!(print(&g2), p);
        let _ = verify(&g);
        let _ = ir::dot::to_dot(&g, &Default::default());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_graphs_round_trip(g in graph()) {
        round_trip(&g);
    }

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        check_stable(&s);
        check_stable(&format!("graph \"g\"\n{s}"));
        check_stable(&format!("graph \"g\"\n%0 = {s}"));
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_stable(&String::from_utf8_lossy(&b));
    }

    #[test]
    fn mutated_texts_never_panic(g in graph(), ms in proptest::collection::vec(mutation(), 1..6)) {
        let text = mutate(&print(&g), &ms);
        check_stable(&text);
    }
}

#[test]
fn small_shapes_have_no_surprises() {
    // Scalars, zero dims and a rank-0 broadcast source.
    let mut g = Graph::new("");
    let c = g
        .add(
            Op::Const {
                value: 2.5,
                dtype: DType::F32,
            },
            &[],
            Span::default(),
            None,
        )
        .unwrap();
    let z = g
        .add(
            Op::Broadcast {
                shape: vec![d(0), s("B")],
            },
            &[c.into()],
            Span::default(),
            None,
        )
        .unwrap();
    g.add(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![],
        },
        &[z.into()],
        Span::default(),
        Some(7),
    )
    .unwrap();
    let _ = f32t(&[]);
    round_trip(&g);
}
