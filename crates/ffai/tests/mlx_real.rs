//! Checkpoints written by MLX-LM itself (tests/fixtures/mlx, made by
//! scripts/make_mlx_fixtures.py from the tiny parity models: MLX-LM's `quantize_model`
//! and `save_model`, 2 to 8 bits, groups of 32 and 64, one mixed 3/6-bit recipe,
//! bf16 / f16 / f32 scales), loaded through the same path as the parity tests and
//! compared with MLX-LM's own float32 forward pass over the parity input ids.
//!
//! * Dequantization: every quantized matrix of one fixture, dequantized by our kernels,
//!   equals `mx.dequantize` bit for bit (both compute `scale · q + bias` in f32 from the
//!   same stored halves, which widen exactly).
//! * With f32 activations (and an f32 KV cache) both sides do float32 arithmetic on the
//!   same weights and differ only in summation order and in exp / rsqrt / sin / cos. A
//!   dot of K ≤ 128 terms (the widest inputs here: intermediate size, heads × head_dim)
//!   is exact to K·2⁻²⁴ ≤ 7.6e-6 of Σ|w·x| in the worst case, ~√K·2⁻²⁴ ≈ 7e-7 typically; with
//!   logits of magnitude ≤ ~7 and Σ|w·x| a few times that, 2–4 layers of such errors
//!   stay within 1e-4 (measured: 2e-6 to 1.1e-5). The argmax must agree everywhere.
//! * The default path (8-bit activations, f16 KV cache) rounds every matmul input to
//!   Q8_0/Q8_1 (half a step of amax/127 per 32-element block: ≤ 0.4 % of the block's
//!   largest magnitude per element) and K/V to 11 significant bits. That perturbation
//!   is of the same kind as in mlx_quant.rs, so the same bounds hold: rms of the logit
//!   difference ≤ 5 % of the rms logit, max ≤ 10 % of the largest |logit| (measured:
//!   0.6–3.0 % and 0.6–5.5 %), and the argmax may flip only at near-ties: where MLX's
//!   top two logits are within 4 rms differences (measured: 0–4 flips in 64 positions,
//!   at gaps up to 2.3 rms differences; tiny random models have many near-ties, 256
//!   logits of rms ~1.2). How many flip is not bounded separately: each flip is held to
//!   the near-tie rule, and a systematic error fails the rms and max bounds.
//! * The reverse direction: `ffai convert`'s output for three parity fixtures, whose
//!   MLX-LM logits are committed (tests/fixtures/mlx/ffai_convert), at the f32 bound.

mod common;

use std::path::{Path, PathBuf};

use ffai::config::ModelConfig;
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::{hf_to_gguf_name_for, Weights};
use ffai_kernels::quant::{dequantize_row, WeightType};

const FIXTURES: [&str; 8] = [
    "llama_q4_g64",
    "llama_mixed_3_6",
    "qwen3_q8_g32",
    "gemma3_q3_g32",
    "qwen2_q6_g64",
    "olmo2_q5_g32",
    "granite_q4_g32",
    "phi3_q2_g32",
];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/mlx")
        .join(name)
}

fn f32s(v: safetensors::tensor::TensorView) -> Vec<f32> {
    assert_eq!(v.dtype(), safetensors::Dtype::F32);
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

struct Reference {
    ids: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
    /// `mx.dequantize` of quantized modules, by module path.
    dequant: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.dtype(), safetensors::Dtype::I64);
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
        .collect();
    let l = st.tensor("logits").unwrap();
    let vocab = l.shape()[1];
    let logits = f32s(l);
    let mut dequant: Vec<_> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            let path = n.strip_prefix("dequant.")?.to_string();
            Some((path, v.shape().to_vec(), f32s(v)))
        })
        .collect();
    dequant.sort_by(|a, b| a.0.cmp(&b.0));
    Reference {
        ids,
        logits,
        vocab,
        dequant,
    }
}

fn load(dir: &Path, kv_f32: bool, f32_activations: bool) -> (Weights, Box<dyn LanguageModel>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(dir, &cfg.model_type).unwrap();
    let family = family_for(&cfg, false).unwrap();
    let m = (family.load)(
        &cfg,
        &weights,
        &Device::cpu_configured(2, false, kv_f32, f32_activations),
    )
    .unwrap();
    (weights, m)
}

