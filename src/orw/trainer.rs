//! The ORW-CFM-W2 trainer: its state and one gradient step ([`Trainer::train_step`]); the loop
//! over steps, with its hooks and checkpoint schedule, is [`super::run`].
//!
//! Three copies of one velocity field: `net` (trained), `last_policy` (the frozen sampler, refreshed
//! from `net` after every epoch) and `reference` (frozen forever). Each gradient step takes a batch
//! `x1` sampled from `last_policy` by the ODE (with its rewards), weights it by `exp(τ r)` (or a
//! normalised variant), pairs it with fresh noise through the configured coupling — the weights and
//! labels follow their samples through any OT re-pairing — and takes one Adam step on the
//! weighted flow-matching loss plus `α` times the W2 term, with warm-up and gradient clipping.
//!
//! # Random streams
//!
//! Continuous noise is drawn on the model's device by counter-based Philox streams
//! ([`NoiseStreams`], each a `(seed, offset)`): the ODE's starting points `x0 ~ N(0, I)` when
//! sampling, the training noise `x0` and the matcher's `ε`, and the dropout masks. The backend
//! makes the values where they are used (nothing is drawn on the host and uploaded), and the CPU
//! draws the same bits (normals to the last ulp of the GPU's `logf`/`sincosf`), so CPU and GPU
//! runs agree. Host-side, discrete or tiny draws stay on xoshiro ([`Rng`]): class labels of
//! sampled batches (`rng_sample`), `t ~ U[0, 1)` (B values, needed on the host for the
//! matchers' per-row coefficients) and OT-plan resampling (`rng_train`). An exact OT coupling is
//! solved on the host from the CPU twin of the device's `x0` draw (same `(seed, offset)`), so no
//! noise is read back. Every stream is derived from the config's `seed`; their states are in the
//! checkpoint, so a resumed run continues bit for bit.
//!
//! # Host reads
//!
//! A step reads the device once: the loss, its two terms and the gradients' sum of squares are
//! device scalars gathered into one `[5]` tensor and downloaded together, before the update
//! (the finite checks, f16's skip decision and the clipping coefficient need them there).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::config::OrwConfig;
use super::loss::{WeightMode, reward_weights};
use super::step_graph::{self, StepGraph};
use crate::flow::matchers::{FlowMatcher, FlowSample};
use crate::flow::ode::{OdeSolver, OdeStats, odeint};
use crate::flow::ode_graph::{graphs_enabled, odeint_graphed};
use crate::nn::{Forward, VelocityField};
use crate::optim::{Adam, clip_coef, warmup_lr};
use crate::reward::{Reward, score_checked};
use crate::rng::Rng;
use crate::rng::philox::Philox;
use crate::tensor::{DType, Device, Tensor};

/// What one gradient step did. `step` counts completed steps (1 after the first).
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// The epoch this step belonged to (0-based).
    pub epoch: u64,
    pub lr: f32,
    /// `mean_i w_i mean_pix (v − u)²`
    pub fm_loss: f32,
    /// `mean_i mean_pix (v − v_ref)²`, before multiplying by α
    pub w2_loss: f32,
    pub total_loss: f32,
    pub reward_mean: f32,
    pub reward_max: f32,
    pub reward_min: f32,
    pub weight_mean: f32,
    pub weight_max: f32,
    /// Effective sample size of the weights, `(Σw)² / Σw²`.
    pub weight_ess: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples drawn from the policy for this step (0 when the step reused a batch).
    pub sampled: usize,
    /// Velocity evaluations spent sampling them.
    pub nfe: usize,
    /// Whether the sampling policy was refreshed after this step (end of an epoch).
    pub policy_refreshed: bool,
    /// f16: the update was skipped for non-finite gradients (the loss scale was halved).
    pub skipped: bool,
    /// The loss scale this step ran at (1 unless f16).
    pub loss_scale: f32,
    pub seconds: f64,
}

/// Samples drawn from the current policy and not yet trained on, first in first out.
#[derive(Clone, Default)]
pub(crate) struct SamplePool {
    pub(crate) x: Vec<f32>,
    pub(crate) y: Vec<usize>,
    pub(crate) r: Vec<f32>,
}

