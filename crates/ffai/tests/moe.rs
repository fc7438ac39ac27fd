//! The mixture-of-experts families' plumbing around the parity fixtures: Hugging Face
//! tensor names of every expert layout, Qwen3-MoE's sparse-layer rule, and batch
//! invariance (a sequence's logits are the same bits alone or sharing a step with
//! another sequence whose tokens pick other experts).

use std::path::{Path, PathBuf};

use ffai::config::ModelConfig;
use ffai::inspect::Tap;
use ffai::models::moe::sparse_layers_qwen;
use ffai::models::{family_for, BatchShape, Device, LanguageModel};
use ffai::weights::{hf_to_gguf_name, Weights};
use ffai_kernels::backend::{GroupLayout, SeqRows, StepLayout};
use serde_json::json;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn load(family: &str) -> Box<dyn LanguageModel> {
    let dir = fixture_dir(family);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap()
}

#[test]
fn expert_tensor_names_in_every_layout() {
    for (hf, gguf) in [
        ("model.layers.3.mlp.gate.weight", "blk.3.ffn_gate_inp.weight"),
        ("model.layers.3.mlp.gate_proj.weight", "blk.3.ffn_gate.weight"),
        (
            "model.layers.3.mlp.experts.12.gate_proj.weight",
            "blk.3.ffn_gate_exps.12.weight",
        ),
        (
            "model.layers.3.mlp.experts.0.up_proj.weight",
            "blk.3.ffn_up_exps.0.weight",
        ),
        (
            "model.layers.3.mlp.experts.7.down_proj.weight",
            "blk.3.ffn_down_exps.7.weight",
        ),
        (
            "model.layers.0.block_sparse_moe.gate.weight",
            "blk.0.ffn_gate_inp.weight",
        ),
        (
            "model.layers.0.block_sparse_moe.experts.5.w1.weight",
            "blk.0.ffn_gate_exps.5.weight",
        ),
        (
            "model.layers.0.block_sparse_moe.experts.5.w3.weight",
            "blk.0.ffn_up_exps.5.weight",
        ),
        (
            "model.layers.0.block_sparse_moe.experts.5.w2.weight",
            "blk.0.ffn_down_exps.5.weight",
        ),
        (
            "model.layers.1.mlp.experts.gate_up_proj",
            "blk.1.ffn_gate_up_exps.weight",
        ),
        ("model.layers.1.mlp.experts.down_proj", "blk.1.ffn_down_exps.weight"),
        // Not expert names: left alone.
        (
            "model.layers.1.mlp.experts.x.gate_proj.weight",
            "model.layers.1.mlp.experts.x.gate_proj.weight",
        ),
        (
            "model.layers.1.mlp.experts.3.other.weight",
            "model.layers.1.mlp.experts.3.other.weight",
        ),
    ] {
        assert_eq!(hf_to_gguf_name(hf), gguf, "{hf}");
    }
}

fn qwen_cfg(layers: usize, extra: serde_json::Value) -> ModelConfig {
    let mut v = json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": layers,
        "num_attention_heads": 4, "vocab_size": 256,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    ModelConfig::from_hf_json(&v, "test").unwrap()
}

#[test]
fn qwen_sparse_layers_follow_step_and_mlp_only_layers() {
    let c = qwen_cfg(6, json!({"decoder_sparse_step": 2, "mlp_only_layers": [3]}));
    assert_eq!(
        sparse_layers_qwen(&c, 8).unwrap(),
        [false, true, false, false, false, true]
    );
    let c = qwen_cfg(4, json!({}));
    assert_eq!(sparse_layers_qwen(&c, 8).unwrap(), [true; 4]);
    let c = qwen_cfg(4, json!({"mlp_only_layers": [0, 2], "decoder_sparse_step": 1}));
    assert_eq!(sparse_layers_qwen(&c, 8).unwrap(), [false, true, false, true]);
    // No experts: every layer dense.
    assert_eq!(sparse_layers_qwen(&c, 0).unwrap(), [false; 4]);
    for bad in [
        json!({"decoder_sparse_step": 0}),
        json!({"mlp_only_layers": [-1]}),
        json!({"mlp_only_layers": 3}),
    ] {
        let e = sparse_layers_qwen(&qwen_cfg(4, bad.clone()), 8).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{bad}: {e}");
    }
}

