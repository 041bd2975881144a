//! f64 transcendentals for targets without a libm (NVPTX), written once over [`Ops`]: the
//! host implementation ([`Host`]) runs them in Rust (tests check them against `std`), and a
//! backend implements [`Ops`] by emitting instructions, so the code it generates is the code
//! that was tested.
//!
//! They serve the ops the CPU backend computes in f64 and rounds once to f32 (`log`,
//! `softplus`): with a relative error of a few f64 ulps (below 1e-15, far under half an f32
//! ulp, 3e-8), the f32 result equals the correctly rounded one except when the exact value is
//! within about 1e-15 (relative) of a midpoint between two f32 values.
//!
//! - [`exp`]: `n = round(x / ln 2)`, `r = x - n ln 2` (Cody-Waite, two parts), `e^r` by its
//!   Taylor polynomial of degree 13 (|r| <= 0.35: truncation error below 4e-18), times `2^n`.
//!   For `x` in `[-700, 700]` (callers clamp).
//! - [`log`]: `x = 2^k m` with `m` in `[sqrt(1/2), sqrt(2))`, `s = (m - 1) / (m + 1)`,
//!   `log m = 2 atanh s` by its series to `s^23` (|s| <= 0.172: truncation below 1e-19),
//!   plus `k ln 2` (two parts). Exact special cases: `log(0) = -inf`, `log(inf) = inf`, NaN
//!   for negative and NaN inputs. Positive subnormal f64 inputs are not handled (f32 inputs
//!   are normal as f64).
//! - [`softplus`]: the evaluator's formula, `x` when `x > 20`, else `log1p(exp(x))`, with
//!   `log1p(e) = e log(u) / (u - 1)`, `u = 1 + e` (Goldberg; `e` when `u == 1`).

