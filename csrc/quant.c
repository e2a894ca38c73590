/* CPU reference of the quantizing codecs (TernGrad, QSGD, stochastic fp16).
 *
 * Per-element formulas come from kernels/quant.h, shared with the CUDA kernels; this file only
 * decides the loop structure.  Loops are written for gcc's vectorizer: elements go in batches of
 * HVDC_QB (64 Philox blocks), each stage of a batch (draws, codes, packing) is a simple loop
 * over the batch, the codec kind and the error-feedback flag are compile-time constants after
 * inlining, and on x86-64 every hot loop is cloned for AVX-512 / AVX2 / baseline (picked at load
 * time; same IEEE results, since contraction is off).
 */
/* No FP traps to respect: lets gcc evaluate both sides of the formulas' selects in vector lanes
 * (if-conversion).  Values are unchanged: this is not -ffast-math (no reassociation,
 * contraction, or finite-math assumptions). */
#pragma GCC optimize("no-trapping-math")
#include <stddef.h>
#include "quant.h"
#include "hvdc_cpu.h"
#include "hvdc_par.h"

#define HVDC_QB 256        /* elements per batch (64 Philox blocks; docs/design.md, "Wider C batches") */
#define HVDC_TILE 8192     /* elements per OpenMP work item (multiple of HVDC_QB) */

typedef struct { hvdc_u64 seed; hvdc_u32 step, tensor_id; } qkey;

/* Philox words of elements [lo, lo + len), lo % 4 == 0: element i takes word i % 4 of block i/4. */
HVDC_INLINE void draws(hvdc_u32 *u, hvdc_i64 lo, int len, qkey key)
{
    hvdc_draws(u, lo / 4, (len + 3) / 4, key.seed, key.step, key.tensor_id);
}

/* Wire layout: fp16 values are uint16; b-bit codes are packed 8/b per byte, element i at bits
 * b * (i % (8/b)) of byte i * b / 8.  lo is a multiple of 4, so a batch starts on a byte.  */
HVDC_INLINE void pack(int kind, const hvdc_u32 *c, hvdc_i64 lo, int len, void *out)
{
    if (kind == HVDC_Q_FP16) {
        unsigned short *o = (unsigned short *)out + lo;
        for (int j = 0; j < len; ++j) o[j] = (unsigned short)c[j];
        return;
    }
    int b = hvdc_q_bits(kind), per = 8 / b;
    hvdc_u8 *o = (hvdc_u8 *)out + lo / per;
    for (int k = 0; k < (len + per - 1) / per; ++k) {
        hvdc_u32 byte = 0;
        for (int q = 0; q < per; ++q) byte |= c[per * k + q] << (b * q);
        o[k] = (hvdc_u8)byte;
    }
}

HVDC_INLINE void unpack(int kind, const void *in, hvdc_i64 lo, int len, hvdc_u32 *c)
{
    if (kind == HVDC_Q_FP16) {
        const unsigned short *p = (const unsigned short *)in + lo;
        for (int j = 0; j < len; ++j) c[j] = p[j];
        return;
    }
    int b = hvdc_q_bits(kind), per = 8 / b;
    const hvdc_u8 *p = (const hvdc_u8 *)in + lo / per;
    for (int k = 0; k < (len + per - 1) / per; ++k)
        for (int q = 0; q < per; ++q) c[per * k + q] = ((hvdc_u32)p[k] >> (b * q)) & ((1u << b) - 1u);
}

/* One batch of encoding with error feedback fused: v = g + r; code = C(v); r = v - D(code).
 * Codes past len (the tail of the last byte) are zero. */
HVDC_INLINE void encode_batch(int kind, int ef, const float *g, float *r, hvdc_i64 lo, int len,
                              float scale, qkey key, void *out)
{
    hvdc_u32 u[HVDC_QB], c[HVDC_QB];
    draws(u, lo, len, key);
    for (int j = 0; j < len; ++j) {
        float v = ef ? g[lo + j] + r[lo + j] : g[lo + j];
        c[j] = hvdc_q_code(kind, v, scale, u[j]);
        if (ef) r[lo + j] = v - hvdc_q_value(kind, c[j], scale);
    }
    for (int j = len; j < ((len + 3) & ~3); ++j) c[j] = 0;
    pack(kind, c, lo, len, out);
}

