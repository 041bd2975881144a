//! Ties the Cranelift-compiled kernels (`codegen`) to the CPU executor (`runtime`): the two
//! crates do not know each other, by design.

use codegen::cpu::{CpuKernel, CpuModule, KArg};
use ir::schedule::Lowered;
use runtime::cpu::Launcher;

/// Every kernel of a schedule, compiled for this CPU.
pub struct CraneliftLauncher {
    kernels: Vec<CpuKernel>,
    // Owns the JIT memory the kernels point into; dropped after them.
    _module: CpuModule,
}

impl CraneliftLauncher {
    pub fn compile(l: &Lowered) -> Result<CraneliftLauncher, String> {
        let mut module = CpuModule::new().map_err(|e| e.to_string())?;
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
        let mut args: Vec<KArg<'_>> = bufs
            .iter()
            .zip(&k.kernel().bufs)
            .map(|(&(p, n), kb)| {
                // SAFETY: the trait's contract: `p` holds `n` bytes, and writable buffers are
                // not aliased while the kernel runs.
                unsafe {
                    if kb.writable {
                        KArg::Out(std::slice::from_raw_parts_mut(p, n))
                    } else {
                        KArg::In(std::slice::from_raw_parts(p, n))
                    }
                }
            })
            .collect();
        k.run_args(&mut args, sizes).map_err(|e| e.to_string())
    }
}
