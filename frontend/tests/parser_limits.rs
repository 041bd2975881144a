//! The parser's limits: nesting depth, file size, token count. Deep inputs must give one
//! `Limit` diagnostic and never overflow the stack (checked on a 2 MiB thread stack, the size
//! of a main thread's stack in the tightest setups, in debug builds).

use frontend::ast::{ExprKind, Item, Stmt};
use frontend::diag::{Code, Diagnostic, Sources, render};
use frontend::parse_file;
use frontend::parser::MAX_DEPTH;

/// Parses `text` on a thread with a 2 MiB stack.
fn parse_small_stack(text: String) -> (frontend::ast::File, Vec<Diagnostic>) {
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || parse_file(&text, 0))
        .expect("spawn a parser thread");
    match handle.join() {
        Ok(r) => r,
        Err(_) => panic!("the parser thread panicked"),
    }
}

fn codes(diags: &[Diagnostic]) -> Vec<Code> {
    diags.iter().map(|d| d.code).collect()
}

fn in_model(body: &str) -> String {
    format!("model m() {{\n  let x = {body}\n}}\n")
}

#[test]
fn deep_parens_brackets_and_unary_chains() {
    let cases = [
        in_model(&"(".repeat(100_000)),
        in_model(&"[".repeat(100_000)),
        in_model(&format!("{}1", "-".repeat(100_000))),
        in_model(&format!("{}x", "!".repeat(100_000))),
        in_model(&format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000))),
        in_model(&format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000))),
        in_model(&format!("{}1{}", "f(".repeat(50_000), ")".repeat(50_000))),
        in_model(&format!("{}1{}", "(-".repeat(50_000), ")".repeat(50_000))),
        in_model(&vec!["1"; 100_000].join(" + ")),
        in_model(&vec!["a"; 100_000].join(" * b - ")),
    ];
    for text in cases {
        let head: String = text.chars().take(40).collect();
        let (file, diags) = parse_small_stack(text);
        assert_eq!(codes(&diags), [Code::Limit], "{head}: {diags:#?}");
        assert_eq!(diags[0].message, "nesting is deeper than 128 levels");
        assert_eq!(file.items.len(), 1, "{head}");
    }
}

#[test]
fn deep_parens_at_top_level_and_unterminated() {
    // Outside a body the first `(` or `{` is already an error: no descent at all, but the
    // skipped region is too deep.
    for junk in ["(", "{", "[", "{("] {
        let (_, diags) = parse_small_stack(junk.repeat(100_000));
        assert_eq!(codes(&diags), [Code::Syntax, Code::Limit], "{junk}");
    }
    let (_, diags) = parse_small_stack(format!("preset \"p\" = m({}", "[".repeat(100_000)));
    assert_eq!(codes(&diags), [Code::Limit]);
    let (_, diags) = parse_small_stack(format!("block b(x = {}) {{}}", "-".repeat(100_000)));
    assert_eq!(codes(&diags), [Code::Limit]);
}

#[test]
fn deep_blocks() {
    // Within the token limit.
    let n = 50_000;
    let cases = [
        format!(
            "model m() {{\n{}\n{}}}\n",
            "repeat 2 {\n".repeat(n),
            "}\n".repeat(n)
        ),
        format!(
            "model m() {{\n{}\n{}}}\n",
            "if a {\n".repeat(n),
            "} else { let y = 1 }\n".repeat(n)
        ),
        format!(
            "model m() {{\n{}}}\n",
            "if a { let x = 1 } else ".repeat(n) + "{ }\n"
        ),
        // Unclosed, so the limit region runs to the end of the file.
        format!("model m() {{\n{}", "repeat 2 {\n".repeat(n)),
        format!("model m() {{\n{}", "if a {} else if b {\n".repeat(n)),
    ];
    for text in cases {
        let head: String = text.chars().take(60).collect();
        let (file, diags) = parse_small_stack(text);
        assert_eq!(
            diags.iter().filter(|d| d.code == Code::Limit).count(),
            1,
            "{head}: {diags:#?}"
        );
        assert!(diags.len() <= 2, "{head}: {diags:#?}");
        assert_eq!(file.items.len(), 1);
    }
    // A bare `{` is not a statement: skipped without descending, but the skipped region is
    // still too deep.
    let (_, diags) = parse_small_stack(format!("model m() {{\n{}", "{".repeat(n)));
    assert_eq!(codes(&diags), [Code::Syntax, Code::Limit]);
}

#[test]
fn closed_deep_blocks_give_only_the_limit() {
    let n = 1000;
    let text = format!(
        "model m() {{\n{}\n{}}}\npreset \"p\" = m()\n",
        "repeat 2 {\n".repeat(n),
        "}\n".repeat(n)
    );
    let (file, diags) = parse_small_stack(text);
    assert_eq!(codes(&diags), [Code::Limit]);
    // The parser is back in sync after the skipped region.
    assert_eq!(file.items.len(), 2);
}

