//! Text ↔ token ids for the models ffai runs, matching llama.cpp's tokenization.
//!
//! A vocabulary comes from one of two places:
//! - GGUF metadata (`tokenizer.ggml.*`). SentencePiece-style vocabularies (`model =
//!   "llama"`) are encoded by the hand-written merger in `spm`; byte-level BPE ones
//!   (`model = "gpt2"`) by the `tokenizers` crate, set up with the pre-tokenizer regexes
//!   that `tokenizer.ggml.pre` names (`bpe`).
//! - A Hugging Face model directory (`tokenizer.json` and its config files, `hf`).
//!
//! For GGUF vocabularies, special-token text in the input ("<|im_start|>") is cut out
//! before the model's own algorithm runs, longest token first, as llama.cpp does with
//! `parse_special = true` (`special`). Which ids end generation is worked out from the
//! metadata and from the token texts llama.cpp recognises (`roles`).
//!
//! Decoding never goes through `tokenizers`: every id maps to the bytes it stands for,
//! computed once at load time, so `decode`, `token_bytes` and [`StreamDecoder`] agree.

mod bpe;
pub mod export;
mod guard;
mod hf;
mod hf_check;
pub mod limits;
mod regex_check;
mod roles;
mod special;
mod spm;

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetaValue};
use crate::{bail, ensure};

use guard::{contain, one_line};
use limits::{
    check_count, MAX_MERGES, MAX_SPECIAL_TEXT_BYTES, MAX_SPECIAL_TOKEN_BYTES, MAX_TOKEN_BYTES, MAX_VOCAB_SIZE,
};
use roles::SpecialIds;
use special::{Fragment, SpecialSplitter};

/// What a vocabulary entry is, after GGUF `token_type` (1 normal, 2 unknown, 3 control,
/// 4 user-defined, 5 unused, 6 byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenKind {
    fn from_gguf(t: i64) -> TokenKind {
        match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Undefined,
        }
    }

    /// Tokens whose text is matched in the input before the model's algorithm runs, and
    /// which are rendered as their literal text.
    fn is_literal(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)
    }
}

/// How a normal token's vocabulary string maps to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-to-unicode mapping ("Ġ" is a space).
    ByteLevel,
    /// SentencePiece: "▁" is a space, `<0xAB>` byte tokens.
    Metaspace,
    /// The text is the bytes.
    Raw,
}

enum Engine {
    Spm(Box<spm::Spm>),
    /// Byte-level BPE built from GGUF metadata; special text is split out by us first.
    GgufBpe(Box<tokenizers::Tokenizer>),
    /// A `tokenizer.json`; the `tokenizers` crate handles added tokens itself.
    HfDir(Box<tokenizers::Tokenizer>),
}

/// A loaded vocabulary with its encoder and decoder.
pub struct Tokenizer {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Decoded bytes of every token, concatenated; token `i` is
    /// `piece_data[piece_off[i]..piece_off[i + 1]]`.
    piece_data: Vec<u8>,
    piece_off: Vec<u32>,
    engine: Engine,
    splitter: SpecialSplitter,
    ids: SpecialIds,
    eog: Vec<u32>,
    add_bos: bool,
    /// The encoder puts a space in front of the text (SentencePiece `add_space_prefix`);
    /// the decoder takes one space off the first text token again.
    space_prefix: bool,
    /// That prefix is also added after each special token, not only at the start.
    space_prefix_after_special: bool,
    chat_template: Option<String>,
    /// The grammar engine's vocabulary trie and parser factory, built at the first
    /// constrained request (`constrain`).
    grammar: std::sync::OnceLock<std::result::Result<std::sync::Arc<llguidance::ParserFactory>, String>>,
}

