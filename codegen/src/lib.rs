//! ma2mba code generation: lowering the loop-level kernel IR ([`ir::kernel`]) to machine code.
//!
//! - [`cpu`]: the Cranelift JIT backend. A [`cpu::CpuModule`] compiles [`ir::kernel::Kernel`]s
//!   to native functions ([`cpu::CpuKernel`]) that run a range of grid points; `run` splits
//!   the grid into chunks over rayon's thread pool.
//!
//! The crate depends on `ir` only among the ma2mba crates (ARCHITECTURE.md).

pub mod cpu;
