//! The ma2mba model DSL: parse model files, report diagnostics, elaborate models into the IR.
//!
//! `program::compile` is the entry point: it finds the model a user names (a preset of the
//! shipped library, a model definition, a `.m2` file, optionally configured by a
//! `config.json`), parses, and elaborates it into a verified [`ir::Graph`].

pub mod ast;
pub mod builtins;
pub mod config;
pub mod diag;
pub mod elaborate;
pub mod lexer;
mod names;
pub mod parser;
pub mod program;

pub use diag::{Code, Diagnostic, Severity, Sources, render};
pub use elaborate::{ConfigArg, ConfigValue};
pub use parser::parse_file;
pub use program::{Compiled, LIBRARY, LIBRARY_NAME, ModelSpec, Program, compile};
