//! Static memory planning: every intermediate buffer gets an offset in one arena, chosen from
//! its lifetime in the schedule so that buffers alive at the same time never overlap.
//!
//! Lifetimes are step intervals `[first write, last read]`; graph outputs live to the end.
//! Placement is greedy (largest first, lowest offset that fits among overlapping lifetimes),
//! offsets aligned to 64 bytes. [`check`] verifies a plan independently of how it was made.

use ir::schedule::Lowered;
pub use ir::schedule::MemoryPlan;

/// Alignment of every placed buffer, in bytes (a cache line; enough for any vector load).
pub const ALIGN: u64 = 64;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MemoryError {
    #[error("symbol `{0}` has no value")]
    Unbound(String),
    #[error("buffer {0} is too large to address")]
    Overflow(usize),
}

/// Bytes of every buffer with the symbols bound by `bind`.
pub fn buffer_bytes(
    l: &Lowered,
    bind: &dyn Fn(&str) -> Option<u64>,
) -> Result<Vec<u64>, MemoryError> {
    l.buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut n = b.dtype.size();
            for d in &b.shape {
                for s in d.syms() {
                    if bind(s).is_none() {
                        return Err(MemoryError::Unbound(s.clone()));
                    }
                }
                let v = d.eval(bind).ok_or(MemoryError::Overflow(i))?;
                n = n.checked_mul(v).ok_or(MemoryError::Overflow(i))?;
            }
            Ok(n)
        })
        .collect()
}

/// Step intervals of every buffer's life.
pub fn lifetimes(l: &Lowered) -> Vec<Option<(usize, usize)>> {
    let mut life: Vec<Option<(usize, usize)>> = vec![None; l.buffers.len()];
    let mut touch = |b: usize, s: usize| {
        life[b] = Some(match life[b] {
            None => (s, s),
            Some((a, e)) => (a.min(s), e.max(s)),
        });
    };
    for (s, step) in l.steps.iter().enumerate() {
        let (r, w) = step.buffers(&l.kernels);
        for b in r.into_iter().chain(w) {
            touch(b, s);
        }
    }
    let end = l.steps.len();
    for (_, b) in &l.outputs {
        let start = life[*b].map_or(end, |(a, _)| a);
        life[*b] = Some((start, end));
    }
    life
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Plans the arena for the symbol values `bind` gives.
pub fn plan(l: &Lowered, bind: &dyn Fn(&str) -> Option<u64>) -> Result<MemoryPlan, MemoryError> {
    plan_sized(l, buffer_bytes(l, bind)?)
}

/// Plans the arena for buffers of the given sizes (`bytes[i]` for buffer `i`): for pricing a
/// schedule whose buffers will be stored in another dtype than the graph's (bf16 activations).
pub fn plan_sized(l: &Lowered, bytes: Vec<u64>) -> Result<MemoryPlan, MemoryError> {
    let life = lifetimes(l);
    let mut order: Vec<usize> = (0..l.buffers.len())
        .filter(|&i| l.buffers[i].kind.in_arena() && life[i].is_some())
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(bytes[i]), i));
    let mut offsets: Vec<Option<u64>> = vec![None; l.buffers.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut peak = 0u64;
    for i in order {
        let Some((a, e)) = life[i] else { continue };
        // Intervals taken by buffers alive at the same time, sorted by offset.
        let mut taken: Vec<(u64, u64)> = placed
            .iter()
            .filter_map(|&j| {
                let (ja, je) = life[j]?;
                let off = offsets[j]?;
                (ja <= e && a <= je).then_some((off, off + align(bytes[j]).max(ALIGN)))
            })
            .collect();
        taken.sort();
        let need = align(bytes[i]).max(ALIGN);
        let mut off = 0u64;
        for (s, t) in taken {
            if off + need <= s {
                break;
            }
            off = off.max(t);
        }
        offsets[i] = Some(off);
        peak = peak.max(off.checked_add(need).ok_or(MemoryError::Overflow(i))?);
        placed.push(i);
    }
    Ok(MemoryPlan {
        offsets,
        bytes,
        lifetimes: life,
        peak,
    })
}

/// Independent check of a plan: every placed buffer lies inside the arena, and no two
/// buffers whose lifetimes overlap share a byte. Returns the first violation.
pub fn check(plan: &MemoryPlan) -> Result<(), String> {
    let placed: Vec<(usize, u64, u64, usize, usize)> = plan
        .offsets
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            let (a, e) = plan.lifetimes[i]?;
            Some((i, (*o)?, plan.bytes[i], a, e))
        })
        .collect();
    for &(i, off, len, _, _) in &placed {
        if off % ALIGN != 0 || off + len > plan.peak {
            return Err(format!(
                "buffer {i} at {off}+{len} is outside the {}-byte arena or unaligned",
                plan.peak
            ));
        }
    }
    for (x, &(i, oi, li, ai, ei)) in placed.iter().enumerate() {
        for &(j, oj, lj, aj, ej) in &placed[x + 1..] {
            let alive_together = ai <= ej && aj <= ei;
            let overlap = oi < oj + lj && oj < oi + li && li > 0 && lj > 0;
            if alive_together && overlap {
                return Err(format!(
                    "buffers {i} ([{oi}, {})) and {j} ([{oj}, {})) overlap while both are alive",
                    oi + li,
                    oj + lj
                ));
            }
        }
    }
    Ok(())
}
