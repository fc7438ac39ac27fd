//! What quantization costs, measured: the real SmolLM2 converted to bf16 (the reference)
//! and to MLX 8-, 4- and 3-bit, each scored against the reference by the KL divergence of
//! its next-token distributions on an English text every Debian machine has. The
//! ordering must hold: more bits, less divergence; and 8-bit must be nearly lossless.

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

fn convert_to(src: &Path, target: Target, tag: &str) -> Model {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("quant-quality-{tag}"));
    let opts = ConvertOptions {
        target,
        float_type: Some(FloatType::BF16),
        group_size: 64,
        force: true,
        ..Default::default()
    };
    convert::convert(src, &out, &opts, &mut |_, _, _| {}).unwrap();
    Model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn smollm2_kld_orders_by_bits_and_8_bit_is_nearly_lossless() {
    let src = real_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = std::fs::read_to_string(TEXT).expect("GPL-3 text (Debian's common-licenses)");
    let reference = convert_to(&src, Target::Float, "bf16");
    let tokens = reference.encode(&text).unwrap();
    let spec = WindowSpec {
        max_windows: Some(4),
        ..WindowSpec::for_model(&reference, 512)
    };
    let mut kld = Vec::new();
    for bits in [8, 4, 3] {
        let m = convert_to(&src, Target::Affine(bits), &format!("mlx{bits}"));
        let d = divergence(&*m.lm, &*reference.lm, &tokens, &spec).unwrap();
        println!(
            "{bits}-bit: mean KLD {:.5}, p99 {:.4}, top-1 agreement {:.2}% over {} positions",
            d.mean_kld,
            d.p99_kld,
            100.0 * d.top1_agreement,
            d.tokens_scored
        );
        assert!(d.tokens_scored >= 1000, "{}", d.tokens_scored);
        kld.push((bits, d.mean_kld, d.top1_agreement));
    }
    let (k8, k4, k3) = (kld[0].1, kld[1].1, kld[2].1);
    assert!(k8 < k4 && k4 < k3, "KLD must fall with more bits: {kld:?}");
    assert!(k8 < 0.01, "8-bit mean KLD {k8}");
    assert!(kld[0].2 >= 0.98, "8-bit top-1 agreement {}", kld[0].2);
}
