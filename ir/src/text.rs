//! The text form of a [`Graph`]: [`print()`] writes it, [`parse()`] reads it back.
//!
//! The form is exact: for every graph `g`, `parse(&print(g))` rebuilds a graph equal to `g` in
//! every op, attribute, operand, result type, span, layer, output, name and source, and
//! `print(&parse(&print(g))?) == print(g)`. The one exception is the payload of a NaN
//! constant or initializer argument: NaN prints as `nan` or `-nan` (its sign is kept).
//!
//! ```text
//! graph "mamba-130m"
//! source 0 "lib/mamba.m2"
//! source 1 "user.m2"
//! %0 = input "ids" : [B, L] i32 @1:120..140
//! %1 = param "backbone.embedding.weight" normal(0.02) : [50280, 768] f32 @0:200..260
//! %2 = gather(%1, %0) : [B, L, 768] f32 @0:300..320
//! %3 = param "backbone.layers.0.mixer.conv1d.weight" normal(0.02) : [768, 4] f32 @0:330..340 layer 0
//! %4 = param "backbone.layers.0.mixer.conv1d.bias" zeros : [768] f32 @0:340..350 layer 0
//! %5 = state "backbone.layers.0.mixer.conv_state" : [B, 768, 3] f32 @0:400..420 layer 0
//! %6 = causal_conv1d(%2, %3, %4, %5) : ([B, L, 768] f32, [B, 768, 3] f32) @0:430..460 layer 0
//! %7 = const 1e-5 f32 : [] f32 @0:470..474
//! %8 = matmul{rhs_t}(%6, %1) : [B, L, 50280] f32 @1:10..20
//! output "logits" = %8
//! output "backbone.layers.0.mixer.conv_state" = %6.1
//! ```
//!
//! # Grammar
//!
//! The form is line based: one statement per line, tokens separated by spaces or tabs, blank
//! lines and `//` comments (to the end of the line) ignored, `\r\n` accepted.
//!
//! ```text
//! file     := "graph" STRING NL  source*  node*  output*
//! source   := "source" INT STRING NL                  (numbered densely 0, 1, 2, ...)
//! node     := "%" INT "=" body ":" types span ("layer" INT)? NL
//!                                                     (numbered densely %0, %1, ...)
//! output   := "output" STRING "=" value NL
//! body     := "input" STRING | "state" STRING         (InputKind::Data / State)
//!           | "param" STRING init
//!           | "const" FLOAT DTYPE
//!           | OPNAME attrs? "(" (value ("," value)*)? ")"
//! init     := INITNAME ("(" (FLOAT ("," FLOAT)*)? ")")?    (`Init::name` / `Init::args`)
//! attrs    := "{" ... "}", exactly one form per op:
//!               cast{DTYPE}   reduce_sum{axes=[0, 2]}   matmul{} matmul{rhs_t}
//!               reshape{shape}   broadcast{shape}   permute{[0, 2, 1]}
//!               slice{axis=2, start=0, len=1536}   concat{axis=1}   ssd_scan{chunk=256}
//!               ssd_scan_grad{chunk=256}   cross_entropy{ignore_index=-100}
//!               cross_entropy_grad{ignore_index=-100}   (ignore_index: a signed i64)
//!             the other ops (unary, binary, gather, causal_conv1d, selective_scan,
//!             causal_conv1d_grad, selective_scan_grad) take none
//! types    := type | "(" (type ("," type)*)? ")"       (one type, or the list of results)
//! type     := shape DTYPE
//! shape    := "[" (dim ("," dim)*)? "]"
//! dim      := factor ("*" factor)*                    (`768`, `B`, `2*L`, `B*L`)
//! factor   := INT | IDENT | STRING                    (a symbol that is not an identifier
//!                                                      is printed as a quoted string)
//! span     := "@" INT ":" INT ".." INT                (file : start .. end, no spaces)
//! value    := "%" INT ("." INT)?                      (`%5` is result 0, `%5.1` result 1)
//! STRING   := '"' ... '"' with escapes \" \\ \n \r \t \0 \u{HEX}
//! FLOAT    := what Rust's `f64::from_str` accepts, and `nan`, `-nan`; printed with `{:?}`
//!             (the shortest text that reads back to the same number: `0.02`, `1e-5`, `inf`)
//! IDENT    := [A-Za-z_][A-Za-z0-9_]*
//! OPNAME   := the op's `Op::name()`; DTYPE := `DType::name()`
//! ```
//!
//! Input and parameter types are their result types (`input "ids" : [B, L] i32`). The parser
//! rebuilds the graph with [`Graph::add`], so every node is re-typed by inference, and the
//! written result types must equal the inferred ones. Operands must refer to earlier nodes.
//! Outputs may name any value (as [`Graph::add_output`] allows); the verifier checks them.
//!
//! Limits that keep parsing linear in the input: a shape has at most [`MAX_RANK`] axes, an
//! axis list at most [`MAX_RANK`] entries, a dim at most [`MAX_FACTORS`] factors, a node at
//! most [`Graph::MAX_OPERANDS`] operands and a graph at most [`Graph::MAX_NODES`] nodes.
//! Graphs past these limits print, but do not parse back.
//!
//! [`print_filtered`] prints a subset of the nodes for reading; its output need not parse.

