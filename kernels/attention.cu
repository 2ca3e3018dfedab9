// Flash-style torchcfm QKV attention (QKVAttentionLegacy / QKVAttention), f32 with f32
// accumulation: qkv [B, 3*heads*ch, T] -> out [B, heads*ch, T], softmax over keys of
// scale * q^T k, scale = 1/sqrt(ch). q, k, v of one (batch, head) are [ch, T] row-major slabs of
// the packed qkv, read in place (`attn_offsets`, both head orders); nothing T x T is ever in
// memory. Compiled at run time by NVRTC (src/backend/cuda/nvrtc.rs). CPU twins:
//   flash_attention_forward_d{32,64,128}_f32   src/backend/cpu/fused/attention.rs  flash_attention_forward (out, lse)
//   flash_attention_backward_dsum_f32          the same file's flash_attention_backward (D = rowsum(dO * O))
//   flash_attention_backward_d{32,64,128}_f32  the same (dK, dV; dQ per key tile)
//   flash_attention_backward_dq_f32            the same (dQ: the key tiles' partials summed in order)
// The d32/d64/d128 variants hold the head dimension padded to 32/64/128 (any ch up to it).
//
// Every tiled kernel runs blocks of exactly ATT_THREADS = 128 threads, seen as 16 rows (ty) of 8
// lanes (tx); the 8 lanes of a row are consecutive lanes of one warp, so a row's reductions are
// three __shfl_xor_sync steps. Grid: x = tile index, y = batch*head (looping by gridDim.y past
// 65535). Dynamic shared memory: as laid out at the top of flash_fwd / flash_bwd, sized by the
// host (src/backend/cuda/attention.rs, forward_smem_bytes / backward_smem_bytes).
//
// Forward (per block: BR = 64 queries; key tiles of BC = 64 streamed through shared memory):
// S = (q * scale * log2 e)^T k per tile in registers (4 rows x 8 keys per thread), an online
// softmax in base 2 (running max m and sum l per row, the accumulator rescaled by exp2(m_old -
// m_new)), P through shared memory (transposed) into O += P V^T (4 rows x DP/8 channels per
// thread); at the end O / l is staged through shared memory and written coalesced, and
// lse = (m + log2 l) * ln 2 (natural log, as the CPU twin).
//
// Backward (FlashAttention-2, no float atomics): D = rowsum(dO * O) first (dsum kernel, f64 sum),
// then one block per key tile of BC keys (BC = 64, or 32 for d128) walks the query tiles of
// BR = 32 in order: S and dP = dO^T V recomputed, P = exp2(S * scale * log2 e - lse * log2 e),
// dS = P * (dP - D); dV += dO P and dK += Q dS accumulate in registers, and the tile's share of
// dQ = scale * K dS^T is written to its own slot of `dqp` ([key tile][B*heads][ch][T]); the dq
// kernel sums the slots in key-tile order (deterministic). With one key tile (T <= BC) the
// backward kernel writes dQ straight into dqkv and the dq kernel is not launched.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f
#define ATT_FULL_MASK 0xffffffffu

// Element offsets of q, k, v of batch*head `bh` in the packed qkv (order 0: QKVAttentionLegacy,
// heads first; 1: QKVAttention, [q of all heads | k | v]); as AttnGeom::offsets.
__device__ __forceinline__ void attn_offsets(long long bh, long long heads, long long ch, long long t, long long order, long long* oq, long long* ok, long long* ov) {
    const long long bi = bh / heads, h = bh % heads;
    const long long c = heads * ch;
    const long long base = bi * 3 * c * t;
    if (order == 0) {
        const long long o = base + h * 3 * ch * t;
        *oq = o;
        *ok = o + ch * t;
        *ov = o + 2 * ch * t;
    } else {
        const long long o = base + h * ch * t;
        *oq = o;
        *ok = o + c * t;
        *ov = o + 2 * c * t;
    }
}

