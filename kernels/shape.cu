// Data movement and small per-element ops of the f32 autograd graph: strided gathers, slab
// copies, 2x nearest upsampling / 2x2 average pooling (and backwards), embedding lookup,
// torchcfm's timestep embedding and per-channel bias. Compiled at run time by NVRTC
// (src/backend/cuda/nvrtc.rs); every kernel is grid-stride over its output elements, so any
// launch size is correct. CPU twins:
//   gather_strided_f32               src/backend/cpu/elementwise.rs  gather_strided (permute, broadcast_to)
//   copy_slab_f32                    src/backend/cpu/elementwise.rs  concat, narrow, narrow_backward
//   upsample_nearest2x_f32           src/backend/cpu/elementwise.rs  upsample_nearest2x
//   upsample_nearest2x_backward_f32  src/backend/cpu/elementwise.rs  upsample_nearest2x_backward
//   avg_pool2x_f32                   src/backend/cpu/elementwise.rs  avg_pool2x
//   avg_pool2x_backward_f32          src/backend/cpu/elementwise.rs  avg_pool2x_backward
//   embedding_forward_f32            src/autograd/ops.rs             embedding (forward)
//   embedding_backward_f32           src/autograd/ops.rs             embedding (backward closure)
//   timestep_embedding_f32           src/backend/cpu/elementwise.rs  timestep_embedding, timestep_freqs
//   timestep_embedding_backward_f32  src/autograd/ops.rs             timestep_embedding (backward closure)
//   add_channel_bias_f32             src/backend/cpu/conv.rs         the bias of conv2d_im2col_forward (y = b + w*col)
// Float products and sums use __fmul_rn/__fadd_rn where the CPU rounds each step (no FMA).
#include "common.cuh"

struct Strided {
    long long ndim;
    long long shape[8];
    long long strides[8];
};

// dst[i] = src[sum_d idx_d * strides[d]], idx decoding i over shape[0..ndim] (last fastest).
extern "C" __global__ void gather_strided_f32(const float* __restrict__ src, float* __restrict__ dst, long long n, Strided s) {
    GRID_STRIDE(i, n) {
        long long rem = i, off = 0;
        for (long long d = s.ndim - 1; d >= 0; --d) {
            long long e = s.shape[d];
            long long q = rem / e;
            off += (rem - q * e) * s.strides[d];
            rem = q;
        }
        dst[i] = src[off];
    }
}

// For o < outer, j < len: dst[o*dst_stride + dst_off + j] = src[o*src_stride + src_off + j].
extern "C" __global__ void copy_slab_f32(const float* __restrict__ src, float* __restrict__ dst, long long outer, long long len, long long src_stride, long long src_off,
                                         long long dst_stride, long long dst_off) {
    GRID_STRIDE(i, outer * len) {
        long long o = i / len;
        long long j = i - o * len;
        dst[o * dst_stride + dst_off + j] = src[o * src_stride + src_off + j];
    }
}

// x [nc, h, w] -> y [nc, 2h, 2w], nearest neighbour.
extern "C" __global__ void upsample_nearest2x_f32(const float* __restrict__ x, float* __restrict__ y, long long nc, long long h, long long w) {
    const long long w2 = 2 * w, h2 = 2 * h;
    GRID_STRIDE(i, nc * h2 * w2) {
        long long t = i / w2;
        long long oj = i - t * w2;
        long long p = t / h2;
        long long oi = t - p * h2;
        y[i] = x[(p * h + (oi >> 1)) * w + (oj >> 1)];
    }
}

// g [nc, 2h, 2w] -> dx [nc, h, w]: each 2x2 block summed from 0 in the CPU's order.
extern "C" __global__ void upsample_nearest2x_backward_f32(const float* __restrict__ g, float* __restrict__ dx, long long nc, long long h, long long w) {
    const long long w2 = 2 * w;
    GRID_STRIDE(i, nc * h * w) {
        long long t = i / w;
        long long j = i - t * w;
        long long p = t / h;
        long long r = t - p * h;
        const float* g0 = g + (p * 2 * h + 2 * r) * w2 + 2 * j;
        float s = 0.0f;
        s = __fadd_rn(s, g0[0]);
        s = __fadd_rn(s, g0[1]);
        s = __fadd_rn(s, g0[w2]);
        s = __fadd_rn(s, g0[w2 + 1]);
        dx[i] = s;
    }
}

