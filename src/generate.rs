//! Generation: prefill, the recurrent step, and the decode loop with sampling.
//!
//! ```no_run
//! use ma2mba::generate::GenerateConfig;
//! use ma2mba::model::{LoadOptions, Model};
//! let mut m = Model::load("tiny-mamba2", &LoadOptions::default())?;
//! // By hand: prefill the prompt, then one step per token with the carried state.
//! let mut state = m.new_state(1);
//! let logits = m.prefill(&[vec![1, 2, 3]], &mut state)?;
//! let next = ma2mba::sample::argmax(logits.at(0, 2));
//! let logits = m.step(&[next], &mut state)?;
//! // Or the whole loop, streaming each token.
//! let cfg = GenerateConfig { max_new_tokens: 8, ..GenerateConfig::default() };
//! let out = m.generate(&[vec![1, 2, 3], vec![4, 5]], &cfg, |t| {
//!     println!("sequence {} token {}", t.sequence, t.id);
//!     true
//! })?;
//! # Ok::<(), ma2mba::model::Error>(())
//! ```
//!
//! The step is derived by the compiler ([`passes::step_graph`]: the model graph with `L` = 1),
//! not written by hand; prefill is the parallel graph over the prompt. Both return the final
//! states, which a [`State`] carries from call to call.
//!
//! A batch of prompts of different lengths is prefilled in groups of equal length, then
//! decoded together, one step per token for the whole batch; sequences that finish (eos,
//! stop string, length) leave the batch.

use crate::model::{Backend, Error, Form, Logits, Model};
use crate::sample::{Sampler, SamplingConfig};
use crate::state::State;
use crate::tokenizer::Tokenizer;
use std::time::{Duration, Instant};

/// What to generate and how to pick tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// New tokens per sequence at most.
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Seed of the sampling; sequence `i` of a batch draws from its own generator, seeded
    /// from `seed` and `i`.
    pub seed: u64,
    /// A sequence ends after this token (it is kept in the output).
    pub eos_token_id: Option<u32>,
    /// A sequence ends once its generated text contains one of these (needs a tokenizer;
    /// the text is cut before the stop string, the ids keep the token that completed it).
    pub stop_strings: Vec<String>,
}

impl Default for GenerateConfig {
    fn default() -> GenerateConfig {
        GenerateConfig {
            max_new_tokens: 32,
            sampling: SamplingConfig::default(),
            seed: 0,
            eos_token_id: None,
            stop_strings: Vec::new(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The eos token was generated.
    Eos,
    /// Its text contains this stop string.
    Stop(String),
    /// The callback asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop(_) => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generated token, as the callback sees it.
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    /// Which prompt of the batch.
    pub sequence: usize,
    /// The token id.
    pub id: u32,
    /// Its position among the sequence's new tokens (0 for the first).
    pub index: usize,
    /// The text it adds (empty without a tokenizer, and while a multi-byte character or a
    /// possible stop string is still incomplete).
    pub text: &'a str,
}

/// One finished sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// Their text, when the model has a tokenizer.
    pub text: Option<String>,
    pub finish: FinishReason,
}

/// Wall times of a generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens run through the parallel form.
    pub prefill_tokens: usize,
    pub prefill: Duration,
    /// Step calls (each one token for every sequence still running).
    pub decode_steps: usize,
    /// Tokens those steps consumed (the sum of the batch sizes).
    pub decode_tokens: usize,
    pub decode: Duration,
}

impl Timings {
    /// Prefill throughput.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill.as_secs_f64().max(1e-12)
    }

    /// Latency of one step (per token of one sequence at batch 1).
    pub fn ms_per_step(&self) -> f64 {
        if self.decode_steps == 0 {
            return 0.0;
        }
        1e3 * self.decode.as_secs_f64() / self.decode_steps as f64
    }

    /// Decode throughput over the whole batch.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_tokens == 0 {
            return 0.0;
        }
        self.decode_tokens as f64 / self.decode.as_secs_f64().max(1e-12)
    }
}

/// Everything a generation produced, sequences in prompt order.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub sequences: Vec<Sequence>,
    pub timings: Timings,
}

impl Model {
    /// All-zero states for `batch` sequences: the state before any token.
    pub fn new_state(&self, batch: usize) -> State {
        State::zeros(self.state_shapes(batch))
    }

