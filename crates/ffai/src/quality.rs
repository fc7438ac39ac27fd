//! Output quality measured on a text: perplexity of one model, and the KL divergence of a
//! model's next-token distributions from a reference model's (e.g. a quantized copy
//! against the full-precision one).
//!
//! Windowing (llama.cpp's `perplexity` scheme): the token sequence is cut into
//! non-overlapping windows of `context` tokens; each window is evaluated from an empty
//! cache, its first token replaced by BOS when the tokenizer adds one, and only the
//! predictions in its second half are scored (tokens `context/2 + 1 .. context`), so
//! every scored token sees at least `context/2` tokens of context. Tokens past the last
//! whole window are not used.
//!
//! All log-softmax arithmetic is in f64; logits stay the model's f32.

use crate::error::{Error, Result};
use crate::models::{InferenceState, LanguageModel};
use crate::{ensure, Model};

/// Tokens per forward pass with all-position logits; bounds the logits buffer at
/// `PIECE * vocab` floats (64 MiB for a 262k vocabulary).
const PIECE: usize = 64;

/// How a text is cut into windows.
#[derive(Clone, Copy, Debug)]
pub struct WindowSpec {
    /// Tokens per window.
    pub context: usize,
    /// Replace each window's first token by this id (the tokenizer's BOS, if it adds one).
    pub bos: Option<u32>,
    /// Evaluate at most this many windows (None: all whole windows).
    pub max_windows: Option<usize>,
}

impl WindowSpec {
    /// The windowing a model's tokenizer implies: BOS first when it adds one by default.
    pub fn for_model(model: &Model, context: usize) -> WindowSpec {
        let bos = if model.tokenizer.add_bos_default() {
            model.tokenizer.bos_id()
        } else {
            None
        };
        WindowSpec {
            context,
            bos,
            max_windows: None,
        }
    }

    /// Position of the first scored prediction in a window (its logits predict the next).
    fn first(&self) -> usize {
        self.context / 2
    }

    /// Scored tokens per window.
    pub fn scored_per_window(&self) -> usize {
        self.context - 1 - self.first()
    }

    fn windows(&self, n_tokens: usize) -> usize {
        let n = n_tokens / self.context;
        self.max_windows.map_or(n, |m| n.min(m))
    }

    fn check(&self, lm: &dyn LanguageModel, n_tokens: usize) -> Result<usize> {
        ensure!(
            self.context >= 8,
            "the context must be at least 8 tokens, not {}",
            self.context
        );
        let max = lm.config().max_position_embeddings;
        ensure!(
            self.context <= max,
            "the context of {} tokens exceeds the model's {max}",
            self.context
        );
        let n = self.windows(n_tokens);
        ensure!(
            n > 0,
            "the text has {n_tokens} tokens, fewer than one window of {} (use a longer text or a smaller --context)",
            self.context
        );
        Ok(n)
    }

    /// Window `w` of the tokens, with its first token replaced by BOS when configured.
    fn window(&self, tokens: &[u32], w: usize) -> Vec<u32> {
        let mut win = tokens[w * self.context..(w + 1) * self.context].to_vec();
        if let Some(b) = self.bos {
            win[0] = b;
        }
        win
    }
}

/// Runs one window through a model and hands out the logits of the scored positions,
/// a piece at a time, so memory stays `PIECE * vocab` whatever the context.
struct WindowRun<'a> {
    lm: &'a dyn LanguageModel,
    vocab: usize,
    state: InferenceState,
    logits: Vec<f32>,
    /// Rows now in `logits`.
    rows: usize,
    /// Next position of the window to feed.
    next: usize,
}

