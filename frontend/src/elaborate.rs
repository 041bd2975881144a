//! Elaboration: a model definition plus config values becomes an IR [`Graph`].
//!
//! Config expressions are evaluated to numbers; `repeat` is unrolled with each copy's nodes
//! tagged by layer index; blocks are instantiated (`let mixer = mamba1(...)`, parameter prefix
//! `mixer.`) and applied (`mixer(x)`, inlined); builtins expand to primitive ops (`builtins`).
//! Shapes are checked as nodes are added, by the IR's own inference.
//!
//! Errors do not cascade: a statement that fails binds its names to a poison value, and
//! anything computed from poison is poison without a second diagnostic.

use crate::Program;
use crate::ast::{self, BinOp, Def, DefKind, Expr, ExprKind, Item, Stmt, UnOp};
use crate::diag::{Code, Diagnostic, near_name};
use crate::names::DimNamer;
use ir::{DType, Dim, Graph, Init, InputKind, Op, Span, TensorType, TypeError, Value};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Most iterations of one `repeat`.
pub const MAX_REPEAT: i64 = 100_000;
/// Deepest nesting of block applications (recursion guard).
pub const MAX_BLOCK_DEPTH: usize = 32;
/// Most statements elaborated in total (unrolled), a guard against nested `repeat` blowups.
pub const MAX_STATEMENTS: u64 = 5_000_000;

/// A config value given from outside the DSL (a preset, `config.json`, the command line).
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// A named config value and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigArg {
    pub name: String,
    pub value: ConfigValue,
    /// Where the value was written (a preset in a DSL file), if in a DSL file.
    pub span: Option<Span>,
    /// Where it came from when not in a DSL file (`config.json key "hidden_size"`).
    pub origin: Option<String>,
}

/// A tensor value of the graph being built.
#[derive(Clone, Debug)]
pub(crate) struct T {
    pub v: Value,
    pub ty: TensorType,
}

/// A block definition with its config bound, named by its parameter prefix.
#[derive(Debug)]
pub(crate) struct Instance<'a> {
    pub def: &'a Def,
    pub vars: HashMap<String, Val<'a>>,
    pub ints: Vec<(String, i64)>,
    pub prefix: String,
}

#[derive(Clone, Debug)]
pub(crate) enum Val<'a> {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A symbolic dimension (or a product with one): `B`, `B * L`.
    Dim(Dim),
    Tensor(T),
    Tuple(Vec<Val<'a>>),
    List(Vec<(Val<'a>, Span)>),
    Instance(Rc<Instance<'a>>),
    /// The result of something that already failed with a diagnostic.
    Poison,
}

impl Val<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Bool(_) => "a boolean",
            Val::Str(_) => "a string",
            Val::Dim(_) => "a symbolic dimension",
            Val::Tensor(_) => "a tensor",
            Val::Tuple(_) => "a tuple",
            Val::List(_) => "a list",
            Val::Instance(_) => "a block instance",
            Val::Poison => "an invalid value",
        }
    }
}

/// Marks that a diagnostic was already emitted; `fatal` stops elaboration altogether.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stop {
    pub fatal: bool,
}

pub(crate) type R<T> = Result<T, Stop>;

/// Where names are looked up while elaborating one definition body.
pub(crate) struct Frame<'a> {
    pub vars: HashMap<String, Val<'a>>,
    /// Integer bindings in binding order, for writing dims symbolically in diagnostics.
    pub ints: Vec<(String, i64)>,
    pub dims: HashSet<String>,
    /// Parameter path prefixes, outermost first (`""`, `backbone.layers.3.`).
    pub prefixes: Vec<String>,
    /// Block inputs not yet taken by `input` statements.
    pub args: std::collections::VecDeque<(Val<'a>, Span)>,
    pub is_model: bool,
    /// Declared states: local name, graph name.
    pub states: Vec<(String, String)>,
    pub ret: Option<Vec<(Val<'a>, Option<String>)>>,
}

impl<'a> Frame<'a> {
    fn new(prefix: String, is_model: bool) -> Frame<'a> {
        Frame {
            vars: HashMap::new(),
            ints: Vec::new(),
            dims: HashSet::new(),
            prefixes: vec![prefix],
            args: Default::default(),
            is_model,
            states: Vec::new(),
            ret: None,
        }
    }

    pub fn bind(&mut self, name: &str, v: Val<'a>) {
        if let Val::Int(n) = v {
            self.ints.push((name.to_string(), n));
        }
        self.vars.insert(name.to_string(), v);
    }

    pub fn prefix(&self) -> &str {
        self.prefixes.last().map_or("", String::as_str)
    }

    pub fn namer(&self) -> DimNamer<'_> {
        DimNamer::new(&self.ints)
    }
}

pub(crate) struct Elab<'a> {
    pub prog: &'a Program,
    pub graph: Graph,
    pub diags: Vec<Diagnostic>,
    /// Parameter full name -> tensor.
    pub params: HashMap<String, T>,
    pub layer: Option<u32>,
    depth: usize,
    statements: u64,
    /// Block instances already applied (by prefix).
    applied: HashSet<String>,
    /// Parameters whose declaration failed: uses are quiet poison.
    poisoned_params: HashSet<String>,
    /// Where config values came from, for invalid-config notes.
    config_origin: HashMap<String, String>,
}

