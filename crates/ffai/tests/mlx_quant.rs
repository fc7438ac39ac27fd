//! MLX affine-quantized checkpoints (mlx-community style): written here from the tiny
//! Llama parity fixture by a small quantizer, loaded through `Weights`, and compared
//! with the same model whose weights are the dequantized values stored as `f32`.
//!
//! * Weights: every quantized matrix, dequantized by the kernels, equals the `f32`
//!   reference bit for bit.
//! * Logits: the quantized model runs integer dots on 8-bit activations, the `f32`
//!   model plain `f32` dots, so they differ by the activation rounding only (at most
//!   ~0.4 % of each 32-element block's largest magnitude per element): rms difference
//!   ≤ 5 % of the rms logit, max ≤ 10 % of the largest |logit|, and the argmax may differ
//!   only at near-ties (see `check`). With f32 activations the quantized model computes
//!   the same dots of the same dequantized weights in another summation order: within
//!   2e-5 of the `f32` model's logits. Token-by-token decode equals prefill bit for bit.
//! * 8 bits stays close to the original (unquantized) model.
//! * Bad input (mismatched shapes, bits disagreeing with the config, missing scales,
//!   truncated shard) is a one-line error naming the tensor.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::temp_dir;
use ffai::config::ModelConfig;
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::{hf_to_gguf_name, Weights};
use ffai_kernels::quant::{dequantize_row, WeightType};
use safetensors::Dtype;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/llama")
}

/// The fixture's tensors as `f32`, by HF name.
fn fixture_tensors() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), d))
        })
        .collect()
}

fn fixture_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap()
}

