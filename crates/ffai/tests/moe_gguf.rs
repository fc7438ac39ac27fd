//! Mixture-of-experts models from GGUF as llama.cpp's `convert_hf_to_gguf.py` lays them
//! out: each parity fixture (tests/fixtures/parity/{qwen3_moe,mixtral,olmoe}) rewritten
//! in memory with the converter's tensor names, its stacked 3-D expert tensors
//! (`blk.N.ffn_{gate,up,down}_exps.weight`, row-major `[n_expert, rows, cols]`), the
//! router as `ffn_gate_inp`, its q/k row permutation for architecture `llama` (Mixtral),
//! and its `{arch}.expert_*` metadata, must give the logits the Hugging Face directory
//! gives. The converter drops two config fields (Mixtral's `sliding_window` and
//! OLMoE's `clip_qkv`); ffai reads them from `{arch}.attention.sliding_window` and
//! `{arch}.attention.clamp_kqv` when a file has them, so those are written here.
//!
//! `llama_cpp_converter_output` (ignored: it needs files made by llama.cpp's own
//! converter, see its comment) checks the real converter's files against the same
//! in-memory layout without those two keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ffai::config::ModelConfig;
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::{hf_to_gguf_name_for, Weights};
use ffai_kernels::quant::WeightType;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn input_ids(dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// A tensor's row-major shape and f32 data.
type Tensor = (Vec<usize>, Vec<f32>);

/// llama.cpp's `LlamaModel.permute`: within each head, rows `i` of the first half and
/// `i` of the second half become rows `2i` and `2i + 1` (adjacent-pair RoPE).
fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + j * (hd / 2) + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The fixture as a GGUF file in llama.cpp's layout; `quirk_keys`: also write the
/// window and clamp keys the converter leaves out.
fn to_gguf(family: &str, quirk_keys: bool) -> Vec<u8> {
    let dir = fixture_dir(family);
    let json = config_json(&dir);
    let g = |k: &str| json[k].as_u64().unwrap() as u32;
    let arch = match family {
        "qwen3_moe" => "qwen3moe",
        "mixtral" => "llama",
        other => other,
    };
    let (heads, kv_heads) = (g("num_attention_heads"), g("num_key_value_heads"));
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta = vec![
        ("general.architecture".to_string(), MetaValue::String(arch.into())),
        (key("block_count"), MetaValue::U32(g("num_hidden_layers"))),
        (key("context_length"), MetaValue::U32(g("max_position_embeddings"))),
        (key("embedding_length"), MetaValue::U32(g("hidden_size"))),
        (key("feed_forward_length"), MetaValue::U32(g("intermediate_size"))),
        (key("attention.head_count"), MetaValue::U32(heads)),
        (key("attention.head_count_kv"), MetaValue::U32(kv_heads)),
        (
            key("rope.freq_base"),
            MetaValue::F32(json["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(json["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            key("expert_count"),
            MetaValue::U32(
                json.get("num_experts")
                    .or(json.get("num_local_experts"))
                    .unwrap()
                    .as_u64()
                    .unwrap() as u32,
            ),
        ),
        (key("expert_used_count"), MetaValue::U32(g("num_experts_per_tok"))),
        (key("vocab_size"), MetaValue::U32(g("vocab_size"))),
    ];
    if family == "qwen3_moe" {
        meta.push((
            key("expert_feed_forward_length"),
            MetaValue::U32(g("moe_intermediate_size")),
        ));
        meta.push((key("attention.key_length"), MetaValue::U32(g("head_dim"))));
        meta.push((key("attention.value_length"), MetaValue::U32(g("head_dim"))));
    }
    if quirk_keys {
        if let Some(w) = json["sliding_window"].as_u64() {
            meta.push((key("attention.sliding_window"), MetaValue::U32(w as u32)));
        }
        if let Some(c) = json["clip_qkv"].as_f64() {
            meta.push((key("attention.clamp_kqv"), MetaValue::F32(c as f32)));
        }
    }

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut experts: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let mut data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let shape = view.shape().to_vec();
        if arch == "llama" && name.ends_with("q_proj.weight") {
            data = permute_rows(&data, shape[0], shape[1], heads as usize);
        }
        if arch == "llama" && name.ends_with("k_proj.weight") {
            data = permute_rows(&data, shape[0], shape[1], kv_heads as usize);
        }
        let gname = hf_to_gguf_name_for(&name, json["model_type"].as_str().unwrap());
        match expert_parts(&gname) {
            Some((base, e)) => {
                experts.entry(base).or_default().insert(e, (shape, data));
            }
            None => {
                tensors.insert(gname, (shape, data));
            }
        }
    }
    // Per-expert matrices stacked into one [n_expert, rows, cols] tensor, experts in order.
    for (base, per) in experts {
        let (rows, cols) = (per[&0].0[0], per[&0].0[1]);
        assert!(per.keys().copied().eq(0..per.len()), "{base}: experts 0..n");
        let data = per.into_values().flat_map(|(_, d)| d).collect::<Vec<f32>>();
        tensors.insert(base, (vec![data.len() / (rows * cols), rows, cols], data));
    }
    let tensors = tensors
        .into_iter()
        .map(|(n, (shape, data))| {
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, WeightType::F32, shape, bytes)
        })
        .collect();
    GgufWriter {
        metadata: meta,
        tensors,
    }
    .to_bytes()
}

/// `blk.N.ffn_gate_exps.E.weight` -> (`blk.N.ffn_gate_exps.weight`, E).
fn expert_parts(name: &str) -> Option<(String, usize)> {
    let (head, rest) = name.split_once("_exps.")?;
    let (e, suffix) = rest.split_once('.')?;
    Some((format!("{head}_exps.{suffix}"), e.parse().ok()?))
}

fn load_gguf(bytes: &[u8], src: &str) -> Box<dyn LanguageModel> {
    load_gguf_on(bytes, src, &Device::cpu_with(2, false, true))
}

fn load_gguf_on(bytes: &[u8], src: &str, dev: &Device) -> Box<dyn LanguageModel> {
    let f = GgufFile::from_bytes(bytes).unwrap();
    let mut cfg = ModelConfig::from_gguf(&f, src).unwrap();
    let weights = Weights::from_gguf(&f, src);
    cfg.tie_word_embeddings = !weights.has("output.weight");
    (family_for(&cfg, true).unwrap().load)(&cfg, &weights, dev).unwrap()
}

fn load_hf(family: &str) -> Box<dyn LanguageModel> {
    load_hf_dir(&fixture_dir(family))
}

fn load_hf_dir(dir: &Path) -> Box<dyn LanguageModel> {
    let cfg = ModelConfig::from_hf_json(&config_json(dir), &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(dir, &cfg.model_type).unwrap();
    (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu_with(2, false, true)).unwrap()
}

fn logits(m: &dyn LanguageModel, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(ids.len(), 16).unwrap();
    let mut out = Vec::new();
    m.forward(ids, &mut st, true, &mut out).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn gguf_layout_matches_the_hugging_face_directory() {
    for (family, want_family) in [("qwen3_moe", "qwen3_moe"), ("mixtral", "mixtral"), ("olmoe", "olmoe")] {
        let ids = input_ids(&fixture_dir(family));
        let hf = load_hf(family);
        let gg = load_gguf(&to_gguf(family, true), &format!("{family}.gguf"));
        assert_eq!(gg.family(), want_family, "GGUF dispatch");
        let (a, b) = (logits(&*hf, &ids), logits(&*gg, &ids));
        let d = max_diff(&a, &b);
        println!("{family}: GGUF vs HF directory max abs diff {d:.2e}");
        // Mixtral's permuted q/k rotate the same pairs in another order: float rounding only.
        assert!(d <= 1e-4, "{family}: GGUF logits differ from the HF directory's by {d}");
    }
}

#[test]
fn gguf_without_the_quirk_keys_runs_without_the_quirks() {
    // What llama.cpp's converter writes today: no window for Mixtral, no clamp for OLMoE.
    // The logits must change (the fixtures' window and clamp bite), so the keys are read.
    for family in ["mixtral", "olmoe"] {
        let ids = input_ids(&fixture_dir(family));
        let with = logits(&*load_gguf(&to_gguf(family, true), "with.gguf"), &ids);
        let without = logits(&*load_gguf(&to_gguf(family, false), "without.gguf"), &ids);
        assert!(
            max_diff(&with, &without) > 1e-2,
            "{family}: the quirk key changed nothing"
        );
    }
}

#[test]
fn gguf_expert_tensor_of_the_wrong_shape_is_an_error() {
    let bytes = to_gguf("olmoe", true);
    let f = GgufFile::from_bytes(&bytes).unwrap();
    let mut cfg = ModelConfig::from_gguf(&f, "olmoe.gguf").unwrap();
    let weights = Weights::from_gguf(&f, "olmoe.gguf");
    cfg.tie_word_embeddings = false;
    // Claim more experts than the stacked tensors hold.
    let mut json_cfg = cfg.clone();
    if let ffai::config::RawConfig::Gguf(m) = &mut json_cfg.raw {
        m.insert("olmoe.expert_count".into(), MetaValue::U32(32));
    }
    let e = (family_for(&json_cfg, true).unwrap().load)(&json_cfg, &weights, &Device::cpu(1))
        .err()
        .expect("a load error");
    assert!(e.to_string().contains("shape"), "{e}");
}

#[test]
fn requantized_experts_stay_stacked_and_read_right() {
    // `ffai quantize` over a MoE GGUF: the stacked experts become Q8_0 (rows whose length
    // Q8_0's 32-element blocks do not divide fall back to F16), the router stays f32. The
    // quantized file must give what an f32 file of its dequantized values gives (both with
    // f32 activations): that checks each expert's quantized rows are the ones read.
    let dir = std::env::temp_dir().join(format!("ffai-moe-requant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = Device::cpu_configured(2, false, true, true);
    for family in ["qwen3_moe", "mixtral", "olmoe"] {
        let (src, dst) = (
            dir.join(format!("{family}.gguf")),
            dir.join(format!("{family}.q8.gguf")),
        );
        std::fs::write(&src, to_gguf(family, true)).unwrap();
        ffai::requant::requantize_gguf(&src, &dst, WeightType::Q8_0, true).unwrap();
        let f = GgufFile::open(&dst).unwrap();
        let ty = |n: &str| f.tensors.iter().find(|t| t.name == n).unwrap().ty;
        assert_eq!(ty("blk.0.ffn_gate_inp.weight"), WeightType::F32);
        assert_eq!(ty("blk.0.ffn_gate_exps.weight"), WeightType::Q8_0);
        // The same values in f32.
        let tensors = f
            .tensors
            .iter()
            .map(|t| {
                let cols = *t.shape.last().unwrap();
                let raw = f.tensor_bytes(t);
                let rb = t.ty.row_bytes(cols).unwrap();
                let mut out = vec![0f32; t.shape.iter().product()];
                for (r, row) in out.chunks_mut(cols).enumerate() {
                    ffai_kernels::quant::dequantize_row(t.ty, &raw.as_slice()[r * rb..(r + 1) * rb], row);
                }
                let bytes = out.iter().flat_map(|x| x.to_le_bytes()).collect();
                (t.name.clone(), WeightType::F32, t.shape.clone(), bytes)
            })
            .collect();
        let metadata = f.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let deq = GgufWriter { metadata, tensors }.to_bytes();
        let ids = input_ids(&fixture_dir(family));
        let q = logits(&*load_gguf_on(&std::fs::read(&dst).unwrap(), "q8.gguf", &dev), &ids);
        let d = logits(&*load_gguf_on(&deq, "dequantized.gguf", &dev), &ids);
        let diff = max_diff(&q, &d);
        println!("{family}: Q8_0 file vs its dequantized f32 values max abs diff {diff:.2e}");
        assert!(diff <= 1e-4, "{family}: {diff}");
        // And the quantization did something.
        assert!(max_diff(&q, &logits(&*load_hf(family), &ids)) > 1e-3);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Files from llama.cpp's own converter: set FFAI_LLAMA_CPP_GGUF to a directory holding
/// `mixtral.gguf` and `olmoe.gguf` made by `scripts/convert_parity_gguf.py` (llama.cpp's
/// `convert_hf_to_gguf.py --outtype f32` with dummy tokens, as the fixtures have no
/// tokenizer). Qwen3-MoE cannot be converted: the fixture's dense layer
/// (`mlp_only_layers`) has no llama.cpp tensor name. Run with
/// `cargo test -p ffai --test moe_gguf -- --ignored`.
#[test]
#[ignore]
fn llama_cpp_converter_output() {
    let dir = PathBuf::from(std::env::var("FFAI_LLAMA_CPP_GGUF").expect("FFAI_LLAMA_CPP_GGUF"));
    for family in ["mixtral", "olmoe"] {
        let ids = input_ids(&fixture_dir(family));
        let path = dir.join(format!("{family}.gguf"));
        let real = load_gguf(&std::fs::read(&path).unwrap(), &path.display().to_string());
        let ours = load_gguf(&to_gguf(family, false), "ours.gguf");
        let d = max_diff(&logits(&*real, &ids), &logits(&*ours, &ids));
        println!("{family}: llama.cpp converter's GGUF vs the in-memory layout max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{family}: {d}");
    }
}

/// GPT-OSS from llama.cpp's own converter (`gpt_oss.gguf`, `gpt_oss_mxfp4.gguf` in
/// FFAI_LLAMA_CPP_GGUF, made as above): its split and transposed float experts, its
/// repacked MXFP4 blocks (`transform_nibble_layout`), biases, sinks and
/// `post_attention_norm` load to the Hugging Face directory's logits. llama.cpp's YaRN
/// always truncates the correction range (the GGUF has no `truncate`), so the directory is
/// loaded with `truncate: true` for the comparison; with `truncate: false`, as the
/// checkpoints (and transformers) have it, the logits must differ.
#[test]
#[ignore]
fn llama_cpp_converter_output_gpt_oss() {
    let dir = PathBuf::from(std::env::var("FFAI_LLAMA_CPP_GGUF").expect("FFAI_LLAMA_CPP_GGUF"));
    for family in ["gpt_oss", "gpt_oss_mxfp4"] {
        let fdir = fixture_dir(family);
        let ids = input_ids(&fdir);
        let path = dir.join(format!("{family}.gguf"));
        let bytes = std::fs::read(&path).unwrap();
        let f = GgufFile::from_bytes(&bytes).unwrap();
        let cfg = ModelConfig::from_gguf(&f, "gguf").unwrap();
        assert!(matches!(
            cfg.rope_scaling,
            Some(ffai::config::RopeScaling::Yarn { truncate: true, .. })
        ));
        let real = load_gguf(&bytes, &path.display().to_string());
        let hf = |truncate: bool| {
            let mut j = config_json(&fdir);
            j["rope_parameters"]["truncate"] = truncate.into();
            let cfg = ModelConfig::from_hf_json(&j, family).unwrap();
            let weights = Weights::from_safetensors_dir_for(&fdir, &cfg.model_type).unwrap();
            let dev = Device::cpu_with(2, false, true);
            logits(
                &*(family_for(&cfg, false).unwrap().load)(&cfg, &weights, &dev).unwrap(),
                &ids,
            )
        };
        let got = logits(&*real, &ids);
        let d = max_diff(&got, &hf(true));
        println!("{family}: llama.cpp converter's GGUF vs the HF directory (truncate: true) max abs diff {d:.2e}");
        assert!(d <= 1e-5, "{family}: {d}");
        assert!(
            max_diff(&got, &hf(false)) > 1e-3,
            "{family}: truncate made no difference"
        );
    }
}

/// Hostile MoE metadata: each value is refused with a one-line error, never a panic or
/// a huge allocation.
#[test]
fn hostile_moe_gguf_metadata_is_an_error() {
    let cases: &[(&str, &str, MetaValue)] = &[
        ("qwen3_moe", "qwen3moe.expert_count", MetaValue::U64(1 << 40)),
        ("qwen3_moe", "qwen3moe.expert_count", MetaValue::U32(0)),
        ("qwen3_moe", "qwen3moe.expert_used_count", MetaValue::U32(0)),
        ("qwen3_moe", "qwen3moe.expert_used_count", MetaValue::U32(9)),
        ("qwen3_moe", "qwen3moe.expert_used_count", MetaValue::String("2".into())),
        ("qwen3_moe", "qwen3moe.expert_feed_forward_length", MetaValue::U32(17)),
        ("qwen3_moe", "qwen3moe.expert_feed_forward_length", MetaValue::I32(-1)),
        ("mixtral", "llama.expert_used_count", MetaValue::U64(u64::MAX)),
        ("mixtral", "llama.feed_forward_length", MetaValue::U32(1 << 30)),
        ("olmoe", "olmoe.attention.clamp_kqv", MetaValue::F32(-1.0)),
        ("olmoe", "olmoe.attention.clamp_kqv", MetaValue::F32(f32::NAN)),
    ];
    for (family, key, value) in cases {
        let bytes = to_gguf(family, true);
        let f = GgufFile::from_bytes(&bytes).unwrap();
        let mut w = GgufWriter {
            metadata: f.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            tensors: f
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        t.ty,
                        t.shape.clone(),
                        f.tensor_bytes(t).as_slice().to_vec(),
                    )
                })
                .collect(),
        };
        match w.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.clone(),
            None => w.metadata.push((key.to_string(), value.clone())),
        }
        let bytes = w.to_bytes();
        let r = std::panic::catch_unwind(|| -> ffai::Result<()> {
            let f = GgufFile::from_bytes(&bytes)?;
            let mut cfg = ModelConfig::from_gguf(&f, "hostile.gguf")?;
            let weights = Weights::from_gguf(&f, "hostile.gguf");
            cfg.tie_word_embeddings = !weights.has("output.weight");
            (family_for(&cfg, true)?.load)(&cfg, &weights, &Device::cpu(1)).map(|_| ())
        });
        let err = r
            .unwrap_or_else(|_| panic!("{family} {key} = {value:?}: panicked"))
            .expect_err(&format!("{family} {key} = {value:?} loaded"));
        assert!(!err.message().contains('\n'), "{family} {key}: {}", err.message());
    }
}

/// A DeepSeek fixture as llama.cpp's `deepseek2` GGUF: MLA tensors (`attn_q` or
/// `attn_q_a`/`attn_q_a_norm`/`attn_q_b`, `attn_kv_a_mqa`, `attn_kv_a_norm`, and either
/// the joined `attn_kv_b` or the split `attn_k_b` `[H, r, nope]` / `attn_v_b` `[H, v, r]`),
/// stacked experts, `ffn_*_shexp`, `exp_probs_b.bias`, and the converter's metadata
/// (MLA files: `head_count_kv` 1, `key_length` r + rope, `value_length` r, the per-head
/// widths as `*_mla`).
fn deepseek_gguf(family: &str, split_kv_b: bool) -> Vec<u8> {
    let dir = fixture_dir(family);
    let json = config_json(&dir);
    let g = |k: &str| json[k].as_u64().unwrap() as u32;
    let v3 = family == "deepseek_v3";
    let key = |k: &str| format!("deepseek2.{k}");
    let (r, rope, nope, v, heads) = (
        g("kv_lora_rank"),
        g("qk_rope_head_dim"),
        g("qk_nope_head_dim"),
        g("v_head_dim"),
        g("num_attention_heads"),
    );
    let rp = &json["rope_parameters"];
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("deepseek2".into()),
        ),
        (key("block_count"), MetaValue::U32(g("num_hidden_layers"))),
        (key("context_length"), MetaValue::U32(g("max_position_embeddings"))),
        (key("embedding_length"), MetaValue::U32(g("hidden_size"))),
        (key("feed_forward_length"), MetaValue::U32(g("intermediate_size"))),
        (key("attention.head_count"), MetaValue::U32(heads)),
        (key("attention.head_count_kv"), MetaValue::U32(1)),
        (
            key("rope.freq_base"),
            MetaValue::F32(rp["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(json["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (key("vocab_size"), MetaValue::U32(g("vocab_size"))),
        (
            key("leading_dense_block_count"),
            MetaValue::U32(g("first_k_dense_replace")),
        ),
        (key("expert_count"), MetaValue::U32(g("n_routed_experts"))),
        (key("expert_used_count"), MetaValue::U32(g("num_experts_per_tok"))),
        (
            key("expert_feed_forward_length"),
            MetaValue::U32(g("moe_intermediate_size")),
        ),
        (key("expert_shared_count"), MetaValue::U32(g("n_shared_experts"))),
        (
            key("expert_weights_scale"),
            MetaValue::F32(json["routed_scaling_factor"].as_f64().unwrap() as f32),
        ),
        (key("expert_weights_norm"), MetaValue::Bool(v3)),
        (key("expert_gating_func"), MetaValue::U32(if v3 { 2 } else { 1 })),
        (key("expert_group_count"), MetaValue::U32(g("n_group"))),
        (key("expert_group_used_count"), MetaValue::U32(g("topk_group"))),
        (key("attention.kv_lora_rank"), MetaValue::U32(r)),
        (key("attention.key_length"), MetaValue::U32(r + rope)),
        (key("attention.value_length"), MetaValue::U32(r)),
        (key("attention.key_length_mla"), MetaValue::U32(nope + rope)),
        (key("attention.value_length_mla"), MetaValue::U32(v)),
        (key("rope.dimension_count"), MetaValue::U32(rope)),
    ];
    if v3 {
        meta.push((key("attention.q_lora_rank"), MetaValue::U32(g("q_lora_rank"))));
        let f = |k: &str| rp[k].as_f64().unwrap();
        let ms = |m: f64| 0.1 * m * f("factor").ln() + 1.0;
        meta.push((key("rope.scaling.type"), MetaValue::String("yarn".into())));
        meta.push((key("rope.scaling.factor"), MetaValue::F32(f("factor") as f32)));
        meta.push((
            key("rope.scaling.original_context_length"),
            MetaValue::U32(f("original_max_position_embeddings") as u32),
        ));
        meta.push((
            key("rope.scaling.yarn_log_multiplier"),
            MetaValue::F32((0.1 * f("mscale_all_dim")) as f32),
        ));
        // The fixture's mscale / mscale_all_dim ratio on cos and sin.
        meta.push((
            key("rope.scaling.yarn_attn_factor"),
            MetaValue::F32((ms(f("mscale")) / ms(f("mscale_all_dim"))) as f32),
        ));
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut experts: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let shape = view.shape().to_vec();
        let gname = hf_to_gguf_name_for(&name, json["model_type"].as_str().unwrap());
        if split_kv_b && gname.ends_with("attn_kv_b.weight") {
            let (h, r, nope, v) = (heads as usize, r as usize, nope as usize, v as usize);
            let (mut kb, mut vb) = (Vec::new(), Vec::new());
            for hh in 0..h {
                let base = hh * (nope + v) * r;
                for c in 0..r {
                    for i in 0..nope {
                        kb.push(data[base + i * r + c]);
                    }
                }
                vb.extend_from_slice(&data[base + nope * r..base + (nope + v) * r]);
            }
            tensors.insert(gname.replace("attn_kv_b", "attn_k_b"), (vec![h, r, nope], kb));
            tensors.insert(gname.replace("attn_kv_b", "attn_v_b"), (vec![h, v, r], vb));
            continue;
        }
        match expert_parts(&gname) {
            Some((base, e)) => {
                experts.entry(base).or_default().insert(e, (shape, data));
            }
            None => {
                tensors.insert(gname, (shape, data));
            }
        }
    }
    for (base, per) in experts {
        let (rows, cols) = (per[&0].0[0], per[&0].0[1]);
        let data = per.into_values().flat_map(|(_, d)| d).collect::<Vec<f32>>();
        tensors.insert(base, (vec![data.len() / (rows * cols), rows, cols], data));
    }
    let tensors = tensors
        .into_iter()
        .map(|(n, (shape, data))| {
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, WeightType::F32, shape, bytes)
        })
        .collect();
    GgufWriter {
        metadata: meta,
        tensors,
    }
    .to_bytes()
}

#[test]
fn deepseek_gguf_layouts_match_the_hugging_face_directory() {
    for (family, want) in [("deepseek_v2", "deepseek_v2"), ("deepseek_v3", "deepseek_v3")] {
        let ids = input_ids(&fixture_dir(family));
        let hf = logits(&*load_hf(family), &ids);
        for split in [false, true] {
            let gg = load_gguf(&deepseek_gguf(family, split), &format!("{family}.gguf"));
            assert_eq!(gg.family(), want, "GGUF dispatch");
            let d = max_diff(&hf, &logits(&*gg, &ids));
            println!("{family} (split k_b/v_b: {split}): GGUF vs HF directory max abs diff {d:.2e}");
            assert!(d <= 1e-4, "{family} (split {split}): GGUF logits differ by {d}");
        }
    }
}

/// DeepSeek-V2/V3 from llama.cpp's own converter (`deepseek_v2.gguf`, `deepseek_v3.gguf`
/// in FFAI_LLAMA_CPP_GGUF, made by `scripts/convert_parity_gguf.py` as above): its
/// `deepseek2` tensors (the joined or split `kv_b`, as that converter writes them), its
/// YaRN and routing metadata load to the Hugging Face directory's logits. Where the
/// script converted a copy with the released checkpoints' keys (`<family>.hf` beside the
/// file: V3's `scoring_func`, and mscale = mscale_all_dim, which that converter's YaRN
/// keys can carry), the copy is the directory compared with.
#[test]
#[ignore]
fn llama_cpp_converter_output_deepseek() {
    let dir = PathBuf::from(std::env::var("FFAI_LLAMA_CPP_GGUF").expect("FFAI_LLAMA_CPP_GGUF"));
    for family in ["deepseek_v2", "deepseek_v3"] {
        let ids = input_ids(&fixture_dir(family));
        let path = dir.join(format!("{family}.gguf"));
        let real = load_gguf(&std::fs::read(&path).unwrap(), &path.display().to_string());
        let copy = dir.join(format!("{family}.hf"));
        let hf_model = if copy.is_dir() {
            load_hf_dir(&copy)
        } else {
            load_hf(family)
        };
        let hf = logits(&*hf_model, &ids);
        let d = max_diff(&hf, &logits(&*real, &ids));
        println!("{family}: llama.cpp converter's GGUF vs the HF directory max abs diff {d:.2e}");
        assert!(d <= 1e-4, "{family}: {d}");
    }
}
