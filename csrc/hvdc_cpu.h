/* Exported entry points of the CPU reference library (loaded with ctypes by
 * hvd_compress/backends/cpu.py, which declares each signature once). Plain buffers only. */
#ifndef HVDC_CPU_H
#define HVDC_CPU_H
#include "hvdc_common.h"

void hvdc_philox_kat(const hvdc_u32 *ctr, hvdc_u32 k0, hvdc_u32 k1, hvdc_u32 *out);
void hvdc_stream_u32(hvdc_u32 *out, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                     int nthreads);

/* top-k sparsifier (csrc/topk.c) */
void hvdc_topk_sample(const float *g, const float *r, int has_r, float *out, hvdc_i64 stride,
                      hvdc_i64 m, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, int nthreads);
void hvdc_topk_count(const float *g, float *r, int has_r, hvdc_i64 n, const float *levels,
                     int nlevels, hvdc_i64 *counts, int nchunks, hvdc_i32 *buf_idx,
                     float *buf_val, hvdc_i64 cap, hvdc_i64 *fill, int nthreads);
void hvdc_topk_compact(const float *src, hvdc_i64 n, const float *t_hi_p, const float *t_lo_p,
                       hvdc_i64 budget, const hvdc_i64 *off_hi, const hvdc_i64 *off_band,
                       int nchunks, const float *buf_thr, const hvdc_i32 *buf_idx,
                       const float *buf_val, hvdc_i64 cap, const hvdc_i64 *fill, hvdc_i32 *idx,
                       float *val, int nthreads);
void hvdc_topk_finalize(const hvdc_i32 *idx, const float *cand, hvdc_i64 c, hvdc_i64 n, void *vals,
                        int fp16, float *r, int has_r, int nthreads);
void hvdc_topk_check(const hvdc_i32 *idx, hvdc_i64 c, hvdc_i64 n, int padded, hvdc_i64 *bad);
void hvdc_topk_scatter_add(const hvdc_i32 *idx, const void *vals, int fp16, hvdc_i64 c, hvdc_i64 n,
                           float *out, int nthreads);
void hvdc_topk_select_many(const float *g, float *r, int has_r, int nseg, const hvdc_i64 *seg,
                           hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *tensor_id,
                           const float *factors, float *samples, const hvdc_i64 *sample_off,
                           hvdc_i32 *buf_idx, float *buf_val, const hvdc_i64 *buf_off,
                           hvdc_i64 *fill, float *level, float *thr, hvdc_i64 *sel, int nthreads);
void hvdc_topk_compact_many(const float *src, float *r, int has_r, int nseg, const hvdc_i64 *seg,
                            const float *level, const float *thr, const hvdc_i64 *sel,
                            const hvdc_i32 *buf_idx, const float *buf_val,
                            const hvdc_i64 *buf_off, const hvdc_i64 *fill,
                            const hvdc_i64 *out_off, hvdc_i32 *idx, float *cand, void *vals,
                            int fp16, int nthreads);
void hvdc_topk_decode_many(int nseg, const hvdc_i64 *seg_first, const hvdc_i64 *seg_n,
                           const hvdc_i64 *seg_off, const hvdc_i64 *idx_addr,
                           const hvdc_i64 *val_addr, const hvdc_i64 *count, const hvdc_i64 *fp16,
                           float *out, hvdc_i64 *bad, int nthreads);
void hvdc_topk_normalize(const float *src, hvdc_i64 n, const float *divisor, float *out, int nthreads);

/* Sparse ternary codecs: AdaComp and STC (csrc/ternary.c). */
void hvdc_adacomp_select(const float *g, float *r, int has_r, hvdc_i64 n, hvdc_i64 bin, hvdc_i64 nbins,
                         float *gmax, hvdc_i64 *counts, float *scales, int nthreads);
void hvdc_adacomp_compact(const float *g, const float *h, hvdc_i64 n, hvdc_i64 bin, hvdc_i64 nbins,
                          const float *gmax, const hvdc_i64 *offsets, hvdc_i32 *idx, float *val,
                          int nthreads);
void hvdc_ternary_finalize(const hvdc_i32 *idx, const float *val, hvdc_i64 k, const float *scales,
                           hvdc_i64 bin, hvdc_u8 *signs, float *r, int has_r);
void hvdc_ternary_scatter_add(const hvdc_i32 *idx, const hvdc_u8 *signs, hvdc_i64 k,
                              const float *scales, hvdc_i64 bin, float *out);
hvdc_i64 hvdc_stc_encode(const hvdc_i32 *idx, const float *val, hvdc_i64 k, int b, hvdc_u8 *bits,
                         hvdc_i64 nbytes);
hvdc_i64 hvdc_stc_decode(const hvdc_u8 *bits, hvdc_i64 nbytes, hvdc_i64 k, int b, hvdc_i64 n,
                         hvdc_i32 *idx, hvdc_u8 *signs);