/// Elaborates `model` (a model definition's name) with the given config into a graph.
/// Returns the graph and warnings, or every error found.
pub fn elaborate(
    prog: &Program,
    model: &str,
    graph_name: &str,
    args: &[ConfigArg],
) -> Result<(Graph, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut e = Elab {
        prog,
        graph: Graph::new(graph_name),
        diags: Vec::new(),
        params: HashMap::new(),
        layer: None,
        depth: 0,
        statements: 0,
        applied: HashSet::new(),
        poisoned_params: HashSet::new(),
        config_origin: HashMap::new(),
    };
    e.graph.sources = prog.sources.names();
    let _ = e.run_model(model, args);
    if e.diags.iter().any(|d| d.is_error()) {
        return Err(e.diags);
    }
    if let Err(errs) = ir::verify(&e.graph) {
        let d = Diagnostic::error(
            Code::Limit,
            "internal compiler error: the elaborated graph is invalid",
        )
        .note(
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .help("this is a bug in ma2mba; please report it with the model file");
        e.diags.push(d);
        return Err(e.diags);
    }
    Ok((e.graph, e.diags))
}

impl<'a> Elab<'a> {
    pub fn error(&mut self, d: Diagnostic) -> Stop {
        let fatal = d.code == Code::Limit;
        self.diags.push(d);
        Stop { fatal }
    }

    fn find_def(&self, name: &str) -> Option<&'a Def> {
        // Later files (the user's) shadow earlier ones (the library).
        self.prog.files.iter().rev().find_map(|f| {
            f.items.iter().find_map(|i| match i {
                Item::Def(d) if d.name.name == name => Some(d),
                Item::Def(_) | Item::Preset(_) => None,
            })
        })
    }

    fn def_names(&self) -> Vec<&'a str> {
        self.prog
            .files
            .iter()
            .flat_map(|f| f.items.iter())
            .filter_map(|i| match i {
                Item::Def(d) => Some(d.name.name.as_str()),
                Item::Preset(_) => None,
            })
            .collect()
    }

    fn run_model(&mut self, model: &str, args: &[ConfigArg]) -> R<()> {
        let Some(def) = self.find_def(model) else {
            let names = self.def_names();
            let mut d = Diagnostic::error(Code::UnknownName, format!("no model named `{model}`"));
            if let Some(n) = near_name(model, names.iter().copied()) {
                d = d.help(format!("did you mean `{n}`?"));
            }
            return Err(self.error(d));
        };
        if def.kind != DefKind::Model {
            let d = Diagnostic::error(
                Code::BadArgument,
                format!("`{model}` is a block, not a model"),
            )
            .label(def.name.span, "defined here as a block")
            .help("elaborate a `model` definition; blocks are instantiated inside models");
            return Err(self.error(d));
        }
        let mut given = Vec::new();
        for a in args {
            let v = match &a.value {
                ConfigValue::Int(n) => Val::Int(*n),
                ConfigValue::Float(x) => Val::Float(*x),
                ConfigValue::Bool(b) => Val::Bool(*b),
                ConfigValue::Str(s) => Val::Str(s.clone()),
            };
            if let Some(o) = &a.origin {
                self.config_origin.insert(a.name.clone(), o.clone());
            }
            let span = a.span.unwrap_or(def.name.span);
            given.push((Some((a.name.clone(), span)), v, span));
        }
        let (vars, ints) = self.bind_config(def, given, def.name.span)?;
        let mut frame = Frame::new(String::new(), true);
        frame.vars = vars;
        frame.ints = ints;
        self.exec_body(&mut frame, &def.body)?;
        self.finish_states(&frame);
        match frame.ret.take() {
            Some(rets) => {
                for (i, (v, name)) in rets.into_iter().enumerate() {
                    let name = name.unwrap_or_else(|| format!("output{i}"));
                    self.add_outputs(&name, &v);
                }
                Ok(())
            }
            None => {
                let d = Diagnostic::error(Code::Syntax, format!("model `{model}` returns nothing"))
                    .label(def.name.span, "this model has no `return`")
                    .help("end the model with `return logits`");
                Err(self.error(d))
            }
        }
    }

    fn add_outputs(&mut self, name: &str, v: &Val<'a>) {
        match v {
            Val::Tensor(t) => self.graph.add_output(name, t.v),
            Val::Tuple(vs) => {
                for (i, v) in vs.iter().enumerate() {
                    self.add_outputs(&format!("{name}.{i}"), v);
                }
            }
            _ => {}
        }
    }

    /// Graph outputs for the final values of a frame's states.
    fn finish_states(&mut self, frame: &Frame<'a>) {
        for (local, full) in &frame.states {
            if let Some(Val::Tensor(t)) = frame.vars.get(local) {
                self.graph.add_output(full.clone(), t.v);
            }
        }
    }

    /// Binds a definition's config parameters from given values and defaults.
    #[allow(clippy::type_complexity)]
    pub fn bind_config(
        &mut self,
        def: &'a Def,
        given: Vec<(Option<(String, Span)>, Val<'a>, Span)>,
        call_span: Span,
    ) -> R<(HashMap<String, Val<'a>>, Vec<(String, i64)>)> {
        let mut by_name: HashMap<String, (Val<'a>, Span)> = HashMap::new();
        let mut positional = 0usize;
        let mut failed = false;
        for (name, v, span) in given {
            let key = match name {
                Some((n, nspan)) => {
                    if !def.params.iter().any(|p| p.name.name == n) {
                        let names = def.params.iter().map(|p| p.name.name.as_str());
                        let mut d = Diagnostic::error(
                            Code::UnknownAttribute,
                            format!("`{}` has no config parameter `{n}`", def.name.name),
                        )
                        .label(nspan, "unknown parameter")
                        .label(
                            def.name.span,
                            format!("`{}` is defined here", def.name.name),
                        );
                        if let Some(near) = near_name(&n, names) {
                            d = d.help(format!("did you mean `{near}`?"));
                        }
                        self.error(d);
                        failed = true;
                        continue;
                    }
                    n
                }
                None => {
                    let Some(p) = def.params.get(positional) else {
                        let d = Diagnostic::error(
                            Code::Arity,
                            format!(
                                "`{}` takes {} config parameters, got more",
                                def.name.name,
                                def.params.len()
                            ),
                        )
                        .label(span, "extra argument");
                        return Err(self.error(d));
                    };
                    positional += 1;
                    p.name.name.clone()
                }
            };
            if by_name.insert(key.clone(), (v, span)).is_some() {
                let d = Diagnostic::error(
                    Code::Duplicate,
                    format!("config parameter `{key}` is given twice"),
                )
                .label(span, "given again here");
                self.error(d);
                failed = true;
            }
        }
        let mut frame = Frame::new(String::new(), false);
        for p in &def.params {
            let v = match by_name.remove(&p.name.name) {
                Some((v, _)) => v,
                None => match &p.default {
                    Some(e) => self.eval(&mut frame, e, None)?,
                    None => {
                        let d = Diagnostic::error(
                            Code::InvalidConfig,
                            format!("`{}` needs a value for `{}`", def.name.name, p.name.name),
                        )
                        .label(call_span, format!("`{}` is not given", p.name.name))
                        .label(p.name.span, "declared here without a default")
                        .help(format!("pass `{}: <value>`", p.name.name));
                        self.error(d);
                        failed = true;
                        Val::Poison
                    }
                },
            };
            frame.bind(&p.name.name, v);
        }
        if failed {
            return Err(Stop { fatal: false });
        }
        Ok((frame.vars, frame.ints))
    }

    fn count_statement(&mut self, span: Span) -> R<()> {
        self.statements += 1;
        if self.statements > MAX_STATEMENTS {
            let d = Diagnostic::error(
                Code::Limit,
                format!("the model unrolls to more than {MAX_STATEMENTS} statements"),
            )
            .label(span, "limit reached here")
            .help("reduce the repeat counts");
            return Err(self.error(d));
        }
        Ok(())
    }

    pub fn exec_body(&mut self, frame: &mut Frame<'a>, body: &'a [Stmt]) -> R<()> {
        for stmt in body {
            if frame.ret.is_some() {
                let d = Diagnostic::error(Code::Syntax, "statement after `return`")
                    .label(stmt.span(), "never reached")
                    .help("`return` must be the last statement of a definition");
                return Err(self.error(d));
            }
            self.count_statement(stmt.span())?;
            match self.exec(frame, stmt) {
                Ok(()) => {}
                Err(Stop { fatal: true }) => return Err(Stop { fatal: true }),
                Err(Stop { fatal: false }) => {
                    // Poison what the statement would have bound, so uses stay quiet.
                    if let Stmt::Let { names, .. } = stmt {
                        for n in names {
                            frame.vars.insert(n.name.clone(), Val::Poison);
                        }
                    }
                    if let Stmt::Input { name, .. } | Stmt::State { name, .. } = stmt {
                        frame.vars.insert(name.name.clone(), Val::Poison);
                    }
                    if let Stmt::Param { path, .. } = stmt {
                        self.poisoned_params
                            .insert(format!("{}{}", frame.prefix(), path.joined()));
                    }
                    if let Stmt::Return { values, .. } = stmt {
                        frame.ret = Some(values.iter().map(|_| (Val::Poison, None)).collect());
                    }
                }
            }
        }
        Ok(())
    }

    fn exec(&mut self, frame: &mut Frame<'a>, stmt: &'a Stmt) -> R<()> {
        match stmt {
            Stmt::Let { names, value, span } => {
                let hint = (names.len() == 1).then(|| names[0].name.as_str());
                let v = self.eval(frame, value, hint)?;
                if names.len() == 1 {
                    frame.bind(&names[0].name, v);
                    return Ok(());
                }
                let parts: Vec<Val<'a>> = match v {
                    Val::Tuple(vs) => vs,
                    Val::List(vs) => vs.into_iter().map(|(v, _)| v).collect(),
                    Val::Poison => vec![Val::Poison; names.len()],
                    other => {
                        let d = Diagnostic::error(
                            Code::Arity,
                            format!("cannot unpack {} into {} names", other.kind(), names.len()),
                        )
                        .label(value.span, "this is one value")
                        .label(*span, "");
                        return Err(self.error(d));
                    }
                };
                if parts.len() != names.len() {
                    let d = Diagnostic::error(
                        Code::Arity,
                        format!("expected {} values, found {}", names.len(), parts.len()),
                    )
                    .label(value.span, format!("this gives {} values", parts.len()))
                    .label(
                        names[0].span.to(names[names.len() - 1].span),
                        format!("{} names", names.len()),
                    );
                    return Err(self.error(d));
                }
                for (n, v) in names.iter().zip(parts) {
                    frame.bind(&n.name, v);
                }
                Ok(())
            }
            Stmt::Dim { names, .. } => {
                for n in names {
                    frame.dims.insert(n.name.clone());
                }
                Ok(())
            }
            Stmt::Input { name, ty, span } => {
                let ty = self.eval_type(frame, ty)?;
                if frame.is_model {
                    let op = Op::Input {
                        name: name.name.clone(),
                        kind: InputKind::Data,
                        ty,
                    };
                    let t = self.add1(frame, op, &[], *span)?;
                    frame.bind(&name.name, Val::Tensor(t));
                    return Ok(());
                }
                let Some((arg, arg_span)) = frame.args.pop_front() else {
                    let d = Diagnostic::error(
                        Code::Arity,
                        format!("no argument for input `{}`", name.name),
                    )
                    .label(*span, "this input is not given by the call");
                    return Err(self.error(d));
                };
                let t = match arg {
                    Val::Tensor(t) => t,
                    Val::Poison => return Err(Stop { fatal: false }),
                    other => {
                        let d = Diagnostic::error(
                            Code::Type,
                            format!(
                                "input `{}` must be a tensor, found {}",
                                name.name,
                                other.kind()
                            ),
                        )
                        .label(arg_span, "not a tensor")
                        .label(*span, "input declared here");
                        return Err(self.error(d));
                    }
                };
                if t.ty.dtype != ty.dtype {
                    let d = Diagnostic::error(
                        Code::DTypeMismatch,
                        format!(
                            "input `{}` expects {}, found {}",
                            name.name, ty.dtype, t.ty.dtype
                        ),
                    )
                    .label(arg_span, format!("this is {}", t.ty.dtype))
                    .label(*span, format!("declared {}", ty.dtype))
                    .help(format!("cast it: `cast(x, \"{}\")`", ty.dtype));
                    return Err(self.error(d));
                }
                if t.ty.shape != ty.shape {
                    let namer = frame.namer();
                    let d = Diagnostic::error(
                        Code::ShapeMismatch,
                        format!(
                            "shape mismatch: input `{}` expects {}, found {}",
                            name.name,
                            namer.shape(&ty.shape),
                            namer.shape(&t.ty.shape)
                        ),
                    )
                    .label(arg_span, format!("this is {}", namer.shape(&t.ty.shape)))
                    .label(*span, format!("declared {}", namer.shape(&ty.shape)));
                    let d = match namer.note(&[&ty.shape, &t.ty.shape]) {
                        Some(n) => d.note(n),
                        None => d,
                    };
                    return Err(self.error(d));
                }
                frame.bind(&name.name, Val::Tensor(t));
                Ok(())
            }
            Stmt::Param {
                path,
                ty,
                init,
                span,
            } => {
                let ty = self.eval_type(frame, ty)?;
                if !ty.dtype.is_float() {
                    let d = Diagnostic::error(
                        Code::DTypeMismatch,
                        format!(
                            "parameter `{}` must be float, found {}",
                            path.joined(),
                            ty.dtype
                        ),
                    )
                    .label(*span, "");
                    return Err(self.error(d));
                }
                if let Some(d) = ty.shape.iter().find(|d| d.as_known().is_none()) {
                    let d = Diagnostic::error(
                        Code::ShapeMismatch,
                        format!(
                            "parameter `{}` has the symbolic dimension `{d}`",
                            path.joined()
                        ),
                    )
                    .label(*span, "")
                    .note("parameters have fixed sizes; batch and sequence dims belong to inputs");
                    return Err(self.error(d));
                }
                let init = match init {
                    Some(e) => self.eval_init(frame, e)?,
                    None => Init::Zeros,
                };
                let full = format!("{}{}", frame.prefix(), path.joined());
                if self.params.contains_key(&full) {
                    let d = Diagnostic::error(
                        Code::Duplicate,
                        format!("parameter `{full}` is declared twice"),
                    )
                    .label(path.span, "declared again here");
                    return Err(self.error(d));
                }
                let op = Op::Param {
                    name: full.clone(),
                    ty,
                    init,
                };
                let t = self.add1(frame, op, &[], *span)?;
                self.params.insert(full, t);
                Ok(())
            }
            Stmt::State { name, ty, span } => {
                let ty = self.eval_type(frame, ty)?;
                let full = format!("{}{}", frame.prefix(), name.name);
                let op = Op::Input {
                    name: full.clone(),
                    kind: InputKind::State,
                    ty,
                };
                let t = self.add1(frame, op, &[], *span)?;
                frame.bind(&name.name, Val::Tensor(t));
                frame.states.push((name.name.clone(), full));
                Ok(())
            }
            Stmt::Repeat {
                count,
                scope,
                body,
                span: _,
            } => {
                let n = self.eval(frame, count, None)?;
                let n = self.as_int(&n, count.span, "a repeat count")?;
                if !(0..=MAX_REPEAT).contains(&n) {
                    let code = if n < 0 {
                        Code::InvalidConfig
                    } else {
                        Code::Limit
                    };
                    let d = Diagnostic::error(
                        code,
                        format!("repeat count {n} is outside 0..={MAX_REPEAT}"),
                    )
                    .label(count.span, format!("this is {n}"));
                    return Err(self.error(d));
                }
                let outer_layer = self.layer;
                for i in 0..n {
                    if outer_layer.is_none() {
                        self.layer = Some(i as u32);
                    }
                    let prefix = match scope {
                        Some(p) => format!("{}{}.{i}.", frame.prefix(), p.joined()),
                        None => frame.prefix().to_string(),
                    };
                    // Names a copy introduces are its own; rebinding an outer name (the
                    // residual stream) carries over to the next copy.
                    let outer: HashSet<String> = frame.vars.keys().cloned().collect();
                    let n_ints = frame.ints.len();
                    frame.prefixes.push(prefix);
                    let r = self.exec_body(frame, body);
                    frame.prefixes.pop();
                    frame.vars.retain(|k, _| outer.contains(k));
                    frame.ints.truncate(n_ints);
                    if let Err(s) = r {
                        self.layer = outer_layer;
                        return Err(s);
                    }
                    if self.diags.iter().any(|d| d.is_error()) {
                        // The same error would repeat in every copy.
                        break;
                    }
                }
                self.layer = outer_layer;
                Ok(())
            }
            Stmt::If {
                cond,
                then_body,
                else_body,
                ..
            } => {
                let c = self.eval(frame, cond, None)?;
                let c = match c {
                    Val::Bool(b) => b,
                    Val::Poison => return Err(Stop { fatal: false }),
                    other => {
                        let d = Diagnostic::error(
                            Code::Type,
                            format!("`if` needs a boolean, found {}", other.kind()),
                        )
                        .label(cond.span, "not a boolean");
                        return Err(self.error(d));
                    }
                };
                self.exec_body(frame, if c { then_body } else { else_body })
            }
            Stmt::Return { values, .. } => {
                let mut rets = Vec::new();
                for e in values {
                    let v = self.eval(frame, e, None)?;
                    let name = match &e.kind {
                        ExprKind::Path(p) => Some(p.joined()),
                        _ => None,
                    };
                    rets.push((v, name));
                }
                frame.ret = Some(rets);
                Ok(())
            }
            Stmt::Require {
                cond,
                message,
                span: _,
            } => {
                let c = self.eval(frame, cond, None)?;
                match c {
                    Val::Bool(true) => Ok(()),
                    Val::Bool(false) => {
                        // Everything after a failed config check would fail in its wake.
                        let d = self.invalid_config(frame, cond, message);
                        self.error(d);
                        Err(Stop { fatal: true })
                    }
                    Val::Poison => Err(Stop { fatal: false }),
                    other => {
                        let d = Diagnostic::error(
                            Code::Type,
                            format!("`require` needs a boolean, found {}", other.kind()),
                        )
                        .label(cond.span, "not a boolean");
                        Err(self.error(d))
                    }
                }
            }
            Stmt::Error { .. } => Err(Stop { fatal: false }),
        }
    }

    /// The diagnostic of a failed `require`: the message, the values of the names in the
    /// condition and where config values came from.
    fn invalid_config(&self, frame: &Frame<'a>, cond: &Expr, message: &str) -> Diagnostic {
        let mut names = Vec::new();
        collect_names(cond, &mut names);
        let mut facts = Vec::new();
        let mut origins = Vec::new();
        for n in names {
            if let Some(v) = frame.vars.get(&n) {
                let shown = match v {
                    Val::Int(i) => i.to_string(),
                    Val::Float(x) => format!("{x}"),
                    Val::Bool(b) => b.to_string(),
                    _ => continue,
                };
                let item = format!("{n} = {shown}");
                if !facts.contains(&item) {
                    facts.push(item);
                }
                if let Some(o) = self.config_origin.get(&n) {
                    origins.push(format!("`{n}` comes from {o}"));
                }
            }
        }
        let mut d = Diagnostic::error(Code::InvalidConfig, format!("invalid config: {message}"))
            .label(cond.span, "this check fails");
        if !facts.is_empty() {
            d = d.note(format!("with {}", facts.join(", ")));
        }
        for o in origins {
            d = d.note(o);
        }
        d
    }

    pub fn as_int(&mut self, v: &Val<'a>, span: Span, what: &str) -> R<i64> {
        match v {
            Val::Int(n) => Ok(*n),
            Val::Float(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(*x as i64),
            Val::Float(x) => {
                let d = Diagnostic::error(
                    Code::InvalidConfig,
                    format!("{what} must be a whole number, found {x}"),
                )
                .label(span, format!("this is {x}"))
                .help("use ceil(...) or floor(...), or choose config values that divide evenly");
                Err(self.error(d))
            }
            Val::Poison => Err(Stop { fatal: false }),
            other => {
                let d = Diagnostic::error(
                    Code::Type,
                    format!("{what} must be an integer, found {}", other.kind()),
                )
                .label(span, "not an integer");
                Err(self.error(d))
            }
        }
    }

    pub fn as_f64(&mut self, v: &Val<'a>, span: Span, what: &str) -> R<f64> {
        match v {
            Val::Int(n) => Ok(*n as f64),
            Val::Float(x) => Ok(*x),
            Val::Poison => Err(Stop { fatal: false }),
            other => {
                let d = Diagnostic::error(
                    Code::Type,
                    format!("{what} must be a number, found {}", other.kind()),
                )
                .label(span, "not a number");
                Err(self.error(d))
            }
        }
    }

    /// A dimension: a positive integer, a symbolic dim, or a product of those.
    pub fn as_dim(&mut self, v: &Val<'a>, span: Span) -> R<Dim> {
        match v {
            Val::Dim(d) => Ok(d.clone()),
            Val::Poison => Err(Stop { fatal: false }),
            _ => {
                let n = self.as_int(v, span, "a dimension")?;
                if n < 0 {
                    let d = Diagnostic::error(
                        Code::InvalidConfig,
                        format!("dimension {n} is negative"),
                    )
                    .label(span, format!("this is {n}"));
                    return Err(self.error(d));
                }
                Ok(Dim::known(n as u64))
            }
        }
    }

    pub fn eval_type(&mut self, frame: &mut Frame<'a>, ty: &'a ast::TypeExpr) -> R<TensorType> {
        let mut shape = Vec::with_capacity(ty.dims.len());
        for e in &ty.dims {
            let v = self.eval(frame, e, None)?;
            let d = self.as_dim(&v, e.span)?;
            shape.push(d);
        }
        if shape.len() > 8 {
            let d = Diagnostic::error(Code::Limit, "tensors have at most 8 dimensions")
                .label(ty.span, format!("{} dimensions", shape.len()));
            return Err(self.error(d));
        }
        let dtype = match &ty.dtype {
            None => DType::F32,
            Some(id) => match DType::from_name(&id.name) {
                Some(d) => d,
                None => {
                    let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                    let mut d = Diagnostic::error(
                        Code::UnknownName,
                        format!("unknown dtype `{}`", id.name),
                    )
                    .label(id.span, "not a dtype")
                    .note(format!("dtypes: {}", names.join(", ")));
                    if let Some(n) = near_name(&id.name, names.iter().copied()) {
                        d = d.help(format!("did you mean `{n}`?"));
                    }
                    return Err(self.error(d));
                }
            },
        };
        Ok(TensorType::new(dtype, shape))
    }

    fn eval_init(&mut self, frame: &mut Frame<'a>, e: &'a Expr) -> R<Init> {
        let ExprKind::Call { callee, args } = &e.kind else {
            let d = Diagnostic::error(
                Code::Type,
                "a parameter initializer must be a call like `normal(0.02)`",
            )
            .label(e.span, "not an initializer call")
            .note(format!("initializers: {}", Init::NAMES.join(", ")));
            return Err(self.error(d));
        };
        let name = callee.joined();
        let Some(arity) = Init::arity(&name) else {
            let mut d = Diagnostic::error(Code::UnknownOp, format!("unknown initializer `{name}`"))
                .label(callee.span, "not an initializer")
                .note(format!("initializers: {}", Init::NAMES.join(", ")));
            if let Some(n) = near_name(&name, Init::NAMES.iter().copied()) {
                d = d.help(format!("did you mean `{n}`?"));
            }
            return Err(self.error(d));
        };
        if args.len() != arity {
            let d = Diagnostic::error(
                Code::Arity,
                format!("`{name}` takes {arity} argument(s), got {}", args.len()),
            )
            .label(e.span, format!("{} given", args.len()));
            return Err(self.error(d));
        }
        let mut nums = Vec::new();
        for a in args {
            if let Some(n) = &a.name {
                let d = Diagnostic::error(
                    Code::UnknownAttribute,
                    format!("`{name}` takes no named arguments"),
                )
                .label(n.span, "named argument");
                return Err(self.error(d));
            }
            let v = self.eval(frame, &a.value, None)?;
            nums.push(self.as_f64(&v, a.value.span, "an initializer argument")?);
        }
        Init::from_parts(&name, &nums).ok_or_else(|| {
            self.error(
                Diagnostic::error(Code::BadArgument, format!("bad arguments for `{name}`"))
                    .label(e.span, ""),
            )
        })
    }

    /// Evaluates an expression. `hint` is the name a `let` binds the value to, which names a
    /// block instance.
    pub fn eval(&mut self, frame: &mut Frame<'a>, e: &'a Expr, hint: Option<&str>) -> R<Val<'a>> {
        match &e.kind {
            ExprKind::Int(n) => Ok(Val::Int(*n)),
            ExprKind::Float(x) => Ok(Val::Float(*x)),
            ExprKind::Bool(b) => Ok(Val::Bool(*b)),
            ExprKind::Str(s) => Ok(Val::Str(s.clone())),
            ExprKind::Error => Err(Stop { fatal: false }),
            ExprKind::Path(p) => self.lookup(frame, p),
            ExprKind::List(items) => {
                let mut vs = Vec::with_capacity(items.len());
                for it in items {
                    vs.push((self.eval(frame, it, None)?, it.span));
                }
                Ok(Val::List(vs))
            }
            ExprKind::Unary { op, expr } => {
                let v = self.eval(frame, expr, None)?;
                match (op, v) {
                    (_, Val::Poison) => Ok(Val::Poison),
                    (UnOp::Neg, Val::Int(n)) => Ok(Val::Int(n.checked_neg().unwrap_or(i64::MAX))),
                    (UnOp::Neg, Val::Float(x)) => Ok(Val::Float(-x)),
                    (UnOp::Neg, Val::Tensor(t)) => {
                        let op = Op::Unary(ir::UnaryOp::Neg);
                        Ok(Val::Tensor(self.add1(
                            frame,
                            op,
                            &[(&t, expr.span)],
                            e.span,
                        )?))
                    }
                    (UnOp::Not, Val::Bool(b)) => Ok(Val::Bool(!b)),
                    (op, other) => {
                        let sym = if *op == UnOp::Neg { "-" } else { "!" };
                        let d = Diagnostic::error(
                            Code::Type,
                            format!("cannot apply `{sym}` to {}", other.kind()),
                        )
                        .label(expr.span, other.kind());
                        Err(self.error(d))
                    }
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.eval(frame, lhs, None)?;
                let b = self.eval(frame, rhs, None)?;
                self.binary(frame, *op, (a, lhs.span), (b, rhs.span), e.span)
            }
            ExprKind::Call { callee, args } => self.call(frame, callee, args, e.span, hint),
        }
    }

    fn lookup(&mut self, frame: &Frame<'a>, p: &'a ast::Path) -> R<Val<'a>> {
        let joined = p.joined();
        if p.segments.len() == 1 {
            if let Some(v) = frame.vars.get(&joined) {
                return Ok(v.clone());
            }
            if frame.dims.contains(&joined) {
                return Ok(Val::Dim(Dim::sym(&joined)));
            }
        }
        for prefix in frame.prefixes.iter().rev() {
            let full = format!("{prefix}{joined}");
            if let Some(t) = self.params.get(&full) {
                return Ok(Val::Tensor(t.clone()));
            }
            if self.poisoned_params.contains(&full) {
                return Ok(Val::Poison);
            }
        }
        // Not found: suggest a near name among locals, dims and visible parameters.
        let mut candidates: Vec<String> = frame.vars.keys().cloned().collect();
        candidates.extend(frame.dims.iter().cloned());
        for prefix in &frame.prefixes {
            for full in self.params.keys() {
                if let Some(rel) = full.strip_prefix(prefix.as_str()) {
                    candidates.push(rel.to_string());
                }
            }
        }
        let mut d = Diagnostic::error(Code::UnknownName, format!("unknown name `{joined}`"))
            .label(p.span, "not defined here");
        if let Some(n) = near_name(&joined, candidates.iter().map(String::as_str)) {
            d = d.help(format!("did you mean `{n}`?"));
        } else if self.find_def(&joined).is_some() || crate::builtins::is_builtin(&joined) {
            d = d.help(format!("`{joined}` is a function; call it with arguments"));
        }
        Err(self.error(d))
    }

    fn binary(
        &mut self,
        frame: &mut Frame<'a>,
        op: BinOp,
        (a, aspan): (Val<'a>, Span),
        (b, bspan): (Val<'a>, Span),
        span: Span,
    ) -> R<Val<'a>> {
        use Val::{Bool, Float, Int};
        let overflow = |this: &mut Self| {
            let d = Diagnostic::error(
                Code::InvalidConfig,
                "integer overflow in a config expression",
            )
            .label(span, "overflows i64");
            Err(this.error(d))
        };
        match (op, a, b) {
            (_, Val::Poison, _) | (_, _, Val::Poison) => Ok(Val::Poison),
            (BinOp::Add, Int(x), Int(y)) => {
                x.checked_add(y).map(Int).map_or_else(|| overflow(self), Ok)
            }
            (BinOp::Sub, Int(x), Int(y)) => {
                x.checked_sub(y).map(Int).map_or_else(|| overflow(self), Ok)
            }
            (BinOp::Mul, Int(x), Int(y)) => {
                x.checked_mul(y).map(Int).map_or_else(|| overflow(self), Ok)
            }
            (BinOp::Rem, Int(x), Int(y)) => {
                if y == 0 {
                    let d = Diagnostic::error(Code::InvalidConfig, "remainder by zero")
                        .label(bspan, "this is 0");
                    return Err(self.error(d));
                }
                Ok(Int(x.rem_euclid(y)))
            }
            (BinOp::Rem, x @ (Int(_) | Float(_)), y @ (Int(_) | Float(_))) => {
                let (x, y) = (num(&x), num(&y));
                if y == 0.0 {
                    let d = Diagnostic::error(Code::InvalidConfig, "remainder by zero")
                        .label(bspan, "this is 0");
                    return Err(self.error(d));
                }
                Ok(Float(x.rem_euclid(y)))
            }
            (BinOp::Mul, Val::Dim(x), Val::Dim(y)) => self.dim_mul(&x, &y, span),
            (BinOp::Mul, Val::Dim(x), Int(n)) | (BinOp::Mul, Int(n), Val::Dim(x)) if n >= 0 => {
                self.dim_mul(&x, &Dim::known(n as u64), span)
            }
            (
                op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div),
                x @ (Int(_) | Float(_)),
                y @ (Int(_) | Float(_)),
            ) => {
                let (x, y) = (num(&x), num(&y));
                Ok(Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    _ => x / y,
                }))
            }
            (
                op @ (BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge),
                x @ (Int(_) | Float(_)),
                y @ (Int(_) | Float(_)),
            ) => {
                let (x, y) = (num(&x), num(&y));
                Ok(Bool(match op {
                    BinOp::Eq => x == y,
                    BinOp::Ne => x != y,
                    BinOp::Lt => x < y,
                    BinOp::Le => x <= y,
                    BinOp::Gt => x > y,
                    _ => x >= y,
                }))
            }
            (BinOp::Eq, Bool(x), Bool(y)) => Ok(Bool(x == y)),
            (BinOp::Ne, Bool(x), Bool(y)) => Ok(Bool(x != y)),
            (BinOp::Eq, Val::Str(x), Val::Str(y)) => Ok(Bool(x == y)),
            (BinOp::Ne, Val::Str(x), Val::Str(y)) => Ok(Bool(x != y)),
            (BinOp::And, Bool(x), Bool(y)) => Ok(Bool(x && y)),
            (BinOp::Or, Bool(x), Bool(y)) => Ok(Bool(x || y)),
            (op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div), x, y)
                if matches!(x, Val::Tensor(_)) || matches!(y, Val::Tensor(_)) =>
            {
                let bop = match op {
                    BinOp::Add => ir::BinaryOp::Add,
                    BinOp::Sub => ir::BinaryOp::Sub,
                    BinOp::Mul => ir::BinaryOp::Mul,
                    _ => ir::BinaryOp::Div,
                };
                crate::builtins::elementwise(self, frame, bop, (&x, aspan), (&y, bspan), span)
                    .map(Val::Tensor)
            }
            (op, x, y) => {
                let d = Diagnostic::error(
                    Code::Type,
                    format!(
                        "cannot apply `{}` to {} and {}",
                        op.symbol(),
                        x.kind(),
                        y.kind()
                    ),
                )
                .label(aspan, x.kind())
                .label(bspan, y.kind());
                Err(self.error(d))
            }
        }
    }

    fn dim_mul(&mut self, x: &Dim, y: &Dim, span: Span) -> R<Val<'a>> {
        match x.mul(y) {
            Some(d) => Ok(Val::Dim(d)),
            None => {
                let d =
                    Diagnostic::error(Code::InvalidConfig, "dimension overflow").label(span, "");
                Err(self.error(d))
            }
        }
    }

    fn call(
        &mut self,
        frame: &mut Frame<'a>,
        callee: &'a ast::Path,
        args: &'a [ast::Arg],
        span: Span,
        hint: Option<&str>,
    ) -> R<Val<'a>> {
        let name = callee.joined();
        // Applying a block instance: `mixer(x)`.
        if callee.segments.len() == 1 {
            match frame.vars.get(&name) {
                Some(Val::Instance(inst)) => {
                    let inst = inst.clone();
                    return self.apply_block(frame, &inst, args, span);
                }
                Some(Val::Poison) => return Ok(Val::Poison),
                Some(other) => {
                    let d = Diagnostic::error(
                        Code::Type,
                        format!("`{name}` is {}, not something to call", other.kind()),
                    )
                    .label(callee.span, "not callable");
                    return Err(self.error(d));
                }
                None => {}
            }
        }
        if crate::builtins::is_builtin(&name) {
            return crate::builtins::call(self, frame, &name, args, span);
        }
        if let Some(def) = self.find_def(&name) {
            if def.kind == DefKind::Model {
                let d = Diagnostic::error(
                    Code::BadArgument,
                    format!("`{name}` is a model; only blocks can be used inside definitions"),
                )
                .label(callee.span, "a model");
                return Err(self.error(d));
            }
            let Some(inst_name) = hint else {
                let d = Diagnostic::error(
                    Code::BadArgument,
                    format!("bind the `{name}` instance to a name"),
                )
                .label(span, "unnamed block instance")
                .help(format!(
                    "write `let mixer = {name}(...)`; the name is the prefix of its parameters"
                ));
                return Err(self.error(d));
            };
            let mut given = Vec::new();
            for a in args {
                let v = self.eval(frame, &a.value, None)?;
                given.push((
                    a.name.as_ref().map(|n| (n.name.clone(), n.span)),
                    v,
                    a.value.span,
                ));
            }
            let (vars, ints) = self.bind_config(def, given, span)?;
            let prefix = format!("{}{inst_name}.", frame.prefix());
            return Ok(Val::Instance(Rc::new(Instance {
                def,
                vars,
                ints,
                prefix,
            })));
        }
        let mut candidates: Vec<&str> = crate::builtins::NAMES.to_vec();
        candidates.extend(self.def_names());
        let mut d = Diagnostic::error(Code::UnknownOp, format!("unknown op or block `{name}`"))
            .label(callee.span, "not a builtin op, block or instance");
        if let Some(n) = near_name(&name, candidates.iter().copied()) {
            d = d.help(format!("did you mean `{n}`?"));
        }
        Err(self.error(d))
    }

    fn apply_block(
        &mut self,
        frame: &mut Frame<'a>,
        inst: &Rc<Instance<'a>>,
        args: &'a [ast::Arg],
        span: Span,
    ) -> R<Val<'a>> {
        if !self.applied.insert(inst.prefix.clone()) {
            let d = Diagnostic::error(
                Code::BadArgument,
                format!(
                    "block instance `{}` is applied twice",
                    inst.prefix.trim_end_matches('.')
                ),
            )
            .label(span, "second application")
            .help("each instance owns its parameters and states; make another instance with `let`");
            return Err(self.error(d));
        }
        if self.depth >= MAX_BLOCK_DEPTH {
            let d = Diagnostic::error(
                Code::Limit,
                format!("blocks nest deeper than {MAX_BLOCK_DEPTH} levels"),
            )
            .label(span, "here")
            .help("does a block instantiate itself?");
            return Err(self.error(d));
        }
        let mut inner = Frame::new(inst.prefix.clone(), false);
        inner.vars = inst.vars.clone();
        inner.ints = inst.ints.clone();
        for a in args {
            if let Some(n) = &a.name {
                let d = Diagnostic::error(Code::UnknownAttribute, "block inputs are positional")
                    .label(n.span, "named input")
                    .help("config values go in the instantiation: `let m = block(name: value)`");
                return Err(self.error(d));
            }
            let v = self.eval(frame, &a.value, None)?;
            inner.args.push_back((v, a.value.span));
        }
        let n_args = inner.args.len();
        self.depth += 1;
        let r = self.exec_body(&mut inner, &inst.def.body);
        self.depth -= 1;
        r?;
        if !inner.args.is_empty() {
            let d = Diagnostic::error(
                Code::Arity,
                format!(
                    "block `{}` takes {} input(s), got {n_args}",
                    inst.def.name.name,
                    n_args - inner.args.len()
                ),
            )
            .label(span, "too many inputs");
            return Err(self.error(d));
        }
        self.finish_states(&inner);
        match inner.ret {
            Some(mut rets) if rets.len() == 1 => Ok(rets.remove(0).0),
            Some(rets) => Ok(Val::Tuple(rets.into_iter().map(|(v, _)| v).collect())),
            None => {
                let d = Diagnostic::error(
                    Code::Syntax,
                    format!("block `{}` returns nothing", inst.def.name.name),
                )
                .label(inst.def.name.span, "no `return` in this block");
                Err(self.error(d))
            }
        }
    }

    /// Adds a node with one result. `operands` pair each tensor with the span of the
    /// argument it came from, so type errors point at the argument.
    pub fn add1(&mut self, frame: &Frame<'a>, op: Op, operands: &[(&T, Span)], span: Span) -> R<T> {
        let mut r = self.add(frame, op, operands, span)?;
        Ok(r.remove(0))
    }

    pub fn add(
        &mut self,
        frame: &Frame<'a>,
        op: Op,
        operands: &[(&T, Span)],
        span: Span,
    ) -> R<Vec<T>> {
        let vals: Vec<Value> = operands.iter().map(|(t, _)| t.v).collect();
        let name = op.name();
        match self.graph.add(op, &vals, span, self.layer) {
            Ok(id) => Ok(self
                .graph
                .types(id)
                .iter()
                .enumerate()
                .map(|(i, ty)| T {
                    v: Value::new(id, i as u16),
                    ty: ty.clone(),
                })
                .collect()),
            Err(ir::BuildError::TooManyOperands { .. }) => {
                let d =
                    Diagnostic::error(Code::Limit, "too many operands for one op").label(span, "");
                Err(self.error(d))
            }
            Err(ir::BuildError::TooManyNodes { limit }) => {
                let d =
                    Diagnostic::error(Code::Limit, format!("the model has more than {limit} ops"))
                        .label(span, "limit reached here");
                Err(self.error(d))
            }
            Err(ir::BuildError::DanglingOperand { .. }) => {
                let d = Diagnostic::error(Code::Limit, "internal compiler error: dangling operand")
                    .label(span, "");
                Err(self.error(d))
            }
            Err(ir::BuildError::Type(te)) => {
                let d = type_error(&frame.namer(), name, &te, operands, span);
                Err(self.error(d))
            }
        }
    }
}

