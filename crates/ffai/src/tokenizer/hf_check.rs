//! Validation of a tokenizer.json before the `tokenizers` crate sees it.
//!
//! The crate trusts its input: it slices merges by the length of
//! `continuing_subword_prefix` (a shorter merge panics), allocates from a charsmap's own
//! size field, compiles any regex for Oniguruma to backtrack through, adds added tokens
//! in quadratic time, and lets normalizer chains grow a text without bound. This module
//! walks the JSON, checks every count, id, length and pattern against `limits`, and
//! rebuilds the parts the crate will read (model, normalizer, pre-tokenizer, added
//! tokens) from the fields it checked, so nothing unchecked reaches the crate. Sections
//! ffai does not need from the crate are left out: the decoder and post-processor (ffai
//! decodes with its own tables and adds BOS itself), and truncation and padding (which
//! would cut or pad every prompt).

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::limits::{
    check_count, check_id, check_len, MAX_ADDED_TOKENS, MAX_AFFIX_BYTES, MAX_CHARSMAP_BYTES, MAX_MERGES,
    MAX_NORMALIZED_ADDED_BYTES, MAX_PATTERN_BYTES, MAX_PIPELINE_DEPTH, MAX_PIPELINE_STEPS, MAX_SPECIAL_TEXT_BYTES,
    MAX_TEXT_GROWTH, MAX_TOKEN_BYTES, MAX_VOCAB_SIZE, MAX_WORDPIECE_WORD_CHARS,
};
use super::regex_check::check_regex;
use crate::error::{Error, Result};
use crate::{bail, ensure};

/// A tokenizer.json reduced to what the `tokenizers` crate may see.
pub(crate) struct Checked {
    /// The JSON to deserialize the crate's `Tokenizer` from.
    pub value: Value,
    /// (content, id) of every added token, to check the ids the crate gives them.
    pub added: Vec<(String, u32)>,
}

/// Checks `json` (a parsed tokenizer.json) and builds what the crate gets from it. The
/// model is moved out of `json` (it can be most of the file); the rest stays.
pub(crate) fn check_tokenizer_json(json: &mut Value) -> Result<Checked> {
    let Value::Object(top) = json else {
        bail!("tokenizer.json is not a JSON object");
    };
    let mut out = Map::new();
    if let Some(v) = top.get("version") {
        out.insert("version".into(), v.clone());
    }
    let model = match top.get_mut("model") {
        Some(m) => m.take(),
        None => bail!("tokenizer.json has no model"),
    };
    out.insert("model".into(), check_model(model)?);

    let mut pipe = Pipeline::default();
    let normalizer_growth = match top.get("normalizer") {
        None | Some(Value::Null) => 1,
        Some(v) => {
            let (v, growth) = normalizer(v, "normalizer", &mut pipe, 0)?;
            out.insert("normalizer".into(), v);
            growth
        }
    };
    let pre_growth = match top.get("pre_tokenizer") {
        None | Some(Value::Null) => 1,
        Some(v) => {
            let (v, growth) = pre_tokenizer(v, "pre_tokenizer", &mut pipe, 0)?;
            out.insert("pre_tokenizer".into(), v);
            growth
        }
    };
    let growth = normalizer_growth.saturating_mul(pre_growth);
    ensure!(
        growth <= MAX_TEXT_GROWTH,
        "normalizer and pre_tokenizer can make a text up to {} times longer, more than the limit of {MAX_TEXT_GROWTH}",
        if growth == u64::MAX {
            "unboundedly many".to_owned()
        } else {
            growth.to_string()
        }
    );

    let (added_value, added) = added_tokens(top.get("added_tokens"), normalizer_growth)?;
    out.insert("added_tokens".into(), added_value);
    Ok(Checked {
        value: Value::Object(out),
        added,
    })
}

/// A token text for an error message: quoted, long ones cut.
fn quote(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    if text.chars().count() <= MAX_CHARS {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX_CHARS).collect();
        format!("{head:?}...")
    }
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| Error::new(format!("{path} is not a JSON object")))
}

