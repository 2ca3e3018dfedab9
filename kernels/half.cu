// Native 16-bit (f16/bf16) kernels of the mixed-precision path (src/backend/cuda/conv.rs,
// linalg.rs; their im2col_h16 is conv.cu's): they read and write the 16-bit values directly, so
// a half-precision convolution or linear layer costs no separate cast passes, with the CPU
// reference's rounding (half.cuh): the epilogues add in f32 and round once. Compiled at run
// time by NVRTC; all grid-stride.
// `bf` selects bfloat16 (1) or IEEE half (0). CPU twins:
//   bias_round_h16      CpuStorage::linear / conv2d: f32 result (+ bias) rounded once
//   add_bias_h16        y + bias in f32, rounded (after a cuDNN half convolution)
//   unary_h16, unary_backward_h16, binary_h16, binary_same_h16
//                       CpuStorage::unary / unary_backward / binary of f16/bf16 storages: the
//                       operands widened, ops.cuh's f32 arithmetic, the result rounded once
//                       (one pass instead of widen-op-round)
#include "common.cuh"
#include "half.cuh"
#include "ops.cuh"

// out[i] = round(y[i] + bias[(i / s) % c]) for the f32 GEMM output y of n elements (bias may be
// null: then just the rounding). Linear layers: s = 1, c = outputs; convolutions: s = ho*wo.
extern "C" __global__ void bias_round_h16(const float* __restrict__ y, const float* __restrict__ bias, unsigned short* __restrict__ out, long long n, long long c, long long s, unsigned int bf) {
    GRID_STRIDE(i, n) {
        float v = y[i];
        if (bias) v = __fadd_rn(v, bias[(i / s) % c]);
        out[i] = h16_from_f32(v, bf);
    }
}

// y[i] = round(widen(y[i]) + bias[(i / s) % c]) in place (a cuDNN half convolution's output).
extern "C" __global__ void add_bias_h16(unsigned short* __restrict__ y, const float* __restrict__ bias, long long n, long long c, long long s, unsigned int bf) {
    GRID_STRIDE(i, n) y[i] = h16_from_f32(__fadd_rn(f32_from_h16(y[i], bf), bias[(i / s) % c]), bf);
}

// ---- element-wise ops on 16-bit storages (op codes and BinGeom: ops.cuh)

extern "C" __global__ void unary_h16(long long op, float s, const unsigned short* x, unsigned short* y, long long n, unsigned int bf) {
    GRID_STRIDE(i, n) y[i] = h16_from_f32(unary_apply(op, s, f32_from_h16(x[i], bf)), bf);
}

extern "C" __global__ void unary_backward_h16(long long op, const unsigned short* g, const unsigned short* x, const unsigned short* y, unsigned short* dx, long long n, unsigned int bf) {
    GRID_STRIDE(i, n) dx[i] = h16_from_f32(unary_grad(op, f32_from_h16(g[i], bf), f32_from_h16(x[i], bf), f32_from_h16(y[i], bf)), bf);
}

extern "C" __global__ void binary_h16(long long op, const unsigned short* a, const unsigned short* b, unsigned short* y, long long n, BinGeom g, unsigned int bf) {
    GRID_STRIDE(i, n) {
        long long oa, ob;
        bin_offsets(g, i, &oa, &ob);
        y[i] = h16_from_f32(bin_apply(op, f32_from_h16(a[oa], bf), f32_from_h16(b[ob], bf)), bf);
    }
}

extern "C" __global__ void binary_same_h16(long long op, const unsigned short* a, const unsigned short* b, unsigned short* y, long long n, unsigned int bf) {
    GRID_STRIDE(i, n) y[i] = h16_from_f32(bin_apply(op, f32_from_h16(a[i], bf), f32_from_h16(b[i], bf)), bf);
}