// The slabs of batch*head `bh` in the packed qkv: their element offsets (`attn_offsets`) and
// q, k, v themselves.
struct AttnHead {
    long long oq, ok, ov;
    const float *q, *k, *v;
};
__device__ __forceinline__ AttnHead attn_head(const float* qkv, long long bh, long long heads, long long ch, long long t, long long order) {
    AttnHead a;
    attn_offsets(bh, heads, ch, t, order, &a.oq, &a.ok, &a.ov);
    a.q = qkv + a.oq;
    a.k = qkv + a.ok;
    a.v = qkv + a.ov;
    return a;
}

// Sum / maximum over the 8 lanes of a row (lanes differing in their low three bits).
__device__ __forceinline__ float row8_sum(float v) {
    v += __shfl_xor_sync(ATT_FULL_MASK, v, 1);
    v += __shfl_xor_sync(ATT_FULL_MASK, v, 2);
    v += __shfl_xor_sync(ATT_FULL_MASK, v, 4);
    return v;
}
__device__ __forceinline__ float row8_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(ATT_FULL_MASK, v, 1));
    v = fmaxf(v, __shfl_xor_sync(ATT_FULL_MASK, v, 2));
    v = fmaxf(v, __shfl_xor_sync(ATT_FULL_MASK, v, 4));
    return v;
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ float f4(const float4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

// ---------------------------------------------------------------- forward

#define FWD_BR 64
#define FWD_BC 64

// Shared memory of the forward (the host's cuda::attention::forward_smem_bytes):
// Q (then the output tile) [DP][BR], K as [DP][BC] then V as [BC][DP + 4], P transposed [BC][BR].

template <int DP>
__device__ __forceinline__ void flash_fwd(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    constexpr int BR = FWD_BR, BC = FWD_BC, NO = DP / 32, VS = DP + 4;
    extern __shared__ __align__(16) float attn_smem[];
    float* const qs = attn_smem;       // [DP][BR]: q * scale * log2 e; at the end, the output tile
    float* const kv = qs + DP * BR;    // K [DP][BC], then V^T [BC][VS]
    float* const ps = kv + BC * VS;    // P^T [BC][BR]
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const long long i0 = (long long)blockIdx.x * BR;
    const float sl2 = scale * ATT_LOG2E;
    const float neg_inf = __int_as_float(0xff800000);
    for (long long bh = blockIdx.y; bh < nbh; bh += gridDim.y) {
        const AttnHead hd = attn_head(qkv, bh, heads, ch, t, order);
        const float *q = hd.q, *k = hd.k, *v = hd.v;
        __syncthreads(); // the previous batch*head's output tile has been written out
        for (int e = tid; e < DP * BR; e += ATT_THREADS) {
            const int d = e / BR, i = e % BR;
            qs[e] = (d < ch && i0 + i < t) ? q[d * t + i0 + i] * sl2 : 0.0f;
        }
        float o[4][4 * NO];
        float m[4], l[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            m[r] = neg_inf;
            l[r] = 0.0f;
#pragma unroll
            for (int c = 0; c < 4 * NO; ++c) o[r][c] = 0.0f;
        }
        for (long long j0 = 0; j0 < t; j0 += BC) {
            const int bj = (int)(t - j0 < BC ? t - j0 : BC);
            __syncthreads(); // the previous tile's V and P are read (and the Q tile is written)
            for (int e = tid; e < DP * BC; e += ATT_THREADS) {
                const int d = e / BC, j = e % BC;
                kv[e] = (d < ch && j < bj) ? k[d * t + j0 + j] : 0.0f;
            }
            __syncthreads();
            // S for rows ty*4 + r and keys tx*4 + c + 32*h (index 4h + c)
            float s[4][8];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 8; ++c) s[r][c] = 0.0f;
            for (int d = 0; d < ch; ++d) {
                const float4 qa = ld4(qs + d * BR + ty * 4);
                const float4 k0 = ld4(kv + d * BC + tx * 4);
                const float4 k1 = ld4(kv + d * BC + 32 + tx * 4);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const float qr = f4(qa, r);
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        s[r][c] = fmaf(qr, f4(k0, c), s[r][c]);
                        s[r][4 + c] = fmaf(qr, f4(k1, c), s[r][4 + c]);
                    }
                }
            }
            // online softmax (base 2) per row; keys past T are -inf
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float mx = neg_inf;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    const int j = tx * 4 + (c & 3) + 32 * (c >> 2);
                    if (j >= bj) s[r][c] = neg_inf;
                    mx = fmaxf(mx, s[r][c]);
                }
                mx = row8_max(mx);
                const float mn = fmaxf(m[r], mx);
                const float corr = exp2f(m[r] - mn);
                float sum = 0.0f;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    s[r][c] = exp2f(s[r][c] - mn);
                    sum += s[r][c];
                }
                sum = row8_sum(sum);
                l[r] = l[r] * corr + sum;
                m[r] = mn;
