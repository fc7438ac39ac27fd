//! Checkpoint conversion: a Hugging Face directory or a GGUF file in, a Hugging Face
//! directory out, in the layout mlx-community publishes: config.json (with
//! `quantization` / `quantization_config` blocks when quantized), tokenizer files, and
//! safetensors shards (with `model.safetensors.index.json` when there are several).
//!
//! Weights are either float (f16/bf16) or MLX affine quantized. An affine-quantized
//! matrix `name.weight [out, in]` becomes
//! - `name.weight`: u32 `[out, in * bits / 32]`, each row a little-endian bit stream of
//!   `bits`-bit codes, first code in the lowest bits (for 2, 4 and 8 bits no code crosses
//!   a word; for 3, 5 and 6 bits codes run on across words),
//! - `name.scales`, `name.biases`: float `[out, in / group_size]`,
//!
//! and element `j` of a row is `scales[j / g] * code[j] + biases[j / g]`. The quantizer
//! takes a group's min as the bias and `(max - min) / (2^bits - 1)` as the scale, each
//! rounded outwards to the stored float type so that the group's range stays covered,
//! and each code is the nearest level: every value is reproduced within half a scale.
//!
//! Conversion streams: one tensor row block at a time is dequantized (GGUF sources via
//! the kernels' `dequantize_row`), converted and written; the header of each shard is
//! computed up front from the shapes. Output goes to a temporary sibling directory that
//! is renamed into place at the end.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ffai_kernels::backend::HostBytes;
use ffai_kernels::quant::{dequantize_row, WeightType};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::weights::hf_to_gguf_name_for;
use crate::{bail, ensure};

/// The float type of stored floats (float weights, scales and biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F16,
    BF16,
    F32,
}

impl FloatType {
    /// Nearest representable value.
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatType::F16 => half::f16::from_f32(x).to_f32(),
            FloatType::BF16 => half::bf16::from_f32(x).to_f32(),
            FloatType::F32 => x,
        }
    }

    /// The next representable value above (`up`) or below a representable finite `x`.
    fn step(self, x: f32, up: bool) -> f32 {
        if x == 0.0 {
            let tiny = match self {
                FloatType::F16 => half::f16::from_bits(1).to_f32(),
                FloatType::BF16 => half::bf16::from_bits(1).to_f32(),
                FloatType::F32 => f32::from_bits(1),
            };
            return if up { tiny } else { -tiny };
        }
        // Away from zero means a larger magnitude: one more in the bit pattern.
        let away = up == (x > 0.0);
        let bump = |bits: u32| if away { bits + 1 } else { bits - 1 };
        match self {
            FloatType::F16 => half::f16::from_bits(bump(half::f16::from_f32(x).to_bits() as u32) as u16).to_f32(),
            FloatType::BF16 => half::bf16::from_bits(bump(half::bf16::from_f32(x).to_bits() as u32) as u16).to_f32(),
            FloatType::F32 => f32::from_bits(bump(x.to_bits())),
        }
    }

    /// Largest representable value <= x.
    fn round_down(self, x: f32) -> f32 {
        let r = self.round(x);
        if r > x {
            self.step(r, false)
        } else {
            r
        }
    }

    fn size(self) -> usize {
        match self {
            FloatType::F16 | FloatType::BF16 => 2,
            FloatType::F32 => 4,
        }
    }

    /// safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatType::F16 => "F16",
            FloatType::BF16 => "BF16",
            FloatType::F32 => "F32",
        }
    }

    /// config.json `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
            FloatType::F32 => "float32",
        }
    }

    fn encode(self, xs: &[f32], out: &mut Vec<u8>) {
        for &x in xs {
            match self {
                FloatType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                FloatType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                FloatType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
    }
}

/// Bit widths of the MLX affine format.
pub const AFFINE_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Quantizes one row of `w` (length a multiple of `group`): appends one code per value
/// to `codes` and one (scale, bias) per group, both exactly representable in `ft`.
///
/// [`Quantizer::MinMax`] is MLX's scheme: every value within half a scale. [`Quantizer::Search`]
/// starts from it and keeps whatever lowers the group's weighted squared error (see
/// [`search_group`]).
#[allow(clippy::too_many_arguments)]
pub fn quantize_row_affine(
    w: &[f32],
    bits: u32,
    group: usize,
    ft: FloatType,
    (quantizer, importance): (Quantizer, Option<&[f32]>),
    codes: &mut Vec<u32>,
    scales: &mut Vec<f32>,
    biases: &mut Vec<f32>,
) {
    debug_assert!(w.len().is_multiple_of(group));
    let levels = (1u32 << bits) - 1;
    debug_assert!(importance.is_none_or(|i| i.len() == w.len()));
    let mut q = vec![0u32; group];
    let mut weights = vec![0f32; group];
    for (gi, g) in w.chunks(group).enumerate() {
        let (scale, bias) = minmax_group(g, levels, ft);
        let (scale, bias) = match quantizer {
            Quantizer::MinMax => (scale, bias),
            Quantizer::Search => {
                let imp = importance.map(|i| &i[gi * group..(gi + 1) * group]);
                error_weights(g, imp, &mut weights);
                search_group(g, &weights, levels, ft, (scale, bias), &mut q)
            }
        };
        codes.extend(g.iter().map(|&x| code(x, scale, bias, levels)));
        scales.push(scale);
        biases.push(bias);
    }
}

/// How `convert` picks each group's scale and bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantizer {
    /// MLX's: the group's minimum and range (no value is clipped).
    MinMax,
    /// A weighted least-squares search (may clip outliers when that lowers the error).
    #[default]
    Search,
}