fn num(v: &Val<'_>) -> f64 {
    match v {
        Val::Int(n) => *n as f64,
        Val::Float(x) => *x,
        _ => f64::NAN,
    }
}

fn collect_names(e: &Expr, out: &mut Vec<String>) {
    match &e.kind {
        ExprKind::Path(p) => {
            let n = p.joined();
            if !out.contains(&n) {
                out.push(n);
            }
        }
        ExprKind::Unary { expr, .. } => collect_names(expr, out),
        ExprKind::Binary { lhs, rhs, .. } => {
            collect_names(lhs, out);
            collect_names(rhs, out);
        }
        ExprKind::Call { args, .. } => args.iter().for_each(|a| collect_names(&a.value, out)),
        ExprKind::List(items) => items.iter().for_each(|i| collect_names(i, out)),
        ExprKind::Int(_)
        | ExprKind::Float(_)
        | ExprKind::Bool(_)
        | ExprKind::Str(_)
        | ExprKind::Error => {}
    }
}

/// Turns an IR type error into a diagnostic pointing at the offending arguments.
fn type_error(
    namer: &DimNamer<'_>,
    op: &str,
    te: &TypeError,
    operands: &[(&T, Span)],
    span: Span,
) -> Diagnostic {
    let at = |i: usize| operands.get(i).map_or(span, |o| o.1);
    match te {
        TypeError::ShapeMismatch {
            lhs_operand,
            lhs,
            rhs_operand,
            rhs,
            detail,
            ..
        } => {
            let (l, r) = (namer.shape(lhs), namer.shape(rhs));
            let mut d = Diagnostic::error(
                Code::ShapeMismatch,
                format!("shape mismatch in `{op}`: {l} vs {r}"),
            )
            .label(at(*lhs_operand), format!("this is {l}"))
            .label(at(*rhs_operand), format!("this is {r}"))
            .note(detail.clone());
            if let Some(n) = namer.note(&[lhs, rhs]) {
                d = d.note(n);
            }
            d
        }
        TypeError::DTypeMismatch {
            lhs_operand,
            lhs,
            rhs_operand,
            rhs,
            ..
        } => Diagnostic::error(
            Code::DTypeMismatch,
            format!("dtype mismatch in `{op}`: {lhs} vs {rhs}"),
        )
        .label(at(*lhs_operand), format!("this is {lhs}"))
        .label(at(*rhs_operand), format!("this is {rhs}"))
        .help(format!("cast one side, e.g. `cast(x, \"{lhs}\")`")),
        TypeError::WrongDType {
            operand,
            name,
            expected,
            found,
            ..
        } => Diagnostic::error(
            Code::DTypeMismatch,
            format!("`{op}`: `{name}` must be {expected}, found {found}"),
        )
        .label(at(*operand), format!("this is {found}"))
        .help("cast it with `cast(x, \"f32\")`"),
        TypeError::Rank {
            operand,
            name,
            expected,
            found,
            shape,
            ..
        } => Diagnostic::error(
            Code::ShapeMismatch,
            format!("`{op}`: `{name}` must have rank {expected}, found rank {found}"),
        )
        .label(at(*operand), format!("this is {}", namer.shape(shape))),
        TypeError::Arity { expected, got, .. } => Diagnostic::error(
            Code::Arity,
            format!("`{op}` takes {expected} operand(s), got {got}"),
        )
        .label(span, ""),
        TypeError::Axis { axis, rank, .. } => Diagnostic::error(
            Code::BadArgument,
            format!("`{op}`: axis {axis} is out of range for rank {rank}"),
        )
        .label(span, ""),
        TypeError::Attribute { message, .. } => {
            Diagnostic::error(Code::BadArgument, format!("`{op}`: {}", message)).label(span, "")
        }
    }
}
