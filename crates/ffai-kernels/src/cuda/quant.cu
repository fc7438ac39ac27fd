// Quantized-weight kernels of the CUDA backend (issue 13): matrix-vector products for
// decode, bf16 dequantization for prefill GEMMs, and embedding lookups, for every weight
// type of `quant::WeightType`. Header-free (NVRTC 13 has no cuda_fp16.h or stdint.h
// without a toolkit), so only built-in types and intrinsics appear here.
//
// Every format is decoded through one `__device__` routine per type that turns one
// 32-element run of a row (`run` = element index / 32 within the row) into 32 floats.
// The three kernel families below share those decoders, so a format's bit layout is
// written down exactly once on the GPU side. The layouts are documented next to the CPU
// decoders (crates/ffai-kernels/src/quant/*.rs); the comments here only say which bytes a
// run needs.
//
// Exactness: the CPU decoders round like ggml's reference (each multiply and each add
// rounded separately). NVRTC contracts `a * b + c` into an FMA by default, which would
// round once, so every dequantization step below is spelled with __fmul_rn / __fadd_rn /
// __fsub_rn, which the compiler never fuses. Dequantized values are therefore
// bit-identical to `quant::dequantize_row` (the embedding kernels rely on it). The dot
// products of matvec use explicit __fmaf_rn, so their rounding is fixed by the source and
// not by the compiler's contraction choices.
//
// Alignment: a row starts at `w + r * row_bytes`, and most block sizes (18, 17, 22, 34,
// 110, 210 bytes, ...) leave fields at any byte offset, so no wider-than-byte load may be
// assumed aligned. Multi-byte fields are read with `load_words`: aligned 32-bit loads
// around the field, realigned with funnel shifts. It never reads outside the field's
// aligned words, so it never touches memory outside the weight buffer.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// The most activation rows one matvec launch multiplies (`MATVEC_MAX_N` in quant.rs).
#define MATVEC_MAX_N 8
// matvec: warps per block (one output row each) and threads per block.
#define MATVEC_WARPS 4
#define MATVEC_THREADS (32 * MATVEC_WARPS)
// embed: threads (runs) per block.
#define EMBED_THREADS 128

// ------------------------------------------------------------------ loads and conversions

// `NW` little-endian 32-bit words starting at `p`, which may have any alignment.
// Reads the aligned words that overlap [p, p + 4*NW): when p is aligned, the word after
// the field is not read (its index is clamped to the last one), so a field at the very
// end of an allocation is safe.
template <int NW>
__device__ __forceinline__ void load_words(const u8* p, u32 (&out)[NW]) {
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

__device__ __forceinline__ u32 load_u32(const u8* p) {
    u32 w[1];
    load_words<1>(p, w);
    return w[0];
}

__device__ __forceinline__ u32 load_u16(const u8* p) {
    return (u32)__ldg(p) | ((u32)__ldg(p + 1) << 8);
}

// IEEE binary16 -> binary32: exact (every f16, subnormals included, is an f32).
__device__ __forceinline__ float f16_to_f32(u32 bits) {
    const u16 h = (u16)bits;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// bf16 is the upper half of a binary32, so widening is a shift (NaN payloads kept, as on
// the CPU).
__device__ __forceinline__ float bf16_to_f32(u32 bits) {
    return __uint_as_float((bits & 0xFFFFu) << 16);
}

// binary32 -> bf16, round to nearest even; a NaN stays a (quiet) NaN. Same bits as
// `half::bf16::from_f32`.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    const u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Signed byte `k & 7` of the 8-byte table (hi:lo), as an int.
__device__ __forceinline__ int table8(u32 lo, u32 hi, u32 k) {
    return (int)(signed char)(__byte_perm(lo, hi, k & 7) & 0xFF);
}

// The IQ4 codebook (-127 .. 113, `iq4::KVALUES`) indexed by a 4-bit code, from four
// register constants: no memory lookups, no divergent constant-cache accesses.
__device__ __forceinline__ int iq4_value(u32 k) {
    return (k & 8) ? table8(0x26190D01u, 0x71594535u, k) : table8(0xBFAD9881u, 0xF6EADDCFu, k);
}

// E2M1 values times two (prelude.cuh's tables; code 8 is +0 like on the CPU).
__device__ __forceinline__ int mxfp4_value(u32 k) {
    return (k & 8) ? table8(E2M1X2_NEG_LO, E2M1X2_NEG_HI, k) : table8(E2M1X2_POS_LO, E2M1X2_POS_HI, k);
}

// Byte `i` of a little-endian word array.
template <int NW>
__device__ __forceinline__ u32 byte_at(const u32 (&w)[NW], int i) {
    return (w[i >> 2] >> (8 * (i & 3))) & 0xFFu;
}

// ------------------------------------------------------------------ decoders
//
// Each decoder is a struct with
//   static constexpr bool FLOAT   true for F32/F16/BF16 (any cols; the last run may be
//                                 partial and is zero-filled past `cols`)
//   decode(row, run, cols, v)     the 32 values of run `run` of the row at `row`.

// ---- plain floats

struct DecF32 {
    static constexpr bool FLOAT = true;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32 cols, float (&v)[32]) {
        const u8* p = row + (u64)run * 128;
        const u32 lim = min(32u, cols - run * 32);
        if (lim == 32 && ((u64)p & 15) == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint4 q = __ldg((const uint4*)p + i);
                v[4 * i] = __uint_as_float(q.x);
                v[4 * i + 1] = __uint_as_float(q.y);
                v[4 * i + 2] = __uint_as_float(q.z);
                v[4 * i + 3] = __uint_as_float(q.w);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                v[i] = (u32)i < lim ? __uint_as_float(load_u32(p + 4 * i)) : 0.0f;
            }
        }
    }
};

