//! Safetensors checkpoints: open, validate, check against a model, convert, save; Hugging
//! Face hub resolution.
//!
//! - [`Checkpoint::open`] maps a `.safetensors` file, or a directory holding `model.safetensors`
//!   or an index `model.safetensors.index.json` with its shards, and validates every file's
//!   structure before anything reads a tensor: header length, UTF-8 and JSON header, known
//!   dtypes, byte counts equal to shape x dtype size, offsets in range, not overlapping and
//!   covering the data section exactly (the safetensors rules). Errors name the file, the
//!   tensor and the rule.
//! - [`Checkpoint::check`] compares the checkpoint with the parameters of a graph and reports
//!   every problem at once: missing tensors (with near names), wrong shapes, dtypes other
//!   than F64/F32/F16/BF16, tensors the model does not have.
//! - Names: the graph uses the reference checkpoint names. The Hugging Face transformers name
//!   of the embedding (`backbone.embeddings.weight`) is accepted for the reference name
//!   (`backbone.embedding.weight`). When the model ties its head (the graph has no
//!   `lm_head.weight` parameter), an `lm_head.weight` in the file is ignored: its values are
//!   neither read nor compared with the embedding.
//! - [`Checkpoint::to_f32`] and [`Checkpoint::to_array`] decode little-endian bytes one
//!   element at a time (the mmap is never cast to a typed slice, so unaligned data is fine).
//! - [`save_f32`] writes a safetensors file atomically (temporary file, fsync, rename).
//! - [`resolve`] turns a path or a hub repo id (`owner/name`) into a local path, honouring
//!   `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_HOME` like the Python `huggingface_hub`.

use crate::array::Array;
use hf_hub::Cache;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The single-file checkpoint name inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reference name and Hugging Face transformers name of the same tensor.
const ALIASES: &[(&str, &str)] = &[("backbone.embedding.weight", "backbone.embeddings.weight")];

/// The untied output head; optional when the model ties it to the embedding.
const LM_HEAD: &str = "lm_head.weight";

/// Dtypes a parameter may be stored in.
const ACCEPTED: &str = "F64, F32, F16, BF16";

