//! The parser on a valid file covering every construct, and robustness of the parser against
//! random input and random edits of that file (proptest).

use frontend::ast::{BinOp, DefKind, ExprKind, Item, Stmt, UnOp};
use frontend::lexer::{self, Kind};
use frontend::parse_file;
use proptest::prelude::*;

const SAMPLE: &str = r#"
# A Mamba-1 mixer block.
block mamba1(d_model, d_state = 16, d_conv = 4, expand = 2, dt_rank = ceil(d_model / 16),
             eps = 1e-5,) {
  dim B, L
  let E = expand * d_model
  input u: [B, L, d_model]
  state conv_state: [B, E, d_conv - 1] f32
  state ssm_state: [B, E, d_state]
  param in_proj.weight: [2 * E, d_model] = fan_in_uniform(1.0)
  param conv1d.weight: [E, 1, d_conv]
  param A_log: [E, d_state] = a_log_init(d_state)
  param D: [E] = ones()
  let x, z = split(linear(u, in_proj.weight), [E, E], axis: -1)
  let conv_state, xc = causal_conv1d(x, conv1d.weight, conv_state)
  let y = selective_scan(silu(xc), -exp(A_log), D, ssm_state, delta_softplus: true)
  return linear(y * silu(z), out_proj.weight)
}

model mamba_lm(d_model, n_layer, vocab_size = 50280, pad_multiple = 8,
               tie_embeddings = true, rms = true) {
  dim B, L
  let V = ceil(vocab_size / pad_multiple) * pad_multiple   # padded vocabulary
  input ids: [B, L] i32
  param backbone.embedding.weight: [V, d_model] = normal(0.02)
  let h = embedding(ids, backbone.embedding.weight)
  repeat n_layer as backbone.layers {
    let mixer = mamba1(d_model: d_model)
    if rms && !(d_model < 0) {
      param norm.weight: [d_model] = ones()
      let h = h + mixer(rms_norm(h, norm.weight, eps: 1e-5))
    } else if d_model >= 1024 || false {
      let h = h + mixer(h)
    } else {
      let h = h - -mixer(h) / 2.5e0
    }
  }
  let first = backbone.layers.0.mixer.A_log
  param backbone.norm_f.weight: [d_model]
  if !tie_embeddings { param lm_head.weight: [V, d_model] = normal(0.02) }
  let name = "the \"quoted\" \\ name"
  require V % pad_multiple == 0 && n_layer >= 1
    else "the vocabulary is padded"
  return linear(rms_norm(h, backbone.norm_f.weight), lm_head.weight), [1, 2.5, [B,],]
}

preset "mamba-130m" = mamba_lm(d_model: 768, n_layer: 24)
preset "mamba-tiny" = mamba_lm(d_model: 64, n_layer: 2, vocab_size: 1000,)
"#;

