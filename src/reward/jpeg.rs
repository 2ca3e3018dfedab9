//! DDPO's JPEG (in)compressibility reward.
//!
//! Port of `jpeg_compressibility` / `jpeg_incompressibility` from kvablack/ddpo-pytorch
//! (`ddpo_pytorch/rewards.py`): every sample is mapped from `[-1, 1]` to `[0, 1]`, then to
//! `uint8` with `(v * 255).round().clamp(0, 255)`, encoded as a baseline JPEG at quality 95 and
//! measured in kilobytes (`bytes / 1000`).
//!
//! - `jpeg-compressibility`: reward = −size_kB (smaller files are better);
//! - `jpeg-incompressibility`: reward = +size_kB (larger files are better).
//!
//! Samples are `[B, C, H, W]` with `C = 1` (encoded as 8-bit grey) or `C = 3` (8-bit RGB);
//! any other channel count is an error. Images of a batch are encoded in parallel.

use anyhow::{Result, anyhow, bail};
use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use rayon::prelude::*;

use super::Reward;
use crate::tensor::Tensor;

/// The JPEG quality DDPO uses.
pub const DDPO_JPEG_QUALITY: u8 = 95;

/// JPEG file size of each sample as a reward (see the module docs).
#[derive(Clone, Debug)]
pub struct JpegReward {
    /// `true`: reward = +size_kB (`jpeg-incompressibility`); `false`: reward = −size_kB
    /// (`jpeg-compressibility`).
    pub incompressible: bool,
    /// JPEG quality, 1..=100 (DDPO: 95).
    pub quality: u8,
}

impl JpegReward {
    /// `jpeg-compressibility` at DDPO's quality (95): reward = −size_kB.
    pub fn compressibility() -> Self {
        JpegReward { incompressible: false, quality: DDPO_JPEG_QUALITY }
    }

    /// `jpeg-incompressibility` at DDPO's quality (95): reward = +size_kB.
    pub fn incompressibility() -> Self {
        JpegReward { incompressible: true, quality: DDPO_JPEG_QUALITY }
    }

    /// The JPEG size in kB (`bytes / 1000`) of every sample of `x` (`[B, C, H, W]`, `[-1, 1]`).
    pub fn sizes_kb(&self, x: &Tensor) -> Result<Vec<f32>> {
        let shape = x.shape();
        if shape.len() != 4 {
            bail!("the JPEG reward needs images [B, C, H, W]; got samples of shape {shape:?}");
        }
        let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let color = match c {
            1 => ExtendedColorType::L8,
            3 => ExtendedColorType::Rgb8,
            _ => bail!(
                "the JPEG reward encodes grey (C = 1) or RGB (C = 3) images; got {c} channels \
                 (samples of shape {shape:?})"
            ),
        };
        if !(1..=100).contains(&self.quality) {
            bail!("JPEG quality must be in 1..=100, got {}", self.quality);
        }
        if h == 0 || w == 0 || h > u16::MAX as usize || w > u16::MAX as usize {
            bail!("the JPEG reward cannot encode images of {h}x{w} pixels");
        }
        let per = c * h * w;
        let data = x.data();
        let quality = self.quality;
        let encode_one = |i: usize| -> Result<f32> {
            let bytes = to_u8_hwc(&data[i * per..(i + 1) * per], c, h * w);
            let n = encode_len(&bytes, w as u32, h as u32, color, quality).map_err(|e| anyhow!("JPEG encoding of sample {i} failed: {e}"))?;
            Ok(n as f32 / 1000.0)
        };
        if b > 1 { (0..b).into_par_iter().map(encode_one).collect() } else { (0..b).map(encode_one).collect() }
    }
}

impl Default for JpegReward {
    /// `jpeg-compressibility` at quality 95.
    fn default() -> Self {
        JpegReward::compressibility()
    }
}

/// One `[C, H*W]` sample in `[-1, 1]` → interleaved 8-bit pixels (`[H*W, C]`), DDPO's rounding.
fn to_u8_hwc(chw: &[f32], c: usize, hw: usize) -> Vec<u8> {
    let mut out = vec![0u8; c * hw];
    for ch in 0..c {
        let plane = &chw[ch * hw..(ch + 1) * hw];
        for (p, &v) in plane.iter().enumerate() {
            let u = ((v + 1.0) * 0.5 * 255.0).round().clamp(0.0, 255.0);
            // NaN clamps to NaN and casts to 0.
            out[p * c + ch] = u as u8;
        }
    }
    out
}

/// Encoded JPEG length of one interleaved 8-bit image.
fn encode_len(pixels: &[u8], w: u32, h: u32, color: ExtendedColorType, quality: u8) -> image::ImageResult<usize> {
    let mut buf = Vec::with_capacity(pixels.len() / 4 + 1024);
    JpegEncoder::new_with_quality(&mut buf, quality).encode(pixels, w, h, color)?;
    Ok(buf.len())
}

impl Reward for JpegReward {
    fn name(&self) -> String {
        if self.incompressible { "jpeg-incompressibility".into() } else { "jpeg-compressibility".into() }
    }

    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        let kb = self.sizes_kb(x)?;
        Ok(if self.incompressible { kb } else { kb.into_iter().map(|v| -v).collect() })
    }
}