/// Every dtype name of the safetensors format with its size in bits.
const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// Everything that can go wrong with weights. Messages start with the file they are about.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    // The structure of one safetensors file.
    #[error("{}: file is {len} bytes, too short for a safetensors file (at least 8)", file.display())]
    FileTooShort { file: PathBuf, len: u64 },
    #[error(
        "{}: header length {header_len} runs past the end of the file (8 + {header_len} > {file_len} bytes)",
        file.display()
    )]
    HeaderPastEnd {
        file: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    #[error("{}: header is not valid utf-8 ({reason})", file.display())]
    HeaderNotUtf8 { file: PathBuf, reason: String },
    #[error("{}: header is not valid json ({reason})", file.display())]
    HeaderNotJson { file: PathBuf, reason: String },
    #[error("{}: tensor `{tensor}`: {reason}", file.display())]
    BadEntry {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{}: tensor `{tensor}` has unknown dtype `{dtype}`", file.display())]
    UnknownDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error(
        "{}: tensor `{tensor}` has {found} bytes of data, but shape {shape:?} of {dtype} needs {expected}",
        file.display()
    )]
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        dtype: String,
        shape: Vec<usize>,
        expected: u64,
        found: u64,
    },
    #[error(
        "{}: tensor `{tensor}` data offsets [{begin}, {end}] are out of range (the data section has {data_len} bytes)",
        file.display()
    )]
    OffsetsOutOfRange {
        file: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error(
        "{}: tensor `{tensor}` data offsets [{begin}, {end}] overlap tensor `{other}` [{other_begin}, {other_end}]",
        file.display()
    )]
    Overlap {
        file: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        other: String,
        other_begin: u64,
        other_end: u64,
    },
    #[error("{}: data bytes {begin}..{end} belong to no tensor", file.display())]
    Uncovered { file: PathBuf, begin: u64, end: u64 },
    #[error(
        "{}: file is truncated: the header describes {expected} bytes of tensor data, the file holds {found}",
        file.display()
    )]
    Truncated {
        file: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{}: rejected by the safetensors parser ({reason})", file.display())]
    Format { file: PathBuf, reason: String },

    // Directories and sharded checkpoints.
    #[error(
        "{}: no safetensors weights (neither `{SINGLE_FILE}` nor `{INDEX_FILE}`)",
        dir.display()
    )]
    NoWeights { dir: PathBuf, has_pickle: bool },
    #[error("{}: invalid index ({reason})", index.display())]
    BadIndex { index: PathBuf, reason: String },
    #[error("{}: tensor `{tensor}` is also in {}", second.display(), first.display())]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "{}: the index maps tensor `{tensor}` to `{file}`, which does not contain it",
        index.display()
    )]
    IndexMissingTensor {
        index: PathBuf,
        tensor: String,
        file: String,
    },
    #[error("{}: tensor `{tensor}` is not listed in the index {}", file.display(), index.display())]
    UnindexedTensor {
        index: PathBuf,
        tensor: String,
        file: PathBuf,
    },

    // The checkpoint against the model.
    #[error(
        "{}: missing tensor `{tensor}` of shape {expected:?}{}",
        source_path.display(),
        near_names(near)
    )]
    Missing {
        source_path: PathBuf,
        tensor: String,
        expected: Vec<u64>,
        near: Vec<String>,
    },
    #[error("{}: tensor `{tensor}` has shape {found:?}, the model expects {expected:?}", file.display())]
    ShapeMismatch {
        file: PathBuf,
        tensor: String,
        expected: Vec<u64>,
        found: Vec<usize>,
    },
    #[error(
        "{}: tensor `{tensor}` has unsupported dtype {dtype} (supported: {ACCEPTED})",
        file.display()
    )]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: unexpected tensor `{tensor}` (not a parameter of the model)", file.display())]
    Unexpected { file: PathBuf, tensor: String },
    #[error("parameter `{tensor}` has the symbolic shape {shape}; weights need known sizes")]
    SymbolicShape { tensor: String, shape: String },
    #[error("{}: no tensor `{tensor}`", source_path.display())]
    NoTensor {
        source_path: PathBuf,
        tensor: String,
    },

    // Saving.
    #[error(
        "{}: tensor `{tensor}` has {len} values, but shape {shape:?} needs {expected}",
        path.display()
    )]
    SaveSizeMismatch {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        len: usize,
        expected: u128,
    },
    #[error("{}: tensor name `{tensor}` is given twice or is reserved", path.display())]
    SaveBadName { path: PathBuf, tensor: String },

    // The Hugging Face hub.
    #[error("`{spec}` is not a file, a directory or a Hugging Face repo id (owner/name)")]
    NotAModel { spec: String },
    #[error("`{repo}` is not in the Hugging Face cache (HF_HUB_OFFLINE=1)")]
    NotInCache {
        repo: String,
        cache_dir: PathBuf,
        missing: String,
    },
    #[error("`{repo}` has no safetensors weights (it has {})", quoted_list(files))]
    NoSafetensors { repo: String, files: Vec<String> },
    #[error("`{repo}` has no `{file}`")]
    MissingRepoFile { repo: String, file: String },
    #[error("`{repo}`: cannot download {what} ({reason})")]
    Download {
        repo: String,
        /// What was being fetched: `` `config.json` ``, "the file list".
        what: String,
        reason: String,
    },
}