// x [nc, h, w] -> y [nc, h/2, w/2] (floor): 0.25f * (((a + b) + c) + d).
extern "C" __global__ void avg_pool2x_f32(const float* __restrict__ x, float* __restrict__ y, long long nc, long long h, long long w) {
    const long long ho = h / 2, wo = w / 2;
    GRID_STRIDE(i, nc * ho * wo) {
        long long t = i / wo;
        long long j = i - t * wo;
        long long p = t / ho;
        long long r = t - p * ho;
        const float* x0 = x + (p * h + 2 * r) * w + 2 * j;
        float a = __fadd_rn(__fadd_rn(__fadd_rn(x0[0], x0[1]), x0[w]), x0[w + 1]);
        y[i] = __fmul_rn(0.25f, a);
    }
}

// g [nc, h/2, w/2] -> dx [nc, h, w]: 0.25f * g on covered pixels, 0 on an uncovered last row/column.
extern "C" __global__ void avg_pool2x_backward_f32(const float* __restrict__ g, float* __restrict__ dx, long long nc, long long h, long long w) {
    const long long ho = h / 2, wo = w / 2;
    GRID_STRIDE(i, nc * h * w) {
        long long t = i / w;
        long long xi = i - t * w;
        long long p = t / h;
        long long yi = t - p * h;
        long long oi = yi >> 1, oj = xi >> 1;
        dx[i] = (oi < ho && oj < wo) ? __fmul_rn(0.25f, g[(p * ho + oi) * wo + oj]) : 0.0f;
    }
}

// out[r, d] = w[ids[r] * dim + d].
extern "C" __global__ void embedding_forward_f32(const float* __restrict__ w, const int* __restrict__ ids, float* __restrict__ out, long long nids, long long dim) {
    GRID_STRIDE(i, nids * dim) {
        long long r = i / dim;
        long long d = i - r * dim;
        out[i] = w[(long long)ids[r] * dim + d];
    }
}

// gw[c, d] = sum over r with ids[r] == c (increasing r, f32 from 0) of g[r, d]; 0 where no id matches.
extern "C" __global__ void embedding_backward_f32(const float* __restrict__ g, const int* __restrict__ ids, float* __restrict__ gw, long long nids, long long num, long long dim) {
    GRID_STRIDE(i, num * dim) {
        long long c = i / dim;
        long long d = i - c * dim;
        float s = 0.0f;
        for (long long r = 0; r < nids; ++r) {
            if ((long long)ids[r] == c) s = __fadd_rn(s, g[r * dim + d]);
        }
        gw[i] = s;
    }
}

// f_k = exp(-ln(max_period) * k / half) in f32, exactly timestep_freqs' expression.
__device__ __forceinline__ float timestep_freq(long long k, long long half, float log_max_period) {
    return expf(__fdiv_rn(__fmul_rn(-log_max_period, (float)k), (float)half));
}

// out[i, k] = cos(t_i f_k), out[i, half + k] = sin(t_i f_k); the last column is 0 when dim is odd.
extern "C" __global__ void timestep_embedding_f32(const float* __restrict__ t, float* __restrict__ out, long long b, long long dim, float log_max_period) {
    const long long half = dim / 2;
    GRID_STRIDE(idx, b * dim) {
        long long i = idx / dim;
        long long col = idx - i * dim;
        float v = 0.0f;
        if (col < 2 * half) {
            long long k = col < half ? col : col - half;
            float a = __fmul_rn(t[i], timestep_freq(k, half, log_max_period));
            v = col < half ? cosf(a) : sinf(a);
        }
        out[idx] = v;
    }
}

// gt[i] = sum_k (double)(g[i,k] * -f_k * emb[i,half+k] + g[i,half+k] * f_k * emb[i,k]), each term in f32.
extern "C" __global__ void timestep_embedding_backward_f32(const float* __restrict__ emb, const float* __restrict__ g, float* __restrict__ gt, long long b, long long dim, float log_max_period) {
    const long long half = dim / 2;
    GRID_STRIDE(i, b) {
        const float* e = emb + i * dim;
        const float* gd = g + i * dim;
        double s = 0.0;
        for (long long k = 0; k < half; ++k) {
            const float f = timestep_freq(k, half, log_max_period);
            const float c = e[k], sn = e[half + k];
            const float term = __fadd_rn(__fmul_rn(__fmul_rn(gd[k], -f), sn), __fmul_rn(__fmul_rn(gd[half + k], f), c));
            s += (double)term;
        }
        gt[i] = (float)s;
    }
}

// y[(ni*c + ci)*s + j] += bias[ci], in place.
extern "C" __global__ void add_channel_bias_f32(float* y, const float* __restrict__ bias, long long n, long long c, long long s) {
    GRID_STRIDE(i, n * c * s) {
        long long ci = (i / s) % c;
        y[i] = __fadd_rn(y[i], bias[ci]);
    }
}
