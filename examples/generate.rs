//! Generate from Rust: prefill and step by hand, then the whole loop with streaming.
//!
//! ```sh
//! cargo run --release --example generate                       # tiny-mamba2, random weights
//! cargo run --release --example generate -- tests/fixtures/tiny-mamba "15 23 19 26"
//! cargo run --release --example generate -- state-spaces/mamba-130m-hf "My cat wrote"
//! ```
//!
//! With a tokenizer (a model directory with `tokenizer.json`, or a hub model) the second
//! argument is text; without one it is token ids.

use ma2mba::generate::GenerateConfig;
use ma2mba::model::{LoadOptions, Model};
use ma2mba::sample::{SamplingConfig, argmax};
use ma2mba::tokenizer::Tokenizer;
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = args.first().map_or("tiny-mamba2", String::as_str);
    let input = args.get(1).map_or("1 2 3 4 5", String::as_str);
    let mut model = Model::load(spec, &LoadOptions::default())?;
    model.tokenizer = Tokenizer::for_model(spec, model.source_dir.as_deref(), model.vocab(), true)?;
    let prompt: Vec<u32> = match &model.tokenizer {
        Some(t) => t.encode(input)?,
        None => input
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?,
    };

    // By hand: the parallel form over the prompt, then the derived one-token step.
    let mut state = model.new_state(1);
    let logits = model.prefill(std::slice::from_ref(&prompt), &mut state)?;
    let mut next = argmax(logits.at(0, prompt.len() - 1));
    let mut greedy = vec![next];
    for _ in 0..7 {
        next = argmax(model.step(&[next], &mut state)?.at(0, 0));
        greedy.push(next);
    }
    // The state is a value: `state.clone()`, `state.save(path)` and `State::load(path)`
    // keep a prefix to continue from later.
    println!("greedy by hand: {greedy:?}");

    // The loop, with sampling and a streaming callback.
    let cfg = GenerateConfig {
        max_new_tokens: 32,
        sampling: SamplingConfig {
            temperature: 0.7,
            top_p: 0.9,
            repetition_penalty: 1.2,
            ..SamplingConfig::default()
        },
        seed: 1,
        eos_token_id: model.eos_token_id,
        ..GenerateConfig::default()
    };
    let has_text = model.tokenizer.is_some();
    let out = model.generate(&[prompt], &cfg, |t| {
        if has_text {
            print!("{}", t.text);
        } else {
            print!("{} ", t.id);
        }
        let _ = std::io::stdout().flush();
        true
    })?;
    let tm = &out.timings;
    println!(
        "\nprefill {:.1} tokens/s, decode {:.2} ms/token",
        tm.prefill_tokens_per_s(),
        tm.ms_per_step()
    );
    Ok(())
}