/// The batch being trained on, with how many more steps may use it.
#[derive(Clone)]
pub(crate) struct Batch {
    pub(crate) x1: Tensor,
    pub(crate) y: Option<Vec<usize>>,
    pub(crate) r: Vec<f32>,
    pub(crate) uses_left: usize,
}

/// The trainer's Philox streams, one per kind of device noise (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseStreams {
    /// The ODE's starting points when sampling from the policy.
    pub sample: Philox,
    /// The training noise `x0`.
    pub x0: Philox,
    /// The matcher's `ε`.
    pub eps: Philox,
    /// Dropout masks.
    pub dropout: Philox,
}

impl NoiseStreams {
    /// Four streams keyed by the next draws of `master`.
    pub fn from_master(master: &mut Rng) -> Self {
        let mut next = || Philox::new(master.next_u64());
        NoiseStreams { sample: next(), x0: next(), eps: next(), dropout: next() }
    }
}

/// The ORW-CFM-W2 trainer over any [`VelocityField`].
pub struct Trainer<M: VelocityField> {
    pub(crate) cfg: OrwConfig,
    pub(crate) matcher: FlowMatcher,
    pub(crate) solver: OdeSolver,
    pub(crate) weight_mode: WeightMode,
    pub(crate) net: M,
    pub(crate) last_policy: M,
    pub(crate) reference: M,
    pub(crate) ema: Option<M>,
    pub(crate) adam: Adam,
    pub(crate) step: u64,
    pub(crate) epoch: u64,
    pub(crate) step_in_epoch: u64,
    /// Class labels of sampled batches.
    pub(crate) rng_sample: Rng,
    /// `t` and OT-plan resampling.
    pub(crate) rng_train: Rng,
    pub(crate) noise: NoiseStreams,
    pub(crate) pool: SamplePool,
    pub(crate) current: Option<Batch>,
    pub(crate) run_dir: Option<PathBuf>,
    /// Mixed precision: the dtype of the forward/backward pass (`net` and `ema` stay f32, the
    /// master weights; `work` is `net` cast each step; `last_policy` and `reference` are stored
    /// in it).
    pub(crate) precision: DType,
    pub(crate) work: Option<M>,
    /// f16's dynamic loss scale (1 otherwise), the good steps since it last changed, and the
    /// steps skipped for non-finite gradients.
    pub(crate) loss_scale: f32,
    pub(crate) scale_good_steps: u64,
    pub(crate) skipped_steps: u64,
    /// the device pass of a step as a CUDA graph (`step_graph.rs`)
    pub(crate) step_graph: StepGraph,
}

/// f16 loss scaling (as `torch.cuda.amp.GradScaler`): start at 2^16, halve on a non-finite
/// gradient (the step is skipped), double after this many good steps.
pub const LOSS_SCALE_INIT: f32 = 65536.0;
pub const LOSS_SCALE_GROWTH_INTERVAL: u64 = 2000;

/// Draw `n` samples from `model` by integrating its ODE from `N(0, I)` at t = 0 to t = 1 (no tape).
/// Class-conditional models get uniformly drawn labels, returned with the samples. Seeded by
/// `rng`: the noise comes from a Philox stream keyed by its next draw, the labels from it.
pub fn sample_model<M: VelocityField>(model: &M, n: usize, solver: &OdeSolver, steps: usize, rng: &mut Rng) -> Result<(Tensor, Option<Vec<usize>>, OdeStats)> {
    let mut noise = Philox::new(rng.next_u64());
    sample_model_with_noise(model, n, solver, steps, &mut noise, rng)
}

