//! The `ffai` command-line tool: generate, chat, inspect, tokenize, models, bench, batch,
//! serve.

mod chat;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use ffai::generate::GenerationParameters;
use ffai::inspect::Tap;
use ffai::{Error, LoadOptions, Model, Result};

mod batch;
mod convert;
mod quality;
mod serve;

#[derive(Parser)]
#[command(
    name = "ffai",
    version,
    about = "Run large language models on your machine (GGUF and Hugging Face checkpoints)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a completion of a raw prompt (no chat template), streaming it.
    Generate(GenerateArgs),
    /// Talk with a model: an interactive multi-turn conversation through its chat template.
    Chat(chat::ChatArgs),
    /// Show the architecture, the prompt's tokens and the next-token logits.
    Inspect(InspectArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// List the supported model families and their architecture names.
    Models,
    /// Measure prefill and decode speed (of one sequence, or of N at once).
    Bench(BenchArgs),
    /// Generate for every line of a JSONL file, many sequences at once.
    Batch(batch::BatchArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API.
    Serve(serve::ServeArgs),
    /// Print a conversation rendered with the model's chat template.
    RenderChat(RenderChatArgs),
    /// Perplexity of a model on a text file.
    Perplexity(quality::PerplexityArgs),
    /// KL divergence of a model's next-token distributions from a reference model's.
    Kld(quality::KldArgs),
    /// Convert a checkpoint to a Hugging Face directory (MLX affine quantization or f16/bf16).
    Convert(convert::ConvertArgs),
    /// Re-encode a GGUF file's weight matrices as another GGUF type (Q8_0, Q6_K, Q4_K, ...).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The source .gguf file.
    src: std::path::PathBuf,
    /// The .gguf file to write.
    dst: std::path::PathBuf,
    /// Target weight type (ggml's names: Q8_0, Q6_K, Q5_K, Q5_0, Q4_K, Q4_0, F16, ...).
    #[arg(long = "type")]
    ty: String,
    /// Overwrite an existing destination.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct RenderChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSON file holding a list of {"role": .., "content": ..} messages.
    #[arg(long)]
    messages: std::path::PathBuf,
    /// Open an assistant turn at the end.
    #[arg(long)]
    add_generation_prompt: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// A .gguf file, a Hugging Face checkpoint directory, or a repo id (owner/name).
    /// Defaults to the packaged SmolLM2-135M-Instruct Q4_1 (scripts/fetch-models.sh).
    #[arg(short, long)]
    model: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Time every op and print where a decode step spends its time (bench).
    #[arg(long)]
    profile: bool,
    /// KV-cache precision: f16 (default) or f32.
    #[arg(long, default_value = "f16")]
    kv_cache: String,
    /// Activations fed to the matmuls: q8 (default: 8-bit integer dots for quantized
    /// weights, f32 for float weights), f32 (dequantized weights, slower; no activation
    /// rounding) or bf16 (as q8, and BF16 weights dotted with bf16-rounded activations by
    /// AVX-512 BF16 where the CPU has it: faster prefill).
    #[arg(long, default_value = "q8")]
    activations: String,
    /// Where to run: cpu (default) or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `--device`: `cpu` (None) or `cuda` / `cuda:N` (Some(N)).
pub(crate) fn parse_device(d: &str) -> Result<Option<usize>> {
    match d {
        "cpu" => Ok(None),
        d if d == "cuda" || d.starts_with("cuda:") => Ok(Some(match d.strip_prefix("cuda:") {
            None => 0,
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::new(format!("--device {d}: the GPU number must be a whole number")))?,
        })),
        other => Err(Error::new(format!("--device must be cpu or cuda[:N], not {other:?}"))),
    }
}

impl ModelArgs {
    /// The file or directory name of the model asked for (`-m`, else the default model's).
    pub(crate) fn model_name(&self) -> String {
        let spec = match &self.model {
            Some(m) => m.clone(),
            None => ffai::resolve::default_model().display().to_string(),
        };
        std::path::Path::new(spec.trim_end_matches('/'))
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or(spec)
    }

    fn load(&self) -> Result<(Model, f64)> {
        let spec = match &self.model {
            Some(m) => m.clone(),
            None => {
                let p = ffai::resolve::default_model();
                if !p.exists() {
                    return Err(Error::new(format!(
                        "the default model {} is missing: run scripts/fetch-models.sh, or pass -m MODEL",
                        p.display()
                    )));
                }
                p.display().to_string()
            }
        };
        let cuda = parse_device(&self.device)?;
        let t = Instant::now();
        let kv_f32 = match self.kv_cache.as_str() {
            "f16" => false,
            "f32" => true,
            other => return Err(Error::new(format!("--kv-cache must be f16 or f32, not {other:?}"))),
        };
        let (f32_activations, bf16_activations) = match self.activations.as_str() {
            "q8" => (false, false),
            "f32" => (true, false),
            "bf16" => (false, true),
            other => {
                return Err(Error::new(format!(
                    "--activations must be q8, f32 or bf16, not {other:?}"
                )))
            }
        };
        let m = Model::load(
            &spec,
            &LoadOptions {
                threads: self.threads,
                profile: self.profile,
                kv_f32,
                f32_activations,
                bf16_activations,
                cuda,
            },
        )
        .map_err(|e| match cuda {
            Some(n) => e.context(format!("--device cuda:{n}")),
            None => e,
        })?;
        Ok((m, t.elapsed().as_secs_f64()))
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy. Default: the model family's.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Tokens per prefill forward pass.
    #[arg(long)]
    prefill_step: Option<usize>,
    /// Constrain the output to JSON matching the JSON schema in this file.
    #[arg(long, value_name = "FILE", group = "format")]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to a JSON object.
    #[arg(long, group = "format")]
    json_object: bool,
    /// Constrain the output to match this regular expression.
    #[arg(long, value_name = "RE", group = "format")]
    regex: Option<String>,
    /// Constrain the output to the Lark-style grammar in this file (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "format")]
    grammar: Option<std::path::PathBuf>,
}

impl SamplingArgs {
    /// The output constraint asked for (`--json-schema`, `--json-object`, `--regex`,
    /// `--grammar`: one at most).
    fn response_format(&self) -> Result<Option<ffai::constrain::ResponseFormat>> {
        use ffai::constrain::ResponseFormat;
        let read =
            |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| Error::new(format!("{}: {e}", p.display())));
        Ok(if let Some(f) = &self.json_schema {
            let schema: serde_json::Value =
                serde_json::from_str(&read(f)?).map_err(|e| Error::new(format!("{}: not JSON: {e}", f.display())))?;
            Some(ResponseFormat::JsonSchema(schema))
        } else if self.json_object {
            Some(ResponseFormat::JsonObject)
        } else if let Some(r) = &self.regex {
            Some(ResponseFormat::Regex(r.clone()))
        } else if let Some(f) = &self.grammar {
            Some(ResponseFormat::Lark(read(f)?))
        } else {
            None
        })
    }

    fn apply(&self, mut p: GenerationParameters) -> GenerationParameters {
        if let Some(v) = self.max_tokens {
            p.max_tokens = v;
        }
        if let Some(v) = self.temperature {
            p.temperature = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if self.seed.is_some() {
            p.seed = self.seed;
        }
        if let Some(v) = self.prefill_step {
            p.prefill_step_size = v;
        }
        p.stop_strings.extend(self.stop.iter().cloned());
        p
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(short, long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Send the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(short, long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Comma-separated token ids instead of a prompt.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    #[arg(long)]
    json: bool,
    /// Print statistics of the hidden state at every layer boundary.
    #[arg(long)]
    layer_trace: bool,
    /// Only trace these layers (implies --layer-trace).
    #[arg(long, value_delimiter = ',')]
    trace_layers: Option<Vec<usize>>,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    #[arg(long)]
    json: bool,
    text: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    #[arg(long)]
    json: bool,
    /// Run N sequences at once through the batched engine (aggregate decode speed).
    #[arg(long)]
    sequences: Option<usize>,
    /// With --sequences: most tokens in one step.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
}

fn main() -> ExitCode {
    // A panic is a bug, but it still ends as one line and exit 1: the command runs under
    // catch_unwind and its payload is printed below. The hook itself stays quiet on the
    // threads whose panics come back to main (this one, and pool workers, whose panics
    // the pool re-raises on the caller); any other thread's panic is reported where it
    // happens, since nothing may join that thread.
    std::panic::set_hook(Box::new(|info| {
        let name = std::thread::current().name().unwrap_or("").to_string();
        if name != "main" && !name.starts_with("ffai-worker") {
            eprintln!(
                "error: internal error in thread {name:?}: {}",
                panic_message(info.payload())
            );
        }
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(
                e.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // A bad flag or value is bad input like any other: one line, exit 1 (clap's
            // own rendering adds usage lines and exits 2).
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("error: {first} (see --help)");
            return ExitCode::FAILURE;
        }
    };
    // A bad FFAI_CPU_LEVEL is refused before any kernel runs (the kernels would fall back
    // to the portable level with a warning).
    if let Err(e) = ffai_kernels::quant::q8::env_level() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let r = std::panic::catch_unwind(move || match cli.cmd {
        // A deliberate panic, so tests can check how one is reported.
        _ if std::env::var_os("FFAI_DEBUG_PANIC").is_some() => panic!("FFAI_DEBUG_PANIC is set"),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Chat(a) => chat::cmd_chat(a),
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
        Cmd::Models => cmd_models(),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Batch(a) => batch::cmd_batch(a),
        Cmd::Serve(a) => serve::cmd_serve(a),
        Cmd::RenderChat(a) => cmd_render_chat(a),
        Cmd::Perplexity(a) => quality::cmd_perplexity(a),
        Cmd::Kld(a) => quality::cmd_kld(a),
        Cmd::Convert(a) => convert::cmd_convert(a),
        Cmd::Quantize(a) => cmd_quantize(a),
    })
    .unwrap_or_else(|payload| Err(Error::new(format!("internal error: {}", panic_message(&*payload)))));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let (model, load_s) = a.model.load()?;
    let mut params = a.sampling.apply(model.default_parameters());
    params.response_format = a.sampling.response_format()?;
    let prompt = if a.chat {
        model.render_chat(&[ffai::chat::Message::user(a.prompt.clone())], true)?
    } else {
        a.prompt.clone()
    };
    let ids = model.encode(&prompt)?;
    if a.json {
        let out = model.generate(&ids, &params, |_| true)?;
        let j = json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": out.text,
            "reasoning": out.reasoning,
            "answer": out.answer,
            "reasoning_tokens": out.reasoning_tokens,
            "answer_tokens": out.answer_tokens,
            "prefill_tokens_per_s": out.prefill_tokens_per_s(),
            "decode_tokens_per_s": out.decode_tokens_per_s(),
            "stop_reason": format!("{:?}", out.stop_reason),
            "load_seconds": load_s,
        });
        println!("{j}");
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    if !a.chat {
        let _ = write!(stdout, "{}", a.prompt);
    }
    let _ = stdout.flush();
    // Reasoning (a think block) is shown dimmed on a terminal.
    let dim = std::io::stdout().is_terminal();
    let out = ffai::generate::generate_split(&*model.lm, &model.tokenizer, &ids, &params, |kind, piece| {
        let _ = if dim && kind != ffai::generate::TextKind::Answer {
            write!(stdout, "\x1b[2m{piece}\x1b[0m")
        } else {
            write!(stdout, "{piece}")
        };
        let _ = stdout.flush();
        true
    })?;
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | loaded in {:.2}s | {}",
        out.prompt_ids.len(),
        out.prefill_tokens_per_s(),
        out.generated_ids.len(),
        out.decode_tokens_per_s(),
        load_s,
        model.lm.device_name()
    );
    Ok(())
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let ty = ffai::requant::parse_type(&a.ty)?;
    let t = std::time::Instant::now();
    let s = ffai::requant::requantize_gguf(&a.src, &a.dst, ty, a.force)?;
    println!(
        "wrote {} ({:.1} MiB) in {:.1} s: {} matrices as {ty}, {} copied{}",
        a.dst.display(),
        s.bytes_written as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64(),
        s.converted,
        s.copied,
        if s.fallbacks.is_empty() {
            String::new()
        } else {
            let mut kinds: Vec<String> = s.fallbacks.iter().map(|(_, t)| t.name().to_string()).collect();
            kinds.sort();
            kinds.dedup();
            format!(
                ", {} whose rows do not fit {ty}'s blocks as {}",
                s.fallbacks.len(),
                kinds.join("/")
            )
        }
    );
    Ok(())
}

fn cmd_render_chat(a: RenderChatArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let text =
        std::fs::read_to_string(&a.messages).map_err(|e| Error::new(format!("{}: {e}", a.messages.display())))?;
    let messages: Vec<ffai::chat::Message> = serde_json::from_str(&text)
        .map_err(|e| Error::new(format!("{}: not a list of chat messages: {e}", a.messages.display())))?;
    print!("{}", model.render_chat(&messages, a.add_generation_prompt)?);
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let ids = model.tokenizer.encode(&a.text, a.bos)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

fn cmd_models() -> Result<()> {
    for f in ffai::models::FAMILIES {
        println!("{}", f.name);
        println!("  variants: {}", f.variants.join(", "));
        println!("  Hugging Face architectures: {}", f.hf_architectures.join(", "));
        println!("  model_type: {}", f.model_types.join(", "));
        println!("  GGUF general.architecture: {}", f.gguf_architectures.join(", "));
    }
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let (model, load_s) = a.model.load()?;
    let tok = &model.tokenizer;
    let cfg = model.lm.config();
    let ids = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => model.encode(p)?,
        (None, None) => model.encode("The capital of France is")?,
    };
    if ids.is_empty() {
        return Err(Error::new("the prompt has no tokens"));
    }
    if ids.len() > cfg.max_position_embeddings {
        return Err(Error::new(format!(
            "the prompt has {} tokens, more than the model's context of {}",
            ids.len(),
            cfg.max_position_embeddings
        )));
    }
    // On a GPU: free memory with the weights resident, before the state and the step.
    let gpu_loaded = model.device.gpu_memory();
    let mut state = model.lm.new_state(ids.len(), 512)?;
    if a.layer_trace || a.trace_layers.is_some() {
        state.tap = Tap::layers(a.trace_layers.clone());
    }
    let mut logits = Vec::new();
    model.lm.forward(&ids, &mut state, false, &mut logits)?;
    let nan = logits.iter().filter(|x| !x.is_finite()).count();
    let gpu_memory = model.device.gpu_memory().map(|(free, total)| {
        json!({
            "total_bytes": total,
            "free_bytes": free,
            "weights_bytes": model.weight_bytes,
            "kv_cache_and_activations_bytes": gpu_loaded.map(|(f0, _)| f0.saturating_sub(free)),
            "kv_cache_bytes": model.lm.kv_bytes_by_kind(ids.len(), 512).iter().map(|k| k.2).sum::<usize>(),
        })
    });
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = a.top_k.min(logits.len());
    order.select_nth_unstable_by(k.saturating_sub(1), |&x, &y| {
        logits[y].total_cmp(&logits[x]).then(x.cmp(&y))
    });
    order.truncate(k);
    order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
    // KV memory by layer kind: sliding-window layers keep a ring of window + chunk rows.
    let kv_kinds = |ctx: usize| -> Vec<serde_json::Value> {
        model
            .lm
            .kv_bytes_by_kind(ctx, 512)
            .into_iter()
            .map(|(kind, layers, bytes)| json!({"kind": kind, "layers": layers, "bytes": bytes}))
            .collect()
    };
    let kv_total = |ctx: usize| -> usize { model.lm.kv_bytes_by_kind(ctx, 512).iter().map(|k| k.2).sum() };
    let arch = json!({
        "family": model.lm.family(),
        "variant": model.lm.variant(),
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "name": cfg.name,
        "source": model.location.path().display().to_string(),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.as_ref().map(|r| format!("{r:?}")),
        "rope_pairing": if cfg.rope_neox { "neox" } else { "adjacent" },
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "sliding_window": cfg.sliding_window,
        "weight_bytes": model.weight_bytes,
        "weight_types": model.weight_types.iter().map(|(t, n)| json!({"type": t, "tensors": n})).collect::<Vec<_>>(),
        "source_quantization": model.source_quantization,
        "kv_cache_full_context": kv_kinds(cfg.max_position_embeddings),
        "kv_cache_bytes_full_context": kv_total(cfg.max_position_embeddings),
        "device": model.lm.device_name(),
        "gpu_memory": gpu_memory,
        "load_seconds": load_s,
        "chat_template": model.chat_template()?.map(|t| t.origin().to_string()),
    });
    let top: Vec<_> = order
        .iter()
        .map(|&i| json!({"id": i, "logit": logits[i], "text": String::from_utf8_lossy(&tok.token_bytes(i as u32))}))
        .collect();
    if a.json {
        let mut j = json!({ "architecture": arch, "prompt_ids": ids, "top_k": top });
        if state.tap.enabled {
            j["layer_trace"] = json!(state.tap.lines);
        }
        println!("{j}");
        return Ok(());
    }
    println!("architecture");
    if let Some(obj) = arch.as_object() {
        for (k, v) in obj {
            println!("  {k}: {v}");
        }
    }
    let defaults = model.default_parameters();
    println!(
        "default generation parameters: temperature {} top_k {} top_p {} min_p {} repetition_penalty {} max_tokens {} prefill_step {}",
        defaults.temperature, defaults.top_k, defaults.top_p, defaults.min_p, defaults.repetition_penalty, defaults.max_tokens, defaults.prefill_step_size
    );
    println!("special tokens");
    for (role, id, text) in tok.special_tokens() {
        println!("  {role}: {id} {text:?}");
    }
    println!("  end of generation: {:?}", tok.eog_ids());
    println!("prompt: {} tokens", ids.len());
    for &id in &ids {
        println!("  {id:>7} {:?}", String::from_utf8_lossy(&tok.token_bytes(id)));
    }
    println!("kv cache (f16), by layer kind:");
    for (label, ctx) in [
        ("this prompt", ids.len()),
        ("full context", cfg.max_position_embeddings),
    ] {
        for (kind, layers, bytes) in model.lm.kv_bytes_by_kind(ctx, 512) {
            println!("  {label} ({ctx} tokens): {kind}: {layers} layers, {bytes} bytes");
        }
    }
    if state.tap.enabled {
        println!("layer trace");
        for l in &state.tap.lines {
            println!("  {l}");
        }
    }
    if nan > 0 {
        println!("WARNING: {nan} logits are NaN or infinite");
    }
    println!("top {k} next tokens");
    for t in &top {
        println!(
            "  {:>7} {:>10.4} {:?}",
            t["id"],
            t["logit"].as_f64().unwrap_or(f64::NAN),
            t["text"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux); 0 elsewhere.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `bench --sequences N`: medians over the repetitions of the batched run (after one
/// untimed warm-up run).
fn bench_sequences(a: &BenchArgs, model: &Model, n: usize, load_s: f64) -> Result<()> {
    if !(1..=ffai::engine::MAX_SEQUENCES).contains(&n) {
        return Err(Error::new(format!(
            "--sequences must be 1..={}",
            ffai::engine::MAX_SEQUENCES
        )));
    }
    if a.gen_tokens == 0 {
        return Err(Error::new("--sequences needs --gen-tokens of at least 1"));
    }
    let engine = batch::EngineArgs {
        max_sequences: n,
        max_batch_tokens: a.max_batch_tokens,
        kv_cache_size: None,
        context: None,
    };
    batch::bench_sequences(model, &engine, n, a.prompt_tokens, a.gen_tokens.min(8), 1)?;
    let (mut pp, mut tg, mut last) = (Vec::new(), Vec::new(), None);
    for r in 0..a.repetitions {
        let run = batch::bench_sequences(model, &engine, n, a.prompt_tokens, a.gen_tokens, 1234 + r as u64)?;
        pp.push(run.prefill);
        tg.push(run.decode);
        last = Some(run);
    }
    let steps = last.as_ref().map_or(0, |r| r.steps);
    if let Some(run) = last.as_ref().filter(|r| r.steps > 0) {
        // Where a decode step's time goes: the model's forward (device work and waiting
        // for it) against the scheduler's own work around it.
        let per = |secs: f64| secs * 1e3 / run.steps as f64;
        eprintln!(
            "decode step (last run): {:.3} ms, of which the forward {:.3} ms and the rest (scheduler, this loop) {:.3} ms",
            per(run.decode_secs),
            per(run.forward_secs),
            per(run.decode_secs - run.forward_secs)
        );
    }
    let profile = model.device.take_profile();
    if !profile.is_empty() {
        let total: f64 = profile.iter().map(|p| p.1).sum();
        let steps = steps.max(1) as f64;
        eprintln!(
            "per-op profile of the last decode phase ({steps} steps of {n} rows; ops take {:.3} ms of each step):",
            total * 1e3 / steps
        );
        for (name, secs, calls) in profile.iter().take(16) {
            eprintln!(
                "{:<44} {:>10.1} µs/step {:>7.1}% {:>8.1} calls/step",
                name,
                secs * 1e6 / steps,
                100.0 * secs / total,
                *calls as f64 / steps
            );
        }
    }
    report_bench(a, model, load_s, &pp, &tg, Some(n));
    Ok(())
}

/// More repetitions than this say nothing more about the median.
const MAX_BENCH_REPETITIONS: usize = 1000;

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let (model, load_s) = a.model.load()?;
    let cfg = model.lm.config();
    if a.prompt_tokens == 0 || a.repetitions == 0 {
        return Err(Error::new("--prompt-tokens and --repetitions must be at least 1"));
    }
    let max_seq = a.prompt_tokens.saturating_add(a.gen_tokens);
    if max_seq > cfg.max_position_embeddings {
        return Err(Error::new(format!(
            "--prompt-tokens {} + --gen-tokens {} exceed the model's context of {}",
            a.prompt_tokens, a.gen_tokens, cfg.max_position_embeddings
        )));
    }
    if a.repetitions > MAX_BENCH_REPETITIONS {
        return Err(Error::new(format!(
            "--repetitions {} exceeds the limit of {MAX_BENCH_REPETITIONS}",
            a.repetitions
        )));
    }
    if let Some(n) = a.sequences {
        return bench_sequences(&a, &model, n, load_s);
    }
    // Deterministic pseudo-random prompt tokens, like llama-bench's random prompt.
    let mut rng = ffai::generate::Rng::new(1234);
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    let mut prefill_profile = Vec::new();
    let mut logits = Vec::new();
    // One untimed run first, as llama-bench does: pages of the memory-mapped weights
    // (e.g. the rows of a 262k-token embedding the prompt touches) are faulted in once.
    {
        let mut state = model.lm.new_state(max_seq, 512)?;
        model.lm.forward(&prompt, &mut state, false, &mut logits)?;
        let next = ffai_kernels::ops::argmax(&logits).0 as u32;
        if a.gen_tokens > 0 {
            model.lm.forward(&[next], &mut state, false, &mut logits)?;
        }
        let _ = model.device.take_profile();
    }
    for _ in 0..a.repetitions {
        let mut state = model.lm.new_state(max_seq, 512)?;
        let t = Instant::now();
        model.lm.forward(&prompt, &mut state, false, &mut logits)?;
        pp.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        if a.gen_tokens > 0 {
            prefill_profile = model.device.take_profile();
            let mut next = ffai_kernels::ops::argmax(&logits).0 as u32;
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                model.lm.forward(&[next], &mut state, false, &mut logits)?;
                next = ffai_kernels::ops::argmax(&logits).0 as u32;
            }
            tg.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let profile = model.device.take_profile();
    if !prefill_profile.is_empty() {
        let total: f64 = prefill_profile.iter().map(|p| p.1).sum();
        eprintln!(
            "per-op profile of the last prefill ({} tokens; ops take {:.1} ms):",
            a.prompt_tokens,
            total * 1e3
        );
        for (name, secs, calls) in prefill_profile.iter().take(12) {
            eprintln!(
                "{:<44} {:>10.2} ms {:>7.1}% {:>6} calls",
                name,
                secs * 1e3,
                100.0 * secs / total,
                calls
            );
        }
    }
    if !profile.is_empty() {
        let total: f64 = profile.iter().map(|p| p.1).sum();
        let steps = a.gen_tokens.max(1) as f64;
        eprintln!(
            "per-op profile of the last decode phase ({} steps; ops take {:.3} ms of each step):",
            a.gen_tokens,
            total * 1e3 / steps
        );
        eprintln!("{:<34} {:>10} {:>8} {:>9}", "op", "µs/step", "share", "calls/step");
        // Parallel ops (matmuls, attention) each pay one pool region.
        let regions: u64 = profile
            .iter()
            .filter(|p| p.0.starts_with("matmul") || p.0 == "attention")
            .map(|p| p.2)
            .sum();
        let per_region = model.device.region_overhead_seconds();
        let step = total / steps;
        eprintln!(
            "pool: {:.2} µs per parallel region x {:.0} regions per step = {:.1}% of a decode step",
            per_region * 1e6,
            regions as f64 / steps,
            100.0 * per_region * regions as f64 / steps / step
        );
        for (name, secs, calls) in &profile {
            eprintln!(
                "{:<34} {:>10.1} {:>7.1}% {:>9.1}",
                name,
                secs * 1e6 / steps,
                100.0 * secs / total,
                *calls as f64 / steps
            );
        }
    }
    report_bench(&a, &model, load_s, &pp, &tg, None);
    Ok(())
}

/// Prints a bench's medians and ranges (text, or one JSON object with `--json`); with
/// `sequences`, decode is the aggregate over all of them.
fn report_bench(a: &BenchArgs, model: &Model, load_s: f64, pp: &[f64], tg: &[f64], sequences: Option<usize>) {
    let range = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let (pp_min, pp_max) = range(pp);
    let (tg_min, tg_max) = range(tg);
    let (pp_med, tg_med) = (median(&mut pp.to_vec()), median(&mut tg.to_vec()));
    let rss = peak_rss_bytes();
    let n = sequences.unwrap_or(1);
    if a.json {
        let mut j = json!({
            "model": model.location.path().display().to_string(),
            "device": model.lm.device_name(),
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "repetitions": a.repetitions,
            "prefill_tokens_per_s": pp_med,
            "prefill_tokens_per_s_min": pp_min,
            "prefill_tokens_per_s_max": pp_max,
            "decode_tokens_per_s": tg_med,
            "decode_tokens_per_s_min": tg_min,
            "decode_tokens_per_s_max": tg_max,
            "peak_rss_bytes": rss,
            "load_seconds": load_s,
        });
        if sequences.is_some() {
            j["sequences"] = json!(n);
        }
        println!("{j}");
        return;
    }
    let seqs = match sequences {
        Some(n) => format!(", {n} sequences at once"),
        None => String::new(),
    };
    println!(
        "model: {} ({}){seqs}",
        model.location.path().display(),
        model.lm.device_name()
    );
    println!("load: {load_s:.3} s");
    let each = if n > 1 { format!("{n} x ") } else { String::new() };
    println!(
        "prefill {each}pp{}: {pp_med:.1} tok/s (min {pp_min:.1}, max {pp_max:.1})",
        a.prompt_tokens
    );
    println!(
        "decode {each}tg{}: {tg_med:.1} tok/s (min {tg_min:.1}, max {tg_max:.1}){}",
        a.gen_tokens,
        if n > 1 {
            format!(" aggregate, {:.1} per sequence", tg_med / n as f64)
        } else {
            String::new()
        }
    );
    println!("peak RSS: {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
}
