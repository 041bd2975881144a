//! Which loops of a kernel the threads of a GPU warp or block can share.
//!
//! A kernel runs its body once per grid point. When a body's work is a long loop over a row
//! (a norm's sum of squares, a softmax over the vocabulary, a scan's state vector, a gradient
//! summed over time), one thread per point leaves the GPU idle and reads memory one element
//! at a time. The GPU backend can instead give each point `T` threads ("lanes": a warp of 32,
//! or a block of 256 for loops of 512 or more iterations or of unknown length): statements
//! outside the *split* loops run identically in every lane, and a split loop's iterations are
//! dealt out (`counter = lane, lane + T, ...`), so adjacent lanes read adjacent elements.
//!
//! A loop can be split when its iterations are independent apart from reductions:
//! - scalars declared outside it are only updated as `v = v op e` (`op` one of add, max,
//!   min; `v` read nowhere else in the loop): each lane reduces its share from the identity,
//!   the lanes combine with a butterfly (every lane gets the same bits, since each pairwise
//!   step is commutative), and `v` becomes `v0 op total`. Sums are regrouped, so results
//!   differ from one thread's sequential sum in the last bits;
//! - local arrays declared outside it are only indexed by its counter, and then everywhere
//!   else only inside split loops, by their counters: lane `i` owns elements `i, i+T, ...`
//!   (stored compactly, `len / T` per lane);
//! - its stores index by its counter (outside `/`, `%`, `min`: distinct iterations, distinct
//!   elements), and it loads no buffer it stores to;
//! - its extent is at least [`MIN_SPLIT_EXTENT`] when known at compile time.
//!
//! The outermost such loop on each path is split; loops inside it stay sequential in a lane.
//! Memory written by a split loop is made visible to the other lanes before the statements
//! after it (the backend's duty: a warp barrier).

use crate::kernel::{ArrId, Expr, IExpr, Kernel, LoopId, Stmt, VarId};
use crate::op::BinaryOp;
use std::collections::{HashMap, HashSet};

/// Lanes of a warp.
pub const WARP: u32 = 32;

/// Lanes of a block: a point whose split loops are long gets a whole block. Launches must
/// use blocks of exactly this many threads (the NVPTX backend declares it as `.maxntid`).
pub const BLOCK: u32 = 256;

/// Loops with a constant extent below this stay sequential: most lanes would idle.
pub const MIN_SPLIT_EXTENT: i64 = 64;

/// Split loops with a constant extent below this get a warp, longer ones a block.
pub const BLOCK_SPLIT_EXTENT: i64 = 512;

/// The loops of a kernel that lanes share, and the reductions of each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaneSplit {
    pub loops: HashSet<LoopId>,
    /// Per split loop: the outer scalars it reduces into, with the operation.
    pub reductions: HashMap<LoopId, Vec<(VarId, BinaryOp)>>,
    /// Local arrays dealt out over the lanes (element `i` in lane `i % T`, slot `i / T`).
    pub distributed: HashSet<ArrId>,
    /// Lanes per grid point: 1 (nothing split), [`WARP`] or [`BLOCK`].
    pub threads: u32,
}

impl LaneSplit {
    /// Threads per grid point.
    pub fn threads_per_point(&self) -> u32 {
        self.threads.max(1)
    }
}

/// Threads per grid point of kernel `k` on the GPU (see [`lane_split`]).
pub fn threads_per_point(k: &Kernel) -> u32 {
    lane_split(k).threads_per_point()
}

/// Grid points one GPU thread runs in turn: consecutive along the last grid axis.
pub const POINTS_PER_THREAD: u32 = 4;
/// Points per thread where every buffer a kernel writes is 2 bytes wide (bf16): a thread's
/// stores along the last axis are then 16 bytes, as they are in f32 with four.
pub const POINTS_PER_THREAD_NARROW: u32 = 8;

