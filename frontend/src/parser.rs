//! The parser of the model DSL: hand-written recursive descent over the tokens of
//! [`crate::lexer`], with error recovery.
//!
//! ```text
//! file     = { item } ;
//! item     = ( "block" | "model" ) IDENT "(" [ cparam { "," cparam } [ "," ] ] ")"
//!                "{" { stmt } "}"
//!          | "preset" STRING "=" IDENT "(" [ arg { "," arg } [ "," ] ] ")" ;
//! cparam   = IDENT [ "=" expr ] ;
//! stmt     = "let" IDENT { "," IDENT } "=" expr
//!          | "dim" IDENT { "," IDENT }
//!          | "input" IDENT ":" type
//!          | "param" path ":" type [ "=" expr ]
//!          | "state" IDENT ":" type
//!          | "repeat" expr [ "as" path ] "{" { stmt } "}"
//!          | if_stmt
//!          | "require" expr "else" STRING
//!          | "return" expr { "," expr } ;
//! if_stmt  = "if" expr "{" { stmt } "}" [ "else" ( "{" { stmt } "}" | if_stmt ) ] ;
//!                                          (* `else if` becomes an If in else_body *)
//! type     = "[" [ expr { "," expr } [ "," ] ] "]" [ DTYPE ] ;
//! DTYPE    = "f64" | "f32" | "f16" | "bf16" | "i32" | "i64" ;   (* identifiers, not keywords *)
//! path     = IDENT { "." ( IDENT | INT ) } ;       (* `layers.0`: an INT segment keeps its digits *)
//! arg      = [ IDENT ":" ] expr ;
//! expr     = and { "||" and } ;
//! and      = cmp { "&&" cmp } ;
//! cmp      = add [ ( "==" | "!=" | "<" | "<=" | ">" | ">=" ) add ] ;   (* does not chain *)
//! add      = mul { ( "+" | "-" ) mul } ;
//! mul      = unary { ( "*" | "/" | "%" ) unary } ;
//! unary    = ( "-" | "!" ) unary | primary ;
//! primary  = INT | FLOAT | "true" | "false" | STRING
//!          | path [ "(" [ arg { "," arg } [ "," ] ] ")" ]
//!          | "(" expr ")"
//!          | "[" [ expr { "," expr } [ "," ] ] "]" ;
//! ```
//!
//! Keywords: `block model preset let dim input param state repeat require as if else return
//! true false`. Statements start with a keyword, so no separators are needed; newlines are
//! whitespace. Binary operators are left-associative; the levels above go from loosest to
//! tightest.
//!
//! # Error recovery
//!
//! [`parse_file`] always returns a tree and every syntax error it found, rust-analyzer style:
//!
//! - A statement that cannot be parsed becomes [`Stmt::Error`]; the parser skips to the next
//!   statement keyword, the `}` closing the body, or the next item. A missing expression
//!   becomes [`ExprKind::Error`] and the statement around it is kept.
//! - Inside brackets the parser skips junk to the next `,` or the closing bracket; a bracket
//!   still open where an expression cannot go on (`{`, `}`, a keyword, the closer of an
//!   enclosing bracket) is reported as unclosed. A missing `{` after a complete header is
//!   recovered from by taking the statements that follow as the body; an `else` starting a
//!   line ends an unclosed `if` body.
//! - Statement and item keywords are trusted as resynchronisation points when they start a
//!   line, and a `}` when it ends a line or precedes `}`, `else` or a keyword: a stray keyword
//!   or brace in the middle of a line is skipped with the rest of a broken statement.
//! - No cascades: after an error, further diagnostics are held back until the next statement,
//!   item or closed body, so one mistake gives one diagnostic; tokens the lexer already
//!   reported (stray characters, bad literals) are not reported again.
//!
//! # Limits
//!
//! Nesting (brackets, unary operators, each operator of a binary chain, `{}` bodies, `else
//! if`) is capped at [`MAX_DEPTH`] levels: deeper regions are skipped without descending and
//! reported once ([`Code::Limit`]), so any input parses on a small stack. Files larger than
//! [`lexer::MAX_FILE_BYTES`] or with more than [`lexer::MAX_TOKENS`] tokens are refused
//! (the latter parsed up to the cut), and beyond [`lexer::MAX_DIAGNOSTICS`] diagnostics the
//! rest are summarised in one. Recursion costs at most about 3 KiB of stack per level in debug
//! builds, so [`MAX_DEPTH`] levels fit well within a 2 MiB stack.

use crate::ast::{
    Arg, BinOp, ConfigParam, Def, DefKind, Expr, ExprKind, File, Ident, Item, Path, Preset, Span,
    Stmt, TypeExpr, UnOp,
};
use crate::diag::{Code, Diagnostic, near_name};
use crate::lexer::{self, DTYPES, Kind, Lit, Token};

/// The deepest nesting of brackets, operators and bodies the parser descends into.
pub const MAX_DEPTH: u32 = 128;

