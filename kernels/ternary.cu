/*
 * ternary.cu: CUDA kernels of the sparse ternary codecs (hvd_compress/codecs/ternary.py);
 * csrc/ternary.c is the bit-identical CPU reference.  Per-element formulas: kernels/ternary.h.
 *
 *   hvdc_adacomp_select    one thread per bin: H = g + r (written to r), gmax = max |H|, the
 *                          count of sent entries and their scale (mean |H|, summed in index order)
 *   (torch)                exclusive scan of the bin counts
 *   hvdc_adacomp_compact   one thread per bin: (i, H_i) of the sent entries at the bin's offset
 *   hvdc_ternary_finalize  one thread per sign byte: 8 sign bits, and r[i] <- v - (+-s)
 *   hvdc_ternary_scatter_add   decode: out[i] += +-s, one worker per launch (indices distinct)
 *   hvdc_stc_pack          STC's Golomb-Rice stream: one thread per output byte; the code
 *                          lengths' exclusive scan (torch, exact integers) gives each code
 *                          word's first bit, a binary search finds the words in the byte.
 *
 * Grid-stride loops throughout: any launch shape gives the same bits.
 */
#include "ternary.h"
#include "hvdc_warp.cuh"

extern "C" {

__global__ void hvdc_adacomp_select(const float *g, float *r, int has_r, long long n, long long bin,
                                    long long nbins, float *gmax, long long *counts, float *scales)
{
    for (long long b = hvdc_thread_index(); b < nbins; b += (long long)gridDim.x * blockDim.x) {
        long long lo = b * bin, hi = lo + bin < n ? lo + bin : n;
        float m = 0.0f;
        for (long long i = lo; i < hi; ++i) {
            float h = g[i];
            if (has_r) { h = h + r[i]; r[i] = h; }
            m = hvdc_max_nonneg(m, hvdc_abs(h));
        }
        long long c = 0;
        float s = 0.0f;
        for (long long i = lo; i < hi; ++i) {
            float h = has_r ? r[i] : g[i];
            if (hvdc_adacomp_take(h, g[i], m)) { ++c; s = s + hvdc_abs(h); }
        }
        gmax[b] = m;
        counts[b] = c;
        scales[b] = c ? s / (float)c : 0.0f;
    }
}

/* h is r (after hvdc_adacomp_select) or g (no residual). */
__global__ void hvdc_adacomp_compact(const float *g, const float *h, long long n, long long bin,
                                     long long nbins, const float *gmax, const long long *offsets,
                                     int *idx, float *val)
{
    for (long long b = hvdc_thread_index(); b < nbins; b += (long long)gridDim.x * blockDim.x) {
        long long lo = b * bin, hi = lo + bin < n ? lo + bin : n, pos = offsets[b];
        float m = gmax[b];
        for (long long i = lo; i < hi; ++i) {
            float v = h[i];
            if (hvdc_adacomp_take(v, g[i], m)) { idx[pos] = (int)i; val[pos] = v; ++pos; }
        }
    }
}

/* Entries 8 B .. 8 B + 7 of k: their sign bits into signs[B]; with has_r, r[idx[j]] <- val[j]
 * - (+-scales[idx[j] / bin]). */
__global__ void hvdc_ternary_finalize(const int *idx, const float *val, long long k,
                                      const float *scales, long long bin, unsigned char *signs,
                                      float *r, int has_r)
{
    long long nbytes = (k + 7) / 8;
    for (long long B = hvdc_thread_index(); B < nbytes; B += (long long)gridDim.x * blockDim.x) {
        unsigned int byte = 0;
        for (long long j = 8 * B; j < 8 * B + 8 && j < k; ++j) {
            int neg = val[j] < 0.0f;
            byte |= (unsigned int)neg << (j - 8 * B);
            if (has_r) r[idx[j]] = val[j] - hvdc_ternary_value(neg, scales[idx[j] / bin]);
        }
        signs[B] = (unsigned char)byte;
    }
}

__global__ void hvdc_ternary_scatter_add(const int *idx, const unsigned char *signs, long long k,
                                         const float *scales, long long bin, float *out)
{
    for (long long j = hvdc_thread_index(); j < k; j += (long long)gridDim.x * blockDim.x) {
        int i = idx[j];
        int neg = (signs[j >> 3] >> (j & 7)) & 1;
        out[i] = out[i] + hvdc_ternary_value(neg, scales[i / bin]);
    }
}

/* offsets[j] = first bit of code word j (j <= k; offsets[k] = total bits); k >= 1. */
__global__ void hvdc_stc_pack(const int *idx, const float *val, const long long *offsets, long long k,
                              int b, long long nbytes, unsigned char *bits)
{
    long long total = offsets[k];
    for (long long B = hvdc_thread_index(); B < nbytes; B += (long long)gridDim.x * blockDim.x) {
        long long first = 8 * B, lo = 0, hi = k - 1;
        while (lo < hi) {                    /* the last word starting at or before `first` */
            long long mid = (lo + hi + 1) / 2;
            if (offsets[mid] <= first) lo = mid; else hi = mid - 1;
        }
        long long j = lo;
        unsigned int byte = 0;
        for (int t = 0; t < 8 && first + t < total; ++t) {
            long long p = first + t;
            while (offsets[j + 1] <= p) ++j;
            long long d = (long long)idx[j] - (j ? (long long)idx[j - 1] : -1LL) - 1;
            byte |= (unsigned int)hvdc_golomb_bit(d, b, val[j] < 0.0f, p - offsets[j]) << t;
        }
        bits[B] = (unsigned char)byte;
    }
}

}  /* extern "C" */
