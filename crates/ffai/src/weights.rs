//! One view over a checkpoint's tensors, whatever file they came from. Tensors keep
//! their stored format and stay in the memory map; names are normalised to GGUF's
//! scheme (`blk.N.attn_q.weight`), so a model file asks for one set of names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ffai_kernels::backend::HostBytes;
use ffai_kernels::quant::affine::{repack_mlx, MlxTriple, ScaleType};
use ffai_kernels::quant::WeightType;

use crate::config::{AffineParams, AffineQuantConfig, Fp8QuantConfig, ModuleQuant};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::{bail, ensure};

#[derive(Clone)]
pub struct WeightEntry {
    pub ty: WeightType,
    /// Row-major, outermost first (a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    pub bytes: HostBytes,
}

#[derive(Clone, Default)]
pub struct Weights {
    map: HashMap<String, WeightEntry>,
    /// config.json model_type, for the few names whose meaning depends on the family.
    model_type: String,
    /// Path or description of the checkpoint, for errors.
    pub source: String,
    /// How the checkpoint's weights were quantized where ffai converted them at load
    /// (`FP8 e4m3 block 128×128 → Q8_0`); `None` when they run as stored.
    pub source_quantization: Option<String>,
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&WeightEntry> {
        self.map
            .get(name)
            .ok_or_else(|| Error::new(format!("{}: missing tensor \"{name}\"", self.source)))
    }

    /// Files tensor `from` under the name `to` instead (a family whose checkpoints store
    /// a tensor under a name that means something else in its other variants: Granite 4's
    /// `shared_mlp` is the dense MLP of its dense models and the shared expert of its MoE
    /// ones). False when there is no `from`, or `to` is taken.
    pub fn rename(&mut self, from: &str, to: &str) -> bool {
        if self.map.contains_key(to) {
            return false;
        }
        match self.map.remove(from) {
            Some(e) => {
                self.map.insert(to.to_string(), e);
                true
            }
            None => false,
        }
    }

