//! Hugging Face tokenizer directories: `tokenizer.json` (encoded by the `tokenizers`
//! crate), `tokenizer_config.json` and `generation_config.json`.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::guard::{contain, one_line};
use super::hf_check;
use super::limits::{MAX_CONFIG_JSON_BYTES, MAX_TOKENIZER_JSON_BYTES, MAX_VOCAB_SIZE};
use super::roles::SpecialIds;
use super::{Engine, Parts, PieceStyle, TokenKind};
use crate::bail;
use crate::error::{Error, Result};

/// Encoded once at load time to catch configurations that panic on any text: ASCII,
/// accents, CJK, an emoji, digits, whitespace runs.
const PROBE_TEXT: &str = "Hello, world! Ça va? 日本語 👋 12345\n\t  end";

/// A token text for an error message, cut to a readable length.
fn short_text(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Reads a whole file of at most `limit` bytes; `None` if it does not exist. The size is
/// checked before reading, and the read stops at the limit in case the file grows (or is
/// a device) meanwhile.
fn read_limited(path: &Path, limit: u64) -> Result<Option<String>> {
    let name = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::new(format!("reading {}: {e}", path.display()))),
    };
    let too_big = |len: u64| Error::new(format!("{name} is {len} bytes, more than the limit of {limit}"));
    let len = file
        .metadata()
        .map_err(|e| Error::new(format!("reading {}: {e}", path.display())))?
        .len();
    if len > limit {
        return Err(too_big(len));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::new(format!("reading {}: {e}", path.display())))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::new(format!("{name} is not UTF-8")))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_limited(path, MAX_CONFIG_JSON_BYTES)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::new(format!("parsing {}: {e}", path.display())))
}

