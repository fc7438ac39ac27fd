// The step ops of the CUDA backend over a paged KV cache: RoPE at per-row positions, K/V
// writes to per-row slots, and attention of each row over its own sequence's blocks.
// Header-free (see elementwise.cu). The step metadata (positions, slots, sequences, block
// tables, the row -> sequence map) lives in device buffers written once per step.
//
// Pools are f16, laid out [block][kv_head][offset][head_dim] (as the CPU's).

#define NO_SLOT 0xffffffffu
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
    PDL_ENTRY();
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
    PDL_ENTRY();
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

// RoPE on a row's q and k, then its k and v to its slot: rope_step twice and
// kv_write_step twice in one launch, the same arithmetic. One block per (row, head):
// blocks y < n_heads rotate query head y; the others rotate KV head y - n_heads and write
// it and its V head to the pools. Each block takes the angles' sines and cosines once
// (a thread per frequency) into shared memory. grid = (rows, n_heads + kv_heads),
// block = ROPE_THREADS; q is [n, n_heads * head_dim], k and v [n, kv_heads * head_dim];
// half <= 128.
//
// With `qn` (and `kn`) not null, each head is first RMS-normalized with those weights
// ([head_dim], head_dim <= ROPE_THREADS): the per-head q/k norm of Qwen3 and others,
// with rms_norm's arithmetic on CUDA (q8x.cu's norm_q8 at this width: thread i holds
// element i, a butterfly a warp, the warps' sums by one more butterfly over the
// norm_q8 block's warps), so the result is the same bits as the two separate launches.
#define ROPE_THREADS 128
__device__ __forceinline__ float rope_warp_sum(float s) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
    }
    return s;
}
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
    rope_kv_write_step(float* q, float* k, const float* v, unsigned short* k_pages, unsigned short* v_pages,
                       const unsigned int* positions, const unsigned int* slots, const float* inv_freq,
                       unsigned int half, unsigned int n_heads, unsigned int kv_heads, unsigned int head_dim,
                       unsigned int block_size, int neox, const float* qn, const float* kn, float eps) {
    PDL_ENTRY();
    __shared__ float sin_t[128], cos_t[128];
    __shared__ float red[ROPE_THREADS / 32];
    const unsigned int row = blockIdx.x, y = blockIdx.y, tid = threadIdx.x;
    const float pos = (float)positions[row];
    for (unsigned int i = tid; i < half; i += ROPE_THREADS) {
        sincosf(pos * inv_freq[i], &sin_t[i], &cos_t[i]);
    }
    const bool is_q = y < n_heads;
    const unsigned int h = is_q ? y : y - n_heads;
    float* head = is_q ? q + ((size_t)row * n_heads + h) * head_dim : k + ((size_t)row * kv_heads + h) * head_dim;
    if (qn) {
        const float* w = is_q ? qn : kn;
        const float x = tid < head_dim ? head[tid] : 0.0f;
        float s = 0.0f;
        if (tid < head_dim) {
            s += x * x;
        }
        s = rope_warp_sum(s);
        if (tid % 32 == 0) {
            red[tid / 32] = s;
        }
        __syncthreads();
        // norm_q8's block for this width: the next power of two of threads, 32 at least.
        unsigned int nt = 32;
        while (nt < head_dim) {
            nt *= 2;
        }
        const unsigned int lane = tid % 32;
        const float total = rope_warp_sum(lane < nt / 32 ? red[lane] : 0.0f);
        const float inv = 1.0f / sqrtf(total / (float)head_dim + eps);
        if (tid < head_dim) {
            head[tid] = x * inv * w[tid];
        }
    }
    __syncthreads();
    for (unsigned int i = tid; i < half; i += ROPE_THREADS) {
        const float s = sin_t[i], c = cos_t[i];
        const unsigned int a = neox ? i : 2 * i;
        const unsigned int b = neox ? i + half : 2 * i + 1;
        const float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
    }
    if (is_q) {
        return;
    }
    const unsigned int slot = slots[row];
    if (slot == NO_SLOT) {
        return;
    }
    __syncthreads();
    const unsigned int blk = slot / block_size, off = slot % block_size;
    const size_t dst = (((size_t)blk * kv_heads + h) * block_size + off) * head_dim;
    const float* vh = v + ((size_t)row * kv_heads + h) * head_dim;
    for (unsigned int d = tid; d < head_dim; d += ROPE_THREADS) {
        k_pages[dst + d] = float_to_half(head[d]);
        v_pages[dst + d] = float_to_half(vh[d]);
    }
}

struct SeqRows {
    unsigned int first_row, n_rows, table_start, table_len;
};

// The positions a row at `p` sees: [lo, p].
__device__ __forceinline__ unsigned int first_visible(unsigned int p, unsigned int window) {
    return (window == 0 || p + 1 < window) ? 0u : p + 1 - window;
}

// Parts whose fold weights the folding block keeps in shared memory (more are recomputed).
#define FOLD_SPANS 128

