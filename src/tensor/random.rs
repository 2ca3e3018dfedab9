//! Counter-based random tensors (Philox4x32-10, [`crate::rng::philox`]), drawn by the backend
//! of the device they are made on: the CPU reference fills them with `rng::philox`, a GPU with
//! the kernels of `kernels/rng.cu`, so the host never draws or uploads device noise. A draw is
//! named by a stream's `(seed, offset)`; every device gives the same uniforms and dropout masks
//! bit for bit, and normals equal to the last ulp of its `logf`/`sincosf`.

use anyhow::Result;

use super::{DType, Device, Storage, Tensor};
use crate::backend::RandomDist;
use crate::rng::philox::Philox;

impl Tensor {
    /// The Philox draw `(seed, offset)` of `dist` as a `shape` tensor on `device` in `dtype`
    /// (element `i` from lane `i % 4` of block `offset + i / 4`); advances nothing.
    pub fn philox_at(shape: &[usize], dist: RandomDist, seed: u64, offset: u64, device: Device, dtype: DType) -> Result<Tensor> {
        Ok(Tensor::from_op(Storage::philox(device, shape.iter().product(), dist, seed, offset, dtype)?, shape))
    }
    /// Standard normals from `stream` (its next `numel` values; the stream moves past them),
    /// made on `device` in `dtype`.
    pub fn philox_normal(shape: &[usize], device: Device, dtype: DType, stream: &mut Philox) -> Result<Tensor> {
        let offset = stream.reserve(shape.iter().product());
        Tensor::philox_at(shape, RandomDist::Normal, stream.seed(), offset, device, dtype)
    }
    /// Uniforms in [0, 1) from `stream`, made on `device` in `dtype`.
    pub fn philox_uniform(shape: &[usize], device: Device, dtype: DType, stream: &mut Philox) -> Result<Tensor> {
        let offset = stream.reserve(shape.iter().product());
        Tensor::philox_at(shape, RandomDist::Uniform, stream.seed(), offset, device, dtype)
    }
    /// Inverted dropout of `self` with drop probability `p` and the mask of the Philox draw
    /// `(seed, offset)` (kept: `1/(1−p)`, dropped: 0), on `self`'s device and in its dtype. The
    /// same call on an output gradient is the backward.
    pub fn dropout_philox(&self, p: f32, seed: u64, offset: u64) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.dropout(p, seed, offset)?, &self.shape))
    }
}
