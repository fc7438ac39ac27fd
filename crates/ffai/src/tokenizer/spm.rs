//! SentencePiece-style encoding of GGUF "llama" vocabularies, as llama.cpp does it.
//!
//! The text (spaces already replaced by "▁") starts as one symbol per UTF-8 character.
//! Every adjacent pair whose concatenation is a vocabulary entry is a candidate merge,
//! ranked by that entry's score (higher first; on a tie, the leftmost pair). The best
//! candidate is merged, the pairs it forms with its new neighbours become candidates,
//! and so on until no candidate is left. Each final symbol is its vocabulary entry, or,
//! for a character the vocabulary lacks, one `<0xAB>` byte token per UTF-8 byte.
//!
//! Candidates live in a binary heap; a merged-away symbol leaves stale entries behind,
//! which are recognised (their symbols' lengths no longer add up) and skipped when
//! popped. That keeps the whole encode at O(n log n) in the length of the text.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::Work;
use crate::error::{Error, Result};

pub(crate) struct Spm {
    lookup: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The token for each byte value, for characters without an entry of their own.
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

const NONE: usize = usize::MAX;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// The heap pops the greatest: highest score, then the smallest left index.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    pub fn new(tokens: &[String], scores: Vec<f32>, unk: Option<u32>) -> Spm {
        let mut lookup = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if !t.is_empty() {
                lookup.entry(t.clone()).or_insert(i as u32);
            }
        }
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = lookup.get(format!("<0x{b:02X}>").as_str()).copied().or_else(|| {
                // A vocabulary without byte tokens may still hold the ASCII character.
                let c = char::from(b as u8);
                (b < 0x80)
                    .then(|| lookup.get(c.to_string().as_str()).copied())
                    .flatten()
            });
        }
        Spm {
            lookup,
            scores,
            byte_tokens,
            unk,
        }
    }

    /// Encodes `text` (already escaped: spaces as "▁") and appends the ids to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>, work: &mut Work) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.wrapping_sub(1),
                next: i + 1,
            });
        }
        let last = syms.len() - 1;
        syms[0].prev = NONE;
        syms[last].next = NONE;

        let mut heap = BinaryHeap::with_capacity(syms.len());
        for i in 1..syms.len() {
            self.try_pair(text, &syms, i - 1, i, &mut heap);
        }
        // Each symbol starts one candidate and each merge adds at most two, so the heap sees
        // at most 3n pushes and as many pops.
        work.add(heap.len());
        while let Some(c) = heap.pop() {
            work.add(1);
            let (l, r) = (syms[c.left], syms[c.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != c.len {
                continue; // stale: one side has changed since this pair was queued
            }
            syms[c.left].len += r.len;
            syms[c.left].next = r.next;
            syms[c.right].len = 0;
            if r.next != NONE {
                syms[r.next].prev = c.left;
            }
            if l.prev != NONE {
                work.add(1);
                self.try_pair(text, &syms, l.prev, c.left, &mut heap);
            }
            if r.next != NONE {
                work.add(1);
                self.try_pair(text, &syms, c.left, r.next, &mut heap);
            }
        }

        let mut i = 0;
        while i != NONE {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match self.lookup.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        let id = self.byte_tokens[b as usize].or(self.unk).ok_or_else(|| {
                            Error::new(format!(
                                "cannot encode {piece:?}: the vocabulary has neither a byte token for 0x{b:02X} nor an unknown token"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    fn try_pair(&self, text: &str, syms: &[Symbol], left: usize, right: usize, heap: &mut BinaryHeap<Candidate>) {
        let (l, r) = (syms[left], syms[right]);
        let len = l.len + r.len;
        if let Some(&id) = self.lookup.get(&text[l.start..l.start + len]) {
            let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Candidate {
                score,
                left,
                right,
                len,
            });
        }
    }
}
