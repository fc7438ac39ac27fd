// Row-wise and element-wise f32 kernels of the CUDA backend. Header-free: NVRTC 13 finds
// no cuda_fp16.h without a toolkit, so nothing here includes one. Each kernel mirrors the
// CPU op of the same name in ops.rs / cpu.rs (same formula; the GPU may fuse a multiply
// and an add where the CPU rounds twice, so results agree to rounding, not bits).

extern "C" __global__ void silu_mul(float* gate, const float* up, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// GPT-OSS's clamped SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
// gate = (u + 1) * g * sigmoid(alpha * g).
extern "C" __global__ void swiglu_clamped(float* gate, const float* up, float alpha, float limit,
                                          unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float g = fminf(gate[i], limit);
        float u = fminf(fmaxf(up[i], -limit), limit);
        gate[i] = (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
    }
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

extern "C" __global__ void gelu_mul(float* gate, const float* up, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        gate[i] = gelu_tanh(gate[i]) * up[i];
    }
}

extern "C" __global__ void gelu(float* x, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] = gelu_tanh(x[i]);
    }
}

extern "C" __global__ void add_inplace(float* x, const float* y, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] += y[i];
    }
}

extern "C" __global__ void add_scaled(float* x, const float* y, float alpha, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] += alpha * y[i];
    }
}

// x[t * width + c] += bias[c] for every row t; `len` = rows * width.
extern "C" __global__ void add_bias(float* x, const float* bias, unsigned int width, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] += bias[i % width];
    }
}

extern "C" __global__ void scale(float* x, float s, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] *= s;
    }
}

extern "C" __global__ void softcap(float* x, float cap, unsigned int len) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] = cap * tanhf(x[i] * (1.0f / cap));
    }
}

// f32 -> bf16 (round to nearest even; NaN stays NaN): the activations of a tensor-core GEMM.
extern "C" __global__ void to_bf16(const float* x, unsigned short* out, unsigned long long len) {
    PDL_ENTRY();
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        unsigned int b = __float_as_uint(x[i]);
        unsigned short h;
        if ((b & 0x7fffffffu) > 0x7f800000u) {
            h = (unsigned short)((b >> 16) | 0x40u);
        } else {
            h = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
        }
        out[i] = h;
    }
}

// f32 -> f16 (round to nearest even; NaN stays NaN; finite values past f16's range
// saturate to +-65504 instead of becoming infinities): the activations of an f16 GEMM
// against f16 weights.
extern "C" __global__ void to_f16(const float* x, unsigned short* out, unsigned long long len) {
    PDL_ENTRY();
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float v = x[i];
        if (v == v && fabsf(v) < __int_as_float(0x7f800000)) {
            v = fminf(fmaxf(v, -65504.0f), 65504.0f);
        }
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        out[i] = h;
    }
}

// Sum of a block's values (blockDim.x a power of two, at most 1024) through shared
// memory; every thread gets the total.
__device__ float block_sum(float v, float* partial) {
    partial[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    float total = partial[0];
    __syncthreads();
    return total;
}

// One block per row of `width`: out = x / rms(x) * w.
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, unsigned int width, float* out) {
    PDL_ENTRY();
    __shared__ float partial[1024];
    const float* row = x + (size_t)blockIdx.x * width;
    float* dst = out + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        s += row[c] * row[c];
    }
    float inv = 1.0f / sqrtf(block_sum(s, partial) / (float)width + eps);
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        dst[c] = row[c] * inv * w[c];
    }
}

// One block per row: out = (x - mean) / sqrt(var + eps) * w + b.
extern "C" __global__ void layer_norm(const float* x, const float* w, const float* b, float eps, unsigned int width,
                                      float* out) {
    PDL_ENTRY();
    __shared__ float partial[1024];
    const float* row = x + (size_t)blockIdx.x * width;
    float* dst = out + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        s += row[c];
    }
    float mean = block_sum(s, partial) / (float)width;
    float v = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        float d = row[c] - mean;
        v += d * d;
    }
    float inv = 1.0f / sqrtf(block_sum(v, partial) / (float)width + eps);
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        dst[c] = (row[c] - mean) * inv * w[c] + b[c];
    }
}

// One block per row of `width` (blockDim.x = 1024): the index of the row's largest
// value into out[row]; ties go to the lowest index and NaN never wins (as ops::argmax).
extern "C" __global__ void argmax_rows(const float* x, unsigned int width, unsigned int* out) {
    PDL_ENTRY();
    __shared__ float best_v[1024];
    __shared__ unsigned int best_i[1024];
    const float* row = x + (size_t)blockIdx.x * width;
    float bv = -__int_as_float(0x7f800000);
    unsigned int bi = 0xffffffffu;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = row[c];
        if (v > bv || (bi == 0xffffffffu && v == bv)) {
            bv = v;
            bi = c;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            float ov = best_v[threadIdx.x + half];
            unsigned int oi = best_i[threadIdx.x + half];
            float mv = best_v[threadIdx.x];
            unsigned int mi = best_i[threadIdx.x];
            if (oi != 0xffffffffu && (mi == 0xffffffffu || ov > mv || (ov == mv && oi < mi))) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        // A row of NaN only: index 0, as the CPU's argmax gives.
        out[blockIdx.x] = best_i[0] == 0xffffffffu ? 0u : best_i[0];
    }
}

// A strided copy of a column range: dst[r * dst_stride + dst_off + c] =
// src[r * src_stride + src_off + c] for c < width, r < rows (grid over rows * width).
extern "C" __global__ void copy_rows(const float* src, unsigned int src_stride, unsigned int src_off, float* dst,
                                     unsigned int dst_stride, unsigned int dst_off, unsigned int width,
                                     unsigned int rows) {
    PDL_ENTRY();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * width) {
        unsigned int r = i / width, c = i % width;
        dst[(size_t)r * dst_stride + dst_off + c] = src[(size_t)r * src_stride + src_off + c];
    }
}
