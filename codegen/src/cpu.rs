//! The CPU backend: kernel IR to native code with the Cranelift JIT.
//!
//! # The generated function
//!
//! Every kernel becomes one function with the C ABI
//!
//! ```text
//! extern "C" fn(bufs: *const *mut u8, sizes: *const i64, start: i64, end: i64)
//! ```
//!
//! It runs the kernel body for the grid points `start..end` of the flattened, row-major grid.
//! `bufs[i]` is the address of buffer `i`'s first element, `sizes[i]` the runtime size `i`.
//! The grid extents are computed inside from `sizes`; `start` is split into coordinates once
//! (div/rem), later points increment the coordinates with carries (no division per point).
//!
//! Lowering:
//! - compute is f32; loads convert from the storage dtype (f64: `fdemote`; bf16: the 16 bits
//!   shifted into the top of an f32; f16: a call to [`half`]; i32/i64: `fcvt_from_sint`) and
//!   stores convert back (f64: `fpromote`; bf16: round to nearest even with the
//!   `0x7FFF + lsb` trick, NaNs stay quiet NaNs; f16: [`half`]). Stores to integer buffers are
//!   not supported (the evaluator gives them no integer semantics).
//! - `IExpr::LoadIndex` reads i32 (sign-extended) or i64 buffers; `IExpr::Min` is `smin`.
//! - `IExpr::Div`/`Rem` are floor division/remainder (as the evaluator's `div_euclid`), exact
//!   for negative dividends too: shifts and masks for power-of-two constants, Cranelift's
//!   magic-number division for other constants, `sdiv` plus a fix-up otherwise. A divisor
//!   that is not positive is undefined behaviour (a trap) unless bounds checks are on.
//! - scalars are Cranelift `Variable`s, `For` loops are rotated loops over a counter
//!   variable, local arrays are stack slots (at most [`MAX_LOCAL_BYTES`] per kernel).
//! - `exp` is inline f32 code (Cephes `expf`, about 1 ulp); `sigmoid` and `silu` are built on
//!   it with the evaluator's stable formula. `log` and `softplus` call Rust helpers that
//!   evaluate the very formula of [`ir::kernel::eval::unary`] in f64 and round once; with
//!   [`CpuOptions::exact_math`] `exp`, `sigmoid` and `silu` do so too, and then every op
//!   agrees with the reference evaluator's f32 mode. `rsqrt` is `1/sqrt` in f64, rounded
//!   once, for the same reason. `max`/`min` follow `f32::max`/`f32::min`: a NaN operand
//!   yields the other one (the sign of a zero result of `max(-0, +0)` is unspecified).
//!
//! Variables, local arrays and loop counters follow the evaluator's semantics: declaring a
//! scalar or an array whose id is already declared in an enclosing block replaces it (there
//! is no shadowing); a nested loop reusing a counter id shadows the outer counter.
//!
//! # Bounds checks
//!
//! With [`CpuOptions::bounds_checks`], every buffer access, local-array access and divisor is
//! checked; the first violation stops the chunk and [`CpuKernel::run`] reports it as
//! [`CodegenError::OutOfBounds`]. The ABI then has two extras: `sizes` holds the buffer
//! lengths (in elements) after the kernel's sizes, and `bufs[n_bufs]` points at an
//! `[i64; 4]` record (kind, buffer or array, index, length) the function fills on a violation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    AbiParam, Block, BlockArg, FuncRef, InstBuilder, MemFlagsData, StackSlot, StackSlotData,
    StackSlotKind, Type, UserFuncName, Value, types,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleError, default_libcall_names};
use ir::kernel::{ArrId, Expr, IExpr, Kernel, KernelError, LoopId, Stmt, TileId, VarId};
use ir::{BinaryOp, DType, UnaryOp};
use rayon::prelude::*;

/// The most stack memory the local arrays of one kernel may take, in bytes.
pub const MAX_LOCAL_BYTES: usize = 256 * 1024;

/// Roughly how much work (in IR operations) one parallel chunk should do at least.
const CHUNK_WORK: f64 = 32_768.0;

/// The generated function: `(bufs, sizes, start, end)`.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64);

/// Why compiling or running a kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The kernel breaks an invariant of [`Kernel::check`].
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The host machine or a Cranelift setting is not supported.
    #[error("cranelift setup: {0}")]
    Setup(String),
    /// Cranelift rejected the generated function (a backend bug) or could not map memory.
    #[error("kernel `{kernel}`: cranelift: {message}")]
    Cranelift { kernel: String, message: String },
    /// The kernel uses something this backend does not implement.
    #[error("kernel `{kernel}`: unsupported: {message}")]
    Unsupported { kernel: String, message: String },
    /// The buffers or sizes given to a run do not fit the kernel.
    #[error("kernel `{kernel}`: bad launch: {message}")]
    Launch { kernel: String, message: String },
    /// A bounds-checked kernel accessed outside a buffer or local array, or divided by a
    /// divisor that is not positive.
    #[error("kernel `{kernel}`: {what} (index {index}, length {len})")]
    OutOfBounds {
        kernel: String,
        what: String,
        index: i64,
        len: i64,
    },
    /// A lock around the JIT module was poisoned by a panic elsewhere.
    #[error("the JIT module lock is poisoned")]
    Poisoned,
}

/// Compilation options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Check every buffer and local-array index and every divisor at run time.
    pub bounds_checks: bool,
    /// Compute `exp`, `sigmoid` and `silu` by calling the evaluator's f64 formulas (results
    /// equal the reference evaluator's f32 mode bit for bit) instead of inline f32 code
    /// (exp within 1 ulp, sigmoid 2, silu 3 where exp(-|x|) is a normal f32; several times
    /// faster).
    pub exact_math: bool,
}

/// Owns the JIT module, freeing its code when the module and every kernel are gone.
struct ModuleCell(Mutex<Option<JITModule>>);

impl Drop for ModuleCell {
    fn drop(&mut self) {
        let module = match self.0.get_mut() {
            Ok(m) => m.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(m) = module {
            // SAFETY: every `CpuKernel` holds an `Arc` of this cell, so none is left that
            // could call into the code being freed.
            unsafe { m.free_memory() };
        }
    }
}

/// The Rust functions generated code calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Helper {
    Exp,
    Log,
    Softplus,
    Sigmoid,
    Silu,
    F16ToF32,
    F32ToF16,
}

impl Helper {
    const ALL: [Helper; 7] = [
        Helper::Exp,
        Helper::Log,
        Helper::Softplus,
        Helper::Sigmoid,
        Helper::Silu,
        Helper::F16ToF32,
        Helper::F32ToF16,
    ];

    fn symbol(self) -> &'static str {
        match self {
            Helper::Exp => "ma2mba_exp",
            Helper::Log => "ma2mba_log",
            Helper::Softplus => "ma2mba_softplus",
            Helper::Sigmoid => "ma2mba_sigmoid",
            Helper::Silu => "ma2mba_silu",
            Helper::F16ToF32 => "ma2mba_f16_to_f32",
            Helper::F32ToF16 => "ma2mba_f32_to_f16",
        }
    }

    fn address(self) -> *const u8 {
        match self {
            Helper::Exp => h_exp as extern "C" fn(f32) -> f32 as *const u8,
            Helper::Log => h_log as extern "C" fn(f32) -> f32 as *const u8,
            Helper::Softplus => h_softplus as extern "C" fn(f32) -> f32 as *const u8,
            Helper::Sigmoid => h_sigmoid as extern "C" fn(f32) -> f32 as *const u8,
            Helper::Silu => h_silu as extern "C" fn(f32) -> f32 as *const u8,
            Helper::F16ToF32 => h_f16_to_f32 as extern "C" fn(u32) -> f32 as *const u8,
            Helper::F32ToF16 => h_f32_to_f16 as extern "C" fn(f32) -> u32 as *const u8,
        }
    }

    /// (parameter, result) types.
    fn types(self) -> (Type, Type) {
        match self {
            Helper::F16ToF32 => (types::I32, types::F32),
            Helper::F32ToF16 => (types::F32, types::I32),
            _ => (types::F32, types::F32),
        }
    }
}

