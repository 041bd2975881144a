//! The IR text form round-trips for every shipped model and for random tiny configs; the
//! graph of one layer is pinned by snapshots.

mod common;

use frontend::{ConfigArg, ConfigValue, ModelSpec};
use proptest::prelude::*;

fn roundtrip(g: &ir::Graph) {
    let text = ir::print(g);
    let parsed = ir::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    assert_eq!(ir::print(&parsed), text, "{}", g.name);
    ir::verify(&parsed).unwrap_or_else(|e| panic!("{}: {e:?}", g.name));
}

#[test]
fn every_shipped_model_round_trips() {
    let prog = frontend::Program::with_library().expect("library parses");
    let names: Vec<String> = prog.presets().map(|p| p.name.clone()).collect();
    assert_eq!(names.len(), 12);
    for name in names {
        roundtrip(&common::compile_name(&name).graph);
    }
}

#[test]
fn one_layer_of_mamba_130m() {
    let out = common::cli(&["graph", "mamba-130m", "--layers", "0"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    insta::assert_snapshot!("mamba_130m_layer0", out.stdout);
}

#[test]
fn one_layer_of_mamba2_130m() {
    let out = common::cli(&["graph", "mamba2-130m", "--layers", "0"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    insta::assert_snapshot!("mamba2_130m_layer0", out.stdout);
}

fn arg(name: &str, v: i64) -> ConfigArg {
    ConfigArg {
        name: name.into(),
        value: ConfigValue::Int(v),
        span: None,
        origin: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_tiny_configs_round_trip(
        mamba2 in any::<bool>(),
        d_model in 1i64..48,
        n_layer in 1i64..4,
        d_state in 1i64..9,
        d_conv in 1i64..5,
        expand in 1i64..3,
        vocab in 1i64..70,
        heads_per_group in 1i64..3,
        ngroups in 1i64..3,
        tie in any::<bool>(),
    ) {
        let mut args = vec![
            arg("d_model", d_model), arg("n_layer", n_layer), arg("d_state", d_state),
            arg("d_conv", d_conv), arg("expand", expand), arg("vocab_size", vocab),
            ConfigArg { name: "tie_embeddings".into(), value: ConfigValue::Bool(tie), span: None, origin: None },
        ];
        let model = if mamba2 {
            // headdim must divide E and ngroups the heads: pick headdim from E.
            let e = expand * d_model;
            let heads = heads_per_group * ngroups;
            let headdim = if e % heads == 0 { e / heads } else { e };
            let ngroups = if e % heads == 0 { ngroups } else { 1 };
            args.push(arg("headdim", headdim));
            args.push(arg("ngroups", ngroups));
            args.push(arg("chunk_size", 4));
            "mamba2_lm"
        } else {
            "mamba_lm"
        };
        let prog = frontend::Program::with_library().expect("library");
        let (g, _) = frontend::elaborate::elaborate(&prog, model, "random", &args)
            .map_err(|d| TestCaseError::fail(frontend::render(&d, &prog.sources, false)))?;
        roundtrip(&g);
        let _ = ModelSpec::default();
    }
}
