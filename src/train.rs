//! Training on the CPU: the autodiff training graph compiled once, AdamW with f32 master
//! weights, global-norm gradient clipping, linear warmup then cosine decay.
//!
//! Weight decay skips `A_log`, `D`, the dt bias (`dt_bias`, `dt_proj.bias`) and norm weights,
//! as the reference implementation does.

use crate::checkpoint::{CheckpointedStep, Device};
use crate::model::{CpuGraph, Error, IGNORE_INDEX};
use ir::Graph;
use passes::LowerOptions;
use passes::remat::{Plan, Planner, Request};
use runtime::cpu::HostData;
use std::collections::HashMap;

/// f32 tensors by parameter name.
pub type Tensors = HashMap<String, Vec<f32>>;

/// Optimizer and schedule settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Largest global gradient norm; larger gradients are scaled down.
    pub clip: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// The final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// How activations are stored: f32, or bf16 (matrix products on bf16 operands with f32
    /// accumulation; parameters, states, gradients and the loss stay f32).
    pub activations: ir::DType,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            lr: 1e-3,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
            warmup_steps: 100,
            total_steps: 1000,
            min_lr_ratio: 0.1,
            activations: ir::DType::F32,
        }
    }
}

impl TrainConfig {
    /// How training graphs are lowered for this configuration.
    pub fn lower_options(&self) -> LowerOptions {
        LowerOptions {
            bf16_activations: self.activations == ir::DType::BF16,
            ..LowerOptions::default()
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (0-based): linear warmup, then cosine to `min_lr_ratio`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// One parameter's AdamW update at one step: what the host applies ([`AdamW::apply`]) and
/// the GPU's kernel reads ([`AdamW::row`], for [`ir::kernel::Kernel::adamw`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Multiplies the gradient (the mean's factor, clipping).
    pub scale: f64,
    pub lr: f64,
    pub betas: (f64, f64),
    /// `1 - b1^t`, `1 - b2^t` for step `t` (1-based).
    pub corrections: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// The update of parameter `name` at 0-based step `step` under `c`, gradients times
    /// `scale`.
    pub fn of(c: &TrainConfig, step: usize, name: &str, scale: f64) -> AdamW {
        let t = (step + 1) as i32;
        let (b1, b2) = c.betas;
        AdamW {
            scale,
            lr: c.lr_at(step),
            betas: c.betas,
            corrections: (1.0 - b1.powi(t), 1.0 - b2.powi(t)),
            eps: c.eps,
            weight_decay: if no_weight_decay(name) {
                0.0
            } else {
                c.weight_decay
            },
        }
    }

    /// The update in place, in f64 per element.
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let ((b1, b2), (bc1, bc2)) = (self.betas, self.corrections);
        for i in 0..p.len() {
            let gi = g[i] as f64 * self.scale;
            let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
            let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
            m[i] = mi as f32;
            v[i] = vi as f32;
            let update =
                (mi / bc1) / ((vi / bc2).sqrt() + self.eps) + self.weight_decay * p[i] as f64;
            p[i] = (p[i] as f64 - self.lr * update) as f32;
        }
    }

    /// The row of [`ir::kernel::Kernel::adamw`]'s table (layout: [`ir::kernel::ADAMW_HYPER`]).
    pub fn row(&self) -> [f32; ir::kernel::ADAMW_HYPER] {
        let ((b1, b2), (bc1, bc2)) = (self.betas, self.corrections);
        [
            self.scale,
            b1,
            1.0 - b1,
            b2,
            1.0 - b2,
            1.0 / bc1,
            1.0 / bc2,
            self.eps,
            self.weight_decay,
            self.lr,
        ]
        .map(|x| x as f32)
    }
}

/// Whether a parameter is exempt from weight decay (REFERENCE.md: A_log, D, dt bias, norms).
pub fn no_weight_decay(name: &str) -> bool {
    name.ends_with("A_log")
        || name.ends_with(".D")
        || name.ends_with("dt_bias")
        || name.ends_with("dt_proj.bias")
        || name.ends_with("norm.weight")
        || name.ends_with("norm_f.weight")
}

/// One training step's results.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The logits of the batch, `[B, L, V]`.
    pub logits: Vec<f32>,
    /// The bytes of intermediates: the arena (whole graph), or the checkpoint schedule's
    /// measured peak (with a budget; weights, gradients and optimizer state not included).
    pub arena_bytes: u64,
    /// Checkpointed on the GPU: the most device memory in use during the step, as the
    /// driver reports it (everything on the GPU).
    pub device_bytes: Option<u64>,
    /// Seconds computing the loss and gradients (on the device and moving them), and
    /// seconds of the host's AdamW update.
    pub grad_secs: f64,
    pub update_secs: f64,
}

