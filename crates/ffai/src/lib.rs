//! ffai: an LLM inference engine. This crate loads checkpoints (GGUF, Hugging Face
//! safetensors), dispatches them to a model family, tokenizes, and generates. The
//! compute lives in `ffai-kernels` behind the `Backend` trait.

pub mod chat;
pub mod config;
pub mod constrain;
pub mod convert;
pub mod engine;
pub mod error;
pub mod fp8;
pub mod generate;
pub mod gguf;
pub mod importance;
pub mod inspect;
pub mod models;
pub mod quality;
pub mod reasoning;
pub mod requant;
pub mod resolve;
pub mod tokenizer;
pub mod tools;
pub mod weights;

use std::path::Path;

pub use error::{Error, Result};
pub use generate::{generate, GenerationOutput, GenerationParameters, StopReason};
pub use models::{Device, InferenceState, LanguageModel};
pub use tokenizer::Tokenizer;

use config::ModelConfig;
use resolve::ModelLocation;
use weights::Weights;

/// Most CPU threads a model may be given: each is a real OS thread, spawned at load.
pub const MAX_THREADS: usize = 1024;

#[derive(Clone, Default)]
pub struct LoadOptions {
    /// CPU threads (0 = all cores).
    pub threads: usize,
    /// Time every op (see `Device::take_profile`); off costs one branch per op.
    pub profile: bool,
    /// Keep the KV cache in f32 (default f16: half the memory and bandwidth).
    pub kv_f32: bool,
    /// Dot quantized weights with f32 activations instead of 8-bit ones (slower; what a
    /// weight format alone costs, without the activations' rounding).
    pub f32_activations: bool,
    /// Round the activations of BF16-weight matmuls to bf16 and dot them with AVX-512
    /// BF16 (`vdpbf16ps`) where the CPU has it: faster prefill, activations rounded as
    /// llama.cpp's BF16 path rounds them (`CpuBackend::with_bf16_activations`; ignored
    /// with `f32_activations` or without AVX-512 BF16).
    pub bf16_activations: bool,
    /// Run on CUDA GPU N instead of the CPU (`threads`, `profile`, `kv_f32`,
    /// `f32_activations` and `bf16_activations` are CPU options; the GPU keeps an f16 KV cache and f32
    /// activations).
    pub cuda: Option<usize>,
}

/// A loaded model: the network, its tokenizer, and where it came from.
pub struct Model {
    pub lm: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
    pub location: ModelLocation,
    pub device: Device,
    /// Stored bytes of all weights.
    pub weight_bytes: usize,
    /// Weight types present, with tensor counts, e.g. [("Q4_1", 210), ("F32", 61)].
    pub weight_types: Vec<(String, usize)>,
    /// The checkpoint's own quantization where it was converted at load
    /// (`FP8 e4m3 block 128×128 → Q8_0`); `None` when the weights run as stored.
    pub source_quantization: Option<String>,
}

impl Model {
    /// Loads from a path or repo id (see `resolve`).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Model> {
        let location = resolve::resolve(spec)?;
        Self::load_location(location, opts)
    }

    pub fn load_location(location: ModelLocation, opts: &LoadOptions) -> Result<Model> {
        let threads = if opts.threads == 0 {
            ffai_kernels::cpu::CpuBackend::default_threads()
        } else {
            opts.threads
        };
        ensure!(
            threads <= MAX_THREADS,
            "{threads} threads exceed the limit of {MAX_THREADS}"
        );
        let device = match opts.cuda {
            None => Device::Cpu(std::sync::Arc::new(
                ffai_kernels::cpu::CpuBackend::with_options(threads, opts.profile, opts.kv_f32)
                    .with_f32_activations(opts.f32_activations)
                    .with_bf16_activations(opts.bf16_activations),
            )),
            Some(n) => {
                ensure!(
                    !opts.kv_f32,
                    "the CUDA backend keeps an f16 KV cache (no f32 KV cache on the GPU)"
                );
                Device::cuda_with(n, opts.profile)?
            }
        };
        let src = location.path().display().to_string();
        // Config first, then the family check, so an unsupported model fails before any
        // weights or tokenizer files are touched.
        let (cfg, weights, tokenizer, family) = match &location {
            ModelLocation::Gguf(path) => {
                let f = gguf::GgufFile::open(path)?;
                let mut cfg = ModelConfig::from_gguf(&f, &src)?;
                let family = models::family_for(&cfg, true).map_err(|e| e.context(&src))?;
                let weights = Weights::from_gguf(&f, &src);
                cfg.tie_word_embeddings = !weights.has("output.weight");
                cfg.attention_bias = weights.has("blk.0.attn_q.bias");
                let tok = Tokenizer::from_gguf(&f).map_err(|e| e.context(&src))?;
                (cfg, weights, tok, family)
            }
            ModelLocation::HfDir(dir) => {
                let cfg = read_hf_config(dir)?;
                let family = models::family_for(&cfg, false).map_err(|e| e.context(&src))?;
                let weights = Weights::from_safetensors_dir_for(dir, &cfg.model_type)?;
                let tok = Tokenizer::from_hf_dir(dir)?;
                tokenizer::release_freed_heap();
                (cfg, weights, tok, family)
            }
        };
        if let Some((free, total)) = device.gpu_memory() {
            // Refused before any upload: a model larger than the GPU's free memory.
            let need = weights.total_bytes();
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            ensure!(
                need < free,
                "{src}: the weights take {:.2} GiB, more than the {:.2} GiB free on {} ({:.2} GiB in all)",
                gib(need),
                gib(free),
                device.name(),
                gib(total)
            );
        }
        let lm = (family.load)(&cfg, &weights, &device)
            .map_err(|e| e.context(format!("loading {} as {}", src, family.name)))?;
        let mut types = std::collections::BTreeMap::<String, usize>::new();
        for name in weights.names() {
            if let Ok(w) = weights.get(name) {
                *types.entry(w.ty.name().to_string()).or_default() += 1;
            }
        }
        Ok(Model {
            lm,
            device,
            tokenizer,
            location,
            weight_bytes: weights.total_bytes(),
            weight_types: types.into_iter().collect(),
            source_quantization: weights.source_quantization.clone(),
        })
    }

    /// Tokenizes with the model's own BOS default.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, self.tokenizer.add_bos_default())
    }

    /// Generation parameters this model's family ships with.
    pub fn default_parameters(&self) -> GenerationParameters {
        self.lm.default_parameters()
    }

    pub fn generate(
        &self,
        prompt_ids: &[u32],
        params: &GenerationParameters,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationOutput> {
        generate::generate(&*self.lm, &self.tokenizer, prompt_ids, params, on_text)
    }
}

fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::new(format!("{}: {e}", cfg_path.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::new(format!("{}: invalid JSON: {e}", cfg_path.display())))?;
    ModelConfig::from_hf_json(&json, &dir.display().to_string())
}

impl Model {
    /// The chat template: the checkpoint's own (chat_template.jinja, tokenizer_config.json,
    /// or GGUF `tokenizer.chat_template`), else the family's known turn format.
    pub fn chat_template(&self) -> Result<Option<chat::ChatTemplate>> {
        let own = match &self.location {
            ModelLocation::HfDir(dir) => chat::ChatTemplate::from_hf_dir(dir)?,
            ModelLocation::Gguf(_) => match self.tokenizer.chat_template() {
                Some(t) => Some(chat::ChatTemplate::new(t, chat::TemplateSource::Gguf)?),
                None => None,
            },
        };
        Ok(own.or_else(|| chat::ChatTemplate::fallback(self.lm.family())))
    }

    /// Renders a conversation with the model's chat template.
    pub fn render_chat(&self, messages: &[chat::Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.require_chat_template()?;
        template.render(messages, &self.render_options(add_generation_prompt, None))
    }

    /// Renders a conversation that may carry tool turns, offering `tools` when `offer`
    /// (see `tools::prepare_messages`), and says which tool-call format the template
    /// teaches and what reasoning block the rendered prompt leaves the model room for.
    pub fn render_chat_tools(
        &self,
        messages: &[chat::Message],
        tools: &[tools::ToolSpec],
        offer: bool,
    ) -> Result<(String, tools::ToolTemplate)> {
        self.render_chat_vars(messages, tools, offer, Vec::new())
    }

    /// [`Model::render_chat_tools`] with extra template variables (a request's
    /// `chat_template_kwargs`, checked by [`chat::template_kwargs`]).
    pub fn render_chat_vars(
        &self,
        messages: &[chat::Message],
        tools: &[tools::ToolSpec],
        offer: bool,
        extra: Vec<(String, serde_json::Value)>,
    ) -> Result<(String, tools::ToolTemplate)> {
        let template = self.require_chat_template()?;
        let tpl = tools::ToolTemplate::detect(template.source());
        let (messages, tools) = tools::prepare_messages(tpl, messages, tools, offer);
        let mut opts = self.render_options(true, tools);
        opts.extra = extra;
        let text = template.render(&messages, &opts)?;
        // Whether the rendered generation prompt leaves room for a reasoning block.
        let tpl = tpl.for_prompt(&text);
        Ok((text, tpl))
    }

    fn require_chat_template(&self) -> Result<chat::ChatTemplate> {
        self.chat_template()?.ok_or_else(|| {
            Error::new(format!(
                "the model has no chat template and ffai knows no turn format for the {} family",
                self.lm.family()
            ))
        })
    }

    fn render_options(&self, add_generation_prompt: bool, tools: Option<serde_json::Value>) -> chat::RenderOptions {
        let text = |id: Option<u32>| id.and_then(|i| self.tokenizer.token_text(i)).unwrap_or("").to_string();
        chat::RenderOptions {
            add_generation_prompt,
            bos_token: text(self.tokenizer.bos_id()),
            eos_token: text(self.tokenizer.eos_id()),
            tools,
            ..Default::default()
        }
    }
}