/// Grid points per GPU thread of kernel `k`: [`POINTS_PER_THREAD`] (or
/// [`POINTS_PER_THREAD_NARROW`]) for a straight-line body (no loop, no local array; a point
/// is one thread) whose last grid extent is a constant multiple of it, else 1. Elementwise
/// kernels over the SSD's `[B, chunks, H, Q, Q]` grids spend more on working out a point's
/// coordinates (divisions by runtime extents) than on its few loads and stores; neighbours
/// share that work, and their accesses become vector ones.
pub fn points_per_thread(k: &Kernel) -> u32 {
    let mut written = k.bufs.iter().filter(|b| b.writable).peekable();
    let narrow = written.peek().is_some() && written.all(|b| b.dtype.size() == 2);
    let straight = k.body.iter().all(|s| {
        !matches!(
            s,
            Stmt::For { .. }
                | Stmt::Array { .. }
                | Stmt::ArrSet { .. }
                | Stmt::Tile { .. }
                | Stmt::Each { .. }
                | Stmt::Mma { .. }
        )
    });
    // The largest count that divides a constant last extent (8 only for narrow kernels).
    let divides = |n: u32| match k.grid.last() {
        Some(IExpr::Const(e)) => *e >= i64::from(n) && e % i64::from(n) == 0,
        _ => false,
    };
    let wide = [POINTS_PER_THREAD_NARROW, POINTS_PER_THREAD];
    let counts = if narrow { &wide[..] } else { &wide[1..] };
    match counts.iter().find(|&&n| divides(n)) {
        Some(&n) if straight && k.grid.len() > 1 => n,
        _ => 1,
    }
}

/// Chooses the loops to split (see the module doc).
pub fn lane_split(k: &Kernel) -> LaneSplit {
    if crate::tile::is_tiled(k) {
        // A block per point; its `Each` statements deal out their own iterations.
        return LaneSplit {
            threads: crate::tile::TILE_THREADS,
            ..LaneSplit::default()
        };
    }
    let mut banned: HashSet<LoopId> = HashSet::new();
    loop {
        let mut split = LaneSplit::default();
        choose(&k.body, &banned, &mut split);
        // Arrays touched inside split loops must not be touched outside them.
        let mut uses: HashMap<ArrId, ArrUses> = HashMap::new();
        arr_uses(&k.body, None, &split, &mut uses);
        let conflicts: Vec<LoopId> = uses
            .values()
            .filter(|u| !u.split_loops.is_empty() && u.outside)
            .flat_map(|u| u.split_loops.iter().copied())
            .collect();
        if conflicts.is_empty() {
            split.distributed = uses
                .iter()
                .filter(|(_, u)| !u.split_loops.is_empty())
                .map(|(a, _)| *a)
                .collect();
            let mut long = false;
            loop_extents(&k.body, &split.loops, &mut |e| {
                long |= !matches!(e, IExpr::Const(n) if *n < BLOCK_SPLIT_EXTENT);
            });
            split.threads = match (split.loops.is_empty(), long) {
                (true, _) => 1,
                (false, false) => WARP,
                (false, true) => BLOCK,
            };
            return split;
        }
        banned.extend(conflicts);
    }
}

/// Calls `f` with the extent of every loop in `loops`.
fn loop_extents(body: &[Stmt], loops: &HashSet<LoopId>, f: &mut dyn FnMut(&IExpr)) {
    for s in body {
        if let Stmt::For {
            counter,
            extent,
            body,
        } = s
        {
            if loops.contains(counter) {
                f(extent);
            }
            loop_extents(body, loops, f);
        }
    }
}

/// Top-down: the first eligible, not banned loop on each path.
fn choose(body: &[Stmt], banned: &HashSet<LoopId>, split: &mut LaneSplit) {
    for s in body {
        if let Stmt::For {
            counter,
            extent,
            body,
        } = s
        {
            if !banned.contains(counter)
                && let Some(reds) = eligible(*counter, extent, body)
            {
                split.loops.insert(*counter);
                split.reductions.insert(*counter, reds);
            } else {
                choose(body, banned, split);
            }
        }
    }
}

#[derive(Default)]
struct ArrUses {
    /// Split loops that index it (by their counter).
    split_loops: HashSet<LoopId>,
    /// Whether anything outside a split loop touches it (declared outside all split loops).
    outside: bool,
}

