//! The CPU executor: runs a [`Lowered`] schedule with its [`MemoryPlan`] in one arena.
//!
//! Kernels are launched through a [`Launcher`] (the Cranelift-compiled kernels, or the kernel
//! IR evaluator in tests), so this module needs no code generator; matrix products go to
//! `matrixmultiply`'s sgemm. Every value is f32 here; token ids are i32.

use ir::schedule::{BufKind, Lowered, MemoryPlan, Step};
use std::collections::HashMap;

/// Launches kernel `kernel` of the schedule over its whole grid.
pub trait Launcher: Sync {
    /// # Safety
    /// `bufs[i]` must be a live allocation of `bufs[i].1` bytes, not accessed by anything
    /// else while the kernel writes it, holding every element the kernel's buffer `i` is
    /// indexed with for these `sizes`.
    unsafe fn launch(
        &self,
        kernel: usize,
        bufs: &[(*mut u8, usize)],
        sizes: &[i64],
    ) -> Result<(), String>;
}

/// Output elements of a product up to which the products of a batch run in parallel (each
/// on one thread) rather than one after another.
const SMALL_GEMM: usize = 256 * 256;

/// A host tensor given to or returned by the executor.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error("missing {what} `{name}`")]
    Missing { what: &'static str, name: String },
    #[error("`{name}` has {got} elements, the schedule needs {want}")]
    Size {
        name: String,
        got: usize,
        want: usize,
    },
    #[error("`{name}` must be {want}")]
    DType { name: String, want: &'static str },
    #[error("kernel `{kernel}` (IR node {node}) failed: {message}")]
    Kernel {
        kernel: String,
        node: String,
        message: String,
    },
    #[error("the memory plan does not fit the schedule: {0}")]
    Plan(String),
}

/// What one execution needs besides the schedule.
pub struct Inputs<'a> {
    /// Symbol values in `Lowered::syms` order.
    pub sizes: &'a [i64],
    pub data: &'a HashMap<String, HostData>,
    /// f32 parameters by checkpoint name.
    pub params: &'a HashMap<String, Vec<f32>>,
    /// Initial states by name; missing ones are zeros.
    pub states: &'a HashMap<String, Vec<f32>>,
}

/// Wall time of every step of one execution, in schedule order, and the arena size.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub steps: Vec<(String, std::time::Duration)>,
    pub arena_bytes: u64,
}

impl Profile {
    /// Total time per step name with the node number dropped (`ssd_scan_42` -> `ssd_scan`),
    /// largest first.
    pub fn by_kind(&self) -> Vec<(String, std::time::Duration, usize)> {
        let mut m: HashMap<String, (std::time::Duration, usize)> = HashMap::new();
        for (name, d) in &self.steps {
            let kind = name
                .trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('_');
            let e = m.entry(kind.to_string()).or_default();
            e.0 += *d;
            e.1 += 1;
        }
        let mut v: Vec<_> = m.into_iter().map(|(k, (d, n))| (k, d, n)).collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }
}

/// Every graph output (f32) by name, in output order.
pub type Outputs = Vec<(String, Vec<f32>)>;

/// Runs the schedule; returns every graph output and the step profile.
pub fn execute(
    l: &Lowered,
    plan: &MemoryPlan,
    launcher: &dyn Launcher,
    inp: &Inputs<'_>,
) -> Result<(Outputs, Profile), ExecError> {
    let mut outs = Vec::new();
    let opts = ExecOptions::default();
    let profile = execute_in(l, plan, launcher, inp, &opts, &mut Vec::new(), &mut outs)?;
    Ok((outs, profile))
}

/// Choices of the executor that change speed, and rounding, but not the result beyond it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Matrix products with a transposed weight and at most this many rows (per batch) run
    /// as dot products ([`gemm_rows_wt`]) instead of the packed sgemm: the decode step's
    /// products, bound by reading the weights. 0 (the default) keeps every product on sgemm,
    /// so a schedule's results do not depend on how many rows a call has (time segments of
    /// any length are bit-identical to the whole sequence).
    pub gemv_max_rows: usize,
}

