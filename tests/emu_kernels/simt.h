/*
 * tests/emu_kernels/simt.h: a small SIMT emulator, so that the CUDA kernels (kernels/NAME.cu) run on the
 * CPU, compiled by the host C++ compiler (tests/emulator.py force-includes this
 * header; docs/emulator.md).
 *
 * It provides the subset of CUDA our kernels use, with CUDA's semantics where it matters:
 *   - every thread of a block is a fiber (its own stack, cooperatively scheduled on one OS thread);
 *   - a fiber runs until it reaches a barrier (__syncthreads, a warp collective) or exits; then the
 *     scheduler picks the next runnable fiber by one of three seeded policies (chosen per launch):
 *     uniformly at random; by random per-warp priorities (one warp runs ahead alone, the others
 *     starve: what an uneven warp scheduler does); by random per-thread priorities.  Priorities
 *     are redrawn at every __syncthreads.  So the order of threads between barriers varies with
 *     the seed, and a missing barrier shows up as a wrong result;
 *   - __syncthreads() is a block barrier that every thread of the block must reach (a thread that
 *     exits while others wait, or a barrier reached after some threads exited, is reported as
 *     barrier divergence);
 *   - warp intrinsics (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp) are 32-lane
 *     exchanges at a warp barrier: every lane of the mask deposits its value, then each reads
 *     its result; lanes that disagree on the operation or the mask, a mask naming exited or
 *     missing lanes, or a shuffle from a lane outside the mask are reported;
 *   - __shared__ variables live in one linker section ("hvdc_emu_shared"); each resident block
 *     has its own image of it, swapped in when one of its threads runs, filled with 0xFF bytes
 *     (NaN, -1) when the block starts, so reading shared memory before writing it shows;
 *   - blocks run in a random (seeded) order, `resident` of them interleaved at a time;
 *   - every emulated thread runs with the IEEE default floating-point environment (round to
 *     nearest, no flush-to-zero), whatever the caller's;
 *   - a fault (an access to unmapped memory, a fiber's stack overflowing into its guard page) is
 *     reported as an error of the launch instead of crashing the process.
 * What it cannot show (real concurrency, the GPU memory model, timing, NVRTC's code generation)
 * is listed in docs/emulator.md.
 *
 * The module (one kernels/<name>.cu plus a generated list of its kernels, HVDC_EMU_KERNEL) exports
 * a C API for ctypes (hvdc_emu_*); launches of one module must not overlap (Python holds a lock).
 */
#ifndef HVDC_EMU_SIMT_H
#define HVDC_EMU_SIMT_H

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <queue>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(HVDC_EMU_FORCE_UCONTEXT)
#include <ucontext.h>
#define HVDC_EMU_UCONTEXT 1
#endif

#define HVDC_EMU_API extern "C" __attribute__((visibility("default")))
#define HVDC_EMU_ABI_VERSION 1

