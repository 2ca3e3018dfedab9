// Reductions of the f32 autograd ops: sums over axes, sums of squares, softmax and log-softmax
// over rows (with their backwards). Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs).
// CPU twins:
//   reduce_sum_f32                 src/backend/cpu/elementwise.rs  sum_to_shape / sum_axes_keepdim
//   sum_squares_partial_f32        (first stage of a global sum of squares; the host sums `partial`)
//   softmax_rows_f32               src/backend/cpu/elementwise.rs  softmax_rows (simd.rs softmax_inplace)
//   softmax_rows_backward_f32      src/backend/cpu/elementwise.rs  softmax_rows_backward (simd.rs softmax_backward_inplace)
//   log_softmax_rows_f32           src/autograd/ops.rs             log_softmax (forward)
//   log_softmax_rows_backward_f32  src/autograd/ops.rs             log_softmax (backward closure)
// "Block per X" kernels loop X over blockIdx.x, blockIdx.x + gridDim.x, ... and need blockDim.x a
// power of two <= 1024; they reduce in double through one static shared buffer. Sums are in
// double, so they differ from the CPU's f32/f64 orderings only by rounding.
#include "common.cuh"

struct ReduceGeom {
    long long nk;
    long long nr;
    long long kshape[8];
    long long kstride[8];
    long long rshape[8];
    long long rstride[8];
};

// Maximum of v over the block (NaN-ignoring like f32::max), returned to every thread.
__device__ __forceinline__ float block_max(float v, double* buf) {
    const unsigned t = threadIdx.x;
    buf[t] = (double)v;
    __syncthreads();
    for (unsigned s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (t < s) buf[t] = (double)fmaxf((float)buf[t], (float)buf[t + s]);
        __syncthreads();
    }
    float r = (float)buf[0];
    __syncthreads();
    return r;
}

// Offset of linear index i decoded over shape[0..nd] (last dim fastest) times stride.
__device__ __forceinline__ long long decode_offset(long long i, long long nd, const long long* shape, const long long* stride) {
    long long off = 0;
    for (long long d = nd - 1; d >= 0; --d) {
        long long e = shape[d];
        long long q = i / e;
        off += (i - q * e) * stride[d];
        i = q;
    }
    return off;
}

// y[o] = sum over r of x[koff(o) + roff(r)]; block per output o, threads stride over r.
extern "C" __global__ void reduce_sum_f32(const float* x, float* y, long long out_n, long long red_n, ReduceGeom g) {
    __shared__ double buf[1024];
    for (long long o = blockIdx.x; o < out_n; o += gridDim.x) {
        const long long koff = decode_offset(o, g.nk, g.kshape, g.kstride);
        double acc = 0.0;
        if (g.nr == 1) {
            const long long st = g.rstride[0];
            for (long long r = threadIdx.x; r < red_n; r += blockDim.x) acc += (double)x[koff + r * st];
        } else {
            for (long long r = threadIdx.x; r < red_n; r += blockDim.x) acc += (double)x[koff + decode_offset(r, g.nr, g.rshape, g.rstride)];
        }
        double s = block_sum(acc, buf);
        if (threadIdx.x == 0) y[o] = (float)s;
    }
}

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride share, in double.
extern "C" __global__ void sum_squares_partial_f32(const float* x, long long n, double* partial) {
    __shared__ double buf[1024];
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double v = (double)x[i];
        acc += v * v;
    }
    double s = block_sum(acc, buf);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Block per row of length n: y = exp(x - max) / sum exp(x - max), the sum in double.
// Each thread touches only its own columns, so y may alias x.
extern "C" __global__ void softmax_rows_f32(const float* x, float* y, long long rows, long long n) {
    __shared__ double buf[1024];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * n;
        float* yr = y + row * n;
        float m = __int_as_float(0xff800000); // -inf
        for (long long j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, xr[j]);
        m = block_max(m, buf);
        double acc = 0.0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            float e = expf(xr[j] - m);
            yr[j] = e;
            acc += (double)e;
        }
        const float inv = 1.0f / (float)block_sum(acc, buf);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) yr[j] = __fmul_rn(yr[j], inv);
    }
}

// Block per row: dx = y * (dy - sum(dy * y)), the sum in double.
extern "C" __global__ void softmax_rows_backward_f32(const float* y, const float* dy, float* dx, long long rows, long long n) {
    __shared__ double buf[1024];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* yr = y + row * n;
        const float* gr = dy + row * n;
        float* dr = dx + row * n;
        double acc = 0.0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) acc += (double)yr[j] * (double)gr[j];
        const float dot = (float)block_sum(acc, buf);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) dr[j] = __fmul_rn(yr[j], __fsub_rn(gr[j], dot));
    }
}

// Block per row: y = x - (max + (float)log(sum exp((double)(x - max)))), as ops.rs log_softmax
// (whose exp and sum are in f64).
extern "C" __global__ void log_softmax_rows_f32(const float* x, float* y, long long rows, long long n) {
    __shared__ double buf[1024];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * n;
        float* yr = y + row * n;
        float m = __int_as_float(0xff800000); // -inf
        for (long long j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, xr[j]);
        m = block_max(m, buf);
        double acc = 0.0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) acc += exp((double)(xr[j] - m));
        const double s = block_sum(acc, buf);
        const float lse = m + (float)log(s);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) yr[j] = xr[j] - lse;
    }
}

// Block per row: dx = g - exp(y) * sum(g), y being the log-probabilities; the sum in double.
extern "C" __global__ void log_softmax_rows_backward_f32(const float* y, const float* g, float* dx, long long rows, long long n) {
    __shared__ double buf[1024];
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* yr = y + row * n;
        const float* gr = g + row * n;
        float* dr = dx + row * n;
        double acc = 0.0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) acc += (double)gr[j];
        const float s = (float)block_sum(acc, buf);
        for (long long j = threadIdx.x; j < n; j += blockDim.x) dr[j] = __fsub_rn(gr[j], __fmul_rn(expf(yr[j]), s));
    }
}

// One block: s = the sum of partial[0..n) (double, in a fixed order), written as the f32 pair
// out = [hi, lo] with hi = (float)s and lo = (float)(s - hi) (lo = 0 when hi is not finite):
// the device-side gradient norm of BackendStorage::sum_squares_on_device.
extern "C" __global__ void sum_partials_split_f64(const double* partial, long long n, float* out) {
    __shared__ double buf[1024];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    double s = block_sum(acc, buf);
    if (threadIdx.x == 0) {
        float hi = (float)s;
        float lo = isfinite(hi) ? (float)(s - (double)hi) : 0.0f;
        out[0] = hi;
        out[1] = lo;
    }
}
