//! Chat templates render byte for byte as Hugging Face transformers does. The expected
//! strings in tests/fixtures/chat/cases.json come from scripts/make_chat_fixtures.py.

mod common;

use std::path::PathBuf;

use common::{fixtures, ChatCase as Case};

use ffai::chat::{ChatTemplate, Content, Message, RenderOptions, TemplateSource};

fn load_template(name: &str) -> ChatTemplate {
    let path = fixtures().join(format!("{name}.jinja"));
    let text = std::fs::read_to_string(&path).unwrap();
    ChatTemplate::new(&text, TemplateSource::ChatTemplateJinja(path)).unwrap()
}

fn today(fmt: &str) -> String {
    let t = ChatTemplate::new(&format!("{{{{ strftime_now('{fmt}') }}}}"), TemplateSource::Gguf).unwrap();
    t.render(&[], &RenderOptions::default()).unwrap()
}

#[test]
fn fixtures_render_like_transformers() {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut templates = std::collections::BTreeSet::new();
    for c in &cases {
        templates.insert(c.template.clone());
        let tmpl = load_template(&c.template);
        let opts = RenderOptions {
            add_generation_prompt: c.add_generation_prompt,
            bos_token: c.bos_token.clone(),
            eos_token: c.eos_token.clone(),
            tools: c.tools.clone(),
            enable_thinking: c.enable_thinking,
            extra: Vec::new(),
        };
        let got = tmpl.render(&c.messages, &opts);
        let id = format!("{}/{}", c.template, c.case);
        match (&c.expected, &c.error, got) {
            (Some(want), _, Ok(got)) => {
                let want = match &c.today_format {
                    Some(fmt) => want.replace("@TODAY@", &today(fmt)),
                    None => want.clone(),
                };
                if got != want {
                    failures.push(format!("{id}: mismatch\n  want {want:?}\n  got  {got:?}"));
                }
            }
            (Some(_), _, Err(e)) => failures.push(format!("{id}: unexpected error {e}")),
            (None, Some(want), Err(e)) => {
                let msg = e.to_string();
                if !msg.contains(want.as_str()) || !msg.contains(&format!("{}.jinja", c.template)) {
                    failures.push(format!("{id}: error {msg:?} lacks {want:?} or the template origin"));
                }
            }
            (None, _, Ok(got)) => failures.push(format!("{id}: expected an error, rendered {got:?}")),
            (None, None, Err(e)) => failures.push(format!("{id}: case has no expectation ({e})")),
        }
    }
    assert_eq!(templates.len(), 7, "templates covered: {templates:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn syntax_error_names_origin() {
    let origin = TemplateSource::TokenizerConfig(PathBuf::from("/models/x/tokenizer_config.json"));
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", origin).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/models/x/tokenizer_config.json"), "{msg}");
    assert!(msg.contains("syntax error"), "{msg}");

    let err = ChatTemplate::new("{% if x %}never closed", TemplateSource::Gguf).unwrap_err();
    assert!(err.to_string().contains("GGUF tokenizer.chat_template"), "{err}");
}

#[test]
fn raise_exception_is_an_error_naming_origin() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}ok",
        TemplateSource::Gguf,
    )
    .unwrap();
    let err = t
        .render(&[Message::assistant("hi")], &RenderOptions::default())
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("first turn must be the user"), "{msg}");
    assert!(msg.contains("GGUF tokenizer.chat_template"), "{msg}");
    assert_eq!(
        t.render(&[Message::user("hi")], &RenderOptions::default()).unwrap(),
        "ok"
    );
}

