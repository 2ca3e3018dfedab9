// Counter-based random numbers: Philox4x32-10 (Random123 / cuRAND / PyTorch), the same bits as
// the CPU twin src/rng/philox.rs (its module doc is the specification; tests/kernels_on_cpu.rs
// checks these kernels against it).
//
// A draw is (seed, offset), offset counting Philox blocks of four u32. Element i is lane i % 4 of
// block b = offset + i / 4 (mod 2^64): key = {seed lo, seed hi}, counter = {b lo, b hi, 0, 0}.
// One thread computes one block and writes its (up to) four elements, grid-stride over the
// n.div_ceil(4) blocks, so any launch size is correct (a natural one: n.div_ceil(4) threads).
// The host takes the offset from Philox::reserve(n), which advances past the blocks used.
//
// Uniforms and dropout masks are integer / exact f32 arithmetic: bit-identical to the CPU.
// Normals use the accurate logf, sqrtf and sincosf (not the __logf/__sinf intrinsics): CUDA's
// logf (<= 1 ulp) and sincosf (<= 2 ulp) may round differently from the host libm the CPU uses,
// so a GPU normal can differ from the CPU's by a few ulp. Nothing here has an a*b+c that
// --fmad=true could contract.

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
// 2^-24 and 2π rounded to f32 (= Rust's 1.0 / (1 << 24) as f32 and f32::consts::TAU)
#define PHILOX_INV_2_24 5.9604644775390625e-08f
#define PHILOX_TAU 6.28318530717958647692f

#define PHILOX_BLOCKS(j, n) for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < ((n) + 3) / 4; j += (long long)gridDim.x * blockDim.x)

// One round: (hi, lo) = M·c as a 64-bit product (one mul.wide.u32 on the GPU).
__device__ __forceinline__ void philox_round(unsigned int c[4], unsigned int k0, unsigned int k1) {
    const unsigned long long p0 = (unsigned long long)PHILOX_M0 * c[0];
    const unsigned long long p1 = (unsigned long long)PHILOX_M1 * c[2];
    const unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
    const unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
}

// Block `b` of generator `seed` into r[0..4] (philox4x32_10(counter(b), key(seed))).
__device__ __forceinline__ void philox_block(unsigned long long seed, unsigned long long b, unsigned int r[4]) {
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    r[0] = (unsigned int)b;
    r[1] = (unsigned int)(b >> 32);
    r[2] = 0u;
    r[3] = 0u;
    philox_round(r, k0, k1);
#pragma unroll
    for (int i = 1; i < 10; ++i) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
        philox_round(r, k0, k1);
    }
}

// [0, 1) from the top 24 bits (exact)
__device__ __forceinline__ float philox_uniform(unsigned int x) { return (float)(x >> 8) * PHILOX_INV_2_24; }
// (0, 1] from the top 24 bits (exact)
__device__ __forceinline__ float philox_uniform_open0(unsigned int x) { return (float)((x >> 8) + 1u) * PHILOX_INV_2_24; }

// Box–Muller: r = sqrt(-2 ln u1), θ = 2π u2, (r cos θ, r sin θ)
__device__ __forceinline__ void philox_box_muller(unsigned int a, unsigned int b, float* z0, float* z1) {
    const float u1 = philox_uniform_open0(a);
    const float u2 = philox_uniform(b);
    const float r = sqrtf(-2.0f * logf(u1));
    const float th = PHILOX_TAU * u2;
    float s, c;
    sincosf(th, &s, &c);
    *z0 = r * c;
    *z1 = r * s;
}

// y[i] = uniform in [0, 1) (CPU: rng::philox::fill_uniform)
extern "C" __global__ void philox_uniform_f32(float* y, long long n, unsigned long long seed, unsigned long long offset) {
    PHILOX_BLOCKS(j, n) {
        unsigned int r[4];
        philox_block(seed, offset + (unsigned long long)j, r);
        const long long i = 4 * j;
#pragma unroll
        for (int l = 0; l < 4; ++l)
            if (i + l < n) y[i + l] = philox_uniform(r[l]);
    }
}

// y[i] = standard normal, lanes (0, 1) and (2, 3) of each block (CPU: rng::philox::fill_normal)
extern "C" __global__ void philox_normal_f32(float* y, long long n, unsigned long long seed, unsigned long long offset) {
    PHILOX_BLOCKS(j, n) {
        unsigned int r[4];
        philox_block(seed, offset + (unsigned long long)j, r);
        float z[4];
        philox_box_muller(r[0], r[1], &z[0], &z[1]);
        philox_box_muller(r[2], r[3], &z[2], &z[3]);
        const long long i = 4 * j;
#pragma unroll
        for (int l = 0; l < 4; ++l)
            if (i + l < n) y[i + l] = z[l];
    }
}

// y = x · m with m = 1/(1 - p) where the uniform is >= p (kept, probability 1 - p), else 0
// (CPU: rng::philox::dropout_mask), m also written to `mask`
// unless it is null. y may be x (in place). (CPU: rng::philox::dropout)
extern "C" __global__ void dropout_f32(const float* x, float* y, float* mask, long long n, float p, unsigned long long seed, unsigned long long offset) {
    const float scale = 1.0f / (1.0f - p);
    PHILOX_BLOCKS(j, n) {
        unsigned int r[4];
        philox_block(seed, offset + (unsigned long long)j, r);
        const long long i = 4 * j;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            if (i + l < n) {
                const float m = philox_uniform(r[l]) >= p ? scale : 0.0f;
                if (mask) mask[i + l] = m;
                y[i + l] = x[i + l] * m;
            }
        }
    }
}
