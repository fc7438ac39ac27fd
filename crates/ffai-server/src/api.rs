//! The endpoint handlers, and the bridge from the engine's blocking request handles to
//! async responses (whole JSON bodies, or server-sent events).

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, Method, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use ffai::engine::{Completion, Event, FinishReason, RequestHandle, SeqRequest};
use ffai::generate::TokenLogprobs;
use ffai::reasoning::ReasoningStream;
use ffai::tools::Reasoning;
use ffai::Tokenizer;

use crate::error::ApiError;
use crate::request::{self, Common, Limits, Prompt};
use crate::{unix_now, AppState, LoggedLater, ReasoningParser, Tokens};

/// How often a forwarder waiting on the engine checks whether its client is still there.
const POLL: Duration = Duration::from_millis(50);

type St = State<Arc<AppState>>;
type Body = Result<Bytes, BytesRejection>;

/// The body's bytes, or the extractor's own refusal (413 over the size limit) in the
/// OpenAI error shape.
fn body_bytes(body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError::with_status(r.status(), format!("cannot read the request body: {}", r.body_text())))
}

/// Runs `f` on the blocking pool (tokenizing and template rendering can take a while on
/// large inputs); a panic in it becomes a 500 for this request only.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

pub async fn models(State(st): St) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.opts.served_model_name,
            "object": "model",
            "created": st.started,
            "owned_by": "ffai",
            "max_model_len": st.engine.config().context,
        }],
    }))
}

pub async fn metrics(State(st): St) -> Response {
    let text = st.metrics.render(&st.engine.stats());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// `{"content": "...", "add_special": false}` → `{"tokens": [...]}`.
pub async fn tokenize(State(st): St, body: Body) -> Result<Json<Value>, ApiError> {
    let o = request::parse_object(&body_bytes(body)?)?;
    let content = request::string(&o, "content")?
        .ok_or_else(|| ApiError::bad_field("content", "\"content\" is missing"))?
        .to_string();
    let add_special = request::boolean(&o, "add_special")?.unwrap_or(false);
    let model = st.engine.model().clone();
    let ids = blocking(move || model.tokenizer.encode(&content, add_special))
        .await?
        .map_err(|e| ApiError::bad_field("content", e.message().to_string()))?;
    Ok(Json(json!({ "tokens": ids })))
}

/// `{"tokens": [...]}` → `{"content": "..."}`.
pub async fn detokenize(State(st): St, body: Body) -> Result<Json<Value>, ApiError> {
    let o = request::parse_object(&body_bytes(body)?)?;
    let vocab = st.engine.model().tokenizer.vocab_size();
    let bad = |m: String| ApiError::bad_field("tokens", m);
    let ids = match o.get("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_u64() {
                Some(i) if (i as usize) < vocab => Ok(i as u32),
                _ => Err(bad(format!(
                    "bad token id {v}: ids are whole numbers below the vocabulary size {vocab}"
                ))),
            })
            .collect::<Result<Vec<u32>, _>>()?,
        Some(other) => return Err(bad(format!("\"tokens\" must be a list, not {}", request::kind(other)))),
        None => return Err(bad("\"tokens\" is missing".into())),
    };
    let model = st.engine.model().clone();
    let content = blocking(move || model.tokenizer.decode(&ids)).await?;
    Ok(Json(json!({ "content": content })))
}

/// Which endpoint a generation serves (they differ only in their JSON shapes).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }
    /// The prompt's field name, for errors about the prompt.
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

fn limits(st: &AppState) -> Limits {
    Limits {
        context: st.engine.config().context,
        capacity: st.capacity,
    }
}

/// A chat request's offered tools, for reading calls out of its output.
pub(crate) struct ToolCtx {
    format: ffai::tools::ToolFormat,
    names: Vec<String>,
    /// The call is forced by a grammar (`tool_choice` "required" or a named function):
    /// its text is known to parse, so a stream sends its arguments as they are written.
    forced: bool,
    /// The reasoning block a forced call's grammar lets the model write first, or an
    /// unforced answer's with `--reasoning-parser auto` (else None). It is neither
    /// content nor calls: it goes out as the message's `reasoning_content` (the field
    /// reasoning models' OpenAI-compatible servers use).
    reasoning: ffai::tools::Reasoning,
}

