//! Hostile tokenizer files: tokenizer.json, tokenizer_config.json and GGUF
//! `tokenizer.ggml.*` metadata. Each must load as a one-line `Err` naming the field (and
//! the limit, where one applies), never a panic, an abort or an allocation sized by the
//! file. Beside each, the legitimate version of the same file loads and encodes, so a
//! failure is the hostile part's doing.

mod common;

use std::path::Path;

use common::{real_model, temp_dir, Rng, GEMMA3, SMOLLM2};
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::tokenizer::export::hf_tokenizer_files;
use ffai::tokenizer::limits::{
    MAX_ADDED_TOKENS, MAX_AFFIX_BYTES, MAX_CONFIG_JSON_BYTES, MAX_PATTERN_BYTES, MAX_SPECIAL_TEXT_BYTES,
    MAX_SPECIAL_TOKEN_BYTES, MAX_TOKENIZER_JSON_BYTES, MAX_TOKEN_BYTES, MAX_VOCAB_SIZE, MAX_WORDPIECE_WORD_CHARS,
};
use ffai::tokenizer::Tokenizer;
use serde_json::{json, Value};

// --- tokenizer.json ---

/// A byte-level BPE tokenizer.json: "hello world" is [13, 16, 4, 9].
fn base() -> Value {
    serde_json::from_str(common::TINY_TOKENIZER_JSON).unwrap()
}

/// `v` with the value at JSON pointer `at` replaced (the parent must exist).
fn with(mut v: Value, at: &str, new: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').unwrap();
    match v.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}")) {
        Value::Object(m) => {
            m.insert(key.to_owned(), new);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = new,
        _ => panic!("{parent} is not a container"),
    }
    v
}