/// The nearest level of `x` on the grid `bias + scale · q`, `q` in `0..=levels`.
#[inline]
fn code(x: f32, scale: f32, bias: f32, levels: u32) -> u32 {
    if scale > 0.0 {
        ((x - bias) / scale).round().clamp(0.0, levels as f32) as u32
    } else {
        0
    }
}

/// MLX's choice, made exact in `ft`: the bias at or below the minimum, the scale large
/// enough that the top level reaches the maximum, so every value lies inside
/// `[bias, bias + levels · scale]` and decodes within half a scale.
fn minmax_group(g: &[f32], levels: u32, ft: FloatType) -> (f32, f32) {
    let (lo, hi) = g
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let bias = ft.round_down(lo);
    let mut scale = ft.round((hi - bias) / levels as f32);
    while bias + scale * (levels as f32) < hi {
        scale = ft.step(scale, true);
    }
    (scale, bias)
}

/// How much each value's squared error counts. With calibration statistics, its input
/// column's mean square (`E[(e·x)²] = e²·E[x²]`); without, `rms + |x|`: larger weights
/// are kept more exactly (llama.cpp's heuristic without an importance matrix).
fn error_weights(g: &[f32], importance: Option<&[f32]>, out: &mut [f32]) {
    match importance {
        Some(imp) => {
            // A floor, so columns never seen active still count a little.
            let floor = 1e-3 * imp.iter().sum::<f32>() / imp.len() as f32 + f32::MIN_POSITIVE;
            for (o, &m) in out.iter_mut().zip(imp) {
                *o = m.max(0.0) + floor;
            }
        }
        None => {
            let rms = (g.iter().map(|&x| x * x).sum::<f32>() / g.len() as f32).sqrt();
            for (o, &x) in out.iter_mut().zip(g) {
                *o = rms + x.abs();
            }
        }
    }
}

/// Weighted squared error of the group on the grid (`scale`, `bias`).
fn grid_error(g: &[f32], weights: &[f32], scale: f32, bias: f32, levels: u32) -> f64 {
    g.iter()
        .zip(weights)
        .map(|(&x, &w)| {
            let e = (scale * code(x, scale, bias, levels) as f32 + bias - x) as f64;
            w as f64 * e * e
        })
        .sum()
}

/// A group's scale and bias by search: for a range of candidate grids (the min/max grid
/// stretched and shrunk), assign each value its nearest level, fit scale and bias to
/// those levels by weighted least squares, then alternate assignment and refit while the
/// error falls (errors weighted by `weights`, see [`error_weights`]). The result is
/// rounded to `ft` and kept only if its error (with the rounded values) beats `minmax`'s.
fn search_group(
    g: &[f32],
    weights: &[f32],
    levels: u32,
    ft: FloatType,
    minmax: (f32, f32),
    q: &mut [u32],
) -> (f32, f32) {
    let (lo, hi) = g
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    if hi <= lo {
        return minmax;
    }
    let fit = |q: &[u32]| -> Option<(f32, f32)> {
        // Normal equations of min Σ w (s·q + b - x)².
        let (mut sw, mut sq, mut sqq, mut sx, mut sqx) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for ((&x, &w), &c) in g.iter().zip(weights).zip(q) {
            let (x, w, c) = (x as f64, w as f64, c as f64);
            sw += w;
            sq += w * c;
            sqq += w * c * c;
            sx += w * x;
            sqx += w * c * x;
        }
        let det = sw * sqq - sq * sq;
        if det <= 0.0 {
            return None;
        }
        let s = (sw * sqx - sq * sx) / det;
        let b = (sqq * sx - sq * sqx) / det;
        (s > 0.0).then_some((s as f32, b as f32))
    };
    let assign = |s: f32, b: f32, q: &mut [u32]| {
        for (c, &x) in q.iter_mut().zip(g) {
            *c = code(x, s, b, levels);
        }
    };
    let err = |s: f32, b: f32| grid_error(g, weights, s, b, levels);
    let mut best = (minmax.0, minmax.1, err(minmax.0, minmax.1));
    let range = hi - lo;
    for step in 0..=20 {
        // Grids whose levels span from 1 below to 1 above the range.
        let span = levels as f32 - 1.0 + 0.1 * step as f32;
        let mut cand = (range / span, lo);
        assign(cand.0, cand.1, q);
        let mut cand_err = f64::INFINITY;
        for _ in 0..4 {
            let Some((s, b)) = fit(q) else { break };
            let (s, b) = (ft.round(s), ft.round(b));
            if s <= 0.0 || !s.is_finite() || !b.is_finite() {
                break;
            }
            let e = err(s, b);
            if e >= cand_err {
                break;
            }
            (cand, cand_err) = ((s, b), e);
            assign(s, b, q);
        }
        if cand_err < best.2 {
            best = (cand.0, cand.1, cand_err);
        }
    }
    (best.0, best.1)
}

