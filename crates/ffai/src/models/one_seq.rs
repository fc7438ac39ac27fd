//! One sequence as a one-sequence batch: what `generate`, `chat`, `inspect`, `bench`,
//! `perplexity`, `kld` and `convert --calibration` run on. There is one forward
//! implementation, [`LanguageModel::forward_batch`]; this file only lays out a single
//! sequence's steps for it.
//!
//! A lone sequence needs no pool manager: its block tables are fixed at creation. A global
//! group's table is the identity (position `p` in block `p / bs`, blocks `0..ceil(max_seq /
//! bs)`); a sliding-window group's is a ring, position `p` in block `(p / bs) % ring`,
//! with `ring` blocks enough for everything one step reads and writes (the window behind
//! the chunk's first row plus the chunk), so its memory follows the window as the old ring
//! buffer's did. Rewinding (a chat's next turn reusing the common prefix) only moves
//! `pos`, provided the ring still holds the window before it.

use ffai_kernels::backend::{GroupLayout, SeqRows, StepLayout, NO_BLOCK};

use super::{check_tokens, BatchShape, BatchState, InferenceState, LanguageModel, StepOut};
use crate::bail;
use crate::error::{Error, Result};
use crate::inspect::Tap;

/// Positions per KV block of a one-sequence state (and the engine's default). Measured
/// with `paged_bench` (`PAGED_BENCH_BS`, 2 threads, 32/8 heads of 128): one decode row
/// over 8192 positions takes 0.93x the contiguous kernel's time with blocks of 16, 0.85x
/// with 32 and 64; at 512 and 2048 positions all three are within noise. 32 also halves
/// 16's block-table entries and leaves at most 31 positions of a sequence unused.
pub const DEFAULT_BLOCK_SIZE: usize = 32;

/// Rows of all-row logits computed per LM-head pass (bounds the logits buffer).
const LOGIT_ROWS: usize = 16;

pub(crate) struct OneSeq {
    batch: BatchState,
    /// Per group: its window and ring size in blocks (the whole table for global groups).
    groups: Vec<(usize, usize)>,
    layout: StepLayout,
    logit_rows: Vec<u32>,
}

/// Blocks a group of window `window` (0 = global) needs for a sequence of `max_seq`
/// positions computed `chunk` rows a step: a one-sequence state's ring, and the most a
/// sequence holds in the engine's pool.
pub(crate) fn ring_blocks(window: usize, max_seq: usize, chunk: usize, bs: usize) -> usize {
    let all = max_seq.div_ceil(bs);
    if window == 0 {
        all
    } else {
        // Rows read by one step: `window - 1` before the first row, plus the chunk; they
        // span at most one block more than their count needs.
        window
            .saturating_add(chunk)
            .saturating_sub(1)
            .div_ceil(bs)
            .saturating_add(1)
            .min(all)
    }
}

pub(crate) fn new_state<M: LanguageModel + ?Sized>(m: &M, max_seq: usize, chunk: usize) -> Result<InferenceState> {
    if max_seq == 0 {
        bail!("a state needs room for at least one token");
    }
    let chunk = chunk.clamp(1, max_seq);
    let bs = DEFAULT_BLOCK_SIZE;
    let groups: Vec<(usize, usize)> = m
        .kv_windows()
        .into_iter()
        .map(|w| (w, ring_blocks(w, max_seq, chunk, bs)))
        .collect();
    let table = max_seq.div_ceil(bs);
    let shape = BatchShape {
        max_rows: chunk,
        max_seqs: 1,
        max_table: table,
        block_size: bs,
        group_blocks: groups.iter().map(|g| g.1).collect(),
        max_seq_len: max_seq,
        max_logit_rows: LOGIT_ROWS.min(chunk),
        state_slots: m.recurrent_state().is_some() as usize,
    };
    let batch = m.new_batch(&shape)?;
    let layout = StepLayout {
        positions: Vec::with_capacity(chunk),
        groups: groups
            .iter()
            .map(|&(w, blocks)| GroupLayout {
                block_size: bs as u32,
                n_blocks: blocks as u32,
                window: w as u32,
                slots: Vec::with_capacity(chunk),
                seqs: Vec::with_capacity(1),
                block_tables: Vec::with_capacity(table),
            })
            .collect(),
        // A lone sequence keeps its recurrent state (if any) in slot 0.
        state_slots: if m.recurrent_state().is_some() {
            vec![0]
        } else {
            Vec::new()
        },
        n_state_slots: m.recurrent_state().is_some() as u32,
    };
    Ok(InferenceState {
        pos: 0,
        max_seq,
        chunk,
        tap: Tap::from_env(),
        inner: Box::new(OneSeq {
            batch,
            groups,
            layout,
            logit_rows: Vec::with_capacity(chunk),
        }),
    })
}

impl OneSeq {
    /// The layout of rows at positions `pos..pos + n` (no allocation: within capacity).
    fn lay_out(&mut self, pos: usize, n: usize) {
        let bs = self.batch.shape.block_size;
        let l = &mut self.layout;
        l.positions.clear();
        l.positions.extend((pos..pos + n).map(|p| p as u32));
        let entries = (pos + n).div_ceil(bs);
        for (g, &(_, ring)) in l.groups.iter_mut().zip(&self.groups) {
            g.block_tables.clear();
            g.block_tables.extend((0..entries).map(|j| (j % ring) as u32));
            g.slots.clear();
            let t = &g.block_tables;
            g.slots
                .extend((pos..pos + n).map(|p| t[p / bs] * bs as u32 + (p % bs) as u32));
            g.seqs.clear();
            g.seqs.push(SeqRows {
                first_row: 0,
                n_rows: n as u32,
                table_start: 0,
                table_len: entries as u32,
            });
        }
        debug_assert!(l.groups.iter().all(|g| !g.slots.contains(&NO_BLOCK)));
    }
}

