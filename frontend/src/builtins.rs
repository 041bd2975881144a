//! The functions a model file can call, and how each expands into primitive IR ops.
//!
//! Math functions work on numbers at elaboration time and on tensors as ops (`exp(x)`,
//! `sqrt(d_model)`); composites such as `linear` and `rmsnorm` expand to several primitives.
//! Binary arithmetic on tensors broadcasts numpy-style, with explicit `broadcast` nodes.

use crate::ast::Arg;
use crate::diag::{Code, Diagnostic, near_name};
use crate::elaborate::{Elab, Frame, R, Stop, T, Val};
use ir::{BinaryOp, DType, Dim, Op, ReduceOp, Shape, Span, UnaryOp};

/// Every builtin name, for lookup and suggestions.
pub const NAMES: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "recip",
    "silu",
    "softplus",
    "sigmoid",
    "ceil",
    "floor",
    "min",
    "max",
    "linear",
    "matmul",
    "split",
    "reshape",
    "permute",
    "broadcast",
    "concat",
    "sum",
    "mean",
    "amax",
    "cast",
    "embedding",
    "causal_conv1d",
    "selective_scan",
    "ssd_scan",
    "rmsnorm",
];

pub fn is_builtin(name: &str) -> bool {
    NAMES.contains(&name)
}

/// A parameter of a builtin: its name and, when optional, its default.
type Sig<'a> = &'a [(&'a str, Option<Val<'static>>)];

