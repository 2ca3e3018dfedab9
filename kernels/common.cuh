// Code shared by the kernel files: each includes it with `#include "common.cuh"`, and the
// engine pastes it in before compiling (NVRTC has no file system at run time; see
// `nvrtc::expand_headers`), so a helper exists once. The CPU shim compiles the same text.

// for (i = this thread's first element; i < n; i += every thread of the grid)
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// Sum of v over the block (blockDim.x a power of two <= 1024, `buf` one double per thread),
// returned to every thread. The trailing barrier frees `buf` for the caller's next use.
__device__ __forceinline__ double block_sum(double v, double* buf) {
    const unsigned t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (unsigned s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        __syncthreads();
    }
    double r = buf[0];
    __syncthreads();
    return r;
}
