// CUDA-on-CPU shim (tests/kernels_on_cpu.rs, and the simulated device of src/backend/cuda/sim.rs): the kernels of kernels/*.cu compiled by the host
// C++ compiler (`-include shim.h -x c++ kernels/X.cu runner.cpp`) and run with one OS thread per
// GPU thread (runner.cpp's shim_launch3) or with a block's threads as fibers of one OS thread
// (shim_launch3_fibers: the simulated GPU, and large blocks in the kernel tests). Only what those
// kernels use is defined.
//
// - `__global__`/`__device__` vanish and `extern "C"` kernels become plain exported C functions.
// - `threadIdx` and `blockIdx` are thread-local (each OS thread is one GPU thread, and walks the
//   blocks of the grid one after another, see runner.cpp; the fiber launcher sets them, and the
//   shuffle phase, at every switch); `blockDim`/`gridDim` are per launch.
// - `__shared__` is `static`: one copy per kernel, shared by the block's threads. Blocks run one
//   after another (a barrier separates them), so that copy is never used by two blocks at once.
//   Launches of one library must not overlap (the Rust side holds a lock per library).
// - Dynamic shared memory (`extern __shared__ T name[];`) is one buffer per launch, of the size
//   the launch asks for (zeroed, 64-byte aligned), at `shim_dynamic_shared`. The declarations are
//   rewritten into references to it before compiling (`sim::shim_source` on the Rust side): a
//   pointer at function scope, a macro at file scope.
// - Grids and blocks are 3-D (runner.cpp's shim_launch3; shim_launch is its 1-D form).
// - `__syncthreads()` is a barrier over the block's threads (mutex + condition variable, which
//   also orders the memory accesses around it). runner.cpp's shim_launch3_fibers runs a block's
//   threads instead as fibers of one OS thread that switch at barriers (the simulated GPU's
//   launcher: a barrier costs a context switch in user space, not a futex wake-up of every
//   waiting OS thread).
// - `__fmul_rn` and friends are the plain IEEE operations: the library is compiled with
//   `-ffp-contract=off`, so nothing is contracted into an FMA (NVRTC runs with --fmad=true; the
//   kernels use the _rn intrinsics exactly where that matters). `__expf` is libm's `expf` (the
//   GPU's is an approximation of a few ulp: not reproduced here).
// - Warp shuffles, `__syncwarp` and float2/float4: the warp section below.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <mutex>
#include <ucontext.h>

struct shim_dim3 {
    unsigned x = 0, y = 0, z = 0;
};

// Hidden: C++17 inline variables are otherwise exported as STB_GNU_UNIQUE symbols, which the
// dynamic linker unifies across every library of the process, RTLD_LOCAL or not, so two kernel
// libraries launched at once would share them.
#define SHIM_LOCAL __attribute__((visibility("hidden")))

SHIM_LOCAL inline thread_local shim_dim3 threadIdx;
SHIM_LOCAL inline thread_local shim_dim3 blockIdx;
SHIM_LOCAL inline shim_dim3 blockDim;
SHIM_LOCAL inline shim_dim3 gridDim;

// Fiber mode (runner.cpp's shim_launch3_fibers): a block's GPU threads are fibers (ucontext) of
// the one OS thread that runs the launch; a fiber waiting at a barrier hands control back to the
// scheduler, which resumes the others round-robin. `cur` is the running fiber.
struct shim_fibers {
    ucontext_t sched;
    ucontext_t* ctx = nullptr;
    char* done = nullptr;
    unsigned cur = 0;
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
};
SHIM_LOCAL inline thread_local shim_fibers* shim_fiber_sched = nullptr;

inline void shim_fiber_yield() {
    shim_fibers* f = shim_fiber_sched;
    swapcontext(&f->ctx[f->cur], &f->sched);
}

class shim_barrier {
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_;
    unsigned count_ = 0;
    unsigned long long gen_ = 0;

public:
    explicit shim_barrier(unsigned n) : n_(n) {}
    void wait() {
        if (shim_fiber_sched != nullptr) {
            // one OS thread runs every waiter: no lock; the last to arrive goes on, the others
            // yield until the generation moves
            const unsigned long long gen = gen_;
            if (++count_ == n_) {
                count_ = 0;
                ++gen_;
                return;
            }
            while (gen_ == gen) shim_fiber_yield();
            return;
        }
        std::unique_lock<std::mutex> lock(m_);
        const unsigned long long gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }
};

// The barrier of the running launch (set by shim_launch3).
SHIM_LOCAL inline shim_barrier* shim_block_barrier = nullptr;

// The running launch's dynamic shared memory (set by shim_launch3).
SHIM_LOCAL inline unsigned char* shim_dynamic_shared = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { shim_block_barrier->wait(); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, sizeof v);
    return v;
}

