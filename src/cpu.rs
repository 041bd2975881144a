//! Ties the Cranelift-compiled kernels (`codegen`) to the CPU executor (`runtime`): the two
//! crates do not know each other, by design.

use codegen::cpu::{CpuKernel, CpuModule, CpuOptions};
use ir::schedule::Lowered;
use runtime::cpu::Launcher;

/// Every kernel of a schedule, compiled for this CPU.
pub struct CraneliftLauncher {
    kernels: Vec<CpuKernel>,
    // Owns the JIT memory the kernels point into; dropped after them.
    _module: CpuModule,
}

impl CraneliftLauncher {
    pub fn compile_with(l: &Lowered, opts: CpuOptions) -> Result<CraneliftLauncher, String> {
        let mut module = CpuModule::with_options(opts).map_err(|e| e.to_string())?;
        let kernels = module.compile_all(&l.kernels).map_err(|e| e.to_string())?;
        Ok(CraneliftLauncher {
            kernels,
            _module: module,
        })
    }
}

impl Launcher for CraneliftLauncher {
    unsafe fn launch(
        &self,
        kernel: usize,
        bufs: &[(*mut u8, usize)],
        sizes: &[i64],
    ) -> Result<(), String> {
        let k = self.kernels.get(kernel).ok_or("no such kernel")?;
        // SAFETY: the trait's contract (live buffers of the given byte lengths, writable ones
        // not aliased during the launch) is what `run_raw` requires.
        unsafe { k.run_raw(bufs, sizes, None) }.map_err(|e| e.to_string())
    }
}
