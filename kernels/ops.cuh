// The element-wise ops' arithmetic, shared by the f32 kernels (elementwise.cu) and the 16-bit
// ones (half.cu, which widen, apply the same f32 arithmetic and round once). Pasted in by
// `nvrtc::expand_headers`. CPU twins: src/backend/cpu/elementwise.rs, simd.rs, autograd/ops.rs.

// op: 0 x+s, 1 x·s, 2 exp, 3 relu, 4 x², 5 silu, 6 sigmoid, 7 −x, 8 gelu (erf), 9 quick_gelu
__device__ __forceinline__ float unary_apply(long long op, float s, float v) {
    switch (op) {
        case 0: return v + s;
        case 1: return v * s;
        case 2: return expf(v);
        case 3: return fmaxf(v, 0.0f);
        case 4: return v * v;
        case 5: return v / (1.0f + expf(-v));
        case 6: return 1.0f / (1.0f + expf(-v));
        case 8: return 0.5f * v * erfcf(-v * 0.70710678118654752f);
        case 9: return v / (1.0f + expf(-1.702f * v));
        default: return -v;
    }
}

// dx of unary op `op` from the output gradient gv, the input x and the output y
__device__ __forceinline__ float unary_grad(long long op, float gv, float x, float y) {
    switch (op) {
        case 2: return gv * y;
        case 3: return x > 0.0f ? gv : 0.0f;
        case 4: return gv * (2.0f * x);
        case 5: {
            float sg = 1.0f / (1.0f + expf(-x));
            return gv * (sg * (1.0f + x * (1.0f - sg)));
        }
        case 6: return gv * y * (1.0f - y);
        case 7: return -gv;
        case 8: {
            // Φ(x) + x·φ(x)
            float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
            return gv * (cdf + x * 0.39894228040143268f * expf(-0.5f * x * x));
        }
        case 9: {
            float sg = 1.0f / (1.0f + expf(-1.702f * x));
            return gv * (sg * (1.0f + 1.702f * x * (1.0f - sg)));
        }
        // 0 (x+s): the gradient passes through. 1 (x·s) has no case: its gradient is the unary
        // op 1 of g, which is what the host launches.
        default: return gv;
    }
}

// A broadcasting binary op's geometry (kargs::BinGeom): the output shape (ndim ≤ 8) and each
// operand's strides in the output's index space (0 along broadcast axes). op: 0 +, 1 −, 2 ·, 3 /
struct BinGeom { long long ndim; long long shape[8]; long long sa[8]; long long sb[8]; };

__device__ __forceinline__ float bin_apply(long long op, float a, float b) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}

// The operands' offsets of output element i.
__device__ __forceinline__ void bin_offsets(const BinGeom& g, long long i, long long* oa, long long* ob) {
    long long rem = i, a = 0, b = 0;
    for (int d = (int)g.ndim - 1; d >= 0; --d) {
        long long idx = rem % g.shape[d];
        rem /= g.shape[d];
        a += idx * g.sa[d];
        b += idx * g.sb[d];
    }
    *oa = a;
    *ob = b;
}
