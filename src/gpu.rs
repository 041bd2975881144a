//! Ties the NVPTX backend (`codegen`) to the CUDA executor (`runtime`), as `cpu.rs` does for
//! the CPU: a graph lowered once, its kernels compiled to PTX and loaded on a GPU.

use crate::model::Error;
use codegen::nvptx::{Target, compile_ptx};
use ir::Graph;
use passes::{LowerOptions, Lowered};
use runtime::cpu::{HostData, Inputs, Outputs};
use runtime::cuda::{CudaExecutor, ExecOptions};
use std::collections::HashMap;

pub use runtime::cuda::CudaError;

/// A graph compiled for a GPU: lowered, compiled to PTX for `target` and loaded on GPU
/// `ordinal`; the memory plan is made per call for the symbol values given.
pub struct GpuGraph {
    pub lowered: Lowered,
    exec: CudaExecutor,
}

/// Why a graph could not be compiled for or run on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Model(#[from] Error),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

impl GpuGraph {
    pub fn compile(
        graph: &Graph,
        opts: &LowerOptions,
        target: Target,
        ordinal: usize,
    ) -> Result<GpuGraph, GpuError> {
        if !runtime::cuda::driver_present() {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            )
            .into());
        }
        let lowered = passes::lower(graph, opts).map_err(Error::from)?;
        // Kernels repeated across layers (identical but for names) compile once.
        let (distinct, map) = crate::artifact::dedupe(&lowered.kernels);
        let ptx = compile_ptx(&distinct, target).map_err(|e| Error::Codegen(e.to_string()))?;
        let entries: Vec<String> = map
            .iter()
            .map(|&i| ptx.entries.get(i).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Codegen("a deduplicated kernel has no PTX entry".into()))?;
        let exec = CudaExecutor::new(ordinal, &ptx.text, &entries)?;
        Ok(GpuGraph { lowered, exec })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> String {
        self.exec.device_name()
    }

    /// The memory plan for symbol values `syms` (`peak`: the arena's bytes).
    pub fn memory_plan(&self, syms: &[(&str, i64)]) -> Result<passes::MemoryPlan, GpuError> {
        let bind = |s: &str| {
            syms.iter()
                .find(|(n, _)| *n == s)
                .map(|(_, v)| (*v).max(0) as u64)
        };
        passes::plan_memory(&self.lowered, &bind)
            .map_err(|e| GpuError::Model(Error::Input(e.to_string())))
    }

    /// Runs with symbol values `syms` (`("B", 2)`); returns every graph output.
    pub fn run(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &HashMap<String, Vec<f32>>,
        states: &HashMap<String, Vec<f32>>,
        opts: ExecOptions,
    ) -> Result<Outputs, GpuError> {
        let mut sizes = Vec::with_capacity(self.lowered.syms.len());
        for s in &self.lowered.syms {
            match syms.iter().find(|(n, _)| n == s) {
                Some((_, v)) if *v >= 0 => sizes.push(*v),
                _ => return Err(Error::Input(format!("no value for the symbol `{s}`")).into()),
            }
        }
        let bind = |s: &str| {
            self.lowered
                .syms
                .iter()
                .position(|x| x == s)
                .map(|i| sizes[i] as u64)
        };
        let plan =
            passes::plan_memory(&self.lowered, &bind).map_err(|e| Error::Input(e.to_string()))?;
        let inp = Inputs {
            sizes: &sizes,
            data,
            params,
            states,
        };
        Ok(self.exec.execute(&self.lowered, &plan, &inp, opts)?)
    }
}
