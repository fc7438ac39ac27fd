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

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab};

use super::limits::{
    check_count, check_id, check_len, MAX_ADDED_TOKENS, MAX_AFFIX_BYTES, MAX_CHARSMAP_BYTES, MAX_MERGES,
    MAX_NORMALIZED_ADDED_BYTES, MAX_PATTERN_BYTES, MAX_PIPELINE_DEPTH, MAX_PIPELINE_STEPS, MAX_SPECIAL_TEXT_BYTES,
    MAX_TEXT_GROWTH, MAX_TOKEN_BYTES, MAX_VOCAB_SIZE, MAX_WORDPIECE_WORD_CHARS,
};
use super::regex_check::check_regex;
use crate::error::{Error, Result};
use crate::{bail, ensure};

/// A tokenizer.json split at its top level without building a tree of the vocabulary:
/// every section but the model, and the model's fields but `vocab` and `merges`, as
/// values (small); `vocab` and `merges` as the file's own text, checked by streaming
/// through them. (A `serde_json::Value` of Gemma 3's 262k-token vocabulary and 515k
/// merges took hundreds of MiB.)
pub(crate) struct Split<'a> {
    /// Every top-level section except `model`.
    pub top: Map<String, Value>,
    /// The model's fields except `vocab` and `merges`.
    pub model: Map<String, Value>,
    vocab: Option<&'a RawValue>,
    merges: Option<&'a RawValue>,
}

/// Splits `text` (a whole tokenizer.json) into its sections.
pub(crate) fn split(text: &str) -> Result<Split<'_>> {
    let top = object_of(text, "tokenizer.json")?;
    let mut out = Split {
        top: Map::new(),
        model: Map::new(),
        vocab: None,
        merges: None,
    };
    let mut model = None;
    for (k, v) in top {
        if k == "model" {
            model = Some(v);
        } else {
            out.top.insert(k, value_of(v)?);
        }
    }
    let model = model.ok_or_else(|| Error::new("tokenizer.json has no model"))?;
    for (k, v) in object_of(model.get(), "model")? {
        match k.as_str() {
            "vocab" => out.vocab = Some(v),
            "merges" => out.merges = Some(v),
            _ => {
                out.model.insert(k, value_of(v)?);
            }
        }
    }
    Ok(out)
}

/// The members of a JSON object, in file order (a repeated key: the last one, as
/// `serde_json` and the crate read it), or "`what` is not a JSON object".
fn object_of<'a>(text: &'a str, what: &str) -> Result<Vec<(String, &'a RawValue)>> {
    match serde_json::from_str::<HashMap<String, &RawValue>>(text) {
        Ok(map) => {
            let mut members: Vec<_> = map.into_iter().collect();
            // The order the members came in (offsets into one string) for determinism.
            members.sort_by_key(|(_, v)| v.get().as_ptr() as usize);
            Ok(members)
        }
        // Another JSON type, or JSON too deep for serde_json (which skipping a value does
        // not notice): the full parse, only on this error path, tells which.
        Err(e) if e.is_data() => match serde_json::from_str::<Value>(text) {
            Ok(_) => bail!("{what} is not a JSON object"),
            Err(e) => bail!("parsing tokenizer.json: {e}"),
        },
        Err(e) => bail!("parsing tokenizer.json: {e}"),
    }
}

fn value_of(v: &RawValue) -> Result<Value> {
    serde_json::from_str(v.get()).map_err(|e| Error::new(format!("parsing tokenizer.json: {e}")))
}

/// A tokenizer.json reduced to what the `tokenizers` crate may see.
pub(crate) struct Checked {
    /// The checked sections other than the model (version, normalizer, pre-tokenizer,
    /// added tokens), to give the crate.
    pub value: Value,
    /// The checked model.
    pub model: CheckedModel,
    /// (content, id) of every added token, to check the ids the crate gives them.
    pub added: Vec<(String, u32)>,
}

/// A checked model, in the form the crate is given it.
pub(crate) enum CheckedModel {
    /// A BPE model's checked fields, and its vocabulary and merges as collected while
    /// they were checked, for the crate's `BpeBuilder`.
    Bpe {
        fields: Map<String, Value>,
        vocab: Vocab,
        merges: Merges,
    },
    /// Another model type (`WordPiece`, `WordLevel`, `Unigram`) as JSON text for its
    /// deserializer: the checked fields, and `vocab` copied from the file after every
    /// entry was checked.
    Text { ty: String, text: String },
}

