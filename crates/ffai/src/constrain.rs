//! Constrained decoding: output that must match a JSON schema, be a JSON object, match a
//! regular expression or follow a Lark grammar.
//!
//! The grammar engine is `llguidance` (the one behind llama.cpp's and vLLM's guidance
//! backends): it walks a token trie of the vocabulary against an Earley parser and gives,
//! at each step, the set of tokens that keep the output inside the grammar. We only
//! adapt it: the tokenizer's token bytes become its trie (built once per tokenizer,
//! [`Tokenizer::grammar_factory`]), the sampler sets every disallowed logit to −∞ before
//! it samples (greedy and sampled alike), and the chosen token advances the parser.
//!
//! End of generation: the model's end-of-generation ids are the grammar's EOS, allowed
//! only where the grammar may end; once it is complete, only they are. A state that
//! allows no token at all is an error for the sequence (never a hang).

use std::sync::{mpsc, Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What the output must be (the OpenAI `response_format`, plus regex and Lark).
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// Text in this Lark-style grammar (llguidance's dialect).
    Lark(String),
}

impl ResponseFormat {
    /// The llguidance grammar. JSON is written compactly with one space after `,` and
    /// `:` (no free whitespace: small models otherwise fill it with newlines).
    fn grammar(&self) -> TopLevelGrammar {
        let layout = serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        });
        let with_layout = |mut schema: serde_json::Value| {
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("x-guidance").or_insert(layout.clone());
            }
            schema
        };
        match self {
            ResponseFormat::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(serde_json::json!({"type": "object"})))
            }
            ResponseFormat::JsonSchema(s) => TopLevelGrammar::from_json_schema(with_layout(s.clone())),
            ResponseFormat::Regex(r) => TopLevelGrammar::from_regex(r),
            ResponseFormat::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// Builds the vocabulary trie and the parser factory for `tok`: each token's bytes
/// (special tokens marked as llguidance expects, so text never spells them), the
/// end-of-generation ids as EOS.
pub(crate) fn new_factory(tok: &Tokenizer) -> std::result::Result<Arc<ParserFactory>, String> {
    let n = tok.vocab_size();
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| {
            if tok.is_special(id) {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(tok.token_text(id).unwrap_or("").as_bytes());
                w
            } else {
                tok.token_bytes(id)
            }
        })
        .collect();
    let eog = tok.eog_ids();
    let eos = eog
        .first()
        .copied()
        .or(tok.eos_id())
        .ok_or("the tokenizer has no end-of-generation token")?;
    let info = TokRxInfo::new(n as u32, eos);
    let mut trie = TokTrie::from(&info, &words);
    if !eog.is_empty() {
        trie = trie.with_eos_tokens(eog);
    }
    let env: Arc<dyn TokenizerEnv + Sync> = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("grammar engine: {e}"))?;
    factory.quiet();
    Ok(Arc::new(factory))
}

/// One sequence's grammar state.
///
/// The next step's mask is computed off the decode thread: feeding a token hands the
/// parser to a worker ([`mask_pool`]), which computes the following mask while the model
/// runs the next forward; [`mask`](Self::mask) then collects it. On a GPU the forward
/// leaves the CPU idle, so the mask costs nothing the step does not already wait for; on
/// the CPU it still overlaps the memory-bound parts of the step. Results are the same as
/// computing inline: the same parser sees the same tokens in the same order.
pub struct Constraint {
    state: State,
    eog: Vec<u32>,
    /// Whether the parser had stopped after the last token fed (kept here so that asking
    /// does not wait for the worker).
    stopped: bool,
}

type MaskResult = std::result::Result<SimpleVob, String>;

enum State {
    /// The parser is here, with the next mask if already computed.
    Here(Box<Matcher>, Option<MaskResult>),
    /// A worker holds the parser and sends it back with the next mask.
    Away(mpsc::Receiver<(Box<Matcher>, MaskResult)>),
    /// The worker died without sending the parser back (a panic inside the grammar
    /// engine): every later step is an error.
    Lost,
}

