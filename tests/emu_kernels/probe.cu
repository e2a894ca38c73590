/*
 * probe.cu: small kernels that exercise the SIMT emulator (tests/emu_kernels/simt.h) itself:
 * warp collectives against their CUDA definitions, block dimensions, argument passing, and the
 * mistakes it must report (races, barrier divergence, deadlock, inconsistent warp collectives,
 * out-of-bounds and const writes, faults).  Used by tests/kernels/test_emulator.py only; plain CUDA, so
 * it compiles with NVRTC as well.
 */
#define FULL 0xFFFFFFFFu

/* out[t] = the warp collective `op` of in[t] with argument arg (one op for the whole launch). */
extern "C" __global__ void probe_warp_ops(const int *in, int *out, int op, int arg, int width)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    int v = in[t];
    int r = 0;
    switch (op) {
    case 0: r = __shfl_sync(FULL, v, arg, width); break;
    case 1: r = __shfl_xor_sync(FULL, v, arg, width); break;
    case 2: r = __shfl_up_sync(FULL, v, arg, width); break;
    case 3: r = __shfl_down_sync(FULL, v, arg, width); break;
    case 4: r = (int)__ballot_sync(FULL, v & 1); break;
    case 5: r = __any_sync(FULL, v == arg); break;
    case 6: r = __all_sync(FULL, v != arg); break;
    case 7: __syncwarp(); r = v; break;
    }
    out[t] = r;
}

/* Shuffles of 64-bit and float values. */
extern "C" __global__ void probe_shfl_types(const double *d, const unsigned long long *u, float *f,
                                            double *d_out, unsigned long long *u_out)
{
    int t = threadIdx.x;
    d_out[t] = __shfl_xor_sync(FULL, d[t], 5);
    u_out[t] = __shfl_down_sync(FULL, u[t], 3);
    f[t] = __shfl_sync(FULL, f[t], 31 - (int)(threadIdx.x & 31));
}

/* out[block] = sum of in over the block's threads: shared array, one barrier (or none). */
extern "C" __global__ void probe_block_sum(const float *in, float *out, int barrier)
{
    __shared__ float part[256];
    part[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    if (barrier) __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned i = 0; i < blockDim.x; ++i) s += part[i];
        out[blockIdx.x] = s;
    }
}

/* Every thread's coordinates, 3-D grid and block: out[global linear id] = 6 packed fields. */
extern "C" __global__ void probe_dims(int *out)
{
    unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int *o = out + 6 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}

/* Scalars of every width arrive intact. */
extern "C" __global__ void probe_scalars(long long a, int b, float c, unsigned long long d, unsigned char e,
                                         short f, double g, long long *out)
{
    out[0] = a; out[1] = b; out[2] = __float_as_int(c); out[3] = (long long)d; out[4] = e; out[5] = f;
    out[6] = (long long)(g * 4.0);
}

/* Pointer arrays (as the decode kernels get them): out[i] = sum over w of ((float *)ptrs[w])[i]. */
extern "C" __global__ void probe_pointer_array(const unsigned long long *ptrs, int nw, long long n, float *out)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.0f;
    for (int w = 0; w < nw; ++w) s += ((const float *)ptrs[w])[i];
    out[i] = s;
}

extern "C" __global__ __launch_bounds__(64) void probe_bounded(int *out)
{
    out[threadIdx.x] = 1;
}

extern "C" __global__ void probe_atomics(int *count, unsigned *bits)
{
    atomicAdd(count, 1);
    atomicOr(bits, 1u << (threadIdx.x & 31));
}

/* A __shared__ array inside a template: gcc keeps it out of the shared section (COMDAT), so the
 * emulator runs this module one block at a time (where a static is still block-private). */
template <int N>
__device__ float probe_tile_sum(const float *in)
{
    __shared__ float tile[N];
    tile[threadIdx.x] = in[blockIdx.x * N + threadIdx.x];
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.x == 0)
        for (int i = 0; i < N; ++i) s += tile[i];
    return s;
}

extern "C" __global__ void probe_template_shared(const float *in, float *out)
{
    float s = probe_tile_sum<128>(in);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

/* ---- mistakes the emulator must report -------------------------------------------------------- */

/* Threads >= live return before a __syncthreads() the others reach. */
extern "C" __global__ void probe_divergent_barrier(int *out, int live)
{
    if ((int)threadIdx.x >= live) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

/* Odd lanes wait at __syncthreads(), even lanes at a full-warp __syncwarp(): neither completes. */
extern "C" __global__ void probe_deadlock(int *out)
{
    if (threadIdx.x & 1) __syncthreads();
    else __syncwarp();
    out[threadIdx.x] = 1;
}

/* Half a warp shuffles, the other half votes, both with the full mask. */
extern "C" __global__ void probe_mismatch(int *out)
{
    int v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(FULL, v, 1);
    else v = (int)__ballot_sync(FULL, 1);
    out[threadIdx.x] = v;
}

/* Lanes 0..15 shuffle among themselves but read lane 20, outside their mask. */
extern "C" __global__ void probe_outside_mask(int *out)
{
    int v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_sync(0x0000FFFFu, v, 20);
    out[threadIdx.x] = v;
}

/* Lane 31 exits; the rest shuffle with the full mask. */
extern "C" __global__ void probe_exited_lane(int *out)
{
    if ((threadIdx.x & 31) == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL, (int)threadIdx.x, 1);
}

/* One element past (or before) the end of out. */
extern "C" __global__ void probe_oob(float *out, long long n, long long offset)
{
    if (threadIdx.x == 0) out[n + offset] = 1.0f;
}

/* Writes through a const pointer. */
extern "C" __global__ void probe_const_write(const float *in, float *out)
{
    if (threadIdx.x == 0) ((float *)in)[0] = 5.0f;
    out[threadIdx.x] = in[threadIdx.x];
}

/* Half the threads write shared memory; every thread reads its slot after the barrier. */
extern "C" __global__ void probe_uninit_shared(float *out)
{
    __shared__ float s[256];
    if (threadIdx.x < 128) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

/* A store far away from every buffer (unmapped memory). */
extern "C" __global__ void probe_wild(int *out, long long offset)
{
    if (threadIdx.x == 0) out[offset] = 1;
}

__device__ __noinline__ int probe_recurse(volatile int *p, int depth)
{
    volatile char pad[4096];
    pad[0] = (char)depth;
    return depth <= 0 ? pad[0] : probe_recurse(p, depth - 1) + pad[0] + *p;
}

/* Recursion deep enough to overflow a fiber's stack. */
extern "C" __global__ void probe_stack(int *out, int depth)
{
    out[threadIdx.x] = probe_recurse(out, depth);
}
