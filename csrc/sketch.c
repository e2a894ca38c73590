/* CPU reference of the sketched update (kernels/sketch.cu): per Hadamard block, the same sign
 * flips, FWHT stages (kernels/sketch.h: the butterfly order is fixed, every output one addition
 * or subtraction of two values), order-free min / max, stochastic levels and packing, so payloads
 * and decoded sums match the CUDA kernels bit for bit.  Blocks are the parallel work items. */
/* No FP traps to respect: lets gcc evaluate both sides of the selects in vector lanes.  Values
 * are unchanged (not -ffast-math). */
#pragma GCC optimize("no-trapping-math")
#include <stddef.h>
#include "sketch.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

typedef struct {
    hvdc_i64 n, block, kept;
    const hvdc_i64 *sel;            /* kept coordinates, or NULL for all */
    int bits, rotate, nworkers;
    hvdc_u64 shared_seed, seed;     /* shared key: signs; per-rank key: stochastic levels */
    hvdc_u32 shared_step, shared_id, step, tensor_id;
    const float *g;                 /* encode */
    hvdc_u8 *codes;
    float *ranges;
    const hvdc_u8 *const *wcodes;   /* decode: per worker */
    const float *const *wranges;
    float *out;
} kjob;

/* The shared key's words of the block at base (base % 4 == 0 or the block has fewer than 4). */
HVDC_INLINE void sign_draws(const kjob *j, hvdc_i64 base, hvdc_u32 *u)
{
    hvdc_draws(u, base / 4, (j->block + 3) / 4, j->shared_seed, j->shared_step, j->shared_id);
}

HVDC_INLINE void fwht_stage(float *s, hvdc_i64 block, hvdc_i64 h)
{
    for (hvdc_i64 lo = 0; lo < block; lo += 2 * h)
        for (hvdc_i64 t = lo; t < lo + h; ++t) hvdc_fwht_pair(&s[t], &s[t + h]);
}

/* Stages h = 1, 2, 4, ... in order; the first four with h a constant, so that gcc vectorizes
 * them too (interleaved pairs) instead of running them one pair at a time. */
HVDC_INLINE void fwht(float *s, hvdc_i64 block)
{
    for (hvdc_i64 h = 1; h < 16 && h < block; h <<= 1) {
        if (h == 1) fwht_stage(s, block, 1);
        else if (h == 2) fwht_stage(s, block, 2);
        else if (h == 4) fwht_stage(s, block, 4);
        else fwht_stage(s, block, 8);
    }
    for (hvdc_i64 h = 16; h < block; h <<= 1) fwht_stage(s, block, h);
}

/* Codes c[0, kept) packed bits each (8/bits per byte) from o on; bits a constant after inlining. */
HVDC_INLINE void pack(int bits, const hvdc_u32 *c, hvdc_i64 kept, hvdc_u8 *o)
{
    int per = 8 / bits;
    for (hvdc_i64 k = 0; k < (kept * bits + 7) / 8; ++k) {
        hvdc_u32 byte = 0;
        for (int q = 0; q < per; ++q) byte |= c[per * k + q] << (bits * q);
        o[k] = (hvdc_u8)byte;
    }
}

HVDC_INLINE void unpack(int bits, const hvdc_u8 *in, hvdc_i64 kept, hvdc_u32 *c)
{
    int per = 8 / bits;
    for (hvdc_i64 k = 0; k < (kept * bits + 7) / 8; ++k)
        for (int q = 0; q < per; ++q) c[per * k + q] = ((hvdc_u32)in[k] >> (bits * q)) & ((1u << bits) - 1u);
}

HVDC_INLINE void encode_block(int bits, const kjob *j, hvdc_i64 blk, float *s, float *z, hvdc_u32 *c)
{
    hvdc_i64 base = blk * j->block, valid = hvdc_min64(j->block, j->n - base);
    for (hvdc_i64 t = 0; t < j->block; ++t) s[t] = t < valid ? j->g[base + t] : 0.0f;
    if (j->rotate) {
        sign_draws(j, base, c);
        for (hvdc_i64 t = 0; t < j->block; ++t) s[t] = hvdc_sketch_flip(s[t], c[t]);
        fwht(s, j->block);
    }
    if (j->sel)
        for (hvdc_i64 q = 0; q < j->kept; ++q) z[q] = hvdc_sketch_canon(s[j->sel[q]]);
    else
        for (hvdc_i64 q = 0; q < j->kept; ++q) z[q] = hvdc_sketch_canon(s[q]);
    float lo = hvdc_u2f(0x7F800000u), hi = -lo;
    for (hvdc_i64 q = 0; q < j->kept; ++q) {
        lo = z[q] < lo ? z[q] : lo;      /* no NaN, no -0.0: min and max are order-free */
        hi = z[q] > hi ? z[q] : hi;
    }
    j->ranges[2 * blk] = lo;
    j->ranges[2 * blk + 1] = hi;
    float st = hvdc_sketch_step(lo, hi, bits);
    hvdc_i64 e0 = blk * j->kept;                     /* a multiple of 4 (of 8 with several blocks) */
    hvdc_draws(c, e0 / 4, (j->kept + 3) / 4, j->seed, j->step, j->tensor_id);
    for (hvdc_i64 q = 0; q < j->kept; ++q) c[q] = hvdc_sketch_code(z[q], lo, st, bits, c[q]);
    for (int q = 0; q < 8; ++q) c[j->kept + q] = 0;  /* the tail of a last, partial byte */
    pack(bits, c, j->kept, j->codes + e0 * bits / 8);
}