/// Packs `bits`-bit codes into u32 words as one little-endian bit stream (first code in
/// the lowest bits). `codes.len() * bits` must be a multiple of 32.
pub fn pack_codes(codes: &[u32], bits: u32, out: &mut Vec<u32>) {
    let mut acc = 0u64;
    let mut filled = 0u32;
    for &c in codes {
        acc |= (c as u64) << filled;
        filled += bits;
        if filled >= 32 {
            out.push(acc as u32);
            acc >>= 32;
            filled -= 32;
        }
    }
    debug_assert_eq!(filled, 0, "codes do not fill whole words");
}

/// What a converted tensor becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// MLX affine quantization with this many bits.
    Affine(u32),
    /// Float of the output's float type.
    Float,
}

impl Target {
    /// Parses "2".."8" or "f16"/"bf16"/"float" (the latter keep the tensor as float).
    pub fn parse(s: &str) -> Result<(Target, Option<FloatType>)> {
        match s {
            "f16" => Ok((Target::Float, Some(FloatType::F16))),
            "bf16" => Ok((Target::Float, Some(FloatType::BF16))),
            _ => match s.parse::<u32>() {
                Ok(b) if AFFINE_BITS.contains(&b) => Ok((Target::Affine(b), None)),
                _ => bail!("bits must be one of 2, 3, 4, 5, 6, 8, f16, bf16, not {s:?}"),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// For linear weights.
    pub target: Target,
    /// Float type of the output (float weights, scales, biases); None: the source's
    /// (bf16 for GGUF).
    pub float_type: Option<FloatType>,
    pub group_size: usize,
    /// The token embedding and the LM head; None: as `target`.
    pub embedding: Option<Target>,
    pub lm_head: Option<Target>,
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    pub force: bool,
    /// How each group's scale and bias are chosen.
    pub quantizer: Quantizer,
    /// Input statistics from calibration text: the search quantizer weights each
    /// element's error by its column's mean square input.
    pub importance: Option<std::sync::Arc<crate::importance::Importance>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            target: Target::Affine(4),
            float_type: None,
            group_size: 64,
            embedding: None,
            lm_head: None,
            max_shard_bytes: 2_000_000_000,
            force: false,
            quantizer: Quantizer::default(),
            importance: None,
        }
    }
}

/// A source tensor, read row by row as f32 under its Hugging Face name.
struct SrcTensor {
    name: String,
    shape: Vec<usize>,
    ty: WeightType,
    bytes: HostBytes,
    /// Undo llama.cpp's q/k row interleaving for RoPE on adjacent pairs (heads, head_dim).
    unpermute: Option<(usize, usize)>,
    /// Added to every value (Gemma's GGUF norms store 1 + w; Hugging Face stores w).
    offset: f32,
    row_bytes: usize,
}

impl SrcTensor {
    fn new(name: String, shape: Vec<usize>, ty: WeightType, bytes: HostBytes, src: &str) -> Result<SrcTensor> {
        let cols = *shape.last().unwrap_or(&1);
        let rows: usize = shape.iter().rev().skip(1).product();
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| {
            Error::new(format!(
                "{src}: tensor \"{name}\": rows of {cols} do not fit {}",
                ty.name()
            ))
        })?;
        ensure!(
            rows.checked_mul(row_bytes) == Some(bytes.len()),
            "{src}: tensor \"{name}\" holds {} bytes, its shape {shape:?} of {} needs {}",
            bytes.len(),
            ty.name(),
            rows.saturating_mul(row_bytes)
        );
        Ok(SrcTensor {
            name,
            shape,
            ty,
            bytes,
            unpermute: None,
            offset: 0.0,
            row_bytes,
        })
    }

    fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }

    fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    fn read_row(&self, r: usize, out: &mut [f32]) {
        let src_row = match self.unpermute {
            // Hugging Face row h*d + j*d/2 + i was stored at h*d + 2i + j.
            Some((_, d)) => {
                let (h, within) = (r / d, r % d);
                let (j, i) = (within / (d / 2), within % (d / 2));
                h * d + 2 * i + j
            }
            None => r,
        };
        let b = &self.bytes.as_slice()[src_row * self.row_bytes..(src_row + 1) * self.row_bytes];
        dequantize_row(self.ty, b, out);
        if self.offset != 0.0 {
            for x in out.iter_mut() {
                *x += self.offset;
            }
        }
    }
}

/// Everything read from the source before anything is written.
struct Source {
    config: serde_json::Map<String, Value>,
    tensors: Vec<SrcTensor>,
    float_type: FloatType,
    /// Files copied as they are, and files generated (name, contents).
    copy: Vec<PathBuf>,
    generated: Vec<(String, String)>,
}

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