/// Checks a split tokenizer.json and builds what the crate gets from it.
pub(crate) fn check_tokenizer_json(json: &Split) -> Result<Checked> {
    let top = &json.top;
    let mut out = Map::new();
    if let Some(v) = top.get("version") {
        out.insert("version".into(), v.clone());
    }
    let model = check_model(json)?;

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
        model,
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

fn check_model(json: &Split) -> Result<CheckedModel> {
    let map = &json.model;
    let starts = |v: Option<&RawValue>, c: char| v.is_some_and(|v| v.get().trim_start().starts_with(c));
    let ty = match map.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => bail!("model.type is not a string"),
        // Files from before "type" existed: the crate tries BPE, WordPiece, WordLevel,
        // Unigram in turn and takes the first that parses. Decide here instead, so a
        // BPE model whose merges are refused is not quietly read as WordPiece.
        None if starts(json.vocab, '[') => "Unigram".to_owned(),
        None if json.merges.is_some() => "BPE".to_owned(),
        None => "WordPiece".to_owned(),
    };
    let keys: &[&str] = match ty.as_str() {
        "BPE" => {
            let (vocab, merges) = check_bpe(json)?;
            let keys = [
                "dropout",
                "unk_token",
                "continuing_subword_prefix",
                "end_of_word_suffix",
                "fuse_unk",
                "byte_fallback",
                "ignore_merges",
            ];
            let Value::Object(fields) = keep(map, &ty, &keys) else {
                unreachable!("keep builds an object")
            };
            return Ok(CheckedModel::Bpe { fields, vocab, merges });
        }
        "WordPiece" => {
            vocab_map(json.vocab)?;
            opt_str(map, "model", "unk_token", MAX_TOKEN_BYTES)?;
            // Put in front of every candidate substring of every word.
            opt_str(map, "model", "continuing_subword_prefix", MAX_AFFIX_BYTES)?;
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
            vocab_map(json.vocab)?;
            opt_str(map, "model", "unk_token", MAX_TOKEN_BYTES)?;
            &["unk_token"]
        }
        "Unigram" => {
            let n = unigram_vocab(json.vocab)?;
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
    // The checked fields, then the vocabulary as the file has it (checked entry by entry
    // above): one JSON object, read by the crate's model type directly.
    let mut text = serde_json::to_string(&keep(map, &ty, keys)).expect("a JSON value serializes");
    text.pop(); // the closing brace
    if let Some(v) = json.vocab {
        text.push_str(",\"vocab\":");
        text.push_str(v.get());
    }
    text.push('}');
    Ok(CheckedModel::Text { ty, text })
}

/// Runs a streaming check over `raw` with `visitor`, which records its own error in `err`
/// (the serde error it returns only stops the walk). A serde error with nothing
/// recorded is a wrong JSON type: `wrong_type` says what was expected.
fn stream<'de, V: Visitor<'de>>(
    raw: &'de RawValue,
    visitor: V,
    err: &RefCell<Option<Error>>,
    wrong_type: &str,
) -> Result<V::Value> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match (&mut de).deserialize_any(visitor) {
        Ok(v) => Ok(v),
        Err(e) => Err(err.borrow_mut().take().unwrap_or_else(|| {
            if e.is_data() {
                Error::new(wrong_type.to_owned())
            } else {
                Error::new(format!("parsing tokenizer.json: {e}"))
            }
        })),
    }
}

/// Records `e` for [`stream`] and stops the walk.
fn fail<E: serde::de::Error>(slot: &RefCell<Option<Error>>, e: Error) -> E {
    *slot.borrow_mut() = Some(e);
    E::custom("checked")
}

/// Checks a `{"token": id}` vocabulary: size, token lengths, ids below the limit, and no
/// id given to two tokens (the crate would keep one of them at random). Returns it (a
/// repeated token: the last one, as the crate reads it).
fn vocab_map(v: Option<&RawValue>) -> Result<Vocab> {
    let Some(raw) = v else {
        bail!("model has no vocab");
    };
    struct Check<'e>(&'e RefCell<Option<Error>>);
    impl<'de> Visitor<'de> for Check<'_> {
        type Value = Vocab;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> std::result::Result<Vocab, A::Error> {
            let mut vocab = Vocab::default();
            while let Some((text, id)) = entries.next_entry::<String, Value>()? {
                let r = (|| -> Result<u32> {
                    ensure!(
                        vocab.len() < MAX_VOCAB_SIZE,
                        "model.vocab has more than the limit of {MAX_VOCAB_SIZE} entries"
                    );
                    if text.len() > MAX_TOKEN_BYTES {
                        bail!(
                            "model.vocab holds a token of {} bytes ({}), more than the limit of {MAX_TOKEN_BYTES}",
                            text.len(),
                            quote(&text)
                        );
                    }
                    let field = format!("model.vocab[{}]", quote(&text));
                    let id = id
                        .as_u64()
                        .ok_or_else(|| Error::new(format!("{field} is not a non-negative integer id")))?;
                    check_id(&field, id)
                })();
                match r {
                    Ok(id) => {
                        vocab.insert(text, id);
                    }
                    Err(e) => return Err(fail(self.0, e)),
                }
            }
            Ok(vocab)
        }
    }
    let err = RefCell::new(None);
    let vocab = stream(raw, Check(&err), &err, "model.vocab is not a JSON object")?;
    let mut owner: HashMap<u32, &str> = HashMap::with_capacity(vocab.len());
    for (text, &id) in vocab.iter() {
        if let Some(prev) = owner.insert(id, text) {
            let (a, b) = if prev < text.as_str() {
                (prev, text.as_str())
            } else {
                (text.as_str(), prev)
            };
            bail!("model.vocab gives id {id} to both {} and {}", quote(a), quote(b));
        }
    }
    drop(owner);
    Ok(vocab)
}

