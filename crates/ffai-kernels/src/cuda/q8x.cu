// Decode products (fewer than GEMM_MIN_ROWS activation rows) that read each weight byte
// once at full bandwidth: one warp per output row, so even a 4096-row matrix spreads
// over every SM with enough loads in flight, and
//   * Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, Q4_K, Q6_K against activations quantized once
//     to 8 bits, multiplied in integers (dp4a) — the CPU's q8 scheme (quant/q8.rs) with
//     the same activation bytes and the same integer dot per block (super-block for the
//     K-quants), so the GPU and CPU differ only in the order of the f32 sums;
//   * F16 / BF16 with 128-bit weight loads against f32 activations.
// A row's arithmetic does not depend on how many activation rows share the launch
// (n <= 8), so a sequence's result does not depend on its batch. The `moe_*` kernels at
// the end run the same row bodies gathered over a mixture of experts' selected matrices.
// Header-free like the other sources.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define Q8X_MAX_N 8
#define FULL 0xFFFFFFFFu

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ float f16_bits(u32 bits) {
    const u16 h = (u16)bits;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// `NW` little-endian words from `p` (any alignment), reading only the aligned words that
// overlap [p, p + 4 NW) (so never past the field).
template <int NW>
__device__ __forceinline__ void words(const u8* p, u32 (&out)[NW]) {
    const u64 a = (u64)p;
    const u32* base = (const u32*)(a & ~3ull);
    const u32 sh = (u32)(a & 3) * 8;
    u32 cur = __ldg(base);
#pragma unroll
    for (int i = 0; i < NW; ++i) {
        const int next = (i + 1 < NW || sh != 0) ? i + 1 : i;
        const u32 nxt = __ldg(base + next);
        out[i] = __funnelshift_r(cur, nxt, sh);
        cur = nxt;
    }
}

// The f16 at a 2-byte aligned address, from the aligned word holding it.
__device__ __forceinline__ float f16_at(const u8* p) {
    const u32 w = __ldg((const u32*)((u64)p & ~3ull));
    return f16_bits(((u64)p & 2) ? (w >> 16) : w);
}

// Bytes 0..15 of each byte lane minus 8 (Q4_0's zero point) and 0..63 minus 32 (Q6_K's),
// as signed bytes: adding the complement keeps every byte below 0x100 (no carries), and
// flipping the top bit makes the two's complement value.
__device__ __forceinline__ int minus8(u32 q) { return (int)((q + 0x78787878u) ^ 0x80808080u); }
__device__ __forceinline__ int minus32(u32 q) { return (int)((q + 0x60606060u) ^ 0x80808080u); }

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(FULL, s, off);
    }
    return s;
}

// Up to three matrices of one type and width share a launch (q/k/v, gate/up: one launch
// instead of three): warp (4 * block + w) takes row r of the part whose rows it falls in.
// Part p writes y_p[t * rows_p + r]. Unused parts have rows_p = 0.
#define PARTS const u8 *w0, const u8 *w1, const u8 *w2, float *y0, float *y1, float *y2, u32 rows0, u32 rows1, u32 rows2
struct Row {
    const u8* w;
    float* y;
    u32 rows, r;
};
__device__ __forceinline__ bool pick(PARTS, Row& o) {
    u32 r = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (r < rows0) {
        o = Row{w0, y0, rows0, r};
        return true;
    }
    r -= rows0;
    if (r < rows1) {
        o = Row{w1, y1, rows1, r};
        return true;
    }
    r -= rows1;
    if (r < rows2) {
        o = Row{w2, y2, rows2, r};
        return true;
    }
    return false;
}

// ------------------------------------------------------------ activation quantization
//
// quant/q8.rs's scheme: per block of QB elements (32, or 256 for the K-quants)
// amax = max |x| (NaN/inf -> d = NaN, q = 0; amax = 0 -> d = 0, q = 0), d = amax / 127,
// q = round_half_even((x * m1) * m2) with m1 = 127 / amax, m2 = 1 (or, when 127 / amax
// overflows, m1 = 2^100, m2 = 127 / (amax * 2^100)). Writes xq [n][cols] (int8),
// xd [n][cols / QB] and xs [n][cols / 32] (the level sums of each 32 elements).
// grid = (ceil(cols / 256), n), block = 256; cols % QB == 0.
// The level of v and its block's scale: q8_level in prelude.cuh (attention.cu writes the
// same sets).

__device__ __forceinline__ u32 warp_max_bits(u32 m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        m = max(m, __shfl_xor_sync(FULL, m, off));
    }
    return m;
}

__device__ __forceinline__ int warp_isum(int s) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(FULL, s, off);
    }
    return s;
}

// Element `e` (flat index over [n][cols]; lanes of a warp hold 32 consecutive elements
// of one 32-block) of value v into the set (xq, xd, xs) of block length QB; `m` is the
// block's largest magnitude (bits). Every lane of the warp calls it.
template <int QB>
__device__ __forceinline__ void q8_store(float v, u32 m, u64 e, signed char* __restrict__ xq,
                                         float* __restrict__ xd, int* __restrict__ xs) {
    float d;
    const int q = q8_level(v, m, d);
    xq[e] = (signed char)q;
    const int s = warp_isum(q);
    if ((threadIdx.x & 31) == 0) {
        xs[e / 32] = s;
        if (QB == 32 || e % QB == 0) {
            xd[e / QB] = d;
        }
    }
}

template <int QB>
__device__ __forceinline__ void quantize(const float* __restrict__ x, signed char* __restrict__ xq,
                                         float* __restrict__ xd, int* __restrict__ xs, u32 cols) {
    __shared__ u32 warp_max[8];
    const u32 t = blockIdx.y;
    const u32 c = blockIdx.x * 256 + threadIdx.x;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (QB == 32 && c >= cols) {
        return;  // whole warps (cols % 32 == 0)
    }
    const u64 e = (u64)t * cols + c;
    const float v = x[e];
    u32 m = warp_max_bits(__float_as_uint(v) & 0x7FFFFFFFu);
    if (QB == 256) {
        if (lane == 0) {
            warp_max[warp] = m;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            m = max(m, warp_max[i]);
        }
    }
    q8_store<QB>(v, m, e, xq, xd, xs);
}

extern "C" __global__ void __launch_bounds__(256)
    quantize_q8x32(const float* x, signed char* xq, float* xd, int* xs, u32 cols) {
    PDL_ENTRY();
    quantize<32>(x, xq, xd, xs, cols);
}

extern "C" __global__ void __launch_bounds__(256)
    quantize_q8x256(const float* x, signed char* xq, float* xd, int* xs, u32 cols) {
    PDL_ENTRY();
    quantize<256>(x, xq, xd, xs, cols);
}

// ------------------------------------------ producers that also write the 8-bit forms
//
// The ops whose output feeds the decode products (the norms before q/k/v and gate/up,
// the gated activation before down) write that output in f32 as before and, with
// `quant`, also its quantizations for both block lengths: 32 (always; whole warps) and
// 256 (when the flat length is a multiple of 256). The backend then skips the separate
// quantize launch. Both sets are the bits quantize_q8x32 / quantize_q8x256 give on the
// f32 output.
#define Q8_SETS                                                                                    \
    u32 quant, signed char *__restrict__ xq32, float *__restrict__ xd32, int *__restrict__ xs32, \
        signed char *__restrict__ xq256, float *__restrict__ xd256, int *__restrict__ xs256

// Value v of flat element e; consecutive threads hold consecutive elements, whole warps
// live or not. Every thread of the block calls it (it synchronizes for the 256-sets; the
// block's threads are a multiple of 256 then, and live 256-blocks are whole).
__device__ __forceinline__ void q8_both(float v, bool live, u64 e, bool q256, u32* smax, Q8_SETS) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 m = warp_max_bits(live ? __float_as_uint(v) & 0x7FFFFFFFu : 0u);
    if (live) {
        q8_store<32>(v, m, e, xq32, xd32, xs32);
    }
    if (q256) {
        __syncthreads();  // the previous round's maxima are read
        if (lane == 0) {
            smax[warp] = m;
        }
        __syncthreads();
        u32 m8 = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            m8 = max(m8, smax[(warp & ~7u) + i]);
        }
        if (live) {
            q8_store<256>(v, m8, e, xq256, xd256, xs256);
        }
    }
}

// Elements a norm_q8 thread holds in registers (widths up to 8192 with 1024 threads).
#define NORM_PER 8

// One block per row (blockDim.x a power of two, 32..1024, and width <= NORM_PER *
// blockDim.x): with `add`, x += y (stored); out = x / rms(x) * w; with `quant` (width %
// 32 == 0), out's 8-bit sets. Thread tid holds elements tid + i * blockDim.x (so a warp
// holds 32 consecutive ones), all loaded at once. The sum of squares: per thread in
// element order, warps by butterfly, then the warps' sums by one more butterfly.
extern "C" __global__ void __launch_bounds__(1024)
    norm_q8(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ w, float eps, u32 width,
            u32 add, float* __restrict__ out, Q8_SETS) {
    __shared__ float red[32];
    __shared__ u32 smax[NORM_PER][32];
    const u32 t = blockIdx.x, tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    float* row = x + (u64)t * width;
    const float* yr = y + (u64)t * width;
    float* dst = out + (u64)t * width;
    float v[NORM_PER], wv[NORM_PER];
    // The weights (never written during a step) are read before waiting for the
    // predecessor; the row only after.
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        wv[i] = c < width ? w[c] : 0.0f;
    }
    PDL_ENTRY();
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        v[i] = 0.0f;
        if (c < width) {
            v[i] = row[c];
            if (add) {
                v[i] += yr[c];
            }
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        if (c < width) {
            if (add) {
                row[c] = v[i];
            }
            s += v[i] * v[i];
        }
    }
    s = warp_sum(s);
    if (lane == 0) {
        red[warp] = s;
    }
    __syncthreads();
    // The warps' sums added by one butterfly (a fixed order), not one after another.
    const float total = warp_sum(lane < nt / 32 ? red[lane] : 0.0f);
    const float inv = 1.0f / sqrtf(total / (float)width + eps);
    u32 m[NORM_PER];
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        v[i] = v[i] * inv * wv[i];
        if (c < width) {
            dst[c] = v[i];
        }
        // (i * nt < width is the same for the whole block: rounds past the row skipped.)
        m[i] = i * nt < width ? warp_max_bits(c < width ? __float_as_uint(v[i]) & 0x7FFFFFFFu : 0u) : 0u;
    }
    if (!quant) {
        return;
    }
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        if (c < width) {
            q8_store<32>(v[i], m[i], (u64)t * width + c, xq32, xd32, xs32);
        }
    }
    if (width % 256 != 0) {
        return;
    }
    // 256-element blocks: warps 8g .. 8g + 7 of a round hold one (nt is a multiple of 256).
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < NORM_PER; ++i) {
            smax[i][warp] = m[i];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const u32 c = tid + i * nt;
        if (c < width) {
            u32 m8 = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                m8 = max(m8, smax[i][(warp & ~7u) + k]);
            }
            q8_store<256>(v[i], m8, (u64)t * width + c, xq256, xd256, xs256);
        }
    }
}

