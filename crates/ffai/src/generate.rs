//! Generation: parameters, seeded sampling, and the prefill-then-decode loop with
//! streaming text, end-of-generation ids and stop strings.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::models::{InferenceState, LanguageModel};
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off. Keeps tokens whose probability is at least min_p times the top one's.
    pub min_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    /// None = seeded from the clock.
    pub seed: Option<u64>,
    /// Stop at the tokenizer's end-of-generation ids.
    pub stop_on_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_step_size: usize,
    /// 0 = off. Subtracted from the logit of every token already generated (OpenAI's
    /// presence penalty; the prompt does not count).
    pub presence_penalty: f32,
    /// 0 = off. Subtracted once per earlier occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// None = off; Some(k): each token comes with its log-probability under the model
    /// (the log-softmax of the raw logits, before penalties and temperature) and the k
    /// most likely tokens' (k at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Output constrained to a JSON schema, any JSON object, a regex or a Lark grammar
    /// (`constrain`): each step's disallowed tokens are masked before sampling.
    pub response_format: Option<crate::constrain::ResponseFormat>,
}

/// Most alternatives [`GenerationParameters::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability and the most likely alternatives at its step
/// (id, log-probability), most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Default for GenerationParameters {
    fn default() -> Self {
        GenerationParameters {
            max_tokens: 256,
            temperature: 0.6,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop_on_eos: true,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            prefill_step_size: 512,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            response_format: None,
        }
    }
}

impl GenerationParameters {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::new(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0");
        }
        if self.prefill_step_size == 0 {
            return bad("prefill_step_size must be at least 1");
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(&format!("{name} must be in [-2, 2]"));
            }
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return bad(&format!("logprobs must be at most {MAX_TOP_LOGPROBS}"));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across
/// platforms, which is all sampling needs (not cryptographic).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks the next token from logits. Order: repetition penalty → greedy if T = 0 →
/// temperature → top-k → top-p (inclusive) → min-p → draw. Buffers are reused.
pub struct Sampler {
    params: GenerationParameters,
    rng: Rng,
    scratch: SampleScratch,
    /// Generated tokens and how often each came (presence / frequency penalties).
    counts: std::collections::HashMap<u32, u32>,
    /// The grammar the output must follow (see [`Sampler::constrain`]).
    constraint: Option<crate::constrain::Constraint>,
    /// Why the grammar ended the sequence (it allowed no token, or rejected one).
    constraint_error: Option<String>,
}

/// A sampler's working buffers (a vocabulary's worth of candidates and flags). Many
/// samplers run one after another on one thread can share one, sized once
/// ([`SampleScratch::with_vocab`]), so sampling allocates nothing.
#[derive(Default)]
pub struct SampleScratch {
    cand: Vec<(u32, f32)>,
    seen: Vec<bool>,
    /// The raw logits, kept for log-probabilities when penalties change the row.
    raw: Vec<f32>,
}

impl SampleScratch {
    pub fn with_vocab(vocab: usize) -> SampleScratch {
        SampleScratch {
            cand: Vec::with_capacity(vocab),
            seen: Vec::with_capacity(vocab),
            raw: Vec::new(),
        }
    }
}

impl Sampler {
    pub fn new(params: &GenerationParameters) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler {
            params: params.clone(),
            rng: Rng::new(seed),
            scratch: SampleScratch::default(),
            counts: std::collections::HashMap::new(),
            constraint: None,
            constraint_error: None,
        }
    }

    /// Compiles the parameters' `response_format` (if any) over `tok`'s vocabulary; an
    /// invalid schema, regex or grammar is an error here, before anything runs.
    pub fn constrain(&mut self, tok: &crate::tokenizer::Tokenizer) -> Result<()> {
        if let Some(f) = &self.params.response_format {
            self.constraint = Some(crate::constrain::Constraint::new(tok, f)?);
        }
        Ok(())
    }

    /// Uses a grammar already compiled for the parameters' `response_format`.
    pub fn set_constraint(&mut self, c: crate::constrain::Constraint) {
        self.constraint = Some(c);
    }

    /// Why the grammar ended the sequence, once it has.
    pub fn constraint_error(&self) -> Option<&str> {
        self.constraint_error.as_deref()
    }

    /// The constrained output is complete (only end of generation may follow).
    pub fn constraint_complete(&self) -> bool {
        self.constraint.as_ref().is_some_and(|c| c.is_complete())
    }

