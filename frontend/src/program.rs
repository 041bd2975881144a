//! A program: the shipped model library plus the user's files, and how a model named on the
//! command line (`mamba2-130m`, `models/my.m2`, `mamba_lm --config config.json`) is found and
//! elaborated.

use crate::ast::{self, DefKind, ExprKind, Item, UnOp};
use crate::config;
use crate::diag::{Code, Diagnostic, Sources, near_name};
use crate::elaborate::{ConfigArg, ConfigValue, elaborate};
use ir::Graph;

/// The model library, embedded in the binary.
pub const LIBRARY: &str = include_str!("../library/mamba.m2");
/// The name under which diagnostics show the library.
pub const LIBRARY_NAME: &str = "<library>/mamba.m2";

/// Parsed DSL files; later files shadow definitions of earlier ones.
#[derive(Debug)]
pub struct Program {
    pub sources: Sources,
    pub files: Vec<ast::File>,
}

/// An elaborated model with the warnings found on the way.
#[derive(Debug)]
pub struct Compiled {
    pub graph: Graph,
    pub warnings: Vec<Diagnostic>,
}

impl Program {
    /// The program holding just the shipped library.
    pub fn with_library() -> Result<Program, Vec<Diagnostic>> {
        let mut p = Program {
            sources: Sources::new(),
            files: Vec::new(),
        };
        let diags = p.add_file(LIBRARY_NAME, LIBRARY);
        if diags.is_empty() { Ok(p) } else { Err(diags) }
    }

    /// Parses a file into the program; returns its syntax errors (the file is added even with
    /// errors, so later stages can report more).
    pub fn add_file(&mut self, name: &str, text: &str) -> Vec<Diagnostic> {
        let id = self.sources.add(name, text);
        let (file, diags) = crate::parser::parse_file(text, id);
        self.files.push(file);
        diags
    }

    pub fn presets(&self) -> impl Iterator<Item = &ast::Preset> {
        self.files.iter().rev().flat_map(|f| {
            f.items.iter().filter_map(|i| match i {
                Item::Preset(p) => Some(p),
                Item::Def(_) => None,
            })
        })
    }

    pub fn preset(&self, name: &str) -> Option<&ast::Preset> {
        self.presets().find(|p| p.name == name)
    }

    /// Model definitions of file `file`.
    pub fn models_in(&self, file: usize) -> Vec<&ast::Def> {
        self.files.get(file).map_or_else(Vec::new, |f| {
            f.items
                .iter()
                .filter_map(|i| match i {
                    Item::Def(d) if d.kind == DefKind::Model => Some(d),
                    Item::Def(_) | Item::Preset(_) => None,
                })
                .collect()
        })
    }

    fn has_model(&self, name: &str) -> bool {
        self.files.iter().any(|f| {
            f.items.iter().any(
                |i| matches!(i, Item::Def(d) if d.kind == DefKind::Model && d.name.name == name),
            )
        })
    }

    /// A preset's config values (preset arguments are literals).
    pub fn preset_args(&self, p: &ast::Preset) -> Result<Vec<ConfigArg>, Vec<Diagnostic>> {
        let mut out = Vec::new();
        let mut errs = Vec::new();
        for a in &p.args {
            let Some(name) = &a.name else {
                errs.push(
                    Diagnostic::error(Code::Syntax, "preset values must be named")
                        .label(a.value.span, "unnamed value")
                        .help("write `name: value`"),
                );
                continue;
            };
            let value = match literal(&a.value) {
                Some(v) => v,
                None => {
                    errs.push(
                        Diagnostic::error(Code::Syntax, "preset values must be literals")
                            .label(a.value.span, "not a literal")
                            .help("write a number, `true`/`false` or a string"),
                    );
                    continue;
                }
            };
            out.push(ConfigArg {
                name: name.name.clone(),
                value,
                span: Some(a.value.span),
                origin: None,
            });
        }
        if errs.is_empty() { Ok(out) } else { Err(errs) }
    }
}

fn literal(e: &ast::Expr) -> Option<ConfigValue> {
    Some(match &e.kind {
        ExprKind::Int(n) => ConfigValue::Int(*n),
        ExprKind::Float(x) => ConfigValue::Float(*x),
        ExprKind::Bool(b) => ConfigValue::Bool(*b),
        ExprKind::Str(s) => ConfigValue::Str(s.clone()),
        ExprKind::Unary {
            op: UnOp::Neg,
            expr,
        } => match literal(expr)? {
            ConfigValue::Int(n) => ConfigValue::Int(n.checked_neg()?),
            ConfigValue::Float(x) => ConfigValue::Float(-x),
            ConfigValue::Bool(_) | ConfigValue::Str(_) => return None,
        },
        _ => return None,
    })
}

