//! Turns what the user typed after `-m` into files on disk: a .gguf file, a Hugging Face
//! checkpoint directory, or a repo id looked up in the Hugging Face cache (HF_HOME, else
//! ~/.cache/huggingface) and downloaded with hf-hub when the network allows.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelLocation {
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Gguf(p) | ModelLocation::HfDir(p) => p,
        }
    }
}

/// The cache of fetched test models (scripts/fetch-models.sh writes there).
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FFAI_MODELS_DIR") {
        return PathBuf::from(d);
    }
    home().join(".cache/ffai/models")
}

/// The default model: the packaged SmolLM2-135M-Instruct Q4_1.
pub fn default_model() -> PathBuf {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The Hugging Face hub cache directory.
pub fn hf_hub_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HF_HOME") {
        Some(h) => PathBuf::from(h).join("hub"),
        None => home().join(".cache/huggingface/hub"),
    }
}

pub fn resolve(spec: &str) -> Result<ModelLocation> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(ModelLocation::Gguf(p.to_path_buf()));
    }
    if p.is_dir() {
        if p.join("config.json").is_file() {
            return Ok(ModelLocation::HfDir(p.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|e| e.extension().is_some_and(|x| x == "gguf"))
            .collect();
        if ggufs.len() == 1 {
            return Ok(ModelLocation::Gguf(ggufs[0].clone()));
        }
        return Err(Error::new(format!(
            "{spec}: directory has no config.json and {} .gguf files (expected a Hugging Face checkpoint or one GGUF)",
            ggufs.len()
        )));
    }
    if looks_like_repo_id(spec) {
        let cache = hf_hub_cache();
        if let Some(dir) = find_in_hf_cache(&cache, spec) {
            return Ok(ModelLocation::HfDir(dir));
        }
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        if offline {
            return Err(Error::new(format!(
                "model \"{spec}\" is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                cache.display()
            )));
        }
        return download(spec, &cache).map(ModelLocation::HfDir).map_err(|e| {
            Error::new(format!(
                "model \"{spec}\" is not in the Hugging Face cache ({}) and downloading it failed: {e}",
                cache.display()
            ))
        });
    }
    Err(Error::new(format!(
        "model \"{spec}\" not found: no such file or directory, and not a Hugging Face repo id (owner/name)"
    )))
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// `models--owner--name/snapshots/<rev>` for the revision `refs/main` names (else any
/// snapshot holding a config.json).
pub fn find_in_hf_cache(cache: &Path, repo: &str) -> Option<PathBuf> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snaps = root.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(root.join("refs/main")) {
        // A revision is a commit hash; anything else (a path, `..`) is not followed.
        let rev = rev.trim();
        if !rev.is_empty() && rev.len() <= 64 && rev.chars().all(|c| c.is_ascii_alphanumeric()) {
            let d = snaps.join(rev);
            if d.join("config.json").is_file() {
                return Some(d);
            }
        }
    }
    std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|d| d.join("config.json").is_file())
}

fn download(repo: &str, cache: &Path) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| Error::new(e.to_string()))?;
    let r = api.model(repo.to_string());
    let get = |f: &str| r.get(f).map_err(|e| Error::new(format!("{f}: {e}")));
    let config = get("config.json")?;
    let dir = config
        .parent()
        .ok_or_else(|| Error::new("bad cache path"))?
        .to_path_buf();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let _ = get(f); // optional files
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            // Checked before any request: the names come from the remote repository.
            let shards = crate::weights::shard_names(&text)
                .map_err(|e| e.context(format!("{repo}: model.safetensors.index.json")))?;
            for s in shards {
                get(&s)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(dir)
}
