//! Running a training step under a checkpoint plan: the schedule of [`passes::remat`]
//! (forward over segments storing layer and sequence checkpoints, backward over cells
//! recomputing what was not kept), with a ledger of the bytes it holds.
//!
//! Stages run on the CPU (Cranelift) or, with the `cuda` feature, on the GPU: there the
//! parameters are uploaded once per step and shared by every stage run, the values between
//! runs (checkpoints, boundary values, saved values, states and their cotangents) stay in
//! device memory, every run borrows one arena grown to the largest stage's, and the
//! parameter gradients are summed on the device; only the loss (and logits when asked for)
//! come back per run. The ledger counts the values as the planner does, wherever they are
//! held.
//!
//! The ledger counts what the schedule holds, as the planner prices it: token ids and
//! targets, carried states and state gradients, layer and sequence checkpoints, saved values,
//! the values passed between stages, and each run's arena (the executor's real allocation)
//! with the outputs it returns. Parameters, gradient accumulators and optimizer state are left
//! out (the planner counts them separately).

use crate::model::{CpuGraph, Error, IGNORE_INDEX};
use ir::{Graph, InputKind, Op};
use passes::LowerOptions;
use passes::remat::{Keep, Plan, Variant};
use passes::stage::{self, StageKind};
use runtime::cpu::HostData;
use std::collections::HashMap;

/// Where stage graphs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
}

/// One stage graph compiled for a device.
enum StageGraph {
    Cpu(Box<CpuGraph>),
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::gpu::GpuGraph>),
}

/// The parameters as a run reads them.
enum Params<'a> {
    Host(&'a HashMap<String, Vec<f32>>),
    #[cfg(feature = "cuda")]
    /// On the GPU: the parameters, the device sums their gradients go to (a parameter
    /// gradient never leaves the device until the step's end), and the arena every run
    /// borrows.
    Device {
        params: &'a runtime::cuda::DeviceParams,
        grads: &'a std::cell::RefCell<runtime::cuda::DeviceSums>,
        arena: &'a std::cell::RefCell<runtime::cuda::DeviceArena>,
        names: &'a HashMap<String, Vec<f32>>,
        /// The most device memory in use at the end of a run so far.
        used: &'a std::cell::Cell<u64>,
        /// Every run starts from a NaN arena (tests).
        poison: bool,
        /// Whether the step ends by downloading the gradient sums (else they stay for an
        /// optimizer on the device).
        download: bool,
    },
}

/// A value between stage runs: token ids, f32 or bf16 (bf16 activations) values on the host,
/// or (GPU) values in device memory (f32 or bf16).
enum Val {
    Ids(Vec<i32>),
    F32(Vec<f32>),
    /// The bits of bf16 values: a CPU stage's bf16 output, held at 2 bytes per value as the
    /// planner prices it (the CPU executor reads and returns f32, rounded exactly back).
    Bf16(Vec<u16>),
    #[cfg(feature = "cuda")]
    Dev(runtime::cuda::DeviceValue),
}

impl Val {
    /// Bytes held.
    fn bytes(&self) -> u64 {
        match self {
            Val::Ids(v) => 4 * v.len() as u64,
            Val::F32(v) => 4 * v.len() as u64,
            Val::Bf16(v) => 2 * v.len() as u64,
            #[cfg(feature = "cuda")]
            Val::Dev(v) => v.len() as u64 * v.dtype().size(),
        }
    }
}

type Vals = HashMap<String, Val>;

/// Outputs read on the host after every run; all others stay where the run left them.
#[cfg(feature = "cuda")]
fn to_host(name: &str) -> bool {
    name == "loss" || name == "logits"
}

/// The CPU executor's inputs and states.
type HostMaps = (HashMap<String, HostData>, HashMap<String, Vec<f32>>);

