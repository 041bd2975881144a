//! The CUDA executor (cargo feature `cuda`): runs a [`Lowered`] schedule on an NVIDIA GPU.
//!
//! The kernels come as PTX text with one entry name per kernel of the schedule (the `nvptx`
//! backend of `codegen` makes them; this crate does not depend on it): every kernel takes
//! its buffers' device addresses and then its sizes as i64 values, and covers its whole grid
//! from any 1-d launch (a grid-stride loop). Matrix products go to cuBLAS `sgemm` (f32, no
//! TF32), strided-batched.
//!
//! Memory: the arena of the memory plan is allocated once per execution; parameters, inputs
//! and initial states get their own allocations, uploaded before the first step; outputs are
//! downloaded at the end. With [`ExecOptions::poison`] the arena is filled with NaN bytes
//! first, so an element no kernel writes shows as NaN.
//!
//! Libraries are loaded at run time (cudarc's dynamic loading), so the crate builds without
//! CUDA. libcuda must be on the loader path (the driver puts it there); libcublas often is
//! not (the CUDA toolkit's `targets/x86_64-linux/lib`, pip's `site-packages/nvidia/cu13/lib`),
//! so [`CudaExecutor::new`] looks for it in those places and loads it by its full path.

use crate::cpu::{ExecError, HostData, Inputs, Outputs};
use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::driver::{result, sys};
use ir::kernel::IExpr;
use ir::schedule::{BufKind, Lowered, MemoryPlan, Step};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Threads per block of every kernel launch.
const BLOCK: u32 = 256;
/// The most blocks of one launch (the kernels loop over the rest of their grid).
const MAX_BLOCKS: u64 = 1 << 20;

/// Why the GPU could not run a schedule.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver library, no device, or the device could not be opened.
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    /// libcublas was found nowhere.
    #[error("cuBLAS is not available: {0}")]
    NoCublas(String),
    /// The driver rejected the PTX module or an entry of it.
    #[error("loading the PTX module failed: {0}")]
    Module(String),
    /// A kernel launch failed (or, with `sync_each_step`, the kernel itself).
    #[error("kernel `{kernel}` (IR node {node}) failed: {message}")]
    Kernel {
        kernel: String,
        node: String,
        message: String,
    },
    /// A matrix product failed.
    #[error("matmul (IR node {node}) failed: {message}")]
    Gemm { node: String, message: String },
    #[error("out of device memory allocating {what}: {requested} bytes requested, {free} free")]
    OutOfMemory {
        what: String,
        requested: u64,
        free: u64,
    },
    /// Another driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The inputs do not fit the schedule.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Execution options.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecOptions {
    /// Fill the arena with NaN before the first step (tests: unwritten elements show).
    pub poison: bool,
    /// Synchronize after every step, so a failing kernel is named (slower).
    pub sync_each_step: bool,
}

/// Device memory freed on drop.
struct DevBuf {
    ptr: sys::CUdeviceptr,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: `ptr` came from `cuMemAlloc` and is freed once; nothing reads it after
            // the execution that owns it synchronized.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A context on one GPU with the schedule's kernels loaded.
pub struct CudaExecutor {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    funcs: Vec<CudaFunction>,
}

fn drv(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Whether a CUDA driver library is present (no device is opened).
pub fn driver_present() -> bool {
    // SAFETY: tries to dlopen the driver library by its usual names; no call into it.
    unsafe { sys::is_culib_present() }
}

/// Directories where libcublas is commonly installed but the loader may not look.
fn cublas_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("MA2MBA_CUDA_LIB_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            let d = PathBuf::from(d);
            dirs.push(d.join("targets/x86_64-linux/lib"));
            dirs.push(d.join("lib64"));
        }
    }
    for d in [
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/cuda-13.0/targets/x86_64-linux/lib",
        "/usr/local/cuda-13.0/lib64",
    ] {
        dirs.push(PathBuf::from(d));
    }
    // pip wheels: <prefix>/lib/python3.X/{site,dist}-packages/nvidia/{cu13,cublas}/lib
    let mut prefixes: Vec<PathBuf> = ["/usr/lib", "/usr/local/lib", "/opt/torch/.venv/lib"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(h).join(".local/lib"));
    }
    for p in prefixes {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().starts_with("python3") {
                continue;
            }
            for pk in ["site-packages", "dist-packages"] {
                for sub in ["nvidia/cu13/lib", "nvidia/cublas/lib"] {
                    dirs.push(e.path().join(pk).join(sub));
                }
            }
        }
    }
    dirs
}

