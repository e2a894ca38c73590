/*
 * quant.h: per-element formulas of the quantizing codecs (TernGrad, QSGD, stochastic fp16),
 * compiled verbatim by NVRTC (kernels/terngrad.cu, qsgd.cu, fp16sr.cu) and by gcc
 * (csrc/quant.c).  CPU and GPU call these same functions with the same Philox word for the same
 * element, so payloads and decoded values are bit-identical (see hvdc_common.h for the rules).
 *
 * Everything is branch-free selects on plain integers and floats so that gcc can vectorize the
 * CPU loops; NaN/Inf never reach here (the Python layer rejects non-finite gradients).
 */
#ifndef HVDC_QUANT_H
#define HVDC_QUANT_H
#include "hvdc_common.h"

#if !defined(__CUDACC__)
#include <math.h>
#endif

/* ---- TernGrad (Wen et al., NeurIPS 2017) ----
 * ternarize(g)_i = s * sign(g_i) * b_i,  b_i ~ Bernoulli(|g_i| / s).
 * Code 0 = 0, 1 = +s, 2 = -s.  |g_i| >= s saturates at p = 1 (that is clipping at s: used when the
 * scale is shared between workers or comes from the clip threshold).  s == 0 gives code 0.      */
HVDC_FN hvdc_u32 hvdc_tern_code(float g, float s, hvdc_u32 u)
{
    float p = fabsf(g) / (s > 0.0f ? s : 1.0f);    /* divide unconditionally: vectorizable */
    p = s > 0.0f ? hvdc_min_nonneg(p, 1.0f) : 0.0f;
    return hvdc_bernoulli(u, p) ? (g < 0.0f ? 2u : 1u) : 0u;
}

HVDC_FN float hvdc_tern_value(hvdc_u32 code, float s)
{
    return code == 1u ? s : (code == 2u ? -s : 0.0f);
}

/* Clip threshold c * sigma of TernGrad's gradient clipping, sigma the population standard
 * deviation: sigma^2 = sum_i (g_i - mean)^2 / n with the sum in the contract's order.  A tensor
 * with sigma == 0 (constant, or one element) is not clipped: clipping it at 0 would erase it.   */
HVDC_FN float hvdc_tern_clip_threshold(float sq_dev_sum, hvdc_i64 n, float c)
{
    float t = c * sqrtf(sq_dev_sum / (float)n);
    return t > 0.0f ? t : hvdc_u2f(0x7F800000u);
}

/* ---- QSGD (Alistarh et al., NeurIPS 2017) ----
 * With s = 2^(b-1) - 1 levels and the bucket norm ||v||_2: r = |v_i| / norm * s, l = floor(r),
 * l + 1 with probability r - l.  Code = sign bit (2^(b-1) = s + 1) | l, sign only when l > 0 so
 * that a zero always encodes as 0.  r is capped at s: |v_i| may exceed the fp32-rounded norm by
 * an ulp.  norm == 0 encodes every element as 0.                                                 */
HVDC_FN hvdc_u32 hvdc_qsgd_code(float v, float norm, hvdc_u32 s, hvdc_u32 u)
{
    float sf = (float)s;
    float r = fabsf(v) / (norm > 0.0f ? norm : 1.0f) * sf;
    r = norm > 0.0f ? hvdc_min_nonneg(r, sf) : 0.0f;
    hvdc_i32 l = (hvdc_i32)r;               /* 0 <= r <= 127: truncation is floor */
    l += hvdc_bernoulli(u, r - (float)l);
    return (hvdc_u32)l | ((v < 0.0f) & (l != 0) ? s + 1u : 0u);
}

/* D(code) = sign * l * (norm / s), evaluated exactly in this order. */
HVDC_FN float hvdc_qsgd_value(hvdc_u32 code, float norm, hvdc_u32 s)
{
    float m = (float)(hvdc_i32)(code & s) * (norm / (float)s);
    return (code & (s + 1u)) ? -m : m;
}

/* ---- Unbiased stochastic rounding fp32 -> fp16 ----
 * x lies between lo = x rounded toward zero to fp16 and hi = lo + 1 fp16 ulp; the result is hi
 * with probability (|x| - |lo|) / ulp.  In fp16's normal range that fraction is the 13 mantissa
 * bits fp16 drops, R / 2^13; below 2^-14 the ulp is 2^-24 and d = 126 - exponent bits are dropped.
 * The draw u rounds up iff u < t = floor(R * 2^(32 - d)): exactly P = R / 2^d for d <= 32, i.e.
 * |x| >= 2^-33 (smaller values round up with probability truncated to a multiple of 2^-32).
 * Exact fp16 values (R = 0) are unchanged.  Overflow gives inf, as Horovod's fp16 does (a loss
 * scaler then backs off): above 65504 the next value up is inf, so 65504 < |x| < 65536 rounds to
 * inf with probability (|x| - 65504) / 32 and |x| >= 65536 (inf included) is inf; NaN stays NaN.
 * Returns the fp16 bit pattern.                                                                  */
