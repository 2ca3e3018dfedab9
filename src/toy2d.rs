//! ORW-CFM-W2 on a 2-D mixture of Gaussians: the method's theory in seconds.
//!
//! A small MLP velocity field is pre-trained by conditional flow matching on eight Gaussians on a
//! circle, then fine-tuned with ORW-CFM-W2 toward the reward `r(x) = −‖x − c‖`, which prefers the
//! mode at `c = (R, 0)`. Without the W2 term (α = 0) the online reweighting `q_N ∝ q_0 exp(N τ r)`
//! collapses the samples onto `c`; α > 0 keeps them near the reference and trades reward for
//! diversity (mean pairwise distance of samples).

use std::sync::{Mutex, OnceLock};

use anyhow::Result;
use serde::Serialize;

use crate::autograd::Var;
use crate::autograd::ops;
use crate::flow::matchers::{FlowMatcher, MatcherKind};
use crate::flow::ode::OdeSolver;
use crate::nn::{Forward, Mlp, MlpConfig, VelocityField};
use crate::optim::{Adam, clip_grad_norm};
use crate::orw::{OrwConfig, StepMetrics, TrainHooks, Trainer, sample_model};
use crate::reward::{FnReward, Reward};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Radius of the circle of modes.
pub const RADIUS: f32 = 2.0;
/// Standard deviation of each mode.
pub const MODE_STD: f32 = 0.15;
/// Number of modes.
pub const MODES: usize = 8;
/// Where the reward peaks: the mode at angle 0.
pub const TARGET: [f32; 2] = [RADIUS, 0.0];

/// `n` draws from the mixture.
pub fn mixture_sample(n: usize, rng: &mut Rng) -> Tensor {
    let mut v = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let k = rng.below(MODES as u64) as f32;
        let a = k * std::f32::consts::TAU / MODES as f32;
        v.push(RADIUS * a.cos() + MODE_STD * rng.normal());
        v.push(RADIUS * a.sin() + MODE_STD * rng.normal());
    }
    Tensor::from_vec(v, &[n, 2])
}

/// Mean distance from each sample to its nearest mode centre (how sharp the modes are).
pub fn mode_error(x: &Tensor) -> f32 {
    let n = x.shape()[0];
    let s: f64 = x
        .data()
        .chunks(2)
        .map(|p| {
            (0..MODES)
                .map(|k| {
                    let a = k as f32 * std::f32::consts::TAU / MODES as f32;
                    ((p[0] - RADIUS * a.cos()).powi(2) + (p[1] - RADIUS * a.sin()).powi(2)).sqrt()
                })
                .fold(f32::INFINITY, f32::min) as f64
        })
        .sum();
    (s / n.max(1) as f64) as f32
}

/// `r(x) = −‖x − c‖` for each row of `x [n, 2]`.
pub fn reward(x: &Tensor) -> Vec<f32> {
    x.data().chunks(2).map(|p| -((p[0] - TARGET[0]).powi(2) + (p[1] - TARGET[1]).powi(2)).sqrt()).collect()
}

/// Mean pairwise Euclidean distance of the samples.
pub fn diversity(x: &Tensor) -> f32 {
    crate::eval::mean_pairwise_distance(x)
}

/// Settings of the pre-training (plain I-CFM with Adam).
#[derive(Clone, Debug)]
pub struct PretrainOptions {
    pub width: usize,
    /// icfm or otcfm (exact-OT pairs: straighter paths, sharper modes for the same steps).
    pub coupling: MatcherKind,
    pub steps: usize,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        PretrainOptions { width: 64, coupling: MatcherKind::Independent, steps: 5000, batch: 256, lr: 3e-3, seed: 0 }
    }
}

