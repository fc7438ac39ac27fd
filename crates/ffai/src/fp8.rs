//! FP8 E4M3 (`float8_e4m3fn`) weights with block scales, as fine-grained FP8 checkpoints
//! store them (DeepSeek-V3/R1, Qwen3-*-FP8): decoding, and the conversion at load into a
//! format the engine runs.
//!
//! Why convert: ffai has no FP8 kernels (CPU or CUDA). Each FP8 row is dequantized to f32
//! (code × its block's scale) and re-quantized to Q8_0, the format `ffai quantize` writes
//! and every backend runs. Q8_0 costs 8.5 bits per weight against FP8's 8 (+ a 128×128
//! block's scale), and is close to lossless for these values: an FP8 code carries a 3-bit
//! mantissa (relative step 1/8 to 1/16), while Q8_0 keeps 255 levels over each run of 32
//! values (a step of max/127 with an f16 scale), so its added error is a small fraction of
//! the rounding the FP8 checkpoint already holds. Rows whose length is not a multiple of
//! 32 (Q8_0's block) become BF16 instead. One row is in f32 at a time: no f32 copy of
//! the model.

use ffai_kernels::quant::{quantize_row, WeightType};

use crate::error::{Error, Result};
use crate::{bail, ensure};

/// E4M3 code → f32 bit pattern: bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0
/// mantissa; exponent 0 is subnormal (`m/8 · 2^-6`); no infinities, and `S.1111.111`
/// (0x7F, 0xFF) is NaN, so the largest finite value is 0x7E = 448.
const fn e4m3_bits(code: u8) -> u32 {
    let sign = ((code >> 7) as u32) << 31;
    let e = ((code >> 3) & 0xF) as u32;
    let m = (code & 0x7) as u32;
    if e == 0xF && m == 0x7 {
        return sign | 0x7FC0_0000;
    }
    if e == 0 {
        if m == 0 {
            return sign;
        }
        // m · 2^-9: normalise so the leading 1 of m is the implicit bit.
        let mut p = 2;
        while m >> p == 0 {
            p -= 1;
        }
        let exp = 127 - 9 + p;
        let frac = (m - (1 << p)) << (23 - p);
        return sign | (exp << 23) | frac;
    }
    // (1 + m/8) · 2^(e-7): rebias the exponent for f32, widen the mantissa.
    sign | ((e + 127 - 7) << 23) | (m << 20)
}

const fn e4m3_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_bits(i as u8);
        i += 1;
    }
    t
}

/// Every E4M3 code's value, as f32 bits.
static E4M3: [u32; 256] = e4m3_table();

/// The value of one E4M3 code (exact: every E4M3 value is an f32).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    f32::from_bits(E4M3[code as usize])
}

/// An FP8 matrix's stored parts, as read from the files (shapes unchecked).
pub struct Fp8Matrix<'a> {
    /// `[rows, cols]` E4M3 codes.
    pub codes: &'a [u8],
    pub shape: &'a [usize],
    /// `[ceil(rows/bo), ceil(cols/bi)]` scales as f32 (converted from the stored dtype).
    pub scales: &'a [f32],
    pub scale_shape: &'a [usize],
    /// `[bo, bi]`: the weight block each scale covers.
    pub block: [usize; 2],
}

