//! Shape and dtype inference: the result types of an op from its attributes and operand
//! types. The graph builder, the verifier and the text parser all call [`infer`], so the
//! typing rules exist once.

use crate::op::{BinaryOp, Op};
use crate::types::{DType, Dim, Shape, TensorType, numel, shape_to_string};
use thiserror::Error;

/// Why an op cannot be typed. `operand` fields index the op's operands so callers can point
/// at the argument that is wrong.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum TypeError {
    #[error("`{op}` takes {expected} operand(s), got {got}")]
    Arity {
        op: &'static str,
        expected: String,
        got: usize,
    },
    #[error("`{op}`: shapes do not match: {} vs {}", shape_to_string(.lhs), shape_to_string(.rhs))]
    ShapeMismatch {
        op: &'static str,
        lhs_operand: usize,
        lhs: Shape,
        rhs_operand: usize,
        rhs: Shape,
        /// Which axis of each operand disagrees, when it is one axis.
        detail: String,
    },
    #[error("`{op}`: dtypes do not match: {lhs} vs {rhs}")]
    DTypeMismatch {
        op: &'static str,
        lhs_operand: usize,
        lhs: DType,
        rhs_operand: usize,
        rhs: DType,
    },
    #[error("`{op}`: operand `{name}` must be {expected}, found {found}")]
    WrongDType {
        op: &'static str,
        operand: usize,
        name: &'static str,
        expected: &'static str,
        found: DType,
    },
    #[error("`{op}`: operand `{name}` must have rank {expected}, found {found} ({})", shape_to_string(.shape))]
    Rank {
        op: &'static str,
        operand: usize,
        name: &'static str,
        expected: String,
        found: usize,
        shape: Shape,
    },
    #[error("`{op}`: axis {axis} is out of range for rank {rank}")]
    Axis {
        op: &'static str,
        axis: usize,
        rank: usize,
    },
    #[error("`{op}`: {message}")]
    Attribute { op: &'static str, message: String },
}

fn arity_error(op: &Op, expected: String, got: usize) -> TypeError {
    TypeError::Arity {
        op: op.name(),
        expected,
        got,
    }
}

fn rank(op: &Op, ts: &[&TensorType], i: usize, expected: usize) -> Result<(), TypeError> {
    if ts[i].rank() == expected {
        return Ok(());
    }
    Err(TypeError::Rank {
        op: op.name(),
        operand: i,
        name: op.operand_names().get(i).copied().unwrap_or("x"),
        expected: expected.to_string(),
        found: ts[i].rank(),
        shape: ts[i].shape.clone(),
    })
}

fn float(op: &Op, ts: &[&TensorType], i: usize) -> Result<(), TypeError> {
    if ts[i].dtype.is_float() {
        return Ok(());
    }
    Err(TypeError::WrongDType {
        op: op.name(),
        operand: i,
        name: op.operand_names().get(i).copied().unwrap_or("x"),
        expected: "a float type",
        found: ts[i].dtype,
    })
}

fn same_dtype(op: &Op, ts: &[&TensorType], a: usize, b: usize) -> Result<(), TypeError> {
    if ts[a].dtype == ts[b].dtype {
        return Ok(());
    }
    Err(TypeError::DTypeMismatch {
        op: op.name(),
        lhs_operand: a,
        lhs: ts[a].dtype,
        rhs_operand: b,
        rhs: ts[b].dtype,
    })
}

/// Checks `ts[a].shape[ax] == ts[b].shape[bx]`, naming both dims in the error.
fn same_dim(
    op: &Op,
    ts: &[&TensorType],
    (a, ax): (usize, usize),
    (b, bx): (usize, usize),
) -> Result<(), TypeError> {
    if ts[a].shape[ax] == ts[b].shape[bx] {
        return Ok(());
    }
    let names = op.operand_names();
    let name = |i: usize| names.get(i).copied().unwrap_or("x");
    Err(TypeError::ShapeMismatch {
        op: op.name(),
        lhs_operand: a,
        lhs: ts[a].shape.clone(),
        rhs_operand: b,
        rhs: ts[b].shape.clone(),
        detail: format!(
            "axis {ax} of `{}` ({}) must equal axis {bx} of `{}` ({})",
            name(a),
            ts[a].shape[ax],
            name(b),
            ts[b].shape[bx]
        ),
    })
}