#pragma unroll
                for (int c = 0; c < 4 * NO; ++c) o[r][c] *= corr;
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int j = tx * 4 + (c & 3) + 32 * (c >> 2);
                st4(ps + j * BR + ty * 4, make_float4(s[0][c], s[1][c], s[2][c], s[3][c]));
            }
            __syncthreads(); // K is read, P written
            for (int e = tid; e < DP * BC; e += ATT_THREADS) {
                const int d = e / BC, j = e % BC;
                kv[j * VS + d] = (d < ch && j < bj) ? v[d * t + j0 + j] : 0.0f;
            }
            __syncthreads();
            // O[row][d] += sum_j P[row][j] V[d][j], channels d = tx*4 + c + 32*n (index 4n + c)
            for (int j = 0; j < bj; ++j) {
                const float4 pa = ld4(ps + j * BR + ty * 4);
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    const float4 vb = ld4(kv + j * VS + 32 * n + tx * 4);
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const float pr = f4(pa, r);
#pragma unroll
                        for (int c = 0; c < 4; ++c) o[r][4 * n + c] = fmaf(pr, f4(vb, c), o[r][4 * n + c]);
                    }
                }
            }
        }
        // the output tile O / l into qs as [DP][BR] (Q is no longer read), then written coalesced
        float inv[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) inv[r] = 1.0f / l[r];
#pragma unroll
        for (int n = 0; n < NO; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int d = 32 * n + tx * 4 + c;
                st4(qs + d * BR + ty * 4, make_float4(o[0][4 * n + c] * inv[0], o[1][4 * n + c] * inv[1], o[2][4 * n + c] * inv[2], o[3][4 * n + c] * inv[3]));
            }
        if (tx == 0) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const long long i = i0 + ty * 4 + r;
                if (i < t) lse[bh * t + i] = (m[r] + log2f(l[r])) * ATT_LN2;
            }
        }
        __syncthreads();
        float* ob = out + bh * ch * t;
        for (int e = tid; e < DP * BR; e += ATT_THREADS) {
            const int d = e / BR, i = e % BR;
            if (d < ch && i0 + i < t) ob[d * t + i0 + i] = qs[e];
        }
    }
}

// out [B, heads*ch, T] and lse [B*heads, T] from qkv; grid (ceil(T / 64), min(B*heads, 65535)),
// 128 threads, cuda::attention::forward_smem_bytes(DP) of dynamic shared memory.
extern "C" __global__ void flash_attention_forward_d32_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_fwd<32>(qkv, out, lse, nbh, heads, ch, t, order, scale);
}
extern "C" __global__ void flash_attention_forward_d64_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_fwd<64>(qkv, out, lse, nbh, heads, ch, t, order, scale);
}
extern "C" __global__ void flash_attention_forward_d128_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_fwd<128>(qkv, out, lse, nbh, heads, ch, t, order, scale);
}

