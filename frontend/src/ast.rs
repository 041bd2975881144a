//! The syntax tree of the model DSL. Every node carries the [`Span`] of its source text.
//!
//! ```text
//! # comment to end of line
//! block mamba1(d_model, d_state = 16, d_conv = 4, expand = 2) {
//!   dim B, L
//!   let E = expand * d_model
//!   input u: [B, L, d_model]
//!   state conv_state: [B, E, d_conv - 1]
//!   param in_proj.weight: [2 * E, d_model] = fan_in_uniform(1.0)
//!   let x, z = split(linear(u, in_proj.weight), [E, E])
//!   ...
//!   return out
//! }
//! model mamba_lm(d_model, n_layer, tie_embeddings = true) {
//!   repeat n_layer as backbone.layers { ... }
//!   if !tie_embeddings { param lm_head.weight: [V, d_model] }
//!   return logits
//! }
//! preset "mamba-130m" = mamba_lm(d_model: 768, n_layer: 24)
//! ```
//!
//! Statements start with a keyword, so no separators are needed; a parse error skips to the
//! next statement keyword or closing brace and parsing goes on (`Stmt::Error`, `ExprKind::Error`
//! mark what was skipped).

pub use ir::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A dotted name: `in_proj.weight`, `backbone.layers`.
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    pub segments: Vec<Ident>,
    pub span: Span,
}

impl Path {
    /// The segments joined with dots.
    pub fn joined(&self) -> String {
        let names: Vec<&str> = self.segments.iter().map(|s| s.name.as_str()).collect();
        names.join(".")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Def(Def),
    Preset(Preset),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefKind {
    /// A reusable layer, instantiated by a call: `let mixer = mamba1(d_model: D)`.
    Block,
    /// A whole model; the graph is elaborated from a model.
    Model,
}

/// `block NAME(config params) { body }` or `model NAME(...) { ... }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Def {
    pub kind: DefKind,
    pub name: Ident,
    pub params: Vec<ConfigParam>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// A config argument of a definition, with an optional default expression that may refer to
/// earlier arguments (`dt_rank = ceil(d_model / 16)`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigParam {
    pub name: Ident,
    pub default: Option<Expr>,
    pub span: Span,
}

/// `preset "mamba-130m" = mamba_lm(d_model: 768, n_layer: 24)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: String,
    pub name_span: Span,
    pub model: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `let a = e` or `let a, b = e` (destructures a tuple result: split, stateful ops).
    Let {
        names: Vec<Ident>,
        value: Expr,
        span: Span,
    },
    /// `dim B, L`: symbolic dimensions.
    Dim { names: Vec<Ident>, span: Span },
    /// `input ids: [B, L] i32`.
    Input {
        name: Ident,
        ty: TypeExpr,
        span: Span,
    },
    /// `param in_proj.weight: [2 * E, d_model] = normal(0.02)`; the init defaults to zeros.
    Param {
        path: Path,
        ty: TypeExpr,
        init: Option<Expr>,
        span: Span,
    },
    /// `state ssm_state: [B, E, d_state]`: an initial state input; the value the name is bound
    /// to at the end of the definition is the final state.
    State {
        name: Ident,
        ty: TypeExpr,
        span: Span,
    },
    /// `repeat n_layer as backbone.layers { body }`: the layer axis. Parameters inside get the
    /// prefix `backbone.layers.{i}.`.
    Repeat {
        count: Expr,
        scope: Option<Path>,
        body: Vec<Stmt>,
        span: Span,
    },
    /// `if cond { ... } else { ... }` on config values, decided at elaboration.
    If {
        cond: Expr,
        then_body: Vec<Stmt>,
        else_body: Vec<Stmt>,
        span: Span,
    },
    /// `return a, b`.
    Return { values: Vec<Expr>, span: Span },
    /// `require cond else "message"`: a config check, evaluated at elaboration; a false
    /// condition is an invalid-config diagnostic with `message`.
    Require {
        cond: Expr,
        message: String,
        span: Span,
    },
    /// What the parser skipped after a syntax error.
    Error { span: Span },
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::Let { span, .. }
            | Stmt::Dim { span, .. }
            | Stmt::Input { span, .. }
            | Stmt::Param { span, .. }
            | Stmt::State { span, .. }
            | Stmt::Repeat { span, .. }
            | Stmt::If { span, .. }
            | Stmt::Return { span, .. }
            | Stmt::Require { span, .. }
            | Stmt::Error { span } => *span,
        }
    }
}

/// `[B, L, 2 * E] f32`; the dtype defaults to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeExpr {
    pub dims: Vec<Expr>,
    pub dtype: Option<Ident>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Remainder (`%`), for divisibility checks in `require`.
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A name or dotted path: `E`, `in_proj.weight`.
    Path(Path),
    Unary {
        op: UnOp,
        expr: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `f(a, b, axis: -1)`: a builtin op, a block instantiation or an applied block instance.
    Call {
        callee: Path,
        args: Vec<Arg>,
    },
    /// `[E, E]`.
    List(Vec<Expr>),
    /// What the parser skipped after a syntax error.
    Error,
}

/// A call argument, positional or named (`axis: -1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}
