//! The batched engine on real checkpoints: a sequence's tokens are the same alone or in a
//! batch of 64 (greedy and seeded sampling), across mixed prompt lengths, chunked prefill,
//! preemption in a pool too small for everyone, and prefix-cache hits; the one-sequence
//! `generate` path agrees with the engine; the threaded engine streams and cancels; bad
//! requests are refused at submission.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{real_model, GEMMA3, SMOLLM2};
use ffai::engine::{Completion, Engine, EngineConfig, Event, FinishReason, KvCacheSize, Scheduler, SeqRequest};
use ffai::{GenerationParameters, LoadOptions, Model};

fn load(file: &str) -> Model {
    Model::load(real_model(file).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn smollm2() -> &'static Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(SMOLLM2)))
}

fn gemma3() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(GEMMA3))
}

fn params(max_tokens: usize, temperature: f32, seed: u64) -> GenerationParameters {
    GenerationParameters {
        max_tokens,
        temperature,
        top_p: 0.95,
        seed: Some(seed),
        stop_on_eos: false,
        ..Default::default()
    }
}

/// `n` prompts of mixed lengths (3 to ~180 tokens) cut from a long text at varied places.
fn prompts(m: &Model, n: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let ids = m.encode(&text).unwrap();
    (0..n)
        .map(|i| {
            let start = (i * 397) % 4000;
            let len = 3 + (i * 53) % 180;
            ids[start..start + len].to_vec()
        })
        .collect()
}

fn config(m: &Model, max_seqs: usize, max_batch_tokens: usize, kv: Option<KvCacheSize>) -> EngineConfig {
    EngineConfig::for_model(&*m.lm, 1024, max_seqs, max_batch_tokens, kv).unwrap()
}

fn run(m: &Model, cfg: EngineConfig, reqs: &[SeqRequest]) -> (Vec<Completion>, ffai::engine::SchedulerStats) {
    common::run_scheduler(m, cfg, reqs)
}

/// Each request alone in an engine of one sequence.
fn alone(m: &Model, reqs: &[SeqRequest]) -> Vec<Completion> {
    reqs.iter()
        .map(|r| run(m, config(m, 1, 512, None), std::slice::from_ref(r)).0.remove(0))
        .collect()
}

fn assert_same_tokens(got: &[Completion], want: &[Completion], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.token_ids, w.token_ids, "{what}: sequence {i} differs");
        assert_eq!(g.text, w.text, "{what}: sequence {i} text differs");
    }
}

/// Steps whose samplers decide from the rows' top candidates (`StepOut::Candidates`) pick
/// the tokens the whole rows pick: the same requests with `logprobs` (which never changes
/// a token but needs whole rows, so those steps download them) give the same tokens, in
/// the engine (mixed with greedy rows) and in the one-sequence `generate` path. Top-k,
/// top-p (its total adds the tail mass), min-p, and top-p with a top-k.
#[test]
fn candidate_steps_pick_what_whole_rows_pick() {
    let m = smollm2();
    let ps = prompts(m, 8);
    let sampled = |i: usize| {
        let mut p = params(16, [0.0, 0.8, 0.7, 1.0][i % 4], 100 + i as u64);
        match i % 4 {
            1 => (p.top_k, p.top_p) = (40, 1.0),
            2 => p.top_p = 0.9,
            3 => (p.top_p, p.min_p) = (1.0, 0.1),
            _ => {}
        }
        if i >= 4 {
            p.top_k = 20;
        }
        p
    };
    let reqs: Vec<SeqRequest> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| SeqRequest {
            prompt: p.clone(),
            params: sampled(i),
        })
        .collect();
    let whole: Vec<SeqRequest> = reqs
        .iter()
        .map(|r| SeqRequest {
            prompt: r.prompt.clone(),
            params: GenerationParameters {
                logprobs: Some(0),
                ..r.params.clone()
            },
        })
        .collect();
    let (got, _) = run(m, config(m, 8, 256, None), &reqs);
    let (want, _) = run(m, config(m, 8, 256, None), &whole);
    assert_same_tokens(&got, &want, "candidates vs whole rows");
    for (i, (r, w)) in reqs.iter().zip(&whole).enumerate() {
        let a = ffai::generate(&*m.lm, &m.tokenizer, &r.prompt, &r.params, |_| true).unwrap();
        let b = ffai::generate(&*m.lm, &m.tokenizer, &w.prompt, &w.params, |_| true).unwrap();
        assert_eq!(
            a.generated_ids, b.generated_ids,
            "generate, candidates vs whole rows, sequence {i}"
        );
        assert_eq!(a.generated_ids, got[i].token_ids, "generate vs engine, sequence {i}");
    }
}

