//! Helpers shared by the integration tests.
#![allow(dead_code)]

use frontend::{Compiled, Diagnostic, ModelSpec, Sources};

/// Compiles a library preset or model name.
pub fn compile_name(name: &str) -> Compiled {
    let spec = ModelSpec {
        model: name.into(),
        ..ModelSpec::default()
    };
    let (sources, r) = frontend::compile(&spec);
    match r {
        Ok(c) => c,
        Err(d) => panic!(
            "{name} does not compile:\n{}",
            frontend::render(&d, &sources, false)
        ),
    }
}

/// Compiles DSL source text as a user file named `test.m2`.
pub fn compile_source(text: &str) -> (Sources, Result<Compiled, Vec<Diagnostic>>) {
    let spec = ModelSpec {
        model: "test.m2".into(),
        file_text: Some(text.into()),
        ..ModelSpec::default()
    };
    frontend::compile(&spec)
}

/// Runs the CLI in-process.
pub fn cli(args: &[&str]) -> ma2mba::cli::Outcome {
    let mut all = vec!["ma2mba"];
    all.extend_from_slice(args);
    ma2mba::cli::run(all)
}