/* Elements [lo, hi) with one scale: batches of HVDC_QB starting at lo (lo % 4 == 0). */
HVDC_INLINE void encode_range(int kind, int ef, const float *g, float *r, hvdc_i64 lo, hvdc_i64 hi,
                              float scale, qkey key, void *out)
{
    for (hvdc_i64 b = lo; b < hi; b += HVDC_QB)
        encode_batch(kind, ef, g, r, b, (int)hvdc_min64(HVDC_QB, hi - b), scale, key, out);
}

/* ---- the one summation order (hvdc_warp_sum of hvdc_common.h) over v = g (+ r), transformed ----
 * mode 0: sum v; mode 1: sum (v - mean)^2; mode 2: sum v^2.  Also max |v| (order-free; as bits,
 * since non-negative floats order like their bit patterns and integer max vectorizes). */
HVDC_INLINE float warp_sum(int mode, int ef, const float *g, const float *r, hvdc_i64 lo,
                           hvdc_i64 len, float mean, float *absmax)
{
    float lane[32] = {0};
    hvdc_u32 mx[32] = {0};
    for (hvdc_i64 i = 0; i < len; i += 32) {
        int w = (int)hvdc_min64(32, len - i);
        for (int j = 0; j < w; ++j) {
            float v = ef ? g[lo + i + j] + r[lo + i + j] : g[lo + i + j];
            float d = mode == 1 ? v - mean : v;
            lane[j] += mode == 0 ? v : d * d;
            hvdc_u32 a = hvdc_f2u(v) & 0x7FFFFFFFu;
            mx[j] = a > mx[j] ? a : mx[j];
        }
    }
    if (absmax) {
        hvdc_u32 m = 0;
        for (int j = 0; j < 32; ++j) m = mx[j] > m ? mx[j] : m;
        *absmax = hvdc_u2f(m);
    }
    return hvdc_lane_combine(lane);
}

/* ---- parallel driver ----
 * Every loop is "items [0, nitems) split in nthreads contiguous parts" (OpenMP static schedule);
 * each part runs a worker that takes one job description.  Workers carry the target clones:
 * OpenMP's outlined region would not inherit them.  Inside a worker the codec kind and the
 * error-feedback flag are turned into constants, so each combination gets its own loop.     */
typedef struct {
    int kind, ef, mode, nworkers;
    const float *g;
    float *r;
    hvdc_i64 n, bucket;
    qkey key;
    const float *scales;        /* encode: per bucket */
    float *scales_out;          /* bucket maxima, QSGD norms */
    void *out;                  /* codes / fp16 values; decode: the dense fp32 output */
    float mean;                 /* sums: mode 1 */
    float *partial, *chunk_max; /* sums: per HVDC_SUM_CHUNK */
    const void *const *parts;   /* decode: per worker */
    const float *const *wscales;
} job;

typedef void (*worker_fn)(const job *j, hvdc_i64 begin, hvdc_i64 end);

static void run_parallel(worker_fn fn, const job *j, hvdc_i64 nitems, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < nthreads; ++t)
        fn(j, nitems * t / nthreads, nitems * (t + 1) / nthreads);
}

/* Chunk k of HVDC_SUM_CHUNK elements: partial[k] (and chunk_max[k]) per warp_sum. */
HVDC_CLONES static void w_sums(const job *j, hvdc_i64 k0, hvdc_i64 k1)
{
    for (hvdc_i64 k = k0; k < k1; ++k) {
        hvdc_i64 lo = k * HVDC_SUM_CHUNK, len = hvdc_min64(HVDC_SUM_CHUNK, j->n - lo);
        float *mx = j->chunk_max ? j->chunk_max + k : NULL;
        if (j->ef && j->mode == 0) j->partial[k] = warp_sum(0, 1, j->g, j->r, lo, len, 0.0f, mx);
        else if (j->ef) j->partial[k] = warp_sum(1, 1, j->g, j->r, lo, len, j->mean, mx);
        else if (j->mode == 0) j->partial[k] = warp_sum(0, 0, j->g, NULL, lo, len, 0.0f, mx);
        else j->partial[k] = warp_sum(1, 0, j->g, NULL, lo, len, j->mean, mx);
    }
}

/* Sum of m partial sums: hvdc_warp_sum over chunks of HVDC_SUM_CHUNK, repeated until one is left
 * (in place; m = n / 8192 is small). */
