//! Continuous batching: many sequences advanced together, one [`LanguageModel::forward_batch`]
//! per step.
//!
//! Each [`Scheduler::step`]:
//! 1. drops cancelled sequences (their blocks go back at once);
//! 2. plans rows, oldest admission first, within the token budget (`max_batch_tokens`):
//!    a running sequence gets what it has not computed yet — one row when decoding, a chunk
//!    of its prompt when prefilling (chunked prefill: a long prompt takes several steps and
//!    decode rows of others run beside it). When the pool cannot give a sequence its blocks,
//!    the most recently admitted sequence is preempted: its blocks are freed (full ones stay
//!    in the prefix cache) and it goes back to the front of the queue with everything it has
//!    generated, to be recomputed later — nothing is dropped, and the oldest sequences always
//!    progress, so there is no deadlock;
//! 3. admits waiting sequences while sequence slots, budget and blocks allow, each sharing
//!    the longest run of cached blocks its tokens start with;
//! 4. lays the rows out ([`StepLayout`]: positions, per group each row's slot and each
//!    sequence's block table), runs the forward, commits the rows to the pool (full blocks
//!    join the prefix cache), and samples the next token of every sequence whose rows
//!    reached its end, with that sequence's own sampler and RNG;
//! 5. retires finished sequences (end of generation, stop token or string, length,
//!    cancellation) and frees their blocks.
//!
//! Batch invariance: a row's logits depend only on its token, position and its own
//! sequence's K/V (the kernels compute each row the same way whatever the batch holds, and
//! attention folds positions in spans fixed by absolute position), and a sequence samples
//! with its own RNG, so its tokens are the same alone or among 64 others, across chunking,
//! preemption and prefix-cache hits.
//!
//! Nothing tensor-sized is allocated after [`Scheduler::new`]: the KV pools, activations,
//! step metadata, logits and every sequence's token buffer (at submission) are sized once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use ffai_kernels::backend::{GroupLayout, SeqRows, StepLayout};

use super::kv_pool::{GroupSpec, KvPool, KvPoolConfig, SeqId};
use crate::error::{Error, Result};
use crate::generate::{CandidatePlan, GenerationParameters, SampleScratch, Sampler, StopScanner};
use crate::inspect::Tap;
use crate::models::one_seq::{ring_blocks, DEFAULT_BLOCK_SIZE};
use crate::models::{BatchShape, BatchState, LanguageModel};
use crate::models::{CandidateOut, RowMasks, StepOut};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{bail, ensure};

/// How big the KV pool is: a number of token positions, or bytes of K/V memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheSize {
    Tokens(usize),
    Bytes(u64),
}

impl KvCacheSize {
    /// `"4096"` (tokens), `"512MiB"`, `"2GiB"`, `"1.5G"`, `"800M"`, `"64KiB"`.
    pub fn parse(s: &str) -> Result<KvCacheSize> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let mult: u64 = match unit.as_str() {
            "" | "t" | "tok" | "tokens" => {
                let n: usize = num.parse().map_err(|_| {
                    Error::new(format!(
                        "bad KV cache size \"{s}\": a token count must be a whole number"
                    ))
                })?;
                ensure!(n > 0, "the KV cache size must be more than 0");
                return Ok(KvCacheSize::Tokens(n));
            }
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => bail!("bad KV cache size \"{s}\": use a token count or a size in KiB, MiB or GiB"),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| Error::new(format!("bad KV cache size \"{s}\"")))?;
        let bytes = v * mult as f64;
        ensure!(
            bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(62),
            "bad KV cache size \"{s}\""
        );
        Ok(KvCacheSize::Bytes(bytes as u64))
    }
}

/// What an engine is sized for; nothing grows afterwards.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most token rows in one step (decode rows plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the shared KV pool (all KV groups draw from it).
    pub kv_blocks: usize,
    /// KV groups of the model (layers sharing an attention window): a position of every
    /// layer takes one block slot per group.
    pub kv_groups: usize,
    /// Longest sequence (prompt plus generated tokens).
    pub context: usize,
    pub prefix_caching: bool,
}

/// The default pool when no `--kv-cache-size` is given: every sequence at the full
/// context, but no more than this much K/V memory (and never less than one full-context
/// sequence).
const DEFAULT_KV_BYTES: u64 = 2 << 30;

