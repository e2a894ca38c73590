/* CPU reference of the top-k sparsifier: the same steps as kernels/topk.cu (see there), and the
 * same per-element formulas (kernels/topk.h), so payloads and decoded sums match bit for bit.
 *
 * The tensor is cut into `nchunks` contiguous chunks [n*c/nchunks, n*(c+1)/nchunks); the count
 * pass counts per chunk, the codec scans those counts, and the compact pass lets chunk c write
 * its selected elements in index order from its scans: order-preserving, no shared counters.
 *
 * Unlike the GPU, the count pass also keeps each chunk's candidates at its last (lowest) level:
 * (index, g') with |g'| >= levels[nlevels-1], ascending, up to `cap` per chunk.  The compact pass
 * then filters those few instead of reading the tensor again (one pass over the data in the
 * common case); a chunk whose buffer overflowed (fill = -1), or a threshold below the buffer's,
 * is rescanned.  Either way the output is the same. */
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "hvdc_common.h"
#include "topk.h"
#include "hvdc_cpu.h"

/* Loops over fewer items (small tensors, small payloads) run on one thread: forking costs more
 * than it saves there, and far more when other processes hold the cores (every barrier then
 * waits for a time slice). */
#define TOPK_CPU_PARALLEL_MIN (1 << 16)

/* Elements per inner tile of the count pass (a multiple of 32): |g'| of a tile stays in L1 and
 * is compared with each level in a separate, vectorised loop. */
#define TOPK_CPU_TILE 1024

static hvdc_i64 chunk_lo(hvdc_i64 n, int c, int nchunks)
{
    return n * c / nchunks;   /* n < 2^31 (int32 indices), so no overflow */
}

void hvdc_topk_sample(const float *g, const float *r, int has_r, float *out, hvdc_i64 stride,
                      hvdc_i64 m, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, int nthreads)
{
    hvdc_i64 start = hvdc_topk_sample_start(seed, step, tensor_id, stride);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(m >= TOPK_CPU_PARALLEL_MIN)
    for (hvdc_i64 j = 0; j < m; ++j) {
        hvdc_i64 i = start + j * stride;
        out[j] = fabsf(has_r ? g[i] + r[i] : g[i]);
    }
}

/* Bit j of the result: a[j] >= t, for j < 32. */
static inline hvdc_u32 ge_mask32(const float *a, float t)
{
    hvdc_u32 m = 0;
#if defined(__SSE2__)
    __m128 tv = _mm_set1_ps(t);
    for (int q = 0; q < 8; ++q)
        m |= (hvdc_u32)_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(a + 4 * q), tv)) << (4 * q);
#else
    for (int j = 0; j < 32; ++j) m |= (hvdc_u32)(a[j] >= t) << j;
#endif
    return m;
}

void hvdc_topk_count(const float *g, float *r, int has_r, hvdc_i64 n, const float *levels,
                     int nlevels, hvdc_i64 *counts, int nchunks, hvdc_i32 *buf_idx,
                     float *buf_val, hvdc_i64 cap, hvdc_i64 *fill, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(n >= TOPK_CPU_PARALLEL_MIN)
    for (int c = 0; c < nchunks; ++c) {
        hvdc_i64 hi = chunk_lo(n, c + 1, nchunks), f = 0;
        hvdc_i64 total[HVDC_TOPK_MAX_LEVELS] = {0};
        hvdc_i32 *bi = buf_idx + c * cap;
        float *bv = buf_val + c * cap;
        float last = levels[nlevels - 1];
        float a[TOPK_CPU_TILE];
        hvdc_u32 mask[TOPK_CPU_TILE / 32];
        for (hvdc_i64 i0 = chunk_lo(n, c, nchunks); i0 < hi; i0 += TOPK_CPU_TILE) {
            int len = hi - i0 < TOPK_CPU_TILE ? (int)(hi - i0) : TOPK_CPU_TILE;
            const float *v = (has_r ? r : g) + i0;
            if (has_r) {
                for (int j = 0; j < len; ++j) {
                    float s = g[i0 + j] + r[i0 + j];
                    r[i0 + j] = s;
                    a[j] = fabsf(s);
                }
            } else {
                for (int j = 0; j < len; ++j) a[j] = fabsf(v[j]);
            }
            for (int j = len; j < TOPK_CPU_TILE; ++j) a[j] = -1.0f;   /* below every level */
            for (int l = 0; l < nlevels - 1; ++l) {
                float t = levels[l];
                int s = 0;
                for (int j = 0; j < TOPK_CPU_TILE; ++j) s += a[j] >= t;
                total[l] += s;
            }
            /* the last level: bit masks, counted, then walked to append the candidates */
            int s = 0;
            for (int q = 0; q < TOPK_CPU_TILE / 32; ++q) {
                mask[q] = ge_mask32(a + 32 * q, last);
                s += __builtin_popcount(mask[q]);
            }
            total[nlevels - 1] += s;
            if (f >= 0 && f + s > cap) f = -1;     /* overflow: the compact pass rescans */
            for (int q = 0; f >= 0 && s > 0 && q < TOPK_CPU_TILE / 32; ++q) {
                for (hvdc_u32 m = mask[q]; m; m &= m - 1) {
                    int j = 32 * q + __builtin_ctz(m);
                    bi[f] = (hvdc_i32)(i0 + j);
                    bv[f] = v[j];
                    ++f;
                }
            }
        }
        fill[c] = f;
        for (int l = 0; l < nlevels; ++l) counts[(hvdc_i64)l * nchunks + c] = total[l];
    }
}

