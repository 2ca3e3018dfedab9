// The fused kernels of the single tape nodes of src/autograd/fused (f32 data; host wrappers in
// src/backend/cuda/fused.rs). Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs). CPU twins,
// with the same f32/f64 roundings (the CPU's exp_f32 polynomial aside: here expf):
//   group_norm_act_forward_f32          src/backend/cpu/fused/norm_act.rs  group_norm_act_forward
//   group_norm_act_forward_h16          the same on 16-bit x and y (widened exactly, rounded once)
//   group_norm_act_backward_f32         src/backend/cpu/fused/norm_act.rs  group_norm_act_backward
//                                       (dx, dscale, dshift, and the per-(sample, channel) terms of dgamma, dbeta)
//   group_norm_act_backward_affine_f32  src/backend/cpu/fused/norm_act.rs  group_norm_act_backward (dgamma, dbeta)
//   ode_combine_f32                     src/backend/cpu/fused/ode.rs       ode_combine
//   ode_combine_backward_f32            src/backend/cpu/fused/ode.rs       ode_combine_backward (dk_i = c_i g)
//   orw_loss_partial_f32                src/backend/cpu/fused/loss.rs      orw_loss_forward_backward (sums, dL/dv)
//   orw_loss_finish_f32                 src/backend/cpu/fused/loss.rs      orw_loss_forward_backward (the terms)
//   orw_loss_scale_f32                  src/autograd/fused/loss.rs         the node's backward: saved dL/dv times
//                                       the upstream gradient, read on the device
// "Block per X" kernels loop X over blockIdx.x, blockIdx.x + gridDim.x, ... and need blockDim.x a
// power of two <= 1024; the others are grid-stride, any launch. Element loops read and write
// float4 where every pointer is 16-byte aligned (and, for GroupNorm and the loss, rows are whole
// quads), scalars otherwise. f32 steps that the CPU does separately use the _rn intrinsics, so no
// FMA contraction departs from its rounding.
#include "common.cuh"
#include "half.cuh"

// V consecutive floats (V = 1 or 4) in registers
template <int V>
struct fvec {
    float v[V];
};

template <int V>
__device__ __forceinline__ fvec<V> ldv(const float* p) {
    fvec<V> r;
    if constexpr (V == 4) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        r.v[0] = q.x;
        r.v[1] = q.y;
        r.v[2] = q.z;
        r.v[3] = q.w;
    } else {
        r.v[0] = *p;
    }
    return r;
}

template <int V>
__device__ __forceinline__ void stv(float* p, const fvec<V>& r) {
    if constexpr (V == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
    } else {
        *p = r.v[0];
    }
}

// V consecutive elements from element i of x: f32 (H = 0), or 16-bit values widened exactly
// (H = 1 f16, H = 2 bf16); and the same stored, rounded once to the 16-bit format.
template <int V, int H>
__device__ __forceinline__ fvec<V> ldx(const void* x, long long i) {
    if constexpr (H == 0) {
        return ldv<V>((const float*)x + i);
    } else {
        fvec<V> r;
#pragma unroll
        for (int l = 0; l < V; ++l) r.v[l] = f32_from_h16(((const unsigned short*)x)[i + l], H == 2);
        return r;
    }
}

template <int V, int H>
__device__ __forceinline__ void stx(void* y, long long i, const fvec<V>& r) {
    if constexpr (H == 0) {
        stv<V>((float*)y + i, r);
    } else {
#pragma unroll
        for (int l = 0; l < V; ++l) ((unsigned short*)y)[i + l] = h16_from_f32(r.v[l], H == 2);
    }
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

// silu(a) = a · (1 / (1 + e^−a)), rounded step by step as the CPU's row_forward
__device__ __forceinline__ float silu_rn(float a) {
    return __fmul_rn(a, __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-a))));
}

// ---------------------------------------------------------------- GroupNorm + scale-shift + act