use crate::graph::{BuildError, Graph, NodeId, Span, Value};
use crate::op::{BinaryOp, Init, InputKind, Op, ReduceOp, UnaryOp};
use crate::types::{DType, Dim, Shape, TensorType};
use std::fmt::{self, Write};

/// The most axes a shape (or axis list) may have in the text form.
pub const MAX_RANK: usize = 256;
/// The most factors one dim may have in the text form (`B*L*...`).
pub const MAX_FACTORS: usize = 256;

/// Why a text does not parse: 1-based line and column (in characters) and a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, col {col}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

/// The text form of `g`. See the module documentation for the grammar.
pub fn print(g: &Graph) -> String {
    print_filtered(g, &|_| true)
}

/// The text form of `g` restricted to the nodes `keep` accepts: the header and sources, the
/// kept node lines, and the outputs whose value's node is kept. Nodes keep their numbers, so
/// the result does not parse back in general (numbers have gaps, operands may be dropped
/// nodes); it is for reading, e.g. one layer of a large model.
pub fn print_filtered(g: &Graph, keep: &dyn Fn(NodeId) -> bool) -> String {
    Printer { g, keep }.to_string()
}

struct Printer<'a> {
    g: &'a Graph,
    keep: &'a dyn Fn(NodeId) -> bool,
}

impl fmt::Display for Printer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.g;
        f.write_str("graph ")?;
        write_string(f, &g.name)?;
        f.write_char('\n')?;
        for (i, s) in g.sources.iter().enumerate() {
            write!(f, "source {i} ")?;
            write_string(f, s)?;
            f.write_char('\n')?;
        }
        for n in g.nodes() {
            if (self.keep)(n) {
                write_node(f, g, n)?;
                f.write_char('\n')?;
            }
        }
        for (name, v) in g.outputs() {
            if (self.keep)(v.node) {
                f.write_str("output ")?;
                write_string(f, name)?;
                writeln!(f, " = {v}")?;
            }
        }
        Ok(())
    }
}

/// One node line without the newline: `%2 = gather(%1, %0) : [B, L, 768] f32 @0:300..320`.
fn write_node(f: &mut dyn Write, g: &Graph, n: NodeId) -> fmt::Result {
    write!(f, "{n} = ")?;
    write_head(f, g.op(n))?;
    if !is_leaf(g.op(n)) {
        f.write_char('(')?;
        for (i, v) in g.operands(n).iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}")?;
        }
        f.write_char(')')?;
    }
    f.write_str(" : ")?;
    write_types(f, g.types(n))?;
    let s = g.span(n);
    write!(f, " @{}:{}..{}", s.file, s.start, s.end)?;
    if let Some(l) = g.layer(n) {
        write!(f, " layer {l}")?;
    }
    Ok(())
}