/* ---- CUDA built-in types ------------------------------------------------------------------- */
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace hvdc_emu {

enum State : unsigned char { RUNNABLE, AT_SYNCTHREADS, AT_WARP, EXITED };
enum WarpOp : unsigned char { OP_SYNCWARP, OP_SHFL, OP_SHFL_XOR, OP_SHFL_UP, OP_SHFL_DOWN, OP_BALLOT,
                              OP_ANY, OP_ALL };
static const char *const OP_NAMES[] = {"__syncwarp", "__shfl_sync", "__shfl_xor_sync", "__shfl_up_sync",
                                       "__shfl_down_sync", "__ballot_sync", "__any_sync", "__all_sync"};

struct Block;

struct Fiber {
    void *sp;                 /* saved stack pointer (x86-64 switch) */
    char *stack_lo, *stack_hi;
#ifdef HVDC_EMU_UCONTEXT
    ucontext_t ctx;
#endif
    uint3 tid;                /* threadIdx */
    unsigned linear, warp, lane;
    Block *blk;
    State st;
    WarpOp op;                /* the warp collective this lane waits at */
    unsigned mask;
    int arg, width;
    uint64_t val, res;
    uint64_t prio;            /* scheduling priority (priority policies) */
};

/* A pending warp collective: the lanes of `mask` that have arrived so far. */
struct Group { unsigned mask, arrived; WarpOp op; };

struct Warp {
    unsigned exists;          /* lanes that exist (a partial last warp has fewer than 32) */
    unsigned exited;
    Group groups[32];
    int ngroups;
};

struct Block {
    uint3 idx;                /* blockIdx */
    Fiber *fibers;
    unsigned live, at_bar, exited;
    unsigned nwarps;
    Warp warps[32];
    unsigned char *shared;    /* this block's image of the shared-memory section */
    bool active;
    uint64_t prio;            /* priority of the block (priority policies) */
};

struct Rng {                  /* splitmix64: small, seedable, good enough to pick fibers */
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint32_t below(uint32_t n) { return (uint32_t)(((next() >> 32) * (uint64_t)n) >> 32); }
};

struct Stats { uint64_t resumes, syncthreads, warp_ops, blocks; };

/* How the next fiber is picked among the runnable ones. */
enum Policy : unsigned { POLICY_UNIFORM, POLICY_WARP_PRIORITY, POLICY_THREAD_PRIORITY, POLICY_MIXED };
static const char *const POLICY_NAMES[] = {"uniform", "warp-priority", "thread-priority", "mixed"};

struct ByPrio {
    bool operator()(const Fiber *a, const Fiber *b) const { return a->prio < b->prio; }
};

struct Launch {
    const char *name;
    dim3 grid, block;
    unsigned nthreads;
    void (*invoke)(void (*)(), const uint64_t *);
    void (*fn)();
    const uint64_t *args;
    Rng rng;
    Policy policy;
    std::vector<Fiber *> runnable;                                       /* uniform */
    std::priority_queue<Fiber *, std::vector<Fiber *>, ByPrio> ready;    /* priorities */
    bool failed;
    char err[2048];
    Stats stats;
};

/* One launch at a time per module (the Python side holds a lock), so plain globals. */
static Launch *g_launch;
static Fiber *g_cur;
static Block *g_shared_owner;
static volatile sig_atomic_t g_in_fiber;   /* a fiber runs: a fault is the kernel's */
#ifdef HVDC_EMU_UCONTEXT
static ucontext_t g_sched_ctx;
#else
static void *g_sched_sp;
#endif

}  // namespace hvdc_emu

/* ---- context switch ------------------------------------------------------------------------- */
#ifndef HVDC_EMU_UCONTEXT
/* hvdc_emu_switch(save, to): save the callee-saved registers, MXCSR and the x87 control word on
 * the current stack, store the stack pointer in *save, switch to the stack `to` and restore the
 * same from there.  A new fiber's stack is laid out by init_stack below. */
extern "C" void hvdc_emu_switch(void **save, void *to) __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .globl hvdc_emu_switch
    .hidden hvdc_emu_switch
    .type hvdc_emu_switch, @function
hvdc_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hvdc_emu_switch, .-hvdc_emu_switch
)");
#endif

namespace hvdc_emu {

extern "C" char __start_hvdc_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_hvdc_emu_shared[] __attribute__((weak, visibility("hidden")));

static inline size_t shared_bytes()
{
    return __start_hvdc_emu_shared ? (size_t)(__stop_hvdc_emu_shared - __start_hvdc_emu_shared) : 0;
}

static void fiber_main();

/* Suspend the running fiber and return to the scheduler. */
static inline void suspend()
{
    Fiber *f = g_cur;
#ifdef HVDC_EMU_UCONTEXT
    swapcontext(&f->ctx, &g_sched_ctx);
#else
    hvdc_emu_switch(&f->sp, g_sched_sp);
#endif
}

/* Run fiber f until it suspends. */
static inline void resume(Fiber *f)
{
    g_cur = f;
    g_in_fiber = 1;
#ifdef HVDC_EMU_UCONTEXT
    swapcontext(&g_sched_ctx, &f->ctx);
#else
    hvdc_emu_switch(&g_sched_sp, f->sp);
#endif
    g_in_fiber = 0;
}

static void fiber_entry();

/* A fresh start of fiber f at fiber_entry. */
static void init_stack(Fiber *f)
{
#ifdef HVDC_EMU_UCONTEXT
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack_lo;
    f->ctx.uc_stack.ss_size = (size_t)(f->stack_hi - f->stack_lo);
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, (void (*)())fiber_entry, 0);
#else
    /* From the top: a null return address for fiber_entry (16-byte aligned + 8, as after a call),
     * fiber_entry's address (popped by ret), six callee-saved registers, MXCSR/x87 control word. */
    uint64_t *sp = (uint64_t *)((uintptr_t)f->stack_hi & ~(uintptr_t)15);
    *--sp = 0;
    *--sp = (uint64_t)(uintptr_t)&fiber_entry;
    for (int i = 0; i < 6; ++i) *--sp = 0;
    *--sp = 0x1F80ull | (0x037Full << 32);     /* MXCSR default (IEEE, no FTZ/DAZ), x87 CW default */
    f->sp = sp;
#endif
}

