/*
 * sketch.cu: CUDA kernels of the sketched update (hvd_compress/codecs/sketch.py); csrc/sketch.c is
 * the CPU reference, with the same formulas (sketch.h) and the same FWHT stage order, so payloads
 * and decoded sums are bit-identical.
 *
 * One CUDA block per Hadamard block of B <= HVDC_SKETCH_MAX_BLOCK coordinates (grid-stride over
 * blocks), held in shared memory; min(256, max(32, B / 4)) threads (whole warps; the host
 * picks, every loop strides by blockDim.x):
 *
 *   hvdc_sketch_encode      load (zero padding) and sign flips, FWHT, min / max of the kept
 *                           coordinates (order-free), stochastic levels packed b bits each
 *   hvdc_sketch_decode_acc  the workers' dequantized coordinates summed in list order in the
 *                           rotated domain, one inverse FWHT, sign flips, / kB, added to out
 *
 * The kept coordinates sel (kB < B) come from hvdc_perm_indices of kernels/randk.cu; null keeps
 * every coordinate.  Code element e = blk * kB + q draws word e % 4 of Philox block e / 4 of the
 * per-rank key; padded coordinate i = blk * B + t draws its sign from the shared key.
 */
#include "sketch.h"
#include "hvdc_warp.cuh"

#define SKETCH_THREADS 256                    /* at most */
#define SKETCH_WARPS (SKETCH_THREADS / 32)

/* s[t] = D_t * v_t for the block at base (0 past n); B >= 4 or base == 0, so base + t is a
 * multiple of 4 and one Philox call serves 4 coordinates. */
__device__ __forceinline__ void hvdc_sketch_rotate_in(const float *g, long long n, long long base,
                                                      long long block, int rotate, hvdc_u64 seed,
                                                      hvdc_u32 step, hvdc_u32 tensor_id, float *s)
{
    for (long long t = 4 * threadIdx.x; t < block; t += 4 * blockDim.x) {
        hvdc_u32x4 u = {{0u, 0u, 0u, 0u}};
        if (rotate) u = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)((base + t) / 4));
        for (int q = 0; q < 4 && t + q < block; ++q) {
            float v = base + t + q < n ? g[base + t + q] : 0.0f;
            s[t + q] = rotate ? hvdc_sketch_flip(v, u.v[q]) : v;
        }
    }
}

/* The m stages of the FWHT of s[0, B), a block barrier after each. */
__device__ __forceinline__ void hvdc_sketch_fwht(float *s, long long block)
{
    for (long long h = 1; h < block; h <<= 1) {
        for (long long p = threadIdx.x; p < block / 2; p += blockDim.x) {
            long long i = hvdc_fwht_index(p, h);
            hvdc_fwht_pair(&s[i], &s[i + h]);
        }
        __syncthreads();
    }
}

