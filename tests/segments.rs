//! Any layer stack runs over a time segment with carried states: running a sequence in
//! segments, feeding each segment's final conv/ssm states to the next, gives exactly the
//! logits of one run over the whole sequence (compiled CPU path).

mod common;

use ma2mba::model::CpuGraph;
use passes::LowerOptions;
use runtime::cpu::HostData;
use std::collections::HashMap;

fn segments_equal_whole(name: &str, cuts: &[usize], l: usize) {
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
    assert_eq!(
        &segmented, whole_logits,
        "{name}: segmented logits differ from the whole run"
    );
    // The final states agree too.
    for (n, v) in &whole {
        if n != "logits" {
            assert_eq!(states.get(n), Some(v), "{name}: final state {n}");
        }
    }
}

#[test]
fn segmented_forward_is_bit_identical_to_whole() {
    segments_equal_whole("tiny-mamba", &[5], 13);
    segments_equal_whole("tiny-mamba", &[1, 2, 3, 9], 13);
    segments_equal_whole("tiny-mamba2", &[8], 13);
    segments_equal_whole("tiny-mamba2", &[2, 7, 12], 13);
}
