//! `ffai chat`: an interactive multi-turn conversation. Each turn renders the whole
//! conversation with the model's chat template and hands it to one `Session`, which
//! prefills only what follows the longest prefix already in its KV cache.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use rustyline::error::ReadlineError;

use ffai::chat::Message;
use ffai::generate::{GenerationOutput, GenerationParameters, Session, StopReason, TextKind};
use ffai::tools::{self, Reasoning, ToolChoice, ToolSpec};
use ffai::{Error, Model, Result};

use crate::{ModelArgs, SamplingArgs};

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";
const PROMPT: &str = "> ";
/// The default conversation length, so a long-context model does not reserve its whole
/// window of KV cache for a short chat.
const DEFAULT_CONTEXT: usize = 4096;

/// Set while an answer streams; Ctrl-C then stops that answer instead of the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Tokens the conversation may hold (default: the model's context, at most 4096).
    #[arg(long)]
    context: Option<usize>,
    /// Functions the model may call: a JSON file holding an OpenAI-style `tools` list.
    /// Each call is shown and its result read as the next input line.
    #[arg(long, value_name = "FILE.json")]
    tools: Option<std::path::PathBuf>,
    /// What the model may or must do with the tools: auto (default), required (a call
    /// forced as the first reply to each message), none, or a function's name (that
    /// function forced).
    #[arg(long, value_name = "auto|required|none|NAME", requires = "tools")]
    tool_choice: Option<String>,
}

/// The offered tools and the choice, read from `--tools` and `--tool-choice`.
struct ChatTools {
    specs: Vec<ToolSpec>,
    choice: ToolChoice,
}

impl ChatTools {
    /// Reads and checks the tools file (every error one line naming the file).
    fn load(path: &std::path::Path, choice: Option<&str>, tok: &ffai::tokenizer::Tokenizer) -> Result<ChatTools> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| Error::new(format!("--tools {shown}: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::new(format!("--tools {shown}: invalid JSON: {e}")))?;
        let bad = |e: Error| Error::new(format!("--tools {shown}: {}", e.message().replace('\n', " ")));
        let specs = tools::parse_tools(&v).map_err(bad)?;
        if specs.is_empty() {
            return Err(Error::new(format!("--tools {shown}: the list is empty")));
        }
        tools::check_schemas(&specs, tok).map_err(bad)?;
        let choice = match choice {
            None | Some("auto") => ToolChoice::Auto,
            Some("none") => ToolChoice::None,
            Some("required") => ToolChoice::Required,
            Some(name) => {
                let v = serde_json::json!({"type": "function", "function": {"name": name}});
                tools::parse_tool_choice(Some(&v), &specs)
                    .map_err(|e| Error::new(format!("--tool-choice: {}", e.message())))?
            }
        };
        Ok(ChatTools { specs, choice })
    }
}

/// The terminal's mode as the program found it (cooked: Ctrl-C raises SIGINT).
#[cfg(unix)]
struct TermMode(Option<nix::sys::termios::Termios>);

#[cfg(unix)]
impl TermMode {
    fn capture() -> TermMode {
        TermMode(nix::sys::termios::tcgetattr(std::io::stdin()).ok())
    }

    /// Puts the terminal back in that mode. The line editor restores it when a line
    /// ends, but not in every case (seen with typed-ahead input), and an answer that
    /// runs in raw mode would read Ctrl-C as a byte instead of stopping.
    fn restore(&self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, t);
        }
    }
}

#[cfg(not(unix))]
struct TermMode;

#[cfg(not(unix))]
impl TermMode {
    fn capture() -> TermMode {
        TermMode
    }
    fn restore(&self) {}
}

/// Where user lines come from: a line editor on a terminal, plain lines otherwise.
enum Input {
    Editor(Box<rustyline::DefaultEditor>, TermMode),
    Lines(std::io::StdinLock<'static>),
}

enum Line {
    Text(String),
    /// Ctrl-C at the prompt: the line was dropped.
    Cleared,
    End,
}

impl Input {
    fn read(&mut self) -> Result<Line> {
        self.read_with(PROMPT)
    }

