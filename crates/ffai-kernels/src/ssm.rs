//! Plain kernels of the recurrent mixers (state-space and short-convolution layers): a
//! causal depthwise convolution that carries its last inputs across steps, the Mamba 2
//! selective scan (one-step recurrence and the chunked "SSD" form), and the gated
//! RMSNorm. One sequence's rows at a time; the backends split the work over sequences,
//! channels and heads and read where each sequence's state lives from the step.
//!
//! A sequence whose first row is at position 0 starts from a zero state (whatever its
//! slot held): a new or recomputed sequence needs no separate reset.

use crate::ops;

/// Longest convolution kernel the backends take (the CUDA kernel keeps a row's window
/// in registers). Released models use 3 (LFM2) or 4 (Mamba 2).
pub const MAX_CONV_KERNEL: usize = 8;

/// Shape of a Mamba 2 scan. A row of its input is `[x (heads * head_dim) | B (groups *
/// state) | C (groups * state)]` (the convolution's output); head `h` reads group
/// `h / (heads / groups)` of B and C. A slot of its state is `[heads][head_dim][state]`.
#[derive(Clone, Copy, Debug)]
pub struct SsmShape {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    /// Rows of the chunked form: a sequence's rows are cut at absolute positions that are
    /// multiples of `chunk` (and at the step's own ends); a piece of one row runs the
    /// one-step recurrence, longer pieces the chunked form.
    pub chunk: usize,
    /// `dt` is clamped to `dt_min..=dt_max` after the softplus.
    pub dt_min: f32,
    pub dt_max: f32,
}

impl SsmShape {
    /// Width of one input row (x, B and C).
    pub fn row_width(&self) -> usize {
        self.heads * self.head_dim + 2 * self.groups * self.state
    }

    /// Floats of one sequence's state.
    pub fn slot_len(&self) -> usize {
        self.heads * self.head_dim * self.state
    }
}

/// torch's softplus (`beta = 1`, `threshold = 20`): `x` above 20, else `ln(1 + e^x)`.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Causal depthwise convolution of one sequence's `n` rows over channels `c0..c1` (of
/// `channels` per row), the first row at position `p0`:
/// `out[i][c] = bias[c] + sum_j w[j][c] * in(p0 + i - (kernel - 1) + j)[c]`, where
/// `in(q)` is row `q - p0` of `x` for `q >= p0` and the state's row
/// `(kernel - 1) - (p0 - q)` before (zero when `p0 == 0`). `w` is `[kernel][channels]`
/// (tap `kernel - 1` multiplies the current row). Then `state` (`[kernel - 1][channels]`)
/// holds the inputs at the `kernel - 1` positions before `p0 + n`. The taps are summed in
/// order for every row, so a row's result does not depend on how the sequence was cut
/// into steps. `silu`: apply SiLU to the outputs. `x` and `out` are `[n][channels]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_seq(
    x: &[f32],
    n: usize,
    channels: usize,
    kernel: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    silu: bool,
    p0: usize,
    c0: usize,
    c1: usize,
    state: &mut [f32],
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let k1 = kernel - 1;
    let fresh = p0 == 0;
    let width = c1 - c0;
    // in(q) for q in p0 - k1 .. p0 + n, as a row slice.
    let input = |q: isize| -> Option<&[f32]> {
        if q >= p0 as isize {
            let r = (q - p0 as isize) as usize;
            Some(&x[r * channels + c0..r * channels + c1])
        } else if fresh || q < 0 {
            None
        } else {
            let r = k1 - (p0 - q as usize);
            Some(&state[r * channels + c0..r * channels + c1])
        }
    };
    for i in 0..n {
        let o = &mut out[i * channels + c0..i * channels + c1];
        match bias {
            Some(b) => o.copy_from_slice(&b[c0..c1]),
            None => o.fill(0.0),
        }
        for j in 0..kernel {
            let q = (p0 + i) as isize - k1 as isize + j as isize;
            if let Some(src) = input(q) {
                let wj = &w[j * channels + c0..j * channels + c1];
                for ((o, &a), &b) in o.iter_mut().zip(src).zip(wj) {
                    *o += a * b;
                }
            }
        }
        if silu {
            o.iter_mut().for_each(|v| *v = ops::silu(*v));
        }
    }
    // The new state: inputs at p0 + n - k1 .. p0 + n, gathered before any is overwritten.
    let next = &mut scratch[..k1 * width];
    for r in 0..k1 {
        let q = (p0 + n) as isize - k1 as isize + r as isize;
        let dst = &mut next[r * width..(r + 1) * width];
        match input(q) {
            Some(src) => dst.copy_from_slice(src),
            None => dst.fill(0.0),
        }
    }
    for r in 0..k1 {
        state[r * channels + c0..r * channels + c1].copy_from_slice(&next[r * width..(r + 1) * width]);
    }
}