    /// Files `e` under `name`, replacing what was there (a family rewriting a converter's
    /// layout into the one it reads, `models::hybrid_gguf`).
    pub(crate) fn insert(&mut self, name: &str, e: WeightEntry) {
        self.map.insert(name.to_string(), e);
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<WeightEntry> {
        self.map.remove(name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    /// Total stored bytes.
    pub fn total_bytes(&self) -> usize {
        self.map.values().map(|w| w.bytes.len()).sum()
    }

    /// A tensor of any float/quantized type as f32 (norm weights, biases).
    pub fn f32_vec(&self, name: &str, expect_len: usize) -> Result<Vec<f32>> {
        let w = self.get(name)?;
        let n: usize = w.shape.iter().product();
        ensure!(
            n == expect_len,
            "{}: tensor \"{name}\" has {n} elements, expected {expect_len}",
            self.source
        );
        let mut out = vec![0f32; n];
        let row = *w.shape.last().unwrap_or(&1);
        let rb =
            w.ty.row_bytes(row)
                .ok_or_else(|| Error::new(format!("{}: tensor \"{name}\" has a bad row length", self.source)))?;
        for (i, chunk) in out.chunks_mut(row).enumerate() {
            ffai_kernels::quant::dequantize_row(w.ty, &w.bytes.as_slice()[i * rb..(i + 1) * rb], chunk);
        }
        Ok(out)
    }

    /// A copy of these weights (entries share their bytes) with each named tensor replaced
    /// by the f32 values given, in the shape it had: a family that folds constant
    /// multipliers into its weights at load (Falcon-H1's µP multipliers).
    pub(crate) fn with_f32(&self, replace: Vec<(String, Vec<f32>)>) -> Result<Weights> {
        let mut map = self.map.clone();
        for (name, v) in replace {
            let shape = self.get(&name)?.shape.clone();
            ensure!(
                shape.iter().product::<usize>() == v.len(),
                "{}: {} values to replace tensor \"{name}\" of shape {shape:?}",
                self.source,
                v.len()
            );
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            map.insert(
                name,
                WeightEntry {
                    ty: WeightType::F32,
                    shape,
                    bytes: HostBytes::from_vec(bytes),
                },
            );
        }
        Ok(Weights {
            map,
            model_type: self.model_type.clone(),
            source: self.source.clone(),
            source_quantization: self.source_quantization.clone(),
        })
    }

    /// Checks a matrix's shape: `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<&WeightEntry> {
        let w = self.get(name)?;
        ensure!(
            w.shape == [rows, cols],
            "{}: tensor \"{name}\" has shape {:?}, expected [{rows}, {cols}]",
            self.source,
            w.shape
        );
        Ok(w)
    }

    pub fn from_gguf(f: &GgufFile, source: &str) -> Weights {
        let map = f
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    WeightEntry {
                        ty: t.ty,
                        shape: t.shape.clone(),
                        bytes: f.tensor_bytes(t),
                    },
                )
            })
            .collect();
        Weights {
            map,
            model_type: String::new(),
            source: source.to_string(),
            source_quantization: None,
        }
    }

    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn from_safetensors_dir(dir: &Path) -> Result<Weights> {
        Self::from_safetensors_dir_for(dir, "")
    }

    /// As `from_safetensors_dir`, mapping names the way `model_type`'s checkpoints use them.
    pub fn from_safetensors_dir_for(dir: &Path, model_type: &str) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::new(format!("{}: {e}", index.display())))?;
            let shards = shard_names(&text).map_err(|e| e.context(index.display()))?;
            for s in &shards {
                ensure!(
                    dir.join(s).exists(),
                    "{}: shard {s} named in the index is missing",
                    dir.display()
                );
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let single = dir.join("model.safetensors");
            ensure!(
                single.exists(),
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
            vec![single]
        };
        let (quant, fp8) = read_quant_configs(dir)?;
        let mut weights = Weights {
            map: HashMap::new(),
            model_type: model_type.to_string(),
            source: dir.display().to_string(),
            source_quantization: None,
        };
        let mut raw = HashMap::new();
        for path in files {
            read_safetensors_file(&path, &mut raw)?;
        }
        weights.add_fp8(&mut raw, fp8.as_ref())?;
        weights.add_raw(raw, quant.as_ref())?;
        Ok(weights)
    }

    /// Joins each FP8 E4M3 weight (`X.weight`) with its block scales
    /// (`X.weight_scale_inv`) and files it converted (see `crate::fp8`); the rest of
    /// `raw` is left for `add_raw`. transformers 5's fused experts are parameters without
    /// `.weight` (`mlp.experts.gate_up_proj` `[experts, 2·ffn, hidden]`, `down_proj`):
    /// their scales are `X_scale_inv`, one block grid per expert.
    fn add_fp8(&mut self, raw: &mut HashMap<String, RawTensor>, fp8: Option<&Fp8QuantConfig>) -> Result<()> {
        let mut scales: Vec<String> = raw.keys().filter(|n| n.ends_with("_scale_inv")).cloned().collect();
        scales.sort();
        let mut converted = 0usize;
        for sname in scales {
            let (base, wname) = match sname.strip_suffix(".weight_scale_inv") {
                Some(base) => (base.to_string(), format!("{base}.weight")),
                None => {
                    let wname = sname.strip_suffix("_scale_inv").unwrap_or(&sname).to_string();
                    (wname.clone(), wname)
                }
            };
            let sc = raw.remove(&sname).expect("listed above");
            let file = sc.file.display();
            let Some(cfg) = fp8 else {
                bail!(
                    "{file}: tensor \"{sname}\" is an FP8 block scale, but config.json has no quantization_config with quant_method \"fp8\" and weight_block_size"
                );
            };
            ensure!(
                !cfg.is_not_converted(&base),
                "{file}: config.json lists \"{base}\" in modules_to_not_convert, but it has \"{sname}\""
            );
            let Some(w) = raw.remove(&wname) else {
                bail!("{file}: tensor \"{sname}\" has no matching \"{wname}\"");
            };
            let entry = fp8_entry(&wname, &w, &sc, cfg)?;
            // The converted copy is all that is read from now on.
            w.release_pages();
            sc.release_pages();
            self.map.insert(hf_to_gguf_name_for(&wname, &self.model_type), entry);
            converted += 1;
        }
        if let (Some(cfg), true) = (fp8, converted > 0) {
            self.source_quantization = Some(cfg.describe());
        }
        Ok(())
    }

    /// Files the raw safetensors tensors under GGUF names. MLX affine triples
    /// (`X.weight` packed `u32`, `X.scales`, `X.biases`) become one matrix of type
    /// `Affine`, repacked (see `ffai_kernels::quant::affine`).
    fn add_raw(&mut self, mut raw: HashMap<String, RawTensor>, quant: Option<&AffineQuantConfig>) -> Result<()> {
        let mut scales: Vec<String> = raw.keys().filter(|n| n.ends_with(".scales")).cloned().collect();
        scales.sort();
        for sname in scales {
            let base = sname.strip_suffix(".scales").unwrap_or(&sname).to_string();
            let (wname, bname) = (format!("{base}.weight"), format!("{base}.biases"));
            let sc = raw.remove(&sname).expect("listed above");
            let Some(w) = raw.remove(&wname) else {
                bail!("{}: tensor \"{sname}\" has no matching \"{wname}\"", sc.file.display());
            };
            let Some(bi) = raw.remove(&bname) else {
                bail!(
                    "{}: quantized tensor \"{wname}\" has scales but no \"{bname}\"",
                    w.file.display()
                );
            };
            let entry = affine_entry(&base, &w, &sc, &bi, quant)?;
            // The repacked copy is all that is read from now on.
            for t in [&w, &sc, &bi] {
                t.release_pages();
            }
            self.map.insert(hf_to_gguf_name_for(&wname, &self.model_type), entry);
        }
        // GPT-OSS's MXFP4 experts: `X_blocks` (u8 `[.., rows, cols/32, 16]`) with
        // `X_scales` (u8 `[.., rows, cols/32]`) become one MXFP4 matrix `[.., rows, cols]`
        // in ggml's block layout (repacked losslessly), filed under `X_blocks`'s name.
        let mut blocks: Vec<String> = raw.keys().filter(|n| n.ends_with("_blocks")).cloned().collect();
        blocks.sort();
        for bname in blocks {
            let base = bname.strip_suffix("_blocks").unwrap_or(&bname).to_string();
            let sname = format!("{base}_scales");
            let Some(sc) = raw.remove(&sname) else { continue };
            let bl = raw.remove(&bname).expect("listed above");
            let entry = mxfp4_entry(&bname, &bl, &sc)?;
            bl.release_pages();
            sc.release_pages();
            self.map.insert(hf_to_gguf_name_for(&bname, &self.model_type), entry);
        }
        for (name, t) in raw {
            if let Some(base) = name.strip_suffix(".biases") {
                bail!(
                    "{}: tensor \"{name}\" has no matching \"{base}.scales\"",
                    t.file.display()
                );
            }
            let ty = match t.dtype {
                safetensors::Dtype::F32 => WeightType::F32,
                safetensors::Dtype::F16 => WeightType::F16,
                safetensors::Dtype::BF16 => WeightType::BF16,
                safetensors::Dtype::F8_E4M3 => bail!(
                    "{}: tensor \"{name}\" is FP8 E4M3 but has no \"{name}_scale_inv\" block scales (per-tensor FP8 scales are not supported)",
                    t.file.display()
                ),
                safetensors::Dtype::F8_E5M2 => bail!(
                    "{}: tensor \"{name}\" is FP8 E5M2, which is not supported (only E4M3 with block scales)",
                    t.file.display()
                ),
                safetensors::Dtype::U32 if name.ends_with(".weight") => {
                    let base = name.strip_suffix(".weight").unwrap_or(&name);
                    bail!(
                        "{}: tensor \"{name}\" is packed uint32 (MLX quantized) but \"{base}.scales\" is missing",
                        t.file.display()
                    )
                }
                other => bail!(
                    "{}: tensor \"{name}\" has dtype {other:?}, which ffai does not load yet",
                    t.file.display()
                ),
            };
            self.map.insert(
                hf_to_gguf_name_for(&name, &self.model_type),
                WeightEntry {
                    ty,
                    shape: t.shape,
                    bytes: t.bytes,
                },
            );
        }
        Ok(())
    }
}