    fn read_with(&mut self, prompt: &str) -> Result<Line> {
        match self {
            Input::Editor(ed, mode) => match ed.readline(prompt) {
                Ok(l) => {
                    mode.restore();
                    if !l.trim().is_empty() {
                        let _ = ed.add_history_entry(l.as_str());
                    }
                    Ok(Line::Text(l))
                }
                Err(ReadlineError::Interrupted) => Ok(Line::Cleared),
                Err(ReadlineError::Eof) => Ok(Line::End),
                Err(e) => Err(Error::new(format!("reading the terminal: {e}"))),
            },
            Input::Lines(stdin) => {
                let mut l = String::new();
                match stdin.read_line(&mut l) {
                    Ok(0) => Ok(Line::End),
                    Ok(_) => Ok(Line::Text(l.trim_end_matches(['\n', '\r']).to_string())),
                    Err(e) => Err(Error::new(format!("reading stdin: {e}"))),
                }
            }
        }
    }
}

pub fn cmd_chat(a: ChatArgs) -> Result<()> {
    let (model, _) = a.model.load()?;
    let mut params = a.sampling.apply(model.default_parameters());
    params.response_format = a.sampling.response_format()?;
    params.validate()?;
    let ctx = model.lm.config().max_position_embeddings;
    let max_seq = match a.context {
        Some(0) => return Err(Error::new("--context must be at least 1")),
        Some(n) => n.min(ctx),
        None => ctx.min(DEFAULT_CONTEXT),
    };
    let tools = match &a.tools {
        Some(path) => Some(ChatTools::load(path, a.tool_choice.as_deref(), &model.tokenizer)?),
        None => None,
    };
    if let Some(t) = &tools {
        if params.response_format.is_some() && matches!(t.choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return Err(Error::new(
                "a forced tool call (--tool-choice required or a function) cannot be combined with a response format",
            ));
        }
    }
    // Fail now, not at the first message, when there is no template.
    model.render_chat(&[Message::user("")], true)?;
    let mut next_call = 0usize;
    let mut session = Session::new(&*model.lm, max_seq, params.prefill_step_size)?;

    let out_tty = std::io::stdout().is_terminal();
    let err_tty = std::io::stderr().is_terminal();
    let mut input = if std::io::stdin().is_terminal() {
        let mode = TermMode::capture();
        let ed = rustyline::DefaultEditor::new().map_err(|e| Error::new(format!("starting the line editor: {e}")))?;
        eprintln!("ffai chat: {} ({max_seq} tokens of context). /reset clears the conversation, /exit or Ctrl-D quits; Ctrl-C stops an answer.", model.location.path().display());
        Input::Editor(Box::new(ed), mode)
    } else {
        Input::Lines(std::io::stdin().lock())
    };

    // After the line editor is made: it installs a SIGINT handler of its own for its
    // lifetime, which this one replaces (at the prompt the editor reads Ctrl-C as a key).
    ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            INTERRUPTED.store(true, Ordering::SeqCst);
        } else {
            // Outside an answer (e.g. waiting on a pipe) Ctrl-C ends the program.
            std::process::exit(130);
        }
    })
    .map_err(|e| Error::new(format!("installing the Ctrl-C handler: {e}")))?;

    let opening: Vec<Message> = a.system.iter().map(|s| Message::system(s.clone())).collect();
    let mut conv = opening.clone();
    loop {
        let line = match input.read()? {
            Line::Text(l) => l,
            Line::Cleared => continue,
            Line::End => break,
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conv = opening.clone();
                session.tokens.clear();
                session.state.pos = 0;
                eprintln!("{}", paint("(conversation cleared)", err_tty));
                continue;
            }
            "/help" => {
                eprintln!("/reset clears the conversation and its cache; /exit (or Ctrl-D) quits.");
                continue;
            }
            _ if text.starts_with('/') && !text.contains(char::is_whitespace) => {
                eprintln!("unknown command {text}; /help lists the commands");
                continue;
            }
            _ => {}
        }
        let mark = conv.len();
        conv.push(Message::user(line.clone()));
        // The model answers; each time it calls tools, their results are read and it
        // goes on. A forced choice forces only the first reply to the message.
        let mut first = true;
        loop {
            let t = Turn {
                model: &model,
                params: &params,
                tools: tools.as_ref(),
                first,
                out_tty,
                err_tty,
            };
            match t.reply(&mut session, &mut conv, &mut next_call)? {
                Reply::Answered => break,
                Reply::Failed(e) => {
                    // Too long for the session, most likely: the conversation stays as
                    // it was before the message.
                    conv.truncate(mark);
                    eprintln!("error: {}", e.replace('\n', " "));
                    break;
                }
                Reply::Called(calls) => {
                    for (id, name) in calls {
                        let result = loop {
                            if matches!(input, Input::Lines(_)) {
                                eprintln!("(the result of {name}: one line of text or JSON)");
                            }
                            match input.read_with(&format!("{name} result> "))? {
                                Line::Text(l) => break l,
                                Line::Cleared => continue,
                                Line::End => return Ok(()),
                            }
                        };
                        conv.push(Message {
                            tool_call_id: Some(id),
                            name: Some(name),
                            ..Message::new("tool", result)
                        });
                    }
                    first = false;
                }
            }
        }
    }
    Ok(())
}