#[test]
fn sample_parses_cleanly() {
    let (file, diags) = parse_file(SAMPLE, 0);
    assert!(diags.is_empty(), "{diags:#?}");
    assert_eq!(file.items.len(), 4);

    let Item::Def(block) = &file.items[0] else {
        panic!("expected a def")
    };
    assert_eq!(block.kind, DefKind::Block);
    assert_eq!(block.name.name, "mamba1");
    let params: Vec<_> = block.params.iter().map(|p| p.name.name.as_str()).collect();
    assert_eq!(
        params,
        ["d_model", "d_state", "d_conv", "expand", "dt_rank", "eps"]
    );
    assert!(block.params[0].default.is_none());
    assert!(matches!(
        block.params[1].default.as_ref().map(|e| &e.kind),
        Some(ExprKind::Int(16))
    ));
    assert!(matches!(
        block.params[5].default.as_ref().map(|e| &e.kind),
        Some(ExprKind::Float(v)) if *v == 1e-5
    ));
    assert_eq!(block.body.len(), 13);
    // `state conv_state: [B, E, d_conv - 1] f32`
    let Stmt::State { name, ty, .. } = &block.body[3] else {
        panic!("expected a state")
    };
    assert_eq!(name.name, "conv_state");
    assert_eq!(ty.dims.len(), 3);
    assert_eq!(ty.dtype.as_ref().map(|d| d.name.as_str()), Some("f32"));
    assert!(matches!(
        ty.dims[2].kind,
        ExprKind::Binary { op: BinOp::Sub, .. }
    ));
    // `param in_proj.weight: [2 * E, d_model] = fan_in_uniform(1.0)`
    let Stmt::Param { path, init, .. } = &block.body[5] else {
        panic!("expected a param")
    };
    assert_eq!(path.joined(), "in_proj.weight");
    let Some(ExprKind::Call { callee, args }) = init.as_ref().map(|e| &e.kind) else {
        panic!("expected an init call")
    };
    assert_eq!(callee.joined(), "fan_in_uniform");
    assert_eq!(args.len(), 1);
    // `let x, z = split(..., axis: -1)`
    let Stmt::Let { names, value, .. } = &block.body[9] else {
        panic!("expected a let")
    };
    assert_eq!(names.len(), 2);
    let ExprKind::Call { args, .. } = &value.kind else {
        panic!("expected a call")
    };
    assert_eq!(args.len(), 3);
    assert_eq!(args[2].name.as_ref().map(|n| n.name.as_str()), Some("axis"));
    assert!(matches!(
        args[2].value.kind,
        ExprKind::Unary { op: UnOp::Neg, .. }
    ));
    assert!(matches!(&args[1].value.kind, ExprKind::List(v) if v.len() == 2));

    let Item::Def(model) = &file.items[1] else {
        panic!("expected a def")
    };
    assert_eq!(model.kind, DefKind::Model);
    let Stmt::Input { ty, .. } = &model.body[2] else {
        panic!("expected an input")
    };
    assert_eq!(ty.dtype.as_ref().map(|d| d.name.as_str()), Some("i32"));
    let Stmt::Repeat {
        scope, body, count, ..
    } = &model.body[5]
    else {
        panic!("expected a repeat")
    };
    assert_eq!(
        scope.as_ref().map(|s| s.joined()).as_deref(),
        Some("backbone.layers")
    );
    assert!(matches!(&count.kind, ExprKind::Path(p) if p.joined() == "n_layer"));
    assert_eq!(body.len(), 2);
    let Stmt::If {
        cond,
        then_body,
        else_body,
        ..
    } = &body[1]
    else {
        panic!("expected an if")
    };
    assert!(matches!(cond.kind, ExprKind::Binary { op: BinOp::And, .. }));
    assert_eq!(then_body.len(), 2);
    // `else if` nests an If in the else body.
    let [
        Stmt::If {
            else_body: last, ..
        },
    ] = else_body.as_slice()
    else {
        panic!("expected else if")
    };
    assert_eq!(last.len(), 1);
    let Stmt::Let { value, .. } = &model.body[6] else {
        panic!("expected a let")
    };
    assert!(
        matches!(&value.kind, ExprKind::Path(p) if p.joined() == "backbone.layers.0.mixer.A_log")
    );
    let Stmt::Let { value, .. } = &model.body[9] else {
        panic!("expected a let")
    };
    assert_eq!(
        value.kind,
        ExprKind::Str(r#"the "quoted" \ name"#.to_string())
    );
    let Stmt::Require { cond, message, .. } = &model.body[10] else {
        panic!("expected a require")
    };
    assert_eq!(message, "the vocabulary is padded");
    let ExprKind::Binary {
        op: BinOp::And,
        lhs,
        ..
    } = &cond.kind
    else {
        panic!("expected &&")
    };
    let ExprKind::Binary {
        op: BinOp::Eq, lhs, ..
    } = &lhs.kind
    else {
        panic!("expected ==")
    };
    assert!(matches!(lhs.kind, ExprKind::Binary { op: BinOp::Rem, .. }));
    let Stmt::Return { values, .. } = &model.body[11] else {
        panic!("expected a return")
    };
    assert_eq!(values.len(), 2);

    let Item::Preset(p) = &file.items[2] else {
        panic!("expected a preset")
    };
    assert_eq!(p.name, "mamba-130m");
    assert_eq!(p.model.name, "mamba_lm");
    assert_eq!(p.args.len(), 2);
    assert_eq!(
        &SAMPLE[p.name_span.start as usize..p.name_span.end as usize],
        "\"mamba-130m\""
    );
    let Item::Preset(p) = &file.items[3] else {
        panic!("expected a preset")
    };
    assert_eq!(p.args.len(), 3);
}

#[test]
fn spans_cover_source_text() {
    let (file, _) = parse_file(SAMPLE, 3);
    let Item::Def(model) = &file.items[1] else {
        panic!("expected a def")
    };
    let text = |s: frontend::ast::Span| &SAMPLE[s.start as usize..s.end as usize];
    assert_eq!(model.span.file, 3);
    assert!(text(model.span).starts_with("model mamba_lm("));
    assert!(text(model.span).ends_with('}'));
    let Stmt::Let { value, span, .. } = &model.body[1] else {
        panic!("expected a let")
    };
    assert_eq!(
        text(*span),
        "let V = ceil(vocab_size / pad_multiple) * pad_multiple"
    );
    assert_eq!(
        text(value.span),
        "ceil(vocab_size / pad_multiple) * pad_multiple"
    );
    let Stmt::Repeat { body, .. } = &model.body[5] else {
        panic!("expected a repeat")
    };
    let Stmt::If { cond, .. } = &body[1] else {
        panic!("expected an if")
    };
    assert_eq!(text(cond.span), "rms && !(d_model < 0)");
}

#[test]
fn precedence_and_associativity() {
    let (file, diags) = parse_file(
        "block b() { let x = 1 - 2 - 3 * 4 / -5 == 6 && !a || b }",
        0,
    );
    assert!(diags.is_empty(), "{diags:?}");
    let Item::Def(d) = &file.items[0] else {
        panic!()
    };
    let Stmt::Let { value, .. } = &d.body[0] else {
        panic!()
    };
    // ((((1 - 2) - ((3 * 4) / -5)) == 6) && !a) || b
    let ExprKind::Binary { op, lhs, .. } = &value.kind else {
        panic!()
    };
    assert_eq!(*op, BinOp::Or);
    let ExprKind::Binary { op, lhs, .. } = &lhs.kind else {
        panic!()
    };
    assert_eq!(*op, BinOp::And);
    let ExprKind::Binary { op, lhs, .. } = &lhs.kind else {
        panic!()
    };
    assert_eq!(*op, BinOp::Eq);
    let ExprKind::Binary { op, lhs, rhs } = &lhs.kind else {
        panic!()
    };
    assert_eq!(*op, BinOp::Sub);
    assert!(matches!(lhs.kind, ExprKind::Binary { op: BinOp::Sub, .. }));
    assert!(matches!(rhs.kind, ExprKind::Binary { op: BinOp::Div, .. }));
}

#[test]
fn shipped_library_parses_cleanly() {
    let text = include_str!("../library/mamba.m2");
    let (file, diags) = parse_file(text, 0);
    assert!(diags.is_empty(), "{diags:#?}");
    let presets = file
        .items
        .iter()
        .filter(|i| matches!(i, Item::Preset(_)))
        .count();
    assert!(presets >= 2);
}

#[test]
fn empty_and_comment_only_files() {
    for text in ["", "   \n\t", "# only a comment", "# a\n# b\n"] {
        let (file, diags) = parse_file(text, 0);
        assert!(file.items.is_empty() && diags.is_empty(), "{text:?}");
    }
}

/// The sample's tokens as source slices.
fn sample_tokens() -> Vec<(usize, usize)> {
    let (toks, _) = lexer::lex(SAMPLE, 0);
    toks.iter()
        .filter(|t| t.kind != Kind::Eof)
        .map(|t| (t.start as usize, t.end as usize))
        .collect()
}

const FRAGMENTS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    ".",
    "=",
    "==",
    "<",
    "-",
    "!",
    "*",
    "let",
    "if",
    "else",
    "repeat",
    "as",
    "return",
    "param",
    "model",
    "preset",
    "x",
    "0",
    "1.5",
    "\"s\"",
    "\"",
    "$",
    "#",
    "99999999999999999999",
    "1e",
    "\n",
];