/* The selection of kernels/topk.cu's compact: every |v| >= t_hi, and the first `budget` entries of
 * the band t_lo <= |v| < t_hi in index order; chunk c starts from its scans off_hi[c], off_band[c]. */
static inline void take(hvdc_i32 i, float v, float t_hi, float t_lo, hvdc_i64 budget,
                        hvdc_i64 *above, hvdc_i64 *band, hvdc_i32 *idx, float *val)
{
    float a = fabsf(v);
    if (a >= t_hi) {
        hvdc_i64 p = *above + (*band < budget ? *band : budget);
        idx[p] = i;
        val[p] = v;
        ++*above;
    } else if (a >= t_lo) {
        if (*band < budget) {
            idx[*above + *band] = i;
            val[*above + *band] = v;
        }
        ++*band;
    }
}

void hvdc_topk_compact(const float *src, hvdc_i64 n, const float *t_hi_p, const float *t_lo_p,
                       hvdc_i64 budget, const hvdc_i64 *off_hi, const hvdc_i64 *off_band,
                       int nchunks, const float *buf_thr, const hvdc_i32 *buf_idx,
                       const float *buf_val, hvdc_i64 cap, const hvdc_i64 *fill, hvdc_i32 *idx,
                       float *val, int nthreads)
{
    float t_hi = *t_hi_p, t_lo = *t_lo_p;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(n >= TOPK_CPU_PARALLEL_MIN)
    for (int c = 0; c < nchunks; ++c) {
        hvdc_i64 above = off_hi[c], band = off_band ? off_band[c] : 0;   /* NULL: no band */
        if (fill[c] >= 0 && t_lo >= *buf_thr) {          /* the buffer holds a superset */
            const hvdc_i32 *bi = buf_idx + c * cap;
            const float *bv = buf_val + c * cap;
            for (hvdc_i64 j = 0; j < fill[c]; ++j)
                take(bi[j], bv[j], t_hi, t_lo, budget, &above, &band, idx, val);
        } else {
            hvdc_i64 hi = chunk_lo(n, c + 1, nchunks);
            for (hvdc_i64 i = chunk_lo(n, c, nchunks); i < hi; ++i)
                take((hvdc_i32)i, src[i], t_hi, t_lo, budget, &above, &band, idx, val);
        }
    }
}

/* As kernels/topk.cu: index n is padding (value 0, no residual update). */
void hvdc_topk_finalize(const hvdc_i32 *idx, const float *cand, hvdc_i64 c, hvdc_i64 n, void *vals,
                        int fp16, float *r, int has_r, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(c >= TOPK_CPU_PARALLEL_MIN)
    for (hvdc_i64 j = 0; j < c; ++j) {
        hvdc_i32 i = idx[j];
        float v = i < n ? cand[j] : 0.0f;
        hvdc_half h = 0;
        float rest = hvdc_topk_encode_value(v, fp16, &h);
        if (fp16) ((hvdc_half *)vals)[j] = h;
        else ((float *)vals)[j] = v;
        if (has_r && i < n) r[i] = rest;
    }
}

/* *bad <- the first position j that breaks 0 <= idx[0] < idx[1] < ... < n (followed, when
 * `padded`, by entries equal to n only), or -1. */
void hvdc_topk_check(const hvdc_i32 *idx, hvdc_i64 c, hvdc_i64 n, int padded, hvdc_i64 *bad)
{
    *bad = -1;
    for (hvdc_i64 j = 0; j < c; ++j) {
        int ok = (idx[j] >= 0 && idx[j] < n && (j == 0 || idx[j - 1] < idx[j]))
                 || (padded && idx[j] == n);
        if (!ok) {
            *bad = j;
            return;
        }
    }
}

void hvdc_topk_scatter_add(const hvdc_i32 *idx, const void *vals, int fp16, hvdc_i64 c, hvdc_i64 n,
                           float *out, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(c >= TOPK_CPU_PARALLEL_MIN)
    for (hvdc_i64 j = 0; j < c; ++j)
        if (idx[j] < n)
            out[idx[j]] = out[idx[j]] + hvdc_topk_decode_value(vals, fp16, j);
}

/* Gradient Dropping's layer normalization (hvd_compress/codecs/topk.py, GradDropCodec):
 * out[i] = src[i] / d with d = *divisor (the tensor's max |g'|), or 0 when d is 0. */
void hvdc_topk_normalize(const float *src, hvdc_i64 n, const float *divisor, float *out, int nthreads)
{
    float d = *divisor;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(n >= TOPK_CPU_PARALLEL_MIN)
    for (hvdc_i64 i = 0; i < n; ++i)
        out[i] = d > 0.0f ? src[i] / d : 0.0f;
}