/// The shape of the `weight_scale_inv` a `[rows, cols]` weight needs at `block` (both
/// sides non-zero).
pub fn scale_shape(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

/// Checks the shapes of an FP8 weight and its scales; returns `[rows, cols]`.
/// `what` names the weight in errors.
pub fn check_shapes(what: &str, shape: &[usize], scale_shape_got: &[usize], block: [usize; 2]) -> Result<[usize; 2]> {
    ensure!(
        block[0] > 0 && block[1] > 0,
        "FP8 tensor \"{what}\": empty scale block {block:?}"
    );
    let [rows, cols] = shape[..] else {
        bail!("FP8 tensor \"{what}\" has shape {shape:?}, expected 2 dimensions [out, in]");
    };
    ensure!(
        rows > 0 && cols > 0,
        "FP8 tensor \"{what}\" has an empty shape {shape:?}"
    );
    let want = scale_shape(rows, cols, block);
    ensure!(
        scale_shape_got == want,
        "FP8 tensor \"{what}\" of shape {shape:?} needs weight_scale_inv of shape {want:?} (blocks of {}×{}), found {scale_shape_got:?}",
        block[0],
        block[1]
    );
    Ok([rows, cols])
}

/// Checks the shapes of a stacked FP8 expert tensor (transformers 5's fused
/// `mlp.experts.gate_up_proj` / `down_proj`, `[experts, rows, cols]`) and its scales,
/// which must hold one 2-D block grid per expert (`[experts, ceil(rows/bo),
/// ceil(cols/bi)]`); returns `[experts, rows, cols]`. `what` names the weight in errors.
pub fn check_stacked_shapes(
    what: &str,
    shape: &[usize],
    scale_shape_got: &[usize],
    block: [usize; 2],
) -> Result<[usize; 3]> {
    ensure!(
        block[0] > 0 && block[1] > 0,
        "FP8 tensor \"{what}\": empty scale block {block:?}"
    );
    let [experts, rows, cols] = shape[..] else {
        bail!("FP8 tensor \"{what}\" has shape {shape:?}, expected 3 dimensions [experts, out, in]");
    };
    ensure!(
        experts > 0 && rows > 0 && cols > 0,
        "FP8 tensor \"{what}\" has an empty shape {shape:?}"
    );
    let [sr, sc] = scale_shape(rows, cols, block);
    let want = [experts, sr, sc];
    // The usual mistakes, named: one grid shared by all experts, or a grid per expert
    // but not for each of them.
    ensure!(
        scale_shape_got.len() == 3,
        "FP8 tensor \"{what}\" of shape {shape:?} needs block scales of shape {want:?} (one {}×{} grid per expert), found {}-dimensional scales {scale_shape_got:?}",
        block[0],
        block[1],
        scale_shape_got.len()
    );
    ensure!(
        scale_shape_got[0] == experts,
        "FP8 tensor \"{what}\" of shape {shape:?} holds {experts} experts, but its block scales {scale_shape_got:?} hold {}",
        scale_shape_got[0]
    );
    ensure!(
        scale_shape_got == want,
        "FP8 tensor \"{what}\" of shape {shape:?} needs block scales of shape {want:?} (blocks of {}×{} per expert), found {scale_shape_got:?}",
        block[0],
        block[1]
    );
    Ok([experts, rows, cols])
}

/// Converts a stacked `[experts, rows, cols]` FP8 tensor with `[experts, sr, sc]` scales:
/// each expert's `[rows, cols]` slice and its own `[sr, sc]` scales go through
/// [`convert`] exactly as a 2-D FP8 matrix does, and the results are stacked in expert
/// order, so expert `e`'s rows are the bytes `[e · rows · row_bytes, (e + 1) · rows ·
/// row_bytes)`, the layout the MoE loader slices stacked experts by. Lengths are checked
/// against the shapes before anything is allocated; the output is bounded by the input
/// (at most 2 bytes per FP8 code).
pub fn convert_stacked(what: &str, m: &Fp8Matrix) -> Result<(WeightType, Vec<u8>)> {
    let [experts, rows, cols] = check_stacked_shapes(what, m.shape, m.scale_shape, m.block)?;
    let too_large = || Error::new(format!("FP8 tensor \"{what}\" is too large"));
    let per_expert = rows.checked_mul(cols).ok_or_else(too_large)?;
    let n = experts.checked_mul(per_expert).ok_or_else(too_large)?;
    ensure!(
        m.codes.len() == n,
        "FP8 tensor \"{what}\" holds {} bytes, its shape {:?} needs {n}",
        m.codes.len(),
        m.shape
    );
    let [sr, sc] = scale_shape(rows, cols, m.block);
    let scales_per_expert = sr * sc;
    ensure!(
        m.scales.len() == experts * scales_per_expert,
        "FP8 tensor \"{what}\": {} scales, expected {}",
        m.scales.len(),
        experts * scales_per_expert
    );
    let ty = target_type(cols);
    let mut out = Vec::new();
    for (e, (codes, scales)) in m
        .codes
        .chunks_exact(per_expert)
        .zip(m.scales.chunks_exact(scales_per_expert))
        .enumerate()
    {
        let slice = Fp8Matrix {
            codes,
            shape: &[rows, cols],
            scales,
            scale_shape: &[sr, sc],
            block: m.block,
        };
        let (slice_ty, bytes) = convert(&format!("{what}[{e}]"), &slice)?;
        debug_assert_eq!(slice_ty, ty);
        if out.is_empty() {
            // Every slice encodes to the same length: reserve the whole tensor once.
            out.reserve_exact(bytes.len() * experts);
        }
        out.extend_from_slice(&bytes);
    }
    Ok((ty, out))
}

/// The engine type an FP8 matrix with rows of `cols` becomes.
pub fn target_type(cols: usize) -> WeightType {
    if WeightType::Q8_0.row_bytes(cols).is_some() {
        WeightType::Q8_0
    } else {
        WeightType::BF16
    }
}

/// Dequantizes `m` row by row and re-encodes each row as [`target_type`]: returns the
/// type and the encoded bytes. Shapes and lengths are checked first (they come from the
/// files); a NaN code, or a scale that is not finite, is an error.
pub fn convert(what: &str, m: &Fp8Matrix) -> Result<(WeightType, Vec<u8>)> {
    let [rows, cols] = check_shapes(what, m.shape, m.scale_shape, m.block)?;
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::new(format!("FP8 tensor \"{what}\" is too large")))?;
    ensure!(
        m.codes.len() == n,
        "FP8 tensor \"{what}\" holds {} bytes, its shape {:?} needs {n}",
        m.codes.len(),
        m.shape
    );
    let [sr, sc] = scale_shape(rows, cols, m.block);
    ensure!(
        m.scales.len() == sr * sc,
        "FP8 tensor \"{what}\": {} scales, expected {}",
        m.scales.len(),
        sr * sc
    );
    if let Some(i) = m.scales.iter().position(|s| !s.is_finite()) {
        bail!("FP8 tensor \"{what}\": scale {i} is not finite ({})", m.scales[i]);
    }
    let ty = target_type(cols);
    let rb = ty
        .row_bytes(cols)
        .ok_or_else(|| Error::new(format!("FP8 tensor \"{what}\": bad row length {cols}")))?;
    // Bounded by the file: rb ≤ 2 · cols (BF16), so at most twice the FP8 bytes.
    let total = rows
        .checked_mul(rb)
        .ok_or_else(|| Error::new(format!("FP8 tensor \"{what}\" is too large")))?;
    let mut out = vec![0u8; total];
    // Rows are independent: large matrices are converted on several threads (a
    // DeepSeek-V3 expert or attention matrix is millions of values), each with one f32
    // row of its own.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // At least 64 Ki values a thread: small matrices stay on this one.
    let per = rows.div_ceil(threads).max((1 << 16) / cols).max(1);
    let convert_rows = |first: usize, dst: &mut [u8]| -> Result<()> {
        let mut row = vec![0f32; cols];
        for (i, dst) in dst.chunks_exact_mut(rb).enumerate() {
            let r = first + i;
            let src = &m.codes[r * cols..(r + 1) * cols];
            let srow = &m.scales[(r / m.block[0]) * sc..(r / m.block[0] + 1) * sc];
            for (c, (x, &code)) in row.iter_mut().zip(src).enumerate() {
                *x = e4m3_to_f32(code) * srow[c / m.block[1]];
            }
            if let Some(c) = row.iter().position(|x| !x.is_finite()) {
                bail!(
                    "FP8 tensor \"{what}\": element [{r}, {c}] is not finite (code 0x{:02X}, scale {})",
                    src[c],
                    srow[c / m.block[1]]
                );
            }
            quantize_row(ty, &row, dst).map_err(|e| Error::new(format!("FP8 tensor \"{what}\": {e}")))?;
        }
        Ok(())
    };
    if per >= rows {
        convert_rows(0, &mut out)?;
    } else {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = out
                .chunks_mut(per * rb)
                .enumerate()
                .map(|(k, dst)| {
                    let f = &convert_rows;
                    s.spawn(move || f(k * per, dst))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        // The first error in row order.
        results.into_iter().collect::<Result<Vec<()>>>()?;
    }
    Ok((ty, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an E4M3 code computed from the format's definition in f64,
    /// independently of the bit construction above.
    fn reference(code: u8) -> f64 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            s * (m / 8.0) * 2f64.powi(-6)
        } else {
            s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    #[test]
    fn e4m3_table_matches_definition_for_all_256_codes() {
        for code in 0..=255u8 {
            let got = e4m3_to_f32(code);
            let want = reference(code);
            if want.is_nan() {
                assert!(got.is_nan(), "code 0x{code:02X}: {got}");
            } else {
                assert_eq!(got as f64, want, "code 0x{code:02X}");
                assert_eq!(got.is_sign_negative(), code & 0x80 != 0, "code 0x{code:02X} sign");
            }
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert!((0..=255u8).all(|c| e4m3_to_f32(c).is_finite() || c & 0x7F == 0x7F));
    }

    /// A matrix large enough to be split over threads gives the bytes of one row at a
    /// time.
    #[test]
    fn convert_on_threads_equals_row_by_row() {
        let (rows, cols) = (1000, 256);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) >> 7) as u8 & 0x7E)
            .collect();
        let block = [128, 128];
        let [sr, sc] = scale_shape(rows, cols, block);
        let scales: Vec<f32> = (0..sr * sc).map(|i| 0.001 * (i + 1) as f32).collect();
        let m = Fp8Matrix {
            codes: &codes,
            shape: &[rows, cols],
            scales: &scales,
            scale_shape: &[sr, sc],
            block,
        };
        let (ty, got) = convert("w", &m).unwrap();
        let rb = ty.row_bytes(cols).unwrap();
        for r in 0..rows {
            let row: Vec<f32> = (0..cols)
                .map(|c| e4m3_to_f32(codes[r * cols + c]) * scales[(r / 128) * sc + c / 128])
                .collect();
            let mut want = vec![0u8; rb];
            quantize_row(ty, &row, &mut want).unwrap();
            assert_eq!(&got[r * rb..(r + 1) * rb], &want[..], "row {r}");
        }
        // A NaN code in a later chunk is still reported.
        let mut bad = codes.clone();
        bad[999 * cols + 3] = 0xFF;
        let e = convert("w", &Fp8Matrix { codes: &bad, ..m }).unwrap_err().to_string();
        assert!(e.contains("[999, 3]"), "{e}");
    }

    /// Codes and scales for a stacked `[experts, rows, cols]` tensor at `block`: every
    /// expert's values and scales differ, so a slice converted with another expert's
    /// codes or scales gives other bytes.
    fn stacked(experts: usize, rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>, [usize; 3]) {
        let codes: Vec<u8> = (0..experts * rows * cols)
            .map(|i| ((i * 2654435761usize) >> 9) as u8 & 0x7E)
            .collect();
        let [sr, sc] = scale_shape(rows, cols, block);
        let scales: Vec<f32> = (0..experts * sr * sc).map(|i| 0.0005 * (i + 3) as f32).collect();
        (codes, scales, [experts, sr, sc])
    }

    /// A stacked tensor converts to each expert's slice converted on its own, in order:
    /// uneven blocks (partial at the edges) and Q8_0 rows; BF16 rows.
    #[test]
    fn convert_stacked_equals_each_expert_converted() {
        for (experts, rows, cols, block, want_ty) in [
            (5, 40, 96, [16, 48], WeightType::Q8_0),
            (3, 64, 16, [128, 128], WeightType::BF16),
            (1, 33, 64, [32, 32], WeightType::Q8_0),
        ] {
            let (codes, scales, sshape) = stacked(experts, rows, cols, block);
            let m = Fp8Matrix {
                codes: &codes,
                shape: &[experts, rows, cols],
                scales: &scales,
                scale_shape: &sshape,
                block,
            };
            let (ty, got) = convert_stacked("w", &m).unwrap();
            assert_eq!(ty, want_ty);
            let per = ty.row_bytes(cols).unwrap() * rows;
            assert_eq!(got.len(), experts * per);
            let (nc, ns) = (rows * cols, sshape[1] * sshape[2]);
            for e in 0..experts {
                let slice = Fp8Matrix {
                    codes: &codes[e * nc..(e + 1) * nc],
                    shape: &[rows, cols],
                    scales: &scales[e * ns..(e + 1) * ns],
                    scale_shape: &sshape[1..],
                    block,
                };
                let (ty2, want) = convert("w", &slice).unwrap();
                assert_eq!(ty2, ty);
                assert_eq!(&got[e * per..(e + 1) * per], &want[..], "expert {e} of {experts}");
            }
        }
    }

    #[test]
    fn convert_stacked_checks_shapes_and_values() {
        let block = [16, 48];
        let (codes, scales, sshape) = stacked(4, 40, 96, block);
        assert_eq!(sshape, [4, 3, 2]);
        let ok = Fp8Matrix {
            codes: &codes,
            shape: &[4, 40, 96],
            scales: &scales,
            scale_shape: &sshape,
            block,
        };
        let err = |m: &Fp8Matrix| {
            let e = convert_stacked("experts.gate_up_proj", m).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        let has = |e: &str, parts: &[&str]| {
            for p in parts {
                assert!(e.contains(p), "{e:?} lacks {p:?}");
            }
        };
        // Scales for a different number of experts.
        let e = err(&Fp8Matrix {
            scale_shape: &[3, 3, 2],
            scales: &scales[..18],
            ..ok
        });
        has(&e, &["experts.gate_up_proj", "4 experts", "[3, 3, 2]"]);
        // The wrong block grid per expert (the total is right).
        let e = err(&Fp8Matrix {
            scale_shape: &[4, 2, 3],
            ..ok
        });
        has(&e, &["[4, 3, 2]", "[4, 2, 3]", "16×48"]);
        // One 2-D grid for all experts.
        let e = err(&Fp8Matrix {
            scale_shape: &[3, 2],
            scales: &scales[..6],
            ..ok
        });
        has(&e, &["[4, 3, 2]", "2-dimensional", "[3, 2]"]);
        // A weight that is not 3-D, empty, or whose bytes or scales do not fit the shape.
        let e = err(&Fp8Matrix {
            shape: &[160, 96],
            ..ok
        });
        has(&e, &["[160, 96]", "3 dimensions"]);
        let e = err(&Fp8Matrix {
            shape: &[0, 40, 96],
            scale_shape: &[0, 3, 2],
            ..ok
        });
        has(&e, &["empty shape"]);
        let e = err(&Fp8Matrix {
            codes: &codes[..codes.len() - 1],
            ..ok
        });
        has(&e, &["holds 15359 bytes", "needs 15360"]);
        let e = err(&Fp8Matrix {
            scales: &scales[..23],
            ..ok
        });
        has(&e, &["23 scales, expected 24"]);
        // Shapes whose product overflows are refused before anything is allocated.
        let e = err(&Fp8Matrix {
            shape: &[usize::MAX / 2, 40, 96],
            scale_shape: &[usize::MAX / 2, 3, 2],
            ..ok
        });
        has(&e, &["too large"]);
        // A bad value names its expert, and its row and column within that expert.
        let mut bad = codes.clone();
        bad[2 * 40 * 96 + 5 * 96 + 7] = 0x7F;
        let e = err(&Fp8Matrix { codes: &bad, ..ok });
        has(&e, &["experts.gate_up_proj[2]", "[5, 7]", "not finite"]);
        let mut inf = scales.clone();
        inf[3 * 6 + 1] = f32::INFINITY;
        let e = err(&Fp8Matrix { scales: &inf, ..ok });
        has(&e, &["experts.gate_up_proj[3]", "scale 1 is not finite"]);
    }

    #[test]
    fn convert_checks_shapes_and_values() {
        let codes = vec![0x38u8; 3 * 64];
        let ok = Fp8Matrix {
            codes: &codes,
            shape: &[3, 64],
            scales: &[0.5],
            scale_shape: &[1, 1],
            block: [128, 128],
        };
        let (ty, bytes) = convert("w", &ok).unwrap();
        assert_eq!(ty, WeightType::Q8_0);
        let mut row = vec![0f32; 64];
        ffai_kernels::quant::dequantize_row(ty, &bytes[..ty.row_bytes(64).unwrap()], &mut row);
        // Within Q8_0's f16 scale rounding.
        assert!(row.iter().all(|&x| (x - 0.5).abs() < 1e-4), "{row:?}");
        let bad = Fp8Matrix {
            scale_shape: &[1, 2],
            scales: &[1.0, 1.0],
            ..ok
        };
        let e = convert("w", &bad).unwrap_err().to_string();
        assert!(e.contains("[1, 1]") && e.contains("[1, 2]"), "{e}");
        let nan = vec![0x7Fu8; 64];
        let e = convert(
            "w",
            &Fp8Matrix {
                codes: &nan,
                shape: &[1, 64],
                ..ok
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not finite"), "{e}");
        // Rows that are not whole Q8_0 blocks become BF16.
        let odd = vec![0x38u8; 2 * 40];
        let (ty, _) = convert(
            "w",
            &Fp8Matrix {
                codes: &odd,
                shape: &[2, 40],
                ..ok
            },
        )
        .unwrap();
        assert_eq!(ty, WeightType::BF16);
    }
}