#[test]
fn gemma_fallback_renders_turn_format() {
    let t = ChatTemplate::fallback("gemma").unwrap();
    assert_eq!(t.origin(), &TemplateSource::FamilyFallback("gemma"));
    let opts = RenderOptions {
        add_generation_prompt: true,
        bos_token: "<bos>".into(),
        eos_token: "<eos>".into(),
        ..Default::default()
    };
    let msgs = [
        Message::user("Hi"),
        Message::assistant("Hello!"),
        Message::user("How are you?"),
    ];
    assert_eq!(
        t.render(&msgs, &opts).unwrap(),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"
    );
    let sys = [Message::system("Be brief."), Message::user("Hi")];
    assert_eq!(
        t.render(
            &sys,
            &RenderOptions {
                add_generation_prompt: false,
                ..opts.clone()
            }
        )
        .unwrap(),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    );
    // The fallback agrees with the real Gemma 3 template on plain conversations.
    let real = load_template("gemma3");
    assert_eq!(real.render(&msgs, &opts).unwrap(), t.render(&msgs, &opts).unwrap());

    let chatml = ChatTemplate::fallback("chatml").unwrap();
    assert_eq!(
        chatml.render(&[Message::user("Hi")], &opts).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(ChatTemplate::fallback("no-such-family").is_none());
}

#[test]
fn message_deserializes_text_and_parts() {
    let m: Message = serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
    assert_eq!(m, Message::user("hi"));
    let m: Message = serde_json::from_str(r#"{"role": "user", "content": [{"type": "text", "text": "a"}]}"#).unwrap();
    assert!(matches!(&m.content, Content::Parts(p) if p.len() == 1 && p[0]["text"] == "a"));
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ffai-chat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn from_hf_dir_picks_jinja_then_config() {
    let opts = RenderOptions::default();
    let msgs = [Message::user("x")];

    let dir = temp_dir("pick");
    assert!(ChatTemplate::from_hf_dir(&dir).unwrap().is_none());
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    assert!(ChatTemplate::from_hf_dir(&dir).unwrap().is_none());

    let cfg = serde_json::json!({"chat_template": "from-config {{ messages[0].content }}"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(
        t.origin(),
        &TemplateSource::TokenizerConfig(dir.join("tokenizer_config.json"))
    );
    assert_eq!(t.render(&msgs, &opts).unwrap(), "from-config x");

    std::fs::write(
        dir.join("chat_template.jinja"),
        "from-jinja {{ messages[0].content }}\n",
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(
        t.origin(),
        &TemplateSource::ChatTemplateJinja(dir.join("chat_template.jinja"))
    );
    // Like Jinja's default, a single trailing newline of the template is dropped.
    assert_eq!(t.render(&msgs, &opts).unwrap(), "from-jinja x");
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = temp_dir("named");
    let cfg = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "tools {{ messages[0].content }}"},
        {"name": "default", "template": "default {{ messages[0].content }}"},
        {"name": "rag", "template": "rag"},
    ]});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_hf_dir(&dir).unwrap().unwrap();
    assert_eq!(t.render(&msgs, &opts).unwrap(), "default x");

    let cfg = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let err = ChatTemplate::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("default"), "{err}");

    std::fs::write(dir.join("chat_template.jinja"), "{% if %}").unwrap();
    let err = ChatTemplate::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("chat_template.jinja"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tojson_follows_python_json_dumps() {
    // A dict literal keeps its insertion order, as a Python dict does.
    let src = concat!(
        r#"{% set x = {'b': 1, 'a': [1.5, none, true, 'q"\n']} %}"#,
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}|",
        "{{ 'é<>&' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=4) }}"
    );
    let t = ChatTemplate::new(src, TemplateSource::Gguf).unwrap();
    let out = t.render(&[], &RenderOptions::default()).unwrap();
    // Python: json.dumps(x), json.dumps(x, indent=2), json.dumps(x, separators=(',', ':'),
    // sort_keys=True), json.dumps('é<>&', ensure_ascii=False), json.dumps('é'), json.dumps([], indent=4)
    let want = concat!(
        r#"{"b": 1, "a": [1.5, null, true, "q\"\n"]}|"#,
        "{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    null,\n    true,\n    \"q\\\"\\n\"\n  ]\n}|",
        r#"{"a":[1.5,null,true,"q\"\n"],"b":1}|"#,
        r#""é<>&"|"\u00e9"|[]"#
    );
    assert_eq!(out, want);
}

/// GPT-OSS's harmony format comes from its own chat template (tests/fixtures/chat/
/// gpt_oss.jinja, as the checkpoints ship it); it renders as transformers renders it
/// (scripts/make_gpt_oss_chat_fixture.py), the date it prints included.
#[test]
fn gpt_oss_harmony_template_renders_like_transformers() {
    let text = std::fs::read_to_string(fixtures().join("gpt_oss_cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 3);
    let tmpl = load_template("gpt_oss");
    for c in &cases {
        let opts = RenderOptions {
            add_generation_prompt: c.add_generation_prompt,
            bos_token: c.bos_token.clone(),
            eos_token: c.eos_token.clone(),
            tools: c.tools.clone(),
            enable_thinking: c.enable_thinking,
            extra: Vec::new(),
        };
        let got = tmpl.render(&c.messages, &opts).unwrap();
        let want = c.expected.as_ref().unwrap().replace("@TODAY@", &today("%Y-%m-%d"));
        assert_eq!(got, want, "gpt_oss/{}", c.case);
        assert!(got.starts_with("<|start|>system<|message|>"), "gpt_oss/{}", c.case);
    }
}
