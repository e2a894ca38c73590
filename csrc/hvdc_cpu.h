/* Exported entry points of the CPU reference library (loaded with ctypes by
 * hvd_compress/backends/cpu.py, which declares each signature once). Plain buffers only. */
#ifndef HVDC_CPU_H
#define HVDC_CPU_H
#include "hvdc_common.h"

void hvdc_philox_kat(const hvdc_u32 *ctr, hvdc_u32 k0, hvdc_u32 k1, hvdc_u32 *out);
void hvdc_stream_u32(hvdc_u32 *out, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                     int nthreads);
#endif
