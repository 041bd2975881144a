//! Tensor types: element dtype and symbolic shape.
//!
//! A dimension is a monomial `k * s1 * s2 * ...` over named symbols (`B`, `L`): enough for
//! batch and sequence to stay symbolic through reshapes such as `[B, L, E] -> [B*L, E]`, and
//! closed under the products that shape rules need. Config-derived sizes are plain numbers by
//! the time they reach the IR (the frontend evaluates them).
//!
//! Outside the graph, a dimension may also be the ceiling of a monomial over a constant,
//! `ceil(L/64)`: the number of chunks of a sequence, which the lowering's working buffers
//! (`BufKind::Scratch`) are sized by. Graph types never contain one ([`infer`] rejects them
//! in op attributes), so shape rules only ever see monomials.
//!
//! [`infer`]: crate::infer::infer

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I32,
    I64,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn is_float(self) -> bool {
        match self {
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 => true,
            DType::I32 | DType::I64 => false,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: `ceil(coeff * syms[0] * syms[1] * ... / div)`, symbols kept sorted and
/// `coeff / div` in lowest terms so that equal dimensions compare equal. `div` is 1 (a plain
/// monomial) except for chunk counts ([`Dim::ceil_div`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dim {
    coeff: u64,
    syms: Vec<String>,
    div: u64,
}

impl Dim {
    pub fn known(n: u64) -> Dim {
        Dim {
            coeff: n,
            syms: Vec::new(),
            div: 1,
        }
    }

    pub fn sym(name: &str) -> Dim {
        Dim {
            coeff: 1,
            syms: vec![name.to_string()],
            div: 1,
        }
    }

    /// `ceil(self / q)` (the number of chunks of `q`); `None` if `q` is 0 or `self` is a
    /// ceiling division already.
    pub fn ceil_div(&self, q: u64) -> Option<Dim> {
        if q == 0 || self.div != 1 {
            return None;
        }
        let g = gcd(self.coeff, q);
        let (coeff, div) = (self.coeff / g, q / g);
        if self.syms.is_empty() || coeff == 0 {
            return Some(Dim::known(coeff.div_ceil(div)));
        }
        Some(Dim {
            coeff,
            syms: self.syms.clone(),
            div,
        })
    }

    /// The number, when the dimension has no symbols.
    pub fn as_known(&self) -> Option<u64> {
        self.syms.is_empty().then_some(self.coeff)
    }

    pub fn coeff(&self) -> u64 {
        self.coeff
    }

    /// The divisor of a ceiling division ([`Dim::ceil_div`]); 1 for a monomial.
    pub fn div(&self) -> u64 {
        self.div
    }

    pub fn syms(&self) -> &[String] {
        &self.syms
    }

    pub fn is_one(&self) -> bool {
        self.as_known() == Some(1)
    }

    /// Product of two dimensions; `None` on u64 overflow, or when a factor other than 1 is a
    /// ceiling division (a product of ceilings is not the ceiling of a monomial).
    pub fn mul(&self, other: &Dim) -> Option<Dim> {
        if self.is_one() {
            return Some(other.clone());
        }
        if other.is_one() {
            return Some(self.clone());
        }
        if self.div != 1 || other.div != 1 {
            return None;
        }
        let coeff = if self.coeff == 0 || other.coeff == 0 {
            0
        } else {
            self.coeff.checked_mul(other.coeff)?
        };
        let mut syms = self.syms.clone();
        syms.extend(other.syms.iter().cloned());
        syms.sort();
        if coeff == 0 {
            syms.clear();
        }
        Some(Dim {
            coeff,
            syms,
            div: 1,
        })
    }

    /// Value with every symbol bound by `bind`; `None` if a symbol is unbound or on overflow.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        let n = self
            .syms
            .iter()
            .try_fold(self.coeff, |acc, s| acc.checked_mul(bind(s)?))?;
        Some(n.div_ceil(self.div))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.div != 1 {
            let mono = Dim {
                div: 1,
                ..self.clone()
            };
            return write!(f, "ceil({mono}/{})", self.div);
        }
        if self.syms.is_empty() {
            return write!(f, "{}", self.coeff);
        }
        let mut first = true;
        if self.coeff != 1 {
            write!(f, "{}", self.coeff)?;
            first = false;
        }
        for s in &self.syms {
            if !first {
                f.write_str("*")?;
            }
            f.write_str(s)?;
            first = false;
        }
        Ok(())
    }
}

/// A shape: one [`Dim`] per axis, outermost first.
pub type Shape = Vec<Dim>;

/// Writes a shape as `[B, L, 768]`.
pub fn shape_to_string(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// Product of all dimensions (the element count); `None` on overflow.
pub fn numel(shape: &[Dim]) -> Option<Dim> {
    shape.iter().try_fold(Dim::known(1), |acc, d| acc.mul(d))
}

/// Dtype and shape of one tensor value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", shape_to_string(&self.shape), self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monomials_compare_and_print() {
        let bl = Dim::sym("L").mul(&Dim::sym("B")).unwrap();
        assert_eq!(bl, Dim::sym("B").mul(&Dim::sym("L")).unwrap());
        assert_eq!(bl.to_string(), "B*L");
        assert_eq!(
            Dim::known(2).mul(&Dim::sym("L")).unwrap().to_string(),
            "2*L"
        );
        assert_eq!(Dim::known(768).to_string(), "768");
        assert_eq!(
            bl.eval(&|s| if s == "B" { Some(2) } else { Some(5) }),
            Some(10)
        );
    }

    #[test]
    fn ceiling_divisions_count_chunks() {
        let l = Dim::sym("L");
        let c = l.ceil_div(64).unwrap();
        assert_eq!(c.to_string(), "ceil(L/64)");
        for (len, chunks) in [(0, 0), (1, 1), (63, 1), (64, 1), (65, 2), (197, 4)] {
            assert_eq!(c.eval(&|_| Some(len)), Some(chunks));
        }
        // In lowest terms: ceil(128*L/64) is 2*L, ceil(6*L/4) is ceil(3*L/2).
        let l128 = Dim::known(128).mul(&l).unwrap();
        assert_eq!(l128.ceil_div(64).unwrap(), Dim::known(2).mul(&l).unwrap());
        let l6 = Dim::known(6).mul(&l).unwrap();
        assert_eq!(l6.ceil_div(4).unwrap().to_string(), "ceil(3*L/2)");
        assert_eq!(Dim::known(65).ceil_div(64), Some(Dim::known(2)));
        assert_eq!(l.ceil_div(0), None);
        assert_eq!(c.ceil_div(2), None);
        // Products keep monomials only; 1 is the identity.
        assert_eq!(c.mul(&Dim::known(1)), Some(c.clone()));
        assert_eq!(c.mul(&Dim::known(2)), None);
        assert_eq!(c.mul(&c), None);
    }
}
