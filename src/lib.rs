//! ma2mba: a compiler for Mamba-family state-space models.
//!
//! This crate is the facade over the pipeline's crates and the home of the `ma2mba` command
//! line ([`cli`]). See ARCHITECTURE.md for the map.

pub mod artifact;
pub mod checkpoint;
pub mod cli;
mod cpu;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod model;
pub mod plan;
pub mod sample;
pub mod state;
pub mod tokenizer;
pub mod train;

pub use codegen;
pub use frontend;
pub use ir;
pub use passes;
pub use runtime;
