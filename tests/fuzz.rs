//! Whatever the input, the frontend answers with a graph or diagnostics, never a panic or a
//! stack overflow.

mod common;

use proptest::prelude::*;

/// The library with its big presets dropped, so each case elaborates small models quickly.
fn small_library() -> String {
    frontend::LIBRARY
        .lines()
        .filter(|l| !(l.starts_with("preset \"mamba")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn compile_never_panics(text: &str) {
    let (sources, r) = common::compile_source(text);
    if let Err(d) = &r {
        assert!(!d.is_empty(), "an error without a diagnostic");
        // Rendering must not panic either, whatever the spans.
        let _ = frontend::render(d, &sources, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        compile_never_panics(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_library(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<prop::sample::Index>()), 1..4)
    ) {
        let mut text: Vec<char> = small_library().chars().collect();
        let alphabet: Vec<char> = "()[]{},:=.+-*/%!<>#\"0123456789 \nabzBLE_".chars().collect();
        for (pos, kind, pick) in edits {
            if text.is_empty() { break; }
            let i = pos.index(text.len());
            match kind {
                0 => { text.remove(i); }
                1 => text.insert(i, alphabet[pick.index(alphabet.len())]),
                2 => text[i] = alphabet[pick.index(alphabet.len())],
                _ => { let j = pick.index(text.len()); let c = text[j]; text.insert(i, c); }
            }
        }
        compile_never_panics(&text.into_iter().collect::<String>());
    }
}

#[test]
fn deep_nesting_is_a_limit_error_not_a_stack_overflow() {
    let cases = [
        format!("model m() {{ let x = {} }}", "(".repeat(100_000)),
        format!("model m() {{ let x = {} }}", "[".repeat(100_000)),
        format!("model m() {{ let x = {}1 }}", "-".repeat(100_000)),
        format!("model m() {{ {} }}", "repeat 1 { ".repeat(50_000)),
        format!("model m() {{ {} }}", "if true { ".repeat(50_000)),
        "{".repeat(100_000),
    ];
    for text in cases {
        let (_, r) = common::compile_source(&text);
        let d = r.expect_err("deep input is an error");
        assert!(
            d.iter().any(|d| d.code == frontend::Code::Limit),
            "{:?}",
            d.iter().map(|d| &d.message).collect::<Vec<_>>()
        );
    }
}

#[test]
fn huge_file_is_a_limit_error() {
    let text = format!("model m() {{ }}\n{}", "# padding\n".repeat(500_000));
    let (_, r) = common::compile_source(&text);
    let d = r.expect_err("too large");
    assert!(d.iter().any(|d| d.code == frontend::Code::Limit));
}