/// The operations the algorithms need: f64 arithmetic, comparisons, selects and the i64
/// bit manipulations of exponent fields.
pub trait Ops {
    type F: Copy;
    type I: Copy;
    type B: Copy;
    fn c(&mut self, x: f64) -> Self::F;
    fn ic(&mut self, x: i64) -> Self::I;
    fn add(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn div(&mut self, a: Self::F, b: Self::F) -> Self::F;
    /// Ordered `a < b` (false if either is NaN).
    fn lt(&mut self, a: Self::F, b: Self::F) -> Self::B;
    /// Ordered `a == b`.
    fn eq(&mut self, a: Self::F, b: Self::F) -> Self::B;
    fn sel(&mut self, c: Self::B, a: Self::F, b: Self::F) -> Self::F;
    fn isel(&mut self, c: Self::B, a: Self::I, b: Self::I) -> Self::I;
    fn f_to_bits(&mut self, a: Self::F) -> Self::I;
    fn bits_to_f(&mut self, a: Self::I) -> Self::F;
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn isub(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn iand(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn ior(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn shl(&mut self, a: Self::I, n: u32) -> Self::I;
    /// Arithmetic shift right.
    fn sar(&mut self, a: Self::I, n: u32) -> Self::I;
    /// Signed integer to f64.
    fn itof(&mut self, a: Self::I) -> Self::F;
}

/// `ln 2` in two parts: the high part has 21 trailing zero bits (32 significant ones), so
/// `n * LN2_HI` is exact for `|n| < 2^21` (fdlibm's split).
pub const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
pub const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
/// `1.5 * 2^52`: adding it rounds an f64 of magnitude below 2^51 to an integer, which its
/// low mantissa bits then hold.
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// `e^x` for `x` in `[-700, 700]`; NaN stays NaN.
pub fn exp<O: Ops>(o: &mut O, x: O::F) -> O::F {
    let log2e = o.c(std::f64::consts::LOG2_E);
    let magic = o.c(MAGIC);
    let t = o.mul(x, log2e);
    let t = o.add(t, magic);
    let nf = o.sub(t, magic);
    let tb = o.f_to_bits(t);
    let mb = o.ic(MAGIC.to_bits() as i64);
    let n = o.isub(tb, mb);
    let hi = o.c(LN2_HI);
    let lo = o.c(LN2_LO);
    let a = o.mul(nf, hi);
    let r = o.sub(x, a);
    let a = o.mul(nf, lo);
    let r = o.sub(r, a);
    // Horner over 1/k!, k = 13 down to 0.
    let mut fact = [1.0f64; 14];
    for k in 1..14 {
        fact[k] = fact[k - 1] * k as f64;
    }
    let mut p = o.c(1.0 / fact[13]);
    for k in (0..13).rev() {
        let m = o.mul(p, r);
        let ck = o.c(1.0 / fact[k]);
        p = o.add(m, ck);
    }
    let bias = o.ic(1023);
    let e = o.iadd(n, bias);
    let e = o.shl(e, 52);
    let scale = o.bits_to_f(e);
    o.mul(p, scale)
}

/// `ln x` (see the module doc for the special cases).
pub fn log<O: Ops>(o: &mut O, x: O::F) -> O::F {
    let bits = o.f_to_bits(x);
    let k = o.sar(bits, 52);
    let bias = o.ic(1023);
    let k = o.isub(k, bias);
    let mant = o.ic(0x000F_FFFF_FFFF_FFFF);
    let one_exp = o.ic(0x3FF0_0000_0000_0000);
    let m = o.iand(bits, mant);
    let m = o.ior(m, one_exp);
    let m = o.bits_to_f(m);
    // m in [1, 2); above sqrt(2) use m / 2 and k + 1.
    let sqrt2 = o.c(std::f64::consts::SQRT_2);
    let big = o.lt(sqrt2, m);
    let half = o.c(0.5);
    let mh = o.mul(m, half);
    let m = o.sel(big, mh, m);
    let one_i = o.ic(1);
    let k1 = o.iadd(k, one_i);
    let k = o.isel(big, k1, k);
    let one = o.c(1.0);
    let two = o.c(2.0);
    let f = o.sub(m, one);
    let d = o.add(two, f);
    let s = o.div(f, d);
    let z = o.mul(s, s);
    // P(z) = sum_{j=1..11} z^(j-1) / (2j + 1), by Horner.
    let mut p = o.c(1.0 / 23.0);
    for j in (1..11).rev() {
        let m = o.mul(p, z);
        let cj = o.c(1.0 / (2 * j + 1) as f64);
        p = o.add(m, cj);
    }
    let w = o.add(s, s);
    let zp = o.mul(z, p);
    let wzp = o.mul(w, zp);
    let lm = o.add(w, wzp);
    let kf = o.itof(k);
    let hi = o.c(LN2_HI);
    let lo = o.c(LN2_LO);
    let a = o.mul(kf, lo);
    let a = o.add(a, lm);
    let b = o.mul(kf, hi);
    let res = o.add(b, a);
    let inf = o.c(f64::INFINITY);
    let is_inf = o.eq(x, inf);
    let res = o.sel(is_inf, inf, res);
    let zero = o.c(0.0);
    let is_zero = o.eq(x, zero);
    let ninf = o.c(f64::NEG_INFINITY);
    let nan = o.c(f64::NAN);
    let bad = o.sel(is_zero, ninf, nan);
    let pos = o.lt(zero, x);
    o.sel(pos, res, bad)
}

/// `x` for `x > 20`, else `ln(1 + e^x)`.
pub fn softplus<O: Ops>(o: &mut O, x: O::F) -> O::F {
    let lo = o.c(-700.0);
    let hi = o.c(20.0);
    let under = o.lt(x, lo);
    let xc = o.sel(under, lo, x);
    let over = o.lt(hi, xc);
    let xc = o.sel(over, hi, xc);
    let e = exp(o, xc);
    let one = o.c(1.0);
    let u = o.add(one, e);
    let l = log(o, u);
    let um1 = o.sub(u, one);
    let n = o.mul(e, l);
    let q = o.div(n, um1);
    let exact = o.eq(u, one);
    let lp = o.sel(exact, e, q);
    let big = o.lt(hi, x);
    o.sel(big, x, lp)
}

/// [`Ops`] on the host, in Rust: what the generated code computes.
pub struct Host;

impl Ops for Host {
    type F = f64;
    type I = i64;
    type B = bool;
    fn c(&mut self, x: f64) -> f64 {
        x
    }
    fn ic(&mut self, x: i64) -> i64 {
        x
    }
    fn add(&mut self, a: f64, b: f64) -> f64 {
        a + b
    }
    fn sub(&mut self, a: f64, b: f64) -> f64 {
        a - b
    }
    fn mul(&mut self, a: f64, b: f64) -> f64 {
        a * b
    }
    fn div(&mut self, a: f64, b: f64) -> f64 {
        a / b
    }
    fn lt(&mut self, a: f64, b: f64) -> bool {
        a < b
    }
    fn eq(&mut self, a: f64, b: f64) -> bool {
        a == b
    }
    fn sel(&mut self, c: bool, a: f64, b: f64) -> f64 {
        if c { a } else { b }
    }
    fn isel(&mut self, c: bool, a: i64, b: i64) -> i64 {
        if c { a } else { b }
    }
    fn f_to_bits(&mut self, a: f64) -> i64 {
        a.to_bits() as i64
    }
    fn bits_to_f(&mut self, a: i64) -> f64 {
        f64::from_bits(a as u64)
    }
    fn iadd(&mut self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
    fn isub(&mut self, a: i64, b: i64) -> i64 {
        a.wrapping_sub(b)
    }
    fn iand(&mut self, a: i64, b: i64) -> i64 {
        a & b
    }
    fn ior(&mut self, a: i64, b: i64) -> i64 {
        a | b
    }
    fn shl(&mut self, a: i64, n: u32) -> i64 {
        a.wrapping_shl(n)
    }
    fn sar(&mut self, a: i64, n: u32) -> i64 {
        a >> n
    }
    fn itof(&mut self, a: i64) -> f64 {
        a as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of f32 bit patterns over every exponent.
    fn samples(n: usize) -> impl Iterator<Item = f32> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        (0..n).map(move |_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            f32::from_bits((s >> 32) as u32)
        })
    }

    fn rel(a: f64, e: f64) -> f64 {
        if a == e { 0.0 } else { ((a - e) / e).abs() }
    }

    #[test]
    fn split_ln2_is_ln2() {
        assert!((LN2_HI + LN2_LO - std::f64::consts::LN_2).abs() < 1e-17);
        assert!(LN2_HI.to_bits().trailing_zeros() >= 21);
    }

    #[test]
    fn exp_is_within_a_few_ulps() {
        let mut worst = 0.0f64;
        for i in 0..200_001 {
            let x = -700.0 + 1400.0 * f64::from(i) / 200_000.0;
            worst = worst.max(rel(exp(&mut Host, x), x.exp()));
        }
        for x in samples(200_000) {
            let x = f64::from(x);
            if x.abs() <= 700.0 {
                worst = worst.max(rel(exp(&mut Host, x), x.exp()));
            }
        }
        assert!(worst < 1e-15, "worst relative error {worst:e}");
        assert!(exp(&mut Host, f64::NAN).is_nan());
    }

    #[test]
    fn log_is_within_a_few_ulps_with_exact_special_cases() {
        let mut worst = 0.0f64;
        for x in samples(400_000) {
            let x = f64::from(x);
            let (got, want) = (log(&mut Host, x), x.ln());
            if want.is_nan() {
                assert!(got.is_nan(), "log({x}) = {got}");
            } else if want.is_infinite() || want == 0.0 {
                assert_eq!(got, want, "log({x})");
            } else {
                worst = worst.max(rel(got, want));
            }
        }
        for i in 1..100_000 {
            let x = 1.0 + (f64::from(i) - 50_000.0) * 1e-9;
            worst = worst.max(rel(log(&mut Host, x), x.ln()));
        }
        assert!(worst < 1e-15, "worst relative error {worst:e}");
        for (x, want) in [
            (0.0, f64::NEG_INFINITY),
            (-0.0, f64::NEG_INFINITY),
            (f64::INFINITY, f64::INFINITY),
            (1.0, 0.0),
        ] {
            assert_eq!(log(&mut Host, x), want, "log({x})");
        }
        assert!(log(&mut Host, -1.0).is_nan());
        assert!(log(&mut Host, f64::NAN).is_nan());
        assert!(log(&mut Host, f64::NEG_INFINITY).is_nan());
    }

    #[test]
    fn softplus_matches_the_evaluator_after_rounding_to_f32() {
        let reference = |x: f64| ir::kernel::eval::unary(ir::UnaryOp::Softplus, x);
        let mut worst = 0.0f64;
        let mut differ = 0usize;
        let mut n = 0usize;
        let grid = (0..100_001).map(|i| (-120.0 + 150.0 * f64::from(i) / 100_000.0) as f32);
        for x in samples(300_000).chain(grid) {
            let x = f64::from(x);
            let (got, want) = (softplus(&mut Host, x), reference(x));
            if want.is_nan() {
                assert!(got.is_nan(), "softplus({x}) = {got}");
                continue;
            }
            n += 1;
            if x >= -700.0 && want.is_finite() {
                worst = worst.max(rel(got, want));
            } else {
                // Below -700 the clamp gives e^-700 (about 1e-304): 0 as an f32 too.
                assert_eq!(got as f32, want as f32, "softplus({x})");
            }
            differ += usize::from(got as f32 != want as f32);
        }
        assert!(worst < 1e-14, "worst relative error {worst:e}");
        assert!(
            differ * 100_000 < n,
            "{differ} of {n} differ after rounding"
        );
        assert_eq!(softplus(&mut Host, f64::INFINITY), f64::INFINITY);
        assert_eq!(softplus(&mut Host, f64::NEG_INFINITY) as f32, 0.0);
    }
}
