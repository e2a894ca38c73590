/* CPU reference of the random stream (kernels/hvdc_common.h): used by tests and by codecs. */
#include "hvdc_common.h"
#include "hvdc_cpu.h"

void hvdc_philox_kat(const hvdc_u32 *ctr, hvdc_u32 k0, hvdc_u32 k1, hvdc_u32 *out)
{
    hvdc_u32x4 c = {{ctr[0], ctr[1], ctr[2], ctr[3]}};
    hvdc_u32x4 r = hvdc_philox4x32_10(c, k0, k1);
    for (int i = 0; i < 4; ++i) out[i] = r.v[i];
}

void hvdc_stream_u32(hvdc_u32 *out, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                     int nthreads)
{
    hvdc_i64 nblocks = (n + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (hvdc_i64 b = 0; b < nblocks; ++b) {
        hvdc_u32x4 r = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)b);
        for (int w = 0; w < 4 && 4 * b + w < n; ++w) out[4 * b + w] = r.v[w];
    }
}