// The block's threads as `cpb` channel slots of `tpc` lanes: tpc the largest power of two <=
// blockDim.x and <= q (the vectors per channel), so that a channel of few elements (4×4 maps, or
// one element) does not leave most of the block idle. Every thread of a slot works on the same
// channel; tpc divides blockDim.x.
struct Split {
    unsigned tpc, slot, lane, cpb;
};

__device__ __forceinline__ Split split_block(long long q) {
    unsigned tpc = blockDim.x;
    while (tpc > 1 && (long long)tpc > q) tpc >>= 1;
    Split s;
    s.tpc = tpc;
    s.slot = threadIdx.x / tpc;
    s.lane = threadIdx.x % tpc;
    s.cpb = blockDim.x / tpc;
    return s;
}

// Sum of v over the `tpc` lanes of each slot (segments of tpc consecutive threads), returned to
// every thread of the slot; `buf` one double per thread. Called by all threads of the block.
__device__ __forceinline__ double slot_sum(double v, unsigned tpc, double* buf) {
    const unsigned t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (unsigned st = tpc >> 1; st > 0; st >>= 1) {
        if (t % tpc < st) buf[t] += buf[t + st];
        __syncthreads();
    }
    const double r = buf[t - t % tpc];
    __syncthreads();
    return r;
}

// One (ni, group) block of the forward: mean and biased variance in double (two passes, as
// norm.rs block_stats), rstd = (float)(1/sqrt(var + eps)); per channel ga = γ·rstd,
// sh = β − mean·ga, sc1 = 1 + scale, shv = shift; y = act((x·ga + sh)·sc1 + shv).
// x and y are f32 (H = 0) or 16-bit (H = 1 f16, H = 2 bf16: widened exactly, y rounded once:
// bit for bit the f32 kernel between a widening and a rounding cast).
template <int V, int H>
__device__ __forceinline__ void gn_act_forward_block(const void* x, const float* gamma, const float* beta, const float* scale, const float* shift, void* y, float* mean,
                                                     float* rstd, long long ng, long long c, long long s, long long groups, float eps, bool silu, double* buf) {
    const long long cpg = c / groups;
    const long long blk = cpg * s;
    const long long xb = ng * blk;
    const long long nq = blk / V;
    double acc = 0.0;
    for (long long q = threadIdx.x; q < nq; q += blockDim.x) {
        const fvec<V> v = ldx<V, H>(x, xb + q * V);
#pragma unroll
        for (int l = 0; l < V; ++l) acc += (double)v.v[l];
    }
    const double mu = block_sum(acc, buf) / (double)blk;
    acc = 0.0;
    for (long long q = threadIdx.x; q < nq; q += blockDim.x) {
        const fvec<V> v = ldx<V, H>(x, xb + q * V);
#pragma unroll
        for (int l = 0; l < V; ++l) {
            const double d = (double)v.v[l] - mu;
            acc += d * d;
        }
    }
    const double var = block_sum(acc, buf) / (double)blk;
    const float r = (float)(1.0 / sqrt(var + (double)eps));
    const float m = (float)mu;
    if (threadIdx.x == 0) {
        mean[ng] = m;
        rstd[ng] = r;
    }
    const long long ni = ng / groups, g0 = (ng % groups) * cpg;
    const long long sq = s / V;
    const Split sp = split_block(sq);
    for (long long ci = sp.slot; ci < cpg; ci += sp.cpb) {
        const long long ch = g0 + ci;
        const float ga = __fmul_rn(gamma[ch], r);
        const float sh = __fsub_rn(beta[ch], __fmul_rn(m, ga));
        const float sc1 = scale != nullptr ? __fadd_rn(1.0f, scale[ni * c + ch]) : 1.0f;
        const float shv = shift != nullptr ? shift[ni * c + ch] : 0.0f;
        const long long row = xb + ci * s;
        for (long long q = sp.lane; q < sq; q += sp.tpc) {
            fvec<V> v = ldx<V, H>(x, row + q * V);
#pragma unroll
            for (int l = 0; l < V; ++l) {
                const float a = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(v.v[l], ga), sh), sc1), shv);
                v.v[l] = silu ? silu_rn(a) : a;
            }
            stx<V, H>(y, row + q * V, v);
        }
    }
}