fn read_hf_source(dir: &Path) -> Result<Source> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::new(format!("{}: {e}", cfg_path.display())))?;
    let config: Value =
        serde_json::from_str(&text).map_err(|e| Error::new(format!("{}: invalid JSON: {e}", cfg_path.display())))?;
    let config = config
        .as_object()
        .cloned()
        .ok_or_else(|| Error::new(format!("{}: not a JSON object", cfg_path.display())))?;
    ensure!(
        config.get("quantization").is_none() && config.get("quantization_config").is_none(),
        "{}: the checkpoint is already quantized; convert from a float checkpoint",
        dir.display()
    );
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::new(format!("{}: {e}", index.display())))?;
        let shards = crate::weights::shard_names(&text).map_err(|e| e.context(index.display()))?;
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = Vec::new();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for path in &files {
        let ctx = |e: String| Error::new(format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(|e| ctx(e.to_string()))?;
        // SAFETY: read-only private map; all access goes through slices the safetensors
        // crate validated against the file length.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ctx(e.to_string()))?);
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| ctx(format!("invalid safetensors: {e}")))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let (ty, ft) = match view.dtype() {
                safetensors::Dtype::F32 => (WeightType::F32, "F32"),
                safetensors::Dtype::F16 => (WeightType::F16, "F16"),
                safetensors::Dtype::BF16 => (WeightType::BF16, "BF16"),
                other => bail!(
                    "{}: tensor \"{name}\" has dtype {other:?}; ffai converts f32, f16 and bf16 tensors",
                    path.display()
                ),
            };
            *counts.entry(ft).or_default() += 1;
            let data = view.data();
            let bytes = HostBytes::new(map.clone(), data.as_ptr() as usize - base, data.len());
            tensors.push(SrcTensor::new(
                name,
                view.shape().to_vec(),
                ty,
                bytes,
                &path.display().to_string(),
            )?);
        }
    }
    // The source's own float type: the one most tensors use.
    let float_type = match counts.iter().max_by_key(|(_, &n)| n).map(|(t, _)| *t) {
        Some("F16") => FloatType::F16,
        Some("F32") => FloatType::F32,
        _ => FloatType::BF16,
    };
    let copy = TOKENIZER_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    Ok(Source {
        config,
        tensors,
        float_type,
        copy,
        generated: Vec::new(),
    })
}

