//! Constrained decoding on the real checkpoints: for a set of JSON schemas (nested
//! objects, bounded arrays, enums, integer ranges, optional fields, anyOf) every greedy
//! and sampled output of both models parses and validates (the `jsonschema` crate), ends
//! because the JSON is complete (not at the token limit), and batched sequences with
//! different grammars each keep to their own; regexes and Lark grammars match; invalid
//! schemas, regexes and grammars are one-line errors.

mod common;

use std::sync::OnceLock;

use common::{real_model, run_scheduler, GEMMA3, SMOLLM2};
use ffai::constrain::{Constraint, ResponseFormat};
use ffai::engine::{EngineConfig, FinishReason, KvCacheSize, SeqRequest};
use ffai::generate::{generate, GenerationParameters, StopReason};
use ffai::{LoadOptions, Model};
use serde_json::{json, Value};

fn model(file: &str) -> &'static Model {
    static S: OnceLock<Model> = OnceLock::new();
    static G: OnceLock<Model> = OnceLock::new();
    let cell = if file == SMOLLM2 { &S } else { &G };
    cell.get_or_init(|| Model::load(real_model(file).to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "person",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "city": {"enum": ["Paris", "London", "Tokyo"]}},
              "required": ["name", "age", "city"], "additionalProperties": false}),
        ),
        (
            "nested",
            json!({"type": "object", "properties": {
                "title": {"type": "string", "maxLength": 16},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
                "author": {"type": "object", "properties": {
                    "first": {"type": "string", "maxLength": 10},
                    "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
                  "required": ["first", "year"], "additionalProperties": false},
                "draft": {"type": "boolean"}},
              "required": ["title", "tags", "author"], "additionalProperties": false}),
        ),
        (
            "any_of",
            json!({"type": "object", "properties": {
                "value": {"anyOf": [
                    {"type": "integer", "minimum": -50, "maximum": 50},
                    {"type": "string", "maxLength": 6},
                    {"type": "null"}]},
                "unit": {"enum": ["kg", "m", "s"]}},
              "required": ["value"], "additionalProperties": false}),
        ),
    ]
}

fn params(temperature: f32, seed: u64, format: ResponseFormat) -> GenerationParameters {
    GenerationParameters {
        temperature,
        seed: Some(seed),
        max_tokens: 160,
        response_format: Some(format),
        ..Default::default()
    }
}

/// Parses `text` and checks it against `schema`.
fn assert_valid(schema: &Value, text: &str, what: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:?}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(&v) {
        panic!("{what}: {text:?} does not match the schema: {e}");
    }
}

#[test]
fn json_schemas_hold_greedy_and_sampled_on_both_models() {
    for file in [SMOLLM2, GEMMA3] {
        let m = model(file);
        let prompt = m
            .tokenizer
            .encode(
                "Reply with one JSON record about a book or a person:",
                m.tokenizer.add_bos_default(),
            )
            .unwrap();
        for (name, schema) in schemas() {
            for (temperature, seed) in [(0.0, 0), (0.8, 1), (1.0, 2)] {
                let p = params(temperature, seed, ResponseFormat::JsonSchema(schema.clone()));
                let out = generate(&*m.lm, &m.tokenizer, &prompt, &p, |_| true).unwrap();
                let what = format!("{file} {name} t={temperature}");
                assert_ne!(
                    out.stop_reason,
                    StopReason::MaxTokens,
                    "{what}: ran to the token limit: {:?}",
                    out.text
                );
                assert_valid(&schema, &out.text, &what);
            }
        }
    }
}