fn check_axis(op: &Op, axis: usize, rank: usize) -> Result<(), TypeError> {
    if axis < rank {
        Ok(())
    } else {
        Err(TypeError::Axis {
            op: op.name(),
            axis,
            rank,
        })
    }
}

fn attr(op: &Op, message: String) -> TypeError {
    TypeError::Attribute {
        op: op.name(),
        message,
    }
}

/// Checks that a shape given in an op's attributes has monomial dimensions only: ceiling
/// divisions (chunk counts) size the lowering's buffers, never graph values.
fn monomials(op: &Op, shape: &[Dim]) -> Result<(), TypeError> {
    match shape.iter().find(|d| d.div() != 1) {
        Some(d) => Err(attr(
            op,
            format!("the dimension {d} is not a monomial over the symbols"),
        )),
        None => Ok(()),
    }
}

/// The result types of `op` applied to operands of types `ts`.
pub fn infer(op: &Op, ts: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
    match op.arity() {
        Some(n) if n != ts.len() => return Err(arity_error(op, n.to_string(), ts.len())),
        None if ts.is_empty() => return Err(arity_error(op, "at least 1".into(), 0)),
        _ => {}
    }
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { ty, .. } => {
            monomials(op, &ty.shape)?;
            one(ty.clone())
        }
        Op::Param { ty, .. } => {
            monomials(op, &ty.shape)?;
            if !ty.dtype.is_float() {
                return Err(attr(
                    op,
                    format!("parameters must be float, found {}", ty.dtype),
                ));
            }
            one(ty.clone())
        }
        Op::Const { value, dtype } => {
            if !value.is_finite() && !dtype.is_float() {
                return Err(attr(op, format!("{value} is not a valid {dtype}")));
            }
            one(TensorType::new(*dtype, vec![]))
        }
        Op::Unary(_) => {
            float(op, ts, 0)?;
            one(ts[0].clone())
        }
        Op::Binary(b) => {
            same_dtype(op, ts, 0, 1)?;
            if ts[0].shape != ts[1].shape {
                return Err(TypeError::ShapeMismatch {
                    op: op.name(),
                    lhs_operand: 0,
                    lhs: ts[0].shape.clone(),
                    rhs_operand: 1,
                    rhs: ts[1].shape.clone(),
                    detail: "elementwise operands need equal shapes (broadcasts are explicit)"
                        .into(),
                });
            }
            if matches!(b, BinaryOp::Div) {
                float(op, ts, 0)?;
            }
            one(ts[0].clone())
        }
        Op::Cast { to } => one(TensorType::new(*to, ts[0].shape.clone())),
        Op::Reduce { axes, .. } => {
            float(op, ts, 0)?;
            let mut shape = ts[0].shape.clone();
            for (i, &a) in axes.iter().enumerate() {
                check_axis(op, a, shape.len())?;
                if axes[..i].contains(&a) {
                    return Err(attr(op, format!("axis {a} is listed twice")));
                }
                shape[a] = Dim::known(1);
            }
            one(TensorType::new(ts[0].dtype, shape))
        }
        Op::MatMul { rhs_t } => {
            float(op, ts, 0)?;
            same_dtype(op, ts, 0, 1)?;
            let (l, r) = (ts[0], ts[1]);
            if l.rank() < 2 {
                return Err(TypeError::Rank {
                    op: op.name(),
                    operand: 0,
                    name: "lhs",
                    expected: "at least 2".into(),
                    found: l.rank(),
                    shape: l.shape.clone(),
                });
            }
            if r.rank() != 2 && r.rank() != l.rank() {
                return Err(TypeError::Rank {
                    op: op.name(),
                    operand: 1,
                    name: "rhs",
                    expected: format!("2 or {}", l.rank()),
                    found: r.rank(),
                    shape: r.shape.clone(),
                });
            }
            let rr = r.rank();
            let (k_axis, n_axis) = if *rhs_t {
                (rr - 1, rr - 2)
            } else {
                (rr - 2, rr - 1)
            };
            same_dim(op, ts, (0, l.rank() - 1), (1, k_axis))?;
            if rr == l.rank() {
                for ax in 0..rr - 2 {
                    same_dim(op, ts, (0, ax), (1, ax))?;
                }
            }
            let mut shape = l.shape.clone();
            let last = shape.len() - 1;
            shape[last] = r.shape[n_axis].clone();
            one(TensorType::new(l.dtype, shape))
        }
        Op::Reshape { shape } => {
            monomials(op, shape)?;
            let (from, to) = (numel(&ts[0].shape), numel(shape));
            if from.is_none() || from != to {
                return Err(attr(
                    op,
                    format!(
                        "cannot reshape {} into {}: element counts differ",
                        shape_to_string(&ts[0].shape),
                        shape_to_string(shape)
                    ),
                ));
            }
            one(TensorType::new(ts[0].dtype, shape.clone()))
        }
        Op::Permute { perm } => {
            let r = ts[0].rank();
            let mut seen = vec![false; r];
            for &p in perm {
                check_axis(op, p, r)?;
                if std::mem::replace(&mut seen[p], true) {
                    return Err(attr(
                        op,
                        format!("axis {p} appears twice in the permutation"),
                    ));
                }
            }
            if perm.len() != r {
                return Err(attr(
                    op,
                    format!("permutation has {} axes, operand has rank {r}", perm.len()),
                ));
            }
            let shape = perm.iter().map(|&p| ts[0].shape[p].clone()).collect();
            one(TensorType::new(ts[0].dtype, shape))
        }
        Op::Broadcast { shape } => {
            monomials(op, shape)?;
            let src = &ts[0].shape;
            if src.len() > shape.len() {
                return Err(attr(
                    op,
                    format!(
                        "cannot broadcast {} to the lower rank {}",
                        shape_to_string(src),
                        shape_to_string(shape)
                    ),
                ));
            }
            let off = shape.len() - src.len();
            for (i, d) in src.iter().enumerate() {
                if !d.is_one() && *d != shape[off + i] {
                    return Err(attr(
                        op,
                        format!(
                            "cannot broadcast {} to {}: axis {i} is {d}, not 1 or {}",
                            shape_to_string(src),
                            shape_to_string(shape),
                            shape[off + i]
                        ),
                    ));
                }
            }
            one(TensorType::new(ts[0].dtype, shape.clone()))
        }
        Op::Slice { axis, start, len } => {
            check_axis(op, *axis, ts[0].rank())?;
            let dim = &ts[0].shape[*axis];
            let Some(size) = dim.as_known() else {
                return Err(attr(
                    op,
                    format!("cannot slice the symbolic axis {axis} ({dim})"),
                ));
            };
            match start.checked_add(*len) {
                Some(end) if end <= size && *len > 0 => {}
                _ => {
                    return Err(attr(
                        op,
                        format!(
                            "range {start}..{} is outside axis {axis} of size {size}",
                            start.saturating_add(*len)
                        ),
                    ));
                }
            }
            let mut shape = ts[0].shape.clone();
            shape[*axis] = Dim::known(*len);
            one(TensorType::new(ts[0].dtype, shape))
        }
        Op::Concat { axis } => {
            check_axis(op, *axis, ts[0].rank())?;
            let mut total = 0u64;
            for i in 0..ts.len() {
                same_dtype(op, ts, 0, i)?;
                if ts[i].rank() != ts[0].rank() {
                    return rank(op, ts, i, ts[0].rank()).map(|_| vec![]);
                }
                for ax in 0..ts[0].rank() {
                    if ax != *axis {
                        same_dim(op, ts, (0, ax), (i, ax))?;
                    }
                }
                let Some(n) = ts[i].shape[*axis].as_known() else {
                    return Err(attr(
                        op,
                        format!("cannot concatenate along the symbolic axis {axis}"),
                    ));
                };
                total = total
                    .checked_add(n)
                    .ok_or_else(|| attr(op, "size overflow".into()))?;
            }
            let mut shape = ts[0].shape.clone();
            shape[*axis] = Dim::known(total);
            one(TensorType::new(ts[0].dtype, shape))
        }
        Op::Gather => {
            rank(op, ts, 0, 2)?;
            float(op, ts, 0)?;
            if ts[1].dtype.is_float() {
                return Err(TypeError::WrongDType {
                    op: op.name(),
                    operand: 1,
                    name: "ids",
                    expected: "an integer type",
                    found: ts[1].dtype,
                });
            }
            let mut shape = ts[1].shape.clone();
            shape.push(ts[0].shape[1].clone());
            one(TensorType::new(ts[0].dtype, shape))
        }
        Op::CausalConv1d => conv_types(op, ts),
        Op::SelectiveScan => selective_scan_types(op, ts),
        Op::SsdScan { chunk } => ssd_scan_types(op, *chunk, ts),
        Op::CausalConv1dGrad => {
            let fwd = conv_types(op, &ts[..4])?;
            cotangents(op, ts, 4, &fwd, &[("y", 0, 0), ("s1", 3, 3)])?;
            Ok(ts[..4].iter().map(|&t| t.clone()).collect())
        }
        Op::SelectiveScanGrad => {
            let fwd = selective_scan_types(op, &ts[..6])?;
            cotangents(op, ts, 6, &fwd, &[("y", 0, 0), ("h1", 5, 5)])?;
            Ok(ts[..6].iter().map(|&t| t.clone()).collect())
        }
        Op::SsdScanGrad { chunk } => {
            let fwd = ssd_scan_types(op, *chunk, &ts[..6])?;
            cotangents(op, ts, 6, &fwd, &[("y", 0, 0), ("s1", 5, 5)])?;
            Ok(ts[..6].iter().map(|&t| t.clone()).collect())
        }
        Op::CrossEntropy { .. } => {
            let loss = cross_entropy_types(op, ts)?;
            Ok(vec![loss.clone(), loss])
        }
        Op::CrossEntropyGrad { .. } => {
            let loss = cross_entropy_types(op, &ts[..2])?;
            cotangents(op, ts, 2, &[loss], &[("loss", 1, 0)])?;
            one(ts[0].clone())
        }
    }
}