impl WeightsError {
    /// A hint on how to fix the problem, for a `help:` line, where there is one.
    pub fn help(&self) -> Option<String> {
        match self {
            WeightsError::NoWeights {
                has_pickle: true, ..
            } => Some(
                "the directory has only `pytorch_model.bin` (pickle), which ma2mba does not \
                 read: use a `-hf` repo (e.g. `state-spaces/mamba-130m-hf`) or convert it \
                 to safetensors"
                    .to_string(),
            ),
            WeightsError::NotInCache {
                cache_dir, missing, ..
            } => Some(format!(
                "looked for `{missing}` in the cache at {}; run once without HF_HUB_OFFLINE \
                 to download it, or point HF_HUB_CACHE or HF_HOME at another cache",
                cache_dir.display()
            )),
            WeightsError::NoSafetensors { repo, .. } => Some(match repo.strip_suffix("-hf") {
                Some(_) => "ma2mba reads only safetensors checkpoints".to_string(),
                None => format!(
                    "ma2mba reads only safetensors; try `{repo}-hf`, the same weights in the \
                     Hugging Face transformers format"
                ),
            }),
            WeightsError::Download { .. } => Some(
                "check the repo id and the network; gated repos need HF_TOKEN; \
                 HF_HUB_OFFLINE=1 uses only the local cache"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

fn near_names(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!(" (near names in the file: {})", quoted_list(near))
    }
}

fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    quoted.join(", ")
}

/// One tensor of a validated safetensors file, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// The safetensors dtype name (`F32`, `BF16`, `I8`, ...).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Byte range in the file (not in the data section).
    pub range: std::ops::Range<usize>,
}

/// A tensor in a checkpoint: borrowed bytes with their dtype and shape.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The name in the file (which may be an alias of the name asked for).
    pub name: &'a str,
    pub file: &'a Path,
    /// The safetensors dtype name (`F32`, `BF16`, `I8`, ...).
    pub dtype: &'static str,
    pub shape: &'a [usize],
    /// Little-endian element bytes, not necessarily aligned.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The element type, for the dtypes a parameter may be stored in; `None` for the others.
    pub fn float_dtype(&self) -> Option<ir::DType> {
        match self.dtype {
            "F64" => Some(ir::DType::F64),
            "F32" => Some(ir::DType::F32),
            "F16" => Some(ir::DType::F16),
            "BF16" => Some(ir::DType::BF16),
            _ => None,
        }
    }

    /// The values converted to f32 (f64 values are rounded to nearest).
    pub fn to_f32(&self) -> Result<Vec<f32>, WeightsError> {
        self.decode(|x| x as f32, |x| x)
    }

    /// The values converted to f64 (exact for every accepted dtype).
    pub fn to_f64(&self) -> Result<Vec<f64>, WeightsError> {
        self.decode(|x| x, f64::from)
    }

    fn decode<T>(
        &self,
        from_f64: fn(f64) -> T,
        from_f32: fn(f32) -> T,
    ) -> Result<Vec<T>, WeightsError> {
        let d = self.data;
        Ok(match self.dtype {
            "F64" => d
                .chunks_exact(8)
                .map(|c| from_f64(f64::from_le_bytes(le(c))))
                .collect(),
            "F32" => d
                .chunks_exact(4)
                .map(|c| from_f32(f32::from_le_bytes(le(c))))
                .collect(),
            "F16" => d
                .chunks_exact(2)
                .map(|c| from_f32(half::f16::from_bits(u16::from_le_bytes(le(c))).to_f32()))
                .collect(),
            "BF16" => d
                .chunks_exact(2)
                .map(|c| from_f32(half::bf16::from_bits(u16::from_le_bytes(le(c))).to_f32()))
                .collect(),
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    file: self.file.to_path_buf(),
                    tensor: self.name.to_string(),
                    dtype: other.to_string(),
                });
            }
        })
    }
}

/// The first `N` bytes of `c` as an array (`c` comes from `chunks_exact(N)`).
fn le<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    a
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    shard: usize,
    dtype: &'static str,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// An opened, structurally valid safetensors checkpoint (one file or shards), memory-mapped.
