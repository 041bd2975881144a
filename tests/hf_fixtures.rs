//! End to end against an independent implementation: tiny Mamba-1 and Mamba-2 models with
//! random weights, built and run by Hugging Face transformers 5.17 in float64
//! (`scripts/make_fixtures.py`, run on the GPU machine). ma2mba loads the same config.json and
//! safetensors and must give the same logits.

use ma2mba::model::{Backend, LoadOptions, Model};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(name: &str) -> (String, Vec<Vec<u32>>, Vec<f64>) {
    let dir = format!("{ROOT}/tests/fixtures/{name}");
    let tokens: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/tokens.json")).unwrap())
            .unwrap();
    let ck = runtime::weights::Checkpoint::open(std::path::Path::new(&format!(
        "{dir}/logits.safetensors"
    )))
    .unwrap();
    let logits = ck.get("logits").expect("logits tensor").to_f64().unwrap();
    (dir, tokens, logits)
}

/// ‖got − want‖ / ‖want‖ and the largest elementwise difference.
fn rel_err(got: &[f32], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let mut num = 0.0;
    let mut den = 0.0;
    let mut worst: f64 = 0.0;
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite logit");
        num += (g as f64 - w).powi(2);
        den += w * w;
        worst = worst.max((g as f64 - w).abs());
    }
    ((num / den).sqrt(), worst)
}

fn check(name: &str, backend: Backend, max_rel: f64) {
    let (dir, tokens, want) = fixture(name);
    let opts = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    let mut m = Model::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let got = m.forward(&tokens).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        (got.batch, got.seq, got.vocab),
        (tokens.len(), tokens[0].len(), 64)
    );
    let (rel, worst) = rel_err(&got.data, &want);
    println!("{name} {backend:?}: relative error {rel:.3e}, max |diff| {worst:.3e}");
    assert!(
        rel <= max_rel,
        "{name} {backend:?}: relative error {rel:.3e} > {max_rel:.0e} (max |diff| {worst:.3e})"
    );
}

#[test]
fn interpreter_matches_transformers() {
    // transformers' Mamba casts the residual stream and the RMSNorm input to float32 even in
    // a float64 model (`residual_in_fp32`, `MambaRMSNorm`), so its "f64" logits carry f32
    // rounding: the comparison is normwise at the f32 level, for both backends.
    for name in ["tiny-mamba", "tiny-mamba2"] {
        let (dir, tokens, want) = fixture(name);
        let opts = LoadOptions {
            backend: Backend::Interp,
            ..LoadOptions::default()
        };
        let m = Model::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got: Vec<f32> = m
            .forward_reference(&tokens)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        let (rel, worst) = rel_err(&got, &want);
        println!("{name} interpreter (f64): relative error {rel:.3e}, max |diff| {worst:.3e}");
        assert!(rel <= 1e-6, "{name}: relative error {rel:.3e}");
    }
}

#[test]
fn cranelift_matches_transformers_in_f32() {
    check("tiny-mamba", Backend::Cranelift, 1e-4);
    check("tiny-mamba2", Backend::Cranelift, 1e-4);
}

#[test]
fn gradients_match_transformers_autograd() {
    // transformers computes the loss from float32-cast logits and keeps its f32 casts of the
    // residual stream, so the comparison is at the f32 level: normwise relative error per
    // tensor.
    for name in ["tiny-mamba", "tiny-mamba2"] {
        let (dir, tokens, _) = fixture(name);
        let opts = LoadOptions {
            backend: Backend::Interp,
            ..LoadOptions::default()
        };
        let m = Model::load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = m
            .grad_reference(&tokens)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let loss: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/loss.json")).unwrap())
                .unwrap();
        let want_loss = loss["loss"].as_f64().unwrap();
        assert!(
            (got.loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
            "{name}: loss {} vs {want_loss}",
            got.loss
        );
        let ck = runtime::weights::Checkpoint::open(std::path::Path::new(&format!(
            "{dir}/grads.safetensors"
        )))
        .unwrap();
        assert_eq!(
            got.grads.len(),
            ck.names().count(),
            "{name}: one gradient per parameter"
        );
        let mut worst = (String::new(), 0.0f64);
        for (pname, _, g) in &got.grads {
            // The checkpoint-name aliasing (embedding vs embeddings) applies to the grads too.
            let want = ck
                .lookup(pname)
                .unwrap_or_else(|| panic!("{name}: no gradient `{pname}` in the fixture"));
            let want = want.to_f64().unwrap();
            assert_eq!(want.len(), g.len(), "{pname}");
            let num: f64 = g.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = want.iter().map(|b| b * b).sum();
            let rel = (num / den.max(1e-300)).sqrt();
            if rel > worst.1 {
                worst = (pname.clone(), rel);
            }
        }
        println!(
            "{name}: loss {:.9} (transformers {want_loss:.9}); worst gradient relative error {:.3e} ({})",
            got.loss, worst.1, worst.0
        );
        assert!(
            worst.1 <= 1e-5,
            "{name}: gradient of {} off by {:.3e}",
            worst.0,
            worst.1
        );
    }
}