#[test]
fn json_object_regex_and_lark_hold() {
    let m = model(SMOLLM2);
    let prompt = m.tokenizer.encode("Answer:", false).unwrap();
    // A JSON object (anything inside): parses and is an object, when it completes.
    for seed in 0..3 {
        let p = params(0.9, seed, ResponseFormat::JsonObject);
        let out = generate(&*m.lm, &m.tokenizer, &prompt, &p, |_| true).unwrap();
        assert!(out.text.starts_with('{'), "json_object: {:?}", out.text);
        if out.stop_reason != StopReason::MaxTokens {
            let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {:?}", out.text));
            assert!(v.is_object());
        }
    }
    // A regex: the whole output matches.
    let re = "(yes|no), [0-9]{2,3} (cats|dogs)";
    let full = matches_yes_no_animals;
    for (t, seed) in [(0.0, 0), (1.0, 5), (1.0, 6)] {
        let p = params(t, seed, ResponseFormat::Regex(re.into()));
        let out = generate(&*m.lm, &m.tokenizer, &prompt, &p, |_| true).unwrap();
        assert!(full(&out.text), "regex t={t}: {:?}", out.text);
        assert_eq!(out.stop_reason, StopReason::EndOfGeneration, "{:?}", out.text);
    }
    // A Lark grammar.
    let lark = "start: \"color: \" COLOR (\", \" COLOR)?\nCOLOR: \"red\" | \"green\" | \"blue\"\n";
    for (t, seed) in [(0.0, 0), (1.0, 9)] {
        let p = params(t, seed, ResponseFormat::Lark(lark.into()));
        let out = generate(&*m.lm, &m.tokenizer, &prompt, &p, |_| true).unwrap();
        let rest = out
            .text
            .strip_prefix("color: ")
            .unwrap_or_else(|| panic!("lark: {:?}", out.text));
        assert!(
            rest.split(", ").count() <= 2 && rest.split(", ").all(|c| ["red", "green", "blue"].contains(&c)),
            "lark: {:?}",
            out.text
        );
    }
}

/// Whether `s` matches `(yes|no), [0-9]{2,3} (cats|dogs)` whole, checked by hand.
fn matches_yes_no_animals(s: &str) -> bool {
    let Some((yn, rest)) = s.split_once(", ") else {
        return false;
    };
    let Some((num, animal)) = rest.split_once(' ') else {
        return false;
    };
    ["yes", "no"].contains(&yn)
        && (2..=3).contains(&num.len())
        && num.bytes().all(|b| b.is_ascii_digit())
        && ["cats", "dogs"].contains(&animal)
}

#[test]
fn batched_sequences_each_keep_their_own_grammar() {
    let m = model(SMOLLM2);
    let all = schemas();
    let prompt = m.tokenizer.encode("JSON please:", false).unwrap();
    let mut reqs = Vec::new();
    for i in 0..9 {
        let (_, schema) = &all[i % all.len()];
        let t = if i < 3 { 0.0 } else { 0.9 };
        reqs.push(SeqRequest {
            prompt: prompt.clone(),
            params: params(t, i as u64, ResponseFormat::JsonSchema(schema.clone())),
        });
    }
    // An unconstrained greedy sequence in the same steps is untouched by the others.
    reqs.push(SeqRequest {
        prompt: prompt.clone(),
        params: GenerationParameters {
            temperature: 0.0,
            max_tokens: 12,
            ..Default::default()
        },
    });
    let cfg = EngineConfig::for_model(&*m.lm, 512, 10, 256, Some(KvCacheSize::Tokens(4096))).unwrap();
    let (done, _) = run_scheduler(m, cfg, &reqs);
    for (i, c) in done.iter().take(9).enumerate() {
        let (name, schema) = &all[i % all.len()];
        assert_eq!(c.finish_reason, FinishReason::Stop, "seq {i} ({name}): {:?}", c.text);
        assert_valid(schema, &c.text, &format!("batched seq {i} ({name})"));
    }
    let alone = generate(&*m.lm, &m.tokenizer, &prompt, &reqs[9].params, |_| true).unwrap();
    assert_eq!(done[9].token_ids, alone.generated_ids, "the unconstrained sequence");
}

