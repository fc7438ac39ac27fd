//! `ffai chat`: an interactive multi-turn conversation. Each turn renders the whole
//! conversation with the model's chat template and hands it to one `Session`, which
//! prefills only what follows the longest prefix already in its KV cache.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use rustyline::error::ReadlineError;

use ffai::chat::Message;
use ffai::generate::{GenerationOutput, Session, StopReason, TextKind};
use ffai::{Error, Result};

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
        match self {
            Input::Editor(ed, mode) => match ed.readline(PROMPT) {
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
    // Fail now, not at the first message, when there is no template.
    model.render_chat(&[Message::user("")], true)?;
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
        conv.push(Message::user(line.clone()));
        let prompt = model.render_chat(&conv, true)?;
        let ids = model.encode(&prompt)?;
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        let r = session.generate(&*model.lm, &model.tokenizer, &ids, &params, |kind, piece| {
            let _ = match kind {
                TextKind::Answer => write!(stdout, "{piece}"),
                TextKind::Reasoning | TextKind::ThinkTag if out_tty => write!(stdout, "{DIM}{piece}{RESET}"),
                TextKind::Reasoning | TextKind::ThinkTag => write!(stdout, "{piece}"),
            };
            let _ = stdout.flush();
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        GENERATING.store(false, Ordering::SeqCst);
        let _ = writeln!(stdout);
        let _ = stdout.flush();
        drop(stdout);
        match r {
            Ok(out) => {
                eprintln!("{}", paint(&stats(&out), err_tty));
                // The reply as generated (think block included): the template decides
                // what of it a later turn shows.
                conv.push(Message::assistant(out.text));
            }
            Err(e) => {
                // Too long for the session, most likely: the conversation stays as it was.
                conv.pop();
                eprintln!("error: {}", e.message().replace('\n', " "));
            }
        }
    }
    Ok(())
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
