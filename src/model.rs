//! The Rust API: load a model and run it.
//!
//! ```no_run
//! use ma2mba::model::{LoadOptions, Model};
//! let mut m = Model::load("tiny-mamba2", &LoadOptions::default())?;   // random weights
//! let logits = m.forward(&[vec![1, 2, 3]])?;
//! println!("{:?}", logits.at(0, 2).len());
//! # Ok::<(), ma2mba::model::Error>(())
//! ```
//!
//! A model is named by a preset of the library (random weights from the initializers, seeded),
//! a directory with `config.json` and safetensors weights, a `.safetensors` file with
//! `--config`, or a Hugging Face repo id (resolved through the local cache or downloaded).

use crate::state::State;
use frontend::{Diagnostic, ModelSpec, Sources};
use ir::Graph;
use passes::{LowerOptions, Lowered};
use runtime::array::Array;
use runtime::cpu::{ExecOptions, HostData, Inputs, Launcher};
use runtime::weights::{Checkpoint, WeightsError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which executor runs the forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The f64 reference interpreter: slow, the oracle.
    Interp,
    /// Fused kernels compiled with Cranelift, GEMMs on the CPU, f32.
    #[default]
    Cranelift,
    /// The NVPTX kernels and cuBLAS on the first CUDA GPU, f32 ([`crate::gpu::GpuModel`]);
    /// needs a build with `--features cuda`. Parameters are uploaded once; the decode step
    /// keeps its states on the device and replays a CUDA graph.
    Cuda,
}

/// The error of asking for the GPU in a build without it.
pub const NO_CUDA: &str = "--device cuda: built without the cuda feature: rebuild with \
`cargo build --release --features cuda` (needs llvm-19-dev to build; a GPU and its driver to run)";

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// A `config.json` for a bare `.safetensors` file (or to override a directory's).
    pub config: Option<PathBuf>,
    /// Seed of random weights for presets.
    pub seed: u64,
    pub backend: Backend,
    /// On the GPU: matrix products on bf16 copies of their weights, accumulating in f32
    /// ([`crate::gpu::GpuModel::use_bf16_weights`]).
    pub bf16_weights: bool,
}

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", frontend::render(.0, .1, false).trim_end())]
    Model(Vec<Diagnostic>, Sources),
    #[error("{}", weights_report(.0))]
    Weights(Vec<WeightsError>),
    #[error("{0}")]
    Interp(#[from] runtime::interp::InterpError),
    #[error("{0}")]
    Lower(#[from] passes::LowerError),
    #[error("{0}")]
    Exec(#[from] runtime::cpu::ExecError),
    #[error("{0}")]
    Codegen(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Autodiff(Box<passes::AdError>),
    #[error("{0}")]
    Step(#[from] passes::StepError),
    #[error("{0}")]
    Tokenizer(String),
    /// The GPU failed (compiling for it, or running on it).
    #[error("{0}")]
    Gpu(String),
}

impl From<passes::AdError> for Error {
    fn from(e: passes::AdError) -> Error {
        Error::Autodiff(Box::new(e))
    }
}

/// The loss and the gradient of every parameter (reference names, f64).
#[derive(Clone, Debug)]
pub struct Gradients {
    /// Mean next-token cross-entropy over the predicted positions.
    pub loss: f64,
    /// `(parameter name, shape, gradient)` in graph order.
    pub grads: Vec<(String, Vec<usize>, Vec<f64>)>,
}

/// Targets that mark a position as not predicted (the last of each sequence).
pub const IGNORE_INDEX: i64 = -100;

fn weights_report(errs: &[WeightsError]) -> String {
    let mut s = String::new();
    for (i, e) in errs.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&format!("error: {e}"));
        if let Some(h) = e.help() {
            s.push_str(&format!("\n  help: {h}"));
        }
    }
    s
}

/// Logits of a forward pass: `[batch, seq, vocab]` row-major (vocab is the padded size).
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits of sequence `b` at position `t`.
    pub fn at(&self, b: usize, t: usize) -> &[f32] {
        let start = (b * self.seq + t) * self.vocab;
        &self.data[start..start + self.vocab]
    }
}

/// A loaded model with its weights, ready to run.
pub struct Model {
    pub graph: Graph,
    params: HashMap<String, Vec<f32>>,
    backend: Backend,
    compiled: Option<CpuGraph>,
    #[cfg(feature = "cuda")]
    gpu: Option<crate::gpu::GpuModel>,
    /// The one-token step (`L` = 1), derived from `graph` on first use.
    step: Option<StepForm>,
    last_profile: Option<runtime::cpu::Profile>,
    /// The logits output's name and last axis, found once (each decode step needs them).
    main: String,
    vocab: usize,
    /// The end-of-sequence token of the checkpoint's `config.json`, if it names one.
    pub eos_token_id: Option<u32>,
    /// The directory the weights came from (where a `tokenizer.json` may sit).
    pub source_dir: Option<PathBuf>,
    /// Text to ids and back, for [`Model::generate`] and [`Model::encode`]; set it with
    /// [`crate::tokenizer::Tokenizer::for_model`] (not loaded by [`Model::load`]).
    pub tokenizer: Option<crate::tokenizer::Tokenizer>,
}

/// Up to this batch, the step's matrix products run as dot products over the weights
/// (`runtime::cpu::gemm_rows_wt`) rather than sgemm, which first copies the weights.
const STEP_GEMV_ROWS: usize = 8;

/// The recurrent step: the graph specialized to one token, its compiled form, and the
/// buffers reused from step to step (the arena; last step's state vectors, which receive the
/// next final states).
struct StepForm {
    graph: Graph,
    compiled: Option<CpuGraph>,
    arena: Vec<f32>,
    spare: runtime::cpu::Outputs,
}

/// Which form of the model a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// The graph over a sequence of any length (forward, prefill).
    Parallel,
    /// The graph specialized to one token (decode).
    Step,
}