fn is_leaf(op: &Op) -> bool {
    matches!(op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
}

/// The op name with its attributes (`matmul{rhs_t}`, `param "w" normal(0.02)`), no operands.
fn write_head(f: &mut dyn Write, op: &Op) -> fmt::Result {
    f.write_str(op.name())?;
    match op {
        Op::Input { name, .. } => {
            f.write_char(' ')?;
            write_string(f, name)
        }
        Op::Param { name, init, .. } => {
            f.write_char(' ')?;
            write_string(f, name)?;
            write!(f, " {}", init.name())?;
            let args = init.args();
            if !args.is_empty() {
                f.write_char('(')?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_f64(f, *a)?;
                }
                f.write_char(')')?;
            }
            Ok(())
        }
        Op::Const { value, dtype } => {
            f.write_char(' ')?;
            write_f64(f, *value)?;
            write!(f, " {dtype}")
        }
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Gather
        | Op::CausalConv1d
        | Op::SelectiveScan
        | Op::CausalConv1dGrad
        | Op::SelectiveScanGrad => Ok(()),
        Op::Cast { to } => write!(f, "{{{to}}}"),
        Op::Reduce { axes, .. } => {
            f.write_str("{axes=")?;
            write_usizes(f, axes)?;
            f.write_char('}')
        }
        Op::MatMul { rhs_t } => f.write_str(if *rhs_t { "{rhs_t}" } else { "{}" }),
        Op::Reshape { shape } | Op::Broadcast { shape } => {
            f.write_char('{')?;
            write_shape(f, shape)?;
            f.write_char('}')
        }
        Op::Permute { perm } => {
            f.write_char('{')?;
            write_usizes(f, perm)?;
            f.write_char('}')
        }
        Op::Slice { axis, start, len } => write!(f, "{{axis={axis}, start={start}, len={len}}}"),
        Op::Concat { axis } => write!(f, "{{axis={axis}}}"),
        Op::SsdScan { chunk } | Op::SsdScanGrad { chunk } => write!(f, "{{chunk={chunk}}}"),
        Op::CrossEntropy { ignore_index } | Op::CrossEntropyGrad { ignore_index } => {
            write!(f, "{{ignore_index={ignore_index}}}")
        }
    }
}

/// `%7 matmul{rhs_t}`-style head of a node, for the DOT labels.
pub(crate) fn node_head(g: &Graph, n: NodeId) -> String {
    let mut s = format!("{n} ");
    // Writing into a String cannot fail.
    let _ = write_head(&mut s, g.op(n));
    s
}

/// Result types as the text form writes them: `[B, L] f32` or `([..] f32, [..] f32)`.
pub(crate) fn types_to_string(tys: &[TensorType]) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = write_types(&mut s, tys);
    s
}

fn write_types(f: &mut dyn Write, tys: &[TensorType]) -> fmt::Result {
    if let [t] = tys {
        return write_type(f, t);
    }
    f.write_char('(')?;
    for (i, t) in tys.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_type(f, t)?;
    }
    f.write_char(')')
}

fn write_type(f: &mut dyn Write, t: &TensorType) -> fmt::Result {
    write_shape(f, &t.shape)?;
    write!(f, " {}", t.dtype)
}

fn write_shape(f: &mut dyn Write, shape: &[Dim]) -> fmt::Result {
    f.write_char('[')?;
    for (i, d) in shape.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_dim(f, d)?;
    }
    f.write_char(']')
}

/// Like `Dim`'s `Display`, but quotes symbols that are not identifiers so they read back.
fn write_dim(f: &mut dyn Write, d: &Dim) -> fmt::Result {
    if d.syms().iter().all(|s| is_ident(s)) {
        return write!(f, "{d}");
    }
    let mut first = true;
    if d.syms().is_empty() || d.coeff() != 1 {
        write!(f, "{}", d.coeff())?;
        first = false;
    }
    for s in d.syms() {
        if !first {
            f.write_char('*')?;
        }
        first = false;
        if is_ident(s) {
            f.write_str(s)?;
        } else {
            write_string(f, s)?;
        }
    }
    Ok(())
}

fn write_usizes(f: &mut dyn Write, xs: &[usize]) -> fmt::Result {
    f.write_char('[')?;
    for (i, x) in xs.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{x}")?;
    }
    f.write_char(']')
}

/// The shortest text that reads back to the same number; NaN as `nan` / `-nan`.
fn write_f64(f: &mut dyn Write, x: f64) -> fmt::Result {
    if x.is_nan() {
        f.write_str(if x.is_sign_negative() { "-nan" } else { "nan" })
    } else {
        write!(f, "{x:?}")
    }
}

/// A quoted string with `\"`, `\\`, `\n`, `\r`, `\t`, `\0` and `\u{..}` (other controls).
pub(crate) fn write_string(f: &mut dyn Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            '\0' => f.write_str("\\0")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Reads the text form back into a graph. Never panics; see the module documentation for the
/// grammar and the limits.
///
/// ```
/// let text = "graph \"g\"\n\
///             %0 = input \"x\" : [B, 4] f32 @0:0..3\n\
///             %1 = exp(%0) : [B, 4] f32 @0:4..9 layer 0\n\
///             output \"y\" = %1\n";
/// let g = ir::parse(text)?;
/// assert_eq!(ir::print(&g), text);
/// let err = ir::parse("graph \"g\"\n%0 = exp(%0) : [4] f32 @0:0..0").unwrap_err();
/// assert_eq!(err.to_string(), "line 2, col 10: operand 0 refers to %0, which does not exist");
/// # Ok::<(), ir::ParseError>(())
/// ```
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    Parser { src, pos: 0 }.file()
}

