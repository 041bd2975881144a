//! Syntax and lexical errors: every error is reported once, at the right place, with a
//! useful message, and parsing goes on.

use frontend::ast::{ExprKind, Item, Stmt};
use frontend::diag::{Code, Diagnostic, Sources, render};
use frontend::parse_file;

fn parse(text: &str) -> (frontend::ast::File, Vec<Diagnostic>) {
    parse_file(text, 0)
}

/// (code, message, line, column) of each diagnostic's primary span.
fn summary(text: &str) -> Vec<(Code, String, usize, usize)> {
    let (_, diags) = parse(text);
    let mut sources = Sources::new();
    sources.add("test.m2m", text);
    diags
        .iter()
        .map(|d| {
            let span = d.span().expect("every diagnostic has a span");
            let (line, col) = sources.line_col(span.file, span.start);
            (d.code, d.message.clone(), line, col)
        })
        .collect()
}

/// The single diagnostic of `text`.
fn one(text: &str) -> Diagnostic {
    let (_, mut diags) = parse(text);
    assert_eq!(diags.len(), 1, "{text}\n{diags:#?}");
    diags.remove(0)
}

#[test]
fn three_independent_errors() {
    let text = "\
model m(d_model, n_layer) {
  dim B, L
  let x = 
  input u: [B, L]
  param w: [d_model d_model]
  let y = linear(u, w)
  return y +
}
preset \"p\" = m(d_model: 4, n_layer: 2)
";
    let got = summary(text);
    let expected = vec![
        (
            Code::Syntax,
            "expected an expression, found keyword `input`".to_string(),
            4,
            3,
        ),
        (
            Code::Syntax,
            "expected `,` or `]`, found `d_model`".to_string(),
            5,
            21,
        ),
        (
            Code::Syntax,
            "expected an expression, found `}`".to_string(),
            8,
            1,
        ),
    ];
    assert_eq!(got, expected);
    // The statements around the errors are all there.
    let (file, _) = parse(text);
    assert_eq!(file.items.len(), 2);
    let Item::Def(d) = &file.items[0] else {
        panic!("expected a def")
    };
    assert_eq!(d.body.len(), 6);
    assert!(matches!(&d.body[1], Stmt::Let { value, .. } if value.kind == ExprKind::Error));
    assert!(matches!(&d.body[2], Stmt::Input { .. }));
    assert!(matches!(&d.body[4], Stmt::Let { .. }));
}

#[test]
fn broken_statements_become_error_statements() {
    let text = "model m() {\n  let = 1\n  dim B\n  param : [B]\n  return B\n}\n";
    let (file, diags) = parse(text);
    assert_eq!(diags.len(), 2, "{diags:#?}");
    let Item::Def(d) = &file.items[0] else {
        panic!("expected a def")
    };
    assert!(matches!(d.body[0], Stmt::Error { .. }));
    assert!(matches!(d.body[1], Stmt::Dim { .. }));
    assert!(matches!(d.body[2], Stmt::Error { .. }));
    assert!(matches!(d.body[3], Stmt::Return { .. }));
    let span = d.body[0].span();
    assert_eq!(&text[span.start as usize..span.end as usize], "let = 1");
}

