//! Plain flow-matching training of a base model on a dataset, with torchcfm's recipe
//! (`examples/images/cifar10/train_cifar10.py`): Adam, linear warm-up `min(step, warmup)/warmup`,
//! gradient-norm clipping, an EMA of the weights, and one of torchcfm's matchers (OT-CFM there).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::autograd::{Var, ops};
use crate::data::Dataset;
use crate::flow::matchers::{FlowMatcher, MatcherKind};
use crate::nn::{Forward, VelocityField};
use crate::optim::{Adam, clip_coef, grad_norm, warmup_lr};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Settings of a pre-training run (torchcfm's CIFAR-10 defaults).
#[derive(Clone, Debug, Serialize)]
pub struct PretrainConfig {
    pub coupling: String,
    pub sigma: f32,
    pub lr: f32,
    pub warmup_steps: u64,
    pub grad_clip: f32,
    pub ema_decay: f32,
    pub batch_size: usize,
    pub steps: u64,
    pub seed: u64,
    /// Save the weights every this many steps (0: only at the end).
    pub save_every: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig { coupling: "otcfm".into(), sigma: 0.0, lr: 2e-4, warmup_steps: 5000, grad_clip: 1.0, ema_decay: 0.9999, batch_size: 128, steps: 400_001, seed: 0, save_every: 0 }
    }
}

/// One pre-training step's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainStep {
    pub step: u64,
    pub loss: f32,
    pub grad_norm: f64,
    pub lr: f32,
    pub seconds: f64,
}

/// Where the weights go: EMA weights at `out` (what torchcfm samples from), the raw weights
/// beside it as `<stem>.net.safetensors`.
pub fn net_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.net.safetensors"))
}

/// Train `net` (and its EMA copy `ema`) on `data`; class-conditional models get the labels.
pub fn pretrain<M: VelocityField>(net: &M, ema: &M, data: &Dataset, cfg: &PretrainConfig, out: Option<&Path>, on_step: &mut dyn FnMut(&PretrainStep)) -> Result<()> {
    if data.is_empty() {
        bail!("the dataset is empty");
    }
    let want = net.sample_shape();
    let got = data.sample_shape().to_vec();
    if want != got {
        bail!("the model makes samples of shape {want:?} but the data {} holds images of shape {got:?}", data.source);
    }
    let labels = match (net.num_classes(), &data.labels) {
        (Some(k), Some(l)) => {
            if let Some(&bad) = l.iter().find(|&&c| c >= k) {
                bail!("label {bad} in {} is out of range for a model with {k} classes", data.source);
            }
            true
        }
        (Some(_), None) => bail!("the model is class-conditional but {} has no labels", data.source),
        (None, _) => false,
    };
    if cfg.batch_size == 0 || !(cfg.lr > 0.0) || !(0.0..1.0).contains(&cfg.ema_decay) {
        bail!("pretrain needs batch_size ≥ 1, lr > 0 and ema_decay in [0, 1)");
    }
    let matcher = FlowMatcher::new(MatcherKind::parse(&cfg.coupling)?, cfg.sigma);
    let mut rng = Rng::new(cfg.seed);
    // dropout masks from a Philox stream keyed by the draw `fork()` used to take
    let mut drop_rng = crate::rng::philox::Philox::new(rng.next_u64());
    let mut adam = Adam::new(cfg.lr);
    let n = data.len();
    let mut order: Vec<usize> = Vec::new();
    let save = |net: &M, ema: &M| -> Result<()> {
        if let Some(o) = out {
            ema.save_file(o).with_context(|| format!("saving {}", o.display()))?;
            net.save_file(&net_path(o))?;
        }
        Ok(())
    };
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        // epochs of a seeded shuffle, like a DataLoader with shuffle=True, drop_last=False
        let mut idx = Vec::with_capacity(cfg.batch_size);
        while idx.len() < cfg.batch_size {
            if order.is_empty() {
                order = (0..n).collect();
                rng.shuffle(&mut order);
            }
            idx.push(order.pop().expect("refilled"));
        }
        let (x1, y) = data.batch(&idx);
        let x0 = Tensor::randn(x1.shape(), &mut rng);
        let fs = matcher.sample(&x0, &x1, None, &mut rng)?;
        let y: Option<Vec<usize>> = if labels { y.map(|y| fs.x1_idx.iter().map(|&j| y[j]).collect()) } else { None };
        let v = net.forward(&Var::constant(fs.t), &Var::constant(fs.xt), y.as_deref(), &mut Forward { dropout_rng: Some(&mut drop_rng) })?;
        let loss = ops::mse_loss(&v, &Var::constant(fs.ut))?;
        let lv = loss.value().item();
        if !lv.is_finite() {
            bail!("the loss is not finite at step {step}");
        }
        let grads = net.params().grads(&loss.backward()?)?;
        drop(loss);
        let gn = grad_norm(&grads)?;
        let scale = if cfg.grad_clip > 0.0 { clip_coef(gn, cfg.grad_clip) } else { 1.0 };
        let lr = warmup_lr(cfg.lr, step, cfg.warmup_steps);
        // clipping, Adam and the EMA in one pass over the flat arenas
        adam.step_flat(net.params(), &grads, lr, scale, Some((ema.params(), cfg.ema_decay)))?;
        on_step(&PretrainStep { step: step + 1, loss: lv, grad_norm: gn, lr, seconds: t0.elapsed().as_secs_f64() });
        if cfg.save_every > 0 && (step + 1) % cfg.save_every == 0 {
            save(net, ema)?;
        }
    }
    save(net, ema)
}
