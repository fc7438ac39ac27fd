//! Reading the JSON of `/v1/completions` and `/v1/chat/completions` requests.
//!
//! Bodies are parsed into a `serde_json::Value` and read field by field, so that a field
//! of the wrong type names itself in the error, unknown fields are ignored, and every
//! number that sizes work (`n`, `max_tokens`, stop strings) is checked against a limit
//! before anything is allocated from it.

use ffai::chat::Message;
use ffai::generate::GenerationParameters;
use ffai::tools::{ToolChoice, ToolSpec};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// Most stop strings, and the longest one (in bytes).
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 512;
/// Most chat messages in one request.
pub const MAX_MESSAGES: usize = 4096;

/// What both endpoints share: sampling, the number of choices, streaming.
#[derive(Debug, Clone)]
pub struct Common {
    pub params: GenerationParameters,
    /// `max_tokens` as asked (None: as many as the context leaves).
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Limits that depend on how the server was started.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub context: usize,
    /// Most sequences the server holds at once (running plus queued).
    pub capacity: usize,
}

/// The body as a JSON object; anything else is a 400.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// A JSON value's kind, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A field's value, with `null` read as absent.
fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn number(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::Number(x)) => Ok(x.as_f64()),
        Some(other) => Err(ApiError::bad_field(
            k,
            format!("\"{k}\" must be a number, not {}", kind(other)),
        )),
    }
}

fn integer(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::Number(x)) => match x.as_i64() {
            Some(i) => Ok(Some(i)),
            // Whole numbers past i64 are absurd here; say so rather than wrap.
            None => Err(ApiError::bad_field(
                k,
                format!("\"{k}\" must be a whole number in range, not {x}"),
            )),
        },
        Some(other) => Err(ApiError::bad_field(
            k,
            format!("\"{k}\" must be a whole number, not {}", kind(other)),
        )),
    }
}

pub fn boolean(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad_field(
            k,
            format!("\"{k}\" must be true or false, not {}", kind(other)),
        )),
    }
}

pub fn string<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_field(
            k,
            format!("\"{k}\" must be a string, not {}", kind(other)),
        )),
    }
}

/// Checks `model`: absent means the served model; another name is a 404.
pub fn check_model(o: &Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match string(o, "model")? {
        Some(m) if m != served => Err(ApiError::model_not_found(m, served)),
        _ => Ok(()),
    }
}

