/*
 * topk.cu: CUDA kernels of the top-k sparsifier (hvd_compress/codecs/topk.py); csrc/topk.c is the
 * bit-identical CPU reference.  Each launch serves every tensor of a bucket (a segment table,
 * tiles that never straddle two tensors); the codec runs them as
 *
 *   hvdc_topk_sample    |g + r| at start + j * stride                     (threshold estimate)
 *   hvdc_topk_count     r <- g + r; per block, #{|r_i| >= level_l} for the levels asked
 *   (torch)             the level choice (on the device for the sampled mode: no host read) and
 *                       exclusive scans of the chosen levels' block counts
 *   hvdc_topk_compact   (i, r_i) for |r_i| >= t_hi, and the first `budget` of t_lo <= |r_i| < t_hi,
 *                       ascending i, into a fixed-capacity buffer: block offsets from the scans,
 *                       warp ballots + a block scan inside; no atomics on output positions
 *   hvdc_topk_finalize  wire values (fp16 or fp32) and r[i] <- r_i - D(C(r_i)) at the sent
 *                       entries (index n marks the padding of a fixed-capacity payload)
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
static_assert(TOPK_ITEMS < 256, "hvdc_topk_count keeps per-thread counts in bytes");

/* A tensor's row of the segment table (``seg``): offset in the bucket, n, k, sample stride,
 * sample size m, t.  One launch serves every tensor of a bucket (one row for a lone tensor). */
#define TOPK_SEG 6

/* out[e] = |g + r| at sample e of its tensor j = sample_seg[e]: element offset_j + start_j +
 * (e - sample_off[j]) * stride_j, start_j from the tensor's Philox stream. */
extern "C" __global__ void hvdc_topk_sample(const float *g, const float *r, int has_r,
                                            const long long *seg, const long long *ids,
                                            const int *sample_seg, const long long *sample_off,
                                            long long total, unsigned long long seed,
                                            unsigned int step, float *out)
{
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        int j = sample_seg[e];
        const long long *s = seg + TOPK_SEG * j;
        long long start = hvdc_topk_sample_start(seed, step, (unsigned int)ids[j], s[3]);
        long long i = s[0] + start + (e - sample_off[j]) * s[3];
        float v = has_r ? g[i] + r[i] : g[i];
        out[e] = fabsf(v);
    }
}

/* Grid: one block per tile [tile_lo[b], tile_hi[b]) of at most TOPK_TILE elements of one tensor
 * j = tile_seg[b].  counts[l * gridDim.x + b] = #{|r_i| >= levels[j * nlevels + l]} in the
 * tile, after r <- g + r when has_r (error feedback: g' = g + r). */
