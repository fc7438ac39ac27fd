//! Gemma 4 from GGUF as llama.cpp's `convert_hf_to_gguf.py` (`Gemma4Model`) writes it.
//! Each parity fixture (tests/fixtures/parity/{gemma4,gemma4_dense}) is rewritten in
//! memory the way that converter does — its names (`per_layer_token_embd`, `inp_gate`,
//! `proj`, `post_norm`, `layer_output_scale`, `ffn_gate_inp.scale`,
//! `ffn_down_exps.scale`, `ffn_gate_up_exps`, `pre_ffw_norm_2`, `post_ffw_norm_{1,2}`),
//! norms stored as used (no +1), no `attn_v` on the k = v layers, `rope_freqs.weight`
//! (1 for the pairs the proportional RoPE rotates, 1e30 for the rest) and its metadata
//! (`sliding_window_pattern`, `key_length{,_swa}`, per-layer `head_count_kv` and
//! `feed_forward_length`, `rope.freq_base{,_swa}`, `rope.dimension_count{,_swa}`,
//! `shared_kv_layers`, `embedding_length_per_layer_input`, `expert_*`,
//! `final_logit_softcapping`) — and must give the logits the Hugging Face directory gives.
//!
//! Hostile metadata must fail with a one-line error (never a panic, never an allocation
//! sized by the hostile value: a recording allocator sees every request); `ffai quantize`
//! output (Q8_0, Q4_K) must load and stay near the f32 logits. The `#[ignore]`d
//! `llama_cpp_converter_output_gemma4*` tests read files made by llama.cpp's own
//! converter (`scripts/convert_parity_gguf.py`, FFAI_LLAMA_CPP_GGUF).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ffai::config::ModelConfig;
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::{hf_to_gguf_name_for, Weights};
use ffai_kernels::quant::WeightType;
use serde_json::Value;

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

/// No single allocation of these tiny models (hidden 32, vocab 256) comes near this; one
/// sized by a hostile number (2^40 heads or widths) goes far past it.
const ALLOCATION_LIMIT: usize = 64 << 20;