    /// Whether this sampler takes the plain argmax of the raw logits (greedy, no
    /// penalties, no log-probabilities): then the argmax alone decides the token, and a
    /// GPU need not send the row back.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature == 0.0
            && self.constraint.is_none()
            && p.logprobs.is_none()
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
    }

    /// [`sample_with`](Self::sample_with), and with `logprobs` asked for, the chosen
    /// token's log-probability and the top alternatives (from the raw logits).
    pub fn sample_with_logprobs(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        scratch: &mut SampleScratch,
    ) -> (u32, Option<TokenLogprobs>) {
        let Some(k) = self.params.logprobs else {
            return (self.sample_with(logits, history, scratch), None);
        };
        // log-softmax of the raw row: max, then the log of the sum in f64.
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| ((l - max) as f64).exp())
            .sum();
        let lse = max as f64 + sum.ln();
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k > 0 {
            let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            for (i, &l) in logits.iter().enumerate() {
                if l.is_nan() {
                    continue;
                }
                if top.len() < k {
                    top.push((i as u32, l));
                    top.sort_by(by);
                } else if by(&(i as u32, l), &top[k - 1]).is_lt() {
                    top[k - 1] = (i as u32, l);
                    top.sort_by(by);
                }
            }
        }
        let raw = &mut scratch.raw;
        raw.clear();
        raw.extend_from_slice(logits);
        let mut raw = std::mem::take(raw);
        let t = self.sample_with(logits, history, scratch);
        let lp = |l: f32| (l as f64 - lse) as f32;
        let out = TokenLogprobs {
            logprob: lp(raw[t as usize]),
            top: top.iter().map(|&(i, l)| (i, lp(l))).collect(),
        };
        std::mem::swap(&mut scratch.raw, &mut raw);
        (t, Some(out))
    }

    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let mut scratch = std::mem::take(&mut self.scratch);
        let t = self.sample_with(logits, history, &mut scratch);
        self.scratch = scratch;
        t
    }

    /// [`sample`](Self::sample) with the working buffers given (the result is the same).
    pub fn sample_with(&mut self, logits: &mut [f32], history: &[u32], scratch: &mut SampleScratch) -> u32 {
        let t = self.pick(logits, history, scratch);
        self.picked(t);
        t
    }

    /// After `t` was picked: the penalties' counts, and the grammar advances past it.
    fn picked(&mut self, t: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        if self.constraint_error.is_none() {
            if let Some(c) = &mut self.constraint {
                if let Err(e) = c.advance(t) {
                    self.constraint_error = Some(e.to_string());
                }
            }
        }
    }

    fn pick(&mut self, logits: &mut [f32], history: &[u32], scratch: &mut SampleScratch) -> u32 {
        let p = &self.params;
        let SampleScratch { cand, seen, .. } = scratch;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            seen.clear();
            seen.resize(logits.len(), false);
            for &t in history {
                let t = t as usize;
                if t < logits.len() && !seen[t] {
                    seen[t] = true;
                    let l = &mut logits[t];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(logits) {
                self.constraint_error = Some(e.to_string());
            }
        }
        if p.temperature == 0.0 {
            return ffai_kernels::ops::argmax(logits).0 as u32;
        }
        let inv_t = 1.0 / p.temperature;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if cand.is_empty() {
            return ffai_kernels::ops::argmax(logits).0 as u32;
        }
        // Highest logit first; ties by lowest id so the order is deterministic.
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // The whole row is here, so the cut always decides.
        cut(p.top_p, p.min_p, cand, 0.0, true);
        draw(&mut self.rng, cand)
    }

    /// How this sampler's token can be decided from a row's top candidates
    /// ([`ffai_kernels::ops::top_candidates`]) instead of the whole row, or None when it
    /// cannot: penalties (they change logits anywhere in the row), log-probabilities (they
    /// need the whole row's normaliser), a temperature whose inverse is not finite, a
    /// top-k above [`ffai_kernels::ops::MAX_CANDIDATES`], and plain temperature sampling
    /// without a grammar (no top-k, top-p or min-p: the draw may land anywhere in the
    /// row). A grammar makes the plan `masked`: the candidates are taken among the tokens
    /// its mask allows ([`candidate_mask`](Self::candidate_mask),
    /// `ops::top_candidates_masked`), which is what the whole-row path's −∞ leaves to pick
    /// from.
    pub fn candidate_plan(&self) -> Option<CandidatePlan> {
        let p = &self.params;
        if p.logprobs.is_some()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
        {
            return None;
        }
        let masked = self.constraint.is_some();
        if p.temperature == 0.0 {
            return Some(CandidatePlan {
                inv_t: 1.0,
                masked,
                greedy: true,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
            });
        }
        // The same f32 division `pick` makes, so the candidates are scaled as it scales.
        let inv_t = 1.0 / p.temperature;
        let cuts = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        // Plain temperature sampling draws anywhere in the row: candidates decide it only
        // when they hold every value the draw sees, which a grammar allowing fewer than k
        // tokens gives (a row whose grammar allows more falls back to its whole row).
        if !inv_t.is_finite() || p.top_k > ffai_kernels::ops::MAX_CANDIDATES || !(cuts || masked) {
            return None;
        }
        Some(CandidatePlan {
            inv_t,
            masked,
            greedy: false,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
        })
    }

    /// The grammar's allowed tokens for this step as a row's bitmask (a `masked`
    /// [`CandidatePlan`]'s mask: `words` holds `width.div_ceil(32)` words, bit `t % 32` of
    /// word `t / 32` set when token `t` is allowed; `Constraint::mask_words`). Waits for
    /// the mask computed beside the forward. When the grammar allows nothing (or failed)
    /// the words are all zero and the sampler keeps the error
    /// ([`constraint_error`](Self::constraint_error)), as the whole-row path does; the
    /// row's candidates are then empty and the sequence ends with the error. Without a
    /// grammar every token is allowed.
    pub fn candidate_mask(&mut self, width: usize, words: &mut [u32]) {
        let Some(c) = &mut self.constraint else {
            words.fill(u32::MAX);
            return;
        };
        if self.constraint_error.is_some() {
            words.fill(0);
            return;
        }
        if let Err(e) = c.mask_words(width, words) {
            self.constraint_error = Some(e.to_string());
        }
    }

    /// The token from a row's top candidates (`k` ids and values scaled by the plan's
    /// `inv_t`, as [`ffai_kernels::ops::top_candidates`] gives them, and the tail mass),
    /// or None when they cannot decide it (see [`CandidatePlan::decides`]; the generator
    /// is then untouched, and the whole row must go to [`sample_with`](Self::sample_with)).
    /// Only for a sampler with a [`candidate_plan`](Self::candidate_plan); with a grammar,
    /// the candidates are the masked ones ([`candidate_mask`](Self::candidate_mask)), and
    /// the token advances the grammar as [`sample_with`](Self::sample_with)'s does.
    /// Plain temperature sampling under a grammar is decided only when the grammar allows
    /// fewer than `k` tokens (the list is then the whole draw).
    ///
    /// The same token as on the whole row whenever the row has fewer than `k` non-NaN
    /// values, the sampler is greedy, or its top-k is at most `k`: the candidates are then
    /// exactly the values the whole-row path keeps, in the same order, and the rest runs
    /// the same f32/f64 arithmetic. Otherwise top-p's total adds the tail mass, summed in
    /// another order (on a GPU with its own `exp`); a token can differ only where that
    /// rounding moves the cumulative probability across `top_p` at the boundary.
    pub fn sample_candidates(
        &mut self,
        k: usize,
        ids: &[u32],
        vals: &[f32],
        tail: f64,
        scratch: &mut SampleScratch,
    ) -> Option<u32> {
        let plan = self.candidate_plan()?;
        self.sample_plan(plan, k, ids, vals, tail, scratch)
    }

    /// [`sample_candidates`](Self::sample_candidates) under `plan`.
    fn sample_plan(
        &mut self,
        plan: CandidatePlan,
        k: usize,
        ids: &[u32],
        vals: &[f32],
        tail: f64,
        scratch: &mut SampleScratch,
    ) -> Option<u32> {
        let t = match plan.decide(k, ids, vals, tail, &mut scratch.cand)? {
            Some(t) => t,
            None => draw(&mut self.rng, &scratch.cand),
        };
        self.picked(t);
        Some(t)
    }
}

/// Cuts `cand` (sorted by [`by_logit`], values scaled by 1/T, not empty) to what top-p
/// and min-p keep, its values turned into weights `exp(v - max)`. `complete`: `cand` holds
/// every value the draw could see; otherwise `tail` is the weight of the rest, counted in
/// top-p's total. Returns whether the cut is decided by what `cand` holds: false when
/// neither top-p nor min-p stopped inside an incomplete `cand`.
fn cut(top_p: f32, min_p: f32, cand: &mut Vec<(u32, f32)>, tail: f64, complete: bool) -> bool {
    let max = cand[0].1;
    // Convert to unnormalised probabilities.
    let mut total = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1 as f64;
    }
    if !complete {
        total += tail;
    }
    let mut decided = complete;
    if top_p < 1.0 {
        let mut acc = 0.0f64;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1 as f64 / total;
            if acc >= top_p as f64 {
                keep = i + 1;
                decided = true;
                break;
            }
        }
        cand.truncate(keep);
    }
    if min_p > 0.0 {
        // The top candidate has probability weight 1 after the max subtraction; the
        // weights fall along `cand`, so a value below the floor inside it ends the cut
        // there whatever follows.
        let keep = cand.iter().take_while(|c| c.1 >= min_p).count();
        decided |= keep < cand.len();
        cand.truncate(keep.max(1));
    }
    decided
}