/// Parses one model file. `file` is the index of the file for spans ([`crate::diag::Sources`]).
/// Always returns a tree, plus all diagnostics (lexical and syntax errors) in source order.
pub fn parse_file(text: &str, file: u16) -> (File, Vec<Diagnostic>) {
    if text.len() > lexer::MAX_FILE_BYTES {
        let d = Diagnostic::error(
            Code::Limit,
            format!(
                "the file is larger than {} MiB",
                lexer::MAX_FILE_BYTES >> 20
            ),
        )
        .label(
            Span::new(file, 0, 0),
            format!("this file has {} bytes", text.len()),
        )
        .help("split the model into several files");
        return (File { items: Vec::new() }, vec![d]);
    }
    let (toks, mut diags) = lexer::lex(text, file);
    let eof = Token {
        kind: Kind::Eof,
        lit: Lit::None,
        start: text.len() as u32,
        end: text.len() as u32,
        nl_before: false,
        bad: false,
    };
    let mut p = Parser {
        text,
        file,
        toks,
        eof,
        pos: 0,
        diags: Vec::new(),
        quiet: false,
        depth: 0,
        limit_hit: false,
        delims: Vec::new(),
    };
    let items = p.file();
    diags.append(&mut p.diags);
    diags.sort_by_key(|d| d.span().map_or(0, |s| s.start));
    if diags.len() > lexer::MAX_DIAGNOSTICS {
        let at = diags
            .get(lexer::MAX_DIAGNOSTICS)
            .and_then(Diagnostic::span)
            .unwrap_or(Span::new(file, 0, 0));
        diags.truncate(lexer::MAX_DIAGNOSTICS);
        diags.push(
            Diagnostic::error(
                Code::Limit,
                format!(
                    "too many errors: only the first {} are shown",
                    lexer::MAX_DIAGNOSTICS
                ),
            )
            .label(at, "errors from here on are not shown"),
        );
    }
    (File { items }, diags)
}

fn binop(k: Kind) -> Option<(BinOp, u8)> {
    Some(match k {
        Kind::OrOr => (BinOp::Or, 1),
        Kind::AndAnd => (BinOp::And, 2),
        Kind::EqEq => (BinOp::Eq, 3),
        Kind::NotEq => (BinOp::Ne, 3),
        Kind::Lt => (BinOp::Lt, 3),
        Kind::Le => (BinOp::Le, 3),
        Kind::Gt => (BinOp::Gt, 3),
        Kind::Ge => (BinOp::Ge, 3),
        Kind::Plus => (BinOp::Add, 4),
        Kind::Minus => (BinOp::Sub, 4),
        Kind::Star => (BinOp::Mul, 5),
        Kind::Slash => (BinOp::Div, 5),
        Kind::Percent => (BinOp::Rem, 5),
        _ => return None,
    })
}

const CMP_PREC: u8 = 3;

fn sym(k: Kind) -> &'static str {
    k.text().unwrap_or("?")
}

struct Parser<'a> {
    text: &'a str,
    file: u16,
    toks: Vec<Token>,
    /// Returned for positions past the end (never reached: the tokens end with `Eof`).
    eof: Token,
    pos: usize,
    diags: Vec<Diagnostic>,
    /// Set after an error: further diagnostics are dropped until the parser resynchronises.
    quiet: bool,
    depth: u32,
    limit_hit: bool,
    /// The closing brackets of the lists being parsed, innermost last.
    delims: Vec<Kind>,
}

