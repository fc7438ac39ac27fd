//! The real Gemma-3-270M Q4_K_M checkpoint (gemma3 GGUF: Q4_K, Q5_0, Q6_K, Q8_0 weights,
//! local/global layers, 262k vocabulary): llama.cpp's greedy tokens, coherent text, and
//! chunked prefill across the sliding window.

mod common;

use std::sync::OnceLock;

use common::{real_model, GEMMA3};
use ffai::{GenerationParameters, LoadOptions, Model};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(real_model(GEMMA3).to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn greedy(max_tokens: usize) -> GenerationParameters {
    GenerationParameters {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn loads_as_gemma3_with_local_and_global_layers() {
    let m = model();
    assert_eq!(m.lm.family(), "gemma");
    assert_eq!(m.lm.variant(), "gemma3");
    let c = m.lm.config();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.head_dim, c.vocab_size),
        (18, 640, 256, 262144)
    );
    // Every 6th layer is global: 3 global layers, 15 with a 512-token window whose
    // cache holds a ring of 32-position blocks covering window + chunk - 1 rows at any
    // alignment (33 blocks) however long the context is.
    let kinds = m.lm.kv_bytes_by_kind(32768, 512);
    let global = kinds.iter().find(|k| k.0 == "global").unwrap();
    let local = kinds.iter().find(|k| k.0 == "window 512").unwrap();
    assert_eq!((global.1, local.1), (3, 15));
    let per_row = 2 * c.num_kv_heads * c.head_dim * 2;
    assert_eq!(global.2, 3 * 32768 * per_row);
    assert_eq!(local.2, 15 * 33 * 32 * per_row);
}

/// llama.cpp's greedy output on the same file (tests/fixtures/llamacpp_greedy_gemma3.json):
/// 32 tokens of each of three prompts.
/// * "Once upon a time" and "The capital of France is": all 32 agree.
/// * "Once upon a time, in a quiet village": 6 tokens agree (", there lived a man
///   named"); then " Mr" (ours) leads " John" (llama.cpp) by 0.041 logits, where llama.cpp
///   has " John" ahead by 0.047 (its top-2 log-probabilities from llama-server, same
///   build and file): a near-tie that rounding decides. (llama.cpp's own tools part
///   later on: llama-server continues " He was a farmer" where llama-completion writes
///   " He was a kind", 0.021 apart.)
#[test]
fn greedy_continuations_match_llama_cpp() {
    let m = model();
    let cases = common::llama_cpp_cases("llamacpp_greedy_gemma3.json");
    // (tokens that agree, largest logit gap allowed where they part): see above.
    let expect = [(32, 0.0), (6, 0.05), (32, 0.0)];
    assert_eq!(cases.len(), expect.len());
    let got: Vec<_> = cases.iter().map(|c| common::compare_with_llama_cpp(m, c)).collect();
    for ((case, c), (agree, max_gap)) in cases.iter().zip(&got).zip(expect) {
        common::assert_agrees_with_llama_cpp(case, c, agree, max_gap);
    }
}

#[test]
fn village_story_greedy_and_sampled_are_coherent() {
    let m = model();
    let story = m.encode("Once upon a time, in a quiet village").unwrap();
    // Greedy decoding of this 270M model drifts into repetition late in 200 tokens
    // (llama.cpp's own run scores 0.204 distinct/total), so which loop it picks depends
    // on near-ties 0.1-0.2 logits apart; the bar is the foundation issue's.
    let greedy_out = m.generate(&story, &greedy(200), |_| true).unwrap();
    println!("Gemma 3 village greedy: {:?}", greedy_out.text);
    assert_eq!(greedy_out.generated_ids.len(), 200);
    assert_coherent(&greedy_out.generated_ids);
    // The family's sampling defaults must be coherent too, and seeded runs repeatable.
    let p = GenerationParameters {
        max_tokens: 200,
        seed: Some(1),
        ..m.default_parameters()
    };
    assert_eq!((p.temperature, p.top_k, p.top_p), (1.0, 64, 0.95), "Gemma's defaults");
    let out = m.generate(&story, &p, |_| true).unwrap();
    println!("Gemma 3 village (T 1.0, top-k 64, top-p 0.95, seed 1): {:?}", out.text);
    assert_eq!(out.generated_ids.len(), 200);
    assert_coherent(&out.generated_ids);
    assert_eq!(
        m.generate(&story, &p, |_| true).unwrap().generated_ids,
        out.generated_ids,
        "seeded runs differ"
    );
}

#[test]
fn long_prompt_crosses_the_window_in_chunks() {
    // 700+ tokens: local layers' ring buffers wrap during chunked prefill; the logits
    // must equal a prefill in one chunk, bit for bit: every matmul entry point gives the
    // same bits within one CPU level, and each token's attention runs over the same
    // positions in the same order whatever the ring's layout. Two threads: a chunk with
    // fewer than 4 · threads tokens (per KV head) would have its attention positions split
    // into parts merged afterwards (flash-decoding), which rounds differently; with 2
    // threads every chunk here has at least 8 tokens, on any machine.
    let m = Model::load(
        real_model(GEMMA3).to_str().unwrap(),
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(70);
    let ids = m.encode(&text).unwrap();
    assert!(ids.len() > 600, "{}", ids.len());
    assert!(ids.len() % 128 >= 8, "{}", ids.len());
    let run = |chunk: usize| {
        let mut st = m.lm.new_state(ids.len() + 1, chunk).unwrap();
        let mut l = Vec::new();
        m.lm.forward(&ids, &mut st, false, &mut l).unwrap();
        l
    };
    let (a, b) = (run(1024), run(128));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "chunked prefill differs by {d}");
}

fn assert_coherent(ids: &[u32]) {
    assert!(ids.len() >= 50, "only {} tokens", ids.len());
    let mut run = 1;
    for w in ids.windows(2) {
        run = if w[0] == w[1] { run + 1 } else { 1 };
        assert!(run <= 5, "token {} repeated {run} times", w[1]);
    }
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct as f64 / ids.len() as f64 >= 0.2, "distinct/total too low");
}
