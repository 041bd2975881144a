//! Compiled artifacts (`.m2pack`): one self-contained file holding a model's executable form
//! for one target and one binding of the symbols: a JSON manifest and the PTX module.
//!
//! # Format (version 1)
//!
//! ```text
//! ma2mba-pack 1\n                                   magic and format version
//! manifest <M> ptx <P> fnv1a64 <16 hex digits>\n    byte lengths and a checksum of the rest
//! <M bytes: the manifest, UTF-8 JSON>
//! <P bytes: the PTX module, text>
//! ```
//!
//! The manifest ([`Manifest`]) holds the model (name, where it came from, its config values),
//! the target, the symbol values (`B`, `L`), the kernels (name, PTX entry, runtime sizes,
//! grid extents, buffer signature), the launch schedule (steps: kernel launches and matrix
//! products, with buffer ids), the buffers with the memory plan (arena offset, bytes,
//! lifetime; the peak), the graph outputs, and for training artifacts with a budget the
//! layer x time checkpoint plan. Kernels that are identical but for their names (the same
//! kernel repeated in every layer) share one PTX entry: `KernelInfo::entry` names it. The
//! PTX declares every buffer parameter 16-byte aligned (`ir::kernel::BUF_ALIGN`): a loader
//! must pass aligned addresses (the manifest's arena offsets are multiples of 64).
//!
//! Files are written atomically (a temporary file, then a rename). Reading checks the magic,
//! the lengths (a truncated file says so), the checksum and the manifest's internal
//! references, so a damaged file gives an error, never a panic.