/// The Hugging Face name of a GGUF tensor: the inverse of `hf_to_gguf_name_for`,
/// checked by mapping back.
pub fn gguf_to_hf_name(name: &str, model_type: &str) -> Option<String> {
    let sandwich = matches!(model_type, "gemma2" | "gemma3" | "gemma3_text" | "olmo2");
    let top = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output_norm.bias", "model.norm.bias"),
        ("output.weight", "lm_head.weight"),
    ];
    let hf = if let Some((_, hf)) = top.iter().find(|(g, _)| *g == name) {
        hf.to_string()
    } else {
        let rest = name.strip_prefix("blk.")?;
        let (idx, tail) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        let (part, suffix) = tail.split_once('.')?;
        let ffn_norm = if sandwich {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        let hf_part = match part {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => ffn_norm,
            "post_attention_norm" => "post_attention_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            "attn_qkv" => "self_attn.qkv_proj",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        format!("model.layers.{idx}.{hf_part}.{suffix}")
    };
    (hf_to_gguf_name_for(&hf, model_type) == name).then_some(hf)
}

/// GGUF stores these floats as f32: write the shortest decimal that reads back as that
/// f32 (1e-6, not 9.999999974752427e-7).
fn short_f32(x: f64) -> f64 {
    format!("{}", x as f32).parse().unwrap_or(x)
}

/// config.json fields for a GGUF architecture ffai can write back: (architectures,
/// model_type, activation key and value).
fn hf_family(arch: &str) -> Option<(&'static str, &'static str, &'static str, &'static str)> {
    Some(match arch {
        "llama" => ("LlamaForCausalLM", "llama", "hidden_act", "silu"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2", "hidden_act", "silu"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3", "hidden_act", "silu"),
        "gemma3" => (
            "Gemma3ForCausalLM",
            "gemma3_text",
            "hidden_activation",
            "gelu_pytorch_tanh",
        ),
        _ => return None,
    })
}

fn read_gguf_source(path: &Path) -> Result<Source> {
    let src = path.display().to_string();
    let f = GgufFile::open(path)?;
    let cfg = ModelConfig::from_gguf(&f, &src)?;
    let arch = cfg.architecture.clone();
    let Some((hf_arch, model_type, act_key, act)) = hf_family(&arch) else {
        bail!("{src}: converting a GGUF of architecture \"{arch}\" is not supported yet (supported: llama, qwen2, qwen3, gemma3)");
    };
    let tied = f.tensor("output.weight").is_none();
    let attention_bias = f.tensor("blk.0.attn_q.bias").is_some();
    let tok = crate::Tokenizer::from_gguf(&f).map_err(|e| e.context(&src))?;

    let mut c = serde_json::Map::new();
    c.insert("architectures".into(), json!([hf_arch]));
    c.insert("model_type".into(), json!(model_type));
    // The checkpoint's name picks a family variant (and its sampling defaults).
    if !cfg.name.is_empty() {
        c.insert("_name_or_path".into(), json!(cfg.name));
    }
    for (k, v) in [
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_hidden_layers", cfg.num_layers),
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("head_dim", cfg.head_dim),
        ("vocab_size", cfg.vocab_size),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ] {
        c.insert(k.into(), json!(v));
    }
    c.insert(act_key.into(), json!(act));
    c.insert("rope_theta".into(), json!(short_f32(cfg.rope_theta)));
    c.insert("rms_norm_eps".into(), json!(short_f32(cfg.rms_norm_eps)));
    c.insert("tie_word_embeddings".into(), json!(tied));
    if let Some(b) = tok.bos_id() {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = tok.eos_id() {
        c.insert("eos_token_id".into(), json!(e));
    }
    match &cfg.rope_scaling {
        None => {}
        Some(crate::config::RopeScaling::Linear { factor }) => {
            c.insert("rope_scaling".into(), json!({"rope_type": "linear", "factor": factor}));
        }
        Some(other) => bail!("{src}: rope scaling {other:?} cannot be written to config.json yet"),
    }
    ensure!(
        f.tensor("rope_freqs.weight").is_none(),
        "{src}: per-frequency RoPE factors (rope_freqs.weight) cannot be converted yet"
    );
    match arch.as_str() {
        "llama" => {
            c.insert("attention_bias".into(), json!(attention_bias));
            c.insert("mlp_bias".into(), json!(false));
        }
        "qwen2" => {
            c.insert("use_sliding_window".into(), json!(false));
        }
        "qwen3" => {
            c.insert("attention_bias".into(), json!(attention_bias));
        }
        "gemma3" => {
            let window = cfg.sliding_window.unwrap_or(cfg.max_position_embeddings);
            let pattern = cfg
                .extra_usize("", "attention.sliding_window_pattern")?
                .unwrap_or(6)
                .max(1);
            let layer_types: Vec<&str> = (0..cfg.num_layers)
                .map(|i| {
                    if (i + 1).is_multiple_of(pattern) {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            c.insert("sliding_window".into(), json!(window));
            c.insert("sliding_window_pattern".into(), json!(pattern));
            c.insert("layer_types".into(), json!(layer_types));
            let local = cfg.extra_f64("", "rope.local_freq_base")?.unwrap_or(10_000.0);
            c.insert("rope_local_base_freq".into(), json!(local));
            // llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B model's
            // hidden/heads (see models/gemma.rs).
            let scalar = if cfg.num_layers == 62 {
                cfg.hidden_size / cfg.num_heads
            } else {
                cfg.head_dim
            };
            c.insert("query_pre_attn_scalar".into(), json!(scalar));
            for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
                c.insert(k.into(), json!(cfg.extra_f64("", k)?));
            }
            c.insert("attention_bias".into(), json!(attention_bias));
        }
        _ => unreachable!("hf_family covers the architectures matched here"),
    }

    let mut tensors = Vec::new();
    for t in &f.tensors {
        let hf = gguf_to_hf_name(&t.name, model_type).ok_or_else(|| {
            Error::new(format!(
                "{src}: GGUF tensor \"{}\" has no Hugging Face name ffai knows",
                t.name
            ))
        })?;
        let mut st = SrcTensor::new(hf, t.shape.clone(), t.ty, f.tensor_bytes(t), &src)?;
        if !cfg.rope_neox {
            let heads = match t.name.rsplit_once('.').map(|(a, _)| a.rsplit('.').next().unwrap_or("")) {
                Some("attn_q") => Some(cfg.num_heads),
                Some("attn_k") => Some(cfg.num_kv_heads),
                _ => None,
            };
            if let Some(h) = heads {
                ensure!(
                    t.shape.len() == 2 && t.shape[0] == h * cfg.head_dim,
                    "{src}: tensor \"{}\" has shape {:?}, expected {} rows",
                    t.name,
                    t.shape,
                    h * cfg.head_dim
                );
                st.unpermute = Some((h, cfg.head_dim));
            }
        }
        if arch.starts_with("gemma") && t.name.ends_with("norm.weight") {
            st.offset = -1.0;
        }
        tensors.push(st);
    }
    let generated = crate::tokenizer::export::hf_tokenizer_files(&f).map_err(|e| e.context(&src))?;
    Ok(Source {
        config: c,
        tensors,
        float_type: FloatType::BF16,
        copy: Vec::new(),
        generated,
    })
}

/// One tensor of the output.
struct OutTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: u64,
}

/// How a source tensor is written.
struct Job {
    src: usize,
    target: Target,
    /// Output tensors: [weight] for float, [weight, scales, biases] for affine.
    outs: Vec<OutTensor>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub output: PathBuf,
    pub tensors: usize,
    pub quantized: usize,
    pub shards: usize,
    pub bytes: u64,
    pub float_type: FloatType,
}

/// Converts `src` (a Hugging Face directory or a .gguf file) into the directory `out`.
/// `progress(done, total)` is called as tensors are written.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<ConvertSummary> {
    ensure!(
        GROUP_SIZES.contains(&opts.group_size),
        "--group-size must be 32, 64 or 128, not {}",
        opts.group_size
    );
    if out.exists() {
        ensure!(
            opts.force,
            "{} already exists; pass --force to replace it",
            out.display()
        );
        ensure!(out.is_dir(), "{} exists and is not a directory", out.display());
    }
    let source = if src.is_dir() {
        read_hf_source(src)?
    } else if src.is_file() {
        read_gguf_source(src)?
    } else {
        bail!("{}: no such file or directory", src.display());
    };
    let ft = opts.float_type.unwrap_or(source.float_type);
    let jobs = plan(&source, opts, ft)?;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| Error::new(format!("{}: not a directory name", out.display())))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.ffai-convert-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::new(format!("{}: {e}", tmp.display())))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::new(format!("{}: {e}", tmp.display())))?;
    let r = write_all(&source, &jobs, opts, ft, &tmp, progress);
    let summary = match r {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // Only now is the old directory (if --force) replaced.
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::new(format!("removing {}: {e}", out.display())))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::new(format!("renaming {} to {}: {e}", tmp.display(), out.display()))
    })?;
    Ok(ConvertSummary {
        output: out.to_path_buf(),
        ..summary
    })
}

