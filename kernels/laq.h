/*
 * laq.h: per-element formulas of LAQ's innovation quantizer (hvd_compress/codecs/laq.py; Sun,
 * Chen, Giannakis, Yang, NeurIPS 2019, eq. (4)-(5)), compiled verbatim by NVRTC (kernels/laq.cu)
 * and by gcc (csrc/laq.c):
 *
 *   R = max_i |v_i|,  L = 2^b - 1,  step = (R + R) / L,
 *   q_i = clamp(floor((v_i + R) / step + 1/2), 0, L),   dQ_i = q_i * step - R,
 *
 * each a single fp32 operation in this order (no contraction), so CPU and GPU give the same bits.
 * The radius is a maximum, which is order-free: it is taken over the bit patterns of |v_i|
 * (non-negative floats order like their patterns), so a NaN (pattern above +inf) wins as in
 * torch.amax.  A NaN code (NaN input) is 0: the engine rejects such a step anyway.
 *
 * Wire codes: b bits per element, 8/b per byte, element i at bits b (i % (8/b)) of byte
 * i b / 8 (QSGD's layout).
 */
#ifndef HVDC_LAQ_H
#define HVDC_LAQ_H
#include "hvdc_common.h"

#if !defined(__CUDACC__)
#include <math.h>
#endif

/* Running maximum of |v| as a bit pattern. */
HVDC_FN hvdc_u32 hvdc_laq_absmax_bits(hvdc_u32 m, float v)
{
    hvdc_u32 a = hvdc_f2u(v) & 0x7FFFFFFFu;
    return a > m ? a : m;
}

/* L = 2^b - 1, the largest code. */
HVDC_FN hvdc_u32 hvdc_laq_top(int bits) { return (1u << bits) - 1u; }

HVDC_FN float hvdc_laq_step(float radius, int bits)
{
    return (radius + radius) / (float)hvdc_laq_top(bits);
}

HVDC_FN hvdc_u32 hvdc_laq_code(float v, float radius, float step, int bits)
{
    float t = floorf((v + radius) / step + 0.5f);
    float top = (float)hvdc_laq_top(bits);
    return t >= 0.0f ? (t <= top ? (hvdc_u32)t : hvdc_laq_top(bits)) : 0u;
}

HVDC_FN float hvdc_laq_value(hvdc_u32 q, float radius, float step)
{
    return (float)q * step - radius;
}

/* Byte `byte` of the packed codes of v[0..n). */
HVDC_FN hvdc_u8 hvdc_laq_byte(const float *v, hvdc_i64 n, hvdc_i64 byte, int bits, float radius,
                              float step)
{
    int per = 8 / bits;
    hvdc_u32 out = 0u;
    for (int q = 0; q < per; ++q) {
        hvdc_i64 i = byte * per + q;
        if (i < n) out |= hvdc_laq_code(v[i], radius, step, bits) << (bits * q);
    }
    return (hvdc_u8)out;
}

/* Code of element i of packed codes. */
HVDC_FN hvdc_u32 hvdc_laq_load(const hvdc_u8 *codes, hvdc_i64 i, int bits)
{
    int per = 8 / bits;
    return ((hvdc_u32)codes[i / per] >> (bits * (int)(i % per))) & hvdc_laq_top(bits);
}

#endif /* HVDC_LAQ_H */