const FAMILIES: [&str; 2] = ["gemma4", "gemma4_dense"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn config_json(dir: &Path) -> Value {
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

/// The fixture as the converter writes it (tensors f32, `--outtype f32`).
fn to_gguf(family: &str) -> Vec<u8> {
    let dir = fixture_dir(family);
    let j = config_json(&dir);
    let u = |k: &str| j[k].as_u64().unwrap() as u32;
    let n = u("num_hidden_layers") as usize;
    let key = |k: &str| format!("gemma4.{k}");
    let swa: Vec<bool> = j["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t == "sliding_attention")
        .collect();
    // The converter's full-layer head size and KV heads: the first full layer's
    // per_layer_config entry.
    let first_full = swa.iter().position(|s| !s).unwrap().to_string();
    let plc = &j["per_layer_config"][&first_full];
    let hd_full = plc["head_dim"].as_u64().unwrap() as u32;
    let hd_swa = u("head_dim");
    let kv_swa = u("num_key_value_heads");
    let kv = match plc["num_key_value_heads"].as_u64() {
        Some(full) => MetaValue::Array(
            swa.iter()
                .map(|&s| MetaValue::U32(if s { kv_swa } else { full as u32 }))
                .collect(),
        ),
        None => MetaValue::U32(kv_swa),
    };
    let shared = u("num_kv_shared_layers") as usize;
    let ff = u("intermediate_size");
    let ffn = match j["use_double_wide_mlp"].as_bool() {
        Some(true) => MetaValue::Array(
            (0..n)
                .map(|i| MetaValue::U32(if i < n - shared { ff } else { 2 * ff }))
                .collect(),
        ),
        _ => MetaValue::U32(ff),
    };
    let rp = &j["rope_parameters"];
    let theta = |kind: &str| rp[kind]["rope_theta"].as_f64().unwrap() as f32;
    let vocab = u("vocab_size");
    let mut meta = vec![
        ("general.architecture".to_string(), MetaValue::String("gemma4".into())),
        (key("block_count"), MetaValue::U32(n as u32)),
        (key("context_length"), MetaValue::U32(u("max_position_embeddings"))),
        (key("embedding_length"), MetaValue::U32(u("hidden_size"))),
        (key("feed_forward_length"), ffn),
        (key("attention.head_count"), MetaValue::U32(u("num_attention_heads"))),
        (key("attention.head_count_kv"), kv),
        (key("rope.freq_base"), MetaValue::F32(theta("full_attention"))),
        (key("rope.freq_base_swa"), MetaValue::F32(theta("sliding_attention"))),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(j["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (key("attention.key_length"), MetaValue::U32(hd_full)),
        (key("attention.value_length"), MetaValue::U32(hd_full)),
        (key("attention.key_length_swa"), MetaValue::U32(hd_swa)),
        (key("attention.value_length_swa"), MetaValue::U32(hd_swa)),
        (
            key("final_logit_softcapping"),
            MetaValue::F32(j["final_logit_softcapping"].as_f64().unwrap() as f32),
        ),
        (key("attention.sliding_window"), MetaValue::U32(u("sliding_window"))),
        (key("attention.shared_kv_layers"), MetaValue::U32(shared as u32)),
        (
            key("embedding_length_per_layer_input"),
            MetaValue::U32(u("hidden_size_per_layer_input")),
        ),
        (
            key("attention.sliding_window_pattern"),
            MetaValue::Array(swa.iter().map(|&s| MetaValue::Bool(s)).collect()),
        ),
        (key("rope.dimension_count"), MetaValue::U32(hd_full)),
        (key("rope.dimension_count_swa"), MetaValue::U32(hd_swa)),
        ("tokenizer.ggml.model".to_string(), MetaValue::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array((0..vocab).map(|i| MetaValue::String(format!("<t{i}>"))).collect()),
        ),
    ];
    if j["enable_moe_block"].as_bool() == Some(true) {
        meta.push((key("expert_count"), MetaValue::U32(u("num_experts"))));
        meta.push((key("expert_used_count"), MetaValue::U32(u("top_k_experts"))));
        meta.push((
            key("expert_feed_forward_length"),
            MetaValue::U32(u("moe_intermediate_size")),
        ));
    }

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let gname = hf_to_gguf_name_for(&name, "gemma4_text");
        assert!(
            gname.starts_with("blk.") || !gname.starts_with("model."),
            "{name} unmapped"
        );
        tensors.insert(gname, (view.shape().to_vec(), data));
    }
    // The proportional RoPE as frequency factors.
    let p = rp["full_attention"]["partial_rotary_factor"].as_f64().unwrap();
    let rot = (hd_full as f64 * p / 2.0) as usize;
    let half = hd_full as usize / 2;
    let factors = (0..half).map(|i| if i < rot { 1.0 } else { 1e30 }).collect();
    tensors.insert("rope_freqs.weight".into(), (vec![half], factors));
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

fn try_load_gguf(bytes: &[u8], src: &str, dev: &Device) -> ffai::Result<Box<dyn LanguageModel>> {
    let f = GgufFile::from_bytes(bytes)?;
    let mut cfg = ModelConfig::from_gguf(&f, src)?;
    let weights = Weights::from_gguf(&f, src);
    cfg.tie_word_embeddings = !weights.has("output.weight");
    (family_for(&cfg, true)?.load)(&cfg, &weights, dev)
}

fn load_gguf(bytes: &[u8], src: &str) -> Box<dyn LanguageModel> {
    try_load_gguf(bytes, src, &Device::cpu_with(2, false, true)).unwrap()
}

fn load_hf(family: &str) -> Box<dyn LanguageModel> {
    let dir = fixture_dir(family);
    let cfg = ModelConfig::from_hf_json(&config_json(&dir), &dir.display().to_string()).unwrap();
    let weights = Weights::from_safetensors_dir_for(&dir, &cfg.model_type).unwrap();
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
    for family in FAMILIES {
        let ids = input_ids(&fixture_dir(family));
        let hf = logits(&*load_hf(family), &ids);
        let gg = load_gguf(&to_gguf(family), &format!("{family}.gguf"));
        assert_eq!(gg.family(), "gemma4", "GGUF dispatch");
        let d = max_diff(&hf, &logits(&*gg, &ids));
        println!("{family}: GGUF layout vs HF directory max abs diff {d:.2e}");
        // The same weights and the same ops; only the unrotated pairs turn (by less
        // than 1e-30 rad per position) where the directory's table has 0.
        assert!(d <= 1e-6, "{family}: GGUF logits differ from the HF directory's by {d}");
    }
}

/// The GGUF features are read, not defaulted: each changed key changes the logits.
#[test]
fn gemma4_gguf_keys_are_read() {
    let family = "gemma4";
    let ids = input_ids(&fixture_dir(family));
    let base = logits(&*load_gguf(&to_gguf(family), "base.gguf"), &ids);
    let cases: Vec<(&str, MetaValue)> = vec![
        ("gemma4.rope.freq_base_swa", MetaValue::F32(500.0)),
        ("gemma4.rope.freq_base", MetaValue::F32(500.0)),
        ("gemma4.final_logit_softcapping", MetaValue::F32(1.0)),
        ("gemma4.attention.sliding_window", MetaValue::U32(2)),
        ("gemma4.expert_used_count", MetaValue::U32(1)),
    ];
    for (k, v) in cases {
        let m = logits(
            &*load_gguf(&with_meta(&to_gguf(family), k, Some(v)), "changed.gguf"),
            &ids,
        );
        assert!(max_diff(&base, &m) > 1e-4, "{k}: changing it changed nothing");
    }
}

/// The file with one metadata key replaced (`Some`) or removed (`None`).
fn with_meta(bytes: &[u8], key: &str, value: Option<MetaValue>) -> Vec<u8> {
    edit(bytes, |md, _| {
        md.retain(|(k, _)| k != key);
        if let Some(v) = value {
            md.push((key.to_string(), v));
        }
    })
}

type TensorList = Vec<(String, WeightType, Vec<usize>, Vec<u8>)>;

fn edit(bytes: &[u8], f: impl FnOnce(&mut Vec<(String, MetaValue)>, &mut TensorList)) -> Vec<u8> {
    let file = GgufFile::from_bytes(bytes).unwrap();
    let mut metadata: Vec<(String, MetaValue)> = file.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut tensors: TensorList = file
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ty,
                t.shape.clone(),
                file.tensor_bytes(t).as_slice().to_vec(),
            )
        })
        .collect();
    f(&mut metadata, &mut tensors);
    GgufWriter { metadata, tensors }.to_bytes()
}

/// Load and run a few tokens: Ok or a one-line error, no panic, no allocation past the
/// limit. Returns the error message, if any.
fn check(case: &str, bytes: &[u8]) -> Option<String> {
    LARGEST.store(0, Ordering::Relaxed);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> ffai::Result<()> {
        let lm = try_load_gguf(bytes, "hostile.gguf", &Device::cpu(1))?;
        let _ = lm.kv_bytes_by_kind(256, 64);
        let mut st = lm.new_state(8, 4)?;
        let mut out = Vec::new();
        lm.forward(&[1, 5, 9, 200], &mut st, false, &mut out)?;
        lm.forward(&[3], &mut st, false, &mut out)
    }));
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "{case}: an allocation of {largest} bytes (limit {ALLOCATION_LIMIT})"
    );
    match r {
        Err(_) => panic!("{case}: panicked"),
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            let m = e.message().to_string();
            assert!(
                !m.is_empty() && !m.contains('\n'),
                "{case}: error is not one line: {m:?}"
            );
            Some(m)
        }
    }
}

