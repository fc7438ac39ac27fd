//! Perplexity and KL divergence on real checkpoints over an English text every Debian
//! machine has (the GPL-3 in /usr/share/common-licenses).

mod common;

use std::sync::OnceLock;

use common::{real_model, GEMMA3, SMOLLM2};
use ffai::quality::{self, WindowSpec};
use ffai::{LoadOptions, Model};

const TEXT: &str = "/usr/share/common-licenses/GPL-3";

fn smollm2() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(real_model(SMOLLM2).to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn gpl_tokens(m: &Model) -> Vec<u32> {
    let text = std::fs::read_to_string(TEXT).expect("the GPL-3 text of Debian's common-licenses");
    m.tokenizer.encode(&text, false).unwrap()
}

fn spec(m: &Model, context: usize, windows: usize) -> WindowSpec {
    WindowSpec {
        max_windows: Some(windows),
        ..WindowSpec::for_model(m, context)
    }
}

#[test]
fn smollm2_perplexity_on_the_gpl_is_finite_and_sane() {
    let m = smollm2();
    let tokens = gpl_tokens(m);
    assert!(tokens.len() > 5000, "{}", tokens.len());
    let p = quality::perplexity(&*m.lm, &tokens, &spec(m, 256, 2)).unwrap();
    println!("SmolLM2 Q4_1 perplexity on the GPL-3 (2 windows of 256): {p:?}");
    assert_eq!(p.windows, 2);
    // Each window scores its second half: positions 128..254 predict tokens 129..255.
    assert_eq!(p.tokens_scored, 2 * 127);
    assert!(p.perplexity.is_finite());
    // Legal English a 135M model has seen plenty of: far better than chance (49152) and
    // than a unigram model (hundreds), not implausibly good.
    assert!((3.0..60.0).contains(&p.perplexity), "{}", p.perplexity);
    assert!((p.mean_nll.exp() - p.perplexity).abs() < 1e-9);
    // More context helps: the same model on windows of 32 is worse.
    let short = quality::perplexity(&*m.lm, &tokens, &spec(m, 32, 16)).unwrap();
    assert!(
        short.perplexity > p.perplexity,
        "{} vs {}",
        short.perplexity,
        p.perplexity
    );
}

#[test]
fn perplexity_equals_a_direct_computation() {
    // One window of 16 tokens, computed here from one all-logits forward pass.
    let m = smollm2();
    let tokens = gpl_tokens(m);
    let s = spec(m, 16, 1);
    let p = quality::perplexity(&*m.lm, &tokens, &s).unwrap();
    let mut win = tokens[..16].to_vec();
    if let Some(b) = s.bos {
        win[0] = b;
    }
    let mut st = m.lm.new_state(16, 16).unwrap();
    let mut logits = Vec::new();
    m.lm.forward(&win, &mut st, true, &mut logits).unwrap();
    let v = m.lm.config().vocab_size;
    let mut nll = 0.0f64;
    for pos in 8..15 {
        let row = &logits[pos * v..(pos + 1) * v];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        nll += z.ln() - row[win[pos + 1] as usize] as f64;
    }
    let direct = (nll / 7.0).exp();
    assert_eq!(p.tokens_scored, 7);
    assert!(
        (p.perplexity - direct).abs() < 1e-3 * direct,
        "{} vs {direct}",
        p.perplexity
    );
}

#[test]
fn a_model_against_itself_has_zero_divergence() {
    let m = smollm2();
    let tokens = gpl_tokens(m);
    quality::check_same_vocab(m, m).unwrap();
    let d = quality::divergence(&*m.lm, &*m.lm, &tokens, &spec(m, 128, 2)).unwrap();
    assert_eq!(d.tokens_scored, 2 * 63);
    assert_eq!(d.mean_kld, 0.0);
    assert_eq!(d.max_kld, 0.0);
    assert_eq!(d.top1_agreement, 1.0);
    assert_eq!(d.perplexity, d.ref_perplexity);
}

#[test]
fn models_with_other_vocabularies_are_refused() {
    let a = smollm2();
    let b = Model::load(real_model(GEMMA3).to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = quality::check_same_vocab(a, &b).unwrap_err();
    assert!(e.message().contains("vocabularies differ"), "{}", e.message());
}

#[test]
fn too_short_a_text_is_a_clear_error() {
    let m = smollm2();
    let e = quality::perplexity(&*m.lm, &[1, 2, 3], &spec(m, 512, 1)).unwrap_err();
    assert!(e.message().contains("fewer than one window"), "{}", e.message());
    let e = quality::perplexity(&*m.lm, &[1; 100], &spec(m, 4, 1)).unwrap_err();
    assert!(e.message().contains("at least 8"), "{}", e.message());
}
