//! Plain single-threaded kernels over slices. Each is the unit the CPU backend
//! parallelises, and each has an oracle test in `tests/ops.rs`.

/// f32 dot product with eight independent accumulators so the compiler vectorises it.
/// (Plain multiply-add, not `mul_add`: without the FMA target feature that is a libm call.)
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out = x / rms(x) * w`, with rms computed in f64-free f32 over the row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot_f32(x, x) / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

/// Rotary position embedding for one token's heads, in place.
///
/// `inv_freq` has one entry per rotated pair (its length times two is the rotated width,
/// so partial rotary works); scaling schemes are folded into it by the caller.
/// `neox` pairs element i with i + rot/2 (Hugging Face's rotate_half); otherwise pairs are
/// adjacent (2i, 2i+1), the layout llama.cpp's Llama conversion produces.
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, pos: usize, inv_freq: &[f32], neox: bool) {
    let half = inv_freq.len();
    for h in 0..n_heads {
        let head = &mut x[h * head_dim..(h + 1) * head_dim];
        for (i, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (what Gemma and GPT-2 style MLPs use).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `gate = silu(gate) * up`, the SwiGLU gate, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `gate = gelu_tanh(gate) * up` (GeGLU), in place.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub fn mul_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a *= b;
    }
}

/// Numerically stable softmax in place.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Index and value of the largest element; ties go to the lowest index, NaN never wins.
pub fn argmax(x: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

/// Attention of one query head over `n_ctx` cached positions of its KV head.
///
/// `k` and `v` are the head's cache rows, contiguous: position p at `p * head_dim`.
/// `scores` is scratch of at least `n_ctx`. Positions before `first` are masked out
/// (sliding window); the caller passes `n_ctx` = last visible position + 1.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
    first: usize,
    n_ctx: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { attend_head_avx2(q, k, v, head_dim, first, n_ctx, scale, scores, out) };
        return;
    }
    attend_head_body(q, k, v, head_dim, first, n_ctx, scale, scores, out)
}

/// True when the CPU has AVX2 and FMA (cached by the standard library) and the
/// portable paths are not forced (tests compare both).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_available() -> bool {
    crate::quant::q8_backend_name() == "avx2" && is_x86_feature_detected!("fma")
}

/// The same code compiled with AVX2 enabled, so the compiler vectorises it 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
    first: usize,
    n_ctx: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_head_body(q, k, v, head_dim, first, n_ctx, scale, scores, out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_head_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    head_dim: usize,
    first: usize,
    n_ctx: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let scores = &mut scores[first..n_ctx];
    for (j, s) in scores.iter_mut().enumerate() {
        let p = first + j;
        *s = dot_f32(q, &k[p * head_dim..(p + 1) * head_dim]) * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (j, &w) in scores.iter().enumerate() {
        let p = first + j;
        let vrow = &v[p * head_dim..(p + 1) * head_dim];
        for (o, &vv) in out.iter_mut().zip(vrow) {
            *o += w * vv;
        }
    }
}
