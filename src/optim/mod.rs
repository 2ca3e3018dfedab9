//! Optimisation: Adam with PyTorch's semantics, torchcfm's linear warm-up, global gradient-norm
//! clipping like `torch.nn.utils.clip_grad_norm_`, and an exponential moving average of weights.
//!
//! Two paths with the same f32 results, bit for bit: per tensor ([`Adam::step`],
//! [`clip_grads_with_norm`], [`ema_update`]: lists of tensors, the reference), and over flat
//! arenas ([`Adam::step_flat`]: a model's parameters, the gathered gradients, Adam's moments and
//! the EMA each in one contiguous storage, updated by one pass — one kernel launch on a GPU).

use anyhow::{Result, bail};

use crate::backend::{AdamStep, ArenaStep};
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use crate::tensor::arena::Arena;

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
    /// First and second moments, one per parameter (empty until the first step); after a
    /// [`step_flat`](Self::step_flat), views of the flat moment arenas.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// The flat arenas that `exp_avg` / `exp_avg_sq` view (kept only while they still do; a
    /// replaced moment list is gathered again at the next [`step_flat`](Self::step_flat)).
    pub arenas: Option<(Arena, Arena)>,
}

impl Adam {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn new(lr: f32) -> Self {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 0, exp_avg: Vec::new(), exp_avg_sq: Vec::new(), arenas: None }
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
        let h = self.scalars(lr);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(self.exp_avg.iter_mut()).zip(self.exp_avg_sq.iter_mut()) {
            p.adam_in_place(g, m, v, &h)?;
        }
        Ok(())
    }
}

impl Adam {
    /// The scalars of step `self.step` at learning rate `lr` (bias corrections in f64, rounded once).
    fn scalars(&self, lr: f32) -> AdamStep {
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - (b1 as f64).powi(self.step as i32);
        let bc2_sqrt = (1.0 - (b2 as f64).powi(self.step as i32)).sqrt();
        AdamStep { step_size: (lr as f64 / bc1) as f32, beta1: b1, beta2: b2, eps: self.eps, bc2_sqrt: bc2_sqrt as f32, weight_decay: self.weight_decay }
    }

    /// One update of a model's parameters over flat arenas: the gradients (f32, in parameter
    /// order) gathered into one arena, then one pass that scales them by `grad_scale` (see
    /// [`clip_coef`]; 1 when not clipping), steps Adam and, with `ema = Some((store, decay))`,
    /// moves the EMA model toward the new parameters. The parameters, moments and EMA are
    /// written in place in their arenas (nothing is copied unless another model shares an
    /// arena), and their leaves see the new values as views. Bit-identical to
    /// [`clip_grads_with_norm`] + [`Adam::step`] + [`ema_update`].
    pub fn step_flat(&mut self, params: &ParamStore, grads: &[Tensor], lr: f32, grad_scale: f32, ema: Option<(&ParamStore, f32)>) -> Result<()> {
        if params.len() != grads.len() {
            bail!("Adam: {} gradients for {} parameters", grads.len(), params.len());
        }
        if let Some((e, _)) = ema
            && (e.len() != params.len() || e.vars().iter().zip(params.vars()).any(|(a, b)| a.shape() != b.shape()))
        {
            bail!("EMA: the EMA model's parameters do not match the trained model's");
        }
        params.flatten()?;
        if let Some((e, _)) = ema {
            e.flatten()?;
        }
        let layout = params.arena().expect("flattened").layout().clone();
        let dev = params.device();
        let g = Arena::gather(grads)?;
        if g.layout() != &layout {
            bail!("Adam: the gradients' shapes do not match the parameters'");
        }
        // the moment arenas: kept when the moments still view them, else gathered (a resumed
        // run's per-parameter moments) or created as zeros (the first step)
        let held = self.arenas.as_ref().is_some_and(|(m, v)| m.layout() == &layout && m.holds(self.exp_avg.iter()) && v.holds(self.exp_avg_sq.iter()));
        let (mut m, mut v) = if held {
            self.arenas.take().expect("held")
        } else if self.exp_avg.is_empty() {
            (Arena::zeros(&layout, dev)?, Arena::zeros(&layout, dev)?)
        } else {
            if self.exp_avg.len() != params.len() || self.exp_avg_sq.len() != params.len() {
                bail!("Adam: the parameter list changed ({} moments for {} parameters)", self.exp_avg.len(), params.len());
            }
            let (m, v) = (Arena::gather(&self.exp_avg)?, Arena::gather(&self.exp_avg_sq)?);
            if m.layout() != &layout || v.layout() != &layout {
                bail!("Adam: the moments' shapes do not match the parameters'");
            }
            (m, v)
        };
        // the moments' views let go, so that their arenas are written in place
        self.exp_avg.clear();
        self.exp_avg_sq.clear();
        self.step += 1;
        let h = ArenaStep { adam: self.scalars(lr), grad_scale, ema_decay: ema.map_or(0.0, |e| e.1) };
        let r = params.update_arena(|p| match ema {
            Some((e, _)) => e.update_arena(|ea| p.flat_mut().adam_arena_in_place(g.flat(), m.flat_mut(), v.flat_mut(), Some(ea.flat_mut()), &h)),
            None => p.flat_mut().adam_arena_in_place(g.flat(), m.flat_mut(), v.flat_mut(), None, &h),
        });
        self.exp_avg = m.views();
        self.exp_avg_sq = v.views();
        self.arenas = Some((m, v));
        r
    }

    /// Move the moments (loaded from a checkpoint, or from an earlier step) to `device`, where
    /// the parameters they update live.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        if let Some((m, v)) = self.arenas.take()
            && m.holds(self.exp_avg.iter())
            && v.holds(self.exp_avg_sq.iter())
        {
            // the arenas move as one copy each and stay arenas
            let (m, v) = (m.to_device(device)?, v.to_device(device)?);
            self.exp_avg = m.views();
            self.exp_avg_sq = v.views();
            self.arenas = Some((m, v));
            return Ok(());
        }
        for m in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()) {
            *m = m.to_device(device)?;
        }
        Ok(())
    }

    /// One update of a model's parameters in place, over flat arenas ([`step_flat`](Self::step_flat)
    /// without clipping or EMA).
    pub fn step_params(&mut self, params: &ParamStore, grads: &[Tensor], lr: f32) -> Result<()> {
        self.step_flat(params, grads, lr, 1.0, None)
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
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.mul_scalar(coef)?;
        }
    }
    Ok(())
}

/// `clip_grad_norm_`'s scale for a gradient of global norm `norm`: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_coef(norm: f64, max_norm: f32) -> f32 {
    (max_norm as f64 / (norm + 1e-6)).min(1.0) as f32
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
