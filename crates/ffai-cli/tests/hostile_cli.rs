//! Numbers on the command line at their extremes: each either works (bounded by what the
//! model allows) or ends with exit 1 and one line naming the flag — never an abort from
//! an allocation sized by the number, a wrap, or a panic.

mod common;

use common::*;

const HUGE: &str = "18446744073709551615"; // u64::MAX

#[test]
fn huge_max_tokens_is_bounded_by_the_context_not_allocated() {
    // Used to abort allocating 4 TB up front. The stop string ends the run early.
    for max in ["1000000000000", HUGE] {
        let j = stdout_json(&ffai(&[
            "generate",
            "-m",
            &smollm2(),
            "-p",
            "The capital of France is",
            "--temperature",
            "0",
            "--max-tokens",
            max,
            "--stop",
            ".",
            "--json",
        ]));
        assert_eq!(j["text"], " Paris", "{j}");
        assert_eq!(j["stop_reason"], "StopString");
    }
}

#[test]
fn extreme_sampling_numbers_work_or_fail_cleanly() {
    let m = smollm2();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "-m", &m, "-p", "Hi", "--max-tokens", "2", "--json"];
        args.extend_from_slice(extra);
        ffai(&args)
    };
    // Accepted: each is clamped by the vocabulary or the prompt.
    for extra in [
        &["--top-k", HUGE][..],
        &["--prefill-step", HUGE],
        &["--seed", HUGE],
        &["--min-p", "1", "--temperature", "1"],
        &["--top-p", "1e-30", "--temperature", "1"],
    ] {
        let out = run(extra);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (extra, needle) in [
        (&["--temperature", "nan"][..], "temperature"),
        (&["--temperature", "inf"], "temperature"),
        (&["--temperature=-1"], "temperature"),
        (&["--max-tokens=-1"], "--max-tokens"),
        (&["--max-tokens", "99999999999999999999999"], "--max-tokens"),
        (&["--top-k", "many"], "--top-k"),
        (&["--repetition-penalty", "0"], "repetition_penalty"),
        (&["--repetition-penalty", "nan"], "repetition_penalty"),
        (&["--top-p", "0"], "top_p"),
        (&["--min-p=-0.5"], "min_p"),
        (&["--prefill-step", "0"], "prefill_step"),
    ] {
        assert_clean_failure(&run(extra), needle);
    }
}

#[test]
fn thread_counts_past_the_limit_fail_cleanly() {
    for n in ["1000000", HUGE] {
        assert_clean_failure(&ffai(&["tokenize", "-m", &smollm2(), "--threads", n, "x"]), "threads");
    }
}

#[test]
fn bench_sizes_at_their_extremes() {
    let m = smollm2();
    for (extra, needle) in [
        (&["--prompt-tokens", HUGE, "--gen-tokens", HUGE][..], "context"),
        (&["--prompt-tokens", "1", "--gen-tokens", HUGE], "context"),
        (&["--prompt-tokens", "0"], "at least 1"),
        (
            &["--prompt-tokens", "4", "--gen-tokens", "1", "--repetitions", HUGE],
            "repetitions",
        ),
    ] {
        let mut args = vec!["bench", "-m", &m];
        args.extend_from_slice(extra);
        assert_clean_failure(&ffai(&args), needle);
    }
}