/// Pre-train the base velocity field by conditional flow matching on the mixture.
pub fn pretrain(o: &PretrainOptions) -> Result<Mlp> {
    let model = Mlp::new(MlpConfig { dim: 2, width: o.width, hidden_layers: 3 }, o.seed)?;
    let mut rng = Rng::new(o.seed ^ 0x5EED);
    let matcher = FlowMatcher::new(o.coupling, 0.0);
    let mut adam = Adam::new(o.lr);
    for step in 0..o.steps {
        let x1 = mixture_sample(o.batch, &mut rng);
        let x0 = Tensor::randn(&[o.batch, 2], &mut rng);
        let fs = matcher.sample(&x0, &x1, None, &mut rng)?;
        let v = model.forward(&Var::constant(fs.t), &Var::constant(fs.xt), None, &mut Forward { dropout_rng: None })?;
        let loss = ops::mse_loss(&v, &Var::constant(fs.ut))?;
        let mut grads = model.params().grads(&loss.backward()?)?;
        clip_grad_norm(&mut grads, 1.0)?;
        // cosine decay to a tenth: sharper modes for the same number of steps
        let lr = o.lr * (0.55 + 0.45 * (std::f32::consts::PI * step as f32 / o.steps as f32).cos());
        adam.step_params(model.params(), &grads, lr)?;
    }
    Ok(model)
}

/// The default base model, pre-trained once per process and shared.
pub fn default_base(seed: u64) -> Result<Mlp> {
    // models hold `Rc` tape nodes, so the cache keeps the plain tensors
    type Cached = (u64, MlpConfig, Vec<(String, Tensor)>);
    static CACHE: OnceLock<Mutex<Vec<Cached>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, cfg, t)) = c.iter().find(|(s, _, _)| *s == seed) {
        let mut m = Mlp::new(cfg.clone(), 0)?;
        m.params_mut().load_strict(t.clone())?;
        return Ok(m);
    }
    let m = pretrain(&PretrainOptions { seed, ..PretrainOptions::default() })?;
    c.push((seed, m.config().clone(), m.params().tensors()));
    Ok(m)
}

/// Settings of one fine-tuning run.
#[derive(Clone, Debug)]
pub struct Toy2dOptions {
    pub alpha: f32,
    pub tau: f32,
    pub epochs: u64,
    pub steps_per_epoch: u64,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Samples used to measure reward and diversity.
    pub eval_samples: usize,
    pub ode_steps: usize,
    pub weight_mode: String,
}

impl Default for Toy2dOptions {
    fn default() -> Self {
        Toy2dOptions { alpha: 1.0, tau: 1.0, epochs: 30, steps_per_epoch: 10, batch: 256, lr: 2e-3, seed: 0, eval_samples: 1000, ode_steps: 40, weight_mode: "exp".into() }
    }
}

/// Reward and diversity after an epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochPoint {
    pub epoch: u64,
    pub reward_mean: f32,
    pub diversity: f32,
}

/// What a run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Toy2dResult {
    pub alpha: f32,
    pub tau: f32,
    pub reward_mean_initial: f32,
    pub reward_mean: f32,
    pub diversity_initial: f32,
    pub diversity: f32,
    /// After each epoch (epoch 0: the base model).
    pub history: Vec<EpochPoint>,
    #[serde(skip)]
    pub samples_initial: Tensor,
    #[serde(skip)]
    pub samples: Tensor,
}

fn evaluate(m: &Mlp, o: &Toy2dOptions) -> Result<(Tensor, f32, f32)> {
    // the same noise every time, so the curves show the model, not sampling noise
    let mut rng = Rng::new(o.seed ^ 0xE7A1);
    let (x, _, _) = sample_model(m, o.eval_samples, &OdeSolver::Euler, o.ode_steps, &mut rng)?;
    let r = reward(&x);
    let mean = (r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64) as f32;
    let d = diversity(&x);
    Ok((x, mean, d))
}

/// The evaluation after every epoch of [`finetune`].
struct EpochEval<'a> {
    o: &'a Toy2dOptions,
    on_epoch: &'a mut dyn FnMut(&EpochPoint),
    history: Vec<EpochPoint>,
}

