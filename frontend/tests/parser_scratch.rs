use frontend::lexer::{self, Kind};
use frontend::parse_file;
const FRAGMENTS: &[&str] = &[
    "(", ")", "[", "]", "{", "}", ",", ":", ".", "=", "==", "<", "-", "!", "*", "let", "if",
    "else", "repeat", "as", "return", "param", "model", "preset", "x", "0", "1.5", "\"s\"",
    "\"", "$", "#", "99999999999999999999", "1e", "\n",
];
#[test]
fn scratch() {
    let sample = include_str!("/tmp/sample.m2m");
    let (toks, _) = lexer::lex(sample, 0);
    let mut hist = [0usize; 10];
    let verbose = std::env::var("V").is_ok();
    for t in toks.iter().filter(|t| t.kind != Kind::Eof) {
        let (s, e) = (t.start as usize, t.end as usize);
        let mut variants = vec![(format!("delete `{}`", &sample[s..e]), { let mut x = sample.to_string(); x.replace_range(s..e, ""); x })];
        for f in FRAGMENTS {
            let mut x = sample.to_string(); x.insert_str(s, &format!(" {f} "));
            variants.push((format!("insert `{f}` before `{}`", &sample[s..e]), x));
        }
        for (what, text) in variants {
        let (_, diags) = parse_file(&text, 0);
        hist[diags.len().min(9)] += 1;
        if diags.len() > 2 || (verbose && diags.len() == 2) {
            let line = sample[..s].matches('\n').count() + 1;
            println!("-- {what} line {line}: {}", diags.len());
            for d in &diags { println!("     {}", d.message); }
        }
        }
    }
    println!("{hist:?}");
}