impl ToolCtx {
    /// A whole output less its reasoning block.
    fn answer<'a>(&self, text: &'a str) -> &'a str {
        self.reasoning.split(text).1
    }

    /// `message` with the output's reasoning block, if it has one, as
    /// `reasoning_content`.
    fn with_reasoning(&self, mut message: Value, text: &str) -> Value {
        if let Some(r) = self.reasoning.split(text).0 {
            message["reasoning_content"] = r.into();
        }
        message
    }

    /// The calls in a whole output, or None (then its answer is all content).
    fn parse(&self, text: &str) -> Option<ffai::tools::Parsed> {
        self.parse_answer(self.answer(text))
    }

    /// The calls in an output's answer (what follows its reasoning block).
    fn parse_answer(&self, answer: &str) -> Option<ffai::tools::Parsed> {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        self.format.parse(answer, &names).filter(|p| !p.calls.is_empty())
    }
}

/// A fresh call id: "call_" and 24 hexadecimal digits of randomness.
fn call_id() -> String {
    format!("call_{:016x}{:08x}", random_seed(), random_seed() as u32)
}

pub async fn completions(State(st): St, body: Body) -> Result<Response, ApiError> {
    let o = request::parse_object(&body_bytes(body)?)?;
    request::check_model(&o, &st.opts.served_model_name)?;
    let common = request::parse_common(&o, &st.defaults, limits(&st), false)?;
    let ids = match request::parse_prompt(&o)? {
        Prompt::Tokens(ids) => ids,
        Prompt::Text(text) => {
            let model = st.engine.model().clone();
            blocking(move || model.encode(&text))
                .await?
                .map_err(|e| ApiError::bad_field("prompt", e.message().to_string()))?
        }
    };
    generate(st, Kind::Completion, ids, common, None, Reasoning::None).await
}

pub async fn chat_completions(State(st): St, body: Body) -> Result<Response, ApiError> {
    let o = request::parse_object(&body_bytes(body)?)?;
    request::check_model(&o, &st.opts.served_model_name)?;
    let mut common = request::parse_common(&o, &st.defaults, limits(&st), true)?;
    let tools = request::parse_tools(&o)?;
    let messages = request::parse_messages(&o)?;
    // Extra template variables: `chat_template_kwargs`, and `reasoning_effort` (gpt-oss).
    request::string(&o, "reasoning_effort")?;
    let vars = ffai::chat::request_variables(o.get("chat_template_kwargs"), o.get("reasoning_effort"))
        .map_err(|e| ApiError::bad_field("chat_template_kwargs", e.message().to_string()))?;
    let parser = st.opts.reasoning_parser;
    let model = st.engine.model().clone();
    // Schemas compiled, the conversation rendered (tools offered unless the choice is
    // "none") and tokenized as `ffai generate --chat` does, and a forced call's grammar
    // built, on the blocking pool.
    let (ids, format, grammar, reasoning) = blocking(move || {
        let tok = &model.tokenizer;
        ffai::tools::check_schemas(&tools.tools, tok)
            .map_err(|e| ApiError::bad_field("tools", e.message().to_string()))?;
        let offer = tools.choice != ffai::tools::ToolChoice::None;
        let (text, tpl) = model
            .render_chat_vars(&messages, &tools.tools, offer, vars)
            .map_err(|e| ApiError::bad_field("messages", e.message().to_string()))?;
        let ids = model
            .encode(&text)
            .map_err(|e| ApiError::bad_field("messages", e.message().to_string()))?;
        let grammar = ffai::tools::grammar(
            tpl.format,
            tpl.reasoning,
            &tools.tools,
            &tools.choice,
            tools.parallel,
            tok,
        );
        let forced = grammar.is_some();
        let ctx = offer.then(|| ToolCtx {
            format: tpl.format,
            names: tools.tools.iter().map(|t| t.name.clone()).collect(),
            forced,
            // Unforced, the model may think before its calls or answer too: split off
            // unless the server was told not to.
            reasoning: if forced || parser == ReasoningParser::Auto {
                tpl.reasoning
            } else {
                Reasoning::None
            },
        });
        let ctx = ctx.filter(|c| !c.names.is_empty());
        // An ordinary answer (no tools to read calls from): its reasoning block, where the
        // template teaches one and the prompt leaves room for it, is split off.
        let reasoning = match (&ctx, parser) {
            (None, ReasoningParser::Auto) => tpl.reasoning,
            _ => Reasoning::None,
        };
        Ok::<_, ApiError>((ids, ctx, grammar, reasoning))
    })
    .await??;
    if let Some(g) = grammar {
        common.params.response_format = Some(ffai::constrain::ResponseFormat::Lark(g));
    }
    generate(st, Kind::Chat, ids, common, format.map(Arc::new), reasoning).await
}

