/*
 * laq.cu: CUDA kernels of LAQ's innovation quantizer (hvd_compress/codecs/laq.py); csrc/laq.c is
 * the CPU reference.  Both evaluate the formulas of laq.h, so payloads and decoded sums are
 * bit-identical.  Grid-stride loops: any launch shape gives the same bits.
 *
 *   hvdc_laq_absmax      R = max |v_i| as a bit pattern: warp maxima, then atomicMax (order-free)
 *                        into *radius, which the caller zeroes first
 *   hvdc_laq_encode      one thread per code byte
 *   hvdc_laq_decode_acc  one thread per element: out_i += dQ_0(i) + dQ_1(i) + ... in worker order
 */
#include "laq.h"
#include "hvdc_warp.cuh"

extern "C" {

/* Blocks of whole warps (every lane reaches the shuffles). */
__global__ void hvdc_laq_absmax(const float *v, long long n, hvdc_u32 *radius)
{
    hvdc_u32 m = 0u;
    for (long long i = hvdc_thread_index(); i < n; i += (long long)gridDim.x * blockDim.x)
        m = hvdc_laq_absmax_bits(m, v[i]);
    for (int off = 16; off > 0; off >>= 1) {
        hvdc_u32 o = __shfl_xor_sync(HVDC_FULL, m, off);
        m = o > m ? o : m;
    }
    if ((threadIdx.x & 31) == 0) atomicMax(radius, m);
}

__global__ void hvdc_laq_encode(const float *v, long long n, const float *radius, int bits,
                                hvdc_u8 *codes)
{
    float r = radius[0], step = hvdc_laq_step(r, bits);
    long long nbytes = (n * bits + 7) / 8;
    for (long long b = hvdc_thread_index(); b < nbytes; b += (long long)gridDim.x * blockDim.x)
        codes[b] = hvdc_laq_byte(v, n, b, bits, r, step);
}

/* codes / radii: each worker's buffers (the workers that sent something). */
__global__ void hvdc_laq_decode_acc(const unsigned long long *codes, const unsigned long long *radii,
                                    int nworkers, long long n, int bits, float *out)
{
    for (long long i = hvdc_thread_index(); i < n; i += (long long)gridDim.x * blockDim.x) {
        float acc = out[i];
        for (int w = 0; w < nworkers; ++w) {
            float r = ((const float *)radii[w])[0];
            acc += hvdc_laq_value(hvdc_laq_load((const hvdc_u8 *)codes[w], i, bits), r,
                                  hvdc_laq_step(r, bits));
        }
        out[i] = acc;
    }
}

}  /* extern "C" */