fn load_dir_files(files: &[(&str, &[u8])]) -> Result<Tokenizer, String> {
    let dir = temp_dir("hostile-tok");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let r = Tokenizer::from_hf_dir(&dir).map_err(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    r
}

fn load(v: &Value) -> Result<Tokenizer, String> {
    load_dir_files(&[("tokenizer.json", v.to_string().as_bytes())])
}

/// The error `v` gives; it must be one line and hold every one of `needles`.
#[track_caller]
fn err(v: &Value, needles: &[&str]) -> String {
    let e = match load(v) {
        Ok(_) => panic!("hostile tokenizer.json loaded (expected {needles:?})"),
        Err(e) => e,
    };
    assert!(!e.contains('\n'), "not one line: {e}");
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    e
}

#[track_caller]
fn encodes(v: &Value, text: &str, ids: &[u32]) {
    let tok = load(v).unwrap_or_else(|e| panic!("legit tokenizer.json refused: {e}"));
    assert_eq!(tok.encode(text, false).unwrap(), ids, "{text:?}");
}

#[test]
fn the_base_tokenizer_loads_and_encodes() {
    encodes(&base(), "hello world", &[13, 16, 4, 9]);
    encodes(&base(), "hello<|turn|>hello", &[13, 17, 13]);
}

/// The pipelines of real tokenizer.json files (as published for these models) pass the
/// checks unchanged.
#[test]
fn real_pipelines_are_accepted() {
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let o200k = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let deepseek = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
    let byte_level_bpe = [
        (
            "gpt2",
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        ),
        (
            "llama3",
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(llama3), byte_level.clone()]}),
        ),
        (
            "qwen2",
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(qwen2), byte_level.clone()]}),
        ),
        (
            "o200k",
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(o200k), byte_level.clone()]}),
        ),
        (
            "deepseek-v3",
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                split(r"\p{N}{1,3}"), split("[一-龥\u{3040}-ゟ゠-ヿ]+"), split(deepseek), byte_level.clone()
            ]}),
        ),
    ];
    for (name, normalizer, pre) in byte_level_bpe {
        let v = with(with(base(), "/normalizer", normalizer), "/pre_tokenizer", pre);
        let v = with(v, "/model/ignore_merges", json!(true));
        let tok = load(&v).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(tok.encode("hello world", false).unwrap(), [13, 16, 4, 9], "{name}");
    }
    // SentencePiece as BPE: Llama 2 (normalizer) and Mistral (Metaspace) styles.
    let spm = |normalizer: Value, pre: Value| {
        let v = with(base(), "/normalizer", normalizer);
        let v = with(v, "/pre_tokenizer", pre);
        let v = with(v, "/added_tokens", json!([]));
        let v = with(v, "/model/byte_fallback", json!(true));
        let v = with(v, "/model/fuse_unk", json!(true));
        let v = with(
            v,
            "/model/vocab",
            json!({"<unk>": 0, "▁": 1, "h": 2, "i": 3, "▁h": 4, "▁hi": 5, "<0x0A>": 6}),
        );
        with(v, "/model/merges", json!(["▁ h", "▁h i"]))
    };
    let llama2 = spm(
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        Value::Null,
    );
    encodes(&llama2, "hi hi\n", &[5, 5, 6]);
    let mistral = spm(
        Value::Null,
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
    );
    encodes(&mistral, "hi hi\n", &[5, 5, 6]);
    // BERT: its normalizer and pre-tokenizer with a WordPiece model.
    let bert = with(
        with(
            base(),
            "/normalizer",
            json!({"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                                           "strip_accents": null, "lowercase": true}),
        ),
        "/pre_tokenizer",
        json!({"type": "BertPreTokenizer"}),
    );
    let bert = with(
        with(bert, "/added_tokens", json!([])),
        "/model",
        json!({"type": "WordPiece", "unk_token": "[UNK]",
        "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
        "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "!": 3, "##s": 4}}),
    );
    encodes(&bert, "Hellos WORLD!", &[1, 4, 2, 3]);
}

#[test]
fn vocab_ids_beyond_the_limit_are_refused() {
    // On main this allocated 4 billion token slots (103 GB) and aborted.
    let limit = MAX_VOCAB_SIZE.to_string();
    let e = err(
        &with(base(), "/model/vocab/w", json!(4294967295u64)),
        &["model.vocab[\"w\"] = 4294967295", &limit],
    );
    assert!(e.starts_with("tokenizer in "), "{e}");
    err(
        &with(base(), "/model/vocab/w", json!(MAX_VOCAB_SIZE)),
        &["model.vocab[\"w\"]", &limit],
    );
    err(
        &with(base(), "/model/vocab/w", json!(u64::MAX)),
        &["model.vocab[\"w\"]", &limit],
    );
    // Just below the limit is a legal (sparse) vocabulary.
    let tok = load(&with(base(), "/model/vocab/w", json!(1 << 16))).unwrap();
    assert_eq!(tok.vocab_size(), (1 << 16) + 1);
    for bad in [json!(-1), json!(2.5), json!("7"), json!(null)] {
        err(
            &with(base(), "/model/vocab/w", bad),
            &["model.vocab[\"w\"] is not a non-negative integer id"],
        );
    }
    // Two tokens sharing an id: the crate would keep one of them at random.
    err(
        &with(base(), "/model/vocab/w", json!(2)),
        &["model.vocab gives id 2 to both"],
    );
    err(
        &with(base(), "/model/vocab", json!(["h", "e"])),
        &["model.vocab is not a JSON object"],
    );
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    let mut v = base();
    v["model"]["vocab"][&long] = json!(20);
    err(
        &v,
        &["model.vocab holds a token of 16385 bytes", &MAX_TOKEN_BYTES.to_string()],
    );
}

/// A WordPiece-style BPE: subwords after the first carry "##".
fn prefixed_bpe(merges: Value) -> Value {
    let v = with(base(), "/pre_tokenizer", json!({"type": "Whitespace"}));
    let v = with(v, "/added_tokens", json!([]));
    let v = with(v, "/model/continuing_subword_prefix", json!("##"));
    let v = with(
        v,
        "/model/vocab",
        json!({"a": 0, "##b": 1, "ab": 2, "b": 3, "é": 4, "##é": 5, "aé": 6}),
    );
    with(v, "/model/merges", merges)
}

#[test]
fn merges_are_checked_against_the_subword_prefix() {
    encodes(&prefixed_bpe(json!([["a", "##b"], ["a", "##é"]])), "ab aé", &[2, 6]);
    // On main: the crate slices "b"[2..] and panics (exit 101).
    err(
        &prefixed_bpe(json!([["a", "b"]])),
        &[
            "model.merges[0]",
            "\"b\" does not start with continuing_subword_prefix \"##\"",
        ],
    );
    let v = with(
        prefixed_bpe(json!(["a é"])),
        "/model/continuing_subword_prefix",
        json!("#"),
    );
    err(&v, &["model.merges[0]", "continuing_subword_prefix \"#\""]);
    err(
        &prefixed_bpe(json!(["a ##b c"])),
        &["model.merges[0]", "not two tokens separated by one space"],
    );
    err(&prefixed_bpe(json!(["a ##b", ["a", "##é"]])), &["model.merges mixes"]);
    err(
        &prefixed_bpe(json!([["a"]])),
        &["model.merges[0] is not a pair of strings"],
    );
    err(&prefixed_bpe(json!([7])), &["model.merges[0] is neither"]);
    let long = format!("##{}", "b".repeat(MAX_TOKEN_BYTES));
    err(
        &prefixed_bpe(json!([["a", long]])),
        &["model.merges[0] holds a token of 16386 bytes"],
    );
    let v = with(
        base(),
        "/model/continuing_subword_prefix",
        json!("#".repeat(MAX_AFFIX_BYTES + 1)),
    );
    err(
        &v,
        &[
            "model.continuing_subword_prefix is 257 bytes",
            &MAX_AFFIX_BYTES.to_string(),
        ],
    );
    let v = with(
        base(),
        "/model/end_of_word_suffix",
        json!("#".repeat(MAX_AFFIX_BYTES + 1)),
    );
    err(&v, &["model.end_of_word_suffix"]);
    err(&with(base(), "/model/dropout", json!(0.5)), &["model.dropout = 0.5"]);
    encodes(&with(base(), "/model/dropout", json!(0.0)), "hello", &[13]);
    let mut v = base();
    v["model"].as_object_mut().unwrap().remove("merges");
    err(&v, &["model has vocab but no merges"]);
    // A merge naming a token outside the vocabulary is the crate's own (contained) error.
    err(
        &with(base(), "/model/merges/0", json!("h x")),
        &["loading tokenizer.json"],
    );
}

#[test]
fn normalizers_are_checked() {
    let replace = |pattern: Value, content: &str| json!({"type": "Replace", "pattern": pattern, "content": content});
    let norm = |n: Value| with(base(), "/normalizer", n);
    // Legit: SentencePiece-style prefix and spaces, NFKC, lower-casing.
    let legit = json!({"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"}, replace(json!({"String": "x"}), "l")
    ]});
    encodes(&norm(legit), "HExLO", &[13]);

    err(
        &norm(replace(json!({"Regex": "(a+)+$"}), "b")),
        &["normalizer.pattern: regex", "contains a quantifier"],
    );
    err(
        &norm(replace(json!({"Regex": "(?:h|he)*x"}), "b")),
        &["normalizer.pattern: regex", "contains a '|'"],
    );
    err(
        &norm(replace(json!({"Regex": r"(a)\1"}), "b")),
        &["normalizer.pattern", "backreference"],
    );
    err(
        &norm(replace(json!({"Regex": "a{1000}"}), "b")),
        &["normalizer.pattern", "above the limit of 256"],
    );
    let long = "a".repeat(MAX_PATTERN_BYTES + 1);
    err(
        &norm(replace(json!({"String": long}), "b")),
        &["normalizer.pattern is 4097 bytes", "4096"],
    );
    err(
        &norm(replace(json!({"Regex": long}), "b")),
        &["normalizer.pattern is 4097 bytes"],
    );
    err(
        &norm(replace(json!({"Bytes": "a"}), "b")),
        &["normalizer.pattern is not"],
    );
    err(
        &norm(replace(json!({"String": ""}), "b")),
        &["normalizer.pattern is an empty string"],
    );
    err(
        &norm(replace(json!({"String": "a"}), &"b".repeat(MAX_AFFIX_BYTES + 1))),
        &["normalizer.content is 257 bytes"],
    );
    // Eight steps that each make "h" four times longer: 65536x per request.
    let steps: Vec<Value> = (0..8).map(|_| replace(json!({"String": "h"}), "hhhh")).collect();
    err(
        &with(
            norm(json!({"type": "Sequence", "normalizers": steps})),
            "/pre_tokenizer",
            Value::Null,
        ),
        &[
            "normalizer and pre_tokenizer can make a text up to 65536 times longer",
            "1024",
        ],
    );
    // A regex that matches the empty string matches inside multi-byte characters too; on
    // main the crate then panicked on any text with an emoji.
    err(
        &norm(replace(json!({"Regex": "x*"}), "y")),
        &["normalizer.pattern: regex \"x*\": can match the empty string"],
    );
    err(
        &norm(replace(json!({"Regex": r"\s*|(?=a)"}), "y")),
        &["can match the empty string"],
    );
    // Content longer than what it replaces grows the text.
    err(
        &norm(json!({"type": "Sequence", "normalizers": [
            replace(json!({"Regex": "x+"}), &"y".repeat(100)),
            replace(json!({"String": "z"}), &"y".repeat(100))
        ]})),
        &["40000 times longer"],
    );
    err(
        &norm(json!({"type": "Prepend", "prepend": "▁".repeat(100)})),
        &["normalizer.prepend is 300 bytes"],
    );
    let mut deep = json!({"type": "Lowercase"});
    for _ in 0..6 {
        deep = json!({"type": "Sequence", "normalizers": [deep]});
    }
    err(&norm(deep), &["nested more than 4 deep"]);
    err(
        &norm(json!({"type": "Bogus"})),
        &["normalizer.type \"Bogus\" is not a normalizer"],
    );
    err(&norm(json!({"lowercase": true})), &["normalizer has no \"type\""]);
    err(&norm(json!("NFC")), &["normalizer is not a JSON object"]);
    err(
        &norm(json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Nope"}]})),
        &["normalizer.normalizers[1].type"],
    );
}

/// A SentencePiece charsmap: u32 trie size, the trie units, NUL-separated replacements.
fn charsmap(trie: &[u32], normalized: &[u8]) -> String {
    let mut blob = Vec::new();
    blob.extend_from_slice(&((trie.len() * 4) as u32).to_le_bytes());
    for u in trie {
        blob.extend_from_slice(&u.to_le_bytes());
    }
    blob.extend_from_slice(normalized);
    base64(&blob)
}

fn base64(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn precompiled_charsmaps_are_checked() {
    let norm = |blob: String| {
        with(
            base(),
            "/normalizer",
            json!({"type": "Precompiled", "precompiled_charsmap": blob}),
        )
    };
    // A trie that maps nothing (every lookup lands on a unit with the wrong label):
    // every text passes unchanged.
    encodes(&norm(charsmap(&[0; 256], b"")), "hello world", &[13, 16, 4, 9]);
    // A size field of 4 GiB: the crate reserved 8 GiB for the trie before reading it.
    let mut blob = vec![0xff, 0xff, 0xff, 0xff];
    blob.extend_from_slice(&[0; 8]);
    err(
        &norm(base64(&blob)),
        &["normalizer.precompiled_charsmap: trie size 4294967295 exceeds"],
    );
    err(&norm(charsmap(&[], b"")), &["precompiled_charsmap has an empty trie"]);
    err(&norm(base64(&[1, 0])), &["shorter than its 4-byte header"]);
    err(
        &norm("not base64!".into()),
        &["precompiled_charsmap is not valid base64"],
    );
    err(&norm(charsmap(&[0], &[0xff, 0xfe])), &["not UTF-8"]);
    // A replacement of 2,000 bytes: one input byte can become 2,000 (then 4x for the
    // byte-level pre-tokenizer).
    err(
        &norm(charsmap(&[0], "x".repeat(2000).as_bytes())),
        &["8000 times longer"],
    );
}

#[test]
fn a_panic_inside_the_tokenizers_crate_is_an_error() {
    // A well-formed charsmap whose trie points outside itself: the crate indexes out of
    // bounds on the first character it looks up. Loading encodes a probe text, so this is
    // refused at load time instead of failing every request.
    let v = with(
        base(),
        "/normalizer",
        json!({"type": "Precompiled", "precompiled_charsmap": charsmap(&[0xffff_fc00], b"")}),
    );
    err(
        &v,
        &[
            "encoding a test text",
            "the tokenizers library panicked",
            "index out of bounds",
        ],
    );
}

#[test]
fn pre_tokenizers_are_checked() {
    let pre = |p: Value| with(base(), "/pre_tokenizer", p);
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let legit = json!({"type": "Sequence", "pretokenizers": [
        split(r"'s|'t| ?\p{L}+| ?\p{N}+|\s+(?!\S)|\s+"),
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]});
    encodes(&pre(legit.clone()), "hello world", &[13, 16, 4, 9]);

    err(
        &pre(split("(?:a|aa)*b")),
        &["pre_tokenizer.pattern: regex", "backtrack exponentially"],
    );
    let mut bad = legit.clone();
    bad["pretokenizers"][0] = split("(x+x+)+y");
    err(&pre(bad), &["pre_tokenizer.pretokenizers[0].pattern: regex"]);
    err(
        &pre(split("(?<n>a)\\k<n>")),
        &["pre_tokenizer.pattern", "backreference"],
    );
    err(
        &pre(split(r"\s*")),
        &["pre_tokenizer.pattern: regex", "can match the empty string"],
    );
    // On main, length 0 made every encode panic (chunks of zero characters).
    err(
        &pre(json!({"type": "FixedLength", "length": 0})),
        &["pre_tokenizer.length = 0 is outside 1..=16384"],
    );
    encodes(&pre(json!({"type": "FixedLength", "length": 5})), "hello", &[13]);
    err(
        &pre(json!({"type": "Metaspace", "replacement": "ab", "prepend_scheme": "always", "split": true})),
        &["pre_tokenizer.replacement is not a single character"],
    );
    err(
        &pre(json!({"type": "CharDelimiterSplit", "delimiter": ""})),
        &["pre_tokenizer.delimiter"],
    );
    let many: Vec<Value> = (0..70).map(|_| json!({"type": "WhitespaceSplit"})).collect();
    err(
        &pre(json!({"type": "Sequence", "pretokenizers": many})),
        &["more than 64 normalizer and pre-tokenizer steps"],
    );
    err(
        &pre(json!({"type": "Sequence"})),
        &["pre_tokenizer.pretokenizers is not an array"],
    );
    err(
        &pre(json!({"type": "Telepathy"})),
        &["pre_tokenizer.type \"Telepathy\" is not a pre-tokenizer"],
    );
    // Growth counts across normalizer and pre-tokenizer together.
    let v = with(
        pre(json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true})),
        "/normalizer",
        json!({"type": "Replace", "pattern": {"String": "h"}, "content": "h".repeat(200)}),
    );
    err(&v, &["can make a text up to 1200 times longer"]);
}

#[test]
fn added_tokens_are_checked() {
    let limit = MAX_VOCAB_SIZE.to_string();
    err(
        &with(base(), "/added_tokens/2/id", json!(4294967295u64)),
        &["added_tokens[2].id = 4294967295", &limit],
    );
    err(
        &with(base(), "/added_tokens/2/id", json!(-3)),
        &["added_tokens[2].id is missing or not"],
    );
    err(
        &with(base(), "/added_tokens/2/content", json!("")),
        &["added_tokens[2].content is empty"],
    );
    err(
        &with(base(), "/added_tokens/2/content", json!(5)),
        &["added_tokens[2].content is not a string"],
    );
    err(
        &with(
            base(),
            "/added_tokens/2/content",
            json!("<".repeat(MAX_TOKEN_BYTES + 1)),
        ),
        &["added_tokens[2].content is 16385 bytes"],
    );
    // The crate numbers added tokens itself and would only warn about this one.
    err(
        &with(base(), "/added_tokens/2/id", json!(50)),
        &["added_tokens: \"<|turn|>\" has id 50 in tokenizer.json but 17"],
    );
    err(
        &with(base(), "/added_tokens", json!({"id": 1})),
        &["added_tokens is not an array"],
    );
    // Past the limit the crate's quadratic insertion is never reached.
    let many: Vec<Value> = (0..=MAX_ADDED_TOKENS)
        .map(|i| json!({"id": 17 + i, "content": format!("<t{i}>"), "special": true}))
        .collect();
    err(
        &with(base(), "/added_tokens", Value::Array(many)),
        &[&format!(
            "added_tokens has {} entries, more than the limit of {MAX_ADDED_TOKENS}",
            MAX_ADDED_TOKENS + 1
        )],
    );
    // Text: all added tokens go into one matcher.
    let big: Vec<Value> = (0..300)
        .map(|i| json!({"id": 17 + i, "content": format!("<{i}{}>", "x".repeat(16000)), "special": true}))
        .collect();
    err(
        &with(base(), "/added_tokens", Value::Array(big)),
        &[&format!(
            "added_tokens hold more than the limit of {MAX_SPECIAL_TEXT_BYTES} bytes of text"
        )],
    );
    // Normalized ones are normalized at load and kept: 80 kB through a 1024x normalizer.
    let normalized: Vec<Value> = (0..5)
        .map(|i| json!({"id": 17 + i, "content": format!("<{i}{}>", "h".repeat(16000)), "special": false, "normalized": true}))
        .collect();
    let v = with(base(), "/added_tokens", Value::Array(normalized));
    let v = with(v, "/pre_tokenizer", Value::Null);
    let v = with(
        v,
        "/normalizer",
        json!({"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "h"}, "content": "h".repeat(256)},
            {"type": "Lowercase"}, {"type": "ByteLevel"}]}),
    );
    err(
        &v,
        &["added_tokens marked normalized can grow to more than the limit of 67108864 bytes"],
    );
    // Normalized added tokens go through the (checked) normalizer at load.
    let v = with(base(), "/added_tokens/2/normalized", json!(true));
    encodes(&v, "hello<|turn|>", &[13, 17]);
}