/// Records, for arrays declared outside split loops, where they are used.
fn arr_uses(
    body: &[Stmt],
    in_split: Option<LoopId>,
    split: &LaneSplit,
    uses: &mut HashMap<ArrId, ArrUses>,
) {
    let note = |a: ArrId, uses: &mut HashMap<ArrId, ArrUses>| {
        if let Some(u) = uses.get_mut(&a) {
            match in_split {
                Some(l) => {
                    u.split_loops.insert(l);
                }
                None => u.outside = true,
            }
        }
    };
    for s in body {
        match s {
            Stmt::Array { arr, .. } => {
                // Arrays declared inside a split loop are private to a lane.
                if in_split.is_none() {
                    uses.insert(*arr, ArrUses::default());
                }
            }
            Stmt::ArrSet { arr, value, .. } => {
                note(*arr, uses);
                expr_arrs(value, &mut |a| note(a, uses));
            }
            Stmt::Var { init: e, .. } | Stmt::Set { value: e, .. } => {
                expr_arrs(e, &mut |a| note(a, uses));
            }
            Stmt::Store { value, .. } | Stmt::TileSet { value, .. } => {
                expr_arrs(value, &mut |a| note(a, uses))
            }
            Stmt::Tile { .. } | Stmt::Mma { .. } => {}
            Stmt::Each { body, .. } => arr_uses(body, in_split, split, uses),
            Stmt::For { counter, body, .. } => {
                let inner = match in_split {
                    Some(l) => Some(l),
                    None if split.loops.contains(counter) => Some(*counter),
                    None => None,
                };
                arr_uses(body, inner, split, uses);
            }
        }
    }
}

fn expr_arrs(e: &Expr, f: &mut dyn FnMut(ArrId)) {
    match e {
        Expr::ArrLoad { arr, .. } => f(*arr),
        Expr::Unary(_, a) => expr_arrs(a, f),
        Expr::Binary(_, a, b) => {
            expr_arrs(a, f);
            expr_arrs(b, f);
        }
        Expr::Const(_)
        | Expr::Var(_)
        | Expr::Load { .. }
        | Expr::FromIndex(_)
        | Expr::TileLoad { .. } => {}
    }
}

/// What a loop body does, as far as splitting is concerned.
#[derive(Default)]
struct Scan {
    private_vars: HashSet<VarId>,
    private_arrs: HashSet<ArrId>,
    /// Outer scalars updated, with the reduction op (`None`: not a reduction).
    sets: HashMap<VarId, Option<BinaryOp>>,
    /// Outer scalars read other than as the accumulator of their reduction.
    reads: HashSet<VarId>,
    loads: HashSet<usize>,
    stores: HashSet<usize>,
    ok: bool,
}

/// The reductions of loop `c` if it can be split.
fn eligible(c: LoopId, extent: &IExpr, body: &[Stmt]) -> Option<Vec<(VarId, BinaryOp)>> {
    if let IExpr::Const(n) = extent
        && *n < MIN_SPLIT_EXTENT
    {
        return None;
    }
    let mut s = Scan {
        ok: true,
        ..Scan::default()
    };
    scan_block(c, body, &mut s);
    if !s.ok || !s.loads.is_disjoint(&s.stores) {
        return None;
    }
    let mut reds = Vec::new();
    for (v, op) in &s.sets {
        match op {
            Some(op) if !s.reads.contains(v) => reds.push((*v, *op)),
            _ => return None,
        }
    }
    reds.sort_by_key(|(v, _)| v.0);
    Some(reds)
}

