/*
 * signs.h: per-element formulas of the sign codecs (hvd_compress/codecs/sign.py), compiled
 * verbatim by NVRTC (kernels/signs.cu) and by gcc (csrc/signs.c):
 *
 *   1-bit SGD   (Seide et al., Interspeech 2014)  D(bit) = bit ? mean_neg : mean_pos
 *   EF-signSGD  (Karimireddy et al., ICML 2019)   D(bit) = bit ? -s : s,  s = ||v||_1 / d
 *   signSGD     (Bernstein et al., ICML 2018)     D(bit) = bit ? -1 : +1
 *
 * Wire bits: element i at bit i % 8 of byte i / 8 (LSB first), 1 = negative (v < 0; +0.0 and
 * -0.0 are non-negative), so the 32 elements of a warp that starts at a multiple of 32 form the
 * little-endian 32-bit word __ballot_sync(v < 0) returns.
 *
 * Per-bucket statistics are sums in the contract's order (hvdc_common.h): the bucket is cut into
 * chunks of HVDC_SUM_CHUNK elements from its start, each chunk is one hvdc_warp_sum, and the
 * chunks' partial sums are summed the same way until one is left.  Element counts are integers
 * (exact in any order).  NaN/Inf never reach here (the Python layer rejects them).
 */
#ifndef HVDC_SIGNS_H
#define HVDC_SIGNS_H
#include "hvdc_common.h"

#if !defined(__CUDACC__)
#include <math.h>
#endif

enum { HVDC_SIGN_ONEBIT, HVDC_SIGN_SCALED, HVDC_SIGN_PLAIN };

/* fp32 values per bucket on the wire: 1-bit SGD (mean_pos, mean_neg), scaled sign s, signSGD none. */
HVDC_FN int hvdc_sign_nscales(int kind)
{
    return kind == HVDC_SIGN_ONEBIT ? 2 : kind == HVDC_SIGN_SCALED ? 1 : 0;
}

HVDC_FN hvdc_u32 hvdc_sign_bit(float v) { return v < 0.0f; }

/* What the two summed channels add per element: 1-bit SGD (v if v >= 0 else 0, v if v < 0 else
 * 0) (and the count of v >= 0); the scaled sign (|v|, unused). */
HVDC_FN float hvdc_sign_stat0(int kind, float v)
{
    return kind == HVDC_SIGN_ONEBIT ? (v < 0.0f ? 0.0f : v) : fabsf(v);
}

HVDC_FN float hvdc_sign_stat1(int kind, float v)
{
    return kind == HVDC_SIGN_ONEBIT && v < 0.0f ? v : 0.0f;
}

/* A mean of `count` values summing to `sum`; 0 for no values. */
HVDC_FN float hvdc_sign_mean(float sum, hvdc_i64 count)
{
    return count > 0 ? sum / (float)count : 0.0f;
}

/* Wire scales of a bucket of d elements from its sums (s0, s1) and its count of v >= 0. */
HVDC_FN void hvdc_sign_scales(int kind, float s0, float s1, hvdc_i64 npos, hvdc_i64 d, float *out)
{
    if (kind == HVDC_SIGN_ONEBIT) {
        out[0] = hvdc_sign_mean(s0, npos);
        out[1] = hvdc_sign_mean(s1, d - npos);
    } else if (kind == HVDC_SIGN_SCALED) {
        out[0] = hvdc_sign_mean(s0, d);
    }
}

/* D(bit) with the bucket's wire scales (s0, s1): 1-bit SGD (mean_pos, mean_neg), the scaled
 * sign (s, unused), signSGD (unused). */
HVDC_FN float hvdc_sign_value(int kind, hvdc_u32 bit, float s0, float s1)
{
    if (kind == HVDC_SIGN_ONEBIT) return bit ? s1 : s0;
    if (kind == HVDC_SIGN_SCALED) return bit ? -s0 : s0;
    return bit ? -1.0f : 1.0f;
}

/* The scales of bucket b from a worker's wire scales (null for signSGD). */
HVDC_FN float hvdc_sign_scale(int kind, const float *scales, hvdc_i64 b, int which)
{
    return which < hvdc_sign_nscales(kind) ? scales[hvdc_sign_nscales(kind) * b + which] : 0.0f;
}

/* Bit i of a packed sign payload. */
HVDC_FN hvdc_u32 hvdc_sign_load(const hvdc_u8 *bits, hvdc_i64 i)
{
    return ((hvdc_u32)bits[i >> 3] >> (hvdc_u32)(i & 7)) & 1u;
}

#endif /* HVDC_SIGNS_H */
