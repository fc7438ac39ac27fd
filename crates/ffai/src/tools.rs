//! Function calling: the OpenAI `tools` / `tool_choice` request fields, how a model family
//! writes a call, the grammar that forces one, and the parsers that read calls back out of
//! generated text.
//!
//! This lives in the library, not the server, because everything here is about the model:
//! which format its chat template teaches (recognised from the template's text), how its
//! tokenizer spells the format's markers (a special token is forced by id in the
//! grammar), and how tool turns are rendered through its template. The server only maps
//! errors to 400s and shapes the JSON.
//!
//! Formats ([`ToolFormat`]):
//! - **Hermes** (Qwen2.5/Qwen3, Hermes, SmolLM3, and ffai's own prompt for templates that
//!   know no tools): `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one
//!   block per call, text allowed before the first.
//! - **Llama 3.x**: the whole answer is `{"name": "f", "parameters": {...}}` (optionally
//!   after `<|python_tag|>`; several calls separated by `;`).
//! - **Mistral**: `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`, or the newer
//!   `[TOOL_CALLS]f[ARGS]{...}` per call.
//! - **Harmony** (gpt-oss): `<|channel|>commentary to=functions.f <|constrain|>json<|message|>{...}`
//!   (the recipient may also come before the channel), ended by `<|call|>` or the end.
//!
//! A template that mentions no tools at all (SmolLM2, Gemma) gets ffai's tool prompt
//! appended to its system message and the Hermes format; tool turns in its history are
//! rewritten as text in that format ([`prepare_messages`]).
//!
//! Everything here takes untrusted input (requests, generated text): sizes and counts are
//! checked against the limits below before use, and nothing panics on malformed input.

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::chat::{Content, Message};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;
/// Longest function name (OpenAI's limit): letters, digits, `_` and `-`.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest function description.
pub const MAX_DESCRIPTION_BYTES: usize = 16 * 1024;
/// Largest parameters schema of one tool, as compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Largest `tools` list, as compact JSON.
pub const MAX_TOOLS_BYTES: usize = 512 * 1024;
/// Deepest nesting of objects and lists in a parameters schema.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// Most calls one assistant message may carry (history, and calls parsed from output).
pub const MAX_CALLS: usize = 128;
/// Most calls a forced answer may make with `parallel_tool_calls` (the grammar's bound, so
/// a model that keeps calling ends).
pub const MAX_FORCED_CALLS: usize = 16;

/// One offered function.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema object for the arguments.
    pub parameters: Value,
}

impl ToolSpec {
    /// The OpenAI shape, which is what transformers passes to chat templates.
    pub fn to_openai(&self) -> Value {
        let mut f = Map::new();
        f.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            f.insert("description".into(), d.clone().into());
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": f})
    }
}

/// What the model may or must do with the offered tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No call: tools are not offered to the model and output is not parsed.
    None,
    /// The model decides; calls are parsed from its output.
    Auto,
    /// At least one call, to any tool (grammar-constrained).
    Required,
    /// One call to this function (grammar-constrained).
    Named(String),
}

/// A call read from output (or forced by the grammar).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as compact JSON text (an object).
    pub arguments: String,
}

/// Output split into the text before the calls and the calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The text before the first call, trailing whitespace removed; None when empty.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// How a family writes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
    Harmony,
    /// Granite 3.x: `<|tool_call|>` then a JSON list of `{"name", "arguments"}` objects.
    /// (Granite 4 templates teach the Hermes form.)
    Granite,
}

/// A template's tool format, whether the template renders tools itself, and the
/// reasoning block its model may write before a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolTemplate {
    pub format: ToolFormat,
    /// The template reads `tools` and tool turns; when false ffai writes its own prompt.
    pub native: bool,
    /// What the model may write before its calls ([`ToolTemplate::detect`] judges it from
    /// the template alone; [`ToolTemplate::for_prompt`] from the rendered prompt too).
    pub reasoning: Reasoning,
}

/// A reasoning block a model writes before its answer, as its template teaches it. A
/// forced call's grammar lets the model write it first ([`grammar`]); it is not part of
/// the calls nor of their message's content ([`Reasoning::split`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reasoning {
    /// None: the template teaches none, or the prompt already holds the answer's block
    /// (an empty `<think>\n\n</think>`: thinking switched off).
    None,
    /// `<think>` … `</think>` may open the answer (Qwen3 and templates like it).
    Think,
    /// The prompt ends with an opened `<think>`: the answer starts inside the block, and
    /// closes it with `</think>`.
    ThinkOpen,
    /// Harmony (gpt-oss): an analysis-channel message, `<|channel|>analysis<|message|>` …
    /// `<|end|>`, may come first; the call follows as a new `<|start|>assistant` message.
    Analysis,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANALYSIS_OPEN: &str = "<|channel|>analysis<|message|>";
const ANALYSIS_CLOSE: &str = "<|end|>";

impl Reasoning {
    /// The block's opening and closing text; the opening is empty for [`Reasoning::ThinkOpen`] (the
    /// prompt holds it).
    pub(crate) fn tags(self) -> Option<(&'static str, &'static str)> {
        match self {
            Reasoning::None => None,
            Reasoning::Think => Some((THINK_OPEN, THINK_CLOSE)),
            Reasoning::ThinkOpen => Some(("", THINK_CLOSE)),
            Reasoning::Analysis => Some((ANALYSIS_OPEN, ANALYSIS_CLOSE)),
        }
    }

    /// How far the reasoning block at the start of `text` (an output, or a prefix of one
    /// being streamed) goes: `Some(n)` when it ends at byte `n` (its closing tag
    /// included; 0 when the output does not start with one), `None` while `text` is inside
    /// one or may still begin one.
    pub fn extent(self, text: &str) -> Option<usize> {
        let Some((open, close)) = self.tags() else {
            return Some(0);
        };
        if !text.starts_with(open) {
            return if open.starts_with(text) { None } else { Some(0) };
        }
        text[open.len()..].find(close).map(|at| open.len() + at + close.len())
    }

    /// A whole output split into its reasoning (the block's text without its tags, `None`
    /// when there is none) and the rest. A block the output never closed (cut off by the
    /// token limit) is all reasoning.
    pub fn split(self, text: &str) -> (Option<&str>, &str) {
        let Some((open, close)) = self.tags() else {
            return (None, text);
        };
        match self.extent(text) {
            Some(0) => (None, text),
            Some(n) => (Some(&text[open.len()..n - close.len()]), &text[n..]),
            None => (Some(text.get(open.len()..).unwrap_or("")), ""),
        }
    }
}

impl ToolTemplate {
    /// Recognises the format a chat template teaches from its text.
    pub fn detect(source: &str) -> ToolTemplate {
        let has = |s: &str| source.contains(s);
        let format = if has("<|channel|>") && has("functions.") {
            ToolFormat::Harmony
        } else if has("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if has("<|tool_call|>") {
            ToolFormat::Granite
        } else if has("<tool_call>") {
            ToolFormat::Hermes
        } else if has("<|python_tag|>") || (has("<|start_header_id|>") && has("\"parameters\"")) {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        };
        let native = match format {
            ToolFormat::Hermes => has("<tool_call>") && has("tools"),
            _ => has("tools"),
        };
        // Qwen3's template (and others that think) write `<think>` blocks; Granite 3.3's
        // mentions them only for a thinking switch ffai does not pass.
        let reasoning = match format {
            ToolFormat::Harmony => Reasoning::Analysis,
            ToolFormat::Hermes if has(THINK_OPEN) && has(THINK_CLOSE) => Reasoning::Think,
            _ => Reasoning::None,
        };
        ToolTemplate {
            format,
            native,
            reasoning,
        }
    }