/// What a forwarder passes from the engine to the async side.
enum SeqMsg {
    /// Newly settled text (never empty).
    Text(String),
    /// A generated token's log-probabilities (requests that asked), before its text.
    Logprob(u32, TokenLogprobs),
    Done(Completion),
    /// The engine stopped before the sequence finished.
    Failed(String),
}

/// A seed for a choice that named none: fresh randomness from the standard library's
/// per-process random hasher keys, mixed with a counter.
fn random_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// Submits one sequence per choice and answers with their completions, whole or streamed.
async fn generate(
    st: Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    c: Common,
    tools: Option<Arc<ToolCtx>>,
    reasoning: Reasoning,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let cfg = st.engine.config();
    if prompt.len() >= cfg.context {
        return Err(ApiError::bad_field(
            kind.prompt_param(),
            format!(
                "the prompt has {} tokens; the context of {} leaves no room to generate",
                prompt.len(),
                cfg.context
            ),
        ));
    }
    // Without max_tokens: as much as the context (and a KV cache smaller than it) leaves.
    let room = cfg.context.min(cfg.kv_tokens()).saturating_sub(prompt.len()).max(1);
    let max_tokens = c.max_tokens.unwrap_or(room);
    let slots = st.reserve(c.n).ok_or_else(|| ApiError::overloaded(st.capacity))?;
    let n_prompt = prompt.len();

    let (tx, rx) = unbounded_channel();
    for (i, slot) in slots.into_iter().enumerate() {
        let mut params = c.params.clone();
        params.max_tokens = max_tokens;
        // Choice i of a seeded request uses seed + i: reproducible, and the choices differ.
        params.seed = Some(match c.params.seed {
            Some(s) => s.wrapping_add(i as u64),
            None => random_seed(),
        });
        let req = SeqRequest {
            prompt: prompt.clone(),
            params,
        };
        // Returning early drops `rx`: the forwarders already started see it and cancel.
        // Submitting compiles the request's grammar (a forced tool call over many tools
        // takes a while): on the blocking pool.
        let engine = st.engine.clone();
        let handle = blocking(move || engine.submit(req)).await?.map_err(|e| {
            let m = e.message().to_string();
            // Only a stopped engine is the server's fault; the rest are the checks the
            // engine makes of a request (lengths, ids, KV room).
            if m.contains("engine is not running") {
                ApiError::internal(m)
            } else {
                ApiError::bad_request(m)
            }
        })?;
        let (tx, st) = (tx.clone(), st.clone());
        tokio::task::spawn_blocking(move || {
            forward(&handle, i, &tx, &st, started);
            // Cancels the sequence if it still runs, then frees its admission place.
            drop(handle);
            drop(slot);
        });
    }
    drop(tx);

    let reply = Reply {
        kind,
        id: st.new_id(kind.id_prefix()),
        created: unix_now(),
        model: st.opts.served_model_name.clone(),
        tools,
        reasoning,
    };
    if c.stream {
        Ok(stream(st, reply, rx, c.n, n_prompt, c.include_usage, started))
    } else {
        whole(reply, rx, c.n, n_prompt, &st.engine.model().tokenizer).await
    }
}

/// Drains one sequence's events into `tx` until it is done, the engine stops, or the
/// receiver is gone (the client left); records the sequence's timings.
fn forward(
    handle: &RequestHandle,
    index: usize,
    tx: &UnboundedSender<(usize, SeqMsg)>,
    st: &AppState,
    started: Instant,
) {
    let mut first: Option<Instant> = None;
    let mut last = started;
    let mut tokens = 0usize;
    loop {
        if tx.is_closed() {
            return;
        }
        let msg = match handle.recv_timeout(POLL) {
            Ok(None) => continue,
            Ok(Some(Event::Token { id, text, logprob })) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += 1;
                if let Some(lp) = logprob {
                    if tx.send((index, SeqMsg::Logprob(id, lp))).is_err() {
                        return;
                    }
                }
                if text.is_empty() {
                    continue;
                }
                SeqMsg::Text(text)
            }
            Ok(Some(Event::Text(text))) if text.is_empty() => continue,
            Ok(Some(Event::Text(text))) => SeqMsg::Text(text),
            Ok(Some(Event::Done(c))) => {
                let ttft = first.map(|f| f.duration_since(started).as_secs_f64());
                let tpot = first
                    .filter(|_| tokens > 1)
                    .map(|f| last.duration_since(f).as_secs_f64() / (tokens - 1) as f64);
                st.metrics.observe_sequence(ttft, tpot);
                let _ = tx.send((index, SeqMsg::Done(c)));
                return;
            }
            Err(e) => {
                let _ = tx.send((index, SeqMsg::Failed(e.message().to_string())));
                return;
            }
        };
        if tx.send((index, msg)).is_err() {
            return;
        }
    }
}