impl Parser<'_> {
    // ---- tokens ----------------------------------------------------------------------------

    fn tok(&self, i: usize) -> &Token {
        self.toks.get(i).unwrap_or(&self.eof)
    }

    fn kind(&self) -> Kind {
        self.tok(self.pos).kind
    }

    fn kind_at(&self, n: usize) -> Kind {
        self.tok(self.pos + n).kind
    }

    fn at(&self, k: Kind) -> bool {
        self.kind() == k
    }

    /// Consumes the current token (never the end of the file) and returns its index.
    fn bump(&mut self) -> usize {
        let i = self.pos;
        if self.tok(i).kind != Kind::Eof {
            self.pos += 1;
        }
        if self.tok(i).bad {
            // The lexer reported this token; what follows may be out of sync.
            self.quiet = true;
        }
        i
    }

    fn sp(&self, start: u32, end: u32) -> Span {
        Span::new(self.file, start, end)
    }

    fn span(&self, i: usize) -> Span {
        let t = self.tok(i);
        self.sp(t.start, t.end)
    }

    /// The end of the last consumed token.
    fn prev_end(&self) -> u32 {
        match self.pos.checked_sub(1) {
            Some(p) => self.tok(p).end,
            None => self.tok(0).start,
        }
    }

    /// From the start of token `i` to the end of the last consumed token.
    fn span_from(&self, i: usize) -> Span {
        let start = self.tok(i).start;
        self.sp(start, self.prev_end().max(start))
    }

    /// A zero-width span at the end of the last consumed token.
    fn here(&self) -> Span {
        let e = self.prev_end();
        self.sp(e, e)
    }

    fn text_of(&self, i: usize) -> &str {
        let t = self.tok(i);
        self.text
            .get(t.start as usize..t.end as usize)
            .unwrap_or("")
    }

    fn ident_of(&self, i: usize) -> Ident {
        Ident {
            name: self.text_of(i).to_string(),
            span: self.span(i),
        }
    }

    /// How a token is named in a message: "`x`", "keyword `let`", "end of file".
    fn describe(&self, i: usize) -> String {
        let t = self.tok(i);
        match t.kind {
            Kind::Eof => "end of file".to_string(),
            Kind::Str => "a string".to_string(),
            k if k.is_keyword() => format!("keyword `{}`", sym(k)),
            Kind::Ident | Kind::Int | Kind::Float | Kind::Unknown => {
                let text = self.text_of(i);
                match text.char_indices().nth(24) {
                    Some((cut, _)) => format!("`{}…`", text.get(..cut).unwrap_or(text)),
                    None => format!("`{text}`"),
                }
            }
            k => format!("`{}`", sym(k)),
        }
    }

    /// The span to label when token `i` is unexpected; the end of the file is shown right
    /// after the last token.
    fn found_span(&self, i: usize) -> Span {
        if self.tok(i).kind == Kind::Eof {
            self.here()
        } else {
            self.span(i)
        }
    }

    /// The current token starts a line (or the file). Keywords that start statements and
    /// items are trusted as resynchronisation points only there: a stray keyword in the middle
    /// of a line is skipped with the rest of a broken statement.
    fn at_line_start(&self) -> bool {
        self.starts_line(self.pos)
    }

    fn starts_line(&self, i: usize) -> bool {
        i == 0 || self.tok(i).nl_before
    }

    /// At `block`/`model` and a name, or `preset` and a string: the start of an item.
    fn looks_like_item(&self) -> bool {
        match self.kind() {
            Kind::Block | Kind::Model => self.kind_at(1) == Kind::Ident,
            Kind::Preset => self.kind_at(1) == Kind::Str,
            _ => false,
        }
    }

    /// A trusted statement or item keyword: one starting a line.
    fn at_sync_keyword(&self) -> bool {
        (self.kind().starts_stmt() || self.looks_like_item()) && self.at_line_start()
    }

    /// A `}` trusted to close a body: one that starts a line, or that what may follow a body
    /// follows (the end of the line or file, `}`, `else`, a statement or item keyword). A `}`
    /// in the middle of a line of other tokens is treated as junk.
    fn at_closing_brace(&self) -> bool {
        if !self.at(Kind::RBrace) {
            return false;
        }
        let next = self.tok(self.pos + 1);
        self.at_line_start()
            || next.nl_before
            || matches!(next.kind, Kind::RBrace | Kind::Else | Kind::Eof)
            || next.kind.starts_stmt()
            || next.kind.starts_item()
    }

    /// At a token that ends an expression and any list inside it when recovering: `{`, `as`,
    /// `else`, the end of the file, a trusted `}` or statement or item keyword.
    fn at_expr_stop(&self) -> bool {
        matches!(
            self.kind(),
            Kind::LBrace | Kind::As | Kind::Else | Kind::Eof
        ) || self.at_closing_brace()
            || self.at_sync_keyword()
    }

    /// Where the parser resynchronises after a bad statement: the end of the file, a trusted
    /// `}` or statement or item keyword.
    fn at_stmt_sync(&self) -> bool {
        self.at(Kind::Eof) || self.at_closing_brace() || self.at_sync_keyword()
    }

    /// Where the parser resynchronises after a bad item: the end of the file or an item
    /// keyword starting a line.
    fn at_item_sync(&self) -> bool {
        self.at(Kind::Eof) || (self.looks_like_item() && self.at_line_start())
    }

    // ---- diagnostics -----------------------------------------------------------------------

    /// Keeps at most one more than [`lexer::MAX_DIAGNOSTICS`] (memory stays bounded whatever
    /// the input); [`parse_file`] reports the excess.
    fn push_diag(&mut self, d: Diagnostic) {
        if self.diags.len() <= lexer::MAX_DIAGNOSTICS {
            self.diags.push(d);
        }
    }

    /// Records `d` unless the parser is recovering from an earlier error or `at` is a token
    /// the lexer already reported; either way the parser is then out of sync.
    fn report(&mut self, at: usize, d: Diagnostic) {
        if !self.quiet && !self.tok(at).bad {
            self.push_diag(d);
        }
        self.quiet = true;
    }

    /// "expected {what}, found {the current token}".
    fn error_expected(&mut self, what: &str, help: Option<String>) {
        let i = self.pos;
        let found = self.describe(i);
        let mut d = Diagnostic::error(Code::Syntax, format!("expected {what}, found {found}"))
            .label(self.found_span(i), format!("expected {what}"));
        if let Some(h) = help {
            d = d.help(h);
        }
        self.report(i, d);
    }

    /// The list or body opened by token `open` ends without `close`.
    fn unclosed(&mut self, open: usize, close: Kind) {
        let i = self.pos;
        let o = sym(self.tok(open).kind);
        let c = sym(close);
        let mut d = Diagnostic::error(Code::Unclosed, format!("unclosed `{o}`"))
            .label(self.span(open), format!("this `{o}` is never closed"));
        let cur = self.tok(i);
        d = if cur.kind == Kind::Eof || cur.nl_before {
            d.label(self.here(), format!("expected `{c}` here"))
        } else {
            let found = self.describe(i);
            d.label(self.span(i), format!("expected `{c}`, found {found}"))
        };
        self.report(i, d);
    }

    /// Goes one level deeper, or reports the depth limit (once per file) and returns false.
    fn enter(&mut self, at: usize) -> bool {
        if self.depth >= MAX_DEPTH {
            self.too_deep(at);
            self.quiet = true;
            return false;
        }
        self.depth += 1;
        true
    }

    /// Reports the depth limit at token `at`, once per file.
    fn too_deep(&mut self, at: usize) {
        if self.limit_hit {
            return;
        }
        self.limit_hit = true;
        self.push_diag(
            Diagnostic::error(
                Code::Limit,
                format!("nesting is deeper than {MAX_DEPTH} levels"),
            )
            .label(self.span(at), "the parser stops descending here")
            .note(
                "brackets, unary operators, each operator of a chain like `a + b + c` and `{}` \
                 bodies each nest one level",
            )
            .help("split the expression with `let` bindings"),
        );
    }

    /// While skipping junk with `open` brackets open: junk nested deeper than the limit is
    /// reported like nesting the parser descends into.
    fn skipped_opener(&mut self, open: u32) {
        if self.depth + open > MAX_DEPTH {
            self.too_deep(self.pos);
        }
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    // ---- skipping --------------------------------------------------------------------------

    /// Skips a bracketed region; `open` brackets are already consumed (0: at the opener). Stops
    /// early at a token that cannot occur in an expression.
    fn skip_balanced(&mut self, mut open: u32) {
        loop {
            match self.kind() {
                Kind::LParen | Kind::LBracket => {
                    open += 1;
                    self.skipped_opener(open);
                }
                Kind::RParen | Kind::RBracket => {
                    open = open.saturating_sub(1);
                    if open == 0 {
                        self.bump();
                        return;
                    }
                }
                _ if self.at_expr_stop() => return,
                _ => {}
            }
            self.bump();
        }
    }

    /// Skips a `{}` region; `open` braces are already consumed (0: at the `{`). Stops early at
    /// an item keyword or the end of the file.
    fn skip_braces(&mut self, mut open: u32) {
        loop {
            match self.kind() {
                Kind::LBrace => {
                    open += 1;
                    self.skipped_opener(open);
                }
                Kind::RBrace => {
                    open = open.saturating_sub(1);
                    if open == 0 {
                        self.bump();
                        return;
                    }
                }
                _ if self.at_item_sync() => return,
                _ => {}
            }
            self.bump();
        }
    }

    /// Skips the rest of an expression: up to a `,` or closing bracket outside brackets, or a
    /// token that cannot occur in an expression.
    fn skip_expr_rest(&mut self) {
        loop {
            match self.kind() {
                Kind::LParen | Kind::LBracket => self.skip_balanced(0),
                Kind::Comma | Kind::RParen | Kind::RBracket => return,
                _ if self.at_expr_stop() => return,
                _ => {
                    self.bump();
                }
            }
        }
    }

    /// Skips what is left of a bad statement.
    fn skip_stmt_junk(&mut self) {
        loop {
            match self.kind() {
                _ if self.at_stmt_sync() => return,
                Kind::LBrace => self.skip_braces(0),
                _ => {
                    self.bump();
                }
            }
        }
    }

    fn skip_to_item(&mut self) {
        let mut open = 0;
        while !self.at_item_sync() {
            match self.kind() {
                Kind::LParen | Kind::LBracket | Kind::LBrace => {
                    open += 1;
                    self.skipped_opener(open);
                }
                Kind::RParen | Kind::RBracket | Kind::RBrace => open = u32::saturating_sub(open, 1),
                _ => {}
            }
            self.bump();
        }
    }

    /// After a bad `if`/`repeat` header: skips to the `{` of its body if there is one.
    fn recover_to_body(&mut self) -> bool {
        loop {
            match self.kind() {
                Kind::LBrace => return true,
                _ if self.at_stmt_sync() => return false,
                _ => {
                    self.bump();
                }
            }
        }
    }

    // ---- items -----------------------------------------------------------------------------

    fn file(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        loop {
            self.quiet = false;
            self.depth = 0;
            self.delims.clear();
            match self.kind() {
                Kind::Eof => break,
                Kind::Block | Kind::Model => items.push(Item::Def(self.def())),
                Kind::Preset => match self.preset() {
                    Some(p) => items.push(Item::Preset(p)),
                    None => self.skip_to_item(),
                },
                k => {
                    let i = self.pos;
                    let found = self.describe(i);
                    let mut d = Diagnostic::error(
                        Code::Syntax,
                        format!("expected `block`, `model` or `preset`, found {found}"),
                    )
                    .label(self.found_span(i), "expected an item");
                    d = if k.starts_stmt() {
                        d.help("statements belong inside the body of a `block` or `model`")
                    } else if k == Kind::RBrace {
                        d.help("this `}` has no matching `{`; remove it")
                    } else {
                        d.note("a model file holds `block`, `model` and `preset` definitions")
                    };
                    self.report(i, d);
                    if k == Kind::LBrace {
                        self.skip_braces(0);
                    } else {
                        self.bump();
                    }
                    self.skip_to_item();
                }
            }
            if self.quiet {
                self.skip_to_item();
            }
        }
        items
    }

    fn def(&mut self) -> Def {
        let kw = self.bump();
        let kind = if self.tok(kw).kind == Kind::Block {
            DefKind::Block
        } else {
            DefKind::Model
        };
        let name = match self.ident("a name") {
            Some(n) => n,
            None => Ident {
                name: String::new(),
                span: self.here(),
            },
        };
        let mut params = Vec::new();
        if self.at(Kind::LParen) {
            let open = self.bump();
            params = self.delimited(open, Kind::RParen, Self::cparam);
        } else {
            let help = self.at(Kind::LBrace).then(|| {
                format!(
                    "write `{}()` if it has no parameters",
                    if name.name.is_empty() {
                        "name"
                    } else {
                        &name.name
                    }
                )
            });
            self.error_expected("`(`", help);
        }
        let header_ok = self.starts_line(kw) && (!self.quiet || self.at_line_start());
        if !self.at(Kind::LBrace) {
            self.error_expected("`{`", None);
            // Skip junk up to the `{` (the header may be badly broken).
            while !(self.at(Kind::LBrace) || self.at_item_sync() || self.at_sync_keyword()) {
                self.bump();
            }
        }
        let body = self.block_body(false, header_ok).unwrap_or_default();
        Def {
            kind,
            name,
            params,
            body,
            span: self.span_from(kw),
        }
    }

    fn cparam(&mut self) -> Option<ConfigParam> {
        let start = self.pos;
        let name = self.ident("a parameter name")?;
        let default = match self.kind() {
            Kind::Assign => {
                self.bump();
                Some(self.expr())
            }
            Kind::Colon => {
                self.error_expected(
                    "`=`, `,` or `)`",
                    Some(format!(
                        "defaults are written `name = value`: `{} = ...`",
                        name.name
                    )),
                );
                self.bump();
                Some(self.expr())
            }
            _ => None,
        };
        Some(ConfigParam {
            name,
            default,
            span: self.span_from(start),
        })
    }

    fn preset(&mut self) -> Option<Preset> {
        let kw = self.bump();
        if !self.at(Kind::Str) {
            let help = self.at(Kind::Ident).then(|| {
                format!(
                    "preset names are strings: `preset \"{}\" = ...`",
                    self.text_of(self.pos)
                )
            });
            self.error_expected("a preset name in double quotes", help);
            return None;
        }
        let s = self.bump();
        let name = match &self.tok(s).lit {
            Lit::Str(v) => v.clone(),
            _ => String::new(),
        };
        let name_span = self.span(s);
        if !self.at(Kind::Assign) {
            self.error_expected("`=`", None);
            return None;
        }
        self.bump();
        let model = self.ident("the name of a model")?;
        if !self.at(Kind::LParen) {
            let help = format!(
                "a preset calls a model with its config: `{}(d_model: 768)`",
                model.name
            );
            self.error_expected("`(`", Some(help));
            return None;
        }
        let open = self.bump();
        let args = self.delimited(open, Kind::RParen, Self::arg);
        Some(Preset {
            name,
            name_span,
            model,
            args,
            span: self.span_from(kw),
        })
    }

    // ---- statements ------------------------------------------------------------------------

    /// The body of a definition, `repeat`, `if` or `else`, after its header. A missing `{`
    /// (reported by the caller) is recovered from: junk is skipped up to the `{`, and if a
    /// statement comes first the body is parsed as if the `{` were there. `then`: the body of
    /// an `if`, which an `else` starting a line also ends (a forgotten `}`). `header_ok`: no
    /// error before the missing `{`; otherwise the body is only parsed from a `{`.
    fn block_body(&mut self, then: bool, header_ok: bool) -> Option<Vec<Stmt>> {
        self.recover_to_body();
        let open = if self.at(Kind::LBrace) {
            Some(self.bump())
        } else if header_ok && self.kind().starts_stmt() && self.at_line_start() {
            None
        } else {
            return None;
        };
        Some(self.body(open, then))
    }

    /// `stmt* }` after the `{` (`open`, `None` when it is missing and reported).
    fn body(&mut self, open: Option<usize>, then: bool) -> Vec<Stmt> {
        let mut stmts = Vec::new();
        if !self.enter(open.unwrap_or(self.pos)) {
            if open.is_some() {
                self.skip_braces(1);
            } else {
                self.skip_stmt_junk();
            }
            return stmts;
        }
        loop {
            let k = self.kind();
            if self.at_closing_brace() {
                self.bump();
                self.quiet = false;
                break;
            }
            if self.at_item_sync() || (then && k == Kind::Else && self.at_line_start()) {
                if let Some(open) = open {
                    self.unclosed(open, Kind::RBrace);
                }
                break;
            }
            stmts.push(if k.starts_stmt() {
                self.stmt()
            } else {
                self.junk_stmt()
            });
        }
        self.leave();
        stmts
    }

    fn stmt(&mut self) -> Stmt {
        self.quiet = false;
        let start = self.pos;
        let parsed = match self.kind() {
            Kind::Let => self.let_stmt(),
            Kind::Dim => self.dim_stmt(),
            Kind::Input | Kind::State => self.input_or_state(),
            Kind::Param => self.param_stmt(),
            Kind::Repeat => self.repeat_stmt(),
            Kind::Require => self.require_stmt(),
            Kind::If => self.if_stmt(),
            Kind::Return => self.return_stmt(),
            _ => None,
        };
        let stmt = match parsed {
            Some(s) => s,
            None => {
                self.skip_stmt_junk();
                return Stmt::Error {
                    span: self.span_from(start),
                };
            }
        };
        if self.quiet {
            self.skip_stmt_junk();
        }
        stmt
    }

    /// A statement that does not start with a statement keyword.
    fn junk_stmt(&mut self) -> Stmt {
        self.quiet = false;
        let i = self.pos;
        let k = self.kind();
        let found = self.describe(i);
        let prev = self.pos.checked_sub(1).map(|p| self.tok(p).kind);
        let d = if k == Kind::Ident && prev == Some(Kind::RBracket) && !self.tok(i).nl_before {
            // `[B, L] f33`: a dtype that is not one.
            let name = self.text_of(i);
            let d = Diagnostic::error(Code::Syntax, format!("unknown dtype {found}"))
                .label(self.span(i), "not a dtype");
            match near_name(name, DTYPES) {
                Some(near) => d.help(format!("did you mean `{near}`?")),
                None => d.help(format!("the dtypes are {}", DTYPES.join(", "))),
            }
        } else {
            let d = Diagnostic::error(Code::Syntax, format!("expected a statement, found {found}"))
                .label(self.found_span(i), "expected a statement");
            if k == Kind::Ident && self.kind_at(1) == Kind::Assign {
                let name = self.text_of(i);
                d.help(format!("bindings start with `let`: `let {name} = ...`"))
            } else if k == Kind::Else {
                d.help("`else` must follow the `}` of an `if` body")
            } else if k == Kind::RBrace {
                d.note(
                    "a `}` closing a body ends its line or is followed by `}`, `else` or a keyword",
                )
            } else {
                d.note(
                    "statements start with `let`, `dim`, `input`, `param`, `state`, `repeat`, \
                     `require`, `if` or `return`",
                )
            }
        };
        self.report(i, d);
        if k == Kind::LBrace {
            self.skip_braces(0);
        } else {
            self.bump();
        }
        self.skip_stmt_junk();
        Stmt::Error {
            span: self.span_from(i),
        }
    }

    fn let_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let names = self.ident_list()?;
        if !self.at(Kind::Assign) {
            let help = self
                .at(Kind::Colon)
                .then(|| "`let` takes no type: write `let name = value`".to_string());
            self.error_expected("`=`", help);
            return None;
        }
        self.bump();
        let value = self.expr();
        Some(Stmt::Let {
            names,
            value,
            span: self.span_from(kw),
        })
    }

    fn dim_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let names = self.ident_list()?;
        Some(Stmt::Dim {
            names,
            span: self.span_from(kw),
        })
    }

    fn input_or_state(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let name = self.ident("a name")?;
        self.expect_colon()?;
        let ty = self.type_expr()?;
        let span = self.span_from(kw);
        Some(if self.tok(kw).kind == Kind::Input {
            Stmt::Input { name, ty, span }
        } else {
            Stmt::State { name, ty, span }
        })
    }

    fn param_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let path = self.path_req("a parameter name")?;
        self.expect_colon()?;
        let ty = self.type_expr()?;
        let init = if self.at(Kind::Assign) {
            self.bump();
            Some(self.expr())
        } else {
            None
        };
        Some(Stmt::Param {
            path,
            ty,
            init,
            span: self.span_from(kw),
        })
    }

    fn repeat_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let count = self.expr();
        let mut scope = None;
        let mut has_as = false;
        if self.at(Kind::As) {
            has_as = true;
            self.bump();
            scope = self.path_req("a scope like `backbone.layers`");
        }
        let header_ok = self.starts_line(kw) && (!self.quiet || self.at_line_start());
        if !self.at(Kind::LBrace) {
            self.error_expected(if has_as { "`{`" } else { "`as` or `{`" }, None);
        }
        let body = self.block_body(false, header_ok)?;
        Some(Stmt::Repeat {
            count,
            scope,
            body,
            span: self.span_from(kw),
        })
    }

    fn if_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        self.if_rest(kw, self.starts_line(kw))
    }

    /// An `if` after its keyword (token `kw`, the start of its span). `own_line`: the `if`
    /// starts a line (or follows `} else`), so a missing `{` may be recovered from by parsing
    /// the statements that follow as its body.
    fn if_rest(&mut self, kw: usize, own_line: bool) -> Option<Stmt> {
        let cond = self.expr();
        let header_ok = own_line && (!self.quiet || self.at_line_start());
        if !self.at(Kind::LBrace) {
            self.missing_if_brace();
        }
        let then_body = self.block_body(true, header_ok)?;
        let else_body = if self.at(Kind::Else) {
            self.else_part()
        } else {
            Vec::new()
        };
        Some(Stmt::If {
            cond,
            then_body,
            else_body,
            span: self.span_from(kw),
        })
    }

    #[inline(never)]
    fn missing_if_brace(&mut self) {
        let help = self
            .at(Kind::Assign)
            .then(|| "use `==` to compare".to_string());
        self.error_expected("`{`", help);
    }

    /// `else { ... }` or `else if ...`, at the `else`.
    fn else_part(&mut self) -> Vec<Stmt> {
        self.bump();
        match self.kind() {
            Kind::LBrace => self.block_body(false, true).unwrap_or_default(),
            Kind::If => {
                let at = self.pos;
                if !self.enter(at) {
                    self.skip_else_chain();
                    return Vec::new();
                }
                self.bump();
                let s = match self.if_rest(at, true) {
                    Some(s) => s,
                    None => {
                        self.skip_stmt_junk();
                        Stmt::Error {
                            span: self.span_from(at),
                        }
                    }
                };
                self.leave();
                vec![s]
            }
            _ => self.bad_else(),
        }
    }

    /// `else` followed by neither `{` nor `if`.
    #[inline(never)]
    fn bad_else(&mut self) -> Vec<Stmt> {
        let starts_expr = matches!(
            self.kind(),
            Kind::Ident
                | Kind::Int
                | Kind::Float
                | Kind::Str
                | Kind::True
                | Kind::False
                | Kind::LParen
                | Kind::LBracket
                | Kind::Minus
                | Kind::Bang
        );
        let help = starts_expr.then(|| "write `else if` to test a condition".into());
        self.error_expected("`{` or `if` after `else`", help);
        if !starts_expr {
            return self.block_body(false, true).unwrap_or_default();
        }
        // Parse it as the `else if` it probably is.
        let at = self.pos;
        if !self.enter(at) {
            self.skip_else_chain();
            return Vec::new();
        }
        let s = self.if_rest(at, false);
        self.leave();
        s.into_iter().collect()
    }

    /// Skips `if ... { } else if ... { } else { }` without descending (at the depth limit).
    fn skip_else_chain(&mut self) {
        loop {
            self.bump(); // `if`
            if !self.recover_to_body() {
                return;
            }
            self.skip_braces(0);
            if !self.at(Kind::Else) {
                return;
            }
            self.bump();
            match self.kind() {
                Kind::If => {}
                Kind::LBrace => return self.skip_braces(0),
                _ => return,
            }
        }
    }

    fn require_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let cond = self.expr();
        if !self.at(Kind::Else) {
            let help = "a `require` says what is wrong: `require cond else \"message\"`";
            self.error_expected("`else`", Some(help.to_string()));
            return None;
        }
        self.bump();
        if !self.at(Kind::Str) {
            self.error_expected("a message in double quotes", None);
            return None;
        }
        let s = self.bump();
        let message = match &self.tok(s).lit {
            Lit::Str(v) => v.clone(),
            _ => String::new(),
        };
        Some(Stmt::Require {
            cond,
            message,
            span: self.span_from(kw),
        })
    }

    fn return_stmt(&mut self) -> Option<Stmt> {
        let kw = self.bump();
        let mut values = vec![self.expr()];
        while self.at(Kind::Comma) {
            self.bump();
            values.push(self.expr());
        }
        Some(Stmt::Return {
            values,
            span: self.span_from(kw),
        })
    }

    // ---- pieces ----------------------------------------------------------------------------

    fn ident(&mut self, what: &str) -> Option<Ident> {
        if self.at(Kind::Ident) {
            let i = self.bump();
            return Some(self.ident_of(i));
        }
        let k = self.kind();
        let help =
            (k.is_keyword()).then(|| format!("`{}` is a keyword; pick another name", sym(k)));
        self.error_expected(what, help);
        None
    }

    /// `IDENT { "," IDENT }`.
    fn ident_list(&mut self) -> Option<Vec<Ident>> {
        let mut names = vec![self.ident("a name")?];
        while self.at(Kind::Comma) {
            self.bump();
            names.push(self.ident("a name")?);
        }
        Some(names)
    }

    fn expect_colon(&mut self) -> Option<()> {
        if self.at(Kind::Colon) {
            self.bump();
            return Some(());
        }
        let help = self
            .at(Kind::LBracket)
            .then(|| "a type follows a `:`, as in `x: [B, L]`".to_string());
        self.error_expected("`:`", help);
        None
    }

    /// `"[" dims "]" [DTYPE]`.
    fn type_expr(&mut self) -> Option<TypeExpr> {
        if !self.at(Kind::LBracket) {
            let help = (self.at(Kind::Ident) && DTYPES.contains(&self.text_of(self.pos)))
                .then(|| "the shape comes first: `[B, L] f32`".to_string());
            self.error_expected("a type like `[B, L]`", help);
            return None;
        }
        let open = self.bump();
        let dims = self.delimited(open, Kind::RBracket, |p| Some(p.expr()));
        let dtype = if self.at(Kind::Ident) && DTYPES.contains(&self.text_of(self.pos)) {
            let i = self.bump();
            Some(self.ident_of(i))
        } else {
            None
        };
        Some(TypeExpr {
            dims,
            dtype,
            span: self.span_from(open),
        })
    }

    /// A path where one is required.
    fn path_req(&mut self, what: &str) -> Option<Path> {
        if self.at(Kind::Ident) {
            return Some(self.path());
        }
        let k = self.kind();
        let help =
            (k.is_keyword()).then(|| format!("`{}` is a keyword; pick another name", sym(k)));
        self.error_expected(what, help);
        None
    }

    /// `IDENT { "." ( IDENT | INT ) }`, at the IDENT.
    fn path(&mut self) -> Path {
        let first = self.bump();
        let mut segments = vec![self.ident_of(first)];
        while self.at(Kind::Dot) {
            match self.kind_at(1) {
                Kind::Ident | Kind::Int => {
                    self.bump();
                    let s = self.bump();
                    segments.push(self.ident_of(s));
                }
                _ => {
                    self.bump();
                    self.error_expected("a name after `.`", None);
                    break;
                }
            }
        }
        Path {
            segments,
            span: self.span_from(first),
        }
    }

    /// `[IDENT ":"] expr`.
    fn arg(&mut self) -> Option<Arg> {
        let name = self.arg_name();
        let value = self.expr();
        Some(Arg { name, value })
    }

    /// The `name:` of a named argument, if there is one; `name =` is reported and accepted.
    #[inline(never)]
    fn arg_name(&mut self) -> Option<Ident> {
        if !self.at(Kind::Ident) {
            return None;
        }
        match self.kind_at(1) {
            Kind::Colon => {
                let i = self.bump();
                self.bump();
                Some(self.ident_of(i))
            }
            Kind::Assign => {
                let i = self.bump();
                let n = self.ident_of(i);
                self.error_expected(
                    "`:`",
                    Some(format!(
                        "named arguments are written `name: value`: `{}: ...`",
                        n.name
                    )),
                );
                self.bump();
                Some(n)
            }
            _ => None,
        }
    }

    /// The elements of a bracketed list, its opener `open` consumed, up to and including the
    /// closer. After an error inside the list the parser stays quiet until the statement ends.
    fn delimited<T>(
        &mut self,
        open: usize,
        close: Kind,
        mut elem: impl FnMut(&mut Self) -> Option<T>,
    ) -> Vec<T> {
        let mut items = Vec::new();
        if !self.enter(open) {
            self.skip_balanced(1);
            return items;
        }
        self.delims.push(close);
        loop {
            if self.at(close) {
                self.bump();
                break;
            }
            if self.at_list_end(close) {
                self.unclosed(open, close);
                break;
            }
            if let Some(x) = elem(self) {
                items.push(x);
            }
            if !self.after_elem(open, close, true) {
                break;
            }
        }
        self.delims.pop();
        self.leave();
        items
    }

    /// At a token that ends an unclosed list: one that cannot occur in an expression, or the
    /// closer of an enclosing list.
    fn at_list_end(&self, close: Kind) -> bool {
        let k = self.kind();
        self.at_expr_stop()
            || (matches!(k, Kind::RParen | Kind::RBracket)
                && k != close
                && self.delims.contains(&k))
    }

    /// After an element: a `,` (if `commas`; returns true: another element may follow), the
    /// closer, or junk to report and skip. Returns false when the list is over.
    fn after_elem(&mut self, open: usize, close: Kind, commas: bool) -> bool {
        let k = self.kind();
        if commas && k == Kind::Comma {
            self.bump();
            return true;
        }
        if k == close {
            self.bump();
            return false;
        }
        if self.at_list_end(close) {
            self.unclosed(open, close);
            return false;
        }
        let (o, c) = (sym(self.tok(open).kind), sym(close));
        let what = if commas {
            format!("`,` or `{c}`")
        } else {
            format!("`{c}`")
        };
        let i = self.pos;
        let found = self.describe(i);
        let mut d = Diagnostic::error(Code::Syntax, format!("expected {what}, found {found}"))
            .label(self.span(i), format!("expected {what}"))
            .label(self.span(open), format!("the `{o}` opened here"));
        if k == Kind::Comma {
            d = d.help("parentheses hold one expression; a list is written `[a, b]`");
        } else if matches!(k, Kind::RParen | Kind::RBracket) {
            d = d.help(format!("close the `{o}` with `{c}`"));
        }
        self.report(i, d);
        loop {
            match self.kind() {
                Kind::Comma if commas => {
                    self.bump();
                    return true;
                }
                k if k == close => {
                    self.bump();
                    return false;
                }
                _ if self.at_list_end(close) => return false,
                Kind::LParen | Kind::LBracket => self.skip_balanced(0),
                _ => {
                    self.bump();
                }
            }
        }
    }

    // ---- expressions -----------------------------------------------------------------------

    fn expr(&mut self) -> Expr {
        self.binary(0)
    }

    fn error_expr(&self, span: Span) -> Expr {
        Expr {
            kind: ExprKind::Error,
            span,
        }
    }

    /// Binary operators of precedence `min` and tighter (precedence climbing).
    fn binary(&mut self, min: u8) -> Expr {
        let mut lhs = self.unary();
        let mut entered = 0;
        let mut prev_cmp: Option<usize> = None;
        while let Some((op, prec)) = binop(self.kind()) {
            if prec < min {
                break;
            }
            let op_tok = self.bump();
            if prec == CMP_PREC {
                if let Some(first) = prev_cmp {
                    self.chained_comparison(first, op_tok);
                }
                prev_cmp = Some(op_tok);
            } else {
                prev_cmp = None;
            }
            if !self.enter(op_tok) {
                self.skip_expr_rest();
                lhs = self.error_expr(lhs.span.to(self.here()));
                break;
            }
            entered += 1;
            let rhs = self.binary(prec + 1);
            let span = lhs.span.to(rhs.span);
            lhs = Expr {
                kind: ExprKind::Binary {
                    op,
                    lhs: Box::new(lhs),
                    rhs: Box::new(rhs),
                },
                span,
            };
        }
        self.depth = self.depth.saturating_sub(entered);
        lhs
    }

    #[inline(never)]
    fn chained_comparison(&mut self, first: usize, second: usize) {
        let d = Diagnostic::error(Code::Syntax, "comparisons cannot be chained")
            .label(self.span(second), "second comparison")
            .label(self.span(first), "first comparison")
            .help("combine comparisons with `&&`: `a < b && b < c`");
        self.report(second, d);
    }

    fn unary(&mut self) -> Expr {
        let op = match self.kind() {
            Kind::Minus => UnOp::Neg,
            Kind::Bang => UnOp::Not,
            _ => return self.primary(),
        };
        let t = self.bump();
        if !self.enter(t) {
            self.skip_expr_rest();
            return self.error_expr(self.span_from(t));
        }
        let e = self.unary();
        self.leave();
        Expr {
            span: self.span(t).to(e.span),
            kind: ExprKind::Unary {
                op,
                expr: Box::new(e),
            },
        }
    }

    /// Dispatches on the first token; the recursive cases get their own functions so that
    /// this frame, which every nesting level goes through, stays small.
    fn primary(&mut self) -> Expr {
        match self.kind() {
            Kind::Ident => self.path_or_call(),
            Kind::LParen => self.paren(),
            Kind::LBracket => self.list(),
            _ => self.atom(),
        }
    }

    /// A literal, or an error where an expression is missing.
    #[inline(never)]
    fn atom(&mut self) -> Expr {
        let i = self.pos;
        let kind = match self.kind() {
            Kind::Int | Kind::Float | Kind::Str => {
                self.bump();
                match &self.tok(i).lit {
                    Lit::Int(v) => ExprKind::Int(*v),
                    Lit::Float(v) => ExprKind::Float(*v),
                    Lit::Str(s) if !self.tok(i).bad => ExprKind::Str(s.clone()),
                    _ => ExprKind::Error,
                }
            }
            Kind::True | Kind::False => {
                self.bump();
                ExprKind::Bool(self.tok(i).kind == Kind::True)
            }
            k => {
                let help = match k {
                    Kind::Dot if self.kind_at(1) == Kind::Int => {
                        Some(format!("write `0.{}`", self.text_of(i + 1)))
                    }
                    k if k.is_keyword() => Some(format!("`{}` is a keyword, not a value", sym(k))),
                    _ => None,
                };
                self.error_expected("an expression", help);
                let at = self.tok(i).start.max(self.prev_end());
                return self.error_expr(self.sp(at, at));
            }
        };
        Expr {
            kind,
            span: self.span(i),
        }
    }

    /// `[ a, b ]`.
    fn list(&mut self) -> Expr {
        let open = self.bump();
        let items = self.delimited(open, Kind::RBracket, |p| Some(p.expr()));
        Expr {
            kind: ExprKind::List(items),
            span: self.span_from(open),
        }
    }

    fn path_or_call(&mut self) -> Expr {
        let callee = self.path();
        if !self.at(Kind::LParen) {
            let span = callee.span;
            return Expr {
                kind: ExprKind::Path(callee),
                span,
            };
        }
        let open = self.bump();
        let args = self.delimited(open, Kind::RParen, Self::arg);
        let span = callee.span.to(self.here());
        Expr {
            kind: ExprKind::Call { callee, args },
            span,
        }
    }

    /// `( expr )`; the expression's span grows to cover the parentheses.
    fn paren(&mut self) -> Expr {
        let open = self.bump();
        if !self.enter(open) {
            self.skip_balanced(1);
            return self.error_expr(self.span_from(open));
        }
        self.delims.push(Kind::RParen);
        let mut e = self.expr();
        let closed = self.at(Kind::RParen);
        self.after_elem(open, Kind::RParen, false);
        self.delims.pop();
        self.leave();
        if closed {
            e.span = self.span_from(open);
        }
        e
    }
}
