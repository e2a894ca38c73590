/*
 * hvdc_warp.cuh: warp-level helpers shared by the CUDA kernels (NVRTC, and the SIMT emulator of
 * tests/emu_kernels/simt.h): the butterfly of hvdc_warp_sum (hvdc_common.h) and the global thread index.
 */
#ifndef HVDC_WARP_CUH
#define HVDC_WARP_CUH
#include "hvdc_common.h"

#define HVDC_FULL 0xFFFFFFFFu

/* hvdc_warp_sum's butterfly: v[j] += v[j ^ off] for off = 16 .. 1 (every lane ends with the
 * same bits).  Also for integers (exact in any order). */
template <class T>
__device__ __forceinline__ T hvdc_butterfly_sum(T v)
{
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(HVDC_FULL, v, off);
    return v;
}

/* Maxima and minima are order-free. */
__device__ __forceinline__ float hvdc_butterfly_max(float v)
{
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(HVDC_FULL, v, off));
    return v;
}

__device__ __forceinline__ float hvdc_butterfly_min(float v)
{
    for (int off = 16; off > 0; off >>= 1) v = fminf(v, __shfl_xor_sync(HVDC_FULL, v, off));
    return v;
}

__device__ __forceinline__ long long hvdc_thread_index()
{
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

#endif /* HVDC_WARP_CUH */
