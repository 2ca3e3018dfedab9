//! A small CNN image classifier that runs in the engine: the digit classifier behind the
//! `classifier` reward (e.g. "only even digits") and the feature space of the diversity metrics.
//!
//! `[conv3×3 → SiLU → avg-pool 2×]` per entry of `channels`, then `Linear → SiLU` to `hidden`
//! features and `Linear` to `num_classes` logits. Inputs are images in [-1, 1] like the flow models'.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::params::ParamStore;
use crate::autograd::{Var, no_grad, ops};
use crate::io::safetensors as st;
use crate::optim::Adam;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Architecture of a [`Classifier`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub in_channels: usize,
    pub image_size: usize,
    pub num_classes: usize,
    /// Output channels of each conv stage (each halves the resolution).
    pub channels: Vec<usize>,
    /// Width of the feature layer.
    pub hidden: usize,
}

impl ClassifierConfig {
    /// The bundled MNIST digit classifier's architecture.
    pub fn mnist() -> Self {
        ClassifierConfig { in_channels: 1, image_size: 28, num_classes: 10, channels: vec![32, 64], hidden: 128 }
    }
    fn validate(&self) -> Result<()> {
        let f = 1usize << self.channels.len();
        if self.in_channels == 0 || self.num_classes < 2 || self.hidden == 0 || self.channels.is_empty() || self.channels.contains(&0) {
            bail!("invalid classifier config {self:?}");
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(f) {
            bail!("classifier image_size {} must be divisible by 2^{} (one halving per conv stage)", self.image_size, self.channels.len());
        }
        Ok(())
    }
}

/// The classifier: parameters and architecture.
#[derive(Clone)]
pub struct Classifier {
    config: ClassifierConfig,
    params: ParamStore,
}

impl Classifier {
    /// PyTorch's default init (uniform ±1/√fan_in), seeded.
    pub fn new(config: ClassifierConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut params = ParamStore::new();
        let mut add = |name: String, shape: &[usize], fan: usize, rng: &mut Rng| {
            let b = 1.0 / (fan as f32).sqrt();
            params.add(name, Tensor::rand_uniform(shape, -b, b, rng));
        };
        let mut cin = config.in_channels;
        for (i, &c) in config.channels.iter().enumerate() {
            add(format!("convs.{i}.weight"), &[c, cin, 3, 3], cin * 9, &mut rng);
            add(format!("convs.{i}.bias"), &[c], cin * 9, &mut rng);
            cin = c;
        }
        let side = config.image_size >> config.channels.len();
        let flat = cin * side * side;
        add("fc.weight".into(), &[config.hidden, flat], flat, &mut rng);
        add("fc.bias".into(), &[config.hidden], flat, &mut rng);
        add("out.weight".into(), &[config.num_classes, config.hidden], config.hidden, &mut rng);
        add("out.bias".into(), &[config.num_classes], config.hidden, &mut rng);
        Ok(Classifier { config, params })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// `(logits [B, K], features [B, hidden])` on the tape.
    pub fn forward(&self, x: &Var) -> Result<(Var, Var)> {
        let s = x.shape();
        let c = &self.config;
        if s.len() != 4 || s[1] != c.in_channels || s[2] != c.image_size || s[3] != c.image_size {
            bail!("the classifier takes [B, {}, {}, {}] images, got {s:?}", c.in_channels, c.image_size, c.image_size);
        }
        let p = |n: &str| self.params.get(n).expect("classifier parameter").clone();
        let mut h = x.clone();
        for i in 0..c.channels.len() {
            h = ops::conv2d(&h, &p(&format!("convs.{i}.weight")), Some(&p(&format!("convs.{i}.bias"))), 1, 1)?;
            h = ops::avg_pool2x(&ops::silu(&h)?)?;
        }
        let b = s[0];
        let flat = h.value().numel() / b.max(1);
        let feat = ops::silu(&ops::linear(&ops::reshape(&h, &[b, flat])?, &p("fc.weight"), Some(&p("fc.bias")))?)?;
        let logits = ops::linear(&feat, &p("out.weight"), Some(&p("out.bias")))?;
        Ok((logits, feat))
    }

    /// Logits and features without a tape, in chunks of 256 images.
    pub fn predict(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = x.shape().first().copied().unwrap_or(0);
        let per = x.numel() / b.max(1);
        let (mut lo, mut fe) = (Vec::new(), Vec::new());
        for s in (0..b).step_by(256) {
            let n = (b - s).min(256);
            let mut shape = x.shape().to_vec();
            shape[0] = n;
            let xb = Tensor::from_vec(x.data()[s * per..(s + n) * per].to_vec(), &shape);
            let (l, f) = no_grad(|| self.forward(&Var::constant(xb)))?;
            lo.extend_from_slice(l.value().data());
            fe.extend_from_slice(f.value().data());
        }
        Ok((Tensor::from_vec(lo, &[b, self.config.num_classes]), Tensor::from_vec(fe, &[b, self.config.hidden])))
    }

    /// Class probabilities `[B, K]`.
    pub fn probs(&self, x: &Tensor) -> Result<Tensor> {
        let (l, _) = self.predict(x)?;
        let k = self.config.num_classes;
        let mut p = l.to_vec();
        for row in p.chunks_mut(k) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row
                .iter_mut()
                .map(|v| {
                    *v = (*v - m).exp();
                    *v
                })
                .sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        Ok(Tensor::from_vec(p, &[l.shape()[0], k]))
    }

    /// Most likely class of each image.
    pub fn classify(&self, x: &Tensor) -> Result<Vec<usize>> {
        let (l, _) = self.predict(x)?;
        let k = self.config.num_classes;
        Ok(l.data().chunks(k).map(argmax).collect())
    }

    /// Fraction of `x` classified as `labels`.
    pub fn accuracy(&self, x: &Tensor, labels: &[usize]) -> Result<f32> {
        let c = self.classify(x)?;
        if c.len() != labels.len() {
            bail!("{} images and {} labels", c.len(), labels.len());
        }
        Ok(c.iter().zip(labels).filter(|(a, b)| a == b).count() as f32 / labels.len().max(1) as f32)
    }

    /// Save as safetensors with a `classifier_config` metadata entry.
    pub fn save_file(&self, path: &Path) -> Result<()> {
        let meta = HashMap::from([("classifier_config".to_string(), serde_json::to_string(&self.config)?)]);
        self.params.save_safetensors(path, DType::F32, &meta)
    }

    pub fn load_file(path: &Path) -> Result<Self> {
        Self::from_bytes(&std::fs::read(path).with_context(|| format!("cannot read classifier {}", path.display()))?, &path.display().to_string())
    }

    /// Load from safetensors bytes (e.g. the bundled classifier).
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let f = st::parse(bytes, what)?;
        let js = f.metadata.get("classifier_config").with_context(|| format!("{what} has no classifier_config metadata: not a classifier saved by orwcfm-fast"))?;
        let cfg: ClassifierConfig = serde_json::from_str(js).context("parsing classifier_config")?;
        let mut m = Classifier::new(cfg, 0)?;
        m.params.load_strict(f.tensors).with_context(|| format!("loading {what}"))?;
        Ok(m)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0
}

/// Settings of [`train_classifier`].
#[derive(Clone, Debug)]
pub struct ClassifierTraining {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    /// Random shifts of up to this many pixels (zero padding) as augmentation.
    pub max_shift: usize,
    pub seed: u64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        ClassifierTraining { epochs: 8, batch: 64, lr: 1e-3, max_shift: 2, seed: 0 }
    }
}

/// Shift each image of `x [B,C,H,W]` by a random offset in [-m, m]², filling with −1 (black).
fn random_shift(x: &Tensor, m: usize, rng: &mut Rng) -> Tensor {
    let s = x.shape();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    let mut out = vec![-1.0f32; x.numel()];
    let span = 2 * m as u64 + 1;
    for i in 0..b {
        let dy = rng.below(span) as isize - m as isize;
        let dx = rng.below(span) as isize - m as isize;
        for ch in 0..c {
            let base = (i * c + ch) * h * w;
            for y in 0..h as isize {
                let sy = y - dy;
                if sy < 0 || sy >= h as isize {
                    continue;
                }
                for xx in 0..w as isize {
                    let sx = xx - dx;
                    if sx >= 0 && sx < w as isize {
                        out[base + y as usize * w + xx as usize] = x.data()[base + sy as usize * w + sx as usize];
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, s)
}

/// Train `model` by cross-entropy with Adam on `images [N,C,H,W]` / `labels`; `on_epoch` gets
/// `(epoch, mean loss)`.
pub fn train_classifier(model: &Classifier, images: &Tensor, labels: &[usize], o: &ClassifierTraining, on_epoch: &mut dyn FnMut(usize, f32)) -> Result<()> {
    let n = images.shape()[0];
    if n != labels.len() || n == 0 {
        bail!("{n} images and {} labels", labels.len());
    }
    if o.batch == 0 || o.epochs == 0 || !(o.lr > 0.0) {
        bail!("classifier training needs batch ≥ 1, epochs ≥ 1 and lr > 0");
    }
    let per = images.numel() / n;
    let mut rng = Rng::new(o.seed ^ 0xC1A5);
    let mut adam = Adam::new(o.lr);
    for epoch in 0..o.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let mut total = 0.0f64;
        let mut batches = 0;
        for chunk in order.chunks(o.batch) {
            let mut xb = Vec::with_capacity(chunk.len() * per);
            for &i in chunk {
                xb.extend_from_slice(&images.data()[i * per..(i + 1) * per]);
            }
            let mut shape = images.shape().to_vec();
            shape[0] = chunk.len();
            let mut x = Tensor::from_vec(xb, &shape);
            if o.max_shift > 0 {
                x = random_shift(&x, o.max_shift, &mut rng);
            }
            let y: Vec<usize> = chunk.iter().map(|&i| labels[i]).collect();
            let (logits, _) = model.forward(&Var::constant(x))?;
            let loss = ops::cross_entropy(&logits, &y)?;
            total += loss.value().item() as f64;
            batches += 1;
            let grads = model.params.grads(&loss.backward()?)?;
            adam.step_params(&model.params, &grads, o.lr)?;
        }
        on_epoch(epoch, (total / batches as f64) as f32);
    }
    Ok(())
}
