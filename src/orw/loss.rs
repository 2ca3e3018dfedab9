//! The ORW-CFM-W2 objective: reward weights and the weighted flow-matching + W2 loss.
//!
//! Per sample `i`: `w_i · mean_pix (v_θ(t_i, x_t,i) − u_t,i)² + α · mean_pix (v_θ − v_ref)²`, with
//! `v_ref` from the frozen reference model on the same `(t, x_t)` and no gradient; the loss is the
//! batch mean.

use anyhow::{Result, bail};

use crate::autograd::{Var, fused, no_grad};
use crate::nn::{Forward, VelocityField};
use crate::tensor::Tensor;

/// How rewards become weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// `exp(τ r)`, as published.
    Exp,
    /// `exp(τ r)` divided by its batch mean (so the mean weight is 1).
    ExpNormalized,
    /// `exp(τ z)` with `z` the batch-standardised reward.
    ZScore,
}

impl WeightMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "exp" => WeightMode::Exp,
            "exp-normalized" => WeightMode::ExpNormalized,
            "zscore" => WeightMode::ZScore,
            _ => bail!("unknown weight mode '{s}' (valid: exp, exp-normalized, zscore)"),
        })
    }
}

/// Weights from rewards with temperature `tau` (it multiplies). Errors on non-finite rewards or
/// weights (e.g. `exp` overflow from a large τ·r).
pub fn reward_weights(r: &[f32], tau: f32, mode: WeightMode) -> Result<Vec<f32>> {
    if let Some(i) = r.iter().position(|v| !v.is_finite()) {
        bail!("reward {i} is not finite ({})", r[i]);
    }
    let n = r.len() as f64;
    let w: Vec<f32> = match mode {
        WeightMode::Exp => r.iter().map(|&v| (tau * v).exp()).collect(),
        WeightMode::ExpNormalized => {
            // shift by the max before exp: the normalised weights are unchanged and cannot overflow
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(tau * b));
            let e: Vec<f64> = r.iter().map(|&v| ((tau * v - m) as f64).exp()).collect();
            let mean = e.iter().sum::<f64>() / n;
            e.iter().map(|&x| (x / mean) as f32).collect()
        }
        WeightMode::ZScore => {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
            let std = (r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            r.iter().map(|&v| (tau as f64 * (v as f64 - mean) / (std + 1e-8)).exp() as f32).collect()
        }
    };
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        bail!("weight {i} is not finite (reward {} at temperature {tau}); lower the temperature or use exp-normalized", r[i]);
    }
    Ok(w)
}

/// The loss of one batch: the differentiable total and its terms, on the model's device.
pub struct OrwLoss {
    pub total: Var,
    /// `[fm, w2, total]` (f32): `fm = mean_i w_i mean_pix (v − u)²`, `w2 = mean_i mean_pix (v − v_ref)²`
    /// (before multiplying by α). Read them with [`OrwLoss::values`].
    pub terms: Tensor,
}

/// The loss terms on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrwLossValues {
    pub fm: f32,
    pub w2: f32,
    pub total: f32,
}

impl OrwLoss {
    /// The terms, read back in one go (waits for the device).
    pub fn values(&self) -> Result<OrwLossValues> {
        let v = self.terms.values()?;
        Ok(OrwLossValues { fm: v[0], w2: v[1], total: v[2] })
    }
}

/// Build the ORW-CFM-W2 loss for `net` on `(t, x_t, u_t)` with per-sample weights `w`: one fused
/// node (`autograd::fused::orw_loss`) that also computes `dL/dv` in its forward pass.
#[allow(clippy::too_many_arguments)]
pub fn orw_loss<M: VelocityField>(net: &M, reference: &M, t: &Tensor, xt: &Tensor, ut: &Tensor, y: Option<&[usize]>, w: &[f32], alpha: f32, fw: &mut Forward) -> Result<OrwLoss> {
    let b = xt.shape()[0];
    if w.len() != b || t.numel() != b {
        bail!("ORW loss: {} weights and {} times for a batch of {b}", w.len(), t.numel());
    }
    let w = Tensor::from_vec(w.to_vec(), &[b]).to_device(net.device())?;
    orw_loss_on_device(net, reference, t, xt, ut, y, &w, alpha, fw)
}

/// [`orw_loss`] with the weights already on the model's device (`[B]` f32): nothing is uploaded
/// when `t`, `x_t` and `u_t` are there too (a CUDA graph captures it; `step_graph.rs`).
#[allow(clippy::too_many_arguments)]
pub fn orw_loss_on_device<M: VelocityField>(net: &M, reference: &M, t: &Tensor, xt: &Tensor, ut: &Tensor, y: Option<&[usize]>, w: &Tensor, alpha: f32, fw: &mut Forward) -> Result<OrwLoss> {
    let b = xt.shape()[0];
    if w.numel() != b || t.numel() != b {
        bail!("ORW loss: {} weights and {} times for a batch of {b}", w.numel(), t.numel());
    }
    // the batch (drawn on the host) goes where the model is: an explicit copy at the edge
    let dev = net.device();
    let (t, xt, ut, w) = (&t.to_device(dev)?, &xt.to_device(dev)?, &ut.to_device(dev)?, &w.to_device(dev)?);
    let v = net.forward(&Var::constant(t.clone()), &Var::constant(xt.clone()), y, fw)?;
    if v.shape() != ut.shape() {
        bail!("model output {:?} does not match the target velocity {:?}", v.shape(), ut.shape());
    }
    let v_ref = if alpha != 0.0 { Some(no_grad(|| reference.predict(t, xt, y))?) } else { None };
    let (total, terms) = fused::orw_loss(&v, ut, w, v_ref.as_ref(), alpha)?;
    Ok(OrwLoss { total, terms })
}