/// Matches call arguments to a signature: positional first, then by name.
fn bind<'a>(
    e: &mut Elab<'a>,
    frame: &mut Frame<'a>,
    fname: &str,
    args: &'a [Arg],
    sig: Sig<'_>,
    span: Span,
) -> R<Vec<(Val<'a>, Span)>> {
    let mut slots: Vec<Option<(Val<'a>, Span)>> = vec![None; sig.len()];
    let mut positional = 0;
    for a in args {
        let idx = match &a.name {
            None => {
                if positional >= sig.len() {
                    let d = Diagnostic::error(
                        Code::Arity,
                        format!(
                            "`{fname}` takes at most {} argument(s), got {}",
                            sig.len(),
                            args.len()
                        ),
                    )
                    .label(a.value.span, "extra argument")
                    .note(format!("`{fname}({})`", signature(sig)));
                    return Err(e.error(d));
                }
                positional += 1;
                positional - 1
            }
            Some(n) => match sig.iter().position(|(p, _)| *p == n.name) {
                Some(i) => i,
                None => {
                    let mut d = Diagnostic::error(
                        Code::UnknownAttribute,
                        format!("`{fname}` has no argument `{}`", n.name),
                    )
                    .label(n.span, "unknown argument")
                    .note(format!("`{fname}({})`", signature(sig)));
                    if let Some(near) = near_name(&n.name, sig.iter().map(|(p, _)| *p)) {
                        d = d.help(format!("did you mean `{near}`?"));
                    }
                    return Err(e.error(d));
                }
            },
        };
        if slots[idx].is_some() {
            let d = Diagnostic::error(
                Code::Duplicate,
                format!("argument `{}` is given twice", sig[idx].0),
            )
            .label(a.value.span, "given again");
            return Err(e.error(d));
        }
        let v = e.eval(frame, &a.value, None)?;
        slots[idx] = Some((v, a.value.span));
    }
    let mut out = Vec::with_capacity(sig.len());
    for (slot, (pname, default)) in slots.into_iter().zip(sig) {
        match (slot, default) {
            (Some(v), _) => out.push(v),
            (None, Some(d)) => out.push((d.clone(), span)),
            (None, None) => {
                let d = Diagnostic::error(
                    Code::Arity,
                    format!("`{fname}` needs the argument `{pname}`"),
                )
                .label(span, format!("`{pname}` is missing"))
                .note(format!("`{fname}({})`", signature(sig)));
                return Err(e.error(d));
            }
        }
    }
    Ok(out)
}

fn signature(sig: Sig<'_>) -> String {
    let parts: Vec<String> = sig
        .iter()
        .map(|(n, d)| match d {
            None => n.to_string(),
            Some(Val::Int(i)) => format!("{n}: {i}"),
            Some(Val::Float(x)) => format!("{n}: {x}"),
            Some(_) => format!("{n}: .."),
        })
        .collect();
    parts.join(", ")
}

fn tensor<'a>(e: &mut Elab<'a>, (v, span): &(Val<'a>, Span), what: &str) -> R<T> {
    match v {
        Val::Tensor(t) => Ok(t.clone()),
        Val::Poison => Err(Stop { fatal: false }),
        other => {
            let d = Diagnostic::error(
                Code::Type,
                format!("{what} must be a tensor, found {}", other.kind()),
            )
            .label(*span, "not a tensor");
            Err(e.error(d))
        }
    }
}

fn list<'a>(e: &mut Elab<'a>, (v, span): &(Val<'a>, Span), what: &str) -> R<Vec<(Val<'a>, Span)>> {
    match v {
        Val::List(items) => Ok(items.clone()),
        Val::Poison => Err(Stop { fatal: false }),
        other => {
            let d = Diagnostic::error(
                Code::Type,
                format!(
                    "{what} must be a list like `[a, b]`, found {}",
                    other.kind()
                ),
            )
            .label(*span, "not a list");
            Err(e.error(d))
        }
    }
}

fn shape_arg<'a>(e: &mut Elab<'a>, arg: &(Val<'a>, Span)) -> R<Shape> {
    let items = list(e, arg, "a shape")?;
    let mut shape = Vec::with_capacity(items.len());
    for (v, s) in &items {
        shape.push(e.as_dim(v, *s)?);
    }
    Ok(shape)
}

/// A possibly negative axis made absolute for rank `rank`.
fn axis<'a>(e: &mut Elab<'a>, arg: &(Val<'a>, Span), rank: usize) -> R<usize> {
    let a = e.as_int(&arg.0, arg.1, "an axis")?;
    let r = rank as i64;
    if a < -r || a >= r {
        let d = Diagnostic::error(
            Code::BadArgument,
            format!("axis {a} is out of range for rank {rank}"),
        )
        .label(arg.1, format!("this is {a}"))
        .note(format!("valid axes are {} ..= {}", -r, r - 1));
        return Err(e.error(d));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

fn unary_number(f: &str, x: f64) -> f64 {
    match f {
        "exp" => x.exp(),
        "log" => x.ln(),
        "sqrt" => x.sqrt(),
        "rsqrt" => 1.0 / x.sqrt(),
        "recip" => 1.0 / x,
        "silu" => x / (1.0 + (-x).exp()),
        "softplus" => x.exp().ln_1p(),
        _ => 1.0 / (1.0 + (-x).exp()),
    }
}

fn unary_op(f: &str) -> UnaryOp {
    match f {
        "exp" => UnaryOp::Exp,
        "log" => UnaryOp::Log,
        "sqrt" => UnaryOp::Sqrt,
        "rsqrt" => UnaryOp::Rsqrt,
        "recip" => UnaryOp::Recip,
        "silu" => UnaryOp::Silu,
        "softplus" => UnaryOp::Softplus,
        _ => UnaryOp::Sigmoid,
    }
}

/// Calls the builtin `name`.
pub(crate) fn call<'a>(
    e: &mut Elab<'a>,
    frame: &mut Frame<'a>,
    name: &str,
    args: &'a [Arg],
    span: Span,
) -> R<Val<'a>> {
    match name {
        "exp" | "log" | "sqrt" | "rsqrt" | "recip" | "silu" | "softplus" | "sigmoid" => {
            let a = bind(e, frame, name, args, &[("x", None)], span)?;
            match &a[0].0 {
                Val::Int(_) | Val::Float(_) => {
                    let x = e.as_f64(&a[0].0, a[0].1, "the argument")?;
                    let y = unary_number(name, x);
                    if !y.is_finite() {
                        let d = Diagnostic::error(
                            Code::InvalidConfig,
                            format!("`{name}({x})` is not a finite number"),
                        )
                        .label(span, format!("this is {y}"));
                        return Err(e.error(d));
                    }
                    Ok(Val::Float(y))
                }
                _ => {
                    let x = tensor(e, &a[0], "the argument")?;
                    let op = Op::Unary(unary_op(name));
                    Ok(Val::Tensor(e.add1(frame, op, &[(&x, a[0].1)], span)?))
                }
            }
        }
        "ceil" | "floor" => {
            let a = bind(e, frame, name, args, &[("x", None)], span)?;
            let x = e.as_f64(&a[0].0, a[0].1, "the argument")?;
            let y = if name == "ceil" { x.ceil() } else { x.floor() };
            if !y.is_finite() || y.abs() > 9.0e15 {
                let d = Diagnostic::error(
                    Code::InvalidConfig,
                    format!("`{name}({x})` is not a valid integer"),
                )
                .label(span, "");
                return Err(e.error(d));
            }
            Ok(Val::Int(y as i64))
        }
        "min" | "max" => {
            let a = bind(e, frame, name, args, &[("a", None), ("b", None)], span)?;
            match (&a[0].0, &a[1].0) {
                (Val::Int(x), Val::Int(y)) => {
                    Ok(Val::Int(if name == "min" { *x.min(y) } else { *x.max(y) }))
                }
                (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
                    let x = e.as_f64(&a[0].0, a[0].1, "`a`")?;
                    let y = e.as_f64(&a[1].0, a[1].1, "`b`")?;
                    Ok(Val::Float(if name == "min" { x.min(y) } else { x.max(y) }))
                }
                _ => {
                    let op = if name == "min" {
                        BinaryOp::Min
                    } else {
                        BinaryOp::Max
                    };
                    let (x, y) = (a[0].clone(), a[1].clone());
                    elementwise(e, frame, op, (&x.0, x.1), (&y.0, y.1), span).map(Val::Tensor)
                }
            }
        }
        "linear" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("x", None), ("weight", None), ("bias", Some(Val::Poison))],
                span,
            )?;
            let x = tensor(e, &a[0], "`x`")?;
            let w = tensor(e, &a[1], "`weight`")?;
            let y = e.add1(
                frame,
                Op::MatMul { rhs_t: true },
                &[(&x, a[0].1), (&w, a[1].1)],
                span,
            )?;
            // The default (no bias) is poison; a real poisoned bias was already reported.
            if matches!(a[2].0, Val::Poison) {
                return Ok(Val::Tensor(y));
            }
            let (b, bspan) = (a[2].0.clone(), a[2].1);
            elementwise(
                e,
                frame,
                BinaryOp::Add,
                (&Val::Tensor(y), span),
                (&b, bspan),
                span,
            )
            .map(Val::Tensor)
        }
        "matmul" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("a", None), ("b", None), ("rhs_t", Some(Val::Bool(false)))],
                span,
            )?;
            let x = tensor(e, &a[0], "`a`")?;
            let w = tensor(e, &a[1], "`b`")?;
            let Val::Bool(rhs_t) = a[2].0 else {
                let d = Diagnostic::error(Code::BadArgument, "`rhs_t` must be true or false")
                    .label(a[2].1, "");
                return Err(e.error(d));
            };
            Ok(Val::Tensor(e.add1(
                frame,
                Op::MatMul { rhs_t },
                &[(&x, a[0].1), (&w, a[1].1)],
                span,
            )?))
        }
        "split" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("x", None), ("sizes", None), ("axis", Some(Val::Int(-1)))],
                span,
            )?;
            let x = tensor(e, &a[0], "`x`")?;
            let ax = axis(e, &a[2], x.ty.rank())?;
            let sizes = list(e, &a[1], "`sizes`")?;
            let mut ns = Vec::new();
            for (v, s) in &sizes {
                let n = e.as_int(v, *s, "a split size")?;
                if n < 1 {
                    let d = Diagnostic::error(
                        Code::BadArgument,
                        format!("split size {n} must be at least 1"),
                    )
                    .label(*s, format!("this is {n}"));
                    return Err(e.error(d));
                }
                ns.push(n as u64);
            }
            let total: u64 = ns.iter().sum();
            let dim = &x.ty.shape[ax];
            if dim.as_known() != Some(total) {
                let namer = frame.namer();
                let d = Diagnostic::error(
                    Code::ShapeMismatch,
                    format!(
                        "split sizes add up to {total}, but axis {ax} has size {}",
                        namer.dim(dim)
                    ),
                )
                .label(
                    a[1].1,
                    format!("these add up to {}", namer.dim(&Dim::known(total))),
                )
                .label(a[0].1, format!("this is {}", namer.shape(&x.ty.shape)));
                let d = match namer.note(&[&x.ty.shape, &[Dim::known(total)]]) {
                    Some(n) => d.note(n),
                    None => d,
                };
                return Err(e.error(d));
            }
            let mut parts = Vec::new();
            let mut start = 0;
            for n in ns {
                let op = Op::Slice {
                    axis: ax,
                    start,
                    len: n,
                };
                parts.push(Val::Tensor(e.add1(frame, op, &[(&x, a[0].1)], span)?));
                start += n;
            }
            Ok(Val::Tuple(parts))
        }
        "reshape" | "broadcast" => {
            let a = bind(e, frame, name, args, &[("x", None), ("shape", None)], span)?;
            let x = tensor(e, &a[0], "`x`")?;
            let shape = shape_arg(e, &a[1])?;
            let op = if name == "reshape" {
                Op::Reshape { shape }
            } else {
                Op::Broadcast { shape }
            };
            Ok(Val::Tensor(e.add1(frame, op, &[(&x, a[0].1)], span)?))
        }
        "permute" => {
            let a = bind(e, frame, name, args, &[("x", None), ("perm", None)], span)?;
            let x = tensor(e, &a[0], "`x`")?;
            let items = list(e, &a[1], "`perm`")?;
            let mut perm = Vec::new();
            for it in &items {
                perm.push(axis(e, it, x.ty.rank())?);
            }
            Ok(Val::Tensor(e.add1(
                frame,
                Op::Permute { perm },
                &[(&x, a[0].1)],
                span,
            )?))
        }
        "concat" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("xs", None), ("axis", Some(Val::Int(-1)))],
                span,
            )?;
            let items = list(e, &a[0], "`xs`")?;
            let mut ts = Vec::new();
            for it in &items {
                ts.push((tensor(e, it, "each item")?, it.1));
            }
            let Some(first) = ts.first() else {
                let d = Diagnostic::error(Code::Arity, "`concat` needs at least one tensor")
                    .label(a[0].1, "empty list");
                return Err(e.error(d));
            };
            let ax = axis(e, &a[1], first.0.ty.rank())?;
            let operands: Vec<(&T, Span)> = ts.iter().map(|(t, s)| (t, *s)).collect();
            Ok(Val::Tensor(e.add1(
                frame,
                Op::Concat { axis: ax },
                &operands,
                span,
            )?))
        }
        "sum" | "mean" | "amax" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("x", None), ("axis", Some(Val::Int(-1)))],
                span,
            )?;
            let x = tensor(e, &a[0], "`x`")?;
            let axes = match &a[1].0 {
                Val::List(items) => {
                    let mut axes = Vec::new();
                    for it in items {
                        axes.push(axis(e, it, x.ty.rank())?);
                    }
                    axes
                }
                _ => vec![axis(e, &a[1], x.ty.rank())?],
            };
            let op = match name {
                "sum" => ReduceOp::Sum,
                "mean" => ReduceOp::Mean,
                _ => ReduceOp::Max,
            };
            Ok(Val::Tensor(e.add1(
                frame,
                Op::Reduce { op, axes },
                &[(&x, a[0].1)],
                span,
            )?))
        }
        "cast" => {
            let a = bind(e, frame, name, args, &[("x", None), ("dtype", None)], span)?;
            let x = tensor(e, &a[0], "`x`")?;
            let to = match &a[1].0 {
                Val::Str(s) => DType::from_name(s),
                _ => None,
            };
            let Some(to) = to else {
                let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                let d =
                    Diagnostic::error(Code::BadArgument, "`dtype` must be a dtype name in quotes")
                        .label(a[1].1, "not a dtype")
                        .note(format!("dtypes: {}", names.join(", ")));
                return Err(e.error(d));
            };
            Ok(Val::Tensor(e.add1(
                frame,
                Op::Cast { to },
                &[(&x, a[0].1)],
                span,
            )?))
        }
        "embedding" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[("table", None), ("ids", None)],
                span,
            )?;
            let table = tensor(e, &a[0], "`table`")?;
            let ids = tensor(e, &a[1], "`ids`")?;
            Ok(Val::Tensor(e.add1(
                frame,
                Op::Gather,
                &[(&table, a[0].1), (&ids, a[1].1)],
                span,
            )?))
        }
        "causal_conv1d" | "selective_scan" | "ssd_scan" => {
            let sig: Sig<'_> = match name {
                "causal_conv1d" => &[
                    ("x", None),
                    ("weight", None),
                    ("bias", None),
                    ("state", None),
                ],
                "selective_scan" => &[
                    ("x", None),
                    ("dt", None),
                    ("A", None),
                    ("B", None),
                    ("C", None),
                    ("state", None),
                ],
                _ => &[
                    ("x", None),
                    ("dt", None),
                    ("A", None),
                    ("B", None),
                    ("C", None),
                    ("state", None),
                    ("chunk", Some(Val::Int(256))),
                ],
            };
            let a = bind(e, frame, name, args, sig, span)?;
            let op = match name {
                "causal_conv1d" => Op::CausalConv1d,
                "selective_scan" => Op::SelectiveScan,
                _ => {
                    let chunk = e.as_int(&a[6].0, a[6].1, "`chunk`")?;
                    if chunk < 1 {
                        let d = Diagnostic::error(
                            Code::BadArgument,
                            format!("`chunk` must be at least 1, found {chunk}"),
                        )
                        .label(a[6].1, "");
                        return Err(e.error(d));
                    }
                    Op::SsdScan {
                        chunk: chunk as u64,
                    }
                }
            };
            let n = op.arity().unwrap_or(0);
            let mut ts = Vec::new();
            for (i, arg) in a.iter().take(n).enumerate() {
                ts.push((tensor(e, arg, &format!("`{}`", sig[i].0))?, arg.1));
            }
            let operands: Vec<(&T, Span)> = ts.iter().map(|(t, s)| (t, *s)).collect();
            let rs = e.add(frame, op, &operands, span)?;
            Ok(Val::Tuple(rs.into_iter().map(Val::Tensor).collect()))
        }
        "rmsnorm" => {
            let a = bind(
                e,
                frame,
                name,
                args,
                &[
                    ("x", None),
                    ("weight", None),
                    ("eps", Some(Val::Float(1e-5))),
                    ("groups", Some(Val::Int(1))),
                ],
                span,
            )?;
            let x = tensor(e, &a[0], "`x`")?;
            let w = tensor(e, &a[1], "`weight`")?;
            let groups = e.as_int(&a[3].0, a[3].1, "`groups`")?;
            let eps = e.as_f64(&a[2].0, a[2].1, "`eps`")?;
            rmsnorm(
                e,
                frame,
                (&x, a[0].1),
                (&w, a[1].1),
                eps,
                (groups, a[3].1),
                span,
            )
            .map(Val::Tensor)
        }
        other => {
            let d = Diagnostic::error(Code::UnknownOp, format!("unknown builtin `{other}`"))
                .label(span, "");
            Err(e.error(d))
        }
    }
}

