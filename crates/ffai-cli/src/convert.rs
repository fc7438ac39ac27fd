//! `ffai convert`: a GGUF file or Hugging Face directory to a Hugging Face directory with
//! MLX affine-quantized or f16/bf16 weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ffai::convert::{self, ConvertOptions, FloatType, Quantizer, Target};
use ffai::importance::Importance;
use ffai::{Error, LoadOptions, Model, Result};

#[derive(Args)]
pub struct ConvertArgs {
    /// A Hugging Face checkpoint directory or a .gguf file.
    src: PathBuf,
    /// Weight format: 2, 3, 4, 5, 6 or 8 (MLX affine quantization), or f16 / bf16.
    #[arg(long)]
    bits: String,
    /// Values per quantization group: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    /// Format of the token embedding (default: --bits).
    #[arg(long)]
    embedding_bits: Option<String>,
    /// Format of the LM head (default: --bits).
    #[arg(long)]
    lm_head_bits: Option<String>,
    /// How each group's scale and bias are chosen: `search` (weighted least squares over
    /// candidate grids; lower error, may clip outliers) or `minmax` (MLX's: the group's
    /// range, no value clipped).
    #[arg(long, default_value = "search", value_parser = ["search", "minmax"])]
    quantizer: String,
    /// Calibration text: run the source model over it first and weight each element's
    /// quantization error by its input column's mean square (the search quantizer only).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Tokens of the calibration text to use (from its start).
    #[arg(long, default_value_t = 16384)]
    calibration_tokens: usize,
    /// CPU threads for the calibration run (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where the calibration run goes: cpu (default) or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output directory (default: SRC's name with the format appended, next to it).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

pub fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let (target, float) = Target::parse(&a.bits)?;
    let side = |s: &Option<String>| -> Result<Option<Target>> {
        match s {
            None => Ok(None),
            Some(s) => {
                let (t, f) = Target::parse(s)?;
                if let (Some(f), Some(main)) = (f, float) {
                    if f != main {
                        return Err(Error::new(
                            "the embedding and LM head cannot use another float type than --bits",
                        ));
                    }
                }
                Ok(Some(t))
            }
        }
    };
    let opts = ConvertOptions {
        target,
        float_type: float,
        group_size: a.group_size,
        embedding: side(&a.embedding_bits)?,
        lm_head: side(&a.lm_head_bits)?,
        force: a.force,
        quantizer: if a.quantizer == "minmax" {
            Quantizer::MinMax
        } else {
            Quantizer::Search
        },
        importance: match &a.calibration {
            Some(text) if a.quantizer != "minmax" => Some(Arc::new(calibrate(
                &a.src,
                text,
                a.calibration_tokens,
                a.threads,
                crate::parse_device(&a.device)?,
            )?)),
            Some(_) => {
                return Err(Error::new(
                    "--calibration needs the search quantizer, not --quantizer minmax",
                ))
            }
            None => None,
        },
        ..Default::default()
    };
    let output = match &a.output {
        Some(o) => o.clone(),
        None => {
            let stem = a
                .src
                .file_stem()
                .ok_or_else(|| {
                    Error::new(format!(
                        "{}: cannot name an output after it; pass --output",
                        a.src.display()
                    ))
                })?
                .to_string_lossy()
                .to_string();
            let suffix = match target {
                Target::Affine(b) => format!("{b}bit"),
                Target::Float => a.bits.clone(),
            };
            a.src.with_file_name(format!("{stem}-{suffix}"))
        }
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed} {msg}")
            .map_err(|e| Error::new(format!("progress bar: {e}")))?,
    );
    let t = Instant::now();
    let r = convert::convert(&a.src, &output, &opts, &mut |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    let s = r?;
    let ft = match s.float_type {
        FloatType::F16 => "f16",
        FloatType::BF16 => "bf16",
        FloatType::F32 => "f32",
    };
    println!(
        "wrote {}: {} tensors ({} quantized, floats {ft}), {} shard(s), {:.1} MB in {:.1} s",
        s.output.display(),
        s.tensors,
        s.quantized,
        s.shards,
        s.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the source model over the start of `text` and returns its input statistics.
fn calibrate(src: &Path, text: &Path, max_tokens: usize, threads: usize, cuda: Option<usize>) -> Result<Importance> {
    let t = Instant::now();
    let body = std::fs::read_to_string(text).map_err(|e| Error::new(format!("reading {}: {e}", text.display())))?;
    let opts = LoadOptions {
        threads,
        f32_activations: true,
        cuda,
        ..Default::default()
    };
    let model = Model::load(&src.display().to_string(), &opts)?;
    let mut tokens = model.encode(&body)?;
    tokens.truncate(max_tokens);
    let imp = Importance::collect(
        &model,
        &tokens,
        CALIBRATION_CONTEXT.min(model.lm.config().max_position_embeddings),
    )?;
    eprintln!(
        "calibration: {} tokens of {} ({} linear inputs) in {:.1} s",
        imp.tokens,
        text.display(),
        imp.sites.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(imp)
}

/// Tokens per calibration window.
const CALIBRATION_CONTEXT: usize = 512;
