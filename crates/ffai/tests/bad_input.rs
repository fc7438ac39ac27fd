//! Hostile and broken inputs: each must be a clear `Err`, never a panic, an abort or an
//! allocation sized by an untrusted header.

mod common;

use common::{temp_dir, Rng};
use ffai::config::ModelConfig;
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::weights::Weights;
use ffai_kernels::quant::WeightType;

fn small_gguf() -> Vec<u8> {
    let metadata = vec![
        ("general.architecture".into(), MetaValue::String("llama".into())),
        ("general.alignment".into(), MetaValue::U32(32)),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("b".into())]),
        ),
        ("some.f64".into(), MetaValue::F64(1.5)),
        ("some.i8".into(), MetaValue::I8(-3)),
        ("some.bool".into(), MetaValue::Bool(true)),
        (
            "some.nested".into(),
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U16(1)])]),
        ),
    ];
    let tensors = vec![
        ("a.weight".into(), WeightType::F32, vec![2, 4], vec![0u8; 32]),
        ("b.weight".into(), WeightType::Q8_0, vec![1, 32], vec![0u8; 34]),
    ];
    GgufWriter { metadata, tensors }.to_bytes()
}

/// Byte offset just after the 24-byte header where the first metadata key starts.
const HEADER: usize = 24;

#[test]
fn valid_small_gguf_round_trips_every_value_type() {
    let f = GgufFile::from_bytes(&small_gguf()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.get_f64("some.f64"), Some(1.5));
    assert_eq!(f.get("some.i8").and_then(|v| v.as_i64()), Some(-3));
    assert_eq!(f.get_bool("some.bool"), Some(true));
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensor("a.weight").unwrap().shape, vec![2, 4]);
    assert_eq!(f.tensor("b.weight").unwrap().n_bytes, 34);
}

#[test]
fn every_truncation_of_a_gguf_is_an_error() {
    let bytes = small_gguf();
    for len in 0..bytes.len() - 1 {
        // Cutting inside the tensor data is caught by the bounds check on the last tensor.
        assert!(
            GgufFile::from_bytes(&bytes[..len]).is_err(),
            "truncated to {len} bytes parsed"
        );
    }
}

fn patched(offset: usize, value: &[u8]) -> Vec<u8> {
    let mut b = small_gguf();
    b[offset..offset + value.len()].copy_from_slice(value);
    b
}

fn err_of(bytes: &[u8]) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("hostile GGUF parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn absurd_counts_and_lengths_are_rejected_before_allocating() {
    assert!(err_of(&patched(8, &u64::MAX.to_le_bytes())).contains("tensor count"));
    assert!(err_of(&patched(16, &(u64::MAX / 2).to_le_bytes())).contains("metadata count"));
    // The first key's length.
    assert!(err_of(&patched(HEADER, &u64::MAX.to_le_bytes())).contains("string length"));
    assert!(err_of(&b"GGUF\x03\x00\x00\x00"[..]).contains("truncated"));
    assert!(err_of(&patched(0, b"GGUX")).contains("not a GGUF"));
    assert!(err_of(&patched(4, &9u32.to_le_bytes())).contains("version"));
}

/// Writes one tensor with a hostile info record by hand.
fn with_tensor_info(dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'x');
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 64, 0);
    b
}

#[test]
fn hostile_tensor_infos_are_rejected() {
    assert!(GgufFile::from_bytes(&with_tensor_info(&[4, 4], 0, 0)).is_ok());
    assert!(err_of(&with_tensor_info(&[1 << 20, 1 << 20], 0, 0)).contains("exceed"));
    assert!(err_of(&with_tensor_info(&[u64::MAX, u64::MAX], 0, 0)).contains("overflow"));
    assert!(err_of(&with_tensor_info(&[4, 4], 0, 1 << 50)).contains("past the end"));
    assert!(err_of(&with_tensor_info(&[4, 4], 0, u64::MAX - 3)).contains("offset"));
    assert!(err_of(&with_tensor_info(&[4, 4], 0, 7)).contains("aligned"));
    assert!(err_of(&with_tensor_info(&[4, 4], 999, 0)).contains("type"));
    assert!(err_of(&with_tensor_info(&[33, 1], 8, 0)).contains("block size"));
    assert!(err_of(&with_tensor_info(&[1, 1, 1, 1, 1], 0, 0)).contains("dimensions"));
    assert!(err_of(&with_tensor_info(&[0, 4], 0, 0)).contains("zero"));
}