#[test]
fn other_model_types_are_checked() {
    let model = |m: Value| {
        let v = with(base(), "/model", m);
        let v = with(v, "/added_tokens", json!([]));
        with(v, "/pre_tokenizer", json!({"type": "Whitespace"}))
    };
    let wordpiece = json!({"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "hello": 1, "##s": 2, "hell": 3, "world": 4}});
    encodes(&model(wordpiece.clone()), "hellos world", &[1, 2, 4]);
    err(
        &model(with(wordpiece.clone(), "/max_input_chars_per_word", json!(1u64 << 40))),
        &[
            "model.max_input_chars_per_word = 1099511627776",
            &MAX_WORDPIECE_WORD_CHARS.to_string(),
        ],
    );
    err(
        &model(with(
            wordpiece.clone(),
            "/continuing_subword_prefix",
            json!("#".repeat(300)),
        )),
        &["model.continuing_subword_prefix is 300 bytes"],
    );
    err(
        &model(with(wordpiece, "/vocab/world", json!(1u64 << 32))),
        &["model.vocab[\"world\"]"],
    );

    let wordlevel = json!({"type": "WordLevel", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}});
    encodes(&model(wordlevel.clone()), "hello there world", &[1, 0, 2]);
    err(
        &model(with(wordlevel, "/vocab/hello", json!(-1))),
        &["model.vocab[\"hello\"]"],
    );

    let unigram = json!({"type": "Unigram", "unk_id": 0, "byte_fallback": false,
        "vocab": [["<unk>", 0.0], ["hello", -1.0], ["world", -1.5], ["h", -3.0], ["o", -3.0]]});
    encodes(&model(unigram.clone()), "hello world", &[1, 2]);
    err(
        &model(with(unigram.clone(), "/unk_id", json!(5))),
        &["model.unk_id = 5 is outside the vocabulary of 5"],
    );
    err(
        &model(with(unigram.clone(), "/vocab/1", json!(["", -1.0]))),
        &["model.vocab[1] is an empty piece"],
    );
    err(
        &model(with(unigram.clone(), "/vocab/1", json!(["x"]))),
        &["model.vocab[1] is not a [piece, score] pair"],
    );
    err(
        &model(with(unigram.clone(), "/vocab/1", json!(["x", "high"]))),
        &["model.vocab[1] has a score"],
    );
    err(
        &model(with(unigram, "/vocab", json!({"a": 1}))),
        &["Unigram model is not an array"],
    );

    err(
        &model(json!({"type": "Magic", "vocab": {}})),
        &["model.type \"Magic\" is not one of"],
    );
    err(&with(base(), "/model", json!(null)), &["model is not a JSON object"]);
    let mut v = base();
    v.as_object_mut().unwrap().remove("model");
    err(&v, &["tokenizer.json has no model"]);
    // Without "type", a model with merges is BPE and checked as such (the crate would
    // fall back to reading it as WordPiece when the BPE reading failed).
    let mut untyped = prefixed_bpe(json!([["a", "b"]]));
    untyped["model"].as_object_mut().unwrap().remove("type");
    err(&untyped, &["model.merges[0]", "continuing_subword_prefix"]);
}

#[test]
fn truncation_padding_and_post_processing_are_not_applied() {
    // On main, fixed padding to a billion ids was applied to every encode; a template
    // naming a token the vocabulary lacks refused to load. ffai wants every id of the
    // prompt and adds BOS itself, so none of these reach the crate.
    let v = with(
        base(),
        "/padding",
        json!({"strategy": {"Fixed": 1_000_000_000u64}, "direction": "Right", "pad_to_multiple_of": null,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"}),
    );
    let v = with(
        v,
        "/truncation",
        json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 9}),
    );
    let v = with(
        v,
        "/post_processor",
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
               "special_tokens": {"<nope>": {"id": "<nope>", "ids": [99], "tokens": ["<nope>"]}}}),
    );
    let v = with(v, "/decoder", json!({"type": "NoSuchDecoder"}));
    encodes(&v, "hello world", &[13, 16, 4, 9]);
}