/// [`sample_model`] with the starting points drawn from `noise` on the model's device (the
/// stream moves past them) and the labels from `labels`.
pub fn sample_model_with_noise<M: VelocityField>(model: &M, n: usize, solver: &OdeSolver, steps: usize, noise: &mut Philox, labels: &mut Rng) -> Result<(Tensor, Option<Vec<usize>>, OdeStats)> {
    let mut shape = vec![n];
    shape.extend(model.sample_shape());
    // the noise is drawn where the model is (the same draws on every device); the samples come
    // back to the host for the reward
    let z = Tensor::philox_normal(&shape, model.device(), DType::F32, noise)?;
    let y: Option<Vec<usize>> = model.num_classes().map(|k| (0..n).map(|_| labels.below(k as u64) as usize).collect());
    let mut f = |t: f32, x: &Tensor| model.predict(&Tensor::full_on(&[n], t, DType::F32, x.device())?, x, y.as_deref());
    // on a GPU, a fixed-grid solve of an unconditional model replays a CUDA graph (captured on
    // the second solve for these weights; `flow::ode_graph`); class labels would be uploaded
    // inside the solve, so class-conditional models solve eagerly
    let weights = if y.is_none() && graphs_enabled() { model.params().device_identity() } else { None };
    let (x1, stats) = match weights {
        Some(w) => odeint_graphed(&mut f, &z, 0.0, 1.0, steps, solver, w),
        None => odeint(&mut f, &z, 0.0, 1.0, steps, solver),
    }
    .context("sampling from the policy")?;
    Ok((x1.to_device(Device::Cpu)?, y, stats))
}

/// Training pairs with the weights and labels that belong to them, row for row.
pub struct PairedBatch {
    pub flow: FlowSample,
    /// The noise drawn for the batch, before pairing (`flow.x0_idx` indexes it).
    pub x0: Tensor,
    /// `w[k]` is the weight of the sample `x1[flow.x1_idx[k]]` that row `k` was built from.
    pub w: Vec<f32>,
    pub y: Option<Vec<usize>>,
}

/// Draw noise `x0` on `device` from `x0_noise`, pair it with the samples `x1` through the
/// matcher's coupling, draw `t` (from `rng`, after any plan resampling) and `ε` (from
/// `eps_noise`, on `device`), and carry each sample's weight and label along. An OT plan is
/// solved on the host from the CPU twin of the `x0` draw (the same `(seed, offset)`), so nothing
/// is read back from the device. (The reference code multiplies the OT-resampled rows by the
/// weights in their original order, which pairs rewards with the wrong samples; this cannot.)
#[allow(clippy::too_many_arguments)]
pub fn pair_batch(matcher: &FlowMatcher, x1: &Tensor, w: &[f32], y: Option<&[usize]>, device: Device, rng: &mut Rng, x0_noise: &mut Philox, eps_noise: &mut Philox) -> Result<PairedBatch> {
    let b = x1.shape()[0];
    if w.len() != b || y.is_some_and(|y| y.len() != b) {
        bail!("{} weights for a batch of {b}", w.len());
    }
    let shape = x1.shape().to_vec();
    let (seed, offset) = (x0_noise.seed(), x0_noise.offset());
    let x0 = Tensor::philox_normal(&shape, device, DType::F32, x0_noise)?;
    let pairs = if matcher.kind.uses_ot() {
        let x0_host = Tensor::philox_at(&shape, crate::backend::RandomDist::Normal, seed, offset, Device::Cpu, DType::F32)?;
        matcher.pairing(&x0_host, &x1.to_cpu()?, rng)?
    } else {
        matcher.pairing(&x0, x1, rng)?
    };
    let t: Vec<f32> = (0..b).map(|_| rng.uniform()).collect();
    let eps = Tensor::philox_normal(&shape, device, DType::F32, eps_noise)?;
    let flow = matcher.paired_sample(&x0, &x1.to_device(device)?, pairs, t, eps)?;
    let w = flow.x1_idx.iter().map(|&j| w[j]).collect();
    let y = y.map(|y| flow.x1_idx.iter().map(|&j| y[j]).collect());
    Ok(PairedBatch { flow, x0, w, y })
}

/// Samples, their labels (class-conditional models), rewards and the solve's cost.
type Drawn = (Tensor, Option<Vec<usize>>, Vec<f32>, OdeStats);

/// Mean, max and min of a non-empty slice.
fn stats(v: &[f32]) -> (f32, f32, f32) {
    let mean = (v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64) as f32;
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    (mean, max, min)
}

fn take_rows(v: &mut Vec<f32>, rows: usize, per: usize) -> Vec<f32> {
    v.drain(..rows * per).collect()
}

