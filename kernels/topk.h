/*
 * topk.h: per-element formulas of the top-k sparsifier (hvd_compress/codecs/topk.py), shared by
 * kernels/topk.cu (NVRTC) and csrc/topk.c (gcc) so both round identically.
 *
 *   - where the strided threshold sample starts (a draw of the tensor's Philox stream);
 *   - fp32 -> fp16 wire values (round to nearest even, saturated to +-65504 so a value never
 *     becomes Inf) and fp16 -> fp32 (exact), in integer arithmetic: no dependence on cuda_fp16.h
 *     or on the host compiler's _Float16;
 *   - the error-feedback remainder r = v - D(C(v)) of a selected entry.
 */
#ifndef HVDC_TOPK_H
#define HVDC_TOPK_H
#include "hvdc_common.h"

/* Threshold levels counted in one pass: at most thr * 1.25^u for u = 8..1 above the sampled
 * threshold and thr * 0.8^l for l < 8 (DGC's "thr *= 0.8" rounds) below it; exact_k counts the
 * lower eight and a level 0 (every element), its last resort. */
#define HVDC_TOPK_MAX_LEVELS 16

typedef unsigned short hvdc_half;


/* First sampled index of a stride-s sample: floor(u * s / 2^32) with u = word 0 of the tensor's
 * Philox stream (block 0), so start is uniform on [0, s) up to 2^-32 and a pure function of the
 * RandomKey.  s < 2^31, so the product fits in 64 bits. */
HVDC_FN hvdc_i64 hvdc_topk_sample_start(hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                                        hvdc_i64 stride)
{
    hvdc_u32 u = hvdc_stream_block(seed, step, tensor_id, 0).v[0];
    return (hvdc_i64)(((hvdc_u64)u * (hvdc_u64)stride) >> 32);
}

/* fp32 -> IEEE binary16, round to nearest even; |v| >= 65504 saturates to +-65504 (the largest
 * finite half) so that the decoded value stays finite and error feedback keeps the excess.
 * Input is finite (the codec rejects NaN/Inf before encoding). */
HVDC_FN hvdc_half hvdc_f32_to_f16_sat(float v)
{
    hvdc_u32 x = hvdc_f2u(v);
    hvdc_u32 sign = (x >> 16) & 0x8000u;
    hvdc_u32 ax = x & 0x7fffffffu;
    hvdc_u32 h, rem, half;
    if (ax >= 0x477fe000u)                 /* 65504.0f */
        return (hvdc_half)(sign | 0x7bffu);
    if (ax >= 0x38800000u) {               /* >= 2^-14: normal half; rebias exponent 127 -> 15 */
        hvdc_u32 t = ax - 0x38000000u;
        h = t >> 13;
        rem = t & 0x1fffu;
        half = 0x1000u;
    } else {                               /* subnormal half: h = round(|v| * 2^24) */
        int e = (int)(ax >> 23);
        int shift = 126 - e;               /* |v| * 2^24 = mant * 2^-shift, shift >= 14 */
        hvdc_u32 mant = (ax & 0x7fffffu) | 0x800000u;
        if (e == 0 || shift > 24)          /* < 2^-25 (fp32 subnormals included): rounds to 0 */
            return (hvdc_half)sign;
        h = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
    }
    if (rem > half || (rem == half && (h & 1u)))
        h += 1u;                           /* a carry into the exponent is still correct */
    return (hvdc_half)(sign | h);
}

/* IEEE binary16 -> fp32, exact (every half is an fp32).  Inf/NaN bit patterns map to fp32
 * Inf/NaN; the encoder never produces them. */
HVDC_FN float hvdc_f16_to_f32(hvdc_half h)
{
    hvdc_u32 sign = ((hvdc_u32)h & 0x8000u) << 16;
    hvdc_u32 e = ((hvdc_u32)h >> 10) & 0x1fu;
    hvdc_u32 m = (hvdc_u32)h & 0x3ffu;
    if (e == 0) {                          /* subnormal: m * 2^-24, exact in fp32 */
        float f = (float)m * 5.9604644775390625e-8f;
        return hvdc_u2f(sign | hvdc_f2u(f));
    }
    if (e == 31)
        return hvdc_u2f(sign | 0x7f800000u | (m << 13));
    return hvdc_u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* Wire value of a selected entry v and the error-feedback remainder v - D(C(v)):
 * fp32 values are sent as is (remainder 0); fp16 values keep v - fp16(v), exact in fp32. */
HVDC_FN float hvdc_topk_encode_value(float v, int fp16, hvdc_half *h)
{
    if (!fp16)
        return 0.0f;
    *h = hvdc_f32_to_f16_sat(v);
    return v - hvdc_f16_to_f32(*h);
}

HVDC_FN float hvdc_topk_decode_value(const void *vals, int fp16, hvdc_i64 j)
{
    return fp16 ? hvdc_f16_to_f32(((const hvdc_half *)vals)[j]) : ((const float *)vals)[j];
}

#endif /* HVDC_TOPK_H */
