/*
 * quantizers.cu: CUDA kernels of TernGrad, QSGD and stochastic fp16 (hvd_compress/codecs/
 * terngrad.py, qsgd.py, fp16.py).  csrc/quant.c is the CPU reference; both evaluate the
 * per-element formulas of quant.h with the same Philox word per element, and every sum in the
 * order of hvdc_warp_sum, so results are bit-identical.
 *
 * Layouts: element-wise kernels use one thread per block of 4 elements (one Philox call, one
 * TernGrad code byte); reductions and QSGD use one warp per segment (a HVDC_SUM_CHUNK chunk or a
 * bucket), lane j taking elements j, j + 32, ... in order, then the butterfly.
 * Optional pointers (residual r, chunk maxima, ...) may be null.
 */
#include "quant.h"
#include "hvdc_warp.cuh"

__device__ __forceinline__ float hvdc_v(const float *g, const float *r, long long i)
{
    return r ? g[i] + r[i] : g[i];
}

/* Lane sums over [lo, lo + len) of v (mode 0), (v - mean)^2 (mode 1) or v^2 (mode 2), with
 * v = g (+ r); also the lane's max |v|.  Same statements as warp_sum in csrc/quant.c. */
__device__ __forceinline__ float hvdc_lane_sum(int mode, const float *g, const float *r, long long lo,
                                               long long len, float mean, int lane, float *absmax)
{
    float acc = 0.0f, mx = 0.0f;
    for (long long i = lane; i < len; i += 32) {
        float v = hvdc_v(g, r, lo + i);
        float d = mode == 1 ? v - mean : v;
        acc += mode == 0 ? v : d * d;
        mx = fmaxf(mx, fabsf(v));
    }
    *absmax = mx;
    return acc;
}

/* One warp's sum (and max, if in_max is given) of in[lo, lo + len): lane j takes elements j,
 * j + 32, ... in order, then the butterfly. */
__device__ __forceinline__ float hvdc_warp_reduce(const float *in, const float *in_max, long long lo,
                                                  long long len, int lane, float *mx)
{
    float acc = 0.0f, m = 0.0f;
    for (long long i = lane; i < len; i += 32) {
        acc += in[lo + i];
        if (in_max) m = fmaxf(m, in_max[lo + i]);
    }
    *mx = hvdc_butterfly_max(m);
    return hvdc_butterfly_sum(acc);
}

extern "C" {

/* One warp per chunk k of HVDC_SUM_CHUNK elements: partial[k] = sum of v, or of (v - mean)^2
 * with mean = total[0] / n when total is given; chunk_max[k] = max |v|. */
__global__ void hvdc_chunk_sums(const float *g, const float *r, long long n, const float *total,
                                float *partial, float *chunk_max)
{
    long long k = hvdc_thread_index() / 32, lo = k * HVDC_SUM_CHUNK;
    int lane = threadIdx.x & 31;
    if (lo >= n) return;                       /* whole warps: k is uniform in a warp */
    long long len = n - lo < HVDC_SUM_CHUNK ? n - lo : HVDC_SUM_CHUNK;
    float mean = total ? total[0] / (float)n : 0.0f, mx;
    float s = hvdc_butterfly_sum(hvdc_lane_sum(total ? 1 : 0, g, r, lo, len, mean, lane, &mx));
    mx = hvdc_butterfly_max(mx);
    if (lane == 0) {
        partial[k] = s;
        if (chunk_max) chunk_max[k] = mx;
    }
}

/* Next level of a long sum: one warp per HVDC_SUM_CHUNK partial sums (and maxima, if given). */
__global__ void hvdc_reduce_chunks(const float *in, long long m, float *out, const float *in_max,
                                   float *out_max)
{
    long long k = hvdc_thread_index() / 32, lo = k * HVDC_SUM_CHUNK;
    int lane = threadIdx.x & 31;
    if (lo >= m) return;
    long long len = m - lo < HVDC_SUM_CHUNK ? m - lo : HVDC_SUM_CHUNK;
    float mx, acc = hvdc_warp_reduce(in, in_max, lo, len, lane, &mx);
    if (lane == 0) {
        out[k] = acc;
        if (out_max) out_max[k] = mx;
    }
}

/* One warp per bucket: maxabs[b] = max |v| over the bucket. */
__global__ void hvdc_bucket_absmax(const float *g, const float *r, long long n, long long bucket,
                                   float *maxabs)
{
    long long b = hvdc_thread_index() / 32, lo = b * bucket;
    int lane = threadIdx.x & 31;
    if (lo >= n) return;
    float mx = 0.0f;
    for (long long i = lo + lane; i < lo + bucket && i < n; i += 32)
        mx = fmaxf(mx, fabsf(hvdc_v(g, r, i)));
    mx = hvdc_butterfly_max(mx);
    if (lane == 0) maxabs[b] = mx;
}

/* TernGrad scales: min(max |v|, clip threshold from the sum of squared deviations, if given). */
__global__ void hvdc_tern_finalize(const float *sq_dev_sum, long long n, float clip, const float *maxabs,
                                   long long nscales, float *scales)
{
    long long b = hvdc_thread_index();
    if (b >= nscales) return;
    float t = sq_dev_sum ? hvdc_tern_clip_threshold(sq_dev_sum[0], n, clip) : hvdc_u2f(0x7F800000u);
    float s = maxabs[b];
    scales[b] = s < t ? s : t;
}

}  /* extern "C" */