extern "C" __global__ __launch_bounds__(SKETCH_THREADS) void
hvdc_sketch_encode(const float *g, long long n, long long block, long long kept, const long long *sel,
                   int bits, int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step,
                   hvdc_u32 shared_id, hvdc_u64 seed, hvdc_u32 step, hvdc_u32 tensor_id,
                   hvdc_u8 *codes, float *ranges)
{
    __shared__ float s[HVDC_SKETCH_MAX_BLOCK];
    __shared__ float warp_lo[SKETCH_WARPS], warp_hi[SKETCH_WARPS];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long long nblocks = (n + block - 1) / block;
    for (long long blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        hvdc_sketch_rotate_in(g, n, blk * block, block, rotate, shared_seed, shared_step, shared_id, s);
        __syncthreads();
        if (rotate) hvdc_sketch_fwht(s, block);
        float lo = hvdc_u2f(0x7F800000u), hi = -lo;
        for (long long q = threadIdx.x; q < kept; q += blockDim.x) {
            float z = hvdc_sketch_canon(s[sel ? sel[q] : q]);
            lo = fminf(lo, z);
            hi = fmaxf(hi, z);
        }
        lo = hvdc_butterfly_min(lo);
        hi = hvdc_butterfly_max(hi);
        if (lane == 0) {
            warp_lo[warp] = lo;
            warp_hi[warp] = hi;
        }
        __syncthreads();
        for (int w = 0; w < (int)blockDim.x / 32; ++w) {
            lo = fminf(lo, warp_lo[w]);
            hi = fmaxf(hi, warp_hi[w]);
        }
        if (threadIdx.x == 0) {
            ranges[2 * blk] = lo;
            ranges[2 * blk + 1] = hi;
        }
        float st = hvdc_sketch_step(lo, hi, bits);
        /* Units of 4 codes (one Philox call), 8 for 1 bit (one byte): a unit never shares a byte
         * with another thread's (kB is a multiple of 8 when there are several blocks). */
        int unit = bits == 1 ? 8 : 4;
        for (long long q0 = unit * threadIdx.x; q0 < kept; q0 += unit * blockDim.x) {
            long long e0 = blk * kept + q0;
            int cnt = kept - q0 < unit ? (int)(kept - q0) : unit;
            unsigned long long packed = 0;
            hvdc_u32x4 u = {{0u, 0u, 0u, 0u}};
            for (int q = 0; q < cnt; ++q) {
                if (q % 4 == 0) u = hvdc_stream_block(seed, step, tensor_id, (hvdc_u64)((e0 + q) / 4));
                float z = hvdc_sketch_canon(s[sel ? sel[q0 + q] : q0 + q]);
                packed |= (unsigned long long)hvdc_sketch_code(z, lo, st, bits, u.v[q % 4]) << (bits * q);
            }
            hvdc_u8 *o = codes + e0 * bits / 8;
            for (int k = 0; k < (cnt * bits + 7) / 8; ++k) o[k] = (hvdc_u8)(packed >> (8 * k));
        }
        __syncthreads();                      /* s and warp_lo/hi are reused by the next block */
    }
}

/* codes / ranges: each worker's buffers. */
extern "C" __global__ __launch_bounds__(SKETCH_THREADS) void
hvdc_sketch_decode_acc(const unsigned long long *codes, const unsigned long long *ranges, int nworkers,
                       long long n, long long block, long long kept, const long long *sel, int bits,
                       int rotate, hvdc_u64 shared_seed, hvdc_u32 shared_step, hvdc_u32 shared_id,
                       float *out)
{
    __shared__ float s[HVDC_SKETCH_MAX_BLOCK];
    long long nblocks = (n + block - 1) / block;
    for (long long blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        long long base = blk * block;
        for (long long t = threadIdx.x; t < block; t += blockDim.x) s[t] = 0.0f;
        __syncthreads();
        for (long long q = threadIdx.x; q < kept; q += blockDim.x) {
            float acc = 0.0f;
            for (int w = 0; w < nworkers; ++w) {
                const float *rg = (const float *)ranges[w] + 2 * blk;
                hvdc_u32 l = hvdc_sketch_load((const hvdc_u8 *)codes[w], blk * kept + q, bits);
                acc += hvdc_sketch_value(l, rg[0], rg[1], hvdc_sketch_step(rg[0], rg[1], bits), bits);
            }
            s[sel ? sel[q] : q] = acc;
        }
        __syncthreads();
        if (rotate) hvdc_sketch_fwht(s, block);
        for (long long t = 4 * threadIdx.x; t < block; t += 4 * blockDim.x) {
            hvdc_u32x4 u = {{0u, 0u, 0u, 0u}};
            if (rotate) u = hvdc_stream_block(shared_seed, shared_step, shared_id, (hvdc_u64)((base + t) / 4));
            for (int q = 0; q < 4 && t + q < block && base + t + q < n; ++q)
                out[base + t + q] = out[base + t + q] + hvdc_sketch_out(s[t + q], u.v[q], rotate, block, kept);
        }
        __syncthreads();
    }
}