// The engine (including `tokenizers::Tokenizer`) is shared read-only between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
};

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = match self.engine {
            Engine::Spm(_) => "spm",
            Engine::GgufBpe(_) => "bpe",
            Engine::HfDir(_) => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("engine", &engine)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.ids.bos)
            .field("eos", &self.ids.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Everything a loader has gathered, before the pieces are decoded.
struct Parts {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    style: PieceStyle,
    engine: Engine,
    /// Whether to cut special text out of the input ourselves (GGUF engines).
    split_specials: bool,
    /// Phi-3: drop whitespace right after a special token.
    rstrip_specials: bool,
    ids: SpecialIds,
    /// End-of-generation ids beyond those `roles` finds (generation_config.json).
    extra_eog: Vec<u32>,
    add_bos: bool,
    space_prefix: bool,
    space_prefix_after_special: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        Self::from_gguf_inner(file).map_err(|e| e.context("tokenizer"))
    }

    fn from_gguf_inner(file: &GgufFile) -> Result<Tokenizer> {
        let model = match file.get("tokenizer.ggml.model") {
            None => bail!("GGUF has no tokenizer.ggml.model"),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::new("tokenizer.ggml.model is not a string"))?,
        };
        let tokens = string_array(file, "tokenizer.ggml.tokens", MAX_VOCAB_SIZE)?
            .ok_or_else(|| Error::new("GGUF has no tokenizer.ggml.tokens"))?;
        ensure!(!tokens.is_empty(), "tokenizer.ggml.tokens is empty");
        let n = tokens.len();
        check_token_texts("tokenizer.ggml.tokens", &tokens)?;

        let mut kinds = vec![TokenKind::Normal; n];
        if let Some(types) = array(file, "tokenizer.ggml.token_type")? {
            ensure!(
                types.len() >= n,
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            );
            for (k, v) in kinds.iter_mut().zip(types) {
                let t = v
                    .as_i64()
                    .ok_or_else(|| Error::new("tokenizer.ggml.token_type holds a non-integer"))?;
                *k = TokenKind::from_gguf(t);
            }
        }

        let (is_spm, family) = match model {
            "llama" => (true, None),
            "gpt2" => {
                let pre = match file.get("tokenizer.ggml.pre") {
                    None => "default",
                    Some(v) => v.as_str().ok_or_else(|| Error::new("tokenizer.ggml.pre is not a string"))?,
                };
                (false, Some(bpe::PreTokenizer::from_name(pre)?))
            }
            other => bail!(
                "unsupported tokenizer model {other:?} (ffai reads \"llama\" SentencePiece and \"gpt2\" BPE vocabularies)"
            ),
        };

        let ids = SpecialIds::from_gguf(file, n, is_spm)?;
        let add_bos = match file.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::new("tokenizer.ggml.add_bos_token is not a bool"))?,
            None => is_spm || family.is_some_and(|f| f.adds_bos()),
        };
        let space_prefix = match file.get("tokenizer.ggml.add_space_prefix") {
            // llama.cpp reads this key for SentencePiece vocabularies only.
            Some(v) if is_spm => v
                .as_bool()
                .ok_or_else(|| Error::new("tokenizer.ggml.add_space_prefix is not a bool"))?,
            _ => is_spm,
        };

        let (engine, style) = match family {
            None => {
                let scores = match array(file, "tokenizer.ggml.scores")? {
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
                let spm = spm::Spm::new(&tokens, scores, ids.unk);
                (Engine::Spm(Box::new(spm)), PieceStyle::Metaspace)
            }
            Some(pre) => {
                let merges = gguf_merges(file)?;
                let bpe = bpe::build_gguf_bpe(pre, &tokens, &merges)?;
                (Engine::GgufBpe(Box::new(bpe)), PieceStyle::ByteLevel)
            }
        };

        let name = file.get_str("general.name").unwrap_or("").to_ascii_lowercase();
        let rstrip_specials = name.contains("phi-3") || name.contains("phi3");
        let chat_template = file.get_str("tokenizer.chat_template").map(str::to_owned);

        Self::assemble(Parts {
            tokens,
            kinds,
            style,
            engine,
            split_specials: true,
            rstrip_specials,
            ids,
            extra_eog: Vec::new(),
            add_bos,
            space_prefix,
            space_prefix_after_special: true,
            chat_template,
        })
    }

    /// Loads a Hugging Face tokenizer directory: `tokenizer.json` (required),
    /// `tokenizer_config.json` (add_bos_token, bos/eos tokens, added-token special flags,
    /// chat template) and `generation_config.json` (eos_token_id, one or a list).
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let parts = hf::load(dir).map_err(|e| e.context(format!("tokenizer in {}", dir.display())))?;
        Self::assemble(parts)
    }

    fn assemble(p: Parts) -> Result<Tokenizer> {
        let Parts {
            tokens,
            mut kinds,
            style,
            engine,
            split_specials,
            rstrip_specials,
            mut ids,
            extra_eog,
            add_bos,
            space_prefix,
            space_prefix_after_special,
            chat_template,
        } = p;
        let mut eog = roles::resolve(&tokens, &mut kinds, &mut ids);
        eog.extend(extra_eog);
        eog.sort_unstable();
        eog.dedup();

        let mut piece_data = Vec::new();
        let mut piece_off = Vec::with_capacity(tokens.len() + 1);
        piece_off.push(0u32);
        for (text, &kind) in tokens.iter().zip(&kinds) {
            piece_bytes(text, kind, style, &mut piece_data);
            let off = u32::try_from(piece_data.len()).map_err(|_| Error::new("vocabulary text exceeds 4 GiB"))?;
            piece_off.push(off);
        }

        let splitter = if split_specials {
            let literal = (0..tokens.len()).filter(|&i| kinds[i].is_literal() && !tokens[i].is_empty());
            // Matching them costs up to the longest one's length in steps per input byte.
            if let Some(i) = literal.clone().find(|&i| tokens[i].len() > MAX_SPECIAL_TOKEN_BYTES) {
                bail!(
                    "tokenizer.ggml.tokens[{i}] is a control or user-defined token of {} bytes, more than the limit of {MAX_SPECIAL_TOKEN_BYTES}",
                    tokens[i].len()
                );
            }
            // They all go into one byte trie.
            let total: usize = literal.clone().map(|i| tokens[i].len()).sum();
            ensure!(
                total <= MAX_SPECIAL_TEXT_BYTES,
                "tokenizer.ggml.tokens: the control and user-defined tokens hold {total} bytes of text, more than the limit of {MAX_SPECIAL_TEXT_BYTES}"
            );
            SpecialSplitter::new(&tokens, literal.map(|i| i as u32), rstrip_specials)
        } else {
            SpecialSplitter::empty()
        };

        Ok(Tokenizer {
            tokens,
            kinds,
            piece_data,
            piece_off,
            engine,
            splitter,
            ids,
            eog,
            add_bos,
            space_prefix,
            space_prefix_after_special,
            chat_template,
            grammar: std::sync::OnceLock::new(),
        })
    }

    /// Encodes `text`. Special-token text in it ("<|im_start|>") becomes that token's id.
    /// With `add_bos`, BOS is put in front unless the text already starts with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_counting(text, add_bos, &mut Work::default())
    }

    /// [`encode`](Self::encode), also returning how many elementary steps it took (trie
    /// steps while finding special tokens, merge-queue operations, bytes handed to the
    /// `tokenizers` crate). Tests use the count to check that encoding stays linear
    /// without timing it.
    #[doc(hidden)]
    pub fn encode_with_work(&self, text: &str, add_bos: bool) -> Result<(Vec<u32>, u64)> {
        let mut work = Work::default();
        let ids = self.encode_counting(text, add_bos, &mut work)?;
        Ok((ids, work.0))
    }

    fn encode_counting(&self, text: &str, add_bos: bool, work: &mut Work) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        match &self.engine {
            Engine::HfDir(tok) => crate_encode(tok, text, &mut out, work)?,
            Engine::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in self.splitter.split(text, work) {
                    match frag {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(t) => {
                            buf.clear();
                            if self.space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in t.chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            spm.encode(&buf, &mut out, work)?;
                            prev_special = false;
                        }
                    }
                }
            }
            Engine::GgufBpe(tok) => {
                for frag in self.splitter.split(text, work) {
                    match frag {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(t) => crate_encode(tok, t, &mut out, work)?,
                    }
                }
            }
        }
        if add_bos {
            if let Some(bos) = self.ids.bos {
                if out.first() != Some(&bos) {
                    out.insert(0, bos);
                }
            }
        }
        Ok(out)
    }

    /// Whether the model wants BOS in front of a prompt (GGUF `add_bos_token`,
    /// `tokenizer_config.json` `add_bos_token`, else the tokenizer family's default).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// The text `ids` stand for: their bytes concatenated (special tokens as their
    /// text, unknown ids as nothing), converted to a String lossily.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut state = DecodeState::new();
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.next_piece(id, &mut state));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes of one token in the middle of a text (no leading-space handling).
    fn piece(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.tokens.len() {
            return &[];
        }
        &self.piece_data[self.piece_off[i] as usize..self.piece_off[i + 1] as usize]
    }

    /// The bytes `id` adds to a decoded text, taking off the space the encoder put in
    /// front of the first text token (SentencePiece `add_space_prefix`).
    fn next_piece(&self, id: u32, state: &mut DecodeState) -> &[u8] {
        let i = id as usize;
        if i >= self.tokens.len() {
            return &[];
        }
        let piece = self.piece(id);
        if self.kinds[i].is_literal() || Some(id) == self.ids.bos {
            if self.space_prefix_after_special {
                state.at_text_start = true;
            }
            return piece;
        }
        let strip = self.space_prefix && state.at_text_start;
        state.at_text_start = false;
        match piece {
            [b' ', rest @ ..] if strip => rest,
            _ => piece,
        }
    }

    /// The raw bytes one token stands for: byte-level BPE characters mapped back to
    /// bytes, SentencePiece "▁" as a space and `<0xAB>` as that byte, special tokens as
    /// their text. Unknown ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.piece(id).to_vec()
    }

    /// The token's vocabulary string as stored.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The grammar engine over this vocabulary (built once, on first use).
    pub fn grammar_factory(&self) -> Result<std::sync::Arc<llguidance::ParserFactory>> {
        self.grammar
            .get_or_init(|| crate::constrain::new_factory(self))
            .clone()
            .map_err(Error::new)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.ids.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.ids.eos
    }

    /// Every id that ends generation, ascending: eos, eot, eom, and the tokens llama.cpp
    /// also treats so (`<|endoftext|>`, `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, the
    /// FIM pad/repo/separator tokens...).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Control and unknown tokens, plus everything that ends generation. User-defined
    /// tokens (e.g. Gemma's "\n\n" or "<table>") are ordinary text and not special.
    pub fn is_special(&self, id: u32) -> bool {
        match self.kinds.get(id as usize) {
            None => false,
            Some(k) => {
                matches!(k, TokenKind::Control | TokenKind::Unknown)
                    || self.eog.binary_search(&id).is_ok()
                    || Some(id) == self.ids.bos
            }
        }
    }

    /// Role-named special tokens for display: ("bos", id, text), ("eos", ..), ("eot", ..),
    /// ("unk", ..), ("pad", ..), FIM roles, then ("eog", ..) for any further id that ends
    /// generation.
    pub fn special_tokens(&self) -> Vec<(String, u32, String)> {
        let mut out: Vec<(String, u32, String)> = Vec::new();
        for (role, id) in self.ids.named() {
            let text = self.token_text(id).unwrap_or("").to_owned();
            out.push((role.to_owned(), id, text));
        }
        for &id in &self.eog {
            if !out.iter().any(|(_, i, _)| *i == id) {
                out.push(("eog".to_owned(), id, self.token_text(id).unwrap_or("").to_owned()));
            }
        }
        out
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// Where a decoder stands: whether the next text token is the first of a run.
#[derive(Debug, Clone, Copy)]
struct DecodeState {
    at_text_start: bool,
}

impl DecodeState {
    fn new() -> Self {
        DecodeState { at_text_start: true }
    }
}

/// A count of elementary encoding steps (see [`Tokenizer::encode_with_work`]).
#[derive(Debug, Default)]
pub(crate) struct Work(pub u64);

impl Work {
    pub fn add(&mut self, n: usize) {
        self.0 = self.0.saturating_add(n as u64);
    }
}

/// Encodes `text` with the `tokenizers` crate and appends the ids. A panic inside the
/// crate becomes an `Err`: this runs once per request.
fn crate_encode(tok: &tokenizers::Tokenizer, text: &str, out: &mut Vec<u32>, work: &mut Work) -> Result<()> {
    work.add(text.len());
    let enc = contain("tokenizing", || tok.encode(text, false))?
        .map_err(|e| Error::new(format!("tokenizing: {}", one_line(&e.to_string()))))?;
    out.extend_from_slice(enc.get_ids());
    Ok(())
}

/// Incremental detokenizer for streaming output. Feed ids one at a time; each call
/// returns the text that is now complete. A character whose UTF-8 bytes are spread over
/// several tokens comes out once all of them have arrived; bytes that can never form a
/// character come out as U+FFFD. `finish` flushes whatever is left.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    state: DecodeState,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            state: DecodeState::new(),
            pending: Vec::new(),
        }
    }

    pub fn push(&mut self, id: u32) -> String {
        let piece = self.tok.next_piece(id, &mut self.state);
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // The start of a character whose other bytes are still to come.
                        None => {
                            rest = after;
                            break;
                        }
                        // Bytes no continuation can make valid.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                    }
                }
            }
        }
        let consumed = self.pending.len() - rest.len();
        self.pending.drain(..consumed);
        out
    }

    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Appends the bytes a token stands for.