// F16 and BF16 share the loads; `W` widens one 16-bit value.
template <bool BF>
struct DecHalf {
    static constexpr bool FLOAT = true;
    __device__ __forceinline__ static float widen(u32 h) { return BF ? bf16_to_f32(h) : f16_to_f32(h); }
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32 cols, float (&v)[32]) {
        const u8* p = row + (u64)run * 64;
        const u32 lim = min(32u, cols - run * 32);
        if (lim == 32 && ((u64)p & 15) == 0) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint4 q = __ldg((const uint4*)p + i);
                const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    v[8 * i + 2 * k] = widen(w[k] & 0xFFFFu);
                    v[8 * i + 2 * k + 1] = widen(w[k] >> 16);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                v[i] = (u32)i < lim ? widen(load_u16(p + 2 * i)) : 0.0f;
            }
        }
    }
};

// ---- legacy 32-element blocks: one block is one run.

// Q4_0 (18 bytes): d:f16 @0, nibbles @2 (byte j: element j low, j + 16 high).
// (q - 8) * d.
struct DecQ4_0 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 18;
        const float d = f16_to_f32(load_u16(b));
        u32 q[4];
        load_words<4>(b + 2, q);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(q, j);
            v[j] = __fmul_rn((float)((int)(x & 15) - 8), d);
            v[j + 16] = __fmul_rn((float)((int)(x >> 4) - 8), d);
        }
    }
};

// Q4_1 (20 bytes): d @0, m @2, nibbles @4. q * d + m.
struct DecQ4_1 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 20;
        u32 w[5];
        load_words<5>(b, w);
        const float d = f16_to_f32(w[0] & 0xFFFFu);
        const float m = f16_to_f32(w[0] >> 16);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(w, 4 + j);
            v[j] = __fadd_rn(__fmul_rn((float)(x & 15), d), m);
            v[j + 16] = __fadd_rn(__fmul_rn((float)(x >> 4), d), m);
        }
    }
};

// Q5_0 (22 bytes): d @0, qh:u32 @2 (bit i = bit 4 of element i), nibbles @6.
// (q - 16) * d.
struct DecQ5_0 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 22;
        const float d = f16_to_f32(load_u16(b));
        u32 w[5];
        load_words<5>(b + 2, w);
        const u32 qh = w[0];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(w, 4 + j);
            const u32 lo = (x & 15) | (((qh >> j) & 1) << 4);
            const u32 hi = (x >> 4) | (((qh >> (j + 16)) & 1) << 4);
            v[j] = __fmul_rn((float)((int)lo - 16), d);
            v[j + 16] = __fmul_rn((float)((int)hi - 16), d);
        }
    }
};

// Q5_1 (24 bytes): d @0, m @2, qh @4, nibbles @8. q * d + m.
struct DecQ5_1 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 24;
        u32 w[6];
        load_words<6>(b, w);
        const float d = f16_to_f32(w[0] & 0xFFFFu);
        const float m = f16_to_f32(w[0] >> 16);
        const u32 qh = w[1];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(w, 8 + j);
            const u32 lo = (x & 15) | (((qh >> j) & 1) << 4);
            const u32 hi = (x >> 4) | (((qh >> (j + 16)) & 1) << 4);
            v[j] = __fadd_rn(__fmul_rn((float)lo, d), m);
            v[j + 16] = __fadd_rn(__fmul_rn((float)hi, d), m);
        }
    }
};

// Q8_0 (34 bytes): d @0, 32 x i8 @2. q * d.
struct DecQ8_0 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 34;
        const float d = f16_to_f32(load_u16(b));
        u32 q[8];
        load_words<8>(b + 2, q);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            v[i] = __fmul_rn((float)(signed char)byte_at(q, i), d);
        }
    }
};