impl TrainHooks<Mlp> for EpochEval<'_> {
    fn on_epoch(&mut self, tr: &Trainer<Mlp>, _reward: &mut dyn Reward, _m: &StepMetrics) -> Result<()> {
        let (_, r, d) = evaluate(tr.net(), self.o)?;
        let p = EpochPoint { epoch: tr.epoch(), reward_mean: r, diversity: d };
        (self.on_epoch)(&p);
        self.history.push(p);
        Ok(())
    }
}

/// Fine-tune `base` with ORW-CFM-W2 toward [`reward`]; reward and diversity are measured on
/// `eval_samples` samples after every epoch.
pub fn finetune(base: &Mlp, o: &Toy2dOptions, on_epoch: &mut dyn FnMut(&EpochPoint)) -> Result<Toy2dResult> {
    let cfg = OrwConfig {
        learning_rate: o.lr,
        warmup_steps: 0,
        w2_coefficient: o.alpha,
        temperature: o.tau,
        grad_clip: 1.0,
        batch_size: o.batch,
        num_epochs: o.epochs,
        steps_per_epoch: o.steps_per_epoch,
        ode_solver: "euler".into(),
        ode_steps: o.ode_steps,
        coupling: "independent".into(),
        weight_mode: o.weight_mode.clone(),
        sample_batch: o.batch * o.steps_per_epoch as usize,
        seed: o.seed,
        dropout: false,
        ..OrwConfig::default()
    };
    let mut tr = Trainer::new(cfg, base.clone())?;
    let (x0, r0, d0) = evaluate(base, o)?;
    let first = EpochPoint { epoch: 0, reward_mean: r0, diversity: d0 };
    on_epoch(&first);
    let mut hooks = EpochEval { o, on_epoch, history: vec![first] };
    tr.run(&mut FnReward::new("toy2d", reward), None, &mut hooks)?;
    let history = hooks.history;
    let (x, r, d) = evaluate(tr.net(), o)?;
    Ok(Toy2dResult { alpha: o.alpha, tau: o.tau, reward_mean_initial: r0, reward_mean: r, diversity_initial: d0, diversity: d, history, samples_initial: x0, samples: x })
}

/// `orwcfm-fast toy2d`: its flags.
#[derive(clap::Args, Debug, Clone)]
pub struct Toy2dArgs {
    /// α, the W2 coefficient (0: no regularisation, the samples collapse onto the reward's peak).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// τ, the temperature: weights are exp(τ·r).
    #[arg(long, default_value_t = 1.0)]
    pub tau: f32,
    /// Epochs of fine-tuning (the sampling policy is refreshed after each).
    #[arg(long, default_value_t = 20)]
    pub epochs: u64,
    /// Gradient steps per epoch.
    #[arg(long, default_value_t = 10)]
    pub steps_per_epoch: u64,
    /// Samples per gradient step.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// Seeds pre-training, fine-tuning and evaluation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// exp (as published), exp-normalized or zscore.
    #[arg(long, default_value = "exp")]
    pub weight_mode: String,
    /// Samples that measure reward and diversity.
    #[arg(long, default_value_t = 1000)]
    pub eval_samples: usize,
    /// Euler steps of the sampler.
    #[arg(long, default_value_t = 40)]
    pub ode_steps: usize,
    /// Print per-epoch lines, then a JSON line last: {"reward_mean_initial":..,"reward_mean":..,"diversity_initial":..,"diversity":..}.
    #[arg(long)]
    pub json: bool,
    /// Draw the samples before and after fine-tuning to this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<std::path::PathBuf>,
    /// Run once per α of --alphas and draw the reward–diversity frontier to this PNG.
    #[arg(long, value_name = "FILE.png")]
    pub sweep: Option<std::path::PathBuf>,
    /// The α values of --sweep.
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.03,0.1,0.3,1,10")]
    pub alphas: Vec<f32>,
}

