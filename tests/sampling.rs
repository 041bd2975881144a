//! The sampling knobs, each on its own and together.

use ma2mba::sample::{
    Sampler, SamplingConfig, apply_repetition_penalty, apply_temperature, argmax, min_p_filter,
    softmax, top_k_filter, top_p_filter,
};

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn kept(logits: &[f32]) -> Vec<usize> {
    (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect()
}

#[test]
fn top_p_keeps_the_smallest_set_with_enough_mass() {
    let probs = [0.1, 0.4, 0.05, 0.3, 0.15];
    // Ranked: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05).
    for (p, want) in [
        (0.3, vec![1]),
        (0.399, vec![1]),
        (0.41, vec![1, 3]),
        (0.699, vec![1, 3]),
        (0.71, vec![1, 3, 4]),
        (0.9, vec![0, 1, 3, 4]),
        (0.96, vec![0, 1, 2, 3, 4]),
        (1.0, vec![0, 1, 2, 3, 4]),
    ] {
        let mut l = logits_of(&probs);
        top_p_filter(&mut l, p as f32);
        assert_eq!(kept(&l), want, "top-p {p}");
        // The kept set's mass reaches p, and dropping its least likely member would not.
        let mass: f64 = want.iter().map(|&i| probs[i]).sum();
        assert!(mass >= p - 1e-6);
        let least = want.iter().map(|&i| probs[i]).fold(f64::INFINITY, f64::min);
        assert!(mass - least < p - 1e-6 || want.len() == 1);
    }
    // A tiny p keeps the single most likely token.
    let mut l = logits_of(&probs);
    top_p_filter(&mut l, 1e-6);
    assert_eq!(kept(&l), vec![1]);
}

#[test]
fn min_p_is_relative_to_the_top_probability() {
    let probs = [0.5, 0.2, 0.1, 0.05, 0.15];
    let mut l = logits_of(&probs);
    // Threshold 0.29 * 0.5 = 0.145: keeps 0.5, 0.2 and 0.15.
    min_p_filter(&mut l, 0.29);
    assert_eq!(kept(&l), vec![0, 1, 4]);
    // In a flat distribution a high min-p still keeps every token near the top: the cut
    // follows the top probability, not a fixed mass or count.
    let flat = [0.22, 0.2, 0.2, 0.19, 0.19];
    let mut l = logits_of(&flat);
    min_p_filter(&mut l, 0.9);
    assert_eq!(kept(&l), vec![0, 1, 2]);
    let mut l = logits_of(&probs);
    min_p_filter(&mut l, 0.0);
    assert_eq!(kept(&l).len(), 5);
    let mut l = logits_of(&probs);
    min_p_filter(&mut l, 1.0);
    assert_eq!(kept(&l), vec![0]);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut l = vec![2.0f32, -2.0, 3.0, -1.0, 0.0];
    apply_repetition_penalty(&mut l, &[0, 1, 1, 4], 2.0);
    // Seen: 0 (positive: halved), 1 (negative: doubled, once however often seen), 4 (zero).
    assert_eq!(l, vec![1.0, -4.0, 3.0, -1.0, 0.0]);
    let mut l = vec![2.0f32, -2.0];
    apply_repetition_penalty(&mut l, &[0, 1, 99], 1.0);
    assert_eq!(l, vec![2.0, -2.0]);
    // It changes the greedy choice when the best token was seen.
    let mut s = Sampler::new(
        SamplingConfig {
            repetition_penalty: 1.5,
            ..SamplingConfig::default()
        },
        0,
    );
    assert_eq!(s.sample(&[3.0, 2.5, 0.0], &[]), 0);
    assert_eq!(s.sample(&[3.0, 2.5, 0.0], &[0]), 1);
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let mut l = vec![0.5f32, 3.0, -1.0, 2.0, 2.0];
    top_k_filter(&mut l, 2);
    assert_eq!(kept(&l), vec![1, 3], "ties go to the lower index");
    let mut l = vec![0.5f32, 3.0, -1.0];
    top_k_filter(&mut l, 0);
    assert_eq!(kept(&l).len(), 3);
    // Sampling with top-k 1 is greedy whatever the temperature.
    let mut s = Sampler::new(
        SamplingConfig {
            temperature: 5.0,
            top_k: 1,
            ..SamplingConfig::default()
        },
        3,
    );
    for _ in 0..50 {
        assert_eq!(s.sample(&[0.1, 0.3, 0.2], &[]), 1);
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let l = vec![1.0f32, 2.0, 0.0];
    let mut cold = l.clone();
    apply_temperature(&mut cold, 0.5);
    assert_eq!(cold, vec![2.0, 4.0, 0.0]);
    let p1 = softmax(&l);
    let pc = softmax(&cold);
    let mut hot = l.clone();
    apply_temperature(&mut hot, 4.0);
    let ph = softmax(&hot);
    assert!(pc[1] > p1[1] && p1[1] > ph[1]);
    // Temperature 0 is greedy.
    let mut s = Sampler::new(SamplingConfig::default(), 0);
    assert!(s.config.is_greedy());
    assert_eq!(s.sample(&l, &[]), argmax(&l));
    // Empirical frequencies follow softmax(l / T).
    let mut s = Sampler::new(
        SamplingConfig {
            temperature: 2.0,
            ..SamplingConfig::default()
        },
        11,
    );
    let n = 20000;
    let mut counts = [0usize; 3];
    for _ in 0..n {
        counts[s.sample(&l, &[]) as usize] += 1;
    }
    let mut scaled = l.clone();
    apply_temperature(&mut scaled, 2.0);
    let want = softmax(&scaled);
    for i in 0..3 {
        let f = counts[i] as f64 / n as f64;
        assert!((f - want[i]).abs() < 0.015, "{counts:?} vs {want:?}");
    }
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.9,
        min_p: 0.01,
        repetition_penalty: 1.1,
    };
    let mut rng = runtime::init::Rng::new(1);
    let rows: Vec<Vec<f32>> = (0..40)
        .map(|_| (0..100).map(|_| rng.normal() as f32 * 2.0).collect())
        .collect();
    let run = |seed: u64| {
        let mut s = Sampler::new(cfg.clone(), seed);
        let mut seen = Vec::new();
        for r in &rows {
            let t = s.sample(r, &seen);
            seen.push(t);
        }
        seen
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn the_filters_compose_and_ranges_are_checked() {
    // top-k 3 then top-p 0.5 then min-p: each only removes.
    let probs = [0.3, 0.25, 0.2, 0.15, 0.1];
    let mut l = logits_of(&probs);
    top_k_filter(&mut l, 3);
    top_p_filter(&mut l, 0.5);
    assert_eq!(kept(&l), vec![0, 1]);
    min_p_filter(&mut l, 0.9);
    assert_eq!(kept(&l), vec![0]);
    for bad in [
        SamplingConfig {
            temperature: -1.0,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            top_p: 1.5,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            min_p: -0.1,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            repetition_penalty: 0.0,
            ..SamplingConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(SamplingConfig::default().validate().is_ok());
}