/* Report an error from inside a fiber: the launch stops, this fiber is never resumed. */
[[noreturn]] __attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    Launch *L = g_launch;
    if (!L->failed) {
        va_list ap;
        va_start(ap, fmt);
        int n = snprintf(L->err, sizeof L->err, "%s, block (%u,%u,%u), thread (%u,%u,%u): ", L->name,
                         g_cur->blk->idx.x, g_cur->blk->idx.y, g_cur->blk->idx.z, g_cur->tid.x,
                         g_cur->tid.y, g_cur->tid.z);
        if (n > 0 && (size_t)n < sizeof L->err) vsnprintf(L->err + n, sizeof L->err - n, fmt, ap);
        va_end(ap);
        L->failed = true;
    }
    suspend();
    abort();  /* not reached: a failed launch resumes nothing */
}

static inline void make_runnable(Fiber *f)
{
    f->st = RUNNABLE;
    if (g_launch->policy == POLICY_UNIFORM) g_launch->runnable.push_back(f);
    else g_launch->ready.push(f);
}

static inline bool any_runnable(Launch &L)
{
    return L.policy == POLICY_UNIFORM ? !L.runnable.empty() : !L.ready.empty();
}

static inline Fiber *next_runnable(Launch &L)
{
    if (L.policy != POLICY_UNIFORM) {
        Fiber *f = L.ready.top();
        L.ready.pop();
        return f;
    }
    uint32_t i = L.rng.below((uint32_t)L.runnable.size());
    Fiber *f = L.runnable[i];
    L.runnable[i] = L.runnable.back();
    L.runnable.pop_back();
    return f;
}

/* New random priorities for the threads of block b: block, then warp, then lane (warp policy),
 * or block, then thread (thread policy).  Higher runs first. */
static void draw_priorities(Block &b)
{
    Launch &L = *g_launch;
    if (L.policy == POLICY_UNIFORM) return;
    uint64_t warp_prio[32];
    for (unsigned w = 0; w < b.nwarps; ++w) warp_prio[w] = L.rng.next() >> 44;
    for (unsigned t = 0; t < L.nthreads; ++t) {
        Fiber &f = b.fibers[t];
        uint64_t low = L.policy == POLICY_WARP_PRIORITY ? warp_prio[f.warp] << 20 | (L.rng.next() >> 44)
                                                        : L.rng.next() >> 24;
        f.prio = b.prio << 40 | low;
    }
}

static void thread_exit()
{
    Fiber *f = g_cur;
    Block *b = f->blk;
    f->st = EXITED;
    b->live--;
    b->exited++;
    Warp &w = b->warps[f->warp];
    w.exited |= 1u << f->lane;
    if (b->at_bar)
        fail("exited while %u thread(s) of its block wait at __syncthreads() (barrier divergence)",
             b->at_bar);
    for (int g = 0; g < w.ngroups; ++g)
        if (w.groups[g].mask >> f->lane & 1u)
            fail("exited while lanes 0x%08x of its warp wait for it at %s (mask 0x%08x)",
                 w.groups[g].arrived, OP_NAMES[w.groups[g].op], w.groups[g].mask);
}

static void fiber_entry()
{
    Launch *L = g_launch;
    L->invoke(L->fn, L->args);
    thread_exit();
    suspend();
    abort();  /* an exited fiber is never resumed */
}

static inline void syncthreads()
{
    Fiber *f = g_cur;
    Block *b = f->blk;
    g_launch->stats.syncthreads++;
    if (b->exited)
        fail("__syncthreads() after %u thread(s) of the block exited (barrier divergence)", b->exited);
    f->st = AT_SYNCTHREADS;
    if (++b->at_bar == g_launch->nthreads) {
        b->at_bar = 0;
        draw_priorities(*b);
        for (unsigned t = 0; t < g_launch->nthreads; ++t) make_runnable(&b->fibers[t]);
    }
    suspend();
}

/* Source lane of a shuffle for lane l, or -1 when the lane keeps its own value. */
static inline int shfl_source(WarpOp op, int l, int arg, int width)
{
    int base = l & ~(width - 1);
    switch (op) {
    case OP_SHFL: return base + (arg & (width - 1));
    case OP_SHFL_XOR: { int s = l ^ arg; return s < base + width ? s : -1; }
    case OP_SHFL_UP: { int s = l - arg; return s >= base ? s : -1; }
    case OP_SHFL_DOWN: { int s = l + arg; return s < base + width ? s : -1; }
    default: return -1;
    }
}

