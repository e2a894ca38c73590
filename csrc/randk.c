/* CPU reference of random-k (kernels/randk.cu): the k indices pi(0), ..., pi(k-1) of the shared
 * key's permutation of [0, n) (kernels/feistel.h), recomputed where they are needed.  The work is
 * O(k): n never appears except as the permutation's range.
 *
 * The GPU computes each pi(j) on its own (hvdc_perm_index); here a batch of RANDK_BATCH indices
 * goes through the same rounds (hvdc_feistel_half) one round at a time, a loop over the batch
 * that gcc vectorizes, and cycle walking repeats the permutation on the lanes still >= n until
 * none is left: the same values, faster than one index at a time. */
#include "feistel.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

#define RANDK_BATCH 64

typedef struct {
    hvdc_i64 n;
    int bits, nworkers, clear;
    hvdc_u64 seed;
    hvdc_u32 step, tensor_id;
    float scale;
    float *src;                     /* gather: g, or g + r (cleared at the selected entries) */
    float *values;                  /* gather: the wire values */
    hvdc_i64 *indices;              /* hvdc_perm_indices */
    const float *const *wvalues;    /* scatter: per worker */
    float *out;
} rjob;

/* v[q] <- the permutation of v[q], q < m: the rounds of hvdc_feistel, one at a time over the
 * lanes (a loop gcc vectorizes). */
HVDC_INLINE void permute_lanes(const rjob *j, hvdc_u64 *v, int m)
{
    hvdc_u64 left[RANDK_BATCH], right[RANDK_BATCH];
    int wl = j->bits / 2, wr = j->bits - wl, rounds = hvdc_feistel_rounds(j->bits);
    for (int q = 0; q < m; ++q) {
        left[q] = v[q] >> wr;
        right[q] = v[q] & (((hvdc_u64)1 << wr) - 1u);
    }
    for (int r = 0; r < rounds; ++r) {
        for (int q = 0; q < m; ++q) {
            hvdc_u64 next = hvdc_feistel_half(left[q], right[q], r, wl, j->seed, j->step, j->tensor_id);
            left[q] = right[q];
            right[q] = next;
        }
        int w = wl;
        wl = wr;
        wr = w;
    }
    for (int q = 0; q < m; ++q) v[q] = (left[q] << wr) | right[q];
}

/* idx[q] = pi(q0 + q) for q < len: cycle walking on the lanes still >= n, moved to the front
 * after every pass (about len / (n / 2^bits) lane evaluations in all). */
HVDC_INLINE void perm_batch(const rjob *j, hvdc_i64 q0, int len, hvdc_i64 *idx)
{
    hvdc_u64 v[RANDK_BATCH];
    int pos[RANDK_BATCH], m = len;
    for (int q = 0; q < len; ++q) {
        v[q] = (hvdc_u64)(q0 + q);
        pos[q] = q;
    }
    while (m > 0) {
        permute_lanes(j, v, m);
        int pending = 0;
        for (int q = 0; q < m; ++q) {
            if (v[q] < (hvdc_u64)j->n) {
                idx[pos[q]] = (hvdc_i64)v[q];
            } else {
                v[pending] = v[q];
                pos[pending++] = pos[q];
            }
        }
        m = pending;
    }
}

HVDC_CLONES static void w_indices(const void *job, hvdc_i64 q0, hvdc_i64 q1)
{
    const rjob *j = (const rjob *)job;
    for (hvdc_i64 b = q0; b < q1; b += RANDK_BATCH)
        perm_batch(j, b, (int)hvdc_min64(RANDK_BATCH, q1 - b), j->indices + b);
}

HVDC_CLONES static void w_gather(const void *job, hvdc_i64 q0, hvdc_i64 q1)
{
    const rjob *j = (const rjob *)job;
    hvdc_i64 idx[RANDK_BATCH];
    for (hvdc_i64 b = q0; b < q1; b += RANDK_BATCH) {
        int len = (int)hvdc_min64(RANDK_BATCH, q1 - b);
        perm_batch(j, b, len, idx);
        for (int q = 0; q < len; ++q) {
            j->values[b + q] = j->src[idx[q]] * j->scale;
            if (j->clear) j->src[idx[q]] = 0.0f;
        }
    }
}

