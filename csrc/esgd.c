/* CPU reference of eSGD's element-wise step (kernels/esgd.cu), with the formulas of
 * kernels/esgd.h: a = r beta + g, the threshold flags and the selection keys, bit for bit as on
 * the GPU.  Tiles of ESGD_TILE elements (a multiple of 4: tiles start on a Philox block), the
 * words of a batch drawn first (a loop gcc vectorizes), then one loop over the batch. */
#pragma GCC optimize("no-trapping-math")
#include "esgd.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

#define ESGD_BATCH 64
#define ESGD_TILE 8192

typedef struct {
    const float *g, *r, *h;
    hvdc_i64 n;
    float beta, threshold;
    hvdc_u64 seed;
    hvdc_u32 step, tensor_id;
    float *a, *keys;
    hvdc_u8 *over;
} ejob;

HVDC_INLINE void step_tiles(int draw, const ejob *j, hvdc_i64 t0, hvdc_i64 t1)
{
    hvdc_u32 u[ESGD_BATCH];
    for (hvdc_i64 lo = t0 * ESGD_TILE, end = hvdc_min64(j->n, t1 * ESGD_TILE); lo < end; lo += ESGD_BATCH) {
        int len = (int)hvdc_min64(ESGD_BATCH, end - lo);
        if (draw) hvdc_draws(u, lo / 4, (len + 3) / 4, j->seed, j->step, j->tensor_id);
        for (int q = 0; q < len; ++q) {
            float v = hvdc_esgd_residual(j->g[lo + q], j->r[lo + q], j->beta);
            j->a[lo + q] = v;
            j->over[lo + q] = hvdc_esgd_over(v, j->threshold);
            if (draw) j->keys[lo + q] = hvdc_esgd_key(u[q], j->h[lo + q]);
        }
    }
}

HVDC_CLONES static void w_step(const void *job, hvdc_i64 t0, hvdc_i64 t1)
{
    const ejob *j = (const ejob *)job;
    if (j->keys) step_tiles(1, j, t0, t1);
    else step_tiles(0, j, t0, t1);
}

/* a_i = r_i beta + g_i, over_i = |a_i| > threshold; keys (may be NULL, then h too) key_i. */
void hvdc_esgd_step(const float *g, const float *r, const float *h, hvdc_i64 n, float beta,
                    float threshold, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *a,
                    float *keys, hvdc_u8 *over, int nthreads)
{
    ejob j = {.g = g, .r = r, .h = h, .n = n, .beta = beta, .threshold = threshold, .seed = seed,
              .step = step, .tensor_id = tensor_id, .a = a, .keys = keys, .over = over};
    hvdc_parallel(w_step, &j, (n + ESGD_TILE - 1) / ESGD_TILE, n, nthreads);
}
