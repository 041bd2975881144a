//! The GPU backend: kernel IR to LLVM IR to PTX with LLVM 19's NVPTX target (inkwell).
//!
//! # The generated kernels
//!
//! Every kernel of the IR becomes an `.entry` (the PTX kernel calling convention) of one
//! module, named by [`entry_names`], and where [`index32_pays`] a second one with 32-bit
//! index math, named by [`ir::kernel::index32_entry`] of that name:
//!
//! ```text
//! .entry name(.param .u64 buf0, ..., .param .u64 buf{n-1}, .param .u64 size0, ...)
//! ```
//!
//! Buffers are global-memory addresses of their first element; sizes are the kernel's runtime
//! sizes (i64). The grid extents are computed inside from the sizes, and every thread runs a
//! grid-stride loop over the flattened, row-major grid (`flat = ctaid.x * ntid.x + tid.x`,
//! step `nctaid.x * ntid.x`), splitting `flat` into coordinates: any 1-d launch computes every
//! point exactly once, so the launch shape is only a performance choice. A straight-line
//! kernel whose last extent is a constant multiple of 4 (8 where it writes only bf16) walks
//! groups of that many neighbouring points instead (`ir::lanes::points_per_thread`): one
//! split into coordinates, a body per point.
//!
//! # Lanes sharing a point
//!
//! Where [`ir::lanes`] finds loops the threads of a point can share (row reductions, a scan's
//! state loop), a warp (32) or a whole block (256) runs each grid point: `lane = flat % T`,
//! the point is `flat / T`, split loops step by `T` from the lane, reductions combine with
//! `shfl.sync.bfly` (and across warps through shared memory), and a warp or block barrier
//! follows each split loop. Launch blocks must hold a multiple of `T` threads (256 does).
//! Those sums are regrouped, so they differ from the CPU's in the last bits.
//!
//! # Arithmetic: the same results as the CPU backend
//!
//! The lowering mirrors [`crate::cpu`] operation for operation, so that both backends give
//! the same bits where the CPU does not call out to Rust:
//! - No fused multiply-adds: the CPU backend rounds every product, so no instruction carries
//!   the `contract` flag and the target options keep LLVM from fusing (PTX `mul.rn`/`add.rn`,
//!   which ptxas does not fuse either). Division is IEEE `div.rn.f32`, `sqrt` is `sqrt.rn.f32`,
//!   subnormals are kept (no flush to zero).
//! - `exp`, `sigmoid`, `silu`: the CPU backend's inline Cephes `expf` (about 1 ulp) and its
//!   stable sigmoid, the same operations in the same order: bit-identical results. Tiled
//!   kernels are the exception: their `exp` is the hardware's `ex2.approx` (a few ulps);
//!   their tile products sum in another order than the CPU's anyway, and the SSD's masks,
//!   which are most of their instructions, round to bf16.
//! - `rsqrt`: `1 / sqrt` in f64, rounded once (as the CPU).
//! - `log`, `softplus`: the CPU calls Rust's f64 `ln`/`exp`/`ln_1p` and rounds once; NVPTX
//!   has no libm, so these run [`crate::math`]'s f64 algorithms (a few f64 ulps, tested
//!   against `std`), then round once: the same f32 except in rare near-midpoint cases (an
//!   f32 ulp at most).
//! - `max`/`min`: `f32::max`/`f32::min` semantics (a NaN operand yields the other), as the CPU.
//! - Storage: bf16 loads shift into the top half of an f32; bf16 stores are `cvt.rn.bf16.f32`
//!   (round to nearest even, as the CPU's integer trick: bit-identical but for a NaN's
//!   payload, which becomes the canonical NaN). f16 converts with `cvt` (round to nearest
//!   even, as `half`). f64 loads round to f32, stores widen.
//! - Index math is i64 in a kernel's entry and i32 in its second entry where it has one
//!   (the runtime launches it where [`ir::kernel::INDEX32_LIMIT`] bounds every index);
//!   `Div`/`Rem` are floor division/remainder as in the CPU backend
//!   (shifts and masks for power-of-two constants, `sdiv` plus a fix-up otherwise). A divisor
//!   that is not positive is undefined behaviour.
//!
//! Index arithmetic carries `nsw` (no index wraps: in the 32-bit entry the runtime's bound
//! guarantees it), so that LLVM may widen `i + 1` after a sign extension and merge a
//! thread's neighbouring accesses into vector ones as it does with i64.
//!
//! Inside an `Each` (tiled kernels), a `For` of constant extent up to 8 is emitted unrolled:
//! the lowering writes a thread's run of neighbouring tile elements that way (a row segment),
//! so its loads and stores have constant offsets and merge into 16-byte ones.
//!
//! Scalars, loop counters and local arrays are allocas in the entry block; `default<O3>`
//! (with the NVPTX target machine, so address-space inference runs) promotes them to
//! registers where it can (a local array indexed by a run-time value stays in local memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};

use inkwell::OptimizationLevel;
use inkwell::builder::{Builder, BuilderError};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target as LlvmTarget, TargetMachine,
    TargetTriple,
};
use inkwell::types::{BasicType, BasicTypeEnum, FloatType, IntType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue,
    ValueKind,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};

use ir::kernel::{ArrId, Expr, IExpr, Kernel, KernelError, LoopId, Stmt, TileId, VarId};
use ir::lanes::{LaneSplit, WARP, lane_split};
use ir::schedule::Lowered;
use ir::tile::TileSlot;
use ir::{BinaryOp, DType, UnaryOp};

use crate::math;

/// Copies of a split loop's body per trip of its main loop.
const SPLIT_UNROLL: i64 = 4;

/// Iterations per thread and trip of an `Each`'s main loop (`Gen::each`).
const EACH_UNROLL: i64 = 8;

/// The size (`body_cost`) of the copies of an `Each` body with unrolled runs (`For`s of
/// constant extent up to `UNROLL_FOR_MAX`) that one trip of its main loop may take, also
/// capped by the full trips there are. At `Q = 128`, `P = 64`: the forward's `Xᵀ` fill
/// (cost 49) and output (83) run their 4 trips as one, its mask (139) 2 runs per trip; the
/// gradient's fill with its dots (234) and its mask 1. Larger budgets made the forward
/// spill at 128 registers.
const EACH_RUN_BUDGET: i64 = 340;

/// The largest extent of an `Each` body's top-level unrolled `For`s, 1 without any.
fn unrolled_weight(body: &[Stmt]) -> i64 {
    body.iter()
        .filter_map(|s| match s {
            Stmt::For {
                extent: IExpr::Const(n),
                ..
            } if (1..=UNROLL_FOR_MAX).contains(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

/// Value nodes and statements of `body`, a `For` of constant extent counted that many times.
fn body_cost(body: &[Stmt]) -> i64 {
    let expr = |e: &Expr| {
        let mut n = 0;
        e.walk(&mut |_| n += 1);
        n
    };
    body.iter()
        .map(|s| match s {
            Stmt::For { extent, body, .. } => {
                let times = match extent {
                    IExpr::Const(n) => *n,
                    _ => 1,
                };
                times * body_cost(body)
            }
            Stmt::Var { init: e, .. }
            | Stmt::Set { value: e, .. }
            | Stmt::ArrSet { value: e, .. }
            | Stmt::Store { value: e, .. }
            | Stmt::TileSet { value: e, .. } => 1 + expr(e),
            _ => 1,
        })
        .sum()
}

/// A `For` inside an `Each` whose extent is a constant up to this is emitted unrolled: a
/// thread's run of neighbouring elements (a row segment of a tile) then has constant
/// offsets, local arrays indexed by the counter become registers, and LLVM merges the
/// neighbours' accesses into vector ones.
const UNROLL_FOR_MAX: i64 = 8;

/// The PTX kernel calling convention (LLVM's `ptx_kernel`): functions with it are `.entry`.
const PTX_KERNEL_CC: u32 = 71;
const TRIPLE: &str = "nvptx64-nvidia-cuda";
/// Global memory.
fn global() -> AddressSpace {
    AddressSpace::from(1u16)
}

/// A GPU architecture PTX is generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Hopper (H100, H200).
    Sm90,
    /// Ampere (A100): the fallback.
    Sm80,
}

impl Target {
    /// The PTX `.target` / ptxas `-arch` name.
    pub fn arch(self) -> &'static str {
        match self {
            Target::Sm90 => "sm_90",
            Target::Sm80 => "sm_80",
        }
    }

    /// Shared memory an SM gives its blocks (H100/H200: 228 KB, A100: 164 KB), of which the
    /// system reserves 1 KB per block.
    pub fn sm_shared_bytes(self) -> usize {
        match self {
            Target::Sm90 => 228 * 1024,
            Target::Sm80 => 164 * 1024,
        }
    }

    /// `sm_90` or `sm_80`.
    pub fn from_arch(s: &str) -> Option<Target> {
        match s {
            "sm_90" => Some(Target::Sm90),
            "sm_80" => Some(Target::Sm80),
            _ => None,
        }
    }
}

/// A PTX module: the text and the entry name of each kernel, in kernel order.
#[derive(Clone, Debug)]
pub struct Ptx {
    pub target: Target,
    pub text: String,
    pub entries: Vec<String>,
}

/// Why generating PTX failed; every error about a kernel names it.
#[derive(Debug, thiserror::Error)]
pub enum PtxError {
    /// The kernel breaks an invariant of [`Kernel::check`].
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The kernel uses something this backend does not implement.
    #[error("kernel `{kernel}`: unsupported: {message}")]
    Unsupported { kernel: String, message: String },
    /// LLVM rejected the generated code (a backend bug).
    #[error("kernel `{kernel}`: llvm: {message}")]
    Llvm { kernel: String, message: String },
    /// The NVPTX target could not be set up, or the module as a whole failed.
    #[error("llvm nvptx: {0}")]
    Setup(String),
}

/// An error while generating one kernel, before it is given the kernel's name.
enum GenErr {
    Unsupported(String),
    Llvm(String),
}

impl From<BuilderError> for GenErr {
    fn from(e: BuilderError) -> GenErr {
        GenErr::Llvm(e.to_string())
    }
}

type G<T> = Result<T, GenErr>;

/// The PTX entry name of every kernel, in order: the kernel's name with characters PTX does
/// not allow replaced by `_`, made unique with a `_<index>` suffix where needed.
pub fn entry_names(kernels: &[Kernel]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    kernels
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut s: String = k
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
                s.insert(0, 'k');
            }
            // Keeps `index32_entry` names apart from every entry name.
            if s.ends_with(ir::kernel::INDEX32_SUFFIX) {
                s.push('_');
            }
            if !seen.insert(s.clone()) {
                s = format!("{s}_{i}");
                seen.insert(s.clone());
            }
            s
        })
        .collect()
}

fn init_nvptx() {
    static INIT: Once = Once::new();
    INIT.call_once(|| LlvmTarget::initialize_nvptx(&InitializationConfig::default()));
}

fn target_machine(target: Target) -> Result<TargetMachine, PtxError> {
    init_nvptx();
    let triple = TargetTriple::create(TRIPLE);
    let t = LlvmTarget::from_triple(&triple).map_err(|e| PtxError::Setup(e.to_string()))?;
    t.create_target_machine(
        &triple,
        target.arch(),
        "+ptx85",
        OptimizationLevel::Aggressive,
        RelocMode::Default,
        CodeModel::Default,
    )
    .ok_or_else(|| PtxError::Setup(format!("no target machine for {}", target.arch())))
}