// ---------------------------------------------------------------- backward

#define BWD_BR 32

// Shared memory of the backward (the host's cuda::attention::backward_smem_bytes): K, V
// [DP][BC + 4]; Q, dO [DP][BR + 4]; P, dS [BR][BC + 4]; dS^T [BC][BR + 4]; lse * log2 e and D [BR].

template <int DP, int BC>
__device__ __forceinline__ void flash_bwd(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dqkv, float* __restrict__ dqp, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    constexpr int BR = BWD_BR, KS = BC + 4, QS = BR + 4, NM = BC / 32, NK = DP / 16;
    extern __shared__ __align__(16) float attn_smem[];
    float* const ks = attn_smem;      // [DP][KS]
    float* const vs = ks + DP * KS;   // [DP][KS]
    float* const qs = vs + DP * KS;   // [DP][QS]
    float* const dos = qs + DP * QS;  // [DP][QS]
    float* const ps = dos + DP * QS;  // [BR][KS]
    float* const dss = ps + BR * KS;  // [BR][KS]
    float* const dst = dss + BR * KS; // [BC][QS]
    float* const ls = dst + BC * QS;  // [BR]
    float* const ds = ls + BR;        // [BR]
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const long long kt = blockIdx.x, j0 = kt * BC;
    const int bj = (int)(t - j0 < BC ? t - j0 : BC);
    const float sl2 = scale * ATT_LOG2E;
    const long long nkt = (t + BC - 1) / BC;
    for (long long bh = blockIdx.y; bh < nbh; bh += gridDim.y) {
        const AttnHead hd = attn_head(qkv, bh, heads, ch, t, order);
        const float *q = hd.q, *k = hd.k, *v = hd.v;
        const float* go = dout + bh * ch * t;
        __syncthreads(); // the previous batch*head is done with K
        for (int e = tid; e < DP * BC; e += ATT_THREADS) {
            const int d = e / BC, j = e % BC;
            const bool in = d < ch && j < bj;
            ks[d * KS + j] = in ? k[d * t + j0 + j] : 0.0f;
            vs[d * KS + j] = in ? v[d * t + j0 + j] : 0.0f;
        }
        // dV (rows d = ty + 16*kk, keys tx*4 + c + 32*h: index [kk][4h + c]) and dK, over all queries
        float dv[NK][4 * NM], dk[NK][4 * NM];
#pragma unroll
        for (int a = 0; a < NK; ++a)
#pragma unroll
            for (int c = 0; c < 4 * NM; ++c) {
                dv[a][c] = 0.0f;
                dk[a][c] = 0.0f;
            }
        for (long long i0 = 0; i0 < t; i0 += BR) {
            const int bi = (int)(t - i0 < BR ? t - i0 : BR);
            __syncthreads(); // the previous query tile's Q, dO, P, dS are read
            for (int e = tid; e < DP * BR; e += ATT_THREADS) {
                const int d = e / BR, i = e % BR;
                const bool in = d < ch && i < bi;
                qs[d * QS + i] = in ? q[d * t + i0 + i] : 0.0f;
                dos[d * QS + i] = in ? go[d * t + i0 + i] : 0.0f;
            }
            if (tid < BR) {
                ls[tid] = tid < bi ? lse[bh * t + i0 + tid] * ATT_LOG2E : 0.0f;
                ds[tid] = tid < bi ? dsum[bh * t + i0 + tid] : 0.0f;
            }
            __syncthreads();
            // S and dP for rows ty*2 + r, keys tx*4 + c + 32*h (index 4h + c)
            float s[2][4 * NM], dp[2][4 * NM];
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < 4 * NM; ++c) {
                    s[r][c] = 0.0f;
                    dp[r][c] = 0.0f;
                }
            for (int d = 0; d < ch; ++d) {
                const float2 qa = *reinterpret_cast<const float2*>(qs + d * QS + ty * 2);
                const float2 oa = *reinterpret_cast<const float2*>(dos + d * QS + ty * 2);
#pragma unroll
                for (int h = 0; h < NM; ++h) {
                    const float4 kb = ld4(ks + d * KS + 32 * h + tx * 4);
                    const float4 vb = ld4(vs + d * KS + 32 * h + tx * 4);
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        s[0][4 * h + c] = fmaf(qa.x, f4(kb, c), s[0][4 * h + c]);
                        s[1][4 * h + c] = fmaf(qa.y, f4(kb, c), s[1][4 * h + c]);
                        dp[0][4 * h + c] = fmaf(oa.x, f4(vb, c), dp[0][4 * h + c]);
                        dp[1][4 * h + c] = fmaf(oa.y, f4(vb, c), dp[1][4 * h + c]);
                    }
                }
            }
            // P = exp2(S * scale * log2 e - lse * log2 e), dS = P * (dP - D); 0 outside T x T
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = ty * 2 + r;
                const float li = ls[i], di = ds[i];
#pragma unroll
                for (int c = 0; c < 4 * NM; ++c) {
                    const int j = tx * 4 + (c & 3) + 32 * (c >> 2);
                    const float p = (i < bi && j < bj) ? exp2f(s[r][c] * sl2 - li) : 0.0f;
                    s[r][c] = p;
                    dp[r][c] = p * (dp[r][c] - di);
                }
#pragma unroll
                for (int h = 0; h < NM; ++h) {
                    st4(ps + i * KS + 32 * h + tx * 4, make_float4(s[r][4 * h], s[r][4 * h + 1], s[r][4 * h + 2], s[r][4 * h + 3]));
                    st4(dss + i * KS + 32 * h + tx * 4, make_float4(dp[r][4 * h], dp[r][4 * h + 1], dp[r][4 * h + 2], dp[r][4 * h + 3]));
                }
            }
