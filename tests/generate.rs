//! Generation: the derived recurrent step against the parallel forward, prefill + steps,
//! greedy decoding against transformers' `generate`, batches of different lengths, and the
//! state as a value (clone, save, load, regroup).

use ma2mba::generate::{FinishReason, GenerateConfig};
use ma2mba::model::{Backend, LoadOptions, Logits, Model};
use ma2mba::state::State;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The scan row of RELIABILITY.md's tolerance table: f32 (6e-4, 2e-3), f64 (1e-10, 1e-10).
const F32_SCAN: (f64, f64) = (6e-4, 2e-3);
const F64_SCAN: (f64, f64) = (1e-10, 1e-10);

fn load(name: &str, backend: Backend) -> Model {
    Model::load(
        name,
        &LoadOptions {
            backend,
            seed: 5,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn random_tokens(seed: u64, b: usize, l: usize) -> Vec<Vec<u32>> {
    let mut rng = runtime::init::Rng::new(seed);
    (0..b)
        .map(|_| (0..l).map(|_| (rng.next_u64() % 61) as u32).collect())
        .collect()
}

/// |got - want| <= atol + rtol * |want| everywhere; reports max and mean |diff| and the worst
/// index before failing.
fn assert_close(what: &str, got: &[f32], want: &[f32], (atol, rtol): (f64, f64)) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut worst, mut worst_i, mut max, mut sum) = (f64::NEG_INFINITY, 0, 0.0f64, 0.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan() && !w.is_nan(), "{what}[{i}] is NaN");
        let d = (g as f64 - w as f64).abs();
        max = max.max(d);
        sum += d;
        let excess = d - (atol + rtol * (w as f64).abs());
        if excess > worst {
            (worst, worst_i) = (excess, i);
        }
    }
    println!(
        "{what}: max |diff| {max:.3e}, mean {:.3e}",
        sum / got.len() as f64
    );
    assert!(
        worst <= 0.0,
        "{what}: worst index {worst_i}: got {} want {} (max |diff| {max:.3e}, mean {:.3e})",
        got[worst_i],
        want[worst_i],
        sum / got.len() as f64
    );
}

/// Logits of every position, one `step` call per token.
fn stepwise(m: &mut Model, tokens: &[Vec<u32>], state: &mut State) -> Vec<Logits> {
    let l = tokens[0].len();
    (0..l)
        .map(|t| {
            let col: Vec<u32> = tokens.iter().map(|s| s[t]).collect();
            m.step(&col, state).expect("step runs")
        })
        .collect()
}

fn step_matches_forward(name: &str, backend: Backend, tol: (f64, f64)) {
    let mut m = load(name, backend);
    let tokens = random_tokens(11, 2, 13);
    let whole = m.forward(&tokens).unwrap();
    let mut state = m.new_state(2);
    let steps = stepwise(&mut m, &tokens, &mut state);
    for (t, s) in steps.iter().enumerate() {
        assert_eq!((s.batch, s.seq, s.vocab), (2, 1, whole.vocab));
        for b in 0..2 {
            assert_close(
                &format!("{name} {backend:?} step {t} seq {b}"),
                s.at(b, 0),
                whole.at(b, t),
                tol,
            );
        }
    }
    // The final states equal the parallel form's.
    let mut prefilled = m.new_state(2);
    m.prefill(&tokens, &mut prefilled).unwrap();
    for n in state.names() {
        assert_close(
            &format!("{name} {backend:?} final {n}"),
            state.get(n).unwrap().1,
            prefilled.get(n).unwrap().1,
            tol,
        );
    }
}

#[test]
fn step_by_step_equals_parallel_forward() {
    step_matches_forward("tiny-mamba", Backend::Cranelift, F32_SCAN);
    step_matches_forward("tiny-mamba2", Backend::Cranelift, F32_SCAN);
}