#[test]
fn malformed_and_oversized_files_are_refused() {
    let e = load_dir_files(&[("tokenizer.json", b"[1, 2, 3]")]).unwrap_err();
    assert!(e.contains("tokenizer.json is not a JSON object"), "{e}");
    let e = load_dir_files(&[("tokenizer.json", b"{\"model\": ")]).unwrap_err();
    assert!(e.contains("parsing tokenizer.json"), "{e}");
    let e = load_dir_files(&[("tokenizer.json", &[0xff, 0xfe, b'{', b'}'])]).unwrap_err();
    assert!(e.contains("tokenizer.json is not UTF-8"), "{e}");
    // Deeply nested JSON is serde_json's recursion limit, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = load_dir_files(&[("tokenizer.json", deep.as_bytes())]).unwrap_err();
    assert!(
        e.contains("parsing tokenizer.json") && e.contains("recursion limit"),
        "{e}"
    );

    // Sparse files of one byte past the limits: refused from their size, unread.
    let sparse = |dir: &Path, name: &str, len: u64| {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        f.set_len(len).unwrap();
    };
    let dir = temp_dir("hostile-tok-big");
    sparse(&dir, "tokenizer.json", MAX_TOKENIZER_JSON_BYTES + 1);
    let e = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "tokenizer.json is {} bytes, more than the limit of {MAX_TOKENIZER_JSON_BYTES}",
            MAX_TOKENIZER_JSON_BYTES + 1
        )),
        "{e}"
    );
    std::fs::write(dir.join("tokenizer.json"), base().to_string()).unwrap();
    sparse(&dir, "tokenizer_config.json", MAX_CONFIG_JSON_BYTES + 1);
    let e = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json is") && e.contains("more than the limit"),
        "{e}"
    );
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    sparse(&dir, "generation_config.json", MAX_CONFIG_JSON_BYTES + 1);
    let e = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("generation_config.json is"), "{e}");
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    // tokenizer_config.json naming ids outside the vocabulary: ignored, as before.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"added_tokens_decoder": {"4294967295": {"special": true}, "99999999999999999999": {}, "-1": {}},
            "bos_token": "<s>", "add_bos_token": true}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [4294967295, 1, -5, "x"]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(tok.eog_ids(), [1]);
    assert_eq!(tok.encode("hello", true).unwrap(), [0, 13]);
}