/// [`execute`] with the arena and the output vectors supplied by the caller and reused:
/// `arena` grows when the plan needs more and is zeroed; an entry of `outs` whose name is a
/// graph output is overwritten in place (its allocation kept), the others are dropped, and
/// `outs` ends in output order. Calling it in a loop (the decode step) allocates nothing
/// in the steady state, where fresh multi-megabyte buffers would cost a page fault per page.
pub fn execute_in(
    l: &Lowered,
    plan: &MemoryPlan,
    launcher: &dyn Launcher,
    inp: &Inputs<'_>,
    opts: &ExecOptions,
    arena: &mut Vec<f32>,
    outs: &mut Outputs,
) -> Result<Profile, ExecError> {
    let mut profile = Profile {
        steps: Vec::with_capacity(l.steps.len()),
        arena_bytes: plan.peak,
    };
    if plan.offsets.len() != l.buffers.len() {
        return Err(ExecError::Plan(format!(
            "{} offsets for {} buffers",
            plan.offsets.len(),
            l.buffers.len()
        )));
    }
    // The arena, as f32 words so every placed buffer (64-byte aligned offsets) is aligned.
    arena.clear();
    arena.resize((plan.peak as usize).div_ceil(4), 0.0);
    let mut zeros: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut ptrs: Vec<*mut u8> = vec![std::ptr::null_mut(); l.buffers.len()];
    // Inputs and parameters are read-only for the schedule; pointers to them are only read.
    let mut owned_ids: Vec<Vec<i32>> = Vec::new();
    // bf16 copies of f32 host inputs stored as bf16 (activations between checkpointed stages).
    let mut owned_half: Vec<Vec<u16>> = Vec::new();
    for (i, b) in l.buffers.iter().enumerate() {
        let want = (plan.bytes[i] / b.dtype.size()) as usize;
        ptrs[i] = match &b.kind {
            BufKind::Temp | BufKind::Scratch => match plan.offsets[i] {
                Some(off) => arena.as_mut_ptr().cast::<u8>().wrapping_add(off as usize),
                None => std::ptr::null_mut(),
            },
            BufKind::Param(name) => {
                let p = inp.params.get(name).ok_or_else(|| ExecError::Missing {
                    what: "parameter",
                    name: name.clone(),
                })?;
                check_len(name, p.len(), want)?;
                p.as_ptr().cast::<u8>().cast_mut()
            }
            BufKind::Input(name) => match inp.data.get(name) {
                Some(HostData::I32(v)) => {
                    check_len(name, v.len(), want)?;
                    owned_ids.push(v.clone());
                    owned_ids
                        .last_mut()
                        .map_or(std::ptr::null_mut(), |v| v.as_mut_ptr().cast())
                }
                Some(HostData::F32(v)) if b.dtype == ir::DType::BF16 => {
                    check_len(name, v.len(), want)?;
                    owned_half.push(to_bf16_bits(v));
                    owned_half
                        .last_mut()
                        .map_or(std::ptr::null_mut(), |v| v.as_mut_ptr().cast())
                }
                Some(HostData::F32(v)) => {
                    check_len(name, v.len(), want)?;
                    v.as_ptr().cast::<u8>().cast_mut()
                }
                None => {
                    return Err(ExecError::Missing {
                        what: "input",
                        name: name.clone(),
                    });
                }
            },
            BufKind::State(name) => match inp.states.get(name) {
                Some(v) => {
                    check_len(name, v.len(), want)?;
                    v.as_ptr().cast::<u8>().cast_mut()
                }
                None => {
                    let z = zeros.entry(i).or_insert_with(|| vec![0f32; want]);
                    z.as_mut_ptr().cast()
                }
            },
        };
    }
    for step in &l.steps {
        let started = std::time::Instant::now();
        let name = match step {
            Step::Kernel { kernel, .. } => l.kernels[*kernel].name.clone(),
            Step::MatMul { node, .. } => format!("matmul_{}", node.index()),
        };
        match step {
            Step::Kernel { kernel, bufs, node } => {
                let args: Vec<(*mut u8, usize)> = bufs
                    .iter()
                    .map(|&b| (ptrs[b], plan.bytes[b] as usize))
                    .collect();
                // SAFETY: the memory plan (checked by `passes::memory::check` in tests) gives
                // every live buffer its own bytes; inputs, parameters and states are sized above.
                unsafe { launcher.launch(*kernel, &args, inp.sizes) }.map_err(|message| {
                    ExecError::Kernel {
                        kernel: l.kernels[*kernel].name.clone(),
                        node: node.to_string(),
                        message,
                    }
                })?;
            }
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
                ..
            } => {
                let bind = |s: &str| {
                    l.syms
                        .iter()
                        .position(|x| x == s)
                        .map(|i| inp.sizes[i] as u64)
                };
                let ev = |d: &ir::Dim| d.eval(&bind).unwrap_or(0) as usize;
                let (batch, m, k, n) =
                    (batch.eval(&bind).unwrap_or(0) as usize, ev(m), ev(k), ev(n));
                // bf16 operands (bf16 activations) are widened into f32 copies, a bf16
                // result is computed in f32 and rounded: the products of bf16 values are
                // exact in f32, so only the summation order differs from the GPU's.
                let rhs_len = if *rhs_batched { batch * k * n } else { k * n };
                let wide_lhs = widened(&l.buffers[*lhs], ptrs[*lhs], batch * m * k);
                let wide_rhs = widened(&l.buffers[*rhs], ptrs[*rhs], rhs_len);
                let half_out = l.buffers[*out].dtype == ir::DType::BF16;
                let mut wide_out = if half_out {
                    vec![0f32; batch * m * n]
                } else {
                    Vec::new()
                };
                let (a, b, c) = (
                    wide_lhs
                        .as_ref()
                        .map_or(ptrs[*lhs] as *const f32, |v| v.as_ptr()),
                    wide_rhs
                        .as_ref()
                        .map_or(ptrs[*rhs] as *const f32, |v| v.as_ptr()),
                    if half_out {
                        wide_out.as_mut_ptr()
                    } else {
                        ptrs[*out] as *mut f32
                    },
                );
                // rhs [K, N] row-major: strides (N, 1); stored [N, K] (transposed): (1, K).
                let (rsb, csb) = if *rhs_t {
                    (1, k as isize)
                } else {
                    (n as isize, 1)
                };
                // lhs [M, K] row-major: strides (K, 1); stored [K, M]: (1, M).
                let (rsa, csa) = if *lhs_t {
                    (1, m as isize)
                } else {
                    (k as isize, 1)
                };
                let gemv = *rhs_t && !*lhs_t && m <= opts.gemv_max_rows;
                // One product of the batch. Addresses travel as integers so that the batches
                // can run on rayon's threads.
                let (ap, bp, cp) = (a as usize, b as usize, c as usize);
                let one = move |bi: usize| {
                    let (a, b, c) = (ap as *const f32, bp as *const f32, cp as *mut f32);
                    let boff = if *rhs_batched { bi * k * n } else { 0 };
                    if gemv {
                        // SAFETY: as below.
                        let (a, w, c) = unsafe {
                            (
                                std::slice::from_raw_parts(a.add(bi * m * k), m * k),
                                std::slice::from_raw_parts(b.add(boff), n * k),
                                std::slice::from_raw_parts_mut(c.add(bi * m * n), m * n),
                            )
                        };
                        gemm_rows_wt(m, k, n, a, w, c);
                        return;
                    }
                    // SAFETY: the buffers hold batch*m*k, k*n (per batch if batched) and
                    // batch*m*n f32 values by construction of the schedule and the plan, and
                    // batch `bi` writes only its own `m*n` outputs.
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n,
                            1.0,
                            a.add(bi * m * k),
                            rsa,
                            csa,
                            b.add(boff),
                            rsb,
                            csb,
                            0.0,
                            c.add(bi * m * n),
                            n as isize,
                            1,
                        );
                    }
                };
                // Many small products (the SSD's per-chunk matrices) in parallel; a few large
                // ones are threaded inside the GEMM.
                if batch > 1 && m * n <= SMALL_GEMM {
                    use rayon::prelude::*;
                    (0..batch).into_par_iter().for_each(one);
                } else {
                    (0..batch).for_each(one);
                }
                if half_out {
                    // SAFETY: a bf16 output holds batch*m*n values (the plan sizes it).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(ptrs[*out] as *mut u16, batch * m * n)
                    };
                    for (d, &x) in dst.iter_mut().zip(&wide_out) {
                        *d = half::bf16::from_f32(x).to_bits();
                    }
                }
            }
        }
        profile.steps.push((name, started.elapsed()));
    }
    let mut old: HashMap<String, Vec<f32>> = std::mem::take(outs).into_iter().collect();
    for (name, b) in &l.outputs {
        let info = &l.buffers[*b];
        let len = (plan.bytes[*b] / info.dtype.size()) as usize;
        let mut v = old.remove(name).unwrap_or_default();
        v.clear();
        match widened(info, ptrs[*b], len) {
            _ if ptrs[*b].is_null() => v.resize(len, 0.0),
            Some(wide) => v.extend_from_slice(&wide),
            // SAFETY: an output buffer that is not bf16 is f32 (the lowering stores float
            // values as f32 or bf16) and `len` elements long (plan.bytes).
            None => v.extend_from_slice(unsafe {
                std::slice::from_raw_parts(ptrs[*b] as *const f32, len)
            }),
        }
        outs.push((name.clone(), v));
    }
    drop(zeros);
    drop(owned_ids);
    drop(owned_half);
    Ok(profile)
}