#pragma unroll
            for (int c = 0; c < 4 * NM; ++c) {
                const int j = tx * 4 + (c & 3) + 32 * (c >> 2);
                *reinterpret_cast<float2*>(dst + j * QS + ty * 2) = make_float2(dp[0][c], dp[1][c]);
            }
            __syncthreads();
            // dV[d][j] += sum_i dO[d][i] P[i][j];  dK[d][j] += sum_i Q[d][i] dS[i][j]
            for (int i = 0; i < bi; ++i) {
                float ga[NK], qa[NK];
#pragma unroll
                for (int a = 0; a < NK; ++a) {
                    ga[a] = dos[(ty + 16 * a) * QS + i];
                    qa[a] = qs[(ty + 16 * a) * QS + i];
                }
#pragma unroll
                for (int h = 0; h < NM; ++h) {
                    const float4 pb = ld4(ps + i * KS + 32 * h + tx * 4);
                    const float4 sb = ld4(dss + i * KS + 32 * h + tx * 4);
#pragma unroll
                    for (int a = 0; a < NK; ++a)
#pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            dv[a][4 * h + c] = fmaf(ga[a], f4(pb, c), dv[a][4 * h + c]);
                            dk[a][4 * h + c] = fmaf(qa[a], f4(sb, c), dk[a][4 * h + c]);
                        }
                }
            }
            // this key tile's dQ[d][i] = scale * sum_j K[d][j] dS[i][j], rows d = ty + 16*kk,
            // queries tx*4 + c
            float dq[NK][4];
#pragma unroll
            for (int a = 0; a < NK; ++a)
#pragma unroll
                for (int c = 0; c < 4; ++c) dq[a][c] = 0.0f;
            for (int j = 0; j < bj; ++j) {
                const float4 sa = ld4(dst + j * QS + tx * 4);
#pragma unroll
                for (int a = 0; a < NK; ++a) {
                    const float kk = ks[(ty + 16 * a) * KS + j];
#pragma unroll
                    for (int c = 0; c < 4; ++c) dq[a][c] = fmaf(kk, f4(sa, c), dq[a][c]);
                }
            }
            float* dqb = nkt == 1 ? dqkv + hd.oq : dqp + (kt * nbh + bh) * ch * t;