/* Elements [lo, lo + cnt) of one Philox block (cnt <= 4) with one scale: codes, error feedback;
 * returns the codes packed as on the wire (element q at bits b * q). */
template <int KIND>
__device__ __forceinline__ unsigned long long hvdc_encode_block(const float *g, float *r, long long lo,
                                                                int cnt, float scale, hvdc_u32x4 u)
{
    unsigned long long packed = 0;
    for (int q = 0; q < 4; ++q) {
        if (q >= cnt) break;
        float v = hvdc_v(g, r, lo + q);
        hvdc_u32 c = hvdc_q_code(KIND, v, scale, u.v[q]);
        if (r) r[lo + q] = v - hvdc_q_value(KIND, c, scale);
        packed |= (unsigned long long)c << (hvdc_q_bits(KIND) * q);
    }
    return packed;
}

/* Write the packed codes of elements [lo, lo + cnt) (lo % 4 == 0) byte by byte: the last
 * block must not write past the end of the payload. */
template <int KIND>
__device__ __forceinline__ void hvdc_store_block(void *out, long long lo, int cnt,
                                                 unsigned long long packed)
{
    int bits = hvdc_q_bits(KIND);
    hvdc_u8 *o = (hvdc_u8 *)out + lo * bits / 8;
    for (int k = 0; k < (cnt * bits + 7) / 8; ++k) o[k] = (hvdc_u8)(packed >> (8 * k));
}

template <int KIND>
__device__ __forceinline__ hvdc_u32 hvdc_load_code(const void *in, long long i)
{
    if (KIND == HVDC_Q_FP16) return ((const unsigned short *)in)[i];
    const int bits = KIND == HVDC_Q_TERN || KIND == HVDC_Q_QSGD2 ? 2 : KIND == HVDC_Q_QSGD4 ? 4 : 8;
    hvdc_u32 byte = ((const hvdc_u8 *)in)[i * bits / 8];
    return (byte >> (bits * (int)(i % (8 / bits)))) & ((1u << bits) - 1u);
}

/* Philox block k (elements 4k ..) of an n-element tensor; scales[i / bucket] (null: fp16, no
 * scale). */
template <int KIND>
__device__ __forceinline__ void hvdc_encode_scaled_block(const float *g, float *r, long long n, long long k,
                                                         long long bucket, const float *scales,
                                                         hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                                                         void *out)
{
    long long lo = 4 * k;
    int cnt = n - lo < 4 ? (int)(n - lo) : 4;
    float s = scales ? scales[lo / bucket] : 0.0f;
    hvdc_u32x4 u = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)k);
    hvdc_store_block<KIND>(out, lo, cnt, hvdc_encode_block<KIND>(g, r, lo, cnt, s, u));
}

/* One thread per 4-element block. */
template <int KIND>
__device__ __forceinline__ void hvdc_encode_scaled(const float *g, float *r, long long n,
                                                   long long bucket, const float *scales, hvdc_u64 seed,
                                                   hvdc_u32 step, hvdc_u32 tensor_id, void *out)
{
    long long k = hvdc_thread_index();
    if (4 * k >= n) return;
    hvdc_encode_scaled_block<KIND>(g, r, n, k, bucket, scales, seed, step, tensor_id, out);
}

/* out_i <- (((out_i + D_0,i) + D_1,i) + ...) for the elements of block k (4k ..) of an n-element
 * tensor, workers in list order.  parts / scales hold the addresses of each worker's buffers
 * (scales null for fp16). */
template <int KIND>
__device__ __forceinline__ void hvdc_decode_block(const unsigned long long *parts,
                                                  const unsigned long long *scales, int nworkers,
                                                  long long n, long long k, long long bucket, float *out)
{
    long long lo = 4 * k;
    int cnt = n - lo < 4 ? (int)(n - lo) : 4;
    float acc[4];
    for (int q = 0; q < cnt; ++q) acc[q] = out[lo + q];
    for (int w = 0; w < nworkers; ++w) {
        const void *p = (const void *)parts[w];
        float s = scales ? ((const float *)scales[w])[lo / bucket] : 0.0f;
        for (int q = 0; q < cnt; ++q) acc[q] += hvdc_q_value(KIND, hvdc_load_code<KIND>(p, lo + q), s);
    }
    for (int q = 0; q < cnt; ++q) out[lo + q] = acc[q];
}

