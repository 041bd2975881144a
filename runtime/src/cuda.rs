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
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::driver::{result, sys};
use ir::kernel::IExpr;
use ir::schedule::{BufKind, Lowered, MemoryPlan, Step};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Threads per block of every kernel launch: the block kernels with long shared loops
/// expect ([`ir::lanes::BLOCK`]).
const BLOCK: u32 = ir::lanes::BLOCK;
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
    /// [`CudaExecutor::run`]: capture the steps as a CUDA graph on the first run and replay
    /// it (launch-bound schedules such as the decode step).
    pub graph: bool,
    /// [`CudaExecutor::run`]: time every step with events.
    pub profile: bool,
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
    /// The thread's stream and cuBLAS handle on this GPU ([`Queue`]).
    stream: Arc<CudaStream>,
    blas: Arc<CudaBlas>,
    _queue: Arc<Queue>,
    _module: Arc<CudaModule>,
    funcs: Vec<CudaFunction>,
    /// Each kernel's entry with 32-bit index math, where the module has one
    /// ([`ir::kernel::index32_entry`]); launched where the sizes allow ([`fits_index32`]).
    funcs32: Vec<Option<CudaFunction>>,
    /// Whether launches may use `funcs32` ([`CudaExecutor::set_index32`]).
    index32: std::sync::atomic::AtomicBool,
    /// `Kernel::convert(f32 -> bf16)`, for matrix products with bf16 weights.
    to_bf16: Option<CudaFunction>,
    /// f32 matrix products on tensor cores with TF32 inputs ([`CudaExecutor::set_tf32`]).
    tf32: std::sync::atomic::AtomicBool,
    /// Threads per grid point of each kernel of the schedule it runs, worked out at the
    /// first bind (an analysis of every kernel body; binds are frequent in checkpointed
    /// training).
    lanes: std::sync::OnceLock<Vec<Launch>>,
}