impl<'a> WindowRun<'a> {
    /// Feeds the window up to and including the first scored position; its logits are
    /// the first row.
    fn start(lm: &'a dyn LanguageModel, win: &[u32], spec: &WindowSpec) -> Result<WindowRun<'a>> {
        let vocab = lm.config().vocab_size;
        let mut state = lm.new_state(spec.context, spec.context.min(512))?;
        let mut logits = Vec::new();
        let first = spec.first();
        lm.forward(&win[..=first], &mut state, false, &mut logits)?;
        ensure!(
            logits.len() == vocab,
            "the model returned {} logits, expected {vocab}",
            logits.len()
        );
        Ok(WindowRun {
            lm,
            vocab,
            state,
            logits,
            rows: 1,
            next: first + 1,
        })
    }

    /// Feeds the next piece of positions; false when every scored position was handed out.
    /// The last token of the window is never fed: nothing after it is scored.
    fn advance(&mut self, win: &[u32]) -> Result<bool> {
        let end = (self.next + PIECE).min(win.len() - 1);
        if self.next >= end {
            return Ok(false);
        }
        self.lm
            .forward(&win[self.next..end], &mut self.state, true, &mut self.logits)?;
        self.rows = end - self.next;
        ensure!(
            self.logits.len() == self.rows * self.vocab,
            "the model returned {} logits for {} positions of a {}-token vocabulary",
            self.logits.len(),
            self.rows,
            self.vocab
        );
        self.next = end;
        Ok(true)
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.logits[r * self.vocab..(r + 1) * self.vocab]
    }

    /// Window position whose logits are row 0 of the current piece.
    fn row0_pos(&self) -> usize {
        self.next - self.rows
    }
}

/// `log(sum(exp(x)))` in f64, stable.
fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    m + s.ln()
}

/// Index of the largest logit (first on ties).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Perplexity of a model over a token sequence.
#[derive(Clone, Debug)]
pub struct Perplexity {
    pub context: usize,
    pub windows: usize,
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// Standard error of `mean_nll`.
    pub nll_stderr: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
}

fn check_logits_finite(row: &[f32], pos: usize, window: usize) -> Result<()> {
    if let Some(i) = row.iter().position(|v| !v.is_finite()) {
        return Err(Error::new(format!(
            "the model produced a non-finite logit (token {i}) at position {pos} of window {window}"
        )));
    }
    Ok(())
}

/// Perplexity of `lm` over `tokens`, windowed as `spec` says.
pub fn perplexity(lm: &dyn LanguageModel, tokens: &[u32], spec: &WindowSpec) -> Result<Perplexity> {
    let n_windows = spec.check(lm, tokens.len())?;
    let mut nll = Vec::with_capacity(n_windows * spec.scored_per_window());
    for w in 0..n_windows {
        let win = spec.window(tokens, w);
        let mut run = WindowRun::start(lm, &win, spec)?;
        loop {
            for r in 0..run.rows {
                let pos = run.row0_pos() + r;
                let row = run.row(r);
                check_logits_finite(row, pos, w)?;
                let target = win[pos + 1] as usize;
                ensure!(
                    target < row.len(),
                    "token id {target} is outside the model's vocabulary"
                );
                nll.push(log_sum_exp(row) - row[target] as f64);
            }
            if !run.advance(&win)? {
                break;
            }
        }
    }
    let (mean, stderr) = mean_and_stderr(&nll);
    Ok(Perplexity {
        context: spec.context,
        windows: n_windows,
        tokens_scored: nll.len(),
        mean_nll: mean,
        nll_stderr: stderr,
        perplexity: mean.exp(),
    })
}

fn mean_and_stderr(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// How far a model's next-token distributions are from a reference model's.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub context: usize,
    pub windows: usize,
    pub tokens_scored: usize,
    /// Mean of KL(reference || model) per position, in nats.
    pub mean_kld: f64,
    pub kld_stderr: f64,
    pub median_kld: f64,
    pub p99_kld: f64,
    pub max_kld: f64,
    /// Share of positions (0..1) where both models' most likely token is the same.
    pub top1_agreement: f64,
    /// Positions where the reference's top token leads its runner-up by at least
    /// [`DECISIVE_MARGIN`] in probability, and the top-1 agreement over those alone. A
    /// near-tie flips under any rounding; a decisive prediction should not.
    pub decisive_positions: usize,
    pub top1_agreement_decisive: f64,
    /// Perplexity of the model and of the reference over the same scored tokens.
    pub perplexity: f64,
    pub ref_perplexity: f64,
}

/// KL(P_ref || P_model) of two rows of logits, in f64; also both log-probs of `target`.
fn kl_row(model: &[f32], reference: &[f32], target: usize) -> (f64, f64, f64) {
    let lz_m = log_sum_exp(model);
    let lz_r = log_sum_exp(reference);
    let mut kl = 0.0f64;
    for (&m, &r) in model.iter().zip(reference) {
        let lr = r as f64 - lz_r;
        let lm = m as f64 - lz_m;
        kl += lr.exp() * (lr - lm);
    }
    // Rounding can leave a tiny negative sum for (near-)identical rows.
    (
        kl.max(0.0),
        model[target] as f64 - lz_m,
        reference[target] as f64 - lz_r,
    )
}

