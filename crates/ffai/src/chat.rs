//! Chat templates: renders a conversation into the prompt text a model was trained on,
//! the way Hugging Face transformers' `apply_chat_template(..., tokenize=False)` does.
//!
//! Templates are Jinja, run with minijinja set up like transformers' environment:
//! `trim_blocks` and `lstrip_blocks` on, a single trailing newline dropped, loop controls
//! (`break`/`continue`), Python string/dict/list methods (`strip`, `split`, `startswith`,
//! `items`, ...) through minijinja-contrib's pycompat, and transformers' globals:
//! `raise_exception(msg)` (an `Err` carrying the message), `strftime_now(fmt)` (UTC), and
//! the `tojson` filter as `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`. The context holds `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, `tools` (none unless given), `documents` (none), and `enable_thinking`
//! only when set, as transformers passes it only when the caller does, then any extra
//! variables the caller gives (a request's `chat_template_kwargs`, checked by
//! [`template_kwargs`]).
//!
//! Templates and messages are untrusted: a template is compiled through minijinja's
//! machinery (`compile`), which checks its syntax tree and constant folding and rewrites
//! its operators and template text into checked calls (`ops`), and rendering runs under
//! the limits of [`limits`] (steps, recursion, output size, per-call checks on every
//! builtin and operator that could allocate or walk without bound, and a work budget);
//! any failure, a caught panic included, is a one-line `Err`. `include`, `import` and
//! `extends` are not supported.
//!
//! Known difference: object keys inside `tools` reach the template in the order of the
//! `serde_json::Value` given; without serde_json's `preserve_order` feature that order is
//! sorted, whereas Python keeps insertion order, so a template dumping tool schemas
//! (`tool | tojson`) matches transformers only for schemas whose keys are already sorted.

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod compile;
pub mod limits;
mod ops;

const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation. The tool fields reach the template only when set (so
/// `'tool_calls' in message` and `message.tool_calls is defined` work as with
/// transformers, which passes the caller's dicts as they are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
    /// An assistant turn's calls, in the OpenAI shape
    /// `{"id", "type": "function", "function": {"name", "arguments"}}` with `arguments` an
    /// object (templates dump it with `tojson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's function name (some templates print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: Content::Text(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

/// A message's content: plain text, or a list of parts such as
/// `{"type": "text", "text": ".."}` (passed to the template as given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

/// Where a chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A `chat_template.jinja` file.
    ChatTemplateJinja(PathBuf),
    /// The `chat_template` entry of a `tokenizer_config.json`.
    TokenizerConfig(PathBuf),
    /// GGUF metadata `tokenizer.chat_template`.
    Gguf,
    /// ffai's built-in turn format for a family whose checkpoint has no template.
    FamilyFallback(&'static str),
}

impl fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateSource::ChatTemplateJinja(p) => write!(f, "{}", p.display()),
            TemplateSource::TokenizerConfig(p) => write!(f, "{} (chat_template)", p.display()),
            TemplateSource::Gguf => f.write_str("GGUF tokenizer.chat_template"),
            TemplateSource::FamilyFallback(name) => write!(f, "built-in {name} chat template"),
        }
    }
}

/// What a render needs besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Open an assistant turn at the end (for generation).
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
    /// Tool schemas (a JSON list), or none.
    pub tools: Option<serde_json::Value>,
    /// Passed to the template only when set (Qwen3's thinking switch).
    pub enable_thinking: Option<bool>,
    /// More variables for the template (vLLM's `chat_template_kwargs`, gpt-oss's
    /// `reasoning_effort`), set after the ones above: one named `enable_thinking` replaces
    /// that switch. Names of the template's own variables are refused by
    /// [`template_kwargs`].
    pub extra: Vec<(String, serde_json::Value)>,
}

/// Variables a render sets itself; extra variables may not take their names.
pub const RESERVED_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "documents",
];

