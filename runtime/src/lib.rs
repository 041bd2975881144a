//! Running ma2mba graphs.
//!
//! - [`array`]: dense host tensors (f64 for the reference interpreter)
//! - [`cpu`]: the CPU executor of a lowered schedule in its planned arena
//! - `cuda` (cargo feature `cuda`): the GPU executor: PTX kernels and cuBLAS through cudarc
//! - [`init`]: parameter initialisation from the graph's initializer specs
//! - [`interp`]: the f64 reference interpreter, the oracle every backend is tested against
//! - [`weights`]: safetensors checkpoints (mmap, f32/f16/bf16/f64), checked against a graph
//!   before anything runs; Hugging Face hub resolution

pub mod array;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod init;
pub mod interp;
pub mod weights;