#[test]
fn loaded_tokenizers_never_panic_on_any_text() {
    let configs = [
        base(),
        prefixed_bpe(json!([["a", "##b"], ["a", "##é"]])),
        with(
            base(),
            "/normalizer",
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "NFC"},
                   {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": "▁"}]}),
        ),
    ];
    let mut r = Rng(7);
    let pieces = [
        "a", "é", "##", "<|turn|>", "<s>", " ", "\n", "\u{fdfa}", "\u{0}", "𝔘", "ﬃ", "\u{200d}",
    ];
    for v in &configs {
        let tok = load(v).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..300 {
            let n = (r.next_u64() % 40) as usize;
            let text: String = (0..n)
                .map(|_| pieces[(r.next_u64() % pieces.len() as u64) as usize])
                .collect();
            // Ok or Err (an unknown character without an unknown token); never a panic.
            let _ = tok.encode(&text, true);
        }
    }
}

// --- GGUF tokenizer metadata ---

fn s(x: &str) -> MetaValue {
    MetaValue::String(x.to_owned())
}

/// A SentencePiece vocabulary: <unk>, <s>, </s>, byte tokens, pieces, a control token.
fn spm_metadata(pieces: &[&str]) -> Vec<(String, MetaValue)> {
    let mut toks: Vec<(String, i32)> = vec![("<unk>".into(), 2), ("<s>".into(), 3), ("</s>".into(), 3)];
    for b in 0..=255u32 {
        toks.push((format!("<0x{b:02X}>"), 6));
    }
    for t in pieces {
        toks.push(((*t).into(), 1));
    }
    toks.push(("<|turn|>".into(), 3));
    let scores = toks.iter().enumerate().map(|(i, _)| MetaValue::F32(-(i as f32)));
    vec![
        ("general.architecture".into(), s("llama")),
        ("tokenizer.ggml.model".into(), s("llama")),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(toks.iter().map(|t| s(&t.0)).collect()),
        ),
        ("tokenizer.ggml.scores".into(), MetaValue::Array(scores.collect())),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(toks.iter().map(|t| MetaValue::I32(t.1)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2)),
    ]
}

