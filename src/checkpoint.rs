//! Running a training step under a checkpoint plan: the schedule of [`passes::remat`]
//! (forward over segments storing layer and sequence checkpoints, backward over cells
//! recomputing what was not kept), with a ledger of the bytes it holds.
//!
//! Stages run on the CPU (Cranelift) or, with the `cuda` feature, on the GPU: there the
//! parameters are uploaded once per step and shared by every stage run, and the values
//! between runs (checkpoints, boundary values, states) are held on the host and move in and
//! out with each run. The ledger counts them as the planner does, wherever they are held.
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
    /// On the GPU: the parameters, and the device sums their gradients go to (a parameter
    /// gradient never leaves the device until the step's end).
    Device {
        params: &'a runtime::cuda::DeviceParams,
        grads: &'a std::cell::RefCell<runtime::cuda::DeviceSums>,
        names: &'a HashMap<String, Vec<f32>>,
    },
}

impl StageGraph {
    fn compile(g: &Graph, device: Device) -> Result<StageGraph, Error> {
        let opts = LowerOptions::default();
        match device {
            Device::Cpu => Ok(StageGraph::Cpu(Box::new(CpuGraph::compile(g, &opts)?))),
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                crate::gpu::GpuGraph::compile(g, &opts, codegen::nvptx::Target::Sm90, 0)
                    .map(|g| StageGraph::Gpu(Box::new(g)))
                    .map_err(|e| Error::Gpu(format!("--device cuda: {e}")))
            }
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

    /// Runs the stage; returns its outputs and the bytes of its arena.
    fn run(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &Params<'_>,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<(runtime::cpu::Outputs, u64), Error> {
        match (self, params) {
            (StageGraph::Cpu(c), Params::Host(p)) => {
                let (outs, prof) = c.run(syms, data, p, states)?;
                Ok((outs, prof.arena_bytes))
            }
            #[cfg(feature = "cuda")]
            (
                StageGraph::Gpu(g),
                Params::Device {
                    params,
                    grads,
                    names,
                },
            ) => {
                let is_param_grad = |n: &str| {
                    n.strip_prefix("grad.")
                        .is_some_and(|p| names.contains_key(p))
                };
                let mut sums = grads.borrow_mut();
                g.run_summing(
                    syms,
                    data,
                    params,
                    states,
                    runtime::cuda::ExecOptions::default(),
                    Some((&mut sums, &is_param_grad)),
                )
                .map_err(|e| Error::Gpu(e.to_string()))
            }
            #[cfg(feature = "cuda")]
            _ => Err(Error::Input(
                "a stage and its parameters are on different devices".into(),
            )),
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
    fn new(v: &Variant, device: Device) -> Result<Compiled, Error> {
        Ok(Compiled {
            fwd: StageGraph::compile(&v.fwd_graph, device)?,
            train: StageGraph::compile(&v.train_graph, device)?,
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
        let opts = LowerOptions::default();
        let embed_st = &stages[0];
        let head_st = &stages[stages.len() - 1];
        let embed = Compiled::new(
            &passes::remat::variant(embed_st, Keep::Nothing, IGNORE_INDEX, false, &opts)
                .map_err(plan_err)?,
            device,
        )?;
        let head = Compiled::new(
            &passes::remat::variant(head_st, Keep::Nothing, IGNORE_INDEX, plan.logits, &opts)
                .map_err(plan_err)?,
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
                by_keep.insert(k, Compiled::new(&v, device)?);
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
                let grads = std::cell::RefCell::new(runtime::cuda::DeviceSums::default());
                let run = Params::Device {
                    params: &dev,
                    grads: &grads,
                    names: params,
                };
                self.run_with(&run, params, ids, targets, states)
            }
        }
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
        let mut ledger = Ledger::default();
        ledger.hold(2 * 4 * (b * seq) as u64);
        let ranges = p.segment_ranges();
        let slice_tokens = |v: &[i32], r: &std::ops::Range<u64>| -> Vec<i32> {
            let mut out = Vec::with_capacity(b * (r.end - r.start) as usize);
            for bi in 0..b {
                out.extend_from_slice(&v[bi * seq + r.start as usize..bi * seq + r.end as usize]);
            }
            out
        };
        // Running states: zeros or the caller's, one copy each, and their gradients.
        let mut running: HashMap<String, Vec<f32>> = HashMap::new();
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
                running.insert(name.clone(), v);
            }
        }
        let empty: HashMap<String, Vec<f32>> = HashMap::new();
        let ng = self.groups.len();
        let nseg = ranges.len();
        // Checkpoints: [segment][group] -> (states at its start, its output, saved values).
        let mut seq_ckpt: Vec<Vec<HashMap<String, Vec<f32>>>> =
            vec![vec![HashMap::new(); ng]; nseg];
        let mut layer_ckpt: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; ng]; nseg];
        let mut saved: Vec<Vec<HashMap<String, Vec<f32>>>> = vec![vec![HashMap::new(); ng]; nseg];

        // Forward.
        for (t, r) in ranges.iter().enumerate() {
            let syms = [("B", b as i64), ("L", (r.end - r.start) as i64)];
            let seg_ids = slice_tokens(ids, r);
            let mut data = HashMap::from([("input_ids".to_string(), HostData::I32(seg_ids))]);
            let (outs, arena) = self.embed.fwd.run(&syms, &data, run_params, &empty)?;
            ledger.run(arena, &outs);
            let mut h = take(outs, &self.embed_out)?;
            ledger.hold(4 * h.len() as u64);
            let mut h_is_ckpt = false;
            for (g, grp) in self.groups.iter().enumerate() {
                let k = p.keep(t as u64, g);
                let c = grp
                    .by_keep
                    .get(&k)
                    .ok_or_else(|| Error::Input(format!("cell ({t}, {g}) was not compiled")))?;
                let start: HashMap<String, Vec<f32>> = grp
                    .states
                    .iter()
                    .map(|n| {
                        let v = running.get(n).ok_or_else(|| missing(n))?;
                        Ok((n.clone(), v.clone()))
                    })
                    .collect::<Result<_, Error>>()?;
                ledger.hold(bytes_of(&start));
                data.clear();
                data.insert(grp.input.clone(), HostData::F32(h));
                let (outs, arena) = c.fwd.run(&syms, &data, run_params, &start)?;
                ledger.run(arena, &outs);
                let HostData::F32(h_in) =
                    data.remove(&grp.input).unwrap_or(HostData::F32(Vec::new()))
                else {
                    return Err(Error::Input("a boundary value changed type".into()));
                };
                if h_is_ckpt {
                    layer_ckpt[t][g - 1] = Some(h_in);
                } else {
                    // The embedding's output: recomputed in the backward pass.
                    ledger.release(4 * h_in.len() as u64);
                    drop(h_in);
                }
                seq_ckpt[t][g] = start;
                let mut outs: HashMap<String, Vec<f32>> = outs.into_iter().collect();
                for name in &grp.states {
                    if let Some(v) = outs.remove(name) {
                        running.insert(name.clone(), v);
                    }
                }
                for name in &c.saved {
                    let v = outs.remove(name).ok_or_else(|| missing(name))?;
                    ledger.hold(4 * v.len() as u64);
                    saved[t][g].insert(name.clone(), v);
                }
                h = outs
                    .remove(&grp.output)
                    .ok_or_else(|| missing(&grp.output))?;
                ledger.hold(4 * h.len() as u64);
                h_is_ckpt = true;
            }
            layer_ckpt[t][ng - 1] = Some(h);
        }
        let final_states = running.clone();

        // Backward.
        let mut grads: HashMap<String, Vec<f32>> = HashMap::new();
        let mut state_cot: HashMap<String, Vec<f32>> = running
            .iter()
            .map(|(k, v)| (format!("cotangent.{k}"), vec![0.0; v.len()]))
            .collect();
        let mut loss_sum = 0f64;
        let mut logits: Vec<Vec<f32>> = vec![Vec::new(); nseg];
        for t in (0..nseg).rev() {
            let r = &ranges[t];
            let syms = [("B", b as i64), ("L", (r.end - r.start) as i64)];
            let seg_targets = slice_tokens(targets, r);
            let top = layer_ckpt[t][ng - 1]
                .take()
                .ok_or_else(|| missing(&self.head_in))?;
            let mut data = HashMap::from([
                (self.head_in.clone(), HostData::F32(top)),
                ("targets".to_string(), HostData::I32(seg_targets)),
            ]);
            let (outs, arena) = self.head.train.run(&syms, &data, run_params, &empty)?;
            ledger.run(arena, &outs);
            if let Some(HostData::F32(v)) = data.remove(&self.head_in) {
                ledger.release(4 * v.len() as u64);
            }
            let mut outs: HashMap<String, Vec<f32>> = outs.into_iter().collect();
            if let Some(v) = outs.remove("logits") {
                logits[t] = v;
            }
            loss_sum += outs
                .get("loss")
                .and_then(|v| v.first())
                .copied()
                .unwrap_or(f32::NAN) as f64;
            let mut cot = outs
                .remove(&format!("grad.{}", self.head_in))
                .ok_or_else(|| missing(&self.head_in))?;
            ledger.hold(4 * cot.len() as u64);
            accumulate(&mut grads, outs);
            for g in (0..ng).rev() {
                let grp = &self.groups[g];
                let k = p.keep(t as u64, g);
                let c = grp
                    .by_keep
                    .get(&k)
                    .ok_or_else(|| Error::Input(format!("cell ({t}, {g}) was not compiled")))?;
                let input = if g == 0 {
                    let ids_t = slice_tokens(ids, r);
                    let d = HashMap::from([("input_ids".to_string(), HostData::I32(ids_t))]);
                    let (outs, arena) = self.embed.fwd.run(&syms, &d, run_params, &empty)?;
                    ledger.run(arena, &outs);
                    let h0 = take(outs, &self.embed_out)?;
                    ledger.hold(4 * h0.len() as u64);
                    h0
                } else {
                    layer_ckpt[t][g - 1]
                        .take()
                        .ok_or_else(|| missing(&grp.input))?
                };
                let mut data: HashMap<String, HostData> = HashMap::new();
                data.insert(grp.input.clone(), HostData::F32(input));
                data.insert(format!("cotangent.{}", grp.output), HostData::F32(cot));
                for name in &grp.states {
                    let key = format!("cotangent.{name}");
                    let v = state_cot.remove(&key).ok_or_else(|| missing(&key))?;
                    data.insert(key, HostData::F32(v));
                }
                for (name, v) in saved[t][g].drain() {
                    data.insert(name, HostData::F32(v));
                }
                let start = std::mem::take(&mut seq_ckpt[t][g]);
                let (outs, arena) = c.train.run(&syms, &data, run_params, &start)?;
                ledger.run(arena, &outs);
                ledger.release(bytes_of(&start));
                for (name, v) in data {
                    let HostData::F32(v) = v else { continue };
                    if grp
                        .states
                        .iter()
                        .any(|st| name == format!("cotangent.{st}"))
                    {
                        continue; // replaced below; part of the carried states' gradients
                    }
                    ledger.release(4 * v.len() as u64);
                }
                let mut outs: HashMap<String, Vec<f32>> = outs.into_iter().collect();
                cot = outs
                    .remove(&format!("grad.{}", grp.input))
                    .ok_or_else(|| missing(&grp.input))?;
                ledger.hold(4 * cot.len() as u64);
                for name in &grp.states {
                    let v = outs
                        .remove(&format!("grad.{name}"))
                        .ok_or_else(|| missing(name))?;
                    state_cot.insert(format!("cotangent.{name}"), v);
                }
                accumulate(&mut grads, outs);
            }
            let ids_t = slice_tokens(ids, r);
            let mut data = HashMap::from([
                ("input_ids".to_string(), HostData::I32(ids_t)),
                (format!("cotangent.{}", self.embed_out), HostData::F32(cot)),
            ]);
            let (outs, arena) = self.embed.train.run(&syms, &data, run_params, &empty)?;
            ledger.run(arena, &outs);
            if let Some(HostData::F32(v)) = data.remove(&format!("cotangent.{}", self.embed_out)) {
                ledger.release(4 * v.len() as u64);
            }
            accumulate(&mut grads, outs.into_iter().collect());
        }
        // On the GPU the parameter gradients were summed on the device: the host map has none.
        #[cfg(feature = "cuda")]
        if let (Params::Device { grads: sums, .. }, StageGraph::Gpu(g)) =
            (run_params, &self.embed.fwd)
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
        })
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

fn take(outs: runtime::cpu::Outputs, name: &str) -> Result<Vec<f32>, Error> {
    outs.into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| missing(name))
}

fn bytes_of(m: &HashMap<String, Vec<f32>>) -> u64 {
    m.values().map(|v| 4 * v.len() as u64).sum()
}

/// Adds every `grad.*` output into the accumulators (in a fixed order: the outputs' names
/// sorted, so the result does not depend on hash order).
/// The targets the mean loss averages over.
fn valid_targets(targets: &[i32]) -> usize {
    targets
        .iter()
        .filter(|&&t| t as i64 != IGNORE_INDEX)
        .count()
}

fn accumulate(acc: &mut HashMap<String, Vec<f32>>, outs: HashMap<String, Vec<f32>>) {
    let mut outs: Vec<(String, Vec<f32>)> = outs
        .into_iter()
        .filter(|(n, _)| n.starts_with("grad."))
        .collect();
    outs.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in outs {
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
    fn run(&mut self, arena: u64, outs: &runtime::cpu::Outputs) {
        let out: u64 = outs.iter().map(|(_, v)| 4 * v.len() as u64).sum();
        self.peak = self.peak.max(self.live + arena + out);
    }
}