// Called by every block of attn_spans64 after writing its part: the block that finishes
// the last of the max_spans parts of its (row, KV head and chunk) folds them as
// attn_combine does, with the maximum and the normaliser taken by a warp's lanes over the
// parts (every sum in a fixed order, so the same bits whichever block folds), writes the
// chunk's heads of `out` and resets the counter for the next launch (or graph replay).
// The parts' writes are made visible by a fence before the count; the folding block
// reads them through L2 (__ldcg), never from a stale L1 line.
__device__ __forceinline__ void combine_if_last(unsigned int n_heads, unsigned int head_dim, unsigned int max_spans,
                                                unsigned int h0, unsigned int gn, const float* part_o,
                                                const float* part_ml, unsigned int* __restrict__ done,
                                                const float* __restrict__ sinks, unsigned int has_sinks,
                                                float* __restrict__ out) {
    __shared__ unsigned int last;
    __shared__ float fold_mx[8], fold_inv[8], fold_w[8][FOLD_SPANS];
    const unsigned int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    unsigned int* counter = done + (size_t)blockIdx.x * gridDim.y + blockIdx.y;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(counter, 1u) == max_spans - 1;
    }
    __syncthreads();
    if (!last) {
        return;
    }
    __threadfence();
    const size_t base0 = (size_t)blockIdx.x * n_heads * max_spans;
    // Warp h, head h0 + h: the parts' maximum and normaliser, the lanes taking parts
    // j = lane, lane + 32, ... (independent loads), then butterflies (a fixed order); the
    // first FOLD_SPANS parts' weights exp(m_j - max) kept for the outputs.
    if (warp < gn) {
        const unsigned int head = h0 + warp;
        const size_t base = base0 + (size_t)head * max_spans;
        float mx = -__int_as_float(0x7f800000);
        for (unsigned int j = lane; j < max_spans; j += 32) {
            if (__ldcg(part_ml + (base + j) * 2 + 1) > 0.0f) {
                mx = fmaxf(mx, __ldcg(part_ml + (base + j) * 2));
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        float sink = 0.0f;
        if (has_sinks) {
            sink = sinks[head];
            mx = fmaxf(mx, sink);
        }
        float lt = 0.0f;
        for (unsigned int j = lane; j < max_spans; j += 32) {
            const float lj = __ldcg(part_ml + (base + j) * 2 + 1);
            const float wj = lj > 0.0f ? expf(__ldcg(part_ml + (base + j) * 2) - mx) : 0.0f;
            lt += lj > 0.0f ? lj * wj : 0.0f;
            if (j < FOLD_SPANS) {
                fold_w[warp][j] = wj;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lt += __shfl_xor_sync(0xffffffffu, lt, o);
        }
        if (lane == 0) {
            if (has_sinks) {
                lt += expf(sink - mx);
            }
            fold_mx[warp] = mx;
            fold_inv[warp] = lt > 0.0f ? 1.0f / lt : 0.0f;
        }
    }
    __syncthreads();
    const unsigned int row = blockIdx.x;  // the pass's row; `out` is offset to the pass
    for (unsigned int i = tid; i < gn * head_dim; i += blockDim.x) {
        const unsigned int h = i / head_dim, d = i % head_dim, head = h0 + h;
        const size_t base = base0 + (size_t)head * max_spans;
        float v = 0.0f;
#pragma unroll 8
        for (unsigned int j = 0; j < max_spans; j++) {
            float wj;
            if (j < FOLD_SPANS) {
                wj = fold_w[h][j];
            } else {
                const float lj = __ldcg(part_ml + (base + j) * 2 + 1);
                wj = lj > 0.0f ? expf(__ldcg(part_ml + (base + j) * 2) - fold_mx[h]) : 0.0f;
            }
            if (wj != 0.0f) {
                v += __ldcg(part_o + (base + j) * head_dim + d) * wj;
            }
        }
        out[((size_t)row * n_heads + head) * head_dim + d] = v * fold_inv[h];
    }
    if (tid == 0) {
        *counter = 0;
    }
}

// Query heads of one KV head that one attention block holds (a larger GQA group is
// launched as several chunks of heads; `ATTN_GROUP` in backend.rs).
#define ATTN_GROUP 8
// Threads of an attention block: ATTN_LANES per position of a part of SPAN positions
// (SPAN * ATTN_LANES = ATTN_THREADS) while scoring, one warp per head of the chunk while
// normalising. Two cuts are built (`attn_spans`, `attn_spans64` below).
#define ATTN_THREADS 256

// One block per (row, KV head and chunk of its query heads, span): the span's part of
// the row's attention for each of those heads, unnormalised, with its max and sum, into
// part_o / part_ml at [(row - row0) * n_heads + head][j]. Span j of a row is the j-th
// multiple of SPAN at or after its first visible position; blocks past the row's last
// span, and rows of no sequence (padding), write empty parts.
//
// Scores: the ATTN_LANES threads of position lo + t (adjacent lanes) read its K row once
// between them (lane c takes the 8-element pieces c, c + ATTN_LANES, ... with 16-byte
// loads when the head dimension is a multiple of 8; elements c, c + ATTN_LANES, ...
// otherwise), dot it with every query head of the chunk and add their partial sums by
// shuffles in a fixed order. Softmax: warp h folds head h's scores (max, then exp and
// sum). Values: thread i takes output element i (head, dimension) and sums the weighted V
// rows in position order. The cut into spans and every sum's order depend on the row's
// own position only, so a row's result is the same bits in any batch.
//
// grid = (rows, kv_heads * ceil(group / ATTN_GROUP), max_spans), block = ATTN_THREADS.
#define ATTN_PARAMS                                                                                              \
    const float *__restrict__ q, const unsigned short *__restrict__ k_pages,                                    \
        const unsigned short *__restrict__ v_pages, const unsigned int *__restrict__ positions,                 \
        const unsigned int *__restrict__ row_seq, const SeqRows *__restrict__ seqs,                             \
        const unsigned int *__restrict__ tables, unsigned int row0, unsigned int n_heads, unsigned int kv_heads, \
        unsigned int head_dim, unsigned int block_size, unsigned int window, float scale, float softcap,        \
        unsigned int max_spans, float *__restrict__ part_o, float *__restrict__ part_ml
#define ATTN_ARGS                                                                                               \
    q, k_pages, v_pages, positions, row_seq, seqs, tables, row0, n_heads, kv_heads, head_dim, block_size, window, \
        scale, softcap, max_spans, part_o, part_ml
// The fused combine's extra parameters (attn_spans64): per (row of the pass, KV head and
// chunk) a counter of finished parts (zero between launches: the last part's block
// resets it), the sinks and the output.
#define COMBINE_PARAMS \
    unsigned int *__restrict__ done, const float *__restrict__ sinks, unsigned int has_sinks, float *__restrict__ out
#define COMBINE_ARGS done, sinks, has_sinks, out
template <unsigned int SPAN, unsigned int ATTN_LANES, bool COMBINE, int G = ATTN_GROUP>
__device__ __forceinline__ void attn_part(ATTN_PARAMS, COMBINE_PARAMS) {
    __shared__ float qs[G][MAX_HD_PER_LANE * 32];
    __shared__ float sc[G][SPAN];
    __shared__ unsigned int rows_at[SPAN];
    const unsigned int row = row0 + blockIdx.x, j = blockIdx.z;
    const unsigned int group = n_heads / kv_heads;
    const unsigned int chunks = (group + G - 1) / G;
    const unsigned int kvh = blockIdx.y / chunks;
    const unsigned int h0 = kvh * group + (blockIdx.y % chunks) * G;
    const unsigned int gn = min((unsigned int)G, kvh * group + group - h0);
    const unsigned int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned int seq = row_seq[row];
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
    const size_t part0 = ((size_t)blockIdx.x * n_heads + h0) * max_spans + j;
    // Each position's K/V row (in units of head_dim) within the pools, and those rows
    // asked into L2, before waiting for the kernel before this one: the step's metadata
    // (positions, sequences, block tables) was written before the step's first kernel,
    // and that kernel (RoPE and the K/V write) writes no row these positions read but
    // the newest, whose lines L2 holds coherently. No other read or any write before
    // the wait.
    if (tid < SPAN && lo + tid < hi) {
        const unsigned int pos = lo + tid;
        unsigned int blk = tables[s.table_start + pos / block_size];
        const unsigned int at = (blk * kv_heads + kvh) * block_size + pos % block_size;
        rows_at[tid] = at;
        for (unsigned int off = 0; off < head_dim * 2; off += 128) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)(k_pages + (size_t)at * head_dim) + off));
            asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)(v_pages + (size_t)at * head_dim) + off));
        }
    }
    PDL_ENTRY();
    if (lo >= hi) {
        for (unsigned int i = tid; i < gn * head_dim; i += blockDim.x) {
            unsigned int h = i / head_dim;
            part_o[(part0 + (size_t)h * max_spans) * head_dim + i % head_dim] = 0.0f;
        }
        if (tid < gn) {
            part_ml[(part0 + (size_t)tid * max_spans) * 2] = -__int_as_float(0x7f800000);
            part_ml[(part0 + (size_t)tid * max_spans) * 2 + 1] = 0.0f;
        }
        if (COMBINE) {
            combine_if_last(n_heads, head_dim, max_spans, h0, gn, part_o, part_ml, COMBINE_ARGS);
        }
        return;
    }
    for (unsigned int i = tid; i < gn * head_dim; i += blockDim.x) {
        unsigned int h = i / head_dim, d = i % head_dim;
        qs[h][d] = q[((size_t)row * n_heads + h0 + h) * head_dim + d];
    }
    __syncthreads();
    // Scores: position t = tid / ATTN_LANES, piece c = tid % ATTN_LANES.
    {
        const unsigned int t = tid / ATTN_LANES, c = tid % ATTN_LANES;
        const bool live = lo + t < hi;
        float acc[G];
#pragma unroll
        for (int h = 0; h < G; h++) {
            acc[h] = 0.0f;
        }
        if (live) {
            const unsigned short* kr = k_pages + (size_t)rows_at[t] * head_dim;
            if ((head_dim & 7) == 0) {
                // At most 256 / (8 * ATTN_LANES) pieces a lane: unrolled, so the loads of
                // the K row go out together.
#pragma unroll
                for (unsigned int piece = 0; piece < 256 / (8 * ATTN_LANES); piece++) {
                    const unsigned int d0 = c * 8 + piece * 8 * ATTN_LANES;
                    if (d0 >= head_dim) {
                        break;
                    }
                    const uint4 raw = *(const uint4*)(kr + d0);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const unsigned int word = e < 2 ? raw.x : e < 4 ? raw.y : e < 6 ? raw.z : raw.w;
                        const float kv = half_to_float((unsigned short)(word >> (16 * (e % 2))));
#pragma unroll
                        for (int h = 0; h < G; h++) {
                            if ((unsigned int)h < gn) {
                                acc[h] += qs[h][d0 + e] * kv;
                            }
                        }
                    }
                }
            } else {
                for (unsigned int d = c; d < head_dim; d += ATTN_LANES) {
                    const float kv = half_to_float(kr[d]);
#pragma unroll
                    for (int h = 0; h < G; h++) {
                        if ((unsigned int)h < gn) {
                            acc[h] += qs[h][d] * kv;
                        }
                    }
                }
            }
        }
        // The position's lanes are adjacent within one warp: fold their sums (every lane
        // ends with the same total, added in the same order).