/// Makes libcublas loadable by cudarc: if the loader cannot find it, loads it (and
/// libcublasLt) by full path from [`cublas_dirs`], so cudarc's later load by its soname
/// finds the loaded library.
fn ensure_cublas() -> Result<(), CudaError> {
    // SAFETY: dlopen of cuBLAS by its usual names; its initializers are safe to run.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Ok(());
    }
    let dirs = cublas_dirs();
    for d in &dirs {
        let lib = d.join("libcublas.so.13");
        if !lib.is_file() {
            continue;
        }
        for name in ["libcublasLt.so.13", "libcublas.so.13"] {
            let path = d.join(name);
            if path.is_file() {
                load_global(&path)?;
            }
        }
        // SAFETY: as above.
        if unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Ok(());
        }
    }
    Err(CudaError::NoCublas(format!(
        "libcublas.so.13 is not on the loader path nor in any of {}; set MA2MBA_CUDA_LIB_DIR \
         or LD_LIBRARY_PATH to its folder",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

fn load_global(path: &Path) -> Result<(), CudaError> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a CUDA library runs its initializers, which have no preconditions.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| CudaError::NoCublas(format!("{}: {e}", path.display())))?;
    // Kept loaded for the life of the process: cudarc resolves its symbols later.
    std::mem::forget(lib);
    Ok(())
}

impl CudaExecutor {
    /// Opens GPU `ordinal`, loads cuBLAS and the PTX module, and looks up every entry.
    pub fn new(ordinal: usize, ptx: &str, entries: &[String]) -> Result<CudaExecutor, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(e.to_string()))?;
        let stream = ctx.default_stream();
        ensure_cublas()?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::NoCublas(e.to_string()))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| CudaError::Module(e.to_string()))?;
        let mut funcs = Vec::with_capacity(entries.len());
        for e in entries {
            let f = module
                .load_function(e)
                .map_err(|err| CudaError::Module(format!("entry `{e}`: {err}")))?;
            funcs.push(f);
        }
        Ok(CudaExecutor {
            ctx,
            stream,
            blas,
            _module: module,
            funcs,
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_default()
    }

    fn alloc(&self, what: &str, bytes: u64) -> Result<DevBuf, CudaError> {
        let n = usize::try_from(bytes.max(1)).map_err(drv)?;
        // SAFETY: a plain device allocation in the bound context.
        match unsafe { result::malloc_sync(n) } {
            Ok(ptr) => Ok(DevBuf { ptr }),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                let free = self.ctx.mem_get_info().map(|(f, _)| f as u64).unwrap_or(0);
                Err(CudaError::OutOfMemory {
                    what: what.to_string(),
                    requested: bytes,
                    free,
                })
            }
            Err(e) => Err(drv(e)),
        }
    }

    fn upload<T>(&self, what: &str, data: &[T]) -> Result<DevBuf, CudaError> {
        let b = self.alloc(what, std::mem::size_of_val(data) as u64)?;
        if !data.is_empty() {
            // SAFETY: `b` holds `size_of_val(data)` bytes; the copy is synchronous.
            unsafe { result::memcpy_htod_sync(b.ptr, data) }.map_err(drv)?;
        }
        Ok(b)
    }

    /// Runs the schedule; returns every graph output (f32) by name, in output order.
    pub fn execute(
        &self,
        l: &Lowered,
        plan: &MemoryPlan,
        inp: &Inputs<'_>,
        opts: ExecOptions,
    ) -> Result<Outputs, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        if plan.offsets.len() != l.buffers.len() {
            return Err(ExecError::Plan(format!(
                "{} offsets for {} buffers",
                plan.offsets.len(),
                l.buffers.len()
            ))
            .into());
        }
        if self.funcs.len() != l.kernels.len() {
            return Err(CudaError::Module(format!(
                "{} entries loaded for {} kernels",
                self.funcs.len(),
                l.kernels.len()
            )));
        }
        let arena = self.alloc("the arena", plan.peak)?;
        if opts.poison && plan.peak > 0 {
            // SAFETY: the arena holds `peak` bytes; 0xFF bytes are f32 NaNs.
            unsafe { result::memset_d8_sync(arena.ptr, 0xFF, plan.peak as usize) }.map_err(drv)?;
        }
        let mut owned: Vec<DevBuf> = Vec::new();
        let mut ptrs: Vec<u64> = vec![0; l.buffers.len()];
        for (i, b) in l.buffers.iter().enumerate() {
            let want = (plan.bytes[i] / b.dtype.size()) as usize;
            ptrs[i] = match &b.kind {
                BufKind::Temp | BufKind::Scratch => match plan.offsets[i] {
                    Some(off) => arena.ptr + off,
                    None => 0,
                },
                BufKind::Param(name) => {
                    let p = inp.params.get(name).ok_or_else(|| ExecError::Missing {
                        what: "parameter",
                        name: name.clone(),
                    })?;
                    check_len(name, p.len(), want)?;
                    let d = self.upload(&format!("parameter `{name}`"), p)?;
                    let ptr = d.ptr;
                    owned.push(d);
                    ptr
                }
                BufKind::Input(name) => {
                    let d = match inp.data.get(name) {
                        Some(HostData::I32(v)) => {
                            check_len(name, v.len(), want)?;
                            self.upload(&format!("input `{name}`"), v)?
                        }
                        Some(HostData::F32(v)) => {
                            check_len(name, v.len(), want)?;
                            self.upload(&format!("input `{name}`"), v)?
                        }
                        None => {
                            return Err(ExecError::Missing {
                                what: "input",
                                name: name.clone(),
                            }
                            .into());
                        }
                    };
                    let ptr = d.ptr;
                    owned.push(d);
                    ptr
                }
                BufKind::State(name) => {
                    let d = match inp.states.get(name) {
                        Some(v) => {
                            check_len(name, v.len(), want)?;
                            self.upload(&format!("state `{name}`"), v)?
                        }
                        None => {
                            let d = self.alloc(&format!("state `{name}`"), plan.bytes[i])?;
                            // SAFETY: `d` holds `bytes[i]` bytes.
                            unsafe { result::memset_d8_sync(d.ptr, 0, plan.bytes[i] as usize) }
                                .map_err(drv)?;
                            d
                        }
                    };
                    let ptr = d.ptr;
                    owned.push(d);
                    ptr
                }
            };
        }
        for step in &l.steps {
            match step {
                Step::Kernel { kernel, bufs, node } => {
                    let k = &l.kernels[*kernel];
                    let fail = |message: String| CudaError::Kernel {
                        kernel: k.name.clone(),
                        node: node.to_string(),
                        message,
                    };
                    if inp.sizes.len() != k.sizes.len() || bufs.len() != k.bufs.len() {
                        return Err(fail(format!(
                            "{} buffers and {} sizes given, {} and {} expected",
                            bufs.len(),
                            inp.sizes.len(),
                            k.bufs.len(),
                            k.sizes.len()
                        )));
                    }
                    let total = match grid_points(&k.grid, inp.sizes) {
                        Ok(Some(0)) => continue,
                        Ok(Some(n)) => n,
                        // Extents read from device buffers: the kernel loops over its grid.
                        Ok(None) => MAX_BLOCKS * u64::from(BLOCK),
                        Err(m) => return Err(fail(m)),
                    };
                    let blocks = total.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32;
                    let args: Vec<u64> = bufs.iter().map(|&b| ptrs[b]).collect();
                    let mut lb = self.stream.launch_builder(&self.funcs[*kernel]);
                    for a in &args {
                        lb.arg(a);
                    }
                    for s in inp.sizes {
                        lb.arg(s);
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (BLOCK, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the arguments are the entry's parameters in order (a device
                    // address per buffer, then the i64 sizes); every address is a live
                    // allocation sized by the memory plan for these sizes.
                    unsafe { lb.launch(cfg) }.map_err(|e| fail(e.to_string()))?;
                    if opts.sync_each_step {
                        self.stream.synchronize().map_err(|e| fail(e.to_string()))?;
                    }
                }
                Step::MatMul {
                    lhs,
                    rhs,
                    out,
                    batch,
                    m,
                    k,
                    n,
                    rhs_t,
                    rhs_batched,
                    node,
                } => {
                    let fail = |message: String| CudaError::Gemm {
                        node: node.to_string(),
                        message,
                    };
                    let bind = |s: &str| {
                        l.syms
                            .iter()
                            .position(|x| x == s)
                            .map(|i| inp.sizes[i] as u64)
                    };
                    let ev = |d: &ir::Dim| {
                        d.eval(&bind)
                            .ok_or_else(|| fail(format!("cannot evaluate {d}")))
                    };
                    let (bt, m, k, n) = (ev(batch)?, ev(m)?, ev(k)?, ev(n)?);
                    if bt == 0 || m == 0 || n == 0 {
                        continue;
                    }
                    if k == 0 {
                        // SAFETY: `out` holds batch*m*n f32 values.
                        unsafe {
                            result::memset_d8_async(
                                ptrs[*out],
                                0,
                                (bt * m * n * 4) as usize,
                                self.stream.cu_stream(),
                            )
                        }
                        .map_err(|e| fail(e.to_string()))?;
                        continue;
                    }
                    let int =
                        |x: u64| i32::try_from(x).map_err(|_| fail(format!("{x} exceeds i32")));
                    let (mi, ki, ni, bi) = (int(m)?, int(k)?, int(n)?, int(bt)?);
                    // Row-major C[M,N] = A[M,K] B is column-major C^T = B^T A^T: cuBLAS
                    // computes (N x M) = op(B) (N x K) * A (K x M).
                    let (op_b, ldb) = if *rhs_t {
                        (cublasOperation_t::CUBLAS_OP_T, ki)
                    } else {
                        (cublasOperation_t::CUBLAS_OP_N, ni)
                    };
                    let stride_b = if *rhs_batched { (k * n) as i64 } else { 0 };
                    let (alpha, beta) = (1.0f32, 0.0f32);
                    // SAFETY: the buffers hold batch*m*k, k*n (per batch if batched) and
                    // batch*m*n f32 values by construction of the schedule and the plan.
                    unsafe {
                        cudarc::cublas::result::sgemm_strided_batched(
                            *self.blas.handle(),
                            op_b,
                            cublasOperation_t::CUBLAS_OP_N,
                            ni,
                            mi,
                            ki,
                            &alpha,
                            ptrs[*rhs] as *const f32,
                            ldb,
                            stride_b,
                            ptrs[*lhs] as *const f32,
                            ki,
                            (m * k) as i64,
                            &beta,
                            ptrs[*out] as *mut f32,
                            ni,
                            (m * n) as i64,
                            bi,
                        )
                    }
                    .map_err(|e| fail(e.to_string()))?;
                    if opts.sync_each_step {
                        self.stream.synchronize().map_err(|e| fail(e.to_string()))?;
                    }
                }
            }
        }
        self.stream.synchronize().map_err(drv)?;
        let mut outs = Vec::new();
        for (name, b) in &l.outputs {
            let len = (plan.bytes[*b] / 4) as usize;
            let mut v = vec![0f32; len];
            if ptrs[*b] != 0 && len > 0 {
                // SAFETY: output buffers are f32 and `len` elements long (plan.bytes).
                unsafe { result::memcpy_dtoh_sync(&mut v, ptrs[*b]) }.map_err(drv)?;
            }
            outs.push((name.clone(), v));
        }
        drop(owned);
        drop(arena);
        Ok(outs)
    }
}

