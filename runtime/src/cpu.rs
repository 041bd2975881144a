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
    let mut arena = vec![0f32; (plan.peak as usize).div_ceil(4)];
    let mut zeros: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut ptrs: Vec<*mut u8> = vec![std::ptr::null_mut(); l.buffers.len()];
    // Inputs and parameters are read-only for the schedule; pointers to them are only read.
    let mut owned_ids: Vec<Vec<i32>> = Vec::new();
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
                let (batch, m, k, n) = (ev(batch), ev(m), ev(k), ev(n));
                let (a, b, c) = (
                    ptrs[*lhs] as *const f32,
                    ptrs[*rhs] as *const f32,
                    ptrs[*out] as *mut f32,
                );
                // rhs [K, N] row-major: strides (N, 1); stored [N, K] (transposed): (1, K).
                let (rsb, csb) = if *rhs_t {
                    (1, k as isize)
                } else {
                    (n as isize, 1)
                };
                for bi in 0..batch {
                    let boff = if *rhs_batched { bi * k * n } else { 0 };
                    // SAFETY: the buffers hold batch*m*k, k*n (per batch if batched) and
                    // batch*m*n f32 values by construction of the schedule and the plan.
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n,
                            1.0,
                            a.add(bi * m * k),
                            k as isize,
                            1,
                            b.add(boff),
                            rsb,
                            csb,
                            0.0,
                            c.add(bi * m * n),
                            n as isize,
                            1,
                        );
                    }
                }
            }
        }
        profile.steps.push((name, started.elapsed()));
    }
    let mut outs = Vec::new();
    for (name, b) in &l.outputs {
        let len = (plan.bytes[*b] / 4) as usize;
        let p = ptrs[*b] as *const f32;
        let v = if p.is_null() {
            vec![0.0; len]
        } else {
            // SAFETY: output buffers are f32 and `len` elements long (plan.bytes).
            unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
        };
        outs.push((name.clone(), v));
    }
    drop(zeros);
    drop(owned_ids);
    Ok((outs, profile))
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