/// A safetensors tensor as stored, before names are mapped and MLX triples joined.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: HostBytes,
    file: PathBuf,
    /// The file's map and where the bytes start in it, to drop their pages once copied.
    map: Arc<memmap2::Mmap>,
    start: usize,
}

impl RawTensor {
    /// Takes this tensor's pages out of the process's resident set, for a tensor that was
    /// copied (repacked) and will not be read again. Without this the mapped pages stay
    /// resident next to the copy: an MLX 8-bit checkpoint peaked at about twice its size.
    /// Only whole pages inside the tensor are dropped.
    fn release_pages(&self) {
        const PAGE: usize = 4096;
        let start = self.start.next_multiple_of(PAGE);
        let end = (self.start + self.bytes.len()) / PAGE * PAGE;
        #[cfg(unix)]
        if end > start {
            // SAFETY: the map is read-only (PROT_READ) and private, so its pages were never
            // written: MADV_DONTNEED only drops them from this process, and a later read
            // faults the file's bytes in again. Slices borrowed from the map still read the
            // same bytes. A failure only leaves the pages resident.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Maps one safetensors file and adds its tensors to `raw` under their stored names.
fn read_safetensors_file(path: &Path, raw: &mut HashMap<String, RawTensor>) -> Result<()> {
    let ctx = |e: String| Error::new(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| ctx(e.to_string()))?;
    // SAFETY: read-only private map; all access goes through bounds-checked slices
    // the safetensors crate validated against the file length.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ctx(e.to_string()))?);
    // The crate checks the header size limit, that offsets are in bounds and
    // contiguous, and that each tensor's byte length matches shape x dtype.
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| match truncated_tensor(&map) {
        Some(msg) => ctx(msg),
        None => ctx(format!("invalid safetensors: {e}")),
    })?;
    let base = map.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let data = view.data();
        let start = data.as_ptr() as usize - base;
        raw.insert(
            name.clone(),
            RawTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: HostBytes::new(map.clone(), start, data.len()),
                file: path.to_path_buf(),
                map: map.clone(),
                start,
            },
        );
    }
    Ok(())
}