fn unary_f64(op: UnaryOp, x: f32) -> f32 {
    ir::kernel::eval::unary(op, f64::from(x)) as f32
}
extern "C" fn h_exp(x: f32) -> f32 {
    unary_f64(UnaryOp::Exp, x)
}
extern "C" fn h_log(x: f32) -> f32 {
    unary_f64(UnaryOp::Log, x)
}
extern "C" fn h_softplus(x: f32) -> f32 {
    unary_f64(UnaryOp::Softplus, x)
}
extern "C" fn h_sigmoid(x: f32) -> f32 {
    unary_f64(UnaryOp::Sigmoid, x)
}
extern "C" fn h_silu(x: f32) -> f32 {
    unary_f64(UnaryOp::Silu, x)
}
extern "C" fn h_f16_to_f32(bits: u32) -> f32 {
    half::f16::from_bits(bits as u16).to_f32()
}
extern "C" fn h_f32_to_f16(x: f32) -> u32 {
    u32::from(half::f16::from_f32(x).to_bits())
}

/// A JIT module kernels are compiled into. Kernels keep the module's code alive, so a
/// `CpuKernel` may outlive the `CpuModule` that made it.
pub struct CpuModule {
    cell: Arc<ModuleCell>,
    helpers: HashMap<Helper, FuncId>,
    fctx: FunctionBuilderContext,
    opts: CpuOptions,
}

/// A compiled kernel.
#[derive(Clone)]
pub struct CpuKernel {
    pub name: String,
    f: KernelFn,
    kernel: Arc<Kernel>,
    checked: bool,
    _code: Arc<ModuleCell>,
}

impl std::fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernel")
            .field("name", &self.name)
            .field("bufs", &self.kernel.bufs.len())
            .field("sizes", &self.kernel.sizes.len())
            .field("grid", &self.kernel.grid.len())
            .field("checked", &self.checked)
            .finish()
    }
}

fn setup_err(e: impl std::fmt::Display) -> CodegenError {
    CodegenError::Setup(e.to_string())
}

impl CpuModule {
    /// A module for the host ISA, optimizing for speed, without bounds checks.
    pub fn new() -> Result<CpuModule, CodegenError> {
        CpuModule::with_options(CpuOptions::default())
    }

    pub fn with_options(opts: CpuOptions) -> Result<CpuModule, CodegenError> {
        let mut flags = settings::builder();
        for (name, value) in [
            ("opt_level", "speed"),
            ("use_colocated_libcalls", "false"),
            ("is_pic", "false"),
            // Local arrays may make frames larger than a page.
            ("enable_probestack", "true"),
            ("probestack_strategy", "inline"),
        ] {
            flags.set(name, value).map_err(setup_err)?;
        }
        let isa = cranelift_native::builder()
            .map_err(setup_err)?
            .finish(settings::Flags::new(flags))
            .map_err(setup_err)?;
        let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
        for h in Helper::ALL {
            jb.symbol(h.symbol(), h.address());
        }
        let mut module = JITModule::new(jb);
        let mut helpers = HashMap::new();
        for h in Helper::ALL {
            let mut sig = module.make_signature();
            let (p, r) = h.types();
            sig.params.push(AbiParam::new(p));
            sig.returns.push(AbiParam::new(r));
            let id = module
                .declare_function(h.symbol(), Linkage::Import, &sig)
                .map_err(setup_err)?;
            helpers.insert(h, id);
        }
        Ok(CpuModule {
            cell: Arc::new(ModuleCell(Mutex::new(Some(module)))),
            helpers,
            fctx: FunctionBuilderContext::new(),
            opts,
        })
    }

    pub fn options(&self) -> CpuOptions {
        self.opts
    }

    /// Checks, compiles and finalizes one kernel.
    pub fn compile(&mut self, k: &Kernel) -> Result<CpuKernel, CodegenError> {
        let mut ks = self.compile_all(std::slice::from_ref(k))?;
        ks.pop().ok_or_else(|| CodegenError::Cranelift {
            kernel: k.name.clone(),
            message: "no function was produced".into(),
        })
    }

    /// Checks and compiles several kernels, finalizing the module once.
    pub fn compile_all(&mut self, ks: &[Kernel]) -> Result<Vec<CpuKernel>, CodegenError> {
        let cell = Arc::clone(&self.cell);
        let mut guard = cell.0.lock().map_err(|_| CodegenError::Poisoned)?;
        let module = guard.as_mut().ok_or(CodegenError::Poisoned)?;
        let mut ids = Vec::with_capacity(ks.len());
        for k in ks {
            k.check()?;
            let mut ctx = module.make_context();
            self.build(module, k, &mut ctx.func)?;
            let id = module
                .declare_anonymous_function(&ctx.func.signature)
                .map_err(|e| module_err(k, &ctx.func, e))?;
            ctx.func.name = UserFuncName::user(0, id.as_u32());
            module
                .define_function(id, &mut ctx)
                .map_err(|e| module_err(k, &ctx.func, e))?;
            module.clear_context(&mut ctx);
            ids.push(id);
        }
        module
            .finalize_definitions()
            .map_err(|e| CodegenError::Cranelift {
                kernel: ks.first().map(|k| k.name.clone()).unwrap_or_default(),
                message: e.to_string(),
            })?;
        let mut out = Vec::with_capacity(ks.len());
        for (k, id) in ks.iter().zip(ids) {
            let p = module.get_finalized_function(id);
            if p.is_null() {
                return Err(CodegenError::Cranelift {
                    kernel: k.name.clone(),
                    message: "null function address".into(),
                });
            }
            // SAFETY: `p` is the finalized code of a function declared with exactly the
            // signature of `KernelFn` (pointer, pointer, i64, i64) in the host's C ABI.
            let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(p) };
            out.push(CpuKernel {
                name: k.name.clone(),
                f,
                kernel: Arc::new(k.clone()),
                checked: self.opts.bounds_checks,
                _code: Arc::clone(&self.cell),
            });
        }
        Ok(out)
    }

    /// The CLIF text this backend generates for `k`, before Cranelift's optimizations (for
    /// debugging and for reading what a kernel becomes).
    pub fn clif(&mut self, k: &Kernel) -> Result<String, CodegenError> {
        k.check()?;
        let cell = Arc::clone(&self.cell);
        let mut guard = cell.0.lock().map_err(|_| CodegenError::Poisoned)?;
        let module = guard.as_mut().ok_or(CodegenError::Poisoned)?;
        let mut ctx = module.make_context();
        self.build(module, k, &mut ctx.func)?;
        Ok(ctx.func.display().to_string())
    }

    /// The optimized CLIF and the machine code (Cranelift's VCode listing) `k` compiles to,
    /// without adding it to the module: for reading what a kernel becomes.
    pub fn disasm(&mut self, k: &Kernel) -> Result<String, CodegenError> {
        k.check()?;
        let cell = Arc::clone(&self.cell);
        let mut guard = cell.0.lock().map_err(|_| CodegenError::Poisoned)?;
        let module = guard.as_mut().ok_or(CodegenError::Poisoned)?;
        let mut ctx = module.make_context();
        self.build(module, k, &mut ctx.func)?;
        ctx.set_disasm(true);
        let mut ctrl = cranelift_codegen::control::ControlPlane::default();
        let vcode = match ctx.compile(module.isa(), &mut ctrl) {
            Ok(code) => code.vcode.clone().unwrap_or_default(),
            Err(e) => {
                return Err(CodegenError::Cranelift {
                    kernel: k.name.clone(),
                    message: cranelift_codegen::print_errors::pretty_error(e.func, e.inner),
                });
            }
        };
        Ok(format!("{}\n{vcode}", ctx.func.display()))
    }

    fn build(
        &mut self,
        module: &mut JITModule,
        k: &Kernel,
        func: &mut cranelift_codegen::ir::Function,
    ) -> Result<(), CodegenError> {
        let ptr = module.target_config().pointer_type();
        func.signature.params.push(AbiParam::new(ptr));
        func.signature.params.push(AbiParam::new(ptr));
        func.signature.params.push(AbiParam::new(types::I64));
        func.signature.params.push(AbiParam::new(types::I64));
        let b = FunctionBuilder::new(func, &mut self.fctx);
        let mut helpers = HashMap::new();
        for (h, id) in &self.helpers {
            helpers.insert(*h, module.declare_func_in_func(*id, b.func));
        }
        let mut lw = Lower {
            k,
            b,
            ptr,
            bases: Vec::new(),
            sizes: Vec::new(),
            lens: Vec::new(),
            fail: None,
            grid: Vec::new(),
            vars: HashMap::new(),
            loops: HashMap::new(),
            arrs: HashMap::new(),
            tiles: HashMap::new(),
            helpers,
            local_bytes: 0,
            exact: self.opts.exact_math,
        };
        match lw.function(self.opts.bounds_checks) {
            Ok(()) => {
                let mut b = lw.b;
                b.seal_all_blocks();
                b.finalize(module.target_config());
                Ok(())
            }
            Err(e) => {
                // The half-built function is dropped; start the next one from a clean context.
                drop(lw);
                self.fctx = FunctionBuilderContext::new();
                Err(e)
            }
        }
    }
}

