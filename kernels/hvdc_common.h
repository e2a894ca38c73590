/*
 * hvdc_common.h: the numeric contract shared by the CUDA kernels (compiled by NVRTC through CuPy)
 * and the CPU reference library (compiled by the C compiler at `pip install`).
 *
 * Every per-element formula of every codec lives here once, as an inline function that both
 * compilers see verbatim.  Bit-identical CPU/GPU output then needs only:
 *   - no FMA contraction: NVRTC `--fmad=false`, gcc `-ffp-contract=off`;
 *   - IEEE single-precision division and sqrt (the CUDA defaults; SSE on x86-64);
 *   - random draws compared as integers, never as floats;
 *   - reductions in the fixed order of hvdc_warp_sum (below), never with atomics.
 */
#ifndef HVDC_COMMON_H
#define HVDC_COMMON_H

#if defined(__CUDACC__)
#define HVDC_FN __device__ __forceinline__
typedef unsigned char hvdc_u8;
typedef unsigned int hvdc_u32;
typedef int hvdc_i32;
typedef unsigned long long hvdc_u64;
typedef long long hvdc_i64;
#else
#include <stdint.h>
#define HVDC_FN static inline
typedef uint8_t hvdc_u8;
typedef uint32_t hvdc_u32;
typedef int32_t hvdc_i32;
typedef uint64_t hvdc_u64;
typedef int64_t hvdc_i64;
#endif

/* Bit casts between fp32 and its 32-bit pattern (exact on both compilers). */
#if defined(__CUDACC__)
HVDC_FN hvdc_u32 hvdc_f2u(float x) { return __float_as_uint(x); }
HVDC_FN float hvdc_u2f(hvdc_u32 x) { return __uint_as_float(x); }
#else
HVDC_FN hvdc_u32 hvdc_f2u(float x) { union { float f; hvdc_u32 u; } c; c.f = x; return c.u; }
HVDC_FN float hvdc_u2f(hvdc_u32 x) { union { float f; hvdc_u32 u; } c; c.u = x; return c.f; }
#endif

/* min of two non-negative floats, compared as their bit patterns (which order like the values):
 * an integer min, which gcc vectorizes and does not turn into branches. */
HVDC_FN float hvdc_min_nonneg(float a, float b)
{
    hvdc_u32 x = hvdc_f2u(a), y = hvdc_f2u(b);
    return hvdc_u2f(x < y ? x : y);
}

/* ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11) ----
 * The counter-based generator of cuRAND and PyTorch.  One call maps a 128-bit counter and a
 * 64-bit key to 128 random bits; 10 rounds of
 *     (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0))
 * with the key bumped by the Weyl constants (W0, W1) between rounds.                           */
#define HVDC_PHILOX_M0 0xD2511F53u
#define HVDC_PHILOX_M1 0xCD9E8D57u
#define HVDC_PHILOX_W0 0x9E3779B9u
#define HVDC_PHILOX_W1 0xBB67AE85u

typedef struct { hvdc_u32 v[4]; } hvdc_u32x4;

HVDC_FN hvdc_u32x4 hvdc_philox4x32_10(hvdc_u32x4 c, hvdc_u32 k0, hvdc_u32 k1)
{
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += HVDC_PHILOX_W0; k1 += HVDC_PHILOX_W1; }
        hvdc_u64 p0 = (hvdc_u64)HVDC_PHILOX_M0 * c.v[0];
        hvdc_u64 p1 = (hvdc_u64)HVDC_PHILOX_M1 * c.v[2];
        hvdc_u32x4 n;
        n.v[0] = (hvdc_u32)(p1 >> 32) ^ c.v[1] ^ k0;
        n.v[1] = (hvdc_u32)p1;
        n.v[2] = (hvdc_u32)(p0 >> 32) ^ c.v[3] ^ k1;
        n.v[3] = (hvdc_u32)p0;
        c = n;
    }
    return c;
}

/* The random stream of one tensor at one step: key = seed, counter = (element_index / 4 as 64
 * bits, step, tensor_id); element i takes word i % 4 of its block.  Any element's draw is a pure
 * function of (seed, step, tensor_id, i): no state, no dependence on thread layout.            */
HVDC_FN hvdc_u32x4 hvdc_stream_block(hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u64 block)
{
    hvdc_u32x4 c;
    c.v[0] = (hvdc_u32)block;
    c.v[1] = (hvdc_u32)(block >> 32);
    c.v[2] = step;
    c.v[3] = tensor_id;
    return hvdc_philox4x32_10(c, (hvdc_u32)seed, (hvdc_u32)(seed >> 32));
}

/* Bernoulli(p) from a 32-bit draw u, compared as integers: P[u < p * 2^32] = p exactly for every
 * p representable in fp32 on [0, 1] (p * 2^32 is exact: a power-of-two scaling).               */
HVDC_FN int hvdc_bernoulli(hvdc_u32 u, float p)
{
    return (hvdc_u64)u < (hvdc_u64)(p * 4294967296.0f);
}

/* ---- The one summation order ----
 * hvdc_warp_sum of x[0..m): 32 lanes, lane j adds x[j], x[j+32], x[j+64], ... in order; then the
 * butterfly v[j] += v[j ^ off] for off = 16, 8, 4, 2, 1 (what __shfl_xor_sync computes; fp addition
 * is commutative, so every lane ends with the same bits).  The CPU reference spells the same
 * tree out (hvdc_lane_combine); the GPU gets it from one warp per segment.  Longer reductions
 * apply it to segments of HVDC_SUM_CHUNK elements, then to the partials, until one value is left. */
#define HVDC_SUM_CHUNK 8192

HVDC_FN float hvdc_lane_combine(float v[32])
{
    for (int off = 16; off > 0; off >>= 1)
        for (int j = 0; j < off; ++j)
            v[j] = v[j] + v[j + off];
    return v[0];
}

/* ---- Segment tables: a bucket's tensors in one call ----
 * int64 [nseg][HVDC_SEG_COLS], per tensor: its offset in the bucket, its n, and its first chunk
 * of HVDC_SUM_CHUNK elements, first 4-element block (= first 2-bit code byte), first byte of
 * 1-bit codes, first thread of its range of ceil(n / 32) whole warps and first item of the
 * codec's own count (random-k: its k values), in the bucket's concatenation of each
 * (hvd_compress/codecs/_quant.py builds it).  A thread finds its tensor among the firsts of one
 * column, then does what the one-tensor code does, on that tensor alone. */
#define HVDC_SEG_COLS 7
enum { HVDC_SEG_OFFSET, HVDC_SEG_N, HVDC_SEG_CHUNK, HVDC_SEG_BLOCK4, HVDC_SEG_BYTE8, HVDC_SEG_SLOT32,
       HVDC_SEG_ITEM };

/* The tensor s whose first in column col is the last one <= k. */
HVDC_FN int hvdc_seg_of(const hvdc_i64 *seg, int nseg, int col, hvdc_i64 k)
{
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (seg[HVDC_SEG_COLS * mid + col] <= k) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

#endif /* HVDC_COMMON_H */
