//! The lexer of the model DSL, written with nom combinators over `&str`.
//!
//! [`lex`] turns source text into [`Token`]s with byte spans, always ending with one
//! [`Kind::Eof`] token, plus the lexical diagnostics. It never fails: a malformed literal or a
//! stray character becomes a token marked `bad` (already reported), so the parser can go on
//! without reporting the same mistake twice.
//!
//! ```text
//! trivia  := (WHITESPACE | '#' <any char but newline>*)*
//! IDENT   := [A-Za-z_][A-Za-z0-9_]*          (keywords are reserved identifiers)
//! INT     := [0-9]+                          (must fit in an i64)
//! FLOAT   := [0-9]+ '.' [0-9]+ [EXP] | [0-9]+ EXP        EXP := [eE] [+-]? [0-9]+
//! STRING  := '"' (<any char but '"', '\' or newline> | '\"' | '\\')* '"'
//! PUNCT   := ( ) [ ] { } , : . = == != < <= > >= && || + - * / % !
//! ```
//!
//! Right after a `.` a number is lexed as an INT only, so `layers.0.weight` and `x.1.2` are
//! paths rather than floats.

use crate::ast::Span;
use crate::diag::{Code, Diagnostic};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_till, take_while};
use nom::character::complete::{char, digit1, multispace1, one_of, satisfy};
use nom::combinator::{opt, recognize, value};
use nom::multi::many0_count;
use nom::{IResult, Parser};

/// The largest source file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// The most tokens one file may have.
pub const MAX_TOKENS: usize = 1_000_000;

/// The most diagnostics reported for one file; [`crate::parse_file`] replaces the rest with one
/// [`Code::Limit`] diagnostic.
pub const MAX_DIAGNOSTICS: usize = 200;

/// The dtype names accepted after a tensor type.
pub const DTYPES: [&str; 6] = ["f64", "f32", "f16", "bf16", "i32", "i64"];

/// What a token is; literal values are in [`Token::lit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Ident,
    Int,
    Float,
    Str,
    // Keywords.
    Block,
    Model,
    Preset,
    Let,
    Dim,
    Input,
    Param,
    State,
    Repeat,
    Require,
    As,
    If,
    Else,
    Return,
    True,
    False,
    // Punctuation.
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Colon,
    Dot,
    Assign,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Bang,
    /// Characters that start no token (already reported).
    Unknown,
    Eof,
}

impl Kind {
    /// The keyword spelled `word`, if it is one.
    pub fn keyword(word: &str) -> Option<Kind> {
        Some(match word {
            "block" => Kind::Block,
            "model" => Kind::Model,
            "preset" => Kind::Preset,
            "let" => Kind::Let,
            "dim" => Kind::Dim,
            "input" => Kind::Input,
            "param" => Kind::Param,
            "state" => Kind::State,
            "repeat" => Kind::Repeat,
            "require" => Kind::Require,
            "as" => Kind::As,
            "if" => Kind::If,
            "else" => Kind::Else,
            "return" => Kind::Return,
            "true" => Kind::True,
            "false" => Kind::False,
            _ => return None,
        })
    }

    pub fn is_keyword(self) -> bool {
        matches!(
            self,
            Kind::Block
                | Kind::Model
                | Kind::Preset
                | Kind::Let
                | Kind::Dim
                | Kind::Input
                | Kind::Param
                | Kind::State
                | Kind::Repeat
                | Kind::Require
                | Kind::As
                | Kind::If
                | Kind::Else
                | Kind::Return
                | Kind::True
                | Kind::False
        )
    }

    /// Keywords that start an item: `block`, `model`, `preset`.
    pub fn starts_item(self) -> bool {
        matches!(self, Kind::Block | Kind::Model | Kind::Preset)
    }

    /// Keywords that start a statement.
    pub fn starts_stmt(self) -> bool {
        matches!(
            self,
            Kind::Let
                | Kind::Dim
                | Kind::Input
                | Kind::Param
                | Kind::State
                | Kind::Repeat
                | Kind::Require
                | Kind::If
                | Kind::Return
        )
    }

