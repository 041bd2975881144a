//! Golden tests: one per diagnostic class, rendered as the user sees it (colours off).
//! Bless changes with `INSTA_UPDATE=always cargo test --test diagnostics` and review the diff.

mod common;

use frontend::{Code, ModelSpec};

/// Compiles `src` as `test.m2` and renders its diagnostics; asserts the expected codes.
fn render(src: &str, codes: &[Code]) -> String {
    let (sources, r) = common::compile_source(src);
    let diags = match r {
        Ok(c) => c.warnings,
        Err(d) => d,
    };
    let got: Vec<Code> = diags.iter().map(|d| d.code).collect();
    assert_eq!(got, codes, "{}", frontend::render(&diags, &sources, false));
    frontend::render(&diags, &sources, false)
}

/// A small valid model with one block, edited by each test to break one thing.
const BASE: &str = r#"# a tiny gated MLP model
block mlp(width, hidden = 2 * width) {
  dim B, L
  input x: [B, L, width]
  param up.weight: [2 * hidden, width] = normal(0.02)
  param down.weight: [width, hidden] = normal(0.02)
  let a, gate = split(linear(x, up.weight), [hidden, hidden])
  return linear(a * silu(gate), down.weight)
}

model toy(d_model = 8, n_layer = 2, vocab = 32) {
  dim B, L
  input ids: [B, L] i32
  param embedding.weight: [vocab, d_model] = normal(0.02)
  let h = embedding(embedding.weight, ids)
  repeat n_layer as layers {
    let mlp = mlp(width: d_model)
    let h = h + mlp(h)
  }
  return linear(h, embedding.weight)
}
"#;

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "`{from}` not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_model_compiles() {
    let (_, r) = common::compile_source(BASE);
    let c = r.expect("BASE compiles");
    assert_eq!(c.graph.num_layers(), 2);
    assert_eq!(c.graph.param_count(), Some(32 * 8 + 2 * (32 * 8 + 8 * 16)));
}

#[test]
fn syntax_errors_are_all_reported() {
    let src = edit(
        "  let h = embedding(embedding.weight, ids)",
        "  let h = embedding(embedding.weight ids)",
    )
    .replacen(
        "param up.weight: [2 * hidden, width]",
        "param up.weight [2 * hidden, width]",
        1,
    )
    .replacen(
        "  return linear(h, embedding.weight)",
        "  return linear(h, embedding.weight) +",
        1,
    );
    insta::assert_snapshot!(
        "syntax_errors",
        render(&src, &[Code::Syntax, Code::Syntax, Code::Syntax])
    );
}

#[test]
fn unclosed_bracket() {
    let src = edit("let h = h + mlp(h)", "let h = h + mlp(h");
    insta::assert_snapshot!("unclosed_bracket", render(&src, &[Code::Unclosed]));
}

#[test]
fn unknown_op_suggests_a_near_name() {
    let src = edit(
        "linear(a * silu(gate), down.weight)",
        "linear(a * sillu(gate), down.weight)",
    );
    insta::assert_snapshot!("unknown_op", render(&src, &[Code::UnknownOp]));
}

#[test]
fn unknown_name_suggests_a_near_name() {
    let src = edit("let h = h + mlp(h)", "let h = h + mlp(hh)");
    insta::assert_snapshot!("unknown_name", render(&src, &[Code::UnknownName]));
}

#[test]
fn wrong_arity() {
    let src = edit(
        "split(linear(x, up.weight), [hidden, hidden])",
        "split(linear(x, up.weight, up.weight, x), [hidden, hidden])",
    );
    insta::assert_snapshot!("wrong_arity", render(&src, &[Code::Arity]));
}

#[test]
fn unknown_attribute() {
    let src = edit("[hidden, hidden])", "[hidden, hidden], axes: -1)");
    insta::assert_snapshot!("unknown_attribute", render(&src, &[Code::UnknownAttribute]));
}

#[test]
fn axis_out_of_range() {
    let src = edit("[hidden, hidden])", "[hidden, hidden], axis: 3)");
    insta::assert_snapshot!("axis_out_of_range", render(&src, &[Code::BadArgument]));
}

