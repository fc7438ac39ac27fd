// Row-wise and element-wise f32 kernels of the CUDA backend (issue 13). Header-free:
// NVRTC 13 finds no cuda_fp16.h without a toolkit, so nothing here includes one.
// Each kernel mirrors the CPU op of the same name in ops.rs.

extern "C" __global__ void silu_mul(float* gate, const float* up, unsigned int len) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float g = gate[i];
        gate[i] = g / (1.0f + __expf(-g)) * up[i];
    }
}

extern "C" __global__ void add_inplace(float* x, const float* y, unsigned int len) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] += y[i];
    }
}

extern "C" __global__ void scale(float* x, float s, unsigned int len) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        x[i] *= s;
    }
}

// One block per row of `width`: out = x / rms(x) * w. The block's threads sum squares
// over strided columns, then reduce through shared memory (blockDim.x a power of two,
// at most 1024).
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, unsigned int width, float* out) {
    __shared__ float partial[1024];
    const float* row = x + (size_t)blockIdx.x * width;
    float* dst = out + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        s += row[c] * row[c];
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    float inv = rsqrtf(partial[0] / (float)width + eps);
    for (unsigned int c = threadIdx.x; c < width; c += blockDim.x) {
        dst[c] = row[c] * inv * w[c];
    }
}
