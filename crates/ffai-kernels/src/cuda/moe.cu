// Mixture-of-experts kernels of the CUDA backend (and `clamp`): routing, per-expert
// biases and the weighted combine, all on the device so an MoE step needs no host round
// trip and can be recorded as a graph. The gathered expert products live beside the
// dense ones they share their row bodies with (q8x.cu `moe_q8x_*` / `moe_half_*`, quant.cu
// `moe_matvec_<tag>`). Header-free like the other sources.
//
// Each kernel mirrors its CPU op in ops.rs (`moe_route_with`, `moe_add_bias`,
// `moe_combine`, f32::clamp) branch by branch; sums run in the CPU's order and every
// multiply and add is spelled __fmul_rn / __fadd_rn so the compiler cannot fuse them into
// an FMA the CPU does not do. Expert ids travel as f32 (exact below 2^24), as on the CPU.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL 0xFFFFFFFFu
// ops::MAX_EXPERTS, ops::MAX_EXPERTS_PER_TOKEN.
#define MOE_MAX_EXPERTS 1024
#define MOE_MAX_K 64
#define NONE 0xFFFFFFFFu
// Experts a lane holds in registers for moe_route's picks (up to 512 experts).
#define ROUTE_PER_LANE 16

// x = clamp(x, lo, hi) as f32::clamp: NaN stays NaN (fminf/fmaxf would replace it).
extern "C" __global__ void clamp_inplace(float* x, float lo, float hi, u32 len) {
    PDL_ENTRY();
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) {
        float v = x[i];
        if (v < lo) {
            v = lo;
        }
        if (v > hi) {
            v = hi;
        }
        x[i] = v;
    }
}

// exp in f32 through the double-precision exp, rounded once: within half an ulp or so of
// the exact value, as the host's libm expf is (the f32 expf of CUDA may be 2 ulp off), so
// routing scores, and so the choices between close experts, agree with the CPU's.
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }

// The index the CPU's selection loop picks among the candidates (cand[i] != 0) of
// v[0..m): it starts at the first candidate and moves to a later one only when that is
// strictly greater. So: the first candidate if its value is NaN (nothing is greater than
// NaN), else the lowest index of the largest non-NaN value. Whole warp; every lane
// returns the same index (NONE when there is no candidate).
__device__ u32 warp_select(const float* v, const u8* cand, u32 m) {
    const u32 lane = threadIdx.x & 31;
    u32 first = NONE, bi = NONE;
    float bc = 0.0f;
    for (u32 i = lane; i < m; i += 32) {
        if (!cand[i]) {
            continue;
        }
        if (first == NONE) {
            first = i;
        }
        const float c = v[i];
        if (c == c && (bi == NONE || c > bc)) {
            bi = i;
            bc = c;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        first = min(first, __shfl_xor_sync(FULL, first, off));
        const u32 oi = __shfl_xor_sync(FULL, bi, off);
        const float oc = __shfl_xor_sync(FULL, bc, off);
        if (oi != NONE && (bi == NONE || oc > bc || (oc == bc && oi < bi))) {
            bi = oi;
            bc = oc;
        }
    }
    if (first == NONE) {
        return NONE;
    }
    const float f = v[first];
    return f != f ? first : bi;
}

// One token row per block of one warp (grid = n, block = 32): ops::moe_route_with.
// scoring: 0 softmax over all experts, 1 sigmoid; group_score: 0 max, 1 sum of the two
// largest; bias / expert_scale: 0 when absent. Writes ids[t * k + j] (as f32) and
// weights[t * k + j], best first. The caller has checked MoeRouting::check.
extern "C" __global__ void __launch_bounds__(32)
    moe_route(const float* __restrict__ logits, u32 ne, u32 k, u32 scoring, u32 renormalize, float scale,
              u32 n_groups, u32 topk_groups, u32 group_score, const float* __restrict__ bias,
              const float* __restrict__ expert_scale, float* __restrict__ ids, float* __restrict__ weights,
              u32 regs) {
    PDL_ENTRY();
    __shared__ float score[MOE_MAX_EXPERTS];
    __shared__ float choice[MOE_MAX_EXPERTS];
    __shared__ float gscore[MOE_MAX_EXPERTS];
    __shared__ u8 cand[MOE_MAX_EXPERTS];
    __shared__ u8 gcand[MOE_MAX_EXPERTS];
    __shared__ u32 taken[MOE_MAX_K];
    __shared__ float wts[MOE_MAX_K];
    const u32 t = blockIdx.x;
    const u32 lane = threadIdx.x;
    const float* l = logits + (u64)t * ne;

    if (scoring == 0) {
        // max: f32::max ignores NaN, as fmaxf does (and the order does not matter).
        float mx = -__int_as_float(0x7F800000);
        for (u32 e = lane; e < ne; e += 32) {
            mx = fmaxf(mx, l[e]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, off));
        }
        for (u32 e = lane; e < ne; e += 32) {
            score[e] = exp_f32(__fsub_rn(l[e], mx));
        }
        __syncwarp();
        // The sum in index order, as the CPU adds it.
        float inv = 0.0f;
        if (lane == 0) {
            float sum = 0.0f;
#pragma unroll 8
            for (u32 e = 0; e < ne; ++e) {
                sum = __fadd_rn(sum, score[e]);
            }
            inv = __fdiv_rn(1.0f, sum);
        }
        inv = __shfl_sync(FULL, inv, 0);
        __syncwarp();
        for (u32 e = lane; e < ne; e += 32) {
            score[e] = __fmul_rn(score[e], inv);
        }
    } else {
        for (u32 e = lane; e < ne; e += 32) {
            score[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-l[e])));
        }
    }
    for (u32 e = lane; e < ne; e += 32) {
        choice[e] = __fadd_rn(score[e], bias ? bias[e] : 0.0f);
        cand[e] = 1;
    }
    __syncwarp();

    if (n_groups > 1) {
        const u32 gs = ne / n_groups;
        for (u32 g = lane; g < n_groups; g += 32) {
            const float* c = choice + g * gs;
            float s;
            if (group_score == 0) {
                s = -__int_as_float(0x7F800000);
                for (u32 i = 0; i < gs; ++i) {
                    s = fmaxf(s, c[i]);
                }
            } else {
                float a = -__int_as_float(0x7F800000), b = a;
                for (u32 i = 0; i < gs; ++i) {
                    const float x = c[i];
                    if (x > a) {
                        b = a;
                        a = x;
                    } else if (x > b) {
                        b = x;
                    }
                }
                // A group of one expert counts it once.
                s = gs == 1 ? a : __fadd_rn(a, b);
            }
            gscore[g] = s;
            gcand[g] = 1;
        }
        __syncwarp();
        for (u32 i = 0; i < topk_groups; ++i) {
            const u32 g = warp_select(gscore, gcand, n_groups);
            __syncwarp();
            if (lane == 0 && g != NONE) {
                gcand[g] = 0;  // kept: no longer a candidate for the next pick
            }
            __syncwarp();
        }
        // Kept groups have gcand == 0; the others' experts are not allowed.
        for (u32 e = lane; e < ne; e += 32) {
            cand[e] = gcand[e / gs] ? 0 : 1;
        }
        __syncwarp();
    }

    // The picks. With `regs`, without NaN among the candidates (checked once) and with at
    // most ROUTE_PER_LANE experts a lane, each lane keeps its experts' choices and whether they
    // are still candidates in registers, and a pick is one butterfly over 64-bit keys
    // (the value's order in the high word, the complemented index in the low one: the
    // largest value, then the lowest index, as warp_select picks when no candidate is
    // NaN; -0 counts as +0, which compare equal). Otherwise warp_select, a pass over
    // shared memory a pick.
    bool nan = false;
    for (u32 e = lane; regs && e < ne; e += 32) {
        nan |= cand[e] && choice[e] != choice[e];
    }
    if (regs && ne <= 32 * ROUTE_PER_LANE && !__any_sync(FULL, nan)) {
        // ord[i]: the order of expert lane + 32 i's choice; bit i of `alive`: still a
        // candidate.
        u32 ord[ROUTE_PER_LANE], alive = 0;
#pragma unroll
        for (u32 i = 0; i < ROUTE_PER_LANE; ++i) {
            const u32 e = lane + 32 * i;
            ord[i] = 0;
            if (e < ne && cand[e]) {
                const float c = choice[e] == 0.0f ? 0.0f : choice[e];
                const u32 b = __float_as_uint(c);
                ord[i] = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
                alive |= 1u << i;
            }
        }
        for (u32 j = 0; j < k; ++j) {
            u64 best = 0;
#pragma unroll
            for (u32 i = 0; i < ROUTE_PER_LANE; ++i) {
                const u64 key = ((u64)ord[i] << 32) | (u64)(0xFFFFFFFFu - (lane + 32 * i));
                best = ((alive >> i) & 1u) && key > best ? key : best;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                const u64 o = __shfl_xor_sync(FULL, best, off);
                best = o > best ? o : best;
            }
            const u32 e = best == 0 ? NONE : 0xFFFFFFFFu - (u32)best;
            if (e != NONE && e % 32 == lane) {
                alive &= ~(1u << (e / 32));
            }
            if (lane == 0) {
                taken[j] = e;
                wts[j] = e == NONE ? __int_as_float(0x7FC00000) : score[e];
            }
        }
        __syncwarp();
    } else {
        for (u32 j = 0; j < k; ++j) {
            const u32 best = warp_select(choice, cand, ne);
            __syncwarp();
            if (lane == 0) {
                taken[j] = best;
                wts[j] = best == NONE ? __int_as_float(0x7FC00000) : score[best];
                if (best != NONE) {
                    cand[best] = 0;
                }
            }
            __syncwarp();
        }
    }

    if (lane == 0) {
        if (renormalize) {
            float s = -0.0f;
            for (u32 j = 0; j < k; ++j) {
                s = __fadd_rn(s, wts[j]);
            }
            const float inv = __fdiv_rn(1.0f, s);
            for (u32 j = 0; j < k; ++j) {
                wts[j] = __fmul_rn(wts[j], inv);
            }
        }
        if (scale != 1.0f) {
            for (u32 j = 0; j < k; ++j) {
                wts[j] = __fmul_rn(wts[j], scale);
            }
        }
        if (expert_scale) {
            for (u32 j = 0; j < k; ++j) {
                if (taken[j] != NONE) {
                    wts[j] = __fmul_rn(wts[j], expert_scale[taken[j]]);
                }
            }
        }
    }
    __syncwarp();
    for (u32 j = lane; j < k; j += 32) {
        ids[(u64)t * k + j] = taken[j] == NONE ? __int_as_float(0x7FC00000) : (float)taken[j];
        weights[(u64)t * k + j] = wts[j];
    }
}