/// The derived step graph itself, in f64 with the reference interpreter and states carried
/// in f64: token by token equals the parallel graph to the f64 scan tolerance.
fn step_graph_matches_in_f64(name: &str) {
    use runtime::array::Array;
    use runtime::interp::{Bindings, run};
    let mut m = load(name, Backend::Interp);
    let step = m.step_graph().unwrap().clone();
    let params = runtime::init::init_params(&m.graph, 5);
    let tokens = random_tokens(13, 2, 9);
    let (b, l) = (2, 9);
    let ids = |t0: usize, t1: usize| {
        let v = tokens
            .iter()
            .flat_map(|s| s[t0..t1].iter().map(|&x| x as f64))
            .collect();
        Array::new(vec![b, t1 - t0], v)
    };
    let whole = run(
        &m.graph,
        &Bindings {
            inputs: [("input_ids".to_string(), ids(0, l))].into(),
            params: params.clone(),
            states: Default::default(),
        },
    )
    .unwrap();
    let want = whole.get("logits").unwrap();
    let vocab = want.shape[2];
    let mut states = std::collections::HashMap::new();
    for t in 0..l {
        let outs = run(
            &step,
            &Bindings {
                inputs: [("input_ids".to_string(), ids(t, t + 1))].into(),
                params: params.clone(),
                states: states.clone(),
            },
        )
        .unwrap();
        states.clear();
        for (n, a) in outs.values {
            if n == "logits" {
                for bi in 0..b {
                    let got: Vec<f32> = a.data[bi * vocab..(bi + 1) * vocab]
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    let w0 = (bi * l + t) * vocab;
                    let w: Vec<f32> = want.data[w0..w0 + vocab]
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    let worst = a.data[bi * vocab..(bi + 1) * vocab]
                        .iter()
                        .zip(&want.data[w0..w0 + vocab])
                        .map(|(g, e)| (g - e).abs() - (F64_SCAN.0 + F64_SCAN.1 * e.abs()))
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert!(
                        worst <= 0.0,
                        "{name} f64 step {t} seq {bi}: beyond tolerance by {worst:e}"
                    );
                    assert_close(&format!("{name} f64 step {t}"), &got, &w, F32_SCAN);
                }
            } else {
                states.insert(n, a);
            }
        }
    }
}

#[test]
fn step_by_step_equals_parallel_forward_f64() {
    step_graph_matches_in_f64("tiny-mamba");
    step_graph_matches_in_f64("tiny-mamba2");
}

#[test]
fn step_on_the_interpreter_backend() {
    step_matches_forward("tiny-mamba2", Backend::Interp, F32_SCAN);
}