static float reduce_partials(float *p, hvdc_i64 m)
{
    while (m > 1) {
        hvdc_i64 k = 0;
        for (hvdc_i64 lo = 0; lo < m; lo += HVDC_SUM_CHUNK, ++k)
            p[k] = warp_sum(0, 0, p, NULL, lo, hvdc_min64(HVDC_SUM_CHUNK, m - lo), 0.0f, NULL);
        m = k;
    }
    return m ? p[0] : 0.0f;
}

/* Long sum of v = g (+ r) (mode 0, also chunk maxima of |v|) or of (v - mean)^2 (mode 1). */
static float long_sum(job *j, int mode, float mean, int nthreads)
{
    hvdc_i64 m = (j->n + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    j->mode = mode;
    j->mean = mean;
    run_parallel(w_sums, j, m, nthreads);
    return reduce_partials(j->partial, m);
}

/* Bucket maxima of |v| (the sum of squares warp_sum computes alongside is not used). */
HVDC_CLONES static void w_bucket_max(const job *j, hvdc_i64 b0, hvdc_i64 b1)
{
    for (hvdc_i64 b = b0; b < b1; ++b) {
        hvdc_i64 lo = b * j->bucket, len = hvdc_min64(j->bucket, j->n - lo);
        if (j->ef) warp_sum(2, 1, j->g, j->r, lo, len, 0.0f, j->scales_out + b);
        else warp_sum(2, 0, j->g, NULL, lo, len, 0.0f, j->scales_out + b);
    }
}

/* Tiles of HVDC_TILE elements, split where buckets end, each range with its bucket's scale. */
HVDC_INLINE void encode_tiles(int kind, int ef, const job *j, hvdc_i64 t0, hvdc_i64 t1)
{
    for (hvdc_i64 t = t0; t < t1; ++t) {
        hvdc_i64 end = hvdc_min64(j->n, (t + 1) * HVDC_TILE);
        for (hvdc_i64 lo = t * HVDC_TILE, hi; lo < end; lo = hi) {
            hi = hvdc_min64(end, (lo / j->bucket + 1) * j->bucket);
            encode_range(kind, ef, j->g, j->r, lo, hi, j->scales ? j->scales[lo / j->bucket] : 0.0f,
                         j->key, j->out);
        }
    }
}

HVDC_CLONES static void w_encode_scaled(const job *j, hvdc_i64 t0, hvdc_i64 t1)
{
    if (j->kind == HVDC_Q_TERN && j->ef) encode_tiles(HVDC_Q_TERN, 1, j, t0, t1);
    else if (j->kind == HVDC_Q_TERN) encode_tiles(HVDC_Q_TERN, 0, j, t0, t1);
    else if (j->ef) encode_tiles(HVDC_Q_FP16, 1, j, t0, t1);
    else encode_tiles(HVDC_Q_FP16, 0, j, t0, t1);
}

/* QSGD: per bucket, norm = sqrt(hvdc_warp_sum of v^2) (j->mode 1: max |v|), then the codes. */
HVDC_INLINE void qsgd_buckets(int kind, int ef, const job *j, hvdc_i64 b0, hvdc_i64 b1)
{
    for (hvdc_i64 b = b0; b < b1; ++b) {
        hvdc_i64 lo = b * j->bucket, hi = hvdc_min64(j->n, lo + j->bucket);
        float mx, sq = warp_sum(2, ef, j->g, j->r, lo, hi - lo, 0.0f, &mx);
        float norm = j->mode ? mx : sqrtf(sq);
        j->scales_out[b] = norm;
        encode_range(kind, ef, j->g, j->r, lo, hi, norm, j->key, j->out);
    }
}

HVDC_CLONES static void w_qsgd(const job *j, hvdc_i64 b0, hvdc_i64 b1)
{
    switch (j->kind * 2 + j->ef) {
    case HVDC_Q_QSGD2 * 2: qsgd_buckets(HVDC_Q_QSGD2, 0, j, b0, b1); break;
    case HVDC_Q_QSGD2 * 2 + 1: qsgd_buckets(HVDC_Q_QSGD2, 1, j, b0, b1); break;
    case HVDC_Q_QSGD4 * 2: qsgd_buckets(HVDC_Q_QSGD4, 0, j, b0, b1); break;
    case HVDC_Q_QSGD4 * 2 + 1: qsgd_buckets(HVDC_Q_QSGD4, 1, j, b0, b1); break;
    case HVDC_Q_QSGD8 * 2: qsgd_buckets(HVDC_Q_QSGD8, 0, j, b0, b1); break;
    default: qsgd_buckets(HVDC_Q_QSGD8, 1, j, b0, b1); break;
    }
}

/* out_i <- (((out_i + D_0,i) + D_1,i) + ...): workers in list order, batch by batch. */
HVDC_INLINE void decode_tiles(int kind, const job *j, hvdc_i64 t0, hvdc_i64 t1)
{
    float *out = (float *)j->out;
    for (hvdc_i64 t = t0; t < t1; ++t) {
        hvdc_i64 end = hvdc_min64(j->n, (t + 1) * HVDC_TILE);
        for (hvdc_i64 lo = t * HVDC_TILE, hi; lo < end; lo = hi) {
            hi = hvdc_min64(hvdc_min64(end, lo + HVDC_QB), (lo / j->bucket + 1) * j->bucket);
            int len = (int)(hi - lo);
            float acc[HVDC_QB];
            hvdc_u32 c[HVDC_QB];
            for (int i = 0; i < len; ++i) acc[i] = out[lo + i];
            for (int w = 0; w < j->nworkers; ++w) {
                float s = j->wscales ? j->wscales[w][lo / j->bucket] : 0.0f;
                unpack(kind, j->parts[w], lo, len, c);
                for (int i = 0; i < len; ++i) acc[i] += hvdc_q_value(kind, c[i], s);
            }
            for (int i = 0; i < len; ++i) out[lo + i] = acc[i];
        }
    }
}

HVDC_CLONES static void w_decode(const job *j, hvdc_i64 t0, hvdc_i64 t1)
{
    switch (j->kind) {
    case HVDC_Q_TERN: decode_tiles(HVDC_Q_TERN, j, t0, t1); break;
    case HVDC_Q_QSGD2: decode_tiles(HVDC_Q_QSGD2, j, t0, t1); break;
    case HVDC_Q_QSGD4: decode_tiles(HVDC_Q_QSGD4, j, t0, t1); break;
    case HVDC_Q_QSGD8: decode_tiles(HVDC_Q_QSGD8, j, t0, t1); break;
    default: decode_tiles(HVDC_Q_FP16, j, t0, t1); break;
    }
}

static hvdc_i64 ntiles(hvdc_i64 n) { return (n + HVDC_TILE - 1) / HVDC_TILE; }
static int qsgd_kind(int bits)
{
    return bits == 2 ? HVDC_Q_QSGD2 : bits == 4 ? HVDC_Q_QSGD4 : HVDC_Q_QSGD8;
}

/* ---- exported entry points (n > 0; bucket > 0 and a multiple of 4, bucket >= n: one scale) ---- */

/* TernGrad scales: s = max |v| over the tensor or bucket, v = g (+ r), clipped at clip * sigma
 * when clip > 0 (TernGrad's gradient clipping; sigma from the contract's summation order).
 * buf: scratch of 2 * ceil(n / HVDC_SUM_CHUNK) floats. */
void hvdc_tern_scales(const float *g, const float *r, hvdc_i64 n, hvdc_i64 bucket, float clip,
                      float *scales, float *buf, int nthreads)
{
    hvdc_i64 m = (n + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    job j = {.kind = HVDC_Q_TERN, .ef = r != NULL, .g = g, .r = (float *)r, .n = n, .bucket = bucket,
             .partial = buf, .chunk_max = buf + m, .scales_out = scales};
    float t = hvdc_u2f(0x7F800000u), s = 0.0f;
    if (clip > 0.0f || bucket >= n) {
        float total = long_sum(&j, 0, 0.0f, nthreads);   /* and the chunk maxima */
        if (clip > 0.0f)
            t = hvdc_tern_clip_threshold(long_sum(&j, 1, total / (float)n, nthreads), n, clip);
    }
    if (bucket >= n) {
        for (hvdc_i64 k = 0; k < m; ++k) s = buf[m + k] > s ? buf[m + k] : s;
        scales[0] = s;
    } else {
        run_parallel(w_bucket_max, &j, (n + bucket - 1) / bucket, nthreads);
    }
    for (hvdc_i64 b = 0; b < (n + bucket - 1) / bucket; ++b) scales[b] = scales[b] < t ? scales[b] : t;
}

void hvdc_tern_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, const float *scales,
                      hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, int nthreads)
{
    job j = {.kind = HVDC_Q_TERN, .ef = r != NULL, .g = g, .r = r, .n = n, .bucket = bucket,
             .key = {seed, step, tensor_id}, .scales = scales, .out = codes};
    run_parallel(w_encode_scaled, &j, ntiles(n), nthreads);
}

void hvdc_tern_decode_acc(const hvdc_u8 *const *codes, const float *const *scales, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, float *out, int nthreads)
{
    job j = {.kind = HVDC_Q_TERN, .n = n, .bucket = bucket, .out = out, .nworkers = nworkers,
             .parts = (const void *const *)codes, .wscales = scales};
    run_parallel(w_decode, &j, ntiles(n), nthreads);
}

/* A bucket's tensors in one call (TernGrad per tensor), seg a segment table (hvdc_common.h):
 * each tensor gets exactly what hvdc_tern_scales + hvdc_tern_encode give it alone, with its key
 * ids[s]; buf: scratch of 2 floats per chunk. */
void hvdc_tern_encode_many(const float *g, float *r, hvdc_i64 nseg, const hvdc_i64 *seg, float clip,
                           hvdc_u64 seed, hvdc_u32 step, const hvdc_i64 *ids, float *scales,
                           hvdc_u8 *codes, float *buf, int nthreads)
{
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s, off = t[HVDC_SEG_OFFSET], n = t[HVDC_SEG_N];
        float *rs = r ? r + off : NULL;
        hvdc_tern_scales(g + off, rs, n, n, clip, scales + s, buf + 2 * t[HVDC_SEG_CHUNK], nthreads);
        hvdc_tern_encode(g + off, rs, n, n, scales + s, seed, step, (hvdc_u32)ids[s], codes + t[HVDC_SEG_BLOCK4],
                         nthreads);
    }
}