/// `causal_conv1d`'s rule on `ts[..4]`; `op` names the operands in errors.
fn conv_types(op: &Op, ts: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
    // x [B,L,C], w [C,K], b [C], s [B,C,K-1]
    for (i, r) in [(0, 3), (1, 2), (2, 1), (3, 3)] {
        rank(op, ts, i, r)?;
        float(op, ts, i)?;
        same_dtype(op, ts, 0, i)?;
    }
    same_dim(op, ts, (0, 2), (1, 0))?;
    same_dim(op, ts, (0, 2), (2, 0))?;
    same_dim(op, ts, (0, 0), (3, 0))?;
    same_dim(op, ts, (0, 2), (3, 1))?;
    let Some(k) = ts[1].shape[1].as_known().filter(|&k| k >= 1) else {
        return Err(attr(
            op,
            format!(
                "kernel width must be a number >= 1, found {}",
                ts[1].shape[1]
            ),
        ));
    };
    if ts[3].shape[2] != Dim::known(k - 1) {
        return Err(TypeError::ShapeMismatch {
            op: op.name(),
            lhs_operand: 3,
            lhs: ts[3].shape.clone(),
            rhs_operand: 1,
            rhs: ts[1].shape.clone(),
            detail: format!("the state keeps the last K-1 = {} inputs", k - 1),
        });
    }
    Ok(vec![ts[0].clone(), ts[3].clone()])
}