// norm_q8 with a row spread over a cluster of CL = gridDim.x blocks (2, 4 or 8; the
// backend launches it with that cluster size where the width allows; FFAI_CUDA_NORM=block
// keeps norm_q8): block `rank` of the
// cluster holds the row's slice [rank * width / CL, (rank + 1) * width / CL), a multiple
// of 256 elements, per = slice / 128 <= NORM_PER elements a thread (thread tid holds
// slice elements tid + 128 i, so a warp holds 32 consecutive ones and 256-element
// blocks are rounds 2k and 2k + 1). One block doing a whole row's loads, sums and
// quantization made the norm a chain of dependent phases on one SM; here each SM does a
// slice. The sum of squares: per thread in element order, warps by butterfly, the
// block's four warps in order, then every block adds the cluster's block sums in rank
// order, read from their shared memory (DSMEM) after a cluster barrier, so every block
// has the same total. A second barrier keeps each block's shared memory alive until all
// have read it. grid = (CL, rows), block = NORM_CL_THREADS; same outputs as norm_q8
// (the total's summation order differs).
#define NORM_CL_THREADS 128
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The float at shared address `p` of this block, in the cluster's block `rank`.
__device__ __forceinline__ float cluster_load(const float* p, u32 rank) {
    u32 local, remote;
    asm("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}" : "=r"(local) : "l"(p));
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
extern "C" __global__ void __launch_bounds__(NORM_CL_THREADS)
    norm_q8_cl(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ w, float eps, u32 width,
               u32 add, float* __restrict__ out, Q8_SETS) {
    constexpr u32 WARPS = NORM_CL_THREADS / 32;
    __shared__ float red[WARPS];
    __shared__ float block_sum;
    __shared__ u32 smax[NORM_PER][WARPS];
    u32 rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const u32 t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 slice = width / gridDim.x, per = slice / NORM_CL_THREADS;
    const u32 c0 = rank * slice + tid;  // column of the thread's first element
    const u64 e0 = (u64)t * width + c0;
    float v[NORM_PER], wv[NORM_PER];
    // The weights before the wait (never written during a step), as norm_q8.
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        wv[i] = (u32)i < per ? w[c0 + i * NORM_CL_THREADS] : 0.0f;
    }
    PDL_ENTRY();
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        v[i] = 0.0f;
        if ((u32)i < per) {
            const u64 e = e0 + i * NORM_CL_THREADS;
            v[i] = x[e];
            if (add) {
                v[i] += y[e];
                x[e] = v[i];
            }
            s += v[i] * v[i];
        }
    }
    s = warp_sum(s);
    if (lane == 0) {
        red[warp] = s;
    }
    __syncthreads();
    if (tid == 0) {
        float b = 0.0f;
#pragma unroll
        for (u32 k = 0; k < WARPS; ++k) {
            b += red[k];
        }
        block_sum = b;
    }
    cluster_sync();
    float total = 0.0f;
    for (u32 r = 0; r < gridDim.x; ++r) {
        total += cluster_load(&block_sum, r);
    }
    cluster_sync();
    const float inv = 1.0f / sqrtf(total / (float)width + eps);
    u32 m[NORM_PER];
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        m[i] = 0;
        if ((u32)i < per) {
            v[i] = v[i] * inv * wv[i];
            out[e0 + i * NORM_CL_THREADS] = v[i];
            m[i] = warp_max_bits(__float_as_uint(v[i]) & 0x7FFFFFFFu);
        }
    }
    if (!quant) {
        return;
    }
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        if ((u32)i < per) {
            q8_store<32>(v[i], m[i], e0 + i * NORM_CL_THREADS, xq32, xd32, xs32);
        }
    }
    if (width % 256 != 0) {
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < NORM_PER; ++i) {
            smax[i][warp] = m[i];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        if ((u32)i < per) {
            const int k = i & ~1;  // rounds k, k + 1: one 256-element block
            u32 m8 = 0;
#pragma unroll
            for (u32 j = 0; j < WARPS; ++j) {
                m8 = max(m8, max(smax[k][j], smax[k + 1][j]));
            }
            q8_store<256>(v[i], m8, e0 + i * NORM_CL_THREADS, xq256, xd256, xs256);
        }
    }
}

__device__ __forceinline__ float gelu_tanh_q8(float x) {
    const float k = 0.7978845608f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// gate = act(gate) * up over `len` elements (act 0: SiLU as elementwise.cu's silu_mul,
// 1: tanh GELU as its gelu_mul); with `quant` (len % 32 == 0), the 8-bit sets of the
// result, blocks taken over the flat length (a row of a multiple of 32 / 256 columns
// starts a block). grid = ceil(len / 256), block = 256.
extern "C" __global__ void __launch_bounds__(256)
    glu_q8(float* __restrict__ gate, const float* __restrict__ up, u32 len, u32 act, Q8_SETS) {
    PDL_ENTRY();
    __shared__ u32 smax[8];
    const u32 i = blockIdx.x * 256 + threadIdx.x;
    const bool live = i < len;
    float v = 0.0f;
    if (live) {
        const float g = gate[i];
        v = act == 0 ? g / (1.0f + expf(-g)) * up[i] : gelu_tanh_q8(g) * up[i];
        gate[i] = v;
    }
    if (quant) {
        q8_both(v, live, i, len % 256 == 0, smax, quant, xq32, xd32, xs32, xq256, xd256, xs256);
    }
}

// ------------------------------------------------------------------- the products
//
// All: y[t * rows + r] = W[r] . x[t] for t < n; grid = ceil((rows0 + rows1 + rows2) / 4),
// block = 128 (warp w of block b takes row 4b + w of the parts, see `pick`). `xq`, `xd`, `xs` come from quantize_q8x32 (legacy types)
// or quantize_q8x256 (K-quants) over the same n rows.

// The 8 activation words of 32-element block `b` of token row t.
__device__ __forceinline__ void act32(const signed char* xq, u32 cols, u32 t, u32 b, int (&a)[8]) {
    const uint4* p = (const uint4*)(xq + (u64)t * cols + (u64)b * 32);
    const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
    a[0] = (int)v0.x; a[1] = (int)v0.y; a[2] = (int)v0.z; a[3] = (int)v0.w;
    a[4] = (int)v1.x; a[5] = (int)v1.y; a[6] = (int)v1.z; a[7] = (int)v1.w;
}

// The legacy 32-element blocks (ggml's layouts): Q4_0 (18 bytes: f16 d, 16 bytes of
// nibbles; element j is byte j's low nibble, element j + 16 its high nibble; value
// d * (q - 8)), Q4_1 (20: f16 d, f16 m, nibbles; d * q + m), Q5_0 (22: f16 d, u32 of
// fifth bits (bit j for element j), nibbles; d * (q - 16)), Q5_1 (24: d, m, fifth bits,
// nibbles; d * q + m), Q8_0 (34: f16 d, 32 int8; d * q), MXFP4 (17: an E8M0 exponent
// byte e, then E2M1 codes in Q4_0's nibble order; 2^(e - 128) * KV[code], KV the E2M1
// values doubled so they are integers: mxfp4.rs). Lane L takes blocks L, L + 32, ...;
// per block (d_w * d_x) * isum (+ m * (d_x * Σq_x) for the types with a min, summed
// apart and added at the end), as on the CPU (MXFP4's d_w: 2^(e - 128), as q8/lowbit.rs).
#define K_Q4_0 0
#define K_Q4_1 1
#define K_Q5_0 2
#define K_Q5_1 3
#define K_Q8_0 4
#define K_MXFP4 5

// Bytes of a legacy block, and the offset of its levels.
__host__ __device__ constexpr int legacy_bytes(int k) {
    return k == K_Q4_0 ? 18 : k == K_Q4_1 ? 20 : k == K_Q5_0 ? 22 : k == K_Q5_1 ? 24 : k == K_MXFP4 ? 17 : 34;
}
__host__ __device__ constexpr int legacy_qs(int k) {
    return k == K_Q4_0 ? 2 : k == K_Q4_1 ? 4 : k == K_Q5_0 ? 6 : k == K_Q5_1 ? 8 : k == K_MXFP4 ? 1 : 2;
}

// The byte at `p` (any alignment), from the aligned word holding it: MXFP4's exponent,
// which starts a 17-byte block at any offset.
__device__ __forceinline__ u32 u8_at(const u8* p) {
    return (__ldg((const u32*)((u64)p & ~3ull)) >> (8 * ((u64)p & 3))) & 0xFFu;
}

// Four E2M1 codes (one in the low nibble of each byte of `c`, the high nibbles zero) as
// four signed bytes, twice their values (KV: 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12; code 8 is
// +0), ready for dp4a / mma. The codes' magnitude bits index two 8-byte register tables
// (the positive values, the negated ones) with one byte permute each, and the sign bit
// (bit 3) picks a byte from the negated table: no memory lookups.
__device__ __forceinline__ int e2m1x4(u32 c) {
    // The permute reads its four indices from the low 3 bits of the selector's four
    // nibbles: byte 0 of `pairs` holds codes 0 and 1, byte 2 codes 2 and 3.
    const u32 pairs = c | (c >> 4);
    const u32 sel = __byte_perm(pairs, 0u, 0x0020u) & 0x7777u;
    const u32 pos = __byte_perm(E2M1X2_POS_LO, E2M1X2_POS_HI, sel);
    const u32 neg = __byte_perm(E2M1X2_NEG_LO, E2M1X2_NEG_HI, sel);
    const u32 sign = ((c >> 3) & 0x01010101u) * 0xFFu;
    return (int)((pos & ~sign) | (neg & sign));
}

// Bits 4i .. 4i + 3 of `qh` moved to bit 4 of bytes 0..3.
__device__ __forceinline__ u32 fifth_bits(u32 qh, int i) {
    const u32 hb = (qh >> (4 * i)) & 0xFu;
    return ((hb & 1u) << 4) | ((hb & 2u) << 11) | ((hb & 4u) << 18) | ((hb & 8u) << 25);
}

// A legacy block's bytes as loaded (aligned words; decoded by `legacy_decode`): the
// words holding d (and m), the fifth bits, the levels.
struct LegacyRaw {
    u32 dw, mw, qh;
    u32 qw[8];
};

template <int K>
__device__ __forceinline__ void legacy_load(const u8* blk, LegacyRaw& raw) {
    constexpr bool MIN = K == K_Q4_1 || K == K_Q5_1;
    raw.dw = __ldg((const u32*)((u64)blk & ~3ull));
    raw.mw = MIN ? __ldg((const u32*)((u64)(blk + 2) & ~3ull)) : 0u;
    raw.qh = 0;
    if (K == K_Q8_0) {
        words<8>(blk + 2, raw.qw);
    } else {
        // (MXFP4: dw is the aligned word holding the exponent byte.)
        constexpr int QS = legacy_qs(K);
        u32 qw[4];
        words<4>(blk + QS, qw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            raw.qw[i] = qw[i];
        }
        if (K == K_Q5_0 || K == K_Q5_1) {
            u32 h1[1];
            words<1>(blk + QS - 4, h1);
            raw.qh = h1[0];
        }
    }
}

// The block's scale(s) and its 32 levels as signed bytes (4 a word; minus the zero point
// for the types without a min; MXFP4's the doubled E2M1 values).
template <int K>
__device__ __forceinline__ void legacy_decode(const u8* blk, const LegacyRaw& raw, float& dw, float& mw, int (&q)[8]) {
    constexpr bool MIN = K == K_Q4_1 || K == K_Q5_1;
    if (K == K_MXFP4) {
        dw = mxfp4_half_scale((raw.dw >> (8 * ((u64)blk & 3))) & 0xFFu);
        mw = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            q[i] = e2m1x4(raw.qw[i] & 0x0F0F0F0Fu);
            q[4 + i] = e2m1x4((raw.qw[i] >> 4) & 0x0F0F0F0Fu);
        }
        return;
    }
    dw = f16_bits(((u64)blk & 2) ? (raw.dw >> 16) : raw.dw);
    mw = MIN ? f16_bits(((u64)(blk + 2) & 2) ? (raw.mw >> 16) : raw.mw) : 0.0f;
    if (K == K_Q8_0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            q[i] = (int)raw.qw[i];
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 lo = raw.qw[i] & 0x0F0F0F0Fu, hi = (raw.qw[i] >> 4) & 0x0F0F0F0Fu;
        if (K == K_Q5_0 || K == K_Q5_1) {
            lo |= fifth_bits(raw.qh, i);
            hi |= fifth_bits(raw.qh >> 16, i);
        }
        if (K == K_Q4_0) {
            q[i] = minus8(lo);
            q[4 + i] = minus8(hi);
        } else if (K == K_Q5_0) {
            q[i] = (int)((lo + 0x70707070u) ^ 0x80808080u);  // q - 16
            q[4 + i] = (int)((hi + 0x70707070u) ^ 0x80808080u);
        } else {
            q[i] = (int)lo;
            q[4 + i] = (int)hi;
        }
    }
}