fn points(x: &Tensor) -> Vec<(f64, f64)> {
    x.data().chunks(2).map(|p| (p[0] as f64, p[1] as f64)).collect()
}

/// Run the `toy2d` command.
pub fn run_cli(a: &Toy2dArgs) -> Result<()> {
    use std::time::Instant;
    if a.eval_samples < 2 {
        anyhow::bail!("--eval-samples must be at least 2");
    }
    for p in a.plot.iter().chain(&a.sweep) {
        crate::plot::check_out(p)?;
    }
    let t0 = Instant::now();
    let base = default_base(a.seed)?;
    println!("pre-trained the base MLP by CFM on {MODES} Gaussians in {:.1} s", t0.elapsed().as_secs_f64());
    let opts = |alpha: f32| Toy2dOptions {
        alpha,
        tau: a.tau,
        epochs: a.epochs,
        steps_per_epoch: a.steps_per_epoch,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        eval_samples: a.eval_samples,
        ode_steps: a.ode_steps,
        weight_mode: a.weight_mode.clone(),
    };
    if let Some(out) = &a.sweep {
        if a.alphas.is_empty() {
            anyhow::bail!("--alphas is empty");
        }
        let mut res = Vec::new();
        for &alpha in &a.alphas {
            let t = Instant::now();
            let r = finetune(&base, &opts(alpha), &mut |_| {})?;
            println!("alpha {alpha:<6} tau {}: reward {:.3} -> {:.3}, diversity {:.3} -> {:.3} ({:.1} s)", a.tau, r.reward_mean_initial, r.reward_mean, r.diversity_initial, r.diversity, t.elapsed().as_secs_f64());
            res.push(r);
        }
        let pts: Vec<crate::plot::FrontierPoint> = res
            .iter()
            .map(|r| crate::plot::FrontierPoint {
                label: format!("α = {}", r.alpha), x: r.diversity as f64, y: r.reward_mean as f64, path: r.history.iter().map(|p| (p.diversity as f64, p.reward_mean as f64)).collect()
            })
            .collect();
        let start = (res[0].diversity_initial as f64, res[0].reward_mean_initial as f64);
        let title = format!("ORW-CFM-W2 on 8 Gaussians: τ = {}, {} epochs × {} steps", a.tau, a.epochs, a.steps_per_epoch);
        crate::plot::frontier(out, &title, "diversity (mean pairwise distance)", "mean reward −‖x − c‖", &pts, start)?;
        println!("wrote {}", out.display());
        if a.json {
            println!("{}", serde_json::json!({ "sweep": res }));
        }
        return Ok(());
    }
    let r = finetune(&base, &opts(a.alpha), &mut |p| println!("epoch {:>3}: reward {:.4}  diversity {:.4}", p.epoch, p.reward_mean, p.diversity))?;
    println!("reward {:.4} -> {:.4}, diversity {:.4} -> {:.4} (alpha {}, tau {})", r.reward_mean_initial, r.reward_mean, r.diversity_initial, r.diversity, a.alpha, a.tau);
    if let Some(out) = &a.plot {
        let panels = vec![
            (format!("pre-trained: reward {:.2}, diversity {:.2}", r.reward_mean_initial, r.diversity_initial), points(&r.samples_initial)),
            (format!("α = {}, τ = {}: reward {:.2}, diversity {:.2}", a.alpha, a.tau, r.reward_mean, r.diversity), points(&r.samples)),
        ];
        let lim = (RADIUS + 5.0 * MODE_STD + 0.5) as f64;
        crate::plot::scatter_panels(out, &panels, Some((TARGET[0] as f64, TARGET[1] as f64)), (-lim, lim))?;
        println!("wrote {}", out.display());
    }
    if a.json {
        println!("{}", serde_json::json!({ "reward_mean_initial": r.reward_mean_initial, "reward_mean": r.reward_mean, "diversity_initial": r.diversity_initial, "diversity": r.diversity }));
    }
    Ok(())
}
