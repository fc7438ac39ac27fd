// Matrix-vector products with activations quantized once to 8 bits (UNVERIFIED on a GPU:
// written for the next GPU session). Each activation row is cut into 32-element blocks
// with a scale d = max|x| / 127, levels q = round(x / d) and their sum; the weight block's
// integer levels are dotted with the activation levels four at a time (dp4a), and one
// multiply per block applies both scales. A row's arithmetic does not depend on how many
// activation rows share the launch (n <= 8), so batch invariance holds as for `matvec`.
// Header-free like the other sources.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define Q8X_MAX_N 8

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ float half_bits_to_float(u32 bits) {
    const u16 h = (u16)bits;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Little-endian 32-bit words at any alignment (byte loads: block fields sit at odd offsets).
__device__ __forceinline__ u32 word_at(const u8* p) {
    return (u32)__ldg(p) | ((u32)__ldg(p + 1) << 8) | ((u32)__ldg(p + 2) << 16) | ((u32)__ldg(p + 3) << 24);
}

// One thread per 32-element block of one activation row: xq (int8 levels, row-major like
// x), xd (scales) and xs (level sums), both [n][cols / 32].
// grid = (ceil(cols / 32 / 128), n), block = 128.
extern "C" __global__ void quantize_q8x(const float* __restrict__ x, signed char* __restrict__ xq,
                                        float* __restrict__ xd, int* __restrict__ xs, u32 cols, u32 n) {
    const u32 nb = cols / 32;
    const u32 b = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (b >= nb || t >= n) {
        return;
    }
    const float* v = x + (u64)t * cols + (u64)b * 32;
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; i++) {
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float d = amax / 127.0f;
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    u32* out = (u32*)(xq + (u64)t * cols + (u64)b * 32);
#pragma unroll
    for (int w = 0; w < 8; w++) {
        u32 word = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int q = __float2int_rn(v[4 * w + k] * id);
            sum += q;
            word |= ((u32)(q & 0xFF)) << (8 * k);
        }
        out[w] = word;
    }
    xd[(u64)t * nb + b] = d;
    xs[(u64)t * nb + b] = sum;
}

// Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles; element j = low nibble of byte j,
// element j + 16 = its high nibble; value = d * (nibble - 8)) and Q8_0 (34-byte blocks:
// f16 d, 32 int8) against quantized activations. One warp per output row, lane L takes
// blocks L, L + 32, ...; then a butterfly. grid = ceil(rows / 4), block = 128.
template <bool Q8>
__device__ __forceinline__ void matvec_q8x(const u8* __restrict__ w, u64 row_bytes, const signed char* __restrict__ xq,
                                           const float* __restrict__ xd, const int* __restrict__ xs,
                                           float* __restrict__ y, u32 rows, u32 cols, u32 n) {
    const u32 lane = threadIdx.x & 31;
    const u32 r = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (r >= rows) {
        return;
    }
    const u32 nb = cols / 32;
    const u8* row = w + (u64)r * row_bytes;
    float acc[Q8X_MAX_N];
#pragma unroll
    for (int t = 0; t < Q8X_MAX_N; t++) {
        acc[t] = 0.0f;
    }
    for (u32 b = lane; b < nb; b += 32) {
        const u8* blk = row + (u64)b * (Q8 ? 34 : 18);
        const float dw = half_bits_to_float((u32)__ldg(blk) | ((u32)__ldg(blk + 1) << 8));
        int q[8];
        if (Q8) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                q[i] = (int)word_at(blk + 2 + 4 * i);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const u32 qw = word_at(blk + 2 + 4 * i);
                q[i] = (int)(qw & 0x0F0F0F0Fu);
                q[4 + i] = (int)((qw >> 4) & 0x0F0F0F0Fu);
            }
        }
#pragma unroll
        for (int t = 0; t < Q8X_MAX_N; t++) {
            if ((u32)t < n) {
                const int* xt = (const int*)(xq + (u64)t * cols + (u64)b * 32);
                int s = 0;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    s = dp4a(q[i], __ldg(xt + i), s);
                }
                if (!Q8) {
                    s -= 8 * __ldg(xs + (u64)t * nb + b);
                }
                acc[t] += dw * __ldg(xd + (u64)t * nb + b) * (float)s;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < Q8X_MAX_N; t++) {
        if ((u32)t < n) {
            float s = acc[t];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
            }
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    matvec_q8x_q4_0(const u8* w, u64 row_bytes, const signed char* xq, const float* xd, const int* xs, float* y,
                    u32 rows, u32 cols, u32 n) {
    matvec_q8x<false>(w, row_bytes, xq, xd, xs, y, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128)
    matvec_q8x_q8_0(const u8* w, u64 row_bytes, const signed char* xq, const float* xd, const int* xs, float* y,
                    u32 rows, u32 cols, u32 n) {
    matvec_q8x<true>(w, row_bytes, xq, xd, xs, y, rows, cols, n);
}
