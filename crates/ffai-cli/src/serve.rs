//! `ffai serve`: loads a model, starts the batching engine, and serves the OpenAI API over
//! HTTP (the `ffai-server` crate) until SIGINT or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use ffai::engine::Engine;
use ffai::{Error, Result};

use crate::batch::EngineArgs;
use crate::ModelArgs;

/// Most sequences that may wait for a place in the engine.
const MAX_QUEUE: usize = 1 << 16;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients use (default: the model's file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require "Authorization: Bearer KEY" on every endpoint but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// Requests (sequences) that may wait beyond --max-sequences; past both: 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds requests in flight get to finish after SIGINT/SIGTERM before they are
    /// cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// A browser origin allowed to call the API (CORS), e.g. http://localhost:3000; `*`
    /// for any. Repeatable.
    #[arg(long)]
    cors_origin: Vec<String>,
    /// What to do with a thinking model's reasoning before its chat answer: `auto` sends
    /// it as the message's `reasoning_content` where the chat template teaches one
    /// (Qwen3, DeepSeek-R1 `<think>` blocks; gpt-oss analysis); `none` leaves it in the
    /// content.
    #[arg(long, default_value = "auto", value_parser = ["none", "auto"])]
    reasoning_parser: String,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    if a.max_queue > MAX_QUEUE {
        return Err(Error::new(format!("--max-queue must be at most {MAX_QUEUE}")));
    }
    for o in &a.cors_origin {
        ffai_server::check_cors_origin(o).map_err(|e| Error::new(format!("--cors-origin: {e}")))?;
    }
    if a.api_key.as_deref().is_some_and(str::is_empty) {
        return Err(Error::new("--api-key must not be empty"));
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| a.model.model_name());
    let opts = ffai_server::ServerOptions {
        served_model_name: name,
        api_key: a.api_key.clone(),
        max_queue: a.max_queue,
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        cors_origins: a.cors_origin.clone(),
        reasoning_parser: a.reasoning_parser.parse().map_err(Error::new)?,
    };
    let capacity = a.engine.max_sequences.saturating_add(a.max_queue);
    let (host, port) = (a.host.clone(), a.port);
    // Listening starts at once (503 until ready); the model loads on a blocking thread.
    let load = move || -> std::result::Result<Arc<Engine>, String> {
        let (model, load_s) = a.model.load().map_err(|e| e.to_string())?;
        let cfg = a.engine.config(&model).map_err(|e| e.to_string())?;
        eprintln!(
            "ffai serve: loaded {} in {load_s:.2}s on {}; {} sequences at once, context {}, KV cache {} tokens",
            model.location.path().display(),
            model.lm.device_name(),
            cfg.max_seqs,
            cfg.context,
            cfg.kv_tokens()
        );
        Engine::start(Arc::new(model), cfg)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    };
    ffai_server::run_loading(load, opts, capacity, &host, port).map_err(Error::new)
}