/// A graph compiled for the CPU: lowered once, its kernels JIT-compiled once; the memory
/// plan is made per call for the symbol values given.
pub struct CpuGraph {
    pub lowered: Lowered,
    launcher: crate::cpu::CraneliftLauncher,
}

impl CpuGraph {
    pub fn compile(graph: &Graph, opts: &LowerOptions) -> Result<CpuGraph, Error> {
        CpuGraph::compile_with(graph, opts, codegen::cpu::CpuOptions::default())
    }

    /// As [`CpuGraph::compile`], with the code generator's options (`exact_math`: results
    /// bit-identical to the kernel IR evaluator's f32 mode, for tests).
    pub fn compile_with(
        graph: &Graph,
        opts: &LowerOptions,
        cpu: codegen::cpu::CpuOptions,
    ) -> Result<CpuGraph, Error> {
        let lowered = passes::lower(graph, opts)?;
        let launcher =
            crate::cpu::CraneliftLauncher::compile_with(&lowered, cpu).map_err(Error::Codegen)?;
        Ok(CpuGraph { lowered, launcher })
    }

    /// Runs with symbol values `syms` (`("B", 2)`); returns every graph output and the profile.
    pub fn run(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &HashMap<String, Vec<f32>>,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<(runtime::cpu::Outputs, runtime::cpu::Profile), Error> {
        let mut outs = Vec::new();
        let opts = ExecOptions::default();
        let profile = self.run_into(
            syms,
            data,
            params,
            states,
            &opts,
            &mut Vec::new(),
            &mut outs,
        )?;
        Ok((outs, profile))
    }

    /// [`CpuGraph::run`] with executor options, reusing an arena and output vectors across
    /// calls ([`runtime::cpu::execute_in`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run_into(
        &self,
        syms: &[(&str, i64)],
        data: &HashMap<String, HostData>,
        params: &HashMap<String, Vec<f32>>,
        states: &HashMap<String, Vec<f32>>,
        opts: &ExecOptions,
        arena: &mut Vec<f32>,
        outs: &mut runtime::cpu::Outputs,
    ) -> Result<runtime::cpu::Profile, Error> {
        let mut sizes = Vec::with_capacity(self.lowered.syms.len());
        for s in &self.lowered.syms {
            match syms.iter().find(|(n, _)| n == s) {
                Some((_, v)) if *v >= 0 => sizes.push(*v),
                _ => return Err(Error::Input(format!("no value for the symbol `{s}`"))),
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
        let launcher: &dyn Launcher = &self.launcher;
        Ok(runtime::cpu::execute_in(
            &self.lowered,
            &plan,
            launcher,
            &inp,
            opts,
            arena,
            outs,
        )?)
    }
}

impl Model {
    /// Loads `spec`: a preset or model name, a directory, a `.safetensors` file or a repo id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Model, Error> {
        let as_path = Path::new(spec);
        let is_name = !as_path.exists() && !spec.contains('/') && !spec.ends_with(".safetensors");
        let mut eos_token_id = None;
        let mut source_dir = None;
        let (graph, params) = if is_name {
            let graph = compile(&ModelSpec {
                model: spec.into(),
                ..ModelSpec::default()
            })?;
            let params = runtime::init::init_params(&graph, opts.seed)
                .into_iter()
                .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
                .collect();
            (graph, params)
        } else {
            let path = runtime::weights::resolve(spec).map_err(|e| Error::Weights(vec![e]))?;
            let config = match &opts.config {
                Some(c) => c.clone(),
                None if path.is_dir() => path.join("config.json"),
                None => path.with_file_name("config.json"),
            };
            let text = std::fs::read_to_string(&config)
                .map_err(|e| Error::Input(format!("cannot read {}: {e}", config.display())))?;
            eos_token_id = config_eos(&text);
            source_dir = if path.is_dir() {
                Some(path.clone())
            } else {
                path.parent().map(Path::to_path_buf)
            };
            let graph = compile(&ModelSpec {
                model: "mamba_lm".into(),
                config: Some((config.display().to_string(), text)),
                ..ModelSpec::default()
            })?;
            let ckpt = Checkpoint::open(&path).map_err(|e| Error::Weights(vec![e]))?;
            ckpt.check(&graph).map_err(Error::Weights)?;
            let mut params = HashMap::new();
            for n in graph.params() {
                if let ir::Op::Param { name, .. } = graph.op(n) {
                    let v = ckpt.to_f32(name).map_err(|e| Error::Weights(vec![e]))?;
                    params.insert(name.clone(), v);
                }
            }
            (graph, params)
        };
        let mut m = Model::from_parts(graph, params, opts.backend)?;
        if opts.bf16_weights {
            m.use_bf16_weights()?;
        }
        m.eos_token_id = eos_token_id;
        m.source_dir = source_dir;
        Ok(m)
    }

    /// Builds a model from a graph and f32 parameters (for tests and embedding).
    pub fn from_parts(
        graph: Graph,
        params: HashMap<String, Vec<f32>>,
        backend: Backend,
    ) -> Result<Model, Error> {
        let mut m = Model {
            graph,
            params,
            backend,
            compiled: None,
            #[cfg(feature = "cuda")]
            gpu: None,
            step: None,
            last_profile: None,
            main: String::new(),
            vocab: 0,
            eos_token_id: None,
            source_dir: None,
            tokenizer: None,
        };
        m.main = logits_output(&m.graph).unwrap_or_default();
        m.vocab = output_width(&m.graph, &m.main);
        match backend {
            Backend::Cranelift => {
                m.compiled = Some(CpuGraph::compile(&m.graph, &LowerOptions::cpu())?);
            }
            Backend::Interp => {}
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                let g = crate::gpu::GpuModel::new(&m.graph, &m.params)
                    .map_err(|e| Error::Gpu(format!("--device cuda: {e}")))?;
                m.gpu = Some(g);
            }
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda => return Err(Error::Gpu(NO_CUDA.into())),
        }
        Ok(m)
    }

