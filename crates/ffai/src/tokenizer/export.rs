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
use super::limits::{MAX_ADDED_TOKENS, MAX_VOCAB_SIZE};
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
    // Every way to build an entry from two entries, ranked by the entry's score (then id,
    // then the split point, so the order is deterministic).
    let mut ranked: Vec<(f32, u32, usize, String, String)> = Vec::new();
    for (text, &id) in &vocab {
        if matches!(kinds[id as usize], TokenKind::Byte) {
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
    let merges: Vec<(String, String)> = ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect();
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