#pragma unroll
            for (int a = 0; a < NK; ++a) {
                const int d = ty + 16 * a;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int i = tx * 4 + c;
                    if (d < ch && i < bi) dqb[d * t + i0 + i] = dq[a][c] * scale;
                }
            }
        }
        float* dkb = dqkv + hd.ok;
        float* dvb = dqkv + hd.ov;
#pragma unroll
        for (int a = 0; a < NK; ++a) {
            const int d = ty + 16 * a;
#pragma unroll
            for (int c = 0; c < 4 * NM; ++c) {
                const int j = tx * 4 + (c & 3) + 32 * (c >> 2);
                if (d < ch && j < bj) {
                    dkb[d * t + j0 + j] = dk[a][c] * scale;
                    dvb[d * t + j0 + j] = dv[a][c];
                }
            }
        }
    }
}

// dK, dV into dqkv (packed like qkv) and dQ per key tile into dqp [ceil(T / BC)][B*heads][ch][T]
// (into dqkv itself when T <= BC), from qkv, dout [B, heads*ch, T], lse and D [B*heads, T];
// grid (ceil(T / BC), min(B*heads, 65535)), 128 threads, cuda::attention::backward_smem_bytes(DP, BC)
// of dynamic shared memory; BC = 64 (d32, d64) or 32 (d128).
extern "C" __global__ void flash_attention_backward_d32_f32(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dqkv, float* __restrict__ dqp, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_bwd<32, 64>(qkv, dout, lse, dsum, dqkv, dqp, nbh, heads, ch, t, order, scale);
}
extern "C" __global__ void flash_attention_backward_d64_f32(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dqkv, float* __restrict__ dqp, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_bwd<64, 64>(qkv, dout, lse, dsum, dqkv, dqp, nbh, heads, ch, t, order, scale);
}
extern "C" __global__ void flash_attention_backward_d128_f32(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum, float* __restrict__ dqkv, float* __restrict__ dqp, long long nbh, long long heads, long long ch, long long t, long long order, float scale) {
    flash_bwd<128, 32>(qkv, dout, lse, dsum, dqkv, dqp, nbh, heads, ch, t, order, scale);
}

// D[bh, i] = sum_c dO[bh, c, i] * O[bh, c, i] (f64 sum, as the CPU twin), grid-stride over B*heads*T.
extern "C" __global__ void flash_attention_backward_dsum_f32(const float* __restrict__ out, const float* __restrict__ dout, float* __restrict__ dsum, long long nbh, long long ch, long long t) {
    GRID_STRIDE(e, nbh * t) {
        const long long bh = e / t, i = e % t;
        const float* o = out + bh * ch * t + i;
        const float* g = dout + bh * ch * t + i;
        double acc = 0.0;
        for (long long c = 0; c < ch; ++c) acc += (double)o[c * t] * (double)g[c * t];
        dsum[e] = (float)acc;
    }
}

// dQ = the sum of the nkt key tiles' partials, in tile order, into dqkv's q slots; grid-stride
// over B*heads*ch*T.
extern "C" __global__ void flash_attention_backward_dq_f32(const float* __restrict__ dqp, float* __restrict__ dqkv, long long nkt, long long nbh, long long heads, long long ch, long long t, long long order) {
    const long long n = ch * t, total = nbh * n;
    GRID_STRIDE(e, total) {
        const long long bh = e / n, w = e % n;
        float acc = 0.0f;
        for (long long a = 0; a < nkt; ++a) acc += dqp[a * total + e];
        long long oq, ok, ov;
        attn_offsets(bh, heads, ch, t, order, &oq, &ok, &ov);
        dqkv[oq + w] = acc;
    }
}