/// Per-head parameters of a scan: `a = -exp(A_log)`, `d` (the skip), `dt_bias`.
pub struct SsmParams<'a> {
    pub a: &'a [f32],
    pub d: &'a [f32],
    pub dt_bias: &'a [f32],
}

/// Scratch floats [`scan_head`] needs for a shape.
pub fn scan_scratch(_s: &SsmShape) -> usize {
    0
}

/// The Mamba 2 scan of one head `h` over one sequence's `n` rows (first at position `p0`):
/// per row, `dt = clamp(softplus(dt_raw + dt_bias))`, `S = exp(dt * a) S + dt x Bᵀ`,
/// `y = S C + d x`. `xbc` rows are `[x | B | C]` (see [`SsmShape`]), `dt_raw` rows are
/// `heads` wide, `state` is this head's `[head_dim][state]`, and `out` is this head's
/// `[n][head_dim]`.
///
/// Every row takes the one-step recurrence, prefill included. On a CPU it is the cheaper
/// form: the head's state (`head_dim · state` floats, 32 KB for Mamba2-370m) stays in L1
/// across the rows, and a row costs `3 · head_dim · state` flops, where the chunked (SSD)
/// form costs about `chunk · (head_dim + state)` more per row (`C_t·B_s` and the decayed
/// sum over the earlier rows of the chunk) and an `exp` per pair of rows; the chunked form
/// pays off where matrix units do its products (the GPU kernel). Each row's arithmetic is
/// fixed (lane-wise sums in a fixed order), so results do not depend on how rows are cut.
#[allow(clippy::too_many_arguments)]
pub fn scan_head(
    xbc: &[f32],
    dt_raw: &[f32],
    n: usize,
    p0: usize,
    h: usize,
    shape: &SsmShape,
    p: &SsmParams<'_>,
    state: &mut [f32],
    out: &mut [f32],
    _scratch: &mut [f32],
) {
    let (hd, ns, heads) = (shape.head_dim, shape.state, shape.heads);
    let width = shape.row_width();
    let g = h / (heads / shape.groups);
    let xo = h * hd;
    let bo = heads * hd + g * ns;
    let co = heads * hd + shape.groups * ns + g * ns;
    let (a, d) = (p.a[h], p.d[h]);
    if p0 == 0 {
        state.fill(0.0);
    }
    for i in 0..n {
        let dt = softplus(dt_raw[i * heads + h] + p.dt_bias[h]).clamp(shape.dt_min, shape.dt_max);
        let decay = (dt * a).exp();
        let row = &xbc[i * width..(i + 1) * width];
        let (x, b, c) = (&row[xo..xo + hd], &row[bo..bo + ns], &row[co..co + ns]);
        let o = &mut out[i * hd..(i + 1) * hd];
        for (e, s) in state.chunks_exact_mut(ns).enumerate() {
            o[e] = scan_row(s, b, c, decay, dt * x[e]) + d * x[e];
        }
    }
}

/// One row of a head's state: `s = decay · s + coef · b`, and `Σ s · c` of the new `s`,
/// summed in 16 lanes (so the compiler vectorises it) folded in a fixed order.
#[inline]
fn scan_row(s: &mut [f32], b: &[f32], c: &[f32], decay: f32, coef: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let full = s.len() / L * L;
    for ((sl, bl), cl) in s[..full]
        .chunks_exact_mut(L)
        .zip(b[..full].chunks_exact(L))
        .zip(c[..full].chunks_exact(L))
    {
        for j in 0..L {
            let v = sl[j] * decay + coef * bl[j];
            sl[j] = v;
            acc[j] += v * cl[j];
        }
    }
    let mut y = 0f32;
    for v in acc {
        y += v;
    }
    for j in full..s.len() {
        let v = s[j] * decay + coef * b[j];
        s[j] = v;
        y += v * c[j];
    }
    y
}

/// Gated RMSNorm of one row in place, per group of `group` elements. Gate first (Mamba
/// 2's norm: transformers normalises the whole row, mamba_ssm and llama.cpp each of
/// `n_groups` groups): `y = x * silu(z)`, then `w * y / sqrt(mean(y^2) + eps)`. Norm first
/// (`norm_first`, Qwen3-Next's DeltaNet, per head): `w * x / sqrt(mean(x^2) + eps) * silu(z)`.
pub fn rms_norm_gated(x: &mut [f32], z: &[f32], w: &[f32], eps: f32, group: usize, norm_first: bool) {
    if !norm_first {
        for (v, &g) in x.iter_mut().zip(z) {
            *v *= ops::silu(g);
        }
    }
    for ((xs, ws), zs) in x
        .chunks_exact_mut(group)
        .zip(w.chunks_exact(group))
        .zip(z.chunks_exact(group))
    {
        let ss: f32 = xs.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / group as f32 + eps).sqrt();
        if norm_first {
            for ((v, &wv), &g) in xs.iter_mut().zip(ws).zip(zs) {
                *v = wv * (*v * inv) * ops::silu(g);
            }
        } else {
            for (v, &wv) in xs.iter_mut().zip(ws) {
                *v = *v * inv * wv;
            }
        }
    }
}