/// For a file whose header parses but whose data is cut short: which tensor runs past
/// the end (the first by offset), as a message. `None` for any other problem.
fn truncated_tensor(file: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header = file.get(8..8usize.checked_add(n)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let have = file.len() - 8 - n;
    let mut worst: Option<(u64, &str)> = None;
    for (name, t) in v.as_object()? {
        let Some(end) = t.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()) else {
            continue;
        };
        if end > have as u64 && worst.is_none_or(|(w, _)| end < w) {
            worst = Some((end, name));
        }
    }
    let (end, name) = worst?;
    Some(format!(
        "truncated: tensor \"{name}\" ends at data byte {end} but the file holds {have} data bytes"
    ))
}

/// The MLX `quantization` section and the fine-grained FP8 `quantization_config` of
/// `dir/config.json`, where present.
fn read_quant_configs(dir: &Path) -> Result<(Option<AffineQuantConfig>, Option<Fp8QuantConfig>)> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok((None, None));
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::new(format!("{}: invalid JSON: {e}", path.display())))?;
    let source = path.display().to_string();
    Ok((
        AffineQuantConfig::from_hf_json(&v, &source)?,
        Fp8QuantConfig::from_hf_json(&v, &source)?,
    ))
}

/// One FP8 weight with its block scales, converted (`crate::fp8::convert`). Dtypes and
/// shapes are checked before anything is allocated.
fn fp8_entry(wname: &str, w: &RawTensor, sc: &RawTensor, cfg: &Fp8QuantConfig) -> Result<WeightEntry> {
    let file = w.file.display();
    match w.dtype {
        safetensors::Dtype::F8_E4M3 => {}
        safetensors::Dtype::F8_E5M2 => {
            bail!("{file}: tensor \"{wname}\" is FP8 E5M2, which is not supported (only E4M3 with block scales)")
        }
        other => bail!("{file}: tensor \"{wname}\" has block scales but dtype {other:?} (expected F8_E4M3)"),
    }
    let sty = match sc.dtype {
        safetensors::Dtype::F32 => WeightType::F32,
        safetensors::Dtype::BF16 => WeightType::BF16,
        safetensors::Dtype::F16 => WeightType::F16,
        other => bail!("{file}: tensor \"{wname}_scale_inv\" has dtype {other:?}, expected F32, BF16 or F16"),
    };
    // A stacked `[experts, rows, cols]` weight (fused experts) has a block grid per
    // expert; anything else is checked as one matrix (and a weight that is neither 2-D
    // nor 3-D is refused there).
    let stacked = w.shape.len() == 3;
    if stacked {
        crate::fp8::check_stacked_shapes(wname, &w.shape, &sc.shape, cfg.block).map_err(|e| e.context(&file))?;
    } else {
        crate::fp8::check_shapes(wname, &w.shape, &sc.shape, cfg.block).map_err(|e| e.context(&file))?;
    }
    // The safetensors crate checked the byte length against the shape, and the shape
    // against the weight's just above: the scale vector is bounded by the file.
    let n: usize = sc.shape.iter().product();
    let mut scales = vec![0f32; n];
    ffai_kernels::quant::dequantize_row(sty, sc.bytes.as_slice(), &mut scales);
    let m = crate::fp8::Fp8Matrix {
        codes: w.bytes.as_slice(),
        shape: &w.shape,
        scales: &scales,
        scale_shape: &sc.shape,
        block: cfg.block,
    };
    let (ty, bytes) = match stacked {
        true => crate::fp8::convert_stacked(wname, &m),
        false => crate::fp8::convert(wname, &m),
    }
    .map_err(|e| e.context(&file))?;
    Ok(WeightEntry {
        ty,
        shape: w.shape.clone(),
        bytes: HostBytes::from_vec(bytes),
    })
}