/// Compiles every kernel of a schedule into one PTX module.
pub fn compile_lowered(l: &Lowered, target: Target) -> Result<Ptx, PtxError> {
    compile_ptx(&l.kernels, target)
}

/// [`compile_ptx`], shared: a kernel set compiled before (equal kernels, same target) gives
/// the same module without running LLVM again. A checkpointed training step compiles one
/// graph per layer group, and groups of equal size have equal kernels (mamba2-2.7b at 2^16:
/// 32 groups, each about half a second of LLVM). Keeps the last [`PTX_CACHE_ENTRIES`] sets.
pub fn compile_ptx_shared(kernels: &[Kernel], target: Target) -> Result<Arc<Ptx>, PtxError> {
    let key = content_hash(kernels);
    let hit = |c: &Vec<CachedPtx>| {
        c.iter()
            .find(|e| e.hash == key && e.ptx.target == target && e.kernels == kernels)
            .map(|e| e.ptx.clone())
    };
    if let Some(p) = PTX_CACHE.lock().ok().and_then(|c| hit(&c)) {
        return Ok(p);
    }
    let ptx = Arc::new(compile_ptx(kernels, target)?);
    if let Ok(mut c) = PTX_CACHE.lock() {
        if c.len() >= PTX_CACHE_ENTRIES {
            c.remove(0);
        }
        c.push(CachedPtx {
            hash: key,
            kernels: kernels.to_vec(),
            ptx: ptx.clone(),
        });
    }
    Ok(ptx)
}

/// How many kernel sets [`compile_ptx_shared`] keeps.
pub const PTX_CACHE_ENTRIES: usize = 32;

struct CachedPtx {
    hash: u64,
    kernels: Vec<Kernel>,
    ptx: Arc<Ptx>,
}

static PTX_CACHE: Mutex<Vec<CachedPtx>> = Mutex::new(Vec::new());

/// A hash of the kernels' whole content (their debug form, streamed into the hasher).
fn content_hash(kernels: &[Kernel]) -> u64 {
    use std::fmt::Write as _;
    use std::hash::Hasher as _;
    struct Feed(std::collections::hash_map::DefaultHasher);
    impl std::fmt::Write for Feed {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut f = Feed(std::collections::hash_map::DefaultHasher::new());
    let _ = write!(f, "{kernels:?}");
    f.0.finish()
}

/// Checks and compiles kernels into one PTX module (one `.entry` each, in order).
pub fn compile_ptx(kernels: &[Kernel], target: Target) -> Result<Ptx, PtxError> {
    let (text, entries) = generate(kernels, target, true)?;
    Ok(Ptx {
        target,
        text,
        entries,
    })
}

/// The optimized LLVM IR of the kernels' module (for reading what a kernel becomes).
pub fn llvm_ir(kernels: &[Kernel], target: Target) -> Result<String, PtxError> {
    generate(kernels, target, false).map(|(text, _)| text)
}

fn generate(
    kernels: &[Kernel],
    target: Target,
    ptx: bool,
) -> Result<(String, Vec<String>), PtxError> {
    for k in kernels {
        k.check()?;
    }
    let tm = target_machine(target)?;
    let ctx = Context::create();
    let module = ctx.create_module("ma2mba");
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let names = entry_names(kernels);
    let mut fns = Vec::with_capacity(2 * kernels.len());
    for (k, name) in kernels.iter().zip(&names) {
        let mut entries = vec![(name.clone(), false)];
        if index32_pays(k) {
            entries.push((ir::kernel::index32_entry(name), true));
        }
        for (entry, index32) in entries {
            let f = build_kernel(&ctx, &module, k, &entry, index32).map_err(|e| match e {
                GenErr::Unsupported(message) => PtxError::Unsupported {
                    kernel: k.name.clone(),
                    message,
                },
                GenErr::Llvm(message) => PtxError::Llvm {
                    kernel: k.name.clone(),
                    message,
                },
            })?;
            annotate(&ctx, &module, (f, k), target);
            fns.push((k, f));
        }
    }
    if let Err(e) = module.verify() {
        let kernel = fns
            .iter()
            .find(|(_, f)| !f.verify(false))
            .map(|(k, _)| k.name.clone())
            .unwrap_or_default();
        return Err(PtxError::Llvm {
            kernel,
            message: format!("invalid IR: {e}"),
        });
    }
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(|e| PtxError::Setup(format!("optimization: {e}")))?;
    if !ptx {
        return Ok((module.print_to_string().to_string(), names));
    }
    let buf = tm
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| PtxError::Setup(format!("PTX emission: {e}")))?;
    let text = String::from_utf8_lossy(buf.as_slice())
        .trim_end_matches('\0')
        .to_string();
    Ok((text, names))
}