/// `selective_scan`'s rule on `ts[..6]`.
fn selective_scan_types(op: &Op, ts: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
    // x [B,L,E], dt [B,L,E], A [E,N], Bm [B,L,N], Cm [B,L,N], h [B,E,N]
    for (i, r) in [(0, 3), (1, 3), (2, 2), (3, 3), (4, 3), (5, 3)] {
        rank(op, ts, i, r)?;
        float(op, ts, i)?;
        same_dtype(op, ts, 0, i)?;
    }
    for ax in 0..3 {
        same_dim(op, ts, (0, ax), (1, ax))?;
    }
    same_dim(op, ts, (0, 2), (2, 0))?;
    for i in [3, 4] {
        same_dim(op, ts, (0, 0), (i, 0))?;
        same_dim(op, ts, (0, 1), (i, 1))?;
        same_dim(op, ts, (2, 1), (i, 2))?;
    }
    same_dim(op, ts, (0, 0), (5, 0))?;
    same_dim(op, ts, (0, 2), (5, 1))?;
    same_dim(op, ts, (2, 1), (5, 2))?;
    Ok(vec![ts[0].clone(), ts[5].clone()])
}

/// `ssd_scan`'s rule on `ts[..6]`.
fn ssd_scan_types(op: &Op, chunk: u64, ts: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
    // x [B,L,H,P], dt [B,L,H], A [H], Bm [B,L,G,N], Cm [B,L,G,N], s [B,H,P,N]
    if chunk == 0 {
        return Err(attr(op, "chunk size must be at least 1".into()));
    }
    for (i, r) in [(0, 4), (1, 3), (2, 1), (3, 4), (4, 4), (5, 4)] {
        rank(op, ts, i, r)?;
        float(op, ts, i)?;
        same_dtype(op, ts, 0, i)?;
    }
    for ax in 0..3 {
        same_dim(op, ts, (0, ax), (1, ax))?;
    }
    same_dim(op, ts, (0, 2), (2, 0))?;
    for i in [3, 4] {
        same_dim(op, ts, (0, 0), (i, 0))?;
        same_dim(op, ts, (0, 1), (i, 1))?;
    }
    same_dim(op, ts, (3, 2), (4, 2))?;
    same_dim(op, ts, (3, 3), (4, 3))?;
    let (h, g) = (ts[0].shape[2].as_known(), ts[3].shape[2].as_known());
    match (h, g) {
        (Some(h), Some(g)) if g > 0 && h % g == 0 => {}
        _ => {
            return Err(attr(
                op,
                format!(
                    "heads ({}) must be a multiple of groups ({})",
                    ts[0].shape[2], ts[3].shape[2]
                ),
            ));
        }
    }
    same_dim(op, ts, (0, 0), (5, 0))?;
    same_dim(op, ts, (0, 2), (5, 1))?;
    same_dim(op, ts, (0, 3), (5, 2))?;
    same_dim(op, ts, (3, 3), (5, 3))?;
    Ok(vec![ts[0].clone(), ts[5].clone()])
}