fn module_err(k: &Kernel, func: &cranelift_codegen::ir::Function, e: ModuleError) -> CodegenError {
    let message = match e {
        ModuleError::Compilation(err) => cranelift_codegen::print_errors::pretty_error(func, err),
        other => other.to_string(),
    };
    CodegenError::Cranelift {
        kernel: k.name.clone(),
        message,
    }
}

/// Error-record kinds of bounds-checked code.
const FAIL_BUF: i64 = 1;
const FAIL_ARR: i64 = 2;
const FAIL_DIV: i64 = 3;
const FAIL_TILE: i64 = 4;

struct Lower<'a> {
    k: &'a Kernel,
    b: FunctionBuilder<'a>,
    ptr: Type,
    bases: Vec<Value>,
    sizes: Vec<Value>,
    /// Buffer lengths in elements (bounds-checked code only).
    lens: Vec<Value>,
    /// The block that records a violation and returns (bounds-checked code only).
    fail: Option<Block>,
    grid: Vec<Variable>,
    vars: HashMap<VarId, Variable>,
    loops: HashMap<LoopId, Variable>,
    arrs: HashMap<ArrId, (StackSlot, usize)>,
    /// Tiles as stack slots (row-major, unpadded): slot, dtype, rows, cols.
    tiles: HashMap<TileId, (StackSlot, DType, usize, usize)>,
    helpers: HashMap<Helper, FuncRef>,
    local_bytes: usize,
    /// Transcendentals through the evaluator's f64 formulas (`CpuOptions::exact_math`).
    exact: bool,
}

fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

fn elem_bytes(d: DType) -> usize {
    match d {
        DType::F64 | DType::I64 => 8,
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::BF16 => 2,
    }
}

fn elem_shift(d: DType) -> i64 {
    match d {
        DType::F64 | DType::I64 => 3,
        DType::F32 | DType::I32 => 2,
        DType::F16 | DType::BF16 => 1,
    }
}