/* Quantizing codecs (csrc/quant.c); r (the error-feedback residual) may be NULL. */
void hvdc_tern_scales(const float *g, const float *r, hvdc_i64 n, hvdc_i64 bucket, float clip,
                      float *scales, float *buf, int nthreads);
void hvdc_tern_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, const float *scales,
                      hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, int nthreads);
void hvdc_tern_decode_acc(const hvdc_u8 *const *codes, const float *const *scales, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, float *out, int nthreads);
void hvdc_tern_encode_many(const float *g, float *r, hvdc_i64 nseg, const hvdc_i64 *seg, float clip,
                           hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *scales,
                           hvdc_u8 *codes, float *buf, int nthreads);
void hvdc_tern_decode_many(const hvdc_u8 *const *codes, const float *const *scales, int nworkers,
                           hvdc_i64 nseg, const hvdc_i64 *seg, float *out, int nthreads);
void hvdc_qsgd_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, int bits, int maxnorm,
                      hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, float *norms,
                      int nthreads);
void hvdc_qsgd_decode_acc(const hvdc_u8 *const *codes, const float *const *norms, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, int bits, float *out, int nthreads);
void hvdc_fp16sr_encode(const float *g, float *r, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step,
                        hvdc_u32 tensor_id, unsigned short *values, int nthreads);
void hvdc_fp16_decode_acc(const unsigned short *const *values, int nworkers, hvdc_i64 n, float *out,
                          int nthreads);

/* Sign codecs (csrc/signs.c): kind is HVDC_SIGN_ONEBIT, _SCALED or _PLAIN of kernels/signs.h. */
void hvdc_sign_stats(const float *g, const float *r, hvdc_i64 n, hvdc_i64 bucket, int kind,
                     float *sums, hvdc_i64 *counts, float *scales, int nthreads);
void hvdc_sign_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, int kind,
                      const float *scales, hvdc_u8 *bits, int nthreads);
void hvdc_sign_decode_acc(const hvdc_u8 *const *bits, const float *const *scales, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, int kind, float *out, int nthreads);
void hvdc_sign_encode_many(const float *g, float *r, hvdc_i64 nseg, const hvdc_i64 *seg, int kind,
                           float *sums, hvdc_i64 *counts, float *scales, hvdc_u8 *bits, int nthreads);
void hvdc_sign_decode_many(const hvdc_u8 *const *bits, const float *const *scales, int nworkers, hvdc_i64 nseg,
                           const hvdc_i64 *seg, int kind, float *out, int nthreads);

/* Random-k and the shared permutation (csrc/randk.c). */
void hvdc_perm_indices(hvdc_i64 *out, hvdc_i64 k, hvdc_i64 n, int bits, hvdc_u64 seed,
                       hvdc_u32 step, hvdc_u32 tensor_id, int nthreads);
void hvdc_randk_gather(float *src, int clear, hvdc_i64 k, hvdc_i64 n, int bits, float scale,
                       hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *values, int nthreads);
void hvdc_randk_scatter_acc(const float *const *values, int nworkers, hvdc_i64 k, hvdc_i64 n,
                            int bits, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *out,
                            int nthreads);
void hvdc_randk_gather_many(float *src, int clear, hvdc_i64 nseg, const hvdc_i64 *seg, hvdc_i64 nitems,
                            const float *scales, hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *values,
                            int nthreads);
void hvdc_randk_scatter_many(const float *const *values, int nworkers, hvdc_i64 nseg, const hvdc_i64 *seg,
                             hvdc_i64 nitems, hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *out,
                             int nthreads);

/* Sketched update (csrc/sketch.c). */
void hvdc_sketch_encode(const float *g, hvdc_i64 n, hvdc_i64 block, hvdc_i64 kept, const hvdc_i64 *sel,
                        int bits, int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step,
                        hvdc_u32 shared_id, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                        hvdc_u8 *codes, float *ranges, int nthreads);
void hvdc_sketch_decode_acc(const hvdc_u8 *const *codes, const float *const *ranges, int nworkers,
                            hvdc_i64 n, hvdc_i64 block, hvdc_i64 kept, const hvdc_i64 *sel, int bits,
                            int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step, hvdc_u32 shared_id,
                            float *out, int nthreads);

/* LAQ's innovation quantizer (csrc/laq.c). */
void hvdc_laq_absmax(const float *v, hvdc_i64 n, float *radius, int nthreads);
void hvdc_laq_encode(const float *v, hvdc_i64 n, float radius, int bits, hvdc_u8 *codes, int nthreads);
void hvdc_laq_decode_acc(const hvdc_u8 *const *codes, const float *const *radii, int nworkers,
                         hvdc_i64 n, int bits, float *out, int nthreads);

/* eSGD's element-wise step (csrc/esgd.c). */
void hvdc_esgd_step(const float *g, const float *r, const float *h, hvdc_i64 n, float beta,
                    float threshold, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, float *a,
                    float *keys, hvdc_u8 *over, int nthreads);
#endif