fn plan(source: &Source, opts: &ConvertOptions, ft: FloatType) -> Result<Vec<Job>> {
    let mut jobs = Vec::with_capacity(source.tensors.len());
    for (i, t) in source.tensors.iter().enumerate() {
        let wanted = match t.name.as_str() {
            "model.embed_tokens.weight" => opts.embedding.unwrap_or(opts.target),
            "lm_head.weight" => opts.lm_head.unwrap_or(opts.target),
            _ => opts.target,
        };
        // Only matrices of linear layers and embeddings are quantized, and only when
        // their rows divide into groups (as mlx-lm does); the rest stay float.
        let target = match wanted {
            Target::Affine(b)
                if t.shape.len() == 2 && t.name.ends_with(".weight") && t.cols().is_multiple_of(opts.group_size) =>
            {
                Target::Affine(b)
            }
            _ => Target::Float,
        };
        let outs = match target {
            Target::Float => vec![OutTensor {
                name: t.name.clone(),
                dtype: ft.safetensors_name(),
                shape: t.shape.clone(),
                bytes: (t.rows() * t.cols() * ft.size()) as u64,
            }],
            Target::Affine(bits) => {
                let (rows, cols) = (t.rows(), t.cols());
                let base = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                let groups = cols / opts.group_size;
                let words = cols * bits as usize / 32;
                vec![
                    OutTensor {
                        name: t.name.clone(),
                        dtype: "U32",
                        shape: vec![rows, words],
                        bytes: (rows * words * 4) as u64,
                    },
                    OutTensor {
                        name: format!("{base}.scales"),
                        dtype: ft.safetensors_name(),
                        shape: vec![rows, groups],
                        bytes: (rows * groups * ft.size()) as u64,
                    },
                    OutTensor {
                        name: format!("{base}.biases"),
                        dtype: ft.safetensors_name(),
                        shape: vec![rows, groups],
                        bytes: (rows * groups * ft.size()) as u64,
                    },
                ]
            }
        };
        jobs.push(Job { src: i, target, outs });
    }
    Ok(jobs)
}