/// Whether a kernel gets a second entry with 32-bit index math: the tiled kernels, and
/// those whose lanes share a point and whose loops do not nest. Measured at H = 80,
/// L = 65536 on the H200 (i64 -> i32): the tiled forward 3.70 -> 3.27 ms, the gradient's
/// 2.28 -> 1.88, the carries 1.27-1.62 -> 0.94, `grad_dots` (a loop across lanes)
/// 1.69 -> 1.32. Others lost: elementwise kernels merged fewer neighbouring accesses into
/// vector ones after the sign extensions (`grad_x` 0.91 -> 1.70 ms), and `grad_dcb`, whose
/// lanes each walk an inner loop over heads, lost its strength-reduced addresses there
/// (1.37 -> 2.32 ms).
pub fn index32_pays(k: &Kernel) -> bool {
    fn depth(body: &[Stmt]) -> usize {
        body.iter()
            .map(|s| match s {
                Stmt::For { body, .. } => 1 + depth(body),
                Stmt::Each { body, .. } => depth(body),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }
    // A constant that i32 cannot hold (a large `ignore_index`) keeps a kernel on i64.
    let fits = k.max_index_const() < ir::kernel::INDEX32_LIMIT;
    fits && (ir::tile::is_tiled(k) || (ir::lanes::threads_per_point(k) > 1 && depth(&k.body) <= 1))
}

struct Types<'ctx> {
    f32: FloatType<'ctx>,
    f64: FloatType<'ctx>,
    f16: FloatType<'ctx>,
    i64: IntType<'ctx>,
    i32: IntType<'ctx>,
    i16: IntType<'ctx>,
    /// Index math's type: i64, or i32 in a kernel's 32-bit entry ([`ir::kernel::index32_entry`]).
    ix: IntType<'ctx>,
}

struct Gen<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    k: &'a Kernel,
    f: FunctionValue<'ctx>,
    b: Builder<'ctx>,
    /// Positioned at the end of the entry block (allocas); its branch is added last.
    ab: Builder<'ctx>,
    t: Types<'ctx>,
    bases: Vec<PointerValue<'ctx>>,
    sizes: Vec<IntValue<'ctx>>,
    grid: Vec<IntValue<'ctx>>,
    vars: HashMap<VarId, PointerValue<'ctx>>,
    loops: HashMap<LoopId, PointerValue<'ctx>>,
    arrs: HashMap<ArrId, (PointerValue<'ctx>, usize)>,
    /// The loops the lanes of a point share ([`ir::lanes`]); with any, a warp or a block
    /// runs each grid point.
    split: LaneSplit,
    /// This thread's lane (i64) when lanes share a point.
    lane: Option<IntValue<'ctx>>,
    /// Shared memory for combining reductions across the warps of a block.
    partials: Option<PointerValue<'ctx>>,
    /// A tiled kernel's tiles in its dynamic shared memory (`smem`).
    tiles: HashMap<TileId, TileSlot>,
    smem: Option<PointerValue<'ctx>>,
    /// Emitting an `Each`'s body (small constant `For`s are unrolled there).
    in_each: bool,
    /// A tiled kernel's shared and global accesses since its last barrier ([`Accesses`]).
    pending: Accesses,
    /// Emitting the body of a loop that is one statement to the syncing (`Gen::block`).
    nested: bool,
}

/// Whether `s` is a loop holding `Each`s or tile products: in a tiled kernel its statements
/// sync one by one (`Gen::block`), not as one statement.
fn syncs_inside(s: &Stmt) -> bool {
    match s {
        Stmt::For { body, .. } => body
            .iter()
            .any(|b| matches!(b, Stmt::Each { .. } | Stmt::Mma { .. }) || syncs_inside(b)),
        _ => false,
    }
}

/// What a tiled kernel's statements read and write: shared-memory byte ranges of tiles (by
/// `ir::tile::layout`, so tiles that share bytes conflict) and buffer slots. The threads of
/// a block wait at a barrier only before a statement that reads what the statements since
/// the last barrier wrote, or writes what they read or wrote: independent `Each`s (a tile
/// fill beside the staging of `a` and `dt`) run without one, and a block's warps overlap
/// their loads.
#[derive(Default)]
struct Accesses {
    tiles_read: Vec<(usize, usize)>,
    tiles_written: Vec<(usize, usize)>,
    bufs_read: Vec<usize>,
    bufs_written: Vec<usize>,
}

impl Accesses {
    fn of(stmts: &[Stmt], tiles: &HashMap<TileId, TileSlot>) -> Accesses {
        let mut a = Accesses::default();
        a.add_block(stmts, tiles);
        a
    }

    /// Index expressions are left out: the only buffers they read (`IExpr::LoadIndex`) are
    /// integer ones, which no kernel writes (`Kernel::check`).
    fn add_block(&mut self, stmts: &[Stmt], tiles: &HashMap<TileId, TileSlot>) {
        let range = |t: &TileId| {
            tiles.get(t).map(|s| {
                let bytes = ir::tile::tile_bytes(s.dtype, s.rows, s.cols);
                (s.offset, s.offset + bytes)
            })
        };
        for st in stmts {
            let mut exprs: Vec<&Expr> = Vec::new();
            match st {
                Stmt::Var { init: e, .. } | Stmt::Set { value: e, .. } => exprs.push(e),
                Stmt::ArrSet {
                    index: _, value, ..
                } => exprs.push(value),
                Stmt::Store { buf, value, .. } => {
                    self.bufs_written.push(*buf);
                    exprs.push(value);
                }
                Stmt::TileSet { tile, value, .. } => {
                    self.tiles_written.extend(range(tile));
                    exprs.push(value);
                }
                Stmt::Mma {
                    acc,
                    a,
                    b,
                    accumulate,
                } => {
                    self.tiles_read.extend(range(a).into_iter().chain(range(b)));
                    if *accumulate {
                        self.tiles_read.extend(range(acc));
                    }
                    self.tiles_written.extend(range(acc));
                }
                Stmt::For { body, .. } | Stmt::Each { body, .. } => self.add_block(body, tiles),
                Stmt::Array { .. } | Stmt::Tile { .. } => {}
            }
            for e in exprs {
                e.walk(&mut |x| match x {
                    Expr::Load { buf, .. } => self.bufs_read.push(*buf),
                    Expr::TileLoad { tile, .. } => self.tiles_read.extend(range(tile)),
                    _ => {}
                });
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.tiles_read.is_empty()
            && self.tiles_written.is_empty()
            && self.bufs_read.is_empty()
            && self.bufs_written.is_empty()
    }

    /// Whether `next` reads what `self` wrote or writes what `self` read or wrote.
    fn conflicts(&self, next: &Accesses) -> bool {
        let overlap = |a: &[(usize, usize)], b: &[(usize, usize)]| {
            a.iter().any(|x| b.iter().any(|y| x.0 < y.1 && y.0 < x.1))
        };
        let shared = |a: &[usize], b: &[usize]| a.iter().any(|x| b.contains(x));
        overlap(&self.tiles_written, &next.tiles_read)
            || overlap(&self.tiles_written, &next.tiles_written)
            || overlap(&self.tiles_read, &next.tiles_written)
            || shared(&self.bufs_written, &next.bufs_read)
            || shared(&self.bufs_written, &next.bufs_written)
            || shared(&self.bufs_read, &next.bufs_written)
    }

    fn extend(&mut self, other: Accesses) {
        self.tiles_read.extend(other.tiles_read);
        self.tiles_written.extend(other.tiles_written);
        self.bufs_read.extend(other.bufs_read);
        self.bufs_written.extend(other.bufs_written);
    }
}

fn build_kernel<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    k: &Kernel,
    name: &str,
    index32: bool,
) -> G<FunctionValue<'ctx>> {
    let t = Types {
        f32: ctx.f32_type(),
        f64: ctx.f64_type(),
        f16: ctx.f16_type(),
        i64: ctx.i64_type(),
        i32: ctx.i32_type(),
        i16: ctx.i16_type(),
        ix: if index32 {
            ctx.i32_type()
        } else {
            ctx.i64_type()
        },
    };
    let gptr = ctx.ptr_type(global());
    let mut params: Vec<inkwell::types::BasicMetadataTypeEnum> = Vec::new();
    params.extend(
        k.bufs
            .iter()
            .map(|_| inkwell::types::BasicMetadataTypeEnum::from(gptr)),
    );
    params.extend(
        k.sizes
            .iter()
            .map(|_| inkwell::types::BasicMetadataTypeEnum::from(t.i64)),
    );
    let fty = ctx.void_type().fn_type(&params, false);
    let f = module.add_function(name, fty, None);
    f.set_call_conventions(PTX_KERNEL_CC);
    // A kernel's buffers never overlap (the memory planner gives buffers used by one step
    // disjoint memory, and a buffer is one parameter however often the kernel uses it): with
    // `noalias` LLVM may move loads across stores to other buffers and keep several in
    // flight; read-only buffers may go through the non-coherent cache (`ld.global.nc`).
    let attr = |name: &str| {
        ctx.create_enum_attribute(
            inkwell::attributes::Attribute::get_named_enum_kind_id(name),
            0,
        )
    };
    for (i, kb) in k.bufs.iter().enumerate() {
        let at = inkwell::attributes::AttributeLoc::Param(i as u32);
        f.add_attribute(at, attr("noalias"));
        // Buffers start `BUF_ALIGN`-aligned (arena offsets, whole allocations; the runtime
        // checks at bind): LLVM may then merge a thread's neighbouring accesses into vector
        // ones (`ld.global.v4`).
        f.add_attribute(
            at,
            ctx.create_enum_attribute(
                inkwell::attributes::Attribute::get_named_enum_kind_id("align"),
                ir::kernel::BUF_ALIGN,
            ),
        );
        if !kb.writable {
            f.add_attribute(at, attr("readonly"));
        }
    }
    let entry = ctx.append_basic_block(f, "entry");
    let start = ctx.append_basic_block(f, "start");
    let b = ctx.create_builder();
    let ab = ctx.create_builder();
    ab.position_at_end(entry);
    b.position_at_end(start);
    let mut bases = Vec::new();
    for i in 0..k.bufs.len() {
        let p = f
            .get_nth_param(i as u32)
            .ok_or_else(|| GenErr::Llvm("missing parameter".into()))?;
        bases.push(p.into_pointer_value());
    }
    let mut sizes = Vec::new();
    for i in 0..k.sizes.len() {
        let p = f
            .get_nth_param((k.bufs.len() + i) as u32)
            .ok_or_else(|| GenErr::Llvm("missing parameter".into()))?;
        // The sizes stay i64 parameters in both entries (one launch code path).
        sizes.push(ab.build_int_truncate_or_bit_cast(p.into_int_value(), t.ix, "")?);
    }
    let mut g = Gen {
        ctx,
        module,
        k,
        f,
        b,
        ab,
        t,
        bases,
        sizes,
        grid: Vec::new(),
        vars: HashMap::new(),
        loops: HashMap::new(),
        arrs: HashMap::new(),
        split: lane_split(k),
        lane: None,
        partials: None,
        tiles: HashMap::new(),
        smem: None,
        in_each: false,
        pending: Accesses::default(),
        nested: false,
    };
    g.function()?;
    g.ab.build_unconditional_branch(start)?;
    Ok(f)
}

/// The most blocks per SM a tiled kernel asks for: 4 blocks of 256 threads leave 64
/// registers a thread. Asking for 6 (what the tiled carries' 32 KB would allow) capped
/// them at 40 registers, and they spilled.
const MAX_TILED_BLOCKS: usize = 4;

/// Launch bounds for ptxas (`nvvm.annotations`): every launch has [`ir::lanes::BLOCK`]
/// threads (`.maxntid`), and a tiled kernel asks for as many blocks per SM as its shared
/// memory allows (`.minnctapersm`), so that ptxas keeps its registers within what those
/// blocks leave: at 129 registers (the tiled forward's 32-bit entry once) one block fit an
/// SM where shared memory allowed two, and the kernel took 5.5 ms where it had taken 3.6.
fn annotate<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    (f, k): (FunctionValue<'ctx>, &Kernel),
    target: Target,
) {
    let i32t = ctx.i32_type();
    let add = |key: &str, v: u32| {
        let md = ctx.metadata_node(&[
            f.as_global_value().as_pointer_value().into(),
            ctx.metadata_string(key).into(),
            i32t.const_int(u64::from(v), false).into(),
        ]);
        // Fails only for a name that is not a named metadata's.
        let _ = module.add_global_metadata("nvvm.annotations", &md);
    };
    add("maxntidx", ir::lanes::BLOCK);
    if ir::tile::is_tiled(k) {
        let per_block = ir::tile::shared_bytes(k) + 1024;
        let blocks = (target.sm_shared_bytes() / per_block).clamp(1, MAX_TILED_BLOCKS);
        add("minctasm", blocks as u32);
    }
}

impl<'ctx> Gen<'_, 'ctx> {
    fn unsupported<T>(&self, m: String) -> G<T> {
        Err(GenErr::Unsupported(m))
    }

    fn ixc(&self, v: i64) -> IntValue<'ctx> {
        self.t.ix.const_int(v as u64, true)
    }

    fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.t.f32.const_float(f64::from(v))
    }

    fn intrinsic(
        &self,
        name: &str,
        ret: BasicTypeEnum<'ctx>,
        args: &[BasicTypeEnum<'ctx>],
    ) -> FunctionValue<'ctx> {
        if let Some(f) = self.module.get_function(name) {
            return f;
        }
        let params: Vec<inkwell::types::BasicMetadataTypeEnum> =
            args.iter().map(|a| (*a).into()).collect();
        self.module
            .add_function(name, ret.fn_type(&params, false), None)
    }

    fn call(
        &self,
        f: FunctionValue<'ctx>,
        args: &[BasicMetadataValueEnum<'ctx>],
    ) -> G<BasicValueEnum<'ctx>> {
        match self.b.build_call(f, args, "")?.try_as_basic_value() {
            ValueKind::Basic(v) => Ok(v),
            ValueKind::Instruction(_) => Err(GenErr::Llvm("call returns nothing".into())),
        }
    }

    fn sreg(&self, name: &str) -> G<IntValue<'ctx>> {
        let f = self.intrinsic(
            &format!("llvm.nvvm.read.ptx.sreg.{name}"),
            self.t.i32.into(),
            &[],
        );
        let v = self.call(f, &[])?.into_int_value();
        Ok(self.b.build_int_z_extend_or_bit_cast(v, self.t.ix, name)?)
    }

    fn alloca<T: BasicType<'ctx>>(&self, ty: T, name: &str) -> G<PointerValue<'ctx>> {
        Ok(self.ab.build_alloca(ty, name)?)
    }

    fn function(&mut self) -> G<()> {
        let k = self.k;
        let mut extents = Vec::with_capacity(k.grid.len());
        for g in &k.grid {
            extents.push(self.iexpr(g)?);
        }
        let mut total = self.ixc(1);
        for e in &extents {
            total = self.b.build_int_nsw_mul(total, *e, "total")?;
        }
        let ctaid = self.sreg("ctaid.x")?;
        let ntid = self.sreg("ntid.x")?;
        let tid = self.sreg("tid.x")?;
        let nctaid = self.sreg("nctaid.x")?;
        let first = self.b.build_int_nsw_mul(ctaid, ntid, "")?;
        let mut first = self.b.build_int_nsw_add(first, tid, "first")?;
        let mut stride = self.b.build_int_nsw_mul(nctaid, ntid, "stride")?;
        let threads = self.split.threads_per_point();
        if threads > 1 {
            // `threads` lanes per grid point (launch blocks are multiples of it, so a point's
            // lanes share a warp or are the whole block and take every branch together).
            let lanes = self.ixc(i64::from(threads));
            self.lane = Some(self.b.build_int_unsigned_rem(first, lanes, "lane")?);
            first = self.b.build_int_unsigned_div(first, lanes, "")?;
            stride = self.b.build_int_unsigned_div(stride, lanes, "")?;
        }
        if ir::tile::is_tiled(k) {
            // Dynamic shared memory (`extern __shared__`), sized at launch by
            // `ir::tile::shared_bytes`; every kernel's tiles start at its beginning.
            let name = "ma2mba_tiles";
            let g = match self.module.get_global(name) {
                Some(g) => g,
                None => {
                    let ty = self.ctx.i8_type().array_type(0);
                    let g = self
                        .module
                        .add_global(ty, Some(AddressSpace::from(3u16)), name);
                    g.set_linkage(inkwell::module::Linkage::External);
                    g.set_alignment(16);
                    g
                }
            };
            self.smem = Some(g.as_pointer_value());
            self.tiles = ir::tile::layout(k).0;
        } else if threads > WARP {
            let ty = self.t.f32.array_type(threads / WARP);
            let g = self.module.add_global(
                ty,
                Some(AddressSpace::from(3u16)),
                &format!("{}_partials", self.f.get_name().to_string_lossy()),
            );
            g.set_linkage(inkwell::module::Linkage::Internal);
            g.set_initializer(&ty.get_undef());
            self.partials = Some(g.as_pointer_value());
        }
        // Points per thread (consecutive along the last axis, whose constant extent they
        // divide): the loop below walks groups of them.
        let per = ir::lanes::points_per_thread(k);
        if per > 1 {
            total = self
                .b
                .build_int_unsigned_div(total, self.ixc(i64::from(per)), "groups")?;
        }
        let flat = self.alloca(self.t.ix, "flat")?;
        self.b.build_store(flat, first)?;
        let head = self.ctx.append_basic_block(self.f, "points");
        let body = self.ctx.append_basic_block(self.f, "point");
        let exit = self.ctx.append_basic_block(self.f, "exit");
        self.b.build_unconditional_branch(head)?;

        self.b.position_at_end(head);
        let p = self.b.build_load(self.t.ix, flat, "p")?.into_int_value();
        let more = self
            .b
            .build_int_compare(IntPredicate::SLT, p, total, "more")?;
        self.b.build_conditional_branch(more, body, exit)?;

        self.b.position_at_end(body);
        let dims = extents.len();
        let mut coords = vec![self.ixc(0); dims];
        let mut rest = if per > 1 {
            self.b.build_int_nsw_mul(p, self.ixc(i64::from(per)), "")?
        } else {
            p
        };
        for d in (0..dims).rev() {
            if d > 0 {
                coords[d] = self.b.build_int_unsigned_rem(rest, extents[d], "")?;
                rest = self.b.build_int_unsigned_div(rest, extents[d], "")?;
            } else {
                coords[d] = rest;
            }
        }
        // The body once per point of the group (straight-line code: no loop, no array).
        for u in 0..per {
            let mut at = coords.clone();
            if u > 0 {
                let last = dims - 1;
                at[last] = self
                    .b
                    .build_int_nsw_add(coords[last], self.ixc(i64::from(u)), "")?;
            }
            self.grid = at;
            self.block(&k.body)?;
        }
        // The next point's statements may touch what this one's still do.
        self.sync_pending()?;
        let p1 = self.b.build_int_nsw_add(p, stride, "")?;
        self.b.build_store(flat, p1)?;
        self.b.build_unconditional_branch(head)?;

        self.b.position_at_end(exit);
        self.b.build_return(None)?;
        Ok(())
    }

    /// In a tiled kernel, at the top level: a barrier first if `s` conflicts with what ran
    /// since the last one ([`Accesses`]); `s`'s accesses are then pending.
    fn sync_before(&mut self, s: &Stmt) -> G<()> {
        let next = Accesses::of(std::slice::from_ref(s), &self.tiles);
        if self.pending.conflicts(&next) {
            self.sync()?;
        }
        self.pending.extend(next);
        Ok(())
    }

    /// A barrier if anything is pending (a tiled kernel's loop back-edge, its next point).
    fn sync_pending(&mut self) -> G<()> {
        if self.smem.is_some() && !self.pending.is_empty() {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> G<()> {
        self.pending = Accesses::default();
        self.barrier()
    }

    fn block(&mut self, stmts: &[Stmt]) -> G<()> {
        let top = self.smem.is_some() && !self.in_each && !self.nested;
        for s in stmts {
            // What was pending before a loop of `Each`s, put back after it: the loop may run
            // no trips (after one or more, nothing is pending at its back-edge).
            let mut before_loop = None;
            if top && syncs_inside(s) {
                // Its statements sync one by one (below), and it starts after a barrier if
                // any of them conflicts with what is pending.
                let next = Accesses::of(std::slice::from_ref(s), &self.tiles);
                if self.pending.conflicts(&next) {
                    self.sync()?;
                }
                before_loop = Some(std::mem::take(&mut self.pending));
            } else if top {
                self.sync_before(s)?;
            }
            self.stmt(s, top)?;
            if let Some(p) = before_loop {
                self.pending.extend(p);
            }
        }
        Ok(())
    }

    /// One statement of a block; `top` as in [`Gen::block`] (at a tiled kernel's top level,
    /// where barriers go).
    fn stmt(&mut self, s: &Stmt, top: bool) -> G<()> {
        match s {
            Stmt::Var { var, init } => {
                let v = self.expr(init)?;
                let slot = match self.vars.get(var) {
                    Some(p) => *p,
                    None => {
                        let p = self.alloca(self.t.f32, &format!("v{}", var.0))?;
                        self.vars.insert(*var, p);
                        p
                    }
                };
                self.b.build_store(slot, v)?;
            }
            Stmt::Set { var, value } => {
                let v = self.expr(value)?;
                let Some(slot) = self.vars.get(var).copied() else {
                    return self.unsupported(format!("v{} undeclared", var.0));
                };
                self.b.build_store(slot, v)?;
            }
            Stmt::Array { arr, len, init } => {
                // A distributed array keeps only this lane's elements.
                let len = &if self.split.distributed.contains(arr) {
                    len.div_ceil(self.split.threads_per_point() as usize)
                } else {
                    *len
                };
                let n = u32::try_from(*len)
                    .map_err(|_| GenErr::Unsupported(format!("local array of {len}")))?;
                let ty = self.t.f32.array_type(n);
                let p = self.alloca(ty, &format!("a{}", arr.0))?;
                self.arrs.insert(*arr, (p, *len));
                let v = self.f32c(*init as f32);
                if *len <= 32 {
                    for i in 0..*len {
                        let a = self.arr_elem(p, self.ixc(i as i64))?;
                        self.b.build_store(a, v)?;
                    }
                } else {
                    let c = self.alloca(self.t.ix, "fill")?;
                    self.b.build_store(c, self.ixc(0))?;
                    let lp = self.ctx.append_basic_block(self.f, "fill");
                    let done = self.ctx.append_basic_block(self.f, "filled");
                    self.b.build_unconditional_branch(lp)?;
                    self.b.position_at_end(lp);
                    let i = self.b.build_load(self.t.ix, c, "")?.into_int_value();
                    let a = self.arr_elem(p, i)?;
                    self.b.build_store(a, v)?;
                    let i1 = self.b.build_int_nsw_add(i, self.ixc(1), "")?;
                    self.b.build_store(c, i1)?;
                    let more = self.b.build_int_compare(
                        IntPredicate::SLT,
                        i1,
                        self.ixc(*len as i64),
                        "",
                    )?;
                    self.b.build_conditional_branch(more, lp, done)?;
                    self.b.position_at_end(done);
                }
            }
            Stmt::ArrSet { arr, index, value } => {
                let a = self.arr_addr(*arr, index)?;
                let v = self.expr(value)?;
                self.b.build_store(a, v)?;
            }
            Stmt::For {
                counter,
                extent,
                body,
            } if self.split.loops.contains(counter) => self.split_for(*counter, extent, body)?,
            Stmt::For {
                counter,
                extent: IExpr::Const(n),
                body,
            } if self.in_each && (0..=UNROLL_FOR_MAX).contains(n) => {
                let c = self.alloca(self.t.ix, &format!("i{}", counter.0))?;
                let outer = self.loops.insert(*counter, c);
                for i in 0..*n {
                    self.b.build_store(c, self.ixc(i))?;
                    self.block(body)?;
                }
                match outer {
                    Some(o) => self.loops.insert(*counter, o),
                    None => self.loops.remove(counter),
                };
            }
            Stmt::For {
                counter,
                extent,
                body,
            } => {
                let n = self.iexpr(extent)?;
                let c = self.alloca(self.t.ix, &format!("i{}", counter.0))?;
                self.b.build_store(c, self.ixc(0))?;
                let lp = self.ctx.append_basic_block(self.f, "loop");
                let done = self.ctx.append_basic_block(self.f, "done");
                let any = self
                    .b
                    .build_int_compare(IntPredicate::SGT, n, self.ixc(0), "")?;
                self.b.build_conditional_branch(any, lp, done)?;
                self.b.position_at_end(lp);
                let outer = self.loops.insert(*counter, c);
                // A tiled kernel's loop of `Each`s syncs statement by statement, and at
                // its back-edge; any other loop is one statement to the syncing.
                let loop_syncs = top && syncs_inside(s);
                let nested = std::mem::replace(&mut self.nested, !loop_syncs);
                self.block(body)?;
                self.nested = nested;
                if loop_syncs {
                    self.sync_pending()?;
                }
                match outer {
                    Some(o) => self.loops.insert(*counter, o),
                    None => self.loops.remove(counter),
                };
                let i = self.b.build_load(self.t.ix, c, "")?.into_int_value();
                let i1 = self.b.build_int_nsw_add(i, self.ixc(1), "")?;
                self.b.build_store(c, i1)?;
                let more = self.b.build_int_compare(IntPredicate::SLT, i1, n, "")?;
                self.b.build_conditional_branch(more, lp, done)?;
                self.b.position_at_end(done);
            }
            Stmt::Store { buf, index, value } => {
                let dtype = self.dtype(*buf)?;
                if !dtype.is_float() {
                    return self.unsupported(format!(
                        "store to the integer buffer `{}`",
                        self.k.bufs[*buf].name
                    ));
                }
                let a = self.buf_addr(*buf, index)?;
                let v = self.expr(value)?;
                self.store(dtype, v, a)?;
            }
            // Laid out once for the whole kernel (`function`).
            Stmt::Tile { .. } => {}
            Stmt::Each {
                counters,
                extents,
                body,
            } => self.each(counters, extents, body)?,
            Stmt::TileSet {
                tile,
                row,
                col,
                value,
            } => {
                let (a, dtype) = self.tile_addr(*tile, row, col)?;
                let v = self.expr(value)?;
                self.store(dtype, v, a)?;
            }
            Stmt::Mma {
                acc,
                a,
                b,
                accumulate,
            } => self.mma((*acc, *a, *b), *accumulate)?,
        }
        Ok(())
    }

    fn tile_slot(&self, tile: TileId) -> G<TileSlot> {
        match self.tiles.get(&tile) {
            Some(s) => Ok(*s),
            None => self.unsupported(format!("tile t{} undeclared", tile.0)),
        }
    }

    /// The shared-memory address of element `[r, c]` of a tile.
    fn tile_elem(
        &self,
        s: TileSlot,
        r: IntValue<'ctx>,
        c: IntValue<'ctx>,
    ) -> G<PointerValue<'ctx>> {
        let Some(smem) = self.smem else {
            return self.unsupported("a tile in a kernel without shared memory".into());
        };
        let elem = self.ixc(s.dtype.size() as i64);
        let i = self
            .b
            .build_int_nsw_mul(r, self.ixc(s.row_stride as i64), "")?;
        let i = self.b.build_int_nsw_add(i, c, "")?;
        let bytes = self.b.build_int_nsw_mul(i, elem, "")?;
        let bytes = self
            .b
            .build_int_nsw_add(bytes, self.ixc(s.offset as i64), "")?;
        // SAFETY: an address inside the kernel's dynamic shared memory (indices in bounds
        // are the kernel IR's contract; the launch gives `ir::tile::shared_bytes`).
        Ok(unsafe {
            self.b
                .build_in_bounds_gep(self.ctx.i8_type(), smem, &[bytes], "")?
        })
    }

    fn tile_addr(
        &mut self,
        tile: TileId,
        row: &IExpr,
        col: &IExpr,
    ) -> G<(PointerValue<'ctx>, DType)> {
        let s = self.tile_slot(tile)?;
        let r = self.iexpr(row)?;
        let c = self.iexpr(col)?;
        Ok((self.tile_elem(s, r, c)?, s.dtype))
    }

    /// `Each`: the block's threads take the flattened iterations in turn (thread `l` runs
    /// `l, l + 256, ...`, the last counter fastest, so neighbouring threads touch
    /// neighbouring elements); a barrier follows where a later statement needs it
    /// (`Gen::sync_before`). A main loop runs several iterations per trip while all of them
    /// exist ([`EACH_UNROLL`], fewer for a body with unrolled runs: [`EACH_RUN_BUDGET`]), so
    /// that each thread has that many independent loads in flight (a block per point leaves
    /// few warps per SM to hide latency); a remainder loop runs the rest one by one.
    fn each(&mut self, counters: &[LoopId], extents: &[IExpr], body: &[Stmt]) -> G<()> {
        let Some(lane) = self.lane else {
            return self.unsupported("an Each outside a tiled kernel".into());
        };
        let threads = i64::from(ir::tile::TILE_THREADS);
        let mut ext = Vec::with_capacity(extents.len());
        for e in extents {
            ext.push(self.iexpr(e)?);
        }
        let mut total = self.ixc(1);
        for e in &ext {
            total = self.b.build_int_nsw_mul(total, *e, "")?;
        }
        let flat = self.alloca(self.t.ix, "each")?;
        self.b.build_store(flat, lane)?;
        let slots: Vec<PointerValue<'ctx>> = counters
            .iter()
            .map(|c| self.alloca(self.t.ix, &format!("i{}", c.0)))
            .collect::<G<_>>()?;
        let outer: Vec<_> = counters
            .iter()
            .zip(&slots)
            .map(|(c, p)| self.loops.insert(*c, *p))
            .collect();
        // A body with unrolled runs of elements (`UNROLL_FOR_MAX`) is that much larger: fewer
        // copies of it per trip (`EACH_RUN_BUDGET`) keep the loads of a tile fill in flight
        // together without spilling.
        let copies = if unrolled_weight(body) > 1 {
            // At most the full trips there are, else the main loop never runs.
            let full_trips = match extents.iter().try_fold(1i64, |n, e| match e {
                IExpr::Const(c) => n.checked_mul(*c),
                _ => None,
            }) {
                Some(total) => total / threads,
                None => EACH_UNROLL,
            };
            (EACH_RUN_BUDGET / body_cost(body).max(1)).clamp(1, full_trips.clamp(1, EACH_UNROLL))
        } else {
            EACH_UNROLL
        };
        let loops: &[i64] = if copies > 1 { &[copies, 1] } else { &[1] };
        for &unroll in loops {
            let head = self.ctx.append_basic_block(self.f, "each");
            let next = self.ctx.append_basic_block(self.f, "each_body");
            let done = self.ctx.append_basic_block(self.f, "each_done");
            self.b.build_unconditional_branch(head)?;
            self.b.position_at_end(head);
            let f = self.b.build_load(self.t.ix, flat, "")?.into_int_value();
            let last = self
                .b
                .build_int_nsw_add(f, self.ixc((unroll - 1) * threads), "")?;
            let more = self
                .b
                .build_int_compare(IntPredicate::SLT, last, total, "")?;
            self.b.build_conditional_branch(more, next, done)?;
            self.b.position_at_end(next);
            for u in 0..unroll {
                let mut rest = self.b.build_int_nsw_add(f, self.ixc(u * threads), "")?;
                for d in (0..ext.len()).rev() {
                    let v = if d > 0 {
                        let v = self.b.build_int_unsigned_rem(rest, ext[d], "")?;
                        rest = self.b.build_int_unsigned_div(rest, ext[d], "")?;
                        v
                    } else {
                        rest
                    };
                    self.b.build_store(slots[d], v)?;
                }
                let outer = std::mem::replace(&mut self.in_each, true);
                self.block(body)?;
                self.in_each = outer;
            }
            let f1 = self
                .b
                .build_int_nsw_add(f, self.ixc(unroll * threads), "")?;
            self.b.build_store(flat, f1)?;
            self.b.build_unconditional_branch(head)?;
            self.b.position_at_end(done);
        }
        for (c, o) in counters.iter().zip(outer) {
            match o {
                Some(o) => self.loops.insert(*c, o),
                None => self.loops.remove(c),
            };
        }
        // What it wrote is pending: the next statement that touches it waits at a barrier
        // (`Gen::sync_before`).
        Ok(())
    }

    /// `acc (+)= a bᵀ` on the tensor cores (`mma.sync.m16n8k16`, bf16 in, f32 accumulate).
    /// Each warp takes output blocks of `16·mt x 8·nt` in turn and keeps them in registers
    /// over the whole depth; operand fragments come from `ldmatrix` (four 8x8 matrices per
    /// instruction, where a tile's rows start on 16 bytes; else 32-bit shared loads of two
    /// neighbouring `k` elements; both tiles are `k`-contiguous, as `row.col` wants).
    /// Fragment layout (PTX ISA, `m16n8k16` bf16): lane `l`, `g = l / 4`, `t = l % 4`; A
    /// registers hold rows `g`, `g + 8` at columns `2t`, `2t + 8` (pairs); B registers hold
    /// columns `2t`, `2t + 8` (pairs along `k`) of output column `g`; C/D hold row `g`
    /// (then `g + 8`), columns `2t, 2t + 1`.
    fn mma(&mut self, (acc, a, b): (TileId, TileId, TileId), accumulate: bool) -> G<()> {
        let Some(lane) = self.lane else {
            return self.unsupported("a tile product outside a tiled kernel".into());
        };
        let (cs, as_, bs) = (self.tile_slot(acc)?, self.tile_slot(a)?, self.tile_slot(b)?);
        let (m, n, depth) = (cs.rows as i64, cs.cols as i64, as_.cols as i64);
        let mt: i64 = if m % 32 == 0 { 2 } else { 1 };
        let nt: i64 = [4, 2, 1]
            .into_iter()
            .find(|x| n % (8 * x) == 0)
            .unwrap_or(1);
        let tiles_n = n / (8 * nt);
        let blocks = (m / (16 * mt)) * tiles_n;
        let warps = i64::from(ir::tile::TILE_THREADS / WARP);
        let c = |v: i64| self.ixc(v);
        let b = &self.b;
        let warp = b.build_int_unsigned_div(lane, c(i64::from(WARP)), "warp")?;
        let l = b.build_int_unsigned_rem(lane, c(i64::from(WARP)), "")?;
        let g = b.build_int_unsigned_div(l, c(4), "g")?;
        let t2 = b.build_int_nsw_mul(b.build_int_unsigned_rem(l, c(4), "")?, c(2), "t2")?;
        // `ldmatrix.x4`: lanes 8q..8q+7 give the rows of 8x8 matrix q, and register q of lane
        // `l` gets row `l / 4`, columns `2(l % 4)`, `+1` of it: an A fragment is matrices
        // (rows 0-7 | 8-15) x (k 0-7 | 8-15) in the order a0..a3; two B fragments (output
        // columns 0-7 and 8-15) are (columns) x (k 0-7 | 8-15). Rows must start on 16 bytes.
        let q = b.build_int_unsigned_div(l, c(8), "q")?;
        let r8 = b.build_int_unsigned_rem(l, c(8), "r8")?;
        let q_lo = b.build_int_nsw_mul(b.build_int_unsigned_rem(q, c(2), "")?, c(8), "")?;
        let q_hi = b.build_int_nsw_mul(b.build_int_unsigned_div(q, c(2), "")?, c(8), "")?;
        let (a_row, a_col) = (b.build_int_nsw_add(r8, q_lo, "a_row")?, q_hi);
        let (b_col, b_k) = (b.build_int_nsw_add(r8, q_hi, "b_col")?, q_lo);
        let aligned = |s: &TileSlot| {
            s.dtype == DType::BF16
                && (s.row_stride * 2).is_multiple_of(16)
                && s.offset.is_multiple_of(16)
        };
        let ldm_a = aligned(&as_);
        let ldm_b = aligned(&bs) && nt % 2 == 0;

        let f32t = self.t.f32;
        let i32t = self.t.i32;
        let ret = self
            .ctx
            .struct_type(&[f32t.into(), f32t.into(), f32t.into(), f32t.into()], false);
        let mut args: Vec<BasicTypeEnum> = vec![i32t.into(); 6];
        args.extend([BasicTypeEnum::from(f32t); 4]);
        let intr = self.intrinsic("llvm.nvvm.mma.m16n8k16.row.col.bf16", ret.into(), &args);
        let ret4 = self.ctx.struct_type(&[i32t.into(); 4], false);
        let shared = self.ctx.ptr_type(AddressSpace::from(3u16));
        let ldmatrix = self.intrinsic(
            "llvm.nvvm.ldmatrix.sync.aligned.m8n8.x4.b16.p3",
            ret4.into(),
            &[shared.into()],
        );
        let regs = (mt * nt * 4) as usize;
        let accs: Vec<PointerValue<'ctx>> = (0..regs)
            .map(|i| self.alloca(f32t, &format!("acc{i}")))
            .collect::<G<_>>()?;

        // for (bi = warp; bi < blocks; bi += warps)
        let bi = self.alloca(self.t.ix, "mma_block")?;
        self.b.build_store(bi, warp)?;
        let head = self.ctx.append_basic_block(self.f, "mma");
        let body = self.ctx.append_basic_block(self.f, "mma_block");
        let done = self.ctx.append_basic_block(self.f, "mma_done");
        self.b.build_unconditional_branch(head)?;
        self.b.position_at_end(head);
        let blk = self.b.build_load(self.t.ix, bi, "")?.into_int_value();
        let more = self
            .b
            .build_int_compare(IntPredicate::SLT, blk, c(blocks), "")?;
        self.b.build_conditional_branch(more, body, done)?;
        self.b.position_at_end(body);
        let row0 = self.b.build_int_unsigned_div(blk, c(tiles_n), "")?;
        let row0 = self.b.build_int_nsw_mul(row0, c(16 * mt), "row0")?;
        let col0 = self.b.build_int_unsigned_rem(blk, c(tiles_n), "")?;
        let col0 = self.b.build_int_nsw_mul(col0, c(8 * nt), "col0")?;
        // The accumulator registers: acc[(mi * nt + ni) * 4 + r].
        let at = |i: i64, j: i64| -> G<(IntValue<'ctx>, IntValue<'ctx>)> {
            let r = self
                .b
                .build_int_nsw_add(row0, self.b.build_int_nsw_add(g, c(i), "")?, "")?;
            let cc = self
                .b
                .build_int_nsw_add(col0, self.b.build_int_nsw_add(t2, c(j), "")?, "")?;
            Ok((r, cc))
        };
        for mi in 0..mt {
            for ni in 0..nt {
                for r in 0..4 {
                    let v = if accumulate {
                        let (row, col) = at(16 * mi + 8 * (r / 2), 8 * ni + (r % 2))?;
                        let p = self.tile_elem(cs, row, col)?;
                        self.b.build_load(f32t, p, "")?.into_float_value()
                    } else {
                        self.f32c(0.0)
                    };
                    self.b
                        .build_store(accs[((mi * nt + ni) * 4 + r) as usize], v)?;
                }
            }
        }
        // for (k0 = 0; k0 < depth; k0 += 16)
        let kc = self.alloca(self.t.ix, "mma_k")?;
        self.b.build_store(kc, c(0))?;
        let kloop = self.ctx.append_basic_block(self.f, "mma_k");
        let kdone = self.ctx.append_basic_block(self.f, "mma_k_done");
        self.b.build_unconditional_branch(kloop)?;
        self.b.position_at_end(kloop);
        let k0 = self.b.build_load(self.t.ix, kc, "")?.into_int_value();
        let word = |s: TileSlot, r: IntValue<'ctx>, kk: i64| -> G<IntValue<'ctx>> {
            let col = self
                .b
                .build_int_nsw_add(k0, self.b.build_int_nsw_add(t2, c(kk), "")?, "")?;
            let p = self.tile_elem(s, r, col)?;
            Ok(self.b.build_load(i32t, p, "")?.into_int_value())
        };
        let ldm = |s: TileSlot, r: IntValue<'ctx>, col: IntValue<'ctx>| -> G<[IntValue<'ctx>; 4]> {
            let col = self.b.build_int_nsw_add(k0, col, "")?;
            let p = self.tile_elem(s, r, col)?;
            let v = self.call(ldmatrix, &[p.into()])?.into_struct_value();
            let mut out = [i32t.const_zero(); 4];
            for (i, o) in out.iter_mut().enumerate() {
                *o = self
                    .b
                    .build_extract_value(v, i as u32, "")?
                    .into_int_value();
            }
            Ok(out)
        };
        let mut afr = Vec::new();
        for mi in 0..mt {
            let base = self.b.build_int_nsw_add(row0, c(16 * mi), "")?;
            if ldm_a {
                let r = self.b.build_int_nsw_add(base, a_row, "")?;
                afr.push(ldm(as_, r, a_col)?);
                continue;
            }
            let r0 = self.b.build_int_nsw_add(base, g, "")?;
            let r8 = self.b.build_int_nsw_add(r0, c(8), "")?;
            afr.push([
                word(as_, r0, 0)?,
                word(as_, r8, 0)?,
                word(as_, r0, 8)?,
                word(as_, r8, 8)?,
            ]);
        }
        let mut bfr = Vec::new();
        if ldm_b {
            for pair in 0..nt / 2 {
                let base = self.b.build_int_nsw_add(col0, c(16 * pair), "")?;
                let col = self.b.build_int_nsw_add(base, b_col, "")?;
                let [b0, b1, b2, b3] = ldm(bs, col, b_k)?;
                bfr.extend([[b0, b1], [b2, b3]]);
            }
        } else {
            for ni in 0..nt {
                let col = self.b.build_int_nsw_add(
                    col0,
                    self.b.build_int_nsw_add(g, c(8 * ni), "")?,
                    "",
                )?;
                bfr.push([word(bs, col, 0)?, word(bs, col, 8)?]);
            }
        }
        for mi in 0..mt {
            for ni in 0..nt {
                let base = ((mi * nt + ni) * 4) as usize;
                let mut call: Vec<BasicMetadataValueEnum> = Vec::with_capacity(10);
                call.extend(
                    afr[mi as usize]
                        .iter()
                        .map(|v| BasicMetadataValueEnum::from(*v)),
                );
                call.extend(
                    bfr[ni as usize]
                        .iter()
                        .map(|v| BasicMetadataValueEnum::from(*v)),
                );
                for r in 0..4 {
                    let v = self.b.build_load(f32t, accs[base + r], "")?;
                    call.push(v.into());
                }
                let d = self.call(intr, &call)?.into_struct_value();
                for r in 0..4 {
                    let v = self.b.build_extract_value(d, r as u32, "")?;
                    self.b.build_store(accs[base + r], v)?;
                }
            }
        }
        let k1 = self.b.build_int_nsw_add(k0, c(16), "")?;
        self.b.build_store(kc, k1)?;
        let kmore = self
            .b
            .build_int_compare(IntPredicate::SLT, k1, c(depth), "")?;
        self.b.build_conditional_branch(kmore, kloop, kdone)?;
        self.b.position_at_end(kdone);
        for mi in 0..mt {
            for ni in 0..nt {
                for r in 0..4 {
                    let (row, col) = at(16 * mi + 8 * (r / 2), 8 * ni + (r % 2))?;
                    let p = self.tile_elem(cs, row, col)?;
                    let v = self
                        .b
                        .build_load(f32t, accs[((mi * nt + ni) * 4 + r) as usize], "")?;
                    self.b.build_store(p, v)?;
                }
            }
        }
        let blk1 = self.b.build_int_nsw_add(blk, c(warps), "")?;
        self.b.build_store(bi, blk1)?;
        self.b.build_unconditional_branch(head)?;
        self.b.position_at_end(done);
        // `acc` is pending, as after an `Each`.
        Ok(())
    }

    /// A loop the `T` lanes of a point share (a warp or a block): lane `l` runs iterations
    /// `l, l + T, ...`; each reduction starts from its identity in every lane and is combined
    /// across the lanes by a butterfly (and across warps through shared memory; every lane
    /// ends with the same bits), then folded into the value the scalar had before the loop.
    /// A warp or block barrier makes the loop's stores visible to all lanes before what
    /// follows.
    fn split_for(&mut self, counter: LoopId, extent: &IExpr, body: &[Stmt]) -> G<()> {
        let Some(lane) = self.lane else {
            return self.unsupported("a split loop in a kernel without lanes".into());
        };
        let threads = self.split.threads_per_point();
        let reds = self
            .split
            .reductions
            .get(&counter)
            .cloned()
            .unwrap_or_default();
        let mut before = Vec::with_capacity(reds.len());
        for (v, op) in &reds {
            let Some(slot) = self.vars.get(v).copied() else {
                return self.unsupported(format!("v{} undeclared", v.0));
            };
            before.push(self.b.build_load(self.t.f32, slot, "")?.into_float_value());
            let identity = match op {
                BinaryOp::Max => f32::NEG_INFINITY,
                BinaryOp::Min => f32::INFINITY,
                _ => 0.0,
            };
            self.b.build_store(slot, self.f32c(identity))?;
        }
        let n = self.iexpr(extent)?;
        let step = i64::from(threads);
        let c = self.alloca(self.t.ix, &format!("i{}", counter.0))?;
        self.b.build_store(c, lane)?;
        let outer = self.loops.insert(counter, c);
        // Unrolled by SPLIT_UNROLL (same order of iterations in a lane): the copies' loads
        // sit in one block, so they can be issued before the first result is needed.
        let main = self.ctx.append_basic_block(self.f, "lanes_unrolled_check");
        let main_body = self.ctx.append_basic_block(self.f, "lanes_unrolled");
        let rest = self.ctx.append_basic_block(self.f, "lanes_check");
        let rest_body = self.ctx.append_basic_block(self.f, "lanes");
        let done = self.ctx.append_basic_block(self.f, "lanes_done");
        self.b.build_unconditional_branch(main)?;
        self.b.position_at_end(main);
        let i = self.b.build_load(self.t.ix, c, "")?.into_int_value();
        let last = self
            .b
            .build_int_nsw_add(i, self.ixc((SPLIT_UNROLL - 1) * step), "")?;
        let fits = self.b.build_int_compare(IntPredicate::SLT, last, n, "")?;
        self.b.build_conditional_branch(fits, main_body, rest)?;
        self.b.position_at_end(main_body);
        for u in 0..SPLIT_UNROLL {
            let iu = self.b.build_int_nsw_add(i, self.ixc(u * step), "")?;
            self.b.build_store(c, iu)?;
            self.block(body)?;
        }
        let next = self
            .b
            .build_int_nsw_add(i, self.ixc(SPLIT_UNROLL * step), "")?;
        self.b.build_store(c, next)?;
        self.b.build_unconditional_branch(main)?;
        self.b.position_at_end(rest);
        let i = self.b.build_load(self.t.ix, c, "")?.into_int_value();
        let more = self.b.build_int_compare(IntPredicate::SLT, i, n, "")?;
        self.b.build_conditional_branch(more, rest_body, done)?;
        self.b.position_at_end(rest_body);
        self.block(body)?;
        let i = self.b.build_load(self.t.ix, c, "")?.into_int_value();
        let i1 = self.b.build_int_nsw_add(i, self.ixc(step), "")?;
        self.b.build_store(c, i1)?;
        self.b.build_unconditional_branch(rest)?;
        self.b.position_at_end(done);
        match outer {
            Some(o) => self.loops.insert(counter, o),
            None => self.loops.remove(&counter),
        };
        let full = self.t.i32.const_int(u64::from(u32::MAX), false);
        let shfl = self.intrinsic(
            "llvm.nvvm.shfl.sync.bfly.f32",
            self.t.f32.into(),
            &[
                self.t.i32.into(),
                self.t.f32.into(),
                self.t.i32.into(),
                self.t.i32.into(),
            ],
        );
        for ((v, op), v0) in reds.iter().zip(before) {
            let slot = self.vars[v];
            let mut x = self.b.build_load(self.t.f32, slot, "")?.into_float_value();
            let mut m = WARP / 2;
            while m > 0 {
                let y = self
                    .call(
                        shfl,
                        &[
                            full.into(),
                            x.into(),
                            self.t.i32.const_int(u64::from(m), false).into(),
                            self.t.i32.const_int(31, false).into(),
                        ],
                    )?
                    .into_float_value();
                x = self.binary(*op, x, y)?;
                m /= 2;
            }
            if threads > WARP {
                x = self.across_warps(*op, x, lane, threads)?;
            }
            let total = self.binary(*op, v0, x)?;
            self.b.build_store(slot, total)?;
        }
        if threads > WARP {
            self.barrier()?;
        } else {
            self.void_intrinsic("llvm.nvvm.bar.warp.sync", &[full])?;
        }
        Ok(())
    }

    /// Combines a warp-reduced value across the warps of a block: each warp's first lane
    /// writes it to shared memory; after a barrier every lane folds the partials in warp
    /// order (the same bits everywhere); a second barrier frees the slots for reuse.
    fn across_warps(
        &mut self,
        op: BinaryOp,
        x: FloatValue<'ctx>,
        lane: IntValue<'ctx>,
        threads: u32,
    ) -> G<FloatValue<'ctx>> {
        let Some(partials) = self.partials else {
            return self.unsupported("no shared memory for a block reduction".into());
        };
        let warp = self.ixc(i64::from(WARP));
        let w = self.b.build_int_unsigned_div(lane, warp, "warp")?;
        let l = self.b.build_int_unsigned_rem(lane, warp, "")?;
        let first = self
            .b
            .build_int_compare(IntPredicate::EQ, l, self.ixc(0), "")?;
        let write = self.ctx.append_basic_block(self.f, "partial");
        let written = self.ctx.append_basic_block(self.f, "partial_done");
        self.b.build_conditional_branch(first, write, written)?;
        self.b.position_at_end(write);
        let a = self.shared_elem(partials, threads, w)?;
        self.b.build_store(a, x)?;
        self.b.build_unconditional_branch(written)?;
        self.b.position_at_end(written);
        self.barrier()?;
        let a = self.shared_elem(partials, threads, self.ixc(0))?;
        let mut acc = self.b.build_load(self.t.f32, a, "")?.into_float_value();
        for i in 1..threads / WARP {
            let a = self.shared_elem(partials, threads, self.ixc(i64::from(i)))?;
            let y = self.b.build_load(self.t.f32, a, "")?.into_float_value();
            acc = self.binary(op, acc, y)?;
        }
        self.barrier()?;
        Ok(acc)
    }

    fn shared_elem(
        &self,
        p: PointerValue<'ctx>,
        threads: u32,
        i: IntValue<'ctx>,
    ) -> G<PointerValue<'ctx>> {
        let ty = self.t.f32.array_type(threads / WARP);
        // SAFETY: `i` < threads / WARP, inside the array.
        Ok(unsafe { self.b.build_in_bounds_gep(ty, p, &[self.ixc(0), i], "")? })
    }

    /// `bar.sync 0`: every thread of the block, with memory ordering among them.
    fn barrier(&self) -> G<()> {
        self.void_intrinsic("llvm.nvvm.barrier0", &[])
    }

    /// Calls an intrinsic that returns nothing and takes i32 arguments (the barriers).
    fn void_intrinsic(&self, name: &str, args: &[IntValue<'ctx>]) -> G<()> {
        let f = match self.module.get_function(name) {
            Some(f) => f,
            None => {
                let params: Vec<inkwell::types::BasicMetadataTypeEnum> =
                    args.iter().map(|_| self.t.i32.into()).collect();
                let ty = self.ctx.void_type().fn_type(&params, false);
                self.module.add_function(name, ty, None)
            }
        };
        let vals: Vec<BasicMetadataValueEnum> = args.iter().map(|&a| a.into()).collect();
        self.b.build_call(f, &vals, "")?;
        Ok(())
    }

    fn dtype(&self, buf: usize) -> G<DType> {
        match self.k.bufs.get(buf) {
            Some(b) => Ok(b.dtype),
            None => self.unsupported(format!("unknown buffer {buf}")),
        }
    }

    fn elem_type(&self, d: DType) -> BasicTypeEnum<'ctx> {
        match d {
            DType::F32 => self.t.f32.into(),
            DType::F64 => self.t.f64.into(),
            DType::F16 => self.t.f16.into(),
            DType::BF16 => self.t.i16.into(),
            DType::I32 => self.t.i32.into(),
            DType::I64 => self.t.i64.into(),
        }
    }

    fn buf_addr(&mut self, buf: usize, index: &IExpr) -> G<PointerValue<'ctx>> {
        let ty = self.elem_type(self.dtype(buf)?);
        let i = self.iexpr(index)?;
        let Some(base) = self.bases.get(buf).copied() else {
            return self.unsupported(format!("unknown buffer {buf}"));
        };
        // SAFETY: `gep` only computes an address (no `inbounds`, so no poison if the
        // computation leaves the buffer); indices in bounds are the kernel IR's contract.
        Ok(unsafe { self.b.build_gep(ty, base, &[i], "")? })
    }

    fn arr_elem(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> G<PointerValue<'ctx>> {
        // SAFETY: as in `buf_addr`.
        Ok(unsafe { self.b.build_gep(self.t.f32, p, &[i], "")? })
    }

    fn arr_addr(&mut self, arr: ArrId, index: &IExpr) -> G<PointerValue<'ctx>> {
        let Some((p, _)) = self.arrs.get(&arr).copied() else {
            return self.unsupported(format!("local array a{} undeclared", arr.0));
        };
        let mut i = self.iexpr(index)?;
        if self.split.distributed.contains(&arr) {
            // Element `i` is slot `i / T` of lane `i % T`.
            let t = self.ixc(i64::from(self.split.threads_per_point()));
            i = self.b.build_int_unsigned_div(i, t, "slot")?;
        }
        self.arr_elem(p, i)
    }

    fn load(&mut self, dtype: DType, a: PointerValue<'ctx>) -> G<FloatValue<'ctx>> {
        let b = &self.b;
        let ty = self.elem_type(dtype);
        let x = b.build_load(ty, a, "")?;
        Ok(match dtype {
            DType::F32 => x.into_float_value(),
            DType::F64 => b.build_float_trunc(x.into_float_value(), self.t.f32, "")?,
            DType::F16 => b.build_float_ext(x.into_float_value(), self.t.f32, "")?,
            DType::BF16 => {
                let w = b.build_int_z_extend(x.into_int_value(), self.t.i32, "")?;
                let w = b.build_left_shift(w, self.t.i32.const_int(16, false), "")?;
                b.build_bit_cast(w, self.t.f32, "")?.into_float_value()
            }
            DType::I32 | DType::I64 => {
                b.build_signed_int_to_float(x.into_int_value(), self.t.f32, "")?
            }
        })
    }

    fn store(&mut self, dtype: DType, v: FloatValue<'ctx>, a: PointerValue<'ctx>) -> G<()> {
        let b = &self.b;
        match dtype {
            DType::F32 => {
                b.build_store(a, v)?;
            }
            DType::F64 => {
                let x = b.build_float_ext(v, self.t.f64, "")?;
                b.build_store(a, x)?;
            }
            DType::F16 => {
                let x = b.build_float_trunc(v, self.t.f16, "")?;
                b.build_store(a, x)?;
            }
            DType::BF16 => {
                // `cvt.rn.bf16.f32` (sm_80 and later): round to nearest even, as the CPU
                // backend's integer rounding, in one instruction where that took nine; a
                // NaN becomes the canonical bf16 NaN (the CPU keeps its payload, quieted).
                let x = b.build_float_trunc(v, self.ctx.bf16_type(), "")?;
                b.build_store(a, x)?;
            }
            DType::I32 | DType::I64 => {
                return self.unsupported("store to an integer buffer".into());
            }
        }
        Ok(())
    }

    fn expr(&mut self, e: &Expr) -> G<FloatValue<'ctx>> {
        Ok(match e {
            Expr::Const(x) => self.f32c(*x as f32),
            Expr::Var(v) => {
                let Some(p) = self.vars.get(v).copied() else {
                    return self.unsupported(format!("v{} undeclared", v.0));
                };
                self.b.build_load(self.t.f32, p, "")?.into_float_value()
            }
            Expr::Load { buf, index } => {
                let dtype = self.dtype(*buf)?;
                let a = self.buf_addr(*buf, index)?;
                self.load(dtype, a)?
            }
            Expr::ArrLoad { arr, index } => {
                let a = self.arr_addr(*arr, index)?;
                self.b.build_load(self.t.f32, a, "")?.into_float_value()
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a)?;
                self.unary(*op, x)?
            }
            Expr::Binary(op, a, c) => {
                let x = self.expr(a)?;
                let y = self.expr(c)?;
                self.binary(*op, x, y)?
            }
            Expr::TileLoad { tile, row, col } => {
                let (a, dtype) = self.tile_addr(*tile, row, col)?;
                self.load(dtype, a)?
            }
            Expr::FromIndex(i) => {
                let i = self.iexpr(i)?;
                self.b.build_signed_int_to_float(i, self.t.f32, "")?
            }
        })
    }

    fn sqrt(&self, x: FloatValue<'ctx>) -> G<FloatValue<'ctx>> {
        let ty = x.get_type();
        let name = if ty == self.t.f64 {
            "llvm.sqrt.f64"
        } else {
            "llvm.sqrt.f32"
        };
        let f = self.intrinsic(name, ty.into(), &[ty.into()]);
        Ok(self.call(f, &[x.into()])?.into_float_value())
    }

    /// Runs one of [`math`]'s f64 algorithms on an f32 value and rounds the result once.
    fn via_f64(
        &self,
        x: FloatValue<'ctx>,
        f: fn(&mut Emit<'_, 'ctx>, FloatValue<'ctx>) -> FloatValue<'ctx>,
    ) -> G<FloatValue<'ctx>> {
        let d = self.b.build_float_ext(x, self.t.f64, "")?;
        let mut em = Emit {
            b: &self.b,
            f64: self.t.f64,
            i64: self.t.i64,
            err: None,
        };
        let r = f(&mut em, d);
        if let Some(e) = em.err {
            return Err(GenErr::Llvm(e.to_string()));
        }
        Ok(self.b.build_float_trunc(r, self.t.f32, "")?)
    }

    fn unary(&mut self, op: UnaryOp, x: FloatValue<'ctx>) -> G<FloatValue<'ctx>> {
        let b = &self.b;
        Ok(match op {
            UnaryOp::Neg => b.build_float_neg(x, "")?,
            // Tiled kernels take the hardware's `ex2.approx` (2 ulp; their tile products
            // differ from the CPU's in summation order anyway): the inline `exp` was a third
            // of the SSD gradient kernel's instructions.
            UnaryOp::Exp if self.smem.is_some() => self.exp_fast(x)?,
            UnaryOp::Exp => self.exp_inline(x)?,
            UnaryOp::Log => self.via_f64(x, |o, v| math::log(o, v))?,
            UnaryOp::Softplus => self.via_f64(x, |o, v| math::softplus(o, v))?,
            UnaryOp::Sqrt => self.sqrt(x)?,
            UnaryOp::Rsqrt => {
                let d = b.build_float_ext(x, self.t.f64, "")?;
                let s = self.sqrt(d)?;
                let r = self.b.build_float_div(self.t.f64.const_float(1.0), s, "")?;
                self.b.build_float_trunc(r, self.t.f32, "")?
            }
            UnaryOp::Recip => b.build_float_div(self.f32c(1.0), x, "")?,
            UnaryOp::Silu => {
                let sg = self.sigmoid_inline(x)?;
                self.b.build_float_mul(x, sg, "")?
            }
            UnaryOp::Sigmoid => self.sigmoid_inline(x)?,
        })
    }

    /// `exp(x)` as `2^(x log2 e)` with `ex2.approx.ftz.f32`: relative error about 2^-22 where
    /// `|x log2 e|` is small, growing with the rounding of `x log2 e` (a few ulps at
    /// `|x| ~ 80`); results below 2^-126 flush to zero.
    fn exp_fast(&self, x: FloatValue<'ctx>) -> G<FloatValue<'ctx>> {
        let t = self
            .b
            .build_float_mul(x, self.f32c(std::f32::consts::LOG2_E), "")?;
        let f32t = self.t.f32;
        let ex2 = self.intrinsic("llvm.nvvm.ex2.approx.ftz.f", f32t.into(), &[f32t.into()]);
        Ok(self.call(ex2, &[t.into()])?.into_float_value())
    }

    /// The CPU backend's inline `exp` (Cephes `expf`), operation for operation.
    fn exp_inline(&self, x: FloatValue<'ctx>) -> G<FloatValue<'ctx>> {
        const HI: f32 = 89.0;
        const LO: f32 = -104.0;
        const MAGIC: f32 = 12_582_912.0;
        const POLY: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
        let b = &self.b;
        let i32t = self.t.i32;
        let hi = self.f32c(HI);
        let lo = self.f32c(LO);
        let over = b.build_float_compare(FloatPredicate::OLT, hi, x, "")?;
        let xc = b.build_select(over, hi, x, "")?.into_float_value();
        let under = b.build_float_compare(FloatPredicate::OLT, xc, lo, "")?;
        let xc = b.build_select(under, lo, xc, "")?.into_float_value();
        let magic = self.f32c(MAGIC);
        let t = b.build_float_mul(xc, self.f32c(std::f32::consts::LOG2_E), "")?;
        let t = b.build_float_add(t, magic, "")?;
        let nf = b.build_float_sub(t, magic, "")?;
        let tb = b.build_bit_cast(t, i32t, "")?.into_int_value();
        let ni = b.build_int_sub(tb, i32t.const_int(0x4B40_0000, false), "")?;
        let a = b.build_float_mul(nf, self.f32c(0.693_359_4), "")?;
        let r = b.build_float_sub(xc, a, "")?;
        let a = b.build_float_mul(nf, self.f32c(-2.121_944_4e-4), "")?;
        let r = b.build_float_sub(r, a, "")?;
        let r2 = b.build_float_mul(r, r, "")?;
        let pair = |h: f32, l: f32| -> G<FloatValue<'ctx>> {
            let m = b.build_float_mul(self.f32c(h), r, "")?;
            Ok(b.build_float_add(m, self.f32c(l), "")?)
        };
        let pa = pair(POLY[4], POLY[5])?;
        let pb = pair(POLY[2], POLY[3])?;
        let pc = pair(POLY[0], POLY[1])?;
        let p = b.build_float_mul(r2, pc, "")?;
        let p = b.build_float_add(pb, p, "")?;
        let p = b.build_float_mul(r2, p, "")?;
        let p = b.build_float_add(pa, p, "")?;
        let y = b.build_float_mul(p, r2, "")?;
        let y = b.build_float_add(y, r, "")?;
        let y = b.build_float_add(y, self.f32c(1.0), "")?;
        let n1 = b.build_right_shift(ni, i32t.const_int(1, false), true, "")?;
        let n2 = b.build_int_sub(ni, n1, "")?;
        let mut out = y;
        for n in [n1, n2] {
            let e = b.build_int_add(n, i32t.const_int(127, false), "")?;
            let e = b.build_left_shift(e, i32t.const_int(23, false), "")?;
            let sc = b.build_bit_cast(e, self.t.f32, "")?.into_float_value();
            out = b.build_float_mul(out, sc, "")?;
        }
        Ok(out)
    }

    /// `1 / (1 + exp(-x))` for `x >= 0`, `e / (1 + e)` with `e = exp(x)` otherwise (as the
    /// CPU backend: `exp(-|x|)`, one division).
    fn sigmoid_inline(&self, x: FloatValue<'ctx>) -> G<FloatValue<'ctx>> {
        let fabs = self.intrinsic("llvm.fabs.f32", self.t.f32.into(), &[self.t.f32.into()]);
        let a = self.call(fabs, &[x.into()])?.into_float_value();
        let na = self.b.build_float_neg(a, "")?;
        let e = self.exp_inline(na)?;
        let one = self.f32c(1.0);
        let d = self.b.build_float_add(one, e, "")?;
        let pos = self
            .b
            .build_float_compare(FloatPredicate::OGE, x, self.f32c(0.0), "")?;
        let num = self.b.build_select(pos, one, e, "")?.into_float_value();
        Ok(self.b.build_float_div(num, d, "")?)
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        x: FloatValue<'ctx>,
        y: FloatValue<'ctx>,
    ) -> G<FloatValue<'ctx>> {
        let b = &self.b;
        Ok(match op {
            BinaryOp::Add => b.build_float_add(x, y, "")?,
            BinaryOp::Sub => b.build_float_sub(x, y, "")?,
            BinaryOp::Mul => b.build_float_mul(x, y, "")?,
            BinaryOp::Div => b.build_float_div(x, y, "")?,
            BinaryOp::Max | BinaryOp::Min => {
                // f32::max/min: `x < y ? y : x` (max), then `y` when `x` is NaN.
                let lt = if op == BinaryOp::Max {
                    b.build_float_compare(FloatPredicate::OLT, x, y, "")?
                } else {
                    b.build_float_compare(FloatPredicate::OLT, y, x, "")?
                };
                let m = b.build_select(lt, y, x, "")?.into_float_value();
                let xnan = b.build_float_compare(FloatPredicate::UNO, x, x, "")?;
                b.build_select(xnan, y, m, "")?.into_float_value()
            }
        })
    }

    fn iexpr(&mut self, e: &IExpr) -> G<IntValue<'ctx>> {
        Ok(match e {
            IExpr::Const(n) => self.ixc(*n),
            IExpr::Size(i) => match self.sizes.get(*i) {
                Some(v) => *v,
                None => return self.unsupported(format!("unknown size {i}")),
            },
            IExpr::Grid(i) => match self.grid.get(*i) {
                Some(v) => *v,
                None => return self.unsupported(format!("grid coordinate {i} in a grid extent")),
            },
            IExpr::Loop(l) => {
                let Some(p) = self.loops.get(l).copied() else {
                    return self.unsupported(format!("i{} outside its loop", l.0));
                };
                self.b.build_load(self.t.ix, p, "")?.into_int_value()
            }
            IExpr::Add(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.build_int_nsw_add(x, y, "")?
            }
            IExpr::Sub(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.build_int_nsw_sub(x, y, "")?
            }
            IExpr::Mul(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.build_int_nsw_mul(x, y, "")?
            }
            IExpr::Div(a, c) => self.divrem(a, c, false)?,
            IExpr::Rem(a, c) => self.divrem(a, c, true)?,
            IExpr::Min(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                let lt = self.b.build_int_compare(IntPredicate::SLT, x, y, "")?;
                self.b.build_select(lt, x, y, "")?.into_int_value()
            }
            IExpr::LoadIndex { buf, index } => {
                let dtype = self.dtype(*buf)?;
                let a = self.buf_addr(*buf, index)?;
                match dtype {
                    DType::I32 => {
                        let v = self.b.build_load(self.t.i32, a, "")?.into_int_value();
                        self.b.build_int_s_extend_or_bit_cast(v, self.t.ix, "")?
                    }
                    DType::I64 => {
                        let v = self.b.build_load(self.t.i64, a, "")?.into_int_value();
                        self.b.build_int_truncate_or_bit_cast(v, self.t.ix, "")?
                    }
                    other => {
                        return self.unsupported(format!("index load from an {other} buffer"));
                    }
                }
            }
        })
    }

    /// Floor division / remainder by a positive divisor.
    fn divrem(&mut self, a: &IExpr, d: &IExpr, rem: bool) -> G<IntValue<'ctx>> {
        let x = self.iexpr(a)?;
        if let IExpr::Const(c) = d {
            let c = *c;
            if c <= 0 {
                return self.unsupported(format!("division by the constant {c}"));
            }
            if c.count_ones() == 1 {
                let k = u64::from(c.trailing_zeros());
                return Ok(if rem {
                    self.b.build_and(x, self.ixc(c - 1), "")?
                } else {
                    self.b
                        .build_right_shift(x, self.t.ix.const_int(k, false), true, "")?
                });
            }
        }
        let y = self.iexpr(d)?;
        let b = &self.b;
        let q = b.build_int_signed_div(x, y, "")?;
        let qy = b.build_int_nsw_mul(q, y, "")?;
        let r = b.build_int_nsw_sub(x, qy, "")?;
        let neg = b.build_int_compare(IntPredicate::SLT, r, self.ixc(0), "")?;
        Ok(if rem {
            let r1 = b.build_int_nsw_add(r, y, "")?;
            b.build_select(neg, r1, r, "")?.into_int_value()
        } else {
            let q1 = b.build_int_nsw_sub(q, self.ixc(1), "")?;
            b.build_select(neg, q1, q, "")?.into_int_value()
        })
    }
}