/// What [`CudaExecutor::set_tf32`] starts as in executors created from now on
/// ([`set_tf32_default`]).
static TF32_DEFAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether executors created from now on run f32 matrix products on TF32 tensor cores (a
/// program-wide choice, such as a command line's `--tf32`).
pub fn set_tf32_default(on: bool) {
    TF32_DEFAULT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes of cuBLAS's workspace (the size NVIDIA recommends for Hopper).
const CUBLAS_WORKSPACE: u64 = 32 << 20;

/// The stream every executor of one GPU enqueues on from one thread, with its cuBLAS handle
/// and workspace: a checkpointed step compiles hundreds of stage executors, which one
/// handle each (and 32 MiB of workspace each) made cost gigabytes; sharing the stream also
/// orders their work without waits between them. Per thread, since a cuBLAS handle must not
/// be used from two threads at once.
struct Queue {
    stream: Arc<CudaStream>,
    /// Dropped before the workspace it uses.
    blas: Arc<CudaBlas>,
    /// cuBLAS's workspace, set explicitly so that matrix products can be captured in a CUDA
    /// graph (cuBLAS must not allocate while a stream is being captured).
    _workspace: DevBuf,
}

thread_local! {
    static QUEUES: std::cell::RefCell<Vec<(usize, Arc<Queue>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's queue on GPU `ordinal`, made at first use.
fn queue_for(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<Arc<Queue>, CudaError> {
    let found = QUEUES.with(|q| {
        q.borrow()
            .iter()
            .find(|(o, _)| *o == ordinal)
            .map(|(_, x)| x.clone())
    });
    if let Some(q) = found {
        return Ok(q);
    }
    // Not the legacy default stream: that one cannot be captured as a graph.
    let stream = ctx.new_stream().map_err(drv)?;
    ensure_cublas()?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::NoCublas(e.to_string()))?;
    let workspace = alloc_on(ctx, "cuBLAS's workspace", CUBLAS_WORKSPACE)?;
    // SAFETY: the workspace is a live allocation of CUBLAS_WORKSPACE bytes that lives as
    // long as the handle (both are fields of the queue, the handle dropped first).
    unsafe {
        cudarc::cublas::sys::cublasSetWorkspace_v2(
            *blas.handle(),
            workspace.ptr as *mut std::ffi::c_void,
            CUBLAS_WORKSPACE as usize,
        )
    }
    .result()
    .map_err(|e| CudaError::NoCublas(e.to_string()))?;
    let q = Arc::new(Queue {
        stream,
        blas: Arc::new(blas),
        _workspace: workspace,
    });
    QUEUES.with(|qs| qs.borrow_mut().push((ordinal, q.clone())));
    Ok(q)
}

/// Parameters on the device, uploaded once and read by every run that binds them (one
/// CUDA context per device, so schedules of different executors on it can share them).
pub struct DeviceParams {
    bufs: HashMap<String, (DevBuf, usize)>,
    /// bf16 copies of the weights of matrix products ([`CudaExecutor::add_bf16_weights`]):
    /// those products then run in bf16 with f32 accumulation.
    half: HashMap<String, DevBuf>,
}

impl DeviceParams {
    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        let f32s: u64 = self.bufs.values().map(|(_, n)| 4 * *n as u64).sum();
        let halves: u64 = self
            .half
            .keys()
            .filter_map(|k| self.bufs.get(k))
            .map(|(_, n)| 2 * *n as u64)
            .sum();
        f32s + halves
    }
}

/// Running sums on the device, by name (a checkpointed step's parameter gradients, summed
/// over the stage runs that produce them without leaving the device).
#[derive(Default)]
pub struct DeviceSums {
    bufs: HashMap<String, (DevBuf, usize)>,
}

/// Where a run's selected outputs go instead of the host: the sums, and which output names
/// are added into them.
pub type SumInto<'a> = (&'a mut DeviceSums, &'a dyn Fn(&str) -> bool);

impl DeviceSums {
    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.bufs.values().map(|(_, n)| 4 * *n as u64).sum()
    }
}

/// A value kept in device memory between runs (a checkpointed step's boundary values, saved
/// values, states and cotangents), f32 or bf16 (bf16 activations), freed on drop.
pub struct DeviceValue {
    buf: DevBuf,
    len: usize,
    dtype: ir::DType,
}

impl DeviceValue {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// How its elements are stored.
    pub fn dtype(&self) -> ir::DType {
        self.dtype
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A value in device memory a run reads in place: address, element count, dtype.
type ExtValue = (u64, usize, ir::DType);

/// Device memory that runs borrow as their arena ([`CudaExecutor::run_resident`]), grown
/// to the largest arena asked for, so that a sequence of runs allocates it once.
#[derive(Default)]
pub struct DeviceArena {
    buf: Option<DevBuf>,
    bytes: u64,
}

impl DeviceArena {
    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What [`CudaExecutor::run_resident`] returned: outputs downloaded to the host, and outputs
/// kept on the device.
pub struct ResidentOutputs {
    pub host: Outputs,
    pub device: Vec<(String, DeviceValue)>,
    /// Device memory in use (total minus free, all of the GPU's users) at the end of the
    /// run, while its arena and outputs were both held.
    pub device_used: u64,
}

/// How a kernel launches: threads per grid point (a warp or block where lanes share loops
/// or tiles), grid points per thread (`ir::lanes::points_per_thread`) and dynamic shared
/// memory bytes (`ir::tile::shared_bytes`).
#[derive(Clone, Copy, Debug)]
struct Launch {
    threads: u32,
    per: u32,
    shared: u32,
}

impl Default for Launch {
    fn default() -> Launch {
        Launch {
            threads: 1,
            per: 1,
            shared: 0,
        }
    }
}

/// A schedule bound to fixed symbol values on the device: the arena, the inputs and the
/// states are allocated once, so the schedule can run again and again (and be captured as a
/// CUDA graph and replayed) while inputs and states are rewritten between runs.
pub struct Bound {
    sizes: Vec<i64>,
    plan: MemoryPlan,
    ptrs: Vec<u64>,
    /// Device-to-device copies after the last step: (from, to, bytes), final states into the
    /// state buffers the next run reads.
    carry: Vec<(u64, u64, usize)>,
    /// Per step: the bf16 weights of a matrix product that runs in bf16.
    half_rhs: Vec<Option<u64>>,
    /// Where a bf16 product's input is converted to bf16 (the largest one's size).
    half_lhs: u64,
    /// How each kernel launches.
    lanes: Vec<Launch>,
    graph: Option<CudaGraph>,
    /// Its own arena; `None` when it runs in a [`DeviceArena`] it borrows.
    _arena: Option<DevBuf>,
    _owned: Vec<DevBuf>,
}

impl Bound {
    /// The memory plan it was bound with.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Whether its steps have been captured as a CUDA graph.
    pub fn captured(&self) -> bool {
        self.graph.is_some()
    }
}

/// The time one step of a profiled run took on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct StepTime {
    /// The kernel's name, or `matmul` for a cuBLAS product.
    pub name: String,
    /// The IR node the step came from.
    pub node: String,
    pub ms: f32,
    /// Bytes of the buffers it reads and writes, each counted once (its traffic floor).
    pub bytes: u64,
    /// Floating-point operations of a matrix product (`2 b m k n`); 0 for kernels.
    pub flops: u64,
}

/// A step's traffic floor and (for products) FLOPs at a bound schedule's sizes.
fn step_cost(l: &Lowered, b: &Bound, step: &Step) -> (u64, u64) {
    let mut bufs: Vec<usize> = match step {
        Step::Kernel { bufs, .. } => bufs.clone(),
        Step::MatMul { lhs, rhs, out, .. } => vec![*lhs, *rhs, *out],
    };
    bufs.sort_unstable();
    bufs.dedup();
    let bytes = bufs.iter().filter_map(|&i| b.plan.bytes.get(i)).sum();
    let flops = match step {
        Step::MatMul { batch, m, k, n, .. } => {
            let bind = |s: &str| {
                l.syms
                    .iter()
                    .position(|x| x == s)
                    .map(|i| b.sizes[i] as u64)
            };
            let ev = |d: &ir::Dim| d.eval(&bind).unwrap_or(0);
            2 * batch.eval(&bind).unwrap_or(0) * ev(m) * ev(k) * ev(n)
        }
        Step::Kernel { .. } => 0,
    };
    (bytes, flops)
}

/// Which of a schedule's buffers a name denotes.
fn named(l: &Lowered, name: &str, output: bool) -> Option<usize> {
    if output {
        return l.outputs.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
    }
    l.buffers.iter().position(|b| match &b.kind {
        BufKind::Input(n) | BufKind::State(n) => n == name,
        _ => false,
    })
}

impl CudaExecutor {
    /// Opens GPU `ordinal`, loads cuBLAS and the PTX module, and looks up every entry (one
    /// per kernel of the schedules it runs) and `to_bf16`, the entry of
    /// `Kernel::convert(f32 -> bf16)` when the module has one (for bf16 weights).
    pub fn new(
        ordinal: usize,
        ptx: &str,
        entries: &[String],
        to_bf16: Option<&str>,
    ) -> Result<CudaExecutor, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(e.to_string()))?;
        let queue = queue_for(&ctx, ordinal)?;
        let module = module_for(&ctx, ordinal, ptx)?;
        let mut funcs = Vec::with_capacity(entries.len());
        let mut funcs32 = Vec::with_capacity(entries.len());
        // Only kernels the backend gave a 32-bit entry have one (looking up a missing name
        // is an API error, which compute-sanitizer reports).
        let defined: std::collections::HashSet<&str> = ptx_entries(ptx).collect();

        for e in entries {
            let f = module
                .load_function(e)
                .map_err(|err| CudaError::Module(format!("entry `{e}`: {err}")))?;
            funcs.push(f);
            // Optional: PTX from elsewhere (an older artifact) may have only the i64 entries.
            let e32 = ir::kernel::index32_entry(e);
            funcs32.push(match defined.contains(e32.as_str()) {
                true => Some(
                    module
                        .load_function(&e32)
                        .map_err(|err| CudaError::Module(format!("entry `{e32}`: {err}")))?,
                ),
                false => None,
            });
        }
        let to_bf16 = match to_bf16 {
            Some(e) => Some(
                module
                    .load_function(e)
                    .map_err(|err| CudaError::Module(format!("entry `{e}`: {err}")))?,
            ),
            None => None,
        };
        Ok(CudaExecutor {
            ctx,
            stream: queue.stream.clone(),
            blas: queue.blas.clone(),
            _queue: queue,
            _module: module,
            funcs,
            funcs32,
            // MA2MBA_INDEX64=1: only the i64 entries (to compare, or to rule the others out).
            index32: std::sync::atomic::AtomicBool::new(
                std::env::var("MA2MBA_INDEX64").map_or(true, |v| v != "1"),
            ),
            to_bf16,
            tf32: std::sync::atomic::AtomicBool::new(
                TF32_DEFAULT.load(std::sync::atomic::Ordering::Relaxed),
            ),
            lanes: std::sync::OnceLock::new(),
        })
    }

    /// How each of `l`'s kernels launches (the executor runs one schedule; a schedule of
    /// another kernel count is analysed afresh). Tiled kernels get their dynamic shared
    /// memory allowed here (beyond the default 48 KB, up to the device's limit).
    fn lanes(&self, l: &Lowered) -> Result<Vec<Launch>, CudaError> {
        let analyse = || {
            l.kernels
                .iter()
                .map(|k| Launch {
                    threads: ir::lanes::threads_per_point(k),
                    per: ir::lanes::points_per_thread(k),
                    shared: ir::tile::shared_bytes(k) as u32,
                })
                .collect()
        };
        let cached = self.lanes.get_or_init(analyse);
        let lanes: Vec<Launch> = match cached.len() == l.kernels.len() {
            true => cached.clone(),
            false => analyse(),
        };
        for (i, la) in lanes.iter().enumerate() {
            if la.shared == 0 {
                continue;
            }
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
            let fail = |message: String| CudaError::Kernel {
                kernel: l.kernels[i].name.clone(),
                node: String::new(),
                message,
            };
            let f = self
                .funcs
                .get(i)
                .ok_or_else(|| fail("no entry for this kernel in the module".into()))?;
            let f32 = self.funcs32.get(i).and_then(Option::as_ref);
            for f in std::iter::once(f).chain(f32) {
                f.set_attribute(MAX_SHARED, la.shared as i32)
                    .map_err(|e| fail(format!("{} bytes of shared memory: {e}", la.shared)))?;
            }
        }
        Ok(lanes)
    }

    /// Whether kernels launch their entries with 32-bit index math where the sizes allow
    /// ([`ir::kernel::INDEX32_LIMIT`]; on by default, off with `MA2MBA_INDEX64=1`). Off,
    /// every launch from now on runs the i64 entry; a `Bound` already captured as a CUDA
    /// graph replays the entries it captured.
    pub fn set_index32(&self, on: bool) {
        self.index32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn index32(&self) -> bool {
        self.index32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether f32 matrix products run on tensor cores with their inputs rounded to TF32
    /// (10-bit mantissa, f32 accumulation): several times the f32 rate, at a relative
    /// error of about 1e-3 per product. Off by default.
    pub fn set_tf32(&self, on: bool) {
        self.tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_default()
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(u64, u64), CudaError> {
        let (f, t) = self.ctx.mem_get_info().map_err(drv)?;
        Ok((f as u64, t as u64))
    }

    fn alloc(&self, what: &str, bytes: u64) -> Result<DevBuf, CudaError> {
        alloc_on(&self.ctx, what, bytes)
    }

    fn upload<T>(&self, what: &str, data: &[T]) -> Result<DevBuf, CudaError> {
        let b = self.alloc(what, std::mem::size_of_val(data) as u64)?;
        self.copy_in(b.ptr, data)?;
        Ok(b)
    }

    /// Host to device on the executor's stream (pageable memory is staged before the call
    /// returns, so `data` may change afterwards).
    fn copy_in<T>(&self, ptr: u64, data: &[T]) -> Result<(), CudaError> {
        if !data.is_empty() {
            // SAFETY: the caller's `ptr` holds at least `size_of_val(data)` bytes.
            unsafe { result::memcpy_htod_async(ptr, data, self.stream.cu_stream()) }
                .map_err(drv)?;
        }
        Ok(())
    }

    /// Uploads parameters (f32) once, for [`CudaExecutor::bind`].
    pub fn upload_params(
        &self,
        params: &HashMap<String, Vec<f32>>,
    ) -> Result<DeviceParams, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        let mut bufs = HashMap::with_capacity(params.len());
        for (name, v) in params {
            let d = self.upload(&format!("parameter `{name}`"), v)?;
            bufs.insert(name.clone(), (d, v.len()));
        }
        self.stream.synchronize().map_err(drv)?;
        Ok(DeviceParams {
            bufs,
            half: HashMap::new(),
        })
    }

    /// Adds bf16 copies of the parameters that are the weights of `l`'s matrix products;
    /// bound afterwards, those products run in bf16 (inputs converted on the fly) with f32
    /// accumulation and output. For inference: an optimizer's updates reach only the f32
    /// copies.
    pub fn add_bf16_weights(
        &self,
        params: &mut DeviceParams,
        l: &Lowered,
    ) -> Result<(), CudaError> {
        let Some(cvt) = &self.to_bf16 else {
            return Err(CudaError::Module(
                "the module has no f32 -> bf16 conversion kernel".into(),
            ));
        };
        self.ctx.bind_to_thread().map_err(drv)?;
        for step in &l.steps {
            let Step::MatMul { rhs, .. } = step else {
                continue;
            };
            let BufKind::Param(name) = &l.buffers[*rhs].kind else {
                continue;
            };
            if params.half.contains_key(name) {
                continue;
            }
            let Some((src, n)) = params.bufs.get(name) else {
                continue;
            };
            let dst = self.alloc(&format!("bf16 parameter `{name}`"), 2 * *n as u64)?;
            self.convert(cvt, src.ptr, dst.ptr, *n as u64)?;
            params.half.insert(name.clone(), dst);
        }
        self.stream.synchronize().map_err(drv)
    }

    /// Enqueues `dst[i] = bf16(src[i])` for `i < n`.
    fn convert(&self, f: &CudaFunction, src: u64, dst: u64, n: u64) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let blocks = n.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32;
        let n = n as i64;
        let mut lb = self.stream.launch_builder(f);
        lb.arg(&src);
        lb.arg(&dst);
        lb.arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the conversion entry takes (src, dst, n); both hold n elements.
        unsafe { lb.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Overwrites parameter `name` on the device (after an optimizer step).
    pub fn update_param(
        &self,
        params: &DeviceParams,
        name: &str,
        v: &[f32],
    ) -> Result<(), CudaError> {
        let (d, n) = params.bufs.get(name).ok_or_else(|| ExecError::Missing {
            what: "parameter",
            name: name.to_string(),
        })?;
        check_len(name, v.len(), *n)?;
        self.copy_in(d.ptr, v)
    }

    /// Binds schedule `l` at symbol values `sizes` (in `l.syms` order) with memory plan
    /// `plan`: allocates the arena, the inputs and the states (zeros), and takes the
    /// parameters from `params`. With `poison`, the arena starts as NaN bytes.
    pub fn bind(
        &self,
        l: &Lowered,
        sizes: &[i64],
        plan: MemoryPlan,
        params: &DeviceParams,
        poison: bool,
    ) -> Result<Bound, CudaError> {
        self.bind_in(l, sizes, plan, params, poison, None, &|_| None)
    }

    /// [`CudaExecutor::bind`], in `arena` when given (at least `plan.peak` bytes) instead
    /// of an arena of its own, and with the inputs and states `ext` names read from device
    /// memory in place (address, element count and dtype) instead of buffers of their own.
    #[allow(clippy::too_many_arguments)]
    fn bind_in(
        &self,
        l: &Lowered,
        sizes: &[i64],
        plan: MemoryPlan,
        params: &DeviceParams,
        poison: bool,
        arena: Option<u64>,
        ext: &dyn Fn(&str) -> Option<ExtValue>,
    ) -> Result<Bound, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        if plan.offsets.len() != l.buffers.len() || plan.bytes.len() != l.buffers.len() {
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
        if sizes.len() != l.syms.len() {
            return Err(ExecError::Plan(format!(
                "{} sizes for the symbols {:?}",
                sizes.len(),
                l.syms
            ))
            .into());
        }
        let own = match arena {
            Some(_) => None,
            None => Some(self.alloc("the arena", plan.peak)?),
        };
        let base = match (&own, arena) {
            (Some(a), _) => a.ptr,
            (None, Some(p)) => p,
            (None, None) => 0,
        };
        let cu = self.stream.cu_stream();
        if poison && plan.peak > 0 {
            // SAFETY: the arena holds at least `peak` bytes; 0xFF bytes are f32 NaNs.
            unsafe { result::memset_d8_async(base, 0xFF, plan.peak as usize, cu) }.map_err(drv)?;
        }
        let mut owned: Vec<DevBuf> = Vec::new();
        let mut ptrs: Vec<u64> = vec![0; l.buffers.len()];
        for (i, b) in l.buffers.iter().enumerate() {
            let bytes = plan.bytes[i];
            ptrs[i] = match &b.kind {
                BufKind::Temp | BufKind::Scratch => match plan.offsets[i] {
                    Some(off) => base + off,
                    None => 0,
                },
                BufKind::Param(name) => {
                    let (d, n) = params.bufs.get(name).ok_or_else(|| ExecError::Missing {
                        what: "parameter",
                        name: name.clone(),
                    })?;
                    check_len(name, *n, (bytes / b.dtype.size()) as usize)?;
                    d.ptr
                }
                BufKind::Input(name) | BufKind::State(name)
                    if let Some((ptr, n, dtype)) = ext(name) =>
                {
                    if b.dtype != dtype {
                        return Err(ExecError::Plan(format!(
                            "`{name}` is {} in the schedule; the device value is {dtype}",
                            b.dtype
                        ))
                        .into());
                    }
                    check_len(name, n, (bytes / b.dtype.size()) as usize)?;
                    ptr
                }
                BufKind::Input(name) | BufKind::State(name) => {
                    let what = match b.kind {
                        BufKind::Input(_) => "input",
                        _ => "state",
                    };
                    let d = self.alloc(&format!("{what} `{name}`"), bytes)?;
                    // SAFETY: `d` holds `bytes` bytes. States start at zero; inputs too, so
                    // a run before any write reads defined values.
                    unsafe { result::memset_d8_async(d.ptr, 0, bytes as usize, cu) }
                        .map_err(drv)?;
                    let ptr = d.ptr;
                    owned.push(d);
                    ptr
                }
            };
        }
        // Kernels assume it (vector accesses); every address above is an allocation's or a
        // 64-byte aligned arena offset.
        if let Some(i) = ptrs.iter().position(|p| p % ir::kernel::BUF_ALIGN != 0) {
            return Err(ExecError::Plan(format!(
                "buffer {i} at {:#x} is not {}-byte aligned",
                ptrs[i],
                ir::kernel::BUF_ALIGN
            ))
            .into());
        }
        // Matrix products whose weights have bf16 copies, and the largest converted input.
        let bind_sym = |s: &str| l.syms.iter().position(|x| x == s).map(|i| sizes[i] as u64);
        let mut half_rhs = vec![None; l.steps.len()];
        let mut half_bytes = 0u64;
        for (i, step) in l.steps.iter().enumerate() {
            let Step::MatMul {
                rhs, batch, m, k, ..
            } = step
            else {
                continue;
            };
            let BufKind::Param(name) = &l.buffers[*rhs].kind else {
                continue;
            };
            if let Some(h) = params.half.get(name) {
                half_rhs[i] = Some(h.ptr);
                let ev = |d: &ir::Dim| d.eval(&bind_sym).unwrap_or(0);
                half_bytes = half_bytes.max(2 * batch.eval(&bind_sym).unwrap_or(0) * ev(m) * ev(k));
            }
        }
        let half_lhs = if half_bytes > 0 {
            let d = self.alloc("bf16 matrix-product inputs", half_bytes)?;
            let p = d.ptr;
            owned.push(d);
            p
        } else {
            0
        };
        Ok(Bound {
            sizes: sizes.to_vec(),
            plan,
            ptrs,
            carry: Vec::new(),
            half_rhs,
            half_lhs,
            lanes: self.lanes(l)?,
            graph: None,
            _arena: own,
            _owned: owned,
        })
    }

    /// Writes input or state `name` of a bound schedule from the host.
    pub fn write(
        &self,
        l: &Lowered,
        b: &Bound,
        name: &str,
        data: &HostData,
    ) -> Result<(), CudaError> {
        match data {
            HostData::I32(v) => self.write_slice(l, b, name, v, true),
            HostData::F32(v) => self.write_slice(l, b, name, v, false),
        }
    }

    /// [`CudaExecutor::write`] from an f32 slice (states: no host copy first).
    pub fn write_f32(
        &self,
        l: &Lowered,
        b: &Bound,
        name: &str,
        data: &[f32],
    ) -> Result<(), CudaError> {
        self.write_slice(l, b, name, data, false)
    }

    fn write_slice<T>(
        &self,
        l: &Lowered,
        b: &Bound,
        name: &str,
        data: &[T],
        int: bool,
    ) -> Result<(), CudaError> {
        let i = named(l, name, false).ok_or_else(|| ExecError::Missing {
            what: "input or state",
            name: name.to_string(),
        })?;
        if int != (l.buffers[i].dtype == ir::DType::I32) {
            return Err(ExecError::Plan(format!(
                "`{name}` is {} on the device; the host data has another type",
                l.buffers[i].dtype
            ))
            .into());
        }
        let want = (b.plan.bytes[i] / l.buffers[i].dtype.size()) as usize;
        check_len(name, data.len(), want)?;
        if l.buffers[i].dtype == ir::DType::BF16 {
            // An f32 activation from the host into a bf16 buffer: rounded here.
            // SAFETY: a bf16 buffer is written only from f32 data (`int` is false).
            let f = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<f32>(), data.len()) };
            return self.copy_in(b.ptrs[i], &crate::cpu::to_bf16_bits(f));
        }
        self.copy_in(b.ptrs[i], data)
    }

    /// Makes every run of `b` end by copying each final state (an output named like a state
    /// input) into that state's buffer, so the next run continues from it.
    pub fn carry_states(&self, l: &Lowered, b: &mut Bound) -> Result<(), CudaError> {
        if b.graph.is_some() {
            return Err(ExecError::Plan("the schedule was already captured".into()).into());
        }
        b.carry.clear();
        for (i, buf) in l.buffers.iter().enumerate() {
            let BufKind::State(name) = &buf.kind else {
                continue;
            };
            let Some(o) = named(l, name, true) else {
                continue;
            };
            if b.plan.bytes[o] != b.plan.bytes[i] {
                return Err(ExecError::Size {
                    name: name.clone(),
                    got: b.plan.bytes[o] as usize,
                    want: b.plan.bytes[i] as usize,
                }
                .into());
            }
            if b.ptrs[o] != b.ptrs[i] && b.plan.bytes[i] > 0 {
                b.carry
                    .push((b.ptrs[o], b.ptrs[i], b.plan.bytes[i] as usize));
            }
        }
        Ok(())
    }

    /// Copies the final states of a run of `from` into the state buffers of `to` (prefill to
    /// decode); states of `to` with no final state in `from` are left alone.
    pub fn copy_states(
        &self,
        lf: &Lowered,
        from: &Bound,
        lt: &Lowered,
        to: &Bound,
    ) -> Result<(), CudaError> {
        for (i, buf) in lt.buffers.iter().enumerate() {
            let BufKind::State(name) = &buf.kind else {
                continue;
            };
            let Some(o) = named(lf, name, true) else {
                continue;
            };
            let (n, m) = (from.plan.bytes[o], to.plan.bytes[i]);
            if n != m {
                return Err(ExecError::Size {
                    name: name.clone(),
                    got: n as usize,
                    want: m as usize,
                }
                .into());
            }
            if n > 0 {
                // SAFETY: both buffers hold `n` bytes and are live in `from` and `to`.
                unsafe {
                    result::memcpy_dtod_async(
                        to.ptrs[i],
                        from.ptrs[o],
                        n as usize,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(drv)?;
            }
        }
        Ok(())
    }

    /// Runs a bound schedule (asynchronously: [`CudaExecutor::read`] waits for it). With
    /// `opts.graph`, the first run captures the steps as a CUDA graph and every run replays
    /// it. With `opts.profile`, each step is timed with events (the run then waits) and the
    /// times are returned.
    pub fn run(
        &self,
        l: &Lowered,
        b: &mut Bound,
        opts: ExecOptions,
    ) -> Result<Vec<StepTime>, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        if opts.graph && !opts.profile && !opts.sync_each_step {
            if b.graph.is_none() {
                self.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(drv)?;
                let enq = self.enqueue(l, b, None, false);
                let ended = self
                    .stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(drv);
                enq?;
                b.graph = Some(ended?.ok_or_else(|| drv("the captured graph is empty"))?);
            }
            if let Some(g) = &b.graph {
                g.launch().map_err(drv)?;
            }
            return Ok(Vec::new());
        }
        if opts.profile {
            let mut times = Vec::new();
            self.enqueue(l, b, Some(&mut times), opts.sync_each_step)?;
            return Ok(times);
        }
        self.enqueue(l, b, None, opts.sync_each_step)?;
        Ok(Vec::new())
    }

    /// Waits for everything enqueued on the executor's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(drv)
    }

    /// Output `name` of the last run (waits for it); `rows`: only elements `start..end`.
    pub fn read(
        &self,
        l: &Lowered,
        b: &Bound,
        name: &str,
        range: Option<std::ops::Range<usize>>,
    ) -> Result<Vec<f32>, CudaError> {
        let o = named(l, name, true).ok_or_else(|| ExecError::Missing {
            what: "output",
            name: name.to_string(),
        })?;
        self.read_buf(l, b, o, name, range)
    }

    /// The current value of state `name` of a bound schedule (waits for the last run).
    pub fn read_state(&self, l: &Lowered, b: &Bound, name: &str) -> Result<Vec<f32>, CudaError> {
        let i = named(l, name, false).ok_or_else(|| ExecError::Missing {
            what: "state",
            name: name.to_string(),
        })?;
        self.read_buf(l, b, i, name, None)
    }

    fn read_buf(
        &self,
        l: &Lowered,
        b: &Bound,
        i: usize,
        name: &str,
        range: Option<std::ops::Range<usize>>,
    ) -> Result<Vec<f32>, CudaError> {
        self.stream.synchronize().map_err(drv)?;
        let dtype = l.buffers[i].dtype;
        let len = (b.plan.bytes[i] / dtype.size()) as usize;
        let r = range.unwrap_or(0..len);
        if r.start > r.end || r.end > len {
            return Err(ExecError::Size {
                name: name.to_string(),
                got: r.end,
                want: len,
            }
            .into());
        }
        if b.ptrs[i] == 0 || r.is_empty() {
            return Ok(vec![0f32; r.len()]);
        }
        download(b.ptrs[i] + dtype.size() * r.start as u64, r.len(), dtype)
    }

    /// Enqueues every step of `l` on the stream, then the state carries.
    fn enqueue(
        &self,
        l: &Lowered,
        b: &Bound,
        times: Option<&mut Vec<StepTime>>,
        sync_each_step: bool,
    ) -> Result<(), CudaError> {
        let timing = times.is_some();
        let mut events = Vec::new();
        let event = || {
            self.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)
        };
        for (si, step) in l.steps.iter().enumerate() {
            let start = if timing {
                let e = event()?;
                e.record(&self.stream).map_err(drv)?;
                Some(e)
            } else {
                None
            };
            let (name, node) = match step {
                Step::Kernel { kernel, bufs, node } => {
                    self.launch(l, *kernel, bufs, b, node)?;
                    (l.kernels[*kernel].name.clone(), node.to_string())
                }
                Step::MatMul { node, .. } => {
                    self.matmul(l, step, b, b.half_rhs.get(si).copied().flatten())?;
                    ("matmul".to_string(), node.to_string())
                }
            };
            if sync_each_step {
                self.stream.synchronize().map_err(|e| match step {
                    Step::Kernel { .. } => CudaError::Kernel {
                        kernel: name.clone(),
                        node: node.clone(),
                        message: e.to_string(),
                    },
                    Step::MatMul { .. } => CudaError::Gemm {
                        node: node.clone(),
                        message: e.to_string(),
                    },
                })?;
            }
            if let Some(s) = start {
                let e = event()?;
                e.record(&self.stream).map_err(drv)?;
                let (bytes, flops) = step_cost(l, b, step);
                events.push((name, node, s, e, bytes, flops));
            }
        }
        for &(from, to, bytes) in &b.carry {
            // SAFETY: both are live buffers of `bytes` bytes (checked in `carry_states`).
            unsafe { result::memcpy_dtod_async(to, from, bytes, self.stream.cu_stream()) }
                .map_err(drv)?;
        }
        if let Some(times) = times {
            self.stream.synchronize().map_err(drv)?;
            for (name, node, s, e, bytes, flops) in events {
                let ms = s.elapsed_ms(&e).map_err(drv)?;
                times.push(StepTime {
                    name,
                    node,
                    ms,
                    bytes,
                    flops,
                });
            }
        }
        Ok(())
    }

    fn launch(
        &self,
        l: &Lowered,
        kernel: usize,
        bufs: &[usize],
        b: &Bound,
        node: &ir::NodeId,
    ) -> Result<(), CudaError> {
        let k = &l.kernels[kernel];
        let (ptrs, sizes) = (&b.ptrs, &b.sizes);
        let Launch {
            threads: lanes,
            per,
            shared,
        } = b.lanes.get(kernel).copied().unwrap_or_default();
        let fail = |message: String| CudaError::Kernel {
            kernel: k.name.clone(),
            node: node.to_string(),
            message,
        };
        if sizes.len() != k.sizes.len() || bufs.len() != k.bufs.len() {
            return Err(fail(format!(
                "{} buffers and {} sizes given, {} and {} expected",
                bufs.len(),
                sizes.len(),
                k.bufs.len(),
                k.sizes.len()
            )));
        }
        let points = grid_points(&k.grid, sizes);
        let func = match &self.funcs32[kernel] {
            Some(f) if self.index32() && fits_index32(&points, bufs, k, b) => f,
            _ => &self.funcs[kernel],
        };
        let total = match points {
            Ok(Some(0)) => return Ok(()),
            Ok(Some(n)) => n.div_ceil(u64::from(per)).saturating_mul(u64::from(lanes)),
            // Extents read from device buffers: the kernel loops over its grid.
            Ok(None) => MAX_BLOCKS * u64::from(BLOCK),
            Err(m) => return Err(fail(m)),
        };
        let blocks = total.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32;
        let args: Vec<u64> = bufs.iter().map(|&b| ptrs[b]).collect();
        let mut lb = self.stream.launch_builder(func);
        for a in &args {
            lb.arg(a);
        }
        for s in sizes {
            lb.arg(s);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: the arguments are the entry's parameters in order (a device address per
        // buffer, then the i64 sizes); every address is a live allocation sized by the
        // memory plan for these sizes.
        unsafe { lb.launch(cfg) }.map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    fn matmul(
        &self,
        l: &Lowered,
        step: &Step,
        b: &Bound,
        half_rhs: Option<u64>,
    ) -> Result<(), CudaError> {
        let (ptrs, sizes) = (&b.ptrs, &b.sizes);
        let Step::MatMul {
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
        } = step
        else {
            return Ok(());
        };
        let fail = |message: String| CudaError::Gemm {
            node: node.to_string(),
            message,
        };
        let bind = |s: &str| l.syms.iter().position(|x| x == s).map(|i| sizes[i] as u64);
        let ev = |d: &ir::Dim| {
            d.eval(&bind)
                .ok_or_else(|| fail(format!("cannot evaluate {d}")))
        };
        let bt = batch
            .eval(&bind)
            .ok_or_else(|| fail(format!("cannot evaluate {batch}")))?;
        let (m, k, n) = (ev(m)?, ev(k)?, ev(n)?);
        if bt == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let types = (
            l.buffers[*lhs].dtype,
            l.buffers[*rhs].dtype,
            l.buffers[*out].dtype,
        );
        if k == 0 {
            // SAFETY: `out` holds batch*m*n values of its dtype.
            unsafe {
                result::memset_d8_async(
                    ptrs[*out],
                    0,
                    (bt * m * n * types.2.size()) as usize,
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| fail(e.to_string()))?;
            return Ok(());
        }
        let int = |x: u64| i32::try_from(x).map_err(|_| fail(format!("{x} exceeds i32")));
        let (mi, ki, ni, bi) = (int(m)?, int(k)?, int(n)?, int(bt)?);
        // Row-major C[M,N] = A[M,K] B is column-major C^T = B^T A^T: cuBLAS computes
        // (N x M) = op(B) (N x K) * A (K x M).
        let (op_b, ldb) = if *rhs_t {
            (cublasOperation_t::CUBLAS_OP_T, ki)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, ni)
        };
        let stride_b = if *rhs_batched { (k * n) as i64 } else { 0 };
        // lhs [M, K] row-major is column-major [K, M] (ld K); stored [K, M] (`lhs_t`) it is
        // column-major [M, K] (ld M), transposed by cuBLAS.
        let (op_a, lda) = if *lhs_t {
            (cublasOperation_t::CUBLAS_OP_T, mi)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, ki)
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // GemmEx for bf16 operands (bf16 activations), for bf16 weights (the input converted
        // to bf16 first) and for TF32 tensor cores; plain sgemm otherwise. Accumulation is
        // f32 in every case.
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use ir::DType::{BF16, F32};
        let tf32 = !*exact && self.tf32.load(std::sync::atomic::Ordering::Relaxed);
        let (bf16, f32) = (cudaDataType::CUDA_R_16BF, cudaDataType::CUDA_R_32F);
        let out_type = match types.2 {
            F32 => f32,
            BF16 => bf16,
            d => return Err(fail(format!("a {d} product result"))),
        };
        let ex = match (types, half_rhs, &self.to_bf16) {
            ((BF16, BF16, _), _, _) => Some((
                ptrs[*rhs],
                ptrs[*lhs],
                bf16,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )),
            ((F32, F32, F32), Some(w), Some(cvt)) => {
                self.convert(cvt, ptrs[*lhs], b.half_lhs, bt * m * k)
                    .map_err(|e| fail(e.to_string()))?;
                Some((w, b.half_lhs, bf16, cublasComputeType_t::CUBLAS_COMPUTE_32F))
            }
            ((F32, F32, F32), _, _) if tf32 => Some((
                ptrs[*rhs],
                ptrs[*lhs],
                f32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            )),
            ((F32, F32, F32), _, _) => None,
            ((a, r, o), _, _) => {
                return Err(fail(format!("no product of {a} and {r} into {o}")));
            }
        };
        if let Some((rhs_ptr, lhs_ptr, in_type, compute)) = ex {
            // SAFETY: as for sgemm below: the operands hold k*n (per batch if batched) and
            // batch*m*k values of `in_type` (bf16 buffers, bf16 weights and the bf16 copy of
            // the input, sized for the largest such product at bind, or the f32 buffers),
            // the output batch*m*n values of `out_type`.
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    op_b,
                    op_a,
                    ni,
                    mi,
                    ki,
                    (&alpha as *const f32).cast(),
                    rhs_ptr as *const std::ffi::c_void,
                    in_type,
                    ldb,
                    stride_b,
                    lhs_ptr as *const std::ffi::c_void,
                    in_type,
                    lda,
                    (m * k) as i64,
                    (&beta as *const f32).cast(),
                    ptrs[*out] as *mut std::ffi::c_void,
                    out_type,
                    ni,
                    (m * n) as i64,
                    bi,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| fail(e.to_string()))?;
            return Ok(());
        }
        // SAFETY: the buffers hold batch*m*k, k*n (per batch if batched) and batch*m*n f32
        // values by construction of the schedule and the plan.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *self.blas.handle(),
                op_b,
                op_a,
                ni,
                mi,
                ki,
                &alpha,
                ptrs[*rhs] as *const f32,
                ldb,
                stride_b,
                ptrs[*lhs] as *const f32,
                lda,
                (m * k) as i64,
                &beta,
                ptrs[*out] as *mut f32,
                ni,
                (m * n) as i64,
                bi,
            )
        }
        .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// Runs the schedule once: uploads the parameters, inputs and states, runs every step
    /// and returns every graph output (f32) by name, in output order.
    pub fn execute(
        &self,
        l: &Lowered,
        plan: &MemoryPlan,
        inp: &Inputs<'_>,
        opts: ExecOptions,
    ) -> Result<Outputs, CudaError> {
        let params = self.upload_params(inp.params)?;
        self.execute_with(l, plan, inp, &params, opts)
    }

    /// [`CudaExecutor::execute`] with parameters already on the device (`inp.params` is
    /// not read): [`CudaExecutor::run_resident`] in an arena of its own, every output
    /// downloaded.
    pub fn execute_with(
        &self,
        l: &Lowered,
        plan: &MemoryPlan,
        inp: &Inputs<'_>,
        params: &DeviceParams,
        opts: ExecOptions,
    ) -> Result<Outputs, CudaError> {
        let mut arena = DeviceArena::default();
        let outs = self.run_resident(
            l,
            plan,
            inp,
            &HashMap::new(),
            params,
            &mut arena,
            opts,
            None,
            &|_| true,
        )?;
        Ok(outs.host)
    }

    /// `result` once everything enqueued has finished, so that no buffer freed on the way
    /// out (an arena, inputs, values) is still in use by the device, whether the run
    /// succeeded or failed part way.
    fn settle<T>(&self, result: Result<T, CudaError>) -> Result<T, CudaError> {
        let synced = self.stream.synchronize().map_err(drv);
        let value = result?;
        synced?;
        Ok(value)
    }

    /// `sums[name] += x` (`n` f32 values at `x`) on the stream.
    fn add_into(
        &self,
        sums: &mut DeviceSums,
        name: &str,
        x: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        if !sums.bufs.contains_key(name) {
            let d = self.alloc(&format!("the sum of `{name}`"), 4 * n as u64)?;
            if n > 0 {
                // SAFETY: `d` holds n f32 values.
                unsafe { result::memset_d8_async(d.ptr, 0, 4 * n, self.stream.cu_stream()) }
                    .map_err(drv)?;
            }
            sums.bufs.insert(name.to_string(), (d, n));
        }
        let (d, len) = &sums.bufs[name];
        check_len(name, n, *len)?;
        if n == 0 || x == 0 {
            return Ok(());
        }
        let count = i32::try_from(n).map_err(|_| CudaError::Gemm {
            node: name.to_string(),
            message: format!("{n} values exceed i32"),
        })?;
        let one = 1.0f32;
        // SAFETY: `x` and the sum hold n f32 values each; both are device memory of this
        // context and the add is ordered on the executor's stream.
        unsafe {
            cudarc::cublas::sys::cublasSaxpy_v2(
                *self.blas.handle(),
                count,
                &one,
                x as *const f32,
                1,
                d.ptr as *mut f32,
                1,
            )
        }
        .result()
        .map_err(|e| CudaError::Gemm {
            node: name.to_string(),
            message: e.to_string(),
        })
    }

    /// Runs schedule `l` once at `inp.sizes` with memory plan `plan`, in `arena` (grown if
    /// needed; with `opts.poison` filled with NaN first): inputs and states named in
    /// `device` are read in place, the others are uploaded from `inp.data` and
    /// `inp.states` (`inp.params` is not read; states missing everywhere start at zero);
    /// outputs `sum` picks are added into device sums (a zero buffer the first time a name
    /// comes), those `to_host` picks are downloaded, and the rest stay on the device,
    /// copied out of the arena. Waits for the run, whether it succeeds or fails.
    #[allow(clippy::too_many_arguments)]
    pub fn run_resident(
        &self,
        l: &Lowered,
        plan: &MemoryPlan,
        inp: &Inputs<'_>,
        device: &HashMap<String, &DeviceValue>,
        params: &DeviceParams,
        arena: &mut DeviceArena,
        opts: ExecOptions,
        mut sum: Option<SumInto<'_>>,
        to_host: &dyn Fn(&str) -> bool,
    ) -> Result<ResidentOutputs, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        if arena.bytes < plan.peak || arena.buf.is_none() {
            (arena.buf, arena.bytes) = (None, 0);
            arena.buf = Some(self.alloc("the arena", plan.peak)?);
            arena.bytes = plan.peak;
        }
        let base = arena.buf.as_ref().map_or(0, |b| b.ptr);
        let ext = |name: &str| device.get(name).map(|v| (v.buf.ptr, v.len, v.dtype));
        let mut b = self.bind_in(
            l,
            inp.sizes,
            plan.clone(),
            params,
            opts.poison,
            Some(base),
            &ext,
        )?;
        for buf in &l.buffers {
            let (BufKind::Input(name) | BufKind::State(name)) = &buf.kind else {
                continue;
            };
            if device.contains_key(name) {
                continue;
            }
            if let BufKind::Input(_) = buf.kind {
                let d = inp.data.get(name).ok_or_else(|| ExecError::Missing {
                    what: "input",
                    name: name.clone(),
                })?;
                self.write(l, &b, name, d)?;
            } else if let Some(v) = inp.states.get(name) {
                self.write_f32(l, &b, name, v)?;
            }
        }
        let plain = ExecOptions {
            graph: false,
            profile: false,
            ..opts
        };
        let result = (|| {
            self.run(l, &mut b, plain)?;
            let mut out = ResidentOutputs {
                host: Vec::new(),
                device: Vec::new(),
                device_used: 0,
            };
            let cu = self.stream.cu_stream();
            for (name, o) in &l.outputs {
                let dtype = l.buffers[*o].dtype;
                let bytes = b.plan.bytes[*o] as usize;
                let (ptr, n) = (b.ptrs[*o], bytes / dtype.size() as usize);
                if let Some((sums, pick)) = sum.as_mut()
                    && pick(name)
                {
                    if dtype != ir::DType::F32 {
                        return Err(
                            ExecError::Plan(format!("`{name}` is {dtype}; sums are f32")).into(),
                        );
                    }
                    self.add_into(sums, name, ptr, n)?;
                } else if to_host(name) {
                    out.host
                        .push((name.clone(), self.read_buf(l, &b, *o, name, None)?));
                } else {
                    let d = self.alloc(&format!("the value `{name}`"), bytes as u64)?;
                    // SAFETY: `d` holds the output's bytes, as does the output where it has
                    // a buffer (one without is all zeros, as `read` returns it); both are
                    // ordered after the run on the executor's stream.
                    unsafe {
                        match ptr {
                            0 => result::memset_d8_async(d.ptr, 0, bytes, cu),
                            _ => result::memcpy_dtod_async(d.ptr, ptr, bytes, cu),
                        }
                    }
                    .map_err(drv)?;
                    out.device.push((
                        name.clone(),
                        DeviceValue {
                            buf: d,
                            len: n,
                            dtype,
                        },
                    ));
                }
            }
            Ok(out)
        })();
        // The copies and sums read the arena, which the next run reuses.
        let mut out = self.settle(result)?;
        let (free, total) = self.memory_info()?;
        out.device_used = total.saturating_sub(free);
        Ok(out)
    }

    /// The elements of a device value (waits for the stream).
    pub fn download_value(&self, v: &DeviceValue) -> Result<Vec<f32>, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        if v.len == 0 {
            return Ok(Vec::new());
        }
        download(v.buf.ptr, v.len, v.dtype)
    }

    /// Every parameter on the host (waits for the stream).
    pub fn download_params(
        &self,
        params: &DeviceParams,
    ) -> Result<HashMap<String, Vec<f32>>, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        let mut out = HashMap::with_capacity(params.bufs.len());
        for (name, (d, n)) in &params.bufs {
            let v = if *n == 0 {
                Vec::new()
            } else {
                download(d.ptr, *n, ir::DType::F32)?
            };
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    /// The 2-norm of every sum (cuBLAS `snrm2`, which scales as it sums; waits).
    pub fn norms(&self, sums: &DeviceSums) -> Result<HashMap<String, f64>, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        let mut out = HashMap::with_capacity(sums.bufs.len());
        for (name, (d, n)) in &sums.bufs {
            let fail = |message: String| CudaError::Gemm {
                node: name.clone(),
                message,
            };
            let count = i32::try_from(*n).map_err(|_| fail(format!("{n} values exceed i32")))?;
            let mut norm = 0f32;
            if count > 0 {
                // SAFETY: the sum holds n f32 values on this context's device; the result is
                // written to host memory (cuBLAS's default pointer mode) before it returns.
                unsafe {
                    cudarc::cublas::sys::cublasSnrm2_v2(
                        *self.blas.handle(),
                        count,
                        d.ptr as *const f32,
                        1,
                        &mut norm,
                    )
                }
                .result()
                .map_err(|e| fail(e.to_string()))?;
            }
            out.insert(name.clone(), f64::from(norm));
        }
        self.stream.synchronize().map_err(drv)?;
        Ok(out)
    }

    /// One AdamW step of each parameter in `rows` (in place, on the device): `entry` is this
    /// executor's entry of [`ir::kernel::Kernel::adamw`], `grads` the parameters' gradient
    /// sums (named `grad.{parameter}`), `m` and `v` the moments, and each row the hyperparameters of one parameter
    /// ([`ir::kernel::ADAMW_HYPER`] values). Every length is checked before anything
    /// changes. Waits for the update.
    pub fn adamw(
        &self,
        entry: usize,
        params: &DeviceParams,
        grads: &DeviceSums,
        m: &DeviceParams,
        v: &DeviceParams,
        rows: &[(String, [f32; ir::kernel::ADAMW_HYPER])],
    ) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        let func = self
            .funcs
            .get(entry)
            .ok_or_else(|| CudaError::Module(format!("no entry {entry} for the AdamW kernel")))?;
        let mut ptrs = Vec::with_capacity(rows.len());
        for (name, _) in rows {
            let get = |what: &'static str, t: &HashMap<String, (DevBuf, usize)>, key: &str| {
                t.get(key)
                    .map(|(d, n)| (d.ptr, *n))
                    .ok_or_else(|| ExecError::Missing {
                        what,
                        name: key.to_string(),
                    })
            };
            let (p, n) = get("parameter", &params.bufs, name)?;
            let parts = [
                get("gradient", &grads.bufs, &format!("grad.{name}"))?,
                get("first moment", &m.bufs, name)?,
                get("second moment", &v.bufs, name)?,
            ];
            for (_, len) in parts {
                check_len(name, len, n)?;
            }
            ptrs.push((p, parts[0].0, parts[1].0, parts[2].0, n));
        }
        let table: Vec<f32> = rows.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        let hyper = self.upload("the AdamW hyperparameters", &table)?;
        for (row, &(p, g, mm, vv, n)) in ptrs.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let blocks = (n as u64).div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32;
            let sizes = [n as i64, row as i64];
            let mut lb = self.stream.launch_builder(func);
            for a in [&p, &g, &mm, &vv, &hyper.ptr] {
                lb.arg(a);
            }
            for s in &sizes {
                lb.arg(s);
            }
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the entry is `Kernel::adamw` (param, grad, m, v, hyper; n, row): the four
            // tensors hold n f32 values each (checked above) and the table a row per
            // parameter; everything is ordered on the executor's stream.
            unsafe { lb.launch(cfg) }.map_err(|e| CudaError::Kernel {
                kernel: "adamw".into(),
                node: rows[row].0.clone(),
                message: e.to_string(),
            })?;
        }
        // The table is freed on return: wait for the kernels that read it.
        self.stream.synchronize().map_err(drv)
    }

    /// Downloads every sum (waits for the stream).
    pub fn read_sums(&self, sums: &DeviceSums) -> Result<HashMap<String, Vec<f32>>, CudaError> {
        self.stream.synchronize().map_err(drv)?;
        let mut out = HashMap::with_capacity(sums.bufs.len());
        for (name, (d, n)) in &sums.bufs {
            let mut v = vec![0f32; *n];
            if *n > 0 {
                // SAFETY: the sum holds n f32 values.
                unsafe { result::memcpy_dtoh_sync(&mut v, d.ptr) }.map_err(drv)?;
            }
            out.insert(name.clone(), v);
        }
        Ok(out)
    }
}