// Block per (ni, group) of x [n, c, s] (groups divides c): y, and mean, rstd [n·groups].
// scale, shift [n, c] may be null (then 0); silu 0: no activation, 1: SiLU.
extern "C" __global__ void group_norm_act_forward_f32(const float* x, const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ scale,
                                                      const float* __restrict__ shift, float* y, float* __restrict__ mean, float* __restrict__ rstd, long long n,
                                                      long long c, long long s, long long groups, float eps, long long silu) {
    __shared__ double buf[1024];
    const bool vec = s % 4 == 0 && aligned16(x) && aligned16(y);
    for (long long ng = blockIdx.x; ng < n * groups; ng += gridDim.x) {
        if (vec) {
            gn_act_forward_block<4, 0>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
        } else {
            gn_act_forward_block<1, 0>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
        }
    }
}

// The same forward reading and writing 16-bit x and y (bf 1: bfloat16, 0: f16); γ, β, scale,
// shift and the statistics f32. One pass instead of widen, f32 kernel, round.
extern "C" __global__ void group_norm_act_forward_h16(const unsigned short* x, const float* __restrict__ gamma, const float* __restrict__ beta, const float* __restrict__ scale,
                                                      const float* __restrict__ shift, unsigned short* y, float* __restrict__ mean, float* __restrict__ rstd, long long n,
                                                      long long c, long long s, long long groups, float eps, long long silu, unsigned int bf) {
    __shared__ double buf[1024];
    const bool vec = s % 4 == 0;
    for (long long ng = blockIdx.x; ng < n * groups; ng += gridDim.x) {
        if (bf) {
            if (vec) gn_act_forward_block<4, 2>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
            else gn_act_forward_block<1, 2>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
        } else {
            if (vec) gn_act_forward_block<4, 1>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
            else gn_act_forward_block<1, 1>(x, gamma, beta, scale, shift, y, mean, rstd, ng, c, s, groups, eps, silu != 0, buf);
        }
    }
}