/// The cotangents `ts[first..]` must have the types of the forward results `fwd`, in order.
/// `results` gives each forward result's name and the forward operands whose shape and
/// dtype it has, so an error can point at both sides.
fn cotangents(
    op: &Op,
    ts: &[&TensorType],
    first: usize,
    fwd: &[TensorType],
    results: &[(&str, usize, usize)],
) -> Result<(), TypeError> {
    let names = op.operand_names();
    for (r, (want, &(result, shape_like, dtype_like))) in fwd.iter().zip(results).enumerate() {
        let i = first + r;
        let got = ts[i];
        let name = names.get(i).copied().unwrap_or("x");
        if got.dtype != want.dtype {
            return Err(TypeError::DTypeMismatch {
                op: op.name(),
                lhs_operand: i,
                lhs: got.dtype,
                rhs_operand: dtype_like,
                rhs: want.dtype,
            });
        }
        if got.shape != want.shape {
            return Err(TypeError::ShapeMismatch {
                op: op.name(),
                lhs_operand: i,
                lhs: got.shape.clone(),
                rhs_operand: shape_like,
                rhs: want.shape.clone(),
                detail: format!(
                    "the cotangent `{name}` must have the shape of the forward result `{result}`"
                ),
            });
        }
    }
    Ok(())
}