/// Draws one of the weighted candidates.
fn draw(rng: &mut Rng, cand: &[(u32, f32)]) -> u32 {
    let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
    let mut r = rng.next_f64() * total;
    for c in cand.iter() {
        r -= c.1 as f64;
        if r < 0.0 {
            return c.0;
        }
    }
    cand.last().map(|c| c.0).unwrap_or(0)
}

/// Highest logit first; ties by lowest id so the order is deterministic.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// What a sampler needs of a row's top candidates ([`Sampler::candidate_plan`]): the
/// inverse temperature to scale them by and the cuts that decide from them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CandidatePlan {
    /// What the candidates are scaled by (1 for greedy).
    pub inv_t: f32,
    /// The sampler has a grammar: the row's candidates are taken among the tokens its
    /// mask allows ([`Sampler::candidate_mask`]).
    pub masked: bool,
    greedy: bool,
    top_k: usize,
    top_p: f32,
    min_p: f32,
}

impl CandidatePlan {
    /// The candidates a row wants: greedy 2 (the best and one after it to see that no tie
    /// continues), top-k its k, top-p / min-p (or a grammar's plain temperature sampling)
    /// the most there are (fewer rows fall back).
    pub fn k(&self) -> usize {
        if self.greedy {
            2
        } else if self.top_k > 0 {
            self.top_k
        } else {
            ffai_kernels::ops::MAX_CANDIDATES
        }
    }

    /// Whether a row's `k` candidates decide the token, or its whole row is needed: a
    /// greedy row whose top value's ties may continue past the list; a top-p / min-p row
    /// (without a top-k within `k`) whose cuts do not stop inside the list. `scratch` is
    /// working space.
    pub fn decides(&self, k: usize, ids: &[u32], vals: &[f32], tail: f64, scratch: &mut Vec<(u32, f32)>) -> bool {
        self.decide(k, ids, vals, tail, scratch).is_some()
    }

    /// None: the whole row is needed. Some(Some(token)): decided. Some(None): `cand`
    /// holds the kept candidates with their weights, to draw from.
    fn decide(
        &self,
        k: usize,
        ids: &[u32],
        vals: &[f32],
        tail: f64,
        cand: &mut Vec<(u32, f32)>,
    ) -> Option<Option<u32>> {
        let (ids, vals) = (&ids[..k.min(ids.len())], &vals[..k.min(vals.len())]);
        // Unused slots (u32::MAX) follow the row's last non-NaN value.
        let cnt = ids.iter().take_while(|&&i| i != u32::MAX).count().min(vals.len());
        // Fewer than k: every non-NaN value of the row is here.
        let complete = cnt < k;
        if cnt == 0 {
            // A row of NaN only: the whole-row path falls back to argmax, which gives 0.
            return complete.then_some(Some(0));
        }
        if self.greedy {
            // ops::argmax: the first index holding the largest value (`==`, so a zero of
            // either sign), 0 when nothing is above -inf. The values equal to the largest
            // are adjacent in the list (total order puts -0.0 right below +0.0).
            let max = vals[0];
            if max == f32::NEG_INFINITY {
                return Some(Some(0));
            }
            let run = vals[..cnt].iter().take_while(|&&v| v == max).count();
            if run == cnt && !complete {
                return None;
            }
            return Some(ids[..run].iter().copied().min());
        }
        cand.clear();
        cand.extend(ids[..cnt].iter().copied().zip(vals[..cnt].iter().copied()));
        let mut complete = complete;
        if self.top_k > 0 && self.top_k <= k {
            // The whole-row path's top-k keeps exactly these, in this order.
            cand.truncate(self.top_k);
            complete = true;
        } else if self.top_k > 0 && !complete {
            // The tail counts every value past the list, the whole-row path only those
            // up to its top-k: the total is unknown. (A step asks for k >= every row's
            // top-k, so this is only a caller's smaller k.)
            return None;
        }
        let tail = if complete { 0.0 } else { tail };
        cut(self.top_p, self.min_p, cand, tail, complete).then_some(None)
    }
}

/// A conversation's KV cache kept across turns: each new prompt (the whole conversation
/// so far) prefills only what follows the longest prefix already cached.
pub struct Session {
    pub state: InferenceState,
    /// The tokens whose K/V the cache holds, in order.
    pub tokens: Vec<u32>,
}

impl Session {
    pub fn new(model: &dyn LanguageModel, max_seq: usize, chunk: usize) -> Result<Session> {
        Ok(Session {
            state: model.new_state(max_seq, chunk)?,
            tokens: Vec::new(),
        })
    }

    /// Brings the cache to `prompt` and writes the last token's logits. Returns how many
    /// tokens were computed (the rest were reused). When a sliding-window layer's ring no
    /// longer holds what the shared prefix needs, the prompt is recomputed from scratch.
    pub fn prefill(&mut self, model: &dyn LanguageModel, prompt: &[u32], logits: &mut Vec<f32>) -> Result<usize> {
        let keep = self.reuse_prefix(model, prompt)?;
        model.forward(&prompt[keep..], &mut self.state, false, logits)?;
        self.tokens.extend_from_slice(&prompt[keep..]);
        Ok(prompt.len() - keep)
    }

    /// [`prefill`](Self::prefill), handing the last row back as `row` wants it (with
    /// `sampler`'s grammar mask, when it has one).
    fn prefill_row(
        &mut self,
        model: &dyn LanguageModel,
        prompt: &[u32],
        row: &mut LastRow,
        sampler: &mut Sampler,
    ) -> Result<usize> {
        let keep = self.reuse_prefix(model, prompt)?;
        row.forward(model, &prompt[keep..], &mut self.state, sampler)?;
        self.tokens.extend_from_slice(&prompt[keep..]);
        Ok(prompt.len() - keep)
    }

    /// Cuts the cache back to the longest prefix of `prompt` it holds and can continue
    /// from (less the last token, so there are logits to return); returns its length.
    fn reuse_prefix(&mut self, model: &dyn LanguageModel, prompt: &[u32]) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::new("the prompt is empty (no tokens to condition on)"));
        }
        let mut keep = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least the last token runs, so there are logits to return.
        keep = keep.min(prompt.len() - 1);
        if !model.can_rewind(&self.state, keep) {
            keep = 0;
        }
        self.state.pos = keep;
        self.tokens.truncate(keep);
        Ok(keep)
    }

    /// Feeds one generated token.
    pub fn push(&mut self, model: &dyn LanguageModel, token: u32, logits: &mut Vec<f32>) -> Result<()> {
        model.forward(&[token], &mut self.state, false, logits)?;
        self.tokens.push(token);
        Ok(())
    }
}