/// Host values into the CPU executor's maps (moved, not copied; bf16 values widened, their
/// names returned so they go back narrowed).
fn host_maps(data: &mut Vals, states: &mut Vals) -> Result<(HostMaps, Vec<String>), Error> {
    let mut d = HashMap::with_capacity(data.len());
    let mut halves = Vec::new();
    for (k, v) in data.drain() {
        if matches!(v, Val::Bf16(_)) {
            halves.push(k.clone());
        }
        d.insert(
            k,
            match v {
                Val::Ids(x) => HostData::I32(x),
                Val::F32(x) => HostData::F32(x),
                Val::Bf16(x) => HostData::F32(runtime::cpu::from_bf16_bits(&x)),
                #[cfg(feature = "cuda")]
                Val::Dev(_) => return Err(on_device()),
            },
        );
    }
    let mut st = HashMap::with_capacity(states.len());
    for (k, v) in states.drain() {
        match v {
            Val::F32(x) => st.insert(k, x),
            _ => return Err(on_device()),
        };
    }
    Ok(((d, st), halves))
}

fn on_device() -> Error {
    Error::Input("a stage and its values are on different devices".into())
}

impl StageGraph {
    fn compile(g: &Graph, opts: &LowerOptions, device: Device) -> Result<StageGraph, Error> {
        match device {
            Device::Cpu => Ok(StageGraph::Cpu(Box::new(CpuGraph::compile(g, opts)?))),
            #[cfg(feature = "cuda")]
            Device::Cuda => crate::gpu::GpuGraph::compile(g, opts, codegen::nvptx::Target::Sm90, 0)
                .map(|g| StageGraph::Gpu(Box::new(g)))
                .map_err(|e| Error::Gpu(format!("--device cuda: {e}"))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(Error::Gpu(crate::model::NO_CUDA.into())),
        }
    }

    fn lowered(&self) -> &passes::Lowered {
        match self {
            StageGraph::Cpu(c) => &c.lowered,
            #[cfg(feature = "cuda")]
            StageGraph::Gpu(g) => &g.lowered,
        }
    }

    /// Runs the stage on `data` and `states` (left as they were); returns its outputs and
    /// the bytes of its arena.
    fn run(
        &self,
        syms: &[(&str, i64)],
        data: &mut Vals,
        params: &Params<'_>,
        states: &mut Vals,
    ) -> Result<(Vals, u64), Error> {
        match (self, params) {
            (StageGraph::Cpu(c), Params::Host(p)) => {
                let ((d, st), halves) = host_maps(data, states)?;
                let run = c.run(syms, &d, p, &st);
                data.extend(d.into_iter().map(|(k, v)| {
                    let v = match v {
                        HostData::I32(x) => Val::Ids(x),
                        HostData::F32(x) if halves.contains(&k) => {
                            Val::Bf16(runtime::cpu::to_bf16_bits(&x))
                        }
                        HostData::F32(x) => Val::F32(x),
                    };
                    (k, v)
                }));
                states.extend(st.into_iter().map(|(k, v)| (k, Val::F32(v))));
                let (outs, prof) = run?;
                let l = &c.lowered;
                let bf16 = |name: &str| {
                    l.outputs
                        .iter()
                        .any(|(n, b)| n == name && l.buffers[*b].dtype == ir::DType::BF16)
                };
                let outs = outs
                    .into_iter()
                    .map(|(k, v)| {
                        let v = if bf16(&k) {
                            Val::Bf16(runtime::cpu::to_bf16_bits(&v))
                        } else {
                            Val::F32(v)
                        };
                        (k, v)
                    })
                    .collect();
                Ok((outs, prof.arena_bytes))
            }
            #[cfg(feature = "cuda")]
            (
                StageGraph::Gpu(g),
                Params::Device {
                    params,
                    grads,
                    arena,
                    names,
                    used,
                    poison,
                    ..
                },
            ) => {
                let is_param_grad = |n: &str| {
                    n.strip_prefix("grad.")
                        .is_some_and(|p| names.contains_key(p))
                };
                // Device values are read in place; the few host ones (token ids, the
                // first segment's states) are uploaded by the run.
                let (mut host, mut host_states) = (HashMap::new(), HashMap::new());
                let mut device = HashMap::new();
                for (k, v) in data.iter() {
                    let d = match v {
                        Val::Ids(x) => HostData::I32(x.clone()),
                        Val::F32(x) => HostData::F32(x.clone()),
                        Val::Bf16(x) => HostData::F32(runtime::cpu::from_bf16_bits(x)),
                        Val::Dev(x) => {
                            device.insert(k.clone(), x);
                            continue;
                        }
                    };
                    host.insert(k.clone(), d);
                }
                for (k, v) in states.iter() {
                    match v {
                        Val::F32(x) => {
                            host_states.insert(k.clone(), x.clone());
                        }
                        Val::Dev(x) => {
                            device.insert(k.clone(), x);
                        }
                        Val::Ids(_) | Val::Bf16(_) => {
                            return Err(Error::Input(format!("state `{k}` is not f32")));
                        }
                    }
                }
                let mut sums = grads.borrow_mut();
                let mut arena = arena.borrow_mut();
                let opts = runtime::cuda::ExecOptions {
                    poison: *poison,
                    ..Default::default()
                };
                let (outs, peak) = g
                    .run_resident(
                        syms,
                        (&host, &host_states),
                        &device,
                        params,
                        &mut arena,
                        opts,
                        Some((&mut sums, &is_param_grad)),
                        &to_host,
                    )
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                used.set(used.get().max(outs.device_used));
                let mut vals: Vals = outs
                    .host
                    .into_iter()
                    .map(|(k, v)| (k, Val::F32(v)))
                    .collect();
                vals.extend(outs.device.into_iter().map(|(k, v)| (k, Val::Dev(v))));
                Ok((vals, peak))
            }
            #[cfg(feature = "cuda")]
            _ => Err(on_device()),
        }
    }

    /// `v` on the host.
    fn download(&self, v: Val) -> Result<Vec<f32>, Error> {
        match (v, self) {
            (Val::F32(x), _) => Ok(x),
            (Val::Bf16(x), _) => Ok(runtime::cpu::from_bf16_bits(&x)),
            (Val::Ids(_), _) => Err(Error::Input("token ids where values were expected".into())),
            #[cfg(feature = "cuda")]
            (Val::Dev(x), StageGraph::Gpu(g)) => g
                .exec()
                .download_value(&x)
                .map_err(|e| Error::Gpu(e.to_string())),
            #[cfg(feature = "cuda")]
            (Val::Dev(_), _) => Err(on_device()),
        }
    }
}

/// One stage variant compiled for a device.
struct Compiled {
    fwd: StageGraph,
    train: StageGraph,
    saved: Vec<String>,
}

impl Compiled {
    fn new(v: &Variant, opts: &LowerOptions, device: Device) -> Result<Compiled, Error> {
        Ok(Compiled {
            fwd: StageGraph::compile(&v.fwd_graph, opts, device)?,
            train: StageGraph::compile(&v.train_graph, opts, device)?,
            saved: v.saved.clone(),
        })
    }
}

/// A layer group: its variants by keep, its states and boundary names.
struct Group {
    by_keep: HashMap<Keep, Compiled>,
    states: Vec<String>,
    input: String,
    output: String,
}

/// A training step compiled for one plan.
pub struct CheckpointedStep {
    pub plan: Plan,
    pub device: Device,
    /// On the GPU: fill the shared arena with NaN before every stage run (tests).
    pub poison: bool,
    embed: Compiled,
    head: Compiled,
    groups: Vec<Group>,
    /// The embedding's output (group 0's input) and the top group's output (the head's).
    embed_out: String,
    head_in: String,
}

/// What one step produced.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// Mean next-token cross-entropy over the valid targets.
    pub loss: f64,
    /// Gradients of the mean loss by parameter name.
    pub grads: HashMap<String, Vec<f32>>,
    /// Final recurrent states (after the last segment), by name.
    pub final_states: HashMap<String, Vec<f32>>,
    /// The largest number of bytes the schedule held at once (module doc).
    pub peak_bytes: u64,
    /// `[B, L, V]` logits when the plan asks for them ([`Plan::logits`]), else empty.
    pub logits: Vec<f32>,
    /// On the GPU: the most device memory in use at the end of a stage run (`cuMemGetInfo`:
    /// everything on the GPU, parameters and gradient sums included).
    pub device_peak_bytes: Option<u64>,
}

