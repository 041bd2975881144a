//! `--config config.json`: both namings give the published models; bad configs are
//! diagnostics.

mod common;

use frontend::{Code, ModelSpec};

fn with_config(
    model: &str,
    json: &str,
) -> (
    frontend::Sources,
    Result<frontend::Compiled, Vec<frontend::Diagnostic>>,
) {
    let spec = ModelSpec {
        model: model.into(),
        config: Some(("config.json".into(), json.into())),
        ..ModelSpec::default()
    };
    frontend::compile(&spec)
}

fn params(model: &str, json: &str) -> u64 {
    let (sources, r) = with_config(model, json);
    let c = r.unwrap_or_else(|d| panic!("{}", frontend::render(&d, &sources, false)));
    assert!(
        c.warnings.is_empty(),
        "{}",
        frontend::render(&c.warnings, &sources, false)
    );
    c.graph.param_count().expect("known")
}

const MAMBA_130M_REF: &str = r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
  "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8}"#;

const MAMBA2_130M_REF: &str = r#"{"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
  "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
  "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16, "tie_embeddings": true}"#;

const MAMBA_130M_HF: &str = r#"{"architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
  "eos_token_id": 0, "expand": 2, "hidden_act": "silu", "hidden_size": 768, "initializer_range": 0.1,
  "intermediate_size": 1536, "layer_norm_epsilon": 1e-05, "model_type": "mamba", "n_layer": 24,
  "num_hidden_layers": 24, "pad_token_id": 0, "rescale_prenorm_residual": false, "residual_in_fp32": true,
  "state_size": 16, "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1,
  "time_step_min": 0.001, "time_step_rank": 48, "time_step_scale": 1.0, "torch_dtype": "float32",
  "transformers_version": "4.39.0.dev0", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "vocab_size": 50280}"#;

const MAMBA2_130M_HF: &str = r#"{"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
  "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50288, "state_size": 128, "expand": 2,
  "head_dim": 64, "num_heads": 24, "n_groups": 1, "conv_kernel": 4, "chunk_size": 256,
  "tie_word_embeddings": true, "layer_norm_epsilon": 1e-05, "use_bias": false, "use_conv_bias": true,
  "rms_norm": true, "norm_before_gate": false, "residual_in_fp32": true, "hidden_act": "silu",
  "time_step_limit": [0.0, {"__float__": "Infinity"}], "time_step_min": 0.001, "time_step_max": 0.1,
  "time_step_floor": 0.0001, "time_step_rank": 48, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
  "initializer_range": 0.1, "rescale_prenorm_residual": false, "use_cache": true, "dtype": "float32",
  "transformers_version": "5.17.0"}"#;

#[test]
fn reference_naming() {
    assert_eq!(params("mamba_lm", MAMBA_130M_REF), 129_135_360);
    assert_eq!(params("mamba2_lm", MAMBA2_130M_REF), 128_989_632);
}

#[test]
fn hugging_face_naming() {
    assert_eq!(params("mamba_lm", MAMBA_130M_HF), 129_135_360);
    assert_eq!(params("mamba2_lm", MAMBA2_130M_HF), 128_989_632);
}

#[test]
fn the_config_chooses_the_family() {
    // Named by a model of the other family, the config's family wins for model names...
    assert_eq!(params("mamba_lm", MAMBA2_130M_REF), 128_989_632);
    // ...but a preset of the other family is an error.
    let (_, r) = with_config("mamba-130m", MAMBA2_130M_REF);
    assert_eq!(r.expect_err("family mismatch")[0].code, Code::InvalidConfig);
}

fn codes(json: &str) -> Vec<Code> {
    let (_, r) = with_config("mamba_lm", json);
    match r {
        Ok(c) => c.warnings.iter().map(|d| d.code).collect(),
        Err(d) => d.iter().map(|d| d.code).collect(),
    }
}

#[test]
fn bad_configs_are_diagnostics() {
    let cases = [
        (
            r#"{"d_model": "768", "n_layer": 2}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"d_state": 0}}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": -1}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "frobnicate": 1}"#,
            vec![Code::UnknownConfigKey],
        ),
        (
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 100}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 3, "head_dim": 16}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"bias": true}}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"layer": "Mamba3"}}"#,
            vec![Code::InvalidConfig],
        ),
        (r#"{"d_model": 64"#, vec![Code::InvalidConfig]),
        (r#"[1, 2]"#, vec![Code::InvalidConfig]),
        (r#"{"n_layer": 2}"#, vec![Code::InvalidConfig]),
        (
            r#"{"d_model": 64, "n_layer": 2, "ssm_cfg": {"headdim": 16}}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 1e300, "n_layer": 2}"#,
            vec![Code::InvalidConfig],
        ),
        (
            r#"{"d_model": 64, "n_layer": 2, "time_step_limit": [0.001, 0.1]}"#,
            vec![Code::InvalidConfig],
        ),
    ];
    for (json, want) in cases {
        assert_eq!(codes(json), want, "{json}");
    }
}

#[test]
fn unknown_key_warning_renders_with_its_location() {
    let (sources, r) = with_config(
        "mamba_lm",
        "{\"d_model\": 16, \"n_layer\": 1,\n  \"frobnicate\": 1}",
    );
    let c = r.expect("a warning only");
    let text = frontend::render(&c.warnings, &sources, false);
    insta::assert_snapshot!("unknown_config_key", text);
}

#[test]
fn fixture_configs_written_by_transformers_5_read_cleanly() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (dir, model, total) in [
        ("tiny-mamba", "mamba_lm", 5_488u64),
        ("tiny-mamba2", "mamba2_lm", 16_664),
    ] {
        let json = std::fs::read_to_string(format!("{root}/tests/fixtures/{dir}/config.json"))
            .expect("fixture");
        assert_eq!(params(model, &json), total, "{dir}");
    }
}
