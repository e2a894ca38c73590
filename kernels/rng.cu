/*
 * rng.cu: the raw Philox4x32-10 stream of one tensor (kernels/hvdc_common.h), word for word the
 * CPU reference hvdc_stream_u32 in csrc/rng.c.  Used by tests and by codecs that want the draws.
 */
#include "hvdc_common.h"

/* out[i] = word i % 4 of hvdc_stream_block(seed, step, tensor_id, i / 4), for i in [0, n).
 * One thread per block of 4 elements (one Philox call); grid-stride loop, so any launch shape
 * gives the same output. */
extern "C" __global__ void hvdc_stream_u32(hvdc_u32 *__restrict__ out, hvdc_i64 n, hvdc_u64 seed,
                                           hvdc_u32 step, hvdc_u32 tensor_id)
{
    const hvdc_i64 nblocks = (n + 3) / 4;
    const hvdc_i64 stride = (hvdc_i64)gridDim.x * blockDim.x;
    /* One 16-byte store per thread keeps a warp's writes in whole 32-byte sectors; torch's
     * allocations are 512-byte aligned, but a caller may pass an offset view. */
    const bool vector_store = ((hvdc_u64)out & 15) == 0;
    for (hvdc_i64 b = (hvdc_i64)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += stride) {
        const hvdc_u32x4 r = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)b);
        const hvdc_i64 i = 4 * b;
        if (i + 4 <= n && vector_store) {
            reinterpret_cast<uint4 *>(out)[b] = make_uint4(r.v[0], r.v[1], r.v[2], r.v[3]);
        } else {
            for (int w = 0; w < 4 && i + w < n; ++w) out[i + w] = r.v[w];
        }
    }
}