    /// Runs a batch of equally long token sequences from `state` (zeros for a fresh start,
    /// or a state carried from earlier calls), replaces it with the final states and returns
    /// the logits of every position.
    pub fn prefill(&mut self, tokens: &[Vec<u32>], state: &mut State) -> Result<Logits, Error> {
        let (b, l) = self.check_tokens(tokens)?;
        state.check(&self.state_shapes(b))?;
        let ids: Vec<i32> = tokens.iter().flatten().map(|&t| t as i32).collect();
        let (logits, finals) = self.run_form(Form::Parallel, &ids, b, l, state.map())?;
        state.update(finals)?;
        Ok(logits)
    }

    /// One recurrent step: token `tokens[i]` for sequence `i` of `state`; updates the state
    /// and returns the logits `[batch, 1, vocab]`.
    pub fn step(&mut self, tokens: &[u32], state: &mut State) -> Result<Logits, Error> {
        if tokens.len() != state.batch() {
            return Err(Error::Input(format!(
                "{} tokens for a state of {} sequences: a step takes one token per sequence",
                tokens.len(),
                state.batch()
            )));
        }
        let b = tokens.len();
        self.check_tokens(&[tokens.to_vec()])?;
        state.check(&self.state_shapes(b))?;
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (logits, finals) = self.run_form(Form::Step, &ids, b, 1, state.map())?;
        let old = state.update(finals)?;
        self.recycle(old);
        Ok(logits)
    }

    /// Encodes text with the model's tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::Tokenizer("the model has no tokenizer".into()))?
            .encode(text)
    }

    /// Generates a continuation of every prompt. `on_token` sees each new token as it is
    /// produced (sequences of a batch interleaved, in step order); returning `false` stops
    /// the whole generation. Text is decoded when the model has a tokenizer.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        cfg: &GenerateConfig,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Generation, Error> {
        cfg.sampling.validate().map_err(Error::Input)?;
        if prompts.is_empty() {
            return Err(Error::Input("no prompts to continue".into()));
        }
        if let Some((i, _)) = prompts.iter().enumerate().find(|(_, p)| p.is_empty()) {
            return Err(Error::Input(format!(
                "prompt {i} is empty: generation needs at least one token to start from"
            )));
        }
        let vocab = self.vocab();
        for p in prompts {
            self.check_tokens(std::slice::from_ref(p))?;
        }
        if let Some(e) = cfg.eos_token_id
            && e as usize >= vocab
        {
            return Err(Error::Input(format!(
                "eos token {e} is outside the vocabulary of {vocab}"
            )));
        }
        if cfg.stop_strings.iter().any(String::is_empty) {
            return Err(Error::Input("a stop string is empty".into()));
        }
        let tokenizer = self.tokenizer.take();
        let result = self.generate_with(prompts, cfg, tokenizer.as_ref(), &mut on_token);
        self.tokenizer = tokenizer;
        result
    }

    fn generate_with(
        &mut self,
        prompts: &[Vec<u32>],
        cfg: &GenerateConfig,
        tok: Option<&Tokenizer>,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Generation, Error> {
        if !cfg.stop_strings.is_empty() && tok.is_none() {
            return Err(Error::Input(
                "stop strings need a tokenizer to decode the text; the model has none".into(),
            ));
        }
        // Derive and compile the step before any timing starts.
        self.step_graph()?;
        let n = prompts.len();
        let mut timings = Timings::default();
        let mut seqs: Vec<Running> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Running {
                seen: p.clone(),
                prompt_len: p.len(),
                sampler: Sampler::new(cfg.sampling.clone(), sequence_seed(cfg.seed, i)),
                text: Decoded::default(),
                finish: None,
            })
            .collect();

        // Prefill: prompts of equal length together, each group from zero states.
        let started = Instant::now();
        let mut by_len: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            match by_len.iter_mut().find(|(l, _)| *l == p.len()) {
                Some((_, g)) => g.push(i),
                None => by_len.push((p.len(), vec![i])),
            }
        }
        let mut parts = Vec::new();
        let mut row_of = vec![0usize; n];
        let mut last_logits: Vec<Vec<f32>> = vec![Vec::new(); n];
        let mut rows = 0;
        for (len, group) in &by_len {
            let toks: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
            let mut st = self.new_state(group.len());
            let logits = self.prefill(&toks, &mut st)?;
            for (r, &i) in group.iter().enumerate() {
                last_logits[i] = logits.at(r, len - 1).to_vec();
                row_of[i] = rows + r;
            }
            rows += group.len();
            parts.push(st);
            timings.prefill_tokens += len * group.len();
        }
        let state = State::concat(&parts)?.select(&row_of)?;
        timings.prefill = started.elapsed();
        let mut dec = self.begin_decode(state)?;

        // The first token of every sequence comes from the prefill logits.
        let mut cancelled = false;
        let mut active: Vec<usize> = (0..n).collect();
        if cfg.max_new_tokens == 0 {
            for s in seqs.iter_mut() {
                s.finish = Some(FinishReason::Length);
            }
            active.clear();
        }
        for &i in &active {
            if !cancelled {
                cancelled = !seqs[i].push(i, &last_logits[i], cfg, tok, on_token)?;
            }
        }
        let decode_started = Instant::now();
        loop {
            if cancelled {
                for s in seqs.iter_mut().filter(|s| s.finish.is_none()) {
                    s.finish = Some(FinishReason::Cancelled);
                }
                break;
            }
            // Sequences that finished leave the batch.
            let keep: Vec<usize> = (0..active.len())
                .filter(|&r| seqs[active[r]].finish.is_none())
                .collect();
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                self.decode_select(&mut dec, &keep)?;
                active = keep.iter().map(|&r| active[r]).collect();
            }
            let last: Vec<u32> = active
                .iter()
                .map(|&i| seqs[i].seen.last().copied())
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Input("a prompt is empty".into()))?;
            let logits = self.decode_step(&mut dec, &last)?;
            timings.decode_steps += 1;
            timings.decode_tokens += active.len();
            for (r, &i) in active.iter().enumerate() {
                if !cancelled {
                    cancelled = !seqs[i].push(i, logits.at(r, 0), cfg, tok, on_token)?;
                }
            }
        }
        timings.decode = decode_started.elapsed();

        let sequences = seqs
            .into_iter()
            .zip(prompts)
            .map(|(s, p)| Sequence {
                prompt: p.clone(),
                tokens: s.seen[s.prompt_len..].to_vec(),
                text: tok.map(|_| s.text.text.clone()),
                finish: s.finish.unwrap_or(FinishReason::Length),
            })
            .collect();
        Ok(Generation { sequences, timings })
    }
}