use crate::model::IGNORE_INDEX;
use ir::Graph;
use ir::kernel::Kernel;
use passes::{BufKind, Lowered, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// The first line of every artifact.
pub const MAGIC: &str = "ma2mba-pack";
/// The format version this build writes and reads (2: launch sizes and product shapes
/// evaluated at the symbols, so the runtime needs no kernel IR).
pub const VERSION: u32 = 2;

/// Everything about an artifact but the PTX text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub model: ModelInfo,
    /// `sm_90` or `sm_80`.
    pub target: String,
    /// Symbol values, in the order kernels take them as sizes.
    pub symbols: Vec<(String, i64)>,
    /// Whether this is the training graph (loss and gradients) rather than the forward pass.
    pub train: bool,
    pub kernels: Vec<KernelInfo>,
    pub steps: Vec<StepInfo>,
    pub buffers: Vec<BufferInfo>,
    /// Graph outputs: name and buffer id.
    pub outputs: Vec<(String, usize)>,
    /// Arena bytes: the peak of simultaneously live intermediates.
    pub peak: u64,
    pub checkpoint: Option<CheckpointInfo>,
    pub ptx: PtxInfo,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The graph's name (`mamba2-2.7b`).
    pub name: String,
    /// What the user named: a preset, a model definition or a `.m2` file.
    pub source: String,
    /// The `config.json` it was instantiated from, if any.
    pub config_file: Option<String>,
    /// Config values (a preset's, or those read from the config file).
    pub config: BTreeMap<String, serde_json::Value>,
    pub params: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelInfo {
    pub name: String,
    /// The PTX `.entry` that runs it (shared by identical kernels).
    pub entry: String,
    /// Names of the runtime sizes it takes, in order.
    pub sizes: Vec<String>,
    /// Grid extents (index expressions over the sizes `s0`, `s1`, ...).
    pub grid: Vec<String>,
    pub bufs: Vec<KBufInfo>,
    /// Threads that share each grid point (`ir::lanes`: 1, a warp or a block).
    pub threads_per_point: u32,
    /// Threads to launch at the artifact's symbol values (grid points / points per thread x
    /// threads per point); `None` where an extent is read from a device buffer (the kernel
    /// loops over its grid).
    pub threads: Option<u64>,
    /// Dynamic shared memory per block of a tiled kernel (`ir::tile::shared_bytes`).
    #[serde(default)]
    pub shared_bytes: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KBufInfo {
    pub name: String,
    pub dtype: String,
    pub writable: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepInfo {
    Kernel {
        kernel: usize,
        bufs: Vec<usize>,
        node: String,
    },
    Matmul {
        lhs: usize,
        rhs: usize,
        out: usize,
        batch: String,
        m: String,
        k: String,
        n: String,
        /// The left operand is stored transposed (`[K, M]`).
        #[serde(default)]
        lhs_t: bool,
        rhs_t: bool,
        rhs_batched: bool,
        /// Never on reduced-precision tensor cores.
        #[serde(default)]
        exact: bool,
        node: String,
        /// `batch`, `m`, `k`, `n` at the artifact's symbol values.
        dims: [u64; 4],
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BufferInfo {
    /// `input`, `state`, `param`, `temp` or `scratch`.
    pub kind: String,
    /// The input, state or parameter name; the producing value (`%12`) otherwise.
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
    /// Arena offset (`temp` and `scratch` buffers).
    pub offset: Option<u64>,
    /// Bytes at the artifact's symbol values.
    pub bytes: u64,
    /// First and last step it is alive.
    pub lifetime: Option<(usize, usize)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointInfo {
    pub budget: u64,
    /// `passes::remat::describe` of the plan.
    pub description: String,
    /// The plan as `ma2mba plan --json` gives it.
    pub plan: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PtxInfo {
    /// The module's entries, in order (one per distinct kernel).
    pub entries: Vec<String>,
    pub bytes: u64,
}

/// A manifest and its PTX module.
#[derive(Clone, Debug, PartialEq)]
pub struct Artifact {
    pub manifest: Manifest,
    pub ptx: String,
}

/// Why an artifact could not be built, read or written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0}")]
    Build(String),
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
}

/// What to compile: the shapes, training or not, the memory budget for checkpointing.
#[derive(Clone, Debug)]
pub struct Request {
    pub target: String,
    pub batch: u64,
    pub seq: u64,
    pub train: bool,
    pub budget: Option<u64>,
}

/// Kernels that differ only in their names (and their buffers' names) are one kernel:
/// returns the distinct kernels (the first of each) and, per kernel, its distinct index.
pub fn dedupe(kernels: &[Kernel]) -> (Vec<Kernel>, Vec<usize>) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut unique = Vec::new();
    let mut map = Vec::with_capacity(kernels.len());
    for k in kernels {
        let mut anon = k.clone();
        anon.name.clear();
        for b in &mut anon.bufs {
            b.name.clear();
        }
        let key = format!("{anon:?}");
        let i = *seen.entry(key).or_insert_with(|| {
            unique.push(k.clone());
            unique.len() - 1
        });
        map.push(i);
    }
    (unique, map)
}

/// The config values of a preset, or of a `config.json`, as JSON.
pub fn config_values(
    model: &str,
    config: Option<(&str, &str)>,
) -> BTreeMap<String, serde_json::Value> {
    use frontend::ConfigValue;
    let args = match config {
        Some((name, text)) => frontend::config::from_json(text, 0, name)
            .map(|c| c.args)
            .unwrap_or_default(),
        None => frontend::Program::with_library()
            .ok()
            .and_then(|p| p.preset(model).and_then(|pr| p.preset_args(pr).ok()))
            .unwrap_or_default(),
    };
    args.into_iter()
        .map(|a| {
            let v = match a.value {
                ConfigValue::Int(n) => serde_json::json!(n),
                ConfigValue::Float(x) => serde_json::json!(x),
                ConfigValue::Bool(b) => serde_json::json!(b),
                ConfigValue::Str(s) => serde_json::json!(s),
            };
            (a.name, v)
        })
        .collect()
}

/// Lowers `forward` (or its training graph) for the request, plans memory (and
/// checkpointing) and generates the PTX of the distinct kernels with `codegen`, which takes
/// them and returns the module text and its entry names in order.
pub fn build(
    forward: &Graph,
    model: ModelInfo,
    req: &Request,
    codegen: impl FnOnce(&[Kernel]) -> Result<(String, Vec<String>), String>,
) -> Result<Artifact, ArtifactError> {
    let err = |e: String| ArtifactError::Build(e);
    if req.batch == 0 || req.seq == 0 {
        return Err(err("--batch and --seq must be at least 1".into()));
    }
    if req.budget.is_some() && !req.train {
        return Err(err("--budget needs --train".into()));
    }
    let graph = if req.train {
        let logits = crate::model::logits_output(forward).unwrap_or_else(|| "logits".into());
        passes::training_graph(forward, &logits, IGNORE_INDEX)
            .map_err(|e| err(e.to_string()))?
            .graph
    } else {
        forward.clone()
    };
    // What the GPU runs (`GpuGraph::compile`).
    let opts = passes::LowerOptions::default().on_gpu();
    let lowered = passes::lower(&graph, &opts).map_err(|e| err(e.to_string()))?;
    let mut symbols = Vec::new();
    for s in &lowered.syms {
        let v = match s.as_str() {
            "B" => req.batch,
            "L" => req.seq,
            _ => return Err(err(format!("no value for the symbol `{s}`"))),
        };
        symbols.push((s.clone(), v as i64));
    }
    let bind = |s: &str| symbols.iter().find(|(n, _)| n == s).map(|(_, v)| *v as u64);
    let plan = passes::plan_memory(&lowered, &bind).map_err(|e| err(e.to_string()))?;
    let checkpoint = match req.budget {
        None => None,
        Some(budget) => {
            let mut r = crate::train::request_for(
                forward,
                Some(budget),
                req.batch as usize,
                req.seq as usize,
            );
            // The GPU hands outputs over in their own buffers.
            r.copy_outputs = false;
            let mut planner = passes::remat::Planner::new(forward, r, IGNORE_INDEX)
                .map_err(|e| err(e.to_string()))?;
            let p = planner.plan().map_err(|e| err(e.to_string()))?;
            Some(CheckpointInfo {
                budget,
                description: passes::remat::describe(&p),
                plan: crate::plan::plan_json(&p),
            })
        }
    };
    let (unique, map) = dedupe(&lowered.kernels);
    let (ptx, entries) = codegen(&unique).map_err(err)?;
    if entries.len() != unique.len() {
        return Err(err(format!(
            "the code generator returned {} entries for {} kernels",
            entries.len(),
            unique.len()
        )));
    }
    let kernels = lowered
        .kernels
        .iter()
        .zip(&map)
        .map(|(k, &u)| kernel_info(k, &entries[u], &symbols))
        .collect();
    let steps = lowered
        .steps
        .iter()
        .map(|s| step_info(s, &bind))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let manifest = Manifest {
        format: VERSION,
        model,
        target: req.target.clone(),
        symbols,
        train: req.train,
        kernels,
        steps,
        buffers: buffer_infos(&lowered, &plan),
        outputs: lowered.outputs.clone(),
        peak: plan.peak,
        checkpoint,
        ptx: PtxInfo {
            entries,
            bytes: ptx.len() as u64,
        },
    };
    Ok(Artifact { manifest, ptx })
}

/// Compiles with the NVPTX backend.
#[cfg(feature = "nvptx")]
pub fn compile(
    forward: &Graph,
    model: ModelInfo,
    req: &Request,
) -> Result<Artifact, ArtifactError> {
    let target = codegen::nvptx::Target::from_arch(&req.target).ok_or_else(|| {
        ArtifactError::Build(format!(
            "unknown target `{}`: use sm_90 or sm_80",
            req.target
        ))
    })?;
    build(forward, model, req, |kernels| {
        codegen::nvptx::compile_ptx(kernels, target)
            .map(|p| (p.text, p.entries))
            .map_err(|e| e.to_string())
    })
}

fn kernel_info(k: &Kernel, entry: &str, symbols: &[(String, i64)]) -> KernelInfo {
    let sizes: Vec<i64> = symbols.iter().map(|(_, v)| *v).collect();
    let tpp = ir::lanes::threads_per_point(k);
    let mut points = Some(1u64);
    for g in &k.grid {
        points = match (points, ir::kernel::eval::extent(g, &sizes)) {
            (Some(p), Ok(Some(e))) => u64::try_from(e).ok().and_then(|e| p.checked_mul(e)),
            _ => None,
        };
    }
    KernelInfo {
        name: k.name.clone(),
        entry: entry.to_string(),
        sizes: k.sizes.clone(),
        threads_per_point: tpp,
        shared_bytes: ir::tile::shared_bytes(k) as u32,
        threads: points.and_then(|p| {
            p.div_ceil(u64::from(ir::lanes::points_per_thread(k)))
                .checked_mul(u64::from(tpp))
        }),
        grid: k.grid.iter().map(|g| g.to_string()).collect(),
        bufs: k
            .bufs
            .iter()
            .map(|b| KBufInfo {
                name: b.name.clone(),
                dtype: b.dtype.name().to_string(),
                writable: b.writable,
            })
            .collect(),
    }
}

fn step_info(s: &Step, bind: &dyn Fn(&str) -> Option<u64>) -> Result<StepInfo, String> {
    Ok(match s {
        Step::Kernel { kernel, bufs, node } => StepInfo::Kernel {
            kernel: *kernel,
            bufs: bufs.clone(),
            node: node.to_string(),
        },
        Step::MatMul {
            lhs,
            rhs,
            out,
            batch,
            m,
            k,
            n,
            lhs_t,
            rhs_t,
            rhs_batched,
            exact,
            node,
        } => {
            let ev = |d: &ir::Dim| {
                d.eval(bind)
                    .ok_or_else(|| format!("{node}: cannot evaluate the product's size {d}"))
            };
            StepInfo::Matmul {
                lhs: *lhs,
                rhs: *rhs,
                out: *out,
                batch: batch.to_string(),
                m: m.to_string(),
                k: k.to_string(),
                n: n.to_string(),
                lhs_t: *lhs_t,
                rhs_t: *rhs_t,
                rhs_batched: *rhs_batched,
                exact: *exact,
                node: node.to_string(),
                dims: [
                    batch.eval(bind).ok_or_else(|| {
                        format!("{node}: cannot evaluate the product's batch {batch}")
                    })?,
                    ev(m)?,
                    ev(k)?,
                    ev(n)?,
                ],
            }
        }
    })
}

fn buffer_infos(l: &Lowered, plan: &passes::MemoryPlan) -> Vec<BufferInfo> {
    l.buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (kind, name) = match &b.kind {
                BufKind::Input(n) => ("input", n.clone()),
                BufKind::State(n) => ("state", n.clone()),
                BufKind::Param(n) => ("param", n.clone()),
                BufKind::Temp => ("temp", b.value.to_string()),
                BufKind::Scratch => ("scratch", b.value.to_string()),
            };
            BufferInfo {
                kind: kind.into(),
                name,
                dtype: b.dtype.name().into(),
                shape: b.shape.iter().map(|d| d.to_string()).collect(),
                offset: plan.offsets.get(i).copied().flatten(),
                bytes: plan.bytes.get(i).copied().unwrap_or(0),
                lifetime: plan.lifetimes.get(i).copied().flatten(),
            }
        })
        .collect()
}

/// FNV-1a, 64 bits: enough to tell a damaged file.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Artifact {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let manifest = serde_json::to_vec_pretty(&self.manifest).expect("manifest serializes");
        let ptx = self.ptx.as_bytes();
        let header = format!(
            "{MAGIC} {VERSION}\nmanifest {} ptx {} fnv1a64 {:016x}\n",
            manifest.len(),
            ptx.len(),
            fnv1a64(&[&manifest, ptx])
        );
        let mut out = Vec::with_capacity(header.len() + manifest.len() + ptx.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&manifest);
        out.extend_from_slice(ptx);
        out
    }

    /// Parses and checks a file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Artifact, String> {
        let mut lines = bytes.splitn(3, |&b| b == b'\n');
        let first = lines.next().unwrap_or_default();
        let first = std::str::from_utf8(first).unwrap_or("");
        let mut it = first.split(' ');
        if it.next() != Some(MAGIC) {
            return Err(format!(
                "not a ma2mba artifact (the file does not start with `{MAGIC}`)"
            ));
        }
        let version: u32 = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or("the header's version is not a number")?;
        if version != VERSION {
            return Err(format!(
                "format version {version}; this build reads version {VERSION}: recompile the artifact"
            ));
        }
        let second = lines
            .next()
            .ok_or("truncated: the file ends inside the header")?;
        let rest = lines
            .next()
            .ok_or("truncated: the file ends inside the header")?;
        let second = std::str::from_utf8(second).map_err(|_| "the header is not text")?;
        let f: Vec<&str> = second.split(' ').collect();
        let bad = || "the header's second line is not `manifest <n> ptx <n> fnv1a64 <hex>`";
        if f.len() != 6 || f[0] != "manifest" || f[2] != "ptx" || f[4] != "fnv1a64" {
            return Err(bad().into());
        }
        let m: usize = f[1].parse().map_err(|_| bad())?;
        let p: usize = f[3].parse().map_err(|_| bad())?;
        let sum = u64::from_str_radix(f[5], 16).map_err(|_| bad())?;
        let want = m.checked_add(p).ok_or_else(bad)?;
        if rest.len() < want {
            return Err(format!(
                "truncated: the header announces {want} bytes of manifest and PTX, the file holds {}",
                rest.len()
            ));
        }
        if rest.len() > want {
            return Err(format!(
                "{} bytes of trailing data after the manifest and PTX",
                rest.len() - want
            ));
        }
        let (mbytes, pbytes) = rest.split_at(m);
        if fnv1a64(&[mbytes, pbytes]) != sum {
            return Err("checksum mismatch: the file is damaged".into());
        }
        let manifest: Manifest =
            serde_json::from_slice(mbytes).map_err(|e| format!("manifest: {e}"))?;
        let ptx = String::from_utf8(pbytes.to_vec()).map_err(|_| "the PTX is not UTF-8")?;
        let a = Artifact { manifest, ptx };
        a.validate()?;
        Ok(a)
    }

    /// Checks that every index in the manifest points at something.
    pub fn validate(&self) -> Result<(), String> {
        let m = &self.manifest;
        let nb = m.buffers.len();
        let buf = |b: usize, what: &str| {
            if b < nb {
                Ok(())
            } else {
                Err(format!("manifest: {what} names buffer {b} of {nb}"))
            }
        };
        for (i, s) in m.steps.iter().enumerate() {
            match s {
                StepInfo::Kernel { kernel, bufs, .. } => {
                    let k = m.kernels.get(*kernel).ok_or_else(|| {
                        format!(
                            "manifest: step {i} launches kernel {kernel} of {}",
                            m.kernels.len()
                        )
                    })?;
                    if k.bufs.len() != bufs.len() {
                        return Err(format!(
                            "manifest: step {i} passes {} buffers to `{}`, which takes {}",
                            bufs.len(),
                            k.name,
                            k.bufs.len()
                        ));
                    }
                    for &b in bufs {
                        buf(b, &format!("step {i}"))?;
                    }
                }
                StepInfo::Matmul { lhs, rhs, out, .. } => {
                    for &b in [lhs, rhs, out] {
                        buf(b, &format!("step {i}"))?;
                    }
                }
            }
        }
        for (name, b) in &m.outputs {
            buf(*b, &format!("output `{name}`"))?;
        }
        for k in &m.kernels {
            if !m.ptx.entries.contains(&k.entry) {
                return Err(format!(
                    "manifest: kernel `{}` runs entry `{}`, which the PTX does not list",
                    k.name, k.entry
                ));
            }
        }
        if m.ptx.bytes != self.ptx.len() as u64 {
            return Err(format!(
                "manifest: {} bytes of PTX announced, {} present",
                m.ptx.bytes,
                self.ptx.len()
            ));
        }
        Ok(())
    }

    /// The schedule as the runtime executes it, rebuilt from the manifest alone: kernels
    /// stand for their PTX entries (named by entry, one flat grid of the threads to launch,
    /// no body), products and buffers at the artifact's sizes, and the stored memory plan.
    /// Also returns the symbol values.
    pub fn schedule(&self) -> Result<(Lowered, passes::MemoryPlan, Vec<i64>), String> {
        use ir::kernel::{IExpr, KBuf};
        let m = &self.manifest;
        let dtype = |s: &str| {
            ir::DType::from_name(s).ok_or_else(|| format!("manifest: unknown dtype `{s}`"))
        };
        let mut kernels = Vec::with_capacity(m.kernels.len());
        for k in &m.kernels {
            let bufs = k
                .bufs
                .iter()
                .map(|b| {
                    Ok(KBuf {
                        name: b.name.clone(),
                        dtype: dtype(&b.dtype)?,
                        writable: b.writable,
                    })
                })
                .collect::<Result<_, String>>()?;
            // A grid read from device buffers: launch the most the runtime launches.
            let mut threads = k.threads.unwrap_or(i64::MAX as u64);
            let mut body = Vec::new();
            if k.shared_bytes > 0 {
                // A tiled kernel: a block per point, and one tile standing for its shared
                // memory (`ir::tile::layout` pads a row by 16 bytes).
                threads /= u64::from(ir::tile::TILE_THREADS);
                let pad = ir::tile::ROW_PAD_BYTES as u32;
                if k.shared_bytes % 16 != 0 || k.shared_bytes <= pad {
                    return Err(format!(
                        "manifest: kernel `{}` has {} bytes of shared memory",
                        k.name, k.shared_bytes
                    ));
                }
                body.push(ir::kernel::Stmt::Tile {
                    tile: ir::kernel::TileId(0),
                    dtype: ir::DType::BF16,
                    rows: 1,
                    cols: ((k.shared_bytes - pad) / 2) as usize,
                });
            }
            kernels.push(Kernel {
                name: k.entry.clone(),
                bufs,
                sizes: k.sizes.clone(),
                grid: vec![IExpr::Const(i64::try_from(threads).unwrap_or(i64::MAX))],
                body,
            });
        }
        let node = |s: &str| {
            s.trim_start_matches('%')
                .split('.')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .map(ir::NodeId::from_index)
                .ok_or_else(|| format!("manifest: bad node `{s}`"))
        };
        let mut steps = Vec::with_capacity(m.steps.len());
        for s in &m.steps {
            steps.push(match s {
                StepInfo::Kernel {
                    kernel,
                    bufs,
                    node: n,
                } => Step::Kernel {
                    kernel: *kernel,
                    bufs: bufs.clone(),
                    node: node(n)?,
                },
                StepInfo::Matmul {
                    lhs,
                    rhs,
                    out,
                    lhs_t,
                    rhs_t,
                    rhs_batched,
                    exact,
                    node: n,
                    dims,
                    ..
                } => Step::MatMul {
                    lhs: *lhs,
                    rhs: *rhs,
                    out: *out,
                    batch: ir::schedule::Product::of(ir::Dim::known(dims[0])),
                    m: ir::Dim::known(dims[1]),
                    k: ir::Dim::known(dims[2]),
                    n: ir::Dim::known(dims[3]),
                    lhs_t: *lhs_t,
                    rhs_t: *rhs_t,
                    rhs_batched: *rhs_batched,
                    exact: *exact,
                    node: node(n)?,
                },
            });
        }
        let mut buffers = Vec::with_capacity(m.buffers.len());
        for b in &m.buffers {
            let kind = match b.kind.as_str() {
                "input" => BufKind::Input(b.name.clone()),
                "state" => BufKind::State(b.name.clone()),
                "param" => BufKind::Param(b.name.clone()),
                "temp" => BufKind::Temp,
                "scratch" => BufKind::Scratch,
                k => return Err(format!("manifest: unknown buffer kind `{k}`")),
            };
            let dt = dtype(&b.dtype)?;
            buffers.push(ir::schedule::BufInfo {
                kind,
                dtype: dt,
                shape: vec![ir::Dim::known(b.bytes / dt.size())],
                value: ir::Value::new(ir::NodeId::from_index(0), 0),
            });
        }
        let lowered = Lowered {
            kernels,
            steps,
            buffers,
            syms: m.symbols.iter().map(|(n, _)| n.clone()).collect(),
            outputs: m.outputs.clone(),
        };
        let plan = passes::MemoryPlan {
            offsets: m.buffers.iter().map(|b| b.offset).collect(),
            bytes: m.buffers.iter().map(|b| b.bytes).collect(),
            lifetimes: m.buffers.iter().map(|b| b.lifetime).collect(),
            peak: m.peak,
        };
        Ok((lowered, plan, m.symbols.iter().map(|(_, v)| *v).collect()))
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<u64, ArtifactError> {
        let bytes = self.to_bytes();
        crate::plan::write_atomic(path, &bytes).map_err(|e| ArtifactError::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(bytes.len() as u64)
    }

    /// Reads and checks a file.
    pub fn read(path: &Path) -> Result<Artifact, ArtifactError> {
        let read_err = |message: String| ArtifactError::Read {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        Artifact::from_bytes(&bytes).map_err(read_err)
    }
}

/// What `ma2mba inspect` prints: the summary, the schedule (every step with its kernel and
/// buffers), the memory plan (peak, largest buffers) and the checkpoint plan.
pub fn inspect(a: &Artifact, max_steps: Option<usize>) -> String {
    let m = &a.manifest;
    let mut s = String::new();
    let syms: Vec<String> = m.symbols.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let _ = writeln!(
        s,
        "{} ({}), {}, target {}, {}",
        m.model.name,
        m.model.source,
        if m.train {
            "training graph"
        } else {
            "forward pass"
        },
        m.target,
        syms.join(" ")
    );
    if !m.model.config.is_empty() {
        let cfg: Vec<String> = m
            .model
            .config
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "config: {}", cfg.join(" "));
    }
    let _ = writeln!(
        s,
        "parameters: {}",
        crate::cli::group_digits(m.model.params)
    );
    let launches = m
        .steps
        .iter()
        .filter(|x| matches!(x, StepInfo::Kernel { .. }))
        .count();
    let _ = writeln!(
        s,
        "kernels: {} ({} distinct PTX entries, {} of PTX)",
        m.kernels.len(),
        m.ptx.entries.len(),
        crate::plan::human(m.ptx.bytes)
    );
    let _ = writeln!(
        s,
        "schedule: {} steps ({launches} kernel launches, {} matrix products)",
        m.steps.len(),
        m.steps.len() - launches
    );
    let bname = |b: usize| m.buffers.get(b).map_or("?", |x| x.name.as_str());
    let shown = max_steps.unwrap_or(usize::MAX).min(m.steps.len());
    for (i, st) in m.steps.iter().take(shown).enumerate() {
        match st {
            StepInfo::Kernel { kernel, bufs, .. } => {
                let k = m.kernels.get(*kernel);
                let (mut r, mut w) = (Vec::new(), Vec::new());
                for (j, &b) in bufs.iter().enumerate() {
                    let writable = k.and_then(|k| k.bufs.get(j)).is_some_and(|kb| kb.writable);
                    if writable { &mut w } else { &mut r }.push(bname(b));
                }
                let _ = writeln!(
                    s,
                    "  {i:>5} kernel {} [{}] ({}) -> {}",
                    k.map_or("?", |k| k.name.as_str()),
                    k.map_or("?", |k| k.entry.as_str()),
                    r.join(", "),
                    w.join(", ")
                );
            }
            StepInfo::Matmul {
                lhs,
                rhs,
                out,
                batch,
                m: mm,
                k,
                n,
                lhs_t,
                rhs_t,
                ..
            } => {
                let _ = writeln!(
                    s,
                    "  {i:>5} matmul {batch} x [{mm}, {k}] @ [{k}, {n}]{}{} ({}, {}) -> {}",
                    if *lhs_t { " (lhs^T)" } else { "" },
                    if *rhs_t { " (rhs^T)" } else { "" },
                    bname(*lhs),
                    bname(*rhs),
                    bname(*out)
                );
            }
        }
    }
    if shown < m.steps.len() {
        let _ = writeln!(s, "  ... {} more steps", m.steps.len() - shown);
    }
    let arena: Vec<&BufferInfo> = m.buffers.iter().filter(|b| b.offset.is_some()).collect();
    let _ = writeln!(
        s,
        "memory plan{}: peak {} ({} bytes) for {} arena buffers; parameters {}",
        if m.checkpoint.is_some() {
            " (the whole training graph, without the checkpoint plan below)"
        } else {
            ""
        },
        crate::plan::human(m.peak),
        m.peak,
        arena.len(),
        crate::plan::human(
            m.buffers
                .iter()
                .filter(|b| b.kind == "param")
                .map(|b| b.bytes)
                .sum()
        )
    );
    let mut largest = arena.clone();
    largest.sort_by_key(|b| std::cmp::Reverse(b.bytes));
    let _ = writeln!(s, "largest buffers:");
    for b in largest.iter().take(8) {
        let _ = writeln!(
            s,
            "  {:>10}  {:<8} {} {} [{}] at {}{}",
            crate::plan::human(b.bytes),
            b.kind,
            b.name,
            b.dtype,
            b.shape.join(", "),
            b.offset.unwrap_or(0),
            b.lifetime
                .map_or(String::new(), |(x, y)| format!(", steps {x}..={y}"))
        );
    }
    match &m.checkpoint {
        Some(c) => {
            let _ = writeln!(
                s,
                "checkpoint plan for {}: {}",
                crate::plan::human(c.budget),
                c.description
            );
            if let Some(p) = c.plan.get("peak_bytes").and_then(|v| v.as_u64()) {
                let _ = writeln!(
                    s,
                    "  planned peak {}, recompute {:.1}% of a step",
                    crate::plan::human(p),
                    c.plan
                        .get("recompute_pct")
                        .and_then(|v| v.as_f64())
                        .unwrap_or(0.0)
                );
            }
        }
        None => {
            let _ = writeln!(s, "checkpoint plan: none (every activation kept)");
        }
    }
    s
}
