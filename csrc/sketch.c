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

/* s[t] <- D_t s[t] for the block at base (base % 4 == 0 or the block has fewer than 4). */
HVDC_INLINE void flip_signs(const kjob *j, hvdc_i64 base, float *s)
{
    for (hvdc_i64 t = 0; t < j->block; t += 4) {
        hvdc_u32x4 u = hvdc_stream_block(j->shared_seed, j->shared_step, j->shared_id,
                                         (hvdc_u64)((base + t) / 4));
        for (int q = 0; q < 4 && t + q < j->block; ++q) s[t + q] = hvdc_sketch_flip(s[t + q], u.v[q]);
    }
}

HVDC_INLINE void fwht(float *s, hvdc_i64 block)
{
    for (hvdc_i64 h = 1; h < block; h <<= 1)
        for (hvdc_i64 lo = 0; lo < block; lo += 2 * h)
            for (hvdc_i64 t = lo; t < lo + h; ++t) hvdc_fwht_pair(&s[t], &s[t + h]);
}

HVDC_INLINE void encode_block(const kjob *j, hvdc_i64 blk, float *s, float *z, hvdc_u32 *c)
{
    hvdc_i64 base = blk * j->block, valid = hvdc_min64(j->block, j->n - base);
    for (hvdc_i64 t = 0; t < j->block; ++t) s[t] = t < valid ? j->g[base + t] : 0.0f;
    if (j->rotate) {
        flip_signs(j, base, s);
        fwht(s, j->block);
    }
    float lo = hvdc_u2f(0x7F800000u), hi = -lo;
    for (hvdc_i64 q = 0; q < j->kept; ++q) {
        z[q] = hvdc_sketch_canon(s[j->sel ? j->sel[q] : q]);
        lo = z[q] < lo ? z[q] : lo;      /* no NaN, no -0.0: min and max are order-free */
        hi = z[q] > hi ? z[q] : hi;
    }
    j->ranges[2 * blk] = lo;
    j->ranges[2 * blk + 1] = hi;
    float st = hvdc_sketch_step(lo, hi, j->bits);
    hvdc_i64 e0 = blk * j->kept;                     /* a multiple of 4 (of 8 with several blocks) */
    for (hvdc_i64 q0 = 0; q0 < j->kept; q0 += 4) {
        hvdc_u32x4 u = hvdc_stream_block(j->seed, j->step, j->tensor_id, (hvdc_u64)((e0 + q0) / 4));
        for (int q = 0; q < 4; ++q)
            c[q0 + q] = q0 + q < j->kept ? hvdc_sketch_code(z[q0 + q], lo, st, j->bits, u.v[q]) : 0u;
    }
    for (int q = 0; q < 8; ++q) c[j->kept + q] = 0;  /* the tail of a last, partial byte */
    int per = 8 / j->bits;
    hvdc_u8 *o = j->codes + e0 * j->bits / 8;
    for (hvdc_i64 k = 0; k < (j->kept * j->bits + 7) / 8; ++k) {
        hvdc_u32 byte = 0;
        for (int q = 0; q < per; ++q) byte |= c[per * k + q] << (j->bits * q);
        o[k] = (hvdc_u8)byte;
    }
}

HVDC_CLONES static void w_encode(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    float s[HVDC_SKETCH_MAX_BLOCK], z[HVDC_SKETCH_MAX_BLOCK];
    hvdc_u32 c[HVDC_SKETCH_MAX_BLOCK + 8];
    for (hvdc_i64 blk = b0; blk < b1; ++blk) encode_block((const kjob *)job, blk, s, z, c);
}

/* Workers summed in list order in the rotated domain (0 + D_0 + D_1 + ...), one inverse FWHT,
 * the signs and / kB, added to out. */
HVDC_INLINE void decode_block(const kjob *j, hvdc_i64 blk, float *s, float *acc)
{
    hvdc_i64 base = blk * j->block, valid = hvdc_min64(j->block, j->n - base);
    for (hvdc_i64 q = 0; q < j->kept; ++q) acc[q] = 0.0f;
    for (int w = 0; w < j->nworkers; ++w) {
        float lo = j->wranges[w][2 * blk], hi = j->wranges[w][2 * blk + 1];
        float st = hvdc_sketch_step(lo, hi, j->bits);
        for (hvdc_i64 q = 0; q < j->kept; ++q) {
            hvdc_u32 l = hvdc_sketch_load(j->wcodes[w], blk * j->kept + q, j->bits);
            acc[q] += hvdc_sketch_value(l, lo, hi, st, j->bits);
        }
    }
    for (hvdc_i64 t = 0; t < j->block; ++t) s[t] = 0.0f;
    for (hvdc_i64 q = 0; q < j->kept; ++q) s[j->sel ? j->sel[q] : q] = acc[q];
    if (j->rotate) fwht(s, j->block);
    for (hvdc_i64 t = 0; t < valid; t += 4) {
        hvdc_u32x4 u = {{0u, 0u, 0u, 0u}};
        if (j->rotate)
            u = hvdc_stream_block(j->shared_seed, j->shared_step, j->shared_id, (hvdc_u64)((base + t) / 4));
        for (int q = 0; q < 4 && t + q < valid; ++q)
            j->out[base + t + q] = j->out[base + t + q]
                                   + hvdc_sketch_out(s[t + q], u.v[q], j->rotate, j->block, j->kept);
    }
}

HVDC_CLONES static void w_decode(const void *job, hvdc_i64 b0, hvdc_i64 b1)
{
    float s[HVDC_SKETCH_MAX_BLOCK], acc[HVDC_SKETCH_MAX_BLOCK];
    for (hvdc_i64 blk = b0; blk < b1; ++blk) decode_block((const kjob *)job, blk, s, acc);
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