// Q4_0 and Q8_0 in the split row layout of the device copy (`quant::split_rows`; q8x.cu's
// `Split`): the row's levels (16 / 32 bytes a block, 16-byte aligned) and then its f16
// scales. The same values as DecQ4_0 / DecQ8_0 give for the stored layout.
struct DecQ4_0S {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32 cols, float (&v)[32]) {
        const float d = f16_to_f32(load_u16(row + (u64)(cols / 32) * 16 + (u64)run * 2));
        const uint4 l = __ldg((const uint4*)(row + (u64)run * 16));
        const u32 q[4] = {l.x, l.y, l.z, l.w};
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(q, j);
            v[j] = __fmul_rn((float)((int)(x & 15) - 8), d);
            v[j + 16] = __fmul_rn((float)((int)(x >> 4) - 8), d);
        }
    }
};

struct DecQ8_0S {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32 cols, float (&v)[32]) {
        const float d = f16_to_f32(load_u16(row + (u64)(cols / 32) * 32 + (u64)run * 2));
        const uint4* p = (const uint4*)(row + (u64)run * 32);
        const uint4 a = __ldg(p), b = __ldg(p + 1);
        const u32 q[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            v[i] = __fmul_rn((float)(signed char)byte_at(q, i), d);
        }
    }
};

// IQ4_NL (18 bytes): d @0, code nibbles @2 (Q4_0 order). d * KVALUES[k].
struct DecIQ4NL {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 18;
        const float d = f16_to_f32(load_u16(b));
        u32 q[4];
        load_words<4>(b + 2, q);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(q, j);
            v[j] = __fmul_rn(d, (float)iq4_value(x & 15));
            v[j + 16] = __fmul_rn(d, (float)iq4_value(x >> 4));
        }
    }
};

// MXFP4 (17 bytes): e:u8 @0, code nibbles @1 (Q4_0 order). 2^(e-128) * (2 * E2M1[k]).
struct DecMXFP4 {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u8* b = row + (u64)run * 17;
        const float d = mxfp4_half_scale(__ldg(b));
        u32 q[4];
        load_words<4>(b + 1, q);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(q, j);
            v[j] = __fmul_rn(d, (float)mxfp4_value(x & 15));
            v[j + 16] = __fmul_rn(d, (float)mxfp4_value(x >> 4));
        }
    }
};

// ---- 256-element super-blocks: run `run` is sub-run `s = run % 8` of block `run / 8`.

// Q4_K / Q5_K 6-bit scale and min of 32-element sub-block s from the 12 packed bytes
// (words k[0..3] = bytes 4..16 of the block).
__device__ __forceinline__ void kq_scale_min(const u32 (&k)[3], u32 s, u32& sc, u32& mn) {
    // Byte i of the 12 (i < 12); s is not a compile-time constant, so index by shifts.
    auto byte = [&](u32 i) -> u32 {
        const u32 word = i < 4 ? k[0] : (i < 8 ? k[1] : k[2]);
        return (word >> (8 * (i & 3))) & 0xFFu;
    };
    if (s < 4) {
        sc = byte(s) & 63;
        mn = byte(s + 4) & 63;
    } else {
        sc = (byte(s + 4) & 15) | ((byte(s - 4) >> 6) << 4);
        mn = (byte(s + 4) >> 4) | ((byte(s) >> 6) << 4);
    }
}

// Q4_K (144 bytes): d @0, dmin @2, scales @4, nibbles @16 in four groups of 32 bytes;
// sub-block s uses group s/2, low nibbles for even s. (d * sc) * q - (dmin * mn).
struct DecQ4K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 144;
        u32 h[4];
        load_words<4>(b, h);
        const u32 k[3] = {h[1], h[2], h[3]};
        u32 sc, mn;
        kq_scale_min(k, s, sc, mn);
        const float dl = __fmul_rn(f16_to_f32(h[0] & 0xFFFFu), (float)sc);
        const float ml = __fmul_rn(f16_to_f32(h[0] >> 16), (float)mn);
        u32 q[8];
        load_words<8>(b + 16 + 32 * (s >> 1), q);
        const u32 shift = 4 * (s & 1);
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const u32 x = (byte_at(q, l) >> shift) & 15;
            v[l] = __fsub_rn(__fmul_rn(dl, (float)x), ml);
        }
    }
};

// Q5_K (176 bytes): as Q4_K plus qh[32] @16 (bit s of qh[l] = bit 4 of element 32s+l),
// nibbles @48.
struct DecQ5K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 176;
        u32 h[4];
        load_words<4>(b, h);
        const u32 k[3] = {h[1], h[2], h[3]};
        u32 sc, mn;
        kq_scale_min(k, s, sc, mn);
        const float dl = __fmul_rn(f16_to_f32(h[0] & 0xFFFFu), (float)sc);
        const float ml = __fmul_rn(f16_to_f32(h[0] >> 16), (float)mn);
        u32 qh[8], q[8];
        load_words<8>(b + 16, qh);
        load_words<8>(b + 48 + 32 * (s >> 1), q);
        const u32 shift = 4 * (s & 1);
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const u32 x = ((byte_at(q, l) >> shift) & 15) | (((byte_at(qh, l) >> s) & 1) << 4);
            v[l] = __fsub_rn(__fmul_rn(dl, (float)x), ml);
        }
    }
};

