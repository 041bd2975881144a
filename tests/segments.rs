//! Any layer stack runs over a time segment with carried states: running a sequence in
//! segments, feeding each segment's final conv/ssm states to the next, gives the logits of
//! one run over the whole sequence (compiled CPU path). Exactly for Mamba-1 while the whole
//! run's scans have at most two chunks from a zero state (each chunk's start state is then
//! the sequential one, and every segment scans from its start state sequentially), and for
//! the Mamba-2 SSD's matrix form where the cuts follow its chunks (a segment then computes
//! what the whole run computes for those chunks); otherwise the sums group differently
//! (across chunks, or a cut inside a chunk moves earlier steps from the intra-chunk product
//! into the carried state) and the results agree to f32 rounding.

mod common;

use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use runtime::cpu::HostData;
use std::collections::HashMap;

/// `exact`: bit for bit; else within `1e-4` of the largest magnitude of each output.
fn segments_equal_whole(name: &str, cuts: &[usize], l: usize, exact: bool) {
    let graph = common::compile_name(name).graph;
    let params: HashMap<String, Vec<f32>> = runtime::init::init_params(&graph, 3)
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let cpu = CpuGraph::compile(&graph, &LowerOptions::default()).expect("compiles");
    let b = 2usize;
    let mut rng = runtime::init::Rng::new(9);
    let ids: Vec<Vec<i32>> = (0..b)
        .map(|_| (0..l).map(|_| (rng.next_u64() % 61) as i32).collect())
        .collect();
    let run = |start: usize, end: usize, states: &HashMap<String, Vec<f32>>| {
        let seg: Vec<i32> = ids
            .iter()
            .flat_map(|s| s[start..end].iter().copied())
            .collect();
        let data = HashMap::from([("input_ids".to_string(), HostData::I32(seg))]);
        let syms = [("B", b as i64), ("L", (end - start) as i64)];
        cpu.run(&syms, &data, &params, states).expect("runs").0
    };
    let whole = run(0, l, &HashMap::new());
    let whole_logits = &whole.iter().find(|(n, _)| n == "logits").expect("logits").1;
    let vocab = whole_logits.len() / (b * l);
    let mut states: HashMap<String, Vec<f32>> = HashMap::new();
    let mut pieces: Vec<Vec<f32>> = vec![Vec::new(); b];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(l);
    for w in bounds.windows(2) {
        let outs = run(w[0], w[1], &states);
        let len = w[1] - w[0];
        for (n, v) in outs {
            if n == "logits" {
                for (bi, piece) in pieces.iter_mut().enumerate() {
                    piece.extend_from_slice(&v[bi * len * vocab..(bi + 1) * len * vocab]);
                }
            } else {
                states.insert(n, v);
            }
        }
    }
    let segmented: Vec<f32> = pieces.concat();
    let agree = |got: &[f32], want: &[f32], what: &str| {
        if exact {
            assert_eq!(got, want, "{name}: {what} differs from the whole run");
            return;
        }
        assert_eq!(got.len(), want.len(), "{name}: {what}");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{name}: {what}: {err} (scale {scale})");
    };
    agree(&segmented, whole_logits, "segmented logits");
    // The final states agree too.
    for (n, v) in &whole {
        if n != "logits" {
            agree(&states[n], v, &format!("final state {n}"));
        }
    }
}

#[test]
fn segmented_forward_is_bit_identical_to_whole() {
    // One chunk of Mamba-1's 64 steps; tiny-mamba2 cut at its chunks of 8.
    segments_equal_whole("tiny-mamba", &[5], 13, true);
    segments_equal_whole("tiny-mamba", &[1, 2, 3, 9], 13, true);
    segments_equal_whole("tiny-mamba2", &[8], 13, true);
    segments_equal_whole("tiny-mamba2", &[8, 16, 24], 29, true);
}

#[test]
fn segmented_forward_matches_whole_across_many_chunks() {
    // Three chunks of Mamba-1, five of tiny-mamba2, segments across chunk boundaries; and
    // cuts inside tiny-mamba2's chunks.
    segments_equal_whole("tiny-mamba", &[40, 100], 150, false);
    segments_equal_whole("tiny-mamba2", &[5, 17, 30], 40, false);
    segments_equal_whole("tiny-mamba2", &[2, 7, 12], 13, false);
}