/// One step of two sequences (their own blocks) against each sequence alone.
#[test]
fn a_sequence_gives_the_same_bits_alone_or_batched() {
    for family in [
        "qwen3_moe",
        "olmoe",
        "mixtral",
        "gpt_oss",
        "gpt_oss_mxfp4",
        "gemma4",
        "gemma4_dense",
    ] {
        let m = load(family);
        let vocab = m.config().vocab_size;
        // Every KV group (gpt_oss: window and full layers) gets the same tables.
        let windows = m.kv_windows();
        let a: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % vocab as u32).collect();
        let b: Vec<u32> = (0..23).map(|i| (i * 91 + 200) % vocab as u32).collect();
        let alone = |ids: &[u32]| {
            let mut st = m.new_state(64, 512).unwrap();
            let mut out = Vec::new();
            m.forward(ids, &mut st, true, &mut out).unwrap();
            out
        };
        let (la, lb) = (alone(&a), alone(&b));
        let bs = 32u32;
        let shape = BatchShape {
            max_rows: 64,
            max_seqs: 2,
            max_table: 8,
            block_size: bs as usize,
            group_blocks: vec![8; windows.len()],
            max_seq_len: 64,
            max_logit_rows: 64,
            state_slots: 0,
        };
        let mut state = m.new_batch(&shape).unwrap();
        // b first, then a, in blocks that differ from the lone runs' (a: 5, 6; b: 2).
        let tables = vec![2, 5, 6];
        let mut positions: Vec<u32> = (0..b.len() as u32).collect();
        positions.extend(0..a.len() as u32);
        let mut slots: Vec<u32> = (0..b.len() as u32).map(|p| 2 * bs + p).collect();
        slots.extend((0..a.len() as u32).map(|p| tables[1 + (p / bs) as usize] * bs + p % bs));
        let layout = StepLayout {
            positions,
            groups: windows
                .iter()
                .map(|&window| GroupLayout {
                    block_size: bs,
                    n_blocks: 8,
                    window: window as u32,
                    slots: slots.clone(),
                    seqs: vec![
                        SeqRows {
                            first_row: 0,
                            n_rows: b.len() as u32,
                            table_start: 0,
                            table_len: 1,
                        },
                        SeqRows {
                            first_row: b.len() as u32,
                            n_rows: a.len() as u32,
                            table_start: 1,
                            table_len: 2,
                        },
                    ],
                    block_tables: tables.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let tokens: Vec<u32> = b.iter().chain(&a).copied().collect();
        let rows: Vec<u32> = (0..tokens.len() as u32).collect();
        let mut logits = vec![0f32; rows.len() * vocab];
        m.forward_batch(
            &tokens,
            &layout,
            &rows,
            &mut state,
            &mut Tap::default(),
            ffai::models::StepOut::Logits(&mut logits),
        )
        .unwrap();
        assert_eq!(&logits[..b.len() * vocab], &lb[..], "{family}: sequence b batched");
        assert_eq!(&logits[b.len() * vocab..], &la[..], "{family}: sequence a batched");
    }
}

/// A fixture rewritten with transformers 5's in-memory expert layout:
/// `mlp.experts.gate_up_proj` `[E, 2f, h]` (gate rows first) and `mlp.experts.down_proj`
/// `[E, h, f]`, without `.weight`, in a temporary directory.
fn fused_copy(family: &str) -> PathBuf {
    let src = fixture_dir(family);
    let dir = std::env::temp_dir().join(format!("ffai-moe-fused-{family}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut layers = std::collections::BTreeSet::new();
    for (name, view) in st.tensors() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (l, tail) = rest.split_once('.').unwrap();
            if tail.starts_with("mlp.experts.") {
                layers.insert(l.parse::<usize>().unwrap());
                continue;
            }
        }
        out.push((name.clone(), view.shape().to_vec(), view.data().to_vec()));
    }
    let get = |n: String| st.tensor(&n).unwrap();
    for l in layers {
        let mut e = 0;
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        let (mut f, mut h) = (0, 0);
        while let Ok(g) = st.tensor(&format!("model.layers.{l}.mlp.experts.{e}.gate_proj.weight")) {
            (f, h) = (g.shape()[0], g.shape()[1]);
            gate_up.extend_from_slice(g.data());
            gate_up.extend_from_slice(get(format!("model.layers.{l}.mlp.experts.{e}.up_proj.weight")).data());
            down.extend_from_slice(get(format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight")).data());
            e += 1;
        }
        out.push((
            format!("model.layers.{l}.mlp.experts.gate_up_proj"),
            vec![e, 2 * f, h],
            gate_up,
        ));
        out.push((format!("model.layers.{l}.mlp.experts.down_proj"), vec![e, h, f], down));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, &None).unwrap();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    dir
}

#[test]
fn fused_transformers5_expert_layout_loads_the_same() {
    let dir = fused_copy("qwen3_moe");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, "fused").unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    assert!(weights.has("blk.0.ffn_gate_up_exps.weight") && weights.has("blk.0.ffn_down_exps.weight"));
    let fused = (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap();
    let per_expert = load("qwen3_moe");
    let ids: Vec<u32> = (0..48).map(|i| (i * 53 + 11) % 256).collect();
    let run = |m: &dyn LanguageModel| {
        let mut st = m.new_state(64, 512).unwrap();
        let mut out = Vec::new();
        m.forward(&ids, &mut st, true, &mut out).unwrap();
        out
    };
    assert_eq!(run(&*fused), run(&*per_expert), "the same weights in another layout");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn released_checkpoints_config_spellings_load_the_same() {
    // transformers 5 writes `rope_parameters` and (Qwen3-MoE) `num_local_experts`; the
    // released checkpoints' config.json files say `rope_theta` / `rope_scaling: null` and
    // `num_experts`. Both spellings must give the same model.
    let ids: Vec<u32> = (0..40).map(|i| (i * 29 + 3) % 256).collect();
    let run = |m: &dyn LanguageModel| {
        let mut st = m.new_state(64, 512).unwrap();
        let mut out = Vec::new();
        m.forward(&ids, &mut st, true, &mut out).unwrap();
        out
    };
    for family in ["qwen3_moe", "mixtral", "olmoe"] {
        let dir = fixture_dir(family);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let o = json.as_object_mut().unwrap();
        let theta = o.remove("rope_parameters").unwrap()["rope_theta"].clone();
        o.insert("rope_theta".into(), theta);
        o.insert("rope_scaling".into(), serde_json::Value::Null);
        if family == "qwen3_moe" {
            let n = o.remove("num_local_experts").unwrap();
            o.insert("num_experts".into(), n);
        }
        let cfg = ModelConfig::from_hf_json(&json, "old spellings").unwrap();
        let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
        let old = (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap();
        assert_eq!(run(&*old), run(&*load(family)), "{family}");
    }
    // gpt-oss-20b's config.json: `rope_scaling` (yarn) beside a top-level `rope_theta`,
    // `experts_per_token`, `swiglu_limit`, and a `quantization_config` for MXFP4 (not
    // MLX's), over the MXFP4 fixture's weights.
    let dir = fixture_dir("gpt_oss_mxfp4");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let o = json.as_object_mut().unwrap();
    let mut rope = o.remove("rope_parameters").unwrap();
    o.insert(
        "rope_theta".into(),
        rope.as_object_mut().unwrap().remove("rope_theta").unwrap(),
    );
    o.insert("rope_scaling".into(), rope);
    let k = o.remove("num_experts_per_tok").unwrap();
    o.insert("experts_per_token".into(), k);
    o.insert("swiglu_limit".into(), 7.0.into());
    o.insert(
        "quantization_config".into(),
        serde_json::json!({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}),
    );
    let cfg = ModelConfig::from_hf_json(&json, "released spelling").unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    let m = (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap();
    assert_eq!(run(&*m), run(&*load("gpt_oss_mxfp4")), "gpt-oss released spelling");
    // swiglu_limit is read: a smaller clamp changes the logits.
    json["swiglu_limit"] = 1.0.into();
    let cfg = ModelConfig::from_hf_json(&json, "limit 1").unwrap();
    let m = (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap();
    assert_ne!(run(&*m), run(&*load("gpt_oss_mxfp4")), "swiglu_limit ignored");
}

/// Gemma 4's multimodal checkpoints (`Gemma4ForConditionalGeneration`) nest the text model
/// under `model.language_model.` beside vision and audio towers, and its config under
/// `text_config`: the same weights load to the same logits as the causal-LM fixture.
#[test]
fn gemma4_conditional_generation_layout_loads_the_text_model() {
    let src = fixture_dir("gemma4");
    let dir = std::env::temp_dir().join(format!("ffai-gemma4-mm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let config = json!({
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 16},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tower = vec![0u8; 4 * 16];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.replacen("model.", "model.language_model.", 1), v))
        .collect();
    views.push((
        "model.vision_tower.patch_embedder.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 4], &tower).unwrap(),
    ));
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, &None).unwrap(),
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&json, "multimodal").unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    assert!(weights.has("per_layer_token_embd.weight") && weights.has("blk.5.ffn_down_exps.scale"));
    let family = family_for(&cfg, false).unwrap();
    assert_eq!(family.name, "gemma4");
    let mm = (family.load)(&cfg, &weights, &Device::cpu_with(3, false, true)).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 53 + 11) % 256).collect();
    let run = |m: &dyn LanguageModel| {
        let mut st = m.new_state(64, 512).unwrap();
        let mut out = Vec::new();
        m.forward(&ids, &mut st, true, &mut out).unwrap();
        out
    };
    assert_eq!(run(&*mm), run(&*load("gemma4")));
    std::fs::remove_dir_all(&dir).ok();
}