/// Whether `v` holds, anywhere inside, an object with `"type": ty` that satisfies `pred`.
fn has_type(v: &Value, ty: &str, pred: &dyn Fn(&Value) -> bool) -> bool {
    match v {
        Value::Object(map) => {
            (map.get("type").and_then(Value::as_str) == Some(ty) && pred(v))
                || map.values().any(|c| has_type(c, ty, pred))
        }
        Value::Array(items) => items.iter().any(|c| has_type(c, ty, pred)),
        _ => false,
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` (both forms occur in tokenizer_config.json).
fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("content").and_then(Value::as_str),
        _ => None,
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|x| x.as_u64())
            .filter_map(|x| u32::try_from(x).ok())
            .collect(),
        other => other.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
    }
}

pub(super) fn load(dir: &Path) -> Result<Parts> {
    let tj_path = dir.join("tokenizer.json");
    let raw = read_limited(&tj_path, MAX_TOKENIZER_JSON_BYTES)?
        .ok_or_else(|| Error::new(format!("no tokenizer.json in {}", dir.display())))?;
    // Parsed once: the sections as values, the vocabulary and merges streamed through
    // (checked) and copied as text into the model the crate reads directly.
    let (json, checked) = {
        let split = hf_check::split(&raw)?;
        let checked = hf_check::check_tokenizer_json(&split)?;
        let mut json = split.top;
        json.insert("model".into(), Value::Object(split.model));
        (Value::Object(json), checked)
    };
    drop(raw);
    let model_unk = json
        .pointer("/model/unk_token")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let tok = contain("loading tokenizer.json", || {
        crate_tokenizer(checked.value, checked.model)
    })??;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    // The vocabulary, including added tokens; ids nobody claims stay empty.
    let (vocab, added_decoder) = contain("reading the vocabulary", || {
        (tok.get_vocab(true), tok.get_added_tokens_decoder())
    })?;
    // The crate numbers added tokens itself (after the model's vocabulary) and only warns
    // when that differs from the id in the file; the model's embeddings follow the file.
    for (content, id) in &checked.added {
        match vocab.get(content) {
            Some(got) if got == id => {}
            Some(got) => bail!(
                "added_tokens: {:?} has id {id} in tokenizer.json but {got} in the loaded vocabulary (ids must be consistent)",
                short_text(content)
            ),
            None => bail!("added_tokens: {:?} did not get an id", short_text(content)),
        }
    }
    // Every id is below MAX_VOCAB_SIZE (model ids were checked, added ones just now); the
    // checked arithmetic keeps that an error rather than an allocation if it ever fails.
    let n = vocab
        .values()
        .map(|&id| (id as usize).checked_add(1))
        .try_fold(0usize, |m, x| x.map(|x| m.max(x)))
        .filter(|&n| n <= MAX_VOCAB_SIZE)
        .ok_or_else(|| {
            Error::new(format!(
                "tokenizer.json has an id at or above the limit of {MAX_VOCAB_SIZE}"
            ))
        })?;
    if n == 0 {
        return Err(Error::new("tokenizer.json has an empty vocabulary"));
    }
    let mut tokens = vec![String::new(); n];
    let mut kinds = vec![TokenKind::Unused; n];
    for (text, &id) in &vocab {
        tokens[id as usize] = text.clone();
        kinds[id as usize] = TokenKind::Normal;
    }
    for (id, added) in added_decoder {
        if let Some(slot) = kinds.get_mut(id as usize) {
            *slot = if added.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            tokens[id as usize] = added.content.clone();
        }
    }
    // A configuration that loads but panics on the first text (a corrupt charsmap, say)
    // is refused now rather than on every request. Errors (an unknown word without an
    // unknown token) are a property of the input, not the file.
    contain("encoding a test text with tokenizer.json", || {
        let _ = tok.encode(PROBE_TEXT, false);
    })?;
    if let Some(map) = config.get("added_tokens_decoder").and_then(Value::as_object) {
        for (k, v) in map {
            let Ok(id) = k.parse::<usize>() else { continue };
            if id < n && v.get("special").and_then(Value::as_bool) == Some(true) {
                kinds[id] = TokenKind::Control;
            }
        }
    }

    let decoder = json.get("decoder").unwrap_or(&Value::Null);
    let pre = json.get("pre_tokenizer").unwrap_or(&Value::Null);
    let normalizer = json.get("normalizer").unwrap_or(&Value::Null);
    let any = |_: &Value| true;
    let style = if has_type(decoder, "ByteLevel", &any) || has_type(pre, "ByteLevel", &any) {
        PieceStyle::ByteLevel
    } else if has_type(decoder, "Metaspace", &any)
        || has_type(pre, "Metaspace", &any)
        || has_type(decoder, "ByteFallback", &any)
        || has_type(decoder, "Replace", &|v| {
            v.get("content").and_then(Value::as_str) == Some(" ")
        })
    {
        PieceStyle::Metaspace
    } else {
        PieceStyle::Raw
    };

    // Where the encoder puts "▁" in front of the text: a Metaspace pre-tokenizer
    // ("always" also after each added token, "first" only at the start), or a normalizer
    // that prepends it to every piece of text between added tokens.
    let scheme = |v: &Value| -> Option<String> {
        if let Some(s) = v.get("prepend_scheme").and_then(Value::as_str) {
            return Some(s.to_owned());
        }
        v.get("add_prefix_space")
            .and_then(Value::as_bool)
            .map(|b| if b { "always" } else { "never" }.to_owned())
    };
    let mut metaspace_scheme = None;
    find_first(pre, "Metaspace", &mut |v| metaspace_scheme = scheme(v));
    let prepend_normalizer = has_type(normalizer, "Prepend", &|v| {
        v.get("prepend").and_then(Value::as_str) == Some("▁")
    });
    let (space_prefix, space_prefix_after_special) = match metaspace_scheme.as_deref() {
        Some("always") => (true, true),
        Some("first") => (true, false),
        _ if prepend_normalizer => (true, true),
        _ => (false, false),
    };

    let lookup = |v: Option<&Value>| v.and_then(token_content).and_then(|t| vocab.get(t).copied());
    let gen_eos = gen.get("eos_token_id").map(ids_of).unwrap_or_default();
    let bos = lookup(config.get("bos_token"))
        .or_else(|| {
            gen.get("bos_token_id")
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
        })
        .filter(|&id| (id as usize) < n);
    let eos = lookup(config.get("eos_token"))
        .or(gen_eos.first().copied())
        .filter(|&id| (id as usize) < n);
    let unk = lookup(config.get("unk_token")).or_else(|| model_unk.as_deref().and_then(|t| vocab.get(t).copied()));
    let pad = lookup(config.get("pad_token"));
    let ids = SpecialIds {
        bos,
        eos,
        unk,
        pad,
        ..SpecialIds::default()
    };

    let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        // No setting: BOS if the post-processor template starts with it.
        None => bos.is_some_and(|b| {
            let text = tokens[b as usize].as_str();
            let mut starts = false;
            find_first(
                json.get("post_processor").unwrap_or(&Value::Null),
                "TemplateProcessing",
                &mut |v| {
                    starts = v.pointer("/single/0/SpecialToken/id").and_then(Value::as_str) == Some(text);
                },
            );
            starts
        }),
    };

    let chat_template = match config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
            };
            named("default")
                .or_else(|| list.first().and_then(|t| t.get("template").and_then(Value::as_str)))
                .map(str::to_owned)
        }
        _ => read_limited(&dir.join("chat_template.jinja"), MAX_CONFIG_JSON_BYTES)?,
    };

    Ok(Parts {
        tokens,
        kinds,
        style,
        engine: Engine::HfDir(Box::new(tok)),
        split_specials: false,
        rstrip_specials: false,
        ids,
        extra_eog: gen_eos.into_iter().filter(|&id| (id as usize) < n).collect(),
        add_bos,
        space_prefix,
        space_prefix_after_special,
        chat_template,
    })
}

/// The crate's tokenizer from the checked parts: a BPE model from the vocabulary and merges
/// collected while checking them, through the crate's builder with the fields its
/// deserializer would give it; another model type read from its JSON text by that type's
/// own deserializer (the crate's `Tokenizer` deserializer would first buffer the whole
/// model into two JSON trees); then the normalizer, the pre-tokenizer and the added
/// tokens, as the crate's deserializer adds them.
fn crate_tokenizer(rest: Value, model: hf_check::CheckedModel) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::{bpe::BPE, unigram::Unigram, wordlevel::WordLevel, wordpiece::WordPiece, ModelWrapper};
    let err = |e: serde_json::Error| Error::new(format!("loading tokenizer.json: {}", one_line(&e.to_string())));
    let model = match model {
        hf_check::CheckedModel::Bpe { fields, vocab, merges } => {
            fn field<T: serde::de::DeserializeOwned>(
                fields: &serde_json::Map<String, Value>,
                key: &str,
            ) -> Result<Option<T>> {
                match fields.get(key) {
                    None => Ok(None),
                    Some(v) => Option::<T>::deserialize(v).map_err(|e| {
                        Error::new(format!(
                            "loading tokenizer.json: model.{key}: {}",
                            one_line(&e.to_string())
                        ))
                    }),
                }
            }
            let mut b = BPE::builder();
            if let Some(x) = field::<f32>(&fields, "dropout")? {
                b = b.dropout(x);
            }
            if let Some(x) = field::<String>(&fields, "unk_token")? {
                b = b.unk_token(x);
            }
            if let Some(x) = field::<String>(&fields, "continuing_subword_prefix")? {
                b = b.continuing_subword_prefix(x);
            }
            if let Some(x) = field::<String>(&fields, "end_of_word_suffix")? {
                b = b.end_of_word_suffix(x);
            }
            if let Some(x) = field::<bool>(&fields, "fuse_unk")? {
                b = b.fuse_unk(x);
            }
            if let Some(x) = field::<bool>(&fields, "byte_fallback")? {
                b = b.byte_fallback(x);
            }
            if let Some(x) = field::<bool>(&fields, "ignore_merges")? {
                b = b.ignore_merges(x);
            }
            let bpe = b
                .vocab_and_merges(vocab, merges)
                .build()
                .map_err(|e| Error::new(format!("loading tokenizer.json: {}", one_line(&e.to_string()))))?;
            ModelWrapper::BPE(bpe)
        }
        hf_check::CheckedModel::Text { ty, text } => match ty.as_str() {
            "WordPiece" => ModelWrapper::WordPiece(serde_json::from_str::<WordPiece>(&text).map_err(err)?),
            "WordLevel" => ModelWrapper::WordLevel(serde_json::from_str::<WordLevel>(&text).map_err(err)?),
            "Unigram" => ModelWrapper::Unigram(serde_json::from_str::<Unigram>(&text).map_err(err)?),
            other => bail!("tokenizer.json: model type {other:?}"),
        },
    };
    let Value::Object(mut rest) = rest else {
        bail!("tokenizer.json: checked sections are not an object");
    };
    if let Some(v) = rest.remove("version") {
        if v.as_str() != Some("1.0") {
            bail!(
                "loading tokenizer.json: Unknown tokenizer version '{}'",
                one_line(&v.to_string())
            );
        }
    }
    let mut tok = tokenizers::Tokenizer::new(model);
    if let Some(v) = rest.remove("normalizer") {
        tok.with_normalizer(serde_json::from_value::<Option<tokenizers::NormalizerWrapper>>(v).map_err(err)?);
    }
    if let Some(v) = rest.remove("pre_tokenizer") {
        tok.with_pre_tokenizer(serde_json::from_value::<Option<tokenizers::PreTokenizerWrapper>>(v).map_err(err)?);
    }
    let added: Vec<tokenizers::AddedToken> = match rest.remove("added_tokens") {
        Some(v) => serde_json::from_value(v).map_err(err)?,
        None => Vec::new(),
    };
    tok.add_tokens(&added);
    Ok(tok)
}

/// Calls `f` on the first object (depth first) with `"type": ty`.
fn find_first(v: &Value, ty: &str, f: &mut dyn FnMut(&Value)) -> bool {
    match v {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some(ty) {
                f(v);
                return true;
            }
            map.values().any(|c| find_first(c, ty, f))
        }
        Value::Array(items) => items.iter().any(|c| find_first(c, ty, f)),
        _ => false,
    }
}
