//! Hugging Face tokenizer directories: `tokenizer.json` (encoded by the `tokenizers`
//! crate), `tokenizer_config.json` and `generation_config.json`.

use std::path::Path;
use std::str::FromStr;

use serde_json::Value;

use super::roles::SpecialIds;
use super::{Engine, Parts, PieceStyle, TokenKind};
use crate::error::{Error, Result};

fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::new(format!("reading {}: {e}", path.display()))),
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
    let raw = match std::fs::read_to_string(&tj_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::new(format!("no tokenizer.json in {}", dir.display())))
        }
        Err(e) => return Err(Error::new(format!("reading {}: {e}", tj_path.display()))),
    };
    let json: Value = serde_json::from_str(&raw).map_err(|e| Error::new(format!("parsing tokenizer.json: {e}")))?;
    let tok = tokenizers::Tokenizer::from_str(&raw).map_err(|e| Error::new(format!("loading tokenizer.json: {e}")))?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    // The vocabulary, including added tokens; ids nobody claims stay empty.
    let vocab = tok.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    if n == 0 {
        return Err(Error::new("tokenizer.json has an empty vocabulary"));
    }
    let mut tokens = vec![String::new(); n];
    let mut kinds = vec![TokenKind::Unused; n];
    for (text, &id) in &vocab {
        tokens[id as usize] = text.clone();
        kinds[id as usize] = TokenKind::Normal;
    }
    for (id, added) in tok.get_added_tokens_decoder() {
        if let Some(slot) = kinds.get_mut(id as usize) {
            *slot = if added.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            tokens[id as usize] = added.content.clone();
        }
    }
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
    let unk = lookup(config.get("unk_token")).or_else(|| {
        json.pointer("/model/unk_token")
            .and_then(Value::as_str)
            .and_then(|t| vocab.get(t).copied())
    });
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
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
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
