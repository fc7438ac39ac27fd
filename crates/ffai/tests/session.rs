//! Multi-turn prompt reuse: a `Session` prefills only what follows the cached prefix,
//! and the logits equal a fresh full prefill.

mod common;

use std::path::Path;

use ffai::config::ModelConfig;
use ffai::generate::Session;
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::Weights;
use ffai::{LoadOptions, Model};

fn fresh(m: &dyn LanguageModel, prompt: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(256, 4).unwrap();
    let mut l = Vec::new();
    m.forward(prompt, &mut st, false, &mut l).unwrap();
    l
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The logits of a reused prefix equal a fresh prefill's bit for bit: every matmul entry
/// point gives the same bits within one CPU level (ARCHITECTURE.md), and these contexts
/// (a window of 16; under 64 positions) never split a token's attention into parts.
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got), bits(want), "{what}: max abs diff {}", max_diff(got, want));
}

/// The Mistral parity fixture: sliding window 16; with a prefill chunk of 4 a
/// one-sequence state's window layers keep a ring of 2 blocks of 32 positions.
fn mistral() -> Box<dyn LanguageModel> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/mistral");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, "mistral").unwrap();
    let w = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    (family_for(&cfg, false).unwrap().load)(&cfg, &w, &Device::cpu_with(2, false, true)).unwrap()
}

#[test]
fn second_turn_prefills_only_new_tokens_across_a_sliding_window() {
    let m = mistral();
    let ids: Vec<u32> = (0..160).map(|i| (i * 37 + 11) % 256).collect();
    let mut s = Session::new(&*m, 256, 4).unwrap();
    let mut logits = Vec::new();
    // Turn 1: a prompt, then five "generated" tokens fed one by one.
    assert_eq!(s.prefill(&*m, &ids[..100], &mut logits).unwrap(), 100);
    for &t in &ids[100..105] {
        s.push(&*m, t, &mut logits).unwrap();
    }
    // Turn 2: the conversation so far plus a new message: only those 25 tokens run.
    assert_eq!(s.prefill(&*m, &ids[..130], &mut logits).unwrap(), 25);
    assert_same_bits(&logits, &fresh(&*m, &ids[..130]), "reused prefix vs a fresh prefill");
    // The same prompt again: only its last token is recomputed.
    assert_eq!(s.prefill(&*m, &ids[..130], &mut logits).unwrap(), 1);
    assert_same_bits(&logits, &fresh(&*m, &ids[..130]), "same prompt again");
    // An edit far back: the window's ring no longer holds what the short shared prefix
    // needs, so everything is recomputed (and still correct).
    let mut edited = ids[..10].to_vec();
    edited.extend_from_slice(&ids[40..55]);
    assert_eq!(s.prefill(&*m, &edited, &mut logits).unwrap(), edited.len());
    assert_same_bits(&logits, &fresh(&*m, &edited), "edit far back");
    // A recent edit inside the ring's reach reuses the prefix.
    let mut near = edited[..22].to_vec();
    near.extend_from_slice(&[7, 8, 9]);
    assert_eq!(s.prefill(&*m, &near, &mut logits).unwrap(), 3);
    assert_same_bits(&logits, &fresh(&*m, &near), "recent edit");
}

#[test]
fn real_model_turn_two_reuses_turn_one() {
    let m = Model::load(
        common::real_model(common::SMOLLM2).to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let turn1 = m
        .encode("<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n")
        .unwrap();
    let mut turn2 = turn1.clone();
    turn2.extend(
        m.encode("<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")
            .unwrap(),
    );
    let mut s = Session::new(&*m.lm, 256, 512).unwrap();
    let mut logits = Vec::new();
    s.prefill(&*m.lm, &turn1, &mut logits).unwrap();
    let computed = s.prefill(&*m.lm, &turn2, &mut logits).unwrap();
    assert_eq!(computed, turn2.len() - turn1.len());
    let mut st = m.lm.new_state(256, 512).unwrap();
    let mut want = Vec::new();
    m.lm.forward(&turn2, &mut st, false, &mut want).unwrap();
    assert!(turn2.len() <= 64, "{}", turn2.len());
    assert_same_bits(&logits, &want, "turn two");
}

#[test]
fn session_generate_matches_a_fresh_generate_and_reuses_the_prefix() {
    let m = Model::load(
        common::real_model(common::SMOLLM2).to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let p = ffai::GenerationParameters {
        temperature: 0.0,
        max_tokens: 12,
        ..Default::default()
    };
    let mut conv = vec![ffai::chat::Message::user("Name a color.")];
    let turn1 = m.encode(&m.render_chat(&conv, true).unwrap()).unwrap();
    let mut s = Session::new(&*m.lm, 512, 512).unwrap();
    let mut streamed = String::new();
    let out1 = s
        .generate(&*m.lm, &m.tokenizer, &turn1, &p, |_, t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(out1.prefill_computed, turn1.len());
    assert_eq!(streamed, out1.text);
    assert!(!out1.text.is_empty());
    // No think block: everything is answer.
    assert_eq!(
        (out1.reasoning.as_str(), out1.answer.as_str()),
        ("", out1.text.as_str())
    );
    assert_eq!(
        (out1.reasoning_tokens, out1.answer_tokens),
        (0, out1.generated_ids.len())
    );
    conv.push(ffai::chat::Message::assistant(out1.text.clone()));
    conv.push(ffai::chat::Message::user("Another one?"));
    let turn2 = m.encode(&m.render_chat(&conv, true).unwrap()).unwrap();
    let out2 = s.generate(&*m.lm, &m.tokenizer, &turn2, &p, |_, _| true).unwrap();
    // Turn 1's prompt at least comes from the cache.
    assert!(
        out2.prefill_computed <= turn2.len() - turn1.len(),
        "{}",
        out2.prefill_computed
    );
    let fresh = m.generate(&turn2, &p, |_| true).unwrap();
    assert_eq!(out2.generated_ids, fresh.generated_ids);
    assert_eq!(out2.text, fresh.text);
}

#[test]
fn a_prompt_that_opens_think_makes_the_reply_reasoning() {
    let m = Model::load(
        common::real_model(common::SMOLLM2).to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let p = ffai::GenerationParameters {
        temperature: 0.0,
        max_tokens: 10,
        ..Default::default()
    };
    let plain = m
        .encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    assert!(!ffai::generate::prompt_opens_think(&m.tokenizer, &plain));
    let thinking = m
        .encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n")
        .unwrap();
    assert!(ffai::generate::prompt_opens_think(&m.tokenizer, &thinking));
    let mut kinds = Vec::new();
    let out = ffai::generate::generate_split(&*m.lm, &m.tokenizer, &thinking, &p, |k, t| {
        kinds.push((k, t.to_string()));
        true
    })
    .unwrap();
    assert!(!out.text.is_empty());
    assert_eq!(out.reasoning_tokens + out.answer_tokens, out.generated_ids.len());
    // Put back together, the pieces are the text; what precedes a closing tag is reasoning.
    assert_eq!(kinds.iter().map(|k| k.1.as_str()).collect::<String>(), out.text);
    match out.text.find("</think>") {
        None => {
            assert!(
                kinds.iter().all(|k| k.0 == ffai::generate::TextKind::Reasoning),
                "{kinds:?}"
            );
            assert_eq!(out.reasoning, out.text.trim_matches('\n'));
            assert_eq!((out.answer.as_str(), out.answer_tokens), ("", 0));
        }
        Some(i) => assert_eq!(out.reasoning, out.text[..i].trim_matches('\n')),
    }
}