pub struct Checkpoint {
    source: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.source)
            .field(
                "files",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or a directory with `model.safetensors` or with
    /// `model.safetensors.index.json` and the shards it names, validating every file.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightsError> {
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, "open", e))?;
        if !meta.is_dir() {
            let mut ck = Checkpoint::empty(path);
            ck.add_file(path)?;
            return Ok(ck);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            let mut ck = Checkpoint::empty(path);
            ck.add_file(&single)?;
            return Ok(ck);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Checkpoint::open_sharded(path, &index);
        }
        Err(WeightsError::NoWeights {
            dir: path.to_path_buf(),
            has_pickle: path.join("pytorch_model.bin").exists(),
        })
    }

    fn empty(source: &Path) -> Checkpoint {
        Checkpoint {
            source: source.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        }
    }

    fn open_sharded(dir: &Path, index: &Path) -> Result<Checkpoint, WeightsError> {
        let weight_map = read_index(index)?;
        let mut ck = Checkpoint::empty(dir);
        let files: Vec<&String> = {
            let mut f: Vec<&String> = weight_map.values().collect();
            f.sort();
            f.dedup();
            f
        };
        for file in files {
            ck.add_file(&dir.join(file))?;
        }
        for (tensor, file) in &weight_map {
            let found = ck.tensors.get(tensor).map(|e| &ck.shards[e.shard].path);
            if found != Some(&dir.join(file)) {
                return Err(WeightsError::IndexMissingTensor {
                    index: index.to_path_buf(),
                    tensor: tensor.clone(),
                    file: file.clone(),
                });
            }
        }
        if let Some((tensor, e)) = ck
            .tensors
            .iter()
            .find(|(t, _)| !weight_map.contains_key(*t))
        {
            return Err(WeightsError::UnindexedTensor {
                index: index.to_path_buf(),
                tensor: tensor.clone(),
                file: ck.shards[e.shard].path.clone(),
            });
        }
        Ok(ck)
    }

    /// Maps and validates one file and adds its tensors.
    fn add_file(&mut self, path: &Path) -> Result<(), WeightsError> {
        let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        let len = file.metadata().map_err(|e| io_err(path, "read", e))?.len();
        if len < 8 {
            return Err(WeightsError::FileTooShort {
                file: path.to_path_buf(),
                len,
            });
        }
        // SAFETY: the map is read-only and lives as long as the checkpoint. Another process
        // truncating or rewriting the file while it is mapped is outside what we can
        // guard against (as with every mmap-based loader); validation runs on the mapped bytes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, "map", e))?;
        let infos = parse(path, &map)?;
        let shard = self.shards.len();
        for info in infos {
            if let Some(prev) = self.tensors.get(&info.name) {
                return Err(WeightsError::DuplicateTensor {
                    tensor: info.name,
                    first: self.shards[prev.shard].path.clone(),
                    second: path.to_path_buf(),
                });
            }
            self.tensors.insert(
                info.name,
                Entry {
                    shard,
                    dtype: info.dtype,
                    shape: info.shape,
                    range: info.range,
                },
            );
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }

    /// The file or directory this checkpoint was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The files, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Tensor names as stored, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor stored under exactly `name`.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let (name, e) = self.tensors.get_key_value(name)?;
        let shard = self.shards.get(e.shard)?;
        Some(TensorView {
            name,
            file: &shard.path,
            dtype: e.dtype,
            shape: &e.shape,
            data: shard.map.get(e.range.clone())?,
        })
    }

    /// The tensor for the graph parameter `graph_name`, under its own name or an accepted
    /// alias (`backbone.embeddings.weight` for `backbone.embedding.weight`).
    pub fn lookup(&self, graph_name: &str) -> Option<TensorView<'_>> {
        self.stored_name(graph_name).and_then(|n| self.get(n))
    }

    fn stored_name<'a>(&'a self, graph_name: &'a str) -> Option<&'a str> {
        if self.tensors.contains_key(graph_name) {
            return Some(graph_name);
        }
        ALIASES.iter().find_map(|&(a, b)| {
            let other = if graph_name == a {
                b
            } else if graph_name == b {
                a
            } else {
                return None;
            };
            self.tensors.contains_key(other).then_some(other)
        })
    }

    fn require(&self, graph_name: &str) -> Result<TensorView<'_>, WeightsError> {
        self.lookup(graph_name)
            .ok_or_else(|| WeightsError::NoTensor {
                source_path: self.source.clone(),
                tensor: graph_name.to_string(),
            })
    }

    /// The tensor for `graph_name` (aliases applied) as f32.
    pub fn to_f32(&self, graph_name: &str) -> Result<Vec<f32>, WeightsError> {
        self.require(graph_name)?.to_f32()
    }

    /// The tensor for `graph_name` (aliases applied) as an f64 array.
    pub fn to_array(&self, graph_name: &str) -> Result<Array, WeightsError> {
        let v = self.require(graph_name)?;
        Ok(Array {
            shape: v.shape.to_vec(),
            data: v.to_f64()?,
        })
    }

    /// Checks the checkpoint against the parameters of `graph`, reporting every problem:
    /// missing, mis-shaped, unsupported dtype, and tensors the model does not have.
    pub fn check(&self, graph: &ir::Graph) -> Result<(), Vec<WeightsError>> {
        let params = graph_params(graph);
        let mut errors = Vec::new();
        let mut used: HashSet<&str> = HashSet::new();
        let mut missing: Vec<(&str, Vec<u64>)> = Vec::new();
        for (name, ty) in &params {
            let Some(expected) = known_shape(&ty.shape) else {
                errors.push(WeightsError::SymbolicShape {
                    tensor: name.to_string(),
                    shape: ir::shape_to_string(&ty.shape),
                });
                continue;
            };
            let Some(v) = self.lookup(name) else {
                missing.push((name, expected));
                continue;
            };
            used.insert(v.name);
            if v.float_dtype().is_none() {
                errors.push(WeightsError::UnsupportedDtype {
                    file: v.file.to_path_buf(),
                    tensor: v.name.to_string(),
                    dtype: v.dtype.to_string(),
                });
            }
            if v.shape.len() != expected.len()
                || v.shape.iter().zip(&expected).any(|(&f, &e)| f as u64 != e)
            {
                errors.push(WeightsError::ShapeMismatch {
                    file: v.file.to_path_buf(),
                    tensor: v.name.to_string(),
                    expected,
                    found: v.shape.to_vec(),
                });
            }
        }
        let tied = !params.iter().any(|(n, _)| *n == LM_HEAD);
        let unused: Vec<&str> = self
            .names()
            .filter(|n| !(used.contains(n) || tied && *n == LM_HEAD))
            .collect();
        for (name, expected) in missing {
            errors.push(WeightsError::Missing {
                source_path: self.source.clone(),
                tensor: name.to_string(),
                expected,
                near: nearest(name, &unused),
            });
        }
        for name in unused {
            if let Some(v) = self.get(name) {
                errors.push(WeightsError::Unexpected {
                    file: v.file.to_path_buf(),
                    tensor: name.to_string(),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Every parameter of `graph` as an f64 array, keyed by its graph name; runs
    /// [`Checkpoint::check`] first.
    pub fn load_params(
        &self,
        graph: &ir::Graph,
    ) -> Result<HashMap<String, Array>, Vec<WeightsError>> {
        self.check(graph)?;
        let mut out = HashMap::new();
        let mut errors = Vec::new();
        for (name, _) in graph_params(graph) {
            match self.to_array(name) {
                Ok(a) => {
                    out.insert(name.to_string(), a);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

/// The parameters of `graph` (name, type), each name once, in node order.
fn graph_params(graph: &ir::Graph) -> Vec<(&str, &ir::TensorType)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in graph.nodes() {
        if let ir::Op::Param { name, ty, .. } = graph.op(n)
            && seen.insert(name.as_str())
        {
            out.push((name.as_str(), ty));
        }
    }
    out
}

fn known_shape(shape: &[ir::Dim]) -> Option<Vec<u64>> {
    shape.iter().map(ir::Dim::as_known).collect()
}

/// Up to three names of `candidates` within a small edit distance of `name`, nearest first.
fn nearest(name: &str, candidates: &[&str]) -> Vec<String> {
    let limit = (name.chars().count() / 5).max(2);
    let mut scored: Vec<(usize, &str)> = candidates
        .iter()
        .filter(|c| c.chars().count().abs_diff(name.chars().count()) <= limit)
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn io_err(path: &Path, action: &'static str, source: std::io::Error) -> WeightsError {
    WeightsError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Reads `model.safetensors.index.json`: tensor name -> shard file name (a plain file name).
fn read_index(index: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let bad = |reason: String| WeightsError::BadIndex {
        index: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| io_err(index, "read", e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no `weight_map` object".to_string()));
    };
    if map.is_empty() {
        return Err(bad("the weight map is empty".to_string()));
    }
    let mut out = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!(
                "the file of tensor `{tensor}` is not a string"
            )));
        };
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && Path::new(file).is_relative();
        if !plain {
            return Err(bad(format!(
                "the file `{file}` of tensor `{tensor}` is not a file name in the directory"
            )));
        }
        out.insert(tensor.clone(), file.to_string());
    }
    Ok(out)
}

/// Validates the bytes of a whole safetensors file and returns its tensors sorted by offset.
/// `file` is only used in error messages. Never panics, whatever the bytes.
pub fn parse(file: &Path, bytes: &[u8]) -> Result<Vec<TensorInfo>, WeightsError> {
    let path = || file.to_path_buf();
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(WeightsError::FileTooShort {
            file: path(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(le(prefix));
    if header_len > file_len - 8 {
        return Err(WeightsError::HeaderPastEnd {
            file: path(),
            header_len,
            file_len,
        });
    }
    // header_len <= file_len - 8, so it fits in usize.
    let data_start = 8 + header_len as usize;
    let header =
        std::str::from_utf8(&bytes[8..data_start]).map_err(|e| WeightsError::HeaderNotUtf8 {
            file: path(),
            reason: e.to_string(),
        })?;
    let not_json = |reason: String| WeightsError::HeaderNotJson {
        file: path(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(header).map_err(|e| not_json(e.to_string()))?;
    let Some(obj) = json.as_object() else {
        return Err(not_json("the header is not a json object".to_string()));
    };

    let data_len = (bytes.len() - data_start) as u64;
    /// A header entry; offsets relative to the data section.
    struct Raw {
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        begin: u64,
        end: u64,
    }
    let mut entries: Vec<Raw> = Vec::new();
    for (name, value) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |reason: &str| WeightsError::BadEntry {
            file: path(),
            tensor: name.clone(),
            reason: reason.to_string(),
        };
        let dtype_name = value
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("`dtype` is missing or not a string"))?;
        let Some(&(dtype, bits)) = DTYPES.iter().find(|(n, _)| *n == dtype_name) else {
            return Err(WeightsError::UnknownDtype {
                file: path(),
                tensor: name.clone(),
                dtype: dtype_name.to_string(),
            });
        };
        let shape: Vec<usize> = value
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("`shape` is missing or not a list of non-negative integers"))?;
        let offsets: Vec<u64> = value
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("`data_offsets` is missing or not two non-negative integers"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if end < begin {
            return Err(bad(&format!(
                "data offsets [{begin}, {end}] end before they begin"
            )));
        }
        let bits_total = shape
            .iter()
            .try_fold(bits as u128, |acc, &d| acc.checked_mul(d as u128))
            .ok_or_else(|| bad("the shape's size overflows"))?;
        if bits_total % 8 != 0 {
            return Err(bad("the data is not a whole number of bytes"));
        }
        let expected = bits_total / 8;
        if expected != u128::from(end - begin) {
            return Err(WeightsError::SizeMismatch {
                file: path(),
                tensor: name.clone(),
                dtype: dtype.to_string(),
                shape,
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                found: end - begin,
            });
        }
        entries.push(Raw {
            name: name.clone(),
            dtype,
            shape,
            begin,
            end,
        });
    }
    entries.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));

    // Layout: sorted by offset, the ranges must tile [0, data_len) exactly.
    // `cursor` is the furthest end so far, reached by entry `reach`.
    let mut cursor = 0u64;
    let mut reach = 0usize;
    let mut layout_error = None;
    for (i, e) in entries.iter().enumerate() {
        if layout_error.is_none() {
            if e.begin < cursor {
                let (other, other_begin, other_end) = match entries.get(reach) {
                    Some(o) => (o.name.clone(), o.begin, o.end),
                    None => (String::new(), 0, cursor),
                };
                layout_error = Some(WeightsError::Overlap {
                    file: path(),
                    tensor: e.name.clone(),
                    begin: e.begin,
                    end: e.end,
                    other,
                    other_begin,
                    other_end,
                });
            } else if e.begin > cursor {
                layout_error = Some(WeightsError::Uncovered {
                    file: path(),
                    begin: cursor,
                    end: e.begin,
                });
            }
        }
        if e.end > cursor {
            cursor = e.end;
            reach = i;
        }
    }
    if let Some(e) = entries.iter().find(|e| e.end > data_len) {
        return Err(match layout_error {
            // The header is consistent; the file lost its tail.
            None => WeightsError::Truncated {
                file: path(),
                expected: cursor,
                found: data_len,
            },
            Some(_) => WeightsError::OffsetsOutOfRange {
                file: path(),
                tensor: e.name.clone(),
                begin: e.begin,
                end: e.end,
                data_len,
            },
        });
    }
    if let Some(e) = layout_error {
        return Err(e);
    }
    if cursor < data_len {
        return Err(WeightsError::Uncovered {
            file: path(),
            begin: cursor,
            end: data_len,
        });
    }

    // A second opinion from the reference parser, for any rule we might have missed.
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| WeightsError::Format {
        file: path(),
        reason: e.to_string(),
    })?;

    Ok(entries
        .into_iter()
        .map(|e| TensorInfo {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
            // Both offsets are <= data_len, so the sums fit the file length (a usize).
            range: data_start + e.begin as usize..data_start + e.end as usize,
        })
        .collect())
}

/// Writes f32 tensors to a safetensors file atomically: the bytes go to `<path>.tmp-<pid>`
/// in the same directory, which is synced and then renamed over `path`.
pub fn save_f32(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), WeightsError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, data) in tensors {
        let expected = shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        if expected != Some(data.len() as u128) {
            return Err(WeightsError::SaveSizeMismatch {
                path: path.to_path_buf(),
                tensor: name.clone(),
                shape: shape.clone(),
                len: data.len(),
                expected: expected.unwrap_or(u128::MAX),
            });
        }
        if name == "__metadata__" || header.contains_key(name) {
            return Err(WeightsError::SaveBadName {
                path: path.to_path_buf(),
                tensor: name.clone(),
            });
        }
        let end = offset + 4 * data.len() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string();
    // Pad with spaces so the data starts 8-byte aligned.
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }

    let Some(file_name) = path.file_name() else {
        return Err(io_err(
            path,
            "write",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let write = || -> Result<(), WeightsError> {
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
        let mut w = std::io::BufWriter::new(f);
        let werr = |e| io_err(&tmp, "write", e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(werr)?;
        w.write_all(header.as_bytes()).map_err(werr)?;
        for (_, _, data) in tensors {
            for x in data {
                w.write_all(&x.to_le_bytes()).map_err(werr)?;
            }
        }
        let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&tmp, "sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "rename the temporary file to", e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename durable; some filesystems cannot sync a directory, which is harmless.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A local path for `spec`: the path itself if it exists, else the snapshot directory of the
/// Hugging Face repo `spec` (`owner/name`), from the cache or downloaded. `HF_HUB_OFFLINE`
/// (`1`, `true`, `yes`, `on`) restricts it to the cache; the cache is `HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn resolve(spec: &str) -> Result<PathBuf, WeightsError> {
    resolve_with(spec, hub_offline(), &hub_cache())
}

/// Whether `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`) restricts the hub to the local cache.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The Hugging Face cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

/// One file of the hub repo `repo`: from the cache, else (unless `offline`) downloaded into
/// it. Used for files beside the weights, such as `tokenizer.json`.
pub fn resolve_file(
    repo: &str,
    file: &str,
    offline: bool,
    cache: &Cache,
) -> Result<PathBuf, WeightsError> {
    if !is_repo_id(repo) {
        return Err(WeightsError::NotAModel {
            spec: repo.to_string(),
        });
    }
    if let Some(p) = cache.model(repo.to_string()).get(file) {
        return Ok(p);
    }
    if offline {
        return Err(WeightsError::NotInCache {
            repo: repo.to_string(),
            cache_dir: cache.path().clone(),
            missing: file.to_string(),
        });
    }
    let failed = |e: hf_hub::api::sync::ApiError| WeightsError::Download {
        repo: repo.to_string(),
        what: format!("`{file}`"),
        reason: e.to_string(),
    };
    let api = hub_api(cache).map_err(failed)?;
    api.model(repo.to_string()).get(file).map_err(failed)
}

/// [`resolve`] with the offline switch and the cache given explicitly. Online, a repo whose
/// files are all in the cache is used without contacting the hub.
pub fn resolve_with(spec: &str, offline: bool, cache: &Cache) -> Result<PathBuf, WeightsError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let looks_like_path = spec.starts_with(['/', '.', '~']) || spec.ends_with(".safetensors");
    if looks_like_path {
        return Err(io_err(
            path,
            "open",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    if !is_repo_id(spec) {
        return Err(WeightsError::NotAModel {
            spec: spec.to_string(),
        });
    }
    match from_cache(spec, cache) {
        Ok(dir) => Ok(dir),
        Err(e) if offline => Err(e),
        Err(_) => download(spec, cache),
    }
}

/// `owner/name`, each part made of ASCII letters, digits, `-`, `_` and `.`, not `.`/`..`.
pub fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(owner) && ok(name)
}

/// The snapshot directory of `repo` if its config and safetensors weights are all cached.
fn from_cache(repo: &str, cache: &Cache) -> Result<PathBuf, WeightsError> {
    let cached = cache.model(repo.to_string());
    let not_in_cache = |missing: &str| WeightsError::NotInCache {
        repo: repo.to_string(),
        cache_dir: cache.path().clone(),
        missing: missing.to_string(),
    };
    let config = cached
        .get("config.json")
        .ok_or_else(|| not_in_cache("config.json"))?;
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| not_in_cache("config.json"))?;
    if cached.get(SINGLE_FILE).is_some() {
        return Ok(snapshot);
    }
    if let Some(index) = cached.get(INDEX_FILE) {
        for file in read_index(&index)?.values() {
            if cached.get(file).is_none() {
                return Err(not_in_cache(file));
            }
        }
        return Ok(snapshot);
    }
    if cached.get("pytorch_model.bin").is_some() {
        return Err(WeightsError::NoSafetensors {
            repo: repo.to_string(),
            files: vec!["pytorch_model.bin".to_string()],
        });
    }
    Err(not_in_cache(SINGLE_FILE))
}

/// A hub client over `cache`, with `HF_TOKEN` and `HF_ENDPOINT` applied.
fn hub_api(cache: &Cache) -> Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone());
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.is_empty()
    {
        builder = builder.with_token(Some(token));
    }
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT")
        && !endpoint.is_empty()
    {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build()
}

/// Downloads `config.json` and the safetensors weights of `repo` into `cache`.
fn download(repo: &str, cache: &Cache) -> Result<PathBuf, WeightsError> {
    let failed = |file: &str, e: hf_hub::api::sync::ApiError| WeightsError::Download {
        repo: repo.to_string(),
        what: if file.contains(' ') {
            file.to_string()
        } else {
            format!("`{file}`")
        },
        reason: e.to_string(),
    };
    let api = hub_api(cache).map_err(|e| failed("the file list", e))?;
    let hub = api.model(repo.to_string());
    let info = hub.info().map_err(|e| failed("the file list", e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has("config.json") {
        return Err(WeightsError::MissingRepoFile {
            repo: repo.to_string(),
            file: "config.json".to_string(),
        });
    }
    let weights: Vec<String> = if has(SINGLE_FILE) {
        vec![SINGLE_FILE.to_string()]
    } else if has(INDEX_FILE) {
        let index = hub.get(INDEX_FILE).map_err(|e| failed(INDEX_FILE, e))?;
        let mut shards: Vec<String> = read_index(&index)?.into_values().collect();
        shards.sort();
        shards.dedup();
        shards
    } else {
        let others: Vec<String> = files
            .iter()
            .filter(|f| {
                f.ends_with(".bin")
                    || f.ends_with(".pt")
                    || f.ends_with(".pth")
                    || f.ends_with(".safetensors")
            })
            .cloned()
            .collect();
        return Err(WeightsError::NoSafetensors {
            repo: repo.to_string(),
            files: if others.is_empty() { files } else { others },
        });
    };
    let config = hub
        .get("config.json")
        .map_err(|e| failed("config.json", e))?;
    for file in &weights {
        hub.get(file).map_err(|e| failed(file, e))?;
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| WeightsError::MissingRepoFile {
            repo: repo.to_string(),
            file: "config.json".to_string(),
        })
}
