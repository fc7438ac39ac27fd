//! Hybrid and state-space models (the LFM2, Mamba 2, NemotronH, Granite 4 and Qwen3-Next
//! parity fixtures) in the batched
//! engine: each sequence's greedy tokens are the same alone and among others of
//! different lengths with chunked prefill sharing the step budget (every sequence reading
//! and writing its own recurrent-state slot), an exact repeat of a prompt resumes from
//! the state kept at its last block boundary (and produces the same tokens), a prompt
//! that only shares a prefix gets no reuse, and the one-sequence path agrees with the
//! engine.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ffai::config::ModelConfig;
use ffai::engine::{Completion, EngineConfig, Event, KvCacheSize, Scheduler, SeqRequest};
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::models::{family_for, Device, LanguageModel};
use ffai::tokenizer::Tokenizer;
use ffai::weights::Weights;
use ffai::GenerationParameters;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn load(name: &str) -> Box<dyn LanguageModel> {
    let dir = fixture(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, name).unwrap();
    let w = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    (family_for(&cfg, false).unwrap().load)(&cfg, &w, &Device::cpu(2)).unwrap()
}

/// A 256-token vocabulary (the fixtures' size): `<unk>`, `<s>`, `</s>`, then plain pieces.
fn tokenizer() -> Tokenizer {
    let s = |x: &str| MetaValue::String(x.to_owned());
    let toks: Vec<(String, i32)> = (0..256)
        .map(|i| match i {
            0 => ("<unk>".to_string(), 2),
            1 => ("<s>".to_string(), 3),
            2 => ("</s>".to_string(), 3),
            i => (format!("t{i}"), 1),
        })
        .collect();
    let md = vec![
        ("general.architecture".to_string(), s("llama")),
        ("tokenizer.ggml.model".to_string(), s("llama")),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(toks.iter().map(|t| s(&t.0)).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            MetaValue::Array((0..256).map(|i| MetaValue::F32(-(i as f32))).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(toks.iter().map(|t| MetaValue::I32(t.1)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), MetaValue::U32(2)),
    ];
    let f = GgufFile::from_bytes(
        &GgufWriter {
            metadata: md,
            ..Default::default()
        }
        .to_bytes(),
    )
    .unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        prompt,
        params: GenerationParameters {
            max_tokens,
            temperature: 0.0,
            stop_on_eos: false,
            ..Default::default()
        },
    }
}

/// Prompts of the given lengths, ids drawn from a fixed sequence.
fn prompts(lens: &[usize]) -> Vec<Vec<u32>> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    lens.iter()
        .map(|&l| {
            (0..l)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    3 + (x % 253) as u32
                })
                .collect()
        })
        .collect()
}

/// Runs `batches` of requests one after another through one scheduler (a batch is
/// submitted when the previous one has finished); returns the completions in order.
fn run(lm: &dyn LanguageModel, tok: &Tokenizer, cfg: EngineConfig, batches: &[Vec<SeqRequest>]) -> Vec<Completion> {
    let mut s = Scheduler::new(lm, tok, cfg).unwrap();
    let mut out = Vec::new();
    for reqs in batches {
        let rx: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (tx, rx) = std::sync::mpsc::channel();
                s.add(r.clone(), tx, Arc::new(AtomicBool::new(false))).unwrap();
                rx
            })
            .collect();
        let mut steps = 0;
        while !s.is_idle() {
            s.step().unwrap();
            s.pool().check_invariants();
            steps += 1;
            assert!(steps < 10_000, "the scheduler does not finish");
        }
        for r in rx {
            let done = r
                .try_iter()
                .find_map(|e| match e {
                    Event::Done(c) => Some(c),
                    _ => None,
                })
                .expect("a completion");
            out.push(done);
        }
    }
    out
}

fn config(lm: &dyn LanguageModel, max_seqs: usize, max_batch_tokens: usize) -> EngineConfig {
    EngineConfig::for_model(lm, 256, max_seqs, max_batch_tokens, None).unwrap()
}