impl Lower<'_> {
    fn unsupported(&self, message: String) -> CodegenError {
        CodegenError::Unsupported {
            kernel: self.k.name.clone(),
            message,
        }
    }

    fn function(&mut self, checked: bool) -> Result<(), CodegenError> {
        let k = self.k;
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let params = self.b.block_params(entry).to_vec();
        let [bufs_p, sizes_p, start, end] = params[..] else {
            return Err(self.unsupported("bad signature".into()));
        };
        let ro = mem().with_readonly();
        let pw = i32::try_from(self.ptr.bytes()).unwrap_or(8);
        for i in 0..k.bufs.len() {
            let v = self.b.ins().load(self.ptr, ro, bufs_p, offset(i, pw)?);
            self.bases.push(v);
        }
        for i in 0..k.sizes.len() {
            let v = self.b.ins().load(types::I64, ro, sizes_p, offset(i, 8)?);
            self.sizes.push(v);
        }
        let exit = self.b.create_block();
        let mut fail_rec = None;
        if checked {
            for i in 0..k.bufs.len() {
                let v = self
                    .b
                    .ins()
                    .load(types::I64, ro, sizes_p, offset(k.sizes.len() + i, 8)?);
                self.lens.push(v);
            }
            let rec = self
                .b
                .ins()
                .load(self.ptr, ro, bufs_p, offset(k.bufs.len(), pw)?);
            let fail = self.b.create_block();
            for _ in 0..4 {
                self.b.append_block_param(fail, types::I64);
            }
            self.fail = Some(fail);
            fail_rec = Some(rec);
        }

        // Grid extents (dimension 0's is not needed: it never wraps).
        let dims = k.grid.len();
        let mut extents = vec![None; dims];
        for (d, g) in k.grid.iter().enumerate().skip(1) {
            extents[d] = Some(self.iexpr(g)?);
        }
        let pre = self.b.create_block();
        let body = self.b.create_block();
        let nonempty = self.b.ins().icmp(IntCC::SignedLessThan, start, end);
        self.b.ins().brif(nonempty, pre, &[], exit, &[]);

        // Split `start` into coordinates.
        self.b.switch_to_block(pre);
        let flat = self.b.declare_var(types::I64);
        self.b.def_var(flat, start);
        self.grid = (0..dims).map(|_| self.b.declare_var(types::I64)).collect();
        let mut rest = start;
        for d in (0..dims).rev() {
            match extents[d] {
                Some(e) if d > 0 => {
                    let c = self.b.ins().urem(rest, e);
                    rest = self.b.ins().udiv(rest, e);
                    self.b.def_var(self.grid[d], c);
                }
                _ => self.b.def_var(self.grid[d], rest),
            }
        }
        self.b.ins().jump(body, &[]);

        self.b.switch_to_block(body);
        self.block(&k.body)?;
        let f = self.b.use_var(flat);
        let f1 = self.b.ins().iadd_imm_s(f, 1);
        self.b.def_var(flat, f1);
        // Next coordinates, without branches: add the carry from the innermost dimension out.
        let mut carry = self.b.ins().iconst(types::I64, 1);
        for d in (0..dims).rev() {
            let c = self.b.use_var(self.grid[d]);
            let n = self.b.ins().iadd(c, carry);
            match extents[d] {
                Some(e) if d > 0 => {
                    let wrap = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, n, e);
                    let zero = self.b.ins().iconst(types::I64, 0);
                    let n = self.b.ins().select(wrap, zero, n);
                    self.b.def_var(self.grid[d], n);
                    carry = self.b.ins().uextend(types::I64, wrap);
                }
                _ => self.b.def_var(self.grid[d], n),
            }
        }
        let more = self.b.ins().icmp(IntCC::SignedLessThan, f1, end);
        self.b.ins().brif(more, body, &[], exit, &[]);

        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);

        if let (Some(fail), Some(rec)) = (self.fail, fail_rec) {
            self.b.switch_to_block(fail);
            let ps = self.b.block_params(fail).to_vec();
            for (i, p) in ps.into_iter().enumerate() {
                self.b.ins().store(mem(), p, rec, offset(i, 8)?);
            }
            self.b.ins().return_(&[]);
        }
        Ok(())
    }

    fn block(&mut self, stmts: &[Stmt]) -> Result<(), CodegenError> {
        for s in stmts {
            match s {
                Stmt::Var { var, init } => {
                    let v = self.expr(init)?;
                    let x = match self.vars.get(var) {
                        Some(x) => *x,
                        None => {
                            let x = self.b.declare_var(types::F32);
                            self.vars.insert(*var, x);
                            x
                        }
                    };
                    self.b.def_var(x, v);
                }
                Stmt::Set { var, value } => {
                    let v = self.expr(value)?;
                    let x = *self
                        .vars
                        .get(var)
                        .ok_or_else(|| self.unsupported(format!("v{} undeclared", var.0)))?;
                    self.b.def_var(x, v);
                }
                Stmt::Array { arr, len, init } => {
                    let bytes = self.local(len.saturating_mul(4))? as usize;
                    let slot = self.b.create_sized_stack_slot(StackSlotData::new(
                        StackSlotKind::ExplicitSlot,
                        bytes as u32,
                        4,
                    ));
                    self.arrs.insert(*arr, (slot, *len));
                    let v = self.b.ins().f32const(*init as f32);
                    if *len <= 32 {
                        for i in 0..*len {
                            self.b.ins().stack_store(self.ptr, v, slot, (i * 4) as i32);
                        }
                    } else {
                        // A loop filling the slot.
                        let base = self.b.ins().stack_addr(self.ptr, slot, 0);
                        let lp = self.b.create_block();
                        let done = self.b.create_block();
                        let i0 = self.b.ins().iconst(self.ptr, 0);
                        self.b.ins().jump(lp, &[BlockArg::Value(i0)]);
                        self.b.switch_to_block(lp);
                        let i = self.b.append_block_param(lp, self.ptr);
                        let a = self.b.ins().iadd(base, i);
                        self.b.ins().store(mem(), v, a, 0);
                        let i1 = self.b.ins().iadd_imm_s(i, 4);
                        let more =
                            self.b
                                .ins()
                                .icmp_imm_s(IntCC::UnsignedLessThan, i1, bytes as i64);
                        self.b
                            .ins()
                            .brif(more, lp, &[BlockArg::Value(i1)], done, &[]);
                        self.b.switch_to_block(done);
                    }
                }
                Stmt::ArrSet { arr, index, value } => {
                    let addr = self.arr_addr(*arr, index)?;
                    let v = self.expr(value)?;
                    self.b.ins().store(mem(), v, addr, 0);
                }
                Stmt::For {
                    counter,
                    extent,
                    body,
                } => {
                    let n = self.iexpr(extent)?;
                    let c = self.b.declare_var(types::I64);
                    let zero = self.b.ins().iconst(types::I64, 0);
                    self.b.def_var(c, zero);
                    let lp = self.b.create_block();
                    let done = self.b.create_block();
                    let any = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, n, 0);
                    self.b.ins().brif(any, lp, &[], done, &[]);
                    self.b.switch_to_block(lp);
                    let outer = self.loops.insert(*counter, c);
                    self.block(body)?;
                    match outer {
                        Some(o) => self.loops.insert(*counter, o),
                        None => self.loops.remove(counter),
                    };
                    let i = self.b.use_var(c);
                    let i1 = self.b.ins().iadd_imm_s(i, 1);
                    self.b.def_var(c, i1);
                    let more = self.b.ins().icmp(IntCC::SignedLessThan, i1, n);
                    self.b.ins().brif(more, lp, &[], done, &[]);
                    self.b.switch_to_block(done);
                }
                Stmt::Store { buf, index, value } => {
                    let dtype = self.dtype(*buf)?;
                    if !dtype.is_float() {
                        return Err(self.unsupported(format!(
                            "store to the integer buffer `{}`",
                            self.k.bufs[*buf].name
                        )));
                    }
                    let addr = self.buf_addr(*buf, index)?;
                    let v = self.expr(value)?;
                    self.store(dtype, v, addr)?;
                }
                Stmt::Tile {
                    tile,
                    dtype,
                    rows,
                    cols,
                } => {
                    let bytes = self.local(rows * cols * elem_bytes(*dtype))?;
                    let slot = self.b.create_sized_stack_slot(StackSlotData::new(
                        StackSlotKind::ExplicitSlot,
                        bytes,
                        4,
                    ));
                    self.tiles.insert(*tile, (slot, *dtype, *rows, *cols));
                }
                // One thread runs the point: the iterations in order.
                Stmt::Each {
                    counters,
                    extents,
                    body,
                } => self.block(&ir::tile::each_as_loops(counters, extents, body))?,
                Stmt::TileSet {
                    tile,
                    row,
                    col,
                    value,
                } => {
                    let (addr, dtype) = self.tile_addr(*tile, row, col)?;
                    let v = self.expr(value)?;
                    self.store(dtype, v, addr)?;
                }
                Stmt::Mma {
                    acc,
                    a,
                    b,
                    accumulate,
                } => {
                    let loops = ir::tile::mma_as_loops(self.k, (*acc, *a, *b), *accumulate);
                    self.block(&loops)?;
                }
            }
        }
        Ok(())
    }

    /// Claims `bytes` of the kernel's stack for local arrays and tiles.
    fn local(&mut self, bytes: usize) -> Result<u32, CodegenError> {
        let fits = self.local_bytes.saturating_add(bytes) <= MAX_LOCAL_BYTES;
        match u32::try_from(bytes) {
            Ok(b) if fits => {
                self.local_bytes += bytes;
                Ok(b)
            }
            _ => Err(self.unsupported(format!(
                "local arrays and tiles larger than {MAX_LOCAL_BYTES} bytes in all"
            ))),
        }
    }

    /// The address of tile element `[row, col]`, and the tile's dtype.
    fn tile_addr(
        &mut self,
        tile: TileId,
        row: &IExpr,
        col: &IExpr,
    ) -> Result<(Value, DType), CodegenError> {
        let (slot, dtype, rows, cols) = *self
            .tiles
            .get(&tile)
            .ok_or_else(|| self.unsupported(format!("tile t{} undeclared", tile.0)))?;
        let r = self.iexpr(row)?;
        let c = self.iexpr(col)?;
        let at = self.b.ins().imul_imm_s(r, cols as i64);
        let i = self.b.ins().iadd(at, c);
        if self.fail.is_some() {
            let n = self.b.ins().iconst(types::I64, (rows * cols) as i64);
            let bad_c = self
                .b
                .ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, c, cols as i64);
            let bad_i = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, n);
            let bad = self.b.ins().bor(bad_c, bad_i);
            self.check(bad, FAIL_TILE, i64::from(tile.0), i, n);
        }
        let base = self.b.ins().stack_addr(self.ptr, slot, 0);
        let off = self.b.ins().ishl_imm_s(i, elem_shift(dtype));
        let off = self.index_to_ptr(off);
        Ok((self.b.ins().iadd(base, off), dtype))
    }

    fn dtype(&self, buf: usize) -> Result<DType, CodegenError> {
        self.k
            .bufs
            .get(buf)
            .map(|b| b.dtype)
            .ok_or_else(|| self.unsupported(format!("unknown buffer {buf}")))
    }

    /// Jumps to the failure block when `bad` (bounds-checked code only).
    fn check(&mut self, bad: Value, kind: i64, which: i64, index: Value, len: Value) {
        let Some(fail) = self.fail else { return };
        let cont = self.b.create_block();
        let kind = self.b.ins().iconst(types::I64, kind);
        let which = self.b.ins().iconst(types::I64, which);
        let args = [kind, which, index, len].map(BlockArg::Value);
        self.b.ins().brif(bad, fail, &args, cont, &[]);
        self.b.switch_to_block(cont);
    }

    fn buf_addr(&mut self, buf: usize, index: &IExpr) -> Result<Value, CodegenError> {
        let dtype = self.dtype(buf)?;
        let i = self.iexpr(index)?;
        if let Some(len) = self.lens.get(buf).copied() {
            let bad = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, len);
            self.check(bad, FAIL_BUF, buf as i64, i, len);
        }
        let off = self.b.ins().ishl_imm_s(i, elem_shift(dtype));
        let off = self.index_to_ptr(off);
        Ok(self.b.ins().iadd(self.bases[buf], off))
    }

    fn arr_addr(&mut self, arr: ArrId, index: &IExpr) -> Result<Value, CodegenError> {
        let (slot, len) = *self
            .arrs
            .get(&arr)
            .ok_or_else(|| self.unsupported(format!("local array a{} undeclared", arr.0)))?;
        let i = self.iexpr(index)?;
        if self.fail.is_some() {
            let l = self.b.ins().iconst(types::I64, len as i64);
            let bad = self.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, i, l);
            self.check(bad, FAIL_ARR, i64::from(arr.0), i, l);
        }
        let base = self.b.ins().stack_addr(self.ptr, slot, 0);
        let off = self.b.ins().ishl_imm_s(i, 2);
        let off = self.index_to_ptr(off);
        Ok(self.b.ins().iadd(base, off))
    }

    fn index_to_ptr(&mut self, v: Value) -> Value {
        if self.ptr == types::I64 {
            v
        } else {
            self.b.ins().ireduce(self.ptr, v)
        }
    }

    fn load(&mut self, dtype: DType, addr: Value) -> Result<Value, CodegenError> {
        let ins = self.b.ins();
        Ok(match dtype {
            DType::F32 => ins.load(types::F32, mem(), addr, 0),
            DType::F64 => {
                let x = ins.load(types::F64, mem(), addr, 0);
                self.b.ins().fdemote(types::F32, x)
            }
            DType::BF16 => {
                let x = ins.uload16(types::I32, mem(), addr, 0);
                let x = self.b.ins().ishl_imm_s(x, 16);
                self.b.ins().bitcast(types::F32, MemFlagsData::new(), x)
            }
            DType::F16 => {
                let x = ins.uload16(types::I32, mem(), addr, 0);
                self.call(Helper::F16ToF32, x)?
            }
            DType::I32 => {
                let x = ins.sload32(mem(), addr, 0);
                self.b.ins().fcvt_from_sint(types::F32, x)
            }
            DType::I64 => {
                let x = ins.load(types::I64, mem(), addr, 0);
                self.b.ins().fcvt_from_sint(types::F32, x)
            }
        })
    }

    fn store(&mut self, dtype: DType, v: Value, addr: Value) -> Result<(), CodegenError> {
        match dtype {
            DType::F32 => {
                self.b.ins().store(mem(), v, addr, 0);
            }
            DType::F64 => {
                let x = self.b.ins().fpromote(types::F64, v);
                self.b.ins().store(mem(), x, addr, 0);
            }
            DType::BF16 => {
                // Round to nearest even; NaNs become quiet NaNs (as `half::bf16::from_f32`).
                let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), v);
                let lsb = self.b.ins().ushr_imm_s(bits, 16);
                let lsb = self.b.ins().band_imm_s(lsb, 1);
                let r = self.b.ins().iadd_imm_s(bits, 0x7FFF);
                let r = self.b.ins().iadd(r, lsb);
                let r = self.b.ins().ushr_imm_s(r, 16);
                let q = self.b.ins().ushr_imm_s(bits, 16);
                let q = self.b.ins().bor_imm_s(q, 0x40);
                let nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
                let out = self.b.ins().select(nan, q, r);
                self.b.ins().istore16(mem(), out, addr, 0);
            }
            DType::F16 => {
                let bits = self.call(Helper::F32ToF16, v)?;
                self.b.ins().istore16(mem(), bits, addr, 0);
            }
            DType::I32 | DType::I64 => {
                // Rejected in `block`; integer buffers are read only.
            }
        }
        Ok(())
    }

    fn call(&mut self, h: Helper, x: Value) -> Result<Value, CodegenError> {
        let f = *self
            .helpers
            .get(&h)
            .ok_or_else(|| self.unsupported(format!("helper {} not imported", h.symbol())))?;
        let inst = self.b.ins().call(f, &[x]);
        self.b
            .inst_results(inst)
            .first()
            .copied()
            .ok_or_else(|| self.unsupported(format!("helper {} returns nothing", h.symbol())))
    }

    fn expr(&mut self, e: &Expr) -> Result<Value, CodegenError> {
        Ok(match e {
            Expr::Const(x) => self.b.ins().f32const(*x as f32),
            Expr::Var(v) => {
                let x = *self
                    .vars
                    .get(v)
                    .ok_or_else(|| self.unsupported(format!("v{} undeclared", v.0)))?;
                self.b.use_var(x)
            }
            Expr::Load { buf, index } => {
                let dtype = self.dtype(*buf)?;
                let addr = self.buf_addr(*buf, index)?;
                self.load(dtype, addr)?
            }
            Expr::ArrLoad { arr, index } => {
                let addr = self.arr_addr(*arr, index)?;
                self.b.ins().load(types::F32, mem(), addr, 0)
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a)?;
                self.unary(*op, x)?
            }
            Expr::Binary(op, a, c) => {
                let x = self.expr(a)?;
                let y = self.expr(c)?;
                self.binary(*op, x, y)
            }
            Expr::FromIndex(i) => {
                let i = self.iexpr(i)?;
                self.b.ins().fcvt_from_sint(types::F32, i)
            }
            Expr::TileLoad { tile, row, col } => {
                let (addr, dtype) = self.tile_addr(*tile, row, col)?;
                self.load(dtype, addr)?
            }
        })
    }

    fn unary(&mut self, op: UnaryOp, x: Value) -> Result<Value, CodegenError> {
        Ok(match op {
            UnaryOp::Neg => self.b.ins().fneg(x),
            UnaryOp::Exp if !self.exact => self.exp_inline(x),
            UnaryOp::Exp => self.call(Helper::Exp, x)?,
            UnaryOp::Log => self.call(Helper::Log, x)?,
            UnaryOp::Sqrt => self.b.ins().sqrt(x),
            UnaryOp::Rsqrt => {
                // In f64 and rounded once, as the evaluator.
                let d = self.b.ins().fpromote(types::F64, x);
                let s = self.b.ins().sqrt(d);
                let one = self.b.ins().f64const(1.0);
                let r = self.b.ins().fdiv(one, s);
                self.b.ins().fdemote(types::F32, r)
            }
            UnaryOp::Recip => {
                let one = self.b.ins().f32const(1.0);
                self.b.ins().fdiv(one, x)
            }
            UnaryOp::Softplus => self.call(Helper::Softplus, x)?,
            UnaryOp::Silu if !self.exact => {
                let sg = self.sigmoid_inline(x);
                self.b.ins().fmul(x, sg)
            }
            UnaryOp::Silu => self.call(Helper::Silu, x)?,
            UnaryOp::Sigmoid if !self.exact => self.sigmoid_inline(x),
            UnaryOp::Sigmoid => self.call(Helper::Sigmoid, x)?,
        })
    }

    /// `exp` in f32 without a call (Cephes `expf`: Cody-Waite reduction by `ln 2`, a degree-6
    /// polynomial, scaling by `2^n` in two steps so subnormal results round once): within
    /// about 1 ulp; overflow gives `inf`, underflow `0`, NaN stays NaN.
    fn exp_inline(&mut self, x: Value) -> Value {
        // Beyond these the result is inf (the scaling overflows) or 0.
        const HI: f32 = 89.0;
        const LO: f32 = -104.0;
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        const POLY: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
        let hi = self.b.ins().f32const(HI);
        let lo = self.b.ins().f32const(LO);
        // Clamp in the shapes x64 lowers to minss/maxss (a NaN passes through).
        let over = self.b.ins().fcmp(FloatCC::LessThan, hi, x);
        let xc = self.b.ins().select(over, hi, x);
        let under = self.b.ins().fcmp(FloatCC::LessThan, xc, lo);
        let xc = self.b.ins().select(under, lo, xc);
        // n = round(x / ln 2), as a float and as an integer.
        let log2e = self.b.ins().f32const(std::f32::consts::LOG2_E);
        let magic = self.b.ins().f32const(MAGIC);
        let t = self.b.ins().fmul(xc, log2e);
        let t = self.b.ins().fadd(t, magic);
        let nf = self.b.ins().fsub(t, magic);
        let tb = self.b.ins().bitcast(types::I32, MemFlagsData::new(), t);
        let ni = self.b.ins().iadd_imm_s(tb, -0x4B40_0000);
        // r = x - n ln 2, in two parts.
        let c1 = self.b.ins().f32const(0.693_359_4);
        let c2 = self.b.ins().f32const(-2.121_944_4e-4);
        let a = self.b.ins().fmul(nf, c1);
        let r = self.b.ins().fsub(xc, a);
        let a = self.b.ins().fmul(nf, c2);
        let r = self.b.ins().fsub(r, a);
        // p(r) = POLY[0] r^5 + ... + POLY[5], in Estrin's form (a shorter dependency chain
        // than Horner's): (P4 r + P5) + r^2 ((P2 r + P3) + r^2 (P0 r + P1)).
        let r2 = self.b.ins().fmul(r, r);
        let mut pair = |hi: f32, lo: f32| {
            let h = self.b.ins().f32const(hi);
            let l = self.b.ins().f32const(lo);
            let m = self.b.ins().fmul(h, r);
            self.b.ins().fadd(m, l)
        };
        let a = pair(POLY[4], POLY[5]);
        let b = pair(POLY[2], POLY[3]);
        let c = pair(POLY[0], POLY[1]);
        let p = self.b.ins().fmul(r2, c);
        let p = self.b.ins().fadd(b, p);
        let p = self.b.ins().fmul(r2, p);
        let p = self.b.ins().fadd(a, p);
        let y = self.b.ins().fmul(p, r2);
        let y = self.b.ins().fadd(y, r);
        let one = self.b.ins().f32const(1.0);
        let y = self.b.ins().fadd(y, one);
        // y * 2^n1 * 2^n2 with n1 = n >> 1, n2 = n - n1 (both normal exponents).
        let n1 = self.b.ins().sshr_imm_s(ni, 1);
        let n2 = self.b.ins().isub(ni, n1);
        let mut out = y;
        for n in [n1, n2] {
            let e = self.b.ins().iadd_imm_s(n, 127);
            let e = self.b.ins().ishl_imm_s(e, 23);
            let sc = self.b.ins().bitcast(types::F32, MemFlagsData::new(), e);
            out = self.b.ins().fmul(out, sc);
        }
        out
    }

    /// `c ? a : b` for f32 values through integer registers: x64 lowers a float `select` to a
    /// branch, which mispredicts on data-dependent conditions; an integer one is a `cmov`.
    fn fselect(&mut self, c: Value, a: Value, b: Value) -> Value {
        let ai = self.b.ins().bitcast(types::I32, MemFlagsData::new(), a);
        let bi = self.b.ins().bitcast(types::I32, MemFlagsData::new(), b);
        let r = self.b.ins().select(c, ai, bi);
        self.b.ins().bitcast(types::F32, MemFlagsData::new(), r)
    }

    /// `1 / (1 + exp(-x))` for `x >= 0`, `e / (1 + e)` with `e = exp(x)` otherwise.
    fn sigmoid_inline(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let na = self.b.ins().fneg(a);
        let e = self.exp_inline(na);
        let one = self.b.ins().f32const(1.0);
        let d = self.b.ins().fadd(one, e);
        let zero = self.b.ins().f32const(0.0);
        let pos = self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
        let num = self.fselect(pos, one, e);
        self.b.ins().fdiv(num, d)
    }

    fn binary(&mut self, op: BinaryOp, x: Value, y: Value) -> Value {
        match op {
            BinaryOp::Add => self.b.ins().fadd(x, y),
            BinaryOp::Sub => self.b.ins().fsub(x, y),
            BinaryOp::Mul => self.b.ins().fmul(x, y),
            BinaryOp::Div => self.b.ins().fdiv(x, y),
            // f32::max/min: a NaN operand yields the other operand. `x < y ? y : x` (maxss;
            // x when y is NaN), then y when x is NaN (a rarely taken, well predicted branch).
            BinaryOp::Max | BinaryOp::Min => {
                let lt = if op == BinaryOp::Max {
                    self.b.ins().fcmp(FloatCC::LessThan, x, y)
                } else {
                    self.b.ins().fcmp(FloatCC::LessThan, y, x)
                };
                let m = self.b.ins().select(lt, y, x);
                let xnan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                self.b.ins().select(xnan, y, m)
            }
        }
    }

    fn iexpr(&mut self, e: &IExpr) -> Result<Value, CodegenError> {
        Ok(match e {
            IExpr::Const(n) => self.b.ins().iconst(types::I64, *n),
            IExpr::Size(i) => *self
                .sizes
                .get(*i)
                .ok_or_else(|| self.unsupported(format!("unknown size {i}")))?,
            IExpr::Grid(i) => {
                let v = *self.grid.get(*i).ok_or_else(|| {
                    self.unsupported(format!("grid coordinate {i} in a grid extent"))
                })?;
                self.b.use_var(v)
            }
            IExpr::Loop(l) => {
                let v = *self
                    .loops
                    .get(l)
                    .ok_or_else(|| self.unsupported(format!("i{} outside its loop", l.0)))?;
                self.b.use_var(v)
            }
            IExpr::Add(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.ins().iadd(x, y)
            }
            IExpr::Sub(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.ins().isub(x, y)
            }
            IExpr::Mul(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.ins().imul(x, y)
            }
            IExpr::Div(a, c) => self.divrem(a, c, false)?,
            IExpr::Rem(a, c) => self.divrem(a, c, true)?,
            IExpr::Min(a, c) => {
                let (x, y) = (self.iexpr(a)?, self.iexpr(c)?);
                self.b.ins().smin(x, y)
            }
            IExpr::LoadIndex { buf, index } => {
                let dtype = self.dtype(*buf)?;
                let addr = self.buf_addr(*buf, index)?;
                match dtype {
                    DType::I32 => self.b.ins().sload32(mem(), addr, 0),
                    DType::I64 => self.b.ins().load(types::I64, mem(), addr, 0),
                    other => {
                        return Err(self.unsupported(format!("index load from an {other} buffer")));
                    }
                }
            }
        })
    }

    /// Floor division / remainder by a positive divisor.
    fn divrem(&mut self, a: &IExpr, d: &IExpr, rem: bool) -> Result<Value, CodegenError> {
        let x = self.iexpr(a)?;
        if let IExpr::Const(c) = d {
            let c = *c;
            if c <= 0 {
                return Err(self.unsupported(format!("division by the constant {c}")));
            }
            if c.count_ones() == 1 {
                let k = i64::from(c.trailing_zeros());
                return Ok(if rem {
                    self.b.ins().band_imm_s(x, c - 1)
                } else {
                    self.b.ins().sshr_imm_s(x, k)
                });
            }
        }
        let y = self.iexpr(d)?;
        if self.fail.is_some() {
            let bad = self.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, y, 0);
            let zero = self.b.ins().iconst(types::I64, 0);
            self.check(bad, FAIL_DIV, 0, y, zero);
        }
        let q = self.b.ins().sdiv(x, y);
        let qy = self.b.ins().imul(q, y);
        let r = self.b.ins().isub(x, qy);
        let neg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, r, 0);
        Ok(if rem {
            let r1 = self.b.ins().iadd(r, y);
            self.b.ins().select(neg, r1, r)
        } else {
            let q1 = self.b.ins().iadd_imm_s(q, -1);
            self.b.ins().select(neg, q1, q)
        })
    }
}