#[test]
fn unclosed_brackets() {
    let d = one("model m() {\n  let x = f(a, b\n  let y = 1\n}\n");
    assert_eq!(d.code, Code::Unclosed);
    assert_eq!(d.message, "unclosed `(`");
    assert_eq!(d.labels.len(), 2);
    assert_eq!(d.labels[0].text, "this `(` is never closed");
    assert_eq!((d.labels[0].span.start, d.labels[0].span.end), (23, 24));
    // Right after `b`.
    assert_eq!(d.labels[1].text, "expected `)` here");
    assert_eq!((d.labels[1].span.start, d.labels[1].span.end), (28, 28));

    let d = one("model m() {\n  let x = [a, [b, c]\n}\n");
    assert_eq!((d.code, d.labels[0].span.start), (Code::Unclosed, 22));

    let d = one("model m() {\n  let x = 1\n");
    assert_eq!(d.code, Code::Unclosed);
    assert_eq!(d.labels[0].text, "this `{` is never closed");

    // A nested `[` closed by the outer `)`: only the `[` is reported.
    let d = one("model m() {\n  let x = f([a, b)\n  let y = 2\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Unclosed, "unclosed `[`")
    );

    // A missing `}` before `else`.
    let d = one("model m() {\n  if a {\n    let x = 1\n  else {\n    let x = 2\n  }\n}\n");
    assert_eq!((d.code, d.labels[0].span.start), (Code::Unclosed, 19));

    // A missing `}` before the next item.
    let (file, diags) = parse("block b() {\n  let x = 1\n\nmodel m() {\n  return 1\n}\n");
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].code, Code::Unclosed);
    assert_eq!(file.items.len(), 2);
}

#[test]
fn mismatched_closer() {
    let d = one("model m() {\n  let x = f(a, b]\n}\n");
    assert_eq!(d.code, Code::Syntax);
    assert_eq!(d.message, "expected `,` or `)`, found `]`");
    assert_eq!(d.help.as_deref(), Some("close the `(` with `)`"));
}

#[test]
fn lexical_errors() {
    let d = one("model m() {\n  let x = 99999999999999999999 + 1\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "integer literal is too large")
    );
    let d = one("model m() {\n  let x = 1e + 1\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "invalid number `1e`")
    );
    let d = one("model m() {\n  let x = 2e-\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "invalid number `2e-`")
    );
    let d = one("model m() {\n  let x = 16x\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "invalid number `16x`")
    );
    let d = one("model m() {\n  let x = 1e400\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "float literal is out of range")
    );

    // An unterminated string swallows the rest of its line only.
    let (file, diags) = parse("preset \"abc = m(a: 1)\nmodel m() {}\n");
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(
        (diags[0].code, diags[0].message.as_str()),
        (Code::Lexical, "unterminated string")
    );
    assert_eq!(file.items.len(), 1);
    let d = one("model m() {\n  let s = \"abc\n  let y = 1\n}\n");
    assert_eq!(d.message, "unterminated string");
    let d = one("model m() {\n  let s = \"a\\qb\"\n}\n");
    assert_eq!(d.message, "unknown escape `\\q` in a string");

    // Stray characters, reported once, not again by the parser.
    let d = one("model m() {\n  let x = a $ b\n}\n");
    assert_eq!(
        (d.code, d.message.as_str()),
        (Code::Lexical, "unexpected character `$`")
    );
    let got = summary("model m() {\n  let x = a $ b\n}\n");
    assert_eq!((got[0].2, got[0].3), (2, 13));
    let d = one("model m() {\n  let x = $$$\n}\n");
    assert_eq!(d.message, "unexpected characters `$$$`");
    let d = one("model m() {\n  let x = 1;\n}\n");
    assert!(
        d.help
            .as_deref()
            .is_some_and(|h| h.contains("no separator"))
    );
    let d = one("model m() {\n  if a & b {}\n}\n");
    assert!(d.help.as_deref().is_some_and(|h| h.contains("&&")));
    let d = one("model m() {\n  let x = 'a'\n}\n");
    assert_eq!(d.message, "strings are written with double quotes");
    assert_eq!(d.help.as_deref(), Some("write \"a\""));
    let d = one("model m() {\n  let x = it's\n}\n");
    assert!(
        d.help
            .as_deref()
            .is_some_and(|h| h.contains("double quotes"))
    );
}

