/*
 * topk.cu: CUDA kernels of the top-k sparsifier (hvd_compress/codecs/topk.py); csrc/topk.c is the
 * bit-identical CPU reference.  The codec runs them as
 *
 *   hvdc_topk_sample    |g + r| at start + j * stride                     (threshold estimate)
 *   hvdc_topk_count     r <- g + r; per block, #{|r_i| >= level_l} for the levels asked
 *   (torch)             level choice on the host, exclusive scan of that level's block counts
 *   hvdc_topk_compact   (i, r_i) for |r_i| >= level, ascending i: block offset from the scan,
 *                       warp ballots + a block scan inside; no atomics on output positions
 *   hvdc_topk_finalize  wire values (fp16 or fp32) and r[i] <- r_i - D(C(r_i)) at the k entries
 *   hvdc_topk_check / hvdc_topk_scatter_add   decode: validate indices, then out[i] += D(v)
 *   hvdc_topk_normalize  Gradient Dropping's layer normalization: out = src / max|src| per tensor
 *
 * A tile of TOPK_TILE consecutive elements per block, read as TOPK_ITEMS rows of TOPK_THREADS
 * consecutive elements (coalesced).  The output order never depends on the launch geometry.
 */
#include "hvdc_common.h"
#include "topk.h"

#define TOPK_THREADS 256
#define TOPK_WARPS (TOPK_THREADS / 32)
#define TOPK_ITEMS 16
#define TOPK_TILE (TOPK_THREADS * TOPK_ITEMS)

extern "C" __global__ void hvdc_topk_sample(const float *g, const float *r, int has_r, float *out,
                                            long long stride, long long m, unsigned long long seed,
                                            unsigned int step, unsigned int tensor_id)
{
    long long start = hvdc_topk_sample_start(seed, step, tensor_id, stride);
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < m;
         j += (long long)gridDim.x * blockDim.x) {
        long long i = start + j * stride;
        float v = has_r ? g[i] + r[i] : g[i];
        out[j] = fabsf(v);
    }
}

/* Grid: one block per TOPK_TILE elements.  counts[l * gridDim.x + block] = #{|r_i| >= levels[l]}
 * in the block's tile, after r <- g + r when has_r (error feedback: g' = g + r). */
extern "C" __global__ __launch_bounds__(TOPK_THREADS) void
hvdc_topk_count(const float *g, float *r, int has_r, long long n, const float *levels,
                int nlevels, int *counts)
{
    __shared__ int warp_counts[TOPK_WARPS][HVDC_TOPK_MAX_LEVELS];
    float lv[HVDC_TOPK_MAX_LEVELS];
    int c[HVDC_TOPK_MAX_LEVELS];
#pragma unroll
    for (int l = 0; l < HVDC_TOPK_MAX_LEVELS; ++l) {
        lv[l] = l < nlevels ? levels[l] : 0.0f;
        c[l] = 0;
    }
    long long tile = (long long)blockIdx.x * TOPK_TILE;
#pragma unroll 4
    for (int it = 0; it < TOPK_ITEMS; ++it) {
        long long i = tile + it * TOPK_THREADS + threadIdx.x;
        if (i < n) {
            float v = g[i];
            if (has_r) { v = v + r[i]; r[i] = v; }
            float a = fabsf(v);
#pragma unroll
            for (int l = 0; l < HVDC_TOPK_MAX_LEVELS; ++l)
                c[l] += a >= lv[l];
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int l = 0; l < HVDC_TOPK_MAX_LEVELS; ++l) {
        int s = c[l];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) warp_counts[warp][l] = s;
    }
    __syncthreads();
    if ((int)threadIdx.x < nlevels) {
        int s = 0;
        for (int w = 0; w < TOPK_WARPS; ++w) s += warp_counts[w][threadIdx.x];
        counts[(long long)threadIdx.x * gridDim.x + blockIdx.x] = s;
    }
}

/* Same grid as hvdc_topk_count.  offsets[block] = exclusive scan of the block counts at the
 * chosen level *threshold, so block b writes its selected elements, ascending, at offsets[b],
 * offsets[b] + 1, ... */
extern "C" __global__ __launch_bounds__(TOPK_THREADS) void
hvdc_topk_compact(const float *src, long long n, const float *threshold,
                  const long long *offsets, int *idx, float *val)
{
    __shared__ int warp_counts[TOPK_WARPS];
    float thr = *threshold;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned int lanes_below = (1u << lane) - 1u;
    long long tile = (long long)blockIdx.x * TOPK_TILE;
    long long pos = offsets[blockIdx.x];
    for (int it = 0; it < TOPK_ITEMS; ++it) {
        long long i = tile + it * TOPK_THREADS + threadIdx.x;
        float v = i < n ? src[i] : 0.0f;
        int take = i < n && fabsf(v) >= thr;
        unsigned int ballot = __ballot_sync(0xffffffffu, take);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < TOPK_WARPS; ++w) {
            int cw = warp_counts[w];
            before += w < warp ? cw : 0;
            total += cw;
        }
        if (take) {
            long long p = pos + before + __popc(ballot & lanes_below);
            idx[p] = (int)i;
            val[p] = v;
        }
        pos += total;
        __syncthreads();
    }
}

/* The c final entries: wire values, and with error feedback r[idx[j]] <- v - D(C(v)). */
extern "C" __global__ void hvdc_topk_finalize(const int *idx, const float *cand, long long c,
                                              void *vals, int fp16, float *r, int has_r)
{
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (long long)gridDim.x * blockDim.x) {
        float v = cand[j];
        hvdc_half h = 0;
        float rest = hvdc_topk_encode_value(v, fp16, &h);
        if (fp16) ((hvdc_half *)vals)[j] = h;
        else ((float *)vals)[j] = v;
        if (has_r) r[idx[j]] = rest;
    }
}

/* bad[0] <- 1 unless 0 <= idx[0] < idx[1] < ... < idx[c-1] < n (every racing writer stores 1). */
extern "C" __global__ void hvdc_topk_check(const int *idx, long long c, long long n, int *bad)
{
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (long long)gridDim.x * blockDim.x) {
        int i = idx[j];
        if (i < 0 || i >= n || (j > 0 && idx[j - 1] >= i)) bad[0] = 1;
    }
}

/* out[idx[j]] += D(vals[j]) for one worker; indices are unique (checked), so no two threads
 * touch one element, and the host launches workers in order on one stream. */
extern "C" __global__ void hvdc_topk_scatter_add(const int *idx, const void *vals, int fp16,
                                                 long long c, float *out)
{
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (long long)gridDim.x * blockDim.x) {
        int i = idx[j];
        out[i] = out[i] + hvdc_topk_decode_value(vals, fp16, j);
    }
}

/* Gradient Dropping's layer normalization: out[i] = src[i] / d, d = *divisor (the tensor's max
 * |g'|), or 0 when d is 0. */
extern "C" __global__ void hvdc_topk_normalize(const float *src, long long n, const float *divisor,
                                               float *out)
{
    float d = *divisor;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = d > 0.0f ? src[i] / d : 0.0f;
}
