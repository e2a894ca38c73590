/* CPU reference of the sign codecs (1-bit SGD, EF-signSGD's scaled sign, signSGD): the steps of
 * kernels/signs.cu with the formulas of kernels/signs.h, so payloads, residuals and decoded sums
 * match bit for bit.
 *
 * Statistics: segment s = (bucket s / nchunks, chunk s % nchunks) is one hvdc_warp_sum, spelled
 * out with 32 lane accumulators and hvdc_lane_combine; then each bucket's nchunks partial sums are
 * reduced in chunks of HVDC_SUM_CHUNK until one is left, as hvdc_sign_reduce does.  Encoding and
 * decoding go through tiles of SIGN_TILE elements split where buckets end (buckets are multiples
 * of 32 elements, so a payload byte never straddles two), in batches of SIGN_BATCH. */
/* No FP traps to respect: lets gcc evaluate both sides of the selects in vector lanes.  Values
 * are unchanged (not -ffast-math). */
#pragma GCC optimize("no-trapping-math")
#include <stddef.h>
#include "signs.h"
#include "hvdc_par.h"
#include "hvdc_cpu.h"

#define SIGN_TILE 8192
#define SIGN_BATCH 64

typedef struct {
    int kind, nworkers;
    const float *g;
    float *r;
    hvdc_i64 n, bucket, nchunks;
    float *sums;                    /* stats: 2 per segment */
    hvdc_i64 *counts;               /* stats: 1 per segment (1-bit SGD only) */
    const float *scales;            /* encode: the wire scales */
    hvdc_u8 *bits;                  /* encode: the wire bits */
    const hvdc_u8 *const *wbits;    /* decode: per worker */
    const float *const *wscales;
    float *out;
} sjob;

HVDC_INLINE void segment_stats(int kind, int ef, const sjob *j, hvdc_i64 s)
{
    hvdc_i64 b = s / j->nchunks, lo = b * j->bucket + s % j->nchunks * HVDC_SUM_CHUNK;
    hvdc_i64 hi = hvdc_min64(hvdc_min64(lo + HVDC_SUM_CHUNK, (b + 1) * j->bucket), j->n);
    float l0[32] = {0}, l1[32] = {0};
    hvdc_i64 cnt = 0;
    for (hvdc_i64 i = lo; i < hi; i += 32) {
        int w = (int)hvdc_min64(32, hi - i);
        for (int q = 0; q < w; ++q) {
            float v = ef ? j->g[i + q] + j->r[i + q] : j->g[i + q];
            l0[q] += hvdc_sign_stat0(kind, v);
            l1[q] += hvdc_sign_stat1(kind, v);
            cnt += !hvdc_sign_bit(v);
        }
    }
    j->sums[2 * s] = hvdc_lane_combine(l0);
    j->sums[2 * s + 1] = hvdc_lane_combine(l1);
    if (j->counts) j->counts[s] = cnt;
}

HVDC_CLONES static void w_stats(const void *job, hvdc_i64 s0, hvdc_i64 s1)
{
    const sjob *j = (const sjob *)job;
    for (hvdc_i64 s = s0; s < s1; ++s) {
        if (j->kind == HVDC_SIGN_ONEBIT && j->r) segment_stats(HVDC_SIGN_ONEBIT, 1, j, s);
        else if (j->kind == HVDC_SIGN_ONEBIT) segment_stats(HVDC_SIGN_ONEBIT, 0, j, s);
        else if (j->r) segment_stats(HVDC_SIGN_SCALED, 1, j, s);
        else segment_stats(HVDC_SIGN_SCALED, 0, j, s);
    }
}

/* groups x m partials -> groups x 1, in place: what repeated hvdc_sign_reduce launches compute
 * (output o = (group, chunk c) is written after its inputs, which start at or after o). */
