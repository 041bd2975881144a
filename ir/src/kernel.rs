//! The kernel IR: loop-level code for one fused kernel, described once and lowered by every
//! backend (Cranelift for the CPU, LLVM NVPTX for the GPU).
//!
//! A kernel runs its `body` once for every point of its parallel `grid` (a GPU thread, or a
//! rayon task over a chunk of points on the CPU). Inside, scalar code computes in f32: loads
//! from buffers (converting from the buffer's storage dtype), arithmetic, sequential `For`
//! loops (reductions, time recurrences), mutable scalars and small fixed-size local arrays
//! (the `[N]` state of a scan lives in registers), and stores (converting to the storage
//! dtype). Index arithmetic is i64 over grid coordinates, loop counters and the kernel's
//! runtime `sizes` (batch, sequence length, ...), so one compiled kernel serves every shape.
//!
//! Invariants ([`Kernel::check`]): every buffer, size, variable, loop counter and local array
//! a statement uses is declared (buffers and sizes in the kernel header, the rest earlier in
//! an enclosing block) and no id is declared twice; stores only go to writable float buffers;
//! local arrays have a compile-time length. Not checkable here, and the producer's duty:
//! distinct grid points never write the same element (backends run them in parallel), and
//! grid extents are not negative.

use crate::op::{BinaryOp, UnaryOp};
use crate::types::DType;
use std::fmt;

/// A buffer argument of a kernel: flat, row-major, indexed in elements.
#[derive(Clone, Debug, PartialEq)]
pub struct KBuf {
    pub name: String,
    pub dtype: DType,
    pub writable: bool,
}

/// The alignment in bytes of every buffer a GPU kernel takes: the NVPTX backend declares it
/// (so that neighbouring accesses become vector ones), and the CUDA runtime checks it when it
/// binds buffers (arena offsets are multiples of 64, allocations of 256). An artifact's
/// PTX assumes it too. The CPU backend assumes nothing.
pub const BUF_ALIGN: u64 = 16;

/// The suffix of a GPU kernel's second entry (where the NVPTX backend gives it one), which
/// does its index math in 32 bits: i64
/// multiplies, divisions and shifts are several instructions each on the GPU, and index
/// math was most of the instructions of the tiled SSD kernels. The runtime launches it
/// where every value an index can reach is below [`INDEX32_LIMIT`]. No kernel's own entry
/// name ends with it (`codegen::nvptx::entry_names`), so the two never collide.
pub const INDEX32_SUFFIX: &str = "_idx32";

/// The bound below which a launch may use the 32-bit entry: every buffer it binds has fewer
/// elements, its grid fewer points, every runtime size is smaller (and the backend gives
/// the entry only to kernels whose index constants are smaller too). A kernel's indices are
/// in-bounds element indices, grid coordinates and loop counters (or their partial sums),
/// so they stay below it; the factor 2 to `i32::MAX` leaves room for a grid-stride step or
/// an unrolled iteration past the end, which are compared before use.
pub const INDEX32_LIMIT: u64 = 1 << 30;

/// The 32-bit entry of the kernel whose entry is `entry`.
pub fn index32_entry(entry: &str) -> String {
    format!("{entry}{INDEX32_SUFFIX}")
}

/// An i64 index expression.
#[derive(Clone, Debug, PartialEq)]
pub enum IExpr {
    Const(i64),
    /// The kernel's runtime size number `i` (`Kernel::sizes[i]`).
    Size(usize),
    /// Coordinate `i` of the grid point this body instance runs for.
    Grid(usize),
    /// The counter of an enclosing `For`.
    Loop(LoopId),
    Add(Box<IExpr>, Box<IExpr>),
    Sub(Box<IExpr>, Box<IExpr>),
    Mul(Box<IExpr>, Box<IExpr>),
    /// Floor division by a positive divisor.
    Div(Box<IExpr>, Box<IExpr>),
    /// Remainder by a positive divisor (non-negative for non-negative operands).
    Rem(Box<IExpr>, Box<IExpr>),
    /// The smaller of two values (the length of a sequence's last, partial chunk:
    /// `min(Q, L - c*Q)`).
    Min(Box<IExpr>, Box<IExpr>),
    /// Element `index` of an integer buffer (token ids), as i64.
    LoadIndex {
        buf: usize,
        index: Box<IExpr>,
    },
}

