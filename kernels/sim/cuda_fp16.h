// The part of CUDA's <cuda_fp16.h> that kernels/elementwise.cu uses, for the CPU shim (shim.h):
// an IEEE binary16 storage type and its conversions (float -> half rounds to nearest even, as
// the device's __float2half does).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    unsigned short x;
};

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    const uint32_t e = (h.x >> 10) & 0x1fu;
    const uint32_t m = h.x & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        const float f = (float)m * (1.0f / 16777216.0f); // m * 2^-24, exact
        return sign ? -f : f;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e - 15 + 127) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline __half __float2half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    unsigned short h;
    if (a > 0x7f800000u) {
        h = 0x7e00; // NaN
    } else if (a >= 0x47800000u) {
        h = 0x7c00; // >= 65536 (and inf): inf
    } else if (a < 0x38800000u) {
        // below 2^-14: a subnormal half, round(|f| * 2^24) to nearest even (1024 is the
        // smallest normal, whose encoding is 0x400 as well)
        float s;
        std::memcpy(&s, &a, sizeof s);
        h = (unsigned short)nearbyintf(s * 16777216.0f);
    } else {
        const uint32_t e = (a >> 23) - 127 + 15; // 1..30
        const uint32_t m = a & 0x7fffffu;
        uint32_t hb = (e << 10) | (m >> 13);
        const uint32_t rem = m & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (hb & 1u))) hb += 1; // may carry into inf
        h = (unsigned short)hb;
    }
    __half r;
    r.x = (unsigned short)(sign | h);
    return r;
}
