//! Helpers shared by the CLI tests: where the real models are, running the binary, and
//! what a clean failure looks like.
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn models_dir() -> PathBuf {
    std::env::var_os("FFAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ffai/models"))
}

pub fn smollm2() -> String {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn ffai(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(args)
        .output()
        .expect("running ffai")
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ffai failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ffai-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A clean failure: exit code 1 (not a panic's 101 or an abort's signal) and exactly
/// one line on stderr that says what went wrong.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status {:?}, stderr: {err}",
        out.status
    );
    assert_eq!(err.trim_end().lines().count(), 1, "expected one line, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in: {err}"
    );
}

/// A real model file from the cache (fails, never skips, when it is missing).
pub fn model(file: &str) -> String {
    let p = models_dir().join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p.display().to_string()
}
