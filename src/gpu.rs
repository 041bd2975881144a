//! Ties the NVPTX backend (`codegen`) to the CUDA executor (`runtime`), as `cpu.rs` does for
//! the CPU: a graph lowered once, its kernels compiled to PTX and loaded on a GPU.

use crate::model::Error;
use codegen::nvptx::{Target, compile_ptx_shared};
use ir::Graph;
use passes::{LowerOptions, Lowered};
use runtime::cpu::{HostData, Inputs, Outputs};
use runtime::cuda::{
    Bound, CudaExecutor, DeviceArena, DeviceParams, DeviceSums, DeviceValue, ExecOptions,
    ResidentOutputs, StepTime,
};
use std::collections::HashMap;
use std::sync::Mutex;

pub use runtime::cuda::CudaError;

/// A graph compiled for a GPU: lowered, compiled to PTX for `target` and loaded on GPU
/// `ordinal`; the memory plan is made per call for the symbol values given.
pub struct GpuGraph {
    pub lowered: Lowered,
    exec: CudaExecutor,
    /// Memory plans by symbol values (a checkpointed step runs a stage at one or two
    /// segment lengths, many times).
    plans: Mutex<HashMap<Vec<i64>, passes::MemoryPlan>>,
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
    /// Lowers `graph` for the GPU (`opts.on_gpu()`: the tiled SSD kernels with bf16
    /// activations, tiled carries), compiles its kernels to PTX for `target` and loads them
    /// on GPU `ordinal`.
    pub fn compile(
        graph: &Graph,
        opts: &LowerOptions,
        target: Target,
        ordinal: usize,
    ) -> Result<GpuGraph, GpuError> {
        GpuGraph::compile_exactly(graph, &opts.on_gpu(), target, ordinal)
    }

