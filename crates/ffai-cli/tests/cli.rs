//! The `ffai` binary end to end on the real SmolLM2 checkpoint, and on bad input: every
//! failure is a non-zero exit with one readable line on stderr.

mod common;

use common::*;

#[test]
fn generate_json_continues_the_capital_of_france_with_paris() {
    let out = ffai(&[
        "generate",
        "-m",
        &smollm2(),
        "-p",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "--json",
    ]);
    let j = stdout_json(&out);
    assert_eq!(j["prompt_ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert!(j["text"].as_str().unwrap().starts_with(" Paris"), "{}", j["text"]);
    assert_eq!(j["generated_ids"].as_array().unwrap().len(), 6);
    assert!(j["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_streams_text_then_a_stats_line() {
    let out = ffai(&[
        "generate",
        "-m",
        &smollm2(),
        "-p",
        "Once upon a time",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Once upon a time, the city of"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prompt: 4 tokens") && err.contains("generated: 4 tokens") && err.contains("tok/s"),
        "{err}"
    );
}

#[test]
fn tokenize_prints_ids() {
    let j = stdout_json(&ffai(&["tokenize", "-m", &smollm2(), "--json", "Once upon a time"]));
    assert_eq!(j["ids"], serde_json::json!([6403, 1980, 253, 655]));
    let out = ffai(&["tokenize", "-m", &smollm2(), "--bos", "Once upon a time"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 6403 1980 253 655");
}

#[test]
fn inspect_reports_architecture_and_top_logits() {
    let j = stdout_json(&ffai(&[
        "inspect",
        "-m",
        &smollm2(),
        "-p",
        "Once upon a time",
        "--top-k",
        "3",
        "--json",
    ]));
    let a = &j["architecture"];
    assert_eq!(a["family"], "llama");
    assert_eq!(a["num_layers"], 30);
    assert_eq!(a["hidden_size"], 576);
    assert_eq!(a["num_kv_heads"], 3);
    assert_eq!(a["tie_word_embeddings"], true);
    assert_eq!(j["prompt_ids"], serde_json::json!([6403, 1980, 253, 655]));
    let top = j["top_k"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top[0]["id"], 28);
    assert_eq!(top[0]["text"], ",");
    // llama.cpp reports about 18.09 (it rounds activations to 8 bits; we keep f32).
    let logit = top[0]["logit"].as_f64().unwrap();
    assert!((logit - 18.09).abs() < 0.3, "{logit}");
}

#[test]
fn inspect_layer_trace_prints_every_layer_boundary() {
    let out = ffai(&[
        "inspect",
        "-m",
        &smollm2(),
        "--prompt-ids",
        "6403,1980",
        "--layer-trace",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..30 {
        let tag = format!("[L{i} layer_out] n=1152 ");
        let line = text
            .lines()
            .find(|l| l.contains(&tag))
            .unwrap_or_else(|| panic!("no {tag} in:\n{text}"));
        assert!(line.contains("nan=0 inf=0 first=["), "{line}");
    }
    let out = ffai(&[
        "inspect",
        "-m",
        &smollm2(),
        "--prompt-ids",
        "6403",
        "--trace-layers",
        "0,5",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("layer_out]").count(), 2, "{text}");
    // Off by default: no trace lines.
    let out = ffai(&["inspect", "-m", &smollm2(), "--prompt-ids", "6403"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("layer_out]"));
}

#[test]
fn models_lists_the_llama_family() {
    let out = ffai(&["models"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("llama") && text.contains("LlamaForCausalLM") && text.contains("Qwen2ForCausalLM"),
        "{text}"
    );
    assert!(
        text.contains("gemma4\n") && text.contains("Gemma4ForCausalLM") && text.contains("gemma4_text"),
        "{text}"
    );
}

#[test]
fn bench_json_reports_speeds_and_memory() {
    let j = stdout_json(&ffai(&[
        "bench",
        "-m",
        &smollm2(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--repetitions",
        "1",
        "--json",
    ]));
    for k in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_bytes",
        "load_seconds",
    ] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}: {}", j[k]);
    }
}

#[test]
fn bad_model_files_fail_cleanly() {
    let dir = temp_dir("bad");
    // Truncated GGUF: the first 1000 bytes of the real file.
    let real = std::fs::read(smollm2()).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &real[..1000]).unwrap();
    assert_clean_failure(
        &ffai(&["generate", "-m", truncated.to_str().unwrap(), "-p", "hi"]),
        "truncated",
    );
    // The real header with its tensor data cut off.
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    assert_clean_failure(&ffai(&["inspect", "-m", cut.to_str().unwrap()]), "past the end");
    // Random bytes.
    let random = dir.join("random.gguf");
    std::fs::write(
        &random,
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_clean_failure(&ffai(&["tokenize", "-m", random.to_str().unwrap(), "x"]), "not a GGUF");
    // A Hugging Face directory whose config.json lacks fields, or names an unknown architecture.
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64}"#,
    )
    .unwrap();
    assert_clean_failure(
        &ffai(&["generate", "-m", hf.to_str().unwrap(), "-p", "hi"]),
        "missing required field",
    );
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["MambaForCausalLM"],"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#,
    )
    .unwrap();
    std::fs::write(hf.join("model.safetensors"), {
        let h = b"{}";
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h);
        b
    })
    .unwrap();
    assert_clean_failure(
        &ffai(&["generate", "-m", hf.to_str().unwrap(), "-p", "hi"]),
        "unsupported architecture",
    );
    // A safetensors header that claims to be enormous (with a valid Llama config).
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#,
    )
    .unwrap();
    std::fs::write(hf.join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
    assert_clean_failure(
        &ffai(&["generate", "-m", hf.to_str().unwrap(), "-p", "hi"]),
        "model.safetensors",
    );
    // Nothing there at all.
    assert_clean_failure(
        &ffai(&["generate", "-m", "/no/such/model.gguf", "-p", "hi"]),
        "not found",
    );
}

#[test]
fn prompt_longer_than_the_context_fails_cleanly() {
    // SmolLM2's context is 8192 tokens; this prompt is about 9000.
    let prompt = "hello ".repeat(9000);
    assert_clean_failure(
        &ffai(&["generate", "-m", &smollm2(), "-p", &prompt, "--max-tokens", "1"]),
        "context",
    );
}

#[test]
fn bad_flags_fail_cleanly() {
    let out = ffai(&["generate", "-m", &smollm2(), "-p", "hi", "--top-p", "2"]);
    assert_clean_failure(&out, "top_p");
    let out = ffai(&["inspect", "-m", &smollm2(), "--prompt-ids", "999999"]);
    assert_clean_failure(&out, "outside the vocabulary");
}

#[test]
fn render_chat_and_generate_chat_use_the_gguf_template() {
    let dir = temp_dir("chat");
    let msgs = dir.join("m.json");
    std::fs::write(
        &msgs,
        r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]"#,
    )
    .unwrap();
    let out = ffai(&[
        "render-chat",
        "-m",
        &smollm2(),
        "--messages",
        msgs.to_str().unwrap(),
        "--add-generation-prompt",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // --chat: the prompt ids are the rendered template's (default system prompt included).
    let j = stdout_json(&ffai(&[
        "generate",
        "-m",
        &smollm2(),
        "-p",
        "Hi",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--json",
    ]));
    let ids: Vec<u64> = j["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids.first(), Some(&1), "starts with <|im_start|>");
    assert_eq!(
        &ids[ids.len() - 3..],
        &[520, 9531, 198],
        "ends with <|im_start|>assistant\\n"
    );
    // A messages file that is not a list of messages is a clean error.
    std::fs::write(&msgs, "{}").unwrap();
    assert_clean_failure(
        &ffai(&["render-chat", "-m", &smollm2(), "--messages", msgs.to_str().unwrap()]),
        "chat messages",
    );
}

#[test]
fn quantize_writes_a_loadable_gguf_and_refuses_bad_requests() {
    let dir = temp_dir("quantize");
    let dst = dir.join("smollm2-q8_0.gguf");
    let dst_s = dst.to_str().unwrap();
    let src = smollm2();
    let out = ffai(&["quantize", &src, dst_s, "--type", "Q8_0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("as Q8_0"));
    let out = ffai(&[
        "generate",
        "-m",
        dst_s,
        "-p",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert!(stdout_json(&out)["text"].as_str().unwrap().starts_with(" Paris"));
    assert_clean_failure(&ffai(&["quantize", &src, dst_s, "--type", "Q8_0"]), "--force");
    assert_clean_failure(
        &ffai(&["quantize", &src, dst_s, "--type", "Q9_9", "--force"]),
        "unknown weight type",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
