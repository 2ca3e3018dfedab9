//! Optimisation: Adam with PyTorch's semantics, torchcfm's linear warm-up, global gradient-norm
//! clipping like `torch.nn.utils.clip_grad_norm_`, and an exponential moving average of weights.

use anyhow::{Result, bail};

use crate::backend::AdamStep;
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
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f32) -> Result<()> {
        if params.len() != grads.len() {
            bail!("Adam: {} gradients for {} parameters", grads.len(), params.len());
        }
        if self.exp_avg.is_empty() {
            self.exp_avg = params.iter().map(|p| p.zeros_like()).collect::<Result<_>>()?;
            self.exp_avg_sq = params.iter().map(|p| p.zeros_like()).collect::<Result<_>>()?;
        }
        if self.exp_avg.len() != params.len() {
            bail!("Adam: the parameter list changed ({} moments for {} parameters)", self.exp_avg.len(), params.len());
        }
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - (b1 as f64).powi(self.step as i32);
        let bc2_sqrt = (1.0 - (b2 as f64).powi(self.step as i32)).sqrt();
        let h = AdamStep { step_size: (lr as f64 / bc1) as f32, beta1: b1, beta2: b2, eps: self.eps, bc2_sqrt: bc2_sqrt as f32, weight_decay: self.weight_decay };
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(self.exp_avg.iter_mut()).zip(self.exp_avg_sq.iter_mut()) {
            p.adam_in_place(g, m, v, &h)?;
        }
        Ok(())
    }
}

impl Adam {
    /// Move the moments (loaded from a checkpoint, or from an earlier step) to `device`, where
    /// the parameters they update live.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        for m in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()) {
            *m = m.to_device(device)?;
        }
        Ok(())
    }

    /// One update of a model's parameters in place (their current values, stepped, set back).
    pub fn step_params(&mut self, params: &ParamStore, grads: &[Tensor], lr: f32) -> Result<()> {
        // taken out of the leaves, so that an unshared parameter is updated without a copy
        let mut values = params.take_values();
        let r = self.step(&mut values, grads, lr);
        params.put_values(values);
        r
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
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let refs: Vec<&Tensor> = grads.iter().collect();
    Ok(Tensor::sum_squares(&refs)?.sqrt())
}

/// `clip_grad_norm_(params, max_norm)`: scale all gradients by `min(1, max_norm / (norm + 1e-6))`.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f32) -> Result<f64> {
    let norm = grad_norm(grads)?;
    clip_grads_with_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// [`clip_grad_norm`] with the norm already known (read back with other values): scale all
/// gradients by `min(1, max_norm / (norm + 1e-6))`, reading nothing from the device.
pub fn clip_grads_with_norm(grads: &mut [Tensor], norm: f64, max_norm: f32) -> Result<()> {
    let coef = (max_norm as f64 / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.mul_scalar(coef)?;
        }
    }
    Ok(())
}

/// [`ema_update`] of a model's parameters toward another's (same names and shapes).
pub fn ema_update_params(target: &ParamStore, source: &ParamStore, decay: f32) -> Result<()> {
    let mut t = target.take_values();
    let s: Vec<Tensor> = source.vars().iter().map(|v| v.value()).collect();
    let r = ema_update(&mut t, &s, decay);
    target.put_values(t);
    r
}

/// `target ← target·decay + source·(1 − decay)` for every tensor (torchcfm's `ema`).
pub fn ema_update(target: &mut [Tensor], source: &[Tensor], decay: f32) -> Result<()> {
    if target.len() != source.len() {
        bail!("EMA: {} tensors toward {}", target.len(), source.len());
    }
    for (t, s) in target.iter_mut().zip(source) {
        t.axpby_in_place(1.0 - decay, s, decay)?;
    }
    Ok(())
}