/// Every `gemma4.*` key at hostile values (zero, huge, negative, non-finite, wrong type,
/// empty, short and long arrays, arrays of huge or zero entries): each loads and runs or
/// is a one-line error, with no panic and no allocation sized by the value.
#[test]
fn every_gemma4_gguf_key_at_hostile_values() {
    for family in FAMILIES {
        let base = to_gguf(family);
        assert!(check("base", &base).is_none(), "{family}: the base file fails");
        let file = GgufFile::from_bytes(&base).unwrap();
        let keys: Vec<String> = file
            .metadata
            .keys()
            .filter(|k| k.starts_with("gemma4."))
            .cloned()
            .collect();
        let values = |n: usize| -> Vec<MetaValue> {
            vec![
                MetaValue::U32(0),
                MetaValue::U64(1 << 40),
                MetaValue::U64(u64::MAX),
                MetaValue::I32(-1),
                MetaValue::F32(f32::NAN),
                MetaValue::F32(-3.0),
                MetaValue::F64(f64::INFINITY),
                MetaValue::String("6".into()),
                MetaValue::Bool(true),
                MetaValue::Array(vec![]),
                MetaValue::Array(vec![MetaValue::U32(2); n - 1]),
                MetaValue::Array(vec![MetaValue::U32(2); n + 1]),
                MetaValue::Array(vec![MetaValue::U32(2); 100_000]),
                MetaValue::Array(vec![MetaValue::U64(1 << 40); n]),
                MetaValue::Array(vec![MetaValue::U32(0); n]),
                MetaValue::Array(vec![MetaValue::Bool(false); n]),
                MetaValue::Array(vec![MetaValue::String("x".into()); n]),
            ]
        };
        let mut refused = 0;
        for k in &keys {
            for v in std::iter::once(None).chain(values(6).into_iter().map(Some)) {
                let case = format!("{family}: {k} = {v:?}");
                refused += check(&case, &with_meta(&base, k, v)).is_some() as usize;
            }
        }
        println!("{family}: {} keys, {refused} hostile cases refused", keys.len());
    }
}

