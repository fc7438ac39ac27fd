//! `ffai perplexity`, `ffai kld` and `ffai convert` end to end on the real SmolLM2
//! checkpoint, and their failures: a non-zero exit with one readable line on stderr.

mod common;

use common::*;

const TEXT: &str = "/usr/share/common-licenses/GPL-3";

#[test]
fn perplexity_json() {
    let m = smollm2();
    let j = stdout_json(&ffai(&[
        "perplexity",
        "-m",
        &m,
        "--file",
        TEXT,
        "--context",
        "128",
        "--max-windows",
        "2",
        "--json",
    ]));
    assert_eq!(j["windows"], 2);
    assert_eq!(j["tokens_scored"], 2 * 63);
    let p = j["perplexity"].as_f64().unwrap();
    assert!((3.0..100.0).contains(&p), "{p}");
}

#[test]
fn kld_of_a_model_against_itself_is_zero() {
    let m = smollm2();
    let j = stdout_json(&ffai(&[
        "kld",
        "-m",
        &m,
        "--ref",
        &m,
        "--file",
        TEXT,
        "--context",
        "64",
        "--max-windows",
        "1",
        "--json",
    ]));
    assert_eq!(j["mean_kld"], 0.0);
    assert_eq!(j["p99_kld"], 0.0);
    assert_eq!(j["top1_agreement"], 1.0);
}

#[test]
fn quality_failures_are_one_line() {
    let m = smollm2();
    let gemma = model("gemma-3-270m-q4_k_m.gguf");
    assert_clean_failure(
        &ffai(&["kld", "-m", &m, "--ref", &gemma, "--file", TEXT]),
        "vocabularies differ",
    );
    assert_clean_failure(
        &ffai(&["perplexity", "-m", &m, "--file", "/nonexistent/text.txt"]),
        "/nonexistent/text.txt",
    );
    let dir = temp_dir("ppl-short");
    let short = dir.join("short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    assert_clean_failure(
        &ffai(&["perplexity", "-m", &m, "--file", short.to_str().unwrap()]),
        "fewer than one window",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convert_to_4_bit_and_its_failures() {
    let m = smollm2();
    let dir = temp_dir("convert");
    let out = dir.join("q4");
    let o = out.to_str().unwrap();
    let r = ffai(&["convert", &m, "--bits", "4", "--group-size", "64", "--output", o]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization"]["bits"], 4);
    assert_eq!(cfg["quantization"]["group_size"], 64);
    assert!(out.join("model.safetensors").exists());
    assert!(out.join("tokenizer.json").exists());

    assert_clean_failure(&ffai(&["convert", &m, "--bits", "4", "--output", o]), "--force");
    assert_clean_failure(
        &ffai(&["convert", &m, "--bits", "7", "--output", o]),
        "bits must be one of",
    );
    assert_clean_failure(
        &ffai(&[
            "convert",
            &m,
            "--bits",
            "4",
            "--group-size",
            "100",
            "--output",
            o,
            "--force",
        ]),
        "--group-size",
    );
    // The failed --force run left the earlier output alone.
    assert!(out.join("model.safetensors").exists());

    // Calibrated: the run over the text is reported, the output loads and generates.
    let text = dir.join("calibration.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let cal = dir.join("q3");
    let r = ffai(&[
        "convert",
        &m,
        "--bits",
        "3",
        "--calibration",
        t,
        "--calibration-tokens",
        "300",
        "--output",
        cal.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("calibration: 300 tokens") && err.contains("121 linear inputs"),
        "{err}"
    );
    let r = ffai(&[
        "generate",
        "-m",
        cal.to_str().unwrap(),
        "-p",
        "Hello",
        "--max-tokens",
        "4",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_clean_failure(
        &ffai(&[
            "convert",
            &m,
            "--bits",
            "3",
            "--calibration",
            "/nonexistent/text",
            "--output",
            o,
            "--force",
        ]),
        "/nonexistent/text",
    );
    assert_clean_failure(
        &ffai(&[
            "convert",
            &m,
            "--bits",
            "3",
            "--calibration",
            t,
            "--quantizer",
            "minmax",
            "--output",
            o,
            "--force",
        ]),
        "minmax",
    );
    assert!(out.join("model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
