//! `ma2mba generate` and the tokenizer: a small WordLevel tokenizer built with the
//! `tokenizers` API, saved as `tokenizer.json` beside a model, found by the directory lookup,
//! and used end to end; `--tokens` and `--json` on a model without a tokenizer; bad input.

mod common;

use ma2mba::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ma2mba-gen-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Words `w0`..`w59` plus `<|endoftext|>` (id 60), split on whitespace.
fn build_tokenizer(path: &Path) {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let mut vocab: HashMap<String, u32> = (0..60).map(|i| (format!("w{i}"), i)).collect();
    vocab.insert("<|endoftext|>".into(), 60);
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<|endoftext|>".into())
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_pre_tokenizer(Some(Whitespace {}));
    t.add_special_tokens([tokenizers::AddedToken::from("<|endoftext|>", true)])
        .unwrap();
    t.save(path, false).unwrap();
}

/// A model directory: the tiny-mamba fixture's config and weights, and a tokenizer.
fn model_dir(tag: &str) -> PathBuf {
    let d = temp_dir(tag);
    let src = format!("{ROOT}/tests/fixtures/tiny-mamba");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(format!("{src}/{f}"), d.join(f)).unwrap();
    }
    build_tokenizer(&d.join("tokenizer.json"));
    d
}

#[test]
fn tokenizer_is_found_beside_the_model_and_round_trips() {
    let d = model_dir("lookup");
    let spec = d.to_str().unwrap();
    let t = Tokenizer::for_model(spec, Some(&d), 64, false)
        .unwrap()
        .expect("found in the model directory");
    assert_eq!(t.path(), d.join("tokenizer.json"));
    assert_eq!(t.vocab_size(), 61);
    let ids = t.encode("w3 w17  w59\tw0").unwrap();
    assert_eq!(ids, vec![3, 17, 59, 0]);
    assert_eq!(t.decode(&ids).unwrap(), "w3 w17 w59 w0");
    assert_eq!(t.eos_token_id(), Some(60));
    // Special tokens are skipped when decoding.
    assert_eq!(t.decode(&[5, 60, 6]).unwrap(), "w5 w6");
    // No tokenizer: none found, without asking the hub.
    assert!(
        Tokenizer::for_model("tiny-mamba", None, 64, false)
            .unwrap()
            .is_none()
    );
    let empty = temp_dir("empty");
    assert!(
        Tokenizer::for_model(empty.to_str().unwrap(), Some(&empty), 64, true)
            .unwrap()
            .is_none()
    );
    // A corrupt tokenizer.json is an error naming the file.
    std::fs::write(empty.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::for_model("x", Some(&empty), 64, false).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&d).ok();
    std::fs::remove_dir_all(&empty).ok();
}

