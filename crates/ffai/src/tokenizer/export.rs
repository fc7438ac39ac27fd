//! A GGUF vocabulary written out as Hugging Face tokenizer files (`tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`), so a converted checkpoint loads
//! in `transformers` as well as in ffai.
//!
//! - `gpt2` (byte-level BPE): the same `tokenizers` model ffai builds for the GGUF
//!   (vocabulary, merges, the pre-tokenizer's regexes), with the byte-level decoder.
//! - `llama` (SentencePiece BPE): SentencePiece merges whichever adjacent pair forms the
//!   highest-scoring vocabulary entry. A ranked merge list reproduces that: every split
//!   of an entry into two entries becomes a merge, ranked by the entry's score (highest
//!   first). Spaces become "▁" in a normalizer, unknown bytes fall back to `<0xXX>`.
//!
//! Control, user-defined and unknown tokens become added tokens matched literally, as
//! ffai's own GGUF tokenizer matches them.

use std::collections::HashMap;

use serde_json::{json, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

use super::guard::contain;
use super::limits::{MAX_ADDED_TOKENS, MAX_EXPORT_MERGE_BYTES, MAX_MERGES, MAX_VOCAB_SIZE};
use super::{array, bpe, gguf_merges, string_array, TokenKind, Tokenizer};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::{bail, ensure};

/// (file name, contents) of the Hugging Face tokenizer files for a GGUF vocabulary.
pub fn hf_tokenizer_files(file: &GgufFile) -> Result<Vec<(String, String)>> {
    // The `tokenizers` crate builds and serializes the result; a panic in it is an error.
    contain("exporting the GGUF tokenizer", || hf_files(file))?.map_err(|e| e.context("exporting the GGUF tokenizer"))
}

fn hf_files(file: &GgufFile) -> Result<Vec<(String, String)>> {
    // ffai's reading of the vocabulary decides the special ids and BOS/space defaults,
    // and checks the vocabulary's sizes.
    let loaded = Tokenizer::from_gguf(file)?;
    let tokens = string_array(file, "tokenizer.ggml.tokens", MAX_VOCAB_SIZE)?
        .ok_or_else(|| Error::new("GGUF has no tokenizer.ggml.tokens"))?;
    let n = tokens.len();
    let kinds = loaded.kinds.clone();
    ensure!(kinds.len() == n, "token kinds do not match the vocabulary");
    let model = file.get_str("tokenizer.ggml.model").unwrap_or("");

    let mut tok = match model {
        "gpt2" => {
            let pre = bpe::PreTokenizer::from_name(file.get_str("tokenizer.ggml.pre").unwrap_or("default"))?;
            let merges = gguf_merges(file)?;
            let mut t = bpe::build_gguf_bpe(pre, &tokens, &merges)?;
            t.with_decoder(Some(ByteLevel::default()));
            t
        }
        "llama" => spm_tokenizer(file, &tokens, &kinds, loaded.space_prefix)?,
        other => bail!("tokenizer model {other:?} cannot be exported (ffai exports \"gpt2\" and \"llama\")"),
    };

    // Literal tokens, in id order; ids already in the model's vocabulary keep theirs.
    // ffai (and the `tokenizers` crate, in quadratic time) must be able to load them back.
    let n_literal = (0..n)
        .filter(|&i| kinds[i].is_literal() && !tokens[i].is_empty())
        .count();
    ensure!(
        n_literal <= MAX_ADDED_TOKENS,
        "the vocabulary has {n_literal} control/user-defined tokens, more than the {MAX_ADDED_TOKENS} added tokens a tokenizer.json may hold"
    );
    let added: Vec<AddedToken> = (0..n)
        .filter(|&i| kinds[i].is_literal() && !tokens[i].is_empty())
        .map(|i| {
            AddedToken::from(tokens[i].clone(), kinds[i] != TokenKind::UserDefined)
                .normalized(false)
                .special(kinds[i] != TokenKind::UserDefined)
        })
        .collect();
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = added.into_iter().partition(|t| t.special);
    tok.add_special_tokens(&special);
    tok.add_tokens(&plain);

    let text_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
    let bos = text_of(loaded.bos_id());
    let add_bos = loaded.add_bos_default() && bos.is_some();
    if let (true, Some(b), Some(id)) = (add_bos, &bos, loaded.bos_id()) {
        let post = TemplateProcessing::builder()
            .try_single(format!("{b}:0 $A:0"))
            .and_then(|p| p.try_pair(format!("{b}:0 $A:0 {b}:1 $B:1")))
            .map_err(|e| Error::new(format!("BOS template: {e}")))?
            .special_tokens(vec![(b.clone(), id)])
            .build()
            .map_err(|e| Error::new(format!("BOS template: {e}")))?;
        tok.with_post_processor(Some(post));
    }
    let tokenizer_json = tok
        .to_string(false)
        .map_err(|e| Error::new(format!("serializing tokenizer.json: {e}")))?;

    let roles: HashMap<String, (u32, String)> = loaded
        .special_tokens()
        .into_iter()
        .map(|(role, id, text)| (role, (id, text)))
        .collect();
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
    });
    for (key, role) in [
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unk"),
        ("pad_token", "pad"),
    ] {
        if let Some((_, text)) = roles.get(role) {
            config[key] = Value::from(text.clone());
        }
    }
    if let Some(t) = loaded.chat_template() {
        config["chat_template"] = Value::from(t);
    }
    let mut gen = json!({});
    if let Some(b) = loaded.bos_id() {
        gen["bos_token_id"] = json!(b);
    }
    let mut eos: Vec<u32> = loaded.eos_id().into_iter().collect();
    eos.extend(loaded.eog_ids().iter().filter(|&&e| Some(e) != loaded.eos_id()));
    if !eos.is_empty() {
        gen["eos_token_id"] = if eos.len() == 1 { json!(eos[0]) } else { json!(eos) };
    }
    if let Some((id, _)) = roles.get("pad") {
        gen["pad_token_id"] = json!(id);
    }
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize");
    Ok(vec![
        ("tokenizer.json".into(), tokenizer_json),
        ("tokenizer_config.json".into(), pretty(&config)),
        ("generation_config.json".into(), pretty(&gen)),
    ])
}