/// An optional string field, at most `limit` bytes.
fn opt_str<'a>(map: &'a Map<String, Value>, path: &str, key: &str, limit: usize) -> Result<Option<&'a str>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            check_len(&format!("{path}.{key}"), s, limit)?;
            Ok(Some(s))
        }
        Some(_) => bail!("{path}.{key} is not a string"),
    }
}

/// A new object holding `type: ty` and those of `keys` that `map` has.
fn keep(map: &Map<String, Value>, ty: &str, keys: &[&str]) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), Value::from(ty));
    for &k in keys {
        if let Some(v) = map.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    Value::Object(out)
}

fn type_of<'a>(map: &'a Map<String, Value>, path: &str) -> Result<&'a str> {
    match map.get("type") {
        Some(Value::String(s)) => Ok(s),
        Some(_) => bail!("{path}.type is not a string"),
        None => bail!("{path} has no \"type\""),
    }
}

// --- The model ---

fn check_model(model: Value) -> Result<Value> {
    let Value::Object(mut map) = model else {
        bail!("model is not a JSON object");
    };
    let ty = match map.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => bail!("model.type is not a string"),
        // Files from before "type" existed: the crate tries BPE, WordPiece, WordLevel,
        // Unigram in turn and takes the first that parses. Decide here instead, so a
        // BPE model whose merges are refused is not quietly read as WordPiece.
        None if map.get("vocab").is_some_and(Value::is_array) => "Unigram".to_owned(),
        None if map.contains_key("merges") => "BPE".to_owned(),
        None => "WordPiece".to_owned(),
    };
    let keys: &[&str] = match ty.as_str() {
        "BPE" => {
            check_bpe(&map)?;
            &[
                "dropout",
                "unk_token",
                "continuing_subword_prefix",
                "end_of_word_suffix",
                "fuse_unk",
                "byte_fallback",
                "ignore_merges",
            ]
        }
        "WordPiece" => {
            vocab_map(map.get("vocab"))?;
            opt_str(&map, "model", "unk_token", MAX_TOKEN_BYTES)?;
            // Put in front of every candidate substring of every word.
            opt_str(&map, "model", "continuing_subword_prefix", MAX_AFFIX_BYTES)?;
            match map.get("max_input_chars_per_word") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let n = v
                        .as_u64()
                        .ok_or_else(|| Error::new("model.max_input_chars_per_word is not a non-negative integer"))?;
                    ensure!(
                        n <= MAX_WORDPIECE_WORD_CHARS,
                        "model.max_input_chars_per_word = {n} is above the limit of {MAX_WORDPIECE_WORD_CHARS}"
                    );
                }
            }
            &["unk_token", "continuing_subword_prefix", "max_input_chars_per_word"]
        }
        "WordLevel" => {
            vocab_map(map.get("vocab"))?;
            opt_str(&map, "model", "unk_token", MAX_TOKEN_BYTES)?;
            &["unk_token"]
        }
        "Unigram" => {
            let n = unigram_vocab(map.get("vocab"))?;
            match map.get("unk_id") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let id = v
                        .as_u64()
                        .ok_or_else(|| Error::new("model.unk_id is not a non-negative integer"))?;
                    ensure!(
                        id < n as u64,
                        "model.unk_id = {id} is outside the vocabulary of {n} pieces"
                    );
                }
            }
            &["unk_id", "byte_fallback"]
        }
        other => bail!(
            "model.type {} is not one of BPE, WordPiece, WordLevel, Unigram",
            quote(other)
        ),
    };
    let mut out = match keep(&map, &ty, keys) {
        Value::Object(o) => o,
        _ => unreachable!("keep builds an object"),
    };
    // The big parts are moved, not copied.
    for k in ["vocab", "merges"] {
        if let Some(v) = map.get_mut(k) {
            out.insert(k.into(), v.take());
        }
    }
    Ok(Value::Object(out))
}

