//! `ffai batch` and `ffai bench --sequences` end to end on the real SmolLM2 checkpoint:
//! output in input order with the documented keys, the same tokens as `generate`, and every
//! bad input line reported by number before any work starts.

mod common;

use common::*;

/// `ffai batch` on SmolLM2 from `input` into `output`, with `extra` flags.
fn batch(input: &str, output: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = smollm2();
    let mut args = vec![
        "batch",
        "-m",
        &model,
        "--input",
        input,
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ffai(&args)
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn batch_writes_every_line_in_order_with_generates_tokens() {
    let dir = temp_dir("batch-ok");
    let input = write(
        &dir,
        "in.jsonl",
        concat!(
            "{\"prompt\": \"The capital of France is\", \"max_tokens\": 6, \"temperature\": 0}\n",
            "{\"prompt\": \"Once upon a time\", \"max_tokens\": 5, \"temperature\": 0, \"stop\": [\"city\"]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}], \"max_tokens\": 4, \"temperature\": 0.7, \"seed\": 3}\n",
            "{\"prompt\": \"1, 2, 3,\", \"max_tokens\": 8, \"temperature\": 0, \"top_k\": 1}\n",
        ),
    );
    let output = dir.join("out.jsonl");
    let out = batch(&input, &output, &["--max-sequences", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("4 sequences") && err.contains("tok/s"), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        let ids = l["token_ids"].as_array().unwrap();
        assert_eq!(l["completion_tokens"], ids.len());
        assert!(l["prompt_tokens"].as_u64().unwrap() > 0);
    }
    assert!(lines[0]["text"].as_str().unwrap().starts_with(" Paris"), "{}", lines[0]);
    assert_eq!(lines[0]["finish_reason"], "length");
    // The stop string ends the second line, and is not in its text.
    assert_eq!(lines[1]["finish_reason"], "stop");
    assert_eq!(lines[1]["text"], ", the ");
    // The same tokens as `generate` for the same prompt and parameters.
    let g = stdout_json(&ffai(&[
        "generate",
        "-m",
        &smollm2(),
        "-p",
        "1, 2, 3,",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert_eq!(lines[3]["token_ids"], g["generated_ids"]);
}

#[test]
fn bad_lines_are_reported_by_number_before_any_work() {
    let dir = temp_dir("batch-bad");
    let cases = [
        (
            "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n",
            "line 2: \"prompt\" must be a string",
        ),
        ("{\"prompt\": \"ok\"}\nnot json\n", "line 2: not valid JSON"),
        (
            "{\"prompt\": \"ok\", \"temprature\": 0}\n",
            "line 1: unknown key \"temprature\"",
        ),
        (
            "{\"prompt\": \"ok\", \"max_tokens\": -1}\n",
            "line 1: \"max_tokens\" must be a whole number",
        ),
        ("{\"prompt\": \"ok\", \"top_p\": 7}\n", "line 1: top_p"),
        (
            "{\"prompt\": \"ok\", \"stop\": [1]}\n",
            "line 1: \"stop\" entries must be strings",
        ),
        (
            "{\"prompt\": \"a\", \"messages\": []}\n",
            "line 1: give \"prompt\" or \"messages\"",
        ),
        ("{\"messages\": \"hi\"}\n", "line 1: \"messages\" is not a list"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        (
            "{\"prompt\": \"ok\"}\n\n{\"prompt\": 1}\n",
            "line 3: \"prompt\" must be a string",
        ),
        ("\n\n", "no requests"),
        (
            "{\"prompt\": \"ok\", \"tools\": []}\n",
            "line 1: tools need a chat request",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tool_choice\": \"required\"}\n",
            "line 1: \"tool_choice\" and \"parallel_tool_calls\" need \"tools\"",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], \"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"g\"}}}\n",
            "line 1: ",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"no-such-type\"}}}]}\n",
            "line 1: tools[0] (\"f\")",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], \"tool_choice\": \"required\", \"response_format\": {\"type\": \"json_object\"}}\n",
            "line 1: a forced tool call",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"chat_template_kwargs\": [true]}\n",
            "line 2: chat_template_kwargs must be an object, not a list",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"chat_template_kwargs\": {\"enable_thinking\": false, \"add_generation_prompt\": false}}\n",
            "line 1: chat_template_kwargs may not set \"add_generation_prompt\"",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"reasoning_effort\": 2}\n",
            "line 1: reasoning_effort must be a string",
        ),
        (
            "{\"prompt\": \"x\", \"chat_template_kwargs\": {\"enable_thinking\": false}}\n",
            "line 1: \"chat_template_kwargs\" and \"reasoning_effort\" need a chat request",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let input = write(&dir, &format!("in{i}.jsonl"), text);
        let output = dir.join(format!("out{i}.jsonl"));
        let out = batch(&input, &output, &[]);
        assert_clean_failure(&out, needle);
        assert!(!output.exists(), "case {i}: output written despite a bad line");
    }
    // A prompt longer than the context, and a pool too small for a line.
    let long = format!("{{\"prompt\": \"{}\"}}\n", "word ".repeat(400));
    let input = write(&dir, "long.jsonl", &long);
    let out = ffai(&["batch", "-m", &smollm2(), "--input", &input, "--context", "256"]);
    assert_clean_failure(&out, "line 1: the prompt has");
    let input = write(&dir, "pool.jsonl", "{\"prompt\": \"hello\", \"max_tokens\": 500}\n");
    let out = ffai(&["batch", "-m", &smollm2(), "--input", &input, "--kv-cache-size", "128"]);
    assert_clean_failure(&out, "line 1: a sequence of");
    let out = ffai(&["batch", "-m", &smollm2(), "--input", &input, "--kv-cache-size", "lots"]);
    assert_clean_failure(&out, "bad KV cache size");
    let out = ffai(&["batch", "-m", &smollm2(), "--input", &input, "--max-sequences", "0"]);
    assert_clean_failure(&out, "--max-sequences");
    let out = ffai(&["batch", "-m", &smollm2(), "--input", "/nonexistent.jsonl"]);
    assert_clean_failure(&out, "/nonexistent.jsonl");
}

/// Tool lines: a forced call comes back parsed into "tool_calls" (arguments valid for the
/// schema); "none" offers no tools, so it is the plain chat request.
#[test]
fn batch_lines_with_tools_return_parsed_calls() {
    let dir = temp_dir("batch-tools");
    let tools = r#"[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}]"#
        .replace('\n', " ");
    let ask = r#"[{"role": "user", "content": "What is the weather in Paris?"}]"#;
    let input = write(
        &dir,
        "in.jsonl",
        &format!(
            concat!(
                "{{\"messages\": {ask}, \"tools\": {tools}, \"tool_choice\": {{\"type\": \"function\", \"function\": {{\"name\": \"get_weather\"}}}}, \"max_tokens\": 80, \"temperature\": 0}}\n",
                "{{\"messages\": {ask}, \"tools\": {tools}, \"tool_choice\": \"none\", \"max_tokens\": 8, \"temperature\": 0}}\n",
                "{{\"messages\": {ask}, \"max_tokens\": 8, \"temperature\": 0}}\n",
            ),
            ask = ask,
            tools = tools
        ),
    );
    let output = dir.join("out.jsonl");
    let out = batch(&input, &output, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let forced = &lines[0];
    assert_eq!(forced["finish_reason"], "tool_calls", "{forced}");
    let calls = forced["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{forced}");
    assert_eq!(calls[0]["id"], "call_0_0");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: serde_json::Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{args}"
    );
    assert_eq!(args.as_object().unwrap().len(), 2, "{args}");
    assert!(forced["content"].is_null(), "{forced}");
    // "none": offered nothing, so the prompt is the plain chat prompt (the third line's)
    // and nothing is read as a call.
    assert!(lines[1].get("tool_calls").is_none(), "{}", lines[1]);
    assert_eq!(lines[1]["prompt_tokens"], lines[2]["prompt_tokens"]);
    assert_eq!(lines[1]["token_ids"], lines[2]["token_ids"]);
    assert!(lines[2].get("tool_calls").is_none(), "{}", lines[2]);
}

#[test]
fn bench_sequences_reports_aggregate_decode() {
    let j = stdout_json(&ffai(&[
        "bench",
        "-m",
        &smollm2(),
        "--sequences",
        "4",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--repetitions",
        "1",
        "--json",
    ]));
    assert_eq!(j["sequences"], 4);
    assert_eq!(j["gen_tokens"], 8);
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{j}");
    let out = ffai(&["bench", "-m", &smollm2(), "--sequences", "0"]);
    assert_clean_failure(&out, "--sequences");
}

#[test]
fn batch_lines_take_their_own_response_format() {
    let dir = temp_dir("batch-format");
    let input = write(
        &dir,
        "in.jsonl",
        concat!(
            "{\"prompt\": \"Weather:\", \"max_tokens\": 40, \"temperature\": 0, \"response_format\": ",
            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": \"w\", \"schema\": {\"type\": \"object\", ",
            "\"properties\": {\"sunny\": {\"type\": \"boolean\"}}, \"required\": [\"sunny\"], ",
            "\"additionalProperties\": false}}}}\n",
            "{\"prompt\": \"Pick:\", \"max_tokens\": 8, \"temperature\": 0.9, \"seed\": 2, ",
            "\"response_format\": {\"type\": \"regex\", \"regex\": \" (red|blue)\"}}\n",
            "{\"prompt\": \"Free text:\", \"max_tokens\": 4, \"temperature\": 0}\n",
        ),
    );
    let out_path = dir.join("out.jsonl");
    let out = batch(&input, &out_path, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let v: serde_json::Value = serde_json::from_str(lines[0]["text"].as_str().unwrap()).unwrap();
    assert!(v["sunny"].is_boolean(), "{}", lines[0]);
    assert!(
        [" red", " blue"].contains(&lines[1]["text"].as_str().unwrap()),
        "{}",
        lines[1]
    );
    assert_eq!(lines[1]["finish_reason"], "stop");
    assert_eq!(lines[2]["completion_tokens"], 4);
    // A bad format is reported by line before any work.
    let bad = write(
        &dir,
        "bad.jsonl",
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"response_format\": {\"type\": \"regex\", \"regex\": \"(\"}}\n",
    );
    assert_clean_failure(
        &batch(&bad, &dir.join("bad-out.jsonl"), &[]),
        "line 2: invalid response format",
    );
}

/// SmolLM2 as HF directories (8-bit) that speak through Qwen3's chat template (same
/// `<|im_start|>` turn tokens), so that its forced calls may think first: Qwen3's own
/// (the block optional) and a thinking-only variant whose generation prompt opens the
/// block, as Qwen3's "Thinking-2507" templates do (the block required).
fn smollm2_with_qwen3_templates(dir: &std::path::Path) -> [String; 2] {
    let out = dir.join("smollm2-qwen3");
    let r = ffai(&[
        "convert",
        &smollm2(),
        "--bits",
        "8",
        "--quantizer",
        "minmax",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let qwen3 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/qwen3.jinja"),
    )
    .unwrap();
    std::fs::write(out.join("chat_template.jinja"), &qwen3).unwrap();
    let thinking = dir.join("smollm2-qwen3-thinking");
    std::fs::create_dir_all(&thinking).unwrap();
    for f in std::fs::read_dir(&out).unwrap() {
        let f = f.unwrap().path();
        std::fs::hard_link(&f, thinking.join(f.file_name().unwrap())).unwrap();
    }
    let opened = qwen3.replace(
        "'<|im_start|>assistant\\n' }}",
        "'<|im_start|>assistant\\n<think>\\n' }}",
    );
    assert_ne!(opened, qwen3);
    std::fs::remove_file(thinking.join("chat_template.jinja")).unwrap();
    std::fs::write(thinking.join("chat_template.jinja"), opened).unwrap();
    [out.display().to_string(), thinking.display().to_string()]
}

/// A forced call under a template that thinks first: the think block may (or must) come
/// before the call, greedy or sampled; it is in "text" but never in "content" or the
/// calls, and a block cut off by max_tokens leaves an empty content.
#[test]
fn batch_forced_calls_keep_reasoning_out_of_content() {
    let dir = temp_dir("batch-think");
    let tools = r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]"#
        .replace('\n', " ");
    let ask = r#"[{"role": "user", "content": "What is the weather in Paris? Think first."}]"#;
    let mut input = String::new();
    for seed in 0..6 {
        input += &format!(
            "{{\"messages\": {ask}, \"tools\": {tools}, \"tool_choice\": \"required\", \"parallel_tool_calls\": false, \"max_tokens\": 120, \"temperature\": {}, \"seed\": {seed}}}\n",
            if seed == 0 { 0.0 } else { 1.0 }
        );
    }
    let input = write(&dir, "in.jsonl", &input);
    let mut called = 0;
    for (k, model) in smollm2_with_qwen3_templates(&dir).iter().enumerate() {
        let opened = k == 1;
        let output = dir.join(format!("out{k}.jsonl"));
        let out = ffai(&[
            "batch",
            "-m",
            model,
            "--input",
            &input,
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        for l in &lines {
            let text = l["text"].as_str().unwrap();
            let content = l["content"].as_str().unwrap_or("");
            assert!(!content.contains("think>"), "{l}");
            if l["finish_reason"] == "tool_calls" {
                called += 1;
                assert!(l["content"].is_null(), "{l}");
                let call = &l["tool_calls"][0]["function"];
                assert_eq!(call["name"], "get_weather", "{l}");
                let args: serde_json::Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
                assert!(args["city"].is_string(), "{l}");
                // Whatever came before the call is the reasoning block.
                let head = &text[..text.find("<tool_call>").unwrap()];
                if opened {
                    assert!(head.ends_with("</think>\n\n") && !head.contains("<think>"), "{l}");
                } else {
                    assert!(
                        head.is_empty() || (head.starts_with("<think>") && head.ends_with("</think>\n\n")),
                        "{l}"
                    );
                }
            } else {
                // Cut off by max_tokens inside the block: all of it is reasoning.
                assert_eq!(l["finish_reason"], "length", "{l}");
                assert!(!text.contains("</think>"), "{l}");
                assert!(opened || text.starts_with("<think>"), "{l}");
                assert_eq!(content, "", "{l}");
            }
        }
    }
    assert!(called > 0);
}

/// A chat line's `chat_template_kwargs` reach the template: Qwen3's `enable_thinking`
/// false writes an empty think block into the generation prompt (more prompt tokens, and
/// greedy text that may differ), true or absent writes none.
#[test]
fn batch_chat_template_kwargs_reach_the_template() {
    let dir = temp_dir("batch-kwargs");
    let [qwen3, thinking] = smollm2_with_qwen3_templates(&dir);
    let ask = r#"[{"role": "user", "content": "Name a color."}]"#;
    let mut input = String::new();
    for kwargs in ["null", r#"{"enable_thinking": false}"#, r#"{"enable_thinking": true}"#] {
        input += &format!(
            "{{\"messages\": {ask}, \"max_tokens\": 1, \"temperature\": 0, \"chat_template_kwargs\": {kwargs}}}\n"
        );
    }
    let input = write(&dir, "in.jsonl", &input);
    let output = dir.join("out.jsonl");
    let out = ffai(&[
        "batch",
        "-m",
        &qwen3,
        "--input",
        &input,
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tokens: Vec<u64> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt_tokens"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens[1] > tokens[0], "{tokens:?}");
    assert_eq!(tokens[2], tokens[0], "{tokens:?}");

    // The thinking template opens the block in the prompt and SmolLM2 never closes it:
    // the answer is all reasoning (no content), unless the kwargs switch thinking off;
    // "text" keeps the output whole either way.
    let mut input = String::new();
    for kwargs in ["null", r#"{"enable_thinking": false}"#] {
        input += &format!(
            "{{\"messages\": {ask}, \"max_tokens\": 8, \"temperature\": 0, \"chat_template_kwargs\": {kwargs}}}\n"
        );
    }
    let input = write(&dir, "think.jsonl", &input);
    let output = dir.join("think.out.jsonl");
    let out = ffai(&[
        "batch",
        "-m",
        &thinking,
        "--input",
        &input,
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = lines[0]["text"].as_str().unwrap();
    assert!(!text.contains("</think>") && !text.trim().is_empty(), "{}", lines[0]);
    assert_eq!(lines[0]["reasoning_content"], text.trim_matches('\n'), "{}", lines[0]);
    assert!(lines[0]["content"].is_null(), "{}", lines[0]);
    assert!(lines[1].get("reasoning_content").is_none(), "{}", lines[1]);
    assert_eq!(lines[1]["content"], lines[1]["text"], "{}", lines[1]);
}
