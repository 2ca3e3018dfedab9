//! Plain flow-matching training of a base model on a dataset, with torchcfm's recipe
//! (`examples/images/cifar10/train_cifar10.py`): Adam, linear warm-up `min(step, warmup)/warmup`,
//! gradient-norm clipping, an EMA of the weights, and one of torchcfm's matchers (OT-CFM there).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::autograd::{Var, ops};
use crate::data::Dataset;
use crate::flow::matchers::{FlowMatcher, MatcherKind};
use crate::io::safetensors::write_atomic;
use crate::nn::{Forward, VelocityField};
use crate::optim::{Adam, clip_coef, grad_norm, warmup_lr};
use crate::orw::checkpoint::{load_adam_moments, rng_from_json, rng_json, save_adam_moments};
use crate::rng::Rng;
use crate::rng::philox::Philox;
use crate::tensor::Tensor;

/// Settings of a pre-training run (torchcfm's CIFAR-10 defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Save the weights and a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
}

impl PretrainConfig {
    /// The settings a resumed run must share with the run it continues (all but `steps` and
    /// `save_every`), as `(name, value)` pairs.
    fn fixed(&self) -> Vec<(&'static str, String)> {
        vec![
            ("coupling", self.coupling.clone()),
            ("sigma", format!("{:?}", self.sigma)),
            ("lr", format!("{:?}", self.lr)),
            ("warmup_steps", self.warmup_steps.to_string()),
            ("grad_clip", format!("{:?}", self.grad_clip)),
            ("ema_decay", format!("{:?}", self.ema_decay)),
            ("batch_size", self.batch_size.to_string()),
            ("seed", self.seed.to_string()),
        ]
    }
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

/// The `format` of a pre-training checkpoint's `state.json`.
pub const FORMAT: &str = "orwcfm-fast/pretrain-checkpoint/1";

/// The checkpoint folder of a run writing `out`: `<stem>.pretrain/` beside it, holding
/// `net.safetensors`, `ema.safetensors`, `optimizer.safetensors` (Adam's moments) and
/// `state.json` (settings, step, RNG states, the rest of the data order, Adam's step).
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    sibling(out, "pretrain")
}

fn sibling(out: &Path, ext: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.{ext}"))
}

/// Where a run stands between steps: what a checkpoint holds besides the weights.
pub struct TrainState {
    step: u64,
    rng: Rng,
    drop_rng: Philox,
    /// Indices of the current pass over the data not yet drawn (drawn from the back).
    order: Vec<usize>,
    adam: Adam,
}

impl TrainState {
    fn new(cfg: &PretrainConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        // dropout masks from a Philox stream keyed by the draw `fork()` used to take
        let drop_rng = Philox::new(rng.next_u64());
        TrainState { step: 0, rng, drop_rng, order: Vec::new(), adam: Adam::new(cfg.lr) }
    }

    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }
}

/// A run continued from its checkpoint: the raw and EMA models and where training stands.
pub struct Resumed<M> {
    pub net: M,
    pub ema: M,
    pub state: TrainState,
}

