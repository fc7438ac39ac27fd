//! Mixture-of-experts steps recorded as CUDA graphs equal the same steps run op by op,
//! bit for bit, on the MoE parity fixtures: routing (`moe_route`), the gathered expert
//! products, expert biases and the combine all run on the device, so a decode step of an
//! MoE model is recorded from its second run of a row count on. Without a GPU the test
//! says why and passes; with `FFAI_REQUIRE_GPU=1` a missing GPU is a failure.

use std::path::Path;

use ffai::config::ModelConfig;
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::Weights;

fn load(name: &str, dev: &Device) -> Box<dyn LanguageModel> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    (family_for(&cfg, false).unwrap().load)(&cfg, &weights, dev).unwrap()
}

#[test]
fn recorded_moe_steps_equal_eager_steps_bit_for_bit() {
    if let Err(e) = ffai_kernels::cuda::device_count() {
        assert!(
            std::env::var_os("FFAI_REQUIRE_GPU").is_none(),
            "FFAI_REQUIRE_GPU is set but: {e}"
        );
        println!("skipped: {e}");
        return;
    }
    let dev = Device::cuda(0).unwrap();
    let Device::Cuda(b) = &dev else { unreachable!() };
    for name in [
        "qwen3_moe",
        "mixtral",
        "olmoe",
        "gpt_oss",
        "gpt_oss_mxfp4",
        "deepseek_v2",
        "deepseek_v3",
    ] {
        let m = load(name, &dev);
        let vocab = m.config().vocab_size;
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 7919 + 3) % vocab as u32).collect();
        let run = |graphs: bool| {
            b.set_graphs(graphs);
            // A 4-token prefill, then one token per step (recorded from the second).
            let mut st = m.new_state(64, 4).unwrap();
            let mut out = Vec::new();
            let mut logits = Vec::new();
            m.forward(&ids[..4], &mut st, false, &mut logits).unwrap();
            out.extend_from_slice(&logits);
            for &t in &ids[4..] {
                m.forward(&[t], &mut st, false, &mut logits).unwrap();
                out.extend_from_slice(&logits);
            }
            out
        };
        let eager = run(false);
        let recorded = run(true);
        b.set_graphs(true);
        assert_eq!(eager.len(), recorded.len());
        assert!(
            eager.iter().zip(&recorded).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: recorded steps differ from eager ones"
        );
        println!("{name}: {} logits equal", eager.len());
    }
}