/// The type of `cross_entropy`'s loss (and of `valid`) from `logits` and `targets` (`ts[..2]`).
fn cross_entropy_types(op: &Op, ts: &[&TensorType]) -> Result<TensorType, TypeError> {
    let (logits, targets) = (ts[0], ts[1]);
    if logits.rank() == 0 {
        return Err(TypeError::Rank {
            op: op.name(),
            operand: 0,
            name: "logits",
            expected: "at least 1".into(),
            found: 0,
            shape: logits.shape.clone(),
        });
    }
    float(op, ts, 0)?;
    if targets.dtype.is_float() {
        return Err(TypeError::WrongDType {
            op: op.name(),
            operand: 1,
            name: "targets",
            expected: "an integer type",
            found: targets.dtype,
        });
    }
    let r = logits.rank() - 1;
    rank(op, ts, 1, r)?;
    for ax in 0..r {
        same_dim(op, ts, (0, ax), (1, ax))?;
    }
    Ok(TensorType::new(logits.dtype, targets.shape.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::UnaryOp;

    fn t(shape: &[Dim]) -> TensorType {
        TensorType::new(DType::F32, shape.to_vec())
    }

    #[test]
    fn graph_shapes_are_monomials() {
        let chunks = Dim::sym("L").ceil_div(64).unwrap();
        let input = Op::Input {
            name: "x".into(),
            kind: crate::op::InputKind::Data,
            ty: t(&[Dim::sym("B"), chunks.clone()]),
        };
        let e = infer(&input, &[]).unwrap_err();
        assert!(e.to_string().contains("ceil(L/64)"), "{e}");
        let x = t(&[Dim::sym("L")]);
        let bc = Op::Broadcast {
            shape: vec![chunks, Dim::sym("L")],
        };
        assert!(infer(&bc, &[&x]).is_err());
    }

    #[test]
    fn matmul_transposed_weight() {
        let (b, l) = (Dim::sym("B"), Dim::sym("L"));
        let x = t(&[b.clone(), l.clone(), Dim::known(8)]);
        let w = t(&[Dim::known(16), Dim::known(8)]);
        let r = infer(&Op::MatMul { rhs_t: true }, &[&x, &w]).unwrap();
        assert_eq!(r[0], t(&[b, l, Dim::known(16)]));
        assert!(infer(&Op::MatMul { rhs_t: false }, &[&x, &w]).is_err());
    }

    #[test]
    fn backward_ops_type_like_their_forward_operands() {
        let (b, l) = (Dim::sym("B"), Dim::sym("L"));
        let x = t(&[b.clone(), l.clone(), Dim::known(6)]);
        let w = t(&[Dim::known(6), Dim::known(4)]);
        let bias = t(&[Dim::known(6)]);
        let s0 = t(&[b.clone(), Dim::known(6), Dim::known(3)]);
        let r = infer(&Op::CausalConv1dGrad, &[&x, &w, &bias, &s0, &x, &s0]).unwrap();
        assert_eq!(r, vec![x.clone(), w.clone(), bias.clone(), s0.clone()]);
        // A cotangent with the wrong shape names the cotangent and the forward result.
        let err = infer(&Op::CausalConv1dGrad, &[&x, &w, &bias, &s0, &x, &x]).unwrap_err();
        assert!(
            matches!(
                &err,
                TypeError::ShapeMismatch {
                    lhs_operand: 5,
                    rhs_operand: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("causal_conv1d_grad"), "{err}");
        let x64 = TensorType::new(DType::F64, x.shape.clone());
        assert!(matches!(
            infer(&Op::CausalConv1dGrad, &[&x, &w, &bias, &s0, &x64, &s0]),
            Err(TypeError::DTypeMismatch { lhs_operand: 4, .. })
        ));
        // The forward rule applies to the forward operands.
        assert!(matches!(
            infer(&Op::CausalConv1dGrad, &[&x, &w, &bias, &x, &x, &s0]),
            Err(TypeError::Rank { .. } | TypeError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn cross_entropy_types() {
        let (b, l) = (Dim::sym("B"), Dim::sym("L"));
        let logits = t(&[b.clone(), l.clone(), Dim::known(7)]);
        let ids = TensorType::new(DType::I64, vec![b.clone(), l.clone()]);
        let loss = t(&[b.clone(), l.clone()]);
        let op = Op::CrossEntropy { ignore_index: -100 };
        assert_eq!(infer(&op, &[&logits, &ids]).unwrap(), vec![loss.clone(); 2]);
        let grad = Op::CrossEntropyGrad { ignore_index: -100 };
        assert_eq!(
            infer(&grad, &[&logits, &ids, &loss]).unwrap(),
            vec![logits.clone()]
        );
        // Float targets, targets of the wrong shape, a dloss of the wrong shape.
        assert!(matches!(
            infer(&op, &[&logits, &loss]),
            Err(TypeError::WrongDType { operand: 1, .. })
        ));
        let short = TensorType::new(DType::I64, vec![b.clone(), Dim::known(3)]);
        assert!(matches!(
            infer(&op, &[&logits, &short]),
            Err(TypeError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            infer(&grad, &[&logits, &ids, &logits]),
            Err(TypeError::ShapeMismatch { lhs_operand: 2, .. })
        ));
        let scalar = t(&[]);
        assert!(matches!(
            infer(&op, &[&scalar, &ids]),
            Err(TypeError::Rank { operand: 0, .. })
        ));
    }

    #[test]
    fn unary_rejects_ints_and_wrong_arity() {
        let i = TensorType::new(DType::I32, vec![Dim::known(3)]);
        assert!(matches!(
            infer(&Op::Unary(UnaryOp::Exp), &[&i]),
            Err(TypeError::WrongDType { .. })
        ));
        assert!(matches!(
            infer(&Op::Unary(UnaryOp::Exp), &[]),
            Err(TypeError::Arity { .. })
        ));
    }
}
