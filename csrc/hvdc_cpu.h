/* Exported entry points of the CPU reference library (loaded with ctypes by
 * hvd_compress/backends/cpu.py, which declares each signature once). Plain buffers only. */
#ifndef HVDC_CPU_H
#define HVDC_CPU_H
#include "hvdc_common.h"

void hvdc_philox_kat(const hvdc_u32 *ctr, hvdc_u32 k0, hvdc_u32 k1, hvdc_u32 *out);
void hvdc_stream_u32(hvdc_u32 *out, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                     int nthreads);
/* Quantizing codecs (csrc/quant.c); r (the error-feedback residual) may be NULL. */
void hvdc_tern_scales(const float *g, const float *r, hvdc_i64 n, hvdc_i64 bucket, float clip,
                      float *scales, float *buf, int nthreads);
void hvdc_tern_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, const float *scales,
                      hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, int nthreads);
void hvdc_tern_decode_acc(const hvdc_u8 *const *codes, const float *const *scales, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, float *out, int nthreads);
void hvdc_qsgd_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, int bits, hvdc_u64 seed,
                      hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, float *norms, int nthreads);
void hvdc_qsgd_decode_acc(const hvdc_u8 *const *codes, const float *const *norms, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, int bits, float *out, int nthreads);
void hvdc_fp16sr_encode(const float *g, float *r, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step,
                        hvdc_u32 tensor_id, unsigned short *values, int nthreads);
void hvdc_fp16_decode_acc(const unsigned short *const *values, int nworkers, hvdc_i64 n, float *out,
                          int nthreads);
#endif