/// A decode in progress: one token per sequence per step, with the state carried between
/// steps where the backend keeps it. On the CPU backends that is a [`State`] on the host; on
/// the GPU the states stay on the device and each step replays a CUDA graph, so a step moves
/// only the token ids in and the logits out.
///
/// ```no_run
/// # use ma2mba::model::{LoadOptions, Model};
/// # let mut m = Model::load("tiny-mamba2", &LoadOptions::default())?;
/// let mut state = m.new_state(1);
/// let logits = m.prefill(&[vec![1, 2, 3]], &mut state)?;
/// let mut dec = m.begin_decode(state)?;
/// let mut next = ma2mba::sample::argmax(logits.at(0, 2));
/// for _ in 0..8 {
///     next = ma2mba::sample::argmax(m.decode_step(&mut dec, &[next])?.at(0, 0));
/// }
/// let state = m.end_decode(dec)?; // back on the host, to save or continue
/// # Ok::<(), ma2mba::model::Error>(())
/// ```
pub struct Decoding {
    batch: usize,
    /// The state on the host; `None` while it lives on the device.
    host: Option<State>,
}

impl Decoding {
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl Model {
    /// Starts decoding from `state` (after a prefill, or zeros).
    pub fn begin_decode(&mut self, state: State) -> Result<Decoding, Error> {
        let batch = state.batch();
        if self.backend() == Backend::Cuda {
            self.gpu_begin_decode(&state)?;
            return Ok(Decoding { batch, host: None });
        }
        Ok(Decoding {
            batch,
            host: Some(state),
        })
    }

    /// One step: token `tokens[i]` for sequence `i`; returns the logits `[batch, 1, vocab]`.
    pub fn decode_step(&mut self, dec: &mut Decoding, tokens: &[u32]) -> Result<Logits, Error> {
        if tokens.len() != dec.batch {
            return Err(Error::Input(format!(
                "{} tokens for a decode of {} sequences: a step takes one token per sequence",
                tokens.len(),
                dec.batch
            )));
        }
        match dec.host.as_mut() {
            Some(state) => self.step(tokens, state),
            None => {
                self.check_tokens(&[tokens.to_vec()])?;
                self.gpu_decode_step(tokens)
            }
        }
    }

    /// Keeps only sequences `rows` (in that order), e.g. when others finished.
    pub fn decode_select(&mut self, dec: &mut Decoding, rows: &[usize]) -> Result<(), Error> {
        match dec.host.as_mut() {
            Some(state) => *state = state.select(rows)?,
            None => {
                let state = self.gpu_decode_state(dec.batch)?.select(rows)?;
                self.gpu_begin_decode(&state)?;
            }
        }
        dec.batch = rows.len();
        Ok(())
    }

    /// Ends the decode and returns its state on the host.
    pub fn end_decode(&mut self, dec: Decoding) -> Result<State, Error> {
        match dec.host {
            Some(state) => Ok(state),
            None => self.gpu_decode_state(dec.batch),
        }
    }
}

/// The seed of sequence `i`'s generator.
fn sequence_seed(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A sequence being generated.
struct Running {
    /// Prompt and generated tokens.
    seen: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    text: Decoded,
    finish: Option<FinishReason>,
}

/// The generated text of a sequence and how much of it was streamed.
#[derive(Default)]
struct Decoded {
    text: String,
    emitted: usize,
}

impl Running {
    /// Samples the next token from `logits`, streams it, and decides whether the sequence
    /// ends. Returns the callback's verdict (`false`: stop everything).
    fn push(
        &mut self,
        index: usize,
        logits: &[f32],
        cfg: &GenerateConfig,
        tok: Option<&Tokenizer>,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<bool, Error> {
        let id = self.sampler.sample(logits, &self.seen);
        self.seen.push(id);
        let generated = self.seen.len() - self.prompt_len;
        if cfg.eos_token_id == Some(id) {
            self.finish = Some(FinishReason::Eos);
        } else if generated >= cfg.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        let mut piece = String::new();
        if let Some(t) = tok {
            let text = t.decode(&self.seen[self.prompt_len..])?;
            // Cut at the first stop string.
            let stop = cfg
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()).map(|p| (p, s)))
                .min_by_key(|(p, _)| *p);
            let (text, safe) = match stop {
                Some((p, s)) => {
                    self.finish = Some(FinishReason::Stop(s.clone()));
                    (text[..p].to_string(), p)
                }
                None => {
                    let safe = if self.finish.is_some() {
                        text.len()
                    } else {
                        streamable(&text, &cfg.stop_strings)
                    };
                    (text, safe)
                }
            };
            // Stream what is settled: not a partial character, not a possible stop string.
            if safe > self.text.emitted && text.is_char_boundary(self.text.emitted) {
                piece = text[self.text.emitted..safe].to_string();
                self.text.emitted = safe;
            }
            self.text.text = text;
        }
        Ok(on_token(&TokenEvent {
            sequence: index,
            id,
            index: generated - 1,
            text: &piece,
        }))
    }
}

/// How much of `text` can be streamed: up to a trailing replacement character (an
/// incomplete multi-byte character) and up to a suffix that could begin a stop string.
fn streamable(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end = text.trim_end_matches('\u{FFFD}').len();
    }
    for s in stops {
        let prefixes: Vec<usize> = s.char_indices().skip(1).map(|(k, _)| k).collect();
        for &k in prefixes.iter().rev() {
            if text[..end].ends_with(&s[..k]) {
                end = end.min(text[..end].len() - k);
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stop_strings() {
        let stops = vec!["END".to_string()];
        assert_eq!(streamable("hello E", &stops), 6);
        assert_eq!(streamable("hello EN", &stops), 6);
        assert_eq!(streamable("hello", &stops), 5);
        assert_eq!(streamable("xEEN", &["EENX".to_string()]), 1);
        assert_eq!(streamable("ab\u{FFFD}", &[]), 2);
    }
}