/// A cursor over the text; `pos` is a byte offset, always on a char boundary.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

/// Which statements may still come.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Phase {
    Sources,
    Nodes,
    Outputs,
}

/// The leaf ops take their type from the result type, so they are finished after it.
enum Body {
    Input(String, InputKind),
    Param(String, Init),
    Op(Op, Vec<(Value, usize)>),
}

type PResult<T> = Result<T, ParseError>;

impl<'a> Parser<'a> {
    // --- cursor ---

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    /// Skips spaces, tabs, `\r` and a `//` comment, never the newline.
    fn ws(&mut self) {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\r') => self.pos += 1,
                Some('/') if self.rest().starts_with("//") => {
                    let rest = self.rest();
                    self.pos += rest.find('\n').unwrap_or(rest.len());
                }
                _ => return,
            }
        }
    }

    /// Skips whitespace, comments and blank lines.
    fn blank_lines(&mut self) {
        loop {
            self.ws();
            if !self.eat('\n') {
                return;
            }
        }
    }

    fn error_at(&self, pos: usize, message: impl Into<String>) -> ParseError {
        let before = self.src.get(..pos).unwrap_or(self.src);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        ParseError {
            line: before.matches('\n').count() + 1,
            col: before.get(line_start..).unwrap_or("").chars().count() + 1,
            message: message.into(),
        }
    }

    /// A description of what is at the cursor, for "expected X, found Y".
    fn found(&self) -> String {
        match self.peek() {
            None => "end of input".into(),
            Some('\n') => "end of line".into(),
            Some(_) => {
                let end = self
                    .rest()
                    .char_indices()
                    .find(|&(i, c)| i > 0 && !(c.is_alphanumeric() || c == '_'))
                    .map_or(self.rest().len(), |(i, _)| i);
                let tok: String = self
                    .rest()
                    .get(..end)
                    .unwrap_or("")
                    .chars()
                    .take(24)
                    .collect();
                format!("`{tok}`")
            }
        }
    }

    fn expected(&self, what: &str) -> ParseError {
        self.error_at(self.pos, format!("expected {what}, found {}", self.found()))
    }

    fn expect(&mut self, c: char) -> PResult<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{c}`")))
        }
    }

    fn expect_str(&mut self, s: &str) -> PResult<()> {
        if self.eat_str(s) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{s}`")))
        }
    }

    fn eol(&mut self) -> PResult<()> {
        self.ws();
        if self.peek().is_none() || self.eat('\n') {
            Ok(())
        } else {
            Err(self.expected("end of line"))
        }
    }

    // --- tokens ---

    fn ident(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let end = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        if end == 0 {
            return None;
        }
        self.pos += end;
        rest.get(..end)
    }

    fn expect_ident(&mut self, what: &str) -> PResult<&'a str> {
        match self.ident() {
            Some(s) => Ok(s),
            None => Err(self.expected(what)),
        }
    }

    fn keyword(&mut self, kw: &str) -> PResult<()> {
        let pos = self.pos;
        match self.ident() {
            Some(s) if s == kw => Ok(()),
            _ => {
                self.pos = pos;
                Err(self.expected(&format!("`{kw}`")))
            }
        }
    }

    /// An unsigned decimal integer that fits `T`.
    fn uint<T: TryFrom<u64>>(&mut self, what: &str) -> PResult<T> {
        let start = self.pos;
        let rest = self.rest();
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(self.expected(what));
        }
        self.pos += end;
        rest.get(..end)
            .and_then(|s| s.parse::<u64>().ok())
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| self.error_at(start, format!("{what} is out of range")))
    }

    /// A decimal `i64` with an optional `-` (no `+`, no space after the sign).
    fn int(&mut self, what: &str) -> PResult<i64> {
        let start = self.pos;
        let neg = usize::from(self.rest().starts_with('-'));
        let digits = self.rest().get(neg..).unwrap_or("");
        let end = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        if end == 0 {
            self.pos += neg;
            return Err(self.expected(what));
        }
        self.pos += neg + end;
        self.src
            .get(start..self.pos)
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| self.error_at(start, format!("{what} is out of range")))
    }

    fn float(&mut self) -> PResult<f64> {
        let start = self.pos;
        let rest = self.rest();
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-')))
            .unwrap_or(rest.len());
        let tok = rest.get(..end).unwrap_or("");
        let value = match tok {
            "nan" => Some(f64::NAN),
            "-nan" => Some(-f64::NAN),
            _ => tok.parse::<f64>().ok(),
        };
        match value {
            Some(v) if end > 0 => {
                self.pos += end;
                Ok(v)
            }
            _ => Err(self.error_at(start, format!("expected a number, found {}", self.found()))),
        }
    }

    fn string(&mut self) -> PResult<String> {
        if !self.eat('"') {
            return Err(self.expected("a string"));
        }
        let start = self.pos - 1;
        let mut out = String::new();
        loop {
            let esc = self.pos;
            match self.bump() {
                None | Some('\n') => return Err(self.error_at(start, "unterminated string")),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('0') => out.push('\0'),
                    Some('u') => {
                        self.expect('{')?;
                        let rest = self.rest();
                        let end = rest
                            .find(|c: char| !c.is_ascii_hexdigit())
                            .unwrap_or(rest.len());
                        let c = rest
                            .get(..end)
                            .filter(|h| (1..=6).contains(&h.len()))
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .and_then(char::from_u32);
                        self.pos += end;
                        match c {
                            Some(c) if self.eat('}') => out.push(c),
                            _ => return Err(self.error_at(esc, "invalid `\\u{..}` escape")),
                        }
                    }
                    _ => return Err(self.error_at(esc, "unknown escape in string")),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn dtype(&mut self) -> PResult<DType> {
        let pos = self.pos;
        let name = self.expect_ident("a dtype")?;
        DType::from_name(name).ok_or_else(|| self.error_at(pos, format!("unknown dtype `{name}`")))
    }

    /// `[a, b, c]` of items read by `item`, at most [`MAX_RANK`] of them.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> PResult<T>) -> PResult<Vec<T>> {
        self.expect('[')?;
        let mut out = Vec::new();
        self.ws();
        if self.eat(']') {
            return Ok(out);
        }
        loop {
            if out.len() == MAX_RANK {
                return Err(self.error_at(self.pos, format!("more than {MAX_RANK} entries")));
            }
            self.ws();
            out.push(item(self)?);
            self.ws();
            if self.eat(']') {
                return Ok(out);
            }
            if !self.eat(',') {
                return Err(self.expected("`,` or `]`"));
            }
        }
    }

    fn usizes(&mut self) -> PResult<Vec<usize>> {
        self.list(|p| p.uint::<usize>("an axis"))
    }

    fn dim(&mut self) -> PResult<Dim> {
        let start = self.pos;
        let mut factors = Vec::new();
        loop {
            if factors.len() == MAX_FACTORS {
                return Err(self.error_at(self.pos, format!("more than {MAX_FACTORS} factors")));
            }
            let f = match self.peek() {
                Some(c) if c.is_ascii_digit() => Dim::known(self.uint::<u64>("a size")?),
                Some('"') => Dim::sym(&self.string()?),
                _ => match self.ident() {
                    Some(s) => Dim::sym(s),
                    None => return Err(self.expected("a dimension")),
                },
            };
            factors.push(f);
            self.ws();
            if !self.eat('*') {
                break;
            }
            self.ws();
        }
        product(&factors).ok_or_else(|| self.error_at(start, "dimension overflows u64"))
    }

    fn shape(&mut self) -> PResult<Shape> {
        self.list(|p| p.dim())
    }

    fn tensor_type(&mut self) -> PResult<TensorType> {
        let shape = self.shape()?;
        self.ws();
        let dtype = self.dtype()?;
        Ok(TensorType::new(dtype, shape))
    }

    fn types(&mut self) -> PResult<Vec<TensorType>> {
        if !self.eat('(') {
            return Ok(vec![self.tensor_type()?]);
        }
        let mut out = Vec::new();
        self.ws();
        if self.eat(')') {
            return Ok(out);
        }
        loop {
            if out.len() == MAX_RANK {
                return Err(self.error_at(self.pos, "too many result types"));
            }
            self.ws();
            out.push(self.tensor_type()?);
            self.ws();
            if self.eat(')') {
                return Ok(out);
            }
            if !self.eat(',') {
                return Err(self.expected("`,` or `)`"));
            }
        }
    }

    fn value(&mut self) -> PResult<Value> {
        self.expect('%')?;
        let node = self.uint::<u32>("a node number")?;
        let result = if self.eat('.') {
            self.uint::<u16>("a result index")?
        } else {
            0
        };
        Ok(Value::new(NodeId::from_index(node as usize), result))
    }

    // --- statements ---

    fn file(mut self) -> PResult<Graph> {
        self.blank_lines();
        self.keyword("graph")?;
        self.ws();
        let mut g = Graph::new(self.string()?);
        self.eol()?;
        let mut phase = Phase::Sources;
        loop {
            self.blank_lines();
            let pos = self.pos;
            if self.peek().is_none() {
                return Ok(g);
            }
            if self.peek() == Some('%') {
                if phase > Phase::Nodes {
                    return Err(self.error_at(pos, "nodes must come before the outputs"));
                }
                phase = Phase::Nodes;
                self.node(&mut g)?;
                continue;
            }
            match self.ident() {
                Some("source") => {
                    if phase > Phase::Sources {
                        return Err(self.error_at(pos, "sources must come before the nodes"));
                    }
                    self.ws();
                    let num_pos = self.pos;
                    let i = self.uint::<usize>("a source number")?;
                    if i != g.sources.len() {
                        return Err(self.error_at(
                            num_pos,
                            format!(
                                "expected source {}: sources are numbered from 0",
                                g.sources.len()
                            ),
                        ));
                    }
                    if i > usize::from(u16::MAX) {
                        return Err(
                            self.error_at(num_pos, "too many sources (spans index them with u16)")
                        );
                    }
                    self.ws();
                    let s = self.string()?;
                    g.sources.push(s);
                    self.eol()?;
                }
                Some("output") => {
                    phase = Phase::Outputs;
                    self.ws();
                    let name = self.string()?;
                    self.ws();
                    self.expect('=')?;
                    self.ws();
                    let v = self.value()?;
                    g.add_output(name, v);
                    self.eol()?;
                }
                _ => {
                    self.pos = pos;
                    return Err(self.expected("`source`, `%N = ...` or `output`"));
                }
            }
        }
    }

    fn node(&mut self, g: &mut Graph) -> PResult<()> {
        self.expect('%')?;
        let num_pos = self.pos;
        let n = self.uint::<usize>("a node number")?;
        if n != g.len() {
            return Err(self.error_at(
                num_pos,
                format!("expected %{}: nodes are numbered densely from %0", g.len()),
            ));
        }
        self.ws();
        self.expect('=')?;
        self.ws();
        let op_pos = self.pos;
        let body = self.body()?;
        self.ws();
        self.expect(':')?;
        self.ws();
        let types_pos = self.pos;
        let types = self.types()?;
        self.ws();
        let span = self.span()?;
        self.ws();
        let mut layer = None;
        let layer_pos = self.pos;
        if self.ident().is_some() {
            self.pos = layer_pos;
            self.keyword("layer")?;
            self.ws();
            layer = Some(self.uint::<u32>("a layer number")?);
        }
        self.eol()?;

        let (op, operands) = match (body, types.as_slice()) {
            (Body::Op(op, operands), _) => (op, operands),
            (Body::Input(name, kind), [ty]) => {
                let ty = ty.clone();
                (Op::Input { name, kind, ty }, Vec::new())
            }
            (Body::Param(name, init), [ty]) => {
                let ty = ty.clone();
                (Op::Param { name, ty, init }, Vec::new())
            }
            (Body::Input(..) | Body::Param(..), _) => {
                return Err(self.error_at(
                    types_pos,
                    "`input`, `state` and `param` have one result type",
                ));
            }
        };
        let values: Vec<Value> = operands.iter().map(|(v, _)| *v).collect();
        let id = g.add(op, &values, span, layer).map_err(|e| {
            let pos = match &e {
                BuildError::DanglingOperand { slot, .. } => {
                    operands.get(*slot).map_or(op_pos, |(_, p)| *p)
                }
                BuildError::Type(_) | BuildError::TooManyNodes { .. } => op_pos,
                BuildError::TooManyOperands { .. } => op_pos,
            };
            self.error_at(pos, e.to_string())
        })?;
        if g.types(id) != types.as_slice() {
            return Err(self.error_at(
                types_pos,
                format!(
                    "result types {} differ from the inferred {}",
                    types_to_string(&types),
                    types_to_string(g.types(id))
                ),
            ));
        }
        Ok(())
    }

    fn span(&mut self) -> PResult<Span> {
        self.expect('@')?;
        let file = self.uint::<u16>("a source number")?;
        self.expect(':')?;
        let start = self.uint::<u32>("a byte offset")?;
        self.expect_str("..")?;
        let end = self.uint::<u32>("a byte offset")?;
        Ok(Span::new(file, start, end))
    }

    fn body(&mut self) -> PResult<Body> {
        let name_pos = self.pos;
        let name = self.expect_ident("an op name")?;
        let op = match name {
            "input" | "state" => {
                self.ws();
                let kind = if name == "input" {
                    InputKind::Data
                } else {
                    InputKind::State
                };
                return Ok(Body::Input(self.string()?, kind));
            }
            "param" => {
                self.ws();
                let pname = self.string()?;
                self.ws();
                return Ok(Body::Param(pname, self.init()?));
            }
            "const" => {
                self.ws();
                let value = self.float()?;
                self.ws();
                let dtype = self.dtype()?;
                return Ok(Body::Op(Op::Const { value, dtype }, Vec::new()));
            }
            "cast" => {
                self.expect('{')?;
                self.ws();
                let to = self.dtype()?;
                self.ws();
                self.expect('}')?;
                Op::Cast { to }
            }
            "reduce_sum" | "reduce_mean" | "reduce_max" => {
                let op = match name {
                    "reduce_sum" => ReduceOp::Sum,
                    "reduce_mean" => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                };
                self.expect('{')?;
                self.attr_key("axes")?;
                let axes = self.usizes()?;
                self.ws();
                self.expect('}')?;
                Op::Reduce { op, axes }
            }
            "matmul" => {
                self.expect('{')?;
                self.ws();
                let rhs_t = if self.eat('}') {
                    false
                } else {
                    self.keyword("rhs_t")?;
                    self.ws();
                    self.expect('}')?;
                    true
                };
                Op::MatMul { rhs_t }
            }
            "reshape" | "broadcast" => {
                self.expect('{')?;
                self.ws();
                let shape = self.shape()?;
                self.ws();
                self.expect('}')?;
                if name == "reshape" {
                    Op::Reshape { shape }
                } else {
                    Op::Broadcast { shape }
                }
            }
            "permute" => {
                self.expect('{')?;
                self.ws();
                let perm = self.usizes()?;
                self.ws();
                self.expect('}')?;
                Op::Permute { perm }
            }
            "slice" => {
                self.expect('{')?;
                self.attr_key("axis")?;
                let axis = self.uint::<usize>("an axis")?;
                self.attr_sep()?;
                self.attr_key("start")?;
                let start = self.uint::<u64>("a start index")?;
                self.attr_sep()?;
                self.attr_key("len")?;
                let len = self.uint::<u64>("a length")?;
                self.ws();
                self.expect('}')?;
                Op::Slice { axis, start, len }
            }
            "concat" => {
                self.expect('{')?;
                self.attr_key("axis")?;
                let axis = self.uint::<usize>("an axis")?;
                self.ws();
                self.expect('}')?;
                Op::Concat { axis }
            }
            "ssd_scan" | "ssd_scan_grad" => {
                self.expect('{')?;
                self.attr_key("chunk")?;
                let chunk = self.uint::<u64>("a chunk size")?;
                self.ws();
                self.expect('}')?;
                if name == "ssd_scan" {
                    Op::SsdScan { chunk }
                } else {
                    Op::SsdScanGrad { chunk }
                }
            }
            "cross_entropy" | "cross_entropy_grad" => {
                self.expect('{')?;
                self.attr_key("ignore_index")?;
                let ignore_index = self.int("an ignore index")?;
                self.ws();
                self.expect('}')?;
                if name == "cross_entropy" {
                    Op::CrossEntropy { ignore_index }
                } else {
                    Op::CrossEntropyGrad { ignore_index }
                }
            }
            "gather" => Op::Gather,
            "causal_conv1d" => Op::CausalConv1d,
            "selective_scan" => Op::SelectiveScan,
            "causal_conv1d_grad" => Op::CausalConv1dGrad,
            "selective_scan_grad" => Op::SelectiveScanGrad,
            _ => {
                if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == name) {
                    Op::Unary(u)
                } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == name) {
                    Op::Binary(b)
                } else {
                    return Err(self.error_at(name_pos, format!("unknown op `{name}`")));
                }
            }
        };
        if self.peek() == Some('{') {
            return Err(self.error_at(self.pos, format!("`{name}` takes no attributes")));
        }
        self.ws();
        let operands = self.operands()?;
        Ok(Body::Op(op, operands))
    }

    /// `key=` inside attribute braces, with optional spaces around.
    fn attr_key(&mut self, key: &str) -> PResult<()> {
        self.ws();
        self.keyword(key)?;
        self.ws();
        self.expect('=')?;
        self.ws();
        Ok(())
    }

    fn attr_sep(&mut self) -> PResult<()> {
        self.ws();
        self.expect(',')
    }

    /// `(v, v, ...)` with the position of each operand.
    fn operands(&mut self) -> PResult<Vec<(Value, usize)>> {
        self.expect('(')?;
        let mut out = Vec::new();
        self.ws();
        if self.eat(')') {
            return Ok(out);
        }
        loop {
            if out.len() == Graph::MAX_OPERANDS {
                return Err(self.error_at(
                    self.pos,
                    format!("more than {} operands", Graph::MAX_OPERANDS),
                ));
            }
            self.ws();
            let pos = self.pos;
            out.push((self.value()?, pos));
            self.ws();
            if self.eat(')') {
                return Ok(out);
            }
            if !self.eat(',') {
                return Err(self.expected("`,` or `)`"));
            }
        }
    }

    fn init(&mut self) -> PResult<Init> {
        let pos = self.pos;
        let name = self.expect_ident("an initializer")?;
        let mut args = Vec::new();
        if self.eat('(') {
            self.ws();
            if !self.eat(')') {
                loop {
                    if args.len() == 3 {
                        return Err(self.error_at(self.pos, "too many initializer arguments"));
                    }
                    self.ws();
                    args.push(self.float()?);
                    self.ws();
                    if self.eat(')') {
                        break;
                    }
                    if !self.eat(',') {
                        return Err(self.expected("`,` or `)`"));
                    }
                }
            }
        }
        Init::from_parts(name, &args).ok_or_else(|| match Init::arity(name) {
            None => self.error_at(pos, format!("unknown initializer `{name}`")),
            Some(n) => self.error_at(
                pos,
                format!("`{name}` takes {n} argument(s), got {}", args.len()),
            ),
        })
    }
}