fn inner(state: &mut InferenceState) -> Result<&mut OneSeq> {
    state
        .inner
        .downcast_mut::<OneSeq>()
        .ok_or_else(|| Error::new("inference state belongs to a different model"))
}

pub(crate) fn forward<M: LanguageModel + ?Sized>(
    m: &M,
    tokens: &[u32],
    state: &mut InferenceState,
    all_logits: bool,
    logits: &mut Vec<f32>,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::new("forward called with no tokens"));
    }
    let vocab = m.config().vocab_size;
    check_tokens(tokens, state, vocab)?;
    // Every row's logits can be far larger than the state (a long window times a 262k
    // vocabulary): refuse what the memory cannot hold before resizing.
    let n_logits = if all_logits {
        tokens.len().checked_mul(vocab)
    } else {
        Some(vocab)
    };
    let memory = m.memory_bytes();
    let n_logits = match n_logits {
        Some(n) if (n as u64).saturating_mul(4) <= memory => n,
        _ => bail!(
            "logits of all {} tokens over a vocabulary of {vocab} exceed the memory here; use fewer tokens per call",
            tokens.len()
        ),
    };
    logits.clear();
    logits.resize(n_logits, 0.0);
    if !all_logits {
        return forward_last(m, tokens, state, StepOut::Logits(logits));
    }
    run_chunks(m, tokens, state, Wanted::Every(logits))
}

/// Runs `tokens` as [`forward`] does and hands back the last token's row as `out` asks
/// (the LM head runs on that row only).
pub(crate) fn forward_last<M: LanguageModel + ?Sized>(
    m: &M,
    tokens: &[u32],
    state: &mut InferenceState,
    out: StepOut<'_>,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::new("forward called with no tokens"));
    }
    check_tokens(tokens, state, m.config().vocab_size)?;
    run_chunks(m, tokens, state, Wanted::Last(Some(out)))
}

/// The rows whose logits a [`run_chunks`] wants.
enum Wanted<'a> {
    /// Every row's, into `[tokens][vocab]`.
    Every(&'a mut [f32]),
    /// The final row's only, as the `StepOut` asks (taken by the last chunk).
    Last(Option<StepOut<'a>>),
}

/// The prompt in steps of `state.chunk` rows from `state.pos` (checked tokens), the LM head
/// over the rows `want` names; `state.pos` advances only when every step succeeded.
fn run_chunks<M: LanguageModel + ?Sized>(
    m: &M,
    tokens: &[u32],
    state: &mut InferenceState,
    mut want: Wanted<'_>,
) -> Result<()> {
    let vocab = m.config().vocab_size;
    let chunk = state.chunk;
    let mut pos = state.pos;
    let mut tap = std::mem::take(&mut state.tap);
    let s = inner(state)?;
    let mut result = Ok(());
    let n_chunks = tokens.len().div_ceil(chunk);
    // Two loops, so a `StepOut` handed in whole (its lifetime fixed: a `CandidateOut`
    // with masks is invariant in it) never meets the per-chunk borrows of `Every`'s logits.
    match &mut want {
        Wanted::Every(logits) => {
            for (ci, ids) in tokens.chunks(chunk).enumerate() {
                let n = ids.len();
                s.lay_out(pos, n);
                s.logit_rows.clear();
                s.logit_rows.extend(0..n as u32);
                let dst = ci * chunk * vocab;
                let step_out = StepOut::Logits(&mut logits[dst..dst + n * vocab]);
                result = m.forward_batch(ids, &s.layout, &s.logit_rows, &mut s.batch, &mut tap, step_out);
                if result.is_err() {
                    break;
                }
                pos += n;
            }
        }
        Wanted::Last(out) => {
            for (ci, ids) in tokens.chunks(chunk).enumerate() {
                let n = ids.len();
                s.lay_out(pos, n);
                s.logit_rows.clear();
                // Earlier chunks hand back nothing.
                let step_out = if ci + 1 == n_chunks {
                    s.logit_rows.push(n as u32 - 1);
                    out.take().unwrap_or(StepOut::Logits(&mut []))
                } else {
                    StepOut::Logits(&mut [])
                };
                result = m.forward_batch(ids, &s.layout, &s.logit_rows, &mut s.batch, &mut tap, step_out);
                if result.is_err() {
                    break;
                }
                pos += n;
            }
        }
    }
    state.tap = tap;
    result?;
    state.pos = pos;
    Ok(())
}

pub(crate) fn can_rewind(state: &InferenceState, len: usize) -> bool {
    let Some(s) = state.inner.downcast_ref::<OneSeq>() else {
        return false;
    };
    let bs = s.batch.shape.block_size;
    len <= state.pos
        && s.groups.iter().all(|&(window, ring)| {
            // The ring holds blocks `last - ring + 1 ..= last` of what was written;
            // continuing at `len` reads positions from `len - window + 1`.
            let all = state.max_seq.div_ceil(bs);
            if window == 0 || ring >= all || state.pos == 0 {
                return true;
            }
            let last = (state.pos - 1) / bs;
            let oldest_needed = (len + 1).saturating_sub(window) / bs;
            last < ring || oldest_needed + ring > last
        })
}