impl EngineConfig {
    /// A config for `lm`: `max_seqs` sequences of up to `context` tokens, the pool sized by
    /// `kv` (or the default above), `max_batch_tokens` per step.
    pub fn for_model(
        lm: &dyn LanguageModel,
        context: usize,
        max_seqs: usize,
        max_batch_tokens: usize,
        kv: Option<KvCacheSize>,
    ) -> Result<EngineConfig> {
        ensure!(context > 0, "the context must be at least 1 token");
        ensure!(
            (1..=super::MAX_SEQUENCES).contains(&max_seqs),
            "--max-sequences must be 1..={}",
            super::MAX_SEQUENCES
        );
        ensure!(
            (1..=super::MAX_BATCH_TOKENS).contains(&max_batch_tokens),
            "--max-batch-tokens must be 1..={}",
            super::MAX_BATCH_TOKENS
        );
        let bs = DEFAULT_BLOCK_SIZE;
        let per_block: u64 = lm.kv_block_bytes(bs).iter().sum::<u64>().max(1);
        let windows = lm.kv_windows();
        let one_seq_blocks = blocks_for_len(&windows, context, max_batch_tokens, bs);
        let kv_blocks = match kv {
            // Room for `t` positions in every layer: a block per group per `bs` positions.
            Some(KvCacheSize::Tokens(t)) => t.div_ceil(bs).saturating_mul(windows.len().max(1)),
            Some(KvCacheSize::Bytes(b)) => (b / per_block) as usize,
            None => {
                let want = (max_seqs as u64).saturating_mul(one_seq_blocks as u64);
                want.min(DEFAULT_KV_BYTES / per_block).max(one_seq_blocks as u64) as usize
            }
        };
        ensure!(
            kv_blocks >= 1,
            "the KV cache is smaller than one block of {bs} positions ({per_block} bytes)"
        );
        ensure!(
            (kv_blocks as u64).saturating_mul(per_block) <= lm.memory_bytes(),
            "a KV cache of {kv_blocks} blocks ({:.1} GiB) exceeds the memory here",
            (kv_blocks as u64 * per_block) as f64 / (1u64 << 30) as f64
        );
        Ok(EngineConfig {
            max_seqs,
            max_batch_tokens,
            block_size: bs,
            kv_blocks,
            kv_groups: windows.len().max(1),
            context,
            prefix_caching: true,
        })
    }

    /// Positions of K/V (in every layer) the pool holds: blocks × block size / groups.
    pub fn kv_tokens(&self) -> usize {
        self.kv_blocks * self.block_size / self.kv_groups.max(1)
    }
}

/// Blocks (over all groups) a sequence of `len` positions can hold at once: every block
/// of a global group; for a window group at most those one step of `step_rows` can read
/// and write (the same ring a one-sequence state gives it).
fn blocks_for_len(windows: &[usize], len: usize, step_rows: usize, bs: usize) -> usize {
    windows
        .iter()
        .map(|&w| ring_blocks(w, len, step_rows.min(len), bs))
        .sum()
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    /// Sampling, `max_tokens`, seed, stop ids and strings (`prefill_step_size` is unused:
    /// the engine's token budget decides the chunks).
    pub params: GenerationParameters,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End of generation, a stop token or a stop string.
    Stop,
    /// `max_tokens` generated, or the context is full.
    Length,
    Cancelled,
    /// The output's grammar allowed no token (or refused the one chosen): the message.
    Error(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error(_) => "error",
        }
    }
}

/// A finished sequence.
#[derive(Clone, Debug)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    /// The generated text, a stop string (and what followed it) removed.
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt positions that came from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Times the sequence was preempted and recomputed.
    pub preemptions: usize,
}

/// What a request's receiver gets: each generated token with the text it settled (may be
/// empty while a multi-byte character or a possible stop string is pending), then `Done`.
#[derive(Clone, Debug)]
pub enum Event {
    Token {
        id: u32,
        text: String,
        /// With `GenerationParameters::logprobs`: its log-probability and the top ones.
        logprob: Option<crate::generate::TokenLogprobs>,
    },
    /// Text released at the end without a new token (held back for a stop string that
    /// never came, or an incomplete character).
    Text(String),
    Done(Completion),
}