/// Joins an MLX triple into one `Affine` matrix: checks dtypes and shapes, takes
/// the group size from the config and the bits from the shapes (packed columns · 32 =
/// columns · bits), checks them against the config, and repacks.
fn affine_entry(
    base: &str,
    w: &RawTensor,
    sc: &RawTensor,
    bi: &RawTensor,
    quant: Option<&AffineQuantConfig>,
) -> Result<WeightEntry> {
    let file = w.file.display();
    let wname = format!("{base}.weight");
    ensure!(
        w.dtype == safetensors::Dtype::U32,
        "{file}: tensor \"{wname}\" has scales but dtype {:?} (MLX quantized weights are packed uint32)",
        w.dtype
    );
    let st = |t: &RawTensor, what: &str| -> Result<ScaleType> {
        Ok(match t.dtype {
            safetensors::Dtype::F16 => ScaleType::F16,
            safetensors::Dtype::BF16 => ScaleType::BF16,
            safetensors::Dtype::F32 => ScaleType::F32,
            other => bail!(
                "{}: tensor \"{base}.{what}\" has dtype {other:?}, expected F16, BF16 or F32",
                t.file.display()
            ),
        })
    };
    let (sst, bst) = (st(sc, "scales")?, st(bi, "biases")?);
    ensure!(
        sst == bst,
        "{file}: tensor \"{base}.scales\" is {sst:?} but \"{base}.biases\" is {bst:?}"
    );
    let [rows, wcols] = w.shape[..] else {
        bail!(
            "{file}: quantized tensor \"{wname}\" has shape {:?}, expected 2 dimensions",
            w.shape
        );
    };
    for (t, what) in [(sc, "scales"), (bi, "biases")] {
        ensure!(
            t.shape.len() == 2 && t.shape[0] == rows && t.shape[1] > 0,
            "{}: tensor \"{base}.{what}\" has shape {:?}, which does not fit \"{wname}\" of shape {:?}",
            t.file.display(),
            t.shape,
            w.shape
        );
    }
    ensure!(
        sc.shape == bi.shape,
        "{file}: tensor \"{base}.scales\" has shape {:?} but \"{base}.biases\" has {:?}",
        sc.shape,
        bi.shape
    );
    let ngroups = sc.shape[1];
    let params = match quant.map(|q| q.for_module(base)) {
        Some(ModuleQuant::Explicit(p)) => (p, true),
        Some(ModuleQuant::Default(p)) => (p, false),
        Some(ModuleQuant::Unquantized) => {
            bail!("{file}: config.json marks \"{base}\" unquantized, but \"{wname}\" has scales and biases")
        }
        Some(ModuleQuant::Unknown) | None => {
            bail!("{file}: tensor \"{wname}\" is MLX-quantized but config.json has no quantization group_size")
        }
    };
    let (AffineParams { bits: want, group }, explicit) = params;
    let cols = ngroups
        .checked_mul(group as usize)
        .ok_or_else(|| Error::new(format!("{file}: tensor \"{base}.scales\" is too large")))?;
    // Packed words hold cols · bits / 32 each row: the bits follow from the shapes.
    let packed_bits = wcols.checked_mul(32).filter(|b| b % cols == 0).map(|b| b / cols);
    let bits = packed_bits
        .and_then(|b| u8::try_from(b).ok())
        .filter(|b| WeightType::affine(*b, group).is_some());
    let describe = || {
        format!(
            "\"{wname}\" of shape {:?} and \"{base}.scales\" of shape {:?} at group size {group}",
            w.shape, sc.shape
        )
    };
    let bits = match (bits, want) {
        (Some(b), Some(c)) if b != c && explicit => bail!(
            "{file}: config.json gives \"{base}\" {c} bits, but {} hold {b}-bit values",
            describe()
        ),
        (Some(b), _) => b,
        (None, Some(c)) => bail!(
            "{file}: {} do not hold {c}-bit values (the quantization config's bits) nor any supported width",
            describe()
        ),
        (None, None) => bail!("{file}: {} do not hold 2, 3, 4, 5, 6 or 8-bit values", describe()),
    };
    let ty = WeightType::affine(bits, group).expect("checked above");
    let triple = MlxTriple {
        weight: w.bytes.as_slice(),
        scales: sc.bytes.as_slice(),
        biases: bi.bytes.as_slice(),
        scale_type: sst,
    };
    let packed = repack_mlx(bits, group, rows, cols, &triple)
        .map_err(|e| Error::new(format!("{file}: tensor \"{wname}\": {e}")))?;
    Ok(WeightEntry {
        ty,
        shape: vec![rows, cols],
        bytes: HostBytes::from_vec(packed),
    })
}

