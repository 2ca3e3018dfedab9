//! Closeness to a fixed target image.
//!
//! reward(x) = −mean over all pixels and channels of (x − target)², with `x` and the target
//! both in the model's `[-1, 1]` pixel range. The reward is 0 for the target itself and
//! negative otherwise (at worst −4, for a pixel-wise opposite image).

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::Reward;
use crate::tensor::Tensor;

/// Negative mean squared distance to a target image (see the module docs).
#[derive(Clone, Debug)]
pub struct TargetImageReward {
    /// One sample's worth of pixels, `[C, H, W]` in `[-1, 1]`.
    target: Tensor,
}

impl TargetImageReward {
    /// A reward toward `target`, one sample without the batch axis (`[C, H, W]` for images),
    /// in `[-1, 1]`.
    pub fn new(target: Tensor) -> Self {
        TargetImageReward { target }
    }

    /// Load the target from a PNG or JPEG file: grey images (with or without alpha) give
    /// `C = 1`, anything else is converted to RGB (`C = 3`, alpha dropped). 8-bit values `v` are
    /// mapped to `v / 127.5 − 1`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let img = image::ImageReader::open(path)
            .with_context(|| format!("cannot open target image {}", path.display()))?
            .with_guessed_format()
            .with_context(|| format!("cannot read target image {}", path.display()))?
            .decode()
            .with_context(|| format!("cannot decode target image {} (PNG or JPEG expected)", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let grey = !img.color().has_color();
        let (c, interleaved) = if grey { (1, img.to_luma8().into_raw()) } else { (3, img.to_rgb8().into_raw()) };
        let hw = h * w;
        let mut chw = vec![0f32; c * hw];
        for p in 0..hw {
            for ch in 0..c {
                chw[ch * hw + p] = interleaved[p * c + ch] as f32 / 127.5 - 1.0;
            }
        }
        Ok(TargetImageReward { target: Tensor::try_from_vec(chw, &[c, h, w])? })
    }

    /// The target, `[C, H, W]` in `[-1, 1]`.
    pub fn target(&self) -> &Tensor {
        &self.target
    }
}

impl Reward for TargetImageReward {
    fn name(&self) -> String {
        "target-image".into()
    }

    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        let shape = x.shape();
        if shape.is_empty() || shape[1..] != *self.target.shape() {
            bail!(
                "target-image reward: samples of shape {:?} (one sample {:?}) do not match the \
                 target image of shape {:?}",
                shape,
                shape.get(1..).unwrap_or(&[]),
                self.target.shape()
            );
        }
        let t = self.target.data();
        let n = t.len();
        if n == 0 {
            bail!("target-image reward: the target image is empty");
        }
        Ok(x.data()
            .chunks_exact(n)
            .map(|s| {
                let se: f64 = s.iter().zip(t).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
                -(se / n as f64) as f32
            })
            .collect())
    }
}