fn argmax(x: &[f32]) -> usize {
    ffai_kernels::ops::argmax(x).0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// MLX's largest minus second-largest logit.
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

/// f32 activations and KV cache: prefill and token-by-token decode within 1e-4 of
/// MLX's logits, argmax equal at every position. Returns the max abs difference.
fn check_f32(name: &str) -> f32 {
    let dir = fixture_dir(name);
    compare_f32(name, &dir, &reference(&dir))
}

/// [`check_f32`] for the checkpoint in `dir` against the MLX logits `r`.
fn compare_f32(name: &str, dir: &Path, r: &Reference) -> f32 {
    let (_, m) = load(dir, true, true);
    assert_eq!(m.config().vocab_size, r.vocab, "{name}: vocab");
    let n = r.ids.len();
    let mut st = m.new_state(n, 512).unwrap();
    let mut got = Vec::new();
    m.forward(&r.ids, &mut st, true, &mut got).unwrap();
    let mut worst = max_abs_diff(&got, &r.logits);
    for t in 0..n {
        let s = t * r.vocab..(t + 1) * r.vocab;
        assert_eq!(
            argmax(&got[s.clone()]),
            argmax(&r.logits[s]),
            "{name}: prefill argmax differs at position {t}"
        );
    }
    let mut st = m.new_state(n, 1).unwrap();
    let mut step = Vec::new();
    for (t, &id) in r.ids.iter().enumerate() {
        m.forward(&[id], &mut st, false, &mut step).unwrap();
        let want = &r.logits[t * r.vocab..(t + 1) * r.vocab];
        worst = worst.max(max_abs_diff(&step, want));
        assert_eq!(
            argmax(&step),
            argmax(want),
            "{name}: decode argmax differs at position {t}"
        );
    }
    let scale = r.logits.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    println!("{name} (f32 activations): max abs diff {worst:.2e} (max |logit| {scale:.2})");
    assert!(worst <= 1e-4, "{name}: max abs diff {worst} > 1e-4 against MLX");
    worst
}

/// The default path: 8-bit activations, f16 KV cache.
fn check_default(name: &str) {
    let dir = fixture_dir(name);
    let r = reference(&dir);
    let (_, m) = load(&dir, false, false);
    let n = r.ids.len();
    let mut st = m.new_state(n, 512).unwrap();
    let mut got = Vec::new();
    m.forward(&r.ids, &mut st, true, &mut got).unwrap();
    let diff = max_abs_diff(&got, &r.logits);
    let scale = r.logits.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (s, c) = v.fold((0f64, 0usize), |(s, c), x| (s + f64::from(x).powi(2), c + 1));
        (s / c as f64).sqrt()
    };
    let rms_d = rms(&mut got.iter().zip(&r.logits).map(|(a, b)| a - b));
    let rms_b = rms(&mut r.logits.iter().copied());
    let (mut flips, mut worst_flip) = (0, 0f64);
    for t in 0..n {
        let s = t * r.vocab..(t + 1) * r.vocab;
        if argmax(&got[s.clone()]) != argmax(&r.logits[s.clone()]) {
            flips += 1;
            worst_flip = worst_flip.max(f64::from(top_gap(&r.logits[s.clone()])) / rms_d);
            // Each logit moves by ~N(0, rms_d); two of them by √2·rms_d relative to each
            // other, so a flip over a gap above 4·rms_d (2.8 σ) would be a real error.
            let gap = top_gap(&r.logits[s]);
            assert!(
                f64::from(gap) <= 4.0 * rms_d,
                "{name}: argmax differs at position {t} although MLX's top two logits are {gap} apart \
                 (rms diff {rms_d})"
            );
        }
    }
    println!(
        "{name} (default: q8 activations, f16 KV): max abs diff {diff:.3e} (max |logit| {scale:.2}), \
         rms diff {rms_d:.3e} (rms {rms_b:.3e}), argmax differs at {flips}/{n} near-ties \
         (largest MLX gap there {worst_flip:.2} rms diffs)"
    );
    assert!(rms_d <= 0.05 * rms_b, "{name}: rms logit diff {rms_d} vs rms {rms_b}");
    assert!(
        diff <= 0.1 * scale,
        "{name}: max abs diff {diff} vs max |logit| {scale}"
    );
}

#[test]
fn mlx_written_checkpoints_match_mlx_logits_f32_activations() {
    for name in FIXTURES {
        check_f32(name);
    }
}

#[test]
fn mlx_written_checkpoints_default_path() {
    for name in FIXTURES {
        check_default(name);
    }
}

