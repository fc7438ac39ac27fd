//! One view over a checkpoint's tensors, whatever file they came from. Tensors keep
//! their stored format and stay in the memory map; names are normalised to GGUF's
//! scheme (`blk.N.attn_q.weight`), so a model file asks for one set of names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ffai_kernels::backend::HostBytes;
use ffai_kernels::quant::WeightType;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::{bail, ensure};

#[derive(Clone)]
pub struct WeightEntry {
    pub ty: WeightType,
    /// Row-major, outermost first (a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    pub bytes: HostBytes,
}

#[derive(Default)]
pub struct Weights {
    map: HashMap<String, WeightEntry>,
    /// config.json model_type, for the few names whose meaning depends on the family.
    model_type: String,
    /// Path or description of the checkpoint, for errors.
    pub source: String,
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&WeightEntry> {
        self.map
            .get(name)
            .ok_or_else(|| Error::new(format!("{}: missing tensor \"{name}\"", self.source)))
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    /// Total stored bytes.
    pub fn total_bytes(&self) -> usize {
        self.map.values().map(|w| w.bytes.len()).sum()
    }

    /// A tensor of any float/quantized type as f32 (norm weights, biases).
    pub fn f32_vec(&self, name: &str, expect_len: usize) -> Result<Vec<f32>> {
        let w = self.get(name)?;
        let n: usize = w.shape.iter().product();
        ensure!(
            n == expect_len,
            "{}: tensor \"{name}\" has {n} elements, expected {expect_len}",
            self.source
        );
        let mut out = vec![0f32; n];
        let row = *w.shape.last().unwrap_or(&1);
        let rb =
            w.ty.row_bytes(row)
                .ok_or_else(|| Error::new(format!("{}: tensor \"{name}\" has a bad row length", self.source)))?;
        for (i, chunk) in out.chunks_mut(row).enumerate() {
            ffai_kernels::quant::dequantize_row(w.ty, &w.bytes.as_slice()[i * rb..(i + 1) * rb], chunk);
        }
        Ok(out)
    }

    /// Checks a matrix's shape: `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<&WeightEntry> {
        let w = self.get(name)?;
        ensure!(
            w.shape == [rows, cols],
            "{}: tensor \"{name}\" has shape {:?}, expected [{rows}, {cols}]",
            self.source,
            w.shape
        );
        Ok(w)
    }

    pub fn from_gguf(f: &GgufFile, source: &str) -> Weights {
        let map = f
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    WeightEntry {
                        ty: t.ty,
                        shape: t.shape.clone(),
                        bytes: f.tensor_bytes(t),
                    },
                )
            })
            .collect();
        Weights {
            map,
            model_type: String::new(),
            source: source.to_string(),
        }
    }

    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn from_safetensors_dir(dir: &Path) -> Result<Weights> {
        Self::from_safetensors_dir_for(dir, "")
    }

    /// As `from_safetensors_dir`, mapping names the way `model_type`'s checkpoints use them.
    pub fn from_safetensors_dir_for(dir: &Path, model_type: &str) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::new(format!("{}: {e}", index.display())))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::new(format!("{}: invalid JSON: {e}", index.display())))?;
            let wm = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::new(format!("{}: no \"weight_map\" object", index.display())))?;
            let mut shards: Vec<String> = wm.values().filter_map(|s| s.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                ensure!(
                    !s.contains('/') && !s.contains('\\') && s != ".." && !s.is_empty(),
                    "{}: shard name {s:?} is not a plain file name",
                    index.display()
                );
                ensure!(
                    dir.join(s).exists(),
                    "{}: shard {s} named in the index is missing",
                    dir.display()
                );
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let single = dir.join("model.safetensors");
            ensure!(
                single.exists(),
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
            vec![single]
        };
        let mut weights = Weights {
            map: HashMap::new(),
            model_type: model_type.to_string(),
            source: dir.display().to_string(),
        };
        for path in files {
            weights.add_safetensors_file(&path)?;
        }
        Ok(weights)
    }

    fn add_safetensors_file(&mut self, path: &Path) -> Result<()> {
        let ctx = |e: String| Error::new(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| ctx(e.to_string()))?;
        // SAFETY: read-only private map; all access goes through bounds-checked slices
        // the safetensors crate validated against the file length.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ctx(e.to_string()))?);
        // The crate checks the header size limit, that offsets are in bounds and
        // contiguous, and that each tensor's byte length matches shape x dtype.
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| ctx(format!("invalid safetensors: {e}")))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let ty = match view.dtype() {
                safetensors::Dtype::F32 => WeightType::F32,
                safetensors::Dtype::F16 => WeightType::F16,
                safetensors::Dtype::BF16 => WeightType::BF16,
                other => bail!(
                    "{}: tensor \"{name}\" has dtype {other:?}, which ffai does not load yet",
                    path.display()
                ),
            };
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            let shape = view.shape().to_vec();
            let canonical = hf_to_gguf_name_for(&name, &self.model_type);
            self.map.insert(
                canonical,
                WeightEntry {
                    ty,
                    shape,
                    bytes: HostBytes::new(map.clone(), start, data.len()),
                },
            );
        }
        Ok(())
    }
}

/// Maps Hugging Face tensor names to GGUF's naming scheme; unknown names pass through.
pub fn hf_to_gguf_name(name: &str) -> String {
    hf_to_gguf_name_for(name, "")
}

/// As `hf_to_gguf_name`, for a given config.json `model_type`: Gemma 2/3 and OLMo 2 use
/// `post_attention_layernorm` for a norm *after* attention, where Llama uses it before
/// the MLP.
pub fn hf_to_gguf_name_for(name: &str, model_type: &str) -> String {
    let sandwich = matches!(model_type, "gemma2" | "gemma3" | "gemma3_text" | "olmo2");
    let top = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.norm.bias", "output_norm.bias"),
        ("lm_head.weight", "output.weight"),
    ];
    for (hf, gg) in top {
        if name == hf {
            return gg.to_string();
        }
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if idx.parse::<usize>().is_ok() {
                let post_attn = if sandwich { "post_attention_norm." } else { "ffn_norm." };
                let parts = [
                    ("input_layernorm.", "attn_norm."),
                    ("post_attention_layernorm.", post_attn),
                    ("pre_feedforward_layernorm.", "ffn_norm."),
                    ("post_feedforward_layernorm.", "post_ffw_norm."),
                    ("self_attn.qkv_proj.", "attn_qkv."),
                    ("mlp.gate_up_proj.", "ffn_up."),
                    ("mlp.c_fc.", "ffn_up."),
                    ("mlp.c_proj.", "ffn_down."),
                    ("self_attn.q_proj.", "attn_q."),
                    ("self_attn.k_proj.", "attn_k."),
                    ("self_attn.v_proj.", "attn_v."),
                    ("self_attn.o_proj.", "attn_output."),
                    ("self_attn.q_norm.", "attn_q_norm."),
                    ("self_attn.k_norm.", "attn_k_norm."),
                    ("mlp.gate_proj.", "ffn_gate."),
                    ("mlp.up_proj.", "ffn_up."),
                    ("mlp.down_proj.", "ffn_down."),
                ];
                for (hf, gg) in parts {
                    if let Some(suffix) = tail.strip_prefix(hf) {
                        return format!("blk.{idx}.{gg}{suffix}");
                    }
                }
            }
        }
    }
    name.to_string()
}