fn piece_bytes(text: &str, kind: TokenKind, style: PieceStyle, out: &mut Vec<u8>) {
    match kind {
        TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => out.extend_from_slice(text.as_bytes()),
        TokenKind::Unused | TokenKind::Undefined => {}
        TokenKind::Byte => match parse_byte_token(text) {
            Some(b) => out.push(b),
            None if style == PieceStyle::ByteLevel => bpe::decode_byte_level(text, out),
            None => out.extend_from_slice(text.as_bytes()),
        },
        TokenKind::Normal => match style {
            PieceStyle::ByteLevel => bpe::decode_byte_level(text, out),
            PieceStyle::Metaspace => match parse_byte_token(text) {
                Some(b) => out.push(b),
                None => {
                    for (i, part) in text.split('▁').enumerate() {
                        if i > 0 {
                            out.push(b' ');
                        }
                        out.extend_from_slice(part.as_bytes());
                    }
                }
            },
            PieceStyle::Raw => out.extend_from_slice(text.as_bytes()),
        },
    }
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a [MetaValue]>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| Error::new(format!("{key} is not an array"))),
    }
}

/// The strings of an array key, refusing more than `max_count` of them before copying any.
fn string_array(file: &GgufFile, key: &str, max_count: usize) -> Result<Option<Vec<String>>> {
    let Some(items) = array(file, key)? else {
        return Ok(None);
    };
    check_count(key, items.len(), max_count)?;
    items
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .map(Some)
        .ok_or_else(|| Error::new(format!("{key} holds a non-string")))
}