// Builders that fold constants; not the std operator traits, which would hide the folding.
#[allow(clippy::should_implement_trait)]
impl IExpr {
    pub fn c(n: i64) -> IExpr {
        IExpr::Const(n)
    }
    pub fn add(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (IExpr::Const(0), _) => o,
            (_, IExpr::Const(0)) => self,
            (IExpr::Const(a), IExpr::Const(b)) => IExpr::Const(a + b),
            _ => {
                if let Some(a) = IExpr::undivided(&self, &o).or_else(|| IExpr::undivided(&o, &self))
                {
                    return a;
                }
                // (p + q)·c + r = p·c + (q·c + r) where the latter folds.
                if let IExpr::Mul(sum, c) = &self
                    && let (IExpr::Add(p, q), IExpr::Const(_)) = (&**sum, &**c)
                {
                    let inner = (**q).clone().mul((**c).clone());
                    if let Some(folded) = IExpr::undivided(&inner, &o) {
                        return (**p).clone().mul((**c).clone()).add(folded);
                    }
                }
                IExpr::Add(Box::new(self), Box::new(o))
            }
        }
    }

    /// `a` where `q + r` is `(a / d)·d + a % d` (true for floor and Euclidean division
    /// alike): what a linear index of a multi-index split from a linear index comes to
    /// (elementwise kernels over a flat grid would otherwise divide by `L` and multiply
    /// back at every point).
    fn undivided(q: &IExpr, r: &IExpr) -> Option<IExpr> {
        let (IExpr::Mul(x, d), IExpr::Rem(a2, d2)) = (q, r) else {
            return None;
        };
        let IExpr::Div(a, d1) = &**x else {
            return None;
        };
        (a == a2 && d1 == d && d == d2).then(|| (**a).clone())
    }
    pub fn sub(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (_, IExpr::Const(0)) => self,
            (IExpr::Const(a), IExpr::Const(b)) => IExpr::Const(a - b),
            _ => IExpr::Sub(Box::new(self), Box::new(o)),
        }
    }
    pub fn mul(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (IExpr::Const(0), _) | (_, IExpr::Const(0)) => IExpr::Const(0),
            (IExpr::Const(1), _) => o,
            (_, IExpr::Const(1)) => self,
            (IExpr::Const(a), IExpr::Const(b)) => IExpr::Const(a * b),
            (IExpr::Mul(x, a), IExpr::Const(b)) => match **a {
                IExpr::Const(a) => (**x).clone().mul(IExpr::Const(a * b)),
                _ => IExpr::Mul(Box::new(self), Box::new(o)),
            },
            _ => IExpr::Mul(Box::new(self), Box::new(o)),
        }
    }
    pub fn div(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (_, IExpr::Const(1)) => self,
            (IExpr::Const(a), IExpr::Const(b)) if *b > 0 => IExpr::Const(a.div_euclid(*b)),
            _ => IExpr::Div(Box::new(self), Box::new(o)),
        }
    }
    pub fn rem(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (_, IExpr::Const(1)) => IExpr::Const(0),
            (IExpr::Const(a), IExpr::Const(b)) if *b > 0 => IExpr::Const(a.rem_euclid(*b)),
            _ => IExpr::Rem(Box::new(self), Box::new(o)),
        }
    }
    pub fn min(self, o: IExpr) -> IExpr {
        match (&self, &o) {
            (IExpr::Const(a), IExpr::Const(b)) => IExpr::Const(*a.min(b)),
            _ => IExpr::Min(Box::new(self), Box::new(o)),
        }
    }
}

/// A mutable f32 scalar of the kernel body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VarId(pub u32);

/// A sequential loop's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopId(pub u32);

/// A fixed-size f32 local array (registers on the GPU, the stack on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArrId(pub u32);

/// A 2-D tile a grid point's threads share (shared memory on the GPU): see [`crate::tile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileId(pub u32);

/// An f32 value expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(f64),
    Var(VarId),
    /// Element `index` of buffer `buf`, converted to f32.
    Load {
        buf: usize,
        index: IExpr,
    },
    /// Element `index` of a local array.
    ArrLoad {
        arr: ArrId,
        index: IExpr,
    },
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// An index value converted to f32 (counts for means, positions).
    FromIndex(IExpr),
    /// Element `[row, col]` of a tile, converted to f32.
    TileLoad {
        tile: TileId,
        row: IExpr,
        col: IExpr,
    },
}

impl Expr {
    pub fn un(op: UnaryOp, a: Expr) -> Expr {
        Expr::Unary(op, Box::new(a))
    }
    pub fn bin(op: BinaryOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }

    /// Calls `f` with this expression and every value subexpression of it (not the index
    /// expressions inside loads).
    pub fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Unary(_, a) => a.walk(f),
            Expr::Binary(_, a, b) => {
                a.walk(f);
                b.walk(f);
            }
            Expr::Const(_)
            | Expr::Var(_)
            | Expr::Load { .. }
            | Expr::ArrLoad { .. }
            | Expr::FromIndex(_)
            | Expr::TileLoad { .. } => {}
        }
    }
}

/// An expression [`Kernel::visit`] reaches.
#[derive(Clone, Copy, Debug)]
pub enum Node<'a> {
    Index(&'a IExpr),
    Value(&'a Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// Declares a mutable scalar with an initial value.
    Var { var: VarId, init: Expr },
    /// Assigns a declared scalar.
    Set { var: VarId, value: Expr },
    /// Declares a local array of `len` elements, all `init`.
    Array { arr: ArrId, len: usize, init: f64 },
    ArrSet {
        arr: ArrId,
        index: IExpr,
        value: Expr,
    },
    /// `for counter in 0..extent { body }`, sequentially.
    For {
        counter: LoopId,
        extent: IExpr,
        body: Vec<Stmt>,
    },
    /// Converts `value` to the buffer's dtype and writes it at `index`.
    Store {
        buf: usize,
        index: IExpr,
        value: Expr,
    },
    /// Declares a `rows x cols` tile of `dtype` (f32 or bf16), contents undefined; only in
    /// the kernel's top-level body. A kernel with tiles is *tiled* ([`crate::tile`]).
    Tile {
        tile: TileId,
        dtype: DType,
        rows: usize,
        cols: usize,
    },
    /// The body once for every point of `0..extents[0] x 0..extents[1] x ...`, the
    /// point's threads sharing the iterations; what it writes is visible after it.
    /// Iterations must not write what another reads or writes.
    Each {
        counters: Vec<LoopId>,
        extents: Vec<IExpr>,
        body: Vec<Stmt>,
    },
    /// Converts `value` to the tile's dtype and writes it at `[row, col]`; only in an
    /// `Each`.
    TileSet {
        tile: TileId,
        row: IExpr,
        col: IExpr,
        value: Expr,
    },
    /// The matrix product `acc (+)= a bᵀ` over tiles: `acc` f32 `[m, n]`, `a` bf16 `[m, k]`,
    /// `b` bf16 `[n, k]` (both `k`-contiguous, as tensor cores read them), with `m` a
    /// multiple of 16, `n` of 8, `k` of 16. Without `accumulate`, `acc` is overwritten.
    Mma {
        acc: TileId,
        a: TileId,
        b: TileId,
        accumulate: bool,
    },
}

/// One kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub bufs: Vec<KBuf>,
    /// Names of the runtime sizes (`B`, `L`, or derived extents), bound at launch.
    pub sizes: Vec<String>,
    /// Parallel extents; the body runs once per point of `grid[0] x grid[1] x ...`.
    pub grid: Vec<IExpr>,
    pub body: Vec<Stmt>,
}

