//! Limits on what a tokenizer file may ask for.
//!
//! Every count, id, length and size read from `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json` or GGUF `tokenizer.ggml.*` metadata is checked against one of
//! these before anything is allocated or indexed with it. Each limit is far above what
//! real vocabularies use (the numbers in the comments), and low enough that the memory
//! and work it implies stay bounded on an ordinary machine.

use crate::error::{Error, Result};

/// Most token ids (the largest id + 1). Real vocabularies: Llama 3 128,256, Qwen 2
/// 151,936, Gemma 3 262,144, the largest multilingual ones about 256k. 16x Gemma's keeps
/// the per-id tables (text, kind, offsets: ~32 bytes an id) under ~130 MiB even for a
/// file that names one huge id.
pub const MAX_VOCAB_SIZE: usize = 1 << 22;

/// Longest token text, in bytes. Real tokens stay below a few hundred bytes (runs of
/// spaces or `=` in code vocabularies).
pub const MAX_TOKEN_BYTES: usize = 1 << 14;

/// Longest control / user-defined token of a GGUF vocabulary, in bytes. ffai matches
/// these in every input before encoding, at a cost of up to this many steps per input
/// byte. Real ones are short tags (`<start_of_turn>`) or whitespace runs (Gemma: 31 spaces).
pub const MAX_SPECIAL_TOKEN_BYTES: usize = 1 << 10;

/// Most BPE merge rules. Real lists: Llama 3 280k, Gemma's SentencePiece vocabulary
/// exported as merges 515k.
pub const MAX_MERGES: usize = 1 << 22;

/// Most text in an exported SentencePiece merge list (`convert`). Every way to split an
/// entry into two entries is a merge, so a vocabulary of nested long tokens ("a", "aa",
/// "aaa", ...) yields merge text that grows with the square of its size. Gemma's is ~8 MiB.
pub const MAX_EXPORT_MERGE_BYTES: usize = 1 << 28;

/// Most `added_tokens` in tokenizer.json. The `tokenizers` crate adds them in time
/// quadratic in their number (each is compared with all before it): measured on a busy
/// 2-core machine, 16k take 0.7 s, 32k 2.9 s, 128k 110 s. Real: Llama 3 256, Gemma 3
/// ~6.4k, Orpheus-style speech-token models ~28k.
pub const MAX_ADDED_TOKENS: usize = 1 << 16;

/// Most text in all added tokens of a tokenizer.json, or all control / user-defined
/// tokens of a GGUF vocabulary, together, in bytes. They are compiled into one matcher
/// (the crate's Aho-Corasick automaton; ffai's byte trie, ~32 bytes per byte). Real:
/// Gemma 3's ~100 KiB, speech-token models under 1 MiB.
pub const MAX_SPECIAL_TEXT_BYTES: usize = 1 << 22;

/// Most bytes the crate may produce normalizing the added tokens marked `normalized` at
/// load (their text times the normalizer's growth bound); it keeps all of them.
pub const MAX_NORMALIZED_ADDED_BYTES: u64 = 1 << 26;

/// Largest tokenizer.json, in bytes. Real ones: Gemma 3 33 MiB.
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 1 << 29;

/// Largest tokenizer_config.json / generation_config.json / chat_template.jinja, in
/// bytes. Real ones are below a few MiB.
pub const MAX_CONFIG_JSON_BYTES: u64 = 1 << 26;

/// Most normalizer plus pre-tokenizer steps (Sequence members count, and so does each
/// Sequence). Real pipelines have fewer than 8.
pub const MAX_PIPELINE_STEPS: usize = 64;

/// Deepest nesting of `Sequence` normalizers / pre-tokenizers. Real: 1.
pub const MAX_PIPELINE_DEPTH: usize = 4;

/// Longest regex or literal pattern in a Split pre-tokenizer or Replace normalizer, in
/// bytes. The longest real ones (GPT-4o / Kimi word regexes) are under 1 KiB.
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Largest counted repetition (`x{n,m}`) in a regex. Real: `\p{N}{1,3}`.
pub const MAX_REGEX_REPEAT: u32 = 256;

/// Longest Replace `content`, Prepend `prepend` text and BPE / WordPiece subword prefix
/// or suffix, in bytes. These are glued onto pieces of every input (a prefix onto every
/// character of every word), so their length multiplies the work per request. Real:
/// "▁", " ", "##", "</w>".
pub const MAX_AFFIX_BYTES: usize = 256;

/// How many times longer the normalizer and pre-tokenizer together may make a text (an
/// upper bound computed from their settings, see `hf_check`). Real pipelines: Llama 2's
/// Prepend + Replace 12, a SentencePiece charsmap + Metaspace ~300. A long chain of
/// expanding Replace steps would otherwise grow each request's text exponentially.
pub const MAX_TEXT_GROWTH: u64 = 1024;

/// Largest decoded SentencePiece `precompiled_charsmap`. Real (nmt_nfkc): ~240 KiB.
pub const MAX_CHARSMAP_BYTES: usize = 1 << 24;

/// Largest WordPiece `max_input_chars_per_word`. Its greedy longest-match search costs
/// about the cube of this in byte operations per word. Real: 100 (BERT).
pub const MAX_WORDPIECE_WORD_CHARS: u64 = 256;

/// `Err` unless `count <= limit`, naming the field and the limit.
pub(crate) fn check_count(field: &str, count: usize, limit: usize) -> Result<()> {
    if count > limit {
        return Err(Error::new(format!(
            "{field} has {count} entries, more than the limit of {limit}"
        )));
    }
    Ok(())
}

/// `Err` unless `text` is at most `limit` bytes, naming the field and the limit.
pub(crate) fn check_len(field: &str, text: &str, limit: usize) -> Result<()> {
    if text.len() > limit {
        return Err(Error::new(format!(
            "{field} is {} bytes long, more than the limit of {limit}",
            text.len()
        )));
    }
    Ok(())
}

/// Converts an untrusted id to `u32`, checking it is below [`MAX_VOCAB_SIZE`].
pub(crate) fn check_id(field: &str, id: u64) -> Result<u32> {
    if id >= MAX_VOCAB_SIZE as u64 {
        return Err(Error::new(format!(
            "{field} = {id} is not below the vocabulary size limit of {MAX_VOCAB_SIZE}"
        )));
    }
    // Below 2^22, so it fits.
    Ok(id as u32)
}