/// Cases that must be refused (a one-line error naming the problem), not run.
#[test]
fn hostile_gemma4_gguf_metadata_is_an_error() {
    let u = MetaValue::U32;
    let arr = |v: &[u32]| MetaValue::Array(v.iter().map(|&x| MetaValue::U32(x)).collect());
    let bools = |v: &[bool]| MetaValue::Array(v.iter().map(|&x| MetaValue::Bool(x)).collect());
    let cases: Vec<(&str, &str, Option<MetaValue>, &str)> = vec![
        (
            "gemma4",
            "attention.sliding_window_pattern",
            None,
            "sliding_window_pattern",
        ),
        (
            "gemma4",
            "attention.sliding_window_pattern",
            Some(bools(&[true; 5])),
            "entries",
        ),
        ("gemma4", "attention.sliding_window_pattern", Some(arr(&[1; 6])), "bool"),
        (
            "gemma4",
            "attention.head_count_kv",
            Some(arr(&[2, 1, 2, 1, 2])),
            "entries",
        ),
        (
            "gemma4",
            "attention.head_count_kv",
            Some(arr(&[2, 0, 2, 1, 2, 1])),
            "head_count_kv",
        ),
        (
            "gemma4",
            "attention.head_count_kv",
            Some(arr(&[2, 3, 2, 3, 2, 3])),
            "KV heads",
        ),
        (
            "gemma4",
            "attention.head_count_kv",
            Some(MetaValue::U64(1 << 40)),
            "exceeds the limit",
        ),
        ("gemma4", "attention.key_length_swa", None, "key_length_swa"),
        ("gemma4", "attention.key_length_swa", Some(u(0)), "key_length_swa"),
        ("gemma4", "attention.key_length_swa", Some(u(15)), "key length 15"),
        (
            "gemma4",
            "attention.key_length_swa",
            Some(MetaValue::U64(1 << 40)),
            "key_length_swa",
        ),
        ("gemma4", "attention.value_length_swa", Some(u(8)), "value_length_swa"),
        ("gemma4", "attention.value_length", Some(u(16)), "value_length"),
        ("gemma4", "rope.dimension_count_swa", Some(u(8)), "rotates part"),
        ("gemma4", "rope.dimension_count", Some(u(8)), "rotates part"),
        (
            "gemma4",
            "rope.freq_base_swa",
            Some(MetaValue::F32(-1.0)),
            "freq_base_swa",
        ),
        (
            "gemma4",
            "rope.freq_base_swa",
            Some(MetaValue::F32(f32::NAN)),
            "freq_base_swa",
        ),
        ("gemma4", "attention.shared_kv_layers", Some(u(6)), "share"),
        ("gemma4", "attention.shared_kv_layers", Some(u(3)), "share"),
        (
            "gemma4",
            "attention.shared_kv_layers",
            Some(MetaValue::U64(1 << 40)),
            "shared_kv_layers",
        ),
        ("gemma4", "attention.sliding_window", None, "sliding_window"),
        (
            "gemma4",
            "embedding_length_per_layer_input",
            None,
            "embedding_length_per_layer_input",
        ),
        (
            "gemma4",
            "embedding_length_per_layer_input",
            Some(MetaValue::U64(1 << 30)),
            "embedding_length_per_layer_input",
        ),
        ("gemma4", "embedding_length_per_layer_input", Some(u(16)), "shape"),
        ("gemma4", "expert_count", Some(u(0)), "expert_count"),
        ("gemma4", "expert_count", Some(MetaValue::U64(1 << 40)), "expert_count"),
        ("gemma4", "expert_count", Some(u(8)), "shape"),
        ("gemma4", "expert_used_count", None, "expert_used_count"),
        ("gemma4", "expert_used_count", Some(u(0)), "experts per token"),
        ("gemma4", "expert_used_count", Some(u(5)), "experts per token"),
        (
            "gemma4",
            "expert_feed_forward_length",
            None,
            "expert_feed_forward_length",
        ),
        (
            "gemma4",
            "expert_feed_forward_length",
            Some(arr(&[16, 16, 16, 16, 16, 32])),
            "differs",
        ),
        (
            "gemma4",
            "final_logit_softcapping",
            Some(MetaValue::F32(-3.0)),
            "final_logit_softcapping",
        ),
        (
            "gemma4",
            "final_logit_softcapping",
            Some(MetaValue::F32(f32::INFINITY)),
            "final_logit_softcapping",
        ),
        (
            "gemma4_dense",
            "feed_forward_length",
            Some(arr(&[32, 32, 32, 32, 64])),
            "entries",
        ),
        (
            "gemma4_dense",
            "feed_forward_length",
            Some(arr(&[32, 32, 32, 32, 64, 0])),
            "feed_forward_length",
        ),
        (
            "gemma4_dense",
            "feed_forward_length",
            Some(arr(&[32, 32, 32, 32, 64, 1 << 30])),
            "feed_forward_length",
        ),
        ("gemma4_dense", "feed_forward_length", Some(u(32)), "shape"),
        ("gemma4_dense", "feed_forward_length", None, "feed_forward_length"),
        ("gemma4_dense", "attention.head_count_kv", Some(u(1)), "shape"),
    ];
    for (family, k, v, want) in cases {
        let case = format!("{family}: gemma4.{k} = {v:?}");
        let bytes = with_meta(&to_gguf(family), &format!("gemma4.{k}"), v);
        let e = check(&case, &bytes).unwrap_or_else(|| panic!("{case}: loaded"));
        assert!(e.contains(want), "{case}: {e:?} does not mention {want:?}");
    }
}