/// The product of `factors`, multiplied as a balanced tree so long products stay
/// `O(n log n)`; `None` on overflow.
fn product(factors: &[Dim]) -> Option<Dim> {
    match factors {
        [] => Some(Dim::known(1)),
        [d] => Some(d.clone()),
        _ => {
            let (a, b) = factors.split_at(factors.len() / 2);
            product(a)?.mul(&product(b)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_round_trip(s: &str) -> String {
        let mut q = String::new();
        write_string(&mut q, s).unwrap();
        let mut p = Parser { src: &q, pos: 0 };
        assert_eq!(p.string().unwrap(), s);
        assert_eq!(p.pos, q.len());
        q
    }

    #[test]
    fn strings() {
        assert_eq!(string_round_trip("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(
            string_round_trip("\n\r\t\0\u{7f}é"),
            "\"\\n\\r\\t\\0\\u{7f}é\""
        );
        assert_eq!(string_round_trip(""), "\"\"");
        let mut p = Parser {
            src: "\"\\u{110000}\"",
            pos: 0,
        };
        assert!(p.string().unwrap_err().message.contains("\\u{..}"));
    }

    #[test]
    fn floats() {
        for (x, s) in [
            (1e-5, "1e-5"),
            (0.02, "0.02"),
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (-f64::NAN, "-nan"),
            (f64::MAX, "1.7976931348623157e308"),
        ] {
            let mut out = String::new();
            write_f64(&mut out, x).unwrap();
            assert_eq!(out, s);
            let y = Parser { src: s, pos: 0 }.float().unwrap();
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
            assert_eq!(x.is_sign_negative(), y.is_sign_negative());
        }
    }

    #[test]
    fn signed_ints() {
        for (text, v) in [
            ("-100", -100i64),
            ("0", 0),
            ("-0", 0),
            ("7", 7),
            ("-9223372036854775808", i64::MIN),
            ("9223372036854775807", i64::MAX),
        ] {
            let mut p = Parser { src: text, pos: 0 };
            assert_eq!(p.int("n").unwrap(), v, "{text}");
            assert_eq!(p.pos, text.len());
        }
        for bad in [
            "-",
            "+1",
            "- 1",
            "x",
            "",
            "9223372036854775808",
            "-9223372036854775809",
        ] {
            assert!(Parser { src: bad, pos: 0 }.int("n").is_err(), "{bad}");
        }
    }

    #[test]
    fn dims() {
        for text in ["768", "B", "2*L", "B*L", "0", "3*\"0\"", "B*\"x y\"", "B*B"] {
            let d = Parser { src: text, pos: 0 }.dim().unwrap();
            let mut out = String::new();
            write_dim(&mut out, &d).unwrap();
            assert_eq!(out, text);
        }
        let d = Parser {
            src: "L * 2 * B",
            pos: 0,
        }
        .dim()
        .unwrap();
        assert_eq!(d.to_string(), "2*B*L");
        let long = vec![Dim::sym("S"); 200];
        assert_eq!(product(&long).unwrap().syms().len(), 200);
    }
}