// Q6_K (210 bytes): ql[128] @0, qh[64] @128, scales[16]:i8 @192, d @208. Sub-run s:
// half n = s/4, k = s%4; element l takes its low 4 bits from ql[64n + 32(k&1) + l] (low
// nibble for k < 2), its top 2 from bits 2k.. of qh[32n + l], its scale from
// scales[2s + l/16]. (d * scale) * (q - 32).
struct DecQ6K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u32 n = s >> 2, k = s & 3;
        const u8* b = row + (u64)(run >> 3) * 210;
        const float d = f16_to_f32(load_u16(b + 208));
        const u32 scw = load_u16(b + 192 + 2 * s);
        const float d0 = __fmul_rn(d, (float)(signed char)(scw & 0xFFu));
        const float d1 = __fmul_rn(d, (float)(signed char)(scw >> 8));
        u32 ql[8], qh[8];
        load_words<8>(b + 64 * n + 32 * (k & 1), ql);
        load_words<8>(b + 128 + 32 * n, qh);
        const u32 lshift = 4 * (k >> 1), hshift = 2 * k;
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const u32 x = ((byte_at(ql, l) >> lshift) & 15) | (((byte_at(qh, l) >> hshift) & 3) << 4);
            v[l] = __fmul_rn(l < 16 ? d0 : d1, (float)((int)x - 32));
        }
    }
};

// Q2_K (84 bytes): scales[16] @0 (low nibble scale, high nibble min), qs[64] @16,
// d @80, dmin @82. Sub-run s: n = s/4, j = s%4; level = bits 2j.. of qs[32n + l],
// sub-block 2s + l/16. (d * sc) * q - (dmin * mn).
struct DecQ2K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 84;
        const u32 dd = load_u32(b + 80);
        const float d = f16_to_f32(dd & 0xFFFFu), dmin = f16_to_f32(dd >> 16);
        const u32 scw = load_u16(b + 2 * s);
        const float dl0 = __fmul_rn(d, (float)(scw & 15)), ml0 = __fmul_rn(dmin, (float)((scw >> 4) & 15));
        const float dl1 = __fmul_rn(d, (float)((scw >> 8) & 15)), ml1 = __fmul_rn(dmin, (float)(scw >> 12));
        u32 q[8];
        load_words<8>(b + 16 + 32 * (s >> 2), q);
        const u32 shift = 2 * (s & 3);
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const u32 x = (byte_at(q, l) >> shift) & 3;
            v[l] = l < 16 ? __fsub_rn(__fmul_rn(dl0, (float)x), ml0) : __fsub_rn(__fmul_rn(dl1, (float)x), ml1);
        }
    }
};

// Q3_K (110 bytes): hmask[32] @0, qs[64] @32, scales[12] @96, d @108. Sub-run s:
// n = s/4, j = s%4; low 2 bits = bits 2j.. of qs[32n + l], bit s of hmask[l] clear means
// "minus 4"; sub-block u = 2s + l/16 has a 6-bit scale offset by 32.
// (d * (scale - 32)) * q.
__device__ __forceinline__ u32 q3k_scale(const u32 (&sw)[3], u32 i) {
    auto byte = [&](u32 k) -> u32 {
        const u32 word = k < 4 ? sw[0] : (k < 8 ? sw[1] : sw[2]);
        return (word >> (8 * (k & 3))) & 0xFFu;
    };
    const u32 low = i < 8 ? (byte(i) & 15) : (byte(i - 8) >> 4);
    const u32 high = (byte(8 + (i & 3)) >> (2 * (i >> 2))) & 3;
    return low | (high << 4);
}

struct DecQ3K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 110;
        const float d = f16_to_f32(load_u16(b + 108));
        u32 sw[3];
        load_words<3>(b + 96, sw);
        const float d0 = __fmul_rn(d, (float)((int)q3k_scale(sw, 2 * s) - 32));
        const float d1 = __fmul_rn(d, (float)((int)q3k_scale(sw, 2 * s + 1) - 32));
        u32 hm[8], q[8];
        load_words<8>(b, hm);
        load_words<8>(b + 32 + 32 * (s >> 2), q);
        const u32 shift = 2 * (s & 3);
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const int low = (int)((byte_at(q, l) >> shift) & 3);
            const int sub = ((byte_at(hm, l) >> s) & 1) ? 0 : 4;
            v[l] = __fmul_rn(l < 16 ? d0 : d1, (float)(low - sub));
        }
    }
};

// Q8_K (292 bytes): d:f32 @0, 256 x i8 @4 (bsums ignored). d * q.
struct DecQ8K {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 292;
        const float d = __uint_as_float(load_u32(b));
        u32 q[8];
        load_words<8>(b + 4 + 32 * s, q);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            v[i] = __fmul_rn(d, (float)(signed char)byte_at(q, i));
        }
    }
};

