//! Hostile configuration values: every number and flag of every family's config.json,
//! and every integer or float of a GGUF's `{arch}.*` metadata, set to zero, negative,
//! fractional, huge, non-finite and wrongly typed values. Each case must load and run a
//! few tokens, or fail with a one-line error — never panic, and never allocate in
//! proportion to the hostile number (a recording allocator sees every request).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use ffai::config::ModelConfig;
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::Weights;
use ffai_kernels::quant::WeightType;
use serde_json::{json, Value};

/// Passes every request to the system allocator and remembers the largest one.
struct Recording;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged; the only addition is an atomic max.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through here).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

/// No single allocation of these tiny models (hidden 64, vocab 256) comes near this;
/// one sized by a hostile number (2^40 positions, 2^64 - 1 heads) goes far past it.
const ALLOCATION_LIMIT: usize = 64 << 20;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

/// What `generate` does with a model, short: load, a state for a few tokens, a prefill
/// in two chunks, one decode step, and the KV sizes `inspect` prints for the full context.
fn run(lm: &dyn LanguageModel, cfg: &ModelConfig) -> ffai::Result<()> {
    let _ = lm.kv_bytes_by_kind(cfg.max_position_embeddings, 512);
    let n = cfg.max_position_embeddings.min(12);
    let mut st = lm.new_state(n, 4)?;
    let ids: Vec<u32> = (0..n as u32 - 1).map(|i| (i * 7 + 3) % cfg.vocab_size as u32).collect();
    let mut logits = Vec::new();
    if !ids.is_empty() {
        lm.forward(&ids, &mut st, false, &mut logits)?;
    }
    lm.forward(&[1], &mut st, false, &mut logits)?;
    Ok(())
}

fn load_hf(dir: &Path, config: &Value, dev: &Device) -> ffai::Result<()> {
    let cfg = ModelConfig::from_hf_json(config, "config.json")?;
    let family = family_for(&cfg, false)?;
    let weights = Weights::from_safetensors_dir_for(dir, &cfg.model_type)?;
    let lm = (family.load)(&cfg, &weights, dev)?;
    run(&*lm, &cfg)
}

fn load_gguf(bytes: &[u8], dev: &Device) -> ffai::Result<()> {
    let f = GgufFile::from_bytes(bytes)?;
    let mut cfg = ModelConfig::from_gguf(&f, "tiny.gguf")?;
    let family = family_for(&cfg, true)?;
    let weights = Weights::from_gguf(&f, "tiny.gguf");
    cfg.tie_word_embeddings = !weights.has("output.weight");
    let lm = (family.load)(&cfg, &weights, dev)?;
    run(&*lm, &cfg)
}

/// Runs one case: Ok or a one-line error, no panic, no allocation past the limit.
/// Returns whether it loaded.
fn check(case: &str, f: impl FnOnce() -> ffai::Result<()>) -> bool {
    LARGEST.store(0, Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "{case}: an allocation of {largest} bytes (limit {ALLOCATION_LIMIT})"
    );
    match r {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{case}: panicked: {msg}");
        }
        Ok(Err(e)) => {
            let m = e.message();
            assert!(
                !m.is_empty() && !m.contains('\n'),
                "{case}: error is not one line: {m:?}"
            );
            false
        }
        Ok(Ok(())) => true,
    }
}