#[test]
fn helpful_messages() {
    let d = one("model m() {\n  let x = f(a = 1)\n}\n");
    assert_eq!(d.message, "expected `:`, found `=`");
    assert_eq!(
        d.help.as_deref(),
        Some("named arguments are written `name: value`: `a: ...`")
    );
    let d = one("block b(d_state: 16) {\n  return d_state\n}\n");
    assert!(
        d.help
            .as_deref()
            .is_some_and(|h| h.contains("`name = value`"))
    );
    let d = one("model m() {\n  x = 1\n}\n");
    assert_eq!(
        d.help.as_deref(),
        Some("bindings start with `let`: `let x = ...`")
    );
    let d = one("model m() {\n  input u: [B, L] f33\n}\n");
    assert_eq!(d.message, "unknown dtype `f33`");
    assert_eq!(d.help.as_deref(), Some("did you mean `f32`?"));
    let d = one("model m() {\n  if a < b < c { }\n}\n");
    assert_eq!(d.message, "comparisons cannot be chained");
    let d = one("model m() {\n  if x = 1 { }\n}\n");
    assert_eq!(d.help.as_deref(), Some("use `==` to compare"));
    let d = one("let x = 1\n");
    assert_eq!(
        d.message,
        "expected `block`, `model` or `preset`, found keyword `let`"
    );
    let d = one("model m() {\n  let input = 3\n}\n");
    assert_eq!(d.message, "expected a name, found keyword `input`");
    let d = one("preset mamba = m()\n");
    assert!(d.help.as_deref().is_some_and(|h| h.contains("\"mamba\"")));
    let d = one("model m {\n  let x = 1\n}\n");
    assert_eq!(
        d.help.as_deref(),
        Some("write `m()` if it has no parameters")
    );
    let d = one("model m() {\n  let x = .5\n}\n");
    assert_eq!(d.help.as_deref(), Some("write `0.5`"));
    let d = one("model m() {\n  let x = (a, b)\n}\n");
    assert!(d.help.as_deref().is_some_and(|h| h.contains("`[a, b]`")));
    let d = one("model m() {\n  if a { } else b { }\n}\n");
    assert_eq!(
        d.help.as_deref(),
        Some("write `else if` to test a condition")
    );
}

#[test]
fn recovery_keeps_parsing() {
    // A missing `{` after a complete header: the statements that follow are the body.
    let (file, diags) = parse("model m()\n  let x = 1\n  return x\n}\n");
    assert_eq!(diags.len(), 1);
    let Item::Def(d) = &file.items[0] else {
        panic!("expected a def")
    };
    assert_eq!(d.body.len(), 2);
    let (file, diags) = parse("model m() {\n  repeat 2\n    let x = 1\n  }\n  return 1\n}\n");
    assert_eq!(diags.len(), 1);
    let Item::Def(d) = &file.items[0] else {
        panic!("expected a def")
    };
    assert!(matches!(&d.body[0], Stmt::Repeat { body, .. } if body.len() == 1));
    assert!(matches!(d.body[1], Stmt::Return { .. }));

    // Errors in different items and bodies are all reported.
    let text = "block a() {\n  let = 1\n}\nblock b() {\n  if { }\n}\npreset \"x\" = \npreset \"y\" = b()\n";
    let got = summary(text);
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!((got[0].2, got[1].2, got[2].2), (2, 5, 8));
    let (file, _) = parse(text);
    assert_eq!(file.items.len(), 3);
}

#[test]
fn render_diagnostics() {
    let text = "\
# A model with mistakes.
block mixer(d_model, d_state: 16) {
  input u: [B, L, d_model] f33
  let x = f(u, axis = -1
  let y = 99999999999999999999
  let z = \"unterminated
  let w = a $ b
}
model m() {
  if a < b < c {
    x = 1
  }
";
    let (_, diags) = parse(text);
    let mut sources = Sources::new();
    sources.add("models/broken.m2m", text);
    let out = render(&diags, &sources, false);
    println!("{out}");
    assert_eq!(diags.len(), 9, "{out}");
    assert!(out.contains("models/broken.m2m:4:"), "{out}");
    assert!(out.contains("this `{` is never closed"), "{out}");
    assert!(out.contains("help: did you mean `f32`?"), "{out}");
    let colored = render(&diags, &sources, true);
    assert!(colored.contains('\u{1b}'));
}