#[test]
fn random_bytes_never_panic() {
    let mut r = Rng(99);
    for i in 0..2000 {
        let len = (r.next_u64() % 300) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
        if i % 2 == 0 && len >= 8 {
            // Give half of them a valid header so the parser goes deeper.
            b[..4].copy_from_slice(b"GGUF");
            b[4..8].copy_from_slice(&3u32.to_le_bytes());
        }
        let _ = GgufFile::from_bytes(&b);
    }
    // Mutating single bytes of a valid file: errors or a (different) valid parse, no panic.
    let good = small_gguf();
    for i in 0..good.len() {
        for v in [0u8, 0xff, 0x7f, 3] {
            let mut b = good.clone();
            b[i] = v;
            let _ = GgufFile::from_bytes(&b);
        }
    }
}

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn lying_safetensors_headers_are_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("header longer than the file", {
            let mut b = 1000u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("huge header length", u64::MAX.to_le_bytes().to_vec()),
        ("offsets past the data", {
            let h = br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h);
            b.extend_from_slice(&[0u8; 16]);
            b
        }),
        ("shape disagrees with byte size", {
            let h = br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#;
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h);
            b.extend_from_slice(&[0u8; 16]);
            b
        }),
        ("not JSON", {
            let mut b = 4u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"\xff\xfe{{");
            b
        }),
        ("empty file", Vec::new()),
    ];
    for (what, bytes) in cases {
        let dir = temp_dir("bad-st");
        write_file(&dir, "model.safetensors", &bytes);
        match Weights::from_safetensors_dir(&dir) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => assert!(
                e.to_string().contains("model.safetensors"),
                "{what}: error does not name the file: {e}"
            ),
        }
    }
}

#[test]
fn config_missing_fields_name_the_field() {
    let full = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100
    });
    assert!(ModelConfig::from_hf_json(&full, "cfg").is_ok());
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ] {
        let mut v = full.clone();
        v.as_object_mut().unwrap().remove(field);
        let e = ModelConfig::from_hf_json(&v, "cfg").unwrap_err().to_string();
        assert!(e.contains(field), "missing {field}: {e}");
    }
    let mut v = full.clone();
    v["num_attention_heads"] = serde_json::json!(0);
    assert!(ModelConfig::from_hf_json(&v, "cfg").is_err());
    let mut v = full.clone();
    v["hidden_size"] = serde_json::json!("big");
    assert!(ModelConfig::from_hf_json(&v, "cfg")
        .unwrap_err()
        .to_string()
        .contains("hidden_size"));
    let mut v = full.clone();
    v["num_key_value_heads"] = serde_json::json!(3);
    assert!(ModelConfig::from_hf_json(&v, "cfg")
        .unwrap_err()
        .to_string()
        .contains("multiple"));
    assert!(ModelConfig::from_hf_json(&serde_json::json!([1, 2]), "cfg").is_err());
}

#[test]
fn unsupported_architecture_names_the_supported_ones() {
    let v = serde_json::json!({
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100
    });
    let cfg = ModelConfig::from_hf_json(&v, "cfg").unwrap();
    let e = ffai::models::family_for(&cfg, false).err().unwrap().to_string();
    assert!(e.contains("MambaForCausalLM") && e.contains("LlamaForCausalLM"), "{e}");
}

#[test]
fn missing_model_paths_say_where_they_looked() {
    let e = ffai::resolve::resolve("/nonexistent/model.gguf")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HOME", temp_dir("hfhome"));
    let e = ffai::resolve::resolve("someone/some-model").unwrap_err().to_string();
    assert!(e.contains("Hugging Face cache") && e.contains("hfhome"), "{e}");
}

/// The later weight types (Q2_K, Q3_K, Q8_K, IQ4_NL, IQ4_XS, MXFP4) load from their
/// ggml ids with the right sizes; a tensor with too few bytes for its type, or a row
/// that is not a whole number of its blocks, is a clear error naming the tensor.
#[test]
fn lowbit_tensor_sizes_are_checked() {
    for (ty, id, block, bytes) in [
        (WeightType::Q2K, 10, 256, 84),
        (WeightType::Q3K, 11, 256, 110),
        (WeightType::Q8K, 15, 256, 292),
        (WeightType::IQ4NL, 20, 32, 18),
        (WeightType::IQ4XS, 23, 256, 136),
        (WeightType::MXFP4, 39, 32, 17),
    ] {
        assert_eq!(WeightType::from_ggml(id), Some(ty));
        let file = |len: usize, row: usize| {
            let tensors = vec![
                ("a.weight".into(), WeightType::F32, vec![2, 4], vec![0u8; 32]),
                ("q.weight".into(), ty, vec![3, row], vec![0u8; len]),
            ];
            GgufWriter {
                metadata: vec![],
                tensors,
            }
            .to_bytes()
        };
        let f = GgufFile::from_bytes(&file(6 * bytes, 2 * block)).unwrap_or_else(|e| panic!("{ty}: {e}"));
        let t = f.tensor("q.weight").unwrap();
        assert_eq!(
            (t.ty, t.n_bytes, t.shape.clone()),
            (ty, 6 * bytes, vec![3, 2 * block]),
            "{ty}"
        );

        // One block short (the data ends with the file).
        let err = err_of(&file(5 * bytes, 2 * block));
        assert!(err.contains("q.weight") && err.contains("past the end"), "{ty}: {err}");
        // A row of one element more than two blocks.
        let err = err_of(&file(9 * bytes, 2 * block + 1));
        assert!(
            err.contains("q.weight") && err.contains("block size") && err.contains(ty.name()),
            "{ty}: {err}"
        );
    }
}