/// The last row of a one-sequence step as its sampler wants it: the top candidates when
/// the sampler can decide from them (`Sampler::candidate_plan`: on a GPU k ids and values
/// come back, not the vocabulary-wide row), else the logits.
struct LastRow {
    plan: Option<CandidatePlan>,
    /// The logits (with a plan: written only when the candidates do not decide).
    logits: Vec<f32>,
    ids: Vec<u32>,
    vals: Vec<f32>,
    tail: [f64; 1],
    full: [bool; 1],
    /// The grammar's mask words (a masked plan's), kept between steps.
    mask: Vec<u32>,
    /// Tokens [`sample`](Self::sample) took from the candidates alone.
    from_candidates: usize,
}

impl LastRow {
    fn new(plan: Option<CandidatePlan>, vocab: usize) -> LastRow {
        let k = plan.map_or(0, |p| p.k());
        LastRow {
            plan,
            logits: if plan.is_some() { vec![0.0; vocab] } else { Vec::new() },
            ids: vec![0; k],
            vals: vec![0.0; k],
            tail: [0.0],
            full: [false],
            mask: Vec::new(),
            from_candidates: 0,
        }
    }

    /// The step over `tokens`; a masked plan's row takes `sampler`'s grammar mask, asked
    /// for at the LM head (so it is computed beside the forward).
    fn forward(
        &mut self,
        model: &dyn LanguageModel,
        tokens: &[u32],
        state: &mut InferenceState,
        sampler: &mut Sampler,
    ) -> Result<()> {
        let Some(plan) = &self.plan else {
            return model.forward(tokens, state, false, &mut self.logits);
        };
        let vocab = self.logits.len();
        let mut fill = |_: usize, words: &mut [u32]| sampler.candidate_mask(vocab, words);
        let out = crate::models::CandidateOut {
            k: self.ids.len(),
            plans: std::slice::from_ref(plan),
            ids: &mut self.ids,
            vals: &mut self.vals,
            tail: &mut self.tail,
            full: &mut self.full,
            rows: &mut self.logits,
            masks: plan.masked.then_some(crate::models::RowMasks {
                fill: &mut fill,
                words: &mut self.mask,
            }),
        };
        model.forward_last(tokens, state, crate::models::StepOut::Candidates(out))
    }