/// One MXFP4 matrix from the Hugging Face / OpenAI layout of GPT-OSS's experts: `blocks`
/// u8 `[.., rows, nb, 16]` (byte `i` of a block: element `2i` in its low nibble, `2i + 1`
/// in its high one) and `scales` u8 `[.., rows, nb]` (E8M0, value `2^(s − 127)`), as
/// transformers' `convert_moe_packed_tensors` reads them. ggml's MXFP4 block is the scale
/// byte, then byte `j` = element `j` (low nibble) and `j + 16` (high): the same codes and
/// the same exponent, so the repacking only moves nibbles.
fn mxfp4_entry(name: &str, bl: &RawTensor, sc: &RawTensor) -> Result<WeightEntry> {
    let file = bl.file.display();
    ensure!(
        bl.dtype == safetensors::Dtype::U8 && sc.dtype == safetensors::Dtype::U8,
        "{file}: MXFP4 tensor \"{name}\" needs u8 blocks and scales, not {:?} and {:?}",
        bl.dtype,
        sc.dtype
    );
    let n = bl.shape.len();
    ensure!(
        n >= 2 && bl.shape[n - 1] == 16 && sc.shape == bl.shape[..n - 1],
        "{file}: MXFP4 tensor \"{name}\" has blocks {:?} and scales {:?} (want [.., nb, 16] and [.., nb])",
        bl.shape,
        sc.shape
    );
    let n_blocks: usize = sc.shape.iter().product();
    ensure!(
        bl.bytes.len() == n_blocks * 16 && sc.bytes.len() == n_blocks,
        "{file}: MXFP4 tensor \"{name}\" is truncated"
    );
    let (b, s) = (bl.bytes.as_slice(), sc.bytes.as_slice());
    let mut out = Vec::with_capacity(n_blocks * 17);
    for (i, &e) in s.iter().enumerate() {
        let src = &b[i * 16..(i + 1) * 16];
        let code = |el: usize| (src[el / 2] >> (4 * (el % 2))) & 0x0F;
        out.push(e);
        out.extend((0..16).map(|j| code(j) | (code(j + 16) << 4)));
    }
    let mut shape = sc.shape.clone();
    let last = shape.len() - 1;
    shape[last] *= 32;
    Ok(WeightEntry {
        ty: WeightType::MXFP4,
        shape,
        bytes: HostBytes::from_vec(out),
    })
}

/// Maps Hugging Face tensor names to GGUF's naming scheme; unknown names pass through.
pub fn hf_to_gguf_name(name: &str) -> String {
    hf_to_gguf_name_for(name, "")
}

