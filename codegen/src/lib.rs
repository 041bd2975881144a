//! ma2mba code generation: lowering the loop-level kernel IR ([`ir::kernel`]) to machine code.
//!
//! - [`cpu`]: the Cranelift JIT backend. A [`cpu::CpuModule`] compiles [`ir::kernel::Kernel`]s
//!   to native functions ([`cpu::CpuKernel`]) that run a range of grid points; `run` splits
//!   the grid into chunks over rayon's thread pool.
//! - `nvptx` (cargo feature `nvptx`): the LLVM NVPTX backend, kernel IR to PTX `.entry`
//!   kernels for `sm_90` (and `sm_80`), one grid point per thread.
//! - [`math`]: f64 transcendentals for targets without a libm, written once over an ops
//!   trait, so the host tests the code a backend emits.
//!
//! The crate depends on `ir` only among the ma2mba crates (ARCHITECTURE.md).

pub mod cpu;
pub mod math;
#[cfg(feature = "nvptx")]
pub mod nvptx;