fn batched_equals_alone(name: &str) {
    let lm = load(name);
    let tok = tokenizer();
    let lens = [70, 5, 100, 33, 64, 1, 90];
    let reqs: Vec<SeqRequest> = prompts(&lens).into_iter().map(|p| request(p, 12)).collect();
    let alone: Vec<Completion> = reqs
        .iter()
        .map(|r| run(&*lm, &tok, config(&*lm, 1, 512), &[vec![r.clone()]]).remove(0))
        .collect();
    // 8 sequences in steps of at most 48 rows: prefills are cut into chunks and mixed
    // with other sequences' decode rows.
    let together = run(&*lm, &tok, config(&*lm, 8, 48), std::slice::from_ref(&reqs));
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.token_ids.len(), 12, "{name}: sequence {i} ended early");
        assert_eq!(
            a.token_ids, b.token_ids,
            "{name}: sequence {i} differs alone and batched"
        );
    }
    // The one-sequence path (generate's) agrees on the first token after the prompt.
    for (i, r) in reqs.iter().enumerate() {
        let mut st = lm.new_state(256, 64).unwrap();
        let mut logits = Vec::new();
        lm.forward(&r.prompt, &mut st, false, &mut logits).unwrap();
        let first = ffai_kernels::ops::argmax(&logits).0 as u32;
        assert_eq!(
            first, alone[i].token_ids[0],
            "{name}: one-sequence path differs for {i}"
        );
    }
}

#[test]
fn lfm2_sequences_match_alone_and_batched() {
    batched_equals_alone("lfm2");
}

#[test]
fn mamba2_sequences_match_alone_and_batched() {
    batched_equals_alone("mamba2");
}

#[test]
fn nemotron_h_sequences_match_alone_and_batched() {
    batched_equals_alone("nemotron_h");
}

#[test]
fn granite4_sequences_match_alone_and_batched() {
    batched_equals_alone("granite4");
}

#[test]
fn qwen3_next_sequences_match_alone_and_batched() {
    batched_equals_alone("qwen3_next");
}

#[test]
fn hybrid_moe_sequences_match_alone_and_batched() {
    // The MoE variants: routing and the expert products are per row, so batching keeps
    // each sequence's bits.
    for name in [
        "qwen3_next_moe",
        "lfm2_moe",
        "nemotron_h_moe",
        "granite4_moe",
        "nemotron_h_moe_latent",
    ] {
        batched_equals_alone(name);
    }
}

#[test]
fn qwen3_5_sequences_match_alone_and_batched() {
    batched_equals_alone("qwen3_5");
}

#[test]
fn qwen3_5_moe_sequences_match_alone_and_batched() {
    batched_equals_alone("qwen3_5_moe");
}

#[test]
fn falcon_h1_sequences_match_alone_and_batched() {
    batched_equals_alone("falcon_h1");
}

#[test]
fn jamba_sequences_match_alone_and_batched() {
    batched_equals_alone("jamba");
}

#[test]
fn falcon_h1_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("falcon_h1");
}

#[test]
fn jamba_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("jamba");
}

#[test]
fn qwen3_next_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("qwen3_next");
}

#[test]
fn qwen3_next_preempted_sequences_give_the_same_tokens() {
    // The delta rule runs its recurrence on every row: cut-invariant, like LFM2's conv.
    let (alone, small) = preempted("qwen3_next");
    for (i, (a, b)) in alone.iter().zip(&small).enumerate() {
        assert_eq!(
            a.token_ids, b.token_ids,
            "qwen3_next: sequence {i} differs after preemption"
        );
    }
}