/* hvdc_tern_decode_acc of each tensor of a segment table: codes / scales hold nworkers
 * addresses per tensor, tensor-major. */
void hvdc_tern_decode_many(const hvdc_u8 *const *codes, const float *const *scales, int nworkers,
                           hvdc_i64 nseg, const hvdc_i64 *seg, float *out, int nthreads)
{
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s;
        hvdc_tern_decode_acc(codes + s * nworkers, scales + s * nworkers, nworkers, t[HVDC_SEG_N], t[HVDC_SEG_N],
                             out + t[HVDC_SEG_OFFSET], nthreads);
    }
}

void hvdc_qsgd_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, int bits, int maxnorm,
                      hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id, hvdc_u8 *codes, float *norms,
                      int nthreads)
{
    job j = {.kind = qsgd_kind(bits), .ef = r != NULL, .mode = maxnorm != 0, .g = g, .r = r, .n = n,
             .bucket = bucket,
             .key = {seed, step, tensor_id}, .scales_out = norms, .out = codes};
    run_parallel(w_qsgd, &j, (n + bucket - 1) / bucket, nthreads);
}

void hvdc_qsgd_decode_acc(const hvdc_u8 *const *codes, const float *const *norms, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, int bits, float *out, int nthreads)
{
    job j = {.kind = qsgd_kind(bits), .n = n, .bucket = bucket, .out = out, .nworkers = nworkers,
             .parts = (const void *const *)codes, .wscales = norms};
    run_parallel(w_decode, &j, ntiles(n), nthreads);
}

void hvdc_fp16sr_encode(const float *g, float *r, hvdc_i64 n, hvdc_u64 seed, hvdc_u32 step,
                        hvdc_u32 tensor_id, unsigned short *values, int nthreads)
{
    job j = {.kind = HVDC_Q_FP16, .ef = r != NULL, .g = g, .r = r, .n = n, .bucket = n,
             .key = {seed, step, tensor_id}, .out = values};
    run_parallel(w_encode_scaled, &j, ntiles(n), nthreads);
}

void hvdc_fp16_decode_acc(const unsigned short *const *values, int nworkers, hvdc_i64 n, float *out,
                          int nthreads)
{
    job j = {.kind = HVDC_Q_FP16, .n = n, .bucket = n, .out = out, .nworkers = nworkers,
             .parts = (const void *const *)values};
    run_parallel(w_decode, &j, ntiles(n), nthreads);
}