/// Value at quantile `q` (0..1) of sorted values: the smallest value with at least a
/// `q` share of values at or below it.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let k = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[k - 1]
}

/// Probability lead of the reference's top token over its runner-up that makes a
/// position count as decisive (see [`Divergence::top1_agreement_decisive`]).
pub const DECISIVE_MARGIN: f64 = 0.1;

/// The probability lead of the top entry of `logits` over the second.
fn top_margin(logits: &[f32]) -> f64 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    let lz = log_sum_exp(logits);
    (a as f64 - lz).exp() - (b as f64 - lz).exp()
}

/// Compares `lm` with `reference` over `tokens`: both run the same windows in lockstep.
/// The caller checks the two share a vocabulary (see `check_same_vocab`).
pub fn divergence(
    lm: &dyn LanguageModel,
    reference: &dyn LanguageModel,
    tokens: &[u32],
    spec: &WindowSpec,
) -> Result<Divergence> {
    let n_windows = spec.check(lm, tokens.len())?;
    spec.check(reference, tokens.len())?;
    let (va, vb) = (lm.config().vocab_size, reference.config().vocab_size);
    ensure!(
        va == vb,
        "the models' vocabularies differ in size ({va} vs {vb} tokens)"
    );
    let cap = n_windows * spec.scored_per_window();
    let (mut klds, mut nll, mut ref_nll) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    let (mut agree, mut decisive, mut agree_decisive) = (0usize, 0usize, 0usize);
    for w in 0..n_windows {
        let win = spec.window(tokens, w);
        let mut a = WindowRun::start(lm, &win, spec)?;
        let mut b = WindowRun::start(reference, &win, spec)?;
        loop {
            for r in 0..a.rows {
                let pos = a.row0_pos() + r;
                let (ra, rb) = (a.row(r), b.row(r));
                check_logits_finite(ra, pos, w)?;
                check_logits_finite(rb, pos, w).map_err(|e| e.context("reference"))?;
                let target = win[pos + 1] as usize;
                ensure!(target < va, "token id {target} is outside the models' vocabulary");
                let (kl, lp, lp_ref) = kl_row(ra, rb, target);
                klds.push(kl);
                nll.push(-lp);
                ref_nll.push(-lp_ref);
                let same = argmax(ra) == argmax(rb);
                agree += usize::from(same);
                if top_margin(rb) >= DECISIVE_MARGIN {
                    decisive += 1;
                    agree_decisive += usize::from(same);
                }
            }
            let more = a.advance(&win)?;
            let more_ref = b.advance(&win)?;
            debug_assert_eq!(more, more_ref);
            if !more {
                break;
            }
        }
    }
    let (mean, stderr) = mean_and_stderr(&klds);
    let mut sorted = klds.clone();
    sorted.sort_by(f64::total_cmp);
    let n = klds.len();
    Ok(Divergence {
        context: spec.context,
        windows: n_windows,
        tokens_scored: n,
        mean_kld: mean,
        kld_stderr: stderr,
        median_kld: quantile(&sorted, 0.5),
        p99_kld: quantile(&sorted, 0.99),
        max_kld: sorted[n - 1],
        top1_agreement: agree as f64 / n as f64,
        decisive_positions: decisive,
        top1_agreement_decisive: if decisive == 0 {
            1.0
        } else {
            agree_decisive as f64 / decisive as f64
        },
        perplexity: mean_and_stderr(&nll).0.exp(),
        ref_perplexity: mean_and_stderr(&ref_nll).0.exp(),
    })
}