const PIECES: &[&str] = &[
    "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
];

fn gguf(metadata: Vec<(String, MetaValue)>) -> GgufFile {
    GgufFile::from_bytes(
        &GgufWriter {
            metadata,
            ..Default::default()
        }
        .to_bytes(),
    )
    .unwrap()
}

fn set(mut md: Vec<(String, MetaValue)>, key: &str, value: MetaValue) -> Vec<(String, MetaValue)> {
    md.retain(|(k, _)| k != key);
    md.push((key.to_owned(), value));
    md
}

#[track_caller]
fn gguf_err(md: Vec<(String, MetaValue)>, needles: &[&str]) -> String {
    let e = match Tokenizer::from_gguf(&gguf(md)) {
        Ok(_) => panic!("hostile GGUF tokenizer loaded (expected {needles:?})"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "not one line: {e}");
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    e
}

fn tokens_with(extra: &str, kind: i32) -> Vec<(String, MetaValue)> {
    let md = spm_metadata(PIECES);
    let mut toks: Vec<MetaValue> = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .unwrap()
        .1
        .as_array()
        .unwrap()
        .to_vec();
    let mut types: Vec<MetaValue> = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.token_type")
        .unwrap()
        .1
        .as_array()
        .unwrap()
        .to_vec();
    let mut scores: Vec<MetaValue> = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.scores")
        .unwrap()
        .1
        .as_array()
        .unwrap()
        .to_vec();
    toks.push(s(extra));
    types.push(MetaValue::I32(kind));
    scores.push(MetaValue::F32(-1000.0));
    let md = set(md, "tokenizer.ggml.tokens", MetaValue::Array(toks));
    let md = set(md, "tokenizer.ggml.token_type", MetaValue::Array(types));
    set(md, "tokenizer.ggml.scores", MetaValue::Array(scores))
}

#[test]
fn the_base_gguf_vocabulary_loads_and_encodes() {
    let tok = Tokenizer::from_gguf(&gguf(spm_metadata(PIECES))).unwrap();
    let n = 259 + PIECES.len() as u32;
    assert_eq!(
        tok.encode("hello world<|turn|>", true).unwrap(),
        [1, 259 + 12, 259 + 17, n]
    );
}

#[test]
fn gguf_token_texts_are_bounded() {
    let n = 259 + PIECES.len() + 1;
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    gguf_err(
        tokens_with(&long, 1),
        &[
            &format!("tokenizer.ggml.tokens[{n}] is 16385 bytes long"),
            &MAX_TOKEN_BYTES.to_string(),
        ],
    );
    // A control token is matched in every input: its length is the work per input byte.
    let special = "<".repeat(MAX_SPECIAL_TOKEN_BYTES + 1);
    gguf_err(
        tokens_with(&special, 3),
        &[
            &format!("tokenizer.ggml.tokens[{n}] is a control or user-defined token of 1025 bytes"),
            "1024",
        ],
    );
    // The same text as an ordinary token is fine, and a shorter control token too.
    Tokenizer::from_gguf(&gguf(tokens_with(&special, 1))).unwrap();
    let tok = Tokenizer::from_gguf(&gguf(tokens_with(&"<".repeat(MAX_SPECIAL_TOKEN_BYTES), 4))).unwrap();
    assert_eq!(
        tok.encode(&"<".repeat(MAX_SPECIAL_TOKEN_BYTES), false).unwrap(),
        [n as u32]
    );
    // All of them together go into one trie.
    let mut md = spm_metadata(PIECES);
    let mut toks = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .unwrap()
        .1
        .as_array()
        .unwrap()
        .to_vec();
    let mut types = md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.token_type")
        .unwrap()
        .1
        .as_array()
        .unwrap()
        .to_vec();
    for i in 0..5000 {
        toks.push(s(&format!("<{i}{}>", "c".repeat(1000))));
        types.push(MetaValue::I32(3));
    }
    md = set(md, "tokenizer.ggml.tokens", MetaValue::Array(toks));
    md = set(md, "tokenizer.ggml.token_type", MetaValue::Array(types));
    md.retain(|(k, _)| k != "tokenizer.ggml.scores");
    gguf_err(
        md,
        &[
            "control and user-defined tokens hold",
            &format!("more than the limit of {MAX_SPECIAL_TEXT_BYTES}"),
        ],
    );
    // Hostile token types are unknown kinds, not errors.
    Tokenizer::from_gguf(&gguf(tokens_with("x", i32::MIN))).unwrap();
    let md = set(spm_metadata(PIECES), "tokenizer.ggml.tokens", MetaValue::Array(vec![]));
    gguf_err(md, &["tokenizer.ggml.tokens is empty"]);
}

#[test]
fn gguf_special_ids_must_be_in_range() {
    let md = || spm_metadata(PIECES);
    gguf_err(
        set(md(), "tokenizer.ggml.bos_token_id", MetaValue::U64(u64::MAX)),
        &["tokenizer.ggml.bos_token_id = 18446744073709551615 is outside the vocabulary of"],
    );
    gguf_err(
        set(md(), "tokenizer.ggml.eos_token_id", MetaValue::I32(-1)),
        &["tokenizer.ggml.eos_token_id = -1"],
    );
    gguf_err(
        set(md(), "tokenizer.ggml.eot_token_id", MetaValue::U32(1 << 30)),
        &["tokenizer.ggml.eot_token_id"],
    );
    gguf_err(
        set(md(), "tokenizer.ggml.unknown_token_id", MetaValue::I64(i64::MIN)),
        &["tokenizer.ggml.unknown_token_id = -9223372036854775808"],
    );
    gguf_err(
        set(md(), "tokenizer.ggml.bos_token_id", s("1")),
        &["tokenizer.ggml.bos_token_id is not an integer"],
    );
    gguf_err(
        set(md(), "tokenizer.ggml.eom_token_id", MetaValue::F32(1.0)),
        &["tokenizer.ggml.eom_token_id is not an integer"],
    );
    // Roles that do not change encoding are ignored when out of range, as llama.cpp does.
    let tok = Tokenizer::from_gguf(&gguf(set(
        md(),
        "tokenizer.ggml.padding_token_id",
        MetaValue::U64(u64::MAX),
    )))
    .unwrap();
    assert!(tok.special_tokens().iter().all(|(role, _, _)| role != "pad"));
    gguf_err(
        set(
            md(),
            "tokenizer.ggml.scores",
            MetaValue::Array(vec![MetaValue::F32(0.0); 3]),
        ),
        &["tokenizer.ggml.scores has 3 entries"],
    );
}

fn bpe_metadata(merges: Vec<MetaValue>) -> Vec<(String, MetaValue)> {
    let toks = ["h", "e", "l", "o", "he", "ll", "hell", "hello", "Ġ", "Ġhello"];
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(toks.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), MetaValue::Array(merges)),
    ]
}