/// Modules loaded so far, by GPU and PTX text (at most [`MODULE_CACHE_ENTRIES`], oldest
/// dropped first): executors of equal kernels (a checkpointed step's layer groups) share one
/// load, where the driver compiles the PTX to machine code.
static MODULES: std::sync::Mutex<Vec<(usize, String, Arc<CudaModule>)>> =
    std::sync::Mutex::new(Vec::new());

/// How many modules [`module_for`] keeps loaded.
pub const MODULE_CACHE_ENTRIES: usize = 32;

/// The module of `ptx` on GPU `ordinal`, loaded once. Every executor on a GPU uses its
/// primary context, so a module loaded for one serves the others.
fn module_for(
    ctx: &Arc<CudaContext>,
    ordinal: usize,
    ptx: &str,
) -> Result<Arc<CudaModule>, CudaError> {
    let hit = |c: &Vec<(usize, String, Arc<CudaModule>)>| {
        c.iter()
            .find(|(o, text, _)| *o == ordinal && text == ptx)
            .map(|(_, _, m)| m.clone())
    };
    if let Some(m) = MODULES.lock().ok().and_then(|c| hit(&c)) {
        return Ok(m);
    }
    let m = ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(|e| CudaError::Module(e.to_string()))?;
    if let Ok(mut c) = MODULES.lock() {
        if c.len() >= MODULE_CACHE_ENTRIES {
            c.remove(0);
        }
        c.push((ordinal, ptx.to_string(), m.clone()));
    }
    Ok(m)
}