/// JSON paths (object keys, array indices) of every number and boolean in `v`; for an
/// array only its first element (the others take the same code path).
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Number(_) | Value::Bool(_) => out.push(path.clone()),
        Value::Object(m) => {
            for (k, x) in m {
                path.push(json!(k));
                leaves(x, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            if let Some(x) = a.first() {
                path.push(json!(0));
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, p| match p {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

fn hostile_json_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(0.5),
        json!(3),
        json!(1e300),
        json!(-1e300),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(i64::MIN),
        json!("7"),
        json!([1]),
        json!({}),
        json!(true),
        Value::Null,
    ]
}

#[test]
fn every_config_json_number_and_flag_at_hostile_values() {
    let dev = Device::cpu(2);
    let (mut cases, mut loaded) = (0, 0);
    for family in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma2",
        "gemma3",
        "olmo2",
        "granite",
        "starcoder2",
        "qwen3_moe",
        "mixtral",
        "olmoe",
        "gpt_oss",
        "gpt_oss_mxfp4",
        "deepseek_v2",
        "deepseek_v3",
        "gemma4",
        "gemma4_dense",
        "lfm2",
        "mamba2",
        "nemotron_h",
        "granite4",
        "qwen3_next",
        "qwen3_next_moe",
        "lfm2_moe",
        "nemotron_h_moe",
        "granite4_moe",
        "qwen3_5",
        "qwen3_5_moe",
        "falcon_h1",
        "jamba",
        "nemotron_h_moe_latent",
    ] {
        let dir = fixture(family);
        let original: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        // The unmodified fixture loads and runs: the cases below test the values, not a
        // broken harness.
        assert!(
            check(family, || load_hf(&dir, &original, &dev)),
            "{family} fixture does not load"
        );
        let mut paths = Vec::new();
        leaves(&original, &mut Vec::new(), &mut paths);
        assert!(paths.len() >= 8, "{family}: only {} numeric fields", paths.len());
        for path in &paths {
            for bad in hostile_json_values() {
                let mut config = original.clone();
                *at(&mut config, path) = bad.clone();
                let case = format!("{family} config.json {path:?} = {bad}");
                cases += 1;
                loaded += check(&case, || load_hf(&dir, &config, &dev)) as usize;
            }
        }
    }
    // Most hostile values must be refused, not silently run (many fields are read by
    // no family, so some load).
    assert!(cases > 1000 && loaded < cases / 2, "{loaded} of {cases} cases loaded");
}

/// Each of these must be refused with a message naming the field.
#[test]
fn named_config_errors() {
    let dev = Device::cpu(2);
    let cases: &[(&str, &str, Value, &str)] = &[
        ("mistral", "sliding_window", json!(u64::MAX), "sliding_window"),
        ("llama", "num_key_value_heads", json!(0), "num_key_value_heads"),
        ("llama", "hidden_size", json!(1u64 << 40), "hidden_size"),
        ("llama", "num_hidden_layers", json!(100_000), "num_hidden_layers"),
        ("llama", "rms_norm_eps", json!("1e-5"), "rms_norm_eps"),
        ("llama", "tie_word_embeddings", json!(1), "tie_word_embeddings"),
        ("gemma3", "query_pre_attn_scalar", json!(0), "query_pre_attn_scalar"),
        (
            "gemma3",
            "final_logit_softcapping",
            json!("x"),
            "final_logit_softcapping",
        ),
        ("gemma3", "sliding_window", json!(-2), "sliding_window"),
        ("gemma2", "query_pre_attn_scalar", json!(-1), "query_pre_attn_scalar"),
        ("granite", "logits_scaling", json!(0), "logits_scaling"),
        ("qwen3_moe", "num_local_experts", json!(1u64 << 20), "experts"),
        ("qwen3_moe", "num_experts_per_tok", json!(0), "experts per token"),
        ("qwen3_moe", "num_experts_per_tok", json!(9), "experts per token"),
        ("qwen3_moe", "decoder_sparse_step", json!(0), "decoder_sparse_step"),
        ("qwen3_moe", "mlp_only_layers", json!("1"), "mlp_only_layers"),
        ("qwen3_moe", "norm_topk_prob", json!(1), "norm_topk_prob"),
        ("mixtral", "num_local_experts", json!(0), "experts"),
        ("olmoe", "clip_qkv", json!(-1.5), "clip_qkv"),
        ("olmoe", "num_experts", json!(32), "shape"),
        ("gpt_oss", "swiglu_limit", json!(-7.0), "swiglu_limit"),
        ("gpt_oss", "swiglu_limit", json!("7"), "swiglu_limit"),
        ("gpt_oss", "layer_types", json!(["sliding_attention"]), "layer_types"),
        (
            "gpt_oss",
            "layer_types",
            json!(["sliding_attention", "chunked"]),
            "layer_types",
        ),
        ("gpt_oss", "num_local_experts", json!(0), "experts"),
        ("gpt_oss", "num_experts_per_tok", json!(17), "experts per token"),
        ("gpt_oss_mxfp4", "intermediate_size", json!(64), "shape"),
        ("deepseek_v3", "n_group", json!(3), "groups"),
        ("deepseek_v3", "topk_group", json!(0), "groups"),
        ("deepseek_v3", "topk_group", json!(5), "groups"),
        ("deepseek_v3", "kv_lora_rank", json!(0), "kv_lora_rank"),
        ("deepseek_v3", "qk_rope_head_dim", json!(7), "qk_rope_head_dim"),
        (
            "deepseek_v3",
            "routed_scaling_factor",
            json!(-1.0),
            "routed_scaling_factor",
        ),
        ("deepseek_v3", "n_shared_experts", json!(1u64 << 22), "shared experts"),
        ("deepseek_v3", "n_routed_experts", json!(1u64 << 20), "experts"),
        ("deepseek_v3", "rope_interleave", json!(1), "rope_interleave"),
        ("deepseek_v2", "topk_method", json!("noaux_tc"), "topk_method"),
        ("deepseek_v2", "moe_layer_freq", json!(0), "moe_layer_freq"),
        ("deepseek_v2", "n_group", json!(8), "groups"),
        ("gemma4", "num_kv_shared_layers", json!(7), "num_kv_shared_layers"),
        ("gemma4", "num_kv_shared_layers", json!(6), "no earlier"),
        (
            "gemma4",
            "per_layer_config",
            json!({"9": {"head_dim": 32}}),
            "per_layer_config",
        ),
        ("gemma4", "per_layer_config", json!({"1": {"head_dim": 31}}), "even"),
        (
            "gemma4",
            "per_layer_config",
            json!({"1": {"num_key_value_heads": 3}}),
            "KV heads",
        ),
        (
            "gemma4",
            "per_layer_config",
            json!({"1": {"sliding_window": 3}}),
            "not supported",
        ),
        ("gemma4", "layer_types", json!(["sliding_attention"]), "layer_types"),
        (
            "gemma4",
            "layer_types",
            json!(["chunked", "chunked", "chunked", "chunked", "chunked", "chunked"]),
            "layer_types",
        ),
        (
            "gemma4",
            "final_logit_softcapping",
            json!(-3.0),
            "final_logit_softcapping",
        ),
        (
            "gemma4",
            "hidden_size_per_layer_input",
            json!(1u64 << 22),
            "hidden_size_per_layer_input",
        ),
        (
            "gemma4",
            "vocab_size_per_layer_input",
            json!(8),
            "vocab_size_per_layer_input",
        ),
        ("gemma4", "num_experts", json!(0), "experts"),
        ("gemma4", "top_k_experts", json!(5), "experts per token"),
        (
            "gemma4",
            "rope_parameters",
            json!({"sliding_attention": {"rope_theta": 1e4}}),
            "full_attention",
        ),
        (
            "gemma4",
            "use_bidirectional_attention",
            json!("all"),
            "use_bidirectional_attention",
        ),
        ("gemma4_dense", "use_double_wide_mlp", json!(1), "use_double_wide_mlp"),
        ("lfm2", "conv_L_cache", json!(9), "conv_L_cache"),
        ("lfm2", "conv_L_cache", json!(0), "conv_L_cache"),
        ("lfm2", "block_multiple_of", json!(0), "block_multiple_of"),
        (
            "lfm2",
            "block_ffn_dim_multiplier",
            json!(1e12),
            "block_ffn_dim_multiplier",
        ),
        (
            "lfm2",
            "block_ffn_dim_multiplier",
            json!(-1.0),
            "block_ffn_dim_multiplier",
        ),
        ("lfm2", "norm_eps", json!("1e-5"), "norm_eps"),
        ("lfm2", "layer_types", json!(["conv", "conv"]), "layer_types"),
        (
            "lfm2",
            "layer_types",
            json!(["conv", "conv", "sliding_attention", "conv"]),
            "sliding_attention",
        ),
        ("mamba2", "num_heads", json!(1u64 << 30), "num_heads"),
        ("mamba2", "num_heads", json!(7), "num_heads"),
        ("mamba2", "n_groups", json!(3), "n_groups"),
        ("mamba2", "state_size", json!(0), "state_size"),
        ("mamba2", "conv_kernel", json!(1000), "conv_kernel"),
        ("mamba2", "chunk_size", json!(1u64 << 20), "chunk_size"),
        ("mamba2", "expand", json!(3), "expand"),
        ("mamba2", "head_dim", json!(1u64 << 40), "head_dim"),
        ("mamba2", "time_step_limit", json!([0.5, 0.1]), "time_step_limit"),
        ("mamba2", "time_step_limit", json!([0.0]), "time_step_limit"),
        ("mamba2", "time_step_limit", json!([0.0, "x"]), "time_step_limit"),
        ("mamba2", "layer_norm_epsilon", json!(-1.0), "epsilon"),
        (
            "nemotron_h",
            "num_hidden_layers",
            json!(5),
            "6 block types for 5 layers",
        ),
        (
            "nemotron_h",
            "layers_block_type",
            json!([
                "linear_attention",
                "moe",
                "full_attention",
                "mlp",
                "linear_attention",
                "mlp"
            ]),
            // The dense fixture has no experts for the moe block.
            "ffn_gate_inp",
        ),
        ("nemotron_h_moe", "moe_latent_size", json!(0), "moe_latent_size = 0"),
        // A latent size without the latent projections' tensors.
        ("nemotron_h_moe", "moe_latent_size", json!(8), "latent"),
        ("nemotron_h_moe", "n_group", json!(3), "groups"),
        ("nemotron_h_moe", "topk_group", json!(0), "groups"),
        (
            "nemotron_h_moe",
            "routed_scaling_factor",
            json!(-1.0),
            "routed_scaling_factor",
        ),
        ("nemotron_h_moe", "num_experts_per_tok", json!(0), "experts per token"),
        ("lfm2_moe", "num_experts", json!(0), "num_experts"),
        ("lfm2_moe", "use_expert_bias", json!(false), "use_expert_bias"),
        ("lfm2_moe", "routed_scaling_factor", json!("x"), "routed_scaling_factor"),
        (
            "lfm2_moe",
            "moe_intermediate_size",
            json!(1u64 << 40),
            "moe_intermediate_size",
        ),
        ("granite4_moe", "num_experts_per_tok", json!(9), "experts per token"),
        ("granite4_moe", "intermediate_size", json!(32), "has shape"),
        (
            "nemotron_h",
            "layers_block_type",
            json!([
                "linear_attention",
                "x",
                "full_attention",
                "mlp",
                "linear_attention",
                "mlp"
            ]),
            "\"x\"",
        ),
        ("nemotron_h", "mlp_hidden_act", json!("silu"), "mlp_hidden_act"),
        (
            "nemotron_h",
            "mamba_num_heads",
            json!(3),
            "not a multiple of its 2 groups",
        ),
        ("nemotron_h", "ssm_state_size", json!(1u64 << 30), "ssm_state_size"),
        // Layer 3 becomes sparse, and the dense fixture has no experts for it.
        ("qwen3_next", "mlp_only_layers", json!([0, 1, 2]), "shared expert gate"),
        ("qwen3_next_moe", "num_experts_per_tok", json!(9), "experts per token"),
        ("qwen3_next_moe", "num_experts", json!(1u64 << 40), "experts"),
        (
            "qwen3_next_moe",
            "shared_expert_intermediate_size",
            json!(0),
            "shared_expert_intermediate_size",
        ),
        ("qwen3_next_moe", "moe_intermediate_size", json!(32), "has shape"),
        ("qwen3_next", "mlp_only_layers", json!([0, 1, 2, 9]), "mlp_only_layers"),
        ("qwen3_next", "linear_num_value_heads", json!(3), "not a multiple"),
        ("qwen3_next", "linear_key_head_dim", json!(512), "linear_key_head_dim"),
        (
            "qwen3_next",
            "linear_conv_kernel_dim",
            json!(0),
            "linear_conv_kernel_dim",
        ),
        (
            "qwen3_next",
            "linear_value_head_dim",
            json!(1u64 << 40),
            "linear_value_head_dim",
        ),
        (
            "qwen3_next",
            "rope_parameters",
            json!({"rope_type": "default", "partial_rotary_factor": 2}),
            "partial_rotary_factor",
        ),
        ("granite4", "num_local_experts", json!(8), "ffn_gate_inp"),
        ("qwen3_5", "linear_num_value_heads", json!(3), "not a multiple"),
        ("qwen3_5", "attention_bias", json!(true), "attention biases"),
        ("qwen3_5_moe", "num_experts_per_tok", json!(9), "experts per token"),
        ("qwen3_5_moe", "shared_expert_intermediate_size", json!(0), "shared"),
        ("falcon_h1", "ssm_multipliers", json!([1.0, 2.0]), "ssm_multipliers"),
        ("falcon_h1", "mlp_multipliers", json!([1.0, "x"]), "mlp_multipliers"),
        ("falcon_h1", "mamba_d_ssm", json!(64), "mamba_d_ssm"),
        ("falcon_h1", "mamba_proj_bias", json!(true), "mamba_proj_bias"),
        ("falcon_h1", "mamba_n_groups", json!(4), "not a multiple"),
        ("jamba", "mamba_d_state", json!(1u64 << 30), "mamba_d_state"),
        ("jamba", "mamba_d_conv", json!(9), "mamba_d_conv"),
        ("jamba", "attn_layer_period", json!(0), "attn_layer_period"),
        ("jamba", "mamba_proj_bias", json!(true), "biases"),
        ("granite4", "mamba_d_head", json!(15), "mamba_d_head"),
        ("granite4", "mamba_d_head", json!("x"), "mamba_d_head"),
        ("granite4", "mamba_expand", json!(3), "expand"),
        (
            "granite4",
            "shared_intermediate_size",
            json!(0),
            "shared_intermediate_size",
        ),
        (
            "granite4",
            "position_embedding_type",
            json!("alibi"),
            "position_embedding_type",
        ),
        (
            "granite4",
            "layer_types",
            json!(["mamba", "attention", "mamba"]),
            "layer_types",
        ),
    ];
    for (family, key, value, needle) in cases {
        let dir = fixture(family);
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        config[*key] = value.clone();
        let err = load_hf(&dir, &config, &dev).expect_err(&format!("{family} {key} = {value} loaded"));
        assert!(
            err.message().contains(needle),
            "{family} {key} = {value}: {}",
            err.message()
        );
    }
    // Released Gemma 4 configs spell the full layers' shape `global_head_dim` /
    // `num_global_key_value_heads` (read when there is no `per_layer_config`).
    for (key, value) in [
        ("global_head_dim", json!(0)),
        ("global_head_dim", json!(u64::MAX)),
        ("num_global_key_value_heads", json!(0)),
        ("num_global_key_value_heads", json!(-1)),
    ] {
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("gemma4").join("config.json")).unwrap()).unwrap();
        config.as_object_mut().unwrap().remove("per_layer_config");
        config["global_head_dim"] = json!(32);
        config[key] = value.clone();
        let err = load_hf(&fixture("gemma4"), &config, &dev).expect_err(&format!("gemma4 {key} = {value} loaded"));
        assert!(err.message().contains(key), "gemma4 {key} = {value}: {}", err.message());
    }
    // LFM2 without layer_types takes full_attn_idxs: its entries must be layer indices,
    // and the same layers as layer_types give the same model.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lfm2").join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("layer_types");
    config["full_attn_idxs"] = json!([7]);
    let err = load_hf(&fixture("lfm2"), &config, &dev).unwrap_err();
    assert!(err.message().contains("full_attn_idxs"), "{}", err.message());
    config["full_attn_idxs"] = json!([2]);
    load_hf(&fixture("lfm2"), &config, &dev).unwrap();
    // Granite 4's "auto" mamba_d_head is expand * hidden / heads: the fixture's 16.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("granite4").join("config.json")).unwrap()).unwrap();
    config["mamba_d_head"] = json!("auto");
    load_hf(&fixture("granite4"), &config, &dev).unwrap();
    // Too many query heads per KV head for the attention kernel (the 64 heads need a
    // matching q_proj, so this one stops at the config).
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("config.json")).unwrap()).unwrap();
    config["num_attention_heads"] = json!(128);
    config["num_key_value_heads"] = json!(1);
    config["head_dim"] = json!(2);
    let err = load_hf(&fixture("llama"), &config, &dev).unwrap_err();
    assert!(err.message().contains("query heads per KV head"), "{}", err.message());
}