/// `x * rsqrt(mean(x^2) + eps) * weight` over the last axis, in `groups` equal groups.
fn rmsnorm<'a>(
    e: &mut Elab<'a>,
    frame: &mut Frame<'a>,
    (x, xspan): (&T, Span),
    (w, wspan): (&T, Span),
    eps: f64,
    (groups, gspan): (i64, Span),
    span: Span,
) -> R<T> {
    let Some(last) = x.ty.shape.last().cloned() else {
        let d = Diagnostic::error(
            Code::ShapeMismatch,
            "`rmsnorm` needs a tensor of rank at least 1",
        )
        .label(xspan, "a scalar");
        return Err(e.error(d));
    };
    let width = last.as_known().unwrap_or(0);
    if groups < 1 || width % groups as u64 != 0 {
        let d = Diagnostic::error(
            Code::BadArgument,
            format!("`groups` ({groups}) must divide the normalized width ({last})"),
        )
        .label(gspan, format!("this is {groups}"));
        return Err(e.error(d));
    }
    let grouped = groups > 1;
    let mut xs = x.clone();
    if grouped {
        let mut shape = x.ty.shape.clone();
        shape.pop();
        shape.push(Dim::known(groups as u64));
        shape.push(Dim::known(width / groups as u64));
        xs = e.add1(frame, Op::Reshape { shape }, &[(x, xspan)], span)?;
    }
    let sq = e.add1(
        frame,
        Op::Binary(BinaryOp::Mul),
        &[(&xs, xspan), (&xs, xspan)],
        span,
    )?;
    let last_axis = xs.ty.rank() - 1;
    let ms = e.add1(
        frame,
        Op::Reduce {
            op: ReduceOp::Mean,
            axes: vec![last_axis],
        },
        &[(&sq, xspan)],
        span,
    )?;
    let ms = elementwise(
        e,
        frame,
        BinaryOp::Add,
        (&Val::Tensor(ms), span),
        (&Val::Float(eps), span),
        span,
    )?;
    let inv = e.add1(frame, Op::Unary(UnaryOp::Rsqrt), &[(&ms, span)], span)?;
    let mut y = elementwise(
        e,
        frame,
        BinaryOp::Mul,
        (&Val::Tensor(xs), xspan),
        (&Val::Tensor(inv), span),
        span,
    )?;
    if grouped {
        let shape = x.ty.shape.clone();
        y = e.add1(frame, Op::Reshape { shape }, &[(&y, span)], span)?;
    }
    elementwise(
        e,
        frame,
        BinaryOp::Mul,
        (&Val::Tensor(y), span),
        (&Val::Tensor(w.clone()), wspan),
        span,
    )
}

