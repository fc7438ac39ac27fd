//! Tool calls on the real SmolLM2 checkpoint and the real chat templates: every family's
//! forced-call grammar (Hermes, Llama 3.x, Mistral, harmony) over SmolLM2's vocabulary
//! makes output that the family's own parser reads back as calls to the allowed functions
//! whose arguments validate against their schemas (greedy and sampled); tool turns render
//! through a template that knows no tools (SmolLM2's: ffai's prompt and Hermes text) and
//! through Qwen2.5's, Llama 3's, Mistral's and gpt-oss's own, and what those templates
//! render for a past call reads back with the matching parser.

mod common;

use std::sync::OnceLock;

use common::{real_model, SMOLLM2};
use ffai::chat::{ChatTemplate, Message, RenderOptions, TemplateSource};
use ffai::constrain::ResponseFormat;
use ffai::generate::{generate, GenerationParameters, StopReason};
use ffai::tools::{self, Reasoning, ToolCall, ToolChoice, ToolFormat, ToolSpec, ToolTemplate};
use ffai::{LoadOptions, Model};
use serde_json::{json, Value};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(real_model(SMOLLM2).to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn tool_list() -> Vec<ToolSpec> {
    tools::parse_tools(&json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string", "maxLength": 30},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
              "required": ["query"], "additionalProperties": false}}}
    ]))
    .unwrap()
}

fn check_call(call: &ToolCall, tools: &[ToolSpec]) {
    let spec = tools.iter().find(|t| t.name == call.name).unwrap();
    let args: Value = serde_json::from_str(&call.arguments).unwrap();
    let v = jsonschema::validator_for(&spec.parameters).unwrap();
    assert!(v.is_valid(&args), "{}: {}", call.name, call.arguments);
}

#[test]
fn forced_calls_in_every_format_parse_and_validate() {
    let m = model();
    let tools = tool_list();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    let (prompt, tpl) = m
        .render_chat_tools(&[Message::user("What is the weather in Paris?")], &tools, true)
        .unwrap();
    assert_eq!(tpl.format, ToolFormat::Hermes);
    let ids = m.encode(&prompt).unwrap();
    let formats = [
        ToolFormat::Hermes,
        ToolFormat::Llama3,
        ToolFormat::Mistral,
        ToolFormat::Harmony,
        ToolFormat::Granite,
    ];
    for format in formats {
        for choice in [ToolChoice::Named("search".into()), ToolChoice::Required] {
            // Greedy with parallel calls allowed, sampled with one call.
            for (temperature, seed, parallel) in [(0.0, 1, true), (0.9, 7, false)] {
                let g = tools::grammar(format, Reasoning::None, &tools, &choice, parallel, &m.tokenizer).unwrap();
                // Room for MAX_FORCED_CALLS calls: greedy SmolLM2 repeats a call in the
                // Granite list until the grammar's cap ends it.
                let params = GenerationParameters {
                    max_tokens: 640,
                    temperature,
                    seed: Some(seed),
                    response_format: Some(ResponseFormat::Lark(g)),
                    ..m.default_parameters()
                };
                let out = generate(&*m.lm, &m.tokenizer, &ids, &params, |_| true).unwrap();
                let what = format!("{format:?} {choice:?} t={temperature}: {:?}", out.text);
                assert_ne!(out.stop_reason, StopReason::MaxTokens, "{what}");
                let p = format.parse(&out.text, &names).unwrap_or_else(|| panic!("{what}"));
                assert_eq!(p.content, None, "{what}");
                assert!(!p.calls.is_empty(), "{what}");
                assert!(
                    (parallel && choice == ToolChoice::Required) || p.calls.len() == 1,
                    "{what}"
                );
                for c in &p.calls {
                    if choice != ToolChoice::Required {
                        assert_eq!(c.name, "search", "{what}");
                    }
                    check_call(c, &tools);
                }
            }
        }
    }
    // No grammar for the choices that force nothing.
    assert!(tools::grammar(
        ToolFormat::Hermes,
        Reasoning::None,
        &tools,
        &ToolChoice::Auto,
        true,
        &m.tokenizer
    )
    .is_none());
    assert!(tools::grammar(
        ToolFormat::Hermes,
        Reasoning::None,
        &tools,
        &ToolChoice::None,
        true,
        &m.tokenizer
    )
    .is_none());
}