    /// The fixed spelling of a keyword or punctuation token.
    pub fn text(self) -> Option<&'static str> {
        Some(match self {
            Kind::Block => "block",
            Kind::Model => "model",
            Kind::Preset => "preset",
            Kind::Let => "let",
            Kind::Dim => "dim",
            Kind::Input => "input",
            Kind::Param => "param",
            Kind::State => "state",
            Kind::Repeat => "repeat",
            Kind::Require => "require",
            Kind::As => "as",
            Kind::If => "if",
            Kind::Else => "else",
            Kind::Return => "return",
            Kind::True => "true",
            Kind::False => "false",
            Kind::LParen => "(",
            Kind::RParen => ")",
            Kind::LBracket => "[",
            Kind::RBracket => "]",
            Kind::LBrace => "{",
            Kind::RBrace => "}",
            Kind::Comma => ",",
            Kind::Colon => ":",
            Kind::Dot => ".",
            Kind::Assign => "=",
            Kind::EqEq => "==",
            Kind::NotEq => "!=",
            Kind::Lt => "<",
            Kind::Le => "<=",
            Kind::Gt => ">",
            Kind::Ge => ">=",
            Kind::AndAnd => "&&",
            Kind::OrOr => "||",
            Kind::Plus => "+",
            Kind::Minus => "-",
            Kind::Star => "*",
            Kind::Slash => "/",
            Kind::Percent => "%",
            Kind::Bang => "!",
            Kind::Ident | Kind::Int | Kind::Float | Kind::Str | Kind::Unknown | Kind::Eof => {
                return None;
            }
        })
    }
}

/// The value of a literal token.
#[derive(Clone, Debug, PartialEq)]
pub enum Lit {
    None,
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub kind: Kind,
    pub lit: Lit,
    /// Byte offsets of the token text.
    pub start: u32,
    pub end: u32,
    /// A newline lies between the previous token and this one.
    pub nl_before: bool,
    /// The lexer reported an error for this token (a bad literal or stray characters), or the
    /// file was cut short here; the parser does not report it again.
    pub bad: bool,
}

/// Lexes `text`; the result always ends with an [`Kind::Eof`] token.
pub fn lex(text: &str, file: u16) -> (Vec<Token>, Vec<Diagnostic>) {
    let mut lx = Lexer {
        text,
        file,
        tokens: Vec::new(),
        diags: Vec::new(),
    };
    lx.run();
    (lx.tokens, lx.diags)
}

struct Lexer<'a> {
    text: &'a str,
    file: u16,
    tokens: Vec<Token>,
    diags: Vec<Diagnostic>,
}

/// What one token parser recognised, before it becomes a [`Token`].
#[derive(Clone, Debug, PartialEq)]
enum Raw {
    Word,
    Number(Number),
    Str(StrLit),
    Punct(Kind),
}

#[derive(Clone, Debug, PartialEq)]
enum Number {
    Int,
    Float,
    /// Digits run into letters (`16x`) or an exponent without digits (`1e`, `2e+`).
    Malformed {
        exponent: bool,
    },
    /// Digits and a dot without digits after it (`2.`).
    TrailingDot,
}