    /// The template as rendered into `prompt` (the conversation with its generation
    /// prompt): a prompt that ends with an empty think block (thinking switched off)
    /// leaves no reasoning, and one that ends with an opened `<think>` starts the answer
    /// inside one.
    pub fn for_prompt(mut self, prompt: &str) -> ToolTemplate {
        if matches!(self.reasoning, Reasoning::Think | Reasoning::ThinkOpen) {
            let p = prompt.trim_end();
            self.reasoning = if p.ends_with(THINK_CLOSE) {
                Reasoning::None
            } else if p.ends_with(THINK_OPEN) {
                Reasoning::ThinkOpen
            } else {
                Reasoning::Think
            };
        }
        self
    }
}

fn bad(m: impl Into<String>) -> Error {
    Error::new(m.into())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Whether `name` is a sane function name: 1 to 64 letters, digits, `_` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The deepest nesting of objects and lists in `v`, walked without recursion and stopping
/// past `limit`.
fn depth_exceeds(v: &Value, limit: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(v, 1)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(o) => Box::new(o.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if d > limit {
            return true;
        }
        stack.extend(children.map(|c| (c, d + 1)));
    }
    false
}

fn compact_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

/// Reads the OpenAI `tools` list: `[{"type": "function", "function": {"name",
/// "description"?, "parameters"?, "strict"?}}]`. Names must be sane and unique; sizes,
/// counts and schema depth are bounded. Whether each schema compiles is checked by
/// [`check_schemas`] (it needs the tokenizer).
pub fn parse_tools(v: &Value) -> Result<Vec<ToolSpec>> {
    let Value::Array(list) = v else {
        return Err(bad(format!("\"tools\" must be a list, not {}", json_kind(v))));
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(format!("at most {MAX_TOOLS} tools")));
    }
    if compact_len(v) > MAX_TOOLS_BYTES {
        return Err(bad(format!("\"tools\" is larger than {MAX_TOOLS_BYTES} bytes")));
    }
    let mut out: Vec<ToolSpec> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let Value::Object(t) = t else {
            return Err(bad(format!("tools[{i}] must be an object, not {}", json_kind(t))));
        };
        match t.get("type") {
            Some(Value::String(s)) if s == "function" => {}
            Some(Value::String(s)) => {
                return Err(bad(format!(
                    "tools[{i}]: type \"{}\" is not supported (only \"function\")",
                    s.chars().take(40).collect::<String>()
                )))
            }
            _ => return Err(bad(format!("tools[{i}] needs \"type\": \"function\""))),
        }
        let Some(Value::Object(f)) = t.get("function") else {
            return Err(bad(format!("tools[{i}] needs a \"function\" object")));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            Some(Value::String(_)) => {
                return Err(bad(format!(
                    "tools[{i}].function.name must be 1 to {MAX_NAME_BYTES} letters, digits, '_' or '-'"
                )))
            }
            _ => return Err(bad(format!("tools[{i}].function needs a \"name\" string"))),
        };
        if out.iter().any(|o| o.name == name) {
            return Err(bad(format!("tools[{i}]: the name \"{name}\" is used twice")));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) if d.len() <= MAX_DESCRIPTION_BYTES => Some(d.clone()),
            Some(Value::String(_)) => {
                return Err(bad(format!(
                    "tools[{i}].function.description is longer than {MAX_DESCRIPTION_BYTES} bytes"
                )))
            }
            Some(other) => {
                return Err(bad(format!(
                    "tools[{i}].function.description must be a string, not {}",
                    json_kind(other)
                )))
            }
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => {
                if compact_len(p) > MAX_SCHEMA_BYTES {
                    return Err(bad(format!(
                        "tools[{i}].function.parameters is larger than {MAX_SCHEMA_BYTES} bytes"
                    )));
                }
                if depth_exceeds(p, MAX_SCHEMA_DEPTH) {
                    return Err(bad(format!(
                        "tools[{i}].function.parameters nests deeper than {MAX_SCHEMA_DEPTH} levels"
                    )));
                }
                p.clone()
            }
            Some(other) => {
                return Err(bad(format!(
                    "tools[{i}].function.parameters must be a JSON schema object, not {}",
                    json_kind(other)
                )))
            }
        };
        out.push(ToolSpec {
            name,
            description,
            parameters,
        });
    }
    Ok(out)
}

/// Compiles every tool's parameters schema with the grammar engine over `tok`'s
/// vocabulary; the first that does not compile is the error.
pub fn check_schemas(tools: &[ToolSpec], tok: &Tokenizer) -> Result<()> {
    for (i, t) in tools.iter().enumerate() {
        let format = crate::constrain::ResponseFormat::JsonSchema(t.parameters.clone());
        crate::constrain::Constraint::new(tok, &format)
            .map_err(|e| bad(format!("tools[{i}] (\"{}\"): {}", t.name, e.message())))?;
    }
    Ok(())
}

