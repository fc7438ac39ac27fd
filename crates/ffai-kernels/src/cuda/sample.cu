// The sampler's candidates of each row of logits (`Backend::top_candidates_rows`), so a
// step sends back k ids and values and one f64 a row instead of the vocabulary-wide row.
// The oracle is ops::top_candidates; the ids and values must equal it bit for bit.

#define TOPC_MAX 1024

// The f32 total order (Rust's total_cmp) as an unsigned key: a larger key is a larger
// value, -0.0 below +0.0, the infinities at the ends. NaN never gets here.
__device__ __forceinline__ unsigned int topc_key(float v) {
    unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float topc_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Whether entry c of a row is taken: its scaled value s is not NaN and, with a mask (the
// row's allowed-token bits, bit c % 32 of word c / 32; null: every token), c is allowed.
// A disallowed entry is skipped exactly as a NaN is (ops::top_candidates_masked).
__device__ __forceinline__ bool topc_ok(float s, const unsigned int* mrow, unsigned int c) {
    return s == s && (mrow == nullptr || ((mrow[c >> 5] >> (c & 31u)) & 1u));
}

// One block of 1024 threads per row of `width`; `k` <= TOPC_MAX (checked by the caller).
// Scales the row by inv_t[row] (one rounded multiply, never fused, as the host does it),
// skips NaN and (with `allowed`: ceil(width / 32) mask words a row, or null) disallowed tokens,
// and finds the k largest by (value desc, id asc):
//   1. the count of values taken (non-NaN and allowed) and the largest key;
//   2. a radix select, 8 bits a pass from the top: the key T of the k-th largest and how
//      many values equal to T are taken (the lowest ids of them);
//   3. one pass in id order: values above T and the first `need` equal to T go to shared
//      memory (the equal ones ranked by a block-wide prefix count, so the lowest ids win);
//      every other value adds exp(s - m) to this thread's f64 tail sum;
//   4. a bitonic sort of the 1024 slots on (key << 32 | ~id), descending.
// out: ids [n][k], then the values' bits [n][k], then the tails as f64 [n] (n = gridDim.x).
// Unused slots (a row with fewer than k values taken): id 0xffffffff, value NaN.
extern "C" __global__ void top_candidates_rows(const float* x, unsigned int width, unsigned int k,
                                               const float* inv_t, const unsigned int* allowed,
                                               unsigned int* out) {
    PDL_ENTRY();
    __shared__ unsigned int hist[256];
    __shared__ unsigned long long cand[TOPC_MAX];
    __shared__ unsigned int warp_u[32];
    __shared__ unsigned int warp_m[32];
    __shared__ double warp_d[32];
    __shared__ unsigned int s_prefix, s_need, s_ngt;
    const unsigned int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const float* row = x + (size_t)blockIdx.x * width;
    const float it = inv_t[blockIdx.x];
    const unsigned int* mrow = allowed ? allowed + (size_t)blockIdx.x * ((width + 31u) >> 5) : nullptr;

    // 1. Count of values taken and largest key.
    unsigned int nv = 0, mk = 0;
    for (unsigned int c = tid; c < width; c += blockDim.x) {
        float s = __fmul_rn(row[c], it);
        if (topc_ok(s, mrow, c)) {
            nv++;
            mk = max(mk, topc_key(s));
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        nv += __shfl_down_sync(0xffffffffu, nv, o);
        mk = max(mk, __shfl_down_sync(0xffffffffu, mk, o));
    }
    if (lane == 0) {
        warp_u[warp] = nv;
        warp_m[warp] = mk;
    }
    cand[tid] = 0ull;  // the sentinel: sorts last (key 0 is a NaN's, never a value's)
    __syncthreads();
    unsigned int valid = 0, maxkey = 0;
    for (unsigned int w = 0; w < nwarps; w++) {
        valid += warp_u[w];
        maxkey = max(maxkey, warp_m[w]);
    }
    const unsigned int kk = min(k, valid);
    const float m = topc_value(maxkey);

    // 2. Radix select of the kk-th largest key.
    unsigned int prefix = 0, mask = 0, need = kk;
    if (kk > 0) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (unsigned int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            for (unsigned int c = tid; c < width; c += blockDim.x) {
                float s = __fmul_rn(row[c], it);
                if (topc_ok(s, mrow, c)) {
                    unsigned int key = topc_key(s);
                    if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
                }
            }
            __syncthreads();
            if (tid == 0) {
                // The digit holding the need-th largest of those still matching (they
                // number at least `need`, so digit 0 is the last resort).
                unsigned int above = 0;
                unsigned int b = 255;
                for (; b > 0; b--) {
                    if (above + hist[b] >= need) break;
                    above += hist[b];
                }
                s_prefix = prefix | (b << shift);
                s_need = need - above;
            }
            __syncthreads();
            prefix = s_prefix;
            need = s_need;
            mask |= 255u << shift;
        }
    }
    const unsigned int T = prefix;
    const unsigned int ngt = kk - need;  // values above T: all taken

    // 3. Collect in id order; everything not taken goes into the tail.
    if (tid == 0) s_ngt = 0;
    __syncthreads();
    unsigned int eq_seen = 0;
    double tail = 0.0;
    for (unsigned int base = 0; base < width; base += blockDim.x) {
        const unsigned int c = base + tid;
        float s = 0.0f;
        bool ok = false;
        if (c < width) {
            s = __fmul_rn(row[c], it);
            ok = topc_ok(s, mrow, c);
        }
        const unsigned int key = ok ? topc_key(s) : 0u;
        const bool gt = ok && kk > 0 && key > T;
        const bool eq = ok && kk > 0 && key == T;
        const unsigned int bal = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) warp_u[warp] = __popc(bal);
        __syncthreads();
        unsigned int rank = eq_seen, chunk = 0;
        for (unsigned int w = 0; w < nwarps; w++) {
            if (w < warp) rank += warp_u[w];
            chunk += warp_u[w];
        }
        rank += __popc(bal & ((1u << lane) - 1u));
        if (gt) {
            unsigned int slot = atomicAdd(&s_ngt, 1u);
            cand[slot] = ((unsigned long long)key << 32) | (unsigned long long)(~c);
        } else if (eq && rank < need) {
            cand[ngt + rank] = ((unsigned long long)key << 32) | (unsigned long long)(~c);
        } else if (ok) {
            tail += (double)expf(__fsub_rn(s, m));
        }
        eq_seen += chunk;
        __syncthreads();  // warp_u is rewritten by the next chunk
    }
    for (int o = 16; o > 0; o >>= 1) tail += __shfl_down_sync(0xffffffffu, tail, o);
    if (lane == 0) warp_d[warp] = tail;

    // 4. Bitonic sort, descending (the last merge has (tid & 1024) == 0 everywhere).
    for (unsigned int size = 2; size <= TOPC_MAX; size <<= 1) {
        for (unsigned int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            const unsigned int j = tid ^ stride;
            if (j > tid) {
                const unsigned long long a = cand[tid], b = cand[j];
                const bool desc = (tid & size) == 0;
                if (desc ? a < b : a > b) {
                    cand[tid] = b;
                    cand[j] = a;
                }
            }
        }
    }
    __syncthreads();

    const size_t n = gridDim.x;
    unsigned int* ids = out + (size_t)blockIdx.x * k;
    unsigned int* vals = out + n * k + (size_t)blockIdx.x * k;
    for (unsigned int i = tid; i < k; i += blockDim.x) {
        const unsigned long long e = cand[i];
        if (i < kk) {
            ids[i] = ~(unsigned int)(e & 0xffffffffull);
            vals[i] = __float_as_uint(topc_value((unsigned int)(e >> 32)));
        } else {
            ids[i] = 0xffffffffu;
            vals[i] = 0x7fc00000u;
        }
    }
    if (tid == 0) {
        double t = 0.0;
        for (unsigned int w = 0; w < nwarps; w++) t += warp_d[w];
        reinterpret_cast<double*>(out + 2 * n * k)[blockIdx.x] = t;
    }
}