HVDC_CLONES static void w_scatter(const void *job, hvdc_i64 q0, hvdc_i64 q1)
{
    const rjob *j = (const rjob *)job;
    hvdc_i64 idx[RANDK_BATCH];
    for (hvdc_i64 b = q0; b < q1; b += RANDK_BATCH) {
        int len = (int)hvdc_min64(RANDK_BATCH, q1 - b);
        perm_batch(j, b, len, idx);
        for (int q = 0; q < len; ++q) {
            float acc = j->out[idx[q]];
            for (int w = 0; w < j->nworkers; ++w) acc += j->wvalues[w][b + q];
            j->out[idx[q]] = acc;
        }
    }
}

/* ---- exported entry points (0 < k <= n, bits = ceil(log2 n)).  The work passed to
 * hvdc_parallel counts an index as 16 elements: it costs several Philox calls. ---- */

void hvdc_perm_indices(hvdc_i64 *out, hvdc_i64 k, hvdc_i64 n, int bits, hvdc_u64 seed,
                       hvdc_u32 step, hvdc_u32 tensor_id, int nthreads)
{
    rjob j = {.n = n, .bits = bits, .seed = seed, .step = step, .tensor_id = tensor_id, .indices = out};
    hvdc_parallel(w_indices, &j, k, 16 * k, nthreads);
}

/* values[q] = src[pi(q)] * scale; with clear, src[pi(q)] <- 0 (error feedback: src holds g + r). */
void hvdc_randk_gather(float *src, int clear, hvdc_i64 k, hvdc_i64 n, int bits, float scale,
                       hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *values, int nthreads)
{
    rjob j = {.n = n, .bits = bits, .clear = clear, .seed = seed, .step = step,
              .tensor_id = tensor_id, .scale = scale, .src = src, .values = values};
    hvdc_parallel(w_gather, &j, k, 16 * k, nthreads);
}

/* out[pi(q)] <- ((out[pi(q)] + values_0[q]) + values_1[q]) + ..., workers in list order. */
void hvdc_randk_scatter_acc(const float *const *values, int nworkers, hvdc_i64 k, hvdc_i64 n,
                            int bits, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *out,
                            int nthreads)
{
    rjob j = {.n = n, .bits = bits, .nworkers = nworkers, .seed = seed, .step = step,
              .tensor_id = tensor_id, .wvalues = values, .out = out};
    hvdc_parallel(w_scatter, &j, k, 16 * k, nthreads);
}

/* ---- a bucket's tensors in one call, seg a segment table (hvdc_common.h) whose items are each
 * tensor's k values (nitems in all): tensor s gets exactly what the one-tensor call gives it,
 * keyed (seed, step, ids[s]). ---- */

static hvdc_i64 items_of(const hvdc_i64 *seg, hvdc_i64 nseg, hvdc_i64 nitems, hvdc_i64 s)
{
    hvdc_i64 end = s + 1 < nseg ? seg[HVDC_SEG_COLS * (s + 1) + HVDC_SEG_ITEM] : nitems;
    return end - seg[HVDC_SEG_COLS * s + HVDC_SEG_ITEM];
}

/* hvdc_randk_gather of every tensor, its values scaled by scales[s]. */
void hvdc_randk_gather_many(float *src, int clear, hvdc_i64 nseg, const hvdc_i64 *seg, hvdc_i64 nitems,
                            const float *scales, hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *values,
                            int nthreads)
{
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s, n = t[HVDC_SEG_N], k = items_of(seg, nseg, nitems, s);
        if (k)
            hvdc_randk_gather(src + t[HVDC_SEG_OFFSET], clear, k, n, hvdc_perm_bits(n), scales[s], seed, step,
                              (hvdc_u32)ids[s], values + t[HVDC_SEG_ITEM], nthreads);
    }
}

/* hvdc_randk_scatter_acc of every tensor: values holds nworkers addresses per tensor, each
 * pointing at the tensor's k values (tensor-major). */
void hvdc_randk_scatter_many(const float *const *values, int nworkers, hvdc_i64 nseg, const hvdc_i64 *seg,
                             hvdc_i64 nitems, hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *out,
                             int nthreads)
{
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s, n = t[HVDC_SEG_N], k = items_of(seg, nseg, nitems, s);
        if (k)
            hvdc_randk_scatter_acc(values + s * nworkers, nworkers, k, n, hvdc_perm_bits(n), seed, step,
                                   (hvdc_u32)ids[s], out + t[HVDC_SEG_OFFSET], nthreads);
    }
}
