/*
 * sketch.h: per-element formulas of the sketched update (hvd_compress/codecs/sketch.py; Konečný
 * et al. 2016, "Federated Learning: Strategies for Improving Communication Efficiency"), compiled
 * verbatim by NVRTC (kernels/sketch.cu) and gcc (csrc/sketch.c).
 *
 * Per block of B = 2^m coordinates (the tensor cut into blocks, the last one padded with zeros):
 *
 *   rotate:    y = H D v             D = diag(+-1) from the shared key, H the unnormalized
 *                                    Walsh-Hadamard matrix (H H = B I): m butterfly stages
 *   subsample: z_q = y[sel[q]], q < kB   (sel shared by every block: kernels/feistel.h)
 *   quantize:  l_q = floor(r) + Bernoulli(r - floor(r)),  r = (z_q - lo) / step,
 *              lo = min z, hi = max z, step = (hi - lo) / (2^b - 1)
 *   decode:    y^[sel[q]] = sum over workers of lo + l_q * step (hi for the top level; 0
 *              where nothing was kept), then
 *              v^ = D H y^ / kB  (= D H^-1 y^ * B / kB: the inverse rotation and the 1/ratio
 *              scaling of subsampling in one division; exact 1/B when nothing is subsampled)
 *
 * FWHT order: stage h = 1, 2, 4, ..., B/2 maps every pair (i, i + h), i with bit h clear, to
 * (a + b, a - b); stages run in that order and the pairs of a stage are independent, so any
 * thread layout computes the same bits (contraction off, as everywhere).
 */
#ifndef HVDC_SKETCH_H
#define HVDC_SKETCH_H
#include "hvdc_common.h"

/* Largest block: the CUDA kernels keep one block in shared memory (16 KiB of fp32). */
#define HVDC_SKETCH_MAX_BLOCK 4096

/* Index of the first element of pair p of FWHT stage h (h a power of two). */
HVDC_FN hvdc_i64 hvdc_fwht_index(hvdc_i64 p, hvdc_i64 h)
{
    return ((p & ~(h - 1)) << 1) | (p & (h - 1));
}

HVDC_FN void hvdc_fwht_pair(float *a, float *b)
{
    float x = *a, y = *b;
    *a = x + y;
    *b = x - y;
}

/* D: coordinate i of the padded tensor is negated when the top bit of its draw (word i % 4 of
 * block i / 4 of the shared key's stream) is set. */
HVDC_FN float hvdc_sketch_flip(float v, hvdc_u32 u)
{
    return (u >> 31) ? -v : v;
}

/* A kept coordinate as the quantizer sees it: -0.0 becomes +0.0 (x + 0 == x otherwise), so that
 * the block's min and max, which an order-free reduction computes, have a defined sign of zero. */
HVDC_FN float hvdc_sketch_canon(float z)
{
    return z + 0.0f;
}

HVDC_FN float hvdc_sketch_step(float lo, float hi, int bits)
{
    return (hi - lo) / (float)((1 << bits) - 1);
}

/* Level of z in [lo, hi]: r = (z - lo) / step capped at the top level (the rounded division may
 * exceed it by an ulp); a constant block (step 0) encodes every coordinate as level 0. */
HVDC_FN hvdc_u32 hvdc_sketch_code(float z, float lo, float step, int bits, hvdc_u32 u)
{
    float top = (float)((1 << bits) - 1);
    float r = (z - lo) / (step > 0.0f ? step : 1.0f);
    r = step > 0.0f ? hvdc_min_nonneg(r, top) : 0.0f;
    hvdc_u32 l = (hvdc_u32)r;                 /* 0 <= r <= 255: truncation is floor */
    return l + (hvdc_u32)hvdc_bernoulli(u, r - (float)l);
}

/* Level l's value: lo + l * step, and hi itself for the top level, so that the block's extremes
 * come back exactly. */
HVDC_FN float hvdc_sketch_value(hvdc_u32 l, float lo, float hi, float step, int bits)
{
    return l == (1u << bits) - 1u ? hi : lo + (float)l * step;
}

/* Decoded coordinate from the summed, inverse-transformed w (rotate) or the summed coordinate w
 * itself (no rotation: w * B / kB undoes only the subsampling; w * B is exact). */
HVDC_FN float hvdc_sketch_out(float w, hvdc_u32 u, int rotate, hvdc_i64 block, hvdc_i64 kept)
{
    return (rotate ? hvdc_sketch_flip(w, u) : w * (float)block) / (float)kept;
}

/* Codes of the b-bit code stream: element e at bits b (e % (8/b)) of byte e b / 8 (QSGD's
 * packing), every code of a block starting on a byte (kB b % 8 == 0 when there are several). */
HVDC_FN hvdc_u32 hvdc_sketch_load(const hvdc_u8 *codes, hvdc_i64 e, int bits)
{
    hvdc_u32 byte = codes[e * bits / 8];
    return (byte >> (hvdc_u32)(bits * (int)(e % (8 / bits)))) & ((1u << bits) - 1u);
}

#endif /* HVDC_SKETCH_H */