// x[s * d + i] += biases[ids[s] * d + i] for `slots` slots (ops::moe_add_bias). An id
// outside 0..n_experts (never written by moe_route) makes the slot's row NaN.
extern "C" __global__ void moe_add_bias(float* x, const float* __restrict__ biases, const float* __restrict__ ids,
                                        u32 slots, u32 d, u32 n_experts) {
    PDL_ENTRY();
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)slots * d) {
        return;
    }
    const u32 s = (u32)(i / d), c = (u32)(i % d);
    const float f = ids[s];
    if (!(f >= 0.0f && f < (float)n_experts)) {
        x[i] = __int_as_float(0x7FC00000);
        return;
    }
    x[i] = __fadd_rn(x[i], biases[(u64)(u32)f * d + c]);
}

// out[t * d + i] = sum_j weights[t * k + j] * ys[(t * k + j) * d + i], j in slot order from
// 0 (ops::moe_combine), each product and sum rounded as the CPU rounds them.
extern "C" __global__ void moe_combine(const float* __restrict__ ys, const float* __restrict__ weights,
                                       float* __restrict__ out, u32 n, u32 k, u32 d) {
    PDL_ENTRY();
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n * d) {
        return;
    }
    const u32 t = (u32)(i / d), c = (u32)(i % d);
    float o = 0.0f;
    for (u32 j = 0; j < k; ++j) {
        const u64 s = (u64)t * k + j;
        o = __fadd_rn(o, __fmul_rn(weights[s], ys[s * d + c]));
    }
    out[i] = o;
}

// ------------------------------------------------------ grouping a step's slots by expert
//
// For the grouped products (q8x.cu `mmq_moe_*`) of a step too large for the gathered
// ones: one block of MOE_GROUP_THREADS sorts the step's slots (slot = token * k + j) by
// the expert ids[slot] names, on the device, so the step needs no host round trip.
// Group e < n_experts holds expert e's slots; group n_experts the slots whose id is not
// an expert (outside 0..n_experts or NaN: moe_route never writes one), so that no bad id
// indexes anything and their rows can be written NaN, as the gathered kernels write them.
// Writes, for the n_experts + 1 groups: counts[e] (its slots), offsets[e] (its first
// index in `sorted`: groups in expert order, bad ids last), sorted[] (the slots, grouped;
// within a group in the order the atomics hand out places, which changes no value: each
// output is one slot's row times one expert row), and the tile table: each group's run
// of `sorted` cut into tiles of at most MOE_TILE slots, tiles[3 t ..] = (group, first
// index in sorted, count), groups in order, and *n_tiles. Tiles: at most
// ceil(slots / MOE_TILE) + n_experts + 1 (each group's last tile may be partial).
// Launch: grid 1, block MOE_GROUP_THREADS; n_experts <= MOE_MAX_EXPERTS.
#define MOE_TILE 64  // q8x.cu's MMQ_TOK: the slots one block of the grouped products takes
#define MOE_GROUP_THREADS 1024

