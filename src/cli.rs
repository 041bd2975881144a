//! The `ma2mba` command line: one subcommand per compiler stage a user can look at.
//!
//! [`run`] takes the arguments and returns the exit code with everything printed, so tests
//! drive the CLI in-process; `main` only forwards to it.

use crate::checkpoint::Device;
use clap::{Parser, Subcommand, ValueEnum};
use frontend::{Compiled, ModelSpec, Sources};
use ir::{DType, Graph, Op, shape_to_string, types::numel};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "ma2mba",
    version,
    about = "A compiler for Mamba-family state-space models"
)]
pub struct Cli {
    /// Colour diagnostics: auto (when stderr is a terminal), always, never.
    #[arg(long, global = true, default_value = "auto")]
    pub color: ColorChoice,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// How a command names its model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A preset (`mamba-130m`, `mamba2-2.7b`, `tiny-mamba2`, see `ma2mba models`), a model
    /// definition (`mamba2_lm`), or a path to a `.m2` model file.
    pub model: String,
    /// A `config.json` (reference or Hugging Face naming) to instantiate the model from.
    #[arg(long)]
    pub config: Option<String>,
    /// In a file with several presets or models: which one.
    #[arg(long = "model")]
    pub select: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum GraphFormat {
    Text,
    Dot,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Parse, elaborate and verify a model; print diagnostics or a one-line summary.
    Check(ModelArgs),
    /// Print the IR graph as text (it parses back) or as Graphviz DOT.
    Graph {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "text")]
        format: GraphFormat,
        /// Only these layers, `A..B` (half-open) or `A` (one layer).
        #[arg(long)]
        layers: Option<String>,
    },
    /// List every parameter with its checkpoint name, shape and dtype, and the total.
    Params {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// List the presets of the model library.
    Models,
    /// Run the forward pass and print the most likely next tokens (or write the logits).
    Run(RunArgs),
    /// Forward-pass throughput on the CPU, Cranelift backend and reference interpreter.
    Bench(BenchArgs),
    /// The loss (mean next-token cross-entropy) and the gradient of every parameter for one
    /// batch, from the f64 reference interpreter; names as in the checkpoint.
    Grad(GradArgs),
    /// Train a small Mamba on the CPU on the selective-copying task of the Mamba paper.
    Demo(DemoArgs),
    /// Train a model on a token file (CPU).
    Train(TrainArgs),
    /// The layer x time checkpoint plan for a memory budget, beside the classic strategies.
    Plan(PlanArgs),
    /// Continue a prompt: prefill, then the recurrent step token by token, streaming the
    /// text (or the ids) as it is produced; ends with prefill time, ms/token and tokens/s.
    Generate(GenerateArgs),
    /// Compile a model for a GPU target into one self-contained artifact (`.m2pack`):
    /// manifest (model, shapes, kernels, schedule, memory and checkpoint plans) and PTX.
    Compile(CompileArgs),
    /// Print an artifact's schedule, memory plan and checkpoint plan.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The GPU architecture: sm_90 (Hopper) or sm_80 (Ampere).
    #[arg(long, default_value = "sm_90", value_parser = ["sm_90", "sm_80"])]
    pub target: String,
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Sequence length: `2048`, `2^16`, `64k`.
    #[arg(long)]
    pub seq: String,
    /// The training graph (loss and every gradient) instead of the forward pass.
    #[arg(long)]
    pub train: bool,
    /// With --train: a memory budget (`40GiB`); the artifact carries the layer x time
    /// checkpoint plan chosen for it.
    #[arg(long, requires = "train")]
    pub budget: Option<String>,
    /// The artifact to write (atomically).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// An artifact written by `ma2mba compile`.
    pub artifact: PathBuf,
    /// Print at most this many steps of the schedule.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Print the manifest (JSON) instead.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Sequence length: `65536`, `2^19`, `512k`.
    #[arg(long)]
    pub seq: String,
    /// Memory budget: `40GiB`, `42.2GB`, `512MiB`. Without it: the plan of least memory.
    #[arg(long)]
    pub budget: Option<String>,
    /// How activations are stored (states, master weights and gradients stay f32).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Count only activations: leave out weights, gradients and optimizer state.
    #[arg(long)]
    pub activations_only: bool,
    /// Segment lengths are multiples of this (default: the SSD chunk size, or 1 for Mamba-1).
    #[arg(long)]
    pub quantum: Option<u64>,
    #[arg(long)]
    pub json: bool,
    /// Write memory over the schedule of every strategy to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Price the stages as this device lowers them (`train --device`): on `cuda`, bf16
    /// buffers and the tiled SSD kernels. No GPU is needed to plan.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Device {
        match d {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

/// How activations are stored while training.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ActArg {
    F32,
    /// bf16 activations and matrix-product operands (f32 accumulation); parameters, states,
    /// gradients and the loss stay f32.
    Bf16,
}

impl ActArg {
    pub fn dtype(self) -> ir::DType {
        match self {
            ActArg::F32 => ir::DType::F32,
            ActArg::Bf16 => ir::DType::BF16,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A preset (random weights), a directory with config.json + safetensors (and
    /// tokenizer.json), a `.safetensors` file (with --config), or a Hugging Face repo id.
    pub model: String,
    /// The prompt text (needs a tokenizer); repeat for a batch of prompts.
    #[arg(long, conflicts_with = "tokens")]
    pub prompt: Vec<String>,
    /// The prompt as token ids, space-separated; repeat for a batch. The output is then the
    /// generated ids, space-separated.
    #[arg(long)]
    pub tokens: Vec<String>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy. Without any sampling option decoding is greedy;
    /// with --top-k/--top-p/--min-p alone the temperature is 1.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0: off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens with probability mass >= p (1: off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep tokens with probability >= min-p x the top probability (0: off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Divide positive and multiply negative logits of tokens already seen (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a sequence when its text contains this string (repeatable; needs a tokenizer).
    #[arg(long)]
    pub stop: Vec<String>,
    /// The end-of-sequence token (default: config.json's eos_token_id, else the
    /// tokenizer's end-of-text token).
    #[arg(long)]
    pub eos: Option<u32>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// A tokenizer.json (or a directory holding one) instead of the model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `config.json` for a bare safetensors file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the ids, the text and the timings as one JSON object instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda: matrix products on bf16 copies of the weights (f32 accumulation;
    /// half the weight bytes per decode step).
    #[arg(long)]
    pub bf16_weights: bool,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the random weights of a preset.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A preset (random initialization), a directory with config.json + safetensors, or a
    /// repo id.
    pub model: String,
    /// Token ids: `.u16` / `.u32` (little-endian binary), `.npy` (uint16/uint32/int32/int64),
    /// or text with whitespace-separated ids.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Warmup steps of the learning-rate schedule.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Write the parameters (and `<file>.adam.safetensors` with the optimizer state) here,
    /// atomically, at the end and every --save-every steps.
    #[arg(long)]
    pub save: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Start from a checkpoint written by --save (parameters, optimizer state, step).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Train on `batch` contiguous streams of the data, carrying each stream's final states
    /// into its next batch (truncated backpropagation through time).
    #[arg(long)]
    pub carry_state: bool,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memory budget (`512MiB`, `2GB`): train under the layer x time checkpoint plan the
    /// planner chooses for it (weights, gradients and AdamW state count against it).
    #[arg(long)]
    pub budget: Option<String>,
    /// Read --data as UTF-8 text and tokenize it (with --tokenizer, or the model's tokenizer:
    /// its directory, its repo, GPT-NeoX-20B from the hub cache).
    #[arg(long)]
    pub text: bool,
    /// A `tokenizer.json` for --text.
    #[arg(long, requires = "text")]
    pub tokenizer: Option<PathBuf>,
    /// Where the training graph runs: the CPU, or the first CUDA GPU (the whole graph, or
    /// with --budget the checkpointed stages; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda: f32 matrix products on TF32 tensor cores (inputs rounded to a
    /// 10-bit mantissa, f32 accumulation).
    #[arg(long)]
    pub tf32: bool,
    /// How activations are stored (with bf16 the matrix products run on bf16 operands).
    #[arg(long, value_enum, default_value = "f32")]
    pub activations: ActArg,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Training steps at most (it stops early once the task is solved).
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

#[derive(clap::Args, Debug)]
pub struct GradArgs {
    /// A preset (random weights), a directory with config.json + safetensors, or a repo id.
    pub model: String,
    /// Token ids, space-separated: one sequence; each position predicts the next.
    #[arg(long, conflicts_with = "tokens_file")]
    pub tokens: Option<String>,
    /// A file of token ids, one sequence per line.
    #[arg(long)]
    pub tokens_file: Option<String>,
    /// `config.json` for a bare safetensors file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write every gradient (f32) to this safetensors file.
    #[arg(long)]
    pub dump_grads: Option<PathBuf>,
    /// Seed of the random weights of a preset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memory budget (`64MiB`): compute in f32 on the CPU under the checkpoint plan chosen
    /// for it, instead of with the f64 interpreter. Sequences must have equal lengths.
    #[arg(long)]
    pub budget: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Presets to measure (random weights).
    #[arg(long, value_delimiter = ',', default_value = "mamba-130m,mamba2-130m")]
    pub models: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Sequence length for the Cranelift backend.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Sequence length (batch 1) at which both backends run, for their ratio; 0 skips the
    /// interpreter.
    #[arg(long, default_value_t = 32)]
    pub interp_seq: usize,
    /// Timed repetitions (the median is reported) after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Measure generation instead: prefill tokens/s, decode ms/token at batch 1 and
    /// tokens/s at larger batches, next to the weight-bandwidth floor.
    #[arg(long)]
    pub generate: bool,
    /// With --generate: the prompt length of the prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// With --generate: decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub decode_batch: Vec<usize>,
    /// With --generate: timed decode steps per batch size (after one warm-up step).
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// With --generate: print where the last step's time went, per kernel kind (stderr).
    #[arg(long)]
    pub profile: bool,
    /// Where it runs (the GPU needs a build with `--features cuda`): with --generate the
    /// generation; otherwise the forward pass (and with --train a training step), with the
    /// device time per kernel kind and its achieved GB/s or TFLOP/s.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda: matrix products on bf16 copies of the weights (f32 accumulation).
    #[arg(long)]
    pub bf16_weights: bool,
    /// With --device cuda (not --generate): also time a whole training step.
    #[arg(long)]
    pub train: bool,
    /// With --device cuda (not --generate): how activations are stored (bf16: products on
    /// bf16 operands).
    #[arg(long, value_enum, default_value = "f32")]
    pub activations: ActArg,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendArg {
    Cranelift,
    Interp,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A preset (random weights), a directory with config.json + safetensors, a
    /// `.safetensors` file (with --config), or a Hugging Face repo id.
    pub model: String,
    /// Token ids, space-separated: one sequence.
    #[arg(long, conflicts_with = "tokens_file")]
    pub tokens: Option<String>,
    /// A file of token ids: one sequence per line (a batch; equal lengths).
    #[arg(long, visible_alias = "batch-file")]
    pub tokens_file: Option<String>,
    /// `config.json` for a bare safetensors file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the logits `[batch, seq, vocab]` (f32) to this safetensors file.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    #[arg(long, default_value = "cranelift")]
    pub backend: BackendArg,
    /// Worker threads for the kernels (default: all cores; GEMM threads: MATMUL_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// How many top tokens to print per position.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Seed of the random weights of a preset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print where the time went, per kernel kind.
    #[arg(long)]
    pub profile: bool,
    /// Where the forward pass runs: the CPU, or the first CUDA GPU (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// What a command produced: its exit code and output streams.
#[derive(Debug, Default)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the CLI on `args` (including the program name).
pub fn run<I, T>(args: I) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run_with(args, false)
}

/// [`run`], with `generate`'s text written to the process's stdout as it is produced
/// (and not kept in [`Outcome::stdout`]): what the binary does.
pub fn run_streaming<I, T>(args: I) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run_with(args, true)
}

fn run_with<I, T>(args: I, stream: bool) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let text = e.render().to_string();
            return if e.use_stderr() {
                Outcome {
                    code,
                    stdout: String::new(),
                    stderr: text,
                }
            } else {
                Outcome {
                    code,
                    stdout: text,
                    stderr: String::new(),
                }
            };
        }
    };
    let color = match cli.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let mut out = Outcome::default();
    match &cli.command {
        Command::Models => models(&mut out),
        Command::Check(m) => {
            if let Some(c) = compile(m, color, &mut out) {
                out.stdout.push_str(&summary(&c.graph));
            }
        }
        Command::Graph {
            model,
            format,
            layers,
        } => {
            let range = match layers.as_deref().map(parse_layers) {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(msg)) => {
                    out.stderr.push_str(&format!("error: --layers: {msg}\n"));
                    out.code = 1;
                    return out;
                }
            };
            if let Some(c) = compile(model, color, &mut out) {
                graph(&c.graph, *format, range, &mut out);
            }
        }
        Command::Run(r) => run_model(r, &mut out),
        Command::Bench(b) => bench(b, &mut out),
        Command::Grad(g) => grad(g, &mut out),
        Command::Demo(d) => demo(d, &mut out),
        Command::Train(t) => train(t, &mut out),
        Command::Plan(p) => {
            if let Some(c) = compile(&p.model, color, &mut out) {
                plan_cmd(p, &c.graph, &mut out);
            }
        }
        Command::Generate(g) => generate(g, stream, &mut out),
        Command::Compile(a) => {
            if cfg!(not(feature = "nvptx")) {
                out.stderr.push_str(NO_NVPTX);
                out.code = 1;
                return out;
            }
            if let Some(c) = compile(&a.model, color, &mut out) {
                compile_artifact(a, &c.graph, &mut out);
            }
        }
        Command::Inspect(a) => inspect(a, &mut out),
        Command::Params { model } => {
            if let Some(c) = compile(model, color, &mut out) {
                params(&c.graph, &mut out);
            }
        }
    }
    out
}

/// Compiles the named model, printing diagnostics to `out.stderr`; `None` on errors (exit 1).
fn compile(m: &ModelArgs, color: bool, out: &mut Outcome) -> Option<Compiled> {
    let mut spec = ModelSpec {
        model: m.model.clone(),
        select: m.select.clone(),
        ..ModelSpec::default()
    };
    let looks_like_path =
        m.model.ends_with(".m2") || m.model.contains('/') || m.model.contains('\\');
    if looks_like_path || Path::new(&m.model).is_file() {
        match std::fs::read(&m.model) {
            Ok(bytes) => spec.file_text = Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) => {
                out.stderr
                    .push_str(&format!("error[E0600]: cannot read {}: {e}\n", m.model));
                out.code = 1;
                return None;
            }
        }
    }
    if let Some(path) = &m.config {
        match std::fs::read(path) {
            Ok(bytes) => {
                spec.config = Some((path.clone(), String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(e) => {
                out.stderr
                    .push_str(&format!("error[E0600]: cannot read {path}: {e}\n"));
                out.code = 1;
                return None;
            }
        }
    }
    let (sources, result) = frontend::compile(&spec);
    match result {
        Ok(c) => {
            out.stderr
                .push_str(&frontend::render(&c.warnings, &sources, color));
            Some(c)
        }
        Err(diags) => {
            report(&diags, &sources, color, out);
            None
        }
    }
}

fn report(diags: &[frontend::Diagnostic], sources: &Sources, color: bool, out: &mut Outcome) {
    out.stderr
        .push_str(&frontend::render(diags, sources, color));
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        out.stderr.push_str(&format!(
            "error: {errors} error{} found\n",
            if errors == 1 { "" } else { "s" }
        ));
        out.code = 1;
    }
}

pub(crate) fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `mamba-130m: ok, 24 layers, 129,135,360 parameters, ...`.
pub fn summary(g: &Graph) -> String {
    let params = g.param_count().map_or("?".to_string(), group_digits);
    let inputs: Vec<String> = g
        .nodes()
        .filter_map(|n| match g.op(n) {
            Op::Input {
                name,
                kind: ir::InputKind::Data,
                ty,
            } => Some(format!("{name} {ty}")),
            _ => None,
        })
        .collect();
    let states = g
        .nodes()
        .filter(|&n| {
            matches!(
                g.op(n),
                Op::Input {
                    kind: ir::InputKind::State,
                    ..
                }
            )
        })
        .count();
    let main: Vec<String> = g
        .outputs()
        .iter()
        .filter(|(name, _)| !g.nodes().any(|n| matches!(g.op(n), Op::Input { name: s, kind: ir::InputKind::State, .. } if s == name)))
        .filter_map(|(name, v)| g.value_type(*v).map(|t| format!("{name} {t}")))
        .collect();
    format!(
        "{}: ok, {} layers, {params} parameters, {} ops; inputs: {}; outputs: {}; {states} recurrent states\n",
        g.name,
        g.num_layers(),
        g.len(),
        inputs.join(", "),
        main.join(", "),
    )
}

fn parse_layers(s: &str) -> Result<Range<u32>, String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{t}` is not a layer index"))
    };
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            if a >= b {
                return Err(format!("empty range {a}..{b}"));
            }
            Ok(a..b)
        }
        None => {
            let a = parse(s)?;
            Ok(a..a.saturating_add(1))
        }
    }
}

fn graph(g: &Graph, format: GraphFormat, layers: Option<Range<u32>>, out: &mut Outcome) {
    if let Some(r) = &layers
        && r.start >= g.num_layers()
    {
        out.stderr.push_str(&format!(
            "error: --layers {}..{}: the model has {} layers\n",
            r.start,
            r.end,
            g.num_layers()
        ));
        out.code = 1;
        return;
    }
    match format {
        GraphFormat::Dot => {
            let opts = ir::dot::DotOptions { layers };
            out.stdout.push_str(&ir::dot::to_dot(g, &opts));
        }
        GraphFormat::Text => match layers {
            None => out.stdout.push_str(&ir::print(g)),
            Some(r) => {
                let keep = |n: ir::NodeId| g.layer(n).is_some_and(|l| r.contains(&l));
                out.stdout.push_str(&ir::text::print_filtered(g, &keep));
            }
        },
    }
}

fn params(g: &Graph, out: &mut Outcome) {
    let rows: Vec<(String, String, DType, u64)> = g
        .params()
        .filter_map(|n| match g.op(n) {
            Op::Param { name, ty, .. } => {
                let count = numel(&ty.shape).and_then(|d| d.as_known()).unwrap_or(0);
                Some((name.clone(), shape_to_string(&ty.shape), ty.dtype, count))
            }
            _ => None,
        })
        .collect();
    let w_name = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    let w_shape = rows.iter().map(|r| r.1.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        out.stdout,
        "{:<w_name$}  {:<w_shape$}  dtype  {:>13}",
        "name", "shape", "count"
    );
    for (name, shape, dtype, count) in &rows {
        let _ = writeln!(
            out.stdout,
            "{name:<w_name$}  {shape:<w_shape$}  {:<5}  {:>13}",
            dtype.name(),
            group_digits(*count)
        );
    }
    let total: u64 = rows.iter().map(|r| r.3).sum();
    let _ = writeln!(
        out.stdout,
        "total: {} parameters in {} tensors",
        group_digits(total),
        rows.len()
    );
}

fn models(out: &mut Outcome) {
    let prog = match frontend::Program::with_library() {
        Ok(p) => p,
        Err(d) => {
            let mut s = Sources::new();
            s.add(frontend::LIBRARY_NAME, frontend::LIBRARY);
            report(&d, &s, false, out);
            return;
        }
    };
    let mut presets: Vec<&frontend::ast::Preset> = prog.presets().collect();
    presets.sort_by_key(|p| p.span.start);
    for p in presets {
        let spec = ModelSpec {
            model: p.name.clone(),
            ..ModelSpec::default()
        };
        let (_, r) = frontend::compile(&spec);
        let count = match r {
            Ok(c) => c.graph.param_count().map_or("?".into(), group_digits),
            Err(_) => "error".into(),
        };
        let _ = writeln!(
            out.stdout,
            "{:<14} {:<10} {:>15} parameters",
            p.name, p.model.name, count
        );
    }
}

fn parse_ids(text: &str, what: &str) -> Result<Vec<Vec<u32>>, String> {
    let mut seqs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ids: Result<Vec<u32>, String> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<u32>()
                    .map_err(|_| format!("{what} line {}: `{t}` is not a token id", i + 1))
            })
            .collect();
        seqs.push(ids?);
    }
    if seqs.is_empty() {
        return Err(format!("{what} holds no token ids"));
    }
    Ok(seqs)
}

/// The token ids of `run`: `--tokens` or `--tokens-file`, one sequence per line.
fn run_tokens(r: &RunArgs) -> Result<Vec<Vec<u32>>, String> {
    match (&r.tokens, &r.tokens_file) {
        (Some(t), _) => parse_ids(t, "--tokens"),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {f}: {e}"))
            .and_then(|t| parse_ids(&t, f)),
        (None, None) => Err("give the input with --tokens \"1 2 3\" or --tokens-file F".into()),
    }
}

/// Reports an error: the message on stderr (one trailing newline), exit code 1.
fn fail(out: &mut Outcome, msg: String) {
    out.stderr.push_str(msg.trim_end());
    out.stderr.push('\n');
    out.code = 1;
}

fn run_model(r: &RunArgs, out: &mut Outcome) {
    if r.model.ends_with(".m2pack") {
        return run_artifact(r, out);
    }
    let tokens = match run_tokens(r) {
        Ok(t) => t,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    if let Some(n) = r.threads {
        // The CPU kernels and GEMMs use rayon's global pool and matrixmultiply's threads.
        // Kernels run on rayon's global pool (GEMMs use matrixmultiply's own threads,
        // set with MATMUL_NUM_THREADS).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    let backend = match (r.device, r.backend) {
        (DeviceArg::Cuda, BackendArg::Interp) => {
            return fail(
                out,
                "error: --backend interp runs on the CPU: leave out --device cuda".into(),
            );
        }
        (DeviceArg::Cuda, _) if cfg!(not(feature = "cuda")) => {
            return fail(out, format!("error: {}", crate::model::NO_CUDA));
        }
        (DeviceArg::Cuda, _) => crate::model::Backend::Cuda,
        (DeviceArg::Cpu, BackendArg::Cranelift) => crate::model::Backend::Cranelift,
        (DeviceArg::Cpu, BackendArg::Interp) => crate::model::Backend::Interp,
    };
    let opts = crate::model::LoadOptions {
        config: r.config.clone(),
        seed: r.seed,
        backend,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut model = match crate::model::Model::load(&r.model, &opts) {
        Ok(m) => m,
        Err(e) => return fail(out, format!("{e}")),
    };
    let loaded = started.elapsed();
    let t0 = std::time::Instant::now();
    let logits = match model.forward(&tokens) {
        Ok(l) => l,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let ran = t0.elapsed();
    if let Some(path) = &r.dump_logits {
        let t = vec![(
            "logits".to_string(),
            vec![logits.batch, logits.seq, logits.vocab],
            logits.data.clone(),
        )];
        if let Err(e) = runtime::weights::save_f32(path, &t) {
            return fail(out, format!("error: {e}"));
        }
        let _ = writeln!(
            out.stdout,
            "wrote logits [{}, {}, {}] to {}",
            logits.batch,
            logits.seq,
            logits.vocab,
            path.display()
        );
    } else {
        for (b, seq) in tokens.iter().enumerate() {
            if logits.batch > 1 {
                let _ = writeln!(out.stdout, "sequence {b}:");
            }
            for (t, id) in seq.iter().enumerate() {
                let row = logits.at(b, t);
                let _ = writeln!(out.stdout, "  {t:>4} {id:>6} -> {}", top_k(row, r.top));
            }
        }
    }
    if r.profile
        && let Some(p) = model.last_profile()
    {
        let _ = writeln!(out.stderr, "arena: {} bytes", p.arena_bytes);
        for (kind, d, count) in p.by_kind() {
            let _ = writeln!(out.stderr, "  {kind:<20} {count:>5} launches {d:>12.2?}");
        }
    }
    let n = logits.batch * logits.seq;
    let _ = writeln!(
        out.stderr,
        "{}{}: loaded in {:.2?}; forward of {n} tokens in {:.2?} ({:.1} tokens/s)",
        model.graph.name,
        model
            .device_name()
            .map_or(String::new(), |d| format!(" on {d}")),
        loaded,
        ran,
        n as f64 / ran.as_secs_f64().max(1e-9)
    );
}

/// `run x.m2pack --device cuda`: the artifact's schedule and PTX on the GPU, with the
/// weights of the model it was compiled from (its `source`: a preset's random weights with
/// `--seed`, or a checkpoint directory).
fn run_artifact(r: &RunArgs, out: &mut Outcome) {
    if r.device != DeviceArg::Cuda {
        return fail(
            out,
            "error: an artifact runs on the GPU: add --device cuda".into(),
        );
    }
    run_artifact_gpu(r, out);
}

#[cfg(not(feature = "cuda"))]
fn run_artifact_gpu(_r: &RunArgs, out: &mut Outcome) {
    fail(out, format!("error: {}", crate::model::NO_CUDA));
}

#[cfg(feature = "cuda")]
fn run_artifact_gpu(r: &RunArgs, out: &mut Outcome) {
    use runtime::cpu::HostData;
    let a = match crate::artifact::Artifact::read(std::path::Path::new(&r.model)) {
        Ok(a) => a,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    if a.manifest.train {
        return fail(
            out,
            "error: this is a training artifact; `run` takes a forward one (compile without --train)"
                .into(),
        );
    }
    let tokens = match run_tokens(r) {
        Ok(t) => t,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let sym = |n: &str| {
        a.manifest
            .symbols
            .iter()
            .find(|(s, _)| s == n)
            .map(|(_, v)| *v as usize)
    };
    let (b, l) = (tokens.len(), tokens.first().map_or(0, Vec::len));
    if Some(b) != sym("B") || Some(l) != sym("L") || tokens.iter().any(|t| t.len() != l) {
        return fail(
            out,
            format!(
                "error: the artifact was compiled for batch {} and {} tokens per sequence; the input has {b} sequences of {} tokens",
                sym("B").unwrap_or(0),
                sym("L").unwrap_or(0),
                tokens
                    .iter()
                    .map(|t| t.len().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        );
    }
    let opts = crate::model::LoadOptions {
        config: r.config.clone(),
        seed: r.seed,
        backend: crate::model::Backend::Interp,
        ..Default::default()
    };
    let model = match crate::model::Model::load(&a.manifest.model.source, &opts) {
        Ok(m) => m,
        Err(e) => {
            return fail(
                out,
                format!(
                    "error: the artifact's model `{}`: {e}",
                    a.manifest.model.source
                ),
            );
        }
    };
    let gpu = match crate::gpu::GpuArtifact::load(&a, 0) {
        Ok(g) => g,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let ids: Vec<i32> = tokens.iter().flatten().map(|&t| t as i32).collect();
    let data = std::collections::HashMap::from([("input_ids".to_string(), HostData::I32(ids))]);
    let t0 = std::time::Instant::now();
    let outs = match gpu.run(
        &data,
        model.params_f32(),
        &std::collections::HashMap::new(),
        runtime::cuda::ExecOptions::default(),
    ) {
        Ok(o) => o,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let ran = t0.elapsed();
    let vocab = model.vocab();
    // The logits: the output that is not a final state.
    let states: Vec<&str> = a
        .manifest
        .buffers
        .iter()
        .filter(|b| b.kind == "state")
        .map(|b| b.name.as_str())
        .collect();
    let Some((_, data)) = outs
        .into_iter()
        .find(|(n, _)| !states.contains(&n.as_str()))
    else {
        return fail(out, "error: the artifact has no logits output".into());
    };
    let logits = crate::model::Logits {
        batch: b,
        seq: l,
        vocab,
        data,
    };
    if let Some(path) = &r.dump_logits {
        let t = vec![("logits".to_string(), vec![b, l, vocab], logits.data.clone())];
        if let Err(e) = runtime::weights::save_f32(path, &t) {
            return fail(out, format!("error: {e}"));
        }
        let _ = writeln!(
            out.stdout,
            "wrote logits [{b}, {l}, {vocab}] to {}",
            path.display()
        );
    } else {
        for (bi, seq) in tokens.iter().enumerate() {
            for (t, id) in seq.iter().enumerate() {
                let _ = writeln!(
                    out.stdout,
                    "  {t:>4} {id:>6} -> {}",
                    top_k(logits.at(bi, t), r.top)
                );
            }
        }
    }
    let _ = writeln!(
        out.stderr,
        "{} (artifact {}) on {}: {} steps in {ran:.2?}",
        a.manifest.model.name,
        r.model,
        gpu.device_name(),
        a.manifest.steps.len()
    );
}

/// `id (p)` for the `k` most likely tokens of one logits row.
fn top_k(row: &[f32], k: usize) -> String {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.iter()
        .take(k)
        .map(|&i| format!("{i} ({:.3})", ((row[i] - max) as f64).exp() / z))
        .collect::<Vec<_>>()
        .join("  ")
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Tokens per second of `runs` timed forward passes after a warm-up.
fn time_forward(
    m: &mut crate::model::Model,
    tokens: &[Vec<u32>],
    runs: usize,
) -> Result<f64, String> {
    m.forward(tokens).map_err(|e| e.to_string())?;
    let n = (tokens.len() * tokens[0].len()) as f64;
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let t = std::time::Instant::now();
        m.forward(tokens).map_err(|e| e.to_string())?;
        rates.push(n / t.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

fn bench(b: &BenchArgs, out: &mut Outcome) {
    use crate::model::{Backend, LoadOptions, Model};
    if b.activations != ActArg::F32 && (b.generate || b.device != DeviceArg::Cuda) {
        return fail(
            out,
            "error: --activations is for timing forward passes and training steps with \
             --device cuda"
                .into(),
        );
    }
    if b.generate {
        return bench_generate(b, out);
    }
    if b.device == DeviceArg::Cuda {
        return bench_gpu(b, out);
    }
    let threads = rayon::current_num_threads();
    let _ = writeln!(
        out.stdout,
        "CPU forward, random weights, f32, {threads} threads; median of {} runs",
        b.repeat
    );
    let _ = writeln!(
        out.stdout,
        "| model | batch | seq | backend | tokens/s | GEMM GFLOP/s | GEMM share |"
    );
    let _ = writeln!(out.stdout, "|---|---|---|---|---|---|---|");
    for name in &b.models {
        let opts = LoadOptions {
            backend: Backend::Cranelift,
            ..LoadOptions::default()
        };
        let mut m = match Model::load(name, &opts) {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(out.stderr, "error: {name}: {e}");
                out.code = 1;
                return;
            }
        };
        let vocab = m.vocab().max(1) as u64;
        let mut rng = runtime::init::Rng::new(7);
        let mut toks = |bs: usize, l: usize| -> Vec<Vec<u32>> {
            (0..bs)
                .map(|_| (0..l).map(|_| (rng.next_u64() % vocab) as u32).collect())
                .collect()
        };
        for &bs in &b.batch {
            let t = toks(bs, b.seq);
            match time_forward(&mut m, &t, b.repeat) {
                Ok(rate) => {
                    let (gflops, share) = gemm_stats(&m, bs, b.seq);
                    let _ = writeln!(
                        out.stdout,
                        "| {name} | {bs} | {} | cranelift | {rate:.1} | {gflops} | {share} |",
                        b.seq
                    );
                }
                Err(e) => {
                    let _ = writeln!(out.stderr, "error: {name}: {e}");
                    out.code = 1;
                }
            }
        }
        if b.interp_seq > 0 {
            let t = toks(1, b.interp_seq);
            let fast = time_forward(&mut m, &t, b.repeat);
            let mut slow_model = match Model::load(
                name,
                &LoadOptions {
                    backend: Backend::Interp,
                    ..LoadOptions::default()
                },
            ) {
                Ok(m) => m,
                Err(e) => {
                    let _ = writeln!(out.stderr, "error: {name}: {e}");
                    out.code = 1;
                    return;
                }
            };
            let slow = time_forward(&mut slow_model, &t, 1);
            if let (Ok(f), Ok(s)) = (fast, slow) {
                let _ = writeln!(
                    out.stdout,
                    "| {name} | 1 | {} | cranelift | {f:.1} | | |",
                    b.interp_seq
                );
                let _ = writeln!(
                    out.stdout,
                    "| {name} | 1 | {} | interpreter (f64) | {s:.2} | | |",
                    b.interp_seq
                );
                let _ = writeln!(
                    out.stdout,
                    "| {name} | | | ratio cranelift / interpreter | {:.0}x | | |",
                    f / s
                );
            }
        }
    }
}

/// Achieved GEMM rate and the GEMMs' share of the last forward pass's time.
fn gemm_stats(m: &crate::model::Model, batch: usize, seq: usize) -> (String, String) {
    let (Some(p), Some(l)) = (m.last_profile(), m.lowered()) else {
        return (String::new(), String::new());
    };
    let bind = |s: &str| Some(if s == "B" { batch as u64 } else { seq as u64 });
    let mut flops = 0f64;
    for step in &l.steps {
        if let ir::schedule::Step::MatMul { batch, m, k, n, .. } = step {
            let ev = |d: &ir::Dim| d.eval(&bind).unwrap_or(0) as f64;
            flops += 2.0 * batch.eval(&bind).unwrap_or(0) as f64 * ev(m) * ev(k) * ev(n);
        }
    }
    let gemm: f64 = p
        .steps
        .iter()
        .filter(|(n, _)| n.starts_with("matmul"))
        .map(|(_, d)| d.as_secs_f64())
        .sum();
    let total: f64 = p.steps.iter().map(|(_, d)| d.as_secs_f64()).sum();
    (
        format!("{:.1}", flops / gemm.max(1e-12) / 1e9),
        format!("{:.0}%", 100.0 * gemm / total.max(1e-12)),
    )
}

fn grad(g: &GradArgs, out: &mut Outcome) {
    let tokens = match (&g.tokens, &g.tokens_file) {
        (Some(t), _) => parse_ids(t, "--tokens"),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {f}: {e}"))
            .and_then(|t| parse_ids(&t, f)),
        (None, None) => Err("give the input with --tokens \"1 2 3\" or --tokens-file F".into()),
    };
    let tokens = match tokens {
        Ok(t) if t.iter().all(|s| s.len() >= 2) => t,
        Ok(_) => {
            return fail(
                out,
                "error: each sequence needs at least 2 tokens (one to predict)".into(),
            );
        }
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let opts = crate::model::LoadOptions {
        config: g.config.clone(),
        seed: g.seed,
        backend: crate::model::Backend::Interp,
        ..Default::default()
    };
    let model = match crate::model::Model::load(&g.model, &opts) {
        Ok(m) => m,
        Err(e) => return fail(out, format!("{e}")),
    };
    let t0 = std::time::Instant::now();
    let budget = match g.budget.as_deref().map(crate::plan::parse_bytes) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => return fail(out, format!("error: --budget: {e}")),
    };
    let result = match budget {
        None => model.grad_reference(&tokens),
        Some(b) => grad_checkpointed(&model, &tokens, b, out),
    };
    let grads = match result {
        Ok(r) => r,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let _ = writeln!(out.stdout, "loss {:.9}", grads.loss);
    for (name, shape, v) in &grads.grads {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let _ = writeln!(out.stdout, "  {name:<45} {shape:?} |grad| {norm:.6e}");
    }
    if let Some(path) = &g.dump_grads {
        let t: Vec<(String, Vec<usize>, Vec<f32>)> = grads
            .grads
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|&x| x as f32).collect()))
            .collect();
        if let Err(e) = runtime::weights::save_f32(path, &t) {
            return fail(out, format!("error: {e}"));
        }
        let _ = writeln!(
            out.stdout,
            "wrote {} gradients to {}",
            t.len(),
            path.display()
        );
    }
    let _ = writeln!(
        out.stderr,
        "{}: loss and gradients in {:.2?} ({})",
        model.graph.name,
        t0.elapsed(),
        if budget.is_some() {
            "f32, CPU, checkpointed"
        } else {
            "f64 interpreter"
        }
    );
}

/// Loss and gradients of `tokens` (equal-length sequences) under the checkpoint plan for
/// `budget` bytes, on the CPU in f32; prints the plan.
fn grad_checkpointed(
    model: &crate::model::Model,
    tokens: &[Vec<u32>],
    budget: u64,
    out: &mut Outcome,
) -> Result<crate::model::Gradients, crate::model::Error> {
    use crate::model::{Error, IGNORE_INDEX};
    let l = tokens[0].len();
    if tokens.iter().any(|s| s.len() != l) {
        return Err(Error::Input(
            "with --budget every sequence must have the same length".into(),
        ));
    }
    let b = tokens.len();
    let graph = &model.graph;
    let params = model.params_f32();
    let mut ids = Vec::with_capacity(b * l);
    let mut targets = Vec::with_capacity(b * l);
    for s in tokens {
        ids.extend(s.iter().map(|&t| t as i32));
        targets.extend(s[1..].iter().map(|&t| t as i32));
        targets.push(IGNORE_INDEX as i32);
    }
    let plan = crate::train::plan_for(graph, budget, (b, l), true, (DType::F32, Device::Cpu))?;
    let _ = writeln!(
        out.stdout,
        "checkpoint plan: {}; planned peak {}, recompute {:.1}% of a step",
        passes::remat::describe(&plan),
        crate::plan::human(plan.peak),
        plan.recompute_pct()
    );
    let step = crate::checkpoint::CheckpointedStep::compile(graph, &plan)?;
    let r = step.run(params, &ids, &targets, &std::collections::HashMap::new())?;
    let mut grads = Vec::new();
    for n in graph.params() {
        if let Op::Param { name, ty, .. } = graph.op(n) {
            let shape: Vec<usize> = ty
                .shape
                .iter()
                .map(|d| d.as_known().unwrap_or(0) as usize)
                .collect();
            let v = r
                .grads
                .get(name)
                .ok_or_else(|| Error::Input(format!("no gradient for `{name}`")))?;
            grads.push((name.clone(), shape, v.iter().map(|&x| x as f64).collect()));
        }
    }
    Ok(crate::model::Gradients {
        loss: r.loss,
        grads,
    })
}

/// Trains a 2-layer Mamba on selective copying and prints loss and accuracy as it learns.
fn demo(d: &DemoArgs, out: &mut Outcome) {
    use crate::train::{TrainConfig, Trainer, accuracy, selective_copy_batch};
    use frontend::{ConfigArg, ConfigValue};
    let (prefix, k, n_data) = (32usize, 4usize, 8usize);
    let arg = |n: &str, v: i64| ConfigArg {
        name: n.into(),
        value: ConfigValue::Int(v),
        span: None,
        origin: None,
    };
    let args = [
        arg("d_model", 64),
        arg("n_layer", 2),
        arg("vocab_size", 2 + n_data as i64),
        arg("d_state", 16),
    ];
    let prog = match frontend::Program::with_library() {
        Ok(p) => p,
        Err(_) => {
            out.stderr
                .push_str("error: the model library does not parse\n");
            out.code = 1;
            return;
        }
    };
    let graph = match frontend::elaborate::elaborate(&prog, "mamba_lm", "demo-mamba", &args) {
        Ok((g, _)) => g,
        Err(diags) => {
            report(&diags, &prog.sources, false, out);
            return;
        }
    };
    let params: std::collections::HashMap<String, Vec<f32>> =
        runtime::init::init_params(&graph, d.seed)
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f32).collect()))
            .collect();
    let vocab = graph
        .outputs()
        .iter()
        .find(|(n, _)| n == "logits")
        .and_then(|(_, v)| graph.value_type(*v))
        .and_then(|t| t.shape.last()?.as_known())
        .unwrap_or(16) as usize;
    let config = TrainConfig {
        lr: d.lr,
        warmup_steps: 100,
        total_steps: d.steps,
        weight_decay: 0.01,
        ..TrainConfig::default()
    };
    let seq = prefix + k;
    // The checkpoint plan: a budget 20% above the least memory any plan needs (far below
    // what keeping every activation needs), so the plan mixes recomputed and kept cells.
    let t0 = std::time::Instant::now();
    let req = crate::train::request_for(&graph, None, d.batch, seq);
    let planned =
        passes::remat::Planner::new(&graph, req, crate::model::IGNORE_INDEX).and_then(|mut p| {
            let least = p.plan()?;
            let mut none = p.grid_plan(graph.num_layers(), seq as u64, u64::MAX, 0)?;
            none.strategy = "no checkpointing".into();
            let budget = least.peak + least.peak / 5;
            p.request.budget = Some(budget);
            let chosen = p.plan()?;
            Ok((least, none, budget, chosen))
        });
    let (least, none, budget, chosen) = match planned {
        Ok(x) => x,
        Err(e) => {
            let _ = writeln!(out.stderr, "error: {e}");
            out.code = 1;
            return;
        }
    };
    let mut trainer = match Trainer::with_budget(&graph, "logits", params, config, budget) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out.stderr, "error: {e}");
            out.code = 1;
            return;
        }
    };
    let _ = writeln!(
        out.stdout,
        "selective copying: {k} data tokens among {prefix} noise positions, copied after {k} markers"
    );
    let _ = writeln!(
        out.stdout,
        "model: Mamba-1, d_model 64, 2 layers, d_state 16, {} parameters; planned in {:.2?}",
        graph.param_count().unwrap_or(0),
        t0.elapsed()
    );
    let _ = writeln!(
        out.stdout,
        "checkpoint plan for batch {} x {seq} tokens within {} (least-memory plan {}, no checkpointing {}):\n  {}; peak {}, recomputing {:.1}% of a step",
        d.batch,
        crate::plan::human(budget),
        crate::plan::human(least.peak),
        crate::plan::human(none.peak),
        passes::remat::describe(&chosen),
        crate::plan::human(chosen.peak),
        chosen.recompute_pct()
    );
    for line in crate::plan::cell_grid(&chosen).lines() {
        let _ = writeln!(out.stdout, "  {line}");
    }
    let _ = writeln!(
        out.stdout,
        "{:>6} {:>9} {:>9} {:>10} {:>10}",
        "step", "loss", "accuracy", "tokens/s", "act. peak"
    );
    let mut rng = runtime::init::Rng::new(d.seed ^ 0x5eed);
    let mut window = Vec::new();
    let started = std::time::Instant::now();
    for step in 0..d.steps {
        let (ids, targets) = selective_copy_batch(&mut rng, d.batch, prefix, k, n_data);
        let stats = match trainer.step(&ids, &targets, d.batch, seq) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out.stderr, "error: step {step}: {e}");
                out.code = 1;
                return;
            }
        };
        window.push((stats.loss, accuracy(&stats.logits, &targets, vocab)));
        if (step + 1) % 50 == 0 || step + 1 == d.steps {
            let n = window.len() as f64;
            let loss = window.iter().map(|w| w.0).sum::<f64>() / n;
            let acc = window.iter().map(|w| w.1).sum::<f64>() / n;
            window.clear();
            let rate = ((step + 1) * d.batch * seq) as f64 / started.elapsed().as_secs_f64();
            let _ = writeln!(
                out.stdout,
                "{:>6} {loss:>9.4} {acc:>9.3} {rate:>10.0} {:>10}",
                step + 1,
                crate::plan::human(stats.arena_bytes)
            );
            print!("{}", std::mem::take(&mut out.stdout));
            if acc > 0.98 {
                let _ = writeln!(
                    out.stdout,
                    "solved: accuracy {acc:.3} after {} steps, {:.1?}",
                    step + 1,
                    started.elapsed()
                );
                return;
            }
        }
    }
    let _ = writeln!(
        out.stdout,
        "stopped after {} steps, {:.1?}",
        d.steps,
        started.elapsed()
    );
}

/// Reads a token file (see `TrainArgs::data`).
/// `train --text`: the data file as UTF-8 text, encoded with the tokenizer.
fn text_tokens(
    a: &TrainArgs,
    model: &crate::model::Model,
    vocab: usize,
) -> Result<Vec<u32>, String> {
    use crate::tokenizer::Tokenizer;
    let text = std::fs::read_to_string(&a.data)
        .map_err(|e| format!("cannot read {} as UTF-8 text: {e}", a.data.display()))?;
    let dir = model.source_dir.as_deref();
    let tokenizer = match &a.tokenizer {
        Some(p) => Tokenizer::from_path(p).map_err(|e| e.to_string())?,
        None => Tokenizer::for_model(&a.model, dir, vocab, true)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no tokenizer for `{}` ({})\n  help: give --tokenizer path/to/tokenizer.json",
                    a.model,
                    Tokenizer::searched(&a.model, dir, vocab)
                )
            })?,
    };
    let ids = tokenizer.encode(&text).map_err(|e| e.to_string())?;
    eprintln!(
        "{}: {} characters -> {} tokens with {}",
        a.data.display(),
        text.chars().count(),
        ids.len(),
        tokenizer.path().display()
    );
    Ok(ids)
}

fn read_tokens(path: &Path) -> Result<Vec<u32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let words = |w: usize, b: &[u8]| -> Result<Vec<u32>, String> {
        if !b.len().is_multiple_of(w) {
            return Err(format!(
                "{}: {} bytes is not a whole number of {w}-byte ids",
                path.display(),
                b.len()
            ));
        }
        Ok(b.chunks_exact(w)
            .map(|c| match w {
                2 => u16::from_le_bytes([c[0], c[1]]) as u32,
                _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            })
            .collect())
    };
    match ext {
        "u16" => words(2, &bytes),
        "u32" | "bin" => words(4, &bytes),
        "npy" => {
            // magic, version, header length, then a python dict with 'descr'.
            if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
                return Err(format!("{}: not a .npy file", path.display()));
            }
            let (hlen, start) = if bytes[6] == 1 {
                (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
            } else if bytes.len() >= 12 {
                (
                    u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                    12,
                )
            } else {
                return Err(format!("{}: truncated .npy header", path.display()));
            };
            let header = bytes
                .get(start..start + hlen)
                .map(String::from_utf8_lossy)
                .ok_or_else(|| format!("{}: truncated .npy header", path.display()))?;
            let data = &bytes[start + hlen..];
            if header.contains("'fortran_order': True") {
                return Err(format!(
                    "{}: fortran-order arrays are not supported",
                    path.display()
                ));
            }
            if header.contains("'<u2'") {
                words(2, data)
            } else if header.contains("'<u4'") || header.contains("'<i4'") {
                words(4, data)
            } else if header.contains("'<i8'") || header.contains("'<u8'") {
                if data.len() % 8 != 0 {
                    return Err(format!("{}: truncated data", path.display()));
                }
                data.chunks_exact(8)
                    .map(|c| {
                        let v =
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                        u32::try_from(v)
                            .map_err(|_| format!("{}: token id {v} out of range", path.display()))
                    })
                    .collect()
            } else {
                Err(format!(
                    "{}: unsupported .npy dtype in {header}; use uint16, uint32, int32 or int64",
                    path.display()
                ))
            }
        }
        _ => parse_ids(
            &String::from_utf8_lossy(&bytes),
            &path.display().to_string(),
        )
        .map(|rows| rows.concat()),
    }
}

fn save_checkpoint(
    path: &Path,
    t: &crate::train::Trainer,
    shapes: &std::collections::HashMap<String, Vec<usize>>,
) -> Result<(), String> {
    let mut names: Vec<&String> = t.params.keys().collect();
    names.sort();
    let params: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| ((*n).clone(), shapes[*n].clone(), t.params[*n].clone()))
        .collect();
    runtime::weights::save_f32(path, &params).map_err(|e| e.to_string())?;
    let (m, v) = t.moments();
    let mut opt: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for n in &names {
        opt.push((format!("m.{n}"), shapes[*n].clone(), m[*n].clone()));
        opt.push((format!("v.{n}"), shapes[*n].clone(), v[*n].clone()));
    }
    opt.push(("step".into(), vec![1], vec![t.step as f32]));
    runtime::weights::save_f32(&adam_path(path), &opt).map_err(|e| e.to_string())
}

fn adam_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".adam.safetensors");
    PathBuf::from(s)
}

fn train(a: &TrainArgs, out: &mut Outcome) {
    use crate::train::{TrainConfig, Trainer};
    let budget = match a.budget.as_deref().map(crate::plan::parse_bytes) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => return fail(out, format!("error: --budget: {e}")),
    };
    if a.device == DeviceArg::Cuda && cfg!(not(feature = "cuda")) {
        return fail(out, format!("error: {}", crate::model::NO_CUDA));
    }
    if a.tf32 && a.device != DeviceArg::Cuda {
        return fail(out, "error: --tf32 is for --device cuda".into());
    }
    #[cfg(feature = "cuda")]
    if a.tf32 {
        runtime::cuda::set_tf32_default(true);
    }
    if a.seq_len == 0 || a.batch == 0 {
        return fail(
            out,
            "error: --seq-len and --batch must be at least 1".into(),
        );
    }
    let opts = crate::model::LoadOptions {
        seed: a.seed,
        backend: crate::model::Backend::Interp,
        ..Default::default()
    };
    let model = match crate::model::Model::load(&a.model, &opts) {
        Ok(m) => m,
        Err(e) => return fail(out, format!("{e}")),
    };
    let vocab = model.vocab();
    let tokens = if a.text {
        match text_tokens(a, &model, vocab) {
            Ok(t) => t,
            Err(e) => return fail(out, format!("error: {e}")),
        }
    } else {
        match read_tokens(&a.data) {
            Ok(t) => t,
            Err(e) => return fail(out, format!("error: {e}")),
        }
    };
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return fail(
            out,
            format!(
                "error: {}: token id {bad} is outside the vocabulary of {vocab}",
                a.data.display()
            ),
        );
    }
    let need = if a.carry_state {
        a.batch * (a.seq_len + 1)
    } else {
        a.seq_len + 1
    };
    if tokens.len() < need {
        return fail(
            out,
            format!(
                "error: {} holds {} tokens; one batch needs {need}",
                a.data.display(),
                tokens.len()
            ),
        );
    }
    let (graph, mut params) = model.into_parts();
    let shapes: std::collections::HashMap<String, Vec<usize>> = graph
        .params()
        .filter_map(|n| match graph.op(n) {
            ir::Op::Param { name, ty, .. } => Some((
                name.clone(),
                ty.shape
                    .iter()
                    .map(|d| d.as_known().unwrap_or(0) as usize)
                    .collect(),
            )),
            _ => None,
        })
        .collect();
    let mut resume_opt = None;
    if let Some(r) = &a.resume {
        let ck = match runtime::weights::Checkpoint::open(r) {
            Ok(c) => c,
            Err(e) => return fail(out, format!("error: {e}")),
        };
        if let Err(errs) = ck.check(&graph) {
            return fail(out, errs.iter().map(|e| format!("error: {e}\n")).collect());
        }
        for (name, p) in params.iter_mut() {
            match ck.to_f32(name) {
                Ok(v) => *p = v,
                Err(e) => return fail(out, format!("error: {e}")),
            }
        }
        resume_opt = runtime::weights::Checkpoint::open(&adam_path(r)).ok();
    }
    let config = TrainConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_steps: a.warmup,
        total_steps: a.steps,
        activations: a.activations.dtype(),
        ..TrainConfig::default()
    };
    let built = match budget {
        Some(b) => {
            // Plan before reading data: an infeasible budget fails at once.
            let act = a.activations.dtype();
            let device = a.device.into();
            let shape = (a.batch, a.seq_len);
            if let Err(e) = crate::train::plan_for(&graph, b, shape, false, (act, device)) {
                return fail(out, format!("error: {e}"));
            }
            Trainer::with_budget_on(&graph, "logits", params, config, b, device)
        }
        None if a.device == DeviceArg::Cuda => Trainer::new_gpu(&graph, "logits", params, config),
        None => Trainer::new(&graph, "logits", params, config),
    };
    let mut trainer = match built {
        Ok(t) => t,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    if let Some(ck) = resume_opt
        && let Err(e) = trainer.load_moments(&ck)
    {
        return fail(out, format!("error: {e}"));
    }
    trainer.carry_state = a.carry_state;
    // The logits are not shown; under a checkpoint plan they would be returned per segment.
    trainer.return_logits = false;
    // The schedule spans this run's steps, continuing from a resumed step count.
    trainer.config.total_steps = trainer.step + a.steps;
    let start_step = trainer.step;
    // A progress bar on a terminal (hidden otherwise); the log lines go to stdout either way.
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut peak_bytes = 0u64;
    let mut rng = runtime::init::Rng::new(a.seed ^ 0x7a11);
    let stream_len = tokens.len() / a.batch;
    let started = std::time::Instant::now();
    let mut after_first: Option<std::time::Instant> = None;
    let (mut loss_sum, mut n_loss) = (0.0, 0usize);
    for i in 0..a.steps {
        let (l, b) = (a.seq_len, a.batch);
        let mut ids = Vec::with_capacity(b * l);
        let mut targets = Vec::with_capacity(b * l);
        for s in 0..b {
            let begin = if a.carry_state {
                // Stream s, window i (wrapping, which restarts the stream's state).
                let windows = (stream_len.saturating_sub(1) / l).max(1);
                s * stream_len + (i % windows) * l
            } else {
                (rng.next_u64() % (tokens.len() - l) as u64) as usize
            };
            ids.extend(tokens[begin..begin + l].iter().map(|&t| t as i32));
            targets.extend(tokens[begin + 1..begin + l + 1].iter().map(|&t| t as i32));
        }
        if a.carry_state && i > 0 && (i % ((stream_len.saturating_sub(1) / a.seq_len).max(1))) == 0
        {
            trainer.carried.clear();
        }
        let stats = match trainer.step(&ids, &targets, b, l) {
            Ok(s) => s,
            Err(e) => return fail(out, format!("error: step {}: {e}", trainer.step)),
        };
        if i == 0
            && let Some(p) = trainer.plan(b, l)
        {
            println!(
                "checkpoint plan for {} bytes, {} activations: {}; planned peak {} (weights, gradients, AdamW {}), recompute {:.1}% of a step",
                budget.unwrap_or(0),
                p.act_dtype.name(),
                passes::remat::describe(p),
                crate::plan::human(p.peak),
                crate::plan::human(
                    p.breakdown.weights + p.breakdown.gradients + p.breakdown.optimizer
                ),
                p.recompute_pct()
            );
        }
        loss_sum += stats.loss;
        n_loss += 1;
        peak_bytes = peak_bytes.max(stats.arena_bytes);
        if i == 0 {
            // The first step compiles (and plans); the rate after it is the steady one.
            after_first = Some(std::time::Instant::now());
        }
        bar.inc(1);
        bar.set_message(format!(
            "loss {:.4}  {:.0} tokens/s  peak {}",
            stats.loss,
            ((i + 1) * a.batch * a.seq_len) as f64 / started.elapsed().as_secs_f64(),
            crate::plan::human(peak_bytes)
        ));
        let done = i + 1 == a.steps;
        if (i + 1) % a.log_every.max(1) == 0 || done {
            let rate = ((i + 1) * b * l) as f64 / started.elapsed().as_secs_f64();
            let device = match stats.device_bytes {
                Some(d) => format!("  device peak {}", crate::plan::human(d)),
                None => String::new(),
            };
            let line = format!(
                "step {:>6}  loss {:.4}  lr {:.2e}  |grad| {:.3}  {rate:.0} tokens/s  {} {:.1} MiB{device}  (gradients {:.1} s, update {:.1} s)\n",
                trainer.step,
                loss_sum / n_loss as f64,
                stats.lr,
                stats.grad_norm,
                if budget.is_some() {
                    "activations"
                } else {
                    "arena"
                },
                stats.arena_bytes as f64 / (1 << 20) as f64,
                stats.grad_secs,
                stats.update_secs
            );
            bar.suspend(|| print!("{line}"));
            (loss_sum, n_loss) = (0.0, 0);
        }
        let periodic = a.save_every > 0 && (i + 1) % a.save_every == 0;
        if let Some(path) = &a.save
            && (periodic || done)
        {
            // Parameters and moments the GPU holds come back to the host first.
            let saved = trainer
                .sync_host()
                .map_err(|e| e.to_string())
                .and_then(|()| save_checkpoint(path, &trainer, &shapes));
            if let Err(e) = saved {
                return fail(out, format!("error: {e}"));
            }
        }
    }
    bar.finish_and_clear();
    let steady = match after_first {
        Some(t) if a.steps > 1 => format!(
            "; after the first step {:.0} tokens/s",
            ((a.steps - 1) * a.batch * a.seq_len) as f64 / t.elapsed().as_secs_f64()
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out.stdout,
        "trained steps {}..{} in {:.1?}{steady}{}",
        start_step,
        trainer.step,
        started.elapsed(),
        a.save
            .as_ref()
            .map_or(String::new(), |p| format!("; saved {}", p.display()))
    );
}

/// The error of `compile` in a build without the NVPTX backend.
const NO_NVPTX: &str = "error: compile: built without the nvptx feature: rebuild with \
--features nvptx (needs llvm-19-dev, LLVM_SYS_191_PREFIX=/usr/lib/llvm-19)\n";

fn compile_artifact(a: &CompileArgs, g: &Graph, out: &mut Outcome) {
    let fail = |out: &mut Outcome, msg: String| {
        out.stderr.push_str(&format!("error: {msg}\n"));
        out.code = 1;
    };
    let (batch, seq, budget) = match crate::plan::shape_args(&a.batch, &a.seq, a.budget.as_deref())
    {
        Ok(x) => x,
        Err(e) => return fail(out, e),
    };
    let config_text = match &a.model.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some((p.clone(), t)),
            Err(e) => return fail(out, format!("cannot read {p}: {e}")),
        },
        None => None,
    };
    let model = crate::artifact::ModelInfo {
        name: g.name.clone(),
        source: a.model.model.clone(),
        config_file: a.model.config.clone(),
        config: crate::artifact::config_values(
            &a.model.model,
            config_text.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
        ),
        params: g.param_count().unwrap_or(0),
    };
    let req = crate::artifact::Request {
        target: a.target.clone(),
        batch,
        seq,
        train: a.train,
        budget,
    };
    let started = std::time::Instant::now();
    let art = match build_artifact(g, model, &req) {
        Ok(x) => x,
        Err(e) => return fail(out, e.to_string()),
    };
    let compiled = started.elapsed();
    let bytes = match art.write(&a.output) {
        Ok(n) => n,
        Err(e) => return fail(out, e.to_string()),
    };
    let m = &art.manifest;
    let _ = writeln!(
        out.stdout,
        "wrote {} ({}): {} {}, {} kernels ({} distinct PTX entries), {} steps, arena peak {}{}; compiled in {:.2?}",
        a.output.display(),
        crate::plan::human(bytes),
        m.model.name,
        if m.train {
            "training graph"
        } else {
            "forward pass"
        },
        m.kernels.len(),
        m.ptx.entries.len(),
        m.steps.len(),
        crate::plan::human(m.peak),
        m.checkpoint.as_ref().map_or(String::new(), |c| format!(
            "; checkpoint plan: {}",
            c.description
        )),
        compiled
    );
}

#[cfg(feature = "nvptx")]
fn build_artifact(
    g: &Graph,
    model: crate::artifact::ModelInfo,
    req: &crate::artifact::Request,
) -> Result<crate::artifact::Artifact, crate::artifact::ArtifactError> {
    crate::artifact::compile(g, model, req)
}

#[cfg(not(feature = "nvptx"))]
fn build_artifact(
    _g: &Graph,
    _model: crate::artifact::ModelInfo,
    _req: &crate::artifact::Request,
) -> Result<crate::artifact::Artifact, crate::artifact::ArtifactError> {
    Err(crate::artifact::ArtifactError::Build(
        NO_NVPTX.trim_start_matches("error: ").trim_end().into(),
    ))
}

fn inspect(a: &InspectArgs, out: &mut Outcome) {
    let art = match crate::artifact::Artifact::read(&a.artifact) {
        Ok(x) => x,
        Err(e) => {
            out.stderr.push_str(&format!("error: {e}\n"));
            out.code = 1;
            return;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&art.manifest) {
            Ok(t) => {
                out.stdout.push_str(&t);
                out.stdout.push('\n');
            }
            Err(e) => {
                out.stderr.push_str(&format!("error: {e}\n"));
                out.code = 1;
            }
        }
    } else {
        out.stdout
            .push_str(&crate::artifact::inspect(&art, a.max_steps));
    }
}

/// Segment lengths are multiples of this: the SSD chunk size of a model (the largest), or 1
/// for models without SSD (the selective scan has no chunks).
pub fn default_quantum(g: &Graph) -> u64 {
    g.nodes()
        .filter_map(|n| match g.op(n) {
            Op::SsdScan { chunk } => Some(*chunk),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

fn plan_cmd(p: &PlanArgs, g: &Graph, out: &mut Outcome) {
    let fail = |out: &mut Outcome, msg: String| {
        out.stderr.push_str(&format!("error: {msg}\n"));
        out.code = 1;
    };
    let (batch, seq, budget) = match crate::plan::shape_args(&p.batch, &p.seq, p.budget.as_deref())
    {
        Ok(x) => x,
        Err(e) => return fail(out, e),
    };
    let act_dtype = match p.dtype.as_str() {
        "bf16" => ir::DType::BF16,
        "f16" => ir::DType::F16,
        "f32" => ir::DType::F32,
        d => return fail(out, format!("--dtype: `{d}` is not one of bf16, f16, f32")),
    };
    let quantum = p.quantum.unwrap_or_else(|| default_quantum(g));
    if quantum == 0 {
        return fail(out, "--quantum must be at least 1".into());
    }
    let req = passes::remat::Request {
        batch,
        seq,
        budget,
        act_dtype,
        count_weights: !p.activations_only,
        quantum,
        logits: false,
        // Both executors copy a run's outputs out of its arena.
        copy_outputs: true,
        lower: crate::train::lowering_for(p.device.into(), act_dtype),
    };
    let report = match crate::plan::make(g, req.clone()) {
        Ok(r) => r,
        Err(e) => return fail(out, e.to_string()),
    };
    if let Some(path) = &p.svg {
        match crate::plan::svg(g, &report, &req) {
            Ok(text) => {
                if let Err(e) = crate::plan::write_atomic(path, text.as_bytes()) {
                    return fail(out, format!("cannot write {}: {e}", path.display()));
                }
            }
            Err(e) => return fail(out, e.to_string()),
        }
    }
    if p.json {
        out.stdout
            .push_str(&format!("{}\n", crate::plan::json(&report, &req)));
    } else {
        out.stdout.push_str(&format!(
            "{} at batch {batch}, {seq} tokens, {} activations, as {} lowers it{}\n",
            g.name,
            act_dtype.name(),
            match p.device {
                DeviceArg::Cpu => "the CPU",
                DeviceArg::Cuda => "the GPU",
            },
            if p.activations_only {
                " (activations only: weights, gradients and optimizer state left out)"
            } else {
                ""
            }
        ));
        out.stdout.push_str(&crate::plan::table(&report, &req));
    }
}

/// Writes generated text: to the process's stdout at once when streaming, else into `out`.
fn emit(out: &mut Outcome, stream: bool, text: &str) {
    if stream {
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
    } else {
        out.stdout.push_str(text);
    }
}

fn generate(a: &GenerateArgs, stream: bool, out: &mut Outcome) {
    use crate::generate::GenerateConfig;
    use crate::sample::SamplingConfig;
    use crate::tokenizer::Tokenizer;
    if a.prompt.is_empty() && a.tokens.is_empty() {
        return fail(
            out,
            "error: give a prompt with --prompt \"text\" or token ids with --tokens \"1 2 3\""
                .into(),
        );
    }
    let sampled = a.top_k.is_some() || a.top_p.is_some() || a.min_p.is_some();
    let sampling = SamplingConfig {
        temperature: a.temperature.unwrap_or(if sampled { 1.0 } else { 0.0 }),
        top_k: a.top_k.unwrap_or(0),
        top_p: a.top_p.unwrap_or(1.0),
        min_p: a.min_p.unwrap_or(0.0),
        repetition_penalty: a.repetition_penalty,
    };
    if let Err(e) = sampling.validate() {
        return fail(out, format!("error: {e}"));
    }
    let mut ids_in = Vec::new();
    for t in &a.tokens {
        match parse_ids(t, "--tokens") {
            Ok(rows) => ids_in.push(rows.concat()),
            Err(e) => return fail(out, format!("error: {e}")),
        }
    }
    if let Some(n) = a.threads {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    let backend = match a.device {
        DeviceArg::Cpu => crate::model::Backend::Cranelift,
        DeviceArg::Cuda if cfg!(not(feature = "cuda")) => {
            return fail(out, format!("error: {}", crate::model::NO_CUDA));
        }
        DeviceArg::Cuda => crate::model::Backend::Cuda,
    };
    if a.bf16_weights && a.device != DeviceArg::Cuda {
        return fail(out, "error: --bf16-weights is for --device cuda".into());
    }
    let opts = crate::model::LoadOptions {
        config: a.config.clone(),
        seed: a.weights_seed,
        backend,
        bf16_weights: a.bf16_weights,
    };
    let started = std::time::Instant::now();
    let mut model = match crate::model::Model::load(&a.model, &opts) {
        Ok(m) => m,
        Err(e) => return fail(out, format!("{e}")),
    };
    // The tokenizer: --tokenizer, else the model's (from the hub only for a text prompt).
    let vocab = model.vocab();
    let tokenizer = match &a.tokenizer {
        Some(p) => Tokenizer::from_path(p).map(Some),
        None => Tokenizer::for_model(
            &a.model,
            model.source_dir.as_deref(),
            vocab,
            !a.prompt.is_empty(),
        ),
    };
    let tokenizer = match tokenizer {
        Ok(t) => t,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let prompts: Vec<Vec<u32>> = if a.prompt.is_empty() {
        ids_in
    } else {
        let Some(t) = &tokenizer else {
            return fail(
                out,
                format!(
                    "error: no tokenizer for `{}` ({})\n  help: give --tokenizer path/to/tokenizer.json, or token ids with --tokens \"1 2 3\"",
                    a.model,
                    Tokenizer::searched(&a.model, model.source_dir.as_deref(), vocab)
                ),
            );
        };
        let mut p = Vec::new();
        for text in &a.prompt {
            match t.encode(text) {
                Ok(ids) if ids.is_empty() => {
                    return fail(
                        out,
                        format!("error: the prompt {text:?} encodes to no tokens"),
                    );
                }
                Ok(ids) => p.push(ids),
                Err(e) => return fail(out, format!("error: {e}")),
            }
        }
        p
    };
    if let Some(t) = &tokenizer
        && t.vocab_size() > vocab
    {
        return fail(
            out,
            format!(
                "error: the tokenizer {} has {} tokens, the model's vocabulary only {vocab}",
                t.path().display(),
                t.vocab_size()
            ),
        );
    }
    let eos = if a.ignore_eos {
        None
    } else {
        a.eos
            .or(model.eos_token_id)
            .or_else(|| tokenizer.as_ref().and_then(Tokenizer::eos_token_id))
    };
    let has_text = tokenizer.is_some();
    model.tokenizer = tokenizer;
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        eos_token_id: eos,
        stop_strings: a.stop.clone(),
    };
    let loaded = started.elapsed();
    let batch = prompts.len();
    // Stream the first sequence's text (or ids); a batch is printed at the end.
    let text_mode = has_text && a.tokens.is_empty();
    let live = !a.json && batch == 1;
    let mut first_id = true;
    let result = model.generate(&prompts, &cfg, |t| {
        if live {
            if text_mode {
                emit(out, stream, t.text);
            } else {
                let sep = if first_id { "" } else { " " };
                first_id = false;
                emit(out, stream, &format!("{sep}{}", t.id));
            }
        }
        true
    });
    let g = match result {
        Ok(g) => g,
        Err(e) => return fail(out, format!("error: {e}")),
    };
    let tm = &g.timings;
    if a.json {
        let ids: Vec<serde_json::Value> = g
            .sequences
            .iter()
            .map(|s| serde_json::json!(s.tokens))
            .collect();
        let texts: Vec<serde_json::Value> = g
            .sequences
            .iter()
            .map(|s| {
                s.text
                    .clone()
                    .map_or(serde_json::Value::Null, serde_json::Value::from)
            })
            .collect();
        let finish: Vec<&str> = g.sequences.iter().map(|s| s.finish.as_str()).collect();
        let one = |v: Vec<serde_json::Value>| {
            if batch == 1 {
                v.into_iter().next().unwrap_or(serde_json::Value::Null)
            } else {
                serde_json::Value::Array(v)
            }
        };
        let mut obj = serde_json::json!({
            "model": a.model,
            "prompt_ids": if batch == 1 { serde_json::json!(prompts[0]) } else { serde_json::json!(prompts) },
            "ids": one(ids),
            "finish_reason": one(finish.iter().map(|f| serde_json::json!(f)).collect()),
            "timings": {
                "load_ms": loaded.as_secs_f64() * 1e3,
                "prefill_tokens": tm.prefill_tokens,
                "prefill_ms": tm.prefill.as_secs_f64() * 1e3,
                "prefill_tokens_per_s": tm.prefill_tokens_per_s(),
                "decode_steps": tm.decode_steps,
                "decode_tokens": tm.decode_tokens,
                "decode_ms": tm.decode.as_secs_f64() * 1e3,
                "ms_per_token": tm.ms_per_step(),
                "tokens_per_s": tm.decode_tokens_per_s(),
            },
        });
        if has_text {
            obj["text"] = one(texts);
        }
        out.stdout.push_str(&obj.to_string());
        out.stdout.push('\n');
    } else {
        if !live {
            for (i, s) in g.sequences.iter().enumerate() {
                let body = match (&s.text, text_mode) {
                    (Some(t), true) => t.clone(),
                    _ => s
                        .tokens
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                emit(out, stream, &format!("[{i}] {body}\n"));
            }
        } else {
            emit(out, stream, "\n");
        }
        let _ = writeln!(
            out.stderr,
            "{}: loaded in {:.2?}; prefill {} tokens in {:.1} ms ({:.1} tokens/s); decode {} tokens in {} steps: {:.2} ms/token, {:.1} tokens/s",
            model.graph.name,
            loaded,
            tm.prefill_tokens,
            tm.prefill.as_secs_f64() * 1e3,
            tm.prefill_tokens_per_s(),
            tm.decode_tokens,
            tm.decode_steps,
            tm.ms_per_step(),
            tm.decode_tokens_per_s(),
        );
    }
}

/// Read bandwidth of this machine in bytes/s: the best of a few parallel passes summing a
/// 1 GiB buffer (far larger than any cache), on rayon's threads.
pub fn measure_read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // Eight independent sums so the loop vectorizes and is not latency-bound.
                let mut acc = [0f32; 8];
                for w in c.chunks_exact(8) {
                    for k in 0..8 {
                        acc[k] += w[k];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / dt);
    }
    best
}

/// `bench --device cuda`: the forward pass (and with --train a whole training step) of each
/// preset on the GPU, then where the device time goes per kernel kind, with each kind's
/// achieved rate against its traffic floor (bytes of its buffers, each read or written once)
/// or its FLOPs.
#[cfg(feature = "cuda")]
fn bench_gpu(b: &BenchArgs, out: &mut Outcome) {
    use runtime::cpu::HostData;
    use std::collections::HashMap;
    let mut rows = Vec::new();
    for name in &b.models {
        let opts = crate::model::LoadOptions {
            backend: crate::model::Backend::Interp,
            ..Default::default()
        };
        let m = match crate::model::Model::load(name, &opts) {
            Ok(m) => m,
            Err(e) => return fail(out, format!("error: {name}: {e}")),
        };
        let vocab = m.vocab().max(1) as u64;
        let training = match passes::training_graph(&m.graph, "logits", crate::model::IGNORE_INDEX)
        {
            Ok(t) => t.graph,
            Err(e) => return fail(out, format!("error: {name}: {e}")),
        };
        for &bs in &b.batch {
            let l = b.seq;
            let mut rng = runtime::init::Rng::new(7);
            let ids: Vec<i32> = (0..bs * l)
                .map(|_| (rng.next_u64() % vocab) as i32)
                .collect();
            let mut targets = ids[1..].to_vec();
            targets.push(crate::model::IGNORE_INDEX as i32);
            let mut cases = vec![("forward", &m.graph)];
            if b.train {
                cases.push(("train step", &training));
            }
            for (pass, g) in cases {
                let mut data =
                    HashMap::from([("input_ids".to_string(), HostData::I32(ids.clone()))]);
                if pass != "forward" {
                    data.insert("targets".to_string(), HostData::I32(targets.clone()));
                }
                let syms = [("B", bs as i64), ("L", l as i64)];
                let lower = passes::LowerOptions {
                    bf16_activations: b.activations == ActArg::Bf16,
                    ..passes::LowerOptions::default()
                };
                let t =
                    match crate::gpu::time_graph(g, &lower, m.params_f32(), &syms, &data, b.repeat)
                    {
                        Ok(t) => t,
                        Err(e) => return fail(out, format!("error: {name} {pass}: {e}")),
                    };
                let total: f64 = t.profile.iter().map(|s| f64::from(s.ms)).sum();
                let _ = writeln!(
                    out.stderr,
                    "{name} {pass} B={bs} L={l} on {}: {} launches, {total:.2} ms of device time \
                     (events), arena {:.2} GB",
                    t.device_name,
                    t.profile.len(),
                    t.arena as f64 / 1e9
                );
                let _ = writeln!(
                    out.stderr,
                    "  {:<28} {:>8} {:>11} {:>6} {:>9} {:>9} {:>9}",
                    "kind", "launches", "ms", "share", "GB/s", "of 4.2TB", "TFLOP/s"
                );
                for k in crate::gpu::by_kind(&t.profile) {
                    let s = k.ms / 1e3;
                    let gbs = k.bytes as f64 / s.max(1e-12) / 1e9;
                    let _ = writeln!(
                        out.stderr,
                        "  {:<28} {:>8} {:>11.3} {:>5.1}% {:>9.1} {:>8.1}% {:>9}",
                        k.kind,
                        k.launches,
                        k.ms,
                        100.0 * k.ms / total.max(1e-12),
                        gbs,
                        100.0 * gbs * 1e9 / H200_COPY_BYTES_PER_S,
                        if k.flops > 0 {
                            format!("{:.1}", k.flops as f64 / s.max(1e-12) / 1e12)
                        } else {
                            String::new()
                        }
                    );
                }
                rows.push(format!(
                    "| {name} | {pass} | {bs} | {l} | {:.1?} | {:.1?} | {:.0} |",
                    t.compile,
                    t.median,
                    (bs * l) as f64 / t.median.as_secs_f64()
                ));
            }
        }
    }
    let _ = writeln!(
        out.stdout,
        "GPU, random weights, f32; the bound schedule's median of {} runs after a warm-up",
        b.repeat.max(1)
    );
    let _ = writeln!(
        out.stdout,
        "| model | pass | B | L | compile | median | tokens/s |"
    );
    let _ = writeln!(out.stdout, "|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(out.stdout, "{r}");
    }
}

#[cfg(not(feature = "cuda"))]
fn bench_gpu(_b: &BenchArgs, out: &mut Outcome) {
    fail(out, format!("error: {}", crate::model::NO_CUDA));
}

/// PERFORMANCE.md's measured device-to-device copy rate of the H200 (bytes read + written).
const H200_COPY_BYTES_PER_S: f64 = 4.2e12;

/// Prints where one GPU decode step's device time went, per kernel kind (stderr).
#[cfg(feature = "cuda")]
fn gpu_step_profile(
    m: &mut crate::model::Model,
    name: &str,
    toks: &[u32],
) -> Result<(), crate::model::Error> {
    let times = m.gpu_profile_step(toks)?;
    let total: f32 = times.iter().map(|t| t.ms).sum();
    eprintln!(
        "{name}, decode step at batch {}: {} launches, {total:.3} ms of device time (events, \
         not replayed as a graph):",
        toks.len(),
        times.len()
    );
    for k in crate::gpu::by_kind(&times) {
        eprintln!(
            "  {:<24} {:>5} launches {:>9.3} ms",
            k.kind, k.launches, k.ms
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gpu_step_profile(
    _m: &mut crate::model::Model,
    _name: &str,
    _toks: &[u32],
) -> Result<(), crate::model::Error> {
    Err(crate::model::Error::Gpu(crate::model::NO_CUDA.into()))
}

/// `bench --generate`: prefill and decode throughput of presets with random weights.
fn bench_generate(b: &BenchArgs, out: &mut Outcome) {
    use crate::model::{Backend, LoadOptions, Model};
    let gpu = b.device == DeviceArg::Cuda;
    if gpu && cfg!(not(feature = "cuda")) {
        let _ = writeln!(out.stderr, "error: {}", crate::model::NO_CUDA);
        out.code = 1;
        return;
    }
    let threads = rayon::current_num_threads();
    // The GPU's ceiling is PERFORMANCE.md's measured device copy rate.
    let bw = if gpu {
        H200_COPY_BYTES_PER_S
    } else {
        measure_read_bandwidth()
    };
    let what = if gpu {
        "GPU generation (decode: states on the device, the step replayed as a CUDA graph)"
            .to_string()
    } else {
        format!("CPU generation, {threads} threads")
    };
    let (weights, wbytes) = if b.bf16_weights {
        (
            "bf16 weights in the matrix products (f32 accumulation), f32 elsewhere",
            2.0,
        )
    } else {
        ("f32", 4.0)
    };
    let _ = writeln!(
        out.stdout,
        "{what}, random weights, {weights}; prefill of {} tokens at batch 1 (median of {}), \
         decode: median step time of {} steps after a warm-up; read bandwidth {:.1} GB/s \
         (floor = parameters x {wbytes} bytes / bandwidth)",
        b.prompt_len,
        b.repeat.max(1),
        b.steps.max(1),
        bw / 1e9
    );
    let _ = writeln!(
        out.stdout,
        "| model | parameters | prefill tokens/s | decode batch | ms/token (step) | tokens/s | floor ms/token | x floor |"
    );
    let _ = writeln!(out.stdout, "|---|---|---|---|---|---|---|---|");
    print!("{}", std::mem::take(&mut out.stdout));
    for name in &b.models {
        let backend = if gpu {
            Backend::Cuda
        } else {
            Backend::Cranelift
        };
        let mut m = match Model::load(
            name,
            &LoadOptions {
                backend,
                bf16_weights: b.bf16_weights,
                ..LoadOptions::default()
            },
        ) {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(out.stderr, "error: {name}: {e}");
                out.code = 1;
                return;
            }
        };
        let params = m.graph.param_count().unwrap_or(0);
        let floor_ms = params as f64 * wbytes / bw * 1e3;
        let vocab = m.vocab().max(1) as u64;
        let mut rng = runtime::init::Rng::new(7);
        let prompt: Vec<u32> = (0..b.prompt_len.max(1))
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let mut run = |m: &mut Model| -> Result<(f64, Vec<(usize, f64)>), crate::model::Error> {
            m.step_graph()?;
            // Prefill: warm-up, then the median.
            let mut state = m.new_state(1);
            m.prefill(std::slice::from_ref(&prompt), &mut state)?;
            let mut rates = Vec::new();
            for _ in 0..b.repeat.max(1) {
                state = m.new_state(1);
                let t = std::time::Instant::now();
                m.prefill(std::slice::from_ref(&prompt), &mut state)?;
                rates.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
            }
            let prefill = median(rates);
            let mut decode = Vec::new();
            for &bs in &b.decode_batch {
                let bs = bs.max(1);
                // Every sequence continues the prefilled prompt.
                let mut dec = m.begin_decode(state.select(&vec![0; bs])?)?;
                let mut toks: Vec<u32> = (0..bs).map(|_| (rng.next_u64() % vocab) as u32).collect();
                m.decode_step(&mut dec, &toks)?;
                let mut times = Vec::new();
                for _ in 0..b.steps.max(1) {
                    let t = std::time::Instant::now();
                    let logits = m.decode_step(&mut dec, &toks)?;
                    times.push(t.elapsed().as_secs_f64());
                    toks = (0..bs)
                        .map(|i| crate::sample::argmax(logits.at(i, 0)))
                        .collect();
                }
                decode.push((bs, median(times)));
                if b.profile && gpu {
                    gpu_step_profile(m, name, &toks)?;
                } else if b.profile
                    && let Some(p) = m.last_profile()
                {
                    eprintln!(
                        "{name}, decode step at batch {bs}, arena {} bytes:",
                        p.arena_bytes
                    );
                    for (kind, d, count) in p.by_kind() {
                        eprintln!("  {kind:<20} {count:>5} launches {d:>12.2?}");
                    }
                }
            }
            Ok((prefill, decode))
        };
        match run(&mut m) {
            Ok((prefill, decode)) => {
                for (bs, step) in decode {
                    let (floor, ratio) = if bs == 1 {
                        (
                            format!("{floor_ms:.2}"),
                            format!("{:.1}", step * 1e3 / floor_ms),
                        )
                    } else {
                        (String::new(), String::new())
                    };
                    let _ = writeln!(
                        out.stdout,
                        "| {name} | {} | {prefill:.1} | {bs} | {:.2} | {:.1} | {floor} | {ratio} |",
                        group_digits(params),
                        step * 1e3,
                        bs as f64 / step
                    );
                }
                print!("{}", std::mem::take(&mut out.stdout));
            }
            Err(e) => {
                let _ = writeln!(out.stderr, "error: {name}: {e}");
                out.code = 1;
            }
        }
    }
}