    /// [`GpuGraph::compile`] with `opts` as given (benchmarks compare lowering choices).
    pub fn compile_exactly(
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
        // Kernels repeated across layers (identical but for names) compile once; the module
        // also carries the f32 -> bf16 conversion for products with bf16 weights.
        let (mut distinct, map) = crate::artifact::dedupe(&lowered.kernels);
        distinct.push(ir::kernel::Kernel::convert(
            "ma2mba_to_bf16",
            ir::DType::F32,
            ir::DType::BF16,
        ));
        // Shared by graphs of equal kernels (a checkpointed step's layer groups).
        let ptx =
            compile_ptx_shared(&distinct, target).map_err(|e| Error::Codegen(e.to_string()))?;
        let to_bf16 = ptx.entries.last().cloned();
        let entries: Vec<String> = map
            .iter()
            .map(|&i| ptx.entries.get(i).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Codegen("a deduplicated kernel has no PTX entry".into()))?;
        let exec = CudaExecutor::new(ordinal, &ptx.text, &entries, to_bf16.as_deref())?;
        Ok(GpuGraph {
            lowered,
            exec,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> String {
        self.exec.device_name()
    }

    /// The memory plan for symbol values `syms` (`peak`: the arena's bytes).
    pub fn memory_plan(&self, syms: &[(&str, i64)]) -> Result<passes::MemoryPlan, GpuError> {
        Ok(self.sized_plan(syms)?.1)
    }

    /// The symbol values in the schedule's order and the memory plan for them.
    fn sized_plan(&self, syms: &[(&str, i64)]) -> Result<(Vec<i64>, passes::MemoryPlan), GpuError> {
        let sizes = self.sizes(syms)?;
        let plan = self.plan_sizes(&sizes)?;
        Ok((sizes, plan))
    }

    /// The executor (bound schedules, reads and writes go through it).
    pub fn exec(&self) -> &CudaExecutor {
        &self.exec
    }

    /// Symbol values in the schedule's order.
    pub fn sizes(&self, syms: &[(&str, i64)]) -> Result<Vec<i64>, GpuError> {
        let mut sizes = Vec::with_capacity(self.lowered.syms.len());
        for s in &self.lowered.syms {
            match syms.iter().find(|(n, _)| n == s) {
                Some((_, v)) if *v >= 0 => sizes.push(*v),
                _ => return Err(Error::Input(format!("no value for the symbol `{s}`")).into()),
            }
        }
        Ok(sizes)
    }

    fn plan_sizes(&self, sizes: &[i64]) -> Result<passes::MemoryPlan, GpuError> {
        if let Some(p) = self.plans.lock().ok().and_then(|m| m.get(sizes).cloned()) {
            return Ok(p);
        }
        let bind = |s: &str| {
            self.lowered
                .syms
                .iter()
                .position(|x| x == s)
                .map(|i| sizes[i] as u64)
        };
        let plan = passes::plan_memory(&self.lowered, &bind)
            .map_err(|e| GpuError::Model(Error::Input(e.to_string())))?;
        if let Ok(mut m) = self.plans.lock() {
            m.insert(sizes.to_vec(), plan.clone());
        }
        Ok(plan)
    }

    /// Uploads parameters once (shared by every graph on the same GPU).
    pub fn upload_params(
        &self,
        params: &HashMap<String, Vec<f32>>,
    ) -> Result<DeviceParams, GpuError> {
        Ok(self.exec.upload_params(params)?)
    }

    /// Binds the schedule at symbol values `syms` with device parameters: the arena,
    /// inputs and states are allocated once for repeated runs.
    pub fn bind(
        &self,
        syms: &[(&str, i64)],
        params: &DeviceParams,
        poison: bool,
    ) -> Result<Bound, GpuError> {
        let (sizes, plan) = self.sized_plan(syms)?;
        Ok(self
            .exec
            .bind(&self.lowered, &sizes, plan, params, poison)?)
    }

    /// Runs with symbol values `syms` (`("B", 2)`); returns every graph output. Uploads the
    /// parameters for this run only; [`GpuGraph::run_with`] reuses uploaded ones.
    pub fn run(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &HashMap<String, Vec<f32>>,
        states: &HashMap<String, Vec<f32>>,
        opts: ExecOptions,
    ) -> Result<Outputs, GpuError> {
        let dev = self.upload_params(params)?;
        self.run_with(syms, data, &dev, states, opts)
    }

    /// [`GpuGraph::run`] with parameters already on the device.
    pub fn run_with(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &DeviceParams,
        states: &HashMap<String, Vec<f32>>,
        opts: ExecOptions,
    ) -> Result<Outputs, GpuError> {
        Ok(self.run_measured(syms, data, params, states, opts)?.0)
    }

    /// [`GpuGraph::run_with`], also returning the bytes of the arena it ran in.
    pub fn run_measured(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &DeviceParams,
        states: &HashMap<String, Vec<f32>>,
        opts: ExecOptions,
    ) -> Result<(Outputs, u64), GpuError> {
        let mut arena = DeviceArena::default();
        let device = HashMap::new();
        let (outs, peak) = self.run_resident(
            syms,
            (data, states),
            &device,
            params,
            &mut arena,
            opts,
            None,
            &|_| true,
        )?;
        Ok((outs.host, peak))
    }

    /// Runs once with values kept on the device between runs
    /// ([`CudaExecutor::run_resident`]): inputs and states in `device` are read in place,
    /// outputs stay on the device unless `to_host` picks them. Returns them and the bytes
    /// of the arena the run used.
    #[allow(clippy::too_many_arguments)]
    pub fn run_resident(
        &self,
        syms: &[(&str, i64)],
        (data, states): (&HashMap<String, HostData>, &HashMap<String, Vec<f32>>),
        device: &HashMap<String, &DeviceValue>,
        params: &DeviceParams,
        arena: &mut DeviceArena,
        opts: ExecOptions,
        sum: Option<runtime::cuda::SumInto<'_>>,
        to_host: &dyn Fn(&str) -> bool,
    ) -> Result<(ResidentOutputs, u64), GpuError> {
        let (sizes, plan) = self.sized_plan(syms)?;
        let no_params = HashMap::new();
        let inp = Inputs {
            sizes: &sizes,
            data,
            params: &no_params,
            states,
        };
        let outs = self.exec.run_resident(
            &self.lowered,
            &plan,
            &inp,
            device,
            params,
            arena,
            opts,
            sum,
            to_host,
        )?;
        Ok((outs, plan.peak))
    }
}

/// AdamW on the GPU: parameters and moments resident between steps, updated in place by the
/// kernel-IR AdamW kernel ([`ir::kernel::Kernel::adamw`]) from gradient sums that never leave
/// the device (a checkpointed step's).
pub struct GpuOptimizer {
    exec: CudaExecutor,
    pub params: DeviceParams,
    m: DeviceParams,
    v: DeviceParams,
}

impl GpuOptimizer {
    /// Uploads `params` and the moments `m`, `v` to GPU `ordinal`.
    pub fn new(
        ordinal: usize,
        params: &HashMap<String, Vec<f32>>,
        m: &HashMap<String, Vec<f32>>,
        v: &HashMap<String, Vec<f32>>,
    ) -> Result<GpuOptimizer, GpuError> {
        let kernel = ir::kernel::Kernel::adamw("ma2mba_adamw");
        let ptx = compile_ptx_shared(std::slice::from_ref(&kernel), Target::Sm90)
            .map_err(|e| Error::Codegen(e.to_string()))?;
        let exec = CudaExecutor::new(ordinal, &ptx.text, &ptx.entries, None)?;
        Ok(GpuOptimizer {
            params: exec.upload_params(params)?,
            m: exec.upload_params(m)?,
            v: exec.upload_params(v)?,
            exec,
        })
    }

    /// The 2-norm of each gradient sum.
    pub fn norms(&self, grads: &DeviceSums) -> Result<HashMap<String, f64>, GpuError> {
        Ok(self.exec.norms(grads)?)
    }

    /// One AdamW step of every parameter that has a row (its hyperparameters).
    pub fn step(
        &mut self,
        grads: &DeviceSums,
        rows: &[(String, [f32; ir::kernel::ADAMW_HYPER])],
    ) -> Result<(), GpuError> {
        Ok(self
            .exec
            .adamw(0, &self.params, grads, &self.m, &self.v, rows)?)
    }

    /// Parameters and moments on the host.
    #[allow(clippy::type_complexity)]
    pub fn download(
        &self,
    ) -> Result<
        (
            HashMap<String, Vec<f32>>,
            HashMap<String, Vec<f32>>,
            HashMap<String, Vec<f32>>,
        ),
        GpuError,
    > {
        Ok((
            self.exec.download_params(&self.params)?,
            self.exec.download_params(&self.m)?,
            self.exec.download_params(&self.v)?,
        ))
    }
}

/// The GPU side of a [`crate::model::Model`]: the compiled forward graph, the parameters
/// uploaded once, and the one-token step with a bound schedule per decode batch size (its
/// states stay on the device from step to step; each is captured as a CUDA graph on first
/// use, since a small model's step is bound by launch overhead).
pub struct GpuModel {
    pub forward: GpuGraph,
    pub params: DeviceParams,
    step: Option<GpuGraph>,
    bounds: HashMap<(usize, Slot), Bound>,
}

/// Which bound step schedule a call uses: the decode whose states stay on the device, or
/// one-off steps from host states ([`crate::model::Model::step`]), which must not disturb it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Decode,
    OneShot,
}

/// Options of the decode step's runs: replayed as a CUDA graph.
const STEP_RUN: ExecOptions = ExecOptions {
    poison: false,
    sync_each_step: false,
    graph: true,
    profile: false,
};

impl GpuModel {
    /// Compiles `graph` for GPU 0 (sm_90) and uploads `params`.
    pub fn new(graph: &Graph, params: &HashMap<String, Vec<f32>>) -> Result<GpuModel, GpuError> {
        let forward = GpuGraph::compile(graph, &LowerOptions::default(), Target::Sm90, 0)?;
        let params = forward.upload_params(params)?;
        Ok(GpuModel {
            forward,
            params,
            step: None,
            bounds: HashMap::new(),
        })
    }

    /// From now on the matrix products run on bf16 copies of their weights (and bf16 copies
    /// of their inputs), accumulating in f32: half the weight bytes per decode step, tensor
    /// cores for prefill. For inference (an optimizer would update only the f32 copies).
    pub fn use_bf16_weights(&mut self) -> Result<(), GpuError> {
        self.forward
            .exec()
            .add_bf16_weights(&mut self.params, &self.forward.lowered)?;
        // Bound schedules chose their products' precision when bound.
        self.bounds.clear();
        Ok(())
    }

    /// Overwrites parameters on the device (after the host copy changed).
    pub fn update_params(&self, params: &HashMap<String, Vec<f32>>) -> Result<(), GpuError> {
        for (name, v) in params {
            self.forward.exec().update_param(&self.params, name, v)?;
        }
        Ok(())
    }

    /// Runs the forward graph at `B` = `b`, `L` = `l`.
    pub fn run_forward(
        &self,
        ids: &[i32],
        b: usize,
        l: usize,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<Outputs, GpuError> {
        let syms = [("B", b as i64), ("L", l as i64)];
        let data = HashMap::from([("input_ids".to_string(), HostData::I32(ids.to_vec()))]);
        self.forward
            .run_with(&syms, &data, &self.params, states, ExecOptions::default())
    }

    /// Compiles the step graph once.
    pub fn ensure_step(&mut self, step_graph: &Graph) -> Result<(), GpuError> {
        if self.step.is_none() {
            self.step = Some(GpuGraph::compile(
                step_graph,
                &LowerOptions::default(),
                Target::Sm90,
                0,
            )?);
        }
        Ok(())
    }

    fn stepper(&mut self, batch: usize, slot: Slot) -> Result<(&GpuGraph, &mut Bound), GpuError> {
        let step = self
            .step
            .as_ref()
            .ok_or_else(|| Error::Input("the step graph is not compiled for the GPU".into()))?;
        let key = (batch, slot);
        if !self.bounds.contains_key(&key) {
            let mut b = step.bind(&[("B", batch as i64), ("L", 1)], &self.params, false)?;
            step.exec().carry_states(&step.lowered, &mut b)?;
            self.bounds.insert(key, b);
        }
        let b = self
            .bounds
            .get_mut(&key)
            .ok_or_else(|| Error::Input("no bound step".into()))?;
        Ok((step, b))
    }

    /// Writes the states of a decode at batch `batch` (host to device).
    pub fn write_states(
        &mut self,
        slot: Slot,
        batch: usize,
        states: &[(&str, &[f32])],
    ) -> Result<(), GpuError> {
        let (g, b) = self.stepper(batch, slot)?;
        for (name, v) in states {
            g.exec().write_f32(&g.lowered, b, name, v)?;
        }
        Ok(())
    }

    /// One decode step at batch `tokens.len()` from the device-resident states (which it
    /// advances); returns output `main` (the logits).
    pub fn step(&mut self, slot: Slot, tokens: &[u32], main: &str) -> Result<Vec<f32>, GpuError> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (g, b) = self.stepper(tokens.len(), slot)?;
        g.exec()
            .write(&g.lowered, b, "input_ids", &HostData::I32(ids))?;
        g.exec().run(&g.lowered, b, STEP_RUN)?;
        Ok(g.exec().read(&g.lowered, b, main, None)?)
    }

    /// The device-resident states of the decode at batch `batch`, by name.
    pub fn read_states(
        &mut self,
        slot: Slot,
        batch: usize,
        names: &[String],
    ) -> Result<Vec<(String, Vec<f32>)>, GpuError> {
        let (g, b) = self.stepper(batch, slot)?;
        names
            .iter()
            .map(|n| Ok((n.clone(), g.exec().read_state(&g.lowered, b, n)?)))
            .collect()
    }

    /// Per-step device times of one step at batch `tokens.len()` (not replayed as a graph;
    /// the states advance as in [`GpuModel::step`]).
    pub fn profile_step(&mut self, tokens: &[u32]) -> Result<Vec<StepTime>, GpuError> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (g, b) = self.stepper(tokens.len(), Slot::Decode)?;
        g.exec()
            .write(&g.lowered, b, "input_ids", &HostData::I32(ids))?;
        let opts = ExecOptions {
            profile: true,
            ..ExecOptions::default()
        };
        Ok(g.exec().run(&g.lowered, b, opts)?)
    }
}

/// A compiled artifact (`.m2pack`) loaded on a GPU: the schedule rebuilt from its manifest
/// ([`crate::artifact::Artifact::schedule`]) and its PTX module loaded, runnable at the
/// artifact's symbol values without the compiler.
pub struct GpuArtifact {
    pub lowered: Lowered,
    plan: passes::MemoryPlan,
    sizes: Vec<i64>,
    exec: CudaExecutor,
}

impl GpuArtifact {
    /// Loads `a` on GPU `ordinal`.
    pub fn load(a: &crate::artifact::Artifact, ordinal: usize) -> Result<GpuArtifact, GpuError> {
        let (lowered, plan, sizes) = a.schedule().map_err(Error::Input)?;
        let entries: Vec<String> = lowered.kernels.iter().map(|k| k.name.clone()).collect();
        let exec = CudaExecutor::new(ordinal, &a.ptx, &entries, None)?;
        Ok(GpuArtifact {
            lowered,
            plan,
            sizes,
            exec,
        })
    }

