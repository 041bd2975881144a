//! Tensor types: element dtype and symbolic shape.
//!
//! A dimension is a monomial `k * s1 * s2 * ...` over named symbols (`B`, `L`): enough for
//! batch and sequence to stay symbolic through reshapes such as `[B, L, E] -> [B*L, E]`, and
//! closed under the products that shape rules need. Config-derived sizes are plain numbers by
//! the time they reach the IR (the frontend evaluates them).

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

/// One dimension: `coeff * syms[0] * syms[1] * ...`, symbols kept sorted so that equal
/// monomials compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dim {
    coeff: u64,
    syms: Vec<String>,
}

impl Dim {
    pub fn known(n: u64) -> Dim {
        Dim {
            coeff: n,
            syms: Vec::new(),
        }
    }

    pub fn sym(name: &str) -> Dim {
        Dim {
            coeff: 1,
            syms: vec![name.to_string()],
        }
    }

    /// The number, when the dimension has no symbols.
    pub fn as_known(&self) -> Option<u64> {
        self.syms.is_empty().then_some(self.coeff)
    }

    pub fn coeff(&self) -> u64 {
        self.coeff
    }

    pub fn syms(&self) -> &[String] {
        &self.syms
    }

    pub fn is_one(&self) -> bool {
        self.as_known() == Some(1)
    }

    /// Product of two dimensions; `None` on u64 overflow.
    pub fn mul(&self, other: &Dim) -> Option<Dim> {
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
        Some(Dim { coeff, syms })
    }

    /// Value with every symbol bound by `bind`; `None` if a symbol is unbound or on overflow.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        self.syms
            .iter()
            .try_fold(self.coeff, |acc, s| acc.checked_mul(bind(s)?))
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
}