#[test]
fn mlx_written_checkpoints_load_as_affine_with_mlx_bits() {
    // The loader must see the bits and group MLX-LM recorded for every module.
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let model_type = json["model_type"].as_str().unwrap();
        let (w, _) = load(&dir, true, false);
        let modules = meta["quantized_modules"].as_object().unwrap();
        assert!(!modules.is_empty());
        for (path, p) in modules {
            let gguf = hf_to_gguf_name_for(&format!("{path}.weight"), model_type);
            let ty = w.get(&gguf).unwrap().ty;
            let want = WeightType::Affine {
                bits: p["bits"].as_u64().unwrap() as u8,
                group: p["group_size"].as_u64().unwrap() as u16,
            };
            assert_eq!(ty, want, "{name}: {path} ({gguf})");
        }
    }
}

#[test]
fn dequantization_equals_mx_dequantize_bit_for_bit() {
    let name = "llama_mixed_3_6";
    let dir = fixture_dir(name);
    let r = reference(&dir);
    // Every quantized module of the fixture (3- and 6-bit, incl. the embedding and head).
    assert_eq!(r.dequant.len(), 16, "{name}: dequantized matrices in the fixture");
    let (w, _) = load(&dir, true, false);
    let mut bits_seen = std::collections::BTreeSet::new();
    for (path, shape, want) in &r.dequant {
        let gguf = hf_to_gguf_name_for(&format!("{path}.weight"), "llama");
        let e = w.get(&gguf).unwrap();
        let WeightType::Affine { bits, .. } = e.ty else {
            panic!("{name}: {gguf} is {}", e.ty)
        };
        bits_seen.insert(bits);
        assert_eq!(&e.shape[..], &shape[..], "{name}: {gguf} shape");
        let (rows, cols) = (shape[0], shape[1]);
        let rb = e.ty.row_bytes(cols).unwrap();
        let mut row = vec![0f32; cols];
        for i in 0..rows {
            dequantize_row(e.ty, &e.bytes.as_slice()[i * rb..(i + 1) * rb], &mut row);
            for (j, (a, b)) in row.iter().zip(&want[i * cols..(i + 1) * cols]).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: {path}[{i}, {j}]: ours {a}, MLX {b}");
            }
        }
    }
    assert_eq!(bits_seen.into_iter().collect::<Vec<_>>(), [3, 6], "{name}: bit widths");
}

/// The reverse direction: what `ffai convert` writes for a parity fixture, read by MLX-LM
/// (tests/fixtures/mlx/ffai_convert: MLX-LM's float32 logits on the output of the
/// command in its meta.json). Converted again here, ffai's logits must match MLX's at the
/// f32 bound above: both read the same weights and the same model from the config.
/// MLX-LM reads only the flat rope keys (`rope_theta`, `rope_scaling`,
/// `rope_local_base_freq`) while ffai prefers transformers 5's `rope_parameters`, so
/// the output is loaded a second time with `rope_parameters` removed: the flat keys alone
/// must describe the same model. (If the quantizer in convert.rs changes on purpose,
/// rerun scripts/make_mlx_fixtures.py --only ffai_convert.)
#[test]
fn ffai_converted_checkpoints_match_mlx_logits() {
    use ffai::convert::{convert, ConvertOptions, Target};
    let parity = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity");
    for (name, src, bits, group) in [
        ("llama_q4_g32", "llama", 4, 32),
        ("gemma3_q6_g64", "gemma3", 6, 64),
        ("phi3_q8_g64", "phi3", 8, 64),
    ] {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir("ffai_convert").join(name).join("meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            meta["ffai_convert"],
            format!("ffai convert tests/fixtures/parity/{src} --bits {bits} --group-size {group}")
        );
        let out = common::temp_dir(&format!("mlx-ffai-{name}")).join("out");
        let opts = ConvertOptions {
            target: Target::Affine(bits),
            group_size: group,
            ..Default::default()
        };
        convert(&parity.join(src), &out, &opts, &mut |_, _, _| {}).unwrap();
        let r = reference(&fixture_dir("ffai_convert").join(name));
        compare_f32(name, &out, &r);

        let path = out.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            cfg.get("rope_parameters").is_some(),
            "{name}: the source's rope_parameters are kept"
        );
        assert!(cfg["rope_theta"].is_number(), "{name}: flat rope_theta written");
        cfg.as_object_mut().unwrap().remove("rope_parameters");
        std::fs::write(&path, cfg.to_string()).unwrap();
        compare_f32(&format!("{name} (flat rope keys only)"), &out, &r);
        let _ = std::fs::remove_dir_all(out.parent().unwrap());
    }
}