/// A kernel that breaks an invariant of [`Kernel::check`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("kernel `{kernel}`: {message}")]
pub struct KernelError {
    pub kernel: String,
    pub message: String,
}

/// Every id declared so far in the kernel: ids are never reused.
#[derive(Default)]
struct Seen {
    vars: std::collections::HashSet<VarId>,
    loops: std::collections::HashSet<LoopId>,
    arrs: std::collections::HashSet<ArrId>,
}

#[derive(Default, Clone)]
struct Scope {
    vars: Vec<VarId>,
    loops: Vec<LoopId>,
    arrs: Vec<(ArrId, usize)>,
    /// Declared tiles: (id, dtype, rows, cols).
    tiles: Vec<(TileId, DType, usize, usize)>,
    /// Inside a `For` or an `Each` (tiles are declared outside both).
    nested: bool,
    /// Inside an `Each`.
    each: bool,
}

impl Scope {
    fn tile(&self, t: TileId) -> Result<(DType, usize, usize), String> {
        self.tiles
            .iter()
            .find(|(id, ..)| *id == t)
            .map(|&(_, d, r, c)| (d, r, c))
            .ok_or_else(|| format!("use of undeclared tile t{}", t.0))
    }
}

impl Kernel {
    /// Checks the invariants listed in the module doc.
    pub fn check(&self) -> Result<(), KernelError> {
        let err = |m: String| KernelError {
            kernel: self.name.clone(),
            message: m,
        };
        for g in &self.grid {
            self.check_iexpr(g, &Scope::default(), true).map_err(err)?;
        }
        self.check_block(&self.body, &mut Scope::default(), &mut Seen::default())
            .map_err(err)
    }

    fn check_block(&self, body: &[Stmt], scope: &mut Scope, seen: &mut Seen) -> Result<(), String> {
        let mark = (scope.vars.len(), scope.loops.len(), scope.arrs.len());

        for s in body {
            match s {
                Stmt::Var { var, init } => {
                    self.check_expr(init, scope)?;
                    if !seen.vars.insert(*var) {
                        return Err(format!("v{} is declared twice", var.0));
                    }
                    scope.vars.push(*var);
                }
                Stmt::Set { var, value } => {
                    if !scope.vars.contains(var) {
                        return Err(format!("assignment to undeclared v{}", var.0));
                    }
                    self.check_expr(value, scope)?;
                }
                Stmt::Array { arr, len, .. } => {
                    if !seen.arrs.insert(*arr) {
                        return Err(format!("a{} is declared twice", arr.0));
                    }
                    if *len == 0 {
                        return Err(format!("local array a{} has length 0", arr.0));
                    }
                    scope.arrs.push((*arr, *len));
                }
                Stmt::ArrSet { arr, index, value } => {
                    if !scope.arrs.iter().any(|(a, _)| a == arr) {
                        return Err(format!("store to undeclared local array a{}", arr.0));
                    }
                    self.check_iexpr(index, scope, false)?;
                    self.check_expr(value, scope)?;
                }
                Stmt::For {
                    counter,
                    extent,
                    body,
                } => {
                    self.check_iexpr(extent, scope, false)?;
                    if !seen.loops.insert(*counter) {
                        return Err(format!("loop counter i{} is declared twice", counter.0));
                    }
                    scope.loops.push(*counter);
                    let nested = std::mem::replace(&mut scope.nested, true);
                    self.check_block(body, scope, seen)?;
                    scope.nested = nested;
                    scope.loops.pop();
                }
                Stmt::Tile {
                    tile,
                    dtype,
                    rows,
                    cols,
                } => {
                    if scope.nested {
                        return Err(format!("tile t{} declared inside a loop", tile.0));
                    }
                    if scope.tiles.iter().any(|(t, ..)| t == tile) {
                        return Err(format!("t{} is declared twice", tile.0));
                    }
                    if !matches!(dtype, DType::F32 | DType::BF16) || *rows == 0 || *cols == 0 {
                        return Err(format!(
                            "tile t{} must be a non-empty f32 or bf16 tile",
                            tile.0
                        ));
                    }
                    scope.tiles.push((*tile, *dtype, *rows, *cols));
                }
                Stmt::Each {
                    counters,
                    extents,
                    body,
                } => {
                    if scope.each {
                        return Err("an Each inside an Each".into());
                    }
                    if counters.is_empty() || counters.len() != extents.len() {
                        return Err("an Each needs one extent per counter".into());
                    }
                    for e in extents {
                        self.check_iexpr(e, scope, false)?;
                    }
                    for c in counters {
                        if !seen.loops.insert(*c) {
                            return Err(format!("loop counter i{} is declared twice", c.0));
                        }
                        scope.loops.push(*c);
                    }
                    let outer = (scope.nested, scope.each);
                    (scope.nested, scope.each) = (true, true);
                    self.check_block(body, scope, seen)?;
                    (scope.nested, scope.each) = outer;
                    scope.loops.truncate(scope.loops.len() - counters.len());
                }
                Stmt::TileSet {
                    tile,
                    row,
                    col,
                    value,
                } => {
                    if !scope.each {
                        return Err(format!("a store to tile t{} outside an Each", tile.0));
                    }
                    scope.tile(*tile)?;
                    self.check_iexpr(row, scope, false)?;
                    self.check_iexpr(col, scope, false)?;
                    self.check_expr(value, scope)?;
                }
                Stmt::Mma {
                    acc,
                    a,
                    b,
                    accumulate: _,
                } => {
                    if scope.each {
                        return Err("a tile product inside an Each".into());
                    }
                    let (ct, m, n) = scope.tile(*acc)?;
                    let (at, am, k) = scope.tile(*a)?;
                    let (bt, bn, bk) = scope.tile(*b)?;
                    if ct != DType::F32 || at != DType::BF16 || bt != DType::BF16 {
                        return Err("a tile product takes bf16 operands into an f32 tile".into());
                    }
                    if am != m || bn != n || bk != k {
                        return Err(format!(
                            "tile product t{} [{m}, {n}] of t{} [{am}, {k}] and t{} [{bn}, {bk}]ᵀ",
                            acc.0, a.0, b.0
                        ));
                    }
                    if m % 16 != 0 || n % 8 != 0 || k % 16 != 0 {
                        return Err(format!(
                            "tile product [{m}, {n}] over {k}: m must be a multiple of 16, n of 8, k of 16"
                        ));
                    }
                }
                Stmt::Store { buf, index, value } => {
                    match self.bufs.get(*buf) {
                        Some(b) if b.writable && b.dtype.is_float() => {}
                        Some(b) if b.writable => {
                            return Err(format!("store to the integer buffer `{}`", b.name));
                        }
                        Some(b) => return Err(format!("store to read-only buffer `{}`", b.name)),
                        None => return Err(format!("store to unknown buffer {buf}")),
                    }
                    self.check_iexpr(index, scope, false)?;
                    self.check_expr(value, scope)?;
                }
            }
        }
        scope.vars.truncate(mark.0);
        scope.loops.truncate(mark.1);
        scope.arrs.truncate(mark.2);
        Ok(())
    }

