//! The trainer's configuration: the reference implementation's keys (`finetune_fm.py`) with its
//! defaults, plus the keys our trainer adds.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::loss::WeightMode;
use crate::flow::matchers::{FlowMatcher, MatcherKind};
use crate::flow::ode::OdeSolver;
use crate::util::nearest;

/// ORW-CFM-W2 settings. Defaults are the reference code's `main()` (lr 2e-4, warm-up 5000,
/// α = 1, τ = 0.5, clip 1.0, exact-OT coupling with σ = 0, Euler over a 100-point grid, no EMA)
/// with the README's 100 steps per epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrwConfig {
    /// Adam learning rate after warm-up.
    pub learning_rate: f32,
    /// Linear warm-up `min(step, warmup)/warmup` (torchcfm's LambdaLR); 0 disables it.
    pub warmup_steps: u64,
    /// α, the weight of the W2 term `mean_pix (v_θ − v_ref)²`.
    pub w2_coefficient: f32,
    /// τ: weights are `exp(τ·r)` (it multiplies, as in the reference code).
    pub temperature: f32,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f32,
    /// Samples per gradient step.
    pub batch_size: usize,
    /// Prompts for text-image rewards (kept for the CLIP reward).
    pub text_prompts: Vec<String>,
    /// Parent folder of run folders.
    pub savedir: String,
    /// The reference (pre-trained) model: safetensors or a torchcfm `.pt` checkpoint.
    pub ref_path: Option<String>,
    /// Entry of a `.pt` checkpoint to use as the reference (default: `ema_model` if present;
    /// the reference code loads `net_model`).
    pub ref_key: Option<String>,
    /// Run folder name under `savedir`.
    pub run_name: String,
    /// The reference code logs to wandb; our own per-step log (`metrics.jsonl`, `metrics.csv` and
    /// TensorBoard files in the run folder, a [`crate::logging::MetricsLog`] hooked into
    /// [`super::Trainer::run`]) is written by every `train` run, whatever this says.
    pub use_wandb: bool,
    pub num_epochs: u64,
    /// Gradient steps per epoch; the sampling policy is refreshed from `net` after each epoch.
    pub steps_per_epoch: u64,
    /// euler, midpoint, rk4 or dopri5.
    pub ode_solver: String,
    /// Steps of a fixed-grid solver (torchcfm samples on a 100-point grid: 99 Euler steps).
    pub ode_steps: usize,
    pub ode_atol: f64,
    pub ode_rtol: f64,
    /// independent (icfm) or exact-ot (otcfm, as in the reference code); also fm, sbcfm, si.
    pub coupling: String,
    /// Draw OT pairs from the plan with replacement, as torchcfm does (weights still follow
    /// their samples); `false` uses the optimal permutation.
    pub ot_replace: bool,
    /// σ of the probability path (the reference code: 0).
    pub sigma: f32,
    /// exp (as published), exp-normalized (divided by the batch mean) or zscore.
    pub weight_mode: String,
    /// Gradient steps that may share one sampled batch (fresh x0 and t each time); 1 as published.
    pub sample_reuse: usize,
    /// Samples drawn per ODE solve (0: `batch_size`). The policy is frozen within an epoch, so
    /// drawing an epoch's samples in a few large solves gives the same distribution.
    pub sample_batch: usize,
    pub seed: u64,
    /// Dropout on in `net`'s forward pass (the reference code trains in train mode).
    pub dropout: bool,
    /// EMA decay of `net`'s weights (0: no EMA, as in the reference code; torchcfm pre-training
    /// uses 0.9999).
    pub ema_decay: f32,
    /// Save a checkpoint every this many epochs (0: only at the end).
    pub save_every_epochs: u64,
    /// Checkpoints kept in the run folder (older ones are deleted).
    pub keep_checkpoints: usize,
}