#[test]
fn nesting_within_the_limit_is_fine() {
    // The model body is one level, so 120 parentheses stay within 128.
    let ok = in_model(&format!("{}1{}", "(".repeat(120), ")".repeat(120)));
    let (file, diags) = parse_small_stack(ok);
    assert!(diags.is_empty(), "{diags:?}");
    let Item::Def(d) = &file.items[0] else {
        panic!("expected a def")
    };
    let Stmt::Let { value, .. } = &d.body[0] else {
        panic!("expected a let")
    };
    assert_eq!(value.kind, ExprKind::Int(1));

    let deep = in_model(&format!(
        "{}1{}",
        "(".repeat(MAX_DEPTH as usize),
        ")".repeat(MAX_DEPTH as usize)
    ));
    let (_, diags) = parse_small_stack(deep);
    assert_eq!(codes(&diags), [Code::Limit]);

    let blocks = format!(
        "model m() {{\n{}\n{}}}\n",
        "if a {\n".repeat(100),
        "}\n".repeat(100)
    );
    let (_, diags) = parse_small_stack(blocks);
    assert!(diags.is_empty(), "{diags:?}");
}

#[test]
fn worst_case_mixed_nesting_fits_the_stack() {
    // Alternate every kind of nesting up to the limit, a few times over.
    let mut text = String::from("model m() {\n");
    for _ in 0..20 {
        text.push_str("repeat 2 { if a { ");
    }
    text.push_str("let x = ");
    for _ in 0..40 {
        text.push_str("f(-[!(a + ");
    }
    text.push('1');
    for _ in 0..40 {
        text.push_str(")])");
    }
    for _ in 0..20 {
        text.push_str(" } }");
    }
    text.push_str("\n}\n");
    let (_, diags) = parse_small_stack(text);
    assert_eq!(codes(&diags), [Code::Limit]);
}

#[test]
fn file_too_large() {
    let text = "# padding\n".repeat(500_000);
    assert!(text.len() > 4 << 20);
    let (file, diags) = parse_file(&text, 0);
    assert!(file.items.is_empty());
    assert_eq!(codes(&diags), [Code::Limit]);
    assert!(diags[0].message.contains("4 MiB"), "{}", diags[0].message);
}

#[test]
fn too_many_tokens() {
    let text = format!("model m() {{\n  let x = [{}]\n}}\n", "1,".repeat(600_000));
    assert!(text.len() < 4 << 20);
    let (file, diags) = parse_file(&text, 0);
    assert_eq!(codes(&diags), [Code::Limit], "{diags:#?}");
    assert!(diags[0].message.contains("tokens"));
    assert_eq!(file.items.len(), 1);
}

#[test]
fn render_limit_diagnostics() {
    let text = in_model(&format!("{}1", "-".repeat(300)));
    let (_, diags) = parse_file(&text, 0);
    let mut sources = Sources::new();
    sources.add("deep.m2m", text);
    let out = render(&diags, &sources, false);
    println!("{out}");
    assert!(out.contains("E0103"), "{out}");
}

#[test]
fn many_errors_are_capped() {
    use frontend::lexer::MAX_DIAGNOSTICS;
    for text in [
        "$ ".repeat(900_000),
        format!("model m() {{\n{}}}\n", "let\n".repeat(500_000)),
        format!(
            "model m() {{\n{}}}\n",
            "let x = 99999999999999999999\n".repeat(100_000)
        ),
    ] {
        let (_, diags) = parse_file(&text, 0);
        assert_eq!(diags.len(), MAX_DIAGNOSTICS + 1);
        let last = &diags[MAX_DIAGNOSTICS];
        assert_eq!(last.code, Code::Limit);
        assert!(last.message.starts_with("too many errors"));
    }
}

#[test]
fn large_files_parse_in_reasonable_time() {
    // About 2 MiB of valid definitions (some 800k tokens, within the token limit) and 4 MiB of
    // junk; in a debug build this takes a few seconds at most (no quadratic behaviour).
    let unit = "block b(d, e = 2 * d) {\n  dim B\n  input u: [B, d] f32\n  param w.0: [d, e] = normal(0.02)\n  let y = linear(u, w.0, axis: -1)\n  return y\n}\n";
    let valid = unit.repeat((2 << 20) / unit.len());
    let start = std::time::Instant::now();
    let (file, diags) = parse_file(&valid, 0);
    assert!(diags.is_empty());
    assert!(file.items.len() > 10_000);
    let junk = "f(a, [b + c) * } { let = ) ] ".repeat((4 << 20) / 30 - 1);
    let (_, diags) = parse_file(&junk, 0);
    assert!(!diags.is_empty());
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs() < 60, "{elapsed:?}");
    println!("2 MiB and 4 MiB files parsed in {elapsed:?}");
}