/// Reads the sampling and control fields shared by both endpoints, on top of the
/// model's default parameters. `chat` selects how `logprobs` is typed.
pub fn parse_common(
    o: &Map<String, Value>,
    defaults: &GenerationParameters,
    limits: Limits,
    chat: bool,
) -> Result<Common, ApiError> {
    let mut p = defaults.clone();

    // max_completion_tokens (newer name) wins over max_tokens.
    let max_tokens = match integer(o, "max_completion_tokens")? {
        Some(v) => Some(("max_completion_tokens", v)),
        None => integer(o, "max_tokens")?.map(|v| ("max_tokens", v)),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some((k, v)) => {
            if v < 1 {
                return Err(ApiError::bad_field(k, format!("\"{k}\" must be at least 1, not {v}")));
            }
            if v as u64 >= limits.context as u64 {
                return Err(ApiError::bad_field(
                    k,
                    format!("\"{k}\" is {v}; the context is {} tokens", limits.context),
                ));
            }
            Some(v as usize)
        }
    };

    if let Some(t) = number(o, "temperature")? {
        if !(0.0..=100.0).contains(&t) {
            return Err(ApiError::bad_field(
                "temperature",
                "\"temperature\" must be in [0, 100]",
            ));
        }
        p.temperature = t as f32;
    }
    if let Some(v) = number(o, "top_p")? {
        if !(v > 0.0 && v <= 1.0) {
            return Err(ApiError::bad_field("top_p", "\"top_p\" must be in (0, 1]"));
        }
        p.top_p = v as f32;
    }
    if let Some(v) = integer(o, "top_k")? {
        // -1 and 0 both mean "off" (vLLM and llama.cpp spell it -1).
        p.top_k = match v {
            -1 | 0 => 0,
            v if v > 0 => usize::try_from(v).unwrap_or(usize::MAX),
            v => {
                return Err(ApiError::bad_field(
                    "top_k",
                    format!("\"top_k\" must be -1, 0 or more, not {v}"),
                ))
            }
        };
    }
    if let Some(v) = number(o, "min_p")? {
        if !(0.0..=1.0).contains(&v) {
            return Err(ApiError::bad_field("min_p", "\"min_p\" must be in [0, 1]"));
        }
        p.min_p = v as f32;
    }
    if let Some(v) = number(o, "repetition_penalty")? {
        if !(v > 0.0 && v <= 100.0) {
            return Err(ApiError::bad_field(
                "repetition_penalty",
                "\"repetition_penalty\" must be in (0, 100]",
            ));
        }
        p.repetition_penalty = v as f32;
    }
    if let Some(v) = number(o, "presence_penalty")? {
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::bad_field(
                "presence_penalty",
                "\"presence_penalty\" must be in [-2, 2]",
            ));
        }
        p.presence_penalty = v as f32;
    }
    if let Some(v) = number(o, "frequency_penalty")? {
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::bad_field(
                "frequency_penalty",
                "\"frequency_penalty\" must be in [-2, 2]",
            ));
        }
        p.frequency_penalty = v as f32;
    }
    if let Some(s) = integer(o, "seed")? {
        // Negative seeds are valid in OpenAI's API; their bits are as good as any.
        p.seed = Some(s as u64);
    }
    p.stop_strings.extend(parse_stop(o)?);
    if let Some(v) = field(o, "response_format") {
        p.response_format = ffai::constrain::ResponseFormat::from_openai(v)
            .map_err(|e| ApiError::bad_field("response_format", e.message().to_string()))?;
    }

    let n = match integer(o, "n")? {
        None => 1,
        Some(v) if v < 1 => return Err(ApiError::bad_field("n", format!("\"n\" must be at least 1, not {v}"))),
        Some(v) if v as u64 > MAX_N as u64 => {
            return Err(ApiError::bad_field("n", format!("\"n\" is {v}; at most {MAX_N}")))
        }
        Some(v) if v as u64 > limits.capacity as u64 => {
            return Err(ApiError::bad_field(
                "n",
                format!("\"n\" is {v}; this server holds at most {} sequences", limits.capacity),
            ))
        }
        Some(v) => v as usize,
    };

    let stream = boolean(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")?.unwrap_or(false),
        Some(other) => {
            return Err(ApiError::bad_field(
                "stream_options",
                format!("\"stream_options\" must be an object, not {}", kind(other)),
            ))
        }
    };

    // Log-probabilities: chat says `logprobs: true` and `top_logprobs: k`; completions
    // say `logprobs: k`.
    let max_top = ffai::generate::MAX_TOP_LOGPROBS as i64;
    p.logprobs = if chat {
        let on = boolean(o, "logprobs")?.unwrap_or(false);
        match integer(o, "top_logprobs")? {
            Some(k) if !(0..=max_top).contains(&k) => {
                return Err(ApiError::bad_field(
                    "top_logprobs",
                    format!("\"top_logprobs\" must be in 0..={max_top}"),
                ))
            }
            Some(_) if !on => {
                return Err(ApiError::bad_field(
                    "top_logprobs",
                    "\"top_logprobs\" needs \"logprobs\": true",
                ))
            }
            Some(k) => Some(k as usize),
            None => on.then_some(0),
        }
    } else {
        match integer(o, "logprobs")? {
            Some(k) if !(0..=max_top).contains(&k) => {
                return Err(ApiError::bad_field(
                    "logprobs",
                    format!("\"logprobs\" must be in 0..={max_top}"),
                ))
            }
            k => k.map(|k| k as usize),
        }
    };
    if !chat {
        if boolean(o, "echo")?.unwrap_or(false) {
            return Err(ApiError::bad_field("echo", "\"echo\" is not supported yet"));
        }
        if field(o, "suffix").is_some() {
            return Err(ApiError::bad_field("suffix", "\"suffix\" is not supported"));
        }
    }
    if !chat {
        for k in ["tools", "tool_choice", "chat_template_kwargs", "reasoning_effort"] {
            if field(o, k).is_some() {
                return Err(ApiError::bad_field(k, format!("\"{k}\" is for /v1/chat/completions")));
            }
        }
    }

    Ok(Common {
        params: p,
        max_tokens,
        n,
        stream,
        include_usage,
    })
}