// IQ4_XS (136 bytes): d @0, scales_h:u16 @2, scales_l[4] @4, codes @8 (16 bytes per
// sub-block, Q4_0 order). Sub-block s: 6-bit scale u (offset 32) = nibble s%2 of
// scales_l[s/2] | bits 2s.. of scales_h << 4. (d * (u - 32)) * KVALUES[k].
struct DecIQ4XS {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32, float (&v)[32]) {
        const u32 s = run & 7;
        const u8* b = row + (u64)(run >> 3) * 136;
        u32 h[2];
        load_words<2>(b, h);
        const u32 u = ((h[1] >> (4 * s)) & 15) | (((h[0] >> (16 + 2 * s)) & 3) << 4);
        const float dl = __fmul_rn(f16_to_f32(h[0] & 0xFFFFu), (float)((int)u - 32));
        u32 q[4];
        load_words<4>(b + 8 + 16 * s, q);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const u32 x = byte_at(q, j);
            v[j] = __fmul_rn(dl, (float)iq4_value(x & 15));
            v[j + 16] = __fmul_rn(dl, (float)iq4_value(x >> 4));
        }
    }
};

// ---- MLX affine, laid out by kind (affine.rs): f32 scales of the nb = cols/GROUP groups,
// then their f32 biases, then one chunk of 4*BITS bytes per 32 elements. scale * q + bias.
template <int BITS, int GROUP>
struct DecAffine {
    static constexpr bool FLOAT = false;
    __device__ __forceinline__ static void decode(const u8* row, u32 run, u32 cols, float (&v)[32]) {
        const u32 nb = cols / GROUP;
        const u32 g = run / (GROUP / 32);
        const float scale = __uint_as_float(load_u32(row + 4 * (u64)g));
        const float bias = __uint_as_float(load_u32(row + 4 * ((u64)nb + g)));
        u32 c[BITS];
        load_words<BITS>(row + 8 * (u64)nb + (u64)run * (4 * BITS), c);
        u32 q[32];
        if constexpr (BITS == 8) {
            // Byte i holds q_i - 128 as i8.
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                q[i] = byte_at(c, i) ^ 0x80u;
            }
        } else if constexpr (BITS >= 4) {
            // Nibble plane: byte j = q_j (low) and q_{j+16} (high) ...
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                q[j] = byte_at(c, j) & 15;
                q[j + 16] = byte_at(c, j) >> 4;
            }
            if constexpr (BITS == 5) {
                // ... then bit 4 of q_i as bit i of a u32 ...
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    q[i] |= ((c[4] >> i) & 1) << 4;
                }
            } else if constexpr (BITS == 6) {
                // ... or bits 4..6 of q_{j+8k} as bits 2k.. of byte j of an 8-byte plane.
#pragma unroll
                for (int k = 0; k < 4; ++k) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        q[j + 8 * k] |= ((byte_at(c, 16 + j) >> (2 * k)) & 3) << 4;
                    }
                }
            }
        } else {
            // 2-bit plane: bits 2k.. of byte j = low 2 bits of q_{j+8k} ...
#pragma unroll
            for (int k = 0; k < 4; ++k) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    q[j + 8 * k] = (byte_at(c, j) >> (2 * k)) & 3;
                }
            }
            if constexpr (BITS == 3) {
                // ... then bit 2 of q_i as bit i of a u32.
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    q[i] |= ((c[2] >> i) & 1) << 2;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            v[i] = __fadd_rn(__fmul_rn(scale, (float)q[i]), bias);
        }
    }
};

// ------------------------------------------------------------------ kernels

// The 32 activations of one run at `xt` (`lim` of them real, the rest zero): 16-byte
// loads when aligned. The address is the same modulo 16 for every lane of a warp (runs
// are 128 bytes apart), so the branch does not diverge.
__device__ __forceinline__ void load_x_run(const float* __restrict__ xt, u32 lim, float (&xv)[32]) {
    if (lim == 32 && ((u64)xt & 15) == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 f = __ldg((const float4*)xt + i);
            xv[4 * i] = f.x;
            xv[4 * i + 1] = f.y;
            xv[4 * i + 2] = f.z;
            xv[4 * i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            xv[i] = (u32)i < lim ? __ldg(xt + i) : 0.0f;
        }
    }
}

