/*
 * randk.cu: CUDA kernels of random-k (hvd_compress/codecs/randk.py); csrc/randk.c is the CPU
 * reference.  The k indices are pi(0), ..., pi(k-1) of the shared key's permutation of [0, n)
 * (kernels/feistel.h), recomputed where they are needed instead of being stored or sent.
 * One thread per selected position j (grid-stride loops: any launch shape gives the same bits).
 */
#include "feistel.h"
#include "hvdc_warp.cuh"

extern "C" {

/* out[j] = pi(j) for j < k. */
__global__ void hvdc_perm_indices(long long *out, long long k, long long n, int bits,
                                  hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id)
{
    for (long long j = hvdc_thread_index(); j < k; j += (long long)gridDim.x * blockDim.x)
        out[j] = hvdc_perm_index(j, n, bits, seed, step, tensor_id);
}

/* values[j] = src[pi(j)] * scale; with clear (error feedback: src is g + r), src[pi(j)] <- 0.
 * The indices are distinct, so no two threads touch one element. */
__global__ void hvdc_randk_gather(float *src, int clear, long long k, long long n, int bits,
                                  float scale, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                                  float *values)
{
    for (long long j = hvdc_thread_index(); j < k; j += (long long)gridDim.x * blockDim.x) {
        long long i = hvdc_perm_index(j, n, bits, seed, step, tensor_id);
        values[j] = src[i] * scale;
        if (clear) src[i] = 0.0f;
    }
}

/* out[pi(j)] <- ((out[pi(j)] + values_0[j]) + values_1[j]) + ..., workers in list order. */
__global__ void hvdc_randk_scatter_acc(const unsigned long long *values, int nworkers, long long k,
                                       long long n, int bits, hvdc_u64 seed, hvdc_u32 step,
                                       hvdc_u32 tensor_id, float *out)
{
    for (long long j = hvdc_thread_index(); j < k; j += (long long)gridDim.x * blockDim.x) {
        long long i = hvdc_perm_index(j, n, bits, seed, step, tensor_id);
        float acc = out[i];
        for (int w = 0; w < nworkers; ++w) acc += ((const float *)values[w])[j];
        out[i] = acc;
    }
}

}  /* extern "C" */

/* ---- a bucket's tensors in one launch (hvdc_common.h's segment tables; a tensor's items are
 * its k values): tensor s is keyed (seed, step, ids[s]), its values scaled by scales[s]. ---- */

extern "C" {

/* hvdc_randk_gather of every tensor. */
__global__ void hvdc_seg_randk_gather(float *src, int clear, const long long *seg, int nseg, long long nitems,
                                      const float *scales, hvdc_u64 seed, hvdc_u32 step, const long long *ids,
                                      float *values)
{
    for (long long j = hvdc_thread_index(); j < nitems; j += (long long)gridDim.x * blockDim.x) {
        int s = hvdc_seg_of(seg, nseg, HVDC_SEG_ITEM, j);
        const long long *t = seg + HVDC_SEG_COLS * s;
        long long n = t[HVDC_SEG_N];
        long long i = t[HVDC_SEG_OFFSET] + hvdc_perm_index(j - t[HVDC_SEG_ITEM], n, hvdc_perm_bits(n), seed, step,
                                                           (hvdc_u32)ids[s]);
        values[j] = src[i] * scales[s];
        if (clear) src[i] = 0.0f;
    }
}

/* hvdc_randk_scatter_acc of every tensor: values holds nworkers addresses per tensor
 * (tensor-major). */
__global__ void hvdc_seg_randk_scatter_acc(const unsigned long long *values, int nworkers, const long long *seg,
                                           int nseg, long long nitems, hvdc_u64 seed, hvdc_u32 step,
                                           const long long *ids, float *out)
{
    for (long long j = hvdc_thread_index(); j < nitems; j += (long long)gridDim.x * blockDim.x) {
        int s = hvdc_seg_of(seg, nseg, HVDC_SEG_ITEM, j);
        const long long *t = seg + HVDC_SEG_COLS * s;
        long long n = t[HVDC_SEG_N], q = j - t[HVDC_SEG_ITEM];
        long long i = t[HVDC_SEG_OFFSET] + hvdc_perm_index(q, n, hvdc_perm_bits(n), seed, step, (hvdc_u32)ids[s]);
        float acc = out[i];
        for (int w = 0; w < nworkers; ++w) acc += ((const float *)values[(long long)s * nworkers + w])[q];
        out[i] = acc;
    }
}

}  /* extern "C" */
