//! The `train` configuration: the trainer's keys ([`OrwConfig`]) plus the product's (model,
//! reward, evaluation, outputs), from built-in presets, a TOML file and flags, in that order.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::orw::OrwConfig;
use crate::orw::config::config_keys;
use crate::util::nearest;

/// Settings of `train` beyond the trainer's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProductConfig {
    /// Starting values: `mnist-even` (the bundled 10-minute CPU experiment) or `paper` (the
    /// reference code's defaults).
    pub preset: String,
    /// U-Net config for `ref_path` weights that carry none (JSON file or mnist, mnist-small, cifar10).
    pub unet_config: Option<String>,
    /// classifier, clip, jpeg-compressibility, jpeg-incompressibility, target-image or external.
    pub reward: String,
    /// Target classes of the classifier reward.
    pub target_classes: Vec<usize>,
    /// The CLIP reward's model: a Hugging Face CLIP folder (config.json, model.safetensors,
    /// tokenizer.json or vocab.json + merges.txt).
    pub clip_model: Option<String>,
    /// prob-diff (p(prompt 0) − p(prompt 1), the reference's), cosine or logit.
    pub clip_mode: String,
    /// Classifier reward: `prob` (the probability mass of the target classes), `log` (its log)
    /// or `top` (1 when the top class is a target, else 0).
    pub classifier_mode: String,
    /// The classifier of the `classifier` reward and the feature metrics (default: the bundled
    /// MNIST digit classifier).
    pub classifier: Option<String>,
    /// External reward program and its arguments.
    pub reward_command: Vec<String>,
    /// Seconds an external reward program may take per batch.
    pub reward_timeout: f64,
    /// Target image (PNG/JPEG) of the target-image reward.
    pub target_image: Option<String>,
    /// JPEG quality of the JPEG rewards (DDPO: 95).
    pub jpeg_quality: u8,
    /// Evaluate reward and diversity every this many epochs (and at the start and the end).
    pub eval_every: u64,
    /// Samples per evaluation.
    pub eval_samples: usize,
    /// Real images the evaluations' Fréchet distances are measured against (a `--data` spec;
    /// default: the bundled held-out digits for 1×28×28 models, nothing otherwise; `none`: off).
    pub real_data: Option<String>,
    /// Other real images that give the floor of those distances at the evaluation's sample count
    /// (default: the bundled training digits with the bundled held-out ones; else a subset of
    /// `real_data` itself).
    pub real_floor_data: Option<String>,
    /// Save a PNG grid of samples every this many epochs (and at the start and the end).
    pub grid_every: u64,
    pub grid_samples: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// f32, f16 or bf16 (see `Trainer::set_precision`).
    pub precision: String,
    /// No progress bar or lines, only errors and the final summary.
    pub quiet: bool,
}

impl Default for ProductConfig {
    fn default() -> Self {
        ProductConfig {
            preset: "mnist-even".into(),
            unet_config: None,
            reward: "classifier".into(),
            target_classes: vec![0, 2, 4, 6, 8],
            clip_model: None,
            clip_mode: "prob-diff".into(),
            classifier_mode: "prob".into(),
            classifier: None,
            reward_command: Vec::new(),
            reward_timeout: 300.0,
            target_image: None,
            jpeg_quality: 95,
            eval_every: 2,
            eval_samples: 128,
            real_data: None,
            real_floor_data: None,
            grid_every: 5,
            grid_samples: 64,
            device: "cpu".into(),
            precision: "f32".into(),
            quiet: false,
        }
    }
}

impl ProductConfig {
    /// Ranges that would otherwise fail late, after training has started.
    pub fn validate(&self) -> Result<()> {
        if !(1..=2048).contains(&self.eval_samples) {
            bail!("eval_samples must be in 1..=2048 (the W2 metric solves an exact assignment), got {}", self.eval_samples);
        }
        crate::reward::classifier::ClassifierMode::parse(&self.classifier_mode)?;
        if self.grid_samples == 0 {
            bail!("grid_samples must be at least 1");
        }
        if !(self.reward_timeout > 0.0 && self.reward_timeout <= 1e6) {
            bail!("reward_timeout must be a number of seconds in (0, 1e6], got {}", self.reward_timeout);
        }
        Ok(())
    }
}

/// The trainer settings of a preset.
pub fn preset(name: &str) -> Result<OrwConfig> {
    match name {
        "paper" => Ok(OrwConfig::default()),
        // sized to show a clear rise in ~10 minutes on 2 CPU cores (see README)
        "mnist-even" => Ok(OrwConfig {
            learning_rate: 4e-4,
            warmup_steps: 10,
            w2_coefficient: 0.15,
            temperature: 6.0,
            grad_clip: 1.0,
            batch_size: 64,
            run_name: "mnist-even".into(),
            // three refreshes of the sampling policy: each epoch's samples come from the policy
            // frozen at its start, so the first 32 steps learn from the base model's own samples
            // (clean digits) and later ones from partly fine-tuned ones; refreshing every 8 steps
            // compounded the fine-tuned samples' flaws (FD to the real even digits 131 against
            // 101 here) and let the 2s fall below 10%
            num_epochs: 3,
            steps_per_epoch: 32,
            // second order at the cost of 16 Euler steps: the samples trained on stay sharp
            ode_solver: "midpoint".into(),
            ode_steps: 8,
            coupling: "independent".into(),
            weight_mode: "exp-normalized".into(),
            sample_reuse: 4,
            sample_batch: 64,
            save_every_epochs: 1,
            ..OrwConfig::default()
        }),
        _ => bail!("unknown preset '{name}' (valid: mnist-even, paper)"),
    }
}