/// The summed-loss training graph of a sequence equals that of two time segments: the later
/// segment's state gradients, fed back as the earlier segment's `cotangent.*` inputs, make
/// the segments' parameter gradients and losses add up to the whole sequence's (f64).
fn backward_segments_add_up(name: &str, cut: usize, l: usize) {
    use passes::autodiff::training_graph_segment;
    use runtime::array::Array;
    use runtime::interp::{Bindings, run};

    let graph = common::compile_name(name).graph;
    let grads = training_graph_segment(&graph, "logits", -100).expect("segment training graph");
    ir::verify(&grads.graph).expect("verifies");
    let params = runtime::init::init_params(&graph, 3);
    let b = 2usize;
    let mut rng = runtime::init::Rng::new(21);
    let ids: Vec<Vec<i64>> = (0..b)
        .map(|_| (0..l).map(|_| (rng.next_u64() % 61) as i64).collect())
        .collect();
    // Next-token targets over the whole sequence; the last position predicts nothing.
    let targets: Vec<Vec<i64>> = ids
        .iter()
        .map(|s| {
            (0..l)
                .map(|t| s.get(t + 1).copied().unwrap_or(-100))
                .collect()
        })
        .collect();
    let slice = |rows: &[Vec<i64>], start: usize, end: usize| {
        let data = rows
            .iter()
            .flat_map(|s| s[start..end].iter().map(|&x| x as f64))
            .collect();
        Array::new(vec![b, end - start], data)
    };
    let state_names: Vec<String> = grads.state_grads.iter().map(|(n, _)| n.clone()).collect();
    assert!(!state_names.is_empty(), "{name}: no states");

    // Segment 1 forward: its final states.
    let fwd1 = run(
        &graph,
        &Bindings {
            inputs: HashMap::from([("input_ids".to_string(), slice(&ids, 0, cut))]),
            params: params.clone(),
            states: HashMap::new(),
        },
    )
    .expect("forward runs");
    let finals: HashMap<String, Array> = state_names
        .iter()
        .map(|s| (s.clone(), fwd1.get(s).expect("final state").clone()))
        .collect();
    let zeros = |s: &String| {
        let a = &finals[s];
        Array::new(a.shape.clone(), vec![0.0; a.data.len()])
    };
    let train = |start: usize,
                 end: usize,
                 states: HashMap<String, Array>,
                 cot: &dyn Fn(&String) -> Array| {
        let mut inputs = HashMap::from([
            ("input_ids".to_string(), slice(&ids, start, end)),
            ("targets".to_string(), slice(&targets, start, end)),
        ]);
        for s in &state_names {
            inputs.insert(format!("cotangent.{s}"), cot(s));
        }
        run(
            &grads.graph,
            &Bindings {
                inputs,
                params: params.clone(),
                states,
            },
        )
        .expect("training graph runs")
    };
    let whole = train(0, l, HashMap::new(), &zeros);
    let seg2 = train(cut, l, finals.clone(), &zeros);
    let seg1 = train(0, cut, HashMap::new(), &|s: &String| {
        seg2.get(&format!("grad.{s}")).expect("state grad").clone()
    });

    let loss = |o: &runtime::interp::Outputs| o.get("loss").expect("loss").data[0];
    let (lw, l1, l2) = (loss(&whole), loss(&seg1), loss(&seg2));
    assert!(
        (l1 + l2 - lw).abs() <= 1e-9 * lw.abs(),
        "{name}: loss {l1} + {l2} != {lw}"
    );
    let mut checked = 0;
    for (p, _) in &grads.param_grads {
        let key = format!("grad.{p}");
        let w = whole.get(&key).expect("grad");
        let (a, c) = (seg1.get(&key).expect("grad"), seg2.get(&key).expect("grad"));
        let scale = w.data.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        for i in 0..w.data.len() {
            let sum = a.data[i] + c.data[i];
            assert!(
                (sum - w.data[i]).abs() <= 1e-9 * scale.max(w.data[i].abs()),
                "{name}: {key}[{i}]: {} + {} = {sum} vs whole {}",
                a.data[i],
                c.data[i],
                w.data[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn segmented_backward_adds_up_to_whole() {
    backward_segments_add_up("tiny-mamba", 5, 12);
    backward_segments_add_up("tiny-mamba2", 5, 12);
}