/// A chat request's `tools`, `tool_choice` and `parallel_tool_calls`.
#[derive(Debug, Clone)]
pub struct Tools {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// May the model make several calls in one answer (default true).
    pub parallel: bool,
}

/// Reads the tool fields (see `ffai::tools`): each error is a 400 naming its field. A
/// forced call (`required` or a named function) cannot be combined with
/// `response_format`, which would constrain the same output.
pub fn parse_tools(o: &Map<String, Value>) -> Result<Tools, ApiError> {
    let tools = match field(o, "tools") {
        None => Vec::new(),
        Some(v) => ffai::tools::parse_tools(v).map_err(|e| ApiError::bad_field("tools", e.message().to_string()))?,
    };
    let choice = ffai::tools::parse_tool_choice(field(o, "tool_choice"), &tools)
        .map_err(|e| ApiError::bad_field("tool_choice", e.message().to_string()))?;
    let parallel = boolean(o, "parallel_tool_calls")?.unwrap_or(true);
    if matches!(choice, ToolChoice::Required | ToolChoice::Named(_))
        && field(o, "response_format").is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text"))
    {
        return Err(ApiError::bad_field(
            "tool_choice",
            "a forced tool call (\"tool_choice\" \"required\" or a function) cannot be combined with \"response_format\"",
        ));
    }
    Ok(Tools {
        tools,
        choice,
        parallel,
    })
}

/// `stop`: a string or a list of strings, bounded in count and length.
fn parse_stop(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let one = |v: &Value| -> Result<String, ApiError> {
        match v {
            Value::String(s) if s.is_empty() => Err(ApiError::bad_field("stop", "stop strings may not be empty")),
            Value::String(s) if s.len() > MAX_STOP_BYTES => Err(ApiError::bad_field(
                "stop",
                format!("a stop string is longer than {MAX_STOP_BYTES} bytes"),
            )),
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::bad_field(
                "stop",
                format!("\"stop\" entries must be strings, not {}", kind(other)),
            )),
        }
    };
    match field(o, "stop") {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) if a.len() > MAX_STOP_STRINGS => Err(ApiError::bad_field(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        )),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v @ Value::String(_)) => Ok(vec![one(v)?]),
        Some(other) => Err(ApiError::bad_field(
            "stop",
            format!("\"stop\" must be a string or a list of strings, not {}", kind(other)),
        )),
    }
}

/// A completions prompt: text to tokenize, or token ids as given.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// `prompt`: a string, a list of token ids, or a list holding one of those (the batch
/// forms with several prompts are refused: one request, one prompt).
pub fn parse_prompt(o: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let v = field(o, "prompt").ok_or_else(|| ApiError::bad_field("prompt", "\"prompt\" is missing"))?;
    prompt_value(v, true)
}

fn prompt_value(v: &Value, outer: bool) -> Result<Prompt, ApiError> {
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.iter().all(Value::is_number) && !a.is_empty() => {
            let ids = a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| ApiError::bad_field("prompt", format!("bad token id {x} in \"prompt\"")))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            Ok(Prompt::Tokens(ids))
        }
        Value::Array(a) if outer && a.len() == 1 => prompt_value(&a[0], false),
        Value::Array(a) if outer && a.len() > 1 => Err(ApiError::bad_field(
            "prompt",
            "one prompt per request (use \"n\" for several completions of it)",
        )),
        Value::Array(_) => Err(ApiError::bad_field(
            "prompt",
            "\"prompt\" must be a string or a non-empty list of token ids",
        )),
        other => Err(ApiError::bad_field(
            "prompt",
            format!(
                "\"prompt\" must be a string or a list of token ids, not {}",
                kind(other)
            ),
        )),
    }
}