/// Extra template variables from a JSON object (a request's `chat_template_kwargs`): an
/// `Err` with a one-line message when it is not an object or names one of the
/// template's own variables ([`RESERVED_VARIABLES`]).
pub fn template_kwargs(v: &serde_json::Value) -> Result<Vec<(String, serde_json::Value)>> {
    let serde_json::Value::Object(o) = v else {
        return Err(Error::new(format!(
            "chat_template_kwargs must be an object, not {}",
            match v {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Array(_) => "a list",
                serde_json::Value::Object(_) => "an object",
            }
        )));
    };
    if let Some(k) = o.keys().find(|k| RESERVED_VARIABLES.contains(&k.as_str())) {
        return Err(Error::new(format!(
            "chat_template_kwargs may not set \"{k}\": the render sets it itself"
        )));
    }
    Ok(o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A chat request's extra template variables: its `chat_template_kwargs` (checked by
/// [`template_kwargs`]) and its `reasoning_effort` (a string, passed as the variable of
/// that name that gpt-oss templates read; one in `chat_template_kwargs` wins). Either
/// may be absent or null.
pub fn request_variables(
    kwargs: Option<&serde_json::Value>,
    reasoning_effort: Option<&serde_json::Value>,
) -> Result<Vec<(String, serde_json::Value)>> {
    let mut vars = match kwargs.filter(|v| !v.is_null()) {
        Some(v) => template_kwargs(v)?,
        None => Vec::new(),
    };
    let effort = match reasoning_effort.filter(|v| !v.is_null()) {
        None => None,
        Some(serde_json::Value::String(e)) => Some(e),
        Some(_) => {
            return Err(Error::new(
                "reasoning_effort must be a string (\"low\", \"medium\", \"high\")",
            ))
        }
    };
    if let Some(e) = effort.filter(|_| !vars.iter().any(|(k, _)| k == "reasoning_effort")) {
        vars.push(("reasoning_effort".into(), e.as_str().into()));
    }
    Ok(vars)
}

/// A chat template, checked and ready to render.
///
/// minijinja's compiled form borrows the source, so the source is kept and compiled again
/// on each render's thread (a fraction of a millisecond for real templates); [`new`]
/// compiles it once to report errors early.
///
/// [`new`]: ChatTemplate::new
pub struct ChatTemplate {
    /// Filters, functions, limits and the operator functions; no templates.
    env: Environment<'static>,
    source: String,
    origin: TemplateSource,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish()
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error names where the template came from.
    pub fn new(source: &str, origin: TemplateSource) -> Result<ChatTemplate> {
        if source.len() > limits::MAX_TEMPLATE_BYTES {
            return Err(Error::new(format!(
                "chat template from {origin}: {} bytes exceed the limit of {} bytes",
                source.len(),
                limits::MAX_TEMPLATE_BYTES
            )));
        }
        let mut env = Environment::new();
        limits::install(&mut env);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Compiled on a thread with a deep stack (the syntax tree is built, and dropped,
        // recursively), panics caught.
        let checked = limits::run(limits::OUTPUT_BASE_BYTES, || {
            compile::compile(TEMPLATE_NAME, source).map(drop)
        });
        match checked {
            limits::Outcome::Done(()) => {}
            limits::Outcome::Failed { error, .. } => return Err(template_error(&origin, &error)),
            limits::Outcome::Panicked(msg) => {
                return Err(Error::new(format!(
                    "chat template from {origin}: compiling panicked: {msg}"
                )))
            }
            limits::Outcome::NoThread(msg) => {
                return Err(Error::new(format!(
                    "chat template from {origin}: cannot start the compile thread: {msg}"
                )))
            }
        }
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            origin,
        })
    }

    /// The template of a Hugging Face directory: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` from which "default" is taken), else none.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::new(format!("{}: {e}", jinja.display())))?;
            return ChatTemplate::new(&text, TemplateSource::ChatTemplateJinja(jinja)).map(Some);
        }
        let cfg_path = dir.join("tokenizer_config.json");
        if !cfg_path.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| Error::new(format!("{}: {e}", cfg_path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(format!("{}: invalid JSON: {e}", cfg_path.display())))?;
        let source = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => pick_named_template(list, &cfg_path)?,
            Some(other) => {
                return Err(Error::new(format!(
                    "{}: chat_template is neither a string nor a list of named templates: {other}",
                    cfg_path.display()
                )))
            }
        };
        ChatTemplate::new(&source, TemplateSource::TokenizerConfig(cfg_path)).map(Some)
    }

    /// A family's known turn format, for checkpoints without a template: "gemma"
    /// (also "gemma2", "gemma3") and "chatml".
    pub fn fallback(family: &str) -> Option<ChatTemplate> {
        let (name, source) = match family.to_ascii_lowercase().as_str() {
            "gemma" | "gemma2" | "gemma3" => ("gemma", GEMMA_FALLBACK),
            "chatml" => ("chatml", CHATML_FALLBACK),
            _ => return None,
        };
        // The built-in sources are fixed and known to compile.
        ChatTemplate::new(source, TemplateSource::FamilyFallback(name)).ok()
    }

    pub fn origin(&self) -> &TemplateSource {
        &self.origin
    }

    /// The template's source text (tool-call formats are recognised from it).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation; `raise_exception` in the template, or any runtime error,
    /// comes back as an `Err` naming the template's origin. The render runs on a thread of
    /// its own under the limits of [`limits`]; the output may be at most
    /// [`limits::OUTPUT_BASE_BYTES`] plus [`limits::OUTPUT_BYTES_PER_INPUT_BYTE`] per byte of
    /// input (the messages and tools as JSON, and the special tokens).
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let cap = limits::output_cap(input_bytes(messages, opts));
        let outcome = limits::run(cap, || {
            let compiled = compile::compile(TEMPLATE_NAME, &self.source)?;
            compile::render(&self.env, &compiled, render_context(messages, opts))
        });
        match outcome {
            limits::Outcome::Done(text) => Ok(text),
            limits::Outcome::Failed {
                output_exceeded: true,
                error,
            } => Err(Error::new(format!(
                "chat template from {}: output exceeds the limit of {cap} bytes{}",
                self.origin,
                line_of(&error)
            ))),
            limits::Outcome::Failed { error, .. } => Err(template_error(&self.origin, &error)),
            limits::Outcome::Panicked(msg) => Err(Error::new(format!(
                "chat template from {}: rendering panicked: {msg}",
                self.origin
            ))),
            limits::Outcome::NoThread(msg) => Err(Error::new(format!(
                "chat template from {}: cannot start the render thread: {msg}",
                self.origin
            ))),
        }
    }
}