#pragma unroll
        for (int h = 0; h < G; h++) {
#pragma unroll
            for (int o = 1; o < ATTN_LANES; o <<= 1) {
                acc[h] += __shfl_xor_sync(0xffffffffu, acc[h], o);
            }
        }
        if (c == 0) {
#pragma unroll
            for (int h = 0; h < G; h++) {
                if ((unsigned int)h < gn) {
                    float v = -__int_as_float(0x7f800000);
                    if (live) {
                        v = acc[h] * scale;
                        if (softcap > 0.0f) {
                            v = softcap * tanhf(v / softcap);
                        }
                    }
                    sc[h][t] = v;
                }
            }
        }
    }
    __syncthreads();
    // Softmax statistics: warp h, head h.
    if (warp < gn) {
        float m = -__int_as_float(0x7f800000);
        for (unsigned int i = lane; i < SPAN; i += 32) {
            m = fmaxf(m, sc[warp][i]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        }
        float l = 0.0f;
        for (unsigned int i = lane; i < SPAN; i += 32) {
            float e = expf(sc[warp][i] - m);
            sc[warp][i] = e;
            l += e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, o);
        }
        if (lane == 0) {
            part_ml[(part0 + (size_t)warp * max_spans) * 2] = m;
            part_ml[(part0 + (size_t)warp * max_spans) * 2 + 1] = l;
        }
    }
    __syncthreads();
    // Values. With head_dim % 8 == 0: `per` threads cover the chunk's outputs 8 dimensions
    // each (one 16-byte V load per position), and the block's threads form G such groups
    // that take positions t = g, g + G, ...; the groups' sums are then added in group
    // order. Both cuts depend on the span's length and the head shapes only, so a row's
    // result does not depend on its batch. Otherwise one thread per output element.
    const unsigned int n = hi - lo;
    if ((head_dim & 7) == 0) {
        __shared__ float red[ATTN_THREADS * 8];
        const unsigned int per = gn * head_dim / 8;
        const unsigned int groups = ATTN_THREADS / per;
        const unsigned int g = tid / per, i = tid % per;
        if (g < groups) {
            const unsigned int h = (i * 8) / head_dim, d0 = (i * 8) % head_dim;
            float o[8];
#pragma unroll
            for (int e = 0; e < 8; e++) {
                o[e] = 0.0f;
            }
#pragma unroll 8
            for (unsigned int t = g; t < n; t += groups) {
                const uint4 raw = *(const uint4*)(v_pages + (size_t)rows_at[t] * head_dim + d0);
                const float p = sc[h][t];
                const unsigned int wv[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    o[e] += p * half_to_float((unsigned short)(wv[e / 2] >> (16 * (e % 2))));
                }
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                red[tid * 8 + e] = o[e];
            }
        }
        __syncthreads();
        for (unsigned int j = tid; j < gn * head_dim; j += blockDim.x) {
            const unsigned int h = j / head_dim, d = j % head_dim;
            float o = 0.0f;  // output j is element j % 8 of thread j / 8 in each group
            for (unsigned int gg = 0; gg < groups; gg++) {
                o += red[gg * per * 8 + j];
            }
            part_o[(part0 + (size_t)h * max_spans) * head_dim + d] = o;
        }
        if (COMBINE) {
            combine_if_last(n_heads, head_dim, max_spans, h0, gn, part_o, part_ml, COMBINE_ARGS);
        }
        return;
    }
    for (unsigned int i = tid; i < gn * head_dim; i += blockDim.x) {
        unsigned int h = i / head_dim, d = i % head_dim;
        float o = 0.0f;
#pragma unroll 8
        for (unsigned int t = 0; t < n; t++) {
            o += sc[h][t] * half_to_float(v_pages[(size_t)rows_at[t] * head_dim + d]);
        }
        part_o[(part0 + (size_t)h * max_spans) * head_dim + d] = o;
    }
    if (COMBINE) {
        combine_if_last(n_heads, head_dim, max_spans, h0, gn, part_o, part_ml, COMBINE_ARGS);
    }
}

// Parts of 256 positions, one thread a position (the cut verified on the H100).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_spans(ATTN_PARAMS) {
    // PDL_ENTRY() in attn_part, after its metadata reads.
    attn_part<256, 1, false>(ATTN_ARGS, nullptr, nullptr, 0, nullptr);
}

// Parts of 64 positions, four lanes a position: four times the blocks of a decode step at
// short context (80 instead of 24 for an 8-KV-head model at 600 positions, for 132 SMs),
// and the parts folded by the block that finishes a row's last one (no attn_combine
// launch). FFAI_CUDA_OLDER_KERNELS=1 takes attn_spans and attn_combine instead.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attn_spans64(ATTN_PARAMS, COMBINE_PARAMS) {
    // PDL_ENTRY() in attn_part, after its metadata reads.
    attn_part<64, 4, true>(ATTN_ARGS, COMBINE_ARGS);
}