/// Checks a `{"token": id}` vocabulary: size, token lengths, ids below the limit, and no
/// id given to two tokens (the crate would keep one of them at random).
fn vocab_map(v: Option<&Value>) -> Result<()> {
    let entries = match v {
        Some(Value::Object(m)) => m,
        Some(_) => bail!("model.vocab is not a JSON object"),
        None => bail!("model has no vocab"),
    };
    check_count("model.vocab", entries.len(), MAX_VOCAB_SIZE)?;
    let mut owner: HashMap<u32, &str> = HashMap::with_capacity(entries.len());
    for (text, id) in entries {
        if text.len() > MAX_TOKEN_BYTES {
            bail!(
                "model.vocab holds a token of {} bytes ({}), more than the limit of {MAX_TOKEN_BYTES}",
                text.len(),
                quote(text)
            );
        }
        let field = format!("model.vocab[{}]", quote(text));
        let id = id
            .as_u64()
            .ok_or_else(|| Error::new(format!("{field} is not a non-negative integer id")))?;
        let id = check_id(&field, id)?;
        if let Some(prev) = owner.insert(id, text) {
            bail!("model.vocab gives id {id} to both {} and {}", quote(prev), quote(text));
        }
    }
    Ok(())
}

fn check_bpe(map: &Map<String, Value>) -> Result<()> {
    vocab_map(map.get("vocab"))?;
    opt_str(map, "model", "unk_token", MAX_TOKEN_BYTES)?;
    // Each is glued to every character of every word the model encodes.
    let prefix = opt_str(map, "model", "continuing_subword_prefix", MAX_AFFIX_BYTES)?.unwrap_or("");
    opt_str(map, "model", "end_of_word_suffix", MAX_AFFIX_BYTES)?;
    match map.get("dropout") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_f64() {
            Some(0.0) => {}
            Some(p) => bail!("model.dropout = {p}: BPE dropout makes encoding random; ffai needs null or 0"),
            None => bail!("model.dropout is not a number"),
        },
    }
    let merges = match map.get("merges") {
        Some(Value::Array(m)) => m,
        Some(_) => bail!("model.merges is not an array"),
        None => bail!("model has vocab but no merges"),
    };
    check_count("model.merges", merges.len(), MAX_MERGES)?;
    let mut pairs = 0usize;
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            // The crate's old form: "a b", exactly one space.
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => bail!(
                        "model.merges[{i}] = {} is not two tokens separated by one space",
                        quote(s)
                    ),
                }
            }
            Value::Array(p) => {
                pairs += 1;
                match p.as_slice() {
                    [Value::String(a), Value::String(b)] => (a.as_str(), b.as_str()),
                    _ => bail!("model.merges[{i}] is not a pair of strings"),
                }
            }
            _ => bail!("model.merges[{i}] is neither a string nor a pair of strings"),
        };
        for part in [a, b] {
            if part.len() > MAX_TOKEN_BYTES {
                bail!(
                    "model.merges[{i}] holds a token of {} bytes, more than the limit of {MAX_TOKEN_BYTES}",
                    part.len()
                );
            }
        }
        // The crate builds the merged token as `a + b[prefix.len()..]`: a `b` that does not
        // start with the prefix panics there (or silently loses characters).
        if !b.starts_with(prefix) {
            bail!(
                "model.merges[{i}]: {} does not start with continuing_subword_prefix {}",
                quote(b),
                quote(prefix)
            );
        }
    }
    ensure!(
        pairs == 0 || pairs == merges.len(),
        "model.merges mixes \"a b\" strings and [a, b] pairs"
    );
    Ok(())
}

/// Checks a Unigram `[[piece, score], ...]` vocabulary; returns its size.
fn unigram_vocab(v: Option<&Value>) -> Result<usize> {
    let pieces = match v {
        Some(Value::Array(p)) => p,
        Some(_) => bail!("model.vocab of a Unigram model is not an array"),
        None => bail!("model has no vocab"),
    };
    check_count("model.vocab", pieces.len(), MAX_VOCAB_SIZE)?;
    for (i, p) in pieces.iter().enumerate() {
        let (Some(Value::String(text)), Some(score), 2) = (p.get(0), p.get(1), p.as_array().map_or(0, Vec::len)) else {
            bail!("model.vocab[{i}] is not a [piece, score] pair");
        };
        ensure!(score.is_number(), "model.vocab[{i}] has a score that is not a number");
        // An empty piece matches nowhere and everywhere in the lattice.
        ensure!(!text.is_empty(), "model.vocab[{i}] is an empty piece");
        ensure!(
            text.len() <= MAX_TOKEN_BYTES,
            "model.vocab[{i}] is a piece of {} bytes, more than the limit of {MAX_TOKEN_BYTES}",
            text.len()
        );
    }
    Ok(pieces.len())
}

