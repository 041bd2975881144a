//! `config.json` of the reference implementation (`d_model`, `ssm_cfg`, ...) or of Hugging Face
//! transformers (`hidden_size`, `state_size`, ...) turned into the config values of the library
//! models `mamba_lm` / `mamba2_lm` (REFERENCE.md section 4).
//!
//! Every key is accounted for: mapped to a model value, checked against the only value the
//! library supports, known to be irrelevant here, or reported as unknown (a warning). Values of
//! the wrong type and values that contradict each other are errors.

use crate::diag::{Code, Diagnostic};
use crate::elaborate::{ConfigArg, ConfigValue};
use ir::Span;
use serde_json::{Map, Value};

/// The model a config describes.
#[derive(Debug)]
pub struct Config {
    /// `mamba_lm` or `mamba2_lm`.
    pub model: String,
    pub args: Vec<ConfigArg>,
    pub warnings: Vec<Diagnostic>,
}

/// What a config key means to ma2mba.
#[derive(Clone, Copy)]
enum Key {
    /// Becomes the model's config value of this name (integer).
    Int(&'static str),
    /// Becomes the model's config value of this name (number).
    Float(&'static str),
    /// Becomes the model's config value of this name (boolean).
    Bool(&'static str),
    /// `dt_rank` / `time_step_rank`: an integer or "auto".
    Rank(&'static str),
    /// Must equal this value: other values describe models the library does not build.
    Fixed(Fixed),
    /// Checked against other values after reading (intermediate_size, num_heads, layer).
    Derived,
    /// Known, and irrelevant to the compiled graph (token ids, dtype, init details).
    Ignored,
}

#[derive(Clone, Copy)]
enum Fixed {
    True,
    False,
    Zero,
    EmptyList,
    EmptyObject,
    Silu,
    /// `[0, inf]`, the default dt limit.
    NoDtLimit,
}

const COMMON: &[(&str, Key)] = &[
    ("vocab_size", Key::Int("vocab_size")),
    (
        "pad_vocab_size_multiple",
        Key::Int("pad_vocab_size_multiple"),
    ),
    // reference naming
    ("d_model", Key::Int("d_model")),
    ("n_layer", Key::Int("n_layer")),
    ("tie_embeddings", Key::Bool("tie_embeddings")),
    ("norm_epsilon", Key::Float("eps")),
    ("rms_norm", Key::Fixed(Fixed::True)),
    ("d_intermediate", Key::Fixed(Fixed::Zero)),
    ("attn_layer_idx", Key::Fixed(Fixed::EmptyList)),
    ("attn_cfg", Key::Fixed(Fixed::EmptyObject)),
    ("residual_in_fp32", Key::Ignored),
    ("fused_add_norm", Key::Ignored),
    ("initializer_cfg", Key::Ignored),
    ("ssm_cfg", Key::Derived),
    // Hugging Face naming
    ("hidden_size", Key::Int("d_model")),
    ("num_hidden_layers", Key::Int("n_layer")),
    ("state_size", Key::Int("d_state")),
    ("conv_kernel", Key::Int("d_conv")),
    ("expand", Key::Int("expand")),
    ("layer_norm_epsilon", Key::Float("eps")),
    ("tie_word_embeddings", Key::Bool("tie_embeddings")),
    ("use_bias", Key::Fixed(Fixed::False)),
    ("use_conv_bias", Key::Fixed(Fixed::True)),
    ("hidden_act", Key::Fixed(Fixed::Silu)),
    ("time_step_limit", Key::Fixed(Fixed::NoDtLimit)),
    ("intermediate_size", Key::Derived),
    ("model_type", Key::Derived),
    ("num_heads", Key::Derived),
    ("time_step_rank", Key::Rank("dt_rank")),
    ("head_dim", Key::Int("headdim")),
    ("n_groups", Key::Int("ngroups")),
    ("chunk_size", Key::Int("chunk_size")),
    ("norm_before_gate", Key::Fixed(Fixed::False)),
    ("architectures", Key::Ignored),
    ("bos_token_id", Key::Ignored),
    ("eos_token_id", Key::Ignored),
    ("pad_token_id", Key::Ignored),
    ("initializer_range", Key::Ignored),
    ("rescale_prenorm_residual", Key::Ignored),
    ("use_cache", Key::Ignored),
    ("torch_dtype", Key::Ignored),
    ("dtype", Key::Ignored),
    ("transformers_version", Key::Ignored),
    ("use_mambapy", Key::Ignored),
    ("use_associative_scan", Key::Ignored),
    ("time_step_min", Key::Ignored),
    ("time_step_max", Key::Ignored),
    ("time_step_floor", Key::Ignored),
    ("time_step_scale", Key::Ignored),
    ("time_step_init_scheme", Key::Ignored),
];

/// Keys of the reference `ssm_cfg` object.
const SSM_CFG: &[(&str, Key)] = &[
    ("d_state", Key::Int("d_state")),
    ("d_conv", Key::Int("d_conv")),
    ("expand", Key::Int("expand")),
    ("headdim", Key::Int("headdim")),
    ("ngroups", Key::Int("ngroups")),
    ("chunk_size", Key::Int("chunk_size")),
    ("dt_rank", Key::Rank("dt_rank")),
    ("layer", Key::Derived),
    ("conv_bias", Key::Fixed(Fixed::True)),
    ("bias", Key::Fixed(Fixed::False)),
    ("D_has_hdim", Key::Fixed(Fixed::False)),
    ("rmsnorm", Key::Fixed(Fixed::True)),
    ("norm_before_gate", Key::Fixed(Fixed::False)),
    ("dt_limit", Key::Fixed(Fixed::NoDtLimit)),
    ("learnable_init_states", Key::Fixed(Fixed::False)),
    ("activation", Key::Fixed(Fixed::Silu)),
    ("dt_min", Key::Ignored),
    ("dt_max", Key::Ignored),
    ("dt_init_floor", Key::Ignored),
    ("dt_scale", Key::Ignored),
    ("dt_init", Key::Ignored),
    ("A_init_range", Key::Ignored),
    ("use_mem_eff_path", Key::Ignored),
    ("sequence_parallel", Key::Ignored),
];

/// Model values only the Mamba-2 model takes.
const MAMBA2_ONLY: &[&str] = &["headdim", "ngroups", "chunk_size"];
/// Model values only the Mamba-1 model takes.
const MAMBA1_ONLY: &[&str] = &["dt_rank"];

struct Reader<'t> {
    text: &'t str,
    file: u16,
    file_name_hint: String,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    args: Vec<ConfigArg>,
}

impl Reader<'_> {
    /// The span of `"key"` in the file, searched after `after` (for nested objects).
    fn key_span(&self, key: &str, after: Option<&str>) -> Span {
        let start = after
            .and_then(|a| self.text.find(&format!("\"{a}\"")))
            .unwrap_or(0);
        let quoted = format!("\"{key}\"");
        match self.text[start..].find(&quoted) {
            Some(i) => Span::new(
                self.file,
                (start + i) as u32,
                (start + i + quoted.len()) as u32,
            ),
            None => Span::new(self.file, 0, 0),
        }
    }

    fn bad(&mut self, key: &str, after: Option<&str>, v: &Value, expected: &str) {
        let span = self.key_span(key, after);
        self.errors.push(
            Diagnostic::error(
                Code::InvalidConfig,
                format!("invalid config value for `{key}`: {v}"),
            )
            .label(span, format!("expected {expected}")),
        );
    }

    fn push(&mut self, name: &str, value: ConfigValue, key: &str, after: Option<&str>) {
        let span = self.key_span(key, after);
        if let Some(prev) = self.args.iter().find(|a| a.name == name) {
            if prev.value != value {
                self.errors.push(
                    Diagnostic::error(
                        Code::InvalidConfig,
                        format!("config gives `{name}` twice with different values"),
                    )
                    .label(span, format!("{key} = {}", show(&value)))
                    .label(
                        prev.span.unwrap_or(span),
                        format!("first given as {}", show(&prev.value)),
                    ),
                );
            }
            return;
        }
        self.args.push(ConfigArg {
            name: name.to_string(),
            value,
            span: Some(span),
            origin: Some(format!("{} key \"{key}\"", self.file_name_hint)),
        });
    }

    fn read(&mut self, obj: &Map<String, Value>, table: &[(&str, Key)], after: Option<&str>) {
        for (key, v) in obj {
            let Some((_, kind)) = table.iter().find(|(k, _)| k == key) else {
                let span = self.key_span(key, after);
                self.warnings.push(
                    Diagnostic::warning(
                        Code::UnknownConfigKey,
                        format!("unknown config key `{key}` is ignored"),
                    )
                    .label(span, "not a key ma2mba knows"),
                );
                continue;
            };
            match *kind {
                Key::Int(name) => match int(v) {
                    Some(n) => self.push(name, ConfigValue::Int(n), key, after),
                    None => self.bad(key, after, v, "an integer"),
                },
                Key::Float(name) => match v.as_f64() {
                    Some(x) => self.push(name, ConfigValue::Float(x), key, after),
                    None => self.bad(key, after, v, "a number"),
                },
                Key::Bool(name) => match v.as_bool() {
                    Some(b) => self.push(name, ConfigValue::Bool(b), key, after),
                    None => self.bad(key, after, v, "true or false"),
                },
                Key::Rank(name) => match (v.as_str(), int(v)) {
                    (Some("auto"), _) => {}
                    (_, Some(n)) => self.push(name, ConfigValue::Int(n), key, after),
                    _ => self.bad(key, after, v, "an integer or \"auto\""),
                },
                Key::Fixed(f) => {
                    let (ok, want) = fixed(f, v);
                    if !ok {
                        let span = self.key_span(key, after);
                        self.errors.push(
                            Diagnostic::error(
                                Code::InvalidConfig,
                                format!("unsupported config value `{key}`: {v}"),
                            )
                            .label(span, format!("ma2mba supports only {want}"))
                            .note("the shipped Mamba models do not have this variant"),
                        );
                    }
                }
                Key::Derived | Key::Ignored => {}
            }
        }
    }

    fn get_int(&self, name: &str) -> Option<i64> {
        self.args
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| match a.value {
                ConfigValue::Int(n) => Some(n),
                _ => None,
            })
    }
}

fn show(v: &ConfigValue) -> String {
    match v {
        ConfigValue::Int(n) => n.to_string(),
        ConfigValue::Float(x) => x.to_string(),
        ConfigValue::Bool(b) => b.to_string(),
        ConfigValue::Str(s) => format!("{s:?}"),
    }
}

fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        let x = v.as_f64()?;
        (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64)
    })
}

