/*
 * ternary.h: per-element formulas of the sparse ternary codecs (hvd_compress/codecs/ternary.py):
 * AdaComp (Chen et al., AAAI 2018) and Sparse Ternary Compression (Sattler et al., TNNLS 2019).
 * Shared by kernels/ternary.cu (NVRTC) and csrc/ternary.c (gcc), so both round identically.
 *
 *   - AdaComp's selection: with H = r + g (residual plus gradient) and gmax = max |H| over the
 *     bin, element i is sent iff H_i != 0 and |H_i + g_i| >= gmax;
 *   - a ternary entry decodes to +s or -s (s the scale of its bin: AdaComp's per-bin scale,
 *     STC's mu); the residual keeps v - (+-s);
 *   - STC's position code: the gap d = i_j - i_{j-1} - 1 (i_{-1} = -1) as a Golomb-Rice code
 *     word with parameter b: q = d >> b ones, a zero, the b low bits of d (most significant
 *     first), then the sign bit (1 = negative): q + b + 2 bits.  Code words are laid end to
 *     end, bit t of the stream at bit t % 8 (LSB first) of byte t / 8.
 */
#ifndef HVDC_TERNARY_H
#define HVDC_TERNARY_H
#include "hvdc_common.h"

HVDC_FN float hvdc_abs(float x) { return hvdc_u2f(hvdc_f2u(x) & 0x7fffffffu); }

/* max of two non-negative floats, compared as bit patterns (exact, order-free) */
HVDC_FN float hvdc_max_nonneg(float a, float b)
{
    hvdc_u32 x = hvdc_f2u(a), y = hvdc_f2u(b);
    return hvdc_u2f(x > y ? x : y);
}

/* AdaComp: is element (h = H_i, g = g_i) of a bin with max |H| = gmax sent? */
HVDC_FN int hvdc_adacomp_take(float h, float g, float gmax)
{
    return h != 0.0f && hvdc_abs(h + g) >= gmax;
}

/* The decoded value of a ternary entry: -s if negative, else +s. */
HVDC_FN float hvdc_ternary_value(int negative, float s)
{
    return negative ? -s : s;
}

/* Length in bits of the STC code word of gap d with Rice parameter b. */
HVDC_FN hvdc_i64 hvdc_golomb_len(hvdc_i64 d, int b)
{
    return (d >> b) + b + 2;
}

/* Bit p (0 <= p < hvdc_golomb_len(d, b)) of that code word; negative is the sign bit. */
HVDC_FN int hvdc_golomb_bit(hvdc_i64 d, int b, int negative, hvdc_i64 p)
{
    hvdc_i64 q = d >> b;
    if (p < q) return 1;
    if (p == q) return 0;
    if (p <= q + b) return (int)((d >> (b - (p - q))) & 1);
    return negative;
}

#endif /* HVDC_TERNARY_H */