fn spm_tokenizer(
    file: &GgufFile,
    tokens: &[String],
    kinds: &[TokenKind],
    space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let n = tokens.len();
    let scores: Vec<f32> = match array(file, "tokenizer.ggml.scores")? {
        None => vec![0.0; n],
        Some(s) => {
            ensure!(
                s.len() >= n,
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                s.len()
            );
            s[..n]
                .iter()
                .map(|v| v.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| Error::new("tokenizer.ggml.scores holds a non-number"))?
        }
    };
    // First id of each text, as ffai's SentencePiece lookup resolves duplicates.
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        if !t.is_empty() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
    }
    let (merges, _work) = spm_merges(tokens, kinds, &scores, &vocab)?;
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = (0..n).find(|&i| kinds[i] == TokenKind::Unknown) {
        builder = builder.unk_token(tokens[u].clone());
    }
    let model = builder
        .build()
        .map_err(|e| Error::new(format!("building the SentencePiece BPE model: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    let space = Replace::new(" ", "▁").map_err(|e| Error::new(format!("normalizer: {e}")))?;
    if space_prefix {
        tok.with_normalizer(Some(NormSequence::new(vec![
            Prepend::new("▁".into()).into(),
            space.into(),
        ])));
    } else {
        tok.with_normalizer(Some(space));
    }
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| Error::new(format!("decoder: {e}")))?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(tok)
}

/// For each text, the lengths of the other texts that are proper prefixes of it, as
/// `(start, count)` into one shared list; plus the number of steps taken.
///
/// In sorted order every prefix of a text comes before it, and everything in between
/// shares that prefix. So one pass with a stack of nested prefixes finds them all: pop
/// what is not a prefix of the current text, and the stack is exactly its prefixes. Each
/// text is pushed and popped once, and each test reads at most the tested text, so the
/// pass is linear in the total length after an O(n log n) sort.
fn prefix_lengths(texts: &[&[u8]]) -> (Vec<(u32, u32)>, Vec<u32>, u64) {
    let mut order: Vec<u32> = (0..texts.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| texts[a as usize].cmp(texts[b as usize]));
    let mut spans = vec![(0u32, 0u32); texts.len()];
    let mut lens: Vec<u32> = Vec::new();
    let mut stack: Vec<u32> = Vec::new();
    let mut work = 0u64;
    for &i in &order {
        let t = texts[i as usize];
        while let Some(&top) = stack.last() {
            let p = texts[top as usize];
            work += 1 + p.len() as u64;
            if t.starts_with(p) {
                break;
            }
            stack.pop();
        }
        // Fits: the caller keeps the list below 2^32 entries (see `spm_merges`).
        spans[i as usize] = (lens.len() as u32, stack.len() as u32);
        work += stack.len() as u64;
        lens.extend(stack.iter().map(|&s| texts[s as usize].len() as u32));
        stack.push(i);
    }
    (spans, lens, work)
}

/// The ranked merge list that makes a BPE model encode as SentencePiece does: every split
/// of an entry into two entries, highest-scoring entry first (then by id and split point,
/// so the order is deterministic). Returns the merges and the number of steps taken.
///
/// A split at `pos` exists where a prefix of length `pos` and a suffix of length
/// `len - pos` are both entries, so finding all prefixes and all suffixes (prefixes of
/// the reversed texts) that are entries finds every split: linear in the vocabulary's
/// text after two sorts. (Hashing both halves of every split point instead costs the
/// square of each entry's length.) The output itself can still grow with the square of
/// the vocabulary (nested entries "a", "aa", "aaa", ... split every way), so it is capped.
pub(crate) fn spm_merges(
    tokens: &[String],
    kinds: &[TokenKind],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Result<(Vec<(String, String)>, u64)> {
    // Each distinct text once, under its first id.
    let ids: Vec<u32> = (0..tokens.len() as u32)
        .filter(|&id| {
            let t = &tokens[id as usize];
            !t.is_empty() && vocab.get(t) == Some(&id)
        })
        .collect();
    let texts: Vec<&[u8]> = ids.iter().map(|&id| tokens[id as usize].as_bytes()).collect();
    // A text of L bytes has fewer than L proper prefixes: the lists stay below the
    // vocabulary's total length, which `assemble` keeps under 4 GiB.
    let reversed: Vec<Vec<u8>> = texts.iter().map(|t| t.iter().rev().copied().collect()).collect();
    let reversed: Vec<&[u8]> = reversed.iter().map(Vec::as_slice).collect();
    let (pre_spans, pre_lens, w1) = prefix_lengths(&texts);
    let (suf_spans, suf_lens, w2) = prefix_lengths(&reversed);
    let mut work = w1 + w2;

    let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
    let mut merge_bytes = 0usize;
    let mut is_prefix: Vec<bool> = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        // Byte tokens are never the result of a merge.
        if kinds[id as usize] == TokenKind::Byte {
            continue;
        }
        let len = texts[k].len();
        let (ps, pn) = pre_spans[k];
        let (ss, sn) = suf_spans[k];
        let prefixes = &pre_lens[ps as usize..(ps + pn) as usize];
        let suffixes = &suf_lens[ss as usize..(ss + sn) as usize];
        work += 1 + prefixes.len() as u64 + suffixes.len() as u64;
        is_prefix.clear();
        is_prefix.resize(len + 1, false);
        for &p in prefixes {
            is_prefix[p as usize] = true;
        }
        for &s in suffixes {
            let pos = len - s as usize;
            if is_prefix[pos] {
                merge_bytes += len;
                ensure!(
                    ranked.len() < MAX_MERGES && merge_bytes <= MAX_EXPORT_MERGE_BYTES,
                    "the SentencePiece vocabulary splits into more than {MAX_MERGES} merges or {MAX_EXPORT_MERGE_BYTES} bytes of merge text"
                );
                // Token texts are UTF-8, so a prefix that is a token ends on a character
                // boundary; `pos` is below MAX_TOKEN_BYTES.
                ranked.push((scores[id as usize], id, pos as u32));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = ranked
        .into_iter()
        .map(|(_, id, pos)| {
            let (a, b) = tokens[id as usize].split_at(pos as usize);
            (a.to_owned(), b.to_owned())
        })
        .collect();
    Ok((merges, work))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old, obviously correct enumeration: hash both halves of every split.
    fn brute_force(tokens: &[String], kinds: &[TokenKind], scores: &[f32]) -> Vec<(String, String)> {
        let mut vocab: HashMap<&str, u32> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if !t.is_empty() {
                vocab.entry(t).or_insert(i as u32);
            }
        }
        let mut ranked = Vec::new();
        for (&text, &id) in &vocab {
            if kinds[id as usize] == TokenKind::Byte {
                continue;
            }
            for (pos, _) in text.char_indices().skip(1) {
                let (a, b) = text.split_at(pos);
                if vocab.contains_key(a) && vocab.contains_key(b) {
                    ranked.push((scores[id as usize], id, pos, a.to_owned(), b.to_owned()));
                }
            }
        }
        ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect()
    }

    fn first_ids(tokens: &[String]) -> HashMap<String, u32> {
        let mut vocab = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if !t.is_empty() {
                vocab.entry(t.clone()).or_insert(i as u32);
            }
        }
        vocab
    }

    /// A pseudo-random vocabulary over a small alphabet (with multi-byte characters), so
    /// many entries split into other entries in several ways; duplicates and a byte token
    /// included.
    fn random_vocab(n: usize, seed: u64) -> (Vec<String>, Vec<TokenKind>, Vec<f32>) {
        let alphabet = ['a', 'b', '▁', 'é', '日'];
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        while tokens.len() < n {
            let len = 2 + (next() % 7) as usize;
            tokens.push((0..len).map(|_| alphabet[(next() % 5) as usize]).collect());
        }
        tokens.push("ab".into()); // a duplicate text: the first id wins
        tokens.push("<0x41>".into());
        let mut kinds = vec![TokenKind::Normal; tokens.len()];
        *kinds.last_mut().unwrap() = TokenKind::Byte;
        // Ties on purpose, so the id and split-point order matter.
        let scores = (0..tokens.len()).map(|i| -((i / 3) as f32)).collect();
        (tokens, kinds, scores)
    }

    #[test]
    fn merges_match_the_brute_force_enumeration() {
        for seed in [1, 2, 3] {
            let (tokens, kinds, scores) = random_vocab(3000, seed);
            let (merges, _) = spm_merges(&tokens, &kinds, &scores, &first_ids(&tokens)).unwrap();
            assert!(merges.len() > 1000, "only {} merges", merges.len());
            assert_eq!(merges, brute_force(&tokens, &kinds, &scores));
        }
    }

    /// Long entries that do not split (the case the old enumeration spent the square of
    /// each length on): the work must stay a small multiple of the vocabulary's text.
    #[test]
    fn work_is_linear_in_the_vocabulary_text() {
        let mut tokens: Vec<String> = Vec::new();
        for i in 0..2000u32 {
            // Distinct 2,000-byte texts: no prefix or suffix of one is another.
            let mut t = format!("<{i}>");
            while t.len() < 2000 {
                t.push(char::from(b'a' + (t.len() as u32 * 7 + i) as u8 % 26));
            }
            tokens.push(t);
        }
        let kinds = vec![TokenKind::Normal; tokens.len()];
        let scores = vec![0.0; tokens.len()];
        let total: u64 = tokens.iter().map(|t| t.len() as u64).sum();
        let (merges, work) = spm_merges(&tokens, &kinds, &scores, &first_ids(&tokens)).unwrap();
        assert!(merges.is_empty());
        // Each prefix test reads at most the shorter text, each text is pushed and popped
        // once per direction: a few steps per byte. The square of the lengths would be
        // 2,000 steps per byte.
        assert!(work <= 4 * total, "{work} steps for {total} bytes of vocabulary");
    }

    #[test]
    fn nested_vocabularies_are_capped_not_exhausted() {
        // "a", "aa", ..., a^n: n^2/2 merges, n^3/6 bytes of merge text.
        let tokens: Vec<String> = (1..=1500).map(|k| "a".repeat(k)).collect();
        let kinds = vec![TokenKind::Normal; tokens.len()];
        let scores = vec![0.0; tokens.len()];
        let e = spm_merges(&tokens, &kinds, &scores, &first_ids(&tokens)).unwrap_err();
        assert!(e.to_string().contains("bytes of merge text"), "{e}");
    }
}
