//! The CLIP text-image reward (the reference trainer's released reward): CLIP's processor and
//! image tower run on the model's device; the prompts' embeddings are computed once.
//!
//! Modes, from the cosine similarities `cos[b, p]` of image `b` and prompt `p` and
//! `logits = exp(logit_scale) · cos`:
//! - `prob-diff`: `softmax(logits[b])[0] − softmax(logits[b])[1]` (the reference: "An image of
//!   dog" against "Not an image of dog");
//! - `cosine`: `cos[b, 0]`;
//! - `logit`: `logits[b, 0]`.

use anyhow::{Result, bail};

use super::Reward;
use crate::nn::clip::{ClipModel, normalize_rows};
use crate::tensor::Tensor;

/// How the reward reads CLIP's similarities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipMode {
    ProbDiff,
    Cosine,
    Logit,
}

impl ClipMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "prob-diff" => ClipMode::ProbDiff,
            "cosine" => ClipMode::Cosine,
            "logit" => ClipMode::Logit,
            _ => bail!("unknown clip_mode '{s}' (prob-diff, cosine, logit)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            ClipMode::ProbDiff => "prob-diff",
            ClipMode::Cosine => "cosine",
            ClipMode::Logit => "logit",
        }
    }
}

/// Images per pass through the image tower: 128 on a GPU; on the CPU as many as keep the largest
/// activation (the MLP's `[images · tokens, intermediate]`) under 24 MiB, below glibc's mmap
/// threshold (32 MiB, `backend::cpu::tune_allocator`), so that the buffers are reused instead of
/// mapped and page-faulted in anew (ViT-B/32: 40 images; ViT-L/14: 5).
pub fn default_chunk(model: &ClipModel) -> usize {
    if model.device().is_cuda() {
        return 128;
    }
    let c = &model.config;
    let g = c.image_size / c.patch_size;
    let per_image = (g * g + 1) * c.vision.intermediate.max(3 * c.vision.hidden) * 4;
    ((24usize << 20) / per_image.max(1)).clamp(1, 128)
}

/// CLIP similarity to text prompts as a reward.
pub struct ClipReward {
    model: ClipModel,
    prompts: Vec<String>,
    /// Normalised prompt embeddings `[P, E]` (host).
    text: Vec<f32>,
    scale: f32,
    mode: ClipMode,
    /// Images per pass through the image tower.
    pub chunk: usize,
}

impl ClipReward {
    pub fn new(model: ClipModel, prompts: Vec<String>, mode: ClipMode) -> Result<Self> {
        if prompts.is_empty() {
            bail!("the CLIP reward needs text_prompts (e.g. \"An image of dog,Not an image of dog\")");
        }
        if mode == ClipMode::ProbDiff && prompts.len() < 2 {
            bail!("clip_mode prob-diff compares prompt 0 with prompt 1: give at least two text_prompts");
        }
        let t = model.text_features(&prompts)?.to_cpu()?;
        let e = model.config.projection_dim;
        let text = normalize_rows(t.data(), e);
        let scale = model.logit_scale()?;
        let chunk = default_chunk(&model);
        Ok(ClipReward { model, prompts, text, scale, mode, chunk })
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }
    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    /// Normalised image embeddings `[B, E]` (host) of images in [-1, 1].
    pub fn image_embeddings(&self, x: &Tensor) -> Result<Vec<f32>> {
        let b = x.shape().first().copied().unwrap_or(0);
        let e = self.model.config.projection_dim;
        let mut out = Vec::with_capacity(b * e);
        let mut s = 0;
        while s < b {
            let n = (b - s).min(self.chunk.max(1));
            let xb = if n == b { x.clone() } else { x.narrow(0, s, n)? };
            let f = self.model.image_features(&self.model.preprocess(&xb)?)?.to_cpu()?;
            out.extend(normalize_rows(f.data(), e));
            s += n;
        }
        Ok(out)
    }

    /// `(cos [B, P], logits [B, P])` (host).
    pub fn similarities(&self, x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = self.model.config.projection_dim;
        let img = self.image_embeddings(x)?;
        let p = self.prompts.len();
        let mut cos = Vec::with_capacity(img.len() / e * p);
        for r in img.chunks(e) {
            for t in self.text.chunks(e) {
                cos.push(r.iter().zip(t).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() as f32);
            }
        }
        let logits = cos.iter().map(|c| c * self.scale).collect();
        Ok((cos, logits))
    }
}

impl Reward for ClipReward {
    fn name(&self) -> String {
        format!("clip-{}[{}]", self.mode.name(), self.prompts.join(" | "))
    }
    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        let (cos, logits) = self.similarities(x)?;
        let p = self.prompts.len();
        Ok(match self.mode {
            ClipMode::Cosine => cos.chunks(p).map(|r| r[0]).collect(),
            ClipMode::Logit => logits.chunks(p).map(|r| r[0]).collect(),
            ClipMode::ProbDiff => logits
                .chunks(p)
                .map(|r| {
                    let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let ex: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    ((ex[0] - ex[1]) / z) as f32
                })
                .collect(),
        })
    }
}