/// A binary op on tensors and numbers with numpy broadcasting made explicit.
pub(crate) fn elementwise<'a>(
    e: &mut Elab<'a>,
    frame: &mut Frame<'a>,
    op: BinaryOp,
    (a, aspan): (&Val<'a>, Span),
    (b, bspan): (&Val<'a>, Span),
    span: Span,
) -> R<T> {
    let dtype = match (a, b) {
        (Val::Tensor(x), Val::Tensor(y)) if x.ty.dtype != y.ty.dtype => {
            let d = Diagnostic::error(
                Code::DTypeMismatch,
                format!(
                    "dtype mismatch in `{}`: {} vs {}",
                    op.name(),
                    x.ty.dtype,
                    y.ty.dtype
                ),
            )
            .label(aspan, format!("this is {}", x.ty.dtype))
            .label(bspan, format!("this is {}", y.ty.dtype))
            .help(format!("cast one side, e.g. `cast(x, \"{}\")`", x.ty.dtype));
            return Err(e.error(d));
        }
        (Val::Tensor(x), _) | (_, Val::Tensor(x)) => x.ty.dtype,
        _ => DType::F32,
    };
    let to_tensor = |e: &mut Elab<'a>, v: &Val<'a>, s: Span| -> R<T> {
        match v {
            Val::Tensor(t) => Ok(t.clone()),
            Val::Int(_) | Val::Float(_) => {
                let value = e.as_f64(v, s, "a constant")?;
                e.add1(frame, Op::Const { value, dtype }, &[], s)
            }
            Val::Poison => Err(Stop { fatal: false }),
            other => {
                let d = Diagnostic::error(
                    Code::Type,
                    format!("cannot use {} in tensor arithmetic", other.kind()),
                )
                .label(s, other.kind());
                Err(e.error(d))
            }
        }
    };
    let x = to_tensor(e, a, aspan)?;
    let y = to_tensor(e, b, bspan)?;
    let Some(shape) = broadcast_shape(&x.ty.shape, &y.ty.shape) else {
        let namer = frame.namer();
        let (l, r) = (namer.shape(&x.ty.shape), namer.shape(&y.ty.shape));
        let mut d = Diagnostic::error(
            Code::ShapeMismatch,
            format!("shape mismatch in `{}`: {l} vs {r}", op.name()),
        )
        .label(aspan, format!("this is {l}"))
        .label(bspan, format!("this is {r}"))
        .note("elementwise operands broadcast from the right: each dim must be equal or 1");
        if let Some(n) = namer.note(&[&x.ty.shape, &y.ty.shape]) {
            d = d.note(n);
        }
        return Err(e.error(d));
    };
    let widen = |e: &mut Elab<'a>, t: T, s: Span| -> R<T> {
        if t.ty.shape == shape {
            return Ok(t);
        }
        e.add1(
            frame,
            Op::Broadcast {
                shape: shape.clone(),
            },
            &[(&t, s)],
            span,
        )
    };
    let x = widen(e, x, aspan)?;
    let y = widen(e, y, bspan)?;
    e.add1(frame, Op::Binary(op), &[(&x, aspan), (&y, bspan)], span)
}

/// The numpy broadcast of two shapes, if they are compatible.
fn broadcast_shape(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = (i + a.len()).checked_sub(n).map(|j| &a[j]);
        let db = (i + b.len()).checked_sub(n).map(|j| &b[j]);
        out.push(match (da, db) {
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            (Some(x), Some(y)) if y.is_one() => x.clone(),
            (Some(_), Some(_)) => return None,
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (None, None) => return None,
        });
    }
    Some(out)
}