    /// The name of the model's main output (the logits): the first output that is not a
    /// final state (computed once, at construction).
    pub(crate) fn main_output(&self) -> String {
        self.main.clone()
    }

    /// The graph and the f32 parameters, for training.
    /// The parameters (f32) by checkpoint name.
    pub fn params_f32(&self) -> &HashMap<String, Vec<f32>> {
        &self.params
    }

    pub fn into_parts(self) -> (Graph, HashMap<String, Vec<f32>>) {
        (self.graph, self.params)
    }

    /// The executor the model runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The lowered schedule (Cranelift backend).
    pub fn lowered(&self) -> Option<&Lowered> {
        self.compiled.as_ref().map(|c| &c.lowered)
    }

    /// Step timings of the last compiled forward pass (Cranelift backend).
    pub fn last_profile(&self) -> Option<&runtime::cpu::Profile> {
        self.last_profile.as_ref()
    }

    /// Padded vocabulary size (the last axis of the logits).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Runs the forward pass over a batch of equally long token sequences.
    /// The logits computed by the f64 reference interpreter, whatever the backend.
    pub fn forward_reference(&self, tokens: &[Vec<u32>]) -> Result<Vec<f64>, Error> {
        let (b, l) = self.check_tokens(tokens)?;
        let ids: Vec<i32> = tokens.iter().flatten().map(|&t| t as i32).collect();
        self.reference(&ids, b, l)
    }