/// Checks a BPE model; returns its vocabulary and merges (`"a b"` strings split, the
/// `#version` lines the crate skips left out).
fn check_bpe(json: &Split) -> Result<(Vocab, Merges)> {
    let map = &json.model;
    let vocab = vocab_map(json.vocab)?;
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
    let Some(raw) = json.merges else {
        bail!("model has vocab but no merges");
    };
    struct Check<'e> {
        err: &'e RefCell<Option<Error>>,
        prefix: &'e str,
    }
    impl<'de> Visitor<'de> for Check<'_> {
        type Value = Merges;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> std::result::Result<Merges, A::Error> {
            let (mut i, mut pairs) = (0usize, 0usize);
            let mut merges = Merges::new();
            while let Some(m) = items.next_element::<Value>()? {
                match check_merge(i, m, self.prefix, &mut pairs) {
                    Ok(Some(pair)) => merges.push(pair),
                    Ok(None) => {}
                    Err(e) => return Err(fail(self.err, e)),
                }
                i += 1;
            }
            if pairs != 0 && pairs != i {
                return Err(fail(
                    self.err,
                    Error::new("model.merges mixes \"a b\" strings and [a, b] pairs"),
                ));
            }
            Ok(merges)
        }
    }
    let err = RefCell::new(None);
    let merges = stream(raw, Check { err: &err, prefix }, &err, "model.merges is not an array")?;
    Ok((vocab, merges))
}

/// Checks merge `i`; counts the `[a, b]` pairs. Returns the pair, or `None` for a
/// `"#version..."` line (the crate skips those in the string form).
fn check_merge(i: usize, m: Value, prefix: &str, pairs: &mut usize) -> Result<Option<(String, String)>> {
    ensure!(
        i < MAX_MERGES,
        "model.merges has more than the limit of {MAX_MERGES} entries"
    );
    let (a, b, version) = match &m {
        // The crate's old form: "a b", exactly one space.
        Value::String(s) => {
            let mut parts = s.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => (a, b, s.starts_with("#version")),
                _ if s.starts_with("#version") => return Ok(None),
                _ => bail!(
                    "model.merges[{i}] = {} is not two tokens separated by one space",
                    quote(s)
                ),
            }
        }
        Value::Array(p) => {
            *pairs += 1;
            match p.as_slice() {
                [Value::String(a), Value::String(b)] => (a.as_str(), b.as_str(), false),
                _ => bail!("model.merges[{i}] is not a pair of strings"),
            }
        }
        _ => bail!("model.merges[{i}] is neither a string nor a pair of strings"),
    };
    if version {
        return Ok(None);
    }
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
    Ok(Some((a.to_owned(), b.to_owned())))
}

/// Checks a Unigram `[[piece, score], ...]` vocabulary; returns its size.
fn unigram_vocab(v: Option<&RawValue>) -> Result<usize> {
    let Some(raw) = v else {
        bail!("model has no vocab");
    };
    struct Check<'e> {
        err: &'e RefCell<Option<Error>>,
        n: &'e RefCell<usize>,
    }
    impl<'de> Visitor<'de> for Check<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> std::result::Result<(), A::Error> {
            let mut i = 0usize;
            while let Some(p) = items.next_element::<Value>()? {
                if let Err(e) = check_piece(i, &p) {
                    return Err(fail(self.err, e));
                }
                i += 1;
            }
            *self.n.borrow_mut() = i;
            Ok(())
        }
    }
    let (err, n) = (RefCell::new(None), RefCell::new(0));
    stream(
        raw,
        Check { err: &err, n: &n },
        &err,
        "model.vocab of a Unigram model is not an array",
    )?;
    Ok(n.into_inner())
}

/// Checks piece `i` of a Unigram vocabulary.
fn check_piece(i: usize, p: &Value) -> Result<()> {
    ensure!(
        i < MAX_VOCAB_SIZE,
        "model.vocab has more than the limit of {MAX_VOCAB_SIZE} entries"
    );
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
    Ok(())
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
