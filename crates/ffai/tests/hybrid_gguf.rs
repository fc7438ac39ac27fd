//! LFM2 and Mamba 2 from GGUF as llama.cpp lays them out (architectures `lfm2` and
//! `mamba2`): the parity fixtures rewritten in memory with llama.cpp's tensor names and
//! shapes (`blk.N.shortconv.{in_proj,conv,out_proj}`, the final norm as
//! `token_embd_norm`; `blk.N.ssm_{in,conv1d,dt,a,d,norm,out}` with `ssm_a = -exp(A_log)`
//! and the norm as `[n_group, d_inner / n_group]`) and metadata (LFM2's per-layer
//! `attention.head_count_kv` with 0 for conv layers, `shortconv.l_cache`, the adjusted
//! `feed_forward_length`; Mamba 2's `ssm.*` keys and 0 attention heads). LFM2 must give the
//! Hugging Face directory's logits; Mamba 2 transformers' logits with the gated norm per
//! group (llama.cpp's form, the fixture's `logits_group_norm`).

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

fn read_f32(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// (input ids, the reference logits under `key`).
fn reference(dir: &Path, key: &str) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    (ids, read_f32(&st, key))
}

fn to_gguf(family: &str, edit: impl Fn(&mut Vec<(String, MetaValue)>)) -> Vec<u8> {
    let dir = fixture_dir(family);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let g = |k: &str| json[k].as_u64().unwrap() as u32;
    let key = |k: &str| format!("{family}.{k}");
    let mut meta = vec![
        ("general.architecture".to_string(), MetaValue::String(family.into())),
        (key("block_count"), MetaValue::U32(g("num_hidden_layers"))),
        (key("context_length"), MetaValue::U32(256)),
        (key("embedding_length"), MetaValue::U32(g("hidden_size"))),
        (key("vocab_size"), MetaValue::U32(g("vocab_size"))),
    ];
    if family == "lfm2" {
        let kv: Vec<MetaValue> = json["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| MetaValue::U32(if t == "conv" { 0 } else { g("num_key_value_heads") }))
            .collect();
        meta.extend([
            // The adjusted width, as llama.cpp's converter writes it.
            (key("feed_forward_length"), MetaValue::U32(144)),
            (key("attention.head_count"), MetaValue::U32(g("num_attention_heads"))),
            (key("attention.head_count_kv"), MetaValue::Array(kv)),
            (key("rope.freq_base"), MetaValue::F32(10000.0)),
            (key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5)),
            (key("shortconv.l_cache"), MetaValue::U32(g("conv_L_cache"))),
        ]);
    } else {
        meta.extend([
            (key("feed_forward_length"), MetaValue::U32(0)),
            (key("attention.head_count"), MetaValue::U32(0)),
            (key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5)),
            (key("ssm.conv_kernel"), MetaValue::U32(g("conv_kernel"))),
            (key("ssm.inner_size"), MetaValue::U32(g("num_heads") * g("head_dim"))),
            (key("ssm.state_size"), MetaValue::U32(g("state_size"))),
            (key("ssm.time_step_rank"), MetaValue::U32(g("num_heads"))),
            (key("ssm.group_count"), MetaValue::U32(g("n_groups"))),
            (key("ssm.chunk_size"), MetaValue::U32(g("chunk_size"))),
        ]);
    }
    edit(&mut meta);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = read_f32(&st, &name);
        let mut shape = view.shape().to_vec();
        let mut gname = hf_to_gguf_name_for(&name, family);
        if shape.len() == 3 && shape[1] == 1 {
            // Depthwise conv weights [C, 1, K] are stored squeezed, [C, K].
            shape = vec![shape[0], shape[2]];
        }
        if gname.ends_with("ssm_a_log") {
            gname = gname.replace("ssm_a_log", "ssm_a");
            data.iter_mut().for_each(|x| *x = -x.exp());
            shape = vec![shape[0], 1];
        }
        if gname.ends_with("ssm_d") {
            shape = vec![shape[0], 1];
        }
        if gname.ends_with("ssm_norm.weight") {
            let groups = g("n_groups") as usize;
            shape = vec![groups, shape[0] / groups];
        }
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((gname, WeightType::F32, shape, bytes));
    }
    GgufWriter {
        metadata: meta,
        tensors,
    }
    .to_bytes()
}