/// A state whose size cannot exist is refused before anything is allocated.
#[test]
fn an_impossible_state_is_an_error() {
    let dir = fixture("llama");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = ModelConfig::from_hf_json(&config, "config.json").unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
    let lm = (family_for(&cfg, false).unwrap().load)(&cfg, &weights, &Device::cpu(1)).unwrap();
    for (max_seq, chunk) in [(1usize << 40, 512), (usize::MAX, 1), (usize::MAX / 3, usize::MAX / 3)] {
        let err = match lm.new_state(max_seq, chunk) {
            Ok(_) => panic!("a state of {max_seq} tokens was allocated"),
            Err(e) => e,
        };
        assert!(err.message().contains("more than the"), "{}", err.message());
    }
    // A legitimate one still works.
    assert!(lm.new_state(64, 16).is_ok());
}

/// A tiny llama GGUF from the llama fixture's weights (layout only matters here).
fn tiny_gguf(metadata: Vec<(String, MetaValue)>) -> Vec<u8> {
    let dir = fixture("llama");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let shape: Vec<usize> = view.shape().to_vec();
        let data: Vec<u8> = match view.dtype() {
            safetensors::Dtype::F32 => view.data().to_vec(),
            other => panic!("fixture dtype {other:?}"),
        };
        tensors.push((ffai::weights::hf_to_gguf_name(&name), WeightType::F32, shape, data));
    }
    GgufWriter { metadata, tensors }.to_bytes()
}