static void reduce_groups(float *sums, hvdc_i64 *counts, hvdc_i64 groups, hvdc_i64 m)
{
    while (m > 1) {
        hvdc_i64 mo = (m + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
        for (hvdc_i64 o = 0; o < groups * mo; ++o) {
            hvdc_i64 base = o / mo * m, lo = o % mo * HVDC_SUM_CHUNK;
            hvdc_i64 hi = hvdc_min64(lo + HVDC_SUM_CHUNK, m);
            float l0[32] = {0}, l1[32] = {0};
            hvdc_i64 cnt = 0;
            for (hvdc_i64 i = lo; i < hi; ++i) {
                l0[(i - lo) % 32] += sums[2 * (base + i)];
                l1[(i - lo) % 32] += sums[2 * (base + i) + 1];
                if (counts) cnt += counts[base + i];
            }
            sums[2 * o] = hvdc_lane_combine(l0);
            sums[2 * o + 1] = hvdc_lane_combine(l1);
            if (counts) counts[o] = cnt;
        }
        m = mo;
    }
}

/* One batch (lo % 8 == 0, len <= SIGN_BATCH) of bucket bkt: bits, error feedback.  Pointers and
 * scales in locals, so that no store through r can change them (vectorizable). */
HVDC_INLINE void encode_batch(int kind, int ef, const sjob *j, hvdc_i64 lo, int len, hvdc_i64 bkt)
{
    const float *g = j->g + lo;
    float *r = j->r ? j->r + lo : NULL;
    float s0 = hvdc_sign_scale(kind, j->scales, bkt, 0), s1 = hvdc_sign_scale(kind, j->scales, bkt, 1);
    hvdc_u32 bit[SIGN_BATCH];
    for (int q = 0; q < len; ++q) {
        float v = ef ? g[q] + r[q] : g[q];
        bit[q] = hvdc_sign_bit(v);
        if (ef) r[q] = v - hvdc_sign_value(kind, bit[q], s0, s1);
    }
    for (int q = len; q < ((len + 7) & ~7); ++q) bit[q] = 0;
    for (int k = 0; k < (len + 7) / 8; ++k) {
        hvdc_u32 byte = 0;
        for (int q = 0; q < 8; ++q) byte |= bit[8 * k + q] << q;
        j->bits[lo / 8 + k] = (hvdc_u8)byte;
    }
}

/* End of the batch that starts at lo: at most SIGN_BATCH elements, inside lo's tile and bucket. */
static inline hvdc_i64 batch_end(const sjob *j, hvdc_i64 lo)
{
    hvdc_i64 tile_end = hvdc_min64(j->n, (lo / SIGN_TILE + 1) * SIGN_TILE);
    return hvdc_min64(hvdc_min64(tile_end, lo + SIGN_BATCH), (lo / j->bucket + 1) * j->bucket);
}

HVDC_INLINE void encode_tiles(int kind, int ef, const sjob *j, hvdc_i64 t0, hvdc_i64 t1)
{
    for (hvdc_i64 lo = t0 * SIGN_TILE, hi, end = hvdc_min64(j->n, t1 * SIGN_TILE); lo < end; lo = hi) {
        hi = batch_end(j, lo);
        encode_batch(kind, ef, j, lo, (int)(hi - lo), lo / j->bucket);
    }
}

HVDC_CLONES static void w_encode(const void *job, hvdc_i64 t0, hvdc_i64 t1)
{
    const sjob *j = (const sjob *)job;
    if (j->kind == HVDC_SIGN_ONEBIT && j->r) encode_tiles(HVDC_SIGN_ONEBIT, 1, j, t0, t1);
    else if (j->kind == HVDC_SIGN_SCALED && j->r) encode_tiles(HVDC_SIGN_SCALED, 1, j, t0, t1);
    else encode_tiles(HVDC_SIGN_PLAIN, 0, j, t0, t1);      /* the bits do not depend on the kind */
}

/* out_i <- (((out_i + D_0(i)) + D_1(i)) + ...), workers in list order; the bits of a worker are
 * unpacked byte by byte first (lo % 8 == 0), then added in one vectorizable loop. */
HVDC_INLINE void decode_batch(int kind, const sjob *j, hvdc_i64 lo, int len, hvdc_i64 bkt)
{
    float acc[SIGN_BATCH];
    hvdc_u32 bit[SIGN_BATCH];
    float *out = j->out + lo;
    for (int q = 0; q < len; ++q) acc[q] = out[q];
    for (int w = 0; w < j->nworkers; ++w) {
        const float *s = j->wscales ? j->wscales[w] : NULL;
        float s0 = hvdc_sign_scale(kind, s, bkt, 0), s1 = hvdc_sign_scale(kind, s, bkt, 1);
        const hvdc_u8 *bytes = j->wbits[w] + lo / 8;
        for (int k = 0; k < (len + 7) / 8; ++k)
            for (int q = 0; q < 8; ++q) bit[8 * k + q] = ((hvdc_u32)bytes[k] >> q) & 1u;
        for (int q = 0; q < len; ++q) acc[q] += hvdc_sign_value(kind, bit[q], s0, s1);
    }
    for (int q = 0; q < len; ++q) out[q] = acc[q];
}

HVDC_INLINE void decode_tiles(int kind, const sjob *j, hvdc_i64 t0, hvdc_i64 t1)
{
    for (hvdc_i64 lo = t0 * SIGN_TILE, hi, end = hvdc_min64(j->n, t1 * SIGN_TILE); lo < end; lo = hi) {
        hi = batch_end(j, lo);
        decode_batch(kind, j, lo, (int)(hi - lo), lo / j->bucket);
    }
}

HVDC_CLONES static void w_decode(const void *job, hvdc_i64 t0, hvdc_i64 t1)
{
    const sjob *j = (const sjob *)job;
    if (j->kind == HVDC_SIGN_ONEBIT) decode_tiles(HVDC_SIGN_ONEBIT, j, t0, t1);
    else if (j->kind == HVDC_SIGN_SCALED) decode_tiles(HVDC_SIGN_SCALED, j, t0, t1);
    else decode_tiles(HVDC_SIGN_PLAIN, j, t0, t1);
}

static hvdc_i64 ntiles(hvdc_i64 n) { return (n + SIGN_TILE - 1) / SIGN_TILE; }

/* ---- exported entry points (n > 0; bucket > 0, a multiple of 32 or >= n) ---- */

/* Wire scales of every bucket of v = g (+ r).  sums: scratch of 2 * nbuckets * nchunks floats,
 * counts: nbuckets * nchunks (1-bit SGD; NULL for the scaled sign), nchunks =
 * ceil(min(bucket, n) / HVDC_SUM_CHUNK). */
void hvdc_sign_stats(const float *g, const float *r, hvdc_i64 n, hvdc_i64 bucket, int kind,
                     float *sums, hvdc_i64 *counts, float *scales, int nthreads)
{
    hvdc_i64 nb = (n + bucket - 1) / bucket, nchunks = (hvdc_min64(bucket, n) + HVDC_SUM_CHUNK - 1) / HVDC_SUM_CHUNK;
    sjob j = {.kind = kind, .g = g, .r = (float *)r, .n = n, .bucket = bucket, .nchunks = nchunks,
              .sums = sums, .counts = counts};
    hvdc_parallel(w_stats, &j, nb * nchunks, n, nthreads);
    reduce_groups(sums, counts, nb, nchunks);
    for (hvdc_i64 b = 0; b < nb; ++b)
        hvdc_sign_scales(kind, sums[2 * b], sums[2 * b + 1], counts ? counts[b] : 0,
                         hvdc_min64(bucket, n - b * bucket), scales + hvdc_sign_nscales(kind) * b);
}

void hvdc_sign_encode(const float *g, float *r, hvdc_i64 n, hvdc_i64 bucket, int kind,
                      const float *scales, hvdc_u8 *bits, int nthreads)
{
    sjob j = {.kind = kind, .g = g, .r = r, .n = n, .bucket = bucket, .scales = scales, .bits = bits};
    hvdc_parallel(w_encode, &j, ntiles(n), n, nthreads);
}

void hvdc_sign_decode_acc(const hvdc_u8 *const *bits, const float *const *scales, int nworkers,
                          hvdc_i64 n, hvdc_i64 bucket, int kind, float *out, int nthreads)
{
    sjob j = {.kind = kind, .n = n, .bucket = bucket, .nworkers = nworkers, .wbits = bits,
              .wscales = scales, .out = out};
    hvdc_parallel(w_decode, &j, ntiles(n), n * nworkers, nthreads);
}

/* A bucket's tensors in one call (one sign bucket per tensor), seg a segment table
 * (hvdc_common.h): each tensor gets exactly what hvdc_sign_stats (kinds with scales) and
 * hvdc_sign_encode give it alone.  Every tensor's scales come first: if one is not finite (a
 * sum overflowed) nothing is encoded and no residual changes (the caller raises, as the
 * one-tensor path does before encoding).  sums / counts: scratch of 2 floats / 1 count per
 * chunk (NULL without scales). */
void hvdc_sign_encode_many(const float *g, float *r, hvdc_i64 nseg, const hvdc_i64 *seg, int kind,
                           float *sums, hvdc_i64 *counts, float *scales, hvdc_u8 *bits, int nthreads)
{
    int ns = hvdc_sign_nscales(kind);
    for (hvdc_i64 s = 0; ns && s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s, off = t[HVDC_SEG_OFFSET];
        hvdc_sign_stats(g + off, r ? r + off : NULL, t[HVDC_SEG_N], t[HVDC_SEG_N], kind, sums + 2 * t[HVDC_SEG_CHUNK],
                        counts ? counts + t[HVDC_SEG_CHUNK] : NULL, scales + ns * s, nthreads);
    }
    for (hvdc_i64 i = 0; i < ns * nseg; ++i)
        if (!isfinite(scales[i])) return;
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s, off = t[HVDC_SEG_OFFSET];
        hvdc_sign_encode(g + off, r ? r + off : NULL, t[HVDC_SEG_N], t[HVDC_SEG_N], kind, ns ? scales + ns * s : NULL,
                         bits + t[HVDC_SEG_BYTE8], nthreads);
    }
}

/* hvdc_sign_decode_acc of each tensor of a segment table: bits / scales hold nworkers addresses
 * per tensor, tensor-major (scales NULL for signSGD). */
void hvdc_sign_decode_many(const hvdc_u8 *const *bits, const float *const *scales, int nworkers, hvdc_i64 nseg,
                           const hvdc_i64 *seg, int kind, float *out, int nthreads)
{
    for (hvdc_i64 s = 0; s < nseg; ++s) {
        const hvdc_i64 *t = seg + HVDC_SEG_COLS * s;
        hvdc_sign_decode_acc(bits + s * nworkers, scales ? scales + s * nworkers : NULL, nworkers, t[HVDC_SEG_N],
                             t[HVDC_SEG_N], kind, out + t[HVDC_SEG_OFFSET], nthreads);
    }
}