/// A number, including transformers' `{"__float__": "Infinity"}` encoding.
fn number(v: &Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    match v.get("__float__")?.as_str()? {
        "Infinity" | "inf" => Some(f64::INFINITY),
        "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
        s => s.parse().ok(),
    }
}

fn fixed(f: Fixed, v: &Value) -> (bool, &'static str) {
    match f {
        Fixed::True => (v.as_bool() == Some(true), "true"),
        Fixed::False => (v.as_bool() == Some(false) || v.is_null(), "false"),
        Fixed::Zero => (int(v) == Some(0) || v.is_null(), "0"),
        Fixed::EmptyList => (
            v.as_array().is_some_and(|a| a.is_empty()) || v.is_null(),
            "[]",
        ),
        Fixed::EmptyObject => (
            v.as_object().is_some_and(|o| o.is_empty()) || v.is_null(),
            "{}",
        ),
        Fixed::Silu => (
            matches!(v.as_str(), Some("silu" | "swish")) || v.is_null(),
            "\"silu\"",
        ),
        Fixed::NoDtLimit => {
            let ok = v.as_array().is_some_and(|a| {
                a.len() == 2
                    && number(&a[0]) == Some(0.0)
                    && number(&a[1]).is_some_and(|x| x == f64::INFINITY)
            });
            (ok, "[0.0, inf] (no dt clamp)")
        }
    }
}