/// Write the checkpoint of `out`'s run: into `<stem>.pretrain.tmp/`, then swapped in for
/// `<stem>.pretrain/` by two renames (a crash in between leaves `<stem>.pretrain.old/`, which
/// [`resume`] falls back to), so that an interrupted save keeps the previous checkpoint.
fn save_checkpoint<M: VelocityField>(out: &Path, net: &M, ema: &M, s: &TrainState, cfg: &PretrainConfig, data: &Dataset) -> Result<()> {
    let (dir, tmp, old) = (checkpoint_dir(out), sibling(out, "pretrain.tmp"), sibling(out, "pretrain.old"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    net.save_file(&tmp.join("net.safetensors"))?;
    ema.save_file(&tmp.join("ema.safetensors"))?;
    save_adam_moments(&tmp.join("optimizer.safetensors"), &s.adam, net.params().names())?;
    let state = json!({
        "format": FORMAT,
        "producer": format!("orwcfm-fast {}", env!("CARGO_PKG_VERSION")),
        "config": cfg,
        "data": { "source": data.source, "images": data.len() },
        "step": s.step,
        "rng": rng_json(&s.rng),
        "philox": s.drop_rng,
        "order": s.order,
        "adam_step": s.adam.step,
    });
    write_atomic(&tmp.join("state.json"), serde_json::to_string(&state)?.as_bytes())?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(&dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// Load the checkpoint of the run that writes `out`, for a run with settings `cfg` on `data`:
/// every setting but `steps` and `save_every` must be the checkpoint's, and the data the same.
pub fn resume<M: VelocityField>(out: &Path, cfg: &PretrainConfig, data: &Dataset) -> Result<Resumed<M>> {
    let (dir, old) = (checkpoint_dir(out), sibling(out, "pretrain.old"));
    let dir = if !dir.join("state.json").is_file() && old.join("state.json").is_file() { old } else { dir };
    let sp = dir.join("state.json");
    if !sp.is_file() {
        bail!("--resume: no checkpoint at {} (a run with --out {} writes one every --save-every steps)", dir.display(), out.display());
    }
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?).with_context(|| format!("{} is not valid JSON", sp.display()))?;
    if state["format"].as_str() != Some(FORMAT) {
        bail!("{} is not a pretrain checkpoint (format {}, expected {FORMAT})", sp.display(), state["format"]);
    }
    let saved: PretrainConfig = serde_json::from_value(state["config"].clone()).with_context(|| format!("{}: config", sp.display()))?;
    let diff: Vec<String> = saved.fixed().into_iter().zip(cfg.fixed()).filter(|(a, b)| a != b).map(|((k, a), (_, b))| format!("--{} {a} (now {b})", k.replace('_', "-"))).collect();
    if !diff.is_empty() {
        bail!("--resume: the checkpoint in {} was trained with {}; only --steps and --save-every may change", dir.display(), diff.join(", "));
    }
    let (src, n) = (state["data"]["source"].as_str().unwrap_or(""), state["data"]["images"].as_u64().unwrap_or(0));
    if src != data.source || n != data.len() as u64 {
        bail!("--resume: the checkpoint was trained on {src} ({n} images), not {} ({} images)", data.source, data.len());
    }
    let u = |k: &str| -> Result<u64> { state[k].as_u64().ok_or_else(|| anyhow!("{}: '{k}' is missing or not an integer", sp.display())) };
    let net = M::load_file(&dir.join("net.safetensors"), None).context("loading the checkpoint's net")?;
    let ema = M::load_file(&dir.join("ema.safetensors"), None).context("loading the checkpoint's EMA")?;
    let mut adam = Adam::new(cfg.lr);
    adam.step = u("adam_step")?;
    let op = dir.join("optimizer.safetensors");
    if adam.step > 0 {
        let shapes: Vec<Vec<usize>> = net.params().vars().iter().map(|v| v.shape()).collect();
        (adam.exp_avg, adam.exp_avg_sq) = load_adam_moments(&op, net.params().names(), &shapes)?;
    }
    let order: Vec<usize> = serde_json::from_value(state["order"].clone()).with_context(|| format!("{}: order", sp.display()))?;
    if let Some(&bad) = order.iter().find(|&&i| i >= data.len()) {
        bail!("{}: data index {bad} is out of range", sp.display());
    }
    let s = TrainState {
        step: u("step")?,
        rng: rng_from_json(&state["rng"]).with_context(|| format!("{}: rng", sp.display()))?,
        drop_rng: serde_json::from_value(state["philox"].clone()).with_context(|| format!("{}: philox", sp.display()))?,
        order,
        adam,
    };
    Ok(Resumed { net, ema, state: s })
}

/// Train `net` (and its EMA copy `ema`) on `data`, from the start or from `start` (a run's
/// [`resume`]); class-conditional models get the labels. With `out`, the EMA and raw weights and
/// the checkpoint are saved every `save_every` steps and at the end.
pub fn pretrain<M: VelocityField>(net: &M, ema: &M, data: &Dataset, cfg: &PretrainConfig, out: Option<&Path>, start: Option<TrainState>, on_step: &mut dyn FnMut(&PretrainStep)) -> Result<()> {
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
    let mut s = start.unwrap_or_else(|| TrainState::new(cfg));
    let n = data.len();
    let save = |net: &M, ema: &M, s: &TrainState| -> Result<()> {
        if let Some(o) = out {
            ema.save_file(o).with_context(|| format!("saving {}", o.display()))?;
            net.save_file(&net_path(o))?;
            save_checkpoint(o, net, ema, s, cfg, data).with_context(|| format!("saving the checkpoint {}", checkpoint_dir(o).display()))?;
        }
        Ok(())
    };
    for step in s.step..cfg.steps {
        let t0 = Instant::now();
        // epochs of a seeded shuffle, like a DataLoader with shuffle=True, drop_last=False
        let mut idx = Vec::with_capacity(cfg.batch_size);
        while idx.len() < cfg.batch_size {
            if s.order.is_empty() {
                s.order = (0..n).collect();
                s.rng.shuffle(&mut s.order);
            }
            idx.push(s.order.pop().expect("refilled"));
        }
        let (x1, y) = data.batch(&idx);
        let x0 = Tensor::randn(x1.shape(), &mut s.rng);
        let fs = matcher.sample(&x0, &x1, None, &mut s.rng)?;
        let y: Option<Vec<usize>> = if labels { y.map(|y| fs.x1_idx.iter().map(|&j| y[j]).collect()) } else { None };
        let v = net.forward(&Var::constant(fs.t), &Var::constant(fs.xt), y.as_deref(), &mut Forward { dropout_rng: Some(&mut s.drop_rng) })?;
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
        s.adam.step_flat(net.params(), &grads, lr, scale, Some((ema.params(), cfg.ema_decay)))?;
        on_step(&PretrainStep { step: step + 1, loss: lv, grad_norm: gn, lr, seconds: t0.elapsed().as_secs_f64() });
        s.step = step + 1;
        if cfg.save_every > 0 && s.step.is_multiple_of(cfg.save_every) && s.step < cfg.steps {
            save(net, ema, &s)?;
        }
    }
    save(net, ema, &s)
}