impl Default for OrwConfig {
    fn default() -> Self {
        OrwConfig {
            learning_rate: 2e-4,
            warmup_steps: 5000,
            w2_coefficient: 1.0,
            temperature: 0.5,
            grad_clip: 1.0,
            batch_size: 128,
            text_prompts: vec!["An image of dog".into(), "Not an image of dog".into()],
            savedir: "runs".into(),
            ref_path: None,
            ref_key: None,
            run_name: "orw-cfm-w2".into(),
            use_wandb: false,
            num_epochs: 1000,
            steps_per_epoch: 100,
            ode_solver: "euler".into(),
            ode_steps: 99,
            ode_atol: 1e-5,
            ode_rtol: 1e-5,
            coupling: "exact-ot".into(),
            ot_replace: false,
            sigma: 0.0,
            weight_mode: "exp".into(),
            sample_reuse: 1,
            sample_batch: 0,
            seed: 0,
            dropout: true,
            ema_decay: 0.0,
            save_every_epochs: 0,
            keep_checkpoints: 3,
        }
    }
}

/// Every key of [`OrwConfig`], for error messages.
pub fn config_keys() -> Vec<String> {
    match serde_json::to_value(OrwConfig::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

impl OrwConfig {
    /// Parse a JSON object; an unknown key is an error naming the nearest valid key.
    pub fn from_json_value(v: Value) -> Result<Self> {
        let Value::Object(m) = &v else { bail!("the trainer config must be an object, got {v}") };
        let keys = config_keys();
        for k in m.keys() {
            if !keys.iter().any(|c| c == k) {
                let hint = nearest(k, keys.iter().map(|s| s.as_str())).map(|n| format!(" (did you mean '{n}'?)")).unwrap_or_default();
                bail!("unknown trainer config key '{k}'{hint}");
            }
        }
        let cfg: OrwConfig = serde_json::from_value(v).context("in the trainer config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        Self::from_json_value(serde_json::from_str(s).context("the trainer config is not valid JSON")?)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("config serialises")
    }

    /// Check ranges and names; every problem is one clear error.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number, got {v}");
            }
            Ok(())
        };
        let nonneg = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number, got {v}");
            }
            Ok(())
        };
        pos("learning_rate", self.learning_rate as f64)?;
        nonneg("w2_coefficient", self.w2_coefficient as f64)?;
        if !self.temperature.is_finite() {
            bail!("temperature must be finite, got {}", self.temperature);
        }
        nonneg("grad_clip", self.grad_clip as f64)?;
        nonneg("sigma", self.sigma as f64)?;
        for (name, v) in [("batch_size", self.batch_size as u64), ("steps_per_epoch", self.steps_per_epoch), ("sample_reuse", self.sample_reuse as u64)] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.num_epochs.checked_mul(self.steps_per_epoch).is_none_or(|t| t > 1 << 40) {
            bail!("num_epochs × steps_per_epoch is too large ({} × {})", self.num_epochs, self.steps_per_epoch);
        }
        if self.seed > i64::MAX as u64 {
            bail!("seed must be at most {}", i64::MAX);
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("ema_decay must be in [0, 1), got {}", self.ema_decay);
        }
        if self.run_name.is_empty() || self.run_name.contains(['/', '\\']) || self.run_name == "." || self.run_name == ".." {
            bail!("run_name must be a plain folder name, got '{}'", self.run_name);
        }
        self.solver()?;
        let m = self.matcher()?;
        if m.kind.uses_ot() && self.batch_size > 4096 {
            bail!("exact OT pairing is O(n³): batch_size {} is too large for coupling '{}' (use independent)", self.batch_size, self.coupling);
        }
        if !matches!(self.solver()?, OdeSolver::Dopri5 { .. }) && self.ode_steps == 0 {
            bail!("ode_steps must be at least 1 for the {} solver", self.ode_solver);
        }
        self.weight_mode()?;
        Ok(())
    }

    pub fn solver(&self) -> Result<OdeSolver> {
        OdeSolver::parse(&self.ode_solver, self.ode_atol, self.ode_rtol).context("ode_solver")
    }

    pub fn matcher(&self) -> Result<FlowMatcher> {
        let kind = MatcherKind::parse(&self.coupling).with_context(|| format!("coupling '{}' (independent, exact-ot, or a torchcfm matcher name)", self.coupling))?;
        let mut m = FlowMatcher::new(kind, self.sigma);
        m.ot_replace = self.ot_replace;
        Ok(m)
    }

    pub fn weight_mode(&self) -> Result<WeightMode> {
        WeightMode::parse(&self.weight_mode)
    }

    /// Samples per ODE solve.
    pub fn samples_per_solve(&self) -> usize {
        if self.sample_batch == 0 { self.batch_size } else { self.sample_batch }
    }

    /// Total gradient steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.num_epochs * self.steps_per_epoch
    }
}