/// Reads `tool_choice` (absent: "auto" when tools are offered, else "none"):
/// "none", "auto", "required", or `{"type": "function", "function": {"name": ...}}`
/// naming an offered tool.
pub fn parse_tool_choice(v: Option<&Value>, tools: &[ToolSpec]) -> Result<ToolChoice> {
    let choice = match v {
        None | Some(Value::Null) => {
            return Ok(if tools.is_empty() { ToolChoice::None } else { ToolChoice::Auto });
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(bad(
                    "\"tool_choice\" must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad("\"tool_choice\" as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}")
                })?;
            if !tools.iter().any(|t| t.name == name) {
                let shown: String = name.chars().take(MAX_NAME_BYTES).collect();
                return Err(bad(format!("\"tool_choice\" names \"{shown}\", which is not in \"tools\"")));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(other) => {
            return Err(bad(format!(
                "\"tool_choice\" must be a string or an object, not {}",
                json_kind(other)
            )))
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required) {
        return Err(bad("\"tool_choice\" is \"required\" but no \"tools\" are given"));
    }
    Ok(choice)
}

// ---------------------------------------------------------------------------------------
// Rendering

/// ffai's tool prompt for templates that have none (appended to the system message).
fn generic_prompt(tools: &[ToolSpec]) -> String {
    let mut s = String::from(
        "You can call functions to help answer. Their signatures, one JSON object per line, are between <tools> and </tools>:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_openai().to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments between <tool_call> and </tool_call>:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>",
    );
    s
}

/// A call of a history message as Hermes text.
fn hermes_block(call: &Value) -> String {
    let f = call.get("function").unwrap_or(call);
    let name = f.get("name").and_then(Value::as_str).unwrap_or("");
    let args = f.get("arguments").cloned().unwrap_or(json!({}));
    let body = json!({"name": name, "arguments": args});
    format!("<tool_call>\n{body}\n</tool_call>")
}

/// A history message's calls as Granite writes them: `<|tool_call|>[{...}, ...]`.
fn granite_calls(calls: &[Value]) -> String {
    let list: Vec<Value> = calls
        .iter()
        .map(|call| {
            let f = call.get("function").unwrap_or(call);
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            json!({"name": name, "arguments": f.get("arguments").cloned().unwrap_or(json!({}))})
        })
        .collect();
    format!("<|tool_call|>{}", Value::Array(list))
}

fn text_of(c: &Content) -> String {
    match c {
        Content::Text(t) => t.clone(),
        Content::Parts(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// A call id as Mistral's template demands: 9 letters and digits. Ids already so pass
/// unchanged; others map to one derived from their bytes, the same for the assistant's
/// call and the tool's answer.
pub fn mistral_call_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_owned();
    }
    // FNV-1a, then base 62.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..9)
        .map(|_| {
            let c = DIGITS[(h % 62) as usize] as char;
            h /= 62;
            c
        })
        .collect()
}

/// The messages and `tools` value to render for `tpl`. Offered tools (`offer`) go to a
/// native template as `tools`; a template without tools gets ffai's prompt in its system
/// message, and its history's tool turns as Hermes text (calls appended to the
/// assistant's content; consecutive tool results joined into one user turn of
/// `<tool_response>` blocks). Mistral's call ids are mapped to its 9-character form.
pub fn prepare_messages(
    tpl: ToolTemplate,
    messages: &[Message],
    tools: &[ToolSpec],
    offer: bool,
) -> (Vec<Message>, Option<Value>) {
    let offered = offer && !tools.is_empty();
    if tpl.native {
        let mut out = messages.to_vec();
        if tpl.format == ToolFormat::Mistral {
            for m in &mut out {
                if let Some(id) = &m.tool_call_id {
                    m.tool_call_id = Some(mistral_call_id(id));
                }
                for c in m.tool_calls.iter_mut().flatten() {
                    if let Some(id) = c.get("id").and_then(Value::as_str) {
                        c["id"] = mistral_call_id(id).into();
                    }
                }
            }
        }
        if tpl.format == ToolFormat::Granite {
            // Granite's template renders tools and tool results but drops an assistant
            // turn's `tool_calls`: they go into its content, as the model writes them.
            for m in &mut out {
                if let Some(calls) = m.tool_calls.take().filter(|c| !c.is_empty()) {
                    let mut text = text_of(&m.content);
                    text.push_str(&granite_calls(&calls));
                    m.content = Content::Text(text);
                }
            }
        }
        let tools = offered.then(|| Value::Array(tools.iter().map(ToolSpec::to_openai).collect()));
        return (out, tools);
    }
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        if m.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", text_of(&m.content));
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.tool_call_id.as_deref() == Some("") => {
                    if let Content::Text(t) = &mut prev.content {
                        t.push('\n');
                        t.push_str(&block);
                    }
                }
                _ => {
                    // Marked (an empty call id) so the next result joins this turn; the
                    // mark is dropped below.
                    out.push(Message {
                        tool_call_id: Some(String::new()),
                        ..Message::user(block)
                    });
                }
            }
            continue;
        }
        match &m.tool_calls {
            Some(calls) if !calls.is_empty() => {
                let mut text = text_of(&m.content);
                for c in calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&hermes_block(c));
                }
                out.push(Message::new(m.role.clone(), text));
            }
            _ => out.push(Message {
                tool_calls: None,
                tool_call_id: None,
                ..m.clone()
            }),
        }
    }
    for m in &mut out {
        m.tool_call_id = None;
    }
    if offered {
        let prompt = generic_prompt(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                let mut text = text_of(&first.content);
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(&prompt);
                first.content = Content::Text(text);
            }
            _ => out.insert(0, Message::system(prompt)),
        }
    }
    (out, None)
}

// ---------------------------------------------------------------------------------------
// Grammars

/// A Lark string literal.
fn lark_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `text` in a grammar: the special token of that text by id when the vocabulary has one
/// (the grammar engine never lets plain text spell a special token), else the literal.
fn marker(tok: &Tokenizer, text: &str) -> String {
    let id = (0..tok.vocab_size() as u32).find(|&id| tok.is_special(id) && tok.token_text(id) == Some(text));
    match id {
        Some(id) => format!("<[{id}]>"),
        None => lark_str(text),
    }
}

/// Closes every object schema in `s` that lists `properties` but says nothing of others
/// (no `additionalProperties`, no `patternProperties`): a forced call's arguments are the
/// declared parameters, not whatever else a model invents until it runs out of tokens.
/// Subschemas are followed where a schema may hold them; `allOf` is left alone (closing
/// its parts would make their combination refuse each other's properties). Depth is
/// bounded by [`MAX_SCHEMA_DEPTH`] at parsing.
fn close_objects(s: &mut Value) {
    let Some(o) = s.as_object_mut() else {
        return;
    };
    let is_object = match o.get("type") {
        None => true,
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
        Some(_) => false,
    };
    if is_object
        && o.get("properties").is_some_and(Value::is_object)
        && !o.contains_key("additionalProperties")
        && !o.contains_key("patternProperties")
        && !o.contains_key("unevaluatedProperties")
    {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions"] {
        if let Some(Value::Object(m)) = o.get_mut(key) {
            m.values_mut().for_each(close_objects);
        }
    }
    for key in ["items", "additionalProperties", "not", "if", "then", "else", "contains"] {
        if let Some(v) = o.get_mut(key) {
            close_objects(v);
        }
    }
    for key in ["anyOf", "oneOf", "prefixItems", "items"] {
        if let Some(Value::Array(list)) = o.get_mut(key) {
            list.iter_mut().for_each(close_objects);
        }
    }
}

/// A parameters schema as a forced call uses it: objects closed ([`close_objects`]) and
/// ffai's fixed JSON layout (see `constrain`).
fn args_schema(p: &Value) -> Value {
    let mut p = p.clone();
    close_objects(&mut p);
    if let Some(o) = p.as_object_mut() {
        o.entry("x-guidance").or_insert(json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        }));
    }
    p
}