/// Counters over the scheduler's life.
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedulerStats {
    pub steps: u64,
    pub rows: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
    /// Seconds spent in the model's forward calls (on a GPU: enqueueing the step and
    /// waiting for its outputs); the rest of a step's wall time is the scheduler's own.
    pub forward_secs: f64,
    /// Sampled tokens decided from their rows' top candidates alone (`StepOut::Candidates`:
    /// the whole row never came back), grammar-constrained ones included.
    pub candidate_rows: u64,
}

struct Seq<'m> {
    /// Prompt, then generated tokens (capacity for the longest it may get).
    tokens: Vec<u32>,
    n_prompt: usize,
    /// `tokens.len()` may not pass this (prompt + max_tokens, at most the context).
    max_len: usize,
    params: GenerationParameters,
    sampler: Sampler,
    decoder: StreamDecoder<'m>,
    stops: StopScanner,
    pool_seq: Option<SeqId>,
    cached_tokens: Option<usize>,
    preemptions: usize,
    events: Sender<Event>,
    cancel: Arc<AtomicBool>,
    finished: Option<FinishReason>,
}

/// The synchronous core: callers add requests and call [`step`](Self::step) until
/// [`is_idle`](Self::is_idle). [`super::Engine`] runs one on its own thread.
pub struct Scheduler<'m> {
    lm: &'m dyn LanguageModel,
    tok: &'m Tokenizer,
    cfg: EngineConfig,
    windows: Vec<usize>,
    /// For models with recurrent layers: their scan's chunk (0: none). Prefill steps of
    /// such a sequence end on its multiples, at the sequence's snapshot point or at its
    /// last token, so its rows are cut the same way in any batch.
    scan_chunk: Option<usize>,
    pool: KvPool,
    batch: BatchState,
    waiting: VecDeque<Seq<'m>>,
    /// In admission order (the newest last: the first to be preempted).
    running: Vec<Seq<'m>>,
    /// This step's rows: (index into `running`, rows).
    plan: Vec<(usize, usize)>,
    layout: StepLayout,
    step_tokens: Vec<u32>,
    logit_rows: Vec<u32>,
    logits: Vec<f32>,
    /// The rows' argmax ids, for steps whose every sampled sequence is plain greedy.
    argmax_ids: Vec<u32>,
    /// Steps whose every sampled sequence can decide from candidates
    /// (`Sampler::candidate_plan`): the rows' plans and what the step writes back.
    cands: Candidates,
    /// The samplers' shared working buffers (they run one after another).
    sample_scratch: SampleScratch,
    next_id: u64,
    pub stats: SchedulerStats,
}

/// A sequence's next token: still to be sampled from its logits row, or the argmax
/// the step already took (plain greedy sequences).
enum Picked<'a> {
    Row(&'a mut [f32]),
    Id(u32),
    /// The row's `k` candidates and its tail mass.
    Candidates(usize, &'a [u32], &'a [f32], f64),
}

/// The buffers of a candidates step (sized by its rows and `k`, at most
/// `max_seqs × MAX_CANDIDATES`).
#[derive(Default)]
struct Candidates {
    k: usize,
    plans: Vec<CandidatePlan>,
    /// Each logit row's sequence (index into `running`): where a masked row's grammar is.
    seqs: Vec<usize>,
    ids: Vec<u32>,
    vals: Vec<f32>,
    tail: Vec<f64>,
    full: Vec<bool>,
    /// A pass's grammar masks (`RowMasks::words`).
    mask_words: Vec<u32>,
}