/// As `hf_to_gguf_name`, for a given config.json `model_type`: Gemma 2/3 and OLMo 2 use
/// `post_attention_layernorm` for a norm *after* attention, where Llama uses it before
/// the MLP.
pub fn hf_to_gguf_name_for(name: &str, model_type: &str) -> String {
    let gemma4 = matches!(model_type, "gemma4" | "gemma4_text");
    let nested = gemma4 || matches!(model_type, "qwen3_5_text" | "qwen3_5_moe_text");
    // Gemma 4's and Qwen3.5's multimodal checkpoints nest the text model (their vision
    // and audio towers keep their names and are never read).
    let stripped;
    let name = match name.strip_prefix("model.language_model.") {
        Some(rest) if nested => {
            stripped = format!("model.{rest}");
            stripped.as_str()
        }
        _ => name,
    };
    if gemma4 {
        if let Some(n) = gemma4_name(name) {
            return n;
        }
    }
    if let Some(n) = crate::models::recurrent::hf_name(name, model_type) {
        return n;
    }
    let sandwich = matches!(model_type, "gemma2" | "gemma3" | "gemma3_text" | "olmo2") || gemma4;
    let top = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.norm.bias", "output_norm.bias"),
        ("lm_head.weight", "output.weight"),
    ];
    for (hf, gg) in top {
        if name == hf {
            return gg.to_string();
        }
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if idx.parse::<usize>().is_ok() {
                if model_type == "gpt_oss" {
                    if let Some(name) = gpt_oss_name(idx, tail) {
                        return name;
                    }
                }
                if let Some(name) = expert_name(idx, tail) {
                    return name;
                }
                let post_attn = if sandwich { "post_attention_norm." } else { "ffn_norm." };
                let parts = [
                    ("input_layernorm.", "attn_norm."),
                    ("post_attention_layernorm.", post_attn),
                    ("pre_feedforward_layernorm.", "ffn_norm."),
                    ("post_feedforward_layernorm.", "post_ffw_norm."),
                    ("self_attn.qkv_proj.", "attn_qkv."),
                    ("mlp.gate_up_proj.", "ffn_up."),
                    ("mlp.c_fc.", "ffn_up."),
                    ("mlp.c_proj.", "ffn_down."),
                    ("self_attn.q_proj.", "attn_q."),
                    ("self_attn.k_proj.", "attn_k."),
                    ("self_attn.v_proj.", "attn_v."),
                    ("self_attn.o_proj.", "attn_output."),
                    ("self_attn.q_norm.", "attn_q_norm."),
                    ("self_attn.k_norm.", "attn_k_norm."),
                    ("mlp.gate_proj.", "ffn_gate."),
                    // DeepSeek: MLA projections, the router's choice bias, shared experts.
                    ("self_attn.q_a_proj.", "attn_q_a."),
                    ("self_attn.q_a_layernorm.", "attn_q_a_norm."),
                    ("self_attn.q_b_proj.", "attn_q_b."),
                    ("self_attn.kv_a_proj_with_mqa.", "attn_kv_a_mqa."),
                    ("self_attn.kv_a_layernorm.", "attn_kv_a_norm."),
                    ("self_attn.kv_b_proj.", "attn_kv_b."),
                    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
                    ("mlp.shared_experts.gate_proj.", "ffn_gate_shexp."),
                    ("mlp.shared_experts.up_proj.", "ffn_up_shexp."),
                    ("mlp.shared_experts.down_proj.", "ffn_down_shexp."),
                    // Qwen2-MoE / Qwen3-Next / Qwen3.5-MoE: one shared expert and its gate.
                    ("mlp.shared_expert.gate_proj.", "ffn_gate_shexp."),
                    ("mlp.shared_expert.up_proj.", "ffn_up_shexp."),
                    ("mlp.shared_expert.down_proj.", "ffn_down_shexp."),
                    ("mlp.shared_expert_gate.", "ffn_gate_inp_shexp."),
                    ("mlp.gate.", "ffn_gate_inp."),
                    ("block_sparse_moe.gate.", "ffn_gate_inp."),
                    ("mlp.up_proj.", "ffn_up."),
                    ("mlp.down_proj.", "ffn_down."),
                ];
                for (hf, gg) in parts {
                    if let Some(suffix) = tail.strip_prefix(hf) {
                        return format!("blk.{idx}.{gg}{suffix}");
                    }
                }
            }
        }
    }
    name.to_string()
}

