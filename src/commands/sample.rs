//! `orwcfm-fast sample` and `orwcfm-fast eval`: draw samples of a model; measure reward and
//! diversity of its samples.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde_json::Map;

use super::runconfig::resolve;
use super::train::{build_real, build_reward, evaluate, load_base};
use crate::flow::ode::OdeSolver;
use crate::io::image::save_grid;
use crate::io::safetensors::{self as st, Out};
use crate::nn::{UNetModel, VelocityField};
use crate::orw::sample_model;
use crate::rng::Rng;
use crate::tensor::{DType, Device};

/// Which model and how to sample it.
#[derive(clap::Args, Debug)]
pub struct SamplerArgs {
    /// Model weights (safetensors or torchcfm .pt); default: the bundled MNIST U-Net.
    #[arg(long)]
    pub model: Option<String>,
    /// Entry of a .pt checkpoint (default ema_model).
    #[arg(long)]
    pub key: Option<String>,
    /// U-Net config for weights without one (JSON file or mnist, mnist-small, cifar10).
    #[arg(long)]
    pub unet_config: Option<String>,
    /// Number of samples.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub num: usize,
    /// euler, midpoint, rk4 or dopri5.
    #[arg(long, default_value = "euler")]
    pub solver: String,
    /// Steps of a fixed-grid solver.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub atol: f64,
    #[arg(long, default_value_t = 1e-5)]
    pub rtol: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the model's weights and activations: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

impl SamplerArgs {
    /// Reject values that cannot be sampled, before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        if self.num == 0 {
            anyhow::bail!("-n/--num must be at least 1 (the number of samples), got 0");
        }
        Ok(())
    }
}

fn model_of(a: &SamplerArgs) -> Result<UNetModel> {
    let dev = Device::parse(&a.device)?;
    dev.ensure_available()?;
    let mut flags = Map::new();
    if let Some(m) = &a.model {
        flags.insert("ref_path".into(), m.clone().into());
    }
    if let Some(k) = &a.key {
        flags.insert("ref_key".into(), k.clone().into());
    }
    if let Some(c) = &a.unet_config {
        flags.insert("unet_config".into(), c.clone().into());
    }
    let (orw, prod) = resolve(None, flags)?;
    let mut m = load_base(&orw, &prod)?;
    m.to_device(dev)?;
    m.to_precision(crate::tensor::DType::parse_precision(&a.precision)?)?;
    Ok(m)
}

/// Draw samples to a PNG grid and/or a safetensors file (`x` [N,C,H,W] in [-1,1], `y` for
/// class-conditional models).
pub fn run_sample(a: &SamplerArgs, grid: Option<&PathBuf>, out: Option<&PathBuf>) -> Result<()> {
    a.validate()?;
    if grid.is_none() && out.is_none() {
        anyhow::bail!("give --grid FILE.png and/or --out FILE.safetensors");
    }
    if let Some(g) = grid {
        crate::plot::check_out(g)?;
    }
    if let Some(o) = out {
        crate::util::check_writable(o)?;
    }
    let model = model_of(a)?;
    let solver = OdeSolver::parse(&a.solver, a.atol, a.rtol)?;
    let t0 = Instant::now();
    let (x, y, st) = sample_model(&model, a.num, &solver, a.steps, &mut Rng::new(a.seed))?;
    println!("{} samples with {} ({} velocity evaluations) in {:.1} s", a.num, solver.name(), st.nfe, t0.elapsed().as_secs_f64());
    if let Some(g) = grid {
        save_grid(g, &x, (a.num as f64).sqrt().ceil() as usize)?;
        println!("wrote {}", g.display());
    }
    if let Some(o) = out {
        let yi: Option<Vec<i64>> = y.map(|y| y.iter().map(|&v| v as i64).collect());
        let ysh = [a.num];
        let mut outs = vec![("x".to_string(), Out::F(&x))];
        if let Some(yi) = &yi {
            outs.push(("y".to_string(), Out::I64(&ysh, yi)));
        }
        let meta = HashMap::from([("pixel_range".to_string(), "[-1,1]".to_string()), ("solver".to_string(), solver.name().to_string()), ("steps".to_string(), a.steps.to_string())]);
        st::save(o, &outs, DType::F32, &meta)?;
        println!("wrote {}", o.display());
    }
    Ok(())
}

/// `eval`'s metrics options: the classifier and the real images (`train`'s keys of those names).
#[derive(Debug, Default)]
pub struct EvalMetrics {
    pub classifier: Option<String>,
    pub real_data: Option<String>,
    pub real_floor_data: Option<String>,
}

/// Reward, quality and diversity of a model's samples (and their distance to a reference model's).
pub fn run_eval(a: &SamplerArgs, reward: &str, target_classes: &[usize], reference: Option<&String>, metrics: &EvalMetrics, json: bool) -> Result<()> {
    a.validate()?;
    let model = model_of(a)?;
    let mut flags = Map::new();
    flags.insert("reward".into(), reward.into());
    flags.insert("target_classes".into(), serde_json::to_value(target_classes)?);
    for (k, v) in [("classifier", &metrics.classifier), ("real_data", &metrics.real_data), ("real_floor_data", &metrics.real_floor_data)] {
        if let Some(v) = v {
            flags.insert(k.into(), v.clone().into());
        }
    }
    let (orw, prod) = resolve(None, flags)?;
    let (mut r, cls, targets) = build_reward(&prod, &orw.text_prompts, &model.sample_shape())?;
    let real = build_real(&prod, cls.as_ref(), &targets, &model.sample_shape())?;
    let solver = OdeSolver::parse(&a.solver, a.atol, a.rtol)?;
    let refx = match reference {
        Some(p) => {
            let m = model_of(&SamplerArgs {
                model: Some(p.clone()),
                key: None,
                unet_config: a.unet_config.clone(),
                num: a.num,
                solver: a.solver.clone(),
                steps: a.steps,
                atol: a.atol,
                rtol: a.rtol,
                seed: a.seed,
                device: a.device.clone(),
                precision: a.precision.clone(),
            })?;
            Some(evaluate(&m, a.num, &solver, a.steps, a.seed ^ 0x2EF, r.as_mut(), None, None, None)?.0)
        }
        None => None,
    };
    let (_, s) = evaluate(&model, a.num, &solver, a.steps, a.seed, r.as_mut(), cls.as_ref().map(|c| (c, targets.as_slice())), refx.as_ref(), real.as_ref())?;
    for (k, v) in s.scalars() {
        println!("{k:<20} {v:.5}");
    }
    if let Some(h) = &s.class_histogram {
        println!("class histogram      {h:?}");
    }
    if let Some(r) = &real {
        println!("real images          {}", r.source);
    }
    if json {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}
