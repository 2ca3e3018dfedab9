// CUDA-on-CPU shim (tests/kernels_on_cpu.rs, and the simulated device of src/backend/cuda/sim.rs): the kernels of kernels/*.cu compiled by the host
// C++ compiler (`-include shim.h -x c++ kernels/X.cu runner.cpp`) and run with one OS thread per
// GPU thread. Only what those kernels use is defined.
//
// - `__global__`/`__device__` vanish and `extern "C"` kernels become plain exported C functions.
// - `threadIdx` and `blockIdx` are thread-local (each OS thread is one GPU thread, and walks the
//   blocks of the grid one after another, see runner.cpp); `blockDim`/`gridDim` are per launch.
// - `__shared__` is `static`: one copy per kernel, shared by the block's threads. Blocks run one
//   after another (a barrier separates them), so that copy is never used by two blocks at once.
//   Launches of one library must not overlap (the Rust side holds a lock per library).
// - Dynamic shared memory (`extern __shared__ T name[];`) is one buffer per launch, of the size
//   the launch asks for (zeroed, 64-byte aligned), at `shim_dynamic_shared`. The declarations are
//   rewritten into references to it before compiling (`sim::shim_source` on the Rust side): a
//   pointer at function scope, a macro at file scope.
// - Grids and blocks are 3-D (runner.cpp's shim_launch3; shim_launch is its 1-D form).
// - `__syncthreads()` is a barrier over the block's threads (mutex + condition variable, which
//   also orders the memory accesses around it).
// - `__fmul_rn` and friends are the plain IEEE operations: the library is compiled with
//   `-ffp-contract=off`, so nothing is contracted into an FMA (NVRTC runs with --fmad=true; the
//   kernels use the _rn intrinsics exactly where that matters). `__expf` is libm's `expf` (the
//   GPU's is an approximation of a few ulp: not reproduced here).
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <mutex>

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

class shim_barrier {
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_;
    unsigned count_ = 0;
    unsigned long long gen_ = 0;

public:
    explicit shim_barrier(unsigned n) : n_(n) {}
    void wait() {
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

// ---- vector types (kernels/fused.cu): CUDA's float4 (16-byte aligned, as on the device) and
// make_float4; a float4 load or store through a cast pointer is one plain 16-byte access here.
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// ---- end of vector types
