//! The ORW-CFM-W2 objective: reward weights and the weighted flow-matching + W2 loss.
//!
//! Per sample `i`: `w_i · mean_pix (v_θ(t_i, x_t,i) − u_t,i)² + α · mean_pix (v_θ − v_ref)²`, with
//! `v_ref` from the frozen reference model on the same `(t, x_t)` and no gradient; the loss is the
//! batch mean.

use anyhow::{Result, bail};

use crate::autograd::{Var, no_grad, ops};
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

/// The loss of one batch: the differentiable total and its two terms' values.
pub struct OrwLoss {
    pub total: Var,
    /// `mean_i w_i mean_pix (v − u)²`
    pub fm: f32,
    /// `mean_i mean_pix (v − v_ref)²` (before multiplying by α)
    pub w2: f32,
}

/// Build the ORW-CFM-W2 loss for `net` on `(t, x_t, u_t)` with per-sample weights `w`.
#[allow(clippy::too_many_arguments)]
pub fn orw_loss<M: VelocityField>(net: &M, reference: &M, t: &Tensor, xt: &Tensor, ut: &Tensor, y: Option<&[usize]>, w: &[f32], alpha: f32, fw: &mut Forward) -> Result<OrwLoss> {
    let b = xt.shape()[0];
    if w.len() != b || t.numel() != b {
        bail!("ORW loss: {} weights and {} times for a batch of {b}", w.len(), t.numel());
    }
    // the batch (drawn on the host) goes where the model is: an explicit copy at the edge
    let dev = net.device();
    let (t, xt, ut) = (&t.to_device(dev)?, &xt.to_device(dev)?, &ut.to_device(dev)?);
    let v = net.forward(&Var::constant(t.clone()), &Var::constant(xt.clone()), y, fw)?;
    if v.shape() != ut.shape() {
        bail!("model output {:?} does not match the target velocity {:?}", v.shape(), ut.shape());
    }
    let pix: Vec<usize> = (1..xt.ndim()).collect();
    let per_fm = ops::mean_axes(&ops::square(&ops::sub(&v, &Var::constant(ut.clone()))?)?, &pix, false)?;
    let fm = ops::mean_all(&ops::mul(&per_fm, &Var::constant(Tensor::from_vec(w.to_vec(), &[b]).to_device(dev)?))?)?;
    let (total, w2v) = if alpha != 0.0 {
        let v_ref = no_grad(|| reference.predict(t, xt, y))?;
        let w2 = ops::mean_all(&ops::square(&ops::sub(&v, &Var::constant(v_ref))?)?)?;
        let w2v = w2.value().item();
        (ops::add(&fm, &ops::mul_scalar(&w2, alpha)?)?, w2v)
    } else {
        (fm.clone(), 0.0)
    };
    Ok(OrwLoss { fm: fm.value().item(), w2: w2v, total })
}