// The group of a slot's id: the expert, or n_experts for a bad id (the test gpick and
// moe_add_bias make; an id of 2.5 is expert 2 there as here).
__device__ __forceinline__ u32 moe_group_of(float f, u32 n_experts) {
    return f >= 0.0f && f < (float)n_experts ? (u32)f : n_experts;
}

// Exclusive prefix sums of (a, b) over the block's threads in thread order; the totals to
// (ta, tb) in every thread. Warp-shuffle scans, then one over the warps' totals.
__device__ __forceinline__ void block_scan2(u32& a, u32& b, u32& ta, u32& tb) {
    __shared__ u32 wa[32], wb[32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 ia = a, ib = b;  // inclusive within the warp
#pragma unroll
    for (u32 d = 1; d < 32; d <<= 1) {
        const u32 va = __shfl_up_sync(FULL, ia, d), vb = __shfl_up_sync(FULL, ib, d);
        if (lane >= d) {
            ia += va;
            ib += vb;
        }
    }
    if (lane == 31) {
        wa[warp] = ia;
        wb[warp] = ib;
    }
    __syncthreads();
    if (warp == 0) {
        u32 xa = lane < warps ? wa[lane] : 0, xb = lane < warps ? wb[lane] : 0;
#pragma unroll
        for (u32 d = 1; d < 32; d <<= 1) {
            const u32 va = __shfl_up_sync(FULL, xa, d), vb = __shfl_up_sync(FULL, xb, d);
            if (lane >= d) {
                xa += va;
                xb += vb;
            }
        }
        if (lane < warps) {
            wa[lane] = xa;  // now inclusive over the warps
            wb[lane] = xb;
        }
    }
    __syncthreads();
    const u32 pa = warp > 0 ? wa[warp - 1] : 0, pb = warp > 0 ? wb[warp - 1] : 0;
    a = pa + ia - a;
    b = pb + ib - b;
    ta = wa[warps - 1];
    tb = wb[warps - 1];
}

extern "C" __global__ void __launch_bounds__(MOE_GROUP_THREADS)
    moe_group(const float* __restrict__ ids, u32 slots, u32 n_experts, u32* __restrict__ counts,
              u32* __restrict__ offsets, u32* __restrict__ sorted, u32* __restrict__ tiles,
              u32* __restrict__ n_tiles) {
    PDL_ENTRY();
    __shared__ u32 cnt[MOE_MAX_EXPERTS + 1];   // per group: its slots
    __shared__ u32 next[MOE_MAX_EXPERTS + 1];  // per group: its next free place in `sorted`
    const u32 tid = threadIdx.x, groups = n_experts + 1;
    for (u32 e = tid; e < groups; e += blockDim.x) {
        cnt[e] = 0;
    }
    __syncthreads();
    // 1. Count each group's slots.
    for (u32 s = tid; s < slots; s += blockDim.x) {
        atomicAdd(&cnt[moe_group_of(ids[s], n_experts)], 1u);
    }
    __syncthreads();
    // 2. Offsets and tiles: thread tid takes the consecutive groups g0 .. g1 (one, or two
    // when there are more groups than threads); the block's prefix sums of its slots and
    // tiles place its groups' runs and tiles after those of the groups before.
    const u32 per = (groups + blockDim.x - 1) / blockDim.x;
    const u32 g0 = min(tid * per, groups), g1 = min(g0 + per, groups);
    u32 at = 0, tile = 0;
    for (u32 e = g0; e < g1; ++e) {
        at += cnt[e];
        tile += (cnt[e] + MOE_TILE - 1) / MOE_TILE;
    }
    u32 total_slots, total_tiles;
    block_scan2(at, tile, total_slots, total_tiles);
    for (u32 e = g0; e < g1; ++e) {
        const u32 c = cnt[e];
        counts[e] = c;
        offsets[e] = at;
        next[e] = at;
        for (u32 i = 0; i < c; i += MOE_TILE, ++tile) {
            tiles[3 * tile] = e;
            tiles[3 * tile + 1] = at + i;
            tiles[3 * tile + 2] = min(c - i, (u32)MOE_TILE);
        }
        at += c;
    }
    (void)total_slots;  // == slots: every slot is in one group
    if (tid == 0) {
        *n_tiles = total_tiles;
    }
    __syncthreads();
    // 3. Place each slot in its group's run.
    for (u32 s = tid; s < slots; s += blockDim.x) {
        sorted[atomicAdd(&next[moe_group_of(ids[s], n_experts)], 1u)] = s;
    }
}
