// The optimiser's one pass over flat arenas (CPU twin: CpuStorage::adam_arena in
// src/backend/cpu/storage.rs). Per element, the operations of clipping (unary_f32's x·s),
// adam_step_f32 and axpby_f32 (EMA), in that order:
//   g = grad·grad_scale; g += wd·p (if wd ≠ 0); m += (g − m)(1 − β1); v = β2 v + (1 − β2) g²;
//   p −= step_size · m / (√v / bc2_sqrt + eps); ema = ema·ema_b + ema_a·p (if ema ≠ null),
// step_size = lr / (1 − β1^t), bc2_sqrt = √(1 − β2^t), ema_a = 1 − decay, ema_b = decay.
// The scale is its own rounding (__fmul_rn), as when clipping ran as a separate kernel.
extern "C" __global__ void adam_clip_ema_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, float* __restrict__ ema,
                                             long long n, float grad_scale, float step_size, float beta1, float beta2, float eps, float bc2_sqrt,
                                             float weight_decay, float ema_a, float ema_b) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = __fmul_rn(g[i], grad_scale);
        float pi = p[i];
        if (weight_decay != 0.0f) gi += weight_decay * pi;
        float mi = m[i] + (gi - m[i]) * (1.0f - beta1);
        float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        pi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = pi;
        if (ema != nullptr) ema[i] = ema[i] * ema_b + ema_a * pi;
    }
}