// One (ni, group) block of the backward, as the CPU's: pass 1 per channel da = dy·act'(a) (a
// recomputed from x, kept in dx), b = Σ da, sdx = Σ da·x (double); Σ da·x̂ = rstd (sdx − mean b),
// Σ da·z = ga sdx + sh b; dscale = Σ da·z, dshift = b; part = (sc1 Σ da·x̂, sc1 b) for dgamma,
// dbeta. Pass 2: dx = rstd ((da·sc1)·γ − mean(dz γ) − x̂ mean(dz γ x̂)), each thread rereading
// the da it wrote itself.
template <int V>
__device__ __forceinline__ void gn_act_backward_block(const float* x, const float* dy, const float* gamma, const float* beta, const float* scale, const float* shift,
                                                      const float* mean, const float* rstd, float* dx, float* dscale, float* dshift, double* part, long long ng,
                                                      long long c, long long s, long long groups, bool silu, double* buf) {
    const long long cpg = c / groups;
    const long long blk = cpg * s;
    const float* xb = x + ng * blk;
    const float* gb = dy + ng * blk;
    float* db = dx + ng * blk;
    const float m = mean[ng], r = rstd[ng];
    const long long ni = ng / groups, g0 = (ng % groups) * cpg;
    const long long sq = s / V;
    const Split sp = split_block(sq);
    // Σ over the group's channels of sc1·b·γ and sc1·(Σ da·x̂)·γ (lane 0 of each slot)
    double t_dxh = 0.0, t_dxh_xh = 0.0;
    const long long rounds = (cpg + sp.cpb - 1) / sp.cpb;
    for (long long rd = 0; rd < rounds; ++rd) {
        const long long ci = rd * sp.cpb + sp.slot;
        const bool live = ci < cpg;
        const long long ch = g0 + (live ? ci : 0);
        const float gam = gamma[ch];
        const float ga = __fmul_rn(gam, r);
        const float sh = __fsub_rn(beta[ch], __fmul_rn(m, ga));
        const float sc1 = scale != nullptr ? __fadd_rn(1.0f, scale[ni * c + ch]) : 1.0f;
        const float shv = shift != nullptr ? shift[ni * c + ch] : 0.0f;
        double b = 0.0, sdx = 0.0;
        if (live) {
            const float* xr = xb + ci * s;
            const float* gr = gb + ci * s;
            float* dr = db + ci * s;
            for (long long q = sp.lane; q < sq; q += sp.tpc) {
                const fvec<V> xv = ldv<V>(xr + q * V);
                fvec<V> d = ldv<V>(gr + q * V);
#pragma unroll
                for (int l = 0; l < V; ++l) {
                    if (silu) {
                        const float a = __fadd_rn(__fmul_rn(__fadd_rn(__fmul_rn(xv.v[l], ga), sh), sc1), shv);
                        const float sg = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-a)));
                        d.v[l] = __fmul_rn(__fmul_rn(d.v[l], sg), __fadd_rn(1.0f, __fmul_rn(a, __fsub_rn(1.0f, sg))));
                    }
                    b += (double)d.v[l];
                    sdx += (double)d.v[l] * (double)xv.v[l];
                }
                stv<V>(dr + q * V, d);
            }
        }
        b = slot_sum(b, sp.tpc, buf);
        sdx = slot_sum(sdx, sp.tpc, buf);
        if (live && sp.lane == 0) {
            const double a = (double)r * (sdx - (double)m * b);
            const double cz = (double)ga * sdx + (double)sh * b;
            const double s1 = (double)sc1, gm = (double)gam;
            t_dxh += s1 * b * gm;
            t_dxh_xh += s1 * a * gm;
            const long long o = ni * c + ch;
            part[2 * o] = s1 * a;
            part[2 * o + 1] = s1 * b;
            if (dscale != nullptr) dscale[o] = (float)cz;
            if (dshift != nullptr) dshift[o] = (float)b;
        }
    }
    const double inv = 1.0 / (double)blk;
    const float mdxh = (float)(block_sum(t_dxh, buf) * inv);
    const float mdxhxh = (float)(block_sum(t_dxh_xh, buf) * inv);
    for (long long ci = sp.slot; ci < cpg; ci += sp.cpb) {
        const long long ch = g0 + ci;
        const float gam = gamma[ch];
        const float sc1 = scale != nullptr ? __fadd_rn(1.0f, scale[ni * c + ch]) : 1.0f;
        const float* xr = xb + ci * s;
        float* dr = db + ci * s;
        for (long long q = sp.lane; q < sq; q += sp.tpc) {
            const fvec<V> xv = ldv<V>(xr + q * V);
            fvec<V> d = ldv<V>(dr + q * V);
#pragma unroll
            for (int l = 0; l < V; ++l) {
                const float xh = __fmul_rn(__fsub_rn(xv.v[l], m), r);
                d.v[l] = __fmul_rn(r, __fsub_rn(__fsub_rn(__fmul_rn(__fmul_rn(d.v[l], sc1), gam), mdxh), __fmul_rn(xh, mdxhxh)));
            }
            stv<V>(dr + q * V, d);
        }
    }
}

// Block per (ni, group): dx, dscale and dshift [n, c] (each may be null when scale/shift are),
// and part [n, c, 2] (double) = the per-sample terms of (dgamma, dbeta), summed over the samples by
// group_norm_act_backward_affine_f32. mean, rstd: the forward's.
extern "C" __global__ void group_norm_act_backward_f32(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gamma,
                                                       const float* __restrict__ beta, const float* __restrict__ scale, const float* __restrict__ shift,
                                                       const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ dx,
                                                       float* __restrict__ dscale, float* __restrict__ dshift, double* __restrict__ part, long long n, long long c,
                                                       long long s, long long groups, long long silu) {
    __shared__ double buf[1024];
    const bool vec = s % 4 == 0 && aligned16(x) && aligned16(dy) && aligned16(dx);
    for (long long ng = blockIdx.x; ng < n * groups; ng += gridDim.x) {
        if (vec) {
            gn_act_backward_block<4>(x, dy, gamma, beta, scale, shift, mean, rstd, dx, dscale, dshift, part, ng, c, s, groups, silu != 0, buf);
        } else {
            gn_act_backward_block<1>(x, dy, gamma, beta, scale, shift, mean, rstd, dx, dscale, dshift, part, ng, c, s, groups, silu != 0, buf);
        }
    }
}