fn tiny_gguf_metadata() -> Vec<(String, MetaValue)> {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama").join("config.json")).unwrap()).unwrap();
    let u = |k: &str| MetaValue::U32(config[k].as_u64().unwrap() as u32);
    vec![
        ("general.architecture".into(), MetaValue::String("llama".into())),
        ("llama.embedding_length".into(), u("hidden_size")),
        ("llama.feed_forward_length".into(), u("intermediate_size")),
        ("llama.block_count".into(), u("num_hidden_layers")),
        ("llama.attention.head_count".into(), u("num_attention_heads")),
        ("llama.attention.head_count_kv".into(), u("num_key_value_heads")),
        ("llama.context_length".into(), MetaValue::U32(64)),
        ("llama.rope.freq_base".into(), MetaValue::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), MetaValue::F32(1e-5)),
        ("llama.vocab_size".into(), u("vocab_size")),
        ("llama.attention.sliding_window".into(), MetaValue::U32(8)),
        ("llama.attention.key_length".into(), MetaValue::U32(16)),
        ("llama.rope.scaling.type".into(), MetaValue::String("linear".into())),
        ("llama.rope.scaling.factor".into(), MetaValue::F32(2.0)),
    ]
}

#[test]
fn every_gguf_model_number_at_hostile_values() {
    let dev = Device::cpu(2);
    let base = tiny_gguf_metadata();
    if let Err(e) = load_gguf(&tiny_gguf(base.clone()), &dev) {
        panic!("the tiny GGUF does not load: {e}");
    }
    let hostile = [
        MetaValue::U32(0),
        MetaValue::I32(-1),
        MetaValue::U64(u64::MAX),
        MetaValue::U64(1 << 40),
        MetaValue::I64(i64::MIN),
        MetaValue::F32(f32::NAN),
        MetaValue::F64(f64::INFINITY),
        MetaValue::F32(-0.0),
        MetaValue::String("12".into()),
        MetaValue::Bool(true),
        MetaValue::Array(vec![MetaValue::U32(1)]),
    ];
    let (mut cases, mut loaded) = (0, 0);
    for i in 1..base.len() {
        for bad in &hostile {
            let mut md = base.clone();
            md[i].1 = bad.clone();
            let case = format!("GGUF {} = {bad:?}", md[i].0);
            let bytes = tiny_gguf(md);
            cases += 1;
            loaded += check(&case, || load_gguf(&bytes, &dev)) as usize;
        }
    }
    assert!(loaded < cases / 2, "{loaded} of {cases} cases loaded");
}