// One 32-element block's terms for each activation row t < n: (d_w * d_x) * isum into
// acc[t] and, for the types with a min, m * (d_x * Σq_x) into sm[t] (apart, as the CPU
// adds them).
template <int MAXN, bool MIN>
__device__ __forceinline__ void block_dots(const int (&q)[8], float dw, float mw, const signed char* __restrict__ xq,
                                           const float* __restrict__ xd, const int* __restrict__ xs, u32 cols, u32 nb,
                                           u32 b, u32 n, float (&acc)[MAXN], float (&sm)[MAXN]) {
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        if ((u32)t < n) {
            int a[8];
            act32(xq, cols, t, b, a);
            int s = 0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                s = dp4a(q[i], a[i], s);
            }
            const float dx = __ldg(xd + (u64)t * nb + b);
            acc[t] += (dw * dx) * (float)s;
            if (MIN) {
                sm[t] += mw * (dx * (float)__ldg(xs + (u64)t * nb + b));
            }
        }
    }
}

// Lane L takes blocks L, L + 32, ... in order, two at a time with both blocks' loads
// issued before either is used (MAXN: the most activation rows, 1 for a decode step of
// one sequence: the same per-row arithmetic as 8, fewer registers).
template <int K, int MAXN>
__device__ __forceinline__ void mv_legacy(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                          const float* __restrict__ xd, const int* __restrict__ xs,
                                          float* __restrict__ y, u32 rows, u32 r, u32 cols, u32 n) {
    constexpr bool MIN = K == K_Q4_1 || K == K_Q5_1;
    constexpr int BYTES = legacy_bytes(K);
    const u32 lane = threadIdx.x & 31;
    const u32 nb = cols / 32;
    const u8* row = w + (u64)r * row_bytes;
    float acc[MAXN], sm[MAXN];
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        acc[t] = 0.0f;
        sm[t] = 0.0f;
    }
    for (u32 b0 = lane; b0 < nb; b0 += 64) {
        LegacyRaw raw[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const u32 b = b0 + 32 * u;
            if (b < nb) {
                legacy_load<K>(row + (u64)b * BYTES, raw[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const u32 b = b0 + 32 * u;
            if (b >= nb) {
                break;
            }
            float dw, mw;
            int q[8];
            legacy_decode<K>(row + (u64)b * BYTES, raw[u], dw, mw, q);
            block_dots<MAXN, MIN>(q, dw, mw, xq, xd, xs, cols, nb, b, n, acc, sm);
        }
    }
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        if ((u32)t < n) {
            const float s = warp_sum(MIN ? acc[t] + sm[t] : acc[t]);
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

// The split row layout (`quant::split_rows`, the device copy of Q4_0 and Q8_0 matrices
// whose rows are whole multiples of 256 elements): a row of nb blocks holds the blocks'
// levels first (16 bytes a Q4_0 block, 32 a Q8_0 block, in the stored order) and then the
// nb f16 scales, so the row keeps its length and alignment (nb % 8 == 0 makes it a
// multiple of 16 bytes) and a warp's levels for 32 consecutive blocks are one contiguous
// 512 (1024) bytes read as 16-byte loads, its scales 64 contiguous bytes. Decoded into
// exactly the values of `legacy_decode` (same levels, same scale), so the products give the
// stored layout's bits.
template <int K>
struct Split {
    static constexpr int QB = K == K_Q4_0 ? 16 : 32;
    static constexpr int NV = QB / 16;
};

template <int K>
__device__ __forceinline__ void split_load(const u8* row, u32 nb, u32 b, uint4 (&lv)[Split<K>::NV], u32& dbits) {
    const uint4* p = (const uint4*)(row + (u64)b * Split<K>::QB);
#pragma unroll
    for (int i = 0; i < Split<K>::NV; ++i) {
        lv[i] = __ldg(p + i);
    }
    dbits = (u32)__ldg((const unsigned short*)(row + (u64)nb * Split<K>::QB) + b);
}

template <int K>
__device__ __forceinline__ void split_decode(const uint4 (&lv)[Split<K>::NV], int (&q)[8]) {
    if (K == K_Q8_0) {
        q[0] = (int)lv[0].x; q[1] = (int)lv[0].y; q[2] = (int)lv[0].z; q[3] = (int)lv[0].w;
        q[4] = (int)lv[Split<K>::NV - 1].x; q[5] = (int)lv[Split<K>::NV - 1].y;
        q[6] = (int)lv[Split<K>::NV - 1].z; q[7] = (int)lv[Split<K>::NV - 1].w;
        return;
    }
    const u32 w[4] = {lv[0].x, lv[0].y, lv[0].z, lv[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        q[i] = minus8(w[i] & 0x0F0F0F0Fu);
        q[4 + i] = minus8((w[i] >> 4) & 0x0F0F0F0Fu);
    }
}

// mv_legacy's arithmetic on the split layout: lane L takes blocks L, L + 32, ... in order
// (four loaded before any is used), per block (d_w * d_x) * isum, so the bits are
// mv_legacy<K>'s.
template <int K, int MAXN>
__device__ __forceinline__ void mv_split(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                         const float* __restrict__ xd, const int* __restrict__,
                                         float* __restrict__ y, u32 rows, u32 r, u32 cols, u32 n) {
    constexpr int U = 4;
    const u32 lane = threadIdx.x & 31;
    const u32 nb = cols / 32;
    const u8* row = w + (u64)r * row_bytes;
    float acc[MAXN];
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        acc[t] = 0.0f;
    }
    for (u32 b0 = lane; b0 < nb; b0 += 32 * U) {
        uint4 lv[U][Split<K>::NV];
        u32 db[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 b = b0 + 32 * u;
            if (b < nb) {
                split_load<K>(row, nb, b, lv[u], db[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 b = b0 + 32 * u;
            if (b >= nb) {
                break;
            }
            int q[8];
            split_decode<K>(lv[u], q);
            block_dots<MAXN, false>(q, f16_bits(db[u]), 0.0f, xq, xd, nullptr, cols, nb, b, n, acc, acc);
        }
    }
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        if ((u32)t < n) {
            const float s = warp_sum(acc[t]);
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

// A decode product's entry: the warp's weight row (its first 4 KB: a line a lane) is
// asked into L2 *before* the kernel waits for its predecessor (PDL_ENTRY). Weights never
// change during a step, so reading them early is safe, and the predecessors of the
// products (a norm, the attention, an activation) leave the memory bus idle: the first
// wave's rows arrive while they run. Nothing else is read or written before the wait.
__device__ __forceinline__ void entry_prefetching_row(bool live, const u8* w, u32 r, u64 row_bytes) {
    if (live) {
        const u64 start = (u64)w + (u64)r * row_bytes, end = start + row_bytes;
        const u64 line = (start & ~127ull) + (u64)(threadIdx.x & 31) * 128;
        if (line < end) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
        }
    }
    PDL_ENTRY();
}

// The extern kernels over the parts: `NAME` runs `BODY<ARG>` on the warp's row (a warp
// past the last part's rows has nothing to do).
#define Q8X_KERNEL(NAME, BODY, ARG)                                                                         \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
        NAME(PARTS, u64 row_bytes, const signed char* xq, const float* xd, const int* xs, u32 cols, u32 n) { \
        Row o{};                                                                                            \
        const bool live = pick(w0, w1, w2, y0, y1, y2, rows0, rows1, rows2, o);                             \
        entry_prefetching_row(live, o.w, o.r, row_bytes);                                                   \
        if (live) {                                                                                         \
            BODY<ARG, Q8X_MAX_N>(o.w, row_bytes, xq, xd, xs, o.y, o.rows, o.r, cols, n);                    \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                                     \
        NAME##_n1(PARTS, u64 row_bytes, const signed char* xq, const float* xd, const int* xs, u32 cols, u32 n) { \
        Row o{};                                                                                            \
        const bool live = pick(w0, w1, w2, y0, y1, y2, rows0, rows1, rows2, o);                             \
        entry_prefetching_row(live, o.w, o.r, row_bytes);                                                   \
        if (live) {                                                                                         \
            BODY<ARG, 1>(o.w, row_bytes, xq, xd, xs, o.y, o.rows, o.r, cols, 1);                            \
        }                                                                                                   \
    }

// Each product comes twice: NAME for up to Q8X_MAX_N activation rows and NAME_n1 for one
// (the same arithmetic per row, so the same bits, with the registers of one row: more
// warps in flight). The backend takes NAME_n1 when a launch has one row.
Q8X_KERNEL(mv_q8x_q4_0, mv_legacy, K_Q4_0)

Q8X_KERNEL(mv_q8x_q4_1, mv_legacy, K_Q4_1)

Q8X_KERNEL(mv_q8x_q5_0, mv_legacy, K_Q5_0)

Q8X_KERNEL(mv_q8x_q5_1, mv_legacy, K_Q5_1)

Q8X_KERNEL(mv_q8x_q8_0, mv_legacy, K_Q8_0)

Q8X_KERNEL(mv_q8x_mxfp4, mv_legacy, K_MXFP4)

Q8X_KERNEL(mv_q8x_q4_0s, mv_split, K_Q4_0)

Q8X_KERNEL(mv_q8x_q8_0s, mv_split, K_Q8_0)


// Byte j (0..7) of the pair (lo, hi).
__device__ __forceinline__ int byte8(u32 lo, u32 hi, int j) {
    return (int)((j < 4 ? lo >> (8 * j) : hi >> (8 * (j - 4))) & 0xFFu);
}

// K-quants: 256-element super-blocks, four lanes each (lane % 4 = which 64 elements), the
// lanes' integer sums added exactly (shuffles) so each super-block contributes the CPU's
// f32 terms once. Every lane runs the same number of iterations (the shuffles need the
// whole warp); lanes past the row's end contribute zero.
//
// Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales/mins (8 sub-blocks of 32),
// 128 bytes of nibbles: bytes 32c..32c+31 hold elements 64c.. (low nibbles, sub-block 2c)
// and 64c + 32.. (high nibbles, sub-block 2c + 1). Value d*sc*q - dmin*mn.
// Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], f16 d. Half h (128 elements), l < 32:
// element 128h + l + 32k takes ql[64h + l (+32 for k odd)]'s low (k < 2) or high nibble and
// qh[32h + l]'s bits 2k..2k+1 as its top two bits; value d * sc[(128h + 32k + l) / 16] * (q - 32).
// Lane c = 2h + lh takes l in [16 lh, 16 lh + 16) of half h.
template <bool Q6, int UNR, int MAXN>
__device__ __forceinline__ void mv_kquant(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                          const float* __restrict__ xd, const int* __restrict__ xs,
                                          float* __restrict__ y, u32 rows, u32 r, u32 cols, u32 n) {
    const u32 lane = threadIdx.x & 31;
    const u32 nsb = cols / 256;
    const u32 c = lane & 3;
    const u8* row = w + (u64)r * row_bytes;
    float acc[MAXN];
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        acc[t] = 0.0f;
    }
#pragma unroll UNR
    for (u32 sb0 = 0; sb0 < nsb; sb0 += 8) {
        const u32 sb = sb0 + (lane >> 2);
        const bool ok = sb < nsb;
        const u8* blk = row + (u64)(ok ? sb : 0) * (Q6 ? 210 : 144);
        // The weights' four (Q4_K: two) groups of levels as signed words, with their scales.
        int q[4][4];
        int sc[4];
        int mn[2] = {0, 0};
        float d, dmin = 0.0f;
        if (!Q6) {
            const uint4 hd = __ldg((const uint4*)blk);  // d, dmin, scales[0..12)
            d = f16_bits(hd.x);
            dmin = f16_bits(hd.x >> 16);
            const u32 w0 = hd.y, w1 = hd.z, w2 = hd.w;
            const u32 sc_lo = w0 & 0x3F3F3F3Fu, mn_lo = w1 & 0x3F3F3F3Fu;
            const u32 sc_hi = (w2 & 0x0F0F0F0Fu) | (((w0 >> 6) & 0x03030303u) << 4);
            const u32 mn_hi = ((w2 >> 4) & 0x0F0F0F0Fu) | (((w1 >> 6) & 0x03030303u) << 4);
            sc[0] = byte8(sc_lo, sc_hi, 2 * c);
            sc[1] = byte8(sc_lo, sc_hi, 2 * c + 1);
            mn[0] = byte8(mn_lo, mn_hi, 2 * c);
            mn[1] = byte8(mn_lo, mn_hi, 2 * c + 1);
            const uint4* qs = (const uint4*)(blk + 16 + 32 * c);
            const uint4 a0 = __ldg(qs), a1 = __ldg(qs + 1);
            const u32 qw[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                q[i >> 2][i & 3] = (int)(qw[i] & 0x0F0F0F0Fu);
                q[2 + (i >> 2)][i & 3] = (int)((qw[i] >> 4) & 0x0F0F0F0Fu);
            }
        } else {
            const u32 h = c >> 1, lh = c & 1;
            u32 a[4], b[4], hh[4];
            words<4>(blk + 64 * h + 16 * lh, a);
            words<4>(blk + 64 * h + 32 + 16 * lh, b);
            words<4>(blk + 128 + 32 * h + 16 * lh, hh);
            d = f16_at(blk + 208);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                q[0][i] = minus32((a[i] & 0x0F0F0F0Fu) | ((hh[i] & 0x03030303u) << 4));
                q[1][i] = minus32((b[i] & 0x0F0F0F0Fu) | (((hh[i] >> 2) & 0x03030303u) << 4));
                q[2][i] = minus32(((a[i] >> 4) & 0x0F0F0F0Fu) | (((hh[i] >> 4) & 0x03030303u) << 4));
                q[3][i] = minus32(((b[i] >> 4) & 0x0F0F0F0Fu) | (((hh[i] >> 6) & 0x03030303u) << 4));
            }
            u32 s2[2];
            words<2>(blk + 192 + 8 * h, s2);  // scales[8h .. 8h + 8)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                sc[k] = (int)(signed char)byte8(s2[0], s2[1], 2 * k + lh);
            }
        }
#pragma unroll
        for (int t = 0; t < MAXN; ++t) {
            if ((u32)t < n) {
                const signed char* xt = xq + (u64)t * cols + (u64)(ok ? sb : 0) * 256;
                int sumi = 0, msum = 0;
                if (!Q6) {
                    // Sub-blocks 2c (low nibbles) and 2c + 1 (high): 32 levels each.
#pragma unroll
                    for (int s = 0; s < 2; ++s) {
                        const uint4* p = (const uint4*)(xt + 64 * c + 32 * s);
                        const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
                        int dot = 0;
                        dot = dp4a(q[2 * s][0], (int)v0.x, dot);
                        dot = dp4a(q[2 * s][1], (int)v0.y, dot);
                        dot = dp4a(q[2 * s][2], (int)v0.z, dot);
                        dot = dp4a(q[2 * s][3], (int)v0.w, dot);
                        dot = dp4a(q[2 * s + 1][0], (int)v1.x, dot);
                        dot = dp4a(q[2 * s + 1][1], (int)v1.y, dot);
                        dot = dp4a(q[2 * s + 1][2], (int)v1.z, dot);
                        dot = dp4a(q[2 * s + 1][3], (int)v1.w, dot);
                        sumi += sc[s] * dot;
                        msum += mn[s] * __ldg(xs + (u64)t * (cols / 32) + (u64)(ok ? sb : 0) * 8 + 2 * c + s);
                    }
                } else {
                    const u32 h = c >> 1, lh = c & 1;
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const uint4 v = __ldg((const uint4*)(xt + 128 * h + 32 * k + 16 * lh));
                        int dot = 0;
                        dot = dp4a(q[k][0], (int)v.x, dot);
                        dot = dp4a(q[k][1], (int)v.y, dot);
                        dot = dp4a(q[k][2], (int)v.z, dot);
                        dot = dp4a(q[k][3], (int)v.w, dot);
                        sumi += sc[k] * dot;
                    }
                }
                // The super-block's four lanes: exact integer sums.
                sumi += __shfl_xor_sync(FULL, sumi, 1);
                sumi += __shfl_xor_sync(FULL, sumi, 2);
                if (!Q6) {
                    msum += __shfl_xor_sync(FULL, msum, 1);
                    msum += __shfl_xor_sync(FULL, msum, 2);
                }
                if (ok && c == 0) {
                    const float da = __ldg(xd + (u64)t * nsb + sb);
                    acc[t] += (d * da) * (float)sumi;
                    if (!Q6) {
                        acc[t] -= (dmin * da) * (float)msum;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        if ((u32)t < n) {
            const float s = warp_sum(acc[t]);
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

#define KQ(Q6, UNR) Q6, UNR
// Q4_K's super-block loop unrolled by two: 1.2-1.35x on the 8B shapes' o and down
// products on the H100 (examples/cuda_mv_bench.rs, session 11), the same bits.
Q8X_KERNEL(mv_q8x_q4_k, mv_kquant, KQ(false, 2))

Q8X_KERNEL(mv_q8x_q6_k, mv_kquant, KQ(true, 1))

// ------------------------------------------------------------------- f16 / bf16
//
// cols % 8 == 0 (rows 16-byte aligned): lane L reads 8 weights (one 128-bit load) at
// columns 8L, 8L + 256, ...; two partial sums per lane (even and odd elements), then the
// butterfly.
template <bool BF>
__device__ __forceinline__ float widen(u32 h) {
    return BF ? __uint_as_float((h & 0xFFFFu) << 16) : f16_bits(h);
}

template <bool BF, int MAXN>
__device__ __forceinline__ void mv_half(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x,
                                        float* __restrict__ y, u32 rows, u32 r, u32 cols, u32 n) {
    const u32 lane = threadIdx.x & 31;
    const uint4* row = (const uint4*)(w + (u64)r * row_bytes);
    float acc0[MAXN], acc1[MAXN];
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        acc0[t] = 0.0f;
        acc1[t] = 0.0f;
    }
    const u32 nv = cols / 8;
#pragma unroll 8
    for (u32 i = lane; i < nv; i += 32) {
        const uint4 v = __ldg(row + i);
        const u32 hw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int t = 0; t < MAXN; ++t) {
            if ((u32)t < n) {
                const float4* xp = (const float4*)(x + (u64)t * cols + (u64)i * 8);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
                const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    acc0[t] = __fmaf_rn(widen<BF>(hw[k]), xv[2 * k], acc0[t]);
                    acc1[t] = __fmaf_rn(widen<BF>(hw[k] >> 16), xv[2 * k + 1], acc1[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MAXN; ++t) {
        if ((u32)t < n) {
            const float s = warp_sum(__fadd_rn(acc0[t], acc1[t]));
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

#define HALF_KERNEL(NAME, BF, MAXN)                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                    \
        NAME(PARTS, u64 row_bytes, const float* x, u32 cols, u32 n) {                    \
        Row o{};                                                                           \
        const bool live = pick(w0, w1, w2, y0, y1, y2, rows0, rows1, rows2, o);            \
        entry_prefetching_row(live, o.w, o.r, row_bytes);                                  \
        if (live) {                                                                        \
            mv_half<BF, MAXN>(o.w, row_bytes, x, o.y, o.rows, o.r, cols, MAXN == 1 ? 1 : n); \
        }                                                                                  \
    }

HALF_KERNEL(mv_half_f16, false, Q8X_MAX_N)
HALF_KERNEL(mv_half_f16_n1, false, 1)
HALF_KERNEL(mv_half_bf16, true, Q8X_MAX_N)
HALF_KERNEL(mv_half_bf16_n1, true, 1)

// ------------------------------------------------------- tensor-core products (mmq)
//
// From GEMM_MIN_ROWS activation rows (batched decode, prefill): the stored blocks' integer
// levels times the 8-bit activations on the int8 tensor cores (mma.m16n8k32), each block's
// integer products scaled as the decode kernels scale them — no bf16 copy of the weights.
// A block of 8 warps covers MMQ_ROWS weight rows x MMQ_TOK tokens: warp w takes the 16
// rows of group w % 2 and every MMQ_KSPLIT-th unit of k (a 32-element block, a K-quant
// super-block) from w / 2, so a 4096-row matrix spreads over ~1500 warps; the k-split
// warps' sums are then added in a fixed order through shared memory. Grid: (ceil(n /
// MMQ_TOK), ceil(rows / MMQ_ROWS)): neighbouring blocks share weight rows (read once from
// memory, then from L2). y is [n][rows]; the activations are quantize_q8x32's (legacy
// types) or quantize_q8x256's (Q4_K) sets.
//
// mma.m16n8k32 fragments (g = lane / 4, c = lane % 4): A (weights, 16 rows x 32) a0 = row
// g, k 4c..4c+3; a1 = row g + 8, same k; a2 = row g, k 16+4c..; a3 = row g + 8, k 16+4c..;
// B (activations, 32 x 8 tokens) b0 = token g, k 4c..4c+3; b1 = token g, k 16+4c..;
// C (16 x 8, s32) c0, c1 = row g, tokens 2c, 2c+1; c2, c3 = row g + 8, same tokens.
#define MMQ_TOK 64
#define MMQ_ROWS 32
#define MMQ_KSPLIT 4
#define MMQ_THREADS 256

__device__ __forceinline__ void mma_s8(int (&c)[4], int a0, int a1, int a2, int a3, int b0, int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A K-quant sub-block's product added to the integer sums: isum += (s0, s0, s1, s1) times
// the m16n8k32 product's C fragment (rows g and g + 8 scaled by their sub-block scales).
__device__ __forceinline__ void mma_s8_scaled(int (&isum)[4], int s0, int s1, int a0, int a1, int a2, int a3, int b0,
                                              int b1) {
    int p[4] = {0, 0, 0, 0};
    mma_s8(p, a0, a1, a2, a3, b0, b1);
    isum[0] += s0 * p[0];
    isum[1] += s0 * p[1];
    isum[2] += s1 * p[2];
    isum[3] += s1 * p[3];
}

// A legacy block's levels 4c..4c+3 (lo) and 16+4c..16+4c+3 (hi) as signed bytes (as
// legacy_decode's q[c] and q[4 + c]), its scale d and min m.
template <int K>
__device__ __forceinline__ void legacy_frag(const u8* blk, u32 c, int& lo, int& hi, float& d, float& m) {
    constexpr int QS = legacy_qs(K);
    if (K == K_MXFP4) {
        d = mxfp4_half_scale(u8_at(blk));
        m = 0.0f;
        u32 q[1];
        words<1>(blk + QS + 4 * c, q);
        lo = e2m1x4(q[0] & 0x0F0F0F0Fu);
        hi = e2m1x4((q[0] >> 4) & 0x0F0F0F0Fu);
        return;
    }
    d = f16_at(blk);
    m = (K == K_Q4_1 || K == K_Q5_1) ? f16_at(blk + 2) : 0.0f;
    if (K == K_Q8_0) {
        u32 a[1], b[1];
        words<1>(blk + 2 + 4 * c, a);
        words<1>(blk + 18 + 4 * c, b);
        lo = (int)a[0];
        hi = (int)b[0];
        return;
    }
    u32 q[1];
    words<1>(blk + QS + 4 * c, q);
    u32 l = q[0] & 0x0F0F0F0Fu, h = (q[0] >> 4) & 0x0F0F0F0Fu;
    if (K == K_Q5_0 || K == K_Q5_1) {
        u32 qh[1];
        words<1>(blk + QS - 4, qh);
        l |= fifth_bits(qh[0], c);
        h |= fifth_bits(qh[0] >> 16, c);
    }
    if (K == K_Q4_0) {
        lo = minus8(l);
        hi = minus8(h);
    } else if (K == K_Q5_0) {
        lo = (int)((l + 0x70707070u) ^ 0x80808080u);  // q - 16
        hi = (int)((h + 0x70707070u) ^ 0x80808080u);
    } else {
        lo = (int)l;
        hi = (int)h;
    }
}

// A block's MMQ_TOK tokens: which are live, which activation row token i (0..MMQ_TOK) of
// the block reads (`x`) and which output row it writes (`y`). A dense product's block
// takes tokens t0 .. t0 + MMQ_TOK of its n rows (both rows are the token); a grouped MoE
// product's block takes one tile of an expert's slots (`MoeToks`, below).
struct DenseToks {
    u32 t0, n;
    __device__ __forceinline__ bool live(u32 i) const { return t0 + i < n; }
    __device__ __forceinline__ u64 x(u32 i) const { return t0 + i; }
    __device__ __forceinline__ u64 y(u32 i) const { return t0 + i; }
};

// The B fragment of the block's token i at k offset k0 (zeros for a token that is not live).
template <class Toks>
__device__ __forceinline__ void mmq_b(const signed char* __restrict__ xq, u32 cols, const Toks& tk, u32 i, u32 k0,
                                      u32 c, int& b0, int& b1) {
    b0 = 0;
    b1 = 0;
    if (tk.live(i)) {
        const int* p = (const int*)(xq + tk.x(i) * cols + k0 + 4 * c);
        b0 = __ldg(p);
        b1 = __ldg(p + 4);
    }
}

// The k-split warps' sums added in order (warp group 0 keeps them) and stored.
template <class Toks>
__device__ __forceinline__ void mmq_store(float (&acc)[8][4], float* __restrict__ y, u32 rows, const Toks& tk,
                                          u32 r0) {
    __shared__ float red[MMQ_KSPLIT - 1][2][32][32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rg = warp & 1, ks = warp >> 1;
    const u32 c = lane & 3;
    if (ks > 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                red[ks - 1][rg][j * 4 + e][lane] = acc[j][e];
            }
        }
    }
    __syncthreads();
    if (ks != 0) {
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float v = acc[j][e];
#pragma unroll
            for (int q = 0; q < MMQ_KSPLIT - 1; ++q) {
                v += red[q][rg][j * 4 + e][lane];
            }
            const u32 row = r0 + (e < 2 ? 0 : 8), i = 8 * j + 2 * c + (e & 1);
            if (row < rows && tk.live(i)) {
                y[tk.y(i) * rows + row] = v;
            }
        }
    }
}

// A warp's place in an mmq block: lane group g and index c (the fragments' layout), its
// k split, first row (r0; the lane's rows are r0 and r0 + 8) and those two rows'
// addresses (rows past the matrix read its last row and store nothing).
struct MmqWarp {
    u32 g, c, ks, r0;
    const u8 *w0, *w1;
};

__device__ __forceinline__ MmqWarp mmq_warp(const u8* w, u64 row_bytes, u32 rows) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rg = warp & 1;
    MmqWarp m;
    m.g = lane >> 2;
    m.c = lane & 3;
    m.ks = warp >> 1;
    m.r0 = blockIdx.y * MMQ_ROWS + rg * 16 + m.g;
    m.w0 = w + (u64)min(m.r0, rows - 1) * row_bytes;
    m.w1 = w + (u64)min(m.r0 + 8, rows - 1) * row_bytes;
    return m;
}

__device__ __forceinline__ void mmq_zero(float (&acc)[8][4]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[j][e] = 0.0f;
        }
    }
}

// legacy_frag on the split layout (see `Split`): the same levels and scale.
template <int K>
__device__ __forceinline__ void split_frag(const u8* row, u32 nb, u32 b, u32 c, int& lo, int& hi, float& d) {
    const u8* lv = row + (u64)b * Split<K>::QB;
    d = f16_bits((u32)__ldg((const unsigned short*)(row + (u64)nb * Split<K>::QB) + b));
    const u32 q = __ldg((const u32*)(lv + 4 * c));
    if (K == K_Q8_0) {
        lo = (int)q;
        hi = (int)__ldg((const u32*)(lv + 16 + 4 * c));
        return;
    }
    lo = minus8(q & 0x0F0F0F0Fu);
    hi = minus8((q >> 4) & 0x0F0F0F0Fu);
}

template <int K, bool SPLIT, class Toks>
__device__ __forceinline__ void mmq_legacy(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                           const float* __restrict__ xd, const int* __restrict__ xs,
                                           float* __restrict__ y, u32 rows, u32 cols, const Toks& tk) {
    constexpr bool MIN = K == K_Q4_1 || K == K_Q5_1;
    constexpr int BYTES = legacy_bytes(K);
    const MmqWarp m = mmq_warp(w, row_bytes, rows);
    const u32 g = m.g, c = m.c, ks = m.ks;
    const u8 *w0 = m.w0, *w1 = m.w1;
    const u32 nb = cols / 32;
    float acc[8][4];
    mmq_zero(acc);
    PDL_ENTRY();
    for (u32 b = ks; b < nb; b += MMQ_KSPLIT) {
        int a0, a1, a2, a3;
        float d0, m0, d1, m1;
        if (SPLIT) {
            split_frag<K>(w0, nb, b, c, a0, a2, d0);
            split_frag<K>(w1, nb, b, c, a1, a3, d1);
            m0 = m1 = 0.0f;
        } else {
            legacy_frag<K>(w0 + (u64)b * BYTES, c, a0, a2, d0, m0);
            legacy_frag<K>(w1 + (u64)b * BYTES, c, a1, a3, d1, m1);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int b0, b1;
            mmq_b(xq, cols, tk, 8 * j + g, b * 32, c, b0, b1);
            int p[4] = {0, 0, 0, 0};
            mma_s8(p, a0, a1, a2, a3, b0, b1);
            const u32 t = 8 * j + 2 * c;  // C's tokens t, t + 1 of the block
            const float dx0 = tk.live(t) ? __ldg(xd + tk.x(t) * nb + b) : 0.0f;
            const float dx1 = tk.live(t + 1) ? __ldg(xd + tk.x(t + 1) * nb + b) : 0.0f;
            acc[j][0] += (d0 * dx0) * (float)p[0];
            acc[j][1] += (d0 * dx1) * (float)p[1];
            acc[j][2] += (d1 * dx0) * (float)p[2];
            acc[j][3] += (d1 * dx1) * (float)p[3];
            if (MIN) {
                const float s0 = tk.live(t) ? dx0 * (float)__ldg(xs + tk.x(t) * nb + b) : 0.0f;
                const float s1 = tk.live(t + 1) ? dx1 * (float)__ldg(xs + tk.x(t + 1) * nb + b) : 0.0f;
                acc[j][0] += m0 * s0;
                acc[j][1] += m0 * s1;
                acc[j][2] += m1 * s0;
                acc[j][3] += m1 * s1;
            }
        }
    }
    mmq_store(acc, y, rows, tk, m.r0);
}

// Q4_K: per super-block, each sub-block's integer products times its 6-bit scale summed
// in integers, the mins' term from the activations' per-32 sums, then (d * dx) * isum -
// (dmin * dx) * msum as mv_kquant does.
struct Q4kHead {
    float d, dmin;
    u32 sc_lo, sc_hi, mn_lo, mn_hi;
};

__device__ __forceinline__ Q4kHead q4k_head_of(uint4 hd) {
    Q4kHead h;
    h.d = f16_bits(hd.x);
    h.dmin = f16_bits(hd.x >> 16);
    h.sc_lo = hd.y & 0x3F3F3F3Fu;
    h.mn_lo = hd.z & 0x3F3F3F3Fu;
    h.sc_hi = (hd.w & 0x0F0F0F0Fu) | (((hd.y >> 6) & 0x03030303u) << 4);
    h.mn_hi = ((hd.w >> 4) & 0x0F0F0F0Fu) | (((hd.z >> 6) & 0x03030303u) << 4);
    return h;
}

__device__ __forceinline__ Q4kHead q4k_head(const u8* blk) { return q4k_head_of(__ldg((const uint4*)blk)); }

template <class Toks>
__device__ __forceinline__ void mmq_q4k(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                        const float* __restrict__ xd, const int* __restrict__ xs,
                                        float* __restrict__ y, u32 rows, u32 cols, const Toks& tk) {
    const MmqWarp m = mmq_warp(w, row_bytes, rows);
    const u32 g = m.g, c = m.c, ks = m.ks;
    const u8 *w0 = m.w0, *w1 = m.w1;
    const u32 nsb = cols / 256, nb = cols / 32;
    float acc[8][4];
    mmq_zero(acc);
    PDL_ENTRY();
    for (u32 sb = ks; sb < nsb; sb += MMQ_KSPLIT) {
        const u8* b0p = w0 + (u64)sb * 144;
        const u8* b1p = w1 + (u64)sb * 144;
        const Q4kHead h0 = q4k_head(b0p), h1 = q4k_head(b1p);
        int isum[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                isum[j][e] = 0;
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            // Bytes 32q + 4c.. and 32q + 16 + 4c..: sub-block 2q in their low nibbles,
            // 2q + 1 in their high nibbles.
            const u32 x0 = __ldg((const u32*)(b0p + 16 + 32 * q + 4 * c));
            const u32 y0 = __ldg((const u32*)(b0p + 32 + 32 * q + 4 * c));
            const u32 x1 = __ldg((const u32*)(b1p + 16 + 32 * q + 4 * c));
            const u32 y1 = __ldg((const u32*)(b1p + 32 + 32 * q + 4 * c));
#pragma unroll
            for (int hb = 0; hb < 2; ++hb) {
                const int sub = 2 * q + hb, sh = 4 * hb;
                const int a0 = (int)((x0 >> sh) & 0x0F0F0F0Fu), a2 = (int)((y0 >> sh) & 0x0F0F0F0Fu);
                const int a1 = (int)((x1 >> sh) & 0x0F0F0F0Fu), a3 = (int)((y1 >> sh) & 0x0F0F0F0Fu);
                const int s0 = byte8(h0.sc_lo, h0.sc_hi, sub), s1 = byte8(h1.sc_lo, h1.sc_hi, sub);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    int b0, b1;
                    mmq_b(xq, cols, tk, 8 * j + g, sb * 256 + 32 * sub, c, b0, b1);
                    mma_s8_scaled(isum[j], s0, s1, a0, a1, a2, a3, b0, b1);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const u32 t = 8 * j + 2 * c + u;
                if (!tk.live(t)) {
                    continue;
                }
                const float dx = __ldg(xd + tk.x(t) * nsb + sb);
                const uint4* sp = (const uint4*)(xs + tk.x(t) * nb + (u64)sb * 8);
                const uint4 sa = __ldg(sp), sbv = __ldg(sp + 1);
                const int sums[8] = {(int)sa.x, (int)sa.y, (int)sa.z, (int)sa.w,
                                     (int)sbv.x, (int)sbv.y, (int)sbv.z, (int)sbv.w};
                int m0 = 0, m1 = 0;
#pragma unroll
                for (int sub = 0; sub < 8; ++sub) {
                    m0 += byte8(h0.mn_lo, h0.mn_hi, sub) * sums[sub];
                    m1 += byte8(h1.mn_lo, h1.mn_hi, sub) * sums[sub];
                }
                acc[j][u] += (h0.d * dx) * (float)isum[j][u];
                acc[j][u] -= (h0.dmin * dx) * (float)m0;
                acc[j][2 + u] += (h1.d * dx) * (float)isum[j][2 + u];
                acc[j][2 + u] -= (h1.dmin * dx) * (float)m1;
            }
        }
    }
    mmq_store(acc, y, rows, tk, m.r0);
}

// ------------------------------------------------- staged tensor-core products (split)
//
// The int8 tensor-core product for the split layouts (Q4_0 / Q8_0 rows of whole 256-element
// runs, see `Split`), with both operands staged through shared memory: a block of 8 warps
// takes 64 weight rows by 64 tokens, and steps through k KB 32-element blocks at a time. Each step's weight levels (Q4_0 nibbles widened to signed bytes, less
// the zero point 8) and scales, and the activations' levels and scales, are loaded once
// into shared memory by the whole block (16-byte loads; the next step's are in flight
// while the current one is multiplied), so a weight byte is read from memory once per 64
// tokens and an activation once per 64 rows. Warp w takes rows 16 (w % 4) .. + 16 and
// tokens 32 (w / 4) .. + 32: four m16n8k32 products a 32-element block. Per (row, token)
// the blocks' (d_w * d_x) * isum are added in block order, as the CPU's q8 dot adds them.
// Launch: grid (ceil(n / 64), ceil(rows / 64)), 256 threads; cols % (32 KB) == 0.
// On an H100 (session 14, 64 sequences of the 8B Q4_0) they took a decode step from 25.7
// to 14.6 ms (KB = 4; 15.4 with KB = 8); in a 512-token prefill they lose to dequantize +
// cuBLAS (8360 against 14213 tok/s), so steps of up to 64 rows take them.
#define MMQS_ROWS 64
#define MMQS_TOK 64

// A staged block's warp accumulators: rows row0 (e < 2) and row0 + 8, tokens
// tok0 + 8 j + (e & 1) (the m16n8 C fragments of its four token groups).
__device__ __forceinline__ void mmqs_zero(float (&acc)[4][4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[j][e] = 0.0f;
        }
    }
}

// (tok0: the first of the warp's tokens within the block; tk: the block's tokens.)
template <class Toks>
__device__ __forceinline__ void mmqs_store(const float (&acc)[4][4], float* __restrict__ y, u32 rows, const Toks& tk,
                                           u32 row0, u32 tok0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 row = row0 + (e < 2 ? 0 : 8), i = tok0 + 8 * j + (e & 1);
            if (row < rows && tk.live(i)) {
                y[tk.y(i) * rows + row] = acc[j][e];
            }
        }
    }
}

// KB: 32-element blocks a step (4 or 8). Shared rows of 32 KB levels are padded by 16
// bytes: the fragments' 4-byte reads of 8 rows x 4 lanes then fall in 32 different banks.
template <int K, int KB, class Toks>
__device__ __forceinline__ void mmq_staged(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                           const float* __restrict__ xd, float* __restrict__ y, u32 rows, u32 cols,
                                           const Toks& tk) {
    constexpr int QB = Split<K>::QB;
    constexpr int STRIDE = 32 * KB + 16;
    // 16-byte pieces a step and per thread: weights 64 rows x KB blocks x QB / 16,
    // activations 64 tokens x KB blocks x 2; scales 64 x KB of each.
    constexpr int A_ROW = KB * QB / 16, AT = MMQS_ROWS * A_ROW / 256;
    constexpr int B_ROW = KB * 2, BT = MMQS_TOK * B_ROW / 256;
    constexpr int ST = MMQS_ROWS * KB / 256;
    __shared__ __align__(16) signed char sa[MMQS_ROWS * STRIDE];
    __shared__ __align__(16) signed char sb[MMQS_TOK * STRIDE];
    __shared__ float sda[MMQS_ROWS * KB];
    __shared__ float sdb[MMQS_TOK * KB];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 g = lane >> 2, c = lane & 3;
    const u32 r0 = blockIdx.y * MMQS_ROWS;
    const u32 nb = cols / 32, steps = cols / (32 * KB);
    const uint4 z = make_uint4(0, 0, 0, 0);
    uint4 ra[AT], rb[BT];
    u32 rsa[ST];
    float rsb[ST];
    PDL_ENTRY();
    // Piece i of this thread: index tid + 256 i of the step's pieces, row-major.
    auto load = [&](u32 st) {
#pragma unroll
        for (int i = 0; i < AT; ++i) {
            const u32 idx = tid + 256 * i, row = idx / A_ROW, piece = idx % A_ROW;
            const u8* src = w + (u64)min(r0 + row, rows - 1) * row_bytes + (u64)st * KB * QB + piece * 16;
            ra[i] = __ldg((const uint4*)src);
        }
#pragma unroll
        for (int i = 0; i < BT; ++i) {
            const u32 idx = tid + 256 * i, tok = idx / B_ROW, piece = idx % B_ROW;
            rb[i] = tk.live(tok) ? __ldg((const uint4*)(xq + tk.x(tok) * cols + (u64)st * 32 * KB + piece * 16)) : z;
        }
#pragma unroll
        for (int i = 0; i < ST; ++i) {
            const u32 idx = tid + 256 * i, row = idx / KB, blk = st * KB + idx % KB;
            const unsigned short* sc =
                (const unsigned short*)(w + (u64)min(r0 + row, rows - 1) * row_bytes + (u64)nb * QB);
            rsa[i] = (u32)__ldg(sc + blk);
            rsb[i] = tk.live(row) ? __ldg(xd + tk.x(row) * nb + blk) : 0.0f;  // row: a token here
        }
    };
    float acc[4][4];
    mmqs_zero(acc);
    const u32 wr = (warp & 3) * 16 + g, wt = (warp >> 2) * 32;
    load(0);
    for (u32 st = 0; st < steps; ++st) {
        __syncthreads();  // the previous step's reads of shared memory are done
#pragma unroll
        for (int i = 0; i < AT; ++i) {
            const u32 idx = tid + 256 * i, row = idx / A_ROW, piece = idx % A_ROW;
            if (K == K_Q8_0) {
                *(uint4*)(sa + row * STRIDE + piece * 16) = ra[i];
            } else {
                // A Q4_0 block's 16 level bytes: elements j (low nibbles) and 16 + j.
                const uint4 v = ra[i];
                const uint4 lo = make_uint4(minus8(v.x & 0x0F0F0F0Fu), minus8(v.y & 0x0F0F0F0Fu),
                                            minus8(v.z & 0x0F0F0F0Fu), minus8(v.w & 0x0F0F0F0Fu));
                const uint4 hi = make_uint4(minus8((v.x >> 4) & 0x0F0F0F0Fu), minus8((v.y >> 4) & 0x0F0F0F0Fu),
                                            minus8((v.z >> 4) & 0x0F0F0F0Fu), minus8((v.w >> 4) & 0x0F0F0F0Fu));
                signed char* d = sa + row * STRIDE + piece * 32;
                *(uint4*)d = lo;
                *(uint4*)(d + 16) = hi;
            }
        }
#pragma unroll
        for (int i = 0; i < BT; ++i) {
            const u32 idx = tid + 256 * i, tok = idx / B_ROW, piece = idx % B_ROW;
            *(uint4*)(sb + tok * STRIDE + piece * 16) = rb[i];
        }
#pragma unroll
        for (int i = 0; i < ST; ++i) {
            sda[tid + 256 * i] = f16_bits(rsa[i]);
            sdb[tid + 256 * i] = rsb[i];
        }
        __syncthreads();
        if (st + 1 < steps) {
            load(st + 1);  // in flight while this step multiplies
        }
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
            const signed char* ar = sa + wr * STRIDE + kb * 32 + 4 * c;
            const int a0 = *(const int*)ar, a1 = *(const int*)(ar + 8 * STRIDE);
            const int a2 = *(const int*)(ar + 16), a3 = *(const int*)(ar + 8 * STRIDE + 16);
            const float dw0 = sda[wr * KB + kb], dw1 = sda[(wr + 8) * KB + kb];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const signed char* br = sb + (wt + 8 * j + g) * STRIDE + kb * 32 + 4 * c;
                const int b0 = *(const int*)br, b1 = *(const int*)(br + 16);
                int p[4] = {0, 0, 0, 0};
                mma_s8(p, a0, a1, a2, a3, b0, b1);
                const u32 tt = wt + 8 * j + 2 * c;
                const float dx0 = sdb[tt * KB + kb], dx1 = sdb[(tt + 1) * KB + kb];
                acc[j][0] += (dw0 * dx0) * (float)p[0];
                acc[j][1] += (dw0 * dx1) * (float)p[1];
                acc[j][2] += (dw1 * dx0) * (float)p[2];
                acc[j][3] += (dw1 * dx1) * (float)p[3];
            }
        }
    }
    mmqs_store(acc, y, rows, tk, r0 + wr, wt + 2 * c);
}

#define MMQS_KERNEL(NAME, K, KB)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        NAME(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,                     \
             const float* __restrict__ xd, const int* __restrict__, float* __restrict__ y, u32 rows, u32 cols, \
             u32 n) {                                                                                         \
        mmq_staged<K, KB>(w, row_bytes, xq, xd, y, rows, cols, DenseToks{blockIdx.x * MMQS_TOK, n});          \
    }
// Steps of 128 elements. Steps of 256 (twice the loads in flight a step, half the
// barriers) were slower on an H100 (15.4 against 14.6 ms a 64-row step), so only KB = 4
// is built.
MMQS_KERNEL(mmqs_q4_0s, K_Q4_0, 4)
MMQS_KERNEL(mmqs_q8_0s, K_Q8_0, 4)

// The staged product for Q4_K (stored layout: 144-byte super-blocks keep a row's every
// 16 bytes aligned), as `mmq_staged` with a step of one super-block (256 elements): a
// block of 8 warps takes 64 rows x 64 tokens; each step's levels (nibbles widened to
// bytes), the rows' d, dmin and eight 6-bit scales and mins, and the activations' levels,
// scale and per-32 sums go to shared memory once. Per (row, token) and super-block, the
// sub-blocks' integer products times their scales are summed in integers, then
// (d * dx) * isum - (dmin * dx) * Σ min * xsum, as `mmq_q4k` and the CPU do.
// Launch: grid (ceil(n / 64), ceil(rows / 64)), 256 threads; activations from
// quantize_q8x256. The body takes its tokens from a map (`DenseToks`, or a grouped
// tile's slots: `mmqs_moe_q4_k`), as `mmq_staged` does. Default since session 15 (the
// product tests passed on an H100; `FFAI_CUDA_MMQ_STAGED_K=0` takes `mmq_q4_k`).
#define MMQSK_STRIDE (256 + 16)
template <class Toks>
__device__ __forceinline__ void mmqs_q4k(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                         const float* __restrict__ xd, const int* __restrict__ xs,
                                         float* __restrict__ y, u32 rows, u32 cols, const Toks& tk) {
    __shared__ __align__(16) signed char sa[MMQS_ROWS * MMQSK_STRIDE];
    __shared__ __align__(16) signed char sb[MMQS_TOK * MMQSK_STRIDE];
    __shared__ float sd[MMQS_ROWS], sdm[MMQS_ROWS], sdx[MMQS_TOK];
    __shared__ int ssc[MMQS_ROWS][8], smn[MMQS_ROWS][8], sxs[MMQS_TOK][8];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 g = lane >> 2, c = lane & 3;
    const u32 r0 = blockIdx.y * MMQS_ROWS;
    const u32 nsb = cols / 256, nb = cols / 32;
    const uint4 z = make_uint4(0, 0, 0, 0);
    // Per thread a step: two 16-byte pieces of levels (row idx / 8, piece idx % 8 of the
    // 128 level bytes), the header of row tid (tid < 64), four activation pieces (token
    // idx / 16, piece idx % 16), the scale of token tid (tid < 64) and two per-32 sums.
    uint4 ra[2], rh, rb[4];
    float rdx;
    int rxs[2];
    auto load = [&](u32 sbk) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u32 idx = tid + 256 * i, row = idx / 8, piece = idx % 8;
            const u8* blk = w + (u64)min(r0 + row, rows - 1) * row_bytes + (u64)sbk * 144;
            ra[i] = __ldg((const uint4*)(blk + 16 + 16 * piece));
        }
        if (tid < MMQS_ROWS) {
            rh = __ldg((const uint4*)(w + (u64)min(r0 + tid, rows - 1) * row_bytes + (u64)sbk * 144));
            rdx = tk.live(tid) ? __ldg(xd + tk.x(tid) * nsb + sbk) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 idx = tid + 256 * i, tok = idx / 16, piece = idx % 16;
            rb[i] = tk.live(tok) ? __ldg((const uint4*)(xq + tk.x(tok) * cols + (u64)sbk * 256 + piece * 16)) : z;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u32 idx = tid + 256 * i, tok = idx / 8, sub = idx % 8;
            rxs[i] = tk.live(tok) ? __ldg(xs + tk.x(tok) * nb + (u64)sbk * 8 + sub) : 0;
        }
    };
    float acc[4][4];
    mmqs_zero(acc);
    const u32 wr = (warp & 3) * 16 + g, wt = (warp >> 2) * 32;
    load(0);
    for (u32 sbk = 0; sbk < nsb; ++sbk) {
        __syncthreads();  // the previous step's reads of shared memory are done
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // Level bytes 16 piece ..: byte 32 q + j holds element 64 q + j (low nibble)
            // and 64 q + 32 + j (high nibble).
            const u32 idx = tid + 256 * i, row = idx / 8, piece = idx % 8;
            const u32 q = piece / 2, k0 = 64 * q + 16 * (piece % 2);
            const uint4 v = ra[i];
            signed char* d = sa + row * MMQSK_STRIDE;
            *(uint4*)(d + k0) = make_uint4(v.x & 0x0F0F0F0Fu, v.y & 0x0F0F0F0Fu, v.z & 0x0F0F0F0Fu, v.w & 0x0F0F0F0Fu);
            *(uint4*)(d + k0 + 32) = make_uint4((v.x >> 4) & 0x0F0F0F0Fu, (v.y >> 4) & 0x0F0F0F0Fu,
                                                (v.z >> 4) & 0x0F0F0F0Fu, (v.w >> 4) & 0x0F0F0F0Fu);
        }
        if (tid < MMQS_ROWS) {
            const Q4kHead h = q4k_head_of(rh);
            sd[tid] = h.d;
            sdm[tid] = h.dmin;
#pragma unroll
            for (int sub = 0; sub < 8; ++sub) {
                ssc[tid][sub] = byte8(h.sc_lo, h.sc_hi, sub);
                smn[tid][sub] = byte8(h.mn_lo, h.mn_hi, sub);
            }
            sdx[tid] = rdx;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 idx = tid + 256 * i, tok = idx / 16, piece = idx % 16;
            *(uint4*)(sb + tok * MMQSK_STRIDE + piece * 16) = rb[i];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const u32 idx = tid + 256 * i;
            sxs[idx / 8][idx % 8] = rxs[i];
        }
        __syncthreads();
        if (sbk + 1 < nsb) {
            load(sbk + 1);  // in flight while this step multiplies
        }
        int isum[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                isum[j][e] = 0;
            }
        }
#pragma unroll
        for (int sub = 0; sub < 8; ++sub) {
            const signed char* ar = sa + wr * MMQSK_STRIDE + sub * 32 + 4 * c;
            const int a0 = *(const int*)ar, a1 = *(const int*)(ar + 8 * MMQSK_STRIDE);
            const int a2 = *(const int*)(ar + 16), a3 = *(const int*)(ar + 8 * MMQSK_STRIDE + 16);
            const int s0 = ssc[wr][sub], s1 = ssc[wr + 8][sub];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const signed char* br = sb + (wt + 8 * j + g) * MMQSK_STRIDE + sub * 32 + 4 * c;
                const int b0 = *(const int*)br, b1 = *(const int*)(br + 16);
                mma_s8_scaled(isum[j], s0, s1, a0, a1, a2, a3, b0, b1);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 row = wr + (e < 2 ? 0 : 8), tok = wt + 8 * j + 2 * c + (e & 1);
                int m = 0;
#pragma unroll
                for (int sub = 0; sub < 8; ++sub) {
                    m += smn[row][sub] * sxs[tok][sub];
                }
                const float dx = sdx[tok];
                acc[j][e] += (sd[row] * dx) * (float)isum[j][e];
                acc[j][e] -= (sdm[row] * dx) * (float)m;
            }
        }
    }
    mmqs_store(acc, y, rows, tk, r0 + wr, wt + 2 * c);
}
extern "C" __global__ void __launch_bounds__(256)
    mmqs_q4_k(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq, const float* __restrict__ xd,
              const int* __restrict__ xs, float* __restrict__ y, u32 rows, u32 cols, u32 n) {
    PDL_ENTRY();
    mmqs_q4k(w, row_bytes, xq, xd, xs, y, rows, cols, DenseToks{blockIdx.x * MMQS_TOK, n});
}

#define MMQ_PARAMS                                                                                                 \
    const u8 *__restrict__ w, u64 row_bytes, const signed char *__restrict__ xq, const float *__restrict__ xd, \
        const int *__restrict__ xs, float *__restrict__ y, u32 rows, u32 cols, u32 n
#define MMQ_ARGS w, row_bytes, xq, xd, xs, y, rows, cols, DenseToks{blockIdx.x * MMQ_TOK, n}
// (PDL_ENTRY inside the bodies, after the row addresses.)
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q4_0(MMQ_PARAMS) { mmq_legacy<K_Q4_0, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q4_1(MMQ_PARAMS) { mmq_legacy<K_Q4_1, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q5_0(MMQ_PARAMS) { mmq_legacy<K_Q5_0, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q5_1(MMQ_PARAMS) { mmq_legacy<K_Q5_1, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q8_0(MMQ_PARAMS) { mmq_legacy<K_Q8_0, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_mxfp4(MMQ_PARAMS) { mmq_legacy<K_MXFP4, false>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q4_k(MMQ_PARAMS) { mmq_q4k(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q4_0s(MMQ_PARAMS) { mmq_legacy<K_Q4_0, true>(MMQ_ARGS); }
extern "C" __global__ void __launch_bounds__(MMQ_THREADS) mmq_q8_0s(MMQ_PARAMS) { mmq_legacy<K_Q8_0, true>(MMQ_ARGS); }

// ------------------------------------------- grouped tensor-core products (MoE prefill)
//
// A mixture of experts' products for steps of more rows than the gathered kernels below
// take: moe.cu's `moe_group` has sorted the step's slots by expert and cut each expert's
// run of sorted slots into tiles of at most MMQ_TOK (`MoeTile`: the expert, the tile's
// first index into the sorted slots and its count; the tiles of slots whose id is bad
// come last, with expert = n_experts). Block (x, y) takes tile x and weight rows
// y * MMQ_ROWS ..: the dense products' bodies above, with the expert's matrix from the
// part's device table (`tab[e]`) and the tile's slots as its tokens (`MoeToks`): token i
// is slot s = sorted[first + i], which reads activation row s (per_slot: the down
// projection) or s / k (its token's row) and writes y[s * rows + r]. An output is one
// slot's row times one expert row, computed as the dense product computes it (the same
// blocks in the same order, the k-split sums added in the same order), so neither the
// tile a slot lands in nor its place there changes a bit. A slot whose id is outside
// 0..n_experts gets NaN rows, as the gathered kernels give it.
// Launch: grid (the host's bound on the tiles, ceil(slots / MMQ_TOK) + n_experts + 1;
// ceil(rows / MMQ_ROWS), or MMQS_ROWS for the staged `mmqs_moe_*`), MMQ_THREADS threads; blocks past the tile count moe_group wrote
// exit at once. xq / xd / xs: the activation rows quantized as for the dense product.
struct MoeTile {
    u32 expert, first, count;
};

// A grouped block's tokens: `count` slots whose activation rows (xr) and output rows (ys)
// moe_tile staged in shared memory.
struct MoeToks {
    const u32* xr;
    const u32* ys;
    u32 count;
    __device__ __forceinline__ bool live(u32 i) const { return i < count; }
    __device__ __forceinline__ u64 x(u32 i) const { return xr[i]; }
    __device__ __forceinline__ u64 y(u32 i) const { return ys[i]; }
};

#define MMQ_MOE_PARAMS                                                                                           \
    const u64 *__restrict__ tab, u64 row_bytes, const signed char *__restrict__ xq, const float *__restrict__ xd, \
        const int *__restrict__ xs, float *__restrict__ y, u32 rows, u32 cols, const u32 *__restrict__ n_tiles,  \
        const MoeTile *__restrict__ tiles, const u32 *__restrict__ sorted, u32 n_experts, u32 k, u32 per_slot

// The block's tile (after PDL_ENTRY: moe_group wrote it): its slots' rows staged in shared
// memory (tk), its expert's matrix (w). False when the block has no work: past the tile
// count, or a tile of bad ids (whose rows in this block's range, ROWS from blockIdx.y *
// ROWS, it has written NaN).
// Every branch depends only on the tile, so a block's threads all take it.
template <u32 ROWS>
__device__ __forceinline__ bool moe_tile(const u64* __restrict__ tab, float* __restrict__ y, u32 rows,
                                         const u32* __restrict__ n_tiles, const MoeTile* __restrict__ tiles,
                                         const u32* __restrict__ sorted, u32 n_experts, u32 k, u32 per_slot,
                                         MoeToks& tk, const u8*& w) {
    __shared__ u32 xr[MMQ_TOK], ys[MMQ_TOK];
    if (blockIdx.x >= *n_tiles) {
        return false;
    }
    const MoeTile t = tiles[blockIdx.x];
    if (threadIdx.x < t.count) {
        const u32 s = sorted[t.first + threadIdx.x];
        xr[threadIdx.x] = per_slot ? s : s / k;
        ys[threadIdx.x] = s;
    }
    __syncthreads();
    if (t.expert >= n_experts) {
        const u32 r0 = blockIdx.y * ROWS;
        for (u32 i = threadIdx.x; i < t.count * ROWS; i += blockDim.x) {
            const u32 r = r0 + i % ROWS;
            if (r < rows) {
                y[(u64)ys[i / ROWS] * rows + r] = __uint_as_float(0x7FC00000u);
            }
        }
        return false;
    }
    tk.xr = xr;
    tk.ys = ys;
    tk.count = t.count;
    w = (const u8*)tab[t.expert];
    return true;
}

// BODY...: the dense body (a template instance, hence variadic: its arguments hold commas).
#define MMQ_MOE_KERNEL(NAME, ...)                                                                     \
    extern "C" __global__ void __launch_bounds__(MMQ_THREADS) NAME(MMQ_MOE_PARAMS) {                  \
        PDL_ENTRY();                                                                                  \
        MoeToks tk;                                                                                   \
        const u8* w;                                                                                  \
        if (moe_tile<MMQ_ROWS>(tab, y, rows, n_tiles, tiles, sorted, n_experts, k, per_slot, tk, w)) { \
            __VA_ARGS__(w, row_bytes, xq, xd, xs, y, rows, cols, tk);                                 \
        }                                                                                             \
    }
// The staged products of the split layouts (`mmq_staged`: 64 rows a block, so the grid's
// y is ceil(rows / MMQS_ROWS); the dense products take them by default, as these).
#define MMQS_MOE_KERNEL(NAME, K, KB)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) NAME(MMQ_MOE_PARAMS) {                          \
        PDL_ENTRY();                                                                                  \
        MoeToks tk;                                                                                   \
        const u8* w;                                                                                  \
        if (moe_tile<MMQS_ROWS>(tab, y, rows, n_tiles, tiles, sorted, n_experts, k, per_slot, tk, w)) { \
            mmq_staged<K, KB>(w, row_bytes, xq, xd, y, rows, cols, tk);                               \
        }                                                                                             \
    }

MMQ_MOE_KERNEL(mmq_moe_q4_0, mmq_legacy<K_Q4_0, false>)
MMQ_MOE_KERNEL(mmq_moe_q4_1, mmq_legacy<K_Q4_1, false>)
MMQ_MOE_KERNEL(mmq_moe_q5_0, mmq_legacy<K_Q5_0, false>)
MMQ_MOE_KERNEL(mmq_moe_q5_1, mmq_legacy<K_Q5_1, false>)
MMQ_MOE_KERNEL(mmq_moe_q8_0, mmq_legacy<K_Q8_0, false>)
MMQ_MOE_KERNEL(mmq_moe_mxfp4, mmq_legacy<K_MXFP4, false>)
MMQ_MOE_KERNEL(mmq_moe_q4_k, mmq_q4k)
MMQ_MOE_KERNEL(mmq_moe_q4_0s, mmq_legacy<K_Q4_0, true>)
MMQ_MOE_KERNEL(mmq_moe_q8_0s, mmq_legacy<K_Q8_0, true>)
MMQS_MOE_KERNEL(mmqs_moe_q4_0s, K_Q4_0, 4)
MMQS_MOE_KERNEL(mmqs_moe_q8_0s, K_Q8_0, 4)
extern "C" __global__ void __launch_bounds__(256) mmqs_moe_q4_k(MMQ_MOE_PARAMS) {
    PDL_ENTRY();
    MoeToks tk;
    const u8* w;
    if (moe_tile<MMQS_ROWS>(tab, y, rows, n_tiles, tiles, sorted, n_experts, k, per_slot, tk, w)) {
        mmqs_q4k(w, row_bytes, xq, xd, xs, y, rows, cols, tk);
    }
}

// ------------------------------------------------------------------- gathered (MoE)
//
// The selected experts' products of a mixture of experts, decode-sized: one warp per
// (slot, output row), running the dense kernels' row bodies above with one activation
// row, so a slot's result is the bits the dense product of its expert gives for that row.
// Up to three parts (gate, up) share a launch as in `pick`, each with a device table of its
// experts' matrix addresses (`tab_p[e]`) instead of one matrix; slot s = blockIdx.y reads
// its expert id from `ids[s]` (f32, as moe_route writes it) and activation row
// xr = s when per_slot (the down projection), else s / k (the token's row), and part p
// writes y_p[s * rows_p + r]. An id outside 0..n_experts (moe_route never writes one)
// makes the output NaN. Launch: grid (ceil((rows0 + rows1 + rows2) / 4), slots), block 128;
// xq / xd / xs quantized (quantize_q8x32 or quantize_q8x256) over the activation rows.
#define GPARTS                                                                                             \
    const u64 *tab0, const u64 *tab1, const u64 *tab2, float *y0, float *y1, float *y2, u32 rows0, u32 rows1, \
        u32 rows2, const float *ids, u32 n_experts, u32 k, u32 per_slot
struct GRow {
    const u8* w;
    float* y;
    u32 rows, r, xr;
};
// False when the warp has no row; true with o.w == 0 when the slot's id is bad (the row
// was written NaN).
__device__ __forceinline__ bool gpick(GPARTS, GRow& o) {
    const u32 s = blockIdx.y;
    u32 r = blockIdx.x * 4 + (threadIdx.x >> 5);
    const u64* tab;
    if (r < rows0) {
        tab = tab0;
        o.y = y0;
        o.rows = rows0;
    } else if ((r -= rows0) < rows1) {
        tab = tab1;
        o.y = y1;
        o.rows = rows1;
    } else if ((r -= rows1) < rows2) {
        tab = tab2;
        o.y = y2;
        o.rows = rows2;
    } else {
        return false;
    }
    o.r = r;
    o.y += (u64)s * o.rows;
    o.xr = per_slot ? s : s / k;
    const float f = __ldg(ids + s);
    if (!(f >= 0.0f && f < (float)n_experts)) {
        if ((threadIdx.x & 31) == 0) {
            o.y[r] = __uint_as_float(0x7FC00000u);
        }
        o.w = 0;
        return true;
    }
    o.w = (const u8*)__ldg(tab + (u32)f);
    return true;
}

#define MOE_Q8X_KERNEL(NAME, BODY, ARG, QB)                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        NAME(GPARTS, u64 row_bytes, const signed char* xq, const float* xd, const int* xs, u32 cols) { PDL_ENTRY();          \
        GRow o;                                                                                                   \
        if (gpick(tab0, tab1, tab2, y0, y1, y2, rows0, rows1, rows2, ids, n_experts, k, per_slot, o) && o.w) {  \
            BODY<ARG, 1>(o.w, row_bytes, xq + (u64)o.xr * cols, xd + (u64)o.xr * (cols / QB),                       \
                      xs + (u64)o.xr * (cols / 32), o.y, o.rows, o.r, cols, 1);                                  \
        }                                                                                                         \
    }

MOE_Q8X_KERNEL(moe_q8x_q4_0, mv_legacy, K_Q4_0, 32)

MOE_Q8X_KERNEL(moe_q8x_q4_1, mv_legacy, K_Q4_1, 32)

MOE_Q8X_KERNEL(moe_q8x_q5_0, mv_legacy, K_Q5_0, 32)

MOE_Q8X_KERNEL(moe_q8x_q5_1, mv_legacy, K_Q5_1, 32)

MOE_Q8X_KERNEL(moe_q8x_q8_0, mv_legacy, K_Q8_0, 32)

MOE_Q8X_KERNEL(moe_q8x_mxfp4, mv_legacy, K_MXFP4, 32)

MOE_Q8X_KERNEL(moe_q8x_q4_0s, mv_split, K_Q4_0, 32)

MOE_Q8X_KERNEL(moe_q8x_q8_0s, mv_split, K_Q8_0, 32)

MOE_Q8X_KERNEL(moe_q8x_q4_k, mv_kquant, KQ(false, 2), 256)

MOE_Q8X_KERNEL(moe_q8x_q6_k, mv_kquant, KQ(true, 1), 256)

extern "C" __global__ void __launch_bounds__(128) moe_half_f16(GPARTS, u64 row_bytes, const float* x, u32 cols) {
    PDL_ENTRY();
    GRow o;
    if (gpick(tab0, tab1, tab2, y0, y1, y2, rows0, rows1, rows2, ids, n_experts, k, per_slot, o) && o.w) {
        mv_half<false, 1>(o.w, row_bytes, x + (u64)o.xr * cols, o.y, o.rows, o.r, cols, 1);
    }
}

extern "C" __global__ void __launch_bounds__(128) moe_half_bf16(GPARTS, u64 row_bytes, const float* x, u32 cols) {
    PDL_ENTRY();
    GRow o;
    if (gpick(tab0, tab1, tab2, y0, y1, y2, rows0, rows1, rows2, ids, n_experts, k, per_slot, o) && o.w) {
        mv_half<true, 1>(o.w, row_bytes, x + (u64)o.xr * cols, o.y, o.rows, o.r, cols, 1);
    }
}