/* Every lane of group g has arrived: compute each lane's result and release them. */
static void complete_group(Block *b, Warp &w, int g)
{
    Group grp = w.groups[g];
    w.groups[g] = w.groups[--w.ngroups];
    Fiber *lanes = b->fibers + 32 * (size_t)(&w - b->warps);
    unsigned votes = 0;
    for (int l = 0; l < 32; ++l)
        if (grp.mask >> l & 1u) votes |= (lanes[l].val != 0 ? 1u : 0u) << l;
    for (int l = 0; l < 32; ++l) {
        if (!(grp.mask >> l & 1u)) continue;
        Fiber &f = lanes[l];
        switch (grp.op) {
        case OP_BALLOT: f.res = votes; break;
        case OP_ANY: f.res = votes != 0; break;
        case OP_ALL: f.res = votes == grp.mask; break;
        case OP_SYNCWARP: f.res = 0; break;
        default: {
            int s = shfl_source(grp.op, l, f.arg, f.width);
            if (s >= 0 && !(grp.mask >> s & 1u)) {
                g_cur = &f;  /* name the lane that reads the undefined value */
                fail("%s (mask 0x%08x) reads lane %d, which is not in the mask (undefined value)",
                     OP_NAMES[grp.op], grp.mask, s);
            }
            f.res = s >= 0 ? lanes[s].val : f.val;
        }
        }
    }
    for (int l = 0; l < 32; ++l)
        if (grp.mask >> l & 1u) make_runnable(&lanes[l]);
}

static inline uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t val, int arg, int width)
{
    Fiber *f = g_cur;
    Block *b = f->blk;
    Warp &w = b->warps[f->warp];
    unsigned bit = 1u << f->lane;
    g_launch->stats.warp_ops++;
    if (!(mask & bit)) fail("%s with mask 0x%08x, which does not include the calling lane %u", OP_NAMES[op], mask, f->lane);
    if (mask & ~w.exists)
        fail("%s with mask 0x%08x names lanes that do not exist (warp %u has lanes 0x%08x)", OP_NAMES[op],
             mask, f->warp, w.exists);
    if (mask & w.exited)
        fail("%s with mask 0x%08x waits for lanes 0x%08x that exited", OP_NAMES[op], mask, mask & w.exited);
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail("%s with width %d (must be a power of 2 up to 32)", OP_NAMES[op], width);
    int g = 0;
    for (; g < w.ngroups; ++g) {
        Group &grp = w.groups[g];
        if (grp.mask == mask) break;
        if (grp.mask & mask)
            fail("%s with mask 0x%08x while lanes 0x%08x wait at %s with the overlapping mask 0x%08x",
                 OP_NAMES[op], mask, grp.arrived, OP_NAMES[grp.op], grp.mask);
    }
    if (g == w.ngroups) w.groups[w.ngroups++] = Group{mask, 0, op};
    Group &grp = w.groups[g];
    if (grp.op != op)
        fail("%s (mask 0x%08x) while lanes 0x%08x of its warp wait at %s with the same mask", OP_NAMES[op],
             mask, grp.arrived, OP_NAMES[grp.op]);
    f->st = AT_WARP;
    f->op = op;
    f->mask = mask;
    f->val = val;
    f->arg = arg;
    f->width = width;
    grp.arrived |= bit;
    if (grp.arrived == grp.mask) complete_group(b, w, g);
    suspend();
    return f->res;
}

template <class T>
static inline uint64_t to_bits(T v)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}

template <class T>
static inline T from_bits(uint64_t u)
{
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

}  // namespace hvdc_emu

/* ---- the CUDA surface the kernels see ------------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __constant__ static
/* Shared variables: one section; each resident block has its own image of it (see Block). */
#define __shared__ static __attribute__((section("hvdc_emu_shared")))
#define threadIdx (::hvdc_emu::g_cur->tid)
#define blockIdx (::hvdc_emu::g_cur->blk->idx)
#define blockDim (::hvdc_emu::g_launch->block)
#define gridDim (::hvdc_emu::g_launch->grid)
#define warpSize 32