#[test]
fn schemas_that_do_not_compile_are_errors() {
    let m = model();
    let bad = tools::parse_tools(&json!([{"type": "function", "function": {
        "name": "f", "parameters": {"type": "no-such-type"}}}]))
    .unwrap();
    let e = tools::check_schemas(&bad, &m.tokenizer).unwrap_err().to_string();
    assert!(e.starts_with("tools[0] (\"f\"): "), "{e}");
    assert!(!e.contains('\n'), "{e}");
    tools::check_schemas(&tool_list(), &m.tokenizer).unwrap();
}

/// A user question, the assistant's call, the tool's answer.
fn conversation() -> Vec<Message> {
    vec![
        Message::user("What is the weather in Paris?"),
        Message {
            tool_calls: Some(vec![json!({"id": "call_abc123", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}})]),
            ..Message::assistant("")
        },
        Message {
            tool_call_id: Some("call_abc123".into()),
            ..Message::new("tool", "{\"temperature\": 21}")
        },
    ]
}

#[test]
fn tool_turns_render_through_a_template_without_tools() {
    let m = model();
    let tools = tool_list();
    let (text, tpl) = m.render_chat_tools(&conversation(), &tools, true).unwrap();
    assert!(!tpl.native);
    assert!(text.starts_with("<|im_start|>system\nYou can call functions"), "{text}");
    assert!(
        text.contains("{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"The current weather in a city.\""),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\",\"unit\":\"celsius\"}}\n</tool_call><|im_end|>\n"),
        "{text}"
    );
    assert!(
        text.ends_with("<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // Not offered: no tool prompt (SmolLM2's own system line instead), history still text.
    let (text, _) = m.render_chat_tools(&conversation(), &tools, false).unwrap();
    assert!(!text.contains("<tools>") && text.contains("named SmolLM"), "{text}");
    assert!(text.contains("<tool_response>"), "{text}");
}

fn fixture(name: &str) -> ChatTemplate {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/chat")
        .join(name);
    ChatTemplate::new(&std::fs::read_to_string(p).unwrap(), TemplateSource::Gguf).unwrap()
}

fn render_native(name: &str, bos: &str, eos: &str) -> (String, ToolTemplate) {
    let t = fixture(name);
    let tpl = ToolTemplate::detect(t.source());
    assert!(tpl.native, "{name}");
    let (messages, tools) = tools::prepare_messages(tpl, &conversation(), &tool_list(), true);
    let opts = RenderOptions {
        add_generation_prompt: true,
        bos_token: bos.into(),
        eos_token: eos.into(),
        tools,
        enable_thinking: None,
        extra: Vec::new(),
    };
    (t.render(&messages, &opts).unwrap(), tpl)
}

#[test]
fn tool_turns_render_through_native_templates_and_parse_back() {
    let names = ["get_weather", "search"];
    let want = ToolCall {
        name: "get_weather".into(),
        arguments: r#"{"city":"Paris","unit":"celsius"}"#.into(),
    };

    let (text, tpl) = render_native("qwen2.5.jinja", "", "<|im_end|>");
    assert_eq!(tpl.format, ToolFormat::Hermes);
    assert!(
        text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    assert!(
        text.contains("<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>"),
        "{text}"
    );
    let turn = text
        .split("<|im_start|>assistant")
        .nth(1)
        .unwrap()
        .split("<|im_end|>")
        .next()
        .unwrap();
    // The arguments come back as the template wrote them: the same JSON.
    let same = |calls: Vec<ToolCall>| {
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].name, want.name);
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(v(&calls[0].arguments), v(&want.arguments), "{calls:?}");
    };
    same(tools::parse_hermes(turn, &names).unwrap().calls);

    let (text, tpl) = render_native("llama3.jinja", "<|begin_of_text|>", "<|eot_id|>");
    assert_eq!(tpl.format, ToolFormat::Llama3);
    // Llama 3's template dumps a string result with tojson (a string is iterable), as
    // transformers does.
    assert!(
        text.contains("<|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"temperature\\\": 21}\"<|eot_id|>"),
        "{text}"
    );
    let turn = text
        .split("<|start_header_id|>assistant<|end_header_id|>\n\n")
        .nth(1)
        .unwrap()
        .split("<|eot_id|>")
        .next()
        .unwrap();
    same(tools::parse_llama3(turn, &names).unwrap().calls);

    let (text, tpl) = render_native("mistral_v0.3.jinja", "<s>", "</s>");
    assert_eq!(tpl.format, ToolFormat::Mistral);
    assert!(
        text.contains("[AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    let id = tools::mistral_call_id("call_abc123");
    assert!(
        text.contains(&format!("\"call_id\": \"{id}\"}}[/TOOL_RESULTS]")),
        "{text}"
    );
    let turn = text.split("[/INST]").nth(1).unwrap().split("</s>").next().unwrap();
    // Rendered history carries the id; the parser reads the call from it.
    same(tools::parse_mistral(turn, &names).unwrap().calls);

    // Granite 3.3's template renders the tools and the tool's answer but not an
    // assistant's `tool_calls`: ffai writes them into the turn's content.
    let (text, tpl) = render_native("granite3.3.jinja", "", "<|end_of_text|>");
    assert_eq!(tpl.format, ToolFormat::Granite);
    assert!(
        text.contains("<|start_of_role|>available_tools<|end_of_role|>["),
        "{text}"
    );
    assert!(
        text.contains("<|start_of_role|>tool<|end_of_role|>{\"temperature\": 21}<|end_of_text|>"),
        "{text}"
    );
    let turn = text
        .split("<|start_of_role|>assistant<|end_of_role|>")
        .nth(1)
        .unwrap()
        .split("<|end_of_text|>")
        .next()
        .unwrap();
    assert!(turn.starts_with("<|tool_call|>["), "{turn}");
    same(tools::parse_granite(turn, &names).unwrap().calls);

    let (text, tpl) = render_native("gpt_oss.jinja", "", "<|return|>");
    assert_eq!(tpl.format, ToolFormat::Harmony);
    assert!(text.contains("type get_weather = (_: {"), "{text}");
    let turn = text.split("<|start|>user<|message|>").nth(1).unwrap();
    let turn = &turn[turn.find("<|start|>assistant").unwrap()..];
    let turn = &turn[..turn.find("<|call|>").unwrap() + "<|call|>".len()];
    same(tools::parse_harmony(turn, &names).unwrap().calls);
}

/// The per-token cost of a forced call's grammar (a Hermes wrapper around a schema with a
/// long free string, so the call runs to about 150 tokens) against free decoding of as
/// many tokens from the same prompt, on one thread-pool of the machine's cores. A
/// measurement, not a check: `cargo test --release -p ffai --test tools -- --ignored
/// --nocapture measure`.
#[test]
#[ignore]
fn measure_forced_call_cost_per_token() {
    let m = model();
    let tools = tools::parse_tools(&json!([{"type": "function", "function": {
        "name": "write_note",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 40},
            "body": {"type": "string", "minLength": 500, "maxLength": 600},
            "tags": {"type": "array", "items": {"enum": ["sea", "ship", "storm"]}, "maxItems": 3}},
          "required": ["title", "body", "tags"], "additionalProperties": false}}}]))
    .unwrap();
    let (prompt, _) = m
        .render_chat_tools(&[Message::user("Write a long note about the sea.")], &tools, true)
        .unwrap();
    let ids = m.encode(&prompt).unwrap();
    let g = tools::grammar(
        ToolFormat::Hermes,
        Reasoning::None,
        &tools,
        &ToolChoice::Required,
        false,
        &m.tokenizer,
    )
    .unwrap();
    let per_token = |o: &ffai::GenerationOutput| o.decode_seconds * 1e3 / o.decode_steps.max(1) as f64;
    // End to end, the best of five alternating rounds each (the machine is shared).
    let (mut best_forced, mut best_free, mut tokens) = (f64::MAX, f64::MAX, Vec::new());
    for _ in 0..5 {
        let forced = GenerationParameters {
            max_tokens: 400,
            temperature: 0.0,
            response_format: Some(ResponseFormat::Lark(g.clone())),
            ..m.default_parameters()
        };
        let c = generate(&*m.lm, &m.tokenizer, &ids, &forced, |_| true).unwrap();
        assert!(tools::parse_hermes(&c.text, &["write_note"]).is_some(), "{}", c.text);
        let free = GenerationParameters {
            max_tokens: c.generated_ids.len(),
            temperature: 0.0,
            stop_on_eos: false,
            ..m.default_parameters()
        };
        let f = generate(&*m.lm, &m.tokenizer, &ids, &free, |_| true).unwrap();
        best_forced = best_forced.min(per_token(&c));
        best_free = best_free.min(per_token(&f));
        tokens = c.generated_ids;
    }
    // The grammar's own work, replayed over the same tokens without the model: a mask over
    // the vocabulary and one parser step per token (best of five).
    let mut best_replay = f64::MAX;
    let mut logits = vec![0f32; m.tokenizer.vocab_size()];
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let mut c = ffai::constrain::Constraint::new(&m.tokenizer, &ResponseFormat::Lark(g.clone())).unwrap();
        for &id in &tokens {
            c.mask(&mut logits).unwrap();
            c.advance(id).unwrap();
        }
        best_replay = best_replay.min(t.elapsed().as_secs_f64() * 1e3 / tokens.len() as f64);
    }
    println!(
        "{} tokens: forced call {best_forced:.2} ms/token, free {best_free:.2} ms/token (best of 5); grammar alone {best_replay:.3} ms/token",
        tokens.len()
    );
}

