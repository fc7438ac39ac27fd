//! Cutting special-token text out of the input before the model's algorithm runs.
//!
//! llama.cpp's rule: take the special tokens (control, user-defined, unknown) longest
//! text first; for each, split every remaining piece of raw text at all its
//! non-overlapping occurrences, left to right. The pieces of text between the matches
//! are then encoded on their own.
//!
//! Done literally, that is one substring search per special token over the whole input
//! (Gemma has 6,400 of them). A byte trie of the token texts first finds which tokens
//! occur in the input at all, in one pass; only those are then applied in order. A token
//! that does not occur in the input cannot occur in any piece of it, so the result is
//! the same.

use super::Work;

/// One piece of the input: text still to encode, or a special token already matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

struct Entry {
    id: u32,
    text: String,
    /// Drop whitespace right after a match (llama.cpp's RSTRIP attribute, Phi-3).
    rstrip: bool,
}

#[derive(Default)]
struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// The entry whose text ends here.
    entry: Option<u32>,
}

pub(crate) struct SpecialSplitter {
    /// Longest text first, then lowest id.
    entries: Vec<Entry>,
    /// Node 0 is the root.
    trie: Vec<Node>,
}

#[derive(Clone, Copy)]
enum Span {
    Text(usize, usize),
    Token(u32),
}

/// C `isspace` on a byte.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

impl SpecialSplitter {
    /// A splitter that matches nothing.
    pub fn empty() -> Self {
        SpecialSplitter {
            entries: Vec::new(),
            trie: vec![Node::default()],
        }
    }

    /// `ids` index `tokens`; empty texts must already be filtered out. With
    /// `rstrip_mode` (Phi-3), whitespace after most special tokens is dropped.
    pub fn new(tokens: &[String], ids: impl Iterator<Item = u32>, rstrip_mode: bool) -> Self {
        let mut entries: Vec<Entry> = ids
            .map(|id| {
                let text = tokens[id as usize].clone();
                let rstrip = rstrip_mode && !matches!(text.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                Entry { id, text, rstrip }
            })
            .collect();
        entries.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));

        let mut trie = vec![Node::default()];
        for (ei, e) in entries.iter().enumerate() {
            let mut node = 0usize;
            for &b in e.text.as_bytes() {
                node = match trie[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => trie[node].children[k].1 as usize,
                    Err(k) => {
                        let new = trie.len();
                        trie.push(Node::default());
                        trie[node].children.insert(k, (b, new as u32));
                        new
                    }
                };
            }
            // Two tokens with the same text: the first (lowest id) one wins.
            trie[node].entry.get_or_insert(ei as u32);
        }
        SpecialSplitter { entries, trie }
    }

    /// Which entries occur anywhere in `text`. Takes at most (longest entry) steps per
    /// byte of `text`.
    fn present(&self, text: &[u8], work: &mut Work) -> Vec<usize> {
        let mut seen = vec![false; self.entries.len()];
        let root = &self.trie[0];
        if root.children.is_empty() {
            return Vec::new();
        }
        for start in 0..text.len() {
            let mut node = root;
            for &b in &text[start..] {
                work.add(1);
                match node.children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => node = &self.trie[node.children[k].1 as usize],
                    Err(_) => break,
                }
                if let Some(e) = node.entry {
                    seen[e as usize] = true;
                }
            }
        }
        (0..self.entries.len()).filter(|&i| seen[i]).collect()
    }

    pub fn split<'a>(&self, text: &'a str, work: &mut Work) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut spans = vec![Span::Text(0, text.len())];
        for ei in self.present(text.as_bytes(), work) {
            let entry = &self.entries[ei];
            let pat = entry.text.as_str();
            // One pass over the text per special token that occurs in it.
            work.add(spans.len() + text.len());
            let mut next = Vec::with_capacity(spans.len() + 2);
            for span in spans {
                let Span::Text(mut start, end) = span else {
                    next.push(span);
                    continue;
                };
                while let Some(at) = text[start..end].find(pat) {
                    let m = start + at;
                    if m > start {
                        next.push(Span::Text(start, m));
                    }
                    next.push(Span::Token(entry.id));
                    start = m + pat.len();
                    if entry.rstrip {
                        while start < end && is_c_space(text.as_bytes()[start]) {
                            start += 1;
                        }
                    }
                }
                if start < end {
                    next.push(Span::Text(start, end));
                }
            }
            spans = next;
        }
        spans
            .into_iter()
            .map(|s| match s {
                Span::Text(a, b) => Fragment::Text(&text[a..b]),
                Span::Token(id) => Fragment::Token(id),
            })
            .collect()
    }
}