static inline void __syncthreads() { ::hvdc_emu::syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xFFFFFFFFu)
{
    ::hvdc_emu::warp_collective(::hvdc_emu::OP_SYNCWARP, mask, 0, 0, 32);
}
/* Memory fences order nothing here: the emulation is sequentially consistent. */
static inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
static inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    return ::hvdc_emu::from_bits<T>(::hvdc_emu::warp_collective(::hvdc_emu::OP_SHFL, mask, ::hvdc_emu::to_bits(v), src, width));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    return ::hvdc_emu::from_bits<T>(::hvdc_emu::warp_collective(::hvdc_emu::OP_SHFL_XOR, mask, ::hvdc_emu::to_bits(v), lane_mask, width));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return ::hvdc_emu::from_bits<T>(::hvdc_emu::warp_collective(::hvdc_emu::OP_SHFL_UP, mask, ::hvdc_emu::to_bits(v), (int)delta, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    return ::hvdc_emu::from_bits<T>(::hvdc_emu::warp_collective(::hvdc_emu::OP_SHFL_DOWN, mask, ::hvdc_emu::to_bits(v), (int)delta, width));
}
static inline unsigned __ballot_sync(unsigned mask, int pred)
{
    return (unsigned)::hvdc_emu::warp_collective(::hvdc_emu::OP_BALLOT, mask, pred != 0, 0, 32);
}
static inline int __any_sync(unsigned mask, int pred)
{
    return (int)::hvdc_emu::warp_collective(::hvdc_emu::OP_ANY, mask, pred != 0, 0, 32);
}
static inline int __all_sync(unsigned mask, int pred)
{
    return (int)::hvdc_emu::warp_collective(::hvdc_emu::OP_ALL, mask, pred != 0, 0, 32);
}

/* Integer and bit-cast intrinsics. */
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned int __brev(unsigned int x)
{
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    return __builtin_bswap32(x);
}
static inline unsigned int __float_as_uint(float x) { return ::hvdc_emu::from_bits<unsigned int>(::hvdc_emu::to_bits(x)); }
static inline float __uint_as_float(unsigned int x) { return ::hvdc_emu::from_bits<float>(x); }
static inline int __float_as_int(float x) { return ::hvdc_emu::from_bits<int>(::hvdc_emu::to_bits(x)); }
static inline float __int_as_float(int x) { return ::hvdc_emu::from_bits<float>((uint32_t)x); }
template <class T> static inline T __ldg(const T *p) { return *p; }

/* CUDA's integer min/max overloads (float ones: fminf/fmaxf from math.h). */
#define HVDC_EMU_MINMAX(T) \
    static inline T min(T a, T b) { return a < b ? a : b; } \
    static inline T max(T a, T b) { return a > b ? a : b; }
HVDC_EMU_MINMAX(int)
HVDC_EMU_MINMAX(unsigned int)
HVDC_EMU_MINMAX(long long)
HVDC_EMU_MINMAX(unsigned long long)
HVDC_EMU_MINMAX(float)
HVDC_EMU_MINMAX(double)
#undef HVDC_EMU_MINMAX

/* Atomics: a read-modify-write is never interrupted by another fiber (one OS thread, switches
 * only at barriers), which is what an atomic guarantees. */
template <class T> static inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }
template <class T> static inline T atomicSub(T *p, T v) { T o = *p; *p = o - v; return o; }
template <class T> static inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }
template <class T> static inline T atomicMin(T *p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <class T> static inline T atomicMax(T *p, T v) { T o = *p; *p = v > o ? v : o; return o; }
template <class T> static inline T atomicOr(T *p, T v) { T o = *p; *p = o | v; return o; }
template <class T> static inline T atomicAnd(T *p, T v) { T o = *p; *p = o & v; return o; }
template <class T> static inline T atomicCAS(T *p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }

/* ---- scheduler, registry and the C API ------------------------------------------------------ */
namespace hvdc_emu {

struct KernelInfo {
    const char *name;
    void (*fn)();
    void (*invoke)(void (*)(), const uint64_t *);
    std::string params;       /* "kind:elem:C type" per parameter, ';'-separated */
    int nparams;
    unsigned max_threads;     /* __launch_bounds__, 0 if none */
};

static std::vector<KernelInfo> &registry()
{
    static std::vector<KernelInfo> r;  /* not in the shared section: not a __shared__ variable */
    return r;
}

template <class T>
static std::string type_name()
{
    std::string s = __PRETTY_FUNCTION__;       /* "... type_name() [with T = const float*; ...]" */
    size_t a = s.find("T = ");
    if (a == std::string::npos) return "?";
    a += 4;
    size_t e = s.find_first_of(";]", a);
    return s.substr(a, e - a);
}

template <class T>
static const char *elem_code()
{
    typedef typename std::remove_cv<T>::type U;
    if constexpr (std::is_void<U>::value) return "void";
    else if constexpr (std::is_pointer<U>::value) return "ptr";
    else if constexpr (std::is_floating_point<U>::value) return sizeof(U) == 4 ? "f32" : sizeof(U) == 8 ? "f64" : "other";
    else if constexpr (std::is_integral<U>::value) {
        const char *const s[] = {"i8", "i16", "?", "i32", "?", "?", "?", "i64"};
        const char *const u[] = {"u8", "u16", "?", "u32", "?", "?", "?", "u64"};
        return std::is_signed<U>::value ? s[sizeof(U) - 1] : u[sizeof(U) - 1];
    }
    else return "other";
}

template <class T>
static std::string param_code()
{
    if (std::is_pointer<T>::value) {
        typedef typename std::remove_pointer<T>::type E;
        return std::string(std::is_const<E>::value ? "pc:" : "p:") + elem_code<E>() + ":" + type_name<T>();
    }
    return std::string("s:") + elem_code<T>() + ":" + type_name<T>();
}

template <class T>
static T unpack(uint64_t raw)
{
    if constexpr (std::is_pointer<T>::value) return reinterpret_cast<T>(static_cast<uintptr_t>(raw));
    else return from_bits<T>(raw);
}

template <class... A, size_t... I>
static void call(void (*fn)(A...), const uint64_t *a, std::index_sequence<I...>)
{
    fn(unpack<A>(a[I])...);
}

template <class... A>
static void invoke(void (*fn)(), const uint64_t *a)
{
    call(reinterpret_cast<void (*)(A...)>(fn), a, std::index_sequence_for<A...>{});
}

template <class... A>
static int add_kernel(const char *name, void (*fn)(A...), unsigned max_threads)
{
    KernelInfo k;
    k.name = name;
    k.fn = reinterpret_cast<void (*)()>(fn);
    k.invoke = &invoke<A...>;
    std::string p;
    for (const std::string &s : {param_code<A>()..., std::string()})
        if (!s.empty()) p += (p.empty() ? "" : ";") + s;
    k.params = p;
    k.nparams = (int)sizeof...(A);
    k.max_threads = max_threads;
    registry().push_back(k);
    return (int)registry().size();
}

/* The fiber pool: stacks with a guard page below each, kept between launches. */
struct Pool {
    std::vector<Fiber> fibers;
    char *mem = nullptr;
    size_t bytes = 0, stack = 0;
};

static Pool &pool() { static Pool p; return p; }

static bool reserve(size_t n, size_t stack_bytes)
{
    Pool &p = pool();
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    stack_bytes = (stack_bytes + page - 1) / page * page;
    if (p.fibers.size() >= n && p.stack == stack_bytes) return true;
    if (p.mem) munmap(p.mem, p.bytes);
    size_t guard = 16 * page;          /* stack-clash probing (-fstack-clash-protection) hits it */
    size_t each = stack_bytes + guard;
    p.bytes = each * n;
    p.mem = (char *)mmap(nullptr, p.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p.mem == MAP_FAILED) { p.mem = nullptr; p.fibers.clear(); return false; }
    p.fibers.assign(n, Fiber());
    p.stack = stack_bytes;
    for (size_t i = 0; i < n; ++i) {
        char *lo = p.mem + i * each;
        mprotect(lo, guard, PROT_NONE);    /* a stack overflow faults instead of corrupting */
        p.fibers[i].stack_lo = lo + guard;
        p.fibers[i].stack_hi = lo + each;
    }
    return true;
}

static void start_block(Block &b, uint64_t linear)
{
    Launch &L = *g_launch;
    b.idx.x = (unsigned)(linear % L.grid.x);
    b.idx.y = (unsigned)(linear / L.grid.x % L.grid.y);
    b.idx.z = (unsigned)(linear / ((uint64_t)L.grid.x * L.grid.y));
    b.live = L.nthreads;
    b.at_bar = b.exited = 0;
    b.nwarps = (L.nthreads + 31) / 32;
    for (unsigned w = 0; w < b.nwarps; ++w) {
        unsigned n = L.nthreads - 32 * w;
        b.warps[w].exists = n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u;
        b.warps[w].exited = 0;
        b.warps[w].ngroups = 0;
    }
    if (b.shared) memset(b.shared, 0xFF, shared_bytes());
    if (g_shared_owner == &b) g_shared_owner = nullptr;    /* its image is stale now */
    b.prio = L.rng.next() >> 44;
    for (unsigned t = 0; t < L.nthreads; ++t) {
        Fiber &f = b.fibers[t];
        f.tid.x = t % L.block.x;
        f.tid.y = t / L.block.x % L.block.y;
        f.tid.z = t / (L.block.x * L.block.y);
        f.linear = t;
        f.warp = t / 32;
        f.lane = t % 32;
        f.blk = &b;
        init_stack(&f);
    }
    draw_priorities(b);
    for (unsigned t = 0; t < L.nthreads; ++t) make_runnable(&b.fibers[t]);
    b.active = true;
    L.stats.blocks++;
}

/* Make b's image of the shared section the live one. */
static inline void own_shared(Block *b)
{
    size_t n = shared_bytes();
    if (!n || g_shared_owner == b) return;
    if (g_shared_owner) memcpy(g_shared_owner->shared, __start_hvdc_emu_shared, n);
    memcpy(__start_hvdc_emu_shared, b->shared, n);
    g_shared_owner = b;
}

static void describe_deadlock(Launch &L, std::vector<Block> &blocks)
{
    for (Block &b : blocks) {
        if (!b.active) continue;
        unsigned at_bar = 0, at_warp = 0, exited = 0;
        std::string ops;
        for (unsigned t = 0; t < L.nthreads; ++t) {
            Fiber &f = b.fibers[t];
            if (f.st == AT_SYNCTHREADS) at_bar++;
            else if (f.st == EXITED) exited++;
            else if (f.st == AT_WARP) {
                if (at_warp++ < 4) {
                    char s[160];
                    snprintf(s, sizeof s, "%sthread %u at %s (mask 0x%08x)", ops.empty() ? "" : ", ", t,
                             OP_NAMES[f.op], f.mask);
                    ops += s;
                }
            }
        }
        snprintf(L.err, sizeof L.err,
                 "%s, block (%u,%u,%u): deadlock: %u thread(s) wait at __syncthreads(), %u at warp "
                 "collectives (%s%s), %u exited",
                 L.name, b.idx.x, b.idx.y, b.idx.z, at_bar, at_warp, ops.c_str(), at_warp > 4 ? ", ..." : "",
                 exited);
        L.failed = true;
        return;
    }
}

/* Faults inside a fiber (unmapped memory, stack overflow into the guard page): report them as
 * the launch's error and return to the scheduler (on an alternate signal stack, so that a stack
 * overflow can be handled).  Faults elsewhere go to the previous handler. */
static struct sigaction g_old_segv, g_old_bus;
static stack_t g_old_altstack;
static char g_altstack[1 << 16];

static void on_fault(int sig, siginfo_t *si, void *)
{
    if (!g_in_fiber || !g_launch || !g_cur) {
        sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
        return;  /* the faulting instruction runs again, under the previous handler */
    }
    Launch &L = *g_launch;
    Fiber *f = g_cur;
    uintptr_t a = (uintptr_t)si->si_addr;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    bool overflow = a < (uintptr_t)f->stack_lo && a + 16 * page >= (uintptr_t)f->stack_lo;
    if (!L.failed) {
        snprintf(L.err, sizeof L.err,
                 "%s, block (%u,%u,%u), thread (%u,%u,%u): %s at address %p%s", L.name, f->blk->idx.x,
                 f->blk->idx.y, f->blk->idx.z, f->tid.x, f->tid.y, f->tid.z,
                 sig == SIGSEGV ? "invalid memory access (SIGSEGV)" : "bus error (SIGBUS)", si->si_addr,
                 overflow ? " (the thread's stack overflowed: raise stack_kib)" : "");
        L.failed = true;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, nullptr);
    g_in_fiber = 0;
    suspend();   /* to the scheduler, which sees the failure; never resumed */
    abort();
}

static void install_fault_handler()
{
    stack_t ss;
    ss.ss_sp = g_altstack;
    ss.ss_size = sizeof g_altstack;
    ss.ss_flags = 0;
    sigaltstack(&ss, &g_old_altstack);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

static void remove_fault_handler()
{
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&g_old_altstack, nullptr);
}

static int run(Launch &L, unsigned resident, size_t stack_bytes)
{
    uint64_t nblocks = (uint64_t)L.grid.x * L.grid.y * L.grid.z;
    if (nblocks == 0) return 0;
    if (resident < 1) resident = 1;
    if (resident > nblocks) resident = (unsigned)nblocks;
    if (!reserve((size_t)resident * L.nthreads, stack_bytes)) {
        snprintf(L.err, sizeof L.err, "%s: cannot allocate %u fiber stacks", L.name, resident * L.nthreads);
        return 1;
    }
    /* Blocks in a random order (Fisher-Yates over the linear block indices). */
    std::vector<uint32_t> order(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = (uint32_t)i;
    for (uint64_t i = nblocks - 1; i > 0; --i) std::swap(order[i], order[L.rng.below((uint32_t)(i + 1))]);

    std::vector<Block> blocks(resident);
    std::vector<unsigned char> images(shared_bytes() * resident);
    g_shared_owner = nullptr;
    g_launch = &L;
    L.runnable.reserve((size_t)resident * L.nthreads);
    uint64_t next = 0;
    for (unsigned s = 0; s < resident; ++s) {
        blocks[s].fibers = &pool().fibers[(size_t)s * L.nthreads];
        blocks[s].shared = shared_bytes() ? &images[shared_bytes() * s] : nullptr;
        start_block(blocks[s], order[next++]);
    }
    unsigned active = resident;
    while (active) {
        if (!any_runnable(L)) {
            describe_deadlock(L, blocks);
            return 1;
        }
        Fiber *f = next_runnable(L);
        own_shared(f->blk);
        L.stats.resumes++;
        resume(f);
        if (L.failed) return 1;
        Block &b = *f->blk;
        if (b.live == 0) {
            if (g_shared_owner == &b) g_shared_owner = nullptr;
            b.active = false;
            if (next < nblocks) start_block(b, order[next++]);
            else active--;
        }
    }
    return 0;
}

static Stats g_last_stats;
static Policy g_last_policy;

}  // namespace hvdc_emu

/* Register kernel `name` with its parameter list `params` (in parentheses, as in the source: it
 * picks the extern "C" function when a template of the same name exists). */
#define HVDC_EMU_KERNEL(name, max_threads, params) \
    static const int hvdc_emu_reg_##name __attribute__((unused)) = \
        ::hvdc_emu::add_kernel(#name, static_cast<void(*) params>(&name), max_threads);

/* The C API (ctypes).  The kernel file and its HVDC_EMU_KERNEL list follow this header in the
 * module's one translation unit, so these definitions come after nothing they need. */
HVDC_EMU_API int hvdc_emu_abi_version() { return HVDC_EMU_ABI_VERSION; }
HVDC_EMU_API int hvdc_emu_kernel_count() { return (int)::hvdc_emu::registry().size(); }
HVDC_EMU_API const char *hvdc_emu_kernel_name(int k) { return ::hvdc_emu::registry()[k].name; }
HVDC_EMU_API const char *hvdc_emu_kernel_params(int k) { return ::hvdc_emu::registry()[k].params.c_str(); }
HVDC_EMU_API unsigned hvdc_emu_kernel_max_threads(int k) { return ::hvdc_emu::registry()[k].max_threads; }
HVDC_EMU_API size_t hvdc_emu_shared_bytes() { return ::hvdc_emu::shared_bytes(); }
HVDC_EMU_API int hvdc_emu_uses_ucontext()
{
#ifdef HVDC_EMU_UCONTEXT
    return 1;
#else
    return 0;
#endif
}
/* stats of the last launch: resumes (fiber switches), __syncthreads calls, warp collectives,
 * blocks, the policy used */
HVDC_EMU_API void hvdc_emu_last_stats(uint64_t *out)
{
    out[0] = ::hvdc_emu::g_last_stats.resumes;
    out[1] = ::hvdc_emu::g_last_stats.syncthreads;
    out[2] = ::hvdc_emu::g_last_stats.warp_ops;
    out[3] = ::hvdc_emu::g_last_stats.blocks;
    out[4] = ::hvdc_emu::g_last_policy;
}

/* Launch kernel k on grid dims[0..2] x block dims[3..5] with the raw 64-bit argument slots args
 * (pointers, or the scalar's bytes in the low bytes), scheduling policy `policy` (POLICY_MIXED:
 * drawn from the seed).  Returns 0, or 1 with a message in err. */
HVDC_EMU_API int hvdc_emu_launch(int k, const unsigned *dims, const uint64_t *args, uint64_t seed,
                                 unsigned policy, unsigned resident, size_t stack_bytes, char *err,
                                 size_t errlen)
{
    using namespace ::hvdc_emu;
    const KernelInfo &info = registry()[k];
    Launch L;
    L.name = info.name;
    L.grid = dim3(dims[0], dims[1], dims[2]);
    L.block = dim3(dims[3], dims[4], dims[5]);
    L.nthreads = dims[3] * dims[4] * dims[5];
    L.invoke = info.invoke;
    L.fn = info.fn;
    L.args = args;
    L.rng.s = seed;
    L.policy = policy < POLICY_MIXED ? (Policy)policy : (Policy)L.rng.below(POLICY_MIXED);
    L.failed = false;
    L.err[0] = 0;
    L.stats = Stats{0, 0, 0, 0};
    install_fault_handler();
    int rc = run(L, resident, stack_bytes);
    remove_fault_handler();
    g_last_stats = L.stats;
    g_last_policy = L.policy;
    g_launch = nullptr;
    g_cur = nullptr;
    if (rc && err && errlen) snprintf(err, errlen, "%s", L.err);
    return rc;
}

/* After the system headers: what NVRTC defines for device code (hvdc_common.h picks its CUDA
 * branch on it). */
#define __CUDACC__ 1
#define __CUDA_ARCH__ 800
#define HVDC_EMU 1

#endif /* HVDC_EMU_SIMT_H */