fn one_boundary(names: &[String], what: &str) -> Result<String, Error> {
    match names {
        [one] => Ok(one.clone()),
        _ => Err(Error::Input(format!(
            "checkpointing needs exactly one value between consecutive stages; {what} has {}",
            names.len()
        ))),
    }
}

impl CheckpointedStep {
    /// Splits `model` (a forward graph with a `logits` output) into the plan's stages and
    /// compiles every stage variant the plan uses for the CPU.
    pub fn compile(model: &Graph, plan: &Plan) -> Result<CheckpointedStep, Error> {
        CheckpointedStep::compile_for(model, plan, Device::Cpu)
    }

    /// [`CheckpointedStep::compile`] for a device.
    pub fn compile_for(
        model: &Graph,
        plan: &Plan,
        device: Device,
    ) -> Result<CheckpointedStep, Error> {
        let stages = stage::split(model, &plan.groups).map_err(|e| Error::Input(e.to_string()))?;
        let plan_err = |e: passes::remat::PlanError| Error::Input(e.to_string());
        // Lowered as the plan was priced: activations stored in its dtype.
        let opts = LowerOptions {
            bf16_activations: plan.act_dtype == ir::DType::BF16,
            ..LowerOptions::default()
        };
        let embed_st = &stages[0];
        let head_st = &stages[stages.len() - 1];
        let embed = Compiled::new(
            &passes::remat::variant(embed_st, Keep::Nothing, IGNORE_INDEX, false, &opts)
                .map_err(plan_err)?,
            &opts,
            device,
        )?;
        let head = Compiled::new(
            &passes::remat::variant(head_st, Keep::Nothing, IGNORE_INDEX, plan.logits, &opts)
                .map_err(plan_err)?,
            &opts,
            device,
        )?;
        let mut groups = Vec::new();
        for (g, st) in stages[1..stages.len() - 1].iter().enumerate() {
            debug_assert!(matches!(st.kind, StageKind::Layers(_)));
            let mut keeps: Vec<Keep> = (0..plan.segments()).map(|t| plan.keep(t, g)).collect();
            keeps.sort();
            keeps.dedup();
            let mut by_keep = HashMap::new();
            for k in keeps {
                let v =
                    passes::remat::variant(st, k, IGNORE_INDEX, false, &opts).map_err(plan_err)?;
                by_keep.insert(k, Compiled::new(&v, &opts, device)?);
            }
            let states = st
                .graph
                .nodes()
                .filter_map(|n| match st.graph.op(n) {
                    Op::Input {
                        name,
                        kind: InputKind::State,
                        ..
                    } => Some(name.clone()),
                    _ => None,
                })
                .collect();
            groups.push(Group {
                by_keep,
                states,
                input: one_boundary(&st.boundary_inputs, "a layer group's input")?,
                output: one_boundary(&st.boundary_outputs, "a layer group's output")?,
            });
        }
        Ok(CheckpointedStep {
            plan: plan.clone(),
            device,
            poison: false,
            embed,
            head,
            embed_out: one_boundary(&embed_st.boundary_outputs, "the embedding")?,
            head_in: one_boundary(&head_st.boundary_inputs, "the head")?,
            groups,
        })
    }