/// `Err` naming the first token text longer than [`MAX_TOKEN_BYTES`].
fn check_token_texts(key: &str, tokens: &[String]) -> Result<()> {
    match tokens.iter().position(|t| t.len() > MAX_TOKEN_BYTES) {
        None => Ok(()),
        Some(i) => bail!(
            "{key}[{i}] is {} bytes long, more than the limit of {MAX_TOKEN_BYTES}",
            tokens[i].len()
        ),
    }
}

/// `tokenizer.ggml.merges`, checked: count and length ("a b" is two tokens and a space).
fn gguf_merges(file: &GgufFile) -> Result<Vec<String>> {
    const KEY: &str = "tokenizer.ggml.merges";
    let merges =
        string_array(file, KEY, MAX_MERGES)?.ok_or_else(|| Error::new(format!("BPE vocabulary without {KEY}")))?;
    match merges.iter().position(|m| m.len() > 2 * MAX_TOKEN_BYTES + 1) {
        None => Ok(merges),
        Some(i) => bail!(
            "{KEY}[{i}] is {} bytes long, more than the limit of {}",
            merges[i].len(),
            2 * MAX_TOKEN_BYTES + 1
        ),
    }
}

/// Hands the heap memory freed so far back to the system. Loading a tokenizer.json frees
/// tens of MiB of small blocks (the checking pass, the crate's intermediate maps) that
/// glibc would otherwise keep in the resident set next to the weights; for Gemma 3's
/// bf16 directory that was 46 MiB of its peak. A no-op off glibc.
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes the
    // allocator's own locks and touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}