/// Bytes of input a render gets: the messages and tools as JSON, and the special tokens.
fn input_bytes(messages: &[Message], opts: &RenderOptions) -> usize {
    /// Counts bytes written, keeping none.
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
    let mut n = Count(opts.bos_token.len() + opts.eos_token.len());
    // Serializing plain data into a counter cannot fail.
    let _ = serde_json::to_writer(&mut n, messages);
    if let Some(tools) = &opts.tools {
        let _ = serde_json::to_writer(&mut n, tools);
    }
    for (k, v) in &opts.extra {
        n.0 += k.len();
        let _ = serde_json::to_writer(&mut n, v);
    }
    n.0
}

/// The variables a template sees.
fn render_context(messages: &[Message], opts: &RenderOptions) -> Value {
    let mut ctx: Vec<(&str, Value)> = vec![
        ("messages", Value::from_serialize(messages)),
        ("add_generation_prompt", Value::from(opts.add_generation_prompt)),
        ("bos_token", Value::from(opts.bos_token.as_str())),
        ("eos_token", Value::from(opts.eos_token.as_str())),
        (
            "tools",
            opts.tools.as_ref().map_or(Value::from(()), Value::from_serialize),
        ),
        ("documents", Value::from(())),
    ];
    if let Some(t) = opts.enable_thinking {
        ctx.push(("enable_thinking", Value::from(t)));
    }
    for (k, v) in &opts.extra {
        // A name given twice (or `enable_thinking` here and above): the last one counts.
        ctx.retain(|(name, _)| name != k);
        ctx.push((k.as_str(), Value::from_serialize(v)));
    }
    ctx.into_iter().collect()
}

