//! `ffai batch` (offline batch generation over a JSONL file) and `ffai bench --sequences`,
//! both on the continuous-batching scheduler.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde_json::{json, Map, Value};

use ffai::engine::{Completion, EngineConfig, Event, KvCacheSize, Scheduler, SeqRequest};
use ffai::generate::GenerationParameters;
use ffai::{Error, Model, Result};

use crate::{ModelArgs, SamplingArgs};

/// Engine sizing flags shared by `batch` and `bench --sequences` (and later `serve`).
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Most sequences running at once.
    #[arg(long, default_value_t = 16)]
    pub max_sequences: usize,
    /// Most tokens in one step (decode rows plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// KV cache size: a token count ("65536") or memory ("512MiB", "2GiB"). Default: every
    /// sequence at the full context, at most 2 GiB, at least one full-context sequence.
    #[arg(long)]
    pub kv_cache_size: Option<String>,
    /// Longest sequence (prompt + generated); default: the model's context.
    #[arg(long)]
    pub context: Option<usize>,
}

impl EngineArgs {
    pub fn config(&self, model: &Model) -> Result<EngineConfig> {
        let ctx = model.lm.config().max_position_embeddings;
        let context = match self.context {
            Some(c) if c > ctx => {
                return Err(Error::new(format!(
                    "--context {c} exceeds the model's context of {ctx}"
                )))
            }
            Some(0) => return Err(Error::new("--context must be at least 1")),
            Some(c) => c,
            None => ctx,
        };
        let kv = self.kv_cache_size.as_deref().map(KvCacheSize::parse).transpose()?;
        EngineConfig::for_model(&*model.lm, context, self.max_sequences, self.max_batch_tokens, kv)
    }
}

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL input: one {"prompt": ...} or {"messages": [...]} object per line, optionally
    /// with max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
    /// response_format (as in the OpenAI API; also {"type": "regex"|"grammar", ...}), and
    /// for chat lines tools, tool_choice, parallel_tool_calls (calls parsed into the
    /// output's "tool_calls"), chat_template_kwargs (an object of extra chat-template
    /// variables, e.g. {"enable_thinking": false}) and reasoning_effort. Chat lines of a
    /// thinking model (no tools) also get the output split as `ffai serve` does:
    /// "reasoning_content" and "content" ("text" stays whole). Blank lines are skipped; output "index" counts the requests
    /// from 0.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the results (JSONL, input order); default: stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Render "prompt" lines as one user message through the chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Input lines longer than this are refused (a line is one request, not a corpus).
const MAX_LINE_BYTES: usize = 16 << 20;
/// Most lines in one input file.
const MAX_LINES: usize = 1 << 20;
const KEYS: &[&str] = &[
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
    "reasoning_effort",
];

/// One input line, checked and tokenized.
struct Job {
    prompt: Vec<u32>,
    params: GenerationParameters,
    /// Offered tools: the format to read calls in, the reasoning block a forced call may
    /// start with (left out of "content"), and the offered names.
    tools: Option<(ffai::tools::ToolFormat, ffai::tools::Reasoning, Vec<String>)>,
    /// Chat lines without tools of a thinking model (one whose template teaches a
    /// reasoning block): the block its answer may open with, split off into
    /// "reasoning_content" and "content" (`Reasoning::None` where the prompt switched
    /// thinking off: all content).
    reasoning: Option<ffai::tools::Reasoning>,
}