#[test]
fn invalid_formats_are_one_line_errors() {
    let tok = &model(SMOLLM2).tokenizer;
    let bad = [
        ResponseFormat::JsonSchema(json!({"type": "no-such-type"})),
        ResponseFormat::Regex("(unclosed".into()),
        ResponseFormat::Lark("start: undefined_rule\n".into()),
    ];
    for f in bad {
        let e = Constraint::new(tok, &f)
            .err()
            .unwrap_or_else(|| panic!("{f:?} compiled"));
        let msg = e.message();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{f:?}: {msg:?}");
    }
    // The OpenAI request object.
    assert_eq!(ResponseFormat::from_openai(&json!({"type": "text"})).unwrap(), None);
    assert_eq!(
        ResponseFormat::from_openai(&json!({"type": "json_object"})).unwrap(),
        Some(ResponseFormat::JsonObject)
    );
    let s = json!({"type": "object"});
    assert_eq!(
        ResponseFormat::from_openai(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}}))
            .unwrap(),
        Some(ResponseFormat::JsonSchema(s))
    );
    for v in [
        json!("json_object"),
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "regex"}),
    ] {
        assert!(ResponseFormat::from_openai(&v).is_err(), "{v}");
    }
}

/// Constrained rows decide from their top candidates with the grammar's mask applied to
/// the selection (`StepOut::Candidates` with masks; on a GPU the mask goes up and k
/// candidates come back instead of the row) and pick the tokens the whole rows pick: the
/// same requests with `logprobs` (which never changes a token but needs whole rows, so
/// those steps download them and mask on the host) give the same tokens and finish, in
/// the engine (batched: JSON schemas, a regex and a Lark grammar, greedy and sampled with
/// top-k, top-p, min-p or none of them, beside an unconstrained sequence) and in the one-sequence
/// `generate`. The candidate path is taken: most tokens came from the candidates alone.
#[test]
fn constrained_candidates_pick_what_whole_rows_pick() {
    let m = model(SMOLLM2);
    let prompt = m
        .tokenizer
        .encode("Reply with one JSON record about a book or a person:", false)
        .unwrap();
    let formats: Vec<ResponseFormat> = schemas()
        .into_iter()
        .map(|(_, s)| ResponseFormat::JsonSchema(s))
        .chain([
            ResponseFormat::JsonObject,
            ResponseFormat::Regex("(yes|no), [0-9]{2,3} (cats|dogs)".into()),
            ResponseFormat::Lark(
                "start: \"color: \" COLOR (\", \" COLOR)?\nCOLOR: \"red\" | \"green\" | \"blue\"\n".into(),
            ),
        ])
        .collect();
    // Plain temperature sampling too: decided where the grammar allows fewer than k tokens.
    let sampling = |i: usize, p: &mut GenerationParameters| match i % 6 {
        0 => p.temperature = 0.0,
        1 => (p.temperature, p.top_k) = (0.8, 40),
        2 => (p.temperature, p.top_p) = (0.9, 0.9),
        3 => (p.temperature, p.min_p) = (1.0, 0.1),
        4 => (p.temperature, p.top_p, p.top_k) = (0.7, 0.95, 20),
        _ => p.temperature = 1.0,
    };
    let mut reqs = Vec::new();
    for i in 0..12 {
        let mut p = params(0.0, 300 + i as u64, formats[(i / 2) % formats.len()].clone());
        p.max_tokens = 60;
        sampling(i, &mut p);
        reqs.push(SeqRequest {
            prompt: prompt.clone(),
            params: p,
        });
    }
    reqs.push(SeqRequest {
        prompt: prompt.clone(),
        params: GenerationParameters {
            temperature: 0.8,
            top_k: 30,
            seed: Some(9),
            max_tokens: 20,
            ..Default::default()
        },
    });
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
    let cfg = || EngineConfig::for_model(&*m.lm, 512, 13, 256, Some(KvCacheSize::Tokens(6144))).unwrap();
    let (got, st) = run_scheduler(m, cfg(), &reqs);
    let (want, st_whole) = run_scheduler(m, cfg(), &whole);
    let generated: usize = got.iter().map(|c| c.token_ids.len()).sum();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.token_ids, w.token_ids,
            "engine, sequence {i}: candidates vs whole rows"
        );
        assert_eq!(g.finish_reason, w.finish_reason, "engine, sequence {i}");
    }
    // Every step had whole rows with `logprobs`; without, rows decide from candidates
    // (a row whose candidates do not decide falls back to its whole row).
    assert_eq!(st_whole.candidate_rows, 0);
    assert!(
        st.candidate_rows as usize > generated / 2,
        "{} of {generated} tokens from candidates",
        st.candidate_rows
    );
    let mut from_candidates = 0;
    for (i, (r, w)) in reqs.iter().zip(&whole).enumerate() {
        let a = generate(&*m.lm, &m.tokenizer, &r.prompt, &r.params, |_| true).unwrap();
        let b = generate(&*m.lm, &m.tokenizer, &w.prompt, &w.params, |_| true).unwrap();
        assert_eq!(
            a.generated_ids, b.generated_ids,
            "generate, sequence {i}: candidates vs whole rows"
        );
        assert_eq!(a.generated_ids, got[i].token_ids, "generate vs engine, sequence {i}");
        assert_eq!(b.candidate_tokens, 0);
        from_candidates += a.candidate_tokens;
    }
    assert!(
        from_candidates > generated / 2,
        "generate: {from_candidates} of {generated} from candidates"
    );
}

