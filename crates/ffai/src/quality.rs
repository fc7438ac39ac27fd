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

    #[test]
    fn quantiles() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }
}