// --- Added tokens ---

/// Checks the added tokens; `growth` bounds what the normalizer does to those it applies to.
fn added_tokens(v: Option<&Value>, growth: u64) -> Result<(Value, Vec<(String, u32)>)> {
    let items = match v {
        None | Some(Value::Null) => return Ok((Value::Array(Vec::new()), Vec::new())),
        Some(Value::Array(a)) => a,
        Some(_) => bail!("added_tokens is not an array"),
    };
    check_count("added_tokens", items.len(), MAX_ADDED_TOKENS)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    let (mut text_bytes, mut normalized_bytes) = (0usize, 0u64);
    for (i, t) in items.iter().enumerate() {
        let path = format!("added_tokens[{i}]");
        let map = object(t, &path)?;
        let id = map
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::new(format!("{path}.id is missing or not a non-negative integer")))?;
        let id = check_id(&format!("{path}.id"), id)?;
        let content = opt_str(map, &path, "content", MAX_TOKEN_BYTES)?
            .ok_or_else(|| Error::new(format!("{path}.content is missing")))?;
        ensure!(!content.is_empty(), "{path}.content is empty");
        text_bytes += content.len();
        ensure!(
            text_bytes <= MAX_SPECIAL_TEXT_BYTES,
            "added_tokens hold more than the limit of {MAX_SPECIAL_TEXT_BYTES} bytes of text"
        );
        if map.get("normalized").and_then(Value::as_bool) != Some(false) {
            normalized_bytes = normalized_bytes.saturating_add((content.len() as u64).saturating_mul(growth));
            ensure!(
                normalized_bytes <= MAX_NORMALIZED_ADDED_BYTES,
                "added_tokens marked normalized can grow to more than the limit of {MAX_NORMALIZED_ADDED_BYTES} bytes under the normalizer"
            );
        }
        let mut keep = Map::new();
        for k in [
            "id",
            "content",
            "single_word",
            "lstrip",
            "rstrip",
            "normalized",
            "special",
        ] {
            if let Some(v) = map.get(k) {
                keep.insert(k.into(), v.clone());
            }
        }
        out.push(Value::Object(keep));
        ids.push((content.to_owned(), id));
    }
    Ok((Value::Array(out), ids))
}

// --- Normalizers and pre-tokenizers ---

/// Counts steps across the normalizer and the pre-tokenizer.
#[derive(Default)]
struct Pipeline {
    steps: usize,
}

impl Pipeline {
    fn step(&mut self, path: &str, depth: usize) -> Result<()> {
        self.steps += 1;
        ensure!(
            self.steps <= MAX_PIPELINE_STEPS,
            "{path}: more than {MAX_PIPELINE_STEPS} normalizer and pre-tokenizer steps"
        );
        ensure!(
            depth <= MAX_PIPELINE_DEPTH,
            "{path}: Sequences nested more than {MAX_PIPELINE_DEPTH} deep"
        );
        Ok(())
    }
}

/// Checks a `{"String": ...}` / `{"Regex": ...}` pattern; returns the fewest bytes a
/// match can span (neither kind may match the empty string: see `regex_check`).
fn pattern(v: Option<&Value>, path: &str) -> Result<usize> {
    let map = match v {
        Some(Value::Object(m)) if m.len() == 1 => m,
        _ => bail!("{path} is not {{\"String\": ...}} or {{\"Regex\": ...}}"),
    };
    match map.iter().next() {
        Some((k, Value::String(s))) if k == "String" => {
            check_len(path, s, MAX_PATTERN_BYTES)?;
            // The crate turns it into a regex, and "" matches everywhere.
            ensure!(!s.is_empty(), "{path} is an empty string");
            Ok(s.len())
        }
        Some((k, Value::String(s))) if k == "Regex" => {
            check_regex(path, s)?;
            Ok(1)
        }
        _ => bail!("{path} is not {{\"String\": ...}} or {{\"Regex\": ...}}"),
    }
}