/// Parses and checks one line (1-based `n` for messages); errors name the line.
/// `template`: what the model's chat template teaches (read once for the whole file).
fn parse_line(
    model: &Model,
    template: Option<ffai::tools::ToolTemplate>,
    line: &str,
    n: usize,
    chat: bool,
    defaults: &GenerationParameters,
) -> Result<Job> {
    let err = |m: String| Error::new(format!("line {n}: {m}"));
    let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(err("not a JSON object".into()));
    };
    if let Some(k) = o.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(format!("unknown key \"{k}\" (known: {})", KEYS.join(", "))));
    }
    let mut p = defaults.clone();
    let num = |o: &Map<String, Value>, k: &str| -> Result<Option<f64>> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(x)) => Ok(x.as_f64()),
            Some(other) => Err(err(format!("\"{k}\" must be a number, not {}", kind(other)))),
        }
    };
    let int = |o: &Map<String, Value>, k: &str| -> Result<Option<u64>> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(x)) => x
                .as_u64()
                .map(Some)
                .ok_or_else(|| err(format!("\"{k}\" must be a whole number >= 0, not {x}"))),
            Some(other) => Err(err(format!("\"{k}\" must be a whole number, not {}", kind(other)))),
        }
    };
    if let Some(v) = int(&o, "max_tokens")? {
        p.max_tokens = usize::try_from(v).unwrap_or(usize::MAX);
    }
    if let Some(v) = num(&o, "temperature")? {
        p.temperature = v as f32;
    }
    if let Some(v) = num(&o, "top_p")? {
        p.top_p = v as f32;
    }
    if let Some(v) = int(&o, "top_k")? {
        p.top_k = usize::try_from(v).unwrap_or(usize::MAX);
    }
    if let Some(v) = num(&o, "min_p")? {
        p.min_p = v as f32;
    }
    if let Some(v) = num(&o, "repetition_penalty")? {
        p.repetition_penalty = v as f32;
    }
    if let Some(v) = int(&o, "seed")? {
        p.seed = Some(v);
    }
    match o.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => p.stop_strings.push(s.clone()),
        Some(Value::Array(a)) => {
            for s in a {
                match s {
                    Value::String(s) => p.stop_strings.push(s.clone()),
                    other => return Err(err(format!("\"stop\" entries must be strings, not {}", kind(other)))),
                }
            }
        }
        Some(other) => {
            return Err(err(format!(
                "\"stop\" must be a string or a list of strings, not {}",
                kind(other)
            )))
        }
    }
    if let Some(f) = o.get("response_format") {
        p.response_format =
            ffai::constrain::ResponseFormat::from_openai(f).map_err(|e| err(e.message().to_string()))?;
    }
    if let Some(f) = &p.response_format {
        // Compiled now, so a bad schema fails before any work starts.
        ffai::constrain::Constraint::new(&model.tokenizer, f).map_err(|e| err(e.message().to_string()))?;
    }
    p.validate().map_err(|e| err(e.message().to_string()))?;
    let tools = parse_tools(&o).map_err(err)?;
    // Extra chat-template variables, as `ffai serve` takes them.
    let vars = ffai::chat::request_variables(o.get("chat_template_kwargs"), o.get("reasoning_effort"))
        .map_err(|e| err(e.message().to_string()))?;
    let msgs: Vec<ffai::chat::Message> = match (o.get("prompt"), o.get("messages")) {
        (Some(_), Some(_)) => return Err(err("give \"prompt\" or \"messages\", not both".into())),
        (None, None) => return Err(err("no \"prompt\" or \"messages\"".into())),
        (Some(Value::String(s)), None) if chat => vec![ffai::chat::Message::user(s.clone())],
        (Some(Value::String(s)), None) => {
            if tools.is_some() {
                return Err(err("tools need a chat request (\"messages\", or --chat)".into()));
            }
            if !vars.is_empty() {
                return Err(err(
                    "\"chat_template_kwargs\" and \"reasoning_effort\" need a chat request (\"messages\", or --chat)"
                        .into(),
                ));
            }
            let prompt = model.encode(s).map_err(|e| err(e.message().to_string()))?;
            return Ok(Job {
                prompt,
                params: p,
                tools: None,
                reasoning: None,
            });
        }
        (Some(other), None) => return Err(err(format!("\"prompt\" must be a string, not {}", kind(other)))),
        (None, Some(m)) => {
            let msgs: Vec<ffai::chat::Message> = serde_json::from_value(m.clone())
                .map_err(|e| err(format!("\"messages\" is not a list of chat messages: {e}")))?;
            if msgs.is_empty() {
                return Err(err("\"messages\" is empty".into()));
            }
            msgs
        }
    };
    let none = ffai::tools::Reasoning::None;
    let (text, offered, reasoning) = match tools {
        None if vars.is_empty() => {
            let text = model
                .render_chat(&msgs, true)
                .map_err(|e| err(e.message().to_string()))?;
            let reasoning = template.map_or(none, |t| t.for_prompt(&text).reasoning);
            (text, None, reasoning)
        }
        None => {
            let (text, tpl) = model
                .render_chat_vars(&msgs, &[], false, vars)
                .map_err(|e| err(e.message().to_string()))?;
            (text, None, tpl.reasoning)
        }
        Some((specs, choice, parallel)) => {
            // As the server does: schemas compiled, tools offered unless the choice is
            // "none", a forced call's grammar in place of the response format.
            ffai::tools::check_schemas(&specs, &model.tokenizer).map_err(|e| err(e.message().to_string()))?;
            let offer = choice != ffai::tools::ToolChoice::None;
            let (text, tpl) = model
                .render_chat_vars(&msgs, &specs, offer, vars)
                .map_err(|e| err(e.message().to_string()))?;
            let forced = ffai::tools::grammar(tpl.format, tpl.reasoning, &specs, &choice, parallel, &model.tokenizer);
            let reasoning = match forced {
                Some(_) => tpl.reasoning,
                None => ffai::tools::Reasoning::None,
            };
            if let Some(g) = forced {
                if p.response_format.is_some() {
                    return Err(err(
                        "a forced tool call (\"tool_choice\" \"required\" or a function) cannot be combined with a response format".into(),
                    ));
                }
                p.response_format = Some(ffai::constrain::ResponseFormat::Lark(g));
            }
            let names: Vec<String> = specs.iter().map(|t| t.name.clone()).collect();
            (
                text,
                (offer && !names.is_empty()).then_some((tpl.format, reasoning, names)),
                tpl.reasoning,
            )
        }
    };
    let prompt = model.encode(&text).map_err(|e| err(e.message().to_string()))?;
    // A thinking model's chat answer gets "reasoning_content" and "content"; one read for
    // calls keeps its own split (a forced call's reasoning, above).
    let reasoning = template
        .is_some_and(|t| t.reasoning != none)
        .then_some(reasoning)
        .filter(|_| offered.is_none());
    Ok(Job {
        prompt,
        params: p,
        tools: offered,
        reasoning,
    })
}

