// Group normalisation over x [n, c, s] (groups divides c; mean and rstd hold n*groups values),
// forward and backward, f32 data with f64 statistics. Compiled at run time by NVRTC
// (src/backend/cuda/nvrtc.rs). CPU twins, with the same f32/f64 roundings:
//   group_norm_forward_f32          src/backend/cpu/norm.rs  group_norm_forward
//   group_norm_backward_input_f32   src/backend/cpu/norm.rs  group_norm_backward (dx)
//   group_norm_backward_affine_f32  src/backend/cpu/norm.rs  group_norm_backward (dgamma, dbeta)
// Every kernel is "block per X": X runs over blockIdx.x, blockIdx.x + gridDim.x, ..., and
// blockDim.x must be a power of two <= 1024. f32 steps use __fmul_rn/__fsub_rn/__fadd_rn so that
// no FMA contraction departs from the CPU's rounding.
#include "common.cuh"

// Block per (ni, group): two-pass mean and biased variance in double; rstd = (float)(1/sqrt(var + eps));
// per channel ga = gamma*rstd, sh = beta - meanf*ga; y = x*ga + sh. y may alias x.
extern "C" __global__ void group_norm_forward_f32(const float* x, const float* __restrict__ gamma, const float* __restrict__ beta, float* y, float* __restrict__ mean,
                                                  float* __restrict__ rstd, long long n, long long c, long long s, long long groups, float eps) {
    __shared__ double buf[1024];
    const long long cpg = c / groups;
    const long long blk = cpg * s;
    for (long long ng = blockIdx.x; ng < n * groups; ng += gridDim.x) {
        const float* xb = x + ng * blk;
        float* yb = y + ng * blk;
        double acc = 0.0;
        for (long long k = threadIdx.x; k < blk; k += blockDim.x) acc += (double)xb[k];
        const double mu = block_sum(acc, buf) / (double)blk;
        acc = 0.0;
        for (long long k = threadIdx.x; k < blk; k += blockDim.x) {
            double d = (double)xb[k] - mu;
            acc += d * d;
        }
        const double var = block_sum(acc, buf) / (double)blk;
        const float r = (float)(1.0 / sqrt(var + (double)eps));
        const float meanf = (float)mu;
        if (threadIdx.x == 0) {
            mean[ng] = meanf;
            rstd[ng] = r;
        }
        const long long g0 = (ng % groups) * cpg;
        for (long long k = threadIdx.x; k < blk; k += blockDim.x) {
            const long long ci = g0 + k / s;
            const float ga = __fmul_rn(gamma[ci], r);
            const float sh = __fsub_rn(beta[ci], __fmul_rn(meanf, ga));
            yb[k] = __fadd_rn(__fmul_rn(xb[k], ga), sh);
        }
    }
}

// Block per (ni, group): xh = (x - m)*r (f32); sum_dxh = sum g*gamma, sum_dxh_xh = sum g*xh*gamma (f64);
// mdxh, mdxhxh = those times 1/blk, rounded to f32; dx = r*(g*gamma - mdxh - xh*mdxhxh).
extern "C" __global__ void group_norm_backward_input_f32(const float* x, const float* dy, const float* __restrict__ gamma, const float* __restrict__ mean,
                                                         const float* __restrict__ rstd, float* dx, long long n, long long c, long long s, long long groups) {
    __shared__ double buf[1024];
    const long long cpg = c / groups;
    const long long blk = cpg * s;
    for (long long ng = blockIdx.x; ng < n * groups; ng += gridDim.x) {
        const float* xb = x + ng * blk;
        const float* gb = dy + ng * blk;
        float* db = dx + ng * blk;
        const float m = mean[ng], r = rstd[ng];
        const long long g0 = (ng % groups) * cpg;
        double a = 0.0, b = 0.0;
        for (long long k = threadIdx.x; k < blk; k += blockDim.x) {
            const double ga = (double)gamma[g0 + k / s];
            const double gv = (double)gb[k];
            const double xh = (double)__fmul_rn(__fsub_rn(xb[k], m), r);
            a += gv * xh * ga;
            b += gv * ga;
        }
        const double inv = 1.0 / (double)blk;
        const double sum_dxh_xh = block_sum(a, buf);
        const double sum_dxh = block_sum(b, buf);
        const float mdxh = (float)(sum_dxh * inv);
        const float mdxhxh = (float)(sum_dxh_xh * inv);
        for (long long k = threadIdx.x; k < blk; k += blockDim.x) {
            const float ga = gamma[g0 + k / s];
            const float xv = xb[k], gv = gb[k];
            const float xh = __fmul_rn(__fsub_rn(xv, m), r);
            db[k] = __fmul_rn(r, __fsub_rn(__fsub_rn(__fmul_rn(gv, ga), mdxh), __fmul_rn(xh, mdxhxh)));
        }
    }
}

// Block per channel ci: dgamma[ci] = sum over ni, j of dy * (double)((x - m)*r), dbeta[ci] = sum of dy,
// both in double; m, r those of (ni, ci / (c/groups)).
extern "C" __global__ void group_norm_backward_affine_f32(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ mean, const float* __restrict__ rstd,
                                                          float* __restrict__ dgamma, float* __restrict__ dbeta, long long n, long long c, long long s, long long groups) {
    __shared__ double buf[1024];
    const long long cpg = c / groups;
    for (long long ci = blockIdx.x; ci < c; ci += gridDim.x) {
        const long long gi = ci / cpg;
        double a = 0.0, b = 0.0;
        for (long long k = threadIdx.x; k < n * s; k += blockDim.x) {
            const long long ni = k / s;
            const long long j = k - ni * s;
            const long long st = ni * groups + gi;
            const float m = mean[st], r = rstd[st];
            const long long off = (ni * c + ci) * s + j;
            const double gv = (double)dy[off];
            a += gv * (double)__fmul_rn(__fsub_rn(x[off], m), r);
            b += gv;
        }
        const double sa = block_sum(a, buf);
        const double sb = block_sum(b, buf);
        if (threadIdx.x == 0) {
            dgamma[ci] = (float)sa;
            dbeta[ci] = (float)sb;
        }
    }
}