/// `messages`: a non-empty list of `{role, content}`, content a string, `null`, or a list
/// of text parts (joined with newlines, as vLLM does for templates that expect text).
pub fn parse_messages(o: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let bad = |m: String| ApiError::bad_field("messages", m);
    let list = match field(o, "messages") {
        None => return Err(bad("\"messages\" is missing".into())),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(bad(format!("\"messages\" must be a list, not {}", kind(other)))),
    };
    if list.is_empty() {
        return Err(bad("\"messages\" is empty".into()));
    }
    if list.len() > MAX_MESSAGES {
        return Err(bad(format!("at most {MAX_MESSAGES} messages")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(format!("message {i} must be an object, not {}", kind(m))));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "message {i}: \"role\" must be a string, not {}",
                    kind(other)
                )))
            }
            None => return Err(bad(format!("message {i} has no \"role\""))),
        };
        let text = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                        _ => {
                            return Err(bad(format!(
                                "message {i}: only {{\"type\": \"text\", \"text\": ...}} content parts are supported"
                            )))
                        }
                    }
                }
                texts.join("\n")
            }
            Some(other) => {
                return Err(bad(format!(
                    "message {i}: \"content\" must be a string or a list of parts, not {}",
                    kind(other)
                )))
            }
        };
        let mut msg = Message::new(role, text);
        msg.tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(calls)) if calls.is_empty() => None,
            Some(Value::Array(calls)) => Some(message_tool_calls(i, calls)?),
            Some(other) => {
                return Err(bad(format!(
                    "message {i}: \"tool_calls\" must be a list, not {}",
                    kind(other)
                )))
            }
        };
        for (k, slot) in [("tool_call_id", &mut msg.tool_call_id), ("name", &mut msg.name)] {
            match m.get(k) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => *slot = Some(s.clone()),
                Some(Value::String(_)) => {
                    return Err(bad(format!("message {i}: \"{k}\" is longer than {MAX_ID_BYTES} bytes")))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "message {i}: \"{k}\" must be a string, not {}",
                        kind(other)
                    )))
                }
            }
        }
        if msg.role == "tool" && msg.tool_call_id.is_none() {
            return Err(bad(format!("message {i}: a \"tool\" message needs a \"tool_call_id\"")));
        }
        out.push(msg);
    }
    Ok(out)
}

/// Longest call id or tool-message name.
pub const MAX_ID_BYTES: usize = 256;

