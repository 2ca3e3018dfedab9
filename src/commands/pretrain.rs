//! `orwcfm-fast pretrain`: train a base U-Net by flow matching on a dataset (torchcfm's recipe).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::flow::ode::OdeSolver;
use crate::io::image::save_grid;
use crate::nn::{Init, UNetModel, VelocityField};
use crate::orw::sample_model;
use crate::pretrain::{PretrainConfig, Resumed, checkpoint_dir, net_path, pretrain, resume};
use crate::rng::Rng;

/// Flags of `pretrain`.
#[derive(clap::Args, Debug)]
pub struct PretrainArgs {
    /// Training data: mnist5k[:train|:heldout] (bundled), MNIST IDX files or folder, CIFAR-10 .bin file or folder, or a folder of PNG/JPEG images.
    #[arg(long, default_value = "mnist5k")]
    pub data: String,
    /// U-Net config JSON, or a built-in: mnist, mnist-small, cifar10.
    #[arg(long, default_value = "mnist-small")]
    pub unet_config: String,
    /// Start from these weights instead of a fresh init (safetensors or torchcfm .pt).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output: EMA weights here, raw weights beside it as <stem>.net.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 20_000)]
    pub steps: u64,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    #[arg(long, default_value_t = 5000)]
    pub warmup: u64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f32,
    /// icfm, otcfm (torchcfm's CIFAR-10 recipe), fm, sbcfm, si.
    #[arg(long, default_value = "otcfm")]
    pub coupling: String,
    #[arg(long, default_value_t = 0.0)]
    pub sigma: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save the weights and a checkpoint (<stem>.pretrain/ beside --out) every N steps (0: at the end only).
    #[arg(long, default_value_t = 1000)]
    pub save_every: u64,
    /// Continue the run that writes --out from its checkpoint (<stem>.pretrain/) up to --steps;
    /// every other setting must be the run's. Continues bit for bit on the same thread count.
    #[arg(long)]
    pub resume: bool,
    /// Print a line every N steps.
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    /// At the end, draw 64 samples of the EMA model (Euler, 50 steps) to this PNG.
    #[arg(long)]
    pub grid: Option<PathBuf>,
}

pub fn run(a: &PretrainArgs) -> Result<()> {
    let data = crate::data::open(&a.data)?;
    if a.resume && a.init.is_some() {
        anyhow::bail!("--init and --resume exclude each other: a resumed run continues from its checkpoint's weights");
    }
    if let Some(g) = &a.grid {
        crate::plot::check_out(g)?;
    }
    crate::util::check_writable(&a.out)?;
    let cfg = PretrainConfig {
        coupling: a.coupling.clone(),
        sigma: a.sigma,
        lr: a.lr,
        warmup_steps: a.warmup,
        grad_clip: a.grad_clip,
        ema_decay: a.ema_decay,
        batch_size: a.batch,
        steps: a.steps,
        seed: a.seed,
        save_every: a.save_every,
    };
    let (model, ema, start) = if a.resume {
        let Resumed { net, ema, state } = resume::<UNetModel>(&a.out, &cfg, &data)?;
        let want = crate::nn::config::resolve_config(&a.unet_config)?;
        if net.config() != &want {
            anyhow::bail!("--resume: the checkpoint's U-Net config is {}, not that of --unet-config {}", net.config().to_json(), a.unet_config);
        }
        (net, ema, Some(state))
    } else {
        let model = match &a.init {
            Some(p) => UNetModel::load_file(p, None)?,
            None => UNetModel::new(&crate::nn::config::resolve_config(&a.unet_config)?, Init::Torch(a.seed))?,
        };
        let ema = model.clone();
        (model, ema, None)
    };
    let from = start.as_ref().map_or(0, |s| s.step());
    println!("pretrain: {} images from {}, {} parameters, {} steps of {}", data.len(), data.source, model.params().count(), a.steps, a.batch);
    if let Some(s) = &start {
        println!("resuming at step {} from {}", s.step(), checkpoint_dir(&a.out).display());
    }
    println!("config: {}", serde_json::to_string(&cfg)?);
    let t0 = Instant::now();
    let (mut acc, mut k) = (0.0f64, 0u64);
    let every = a.log_every.max(1);
    pretrain(&model, &ema, &data, &cfg, Some(&a.out), start, &mut |s| {
        acc += s.loss as f64;
        k += 1;
        if s.step % every == 0 || s.step == cfg.steps {
            let el = t0.elapsed().as_secs_f64();
            let per = el / (s.step - from) as f64;
            let eta = per * (cfg.steps - s.step) as f64;
            println!("step {:>7}/{}  loss {:.5}  grad_norm {:.3}  lr {:.2e}  {:.2} s/step  eta {:.0} s", s.step, cfg.steps, acc / k as f64, s.grad_norm, s.lr, per, eta);
            acc = 0.0;
            k = 0;
        }
    })?;
    println!("wrote {} (EMA) and {} in {:.0} s", a.out.display(), net_path(&a.out).display(), t0.elapsed().as_secs_f64());
    if let Some(g) = &a.grid {
        let (x, _, _) = sample_model(&ema, 64, &OdeSolver::Euler, 50, &mut Rng::new(a.seed ^ 0x6121D)).context("sampling the grid")?;
        save_grid(g, &x, 8)?;
        println!("wrote {}", g.display());
    }
    Ok(())
}