/// What one reply of the model came to.
enum Reply {
    Answered,
    /// It called tools: each call's id and function name, in order.
    Called(Vec<(String, String)>),
    Failed(String),
}

/// One reply of the model to the conversation so far.
struct Turn<'a> {
    model: &'a Model,
    params: &'a GenerationParameters,
    tools: Option<&'a ChatTools>,
    /// The first reply to the user's message (the one a forced choice forces).
    first: bool,
    out_tty: bool,
    err_tty: bool,
}

impl Turn<'_> {
    /// Renders the conversation, streams the reply (text that may begin a call held back
    /// until the reply ends), shows its calls, and adds it to `conv`.
    fn reply(&self, session: &mut Session, conv: &mut Vec<Message>, next_call: &mut usize) -> Result<Reply> {
        let model = self.model;
        let mut params = self.params.clone();
        // The tool-call format to read and the reasoning block a forced call may open with.
        let mut calls_in: Option<(tools::ToolFormat, Reasoning)> = None;
        let prompt = match self.tools {
            None => model.render_chat(conv, true)?,
            Some(t) => {
                let offer = t.choice != ToolChoice::None;
                let (text, tpl) = model.render_chat_tools(conv, &t.specs, offer)?;
                let choice = match &t.choice {
                    ToolChoice::Required | ToolChoice::Named(_) if !self.first => ToolChoice::Auto,
                    c => c.clone(),
                };
                let grammar = tools::grammar(tpl.format, tpl.reasoning, &t.specs, &choice, true, &model.tokenizer);
                let reasoning = match grammar {
                    Some(g) => {
                        params.response_format = Some(ffai::constrain::ResponseFormat::Lark(g));
                        tpl.reasoning
                    }
                    None => Reasoning::None,
                };
                if offer {
                    calls_in = Some((tpl.format, reasoning));
                }
                text
            }
        };
        let ids = model.encode(&prompt)?;
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let (out_tty, format) = (self.out_tty, calls_in.map(|c| c.0));
        let mut stdout = std::io::stdout().lock();
        // The answer's text so far, how much of it went out, and whether a call began.
        let (mut answer, mut shown, mut begun) = (String::new(), 0, false);
        let r = session.generate(&*model.lm, &model.tokenizer, &ids, &params, |kind, piece| {
            let _ = match kind {
                TextKind::Answer => match format {
                    None => write!(stdout, "{piece}"),
                    Some(f) => {
                        answer.push_str(piece);
                        if !begun {
                            let (safe, b) = f.safe_prefix(&answer, shown);
                            begun = b;
                            let r = write!(stdout, "{}", &answer[shown..safe]);
                            shown = safe;
                            r
                        } else {
                            Ok(())
                        }
                    }
                },
                TextKind::Reasoning | TextKind::ThinkTag if out_tty => write!(stdout, "{DIM}{piece}{RESET}"),
                TextKind::Reasoning | TextKind::ThinkTag => write!(stdout, "{piece}"),
            };
            let _ = stdout.flush();
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        GENERATING.store(false, Ordering::SeqCst);
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                let _ = writeln!(stdout);
                return Ok(Reply::Failed(e.message().to_string()));
            }
        };
        let Some((format, reasoning)) = calls_in else {
            let _ = writeln!(stdout);
            let _ = stdout.flush();
            drop(stdout);
            eprintln!("{}", paint(&stats(&out), self.err_tty));
            // The reply as generated (think block included): the template decides what
            // of it a later turn shows.
            conv.push(Message::assistant(out.text));
            return Ok(Reply::Answered);
        };
        let names: Vec<&str> = self
            .tools
            .into_iter()
            .flat_map(|t| &t.specs)
            .map(|t| t.name.as_str())
            .collect();
        // A forced call's reasoning block comes first; the calls are read from the rest.
        let head = reasoning.extent(&out.text).unwrap_or(out.text.len());
        let parsed = format.parse(&out.text[head..], &names).filter(|p| !p.calls.is_empty());
        let Some(parsed) = parsed else {
            let _ = writeln!(stdout, "{}", answer.get(shown..).unwrap_or(""));
            let _ = stdout.flush();
            drop(stdout);
            eprintln!("{}", paint(&stats(&out), self.err_tty));
            conv.push(Message::assistant(out.text));
            return Ok(Reply::Answered);
        };
        // The text before the calls that did not go out yet, then each call.
        let content = format
            .parse(&answer, &names)
            .and_then(|p| p.content)
            .unwrap_or_default();
        let rest = content.get(shown..).unwrap_or("");
        if shown > 0 || !rest.is_empty() {
            let _ = writeln!(stdout, "{rest}");
        }
        let mut calls = Vec::new();
        let mut history = Vec::new();
        for c in &parsed.calls {
            let _ = writeln!(stdout, "[tool call] {} {}", c.name, c.arguments);
            let id = format!("call_{next_call}");
            *next_call += 1;
            let args: serde_json::Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| serde_json::json!({}));
            history.push(serde_json::json!({"id": id, "type": "function",
                "function": {"name": c.name, "arguments": args}}));
            calls.push((id, c.name.clone()));
        }
        let _ = stdout.flush();
        drop(stdout);
        eprintln!("{}", paint(&stats(&out), self.err_tty));
        // In the history: the reasoning block and text before the calls, then the calls.
        let mut said = out.text[..head].trim_end().to_string();
        if let Some(c) = &parsed.content {
            said.push_str(c);
        }
        conv.push(Message {
            tool_calls: Some(history),
            ..Message::assistant(said)
        });
        Ok(Reply::Called(calls))
    }
}

fn paint(s: &str, tty: bool) -> String {
    if tty {
        format!("{DIM}{s}{RESET}")
    } else {
        s.to_string()
    }
}

/// One line: prompt tokens computed vs reused from the cache, and the reply.
fn stats(out: &GenerationOutput) -> String {
    let n = out.prompt_ids.len();
    let mut s = format!(
        "[prompt {n} tokens: {} computed, {} reused, {:.1} tok/s | reply {} tokens",
        out.prefill_computed,
        n - out.prefill_computed,
        out.prefill_tokens_per_s(),
        out.generated_ids.len()
    );
    if out.reasoning_tokens > 0 {
        s += &format!(" ({} reasoning, {} answer)", out.reasoning_tokens, out.answer_tokens);
    }
    s += &format!(", {:.1} tok/s", out.decode_tokens_per_s());
    match out.stop_reason {
        StopReason::Cancelled => s += " | interrupted",
        StopReason::MaxTokens => s += " | max tokens",
        StopReason::ContextFull => s += " | context full (/reset)",
        _ => {}
    }
    s + "]"
}