/// An assistant message's `tool_calls` as templates expect them: each
/// `{"id", "type": "function", "function": {"name", "arguments"}}` with `arguments` (a
/// JSON string in the API) parsed to an object.
fn message_tool_calls(i: usize, calls: &[Value]) -> Result<Vec<Value>, ApiError> {
    let bad = |m: String| ApiError::bad_field("messages", format!("message {i}: {m}"));
    if calls.len() > ffai::tools::MAX_CALLS {
        return Err(bad(format!("at most {} tool calls", ffai::tools::MAX_CALLS)));
    }
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let id = match c.get("id") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => s.clone(),
                _ => {
                    return Err(bad(format!(
                        "tool_calls[{j}].id must be a string of at most {MAX_ID_BYTES} bytes"
                    )))
                }
            };
            let f = c.get("function").and_then(Value::as_object);
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let Some(name) = name.filter(|n| n.len() <= ffai::tools::MAX_NAME_BYTES) else {
                return Err(bad(format!(
                    "tool_calls[{j}] needs \"function\": {{\"name\", \"arguments\"}} with a name of at most {} bytes",
                    ffai::tools::MAX_NAME_BYTES
                )));
            };
            let arguments = match f.and_then(|f| f.get("arguments")) {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return Err(bad(format!(
                            "tool_calls[{j}].function.arguments must be a JSON object in a string"
                        )))
                    }
                },
                Some(v @ Value::Object(_)) => v.clone(),
                Some(other) => {
                    return Err(bad(format!(
                        "tool_calls[{j}].function.arguments must be a string, not {}",
                        kind(other)
                    )))
                }
            };
            Ok(serde_json::json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ffai::chat::Content;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).unwrap()
    }

    const LIMITS: Limits = Limits {
        context: 1024,
        capacity: 8,
    };

    #[test]
    fn fields_and_limits() {
        let d = GenerationParameters::default();
        let c = parse_common(
            &obj(r#"{"max_tokens": 5, "temperature": 0, "stop": "x", "n": 2, "seed": -1, "whatever": [1]}"#),
            &d,
            LIMITS,
            true,
        )
        .unwrap();
        assert_eq!(c.max_tokens, Some(5));
        assert_eq!(c.params.temperature, 0.0);
        assert_eq!(c.params.stop_strings, vec!["x".to_string()]);
        assert_eq!(c.n, 2);
        assert_eq!(c.params.seed, Some(u64::MAX));
        assert_eq!(c.params.logprobs, None);
        let c = parse_common(
            &obj(r#"{"logprobs": true, "top_logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": -1}"#),
            &d,
            LIMITS,
            true,
        )
        .unwrap();
        assert_eq!(c.params.logprobs, Some(3));
        assert_eq!((c.params.presence_penalty, c.params.frequency_penalty), (0.5, -1.0));
        let c = parse_common(&obj(r#"{"logprobs": 2}"#), &d, LIMITS, false).unwrap();
        assert_eq!(c.params.logprobs, Some(2));
        assert!(parse_common(&obj(r#"{"logprobs": 21}"#), &d, LIMITS, false).is_err());
        for bad in [
            r#"{"max_tokens": "5"}"#,
            r#"{"max_tokens": 0}"#,
            r#"{"max_tokens": 1e30}"#,
            r#"{"max_tokens": 99999999}"#,
            r#"{"temperature": -1}"#,
            r#"{"top_p": 0}"#,
            r#"{"n": 17}"#,
            r#"{"n": 9}"#,
            r#"{"stop": [1]}"#,
            r#"{"stop": ""}"#,
            r#"{"stream": "yes"}"#,
            r#"{"logprobs": "yes"}"#,
            r#"{"logprobs": true, "top_logprobs": 21}"#,
            r#"{"top_logprobs": 2}"#,
            r#"{"presence_penalty": 2.5}"#,
            r#"{"frequency_penalty": "1"}"#,
        ] {
            let e = parse_common(&obj(bad), &d, LIMITS, true).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
    }

    #[test]
    fn prompts_and_messages() {
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": [1, 2]}"#)), Ok(Prompt::Tokens(v)) if v == [1, 2]));
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": ["a"]}"#)), Ok(Prompt::Text(t)) if t == "a"));
        assert!(parse_prompt(&obj(r#"{"prompt": ["a", "b"]}"#)).is_err());
        assert!(parse_prompt(&obj(r#"{"prompt": [-1]}"#)).is_err());
        let m = parse_messages(&obj(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m[0].content, Content::Text("a\nb".into()));
        assert!(parse_messages(&obj(r#"{"messages": []}"#)).is_err());
        assert!(parse_messages(&obj(r#"{"messages": [{"role": 1}]}"#)).is_err());
    }

    #[test]
    fn tool_turns_and_tool_fields() {
        let m = parse_messages(&obj(
            r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\": [1, 2]}"}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "done"}]}"#,
        ))
        .unwrap();
        assert_eq!(m[0].content, Content::Text(String::new()));
        assert_eq!(
            m[0].tool_calls.as_ref().unwrap()[0],
            serde_json::json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": [1, 2]}}})
        );
        assert_eq!(m[1].tool_call_id.as_deref(), Some("call_1"));
        for bad in [
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
            r#"{"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}"#,
            r#"{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}"#,
            r#"{"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}"#,
            r#"{"messages": [{"role": "assistant", "tool_calls": "f"}]}"#,
        ] {
            assert!(parse_messages(&obj(bad)).is_err(), "{bad}");
        }
        let t = parse_tools(&obj(
            r#"{"tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": false}"#,
        ))
        .unwrap();
        assert_eq!((t.tools.len(), t.choice, t.parallel), (1, ToolChoice::Auto, false));
        let t = parse_tools(&obj(r#"{"tool_choice": "none"}"#)).unwrap();
        assert_eq!((t.tools.len(), t.choice), (0, ToolChoice::None));
        assert!(parse_tools(&obj(
            r#"{"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "response_format": {"type": "json_object"}}"#
        ))
        .is_err());
        assert!(parse_common(
            &obj(r#"{"tools": []}"#),
            &GenerationParameters::default(),
            LIMITS,
            false
        )
        .is_err());
    }
}
