//! GPT-OSS's config quirks against transformers: YaRN's inverse frequencies and
//! attention factor equal the buffers transformers used for the parity fixture's forward
//! (meta.json `rope_after_forward`), `truncate` moves the correction range, and hostile
//! values are refused with one-line errors. The model itself: `parity.rs`.

use std::path::{Path, PathBuf};

use ffai::config::{ModelConfig, RopeScaling};

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

fn config_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap()).unwrap()
}

#[test]
fn yarn_matches_transformers_buffers() {
    for name in ["gpt_oss", "gpt_oss_mxfp4"] {
        let cfg = ModelConfig::from_hf_json(&config_json(name), name).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("meta.json")).unwrap()).unwrap();
        let rot = &meta["rope_after_forward"]["model.rotary_emb"];
        let want: Vec<f64> = rot["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got = cfg.rope_inv_freq(None);
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                ((g as f64) - w).abs() <= 1e-6 * w,
                "{name}: inv_freq[{i}] {g} vs transformers {w}"
            );
        }
        let af = rot["attention_scaling"].as_f64().unwrap();
        assert!(
            (cfg.rope_attention_factor() - af).abs() < 1e-12,
            "{name}: attention factor"
        );
        assert!((af - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12);
    }
}

#[test]
fn yarn_truncate_and_attention_factor_spellings() {
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = config_json("gpt_oss");
        f(&mut j["rope_parameters"]);
        ModelConfig::from_hf_json(&j, "test")
    };
    let plain = with(&|_| {}).unwrap().rope_inv_freq(None);
    // truncate true (transformers' default when absent): low/high 2.02../4.35.. become 2
    // and 5, which changes the ramp's interior entries (pairs 3 and 4) only.
    for cfg in [
        with(&|r| r["truncate"] = true.into()).unwrap(),
        with(&|r| {
            r.as_object_mut().unwrap().remove("truncate");
        })
        .unwrap(),
    ] {
        assert!(matches!(
            cfg.rope_scaling,
            Some(RopeScaling::Yarn { truncate: true, .. })
        ));
        let t = cfg.rope_inv_freq(None);
        for i in 0..8 {
            let same = t[i] == plain[i];
            assert_eq!(same, !(3..=4).contains(&i), "pair {i}: {} vs {}", t[i], plain[i]);
        }
        // Pairs at or past `high` (5) are fully interpolated: theta^(-2i/d) / factor.
        let d = 16f64;
        let want = 1.0 / 150000f64.powf(2.0 * 6.0 / d) / 32.0;
        assert!((t[6] as f64 - want).abs() < 1e-6 * want);
    }
    // An explicit attention_factor wins; DeepSeek's mscale pair gives their ratio.
    let cfg = with(&|r| r["attention_factor"] = 1.25.into()).unwrap();
    assert_eq!(cfg.rope_attention_factor(), 1.25);
    let cfg = with(&|r| {
        r["mscale"] = 0.707.into();
        r["mscale_all_dim"] = 0.707.into();
    })
    .unwrap();
    assert!((cfg.rope_attention_factor() - 1.0).abs() < 1e-12);
    // Hostile values: one-line errors.
    for (k, v) in [
        ("factor", serde_json::json!(-2.0)),
        ("beta_fast", serde_json::json!("fast")),
        ("truncate", serde_json::json!(3)),
        ("original_max_position_embeddings", serde_json::json!(0)),
    ] {
        let e = with(&|r| r[k] = v.clone())
            .err()
            .unwrap_or_else(|| panic!("{k} = {v} accepted"));
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}