#define HVDC_FP16_INF_BITS 0x7C00u
#define HVDC_FP16_NAN_BITS 0x7E00u

HVDC_FN hvdc_u32 hvdc_fp16_sr(float x, hvdc_u32 u)
{
    hvdc_u32 bits = hvdc_f2u(x);
    hvdc_u32 sign = (bits >> 16) & 0x8000u;
    hvdc_u32 a = bits & 0x7FFFFFFFu;
    /* fp16 normal (|x| >= 2^-14): rebias the exponent (127 -> 15), drop 13 bits */
    hvdc_u32 h_nrm = (a >> 13) - 0x1C000u;
    hvdc_u32 t_nrm = (a & 0x1FFFu) << 19;
    /* fp16 subnormal: |x| = m * 2^(e - 150) = (m >> d) * 2^-24 + rest, d = 126 - max(e, 1) >= 14 */
    hvdc_u32 e = a >> 23;
    hvdc_u32 m = (a & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    hvdc_u32 d = 126u - (e ? e : 1u);
    hvdc_u32 dc = d < 31u ? d : 31u;             /* m < 2^24: m >> 31 == 0 and the mask keeps m */
    hvdc_u32 rest = m & ((1u << dc) - 1u);
    hvdc_u32 dr = d - 32u < 31u ? d - 32u : 31u; /* d > 32 */
    hvdc_u32 t_sub = d <= 32u ? rest << (32u - d) : rest >> dr;
    hvdc_u32 h_sub = m >> dc;
    int normal = a >= 0x38800000u;
    hvdc_u32 h = (normal ? h_nrm : h_sub) + (u < (normal ? t_nrm : t_sub) ? 1u : 0u);
    if (a > 0x7F800000u)
        return sign | HVDC_FP16_NAN_BITS;
    return sign | (h < HVDC_FP16_INF_BITS ? h : HVDC_FP16_INF_BITS);
}

/* Exact fp16 -> fp32 (subnormals, Inf and NaN included: payloads may come from elsewhere). */
HVDC_FN float hvdc_fp16_value(hvdc_u32 h)
{
    hvdc_u32 e = (h >> 10) & 0x1Fu;
    hvdc_u32 m = h & 0x3FFu;
    hvdc_u32 nrm = ((h & 0x7FFFu) << 13) + 0x38000000u;
    hvdc_u32 special = 0x7F800000u | (m << 13);
    hvdc_u32 sub = hvdc_f2u((float)(hvdc_i32)m * 5.9604644775390625e-8f);   /* m * 2^-24: exact */
    hvdc_u32 mag = e == 0u ? sub : (e == 31u ? special : nrm);
    return hvdc_u2f(mag | ((h & 0x8000u) << 16));
}

/* ---- codec kinds: one switch, folded away wherever kind is a compile-time constant ---- */
enum { HVDC_Q_TERN, HVDC_Q_QSGD2, HVDC_Q_QSGD4, HVDC_Q_QSGD8, HVDC_Q_FP16 };

/* Bits per element on the wire (fp16: 16, values stored as uint16). */
HVDC_FN int hvdc_q_bits(int kind)
{
    return kind == HVDC_Q_FP16 ? 16 : kind == HVDC_Q_QSGD8 ? 8 : kind == HVDC_Q_QSGD4 ? 4 : 2;
}

HVDC_FN hvdc_u32 hvdc_q_levels(int kind) { return (1u << (hvdc_q_bits(kind) - 1)) - 1u; }

/* Code of v given its bucket's scale (TernGrad: s; QSGD: the norm; fp16: unused). */
HVDC_FN hvdc_u32 hvdc_q_code(int kind, float v, float scale, hvdc_u32 u)
{
    if (kind == HVDC_Q_TERN) return hvdc_tern_code(v, scale, u);
    if (kind == HVDC_Q_FP16) return hvdc_fp16_sr(v, u);
    return hvdc_qsgd_code(v, scale, hvdc_q_levels(kind), u);
}

HVDC_FN float hvdc_q_value(int kind, hvdc_u32 code, float scale)
{
    if (kind == HVDC_Q_TERN) return hvdc_tern_value(code, scale);
    if (kind == HVDC_Q_FP16) return hvdc_fp16_value(code);
    return hvdc_qsgd_value(code, scale, hvdc_q_levels(kind));
}

#endif /* HVDC_QUANT_H */