/// The product settings a preset changes from [`ProductConfig::default`]: mnist-even evaluates
/// 500 samples (enough for the Fréchet distance in the classifier's 128 dimensions) after every
/// epoch.
fn preset_product(name: &str) -> Map<String, Value> {
    let mut m = Map::new();
    if name == "mnist-even" {
        m.insert("eval_samples".into(), Value::from(500));
        m.insert("eval_every".into(), Value::from(1));
    }
    m
}

fn product_keys() -> Vec<String> {
    match serde_json::to_value(ProductConfig::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Every key a `train` config may hold.
pub fn all_keys() -> Vec<String> {
    let mut k = config_keys();
    k.extend(product_keys());
    k
}

/// The boolean that `classifier_mode` replaced; a config that has it (run folders written before)
/// reads as it did: `true` is `log`, `false` is `prob`.
const LEGACY_REWARD_LOG: &str = "reward_log";

/// A TOML file as a JSON object (keys checked against [`all_keys`]).
pub fn read_toml(path: &std::path::Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let t: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let v = serde_json::to_value(t)?;
    let Value::Object(m) = v else { bail!("{} is not a table", path.display()) };
    check_keys(&m).with_context(|| format!("in {}", path.display()))?;
    Ok(m)
}

/// An unknown key is an error naming the nearest valid key.
pub fn check_keys(m: &Map<String, Value>) -> Result<()> {
    let keys = all_keys();
    for k in m.keys() {
        if k != LEGACY_REWARD_LOG && !keys.iter().any(|c| c == k) {
            let hint = nearest(k, keys.iter().map(|s| s.as_str())).map(|n| format!(" (did you mean '{n}'?)")).unwrap_or_default();
            bail!("unknown config key '{k}'{hint}");
        }
    }
    Ok(())
}

/// Resolve: preset (from the layers' `preset`, flags first), then the file, then the flags.
pub fn resolve(file: Option<Map<String, Value>>, flags: Map<String, Value>) -> Result<(OrwConfig, ProductConfig)> {
    check_keys(&flags)?;
    let preset_name = flags.get("preset").or_else(|| file.as_ref().and_then(|f| f.get("preset"))).and_then(|v| v.as_str()).unwrap_or("mnist-even").to_string();
    let mut merged: Map<String, Value> = match serde_json::to_value(preset(&preset_name)?)? {
        Value::Object(m) => m,
        _ => unreachable!("OrwConfig is an object"),
    };
    if let Value::Object(p) = serde_json::to_value(ProductConfig::default())? {
        merged.extend(p);
    }
    merged.extend(preset_product(&preset_name));
    for mut layer in file.into_iter().chain(std::iter::once(flags)) {
        if let Some(v) = layer.remove(LEGACY_REWARD_LOG) {
            let mode = if v.as_bool().context("reward_log must be true or false")? { "log" } else { "prob" };
            layer.entry("classifier_mode").or_insert(mode.into());
        }
        merged.extend(layer);
    }
    merged.insert("preset".into(), Value::String(preset_name));
    let okeys = config_keys();
    let (mut o, mut p) = (Map::new(), Map::new());
    for (k, v) in merged {
        if okeys.contains(&k) {
            o.insert(k, v)
        } else {
            p.insert(k, v)
        };
    }
    let orw = OrwConfig::from_json_value(Value::Object(o))?;
    let prod: ProductConfig = serde_json::from_value(Value::Object(p)).context("in the config")?;
    prod.validate()?;
    Ok((orw, prod))
}

/// The resolved config as TOML (what a run writes to `config.toml`). Floats are written with
/// their shortest decimal (an f32 `learning_rate` of 4e-4 as `0.0004`, not as the f64
/// `0.00039999998989515007`), which reads back to the same f32 bit for bit.
pub fn to_toml(orw: &OrwConfig, prod: &ProductConfig) -> Result<String> {
    // the typed TOML serializer writes each f32 by its own shortest decimal (and leaves out None)
    let mut t: toml::Table = toml::from_str(&toml::to_string(orw)?)?;
    t.extend(toml::from_str::<toml::Table>(&toml::to_string(prod)?)?);
    let text = toml::to_string(&t)?;
    // it must read back to exactly these settings (resuming compares them with the checkpoint's)
    let back: Map<String, Value> = match serde_json::to_value(toml::from_str::<toml::Table>(&text)?)? {
        Value::Object(m) => m,
        _ => unreachable!("a TOML table is an object"),
    };
    if resolve(Some(back), Map::new()).is_ok_and(|(o, p)| &o == orw && &p == prod) {
        return Ok(text);
    }
    to_toml_exact(orw, prod)
}

/// The config as TOML with every f32 widened to f64 exactly (long decimals, exact round trip).
fn to_toml_exact(orw: &OrwConfig, prod: &ProductConfig) -> Result<String> {
    let mut m = match serde_json::to_value(orw)? {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    if let Value::Object(p) = serde_json::to_value(prod)? {
        m.extend(p);
    }
    // TOML has no null: leave unset options out
    m.retain(|_, v| !v.is_null());
    let t: toml::Table = serde_json::from_value(Value::Object(m))?;
    Ok(toml::to_string(&t)?)
}