#[test]
fn gguf_merges_are_bounded() {
    let good = || vec![s("h e"), s("l l"), s("he ll"), s("hell o"), s("Ġ hello")];
    let tok = Tokenizer::from_gguf(&gguf(bpe_metadata(good()))).unwrap();
    assert_eq!(tok.encode("hello hello", false).unwrap(), [7, 9]);
    // Merges that do not parse or name unknown tokens can never apply; they are skipped.
    let mut odd = good();
    odd.extend([s(""), s("nospace"), s(" "), s("x y"), s("Ġ  hello")]);
    let tok = Tokenizer::from_gguf(&gguf(bpe_metadata(odd))).unwrap();
    assert_eq!(tok.encode("hello hello", false).unwrap(), [7, 9]);
    let mut long = good();
    long.push(s(&format!("{} h", "x".repeat(2 * MAX_TOKEN_BYTES))));
    gguf_err(
        bpe_metadata(long),
        &["tokenizer.ggml.merges[5] is 32770 bytes long", "32769"],
    );
    gguf_err(
        bpe_metadata(vec![MetaValue::U8(1)]),
        &["tokenizer.ggml.merges holds a non-string"],
    );
    gguf_err(
        set(bpe_metadata(good()), "tokenizer.ggml.merges", s("h e")),
        &["tokenizer.ggml.merges is not an array"],
    );
}