/// What the user asked to compile.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// A preset name, a model definition name, or a path to a `.m2` file.
    pub model: String,
    /// For a file with several presets/models: which one.
    pub select: Option<String>,
    /// A `config.json` (reference or Hugging Face naming) and its text.
    pub config: Option<(String, String)>,
    /// Reads a file for a path-like `model`; `None` when it does not exist.
    pub file_text: Option<String>,
}

/// Finds, configures and elaborates the model a [`ModelSpec`] names. Errors come with the
/// sources they point into.
pub fn compile(spec: &ModelSpec) -> (Sources, Result<Compiled, Vec<Diagnostic>>) {
    let mut prog = match Program::with_library() {
        Ok(p) => p,
        Err(d) => {
            let mut s = Sources::new();
            s.add(LIBRARY_NAME, LIBRARY);
            return (s, Err(d));
        }
    };
    let r = compile_in(&mut prog, spec);
    (prog.sources, r)
}

fn compile_in(prog: &mut Program, spec: &ModelSpec) -> Result<Compiled, Vec<Diagnostic>> {
    let mut warnings = Vec::new();
    // 1. Which model definition, with which preset values.
    let (def_name, mut graph_name, mut args) = if let Some(text) = &spec.file_text {
        let diags = prog.add_file(&spec.model, text);
        if !diags.is_empty() {
            return Err(diags);
        }
        let file = prog.files.len() - 1;
        pick_in_file(prog, file, spec)?
    } else if let Some(p) = prog.preset(&spec.model) {
        let args = prog.preset_args(p)?;
        (p.model.name.clone(), p.name.clone(), args)
    } else if prog.has_model(&spec.model) {
        (spec.model.clone(), spec.model.clone(), Vec::new())
    } else {
        let names: Vec<&str> = prog.presets().map(|p| p.name.as_str()).collect();
        let mut d = Diagnostic::error(
            Code::UnknownName,
            format!("no model, preset or file named `{}`", spec.model),
        )
        .note(format!("presets: {}", names.join(", ")));
        if let Some(n) = near_name(&spec.model, names.iter().copied()) {
            d = d.help(format!("did you mean `{n}`?"));
        }
        return Err(vec![d]);
    };
    // 2. A config.json replaces the preset's values and may choose the family.
    let mut def_name = def_name;
    if let Some((name, text)) = &spec.config {
        let file = prog.sources.add(name.clone(), text.clone());
        let cfg = config::from_json(text, file, name)?;
        warnings.extend(cfg.warnings);
        if spec.file_text.is_none() {
            if !graph_name.is_empty() && prog.preset(&spec.model).is_some() && def_name != cfg.model
            {
                return Err(vec![
                    Diagnostic::error(
                        Code::InvalidConfig,
                        format!(
                            "{name} describes a `{}` model, but `{}` is a `{def_name}`",
                            cfg.model, spec.model
                        ),
                    )
                    .help(format!(
                        "run with `{}` instead of `{}`",
                        cfg.model, spec.model
                    )),
                ]);
            }
            def_name = cfg.model.clone();
            if prog.preset(&spec.model).is_none() {
                graph_name = def_name.clone();
            }
        }
        args = cfg.args;
    }
    let (graph, mut w) = elaborate(prog, &def_name, &graph_name, &args)?;
    warnings.append(&mut w);
    Ok(Compiled { graph, warnings })
}

/// In a user file: the preset or model named by `--model`, else the file's first preset,
/// else its only model.
fn pick_in_file(
    prog: &Program,
    file: usize,
    spec: &ModelSpec,
) -> Result<(String, String, Vec<ConfigArg>), Vec<Diagnostic>> {
    let presets: Vec<&ast::Preset> = prog.files[file]
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Preset(p) => Some(p),
            Item::Def(_) => None,
        })
        .collect();
    let models = prog.models_in(file);
    if let Some(sel) = &spec.select {
        if let Some(p) = prog.preset(sel) {
            return Ok((p.model.name.clone(), p.name.clone(), prog.preset_args(p)?));
        }
        if prog.has_model(sel) {
            return Ok((sel.clone(), sel.clone(), Vec::new()));
        }
        return Err(vec![Diagnostic::error(
            Code::UnknownName,
            format!("no preset or model named `{sel}`"),
        )]);
    }
    if let Some(p) = presets.first() {
        return Ok((p.model.name.clone(), p.name.clone(), prog.preset_args(p)?));
    }
    match models.as_slice() {
        [m] => Ok((m.name.name.clone(), m.name.name.clone(), Vec::new())),
        [] => Err(vec![
            Diagnostic::error(
                Code::UnknownName,
                format!("{} defines no model and no preset", spec.model),
            )
            .help("add `model name(...) { ... }` or a `preset`"),
        ]),
        _ => {
            let names: Vec<&str> = models.iter().map(|m| m.name.name.as_str()).collect();
            Err(vec![
                Diagnostic::error(
                    Code::UnknownName,
                    format!(
                        "{} defines several models; choose one with --model",
                        spec.model
                    ),
                )
                .note(format!("models: {}", names.join(", "))),
            ])
        }
    }
}