// ------------------------------------------------ decode-shaped attention (attn_dec_*)
//
// The backend's default for head sizes 64 and 128 (FFAI_CUDA_ATTN=64 takes attn_spans64).
// A warp per 32-position part, four parts (four warps, 128 positions) a block, chunks of
// up to four query heads of one KV head (DEC_G; a larger GQA group is several chunks).
// Against attn_part's chain of block-wide phases this one keeps each part's work inside
// its warp: lane t holds the K row of the part's position t in registers (head_dim / 8
// 16-byte loads, all in flight) and dots it with the chunk's query heads (shared memory,
// read as broadcasts), so a score needs no cross-lane sum; the part's softmax is two
// butterflies per head; lane l then owns dimensions [l * HD / 32, (l + 1) * HD / 32) of
// the output and adds the 32 positions' V pieces (loaded before the scores, in flight
// together) weighted by the scores it takes from their lanes by shuffles. The block's four
// parts are folded in shared memory after the one barrier past the query load; a row
// with one live block (up to 128 positions) writes its output there, otherwise the block
// that finishes the row's last live block folds the blocks' results (read through L2).
// Blocks past a row's live ones exit at once; nothing is written for them.
//
// The cut (part k of a row is positions [32k, 32k + 32) for k from first / 32, where first
// is the row's first visible position) and every sum's order depend on the row's own
// position only, so a row gives the same bits in any batch.
//
// grid = (rows, kv_heads * ceil(group / DEC_G), max_spans), block = DEC_WARPS * 32;
// max_spans (the stride of part_o / part_ml) >= any row's live blocks; HD is 64 or 128.
#define DEC_WARPS 4
#define DEC_G 4
// A lane's V piece of one position: DPL halves (no <type_traits> without headers).
template <unsigned int DPL>
struct DecPiece {
    typedef unsigned int type;
};
template <>
struct DecPiece<4> {
    typedef uint2 type;
};
// attn_dec's 8-bit sets of its output for the o projection's decode product (the sets
// quantize_q8x32 would write over `out`: 32-element blocks; with `quant` 0 none): the
// 32 / DPL lanes holding a block take its largest magnitude and level sum by shuffles.
#define DEC_Q8_PARAMS unsigned int quant, signed char *__restrict__ xq, float *__restrict__ xd, int *__restrict__ xs
#define DEC_Q8_ARGS quant, xq, xd, xs

// Lane `lane` of a warp holding a head's output writes its DPL values v at flat element
// e0 + lane * DPL (e0: the head's first element in the pass) to `out` and, with quant,
// their 8-bit sets. Every lane of the warp calls it.
template <unsigned int DPL>
__device__ __forceinline__ void dec_store(const float (&v)[DPL], float* __restrict__ out, size_t e0,
                                          unsigned int lane, DEC_Q8_PARAMS) {
    const size_t e = e0 + lane * DPL;
#pragma unroll
    for (unsigned int i = 0; i < DPL; i++) {
        out[e + i] = v[i];
    }
    if (!quant) {
        return;
    }
    constexpr unsigned int LANES = 32 / DPL;  // lanes a 32-element block
    unsigned int m = 0;
#pragma unroll
    for (unsigned int i = 0; i < DPL; i++) {
        m = max(m, __float_as_uint(v[i]) & 0x7FFFFFFFu);
    }
#pragma unroll
    for (unsigned int o = 1; o < LANES; o <<= 1) {
        m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    float d = 0.0f;
    int sum = 0;
    unsigned int packed = 0;
#pragma unroll
    for (unsigned int i = 0; i < DPL; i++) {
        const int q = q8_level(v[i], m, d);
        sum += q;
        packed |= ((unsigned int)q & 0xFFu) << (8 * i);
    }
#pragma unroll
    for (unsigned int o = 1; o < LANES; o <<= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    if (DPL == 4) {
        *(unsigned int*)(xq + e) = packed;
    } else {
        *(unsigned short*)(xq + e) = (unsigned short)packed;
    }
    if (lane % LANES == 0) {
        xs[e / 32] = sum;
        xd[e / 32] = d;
    }
}

template <unsigned int HD>
__device__ __forceinline__ void attn_dec(ATTN_PARAMS, COMBINE_PARAMS, DEC_Q8_PARAMS) {
    constexpr unsigned int DPL = HD / 32;  // output dimensions per lane
    constexpr unsigned int KP = HD / 8;    // 16-byte pieces of a K row
    static_assert(DPL == 2 || DPL == 4, "attn_dec takes head_dim 64 or 128");
    __shared__ __align__(16) float qs[DEC_G][HD];
    __shared__ __align__(16) float wo[DEC_WARPS][DEC_G][HD];
    __shared__ float wm[DEC_WARPS][DEC_G], wl[DEC_WARPS][DEC_G];
    __shared__ unsigned int last;
    const unsigned int prow = blockIdx.x, row = row0 + prow, b = blockIdx.z;
    const unsigned int group = n_heads / kv_heads;
    const unsigned int chunks = (group + DEC_G - 1) / DEC_G;
    const unsigned int kvh = blockIdx.y / chunks;
    const unsigned int h0 = kvh * group + (blockIdx.y % chunks) * DEC_G;
    const unsigned int gn = min((unsigned int)DEC_G, kvh * group + group - h0);
    const unsigned int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const float NEG_INF = -__int_as_float(0x7f800000);
    const unsigned int seq = row_seq[row];
    if (seq == NO_SLOT) {
        // Padding: zeros (block 0 of the row writes them).
        PDL_ENTRY();
        if (b == 0) {
            const size_t e0 = ((size_t)prow * n_heads + h0) * HD;
            for (unsigned int i = tid; i < gn * HD; i += blockDim.x) {
                out[e0 + i] = 0.0f;
                if (quant) {
                    xq[e0 + i] = 0;  // a block of zeros: d 0, levels 0
                    if ((e0 + i) % 32 == 0) {
                        xs[(e0 + i) / 32] = 0;
                        xd[(e0 + i) / 32] = 0.0f;
                    }
                }
            }
        }
        return;
    }
    const SeqRows s = seqs[seq];
    const unsigned int p = positions[row];
    const unsigned int first = first_visible(p, window);
    const unsigned int nb = (p / 32 - first / 32) / DEC_WARPS + 1;  // the row's live blocks
    if (b >= nb) {
        return;
    }
    const unsigned int base_pos = (first / 32 + b * DEC_WARPS + warp) * 32;  // part's position 0
    const unsigned int pos = base_pos + lane;
    const bool live = pos >= first && pos <= p;
    const bool warp_live = base_pos <= p;  // (base_pos + 31 >= first always)
    // Each live lane's K/V row (in units of head_dim) and its lines asked into L2 before
    // the wait, as attn_part does (metadata was written before the step's first kernel).
    unsigned int at = 0;
    if (live) {
        at = (tables[s.table_start + pos / block_size] * kv_heads + kvh) * block_size + pos % block_size;
#pragma unroll
        for (unsigned int off = 0; off < HD * 2; off += 128) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)(k_pages + (size_t)at * HD) + off));
            asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)(v_pages + (size_t)at * HD) + off));
        }
    }
    PDL_ENTRY();
    // The chunk's query heads (consecutive in q) into shared memory.
    {
        const float4* q4 = (const float4*)(q + ((size_t)row * n_heads + h0) * HD);
        float4* qs4 = (float4*)&qs[0][0];
        for (unsigned int i = tid; i < gn * HD / 4; i += blockDim.x) {
            qs4[i] = q4[i];
        }
    }
    // K row of this lane's position, and this lane's V pieces of the part's positions.
    uint4 kr[KP];
    typedef typename DecPiece<DPL>::type vpiece;
    vpiece vv[32];