fn scan_block(c: LoopId, body: &[Stmt], s: &mut Scan) {
    for st in body {
        match st {
            Stmt::Var { var, init } => {
                scan_expr(c, init, s);
                s.private_vars.insert(*var);
            }
            Stmt::Set { var, value } => {
                if s.private_vars.contains(var) {
                    scan_expr(c, value, s);
                    continue;
                }
                let op = reduction(*var, value);
                match op {
                    Some((_, rest)) => scan_expr(c, rest, s),
                    None => scan_expr(c, value, s),
                }
                let op = op.map(|(o, _)| o);
                match s.sets.get(var) {
                    Some(prev) if *prev != op => {
                        s.sets.insert(*var, None);
                    }
                    _ => {
                        s.sets.insert(*var, op);
                    }
                }
            }
            Stmt::Array { arr, .. } => {
                s.private_arrs.insert(*arr);
            }
            Stmt::ArrSet { arr, index, value } => {
                if !s.private_arrs.contains(arr) && *index != IExpr::Loop(c) {
                    s.ok = false;
                }
                scan_expr(c, value, s);
            }
            Stmt::For { body, .. } => scan_block(c, body, s),
            // Only tiled kernels have these, and their loops are never split.
            Stmt::Tile { .. } | Stmt::Each { .. } | Stmt::TileSet { .. } | Stmt::Mma { .. } => {
                s.ok = false;
            }
            Stmt::Store { buf, index, value } => {
                if !indexes_by(index, c) {
                    s.ok = false;
                }
                s.stores.insert(*buf);
                scan_expr(c, value, s);
            }
        }
    }
}

/// `v op e` or `e op v` with a reducing `op`, and `e` (which must not read `v`).
fn reduction(v: VarId, value: &Expr) -> Option<(BinaryOp, &Expr)> {
    let Expr::Binary(op, a, b) = value else {
        return None;
    };
    if !matches!(op, BinaryOp::Add | BinaryOp::Max | BinaryOp::Min) {
        return None;
    }
    let rest = match (&**a, &**b) {
        (Expr::Var(x), e) | (e, Expr::Var(x)) if *x == v => e,
        _ => return None,
    };
    if reads_var(rest, v) {
        return None;
    }
    Some((*op, rest))
}

fn reads_var(e: &Expr, v: VarId) -> bool {
    match e {
        Expr::Var(x) => *x == v,
        Expr::Unary(_, a) => reads_var(a, v),
        Expr::Binary(_, a, b) => reads_var(a, v) || reads_var(b, v),
        Expr::Const(_)
        | Expr::Load { .. }
        | Expr::ArrLoad { .. }
        | Expr::FromIndex(_)
        | Expr::TileLoad { .. } => false,
    }
}

fn scan_expr(c: LoopId, e: &Expr, s: &mut Scan) {
    match e {
        Expr::Var(v) => {
            if !s.private_vars.contains(v) {
                s.reads.insert(*v);
            }
        }
        Expr::Load { buf, .. } => {
            s.loads.insert(*buf);
        }
        Expr::ArrLoad { arr, index } => {
            if !s.private_arrs.contains(arr) && *index != IExpr::Loop(c) {
                s.ok = false;
            }
        }
        Expr::Unary(_, a) => scan_expr(c, a, s),
        Expr::Binary(_, a, b) => {
            scan_expr(c, a, s);
            scan_expr(c, b, s);
        }
        Expr::Const(_) | Expr::FromIndex(_) => {}
        Expr::TileLoad { .. } => s.ok = false,
    }
}