/// A byte-level BPE, the kind GPT-NeoX uses (its pre-tokenizer regex needs lookahead, which
/// the pure-Rust build gets from fancy-regex): merges apply, `Ġ` carries the space, and a
/// character split over two byte tokens decodes whole once both are there.
#[test]
fn byte_level_bpe_round_trips() {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let d = temp_dir("bpe");
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, t) in ["a", "b", "Ġ", "ab", "Ġab", "Ã", "©"].iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    let merges = vec![
        ("a".to_string(), "b".to_string()),
        ("Ġ".to_string(), "ab".to_string()),
    ];
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    t.save(d.join("tokenizer.json"), true).unwrap();
    let t = Tokenizer::for_model("x", Some(&d), 64, false)
        .unwrap()
        .unwrap();
    assert_eq!(t.encode("ab ab").unwrap(), vec![3, 4]);
    assert_eq!(t.decode(&[3, 4, 4]).unwrap(), "ab ab ab");
    // "é" is the bytes C3 A9, byte-level characters Ã and ©.
    assert_eq!(t.encode("é").unwrap(), vec![5, 6]);
    assert_eq!(t.decode(&[5, 6]).unwrap(), "é");
    assert!(t.decode(&[5]).unwrap().ends_with('\u{FFFD}'));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn generate_from_text_with_the_directory_tokenizer() {
    let d = model_dir("text");
    let spec = d.to_str().unwrap();
    let out = common::cli(&[
        "generate",
        spec,
        "--prompt",
        "w15 w23 w19 w26 w10 w6 w10 w39 w57 w58 w23 w50 w45",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    // The prompt is the fixture's first sequence: the greedy continuation is transformers'.
    assert_eq!(
        v["ids"],
        serde_json::json!([45, 48, 48, 48, 48, 48, 48, 48])
    );
    assert_eq!(v["text"], "w45 w48 w48 w48 w48 w48 w48 w48");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["timings"]["prefill_tokens"], 13);
    assert_eq!(v["timings"]["decode_steps"], 7);
    assert!(v["timings"]["ms_per_token"].as_f64().unwrap() > 0.0);

    // Streaming text, then the timing line on stderr.
    let out = common::cli(&[
        "generate",
        spec,
        "--prompt",
        "w15 w23 w19 w26 w10 w6 w10 w39 w57 w58 w23 w50 w45",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "w45 w48 w48 w48 w48 w48 w48 w48");
    assert!(out.stderr.contains("ms/token"), "{}", out.stderr);
    assert!(out.stderr.contains("tokens/s"), "{}", out.stderr);
    assert!(out.stderr.contains("prefill 13 tokens"), "{}", out.stderr);

    // A stop string cuts the text; the eos from config.json (0) is not reached.
    let out = common::cli(&[
        "generate",
        spec,
        "--prompt",
        "w15 w23 w19 w26 w10 w6 w10 w39 w57 w58 w23 w50 w45",
        "--max-new-tokens",
        "8",
        "--stop",
        " w48 w48",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["text"], "w45");
    assert_eq!(v["finish_reason"], "stop");
    assert_eq!(v["ids"], serde_json::json!([45, 48, 48]));

    // A batch of prompts of different lengths.
    let out = common::cli(&[
        "generate",
        spec,
        "--prompt",
        "w1 w2 w3",
        "--prompt",
        "w4 w5 w6 w7 w8",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 2);
    assert_eq!(v["text"].as_array().unwrap().len(), 2);
    assert_eq!(v["timings"]["prefill_tokens"], 8);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn generate_with_token_ids() {
    let fx = format!("{ROOT}/tests/fixtures/tiny-mamba2");
    let prompt = "45 41 14 41 26 44 54 48 12 5 59 45 46";
    let out = common::cli(&["generate", &fx, "--tokens", prompt, "--max-new-tokens", "8"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // transformers' greedy continuation of this prompt (generate.json, sequence 1).
    assert_eq!(out.stdout.trim(), "46 46 46 46 46 46 46 46");
    let out = common::cli(&[
        "generate",
        "tiny-mamba",
        "--tokens",
        "1 2 3",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 5);
    assert!(v.get("text").is_none(), "no tokenizer, no text");
    assert_eq!(v["prompt_ids"], serde_json::json!([1, 2, 3]));
    for k in ["prefill_ms", "ms_per_token", "tokens_per_s"] {
        assert!(v["timings"][k].is_number(), "{k}");
    }
    // The same seed gives the same ids.
    let again = common::cli(&[
        "generate",
        "tiny-mamba",
        "--tokens",
        "1 2 3",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "3",
        "--json",
    ]);
    let w: serde_json::Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(v["ids"], w["ids"]);
}

#[test]
fn generate_rejects_bad_input() {
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "tiny-mamba"], "give a prompt"),
        (
            &["generate", "tiny-mamba", "--tokens", "1 x 3"],
            "not a token id",
        ),
        (
            &["generate", "tiny-mamba", "--tokens", "1 2 900"],
            "outside the vocabulary",
        ),
        (
            &["generate", "tiny-mamba", "--prompt", "hi"],
            "no tokenizer",
        ),
        (
            &[
                "generate",
                "tiny-mamba",
                "--tokens",
                "1",
                "--device",
                "cuda",
            ],
            "built without the cuda feature",
        ),
        (
            &["generate", "tiny-mamba", "--tokens", "1", "--top-p", "0"],
            "top-p",
        ),
        (
            &["generate", "tiny-mamba", "--tokens", "1", "--stop", "x"],
            "tokenizer",
        ),
        (
            &["generate", "no-such-model", "--tokens", "1"],
            "no-such-model",
        ),
        (
            &[
                "generate",
                "tiny-mamba",
                "--tokens",
                "1",
                "--tokenizer",
                "/nonexistent/tokenizer.json",
            ],
            "cannot read",
        ),
    ];
    for (args, want) in cases {
        // With the feature the GPU case may succeed (tests/gpu.rs covers it).
        if cfg!(feature = "cuda") && args.contains(&"cuda") {
            continue;
        }
        let out = common::cli(args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{args:?}");
    }
}

#[test]
fn train_reads_text_through_the_tokenizer() {
    let d = model_dir("train-text");
    // A repetitive text over the tokenizer's words: learnable next-word prediction.
    let text: String = (0..400).map(|i| format!("w{} ", (i * 7) % 13)).collect();
    let data = d.join("corpus.txt");
    std::fs::write(&data, text).unwrap();
    let dir = d.to_str().unwrap();
    let out = common::cli(&[
        "train",
        dir,
        "--data",
        data.to_str().unwrap(),
        "--text",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--steps",
        "6",
        "--log-every",
        "3",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("trained steps 0..6"), "{}", out.stdout);
    // An explicit tokenizer file works too; text without any tokenizer is a clear error.
    let tok = d.join("tokenizer.json");
    let out = common::cli(&[
        "train",
        "tiny-mamba",
        "--data",
        data.to_str().unwrap(),
        "--text",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--seq-len",
        "8",
        "--steps",
        "2",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = common::cli(&[
        "train",
        "tiny-mamba",
        "--data",
        data.to_str().unwrap(),
        "--text",
        "--seq-len",
        "8",
    ]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no tokenizer"), "{}", out.stderr);
    std::fs::remove_dir_all(&d).ok();
}