    /// The parameters as f64 arrays of their declared shapes, for the interpreter.
    fn params_f64(&self) -> Result<HashMap<String, Array>, Error> {
        let mut out = HashMap::new();
        for n in self.graph.params() {
            if let ir::Op::Param { name, ty, .. } = self.graph.op(n) {
                let shape = ty
                    .shape
                    .iter()
                    .map(|d| d.as_known().unwrap_or(0) as usize)
                    .collect();
                let v = self
                    .params
                    .get(name)
                    .ok_or_else(|| Error::Input(format!("missing parameter {name}")))?;
                out.insert(
                    name.clone(),
                    Array::new(shape, v.iter().map(|&x| x as f64).collect()),
                );
            }
        }
        Ok(out)
    }

    fn reference(&self, ids: &[i32], b: usize, l: usize) -> Result<Vec<f64>, Error> {
        let mut bind = runtime::interp::Bindings::default();
        bind.inputs.insert(
            "input_ids".into(),
            Array::new(vec![b, l], ids.iter().map(|&x| x as f64).collect()),
        );
        bind.params = self.params_f64()?;
        let outs = runtime::interp::run(&self.graph, &bind)?;
        let main = self.main_output();
        Ok(outs.get(&main).map(|a| a.data.clone()).unwrap_or_default())
    }

    /// The mean next-token cross-entropy of `tokens` (each position predicts the next token;
    /// the last one predicts nothing) and the gradient of every parameter, computed by the
    /// f64 reference interpreter on the autodiff training graph.
    pub fn grad_reference(&self, tokens: &[Vec<u32>]) -> Result<Gradients, Error> {
        let (b, l) = self.check_tokens(tokens)?;
        let tg = passes::training_graph(&self.graph, &self.main_output(), IGNORE_INDEX)?;
        let mut bind = runtime::interp::Bindings::default();
        let ids: Vec<f64> = tokens.iter().flatten().map(|&t| t as f64).collect();
        let targets: Vec<f64> = tokens
            .iter()
            .flat_map(|s| {
                (0..l).map(move |t| {
                    if t + 1 < l {
                        s[t + 1] as f64
                    } else {
                        IGNORE_INDEX as f64
                    }
                })
            })
            .collect();
        bind.inputs
            .insert("input_ids".into(), Array::new(vec![b, l], ids));
        bind.inputs
            .insert("targets".into(), Array::new(vec![b, l], targets));
        bind.params = self.params_f64()?;
        let outs = runtime::interp::run(&tg.graph, &bind)?;
        let loss = outs
            .get("loss")
            .and_then(|a| a.data.first().copied())
            .unwrap_or(f64::NAN);
        let mut grads = Vec::new();
        for (name, _) in &tg.param_grads {
            if let Some(a) = outs.get(&format!("grad.{name}")) {
                grads.push((name.clone(), a.shape.clone(), a.data.clone()));
            }
        }
        Ok(Gradients { loss, grads })
    }

    /// Batch size and sequence length of a token batch, after checking it.
    pub(crate) fn check_tokens(&self, tokens: &[Vec<u32>]) -> Result<(usize, usize), Error> {
        let b = tokens.len();
        let l = tokens.first().map_or(0, Vec::len);
        if b == 0 || l == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some((i, s)) = tokens.iter().enumerate().find(|(_, s)| s.len() != l) {
            return Err(Error::Input(format!(
                "sequence {i} has {} tokens, sequence 0 has {l}: a batch needs equal lengths",
                s.len()
            )));
        }
        let vocab = self.vocab();
        if let Some(&bad) = tokens.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok((b, l))
    }