    fn sample(&mut self, sampler: &mut Sampler, history: &[u32], scratch: &mut SampleScratch) -> u32 {
        if self.plan.is_some() && !self.full[0] {
            // The step kept the whole row wherever `CandidatePlan::decides` said the
            // candidates do not decide, and that is the test this makes.
            let t = sampler.sample_candidates(self.ids.len(), &self.ids, &self.vals, self.tail[0], scratch);
            self.from_candidates += 1;
            return t.expect("the step kept the whole row its candidates do not decide");
        }
        sampler.sample_with(&mut self.logits, history, scratch)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    EndOfGeneration,
    StopToken,
    StopString,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Everything generated, think tags included.
    pub text: String,
    /// The text inside `<think>` … `</think>` (newlines at its ends trimmed).
    pub reasoning: String,
    /// The text outside the think block.
    pub answer: String,
    /// Generated tokens that lie (at least partly) in the think block, tags included;
    /// `reasoning_tokens + answer_tokens == generated_ids.len()`.
    pub reasoning_tokens: usize,
    pub answer_tokens: usize,
    pub stop_reason: StopReason,
    /// Prompt tokens computed in prefill; the rest came from a session's cache.
    pub prefill_computed: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Forward passes made during decode (tokens fed back).
    pub decode_steps: usize,
    /// Tokens decided from their step's top candidates alone (`StepOut::Candidates`: the
    /// whole logits row never came back), grammar-constrained ones included.
    pub candidate_tokens: usize,
}

impl GenerationOutput {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_computed, self.prefill_seconds)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Holds back text that might be the start of a stop string, and finds complete ones.
pub(crate) struct StopScanner {
    stops: Vec<String>,
    pub(crate) text: String,
    emitted: usize,
}

impl StopScanner {
    pub(crate) fn new(stops: &[String]) -> StopScanner {
        StopScanner {
            stops: stops.to_vec(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends `delta`; returns (text safe to emit now, whether a stop string ended it).
    pub(crate) fn push(&mut self, delta: &str) -> (String, bool) {
        let search_from = self
            .emitted
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        self.text.push_str(delta);
        let search_from = floor_boundary(&self.text, search_from);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i))
            .min();
        if let Some(at) = hit {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut limit = self.text.len();
        for (j, _) in self.text.char_indices().skip_while(|(j, _)| *j < self.emitted) {
            let tail = &self.text[j..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                limit = j;
                break;
            }
        }
        let out = self.text[self.emitted..limit].to_string();
        self.emitted = limit;
        (out, false)
    }

    pub(crate) fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Which part of a reply a piece of streamed text belongs to. Concatenating every
/// piece, tags included, gives back the generated text exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// The reply proper.
    Answer,
    /// Text inside a `<think>` … `</think>` block.
    Reasoning,
    /// The `<think>` or `</think>` tag itself.
    ThinkTag,
}

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// Splits streamed text into reasoning and answer at `<think>` / `</think>`, holding
/// back a possible partial tag until the next piece settles it.
#[derive(Debug, Clone)]
pub struct ThinkSplitter {
    inside: bool,
    pending: String,
}

impl ThinkSplitter {
    /// `starts_inside`: the prompt already opened a think block (a template whose
    /// generation prompt ends in `<think>`), so the model's first words are reasoning.
    pub fn new(starts_inside: bool) -> ThinkSplitter {
        ThinkSplitter {
            inside: starts_inside,
            pending: String::new(),
        }
    }

    /// Whether the text seen so far ends inside a think block.
    pub fn inside(&self) -> bool {
        self.inside
    }

    /// Feeds `text`; calls `out` with each piece that is now settled.
    pub fn push(&mut self, text: &str, out: &mut impl FnMut(TextKind, &str)) {
        self.pending.push_str(text);
        let buf = std::mem::take(&mut self.pending);
        let mut rest = buf.as_str();
        loop {
            let (tag, kind) = if self.inside {
                (THINK_CLOSE, TextKind::Reasoning)
            } else {
                (THINK_OPEN, TextKind::Answer)
            };
            if let Some(i) = rest.find(tag) {
                if i > 0 {
                    out(kind, &rest[..i]);
                }
                out(TextKind::ThinkTag, tag);
                self.inside = !self.inside;
                rest = &rest[i + tag.len()..];
                continue;
            }
            // Keep back the longest tail that could still grow into the tag. Tags are
            // ASCII, so such a tail starts on a character boundary.
            let hold = (1..tag.len().min(rest.len() + 1))
                .rev()
                .find(|&n| rest.is_char_boundary(rest.len() - n) && tag.starts_with(&rest[rest.len() - n..]))
                .unwrap_or(0);
            let settled = &rest[..rest.len() - hold];
            if !settled.is_empty() {
                out(kind, settled);
            }
            self.pending = rest[rest.len() - hold..].to_string();
            return;
        }
    }

    /// Releases a held-back partial tag (the text ended, so it was no tag).
    pub fn finish(&mut self, out: &mut impl FnMut(TextKind, &str)) {
        if !self.pending.is_empty() {
            let kind = if self.inside {
                TextKind::Reasoning
            } else {
                TextKind::Answer
            };
            out(kind, &std::mem::take(&mut self.pending));
        }
    }
}

/// Whether a prompt leaves the model inside a think block: its text ends (bar
/// whitespace) with an opening `<think>`, as some templates' generation prompts do.
pub fn prompt_opens_think(tokenizer: &Tokenizer, prompt_ids: &[u32]) -> bool {
    let tail = &prompt_ids[prompt_ids.len().saturating_sub(8)..];
    tokenizer.decode(tail).trim_end().ends_with(THINK_OPEN)
}

/// Sorts pieces into the output's reasoning and answer text, with the answer's
/// leading newlines after a think block dropped (as chat templates do).
#[derive(Default)]
struct SplitText {
    reasoning: String,
    answer: String,
    after_think: bool,
}

impl SplitText {
    fn add(&mut self, kind: TextKind, text: &str) {
        match kind {
            TextKind::Reasoning => self.reasoning.push_str(text),
            TextKind::ThinkTag => self.after_think = true,
            TextKind::Answer if self.after_think && self.answer.is_empty() => {
                self.answer.push_str(text.trim_start_matches('\n'))
            }
            TextKind::Answer => self.answer.push_str(text),
        }
    }
}

/// Prefills `prompt_ids` and decodes up to `params.max_tokens` tokens, calling
/// `on_text` with each piece of finished text; returning false from it cancels.
pub fn generate(
    model: &dyn LanguageModel,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerationParameters,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    generate_split(model, tokenizer, prompt_ids, params, |_, t| on_text(t))
}

/// `generate`, with each piece marked as answer, reasoning or think tag.
pub fn generate_split(
    model: &dyn LanguageModel,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &GenerationParameters,
    on_piece: impl FnMut(TextKind, &str) -> bool,
) -> Result<GenerationOutput> {
    params.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::new("the prompt is empty (no tokens to condition on)"));
    }
    let ctx = model.config().max_position_embeddings;
    if prompt_ids.len() > ctx {
        return Err(Error::new(format!(
            "the prompt has {} tokens, more than the model's context of {ctx} tokens",
            prompt_ids.len()
        )));
    }
    // max_tokens may be anything the caller typed; the state is sized by the context.
    let max_seq = prompt_ids.len().saturating_add(params.max_tokens).min(ctx);
    let mut session = Session::new(model, max_seq, params.prefill_step_size)?;
    session.generate(model, tokenizer, prompt_ids, params, on_piece)
}

impl Session {
    /// Generates a reply to `prompt_ids` (the whole conversation so far), prefilling only
    /// what follows the cached prefix; the generated tokens fed back stay cached for the
    /// next turn. `on_piece` gets each piece of finished text; returning false cancels.
    pub fn generate(
        &mut self,
        model: &dyn LanguageModel,
        tokenizer: &Tokenizer,
        prompt_ids: &[u32],
        params: &GenerationParameters,
        mut on_piece: impl FnMut(TextKind, &str) -> bool,
    ) -> Result<GenerationOutput> {
        params.validate()?;
        if prompt_ids.len() > self.state.max_seq {
            return Err(Error::new(format!(
                "the prompt has {} tokens, more than the {} this session holds",
                prompt_ids.len(),
                self.state.max_seq
            )));
        }
        let mut sampler = Sampler::new(params);
        sampler.constrain(tokenizer)?;
        let mut row = LastRow::new(sampler.candidate_plan(), model.config().vocab_size);
        let mut scratch = SampleScratch::default();
        let t0 = Instant::now();
        let prefill_computed = self.prefill_row(model, prompt_ids, &mut row, &mut sampler)?;
        let prefill_seconds = t0.elapsed().as_secs_f64();

        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut generated = Vec::with_capacity(params.max_tokens.min(self.state.max_seq));
        let mut decoder = StreamDecoder::new(tokenizer);
        let mut stops = StopScanner::new(&params.stop_strings);
        let mut splitter = ThinkSplitter::new(prompt_opens_think(tokenizer, prompt_ids));
        let mut split = SplitText::default();
        let mut cancelled = false;
        // Sends settled pieces on; false once the caller cancels.
        let mut emit = |piece: &str, splitter: &mut ThinkSplitter, split: &mut SplitText, finish: bool| {
            let mut send = |kind: TextKind, text: &str| {
                split.add(kind, text);
                if !cancelled && !on_piece(kind, text) {
                    cancelled = true;
                }
            };
            splitter.push(piece, &mut send);
            if finish {
                splitter.finish(&mut send);
            }
            !cancelled
        };
        let eog = tokenizer.eog_ids();
        let mut stop_reason = StopReason::MaxTokens;
        let (mut reasoning_tokens, mut answer_tokens) = (0, 0);
        let mut decode_steps = 0;
        let t1 = Instant::now();
        while generated.len() < params.max_tokens {
            let next = row.sample(&mut sampler, &history, &mut scratch);
            if let Some(e) = sampler.constraint_error() {
                return Err(Error::new(format!("constrained output ended: {e}")));
            }
            if params.stop_on_eos && eog.contains(&next) {
                stop_reason = StopReason::EndOfGeneration;
                break;
            }
            if params.stop_token_ids.contains(&next) {
                stop_reason = StopReason::StopToken;
                break;
            }
            generated.push(next);
            history.push(next);
            let (piece, hit) = stops.push(&decoder.push(next));
            // A token is reasoning when any part of it lies in a think block (its tags
            // included): inside before it, or inside after it, or it closed one.
            let before = splitter.inside();
            let ok = emit(&piece, &mut splitter, &mut split, false);
            if before || splitter.inside() || piece.contains(THINK_CLOSE) {
                reasoning_tokens += 1;
            } else {
                answer_tokens += 1;
            }
            if !ok {
                stop_reason = StopReason::Cancelled;
                break;
            }
            if hit {
                stop_reason = StopReason::StopString;
                break;
            }
            if sampler.constraint_complete() {
                stop_reason = StopReason::EndOfGeneration;
                break;
            }
            if generated.len() >= params.max_tokens {
                break;
            }
            if self.state.pos >= self.state.max_seq {
                stop_reason = StopReason::ContextFull;
                break;
            }
            row.forward(model, &[next], &mut self.state, &mut sampler)?;
            self.tokens.push(next);
            decode_steps += 1;
        }
        let decode_seconds = t1.elapsed().as_secs_f64();
        let tail = if stop_reason != StopReason::StopString && stop_reason != StopReason::Cancelled {
            let (tail, _) = stops.push(&decoder.finish());
            tail + &stops.flush()
        } else {
            String::new()
        };
        emit(&tail, &mut splitter, &mut split, true);
        Ok(GenerationOutput {
            prompt_ids: prompt_ids.to_vec(),
            generated_ids: generated,
            text: stops.text,
            reasoning: split.reasoning.trim_matches('\n').to_string(),
            answer: split.answer,
            reasoning_tokens,
            answer_tokens,
            stop_reason,
            prefill_computed,
            prefill_seconds,
            decode_seconds,
            decode_steps,
            candidate_tokens: row.from_candidates,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn logprobs_are_the_raw_log_softmax_and_penalties_count_generated_tokens() {
        let p = GenerationParameters {
            temperature: 0.0,
            logprobs: Some(2),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        let mut scratch = SampleScratch::default();
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let (t, lp) = s.sample_with_logprobs(&mut logits.clone(), &[], &mut scratch);
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert!((lp.logprob as f64 - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[1].1 as f64 - (2.0 - lse)).abs() < 1e-6);
        // A frequency penalty of 1.5 makes greedy leave token 1 after it came once, and
        // the log-probability still comes from the raw logits.
        let p = GenerationParameters {
            temperature: 0.0,
            frequency_penalty: 1.5,
            logprobs: Some(0),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample_with(&mut logits.clone(), &[], &mut scratch), 1);
        let (t, lp) = s.sample_with_logprobs(&mut logits.clone(), &[], &mut scratch);
        assert_eq!(t, 2);
        assert!((lp.unwrap().logprob as f64 - (2.0 - lse)).abs() < 1e-6);
    }
    use super::*;

    fn scan(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopScanner::new(&stops);
        let mut out = String::new();
        for d in deltas {
            let (piece, hit) = s.push(d);
            out += &piece;
            if hit {
                return (out, true);
            }
        }
        out += &s.flush();
        (out, false)
    }

    #[test]
    fn stop_string_across_tokens_is_not_leaked() {
        assert_eq!(
            scan(&["END"], &["hello E", "N", "D more"]),
            ("hello ".to_string(), true)
        );
        assert_eq!(scan(&["\n\n"], &["a\n", "\nb"]), ("a".to_string(), true));
    }

    #[test]
    fn partial_stop_prefix_is_released_when_it_diverges() {
        assert_eq!(scan(&["END"], &["hello E", "N", "d"]), ("hello ENd".to_string(), false));
    }

    #[test]
    fn multibyte_text_near_stop_strings() {
        // "café" + "é" + "!x": the stop string starts at the second "é".
        assert_eq!(scan(&["é!"], &["café", "é", "!x"]), ("café".to_string(), true));
    }

    /// Runs the splitter over `deltas`; returns the pieces with neighbours of one kind
    /// merged, and checks that the pieces put together give the input back.
    fn split(starts_inside: bool, deltas: &[&str]) -> Vec<(TextKind, String)> {
        let mut s = ThinkSplitter::new(starts_inside);
        let mut got: Vec<(TextKind, String)> = Vec::new();
        let mut add = |k: TextKind, t: &str| {
            assert!(!t.is_empty(), "empty piece");
            match got.last_mut() {
                Some((lk, lt)) if *lk == k && k != TextKind::ThinkTag => lt.push_str(t),
                _ => got.push((k, t.to_string())),
            }
        };
        for d in deltas {
            s.push(d, &mut add);
        }
        s.finish(&mut add);
        let joined: String = got.iter().map(|p| p.1.as_str()).collect();
        assert_eq!(joined, deltas.concat());
        got
    }

    fn pieces(p: &[(TextKind, &str)]) -> Vec<(TextKind, String)> {
        p.iter().map(|(k, t)| (*k, t.to_string())).collect()
    }

    use TextKind::{Answer as A, Reasoning as R, ThinkTag as T};

    #[test]
    fn think_tags_split_across_tokens() {
        let want = pieces(&[(T, "<think>"), (R, "\nhmm, 2+2"), (T, "</think>"), (A, "\n\nIt is 4.")]);
        // Whole tags, tags cut at every place, and one character at a time.
        assert_eq!(
            split(false, &["<think>", "\nhmm, 2+2", "</think>", "\n\nIt is 4."]),
            want
        );
        assert_eq!(
            split(false, &["<th", "ink>\nhmm", ", 2+2<", "/", "think", ">\n\nIt is 4."]),
            want
        );
        let text = "<think>\nhmm, 2+2</think>\n\nIt is 4.";
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(|c| c.as_str()).collect();
        assert_eq!(split(false, &refs), want);
    }

    #[test]
    fn no_think_block_is_all_answer() {
        assert_eq!(
            split(false, &["a < b and ", "<thin", "g> is not a tag </think>"]),
            pieces(&[(A, "a < b and <thing> is not a tag </think>")])
        );
        // A held-back "<" is released as soon as the text rules the tag out.
        let mut s = ThinkSplitter::new(false);
        let mut out = Vec::new();
        s.push("x <", &mut |k, t: &str| out.push((k, t.to_string())));
        assert_eq!(out, pieces(&[(A, "x ")]));
        s.push("b", &mut |k, t: &str| out.push((k, t.to_string())));
        assert_eq!(out, pieces(&[(A, "x "), (A, "<b")]));
    }

    #[test]
    fn unterminated_think_stays_reasoning() {
        assert_eq!(
            split(false, &["<think>", "still going", " </thi"]),
            pieces(&[(T, "<think>"), (R, "still going </thi")])
        );
    }

    #[test]
    fn prompt_that_opened_think_starts_in_reasoning() {
        assert_eq!(
            split(true, &["step 1, ", "step 2</", "think>Done."]),
            pieces(&[(R, "step 1, step 2"), (T, "</think>"), (A, "Done.")])
        );
        // Multibyte text next to a partial tag.
        assert_eq!(split(true, &["é</", "thinké"]), pieces(&[(R, "é</thinké")]));
    }

    #[test]
    fn split_text_trims_like_a_template() {
        let mut st = SplitText::default();
        for (k, t) in split(false, &["<think>\nwhy\n</think>\n\n", "Because.\n"]) {
            st.add(k, &t);
        }
        assert_eq!(st.reasoning.trim_matches('\n'), "why");
        assert_eq!(st.answer, "Because.\n");
    }

    fn greedy_params() -> GenerationParameters {
        GenerationParameters {
            temperature: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(&greedy_params());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let p = GenerationParameters {
            repetition_penalty: 2.0,
            ..greedy_params()
        };
        let mut s = Sampler::new(&p);
        // Token 0 (logit 3) is halved below token 1 (2.5); a negative logit is doubled.
        let mut l = [3.0, 2.5, -1.0];
        assert_eq!(s.sample(&mut l, &[0, 2, 0]), 1);
        assert_eq!(l, [1.5, 2.5, -2.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let p = GenerationParameters {
            temperature: 1.0,
            top_k: 1,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.1, 5.0, 4.9], &[]), 2);
        }
        let p = GenerationParameters {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |p: &GenerationParameters| {
            let mut s = Sampler::new(p);
            (0..50)
                .map(|_| s.sample(&mut [0.0, 0.5, 1.0, 0.2, 0.9], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "T=1 should explore"
        );
        assert_ne!(
            a,
            draw(&GenerationParameters {
                seed: Some(43),
                ..p.clone()
            })
        );
    }

    /// A row of `vocab` logits in one of several shapes: spread out, few distinct values
    /// (ties everywhere), NaN / ±inf / ±0 sprinkled in, nearly flat (top-p needs many
    /// tokens), all NaN, all -inf.
    fn random_row(g: &mut Rng, vocab: usize, shape: usize) -> Vec<f32> {
        let u = |g: &mut Rng| g.next_f64() as f32 * 2.0 - 1.0;
        let scale = [1.0f32, 5.0, 30.0][g.next_u64() as usize % 3];
        let mut row: Vec<f32> = (0..vocab)
            .map(|_| match shape {
                1 => (u(g) * 3.0).round(),
                3 => 0.5 + u(g) * 1e-3,
                4 => f32::NAN,
                5 => f32::NEG_INFINITY,
                _ => u(g) * scale,
            })
            .collect();
        if shape == 2 {
            for v in row.iter_mut() {
                *v = match g.next_u64() % 20 {
                    0 | 1 => f32::NAN,
                    2 => f32::NEG_INFINITY,
                    3 => 0.0,
                    4 => -0.0,
                    _ => *v,
                };
            }
            if g.next_u64().is_multiple_of(4) {
                let i = g.next_u64() as usize % vocab;
                row[i] = f32::INFINITY;
            }
        }
        row
    }

    /// Whether the whole-row path's cumulative top-p probability comes within a hair of
    /// `top_p` (where a total summed in another order may move the cut by one token).
    fn near_top_p_boundary(row: &[f32], p: &GenerationParameters) -> bool {
        if p.top_p >= 1.0 || p.temperature == 0.0 {
            return false;
        }
        let inv_t = 1.0 / p.temperature;
        let mut v: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .filter(|c| !c.1.is_nan())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if v.is_empty() {
            return false;
        }
        v.sort_unstable_by(by_logit);
        let max = v[0].1;
        let w: Vec<f64> = v.iter().map(|c| (c.1 - max).exp() as f64).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0f64;
        w.iter().any(|&x| {
            acc += x / total;
            (acc - p.top_p as f64).abs() <= 1e-12
        })
    }

    /// The candidates' token equals the whole row's, bit for bit, over random rows and
    /// parameters (greedy, temperature, top-k, top-p, min-p, many seeds, k from 1 to the
    /// maximum), several draws each so the generators stay in step. Where the candidates
    /// do not decide, `sample_candidates` returns None, `decides` agrees, and the whole
    /// row gives the token. Top-p without a top-k within k adds the tail mass (summed in
    /// id order here, in sorted order by the whole-row path): rows where the cumulative
    /// probability lands within 1e-12 of top_p are counted, not compared.
    #[test]
    fn candidates_pick_the_token_the_whole_row_picks() {
        let mut g = Rng::new(2024);
        let (mut exact, mut with_tail, mut fell_back, mut near) = (0usize, 0usize, 0usize, 0usize);
        let mut sa = SampleScratch::default();
        let mut sb = SampleScratch::default();
        let mut scan = Vec::new();
        let pick = |g: &mut Rng, n: usize| g.next_u64() as usize % n;
        for case in 0..4000u64 {
            let vocab = [1usize, 3, 17, 200, 1500, 5000][pick(&mut g, 6)];
            let shape = if case.is_multiple_of(97) {
                4 + pick(&mut g, 2)
            } else {
                pick(&mut g, 4)
            };
            let row = random_row(&mut g, vocab, shape);
            let params = GenerationParameters {
                temperature: [0.0f32, 0.25, 0.7, 1.0, 1.6][pick(&mut g, 5)],
                top_k: [0usize, 0, 1, 2, 5, 40, 300, 1024][pick(&mut g, 8)],
                top_p: [1.0f32, 0.95, 0.6, 0.3][pick(&mut g, 4)],
                min_p: [0.0f32, 0.0, 0.05, 0.4][pick(&mut g, 4)],
                seed: Some(case),
                ..Default::default()
            };
            let k = [1usize, 2, 8, 64, ffai_kernels::ops::MAX_CANDIDATES][pick(&mut g, 5)];
            let mut full = Sampler::new(&params);
            let mut cands = Sampler::new(&params);
            let Some(plan) = cands.candidate_plan() else {
                // Only plain temperature sampling has no plan among these parameters.
                assert!(params.temperature > 0.0 && params.top_k == 0 && params.top_p == 1.0 && params.min_p == 0.0);
                continue;
            };
            let (mut ids, mut vals) = (vec![0u32; k], vec![0.0f32; k]);
            let tail = ffai_kernels::ops::top_candidates(&row, plan.inv_t, k, &mut ids, &mut vals);
            let nonnan = row.iter().filter(|l| !l.is_nan()).count();
            // Always decided: the list holds every value the whole-row path keeps.
            let is_exact = nonnan < k || (!plan.greedy && plan.top_k > 0 && plan.top_k <= k);
            let boundary = !is_exact && near_top_p_boundary(&row, &params);
            for draw in 0..3 {
                let want = full.sample_with(&mut row.clone(), &[], &mut sa);
                let decides = plan.decides(k, &ids, &vals, tail, &mut scan);
                let what = format!("case {case} draw {draw}: {params:?}, k {k}, shape {shape}, vocab {vocab}");
                match cands.sample_candidates(k, &ids, &vals, tail, &mut sb) {
                    Some(t) => {
                        assert!(decides, "{what}");
                        if boundary {
                            near += 1;
                            // Keep the generators in step whatever the token.
                            continue;
                        }
                        assert_eq!(t, want, "{what}");
                        if is_exact || plan.greedy {
                            exact += 1;
                        } else {
                            with_tail += 1;
                        }
                    }
                    None => {
                        assert!(!decides && !is_exact, "{what}");
                        if plan.greedy {
                            // Only when the largest value's ties fill the list.
                            assert!(vals.iter().all(|&v| v == vals[0]), "{what}");
                        }
                        assert_eq!(cands.sample_with(&mut row.clone(), &[], &mut sb), want, "{what}");
                        fell_back += 1;
                    }
                }
            }
        }
        // Every branch ran often enough to mean something.
        assert!(
            exact > 3000 && with_tail > 300 && fell_back > 100,
            "{exact} {with_tail} {fell_back} {near}"
        );
        assert!(near < 50, "{near} draws near the top-p boundary");
    }

    /// A grammar's mask on the candidates path (`ops::top_candidates_masked`: disallowed
    /// tokens left out) picks the token the whole-row path picks from the row with the
    /// disallowed logits at −∞ (what `Constraint::mask` does): greedy and sampled, masks
    /// from one allowed token to all, k below and above the allowed count, several draws
    /// each. Rows where nothing allowed is finite are degenerate (the whole-row draw's
    /// weights are NaN and it may return a disallowed id) and are left out of sampled
    /// cases, as +inf is (its weight is NaN too); greedy takes every row.
    #[test]
    fn masked_candidates_pick_the_token_the_masked_row_picks() {
        let mut g = Rng::new(77);
        let (mut decided, mut fell_back, mut few, mut plain) = (0usize, 0usize, 0usize, 0usize);
        let mut sa = SampleScratch::default();
        let mut sb = SampleScratch::default();
        let pick = |g: &mut Rng, n: usize| g.next_u64() as usize % n;
        for case in 0..3000u64 {
            let vocab = [3usize, 17, 200, 1500, 5000][pick(&mut g, 5)];
            let params = GenerationParameters {
                temperature: [0.0f32, 0.0, 0.7, 1.0, 1.6][pick(&mut g, 5)],
                top_k: [0usize, 0, 1, 5, 40, 1024][pick(&mut g, 6)],
                top_p: [1.0f32, 0.95, 0.6][pick(&mut g, 3)],
                min_p: [0.0f32, 0.0, 0.05][pick(&mut g, 3)],
                seed: Some(case),
                ..Default::default()
            };
            let greedy = params.temperature == 0.0;
            let shape = pick(&mut g, 4);
            let mut row = random_row(&mut g, vocab, shape);
            let wpr = vocab.div_ceil(32);
            let mut mask = vec![0u32; wpr];
            match pick(&mut g, 4) {
                0 => {
                    let t = pick(&mut g, vocab);
                    mask[t / 32] |= 1 << (t % 32);
                }
                1 => (0..vocab)
                    .filter(|_| pick(&mut g, 50) == 0)
                    .for_each(|t| mask[t / 32] |= 1 << (t % 32)),
                2 => mask.iter_mut().for_each(|w| *w = g.next_u64() as u32),
                _ => mask.fill(u32::MAX),
            }
            let allowed = |t: usize| mask[t / 32] >> (t % 32) & 1 != 0;
            if !greedy {
                row.iter_mut().filter(|v| **v == f32::INFINITY).for_each(|v| *v = 30.0);
                if !(0..vocab).any(|t| allowed(t) && row[t].is_finite()) {
                    continue;
                }
            } else if !(0..vocab).any(allowed) {
                continue;
            }
            let masked_row: Vec<f32> = row
                .iter()
                .enumerate()
                .map(|(t, &l)| if allowed(t) { l } else { f32::NEG_INFINITY })
                .collect();
            let mut full = Sampler::new(&params);
            let mut cands = Sampler::new(&params);
            // The plan a grammar's sampler gets (plain temperature sampling included: a
            // sampler without a grammar has none for it).
            let plan = cands.candidate_plan().unwrap_or(CandidatePlan {
                inv_t: 1.0 / params.temperature,
                masked: true,
                greedy: false,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
            });
            plain += (!greedy && params.top_k == 0 && params.top_p == 1.0 && params.min_p == 0.0) as usize;
            let k = [plan.k(), 2, 64][pick(&mut g, 3)].max(plan.k().min(2));
            let (mut ids, mut vals) = (vec![0u32; k], vec![0.0f32; k]);
            let tail = ffai_kernels::ops::top_candidates_masked(&row, Some(&mask), plan.inv_t, k, &mut ids, &mut vals);
            let n_allowed = (0..vocab).filter(|&t| allowed(t) && !row[t].is_nan()).count();
            few += (n_allowed < k) as usize;
            let boundary = near_top_p_boundary(&masked_row, &params);
            for draw in 0..3 {
                let want = full.sample_with(&mut masked_row.clone(), &[], &mut sa);
                let what = format!("case {case} draw {draw}: {params:?}, k {k}, vocab {vocab}, allowed {n_allowed}");
                match cands.sample_plan(plan, k, &ids, &vals, tail, &mut sb) {
                    Some(t) => {
                        if boundary && !greedy {
                            continue;
                        }
                        assert_eq!(t, want, "{what}");
                        if n_allowed > 0 && !greedy {
                            assert!(allowed(t as usize), "{what}: disallowed {t}");
                        }
                        decided += 1;
                    }
                    None => {
                        assert!(n_allowed >= k, "{what}: fewer allowed than k must decide");
                        assert_eq!(cands.sample_with(&mut masked_row.clone(), &[], &mut sb), want, "{what}");
                        fell_back += 1;
                    }
                }
            }
        }
        assert!(
            decided > 3000 && fell_back > 50 && few > 500 && plain > 100,
            "{decided} {fell_back} {few} {plain}"
        );
    }

    #[test]
    fn no_candidate_plan_where_the_whole_row_matters() {
        let base = GenerationParameters {
            temperature: 0.7,
            top_k: 40,
            ..Default::default()
        };
        assert!(Sampler::new(&base).candidate_plan().is_some());
        for p in [
            GenerationParameters {
                repetition_penalty: 1.1,
                ..base.clone()
            },
            GenerationParameters {
                presence_penalty: 0.5,
                ..base.clone()
            },
            GenerationParameters {
                frequency_penalty: 0.5,
                ..base.clone()
            },
            GenerationParameters {
                logprobs: Some(0),
                ..base.clone()
            },
            GenerationParameters {
                top_k: ffai_kernels::ops::MAX_CANDIDATES + 1,
                ..base.clone()
            },
            // Plain temperature sampling: the draw may land anywhere in the row.
            GenerationParameters {
                top_k: 0,
                ..base.clone()
            },
            // 1/T overflows to infinity.
            GenerationParameters {
                temperature: 1e-39,
                ..base.clone()
            },
        ] {
            assert!(Sampler::new(&p).candidate_plan().is_none(), "{p:?}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.6 keeps only the first.
        let logits = [4.0f32, 3.0, 2.0, 0.9];
        let p = GenerationParameters {
            temperature: 1.0,
            top_p: 0.6,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert!((0..100).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        // min_p 0.3: tokens below 0.3 * p(top) (0.37 relative to e^-1) go: only 0 and 1 remain.
        let p = GenerationParameters {
            temperature: 1.0,
            min_p: 0.3,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        let seen: std::collections::HashSet<u32> = (0..300).map(|_| s.sample(&mut logits.clone(), &[])).collect();
        assert_eq!(seen, [0u32, 1].into_iter().collect());
    }
}