#pragma unroll
    for (unsigned int i = 0; i < KP; i++) {
        kr[i] = live ? ((const uint4*)(k_pages + (size_t)at * HD))[i] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (unsigned int t = 0; t < 32; t++) {
        const unsigned int at_t = __shfl_sync(0xffffffffu, at, t);
        const unsigned int pt = base_pos + t;
        if (pt >= first && pt <= p) {
            vv[t] = ((const vpiece*)(v_pages + (size_t)at_t * HD))[lane];
        } else {
            vv[t] = vpiece();
        }
    }
    __syncthreads();
    float m[DEC_G], pr[DEC_G], l[DEC_G];
    {
        float acc[DEC_G];
#pragma unroll
        for (int h = 0; h < DEC_G; h++) {
            acc[h] = 0.0f;
        }
#pragma unroll
        for (unsigned int i = 0; i < KP; i++) {
            const unsigned int wv[4] = {kr[i].x, kr[i].y, kr[i].z, kr[i].w};
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float kf = half_to_float((unsigned short)(wv[e / 2] >> (16 * (e % 2))));
#pragma unroll
                for (int h = 0; h < DEC_G; h++) {
                    if ((unsigned int)h < gn) {
                        acc[h] += qs[h][i * 8 + e] * kf;
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < DEC_G; h++) {
            float v = NEG_INF;
            if (live) {
                v = acc[h] * scale;
                if (softcap > 0.0f) {
                    v = softcap * tanhf(v / softcap);
                }
            }
            float mx = v;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            }
            m[h] = mx;
            pr[h] = live ? expf(v - mx) : 0.0f;
            float sum = pr[h];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                sum += __shfl_xor_sync(0xffffffffu, sum, o);
            }
            l[h] = sum;
        }
    }
    // Values: lane's dimensions, positions in order.
    float o[DEC_G][DPL];
#pragma unroll
    for (int h = 0; h < DEC_G; h++) {
#pragma unroll
        for (unsigned int e = 0; e < DPL; e++) {
            o[h][e] = 0.0f;
        }
    }
    if (warp_live) {
#pragma unroll
        for (unsigned int t = 0; t < 32; t++) {
            float vf[DPL];
            if constexpr (DPL == 4) {
                const uint2 w = *(const uint2*)&vv[t];
                vf[0] = half_to_float((unsigned short)w.x);
                vf[1] = half_to_float((unsigned short)(w.x >> 16));
                vf[2] = half_to_float((unsigned short)w.y);
                vf[3] = half_to_float((unsigned short)(w.y >> 16));
            } else {
                const unsigned int w = *(const unsigned int*)&vv[t];
                vf[0] = half_to_float((unsigned short)w);
                vf[1] = half_to_float((unsigned short)(w >> 16));
            }
#pragma unroll
            for (int h = 0; h < DEC_G; h++) {
                const float pt = __shfl_sync(0xffffffffu, pr[h], t);
#pragma unroll
                for (unsigned int e = 0; e < DPL; e++) {
                    o[h][e] += pt * vf[e];
                }
            }
        }
    }
#pragma unroll
    for (int h = 0; h < DEC_G; h++) {
        if ((unsigned int)h < gn) {
#pragma unroll
            for (unsigned int e = 0; e < DPL; e++) {
                wo[warp][h][lane * DPL + e] = o[h][e];
            }
            if (lane == 0) {
                wm[warp][h] = m[h];
                wl[warp][h] = l[h];
            }
        }
    }
    __syncthreads();
    // The block's four parts: warp h folds head h (warps in order).
    const bool multi = nb > 1;
    if (warp < gn) {
        const unsigned int h = warp;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            if (wl[w][h] > 0.0f) {
                mx = fmaxf(mx, wm[w][h]);
            }
        }
        float lt = 0.0f, ov[DPL];
#pragma unroll
        for (unsigned int e = 0; e < DPL; e++) {
            ov[e] = 0.0f;
        }
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            if (wl[w][h] > 0.0f) {
                const float f = expf(wm[w][h] - mx);
                lt += wl[w][h] * f;
#pragma unroll
                for (unsigned int e = 0; e < DPL; e++) {
                    ov[e] += wo[w][h][lane * DPL + e] * f;
                }
            }
        }
        const unsigned int head = h0 + h;
        if (multi) {
            const size_t part = ((size_t)prow * n_heads + head) * max_spans + b;
#pragma unroll
            for (unsigned int e = 0; e < DPL; e++) {
                part_o[part * HD + lane * DPL + e] = ov[e];
            }
            if (lane == 0) {
                part_ml[part * 2] = mx;
                part_ml[part * 2 + 1] = lt;
            }
        } else {
            float r = 1.0f;
            if (has_sinks) {
                const float sink = sinks[head];
                const float m2 = fmaxf(mx, sink);
                r = lt > 0.0f ? expf(mx - m2) : 0.0f;
                lt = lt * r + expf(sink - m2);
            }
            const float inv = lt > 0.0f ? r / lt : 0.0f;
            float fin[DPL];
#pragma unroll
            for (unsigned int e = 0; e < DPL; e++) {
                fin[e] = ov[e] * inv;
            }
            dec_store<DPL>(fin, out, ((size_t)prow * n_heads + head) * HD, lane, DEC_Q8_ARGS);
        }
    }
    if (!multi) {
        return;
    }
    // The row's blocks: the one that finishes last folds them (blocks in order).
    unsigned int* counter = done + (size_t)prow * gridDim.y + blockIdx.y;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        last = atomicAdd(counter, 1u) == nb - 1;
    }
    __syncthreads();
    if (!last) {
        return;
    }
    __threadfence();
    if (warp < gn) {
        const unsigned int head = h0 + warp;
        const size_t base = ((size_t)prow * n_heads + head) * max_spans;
        float mx = NEG_INF;
        for (unsigned int j = lane; j < nb; j += 32) {
            if (__ldcg(part_ml + (base + j) * 2 + 1) > 0.0f) {
                mx = fmaxf(mx, __ldcg(part_ml + (base + j) * 2));
            }
        }
#pragma unroll
        for (int o2 = 16; o2 > 0; o2 >>= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
        }
        float sink = 0.0f;
        if (has_sinks) {
            sink = sinks[head];
            mx = fmaxf(mx, sink);
        }
        float lt = 0.0f, ov[DPL];
#pragma unroll
        for (unsigned int e = 0; e < DPL; e++) {
            ov[e] = 0.0f;
        }
#pragma unroll 4
        for (unsigned int j = 0; j < nb; j++) {
            const float lj = __ldcg(part_ml + (base + j) * 2 + 1);
            const float mj = __ldcg(part_ml + (base + j) * 2);
            float pv[DPL];
#pragma unroll
            for (unsigned int e = 0; e < DPL; e++) {
                pv[e] = __ldcg(part_o + (base + j) * HD + lane * DPL + e);
            }
            if (lj > 0.0f) {
                const float f = expf(mj - mx);
                lt += lj * f;
#pragma unroll
                for (unsigned int e = 0; e < DPL; e++) {
                    ov[e] += pv[e] * f;
                }
            }
        }
        if (has_sinks) {
            lt += expf(sink - mx);
        }
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        float fin[DPL];
#pragma unroll
        for (unsigned int e = 0; e < DPL; e++) {
            fin[e] = ov[e] * inv;
        }
        dec_store<DPL>(fin, out, ((size_t)prow * n_heads + head) * HD, lane, DEC_Q8_ARGS);
    }
    if (tid == 0) {
        *counter = 0;
    }
}