/// Shape of a gated DeltaNet (Qwen3-Next's linear attention). A row of its input is
/// `[q (k_heads * k_dim) | k (k_heads * k_dim) | v (v_heads * v_dim)]` (the convolution's
/// output); value head `h` reads key head `h / (v_heads / k_heads)`. A slot of its state
/// is `[v_heads][k_dim][v_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct GdnShape {
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
}

impl GdnShape {
    pub fn row_width(&self) -> usize {
        2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
    }

    pub fn slot_len(&self) -> usize {
        self.v_heads * self.k_dim * self.v_dim
    }
}

/// Longest key head the CUDA kernel takes (it stages q and k in shared memory).
pub const MAX_GDN_KEY_DIM: usize = 256;

/// `1 / (1 + e^-x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Scratch floats [`gdn_head`] needs.
pub fn gdn_scratch(s: &GdnShape) -> usize {
    2 * s.k_dim + s.v_dim
}

/// The gated delta rule of one value head `h` over one sequence's `n` rows (first at
/// position `p0`): per row, `q` and `k` L2-normalised (`x / sqrt(sum x^2 + 1e-6)`), `q`
/// scaled by `k_dim^-1/2`, `beta = sigmoid(b)`, `g = a_neg * softplus(a + dt_bias)`, then
/// `S = e^g S`, `S += k (beta (v - Sᵀk))ᵀ`, `y = Sᵀq`. `qkv` rows as [`GdnShape`] says, `b`
/// and `a` rows `v_heads` wide, `state` this head's `[k_dim][v_dim]`, `out` its
/// `[n][v_dim]`. Every row runs the same recurrence in order, so the result does not
/// depend on how the sequence is cut into steps.
#[allow(clippy::too_many_arguments)]
pub fn gdn_head(
    qkv: &[f32],
    b: &[f32],
    a: &[f32],
    n: usize,
    p0: usize,
    h: usize,
    shape: &GdnShape,
    a_neg: f32,
    dt_bias: f32,
    state: &mut [f32],
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (dk, dv, vh) = (shape.k_dim, shape.v_dim, shape.v_heads);
    let width = shape.row_width();
    let kh = h / (vh / shape.k_heads);
    let (qo, ko, vo) = (kh * dk, shape.k_heads * dk + kh * dk, 2 * shape.k_heads * dk + h * dv);
    if p0 == 0 {
        state.fill(0.0);
    }
    let (qn, rest) = scratch.split_at_mut(dk);
    let (kn, rest) = rest.split_at_mut(dk);
    let delta = &mut rest[..dv];
    let scale = 1.0 / (dk as f32).sqrt();
    for t in 0..n {
        let row = &qkv[t * width..(t + 1) * width];
        let (q, k, v) = (&row[qo..qo + dk], &row[ko..ko + dk], &row[vo..vo + dv]);
        let iq = 1.0 / (q.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
        let ik = 1.0 / (k.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
        for i in 0..dk {
            qn[i] = q[i] * iq * scale;
            kn[i] = k[i] * ik;
        }
        let beta = sigmoid(b[t * vh + h]);
        let decay = (a_neg * softplus(a[t * vh + h] + dt_bias)).exp();
        // kv_mem = Sᵀk after the decay, then delta = beta (v - kv_mem).
        delta.fill(0.0);
        for (i, srow) in state.chunks_exact_mut(dv).enumerate() {
            for (d, sv) in delta.iter_mut().zip(srow.iter_mut()) {
                *sv *= decay;
                *d += *sv * kn[i];
            }
        }
        for (d, &vv) in delta.iter_mut().zip(v) {
            *d = (vv - *d) * beta;
        }
        let o = &mut out[t * dv..(t + 1) * dv];
        o.fill(0.0);
        for (i, srow) in state.chunks_exact_mut(dv).enumerate() {
            for ((sv, &d), ov) in srow.iter_mut().zip(delta.iter()).zip(o.iter_mut()) {
                *sv += kn[i] * d;
                *ov += *sv * qn[i];
            }
        }
    }
}