/// Tensors of the wrong shape or values: refused.
#[test]
fn hostile_gemma4_gguf_tensors_are_an_error() {
    type Edit = fn(&mut TensorList);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "rope_freqs of 15",
            |t| {
                let e = t.iter_mut().find(|e| e.0 == "rope_freqs.weight").unwrap();
                e.2 = vec![15];
                e.3.truncate(60);
            },
            "rope_freqs",
        ),
        (
            "a zero rope factor",
            |t| {
                let e = t.iter_mut().find(|e| e.0 == "rope_freqs.weight").unwrap();
                e.3[..4].copy_from_slice(&0f32.to_le_bytes());
            },
            "rope_freqs",
        ),
        (
            "a router without experts",
            |t| t.retain(|e| e.0 != "blk.2.ffn_gate_up_exps.weight"),
            "layer 2",
        ),
        (
            "layer 1 without k",
            |t| t.retain(|e| e.0 != "blk.1.attn_k.weight"),
            "blk.1.attn_k",
        ),
        (
            "an attn_v of the wrong width",
            |t| {
                let e = t.iter_mut().find(|e| e.0 == "blk.0.attn_v.weight").unwrap();
                e.2 = vec![16, 32];
                e.3.truncate(16 * 32 * 4);
            },
            "shape",
        ),
    ];
    for (what, f, want) in cases {
        let bytes = edit(&to_gguf("gemma4"), |_, t| f(t));
        let e = check(what, &bytes).unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(e.contains(want), "{what}: {e:?} does not mention {want:?}");
    }
    // Router tensors in a file that says it has no experts.
    let bytes = with_meta(&to_gguf("gemma4"), "gemma4.expert_count", None);
    let e = check("no expert_count", &bytes).expect("loaded without expert_count");
    assert!(e.contains("expert_count"), "{e}");
}

