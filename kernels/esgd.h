/*
 * esgd.h: per-element formulas of eSGD's selection and momentum residual (hvd_compress/codecs/
 * esgd.py; Tao & Li, HotEdge 2018), compiled verbatim by NVRTC (kernels/esgd.cu) and by gcc
 * (csrc/esgd.c), so keys, residuals and candidate flags are the same bits on CPU and GPU.
 *
 * Residual:   a_i = r_i * beta + g_i (two fp32 roundings), over_i = |a_i| > threshold.
 *
 * Selection keys (weighted sampling without replacement, Efraimidis & Spirakis 2006, as an
 * exponential race): from the Philox word w_i of element i (hvdc_common.h's stream),
 *     u_i = (2 (w_i >> 9) + 1) 2^-24 in (0, 1),   key_i = log2~(u_i) / (1 + H_i),
 * and the k largest keys are selected.  log2~ is hvdc_esgd_log2 below: only +, -, *, / and
 * integer bit operations, each an IEEE fp32 operation in a fixed order, so no libm (whose log may
 * differ in the last bit between the host and the device) is involved.  Since
 * -ln(u_i) ~ Exp(1), -ln(u_i) / w_i ~ Exp(w_i): the smallest of them is i with probability
 * w_i / sum_j w_j, and the k largest keys are successive draws without replacement with
 * probabilities proportional to w among the rest (log2 = ln / ln 2 is a common positive factor:
 * the same order).  What departs from that law: u has 2^23 levels, and log2~ has a relative
 * error below 2^-21 (tests/codecs/test_esgd.py measures it), far below the sampling noise of any test.
 */
#ifndef HVDC_ESGD_H
#define HVDC_ESGD_H
#include "hvdc_common.h"

#if !defined(__CUDACC__)
#include <math.h>
#endif

/* log2 of x = (2j + 1) 2^-24, j = w >> 9 (an odd integer times a power of two, exact in fp32):
 * x = 2^e m with m in [sqrt(1/2), sqrt(2)) from the bit pattern (exact), then
 * ln m = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9),  s = (m - 1) / (m + 1),
 * |s| <= 0.1716 (the next term, s^10/11, is below 2^-29 of the sum), and
 * log2 x = e + ln(m) log2(e).  Every step is one fp32 operation in this order (no contraction). */
HVDC_FN float hvdc_esgd_log2(hvdc_u32 w)
{
    float x = (float)((w >> 9) * 2u + 1u);                /* < 2^24: exact */
    hvdc_u32 bits = hvdc_f2u(x);
    hvdc_i32 e = (hvdc_i32)(bits >> 23) - 127;
    float m = hvdc_u2f((bits & 0x007FFFFFu) | 0x3F800000u); /* [1, 2) */
    hvdc_i32 big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e += big - 24;
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float p = s2 * 0.111111111f + 0.142857143f;
    p = p * s2 + 0.2f;
    p = p * s2 + 0.333333333f;
    p = p * s2 + 1.0f;
    float ln = (s + s) * p;
    return (float)e + ln * 1.44269504f;
}

/* The selection key of a word w and an importance h: log2~(u) / (1 + h) (negative). */
HVDC_FN float hvdc_esgd_key(hvdc_u32 w, float h)
{
    return hvdc_esgd_log2(w) / (1.0f + h);
}

/* a = r * beta + g. */
HVDC_FN float hvdc_esgd_residual(float g, float r, float beta)
{
    return r * beta + g;
}

HVDC_FN hvdc_u8 hvdc_esgd_over(float a, float threshold)
{
    return fabsf(a) > threshold;
}

#endif /* HVDC_ESGD_H */