fn offset(i: usize, width: i32) -> Result<i32, CodegenError> {
    i32::try_from(i)
        .ok()
        .and_then(|i| i.checked_mul(width))
        .ok_or_else(|| CodegenError::Unsupported {
            kernel: String::new(),
            message: "too many buffers or sizes".into(),
        })
}

/// A buffer argument of [`CpuKernel::run_args`]: read-only or writable bytes.
#[derive(Debug)]
pub enum KArg<'a> {
    In(&'a [u8]),
    Out(&'a mut [u8]),
}

impl KArg<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            KArg::In(b) => b,
            KArg::Out(b) => b,
        }
    }
    fn ptr(&mut self) -> *mut u8 {
        match self {
            // Never written through: the kernel only stores to buffers marked writable, and
            // those must be `Out`.
            KArg::In(b) => b.as_ptr().cast_mut(),
            KArg::Out(b) => b.as_mut_ptr(),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Plain element types whose slices may be viewed as bytes.
pub trait Plain: Copy + sealed::Sealed {}
macro_rules! plain {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(u8, u16, i32, i64, f32, f64, half::f16, half::bf16);

/// The bytes of a slice of plain values.
pub fn bytes_of<T: Plain>(s: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding and no invalid bit patterns as bytes; the
    // byte slice covers exactly the same memory and lifetime.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of a mutable slice of plain values.
pub fn bytes_of_mut<T: Plain>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; every byte pattern is a valid `Plain` value, so writes
    // through the byte view cannot break the typed view.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// What one chunk needs to call the kernel; shared read-only between rayon tasks.
struct Launch {
    f: KernelFn,
    bufs: Vec<*mut u8>,
    sizes: Vec<i64>,
    checked: bool,
}

// SAFETY: the pointers address buffers the caller lent for the whole run; chunks run disjoint
// grid points, and the kernel IR's contract is that distinct grid points write distinct
// elements.
unsafe impl Sync for Launch {}

impl Launch {
    /// Runs `start..end`; with bounds checks, returns the violation record if any.
    ///
    /// # Safety
    /// As [`CpuKernel::run_range`].
    unsafe fn range(&self, start: i64, end: i64) -> Option<[i64; 4]> {
        if self.checked {
            let mut rec = [0i64; 4];
            let mut bufs = self.bufs.clone();
            bufs.push(rec.as_mut_ptr().cast::<u8>());
            // SAFETY: the caller's contract; `rec` outlives the call.
            unsafe { (self.f)(bufs.as_ptr(), self.sizes.as_ptr(), start, end) };
            (rec[0] != 0).then_some(rec)
        } else {
            // SAFETY: the caller's contract.
            unsafe { (self.f)(self.bufs.as_ptr(), self.sizes.as_ptr(), start, end) };
            None
        }
    }
}

impl CpuKernel {
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn n_bufs(&self) -> usize {
        self.kernel.bufs.len()
    }

    pub fn n_sizes(&self) -> usize {
        self.kernel.sizes.len()
    }

    pub fn grid_rank(&self) -> usize {
        self.kernel.grid.len()
    }

    /// Whether the kernel was compiled with bounds checks (see the module doc for the ABI).
    pub fn bounds_checked(&self) -> bool {
        self.checked
    }

    /// The generated function (module doc: ABI).
    pub fn raw(&self) -> KernelFn {
        self.f
    }

    fn launch_err(&self, message: String) -> CodegenError {
        CodegenError::Launch {
            kernel: self.name.clone(),
            message,
        }
    }

    fn violation(&self, rec: [i64; 4]) -> CodegenError {
        let [kind, which, index, len] = rec;
        let what = match kind {
            FAIL_BUF => {
                let name = usize::try_from(which)
                    .ok()
                    .and_then(|i| self.kernel.bufs.get(i))
                    .map_or("?", |b| b.name.as_str());
                format!("access to buffer b{which} `{name}` out of bounds")
            }
            FAIL_ARR => format!("access to local array a{which} out of bounds"),
            FAIL_DIV => "division by a divisor that is not positive".into(),
            FAIL_TILE => format!("access to tile t{which} out of bounds"),
            _ => format!("unknown violation {kind}"),
        };
        CodegenError::OutOfBounds {
            kernel: self.name.clone(),
            what,
            index,
            len,
        }
    }

    /// Runs grid points `start..end` of the flattened (row-major) grid on this thread.
    /// `bufs[i]` points at buffer `i`'s first element, `sizes` are the runtime sizes; for a
    /// bounds-checked kernel `sizes` continues with every buffer's length in elements.
    ///
    /// # Safety
    /// Every index the kernel computes for these points and sizes must be in bounds of its
    /// buffer (unless bounds-checked), `end` must not exceed the grid's point count, buffers
    /// the kernel writes must not be accessed by anything else meanwhile, and no other
    /// thread may run points that write the same elements.
    pub unsafe fn run_range(
        &self,
        bufs: &[*mut u8],
        sizes: &[i64],
        start: i64,
        end: i64,
    ) -> Result<(), CodegenError> {
        let want_sizes = self.n_sizes() + if self.checked { self.n_bufs() } else { 0 };
        if bufs.len() != self.n_bufs() || sizes.len() != want_sizes {
            return Err(self.launch_err(format!(
                "{} buffers and {} sizes given, {} and {want_sizes} expected",
                bufs.len(),
                sizes.len(),
                self.n_bufs()
            )));
        }
        if start < 0 && start < end {
            return Err(self.launch_err(format!("negative start {start}")));
        }
        let l = Launch {
            f: self.f,
            bufs: bufs.to_vec(),
            sizes: sizes.to_vec(),
            checked: self.checked,
        };
        // SAFETY: the caller's contract.
        match unsafe { l.range(start, end) } {
            Some(rec) => Err(self.violation(rec)),
            None => Ok(()),
        }
    }

    /// Runs the whole grid, in parallel chunks over rayon's pool when there is enough work.
    /// All buffers are passed as writable bytes; see [`CpuKernel::run_args`].
    pub fn run(&self, bufs: &mut [&mut [u8]], sizes: &[i64]) -> Result<(), CodegenError> {
        let mut args: Vec<KArg<'_>> = bufs.iter_mut().map(|b| KArg::Out(b)).collect();
        self.run_args(&mut args, sizes)
    }

    /// Runs the whole grid, in parallel chunks over rayon's pool when there is enough work.
    ///
    /// Checks the number of buffers and sizes, that byte lengths are whole elements and that
    /// writable buffers are `Out`. Without bounds checks, that every index is in bounds is
    /// the caller's contract (the kernel comes from the compiler): an out-of-bounds index is
    /// undefined behaviour. Grid points that write the same element race.
    pub fn run_args(&self, bufs: &mut [KArg<'_>], sizes: &[i64]) -> Result<(), CodegenError> {
        self.run_chunked(bufs, sizes, None)
    }

    /// As [`CpuKernel::run_args`], with chunks of `chunk` points (`None`: chosen from the
    /// kernel's estimated work per point and the pool's size).
    pub fn run_chunked(
        &self,
        bufs: &mut [KArg<'_>],
        sizes: &[i64],
        chunk: Option<i64>,
    ) -> Result<(), CodegenError> {
        let k = &*self.kernel;
        if bufs.len() != k.bufs.len() {
            return Err(self.launch_err(format!(
                "{} buffers given, {} expected",
                bufs.len(),
                k.bufs.len()
            )));
        }
        for (i, (arg, kb)) in bufs.iter().zip(&k.bufs).enumerate() {
            if kb.writable && matches!(arg, KArg::In(_)) {
                return Err(self.launch_err(format!(
                    "buffer b{i} `{}` is written but passed read-only",
                    kb.name
                )));
            }
        }
        let raw: Vec<(*mut u8, usize)> = bufs
            .iter_mut()
            .map(|a| (a.ptr(), a.bytes().len()))
            .collect();
        // SAFETY: every pointer comes with its slice's length and the slices are borrowed
        // (writable ones exclusively, as `Out`) for the whole call.
        unsafe { self.launch(&raw, sizes, chunk) }
    }

    /// As [`CpuKernel::run_args`] for buffers given as (address, length in bytes): for
    /// callers that hold raw buffers, and for kernels whose buffers alias (one buffer read
    /// and written in place), which slices cannot express.
    ///
    /// # Safety
    /// Each address must be valid for reads of its length, and for writes where the kernel
    /// writes the buffer; nothing else may access written buffers during the call. Indices
    /// are the caller's contract as in [`CpuKernel::run_args`].
    pub unsafe fn run_raw(
        &self,
        bufs: &[(*mut u8, usize)],
        sizes: &[i64],
        chunk: Option<i64>,
    ) -> Result<(), CodegenError> {
        // SAFETY: the caller's contract.
        unsafe { self.launch(bufs, sizes, chunk) }
    }

    /// Checks the launch, computes the grid and runs it in chunks.
    ///
    /// # Safety
    /// As [`CpuKernel::run_raw`].
    unsafe fn launch(
        &self,
        bufs: &[(*mut u8, usize)],
        sizes: &[i64],
        chunk: Option<i64>,
    ) -> Result<(), CodegenError> {
        let k = &*self.kernel;
        if bufs.len() != k.bufs.len() || sizes.len() != k.sizes.len() {
            return Err(self.launch_err(format!(
                "{} buffers and {} sizes given, {} and {} expected",
                bufs.len(),
                sizes.len(),
                k.bufs.len(),
                k.sizes.len()
            )));
        }
        let mut lens = Vec::with_capacity(bufs.len());
        for (i, (&(_, n), kb)) in bufs.iter().zip(&k.bufs).enumerate() {
            let eb = elem_bytes(kb.dtype);
            if n % eb != 0 {
                return Err(self.launch_err(format!(
                    "buffer b{i} `{}` has {n} bytes, not a whole number of {} elements",
                    kb.name, kb.dtype
                )));
            }
            lens.push(i64::try_from(n / eb).unwrap_or(i64::MAX));
        }
        // The buffers are readable for their lengths: this function's contract.
        let ev = StaticEval { k, sizes, bufs };
        let mut total: i64 = 1;
        for (d, g) in k.grid.iter().enumerate() {
            let e = ev
                .iexpr(g)
                .map_err(|m| self.launch_err(format!("grid extent {d}: {m}")))?;
            if e < 0 {
                return Err(self.launch_err(format!("grid extent {d} is negative ({e})")));
            }
            total = total
                .checked_mul(e)
                .ok_or_else(|| self.launch_err("grid point count overflows i64".into()))?;
        }
        if total == 0 {
            return Ok(());
        }
        let threads = rayon::current_num_threads().max(1) as i64;
        let chunk = match chunk {
            Some(c) => c.max(1),
            None => {
                let work = ev.block_cost(&k.body).max(1.0);
                let min_points = (CHUNK_WORK / work).ceil().max(1.0) as i64;
                let chunks = (total / min_points).clamp(1, threads * 4);
                ceil_div(total, chunks)
            }
        };
        let mut all_sizes = sizes.to_vec();
        if self.checked {
            all_sizes.extend_from_slice(&lens);
        }
        let l = Launch {
            f: self.f,
            bufs: bufs.iter().map(|&(p, _)| p).collect(),
            sizes: all_sizes,
            checked: self.checked,
        };
        let n_chunks = ceil_div(total, chunk);
        let res = if n_chunks == 1 {
            // SAFETY: counts and element sizes checked above; the buffers are the caller's
            // contract; indices are the kernel's contract (or checked).
            unsafe { l.range(0, total) }
        } else {
            (0..n_chunks)
                .into_par_iter()
                .map(|c| {
                    let start = c * chunk;
                    let end = (start + chunk).min(total);
                    // SAFETY: as above; chunks are disjoint ranges of grid points.
                    unsafe { l.range(start, end) }
                })
                .find_first(|r| r.is_some())
                .flatten()
        };
        match res {
            Some(rec) => Err(self.violation(rec)),
            None => Ok(()),
        }
    }
}

/// Index expressions without grid coordinates or loop counters, evaluated in Rust (grid
/// extents, loop extents for the work estimate).
struct StaticEval<'a> {
    k: &'a Kernel,
    sizes: &'a [i64],
    /// (address, length in bytes). Invariant: each is readable for its length while this
    /// value lives (it is built only in `CpuKernel::launch`, whose contract says so).
    bufs: &'a [(*mut u8, usize)],
}

impl StaticEval<'_> {
    fn iexpr(&self, e: &IExpr) -> Result<i64, String> {
        Ok(match e {
            IExpr::Const(n) => *n,
            IExpr::Size(i) => *self.sizes.get(*i).ok_or("unknown size")?,
            IExpr::Grid(_) => return Err("depends on a grid coordinate".into()),
            IExpr::Loop(_) => return Err("depends on a loop counter".into()),
            IExpr::Add(a, b) => self.iexpr(a)?.wrapping_add(self.iexpr(b)?),
            IExpr::Sub(a, b) => self.iexpr(a)?.wrapping_sub(self.iexpr(b)?),
            IExpr::Mul(a, b) => self.iexpr(a)?.wrapping_mul(self.iexpr(b)?),
            IExpr::Div(a, b) | IExpr::Rem(a, b) => {
                let d = self.iexpr(b)?;
                if d <= 0 {
                    return Err(format!("division by {d}"));
                }
                let x = self.iexpr(a)?;
                if matches!(e, IExpr::Div(..)) {
                    x.div_euclid(d)
                } else {
                    x.rem_euclid(d)
                }
            }
            IExpr::Min(a, b) => self.iexpr(a)?.min(self.iexpr(b)?),
            IExpr::LoadIndex { buf, index } => {
                let i = self.iexpr(index)?;
                let kb = self.k.bufs.get(*buf).ok_or("unknown buffer")?;
                let &(p, len) = self.bufs.get(*buf).ok_or("unknown buffer")?;
                let eb = elem_bytes(kb.dtype);
                let off = usize::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(eb))
                    .filter(|o| o.checked_add(eb).is_some_and(|e| e <= len))
                    .ok_or_else(|| format!("index load b{buf}[{i}] out of bounds"))?;
                // SAFETY: `off + eb <= len` and the buffer is readable for `len` bytes (the
                // struct's invariant); unaligned reads are allowed.
                unsafe {
                    let at = p.add(off);
                    match kb.dtype {
                        DType::I32 => i64::from(at.cast::<i32>().read_unaligned()),
                        DType::I64 => at.cast::<i64>().read_unaligned(),
                        other => return Err(format!("index load from an {other} buffer")),
                    }
                }
            }
        })
    }

    /// A rough count of operations one grid point does.
    /// A loop's trip count for the work estimate: exact when it depends on sizes only, a
    /// bound for `min(bound, anything)` (a chunk's length), else 16.
    fn extent_estimate(&self, extent: &IExpr) -> f64 {
        match (self.iexpr(extent), extent) {
            (Ok(n), _) => n.max(0) as f64,
            (Err(_), IExpr::Min(a, b)) => match (self.iexpr(a), self.iexpr(b)) {
                (Ok(x), _) | (_, Ok(x)) => x.max(0) as f64,
                _ => 16.0,
            },
            (Err(_), _) => 16.0,
        }
    }

    fn block_cost(&self, body: &[Stmt]) -> f64 {
        body.iter()
            .map(|s| match s {
                Stmt::Var { init: e, .. } | Stmt::Set { value: e, .. } => 1.0 + expr_cost(e),
                Stmt::ArrSet { value, .. } | Stmt::Store { value, .. } => 2.0 + expr_cost(value),
                Stmt::Array { len, .. } => *len as f64,
                Stmt::For { extent, body, .. } => {
                    let n = self.extent_estimate(extent);
                    n * (2.0 + self.block_cost(body))
                }
                Stmt::Each { extents, body, .. } => {
                    let n: f64 = extents.iter().map(|e| self.extent_estimate(e)).product();
                    n * (2.0 + self.block_cost(body))
                }
                Stmt::Tile { .. } => 0.0,
                Stmt::TileSet { value, .. } => 2.0 + expr_cost(value),
                Stmt::Mma { acc, a, .. } => {
                    let (slots, _) = ir::tile::layout(self.k);
                    match (slots.get(acc), slots.get(a)) {
                        (Some(c), Some(a)) => 3.0 * (c.rows * c.cols * a.cols) as f64,
                        _ => 0.0,
                    }
                }
            })
            .sum()
    }
}

/// `ceil(a / b)` for `a >= 0`, `b > 0`.
fn ceil_div(a: i64, b: i64) -> i64 {
    a / b + i64::from(a % b != 0)
}

fn expr_cost(e: &Expr) -> f64 {
    match e {
        Expr::Const(_) | Expr::Var(_) => 0.0,
        Expr::Load { .. } | Expr::ArrLoad { .. } | Expr::FromIndex(_) | Expr::TileLoad { .. } => {
            2.0
        }
        Expr::Unary(op, a) => {
            let c = match op {
                UnaryOp::Neg | UnaryOp::Recip | UnaryOp::Sqrt => 1.0,
                UnaryOp::Rsqrt => 4.0,
                UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::Softplus
                | UnaryOp::Silu
                | UnaryOp::Sigmoid => 20.0,
            };
            c + expr_cost(a)
        }
        Expr::Binary(_, a, b) => 1.0 + expr_cost(a) + expr_cost(b),
    }
}