/// `ffai quantize --type Q8_0` / `--type Q4_K` of a Gemma 4 GGUF (the in-memory layout,
/// written to a file) loads and stays near the f32 logits. (ffai has no Q4_K_M mixture:
/// `llama_cpp_converter_output_gemma4_quantized` loads llama-quantize's.) These fixtures'
/// rows are 8 to 128 wide, so Q4_K falls back to Q5_0 (rows of 32k) and F16 (8, 16), as
/// llama.cpp's quantizer does. The bounds: see `Q8_BOUND`.
#[test]
fn quantized_gemma4_gguf_loads_and_stays_close() {
    let dir = std::env::temp_dir().join(format!("ffai-gemma4-requant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for family in FAMILIES {
        let src = dir.join(format!("{family}.gguf"));
        std::fs::write(&src, to_gguf(family)).unwrap();
        let f32_logits = logits(
            &*load_gguf(&to_gguf(family), "f32.gguf"),
            &input_ids(&fixture_dir(family)),
        );
        for (ty, name, bound) in [
            (WeightType::Q8_0, "Q8_0", Q8_BOUND),
            (WeightType::Q4K, "Q4_K", Q4_BOUND),
        ] {
            let dst = dir.join(format!("{family}.{name}.gguf"));
            ffai::requant::requantize_gguf(&src, &dst, ty, true).unwrap();
            compare_quantized(
                family,
                &format!("ffai {name}"),
                &std::fs::read(&dst).unwrap(),
                &f32_logits,
                bound,
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Loads a quantized file and compares its logits with the f32 ones.
fn compare_quantized(family: &str, what: &str, bytes: &[u8], f32_logits: &[f32], bound: f32) {
    let f = GgufFile::from_bytes(bytes).unwrap();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in &f.tensors {
        *types.entry(t.ty.name().to_string()).or_default() += 1;
    }
    let ids = input_ids(&fixture_dir(family));
    let q = logits(&*load_gguf(bytes, what), &ids);
    // The quantized file reads as its own values: the same file with every tensor
    // dequantized to f32 gives the same logits, up to the quantized activations of the
    // quantized products (f32 activations here: float rounding only).
    let dev = Device::cpu_configured(2, false, true, true);
    let deq = edit(bytes, |_, tensors| {
        for t in tensors.iter_mut() {
            let cols = *t.2.last().unwrap();
            let rb = t.1.row_bytes(cols).unwrap();
            let mut out = vec![0f32; t.2.iter().product()];
            for (r, row) in out.chunks_mut(cols).enumerate() {
                ffai_kernels::quant::dequantize_row(t.1, &t.3[r * rb..(r + 1) * rb], row);
            }
            t.1 = WeightType::F32;
            t.3 = out.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
    });
    let qf = logits(&*try_load_gguf(bytes, what, &dev).unwrap(), &ids);
    let df = logits(&*try_load_gguf(&deq, "dequantized.gguf", &dev).unwrap(), &ids);
    let dd = max_diff(&qf, &df);
    let d = max_diff(&q, f32_logits);
    let first = max_diff(&q[..256], &f32_logits[..256]);
    println!(
        "{family}: {what} {types:?} vs f32: max abs diff {d:.2e} (first position {first:.2e}); vs its dequantized values (f32 activations) {dd:.2e}"
    );
    assert!(
        dd <= DEQUANT_BOUND,
        "{family} {what}: the file does not read as its dequantized values ({dd})"
    );
    assert!(
        types.keys().any(|t| t != "F32"),
        "{family} {what}: nothing was quantized"
    );
    assert!(d > 0.0, "{family} {what}: quantization changed nothing");
    assert!(first <= bound, "{family} {what}: first position {first} > {bound}");
}

// The bounds, from measurement (x86-64 CPU backend). These random fixtures amplify any
// change of a weight: Q8_0 of one matrix alone moves later positions' logits (range
// ±2.4, soft-capped at 3) by up to 1.4, and the whole file by 1.3 to 1.9 (Q4_K and
// llama-quantize's Q4_K_M by 2.6 to 3.9), so closeness to f32 is bounded at the first
// position, which attends only to itself: measured Q8_0 3.6e-2 to 5.3e-2 (ffai and
// llama-quantize), Q4_K / Q4_K_M 1.9e-1 to 3.0e-1; the bounds are about 2x those. What
// the file holds is checked tightly instead: with f32 activations the quantized file
// gives its dequantized f32 twin's logits to float rounding (measured at most 8.0e-5,
// amplified the same way; bound about 4x).
const DEQUANT_BOUND: f32 = 3e-4;
const Q8_BOUND: f32 = 1e-1;
const Q4_BOUND: f32 = 6e-1;

fn converter_dir() -> PathBuf {
    PathBuf::from(std::env::var("FFAI_LLAMA_CPP_GGUF").expect("FFAI_LLAMA_CPP_GGUF"))
}

/// Files from llama.cpp's own converter: FFAI_LLAMA_CPP_GGUF holds `gemma4.gguf` and
/// `gemma4_dense.gguf` made by `scripts/convert_parity_gguf.py --out DIR gemma4
/// gemma4_dense` (`convert_hf_to_gguf.py --outtype f32`, dummy tokens). They must give the
/// Hugging Face directory's logits, and the in-memory layout's exactly. Run with
/// `cargo test -p ffai --test gemma4_gguf -- --ignored`.
#[test]
#[ignore]
fn llama_cpp_converter_output_gemma4() {
    let dir = converter_dir();
    for family in FAMILIES {
        let ids = input_ids(&fixture_dir(family));
        let path = dir.join(format!("{family}.gguf"));
        let real = logits(
            &*load_gguf(&std::fs::read(&path).unwrap(), &path.display().to_string()),
            &ids,
        );
        let hf = logits(&*load_hf(family), &ids);
        let d = max_diff(&real, &hf);
        println!("{family}: llama.cpp converter's GGUF vs the HF directory max abs diff {d:.2e}");
        assert!(d <= 1e-6, "{family}: {d}");
        let ours = logits(&*load_gguf(&to_gguf(family), "ours.gguf"), &ids);
        assert_eq!(max_diff(&real, &ours), 0.0, "{family}: the in-memory layout differs");
    }
}

/// Quantized converter files (FFAI_LLAMA_CPP_GGUF, as above): `ffai quantize --type
/// Q8_0` / `Q4_K` of them, and llama.cpp's `llama-quantize` `Q8_0` / `Q4_K_M` output
/// (`{family}.Q8_0.gguf`, `{family}.Q4_K_M.gguf` there, where present), load and stay
/// within the bounds of `quantized_gemma4_gguf_loads_and_stays_close`.
#[test]
#[ignore]
fn llama_cpp_converter_output_gemma4_quantized() {
    let dir = converter_dir();
    let tmp = std::env::temp_dir().join(format!("ffai-gemma4-requant-real-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for family in FAMILIES {
        let src = dir.join(format!("{family}.gguf"));
        let f32_logits = logits(
            &*load_gguf(&std::fs::read(&src).unwrap(), "f32.gguf"),
            &input_ids(&fixture_dir(family)),
        );
        for (ty, name, bound) in [
            (WeightType::Q8_0, "Q8_0", Q8_BOUND),
            (WeightType::Q4K, "Q4_K", Q4_BOUND),
        ] {
            let dst = tmp.join(format!("{family}.{name}.gguf"));
            ffai::requant::requantize_gguf(&src, &dst, ty, true).unwrap();
            compare_quantized(
                family,
                &format!("ffai {name}"),
                &std::fs::read(&dst).unwrap(),
                &f32_logits,
                bound,
            );
        }
        for (name, bound) in [("Q8_0", Q8_BOUND), ("Q4_K_M", Q4_BOUND)] {
            let path = dir.join(format!("{family}.{name}.gguf"));
            if let Ok(bytes) = std::fs::read(&path) {
                compare_quantized(family, &format!("llama-quantize {name}"), &bytes, &f32_logits, bound);
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}