// y[t * rows + r] = sum_c W[r, c] * x[t * cols + c] for t < n (1 <= n <= MATVEC_MAX_N).
// Launch: blockDim.x = MATVEC_THREADS (4 warps), gridDim.x = ceil(rows / 4); warp w of
// block b computes row 4b + w. Lane L walks runs L, L + 32, ...: each run is decoded once
// and dotted with all n activation rows. Per activation row the arithmetic is the same
// whatever n is (two partial sums per lane over even and odd elements, combined, then the
// same butterfly), so a row's result does not depend on how many rows share the launch.
// `matvec_row` is one warp's row r (r < rows); `matvec` picks it from the block.
template <class D>
__device__ __forceinline__ void matvec_row(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x,
                                           float* __restrict__ y, u32 rows, u32 r, u32 cols, u32 n) {
    const u32 lane = threadIdx.x & 31;
    const u8* row = w + (u64)r * row_bytes;
    const u32 nruns = (cols + 31) / 32;
    float acc0[MATVEC_MAX_N], acc1[MATVEC_MAX_N];
#pragma unroll
    for (int t = 0; t < MATVEC_MAX_N; ++t) {
        acc0[t] = 0.0f;
        acc1[t] = 0.0f;
    }
    for (u32 run = lane; run < nruns; run += 32) {
        float v[32];
        D::decode(row, run, cols, v);
        const u32 c0 = run * 32;
        const u32 lim = D::FLOAT ? min(32u, cols - c0) : 32u;
#pragma unroll
        for (int t = 0; t < MATVEC_MAX_N; ++t) {
            if ((u32)t < n) {
                float xv[32];
                load_x_run(x + (u64)t * cols + c0, lim, xv);
#pragma unroll
                for (int i = 0; i < 32; i += 2) {
                    acc0[t] = __fmaf_rn(v[i], xv[i], acc0[t]);
                    acc1[t] = __fmaf_rn(v[i + 1], xv[i + 1], acc1[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MATVEC_MAX_N; ++t) {
        if ((u32)t < n) {
            float s = __fadd_rn(acc0[t], acc1[t]);
            // Butterfly: every lane ends with the same sum (float addition commutes).
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s = __fadd_rn(s, __shfl_xor_sync(0xFFFFFFFFu, s, off));
            }
            if (lane == 0) {
                y[(u64)t * rows + r] = s;
            }
        }
    }
}

template <class D>
__device__ __forceinline__ void matvec(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x,
                                       float* __restrict__ y, u32 rows, u32 cols, u32 n) {
    const u32 r = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    if (r >= rows) {
        return;  // the whole warp leaves together: the shuffles below see full warps
    }
    matvec_row<D>(w, row_bytes, x, y, rows, r, cols, n);
}

// The gathered product of a mixture of experts (one matrix of every expert, e.g. all the
// gate projections): for slot s = blockIdx.y, y[s * rows + r] = W_e[r] . x[xr] with
// e = ids[s] (f32), W_e at table[e], xr = s when per_slot, else s / k. Each (slot, row)
// is `matvec_row` with one activation row, so it gives the bits the dense product of that
// expert gives for that row. An id outside 0..n_experts (moe_route never writes one)
// makes the output NaN. Launch: MATVEC_THREADS threads, grid (ceil(rows / 4), slots).
template <class D>
__device__ __forceinline__ void moe_matvec(const u64* __restrict__ table, const float* __restrict__ ids,
                                           u32 n_experts, u32 k, u32 per_slot, u64 row_bytes,
                                           const float* __restrict__ x, float* __restrict__ y, u32 rows, u32 cols) {
    const u32 r = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    if (r >= rows) {
        return;
    }
    const u32 s = blockIdx.y;
    float* ys = y + (u64)s * rows;
    const float f = __ldg(ids + s);
    if (!(f >= 0.0f && f < (float)n_experts)) {
        if ((threadIdx.x & 31) == 0) {
            ys[r] = __int_as_float(0x7FC00000);
        }
        return;
    }
    const u8* w = (const u8*)__ldg(table + (u32)f);
    const u32 xr = per_slot ? s : s / k;
    matvec_row<D>(w, row_bytes, x + (u64)xr * cols, ys, rows, r, cols, 1);
}

// The one-token product (n = 1), four output rows per warp: each run of x is loaded once
// and dotted with the same run of four rows, so x's traffic is a quarter of `matvec`'s
// and four rows' weight loads are in flight per lane. Each row's arithmetic is exactly
// `matvec`'s (the same run decoder, the same two partial sums per lane in the same
// order, the same butterfly), so its result is the same bits as `matvec` gives for that
// row at any n: decode steps of one row and of several agree.
// Launch: blockDim.x = MATVEC_THREADS, gridDim.x = ceil(rows / (4 * MATVEC_WARPS)).
#define MATVEC4_ROWS 4
template <class D>
__device__ __forceinline__ void matvec4(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x,
                                        float* __restrict__ y, u32 rows, u32 cols) {
    const u32 lane = threadIdx.x & 31;
    const u32 r0 = (blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5)) * MATVEC4_ROWS;
    if (r0 >= rows) {
        return;  // whole warps leave together
    }
    const u32 nr = min((u32)MATVEC4_ROWS, rows - r0);
    const u32 nruns = (cols + 31) / 32;
    float acc0[MATVEC4_ROWS], acc1[MATVEC4_ROWS];
#pragma unroll
    for (int j = 0; j < MATVEC4_ROWS; ++j) {
        acc0[j] = 0.0f;
        acc1[j] = 0.0f;
    }
    for (u32 run = lane; run < nruns; run += 32) {
        const u32 c0 = run * 32;
        const u32 lim = D::FLOAT ? min(32u, cols - c0) : 32u;
        float xv[32];
        load_x_run(x + c0, lim, xv);
#pragma unroll
        for (int j = 0; j < MATVEC4_ROWS; ++j) {
            if ((u32)j < nr) {
                float v[32];
                D::decode(w + (u64)(r0 + j) * row_bytes, run, cols, v);
#pragma unroll
                for (int i = 0; i < 32; i += 2) {
                    acc0[j] = __fmaf_rn(v[i], xv[i], acc0[j]);
                    acc1[j] = __fmaf_rn(v[i + 1], xv[i + 1], acc1[j]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < MATVEC4_ROWS; ++j) {
        if ((u32)j < nr) {
            float s = __fadd_rn(acc0[j], acc1[j]);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s = __fadd_rn(s, __shfl_xor_sync(0xFFFFFFFFu, s, off));
            }
            if (lane == 0) {
                y[r0 + j] = s;
            }
        }
    }
}

// out[r * cols + c] = bf16(W[r, c]) (round to nearest even). Launch: one thread per
// 32-element run (the last run of a float row may be partial), 256 threads per block,
// 1-D grid of ceil(rows * ceil(cols / 32) / 256) blocks; 64-bit indices throughout.
//
// The quantized types (whole 32-element runs: cols % 32 == 0, so run `idx` of the matrix
// is out[32 * idx ..], and a block's 256 runs are one contiguous 16 KB of output) go
// through shared memory: each thread decodes its run there, then the block writes the
// 16 KB out with consecutive threads on consecutive 16-byte pieces. A thread writing its
// own 64 bytes straight out made every store instruction of a warp touch 32 lines a
// quarter each. Same values, same addresses.
#define DEQUANT_THREADS 256
// Elements 8i .. 8i + 7 of a decoded run as bf16, packed for one 16-byte store.
__device__ __forceinline__ uint4 bf16x8(const float (&v)[32], int i) {
    u32 p[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        p[k] = (u32)f32_to_bf16(v[8 * i + 2 * k]) | ((u32)f32_to_bf16(v[8 * i + 2 * k + 1]) << 16);
    }
    return make_uint4(p[0], p[1], p[2], p[3]);
}
template <class D>
__device__ __forceinline__ void dequant_bf16_staged(const u8* __restrict__ w, u64 row_bytes, u16* __restrict__ out,
                                                    u32 rows, u32 cols) {
    __shared__ uint4 stage[DEQUANT_THREADS * 4];
    const u32 nruns = cols / 32;
    const u64 total = (u64)rows * nruns;
    const u64 first = (u64)blockIdx.x * DEQUANT_THREADS;
    const u64 idx = first + threadIdx.x;
    if (idx < total) {
        const u32 r = (u32)(idx / nruns);
        const u32 run = (u32)(idx % nruns);
        float v[32];
        D::decode(w + (u64)r * row_bytes, run, cols, v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            stage[threadIdx.x * 4 + i] = bf16x8(v, i);
        }
    }
    __syncthreads();
    const u32 pieces = (u32)(min((u64)DEQUANT_THREADS, total - first) * 4);
    uint4* dst = (uint4*)(out + first * 32);
    for (u32 c = threadIdx.x; c < pieces; c += DEQUANT_THREADS) {
        dst[c] = stage[c];
    }
}

template <class D>
__device__ __forceinline__ void dequant_bf16(const u8* __restrict__ w, u64 row_bytes, u16* __restrict__ out,
                                             u32 rows, u32 cols) {
    if (!D::FLOAT && cols % 32 == 0 && blockDim.x == DEQUANT_THREADS && ((u64)out & 15) == 0) {
        dequant_bf16_staged<D>(w, row_bytes, out, rows, cols);
        return;
    }
    const u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 nruns = (cols + 31) / 32;
    if (idx >= (u64)rows * nruns) {
        return;
    }
    const u32 r = (u32)(idx / nruns);
    const u32 run = (u32)(idx % nruns);
    float v[32];
    D::decode(w + (u64)r * row_bytes, run, cols, v);
    const u32 lim = D::FLOAT ? min(32u, cols - run * 32) : 32u;
    u16* o = out + (u64)r * cols + (u64)run * 32;
    if (lim == 32 && ((u64)o & 15) == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            ((uint4*)o)[i] = bf16x8(v, i);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            if ((u32)i < lim) {
                o[i] = f32_to_bf16(v[i]);
            }
        }
    }
}

// out[t * cols + c] = W[ids[t], c], exactly as dequantize_row decodes it. Launch:
// grid (ceil(ceil(cols / 32) / EMBED_THREADS), n), block EMBED_THREADS, one thread per
// run; ids must already be < rows.
template <class D>
__device__ __forceinline__ void embed(const u8* __restrict__ w, u64 row_bytes, const u32* __restrict__ ids,
                                      float* __restrict__ out, u32 n, u32 cols) {
    const u32 t = blockIdx.y;
    const u32 run = blockIdx.x * EMBED_THREADS + threadIdx.x;
    const u32 nruns = (cols + 31) / 32;
    if (t >= n || run >= nruns) {
        return;
    }
    float v[32];
    D::decode(w + (u64)__ldg(ids + t) * row_bytes, run, cols, v);
    const u32 lim = D::FLOAT ? min(32u, cols - run * 32) : 32u;
    float* o = out + (u64)t * cols + (u64)run * 32;
    if (lim == 32 && ((u64)o & 15) == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            ((float4*)o)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            if ((u32)i < lim) {
                o[i] = v[i];
            }
        }
    }
}

// ------------------------------------------------------------------ entry points
//
// One set of kernels per type tag (quant.rs `kernel_tag`), with C names so the
// host loads them by string.

#define QUANT_KERNELS(TAG, DEC)                                                                                   \
    extern "C" __global__ void __launch_bounds__(MATVEC_THREADS)                                                  \
        matvec_##TAG(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x, float* __restrict__ y, \
                     u32 rows, u32 cols, u32 n) { PDL_ENTRY();                                                                 \
        matvec<DEC>(w, row_bytes, x, y, rows, cols, n);                                                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(MATVEC_THREADS)                                                  \
        matvec4_##TAG(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x, float* __restrict__ y, \
                      u32 rows, u32 cols) { PDL_ENTRY();                                                                       \
        matvec4<DEC>(w, row_bytes, x, y, rows, cols);                                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(MATVEC_THREADS)                                                  \
        moe_matvec_##TAG(const u64* __restrict__ table, const float* __restrict__ ids, u32 n_experts, u32 k,       \
                         u32 per_slot, u64 row_bytes, const float* __restrict__ x, float* __restrict__ y, u32 rows, \
                         u32 cols) { PDL_ENTRY();                                                                              \
        moe_matvec<DEC>(table, ids, n_experts, k, per_slot, row_bytes, x, y, rows, cols);                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        dequant_bf16_##TAG(const u8* __restrict__ w, u64 row_bytes, u16* __restrict__ out, u32 rows, u32 cols) { PDL_ENTRY();  \
        dequant_bf16<DEC>(w, row_bytes, out, rows, cols);                                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(EMBED_THREADS)                                                   \
        embed_##TAG(const u8* __restrict__ w, u64 row_bytes, const u32* __restrict__ ids, float* __restrict__ out, \
                    u32 n, u32 cols) { PDL_ENTRY();                                                                            \
        embed<DEC>(w, row_bytes, ids, out, n, cols);                                                              \
    }

QUANT_KERNELS(f32, DecF32)
QUANT_KERNELS(f16, DecHalf<false>)
QUANT_KERNELS(bf16, DecHalf<true>)
QUANT_KERNELS(q4_0, DecQ4_0)
QUANT_KERNELS(q4_1, DecQ4_1)
QUANT_KERNELS(q5_0, DecQ5_0)
QUANT_KERNELS(q5_1, DecQ5_1)
QUANT_KERNELS(q8_0, DecQ8_0)
QUANT_KERNELS(q4_0s, DecQ4_0S)
QUANT_KERNELS(q8_0s, DecQ8_0S)
QUANT_KERNELS(q2_k, DecQ2K)
QUANT_KERNELS(q3_k, DecQ3K)
QUANT_KERNELS(q4_k, DecQ4K)
QUANT_KERNELS(q5_k, DecQ5K)
QUANT_KERNELS(q6_k, DecQ6K)
QUANT_KERNELS(q8_k, DecQ8K)
QUANT_KERNELS(iq4_nl, DecIQ4NL)
QUANT_KERNELS(iq4_xs, DecIQ4XS)
QUANT_KERNELS(mxfp4, DecMXFP4)

// The decoder gets a comma-free name first: a template argument list would split the
// macro's arguments.
#define AFFINE_KERNELS(BITS, GROUP)                                \
    typedef DecAffine<BITS, GROUP> DecAffine_##BITS##_##GROUP; \
    QUANT_KERNELS(affine_b##BITS##_g##GROUP, DecAffine_##BITS##_##GROUP)
#define AFFINE_GROUPS(BITS) AFFINE_KERNELS(BITS, 32) AFFINE_KERNELS(BITS, 64) AFFINE_KERNELS(BITS, 128)
AFFINE_GROUPS(2)
AFFINE_GROUPS(3)
AFFINE_GROUPS(4)
AFFINE_GROUPS(5)
AFFINE_GROUPS(6)
AFFINE_GROUPS(8)