/// `n` values of `dtype` (f32 or bf16) at device address `ptr`, as f32 (after everything
/// enqueued: the caller synchronized).
fn download(ptr: u64, n: usize, dtype: ir::DType) -> Result<Vec<f32>, CudaError> {
    match dtype {
        ir::DType::F32 => {
            let mut v = vec![0f32; n];
            // SAFETY: the caller's buffer holds `n` f32 values at `ptr`.
            unsafe { result::memcpy_dtoh_sync(&mut v, ptr) }.map_err(drv)?;
            Ok(v)
        }
        ir::DType::BF16 => {
            let mut bits = vec![0u16; n];
            // SAFETY: the caller's buffer holds `n` bf16 values at `ptr`.
            unsafe { result::memcpy_dtoh_sync(&mut bits, ptr) }.map_err(drv)?;
            Ok(crate::cpu::from_bf16_bits(&bits))
        }
        d => Err(ExecError::Plan(format!("cannot read {d} values as f32")).into()),
    }
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

fn alloc_on(ctx: &CudaContext, what: &str, bytes: u64) -> Result<DevBuf, CudaError> {
    let n = usize::try_from(bytes.max(1)).map_err(drv)?;
    ctx.bind_to_thread().map_err(drv)?;
    // SAFETY: a plain device allocation in the bound context.
    match unsafe { result::malloc_sync(n) } {
        Ok(ptr) => Ok(DevBuf { ptr }),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            let free = ctx.mem_get_info().map(|(f, _)| f as u64).unwrap_or(0);
            Err(CudaError::OutOfMemory {
                what: what.to_string(),
                requested: bytes,
                free,
            })
        }
        Err(e) => Err(drv(e)),
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

/// The names of the `.entry`s defined in PTX text.
fn ptx_entries(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|line| {
        let rest = line.trim_start().strip_prefix(".visible .entry ")?;
        rest.split('(').next().map(str::trim)
    })
}

/// Whether a launch of kernel `k` over `points` grid points with buffers `bufs` of binding
/// `b` may run the kernel's 32-bit entry ([`index32_fits`]).
fn fits_index32(
    points: &Result<Option<u64>, String>,
    bufs: &[usize],
    k: &ir::kernel::Kernel,
    b: &Bound,
) -> bool {
    let points = points.as_ref().ok().copied().flatten();
    // A buffer the plan does not size counts as too large.
    let elems = bufs.iter().zip(&k.bufs).map(|(&i, kb)| {
        b.plan
            .bytes
            .get(i)
            .map_or(u64::MAX, |&n| n / kb.dtype.size().max(1))
    });
    index32_fits(points, elems, &b.sizes)
}

/// Whether the grid (`None`: sized by device values), every buffer's element count and
/// every size are below [`ir::kernel::INDEX32_LIMIT`].
fn index32_fits(points: Option<u64>, mut elems: impl Iterator<Item = u64>, sizes: &[i64]) -> bool {
    let limit = ir::kernel::INDEX32_LIMIT;
    points.is_some_and(|n| n < limit)
        && elems.all(|n| n < limit)
        && sizes.iter().all(|&s| (0..limit as i64).contains(&s))
}

/// The number of grid points, or `None` if an extent reads a device buffer.
fn grid_points(grid: &[IExpr], sizes: &[i64]) -> Result<Option<u64>, String> {
    let ev = ir::kernel::eval::extent;
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

#[cfg(test)]
mod tests {
    #[test]
    fn ptx_entries_lists_the_defined_entries() {
        let ptx = "// comment .visible .entry nope(\n.visible .entry a_1(\n\t.param .u64 a_1_param_0\n)\n{\n}\n.visible .entry a_1_idx32(\n.func f(\n";
        let names: Vec<&str> = super::ptx_entries(ptx).collect();
        assert_eq!(names, ["a_1", "a_1_idx32"]);
    }

    #[test]
    fn the_32_bit_entry_runs_only_below_the_limit() {
        use super::index32_fits as fits;
        let lim = ir::kernel::INDEX32_LIMIT;
        let under = [1u64, lim - 1];
        assert!(fits(
            Some(lim - 1),
            under.into_iter(),
            &[1, (lim - 1) as i64]
        ));
        // The grid, any buffer or any size at the limit, or a grid sized on the device.
        assert!(!fits(Some(lim), under.into_iter(), &[1]));
        assert!(!fits(Some(8), [1, lim].into_iter(), &[1]));
        assert!(!fits(Some(8), under.into_iter(), &[lim as i64]));
        assert!(!fits(Some(8), under.into_iter(), &[-1]));
        assert!(!fits(None, under.into_iter(), &[1]));
    }
}