/// A model being trained: the compiled training graph, parameters and AdamW moments.
/// How gradients are computed.
enum Engine {
    /// The whole training graph at once: every activation kept.
    Whole(Box<CpuGraph>),
    /// Under a checkpoint plan for a memory budget, planned per batch shape.
    Checkpointed {
        forward: Box<Graph>,
        budget: u64,
        device: Device,
        steps: HashMap<(usize, usize), CheckpointedStep>,
    },
    /// The whole training graph on the GPU.
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::gpu::GpuGraph>),
}

pub struct Trainer {
    engine: Engine,
    /// The parameters (where the GPU updates them, as of the last [`Trainer::sync_host`]).
    pub params: HashMap<String, Vec<f32>>,
    m: HashMap<String, Vec<f32>>,
    v: HashMap<String, Vec<f32>>,
    pub step: usize,
    pub config: TrainConfig,
    logits_name: String,
    /// Names of the recurrent states (graph state inputs = final-state outputs).
    state_names: Vec<String>,
    /// Final states of the last step, fed to the next when carrying state (truncated BPTT).
    pub carried: HashMap<String, Vec<f32>>,
    /// Whether to carry the final states into the next step.
    pub carry_state: bool,
    /// Whether steps under a checkpoint plan return the logits (`TrainStats::logits`);
    /// `[B, L, V]` f32 is 105 GB for mamba2-2.7b at L = 2^19, so a plain training run
    /// leaves it off. Read when a batch shape is first planned.
    pub return_logits: bool,
    /// Training on the GPU (whole graph or checkpointed): the parameters and moments on the
    /// device, updated there (`params`, `m`, `v` on the host are current after
    /// [`Trainer::sync_host`]).
    #[cfg(feature = "cuda")]
    optimizer: Option<Box<crate::gpu::GpuOptimizer>>,
}

/// A step's parameter gradients: on the host, or (checkpointed on the GPU) device sums of
/// the total loss's gradients with the factor that makes them the mean's.
enum Grads {
    Host(Tensors),
    #[cfg(feature = "cuda")]
    Device(runtime::cuda::DeviceSums, f64),
}

impl Trainer {
    /// Builds the training graph of `forward` (whose logits output is `logits`) and compiles it.
    pub fn new(
        forward: &Graph,
        logits: &str,
        params: HashMap<String, Vec<f32>>,
        config: TrainConfig,
    ) -> Result<Trainer, Error> {
        let tg = passes::training_graph(forward, logits, IGNORE_INDEX)?;
        Trainer::new_with(forward, logits, params, config, Some(&tg.graph))
    }

    fn new_with(
        forward: &Graph,
        logits: &str,
        params: HashMap<String, Vec<f32>>,
        config: TrainConfig,
        training: Option<&Graph>,
    ) -> Result<Trainer, Error> {
        let state_names = forward
            .nodes()
            .filter_map(|n| match forward.op(n) {
                ir::Op::Input {
                    name,
                    kind: ir::InputKind::State,
                    ..
                } => Some(name.clone()),
                _ => None,
            })
            .collect();
        let compiled = match training {
            Some(tg) => Engine::Whole(Box::new(CpuGraph::compile(tg, &config.lower_options())?)),
            None => Engine::Checkpointed {
                forward: Box::new(forward.clone()),
                budget: u64::MAX,
                device: Device::Cpu,
                steps: HashMap::new(),
            },
        };
        let zeros = |p: &HashMap<String, Vec<f32>>| -> HashMap<String, Vec<f32>> {
            p.iter()
                .map(|(k, v)| (k.clone(), vec![0.0; v.len()]))
                .collect()
        };
        Ok(Trainer {
            m: zeros(&params),
            v: zeros(&params),
            engine: compiled,
            params,
            step: 0,
            config,
            logits_name: logits.to_string(),
            state_names,
            carried: HashMap::new(),
            carry_state: false,
            return_logits: true,
            #[cfg(feature = "cuda")]
            optimizer: None,
        })
    }