/// Reads a `config.json`. `file` is the index of its text in the diagnostics' sources.
pub fn from_json(text: &str, file: u16, file_name: &str) -> Result<Config, Vec<Diagnostic>> {
    let root: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let (line, col) = (e.line(), e.column());
            let offset = text
                .split_inclusive('\n')
                .take(line.saturating_sub(1))
                .map(str::len)
                .sum::<usize>()
                + col.saturating_sub(1);
            let off = offset.min(text.len()) as u32;
            return Err(vec![
                Diagnostic::error(Code::InvalidConfig, "config file is not valid JSON")
                    .label(Span::new(file, off, off), e.to_string()),
            ]);
        }
    };
    let Some(obj) = root.as_object() else {
        return Err(vec![
            Diagnostic::error(Code::InvalidConfig, "config file must hold a JSON object").label(
                Span::new(file, 0, text.len().min(1) as u32),
                "not an object",
            ),
        ]);
    };
    let mut r = Reader {
        text,
        file,
        file_name_hint: file_name.to_string(),
        errors: Vec::new(),
        warnings: Vec::new(),
        args: Vec::new(),
    };
    r.read(obj, COMMON, None);
    let mut mamba2 = false;
    if let Some(ssm) = obj.get("ssm_cfg") {
        match ssm.as_object() {
            Some(cfg) => {
                r.read(cfg, SSM_CFG, Some("ssm_cfg"));
                match cfg.get("layer").map(|l| (l, l.as_str())) {
                    None | Some((_, Some("Mamba1"))) => {}
                    Some((_, Some("Mamba2"))) => mamba2 = true,
                    Some((l, _)) => r.bad("layer", Some("ssm_cfg"), l, "\"Mamba1\" or \"Mamba2\""),
                }
            }
            None => r.bad("ssm_cfg", None, ssm, "an object"),
        }
    }
    match obj.get("model_type").map(|m| (m, m.as_str())) {
        None => {}
        Some((_, Some("mamba"))) => {}
        Some((_, Some("mamba2"))) => mamba2 = true,
        Some((m, _)) => r.bad("model_type", None, m, "\"mamba\" or \"mamba2\""),
    }
    if obj.contains_key("num_heads") || obj.contains_key("head_dim") {
        mamba2 = true;
    }
    // The library pads the vocabulary itself; Hugging Face configs store it padded already,
    // and default to no padding.
    if !obj.contains_key("pad_vocab_size_multiple") && obj.contains_key("hidden_size") {
        r.args.push(ConfigArg {
            name: "pad_vocab_size_multiple".into(),
            value: ConfigValue::Int(1),
            span: None,
            origin: Some("the Hugging Face default".into()),
        });
    }
    // Values that other values determine must agree.
    let expand = r.get_int("expand").unwrap_or(2);
    let d_model = r.get_int("d_model");
    if let (Some(inter), Some(d)) = (obj.get("intermediate_size").and_then(int), d_model)
        && Some(inter) != expand.checked_mul(d)
    {
        let span = r.key_span("intermediate_size", None);
        r.errors.push(
            Diagnostic::error(
                Code::InvalidConfig,
                "inconsistent config: intermediate_size != expand * hidden_size",
            )
            .label(span, format!("intermediate_size = {inter}"))
            .note(format!(
                "expand = {expand}, hidden_size = {d}, so the inner width is {}",
                expand * d
            )),
        );
    }
    if let (Some(heads), Some(d)) = (obj.get("num_heads").and_then(int), d_model) {
        let headdim = r.get_int("headdim").unwrap_or(64);
        if heads.checked_mul(headdim) != expand.checked_mul(d) {
            let span = r.key_span("num_heads", None);
            r.errors.push(
                Diagnostic::error(
                    Code::InvalidConfig,
                    "inconsistent config: num_heads * head_dim != expand * hidden_size",
                )
                .label(span, format!("num_heads = {heads}"))
                .note(format!(
                    "head_dim = {headdim}, expand = {expand}, hidden_size = {d}"
                )),
            );
        }
    }
    let (model, foreign) = if mamba2 {
        ("mamba2_lm", MAMBA1_ONLY)
    } else {
        ("mamba_lm", MAMBA2_ONLY)
    };
    // Hugging Face's Mamba2Config carries an unused time_step_rank.
    if mamba2 {
        r.args.retain(|a| a.name != "dt_rank");
    }
    for a in &r.args {
        if foreign.contains(&a.name.as_str()) {
            let span = a.span.unwrap_or(Span::new(file, 0, 0));
            r.errors.push(
                Diagnostic::error(
                    Code::InvalidConfig,
                    format!(
                        "`{}` does not apply to a {} model",
                        a.name,
                        if mamba2 { "Mamba-2" } else { "Mamba-1" }
                    ),
                )
                .label(span, "this key")
                .help(if mamba2 {
                    "remove it"
                } else {
                    "for Mamba-2 set ssm_cfg.layer = \"Mamba2\" (or model_type = \"mamba2\")"
                }),
            );
        }
    }
    for required in ["d_model", "n_layer"] {
        if r.get_int(required).is_none() && r.errors.is_empty() {
            r.errors.push(
                Diagnostic::error(
                    Code::InvalidConfig,
                    format!("config does not give `{required}`"),
                )
                .help(if required == "d_model" {
                    "set \"d_model\" (or \"hidden_size\")"
                } else {
                    "set \"n_layer\" (or \"num_hidden_layers\")"
                }),
            );
        }
    }
    if !r.errors.is_empty() {
        return Err(r.errors);
    }
    Ok(Config {
        model: model.into(),
        args: r.args,
        warnings: r.warnings,
    })
}