/// The bits of `v` rounded to bf16 (nearest even).
pub fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// bf16 bits as f32 values (exact).
pub fn from_bf16_bits(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}

/// An f32 copy of the first `len` values of a bf16 buffer at `p`; `None` for other dtypes.
fn widened(info: &ir::schedule::BufInfo, p: *mut u8, len: usize) -> Option<Vec<f32>> {
    if info.dtype != ir::DType::BF16 || p.is_null() {
        return None;
    }
    // SAFETY: callers pass a bf16 buffer's pointer and at most its planned element count.
    let bits = unsafe { std::slice::from_raw_parts(p as *const u16, len) };
    Some(from_bf16_bits(bits))
}

/// `c [m, n] = a [m, k] @ w^T` for a weight stored `[n, k]` and few rows (the decode step):
/// one dot product over contiguous memory per output, parallel over output columns. It reads
/// each weight once where a packed GEMM would first copy it, which is what a batch-1 step is
/// bound by. Each output's summation order depends only on `k` (sixteen strided partial sums,
/// then a fixed tree), not on `m` or the thread count.
pub fn gemm_rows_wt(m: usize, k: usize, n: usize, a: &[f32], w: &[f32], c: &mut [f32]) {
    use rayon::prelude::*;
    assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // Columns per task: enough work per task, enough tasks per thread.
    let cols = (16384 / k.max(1)).clamp(4, 256);
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(cols * m)
        .enumerate()
        .for_each(|(blk, o)| {
            let j0 = blk * cols;
            for (jj, oj) in o.chunks_mut(m).enumerate() {
                let wr = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
                for (i, x) in oj.iter_mut().enumerate() {
                    *x = dot(&a[i * k..(i + 1) * k], wr);
                }
            }
        });
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = out_t[j * m + i];
        }
    }
}