// Grid-stride over channels: dgamma[ch] = Σ_ni part[ni, ch, 0], dbeta[ch] = Σ_ni part[ni, ch, 1]
// in double, the samples in order (the CPU's order).
extern "C" __global__ void group_norm_act_backward_affine_f32(const double* __restrict__ part, float* __restrict__ dgamma, float* __restrict__ dbeta, long long n,
                                                              long long c) {
    GRID_STRIDE(ch, c) {
        double a = 0.0, b = 0.0;
        for (long long ni = 0; ni < n; ++ni) {
            a += part[2 * (ni * c + ch)];
            b += part[2 * (ni * c + ch) + 1];
        }
        dgamma[ch] = (float)a;
        dbeta[ch] = (float)b;
    }
}

// ---------------------------------------------------------------- ODE step combination

// Up to 8 slopes and their coefficients, by value (src/backend/cuda/fused.rs OdeTerms).
struct OdeTerms {
    const float* k[8];
    float c[8];
    long long n_terms;
};

// The same for the backward's outputs dk_i.
struct OdeGrads {
    float* d[8];
    float c[8];
    long long n_terms;
};

// out[i..i+V) = x + Σ_j c_j k_j, the sum in double in the terms' order, rounded once. (Each
// product of two f32 is exact in double, so a contracted FMA rounds the same.)
template <int T, int V>
__device__ __forceinline__ void ode_point(const float* x, const OdeTerms& t, float* out, long long i) {
    fvec<V> xv = ldv<V>(x + i);
    double a[V];
#pragma unroll
    for (int l = 0; l < V; ++l) a[l] = 0.0;
#pragma unroll
    for (int j = 0; j < T; ++j) {
        const fvec<V> kv = ldv<V>(t.k[j] + i);
        const double cj = (double)t.c[j];
#pragma unroll
        for (int l = 0; l < V; ++l) a[l] += cj * (double)kv.v[l];
    }
#pragma unroll
    for (int l = 0; l < V; ++l) xv.v[l] = (float)((double)xv.v[l] + a[l]);
    stv<V>(out + i, xv);
}

template <int T>
__device__ __forceinline__ void ode_combine_n(const float* x, const OdeTerms& t, float* out, long long n) {
    bool vec = aligned16(x) && aligned16(out);
#pragma unroll
    for (int j = 0; j < T; ++j) vec = vec && aligned16(t.k[j]);
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (vec) {
        const long long nq = n / 4;
        for (long long q = first; q < nq; q += stride) ode_point<T, 4>(x, t, out, q * 4);
        done = nq * 4;
    }
    for (long long i = done + first; i < n; i += stride) ode_point<T, 1>(x, t, out, i);
}

// Grid-stride over the n elements (float4 when x, out and every k_j are 16-byte aligned, with a
// scalar tail): out = x + Σ_{j < t.n_terms} t.c[j] · t.k[j]. The host drops zero coefficients.
extern "C" __global__ void ode_combine_f32(const float* x, float* out, long long n, OdeTerms t) {
    switch (t.n_terms) {
        case 0: ode_combine_n<0>(x, t, out, n); break;
        case 1: ode_combine_n<1>(x, t, out, n); break;
        case 2: ode_combine_n<2>(x, t, out, n); break;
        case 3: ode_combine_n<3>(x, t, out, n); break;
        case 4: ode_combine_n<4>(x, t, out, n); break;
        case 5: ode_combine_n<5>(x, t, out, n); break;
        case 6: ode_combine_n<6>(x, t, out, n); break;
        case 7: ode_combine_n<7>(x, t, out, n); break;
        default: ode_combine_n<8>(x, t, out, n); break;
    }
}

