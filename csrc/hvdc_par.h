/* hvdc_par.h: loop helpers of the CPU reference files.  The parallel driver (signs.c, randk.c,
 * sketch.c): work items [0, nitems) split into nthreads contiguous parts (OpenMP static
 * schedule), each part handed to a worker function with the job description.  Workers carry
 * the x86-64 target clones (AVX-512 / AVX2 / baseline, picked at load time; same IEEE results,
 * contraction is off): OpenMP's outlined region would not inherit them.  Results never depend on
 * the number of threads: every item is computed the same way whoever computes it. */
#ifndef HVDC_PAR_H
#define HVDC_PAR_H
#include "hvdc_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HVDC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HVDC_CLONES
#endif
#define HVDC_INLINE static inline __attribute__((always_inline))

/* Work below this many elements runs on the calling thread: forking costs more than it saves,
 * and far more when other processes hold the cores. */
#define HVDC_PARALLEL_MIN (1 << 16)

typedef void (*hvdc_worker)(const void *job, hvdc_i64 begin, hvdc_i64 end);

static inline hvdc_i64 hvdc_min64(hvdc_i64 a, hvdc_i64 b) { return a < b ? a : b; }

/* Run fn over [0, nitems) in nthreads parts; one part when `elements` (the work's size) is small. */
static inline void hvdc_parallel(hvdc_worker fn, const void *job, hvdc_i64 nitems, hvdc_i64 elements,
                                 int nthreads)
{
    if (nthreads < 1 || elements < HVDC_PARALLEL_MIN) nthreads = 1;
    if (nthreads > nitems) nthreads = nitems > 0 ? (int)nitems : 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < nthreads; ++t)
        fn(job, nitems * t / nthreads, nitems * (t + 1) / nthreads);
}

/* Philox words of blocks [first, first + nblocks) of a key's stream into u (4 per block: element
 * i of the stream takes word i % 4 of block i / 4): a simple loop that gcc vectorizes, so the
 * draws are computed apart from the loops that use them. */
HVDC_INLINE void hvdc_draws(hvdc_u32 *u, hvdc_i64 first, hvdc_i64 nblocks, hvdc_u64 seed, hvdc_u32 step,
                            hvdc_u32 tensor_id)
{
    for (hvdc_i64 k = 0; k < nblocks; ++k) {
        hvdc_u32x4 r = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)(first + k));
        u[4 * k] = r.v[0];
        u[4 * k + 1] = r.v[1];
        u[4 * k + 2] = r.v[2];
        u[4 * k + 3] = r.v[3];
    }
}

#endif /* HVDC_PAR_H */