/// A dot product with sixteen partial sums (vectorizes; AVX2 when the CPU has it).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { dot_avx2(x, y) };
        }
    }
    dot_body(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    dot_body(x, y)
}

#[inline(always)]
fn dot_body(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..16 {
            acc[l] += a[l] * b[l];
        }
    }
    for (l, (a, b)) in xr.iter().zip(yr).enumerate() {
        acc[l] += a * b;
    }
    // A fixed tree: 16 -> 8 -> 4 -> 2 -> 1.
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
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

/// A launcher that evaluates the kernel IR directly (rounding to f32), for tests of the
/// lowering without a code generator.
pub struct EvalLauncher<'a> {
    pub lowered: &'a Lowered,
    pub bytes: Vec<u64>,
}

impl Launcher for EvalLauncher<'_> {
    unsafe fn launch(
        &self,
        kernel: usize,
        bufs: &[(*mut u8, usize)],
        sizes: &[i64],
    ) -> Result<(), String> {
        let k = &self.lowered.kernels[kernel];
        let Some(Step::Kernel { bufs: ids, .. }) = self
            .lowered
            .steps
            .iter()
            .find(|s| matches!(s, Step::Kernel { kernel: kk, .. } if *kk == kernel))
        else {
            return Err("no step launches this kernel".into());
        };
        let mut vals: Vec<Vec<f64>> = Vec::new();
        for (slot, &b) in ids.iter().enumerate() {
            let info = &self.lowered.buffers[b];
            if !matches!(info.dtype, ir::DType::F32 | ir::DType::I32) {
                return Err(format!(
                    "the evaluator runs f32 and i32 buffers, not {}",
                    info.dtype
                ));
            }
            let n = (self.bytes[b] / info.dtype.size()) as usize;
            // SAFETY: per the trait contract each pointer holds `n` elements of its dtype.
            let v: Vec<f64> = unsafe {
                if info.dtype.is_float() {
                    std::slice::from_raw_parts(bufs[slot].0 as *const f32, n)
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                } else {
                    std::slice::from_raw_parts(bufs[slot].0 as *const i32, n)
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                }
            };
            vals.push(v);
        }
        ir::kernel::eval::run(k, sizes, &mut vals, true).map_err(|e| e.to_string())?;
        for (slot, _) in ids.iter().enumerate() {
            if k.bufs[slot].writable {
                // SAFETY: as above; writable buffers are f32.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(bufs[slot].0 as *mut f32, vals[slot].len())
                };
                for (o, v) in out.iter_mut().zip(&vals[slot]) {
                    *o = *v as f32;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_rows_wt_matches_a_plain_product() {
        let mut rng = crate::init::Rng::new(4);
        for (m, k, n) in [
            (1, 1, 1),
            (1, 17, 5),
            (3, 768, 300),
            (8, 45, 1000),
            (2, 16, 33),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let mut c = vec![f32::NAN; m * n];
            gemm_rows_wt(m, k, n, &a, &w, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| a[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|t| (a[i * k + t] as f64 * w[j * k + t] as f64).abs())
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * scale.max(1.0),
                        "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
            // A row's results do not depend on the other rows.
            let mut one = vec![0f32; n];
            gemm_rows_wt(1, k, n, &a[(m - 1) * k..], &w, &mut one);
            assert_eq!(one, c[(m - 1) * n..]);
        }
    }
}