impl<M: VelocityField> Trainer<M> {
    /// A trainer starting from `model`: `net`, `last_policy` and `reference` all begin as copies of it.
    pub fn new(cfg: OrwConfig, model: M) -> Result<Self> {
        let reference = model.clone();
        Self::with_reference(cfg, model, reference)
    }

    /// A trainer whose `net` and `last_policy` start from `init` and whose W2 term pulls towards
    /// `reference` (same architecture).
    pub fn with_reference(cfg: OrwConfig, init: M, reference: M) -> Result<Self> {
        cfg.validate()?;
        if init.params().names() != reference.params().names() || init.params().vars().iter().zip(reference.params().vars()).any(|(a, b)| a.shape() != b.shape()) {
            bail!("the reference model's parameters do not match the trained model's");
        }
        let mut master = Rng::new(cfg.seed);
        let (rng_sample, rng_train) = (master.fork(), master.fork());
        let noise = NoiseStreams::from_master(&mut master);
        let ema = (cfg.ema_decay > 0.0).then(|| init.clone());
        let last_policy = init.clone();
        Ok(Trainer {
            matcher: cfg.matcher()?,
            solver: cfg.solver()?,
            weight_mode: cfg.weight_mode()?,
            adam: Adam::new(cfg.learning_rate),
            cfg,
            net: init,
            last_policy,
            reference,
            ema,
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            rng_sample,
            rng_train,
            noise,
            pool: SamplePool::default(),
            current: None,
            run_dir: None,
            precision: DType::F32,
            work: None,
            loss_scale: 1.0,
            scale_good_steps: 0,
            skipped_steps: 0,
            step_graph: StepGraph::default(),
        })
    }

    /// A trainer whose reference (and starting point) is the config's `ref_path` (safetensors or
    /// a torchcfm `.pt`, entry `ref_key`).
    pub fn from_ref_path(cfg: OrwConfig) -> Result<Self> {
        let p = cfg.ref_path.clone().ok_or_else(|| anyhow::anyhow!("the config has no ref_path (the pre-trained model to fine-tune)"))?;
        let model = M::load_file(Path::new(&p), cfg.ref_key.as_deref()).with_context(|| format!("loading the reference model {p}"))?;
        Self::new(cfg, model)
    }

