// Conversions between the storage dtypes (src/backend/cuda/cast.rs), and a bit-pattern fill.
// Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs); every kernel is grid-stride over its
// n elements, so any launch size is correct.
//
// The 16-bit formats are handled with integer bit operations only: no cuda_fp16.h/cuda_bf16.h,
// so NVRTC compiles this file alone and the CPU shim runs it bit for bit as the GPU does. Each
// conversion is exactly the `half` crate's (the CPU reference, src/backend/cpu/storage.rs):
//   f32 -> f16   round to nearest even; overflow to inf; f16 subnormals; tiny values to signed 0;
//                NaN keeps its sign and top 10 payload bits, with the quiet bit set
//   f16 -> f32   exact (subnormals normalised); NaN keeps its payload, quiet bit set
//   f32 -> bf16  round to nearest even (may carry into inf); NaN: its top bits, quiet bit set
//   bf16 -> f32  exact; NaN gets the quiet bit
//   f32 -> i32   toward zero, saturating at the i32 range, NaN to 0 (Rust's `as i32`)
//   i32 -> f32   round to nearest even (Rust's `as f32`)
// 16-bit values are stored two to a 32-bit word (element i is halfword i, little endian).
#include "common.cuh"
#include "half.cuh"


__device__ __forceinline__ int i32_from_f32(float f) {
    if (f != f) return 0;
    if (f >= 2147483648.0f) return 2147483647;
    if (f <= -2147483648.0f) return -2147483647 - 1;
    return (int)f;
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ x, unsigned short* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = f16_bits_from_f32(x[i]);
}

extern "C" __global__ void cast_f16_to_f32(const unsigned short* __restrict__ x, float* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = f32_from_f16_bits(x[i]);
}

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = bf16_bits_from_f32(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const unsigned short* __restrict__ x, float* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = f32_from_bf16_bits(x[i]);
}

extern "C" __global__ void cast_f32_to_i32(const float* __restrict__ x, int* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = i32_from_f32(x[i]);
}

extern "C" __global__ void cast_i32_to_f32(const int* __restrict__ x, float* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) y[i] = (float)x[i];
}

// y[i] = v for n 32-bit words: any dtype's bit pattern (two 16-bit values to a word).
extern "C" __global__ void fill_u32(unsigned int* y, unsigned int v, long long n) {
    GRID_STRIDE(i, n) y[i] = v;
}
