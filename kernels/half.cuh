// The 16-bit float formats as integer bit operations (no cuda_fp16.h/cuda_bf16.h, so NVRTC
// compiles every file alone and the CPU shim runs them bit for bit as the GPU does), exactly the
// `half` crate's conversions (the CPU reference): round to nearest even, overflow to inf,
// subnormals, NaN quiet with its top payload bits. Pasted in by `nvrtc::expand_headers` where a
// file says `#include "half.cuh"` (cast.cu, half.cu). 16-bit values are stored two to a 32-bit
// word (element i is halfword i, little endian).

__device__ __forceinline__ unsigned short f16_bits_from_f32(float f) {
    const unsigned int x = (unsigned int)__float_as_int(f);
    const unsigned int sign = x & 0x80000000u;
    const unsigned int exp = x & 0x7f800000u;
    const unsigned int man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        // inf, or NaN: keep the top payload bits and set the quiet bit
        const unsigned int nan_bit = man == 0u ? 0u : 0x0200u;
        return (unsigned short)((sign >> 16) | 0x7c00u | nan_bit | (man >> 13));
    }
    const unsigned int half_sign = sign >> 16;
    const int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (unsigned short)(half_sign | 0x7c00u); // overflow: inf
    if (half_exp <= 0) {
        // a subnormal half (or zero): the implicit bit joins the mantissa, shifted into place
        if (14 - half_exp > 24) return (unsigned short)half_sign;
        const unsigned int m = man | 0x00800000u;
        unsigned int half_man = m >> (14 - half_exp);
        const unsigned int round_bit = 1u << (13 - half_exp);
        // round to nearest even: the round bit, and a sticky bit below it or an odd result
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return (unsigned short)(half_sign | half_man);
    }
    const unsigned int bits = half_sign | ((unsigned int)half_exp << 10) | (man >> 13);
    const unsigned int round_bit = 0x00001000u;
    // a carry out of the mantissa increments the exponent (up to inf), as it should
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) return (unsigned short)(bits + 1u);
    return (unsigned short)bits;
}

__device__ __forceinline__ float f32_from_f16_bits(unsigned short h) {
    const unsigned int i = h;
    if ((i & 0x7fffu) == 0u) return __int_as_float((int)(i << 16)); // signed zero
    const unsigned int sign = (i & 0x8000u) << 16;
    const unsigned int half_exp = i & 0x7c00u;
    const unsigned int half_man = i & 0x03ffu;
    if (half_exp == 0x7c00u) {
        if (half_man == 0u) return __int_as_float((int)(sign | 0x7f800000u));
        return __int_as_float((int)(sign | 0x7fc00000u | (half_man << 13)));
    }
    if (half_exp == 0u) {
        // subnormal: shift the leading one up to bit 9, lowering the exponent as many steps
        unsigned int e = 0u;
        while (((half_man << e) & 0x0200u) == 0u) ++e;
        const unsigned int exp = (127u - 15u - e) << 23;
        const unsigned int m = (half_man << (14u + e)) & 0x007fffffu;
        return __int_as_float((int)(sign | exp | m));
    }
    const unsigned int exp = ((half_exp >> 10) - 15u + 127u) << 23;
    return __int_as_float((int)(sign | exp | (half_man << 13)));
}

__device__ __forceinline__ unsigned short bf16_bits_from_f32(float f) {
    const unsigned int x = (unsigned int)__float_as_int(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u); // NaN
    const unsigned int round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}

__device__ __forceinline__ float f32_from_bf16_bits(unsigned short b) {
    const unsigned int i = b;
    if ((i & 0x7fffu) > 0x7f80u) return __int_as_float((int)((i | 0x0040u) << 16)); // NaN: quiet
    return __int_as_float((int)(i << 16));
}

// A 16-bit value of either format: `bf` selects bfloat16 (else IEEE half).
__device__ __forceinline__ float f32_from_h16(unsigned short v, unsigned int bf) { return bf ? f32_from_bf16_bits(v) : f32_from_f16_bits(v); }
__device__ __forceinline__ unsigned short h16_from_f32(float f, unsigned int bf) { return bf ? bf16_bits_from_f32(f) : f16_bits_from_f32(f); }