HVDC_INLINE void encode_blocks(int bits, const kjob *j, hvdc_i64 b0, hvdc_i64 b1)
{
    float s[HVDC_SKETCH_MAX_BLOCK], z[HVDC_SKETCH_MAX_BLOCK];
    hvdc_u32 c[HVDC_SKETCH_MAX_BLOCK + 8];
    for (hvdc_i64 blk = b0; blk < b1; ++blk) encode_block(bits, j, blk, s, z, c);
}

/* The bit width as a compile-time constant in each loop. */
HVDC_CLONES static void w_encode(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    const kjob *j = (const kjob *)job;
    switch (j->bits) {
    case 1: encode_blocks(1, j, b0, b1); break;
    case 2: encode_blocks(2, j, b0, b1); break;
    case 4: encode_blocks(4, j, b0, b1); break;
    default: encode_blocks(8, j, b0, b1); break;
    }
}

/* Workers summed in list order in the rotated domain (0 + D_0 + D_1 + ...), one inverse FWHT,
 * the signs and / kB, added to out. */
HVDC_INLINE void decode_block(int bits, const kjob *j, hvdc_i64 blk, float *s, float *acc, hvdc_u32 *u)
{
    hvdc_i64 base = blk * j->block, valid = hvdc_min64(j->block, j->n - base);
    for (hvdc_i64 q = 0; q < j->kept; ++q) acc[q] = 0.0f;
    for (int w = 0; w < j->nworkers; ++w) {
        float lo = j->wranges[w][2 * blk], hi = j->wranges[w][2 * blk + 1];
        float st = hvdc_sketch_step(lo, hi, bits);
        unpack(bits, j->wcodes[w] + blk * j->kept * bits / 8, j->kept, u);
        for (hvdc_i64 q = 0; q < j->kept; ++q) acc[q] += hvdc_sketch_value(u[q], lo, hi, st, bits);
    }
    if (j->sel) {
        for (hvdc_i64 t = 0; t < j->block; ++t) s[t] = 0.0f;
        for (hvdc_i64 q = 0; q < j->kept; ++q) s[j->sel[q]] = acc[q];
    } else {
        for (hvdc_i64 q = 0; q < j->kept; ++q) s[q] = acc[q];
    }
    if (j->rotate) {
        fwht(s, j->block);
        sign_draws(j, base, u);
    }
    float *out = j->out + base;
    for (hvdc_i64 t = 0; t < valid; ++t)
        out[t] = out[t] + hvdc_sketch_out(s[t], j->rotate ? u[t] : 0u, j->rotate, j->block, j->kept);
}

HVDC_INLINE void decode_blocks(int bits, const kjob *j, hvdc_i64 b0, hvdc_i64 b1)
{
    float s[HVDC_SKETCH_MAX_BLOCK], acc[HVDC_SKETCH_MAX_BLOCK];
    hvdc_u32 u[HVDC_SKETCH_MAX_BLOCK + 8];
    for (hvdc_i64 blk = b0; blk < b1; ++blk) decode_block(bits, j, blk, s, acc, u);
}

HVDC_CLONES static void w_decode(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    const kjob *j = (const kjob *)job;
    switch (j->bits) {
    case 1: decode_blocks(1, j, b0, b1); break;
    case 2: decode_blocks(2, j, b0, b1); break;
    case 4: decode_blocks(4, j, b0, b1); break;
    default: decode_blocks(8, j, b0, b1); break;
    }
}

/* ---- exported entry points (n > 0; block a power of two <= HVDC_SKETCH_MAX_BLOCK; kept <= block,
 * kept * bits % 8 == 0 unless there is one block; sel: kept distinct coordinates or NULL) ---- */

void hvdc_sketch_encode(const float *g, hvdc_i64 n, hvdc_i64 block, hvdc_i64 kept, const hvdc_i64 *sel,
                        int bits, int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step,
                        hvdc_u32 shared_id, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                        hvdc_u8 *codes, float *ranges, int nthreads)
{
    kjob j = {.n = n, .block = block, .kept = kept, .sel = sel, .bits = bits, .rotate = rotate,
              .shared_seed = shared_seed, .shared_step = shared_step, .shared_id = shared_id,
              .seed = seed, .step = step, .tensor_id = tensor_id, .g = g, .codes = codes,
              .ranges = ranges};
    hvdc_parallel(w_encode, &j, (n + block - 1) / block, n, nthreads);
}

void hvdc_sketch_decode_acc(const hvdc_u8 *const *codes, const float *const *ranges, int nworkers,
                            hvdc_i64 n, hvdc_i64 block, hvdc_i64 kept, const hvdc_i64 *sel, int bits,
                            int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step, hvdc_u32 shared_id,
                            float *out, int nthreads)
{
    kjob j = {.n = n, .block = block, .kept = kept, .sel = sel, .bits = bits, .rotate = rotate,
              .nworkers = nworkers, .shared_seed = shared_seed, .shared_step = shared_step,
              .shared_id = shared_id, .wcodes = codes, .wranges = ranges, .out = out};
    hvdc_parallel(w_decode, &j, (n + block - 1) / block, n * nworkers, nthreads);
}