impl<'m> Scheduler<'m> {
    pub fn new(lm: &'m dyn LanguageModel, tok: &'m Tokenizer, cfg: EngineConfig) -> Result<Scheduler<'m>> {
        let windows = lm.kv_windows();
        // Recurrent layers: a state slot per running sequence, and as many for kept
        // states (prefix caching; see `kv_pool`).
        let recurrent = lm.recurrent_state();
        ensure!(!windows.is_empty(), "the model has no KV groups to page");
        let bs = cfg.block_size;
        ensure!(bs > 0 && cfg.kv_blocks > 0 && cfg.max_seqs > 0, "an empty engine");
        let stride = cfg.context.div_ceil(bs);
        let max_table = stride.checked_mul(cfg.max_seqs).filter(|&t| t < u32::MAX as usize);
        let Some(max_table) = max_table else {
            bail!(
                "{} sequences of {} tokens exceed the block tables' range",
                cfg.max_seqs,
                cfg.context
            );
        };
        let pool = KvPool::new(KvPoolConfig {
            n_blocks: cfg.kv_blocks,
            block_size: bs,
            groups: windows
                .iter()
                .map(|&w| {
                    if w == 0 {
                        GroupSpec::GLOBAL
                    } else {
                        GroupSpec::sliding(w)
                    }
                })
                .collect(),
            max_seqs: cfg.max_seqs,
            max_seq_len: cfg.context,
            n_state_slots: if recurrent.is_some() { cfg.max_seqs } else { 0 },
            n_snapshots: if recurrent.is_some() && cfg.prefix_caching {
                cfg.max_seqs
            } else {
                0
            },
            prefix_caching: cfg.prefix_caching,
            model_fingerprint: fingerprint(lm),
        })?;
        let rows = cfg.max_batch_tokens.max(cfg.max_seqs);
        let logit_rows = cfg.max_seqs.min(64);
        let batch = lm.new_batch(&BatchShape {
            max_rows: rows,
            max_seqs: cfg.max_seqs,
            max_table,
            block_size: bs,
            group_blocks: vec![cfg.kv_blocks; windows.len()],
            max_seq_len: cfg.context,
            max_logit_rows: logit_rows,
            state_slots: pool.total_state_slots(),
        })?;
        let vocab = lm.config().vocab_size;
        let logits_len = cfg
            .max_seqs
            .checked_mul(vocab)
            .filter(|&n| (n as u64) * 4 <= lm.memory_bytes());
        let Some(logits_len) = logits_len else {
            bail!("the logits of {} sequences exceed the memory here", cfg.max_seqs);
        };
        let layout = StepLayout {
            positions: Vec::with_capacity(rows),
            groups: windows
                .iter()
                .map(|&w| GroupLayout {
                    block_size: bs as u32,
                    n_blocks: cfg.kv_blocks as u32,
                    window: w as u32,
                    slots: Vec::with_capacity(rows),
                    seqs: Vec::with_capacity(cfg.max_seqs),
                    block_tables: Vec::with_capacity(max_table),
                })
                .collect(),
            state_slots: Vec::with_capacity(cfg.max_seqs),
            n_state_slots: pool.total_state_slots() as u32,
        };
        Ok(Scheduler {
            lm,
            tok,
            windows,
            scan_chunk: recurrent.map(|r| r.scan_chunk),
            pool,
            batch,
            waiting: VecDeque::new(),
            running: Vec::with_capacity(cfg.max_seqs),
            plan: Vec::with_capacity(cfg.max_seqs),
            layout,
            step_tokens: Vec::with_capacity(rows),
            logit_rows: Vec::with_capacity(cfg.max_seqs),
            logits: vec![0.0; logits_len],
            argmax_ids: Vec::with_capacity(cfg.max_seqs),
            cands: Candidates::default(),
            sample_scratch: SampleScratch::with_vocab(vocab),
            next_id: 0,
            stats: SchedulerStats::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Checks a request against the model and the pool: a clear error now instead of a
    /// sequence that can never run.
    pub fn check(&self, req: &SeqRequest) -> Result<()> {
        check_request(self.lm, &self.cfg, &self.windows, req)
    }

    /// Queues a request; its events go to `events`. Setting `cancel` ends it at the next
    /// step (as does dropping the receiver).
    pub fn add(&mut self, req: SeqRequest, events: Sender<Event>, cancel: Arc<AtomicBool>) -> Result<u64> {
        self.add_compiled(req, None, events, cancel)
    }

    /// [`Scheduler::add`] with the request's `response_format` already compiled (by
    /// `constrain::Constraint::new` over this tokenizer); None compiles it here.
    pub fn add_compiled(
        &mut self,
        req: SeqRequest,
        constraint: Option<crate::constrain::Constraint>,
        events: Sender<Event>,
        cancel: Arc<AtomicBool>,
    ) -> Result<u64> {
        self.check(&req)?;
        let SeqRequest { prompt, params } = req;
        let mut sampler = Sampler::new(&params);
        match constraint {
            Some(c) if params.response_format.is_some() => sampler.set_constraint(c),
            _ => sampler.constrain(self.tok)?,
        }
        let max_len = prompt.len().saturating_add(params.max_tokens).min(self.cfg.context);
        let mut tokens = Vec::with_capacity(max_len);
        tokens.extend_from_slice(&prompt);
        let id = self.next_id;
        self.next_id += 1;
        if params.max_tokens == 0 {
            let _ = events.send(Event::Done(Completion {
                token_ids: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
                prompt_tokens: prompt.len(),
                cached_tokens: 0,
                preemptions: 0,
            }));
            return Ok(id);
        }
        self.stats.prompt_tokens += prompt.len() as u64;
        self.waiting.push_back(Seq {
            n_prompt: prompt.len(),
            tokens,
            max_len,
            sampler,
            decoder: StreamDecoder::new(self.tok),
            stops: StopScanner::new(&params.stop_strings),
            params,
            pool_seq: None,
            cached_tokens: None,
            preemptions: 0,
            events,
            cancel,
            finished: None,
        });
        Ok(id)
    }

    /// Cancels every sequence, running or waiting (they end at the next step).
    pub fn cancel_all(&mut self) {
        for s in self.running.iter().chain(self.waiting.iter()) {
            s.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// One step; returns the rows it ran (0: nothing to do).
    pub fn step(&mut self) -> Result<usize> {
        self.drop_cancelled();
        self.plan_rows()?;
        if self.plan.is_empty() {
            if self.running.is_empty() {
                if let Some(mut s) = self.waiting.pop_front() {
                    // Nothing runs and the next sequence cannot be admitted into an empty
                    // pool: `check_request` rules this out, so it is a bug. End that
                    // sequence loudly rather than spin on it forever.
                    let len = s.tokens.len();
                    s.finished = Some(FinishReason::Cancelled);
                    Self::finish(s, &mut self.stats);
                    bail!(
                        "internal error: an empty KV pool of {} blocks cannot admit a sequence of {len} tokens",
                        self.cfg.kv_blocks
                    );
                }
            }
            return Ok(0);
        }
        self.lay_out();
        let n_rows = self.step_tokens.len();
        let vocab = self.lm.config().vocab_size;
        // Steps whose sampled sequences all take the plain argmax ask for the ids only.
        let greedy = self.plan.iter().all(|&(ri, n)| {
            let s = &self.running[ri];
            let from = s.pool_seq.map_or(0, |q| self.pool.computed(q));
            from + n < s.tokens.len() || s.sampler.is_plain_greedy()
        });
        self.argmax_ids.clear();
        self.argmax_ids.resize(self.logit_rows.len(), 0);
        // Otherwise, steps whose sampled sequences all decide from candidates ask for those
        // (and get whole rows back only where the candidates do not decide).
        let c = &mut self.cands;
        c.plans.clear();
        c.seqs.clear();
        if !greedy {
            for &(ri, n) in &self.plan {
                let s = &self.running[ri];
                let from = s.pool_seq.map_or(0, |q| self.pool.computed(q));
                if from + n < s.tokens.len() {
                    continue;
                }
                match s.sampler.candidate_plan() {
                    Some(p) => {
                        c.plans.push(p);
                        c.seqs.push(ri);
                    }
                    None => {
                        c.plans.clear();
                        break;
                    }
                }
            }
        }
        let use_cands = !c.plans.is_empty() && c.plans.len() == self.logit_rows.len();
        if use_cands {
            let rows = c.plans.len();
            c.k = c.plans.iter().map(|p| p.k()).max().unwrap_or(1);
            c.ids.resize(rows * c.k, 0);
            c.vals.resize(rows * c.k, 0.0);
            c.tail.resize(rows, 0.0);
            c.full.resize(rows, false);
        }
        // A masked (constrained) row's grammar mask is asked for at the LM head, from its
        // sequence's sampler, so it is computed beside the forward.
        let running = &mut self.running;
        let seqs = &c.seqs;
        let mut fill = |r: usize, words: &mut [u32]| running[seqs[r]].sampler.candidate_mask(vocab, words);
        let out = if greedy {
            StepOut::Argmax(&mut self.argmax_ids)
        } else if use_cands {
            let rows = c.plans.len();
            let masked = c.plans.iter().any(|p| p.masked);
            StepOut::Candidates(CandidateOut {
                k: c.k,
                plans: &c.plans,
                ids: &mut c.ids[..rows * c.k],
                vals: &mut c.vals[..rows * c.k],
                tail: &mut c.tail[..rows],
                full: &mut c.full[..rows],
                rows: &mut self.logits[..rows * vocab],
                masks: masked.then_some(RowMasks {
                    fill: &mut fill,
                    words: &mut c.mask_words,
                }),
            })
        } else {
            StepOut::Logits(&mut self.logits[..self.logit_rows.len() * vocab])
        };
        let mut tap = Tap::default();
        let t_forward = std::time::Instant::now();
        let run = self.lm.forward_batch(
            &self.step_tokens,
            &self.layout,
            &self.logit_rows,
            &mut self.batch,
            &mut tap,
            out,
        );
        if let Err(e) = run {
            // A failed forward leaves the step's rows unwritten: give their blocks back by
            // failing every sequence in it rather than continuing on stale K/V.
            let plan = std::mem::take(&mut self.plan);
            for &(ri, _) in &plan {
                self.running[ri].finished = Some(FinishReason::Cancelled);
            }
            self.plan = plan;
            self.retire();
            return Err(e);
        }
        self.stats.forward_secs += t_forward.elapsed().as_secs_f64();
        self.stats.steps += 1;
        self.stats.rows += n_rows as u64;
        // Commit and sample, in plan order (the logit rows are in that order too).
        let mut li = 0;
        for pi in 0..self.plan.len() {
            let (ri, n) = self.plan[pi];
            let s = &mut self.running[ri];
            let seq = s.pool_seq.expect("a planned sequence is in the pool");
            let from = self.pool.computed(seq);
            self.pool.commit(seq, &s.tokens[from..from + n]);
            if let Some((src, dst)) = self.pool.take_snapshot(seq) {
                self.lm.copy_state_slot(&mut self.batch, src as usize, dst as usize)?;
            }
            if from + n == s.tokens.len() {
                let c = &self.cands;
                let picked = if greedy {
                    Picked::Id(self.argmax_ids[li])
                } else if use_cands && !c.full[li] {
                    self.stats.candidate_rows += 1;
                    let k = c.k;
                    Picked::Candidates(
                        k,
                        &c.ids[li * k..(li + 1) * k],
                        &c.vals[li * k..(li + 1) * k],
                        c.tail[li],
                    )
                } else {
                    Picked::Row(&mut self.logits[li * vocab..(li + 1) * vocab])
                };
                li += 1;
                Self::sample_next(s, picked, self.tok, &mut self.sample_scratch, &mut self.stats);
            }
        }
        self.retire();
        Ok(n_rows)
    }

    /// Samples the next token of `s` from its logits row (or takes the argmax the step
    /// computed) and settles whether it ends.
    fn sample_next(
        s: &mut Seq<'m>,
        picked: Picked<'_>,
        tok: &Tokenizer,
        scratch: &mut SampleScratch,
        stats: &mut SchedulerStats,
    ) {
        let (next, logprob) = match picked {
            Picked::Row(row) => s.sampler.sample_with_logprobs(row, &s.tokens, scratch),
            Picked::Id(id) => (id, None),
            Picked::Candidates(k, ids, vals, tail) => {
                // The step wrote the whole row wherever `CandidatePlan::decides` said the
                // candidates do not decide, and that is the test this makes.
                let t = s.sampler.sample_candidates(k, ids, vals, tail, scratch);
                (
                    t.expect("the step kept the whole row of a sequence its candidates do not decide"),
                    None,
                )
            }
        };
        if let Some(e) = s.sampler.constraint_error() {
            s.finished = Some(FinishReason::Error(e.to_string()));
            return;
        }
        let p = &s.params;
        if (p.stop_on_eos && tok.eog_ids().contains(&next)) || p.stop_token_ids.contains(&next) {
            s.finished = Some(FinishReason::Stop);
            return;
        }
        s.tokens.push(next);
        stats.generated_tokens += 1;
        let (text, hit) = s.stops.push(&s.decoder.push(next));
        if s.events
            .send(Event::Token {
                id: next,
                text,
                logprob,
            })
            .is_err()
        {
            s.finished = Some(FinishReason::Cancelled);
        } else if hit || s.sampler.constraint_complete() {
            s.finished = Some(FinishReason::Stop);
        } else if s.tokens.len() - s.n_prompt >= p.max_tokens || s.tokens.len() >= s.max_len {
            s.finished = Some(FinishReason::Length);
        }
    }

    fn drop_cancelled(&mut self) {
        let mut any = false;
        for s in &mut self.running {
            if s.cancel.load(Ordering::Relaxed) {
                s.finished = Some(FinishReason::Cancelled);
                any = true;
            }
        }
        if any {
            self.plan.clear();
            self.retire();
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].cancel.load(Ordering::Relaxed) {
                let mut s = self.waiting.remove(i).unwrap();
                s.finished = Some(FinishReason::Cancelled);
                Self::finish(s, &mut self.stats);
            } else {
                i += 1;
            }
        }
    }

    /// Removes finished sequences from `running`, frees their blocks, sends `Done`.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished.is_some() {
                let s = self.running.remove(i);
                if let Some(seq) = s.pool_seq {
                    self.pool.free_sequence(seq);
                }
                Self::finish(s, &mut self.stats);
            } else {
                i += 1;
            }
        }
    }