extern "C" __global__ __launch_bounds__(TOPK_THREADS) void
hvdc_topk_count(const float *g, float *r, int has_r, const int *tile_seg,
                const long long *tile_lo, const long long *tile_hi, const float *levels,
                int nlevels, int *counts)
{
    __shared__ int warp_counts[TOPK_WARPS][HVDC_TOPK_MAX_LEVELS];
    __shared__ float lv[HVDC_TOPK_MAX_LEVELS];
    /* a thread counts at most TOPK_ITEMS < 256 per level: four levels' counts share a word, so
     * sixteen levels need four registers (no spills) */
    unsigned int c4[HVDC_TOPK_MAX_LEVELS / 4] = {0u};
    const float *mine = levels + (long long)tile_seg[blockIdx.x] * nlevels;
    if ((int)threadIdx.x < HVDC_TOPK_MAX_LEVELS)
        lv[threadIdx.x] = (int)threadIdx.x < nlevels ? mine[threadIdx.x] : hvdc_u2f(0x7f800000u);
    __syncthreads();
    long long lo = tile_lo[blockIdx.x], hi = tile_hi[blockIdx.x];
#pragma unroll 4
    for (int it = 0; it < TOPK_ITEMS; ++it) {
        long long i = lo + it * TOPK_THREADS + threadIdx.x;
        if (i < hi) {
            float v = g[i];
            if (has_r) { v = v + r[i]; r[i] = v; }
            float a = fabsf(v);
#pragma unroll
            for (int l = 0; l < HVDC_TOPK_MAX_LEVELS; ++l)
                c4[l >> 2] += (unsigned int)(a >= lv[l]) << (8 * (l & 3));
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int l = 0; l < HVDC_TOPK_MAX_LEVELS; ++l) {
        int s = (int)((c4[l >> 2] >> (8 * (l & 3))) & 0xffu);
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

/* Same grid as hvdc_topk_count.  Tile b of tensor j takes every |v| >= thr[2 j] and the first
 * budget[j] entries (in index order) of the band thr[2 j + 1] <= |v| < thr[2 j]; off_hi[b] is
 * where its first entry above goes (the tensor's output base plus the scan of its earlier
 * tiles), off_band[b] the scan of the band counts, so an entry lands at off_hi + (#above before
 * it in the tile) + min(#band before it in the tensor, budget): ascending, no shared counter.
 * Indices are written relative to the tensor. */
extern "C" __global__ __launch_bounds__(TOPK_THREADS) void
hvdc_topk_compact(const float *src, const int *tile_seg, const long long *tile_lo,
                  const long long *tile_hi, const long long *seg, const float *thr,
                  const long long *budgets, const long long *off_hi, const long long *off_band,
                  int *idx, float *val)
{
    __shared__ int warp_hi[TOPK_WARPS], warp_band[TOPK_WARPS];
    int j = tile_seg[blockIdx.x];
    float t_hi = thr[2 * j], t_lo = thr[2 * j + 1];
    long long budget = budgets[j], base = seg[TOPK_SEG * j];
    long long lo = tile_lo[blockIdx.x], end = tile_hi[blockIdx.x];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned int lanes_below = (1u << lane) - 1u;
    long long above = off_hi[blockIdx.x], band = off_band[blockIdx.x];
    for (int it = 0; it < TOPK_ITEMS; ++it) {
        long long i = lo + it * TOPK_THREADS + threadIdx.x;
        float v = i < end ? src[i] : 0.0f;
        float a = fabsf(v);
        int hi = i < end && a >= t_hi;
        int in_band = i < end && !hi && a >= t_lo;
        unsigned int ballot_hi = __ballot_sync(0xffffffffu, hi);
        unsigned int ballot_band = __ballot_sync(0xffffffffu, in_band);
        if (lane == 0) {
            warp_hi[warp] = __popc(ballot_hi);
            warp_band[warp] = __popc(ballot_band);
        }
        __syncthreads();
        int before_hi = 0, before_band = 0, total_hi = 0, total_band = 0;
        for (int w = 0; w < TOPK_WARPS; ++w) {
            before_hi += w < warp ? warp_hi[w] : 0;
            before_band += w < warp ? warp_band[w] : 0;
            total_hi += warp_hi[w];
            total_band += warp_band[w];
        }
        long long h = above + before_hi + __popc(ballot_hi & lanes_below);
        long long b = band + before_band + __popc(ballot_band & lanes_below);
        if (hi || (in_band && b < budget)) {
            long long p = h + (b < budget ? b : budget);
            idx[p] = (int)(i - base);
            val[p] = v;
        }
        above += total_hi;
        band += total_band;
        __syncthreads();
    }
}

/* The c entries of a bucket's payloads: wire values, and with error feedback
 * r[offset_j + idx[e]] <- v - D(C(v)) for entry e of tensor j = entry_seg[e] (tensor 0 for
 * every entry when entry_seg is null).  Index n_j is padding (a fixed-capacity payload's unused
 * tail): value 0, no residual update. */
extern "C" __global__ void hvdc_topk_finalize(const int *idx, const float *cand, long long c,
                                              const int *entry_seg, const long long *seg,
                                              void *vals, int fp16, float *r, int has_r)
{
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < c;
         e += (long long)gridDim.x * blockDim.x) {
        const long long *s = seg + TOPK_SEG * (entry_seg ? entry_seg[e] : 0);
        int i = idx[e];
        float v = i < s[1] ? cand[e] : 0.0f;
        hvdc_half h = 0;
        float rest = hvdc_topk_encode_value(v, fp16, &h);
        if (fp16) ((hvdc_half *)vals)[e] = h;
        else ((float *)vals)[e] = v;
        if (has_r && i < s[1]) r[s[0] + i] = rest;
    }
}

/* bad[0] <- 1 unless 0 <= idx[0] < idx[1] < ... < n, followed (when `padded`) by entries equal
 * to n only (every racing writer stores 1). */
extern "C" __global__ void hvdc_topk_check(const int *idx, long long c, long long n, int padded,
                                           int *bad)
{
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (long long)gridDim.x * blockDim.x) {
        int i = idx[j];
        int ok = (i >= 0 && i < n && (j == 0 || idx[j - 1] < i)) || (padded && i == n);
        if (!ok) bad[0] = 1;
    }
}

/* out[idx[j]] += D(vals[j]) for one worker, padding (index n) skipped; indices are unique
 * (checked), so no two threads touch one element, and the host launches workers in order on
 * one stream. */
extern "C" __global__ void hvdc_topk_scatter_add(const int *idx, const void *vals, int fp16,
                                                 long long c, long long n, float *out)
{
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < c;
         j += (long long)gridDim.x * blockDim.x) {
        int i = idx[j];
        if (i < n) out[i] = out[i] + hvdc_topk_decode_value(vals, fp16, j);
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