    /// Move the trained, policy, reference and EMA models and Adam's moments (those of a resumed
    /// run; a new run creates them on the first step, beside the parameters) to `device`. Noise
    /// is drawn there by the Philox streams (the same numbers on every device); labels, `t`,
    /// couplings and rewards stay on the host.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        self.adam.to_device(device)?;
        self.net.to_device(device)?;
        self.last_policy.to_device(device)?;
        self.reference.to_device(device)?;
        if let Some(e) = &mut self.ema {
            e.to_device(device)?;
        }
        Ok(())
    }

    /// Train in `dtype`: the forward and backward pass run on a copy of `net` cast to it, the
    /// gradients are cast back and Adam updates `net`'s f32 master weights; the sampling policy
    /// and the reference are stored in `dtype`. f16 scales the loss dynamically
    /// ([`LOSS_SCALE_INIT`]); a step with non-finite gradients is skipped and counted.
    pub fn set_precision(&mut self, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            bail!("precision must be f32, f16 or bf16, not {dtype}");
        }
        if self.precision == dtype {
            return Ok(());
        }
        self.precision = dtype;
        self.last_policy.to_precision(dtype)?;
        self.reference.to_precision(dtype)?;
        if dtype == DType::F32 {
            self.work = None;
        } else {
            let mut w = self.net.clone();
            w.to_precision(dtype)?;
            self.work = Some(w);
        }
        if dtype == DType::F16 && self.loss_scale == 1.0 && self.skipped_steps == 0 {
            self.loss_scale = LOSS_SCALE_INIT;
        }
        Ok(())
    }
    pub fn precision(&self) -> DType {
        self.precision
    }
    /// f16's current loss scale (1 for f32 and bf16).
    pub fn loss_scale(&self) -> f32 {
        self.loss_scale
    }

    /// Write checkpoints under `dir` (created if needed); metrics are the caller's (a
    /// [`crate::logging::MetricsLog`] passed to [`Trainer::run`] as a hook).
    pub fn set_run_dir(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
        self.run_dir = Some(dir.to_path_buf());
        Ok(())
    }

    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }
    pub fn config(&self) -> &OrwConfig {
        &self.cfg
    }
    /// Change the number of epochs (e.g. to extend a resumed run).
    pub fn set_num_epochs(&mut self, n: u64) {
        self.cfg.num_epochs = n;
    }
    pub fn net(&self) -> &M {
        &self.net
    }
    pub fn last_policy(&self) -> &M {
        &self.last_policy
    }
    pub fn reference(&self) -> &M {
        &self.reference
    }
    pub fn ema(&self) -> Option<&M> {
        self.ema.as_ref()
    }
    pub fn optimizer(&self) -> &Adam {
        &self.adam
    }
    /// Gradient steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }
    /// Epochs completed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn finished(&self) -> bool {
        self.step >= self.cfg.total_steps()
    }

    /// Draw `n` samples from the frozen policy and score them.
    fn draw(&mut self, n: usize, reward: &mut dyn Reward) -> Result<Drawn> {
        let (x, y, st) = sample_model_with_noise(&self.last_policy, n, &self.solver, self.cfg.ode_steps, &mut self.noise.sample, &mut self.rng_sample)?;
        let r = score_checked(reward, &x, y.as_deref()).with_context(|| format!("scoring samples at step {}", self.step))?;
        Ok((x, y, r, st))
    }

    /// Make sure `current` holds a batch with a use left; returns (samples drawn, NFE).
    fn ensure_batch(&mut self, reward: &mut dyn Reward) -> Result<(usize, usize)> {
        if self.current.as_ref().is_some_and(|b| b.uses_left > 0) {
            return Ok((0, 0));
        }
        let bs = self.cfg.batch_size;
        let mut per_sample = self.net.sample_shape();
        let per: usize = per_sample.iter().product();
        let (mut drawn, mut nfe) = (0, 0);
        while self.pool.r.len() < bs {
            let n = self.cfg.samples_per_solve();
            let (x, y, r, st) = self.draw(n, reward)?;
            self.pool.x.extend_from_slice(x.data());
            if let Some(y) = y {
                self.pool.y.extend(y);
            }
            self.pool.r.extend(r);
            drawn += n;
            nfe += st.nfe;
        }
        let x = take_rows(&mut self.pool.x, bs, per);
        let r: Vec<f32> = self.pool.r.drain(..bs).collect();
        let y = self.net.num_classes().map(|_| self.pool.y.drain(..bs).collect());
        per_sample.insert(0, bs);
        self.current = Some(Batch { x1: Tensor::from_vec(x, &per_sample), y, r, uses_left: self.cfg.sample_reuse });
        Ok((drawn, nfe))
    }

    /// Copy `net` into the sampling policy and drop samples drawn from the old one.
    pub fn refresh_policy(&mut self) -> Result<()> {
        self.last_policy.copy_from(&self.net);
        self.last_policy.to_precision(self.precision)?;
        self.pool = SamplePool::default();
        self.current = None;
        Ok(())
    }

    /// One gradient step (sampling first when the current batch is used up). Ends the epoch —
    /// refreshing the policy — after `steps_per_epoch` steps.
    pub fn train_step(&mut self, reward: &mut dyn Reward) -> Result<StepMetrics> {
        let start = Instant::now();
        let (sampled, nfe) = self.ensure_batch(reward)?;
        let batch = self.current.as_mut().expect("a batch is ready");
        batch.uses_left -= 1;
        let (x1, y, r) = (batch.x1.clone(), batch.y.clone(), batch.r.clone());

        let w = reward_weights(&r, self.cfg.temperature, self.weight_mode).with_context(|| format!("at step {}", self.step))?;
        let dev = self.net.device();
        let PairedBatch { flow: fs, w: w_pair, y: y_pair, .. } = pair_batch(&self.matcher, &x1, &w, y.as_deref(), dev, &mut self.rng_train, &mut self.noise.x0, &mut self.noise.eps)?;

        // mixed precision: the pass runs on `work`, `net` cast to the training dtype
        if let Some(work) = &mut self.work {
            work.copy_from(&self.net);
            work.to_precision(self.precision)?;
        }
        let scale = self.loss_scale;
        let b = w_pair.len();
        // the device pass (forward, loss, backward, gradients, the read gathered on the device):
        // through a CUDA graph for f32 unconditional steps on a GPU (`step_graph.rs`), else eager
        let graphed = self.work.is_none() && scale == 1.0 && y_pair.is_none() && crate::tensor::graph::records(dev) && graphs_enabled();
        let (read, grads) = if graphed {
            let dropout = if self.cfg.dropout { Some(&mut self.noise.dropout) } else { None };
            self.step_graph.run(&self.net, &self.reference, &fs.t, &fs.xt, &fs.ut, &w_pair, self.cfg.w2_coefficient, dropout)?
        } else {
            let model = self.work.as_ref().unwrap_or(&self.net);
            let mut fw = Forward { dropout_rng: if self.cfg.dropout { Some(&mut self.noise.dropout) } else { None } };
            let w = Tensor::from_vec(w_pair.clone(), &[b]).to_device(dev)?;
            step_graph::pass(model, &self.reference, &fs.t, &fs.xt, &fs.ut, y_pair.as_deref(), &w, self.cfg.w2_coefficient, scale, &mut fw)?
        };
        // the step's one host read: the loss, its terms and Σ g² (as an f32 pair), gathered on
        // the device and downloaded together
        let read = read.values()?;
        let (fm_loss, w2_loss, total) = (read[0], read[1], read[2]);
        let gnorm = (read[3] as f64 + read[4] as f64).sqrt();
        if !total.is_finite() {
            bail!("the loss is not finite at step {} (fm {fm_loss}, w2 {w2_loss}); lower the learning rate or the temperature", self.step);
        }
        let mut skipped = false;
        if !gnorm.is_finite() {
            if self.precision != DType::F16 {
                bail!("the gradient norm is not finite at step {}", self.step);
            }
            // f16 overflowed at this loss scale: skip the update and halve the scale
            skipped = true;
            self.skipped_steps += 1;
            self.loss_scale = (self.loss_scale * 0.5).max(1.0);
            self.scale_good_steps = 0;
        } else {
            // clipping, Adam and the EMA: one pass over the flat arenas (the clip scale from the
            // norm read above)
            let scale = if self.cfg.grad_clip > 0.0 { clip_coef(gnorm, self.cfg.grad_clip) } else { 1.0 };
            let lr = warmup_lr(self.cfg.learning_rate, self.step, self.cfg.warmup_steps);
            let ema = self.ema.as_ref().map(|e| (e.params(), self.cfg.ema_decay));
            self.adam.step_flat(self.net.params(), &grads, lr, scale, ema)?;
            if self.precision == DType::F16 {
                self.scale_good_steps += 1;
                if self.scale_good_steps >= LOSS_SCALE_GROWTH_INTERVAL {
                    self.loss_scale *= 2.0;
                    self.scale_good_steps = 0;
                }
            }
        }
        let lr = warmup_lr(self.cfg.learning_rate, self.step, self.cfg.warmup_steps);

        let epoch = self.epoch;
        self.step += 1;
        self.step_in_epoch += 1;
        let refreshed = self.step_in_epoch >= self.cfg.steps_per_epoch;
        if refreshed {
            self.refresh_policy()?;
            self.epoch += 1;
            self.step_in_epoch = 0;
        }
        let (reward_mean, reward_max, reward_min) = stats(&r);
        let (weight_mean, weight_max, _) = stats(&w);
        let (s1, s2) = w.iter().fold((0.0f64, 0.0f64), |(a, b), &v| (a + v as f64, b + (v as f64).powi(2)));
        // the step's GPU work is queued: wait for it, so that `seconds` is the step's own time
        // and an asynchronous GPU error surfaces at the step that caused it
        self.net.device().synchronize()?;
        Ok(StepMetrics {
            step: self.step,
            epoch,
            lr,
            fm_loss,
            w2_loss,
            total_loss: total,
            reward_mean,
            reward_max,
            reward_min,
            weight_mean,
            weight_max,
            weight_ess: (s1 * s1 / s2.max(1e-300)) as f32,
            grad_norm: gnorm,
            sampled,
            nfe,
            policy_refreshed: refreshed,
            skipped,
            loss_scale: scale,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