    /// One step: `ids` and `targets` are `[B, L]` for the plan's batch and length; `states`
    /// are the initial recurrent states (missing ones are zeros).
    pub fn run(
        &self,
        params: &HashMap<String, Vec<f32>>,
        ids: &[i32],
        targets: &[i32],
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<StepOutput, Error> {
        match &self.embed.fwd {
            StageGraph::Cpu(_) => {
                self.run_with(&Params::Host(params), params, ids, targets, states)
            }
            #[cfg(feature = "cuda")]
            StageGraph::Gpu(g) => {
                // Uploaded once per step: every stage run reads the same device copy.
                let dev = g
                    .upload_params(params)
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                let (out, _) = self.run_device(&dev, params, ids, targets, states, true)?;
                Ok(out)
            }
        }
    }

    /// [`CheckpointedStep::run`] on the GPU with the parameters already there (`names`: the
    /// host map of the same parameters, read for their names only), the gradients left
    /// there too: `StepOutput::grads` is empty and the sums returned are of the total loss
    /// (the mean's gradients times the number of valid targets).
    #[cfg(feature = "cuda")]
    pub fn run_on_device(
        &self,
        params: &runtime::cuda::DeviceParams,
        names: &HashMap<String, Vec<f32>>,
        ids: &[i32],
        targets: &[i32],
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<(StepOutput, runtime::cuda::DeviceSums), Error> {
        match &self.embed.fwd {
            StageGraph::Gpu(_) => self.run_device(params, names, ids, targets, states, false),
            StageGraph::Cpu(_) => Err(on_device()),
        }
    }

    #[cfg(feature = "cuda")]
    fn run_device(
        &self,
        params: &runtime::cuda::DeviceParams,
        names: &HashMap<String, Vec<f32>>,
        ids: &[i32],
        targets: &[i32],
        states: &HashMap<String, Vec<f32>>,
        download: bool,
    ) -> Result<(StepOutput, runtime::cuda::DeviceSums), Error> {
        let grads = std::cell::RefCell::new(runtime::cuda::DeviceSums::default());
        let arena = std::cell::RefCell::new(runtime::cuda::DeviceArena::default());
        let used = std::cell::Cell::new(0);
        let run = Params::Device {
            params,
            grads: &grads,
            arena: &arena,
            names,
            used: &used,
            poison: self.poison,
            download,
        };
        let mut out = self.run_with(&run, names, ids, targets, states)?;
        out.device_peak_bytes = Some(used.get());
        Ok((out, grads.into_inner()))
    }

    fn run_with(
        &self,
        run_params: &Params<'_>,
        params: &HashMap<String, Vec<f32>>,
        ids: &[i32],
        targets: &[i32],
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<StepOutput, Error> {
        let p = &self.plan;
        let (b, seq) = (p.batch as usize, p.seq as usize);
        if ids.len() != b * seq || targets.len() != b * seq {
            return Err(Error::Input(format!(
                "the plan is for batch {b} x {seq} tokens; got {} ids and {} targets",
                ids.len(),
                targets.len()
            )));
        }
        if self.groups.is_empty() {
            return Err(Error::Input(
                "the plan has no layer group between the embedding and the head".into(),
            ));
        }
        let mut ledger = Ledger::default();
        ledger.hold(2 * 4 * (b * seq) as u64);
        let ranges = p.segment_ranges();
        let slice_tokens = |v: &[i32], r: &std::ops::Range<u64>| -> Val {
            let mut out = Vec::with_capacity(b * (r.end - r.start) as usize);
            for bi in 0..b {
                out.extend_from_slice(&v[bi * seq + r.start as usize..bi * seq + r.end as usize]);
            }
            Val::Ids(out)
        };
        // Running states: zeros or the caller's, one copy each, and their gradients.
        let mut running = Vals::new();
        let mut state_cot = Vals::new();
        for g in &self.groups {
            for name in &g.states {
                let v = match states.get(name) {
                    Some(v) => v.clone(),
                    None => {
                        let len = self.state_len(g, name, b)?;
                        vec![0.0; len]
                    }
                };
                ledger.hold(4 * 2 * v.len() as u64);
                state_cot.insert(format!("cotangent.{name}"), Val::F32(vec![0.0; v.len()]));
                running.insert(name.clone(), Val::F32(v));
            }
        }
        let mut empty = Vals::new();
        let ng = self.groups.len();
        let nseg = ranges.len();
        // Checkpoints: [segment][group] -> (states at its start, its output, saved values).
        let mut seq_ckpt: Vec<Vec<Vals>> = (0..nseg)
            .map(|_| (0..ng).map(|_| Vals::new()).collect())
            .collect();
        let mut layer_ckpt: Vec<Vec<Option<Val>>> =
            (0..nseg).map(|_| (0..ng).map(|_| None).collect()).collect();
        let mut saved: Vec<Vec<Vals>> = (0..nseg)
            .map(|_| (0..ng).map(|_| Vals::new()).collect())
            .collect();

        // Forward.
        for (t, r) in ranges.iter().enumerate() {
            let syms = [("B", b as i64), ("L", (r.end - r.start) as i64)];
            let mut data = Vals::from([("input_ids".to_string(), slice_tokens(ids, r))]);
            let (outs, arena) = self
                .embed
                .fwd
                .run(&syms, &mut data, run_params, &mut empty)?;
            ledger.run(arena, &outs);
            let mut h = take(outs, &self.embed_out)?;
            ledger.hold(h.bytes());
            let mut h_is_ckpt = false;
            for (g, grp) in self.groups.iter().enumerate() {
                let c = self.cell(t, g)?;
                // The states entering the cell are its sequence checkpoint.
                let mut start = Vals::new();
                for n in &grp.states {
                    let v = running.remove(n).ok_or_else(|| missing(n))?;
                    start.insert(n.clone(), v);
                }
                ledger.hold(vals_bytes(&start));
                data.clear();
                data.insert(grp.input.clone(), h);
                let (mut outs, arena) = c.fwd.run(&syms, &mut data, run_params, &mut start)?;
                ledger.run(arena, &outs);
                let h_in = data.remove(&grp.input).ok_or_else(|| missing(&grp.input))?;
                if h_is_ckpt {
                    layer_ckpt[t][g - 1] = Some(h_in);
                } else {
                    // The embedding's output: recomputed in the backward pass.
                    ledger.release(h_in.bytes());
                    drop(h_in);
                }
                seq_ckpt[t][g] = start;
                for name in &grp.states {
                    let v = outs.remove(name).ok_or_else(|| missing(name))?;
                    running.insert(name.clone(), v);
                }
                for name in &c.saved {
                    let v = outs.remove(name).ok_or_else(|| missing(name))?;
                    ledger.hold(v.bytes());
                    saved[t][g].insert(name.clone(), v);
                }
                h = outs
                    .remove(&grp.output)
                    .ok_or_else(|| missing(&grp.output))?;
                ledger.hold(h.bytes());
                h_is_ckpt = true;
            }
            layer_ckpt[t][ng - 1] = Some(h);
        }
        let mut final_states = HashMap::with_capacity(running.len());
        for (name, v) in running {
            final_states.insert(name, self.embed.fwd.download(v)?);
        }

        // Backward.
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); nseg];
        for t in (0..nseg).rev() {
            let r = &ranges[t];
            let syms = [("B", b as i64), ("L", (r.end - r.start) as i64)];
            let top = layer_ckpt[t][ng - 1]
                .take()
                .ok_or_else(|| missing(&self.head_in))?;
            let mut data = Vals::from([
                (self.head_in.clone(), top),
                ("targets".to_string(), slice_tokens(targets, r)),
            ]);
            let (mut outs, arena) = self
                .head
                .train
                .run(&syms, &mut data, run_params, &mut empty)?;
            ledger.run(arena, &outs);
            if let Some(v) = data.remove(&self.head_in) {
                ledger.release(v.bytes());
            }
            if let Some(v) = outs.remove("logits") {
                logits[t] = self.head.train.download(v)?;
            }
            let loss = outs.remove("loss").ok_or_else(|| missing("loss"))?;
            loss_sum += self
                .head
                .train
                .download(loss)?
                .first()
                .copied()
                .unwrap_or(f32::NAN) as f64;
            let mut cot = outs
                .remove(&format!("grad.{}", self.head_in))
                .ok_or_else(|| missing(&self.head_in))?;
            ledger.hold(cot.bytes());
            accumulate(&mut grads, outs, params)?;
            for g in (0..ng).rev() {
                let grp = &self.groups[g];
                let c = self.cell(t, g)?;
                let input = if g == 0 {
                    let mut d = Vals::from([("input_ids".to_string(), slice_tokens(ids, r))]);
                    let (outs, arena) =
                        self.embed.fwd.run(&syms, &mut d, run_params, &mut empty)?;
                    ledger.run(arena, &outs);
                    let h0 = take(outs, &self.embed_out)?;
                    ledger.hold(h0.bytes());
                    h0
                } else {
                    layer_ckpt[t][g - 1]
                        .take()
                        .ok_or_else(|| missing(&grp.input))?
                };
                let mut data = Vals::new();
                data.insert(grp.input.clone(), input);
                data.insert(format!("cotangent.{}", grp.output), cot);
                for name in &grp.states {
                    let key = format!("cotangent.{name}");
                    let v = state_cot.remove(&key).ok_or_else(|| missing(&key))?;
                    data.insert(key, v);
                }
                data.extend(saved[t][g].drain());
                let mut start = std::mem::take(&mut seq_ckpt[t][g]);
                let (mut outs, arena) = c.train.run(&syms, &mut data, run_params, &mut start)?;
                ledger.run(arena, &outs);
                ledger.release(vals_bytes(&start));
                for (name, v) in data {
                    if grp
                        .states
                        .iter()
                        .any(|st| name == format!("cotangent.{st}"))
                    {
                        continue; // replaced below; part of the carried states' gradients
                    }
                    ledger.release(v.bytes());
                }
                cot = outs
                    .remove(&format!("grad.{}", grp.input))
                    .ok_or_else(|| missing(&grp.input))?;
                ledger.hold(cot.bytes());
                for name in &grp.states {
                    let v = outs
                        .remove(&format!("grad.{name}"))
                        .ok_or_else(|| missing(name))?;
                    state_cot.insert(format!("cotangent.{name}"), v);
                }
                accumulate(&mut grads, outs, params)?;
            }
            let mut data = Vals::from([
                ("input_ids".to_string(), slice_tokens(ids, r)),
                (format!("cotangent.{}", self.embed_out), cot),
            ]);
            let (outs, arena) = self
                .embed
                .train
                .run(&syms, &mut data, run_params, &mut empty)?;
            ledger.run(arena, &outs);
            if let Some(v) = data.remove(&format!("cotangent.{}", self.embed_out)) {
                ledger.release(v.bytes());
            }
            accumulate(&mut grads, outs, params)?;
        }
        // On the GPU the parameter gradients were summed on the device: the host map has none.
        #[cfg(feature = "cuda")]
        if let (
            Params::Device {
                grads: sums,
                download: true,
                ..
            },
            StageGraph::Gpu(g),
        ) = (run_params, &self.embed.fwd)
        {
            let summed = g
                .exec()
                .read_sums(&sums.borrow())
                .map_err(|e| Error::Gpu(e.to_string()))?;
            grads.extend(summed);
        }
        let valid = valid_targets(targets);
        let scale = 1.0 / valid as f32;
        let mut mean_grads = HashMap::with_capacity(grads.len());
        for (name, mut v) in grads {
            let Some(param) = name.strip_prefix("grad.") else {
                continue;
            };
            if !params.contains_key(param) {
                continue;
            }
            for x in &mut v {
                *x *= scale;
            }
            mean_grads.insert(param.to_string(), v);
        }
        // Segments' logits `[B, s, V]` back into `[B, L, V]`.
        let mut all_logits = Vec::new();
        if p.logits {
            let total: usize = logits.iter().map(Vec::len).sum();
            let vocab = total / (b * seq).max(1);
            all_logits.reserve(total);
            for bi in 0..b {
                for (t, r) in ranges.iter().enumerate() {
                    let n = (r.end - r.start) as usize * vocab;
                    let rows = logits[t]
                        .get(bi * n..(bi + 1) * n)
                        .ok_or_else(|| missing("logits"))?;
                    all_logits.extend_from_slice(rows);
                }
            }
        }
        Ok(StepOutput {
            logits: all_logits,
            loss: loss_sum / valid as f64,
            grads: mean_grads,
            final_states,
            peak_bytes: ledger.peak,
            device_peak_bytes: None,
        })
    }

    /// The compiled variant of cell (segment `t`, group `g`).
    fn cell(&self, t: usize, g: usize) -> Result<&Compiled, Error> {
        let k = self.plan.keep(t as u64, g);
        self.groups[g]
            .by_keep
            .get(&k)
            .ok_or_else(|| Error::Input(format!("cell ({t}, {g}) was not compiled")))
    }

    fn state_len(&self, g: &Group, name: &str, b: usize) -> Result<usize, Error> {
        for c in g.by_keep.values() {
            for buf in &c.fwd.lowered().buffers {
                if buf.kind == passes::BufKind::State(name.to_string()) {
                    let bind = |s: &str| (s == "B").then_some(b as u64);
                    let n = ir::types::numel(&buf.shape)
                        .and_then(|d| d.eval(&bind))
                        .ok_or_else(|| missing(name))?;
                    return Ok(n as usize);
                }
            }
        }
        Err(missing(name))
    }
}

fn missing(name: &str) -> Error {
    Error::Input(format!("a stage did not produce `{name}`"))
}

fn take(mut outs: Vals, name: &str) -> Result<Val, Error> {
    outs.remove(name).ok_or_else(|| missing(name))
}

fn vals_bytes(m: &Vals) -> u64 {
    m.values().map(Val::bytes).sum()
}

/// The targets the mean loss averages over.
pub(crate) fn valid_targets(targets: &[i32]) -> usize {
    targets
        .iter()
        .filter(|&&t| t as i64 != IGNORE_INDEX)
        .count()
}

/// Adds every parameter's `grad.*` output into the accumulators (in a fixed order: the
/// outputs' names sorted, so the result does not depend on hash order). On the GPU they
/// went to device sums instead and none is left here.
fn accumulate(
    acc: &mut HashMap<String, Vec<f32>>,
    outs: Vals,
    params: &HashMap<String, Vec<f32>>,
) -> Result<(), Error> {
    let mut outs: Vec<(String, Val)> = outs
        .into_iter()
        .filter(|(n, _)| {
            n.strip_prefix("grad.")
                .is_some_and(|p| params.contains_key(p))
        })
        .collect();
    outs.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in outs {
        let Val::F32(v) = v else {
            return Err(Error::Input(format!(
                "`{name}` stayed on the device instead of reaching its sum"
            )));
        };
        match acc.get_mut(&name) {
            Some(a) => {
                for (x, y) in a.iter_mut().zip(&v) {
                    *x += y;
                }
            }
            None => {
                acc.insert(name, v);
            }
        }
    }
    Ok(())
}

/// Bytes held by the schedule, and the most at any time.
#[derive(Default)]
struct Ledger {
    live: u64,
    peak: u64,
}

impl Ledger {
    fn hold(&mut self, bytes: u64) {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
    }

    fn release(&mut self, bytes: u64) {
        self.live = self.live.saturating_sub(bytes);
    }

    /// A stage run: its arena and outputs were held on top of everything else.
    fn run(&mut self, arena: u64, outs: &Vals) {
        self.peak = self.peak.max(self.live + arena + vals_bytes(outs));
    }
}
