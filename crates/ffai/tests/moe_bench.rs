//! A rough CPU measurement (ignored; `cargo test --release -p ffai --test moe_bench --
//! --ignored --nocapture`): a random-weight Q8_0 Qwen3-MoE-shaped GGUF (4 layers, hidden
//! 1024, 64 experts of 512, top 8) decodes with 8 experts per token and with all 64. A
//! token reads only its experts' rows, so top-8 should take a fraction of top-64's time
//! (the expert weights are ~95% of the bytes; 8 of 64 is 1/8 of them).

use std::time::Instant;

use ffai::config::ModelConfig;
use ffai::gguf::{GgufFile, GgufWriter, MetaValue};
use ffai::models::{family_for, Device, LanguageModel};
use ffai::weights::Weights;
use ffai_kernels::quant::WeightType;

const H: usize = 1024;
const HEADS: usize = 8;
const KV: usize = 4;
const HD: usize = 128;
const E: usize = 64;
const F: usize = 512;
const LAYERS: usize = 4;
const VOCAB: usize = 1000;

/// `rows x cols` Q8_0 with small random quants and a fixed scale.
fn q8(rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let mut out = Vec::with_capacity(blocks * 34);
    let scale = half::f16::from_f32(0.002).to_le_bytes();
    for _ in 0..blocks {
        out.extend_from_slice(&scale);
        for _ in 0..32 {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            out.push((*seed >> 56) as u8);
        }
    }
    out
}

fn model(k: usize) -> Vec<u8> {
    let a = "qwen3moe";
    let u = |v: usize| MetaValue::U32(v as u32);
    let metadata = vec![
        ("general.architecture".to_string(), MetaValue::String(a.into())),
        (format!("{a}.block_count"), u(LAYERS)),
        (format!("{a}.context_length"), u(4096)),
        (format!("{a}.embedding_length"), u(H)),
        (format!("{a}.feed_forward_length"), u(4 * H)),
        (format!("{a}.attention.head_count"), u(HEADS)),
        (format!("{a}.attention.head_count_kv"), u(KV)),
        (format!("{a}.attention.key_length"), u(HD)),
        (format!("{a}.expert_count"), u(E)),
        (format!("{a}.expert_used_count"), u(k)),
        (format!("{a}.expert_feed_forward_length"), u(F)),
        (format!("{a}.vocab_size"), u(VOCAB)),
    ];
    let mut seed = 7u64;
    let norm = |n: usize| {
        (
            vec![n],
            vec![1.0f32; n]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    };
    let mut t: Vec<(String, WeightType, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut mat = |name: String, shape: Vec<usize>, seed: &mut u64| {
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let bytes = q8(rows, shape[shape.len() - 1], seed);
        t.push((name, WeightType::Q8_0, shape, bytes));
    };
    mat("token_embd.weight".into(), vec![VOCAB, H], &mut seed);
    mat("output.weight".into(), vec![VOCAB, H], &mut seed);
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        mat(p("attn_q.weight"), vec![HEADS * HD, H], &mut seed);
        mat(p("attn_k.weight"), vec![KV * HD, H], &mut seed);
        mat(p("attn_v.weight"), vec![KV * HD, H], &mut seed);
        mat(p("attn_output.weight"), vec![H, HEADS * HD], &mut seed);
        mat(p("ffn_gate_inp.weight"), vec![E, H], &mut seed);
        mat(p("ffn_gate_exps.weight"), vec![E, F, H], &mut seed);
        mat(p("ffn_up_exps.weight"), vec![E, F, H], &mut seed);
        mat(p("ffn_down_exps.weight"), vec![E, H, F], &mut seed);
    }
    for l in 0..LAYERS {
        for (n, len) in [
            ("attn_norm", H),
            ("ffn_norm", H),
            ("attn_q_norm", HD),
            ("attn_k_norm", HD),
        ] {
            let (shape, bytes) = norm(len);
            t.push((format!("blk.{l}.{n}.weight"), WeightType::F32, shape, bytes));
        }
    }
    let (shape, bytes) = norm(H);
    t.push(("output_norm.weight".into(), WeightType::F32, shape, bytes));
    GgufWriter { metadata, tensors: t }.to_bytes()
}

fn load(bytes: &[u8], threads: usize) -> Box<dyn LanguageModel> {
    let f = GgufFile::from_bytes(bytes).unwrap();
    let cfg = ModelConfig::from_gguf(&f, "bench.gguf").unwrap();
    let w = Weights::from_gguf(&f, "bench.gguf");
    (family_for(&cfg, true).unwrap().load)(&cfg, &w, &Device::cpu(threads)).unwrap()
}

#[test]
#[ignore]
fn moe_decode_reads_only_the_chosen_experts() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut times = Vec::new();
    for k in [8, E] {
        let m = load(&model(k), threads);
        let mut st = m.new_state(256, 64).unwrap();
        let mut logits = Vec::new();
        let prompt: Vec<u32> = (0..32).map(|i| (i * 31) % VOCAB as u32).collect();
        let t = Instant::now();
        m.forward(&prompt, &mut st, false, &mut logits).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let steps = 32;
        let t = Instant::now();
        for i in 0..steps {
            m.forward(&[(i * 7 % VOCAB) as u32], &mut st, false, &mut logits)
                .unwrap();
        }
        let per_tok = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "top-{k} of {E}: prefill 32 tokens {:.1} ms ({:.0} tok/s), decode {:.2} ms/token ({:.1} tok/s), {threads} threads",
            prefill * 1e3,
            32.0 / prefill,
            per_tok * 1e3,
            1.0 / per_tok
        );
        times.push(per_tok);
    }
    println!("decode time top-8 / top-64: {:.3}", times[0] / times[1]);
    assert!(times[0] < times[1] * 0.5, "top-8 decode is not much faster than top-64");
}
