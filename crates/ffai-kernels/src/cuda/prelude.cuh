// Prepended to every kernel source (mod.rs `PRELUDE`).
//
// Programmatic dependent launch (Hopper and later): the backend launches every kernel
// with the attribute that lets it start while the kernel before it in the stream is
// still running (`FFAI_CUDA_PDL=0` turns it off). `PDL_ENTRY` is therefore the first
// statement of every kernel: `griddepcontrol.wait` blocks until the previous grid has
// finished and its writes are visible (so no kernel reads or writes anything before
// its predecessor is done: each kernel waits for the one before, which waited for the
// one before it), then `launch_dependents` lets the next kernel's blocks be scheduled
// (they too wait at their entry). What overlaps is launching, block scheduling and each
// kernel's start-up, not any memory access. Launched without the attribute (older
// GPUs, the switch off, cuBLAS kernels before ours), both instructions return at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY()                                          \
    do {                                                     \
        asm volatile("griddepcontrol.wait;" ::: "memory");   \
        asm volatile("griddepcontrol.launch_dependents;" :::); \
    } while (0)
#else
#define PDL_ENTRY() \
    do {            \
    } while (0)
#endif

// The 8-bit activation scheme shared by the producers of the decode products' inputs
// (q8x.cu's quantizers and fused producers, attention.cu's attn_dec; the scheme is
// described above q8x.cu's quantizers): the level of v in a block whose largest
// magnitude has the bits `m`; its scale d goes to `d`.
__device__ __forceinline__ int q8_level(float v, unsigned int m, float& d) {
    const float amax = __uint_as_float(m);
    float m1, m2;
    if (m >= 0x7F800000u) {
        d = __uint_as_float(0x7FC00000u);
        m1 = 0.0f;
        m2 = 0.0f;
    } else if (m == 0) {
        d = 0.0f;
        m1 = 0.0f;
        m2 = 0.0f;
    } else {
        d = __fdiv_rn(amax, 127.0f);
        m1 = __fdiv_rn(127.0f, amax);
        m2 = 1.0f;
        if (__float_as_uint(m1) >= 0x7F800000u) {
            const float up = 1267650600228229401496703205376.0f;  // 2^100
            m1 = up;
            m2 = __fdiv_rn(127.0f, __fmul_rn(amax, up));
        }
    }
    return __float2int_rn(__fmul_rn(__fmul_rn(v, m1), m2));
}

// MXFP4 (quant/mxfp4.rs), for quant.cu's f32 kernels and q8x.cu's 8-bit ones alike: half
// the E8M0 block scale, 2^(e - 128), built from its bits (a subnormal for e < 2, so every
// e is exact), and the E2M1 values doubled (integers: `mxfp4::KVALUES`, code 8 is +0) as
// two 8-byte register tables for byte permutes: codes 0..7 (positive) and 8..15 (negated).
__device__ __forceinline__ float mxfp4_half_scale(unsigned int e) {
    return e < 2 ? __uint_as_float(0x00200000u << e) : __uint_as_float((e - 1) << 23);
}
#define E2M1X2_POS_LO 0x03020100u
#define E2M1X2_POS_HI 0x0C080604u
#define E2M1X2_NEG_LO 0xFDFEFF00u
#define E2M1X2_NEG_HI 0xF4F8FAFCu