// The trailing parameters are the Q8_SETS of q8x.cu's producers (the 256-element sets
// unused: the backend records that only the 32-element ones were written).
extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
    attn_dec_h128(ATTN_PARAMS, COMBINE_PARAMS, DEC_Q8_PARAMS, const void*, const void*, const void*) {
    // PDL_ENTRY() in attn_dec, after its metadata reads.
    attn_dec<128>(ATTN_ARGS, COMBINE_ARGS, DEC_Q8_ARGS);
}
extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
    attn_dec_h64(ATTN_PARAMS, COMBINE_PARAMS, DEC_Q8_PARAMS, const void*, const void*, const void*) {
    // PDL_ENTRY() in attn_dec, after its metadata reads.
    attn_dec<64>(ATTN_ARGS, COMBINE_ARGS, DEC_Q8_ARGS);
}

// One block per (row, head): folds the row's span parts in order and normalises; rows of
// no sequence get zeros. out is [n, n_heads * head_dim].
// `sinks` (when `has_sinks`): one learned logit per query head (GPT-OSS), an extra term in
// the head's softmax denominator that adds nothing to the output: it joins the maximum
// and adds exp(sink - max) to the sum.
extern "C" __global__ void attn_combine(const float* part_o, const float* part_ml, unsigned int row0,
                                        unsigned int n_heads, unsigned int head_dim, unsigned int max_spans,
                                        const float* sinks, unsigned int has_sinks, float* out) {
    PDL_ENTRY();
    unsigned int row = row0 + blockIdx.x, head = blockIdx.y;
    size_t base = ((size_t)blockIdx.x * n_heads + head) * max_spans;
    float mx = -__int_as_float(0x7f800000);
    for (unsigned int j = 0; j < max_spans; j++) {
        if (part_ml[(base + j) * 2 + 1] > 0.0f) {
            mx = fmaxf(mx, part_ml[(base + j) * 2]);
        }
    }
    float sink = 0.0f;
    if (has_sinks) {
        sink = sinks[head];
        mx = fmaxf(mx, sink);
    }
    float lt = has_sinks ? expf(sink - mx) : 0.0f;
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

// Most value elements one thread of attn_mla accumulates (value width <= MLA_THREADS * this).
#define MLA_PER_THREAD 8
#define MLA_THREADS 128

// Multi-head latent attention (DeepSeek MLA, absorbed): every query head attends over the
// pool's one KV head, whose rows are `head_dim` wide (the key); the value of a position is
// the first `v_dim` elements of the same row. One block per (row, head): positions are
// taken in order, one at a time: the block reduces the score (warp sums, then the warps'
// sums in warp order), then every thread folds it into a running (max, sum) and its own
// value elements (d = tid + i * MLA_THREADS). Simple and not fast; the arithmetic depends
// on the row alone (its query, position and sequence), so a row's result is the same in
// any batch. Rows of no sequence get zeros. out is [n, n_heads * v_dim].
// grid = (rows, n_heads), block = MLA_THREADS.
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
    attn_mla(const float* __restrict__ q, const unsigned short* __restrict__ pages,
             const unsigned int* __restrict__ positions, const unsigned int* __restrict__ row_seq,
             const SeqRows* __restrict__ seqs, const unsigned int* __restrict__ tables, unsigned int n_heads,
             unsigned int head_dim, unsigned int v_dim, unsigned int block_size, unsigned int window, float scale,
             float softcap, float* __restrict__ out) {
    PDL_ENTRY();
    __shared__ float warp_sum[MLA_THREADS / 32];
    const unsigned int row = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
    const unsigned int warp = tid / 32, lane = tid % 32;
    float* dst = out + ((size_t)row * n_heads + head) * v_dim;
    const unsigned int seq = row_seq[row];
    if (seq == NO_SLOT) {
        for (unsigned int d = tid; d < v_dim; d += MLA_THREADS) {
            dst[d] = 0.0f;
        }
        return;
    }
    const SeqRows s = seqs[seq];
    const unsigned int p = positions[row];
    const float* qh = q + ((size_t)row * n_heads + head) * head_dim;
    float acc[MLA_PER_THREAD];
#pragma unroll
    for (int i = 0; i < MLA_PER_THREAD; i++) {
        acc[i] = 0.0f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (unsigned int pos = first_visible(p, window); pos <= p; pos++) {
        const unsigned int blk = tables[s.table_start + pos / block_size];
        const unsigned short* kr = pages + ((size_t)blk * block_size + pos % block_size) * head_dim;
        float part = 0.0f;
        for (unsigned int d = tid; d < head_dim; d += MLA_THREADS) {
            part += qh[d] * half_to_float(kr[d]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            part += __shfl_xor_sync(0xffffffffu, part, o);
        }
        if (lane == 0) {
            warp_sum[warp] = part;
        }
        __syncthreads();
        float sc = 0.0f;
#pragma unroll
        for (int w = 0; w < MLA_THREADS / 32; w++) {
            sc += warp_sum[w];
        }
        __syncthreads();
        sc *= scale;
        if (softcap > 0.0f) {
            sc = softcap * tanhf(sc / softcap);
        }
        const float mx = fmaxf(m, sc);
        const float a = expf(m - mx), e = expf(sc - mx);
        l = l * a + e;
        m = mx;
#pragma unroll
        for (int i = 0; i < MLA_PER_THREAD; i++) {
            const unsigned int d = tid + i * MLA_THREADS;
            if (d < v_dim) {
                acc[i] = acc[i] * a + e * half_to_float(kr[d]);
            }
        }
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < MLA_PER_THREAD; i++) {
        const unsigned int d = tid + i * MLA_THREADS;
        if (d < v_dim) {
            dst[d] = acc[i] * inv;
        }
    }
}

// ---- Prefill attention on tensor cores (attn_prefill_h64 / attn_prefill_h128) ----
//
// For steps whose sequences bring many rows each (prompts): a block takes up to 64
// consecutive rows of one sequence (16 a warp) and one query head, and walks the
// sequence's positions in tiles of 64, staged into shared memory with cp.async (K and V
// as they sit in the pools, f16, rows padded by 16 bytes so that the fragment loads hit
// 32 different banks). Scores and the value sums are mma.sync m16n8k16 products (f16
// inputs, f32 accumulation) with an online softmax per row.
//
// Precision: q (f32) and the probabilities (f32) are each split into two f16 parts,
// hi = f16(x) and lo = f16(x - hi), and both parts are multiplied (twice the products).
// That carries about 22 bits of them, against 11 for a plain f16 product, so the result
// agrees with attn_dec's f32 arithmetic to rounding; K and V are f16 in the pools, so
// they enter exactly. (A q element beyond f16's range, 65504, would not survive: none
// of the supported models comes near it after its norms.)
//
// A row's result depends only on its own q, position and sequence: tiles of positions
// start at multiples of 64 whatever rows share the block, masks are per row, and a tile
// that a row cannot see changes nothing of its state (its probabilities are exactly 0
// and its correction factor exactly 1). So a prompt gives the same bits in one step or
// cut into chunks, alone or beside other prompts.
//
// tiles: three u32 a block (sequence, first row, rows <= 64), written by the host for
// steps where it takes this kernel. grid = (tiles, n_heads), block = PF_THREADS.
#define PF_ROWS 64
#define PF_KEYS 64
#define PF_THREADS 128

__device__ __forceinline__ unsigned int pf_smem(const void* p) {
    unsigned int a;
    asm("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; `bytes` 0 writes zeros instead.
__device__ __forceinline__ void pf_copy16(void* dst, const void* src, unsigned int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(pf_smem(dst)), "l"(src), "r"(bytes) : "memory");
}

// Two f32 as their f16 high parts (packed, the first in the low half) and low parts.
__device__ __forceinline__ void pf_split2(float a, float b, unsigned int& hi, unsigned int& lo) {
    const unsigned short ah = float_to_half(a), bh = float_to_half(b);
    hi = (unsigned int)ah | ((unsigned int)bh << 16);
    const unsigned short al = float_to_half(a - half_to_float(ah)), bl = float_to_half(b - half_to_float(bh));
    lo = (unsigned int)al | ((unsigned int)bl << 16);
}

// c += a · b, one m16n8k16 tile (row-major a, column-major b, f16 in, f32 accumulate).
__device__ __forceinline__ void pf_mma(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define PF_PARAMS                                                                                                  \
    const float *__restrict__ q, const unsigned short *__restrict__ k_pages,                                      \
        const unsigned short *__restrict__ v_pages, const unsigned int *__restrict__ positions,                   \
        const SeqRows *__restrict__ seqs, const unsigned int *__restrict__ tables,                                \
        const unsigned int *__restrict__ tiles, unsigned int n_heads, unsigned int kv_heads,                      \
        unsigned int block_size, unsigned int window, float scale, float softcap, const float *__restrict__ sinks, \
        unsigned int has_sinks, float *__restrict__ out
#define PF_ARGS \
    q, k_pages, v_pages, positions, seqs, tables, tiles, n_heads, kv_heads, block_size, window, scale, softcap, sinks, \
        has_sinks, out

template <unsigned int HD>
__device__ __forceinline__ void attn_prefill(PF_PARAMS) {
    constexpr unsigned int ST = HD + 8;  // halves a staged row (16 bytes of padding)
    constexpr unsigned int KC = HD / 16; // 16-dimension chunks (the scores' k)
    constexpr unsigned int DB = HD / 8;  // 8-dimension blocks of the output (the values' n)
    constexpr unsigned int PIECES = HD / 8;
    static_assert(HD == 64 || HD == 128, "attn_prefill takes head_dim 64 or 128");
    __shared__ __align__(16) unsigned short ks[PF_KEYS * ST];
    __shared__ __align__(16) unsigned short vs[PF_KEYS * ST];
    __shared__ unsigned int pos_s[PF_ROWS];
    __shared__ unsigned int span_s[2];
    const float NEG_INF = -__int_as_float(0x7f800000);
    const unsigned int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const unsigned int head = blockIdx.y, kvh = head / (n_heads / kv_heads);
    const unsigned int seq = tiles[blockIdx.x * 3], row0 = tiles[blockIdx.x * 3 + 1];
    const unsigned int nrows = tiles[blockIdx.x * 3 + 2];
    const SeqRows s = seqs[seq];
    if (tid < PF_ROWS) {
        pos_s[tid] = tid < nrows ? positions[row0 + tid] : 0u;
    }
    PDL_ENTRY();
    __syncthreads();
    // The block's positions: from the first any row sees to the last row's.
    if (warp == 0) {
        unsigned int lo = 0xffffffffu, hi = 0;
        for (unsigned int i = lane; i < nrows; i += 32) {
            lo = min(lo, first_visible(pos_s[i], window));
            hi = max(hi, pos_s[i]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
            hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        if (lane == 0) {
            span_s[0] = lo;
            span_s[1] = hi;
        }
    }
    __syncthreads();
    const unsigned int lo = span_s[0], hi = span_s[1];
    // This lane's two rows (g and g + 8 of the warp's 16) and what they see.
    const unsigned int ra = warp * 16 + g, rb = ra + 8;
    const bool va = ra < nrows, vb = rb < nrows;
    const unsigned int pa = pos_s[ra], pb = pos_s[rb];
    const unsigned int fa = first_visible(pa, window), fb = first_visible(pb, window);
    // The warp's positions (none when it has no rows).
    unsigned int wlo = 0xffffffffu, whi = 0;
    if (va) {
        wlo = fa;
        whi = pa;
    }
    if (vb) {
        wlo = min(wlo, fb);
        whi = max(whi, pb);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, o));
        whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, o));
    }
    // q's fragments (rows ra / rb, dimensions 16c + 2t, +1, +8, +9), split hi + lo.
    unsigned int qh[KC][4], ql[KC][4];
    {
        const float* qa = q + ((size_t)(row0 + ra) * n_heads + head) * HD;
        const float* qb = q + ((size_t)(row0 + rb) * n_heads + head) * HD;
        const float2 z = make_float2(0.0f, 0.0f);
#pragma unroll
        for (unsigned int c = 0; c < KC; c++) {
            const float2 x0 = va ? *(const float2*)(qa + 16 * c + 2 * t) : z;
            const float2 x1 = vb ? *(const float2*)(qb + 16 * c + 2 * t) : z;
            const float2 x2 = va ? *(const float2*)(qa + 16 * c + 2 * t + 8) : z;
            const float2 x3 = vb ? *(const float2*)(qb + 16 * c + 2 * t + 8) : z;
            pf_split2(x0.x, x0.y, qh[c][0], ql[c][0]);
            pf_split2(x1.x, x1.y, qh[c][1], ql[c][1]);
            pf_split2(x2.x, x2.y, qh[c][2], ql[c][2]);
            pf_split2(x3.x, x3.y, qh[c][3], ql[c][3]);
        }
    }
    float o[DB][4];
#pragma unroll
    for (unsigned int d = 0; d < DB; d++) {
        o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    }
    float ma = NEG_INF, mb = NEG_INF, la = 0.0f, lb = 0.0f;  // la / lb: this lane's part of the sums

    for (unsigned int kt = lo / PF_KEYS; kt <= hi / PF_KEYS; kt++) {
        const unsigned int kbase = kt * PF_KEYS;
        // Stage the tile's K, then its V (positions outside [lo, hi] as zeros: they may
        // be unwritten, and even a masked NaN would poison the value products).
#pragma unroll
        for (unsigned int pass = 0; pass < 2; pass++) {
            const unsigned short* pages = pass == 0 ? k_pages : v_pages;
            unsigned short* dst = pass == 0 ? ks : vs;
            for (unsigned int c = tid; c < PF_KEYS * PIECES; c += PF_THREADS) {
                const unsigned int r = c / PIECES, piece = c % PIECES, kp = kbase + r;
                const bool ok = kp >= lo && kp <= hi && kp / block_size < s.table_len;
                size_t at = 0;
                if (ok) {
                    at = (((size_t)tables[s.table_start + kp / block_size] * kv_heads + kvh) * block_size +
                          kp % block_size) *
                             HD +
                         piece * 8;
                }
                pf_copy16(dst + r * ST + piece * 8, pages + at, ok ? 16u : 0u);
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        const bool live = kbase <= whi && kbase + PF_KEYS > wlo;
        asm volatile("cp.async.wait_group 1;" ::: "memory");  // K is in
        __syncthreads();
        float sc[PF_KEYS / 8][4];
        if (live) {
#pragma unroll
            for (unsigned int nb = 0; nb < PF_KEYS / 8; nb++) {
                sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
                const unsigned short* kr = ks + (nb * 8 + g) * ST + 2 * t;
#pragma unroll
                for (unsigned int c = 0; c < KC; c++) {
                    const unsigned int b0 = *(const unsigned int*)(kr + 16 * c);
                    const unsigned int b1 = *(const unsigned int*)(kr + 16 * c + 8);
                    pf_mma(sc[nb], qh[c], b0, b1);
                    pf_mma(sc[nb], ql[c], b0, b1);
                }
            }
            // Scale, soft-cap and mask as attn_dec does; the rows' new maxima.
            float xa = NEG_INF, xb = NEG_INF;
#pragma unroll
            for (unsigned int nb = 0; nb < PF_KEYS / 8; nb++) {
#pragma unroll
                for (unsigned int e = 0; e < 2; e++) {
                    const unsigned int kp = kbase + nb * 8 + 2 * t + e;
                    float v0 = sc[nb][e] * scale, v1 = sc[nb][2 + e] * scale;
                    if (softcap > 0.0f) {
                        v0 = softcap * tanhf(v0 / softcap);
                        v1 = softcap * tanhf(v1 / softcap);
                    }
                    sc[nb][e] = (va && kp >= fa && kp <= pa) ? v0 : NEG_INF;
                    sc[nb][2 + e] = (vb && kp >= fb && kp <= pb) ? v1 : NEG_INF;
                    xa = fmaxf(xa, sc[nb][e]);
                    xb = fmaxf(xb, sc[nb][2 + e]);
                }
            }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                xa = fmaxf(xa, __shfl_xor_sync(0xffffffffu, xa, off));
                xb = fmaxf(xb, __shfl_xor_sync(0xffffffffu, xb, off));
            }
            const float na = fmaxf(ma, xa), nbm = fmaxf(mb, xb);
            // A row that has seen nothing yet keeps its zeros (exp(-inf) = 0 below).
            const float ua = na == NEG_INF ? 0.0f : na, ub = nbm == NEG_INF ? 0.0f : nbm;
            const float ca = expf(ma - ua), cb = expf(mb - ub);
            ma = na;
            mb = nbm;
#pragma unroll
            for (unsigned int nb = 0; nb < PF_KEYS / 8; nb++) {
                sc[nb][0] = expf(sc[nb][0] - ua);
                sc[nb][1] = expf(sc[nb][1] - ua);
                sc[nb][2] = expf(sc[nb][2] - ub);
                sc[nb][3] = expf(sc[nb][3] - ub);
                la = la * (nb == 0 ? ca : 1.0f) + sc[nb][0] + sc[nb][1];
                lb = lb * (nb == 0 ? cb : 1.0f) + sc[nb][2] + sc[nb][3];
            }
#pragma unroll
            for (unsigned int d = 0; d < DB; d++) {
                o[d][0] *= ca;
                o[d][1] *= ca;
                o[d][2] *= cb;
                o[d][3] *= cb;
            }
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");  // V is in
        __syncthreads();
        if (live) {
#pragma unroll
            for (unsigned int kc = 0; kc < PF_KEYS / 16; kc++) {
                unsigned int ph[4], pl[4];
                pf_split2(sc[2 * kc][0], sc[2 * kc][1], ph[0], pl[0]);
                pf_split2(sc[2 * kc][2], sc[2 * kc][3], ph[1], pl[1]);
                pf_split2(sc[2 * kc + 1][0], sc[2 * kc + 1][1], ph[2], pl[2]);
                pf_split2(sc[2 * kc + 1][2], sc[2 * kc + 1][3], ph[3], pl[3]);
                // Lane l addresses row l % 8 of matrix l / 8: keys 16kc + 8 (bit 0 of the
                // matrix) + l % 8, dimensions 8 (d + bit 1 of the matrix); transposed, the
                // four matrices are the b fragments of dimension blocks d and d + 1.
                const unsigned int mi = lane / 8;
                const unsigned short* vr = vs + (16 * kc + (mi & 1) * 8 + lane % 8) * ST + (mi >> 1) * 8;
#pragma unroll
                for (unsigned int d = 0; d < DB; d += 2) {
                    unsigned int b0, b1, b2, b3;
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                                 : "r"(pf_smem(vr + d * 8)));
                    pf_mma(o[d], ph, b0, b1);
                    pf_mma(o[d], pl, b0, b1);
                    pf_mma(o[d + 1], ph, b2, b3);
                    pf_mma(o[d + 1], pl, b2, b3);
                }
            }
        }
        __syncthreads();  // the next tile's loads overwrite ks / vs
    }
    // The rows' sums (four lanes a row), the sinks, the output.
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        la += __shfl_xor_sync(0xffffffffu, la, off);
        lb += __shfl_xor_sync(0xffffffffu, lb, off);
    }
    float ia = 0.0f, ib = 0.0f;
    {
        float r = 1.0f, lt = la;
        if (has_sinks) {
            const float sink = sinks[head], m2 = fmaxf(ma, sink);
            r = lt > 0.0f ? expf(ma - m2) : 0.0f;
            lt = lt * r + expf(sink - m2);
        }
        ia = lt > 0.0f ? r / lt : 0.0f;
        r = 1.0f;
        lt = lb;
        if (has_sinks) {
            const float sink = sinks[head], m2 = fmaxf(mb, sink);
            r = lt > 0.0f ? expf(mb - m2) : 0.0f;
            lt = lt * r + expf(sink - m2);
        }
        ib = lt > 0.0f ? r / lt : 0.0f;
    }
    float* oa = out + ((size_t)(row0 + ra) * n_heads + head) * HD + 2 * t;
    float* ob = out + ((size_t)(row0 + rb) * n_heads + head) * HD + 2 * t;
#pragma unroll
    for (unsigned int d = 0; d < DB; d++) {
        if (va) {
            *(float2*)(oa + 8 * d) = make_float2(o[d][0] * ia, o[d][1] * ia);
        }
        if (vb) {
            *(float2*)(ob + 8 * d) = make_float2(o[d][2] * ib, o[d][3] * ib);
        }
    }
}

extern "C" __global__ void __launch_bounds__(PF_THREADS) attn_prefill_h128(PF_PARAMS) {
    attn_prefill<128>(PF_ARGS);
}
extern "C" __global__ void __launch_bounds__(PF_THREADS) attn_prefill_h64(PF_PARAMS) {
    attn_prefill<64>(PF_ARGS);
}