/// A pool of 6 blocks for 7 sequences of up to 4 blocks: sequences are preempted and
/// recomputed (their state from position 0, or from a state kept at their prompt).
fn preempted(name: &str) -> (Vec<Completion>, Vec<Completion>) {
    let lm = load(name);
    let tok = tokenizer();
    let lens = [70, 5, 100, 33, 64, 1, 90];
    let reqs: Vec<SeqRequest> = prompts(&lens).into_iter().map(|p| request(p, 12)).collect();
    let alone: Vec<Completion> = reqs
        .iter()
        .map(|r| run(&*lm, &tok, config(&*lm, 1, 512), &[vec![r.clone()]]).remove(0))
        .collect();
    let cfg = EngineConfig::for_model(&*lm, 256, 8, 48, Some(KvCacheSize::Tokens(192))).unwrap();
    let small = run(&*lm, &tok, cfg, &[reqs]);
    assert!(small.iter().any(|c| c.preemptions > 0), "{name}: nothing was preempted");
    for (i, c) in small.iter().enumerate() {
        assert_eq!(c.token_ids.len(), 12, "{name}: sequence {i} did not finish");
    }
    (alone, small)
}

#[test]
fn lfm2_preempted_sequences_give_the_same_tokens() {
    // Its convolutions sum the same taps in the same order however a sequence is cut, so
    // a recomputed sequence gives the same bits.
    let (alone, small) = preempted("lfm2");
    for (i, (a, b)) in alone.iter().zip(&small).enumerate() {
        assert_eq!(a.token_ids, b.token_ids, "lfm2: sequence {i} differs after preemption");
    }
}

#[test]
fn mamba2_preempted_sequences_finish() {
    // A recomputed Mamba 2 sequence cuts its scan into other pieces than its first run
    // (one prefill instead of decode steps), so only the last bits may differ: the run
    // completes with every sequence at its length.
    preempted("mamba2");
}

fn repeats_reuse_the_kept_state(name: &str) {
    let lm = load(name);
    let tok = tokenizer();
    let ps = prompts(&[75, 20]);
    let p = ps[0].clone();
    // Blocks of 32: `p`'s state is kept at 64 = floor(74 / 32) * 32. A prompt sharing those
    // 64 tokens resumes there too (a chat's next turn); one sharing 40 (one block, where no
    // state was kept) gets no reuse.
    let mut shares_64 = p[..64].to_vec();
    shares_64.extend_from_slice(&ps[1]);
    let mut shares_40 = p[..40].to_vec();
    shares_40.extend_from_slice(&ps[1]);
    let first = request(p.clone(), 10);
    let out = run(
        &*lm,
        &tok,
        config(&*lm, 4, 64),
        &[
            vec![first.clone()],
            vec![first.clone()],
            vec![request(shares_64.clone(), 10)],
            vec![request(shares_40.clone(), 10)],
        ],
    );
    assert_eq!(out[0].cached_tokens, 0, "{name}");
    assert_eq!(out[1].cached_tokens, 64, "{name}: the repeat reuses the kept state");
    assert_eq!(out[1].token_ids, out[0].token_ids, "{name}: the repeat's tokens differ");
    assert_eq!(out[2].cached_tokens, 64, "{name}: a prompt extending the kept prefix");
    assert_eq!(out[3].cached_tokens, 0, "{name}: a shared prefix without a kept state");
    // Computed from scratch on fresh schedulers: the same tokens.
    for (i, prompt) in [(2, shares_64), (3, shares_40)] {
        let fresh = run(&*lm, &tok, config(&*lm, 4, 64), &[vec![request(prompt, 10)]]);
        assert_eq!(fresh[0].cached_tokens, 0);
        assert_eq!(
            fresh[0].token_ids, out[i].token_ids,
            "{name}: request {i} differs from a fresh run"
        );
    }
}

#[test]
fn lfm2_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("lfm2");
}

#[test]
fn mamba2_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("mamba2");
}

#[test]
fn nemotron_h_prompt_repeats_reuse_the_kept_state() {
    repeats_reuse_the_kept_state("nemotron_h");
}
