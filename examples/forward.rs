//! Load a model and run a forward pass from Rust.
//!
//! ```sh
//! cargo run --release --example forward                          # tiny-mamba2, random weights
//! cargo run --release --example forward -- tests/fixtures/tiny-mamba "1 2 3 4"
//! cargo run --release --example forward -- state-spaces/mamba-130m-hf "510 4 1000"
//! ```

use ma2mba::model::{LoadOptions, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = args.first().map_or("tiny-mamba2", String::as_str);
    let tokens: Vec<u32> = args
        .get(1)
        .map_or("1 2 3 4 5", String::as_str)
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut model = Model::load(spec, &LoadOptions::default())?;
    let logits = model.forward(std::slice::from_ref(&tokens))?;
    for (t, id) in tokens.iter().enumerate() {
        let row = logits.at(0, t);
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        println!("position {t}: token {id} -> most likely next token {best}");
    }
    Ok(())
}