fn load_gguf(bytes: &[u8]) -> ffai::Result<Box<dyn LanguageModel>> {
    let f = GgufFile::from_bytes(bytes)?;
    let mut cfg = ModelConfig::from_gguf(&f, "hybrid.gguf")?;
    let weights = Weights::from_gguf(&f, "hybrid.gguf");
    cfg.tie_word_embeddings = !weights.has("output.weight");
    (family_for(&cfg, true)?.load)(&cfg, &weights, &Device::cpu_with(2, false, true))
}

fn logits(m: &dyn LanguageModel, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(ids.len(), 48).unwrap();
    let mut out = Vec::new();
    m.forward(ids, &mut st, true, &mut out).unwrap();
    out
}

#[test]
fn gguf_layouts_match_their_references() {
    for (family, key) in [("lfm2", "logits"), ("mamba2", "logits_group_norm")] {
        let (ids, want) = reference(&fixture_dir(family), key);
        let m = load_gguf(&to_gguf(family, |_| {})).unwrap();
        assert_eq!(m.family(), family);
        let got = logits(&*m, &ids);
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        println!("{family}: GGUF vs reference max abs diff {d:.2e}");
        assert!(d <= 1e-3, "{family}: GGUF logits differ from the reference by {d}");
    }
    // The whole-width norm (transformers) is a different model: the per-group reference
    // is not what the Hugging Face directory gives.
    let (_, whole) = reference(&fixture_dir("mamba2"), "logits");
    let (_, grouped) = reference(&fixture_dir("mamba2"), "logits_group_norm");
    let d = whole
        .iter()
        .zip(&grouped)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        d > 1e-2,
        "the two norms give nearly the same logits ({d}): the test shows nothing"
    );
}

#[test]
fn hybrid_gguf_metadata_errors() {
    let set = |k: &str, v: MetaValue| {
        let k = k.to_string();
        move |m: &mut Vec<(String, MetaValue)>| {
            m.retain(|(key, _)| *key != k);
            m.push((k.clone(), v.clone()));
        }
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "lfm2",
            to_gguf(
                "lfm2",
                set(
                    "lfm2.attention.head_count_kv",
                    MetaValue::Array(vec![MetaValue::U32(0); 3]),
                ),
            ),
            "head_count_kv",
        ),
        (
            "lfm2",
            to_gguf(
                "lfm2",
                set(
                    "lfm2.attention.head_count_kv",
                    MetaValue::Array(vec![
                        MetaValue::U32(0),
                        MetaValue::U32(1),
                        MetaValue::U32(2),
                        MetaValue::U32(0),
                    ]),
                ),
            ),
            "differs between attention layers",
        ),
        (
            "lfm2",
            to_gguf("lfm2", set("lfm2.shortconv.l_cache", MetaValue::U32(99))),
            "conv_L_cache",
        ),
        (
            "mamba2",
            to_gguf("mamba2", set("mamba2.ssm.time_step_rank", MetaValue::U32(7))),
            "ssm.inner_size",
        ),
        (
            "mamba2",
            to_gguf("mamba2", set("mamba2.ssm.group_count", MetaValue::U32(0))),
            "n_groups",
        ),
        (
            "mamba2",
            to_gguf("mamba2", set("mamba2.ssm.state_size", MetaValue::U64(u64::MAX))),
            "state_size",
        ),
        (
            "mamba2",
            to_gguf("mamba2", set("mamba2.ssm.inner_size", MetaValue::U32(1 << 30))),
            "ssm.inner_size",
        ),
    ];
    for (family, bytes, needle) in cases {
        let e = match load_gguf(&bytes) {
            Ok(_) => panic!("{family}: hostile metadata ({needle}) loaded"),
            Err(e) => e.message().to_string(),
        };
        assert!(
            e.contains(needle) && !e.contains('\n'),
            "{family}: {needle} not in: {e}"
        );
    }
}
