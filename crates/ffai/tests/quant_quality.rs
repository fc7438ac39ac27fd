//! What quantization costs, measured: the real SmolLM2 converted to bf16 (the reference)
//! and to MLX 8-, 4- and 3-bit, each scored against the reference by the KL divergence of
//! its next-token distributions on an English text every Debian machine has. The
//! ordering must hold: more bits, less divergence; and 8-bit must be nearly lossless.
//!
//! The weight formats are compared with f32 activations (`LoadOptions::f32_activations`),
//! as the bf16 reference runs: the default 8-bit activations add their own rounding
//! (about 3.5% top-1 disagreement on this 135M model whatever the weights, measured by
//! the second test), which would hide what the weight format costs.

use std::path::{Path, PathBuf};

use ffai::convert::{self, ConvertOptions, FloatType, Target};
use ffai::quality::{divergence, WindowSpec};
use ffai::{LoadOptions, Model};

const TEXT: &str = "/usr/share/common-licenses/GPL-3";

fn real_model(file: &str) -> PathBuf {
    let dir = std::env::var("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"));
    let p = dir.join(file);
    assert!(p.exists(), "{} missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The bf16 conversion of the GGUF: the reference, and the source of the quantized
/// variants (as mlx-community checkpoints are made from the bf16 release).
/// Written once per test process (the tests run in parallel and share it).
fn bf16_dir(gguf: &Path) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quant-quality-bf16");
        let opts = ConvertOptions {
            target: Target::Float,
            float_type: Some(FloatType::BF16),
            force: true,
            ..Default::default()
        };
        convert::convert(gguf, &out, &opts, &mut |_, _, _| {}).unwrap();
        out
    })
    .clone()
}

fn load(dir: &Path, f32_activations: bool) -> Model {
    let opts = LoadOptions {
        f32_activations,
        ..Default::default()
    };
    Model::load(dir.to_str().unwrap(), &opts).unwrap()
}

fn convert_to(src: &Path, target: Target, tag: &str, f32_activations: bool) -> Model {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("quant-quality-{tag}"));
    let opts = ConvertOptions {
        target,
        float_type: Some(FloatType::BF16),
        group_size: 64,
        force: true,
        ..Default::default()
    };
    convert::convert(src, &out, &opts, &mut |_, _, _| {}).unwrap();
    load(&out, f32_activations)
}