/// [`math::Ops`] emitting f64/i64 instructions. Builder errors (only possible when the
/// builder is not positioned) are kept and reported after the algorithm ran.
struct Emit<'a, 'ctx> {
    b: &'a Builder<'ctx>,
    f64: FloatType<'ctx>,
    i64: IntType<'ctx>,
    err: Option<BuilderError>,
}

impl<'ctx> Emit<'_, 'ctx> {
    fn ok<T: Copy>(&mut self, r: Result<T, BuilderError>, fallback: T) -> T {
        match r {
            Ok(v) => v,
            Err(e) => {
                self.err.get_or_insert(e);
                fallback
            }
        }
    }
    fn fz(&self) -> FloatValue<'ctx> {
        self.f64.const_float(0.0)
    }
    fn iz(&self) -> IntValue<'ctx> {
        self.i64.const_int(0, false)
    }
}

impl<'ctx> math::Ops for Emit<'_, 'ctx> {
    type F = FloatValue<'ctx>;
    type I = IntValue<'ctx>;
    type B = IntValue<'ctx>;
    fn c(&mut self, x: f64) -> Self::F {
        self.f64.const_float(x)
    }
    fn ic(&mut self, x: i64) -> Self::I {
        self.i64.const_int(x as u64, true)
    }
    fn add(&mut self, a: Self::F, b: Self::F) -> Self::F {
        let r = self.b.build_float_add(a, b, "");
        self.ok(r, self.fz())
    }
    fn sub(&mut self, a: Self::F, b: Self::F) -> Self::F {
        let r = self.b.build_float_sub(a, b, "");
        self.ok(r, self.fz())
    }
    fn mul(&mut self, a: Self::F, b: Self::F) -> Self::F {
        let r = self.b.build_float_mul(a, b, "");
        self.ok(r, self.fz())
    }
    fn div(&mut self, a: Self::F, b: Self::F) -> Self::F {
        let r = self.b.build_float_div(a, b, "");
        self.ok(r, self.fz())
    }
    fn lt(&mut self, a: Self::F, b: Self::F) -> Self::B {
        let r = self.b.build_float_compare(FloatPredicate::OLT, a, b, "");
        self.ok(r, self.iz())
    }
    fn eq(&mut self, a: Self::F, b: Self::F) -> Self::B {
        let r = self.b.build_float_compare(FloatPredicate::OEQ, a, b, "");
        self.ok(r, self.iz())
    }
    fn sel(&mut self, c: Self::B, a: Self::F, b: Self::F) -> Self::F {
        let r = self
            .b
            .build_select(c, a, b, "")
            .map(BasicValueEnum::into_float_value);
        self.ok(r, self.fz())
    }
    fn isel(&mut self, c: Self::B, a: Self::I, b: Self::I) -> Self::I {
        let r = self
            .b
            .build_select(c, a, b, "")
            .map(BasicValueEnum::into_int_value);
        self.ok(r, self.iz())
    }
    fn f_to_bits(&mut self, a: Self::F) -> Self::I {
        let r = self
            .b
            .build_bit_cast(a, self.i64, "")
            .map(BasicValueEnum::into_int_value);
        self.ok(r, self.iz())
    }
    fn bits_to_f(&mut self, a: Self::I) -> Self::F {
        let r = self
            .b
            .build_bit_cast(a, self.f64, "")
            .map(BasicValueEnum::into_float_value);
        self.ok(r, self.fz())
    }
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Self::I {
        let r = self.b.build_int_add(a, b, "");
        self.ok(r, self.iz())
    }
    fn isub(&mut self, a: Self::I, b: Self::I) -> Self::I {
        let r = self.b.build_int_sub(a, b, "");
        self.ok(r, self.iz())
    }
    fn iand(&mut self, a: Self::I, b: Self::I) -> Self::I {
        let r = self.b.build_and(a, b, "");
        self.ok(r, self.iz())
    }
    fn ior(&mut self, a: Self::I, b: Self::I) -> Self::I {
        let r = self.b.build_or(a, b, "");
        self.ok(r, self.iz())
    }
    fn shl(&mut self, a: Self::I, n: u32) -> Self::I {
        let n = self.i64.const_int(u64::from(n), false);
        let r = self.b.build_left_shift(a, n, "");
        self.ok(r, self.iz())
    }
    fn sar(&mut self, a: Self::I, n: u32) -> Self::I {
        let n = self.i64.const_int(u64::from(n), false);
        let r = self.b.build_right_shift(a, n, true, "");
        self.ok(r, self.iz())
    }
    fn itof(&mut self, a: Self::I) -> Self::F {
        let r = self.b.build_signed_int_to_float(a, self.f64, "");
        self.ok(r, self.fz())
    }
}
