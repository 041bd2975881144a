//! Parameter initialisation from the graph's [`Init`] specs, with a seeded generator, for
//! training from scratch and for random-weight runs and benchmarks.

use crate::array::Array;
use ir::{Graph, Init, Op, TensorType};
use std::collections::HashMap;

/// SplitMix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `log(exp(y) - 1)`, the inverse of softplus, stable for large `y`.
fn softplus_inv(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

/// Values for one parameter of type `ty` (all dims known) drawn as `init` says.
pub fn init_array(init: &Init, ty: &TensorType, rng: &mut Rng) -> Array {
    let shape: Vec<usize> = ty
        .shape
        .iter()
        .map(|d| d.as_known().unwrap_or(0) as usize)
        .collect();
    let n: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1).max(1);
    let data: Vec<f64> = (0..n)
        .map(|i| match *init {
            Init::Zeros => 0.0,
            Init::Ones => 1.0,
            Init::Normal { std } => std * rng.normal(),
            Init::Uniform { lo, hi } => lo + (hi - lo) * rng.uniform(),
            Init::ALogArange => ((i % last) as f64 + 1.0).ln(),
            Init::ALogUniform { lo, hi } => (lo + (hi - lo) * rng.uniform()).ln(),
            Init::DtBias { min, max, floor } => {
                let dt = (min.ln() + (max.ln() - min.ln()) * rng.uniform()).exp();
                softplus_inv(dt.max(floor))
            }
        })
        .collect();
    Array::new(shape, data)
}

/// Every parameter of `graph`, initialised in graph order from `seed`.
pub fn init_params(graph: &Graph, seed: u64) -> HashMap<String, Array> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for n in graph.params() {
        if let Op::Param { name, ty, init } = graph.op(n) {
            out.insert(name.clone(), init_array(init, ty, &mut rng));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{DType, Dim};

    #[test]
    fn dt_bias_inverts_softplus_into_the_range() {
        let ty = TensorType::new(DType::F32, vec![Dim::known(1000)]);
        let a = init_array(
            &Init::DtBias {
                min: 1e-3,
                max: 0.1,
                floor: 1e-4,
            },
            &ty,
            &mut Rng::new(1),
        );
        for &b in &a.data {
            let dt = (1.0 + b.exp()).ln();
            assert!((1e-3 * 0.999..=0.1 * 1.001).contains(&dt), "{dt}");
        }
    }

    #[test]
    fn a_log_arange_is_log_1_to_n_per_row() {
        let ty = TensorType::new(DType::F32, vec![Dim::known(2), Dim::known(3)]);
        let a = init_array(&Init::ALogArange, &ty, &mut Rng::new(1));
        let want: Vec<f64> = [1.0f64, 2.0, 3.0, 1.0, 2.0, 3.0]
            .iter()
            .map(|x| x.ln())
            .collect();
        assert_eq!(a.data, want);
    }

    #[test]
    fn normal_has_the_right_moments() {
        let ty = TensorType::new(DType::F32, vec![Dim::known(20000)]);
        let a = init_array(&Init::Normal { std: 0.5 }, &ty, &mut Rng::new(7));
        let mean = a.data.iter().sum::<f64>() / a.len() as f64;
        let var = a.data.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var.sqrt() - 0.5).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
