//! `ffai quantize`: a GGUF file re-encoded with another weight type, tensor by tensor.
//!
//! Every weight matrix (a `*.weight` tensor of two or more dimensions that is not a
//! norm) is decoded row by row to `f32` and encoded as the target type; everything else
//! (norms, biases, 1-D tensors) is copied byte for byte, as is the metadata (less
//! `general.file_type`, which would no longer describe the file). When a matrix's rows
//! are not a whole number of the target's blocks (Gemma 3's 640-wide rows and the
//! 256-element K-quant blocks), the nearest type whose blocks fit is used instead, the
//! same choice llama.cpp's quantizer makes.
//!
//! Memory stays bounded by one row: the header is computed from the types and shapes up
//! front, then each tensor is streamed to a temporary file beside the destination, which
//! is renamed into place only when complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ffai_kernels::quant::{self, WeightType};

use crate::error::{Error, Result};
use crate::gguf::{self, GgufFile, MetaValue};
use crate::{bail, ensure};

/// What [`requantize_gguf`] did.
#[derive(Debug, Clone)]
pub struct RequantSummary {
    /// Tensors encoded as the target type.
    pub converted: usize,
    /// Tensors encoded as a fallback type because their rows do not fit the target's
    /// blocks: (name, type used).
    pub fallbacks: Vec<(String, WeightType)>,
    /// Tensors copied unchanged.
    pub copied: usize,
    pub bytes_written: u64,
}

/// The type to use for rows of `cols` elements when `target`'s blocks do not divide them.
fn fallback(target: WeightType, cols: usize) -> WeightType {
    let by_bits: &[WeightType] = match target {
        WeightType::Q2K | WeightType::Q3K => &[WeightType::Q4_0],
        WeightType::Q4K => &[WeightType::Q5_0],
        WeightType::IQ4XS => &[WeightType::IQ4NL, WeightType::Q5_0],
        WeightType::Q5K => &[WeightType::Q5_1],
        WeightType::Q6K => &[WeightType::Q8_0],
        _ => &[],
    };
    by_bits
        .iter()
        .copied()
        .find(|t| t.row_bytes(cols).is_some())
        .unwrap_or(WeightType::F16)
}

/// True for the tensors that get the target type. Mixture-of-experts routers
/// (`ffn_gate_inp`) keep their type, as llama.cpp's quantizer keeps them: a routing
/// decision is discrete, so a small error in its logits can change which experts run.
/// So do the recurrent mixers' small depthwise conv weights (`ssm_conv1d`, LFM2's
/// `shortconv.conv`), as llama.cpp keeps them; `ssm_a` / `ssm_d` have no `.weight` suffix
/// and are copied as all 1-D tensors are.
fn is_weight_matrix(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2
        && name.ends_with(".weight")
        && !name.contains("norm")
        && !name.contains("ffn_gate_inp")
        && !name.contains("ssm_conv1d")
        && !name.contains("shortconv.conv.weight")
}

/// Writes `dst`: `src` with every weight matrix encoded as `target` (see the module
/// docs). Refuses to overwrite an existing `dst` unless `force`.
pub fn requantize_gguf(src: &Path, dst: &Path, target: WeightType, force: bool) -> Result<RequantSummary> {
    ensure!(
        force || !dst.exists(),
        "{} exists (pass --force to overwrite)",
        dst.display()
    );
    let f = GgufFile::open(src)?;
    let metadata: Vec<(String, MetaValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type" && k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut plan = Vec::with_capacity(f.tensors.len());
    let mut summary = RequantSummary {
        converted: 0,
        fallbacks: Vec::new(),
        copied: 0,
        bytes_written: 0,
    };
    for t in &f.tensors {
        let cols = *t.shape.last().unwrap_or(&1);
        let ty = if is_weight_matrix(&t.name, &t.shape) && cols > 0 {
            if target.row_bytes(cols).is_some() {
                summary.converted += 1;
                target
            } else {
                let fb = fallback(target, cols);
                summary.fallbacks.push((t.name.clone(), fb));
                fb
            }
        } else {
            summary.copied += 1;
            t.ty
        };
        let rows: usize = t.shape[..t.shape.len().saturating_sub(1)].iter().product();
        let n_bytes = ty
            .row_bytes(cols)
            .and_then(|rb| rb.checked_mul(rows))
            .ok_or_else(|| Error::new(format!("{}: {cols}-element rows do not fit {ty}", t.name)))?;
        plan.push((t.name.clone(), ty, t.shape.clone(), n_bytes));
    }
    let (header, _) = gguf::header_bytes(&metadata, &plan);
    let tmp = temp_path(dst);
    let result = (|| -> Result<u64> {
        let file = File::create(&tmp).map_err(|e| Error::new(format!("cannot create {}: {e}", tmp.display())))?;
        let mut out = BufWriter::new(file);
        let io = |e: std::io::Error| Error::new(format!("writing {}: {e}", tmp.display()));
        out.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let mut row = Vec::new();
        let mut enc = Vec::new();
        for (t, (name, ty, shape, n_bytes)) in f.tensors.iter().zip(&plan) {
            let data = f.tensor_bytes(t);
            if *ty == t.ty {
                ensure!(data.len() == *n_bytes, "{name}: stored size differs from its shape");
                out.write_all(data.as_slice()).map_err(io)?;
            } else {
                let cols = *shape.last().unwrap_or(&1);
                let rows: usize = shape[..shape.len() - 1].iter().product();
                let src_rb =
                    t.ty.row_bytes(cols)
                        .ok_or_else(|| Error::new(format!("{name}: rows do not fit {}", t.ty)))?;
                ensure!(
                    Some(data.len()) == src_rb.checked_mul(rows),
                    "{name}: stored size differs from its shape"
                );
                let dst_rb = ty.row_bytes(cols).unwrap_or(0);
                row.resize(cols, 0.0);
                enc.resize(dst_rb, 0);
                for src_row in data.as_slice().chunks_exact(src_rb) {
                    quant::dequantize_row(t.ty, src_row, &mut row);
                    quant::quantize_row(*ty, &row, &mut enc).map_err(|e| Error::new(format!("{name}: {e}")))?;
                    out.write_all(&enc).map_err(io)?;
                }
            }
            let pad = gguf::padding_after(*n_bytes);
            out.write_all(&[0u8; 32][..pad]).map_err(io)?;
            written += (*n_bytes + pad) as u64;
        }
        out.flush().map_err(io)?;
        Ok(written)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, dst).map_err(|e| Error::new(format!("cannot move into {}: {e}", dst.display())))?;
            summary.bytes_written = n;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A sibling of `dst` to write into before the final rename.
fn temp_path(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dst.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Parses a type name as `ffai quantize --type` takes it (ggml's names, any case).
pub fn parse_type(name: &str) -> Result<WeightType> {
    let want = name.to_ascii_uppercase();
    for id in 0..64 {
        if let Some(t) = WeightType::from_ggml(id) {
            if t.name() == want {
                return Ok(t);
            }
        }
    }
    bail!("unknown weight type {name:?} (e.g. Q8_0, Q6_K, Q4_K, Q4_0, F16)")
}
