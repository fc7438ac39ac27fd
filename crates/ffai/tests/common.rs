//! Helpers shared by the library's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

/// A fresh empty directory under the system temp dir, unique per call (tests run in
/// parallel threads of one process).
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ffai-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fetched real checkpoints. Missing files fail the test: CI fetches them first.
pub fn real_model(file: &str) -> PathBuf {
    let dir = std::env::var_os("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"));
    let p = dir.join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// One of llama.cpp's greedy continuations in tests/fixtures/llamacpp_greedy_*.json (how
/// they were made is in each file's `about`).
pub struct LlamaCppCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
}

pub fn llama_cpp_cases(fixture: &str) -> Vec<LlamaCppCase> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| LlamaCppCase {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            prompt_ids: ids(&c["prompt_ids"]),
            ids: ids(&c["ids"]),
            text: c["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Our greedy continuation of a [`LlamaCppCase`] prompt, compared with llama.cpp's.
pub struct Comparison {
    pub ids: Vec<u32>,
    pub text: String,
    /// Leading generated tokens equal to llama.cpp's.
    pub same: usize,
    /// At the first differing token (or the last one, when all agree): our top logit
    /// minus the logit of llama.cpp's token there, after the common prefix.
    pub gap: f32,
}

/// Greedy-decodes `case.prompt` (checking its ids are llama.cpp's) for as many tokens as
/// llama.cpp wrote, and measures where and by how much ours departs from them.
pub fn compare_with_llama_cpp(m: &ffai::Model, case: &LlamaCppCase) -> Comparison {
    let prompt = m.encode(&case.prompt).unwrap();
    assert_eq!(prompt, case.prompt_ids, "{:?}: prompt ids", case.prompt);
    let p = ffai::GenerationParameters {
        temperature: 0.0,
        max_tokens: case.ids.len(),
        ..Default::default()
    };
    let out = m.generate(&prompt, &p, |_| true).unwrap();
    let same = out
        .generated_ids
        .iter()
        .zip(&case.ids)
        .take_while(|(a, b)| a == b)
        .count();
    let at = same.min(case.ids.len() - 1);
    let mut ctx = prompt;
    ctx.extend_from_slice(&case.ids[..at]);
    let mut st = m.lm.new_state(ctx.len() + 1, 512).unwrap();
    let mut logits = Vec::new();
    m.lm.forward(&ctx, &mut st, false, &mut logits).unwrap();
    let top = ffai_kernels::ops::argmax(&logits).0;
    let gap = logits[top] - logits[case.ids[at] as usize];
    println!(
        "{:?}: {same}/{} tokens as llama.cpp; at token {at} our top {top} leads llama.cpp's {} by {gap:.4} logits; ours: {:?}",
        case.prompt,
        case.ids.len(),
        case.ids[at],
        out.text
    );
    if same < case.ids.len() {
        assert_eq!(
            out.generated_ids[same] as usize, top,
            "{:?}: greedy picked the top logit",
            case.prompt
        );
    }
    Comparison {
        ids: out.generated_ids,
        text: out.text,
        same,
        gap,
    }
}

/// Ours must equal llama.cpp's continuation for at least `agree` tokens (all of it when
/// `agree` is its length, text included), and where they part, llama.cpp's token must
/// trail our top logit by at most `max_gap`: a near-tie that rounding decides. Which way a
/// near-tie goes depends on the CPU level's summation order (`FFAI_CPU_LEVEL`), so the
/// parting point may come later than `agree` (never earlier) on another level.
pub fn assert_agrees_with_llama_cpp(case: &LlamaCppCase, c: &Comparison, agree: usize, max_gap: f32) {
    let label = &case.prompt;
    assert_eq!(
        c.ids[..agree.min(c.ids.len())],
        case.ids[..agree],
        "{label:?}: the first {agree} tokens differ from llama.cpp's ({:?} vs {:?})",
        c.text,
        case.text
    );
    if c.same == case.ids.len() {
        assert_eq!(c.text, case.text, "{label:?}: text");
        return;
    }
    assert!(
        c.same >= agree,
        "{label:?}: expected to follow llama.cpp for at least {agree} tokens, not {}",
        c.same
    );
    assert!(
        c.gap <= max_gap,
        "{label:?}: at token {} llama.cpp's choice trails ours by {} logits, not a near-tie",
        c.same,
        c.gap
    );
}

/// A byte-level BPE tokenizer.json small enough to read: "hello world" is [13, 16, 4, 9].
pub const TINY_TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 17, "content": "<|turn|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<s>": 0, "</s>": 1, "h": 2, "e": 3, "l": 4, "o": 5, "Ġ": 6, "w": 7, "r": 8, "d": 9,
              "he": 10, "ll": 11, "hell": 12, "hello": 13, "Ġw": 14, "or": 15, "Ġwor": 16},
    "merges": ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]
  }
}"#;

/// The chat-template fixtures (scripts/make_chat_fixtures.py).
pub fn fixtures() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

/// One case of tests/fixtures/chat/cases.json: a template, its inputs, and transformers'
/// rendering (or its error).
#[derive(serde::Deserialize)]
pub struct ChatCase {
    pub template: String,
    pub case: String,
    pub messages: Vec<ffai::chat::Message>,
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
    pub tools: Option<serde_json::Value>,
    pub enable_thinking: Option<bool>,
    pub today_format: Option<String>,
    pub expected: Option<String>,
    pub error: Option<String>,
}

/// Runs every request through one scheduler until it is idle (bounded in steps, the
/// pool's invariants checked after each); completions in request order, and the
/// scheduler's counters.
pub fn run_scheduler(
    m: &ffai::Model,
    cfg: ffai::engine::EngineConfig,
    reqs: &[ffai::engine::SeqRequest],
) -> (Vec<ffai::engine::Completion>, ffai::engine::SchedulerStats) {
    use ffai::engine::{Event, Scheduler};
    let mut s = Scheduler::new(&*m.lm, &m.tokenizer, cfg).unwrap();
    let rx: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (tx, rx) = std::sync::mpsc::channel();
            s.add(
                r.clone(),
                tx,
                std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
            .unwrap();
            rx
        })
        .collect();
    let mut steps = 0;
    while !s.is_idle() {
        s.step().unwrap();
        steps += 1;
        assert!(steps < 100_000, "the scheduler does not finish");
        s.pool().check_invariants();
    }
    let out = rx
        .iter()
        .map(|r| {
            r.try_iter()
                .find_map(|e| match e {
                    Event::Done(c) => Some(c),
                    _ => None,
                })
                .expect("every request ends with Done")
        })
        .collect();
    (out, s.stats)
}
