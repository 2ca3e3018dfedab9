// Elementwise and row-reduction kernels of the ORW-CFM-W2 step, f32.
// Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs); every kernel is `extern "C"`,
// grid-stride over `n` elements unless it says otherwise, so any launch size is correct.
// cuda_fp16.h comes with the CUDA toolkit or the nvidia-cuda-runtime wheel; kernels that need it
// go inside `#ifdef ORWCFM_HAVE_FP16` (none yet: today's f16/bf16 ops are cast.cu's integer
// conversions around the f32 kernels), so the f32 ones still compile with NVRTC alone.
#include "common.cuh"
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

// One block per sample row of `per` values (grid-stride over rows, so any grid is correct):
// fm_rows[r] = w[r] · mean (v − u)², w2_rows[r] = mean (v − v_ref)² (the per-sample terms of the
// ORW-CFM-W2 loss; the batch means are taken on the host or by a second reduction).
// blockDim.x must be a power of two ≤ 1024.
extern "C" __global__ void orw_loss_rows_f32(const float* __restrict__ v, const float* __restrict__ u, const float* __restrict__ vref,
                                             const float* __restrict__ w, float* __restrict__ fm_rows, float* __restrict__ w2_rows, int per, int rows) {
    __shared__ float s_fm[1024];
    __shared__ float s_w2[1024];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = (long long)row * per;
        float fm = 0.0f, w2 = 0.0f;
        for (int k = threadIdx.x; k < per; k += blockDim.x) {
            float a = v[base + k];
            float d = a - u[base + k];
            float e = a - vref[base + k];
            fm += d * d;
            w2 += e * e;
        }
        s_fm[threadIdx.x] = fm;
        s_w2[threadIdx.x] = w2;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                s_fm[threadIdx.x] += s_fm[threadIdx.x + s];
                s_w2[threadIdx.x] += s_w2[threadIdx.x + s];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            fm_rows[row] = w[row] * s_fm[0] / (float)per;
            w2_rows[row] = s_w2[0] / (float)per;
        }
        __syncthreads();
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

// op: 0 x+s, 1 x·s, 2 exp, 3 relu, 4 x², 5 silu, 6 sigmoid, 7 −x
extern "C" __global__ void unary_f32(long long op, float s, const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i], r;
        switch (op) {
            case 0: r = v + s; break;
            case 1: r = v * s; break;
            case 2: r = expf(v); break;
            case 3: r = fmaxf(v, 0.0f); break;
            case 4: r = v * v; break;
            case 5: r = v / (1.0f + expf(-v)); break;
            case 6: r = 1.0f / (1.0f + expf(-v)); break;
            default: r = -v; break;
        }
        y[i] = r;
    }
}

// dx for unary op `op` (codes as unary_f32) from the output gradient g, the input x and output y
extern "C" __global__ void unary_backward_f32(long long op, const float* g, const float* x, const float* y, float* dx, long long n) {
    GRID_STRIDE(i, n) {
        float gv = g[i], r;
        switch (op) {
            case 2: r = gv * y[i]; break;
            case 3: r = x[i] > 0.0f ? gv : 0.0f; break;
            case 4: r = gv * (2.0f * x[i]); break;
            case 5: {
                float v = x[i];
                float sg = 1.0f / (1.0f + expf(-v));
                r = gv * (sg * (1.0f + v * (1.0f - sg)));
                break;
            }
            case 6: r = gv * y[i] * (1.0f - y[i]); break;
            case 7: r = -gv; break;
            // 0 (x+s): the gradient passes through. 1 (x·s) has no case: its gradient is
            // unary_f32(1, s) of g, which is what the host launches.
            default: r = gv; break;
        }
        dx[i] = r;
    }
}

// Broadcasting binary op over an output of `shape` (ndim ≤ 8); sa/sb are each operand's strides in
// the output's index space (0 along broadcast axes). op: 0 +, 1 −, 2 ·, 3 /
struct BinGeom { long long ndim; long long shape[8]; long long sa[8]; long long sb[8]; };

__device__ __forceinline__ float bin_apply(long long op, float a, float b) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}

extern "C" __global__ void binary_f32(long long op, const float* a, const float* b, float* y, long long n, BinGeom g) {
    GRID_STRIDE(i, n) {
        long long rem = i, oa = 0, ob = 0;
        for (int d = (int)g.ndim - 1; d >= 0; --d) {
            long long idx = rem % g.shape[d];
            rem /= g.shape[d];
            oa += idx * g.sa[d];
            ob += idx * g.sb[d];
        }
        y[i] = bin_apply(op, a[oa], b[ob]);
    }
}

// The same op for operands of the output's shape.
extern "C" __global__ void binary_same_f32(long long op, const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = bin_apply(op, a[i], b[i]);
}