/// What the JSON of one response shares.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// Chat with tools offered: calls are parsed from each choice's output.
    tools: Option<Arc<ToolCtx>>,
    /// Chat without tools: the reasoning block split off each choice's output
    /// (`ffai::reasoning`; None: the output is all content).
    reasoning: Reasoning,
}

fn finish_reason(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        // Cancelled sequences only reach a client when the server shuts down.
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Error(_) => "error",
    }
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A token's text (lossy where it is part of a character) and its bytes.
fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}, ...]}`.
fn chat_logprobs(tok: &Tokenizer, items: &[(u32, TokenLogprobs)]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (t, b) = token_text(tok, id);
        json!({"token": t, "logprob": logprob, "bytes": b})
    };
    let content: Vec<Value> = items
        .iter()
        .map(|(id, lp)| {
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs`: parallel lists of tokens, their log-probabilities, the top
/// alternatives as {token: logprob} and each token's byte offset in the text (from
/// `offset`).
fn completion_logprobs(tok: &Tokenizer, items: &[(u32, TokenLogprobs)], mut offset: usize) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, lp) in items {
        let (t, b) = token_text(tok, *id);
        offsets.push(offset);
        offset += b.len();
        tokens.push(t);
        lps.push(lp.logprob);
        let top: serde_json::Map<String, Value> =
            lp.top.iter().map(|&(t, l)| (token_text(tok, t).0, json!(l))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Waits for every choice and answers with one JSON body.
async fn whole(
    reply: Reply,
    mut rx: UnboundedReceiver<(usize, SeqMsg)>,
    n: usize,
    n_prompt: usize,
    tok: &Tokenizer,
) -> Result<Response, ApiError> {
    let mut done: Vec<Option<Completion>> = vec![None; n];
    let mut lps: Vec<Vec<(u32, TokenLogprobs)>> = vec![Vec::new(); n];
    let mut any_lp = false;
    while let Some((i, msg)) = rx.recv().await {
        match msg {
            SeqMsg::Text(_) => {}
            SeqMsg::Logprob(id, lp) => {
                any_lp = true;
                lps[i].push((id, lp));
            }
            SeqMsg::Done(c) => done[i] = Some(c),
            SeqMsg::Failed(m) => return Err(ApiError::internal(m)),
        }
    }
    let done: Vec<Completion> = done
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| ApiError::internal("the engine stopped before the request finished"))?;
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, c)| match reply.kind {
            Kind::Chat => {
                let parsed = reply.tools.as_ref().and_then(|t| t.parse(&c.text));
                let (message, finish) = match parsed {
                    Some(p) => {
                        let calls: Vec<Value> = p
                            .calls
                            .iter()
                            .map(|call| {
                                json!({
                                    "id": call_id(),
                                    "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments},
                                })
                            })
                            .collect();
                        (
                            json!({"role": "assistant", "content": p.content, "tool_calls": calls}),
                            "tool_calls",
                        )
                    }
                    None => match reply.tools.as_ref() {
                        Some(t) => (
                            json!({"role": "assistant", "content": t.answer(&c.text)}),
                            finish_reason(&c.finish_reason),
                        ),
                        None => {
                            // An output that ended inside its reasoning block has no
                            // content: null, as vLLM answers.
                            let (reasoning, content) = ffai::reasoning::split(reply.reasoning, &c.text);
                            let mut m = json!({"role": "assistant", "content": content});
                            if let Some(r) = reasoning {
                                m["reasoning_content"] = r.into();
                            }
                            (m, finish_reason(&c.finish_reason))
                        }
                    },
                };
                let message = match reply.tools.as_ref() {
                    Some(t) => t.with_reasoning(message, &c.text),
                    None => message,
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if any_lp { chat_logprobs(tok, &lps[i]) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
            Kind::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": if any_lp { completion_logprobs(tok, &lps[i], 0) } else { Value::Null },
                "finish_reason": finish_reason(&c.finish_reason),
            }),
        })
        .collect();
    let completion: usize = done.iter().map(|c| c.token_ids.len()).sum();
    let cached = done.iter().map(|c| c.cached_tokens).max().unwrap_or(0);
    let body = json!({
        "id": reply.id,
        "object": match reply.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": usage(n_prompt, completion, cached),
    });
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(Tokens {
        prompt: n_prompt,
        completion,
    });
    Ok(resp)
}