/// Gemma 4's own tensors (llama.cpp's names where its converter has them): the per-layer
/// embeddings and their projection, each layer's per-layer input gate, projection and
/// norm, `layer_scalar`, and the MoE block beside the dense MLP (its router's input
/// scale and per-expert scale, the fused experts, three more norms).
fn gemma4_name(name: &str) -> Option<String> {
    let top = match name {
        "model.embed_tokens_per_layer.weight" => Some("per_layer_token_embd.weight"),
        "model.per_layer_model_projection.weight" => Some("per_layer_model_proj.weight"),
        "model.per_layer_projection_norm.weight" => Some("per_layer_proj_norm.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let (idx, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
    idx.parse::<usize>().ok()?;
    let gg = match tail {
        "layer_scalar" => "layer_output_scale.weight",
        "per_layer_input_gate.weight" => "inp_gate.weight",
        "per_layer_projection.weight" => "proj.weight",
        "post_per_layer_input_norm.weight" => "post_norm.weight",
        "router.proj.weight" => "ffn_gate_inp.weight",
        "router.scale" => "ffn_gate_inp.scale",
        "router.per_expert_scale" => "ffn_down_exps.scale",
        "experts.gate_up_proj" => "ffn_gate_up_exps.weight",
        "experts.down_proj" => "ffn_down_exps.weight",
        "pre_feedforward_layernorm_2.weight" => "pre_ffw_norm_2.weight",
        "post_feedforward_layernorm_1.weight" => "post_ffw_norm_1.weight",
        "post_feedforward_layernorm_2.weight" => "post_ffw_norm_2.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{gg}"))
}

/// Mixture-of-experts tensor names (the part after `model.layers.N.`): per-expert
/// matrices `mlp.experts.E.{gate,up,down}_proj.*` (Qwen3-MoE, OLMoE) and Mixtral's
/// `block_sparse_moe.experts.E.{w1,w3,w2}.*` become `blk.N.ffn_{gate,up,down}_exps.E.*`;
/// transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj` (`[experts, rows,
/// cols]`, no `.weight` suffix) become `blk.N.ffn_gate_up_exps.weight` /
/// `blk.N.ffn_down_exps.weight` (llama.cpp's stacked name and layout for down).
fn expert_name(layer: &str, tail: &str) -> Option<String> {
    let rest = tail
        .strip_prefix("mlp.experts.")
        .or_else(|| tail.strip_prefix("block_sparse_moe.experts."))?;
    match rest {
        "gate_up_proj" | "gate_up_proj.weight" => return Some(format!("blk.{layer}.ffn_gate_up_exps.weight")),
        "down_proj" | "down_proj.weight" => return Some(format!("blk.{layer}.ffn_down_exps.weight")),
        _ => {}
    }
    let (e, proj) = rest.split_once('.')?;
    e.parse::<usize>().ok()?;
    let (kind, suffix) = [
        ("gate_proj.", "gate"),
        ("up_proj.", "up"),
        ("down_proj.", "down"),
        ("w1.", "gate"),
        ("w3.", "up"),
        ("w2.", "down"),
    ]
    .iter()
    .find_map(|(hf, kind)| proj.strip_prefix(hf).map(|s| (*kind, s)))?;
    Some(format!("blk.{layer}.ffn_{kind}_exps.{e}.{suffix}"))
}

/// GPT-OSS's own tensors (the part after `model.layers.N.`): the router with its bias,
/// the attention sinks, and the experts in the released layouts. Floats: `gate_up_proj`
/// `[E, hidden, 2·ffn]` (in × out, gate at even and up at odd columns) →
/// `blk.N.oai_gate_up_exps.weight`, its bias `[E, 2·ffn]` (interleaved the same way) →
/// `.bias`, `down_proj` `[E, ffn, hidden]` (in × out) → `blk.N.oai_down_exps.weight`.
/// MXFP4 (`*_blocks` + `*_scales`, joined at load): `gate_up_proj` `[E, 2·ffn, hidden]`
/// (out × in, gate at even rows) → `blk.N.oai_gate_up_exps.mxfp4`, `down_proj`
/// `[E, hidden, ffn]` → `blk.N.ffn_down_exps.weight` (llama.cpp's stacked layout).
fn gpt_oss_name(layer: &str, tail: &str) -> Option<String> {
    let name = match tail {
        "self_attn.sinks" => "attn_sinks.weight",
        "mlp.router.weight" => "ffn_gate_inp.weight",
        "mlp.router.bias" => "ffn_gate_inp.bias",
        "mlp.experts.gate_up_proj" => "oai_gate_up_exps.weight",
        "mlp.experts.gate_up_proj_bias" => "oai_gate_up_exps.bias",
        "mlp.experts.gate_up_proj_blocks" => "oai_gate_up_exps.mxfp4",
        "mlp.experts.down_proj" => "oai_down_exps.weight",
        "mlp.experts.down_proj_blocks" => "ffn_down_exps.weight",
        "mlp.experts.down_proj_bias" => "ffn_down_exps.bias",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}"))
}

/// Most shards an index may name (the largest released checkpoints have a few hundred).
pub const MAX_SHARDS: usize = 4096;
/// Longest shard file name accepted (the usual file-system limit).
pub const MAX_SHARD_NAME: usize = 255;

/// The distinct shard files named by a `model.safetensors.index.json`, sorted. Each must
/// be a plain `*.safetensors` file name: an index may come from a remote repository,
/// and a name with a separator, `..` or an absolute path would leave the checkpoint's
/// directory (or the download cache) when joined to it.
pub fn shard_names(index_json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(index_json).map_err(|e| Error::new(format!("invalid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::new("no \"weight_map\" object"))?;
    let mut shards = Vec::new();
    for (tensor, file) in wm {
        let s = file
            .as_str()
            .ok_or_else(|| Error::new(format!("weight_map entry {tensor:?} is {file}, not a file name")))?;
        ensure!(
            !s.is_empty()
                && s.len() <= MAX_SHARD_NAME
                && s != "."
                && s != ".."
                && !s.contains(['/', '\\', ':', '\0'])
                && s.ends_with(".safetensors"),
            "shard name {:?} is not a plain *.safetensors file name of at most {MAX_SHARD_NAME} bytes",
            s.chars().take(80).collect::<String>()
        );
        shards.push(s.to_string());
    }
    shards.sort();
    shards.dedup();
    ensure!(!shards.is_empty(), "weight_map names no shard");
    ensure!(
        shards.len() <= MAX_SHARDS,
        "{} shards exceed the limit of {MAX_SHARDS}",
        shards.len()
    );
    Ok(shards)
}