#[test]
fn the_step_graph_is_the_model_with_one_token() {
    let mut m = load("tiny-mamba2", Backend::Cranelift);
    let g = m.step_graph().unwrap().clone();
    ir::verify(&g).unwrap();
    let ids = g
        .nodes()
        .find_map(|n| match g.op(n) {
            ir::Op::Input { name, ty, .. } if name == "input_ids" => Some(ty.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(ir::shape_to_string(&ids.shape), "[B, 1]");
    // Nothing in it depends on the sequence length any more.
    assert!(g.nodes().all(|n| {
        g.types(n)
            .iter()
            .all(|t| t.shape.iter().all(|d| !d.syms().iter().any(|s| s == "L")))
    }));
    let lowered = passes::lower(&g, &passes::LowerOptions::default()).unwrap();
    assert_eq!(lowered.syms, vec!["B".to_string()]);
}

/// Prefill over a prompt, then steps over the continuation, give the logits of one forward
/// pass over prompt + continuation.
fn prefill_then_steps(name: &str) {
    let mut m = load(name, Backend::Cranelift);
    let all = random_tokens(23, 3, 14);
    let cut = 9;
    let whole = m.forward(&all).unwrap();
    let prompt: Vec<Vec<u32>> = all.iter().map(|s| s[..cut].to_vec()).collect();
    let rest: Vec<Vec<u32>> = all.iter().map(|s| s[cut..].to_vec()).collect();
    let mut state = m.new_state(3);
    let pre = m.prefill(&prompt, &mut state).unwrap();
    for b in 0..3 {
        for t in 0..cut {
            assert_close(
                &format!("{name} prefill {b} {t}"),
                pre.at(b, t),
                whole.at(b, t),
                F32_SCAN,
            );
        }
    }
    for (i, s) in stepwise(&mut m, &rest, &mut state).iter().enumerate() {
        for b in 0..3 {
            assert_close(
                &format!("{name} step {} seq {b}", cut + i),
                s.at(b, 0),
                whole.at(b, cut + i),
                F32_SCAN,
            );
        }
    }
}

#[test]
fn prefill_plus_steps_equals_one_forward() {
    prefill_then_steps("tiny-mamba");
    prefill_then_steps("tiny-mamba2");
}

fn greedy_matches_transformers(name: &str) {
    let dir = format!("{ROOT}/tests/fixtures/{name}");
    let prompts: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/tokens.json")).unwrap())
            .unwrap();
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/generate.json")).unwrap())
            .unwrap();
    let max_new_tokens = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let want: Vec<Vec<u32>> = serde_json::from_value(fx["sequences"].clone()).unwrap();
    let mut m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens,
        // transformers stops at the config's eos; the fixture never reaches it.
        eos_token_id: m.eos_token_id,
        ..GenerateConfig::default()
    };
    let mut streamed = vec![Vec::new(); prompts.len()];
    let g = m
        .generate(&prompts, &cfg, |t| {
            streamed[t.sequence].push(t.id);
            true
        })
        .unwrap();
    for (i, s) in g.sequences.iter().enumerate() {
        let mut full = s.prompt.clone();
        full.extend(&s.tokens);
        assert_eq!(full, want[i], "{name}: sequence {i}");
        assert_eq!(streamed[i], s.tokens, "{name}: streamed tokens");
        assert_eq!(s.finish, FinishReason::Length);
    }
    assert_eq!(g.timings.prefill_tokens, 2 * 13);
    assert_eq!(g.timings.decode_steps, max_new_tokens - 1);
    // Each prompt alone gives the same continuation as in the batch.
    for (i, p) in prompts.iter().enumerate() {
        let one = m.generate(std::slice::from_ref(p), &cfg, |_| true).unwrap();
        assert_eq!(one.sequences[0].tokens, g.sequences[i].tokens);
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    greedy_matches_transformers("tiny-mamba");
    greedy_matches_transformers("tiny-mamba2");
}

/// Greedy continuation by re-running the whole forward pass for every new token.
fn greedy_by_forward(m: &mut Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let l = m.forward(std::slice::from_ref(&seq)).unwrap();
        seq.push(ma2mba::sample::argmax(l.at(0, seq.len() - 1)));
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn batch_of_different_lengths() {
    for name in ["tiny-mamba", "tiny-mamba2"] {
        let mut m = load(name, Backend::Cranelift);
        let mut prompts = random_tokens(31, 4, 11);
        prompts[0].truncate(3);
        prompts[2].truncate(7);
        prompts[3].truncate(3);
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            ..GenerateConfig::default()
        };
        let g = m.generate(&prompts, &cfg, |_| true).unwrap();
        assert_eq!(g.timings.prefill_tokens, 3 + 11 + 7 + 3);
        for (i, p) in prompts.iter().enumerate() {
            let want = greedy_by_forward(&mut m, p, 6);
            assert_eq!(g.sequences[i].tokens, want, "{name}: prompt {i}");
            assert_eq!(&g.sequences[i].prompt, p);
        }
    }
}

#[test]
fn sequences_leave_the_batch_at_eos_and_sampling_is_seeded() {
    let mut m = load("tiny-mamba", Backend::Cranelift);
    let prompts = random_tokens(41, 3, 5);
    let greedy = m
        .generate(
            &prompts,
            &GenerateConfig {
                max_new_tokens: 5,
                ..GenerateConfig::default()
            },
            |_| true,
        )
        .unwrap();
    // Make sequence 1's third token the eos: it stops there, the others run on.
    let eos = greedy.sequences[1].tokens[2];
    let cfg = GenerateConfig {
        max_new_tokens: 5,
        eos_token_id: Some(eos),
        ..GenerateConfig::default()
    };
    let g = m.generate(&prompts, &cfg, |_| true).unwrap();
    assert_eq!(g.sequences[1].finish, FinishReason::Eos);
    for i in 0..3 {
        let want = &greedy.sequences[i].tokens;
        let cut = want.iter().position(|&t| t == eos).map_or(5, |p| p + 1);
        assert_eq!(g.sequences[i].tokens, want[..cut], "sequence {i}");
        let reason = if cut < 5 || want[4] == eos {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(g.sequences[i].finish, reason);
    }

    // Sampling: the same seed gives the same tokens, another seed other tokens.
    let sample = |m: &mut Model, seed: u64| {
        let cfg = GenerateConfig {
            max_new_tokens: 12,
            seed,
            sampling: ma2mba::sample::SamplingConfig {
                temperature: 1.5,
                top_k: 40,
                top_p: 0.95,
                ..Default::default()
            },
            ..GenerateConfig::default()
        };
        m.generate(&prompts, &cfg, |_| true)
            .unwrap()
            .sequences
            .into_iter()
            .map(|s| s.tokens)
            .collect::<Vec<_>>()
    };
    let a = sample(&mut m, 7);
    assert_eq!(a, sample(&mut m, 7));
    assert_ne!(a, sample(&mut m, 8));

    // The callback stops everything.
    let mut count = 0;
    let g = m
        .generate(&prompts, &cfg, |_| {
            count += 1;
            count < 4
        })
        .unwrap();
    assert_eq!(count, 4);
    assert!(
        g.sequences
            .iter()
            .any(|s| s.finish == FinishReason::Cancelled)
    );
}

#[test]
fn state_is_a_value_clone_save_restore_regroup() {
    let mut m = load("tiny-mamba2", Backend::Cranelift);
    let tokens = random_tokens(51, 2, 6);
    let mut state = m.new_state(2);
    m.prefill(&tokens, &mut state).unwrap();
    assert_eq!(state.batch(), 2);
    assert_eq!(state.layer(0).len(), 2, "conv and ssm state of layer 0");
    assert_eq!(state.layer(1).len(), 2);
    let saved = state.clone();

    // Continue, restore the clone, continue again: bit-identical.
    let next = [3u32, 9];
    let a = m.step(&next, &mut state).unwrap();
    let mut restored = saved.clone();
    let b = m.step(&next, &mut restored).unwrap();
    assert_eq!(a, b);
    assert_eq!(state, restored);

    // Save to and load from safetensors.
    let dir = std::env::temp_dir().join(format!("ma2mba-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.safetensors");
    saved.save(&path).unwrap();
    let mut loaded = State::load(&path).unwrap();
    assert_eq!(loaded, saved);
    let c = m.step(&next, &mut loaded).unwrap();
    assert_eq!(a, c);

    // Regroup: sequences taken apart and joined again step as in the batch.
    let parts = [saved.sequence(1).unwrap(), saved.sequence(0).unwrap()];
    let mut swapped = State::concat(&parts).unwrap();
    let d = m.step(&[next[1], next[0]], &mut swapped).unwrap();
    assert_eq!(d.at(0, 0), a.at(1, 0));
    assert_eq!(d.at(1, 0), a.at(0, 0));

    // Wrong batch, wrong model, corrupt file: errors, no panic.
    let err = m.step(&[1], &mut saved.clone()).unwrap_err().to_string();
    assert!(err.contains("one token per sequence"), "{err}");
    let mut other = load("tiny-mamba", Backend::Cranelift).new_state(2);
    let err = m.step(&next, &mut other).unwrap_err().to_string();
    assert!(
        err.contains("another model") || err.contains("shape"),
        "{err}"
    );
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    assert!(State::load(&bad).is_err());
    assert!(State::load(&dir.join("missing.safetensors")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_rejects_bad_input() {
    let mut m = load("tiny-mamba", Backend::Cranelift);
    let cfg = GenerateConfig::default();
    let err =
        |r: Result<ma2mba::generate::Generation, ma2mba::model::Error>| r.unwrap_err().to_string();
    assert!(err(m.generate(&[], &cfg, |_| true)).contains("no prompts"));
    assert!(err(m.generate(&[vec![]], &cfg, |_| true)).contains("empty"));
    assert!(err(m.generate(&[vec![1, 500]], &cfg, |_| true)).contains("outside the vocabulary"));
    let stop = GenerateConfig {
        stop_strings: vec!["x".into()],
        ..GenerateConfig::default()
    };
    assert!(err(m.generate(&[vec![1]], &stop, |_| true)).contains("tokenizer"));
    let hot = GenerateConfig {
        sampling: ma2mba::sample::SamplingConfig {
            top_p: 0.0,
            ..Default::default()
        },
        ..GenerateConfig::default()
    };
    assert!(err(m.generate(&[vec![1]], &hot, |_| true)).contains("top-p"));
}