    fn finish(mut s: Seq<'m>, stats: &mut SchedulerStats) {
        let reason = s.finished.clone().unwrap_or(FinishReason::Cancelled);
        if reason != FinishReason::Stop || !s.stops.text.is_empty() {
            // Release text held back for a stop string that never came (a stop string
            // that did come truncated the text already; flushing adds nothing then).
            let (tail, _) = s.stops.push(&s.decoder.finish());
            let rest = tail + &s.stops.flush();
            if !rest.is_empty() && reason != FinishReason::Cancelled {
                let _ = s.events.send(Event::Text(rest));
            }
        }
        stats.finished += 1;
        let token_ids = s.tokens[s.n_prompt..].to_vec();
        let _ = s.events.send(Event::Done(Completion {
            token_ids,
            text: std::mem::take(&mut s.stops.text),
            finish_reason: reason,
            prompt_tokens: s.n_prompt,
            cached_tokens: s.cached_tokens.unwrap_or(0),
            preemptions: s.preemptions,
        }));
    }

    /// Frees `running[i]` and puts it at the front of the queue to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        if let Some(seq) = s.pool_seq.take() {
            self.pool.free_sequence(seq);
        }
        s.preemptions += 1;
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Rows of a sequence at `from` with `pending` tokens to compute in a step that has
    /// `budget` rows left. A model with recurrent layers ends a step that stops short of
    /// the sequence's last token at its snapshot point or on a multiple of the scan's
    /// chunk (so the sequence's cuts do not depend on its batch); 0 when that leaves
    /// nothing and other rows are planned (it runs next step, first).
    fn rows_for(&self, seq: SeqId, from: usize, pending: usize, budget: usize) -> usize {
        let n = pending.min(budget);
        let Some(chunk) = self.scan_chunk else {
            return n;
        };
        if let Some(c) = self.pool.snapshot_point(seq) {
            if from < c && c < from + n {
                return c - from;
            }
        }
        if n == pending || chunk == 0 {
            return n;
        }
        let aligned = (from + n) / chunk * chunk;
        if aligned > from {
            aligned - from
        } else if self.plan.is_empty() {
            n
        } else {
            0
        }
    }

    /// Decides this step's rows (see the module docs), reserving their blocks.
    fn plan_rows(&mut self) -> Result<()> {
        self.plan.clear();
        let mut budget = self.cfg.max_batch_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = self.running[i].pool_seq.expect("running sequences are in the pool");
            let from = self.pool.computed(seq);
            let pending = self.running[i].tokens.len() - from;
            let n = self.rows_for(seq, from, pending, budget);
            if n == 0 {
                i += 1;
                continue;
            }
            // Make room by preempting the newest sequences, this one last.
            let mut preempted_self = false;
            while !self.pool.can_append(seq, n) {
                let victim = self.running.len() - 1;
                self.preempt(victim);
                if victim == i {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            self.pool.append(seq, n).expect("checked by can_append");
            self.plan.push((i, n));
            budget -= n;
            i += 1;
        }
        // Admit from the queue while there is room, without preempting anyone.
        while budget > 0 && self.running.len() < self.cfg.max_seqs && !self.waiting.is_empty() {
            let s = &self.waiting[0];
            let Ok((seq, cached)) = self.pool.add_sequence_with_prompt(&s.tokens) else {
                break;
            };
            let n = self.rows_for(seq, cached, s.tokens.len() - cached, budget);
            if n == 0 || !self.pool.can_append(seq, n) {
                self.pool.free_sequence(seq);
                break;
            }
            if let Some((src, dst)) = self.pool.take_restore(seq) {
                if let Err(e) = self.lm.copy_state_slot(&mut self.batch, src as usize, dst as usize) {
                    self.pool.free_sequence(seq);
                    return Err(e);
                }
            }
            self.pool.append(seq, n).expect("checked by can_append");
            let mut s = self.waiting.pop_front().unwrap();
            if s.cached_tokens.is_none() {
                s.cached_tokens = Some(cached);
                self.stats.prefix_hit_tokens += cached as u64;
            }
            s.pool_seq = Some(seq);
            self.running.push(s);
            self.plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        Ok(())
    }

    /// Fills the step's tokens, layout and logit rows from the plan.
    fn lay_out(&mut self) {
        let bs = self.cfg.block_size;
        self.step_tokens.clear();
        self.logit_rows.clear();
        self.layout.positions.clear();
        for g in &mut self.layout.groups {
            g.slots.clear();
            g.seqs.clear();
            g.block_tables.clear();
        }
        self.layout.state_slots.clear();
        for &(ri, n) in &self.plan {
            let s = &self.running[ri];
            let seq = s.pool_seq.unwrap();
            let from = self.pool.computed(seq);
            let first_row = self.step_tokens.len();
            if let Some(slot) = self.pool.state_slot(seq) {
                self.layout.state_slots.push(slot);
            }
            self.step_tokens.extend_from_slice(&s.tokens[from..from + n]);
            self.layout.positions.extend((from..from + n).map(|p| p as u32));
            if from + n == s.tokens.len() {
                self.logit_rows.push((first_row + n - 1) as u32);
            }
            for (gi, g) in self.layout.groups.iter_mut().enumerate() {
                let table = self.pool.block_table(seq, gi);
                let table_start = g.block_tables.len();
                g.block_tables.extend_from_slice(table);
                g.seqs.push(SeqRows {
                    first_row: first_row as u32,
                    n_rows: n as u32,
                    table_start: table_start as u32,
                    table_len: table.len() as u32,
                });
                g.slots
                    .extend((from..from + n).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32));
            }
        }
    }
}

