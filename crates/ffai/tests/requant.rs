//! `requant::requantize_gguf` on the real checkpoints: the weights survive (exactly in
//! F32, within half a step in Q8_0), and the output loads and answers as the source does.

use std::path::PathBuf;

use ffai::requant::{parse_type, requantize_gguf};
use ffai::{LoadOptions, Model};
use ffai_kernels::quant::WeightType;

fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"));
    let p = dir.join(file);
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

fn load(p: &std::path::Path) -> Model {
    Model::load(p.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

/// Decoded rows of tensor `name` of `f`.
fn decoded(f: &ffai::gguf::GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap();
    let cols = *t.shape.last().unwrap();
    let rb = t.ty.row_bytes(cols).unwrap();
    let bytes = f.tensor_bytes(t);
    let mut out = vec![0f32; bytes.len() / rb * cols];
    for (src, dst) in bytes.as_slice().chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
        ffai_kernels::quant::dequantize_row(t.ty, src, dst);
    }
    out
}

#[test]
fn smollm2_requantized_keeps_its_weights_and_its_answer() {
    let src = model_path("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = std::env::temp_dir().join(format!("ffai-requant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fs = ffai::gguf::GgufFile::open(&src).unwrap();
    // F32: every decoded weight exactly; Q8_0: within half a step of its block's scale.
    for (ty, file) in [(WeightType::F32, "f32.gguf"), (WeightType::Q8_0, "q8_0.gguf")] {
        let dst = dir.join(file);
        let s = requantize_gguf(&src, &dst, ty, true).unwrap();
        assert!(s.converted >= 30 * 7, "{s:?}");
        assert!(s.fallbacks.is_empty(), "{s:?}");
        let fd = ffai::gguf::GgufFile::open(&dst).unwrap();
        assert_eq!(fd.tensor("blk.0.attn_norm.weight").unwrap().ty, WeightType::F32);
        for name in ["blk.0.ffn_up.weight", "blk.29.attn_v.weight", "token_embd.weight"] {
            assert_eq!(fd.tensor(name).unwrap().ty, ty, "{name}");
            let (a, b) = (decoded(&fs, name), decoded(&fd, name));
            assert_eq!(a.len(), b.len());
            for (blk_a, blk_b) in a.chunks(32).zip(b.chunks(32)) {
                let amax = blk_a.iter().fold(0f32, |m, x| m.max(x.abs()));
                // Half a Q8_0 step d = amax / 127, plus the scale's f16 rounding as the
                // levels are chosen with the exact d: |q| · d · 2^-11 <= 127 · d / 2048.
                let tol = if ty == WeightType::F32 {
                    0.0
                } else {
                    amax / 127.0 * (0.5 + 127.0 / 2048.0)
                };
                for (x, y) in blk_a.iter().zip(blk_b) {
                    assert!((x - y).abs() <= tol, "{ty} {name}: {x} vs {y} (tolerance {tol})");
                }
            }
        }
        let m = load(&dst);
        let ids = m.encode("The capital of France is").unwrap();
        let p = ffai::GenerationParameters {
            max_tokens: 3,
            temperature: 0.0,
            ..m.default_parameters()
        };
        let out = m.generate(&ids, &p, |_| true).unwrap();
        assert!(out.text.starts_with(" Paris"), "{ty}: {:?}", out.text);
    }
    // Refuses to overwrite without force, and leaves the file as it was.
    let dst = dir.join("q8_0.gguf");
    let before = std::fs::read(&dst).unwrap();
    let err = requantize_gguf(&src, &dst, WeightType::Q4_0, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gemma3_k_quant_rows_that_do_not_fit_fall_back() {
    let src = model_path("gemma-3-270m-q4_k_m.gguf");
    let dir = std::env::temp_dir().join(format!("ffai-requant-g-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join("gemma-q6_k.gguf");
    let s = requantize_gguf(&src, &dst, WeightType::Q6K, true).unwrap();
    // 640-wide rows (q/k/v, gate/up, the embedding) are not whole 256-element blocks.
    assert!(
        s.fallbacks
            .iter()
            .any(|(n, t)| n == "blk.0.ffn_gate.weight" && *t == WeightType::Q8_0),
        "{s:?}"
    );
    let f = ffai::gguf::GgufFile::open(&dst).unwrap();
    assert_eq!(f.tensor("blk.0.ffn_down.weight").unwrap().ty, WeightType::Q6K);
    let m = load(&dst);
    let ids = m.encode("The capital of France is").unwrap();
    let p = ffai::GenerationParameters {
        max_tokens: 4,
        temperature: 0.0,
        ..m.default_parameters()
    };
    let out = m.generate(&ids, &p, |_| true).unwrap();
    assert!(out.text.starts_with(" the capital"), "{:?}", out.text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn type_names_parse_and_unknown_ones_fail() {
    assert_eq!(parse_type("q4_k").unwrap(), WeightType::Q4K);
    assert_eq!(parse_type("Q8_0").unwrap(), WeightType::Q8_0);
    assert!(parse_type("Q9_9")
        .unwrap_err()
        .to_string()
        .contains("unknown weight type"));
}
