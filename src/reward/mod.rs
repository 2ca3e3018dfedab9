//! Black-box rewards: anything that maps a batch of samples to one number per sample.
//!
//! The trainer never differentiates a reward. It checks what comes back (one finite value per
//! sample) and stops with a message otherwise.

pub mod classifier;
pub mod clip;
pub mod external;
pub mod jpeg;
pub mod target;

use anyhow::{Result, bail};

use crate::tensor::Tensor;

/// A reward on samples in the model's space (`[-1, 1]` pixels for torchcfm image models).
pub trait Reward {
    /// A short name for logs.
    fn name(&self) -> String;
    /// One reward per sample of `x` (`[B, ...]`); `y` holds the class labels the samples were
    /// generated with, for class-conditional models.
    fn score(&mut self, x: &Tensor, y: Option<&[usize]>) -> Result<Vec<f32>>;
}

/// A reward from a closure over one batch.
pub struct FnReward<F> {
    name: String,
    f: F,
}

impl<F: FnMut(&Tensor) -> Vec<f32>> FnReward<F> {
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnReward { name: name.into(), f }
    }
}

impl<F: FnMut(&Tensor) -> Vec<f32>> Reward for FnReward<F> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        Ok((self.f)(x))
    }
}

/// Score `x` and check the answer: one finite reward per sample.
pub fn score_checked(reward: &mut dyn Reward, x: &Tensor, y: Option<&[usize]>) -> Result<Vec<f32>> {
    let b = x.shape().first().copied().unwrap_or(0);
    let r = reward.score(x, y)?;
    if r.len() != b {
        bail!("reward '{}' returned {} values for a batch of {b}", reward.name(), r.len());
    }
    if let Some(i) = r.iter().position(|v| !v.is_finite()) {
        bail!("reward '{}' returned a non-finite value ({}) for sample {i} of the batch", reward.name(), r[i]);
    }
    Ok(r)
}
