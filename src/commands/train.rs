//! `orwcfm-fast train`: ORW-CFM-W2 fine-tuning as a product — config from presets, a TOML file and
//! flags; rewards by name; evaluation of reward and diversity; metrics (JSONL, CSV, TensorBoard),
//! sample grids, plots, checkpoints and `summary.json` under `<savedir>/<run_name>/`; a progress
//! bar; Ctrl-C saves a checkpoint that `--resume` continues.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use super::runconfig::{ProductConfig, read_toml, resolve, to_toml};
use crate::eval::{RealSet, SampleStats, sample_stats};
use crate::flow::ode::OdeSolver;
use crate::io::image::save_grid;
use crate::io::safetensors::write_atomic;
use crate::logging::{MetricsLog, Progress, plot_metrics};
use crate::nn::{Classifier, UNetModel, VelocityField};
use crate::orw::{OrwConfig, StepMetrics, TrainHooks, Trainer, sample_model};
use crate::reward::classifier::{ClassifierMode, ClassifierReward};
use crate::reward::clip::{ClipMode, ClipReward};
use crate::reward::external::ExternalReward;
use crate::reward::jpeg::JpegReward;
use crate::reward::target::TargetImageReward;
use crate::reward::{Reward, score_checked};
use crate::rng::Rng;
use crate::tensor::{Device, Tensor};