    fn check_expr(&self, e: &Expr, scope: &Scope) -> Result<(), String> {
        match e {
            Expr::Const(_) => Ok(()),
            Expr::Var(v) => {
                if scope.vars.contains(v) {
                    Ok(())
                } else {
                    Err(format!("use of undeclared v{}", v.0))
                }
            }
            Expr::Load { buf, index } => {
                if *buf >= self.bufs.len() {
                    return Err(format!("load from unknown buffer {buf}"));
                }
                self.check_iexpr(index, scope, false)
            }
            Expr::ArrLoad { arr, index } => {
                if !scope.arrs.iter().any(|(a, _)| a == arr) {
                    return Err(format!("load from undeclared local array a{}", arr.0));
                }
                self.check_iexpr(index, scope, false)
            }
            Expr::Unary(_, a) => self.check_expr(a, scope),
            Expr::Binary(_, a, b) => {
                self.check_expr(a, scope)?;
                self.check_expr(b, scope)
            }
            Expr::FromIndex(i) => self.check_iexpr(i, scope, false),
            Expr::TileLoad { tile, row, col } => {
                scope.tile(*tile)?;
                self.check_iexpr(row, scope, false)?;
                self.check_iexpr(col, scope, false)
            }
        }
    }

    fn check_iexpr(&self, e: &IExpr, scope: &Scope, in_grid: bool) -> Result<(), String> {
        match e {
            IExpr::Const(_) => Ok(()),
            IExpr::Size(i) => {
                if *i < self.sizes.len() {
                    Ok(())
                } else {
                    Err(format!("unknown size {i}"))
                }
            }
            IExpr::Grid(i) => {
                if in_grid {
                    Err("a grid extent uses a grid coordinate".into())
                } else if *i < self.grid.len() {
                    Ok(())
                } else {
                    Err(format!(
                        "grid coordinate {i} of a {}-d grid",
                        self.grid.len()
                    ))
                }
            }
            IExpr::Loop(l) => {
                if scope.loops.contains(l) {
                    Ok(())
                } else {
                    Err(format!("use of loop counter i{} outside its loop", l.0))
                }
            }
            IExpr::Add(a, b)
            | IExpr::Sub(a, b)
            | IExpr::Mul(a, b)
            | IExpr::Div(a, b)
            | IExpr::Rem(a, b)
            | IExpr::Min(a, b) => {
                self.check_iexpr(a, scope, in_grid)?;
                self.check_iexpr(b, scope, in_grid)
            }
            IExpr::LoadIndex { buf, index } => {
                match self.bufs.get(*buf) {
                    Some(b) if !b.dtype.is_float() => {}
                    Some(b) => {
                        return Err(format!("index load from the float buffer `{}`", b.name));
                    }
                    None => return Err(format!("index load from unknown buffer {buf}")),
                }
                self.check_iexpr(index, scope, in_grid)
            }
        }
    }
}

impl fmt::Display for IExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IExpr::Const(n) => write!(f, "{n}"),
            IExpr::Size(i) => write!(f, "s{i}"),
            IExpr::Grid(i) => write!(f, "g{i}"),
            IExpr::Loop(l) => write!(f, "i{}", l.0),
            IExpr::Add(a, b) => write!(f, "({a} + {b})"),
            IExpr::Sub(a, b) => write!(f, "({a} - {b})"),
            IExpr::Mul(a, b) => write!(f, "{a}*{b}"),
            IExpr::Div(a, b) => write!(f, "({a} / {b})"),
            IExpr::Rem(a, b) => write!(f, "({a} % {b})"),
            IExpr::Min(a, b) => write!(f, "min({a}, {b})"),
            IExpr::LoadIndex { buf, index } => write!(f, "b{buf}[{index}]"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(x) => write!(f, "{x:?}"),
            Expr::Var(v) => write!(f, "v{}", v.0),
            Expr::Load { buf, index } => write!(f, "b{buf}[{index}]"),
            Expr::ArrLoad { arr, index } => write!(f, "a{}[{index}]", arr.0),
            Expr::Unary(op, a) => write!(f, "{}({a})", op.name()),
            Expr::Binary(op, a, b) => write!(f, "{}({a}, {b})", op.name()),
            Expr::FromIndex(i) => write!(f, "f32({i})"),
            Expr::TileLoad { tile, row, col } => write!(f, "t{}[{row}, {col}]", tile.0),
        }
    }
}