    /// One step on a batch: `ids` and `targets` are `[B, L]` (targets may be `IGNORE_INDEX`).
    pub fn step(
        &mut self,
        ids: &[i32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<StepStats, Error> {
        let empty = HashMap::new();
        let states = if self.carry_state {
            &self.carried
        } else {
            &empty
        };
        let grad_started = std::time::Instant::now();
        let mut device_bytes = None;
        let (loss, logits, grads, finals, arena_bytes) = match &mut self.engine {
            Engine::Whole(compiled) => {
                let (data, syms) = step_inputs(ids, targets, batch, seq);
                let (outs, profile) = compiled.run(&syms, &data, &self.params, states)?;
                let (loss, logits, grads, finals) =
                    split_outputs(outs, &self.logits_name, &self.state_names);
                (loss, logits, grads, finals, profile.arena_bytes)
            }
            // The parameters and moments stay on the device and are updated there; the
            // parameter gradients are summed on the device, not downloaded.
            #[cfg(feature = "cuda")]
            Engine::Gpu(g) => {
                let (data, syms) = step_inputs(ids, targets, batch, seq);
                let gpu = |e: crate::gpu::GpuError| Error::Gpu(e.to_string());
                let opt = device_optimizer(&mut self.optimizer, (&self.params, &self.m, &self.v))?;
                let params = &self.params;
                let is_grad = |n: &str| {
                    n.strip_prefix("grad.")
                        .is_some_and(|p| params.contains_key(p))
                };
                let mut sums = runtime::cuda::DeviceSums::default();
                let mut arena = runtime::cuda::DeviceArena::default();
                let (outs, peak) = g
                    .run_resident(
                        &syms,
                        (&data, states),
                        &HashMap::new(),
                        &opt.params,
                        &mut arena,
                        runtime::cuda::ExecOptions::default(),
                        Some((&mut sums, &is_grad)),
                        &|n| !is_grad(n),
                    )
                    .map_err(gpu)?;
                drop(arena);
                let (loss, logits, _, finals) =
                    split_outputs(outs.host, &self.logits_name, &self.state_names);
                // The whole graph's gradients are the mean loss's already.
                return self.finish_step(
                    (loss, logits, Grads::Device(sums, 1.0), finals),
                    (peak, Some(outs.device_used)),
                    grad_started,
                );
            }
            Engine::Checkpointed {
                forward,
                budget,
                device,
                steps,
            } => {
                if let std::collections::hash_map::Entry::Vacant(e) = steps.entry((batch, seq)) {
                    let mut req = request_for(forward, Some(*budget), batch, seq);
                    req.logits = self.return_logits;
                    req.act_dtype = self.config.activations;
                    req.lower = lowering_for(*device, req.act_dtype);
                    let plan = Planner::new(forward, req, IGNORE_INDEX)
                        .and_then(|mut p| p.plan())
                        .map_err(|e| Error::Input(e.to_string()))?;
                    e.insert(CheckpointedStep::compile_for(forward, &plan, *device)?);
                }
                let step = &steps[&(batch, seq)];
                #[cfg(feature = "cuda")]
                if *device == Device::Cuda {
                    let opt =
                        device_optimizer(&mut self.optimizer, (&self.params, &self.m, &self.v))?;
                    let (out, sums) =
                        step.run_on_device(&opt.params, &self.params, ids, targets, states)?;
                    device_bytes = out.device_peak_bytes;
                    let valid = crate::checkpoint::valid_targets(targets).max(1);
                    let grads = Grads::Device(sums, 1.0 / valid as f64);
                    return self.finish_step(
                        (out.loss, out.logits, grads, out.final_states),
                        (out.peak_bytes, device_bytes),
                        grad_started,
                    );
                }
                let out = step.run(&self.params, ids, targets, states)?;
                device_bytes = out.device_peak_bytes;
                (
                    out.loss,
                    out.logits,
                    out.grads,
                    out.final_states,
                    out.peak_bytes,
                )
            }
        };
        self.finish_step(
            (loss, logits, Grads::Host(grads), finals),
            (arena_bytes, device_bytes),
            grad_started,
        )
    }

    /// The update after a step's gradients: the global norm, clipping, AdamW.
    fn finish_step(
        &mut self,
        (loss, logits, grads, finals): (f64, Vec<f32>, Grads, Tensors),
        (arena_bytes, device_bytes): (u64, Option<u64>),
        grad_started: std::time::Instant,
    ) -> Result<StepStats, Error> {
        let grad_secs = grad_started.elapsed().as_secs_f64();
        if self.carry_state {
            // The final states start the next batch of the same streams; no gradient flows
            // back across the boundary (truncated BPTT).
            self.carried = finals;
        }
        // One variant without the `cuda` feature.
        #[allow(clippy::infallible_destructuring_match)]
        let grads = match grads {
            Grads::Host(g) => g,
            #[cfg(feature = "cuda")]
            Grads::Device(sums, mean) => {
                return self.device_update(
                    &sums,
                    mean,
                    (loss, logits),
                    arena_bytes,
                    device_bytes,
                    grad_secs,
                );
            }
        };
        let outs: HashMap<String, Vec<f32>> = grads
            .into_iter()
            .map(|(n, v)| (format!("grad.{n}"), v))
            .collect();
        // The update is elementwise and the norm a sum per tensor (in fixed-size pieces):
        // both run on every core, with the same result whatever their number (mamba2-2.7b:
        // 2.7e9 parameters).
        use rayon::prelude::*;
        const PIECE: usize = 1 << 16;
        let update_started = std::time::Instant::now();
        let mut norm2 = 0f64;
        for name in self.params.keys() {
            if let Some(g) = outs.get(&format!("grad.{name}")) {
                let pieces: Vec<f64> = g
                    .par_chunks(PIECE)
                    .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                    .collect();
                norm2 += pieces.iter().sum::<f64>();
            }
        }
        let grad_norm = norm2.sqrt();
        let scale = if grad_norm > self.config.clip {
            self.config.clip / grad_norm
        } else {
            1.0
        };
        // Checked before anything changes, so a bad gradient leaves the model as it was.
        for (name, p) in &self.params {
            let len = |x: Option<&Vec<f32>>| x.map_or(p.len(), Vec::len);
            let (g, m, v) = (
                len(outs.get(&format!("grad.{name}"))),
                len(self.m.get(name)),
                len(self.v.get(name)),
            );
            if (g, m, v) != (p.len(), p.len(), p.len()) {
                return Err(Error::Input(format!(
                    "`{name}`: {} values, a gradient of {g} and moments of {m} and {v}",
                    p.len()
                )));
            }
        }
        let lr = self.config.lr_at(self.step);
        for (name, p) in self.params.iter_mut() {
            let Some(g) = outs.get(&format!("grad.{name}")) else {
                continue;
            };
            let (Some(m), Some(v)) = (self.m.get_mut(name), self.v.get_mut(name)) else {
                continue;
            };
            let h = AdamW::of(&self.config, self.step, name, scale);
            p.par_chunks_mut(PIECE)
                .zip(m.par_chunks_mut(PIECE))
                .zip(v.par_chunks_mut(PIECE))
                .zip(g.par_chunks(PIECE))
                .for_each(|(((p, m), v), g)| h.apply(p, g, m, v));
        }
        Ok(self.advance(
            (loss, grad_norm, lr, logits),
            (arena_bytes, device_bytes),
            (grad_secs, update_started),
        ))
    }

    /// The update on the GPU: the global norm from each sum's (cuBLAS), then the AdamW
    /// kernel per parameter with the mean's factor and the clipping folded into its scale.
    /// The host's parameters and moments go stale until [`Trainer::sync_host`].
    #[cfg(feature = "cuda")]
    fn device_update(
        &mut self,
        sums: &runtime::cuda::DeviceSums,
        mean: f64,
        (loss, logits): (f64, Vec<f32>),
        arena_bytes: u64,
        device_bytes: Option<u64>,
        grad_secs: f64,
    ) -> Result<StepStats, Error> {
        let gpu = |e: crate::gpu::GpuError| Error::Gpu(e.to_string());
        let update_started = std::time::Instant::now();
        let opt = self
            .optimizer
            .as_mut()
            .ok_or_else(|| Error::Gpu("no optimizer on the device".into()))?;
        // The sums are named as the stage outputs: `grad.{parameter}`.
        let norms: HashMap<String, f64> = opt
            .norms(sums)
            .map_err(gpu)?
            .into_iter()
            .filter_map(|(n, x)| Some((n.strip_prefix("grad.")?.to_string(), x)))
            .collect();
        // Summed in name order: the same norm whatever the map's order.
        let mut names: Vec<&String> = self
            .params
            .keys()
            .filter(|n| norms.contains_key(*n))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(Error::Gpu("the step produced no parameter gradient".into()));
        }
        let norm2: f64 = names.iter().map(|n| (norms[*n] * mean).powi(2)).sum();
        let grad_norm = norm2.sqrt();
        let clip = if grad_norm > self.config.clip {
            self.config.clip / grad_norm
        } else {
            1.0
        };
        let lr = self.config.lr_at(self.step);
        let rows: Vec<(String, [f32; ir::kernel::ADAMW_HYPER])> = names
            .iter()
            .map(|name| {
                let h = AdamW::of(&self.config, self.step, name, mean * clip);
                ((*name).clone(), h.row())
            })
            .collect();
        opt.step(sums, &rows).map_err(gpu)?;
        Ok(self.advance(
            (loss, grad_norm, lr, logits),
            (arena_bytes, device_bytes),
            (grad_secs, update_started),
        ))
    }

    /// Counts the step done and reports it.
    fn advance(
        &mut self,
        (loss, grad_norm, lr, logits): (f64, f64, f64, Vec<f32>),
        (arena_bytes, device_bytes): (u64, Option<u64>),
        (grad_secs, update_started): (f64, std::time::Instant),
    ) -> StepStats {
        self.step += 1;
        StepStats {
            loss,
            grad_norm,
            lr,
            logits,
            arena_bytes,
            device_bytes,
            grad_secs,
            update_secs: update_started.elapsed().as_secs_f64(),
        }
    }

    /// Makes `params` and the moments on the host current: downloads them where they live on
    /// the GPU (checkpointed training on the GPU); nothing to do elsewhere.
    pub fn sync_host(&mut self) -> Result<(), Error> {
        #[cfg(feature = "cuda")]
        if let Some(opt) = &self.optimizer {
            let (p, m, v) = opt.download().map_err(|e| Error::Gpu(e.to_string()))?;
            (self.params, self.m, self.v) = (p, m, v);
        }
        Ok(())
    }
}

/// The optimizer on the GPU, made (the parameters and moments uploaded) at its first use.
#[cfg(feature = "cuda")]
fn device_optimizer<'a>(
    optimizer: &'a mut Option<Box<crate::gpu::GpuOptimizer>>,
    (params, m, v): (&Tensors, &Tensors, &Tensors),
) -> Result<&'a crate::gpu::GpuOptimizer, Error> {
    if optimizer.is_none() {
        let opt = crate::gpu::GpuOptimizer::new(0, params, m, v)
            .map_err(|e| Error::Gpu(e.to_string()))?;
        *optimizer = Some(Box::new(opt));
    }
    optimizer
        .as_deref()
        .ok_or_else(|| Error::Gpu("the optimizer's parameters are not on the device".into()))
}

