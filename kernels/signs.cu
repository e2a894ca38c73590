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
 *   hvdc_seg_sign_*     the same for all the tensors of a bucket in one launch (segment tables)
 *
 * Segments of a bucket: nchunks = ceil(min(bucket, n) / HVDC_SUM_CHUNK) per bucket, the same
 * for every bucket; chunks past the end of a short last bucket are empty and sum to +0.0, which
 * leaves every later sum unchanged (a warp sum is never -0.0).  Optional pointers (residual r,
 * counts, scales) may be null.
 */
#include "signs.h"
#include "hvdc_warp.cuh"

/* One warp sums chunk [lo, hi) of v = g (+ r): the two channels into sums[0..1], the count of
 * v >= 0 into counts[0] (if given). */
__device__ __forceinline__ void hvdc_sign_chunk_stats(int kind, const float *g, const float *r, long long lo,
                                                      long long hi, float *sums, long long *counts)
{
    int lane = threadIdx.x & 31;
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
        sums[0] = a0;
        sums[1] = a1;
        if (counts) counts[0] = cnt;
    }
}

/* One warp's sums of partials [lo, hi) (two channels, and the counts if given): lane j takes
 * j, j + 32, ... in order, then the butterfly. */
__device__ __forceinline__ void hvdc_sign_reduce_range(const float *sums, const long long *counts, long long lo,
                                                       long long hi, int lane, float *a0, float *a1,
                                                       long long *cnt)
{
    float s0 = 0.0f, s1 = 0.0f;
    long long c = 0;
    for (long long i = lo + lane; i < hi; i += 32) {
        s0 += sums[2 * i];
        s1 += sums[2 * i + 1];
        if (counts) c += counts[i];
    }
    *a0 = hvdc_butterfly_sum(s0);
    *a1 = hvdc_butterfly_sum(s1);
    *cnt = hvdc_butterfly_sum(c);
}

