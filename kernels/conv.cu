// The im2col unfolding of 2-D convolution (cross-correlation) and its adjoint col2im, f32 (im2col also of 16-bit values).
// Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs); both are grid-stride over their
// output elements, so any launch size is correct. Geometry as src/backend/cpu/conv.rs ConvGeom:
// ho = (h + 2 pad - kh)/stride + 1, wo likewise; K = cin*kh*kw, P = ho*wo, and col of image ni is
// the [K, P] matrix at col + ni*K*P. CPU twins:
//   im2col_f32  src/backend/cpu/conv.rs  im2col (one image there; all n images here)
//   im2col_h16  the same, on 16-bit values (bit copies)
//   col2im_f32  src/backend/cpu/conv.rs  col2im (same order of additions, as a gather: no atomics)
#include "common.cuh"


// col[((ni*K) + (ci*kh + ki)*kw + kj)*P + oi*wo + oj] = x[ni, ci, oi*stride - pad + ki, oj*stride - pad + kj], 0 outside
// (T = float, or the 16-bit values of f16/bf16 as unsigned short: a copy, +0 is bits 0 in both).
template <class T>
__device__ __forceinline__ void im2col_body(const T* __restrict__ x, T* __restrict__ col, long long n, long long cin, long long h, long long w, long long kh, long long kw,
                                            long long stride, long long pad, long long ho, long long wo) {
    const long long P = ho * wo;
    const long long khw = kh * kw;
    const long long total = n * cin * khw * P;
    GRID_STRIDE(i, total) {
        long long t = i / wo;
        const long long oj = i - t * wo;
        long long q = t / ho;
        const long long oi = t - q * ho;
        t = q / kw;
        const long long kj = q - t * kw;
        q = t / kh;
        const long long ki = t - q * kh;
        // q = ni*cin + ci
        const long long yi = oi * stride - pad + ki;
        const long long xi = oj * stride - pad + kj;
        T v = T(0);
        if (yi >= 0 && yi < h && xi >= 0 && xi < w) v = x[(q * h + yi) * w + xi];
        col[i] = v;
    }
}

extern "C" __global__ void im2col_f32(const float* __restrict__ x, float* __restrict__ col, long long n, long long cin, long long h, long long w, long long kh, long long kw,
                                      long long stride, long long pad, long long ho, long long wo) {
    im2col_body(x, col, n, cin, h, w, kh, kw, stride, pad, ho, wo);
}

// The same unfolding of 16-bit values (the mixed-precision path of src/backend/cuda/conv.rs).
extern "C" __global__ void im2col_h16(const unsigned short* __restrict__ x, unsigned short* __restrict__ col, long long n, long long cin, long long h, long long w, long long kh,
                                      long long kw, long long stride, long long pad, long long ho, long long wo) {
    im2col_body(x, col, n, cin, h, w, kh, kw, stride, pad, ho, wo);
}

// x[ni, ci, yi, xi] = sum, in increasing ki then kj, over taps with yi + pad - ki = oi*stride and
// xi + pad - kj = oj*stride (0 <= oi < ho, 0 <= oj < wo) of col[...]; every x element written.
extern "C" __global__ void col2im_f32(const float* __restrict__ col, float* __restrict__ x, long long n, long long cin, long long h, long long w, long long kh, long long kw,
                                      long long stride, long long pad, long long ho, long long wo) {
    const long long P = ho * wo;
    const long long khw = kh * kw;
    const long long total = n * cin * h * w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        long long t = i / w;
        const long long xi = i - t * w;
        const long long q = t / h; // ni*cin + ci
        const long long yi = t - q * h;
        // rows (ci*kh + ki)*kw + kj of image ni start at col + (q*khw)*P
        const float* cb = col + q * khw * P;
        float s = 0.0f;
        for (long long ki = 0; ki < kh; ++ki) {
            const long long ty = yi + pad - ki;
            if (ty < 0) break;
            const long long oi = ty / stride;
            if (oi * stride != ty || oi >= ho) continue;
            for (long long kj = 0; kj < kw; ++kj) {
                const long long tx = xi + pad - kj;
                if (tx < 0) break;
                const long long oj = tx / stride;
                if (oj * stride != tx || oj >= wo) continue;
                s = __fadd_rn(s, cb[(ki * kw + kj) * P + oi * wo + oj]);
            }
        }
        x[i] = s;
    }
}