/// Writes a streamed request's log line when its stream ends or is dropped (the client
/// left).
struct StreamLog {
    st: Arc<AppState>,
    started: Instant,
    path: &'static str,
    tokens: Tokens,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        self.st
            .finish_request(&Method::POST, self.path, 200, Some(self.tokens), self.started);
    }
}

/// The state of one server-sent-event stream.
struct Streaming {
    reply: Reply,
    rx: UnboundedReceiver<(usize, SeqMsg)>,
    /// Events ready to send.
    queue: VecDeque<String>,
    /// Choices not finished yet.
    open: usize,
    finished: bool,
    include_usage: bool,
    cached: usize,
    log: StreamLog,
    /// Per choice: log-probabilities of tokens whose text has not been sent yet, and
    /// (completions) the byte offset of the next token in the choice's text.
    pending: Vec<Vec<(u32, TokenLogprobs)>>,
    offsets: Vec<usize>,
    /// Chat with tools: per choice, its output so far and how many bytes of it went out as
    /// content (text that may start a call is held until the choice ends, then parsed
    /// exactly as a whole answer is).
    outputs: Vec<String>,
    sent: Vec<usize>,
    /// A call has surely begun: the rest of the choice is held.
    begun: Vec<bool>,
    /// Forced calls: per choice, the calls that went out so far and how many bytes of
    /// each one's arguments.
    calls_sent: Vec<Vec<usize>>,
    /// Per choice: its reasoning block (a forced call's, see `ToolCtx::reasoning`) is
    /// over and was dropped from `outputs`, which from then on holds only the answer.
    reasoned: Vec<bool>,
    /// Chat without tools: per choice, its output split into reasoning and content as it
    /// comes (see `Reply::reasoning`).
    splits: Vec<ReasoningStream>,
}

impl Streaming {
    /// One chunk with one choice: `text` as the content delta (chat) or text
    /// (completions), `role` for chat's first chunk, `finish` on the last.
    fn chunk(&self, index: usize, text: Option<&str>, role: bool, finish: Option<&str>) -> String {
        self.chunk_lp(index, text, role, finish, Value::Null)
    }

    /// The log-probabilities of the choice's tokens not sent yet, in the endpoint's shape
    /// (null when none).
    fn take_logprobs(&mut self, index: usize) -> Value {
        let items = std::mem::take(&mut self.pending[index]);
        if items.is_empty() {
            return Value::Null;
        }
        let model = self.log.st.engine.model().clone();
        match self.reply.kind {
            Kind::Chat => chat_logprobs(&model.tokenizer, &items),
            Kind::Completion => {
                let v = completion_logprobs(&model.tokenizer, &items, self.offsets[index]);
                self.offsets[index] += items
                    .iter()
                    .map(|(id, _)| model.tokenizer.token_bytes(*id).len())
                    .sum::<usize>();
                v
            }
        }
    }