/// The inputs of a whole training graph: token ids, targets and the symbol values.
fn step_inputs(
    ids: &[i32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> (HashMap<String, HostData>, [(&'static str, i64); 2]) {
    let data = HashMap::from([
        ("input_ids".to_string(), HostData::I32(ids.to_vec())),
        ("targets".to_string(), HostData::I32(targets.to_vec())),
    ]);
    (data, [("B", batch as i64), ("L", seq as i64)])
}

/// A whole training graph's outputs: the loss, the logits, the gradients by parameter (or
/// state) name and the final states.
#[allow(clippy::type_complexity)]
fn split_outputs(
    outs: runtime::cpu::Outputs,
    logits_name: &str,
    state_names: &[String],
) -> (f64, Vec<f32>, Tensors, Tensors) {
    let mut outs: Tensors = outs.into_iter().collect();
    let loss = outs
        .get("loss")
        .and_then(|v| v.first())
        .copied()
        .unwrap_or(f32::NAN) as f64;
    let logits = outs.remove(logits_name).unwrap_or_default();
    let finals: Tensors = state_names
        .iter()
        .filter_map(|n| outs.remove(n).map(|v| (n.clone(), v)))
        .collect();
    let grads: Tensors = outs
        .into_iter()
        .filter_map(|(n, v)| n.strip_prefix("grad.").map(|p| (p.to_string(), v)))
        .collect();
    (loss, logits, grads, finals)
}

/// The checkpoint plan for training `forward` on `[batch, seq]` batches within `budget` bytes
/// (weights, gradients and AdamW state included; activations stored as `act`) on `device`
/// ([`lowering_for`]), returning the logits or not.
pub fn plan_for(
    forward: &Graph,
    budget: u64,
    (batch, seq): (usize, usize),
    logits: bool,
    (act, device): (ir::DType, Device),
) -> Result<Plan, Error> {
    let mut req = request_for(forward, Some(budget), batch, seq);
    req.logits = logits;
    req.act_dtype = act;
    req.lower = lowering_for(device, act);
    let mut planner =
        Planner::new(forward, req, IGNORE_INDEX).map_err(|e| Error::Input(e.to_string()))?;
    planner.plan().map_err(|e| Error::Input(e.to_string()))
}

/// How `device` lowers a stage whose activations are stored as `act`: what the planner must
/// price with. The GPU lowers as `GpuGraph::compile` does (bf16 buffers, the tiled SSD).
pub fn lowering_for(device: Device, act: ir::DType) -> LowerOptions {
    match device {
        Device::Cpu => LowerOptions::default(),
        Device::Cuda => LowerOptions {
            bf16_activations: act == ir::DType::BF16,
            ..LowerOptions::default()
        }
        .on_gpu(),
    }
}

/// What a trainer plans for by default: f32 activations, everything counted, logits returned.
pub fn request_for(forward: &Graph, budget: Option<u64>, batch: usize, seq: usize) -> Request {
    Request {
        batch: batch as u64,
        seq: seq as u64,
        budget,
        act_dtype: ir::DType::F32,
        count_weights: true,
        quantum: crate::cli::default_quantum(forward).min(seq as u64).max(1),
        logits: true,
        copy_outputs: true,
        lower: LowerOptions::default(),
    }
}

impl Trainer {
    /// As [`Trainer::new`], but gradients come from the layer x time checkpoint schedule the
    /// planner chooses for `budget` bytes (per batch shape, on the first step of that shape).
    pub fn with_budget(
        forward: &Graph,
        logits: &str,
        params: HashMap<String, Vec<f32>>,
        config: TrainConfig,
        budget: u64,
    ) -> Result<Trainer, Error> {
        Trainer::with_budget_on(forward, logits, params, config, budget, Device::Cpu)
    }

    /// [`Trainer::with_budget`] with the stages on `device` (the GPU: every value between
    /// stage runs, the parameters, their gradients and the AdamW moments stay on the device,
    /// and the update runs there; [`Trainer::sync_host`] brings them back).
    pub fn with_budget_on(
        forward: &Graph,
        logits: &str,
        params: HashMap<String, Vec<f32>>,
        config: TrainConfig,
        budget: u64,
        device: Device,
    ) -> Result<Trainer, Error> {
        if device == Device::Cuda && cfg!(not(feature = "cuda")) {
            return Err(Error::Gpu(crate::model::NO_CUDA.into()));
        }
        let mut t = Trainer::new_with(forward, logits, params, config, None)?;
        t.engine = Engine::Checkpointed {
            forward: Box::new(forward.clone()),
            budget,
            device,
            steps: HashMap::new(),
        };
        Ok(t)
    }

    /// As [`Trainer::new`], with the whole training graph compiled for and run on the first
    /// CUDA GPU (the optimizer runs on the host). Needs the `cuda` feature.
    pub fn new_gpu(
        forward: &Graph,
        logits: &str,
        params: HashMap<String, Vec<f32>>,
        config: TrainConfig,
    ) -> Result<Trainer, Error> {
        #[cfg(feature = "cuda")]
        {
            let tg = passes::training_graph(forward, logits, IGNORE_INDEX)?;
            let g = crate::gpu::GpuGraph::compile(
                &tg.graph,
                &config.lower_options(),
                codegen::nvptx::Target::Sm90,
                0,
            )
            .map_err(|e| Error::Gpu(format!("--device cuda: {e}")))?;
            let mut t = Trainer::new_with(forward, logits, params, config, None)?;
            t.engine = Engine::Gpu(Box::new(g));
            Ok(t)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (forward, logits, params, config);
            Err(Error::Gpu(crate::model::NO_CUDA.into()))
        }
    }

    /// The plan used for `[batch, seq]` batches, once a step of that shape ran.
    pub fn plan(&self, batch: usize, seq: usize) -> Option<&Plan> {
        match &self.engine {
            Engine::Whole(_) => None,
            #[cfg(feature = "cuda")]
            Engine::Gpu(_) => None,
            Engine::Checkpointed { steps, .. } => steps.get(&(batch, seq)).map(|s| &s.plan),
        }
    }

    /// The AdamW first and second moments, by parameter name (where the GPU updates them,
    /// as of the last [`Trainer::sync_host`]).
    pub fn moments(&self) -> (&Tensors, &Tensors) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count from a checkpoint's optimizer file.
    pub fn load_moments(&mut self, ck: &runtime::weights::Checkpoint) -> Result<(), String> {
        for (name, p) in &self.params {
            for (prefix, store) in [("m", &mut self.m), ("v", &mut self.v)] {
                let v = ck
                    .to_f32(&format!("{prefix}.{name}"))
                    .map_err(|e| e.to_string())?;
                if v.len() != p.len() {
                    return Err(format!(
                        "optimizer state `{prefix}.{name}` has {} values, the parameter {}",
                        v.len(),
                        p.len()
                    ));
                }
                store.insert(name.clone(), v);
            }
        }
        let step = ck.to_f32("step").map_err(|e| e.to_string())?;
        self.step = step.first().copied().unwrap_or(0.0) as usize;
        Ok(())
    }
}

/// The selective-copying task of the Mamba paper: `k` data tokens scattered among noise in a
/// prefix of `prefix` tokens, then `k` markers; the model must emit the data tokens in order
/// at the markers. Tokens: 0 noise, 1 marker, 2.. data.
pub fn selective_copy_batch(
    rng: &mut runtime::init::Rng,
    batch: usize,
    prefix: usize,
    k: usize,
    n_data: usize,
) -> (Vec<i32>, Vec<i32>) {
    let seq = prefix + k;
    let mut ids = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        let mut row = vec![0i32; seq];
        // k distinct positions in the prefix, in increasing order.
        let mut pos: Vec<usize> = Vec::new();
        while pos.len() < k {
            let p = (rng.next_u64() % prefix as u64) as usize;
            if !pos.contains(&p) {
                pos.push(p);
            }
        }
        pos.sort_unstable();
        let data: Vec<i32> = (0..k)
            .map(|_| 2 + (rng.next_u64() % n_data as u64) as i32)
            .collect();
        for (p, d) in pos.iter().zip(&data) {
            row[*p] = *d;
        }
        for r in row.iter_mut().skip(prefix) {
            *r = 1;
        }
        // The marker at position prefix + j predicts data[j].
        let mut tg = vec![IGNORE_INDEX as i32; seq];
        for (j, d) in data.iter().enumerate() {
            tg[prefix + j] = *d;
        }
        ids.extend(row);
        targets.extend(tg);
    }
    (ids, targets)
}

/// Fraction of predicted positions whose argmax is the target.
pub fn accuracy(logits: &[f32], targets: &[i32], vocab: usize) -> f64 {
    let mut right = 0usize;
    let mut total = 0usize;
    for (i, &t) in targets.iter().enumerate() {
        if t < 0 {
            continue;
        }
        let row = &logits[i * vocab..(i + 1) * vocab];
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        total += 1;
        right += usize::from(best == t as usize);
    }
    right as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = TrainConfig {
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn weight_decay_exemptions() {
        for n in [
            "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.D",
            "backbone.layers.0.mixer.dt_bias",
            "backbone.layers.0.norm.weight",
            "backbone.norm_f.weight",
            "backbone.layers.0.mixer.norm.weight",
        ] {
            assert!(no_weight_decay(n), "{n}");
        }
        assert!(!no_weight_decay("backbone.layers.0.mixer.in_proj.weight"));
        assert!(!no_weight_decay("backbone.embedding.weight"));
    }

    #[test]
    fn selective_copy_targets_follow_the_data() {
        let mut rng = runtime::init::Rng::new(1);
        let (ids, tg) = selective_copy_batch(&mut rng, 3, 10, 3, 4);
        for b in 0..3 {
            let row = &ids[b * 13..(b + 1) * 13];
            let data: Vec<i32> = row[..10].iter().copied().filter(|&x| x >= 2).collect();
            assert_eq!(data.len(), 3);
            assert_eq!(&tg[b * 13 + 10..(b + 1) * 13], &data[..]);
            assert!(row[10..].iter().all(|&x| x == 1));
        }
    }
}