/* Element i (its warp's first element a multiple of 32 and < n) of an n-element tensor. */
__device__ __forceinline__ void hvdc_sign_encode_at(const float *g, float *r, long long n, long long bucket,
                                                    int kind, const float *scales, hvdc_u8 *bits, long long i)
{
    int lane = threadIdx.x & 31;
    long long first = i - lane;
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

/* out_i += D_0(i) + D_1(i) + ..., workers in list order. */
__device__ __forceinline__ void hvdc_sign_decode_at(const unsigned long long *bits,
                                                    const unsigned long long *scales, int nworkers, long long i,
                                                    long long bucket, int kind, float *out)
{
    long long b = i / bucket;
    float acc = out[i];
    for (int w = 0; w < nworkers; ++w) {
        const float *s = scales ? (const float *)scales[w] : (const float *)0;
        acc += hvdc_sign_value(kind, hvdc_sign_load((const hvdc_u8 *)bits[w], i),
                               hvdc_sign_scale(kind, s, b, 0), hvdc_sign_scale(kind, s, b, 1));
    }
    out[i] = acc;
}

extern "C" {

__global__ void hvdc_sign_stats(const float *g, const float *r, long long n, long long bucket,
                                long long nchunks, int kind, float *sums, long long *counts)
{
    long long s = hvdc_thread_index() / 32;
    if (s >= (n + bucket - 1) / bucket * nchunks) return;       /* whole warps */
    long long b = s / nchunks, lo = b * bucket + s % nchunks * HVDC_SUM_CHUNK;
    long long hi = lo + HVDC_SUM_CHUNK;
    hi = hi < (b + 1) * bucket ? hi : (b + 1) * bucket;
    hi = hi < n ? hi : n;
    hvdc_sign_chunk_stats(kind, g, r, lo, hi, sums + 2 * s, counts ? counts + s : counts);
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
    float a0, a1;
    long long cnt;
    hvdc_sign_reduce_range(sums, counts, base + lo, base + hi, lane, &a0, &a1, &cnt);
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
    long long i = hvdc_thread_index();
    if (i - (threadIdx.x & 31) >= n) return;                    /* whole warps */
    hvdc_sign_encode_at(g, r, n, bucket, kind, scales, bits, i);
}

/* bits / scales: each worker's buffers (scales null for signSGD). */
__global__ void hvdc_sign_decode_acc(const unsigned long long *bits, const unsigned long long *scales,
                                     int nworkers, long long n, long long bucket, int kind, float *out)
{
    long long i = hvdc_thread_index();
    if (i >= n) return;
    hvdc_sign_decode_at(bits, scales, nworkers, i, bucket, kind, out);
}

}  /* extern "C" */

/* ---- a bucket's tensors in one launch per kernel (one sign bucket per tensor; hvdc_common.h's
 * segment tables): bit for bit the per-tensor launches' results. ---- */

extern "C" {

/* hvdc_sign_stats of every tensor: one warp per chunk of the bucket. */
__global__ void hvdc_seg_sign_stats(const float *g, const float *r, const long long *seg, int nseg,
                                    long long nchunks, int kind, float *sums, long long *counts)
{
    long long k = hvdc_thread_index() / 32;
    if (k >= nchunks) return;                                   /* whole warps */
    const long long *t = seg + HVDC_SEG_COLS * hvdc_seg_of(seg, nseg, HVDC_SEG_CHUNK, k);
    long long off = t[HVDC_SEG_OFFSET], n = t[HVDC_SEG_N], lo = (k - t[HVDC_SEG_CHUNK]) * HVDC_SUM_CHUNK;
    hvdc_sign_chunk_stats(kind, g + off, r ? r + off : r, lo, lo + HVDC_SUM_CHUNK < n ? lo + HVDC_SUM_CHUNK : n,
                          sums + 2 * k, counts ? counts + k : counts);
}

/* Each tensor's chunk statistics to one and its wire scales (hvdc_sign_reduce's one level, a
 * tensor of one chunk as it is; then hvdc_sign_finalize): one warp per tensor. */
__global__ void hvdc_seg_sign_finalize(const float *sums, const long long *counts, const long long *seg,
                                       int nseg, int kind, float *scales)
{
    long long s = hvdc_thread_index() / 32;
    int lane = threadIdx.x & 31;
    if (s >= nseg) return;
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long lo = t[HVDC_SEG_CHUNK], m = (t[HVDC_SEG_N] + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    float a0, a1;
    long long cnt = 0;
    if (m == 1) {
        a0 = sums[2 * lo];
        a1 = sums[2 * lo + 1];
        if (counts) cnt = counts[lo];
    } else {
        hvdc_sign_reduce_range(sums, counts, lo, lo + m, lane, &a0, &a1, &cnt);
    }
    if (lane == 0) hvdc_sign_scales(kind, a0, a1, cnt, t[HVDC_SEG_N], scales + hvdc_sign_nscales(kind) * s);
}

/* hvdc_sign_encode of every tensor: one thread per warp slot (a tensor's slots start at a
 * multiple of 32, so each warp's elements are those of one tensor from a multiple of 32). */
__global__ void hvdc_seg_sign_encode(const float *g, float *r, const long long *seg, int nseg, long long nslots,
                                     int kind, const float *scales, hvdc_u8 *bits)
{
    long long k = hvdc_thread_index();
    if (k - (threadIdx.x & 31) >= nslots) return;              /* whole warps */
    int s = hvdc_seg_of(seg, nseg, HVDC_SEG_SLOT32, k);
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long off = t[HVDC_SEG_OFFSET], n = t[HVDC_SEG_N];
    hvdc_sign_encode_at(g + off, r ? r + off : r, n, n, kind, scales + hvdc_sign_nscales(kind) * s,
                        bits + t[HVDC_SEG_BYTE8], k - t[HVDC_SEG_SLOT32]);
}

/* hvdc_sign_decode_acc of every tensor: bits / scales hold nworkers addresses per tensor
 * (tensor-major); one thread per warp slot. */
__global__ void hvdc_seg_sign_decode_acc(const unsigned long long *bits, const unsigned long long *scales,
                                         int nworkers, const long long *seg, int nseg, long long nslots, int kind,
                                         float *out)
{
    long long k = hvdc_thread_index();
    if (k >= nslots) return;
    int s = hvdc_seg_of(seg, nseg, HVDC_SEG_SLOT32, k);
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long i = k - t[HVDC_SEG_SLOT32], n = t[HVDC_SEG_N];
    if (i >= n) return;
    hvdc_sign_decode_at(bits + (long long)s * nworkers, scales ? scales + (long long)s * nworkers : scales,
                        nworkers, i, n, kind, out + t[HVDC_SEG_OFFSET]);
}

}  /* extern "C" */
