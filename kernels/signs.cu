/*
 * signs.cu: CUDA kernels of the sign codecs (hvd_compress/codecs/sign.py): 1-bit SGD, EF-signSGD's
 * scaled sign, signSGD.  csrc/signs.c is the CPU reference; both evaluate the formulas of
 * signs.h, and every sum in the order of hvdc_warp_sum, so results are bit-identical.
 *
 *   hvdc_sign_stats     one warp per (bucket, chunk of HVDC_SUM_CHUNK) segment: partial sums
 *   hvdc_sign_reduce    one warp per chunk of a bucket's partials (repeated while > 1 per bucket)
 *   hvdc_sign_finalize  the wire scales of each bucket (means, or ||v||_1 / d)
 *   hvdc_sign_encode    one thread per element: sign bits by warp ballot, error feedback
 *   hvdc_sign_decode_acc  one thread per element: out_i += D_0(i) + D_1(i) + ... in worker order
 *
 * Segments of a bucket: nchunks = ceil(min(bucket, n) / HVDC_SUM_CHUNK) per bucket, the same
 * for every bucket; chunks past the end of a short last bucket are empty and sum to +0.0, which
 * leaves every later sum unchanged (a warp sum is never -0.0).  Optional pointers (residual r,
 * counts, scales) may be null.
 */
#include "signs.h"
#include "hvdc_warp.cuh"

extern "C" {

__global__ void hvdc_sign_stats(const float *g, const float *r, long long n, long long bucket,
                                long long nchunks, int kind, float *sums, long long *counts)
{
    long long s = hvdc_thread_index() / 32;
    int lane = threadIdx.x & 31;
    if (s >= (n + bucket - 1) / bucket * nchunks) return;       /* whole warps */
    long long b = s / nchunks, lo = b * bucket + s % nchunks * HVDC_SUM_CHUNK;
    long long hi = lo + HVDC_SUM_CHUNK;
    hi = hi < (b + 1) * bucket ? hi : (b + 1) * bucket;
    hi = hi < n ? hi : n;
    float a0 = 0.0f, a1 = 0.0f;
    long long cnt = 0;
    for (long long i = lo + lane; i < hi; i += 32) {
        float v = r ? g[i] + r[i] : g[i];
        a0 += hvdc_sign_stat0(kind, v);
        a1 += hvdc_sign_stat1(kind, v);
        cnt += !hvdc_sign_bit(v);
    }
    a0 = hvdc_butterfly_sum(a0);
    a1 = hvdc_butterfly_sum(a1);
    cnt = hvdc_butterfly_sum(cnt);
    if (lane == 0) {
        sums[2 * s] = a0;
        sums[2 * s + 1] = a1;
        if (counts) counts[s] = cnt;
    }
}

/* groups x m partials in, groups x ceil(m / HVDC_SUM_CHUNK) out: one warp per output. */
__global__ void hvdc_sign_reduce(const float *sums, const long long *counts, long long groups,
                                 long long m, float *out_sums, long long *out_counts)
{
    long long mo = (m + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    long long s = hvdc_thread_index() / 32;
    int lane = threadIdx.x & 31;
    if (s >= groups * mo) return;
    long long base = s / mo * m, lo = s % mo * HVDC_SUM_CHUNK;
    long long hi = lo + HVDC_SUM_CHUNK < m ? lo + HVDC_SUM_CHUNK : m;
    float a0 = 0.0f, a1 = 0.0f;
    long long cnt = 0;
    for (long long i = base + lo + lane; i < base + hi; i += 32) {
        a0 += sums[2 * i];
        a1 += sums[2 * i + 1];
        if (counts) cnt += counts[i];
    }
    a0 = hvdc_butterfly_sum(a0);
    a1 = hvdc_butterfly_sum(a1);
    cnt = hvdc_butterfly_sum(cnt);
    if (lane == 0) {
        out_sums[2 * s] = a0;
        out_sums[2 * s + 1] = a1;
        if (counts) out_counts[s] = cnt;
    }
}

/* sums / counts: one entry per bucket (the reduced statistics). */
__global__ void hvdc_sign_finalize(const float *sums, const long long *counts, long long n,
                                   long long bucket, int kind, float *scales)
{
    long long b = hvdc_thread_index();
    if (b >= (n + bucket - 1) / bucket) return;
    long long d = n - b * bucket < bucket ? n - b * bucket : bucket;
    hvdc_sign_scales(kind, sums[2 * b], sums[2 * b + 1], counts ? counts[b] : 0, d,
                     scales + hvdc_sign_nscales(kind) * b);
}

/* Blocks of whole warps, so a warp's elements start at a multiple of 32: its ballot is the
 * payload word of those elements, written by lanes 0..3 one byte each.  With r (1-bit SGD and the
 * scaled sign): r <- v - D(bit) with the bucket's scales. */
__global__ void hvdc_sign_encode(const float *g, float *r, long long n, long long bucket, int kind,
                                 const float *scales, hvdc_u8 *bits)
{
    long long i = hvdc_thread_index(), first = i - (threadIdx.x & 31);
    int lane = threadIdx.x & 31;
    if (first >= n) return;                                     /* whole warps */
    float v = i < n ? (r ? g[i] + r[i] : g[i]) : 0.0f;
    hvdc_u32 bit = i < n ? hvdc_sign_bit(v) : 0u;
    hvdc_u32 word = __ballot_sync(HVDC_FULL, bit);
    if (r && i < n) {
        long long b = i / bucket;
        r[i] = v - hvdc_sign_value(kind, bit, hvdc_sign_scale(kind, scales, b, 0),
                                   hvdc_sign_scale(kind, scales, b, 1));
    }
    if (lane < 4 && first + 8 * lane < n)
        bits[first / 8 + lane] = (hvdc_u8)(word >> (8 * lane));
}

/* bits / scales: each worker's buffers (scales null for signSGD). */
__global__ void hvdc_sign_decode_acc(const unsigned long long *bits, const unsigned long long *scales,
                                     int nworkers, long long n, long long bucket, int kind, float *out)
{
    long long i = hvdc_thread_index(), b = i / bucket;
    if (i >= n) return;
    float acc = out[i];
    for (int w = 0; w < nworkers; ++w) {
        const float *s = scales ? (const float *)scales[w] : (const float *)0;
        acc += hvdc_sign_value(kind, hvdc_sign_load((const hvdc_u8 *)bits[w], i),
                               hvdc_sign_scale(kind, s, b, 0), hvdc_sign_scale(kind, s, b, 1));
    }
    out[i] = acc;
}

}  /* extern "C" */