fn write_block(f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
    let pad = "  ".repeat(depth);
    for s in body {
        match s {
            Stmt::Var { var, init } => writeln!(f, "{pad}var v{} = {init}", var.0)?,
            Stmt::Set { var, value } => writeln!(f, "{pad}v{} = {value}", var.0)?,
            Stmt::Array { arr, len, init } => {
                writeln!(f, "{pad}array a{}[{len}] = {init:?}", arr.0)?
            }
            Stmt::ArrSet { arr, index, value } => {
                writeln!(f, "{pad}a{}[{index}] = {value}", arr.0)?
            }
            Stmt::For {
                counter,
                extent,
                body,
            } => {
                writeln!(f, "{pad}for i{} in 0..{extent} {{", counter.0)?;
                write_block(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::Store { buf, index, value } => writeln!(f, "{pad}b{buf}[{index}] = {value}")?,
            Stmt::Tile {
                tile,
                dtype,
                rows,
                cols,
            } => writeln!(f, "{pad}tile t{}: {dtype} [{rows}, {cols}]", tile.0)?,
            Stmt::Each {
                counters,
                extents,
                body,
            } => {
                let c: Vec<String> = counters.iter().map(|c| format!("i{}", c.0)).collect();
                let e: Vec<String> = extents.iter().map(|e| format!("0..{e}")).collect();
                writeln!(f, "{pad}each ({}) in ({}) {{", c.join(", "), e.join(", "))?;
                write_block(f, body, depth + 1)?;
                writeln!(f, "{pad}}}")?;
            }
            Stmt::TileSet {
                tile,
                row,
                col,
                value,
            } => writeln!(f, "{pad}t{}[{row}, {col}] = {value}", tile.0)?,
            Stmt::Mma {
                acc,
                a,
                b,
                accumulate,
            } => {
                let op = if *accumulate { "+=" } else { "=" };
                writeln!(f, "{pad}t{} {op} t{} t{}ᵀ", acc.0, a.0, b.0)?
            }
        }
    }
    Ok(())
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {}(", self.name)?;
        for (i, b) in self.bufs.iter().enumerate() {
            let rw = if b.writable { "mut " } else { "" };
            write!(
                f,
                "{}b{i}: {rw}{} {}",
                if i > 0 { ", " } else { "" },
                b.dtype,
                b.name
            )?;
        }
        write!(f, ") sizes [{}] grid [", self.sizes.join(", "))?;
        for (i, g) in self.grid.iter().enumerate() {
            write!(f, "{}{g}", if i > 0 { ", " } else { "" })?;
        }
        writeln!(f, "] {{")?;
        write_block(f, &self.body, 1)?;
        writeln!(f, "}}")
    }
}

impl Kernel {
    /// Per buffer slot: whether the body loads from it (as a value or an index). A writable
    /// buffer that is never loaded is only written.
    pub fn loaded(&self) -> Vec<bool> {
        let mut out = vec![false; self.bufs.len()];
        self.visit(&mut |n| {
            let buf = match n {
                Node::Index(IExpr::LoadIndex { buf, .. }) | Node::Value(Expr::Load { buf, .. }) => {
                    *buf
                }
                _ => return,
            };
            if let Some(o) = out.get_mut(buf) {
                *o = true;
            }
        });
        out
    }

    /// The largest magnitude of an index constant in the kernel (0 without any).
    pub fn max_index_const(&self) -> u64 {
        let mut most = 0;
        self.visit(&mut |n| {
            if let Node::Index(IExpr::Const(c)) = n {
                most = most.max(c.unsigned_abs());
            }
        });
        most
    }

    /// Calls `f` on every index and value expression of the grid and the body, each
    /// subexpression included.
    pub fn visit(&self, f: &mut dyn FnMut(Node)) {
        fn iexpr(e: &IExpr, f: &mut dyn FnMut(Node)) {
            f(Node::Index(e));
            match e {
                IExpr::Const(_) | IExpr::Size(_) | IExpr::Grid(_) | IExpr::Loop(_) => {}
                IExpr::Add(a, b)
                | IExpr::Sub(a, b)
                | IExpr::Mul(a, b)
                | IExpr::Div(a, b)
                | IExpr::Rem(a, b)
                | IExpr::Min(a, b) => {
                    iexpr(a, f);
                    iexpr(b, f);
                }
                IExpr::LoadIndex { index, .. } => iexpr(index, f),
            }
        }
        fn expr(e: &Expr, f: &mut dyn FnMut(Node)) {
            f(Node::Value(e));
            match e {
                Expr::Const(_) | Expr::Var(_) => {}
                Expr::Load { index, .. } | Expr::ArrLoad { index, .. } | Expr::FromIndex(index) => {
                    iexpr(index, f)
                }
                Expr::TileLoad { row, col, .. } => {
                    iexpr(row, f);
                    iexpr(col, f);
                }
                Expr::Unary(_, a) => expr(a, f),
                Expr::Binary(_, a, b) => {
                    expr(a, f);
                    expr(b, f);
                }
            }
        }
        fn stmts(body: &[Stmt], f: &mut dyn FnMut(Node)) {
            for s in body {
                match s {
                    Stmt::Var { init: value, .. } | Stmt::Set { value, .. } => expr(value, f),
                    Stmt::Array { .. } | Stmt::Tile { .. } | Stmt::Mma { .. } => {}
                    Stmt::ArrSet { index, value, .. } | Stmt::Store { index, value, .. } => {
                        iexpr(index, f);
                        expr(value, f);
                    }
                    Stmt::For { extent, body, .. } => {
                        iexpr(extent, f);
                        stmts(body, f);
                    }
                    Stmt::Each { extents, body, .. } => {
                        for e in extents {
                            iexpr(e, f);
                        }
                        stmts(body, f);
                    }
                    Stmt::TileSet {
                        row, col, value, ..
                    } => {
                        iexpr(row, f);
                        iexpr(col, f);
                        expr(value, f);
                    }
                }
            }
        }
        for g in &self.grid {
            iexpr(g, f);
        }
        stmts(&self.body, f);
    }

    /// `dst[i] = src[i]` for `i < n` (the one size), converting between storage dtypes: what
    /// a runtime uses to make bf16 copies of f32 values (matrix-product inputs).
    pub fn convert(name: &str, from: DType, to: DType) -> Kernel {
        let i = IExpr::Grid(0);
        Kernel {
            name: name.to_string(),
            bufs: vec![
                KBuf {
                    name: "src".into(),
                    dtype: from,
                    writable: false,
                },
                KBuf {
                    name: "dst".into(),
                    dtype: to,
                    writable: true,
                },
            ],
            sizes: vec!["n".into()],
            grid: vec![IExpr::Size(0)],
            body: vec![Stmt::Store {
                buf: 1,
                index: i.clone(),
                value: Expr::Load { buf: 0, index: i },
            }],
        }
    }
}

/// Values per row of the AdamW kernel's hyperparameter table ([`Kernel::adamw`]):
/// `[gradient scale, b1, 1 - b1, b2, 1 - b2, 1 / (1 - b1^t), 1 / (1 - b2^t), eps, weight
/// decay, lr]`.
pub const ADAMW_HYPER: usize = 10;

impl Kernel {
    /// One AdamW step of a parameter, in place, for `i < n` (size 0); size 1 is the row of
    /// the hyperparameter table `h` ([`ADAMW_HYPER`] values per row) this parameter uses:
    ///
    /// ```text
    /// g = grad[i] * scale (mean and clipping)    m = b1 m + (1 - b1) g    v = b2 v + (1 - b2) g^2
    /// p -= lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)
    /// ```
    ///
    /// The optimizer on the GPU: parameters and moments stay resident between steps.
    pub fn adamw(name: &str) -> Kernel {
        let i = IExpr::Grid(0);
        let row = IExpr::Size(1).mul(IExpr::c(ADAMW_HYPER as i64));
        let h = |k: i64| Expr::Load {
            buf: 4,
            index: row.clone().add(IExpr::c(k)),
        };
        let at = |buf: usize| Expr::Load {
            buf,
            index: i.clone(),
        };
        let (p, g, m, v) = (VarId(0), VarId(1), VarId(2), VarId(3));
        let mul = |a: Expr, b: Expr| Expr::bin(BinaryOp::Mul, a, b);
        let add = |a: Expr, b: Expr| Expr::bin(BinaryOp::Add, a, b);
        let var = Expr::Var;
        let buf = |name: &str, writable: bool| KBuf {
            name: name.into(),
            dtype: DType::F32,
            writable,
        };
        let step = add(
            Expr::bin(
                BinaryOp::Div,
                mul(var(m), h(5)),
                add(Expr::un(UnaryOp::Sqrt, mul(var(v), h(6))), h(7)),
            ),
            mul(h(8), var(p)),
        );
        Kernel {
            name: name.to_string(),
            bufs: vec![
                buf("param", true),
                buf("grad", false),
                buf("m", true),
                buf("v", true),
                buf("hyper", false),
            ],
            sizes: vec!["n".into(), "row".into()],
            grid: vec![IExpr::Size(0)],
            body: vec![
                Stmt::Var {
                    var: p,
                    init: at(0),
                },
                Stmt::Var {
                    var: g,
                    init: mul(at(1), h(0)),
                },
                Stmt::Var {
                    var: m,
                    init: add(mul(h(1), at(2)), mul(h(2), var(g))),
                },
                Stmt::Var {
                    var: v,
                    init: add(mul(h(3), at(3)), mul(h(4), mul(var(g), var(g)))),
                },
                Stmt::Store {
                    buf: 2,
                    index: i.clone(),
                    value: var(m),
                },
                Stmt::Store {
                    buf: 3,
                    index: i.clone(),
                    value: var(v),
                },
                Stmt::Store {
                    buf: 0,
                    index: i.clone(),
                    value: Expr::bin(BinaryOp::Sub, var(p), mul(h(9), step)),
                },
            ],
        }
    }
}

/// A reference evaluator of the kernel IR, in f64 or rounding every value to f32 as the
/// compiled backends do: the oracle for backend tests. `bufs` are the kernel's buffers as f64
/// values (stores round to the buffer's dtype).
pub mod eval {
    use super::*;
    use std::collections::HashMap;

    /// Why evaluation failed (an out-of-bounds index, a division by zero).
    #[derive(Clone, Debug, PartialEq, thiserror::Error)]
    #[error("kernel `{kernel}`: {message}")]
    pub struct EvalError {
        pub kernel: String,
        pub message: String,
    }

    struct Frame {
        grid: Vec<i64>,
        vars: HashMap<VarId, f64>,
        loops: HashMap<LoopId, i64>,
        arrs: HashMap<ArrId, Vec<f64>>,
        /// Per tile: dtype, rows, cols and the elements, row-major.
        tiles: HashMap<TileId, (DType, usize, usize, Vec<f64>)>,
    }

    impl Frame {
        fn new(grid: Vec<i64>) -> Frame {
            Frame {
                grid,
                vars: HashMap::new(),
                loops: HashMap::new(),
                arrs: HashMap::new(),
                tiles: HashMap::new(),
            }
        }
    }

    /// Runs `k` over its whole grid. `f32` rounds every intermediate to f32.
    pub fn run(
        k: &Kernel,
        sizes: &[i64],
        bufs: &mut [Vec<f64>],
        f32: bool,
    ) -> Result<(), EvalError> {
        let err = |m: String| EvalError {
            kernel: k.name.clone(),
            message: m,
        };
        if sizes.len() != k.sizes.len() || bufs.len() != k.bufs.len() {
            return Err(err("wrong number of sizes or buffers".into()));
        }
        let empty = Frame::new(vec![]);
        let ev = Ev { k, sizes, f32 };
        let extents: Vec<i64> = k
            .grid
            .iter()
            .map(|g| ev.index(g, &empty, bufs))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let total: i64 = extents.iter().product();
        for flat in 0..total.max(0) {
            let mut grid = vec![0; extents.len()];
            let mut rest = flat;
            for (i, e) in extents.iter().enumerate().rev() {
                grid[i] = rest % e;
                rest /= e;
            }
            let mut frame = Frame::new(grid);
            ev.block(&k.body, &mut frame, bufs).map_err(err)?;
        }
        Ok(())
    }

    struct Ev<'a> {
        k: &'a Kernel,
        sizes: &'a [i64],
        f32: bool,
    }

    /// The value of a launch extent (an index expression over the sizes alone): `Ok(None)`
    /// when it reads a device buffer (an index load), an error when it refers to a grid
    /// coordinate or loop counter or divides by a non-positive number.
    pub fn extent(e: &IExpr, sizes: &[i64]) -> Result<Option<i64>, String> {
        let two = |a: &IExpr, b: &IExpr| -> Result<Option<(i64, i64)>, String> {
            Ok(match (extent(a, sizes)?, extent(b, sizes)?) {
                (Some(x), Some(y)) => Some((x, y)),
                _ => None,
            })
        };
        Ok(match e {
            IExpr::Const(n) => Some(*n),
            IExpr::Size(i) => Some(*sizes.get(*i).ok_or("unknown size")?),
            IExpr::Grid(_) | IExpr::Loop(_) => {
                return Err("an extent depends on a coordinate".into());
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

    impl Ev<'_> {
        fn round(&self, x: f64) -> f64 {
            if self.f32 { x as f32 as f64 } else { x }
        }

        fn index(&self, e: &IExpr, fr: &Frame, bufs: &[Vec<f64>]) -> Result<i64, String> {
            Ok(match e {
                IExpr::Const(n) => *n,
                IExpr::Size(i) => *self.sizes.get(*i).ok_or("unknown size")?,
                IExpr::Grid(i) => *fr.grid.get(*i).ok_or("unknown grid coordinate")?,
                IExpr::Loop(l) => *fr.loops.get(l).ok_or("unknown loop")?,
                IExpr::Add(a, b) => self
                    .index(a, fr, bufs)?
                    .wrapping_add(self.index(b, fr, bufs)?),
                IExpr::Sub(a, b) => self
                    .index(a, fr, bufs)?
                    .wrapping_sub(self.index(b, fr, bufs)?),
                IExpr::Mul(a, b) => self
                    .index(a, fr, bufs)?
                    .wrapping_mul(self.index(b, fr, bufs)?),
                IExpr::Div(a, b) => {
                    let d = self.index(b, fr, bufs)?;
                    if d <= 0 {
                        return Err(format!("division by {d}"));
                    }
                    self.index(a, fr, bufs)?.div_euclid(d)
                }
                IExpr::Rem(a, b) => {
                    let d = self.index(b, fr, bufs)?;
                    if d <= 0 {
                        return Err(format!("remainder by {d}"));
                    }
                    self.index(a, fr, bufs)?.rem_euclid(d)
                }
                IExpr::Min(a, b) => self.index(a, fr, bufs)?.min(self.index(b, fr, bufs)?),
                IExpr::LoadIndex { buf, index } => {
                    let i = self.index(index, fr, bufs)?;
                    let b = bufs.get(*buf).ok_or("unknown buffer")?;
                    let x = *usize::try_from(i)
                        .ok()
                        .and_then(|i| b.get(i))
                        .ok_or_else(|| format!("index load b{buf}[{i}] out of bounds"))?;
                    x as i64
                }
            })
        }

        fn expr(&self, e: &Expr, fr: &Frame, bufs: &[Vec<f64>]) -> Result<f64, String> {
            Ok(match e {
                Expr::Const(x) => self.round(*x),
                Expr::Var(v) => *fr.vars.get(v).ok_or("unknown variable")?,
                Expr::Load { buf, index } => {
                    let i = self.index(index, fr, bufs)?;
                    let b = bufs.get(*buf).ok_or("unknown buffer")?;
                    let x = *usize::try_from(i)
                        .ok()
                        .and_then(|i| b.get(i))
                        .ok_or_else(|| {
                            format!("load b{buf}[{i}] out of bounds (len {})", b.len())
                        })?;
                    self.round(x)
                }
                Expr::ArrLoad { arr, index } => {
                    let i = self.index(index, fr, bufs)?;
                    let a = fr.arrs.get(arr).ok_or("unknown local array")?;
                    *usize::try_from(i)
                        .ok()
                        .and_then(|i| a.get(i))
                        .ok_or_else(|| format!("local a{}[{i}] out of bounds", arr.0))?
                }
                Expr::Unary(op, a) => {
                    let x = self.expr(a, fr, bufs)?;
                    self.round(unary(*op, x))
                }
                Expr::Binary(op, a, b) => {
                    let (x, y) = (self.expr(a, fr, bufs)?, self.expr(b, fr, bufs)?);
                    self.round(binary(*op, x, y))
                }
                Expr::FromIndex(i) => self.round(self.index(i, fr, bufs)? as f64),
                Expr::TileLoad { tile, row, col } => {
                    let (r, c) = (self.index(row, fr, bufs)?, self.index(col, fr, bufs)?);
                    let (_, rows, cols, v) = fr.tiles.get(tile).ok_or("unknown tile")?;
                    v[tile_slot(r, c, *rows, *cols)
                        .ok_or_else(|| format!("tile t{}[{r}, {c}] out of bounds", tile.0))?]
                }
            })
        }

        fn block(
            &self,
            body: &[Stmt],
            fr: &mut Frame,
            bufs: &mut [Vec<f64>],
        ) -> Result<(), String> {
            for s in body {
                match s {
                    Stmt::Var { var, init } | Stmt::Set { var, value: init } => {
                        let x = self.expr(init, fr, bufs)?;
                        fr.vars.insert(*var, x);
                    }
                    Stmt::Array { arr, len, init } => {
                        fr.arrs.insert(*arr, vec![self.round(*init); *len]);
                    }
                    Stmt::ArrSet { arr, index, value } => {
                        let i = self.index(index, fr, bufs)?;
                        let x = self.expr(value, fr, bufs)?;
                        let a = fr.arrs.get_mut(arr).ok_or("unknown local array")?;
                        let slot = usize::try_from(i)
                            .ok()
                            .and_then(|i| a.get_mut(i))
                            .ok_or_else(|| format!("local a{}[{i}] out of bounds", arr.0))?;
                        *slot = x;
                    }
                    Stmt::For {
                        counter,
                        extent,
                        body,
                    } => {
                        let n = self.index(extent, fr, bufs)?;
                        for i in 0..n.max(0) {
                            fr.loops.insert(*counter, i);
                            self.block(body, fr, bufs)?;
                        }
                        fr.loops.remove(counter);
                    }
                    Stmt::Store { buf, index, value } => {
                        let i = self.index(index, fr, bufs)?;
                        let x = self.expr(value, fr, bufs)?;
                        let dtype = self.k.bufs.get(*buf).ok_or("unknown buffer")?.dtype;
                        let b = bufs.get_mut(*buf).ok_or("unknown buffer")?;
                        let len = b.len();
                        let slot = usize::try_from(i)
                            .ok()
                            .and_then(|i| b.get_mut(i))
                            .ok_or_else(|| {
                                format!("store b{buf}[{i}] out of bounds (len {len})")
                            })?;
                        *slot = round_store(dtype, x);
                    }
                    Stmt::Tile {
                        tile,
                        dtype,
                        rows,
                        cols,
                    } => {
                        let v = vec![0.0; rows * cols];
                        fr.tiles.insert(*tile, (*dtype, *rows, *cols, v));
                    }
                    Stmt::Each {
                        counters,
                        extents,
                        body,
                    } => {
                        let nest = crate::tile::each_as_loops(counters, extents, body);
                        self.block(&nest, fr, bufs)?
                    }
                    Stmt::TileSet {
                        tile,
                        row,
                        col,
                        value,
                    } => {
                        let (r, c) = (self.index(row, fr, bufs)?, self.index(col, fr, bufs)?);
                        let x = self.expr(value, fr, bufs)?;
                        let (dtype, rows, cols, v) =
                            fr.tiles.get_mut(tile).ok_or("unknown tile")?;
                        let i = tile_slot(r, c, *rows, *cols)
                            .ok_or_else(|| format!("tile t{}[{r}, {c}] out of bounds", tile.0))?;
                        v[i] = match dtype {
                            DType::BF16 => crate::tile::round_bf16(x as f32) as f64,
                            _ => round_store(*dtype, x),
                        };
                    }
                    Stmt::Mma {
                        acc,
                        a,
                        b,
                        accumulate,
                    } => {
                        // The loops the CPU backend runs (one definition of the product).
                        let loops = crate::tile::mma_as_loops(self.k, (*acc, *a, *b), *accumulate);
                        self.block(&loops, fr, bufs)?
                    }
                }
            }
            Ok(())
        }
    }

    /// The row-major slot of `[r, c]` in a `rows x cols` tile, if inside it.
    fn tile_slot(r: i64, c: i64, rows: usize, cols: usize) -> Option<usize> {
        let (r, c) = (usize::try_from(r).ok()?, usize::try_from(c).ok()?);
        (r < rows && c < cols).then_some(r * cols + c)
    }

    fn round_store(dtype: DType, x: f64) -> f64 {
        match dtype {
            DType::F64 => x,
            DType::F32 | DType::F16 | DType::BF16 | DType::I32 | DType::I64 => {
                // f16/bf16 rounding lives in the runtime (it has `half`); the evaluator models
                // f32 storage, which is what the CPU backend uses.
                x as f32 as f64
            }
        }
    }

    /// The f64 value of a unary op; the one definition the interpreter and evaluators share.
    pub fn unary(op: UnaryOp, x: f64) -> f64 {
        match op {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Softplus => {
                if x > 20.0 {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Sigmoid => sigmoid(x),
        }
    }

    fn sigmoid(x: f64) -> f64 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }

    /// The f64 value of a binary op.
    pub fn binary(op: BinaryOp, x: f64, y: f64) -> f64 {
        match op {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Max => x.max(y),
            BinaryOp::Min => x.min(y),
        }
    }
}

#[cfg(test)]
mod simplify_tests {
    use super::IExpr;

    /// A linear index of coordinates split from a linear index folds back into it, through
    /// any number of levels; other sums stay as they are.
    #[test]
    fn split_and_joined_indices_fold() {
        let (g, l) = (IExpr::Grid(0), IExpr::Size(1));
        let row = g.clone().div(IExpr::c(768));
        let (b, t, p) = (
            row.clone().div(l.clone()),
            row.clone().rem(l.clone()),
            g.clone().rem(IExpr::c(768)),
        );
        let joined = b.mul(l.clone()).add(t).mul(IExpr::c(768)).add(p);
        assert_eq!(joined, g);
        // Reversed order of the terms, and a remainder of another value: unchanged.
        let r = g.clone().rem(l.clone());
        let q = g.clone().div(l.clone()).mul(l.clone());
        assert_eq!(r.clone().add(q.clone()), g);
        let other = IExpr::Grid(1).rem(l.clone());
        assert!(matches!(q.add(other), IExpr::Add(..)));
        // Coordinates of a reshaped axis inside a linear index: ((x·24 + k / 64)·64 + k % 64)
        // with x = g / 1536, k = g % 1536 is g.
        let (x, k) = (g.clone().div(IExpr::c(1536)), g.clone().rem(IExpr::c(1536)));
        let inner = k.clone().div(IExpr::c(64));
        let joined = x
            .mul(IExpr::c(24))
            .add(inner)
            .mul(IExpr::c(64))
            .add(k.rem(IExpr::c(64)));
        assert_eq!(joined, g);
    }
}