type LineTools = (Vec<ffai::tools::ToolSpec>, ffai::tools::ToolChoice, bool);

/// A line's `tools`, `tool_choice` and `parallel_tool_calls`; None when it has no tools
/// key (a choice or flag without tools is an error).
fn parse_tools(o: &Map<String, Value>) -> std::result::Result<Option<LineTools>, String> {
    let present = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    if !present("tools") {
        if present("tool_choice") || present("parallel_tool_calls") {
            return Err("\"tool_choice\" and \"parallel_tool_calls\" need \"tools\"".into());
        }
        return Ok(None);
    }
    let specs = ffai::tools::parse_tools(&o["tools"]).map_err(|e| e.message().to_string())?;
    let choice = ffai::tools::parse_tool_choice(o.get("tool_choice").filter(|v| !v.is_null()), &specs)
        .map_err(|e| e.message().to_string())?;
    let parallel = match o.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "\"parallel_tool_calls\" must be a boolean, not {}",
                kind(other)
            ))
        }
    };
    Ok(Some((specs, choice, parallel)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub fn cmd_batch(a: BatchArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let cfg = a.engine.config(&model)?;
    let file = std::fs::File::open(&a.input).map_err(|e| Error::new(format!("{}: {e}", a.input.display())))?;
    let mut defaults = a.sampling.apply(model.default_parameters());
    defaults.response_format = a.sampling.response_format()?;
    // Whether chat answers may open with a reasoning block (Qwen3, DeepSeek-R1, gpt-oss
    // templates): the template read once. A template that does not load fails the chat
    // lines that need it, not this.
    let template = model
        .chat_template()
        .ok()
        .flatten()
        .map(|t| ffai::tools::ToolTemplate::detect(t.source()));
    // Every line is read, parsed, rendered, tokenized and checked before any work starts.
    let mut jobs = Vec::new();
    let mut line_numbers = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        let got = std::io::Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::new(format!("{}: {e}", a.input.display())))?;
        if got == 0 {
            break;
        }
        n += 1;
        if buf.len() > MAX_LINE_BYTES {
            return Err(Error::new(format!("line {n}: longer than {MAX_LINE_BYTES} bytes")));
        }
        if n > MAX_LINES {
            return Err(Error::new(format!("more than {MAX_LINES} lines")));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| Error::new(format!("line {n}: not UTF-8")))?;
        if line.trim().is_empty() {
            continue; // blank lines (a trailing newline or two) are no requests
        }
        let job = parse_line(&model, template, line, n, a.chat, &defaults)?;
        jobs.push(job);
        line_numbers.push(n);
    }
    if jobs.is_empty() {
        return Err(Error::new(format!("{}: no requests", a.input.display())));
    }
    let mut sched = Scheduler::new(&*model.lm, &model.tokenizer, cfg)?;
    for (j, &line) in jobs.iter().zip(&line_numbers) {
        sched
            .check(&SeqRequest {
                prompt: j.prompt.clone(),
                params: j.params.clone(),
            })
            .map_err(|e| Error::new(format!("line {line}: {}", e.message())))?;
    }
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::new(format!("{}: {e}", p.display())))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sequences, {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let offered: Vec<_> = jobs.iter_mut().map(|j| j.tools.take()).collect();
    let reasoning: Vec<_> = jobs.iter().map(|j| j.reasoning).collect();
    let t0 = Instant::now();
    let results = run_all(&mut sched, jobs, |done, generated| {
        bar.set_position(done as u64);
        bar.set_message(format!(
            "{:.1} tok/s",
            generated as f64 / t0.elapsed().as_secs_f64().max(1e-9)
        ));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let (mut prompt_tokens, mut gen_tokens, mut cached) = (0, 0, 0);
    for (i, c) in results.iter().enumerate() {
        prompt_tokens += c.prompt_tokens;
        gen_tokens += c.token_ids.len();
        cached += c.cached_tokens;
        let mut line = json!({
            "index": i,
            "text": c.text,
            "token_ids": c.token_ids,
            "finish_reason": c.finish_reason.as_str(),
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.token_ids.len(),
        });
        if let Some(r) = reasoning[i] {
            // A thinking model's chat answer, as `ffai serve` splits it ("text" keeps it
            // whole): "content" is null when the output ended inside the block.
            let (r, content) = ffai::reasoning::split(r, &c.text);
            if let Some(r) = r {
                line["reasoning_content"] = json!(r);
            }
            line["content"] = json!(content);
        }
        if let Some((format, reasoning, names)) = &offered[i] {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            // Calls as the OpenAI API gives them (ids numbered by line and call, so a
            // rerun gives the same file); "content" is the text before them, a forced
            // call's reasoning block left out ("text" has it).
            let answer = reasoning.split(&c.text).1;
            match format.parse(answer, &names).filter(|p| !p.calls.is_empty()) {
                Some(p) => {
                    let calls: Vec<Value> = p
                        .calls
                        .iter()
                        .enumerate()
                        .map(|(k, call)| {
                            json!({"id": format!("call_{i}_{k}"), "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}})
                        })
                        .collect();
                    line["content"] = json!(p.content);
                    line["tool_calls"] = Value::Array(calls);
                    line["finish_reason"] = json!("tool_calls");
                }
                None => {
                    line["content"] = json!(answer);
                    line["tool_calls"] = json!([]);
                }
            }
        }
        writeln!(out, "{line}").map_err(|e| Error::new(format!("writing the output: {e}")))?;
    }
    out.flush()
        .map_err(|e| Error::new(format!("writing the output: {e}")))?;
    let st = sched.stats;
    eprintln!(
        "{} sequences in {secs:.2} s: {prompt_tokens} prompt tokens ({cached} from the prefix cache), {gen_tokens} generated, {:.1} generated tok/s, {:.1} tok/s in all; {} steps, {} preemptions",
        results.len(),
        gen_tokens as f64 / secs,
        (prompt_tokens - cached + gen_tokens) as f64 / secs,
        st.steps,
        st.preemptions
    );
    Ok(())
}

/// Submits every job and steps until all are done; `progress(done, generated tokens)`
/// after each step. Results in input order.
fn run_all(
    sched: &mut Scheduler<'_>,
    jobs: Vec<Job>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Completion>> {
    let n = jobs.len();
    let mut rx: Vec<Receiver<Event>> = Vec::with_capacity(n);
    for j in jobs {
        let (tx, r) = mpsc::channel();
        sched.add(
            SeqRequest {
                prompt: j.prompt,
                params: j.params,
            },
            tx,
            Arc::new(AtomicBool::new(false)),
        )?;
        rx.push(r);
    }
    let mut done: Vec<Option<Completion>> = (0..n).map(|_| None).collect();
    let (mut n_done, mut generated) = (0, 0);
    let mut idle_steps = 0;
    while n_done < n {
        // A step that runs nothing while requests remain means no progress is possible
        // (the scheduler rules it out): an error, never a spin.
        idle_steps = if sched.step()? == 0 { idle_steps + 1 } else { 0 };
        if idle_steps > 2 {
            return Err(Error::new("the scheduler made no progress with requests unfinished"));
        }
        for (i, r) in rx.iter().enumerate() {
            while let Ok(e) = r.try_recv() {
                match e {
                    Event::Token { .. } => generated += 1,
                    Event::Text(_) => {}
                    Event::Done(c) => {
                        done[i] = Some(c);
                        n_done += 1;
                    }
                }
            }
        }
        progress(n_done, generated);
        if sched.is_idle() && n_done < n {
            return Err(Error::new("the scheduler stopped with requests unfinished"));
        }
    }
    Ok(done.into_iter().map(|c| c.expect("every request finished")).collect())
}

/// One run of [`bench_sequences`].
pub struct SequencesRun {
    /// Prefill tok/s (every sequence's prompt).
    pub prefill: f64,
    /// Aggregate decode tok/s.
    pub decode: f64,
    /// Decode steps.
    pub steps: u64,
    /// Seconds of the decode phase spent in the model's forward calls.
    pub forward_secs: f64,
    /// The decode phase's seconds.
    pub decode_secs: f64,
}

/// `ffai bench --sequences N`: N sequences of `prompt_tokens` (distinct random tokens, so
/// no prefix is shared), prefilled and then decoded `gen_tokens` each, all at once; with
/// `--profile`, the device's op profile then covers the decode phase only.
pub fn bench_sequences(
    model: &Model,
    engine: &EngineArgs,
    n: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    seed: u64,
) -> Result<SequencesRun> {
    let bs = ffai::models::one_seq::DEFAULT_BLOCK_SIZE;
    let len = prompt_tokens + gen_tokens + 1;
    let mut args = engine.clone();
    args.max_sequences = n;
    if args.kv_cache_size.is_none() {
        // Room for every sequence at once: no preemption in a throughput measurement.
        args.kv_cache_size = Some(((len.div_ceil(bs) + 1) * bs * n).to_string());
    }
    if args.context.is_none() {
        args.context = Some(len.min(model.lm.config().max_position_embeddings));
    }
    let cfg = args.config(model)?;
    let mut sched = Scheduler::new(&*model.lm, &model.tokenizer, cfg)?;
    let vocab = model.lm.config().vocab_size as u64;
    let mut rng = ffai::generate::Rng::new(seed);
    let mut rx = Vec::with_capacity(n);
    let params = GenerationParameters {
        max_tokens: gen_tokens + 1,
        temperature: 0.0,
        stop_on_eos: false,
        ..GenerationParameters::default()
    };
    for _ in 0..n {
        let prompt: Vec<u32> = (0..prompt_tokens).map(|_| (rng.next_u64() % vocab) as u32).collect();
        let (tx, r) = mpsc::channel();
        sched.add(
            SeqRequest {
                prompt,
                params: params.clone(),
            },
            tx,
            Arc::new(AtomicBool::new(false)),
        )?;
        rx.push(r);
    }
    // Prefill: until every sequence has its first token. Decode: the rest.
    let t0 = Instant::now();
    let mut first = vec![false; n];
    let (mut n_first, mut n_done) = (0, 0);
    let mut t_prefill = 0.0;
    let mut decoded_after = 0usize;
    let mut steps_at_prefill = 0;
    let mut forward_at_prefill = 0.0;
    while n_done < n {
        if sched.step()? == 0 && sched.is_idle() {
            break;
        }
        // Tokens of a step count as decode only when every prefill ended before it.
        let decoding = n_first == n;
        for (i, r) in rx.iter().enumerate() {
            while let Ok(e) = r.try_recv() {
                match e {
                    Event::Token { .. } if !first[i] => {
                        first[i] = true;
                        n_first += 1;
                    }
                    Event::Token { .. } if decoding => decoded_after += 1,
                    Event::Done(_) => n_done += 1,
                    _ => {}
                }
            }
        }
        if !decoding && n_first == n {
            t_prefill = t0.elapsed().as_secs_f64();
            steps_at_prefill = sched.stats.steps;
            forward_at_prefill = sched.stats.forward_secs;
            let _ = model.device.take_profile();
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let pp = (n * prompt_tokens) as f64 / t_prefill.max(1e-9);
    let tg = decoded_after as f64 / (total - t_prefill).max(1e-9);
    Ok(SequencesRun {
        prefill: pp,
        decode: tg,
        steps: sched.stats.steps - steps_at_prefill,
        forward_secs: sched.stats.forward_secs - forward_at_prefill,
        decode_secs: total - t_prefill,
    })
}