/// Shard names in a `model.safetensors.index.json` (possibly downloaded from a remote
/// repository) must be plain `*.safetensors` file names before anything is fetched or
/// joined to a directory.
#[test]
fn index_shard_names_must_be_plain_file_names() {
    let index = |name: serde_json::Value| serde_json::json!({"weight_map": {"a.weight": name}}).to_string();
    let ok = ffai::weights::shard_names(&index("model-00001-of-00002.safetensors".into())).unwrap();
    assert_eq!(ok, vec!["model-00001-of-00002.safetensors"]);
    for bad in [
        "../evil.safetensors",
        "/etc/passwd.safetensors",
        "sub/dir.safetensors",
        "..\\evil.safetensors",
        "C:evil.safetensors",
        "..",
        ".",
        "",
        "model.bin",
        "nul\0.safetensors",
    ] {
        let err = ffai::weights::shard_names(&index(bad.into())).unwrap_err();
        assert!(err.message().contains("plain"), "{bad:?}: {}", err.message());
    }
    let long = format!("{}.safetensors", "a".repeat(300));
    assert!(ffai::weights::shard_names(&index(long.into())).is_err());
    for bad in [
        serde_json::json!(7),
        serde_json::json!(null),
        serde_json::json!(["x.safetensors"]),
    ] {
        let err = ffai::weights::shard_names(&index(bad.clone())).unwrap_err();
        assert!(err.message().contains("not a file name"), "{bad}: {}", err.message());
    }
    assert!(ffai::weights::shard_names(r#"{"weight_map": {}}"#).is_err());
    assert!(ffai::weights::shard_names(r#"{"weight_map": 3}"#).is_err());
    let many: serde_json::Map<String, serde_json::Value> = (0..ffai::weights::MAX_SHARDS + 1)
        .map(|i| (format!("t{i}"), format!("s{i}.safetensors").into()))
        .collect();
    let err = ffai::weights::shard_names(&serde_json::json!({ "weight_map": many }).to_string()).unwrap_err();
    assert!(err.message().contains("limit"), "{}", err.message());

    // Through the loader: a directory whose index points outside it is refused, even
    // when the file it names exists.
    let dir = temp_dir("index-escape");
    let outside = dir.join("outside.safetensors");
    std::fs::write(&outside, b"not read").unwrap();
    let inner = dir.join("ckpt");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(
        inner.join("model.safetensors.index.json"),
        index("../outside.safetensors".into()),
    )
    .unwrap();
    let err = Weights::from_safetensors_dir(&inner)
        .err()
        .expect("an escaping shard loaded");
    assert!(err.message().contains("not a plain"), "{}", err.message());
}

/// A metadata array is bounded by a total element count, not only by the file size: each
/// element takes ~32 bytes in memory however small it is in the file.
#[test]
fn metadata_arrays_are_bounded_in_total() {
    let n = ffai::gguf::MAX_METADATA_ELEMENTS as usize;
    let array = |count: usize| ("big".to_string(), MetaValue::Array(vec![MetaValue::U8(0); count]));
    let at_limit = GgufWriter {
        metadata: vec![array(n)],
        tensors: vec![],
    }
    .to_bytes();
    assert!(GgufFile::from_bytes(&at_limit).is_ok());
    let over = GgufWriter {
        metadata: vec![
            array(n / 2),
            ("other".into(), MetaValue::Array(vec![MetaValue::U8(0); n / 2 + 1])),
        ],
        tensors: vec![],
    }
    .to_bytes();
    assert!(err_of(&over).contains("elements in all"), "{}", err_of(&over));
}
