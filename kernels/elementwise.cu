// Elementwise and row-reduction kernels of the ORW-CFM-W2 step, f32.
// Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs); every kernel is `extern "C"`,
// grid-stride over `n` elements unless it says otherwise, so any launch size is correct.
// cuda_fp16.h comes with the CUDA toolkit or the nvidia-cuda-runtime wheel; kernels that need it
// go inside `#ifdef ORWCFM_HAVE_FP16` (none yet: the 16-bit element-wise ops are half.cu's, on
// integer conversions), so the f32 ones still compile with NVRTC alone.
#include "common.cuh"
#include "ops.cuh"
#if __has_include(<cuda_fp16.h>)
#include <cuda_fp16.h>
#define ORWCFM_HAVE_FP16 1
#endif


// torch.optim.Adam (weight decay added to the gradient), as src/optim/mod.rs:
// m += (g − m)(1 − β1); v = β2 v + (1 − β2) g²; p −= step_size · m / (√v / bc2_sqrt + eps),
// step_size = lr / (1 − β1^t), bc2_sqrt = √(1 − β2^t).
extern "C" __global__ void adam_step_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, long long n,
                                         float step_size, float beta1, float beta2, float eps, float bc2_sqrt, float weight_decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        if (weight_decay != 0.0f) gi += weight_decay * p[i];
        float mi = m[i] + (gi - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// ---- the engine's element-wise ops (CPU twins: src/backend/cpu/elementwise.rs, simd.rs, and the
// closures in src/autograd/ops.rs). Outputs may alias inputs (in-place use), so no __restrict__.


extern "C" __global__ void fill_f32(float* y, float v, long long n) {
    GRID_STRIDE(i, n) y[i] = v;
}

// y = a·x + b·y (EMA: a = 1 − decay, b = decay; gradient accumulation: a = b = 1)
extern "C" __global__ void axpby_f32(float a, const float* x, float b, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = y[i] * b + a * x[i];
}

// op: 0 x+s, 1 x·s, 2 exp, 3 relu, 4 x², 5 silu, 6 sigmoid, 7 −x, 8 gelu, 9 quick_gelu (ops.cuh: unary_apply)
extern "C" __global__ void unary_f32(long long op, float s, const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = unary_apply(op, s, x[i]);
}

// dx for unary op `op` (codes as unary_f32) from the output gradient g, the input x and output y
extern "C" __global__ void unary_backward_f32(long long op, const float* g, const float* x, const float* y, float* dx, long long n) {
    GRID_STRIDE(i, n) dx[i] = unary_grad(op, g[i], x[i], y[i]);
}

// Broadcasting binary op over an output of `shape` (BinGeom and the op codes: ops.cuh).
extern "C" __global__ void binary_f32(long long op, const float* a, const float* b, float* y, long long n, BinGeom g) {
    GRID_STRIDE(i, n) {
        long long oa, ob;
        bin_offsets(g, i, &oa, &ob);
        y[i] = bin_apply(op, a[oa], b[ob]);
    }
}

// The same op for operands of the output's shape.
extern "C" __global__ void binary_same_f32(long long op, const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = bin_apply(op, a[i], b[i]);
}