#[test]
fn sixty_four_sequences_match_each_alone_greedy_and_sampled() {
    let m = smollm2();
    let ps = prompts(m, 64);
    // Half greedy, half sampled with their own seeds.
    let reqs: Vec<SeqRequest> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| SeqRequest {
            prompt: p.clone(),
            params: params(12, if i % 2 == 0 { 0.0 } else { 0.9 }, i as u64),
        })
        .collect();
    let want = alone(m, &reqs);
    // All 64 at once, in steps of 256 rows: prefill chunks and decode rows mix.
    let (got, st) = run(m, config(m, 64, 256, None), &reqs);
    assert_same_tokens(&got, &want, "batch of 64");
    assert!(st.steps < want.iter().map(|c| c.token_ids.len() as u64).sum::<u64>());
    assert_eq!(st.preemptions, 0);
    // The greedy ones also equal the one-sequence `generate` path.
    for (i, r) in reqs.iter().enumerate().step_by(2).take(6) {
        let out = ffai::generate(&*m.lm, &m.tokenizer, &r.prompt, &r.params, |_| true).unwrap();
        assert_eq!(out.generated_ids, want[i].token_ids, "generate vs engine, sequence {i}");
    }
}

#[test]
fn preemption_in_a_small_pool_changes_no_token() {
    let m = smollm2();
    let ps = prompts(m, 16);
    let reqs: Vec<SeqRequest> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| SeqRequest {
            prompt: p.clone(),
            params: params(24, if i % 3 == 0 { 0.7 } else { 0.0 }, 100 + i as u64),
        })
        .collect();
    let want = alone(m, &reqs);
    // 640 positions for 16 sequences of up to ~200 tokens: they cannot all be resident.
    let cfg = EngineConfig::for_model(&*m.lm, 256, 16, 128, Some(KvCacheSize::Tokens(640))).unwrap();
    let (got, st) = run(m, cfg, &reqs);
    assert!(st.preemptions > 0, "the pool was meant to be too small: {st:?}");
    assert_same_tokens(&got, &want, "with preemption");
    assert!(got.iter().any(|c| c.preemptions > 0));
}

#[test]
fn shared_prefixes_hit_the_cache_and_change_no_token() {
    let m = smollm2();
    let system = m
        .encode("You are a careful assistant. Answer in one short paragraph, and never invent facts that the user did not give you. ")
        .unwrap();
    let mut system = system.repeat(4);
    system.truncate(100);
    let questions = [
        "What is a GPU?",
        "Name three rivers.",
        "Why is the sky blue?",
        "What is Rust?",
        "Who wrote Hamlet?",
        "What is 2 + 2?",
    ];
    let reqs: Vec<SeqRequest> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut p = system.clone();
            p.extend(m.encode(q).unwrap());
            SeqRequest {
                prompt: p,
                params: params(10, if i % 2 == 1 { 0.8 } else { 0.0 }, i as u64),
            }
        })
        .collect();
    let want = alone(m, &reqs);
    // One sequence at a time through one engine: each later one finds the system prompt's
    // full blocks (96 of its 100 tokens, blocks of 32) in the cache.
    let (got, st) = run(m, config(m, 1, 64, None), &reqs);
    assert_same_tokens(&got, &want, "prefix cache");
    assert_eq!(got[0].cached_tokens, 0);
    for c in &got[1..] {
        assert_eq!(c.cached_tokens, 96, "{c:?}");
    }
    assert_eq!(st.prefix_hit_tokens, 96 * 5);
    // And all at once: the first to commit a block shares it with later admissions.
    let (got, _) = run(m, config(m, 6, 512, None), &reqs);
    assert_same_tokens(&got, &want, "prefix cache, batched");
}

#[test]
fn sliding_window_model_batched_with_preemption() {
    // Gemma 3: 512-position windows on 5 of 6 layers (two KV groups); prompts past the
    // window, a pool that forces preemption, prefix hits on the recomputation.
    let m = gemma3();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let ids = m.encode(&text).unwrap();
    let reqs: Vec<SeqRequest> = (0..6)
        .map(|i| SeqRequest {
            prompt: ids[i * 50..i * 50 + 520 + i * 30].to_vec(),
            params: params(16, if i % 2 == 0 { 0.0 } else { 0.8 }, i as u64),
        })
        .collect();
    let want: Vec<Completion> = reqs
        .iter()
        .map(|r| {
            let cfg = EngineConfig::for_model(&*m.lm, 1024, 1, 512, None).unwrap();
            run(m, cfg, std::slice::from_ref(r)).0.remove(0)
        })
        .collect();
    let cfg = EngineConfig::for_model(&*m.lm, 1024, 6, 256, Some(KvCacheSize::Tokens(3200))).unwrap();
    let (got, st) = run(m, cfg, &reqs);
    assert!(st.preemptions > 0, "{st:?}");
    assert_same_tokens(&got, &want, "gemma3 batched");
    for (i, (r, w)) in reqs.iter().zip(&want).enumerate().filter(|(i, _)| i % 2 == 0) {
        let out = ffai::generate(&*m.lm, &m.tokenizer, &r.prompt, &r.params, |_| true).unwrap();
        assert_eq!(out.generated_ids, w.token_ids, "generate vs engine, sequence {i}");
    }
}

