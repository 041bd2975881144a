//! Dense host arrays in row-major order. The reference interpreter computes in f64; the
//! dtype of the value the array stands for is kept so outputs can be compared per dtype.

use ir::DType;

/// A dense row-major array of f64 values.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Array {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Array {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Array { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Array {
        let n = shape.iter().product();
        Array {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn scalar(x: f64) -> Array {
        Array {
            shape: vec![],
            data: vec![x],
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row-major strides, in elements.
    pub fn strides(&self) -> Vec<usize> {
        strides(&self.shape)
    }
}

/// Row-major strides of `shape`, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Rounds `x` to the nearest value representable in `dtype` (round-to-nearest-even), so the
/// f64 interpreter can model storage precision when asked to.
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::F32 => x as f32 as f64,
        DType::F16 => half::f16::from_f64(x).to_f64(),
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::I32 | DType::I64 => x.round(),
    }
}
