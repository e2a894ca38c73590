/* CPU reference of LAQ's innovation quantizer (kernels/laq.cu), with the formulas of
 * kernels/laq.h: the same payloads and decoded sums, bit for bit.  The maximum is order-free, so
 * the split into parts does not matter; every other step is per element (or per code byte). */
#include "laq.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

#define LAQ_PARTS 64              /* parts of the maximum */
#define LAQ_TILE 8192             /* code bytes or elements per work item */
#define LAQ_BATCH 256             /* elements per decode batch (divides LAQ_TILE) */

typedef struct {
    const float *v;
    hvdc_i64 n;
    int bits, nworkers;
    float radius;
    hvdc_u32 part_max[LAQ_PARTS];
    hvdc_u8 *codes;
    const hvdc_u8 *const *wcodes;
    const float *const *wradii;
    float *out;
} ljob;

HVDC_CLONES static void w_absmax(const void *job, hvdc_i64 p0, hvdc_i64 p1)
{
    ljob *j = (ljob *)job;
    for (hvdc_i64 p = p0; p < p1; ++p) {
        hvdc_u32 m = 0u;
        for (hvdc_i64 i = j->n * p / LAQ_PARTS, e = j->n * (p + 1) / LAQ_PARTS; i < e; ++i)
            m = hvdc_laq_absmax_bits(m, j->v[i]);
        j->part_max[p] = m;
    }
}

HVDC_CLONES static void w_encode(const void *job, hvdc_i64 t0, hvdc_i64 t1)
{
    const ljob *j = (const ljob *)job;
    hvdc_i64 nbytes = (j->n * j->bits + 7) / 8;
    float step = hvdc_laq_step(j->radius, j->bits);
    for (hvdc_i64 b = t0 * LAQ_TILE, e = hvdc_min64(nbytes, t1 * LAQ_TILE); b < e; ++b)
        j->codes[b] = hvdc_laq_byte(j->v, j->n, b, j->bits, j->radius, step);
}

/* Batches of LAQ_BATCH elements: each worker's radius and step once per batch, then one loop
 * over the batch; every element still adds the workers in list order. */
HVDC_CLONES static void w_decode(const void *job, hvdc_i64 t0, hvdc_i64 t1)
{
    const ljob *j = (const ljob *)job;
    float acc[LAQ_BATCH];
    for (hvdc_i64 lo = t0 * LAQ_TILE, end = hvdc_min64(j->n, t1 * LAQ_TILE); lo < end; lo += LAQ_BATCH) {
        int len = (int)hvdc_min64(LAQ_BATCH, end - lo);
        for (int q = 0; q < len; ++q) acc[q] = j->out[lo + q];
        for (int w = 0; w < j->nworkers; ++w) {
            const hvdc_u8 *codes = j->wcodes[w];
            float r = j->wradii[w][0], step = hvdc_laq_step(r, j->bits);
            for (int q = 0; q < len; ++q)
                acc[q] += hvdc_laq_value(hvdc_laq_load(codes, lo + q, j->bits), r, step);
        }
        for (int q = 0; q < len; ++q) j->out[lo + q] = acc[q];
    }
}

/* ---- exported entry points (n > 0, bits in {2, 4, 8}) ---- */

/* radius[0] = max_i |v_i| (a NaN wins). */
void hvdc_laq_absmax(const float *v, hvdc_i64 n, float *radius, int nthreads)
{
    ljob j = {.v = v, .n = n};
    hvdc_parallel(w_absmax, &j, LAQ_PARTS, n, nthreads);
    hvdc_u32 m = 0u;
    for (int p = 0; p < LAQ_PARTS; ++p) m = j.part_max[p] > m ? j.part_max[p] : m;
    radius[0] = hvdc_u2f(m);
}

/* codes: ceil(n bits / 8) bytes of the codes of v on the grid of radius R > 0. */
void hvdc_laq_encode(const float *v, hvdc_i64 n, float radius, int bits, hvdc_u8 *codes, int nthreads)
{
    ljob j = {.v = v, .n = n, .bits = bits, .radius = radius, .codes = codes};
    hvdc_i64 nbytes = (n * bits + 7) / 8;
    hvdc_parallel(w_encode, &j, (nbytes + LAQ_TILE - 1) / LAQ_TILE, n, nthreads);
}

/* out_i <- ((out_i + dQ_0(i)) + dQ_1(i)) + ..., workers in list order (each with R > 0). */
void hvdc_laq_decode_acc(const hvdc_u8 *const *codes, const float *const *radii, int nworkers,
                         hvdc_i64 n, int bits, float *out, int nthreads)
{
    ljob j = {.n = n, .bits = bits, .nworkers = nworkers, .wcodes = codes, .wradii = radii, .out = out};
    hvdc_parallel(w_decode, &j, (n + LAQ_TILE - 1) / LAQ_TILE, n * nworkers, nthreads);
}
