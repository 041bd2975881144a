//! Picking the next token from a row of logits.
//!
//! The order is the one Hugging Face transformers uses: repetition penalty on the raw logits,
//! then temperature, top-k, top-p and min-p, each removing tokens (setting their logit to
//! `-inf`), then a draw from the softmax of what is left with a seeded generator. A
//! temperature of 0 is greedy decoding (the penalty still applies; the filters do not
//! matter). Every function works in place on one row and is usable on its own.

use runtime::init::Rng;

/// The sampling knobs; the default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass is at least `p`;
    /// 1 turns it off.
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the top probability; 0 turns
    /// it off.
    pub min_p: f32,
    /// Logits of tokens already seen (prompt and generated) are divided by this when positive
    /// and multiplied by it when negative; 1 turns it off.
    pub repetition_penalty: f32,
}

impl Default for SamplingConfig {
    fn default() -> SamplingConfig {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges; the message names the knob.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!("temperature must be finite and >= 0, got {t}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "repetition penalty must be finite and > 0, got {r}"
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Divides positive and multiplies negative logits of every token in `seen` (each once,
/// however often it was seen) by `penalty`.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let x = &mut logits[t];
            *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
        }
    }
}

/// Divides every logit by `temperature` (> 0).
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        for x in logits.iter_mut() {
            *x /= temperature;
        }
    }
}

/// Indices of `logits` from most to least likely; ties keep the lower index first, NaN last.
fn ranked(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    idx.sort_by(|&a, &b| key(logits[b]).total_cmp(&key(logits[a])).then(a.cmp(&b)));
    idx
}

/// Keeps the `k` most likely tokens (ties broken by the lower index); `k` = 0 keeps all.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let order = ranked(logits);
    for &i in &order[k..] {
        logits[i] = f32::NEG_INFINITY;
    }
}

/// The softmax of a row in f64 (`-inf` gives 0; a row with nothing finite gives all zeros).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY || !max.is_finite() {
        return vec![0.0; logits.len()];
    }
    let e: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                0.0
            } else {
                ((x - max) as f64).exp()
            }
        })
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// Keeps the smallest set of most likely tokens whose probability mass is at least `p`
/// (always at least one token); `p` >= 1 keeps all.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let order = ranked(logits);
    let mut mass = 0.0f64;
    let mut keep = order.len();
    for (n, &i) in order.iter().enumerate() {
        mass += probs[i];
        if mass >= p as f64 {
            keep = n + 1;
            break;
        }
    }
    for &i in &order[keep.max(1)..] {
        logits[i] = f32::NEG_INFINITY;
    }
}

/// Keeps the tokens whose probability is at least `min_p` times the most likely token's;
/// `min_p` = 0 keeps all.
pub fn min_p_filter(logits: &mut [f32], min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let probs = softmax(logits);
    let top = probs.iter().copied().fold(0.0f64, f64::max);
    let threshold = min_p as f64 * top;
    for (x, p) in logits.iter_mut().zip(&probs) {
        if *p < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// The index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || (logits[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// A draw from the softmax of `logits` with one uniform number of `rng`.
pub fn draw(logits: &[f32], rng: &mut Rng) -> u32 {
    let probs = softmax(logits);
    let total: f64 = probs.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return argmax(logits);
    }
    let u = rng.uniform() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last = i;
            if u < acc {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Samples tokens of one sequence with its own generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub config: SamplingConfig,
    rng: Rng,
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(config: SamplingConfig, seed: u64) -> Sampler {
        Sampler {
            config,
            rng: Rng::new(seed),
            scratch: Vec::new(),
        }
    }

    /// The next token after `logits`, given the tokens `seen` so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let c = &self.config;
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        let row = &mut self.scratch;
        apply_repetition_penalty(row, seen, c.repetition_penalty);
        if c.is_greedy() {
            return argmax(row);
        }
        apply_temperature(row, c.temperature);
        top_k_filter(row, c.top_k);
        top_p_filter(row, c.top_p);
        min_p_filter(row, c.min_p);
        draw(row, &mut self.rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_first_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn draw_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[draw(&logits, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let frac = counts[1] as f64 / 20000.0;
        assert!((frac - 0.75).abs() < 0.02, "{counts:?}");
    }
}