#[test]
fn inspect_and_quality_numbers_at_their_extremes() {
    let m = smollm2();
    assert_clean_failure(
        &ffai(&["inspect", "-m", &m, "--prompt-ids", "4294967295"]),
        "outside the vocabulary",
    );
    // More ids than the context holds.
    let ids = vec!["1"; 9000].join(",");
    assert_clean_failure(&ffai(&["inspect", "-m", &m, "--prompt-ids", &ids]), "context");
    let j = stdout_json(&ffai(&["inspect", "-m", &m, "-p", "Hi", "--top-k", HUGE, "--json"]));
    assert_eq!(j["top_k"].as_array().unwrap().len(), 49152, "every token, no more");
    let out = ffai(&["inspect", "-m", &m, "-p", "Hi", "--trace-layers", HUGE]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = temp_dir("hostile-quality");
    let text = dir.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    for ctx in [HUGE, "0", "9000"] {
        assert_clean_failure(
            &ffai(&["perplexity", "-m", &m, "--file", t, "--context", ctx]),
            "context",
        );
    }
    let j = stdout_json(&ffai(&[
        "perplexity",
        "-m",
        &m,
        "--file",
        t,
        "--context",
        "64",
        "--max-windows",
        HUGE,
        "--json",
    ]));
    assert!(j["perplexity"].as_f64().unwrap() > 1.0, "{j}");
}

#[test]
fn a_panic_is_one_line_and_exit_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ffai"))
        .args(["models"])
        .env("FFAI_DEBUG_PANIC", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {err}", out.status);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: internal error: FFAI_DEBUG_PANIC is set"),
        "{err}"
    );
}

#[test]
fn device_choices_fail_cleanly() {
    // No GPU here (CI): one line naming why; a bad device name or number likewise.
    let gen = |d: &str| {
        ffai(&[
            "generate",
            "-m",
            &smollm2(),
            "-p",
            "hi",
            "--max-tokens",
            "2",
            "--device",
            d,
        ])
    };
    if ffai_kernels::cuda::device_count().is_err() {
        assert_clean_failure(&gen("cuda"), "--device cuda");
        assert_clean_failure(&gen("cuda:1"), "--device cuda:1");
    }
    assert_clean_failure(&gen("cuda:x"), "whole number");
    assert_clean_failure(&gen("tpu"), "--device must be cpu or cuda");
    let out = gen("cpu");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn output_constraints_work_or_fail_cleanly() {
    let m = smollm2();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            &m,
            "-p",
            "Is it raining?",
            "--max-tokens",
            "20",
            "--json",
        ];
        args.extend_from_slice(extra);
        ffai(&args)
    };
    let j = stdout_json(&run(&["--temperature", "0", "--regex", " ?(yes|no)!"]));
    let text = j["text"].as_str().unwrap();
    assert!(["yes!", " yes!", "no!", " no!"].contains(&text), "{j}");
    let dir = temp_dir("constraint");
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"rain":{"type":"boolean"}},"required":["rain"],"additionalProperties":false}"#,
    )
    .unwrap();
    let j = stdout_json(&run(&[
        "--temperature",
        "0.7",
        "--seed",
        "1",
        "--json-schema",
        schema.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(j["text"].as_str().unwrap()).unwrap();
    assert!(v["rain"].is_boolean(), "{j}");
    // Bad inputs: one line, exit 1.
    assert_clean_failure(&run(&["--regex", "(unclosed"]), "invalid response format");
    assert_clean_failure(&run(&["--json-schema", "/no/such/schema.json"]), "schema.json");
    let not_json = dir.join("bad.json");
    std::fs::write(&not_json, "{type: object").unwrap();
    assert_clean_failure(&run(&["--json-schema", not_json.to_str().unwrap()]), "not JSON");
    let lark = dir.join("bad.lark");
    std::fs::write(&lark, "start: missing_rule\n").unwrap();
    assert_clean_failure(&run(&["--grammar", lark.to_str().unwrap()]), "invalid response format");
    // Two constraints at once: clap refuses (usage error, no panic).
    let out = run(&["--json-object", "--regex", "a"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn cpu_level_variable_is_checked_and_honoured() {
    let gen = |level: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ffai"))
            .args([
                "generate",
                "-m",
                &smollm2(),
                "-p",
                "The capital of France is",
                "--max-tokens",
                "3",
                "--temperature",
                "0",
            ])
            .env("FFAI_CPU_LEVEL", level)
            .output()
            .unwrap()
    };
    let bad = gen("avx3");
    assert_clean_failure(&bad, "FFAI_CPU_LEVEL=avx3");
    // Every level runs on any x86-64 CPU or none (a level the CPU lacks caps to the best
    // one below it), and the greedy answer is the same.
    for level in ["portable", "avx2", "avxvnni", "avx512vnni", "best", ""] {
        let out = gen(level);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{level}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Paris"), "{level}: {text:?}");
    }
}