// ---- warps: shuffles, __syncwarp, float2/float4 (kernels/attention.cu) -----------------------
// A warp is 32 consecutive threads of the block's linear thread index (x fastest, as on the
// GPU). shim_launch3 (runner.cpp) gives every warp of the block a barrier over its 32 threads and
// an exchange buffer: a shuffle writes the thread's value into its lane's slot, waits at the
// warp's barrier and reads the source lane's slot. The buffer is double-buffered by a per-thread
// phase (every thread of a warp runs the same shuffles, so their phases agree), which makes one
// barrier per shuffle enough: a lane can only overwrite a slot of phase p after every lane has
// passed the barrier of the following shuffle, i.e. after all of them read phase p.
// Supported: the full mask only, widths that are powers of two <= 32, blocks whose threads fill
// whole warps. A shuffle or __syncwarp in a partial warp (block size not a multiple of 32), with
// another mask, or in a kernel run by the serial launcher (sim.rs runs a kernel that mentions
// __shfl or __syncwarp with all its threads at once) aborts with a message: waiting would hang.
#include <cstdio>
#include <cstdlib>

struct shim_warp {
    shim_barrier bar{32};
    unsigned long long slot[2][32] = {};
};

// The running launch's warps (set by shim_launch3) and its threads per block.
SHIM_LOCAL inline shim_warp* shim_warps = nullptr;
SHIM_LOCAL inline unsigned shim_block_threads = 0;
SHIM_LOCAL inline thread_local unsigned shim_shuffle_phase = 0;

[[noreturn]] inline void shim_warp_abort(const char* op, const char* why) {
    std::fprintf(stderr, "CUDA shim: %s: %s\n", op, why);
    std::fflush(stderr);
    std::abort();
}

inline unsigned shim_linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline shim_warp& shim_this_warp(const char* op, unsigned mask) {
    if (shim_warps == nullptr) shim_warp_abort(op, "no warps in this launch (a kernel run by the serial launcher?)");
    if (mask != 0xffffffffu) shim_warp_abort(op, "only the full mask 0xffffffff is supported");
    const unsigned w = shim_linear_thread() / 32u;
    if ((w + 1u) * 32u > shim_block_threads) shim_warp_abort(op, "a partial warp (the block size is not a multiple of 32)");
    return shim_warps[w];
}

inline void shim_check_width(const char* op, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) shim_warp_abort(op, "the width must be a power of two <= 32");
}

// The value of `v` held by lane `src` of the caller's warp.
template <class T>
inline T shim_shuffle(const char* op, unsigned mask, T v, unsigned src) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffles move at most 8 bytes");
    shim_warp& w = shim_this_warp(op, mask);
    const unsigned lane = shim_linear_thread() & 31u;
    const unsigned ph = shim_shuffle_phase;
    shim_shuffle_phase ^= 1u;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slot[ph][lane] = bits;
    w.bar.wait();
    T r;
    std::memcpy(&r, &w.slot[ph][src & 31u], sizeof(T));
    return r;
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    shim_check_width("__shfl_sync", width);
    const unsigned lane = shim_linear_thread() & 31u;
    const unsigned base = lane & ~(unsigned)(width - 1);
    return shim_shuffle("__shfl_sync", mask, v, base + ((unsigned)src_lane & (unsigned)(width - 1)));
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    shim_check_width("__shfl_xor_sync", width);
    const unsigned lane = shim_linear_thread() & 31u;
    const unsigned base = lane & ~(unsigned)(width - 1);
    const unsigned src = lane ^ (unsigned)lane_mask;
    // a later group's lane is not reachable: the caller's own value
    return shim_shuffle("__shfl_xor_sync", mask, v, src >= base + (unsigned)width ? lane : src);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    shim_check_width("__shfl_down_sync", width);
    const unsigned lane = shim_linear_thread() & 31u;
    return shim_shuffle("__shfl_down_sync", mask, v, (lane & (unsigned)(width - 1)) + delta < (unsigned)width ? lane + delta : lane);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    shim_check_width("__shfl_up_sync", width);
    const unsigned lane = shim_linear_thread() & 31u;
    return shim_shuffle("__shfl_up_sync", mask, v, (lane & (unsigned)(width - 1)) >= delta ? lane - delta : lane);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { shim_this_warp("__syncwarp", mask).bar.wait(); }

// CUDA's vector types (16- and 8-byte aligned, as on the device; may_alias: the kernels load them
// from float arrays).
struct __attribute__((aligned(8), may_alias)) float2 {
    float x, y;
};
struct __attribute__((aligned(16), may_alias)) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// ---- end of warps
