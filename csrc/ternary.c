/* CPU reference of the sparse ternary codecs (kernels/ternary.cu): the same loops per bin and per
 * entry with the formulas of kernels/ternary.h, so payloads, residuals and decoded sums match bit
 * for bit.  STC's Golomb-Rice stream is written and read sequentially here (the GPU writes it
 * one byte per thread from a scan of the code lengths; the bits are a pure function of the
 * positions and signs either way); decoding it is host-only (see hvd_compress/codecs/ternary.py). */
#include <string.h>
#include "ternary.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

typedef struct {
    const float *g;
    float *r;
    const float *h;
    int has_r;
    hvdc_i64 n, bin;
    float *gmax;                /* select: written */
    const float *bin_max;       /* compact: read */
    hvdc_i64 *counts;
    float *scales;
    const hvdc_i64 *offsets;
    hvdc_i32 *idx;
    float *val;
} ajob;

HVDC_CLONES static void w_select(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    const ajob *a = (const ajob *)job;
    for (hvdc_i64 b = b0; b < b1; ++b) {
        hvdc_i64 lo = b * a->bin, hi = lo + a->bin < a->n ? lo + a->bin : a->n;
        float m = 0.0f;
        for (hvdc_i64 i = lo; i < hi; ++i) {
            float h = a->g[i];
            if (a->has_r) { h = h + a->r[i]; a->r[i] = h; }
            m = hvdc_max_nonneg(m, hvdc_abs(h));
        }
        hvdc_i64 c = 0;
        float s = 0.0f;
        for (hvdc_i64 i = lo; i < hi; ++i) {
            float h = a->has_r ? a->r[i] : a->g[i];
            if (hvdc_adacomp_take(h, a->g[i], m)) { ++c; s = s + hvdc_abs(h); }
        }
        a->gmax[b] = m;
        a->counts[b] = c;
        a->scales[b] = c ? s / (float)c : 0.0f;
    }
}

HVDC_CLONES static void w_compact(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    const ajob *a = (const ajob *)job;
    for (hvdc_i64 b = b0; b < b1; ++b) {
        hvdc_i64 lo = b * a->bin, hi = lo + a->bin < a->n ? lo + a->bin : a->n, pos = a->offsets[b];
        float m = a->bin_max[b];
        for (hvdc_i64 i = lo; i < hi; ++i) {
            float v = a->h[i];
            if (hvdc_adacomp_take(v, a->g[i], m)) { a->idx[pos] = (hvdc_i32)i; a->val[pos] = v; ++pos; }
        }
    }
}

void hvdc_adacomp_select(const float *g, float *r, int has_r, hvdc_i64 n, hvdc_i64 bin, hvdc_i64 nbins,
                         float *gmax, hvdc_i64 *counts, float *scales, int nthreads)
{
    ajob a = {.g = g, .r = r, .has_r = has_r, .n = n, .bin = bin, .gmax = gmax, .counts = counts,
              .scales = scales};
    hvdc_parallel(w_select, &a, nbins, n, nthreads);
}

void hvdc_adacomp_compact(const float *g, const float *h, hvdc_i64 n, hvdc_i64 bin, hvdc_i64 nbins,
                          const float *gmax, const hvdc_i64 *offsets, hvdc_i32 *idx, float *val,
                          int nthreads)
{
    ajob a = {.g = g, .h = h, .n = n, .bin = bin, .bin_max = gmax, .offsets = offsets, .idx = idx,
              .val = val};
    hvdc_parallel(w_compact, &a, nbins, n, nthreads);
}

void hvdc_ternary_finalize(const hvdc_i32 *idx, const float *val, hvdc_i64 k, const float *scales,
                           hvdc_i64 bin, hvdc_u8 *signs, float *r, int has_r)
{
    memset(signs, 0, (size_t)((k + 7) / 8));
    for (hvdc_i64 j = 0; j < k; ++j) {
        int neg = val[j] < 0.0f;
        signs[j >> 3] |= (hvdc_u8)(neg << (j & 7));
        if (has_r) r[idx[j]] = val[j] - hvdc_ternary_value(neg, scales[idx[j] / bin]);
    }
}

void hvdc_ternary_scatter_add(const hvdc_i32 *idx, const hvdc_u8 *signs, hvdc_i64 k,
                              const float *scales, hvdc_i64 bin, float *out)
{
    for (hvdc_i64 j = 0; j < k; ++j) {
        hvdc_i32 i = idx[j];
        int neg = (signs[j >> 3] >> (j & 7)) & 1;
        out[i] = out[i] + hvdc_ternary_value(neg, scales[i / bin]);
    }
}

/* The stream of k code words into bits (nbytes, zeroed here); returns the bits written. */
hvdc_i64 hvdc_stc_encode(const hvdc_i32 *idx, const float *val, hvdc_i64 k, int b, hvdc_u8 *bits,
                         hvdc_i64 nbytes)
{
    memset(bits, 0, (size_t)nbytes);
    hvdc_i64 t = 0, prev = -1;
    for (hvdc_i64 j = 0; j < k; ++j) {
        hvdc_i64 d = (hvdc_i64)idx[j] - prev - 1, len = hvdc_golomb_len(d, b);
        int neg = val[j] < 0.0f;
        for (hvdc_i64 p = 0; p < len; ++p, ++t)
            if (t < 8 * nbytes && hvdc_golomb_bit(d, b, neg, p))
                bits[t >> 3] |= (hvdc_u8)(1u << (t & 7));
        prev = idx[j];
    }
    return t;
}

/* Read k code words: idx (ascending, < n) and the sign bits (packed, LSB first).  Returns 0, or
 * 1 + j when word j runs past the stream or its index is not below n. */
hvdc_i64 hvdc_stc_decode(const hvdc_u8 *bits, hvdc_i64 nbytes, hvdc_i64 k, int b, hvdc_i64 n,
                         hvdc_i32 *idx, hvdc_u8 *signs)
{
    hvdc_i64 t = 0, end = 8 * nbytes, prev = -1;
    memset(signs, 0, (size_t)((k + 7) / 8));
#define STC_BIT(pos) ((bits[(pos) >> 3] >> ((pos) & 7)) & 1)
    for (hvdc_i64 j = 0; j < k; ++j) {
        hvdc_i64 q = 0;
        while (t < end && STC_BIT(t)) { ++q; ++t; }
        if (t + b + 2 > end) return 1 + j;
        ++t;                                          /* the zero that ends the unary part */
        hvdc_i64 d = q;
        for (int p = 0; p < b; ++p, ++t) d = (d << 1) | STC_BIT(t);
        int neg = STC_BIT(t);
        ++t;
        hvdc_i64 i = prev + 1 + d;
        if (i >= n) return 1 + j;
        idx[j] = (hvdc_i32)i;
        signs[j >> 3] |= (hvdc_u8)(neg << (j & 7));
        prev = i;
    }
#undef STC_BIT
    return 0;
}