/// A grammar that comes to allow no token (here: after "zq", which the model would not
/// write unmasked, a character class that matches nothing) ends the sequence with an
/// error, never a hang, on the candidates path (its mask allows nothing: the row has no
/// candidates) and on whole rows alike: greedy and sampled in the engine, and an error
/// from `generate`. The text up to there is what the grammar forced.
#[test]
fn a_grammar_that_allows_nothing_ends_with_an_error_on_both_paths() {
    let m = model(SMOLLM2);
    let prompt = m.tokenizer.encode("Answer:", false).unwrap();
    let dead_end = ResponseFormat::Lark("start: \"zq\" /[^\\s\\S]/\n".into());
    let mut reqs = Vec::new();
    for (t, logprobs) in [(0.0, None), (0.9, None), (0.0, Some(0)), (0.9, Some(0))] {
        let mut p = params(t, 4, dead_end.clone());
        p.top_k = 10;
        p.logprobs = logprobs;
        reqs.push(SeqRequest {
            prompt: prompt.clone(),
            params: p,
        });
    }
    // Candidates and whole rows in engines of their own (one whole-row sequence makes
    // the whole step download rows).
    for (path, reqs) in [("candidates", &reqs[..2]), ("whole rows", &reqs[2..])] {
        let cfg = EngineConfig::for_model(&*m.lm, 512, 2, 256, Some(KvCacheSize::Tokens(2048))).unwrap();
        let (done, st) = run_scheduler(m, cfg, reqs);
        assert_eq!(st.candidate_rows > 0, path == "candidates", "{path}: {st:?}");
        for (i, c) in done.iter().enumerate() {
            assert!(
                matches!(&c.finish_reason, FinishReason::Error(e) if e.contains("grammar")),
                "{path}, sequence {i}: {:?}",
                c.finish_reason
            );
            assert_eq!(c.text, "zq", "{path}, sequence {i}: {:?}", c.token_ids);
        }
    }
    for (i, r) in reqs.iter().enumerate() {
        let mut text = String::new();
        let e = generate(&*m.lm, &m.tokenizer, &r.prompt, &r.params, |t| {
            text.push_str(t);
            true
        })
        .expect_err("generate must fail");
        assert!(e.message().contains("constrained output ended"), "{}", e.message());
        assert_eq!(text, "zq", "generate, sequence {i}");
    }
}