fn write_all(
    source: &Source,
    jobs: &[Job],
    opts: &ConvertOptions,
    ft: FloatType,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<ConvertSummary> {
    // Shards: jobs in order, a new shard when the next job would overflow this one.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (j, job) in jobs.iter().enumerate() {
        let b: u64 = job.outs.iter().map(|o| o.bytes).sum();
        if size > 0 && size + b > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(j);
        size += b;
    }
    let n_shards = shards.len();
    let shard_name = |s: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", s + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut done = 0usize;
    for (s, members) in shards.iter().enumerate() {
        let file_name = shard_name(s);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "mlx"}));
        let mut off = 0u64;
        for &j in members {
            for o in &jobs[j].outs {
                header.insert(
                    o.name.clone(),
                    json!({"dtype": o.dtype, "shape": o.shape, "data_offsets": [off, off + o.bytes]}),
                );
                weight_map.insert(o.name.clone(), json!(file_name));
                off += o.bytes;
            }
        }
        total += off;
        let path = dir.join(&file_name);
        let ctx = |e: std::io::Error| Error::new(format!("writing {}: {e}", path.display()));
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(ctx)?);
        let mut h = serde_json::to_vec(&Value::Object(header)).expect("JSON values serialize");
        // The data that follows starts 8-byte aligned.
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(ctx)?;
        w.write_all(&h).map_err(ctx)?;
        let tied = !source.tensors.iter().any(|t| t.name == "lm_head.weight");
        for &j in members {
            let job = &jobs[j];
            let t = &source.tensors[job.src];
            progress(done, jobs.len(), &t.name);
            let importance = opts.importance.as_ref().and_then(|i| i.for_tensor(&t.name, tied));
            write_tensor(t, job, opts.group_size, (opts.quantizer, importance), ft, &mut w)
                .map_err(|e| e.context(format!("tensor \"{}\"", t.name)))?;
            done += 1;
        }
        w.flush().map_err(ctx)?;
    }
    progress(done, jobs.len(), "");
    if n_shards > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_text(dir, "model.safetensors.index.json", &pretty(&index))?;
    }

    // config.json: the source's, with the output's dtype and quantization.
    let mut config = source.config.clone();
    config.remove("quantization");
    config.remove("quantization_config");
    config.insert("torch_dtype".into(), json!(ft.torch_name()));
    add_flat_rope_keys(&mut config);
    let quantized = jobs.iter().filter(|j| matches!(j.target, Target::Affine(_))).count();
    if let Target::Affine(bits) = opts.target {
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(opts.group_size));
        q.insert("bits".into(), json!(bits));
        // Per-module settings where they differ from the default (mlx-lm reads these).
        for job in jobs {
            let t = &source.tensors[job.src];
            let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            match job.target {
                Target::Affine(b) if b != bits => {
                    q.insert(module.into(), json!({"group_size": opts.group_size, "bits": b}));
                }
                _ => {}
            }
        }
        config.insert("quantization".into(), Value::Object(q.clone()));
        config.insert("quantization_config".into(), Value::Object(q));
    } else if quantized > 0 {
        // Float default with a quantized embedding or head: name just those.
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(opts.group_size));
        for job in jobs {
            if let Target::Affine(b) = job.target {
                let t = &source.tensors[job.src];
                let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
                q.insert(module.into(), json!({"group_size": opts.group_size, "bits": b}));
                q.insert("bits".into(), json!(b));
            }
        }
        config.insert("quantization".into(), Value::Object(q.clone()));
        config.insert("quantization_config".into(), Value::Object(q));
    }
    write_text(dir, "config.json", &pretty(&Value::Object(config)))?;
    for p in &source.copy {
        let name = p.file_name().expect("listed by name");
        std::fs::copy(p, dir.join(name)).map_err(|e| Error::new(format!("copying {}: {e}", p.display())))?;
    }
    for (name, text) in &source.generated {
        write_text(dir, name, text)?;
    }
    Ok(ConvertSummary {
        output: dir.to_path_buf(),
        tensors: jobs.len(),
        quantized,
        shards: n_shards,
        bytes: total,
        float_type: ft,
    })
}

/// transformers >= 5 nests the RoPE settings under `rope_parameters` (keyed by layer type
/// for Gemma 3). MLX-LM's model classes (llama, gemma3_text, phi3, ... in 0.32) and
/// transformers < 5 read only the flat `rope_theta` / `rope_scaling` (and Gemma 3's
/// `rope_local_base_freq`); without them MLX-LM silently runs plain RoPE with its default
/// base. So the flat keys are added next to `rope_parameters` (which stays, and which
/// ffai and transformers 5 prefer); flat keys the source already has are kept.
fn add_flat_rope_keys(config: &mut serde_json::Map<String, Value>) {
    let Some(Value::Object(rp)) = config.get("rope_parameters").cloned() else {
        return;
    };
    let (main, local_theta) = match rp.get("full_attention") {
        Some(Value::Object(full)) => (
            full.clone(),
            rp.get("sliding_attention").and_then(|s| s.get("rope_theta")).cloned(),
        ),
        _ => (rp, None),
    };
    let mut set = |key: &str, v: Value| {
        if config.get(key).is_none_or(Value::is_null) {
            config.insert(key.into(), v);
        }
    };
    if let Some(theta) = main.get("rope_theta") {
        set("rope_theta", theta.clone());
    }
    if let Some(theta) = local_theta {
        set("rope_local_base_freq", theta);
    }
    if let Some(p) = main.get("partial_rotary_factor") {
        set("partial_rotary_factor", p.clone());
    }
    let kind = main.get("rope_type").and_then(Value::as_str).unwrap_or("default");
    // Gemma 4's "proportional" RoPE (full layers only) lives in the per-layer-type
    // `rope_parameters` that every Gemma 4 reader takes; a flat copy would read as a
    // scaling of every layer to the older readers the flat keys are for.
    if kind != "default" && kind != "proportional" {
        let mut scaling: serde_json::Map<String, Value> = main
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "rope_theta" | "partial_rotary_factor"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Older configs, and MLX-LM's Phi-3, name the kind "type".
        scaling.insert("type".into(), json!(kind));
        set("rope_scaling", Value::Object(scaling));
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n"
}

fn write_text(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| Error::new(format!("writing {}: {e}", p.display())))
}

