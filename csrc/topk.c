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

/* ---- a bucket's tensors in two calls (the host path of TopKCodec.encode_many) ----------------
 * Per tensor the same steps and rule as the single-tensor calls above (and as the CUDA path),
 * one tensor per thread: the sample, its t-th largest (quickselect: the value is unique, so any
 * selection algorithm gives the same bits as torch.topk), the levels, the count at thr with the
 * candidate buffer, and only when that count is out of [lo, hi] all sixteen levels and the rule
 * of hvd_compress/codecs/topk.py:_choose.  seg[j] = {offset, n, k, stride, m, t}. */

#define TOPK_SEG 6
#define TOPK_LEVELS 16   /* thr * 1.25^8 .. thr * 1.25, thr, thr * 0.8 .. thr * 0.8^7 */
#define TOPK_THR 8       /* thr's position among them */

/* The k-th largest of a[0 .. m), 1 <= k <= m; reorders a (Hoare partition, middle pivot). */
static float kth_largest(float *a, hvdc_i64 m, hvdc_i64 k)
{
    hvdc_i64 lo = 0, hi = m - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        hvdc_i64 i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) ++i;
            while (a[j] < pivot) --j;
            if (i <= j) {
                float t = a[i]; a[i] = a[j]; a[j] = t;
                ++i; --j;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[lo];
}

/* thr[2 j], thr[2 j + 1]: t_hi, t_lo of tensor j; sel[2 j], sel[2 j + 1]: its count and band
 * budget; level[j]: its thr (the level of its candidate buffer). */
void hvdc_topk_select_many(const float *g, float *r, int has_r, int nseg, const hvdc_i64 *seg,
                           hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *tensor_id,
                           const float *factors, float *samples, const hvdc_i64 *sample_off,
                           hvdc_i32 *buf_idx, float *buf_val, const hvdc_i64 *buf_off,
                           hvdc_i64 *fill, float *level, float *thr, hvdc_i64 *sel, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int j = 0; j < nseg; ++j) {
        const hvdc_i64 *s = seg + TOPK_SEG * j;
        hvdc_i64 off = s[0], n = s[1], k = s[2], lo = (4 * k + 4) / 5, hi = 13 * k / 10;
        float *sample = samples + sample_off[j], levels[TOPK_LEVELS];
        hvdc_i64 cap = buf_off[j + 1] - buf_off[j], count;
        hvdc_topk_sample(g + off, has_r ? r + off : NULL, has_r, sample, s[3], s[4], seed, step,
                         (hvdc_u32)tensor_id[j], 1);
        float t0 = kth_largest(sample, s[4], s[5]);
        for (int l = 0; l < TOPK_LEVELS; ++l) {
            float v = t0 * factors[l];
            levels[l] = v > 0x1p-149f ? v : 0x1p-149f;
        }
        level[j] = levels[TOPK_THR];
        hvdc_topk_count(g + off, has_r ? r + off : NULL, has_r, n, levels + TOPK_THR, 1, &count, 1,
                        buf_idx + buf_off[j], buf_val + buf_off[j], cap, fill + j, 1);
        if (count >= lo && count <= hi) {
            thr[2 * j] = thr[2 * j + 1] = levels[TOPK_THR];
            sel[2 * j] = count;
            sel[2 * j + 1] = 0;
            continue;
        }
        /* every level (ext[0] = +inf counts 0), then the rule of topk.py:_choose */
        hvdc_i64 c[TOPK_LEVELS + 1], unused;
        hvdc_i32 no_idx;
        float ext[TOPK_LEVELS + 1], no_val;
        c[0] = 0;
        ext[0] = hvdc_u2f(0x7f800000u);
        for (int l = 0; l < TOPK_LEVELS; ++l) ext[l + 1] = levels[l];
        hvdc_topk_count(has_r ? r + off : g + off, NULL, 0, n, levels, TOPK_LEVELS, c + 1, 1,
                        &no_idx, &no_val, 0, &unused, 1);        /* no buffer */
        int last = TOPK_LEVELS, jj = last, fit = 0;
        for (int l = TOPK_THR + 1; l <= last; ++l)
            if (c[l] >= lo) { jj = l; break; }
        for (int l = 0; l <= last; ++l) fit += c[l] <= hi;
        int a = c[jj] <= hi ? jj : fit - 1;
        hvdc_i64 sent = c[jj] <= hi ? c[jj] : (c[a] > k ? c[a] : k);
        thr[2 * j] = ext[a];
        thr[2 * j + 1] = ext[a < last ? a + 1 : last];
        sel[2 * j] = sent;
        sel[2 * j + 1] = sent - c[a];
    }
}

/* Compaction and wire values of every tensor: tensor j's entries at out_off[j] of idx, cand
 * (fp32 g') and vals, its residual updated. */
void hvdc_topk_compact_many(const float *src, float *r, int has_r, int nseg, const hvdc_i64 *seg,
                            const float *level, const float *thr, const hvdc_i64 *sel,
                            const hvdc_i32 *buf_idx, const float *buf_val,
                            const hvdc_i64 *buf_off, const hvdc_i64 *fill,
                            const hvdc_i64 *out_off, hvdc_i32 *idx, float *cand, void *vals,
                            int fp16, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int j = 0; j < nseg; ++j) {
        const hvdc_i64 *s = seg + TOPK_SEG * j;
        hvdc_i64 off = s[0], o = out_off[j], zero = 0;
        hvdc_topk_compact(src + off, s[1], thr + 2 * j, thr + 2 * j + 1, sel[2 * j + 1], &zero,
                          NULL, 1, level + j, buf_idx + buf_off[j], buf_val + buf_off[j],
                          buf_off[j + 1] - buf_off[j], fill + j, idx + o, cand + o, 1);
        hvdc_topk_finalize(idx + o, cand + o, sel[2 * j], s[1],
                           fp16 ? (void *)((hvdc_half *)vals + o) : (void *)((float *)vals + o),
                           fp16, has_r ? r + off : NULL, has_r, 1);
    }
}

/* Decoding a bucket's payloads in one call (the host path of TopKCodec.decode_many): payloads
 * seg_first[j] .. seg_first[j + 1] - 1 are tensor j's, in worker order, at the addresses given
 * (fp16[p]: whether payload p's values are fp16).
 * Every payload is checked first (bad = {payload, position} of the first bad index, nothing
 * written); then out[seg_off[j] + i] += D(v) worker by worker, one tensor per thread. */
void hvdc_topk_decode_many(int nseg, const hvdc_i64 *seg_first, const hvdc_i64 *seg_n,
                           const hvdc_i64 *seg_off, const hvdc_i64 *idx_addr,
                           const hvdc_i64 *val_addr, const hvdc_i64 *count, const hvdc_i64 *fp16,
                           float *out, hvdc_i64 *bad, int nthreads)
{
    bad[0] = bad[1] = -1;
    for (int j = 0; j < nseg; ++j) {
        for (hvdc_i64 p = seg_first[j]; p < seg_first[j + 1]; ++p) {
            hvdc_topk_check((const hvdc_i32 *)(intptr_t)idx_addr[p], count[p], seg_n[j], 1, bad + 1);
            if (bad[1] >= 0) {
                bad[0] = p;
                return;
            }
        }
    }
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int j = 0; j < nseg; ++j)
        for (hvdc_i64 p = seg_first[j]; p < seg_first[j + 1]; ++p)
            hvdc_topk_scatter_add((const hvdc_i32 *)(intptr_t)idx_addr[p],
                                  (const void *)(intptr_t)val_addr[p], (int)fp16[p], count[p], seg_n[j],
                                  out + seg_off[j], 1);
}