// dk_j[i..i+V) = c_j · g (one f32 rounding: the exact double product, rounded, as the CPU's)
template <int T, int V>
__device__ __forceinline__ void ode_grad_point(const float* g, const OdeGrads& d, long long i) {
    const fvec<V> gv = ldv<V>(g + i);
#pragma unroll
    for (int j = 0; j < T; ++j) {
        fvec<V> o;
#pragma unroll
        for (int l = 0; l < V; ++l) o.v[l] = __fmul_rn(d.c[j], gv.v[l]);
        stv<V>(d.d[j] + i, o);
    }
}

template <int T>
__device__ __forceinline__ void ode_backward_n(const float* g, const OdeGrads& d, long long n) {
    bool vec = aligned16(g);
#pragma unroll
    for (int j = 0; j < T; ++j) vec = vec && aligned16(d.d[j]);
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (vec) {
        const long long nq = n / 4;
        for (long long q = first; q < nq; q += stride) ode_grad_point<T, 4>(g, d, q * 4);
        done = nq * 4;
    }
    for (long long i = done + first; i < n; i += stride) ode_grad_point<T, 1>(g, d, i);
}

// Grid-stride over the n elements of the upstream gradient g: every requested dk_j = c_j · g in
// one read of g (1 <= d.n_terms <= 8; dx = g needs no kernel).
extern "C" __global__ void ode_combine_backward_f32(const float* __restrict__ g, long long n, OdeGrads d) {
    switch (d.n_terms) {
        case 1: ode_backward_n<1>(g, d, n); break;
        case 2: ode_backward_n<2>(g, d, n); break;
        case 3: ode_backward_n<3>(g, d, n); break;
        case 4: ode_backward_n<4>(g, d, n); break;
        case 5: ode_backward_n<5>(g, d, n); break;
        case 6: ode_backward_n<6>(g, d, n); break;
        case 7: ode_backward_n<7>(g, d, n); break;
        default: ode_backward_n<8>(g, d, n); break;
    }
}

// ---------------------------------------------------------------- the ORW-CFM-W2 loss

// Elements [lo, hi) of one sample: sf += Σ (v − u)², sw += Σ (v − v_ref)² (double, each square
// of an f32 difference exact), and dv = cw (v − u) + ca (v − v_ref) in f32 (cw (v − u) without
// v_ref) when dv is not null.
template <int V>
__device__ __forceinline__ void loss_range(const float* v, const float* u, const float* vref, float* dv, long long lo, long long hi, float cw, float ca, double& sf,
                                           double& sw) {
    for (long long e = lo + (long long)threadIdx.x * V; e < hi; e += (long long)blockDim.x * V) {
        const fvec<V> a = ldv<V>(v + e), b = ldv<V>(u + e);
        fvec<V> o;
        if (vref != nullptr) {
            const fvec<V> rr = ldv<V>(vref + e);
#pragma unroll
            for (int l = 0; l < V; ++l) {
                const float d = __fsub_rn(a.v[l], b.v[l]), f = __fsub_rn(a.v[l], rr.v[l]);
                sf += (double)d * (double)d;
                sw += (double)f * (double)f;
                o.v[l] = __fadd_rn(__fmul_rn(cw, d), __fmul_rn(ca, f));
            }
        } else {
#pragma unroll
            for (int l = 0; l < V; ++l) {
                const float d = __fsub_rn(a.v[l], b.v[l]);
                sf += (double)d * (double)d;
                o.v[l] = __fmul_rn(cw, d);
            }
        }
        if (dv != nullptr) stv<V>(dv + e, o);
    }
}