/// Declares the `train` flags: one per config key, same name (`learning_rate` ↔ `--learning-rate`).
macro_rules! flags {
    (values { $( $(#[doc = $doc:expr])* $name:ident : $ty:ty ),* $(,)? } switches { $( $(#[doc = $sdoc:expr])* $sname:ident ),* $(,)? }) => {
        /// Flags of `train`; each overrides the config key of the same name.
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct TrainFlags {
            $( $(#[doc = $doc])* #[arg(long)] pub $name: Option<$ty>, )*
            // a switch alone means true; `--dropout false` turns one off
            $( $(#[doc = $sdoc])* #[arg(long, num_args = 0..=1, default_missing_value = "true")] pub $sname: Option<bool>, )*
        }
        impl TrainFlags {
            /// The flags given, as config keys.
            pub fn overrides(&self) -> Map<String, Value> {
                let mut m = Map::new();
                $( if let Some(v) = &self.$name { m.insert(stringify!($name).to_string(), serde_json::to_value(v).expect("flag value")); } )*
                $( if let Some(v) = self.$sname { m.insert(stringify!($sname).to_string(), Value::Bool(v)); } )*
                m
            }
            /// Every key that has a flag.
            pub fn keys() -> Vec<&'static str> {
                vec![$(stringify!($name),)* $(stringify!($sname),)*]
            }
        }
    };
}

flags! {
    values {
        /// Starting values: mnist-even (the bundled 10-minute CPU experiment, the default) or paper (the reference code's defaults).
        preset: String,
        /// Adam learning rate after warm-up.
        learning_rate: f32,
        /// Linear warm-up steps (torchcfm's min(step, warmup)/warmup; step 0 runs at lr 0).
        warmup_steps: u64,
        /// α: weight of the W2 term mean_pix (v_θ − v_ref)².
        w2_coefficient: f32,
        /// τ: weights exp(τ·r) (it multiplies).
        temperature: f32,
        /// Global gradient-norm clip (0: off).
        grad_clip: f32,
        /// Samples per gradient step.
        batch_size: usize,
        /// Text prompts of the CLIP reward (comma-separated; prompt 0 is rewarded).
        text_prompts: String,
        /// Parent folder of run folders.
        savedir: String,
        /// The pre-trained model to fine-tune (safetensors or torchcfm .pt); default: the bundled MNIST U-Net.
        ref_path: String,
        /// Entry of a .pt checkpoint (ema_model by default; the reference code uses net_model).
        ref_key: String,
        /// Run folder name under savedir.
        run_name: String,
        num_epochs: u64,
        /// Gradient steps per epoch (the sampling policy is refreshed after each epoch).
        steps_per_epoch: u64,
        /// euler, midpoint, rk4 or dopri5.
        ode_solver: String,
        /// Steps of a fixed-grid solver.
        ode_steps: usize,
        ode_atol: f64,
        ode_rtol: f64,
        /// independent or exact-ot (also fm, sbcfm, si).
        coupling: String,
        /// σ of the probability path.
        sigma: f32,
        /// exp (as published), exp-normalized or zscore.
        weight_mode: String,
        /// Gradient steps per sampled batch.
        sample_reuse: usize,
        /// Samples per ODE solve (0: batch_size).
        sample_batch: usize,
        seed: u64,
        /// EMA decay (0: off).
        ema_decay: f32,
        /// Checkpoint every N epochs (0: only at the end).
        save_every_epochs: u64,
        keep_checkpoints: usize,
        /// U-Net config for ref_path weights that carry none.
        unet_config: String,
        /// classifier, clip, jpeg-compressibility, jpeg-incompressibility, target-image or external.
        reward: String,
        /// CLIP reward: a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer.json or vocab.json + merges.txt).
        clip_model: String,
        /// CLIP reward: prob-diff (p(prompt 0) − p(prompt 1) over the prompts' softmax), cosine or logit.
        clip_mode: String,
        /// Target classes of the classifier reward (comma-separated).
        target_classes: String,
        /// Classifier reward: prob (probability mass of the target classes), log (its log) or top (1 when the top class is a target).
        classifier_mode: String,
        /// Classifier for the reward and the feature metrics (default: bundled MNIST digits).
        classifier: String,
        /// External reward program and arguments, space-separated (use the config file for arguments with spaces).
        reward_command: String,
        /// Seconds an external reward program may take per batch.
        reward_timeout: f64,
        /// Target image of the target-image reward.
        target_image: String,
        jpeg_quality: u8,
        /// Evaluate every N epochs.
        eval_every: u64,
        eval_samples: usize,
        /// Real images for the Fréchet distances (a --data spec; default: the bundled held-out digits for 1×28×28 models; none: off).
        real_data: String,
        /// Real images giving those distances' floor (default: the bundled training digits).
        real_floor_data: String,
        /// Sample grid every N epochs.
        grid_every: u64,
        grid_samples: usize,
        /// cpu, cuda or cuda:N.
        device: String,
        /// f32, f16 or bf16: weights and activations of the forward/backward pass in that dtype,
        /// f32 master weights and Adam moments (f16 with dynamic loss scaling).
        precision: String,
    }
    switches {
        /// Accepted for compatibility; metrics always go to metrics.jsonl/csv and TensorBoard files (upload with `wandb sync`).
        use_wandb,
        /// Draw OT pairs with replacement as torchcfm does.
        ot_replace,
        /// Dropout on in net's forward pass.
        dropout,
        /// No progress output.
        quiet,
    }
}

/// `train`'s command line.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML config file (keys as the flags, with underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in this folder (a run folder or one of its checkpoints); flags other
    /// than --num-epochs and --quiet are not allowed with it.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace an existing run folder of the same name.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub flags: TrainFlags,
}

/// Flags whose config value is a list, given comma- or space-separated on the command line.
pub(crate) fn listify(m: &mut Map<String, Value>) -> Result<()> {
    for (k, sep) in [("text_prompts", ','), ("target_classes", ','), ("reward_command", ' ')] {
        if let Some(Value::String(s)) = m.get(k).cloned() {
            let parts: Vec<&str> = s.split(sep).map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
            let v = if k == "target_classes" {
                Value::Array(parts.iter().map(|p| p.parse::<u64>().map(Value::from).with_context(|| format!("--target-classes: '{p}' is not a class index"))).collect::<Result<_>>()?)
            } else {
                Value::Array(parts.iter().map(|p| Value::String(p.to_string())).collect())
            };
            m.insert(k.into(), v);
        }
    }
    Ok(())
}

/// The bundled base model: a U-Net pre-trained on the bundled MNIST subset by `pretrain`.
pub fn bundled_unet() -> Result<UNetModel> {
    let raw = crate::io::safetensors::parse(include_bytes!("../../assets/models/mnist_unet.safetensors"), "the bundled MNIST U-Net")?;
    let cfg = raw.metadata.get("unet_config").context("the bundled U-Net lacks its config")?;
    let mut m = UNetModel::new(&crate::nn::UNetConfig::from_json_str(cfg)?, crate::nn::Init::Zeros)?;
    m.params_mut().load_strict(raw.tensors)?;
    Ok(m)
}

/// Load the model to fine-tune: `ref_path` (with `unet_config` when given) or the bundled U-Net.
pub fn load_base(orw: &OrwConfig, prod: &ProductConfig) -> Result<UNetModel> {
    match &orw.ref_path {
        None => bundled_unet(),
        Some(p) => {
            let mut raw = crate::io::model::read_weights(Path::new(p), orw.ref_key.as_deref())?;
            // a given U-Net config (file or built-in name) wins over the one stored in the weights
            if let Some(c) = &prod.unet_config {
                raw.metadata.insert("unet_config".into(), crate::nn::config::resolve_config(c)?.to_json().to_string());
            }
            let lm = crate::nn::model_from_raw(raw, None).with_context(|| format!("loading {p}"))?;
            for w in &lm.warnings {
                eprintln!("warning: {w}");
            }
            Ok(lm.model)
        }
    }
}

/// The classifier for the reward and the feature metrics.
pub fn load_classifier(prod: &ProductConfig) -> Result<Classifier> {
    super::classifier::load(prod.classifier.as_deref().map(Path::new))
}

/// Build the reward named in the config; also returns the classifier used for metrics (if any
/// fits the samples) and the reward's target classes.
pub fn build_reward(prod: &ProductConfig, prompts: &[String], sample_shape: &[usize]) -> Result<(Box<dyn Reward>, Option<Classifier>, Vec<usize>)> {
    let fits = |c: &Classifier| {
        let k = c.config();
        sample_shape == [k.in_channels, k.image_size, k.image_size]
    };
    let metrics_classifier = || -> Option<Classifier> { load_classifier(prod).ok().filter(fits) };
    Ok(match prod.reward.as_str() {
        "classifier" => {
            let c = load_classifier(prod)?;
            if !fits(&c) {
                let k = c.config();
                bail!("the classifier takes images [{}, {}, {}] but the model makes {sample_shape:?}", k.in_channels, k.image_size, k.image_size);
            }
            let r = ClassifierReward::new(c.clone(), prod.target_classes.clone(), ClassifierMode::parse(&prod.classifier_mode)?)?;
            (Box::new(r), Some(c), prod.target_classes.clone())
        }
        "clip" => {
            let dir = prod.clip_model.as_ref().context("the clip reward needs clip_model (--clip-model DIR: a Hugging Face CLIP folder; see the README)")?;
            let mode = ClipMode::parse(&prod.clip_mode)?;
            if !(sample_shape.len() == 3 && (sample_shape[0] == 1 || sample_shape[0] == 3)) {
                bail!("the clip reward scores images [1 or 3, H, W]; the model makes {sample_shape:?}");
            }
            let device = Device::parse(&prod.device)?;
            let mut model = crate::nn::ClipModel::from_dir(Path::new(dir), device)?;
            // the towers follow the run's precision (autocast-style: matrix products in it)
            model.to_precision(crate::tensor::DType::parse_precision(&prod.precision)?)?;
            let r = ClipReward::new(model, prompts.to_vec(), mode)?;
            (Box::new(r), metrics_classifier(), Vec::new())
        }
        "jpeg-compressibility" | "jpeg-incompressibility" => {
            let mut r = if prod.reward == "jpeg-compressibility" { JpegReward::compressibility() } else { JpegReward::incompressibility() };
            if !(1..=100).contains(&prod.jpeg_quality) {
                bail!("jpeg_quality must be in 1..=100, got {}", prod.jpeg_quality);
            }
            r.quality = prod.jpeg_quality;
            (Box::new(r), metrics_classifier(), Vec::new())
        }
        "target-image" => {
            let p = prod.target_image.as_ref().context("the target-image reward needs target_image (a PNG or JPEG)")?;
            (Box::new(TargetImageReward::from_file(p)?), metrics_classifier(), Vec::new())
        }
        "external" => {
            if !(prod.reward_timeout > 0.0 && prod.reward_timeout <= 1e6) {
                bail!("reward_timeout must be a number of seconds in (0, 1e6], got {}", prod.reward_timeout);
            }
            let r = ExternalReward::new(prod.reward_command.clone(), Vec::new())?.with_timeout(Duration::from_secs_f64(prod.reward_timeout));
            (Box::new(r), metrics_classifier(), Vec::new())
        }
        other => {
            let names = ["classifier", "clip", "jpeg-compressibility", "jpeg-incompressibility", "target-image", "external"];
            let hint = crate::util::nearest(other, names).map(|n| format!(" (did you mean '{n}'?)")).unwrap_or_default();
            bail!("unknown reward '{other}'{hint}; valid: {}", names.join(", "))
        }
    })
}

/// The real images of the evaluations' Fréchet distances (see `real_data`): `None` without a
/// metrics classifier, or when `real_data` is `none`, or left unset for a model that does not
/// make 1×28×28 digits.
pub fn build_real(prod: &ProductConfig, classifier: Option<&Classifier>, targets: &[usize], sample_shape: &[usize]) -> Result<Option<RealSet>> {
    let digits = sample_shape == [1, 28, 28];
    let (reference, floor) = match prod.real_data.as_deref() {
        Some("none") => return Ok(None),
        Some(r) => (r.to_string(), prod.real_floor_data.clone()),
        None if digits => ("mnist5k:heldout".to_string(), Some(prod.real_floor_data.clone().unwrap_or_else(|| "mnist5k:train".into()))),
        None => return Ok(None),
    };
    let Some(c) = classifier else {
        if prod.real_data.is_some() {
            bail!("real_data needs a classifier whose features the distances are measured in (set classifier)");
        }
        return Ok(None);
    };
    let open = |spec: &str| -> Result<crate::data::Dataset> {
        let ds = crate::data::open(spec).with_context(|| format!("real_data {spec}"))?;
        if ds.sample_shape()[..] != *sample_shape {
            bail!("the real images {} are {:?}, the model's samples {sample_shape:?}", ds.source, ds.sample_shape());
        }
        Ok(ds)
    };
    let r = open(&reference)?;
    let f = floor.as_deref().map(open).transpose()?;
    Ok(Some(RealSet::new(c, &r, f.as_ref(), targets)?))
}

/// Samples, rewards and statistics of `model` with a fixed noise seed.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &UNetModel,
    n: usize,
    solver: &OdeSolver,
    steps: usize,
    seed: u64,
    reward: &mut dyn Reward,
    classifier: Option<(&Classifier, &[usize])>,
    reference: Option<&Tensor>,
    real: Option<&RealSet>,
) -> Result<(Tensor, SampleStats)> {
    let mut rng = Rng::new(seed ^ 0xE7A1_5EED);
    let (x, y, _) = sample_model(model, n, solver, steps, &mut rng)?;
    let r = score_checked(reward, &x, y.as_deref())?;
    let s = sample_stats(&x, &r, classifier, reference, real)?;
    Ok((x, s))
}

fn fmt_stats(s: &SampleStats) -> String {
    let mut t = format!("reward {:.4}  diversity {:.3}", s.reward_mean, s.diversity_pixel);
    if let Some(f) = s.target_fraction {
        t += &format!("  target classes {:.1}%", 100.0 * f);
    }
    if let Some(e) = s.class_entropy_bits {
        t += &format!("  class entropy {e:.2} bits");
    }
    if let Some(v) = s.vendi {
        t += &format!("  vendi {v:.1}");
    }
    // the distance to the target classes' real images when there is one, else to all of them
    let fd = match (s.fd_real_target, s.fd_real) {
        (Some(f), _) => Some((" targets", f, s.fd_floor_target)),
        (None, Some(f)) => Some(("", f, s.fd_floor)),
        (None, None) => None,
    };
    if let Some((what, f, floor)) = fd {
        t += &format!("  FD to real{what} {f:.2}");
        if let Some(fl) = floor {
            t += &format!(" (floor {fl:.2})");
        }
    }
    if let Some(w) = s.w2_to_reference {
        t += &format!("  W2 to ref {w:.3}");
    }
    t
}

/// What `train` does around the library's loop ([`Trainer::run`], which keeps the checkpoint
/// schedule): the metrics log, the progress bar, evaluations and sample grids after epochs, and
/// stopping on Ctrl-C.
struct TrainUi<'a> {
    log: MetricsLog,
    bar: Progress,
    prod: &'a ProductConfig,
    solver: &'a OdeSolver,
    cls: Option<(&'a Classifier, &'a [usize])>,
    /// The reference model's samples, for the W2 distance.
    ref_x: &'a Tensor,
    /// Real images for the Fréchet distances.
    real: Option<&'a RealSet>,
    run_dir: &'a Path,
    stop: Arc<AtomicBool>,
    last: Option<StepMetrics>,
    final_stats: Option<SampleStats>,
}

impl TrainHooks<UNetModel> for TrainUi<'_> {
    fn on_step(&mut self, _tr: &Trainer<UNetModel>, m: &StepMetrics) -> Result<()> {
        self.log.log(m)?;
        self.bar.update(m.step, &format!("reward {:.3} loss {:.4}", m.reward_mean, m.total_loss));
        self.last = Some(m.clone());
        Ok(())
    }

    fn on_epoch(&mut self, tr: &Trainer<UNetModel>, reward: &mut dyn Reward, m: &StepMetrics) -> Result<()> {
        let (prod, orw) = (self.prod, tr.config());
        let ep = tr.epoch();
        let done = tr.finished();
        if prod.eval_every > 0 && (ep.is_multiple_of(prod.eval_every) || done) {
            let (_, s) = evaluate(tr.net(), prod.eval_samples, self.solver, orw.ode_steps, orw.seed, reward, self.cls, Some(self.ref_x), self.real)?;
            let sc = s.scalars();
            self.log.log_eval(m.step, &sc.iter().map(|(k, v)| (k.as_str(), *v as f64)).collect::<Vec<_>>())?;
            self.bar.println(&format!("epoch {ep}: {}", fmt_stats(&s)));
            self.final_stats = Some(s);
        }
        if prod.grid_every > 0 && (ep.is_multiple_of(prod.grid_every) || done) {
            let (gx, _) = evaluate(tr.net(), prod.grid_samples, self.solver, orw.ode_steps, orw.seed ^ 1, reward, None, None, None)?;
            save_grid(&self.run_dir.join(format!("samples_step{:08}.png", m.step)), &gx, (prod.grid_samples as f64).sqrt().ceil() as usize)?;
        }
        Ok(())
    }

    fn should_stop(&mut self, _tr: &Trainer<UNetModel>) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Run `train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let mut flags = a.flags.overrides();
    listify(&mut flags)?;
    let (mut orw, prod, resume_from) = if let Some(r) = &a.resume {
        if a.config.is_some() || a.overwrite {
            bail!("--config and --overwrite cannot be combined with --resume (a resumed run keeps its config.toml)");
        }
        let (run, _) = crate::orw::checkpoint::locate(r)?;
        let saved = run.join("config.toml");
        let mut file = read_toml(&saved).with_context(|| format!("the run folder {} has no readable config.toml", run.display()))?;
        for (k, v) in flags {
            match k.as_str() {
                "num_epochs" | "quiet" => {
                    file.insert(k, v);
                }
                _ => bail!("--{} cannot change when resuming (only --num-epochs and --quiet can)", k.replace('_', "-")),
            }
        }
        let (o, p) = resolve(Some(file), Map::new())?;
        (o, p, Some(r.clone()))
    } else {
        let file = a.config.as_deref().map(read_toml).transpose()?;
        let named = flags.contains_key("run_name") || file.as_ref().is_some_and(|f| f.contains_key("run_name"));
        let (mut o, p) = resolve(file, flags)?;
        // the preset's own run name is not the user's choice: a second run gets the next free name
        if !named && !a.overwrite {
            let base = o.run_name.clone();
            let mut k = 1;
            while PathBuf::from(&o.savedir).join(&o.run_name).join("checkpoints").join("latest").exists() {
                k += 1;
                o.run_name = format!("{base}-{k}");
            }
        }
        (o, p, None)
    };
    let device = Device::parse(&prod.device)?;
    device.ensure_available()?;

    let mut tr: Trainer<UNetModel> = if let Some(r) = &resume_from {
        let mut t = Trainer::resume(r)?;
        // the checkpoint's trainer settings rule; config.toml may only have changed num_epochs
        let mut want = orw.clone();
        want.num_epochs = t.config().num_epochs;
        if &want != t.config() {
            bail!("config.toml of {} no longer matches the checkpoint's trainer settings (only num_epochs may change when resuming)", r.display());
        }
        t.set_num_epochs(orw.num_epochs);
        t
    } else {
        let run_dir = PathBuf::from(&orw.savedir).join(&orw.run_name);
        if run_dir.join("checkpoints").join("latest").exists() && !a.overwrite {
            bail!("the run folder {} already holds a run: continue it with --resume {}, pick another --run-name, or pass --overwrite", run_dir.display(), run_dir.display());
        }
        if run_dir.exists() && (a.overwrite || !run_dir.join("checkpoints").join("latest").exists()) && run_dir.join("config.toml").exists() {
            // a finished or abandoned run of this name (no checkpoint to resume): start afresh
            std::fs::remove_dir_all(&run_dir).with_context(|| format!("cannot clear {}", run_dir.display()))?;
        }
        let mut t = Trainer::new(orw.clone(), load_base(&orw, &prod)?)?;
        t.set_run_dir(&run_dir)?;
        t
    };
    tr.to_device(device)?;
    tr.set_precision(crate::tensor::DType::parse_precision(&prod.precision)?)?;
    let run_dir = tr.run_dir().expect("the trainer has a run folder").to_path_buf();
    let shape = tr.net().sample_shape();
    let (mut reward, classifier, targets) = build_reward(&prod, &orw.text_prompts, &shape)?;
    orw = tr.config().clone();
    write_atomic(&run_dir.join("config.toml"), to_toml(&orw, &prod)?.as_bytes())?;
    let start_step = tr.step();
    let mut log = MetricsLog::create(&run_dir, resume_from.as_ref().map(|_| start_step))?;
    let total = orw.total_steps();
    let solver = orw.solver()?;
    let cls = classifier.as_ref().map(|c| (c, targets.as_slice()));
    let real = build_real(&prod, classifier.as_ref(), &targets, &shape)?;
    let t0 = Instant::now();
    let quiet = prod.quiet;
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    say(&format!(
        "train: ORW-CFM-W2 on {} ({} parameters), reward {}, α {} τ {} ({}), {} epochs × {} steps of {}, run folder {}",
        orw.ref_path.as_deref().unwrap_or("the bundled MNIST U-Net"),
        tr.net().params().count(),
        reward.name(),
        orw.w2_coefficient,
        orw.temperature,
        orw.weight_mode,
        orw.num_epochs,
        orw.steps_per_epoch,
        orw.batch_size,
        run_dir.display()
    ));

    // the reference model's samples: the starting point of every comparison
    // (its own noise: W2 between two independent sample sets, as `eval --reference` measures it)
    let (ref_x, initial) = evaluate(tr.reference(), prod.eval_samples, &solver, orw.ode_steps, orw.seed ^ 0x2EF, reward.as_mut(), cls, None, real.as_ref())?;
    let initial_file = run_dir.join("eval_initial.json");
    let initial: SampleStats = if resume_from.is_some() && initial_file.is_file() {
        serde_json::from_str(&std::fs::read_to_string(&initial_file)?).unwrap_or(initial)
    } else {
        write_atomic(&initial_file, serde_json::to_string_pretty(&initial)?.as_bytes())?;
        let sc: Vec<(String, f32)> = initial.scalars();
        log.log_eval(0, &sc.iter().map(|(k, v)| (k.as_str(), *v as f64)).collect::<Vec<_>>())?;
        let (gx, _) = evaluate(tr.reference(), prod.grid_samples, &solver, orw.ode_steps, orw.seed ^ 1, reward.as_mut(), None, None, None)?;
        save_grid(&run_dir.join("samples_step00000000.png"), &gx, (prod.grid_samples as f64).sqrt().ceil() as usize)?;
        initial
    };
    say(&format!("reference model: {}", fmt_stats(&initial)));

    let stop = Arc::new(AtomicBool::new(false));
    {
        let s = stop.clone();
        // a second handler cannot be installed in the same process (tests): ignore that error
        let _ = ctrlc::set_handler(move || s.store(true, Ordering::SeqCst));
    }
    let mut hooks = TrainUi { log, bar: Progress::new(total, start_step, quiet), prod: &prod, solver: &solver, cls, ref_x: &ref_x, real: real.as_ref(), run_dir: &run_dir, stop, last: None, final_stats: None };
    let end = tr.run(reward.as_mut(), None, &mut hooks);
    hooks.bar.finish();
    let end = match end {
        Ok(end) => end,
        Err(e) => {
            let _ = hooks.log.flush();
            let ck = run_dir.join("checkpoints").join("latest");
            let kept = match std::fs::read_to_string(&ck) {
                Ok(n) => format!("; the last good checkpoint is {} (continue with --resume {})", n.trim(), run_dir.display()),
                Err(_) => "; no checkpoint had been saved yet (set save_every_epochs to keep one)".to_string(),
            };
            return Err(e.context(format!("training stopped at step {}{kept}", tr.step())));
        }
    };
    let ck = end.checkpoint.expect("the trainer has a run folder");
    if end.stopped {
        hooks.log.flush()?;
        eprintln!("interrupted at step {}: saved {}; continue with: orwcfm-fast train --resume {}", tr.step(), ck.display(), run_dir.display());
        std::process::exit(130);
    }
    let TrainUi { mut log, last, final_stats, .. } = hooks;
    let fin = match final_stats {
        Some(s) => s,
        None => evaluate(tr.net(), prod.eval_samples, &solver, orw.ode_steps, orw.seed, reward.as_mut(), cls, Some(&ref_x), real.as_ref())?.1,
    };
    log.flush()?;
    let plots = plot_metrics(&run_dir).unwrap_or_else(|e| {
        eprintln!("warning: plots not drawn: {e:#}");
        Vec::new()
    });
    let mut summary = json!({
        "run_dir": run_dir.display().to_string(),
        "reward": reward.name(),
        "steps": tr.step(),
        "epochs": tr.epoch(),
        "reward_mean_initial": initial.reward_mean,
        "reward_mean_final": fin.reward_mean,
        "diversity_initial": initial.diversity_pixel,
        "diversity_final": fin.diversity_pixel,
        "diversity_feature_initial": initial.diversity_feature,
        "diversity_feature_final": fin.diversity_feature,
        "target_fraction_initial": initial.target_fraction,
        "target_fraction_final": fin.target_fraction,
        "class_histogram_initial": initial.class_histogram,
        "class_histogram_final": fin.class_histogram,
        "class_entropy_bits_initial": initial.class_entropy_bits,
        "class_entropy_bits_final": fin.class_entropy_bits,
        "w2_to_reference_final": fin.w2_to_reference,
        "eval_samples": prod.eval_samples,
        "last_step": last.as_ref().map(|m| json!({"fm_loss": m.fm_loss, "w2_loss": m.w2_loss, "total_loss": m.total_loss})),
        "wall_time_s": t0.elapsed().as_secs_f64(),
        "device": format!("{device:?}").to_lowercase(),
        "precision": prod.precision,
        "threads": rayon::current_num_threads(),
        "checkpoint": ck.display().to_string(),
        "plots": plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    // quality against real images and diversity (a second object: one json! this size
    // exceeds the macro's recursion limit)
    let quality = json!({
        "vendi_initial": initial.vendi,
        "vendi_final": fin.vendi,
        "confidence_initial": initial.confidence,
        "confidence_final": fin.confidence,
        "class_shares_initial": initial.class_shares,
        "class_shares_final": fin.class_shares,
        "min_target_share_initial": initial.min_target_share,
        "min_target_share_final": fin.min_target_share,
        "fd_real_initial": initial.fd_real,
        "fd_real_final": fin.fd_real,
        "fd_real_target_initial": initial.fd_real_target,
        "fd_real_target_final": fin.fd_real_target,
        "fd_floor": fin.fd_floor,
        "fd_floor_target": fin.fd_floor_target,
        "vendi_real": fin.vendi_real,
        "vendi_real_target": fin.vendi_real_target,
        "real_data": real.as_ref().map(|r| r.source.clone()),
    });
    if let (Some(m), Value::Object(q)) = (summary.as_object_mut(), quality) {
        m.extend(q);
    }
    write_atomic(&run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("reference: {}", fmt_stats(&initial));
    println!("final:     {}", fmt_stats(&fin));
    println!("wrote {} ({:.0} s)", run_dir.join("summary.json").display(), t0.elapsed().as_secs_f64());
    Ok(())
}
