//! Byte-level BPE vocabularies from GGUF (`tokenizer.ggml.model = "gpt2"`).
//!
//! The merging itself is the `tokenizers` crate's BPE model, fed the GGUF vocabulary and
//! merge list. What differs between model families is how the text is cut into words
//! before merging: `tokenizer.ggml.pre` names a list of regexes, applied one after the
//! other, each splitting the pieces the previous one left (matches and the text between
//! them both become pieces). The lists below are llama.cpp's for each name; they become
//! a sequence of `Split` pre-tokenizers followed by the GPT-2 byte-to-character mapping.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::guard::{contain, one_line};
use crate::error::{Error, Result};

/// GPT-2's word regex.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's, with the case-insensitive contractions spelled out as llama.cpp does.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A pre-tokenizer family: its regexes and the llama.cpp defaults that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// llama.cpp's fallback ("default", or no `tokenizer.ggml.pre`).
    Default,
    Gpt2,
    /// Digits one by one, then GPT-2 (smollm, starcoder, refact, command-r, ...).
    DigitsGpt2,
    /// Llama 3: whole words found in the vocabulary skip merging; BOS by default.
    Llama3,
    /// The Llama 3 regex with ordinary merging (dbrx, smaug-bpe).
    Llama3Regex,
    Qwen2,
}

impl PreTokenizer {
    pub fn from_name(name: &str) -> Result<PreTokenizer> {
        Ok(match name {
            "" | "default" => PreTokenizer::Default,
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" | "roberta-bpe" | "jina-es"
            | "jina-de" | "jina-v2-es" | "jina-v2-de" | "jina-v1-en" | "jina-v2-code" | "gigachat" | "a.x-4.0"
            | "mellum" => PreTokenizer::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                PreTokenizer::DigitsGpt2
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
                PreTokenizer::Llama3
            }
            "dbrx" | "smaug-bpe" => PreTokenizer::Llama3Regex,
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => PreTokenizer::Qwen2,
            other => {
                return Err(Error::new(format!(
                    "unsupported pre-tokenizer tokenizer.ggml.pre = {other:?} (ffai knows default, gpt2, smollm, \
                     starcoder, llama-bpe/llama3, qwen2, dbrx and their aliases)"
                )))
            }
        })
    }

    fn regexes(self) -> &'static [&'static str] {
        match self {
            PreTokenizer::Default => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            PreTokenizer::Gpt2 => &[GPT2],
            PreTokenizer::DigitsGpt2 => &[r"\p{N}", GPT2],
            PreTokenizer::Llama3 | PreTokenizer::Llama3Regex => &[LLAMA3],
            PreTokenizer::Qwen2 => &[QWEN2],
        }
    }

    /// llama.cpp's add_bos default for the family (the GGUF key overrides it).
    pub fn adds_bos(self) -> bool {
        self == PreTokenizer::Llama3
    }

    fn ignore_merges(self) -> bool {
        self == PreTokenizer::Llama3
    }
}

/// Builds the `tokenizers` BPE encoder for a GGUF vocabulary (whose sizes the caller has
/// checked). The crate runs contained: a panic in it is an `Err`.
pub(crate) fn build_gguf_bpe(pre: PreTokenizer, tokens: &[String], merges: &[String]) -> Result<tokenizers::Tokenizer> {
    contain("building the BPE tokenizer", || build(pre, tokens, merges))?
}

fn build(pre: PreTokenizer, tokens: &[String], merges: &[String]) -> Result<tokenizers::Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if !t.is_empty() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
    }
    // "a b": split at the first space after the first character (a token may itself be
    // a lone space in vocabularies without the byte mapping). Merges that refer to
    // strings outside the vocabulary could never apply; `tokenizers` would reject them.
    let mut pairs = Vec::with_capacity(merges.len());
    for m in merges {
        let Some(first_len) = m.chars().next().map(char::len_utf8) else {
            continue;
        };
        let Some(sp) = m[first_len..].find(' ').map(|p| p + first_len) else {
            continue;
        };
        let (a, b) = (&m[..sp], &m[sp + 1..]);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}")) {
            pairs.push((a.to_owned(), b.to_owned()));
        }
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), pairs)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| Error::new(format!("building BPE model: {}", one_line(&e.to_string()))))?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for re in pre.regexes() {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::new(format!("pre-tokenizer regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tok)
}

/// GPT-2's byte → character table: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes for U+0100 onwards, in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        *slot = if printable {
            char::from(b as u8)
        } else {
            extra += 1;
            char::from_u32(0xff + extra).expect("below U+0144")
        };
    }
    table
}

/// The inverse table, indexed by code point (all of them are below U+0144).
fn char_to_byte_table() -> &'static [i16; 0x144] {
    static TABLE: std::sync::OnceLock<[i16; 0x144]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut inv = [-1i16; 0x144];
        for (b, c) in byte_to_char_table().iter().enumerate() {
            inv[*c as usize] = b as i16;
        }
        inv
    })
}

/// Maps a byte-level token string back to its bytes. A character outside the table
/// (not produced by the byte mapping) is kept as its own UTF-8.
pub(crate) fn decode_byte_level(text: &str, out: &mut Vec<u8>) {
    let inv = char_to_byte_table();
    for c in text.chars() {
        match inv.get(c as usize) {
            Some(&b) if b >= 0 => out.push(b as u8),
            _ => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_round_trips() {
        let table = byte_to_char_table();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        let mut out = Vec::new();
        let s: String = table.iter().collect();
        decode_byte_level(&s, &mut out);
        assert_eq!(out, (0..=255u8).collect::<Vec<_>>());
    }
}