/// Whether `index` depends on loop `c` so that distinct iterations give distinct values:
/// `c` occurs, and not under `/`, `%`, `min` or an index load.
fn indexes_by(index: &IExpr, c: LoopId) -> bool {
    fn occurs(e: &IExpr, c: LoopId, opaque: bool) -> (bool, bool) {
        // (occurs outside opaque ops, occurs under them)
        match e {
            IExpr::Loop(l) if *l == c => (!opaque, opaque),
            IExpr::Const(_) | IExpr::Size(_) | IExpr::Grid(_) | IExpr::Loop(_) => (false, false),
            IExpr::Add(a, b) | IExpr::Sub(a, b) | IExpr::Mul(a, b) => {
                let (x, y) = (occurs(a, c, opaque), occurs(b, c, opaque));
                (x.0 || y.0, x.1 || y.1)
            }
            IExpr::Div(a, b) | IExpr::Rem(a, b) | IExpr::Min(a, b) => {
                let (x, y) = (occurs(a, c, true), occurs(b, c, true));
                (x.0 || y.0, x.1 || y.1)
            }
            IExpr::LoadIndex { index, .. } => occurs(index, c, true),
        }
    }
    let (plain, opaque) = occurs(index, c, false);
    plain && !opaque
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KBuf;
    use crate::types::DType;

    fn kernel(body: Vec<Stmt>) -> Kernel {
        let buf = |name: &str, writable| KBuf {
            name: name.into(),
            dtype: DType::F32,
            writable,
        };
        Kernel {
            name: "k".into(),
            bufs: vec![buf("x", false), buf("y", true)],
            sizes: vec!["B".into()],
            grid: vec![IExpr::Size(0)],
            body,
        }
    }

    fn row(c: u32) -> IExpr {
        IExpr::Grid(0)
            .mul(IExpr::c(768))
            .add(IExpr::Loop(LoopId(c)))
    }

    /// Straight-line kernels over `[B, n]` run 4 neighbouring points per thread, 8 where
    /// every buffer they write is bf16 (a thread's stores are then 16 bytes either way); a
    /// last extent that 8 does not divide keeps 4, one that 4 does not divide keeps 1, and
    /// a body with a loop keeps 1.
    #[test]
    fn points_per_thread_by_width_and_extent() {
        let copy = |out: DType, last: i64, body: Vec<Stmt>| {
            let mut k = kernel(body);
            k.bufs[1].dtype = out;
            k.grid = vec![IExpr::Size(0), IExpr::c(last)];
            points_per_thread(&k)
        };
        let store = vec![Stmt::Store {
            buf: 1,
            index: IExpr::Grid(1),
            value: Expr::Load {
                buf: 0,
                index: IExpr::Grid(1),
            },
        }];
        assert_eq!(copy(DType::F32, 64, store.clone()), POINTS_PER_THREAD);
        assert_eq!(
            copy(DType::BF16, 64, store.clone()),
            POINTS_PER_THREAD_NARROW
        );
        assert_eq!(copy(DType::BF16, 12, store.clone()), POINTS_PER_THREAD);
        assert_eq!(copy(DType::BF16, 6, store.clone()), 1);
        assert_eq!(copy(DType::F32, 6, store.clone()), 1);
        let looped = vec![Stmt::For {
            counter: LoopId(0),
            extent: IExpr::c(2),
            body: store,
        }];
        assert_eq!(copy(DType::BF16, 64, looped), 1);
    }

    /// A row norm: a sum-of-squares loop (a reduction) and a scaling loop (a map) split; the
    /// scalar between them stays in every lane.
    #[test]
    fn a_norm_splits_both_loops() {
        let (acc, inv) = (VarId(0), VarId(1));
        let x = |c| Expr::Load {
            buf: 0,
            index: row(c),
        };
        let k = kernel(vec![
            Stmt::Var {
                var: acc,
                init: Expr::Const(0.0),
            },
            Stmt::For {
                counter: LoopId(0),
                extent: IExpr::c(768),
                body: vec![Stmt::Set {
                    var: acc,
                    value: Expr::bin(
                        BinaryOp::Add,
                        Expr::Var(acc),
                        Expr::bin(BinaryOp::Mul, x(0), x(0)),
                    ),
                }],
            },
            Stmt::Var {
                var: inv,
                init: Expr::un(crate::op::UnaryOp::Rsqrt, Expr::Var(acc)),
            },
            Stmt::For {
                counter: LoopId(1),
                extent: IExpr::c(768),
                body: vec![Stmt::Store {
                    buf: 1,
                    index: row(1),
                    value: Expr::bin(BinaryOp::Mul, x(1), Expr::Var(inv)),
                }],
            },
        ]);
        let s = lane_split(&k);
        assert_eq!(s.loops.len(), 2);
        assert_eq!(s.reductions[&LoopId(0)], vec![(acc, BinaryOp::Add)]);
        assert!(s.reductions[&LoopId(1)].is_empty());
        assert_eq!(s.threads_per_point(), BLOCK);
        assert!(s.distributed.is_empty());
    }

    /// A recurrence (the carried value is read before it is set) and a short loop stay
    /// sequential; a store that ignores the counter forbids splitting.
    #[test]
    fn recurrences_short_loops_and_repeated_stores_stay_sequential() {
        let h = VarId(0);
        let x = Expr::Load {
            buf: 0,
            index: row(0),
        };
        let recurrence = Stmt::For {
            counter: LoopId(0),
            extent: IExpr::c(768),
            body: vec![
                Stmt::Set {
                    var: h,
                    value: Expr::bin(BinaryOp::Mul, Expr::Var(h), x.clone()),
                },
                Stmt::Store {
                    buf: 1,
                    index: row(0),
                    value: Expr::Var(h),
                },
            ],
        };
        let decl = Stmt::Var {
            var: h,
            init: Expr::Const(1.0),
        };
        assert!(
            lane_split(&kernel(vec![decl.clone(), recurrence]))
                .loops
                .is_empty()
        );
        let short = Stmt::For {
            counter: LoopId(0),
            extent: IExpr::c(16),
            body: vec![Stmt::Store {
                buf: 1,
                index: row(0),
                value: x.clone(),
            }],
        };
        assert!(lane_split(&kernel(vec![short])).loops.is_empty());
        let same_place = Stmt::For {
            counter: LoopId(0),
            extent: IExpr::Size(0),
            body: vec![Stmt::Store {
                buf: 1,
                index: IExpr::Grid(0),
                value: x,
            }],
        };
        assert!(lane_split(&kernel(vec![same_place])).loops.is_empty());
    }

    /// A scan's state array indexed by the inner counter splits in the inner loop (inside a
    /// sequential time loop) when every access is by a split loop's counter; one access by
    /// a constant keeps it whole.
    #[test]
    fn state_arrays_split_only_when_every_access_is_by_a_counter() {
        let (s, y) = (ArrId(0), VarId(0));
        let build = |outside: Option<Stmt>| {
            let mut body = vec![Stmt::Array {
                arr: s,
                len: 128,
                init: 0.0,
            }];
            body.push(Stmt::For {
                counter: LoopId(0),
                extent: IExpr::Size(0),
                body: vec![
                    Stmt::Var {
                        var: y,
                        init: Expr::Const(0.0),
                    },
                    Stmt::For {
                        counter: LoopId(1),
                        extent: IExpr::c(128),
                        body: vec![
                            Stmt::ArrSet {
                                arr: s,
                                index: IExpr::Loop(LoopId(1)),
                                value: Expr::bin(
                                    BinaryOp::Mul,
                                    Expr::ArrLoad {
                                        arr: s,
                                        index: IExpr::Loop(LoopId(1)),
                                    },
                                    Expr::Const(0.5),
                                ),
                            },
                            Stmt::Set {
                                var: y,
                                value: Expr::bin(
                                    BinaryOp::Add,
                                    Expr::Var(y),
                                    Expr::ArrLoad {
                                        arr: s,
                                        index: IExpr::Loop(LoopId(1)),
                                    },
                                ),
                            },
                        ],
                    },
                    Stmt::Store {
                        buf: 1,
                        index: IExpr::Grid(0).add(IExpr::Loop(LoopId(0))),
                        value: Expr::Var(y),
                    },
                ],
            });
            body.extend(outside);
            kernel(body)
        };
        let k = build(None);
        let sp = lane_split(&k);
        assert_eq!(sp.loops, HashSet::from([LoopId(1)]));
        assert_eq!(sp.distributed, HashSet::from([s]));
        assert_eq!(sp.threads_per_point(), WARP);
        assert_eq!(sp.reductions[&LoopId(1)], vec![(y, BinaryOp::Add)]);
        let k = build(Some(Stmt::Store {
            buf: 1,
            index: IExpr::Grid(0),
            value: Expr::ArrLoad {
                arr: s,
                index: IExpr::c(0),
            },
        }));
        assert!(lane_split(&k).loops.is_empty());
    }
}