    fn chunk_lp(&self, index: usize, text: Option<&str>, role: bool, finish: Option<&str>, lp: Value) -> String {
        let choice = match self.reply.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                    delta.insert("content".into(), "".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": lp, "finish_reason": finish})
            }
        };
        let mut v = json!({
            "id": self.reply.id,
            "object": match self.reply.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": [choice],
        });
        if self.include_usage {
            // OpenAI sends "usage": null on every chunk but the last when usage is asked.
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// A chat chunk whose delta carries `tool_calls`.
    fn tool_chunk(&self, index: usize, calls: Value) -> String {
        self.delta_chunk(index, json!({ "tool_calls": calls }))
    }

    /// A chat chunk with (part of) the choice's reasoning block (`reasoning_content`): a
    /// forced call's all at once when the block is over (or the output ended inside it),
    /// an ordinary answer's as it is written (nothing when empty).
    fn push_reasoning(&mut self, index: usize, text: &str) {
        if !text.is_empty() {
            let c = self.delta_chunk(index, json!({ "reasoning_content": text }));
            self.queue.push_back(c);
        }
    }

    /// A chat chunk whose choice has `delta` and no finish reason.
    fn delta_chunk(&self, index: usize, delta: Value) -> String {
        let mut v = json!({
            "id": self.reply.id,
            "object": "chat.completion.chunk",
            "created": self.reply.created,
            "model": self.reply.model,
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// Queues the first chunk of call `k`: its id, type and name.
    fn push_call_head(&mut self, index: usize, k: usize, name: &str) {
        let head = json!([{
            "index": k,
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }]);
        let c = self.tool_chunk(index, head);
        self.queue.push_back(c);
    }

    /// Queues a fragment of call `k`'s arguments (nothing when empty).
    fn push_call_args(&mut self, index: usize, k: usize, fragment: &str) {
        if fragment.is_empty() {
            return;
        }
        let c = self.tool_chunk(index, json!([{"index": k, "function": {"arguments": fragment}}]));
        self.queue.push_back(c);
    }

    /// A forced call's new text: the head of each call whose name is now written, and
    /// the arguments written since the last event.
    fn stream_calls(&mut self, index: usize, tools: &ToolCtx) {
        let names: Vec<&str> = tools.names.iter().map(String::as_str).collect();
        let out = std::mem::take(&mut self.outputs[index]);
        let from = self.sent[index].min(out.len());
        let from = if out.is_char_boundary(from) { from } else { 0 };
        for (k, call) in tools.format.partial_calls(&out[from..], &names).iter().enumerate() {
            if k == self.calls_sent[index].len() {
                self.push_call_head(index, k, call.name);
                self.calls_sent[index].push(0);
            }
            let done = self.calls_sent[index][k];
            if let Some(fragment) = call.arguments.get(done..) {
                self.push_call_args(index, k, fragment);
                self.calls_sent[index][k] = call.arguments.len();
            }
        }
        self.outputs[index] = out;
    }

    /// Queues `text` as a content chunk of choice `index` (nothing when empty).
    fn push_text(&mut self, index: usize, text: &str) {
        if text.is_empty() {
            return;
        }
        let lp = self.take_logprobs(index);
        let c = self.chunk_lp(index, Some(text), false, None, lp);
        self.queue.push_back(c);
    }

    /// Turns one engine message into the events it makes.
    fn on_message(&mut self, index: usize, msg: SeqMsg) {
        match msg {
            SeqMsg::Logprob(id, lp) => self.pending[index].push((id, lp)),
            SeqMsg::Text(t) => match self.reply.tools.clone() {
                None => {
                    let d = self.splits[index].push(&t);
                    self.push_reasoning(index, &d.reasoning);
                    self.push_text(index, &d.content);
                }
                Some(tools) => {
                    self.outputs[index].push_str(&t);
                    if !self.reasoned[index] {
                        // Nothing goes out while the output is (or may begin) a
                        // reasoning block; once it ends, it is dropped.
                        match tools.reasoning.extent(&self.outputs[index]) {
                            None => return,
                            Some(n) => {
                                let block: String = self.outputs[index].drain(..n).collect();
                                let reasoning = tools.reasoning.split(&block).0.unwrap_or("").to_string();
                                self.push_reasoning(index, &reasoning);
                                self.reasoned[index] = true;
                            }
                        }
                    }
                    if !self.begun[index] {
                        let out = std::mem::take(&mut self.outputs[index]);
                        let sent = self.sent[index];
                        let (safe, begun) = tools.format.safe_prefix(&out, sent);
                        if safe > sent {
                            self.push_text(index, &out[sent..safe]);
                            self.sent[index] = safe;
                        }
                        self.begun[index] = begun;
                        self.outputs[index] = out;
                    }
                    if self.begun[index] && tools.forced {
                        self.stream_calls(index, &tools);
                    }
                }
            },
            SeqMsg::Done(c) => {
                self.log.tokens.completion += c.token_ids.len();
                self.cached = self.cached.max(c.cached_tokens);
                let mut finish = finish_reason(&c.finish_reason);
                if self.reply.kind == Kind::Chat && self.reply.tools.is_none() {
                    let d = self.splits[index].finish();
                    self.push_reasoning(index, &d.reasoning);
                    self.push_text(index, &d.content);
                }
                if let Some(tools) = self.reply.tools.clone() {
                    let mut out = std::mem::take(&mut self.outputs[index]);
                    if !self.reasoned[index] {
                        // Ended inside its reasoning block: no answer, all reasoning.
                        let reasoning = tools.reasoning.split(&out).0.unwrap_or("").to_string();
                        self.push_reasoning(index, &reasoning);
                        out.clear();
                    }
                    let sent = self.sent[index];
                    let streamed = std::mem::take(&mut self.calls_sent[index]);
                    match tools.parse_answer(&out) {
                        Some(p) => {
                            let content = p.content.unwrap_or_default();
                            self.push_text(index, content.get(sent..).unwrap_or(""));
                            for (k, call) in p.calls.iter().enumerate() {
                                // What went out already (a forced call's arguments are
                                // sent as written, and the parse keeps them as written).
                                let done = match streamed.get(k) {
                                    Some(&d) if call.arguments.get(..d).is_some() => d,
                                    Some(_) => continue,
                                    None => {
                                        self.push_call_head(index, k, &call.name);
                                        0
                                    }
                                };
                                self.push_call_args(index, k, &call.arguments[done..]);
                            }
                            finish = "tool_calls";
                        }
                        // A forced call cut off (by max_tokens): what went out stays the
                        // answer, with the choice's finish reason.
                        None if !streamed.is_empty() => {}
                        None => self.push_text(index, out.get(sent..).unwrap_or("")),
                    }
                }
                let lp = self.take_logprobs(index);
                let chunk = self.chunk_lp(index, None, false, Some(finish), lp);
                self.queue.push_back(chunk);
                self.open -= 1;
                if self.open == 0 {
                    self.end();
                }
            }
            SeqMsg::Failed(m) => {
                self.queue.push_back(ApiError::internal(m).body().to_string());
                self.end();
            }
        }
    }

    /// The usage chunk (when asked) and `[DONE]`.
    fn end(&mut self) {
        if self.include_usage {
            let t = self.log.tokens;
            let v = json!({
                "id": self.reply.id,
                "object": match self.reply.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
                "created": self.reply.created,
                "model": self.reply.model,
                "choices": [],
                "usage": usage(t.prompt, t.completion, self.cached),
            });
            self.queue.push_back(v.to_string());
        }
        self.queue.push_back("[DONE]".into());
        self.finished = true;
    }
}

/// Answers with server-sent events. Dropping the stream (the client left) drops the
/// receiver, which makes every forwarder cancel its sequence.
fn stream(
    st: Arc<AppState>,
    reply: Reply,
    rx: UnboundedReceiver<(usize, SeqMsg)>,
    n: usize,
    n_prompt: usize,
    include_usage: bool,
    started: Instant,
) -> Response {
    let path = match reply.kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let splits = vec![ReasoningStream::new(reply.reasoning); n];
    let mut s = Streaming {
        reply,
        rx,
        queue: VecDeque::new(),
        open: n,
        finished: false,
        include_usage,
        cached: 0,
        pending: vec![Vec::new(); n],
        offsets: vec![0; n],
        outputs: vec![String::new(); n],
        sent: vec![0; n],
        begun: vec![false; n],
        calls_sent: vec![Vec::new(); n],
        reasoned: vec![false; n],
        splits,
        log: StreamLog {
            st,
            started,
            path,
            tokens: Tokens {
                prompt: n_prompt,
                completion: 0,
            },
        },
    };
    if s.reply.kind == Kind::Chat {
        // Chat streams open every choice with the assistant role.
        for i in 0..n {
            let c = s.chunk(i, None, true, None);
            s.queue.push_back(c);
        }
    }
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            if s.finished {
                return None;
            }
            match s.rx.recv().await {
                Some((i, msg)) => s.on_message(i, msg),
                // Every forwarder ended without Done: the engine went away.
                None => s.on_message(
                    0,
                    SeqMsg::Failed("the engine stopped before the request finished".into()),
                ),
            }
        }
    });
    let mut resp = Sse::new(events).into_response();
    resp.extensions_mut().insert(LoggedLater);
    resp
}
