// The recurrent mixers' kernels (crate::ssm on the CPU): the causal depthwise convolution
// with its carried inputs, the Mamba 2 scan, the gated RMSNorm, an element-wise product
// and a state-slot copy. Header-free, like the other sources. Each sequence's rows and
// state slot come from the step's buffers: `seqs` holds 4 u32 per sequence (first row,
// rows, table start, table length: group 0's), `slots` its state slot, `positions` each
// row's position (a sequence whose first row is at 0 starts from a zero state).
//
// The scan runs the one-step recurrence for every row (the CPU cuts prefill rows into
// chunks of the chunked form): the same arithmetic up to rounding.

#define MAX_CONV_KERNEL 8

extern "C" __global__ void mul_inplace(float* x, const float* y, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] *= y[i];
    }
}

// x = max(x, 0)^2 (NemotronH's relu2 MLP).
extern "C" __global__ void relu_sq(float* x, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float r = fmaxf(x[i], 0.0f);
        x[i] = r * r;
    }
}

// Grid (ceil(channels / blockDim.x), sequences): one thread per (sequence, channel).
// w is [kernel][channels]; state slots are [kernel - 1][channels].
extern "C" __global__ void conv_step(const float* x, unsigned int channels, unsigned int kernel, const float* w,
                                     const float* bias, unsigned int has_bias, unsigned int silu, float* state,
                                     const unsigned int* positions, const unsigned int* seqs,
                                     const unsigned int* slots, float* out) {
    PDL_ENTRY();
    unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int si = blockIdx.y;
    if (c >= channels || kernel == 0 || kernel > MAX_CONV_KERNEL) {
        return;
    }
    unsigned int r0 = seqs[4 * si], nr = seqs[4 * si + 1];
    unsigned int k1 = kernel - 1;
    unsigned int p0 = positions[r0];
    float* st = state + (size_t)slots[si] * k1 * channels;
    float win[MAX_CONV_KERNEL];
    for (unsigned int r = 0; r < k1; r++) {
        win[r] = p0 == 0 ? 0.0f : st[(size_t)r * channels + c];
    }
    for (unsigned int i = 0; i < nr; i++) {
        size_t at = (size_t)(r0 + i) * channels + c;
        float xi = x[at];
        float acc = has_bias ? bias[c] : 0.0f;
        for (unsigned int j = 0; j < k1; j++) {
            acc += w[(size_t)j * channels + c] * win[j];
        }
        acc += w[(size_t)k1 * channels + c] * xi;
        for (unsigned int j = 0; j + 1 < k1; j++) {
            win[j] = win[j + 1];
        }
        if (k1 > 0) {
            win[k1 - 1] = xi;
        }
        if (silu) {
            acc = acc / (1.0f + expf(-acc));
        }
        out[at] = acc;
    }
    for (unsigned int r = 0; r < k1; r++) {
        st[(size_t)r * channels + c] = win[r];
    }
}

__device__ __forceinline__ float softplus_f(float x) {
    return x > 20.0f ? x : log1pf(expf(x));
}

// Grid (heads, sequences); the block's threads take the head's state rows (one per
// head_dim element, each [state] wide). xbc rows are [x | B | C]; state slots
// [heads][head_dim][state].
extern "C" __global__ void ssm_scan(const float* xbc, const float* dt, const float* a, const float* d,
                                    const float* dt_bias, unsigned int heads, unsigned int hd, unsigned int groups,
                                    unsigned int ns, float dt_min, float dt_max, float* state,
                                    const unsigned int* positions, const unsigned int* seqs,
                                    const unsigned int* slots, float* out) {
    PDL_ENTRY();
    unsigned int h = blockIdx.x, si = blockIdx.y;
    unsigned int r0 = seqs[4 * si], nr = seqs[4 * si + 1];
    unsigned int p0 = positions[r0];
    size_t width = (size_t)heads * hd + 2 * (size_t)groups * ns;
    unsigned int g = h / (heads / groups);
    float* S = state + ((size_t)slots[si] * heads + h) * hd * ns;
    for (unsigned int e = threadIdx.x; e < hd; e += blockDim.x) {
        float* s = S + (size_t)e * ns;
        if (p0 == 0) {
            for (unsigned int k = 0; k < ns; k++) {
                s[k] = 0.0f;
            }
        }
        for (unsigned int i = 0; i < nr; i++) {
            const float* row = xbc + (size_t)(r0 + i) * width;
            float dtv = fminf(fmaxf(softplus_f(dt[(size_t)(r0 + i) * heads + h] + dt_bias[h]), dt_min), dt_max);
            float decay = expf(dtv * a[h]);
            float x = row[(size_t)h * hd + e];
            const float* B = row + (size_t)heads * hd + (size_t)g * ns;
            const float* C = B + (size_t)groups * ns;
            float coef = dtv * x, y = 0.0f;
            for (unsigned int k = 0; k < ns; k++) {
                float v = s[k] * decay + coef * B[k];
                s[k] = v;
                y += v * C[k];
            }
            out[(size_t)(r0 + i) * heads * hd + (size_t)h * hd + e] = y + d[h] * x;
        }
    }
}