/* One thread per 4 elements. */
template <int KIND>
__device__ __forceinline__ void hvdc_decode_acc(const unsigned long long *parts,
                                                const unsigned long long *scales, int nworkers,
                                                long long n, long long bucket, float *out)
{
    long long k = hvdc_thread_index();
    if (4 * k >= n) return;
    hvdc_decode_block<KIND>(parts, scales, nworkers, n, k, bucket, out);
}

/* QSGD: one warp per bucket; norm = sqrt(warp sum of v^2) (maxnorm: max |v|), then lane j
 * encodes the bucket's Philox blocks j, j + 32, ... (bucket % 4 == 0, so blocks never straddle
 * buckets). */
template <int KIND>
__device__ __forceinline__ void hvdc_qsgd_encode(const float *g, float *r, long long n, long long bucket,
                                                 int maxnorm, hvdc_u64 seed, hvdc_u32 step,
                                                 hvdc_u32 tensor_id, hvdc_u8 *codes, float *norms)
{
    long long b = hvdc_thread_index() / 32, lo = b * bucket;
    int lane = threadIdx.x & 31;
    if (lo >= n) return;
    long long len = n - lo < bucket ? n - lo : bucket;
    float mx;
    float sq = hvdc_butterfly_sum(hvdc_lane_sum(2, g, r, lo, len, 0.0f, lane, &mx));
    mx = hvdc_butterfly_max(mx);
    float norm = maxnorm ? mx : sqrtf(sq);
    if (lane == 0) norms[b] = norm;
    for (long long e = lo + 4 * lane; e < lo + len; e += 4 * 32) {
        int cnt = lo + len - e < 4 ? (int)(lo + len - e) : 4;
        hvdc_u32x4 u = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)(e / 4));
        hvdc_store_block<KIND>(codes, e, cnt, hvdc_encode_block<KIND>(g, r, e, cnt, norm, u));
    }
}

extern "C" {

__global__ void hvdc_tern_encode(const float *g, float *r, long long n, long long bucket,
                                 const float *scales, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                                 hvdc_u8 *codes)
{
    hvdc_encode_scaled<HVDC_Q_TERN>(g, r, n, bucket, scales, seed, step, tensor_id, codes);
}

__global__ void hvdc_tern_decode_acc(const unsigned long long *codes, const unsigned long long *scales,
                                     int nworkers, long long n, long long bucket, float *out)
{
    hvdc_decode_acc<HVDC_Q_TERN>(codes, scales, nworkers, n, bucket, out);
}

__global__ void hvdc_qsgd_encode(const float *g, float *r, long long n, long long bucket, int bits,
                                 int maxnorm, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                                 hvdc_u8 *codes, float *norms)
{
    if (bits == 2)
        hvdc_qsgd_encode<HVDC_Q_QSGD2>(g, r, n, bucket, maxnorm, seed, step, tensor_id, codes, norms);
    else if (bits == 4)
        hvdc_qsgd_encode<HVDC_Q_QSGD4>(g, r, n, bucket, maxnorm, seed, step, tensor_id, codes, norms);
    else hvdc_qsgd_encode<HVDC_Q_QSGD8>(g, r, n, bucket, maxnorm, seed, step, tensor_id, codes, norms);
}

__global__ void hvdc_qsgd_decode_acc(const unsigned long long *codes, const unsigned long long *norms,
                                     int nworkers, long long n, long long bucket, int bits, float *out)
{
    if (bits == 2) hvdc_decode_acc<HVDC_Q_QSGD2>(codes, norms, nworkers, n, bucket, out);
    else if (bits == 4) hvdc_decode_acc<HVDC_Q_QSGD4>(codes, norms, nworkers, n, bucket, out);
    else hvdc_decode_acc<HVDC_Q_QSGD8>(codes, norms, nworkers, n, bucket, out);
}

__global__ void hvdc_fp16sr_encode(const float *g, float *r, long long n, hvdc_u64 seed, hvdc_u32 step,
                                   hvdc_u32 tensor_id, unsigned short *values)
{
    hvdc_encode_scaled<HVDC_Q_FP16>(g, r, n, n, (const float *)0, seed, step, tensor_id, values);
}

__global__ void hvdc_fp16_decode_acc(const unsigned long long *values, int nworkers, long long n,
                                     float *out)
{
    hvdc_decode_acc<HVDC_Q_FP16>(values, (const unsigned long long *)0, nworkers, n, n, out);
}

}  /* extern "C" */

/* ---- TernGrad over a bucket's tensors in one launch per kernel (hvdc_common.h's segment
 * tables): a thread (or warp) finds its tensor and does what the kernels above do for that
 * tensor alone, with the tensor's own key: bit for bit the per-tensor launches' results. ---- */

