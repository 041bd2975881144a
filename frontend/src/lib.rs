//! The ma2mba model DSL: parse model files, report diagnostics, elaborate models into the IR.

pub mod ast;
pub mod diag;