fn check(text: &str) {
    let (_file, diags) = parse_file(text, 0);
    for d in &diags {
        assert!(!d.labels.is_empty(), "{d:?}");
        for l in &d.labels {
            assert!(
                l.span.start <= l.span.end && l.span.end as usize <= text.len(),
                "{d:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn random_ascii_never_panics(text in "[ -~\n]{0,300}") {
        check(&text);
    }

    #[test]
    fn token_edits_never_panic(
        edits in proptest::collection::vec((0usize..3, any::<prop::sample::Index>(),
                                            0usize..FRAGMENTS.len()), 1..4)
    ) {
        let toks = sample_tokens();
        let mut text = SAMPLE.to_string();
        // Apply edits from the back so earlier offsets stay valid.
        let mut chosen: Vec<_> = edits.iter().map(|(op, idx, f)| (idx.index(toks.len()), *op, *f)).collect();
        chosen.sort_by_key(|c| std::cmp::Reverse(c.0));
        chosen.dedup_by_key(|c| c.0);
        for (i, op, f) in chosen {
            let (s, e) = toks[i];
            match op {
                0 => text.replace_range(s..e, ""),
                1 => text.insert_str(s, &format!(" {} ", FRAGMENTS[f])),
                _ => text.replace_range(s..e, FRAGMENTS[f]),
            }
        }
        check(&text);
    }
}

#[test]
fn single_token_deletions_give_few_diagnostics() {
    // Exhaustively: deleting any one token never panics, and yields at most a handful of
    // diagnostics (no cascades).
    let toks = sample_tokens();
    for &(s, e) in &toks {
        let mut text = SAMPLE.to_string();
        text.replace_range(s..e, "");
        let (_, diags) = parse_file(&text, 0);
        assert!(
            diags.len() <= 2,
            "deleting `{}` at {s}: {} diagnostics: {diags:#?}",
            &SAMPLE[s..e],
            diags.len()
        );
    }
}

#[test]
fn single_token_insertions_give_few_diagnostics() {
    // Exhaustively for the commonest slips: a stray bracket, comma, `=` or character before any
    // token gives at most a few diagnostics, and nearly always exactly one.
    let toks = sample_tokens();
    let mut single = 0;
    let mut total = 0;
    for frag in [")", "]", "}", "(", ",", "=", "$", "let"] {
        for &(s, _) in &toks {
            let mut text = SAMPLE.to_string();
            text.insert_str(s, &format!(" {frag} "));
            let (_, diags) = parse_file(&text, 0);
            assert!(
                diags.len() <= 3,
                "inserting `{frag}` at {s}: {} diagnostics: {diags:#?}",
                diags.len()
            );
            total += 1;
            single += usize::from(diags.len() == 1);
        }
    }
    assert!(
        single * 100 >= total * 90,
        "{single} of {total} give one diagnostic"
    );
}