// v, u, v_ref [b, p] (v_ref may be null: no W2 term), w [b]. The work is split into b·nchunks
// pairs (sample i, chunk k: elements [k·chunk, min((k+1)·chunk, p)) of sample i), each pair a
// block's: partial[2·pair] = Σ (v − u)², partial[2·pair + 1] = Σ (v − v_ref)² (double), so the
// partial sums do not depend on the launch. dv (may be null) = dL/dv for an upstream gradient 1:
// cw = (float)(2/(b·p) · w_i), ca = (float)(2/(b·p) · α), as the CPU's coefs(1, ...).
extern "C" __global__ void orw_loss_partial_f32(const float* __restrict__ v, const float* __restrict__ u, const float* __restrict__ vref, const float* __restrict__ w,
                                                float* __restrict__ dv, double* __restrict__ partial, long long b, long long p, long long chunk, long long nchunks,
                                                float alpha) {
    __shared__ double buf[1024];
    const double c2 = 2.0 / ((double)b * (double)p);
    const float ca = (float)(c2 * (double)alpha);
    const bool vec = p % 4 == 0 && chunk % 4 == 0 && aligned16(v) && aligned16(u) && (vref == nullptr || aligned16(vref)) && (dv == nullptr || aligned16(dv));
    for (long long pair = blockIdx.x; pair < b * nchunks; pair += gridDim.x) {
        const long long i = pair / nchunks, k = pair - i * nchunks;
        const long long end = (k + 1) * chunk < p ? (k + 1) * chunk : p;
        const long long lo = i * p + k * chunk, hi = i * p + end;
        const float cw = (float)(c2 * (double)w[i]);
        double sf = 0.0, sw = 0.0;
        if (vec) {
            loss_range<4>(v, u, vref, dv, lo, hi, cw, ca, sf, sw);
        } else {
            loss_range<1>(v, u, vref, dv, lo, hi, cw, ca, sf, sw);
        }
        sf = block_sum(sf, buf);
        sw = block_sum(sw, buf);
        if (threadIdx.x == 0) {
            partial[2 * pair] = sf;
            partial[2 * pair + 1] = sw;
        }
    }
}

// One block: per sample the chunks' sums in order, then fm = (1/b) Σ w_i (sf_i / p),
// w2 = (1/b) Σ sw_i / p, total = fm + α w2 (double), written as terms = [fm, w2, total] (f32).
extern "C" __global__ void orw_loss_finish_f32(const double* __restrict__ partial, const float* __restrict__ w, long long b, long long p, long long nchunks, float alpha,
                                               float* __restrict__ terms) {
    __shared__ double buf[1024];
    double afm = 0.0, aw2 = 0.0;
    for (long long i = threadIdx.x; i < b; i += blockDim.x) {
        double sf = 0.0, sw = 0.0;
        for (long long k = 0; k < nchunks; ++k) {
            sf += partial[2 * (i * nchunks + k)];
            sw += partial[2 * (i * nchunks + k) + 1];
        }
        afm += (double)w[i] * (sf / (double)p);
        aw2 += sw / (double)p;
    }
    const double fm = block_sum(afm, buf) / (double)b;
    const double w2 = block_sum(aw2, buf) / (double)b;
    if (threadIdx.x == 0) {
        terms[0] = (float)fm;
        terms[1] = (float)w2;
        terms[2] = (float)(fm + (double)alpha * w2);
    }
}

// Grid-stride: out = g[0] · dv, the upstream gradient g (one value) read on the device, so the
// backward never waits for the host.
extern "C" __global__ void orw_loss_scale_f32(const float* __restrict__ dv, const float* __restrict__ g, float* __restrict__ out, long long n) {
    const float gv = g[0];
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(dv) && aligned16(out)) {
        const long long nq = n / 4;
        for (long long q = first; q < nq; q += stride) {
            fvec<4> d = ldv<4>(dv + 4 * q);
#pragma unroll
            for (int l = 0; l < 4; ++l) d.v[l] = __fmul_rn(gv, d.v[l]);
            stv<4>(out + 4 * q, d);
        }
        done = nq * 4;
    }
    for (long long i = done + first; i < n; i += stride) out[i] = __fmul_rn(gv, dv[i]);
}
