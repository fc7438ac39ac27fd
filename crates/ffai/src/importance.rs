//! Activation statistics for quantization ("importance"): run a model over calibration
//! text and record, for every linear layer, the mean square of each input column.
//!
//! A weight matrix `W` quantized to `W + E` changes an output by `E · x`; over inputs
//! whose columns are roughly uncorrelated, `E[(E · x)²] = Σ_j E_j² · E[x_j²]`. So the
//! quantizer should spend its precision where `E[x_j²]` is large: `convert
//! --calibration` weights each element's squared error by its column's mean square.
//! (llama.cpp's "importance matrix" rests on the same observation.)

use std::collections::BTreeMap;

use crate::error::Result;
use crate::inspect::InputSquares;
use crate::quality::WindowSpec;
use crate::{ensure, Model};

/// Mean squares of each linear layer's input columns, by input site.
#[derive(Clone, Debug, Default)]
pub struct Importance {
    /// `"L3.attn_in"` / `"L3.attn_out"` / `"L3.ffn_in"` / `"L3.ffn_down_in"` / `"head_in"`.
    pub sites: BTreeMap<String, Vec<f32>>,
    /// Tokens the statistics cover.
    pub tokens: usize,
}

impl Importance {
    /// Runs `model` over `tokens` in independent windows of `context` tokens (the last,
    /// shorter window included; each starts with BOS where the tokenizer adds one, as
    /// the model saw text in training) and averages each input column's square.
    pub fn collect(model: &Model, tokens: &[u32], context: usize) -> Result<Importance> {
        ensure!(context >= 2, "calibration context must be at least 2 tokens");
        ensure!(!tokens.is_empty(), "the calibration text has no tokens");
        let max = model.lm.config().max_position_embeddings;
        ensure!(
            context <= max,
            "the calibration context of {context} tokens exceeds the model's {max}"
        );
        let bos = WindowSpec::for_model(model, context).bos;
        let lm = &*model.lm;
        let mut squares = InputSquares::default();
        let mut logits = Vec::new();
        let mut window = Vec::with_capacity(context);
        for piece in tokens.chunks(context) {
            window.clear();
            window.extend_from_slice(piece);
            if let Some(b) = bos {
                window[0] = b;
            }
            let mut state = lm.new_state(window.len(), window.len().min(512))?;
            state.tap.importance = Some(std::mem::take(&mut squares));
            lm.forward(&window, &mut state, false, &mut logits)?;
            squares = state.tap.importance.take().unwrap_or_default();
        }
        let sites = squares
            .sites
            .into_iter()
            .map(|(k, (sums, n))| (k, sums.iter().map(|s| (s / n.max(1) as f64) as f32).collect()))
            .collect();
        Ok(Importance {
            sites,
            tokens: tokens.len(),
        })
    }

    /// The input statistics of a Hugging Face weight tensor (`model.layers.3.mlp.down_proj.weight`,
    /// `lm_head.weight`, ...), if it is a linear layer we saw. The tied embedding is the
    /// head's matrix, so it takes the head's statistics.
    pub fn for_tensor(&self, name: &str, tied_embedding: bool) -> Option<&[f32]> {
        let site = site_of(name, tied_embedding)?;
        self.sites.get(&site).map(|v| v.as_slice())
    }
}

/// The input site of a Hugging Face weight name.
fn site_of(name: &str, tied_embedding: bool) -> Option<String> {
    match name {
        "lm_head.weight" => return Some("head_in".into()),
        "model.embed_tokens.weight" if tied_embedding => return Some("head_in".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = module.strip_suffix(".weight")?;
    let site = match module.rsplit('.').next()? {
        "q_proj" | "k_proj" | "v_proj" | "qkv_proj" => "attn_in",
        "o_proj" | "dense" => "attn_out",
        "gate_proj" | "up_proj" | "gate_up_proj" | "c_fc" => "ffn_in",
        "down_proj" | "c_proj" => "ffn_down_in",
        _ => return None,
    };
    Some(format!("L{layer}.{site}"))
}

#[cfg(test)]
mod tests {
    use super::site_of;

    #[test]
    fn hf_names_map_to_input_sites() {
        let s = |n: &str| site_of(n, false);
        assert_eq!(
            s("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("L3.attn_in")
        );
        assert_eq!(
            s("model.layers.0.self_attn.qkv_proj.weight").as_deref(),
            Some("L0.attn_in")
        );
        assert_eq!(
            s("model.layers.11.self_attn.o_proj.weight").as_deref(),
            Some("L11.attn_out")
        );
        assert_eq!(
            s("model.layers.2.mlp.gate_up_proj.weight").as_deref(),
            Some("L2.ffn_in")
        );
        assert_eq!(s("model.layers.2.mlp.c_fc.weight").as_deref(), Some("L2.ffn_in"));
        assert_eq!(
            s("model.layers.2.mlp.down_proj.weight").as_deref(),
            Some("L2.ffn_down_in")
        );
        assert_eq!(s("model.layers.2.mlp.c_proj.weight").as_deref(), Some("L2.ffn_down_in"));
        assert_eq!(s("lm_head.weight").as_deref(), Some("head_in"));
        assert_eq!(s("model.embed_tokens.weight"), None);
        assert_eq!(site_of("model.embed_tokens.weight", true).as_deref(), Some("head_in"));
        assert_eq!(s("model.layers.2.input_layernorm.weight"), None);
        assert_eq!(s("model.layers.x.mlp.down_proj.weight"), None);
    }
}