fn check_len(name: &str, got: usize, want: usize) -> Result<(), ExecError> {
    if got == want {
        Ok(())
    } else {
        Err(ExecError::Size {
            name: name.to_string(),
            got,
            want,
        })
    }
}

/// The number of grid points, or `None` if an extent reads a device buffer.
fn grid_points(grid: &[IExpr], sizes: &[i64]) -> Result<Option<u64>, String> {
    fn ev(e: &IExpr, sizes: &[i64]) -> Result<Option<i64>, String> {
        let two = |a: &IExpr, b: &IExpr| -> Result<Option<(i64, i64)>, String> {
            Ok(match (ev(a, sizes)?, ev(b, sizes)?) {
                (Some(x), Some(y)) => Some((x, y)),
                _ => None,
            })
        };
        Ok(match e {
            IExpr::Const(n) => Some(*n),
            IExpr::Size(i) => Some(*sizes.get(*i).ok_or("unknown size")?),
            IExpr::Grid(_) | IExpr::Loop(_) => {
                return Err("a grid extent depends on a coordinate".into());
            }
            IExpr::LoadIndex { .. } => None,
            IExpr::Add(a, b) => two(a, b)?.map(|(x, y)| x.wrapping_add(y)),
            IExpr::Sub(a, b) => two(a, b)?.map(|(x, y)| x.wrapping_sub(y)),
            IExpr::Mul(a, b) => two(a, b)?.map(|(x, y)| x.wrapping_mul(y)),
            IExpr::Min(a, b) => two(a, b)?.map(|(x, y)| x.min(y)),
            IExpr::Div(a, b) | IExpr::Rem(a, b) => match two(a, b)? {
                Some((_, y)) if y <= 0 => return Err(format!("division by {y}")),
                Some((x, y)) if matches!(e, IExpr::Div(..)) => Some(x.div_euclid(y)),
                Some((x, y)) => Some(x.rem_euclid(y)),
                None => None,
            },
        })
    }
    let mut total: u64 = 1;
    for (d, g) in grid.iter().enumerate() {
        let Some(e) = ev(g, sizes)? else {
            return Ok(None);
        };
        let e = u64::try_from(e).map_err(|_| format!("grid extent {d} is negative ({e})"))?;
        total = total
            .checked_mul(e)
            .ok_or_else(|| "grid point count overflows".to_string())?;
    }
    Ok(Some(total))
}