#[derive(Clone, Debug, PartialEq)]
struct StrLit {
    value: String,
    /// Written with single quotes (an error).
    single: bool,
    terminated: bool,
    /// Byte offsets (relative to the opening quote) and text of unknown escapes.
    bad_escapes: Vec<(usize, String)>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Characters that can start a token or trivia; anything else is a stray character.
fn starts_token(c: char) -> bool {
    is_ident_continue(c) || c.is_ascii_whitespace() || "\"'#()[]{},:.=!<>+-*/%&|".contains(c)
}

fn comment(i: &str) -> IResult<&str, &str> {
    recognize((char('#'), take_till(|c| c == '\n'))).parse(i)
}

/// Whitespace and comments.
fn trivia(i: &str) -> IResult<&str, &str> {
    recognize(many0_count(alt((multispace1, comment)))).parse(i)
}

fn word(i: &str) -> IResult<&str, Raw> {
    value(
        Raw::Word,
        recognize((satisfy(is_ident_start), take_while(is_ident_continue))),
    )
    .parse(i)
}

fn exponent(i: &str) -> IResult<&str, &str> {
    recognize((one_of("eE"), opt(one_of("+-")), digit1)).parse(i)
}

/// A number; right after a `.` only the digits (a path segment like `layers.0`).
fn number(after_dot: bool) -> impl FnMut(&str) -> IResult<&str, Raw> {
    move |i: &str| {
        let (rest, _) = digit1(i)?;
        if after_dot {
            return Ok((rest, Raw::Number(Number::Int)));
        }
        let (rest, frac) = opt((char('.'), digit1)).parse(rest)?;
        let (rest, exp) = opt(exponent).parse(rest)?;
        let mut kind = if frac.is_some() || exp.is_some() {
            Number::Float
        } else {
            Number::Int
        };
        // A dot that no digit follows (`2.`), unless it starts a path segment or a name.
        if frac.is_none()
            && exp.is_none()
            && let Some(after) = rest.strip_prefix('.')
            && !after.starts_with(|c: char| is_ident_continue(c) || c == '.')
        {
            return Ok((after, Raw::Number(Number::TrailingDot)));
        }
        // Letters glued to the number (`16x`) or an exponent without digits (`1e`, `1e+`).
        let (rest, junk) = recognize((
            opt((one_of("eE"), opt(one_of("+-")))),
            take_while(is_ident_continue),
        ))
        .parse(rest)?;
        if !junk.is_empty() {
            let exponent = exp.is_none()
                && junk.starts_with(['e', 'E'])
                && !junk.contains(|c: char| c.is_ascii_digit());
            kind = Number::Malformed { exponent };
        }
        Ok((rest, Raw::Number(kind)))
    }
}

/// A double-quoted string; stops before a newline or at the end when unterminated.
fn string(i: &str) -> IResult<&str, Raw> {
    let (mut rest, _) = char('"').parse(i)?;
    let mut lit = StrLit {
        value: String::new(),
        single: false,
        terminated: false,
        bad_escapes: Vec::new(),
    };
    loop {
        let (r, chunk) = take_till(|c| c == '"' || c == '\\' || c == '\n').parse(rest)?;
        rest = r;
        let chunk = match rest.starts_with('\n') {
            true => chunk.strip_suffix('\r').unwrap_or(chunk),
            false => chunk,
        };
        lit.value.push_str(chunk);
        if let Ok((r, _)) = char::<&str, nom::error::Error<&str>>('"').parse(rest) {
            lit.terminated = true;
            return Ok((r, Raw::Str(lit)));
        }
        if let Ok((r, esc)) = recognize((
            char::<&str, nom::error::Error<&str>>('\\'),
            opt(satisfy(|c| c != '\n')),
        ))
        .parse(rest)
        {
            match esc {
                "\\\"" => lit.value.push('"'),
                "\\\\" => lit.value.push('\\'),
                _ => {
                    lit.bad_escapes
                        .push((i.len() - rest.len(), esc.to_string()));
                    lit.value.push_str(esc);
                }
            }
            rest = r;
            continue;
        }
        // A newline or the end of the text.
        return Ok((rest, Raw::Str(lit)));
    }
}

/// `'...'` on one line: a string in the wrong quotes (reported, then lexed as a string).
fn single_quoted(i: &str) -> IResult<&str, Raw> {
    let (rest, (_, body, _)) = (
        char('\''),
        take_till(|c| c == '\'' || c == '\n'),
        char('\''),
    )
        .parse(i)?;
    Ok((
        rest,
        Raw::Str(StrLit {
            value: body.to_string(),
            single: true,
            terminated: true,
            bad_escapes: Vec::new(),
        }),
    ))
}

fn punct(i: &str) -> IResult<&str, Raw> {
    let two = alt((
        value(Kind::EqEq, tag("==")),
        value(Kind::NotEq, tag("!=")),
        value(Kind::Le, tag("<=")),
        value(Kind::Ge, tag(">=")),
        value(Kind::AndAnd, tag("&&")),
        value(Kind::OrOr, tag("||")),
    ));
    let one = alt((
        value(Kind::LParen, char('(')),
        value(Kind::RParen, char(')')),
        value(Kind::LBracket, char('[')),
        value(Kind::RBracket, char(']')),
        value(Kind::LBrace, char('{')),
        value(Kind::RBrace, char('}')),
        value(Kind::Comma, char(',')),
        value(Kind::Colon, char(':')),
        value(Kind::Dot, char('.')),
        value(Kind::Assign, char('=')),
        value(Kind::Lt, char('<')),
        value(Kind::Gt, char('>')),
        value(Kind::Plus, char('+')),
        value(Kind::Minus, char('-')),
        value(Kind::Star, char('*')),
        value(Kind::Slash, char('/')),
        value(Kind::Percent, char('%')),
        value(Kind::Bang, char('!')),
    ));
    alt((two, one)).map(Raw::Punct).parse(i)
}

/// A run of characters that start no token (at least one character).
fn unknown(i: &str) -> IResult<&str, &str> {
    recognize((
        satisfy(|_| true),
        take_while(|c: char| !starts_token(c) && !c.is_whitespace()),
    ))
    .parse(i)
}

/// `text` for a message: control characters escaped, long text cut short.
fn shown(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == 24 {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\u{feff}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Lexer<'_> {
    fn span(&self, start: usize, end: usize) -> Span {
        Span::new(self.file, start as u32, end as u32)
    }

    fn run(&mut self) {
        let text = self.text;
        let mut rest = text;
        loop {
            let (after, skipped) = match trivia(rest) {
                Ok(ok) => ok,
                Err(_) => (rest, ""),
            };
            rest = after;
            let nl_before = skipped.contains('\n');
            let start = text.len() - rest.len();
            if rest.is_empty() {
                self.push(Kind::Eof, Lit::None, start, start, nl_before, false);
                return;
            }
            if self.tokens.len() >= MAX_TOKENS {
                self.report(
                    Diagnostic::error(
                        Code::Limit,
                        format!("the file has more than {MAX_TOKENS} tokens"),
                    )
                    .label(self.span(start, start), "the rest of the file is not read")
                    .help("split the model into several files"),
                );
                // The parser does not report an early end of file as a syntax error.
                self.push(Kind::Eof, Lit::None, start, start, nl_before, true);
                return;
            }
            let after_dot = self.tokens.last().is_some_and(|t| t.kind == Kind::Dot);
            let parsed = alt((word, number(after_dot), string, single_quoted, punct)).parse(rest);
            let (after, raw) = match parsed {
                Ok(ok) => ok,
                Err(_) => match unknown(rest) {
                    Ok((after, junk)) => {
                        self.stray(start, junk, nl_before);
                        rest = after;
                        continue;
                    }
                    // Unreachable: `rest` is not empty.
                    Err(_) => {
                        self.push(Kind::Eof, Lit::None, start, start, nl_before, true);
                        return;
                    }
                },
            };
            rest = after;
            let end = text.len() - rest.len();
            let src = text.get(start..end).unwrap_or("");
            match raw {
                Raw::Word => {
                    let kind = Kind::keyword(src).unwrap_or(Kind::Ident);
                    self.push(kind, Lit::None, start, end, nl_before, false);
                }
                Raw::Punct(kind) => self.push(kind, Lit::None, start, end, nl_before, false),
                Raw::Number(n) => self.number(n, src, start, end, nl_before),
                Raw::Str(s) => self.string(s, start, end, nl_before),
            }
        }
    }

    /// Records a diagnostic; beyond one more than [`MAX_DIAGNOSTICS`] they are dropped.
    fn report(&mut self, d: Diagnostic) {
        if self.diags.len() <= MAX_DIAGNOSTICS {
            self.diags.push(d);
        }
    }

    fn push(&mut self, kind: Kind, lit: Lit, start: usize, end: usize, nl: bool, bad: bool) {
        self.tokens.push(Token {
            kind,
            lit,
            start: start as u32,
            end: end as u32,
            nl_before: nl,
            bad,
        });
    }

    fn stray(&mut self, start: usize, junk: &str, nl: bool) {
        let end = start + junk.len();
        let many = junk.chars().count() > 1;
        let message = format!(
            "unexpected character{} `{}`",
            if many { "s" } else { "" },
            shown(junk)
        );
        let mut d = Diagnostic::error(Code::Lexical, message)
            .label(self.span(start, end), "not part of the language");
        d = match junk.chars().next() {
            Some(';') => d.help("statements need no separator; remove the `;`"),
            Some('\'') => d.help("strings are written with double quotes: \"...\""),
            Some('&') => d.help("logical and is written `&&`"),
            Some('|') => d.help("logical or is written `||`"),
            Some('\u{2212}') => d.help("this is a unicode minus sign; use the ASCII `-`"),
            Some('\u{201c}' | '\u{201d}') => d.help("use plain double quotes: \"...\""),
            Some(c) if c.is_alphabetic() => d.help("names are ASCII letters, digits and `_`"),
            _ => d,
        };
        self.report(d);
        self.push(Kind::Unknown, Lit::None, start, end, nl, true);
    }

    fn number(&mut self, n: Number, src: &str, start: usize, end: usize, nl: bool) {
        let span = self.span(start, end);
        let (kind, lit, bad) = match n {
            Number::Int => match src.parse::<i64>() {
                Ok(v) => (Kind::Int, Lit::Int(v), false),
                Err(_) => {
                    self.report(
                        Diagnostic::error(Code::Lexical, "integer literal is too large")
                            .label(span, "does not fit in a 64-bit signed integer")
                            .note(format!("the largest integer is {}", i64::MAX)),
                    );
                    (Kind::Int, Lit::None, true)
                }
            },
            Number::Float => match src.parse::<f64>() {
                Ok(v) if v.is_finite() => (Kind::Float, Lit::Float(v), false),
                _ => {
                    self.report(
                        Diagnostic::error(Code::Lexical, "float literal is out of range")
                            .label(span, "larger than the largest 64-bit float")
                            .note(format!("the largest float is about {:e}", f64::MAX)),
                    );
                    (Kind::Float, Lit::None, true)
                }
            },
            Number::TrailingDot => {
                let digits = src.trim_end_matches('.');
                self.report(
                    Diagnostic::error(Code::Lexical, format!("invalid number `{}`", shown(src)))
                        .label(span, "expected digits after the `.`")
                        .help(format!("write `{digits}.0` or `{digits}`")),
                );
                (Kind::Float, Lit::None, true)
            }
            Number::Malformed { exponent } => {
                let d =
                    Diagnostic::error(Code::Lexical, format!("invalid number `{}`", shown(src)));
                self.report(if exponent {
                    d.label(span, "the exponent has no digits")
                        .help("write the exponent with digits, like `1e-4`")
                } else {
                    d.label(span, "a number cannot run into letters")
                        .help("put an operator or a space between a number and a name")
                });
                (Kind::Int, Lit::None, true)
            }
        };
        self.push(kind, lit, start, end, nl, bad);
    }

    fn string(&mut self, s: StrLit, start: usize, end: usize, nl: bool) {
        let mut bad = false;
        if s.single {
            self.report(
                Diagnostic::error(Code::Lexical, "strings are written with double quotes")
                    .label(self.span(start, end), "single quotes")
                    .help(format!("write \"{}\"", shown(&s.value))),
            );
            bad = true;
        }
        for (off, esc) in &s.bad_escapes {
            let at = start + off;
            self.report(
                Diagnostic::error(
                    Code::Lexical,
                    format!("unknown escape `{}` in a string", shown(esc)),
                )
                .label(self.span(at, at + esc.len()), "unknown escape")
                .help(r#"the only escapes are `\"` and `\\`"#),
            );
            bad = true;
        }
        if !s.terminated {
            let at_end = end == self.text.len();
            self.report(
                Diagnostic::error(Code::Lexical, "unterminated string")
                    .label(self.span(start, start + 1), "this string is never closed")
                    .label(
                        self.span(end, end),
                        if at_end {
                            "expected `\"` before the end of the file"
                        } else {
                            "expected `\"` before the end of the line"
                        },
                    )
                    .note("strings cannot span lines"),
            );
            bad = true;
        }
        self.push(Kind::Str, Lit::Str(s.value), start, end, nl, bad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Kind> {
        lex(text, 0).0.iter().map(|t| t.kind).collect()
    }

    #[test]
    fn tokens_and_spans() {
        let (toks, diags) = lex("let x = a.b(1, 2.5e3) # comment\n>= \"s\\\"\"", 0);
        assert!(diags.is_empty(), "{diags:?}");
        let k: Vec<Kind> = toks.iter().map(|t| t.kind).collect();
        use Kind::*;
        assert_eq!(
            k,
            [
                Let, Ident, Assign, Ident, Dot, Ident, LParen, Int, Comma, Float, RParen, Ge, Str,
                Eof
            ]
        );
        assert_eq!((toks[1].start, toks[1].end), (4, 5));
        assert_eq!(toks[9].lit, Lit::Float(2500.0));
        assert_eq!(toks[12].lit, Lit::Str("s\"".into()));
        assert!(toks[11].nl_before && !toks[10].nl_before);
    }

    #[test]
    fn numbers() {
        use Kind::*;
        assert_eq!(kinds("1e-4 0.02 1.5e3 7"), [Float, Float, Float, Int, Eof]);
        assert_eq!(kinds("layers.0.1"), [Ident, Dot, Int, Dot, Int, Eof]);
        assert_eq!(kinds("x.1e5"), [Ident, Dot, Int, Ident, Eof]);
        let (toks, diags) = lex("99999999999999999999", 0);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].code, Code::Lexical);
        assert!(toks[0].bad);
        for bad in ["1e", "1e+", "16x", "2.", "1e999"] {
            let (toks, diags) = lex(bad, 0);
            assert_eq!(diags.len(), 1, "{bad}: {diags:?}");
            assert_eq!(toks.len(), 2, "{bad}");
        }
    }

    #[test]
    fn strings_and_stray() {
        let (toks, diags) = lex("\"abc\nx", 0);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].message, "unterminated string");
        assert_eq!(toks[0].lit, Lit::Str("abc".into()));
        assert_eq!(toks[1].kind, Kind::Ident);
        let (toks, diags) = lex("a $$ b ; c & d", 0);
        assert_eq!(diags.len(), 3, "{diags:?}");
        assert_eq!(toks[1].kind, Kind::Unknown);
        assert_eq!((toks[1].start, toks[1].end), (2, 4));
        let (_, diags) = lex(r#""a\nb""#, 0);
        assert_eq!(diags.len(), 1);
    }
}