/// How long checking and compiling the largest tool lists takes (a measurement):
/// `cargo test --release -p ffai --test tools -- --ignored --nocapture compile_time`.
#[test]
#[ignore]
fn measure_compile_time_of_many_tools() {
    let m = model();
    let props: serde_json::Map<String, Value> = (0..40)
        .map(|i| {
            (
                format!("field_{i}"),
                json!({"type": "string", "description": "x".repeat(30), "maxLength": 50}),
            )
        })
        .collect();
    let list: Vec<Value> = (0..tools::MAX_TOOLS)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"),
            "parameters": {"type": "object", "properties": props, "required": ["field_0"]}}})
        })
        .collect();
    let list = Value::Array(list);
    println!("tools JSON: {} bytes", list.to_string().len());
    let tools = tools::parse_tools(&list).unwrap();
    let t = std::time::Instant::now();
    tools::check_schemas(&tools, &m.tokenizer).unwrap();
    println!("check_schemas: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = std::time::Instant::now();
    let g = tools::grammar(
        ToolFormat::Hermes,
        Reasoning::None,
        &tools,
        &ToolChoice::Required,
        true,
        &m.tokenizer,
    )
    .unwrap();
    let mut c = ffai::constrain::Constraint::new(&m.tokenizer, &ResponseFormat::Lark(g)).unwrap();
    let mut logits = vec![0f32; m.tokenizer.vocab_size()];
    c.mask(&mut logits).unwrap();
    println!(
        "required-call grammar, built and first mask: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// The tool-call markers as added special tokens (tests/fixtures/tool_tokenizer, made by
/// scripts/make_tool_tokenizer.py; no real vocabulary in the test models has them). With
/// `special` false, the Hermes and think markers are added tokens that are not special,
/// as Qwen2.5's and Qwen3's tokenizer.json have them.
fn marker_tokenizer(special: bool) -> ffai::Tokenizer {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tool_tokenizer");
    if special {
        return ffai::Tokenizer::from_hf_dir(&fixture).unwrap();
    }
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap()).unwrap();
    for t in j["added_tokens"].as_array_mut().unwrap() {
        if ["<tool_call>", "</tool_call>", "<think>", "</think>"].contains(&t["content"].as_str().unwrap()) {
            t["special"] = false.into();
        }
    }
    let dir = std::env::temp_dir().join(format!("ffai-test-tool-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), j.to_string()).unwrap();
    let tok = ffai::Tokenizer::from_hf_dir(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    tok
}

fn marker_id(tok: &ffai::Tokenizer, text: &str) -> u32 {
    (0..tok.vocab_size() as u32)
        .find(|&id| tok.token_text(id) == Some(text))
        .unwrap()
}

/// Ids the constraint allows next.
fn allowed(c: &mut ffai::constrain::Constraint, n: usize) -> Vec<u32> {
    let mut logits = vec![0f32; n];
    c.mask(&mut logits).unwrap();
    (0..n as u32).filter(|&i| logits[i as usize].is_finite()).collect()
}

/// Feeds `pieces` (a marker's text as its single token when `m` is set, else text as
/// byte tokens) through the grammar, each token checked against the mask; returns the
/// ids and whether the output may end after them.
fn drive(tok: &ffai::Tokenizer, g: &str, pieces: &[(bool, &str)]) -> (Vec<u32>, bool) {
    let mut c = ffai::constrain::Constraint::new(tok, &ResponseFormat::Lark(g.to_string())).unwrap();
    let mut ids = Vec::new();
    for &(m, text) in pieces {
        let piece_ids = if m {
            vec![marker_id(tok, text)]
        } else {
            // The fixture's byte tokens: id b is byte b.
            text.bytes().map(u32::from).collect()
        };
        for id in piece_ids {
            let ok = allowed(&mut c, tok.vocab_size());
            assert!(
                ok.contains(&id),
                "{text:?}: {id} not allowed after {:?}",
                tok.decode(&ids)
            );
            c.advance(id).unwrap();
            ids.push(id);
        }
    }
    // Complete: the grammar stopped, or the end of generation may come now.
    let end = c.is_complete() || {
        let next = allowed(&mut c, tok.vocab_size());
        next.iter().any(|id| tok.eog_ids().contains(id))
    };
    (ids, end)
}

/// An output as (marker, text) pieces (see [`drive`]).
type Pieces<'a> = Vec<(bool, &'a str)>;

#[test]
fn forced_calls_emit_special_markers_as_single_tokens_and_parse_back() {
    let tools = tool_list();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    let args = "{\"city\": \"Paris\", \"unit\": \"celsius\"}";
    let head = "\n{\"name\": \"get_weather\", \"arguments\": ";
    for special in [true, false] {
        let tok = marker_tokenizer(special);
        let choice = ToolChoice::Named("get_weather".into());
        // Each format (and reasoning block) with its markers as single tokens.
        let cases: Vec<(ToolFormat, Reasoning, Pieces, Option<&str>)> = vec![
            (
                ToolFormat::Hermes,
                Reasoning::None,
                vec![
                    (true, "<tool_call>"),
                    (false, head),
                    (false, args),
                    (false, "}\n"),
                    (true, "</tool_call>"),
                ],
                None,
            ),
            (
                ToolFormat::Hermes,
                Reasoning::Think,
                vec![
                    (true, "<think>"),
                    (false, "\nParis: call get_weather, not <tool_call>.\n"),
                    (true, "</think>"),
                    (false, "\n\n"),
                    (true, "<tool_call>"),
                    (false, head),
                    (false, args),
                    (false, "}\n"),
                    (true, "</tool_call>"),
                ],
                Some("\nParis: call get_weather, not <tool_call>.\n"),
            ),
            (
                ToolFormat::Hermes,
                Reasoning::ThinkOpen,
                vec![
                    (false, "Weather, so a call."),
                    (true, "</think>"),
                    (false, "\n\n"),
                    (true, "<tool_call>"),
                    (false, head),
                    (false, args),
                    (false, "}\n"),
                    (true, "</tool_call>"),
                ],
                Some("Weather, so a call."),
            ),
            (
                ToolFormat::Mistral,
                Reasoning::None,
                vec![
                    (true, "[TOOL_CALLS]"),
                    (false, " [{\"name\": \"get_weather\", \"arguments\": "),
                    (false, args),
                    (false, "}]"),
                ],
                None,
            ),
            (
                ToolFormat::Granite,
                Reasoning::None,
                vec![
                    (true, "<|tool_call|>"),
                    (false, "[{\"name\": \"get_weather\", \"arguments\": "),
                    (false, args),
                    (false, "}]"),
                ],
                None,
            ),
            (
                ToolFormat::Harmony,
                Reasoning::Analysis,
                vec![
                    (true, "<|channel|>"),
                    (false, "analysis"),
                    (true, "<|message|>"),
                    (false, "The user asks about Paris."),
                    (true, "<|end|>"),
                    (true, "<|start|>"),
                    (false, "assistant"),
                    (true, "<|channel|>"),
                    (false, "commentary to=functions.get_weather "),
                    (true, "<|constrain|>"),
                    (false, "json"),
                    (true, "<|message|>"),
                    (false, args),
                ],
                Some("The user asks about Paris."),
            ),
        ];
        for (format, reasoning, pieces, thought) in cases {
            let what = format!("special={special} {format:?} {reasoning:?}");
            let g = tools::grammar(format, reasoning, &tools, &choice, false, &tok).unwrap();
            let (ids, complete) = drive(&tok, &g, &pieces);
            assert!(complete, "{what}");
            let text = tok.decode(&ids);
            let (r, answer) = reasoning.split(&text);
            assert_eq!(r, thought, "{what}: {text:?}");
            let p = format
                .parse(answer, &names)
                .unwrap_or_else(|| panic!("{what}: {text:?}"));
            assert_eq!(p.content, None, "{what}");
            assert_eq!(p.calls.len(), 1, "{what}");
            assert_eq!(
                (p.calls[0].name.as_str(), p.calls[0].arguments.as_str()),
                ("get_weather", args),
                "{what}"
            );
            check_call(&p.calls[0], &tools);
        }
        // Where a special marker must come next it is the only choice: the grammar never
        // spells it out in text (the parser would not see a marker the model's own
        // tokenizer never makes).
        let first = |format, reasoning| {
            let g = tools::grammar(format, reasoning, &tools, &choice, false, &tok).unwrap();
            let mut c = ffai::constrain::Constraint::new(&tok, &ResponseFormat::Lark(g)).unwrap();
            allowed(&mut c, tok.vocab_size())
        };
        assert_eq!(
            first(ToolFormat::Mistral, Reasoning::None),
            vec![marker_id(&tok, "[TOOL_CALLS]")]
        );
        assert_eq!(
            first(ToolFormat::Granite, Reasoning::None),
            vec![marker_id(&tok, "<|tool_call|>")]
        );
        // Harmony's `<|channel|>` is rendered as text, as llama.cpp does (ffai's tokenizer
        // demotes it from special): the added token or its spelling. Its `<|end|>`, which
        // closes the analysis message, stays special and was forced as one token above.
        let harmony = first(ToolFormat::Harmony, Reasoning::Analysis);
        assert!(harmony.contains(&marker_id(&tok, "<|channel|>")), "{harmony:?}");
        assert!(tok.is_special(marker_id(&tok, "<|end|>")));
        let hermes = first(ToolFormat::Hermes, Reasoning::None);
        let think = first(ToolFormat::Hermes, Reasoning::Think);
        let (call, open) = (marker_id(&tok, "<tool_call>"), marker_id(&tok, "<think>"));
        if special {
            assert_eq!(hermes, vec![call]);
            assert_eq!(think, vec![call, open]);
        } else {
            // Not special (Qwen's vocabularies): the added token or its spelling.
            assert!(hermes.contains(&call) && hermes.contains(&(b'<' as u32)), "{hermes:?}");
            assert!(think.contains(&call) && think.contains(&open), "{think:?}");
        }
        // Thinking switched off by the prompt: no block may open the answer.
        assert!(!first(ToolFormat::Hermes, Reasoning::None).contains(&open));
    }
}

#[test]
fn forced_calls_may_reason_first_on_smollm2() {
    // SmolLM2's vocabulary spells every marker out: a Qwen3-style output (reasoning,
    // then the call) goes through the forced grammar token by token as the model's own
    // tokenizer writes it, and reads back without the reasoning.
    let m = model();
    let tools = tool_list();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    let out = "<think>\nThe user wants the weather; I call get_weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
    for (reasoning, text) in [
        (Reasoning::Think, out),
        (Reasoning::ThinkOpen, out.strip_prefix("<think>").unwrap()),
    ] {
        let g = tools::grammar(
            ToolFormat::Hermes,
            reasoning,
            &tools,
            &ToolChoice::Required,
            true,
            &m.tokenizer,
        )
        .unwrap();
        let mut c = ffai::constrain::Constraint::new(&m.tokenizer, &ResponseFormat::Lark(g)).unwrap();
        let ids = m.tokenizer.encode(text, false).unwrap();
        for &id in &ids {
            assert!(allowed(&mut c, m.tokenizer.vocab_size()).contains(&id), "{reasoning:?}");
            c.advance(id).unwrap();
        }
        // Complete: only the end (or another call) may follow.
        let next = allowed(&mut c, m.tokenizer.vocab_size());
        assert!(
            next.iter().any(|id| m.tokenizer.eog_ids().contains(id)),
            "{reasoning:?}"
        );
        let (r, answer) = reasoning.split(text);
        assert_eq!(r, Some("\nThe user wants the weather; I call get_weather.\n"));
        let p = ToolFormat::Hermes.parse(answer, &names).unwrap();
        assert_eq!((p.content, p.calls.len()), (None, 1));
        check_call(&p.calls[0], &tools);
    }
    // Without a reasoning block allowed (thinking switched off), `<think>` is refused.
    let g = tools::grammar(
        ToolFormat::Hermes,
        Reasoning::None,
        &tools,
        &ToolChoice::Required,
        true,
        &m.tokenizer,
    )
    .unwrap();
    let mut c = ffai::constrain::Constraint::new(&m.tokenizer, &ResponseFormat::Lark(g)).unwrap();
    let ids = m.tokenizer.encode("<think>", false).unwrap();
    let mut refused = false;
    for &id in &ids {
        if !allowed(&mut c, m.tokenizer.vocab_size()).contains(&id) {
            refused = true;
            break;
        }
        c.advance(id).unwrap();
    }
    assert!(refused);
    // A real generation with the block allowed still ends in a call or in reasoning cut
    // off by the token limit, never in anything else.
    let (prompt, _) = m
        .render_chat_tools(&[Message::user("What is the weather in Paris?")], &tools, true)
        .unwrap();
    let ids = m.encode(&prompt).unwrap();
    let g = tools::grammar(
        ToolFormat::Hermes,
        Reasoning::Think,
        &tools,
        &ToolChoice::Required,
        false,
        &m.tokenizer,
    )
    .unwrap();
    let params = GenerationParameters {
        max_tokens: 200,
        temperature: 0.0,
        response_format: Some(ResponseFormat::Lark(g)),
        ..m.default_parameters()
    };
    let out = generate(&*m.lm, &m.tokenizer, &ids, &params, |_| true).unwrap();
    let (_, answer) = Reasoning::Think.split(&out.text);
    match ToolFormat::Hermes.parse(answer, &names) {
        Some(p) => {
            assert_eq!(p.calls.len(), 1, "{:?}", out.text);
            check_call(&p.calls[0], &tools);
        }
        None => {
            assert_eq!(out.stop_reason, StopReason::MaxTokens, "{:?}", out.text);
            assert!(out.text.starts_with("<think>") && answer.is_empty(), "{:?}", out.text);
        }
    }
}