/// The checks [`Scheduler::check`] makes, for callers that hold no scheduler.
pub fn check_request(lm: &dyn LanguageModel, cfg: &EngineConfig, windows: &[usize], req: &SeqRequest) -> Result<()> {
    req.params.validate()?;
    let n = req.prompt.len();
    ensure!(n > 0, "the prompt is empty (no tokens to condition on)");
    ensure!(
        n < cfg.context,
        "the prompt has {n} tokens; the context of {} leaves no room to generate",
        cfg.context
    );
    let vocab = lm.config().vocab_size;
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    let len = n.saturating_add(req.params.max_tokens.max(1)).min(cfg.context);
    let need = blocks_for_len(windows, len, cfg.max_batch_tokens, cfg.block_size);
    ensure!(
        need <= cfg.kv_blocks,
        "a sequence of {len} tokens needs {need} KV blocks of {}, more than the cache's {}; use a larger --kv-cache-size or fewer tokens",
        cfg.block_size,
        cfg.kv_blocks
    );
    Ok(())
}

/// Seeds the prefix cache's hashes with what decides a block's K/V besides its tokens.
fn fingerprint(lm: &dyn LanguageModel) -> u64 {
    let c = lm.config();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!(
        "{}/{}/{}/{}x{}/{}/{}/{}",
        lm.family(),
        lm.variant(),
        lm.device_name(),
        c.num_layers,
        c.hidden_size,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}