#[test]
fn shape_mismatch_is_written_symbolically() {
    let src = edit(
        "return linear(a * silu(gate), down.weight)",
        "return linear(a * silu(gate), up.weight)",
    );
    insta::assert_snapshot!("shape_mismatch", render(&src, &[Code::ShapeMismatch]));
}

#[test]
fn shape_mismatch_in_elementwise_op() {
    let src = edit(
        "let h = h + mlp(h)",
        "let h = h + linear(h, embedding.weight)",
    );
    insta::assert_snapshot!(
        "shape_mismatch_elementwise",
        render(&src, &[Code::ShapeMismatch])
    );
}

#[test]
fn dtype_mismatch() {
    let src = edit("let h = h + mlp(h)", "let h = h + cast(mlp(h), \"bf16\")");
    insta::assert_snapshot!("dtype_mismatch", render(&src, &[Code::DTypeMismatch]));
}

#[test]
fn invalid_config_value_from_a_preset() {
    // A preset of the library model with an invalid value: the library's `require` reports it.
    let src = "preset \"broken\" = mamba2_lm(d_model: 64, n_layer: 2, d_state: 0)\n";
    insta::assert_snapshot!(
        "invalid_config_zero_dim",
        render(src, &[Code::InvalidConfig])
    );
}

#[test]
fn invalid_config_headdim_must_divide() {
    let spec = ModelSpec {
        model: "mamba2_lm".into(),
        config: Some((
            "config.json".into(),
            r#"{"d_model": 100, "n_layer": 2, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}}"#
                .into(),
        )),
        ..ModelSpec::default()
    };
    let (sources, r) = frontend::compile(&spec);
    let diags = r.expect_err("headdim 48 does not divide 200");
    assert_eq!(
        diags.iter().map(|d| d.code).collect::<Vec<_>>(),
        [Code::InvalidConfig]
    );
    insta::assert_snapshot!(
        "invalid_config_headdim",
        frontend::render(&diags, &sources, false)
    );
}

#[test]
fn nesting_limit() {
    let deep = format!(
        "model m() {{\n  let x = {}1\n  return x\n}}\n",
        "(".repeat(100_000)
    );
    let (sources, r) = common::compile_source(&deep);
    let diags = r.expect_err("too deep");
    assert!(
        diags.iter().any(|d| d.code == Code::Limit),
        "{}",
        frontend::render(&diags, &sources, false)
    );
}

#[test]
fn repeat_limit() {
    let src = edit("repeat n_layer as layers", "repeat 1000000 as layers");
    insta::assert_snapshot!("repeat_limit", render(&src, &[Code::Limit]));
}

#[test]
fn block_recursion_limit() {
    let src = r#"
block loop(w) {
  dim B, L
  input x: [B, L, w]
  let inner = loop(w: w)
  return inner(x)
}
model m() {
  dim B, L
  input x: [B, L, 4] f32
  let l = loop(w: 4)
  return l(x)
}
"#;
    let (sources, r) = common::compile_source(src);
    let diags = r.expect_err("recursion");
    assert!(
        diags.iter().any(|d| d.code == Code::Limit),
        "{}",
        frontend::render(&diags, &sources, false)
    );
}

#[test]
fn errors_do_not_cascade() {
    // `a` fails once; its later uses stay quiet.
    let src = edit(
        "  return linear(a * silu(gate), down.weight)",
        "  let a = a + nope\n  let b = a * 2\n  return linear(b * silu(gate), down.weight)",
    );
    let (_, r) = common::compile_source(&src);
    let diags = r.expect_err("unknown name");
    assert_eq!(diags.len(), 1, "{diags:#?}");
}

#[test]
fn exit_code_is_1_on_user_errors_and_0_otherwise() {
    let bin = env!("CARGO_BIN_EXE_ma2mba");
    let dir = std::env::temp_dir().join(format!("ma2mba-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.m2");
    std::fs::write(&bad, edit("mlp(h)", "mlp(hh)")).unwrap();
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let out = run(&["check", bad.to_str().unwrap(), "--color", "never"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E0200"));
    let out = run(&["check", "tiny-mamba2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["check", "no-such-model"]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::remove_dir_all(&dir).ok();
}