/// Writes one source tensor's output tensors, in the order `plan` listed them.
fn write_tensor(
    t: &SrcTensor,
    job: &Job,
    group: usize,
    (quantizer, importance): (Quantizer, Option<&[f32]>),
    ft: FloatType,
    w: &mut impl Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::new(format!("write failed: {e}"));
    let (rows, cols) = (t.rows(), t.cols());
    let mut row = vec![0f32; cols];
    let mut buf = Vec::with_capacity(cols * 4);
    match job.target {
        Target::Float => {
            for r in 0..rows {
                t.read_row(r, &mut row);
                check_finite(&row, r)?;
                if let Some(c) = row.iter().position(|&x| !ft.round(x).is_finite()) {
                    bail!(
                        "value {} at row {r}, column {c} is out of {}'s range",
                        row[c],
                        ft.torch_name()
                    );
                }
                buf.clear();
                ft.encode(&row, &mut buf);
                w.write_all(&buf).map_err(io)?;
            }
        }
        Target::Affine(bits) => {
            let groups = cols / group;
            let (mut scales, mut biases) = (Vec::with_capacity(rows * groups), Vec::with_capacity(rows * groups));
            if let Some(imp) = importance {
                ensure!(
                    imp.len() == cols,
                    "calibration statistics have {} columns, the matrix {cols}",
                    imp.len()
                );
            }
            // Rows are independent: quantize batches of them on every core (the search
            // quantizer costs tens of operations per value), written in order.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_thread = 256;
            for start in (0..rows).step_by(per_thread * threads) {
                let end = (start + per_thread * threads).min(rows);
                let parts: Vec<Result<AffineRows>> = std::thread::scope(|s| {
                    let handles: Vec<_> = (start..end)
                        .step_by(per_thread)
                        .map(|r0| {
                            let r1 = (r0 + per_thread).min(end);
                            s.spawn(move || quantize_rows(t, r0..r1, bits, group, (quantizer, importance), ft))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                });
                for part in parts {
                    let part = part?;
                    w.write_all(&part.bytes).map_err(io)?;
                    scales.extend_from_slice(&part.scales);
                    biases.extend_from_slice(&part.biases);
                }
            }
            for v in [&scales, &biases] {
                buf.clear();
                ft.encode(v, &mut buf);
                w.write_all(&buf).map_err(io)?;
            }
        }
    }
    Ok(())
}

fn check_finite(row: &[f32], r: usize) -> Result<()> {
    match row.iter().position(|x| !x.is_finite()) {
        Some(c) => bail!("non-finite value at row {r}, column {c}"),
        None => Ok(()),
    }
}

/// Rows of a quantized matrix: packed codes (little-endian words), scales, biases.
struct AffineRows {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    biases: Vec<f32>,
}

/// Quantizes rows `rows` of `t`.
fn quantize_rows(
    t: &SrcTensor,
    rows: std::ops::Range<usize>,
    bits: u32,
    group: usize,
    how: (Quantizer, Option<&[f32]>),
    ft: FloatType,
) -> Result<AffineRows> {
    let cols = t.cols();
    let n = rows.len();
    let mut out = AffineRows {
        bytes: Vec::with_capacity(n * cols * bits as usize / 8),
        scales: Vec::with_capacity(n * cols / group),
        biases: Vec::with_capacity(n * cols / group),
    };
    let mut row = vec![0f32; cols];
    let (mut codes, mut words) = (Vec::with_capacity(cols), Vec::with_capacity(cols));
    for r in rows {
        t.read_row(r, &mut row);
        check_finite(&row, r)?;
        codes.clear();
        words.clear();
        let fresh = out.scales.len()..;
        quantize_row_affine(&row, bits, group, ft, how, &mut codes, &mut out.scales, &mut out.biases);
        if out.scales[fresh.clone()]
            .iter()
            .chain(&out.biases[fresh])
            .any(|x| !x.is_finite())
        {
            bail!("row {r} has values out of {}'s range", ft.torch_name());
        }
        pack_codes(&codes, bits, &mut words);
        for x in &words {
            out.bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_representable_value_apart() {
        for ft in [FloatType::F16, FloatType::BF16, FloatType::F32] {
            for x in [1.0f32, -1.0, 0.375, -3.5e-3, 0.0] {
                let x = ft.round(x);
                let up = ft.step(x, true);
                let down = ft.step(x, false);
                assert!(up > x && down < x, "{ft:?} {x}");
                assert_eq!(ft.round(up), up);
                assert_eq!(ft.round(down), down);
                // Nothing representable in between (f32 arithmetic can only check the
                // 16-bit types).
                if ft != FloatType::F32 {
                    assert_eq!(ft.round((x + up) / 2.0 + (up - x) / 8.0), up);
                    assert_eq!(ft.round((x + down) / 2.0 + (down - x) / 8.0), down);
                }
            }
            for v in [0.1f32, -0.1, 3.3e-3, -7.77] {
                let r = ft.round_down(v);
                assert!(r <= v && ft.step(r, true) > v, "{ft:?} {v}");
            }
        }
    }

    #[test]
    fn gguf_names_map_back() {
        for (g, mt, hf) in [
            ("token_embd.weight", "llama", "model.embed_tokens.weight"),
            (
                "blk.3.ffn_norm.weight",
                "llama",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "gemma3_text",
                "model.layers.3.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.0.post_attention_norm.weight",
                "gemma3_text",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.11.attn_k_norm.weight",
                "gemma3_text",
                "model.layers.11.self_attn.k_norm.weight",
            ),
            ("blk.2.attn_q.bias", "qwen2", "model.layers.2.self_attn.q_proj.bias"),
        ] {
            assert_eq!(gguf_to_hf_name(g, mt).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_to_hf_name("blk.0.post_attention_norm.weight", "llama"), None);
        assert_eq!(gguf_to_hf_name("rope_freqs.weight", "llama"), None);
    }
}