/// Two models can be compared token by token only if ids mean the same text in both.
pub fn check_same_vocab(a: &Model, b: &Model) -> Result<()> {
    let (ta, tb) = (&a.tokenizer, &b.tokenizer);
    let (na, nb) = (a.lm.config().vocab_size, b.lm.config().vocab_size);
    ensure!(
        na == nb,
        "the models' output vocabularies differ in size ({na} vs {nb} tokens): they cannot be compared"
    );
    ensure!(
        ta.vocab_size() == tb.vocab_size(),
        "the models' tokenizers differ in size ({} vs {} tokens): they cannot be compared",
        ta.vocab_size(),
        tb.vocab_size()
    );
    for id in 0..ta.vocab_size() as u32 {
        let (x, y) = (ta.token_bytes(id), tb.token_bytes(id));
        ensure!(
            x == y,
            "the models' tokenizers differ at token {id} ({:?} vs {:?}): they cannot be compared",
            String::from_utf8_lossy(&x),
            String::from_utf8_lossy(&y)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_matches_the_definition() {
        let x = [1.0f32, -2.0, 0.5, 3.0];
        let direct: f64 = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&x) - direct).abs() < 1e-12);
        // Large logits must not overflow.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn kl_row_matches_a_direct_sum() {
        let m = [0.3f32, -1.0, 2.0, 0.0];
        let r = [1.0f32, 0.5, -0.5, 0.2];
        let p = |x: &[f32]| {
            let z: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
            x.iter().map(|&v| (v as f64).exp() / z).collect::<Vec<_>>()
        };
        let (pm, pr) = (p(&m), p(&r));
        let want: f64 = pr.iter().zip(&pm).map(|(a, b)| a * (a / b).ln()).sum();
        let (kl, lp, lpr) = kl_row(&m, &r, 2);
        assert!((kl - want).abs() < 1e-12, "{kl} vs {want}");
        assert!((lp - pm[2].ln()).abs() < 1e-12);
        assert!((lpr - pr[2].ln()).abs() < 1e-12);
        assert_eq!(kl_row(&m, &m, 0).0, 0.0);
    }

    // ------------------------------------------------------------------------------
    // `perplexity` and `divergence` end to end on stand-in models whose logits are known
    // here, against a computation written independently of the module: windows, BOS,
    // scored positions, pieces of `PIECE` rows, KL direction and every statistic.

    use crate::config::ModelConfig;
    use crate::generate::GenerationParameters;

    const STUB_VOCAB: usize = 23;
    const STUB_SEED: u64 = 0x5EED;

    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The hash of a token sequence, extended by one token.
    fn chain(h: u64, token: u32) -> u64 {
        mix(h ^ mix(u64::from(token) + 1))
    }

    /// A uniform value in [-1, 1) drawn from `h`, `v` and `k`.
    fn unit(h: u64, v: usize, k: u64) -> f64 {
        (mix(h ^ mix(((v as u64) << 8) | k)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// The logits a stand-in model gives after the sequence hashed to `h`: base logits in
    /// [-3, 3), plus `skew` times a second draw (so two models with different skews
    /// disagree by a known amount), and at a quarter of the positions one token raised
    /// by 4 (so that some predictions are decisive).
    fn stub_row(h: u64, skew: f32) -> Vec<f32> {
        let peak = (mix(h) % (4 * STUB_VOCAB as u64)) as usize;
        (0..STUB_VOCAB)
            .map(|v| {
                let base = 3.0 * unit(h, v, 0) + if v == peak { 4.0 } else { 0.0 };
                base as f32 + skew * unit(h, v, 1) as f32
            })
            .collect()
    }

    /// A language model whose logits after a sequence are `stub_row(hash of the
    /// sequence, skew)`: they depend on every token fed since `new_state`, so a wrong
    /// window, a missing BOS or a skipped piece changes them.
    struct Stub {
        cfg: ModelConfig,
        skew: f32,
    }

    impl Stub {
        fn new(skew: f32) -> Stub {
            let cfg = ModelConfig::from_hf_json(
                &serde_json::json!({
                    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                    "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                    "num_attention_heads": 1, "num_key_value_heads": 1,
                    "vocab_size": STUB_VOCAB, "max_position_embeddings": 4096
                }),
                "stub",
            )
            .unwrap();
            Stub { cfg, skew }
        }
    }

    impl LanguageModel for Stub {
        fn config(&self) -> &ModelConfig {
            &self.cfg
        }
        fn family(&self) -> &'static str {
            "stub"
        }
        fn variant(&self) -> &'static str {
            "stub"
        }
        fn default_parameters(&self) -> GenerationParameters {
            GenerationParameters::default()
        }
        fn device_name(&self) -> String {
            "none".into()
        }
        fn kv_bytes_by_kind(&self, _: usize, _: usize) -> Vec<(String, usize, usize)> {
            Vec::new()
        }
        // The stub scores one sequence through its own `forward`; it has no batch.
        fn kv_windows(&self) -> Vec<usize> {
            Vec::new()
        }
        fn memory_bytes(&self) -> u64 {
            u64::MAX
        }
        fn kv_block_bytes(&self, _: usize) -> Vec<u64> {
            Vec::new()
        }
        fn new_batch(&self, _: &crate::models::BatchShape) -> Result<crate::models::BatchState> {
            Err(crate::Error::new("the stub model has no batched forward"))
        }
        fn forward_batch(
            &self,
            _: &[u32],
            _: &ffai_kernels::backend::StepLayout,
            _: &[u32],
            _: &mut crate::models::BatchState,
            _: &mut crate::inspect::Tap,
            _: crate::models::StepOut<'_>,
        ) -> Result<()> {
            Err(crate::Error::new("the stub model has no batched forward"))
        }
        fn new_state(&self, max_seq: usize, chunk: usize) -> Result<InferenceState> {
            Ok(InferenceState {
                pos: 0,
                max_seq,
                chunk,
                tap: Default::default(),
                inner: Box::new(STUB_SEED),
            })
        }
        fn forward(
            &self,
            tokens: &[u32],
            state: &mut InferenceState,
            all_logits: bool,
            logits: &mut Vec<f32>,
        ) -> Result<()> {
            ensure!(state.pos + tokens.len() <= state.max_seq, "past the context");
            let h = state.inner.downcast_mut::<u64>().unwrap();
            logits.clear();
            for (i, &t) in tokens.iter().enumerate() {
                *h = chain(*h, t);
                if all_logits || i + 1 == tokens.len() {
                    logits.extend(stub_row(*h, self.skew));
                }
            }
            state.pos += tokens.len();
            Ok(())
        }
        fn can_rewind(&self, _: &InferenceState, _: usize) -> bool {
            false
        }
    }

    /// What one scored position contributes, computed here in f64 from the definitions.
    struct Scored {
        kl: f64,
        nll: f64,
        ref_nll: f64,
        same_top: bool,
        decisive: bool,
    }

    /// Every scored position of `tokens` for a model of skew `skew` against one of skew
    /// `ref_skew`: windows of `context` tokens from the start (the rest unused), the first
    /// token replaced by `bos`, predictions of tokens `context/2 + 1 ..= context - 1`.
    fn by_hand(tokens: &[u32], context: usize, bos: Option<u32>, skew: f32, ref_skew: f32) -> Vec<Scored> {
        let mut out = Vec::new();
        for win in tokens.chunks_exact(context) {
            let mut win = win.to_vec();
            if let Some(b) = bos {
                win[0] = b;
            }
            let mut h = STUB_SEED;
            for pos in 0..context - 1 {
                h = chain(h, win[pos]);
                if pos < context / 2 {
                    continue;
                }
                let probs = |row: Vec<f32>| {
                    let e: Vec<f64> = row.iter().map(|&x| f64::from(x).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
                };
                let (p, q) = (probs(stub_row(h, ref_skew)), probs(stub_row(h, skew)));
                let top = |x: &[f64]| (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b });
                let mut sorted = p.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let target = win[pos + 1] as usize;
                out.push(Scored {
                    kl: p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum(),
                    nll: -q[target].ln(),
                    ref_nll: -p[target].ln(),
                    same_top: top(&p) == top(&q),
                    decisive: sorted[0] - sorted[1] >= 0.1,
                });
            }
        }
        out
    }

    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        s / n as f64
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
    }

    /// The text: ids spread over the stub vocabulary, 3 whole windows of 200 and 57
    /// tokens beyond.
    fn stub_tokens() -> Vec<u32> {
        (0..657u64).map(|i| (mix(i) % STUB_VOCAB as u64) as u32).collect()
    }

    #[test]
    fn divergence_equals_a_hand_computation_on_stand_in_models() {
        let tokens = stub_tokens();
        let (model, reference) = (Stub::new(1.5), Stub::new(0.0));
        for (bos, max_windows) in [(Some(5), None), (None, Some(2))] {
            let context = 200;
            let spec = WindowSpec {
                context,
                bos,
                max_windows,
            };
            let d = divergence(&model, &reference, &tokens, &spec).unwrap();
            let n_win = max_windows.unwrap_or(3);
            let want = by_hand(&tokens[..n_win * context], context, bos, 1.5, 0.0);
            let n = want.len();
            assert_eq!(n, n_win * 99);
            assert_eq!((d.windows, d.tokens_scored, d.context), (n_win, n, context));
            let kl: Vec<f64> = want.iter().map(|s| s.kl).collect();
            let mean_kl = mean(kl.iter().copied());
            let var = kl.iter().map(|x| (x - mean_kl).powi(2)).sum::<f64>() / (n - 1) as f64;
            assert!(
                close(d.mean_kld, mean_kl),
                "{bos:?}: mean KL {} vs {mean_kl}",
                d.mean_kld
            );
            assert!(close(d.kld_stderr, (var / n as f64).sqrt()));
            // Quantiles by their definition: the smallest value with at least that share
            // of the values at or below it.
            let q = |share: f64| {
                kl.iter()
                    .copied()
                    .filter(|&v| kl.iter().filter(|&&x| x <= v).count() as f64 >= share * n as f64)
                    .fold(f64::INFINITY, f64::min)
            };
            assert!(close(d.median_kld, q(0.5)), "median {} vs {}", d.median_kld, q(0.5));
            assert!(close(d.p99_kld, q(0.99)));
            assert!(close(d.max_kld, kl.iter().copied().fold(0.0, f64::max)));
            let agree = want.iter().filter(|s| s.same_top).count();
            assert_eq!(d.top1_agreement, agree as f64 / n as f64);
            let decisive: Vec<&Scored> = want.iter().filter(|s| s.decisive).collect();
            assert_eq!(d.decisive_positions, decisive.len());
            let agree_decisive = decisive.iter().filter(|s| s.same_top).count();
            assert_eq!(d.top1_agreement_decisive, agree_decisive as f64 / decisive.len() as f64);
            assert!(close(d.perplexity, mean(want.iter().map(|s| s.nll)).exp()));
            assert!(close(d.ref_perplexity, mean(want.iter().map(|s| s.ref_nll)).exp()));
            // The case exercises what it should: a clearly non-zero divergence, both
            // agreeing and disagreeing tops, decisive and near-tie positions.
            assert!(mean_kl > 0.1, "{mean_kl}");
            assert!(0 < agree && agree < n, "{agree}/{n}");
            assert!(!decisive.is_empty() && decisive.len() < n);
            // KL is not symmetric: the reference must be the first argument of KL(P || Q).
            let swapped = by_hand(&tokens[..n_win * context], context, bos, 0.0, 1.5);
            assert!((mean(swapped.iter().map(|s| s.kl)) - mean_kl).abs() > 1e-3);
        }
        // A model against itself: exactly zero.
        let spec = WindowSpec {
            context: 64,
            bos: None,
            max_windows: None,
        };
        let d = divergence(&model, &model, &tokens, &spec).unwrap();
        assert_eq!((d.mean_kld, d.max_kld, d.top1_agreement), (0.0, 0.0, 1.0));
    }

    #[test]
    fn perplexity_equals_a_hand_computation_on_a_stand_in_model() {
        let tokens = stub_tokens();
        let m = Stub::new(0.7);
        for (context, bos) in [(200, Some(3)), (200, None), (10, Some(0))] {
            let spec = WindowSpec {
                context,
                bos,
                max_windows: None,
            };
            let p = perplexity(&m, &tokens, &spec).unwrap();
            let want = by_hand(&tokens, context, bos, 0.7, 0.0);
            let nll: Vec<f64> = want.iter().map(|s| s.nll).collect();
            let n = nll.len();
            assert_eq!(n, tokens.len() / context * (context - 1 - context / 2));
            assert_eq!((p.tokens_scored, p.windows), (n, tokens.len() / context));
            let mean_nll = mean(nll.iter().copied());
            let var = nll.iter().map(|x| (x - mean_nll).powi(2)).sum::<f64>() / (n - 1) as f64;
            assert!(
                close(p.mean_nll, mean_nll),
                "{context} {bos:?}: {} vs {mean_nll}",
                p.mean_nll
            );
            assert!(close(p.nll_stderr, (var / n as f64).sqrt()));
            assert!(close(p.perplexity, mean_nll.exp()));
        }
    }

    #[test]
    fn quantiles() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }
}