    /// Runs the forward pass over a batch of equally long token sequences.
    pub fn forward(&mut self, tokens: &[Vec<u32>]) -> Result<Logits, Error> {
        let (b, l) = self.check_tokens(tokens)?;
        let ids: Vec<i32> = tokens.iter().flatten().map(|&t| t as i32).collect();
        let (logits, _) = self.run_form(Form::Parallel, &ids, b, l, &HashMap::new())?;
        Ok(logits)
    }

    /// The names and shapes (batch first, for `batch` sequences) of the recurrent states:
    /// the graph's state inputs, in graph order.
    pub fn state_shapes(&self, batch: usize) -> Vec<(String, Vec<usize>)> {
        let bind = |s: &str| (s == "B").then_some(batch as u64);
        self.graph
            .nodes()
            .filter_map(|n| match self.graph.op(n) {
                ir::Op::Input {
                    name,
                    kind: ir::InputKind::State,
                    ty,
                } => Some((
                    name.clone(),
                    ty.shape
                        .iter()
                        .map(|d| d.eval(&bind).unwrap_or(0) as usize)
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Derives and compiles the one-token step graph once.
    fn ensure_step(&mut self) -> Result<(), Error> {
        if self.step.is_none() {
            let graph = passes::step_graph(&self.graph)?;
            let compiled = match self.backend {
                Backend::Cranelift => Some(CpuGraph::compile(&graph, &LowerOptions::default())?),
                Backend::Interp => None,
                Backend::Cuda => {
                    self.ensure_gpu_step(&graph)?;
                    None
                }
            };
            self.step = Some(StepForm {
                graph,
                compiled,
                arena: Vec::new(),
                spare: Vec::new(),
            });
        }
        Ok(())
    }

    /// The step graph (`L` = 1) derived from the model graph.
    pub fn step_graph(&mut self) -> Result<&Graph, Error> {
        self.ensure_step()?;
        self.step
            .as_ref()
            .map(|s| &s.graph)
            .ok_or_else(|| Error::Input("the step graph could not be derived".into()))
    }

    /// Runs `form` over token ids `[b, l]` (row-major) from initial `states` (missing ones
    /// are zeros); returns the logits and every final state by name.
    pub(crate) fn run_form(
        &mut self,
        form: Form,
        ids: &[i32],
        b: usize,
        l: usize,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<(Logits, HashMap<String, Vec<f32>>), Error> {
        if form == Form::Step {
            self.ensure_step()?;
        }
        let vocab = self.vocab();
        let main = self.main_output();
        let outs = match self.backend {
            Backend::Cranelift => self.run_compiled(form, ids, b, l, states)?,
            Backend::Interp => self.run_interp(form, ids, b, l, states)?,
            Backend::Cuda => self.run_gpu(form, ids, b, l, states)?,
        };
        let mut finals = HashMap::new();
        let mut data = Vec::new();
        for (n, v) in outs {
            if n == main {
                data = v;
            } else {
                finals.insert(n, v);
            }
        }
        Ok((
            Logits {
                batch: b,
                seq: l,
                vocab,
                data,
            },
            finals,
        ))
    }

    fn run_compiled(
        &mut self,
        form: Form,
        ids: &[i32],
        b: usize,
        l: usize,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<runtime::cpu::Outputs, Error> {
        let syms = [("B", b as i64), ("L", l as i64)];
        let inputs = HashMap::from([("input_ids".to_string(), HostData::I32(ids.to_vec()))]);
        let not_compiled = || Error::Input("the model was not compiled for the CPU".into());
        let (outs, profile) = match form {
            Form::Parallel => {
                let c = self.compiled.as_ref().ok_or_else(not_compiled)?;
                c.run(&syms, &inputs, &self.params, states)?
            }
            Form::Step => {
                let s = self.step.as_mut().ok_or_else(not_compiled)?;
                let c = s.compiled.as_ref().ok_or_else(not_compiled)?;
                let mut outs = std::mem::take(&mut s.spare);
                // Decode is bound by reading the weights: few rows go to dot products.
                let opts = ExecOptions {
                    gemv_max_rows: STEP_GEMV_ROWS,
                };
                let p = c.run_into(
                    &syms,
                    &inputs,
                    &self.params,
                    states,
                    &opts,
                    &mut s.arena,
                    &mut outs,
                )?;
                (outs, p)
            }
        };
        self.last_profile = Some(profile);
        Ok(outs)
    }

    /// The GPU side (the model was loaded with [`Backend::Cuda`]).
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_model(&mut self) -> Result<&mut crate::gpu::GpuModel, Error> {
        self.gpu
            .as_mut()
            .ok_or_else(|| Error::Input("the model was not compiled for the GPU".into()))
    }

    /// On the GPU: runs the matrix products on bf16 copies of their weights from now on.
    #[cfg(feature = "cuda")]
    pub fn use_bf16_weights(&mut self) -> Result<(), Error> {
        self.gpu_model()?
            .use_bf16_weights()
            .map_err(|e| Error::Gpu(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    pub fn use_bf16_weights(&mut self) -> Result<(), Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    #[cfg(feature = "cuda")]
    fn ensure_gpu_step(&mut self, graph: &Graph) -> Result<(), Error> {
        self.gpu_model()?
            .ensure_step(graph)
            .map_err(|e| Error::Gpu(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    fn ensure_gpu_step(&mut self, _graph: &Graph) -> Result<(), Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    #[cfg(feature = "cuda")]
    fn run_gpu(
        &mut self,
        form: Form,
        ids: &[i32],
        b: usize,
        l: usize,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<runtime::cpu::Outputs, Error> {
        use crate::gpu::Slot;
        let gpu_err = |e: crate::gpu::GpuError| Error::Gpu(e.to_string());
        if form == Form::Parallel {
            return self
                .gpu_model()?
                .run_forward(ids, b, l, states)
                .map_err(gpu_err);
        }
        // One step through the device-resident decode at batch b: the given states in,
        // the logits and final states out.
        let main = self.main_output();
        let specs = self.state_shapes(b);
        // Missing states are zeros.
        let zeros: HashMap<&str, Vec<f32>> = specs
            .iter()
            .filter(|(n, _)| !states.contains_key(n))
            .map(|(n, shape)| (n.as_str(), vec![0.0; shape.iter().product()]))
            .collect();
        let given: Vec<(&str, &[f32])> = specs
            .iter()
            .filter_map(|(n, _)| {
                let v = states.get(n).or_else(|| zeros.get(n.as_str()))?;
                Some((n.as_str(), v.as_slice()))
            })
            .collect();
        let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
        let gpu = self.gpu_model()?;
        gpu.write_states(Slot::OneShot, b, &given)
            .map_err(gpu_err)?;
        let tokens: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let logits = gpu.step(Slot::OneShot, &tokens, &main).map_err(gpu_err)?;
        let mut outs = vec![(main, logits)];
        outs.extend(gpu.read_states(Slot::OneShot, b, &names).map_err(gpu_err)?);
        Ok(outs)
    }

    /// Moves `state` onto the device as the decode state at its batch size.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_begin_decode(&mut self, state: &State) -> Result<(), Error> {
        use crate::gpu::Slot;
        self.ensure_step()?;
        let t: Vec<(&str, &[f32])> = state
            .names()
            .filter_map(|n| state.get(n).map(|(_, v)| (n, v)))
            .collect();
        self.gpu_model()?
            .write_states(Slot::Decode, state.batch(), &t)
            .map_err(|e| Error::Gpu(e.to_string()))
    }

    /// One step of the device-resident decode at batch `tokens.len()`.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_decode_step(&mut self, tokens: &[u32]) -> Result<Logits, Error> {
        use crate::gpu::Slot;
        let main = self.main_output();
        let vocab = self.vocab();
        let data = self
            .gpu_model()?
            .step(Slot::Decode, tokens, &main)
            .map_err(|e| Error::Gpu(e.to_string()))?;
        Ok(Logits {
            batch: tokens.len(),
            seq: 1,
            vocab,
            data,
        })
    }

    /// The device-resident decode state at batch `batch`, copied to the host.
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_decode_state(&mut self, batch: usize) -> Result<State, Error> {
        use crate::gpu::Slot;
        let specs = self.state_shapes(batch);
        let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
        let mut vals: HashMap<String, Vec<f32>> = self
            .gpu_model()?
            .read_states(Slot::Decode, batch, &names)
            .map_err(|e| Error::Gpu(e.to_string()))?
            .into_iter()
            .collect();
        State::from_tensors(
            specs
                .into_iter()
                .map(|(n, shape)| {
                    let v = vals.remove(&n).unwrap_or_default();
                    (n, shape, v)
                })
                .collect(),
        )
    }

    /// Device times of every launch of one decode step at batch `tokens.len()` (advances
    /// the device-resident decode state, like a step).
    #[cfg(feature = "cuda")]
    pub fn gpu_profile_step(
        &mut self,
        tokens: &[u32],
    ) -> Result<Vec<runtime::cuda::StepTime>, Error> {
        self.ensure_step()?;
        self.gpu_model()?
            .profile_step(tokens)
            .map_err(|e| Error::Gpu(e.to_string()))
    }

    #[cfg(not(feature = "cuda"))]
    pub(crate) fn gpu_begin_decode(&mut self, _state: &State) -> Result<(), Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    #[cfg(not(feature = "cuda"))]
    pub(crate) fn gpu_decode_step(&mut self, _tokens: &[u32]) -> Result<Logits, Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    #[cfg(not(feature = "cuda"))]
    pub(crate) fn gpu_decode_state(&mut self, _batch: usize) -> Result<State, Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    #[cfg(not(feature = "cuda"))]
    fn run_gpu(
        &mut self,
        _form: Form,
        _ids: &[i32],
        _b: usize,
        _l: usize,
        _states: &HashMap<String, Vec<f32>>,
    ) -> Result<runtime::cpu::Outputs, Error> {
        Err(Error::Gpu(NO_CUDA.into()))
    }

    /// The GPU's name, when the model runs on one.
    pub fn device_name(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.forward.device_name());
        }
        None
    }

    fn run_interp(
        &self,
        form: Form,
        ids: &[i32],
        b: usize,
        l: usize,
        states: &HashMap<String, Vec<f32>>,
    ) -> Result<runtime::cpu::Outputs, Error> {
        let graph = match (form, &self.step) {
            (Form::Parallel, _) => &self.graph,
            (Form::Step, Some(s)) => &s.graph,
            (Form::Step, None) => return Err(Error::Input("no step graph".into())),
        };
        let mut bind = runtime::interp::Bindings::default();
        bind.inputs.insert(
            "input_ids".into(),
            Array::new(vec![b, l], ids.iter().map(|&x| x as f64).collect()),
        );
        bind.params = self.params_f64()?;
        for (name, shape) in self.state_shapes(b) {
            if let Some(v) = states.get(&name) {
                bind.states.insert(
                    name,
                    Array::new(shape, v.iter().map(|&x| x as f64).collect()),
                );
            }
        }
        let outs = runtime::interp::run(graph, &bind)?;
        Ok(outs
            .values
            .into_iter()
            .map(|(n, a)| (n, a.data.iter().map(|&x| x as f32).collect()))
            .collect())
    }

    /// Vectors of a state replaced by a step, kept to receive the next step's final states.
    pub(crate) fn recycle(&mut self, old: Vec<(String, Vec<f32>)>) {
        if let Some(s) = self.step.as_mut() {
            s.spare = old;
        }
    }
}

/// `eos_token_id` of a `config.json` (a number, or the first of a list).
/// The name of a model graph's main output: the first output that is not a final state.
pub(crate) fn logits_output(g: &Graph) -> Option<String> {
    let states: Vec<&str> = g
        .nodes()
        .filter_map(|n| match g.op(n) {
            ir::Op::Input {
                name,
                kind: ir::InputKind::State,
                ..
            } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    g.outputs()
        .iter()
        .find(|(n, _)| !states.contains(&n.as_str()))
        .map(|(n, _)| n.clone())
}

/// The last axis of output `name` of `g` (0 if unknown).
fn output_width(g: &Graph, name: &str) -> usize {
    g.outputs()
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| g.value_type(*v))
        .and_then(|t| t.shape.last()?.as_known())
        .unwrap_or(0) as usize
}

fn config_eos(text: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let e = v.get("eos_token_id")?;
    let n = e.as_u64().or_else(|| e.as_array()?.first()?.as_u64())?;
    u32::try_from(n).ok()
}

fn compile(spec: &ModelSpec) -> Result<Graph, Error> {
    let (sources, r) = frontend::compile(spec);
    r.map(|c| c.graph).map_err(|d| Error::Model(d, sources))
}
