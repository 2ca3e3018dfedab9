//! Optimisation: Adam with PyTorch's semantics, torchcfm's linear warm-up, global gradient-norm
//! clipping like `torch.nn.utils.clip_grad_norm_`, and an exponential moving average of weights.

use rayon::prelude::*;

use crate::nn::ParamStore;
use crate::tensor::Tensor;

/// `torch.optim.Adam` (not AdamW: weight decay is added to the gradient), without amsgrad.
#[derive(Clone, Debug)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken (PyTorch's per-parameter `step`, shared here).
    pub step: u64,
    /// First and second moments, one per parameter (empty until the first step).
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl Adam {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn new(lr: f32) -> Self {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 0, exp_avg: Vec::new(), exp_avg_sq: Vec::new() }
    }

    /// One update of `params` with `grads` at learning rate `lr` (the scheduled rate).
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f32) {
        assert_eq!(params.len(), grads.len(), "Adam: one gradient per parameter");
        if self.exp_avg.is_empty() {
            self.exp_avg = params.iter().map(|p| Tensor::zeros(p.shape())).collect();
            self.exp_avg_sq = params.iter().map(|p| Tensor::zeros(p.shape())).collect();
        }
        assert_eq!(self.exp_avg.len(), params.len(), "Adam: the parameter list changed");
        self.step += 1;
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        let bc1 = 1.0 - (b1 as f64).powi(self.step as i32);
        let bc2_sqrt = (1.0 - (b2 as f64).powi(self.step as i32)).sqrt();
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(self.exp_avg.iter_mut()).zip(self.exp_avg_sq.iter_mut()) {
            assert_eq!(p.shape(), g.shape(), "Adam: gradient shape");
            if p.is_cuda() {
                crate::backend::cuda::ops::adam_step(p, g, m, v, step_size, b1, b2, eps, bc2_sqrt, wd);
                continue;
            }
            let (pd, md, vd) = (p.data_mut(), m.data_mut(), v.data_mut());
            let body = |(((pv, &gv), mv), vv): (((&mut f32, &f32), &mut f32), &mut f32)| {
                let g = if wd != 0.0 { gv + wd * *pv } else { gv };
                *mv += (g - *mv) * (1.0 - b1); // torch: exp_avg.lerp_(grad, 1 - beta1)
                *vv = *vv * b2 + (1.0 - b2) * g * g;
                let denom = vv.sqrt() / bc2_sqrt + eps;
                *pv -= step_size * *mv / denom;
            };
            if pd.len() >= 1 << 15 {
                pd.par_iter_mut().zip(g.data().par_iter()).zip(md.par_iter_mut()).zip(vd.par_iter_mut()).for_each(body);
            } else {
                pd.iter_mut().zip(g.data().iter()).zip(md.iter_mut()).zip(vd.iter_mut()).for_each(body);
            }
        }
    }
}

impl Adam {
    /// One update of a model's parameters in place (their current values, stepped, set back).
    pub fn step_params(&mut self, params: &ParamStore, grads: &[Tensor], lr: f32) {
        let mut values: Vec<Tensor> = params.vars().iter().map(|v| v.value()).collect();
        self.step(&mut values, grads, lr);
        params.set_all(values);
    }
}

/// torchcfm's warm-up: `LambdaLR(lambda step: min(step, warmup) / warmup)`, so the first
/// optimiser step (scheduler step 0) runs at learning rate 0. `warmup = 0` means no warm-up.
pub fn warmup_lr(base_lr: f32, step: u64, warmup: u64) -> f32 {
    if warmup == 0 {
        return base_lr;
    }
    // computed in f64 and rounded once, as PyTorch multiplies a Python float
    (base_lr as f64 * (step.min(warmup) as f64 / warmup as f64)) as f32
}

/// Global L2 norm of all gradients (f64 accumulation).
pub fn grad_norm(grads: &[Tensor]) -> f64 {
    if grads.iter().any(|g| g.is_cuda()) {
        let refs: Vec<&Tensor> = grads.iter().collect();
        return crate::backend::cuda::ops::sum_squares(&refs).sqrt();
    }
    grads.iter().map(|g| g.data().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum::<f64>().sqrt()
}

/// `clip_grad_norm_(params, max_norm)`: scale all gradients by `min(1, max_norm / (norm + 1e-6))`.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f32) -> f64 {
    let norm = grad_norm(grads);
    let coef = (max_norm as f64 / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            if g.is_cuda() {
                crate::backend::cuda::ops::scale_in_place(g, coef);
                continue;
            }
            for v in g.data_mut() {
                *v *= coef;
            }
        }
    }
    norm
}

/// [`ema_update`] of a model's parameters toward another's (same names and shapes).
pub fn ema_update_params(target: &ParamStore, source: &ParamStore, decay: f32) {
    let mut t: Vec<Tensor> = target.vars().iter().map(|v| v.value()).collect();
    let s: Vec<Tensor> = source.vars().iter().map(|v| v.value()).collect();
    ema_update(&mut t, &s, decay);
    target.set_all(t);
}

/// `target ← target·decay + source·(1 − decay)` for every tensor (torchcfm's `ema`).
pub fn ema_update(target: &mut [Tensor], source: &[Tensor], decay: f32) {
    assert_eq!(target.len(), source.len());
    for (t, s) in target.iter_mut().zip(source) {
        if t.is_cuda() || s.is_cuda() {
            crate::backend::cuda::ops::axpby(1.0 - decay, s, decay, t);
            continue;
        }
        for (a, &b) in t.data_mut().iter_mut().zip(s.data()) {
            *a = *a * decay + b * (1.0 - decay);
        }
    }
}