    /// The symbol values it was compiled for (`B`, `L`).
    pub fn symbols(&self) -> Vec<(String, i64)> {
        self.lowered
            .syms
            .iter()
            .cloned()
            .zip(self.sizes.iter().copied())
            .collect()
    }

    /// The GPU's name.
    pub fn device_name(&self) -> String {
        self.exec.device_name()
    }

    /// Runs it once: uploads the parameters, inputs and states, returns every output.
    pub fn run(
        &self,
        data: &HashMap<String, HostData>,
        params: &HashMap<String, Vec<f32>>,
        states: &HashMap<String, Vec<f32>>,
        opts: ExecOptions,
    ) -> Result<Outputs, GpuError> {
        let inp = Inputs {
            sizes: &self.sizes,
            data,
            params,
            states,
        };
        Ok(self.exec.execute(&self.lowered, &self.plan, &inp, opts)?)
    }
}

/// The steps of one kind in a profile (kernels by name without their node number; cuBLAS
/// products as `matmul`).
#[derive(Clone, Debug, PartialEq)]
pub struct KindTime {
    pub kind: String,
    pub launches: usize,
    pub ms: f64,
    /// Traffic floor: the bytes of each launch's buffers, counted once per launch.
    pub bytes: u64,
    pub flops: u64,
}

/// A profile summed per kind, the most time first.
pub fn by_kind(times: &[StepTime]) -> Vec<KindTime> {
    let mut kinds: Vec<KindTime> = Vec::new();
    for t in times {
        // `ssd_scan_grad_1515_chunk` -> `ssd_scan_grad_chunk`.
        let kind = t
            .name
            .split('_')
            .filter(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join("_");
        let kind = kind.as_str();
        let i = match kinds.iter().position(|k| k.kind == kind) {
            Some(i) => i,
            None => {
                kinds.push(KindTime {
                    kind: kind.to_string(),
                    launches: 0,
                    ms: 0.0,
                    bytes: 0,
                    flops: 0,
                });
                kinds.len() - 1
            }
        };
        let k = &mut kinds[i];
        k.launches += 1;
        k.ms += f64::from(t.ms);
        k.bytes += t.bytes;
        k.flops += t.flops;
    }
    kinds.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    kinds
}

/// What [`time_graph`] measured.
#[derive(Clone, Debug)]
pub struct GraphTiming {
    pub compile: std::time::Duration,
    /// Median wall time of a run of the bound schedule (inputs already on the device).
    pub median: std::time::Duration,
    pub arena: u64,
    pub device_name: String,
    /// One more run, every step timed with events.
    pub profile: Vec<StepTime>,
}

/// Compiles `g` (lowered with `opts`), uploads `params`, binds it at `syms` with `data`,
/// runs it once to warm up, then `repeat` times (the median is reported), then once profiled.
pub fn time_graph(
    g: &Graph,
    opts: &LowerOptions,
    params: &HashMap<String, Vec<f32>>,
    syms: &[(&str, i64)],
    data: &HashMap<String, HostData>,
    repeat: usize,
) -> Result<GraphTiming, GpuError> {
    let t0 = std::time::Instant::now();
    let gpu = GpuGraph::compile(g, opts, Target::Sm90, 0)?;
    let compile = t0.elapsed();
    let dev = gpu.upload_params(params)?;
    let mut bound = gpu.bind(syms, &dev, false)?;
    let ex = gpu.exec();
    for (name, d) in data {
        ex.write(&gpu.lowered, &bound, name, d)?;
    }
    let mut times = Vec::new();
    for i in 0..=repeat.max(1) {
        let t = std::time::Instant::now();
        ex.run(&gpu.lowered, &mut bound, ExecOptions::default())?;
        ex.synchronize()?;
        if i > 0 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let profile = ex.run(
        &gpu.lowered,
        &mut bound,
        ExecOptions {
            profile: true,
            ..ExecOptions::default()
        },
    )?;
    Ok(GraphTiming {
        compile,
        median: times[times.len() / 2],
        arena: bound.plan().peak,
        device_name: gpu.device_name(),
        profile,
    })
}