/// The Lark grammar (llguidance's dialect) that makes the output one call (or, for
/// "required" with `parallel`, one to [`MAX_FORCED_CALLS`]) in `format` to the tools
/// `choice` allows, each call's arguments following its function's schema. `None` for
/// choices that force nothing.
///
/// With `reasoning`, the model may first write its reasoning block as it would unforced
/// (free text up to the closing tag, bounded only by the request's token limit):
/// `<think>` … `</think>` and a blank line for Qwen3-style templates (required when the
/// prompt opened the block), an analysis message for harmony. Each marker that is a
/// special token of the vocabulary is that token.
pub fn grammar(
    format: ToolFormat,
    reasoning: Reasoning,
    tools: &[ToolSpec],
    choice: &ToolChoice,
    parallel: bool,
    tok: &Tokenizer,
) -> Option<String> {
    // A named function is called once (as OpenAI and vLLM do); "required" may call
    // several when `parallel`.
    let parallel = parallel && *choice == ToolChoice::Required;
    let chosen: Vec<&ToolSpec> = match choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
    };
    if chosen.is_empty() {
        return None;
    }
    // The markers, looked up in the vocabulary once.
    let (open, close) = match format {
        ToolFormat::Hermes => (marker(tok, "<tool_call>"), marker(tok, "</tool_call>")),
        ToolFormat::Mistral => (marker(tok, "[TOOL_CALLS]"), String::new()),
        ToolFormat::Granite => (marker(tok, "<|tool_call|>"), String::new()),
        ToolFormat::Harmony => (marker(tok, "<|channel|>"), marker(tok, "<|constrain|>")),
        ToolFormat::Llama3 => (String::new(), String::new()),
    };
    let message = match format {
        ToolFormat::Harmony => marker(tok, "<|message|>"),
        _ => String::new(),
    };
    let mut g = String::new();
    let mut alts = Vec::new();
    for (i, t) in chosen.iter().enumerate() {
        // One rule per function: the family's wrapper around its arguments.
        let head = |key: &str| lark_str(&format!("{{\"name\": \"{}\", \"{key}\": ", t.name));
        let body = match format {
            ToolFormat::Hermes => format!(
                "{open} {} args_{i} {} {close}",
                lark_str(&format!("\n{{\"name\": \"{}\", \"arguments\": ", t.name)),
                lark_str("}\n"),
            ),
            ToolFormat::Llama3 => format!("{} args_{i} \"}}\"", head("parameters")),
            ToolFormat::Mistral | ToolFormat::Granite => format!("{} args_{i} \"}}\"", head("arguments")),
            ToolFormat::Harmony => format!(
                "{open} {} {close} \"json\" {message} args_{i}",
                lark_str(&format!("commentary to=functions.{} ", t.name)),
            ),
        };
        g.push_str(&format!("call_{i}: {body}\n"));
        g.push_str(&format!("args_{i}: %json {}\n", args_schema(&t.parameters)));
        alts.push(format!("call_{i}"));
    }
    g.push_str(&format!("call: {}\n", alts.join(" | ")));
    let calls = match (format, parallel) {
        (ToolFormat::Hermes, true) => format!("calls: call (\"\\n\" call){{0,{}}}\n", MAX_FORCED_CALLS - 1),
        (ToolFormat::Mistral, true) => format!(
            "calls: {open} \" [\" call (\", \" call){{0,{}}} \"]\"\n",
            MAX_FORCED_CALLS - 1
        ),
        (ToolFormat::Mistral, false) => format!("calls: {open} \" [\" call \"]\"\n"),
        (ToolFormat::Granite, true) => format!(
            "calls: {open} \"[\" call (\", \" call){{0,{}}} \"]\"\n",
            MAX_FORCED_CALLS - 1
        ),
        (ToolFormat::Granite, false) => format!("calls: {open} \"[\" call \"]\"\n"),
        _ => "calls: call\n".to_string(),
    };
    // The reasoning block: free text up to the first closing tag, as the family writes
    // it before an answer. A closing tag spelled in text ends a lazy lexeme (`suffix=`);
    // one that is a special token (which no text can spell, and which a lexeme cannot end
    // in) simply follows the text.
    let text_rule = |close: &str| {
        if close.starts_with("<[") {
            format!("reasoning_text: REASONING {close}\nREASONING: /(?s:.*)/\n")
        } else {
            format!("reasoning_text[suffix={close}]: /(?s:.*)/\n")
        }
    };
    let start = match reasoning {
        Reasoning::None => "start: calls\n".to_string(),
        Reasoning::Think => format!(
            "start: reasoning? calls\nreasoning: {} reasoning_text \"\\n\\n\"\n{}",
            marker(tok, THINK_OPEN),
            text_rule(&marker(tok, THINK_CLOSE))
        ),
        Reasoning::ThinkOpen => format!(
            "start: reasoning_text \"\\n\\n\" calls\n{}",
            text_rule(&marker(tok, THINK_CLOSE))
        ),
        Reasoning::Analysis => format!(
            "start: reasoning? calls\nreasoning: {} \"analysis\" {} reasoning_text {} \"assistant\"\n{}",
            marker(tok, "<|channel|>"),
            marker(tok, "<|message|>"),
            marker(tok, "<|start|>"),
            text_rule(&marker(tok, ANALYSIS_CLOSE))
        ),
    };
    Some(format!("{start}{calls}{g}"))
}

// ---------------------------------------------------------------------------------------
// Parsers

/// A call object as the model wrote it: its name and its arguments' exact text.
#[derive(serde::Deserialize)]
struct RawCall<'a> {
    name: Option<String>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow)]
    parameters: Option<&'a RawValue>,
}

/// One call object at the start of `s` (after whitespace), naming an offered tool: the
/// call and the rest of `s`.
fn call_prefix<'a>(s: &'a str, names: &[&str]) -> Option<(ToolCall, &'a str)> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<&RawValue>();
    let raw = it.next()?.ok()?;
    let rest = &s[it.byte_offset()..];
    let c: RawCall = serde_json::from_str(raw.get()).ok()?;
    Some((call_from(&c, names)?, rest))
}

/// A call object: `{"name": "f", <key>: {...}}` (`arguments` or `parameters`; an
/// arguments string holding a JSON object is accepted too), naming an offered tool.
fn call_from(c: &RawCall, names: &[&str]) -> Option<ToolCall> {
    let name = c.name.as_deref()?;
    named_call(name, c.arguments.or(c.parameters).map(RawValue::get), names)
}

/// A call of `name` (an offered tool) with `args`, the arguments' JSON text: an object,
/// kept as the model wrote it (so a streamed call's fragments add up to it), or a string
/// holding one (then its content, compact); none means `{}`.
fn named_call(name: &str, args: Option<&str>, names: &[&str]) -> Option<ToolCall> {
    if !names.contains(&name) {
        return None;
    }
    let arguments = match args.map(str::trim) {
        None => "{}".to_owned(),
        Some(a) if a.starts_with('{') => {
            // Valid JSON text, and an object.
            serde_json::from_str::<serde_json::Map<String, Value>>(a).ok()?;
            a.to_owned()
        }
        Some(a) => match serde_json::from_str::<Value>(a).ok()? {
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Object(_)) => v.to_string(),
                _ => return None,
            },
            _ => return None,
        },
    };
    Some(ToolCall {
        name: name.to_owned(),
        arguments,
    })
}

fn content_before(text: &str, at: usize) -> Option<String> {
    let c = text[..at].trim_end();
    (!c.trim_start().is_empty()).then(|| c.to_owned())
}

/// Hermes: text, then `<tool_call> {json} </tool_call>` blocks separated by whitespace
/// (the last closing tag may be missing at the very end).
pub fn parse_hermes(text: &str, names: &[&str]) -> Option<Parsed> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let start = text.find(OPEN)?;
    let mut rest = &text[start..];
    let mut calls = Vec::new();
    while let Some(after) = rest.strip_prefix(OPEN) {
        let (call, after) = call_prefix(after, names)?;
        calls.push(call);
        if calls.len() > MAX_CALLS {
            return None;
        }
        let after = after.trim_start();
        rest = match after.strip_prefix(CLOSE) {
            Some(r) => r.trim_start(),
            None if after.is_empty() => after,
            None => return None,
        };
    }
    if !rest.is_empty() {
        return None;
    }
    Some(Parsed {
        content: content_before(text, start),
        calls,
    })
}

