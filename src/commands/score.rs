//! `orwcfm-fast score`: any reward on a file of samples, to check a reward on one's own images
//! before a long run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

use super::runconfig::{read_toml, resolve};
use super::train::{build_reward, listify};
use crate::reward::score_checked;

/// `score`'s arguments: the input file and the reward with its options (`train`'s keys).
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// A safetensors file holding samples `x` [N, C, H, W] in [-1, 1] (and, for class-conditional
    /// rewards, integer labels `y` [N]), e.g. from `sample --out`.
    #[arg(long)]
    pub input: PathBuf,
    /// The tensor of the file to score.
    #[arg(long, default_value = "x")]
    pub key: String,
    /// classifier, clip, jpeg-compressibility, jpeg-incompressibility, target-image or external.
    #[arg(long, default_value = "classifier")]
    pub reward: String,
    /// A TOML file with the reward's keys (as `train`'s config); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Target classes of the classifier reward (comma-separated).
    #[arg(long)]
    pub target_classes: Option<String>,
    /// Classifier reward: prob (probability mass of the target classes), log (its log) or top (1 when the top class is a target).
    #[arg(long)]
    pub classifier_mode: Option<String>,
    /// Classifier of the classifier reward (default: the bundled MNIST digits).
    #[arg(long)]
    pub classifier: Option<String>,
    /// CLIP reward: a Hugging Face CLIP folder.
    #[arg(long)]
    pub clip_model: Option<String>,
    /// CLIP reward: prob-diff, cosine or logit.
    #[arg(long)]
    pub clip_mode: Option<String>,
    /// CLIP reward: comma-separated prompts (prompt 0 is rewarded).
    #[arg(long)]
    pub text_prompts: Option<String>,
    /// Target image (PNG/JPEG) of the target-image reward.
    #[arg(long)]
    pub target_image: Option<String>,
    /// JPEG quality of the JPEG rewards.
    #[arg(long)]
    pub jpeg_quality: Option<u8>,
    /// External reward program and arguments, space-separated.
    #[arg(long)]
    pub reward_command: Option<String>,
    /// Seconds an external reward program may take per batch.
    #[arg(long)]
    pub reward_timeout: Option<f64>,
    /// cpu, cuda or cuda:N: where the CLIP reward runs.
    #[arg(long)]
    pub device: Option<String>,
    /// The last line is `{"rewards": [...]}`.
    #[arg(long)]
    pub json: bool,
}

impl ScoreArgs {
    fn overrides(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("reward".into(), self.reward.clone().into());
        // the list keys as given on the command line, split as train's flags are (listify)
        let strings = [
            ("classifier", &self.classifier),
            ("clip_model", &self.clip_model),
            ("clip_mode", &self.clip_mode),
            ("classifier_mode", &self.classifier_mode),
            ("target_image", &self.target_image),
            ("device", &self.device),
            ("target_classes", &self.target_classes),
            ("text_prompts", &self.text_prompts),
            ("reward_command", &self.reward_command),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        }
        listify(&mut m)?;
        if let Some(q) = self.jpeg_quality {
            m.insert("jpeg_quality".into(), q.into());
        }
        if let Some(t) = self.reward_timeout {
            m.insert("reward_timeout".into(), t.into());
        }
        Ok(m)
    }
}

pub fn run(a: &ScoreArgs) -> Result<()> {
    let file = a.config.as_deref().map(read_toml).transpose()?;
    let (orw, prod) = resolve(file, a.overrides()?)?;
    let st = crate::io::safetensors::load(&a.input).with_context(|| format!("reading samples {}", a.input.display()))?;
    let x = st.get(&a.key).with_context(|| format!("{} has no float tensor '{}' (it has: {})", a.input.display(), a.key, st.names().join(", ")))?.clone();
    if x.ndim() != 4 {
        bail!("'{}' in {} is {:?}; samples are [N, C, H, W]", a.key, a.input.display(), x.shape());
    }
    let n = x.shape()[0];
    let y: Option<Vec<usize>> = match st.get_int("y") {
        Some((s, v)) if s == [n] => Some(v.iter().map(|&c| c.max(0) as usize).collect()),
        _ => None,
    };
    let x = x.to_dtype(crate::tensor::DType::F32)?;
    let t0 = Instant::now();
    let (mut reward, _, _) = build_reward(&prod, &orw.text_prompts, &x.shape()[1..])?;
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let r = score_checked(reward.as_mut(), &x, y.as_deref())?;
    let score_s = t1.elapsed().as_secs_f64();
    let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64;
    let sd = (r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
    let (lo, hi) = r.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    if !a.json {
        for (i, v) in r.iter().enumerate() {
            println!("{i:>6}  {v:.6}");
        }
    }
    println!("{}: {n} samples {:?}, mean {mean:.6}, std {sd:.6}, min {lo:.6}, max {hi:.6}", reward.name(), &x.shape()[1..]);
    println!("loaded in {load_s:.2} s, scored in {score_s:.3} s ({:.2} ms per sample)", 1e3 * score_s / n.max(1) as f64);
    if a.json {
        println!("{}", json!({ "rewards": r }));
    }
    Ok(())
}