extern "C" {

/* hvdc_chunk_sums of every tensor: one warp per chunk of the bucket; total (per tensor) as there. */
__global__ void hvdc_seg_chunk_sums(const float *g, const float *r, const long long *seg, int nseg,
                                    long long nchunks, const float *total, float *partial, float *chunk_max)
{
    long long k = hvdc_thread_index() / 32;
    int lane = threadIdx.x & 31;
    if (k >= nchunks) return;                  /* whole warps: k is uniform in a warp */
    int s = hvdc_seg_of(seg, nseg, HVDC_SEG_CHUNK, k);
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long off = t[HVDC_SEG_OFFSET], n = t[HVDC_SEG_N], lo = (k - t[HVDC_SEG_CHUNK]) * HVDC_SUM_CHUNK;
    long long len = n - lo < HVDC_SUM_CHUNK ? n - lo : HVDC_SUM_CHUNK;
    float mean = total ? total[s] / (float)n : 0.0f, mx;
    float sum = hvdc_butterfly_sum(hvdc_lane_sum(total ? 1 : 0, g + off, r ? r + off : r, lo, len, mean,
                                                 lane, &mx));
    mx = hvdc_butterfly_max(mx);
    if (lane == 0) {
        partial[k] = sum;
        if (chunk_max) chunk_max[k] = mx;
    }
}

/* Each tensor's chunk sums (and maxima) to one, one warp per tensor: its only chunk's as it is,
 * else hvdc_reduce_chunks' one level (a tensor has at most HVDC_SUM_CHUNK chunks here). */
__global__ void hvdc_seg_reduce(const float *in, const float *in_max, const long long *seg, int nseg,
                                float *out, float *out_max)
{
    long long s = hvdc_thread_index() / 32;
    int lane = threadIdx.x & 31;
    if (s >= nseg) return;
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long lo = t[HVDC_SEG_CHUNK], len = (t[HVDC_SEG_N] + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    float acc, mx = 0.0f;
    if (len == 1) {
        acc = in[lo];
        if (in_max) mx = in_max[lo];
    } else {
        acc = hvdc_warp_reduce(in, in_max, lo, len, lane, &mx);
    }
    if (lane == 0) {
        out[s] = acc;
        if (out_max) out_max[s] = mx;
    }
}

/* hvdc_tern_finalize of every tensor: one thread per tensor. */
__global__ void hvdc_seg_tern_finalize(const float *sq_dev_sum, const long long *seg, int nseg, float clip,
                                       const float *maxabs, float *scales)
{
    long long s = hvdc_thread_index();
    if (s >= nseg) return;
    float t = sq_dev_sum ? hvdc_tern_clip_threshold(sq_dev_sum[s], seg[HVDC_SEG_COLS * s + HVDC_SEG_N], clip)
                         : hvdc_u2f(0x7F800000u);
    scales[s] = maxabs[s] < t ? maxabs[s] : t;
}

/* hvdc_tern_encode of every tensor (its scale scales[s], its key ids[s]): one thread per block. */
__global__ void hvdc_seg_tern_encode(const float *g, float *r, const long long *seg, int nseg,
                                     long long nblocks, const float *scales, hvdc_u64 seed, hvdc_u32 step,
                                     const long long *ids, hvdc_u8 *codes)
{
    long long k = hvdc_thread_index();
    if (k >= nblocks) return;
    int s = hvdc_seg_of(seg, nseg, HVDC_SEG_BLOCK4, k);
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long off = t[HVDC_SEG_OFFSET], first = t[HVDC_SEG_BLOCK4], n = t[HVDC_SEG_N];
    hvdc_encode_scaled_block<HVDC_Q_TERN>(g + off, r ? r + off : r, n, k - first, n, scales + s, seed, step,
                                          (hvdc_u32)ids[s], codes + first);
}

/* hvdc_tern_decode_acc of every tensor: codes / scales hold nworkers addresses per tensor
 * (tensor-major); one thread per block. */
__global__ void hvdc_seg_tern_decode_acc(const unsigned long long *codes, const unsigned long long *scales,
                                         int nworkers, const long long *seg, int nseg, long long nblocks,
                                         float *out)
{
    long long k = hvdc_thread_index();
    if (k >= nblocks) return;
    int s = hvdc_seg_of(seg, nseg, HVDC_SEG_BLOCK4, k);
    const long long *t = seg + HVDC_SEG_COLS * s;
    long long n = t[HVDC_SEG_N];
    hvdc_decode_block<HVDC_Q_TERN>(codes + (long long)s * nworkers, scales + (long long)s * nworkers, nworkers,
                                   n, k - t[HVDC_SEG_BLOCK4], n, out + t[HVDC_SEG_OFFSET]);
}

}  /* extern "C" */