/// " (in chat_template:LINE)" for an error that knows its line, else "".
fn line_of(e: &minijinja::Error) -> String {
    match (e.name(), e.line()) {
        (Some(name), Some(line)) => format!(" (in {name}:{line})"),
        _ => String::new(),
    }
}

fn pick_named_template(list: &[serde_json::Value], cfg_path: &Path) -> Result<String> {
    let mut names = Vec::new();
    for entry in list {
        let name = entry.get("name").and_then(|n| n.as_str());
        let template = entry.get("template").and_then(|t| t.as_str());
        match (name, template) {
            (Some("default"), Some(t)) => return Ok(t.to_owned()),
            (Some(n), Some(_)) => names.push(n.to_owned()),
            _ => {
                return Err(Error::new(format!(
                    "{}: chat_template list entries need a \"name\" and a \"template\" string",
                    cfg_path.display()
                )))
            }
        }
    }
    Err(Error::new(format!(
        "{}: chat_template has no template named \"default\" (found: {})",
        cfg_path.display(),
        names.join(", ")
    )))
}

fn template_error(origin: &TemplateSource, e: &minijinja::Error) -> Error {
    if let Some(what) = limits::describe_limit(e) {
        return Error::new(format!("chat template from {origin}: {what}{}", line_of(e)));
    }
    let mut msg = format!("chat template from {origin}: {e}");
    // Nested causes (e.g. an error raised inside a macro or filter) carry the useful detail.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::new(msg)
}

const GEMMA_FALLBACK: &str = "{{ bos_token }}\
{%- if messages and messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\
{%- if message['content'] is string -%}{{ message['content'] | trim }}\
{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}\
{%- endif -%}\
{{ '<end_of_turn>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}";

const CHATML_FALLBACK: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\\n' }}\
{%- if message['content'] is string -%}{{ message['content'] }}\
{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}\
{%- endif -%}\
{{ '<|im_end|>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

// ---- transformers' helpers ----

fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    // The message is printed whatever it is, so its size is checked like any output.
    let msg = limits::bounded_text(&msg, "raise_exception message")?;
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: Value) -> std::result::Result<String, minijinja::Error> {
    let fmt = limits::bounded_text(&fmt, "strftime_now format")?;
    // A two-byte `%X` becomes at most nine bytes ("September").
    limits::check_len("strftime_now", fmt.len().saturating_mul(5))?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime_utc(&fmt, secs))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C/Python `strftime` for a UTC Unix time (the C-locale subset templates use: `%d %b %Y`,
/// `%B`, `%m`, `%H:%M:%S`, `%a`/`%A`, `%y`, `%j`, `%I %p`, `%e`, glibc's `%-d`, `%%`).
pub fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match spec {
            Some('d') => out.push_str(&num(day as i64, 2)),
            Some('e') => out.push_str(&if no_pad { day.to_string() } else { format!("{day:>2}") }),
            Some('m') => out.push_str(&num(month as i64, 2)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('b') | Some('h') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num((hour + 11) % 12 + 1, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers overrides it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`; `ensure_ascii` and `indent` may also be
/// passed by position.
fn tojson_filter(
    value: Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let pick = |pos: Option<Value>, name: &str| -> std::result::Result<Option<Value>, minijinja::Error> {
        match kwargs.get::<Option<Value>>(name)? {
            Some(v) => Ok(Some(v)),
            None => Ok(pos),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => {
                // The indent is repeated per level on every line: checked before use.
                limits::check_indent(s.chars().count() as i128)?;
                Some(s.to_owned())
            }
            None => {
                let n = i128::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or a string",
                    )
                })?;
                limits::check_indent(n)?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match pick(None, "separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let pair_error = || {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                )
            };
            // At most three items are taken, so a huge list costs nothing.
            let parts: Vec<Value> = v.try_iter()?.take(3).collect();
            match parts.as_slice() {
                [a, b] => (
                    a.as_str().ok_or_else(pair_error)?.to_owned(),
                    b.as_str().ok_or_else(pair_error)?.to_owned(),
                ),
                _ => return Err(pair_error()),
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
    };
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let dumper = JsonDumper {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
        budget: limits::json_budget(),
    };
    let mut out = String::new();
    dumper.dump(&value, 0, &mut out)?;
    dumper.check(&out)?;
    limits::json_made(out.len())?;
    Ok(Value::from(out))
}

/// Writes JSON as Python's `json.dumps` does, refusing to write more than `budget` bytes
/// or to descend more than [`limits::MAX_VALUE_DEPTH`] levels (the value may be shared
/// or lazy, and so far bigger than the memory it takes).
struct JsonDumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    budget: usize,
}

impl JsonDumper {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    /// Fails once `out` holds more than the budget (checked before each value, so `out`
    /// overshoots by at most one scalar or separator).
    fn check(&self, out: &str) -> std::result::Result<(), minijinja::Error> {
        if out.len() > self.budget {
            return Err(limits::json_too_big());
        }
        Ok(())
    }

    fn dump(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        self.check(out)?;
        if level > limits::MAX_VALUE_DEPTH {
            return Err(limits::json_too_deep());
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float_repr(f));
                }
            }
            ValueKind::String => {
                let s = v.as_str().unwrap_or_default();
                if s.len() > self.budget - out.len() {
                    return Err(limits::json_too_big());
                }
                self.string(s, out)
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match key.kind() {
                        ValueKind::String => self.string(key.as_str().unwrap_or_default(), out),
                        // json.dumps turns scalar keys into strings.
                        ValueKind::None => out.push_str("\"null\""),
                        ValueKind::Bool => out.push_str(if key.is_true() { "\"true\"" } else { "\"false\"" }),
                        _ => {
                            let mut k = String::new();
                            self.dump(key, level + 1, &mut k)?;
                            self.string(&k, out);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.dump(&v.get_item(key)?, level + 1, out)?;
                    self.check(out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                // Walked lazily: each item writes at least one byte, so the budget ends
                // even an endless list.
                let mut items = v.try_iter()?.peekable();
                if items.peek().is_none() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.dump(&item, level + 1, out)?;
                    self.check(out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of kind {} is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, positional
/// for exponents -4..16, otherwise `d.ddde+XX`; NaN and infinities as Python spells them.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{f:e}"); // e.g. "-1.5e-7", shortest round-trip digits
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use minijinja::UndefinedBehavior;

    /// `source` rendered by minijinja's own `Template::render` in `env`: what the
    /// compiled, rewritten path must reproduce.
    fn plain(env: &Environment<'static>, source: &str, ctx: Value) -> std::result::Result<String, minijinja::Error> {
        let mut env = env.clone();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        env.get_template(TEMPLATE_NAME)?.render(ctx)
    }

    /// `source` compiled and rendered by this module's path, without the render thread.
    fn compiled(env: &Environment<'static>, source: &str, ctx: Value) -> std::result::Result<String, minijinja::Error> {
        let code = compile::compile(TEMPLATE_NAME, source)?;
        compile::render(env, &code, ctx)
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
    }

    #[test]
    fn real_templates_render_as_plain_minijinja_does() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap();
        // Every case's input, rendered with every template, plus a longer conversation.
        let mut inputs: Vec<(Vec<Message>, RenderOptions)> = cases
            .iter()
            .map(|c| {
                let opts = RenderOptions {
                    add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap_or(false),
                    bos_token: c["bos_token"].as_str().unwrap_or_default().to_owned(),
                    eos_token: c["eos_token"].as_str().unwrap_or_default().to_owned(),
                    tools: c.get("tools").filter(|t| !t.is_null()).cloned(),
                    enable_thinking: c["enable_thinking"].as_bool(),
                    extra: Vec::new(),
                };
                (serde_json::from_value(c["messages"].clone()).unwrap(), opts)
            })
            .collect();
        assert!(inputs.iter().any(|(_, o)| o.tools.is_some()), "no case has tools");
        let long: Vec<Message> = (0..60)
            .map(|i| match i % 3 {
                0 => Message::user(format!("question {i} <b>&\n")),
                1 => Message::assistant(format!("<think>thought {i}</think>answer {i}")),
                _ => Message {
                    content: Content::Parts(vec![serde_json::json!({"type": "text", "text": format!("part {i}")})]),
                    ..Message::user("")
                },
            })
            .collect();
        let tools = inputs.iter().find_map(|(_, o)| o.tools.clone());
        inputs.push((long.clone(), RenderOptions::default()));
        inputs.push((
            long,
            RenderOptions {
                add_generation_prompt: true,
                tools,
                enable_thinking: Some(false),
                ..RenderOptions::default()
            },
        ));

        let mut sources: Vec<(String, String)> = vec![
            ("gemma fallback".into(), GEMMA_FALLBACK.into()),
            ("chatml fallback".into(), CHATML_FALLBACK.into()),
        ];
        for entry in std::fs::read_dir(fixtures()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "jinja") {
                sources.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
            }
        }
        assert!(sources.len() >= 9);
        let (mut same_text, mut same_error) = (0, 0);
        for (name, source) in &sources {
            let t = ChatTemplate::new(source, TemplateSource::Gguf).unwrap();
            for (messages, opts) in &inputs {
                let want = plain(&t.env, source, render_context(messages, opts));
                match (t.render(messages, opts), want) {
                    (Ok(got), Ok(want)) => {
                        assert_eq!(got, want, "{name}");
                        same_text += 1;
                    }
                    (Err(got), Err(want)) => {
                        let (got, want) = (got.to_string(), want.to_string());
                        assert!(got.ends_with(&want), "{name}: {got:?} vs {want:?}");
                        same_error += 1;
                    }
                    (got, want) => panic!("{name}: {got:?} vs {want:?}"),
                }
            }
        }
        assert!(
            same_text >= 300 && same_error >= 1,
            "{same_text} texts, {same_error} errors"
        );
    }

    #[test]
    fn operators_behave_as_in_plain_minijinja() {
        let snippets = [
            "{{ 'a' + 'b' }}|{{ 1 + 2 }}|{{ 1.5 + 2 }}|{{ [1] + [2] }}|{{ ([1] + [2])|length }}|{{ (1, 2) + [3] }}",
            "{{ 'a' ~ 1 ~ none ~ [1, 'x'] ~ {'k': 'v'} ~ true }}|{{ x ~ 'a' }}|{{ 'a' ~ x }}",
            "{{ 'ab' * 3 }}|{{ 3 * 'ab' }}|{{ [1, 2] * 2 }}|{{ 2 * [1] }}|{{ 2 * 3 }}|{{ 2.5 * 2 }}|{{ 'a' * 0 }}",
            "{{ 1 == 1.0 }}|{{ 'a' != 'b' }}|{{ [1, [2]] == [1, [2]] }}|{{ {'a': 1} == {'a': 1} }}|{{ 1 < 2 }}|{{ 'a' <= 'b' }}|{{ [1, 2] > [1] }}|{{ none >= none }}|{{ x == 1 }}|{{ x != x }}|{{ x < 1 }}",
            "{{ 'a' in 'cat' }}|{{ 1 in [1, 2] }}|{{ 'k' in {'k': 1} }}|{{ 3 not in [1] }}|{{ 1 in 'a1' }}|{{ x in [1] }}|{{ [1] in [[1]] }}|{{ 1 in x }}",
            "{{ 1 < 2 < 3 }}|{{ 1 == 1 == 1 }}|{{ 1 != 2 != 1 }}|{{ 1 <= 2 >= 0 }}|{{ 1 > 2 > 3 }}|{{ 'a' in 'ab' in 'abc' }}|{{ 'z' not in 'ab' not in 'abc' }}|{{ x < 1 < 2 }}",
            "{{ 'hello'[1] }}|{{ 'hello'[-1] }}|{{ [1, 2, 3][1] }}|{{ [1, 2, 3][-1] }}|{{ {'a': 1}['a'] }}|{{ {'a': 1}['b'] }}|{{ [1][5] }}|{{ ([1] + [2])[1] }}|{{ [1, 2][1:][0] }}",
            "{{ x['a'] }}",
            "{{ 'hello'[1:3] }}|{{ 'hello'[::-1] }}|{{ [1, 2, 3, 4][1:] }}|{{ [1, 2, 3, 4][::-2] }}|{{ (range(10)|list)[2:8:3] }}|{{ [1, 2, 3][5:] }}|{{ x[1:] }}|{{ [1, 2, 3][::-1]|length }}|{{ [1, 2, 3][::-1][0] }}|{{ [1, 2, 3][-2:] }}",
            "{% set k = 'z' %}{{ {k: 1, 'k': 2} }}|{{ {k: 1, 'z': 2, k: 3} }}|{{ {1: 'x', k: [1]} }}|{{ {k: x} }}",
            "{% for i in [1, 1, 2, 2, 1] %}{{ loop.changed(i) }}{% endfor %}",
            "{{ 'a' + 1 }}",
            "{{ [1] * 'a' }}",
            "{{ 'a' * -1 }}",
            "{{ 1 * none }}",
            "{{ x + 1 }}",
            "{{ 1 in 5 }}",
            "{{ 'a'[1:2:0] }}",
            "{% set ns = namespace(a=1) %}{{ ns == ns }}|{{ ns.a + 1 }}|{{ 'a' in ns }}|{{ ns['a'] }}",
            "{{ messages[0]['content'] + '!' }}|{{ messages|length > 0 }}|{{ messages[-1].role }}|{{ messages[1:]|length }}|{{ messages[0] == messages[0] }}|{{ 'role' in messages[0] }}",
            "{{ messages[0].nope.deeper }}",
            "{% autoescape true %}<b>{{ '<i>' ~ 'x' }}</b>{% endautoescape %}",
            "{% macro m(a, b=2) %}[{{ a + b }}]{% endmacro %}{{ m(1) }}{% call m(3) %}{% endcall %}{{ m(b=5, a=1) }}",
            "{% for x in [3, 1] recursive %}{{ x }}{% if x > 1 %}{{ loop([x - 1]) }}{% endif %}{% endfor %}",
            "{% block b %}in {{ 1 + 1 }} block{% endblock %}",
            "{% macro m(a, b) %}{{ a }}-{{ b }}-{{ varargs }}-{{ kwargs }}{% endmacro %}{{ m(*[1, 2, 3]) }}|{{ m(1, **{'b': 2, 'c': 3}) }}|{{ m(*[1], **{'b': 2}) }}|{{ dict(**{'a': 1}, b=2) }}|{{ m(*x) }}",
            "{% macro m() %}{% endmacro %}{{ m(*1) }}",
            "{% macro m() %}{% endmacro %}{{ m(**[1]) }}",
        ];
        let t = ChatTemplate::new("", TemplateSource::Gguf).unwrap();
        let ctx = || {
            render_context(
                &[Message::user("hi"), Message::assistant("yo")],
                &RenderOptions::default(),
            )
        };
        for behavior in [
            UndefinedBehavior::Lenient,
            UndefinedBehavior::Chainable,
            UndefinedBehavior::SemiStrict,
            UndefinedBehavior::Strict,
        ] {
            let mut env = t.env.clone();
            env.set_undefined_behavior(behavior);
            for src in snippets {
                let got = compiled(&env, src, ctx()).map_err(|e| e.to_string());
                let want = plain(&env, src, ctx()).map_err(|e| e.to_string());
                assert_eq!(got, want, "{behavior:?}: {src}");
            }
        }
    }

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(1700000000, timezone.utc): Tuesday 14 Nov 2023 22:13:20
        let t = 1_700_000_000;
        assert_eq!(strftime_utc("%d %b %Y", t), "14 Nov 2023");
        assert_eq!(
            strftime_utc("%A %B %-d, %y %H:%M:%S %I%p %j %%", t),
            "Tuesday November 14, 23 22:13:20 10PM 318 %"
        );
        assert_eq!(strftime_utc("%a %e %m", 0), "Thu  1 01");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn float_repr_matches_python() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456789.125, "123456789.125"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(python_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn extra_variables_reach_the_template_and_reserved_names_are_refused() {
        let t = ChatTemplate::new(
            "{{ messages[0].content }}|{{ enable_thinking is defined and enable_thinking }}|{{ reasoning_effort | default('unset') }}|{{ extra.n if extra is defined else '' }}",
            TemplateSource::Gguf,
        )
        .unwrap();
        let msgs = [Message::user("hi")];
        let vars = request_variables(
            Some(&serde_json::json!({"enable_thinking": false, "extra": {"n": 3}})),
            Some(&serde_json::json!("low")),
        )
        .unwrap();
        let opts = RenderOptions {
            enable_thinking: Some(true),
            extra: vars,
            ..RenderOptions::default()
        };
        // The kwargs' `enable_thinking` replaces the switch; `reasoning_effort` is passed.
        assert_eq!(t.render(&msgs, &opts).unwrap(), "hi|False|low|3");
        let opts = RenderOptions {
            enable_thinking: Some(true),
            ..RenderOptions::default()
        };
        assert_eq!(t.render(&msgs, &opts).unwrap(), "hi|True|unset|");
        // One in the kwargs wins over the top-level field.
        let vars = request_variables(
            Some(&serde_json::json!({"reasoning_effort": "high"})),
            Some(&serde_json::json!("low")),
        )
        .unwrap();
        assert_eq!(vars, vec![("reasoning_effort".to_string(), serde_json::json!("high"))]);
        assert_eq!(request_variables(None, Some(&serde_json::Value::Null)).unwrap(), vec![]);

        for (kwargs, effort, want) in [
            (
                serde_json::json!([1]),
                serde_json::Value::Null,
                "must be an object, not a list",
            ),
            (
                serde_json::json!("x"),
                serde_json::Value::Null,
                "must be an object, not a string",
            ),
            (
                serde_json::json!({"messages": []}),
                serde_json::Value::Null,
                "may not set \"messages\"",
            ),
            (
                serde_json::json!({"a": 1, "bos_token": "x"}),
                serde_json::Value::Null,
                "\"bos_token\"",
            ),
            (
                serde_json::json!({}),
                serde_json::json!(3),
                "reasoning_effort must be a string",
            ),
        ] {
            let e = request_variables(Some(&kwargs), Some(&effort)).unwrap_err();
            let m = e.message().to_string();
            assert!(m.contains(want) && !m.contains('\n'), "{kwargs}: {m}");
        }
        for name in RESERVED_VARIABLES {
            assert!(template_kwargs(&serde_json::json!({ *name: true })).is_err(), "{name}");
        }
    }
}