/// A string field holding exactly one character; returns its UTF-8 length.
fn one_char(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<usize>> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().count() == 1 => Ok(Some(s.len())),
        Some(_) => bail!("{path}.{key} is not a single character"),
    }
}

/// Checks one normalizer; returns the object to give the crate and an upper bound on
/// how many times longer (in bytes) it can make a text.
fn normalizer(v: &Value, path: &str, pipe: &mut Pipeline, depth: usize) -> Result<(Value, u64)> {
    pipe.step(path, depth)?;
    let map = object(v, path)?;
    let ty = type_of(map, path)?;
    let (keys, growth): (&[&str], u64) = match ty {
        "Sequence" => {
            let items = match map.get("normalizers") {
                Some(Value::Array(a)) => a,
                _ => bail!("{path}.normalizers is not an array"),
            };
            let mut growth = 1u64;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let (v, g) = normalizer(item, &format!("{path}.normalizers[{i}]"), pipe, depth + 1)?;
                growth = growth.saturating_mul(g);
                out.push(v);
            }
            let mut obj = Map::new();
            obj.insert("type".into(), Value::from("Sequence"));
            obj.insert("normalizers".into(), Value::Array(out));
            return Ok((Value::Object(obj), growth));
        }
        // UAX #15 gives the largest growth of a UTF-8 text under each form: 3x for NFC
        // and NFD, 11x for NFKC and NFKD. The bounds here leave room for new characters.
        "NFC" | "NFD" => (&[], 4),
        "NFKC" | "NFKD" => (&[], 18),
        // Lower-casing turns a few 2-byte letters into 3 bytes ("İ" -> "i̇").
        "Lowercase" => (&[], 2),
        // Each byte becomes a character of at most 2 bytes.
        "ByteLevel" => (&[], 2),
        "Strip" => (&["strip_left", "strip_right"], 1),
        "StripAccents" | "Nmt" => (&[], 1),
        // Spaces around CJK characters (5/3), NFD for the accents (4), lower-casing (2).
        "BertNormalizer" => (
            &["clean_text", "handle_chinese_chars", "strip_accents", "lowercase"],
            16,
        ),
        "Replace" => {
            let shortest = pattern(map.get("pattern"), &format!("{path}.pattern"))?;
            let content = opt_str(map, path, "content", MAX_AFFIX_BYTES)?
                .ok_or_else(|| Error::new(format!("{path}.content is missing")))?;
            // Matches of at least `shortest` bytes each become `content`.
            let growth = (content.len() as u64).div_ceil(shortest as u64).max(1);
            (&["pattern", "content"], growth)
        }
        "Prepend" => {
            let text = opt_str(map, path, "prepend", MAX_AFFIX_BYTES)?
                .ok_or_else(|| Error::new(format!("{path}.prepend is missing")))?;
            // Once per piece of text, and a piece has at least one byte.
            (&["prepend"], 1 + text.len() as u64)
        }
        "Precompiled" => {
            let blob = match map.get("precompiled_charsmap") {
                Some(Value::String(s)) => s,
                _ => bail!("{path}.precompiled_charsmap is not a string"),
            };
            (
                &["precompiled_charsmap"],
                charsmap_growth(&format!("{path}.precompiled_charsmap"), blob)?,
            )
        }
        other => bail!("{path}.type {} is not a normalizer ffai accepts", quote(other)),
    };
    Ok((keep(map, ty, keys), growth))
}

