//! `ffai perplexity` and `ffai kld`: output quality of a model on a text file.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use ffai::quality::{self, WindowSpec};
use ffai::{Error, Model, Result};

use crate::ModelArgs;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
}

#[derive(Args)]
pub struct KldArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The reference model (e.g. the unquantized checkpoint); it must share the tokenizer.
    #[arg(long = "ref")]
    reference: String,
    #[command(flatten)]
    text: TextArgs,
}

#[derive(Args)]
struct TextArgs {
    /// A UTF-8 text file to evaluate on.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window; each window's second half is scored.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Evaluate at most this many windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl TextArgs {
    fn tokens(&self, model: &Model) -> Result<Vec<u32>> {
        let text =
            std::fs::read_to_string(&self.file).map_err(|e| Error::new(format!("{}: {e}", self.file.display())))?;
        // No BOS here: each window gets its own (see ffai::quality).
        model.tokenizer.encode(&text, false)
    }

    fn spec(&self, model: &Model) -> WindowSpec {
        WindowSpec {
            max_windows: self.max_windows,
            ..WindowSpec::for_model(model, self.context)
        }
    }
}

pub fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let tokens = a.text.tokens(&model)?;
    let t = Instant::now();
    let p = quality::perplexity(&*model.lm, &tokens, &a.text.spec(&model))?;
    let secs = t.elapsed().as_secs_f64();
    if a.text.json {
        println!(
            "{}",
            json!({
                "model": model.location.path().display().to_string(),
                "file": a.text.file.display().to_string(),
                "text_tokens": tokens.len(),
                "context": p.context,
                "windows": p.windows,
                "tokens_scored": p.tokens_scored,
                "mean_nll": p.mean_nll,
                "nll_stderr": p.nll_stderr,
                "perplexity": p.perplexity,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "{}: {} tokens, {} windows of {} (second halves scored: {} tokens)",
            a.text.file.display(),
            tokens.len(),
            p.windows,
            p.context,
            p.tokens_scored
        );
        println!(
            "perplexity: {:.4} (mean NLL {:.5} ± {:.5} nats) in {secs:.1} s",
            p.perplexity, p.mean_nll, p.nll_stderr
        );
    }
    Ok(())
}

pub fn cmd_kld(a: KldArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let ref_args = ModelArgs {
        model: Some(a.reference.clone()),
        ..a.model
    };
    let (reference, _) = ref_args.load()?;
    quality::check_same_vocab(&model, &reference)?;
    let tokens = a.text.tokens(&model)?;
    let t = Instant::now();
    let d = quality::divergence(&*model.lm, &*reference.lm, &tokens, &a.text.spec(&model))?;
    let secs = t.elapsed().as_secs_f64();
    if a.text.json {
        println!(
            "{}",
            json!({
                "model": model.location.path().display().to_string(),
                "reference": reference.location.path().display().to_string(),
                "file": a.text.file.display().to_string(),
                "text_tokens": tokens.len(),
                "context": d.context,
                "windows": d.windows,
                "tokens_scored": d.tokens_scored,
                "mean_kld": d.mean_kld,
                "kld_stderr": d.kld_stderr,
                "median_kld": d.median_kld,
                "p99_kld": d.p99_kld,
                "max_kld": d.max_kld,
                "top1_agreement": d.top1_agreement,
                "decisive_positions": d.decisive_positions,
                "top1_agreement_decisive": d.top1_agreement_decisive,
                "perplexity": d.perplexity,
                "ref_perplexity": d.ref_perplexity,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "{}: {} tokens, {} windows of {} ({} positions compared)",
            a.text.file.display(),
            tokens.len(),
            d.windows,
            d.context,
            d.tokens_scored
        );
        println!(
            "KL divergence from the reference: mean {:.6} ± {:.6}, median {:.6}, p99 {:.6}, max {:.6} nats",
            d.mean_kld, d.kld_stderr, d.median_kld, d.p99_kld, d.max_kld
        );
        println!(
            "same top-1 token: {:.2}% ({:.2}% where the reference leads by >= {} probability: {} positions)",
            100.0 * d.top1_agreement,
            100.0 * d.top1_agreement_decisive,
            ffai::quality::DECISIVE_MARGIN,
            d.decisive_positions
        );
        println!(
            "perplexity: {:.4} (reference {:.4}) in {secs:.1} s",
            d.perplexity, d.ref_perplexity
        );
    }
    Ok(())
}