impl Constraint {
    /// A fresh parser for `format` over `tok`'s vocabulary; a grammar or schema that does
    /// not compile is an error naming the problem. The first mask starts computing at
    /// once (it overlaps the prefill).
    pub fn new(tok: &Tokenizer, format: &ResponseFormat) -> Result<Constraint> {
        let factory = tok.grammar_factory()?;
        let matcher = Matcher::new(factory.create_parser(format.grammar()));
        if let Some(e) = matcher.get_error() {
            return Err(Error::new(format!("invalid response format: {}", first_line(&e))));
        }
        let stopped = matcher.is_stopped();
        let mut c = Constraint {
            state: State::Here(Box::new(matcher), None),
            eog: tok.eog_ids().to_vec(),
            stopped,
        };
        c.send_away();
        Ok(c)
    }

    /// Hands the parser to a worker to compute the next mask (inline when no worker can
    /// be had).
    fn send_away(&mut self) {
        let State::Here(m, None) = std::mem::replace(&mut self.state, State::Lost) else {
            unreachable!("send_away is called with the parser here and no mask")
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job = move || {
            let mut m = m;
            let r = compute_mask(&mut m);
            // The sequence may be gone (cancelled); then nobody wants the result.
            let _ = tx.send((m, r));
        };
        let job: Job = Box::new(job);
        let unsent = match mask_pool() {
            Some(pool) => pool.submit(job),
            None => Err(job),
        };
        match unsent {
            Ok(()) => self.state = State::Away(rx),
            Err(job) => {
                // No worker: the job runs here, now.
                job();
                self.state = match rx.recv() {
                    Ok((m, r)) => State::Here(m, Some(r)),
                    Err(_) => State::Lost,
                };
            }
        }
    }

    /// The parser, back from the worker if it is away, with its pending mask.
    fn here(&mut self) -> Result<(&mut Matcher, &mut Option<MaskResult>)> {
        if let State::Away(rx) = &self.state {
            self.state = match rx.recv() {
                Ok((m, r)) => State::Here(m, Some(r)),
                Err(_) => State::Lost,
            };
        }
        match &mut self.state {
            State::Here(m, r) => Ok((m, r)),
            _ => Err(Error::new("grammar: the grammar engine failed")),
        }
    }

    /// Sets every logit the grammar does not allow next to −∞ (ids past the tokenizer's
    /// vocabulary included). Err when nothing is allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let (m, pending) = self.here()?;
        let mask = match pending.take() {
            Some(r) => r,
            None => compute_mask(m),
        }
        .map_err(|e| Error::new(format!("grammar: {e}")))?;
        // Word by word: whole words allowed (free text) or refused (most of a vocabulary
        // under a strict grammar) cost one compare for 32 logits.
        let width = logits.len();
        let mut any = false;
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = allowed_word(&mask, w, width);
            any |= bits != 0;
            match bits {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                _ => {
                    for (i, l) in chunk.iter_mut().enumerate() {
                        if bits >> i & 1 == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        if !any {
            return Err(Error::new("the grammar allows no token here"));
        }
        Ok(())
    }

    /// The allowed tokens next, as the bitmask of a row of `width` logits that
    /// `Backend::top_candidates_rows` takes: `out` (`width.div_ceil(32)` words) gets bit
    /// `t % 32` of word `t / 32` set when token `t` is allowed — the tokens
    /// [`mask`](Self::mask) leaves alone (ids past the tokenizer's vocabulary refused).
    /// The mask stays pending, so a [`mask`](Self::mask) of the same step (the whole row,
    /// when the candidates did not decide) uses it rather than computing it again. Err
    /// (with `out` all zero) when nothing is allowed or the grammar engine failed.
    pub fn mask_words(&mut self, width: usize, out: &mut [u32]) -> Result<()> {
        assert!(
            out.len() >= width.div_ceil(32),
            "mask_words: {} words for {width} ids",
            out.len()
        );
        out.fill(0);
        let (m, pending) = self.here()?;
        let mask = pending.get_or_insert_with(|| compute_mask(m));
        let mask = mask.as_ref().map_err(|e| Error::new(format!("grammar: {e}")))?;
        let mut any = false;
        for (w, o) in out[..width.div_ceil(32)].iter_mut().enumerate() {
            *o = allowed_word(mask, w, width);
            any |= *o != 0;
        }
        if !any {
            return Err(Error::new("the grammar allows no token here"));
        }
        Ok(())
    }

    /// Advances the parser past the chosen token (an end-of-generation token ends the
    /// sequence and is not fed), and starts computing the next mask.
    pub fn advance(&mut self, t: u32) -> Result<()> {
        if self.eog.contains(&t) {
            return Ok(());
        }
        let (m, pending) = self.here()?;
        // A mask computed for the step before this token is stale now.
        *pending = None;
        m.consume_token(t)
            .map_err(|e| Error::new(format!("grammar: {}", first_line(&e.to_string()))))?;
        self.stopped = m.is_stopped();
        self.send_away();
        Ok(())
    }

    /// The output is complete: only end of generation may follow.
    pub fn is_complete(&self) -> bool {
        self.stopped
    }
}

/// Word `w` of `mask` for a row of `width` ids: only the bits of ids that are both in the
/// mask and in the row count.
fn allowed_word(mask: &SimpleVob, w: usize, width: usize) -> u32 {
    let valid = mask.len().min(width).saturating_sub(w * 32).min(32);
    let word = mask.as_slice().get(w).copied().unwrap_or(0);
    match valid {
        0 => 0,
        32 => word,
        v => word & ((1u32 << v) - 1),
    }
}

fn compute_mask(m: &mut Matcher) -> MaskResult {
    m.compute_mask_or_eos()
        .map_err(|e| first_line(&e.to_string()).to_string())
}

type Job = Box<dyn FnOnce() + Send>;

/// The threads that compute grammar masks for every constrained sequence of the process
/// (so batched sequences' masks are computed side by side). They block when idle.
pub(crate) struct MaskPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl MaskPool {
    /// Queues `job`; gives it back when the queue is gone.
    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        match self.jobs.lock() {
            Ok(tx) => tx.send(job).map_err(|e| e.0),
            Err(_) => Err(job),
        }
    }
}

/// The process's mask workers (one per core, at most 8), started on first use; None when
/// no thread can be started (masks are then computed inline).
fn mask_pool() -> Option<&'static MaskPool> {
    static POOL: OnceLock<Option<MaskPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..n {
            let rx = Arc::clone(&rx);
            let worker = move || loop {
                // Take one job, then let go of the queue before running it.
                let job = match rx.lock() {
                    Ok(q) => match q.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                    Err(_) => return,
                };
                // A panic inside the grammar engine loses that sequence's parser (its
                // `Constraint` reports the error), not the worker.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            };
            if std::thread::Builder::new()
                .name(format!("ffai-mask-{i}"))
                .spawn(worker)
                .is_ok()
            {
                started += 1;
            }
        }
        (started > 0).then(|| MaskPool { jobs: Mutex::new(tx) })
    })
    .as_ref()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl ResponseFormat {
    /// The OpenAI API's `response_format` object: `{"type": "text"}` (no constraint),
    /// `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name": ...,
    /// "schema": {...}, "strict": ...}}`; and ours, `{"type": "regex", "regex": "..."}`
    /// and `{"type": "grammar", "grammar": "..."}` (Lark). Errors say what is wrong.
    pub fn from_openai(v: &serde_json::Value) -> Result<Option<ResponseFormat>> {
        let bad = |m: &str| Err(Error::new(format!("response_format: {m}")));
        let Some(o) = v.as_object() else {
            return bad("must be an object");
        };
        let text = |k: &str| match o.get(k) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(Error::new(format!("response_format: \"{k}\" must be a string"))),
        };
        match o.get("type").and_then(|t| t.as_str()) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
            Some("json_schema") => {
                let Some(js) = o.get("json_schema").and_then(|j| j.as_object()) else {
                    return bad("\"json_schema\" must be an object with a \"schema\"");
                };
                match js.get("schema") {
                    Some(s @ serde_json::Value::Object(_)) | Some(s @ serde_json::Value::Bool(_)) => {
                        Ok(Some(ResponseFormat::JsonSchema(s.clone())))
                    }
                    _ => bad("\"json_schema.schema\" must be a JSON schema object"),
                }
            }
            Some("regex") => Ok(Some(ResponseFormat::Regex(text("regex")?))),
            Some("grammar") => Ok(Some(ResponseFormat::Lark(text("grammar")?))),
            Some(other) => bad(&format!(
                "unknown type \"{other}\" (text, json_object, json_schema, regex, grammar)"
            )),
            None => bad("needs a \"type\""),
        }
    }
}