#[test]
fn bad_requests_are_refused_at_submission() {
    let m = smollm2();
    let cfg = config(m, 4, 512, Some(KvCacheSize::Tokens(256)));
    let s = Scheduler::new(&*m.lm, &m.tokenizer, cfg).unwrap();
    let req = |prompt: Vec<u32>, max_tokens| SeqRequest {
        prompt,
        params: params(max_tokens, 0.0, 0),
    };
    let msg = |r: &SeqRequest| s.check(r).unwrap_err().to_string();
    assert!(msg(&req(vec![], 4)).contains("empty"), "{}", msg(&req(vec![], 4)));
    assert!(msg(&req(vec![1; 1024], 4)).contains("context"));
    assert!(msg(&req(vec![u32::MAX], 4)).contains("vocabulary"));
    // 200 + 100 tokens need 10 blocks of 32; the pool has 8.
    let e = msg(&req(vec![1; 200], 100));
    assert!(e.contains("KV blocks") && e.contains("--kv-cache-size"), "{e}");
    let mut bad = req(vec![1; 10], 4);
    bad.params.top_p = 0.0;
    assert!(msg(&bad).contains("top_p"));
    // A huge max_tokens is capped by the context, not refused.
    assert!(
        s.check(&req(vec![1; 10], usize::MAX)).is_err(),
        "more than the pool holds"
    );
    let cfg = config(m, 4, 512, None);
    let s = Scheduler::new(&*m.lm, &m.tokenizer, cfg).unwrap();
    s.check(&req(vec![1; 10], usize::MAX)).unwrap();
    // A pool smaller than the context still serves what fits in it.
    let cfg = EngineConfig::for_model(&*m.lm, 1024, 4, 512, Some(KvCacheSize::Tokens(100))).unwrap();
    let s = Scheduler::new(&*m.lm, &m.tokenizer, cfg).unwrap();
    s.check(&req(vec![1; 10], 50)).unwrap();
    assert!(s.check(&req(vec![1; 100], 50)).is_err());
    assert!(KvCacheSize::parse("12 parsecs").is_err());
    assert_eq!(KvCacheSize::parse("2GiB").unwrap(), KvCacheSize::Bytes(2 << 30));
    assert_eq!(KvCacheSize::parse("4096").unwrap(), KvCacheSize::Tokens(4096));
}

#[test]
fn threaded_engine_streams_cancels_and_keeps_serving() {
    let m = smollm2().clone();
    let cfg = config(&m, 8, 256, None);
    let engine = Engine::start(m.clone(), cfg).unwrap();
    let ps = prompts(&m, 5);
    let req = |i: usize, max_tokens| SeqRequest {
        prompt: ps[i].clone(),
        params: params(max_tokens, 0.0, 0),
    };
    let want = alone(&m, &[req(0, 20)]).remove(0);
    // Submitted from several threads at once.
    let handles: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let e = &engine;
                let r = req(if i == 3 { 0 } else { i + 1 }, if i == 2 { 100_000 } else { 20 });
                sc.spawn(move || e.submit(r).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut it = handles.into_iter();
    let (h1, h2, h_long, h0) = (
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap(),
    );
    // The stream's tokens and text add up to the completion.
    let (mut ids, mut text) = (Vec::new(), String::new());
    let done = loop {
        match h0
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("an event within a minute")
        {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text += &t;
            }
            Event::Text(t) => text += &t,
            Event::Done(c) => break c,
        }
    };
    assert_eq!(done.token_ids, ids);
    assert_eq!(done.text, text);
    assert_eq!(done.token_ids, want.token_ids, "threaded engine vs alone");
    // Cancel the long one after its first token; the others are unaffected.
    assert!(matches!(
        h_long.recv_timeout(Duration::from_secs(60)).unwrap(),
        Some(Event::Token { .. })
    ));
    h_long.cancel();
    let c = h_long.wait().unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert!(c.token_ids.len() < 1000);
    assert_eq!(h1.wait().unwrap().finish_reason, FinishReason::Length);
    drop(h2); // dropping a handle cancels its request
              // Still serving: a bad request is refused, a good one runs.
    assert!(engine.submit(req(0, 0)).is_ok());
    assert!(engine
        .submit(SeqRequest {
            prompt: vec![],
            params: params(4, 0.0, 0)
        })
        .is_err());
    assert_eq!(
        engine.submit(req(0, 20)).unwrap().wait().unwrap().token_ids,
        want.token_ids
    );
    let st = engine.stats();
    assert!(st.last_error.is_none(), "{st:?}");
    engine.shutdown();
    assert!(engine.submit(req(0, 4)).is_err());
}