fn token_ids() -> Vec<u32> {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    ids.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Half {
    F16,
    BF16,
}

impl Half {
    fn round(self, v: f32) -> f32 {
        match self {
            Half::F16 => half::f16::from_f32(v).to_f32(),
            Half::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }
    fn bytes(self, v: &[f32]) -> Vec<u8> {
        match self {
            Half::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            Half::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
    fn dtype(self) -> Dtype {
        match self {
            Half::F16 => Dtype::F16,
            Half::BF16 => Dtype::BF16,
        }
    }
}

/// An MLX-quantized matrix: packed words, scales and biases (rounded to `h`), and the
/// dequantized values `scale · q + bias` (in `f32`, as MLX defines them).
struct Quantized {
    words: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    deq: Vec<f32>,
}

/// Per group: `scale = (max - min) / (2^bits - 1)`, `bias = min`,
/// `q = round((w - bias) / scale)`; levels packed as MLX does (a little-endian bit
/// stream per row, `bits` per element).
fn quantize(w: &[f32], rows: usize, cols: usize, bits: u32, group: usize, h: Half) -> Quantized {
    let top = ((1u32 << bits) - 1) as f32;
    let wpr = cols * bits as usize / 32;
    let mut words = vec![0u32; rows * wpr];
    let (mut scales, mut biases) = (Vec::new(), Vec::new());
    let mut deq = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for g in 0..cols / group {
            let xs = &w[r * cols + g * group..][..group];
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (scale, bias) = (h.round((max - min) / top), h.round(min));
            scales.push(scale);
            biases.push(bias);
            for (i, &x) in xs.iter().enumerate() {
                let q = if scale > 0.0 {
                    ((x - bias) / scale).round().clamp(0.0, top) as u32
                } else {
                    0
                };
                let j = g * group + i;
                deq[r * cols + j] = scale * q as f32 + bias;
                let (at, s) = (r * wpr + j * bits as usize / 32, (j * bits as usize % 32) as u32);
                words[at] |= q << s;
                if s + bits > 32 {
                    words[at + 1] |= q >> (32 - s);
                }
            }
        }
    }
    Quantized {
        words,
        scales,
        biases,
        deq,
    }
}

/// How one checkpoint is made: per HF tensor base name, `(bits, group)` or none.
struct Recipe {
    /// Default bits and group (written as the config's defaults).
    default: (u32, usize),
    /// Overrides written into the config (module path → bits, group).
    config_overrides: Vec<(&'static str, (u32, usize))>,
    /// Overrides *not* written into the config (mixed bits derived from shapes).
    silent_overrides: Vec<(&'static str, (u32, usize))>,
    /// Modules left unquantized, stored in the scales' half type (config: `false`).
    unquantized: Vec<&'static str>,
    quantize_embeddings: bool,
    half: Half,
    tied: bool,
}

impl Recipe {
    fn uniform(bits: u32, group: usize, half: Half) -> Recipe {
        Recipe {
            default: (bits, group),
            config_overrides: vec![],
            silent_overrides: vec![],
            unquantized: vec![],
            quantize_embeddings: true,
            half,
            tied: false,
        }
    }

    fn params(&self, base: &str) -> Option<(u32, usize)> {
        if self.unquantized.contains(&base) || (base == "model.embed_tokens" && !self.quantize_embeddings) {
            return None;
        }
        let find = |v: &[(&str, (u32, usize))]| v.iter().find(|(n, _)| *n == base).map(|(_, p)| *p);
        Some(
            find(&self.config_overrides)
                .or_else(|| find(&self.silent_overrides))
                .unwrap_or(self.default),
        )
    }
}

/// Tensor bytes for safetensors.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_dir(tag: &str, config: &serde_json::Value, tensors: &Tensors) -> PathBuf {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, &None).unwrap(),
    )
    .unwrap();
    dir
}

/// The MLX checkpoint's tensors and config.json, and those of the `f32` checkpoint of
/// its dequantized weights, and the quantized tensors' bases.
struct Built {
    quant: Tensors,
    quant_cfg: serde_json::Value,
    reference: Tensors,
    ref_cfg: serde_json::Value,
    bases: Vec<String>,
}

/// Writes the MLX checkpoint and the `f32` checkpoint of its dequantized weights;
/// returns (quantized dir, reference dir, the quantized tensors' bases).
fn build(tag: &str, recipe: &Recipe) -> (PathBuf, PathBuf, Vec<String>) {
    let b = make(recipe);
    let ref_dir = write_dir(&format!("mlx-ref-{tag}"), &b.ref_cfg, &b.reference);
    let q_dir = write_dir(&format!("mlx-q-{tag}"), &b.quant_cfg, &b.quant);
    (q_dir, ref_dir, b.bases)
}

fn make(recipe: &Recipe) -> Built {
    let mut quant: Tensors = Vec::new();
    let mut reference: Tensors = Vec::new();
    let mut bases = Vec::new();
    for (name, (shape, data)) in fixture_tensors() {
        if recipe.tied && name == "lm_head.weight" {
            continue;
        }
        let base = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        let is_matrix = shape.len() == 2;
        match recipe.params(&base).filter(|_| is_matrix) {
            Some((bits, group)) => {
                let (rows, cols) = (shape[0], shape[1]);
                let q = quantize(&data, rows, cols, bits, group, recipe.half);
                let words: Vec<u8> = q.words.iter().flat_map(|w| w.to_le_bytes()).collect();
                quant.push((name.clone(), Dtype::U32, vec![rows, cols * bits as usize / 32], words));
                let gs = vec![rows, cols / group];
                let h = recipe.half;
                quant.push((format!("{base}.scales"), h.dtype(), gs.clone(), h.bytes(&q.scales)));
                quant.push((format!("{base}.biases"), h.dtype(), gs, h.bytes(&q.biases)));
                reference.push((name, Dtype::F32, shape, f32_bytes(&q.deq)));
                bases.push(base);
            }
            None if is_matrix => {
                // Unquantized matrices are stored in the half type, as MLX keeps them.
                let h = recipe.half;
                let rounded: Vec<f32> = data.iter().map(|&v| h.round(v)).collect();
                quant.push((name.clone(), h.dtype(), shape.clone(), h.bytes(&data)));
                reference.push((name, Dtype::F32, shape, f32_bytes(&rounded)));
            }
            None => {
                quant.push((name.clone(), Dtype::F32, shape.clone(), f32_bytes(&data)));
                reference.push((name, Dtype::F32, shape, f32_bytes(&data)));
            }
        }
    }
    let mut cfg = fixture_config();
    if recipe.tied {
        cfg["tie_word_embeddings"] = true.into();
    }
    let ref_cfg = cfg.clone();
    let (bits, group) = recipe.default;
    let mut q = serde_json::json!({ "group_size": group, "bits": bits });
    for (m, (b, g)) in &recipe.config_overrides {
        q[*m] = serde_json::json!({ "group_size": g, "bits": b });
    }
    for m in &recipe.unquantized {
        q[*m] = false.into();
    }
    if !recipe.quantize_embeddings {
        q["model.embed_tokens"] = false.into();
    }
    cfg["quantization"] = q.clone();
    cfg["quantization_config"] = q;
    Built {
        quant,
        quant_cfg: cfg,
        reference,
        ref_cfg,
        bases,
    }
}

fn load(dir: &Path) -> (Weights, Box<dyn LanguageModel>) {
    load_with(dir, false)
}

/// `f32_activations`: dot the quantized weights with f32 activations instead of 8-bit ones.
fn load_with(dir: &Path, f32_activations: bool) -> (Weights, Box<dyn LanguageModel>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(dir, &cfg.model_type).unwrap();
    let family = family_for(&cfg, false).unwrap();
    let m = (family.load)(&cfg, &weights, &Device::cpu_configured(2, false, true, f32_activations)).unwrap();
    (weights, m)
}

fn logits(m: &dyn LanguageModel, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(ids.len(), 512).unwrap();
    let mut out = Vec::new();
    m.forward(ids, &mut st, true, &mut out).unwrap();
    out
}

fn argmax(x: &[f32]) -> usize {
    ffai_kernels::ops::argmax(x).0
}

/// The largest minus the second-largest logit.
fn top_gap(x: &[f32]) -> f32 {
    let i = argmax(x);
    let second = x
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    x[i] - second
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Loads both checkpoints, checks the quantized matrices dequantize to the reference
/// bit for bit, and compares logits; returns (max abs diff, max |logit|).
fn check(tag: &str, recipe: &Recipe, expect: &[(&str, WeightType)]) -> (f32, f32) {
    let (q_dir, ref_dir, bases) = build(tag, recipe);
    let (qw, qm) = load(&q_dir);
    let (rw, rm) = load(&ref_dir);
    for base in &bases {
        let name = hf_to_gguf_name(&format!("{base}.weight"));
        let (q, r) = (qw.get(&name).unwrap(), rw.get(&name).unwrap());
        assert!(matches!(q.ty, WeightType::Affine { .. }), "{tag}: {name} is {}", q.ty);
        assert_eq!(q.shape, r.shape, "{tag}: {name} shape");
        let (rows, cols) = (q.shape[0], q.shape[1]);
        let rb = q.ty.row_bytes(cols).unwrap();
        let mut row = vec![0.0f32; cols];
        for i in 0..rows {
            dequantize_row(q.ty, &q.bytes.as_slice()[i * rb..(i + 1) * rb], &mut row);
            let want = &r.bytes.as_slice()[i * cols * 4..(i + 1) * cols * 4];
            assert_eq!(
                f32_bytes(&row),
                want,
                "{tag}: {name} row {i} differs from the dequantized reference"
            );
        }
    }
    matmuls_match(tag, &qw, &rw, &bases);
    for (name, ty) in expect {
        assert_eq!(qw.get(name).unwrap().ty, *ty, "{tag}: type of {name}");
    }
    let ids = token_ids();
    let (a, b) = (logits(&*qm, &ids), logits(&*rm, &ids));
    let vocab = qm.config().vocab_size;
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let rms = |v: &[f32]| (v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let d: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    let (rms_d, rms_b) = (rms(&d), rms(&b));
    let mut flips = Vec::new();
    for t in 0..ids.len() {
        let (x, y) = (&a[t * vocab..(t + 1) * vocab], &b[t * vocab..(t + 1) * vocab]);
        if argmax(x) != argmax(y) {
            flips.push((t, top_gap(y)));
        }
    }
    let worst_flip = flips.iter().map(|f| f.1).fold(0.0, f32::max);
    println!(
        "{tag}: max abs diff {diff:.3e} (max |logit| {scale:.3}), rms diff {rms_d:.3e} (rms {rms_b:.3e}), \
         argmax differs at {}/{} positions (largest reference gap there {worst_flip:.3e}, {:.2} rms diffs)",
        flips.len(),
        ids.len(),
        f64::from(worst_flip) / rms_d
    );
    // Activation rounding only (measured: rms 2.3-3.1 %, max 2.7-7.2 %).
    assert!(rms_d <= 0.05 * rms_b, "{tag}: rms logit diff {rms_d} vs rms {rms_b}");
    assert!(
        diff <= 0.1 * scale,
        "{tag}: logits differ by {diff} (max |logit| {scale})"
    );
    // The argmax may flip only at near-ties: each logit moves by about N(0, rms_d), two
    // of them by √2 · rms_d relative to each other, so a flip over a reference gap above
    // 4 · rms_d (2.8 σ) would be a real error (measured: 0–8 flips in 64 positions, at
    // gaps up to 2.4 rms differences; 256 logits of rms ~1.2 leave many near-ties). How
    // many flip is not bounded separately: a systematic error fails the bounds above.
    for &(t, gap) in &flips {
        assert!(
            f64::from(gap) <= 4.0 * rms_d,
            "{tag}: argmax differs at position {t} although the reference's top two logits are {gap} apart \
             (rms diff {rms_d})"
        );
    }
    // Without the activations' rounding the quantized model dots the same dequantized
    // weights with the same f32 inputs as the f32 model, only in another order (each row
    // widened, then `ops::dot_f32`, vs the float GEMM kernel's 16 lanes): a few ulps of
    // the logits (measured ≤ 5.3e-6 at |logit| ≤ 5.4, ulp 4.8e-7), not the activation
    // rounding's 1e-1.
    let (_, qm32) = load_with(&q_dir, true);
    let d32 = max_abs_diff(&logits(&*qm32, &ids), &b);
    println!("{tag}: f32 activations vs the dequantized model: max abs diff {d32:.2e}");
    assert!(
        d32 <= 2e-5,
        "{tag}: f32 activations differ from the dequantized model by {d32}"
    );
    // Token-by-token decode gives the prefill's logits, bit for bit (every matmul entry
    // point gives the same bits within one CPU level; 64 positions never split a
    // token's attention into parts).
    let mut st = qm.new_state(ids.len(), 1).unwrap();
    let mut step = Vec::new();
    for (t, &id) in ids.iter().enumerate() {
        qm.forward(&[id], &mut st, false, &mut step).unwrap();
        let want = &a[t * vocab..(t + 1) * vocab];
        assert_eq!(
            bits(&step),
            bits(want),
            "{tag}: decode step {t} differs from prefill by {}",
            max_abs_diff(&step, want)
        );
    }
    (diff, scale)
}

/// Every quantized matrix through the CPU backend's `matmul` (one token: the matvec
/// path; 37 tokens: the blocked prefill path with partial row and token tiles) against
/// an `f64` oracle on the reference weights and the activations as the backend
/// quantizes them: within `1e-5 · Σ |w·x|` (plus the bias terms), as in the kernel tests.
fn matmuls_match(tag: &str, qw: &Weights, rw: &Weights, bases: &[String]) {
    use ffai_kernels::backend::Backend;
    use ffai_kernels::cpu::CpuBackend;
    use ffai_kernels::quant::QuantizedActs;
    let be = CpuBackend::new(2);
    let mut rng = common::Rng(7);
    for base in bases {
        let name = hf_to_gguf_name(&format!("{base}.weight"));
        let (q, r) = (qw.get(&name).unwrap(), rw.get(&name).unwrap());
        let (rows, cols) = (q.shape[0], q.shape[1]);
        let wf: Vec<f32> = r
            .bytes
            .as_slice()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let m = be.matrix(q.ty, rows, cols, q.bytes.clone());
        for n in [1usize, 37] {
            let x = rng.vec(n * cols, 1.0);
            let xb = be.upload(&x);
            let mut out = be.alloc(n * rows);
            be.matmul(&m, &xb, n, &mut out);
            let mut got = vec![0.0f32; n * rows];
            be.download(&out, 0..n * rows, &mut got);
            let mut acts = QuantizedActs::new();
            acts.quantize(q.ty, &x, n, cols);
            for t in 0..n {
                let (aq, ad) = (acts.token_quants(t), acts.token_scales(t));
                let xq: Vec<f64> = (0..cols).map(|i| f64::from(aq[i]) * f64::from(ad[i / 32])).collect();
                for o in 0..rows {
                    let w = &wf[o * cols..(o + 1) * cols];
                    let want: f64 = w.iter().zip(&xq).map(|(&a, &b)| f64::from(a) * b).sum();
                    // The f32 terms per element are at most 4·max|w|·|x| in size
                    // (scale·q ≤ 2·max|w|, |bias| ≤ max|w|, 8 bits: 128·scale ≤ max|w|).
                    let wmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let mag: f64 = xq.iter().map(|v| v.abs() * 4.0 * f64::from(wmax)).sum();
                    let g = f64::from(got[t * rows + o]);
                    assert!(
                        (g - want).abs() <= 1e-5 * mag,
                        "{tag}: {name} matmul n={n} token {t} row {o}: {g} vs {want} (mag {mag})"
                    );
                }
            }
        }
    }
}

fn affine(bits: u8, group: u16) -> WeightType {
    WeightType::affine(bits, group).unwrap()
}

#[test]
fn every_bits_and_group_matches_the_dequantized_model() {
    for bits in [2u32, 3, 4, 5, 6, 8] {
        for group in [32usize, 64] {
            for half in [Half::F16, Half::BF16] {
                let tag = format!("b{bits}-g{group}-{half:?}");
                let ty = affine(bits as u8, group as u16);
                check(
                    &tag,
                    &Recipe::uniform(bits, group, half),
                    &[
                        ("blk.0.attn_q.weight", ty),
                        ("token_embd.weight", ty),
                        ("output.weight", ty),
                    ],
                );
            }
        }
    }
}

#[test]
fn group_128_on_the_wide_matrices() {
    // Only down_proj has 128 columns; the rest stay at group 64.
    let recipe = Recipe {
        config_overrides: vec![
            ("model.layers.0.mlp.down_proj", (4, 128)),
            ("model.layers.1.mlp.down_proj", (6, 128)),
        ],
        ..Recipe::uniform(4, 64, Half::BF16)
    };
    check(
        "g128",
        &recipe,
        &[
            ("blk.0.ffn_down.weight", affine(4, 128)),
            ("blk.1.ffn_down.weight", affine(6, 128)),
            ("blk.0.ffn_up.weight", affine(4, 64)),
        ],
    );
}

#[test]
fn mixed_bits_checkpoint_loads() {
    // 4-bit body at group 32, an 8-bit head (a config entry), one 6-bit and one 3-bit
    // layer with no config entry (bits from the shapes), bf16 embeddings left
    // unquantized (config `false`), an unquantized o_proj, bf16 scales.
    let recipe = Recipe {
        default: (4, 32),
        config_overrides: vec![("lm_head", (8, 64))],
        silent_overrides: vec![
            ("model.layers.0.mlp.down_proj", (6, 32)),
            ("model.layers.1.self_attn.k_proj", (3, 32)),
        ],
        unquantized: vec!["model.layers.1.self_attn.o_proj"],
        quantize_embeddings: false,
        half: Half::BF16,
        tied: false,
    };
    check(
        "mixed",
        &recipe,
        &[
            ("output.weight", affine(8, 64)),
            ("blk.0.ffn_down.weight", affine(6, 32)),
            ("blk.1.attn_k.weight", affine(3, 32)),
            ("blk.1.attn_q.weight", affine(4, 32)),
            ("blk.1.attn_output.weight", WeightType::BF16),
            ("token_embd.weight", WeightType::BF16),
        ],
    );
}

#[test]
fn tied_quantized_embeddings_serve_as_lm_head() {
    let recipe = Recipe {
        tied: true,
        ..Recipe::uniform(5, 32, Half::BF16)
    };
    check("tied", &recipe, &[("token_embd.weight", affine(5, 32))]);
}

/// Root-mean-square of `a - b` relative to that of `b`.
fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += f64::from(x - y).powi(2);
        n += f64::from(y).powi(2);
    }
    (d / n).sqrt()
}

#[test]
fn eight_bit_stays_close_to_the_original() {
    let ids = token_ids();
    let (_, om) = load(&fixture());
    let original = logits(&*om, &ids);
    let mut errs = Vec::new();
    for bits in [8, 4, 2] {
        let (q_dir, _, _) = build(&format!("close{bits}"), &Recipe::uniform(bits, 32, Half::F16));
        let (_, qm) = load(&q_dir);
        let e = rel_rms(&logits(&*qm, &ids), &original);
        println!("{bits}-bit g32 vs original: relative rms logit error {e:.3e}");
        errs.push(e);
    }
    // 8 bits: about the activation rounding alone (measured 3 %); fewer bits must be
    // visibly further off, so the comparison tells quantizations apart.
    assert!(errs[0] <= 0.05, "8-bit relative rms error {}", errs[0]);
    assert!(
        errs[1] > errs[0] && errs[2] > 2.0 * errs[0],
        "errors by bits 8/4/2: {errs:?}"
    );
}

// ---------------------------------------------------------------- bad input

/// The error loading the 4-bit g64 checkpoint after `edit` changed its tensors and
/// config.
fn load_error(tag: &str, edit: impl FnOnce(&mut Tensors, &mut serde_json::Value)) -> String {
    let mut b = make(&Recipe::uniform(4, 64, Half::BF16));
    edit(&mut b.quant, &mut b.quant_cfg);
    let dir = write_dir(&format!("mlx-bad-{tag}"), &b.quant_cfg, &b.quant);
    match Weights::from_safetensors_dir_for(&dir, "llama") {
        Ok(_) => panic!("{tag}: loaded"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{tag}: not one line: {msg}");
            assert!(
                msg.contains("model.safetensors") || msg.contains("config.json"),
                "{tag}: error does not name the file: {msg}"
            );
            msg
        }
    }
}

fn tensor<'a>(t: &'a mut Tensors, name: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    t.iter_mut().find(|x| x.0 == name).unwrap()
}

const Q: &str = "model.layers.1.self_attn.q_proj";

#[test]
fn scales_shape_disagreeing_with_the_weight_is_an_error() {
    // Rows: 64 in the weight, 32 in the scales.
    let e = load_error("scales-rows", |t, _| {
        let s = tensor(t, &format!("{Q}.scales"));
        s.2 = vec![32, 2];
        s.3.truncate(32 * 2 * 2);
    });
    assert!(e.contains(&format!("\"{Q}.scales\" has shape [32, 2]")), "{e}");
    // Groups: 3 per row instead of 1 (the packed columns then hold no valid width).
    let e = load_error("scales-cols", |t, _| {
        for what in ["scales", "biases"] {
            let s = tensor(t, &format!("{Q}.{what}"));
            s.2 = vec![64, 3];
            s.3 = s.3.repeat(3);
        }
    });
    assert!(e.contains(&format!("\"{Q}.weight\"")) && e.contains("4-bit"), "{e}");
    // Scales and biases disagree.
    let e = load_error("biases-shape", |t, _| {
        let s = tensor(t, &format!("{Q}.biases"));
        s.2 = vec![64, 2];
        s.3 = s.3.repeat(2);
    });
    assert!(e.contains(&format!("\"{Q}.biases\" has [64, 2]")), "{e}");
    // Scales in another dtype than the biases.
    let e = load_error("scales-dtype", |t, _| {
        let s = tensor(t, &format!("{Q}.scales"));
        s.1 = Dtype::F16;
    });
    assert!(e.contains(&format!("\"{Q}.scales\" is F16")), "{e}");
}

#[test]
fn bits_disagreeing_with_the_config_are_an_error() {
    // An explicit per-module entry that the stored shapes contradict.
    let e = load_error("bits-override", |_, c| {
        c["quantization"][Q] = serde_json::json!({ "bits": 8, "group_size": 64 });
    });
    assert!(
        e.contains(&format!("gives \"{Q}\" 8 bits")) && e.contains("4-bit"),
        "{e}"
    );
    // A module marked unquantized that has scales.
    let e = load_error("marked-false", |_, c| {
        c["quantization"][Q] = false.into();
    });
    assert!(e.contains(&format!("marks \"{Q}\" unquantized")), "{e}");
    // Unsupported values in the config itself.
    let e = load_error("bits-7", |_, c| {
        c["quantization"]["bits"] = 7.into();
    });
    assert!(e.contains("bits 7"), "{e}");
    let e = load_error("mode", |_, c| {
        c["quantization"]["mode"] = "mxfp4".into();
    });
    assert!(e.contains("mxfp4"), "{e}");
    // Quantized tensors but no quantization section.
    let e = load_error("no-config", |_, c| {
        let o = c.as_object_mut().unwrap();
        o.remove("quantization");
        o.remove("quantization_config");
    });
    assert!(
        e.contains("no quantization group_size") && e.contains(".weight\""),
        "{e}"
    );
}

#[test]
fn missing_scales_or_biases_are_an_error() {
    let e = load_error("no-scales", |t, _| t.retain(|x| x.0 != format!("{Q}.scales")));
    assert!(e.contains(Q) && e.contains(&format!("\"{Q}.scales\"")), "{e}");
    let e = load_error("no-biases", |t, _| t.retain(|x| x.0 != format!("{Q}.biases")));
    assert!(e.contains(&format!("no \"{Q}.biases\"")), "{e}");
    let e = load_error("no-weight", |t, _| t.retain(|x| x.0 != format!("{Q}.weight")));
    assert!(e.contains(&format!("no matching \"{Q}.weight\"")), "{e}");
    // Scales next to a float weight.
    let e = load_error("float-weight", |t, _| {
        let w = tensor(t, &format!("{Q}.weight"));
        w.1 = Dtype::F32;
    });
    assert!(e.contains(&format!("\"{Q}.weight\" has scales but dtype F32")), "{e}");
}

#[test]
fn truncated_shard_names_the_tensor() {
    let b = make(&Recipe::uniform(4, 64, Half::BF16));
    let dir = write_dir("mlx-truncated", &b.quant_cfg, &b.quant);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&path, &bytes).unwrap();
    let e = match Weights::from_safetensors_dir_for(&dir, "llama") {
        Ok(_) => panic!("truncated file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    assert!(
        b.quant.iter().any(|t| e.contains(&format!("tensor \"{}\" ends", t.0))),
        "{e}"
    );
}