/// Checks one pre-tokenizer, as [`normalizer`] does.
fn pre_tokenizer(v: &Value, path: &str, pipe: &mut Pipeline, depth: usize) -> Result<(Value, u64)> {
    pipe.step(path, depth)?;
    let map = object(v, path)?;
    let ty = type_of(map, path)?;
    let (keys, growth): (&[&str], u64) = match ty {
        "Sequence" => {
            let items = match map.get("pretokenizers") {
                Some(Value::Array(a)) => a,
                _ => bail!("{path}.pretokenizers is not an array"),
            };
            let mut growth = 1u64;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let (v, g) = pre_tokenizer(item, &format!("{path}.pretokenizers[{i}]"), pipe, depth + 1)?;
                growth = growth.saturating_mul(g);
                out.push(v);
            }
            let mut obj = Map::new();
            obj.insert("type".into(), Value::from("Sequence"));
            obj.insert("pretokenizers".into(), Value::Array(out));
            return Ok((Value::Object(obj), growth));
        }
        "BertPreTokenizer" | "Whitespace" | "WhitespaceSplit" | "UnicodeScripts" => (&[], 1),
        "Punctuation" => (&["behavior"], 1),
        "Digits" => (&["individual_digits"], 1),
        "CharDelimiterSplit" => {
            one_char(map, path, "delimiter")?;
            (&["delimiter"], 1)
        }
        // A space in front of each piece, then each byte as a character of up to 2 bytes.
        "ByteLevel" => (&["add_prefix_space", "trim_offsets", "use_regex"], 4),
        "Metaspace" => {
            // Each space becomes the replacement, and a piece may get one in front.
            let r = one_char(map, path, "replacement")?.unwrap_or(3);
            (
                &["replacement", "add_prefix_space", "prepend_scheme", "split"],
                2 * r as u64,
            )
        }
        "Split" => {
            pattern(map.get("pattern"), &format!("{path}.pattern"))?;
            (&["pattern", "behavior", "invert"], 1)
        }
        "FixedLength" => {
            if let Some(v) = map.get("length") {
                let n = v
                    .as_u64()
                    .ok_or_else(|| Error::new(format!("{path}.length is not a non-negative integer")))?;
                // 0 would make the crate split into chunks of nothing (it panics).
                ensure!(
                    (1..=MAX_TOKEN_BYTES as u64).contains(&n),
                    "{path}.length = {n} is outside 1..={MAX_TOKEN_BYTES}"
                );
            }
            (&["length"], 1)
        }
        other => bail!("{path}.type {} is not a pre-tokenizer ffai accepts", quote(other)),
    };
    Ok((keep(map, ty, keys), growth))
}

/// Checks a SentencePiece `precompiled_charsmap` (base64 of: u32 trie size in bytes, the
/// double-array trie, then NUL-separated replacement strings) and returns the longest
/// replacement, which bounds how much it can grow a text (each replaces at least a byte).
fn charsmap_growth(path: &str, b64: &str) -> Result<u64> {
    ensure!(
        b64.len() / 4 * 3 <= MAX_CHARSMAP_BYTES,
        "{path} is {} base64 characters, more than the limit of {} bytes decoded",
        b64.len(),
        MAX_CHARSMAP_BYTES
    );
    let blob = base64_decode(b64).ok_or_else(|| Error::new(format!("{path} is not valid base64")))?;
    ensure!(blob.len() >= 4, "{path} is shorter than its 4-byte header");
    let trie_bytes = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    // The crate reserves room for the trie from this field before reading it.
    let trie_end = (trie_bytes / 4)
        .checked_mul(4)
        .and_then(|t| t.checked_add(4))
        .filter(|&end| end <= blob.len())
        .ok_or_else(|| {
            Error::new(format!(
                "{path}: trie size {trie_bytes} exceeds the {} bytes that follow the header",
                blob.len() - 4
            ))
        })?;
    // Every lookup starts by reading the trie's first unit.
    ensure!(trie_end > 4, "{path} has an empty trie");
    let normalized = std::str::from_utf8(&blob[trie_end..])
        .map_err(|_| Error::new(format!("{path}: the replacement strings are not UTF-8")))?;
    let longest = normalized.split('\0').map(str::len).max().unwrap_or(0);
    Ok(longest.max(1) as u64)
}

/// Standard base64 (with or without `=` padding).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone trailing character cannot encode a byte.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("AAECAw==").unwrap(), [0, 1, 2, 3]);
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a*bc").is_none());
    }
}
