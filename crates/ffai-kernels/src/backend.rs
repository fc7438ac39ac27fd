//! The backend seam. Model code holds `B::Mat` weights and `B::Buf` activations and
//! calls these ops; the CPU backend implements them now, a CUDA backend later.
//!
//! Conventions: activations are row-major `[n_tokens, width]` f32; a weight matrix is
//! `[rows, cols]` (out x in, the Hugging Face orientation) in any `WeightType`; the KV
//! cache of one layer is `[kv_heads, max_seq, head_dim]` so each head's history is
//! contiguous.

use std::ops::Range;
use std::sync::Arc;

use crate::quant::WeightType;

/// Bytes owned by something shared (a memory map, a Vec), viewed as a sub-range.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl HostBytes {
    /// Panics if the range lies outside the owner; callers validate offsets first.
    pub fn new<T: AsRef<[u8]> + Send + Sync + 'static>(owner: Arc<T>, start: usize, len: usize) -> HostBytes {
        let total = (*owner).as_ref().len();
        assert!(start <= total && len <= total - start, "HostBytes range out of bounds");
        HostBytes { owner, start, len }
    }

    pub fn from_vec(v: Vec<u8>) -> HostBytes {
        let len = v.len();
        HostBytes {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    /// A sub-range of these bytes (panics when out of range; callers check sizes).
    pub fn slice(&self, start: usize, len: usize) -> HostBytes {
        assert!(
            start <= self.len && len <= self.len - start,
            "HostBytes slice out of bounds"
        );
        HostBytes {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Rotary embedding parameters for one layer kind: the per-pair inverse frequencies
/// (with any scaling folded in) and the pairing.
pub struct RopeParams<'a, B: Backend + ?Sized> {
    pub inv_freq: &'a B::Buf,
    pub neox: bool,
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rows in this layer's cache. Position p lives in row `p % cap`: a global layer has
    /// one row per position of the context; a sliding-window layer only
    /// `window + chunk` rows (a ring buffer), so its memory follows the window.
    pub cap: usize,
    /// 0 = full causal attention; otherwise each query sees the last `window` positions.
    pub window: usize,
    pub scale: f32,
    /// 0 = off; else attention scores are soft-capped: `c * tanh(s / c)`.
    pub softcap: f32,
}

/// Most query heads per KV head an attention kernel handles: it keeps a group's softmax
/// statistics (2 floats a head) in a fixed array of 128.
pub const MAX_GQA_GROUP: usize = 64;

pub trait Backend: Send + Sync + 'static {
    type Buf: Send + Sync;
    type Mat: Send + Sync;
    /// One layer's K or V cache (half precision on CPU: half the memory traffic of f32).
    type Kv: Send + Sync;

    fn name(&self) -> String;

    // --- memory ---
    /// Bytes this backend can give to activations and KV caches (CPU: the machine's
    /// physical memory). Callers refuse a state larger than this before allocating it.
    fn memory_bytes(&self) -> u64;
    /// Bytes per element of a KV cache (2 for f16, 4 for f32).
    fn kv_elem_bytes(&self) -> usize;
    fn matrix(&self, ty: WeightType, rows: usize, cols: usize, data: HostBytes) -> Self::Mat;
    fn mat_shape(&self, m: &Self::Mat) -> (usize, usize);
    fn mat_type(&self, m: &Self::Mat) -> WeightType;
    /// A zeroed buffer of `len` f32.
    fn alloc(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// A zeroed KV cache of `len` elements.
    fn alloc_kv(&self, len: usize) -> Self::Kv;
    /// Copies `buf[range]` to the host.
    fn download(&self, buf: &Self::Buf, range: Range<usize>, out: &mut [f32]);
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize);

    // --- ops; `n` is the number of token rows ---
    /// `out[t] = table[ids[t]]` dequantized.
    fn embed(&self, table: &Self::Mat, ids: &[u32], out: &mut Self::Buf);
    /// `out[n, rows] = x[n, cols] · Wᵀ`.
    fn matmul(&self, w: &Self::Mat, x: &Self::Buf, n: usize, out: &mut Self::Buf);
    /// Several products over the same input in one dispatch (q/k/v, gate/up):
    /// `outs[i] = x · ws[i]ᵀ`; the input is prepared (e.g. quantized) once.
    fn matmuls(&self, ws: &[&Self::Mat], x: &Self::Buf, n: usize, outs: &mut [&mut Self::Buf]);
    /// `x[t] += bias` for each of the n rows.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, n: usize);
    /// RMSNorm of `n` rows of width `w.len()` (rows can be whole tokens or single heads).
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, n: usize, out: &mut Self::Buf);
    /// LayerNorm with bias of `n` rows of width `w.len()`.
    fn layer_norm(&self, x: &Self::Buf, w: &Self::Buf, b: &Self::Buf, eps: f32, n: usize, out: &mut Self::Buf);
    /// `x = gelu_tanh(x)` over the first `len` elements.
    fn gelu(&self, x: &mut Self::Buf, len: usize);
    /// `x *= s` over the first `len` elements.
    fn scale(&self, x: &mut Self::Buf, s: f32, len: usize);
    /// `x += alpha * y` over the first `len` elements.
    fn add_scaled(&self, x: &mut Self::Buf, y: &Self::Buf, alpha: f32, len: usize);
    /// `x = cap * tanh(x / cap)` over the first `len` elements.
    fn softcap(&self, x: &mut Self::Buf, cap: f32, len: usize);
    /// RoPE on `[n, n_heads * head_dim]`, token t at position `pos0 + t`.
    fn rope(
        &self,
        x: &mut Self::Buf,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        pos0: usize,
        rope: &RopeParams<'_, Self>,
    );
    /// `gate = silu(gate) * up` over the first `len` elements.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// `gate = gelu_tanh(gate) * up` over the first `len` elements.
    fn gelu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// `x += y` over the first `len` elements.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// Writes `n` tokens of K (or V), `[n, kv_heads * head_dim]`, into the cache at `pos0`.
    fn kv_write(&self, cache: &mut Self::Kv, src: &Self::Buf, n: usize, pos0: usize, shape: &AttnShape);
    /// Causal attention of `n` queries at positions `pos0..pos0+n` over the cache
    /// (which already holds them); `out` is `[n, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Kv,
        v: &Self::Kv,
        n: usize,
        pos0: usize,
        shape: &AttnShape,
        out: &mut Self::Buf,
    );
    /// Index of the largest of `buf[range]` (ties: lowest index).
    fn argmax(&self, buf: &Self::Buf, range: Range<usize>) -> u32;
}
