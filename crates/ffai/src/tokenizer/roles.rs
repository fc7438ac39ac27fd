//! Which token plays which role (BOS, EOS, end-of-turn, FIM...), and which ids end
//! generation.
//!
//! GGUF metadata names some roles by id. The rest llama.cpp finds by token text, and a
//! token it finds that way is treated as a control token from then on (matched in the
//! input, rendered as its text). The end-of-generation set is likewise built from
//! metadata ids plus a list of texts. This module reproduces those rules so that
//! ffai stops where llama.cpp stops.

use std::collections::HashMap;

use super::TokenKind;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Token ids by role; `None` where the vocabulary has no such token.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub sep: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

impl SpecialIds {
    /// Reads the `tokenizer.ggml.*_token_id` keys. An id outside the vocabulary is an
    /// error for the roles that change what is encoded or where generation stops (bos,
    /// eos, eot, eom, unk); for the others (pad, sep, mask, FIM) it is ignored, as
    /// llama.cpp ignores it.
    pub fn from_gguf(file: &GgufFile, n_vocab: usize, is_spm: bool) -> Result<SpecialIds> {
        let get = |key: &str, strict: bool| -> Result<Option<u32>> {
            let full = format!("tokenizer.ggml.{key}");
            let Some(v) = file.get(&full) else { return Ok(None) };
            // Any integer type, of any sign and size; only one below n_vocab is an id.
            let in_range = match (v.as_u64(), v.as_i64()) {
                (Some(id), _) => u32::try_from(id).ok().filter(|&id| (id as usize) < n_vocab),
                (None, Some(_)) => None,
                (None, None) => return Err(Error::new(format!("{full} is not an integer"))),
            };
            match in_range {
                Some(id) => Ok(Some(id)),
                None if strict => {
                    let shown = v
                        .as_u64()
                        .map_or_else(|| v.as_i64().unwrap_or_default().to_string(), |u| u.to_string());
                    Err(Error::new(format!(
                        "{full} = {shown} is outside the vocabulary of {n_vocab} tokens"
                    )))
                }
                None => Ok(None),
            }
        };
        // SentencePiece vocabularies default to <unk>=0, <s>=1, </s>=2.
        let default = |id: u32| (is_spm && (id as usize) < n_vocab).then_some(id);
        Ok(SpecialIds {
            bos: get("bos_token_id", true)?.or(default(1)),
            eos: get("eos_token_id", true)?.or(default(2)),
            eot: get("eot_token_id", true)?,
            eom: get("eom_token_id", true)?,
            unk: get("unknown_token_id", true)?.or(default(0)),
            pad: get("padding_token_id", false)?,
            sep: get("seperator_token_id", false)?,
            mask: get("mask_token_id", false)?,
            fim_pre: get("fim_pre_token_id", false)?.or(get("prefix_token_id", false)?),
            fim_suf: get("fim_suf_token_id", false)?.or(get("suffix_token_id", false)?),
            fim_mid: get("fim_mid_token_id", false)?.or(get("middle_token_id", false)?),
            fim_pad: get("fim_pad_token_id", false)?,
            fim_rep: get("fim_rep_token_id", false)?,
            fim_sep: get("fim_sep_token_id", false)?,
        })
    }

    /// The roles that are set, in display order.
    pub fn named(&self) -> Vec<(&'static str, u32)> {
        [
            ("bos", self.bos),
            ("eos", self.eos),
            ("eot", self.eot),
            ("eom", self.eom),
            ("unk", self.unk),
            ("pad", self.pad),
            ("sep", self.sep),
            ("mask", self.mask),
            ("fim_pre", self.fim_pre),
            ("fim_suf", self.fim_suf),
            ("fim_mid", self.fim_mid),
            ("fim_pad", self.fim_pad),
            ("fim_rep", self.fim_rep),
            ("fim_sep", self.fim_sep),
        ]
        .into_iter()
        .filter_map(|(r, id)| id.map(|id| (r, id)))
        .collect()
    }
}

/// End-of-turn texts, most specific first.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that end generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss tokens that are always rendered, like user-defined ones.
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// Fills in the roles found by text, adjusts token kinds the way llama.cpp does, and
/// returns the sorted end-of-generation ids.
pub(crate) fn resolve(tokens: &[String], kinds: &mut [TokenKind], ids: &mut SpecialIds) -> Vec<u32> {
    let lists: [&[&str]; 11] = [
        EOT_TEXTS,
        EOM_TEXTS,
        FIM_PRE_TEXTS,
        FIM_SUF_TEXTS,
        FIM_MID_TEXTS,
        FIM_PAD_TEXTS,
        FIM_REP_TEXTS,
        FIM_SEP_TEXTS,
        EOG_TEXTS,
        ALWAYS_RENDERED,
        &["<|plamo:eos|>"],
    ];
    // One pass over the vocabulary for all the texts of interest (first id wins).
    let mut wanted: HashMap<&str, Option<u32>> = lists.iter().flat_map(|l| l.iter().map(|&t| (t, None))).collect();
    for (i, t) in tokens.iter().enumerate() {
        if let Some(slot) = wanted.get_mut(t.as_str()) {
            slot.get_or_insert(i as u32);
        }
    }
    let find = |t: &str| wanted.get(t).copied().flatten();

    let detect = |slot: &mut Option<u32>, texts: &[&str], kinds: &mut [TokenKind]| {
        if slot.is_some() {
            return;
        }
        if let Some(id) = texts.iter().find_map(|t| find(t)) {
            *slot = Some(id);
            kinds[id as usize] = TokenKind::Control;
        }
    };
    detect(&mut ids.eot, EOT_TEXTS, kinds);
    detect(&mut ids.eom, EOM_TEXTS, kinds);
    detect(&mut ids.fim_pre, FIM_PRE_TEXTS, kinds);
    detect(&mut ids.fim_suf, FIM_SUF_TEXTS, kinds);
    detect(&mut ids.fim_mid, FIM_MID_TEXTS, kinds);
    detect(&mut ids.fim_pad, FIM_PAD_TEXTS, kinds);
    detect(&mut ids.fim_rep, FIM_REP_TEXTS, kinds);
    detect(&mut ids.fim_sep, FIM_SEP_TEXTS, kinds);

    let mut eog: Vec<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep].into_iter().flatten().collect();
    for t in EOG_TEXTS {
        if let Some(id) = find(t) {
            eog.push(id);
            kinds[id as usize] = TokenKind::Control;
        }
    }
    for &t in ALWAYS_RENDERED {
        if let Some(id) = find(t) {
            kinds[id as usize] = TokenKind::UserDefined;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let has = |eog: &[u32], t: &str| find(t).is_some_and(|id| eog.binary_search(&id).is_ok());
    // gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
    if let Some(end) = find("<|end|>").filter(|_| has(&eog, "<|end|>")) {
        let call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
        if call && (has(&eog, "<|return|>") || has(&eog, "<|flush|>")) {
            eog.retain(|&i| i != end);
            kinds[end as usize] = TokenKind::UserDefined;
        }
    }
    // Where "</s>" is ordinary text (Gemma 4, PLaMo), it does not end generation.
    if let Some(s) = find("</s>").filter(|_| has(&eog, "</s>")) {
        if has(&eog, "<|tool_response>") || find("<|plamo:eos|>").is_some_and(|id| eog.contains(&id)) {
            eog.retain(|&i| i != s);
            kinds[s as usize] = TokenKind::Normal;
        }
    }
    eog
}