#[test]
fn smollm2_kld_orders_by_bits_and_8_bit_is_nearly_lossless() {
    let bf16 = bf16_dir(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let src = bf16.as_path();
    let text = std::fs::read_to_string(TEXT).expect("GPL-3 text (Debian's common-licenses)");
    let reference = load(src, true);
    let tokens = reference.encode(&text).unwrap();
    let spec = WindowSpec {
        max_windows: Some(4),
        ..WindowSpec::for_model(&reference, 512)
    };
    let mut kld = Vec::new();
    for bits in [8, 4, 3] {
        let m = convert_to(src, Target::Affine(bits), &format!("mlx{bits}"), true);
        let d = divergence(&*m.lm, &*reference.lm, &tokens, &spec).unwrap();
        println!(
            "{bits}-bit: mean KLD {:.5}, p99 {:.4}, top-1 agreement {:.2}% over {} positions, {:.2}% over the {} decisive ones",
            d.mean_kld,
            d.p99_kld,
            100.0 * d.top1_agreement,
            d.tokens_scored,
            100.0 * d.top1_agreement_decisive,
            d.decisive_positions
        );
        assert!(d.tokens_scored >= 1000, "{}", d.tokens_scored);
        kld.push((bits, d.mean_kld, d.top1_agreement, d.top1_agreement_decisive));
    }
    let (k8, k4, k3) = (kld[0].1, kld[1].1, kld[2].1);
    assert!(k8 < k4 && k4 < k3, "KLD must fall with more bits: {kld:?}");
    assert!(k8 < 0.01, "8-bit mean KLD {k8}");
    // Where the reference is decisive (top token >= 0.1 ahead: 706 of these 1020
    // positions), 8-bit keeps every prediction. Over all positions it agrees on 97.75%
    // here without calibration (MLX's min/max quantizer 96.7%); the rest are near-ties of
    // this tiny model. Calibrated, it reaches the 98% the quantization issue asks for
    // (asserted in `smollm2_calibration_halves_low_bit_divergence`).
    assert!(
        kld[0].3 >= 0.995,
        "8-bit top-1 agreement on decisive positions {}",
        kld[0].3
    );
    assert!(kld[0].2 >= 0.95, "8-bit top-1 agreement {}", kld[0].2);
}

/// The default engine: the same 8-bit weights with 8-bit activations stay close to the
/// reference (what users get by default), and f32 activations are what removes the
/// remaining gap — so the gap in the test above is the weights', not the engine's.
#[test]
fn smollm2_8_bit_activations_cost_little() {
    let bf16 = bf16_dir(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let src = bf16.as_path();
    let text = std::fs::read_to_string(TEXT).expect("GPL-3 text (Debian's common-licenses)");
    let reference = load(src, true);
    let tokens = reference.encode(&text).unwrap();
    let spec = WindowSpec {
        max_windows: Some(2),
        ..WindowSpec::for_model(&reference, 512)
    };
    let q8 = convert_to(src, Target::Affine(8), "mlx8-q8acts", false);
    let f32 = convert_to(src, Target::Affine(8), "mlx8-f32acts", true);
    let dq = divergence(&*q8.lm, &*reference.lm, &tokens, &spec).unwrap();
    let df = divergence(&*f32.lm, &*reference.lm, &tokens, &spec).unwrap();
    println!(
        "8-bit weights: 8-bit activations KLD {:.5} top-1 {:.2}%; f32 activations KLD {:.5} top-1 {:.2}%",
        dq.mean_kld,
        100.0 * dq.top1_agreement,
        df.mean_kld,
        100.0 * df.top1_agreement
    );
    assert!(dq.mean_kld < 0.02, "{}", dq.mean_kld);
    assert!(dq.top1_agreement >= 0.9, "{}", dq.top1_agreement);
    assert!(
        df.mean_kld < dq.mean_kld,
        "f32 activations {} vs 8-bit {}",
        df.mean_kld,
        dq.mean_kld
    );
}

/// Calibration (`convert --calibration`): weighting each element's error by its input
/// column's mean square, measured by running the bf16 model over other text (Apache-2.0
/// and MPL-2.0, not the GPL-3 it is scored on), cuts the divergence of 4- and 3-bit
/// conversions at least in half, and makes 3 bits (with a 6-bit embedding) write a story
/// on this 135M model (MLX's own 3-bit conversion of it, and ours without calibration,
/// write word salad).
#[test]
fn smollm2_calibration_halves_low_bit_divergence() {
    use ffai::convert::Quantizer;
    use ffai::importance::Importance;
    use std::sync::Arc;

    let bf16 = bf16_dir(&real_model("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let src = bf16.as_path();
    let reference = load(src, true);
    let mut calib = String::new();
    for f in [
        "/usr/share/common-licenses/Apache-2.0",
        "/usr/share/common-licenses/MPL-2.0",
    ] {
        calib += &std::fs::read_to_string(f).expect("Debian's common-licenses");
    }
    let mut calib_tokens = reference.encode(&calib).unwrap();
    calib_tokens.truncate(4096);
    let importance = Arc::new(Importance::collect(&reference, &calib_tokens, 512).unwrap());
    assert_eq!(importance.tokens, 4096);
    // 30 layers x 4 input sites + the head.
    assert_eq!(importance.sites.len(), 30 * 4 + 1, "{:?}", importance.sites.keys());

    let text = std::fs::read_to_string(TEXT).expect("GPL-3 text (Debian's common-licenses)");
    let tokens = reference.encode(&text).unwrap();
    let spec = WindowSpec {
        max_windows: Some(2),
        ..WindowSpec::for_model(&reference, 512)
    };
    let convert_with = |bits: u32, imp: Option<Arc<Importance>>, tag: &str| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("quant-quality-{tag}"));
        let opts = ConvertOptions {
            target: Target::Affine(bits),
            float_type: Some(FloatType::BF16),
            group_size: 64,
            // At 3 bits the tied embedding (also the LM head) keeps 6, as llama.cpp's
            // Q3_K_M keeps its output matrix at Q6_K.
            embedding: (bits == 3).then_some(Target::Affine(6)),
            force: true,
            quantizer: Quantizer::Search,
            importance: imp,
            ..Default::default()
        };
        convert::convert(src, &out, &opts, &mut |_, _, _| {}).unwrap();
        load(&out, true)
    };
    // 8 bits: calibrated, the near-ties of this model mostly stop flipping (MLX's min/max
    // quantizer measures 96.7% here, llama.cpp's Q8_0 of the same model 96.7% against its
    // bf16 in llama-perplexity on these windows).
    let calibrated8 = convert_with(8, Some(importance.clone()), "calibrated8");
    let spec4 = WindowSpec {
        max_windows: Some(4),
        ..spec
    };
    let d8 = divergence(&*calibrated8.lm, &*reference.lm, &tokens, &spec4).unwrap();
    println!(
        "8-bit calibrated: KLD {:.5} top-1 {:.2}% over {} positions",
        d8.mean_kld,
        100.0 * d8.top1_agreement,
        d8.tokens_scored
    );
    assert!(d8.tokens_scored >= 1000);
    assert!(d8.mean_kld < 0.01, "{}", d8.mean_kld);
    assert!(d8.top1_agreement >= 0.98, "8-bit top-1 agreement {}", d8.top1_agreement);
    drop(calibrated8);

    for bits in [4, 3] {
        let plain = convert_with(bits, None, &format!("search{bits}"));
        let calibrated = convert_with(bits, Some(importance.clone()), &format!("calibrated{bits}"));
        let dp = divergence(&*plain.lm, &*reference.lm, &tokens, &spec).unwrap();
        let dc = divergence(&*calibrated.lm, &*reference.lm, &tokens, &spec).unwrap();
        println!(
            "{bits}-bit: uncalibrated KLD {:.4} top-1 {:.2}%; calibrated KLD {:.4} top-1 {:.2}%",
            dp.mean_kld,
            100.0 * dp.top1_agreement,
            dc.mean_kld,
            100.0 * dc.top1_agreement
        );
        assert!(
            dc.mean_kld <= 0.5 * dp.mean_kld,
            "{bits}-bit: calibrated {} vs {}",
            dc.mean_kld,
            dp.mean_kld
        );
        assert!(dc.top1_agreement > dp.top1_agreement, "{bits}-bit");
        if bits == 3 {
            let params = ffai::GenerationParameters {
                temperature: 0.0,
                max_tokens: 48,
                ..calibrated.default_parameters()
            };
            let prompt = calibrated.encode("Once upon a time, in a quiet village").unwrap();
            let out = calibrated.generate(&prompt, &params, |_| true).unwrap();
            println!("3-bit calibrated: {:?}", out.text);
            let ids = &out.generated_ids;
            let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
            assert!(
                distinct * 2 >= ids.len(),
                "3-bit calibrated text repeats itself: {:?}",
                out.text
            );
        }
    }
}
