// The step ops of the CUDA backend over a paged KV cache: RoPE at per-row positions, K/V
// writes to per-row slots, and attention of each row over its own sequence's blocks.
// Header-free (see elementwise.cu). The step metadata (positions, slots, sequences, block
// tables, the row -> sequence map) lives in device buffers written once per step.
//
// Pools are f16, laid out [block][kv_head][offset][head_dim] (as the CPU's).

#define NO_SLOT 0xffffffffu
// Positions one attention block covers: a row's positions are cut at multiples of SPAN,
// so how a row's work is split depends on its own position alone (batch invariance).
#define SPAN 256
#define MAX_HD_PER_LANE 8

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// grid.x = rows; x is [n, n_heads * head_dim]; `half` pairs rotated per head.
extern "C" __global__ void rope_step(float* x, const unsigned int* positions, const float* inv_freq,
                                     unsigned int half, unsigned int n_heads, unsigned int head_dim, int neox) {
    unsigned int row = blockIdx.x;
    float pos = (float)positions[row];
    float* xr = x + (size_t)row * n_heads * head_dim;
    for (unsigned int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        unsigned int h = idx / half, i = idx % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        unsigned int a = neox ? i : 2 * i;
        unsigned int b = neox ? i + half : 2 * i + 1;
        float* head = xr + h * head_dim;
        float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
}

// grid.x = rows: row t's K (or V), [kv_heads * head_dim] f32, to its slot (none: padding).
extern "C" __global__ void kv_write_step(unsigned short* pages, const float* src, const unsigned int* slots,
                                         unsigned int kv_heads, unsigned int head_dim, unsigned int block_size) {
    unsigned int row = blockIdx.x;
    unsigned int slot = slots[row];
    if (slot == NO_SLOT) {
        return;
    }
    unsigned int blk = slot / block_size, off = slot % block_size;
    unsigned int width = kv_heads * head_dim;
    for (unsigned int idx = threadIdx.x; idx < width; idx += blockDim.x) {
        unsigned int h = idx / head_dim, d = idx % head_dim;
        size_t dst = (((size_t)blk * kv_heads + h) * block_size + off) * head_dim + d;
        pages[dst] = float_to_half(src[(size_t)row * width + idx]);
    }
}

struct SeqRows {
    unsigned int first_row, n_rows, table_start, table_len;
};

// The positions a row at `p` sees: [lo, p].
__device__ __forceinline__ unsigned int first_visible(unsigned int p, unsigned int window) {
    return (window == 0 || p + 1 < window) ? 0u : p + 1 - window;
}

// One block (4 warps) per (row, query head, span): the span's part of the row's attention,
// unnormalised, with its running max and sum, into part_o / part_ml at
// [(row - row0) * n_heads + head][j]. Span j of a row is the j-th multiple of SPAN at or
// after its first visible position; blocks past the row's last span write an empty part.
// Rows belonging to no sequence (padding) write empty parts.
extern "C" __global__ void attn_spans(const float* q, const unsigned short* k_pages, const unsigned short* v_pages,
                                      const unsigned int* positions, const unsigned int* row_seq,
                                      const SeqRows* seqs, const unsigned int* tables, unsigned int row0,
                                      unsigned int n_heads, unsigned int kv_heads, unsigned int head_dim,
                                      unsigned int block_size, unsigned int window, float scale, float softcap,
                                      unsigned int max_spans, float* part_o, float* part_ml) {
    __shared__ float w_m[4], w_l[4];
    __shared__ float w_o[4][MAX_HD_PER_LANE * 32];
    unsigned int row = row0 + blockIdx.x, head = blockIdx.y, j = blockIdx.z;
    unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    size_t part = ((size_t)blockIdx.x * n_heads + head) * max_spans + j;
    float* po = part_o + part * head_dim;
    unsigned int seq = row_seq[row];
    unsigned int lo = 0, hi = 0;  // positions [lo, hi) of this span
    SeqRows s;
    if (seq != NO_SLOT) {
        s = seqs[seq];
        unsigned int p = positions[row];
        unsigned int first = first_visible(p, window);
        unsigned int k = first / SPAN + j;
        lo = max(first, k * SPAN);
        hi = min(p + 1, (k + 1) * SPAN);
    }
    if (lo >= hi) {
        if (threadIdx.x == 0) {
            part_ml[part * 2] = -__int_as_float(0x7f800000);
            part_ml[part * 2 + 1] = 0.0f;
        }
        for (unsigned int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            po[d] = 0.0f;
        }
        return;
    }
    unsigned int kvh = head / (n_heads / kv_heads);
    const float* qr = q + ((size_t)row * n_heads + head) * head_dim;
    float qv[MAX_HD_PER_LANE], acc[MAX_HD_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        unsigned int d = lane + 32 * i;
        qv[i] = d < head_dim ? qr[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (unsigned int pos = lo + warp; pos < hi; pos += 4) {
        unsigned int blk = tables[s.table_start + pos / block_size];
        size_t base = (((size_t)blk * kv_heads + kvh) * block_size + pos % block_size) * head_dim;
        const unsigned short* kr = k_pages + base;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            unsigned int d = lane + 32 * i;
            if (d < head_dim) {
                dot += qv[i] * half_to_float(kr[d]);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            dot += __shfl_xor_sync(0xffffffffu, dot, o);
        }
        float sc = dot * scale;
        if (softcap > 0.0f) {
            sc = softcap * tanhf(sc / softcap);
        }
        float mn = fmaxf(m, sc);
        float a = expf(m - mn), b = expf(sc - mn);
        l = l * a + b;
        m = mn;
        const unsigned short* vr = v_pages + base;
#pragma unroll
        for (int i = 0; i < MAX_HD_PER_LANE; i++) {
            unsigned int d = lane + 32 * i;
            if (d < head_dim) {
                acc[i] = acc[i] * a + b * half_to_float(vr[d]);
            }
        }
    }
    // Fold the four warps (a warp with no position has m = -inf, l = 0).
    if (lane == 0) {
        w_m[warp] = m;
        w_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        w_o[warp][lane + 32 * i] = acc[i];
    }
    __syncthreads();
    float mx = fmaxf(fmaxf(w_m[0], w_m[1]), fmaxf(w_m[2], w_m[3]));
    float f[4], lt = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        f[w] = w_l[w] > 0.0f ? expf(w_m[w] - mx) : 0.0f;
        lt += w_l[w] * f[w];
    }
    for (unsigned int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        po[d] = w_o[0][d] * f[0] + w_o[1][d] * f[1] + w_o[2][d] * f[2] + w_o[3][d] * f[3];
    }
    if (threadIdx.x == 0) {
        part_ml[part * 2] = mx;
        part_ml[part * 2 + 1] = lt;
    }
}

// One block per (row, head): folds the row's span parts in order and normalises; rows of
// no sequence get zeros. out is [n, n_heads * head_dim].
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml, unsigned int row0,
                                        unsigned int n_heads, unsigned int head_dim, unsigned int max_spans,
                                        float* out) {
    unsigned int row = row0 + blockIdx.x, head = blockIdx.y;
    size_t base = ((size_t)blockIdx.x * n_heads + head) * max_spans;
    float mx = -__int_as_float(0x7f800000);
    for (unsigned int j = 0; j < max_spans; j++) {
        if (part_ml[(base + j) * 2 + 1] > 0.0f) {
            mx = fmaxf(mx, part_ml[(base + j) * 2]);
        }
    }
    float lt = 0.0f;
    for (unsigned int j = 0; j < max_spans; j++) {
        float lj = part_ml[(base + j) * 2 + 1];
        if (lj > 0.0f) {
            lt += lj * expf(part_ml[(base + j) * 2] - mx);
        }
    }
    float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    float* dst = out + ((size_t)row * n_heads + head) * head_dim;
    for (unsigned int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float v = 0.0f;
        for (unsigned int j = 0; j < max_spans; j++) {
            float lj = part_ml[(base + j) * 2 + 1];
            if (lj > 0.0f) {
                v += part_o[(base + j) * head_dim + d] * expf(part_ml[(base + j) * 2] - mx);
            }
        }
        dst[d] = v * inv;
    }
}