// Grid (rows, groups), block a power of two up to 1024: x = w * rmsnorm_group(x * silu(z)),
// or with norm_first x = w * rmsnorm_group(x) * silu(z).
extern "C" __global__ void rms_norm_gated(float* x, const float* z, const float* w, float eps, unsigned int width,
                                          unsigned int group, unsigned int norm_first) {
    PDL_ENTRY();
    __shared__ float partial[1024];
    size_t base = (size_t)blockIdx.x * width + (size_t)blockIdx.y * group;
    float* row = x + base;
    const float* gz = z + base;
    const float* gw = w + (size_t)blockIdx.y * group;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < group; c += blockDim.x) {
        float v = row[c];
        if (!norm_first) {
            float zz = gz[c];
            v = v * (zz / (1.0f + expf(-zz)));
            row[c] = v;
        }
        s += v * v;
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    float inv = 1.0f / sqrtf(partial[0] / (float)group + eps);
    for (unsigned int c = threadIdx.x; c < group; c += blockDim.x) {
        if (norm_first) {
            float zz = gz[c];
            row[c] = gw[c] * (row[c] * inv) * (zz / (1.0f + expf(-zz)));
        } else {
            row[c] = row[c] * inv * gw[c];
        }
    }
}

extern "C" __global__ void sigmoid_mul(float* x, const float* g, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] *= 1.0f / (1.0f + expf(-g[i]));
    }
}

#define MAX_GDN_KEY_DIM 256

// The gated delta rule. Grid (value heads, sequences); thread j takes column j of the head's
// state [k_dim][v_dim] (one value element). q and k of a row are normalised once into shared
// memory. Rows in order: S = e^g S; S += k (beta (v - S^T k))^T; y = S^T q.
extern "C" __global__ void gdn_step(const float* qkv, const float* b, const float* a, const float* a_neg,
                                    const float* dt_bias, unsigned int kh_n, unsigned int vh, unsigned int dk,
                                    unsigned int dv, float* state, const unsigned int* positions,
                                    const unsigned int* seqs, const unsigned int* slots, float* out) {
    PDL_ENTRY();
    __shared__ float qs[MAX_GDN_KEY_DIM];
    __shared__ float ks[MAX_GDN_KEY_DIM];
    __shared__ float norms[2];
    unsigned int h = blockIdx.x, si = blockIdx.y;
    if (dk > MAX_GDN_KEY_DIM) {
        return;
    }
    unsigned int r0 = seqs[4 * si], nr = seqs[4 * si + 1];
    unsigned int p0 = positions[r0];
    unsigned int kh = h / (vh / kh_n);
    size_t width = 2 * (size_t)kh_n * dk + (size_t)vh * dv;
    float* S = state + ((size_t)slots[si] * vh + h) * dk * dv;
    if (p0 == 0) {
        for (size_t e = threadIdx.x; e < (size_t)dk * dv; e += blockDim.x) {
            S[e] = 0.0f;
        }
    }
    float scale = rsqrtf((float)dk);
    for (unsigned int t = 0; t < nr; t++) {
        const float* row = qkv + (size_t)(r0 + t) * width;
        const float* q = row + (size_t)kh * dk;
        const float* k = row + (size_t)kh_n * dk + (size_t)kh * dk;
        const float* v = row + 2 * (size_t)kh_n * dk + (size_t)h * dv;
        __syncthreads();
        if (threadIdx.x == 0) {
            float sq = 0.0f, sk = 0.0f;
            for (unsigned int i = 0; i < dk; i++) {
                sq += q[i] * q[i];
                sk += k[i] * k[i];
            }
            norms[0] = 1.0f / sqrtf(sq + 1e-6f);
            norms[1] = 1.0f / sqrtf(sk + 1e-6f);
        }
        __syncthreads();
        for (unsigned int i = threadIdx.x; i < dk; i += blockDim.x) {
            qs[i] = q[i] * norms[0] * scale;
            ks[i] = k[i] * norms[1];
        }
        __syncthreads();
        size_t ab = (size_t)(r0 + t) * vh + h;
        float beta = 1.0f / (1.0f + expf(-b[ab]));
        float decay = expf(a_neg[h] * softplus_f(a[ab] + dt_bias[h]));
        for (unsigned int j = threadIdx.x; j < dv; j += blockDim.x) {
            float kv = 0.0f;
            for (unsigned int i = 0; i < dk; i++) {
                float sv = S[(size_t)i * dv + j] * decay;
                S[(size_t)i * dv + j] = sv;
                kv += sv * ks[i];
            }
            float delta = (v[j] - kv) * beta;
            float o = 0.0f;
            for (unsigned int i = 0; i < dk; i++) {
                float sv = S[(size_t)i * dv + j] + ks[i] * delta;
                S[(size_t)i * dv + j] = sv;
                o += sv * qs[i];
            }
            out[(size_t)(r0 + t) * vh * dv + (size_t)h * dv + j] = o;
        }
    }
}

// dst[i] = src[i] for i < len (two non-overlapping slots of one state array).
extern "C" __global__ void copy_floats(const float* src, float* dst, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        dst[i] = src[i];
    }
}