/// Llama 3.x: the answer is a call object (`{"name", "parameters"}`), or several joined by
/// `;`, optionally after `<|python_tag|>` (which may follow some text).
pub fn parse_llama3(text: &str, names: &[&str]) -> Option<Parsed> {
    const TAG: &str = "<|python_tag|>";
    let (start, mut rest) = match text.find(TAG) {
        Some(at) => (at, &text[at + TAG.len()..]),
        None => {
            let at = text.len() - text.trim_start().len();
            (at, &text[at..])
        }
    };
    if !rest.trim_start().starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    loop {
        let (call, after) = call_prefix(rest, names)?;
        calls.push(call);
        if calls.len() > MAX_CALLS {
            return None;
        }
        let after = after.trim_start();
        match after.strip_prefix(';') {
            Some(r) if !r.trim().is_empty() => rest = r,
            Some(_) => break,
            None if after.is_empty() => break,
            None => return None,
        }
    }
    Some(Parsed {
        content: content_before(text, start),
        calls,
    })
}

/// Mistral: text, then `[TOOL_CALLS]` and a JSON list of call objects, or (newer
/// tokenizers) `[TOOL_CALLS]name[ARGS]{json}` repeated.
pub fn parse_mistral(text: &str, names: &[&str]) -> Option<Parsed> {
    const TAG: &str = "[TOOL_CALLS]";
    const ARGS: &str = "[ARGS]";
    let start = text.find(TAG)?;
    let rest = &text[start + TAG.len()..];
    let mut calls = Vec::new();
    if rest.trim_start().starts_with('[') {
        let list: Vec<RawCall> = serde_json::from_str(rest).ok()?;
        if list.is_empty() || list.len() > MAX_CALLS {
            return None;
        }
        for c in &list {
            calls.push(call_from(c, names)?);
        }
    } else {
        for piece in rest.split(TAG) {
            let (name, args) = piece.split_once(ARGS)?;
            if !args.trim_start().starts_with('{') {
                return None;
            }
            calls.push(named_call(name.trim(), Some(args), names)?);
            if calls.len() > MAX_CALLS {
                return None;
            }
        }
    }
    Some(Parsed {
        content: content_before(text, start),
        calls,
    })
}

/// Granite 3.x: text, then `<|tool_call|>` and a JSON list of call objects.
pub fn parse_granite(text: &str, names: &[&str]) -> Option<Parsed> {
    const TAG: &str = "<|tool_call|>";
    let start = text.find(TAG)?;
    let list: Vec<RawCall> = serde_json::from_str(&text[start + TAG.len()..]).ok()?;
    if list.is_empty() || list.len() > MAX_CALLS {
        return None;
    }
    let calls = list.iter().map(|c| call_from(c, names)).collect::<Option<Vec<_>>>()?;
    Some(Parsed {
        content: content_before(text, start),
        calls,
    })
}

/// Harmony: messages whose header names a recipient `to=functions.NAME` are calls (their
/// body, up to `<|call|>`, `<|end|>` or the end, is the JSON arguments); the text before
/// the first such message is the content.
pub fn parse_harmony(text: &str, names: &[&str]) -> Option<Parsed> {
    const MESSAGE: &str = "<|message|>";
    const RECIPIENT: &str = "to=functions.";
    let mut calls = Vec::new();
    let mut first: Option<usize> = None;
    let mut pos = 0;
    while let Some(m) = text[pos..].find(MESSAGE) {
        let body_at = pos + m + MESSAGE.len();
        // This message's header starts at its `<|start|>`, else right after the previous
        // message's end.
        let header_from = text[pos..pos + m].rfind("<|start|>").map_or(pos, |i| pos + i);
        let header = &text[header_from..pos + m];
        let body_end = ["<|call|>", "<|end|>", "<|return|>"]
            .iter()
            .filter_map(|e| text[body_at..].find(e).map(|i| (body_at + i, e.len())))
            .min();
        let (end, next) = match body_end {
            Some((e, l)) => (e, e + l),
            None => (text.len(), text.len()),
        };
        if let Some(r) = header.find(RECIPIENT) {
            let name: String = header[r + RECIPIENT.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let body = &text[body_at..end];
            if !body.trim_start().starts_with('{') {
                return None;
            }
            calls.push(named_call(&name, Some(body), names)?);
            if calls.len() > MAX_CALLS {
                return None;
            }
            first.get_or_insert(header_from);
        } else if first.is_some() {
            // Text after a call is not part of this answer's calls: not a clean call list.
            return None;
        }
        pos = next;
    }
    let start = first?;
    if !text[pos..].trim().is_empty() {
        return None;
    }
    Some(Parsed {
        content: content_before(text, start),
        calls,
    })
}

impl ToolFormat {
    /// Reads calls out of a whole output; None when it holds no complete, well-formed
    /// call list to offered tools (then the whole text is content).
    pub fn parse(self, text: &str, names: &[&str]) -> Option<Parsed> {
        match self {
            ToolFormat::Hermes => parse_hermes(text, names),
            ToolFormat::Llama3 => parse_llama3(text, names),
            ToolFormat::Mistral => parse_mistral(text, names),
            ToolFormat::Harmony => parse_harmony(text, names),
            ToolFormat::Granite => parse_granite(text, names),
        }
    }

    /// For streaming: how much of `text` (a prefix of the output) can go out as content
    /// now, and whether a call has surely begun (then nothing more goes out until the end).
    /// Text from the start of a possible call (a marker, or the start of one at the end)
    /// is held, and so is trailing whitespace, so that streamed content is always a prefix
    /// of what [`ToolFormat::parse`] returns for the whole output. `from` is what went out
    /// already (a previous answer): no call can start before it, so only the rest is
    /// searched, and a stream costs time in proportion to its length.
    pub fn safe_prefix(self, text: &str, from: usize) -> (usize, bool) {
        let markers: &[&str] = match self {
            ToolFormat::Hermes => &["<tool_call>"],
            ToolFormat::Llama3 => &["<|python_tag|>"],
            ToolFormat::Mistral => &["[TOOL_CALLS]"],
            ToolFormat::Granite => &["<|tool_call|>"],
            ToolFormat::Harmony => &["<|channel|>", "<|start|>", "to=functions."],
        };
        let from = if text.is_char_boundary(from) { from } else { 0 };
        if self == ToolFormat::Llama3 && from == 0 {
            // A call is the whole answer: hold everything while it could start one.
            let t = text.trim_start();
            if t.starts_with('{') {
                return (0, true);
            }
            if t.is_empty() {
                return (0, false);
            }
        }
        let tail = &text[from..];
        let mut hold = tail.len();
        let mut begun = false;
        for m in markers {
            if let Some(at) = tail.find(m) {
                hold = hold.min(at);
                begun = true;
            }
            // The longest end of `tail` that begins `m`.
            for k in (1..m.len().min(tail.len() + 1)).rev() {
                let at = tail.len() - k;
                if tail.is_char_boundary(at) && m.starts_with(&tail[at..]) {
                    hold = hold.min(at);
                    break;
                }
            }
        }
        (from + tail[..hold].trim_end().len(), begun)
    }
}

/// A call being written, for streaming a forced call as it is generated: its name (known
/// once its header is complete) and its arguments' text so far.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialCall<'a> {
    pub name: &'a str,
    /// The arguments' JSON text written so far; a later call's `arguments` only extends
    /// it, and the whole output's parse gives exactly this text once `complete`.
    pub arguments: &'a str,
    pub complete: bool,
}