// --- Exporting a GGUF vocabulary as tokenizer.json ---

fn export_and_reload(file: &GgufFile) -> Tokenizer {
    let dir = temp_dir("hostile-tok-export");
    for (name, contents) in hf_tokenizer_files(file).unwrap() {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    let tok = Tokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).ok();
    tok.unwrap()
}

#[test]
fn exported_vocabularies_load_back_and_encode_the_same() {
    let texts = [
        "hello world",
        "  hello\n\nworld  ",
        "<|turn|>hello<|turn|>",
        "héllo wörld 日本語 👋",
        "The capital of France is Paris. 12345 + 678 = 13023",
    ];
    let tiny = gguf(spm_metadata(PIECES));
    let files = [
        tiny,
        GgufFile::open(&real_model(SMOLLM2)).unwrap(),
        GgufFile::open(&real_model(GEMMA3)).unwrap(),
    ];
    for f in &files {
        let from_gguf = Tokenizer::from_gguf(f).unwrap();
        let from_json = export_and_reload(f);
        assert_eq!(from_gguf.vocab_size(), from_json.vocab_size());
        for t in texts {
            assert_eq!(
                from_json.encode(t, false).unwrap(),
                from_gguf.encode(t, false).unwrap(),
                "{t:?}"
            );
        }
    }
}

#[test]
fn exporting_a_nested_vocabulary_is_capped() {
    // "a", "aa", ..., a^1500: every split of every entry is a merge, 1.1 million merges
    // and a gigabyte of merge text. On main the export built all of it.
    let nested: Vec<String> = (1..=1500).map(|k| "a".repeat(k)).collect();
    let pieces: Vec<&str> = nested.iter().map(String::as_str).collect();
    let f = gguf(spm_metadata(&pieces));
    Tokenizer::from_gguf(&f).unwrap();
    let e = hf_tokenizer_files(&f).unwrap_err().to_string();
    assert!(
        e.contains("exporting the GGUF tokenizer") && e.contains("bytes of merge text"),
        "{e}"
    );
    // A smaller one exports, and encodes as the GGUF does.
    let nested: Vec<String> = (1..=200).map(|k| "a".repeat(k)).collect();
    let pieces: Vec<&str> = nested.iter().map(String::as_str).collect();
    let f = gguf(spm_metadata(&pieces));
    let text = "a".repeat(777);
    assert_eq!(
        export_and_reload(&f).encode(&text, false).unwrap(),
        Tokenizer::from_gguf(&f).unwrap().encode(&text, false).unwrap()
    );
}
