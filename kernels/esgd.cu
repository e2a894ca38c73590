/*
 * esgd.cu: CUDA kernel of eSGD's element-wise step (hvd_compress/codecs/esgd.py); csrc/esgd.c is
 * the CPU reference.  Both evaluate the formulas of esgd.h with the same Philox word per element,
 * so a, the keys and the flags are bit-identical.  One thread per Philox block of 4 elements,
 * grid-stride: any launch shape gives the same bits.
 */
#include "esgd.h"
#include "hvdc_warp.cuh"

extern "C" {

/* a_i = r_i beta + g_i, over_i = |a_i| > *threshold; with keys (not null), key_i of the
 * stream's word i and the importance h_i. */
__global__ void hvdc_esgd_step(const float *g, const float *r, const float *h, long long n, float beta,
                               const float *threshold, hvdc_u64 seed, hvdc_u32 step,
                               hvdc_u32 tensor_id, float *a, float *keys, hvdc_u8 *over)
{
    float thr = threshold[0];
    for (long long b = hvdc_thread_index(); 4 * b < n; b += (long long)gridDim.x * blockDim.x) {
        hvdc_u32x4 w = {{0u, 0u, 0u, 0u}};
        if (keys) w = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)b);
        for (int q = 0; q < 4 && 4 * b + q < n; ++q) {
            long long i = 4 * b + q;
            float v = hvdc_esgd_residual(g[i], r[i], beta);
            a[i] = v;
            over[i] = hvdc_esgd_over(v, thr);
            if (keys) keys[i] = hvdc_esgd_key(w.v[q], h[i]);
        }
    }
}

}  /* extern "C" */