/// How far a JSON value written from the start of `s` goes: (bytes, complete). A value
/// cut off by the end of `s` gives (s.len(), false). Only the nesting and the strings are
/// followed: the grammar that forced the call already keeps the text valid.
fn json_extent(s: &str) -> (usize, bool) {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, c) in s.bytes().enumerate() {
        if in_str {
            match c {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => {
                    in_str = false;
                    if depth == 0 {
                        return (i + 1, true);
                    }
                }
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return (i + 1, true);
                }
            }
            _ => {}
        }
    }
    (s.len(), false)
}

impl ToolFormat {
    /// The calls in `text` (the output of a call forced by [`grammar`], from where the
    /// call began) as far as they are written: each call's header as that grammar writes
    /// it, then its arguments object. Stops at the first call still being written.
    pub fn partial_calls<'a>(self, text: &'a str, names: &[&str]) -> Vec<PartialCall<'a>> {
        let mut calls = Vec::new();
        let mut pos = 0;
        while calls.len() <= MAX_CALLS {
            // The header: the name, then where the arguments begin.
            let found = match self {
                ToolFormat::Harmony => {
                    const TO: &str = "to=functions.";
                    const MESSAGE: &str = "<|message|>";
                    text[pos..].find(TO).and_then(|at| {
                        let name_at = pos + at + TO.len();
                        let name_len = text[name_at..].find(' ')?;
                        let body = name_at + name_len + text[name_at + name_len..].find(MESSAGE)? + MESSAGE.len();
                        Some((&text[name_at..name_at + name_len], body))
                    })
                }
                _ => {
                    const NAME: &str = "{\"name\": \"";
                    text[pos..].find(NAME).and_then(|at| {
                        let name_at = pos + at + NAME.len();
                        let name_len = text[name_at..].find('"')?;
                        let after = &text[name_at + name_len..];
                        let key = ["\", \"arguments\": ", "\", \"parameters\": "]
                            .into_iter()
                            .find(|k| after.starts_with(k))?;
                        Some((&text[name_at..name_at + name_len], name_at + name_len + key.len()))
                    })
                }
            };
            let Some((name, args_at)) = found else { break };
            if !names.contains(&name) || !text[args_at..].starts_with('{') {
                break;
            }
            let (len, complete) = json_extent(&text[args_at..]);
            calls.push(PartialCall {
                name,
                arguments: &text[args_at..args_at + len],
                complete,
            });
            if !complete {
                break;
            }
            pos = args_at + len;
        }
        calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["get_weather", "search"];

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn hermes() {
        // Qwen2.5 / Qwen3 as they write it.
        let p = parse_hermes(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>",
            NAMES,
        )
        .unwrap();
        assert_eq!(p.content, None);
        // The arguments as written (so streamed fragments add up to them).
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city": "Paris", "days": 3}"#)]);
        // Text first, two calls, the last closing tag cut off by the end of generation.
        let p = parse_hermes(
            "Let me check.\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": \"{\\\"q\\\": \\\"x\\\"}\"}",
            NAMES,
        )
        .unwrap();
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        assert_eq!(p.calls, vec![call("get_weather", "{}"), call("search", r#"{"q":"x"}"#)]);
        // Not calls: no marker, broken JSON, an unknown function, text after, no name.
        for t in [
            "The weather is fine.",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
            "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call> and more",
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": [1]}\n</tool_call>",
        ] {
            assert_eq!(parse_hermes(t, NAMES), None, "{t}");
        }
    }

    #[test]
    fn llama3() {
        let p = parse_llama3(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            NAMES,
        )
        .unwrap();
        assert_eq!(
            (p.content, p.calls),
            (None, vec![call("get_weather", r#"{"city": "Paris"}"#)])
        );
        let p = parse_llama3(
            "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"a\"}}; {\"name\": \"get_weather\", \"parameters\": {}}",
            NAMES,
        )
        .unwrap();
        assert_eq!(
            p.calls,
            vec![call("search", r#"{"q": "a"}"#), call("get_weather", "{}")]
        );
        let p = parse_llama3("Sure.<|python_tag|>{\"name\": \"search\", \"arguments\": {}}", NAMES).unwrap();
        assert_eq!(p.content.as_deref(), Some("Sure."));
        for t in [
            "It is {\"name\": \"search\"} maybe",
            "{\"name\": \"search\", \"parameters\": {}} and then",
            "{\"name\": \"nope\", \"parameters\": {}}",
            "{\"answer\": 42}",
        ] {
            assert_eq!(parse_llama3(t, NAMES), None, "{t}");
        }
    }

    #[test]
    fn mistral() {
        let p = parse_mistral(
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"search\", \"arguments\": {}}]",
            NAMES,
        )
        .unwrap();
        assert_eq!(
            p.calls,
            vec![call("get_weather", r#"{"city": "Paris"}"#), call("search", "{}")]
        );
        let p = parse_mistral(
            "[TOOL_CALLS]search[ARGS]{\"q\": \"b\"}[TOOL_CALLS]get_weather[ARGS]{}",
            NAMES,
        )
        .unwrap();
        assert_eq!(
            p.calls,
            vec![call("search", r#"{"q": "b"}"#), call("get_weather", "{}")]
        );
        for t in [
            "[TOOL_CALLS] []",
            "[TOOL_CALLS] [{\"name\": \"search\", \"arguments\": {}}] trailing",
            "[TOOL_CALLS]search{\"q\": 1}",
            "no calls",
        ] {
            assert_eq!(parse_mistral(t, NAMES), None, "{t}");
        }
    }

    #[test]
    fn granite() {
        let p = parse_granite(
            "Let me look.\n<|tool_call|>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"search\", \"arguments\": {}}]",
            NAMES,
        )
        .unwrap();
        assert_eq!(p.content.as_deref(), Some("Let me look."));
        assert_eq!(
            p.calls,
            vec![call("get_weather", r#"{"city": "Paris"}"#), call("search", "{}")]
        );
        for t in [
            "<|tool_call|>[]",
            "<|tool_call|>[{\"name\": \"search\", \"arguments\": {}}] trailing",
            "<|tool_call|>[{\"name\": \"unknown\", \"arguments\": {}}]",
            "<|tool_call|>{\"name\": \"search\", \"arguments\": {}}",
            "<tool_call>[{\"name\": \"search\", \"arguments\": {}}]",
            "no calls",
        ] {
            assert_eq!(parse_granite(t, NAMES), None, "{t}");
        }
    }

    #[test]
    fn harmony() {
        let out = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>";
        let p = parse_harmony(out, NAMES).unwrap();
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
        assert_eq!(
            p.content.as_deref(),
            Some("<|channel|>analysis<|message|>Need weather.<|end|>")
        );
        // Recipient before the channel (as the template renders history), no <|call|>.
        let p = parse_harmony(
            "<|channel|>commentary to=functions.search <|constrain|>json<|message|>{\"q\": \"x\"}",
            NAMES,
        )
        .unwrap();
        assert_eq!((p.content, p.calls), (None, vec![call("search", r#"{"q": "x"}"#)]));
        let p = parse_harmony(
            " to=functions.search<|channel|>commentary json<|message|>{}<|call|>",
            NAMES,
        )
        .unwrap();
        assert_eq!(p.calls, vec![call("search", "{}")]);
        for t in [
            "<|channel|>final<|message|>It is sunny.<|return|>",
            "<|channel|>commentary to=functions.search <|constrain|>json<|message|>{\"q\": <|call|>",
            "<|channel|>commentary to=functions.evil json<|message|>{}<|call|>",
        ] {
            assert_eq!(parse_harmony(t, NAMES), None, "{t}");
        }
    }

    #[test]
    fn forced_calls_stream_as_prefixes_of_the_parse() {
        // Outputs as the forced-call grammars write them; at every byte the partial calls'
        // names are final and their arguments are prefixes of the whole parse's.
        let outs = [
            (ToolFormat::Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}ris\\\"{\", \"days\": [3, {\"a\": 1}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>"),
            (ToolFormat::Llama3, "{\"name\": \"search\", \"parameters\": {\"q\": \"x y\"}}"),
            (ToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": \"search\", \"arguments\": {\"q\": \"]\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]"),
            (ToolFormat::Harmony, "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Lima\"}"),
            (ToolFormat::Granite, "<|tool_call|>[{\"name\": \"search\", \"arguments\": {\"q\": \"]}\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]"),
        ];
        for (f, out) in outs {
            let whole = f.parse(out, NAMES).unwrap_or_else(|| panic!("{out}")).calls;
            let mut seen = 0;
            for end in (0..=out.len()).filter(|&e| out.is_char_boundary(e)) {
                let part = f.partial_calls(&out[..end], NAMES);
                assert!(part.len() <= whole.len() && part.len() >= seen, "{f:?} at {end}");
                seen = part.len();
                for (i, p) in part.iter().enumerate() {
                    assert_eq!(p.name, whole[i].name, "{f:?} at {end}");
                    assert!(whole[i].arguments.starts_with(p.arguments), "{f:?} at {end}: {p:?}");
                    assert_eq!(p.complete, p.arguments == whole[i].arguments, "{f:?} at {end}: {p:?}");
                }
            }
            let last = f.partial_calls(out, NAMES);
            assert_eq!(last.len(), whole.len(), "{f:?}");
            assert!(last.iter().all(|p| p.complete), "{f:?}");
        }
        // Unknown names and calls not yet named give nothing.
        assert!(ToolFormat::Hermes
            .partial_calls("<tool_call>\n{\"name\": \"rm\", \"arguments\": {", NAMES)
            .is_empty());
        assert!(ToolFormat::Hermes
            .partial_calls("<tool_call>\n{\"name\": \"sea", NAMES)
            .is_empty());
    }

    #[test]
    fn forced_calls_after_reasoning_stream_as_prefixes_of_the_parse() {
        // A forced call's grammar may let the model reason first; the block (whatever it
        // says, call syntax included) is neither content nor calls, and a stream sends
        // nothing until it ends, then the calls as without it.
        let outs = [
            (
                Reasoning::Think,
                ToolFormat::Hermes,
                "<think>\nThe user wants <tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>? No.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"</think>\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>",
                "\nThe user wants <tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>? No.\n",
            ),
            (
                Reasoning::ThinkOpen,
                ToolFormat::Hermes,
                "Paris, so {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                "Paris, so {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}.\n",
            ),
            (
                Reasoning::Analysis,
                ToolFormat::Harmony,
                "<|channel|>analysis<|message|>Call to=functions.search maybe.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Lima\"}",
                "Call to=functions.search maybe.",
            ),
        ];
        for (r, f, out, thought) in outs {
            let (reasoning, answer) = r.split(out);
            assert_eq!(reasoning, Some(thought), "{r:?}");
            let whole = f.parse(answer, NAMES).unwrap_or_else(|| panic!("{out}"));
            assert_eq!(whole.content, None, "{r:?}");
            let whole = whole.calls;
            let ends = out.len() - answer.len();
            let mut seen = 0;
            for end in (0..=out.len()).filter(|&e| out.is_char_boundary(e)) {
                let Some(n) = r.extent(&out[..end]) else {
                    // Inside the block (or possibly at its start): nothing goes out.
                    assert!(end < ends, "{r:?} at {end}");
                    continue;
                };
                assert_eq!(n, ends, "{r:?} at {end}");
                let rest = &out[n..end];
                // No content: what precedes the calls is whitespace at most.
                assert_eq!(f.safe_prefix(rest, 0).0, 0, "{r:?} at {end}");
                let part = f.partial_calls(rest, NAMES);
                assert!(part.len() <= whole.len() && part.len() >= seen, "{r:?} at {end}");
                seen = part.len();
                for (i, p) in part.iter().enumerate() {
                    assert_eq!(p.name, whole[i].name, "{r:?} at {end}");
                    assert!(whole[i].arguments.starts_with(p.arguments), "{r:?} at {end}: {p:?}");
                    assert_eq!(p.complete, p.arguments == whole[i].arguments, "{r:?} at {end}");
                }
            }
            assert_eq!(seen, whole.len(), "{r:?}");
        }
        // No block: everything is the answer, as before.
        let plain = "<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>";
        for r in [Reasoning::None, Reasoning::Think, Reasoning::Analysis] {
            assert_eq!(r.split(plain), (None, plain), "{r:?}");
            assert_eq!(r.extent(plain), Some(0), "{r:?}");
        }
        // A prefix that may still open a block is held; a block cut off by the token
        // limit is all reasoning.
        assert_eq!(Reasoning::Think.extent("<th"), None);
        assert_eq!(Reasoning::Think.extent("<to"), Some(0));
        assert_eq!(Reasoning::Analysis.extent("<|channel|>"), None);
        assert_eq!(Reasoning::Analysis.extent("<|channel|>comm"), Some(0));
        assert_eq!(Reasoning::Think.split("<think>\nstill"), (Some("\nstill"), ""));
        assert_eq!(Reasoning::ThinkOpen.split("still"), (Some("still"), ""));
        assert_eq!(Reasoning::None.split("<think>x</think>"), (None, "<think>x</think>"));
    }

    #[test]
    fn detect_formats_from_real_templates() {
        let fixture = |f: &str| {
            std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/chat")
                    .join(f),
            )
            .unwrap()
        };
        let t = |format, native| ToolTemplate {
            format,
            native,
            reasoning: match format {
                ToolFormat::Harmony => Reasoning::Analysis,
                _ => Reasoning::None,
            },
        };
        assert_eq!(
            ToolTemplate::detect(&fixture("qwen2.5.jinja")),
            t(ToolFormat::Hermes, true)
        );
        // Qwen3 thinks first (unless its prompt switched thinking off).
        let qwen3 = ToolTemplate::detect(&fixture("qwen3.jinja"));
        assert_eq!(
            qwen3,
            ToolTemplate {
                reasoning: Reasoning::Think,
                ..t(ToolFormat::Hermes, true)
            }
        );
        let after = |p: &str| qwen3.for_prompt(p).reasoning;
        assert_eq!(after("<|im_start|>assistant\n"), Reasoning::Think);
        assert_eq!(after("<|im_start|>assistant\n<think>\n\n</think>\n\n"), Reasoning::None);
        assert_eq!(after("<|im_start|>assistant\n<think>\n"), Reasoning::ThinkOpen);
        assert_eq!(
            ToolTemplate::detect(&fixture("qwen2.5.jinja")).for_prompt("<think>\n"),
            t(ToolFormat::Hermes, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("llama3.jinja")),
            t(ToolFormat::Llama3, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("mistral_v0.3.jinja")),
            t(ToolFormat::Mistral, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("gpt_oss.jinja")),
            t(ToolFormat::Harmony, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("granite3.3.jinja")),
            t(ToolFormat::Granite, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("granite4.0.jinja")),
            t(ToolFormat::Hermes, true)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("smollm2.jinja")),
            t(ToolFormat::Hermes, false)
        );
        assert_eq!(
            ToolTemplate::detect(&fixture("gemma3.jinja")),
            t(ToolFormat::Hermes, false)
        );
    }

    #[test]
    fn safe_prefix_holds_possible_calls() {
        let h = ToolFormat::Hermes;
        assert_eq!(h.safe_prefix("Hello there", 0), (11, false));
        assert_eq!(h.safe_prefix("Hello <tool", 0), (5, false));
        assert_eq!(h.safe_prefix("Hello\n\n<tool_call>\n{\"na", 0), (5, true));
        assert_eq!(h.safe_prefix("Hello\n\n<tool_call>\n{\"na", 5), (5, true));
        assert_eq!(h.safe_prefix("a <b> c", 0), (7, false));
        assert_eq!(h.safe_prefix("é<", 0), ("é".len(), false));
        let l = ToolFormat::Llama3;
        assert_eq!(l.safe_prefix("  {\"name\"", 0), (0, true));
        assert_eq!(l.safe_prefix("  ", 0), (0, false));
        assert_eq!(l.safe_prefix("Sure, <|py", 0), (5, false));
        // A brace after content is not a call.
        assert_eq!(l.safe_prefix("Sure {", 4), (6, false));
        // Streamed piece by piece (each step searching from what went out), the content is
        // a prefix of what the whole parse keeps, and the call is seen to begin.
        let out = "Checking... <b> \n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>";
        let whole = parse_hermes(out, NAMES).unwrap().content.unwrap();
        let mut sent = 0;
        let mut begun = false;
        for end in (0..=out.len()).filter(|&e| out.is_char_boundary(e)) {
            let (safe, b) = h.safe_prefix(&out[..end], sent);
            assert!(safe >= sent && whole.starts_with(&out[..safe]), "{end}");
            assert_eq!(safe, h.safe_prefix(&out[..end], 0).0, "{end}");
            sent = safe;
            begun = b;
        }
        assert!(begun);
        assert_eq!(&out[..sent], whole);
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let ok = json!([{"type": "function", "function": {"name": "get_weather", "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "search"}}]);
        let tools = parse_tools(&ok).unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[1].parameters, json!({"type": "object", "properties": {}}));
        let deep = (0..40).fold(json!({}), |v, _| json!({"properties": {"x": v}}));
        for bad in [
            json!({}),
            json!([1]),
            json!([{"type": "retrieval"}]),
            json!([{"type": "function"}]),
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!([{"type": "function", "function": {"name": ""}}]),
            json!([{"type": "function", "function": {"name": "x".repeat(65)}}]),
            json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
            json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
            json!([{"type": "function", "function": {"name": "f", "description": 3}}]),
            json!([{"type": "function", "function": {"name": "f", "parameters": deep}}]),
            Value::Array(vec![
                json!({"type": "function", "function": {"name": "f"}});
                MAX_TOOLS + 1
            ]),
        ] {
            assert!(parse_tools(&bad).is_err(), "{bad}");
        }
        let c = |v: Value| parse_tool_choice(Some(&v), &tools);
        assert_eq!(parse_tool_choice(None, &tools).unwrap(), ToolChoice::Auto);
        assert_eq!(parse_tool_choice(None, &[]).unwrap(), ToolChoice::None);
        assert_eq!(c(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(c(json!("none")).unwrap(), ToolChoice::None);
        assert_eq!(
            c(json!({"type": "function", "function": {"name": "search"}})).unwrap(),
            ToolChoice::Named("search".into())
        );
        assert!(c(json!({"type": "function", "function": {"name": "nope"}})).is_err());
        assert!(c(json!("sometimes")).is_err());
        assert!(c(json!(1)).is_err());
        assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn forced_arguments_close_open_objects() {
        let s = args_schema(&json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "string"}}},
            "b": {"type": "array", "items": {"properties": {"y": {}}}},
            "c": {"anyOf": [{"type": "object", "properties": {}}, {"type": "string"}]},
            "d": {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}},
            "properties": {"type": "string"}},
          "$defs": {"e": {"type": "object", "properties": {"z": {}}}},
          "allOf": [{"properties": {"q": {}}}]}));
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["b"]["items"]["additionalProperties"], false);
        assert_eq!(s["properties"]["c"]["anyOf"][0]["additionalProperties"], false);
        assert_eq!(s["properties"]["d"]["additionalProperties"], json!({"type": "integer"}));
        assert_eq!(s["properties"]["properties"], json!({"type": "string"}));
        assert_eq!(s["$defs"]["e"]["additionalProperties"], false);
        assert_eq!(s["allOf"][0].get("additionalProperties"), None);
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
    }

    #[test]
    fn generic_templates_get_tool_turns_as_text() {
        let tools = parse_tools(&json!([{"type": "function", "function": {"name": "search"}}])).unwrap();
        let call = json!({"id": "call_1", "type": "function", "function": {"name": "search", "arguments": {"q": "x"}}});
        let msgs = vec![
            Message::user("find x"),
            Message {
                tool_calls: Some(vec![call]),
                ..Message::assistant("")
            },
            Message {
                tool_call_id: Some("call_1".into()),
                ..Message::new("tool", "found")
            },
            Message {
                tool_call_id: Some("call_1".into()),
                ..Message::new("tool", "again")
            },
        ];
        let tpl = ToolTemplate {
            format: ToolFormat::Hermes,
            native: false,
            reasoning: Reasoning::None,
        };
        let (out, t) = prepare_messages(tpl, &msgs, &tools, true);
        assert_eq!(t, None);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].role, "system");
        assert!(text_of(&out[0].content).contains("{\"type\":\"function\",\"function\":{\"name\":\"search\""));
        assert_eq!(
            out[2].content,
            Content::Text("<tool_call>\n{\"name\":\"search\",\"arguments\":{\"q\":\"x\"}}\n</tool_call>".into())
        );
        assert_eq!(
            (out[3].role.as_str(), text_of(&out[3].content)),
            (
                "user",
                "<tool_response>\nfound\n</tool_response>\n<tool_response>\nagain\n</tool_response>".into()
            )
        );
        assert!(out.iter().all(|m| m.tool_calls.is_none() && m.tool_call_id.is_none()));
        // Mistral: ids become 9 letters and digits, the same on both sides.
        let tpl = ToolTemplate {
            format: ToolFormat::Mistral,
            native: true,
            reasoning: Reasoning::None,
        };
        let (out, t) = prepare_messages(tpl, &msgs, &tools, true);
        let id = out[1].tool_calls.as_ref().unwrap()[0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 9);
        assert_eq!(out[2].tool_call_id.as_deref(), Some(id.as_str()));
        assert_eq!(t.unwrap()[0]["function"]["name"], "search");
        assert_eq!(mistral_call_id("abcDEF123"), "abcDEF123");
    }
}
